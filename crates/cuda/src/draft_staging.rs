//! The drafter's context deferred off decode steps (`PEREGRINE_DRAFT_CONTEXT_DEFERRED`).
//!
//! Every target forward of a model with a DFlash drafter used to write the drafter's context
//! K/V of each row: the fc over the captured features, its norm, and each draft layer's K/V
//! projections with their norms and RoPE. At one decode row those are GEMVs that read the
//! drafter's fc and K/V weights whole for one token, ~10% of the demo model's plain step, ~6%
//! of a Flash-shaped one; the adaptive default pays it on every plain step, drafting or not.
//!
//! Now a decode step's captures copy each row's features straight into a ring of one KV block
//! per sequence (`copy_cols` at the row's ring row), and the ring becomes context K/V in one
//! pass over its rows (`ring_gather`, then the same `write_draft_context`, its GEMVs reading
//! the weights once for up to a block of rows):
//! - when the row fills its block (so a full block, which prefix caching may share, always
//!   holds its context, in the same call that completed it);
//! - before a draft pass or a speculative round of the sequence reads its context;
//! - before any step that writes the sequence's context directly (prompt chunks, verify rows,
//!   batches past `STAGE_SEQS` sequences).
//!
//! Rows waiting in a ring are flushed only where the sequence's block table still holds the
//! block they belong to, so a sequence preempted and resumed elsewhere, or dropped, never writes
//! into a block another sequence owns now. A ring of a sequence not seen for a while is reused
//! (least recently used first) when every ring is taken; its rows are then dropped, which
//! costs only acceptance: the drafter's context changes drafts, never outputs.

use std::collections::HashMap;

use cudarc::driver::{CudaSlice, DevicePtrMut, LaunchConfig};
use peregrine_core::backend::{DraftForward, SeqForward, NULL_BLOCK};
use peregrine_core::Result;

use crate::backend::{drv, CudaModel, HostRows};

/// Sequences with a ring: the largest decode graph's rows (`graph::ROW_BUCKETS`), so every
/// decode graph step stages all its rows.
pub(crate) const STAGE_SEQS: usize = 64;

/// One sequence's ring: the rows of positions `next..end`, all in block `block` (its
/// full-attention block), wait at ring rows `slot * block_size + position % block_size`.
#[derive(Debug, Clone, Copy)]
struct Ring {
    slot: usize,
    next: usize,
    end: usize,
    block: u32,
    used: u64,
}

/// Consecutive rows of one ring to turn into context K/V: `count` rows from ring row `ring0`,
/// position `pos0` and pool slot `slot0` on (a ring's waiting rows are one run: one block).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Run {
    pub(crate) ring0: i32,
    pub(crate) pos0: i32,
    pub(crate) slot0: i64,
    pub(crate) count: i32,
}

/// Rows to turn into context K/V, run by run.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Flush {
    pub(crate) runs: Vec<Run>,
}

impl Flush {
    pub(crate) fn is_empty(&self) -> bool {
        self.runs.is_empty()
    }

    pub(crate) fn rows(&self) -> usize {
        self.runs.iter().map(|r| r.count as usize).sum()
    }

    /// The runs as `ring_gather` launches take them, `RING_RUNS` a launch.
    pub(crate) fn launches(&self) -> Vec<RingRuns> {
        self.runs
            .chunks(RING_RUNS)
            .map(|c| {
                let mut l = RingRuns { n: c.len() as i32, ..RingRuns::default() };
                for (j, r) in c.iter().enumerate() {
                    (l.ring0[j], l.pos0[j], l.slot0[j], l.count[j]) = (r.ring0, r.pos0, r.slot0, r.count);
                }
                l
            })
            .collect()
    }
}

/// Runs a `ring_gather` launch takes (`RING_RUNS` in kernels/ops.cu).
pub(crate) const RING_RUNS: usize = 64;

/// `ring_gather`'s runs, by value (the C layout of `RingRuns` in kernels/ops.cu).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub(crate) struct RingRuns {
    n: i32,
    ring0: [i32; RING_RUNS],
    pos0: [i32; RING_RUNS],
    count: [i32; RING_RUNS],
    slot0: [i64; RING_RUNS],
}

