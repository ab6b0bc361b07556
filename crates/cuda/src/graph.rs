//! CUDA graphs of the decode step. A batch whose every row wants logits (decode steps and
//! speculative verify blocks) of at most 64 rows replays a graph captured once per (row bucket,
//! block-table width): the step's inputs go into the graph's static buffers (read by its first
//! kernel from mapped host memory: crate::staged), padding rows point at a scratch KV block, and
//! one launch replaces the step's few hundred kernel launches. A sampled decode step without
//! logit adjustments has graphs of its own, which sample every row on the GPU after the lm_head
//! (`Op::Sample`) with the rows' parameters written in with the row data, so it is one launch
//! too; `PEREGRINE_GRAPH_SAMPLING=0` samples after the greedy graph instead (for comparison).
//! Its buffers come from a pool of
//! their own (crate::alloc), so the graph holds kernel nodes only and every launch boundary keeps
//! its programmatic edge; its logits are a view of one buffer every graph shares
//! (crate::shared_logits). Prefill chunks and other
//! shapes run eagerly.
//! `PEREGRINE_CUDA_GRAPHS=0` turns graphs off.

use std::collections::{HashMap, HashSet};

use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
use cudarc::driver::{CudaGraph, CudaSlice, PinnedHostSlice};
use peregrine_core::backend::{split_logits, Logits, RowSampling};
use peregrine_core::{Error, Result};

use crate::backend::{drv, CudaModel, HostRows, RowMeta};
use crate::draft::{DraftMeta, DraftRows};
use crate::kernels::{device_sampling_rows, DeviceRowSampling};
use crate::shared_logits::{LogitsPool, SharedLogits};
use crate::speculate::{SpecKey, SpecStep};

/// Row counts a graph is captured for; a batch uses the smallest that holds it.
pub(crate) const ROW_BUCKETS: [usize; 14] = [1, 2, 3, 4, 5, 6, 7, 8, 12, 16, 24, 32, 48, 64];

/// A captured graph. CUDA graph objects may be used from any thread as long as calls are
/// serialised; a `CudaModel` (and so its graphs) is owned and used by one thread at a time.
pub(crate) struct Graph(pub(crate) CudaGraph, pub(crate) NodeKinds);

/// How many nodes of each kind a captured graph holds, by the driver's name for the kind. A
/// step captured whole is kernel nodes only: a memory node or a memset between two kernels
/// would cost them their programmatic edge (crate::alloc).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct NodeKinds(pub Vec<(String, usize)>);

impl NodeKinds {
    fn of(graph: &CudaGraph) -> Result<NodeKinds> {
        use cudarc::driver::sys;
        let g = graph.cu_graph();
        let mut n = 0usize;
        // SAFETY: the graph is alive; the first call asks for the count, the second fills it.
        unsafe { sys::cuGraphGetNodes(g, std::ptr::null_mut(), &mut n) }.result().map_err(drv)?;
        let mut nodes = vec![std::ptr::null_mut(); n];
        unsafe { sys::cuGraphGetNodes(g, nodes.as_mut_ptr(), &mut n) }.result().map_err(drv)?;
        let mut kinds: Vec<(String, usize)> = Vec::new();
        for node in nodes.into_iter().take(n) {
            let mut t = sys::CUgraphNodeType::CU_GRAPH_NODE_TYPE_EMPTY;
            unsafe { sys::cuGraphNodeGetType(node, &mut t) }.result().map_err(drv)?;
            let name = format!("{t:?}").trim_start_matches("CU_GRAPH_NODE_TYPE_").to_lowercase();
            match kinds.iter_mut().find(|k| k.0 == name) {
                Some(k) => k.1 += 1,
                None => kinds.push((name, 1)),
            }
        }
        kinds.sort();
        Ok(NodeKinds(kinds))
    }

    /// Nodes that are not kernels.
    pub fn non_kernel(&self) -> usize {
        self.0.iter().filter(|k| k.0 != "kernel").map(|k| k.1).sum()
    }
}
// SAFETY: see above; the graph is only touched through `&mut CudaModel`.
unsafe impl Send for Graph {}

/// Which captured decode-step graph a batch replays.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct GraphKey {
    /// The row bucket.
    rows: usize,
    /// The block tables' width.
    width: usize,
    /// Every row is its sequence's only new token.
    decode: bool,
    /// It samples every row on the GPU (`Op::Sample`) instead of taking the argmax.
    sampled: bool,
}

pub(crate) struct StepGraph {
    key: GraphKey,
    meta: RowMeta,
    /// Its logits, in the buffer every step graph shares (crate::shared_logits).
    pub(crate) logits: SharedLogits,
    pub(crate) ids: CudaSlice<i32>,
    graph: Graph,
    /// A copy-free graph's `fetch_staged` node (crate::staged), pointed at a slot per launch.
    fetch: Option<crate::staged::FetchNode>,
    /// The slot the last launch read its rows from and writes its ids to (copy-free graphs).
    pub(crate) slot: Option<usize>,
}

impl StepGraph {
    /// The row-data slots of a copy-free graph (crate::staged).
    pub(crate) fn staged(&self) -> Option<&crate::staged::StagedRows> {
        self.meta.staged.as_ref()
    }

