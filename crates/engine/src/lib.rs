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
//!   A failed step fails its sequences; the engine then asks `Backend::check_health`, and when
//!   the backend can serve nothing more (a lost GPU context) every running and waiting request
//!   gets `RequestEvent::Error`, later submits get `SubmitError::BackendFailed`, and
//!   `EngineHandle::failure()` says why (the server's /health answers 503 with it).
//! - Overlapped decode steps (`EngineConfig::overlap_steps`, on by default): when the backend can
//!   start a decode step without waiting (`Backend::enqueue_decode`; the CUDA backend's captured
//!   steps), the engine starts step N + 1 before committing step N, its rows fed step N's sampled
//!   ids on the device, so committing, detokenising and streaming overlap the device's work.
//!   Only steady decoding chains (every running sequence in step N, none at a length limit, no
//!   logprobs or drafts, nobody waiting whom a free slot could admit, KV room
//!   without preemption); anything else commits first and plans as usual. A sequence that EOS or
//!   a stop string ends in step N wastes its row of N + 1, dropped at collection; freed KV blocks
//!   are safe to reuse because the device runs steps in order. Outputs are the same either way.
//!   Rows whose sampling reads the token ahead (penalties, a constrained sequence's mask) chain
//!   too where the backend can defer sampling (`Backend::enqueue_decode_deferred`): step N + 1
//!   starts, step N is committed, and only then are N + 1's rows' sampling and token masks built
//!   and its rows sampled (`sample_enqueued`).
//! - [`kv`]: block bookkeeping. Prefix caching hashes full blocks as a chain; freed hashed
//!   blocks stay findable until reallocated (least recently freed first). Sliding-window
//!   blocks are ref-counted and hashed the same way (released ones stay cached too); a hit at
//!   position H is only taken when the full blocks before H AND the sliding-window blocks
//!   covering `H - (window - 1)..H` are still cached, else the hit shrinks (possibly to 0).
//!   At least one prompt token is always computed.
//! - Speculative decoding (DFlash), when the backend has a drafter attached: each decoding
//!   sequence drafts `block - 1` tokens (`Backend::draft`, fewer near max_tokens or the context
//!   limit), and the step's one forward verifies `[last, drafts...]` (all rows' logits). Each
//!   row is then sampled exactly as plain decoding would sample that position (penalties over the
//!   tokens committed so far, the position's own random number); the draft is accepted when the
//!   sample equals it, and the first mismatch (or the row after the last draft) commits the
//!   sample itself. For one-hot drafts this IS rejection sampling (accept x with probability
//!   p(x); on rejection a draw from p without x, renormalised), and it makes seeded and greedy
//!   output identical with or without speculation. Stops, min/max tokens and logprobs run per
//!   committed token, so a stop inside an accepted block truncates there. Rejected positions are
//!   rolled back by not counting them as computed: their K/V (target and drafter context) lie
//!   past `computed` and are overwritten; prefix-cache blocks are registered only over computed
//!   positions. Sequences with different acceptance share one batch. A failed draft pass makes
//!   that step decode without drafts (counted in `peregrine:spec_decode_draft_failures_total`).
//!   [`spec_policy`] decides per step whether to draft at all (`EngineConfig::speculation`):
//!   adaptively, from measured step times and each sequence's tokens per round, or always. A
//!   step it decodes plainly may overlap like a step without a drafter.
//! - [`sampler`]: host-side sampling; logprobs are the log-softmax of the RAW model logits
//!   (vLLM's default), sampling uses the processed ones. Output token n is drawn with a uniform
//!   number that depends only on the request's seed (or a hash of request_id) and n, so outputs
//!   depend neither on batch composition nor on speculation.
//!   Without a seed, the seed is a hash of `request_id` (so give each request a unique id).
//!   `Usage.cached_tokens` is the prefix-cache hit of the request's first admission.
//! - Stop strings: decoded text that could begin a stop string is held back; a match ends the
//!   request and is never sent. Stop token ids / EOS are sent as token ids, not as text.
//!   At least one token is always generated (`max_tokens == 0` behaves as 1: the server clamps).
//! - [`metrics`]: vLLM names (`vllm:*`, const label `model_name` = `EngineConfig::model_name`, the
//!   served model name, else the spec's model_type) and
//!   `peregrine:*` extras (step duration, batch size, tokens per step); histograms start at
//!   100 µs. Read them with `EngineHandle::render_metrics()` or `registry()`.

pub mod api;
pub mod constraint;
pub mod engine;
pub mod gbnf;
pub mod guided;
pub mod json_mode;
pub mod kv;
pub mod kv_sizing;
pub mod metrics;
pub mod sampler;
pub mod spec_policy;

pub use api::*;
pub use engine::{start_engine, EngineHandle};
pub use spec_policy::SpeculationMode;
