//! `ModelSpec`: the one description of a model's computation. Loaders map HF configs
//! (`mimo_v2_flash`, `mimo_v2`, Llama-style dense stacks, GGUF) onto it; the CPU reference and the
//! GPU kernels read only this, never a config file.

use serde::{Deserialize, Serialize};

use crate::dtype::QuantFormat;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelSpec {
    /// The HF `model_type` (or "gguf:<arch>") the spec was built from; informative only.
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub rms_norm_eps: f32,
    pub max_position_embeddings: usize,
    /// lm_head shares the embedding matrix.
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    /// Every token id that ends generation (config.json and generation_config.json merged).
    pub eos_token_ids: Vec<u32>,
    pub pad_token_id: Option<u32>,
    /// One entry per decoder layer, in order.
    pub layers: Vec<LayerSpec>,
    /// Storage formats of the linear weights, from `quantization_config`.
    pub quant: QuantSpec,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerSpec {
    pub attention: AttentionSpec,
    pub mlp: MlpSpec,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum AttentionKind {
    /// Causal attention over every earlier token.
    Full,
    /// Causal attention over the last `window` tokens, the current one included (HF semantics:
    /// query i sees key j when 0 <= i - j < window).
    Sliding { window: usize },
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum QkvLayout {
    /// `q_proj`, `k_proj`, `v_proj` as separate weights.
    Separate,
    /// One `qkv_proj` whose rows are grouped per KV head: for each KV head g,
    /// [Q rows of its (num_heads/num_kv_heads) query heads | K rows | V rows] (MiMo-V2.5-Pro).
    FusedPerKvHead,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum RopeStyle {
    /// Rotate-half over the first `rotary_dim` dims (HF Llama/Qwen/MiMo convention).
    NeoX,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RopeSpec {
    pub theta: f64,
    /// `int(head_dim * partial_rotary_factor)` as HF computes it. HF takes frequencies
    /// `1/theta^(2i/rotary_dim)` for `i < ceil(rotary_dim/2)` and rotates the first
    /// `2*ceil(rotary_dim/2)` dims (one more when `rotary_dim` is odd); the rest pass through.
    pub rotary_dim: usize,
    pub style: RopeStyle,
}

impl RopeSpec {
    /// Head dims actually rotated.
    pub fn rotated_dims(&self) -> usize {
        self.rotary_dim.div_ceil(2).saturating_mul(2)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AttentionSpec {
    pub kind: AttentionKind,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    /// Head dim of Q and K.
    pub head_dim: usize,
    /// Head dim of V (and of the attention output per head); may differ from `head_dim`.
    pub v_head_dim: usize,
    pub rope: RopeSpec,
    /// One learned logit per query head appended as an extra softmax column (gpt-oss style).
    pub sinks: bool,
    /// V is multiplied by this before attention (MiMo `attention_value_scale`; 1.0 otherwise).
    pub value_scale: f32,
    /// Softmax scale applied to q·k (head_dim^-0.5 for MiMo and Llama).
    pub softmax_scale: f32,
    pub qkv_layout: QkvLayout,
    /// q/k/v projections carry a bias.
    pub qkv_bias: bool,
    /// Per-head RMSNorm of q and k before RoPE (Qwen3-style; the DFlash drafter).
    pub qk_norm: bool,
}

impl AttentionSpec {
    pub fn window(&self) -> Option<usize> {
        match self.kind {
            AttentionKind::Full => None,
            AttentionKind::Sliding { window } => Some(window),
        }
    }
    /// Rows of the q, k and v projections.
    pub fn q_dim(&self) -> usize {
        self.num_heads.saturating_mul(self.head_dim)
    }
    pub fn k_dim(&self) -> usize {
        self.num_kv_heads.saturating_mul(self.head_dim)
    }
    pub fn v_dim(&self) -> usize {
        self.num_kv_heads.saturating_mul(self.v_head_dim)
    }
    /// Input width of o_proj.
    pub fn o_dim(&self) -> usize {
        self.num_heads.saturating_mul(self.v_head_dim)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RouterScoring {
    /// DeepSeek-V3 "noaux_tc": sigmoid scores; choice on scores + correction bias; weights are
    /// the unbiased scores of the chosen experts.
    Sigmoid,
    /// Softmax over all experts (Mixtral/Qwen-MoE style).
    Softmax,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct MoeSpec {
    pub num_experts: usize,
    pub top_k: usize,
    /// Intermediate size of each expert.
    pub intermediate_size: usize,
    pub scoring: RouterScoring,
    /// The router has an `e_score_correction_bias` used for the choice only.
    pub correction_bias: bool,
    /// Group-limited choice: experts split into `n_group` groups; a group's score is the sum of
    /// its top-2 scores; only the best `topk_group` groups compete.
    pub n_group: usize,
    pub topk_group: usize,
    /// Normalise the chosen weights to sum 1 (plus 1e-20).
    pub norm_topk_prob: bool,
    pub routed_scaling_factor: f32,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum MlpSpec {
    /// SiLU-gated MLP: down(silu(gate(x)) * up(x)).
    Dense { intermediate_size: usize },
    /// Routed experts, each a SiLU-gated MLP; no shared expert.
    Moe(MoeSpec),
}

/// Storage formats of the weights, from the checkpoint's `quantization_config`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QuantSpec {
    /// Attention, dense MLP and other linear layers not excluded below.
    pub linear: QuantFormat,
    /// Routed expert projections.
    pub experts: QuantFormat,
    /// Module name fragments kept unquantised (`ignored_layers` / `modules_to_not_convert`).
    pub ignored: Vec<String>,
}

impl QuantSpec {
    pub fn unquantized() -> Self {
        QuantSpec {
            linear: QuantFormat::Plain(crate::DType::BF16),
            experts: QuantFormat::Plain(crate::DType::BF16),
            ignored: Vec::new(),
        }
    }
}

impl ModelSpec {
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Parameters of the whole model (embedding, layers, final norm, lm_head when untied).
    /// Counted in u128 and saturated, so absurd configs cannot overflow.
    pub fn num_parameters(&self) -> usize {
        let h = self.hidden_size as u128;
        let vocab = self.vocab_size as u128;
        let mut n = vocab * h + h;
        if !self.tie_word_embeddings {
            n += vocab * h;
        }
        for l in &self.layers {
            let a = &l.attention;
            let (q, k, v, o) = (a.q_dim() as u128, a.k_dim() as u128, a.v_dim() as u128, a.o_dim() as u128);
            n += 2 * h + h * (q + k + v) + o * h;
            if a.qkv_bias {
                n += q + k + v;
            }
            if a.sinks {
                n += a.num_heads as u128;
            }
            if a.qk_norm {
                n += 2 * a.head_dim as u128;
            }
            n += match l.mlp {
                MlpSpec::Dense { intermediate_size } => 3 * h * intermediate_size as u128,
                MlpSpec::Moe(m) => {
                    let e = m.num_experts as u128;
                    e * 3 * h * m.intermediate_size as u128 + e * h + if m.correction_bias { e } else { 0 }
                }
            };
        }
        usize::try_from(n).unwrap_or(usize::MAX)
    }

    /// A lower bound of the bytes a backend keeping the stored formats (the CUDA backend) holds
    /// for the weights, whatever formats the checkpoint stores them in, so that a model that
    /// cannot fit is refused before any is loaded and one that fits never is: every projection,
    /// expert and the lm_head at MXFP4's 4.25 bits (the most compact format a backend keeps, and
    /// a loader keeps it wherever a tensor is stored so, whatever `quant` says), the embedding at
    /// two bytes (BF16 or f32 on the device); norms, biases and routers left out. Tight where
    /// MXFP4 experts dominate (MiMo-V2-Flash: 164.9 GB); up to ~4x below a BF16 model's bytes.
    /// Saturating, as `num_parameters`.
    pub fn min_device_weight_bytes(&self) -> usize {
        let h = self.hidden_size as u128;
        let vocab = self.vocab_size as u128;
        let mut matrices = if self.tie_word_embeddings { 0 } else { vocab * h };
        for l in &self.layers {
            let a = &l.attention;
            matrices += h * (a.q_dim() + a.k_dim() + a.v_dim() + a.o_dim()) as u128;
            matrices += match l.mlp {
                MlpSpec::Dense { intermediate_size } => 3 * h * intermediate_size as u128,
                MlpSpec::Moe(m) => m.num_experts as u128 * 3 * h * m.intermediate_size as u128,
            };
        }
        // 16 code bytes and one scale byte per 32 parameters.
        usize::try_from(2 * vocab * h + matrices / 32 * 17).unwrap_or(usize::MAX)
    }
}
