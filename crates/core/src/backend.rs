//! The contract between the engine and a compute backend (CPU reference, CUDA).
//!
//! The engine owns scheduling and KV *bookkeeping* (which physical block holds which positions
//! of which sequence); the backend owns KV *memory* and the math. KV is paged in two groups with
//! one block size:
//! - the full-attention group: every position of a sequence has a slot; blocks are ref-counted
//!   and shared between sequences through prefix caching;
//! - the sliding-window group: same indexing, but the engine releases blocks that lie wholly
//!   outside every window (their table entries become [`NULL_BLOCK`]), so a running sequence
//!   holds about `window / block_size + 1` of them.
//!
//! Position `p` of a sequence lives in block `table[p / block_size]` at offset `p % block_size`,
//! in both groups. A layer's K/V layout inside a block is the backend's business.

use crate::{DraftSpec, Error, KvDtype, ModelSpec, Result};

/// Marks a block-table entry that holds no block (a sliding-window block released by the engine).
pub const NULL_BLOCK: u32 = u32::MAX;

/// Block counts decided by the engine from the memory budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvConfig {
    /// Tokens per block.
    pub block_size: usize,
    pub num_full_blocks: usize,
    pub num_swa_blocks: usize,
}

/// Bytes of one block in each group, summed over the layers of that group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvBlockBytes {
    pub full: usize,
    pub swa: usize,
}

/// A device's memory in bytes (`Backend::device_memory`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceMemory {
    pub free: usize,
    pub total: usize,
}

/// Which positions of a chunk need logits back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputRows {
    /// None (a prefill chunk that is not the last one).
    None,
    /// The last position only (decode, last prefill chunk).
    Last,
    /// Every position of the chunk (prompt logprobs; speculative verification).
    All,
}

/// One sequence's part of a forward step: `tokens` at positions `start_pos..start_pos+len`.
/// Everything before `start_pos` is already in the KV cache (or, for sliding-window layers, at
/// least the last `window - 1` positions before it).
#[derive(Debug, Clone)]
pub struct SeqForward {
    pub seq_id: u64,
    pub tokens: Vec<u32>,
    pub start_pos: usize,
    /// Full-attention block table, covering at least positions `0..start_pos + tokens.len()`.
    pub full_blocks: Vec<u32>,
    /// Sliding-window block table with the same indexing; entries wholly outside the window of
    /// every position in this chunk may be [`NULL_BLOCK`].
    pub swa_blocks: Vec<u32>,
    pub output: OutputRows,
}

/// The flattened rows (sequence after sequence, token after token) whose logits a batch asks
/// for, and how many of them belong to each sequence.
pub fn output_rows(batch: &[SeqForward]) -> (Vec<usize>, Vec<usize>) {
    let mut want = Vec::new();
    let mut counts = Vec::with_capacity(batch.len());
    let mut r0 = 0;
    for s in batch {
        let len = s.tokens.len();
        let before = want.len();
        match s.output {
            OutputRows::None => {}
            OutputRows::Last if len > 0 => want.push(r0 + len - 1),
            OutputRows::Last => {}
            OutputRows::All => want.extend(r0..r0 + len),
        }
        counts.push(want.len() - before);
        r0 += len;
    }
    (want, counts)
}

/// Splits `rows x vocab` logits, in `output_rows` order, into one `Logits` per sequence.
pub fn split_logits(data: &[f32], counts: &[usize], vocab: usize) -> Vec<Logits> {
    let mut off = 0;
    counts
        .iter()
        .map(|&c| {
            let l = Logits { rows: c, data: data[off * vocab..(off + c) * vocab].to_vec() };
            off += c;
            l
        })
        .collect()
}

/// Logits returned for one sequence: `rows` rows of `vocab_size` f32 each, in position order.
#[derive(Debug, Clone, Default)]
pub struct Logits {
    pub rows: usize,
    pub data: Vec<f32>,
}

impl Logits {
    pub fn row(&self, i: usize) -> &[f32] {
        let v = self.data.len() / self.rows.max(1);
        &self.data[i * v..(i + 1) * v]
    }
    pub fn last(&self) -> Option<&[f32]> {
        (self.rows > 0).then(|| self.row(self.rows - 1))
    }
}

