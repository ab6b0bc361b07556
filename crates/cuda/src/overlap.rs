//! Overlapped decode steps (`Backend::enqueue_decode` / `collect_decode`): the engine starts
//! step N + 1 before it reads step N's ids, so the host's share of a step (committing tokens,
//! detokenising, streaming, the next step's uploads and graph launch) runs while the GPU works
//! instead of between two steps.
//!
//! Step N + 1's rows whose input is step N's sampled token carry -(r + 1) as their token, r
//! being the row in step N, and the graph's embedding reads that row of step N's ids on the
//! device (`row_token` in kernels/ops.cu), at the address written into the graph's row
//! metadata with the rest of its inputs. Everything runs on the model's one stream, so:
//! - step N's ids are read by N + 1's embedding after N wrote them, and are copied to the host
//!   (into a page-locked buffer of the step's own) before N + 1 can overwrite them (the same
//!   graph, and so the same ids buffer, when the bucket is unchanged);
//! - a KV block the engine frees or hands to another sequence while a step is in flight is
//!   written again only by steps enqueued after it;
//! - a sampled step's ids buffer (the argmax lives in its graph) is held while those ids are
//!   the last ones, and its stream-ordered free follows the launch of any step chained on it.
//!
//! Only decode steps whose graph is captured already overlap (a capture runs the step); any
//! other call makes the ids of the last enqueued step unreachable for chaining.
//!
//! A deferred step (`enqueue_decode_deferred`: rows whose sampling depends on the token of the
//! step ahead, a constrained sequence's mask or penalties over its output) launches its greedy
//! graph and holds it, logits and all, until `sample_enqueued` brings the rows' sampling; only
//! collecting the steps ahead may come between, so no other replay touches the logits every
//! step graph shares. Its sampler then writes the ids the next step chains on.
//!
//! A greedy step of a copy-free graph (crate::staged) needs no copy at all: its argmax kernel
//! writes the ids into the host slot the step's rows came from, which stays held until the
//! step is collected. So does a sampled step without logit adjustments, whose graph samples
//! (`Op::Sample`).

use std::collections::VecDeque;
use std::sync::Arc;

use cudarc::driver::{CudaEvent, CudaSlice, DevicePtr, PinnedHostSlice};
use cudarc::driver::sys::CUevent_flags;
use peregrine_core::backend::{LogitAdjust, OutputRows, RowSampling, SeqForward, TokenMask};
use peregrine_core::{Error, Result};

use crate::backend::{drv, CudaModel, HostRows};
use crate::graph::StepGraph;
use crate::staged::HostSlots;

/// Page-locked id buffers kept for reuse (one per batch size met recently).
const SPARE_BUFFERS: usize = 8;

/// A page-locked buffer for one step's ids, and the event recorded after the copy into it
/// (the context does not track events, so a pinned slice's own is never recorded).
struct IdBuffer {
    host: PinnedHostSlice<i32>,
    copied: CudaEvent,
}

/// Where a started step's ids arrive on the host.
enum IdsAt {
    /// Copied into a page-locked buffer after the step.
    Copy(IdBuffer),
    /// Written by the graph into this slot of a copy-free graph's (held until collected).
    Slot(Arc<HostSlots>, usize),
}

/// A started step: its ids on their way to the host.
struct InFlight {
    ids: IdsAt,
    rows: usize,
}

/// The ids the last enqueued step writes, on the device.
struct LastIds {
    addr: u64,
    rows: usize,
    /// A sampled step's own ids buffer (an argmax step's live in its cached graph).
    _sampled: Option<CudaSlice<i32>>,
}

/// A deferred step started and not sampled yet: its graph (whose logits hold its rows).
struct Awaiting {
    graph: StepGraph,
    rows: usize,
}