    /// The logits of the first `counts.iter().sum()` rows, through the page-locked buffer
    /// `host` (one for every graph, made or grown here: a device-to-host copy into pageable
    /// memory is several times slower), split per sequence straight from it (one host copy of
    /// the logits, not two: at batch 64 they are 39 MB).
    pub(crate) fn fetch_logits(&self, host: &mut Option<PinnedHostSlice<f32>>, st: &std::sync::Arc<cudarc::driver::CudaStream>, counts: &[usize], vocab: usize) -> Result<Vec<Logits>> {
        let len = counts.iter().sum::<usize>() * vocab;
        if host.as_ref().is_none_or(|h| h.len() < len) {
            // SAFETY: the buffer is only read after the copy into it completed (as_slice syncs).
            *host = Some(unsafe { st.context().alloc_pinned::<f32>(self.logits.len().max(len)) }.map_err(drv)?);
        }
        let host = host.as_mut().expect("made above");
        // A copy into a host slice copies the slice's whole length: exactly `len`.
        st.memcpy_dtoh(&self.logits.slice(..len), &mut host.as_mut_slice().map_err(drv)?[..len]).map_err(drv)?;
        st.synchronize().map_err(drv)?;
        Ok(split_logits(&host.as_slice().map_err(drv)?[..len], counts, vocab))
    }
}

/// A graph whose capture failed: its shape runs eagerly from then on (until the graphs are
/// dropped with the KV pools), while the other graphs keep replaying.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Capture {
    Step(GraphKey),
    Draft((usize, usize, usize)),
    Spec(SpecKey),
}

pub(crate) struct Graphs {
    /// False when turned off, or when the model has a layer that needs the host mid-step
    /// (experts routed on the host).
    pub(crate) enabled: bool,
    capturable: bool,
    cache: HashMap<GraphKey, StepGraph>,
    /// Draft-pass graphs by (sequence bucket, block rows per sequence, table width).
    drafts: HashMap<(usize, usize, usize), DraftGraph>,
    /// Fused speculative steps (draft, verify, accept).
    pub(crate) spec: HashMap<SpecKey, SpecStep>,
    /// Captures that failed, whose shapes run eagerly.
    failed: HashSet<Capture>,
    /// Tests: the next capture fails inside its body (`fail_next_capture`).
    fail_next: std::sync::atomic::AtomicBool,
    /// Why the last failed capture failed.
    capture_error: Option<String>,
    /// Decode steps started and not yet collected (crate::overlap).
    pub(crate) overlap: crate::overlap::Overlap,
    /// The buffer step graphs and fused speculative steps write their logits into, shared
    /// (crate::shared_logits).
    pub(crate) logits: LogitsPool<CudaSlice<f32>>,
    /// The same for the drafter's logits (draft-pass graphs, and fused steps beside `logits`).
    pub(crate) draft_logits: LogitsPool<CudaSlice<f32>>,
    /// The page-locked buffer logits are brought to the host through (`fetch_logits`).
    pub(crate) host_logits: Option<PinnedHostSlice<f32>>,
}

/// Sequence counts a draft-pass graph is captured for (each holds logits for every draft row,
/// so larger batches draft eagerly).
pub(crate) const DRAFT_SEQ_BUCKETS: [usize; 5] = [1, 2, 4, 8, 16];

pub(crate) struct DraftGraph {
    meta: DraftMeta,
    /// The draft logits the graph writes (a view of the shared buffer, which it keeps alive).
    logits: SharedLogits,
    ids: CudaSlice<i32>,
    graph: Graph,
}

/// `tune_one_token_step`: replays of each candidate's batch-1 step between two events, and
/// rounds of both in turn (medians kept). ~0.1 s at load for an 18-layer Flash on the H100.
const STEP_TUNE_REPLAYS: usize = 8;
const STEP_TUNE_ROUNDS: usize = 7;

impl Graphs {
    /// `vocab`: logits a row (the shared buffers' first size is the largest decode bucket's).
    pub(crate) fn new(capturable: bool, vocab: usize) -> Graphs {
        let enabled = capturable;
        let off = std::env::var("PEREGRINE_CUDA_GRAPHS").is_ok_and(|v| v == "0");
        let floor = ROW_BUCKETS[ROW_BUCKETS.len() - 1] * vocab;
        Graphs {
            enabled: enabled && !off,
            capturable: enabled,
            cache: HashMap::new(),
            drafts: HashMap::new(),
            spec: HashMap::new(),
            failed: HashSet::new(),
            fail_next: Default::default(),
            capture_error: None,
            overlap: Default::default(),
            logits: LogitsPool::new(floor),
            draft_logits: LogitsPool::new(floor),
            host_logits: None,
        }
    }

    pub(crate) fn put_back(&mut self, g: StepGraph) {
        self.cache.insert(g.key, g);
    }

    /// Drops every graph (the KV pools they point at are being replaced), and with them the
    /// shared logits buffers.
    pub(crate) fn clear(&mut self) {
        self.overlap.break_chain();
        self.overlap.drop_awaiting();
        self.cache.clear();
        self.drafts.clear();
        self.spec.clear();
        self.logits.clear();
        self.draft_logits.clear();
        self.host_logits = None;
        // Memory a capture lacked may be there with the new pools.
        self.failed.clear();
    }