/// One sequence's draft request: the block `[last_token, MASK x num_drafts]` at positions
/// `start_pos..=start_pos + num_drafts`. The drafter's context is every position before
/// `start_pos`, whose context K/V the backend wrote during the target forwards that computed
/// them (so it lives in the full-attention blocks and follows prefix caching and rollback
/// exactly like the target's own K/V).
#[derive(Debug, Clone)]
pub struct DraftForward {
    pub seq_id: u64,
    pub last_token: u32,
    pub start_pos: usize,
    /// Drafts wanted, `1..block_size`.
    pub num_drafts: usize,
    /// Full-attention block table covering at least `0..start_pos`.
    pub full_blocks: Vec<u32>,
}

/// A compute backend. The engine calls it from one thread.
pub trait Backend: Send {
    fn spec(&self) -> &ModelSpec;

    /// Bytes one KV block of `block_size` tokens takes in each group, at the current
    /// [`Backend::kv_dtype`].
    fn kv_block_bytes(&self, block_size: usize) -> KvBlockBytes;

    /// The element type the next `init_kv` gives the K/V pools. The default: f32 only.
    fn kv_dtype(&self) -> KvDtype {
        KvDtype::F32
    }

    /// Chooses the K/V pools' element type for the next `init_kv` (and `kv_block_bytes` from
    /// now on). The default accepts f32 only and names the type it cannot hold.
    fn set_kv_dtype(&mut self, dtype: KvDtype) -> Result<()> {
        match dtype {
            KvDtype::F32 => Ok(()),
            other => Err(Error::Unsupported(format!("the {} backend keeps its KV cache in float32 only, not {other}", self.name()))),
        }
    }

    /// Allocate (or re-allocate, dropping contents) the KV pools.
    fn init_kv(&mut self, config: KvConfig) -> Result<()>;

    /// Run one forward step over a batch of sequences: write their new K/V into the given
    /// blocks and return, per sequence and in batch order, the logits asked for by `output`.
    fn forward(&mut self, batch: &[SeqForward]) -> Result<Vec<Logits>>;

    /// Like `forward`, but returns only the argmax token id of every row `forward` would return
    /// logits for (ties to the lowest id), per sequence in batch order, so a backend that keeps
    /// logits on its device brings back ids alone. The engine calls it when every sequence in
    /// the batch decodes greedily with nothing else reading the logits (no penalties, bias or
    /// logprobs). `Ok(None)`: no such path; the engine then calls `forward`.
    fn forward_greedy(&mut self, batch: &[SeqForward]) -> Result<Option<Vec<Vec<u32>>>> {
        let _ = batch;
        Ok(None)
    }

    /// Like `forward`, but samples every row `forward` would return logits for on the backend
    /// and returns only the token ids, per sequence in batch order. `rows` holds one entry per
    /// such row, in `output_rows` order, each naming its slice of `adjust` (bias and penalties,
    /// applied before sampling). The engine calls it when nothing but the sampled token is read
    /// from the logits (no logprobs). `Ok(None)`: no such path.
    fn forward_sampled(&mut self, batch: &[SeqForward], rows: &[RowSampling], adjust: &[LogitAdjust]) -> Result<Option<Vec<Vec<u32>>>> {
        let _ = (batch, rows, adjust);
        Ok(None)
    }

    /// A whole speculative step on the backend, with one round trip: for every sequence of
    /// `batch` (a verify block `[last token, placeholder x num_drafts]` at `start_pos..`, output
    /// `All`), draft with the attached drafter, put the drafts in place of the placeholders, run
    /// the target over the block, sample every row as `sampling` says, and accept the longest
    /// prefix of drafts equal to the samples ([`accepted_prefix`]). `Sampled` rows follow
    /// `forward_sampled`; their adjustments must not depend on the drafts (no penalties), since
    /// the caller does not know the drafts when it builds them. `Ok(None)`: no such path for
    /// this batch; the engine then drafts and verifies in two calls.
    fn forward_speculative(&mut self, batch: &[SeqForward], sampling: SpecSampling) -> Result<Option<Vec<SpecRows>>> {
        let _ = (batch, sampling);
        Ok(None)
    }

    /// `forward_sampled`, also returning, for every row whose `top` entry is Some(n) (n at most
    /// [`MAX_BACKEND_TOP_LOGPROBS`]), log-probabilities under the row's raw logits (before
    /// adjustments and sampling transforms, as the engine's host `logprobs` computes them): the
    /// sampled token's and the n most likely tokens'. `Ok(None)`: no such path.
    fn forward_sampled_logprobs(&mut self, batch: &[SeqForward], rows: &[RowSampling], adjust: &[LogitAdjust], top: &[Option<u32>]) -> Result<Option<SampledRows>> {
        let _ = (batch, rows, adjust, top);
        Ok(None)
    }

