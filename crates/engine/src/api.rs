//! The engine's public contract with the server: what a request is, what comes back, and the
//! handle through which requests are submitted. The server never sees the scheduler or backend.

use std::sync::Arc;
use std::time::Instant;

use peregrine_core::{KvDtype, SamplingParams};
use crate::spec_policy::SpeculationMode;

/// One generation request: one sequence (the server submits `n` of them for `n > 1`).
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    /// Unique id, used in logs and to derive per-request seeds when none is given.
    pub request_id: String,
    pub prompt_tokens: Vec<u32>,
    pub sampling: SamplingParams,
    pub stop: StopParams,
    /// Log-probabilities of the prompt tokens (`echo` + `logprobs`, vLLM's `prompt_logprobs`):
    /// this many top entries each. Such a request computes its whole prompt (no prefix-cache hit).
    pub prompt_logprobs: Option<usize>,
    /// Lower runs first; ties go to the earlier arrival (FCFS).
    pub priority: i32,
    pub arrival: Instant,
    /// vLLM's `cache_salt`: the prompt's prefix-cache entries are keyed by it too, so only
    /// requests with the same salt share them (a tenant cannot time another's prompts).
    pub cache_salt: Option<String>,
}

#[derive(Debug, Clone, Default)]
pub struct StopParams {
    /// Generation ends when the output text contains one of these; the match is not emitted
    /// unless `include_stop_str`.
    pub stop_strings: Vec<String>,
    /// The stop string that ended the output is emitted too (vLLM's `include_stop_str_in_output`).
    pub include_stop_str: bool,
    /// Generation ends on these ids (emitted as tokens, their text not emitted).
    pub stop_token_ids: Vec<u32>,
    /// Do not stop on the model's EOS ids.
    pub ignore_eos: bool,
    /// No stop condition (EOS, stop ids, stop strings) applies before this many tokens.
    pub min_tokens: usize,
    /// Hard cap on generated tokens; already clamped by the server to the context limit.
    pub max_tokens: usize,
    /// Skip special tokens when detokenising (default true).
    pub skip_special_tokens: bool,
}

/// Log-probability of one chosen token and the `top` alternatives (most likely first).
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub token_id: u32,
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

/// One prompt token's log-probability and its rank in the vocabulary: 1 + how many other tokens
/// the model found at least as likely (vLLM's `prompt_logprobs` report it; 1 = the likeliest).
#[derive(Debug, Clone, PartialEq)]
pub struct PromptLogprob {
    pub token: TokenLogprob,
    pub rank: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// EOS, a stop token id or a stop string.
    Stop,
    /// max_tokens or the context limit.
    Length,
    /// The client went away or the server is shutting down.
    Abort,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Abort => "abort",
        }
    }
}

/// What ended an output that stopped (vLLM's `stop_reason`): a stop token id or a stop string.
/// EOS, a finished guide and the length limit have none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopReason {
    Token(u32),
    Text(String),
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// Prompt tokens served from the prefix cache.
    pub cached_tokens: usize,
    /// Speculative decoding: drafted tokens that were accepted (and are part of the output)...
    pub accepted_prediction_tokens: usize,
    /// ... and drafted tokens that were not.
    pub rejected_prediction_tokens: usize,
}

/// What the engine sends back for one request, in order.
#[derive(Debug, Clone)]
pub enum RequestEvent {
    /// Sent first when `prompt_logprobs` was asked: one entry per prompt token (None for the
    /// first, which has no context).
    PromptLogprobs(Vec<Option<PromptLogprob>>),
    /// Newly committed output. `text` is the new text (never splits a UTF-8 character, never
    /// contains a stop string); `token_ids` and `logprobs` the tokens committed this step.
    Delta { text: String, token_ids: Vec<u32>, logprobs: Vec<TokenLogprob> },
    /// The last event of a successful request; `stop_reason` says which stop id or string
    /// ended it, where one did.
    Finished { reason: FinishReason, usage: Usage, stop_reason: Option<StopReason> },
    /// The request failed; no further events follow.
    Error(String),
}

/// Why a request was not accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SubmitError {
    /// The waiting queue is full: answer 429 and retry later.
    QueueFull,
    /// The request cannot be served (for example longer than the context).
    Invalid(String),
    /// Its output constraint cannot be built (a JSON schema, regex or grammar the guide
    /// compiler refuses, or one combined with what it cannot be): the message says why.
    Constraint(String),
    /// The engine is shutting down or has stopped.
    ShuttingDown,
    /// The backend can serve nothing more (for example a lost GPU context); the message says
    /// why. Every later submit gets this too: the server must be restarted.
    BackendFailed(String),
}

/// Sizing and policy of the engine.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Running sequences at most.
    pub max_num_seqs: usize,
    /// Tokens processed per step at most (prefill chunks + decode tokens).
    pub max_num_batched_tokens: usize,
    /// Prompt + output tokens of one sequence at most.
    pub max_model_len: usize,
    /// Bytes for KV blocks (both groups), unless `gpu_memory_utilization` is set.
    pub kv_cache_memory_bytes: usize,
    /// Size the KV cache to what is left of this fraction of the device's memory once the
    /// weights are loaded and a profiling step of the largest batches has run (crate::kv_sizing);
    /// needs a backend on a device (`Backend::device_memory`). None: `kv_cache_memory_bytes`.
    pub gpu_memory_utilization: Option<f64>,
    /// Tokens per KV block.
    pub block_size: usize,
    /// Waiting requests at most before `QueueFull`.
    pub max_waiting: usize,
    pub enable_prefix_caching: bool,
    /// Speculative block size (the last token plus `n - 1` drafts) when the backend has a
    /// drafter; None takes the drafter's own. Ignored without a drafter.
    pub speculative_block_size: Option<usize>,
    /// The `model_name` label of the metrics (the served model name); None: the model type.
    pub model_name: Option<String>,
    /// Start each decode step before committing the one ahead of it, where the backend can
    /// (`Backend::enqueue_decode`) and nothing the next step needs depends on that commit, so
    /// the host's work runs while the device computes. Outputs are the same either way.
    pub overlap_steps: bool,
    /// When a drafter speculates: while it measures faster than plain decoding (`Adaptive`),
    /// or on every eligible step (`Always`). Outputs are the same either way.
    pub speculation: SpeculationMode,
    /// The KV cache's element type; None: the backend's own choice (`Backend::kv_dtype`).
    pub kv_cache_dtype: Option<KvDtype>,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            max_num_seqs: 64,
            max_num_batched_tokens: 2048,
            max_model_len: 4096,
            kv_cache_memory_bytes: 512 << 20,
            gpu_memory_utilization: None,
            block_size: 16,
            max_waiting: 1024,
            enable_prefix_caching: true,
            speculative_block_size: None,
            model_name: None,
            overlap_steps: true,
            speculation: SpeculationMode::Adaptive,
            kv_cache_dtype: None,
        }
    }
}

/// A snapshot of the engine's state (also exported as Prometheus gauges).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct EngineStats {
    pub running: usize,
    pub waiting: usize,
    /// Fraction of KV blocks in use, 0..=1.
    pub kv_usage: f64,
    pub total_full_blocks: usize,
    pub free_full_blocks: usize,
}

/// The receiving end of one request. Dropping it aborts the request at the next engine step
/// and frees its KV blocks.
pub type RequestStream = tokio::sync::mpsc::UnboundedReceiver<RequestEvent>;

pub type SharedTokenizer = Arc<peregrine_model::tokenizer::Tokenizer>;