    /// Records a failed capture: that shape runs eagerly from now on, the other graphs stay.
    pub(crate) fn capture_failed(&mut self, what: Capture, e: &Error) {
        tracing::warn!(?what, "CUDA graph capture failed; this shape runs eagerly from now on: {e}");
        self.failed.insert(what);
        self.capture_error = Some(e.to_string());
    }

    /// Whether `what`'s capture failed.
    pub(crate) fn has_failed(&self, what: Capture) -> bool {
        self.failed.contains(&what)
    }

    /// Device bytes of the logits buffers held for graphs: the cached graphs' and the pools'
    /// current ones, each shared buffer once.
    pub(crate) fn logits_bytes(&self) -> usize {
        let steps = self.cache.values().map(|g| g.logits.owner());
        let drafts = self.drafts.values().map(|g| g.logits.owner());
        let spec = self.spec.values().flat_map(|s| s.logits_owners());
        let pools = self.logits.current().into_iter().chain(self.draft_logits.current());
        crate::shared_logits::distinct_bytes(steps.chain(drafts).chain(spec).chain(pools))
    }

    pub(crate) fn len(&self) -> usize {
        self.cache.len() + self.drafts.len() + self.spec.values().filter(|s| s.captured()).count()
    }
}

impl CudaModel {
    /// Turns decode-step graphs on or off (they stay off for models that cannot be captured).
    pub fn set_cuda_graphs(&mut self, on: bool) {
        self.graphs.enabled = on && self.graphs.capturable;
    }

    /// How many decode-step graphs have been captured and are cached.
    pub fn cuda_graphs(&self) -> usize {
        self.graphs.len()
    }

    /// Device bytes of the logits buffers held for graphs (the cached graphs' and the pools'
    /// current buffers): every graph's logits are a view of a buffer they share
    /// (crate::shared_logits), each counted once.
    pub fn graph_logits_bytes(&self) -> usize {
        self.graphs.logits_bytes()
    }