impl Default for RingRuns {
    fn default() -> RingRuns {
        RingRuns { n: 0, ring0: [0; RING_RUNS], pos0: [0; RING_RUNS], count: [0; RING_RUNS], slot0: [0; RING_RUNS] }
    }
}

impl RingRuns {
    fn rows(&self) -> usize {
        self.count[..self.n as usize].iter().map(|&c| c as usize).sum()
    }
}

/// What a step does with the drafter's context: before it, rows to flush (sequences whose rows
/// are not where this step continues); per step row, its ring row (or None: the step writes
/// the context directly); after it, the rows of blocks it filled.
#[derive(Debug, Default)]
pub(crate) struct StepStaging {
    pub(crate) before: Flush,
    pub(crate) stage: Option<Vec<i32>>,
    pub(crate) after: Flush,
}

/// The rings' bookkeeping on the host (the rows themselves live on the GPU in
/// `(STAGE_SEQS + 1) * block_size` rows of features; the last block's rows are the scratch of
/// graph padding rows).
#[derive(Debug)]
pub(crate) struct StageTable {
    block_size: usize,
    rings: HashMap<u64, Ring>,
    free: Vec<usize>,
    tick: u64,
    /// Rows staged so far (tests).
    staged: usize,
}

impl StageTable {
    pub(crate) fn new(block_size: usize) -> StageTable {
        StageTable { block_size, rings: HashMap::new(), free: (0..STAGE_SEQS).rev().collect(), tick: 0, staged: 0 }
    }

    /// Ring rows on the GPU, scratch included.
    pub(crate) fn gpu_rows(block_size: usize) -> usize {
        (STAGE_SEQS + 1) * block_size
    }

    /// The ring row every graph padding row writes.
    pub(crate) fn scratch_row(&self) -> i32 {
        (STAGE_SEQS * self.block_size) as i32
    }

    /// The step of sequences `seqs` (id, first position, full-attention block table): `decode`
    /// (one new position each) stages them where the sequences fit the rings;
    /// otherwise they are written directly, and whatever waits for them is flushed first.
    pub(crate) fn plan(&mut self, seqs: &[(u64, usize, &[u32])], decode: bool) -> StepStaging {
        self.tick += 1;
        let mut out = StepStaging::default();
        if !decode || seqs.len() > STAGE_SEQS {
            for &(id, _, table) in seqs {
                self.settle(id, table, &mut out.before);
            }
            return out;
        }
        let mut stage = Vec::with_capacity(seqs.len());
        for &(id, p, table) in seqs {
            stage.push(self.stage(id, p, table, &mut out.before, &mut out.after));
        }
        out.stage = Some(stage);
        out
    }

    /// Before a draft pass (or anything else that reads the context of `id`'s positions so
    /// far): its waiting rows, into `flush`.
    pub(crate) fn settle(&mut self, id: u64, table: &[u32], flush: &mut Flush) {
        if let Some(r) = self.rings.get_mut(&id) {
            Self::take(r, self.block_size, table, flush);
        }
    }

    /// Rows of a failed step's sequences are dropped (their ring rows may not have been written).
    pub(crate) fn forget(&mut self, ids: impl IntoIterator<Item = u64>) {
        for id in ids {
            if let Some(r) = self.rings.remove(&id) {
                self.free.push(r.slot);
            }
        }
    }