    /// `forward_sampled` for the sequences whose `keep` entry is false; the others' rows come
    /// back as raw logits instead (sequences the engine samples itself, under a constraint), so
    /// one constrained sequence does not bring every row's logits to the host. `rows` covers
    /// every asked-for row (a kept sequence's entries are not drawn from). `Ok(None)`: no such
    /// path; the engine then reads every row's logits.
    fn forward_sampled_keeping(&mut self, batch: &[SeqForward], rows: &[RowSampling], adjust: &[LogitAdjust], keep: &[bool]) -> Result<Option<Vec<KeptRows>>> {
        let _ = (batch, rows, adjust, keep);
        Ok(None)
    }

    /// `forward_sampled` where rows may be held to a set of allowed tokens (a constrained
    /// sequence: JSON mode, a guide, `allowed_token_ids`), so its ids come back without its
    /// logits. `masks` is called once, after the forward is started and before any row is
    /// sampled, so the host builds the masks while the device computes: for each row in
    /// `output_rows` order, None (any token) or a [`TokenMask`] of the vocabulary, applied after
    /// the row's adjustments (a refused token's logit becomes -inf). `Ok(None)`: no such path;
    /// the engine then reads the constrained rows' logits.
    fn forward_sampled_masked(&mut self, batch: &[SeqForward], rows: &[RowSampling], adjust: &[LogitAdjust], masks: MaskSource) -> Result<Option<Vec<Vec<u32>>>> {
        let _ = (batch, rows, adjust, masks);
        Ok(None)
    }

    /// Overlapped decoding: starts a decode step without waiting for it, so the caller can
    /// commit the step before while this one runs. Every sequence of `batch` feeds one token and
    /// asks for its `Last` row. `chain[i]` = Some(r): row i's input is not `batch[i].tokens[0]`
    /// (a placeholder) but the id that the step enqueued last (still in flight, or collected)
    /// sampled for its row r, which the caller does not know yet. `sampling`: None takes each
    /// row's argmax (`forward_greedy`), Some samples as `forward_sampled` (adjustments that do not
    /// depend on the chained tokens). `Ok(false)`: nothing was started (no such path for this
    /// batch, or `chain` names no step this backend can still read); the caller then runs the
    /// step the usual way, after collecting every step it started. The default: never.
    fn enqueue_decode(&mut self, batch: &[SeqForward], chain: &[Option<usize>], sampling: Option<(&[RowSampling], &[LogitAdjust])>) -> Result<bool> {
        let _ = (batch, chain, sampling);
        Ok(false)
    }

    /// `enqueue_decode` for a step whose sampling depends on the ids of the step before it,
    /// which the caller does not know yet: a constrained sequence's mask, penalties over the
    /// output so far. The forward starts now (every row's `Last` row kept on the device); the
    /// rows are sampled only when `sample_enqueued` gives their sampling, adjustments and masks.
    /// Until then the caller may collect the steps before it and nothing else. `Ok(false)`:
    /// nothing was started. The default: never.
    fn enqueue_decode_deferred(&mut self, batch: &[SeqForward], chain: &[Option<usize>]) -> Result<bool> {
        let _ = (batch, chain);
        Ok(false)
    }

    /// Samples the step `enqueue_decode_deferred` started: one `RowSampling` and one mask entry
    /// per row, as `forward_sampled_masked` takes them. `collect_decode` then brings its ids, and
    /// a later step may chain on them. On an error the step is dropped: nothing of it is left to
    /// collect.
    fn sample_enqueued(&mut self, rows: &[RowSampling], adjust: &[LogitAdjust], masks: Vec<Option<TokenMask>>) -> Result<()> {
        let _ = (rows, adjust, masks);
        Err(crate::Error::Backend("no deferred decode step waits for its sampling".into()))
    }

    /// The ids of the oldest step `enqueue_decode` started and nobody collected yet, one per
    /// row in its batch order, waiting for that step to finish.
    fn collect_decode(&mut self) -> Result<Vec<u32>> {
        Err(crate::Error::Backend("no decode step is in flight".into()))
    }