    /// For tests of the fallback: the next graph capture fails while capturing, as a capture
    /// that runs out of memory does.
    pub fn fail_next_capture(&self) {
        self.graphs.fail_next.store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// How many of the cached decode-step graphs sample their rows (`Op::Sample`).
    pub fn sampling_graphs(&self) -> usize {
        self.graphs.cache.keys().filter(|k| k.sampled).count()
    }

    /// Captures what `body` launches on the stream as an instantiated, uploaded graph. The
    /// capture is ended even when `body` fails, so the stream is usable again.
    pub(crate) fn record(&self, body: impl FnOnce() -> Result<()>) -> Result<Graph> {
        let st = &self.stream;
        // Buffers from the capture pool: no memory nodes between the kernels (crate::alloc).
        // Its allocations on the side stream are calls the thread-local capture mode refuses
        // from the capturing thread, so the capture is relaxed. PEREGRINE_CAPTURE_POOL=0 (for
        // measurements) allocates on the captured stream: memory nodes, as before the pool.
        let pool = std::env::var("PEREGRINE_CAPTURE_POOL").map_or(true, |v| v != "0");
        if pool {
            self.kernels.alloc.prepare()?;
        }
        let mode = if pool { CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED } else { CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL };
        st.begin_capture(mode).map_err(drv)?;
        let body = || match self.graphs.fail_next.swap(false, std::sync::atomic::Ordering::Relaxed) {
            true => Err(Error::Backend("a capture failure asked for by fail_next_capture".into())),
            false => body(),
        };
        let body = if pool { self.kernels.alloc.while_capturing(body) } else { body() };
        let graph = st.end_capture(CUgraphInstantiate_flags(0));
        body?;
        let graph = graph.map_err(drv)?.ok_or_else(|| Error::Backend("CUDA graph capture produced no graph".into()))?;
        let kinds = NodeKinds::of(&graph)?;
        if kinds.non_kernel() > 0 {
            tracing::debug!(?kinds, "a captured graph holds nodes other than kernels (their neighbours lose PDL)");
        }
        graph.upload().map_err(drv)?;
        Ok(Graph(graph, kinds))
    }

    /// Launches the graph for `rows` (capturing it first if needed) with the rows' inputs, or
    /// None when the batch runs eagerly. The caller reads `logits`/`ids` and puts it back.
    /// `sampling` (one entry per row; `graph_samples` says when): the graph that samples the
    /// rows with these parameters, its `ids` the samples.
    pub(crate) fn graph_for(&mut self, rows: &HostRows, sampling: Option<&[RowSampling]>) -> Result<Option<StepGraph>> {
        // A replay may overwrite the ids a chained step reads (crate::overlap; enqueue_decode
        // reads them before and names its own after).
        self.graphs.overlap.break_chain();
        let Some(key) = self.graph_key(rows, sampling.is_some()) else { return Ok(None) };
        if sampling.is_some_and(|p| p.len() != rows.toks.len()) {
            return Err(Error::Backend(format!("{} sampling rows for a graph step of {} rows", sampling.map_or(0, <[_]>::len), rows.toks.len())));
        }
        let (bucket, width) = (key.rows, key.width);
        let mut g = match self.graphs.cache.remove(&key) {
            Some(g) => g,
            None => match self.shared_logits(false, key.rows).and_then(|logits| self.capture_graph(key, logits)) {
                Ok(g) => g,
                Err(e) => {
                    self.graphs.capture_failed(Capture::Step(key), &e);
                    return Ok(None);
                }
            },
        };
        g.slot = None;
        if g.meta.stage.is_some() != rows.stage.is_some() {
            self.graphs.put_back(g);
            return Err(Error::Backend("a decode graph's rows and its drafter context staging disagree".into()));
        }
        match (g.meta.staged.as_mut(), g.fetch.as_mut()) {
            (Some(staged), Some(fetch)) => {
                let a = self.row_arrays(bucket, width, rows, sampling)?;
                let s = staged.write(&a.bytes())?;
                fetch.point_at(&g.graph.0, staged.src(s))?;
                g.graph.0.launch().map_err(drv)?;
                staged.launched(s, &self.stream)?;
                g.slot = Some(s);
            }
            _ => {
                self.write_row_meta(&mut g.meta, bucket, width, rows, sampling)?;
                g.graph.0.launch().map_err(drv)?;
            }
        }
        Ok(Some(g))
    }

    /// The graph `rows` would replay (the one that samples them when `sampled`), or None when
    /// they run eagerly (graphs off, more rows than the largest bucket, rows without logits, a
    /// shape whose capture failed).
    pub(crate) fn graph_key(&self, rows: &HostRows, sampled: bool) -> Option<GraphKey> {
        self.bucket_key(rows, sampled).filter(|&key| !self.graphs.has_failed(Capture::Step(key)))
    }

    /// `graph_key`, failed captures included.
    fn bucket_key(&self, rows: &HostRows, sampled: bool) -> Option<GraphKey> {
        let n = rows.toks.len();
        if !self.graphs.enabled || rows.want.len() != n {
            return None;
        }
        let bucket = *ROW_BUCKETS.iter().find(|&&b| b >= n)?;
        Some(GraphKey { rows: bucket, width: rows.max_blocks.next_power_of_two().max(8), decode: rows.one_per_seq, sampled })
    }

    /// Whether the graph for `key` is captured already.
    pub(crate) fn graph_captured(&self, key: &GraphKey) -> bool {
        self.graphs.cache.contains_key(key)
    }

    /// Whether a step sampled with `adjust` samples inside its graph (`Op::Sample`): when it
    /// has no logit adjustments (bias and penalties go through the greedy graph's logits and
    /// the sampler after it) and `PEREGRINE_GRAPH_SAMPLING` is not 0.
    pub(crate) fn graph_samples(&self, adjust: &[peregrine_core::backend::LogitAdjust]) -> bool {
        self.graph_sampling && adjust.is_empty()
    }

    /// The node kinds of the decode-step graph `batch` replays (capturing it if needed; this
    /// runs the step once), or None when the batch runs eagerly.
    pub fn graph_node_kinds(&mut self, batch: &[peregrine_core::backend::SeqForward]) -> Result<Option<NodeKinds>> {
        let rows = self.bench_rows(batch)?;
        let Some(g) = self.graph_for(&rows, None)? else {
            return match (self.bucket_key(&rows, false), &self.graphs.capture_error) {
                (Some(key), Some(e)) if self.graphs.has_failed(Capture::Step(key)) => Err(Error::Backend(format!("graph capture failed: {e}"))),
                _ => Ok(None),
            };
        };
        let kinds = g.graph.1.clone();
        self.graphs.put_back(g);
        Ok(Some(kinds))
    }

    /// The rows of a benchmark's replays: a decode step that stages the drafter's context
    /// stages every row in the scratch ring row, so replays touch no sequence's ring.
    fn bench_rows(&self, batch: &[peregrine_core::backend::SeqForward]) -> Result<HostRows> {
        let mut rows = self.host_rows(batch)?;
        if let Some(s) = &self.draft_staging {
            if rows.one_per_seq && rows.toks.len() <= crate::draft_staging::STAGE_SEQS {
                rows.stage = Some(vec![s.table.scratch_row(); rows.toks.len()]);
            }
        }
        Ok(rows)
    }

    /// For benchmarks: the GPU time of one replay of `batch`'s decode-step graph, from `n`
    /// replays launched back to back between CUDA events (inputs written once), so a step's
    /// wall time can be split into the graph and the host work around it. None when the batch
    /// runs eagerly.
    pub fn graph_replay_ms(&mut self, batch: &[peregrine_core::backend::SeqForward], n: usize) -> Result<Option<f32>> {
        use cudarc::driver::sys::CUevent_flags;
        let rows = self.bench_rows(batch)?;
        let Some(g) = self.graph_for(&rows, None)? else { return Ok(None) };
        let st = self.stream.clone();
        let ev = || st.context().new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).map_err(drv);
        let (e0, e1) = (ev()?, ev()?);
        let timed = (|| {
            e0.record(&st).map_err(drv)?;
            for _ in 0..n {
                g.graph.0.launch().map_err(drv)?;
            }
            e1.record(&st).map_err(drv)?;
            st.synchronize().map_err(drv)?;
            e0.elapsed_ms(&e1).map_err(drv)
        })();
        self.graphs.put_back(g);
        Ok(Some(timed? / n.max(1) as f32))
    }

