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
//!   blocks stay findable until reallocated (least recently freed first). Prefix REUSE is
//!   disabled for models with sliding-window layers (a hit would also need the SWA blocks of
//!   the window before the hit point, which are released as a sequence advances).
//!   At least one prompt token is always computed.
//! - [`sampler`]: host-side sampling; logprobs are the log-softmax of the RAW model logits
//!   (vLLM's default), sampling uses the processed ones. Every non-greedy sample draws exactly
//!   one number from the request's own RNG (seed, or a hash of request_id), so outputs do not
//!   depend on batch composition.
//! - Stop strings: decoded text that could begin a stop string is held back; a match ends the
//!   request and is never sent. Stop token ids / EOS are sent as token ids, not as text.
//! - [`metrics`]: vLLM names (`vllm:*`, const label `model_name`) and `peregrine:*` extras.

pub mod api;
pub mod engine;
pub mod kv;
pub mod metrics;
pub mod sampler;

pub use api::*;
pub use engine::{start_engine, EngineHandle};