    /// Sequences holding a ring.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.rings.len()
    }

    /// Ring `r`'s waiting rows into `flush` where `table` still holds their block; then none wait.
    fn take(r: &mut Ring, bs: usize, table: &[u32], flush: &mut Flush) {
        if r.end > r.next && table.get(r.next / bs) == Some(&r.block) && r.block != NULL_BLOCK {
            let q = r.next;
            flush.runs.push(Run { ring0: (r.slot * bs + q % bs) as i32, pos0: q as i32, slot0: r.block as i64 * bs as i64 + (q % bs) as i64, count: (r.end - q) as i32 });
        }
        r.next = r.end;
    }

    /// Position `p` of sequence `id` staged: its ring row.
    fn stage(&mut self, id: u64, p: usize, table: &[u32], before: &mut Flush, after: &mut Flush) -> i32 {
        let bs = self.block_size;
        let block = table.get(p / bs).copied().unwrap_or(NULL_BLOCK);
        if !self.rings.contains_key(&id) {
            let slot = self.free_slot();
            self.rings.insert(id, Ring { slot, next: p, end: p, block, used: 0 });
        }
        let tick = self.tick;
        let r = self.rings.get_mut(&id).expect("inserted above");
        r.used = tick;
        let waiting = r.end > r.next;
        if waiting && r.block == block && p / bs == r.next / bs && p <= r.end {
            // Continuing the rows that wait, or going back over some of them (a rollback):
            // the rows from p on are recomputed.
            r.next = r.next.min(p);
        } else {
            // Nothing waits, or it is for another block or before a gap: flushed as it stands.
            Self::take(r, bs, table, before);
            r.next = p;
            r.block = block;
        }
        r.end = p + 1;
        self.staged += 1;
        let row = (r.slot * bs + p % bs) as i32;
        if (p + 1).is_multiple_of(bs) {
            Self::take(r, bs, table, after);
        }
        row
    }

    /// A ring for a new sequence: a free one, else the least recently used one of a sequence
    /// outside this step (its rows dropped). A step has at most `STAGE_SEQS` sequences, so one
    /// is always found.
    fn free_slot(&mut self) -> usize {
        if let Some(s) = self.free.pop() {
            return s;
        }
        let tick = self.tick;
        let victim = self.rings.iter().filter(|(_, r)| r.used < tick).min_by_key(|(&id, r)| (r.used, id)).map(|(&id, _)| id).expect("a step of at most STAGE_SEQS sequences leaves a ring to reuse");
        self.rings.remove(&victim).expect("found above").slot
    }
}

/// The rings on the GPU and their bookkeeping.
pub(crate) struct DraftStaging {
    /// `StageTable::gpu_rows` rows of the drafter's context features.
    pub(crate) rows: CudaSlice<f32>,
    pub(crate) table: StageTable,
}

impl CudaModel {
    /// Whether decode steps stage the drafter's context (from the next `init_kv`; the default
    /// unless `PEREGRINE_DRAFT_CONTEXT_DEFERRED=0`): for comparisons and tests.
    pub fn set_draft_context_deferred(&mut self, on: bool) {
        self.draft_context_deferred = on;
    }

    /// Decode rows that staged the drafter's context since `init_kv`.
    pub fn staged_draft_rows(&self) -> usize {
        self.draft_staging.as_ref().map_or(0, |s| s.table.staged)
    }

    /// The rings for a drafter of `context_dim` features, where deferral is on (`init_kv`).
    pub(crate) fn alloc_draft_staging(&self, block_size: usize) -> Result<Option<DraftStaging>> {
        match &self.drafter {
            Some(d) if self.draft_context_deferred => Ok(Some(DraftStaging { rows: self.zeros(StageTable::gpu_rows(block_size) * d.spec.context_dim())?, table: StageTable::new(block_size) })),
            _ => Ok(None),
        }
    }

    /// Bytes the rings take on the GPU (counted with the KV cache).
    pub(crate) fn draft_staging_bytes(&self, block_size: usize) -> usize {
        match &self.drafter {
            Some(d) if self.draft_context_deferred => 4 * StageTable::gpu_rows(block_size) * d.spec.context_dim(),
            _ => 0,
        }
    }

    /// A step's drafter context: flushes what must be before it (enqueued now), marks the rows
    /// it stages in `rows.stage`, and returns the rows to flush once it is enqueued.
    pub(crate) fn stage_draft_context(&mut self, batch: &[SeqForward], rows: &mut HostRows) -> Result<Flush> {
        let Some(s) = self.draft_staging.as_mut() else { return Ok(Flush::default()) };
        let seqs: Vec<(u64, usize, &[u32])> = batch.iter().map(|x| (x.seq_id, x.start_pos, &x.full_blocks[..])).collect();
        let step = s.table.plan(&seqs, rows.one_per_seq);
        rows.stage = step.stage;
        self.forgetting_staged_on_error(batch, |m| m.flush_draft_context(&step.before))?;
        Ok(step.after)
    }