#[derive(Default)]
pub(crate) struct Overlap {
    in_flight: VecDeque<InFlight>,
    /// Id buffers of collected steps, for reuse.
    spare: Vec<IdBuffer>,
    /// The ids the last enqueued step writes, while no other call has run since (the only ids
    /// a chained step may read).
    last_ids: Option<LastIds>,
    /// A deferred step waiting for `sample_enqueued`.
    awaiting: Option<Awaiting>,
    /// Tests: the next drafter flush after an enqueued step fails (`fail_next_flush`).
    fail_next_flush: std::sync::atomic::AtomicBool,
}

impl Overlap {
    /// Called by every step that is not an overlapped decode: its graphs may overwrite the ids
    /// a chained step would read.
    pub(crate) fn break_chain(&mut self) {
        self.last_ids = None;
    }

    /// Forgets a deferred step waiting for its sampling (its graph is dropped with the rest).
    pub(crate) fn drop_awaiting(&mut self) {
        self.awaiting = None;
    }

    /// An error while a deferred step waits for its sampling: any replay would overwrite its
    /// logits.
    pub(crate) fn refuse_while_awaiting(&self) -> Result<()> {
        match self.awaiting {
            Some(_) => Err(Error::Backend("a deferred decode step waits for its sampling (sample_enqueued) before any other step".into())),
            None => Ok(()),
        }
    }
}

impl CudaModel {
    pub(crate) fn enqueue_decode_step(&mut self, batch: &[SeqForward], chain: &[Option<usize>], sampling: Option<(&[RowSampling], &[LogitAdjust])>) -> Result<bool> {
        self.graphs.overlap.refuse_while_awaiting()?;
        let n = batch.len();
        if n == 0 || chain.len() != n || !batch.iter().all(|s| s.tokens.len() == 1 && s.output == OutputRows::Last) {
            return Ok(false);
        }
        if sampling.is_some_and(|(rows, _)| rows.len() != n) {
            return Err(Error::Backend(format!("{} sampling rows for {n} output rows", sampling.map_or(0, |s| s.0.len()))));
        }
        // Sampled without adjustments: the graph that samples (crate::graph), whose ids are the
        // samples; with adjustments, the greedy graph and the sampler after it.
        let in_graph = match sampling {
            Some((p, adj)) if self.graph_samples(adj) => Some(p),
            _ => None,
        };
        let Some(mut rows) = self.overlapped_rows(batch, chain, in_graph.is_some())? else { return Ok(false) };
        let st = self.stream.clone();
        // Decode rows stage the drafter's context; a block they fill is flushed after the step
        // (crate::draft_staging).
        let after = self.stage_draft_context(batch, &mut rows)?;
        // Held past the launch: a sampled buffer's stream-ordered free must follow the graph
        // that reads it (graph_for's own break_chain would drop it before).
        let _prev_ids = self.graphs.overlap.last_ids.take();
        self.forgetting_staged_on_error(batch, |m| {
            let mut g = m.graph_for(&rows, in_graph)?.ok_or_else(|| Error::Backend("a captured decode graph went missing".into()))?;
            let vocab = m.spec.vocab_size;
            let launched = (|| -> Result<(u64, Option<CudaSlice<i32>>, IdsAt)> {
                let ids_in_graph = sampling.is_none() || in_graph.is_some();
                if let (true, Some(staged), Some(slot)) = (ids_in_graph, g.staged(), g.slot) {
                    // The argmax or the sampler wrote them into the slot (crate::staged).
                    return Ok((g.ids.device_ptr(&st).0, None, IdsAt::Slot(staged.hold(slot, n)?, slot)));
                }
                let sampled = match sampling {
                    Some((p, adj)) if !ids_in_graph => Some(m.kernels.sample_rows_adjusted(&mut g.logits, vocab, p, adj)?),
                    _ => None,
                };
                let ids = sampled.as_ref().unwrap_or(&g.ids);
                let addr = ids.device_ptr(&st).0;
                let buf = m.copy_ids(ids, n)?;
                Ok((addr, sampled, IdsAt::Copy(buf)))
            })();
            m.graphs.put_back(g);
            let (addr, sampled, ids) = launched?;
            m.graphs.overlap.in_flight.push_back(InFlight { ids, rows: n });
            m.graphs.overlap.last_ids = Some(LastIds { addr, rows: n, _sampled: sampled });
            m.flush_after_enqueue(&after).inspect_err(|_| m.abandon_enqueued())
        })?;
        Ok(true)
    }