    /// For benchmarks: two settings of the model compared in one process, so their difference
    /// is not lost in the spread between processes (clocks, placement). `set(model, b)` applies
    /// setting A (false) or B (true) and must drop the captured graphs; one graph of `batch` is
    /// captured under each, then `rounds` rounds replay A then B `n` times each between CUDA
    /// events. Returns each round's ms per replay of A and of B (None when the batch runs
    /// eagerly); the model is left in setting A.
    pub fn graph_ab_ms(&mut self, batch: &[peregrine_core::backend::SeqForward], n: usize, rounds: usize, set: impl Fn(&mut Self, bool)) -> Result<Option<(Vec<f32>, Vec<f32>)>> {
        use cudarc::driver::sys::CUevent_flags;
        let mut graphs = Vec::new();
        for b in [false, true] {
            set(self, b);
            let rows = self.bench_rows(batch)?;
            match self.graph_for(&rows, None)? {
                Some(g) => graphs.push(g),
                None => {
                    set(self, false);
                    return Ok(None);
                }
            }
        }
        set(self, false);
        let st = self.stream.clone();
        let ev = || st.context().new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).map_err(drv);
        let (e0, e1) = (ev()?, ev()?);
        let mut times = (Vec::with_capacity(rounds), Vec::with_capacity(rounds));
        for _ in 0..rounds {
            for (gi, g) in graphs.iter().enumerate() {
                e0.record(&st).map_err(drv)?;
                for _ in 0..n {
                    g.graph.0.launch().map_err(drv)?;
                }
                e1.record(&st).map_err(drv)?;
                st.synchronize().map_err(drv)?;
                let ms = e0.elapsed_ms(&e1).map_err(drv)? / n.max(1) as f32;
                if gi == 0 { &mut times.0 } else { &mut times.1 }.push(ms);
            }
        }
        Ok(Some(times))
    }

    /// Chooses the MoE kernel for one token by timing whole batch-1 decode steps, once the KV
    /// cache exists. `tune_moe` times kernels alone with the routing given, but the fused kernel
    /// routes inside itself while the tiled kernels need the post-attention norm, the router
    /// GEMV and `moe_route` as launches of their own, which only a step pays
    /// (`moe_tune::ONE_TOKEN_ROUTING_MS`, the H100's measure of that, decides until here). So the
    /// fastest fused and the fastest tiled kernel alone (`one_token_finalists`) each run a
    /// captured batch-1 step, alternating over `STEP_TUNE_ROUNDS` rounds, and the faster median
    /// is kept. The step is the scratch block's (past the last of each pool, which padding rows
    /// use), so no sequence's K/V is touched; captures that fail here leave no mark.
    pub(crate) fn tune_one_token_step(&mut self) -> Result<()> {
        let (Some((fused, tiled)), Some(cfg)) = (self.one_token_finalists.take(), self.kv_config) else { return Ok(()) };
        if std::env::var("PEREGRINE_MOE_STEP_TUNE").is_ok_and(|v| v == "0") || !self.graphs.enabled {
            return Ok(());
        }
        let Some(prior) = self.first_moe().and_then(|(w, k)| self.kernels.tuned_moe(w, k, 1)) else { return Ok(()) };
        let pin = |m: &mut Self, kind: crate::MoeKernel| {
            if let Some((w, k)) = m.first_moe() {
                m.kernels.pin_moe(w, k, 1, kind);
            }
            m.graphs.clear();
        };
        let batch = [peregrine_core::backend::SeqForward {
            seq_id: u64::MAX,
            tokens: vec![0],
            start_pos: 0,
            full_blocks: vec![cfg.num_full_blocks as u32],
            swa_blocks: vec![cfg.num_swa_blocks as u32],
            output: peregrine_core::backend::OutputRows::Last,
        }];
        let failed = self.graphs.failed.clone();
        let t0 = std::time::Instant::now();
        let timed = self.graph_ab_ms(&batch, STEP_TUNE_REPLAYS, STEP_TUNE_ROUNDS, |m, b| pin(m, if b { tiled } else { fused }));
        self.graphs.failed = failed;
        let median = |mut v: Vec<f32>| {
            v.sort_by(f32::total_cmp);
            v[v.len() / 2]
        };
        match timed {
            Ok(Some((a, b))) => {
                let (fused_ms, tiled_ms) = (median(a), median(b));
                let kept = if tiled_ms < fused_ms { tiled } else { fused };
                pin(self, kept);
                self.one_token_step_ms = Some((fused_ms, tiled_ms, kept));
                tracing::info!(
                    "one-token MoE kernel timed as batch-1 steps in {:.2} s: {fused:?} {fused_ms:.4} ms, {tiled:?} {tiled_ms:.4} ms; kept {kept:?} (alone the tuner had {prior:?})",
                    t0.elapsed().as_secs_f64()
                );
                Ok(())
            }
            other => {
                pin(self, prior);
                other.map(|_| ())
            }
        }
    }

    /// A view of `rows` rows in the shared buffer of step logits (`draft`: of draft logits),
    /// which grows when it holds fewer.
    pub(crate) fn shared_logits(&mut self, draft: bool, rows: usize) -> Result<SharedLogits> {
        let n = rows * self.spec.vocab_size;
        let kernels = &self.kernels;
        let pool = if draft { &mut self.graphs.draft_logits } else { &mut self.graphs.logits };
        let owner = pool.get(n, CudaSlice::len, |len| kernels.zeros(len))?;
        Ok(SharedLogits::new(owner, n))
    }

    fn capture_graph(&self, key: GraphKey, mut logits: SharedLogits) -> Result<StepGraph> {
        let GraphKey { rows, width, decode, sampled } = key;
        // Decode graphs stage the drafter's context features where deferral is on.
        let stage = decode && self.draft_staging.is_some();
        let meta = self.alloc_row_meta(rows, width, self.copy_free_rows, sampled, stage)?;
        let mut ids = self.stream.alloc_zeros::<i32>(rows).map_err(drv)?;
        let plan = if sampled { self.sampled_step_plan(rows, decode) } else { self.step_plan(rows, None, decode) };
        let graph = self.record(|| self.execute(&plan, &meta, None, &mut logits, &mut ids))?;
        let fetch = match &meta.staged {
            Some(s) => Some(crate::staged::FetchNode::find(&graph.0, &self.ops.fetch_staged, s, &self.stream)?),
            None => None,
        };
        tracing::debug!(rows, width, sampled, graphs = self.graphs.len() + 1, copy_free = fetch.is_some(), "captured a decode-step CUDA graph");
        Ok(StepGraph { key, meta, logits, ids, graph, fetch, slot: None })
    }

    /// Static per-row buffers for `rows` rows and block tables `width` wide; `staged`: with
    /// slots in mapped host memory that a copy-free graph reads them from (crate::staged);
    /// `sampled`: with the rows' sampling parameters (`Op::Sample`); `stage`: with the rows'
    /// ring rows for the drafter's context (crate::draft_staging).
    pub(crate) fn alloc_row_meta(&self, rows: usize, width: usize, staged: bool, sampled: bool, stage: bool) -> Result<RowMeta> {
        let st = &self.stream;
        let bs = self.kv_config.map_or(1, |c| c.block_size);
        let z32 = |n: usize| st.alloc_zeros::<i32>(n).map_err(drv);
        let z64 = |n: usize| st.alloc_zeros::<i64>(n).map_err(drv);
        let mut m = RowMeta {
            tok: z32(rows)?,
            pos: z32(rows)?,
            seq: z32(rows)?,
            full_slots: z64(rows)?,
            swa_slots: z64(rows)?,
            full_tables: z32(rows * width)?,
            swa_tables: z32(rows * width)?,
            chain: Some(st.alloc_zeros::<u64>(1).map_err(drv)?),
            staged: None,
            sampling: if sampled { Some(st.clone_htod(&device_sampling_rows(&[], rows)).map_err(drv)?) } else { None },
            stage: if stage { Some(z32(rows)?) } else { None },
            max_blocks: width,
            block_size: bs,
            prefill: None,
        };
        if staged {
            use crate::staged::array;
            let chain = m.chain.as_ref().ok_or_else(|| Error::Backend("row meta without its chain word".into()))?;
            // The order of `RowArrays::bytes`.
            let mut arrays = vec![array(&m.tok, st), array(&m.pos, st), array(&m.seq, st), array(&m.full_slots, st), array(&m.swa_slots, st), array(&m.full_tables, st), array(&m.swa_tables, st), array(chain, st)];
            if let Some(p) = &m.sampling {
                arrays.push(array(p, st));
            }
            if let Some(p) = &m.stage {
                arrays.push(array(p, st));
            }
            // Page-locked memory refused: this graph copies its rows instead.
            m.staged = match crate::staged::StagedRows::new(st, &arrays, rows) {
                Ok(s) => Some(s),
                Err(e) => {
                    tracing::warn!("no mapped host memory for a decode graph's rows, copying them instead: {e}");
                    None
                }
            };
        }
        Ok(m)
    }

    /// A graph step's row data as its static buffers take it (`bucket` rows, tables `width`
    /// wide; with `sampling`, the rows' parameters, padding rows greedy); padding rows read and
    /// write only the scratch block that `init_kv` reserves past the last block of each pool.
    fn row_arrays(&self, bucket: usize, width: usize, rows: &HostRows, sampling: Option<&[RowSampling]>) -> Result<RowArrays> {
        let cfg = self.kv_config.ok_or_else(|| Error::Backend("forward before init_kv".into()))?;
        let bs = cfg.block_size as i64;
        let (scratch_full, scratch_swa) = (cfg.num_full_blocks as i32, cfg.num_swa_blocks as i32);
        let n = rows.toks.len();
        if n > bucket || rows.max_blocks > width {
            return Err(Error::Backend(format!("{n} rows of {} blocks for a graph of {bucket} rows of {width}", rows.max_blocks)));
        }
        let pad = |v: &[i32], fill: i32| -> Vec<i32> { v.iter().copied().chain(std::iter::repeat(fill)).take(bucket).collect() };
        let pad64 = |v: &[i64], fill: i64| -> Vec<i64> { v.iter().copied().chain(std::iter::repeat(fill)).take(bucket).collect() };
        // One table per row (rows of a sequence share its table).
        let tables = |src: &[i32], scratch: i32| -> Vec<i32> {
            let mut t = vec![scratch; bucket * width];
            for r in 0..n {
                let s = rows.seq[r] as usize;
                t[r * width..r * width + rows.max_blocks].copy_from_slice(&src[s * rows.max_blocks..(s + 1) * rows.max_blocks]);
            }
            t
        };
        Ok(RowArrays {
            tok: pad(&rows.toks, 0),
            pos: pad(&rows.pos, 0),
            seq: (0..bucket as i32).collect(),
            full_slots: pad64(&rows.full_slots, scratch_full as i64 * bs),
            swa_slots: pad64(&rows.swa_slots, scratch_swa as i64 * bs),
            full_tables: tables(&rows.full_tables, scratch_full),
            swa_tables: tables(&rows.swa_tables, scratch_swa),
            chain: rows.chain,
            sampling: sampling.map(|p| device_sampling_rows(p, bucket)),
            // Padding rows stage into the scratch ring row.
            stage: rows.stage.as_deref().map(|v| pad(v, self.draft_staging.as_ref().map_or(0, |s| s.table.scratch_row()))),
        })
    }

    /// The rows' inputs copied into a graph's static buffers (`bucket` rows, tables `width`
    /// wide; `sampling` for a graph that samples), one copy per array (graphs that are not
    /// copy-free).
    pub(crate) fn write_row_meta(&self, m: &mut RowMeta, bucket: usize, width: usize, rows: &HostRows, sampling: Option<&[RowSampling]>) -> Result<()> {
        if sampling.is_some() != m.sampling.is_some() {
            return Err(Error::Backend("sampling parameters for a graph that does not sample, or none for one that does".into()));
        }
        let a = self.row_arrays(bucket, width, rows, sampling)?;
        let st = &self.stream;
        st.memcpy_htod(&a.tok, &mut m.tok).map_err(drv)?;
        st.memcpy_htod(&a.pos, &mut m.pos).map_err(drv)?;
        st.memcpy_htod(&a.seq, &mut m.seq).map_err(drv)?;
        st.memcpy_htod(&a.full_slots, &mut m.full_slots).map_err(drv)?;
        st.memcpy_htod(&a.swa_slots, &mut m.swa_slots).map_err(drv)?;
        st.memcpy_htod(&a.full_tables, &mut m.full_tables).map_err(drv)?;
        st.memcpy_htod(&a.swa_tables, &mut m.swa_tables).map_err(drv)?;
        if let (Some(addr), Some(c)) = (a.chain, m.chain.as_mut()) {
            st.memcpy_htod(&[addr], c).map_err(drv)?;
        }
        if let (Some(p), Some(d)) = (&a.sampling, m.sampling.as_mut()) {
            st.memcpy_htod(p, d).map_err(drv)?;
        }
        if let (Some(p), Some(d)) = (&a.stage, m.stage.as_mut()) {
            st.memcpy_htod(p, d).map_err(drv)?;
        }
        Ok(())
    }
}

