//! The fused speculative step: the draft pass, the target's forward over the verify blocks with
//! the drafts put in place on the GPU, the sampling of every row and the acceptance, captured as
//! one CUDA graph per (sequence bucket, block rows, table width, sampled or greedy). One copy
//! brings back each sequence's samples, drafts and accepted count; the host never sees the
//! drafts before the target has verified them.

use cudarc::driver::{CudaSlice, LaunchConfig, PinnedHostSlice};
use peregrine_core::backend::{DraftForward, OutputRows, SeqForward, SpecRows, SpecSampling};
use peregrine_core::{Error, Result};

use crate::backend::{drv, CudaModel, RowMeta};
use crate::draft::DraftMeta;
use crate::graph::{Capture, Graph, DRAFT_SEQ_BUCKETS};
use crate::shared_logits::SharedLogits;
use crate::kernels::SamplingBuffers;

/// At most this many verify rows (bucket x block rows): the shared logits buffer grows to hold
/// them (crate::shared_logits).
const MAX_ROWS: usize = 128;
/// Logit adjustments (bias entries) a sampled step has room for, per row.
const ADJUST_PER_ROW: usize = 64;

/// (sequence bucket, block rows, table width, sampled).
pub(crate) type SpecKey = (usize, usize, usize, bool);

/// A fused step's static buffers, and its graph (None: graphs are off; the body runs eagerly on
/// the same buffers).
pub(crate) struct SpecStep {
    draft: DraftMeta,
    verify: RowMeta,
    /// Views of the shared buffers of draft and step logits (crate::shared_logits).
    draft_logits: SharedLogits,
    drafts: CudaSlice<i32>,
    logits: SharedLogits,
    argmax: CudaSlice<i32>,
    sampling: Option<(SamplingBuffers, CudaSlice<i32>)>,
    /// Per sequence: nb samples, nb - 1 drafts, the accepted count.
    out: CudaSlice<i32>,
    host: PinnedHostSlice<i32>,
    graph: Option<Graph>,
}

impl SpecStep {
    pub(crate) fn captured(&self) -> bool {
        self.graph.is_some()
    }

    /// The shared buffers its logits are views of.
    pub(crate) fn logits_owners(&self) -> [&std::sync::Arc<CudaSlice<f32>>; 2] {
        [self.draft_logits.owner(), self.logits.owner()]
    }
}

impl CudaModel {
    /// `Backend::forward_speculative` on the GPU; None when the batch does not fit a fused step
    /// (no drafter, drafts post-processed on the host, blocks of different sizes, too many rows,
    /// too many adjustments).
    pub(crate) fn speculate(&mut self, batch: &[SeqForward], sampling: SpecSampling) -> Result<Option<Vec<SpecRows>>> {
        self.graphs.overlap.refuse_while_awaiting()?;
        self.graphs.overlap.break_chain(); // crate::overlap: no chaining across other steps
        let Some(d) = &self.drafter else { return Ok(None) };
        let plain = d.plain_output();
        let Some(nb) = batch.first().map(|s| s.tokens.len()) else { return Ok(None) };
        if !plain || nb < 2 || batch.iter().any(|s| s.tokens.len() != nb || s.output != OutputRows::All) {
            return Ok(None);
        }
        // The draft pass's sequence buckets (its logits for every draft row bound the size).
        let Some(&bucket) = DRAFT_SEQ_BUCKETS.iter().find(|&&b| b >= batch.len()) else { return Ok(None) };
        if bucket * nb > MAX_ROWS {
            return Ok(None);
        }
        if let SpecSampling::Sampled { rows, adjust } = sampling {
            if rows.len() != batch.len() * nb {
                return Err(Error::Backend(format!("{} sampling rows for {} verify rows", rows.len(), batch.len() * nb)));
            }
            if adjust.len() > bucket * nb * ADJUST_PER_ROW {
                return Ok(None);
            }
        }
        // Checks every token and KV block, as a plain forward does; the placeholders are
        // overwritten on the GPU.
        let mut rows = self.host_rows(batch)?;
        // Verify rows write the drafter's context themselves; what waits in the rings goes first.
        self.stage_draft_context(batch, &mut rows)?;
        let reqs: Vec<DraftForward> = batch
            .iter()
            .map(|s| DraftForward { seq_id: s.seq_id, last_token: s.tokens[0], start_pos: s.start_pos, num_drafts: nb - 1, full_blocks: s.full_blocks.clone() })
            .collect();
        let drows = self.draft_rows(&reqs)?;
        let width = rows.max_blocks.max(drows.max_blocks).next_power_of_two().max(8);
        let sampled = matches!(sampling, SpecSampling::Sampled { .. });
        let key = (bucket, nb, width, sampled);
        // A step built while graphs were off is rebuilt (and captured) once they are on.
        let mut step = match self.graphs.spec.remove(&key) {
            Some(s) if s.captured() || !self.graphs.enabled || self.graphs.has_failed(Capture::Spec(key)) => s,
            _ => self.build_spec_step(key)?,
        };
        let res = self.run_spec_step(&mut step, key, &rows, &drows, sampling, batch.len());
        self.graphs.spec.insert(key, step);
        res
    }