    /// Before a draft pass: the sequences' waiting rows become context K/V.
    pub(crate) fn settle_draft_context(&mut self, batch: &[DraftForward]) -> Result<()> {
        let Some(s) = self.draft_staging.as_mut() else { return Ok(()) };
        let mut f = Flush::default();
        for x in batch {
            s.table.settle(x.seq_id, &x.full_blocks, &mut f);
        }
        self.flush_draft_context(&f)
    }

    /// A failed step's sequences: their rings' rows may not have been written.
    fn forget_staged(&mut self, batch: &[SeqForward]) {
        if let Some(s) = self.draft_staging.as_mut() {
            s.table.forget(batch.iter().map(|x| x.seq_id));
        }
    }

    /// `step` (the launch and flush of a step that staged `batch`'s rows), forgetting the rows
    /// where it fails: every step path's one error path.
    pub(crate) fn forgetting_staged_on_error<T>(&mut self, batch: &[SeqForward], step: impl FnOnce(&mut Self) -> Result<T>) -> Result<T> {
        let r = step(self);
        if r.is_err() {
            self.forget_staged(batch);
        }
        r
    }

    /// Ring rows into context K/V at their pool slots: gathered with their positions and slots
    /// (`ring_gather`, the runs passed by value: no host copy), then `write_draft_context` as a
    /// step would over them.
    pub(crate) fn flush_draft_context(&self, f: &Flush) -> Result<()> {
        let (Some(s), Some(d)) = (&self.draft_staging, &self.drafter) else { return Ok(()) };
        if f.is_empty() {
            return Ok(());
        }
        let (n, cd) = (f.rows(), d.spec.context_dim());
        let st = &self.stream;
        let mut features = self.empty(n * cd)?;
        let mut pos = st.alloc_zeros::<i32>(n).map_err(drv)?;
        let mut slots = st.alloc_zeros::<i64>(n).map_err(drv)?;
        {
            let (fp, _gf) = features.device_ptr_mut(st);
            let (pp, _gp) = pos.device_ptr_mut(st);
            let (sp, _gs) = slots.device_ptr_mut(st);
            let mut done = 0u64;
            for runs in f.launches() {
                let rows = runs.rows();
                let (fo, po, so) = (fp + 4 * done * cd as u64, pp + 4 * done, sp + 8 * done);
                let dd = cd as i32;
                let mut b = crate::launch::builder(st, &self.ops.ring_gather);
                b.arg(&s.rows).arg_struct(&runs).arg(&fo).arg(&po).arg(&so).arg(&dd);
                unsafe { b.launch(LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (128, 1, 1), shared_mem_bytes: 0 }) }.map_err(drv)?;
                done += rows as u64;
            }
        }
        self.write_draft_context(&features, n, &pos, &slots)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BS: usize = 4;

    fn decode(t: &mut StageTable, id: u64, p: usize, table: &[u32]) -> StepStaging {
        t.plan(&[(id, p, table)], true)
    }

    /// A flush's positions, pool slots and ring rows, row by row.
    fn positions(f: &Flush) -> Vec<i32> {
        f.runs.iter().flat_map(|r| r.pos0..r.pos0 + r.count).collect()
    }
    fn slots(f: &Flush) -> Vec<i64> {
        f.runs.iter().flat_map(|r| r.slot0..r.slot0 + r.count as i64).collect()
    }
    fn ring_rows(f: &Flush) -> Vec<i32> {
        f.runs.iter().flat_map(|r| r.ring0..r.ring0 + r.count).collect()
    }

    #[test]
    fn a_block_of_decode_rows_is_flushed_by_the_step_that_fills_it() {
        let mut t = StageTable::new(BS);
        let table = [7, 9];
        // The prompt (0..5) was written directly; decode rows 5, 6, 7 wait, 7 fills block 1.
        let s = t.plan(&[(1, 0, &table)], false);
        assert!(s.before.is_empty() && s.stage.is_none());
        for p in 5..7 {
            let s = decode(&mut t, 1, p, &table);
            assert!(s.before.is_empty() && s.after.is_empty(), "{p}: {s:?}");
            assert_eq!(s.stage.as_deref(), Some(&[(p % BS) as i32][..]));
        }
        let s = decode(&mut t, 1, 7, &table);
        assert_eq!(positions(&s.after), vec![5, 6, 7]);
        assert_eq!(slots(&s.after), vec![9 * 4 + 1, 9 * 4 + 2, 9 * 4 + 3]);
        assert_eq!(ring_rows(&s.after), vec![1, 2, 3]);
        // Nothing waits after it.
        let mut f = Flush::default();
        t.settle(1, &table, &mut f);
        assert!(f.is_empty());
    }