/// A graph step's row data on the host, padded to its graph's buffers (`row_arrays`).
struct RowArrays {
    tok: Vec<i32>,
    pos: Vec<i32>,
    seq: Vec<i32>,
    full_slots: Vec<i64>,
    swa_slots: Vec<i64>,
    full_tables: Vec<i32>,
    swa_tables: Vec<i32>,
    /// A chained step's ids address (crate::overlap).
    chain: Option<u64>,
    /// A graph that samples: every row's parameters.
    sampling: Option<Vec<DeviceRowSampling>>,
    /// A graph that stages the drafter's context: every row's ring row.
    stage: Option<Vec<i32>>,
}

impl RowArrays {
    /// The arrays' bytes in the order of `alloc_row_meta`'s staged layout (the chain address 0
    /// when the step chains on none: only negative tokens read it).
    fn bytes(&self) -> Vec<&[u8]> {
        fn b<T>(v: &[T]) -> &[u8] {
            // SAFETY: plain integers and floats (the sampling parameters: #[repr(C)], no
            // padding), read as the bytes they are.
            unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, std::mem::size_of_val(v)) }
        }
        let chain: &[u64] = match &self.chain {
            Some(c) => std::slice::from_ref(c),
            None => &[0],
        };
        let mut a = vec![b(&self.tok), b(&self.pos), b(&self.seq), b(&self.full_slots), b(&self.swa_slots), b(&self.full_tables), b(&self.swa_tables), b(chain)];
        if let Some(p) = &self.sampling {
            a.push(b(p));
        }
        if let Some(p) = &self.stage {
            a.push(b(p));
        }
        a
    }
}