    /// A short name for logs and metrics ("cpu", "cuda").
    fn name(&self) -> &str;

    /// Whether the backend can still serve, asked by the engine after a failed step. `Ok`: the
    /// failure was the step's own (for example an allocation that did not fit) and later steps
    /// may succeed; the engine fails only that step's sequences. `Err`: the backend can serve
    /// nothing more (for example a lost GPU context) and the message says why; the engine then
    /// fails every request and refuses new ones. The default: always healthy.
    fn check_health(&mut self) -> Result<()> {
        Ok(())
    }

    /// The device's free and total memory in bytes, for a KV cache sized to a fraction of the
    /// device (`gpu_memory_utilization`); None for a backend in host memory (the default), whose
    /// KV cache is sized in bytes.
    fn device_memory(&mut self) -> Result<Option<DeviceMemory>> {
        Ok(None)
    }

    /// While `on`, memory the backend frees stays reserved by it, so `device_memory` after a
    /// profiling step shows what the step needed at its peak; turned off, it is given back.
    fn hold_freed_memory(&mut self, on: bool) -> Result<()> {
        let _ = on;
        Ok(())
    }

    /// Whether a position's logits come out bit for bit alike whichever kind of step computes
    /// it: in a verify block beside drafts, or decoded alone. True for an exact backend (the
    /// CPU's rows compute alike at any count); a backend whose multi-row kernels round apart in
    /// the last bits says false, and the adaptive speculation policy (whose mix of steps follows
    /// their timing) then keeps seeded sampling requests from drafting, so their text repeats.
    fn rows_compute_alike(&self) -> bool {
        true
    }

    /// The attached DFlash drafter, if any. While one is attached, every `forward` also writes
    /// the drafter's context K/V for each position it computes (counted in `kv_block_bytes`).
    fn draft_spec(&self) -> Option<&DraftSpec> {
        None
    }

    /// Greedy drafts for each sequence, in batch order (`num_drafts` tokens each).
    fn draft(&mut self, batch: &[DraftForward]) -> Result<Vec<Vec<u32>>> {
        let _ = batch;
        Err(Error::Unsupported(format!("the {} backend has no drafter attached", self.name())))
    }
}

/// The most top log-probabilities `forward_sampled_logprobs` lists per row (the API's maximum).
pub const MAX_BACKEND_TOP_LOGPROBS: usize = 20;

/// Per sequence, each sampled row's token and, when asked, its logprobs.
pub type SampledRows = Vec<Vec<(u32, Option<RowLogprobs>)>>;

/// The tokens a row may sample: bit `i % 32` of word `i / 32` is set where token `i` may be
/// sampled; `vocab_size.div_ceil(32)` words.
pub type TokenMask = Vec<u32>;

/// `forward_sampled_masked`'s masks, one entry per sampled row, built when the backend asks.
pub type MaskSource<'a> = &'a dyn Fn() -> Vec<Option<TokenMask>>;

/// Words of a [`TokenMask`] over `vocab` tokens.
pub fn token_mask_words(vocab: usize) -> usize {
    vocab.div_ceil(32)
}

/// Whether `mask` lets token `id` be sampled (ids past the mask are refused).
pub fn token_mask_allows(mask: &[u32], id: u32) -> bool {
    mask.get(id as usize / 32).is_some_and(|w| w >> (id % 32) & 1 == 1)
}

/// One sequence's rows from [`Backend::forward_sampled_keeping`]: sampled ids, or (kept) logits.
#[derive(Debug, Clone)]
pub enum KeptRows {
    Ids(Vec<u32>),
    Logits(Logits),
}

/// Log-probabilities of one row under its raw logits: the sampled token's, and the most likely
/// tokens', descending, ties to the lower id. Non-finite logits are never listed.
#[derive(Debug, Clone, PartialEq)]
pub struct RowLogprobs {
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

/// How `forward_speculative` samples the verify rows.
#[derive(Debug, Clone, Copy)]
pub enum SpecSampling<'a> {
    /// The argmax of every row (ties to the lowest id).
    Greedy,
    /// As `forward_sampled`: one `RowSampling` per row, in batch order, naming slices of `adjust`.
    Sampled { rows: &'a [RowSampling], adjust: &'a [LogitAdjust] },
}

