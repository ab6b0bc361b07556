//! Sampling on the GPU (`kernels/sample.cu`): the rows' parameters and logit adjustments as
//! the kernels read them, and the launches that sample, adjust and compute logprobs.

// Kernel launches take their buffers and shapes explicitly.
#![allow(clippy::too_many_arguments)]

use super::*;
use peregrine_core::backend::TokenMask;

/// The sampling parameters of one row as the kernel reads them (same C layout).
#[derive(Clone, Copy)]
#[repr(transparent)]
pub(crate) struct DeviceRowSampling(RowSampling);
// SAFETY: RowSampling is #[repr(C)] plain data (f32, i32, f32, f32, f64, u32, u32), as the
// kernel's struct.
unsafe impl cudarc::driver::DeviceRepr for DeviceRowSampling {}

#[derive(Clone, Copy)]
#[repr(transparent)]
struct DeviceLogitAdjust(LogitAdjust);
// SAFETY: LogitAdjust is #[repr(C)] plain data (u32, f32, f32, f32), as the kernel's struct.
unsafe impl cudarc::driver::DeviceRepr for DeviceLogitAdjust {}

/// Tokens of a row one block of `mask_logits` takes (MASK_SPAN in kernels/sample.cu).
const MASK_SPAN: usize = 1024;

/// Threads per block of the cluster sampler (SAMPLE_CLUSTER_THREADS in kernels/sample.cu).
const SAMPLE_CLUSTER_THREADS: u32 = 512;

/// The most shared memory a block of the cluster sampler stages its slice of a row in (a
/// vocabulary of up to 8 x 40k tokens, and what the H100 has room for beside the kernel's own
/// 37 KB); larger vocabularies read the logits at every pass.
pub(super) const SAMPLE_STAGE_MAX: usize = 160 * 1024;

/// The most top logprobs a row may ask for (MAXTOP in kernels/sample.cu).
const MAXTOP: usize = peregrine_core::backend::MAX_BACKEND_TOP_LOGPROBS;

/// Words per row of `row_logprobs`' packed results: its logprob (f32 bits), the count of top
/// entries, MAXTOP ids and MAXTOP logprobs (each part for all rows in turn).
const LOGPROB_WORDS: usize = 2 + 2 * MAXTOP;

/// The rows' logprobs from `row_logprobs`' packed words (rows that asked for none: None).
fn unpack_logprobs(words: &[i32], tops: &[Option<u32>]) -> Vec<Option<RowLogprobs>> {
    let rows = tops.len();
    let (lp, count, ids, lps) = (&words[..rows], &words[rows..2 * rows], &words[2 * rows..(2 + MAXTOP) * rows], &words[(2 + MAXTOP) * rows..]);
    (0..rows)
        .map(|r| {
            tops[r].map(|_| RowLogprobs {
                logprob: f32::from_bits(lp[r] as u32),
                top: (0..count[r].clamp(0, MAXTOP as i32) as usize).map(|j| (ids[r * MAXTOP + j] as u32, f32::from_bits(lps[r * MAXTOP + j] as u32))).collect(),
            })
        })
        .collect()
}

/// The parameters of a padding row: greedy, no adjustments.
const GREEDY_ROW: RowSampling = RowSampling { temperature: 0.0, top_k: 0, top_p: 1.0, min_p: 0.0, u: 0.0, adj_start: 0, adj_len: 0 };

/// The parameters of `rows` rows as a decode graph that samples takes them (`Op::Sample`): the
/// given rows', then greedy padding rows.
pub(crate) fn device_sampling_rows(params: &[RowSampling], rows: usize) -> Vec<DeviceRowSampling> {
    params.iter().copied().chain(std::iter::repeat(GREEDY_ROW)).take(rows).map(DeviceRowSampling).collect()
}

/// Device buffers of per-row sampling parameters and logit adjustments, written before each
/// replay of a graph that samples on the GPU.
pub(crate) struct SamplingBuffers {
    params: CudaSlice<DeviceRowSampling>,
    adjust: CudaSlice<DeviceLogitAdjust>,
    rows: usize,
}