    /// The drafter context a step's rows filled, flushed after its launch (or the failure
    /// `fail_next_flush` asks for).
    fn flush_after_enqueue(&mut self, after: &crate::draft_staging::Flush) -> Result<()> {
        if self.graphs.overlap.fail_next_flush.swap(false, std::sync::atomic::Ordering::Relaxed) {
            return Err(Error::Backend("a flush failure asked for by fail_next_flush".into()));
        }
        self.flush_draft_context(after)
    }

    /// Undoes the record of a step whose launch went out but whose flush after it failed: the
    /// engine fails that step and never collects it, so nothing of it may stay (its queue entry
    /// would hand its ids to the next collect, one step late from then on; an awaiting graph
    /// would refuse every later call). The stream is drained first, since the launched graph
    /// may still read its slot's row data.
    fn abandon_enqueued(&mut self) {
        let _ = self.stream.synchronize();
        let o = &mut self.graphs.overlap;
        o.last_ids = None;
        if let Some(a) = o.awaiting.take() {
            self.graphs.put_back(a.graph);
        } else if let Some(InFlight { ids: IdsAt::Slot(slots, s), .. }) = o.in_flight.pop_back() {
            slots.release(s);
        }
    }

    /// For tests of the error path: the drafter flush after the next enqueued decode step
    /// fails, as an allocation or launch failure there would.
    pub fn fail_next_flush(&self) {
        self.graphs.overlap.fail_next_flush.store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// The rows of an overlapped decode step, its chained rows reading the last enqueued step's
    /// ids, or None where it cannot overlap: a row that is not one token asking for its last
    /// row, a chained row past the last step's rows (or no last step), a graph (the one that
    /// samples when `sampled`) not captured yet.
    fn overlapped_rows(&self, batch: &[SeqForward], chain: &[Option<usize>], sampled: bool) -> Result<Option<HostRows>> {
        let n = batch.len();
        if n == 0 || chain.len() != n || !batch.iter().all(|s| s.tokens.len() == 1 && s.output == OutputRows::Last) {
            return Ok(None);
        }
        let prev = self.graphs.overlap.last_ids.as_ref().map(|l| (l.addr, l.rows));
        let chained = chain.iter().any(Option::is_some);
        if chained && !prev.is_some_and(|(_, rows)| chain.iter().flatten().all(|&r| r < rows)) {
            return Ok(None);
        }
        let mut rows = self.host_rows(batch)?;
        match self.graph_key(&rows, sampled) {
            Some(key) if self.graph_captured(&key) => {}
            _ => return Ok(None),
        }
        for (t, c) in rows.toks.iter_mut().zip(chain) {
            if let Some(r) = c {
                *t = -(*r as i32) - 1;
            }
        }
        if chained {
            rows.chain = prev.map(|p| p.0);
        }
        Ok(Some(rows))
    }

    /// A page-locked buffer (a spare one of n ids, or a new one) with the first n of `ids`
    /// copied into it after the work enqueued so far, and its event recorded.
    fn copy_ids(&mut self, ids: &CudaSlice<i32>, n: usize) -> Result<IdBuffer> {
        let st = self.stream.clone();
        // Exactly n ids: a copy into a host slice copies the slice's whole length.
        let spare = &mut self.graphs.overlap.spare;
        let mut buf = match spare.iter().position(|b| b.host.len() == n) {
            Some(i) => spare.swap_remove(i),
            None => IdBuffer {
                // SAFETY: read only after `copied` completed (collect_decode_step).
                host: unsafe { st.context().alloc_pinned_with_flags::<i32>(n, 0) }.map_err(drv)?,
                copied: st.context().new_event(Some(CUevent_flags::CU_EVENT_DISABLE_TIMING)).map_err(drv)?,
            },
        };
        st.memcpy_dtoh(&ids.slice(..n), &mut buf.host).map_err(drv)?;
        buf.copied.record(&st).map_err(drv)?;
        Ok(buf)
    }

    /// `Backend::enqueue_decode_deferred`: the step's greedy graph launched (its rows chained as
    /// in `enqueue_decode_step`) and held until `sample_enqueued_step`.
    pub(crate) fn enqueue_decode_deferred_step(&mut self, batch: &[SeqForward], chain: &[Option<usize>]) -> Result<bool> {
        self.graphs.overlap.refuse_while_awaiting()?;
        let n = batch.len();
        let Some(mut rows) = self.overlapped_rows(batch, chain, false)? else { return Ok(false) };
        let after = self.stage_draft_context(batch, &mut rows)?;
        // Held past the launch, as in enqueue_decode_step.
        let _prev_ids = self.graphs.overlap.last_ids.take();
        self.forgetting_staged_on_error(batch, |m| {
            let graph = m.graph_for(&rows, None)?.ok_or_else(|| Error::Backend("a captured decode graph went missing".into()))?;
            m.graphs.overlap.awaiting = Some(Awaiting { graph, rows: n });
            // After the graph on the stream: the flush reads the rings it wrote, not its logits.
            m.flush_after_enqueue(&after).inspect_err(|_| m.abandon_enqueued())
        })?;
        Ok(true)
    }

    /// `Backend::sample_enqueued`: the awaiting step's rows adjusted, masked and sampled, its
    /// graph put back, its ids on their way to the host and the ones a next step chains on.
    pub(crate) fn sample_enqueued_step(&mut self, params: &[RowSampling], adjust: &[LogitAdjust], masks: Vec<Option<TokenMask>>) -> Result<()> {
        let Awaiting { mut graph, rows: n } = self.graphs.overlap.awaiting.take().ok_or_else(|| Error::Backend("no deferred decode step waits for its sampling".into()))?;
        let vocab = self.spec.vocab_size;
        let sampled = (|| -> Result<(CudaSlice<i32>, IdBuffer)> {
            if masks.len() != n || params.len() != n {
                return Err(Error::Backend(format!("{} sampling rows and {} token masks for {n} rows", params.len(), masks.len())));
            }
            let ids = self.kernels.sample_rows_masked(&mut graph.logits, vocab, params, adjust, &masks)?;
            let buf = self.copy_ids(&ids, n)?;
            Ok((ids, buf))
        })();
        self.graphs.put_back(graph);
        let (ids, buf) = sampled?;
        let addr = ids.device_ptr(&self.stream).0;
        self.graphs.overlap.in_flight.push_back(InFlight { ids: IdsAt::Copy(buf), rows: n });
        self.graphs.overlap.last_ids = Some(LastIds { addr, rows: n, _sampled: Some(ids) });
        Ok(())
    }

    pub(crate) fn collect_decode_step(&mut self) -> Result<Vec<u32>> {
        let step = self.graphs.overlap.in_flight.pop_front().ok_or_else(|| Error::Backend("no decode step is in flight".into()))?;
        match step.ids {
            IdsAt::Slot(slots, s) => {
                let ids = slots.ids(s, step.rows).map(|v| v.into_iter().map(|t| t as u32).collect());
                slots.release(s);
                ids
            }
            IdsAt::Copy(buf) => {
                buf.copied.synchronize().map_err(drv)?;
                let ids = buf.host.as_slice().map_err(drv)?[..step.rows].iter().map(|&t| t as u32).collect();
                let spare = &mut self.graphs.overlap.spare;
                if spare.len() >= SPARE_BUFFERS {
                    spare.remove(0);
                }
                spare.push(buf);
                Ok(ids)
            }
        }
    }
}