/// One sequence's result of `forward_speculative`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecRows {
    /// The drafts that were verified (`num_drafts`).
    pub drafts: Vec<u32>,
    /// The target's sample at every row of the block (`num_drafts + 1`).
    pub ids: Vec<u32>,
    /// How many leading drafts equal the samples: the sequence commits `ids[..=accepted]`.
    pub accepted: usize,
}

/// The acceptance rule with sampled verification: the number of leading drafts equal to the
/// target's samples at their positions. Sampling each row exactly as plain decoding would and
/// accepting draft x when the sample is x accepts it with probability p(x); the first mismatch is
/// a sample from p without x, renormalised (rejection sampling for one-hot proposals).
pub fn accepted_prefix(drafts: &[u32], samples: &[u32]) -> usize {
    drafts.iter().zip(samples).take_while(|(d, s)| d == s).count()
}

/// `forward_speculative` composed of the two calls a backend without a fused path makes:
/// `draft`, then `forward_greedy` / `forward_sampled` on the blocks with their drafts in place,
/// then the acceptance on the host. `Ok(None)` when `backend` has no ids path.
pub fn speculate_in_two_calls(backend: &mut dyn Backend, batch: &[SeqForward], sampling: SpecSampling) -> Result<Option<Vec<SpecRows>>> {
    let reqs: Vec<DraftForward> = batch
        .iter()
        .map(|s| DraftForward {
            seq_id: s.seq_id,
            last_token: s.tokens.first().copied().unwrap_or(0),
            start_pos: s.start_pos,
            num_drafts: s.tokens.len().saturating_sub(1),
            full_blocks: s.full_blocks.clone(),
        })
        .collect();
    let drafts = backend.draft(&reqs)?;
    if drafts.len() != batch.len() {
        return Err(Error::Backend(format!("the drafter returned {} draft lists for {} sequences", drafts.len(), batch.len())));
    }
    let mut filled = batch.to_vec();
    for (s, d) in filled.iter_mut().zip(&drafts) {
        if d.len() + 1 != s.tokens.len() {
            return Err(Error::Backend(format!("sequence {}: {} drafts for {} placeholders", s.seq_id, d.len(), s.tokens.len() - 1)));
        }
        s.tokens[1..].copy_from_slice(d);
    }
    let ids = match sampling {
        SpecSampling::Greedy => backend.forward_greedy(&filled)?,
        SpecSampling::Sampled { rows, adjust } => backend.forward_sampled(&filled, rows, adjust)?,
    };
    Ok(ids.map(|ids| {
        drafts
            .into_iter()
            .zip(ids)
            .map(|(drafts, ids)| SpecRows { accepted: accepted_prefix(&drafts, &ids), drafts, ids })
            .collect()
    }))
}

/// How to sample one row on the backend: temperature (<= 0: greedy), top-k (0: off), top-p,
/// min-p, as the engine's host sampler applies them, and the row's uniform number in [0, 1)
/// (the engine's per-output-position draw, which keeps speculative verification coupled with
/// plain decoding).
#[derive(Debug, Clone, Copy, PartialEq)]
#[repr(C)]
pub struct RowSampling {
    pub temperature: f32,
    pub top_k: i32,
    pub top_p: f32,
    pub min_p: f32,
    pub u: f64,
    /// This row's logit adjustments: `adjust[adj_start..adj_start + adj_len]`.
    pub adj_start: u32,
    pub adj_len: u32,
}

/// One token's logit adjustment before sampling, as the engine's `apply_penalties` computes it:
/// `l += bias`; then, when `repetition` != 1, `l = l > 0 ? l / repetition : l * repetition`;
/// then `l -= subtract` (presence + frequency x count). Token ids past the vocabulary are ignored.
#[derive(Debug, Clone, Copy, PartialEq)]
#[repr(C)]
pub struct LogitAdjust {
    pub token: u32,
    pub bias: f32,
    pub repetition: f32,
    pub subtract: f32,
}

/// The argmax of every row of `logits` (ties to the lowest id; NaN never wins): what a backend
/// whose logits are on the host returns from `forward_greedy`.
pub fn argmax_rows(logits: &[Logits]) -> Vec<Vec<u32>> {
    logits
        .iter()
        .map(|l| {
            (0..l.rows)
                .map(|r| {
                    let row = l.row(r);
                    let mut best = 0;
                    for (i, &v) in row.iter().enumerate() {
                        if v > row[best] {
                            best = i;
                        }
                    }
                    best as u32
                })
                .collect()
        })
        .collect()
}
