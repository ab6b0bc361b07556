//! The serving core: one engine thread runs continuous batching over a backend.
//!
//! Design notes:
//! - [`engine`]: `start_engine` sizes the KV pools (sliding-window group: `max_num_seqs *
//!   (window/block_size + 2)` plus the blocks of one full step's chunk; the rest of the memory
//!   goes to full attention) and spawns ONE thread. Each step is one `Backend::forward`:
//!   running sequences first (decodes before prefill chunks, oldest first), then waiting
//!   requests in (priority, arrival) order while KV blocks, `max_num_seqs` and the token budget
//!   allow. Long prompts are split into chunks across steps. When blocks run out the NEWEST
//!   running sequence is preempted: its blocks are freed and it goes back to the front of the
//!   queue; later it is recomputed from prompt + generated tokens, and since its detokeniser,
//!   held-back text and RNG stream live in the sequence, the client sees a seamless stream.
//!   A dropped receiver aborts the request at the next step (waiting, prefilling or decoding).
//! - [`kv`]: block bookkeeping. Prefix caching hashes full blocks as a chain; freed hashed
//!   blocks stay findable until reallocated (least recently freed first). Sliding-window
//!   blocks are ref-counted and hashed the same way (released ones stay cached too); a hit at
//!   position H is only taken when the full blocks before H AND the sliding-window blocks
//!   covering `H - (window - 1)..H` are still cached, else the hit shrinks (possibly to 0).
//!   At least one prompt token is always computed.
//! - [`sampler`]: host-side sampling; logprobs are the log-softmax of the RAW model logits
//!   (vLLM's default), sampling uses the processed ones. Every non-greedy sample draws exactly
//!   one number from the request's own RNG (seed, or a hash of request_id), so outputs do not
//!   depend on batch composition.
//!   Without a seed, the seed is a hash of `request_id` (so give each request a unique id).
//!   `Usage.cached_tokens` is the prefix-cache hit of the request's first admission.
//! - Stop strings: decoded text that could begin a stop string is held back; a match ends the
//!   request and is never sent. Stop token ids / EOS are sent as token ids, not as text.
//!   At least one token is always generated (`max_tokens == 0` behaves as 1: the server clamps).
//! - [`metrics`]: vLLM names (`vllm:*`, const label `model_name` = the spec's model_type) and
//!   `peregrine:*` extras (step duration, batch size, tokens per step); histograms start at
//!   100 µs. Read them with `EngineHandle::render_metrics()` or `registry()`.

pub mod api;
pub mod engine;
pub mod kv;
pub mod metrics;
pub mod sampler;

pub use api::*;
pub use engine::{start_engine, EngineHandle};