impl SamplingBuffers {
    /// Room for `rows` rows and `adjust_cap` adjustments in all.
    pub(crate) fn new(stream: &Arc<CudaStream>, rows: usize, adjust_cap: usize) -> Result<SamplingBuffers> {
        let none = LogitAdjust { token: 0, bias: 0.0, repetition: 1.0, subtract: 0.0 };
        Ok(SamplingBuffers {
            params: stream.clone_htod(&vec![DeviceRowSampling(GREEDY_ROW); rows.max(1)]).map_err(drv("upload"))?,
            adjust: stream.clone_htod(&vec![DeviceLogitAdjust(none); adjust_cap.max(1)]).map_err(drv("upload"))?,
            rows: rows.max(1),
        })
    }

    /// Writes the rows' parameters (rows past `params.len()` become greedy with no
    /// adjustments); false, writing nothing, when they do not fit or name adjustments outside
    /// `adjust`.
    pub(crate) fn write(&mut self, stream: &Arc<CudaStream>, params: &[RowSampling], adjust: &[LogitAdjust]) -> Result<bool> {
        if params.len() > self.rows || adjust.len() > self.adjust.len() || params.iter().any(|p| p.adj_start as usize + p.adj_len as usize > adjust.len()) {
            return Ok(false);
        }
        let rows = device_sampling_rows(params, self.rows);
        stream.memcpy_htod(&rows, &mut self.params).map_err(drv("upload"))?;
        if !adjust.is_empty() {
            let a: Vec<DeviceLogitAdjust> = adjust.iter().map(|&a| DeviceLogitAdjust(a)).collect();
            stream.memcpy_htod(&a, &mut self.adjust.slice_mut(..a.len())).map_err(drv("upload"))?;
        }
        Ok(true)
    }
}

impl Kernels {
    /// Samples each of the first `params.len()` rows of `logits` [rows, V] on the GPU (see
    /// kernels/sample.cu): the token ids.
    pub fn sample_rows(&self, logits: &CudaSlice<f32>, v: usize, params: &[RowSampling]) -> Result<CudaSlice<i32>> {
        self.sample_rows_on(logits, v, params, self.sample_cluster.is_some())
    }

    /// Blocks per row `sample_rows` and `row_logprobs` run (1: the one-block kernels).
    pub fn sample_blocks_per_row(&self) -> usize {
        self.sample_width
    }

    /// `sample_rows` on the cluster sampler (`cluster`, which must be loaded) or the one-block
    /// one: tests compare the two.
    pub fn sample_rows_on(&self, logits: &CudaSlice<f32>, v: usize, params: &[RowSampling], cluster: bool) -> Result<CudaSlice<i32>> {
        let rows = params.len();
        check(logits.len() >= rows * v && rows > 0, || format!("sample_rows: logits hold fewer than {rows} rows of {v}"))?;
        check(!cluster || self.sample_cluster.is_some(), || "the cluster sampler is not loaded on this GPU".into())?;
        let p = self.upload_params(params)?;
        // Written in full: the sampler writes every row's id.
        let mut out = unsafe { self.alloc.alloc::<i32>(rows) }?;
        self.launch_sample(logits, v, rows, &p, &mut out, cluster, 0)?;
        Ok(out)
    }

    fn upload_params(&self, params: &[RowSampling]) -> Result<CudaSlice<DeviceRowSampling>> {
        self.stream.clone_htod(&params.iter().map(|&r| DeviceRowSampling(r)).collect::<Vec<_>>()).map_err(drv("upload"))
    }