impl CudaModel {
    /// Runs a draft pass through its captured graph (capturing it first if needed) and returns
    /// the draft ids of the real rows; None when the batch drafts eagerly (graphs off, sequences
    /// asking for different numbers of drafts, or more sequences than the largest bucket).
    pub(crate) fn draft_graph_run(&mut self, rows: &DraftRows) -> Result<Option<Vec<i32>>> {
        let seqs = rows.seq_nb.len();
        let Some(&nb) = rows.seq_nb.first() else { return Ok(None) };
        if !self.graphs.enabled || rows.seq_nb.iter().any(|&x| x != nb) {
            return Ok(None);
        }
        let Some(&bucket) = DRAFT_SEQ_BUCKETS.iter().find(|&&b| b >= seqs) else { return Ok(None) };
        let (nb, width) = (nb as usize, rows.max_blocks.next_power_of_two().max(8));
        let key = (bucket, nb, width);
        if self.graphs.has_failed(Capture::Draft(key)) {
            return Ok(None);
        }
        let mut g = match self.graphs.drafts.remove(&key) {
            Some(g) => g,
            None => match self.shared_logits(true, bucket * (nb - 1)).and_then(|logits| self.capture_draft(key, logits)) {
                Ok(g) => g,
                Err(e) => {
                    self.graphs.capture_failed(Capture::Draft(key), &e);
                    return Ok(None);
                }
            },
        };
        let res = self.write_draft_meta(&mut g.meta, key, rows).and_then(|_| {
            g.graph.0.launch().map_err(drv)?;
            self.stream.clone_dtoh(&g.ids.slice(..seqs * (nb - 1))).map_err(drv)
        });
        self.graphs.drafts.insert(key, g);
        res.map(Some)
    }

