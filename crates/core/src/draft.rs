//! `DraftSpec`: the shape of a DFlash block drafter (REFERENCE.md §3).
//!
//! A drafter is a few Qwen3-style layers that read the TARGET's hidden states ("context") and
//! predict a block of tokens at once. It has no embedding or LM head of its own: block tokens are
//! embedded with the target's embedding and drafts come from the target's lm_head.

use serde::{Deserialize, Serialize};

use crate::spec::AttentionSpec;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DraftSpec {
    /// Tokens per block: the last committed token plus `block_size - 1` drafts.
    pub block_size: usize,
    /// The token that fills the masked slots of a block.
    pub mask_token_id: u32,
    /// Target layers whose outputs, concatenated, form one context vector. The target's last
    /// layer is taken after its final norm (HF `hidden_states[i + 1]`).
    pub target_layer_ids: Vec<usize>,
    pub hidden_size: usize,
    pub rms_norm_eps: f32,
    /// The drafter's own vocabulary (informative: the target's lm_head is used).
    pub vocab_size: usize,
    pub layers: Vec<DraftLayerSpec>,
    /// Block embeddings are multiplied by this (`input_embedding_scale`, default 1).
    pub input_embedding_scale: f32,
    /// Draft logits are multiplied by this (`output_multiplier`, default 1) ...
    pub output_multiplier: f32,
    /// ... then soft-capped: `cap * tanh(logits / cap)` when set.
    pub final_logit_softcapping: Option<f32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct DraftLayerSpec {
    /// Heads, dims, rotary, sinks and value scale. For a drafter, `AttentionKind::Sliding`
    /// means |query position - key position| < window (both sides when not causal).
    pub attention: AttentionSpec,
    /// Causal over the concatenated [context, block] keys (the reference's default for sliding
    /// layers); otherwise each block row sees every context position and the whole block.
    pub causal: bool,
    pub intermediate_size: usize,
}

impl DraftSpec {
    /// Width of one context vector before `fc`.
    pub fn context_dim(&self) -> usize {
        self.target_layer_ids.len().saturating_mul(self.hidden_size)
    }
}