    fn build_spec_step(&mut self, key: SpecKey) -> Result<SpecStep> {
        let (seqs, nb, width, sampled) = key;
        let (n, k) = (seqs * nb, seqs * (nb - 1));
        let st = self.stream.clone();
        let z = |len: usize| st.alloc_zeros::<i32>(len.max(1)).map_err(drv);
        let mut step = SpecStep {
            draft: self.alloc_draft_meta(seqs, nb, width)?,
            verify: self.alloc_row_meta(n, width, false, false, false)?,
            draft_logits: self.shared_logits(true, k)?,
            drafts: z(k)?,
            logits: self.shared_logits(false, n)?,
            argmax: z(n)?,
            sampling: if sampled { Some((SamplingBuffers::new(&st, n, n * ADJUST_PER_ROW)?, z(n)?)) } else { None },
            out: z(seqs * 2 * nb)?,
            // SAFETY: read only after the copy into it completed (the stream is synchronised).
            host: unsafe { st.context().alloc_pinned::<i32>(seqs * 2 * nb) }.map_err(drv)?,
            graph: None,
        };
        if self.graphs.enabled && !self.graphs.has_failed(Capture::Spec(key)) {
            match self.record(|| self.spec_body(&mut step, key)) {
                Ok(g) => {
                    step.graph = Some(g);
                    tracing::debug!(seqs, nb, width, sampled, "captured a fused speculative-step CUDA graph");
                }
                // The step keeps its buffers and runs its body eagerly.
                Err(e) => self.graphs.capture_failed(Capture::Spec(key), &e),
            }
        }
        Ok(step)
    }

    /// Draft pass, drafts into the verify rows, the target's forward, sampling, acceptance.
    fn spec_body(&self, s: &mut SpecStep, key: SpecKey) -> Result<()> {
        let (seqs, nb, _, _) = key;
        let (n, k, vocab) = (seqs * nb, seqs * (nb - 1), self.spec.vocab_size);
        self.draft_body(&s.draft, n, k, k, &mut s.draft_logits, &mut s.drafts)?;
        let st = &self.stream;
        let (nbi, ki, si) = (nb as i32, k as i32, seqs as i32);
        let mut b = crate::launch::builder(st, &self.ops.place_drafts);
        b.arg(&s.drafts).arg(&mut s.verify.tok).arg(&nbi).arg(&ki);
        unsafe { b.launch(LaunchConfig::for_num_elems(k as u32)) }.map_err(drv)?;
        // Verify rows: several per sequence, each reading the K/V of the rows before it.
        self.step_body(&s.verify, n, None, false, &mut s.logits, &mut s.argmax)?;
        let samples = match &mut s.sampling {
            Some((bufs, ids)) => {
                self.kernels.sample_from_buffers(&mut s.logits, vocab, n, bufs, ids)?;
                &*ids
            }
            None => &s.argmax,
        };
        let mut b = crate::launch::builder(st, &self.ops.accept_drafts);
        b.arg(&s.drafts).arg(samples).arg(&nbi).arg(&si).arg(&mut s.out);
        unsafe { b.launch(LaunchConfig::for_num_elems(seqs as u32)) }.map_err(drv)?;
        Ok(())
    }

    fn run_spec_step(&self, s: &mut SpecStep, key: SpecKey, rows: &crate::backend::HostRows, drows: &crate::draft::DraftRows, sampling: SpecSampling, real: usize) -> Result<Option<Vec<SpecRows>>> {
        let (seqs, nb, width, _) = key;
        self.write_row_meta(&mut s.verify, seqs * nb, width, rows, None)?;
        self.write_draft_meta(&mut s.draft, (seqs, nb, width), drows)?;
        if let (SpecSampling::Sampled { rows, adjust }, Some((bufs, _))) = (sampling, &mut s.sampling) {
            if !bufs.write(&self.stream, rows, adjust)? {
                return Err(Error::Backend("sampling rows name adjustments out of range".into()));
            }
        }
        match &s.graph {
            Some(g) if self.graphs.enabled => g.0.launch().map_err(drv)?,
            _ => self.spec_body(s, key)?,
        }
        let len = real * 2 * nb;
        self.stream.memcpy_dtoh(&s.out.slice(..len), &mut s.host).map_err(drv)?;
        self.stream.synchronize().map_err(drv)?;
        let out = &s.host.as_slice().map_err(drv)?[..len];
        Ok(Some(
            out.chunks(2 * nb)
                .map(|c| SpecRows {
                    ids: c[..nb].iter().map(|&t| t as u32).collect(),
                    drafts: c[nb..2 * nb - 1].iter().map(|&t| t as u32).collect(),
                    accepted: c[2 * nb - 1] as usize,
                })
                .collect(),
        ))
    }
}