    fn capture_draft(&self, key: (usize, usize, usize), mut logits: SharedLogits) -> Result<DraftGraph> {
        let (seqs, nb, width) = key;
        let (n, k) = (seqs * nb, seqs * (nb - 1));
        let meta = self.alloc_draft_meta(seqs, nb, width)?;
        let mut ids = self.stream.alloc_zeros::<i32>(k.max(1)).map_err(drv)?;
        let graph = self.record(|| self.draft_body(&meta, n, k, k, &mut logits, &mut ids))?;
        tracing::debug!(seqs, nb, width, "captured a draft-pass CUDA graph");
        Ok(DraftGraph { meta, logits, ids, graph })
    }

    /// Static draft-pass buffers for `seqs` sequences of `nb` block rows, tables `width` wide.
    pub(crate) fn alloc_draft_meta(&self, seqs: usize, nb: usize, width: usize) -> Result<DraftMeta> {
        let st = &self.stream;
        let (n, k) = (seqs * nb, seqs * (nb - 1));
        let z = |len: usize| st.alloc_zeros::<i32>(len.max(1)).map_err(drv);
        Ok(DraftMeta {
            tok: z(n)?,
            row_seq: z(n)?,
            row_idx: z(n)?,
            pos: z(n)?,
            mask_rows: z(k)?,
            want: z(k)?,
            seq_start: z(seqs)?,
            seq_first: z(seqs)?,
            seq_nb: z(seqs)?,
            tables: z(seqs * width)?,
            max_blocks: width,
            seqs,
            max_nb: nb,
        })
    }

    /// The draft rows into a graph's static buffers (`key`: sequences, block rows, table
    /// width); padding sequences draft from position 0 with no context, their K/V reads pointed
    /// at the scratch block.
    pub(crate) fn write_draft_meta(&self, m: &mut DraftMeta, key: (usize, usize, usize), r: &DraftRows) -> Result<()> {
        let (seqs, nb, width) = key;
        let cfg = self.kv_config.ok_or_else(|| Error::Backend("draft before init_kv".into()))?;
        let mask = self.drafter.as_ref().map_or(0, |d| d.spec.mask_token_id as i32);
        let real = r.seq_nb.len();
        let n = seqs * nb;
        let mut toks = r.toks.clone();
        let (mut row_seq, mut row_idx, mut pos) = (r.row_seq.clone(), r.row_idx.clone(), r.pos.clone());
        for si in real..seqs {
            for k in 0..nb {
                toks.push(if k == 0 { 0 } else { mask });
                row_seq.push(si as i32);
                row_idx.push(k as i32);
                pos.push(k as i32);
            }
        }
        let blocks: Vec<i32> = (0..seqs).flat_map(|si| (1..nb).map(move |k| (si * nb + k) as i32)).collect();
        let mut tables = vec![cfg.num_full_blocks as i32; seqs * width];
        for si in 0..real {
            tables[si * width..si * width + r.max_blocks].copy_from_slice(&r.tables[si * r.max_blocks..(si + 1) * r.max_blocks]);
        }
        let pad = |v: &[i32], fill: i32| -> Vec<i32> { v.iter().copied().chain(std::iter::repeat(fill)).take(seqs).collect() };
        let st = &self.stream;
        debug_assert_eq!(toks.len(), n);
        st.memcpy_htod(&toks, &mut m.tok).map_err(drv)?;
        st.memcpy_htod(&row_seq, &mut m.row_seq).map_err(drv)?;
        st.memcpy_htod(&row_idx, &mut m.row_idx).map_err(drv)?;
        st.memcpy_htod(&pos, &mut m.pos).map_err(drv)?;
        st.memcpy_htod(&blocks, &mut m.mask_rows).map_err(drv)?;
        st.memcpy_htod(&blocks, &mut m.want).map_err(drv)?;
        st.memcpy_htod(&pad(&r.seq_start, 0), &mut m.seq_start).map_err(drv)?;
        st.memcpy_htod(&(0..seqs as i32).map(|si| si * nb as i32).collect::<Vec<_>>(), &mut m.seq_first).map_err(drv)?;
        st.memcpy_htod(&vec![nb as i32; seqs], &mut m.seq_nb).map_err(drv)?;
        st.memcpy_htod(&tables, &mut m.tables).map_err(drv)?;
        Ok(())
    }
}
