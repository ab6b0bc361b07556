//! Sampling parameters of one request, after validation by the server.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// 1.0 disables.
    pub top_p: f32,
    /// 0 disables.
    pub top_k: usize,
    /// 0.0 disables.
    pub min_p: f32,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    /// 1.0 disables; applies to prompt and generated tokens (HF/vLLM semantics).
    pub repetition_penalty: f32,
    /// Added to the logits of these token ids before everything else.
    pub logit_bias: BTreeMap<u32, f32>,
    /// Same seed and same request give the same output: whatever else is in the batch on an
    /// exact backend (the CPU's); on one whose rows round apart by batch (the GPU's), when the
    /// request runs alone (`Backend::rows_compute_alike`).
    pub seed: Option<u64>,
    /// Return this many top log-probabilities per token (None: no logprobs).
    pub logprobs: Option<usize>,
    /// JSON mode: only tokens that keep the output a JSON object, which ends the output when it
    /// closes (the engine's `json_mode`; sampled on the host).
    #[serde(default)]
    pub json_object: bool,
    /// A grammar the whole output must match (`response_format` `json_schema`, vLLM's
    /// `guided_*` / `structured_outputs`; the engine's `guided`, sampled on the host).
    #[serde(default)]
    pub guide: Option<Guide>,
    /// Only these token ids may be sampled (vLLM's `allowed_token_ids`; sampled on the host).
    #[serde(default)]
    pub allowed_token_ids: Option<Vec<u32>>,
    /// vLLM's `bad_words`, as token sequences: a sequence's last token is banned (-inf) wherever
    /// the output so far ends with the tokens before it (one token: banned everywhere).
    #[serde(default)]
    pub bad_words: Vec<Vec<u32>>,
}

/// Structured output held to a grammar (JSON mode, `json_object`, is its own automaton).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Guide {
    /// A value of this JSON schema.
    JsonSchema(serde_json::Value),
    /// A whole match of this regular expression (Rust `regex` syntax).
    Regex(String),
    /// Exactly one of these strings.
    Choice(Vec<String>),
    /// A whole match of this grammar, in llguidance's Lark syntax (the server rewrites GBNF).
    Grammar(String),
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            repetition_penalty: 1.0,
            logit_bias: BTreeMap::new(),
            seed: None,
            logprobs: None,
            json_object: false,
            guide: None,
            allowed_token_ids: None,
            bad_words: Vec::new(),
        }
    }
}

impl SamplingParams {
    pub fn greedy() -> Self {
        SamplingParams { temperature: 0.0, ..Default::default() }
    }
    pub fn is_greedy(&self) -> bool {
        self.temperature <= 0.0
    }
}