    #[test]
    fn a_draft_pass_flushes_what_waits_and_staging_goes_on_in_the_same_block() {
        let mut t = StageTable::new(BS);
        let table = [3, 4, 5];
        decode(&mut t, 1, 4, &table);
        decode(&mut t, 1, 5, &table);
        let mut f = Flush::default();
        t.settle(1, &table, &mut f);
        assert_eq!(positions(&f), vec![4, 5]);
        assert_eq!(slots(&f), vec![16, 17]);
        decode(&mut t, 1, 6, &table);
        let s = decode(&mut t, 1, 7, &table);
        assert_eq!(positions(&s.after), vec![6, 7], "only the rows staged since the pass");
    }

    #[test]
    fn a_rollback_restages_the_rows_it_goes_back_over() {
        let mut t = StageTable::new(BS);
        let table = [3, 4];
        // Staged 4, 5, 6; the engine steps back to 5 (e.g. a verify rejected): 5 and 6 again.
        for p in 4..7 {
            decode(&mut t, 1, p, &table);
        }
        let s = decode(&mut t, 1, 5, &table);
        assert!(s.before.is_empty());
        decode(&mut t, 1, 6, &table);
        let s = decode(&mut t, 1, 7, &table);
        assert_eq!(positions(&s.after), vec![4, 5, 6, 7]);
        // Back before the waiting rows' first: from there on.
        let table2 = [3, 4, 6];
        decode(&mut t, 1, 9, &table2);
        decode(&mut t, 1, 10, &table2);
        decode(&mut t, 1, 8, &table2);
        let s = decode(&mut t, 1, 9, &table2);
        assert!(s.after.is_empty());
        let mut f = Flush::default();
        t.settle(1, &table2, &mut f);
        assert_eq!(positions(&f), vec![8, 9]);
    }

    #[test]
    fn rows_of_another_block_or_before_a_gap_are_flushed_before_the_step() {
        let mut t = StageTable::new(BS);
        let table = [3, 4, 5];
        decode(&mut t, 1, 4, &table);
        decode(&mut t, 1, 5, &table);
        // A direct write covered 6..9 (e.g. verify rows); decode resumes at 9 in block 5.
        let s = decode(&mut t, 1, 9, &table);
        assert_eq!(positions(&s.before), vec![4, 5]);
        assert_eq!(slots(&s.before), vec![16, 17]);
        let s = decode(&mut t, 1, 10, &table);
        assert!(s.before.is_empty());
        let s = decode(&mut t, 1, 11, &table);
        assert_eq!(positions(&s.after), vec![9, 10, 11]);
    }

    #[test]
    fn rows_whose_block_the_sequence_no_longer_holds_are_dropped() {
        let mut t = StageTable::new(BS);
        decode(&mut t, 1, 4, &[3, 4]);
        decode(&mut t, 1, 5, &[3, 4]);
        // Preempted: block 4 went to another sequence; the resumed prompt is written directly.
        let s = t.plan(&[(1, 0, &[3, 8])], false);
        assert!(s.before.is_empty(), "block 4 is not this sequence's any more: {s:?}");
        assert!(s.stage.is_none());
        let mut f = Flush::default();
        t.settle(1, &[3, 8], &mut f);
        assert!(f.is_empty());
    }

    #[test]
    fn steps_that_write_directly_flush_first() {
        let mut t = StageTable::new(BS);
        let table = [3, 4];
        decode(&mut t, 1, 5, &table);
        decode(&mut t, 2, 1, &[6]);
        // A verify step of sequence 1 (rows 6..8) beside a decode row of 2.
        let s = t.plan(&[(1, 6, &table), (2, 2, &[6])], false);
        assert_eq!(positions(&s.before), vec![5, 1]);
        assert!(s.stage.is_none());
    }