    /// The sampler's launch over `rows` rows of `logits` with their parameters in `params`:
    /// the cluster one (`sample_width` blocks per row, each staging its slice of the row in
    /// shared memory when it fits `sample_stage_max`) or one block of 1024 threads per row.
    /// `ids_host`: the device address of a copy-free graph's ids word (crate::staged), whose slot
    /// the ids also go to; 0: none.
    fn launch_sample(&self, logits: &CudaSlice<f32>, v: usize, rows: usize, params: &CudaSlice<DeviceRowSampling>, out: &mut CudaSlice<i32>, cluster: bool, ids_host: u64) -> Result<()> {
        let vi = v as i32;
        match (&self.sample_cluster, cluster) {
            (Some(f), true) => {
                let slice = v.div_ceil(self.sample_width) * 4;
                let staged = slice <= self.sample_stage_max;
                let mut b = crate::launch::builder(&self.stream, f);
                b.arg(logits).arg(&vi).arg(params).arg(out).arg(&(staged as i32)).arg(&ids_host);
                let cfg = LaunchConfig { grid_dim: (self.sample_width as u32, rows as u32, 1), block_dim: (SAMPLE_CLUSTER_THREADS, 1, 1), shared_mem_bytes: if staged { slice as u32 } else { 0 } };
                unsafe { b.launch(cfg) }.map(|_| ()).map_err(drv("sample_rows_cluster"))
            }
            _ => {
                let mut b = crate::launch::builder(&self.stream, &self.sample);
                b.arg(logits).arg(&vi).arg(params).arg(out).arg(&ids_host);
                unsafe { b.launch(LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (1024, 1, 1), shared_mem_bytes: 0 }) }.map(|_| ()).map_err(drv("sample_rows"))
            }
        }
    }

    /// Applies each row's logit adjustments (bias, penalties) to `logits` in place, then samples
    /// the rows.
    pub fn sample_rows_adjusted(&self, logits: &mut CudaSlice<f32>, v: usize, params: &[RowSampling], adjust: &[LogitAdjust]) -> Result<CudaSlice<i32>> {
        let rows = params.len();
        check(logits.len() >= rows * v && rows > 0, || format!("sample_rows: logits hold fewer than {rows} rows of {v}"))?;
        if !adjust.is_empty() {
            self.adjust_logits(logits, v, &self.upload_params(params)?, params, adjust)?;
        }
        self.sample_rows(logits, v, params)
    }

    /// `sample_rows_adjusted` with the rows held to their token masks after the adjustments:
    /// `masks[r]` Some(words) (`peregrine_core::backend::TokenMask`, one bit a token) sets row
    /// r's refused tokens to -inf before it is sampled; None leaves the row as it is.
    pub fn sample_rows_masked(&self, logits: &mut CudaSlice<f32>, v: usize, params: &[RowSampling], adjust: &[LogitAdjust], masks: &[Option<TokenMask>]) -> Result<CudaSlice<i32>> {
        let rows = params.len();
        check(logits.len() >= rows * v && rows > 0, || format!("sample_rows: logits hold fewer than {rows} rows of {v}"))?;
        if !adjust.is_empty() {
            self.adjust_logits(logits, v, &self.upload_params(params)?, params, adjust)?;
        }
        self.mask_logits(logits, v, masks)?;
        self.sample_rows(logits, v, params)
    }

    /// Sets every token a row's mask refuses to -inf in `logits` [rows, V] (`masks`: one entry
    /// per row, each None or `token_mask_words(V)` words); nothing is launched when no row has
    /// a mask.
    pub fn mask_logits(&self, logits: &mut CudaSlice<f32>, v: usize, masks: &[Option<TokenMask>]) -> Result<()> {
        let rows = masks.len();
        let words = peregrine_core::backend::token_mask_words(v);
        check(logits.len() >= rows * v, || format!("mask_logits: logits hold fewer than {rows} rows of {v}"))?;
        if let Some(m) = masks.iter().flatten().find(|m| m.len() != words) {
            return Err(Error::Backend(format!("a token mask of {} words for a vocabulary of {v} ({words} words)", m.len())));
        }
        if masks.iter().all(Option::is_none) {
            return Ok(());
        }
        let mut at = Vec::with_capacity(rows);
        let mut flat = Vec::with_capacity(words * masks.iter().flatten().count());
        for m in masks {
            at.push(match m {
                Some(m) => {
                    let a = i32::try_from(flat.len()).map_err(|_| Error::Backend("token masks past 2^31 words".into()))?;
                    flat.extend_from_slice(m);
                    a
                }
                None => -1,
            });
        }
        let at = self.stream.clone_htod(&at).map_err(drv("upload"))?;
        let flat = self.stream.clone_htod(&flat).map_err(drv("upload"))?;
        let vi = v as i32;
        let mut b = crate::launch::builder(&self.stream, &self.mask);
        b.arg(&mut *logits).arg(&vi).arg(&at).arg(&flat);
        let blocks = v.div_ceil(MASK_SPAN) as u32;
        unsafe { b.launch(LaunchConfig { grid_dim: (blocks, rows as u32, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }) }.map(|_| ()).map_err(drv("mask_logits"))
    }

    /// Applies the rows' adjustments (`params` uploaded as `p`) to `logits` in place.
    fn adjust_logits(&self, logits: &mut CudaSlice<f32>, v: usize, p: &CudaSlice<DeviceRowSampling>, params: &[RowSampling], adjust: &[LogitAdjust]) -> Result<()> {
        check(params.iter().all(|p| (p.adj_start as usize + p.adj_len as usize) <= adjust.len()), || "sampling rows name adjustments out of range".into())?;
        let a = self.stream.clone_htod(&adjust.iter().map(|&a| DeviceLogitAdjust(a)).collect::<Vec<_>>()).map_err(drv("upload"))?;
        let vi = v as i32;
        let mut b = crate::launch::builder(&self.stream, &self.adjust);
        b.arg(&mut *logits).arg(&vi).arg(p).arg(&a);
        unsafe { b.launch(LaunchConfig { grid_dim: (params.len() as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }) }.map(|_| ()).map_err(drv("adjust_logits"))
    }

    /// Log-probabilities under the raw logits (see kernels/sample.cu `row_logprobs`) of the first
    /// `tops.len()` rows of `logits` [rows, V]: for each row with `tops[r]` Some(n), the logprob
    /// of token `chosen[r]` and the n (at most MAX_BACKEND_TOP_LOGPROBS) most likely tokens.
    pub fn row_logprobs(&self, logits: &CudaSlice<f32>, v: usize, chosen: &CudaSlice<i32>, tops: &[Option<u32>]) -> Result<Vec<Option<RowLogprobs>>> {
        let rows = tops.len();
        check(rows > 0 && chosen.len() >= rows, || format!("row_logprobs: {rows} rows"))?;
        // Written where read: every row that asks for logprobs gets all its words.
        let out = unsafe { self.alloc.alloc::<i32>(rows * LOGPROB_WORDS) }?;
        let (c, o) = (chosen.device_ptr(&self.stream).0, out.device_ptr(&self.stream).0);
        self.launch_logprobs(logits, v, c, tops, o)?;
        Ok(unpack_logprobs(&self.stream.clone_dtoh(&out).map_err(drv("download"))?, tops))
    }

    /// `row_logprobs`' launch: chosen ids at device address `chosen`, results packed from device
    /// address `out` (`unpack_logprobs` reads them).
    fn launch_logprobs(&self, logits: &CudaSlice<f32>, v: usize, chosen: u64, tops: &[Option<u32>], out: u64) -> Result<()> {
        let rows = tops.len();
        check(rows > 0 && logits.len() >= rows * v, || format!("row_logprobs: {rows} rows"))?;
        check(tops.iter().flatten().all(|&n| n as usize <= MAXTOP), || format!("row_logprobs: at most {MAXTOP} top logprobs"))?;
        let t: Vec<i32> = tops.iter().map(|t| t.map_or(-1, |n| n as i32)).collect();
        let td = self.stream.clone_htod(&t).map_err(drv("upload"))?;
        let vi = v as i32;
        let word = std::mem::size_of::<i32>() as u64;
        let (lp, count, ids, lps) = (out, out + (rows as u64) * word, out + (2 * rows) as u64 * word, out + ((2 + MAXTOP) * rows) as u64 * word);
        let (f, cfg) = match &self.logprobs_cluster {
            Some(f) => (f, LaunchConfig { grid_dim: (self.sample_width as u32, rows as u32, 1), block_dim: (SAMPLE_CLUSTER_THREADS, 1, 1), shared_mem_bytes: 0 }),
            None => (&self.logprobs, LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (1024, 1, 1), shared_mem_bytes: 0 }),
        };
        let mut b = crate::launch::builder(&self.stream, f);
        b.arg(logits).arg(&vi).arg(&chosen).arg(&td).arg(&lp).arg(&ids).arg(&lps).arg(&count);
        unsafe { b.launch(cfg) }.map_err(drv("row_logprobs"))
    }

    /// Samples like `sample_rows_adjusted` without touching `logits` (adjustments go to a copy
    /// when there are any), then the logprobs of the sampled tokens under the raw logits: the
    /// ids and the logprobs come back in one download.
    pub fn sample_rows_with_logprobs(&self, logits: &CudaSlice<f32>, v: usize, params: &[RowSampling], adjust: &[LogitAdjust], tops: &[Option<u32>]) -> Result<(Vec<i32>, Vec<Option<RowLogprobs>>)> {
        let rows = params.len();
        check(tops.len() == rows, || format!("{} logprobs entries for {rows} sampling rows", tops.len()))?;
        check(logits.len() >= rows * v && rows > 0, || format!("sample_rows: logits hold fewer than {rows} rows of {v}"))?;
        let p = self.upload_params(params)?;
        // The ids, then the logprobs' words (written in full where read).
        let mut out = unsafe { self.alloc.alloc::<i32>(rows * (1 + LOGPROB_WORDS)) }?;
        let cluster = self.sample_cluster.is_some();
        if adjust.is_empty() {
            self.launch_sample(logits, v, rows, &p, &mut out, cluster, 0)?;
        } else {
            let mut work = unsafe { self.alloc.alloc::<f32>(rows * v) }?;
            self.stream.memcpy_dtod(&logits.slice(..rows * v), &mut work).map_err(drv("copy"))?;
            self.adjust_logits(&mut work, v, &p, params, adjust)?;
            self.launch_sample(&work, v, rows, &p, &mut out, cluster, 0)?;
        }
        let base = out.device_ptr(&self.stream).0;
        self.launch_logprobs(logits, v, base, tops, base + (rows * std::mem::size_of::<i32>()) as u64)?;
        let words = self.stream.clone_dtoh(&out).map_err(drv("download"))?;
        Ok((words[..rows].to_vec(), unpack_logprobs(&words[rows..], tops)))
    }

    /// Like `sample_rows_adjusted`, with the rows' parameters and adjustments already in device
    /// buffers (so a CUDA graph can capture it): adjusts the first `rows` rows of `logits` in
    /// place and writes their samples into `out`.
    pub(crate) fn sample_from_buffers(&self, logits: &mut CudaSlice<f32>, v: usize, rows: usize, bufs: &SamplingBuffers, out: &mut CudaSlice<i32>) -> Result<()> {
        check(rows > 0 && rows <= bufs.rows && logits.len() >= rows * v && out.len() >= rows, || format!("sample_from_buffers: {rows} rows"))?;
        let vi = v as i32;
        let mut b = crate::launch::builder(&self.stream, &self.adjust);
        b.arg(&mut *logits).arg(&vi).arg(&bufs.params).arg(&bufs.adjust);
        unsafe { b.launch(LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }) }.map_err(drv("adjust_logits"))?;
        self.launch_sample(logits, v, rows, &bufs.params, out, self.sample_cluster.is_some(), 0)
    }

    /// A decode graph's sampler (`Op::Sample`): the first `rows` rows of `logits` sampled with
    /// their parameters in `params` (written with the graph's row data before each launch; no
    /// adjustments), into `out` and, in a copy-free graph, the slot its ids word `ids_host`
    /// points at (crate::staged).
    pub(crate) fn sample_step_rows(&self, logits: &CudaSlice<f32>, v: usize, rows: usize, params: &CudaSlice<DeviceRowSampling>, out: &mut CudaSlice<i32>, ids_host: Option<&CudaSlice<u64>>) -> Result<()> {
        check(rows > 0 && params.len() >= rows && logits.len() >= rows * v && out.len() >= rows, || format!("sample_step_rows: {rows} rows"))?;
        let host = ids_host.map_or(0, |w| w.device_ptr(&self.stream).0);
        self.launch_sample(logits, v, rows, params, out, self.sample_cluster.is_some(), host)
    }
}