    #[test]
    fn more_sequences_than_rings_reuse_the_least_recently_used_one() {
        let mut t = StageTable::new(BS);
        for id in 0..STAGE_SEQS as u64 {
            decode(&mut t, id, 1, &[id as u32]);
        }
        assert_eq!(t.len(), STAGE_SEQS);
        // Sequence 0 is the least recently used; a new one takes its ring.
        decode(&mut t, 0, 2, &[0]);
        let s = decode(&mut t, 1000, 1, &[99]);
        assert_eq!(t.len(), STAGE_SEQS);
        let row = s.stage.unwrap()[0];
        let mut f = Flush::default();
        t.settle(1, &[1], &mut f);
        assert!(f.is_empty(), "sequence 1's rows were dropped with its ring");
        assert_eq!(row % BS as i32, 1);
        // Sequence 0 kept its ring.
        let mut f = Flush::default();
        t.settle(0, &[0], &mut f);
        assert_eq!(positions(&f), vec![1, 2]);
    }

    #[test]
    fn a_full_step_of_sequences_all_get_rings_and_larger_batches_write_directly() {
        let mut t = StageTable::new(BS);
        let tables: Vec<[u32; 1]> = (0..STAGE_SEQS as u32 + 1).map(|i| [i]).collect();
        let seqs: Vec<(u64, usize, &[u32])> = (0..STAGE_SEQS).map(|i| (i as u64, 1, &tables[i][..])).collect();
        let s = t.plan(&seqs, true);
        let rows = s.stage.unwrap();
        let mut distinct = rows.clone();
        distinct.sort();
        distinct.dedup();
        assert_eq!(distinct.len(), STAGE_SEQS);
        assert!(rows.iter().all(|&r| r >= 0 && r < t.scratch_row()));
        let more: Vec<(u64, usize, &[u32])> = (0..=STAGE_SEQS).map(|i| (i as u64, 2, &tables[i][..])).collect();
        let s = t.plan(&more, true);
        assert!(s.stage.is_none());
        assert_eq!(positions(&s.before).len(), STAGE_SEQS, "every waiting row flushed before the direct step");
    }

    #[test]
    fn a_flush_goes_as_one_run_a_ring_and_sixty_four_runs_a_launch() {
        let mut t = StageTable::new(BS);
        let (a, b) = ([3, 4], [5, 6, 7]);
        let mut filled = Flush::default();
        for p in 4..7 {
            filled.runs.extend(t.plan(&[(1, p, &a[..]), (2, p + 2, &b[..])], true).after.runs);
        }
        // Sequence 2's 6 and 7 filled its block 6 (one run, written then); 8 waits in block 7.
        assert_eq!(filled.runs, vec![Run { ring0: 4 + 2, pos0: 6, slot0: 6 * 4 + 2, count: 2 }]);
        let mut f = Flush::default();
        t.settle(1, &a, &mut f);
        t.settle(2, &b, &mut f);
        assert_eq!(f.runs, vec![Run { ring0: 0, pos0: 4, slot0: 16, count: 3 }, Run { ring0: 4, pos0: 8, slot0: 28, count: 1 }]);
        assert_eq!(f.rows(), 4);
        let r = |i: i32| Run { ring0: 2 * i, pos0: i, slot0: 3 * i as i64, count: 1 + i % 3 };
        let f = Flush { runs: (0..RING_RUNS as i32 + 3).map(r).collect() };
        let launches = f.launches();
        assert_eq!(launches.iter().map(|l| l.n).collect::<Vec<_>>(), vec![RING_RUNS as i32, 3]);
        assert_eq!(launches.iter().map(RingRuns::rows).sum::<usize>(), f.rows());
        let last = &launches[1];
        assert_eq!((last.ring0[2], last.pos0[2], last.slot0[2], last.count[2]), (132, 66, 198, 1));
    }

    #[test]
    fn forgotten_sequences_free_their_rings() {
        let mut t = StageTable::new(BS);
        decode(&mut t, 1, 1, &[0]);
        decode(&mut t, 2, 1, &[1]);
        t.forget([1, 2]);
        assert_eq!(t.len(), 0);
        let mut f = Flush::default();
        t.settle(1, &[0], &mut f);
        assert!(f.is_empty());
    }
}
