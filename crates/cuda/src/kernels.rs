//! Typed launches of the decode kernels in `kernels/gemv.cu`.

// Kernel launches take their buffers and shapes explicitly.
#![allow(clippy::too_many_arguments)]

use std::sync::Arc;

use cudarc::driver::{CudaFunction, CudaSlice, CudaStream, CudaView, CudaViewMut, DevicePtr, DevicePtrMut, LaunchConfig};
use peregrine_core::backend::{LogitAdjust, RowLogprobs, RowSampling};
use peregrine_core::{Error, MoeSpec, Result, RouterScoring};

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

/// Threads per block of the cluster sampler (SAMPLE_CLUSTER_THREADS in kernels/sample.cu).
const SAMPLE_CLUSTER_THREADS: u32 = 512;

/// The most shared memory a block of the cluster sampler stages its slice of a row in (a
/// vocabulary of up to 8 x 40k tokens, and what the H100 has room for beside the kernel's own
/// 37 KB); larger vocabularies read the logits at every pass.
const SAMPLE_STAGE_MAX: usize = 160 * 1024;

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

use crate::compile;
use crate::device::{nvrtc_arch, Gpu};

/// Tokens one kernel pass handles (MAXT in the source); more are done in passes.
pub const MAX_TOKENS_PER_PASS: usize = 8;
/// The (stages, steps per stage) rings the tiled MoE kernels are compiled for, each as two
/// launches (gate_up and down may take different ones) and as one; `Kernels::tune_moe` picks
/// among them per shape and token count. On the H100 at 1 token: one launch with 2 x 3 for
/// MiMo-V2-Flash's experts, two launches with 3 x 4 for MiMo-V2.5-Pro's; at 2-8 tokens two
/// launches, often a deep gate_up ring with a 2 x 4 down ring
/// (benches/results/2026-11-23-moe-fused.md, 2026-11-23-moe-ring-variants.md,
/// 2026-11-24-moe-mixed-rings.md). 3 x 2, 8 x 2, 8 x 1, 6 x 1 and 2 x 8 rings, register rings of
/// 4 and 8 steps, and 2 or 4 warps sharing a tile's K were slower everywhere and dropped.
pub const TILED_VARIANTS: [(usize, usize); 7] = [(2, 4), (4, 2), (3, 4), (4, 4), (2, 3), (3, 3), (2, 6)];
/// The one-token lm_head's argmax keys (`gemv_bf16_presplit_argmax`): its warps spread their
/// atomics over this many keys, one 128-byte line (`ARGMAX_KEY_STRIDE` u64) apart.
pub const ARGMAX_KEY_SLOTS: usize = 64;
pub const ARGMAX_KEY_STRIDE: usize = 16;
// argmax_unpack reads at most 4 keys a lane of its one warp.
const _: () = assert!(ARGMAX_KEY_SLOTS <= 128);
/// Activations as F16 hi and lo parts of each row times a power of two, and the inverse powers
/// (the FP8 tensor-core GEMV's input; `split_f16`'s output).
pub type F16Split = (CudaSlice<u16>, CudaSlice<u16>, CudaSlice<f32>);
/// How old a MoE call's input x is, which decides when the tiled kernels may read it, and
/// whether it comes split already (`Split`: the split must be of this x). With one
/// token they stage x before they wait for the kernel ahead (programmatic dependent launch lets
/// their blocks run while that kernel still does), which only x written at least two launches
/// earlier makes safe: the launch in between waited for the writer before it let this one start.
#[derive(Debug, Clone, Copy)]
pub enum MoeInput<'a> {
    /// Written two or more launches before the MoE call (a decode step's norm, with the router
    /// GEMV launched since) or by a finished copy: staged early, overlapping the kernel ahead.
    Settled,
    /// Possibly written by the launch just before: staged after the wait.
    Fresh,
    /// Settled, and split already by the launch that wrote it (`MoeSplit`): kernels that read
    /// x split (`Kernels::moe_reads_split`) take it instead of splitting x in a launch of
    /// their own; the others read x as `Settled`.
    Split(&'a MoeSplit),
}

impl MoeInput<'_> {
    fn settled_flag(self) -> i32 {
        matches!(self, MoeInput::Settled | MoeInput::Split(_)) as i32
    }
}

/// What the one-token o_proj needs to do its MoE's router too (`gemv_bf16_presplit_route`),
/// and what that MoE reads then (`moe_mxfp4_acc_pairs`).
pub struct RouteInOproj<'a> {
    /// The residual x [H] the o_proj's output is added to (h = x + o, the norm's input).
    pub res: &'a CudaSlice<f32>,
    /// The post-attention norm's weight [H].
    pub norm: &'a CudaSlice<f32>,
    /// The router [E, H] (f32).
    pub router: &'a CudaSlice<f32>,
    pub experts: usize,
    /// Device address of this layer's fixed-point logit sums, `copies` x E then a flag word
    /// (zero on entry).
    pub acc: u64,
    /// Copies of the sums the o_proj's blocks spread their adds over (block b: copy b % copies).
    pub copies: usize,
    /// The o_proj blocks' sums of squares of h [H / 16].
    pub ssq: &'a CudaSlice<f32>,
    /// The norm's weight times h, g h [H].
    pub hg: &'a CudaSlice<f32>,
}

/// The most router rows `gemv_bf16_presplit_route` takes (64 bytes of shared memory each).
pub const ROUTE_OPROJ_MAX_EXPERTS: usize = 512;

/// A MoE call's split x: the caller's, or its own (freed in stream order after the launches).
enum XSplit<'a> {
    Given(&'a MoeSplit),
    Own(MoeSplit),
}

impl XSplit<'_> {
    fn rows(&self) -> &MoeSplit {
        match self {
            XSplit::Given(sp) => sp,
            XSplit::Own(sp) => sp,
        }
    }
}

/// Rows of x split as the MoE kernels read them (`moe_split_rows`' layout: each row's F16 hi
/// and lo of x * 2^s as one routed pair's staged fragments, 4 bytes per element) and 2^-s per
/// row, written by x's producer (the backend's `add_rms_norm_moe_split`).
#[derive(Debug)]
pub struct MoeSplit {
    pub xs: CudaSlice<u32>,
    pub inv: CudaSlice<f32>,
}

/// Whether the step leaves the tiled MoE's pairs to the norm after it (H100,
/// benches/results/2026-11-24-moe-combine-in-norm.md, 2026-11-24-moe-pairs-one-token.md): the
/// down blocks (or the fused kernel's down items) then skip their combine (a fence, a count and
/// the last block's sum in every block's tail: 4-6 points of the copy bandwidth at 2-8 tokens),
/// but one norm block reads each row's topk pair rows. With 128 KB per row (MiMo-V2-Flash's 8 x
/// 4096 floats) the steps were 0.5-1.3% faster from 2 tokens and 1.1% at one token (the fused
/// kernel routing inside it); with 192 KB (MiMo-V2.5-Pro's 8 x 6144) steps at 1-2 tokens were
/// 0.4-0.8% slower and at 4-8 even: the rule is the bytes per row, at any token count.
/// PEREGRINE_MOE_COMBINE_IN_NORM=1|0 forces it either way. The tuner times the tiled kernels
/// as the step will run them.
pub fn moe_pairs_pay(top_k: usize, hidden: usize) -> bool {
    static FORCED: std::sync::OnceLock<Option<bool>> = std::sync::OnceLock::new();
    FORCED
        .get_or_init(|| std::env::var("PEREGRINE_MOE_COMBINE_IN_NORM").ok().map(|v| v != "0"))
        .unwrap_or(top_k * hidden * 4 <= PAIRS_NORM_MAX_BYTES)
}

/// The most pair bytes per row for which `moe_pairs_pay` leaves the combine to the norm.
const PAIRS_NORM_MAX_BYTES: usize = 128 * 1024;

/// Where the one-token routed MoE puts its result: combined into y [H], or left as the
/// token's pairs (scratch.out) with their indices written to the buffer given.
enum RoutedOut<'a> {
    Combined(&'a mut CudaSlice<f32>),
    Pairs(&'a mut CudaSlice<i32>),
}

/// The largest top-k whose combine the tiled down kernel fuses (MAX_FUSED_TOPK in moe.cu).
pub(crate) const MAX_FUSED_TOPK: usize = 32;
/// Dynamic shared memory the tiled MoE kernels may ask for (8 warps' rings and the staged
/// activations; `mxfp4_tiles::MAX_TILED_K` keeps the shapes it takes within it).
pub const TILED_MAX_SMEM: usize = 200 * 1024;
/// Dynamic shared memory of the MoE GEMM kernels (`GEMM_*` in moe.cu): two stages, each the
/// split rows of 32 pairs (256 bytes per step) and 16 row tiles' steps (codes and scales,
/// `mxfp4_tiles::TILE_STEP_BYTES` each), over 4 steps of K.
const GEMM_SMEM: usize = gemm_smem(GEMM_TILES, 2);
/// The MoE GEMM's dynamic shared memory for `tiles` row tiles per block: two stages of 32 pairs'
/// split rows and the tiles' codes and scales, 4 steps of 64 K each.
const fn gemm_smem(tiles: usize, stages: usize) -> usize {
    stages * (32 * 4 * 256 + tiles * 4 * crate::mxfp4_tiles::TILE_STEP_BYTES)
}
/// Stages of the wgmma MoE GEMM (WG_STAGES in moe.cu).
const GEMM_WG_STAGES: usize = 3;
/// From this many routed pairs per expert (tokens x top-k / experts) `MoeKernel::Gemm` runs on
/// wgmma (where the GPU has it). Below, with a few pairs per expert, the kernel is bound by the
/// weights' bytes and mma.sync is as fast or faster. H100 prefill steps, chunks in whole
/// n-tiles: wgmma against mma.sync at 5.4 / 6.7 / 8 / 9.3 / 10.7 pairs (Pro, 256-512 tokens)
/// +4.5 / +1.7 / 0 / -7 / -5%, at 8 / 10 / 12 / 14 / 16 pairs (Flash) -2 / -4 / -6 / -8 / -11%
/// (benches/results/2026-11-26-moe-gemm-n-tiles.md). It was 512 tokens while chunks of 17-24
/// pairs ran 32 columns.
pub const GEMM_WGMMA_MIN_PAIRS_PER_EXPERT: usize = 8;
/// Row tiles of 16 per MoE GEMM block, one per warp (GEMM_TILES in moe.cu).
const GEMM_TILES: usize = 16;
/// Output rows per thread block (WARPS in the source: one warp per row).
const ROWS_PER_BLOCK: u32 = 8;

pub struct Kernels {
    pub(crate) stream: Arc<CudaStream>,
    bf16: CudaFunction,
    fp8: CudaFunction,
    mxfp4: CudaFunction,
    /// MXFP4 GEMV v2 for 1, 2, 4, 8 tokens (4 rows per warp).
    mxfp4_t: [CudaFunction; 4],
    gate_up: CudaFunction,
    down: CudaFunction,
    gate_up_v2: CudaFunction,
    down_v2: CudaFunction,
    combine: CudaFunction,
    /// Tensor-core GEMVs, FP8 and BF16 weights, one per `MMA_GEMV_TILES` entry.
    mma_fp8: Vec<CudaFunction>,
    mma_bf16: Vec<CudaFunction>,
    /// The FP8 one-tile GEMV counting its tiles for `attention_v2_kv_ready` (`gemv_qkv_ready`),
    /// in blocks of 8 warps or (`mma_fp8_ready4`) of 4 warps summing two K classes each: the
    /// same bits, and 9 blocks per SM instead of 4 (54 registers on the H100). The 4-warp form
    /// runs where the 8-warp grid needs more than one wave (`mma_fp8_ready_wave` blocks), so
    /// the attention's blocks can start beside every tile; on a grid that fits one wave anyway
    /// it would only halve each tile's warps. `qkv_ready4` Some forces one form
    /// (`PEREGRINE_QKV_READY4=0/1`; tests compare both).
    mma_fp8_ready: CudaFunction,
    mma_fp8_ready4: CudaFunction,
    mma_fp8_ready_wave: usize,
    qkv_ready4: Option<bool>,
    /// The 4-warp form loading a K block ahead (`gemv_mma_fp8_t1_ready4_pipe`, capped at 72
    /// registers: 7 blocks per SM; at one token also `..._pipe1`, its activations shuffled
    /// between lanes, 64 registers: 8 per SM), run in its place where its tiles fit one wave of
    /// either (`mma_fp8_ready4_pipe_wave`, `[1]` the one-token kernel's), the 7-block kernel
    /// where it fits (`qkv_ready_kernel`). `qkv_pipe` Some forces a pipe on or off
    /// (`PEREGRINE_QKV_PIPE=1/0`), `qkv_pipe_shuffle` the one-token form
    /// (`PEREGRINE_QKV_PIPE_SHUFFLE=1/0`).
    mma_fp8_ready4_pipe: [CudaFunction; 2],  // QkvReady::Pipe's, QkvReady::PipeShuffled's
    mma_fp8_ready4_pipe_wave: [usize; 2],
    qkv_pipe: Option<bool>,
    qkv_pipe_shuffle: Option<bool>,
    /// The one-tile GEMVs loading a K block ahead (`gemv_mma_{bf16,fp8}_t1_pipe`, 88 / 72
    /// registers on the H100), run where the grid fits one wave of them (`*_pipe_wave` blocks:
    /// the driver's occupancy x SMs) while `gemv_pipe` (`PEREGRINE_GEMV_PIPE=0` turns them off,
    /// for comparisons): the o_proj and a dense MLP's down projection at decode.
    mma_bf16_pipe: CudaFunction,
    /// The one-token one-tile BF16 GEMV folding its rows into argmax keys (the lm_head).
    mma_bf16_argmax: CudaFunction,
    /// The same, asking L2 for its first K blocks before its PDL wait (`lm_head_prefetch`).
    mma_bf16_argmax_pf: CudaFunction,
    /// Whether the lm_head prefetches (on; `PEREGRINE_LM_HEAD_PREFETCH=0` for comparison).
    lm_head_prefetch: bool,
    /// `gemv_mma_bf16_t1_pipe_route`: the one-token o_proj that also does its MoE's router.
    mma_bf16_pipe_route: CudaFunction,
    mma_bf16_pipe_wave: usize,
    mma_fp8_pipe: CudaFunction,
    mma_fp8_pipe_wave: usize,
    gemv_pipe: bool,
    /// The GEMM entry of `MMA_GEMV_TILES` got its shared memory (chosen from
    /// `dense_gemm_min_tokens()` tokens).
    dense_gemm: bool,
    /// The same GEMM on wgmma (`gemm_wg_*`, sm_90a; the same bits) over activations laid out by
    /// `gemm_wg_split`; `dense_wg` when the GPU has it and its shared memory was granted, and
    /// `dense_wgmma` forces it on or off (`PEREGRINE_GEMM_WGMMA=1` / `0`, `set_dense_gemm_wgmma`;
    /// None: by the shape, `dense_wg_for`). `dense_wg_fns[i]` are the FP8, BF16, FP8 split-K and
    /// BF16 split-K kernels of `DENSE_WG_ROWS[i]` rows per block; `dense_wg_rows` forces a block height
    /// (`PEREGRINE_GEMM_WG_ROWS`, `set_dense_wg_rows`; None: by the shape, `dense_wg_for`).
    dense_wg_fns: Vec<[CudaFunction; 4]>,
    dense_wg_split: CudaFunction,
    /// `gemm_wg_combine`: the class sums of a wgmma GEMM split over K, added in class order.
    dense_wg_combine: CudaFunction,
    dense_wg: bool,
    dense_wgmma: Option<bool>,
    dense_wg_rows: Option<usize>,
    /// K splits of the wgmma GEMM (one of `DENSE_WG_SPLITS`), forced (`PEREGRINE_GEMM_WG_SPLIT`,
    /// `set_dense_wg_k_splits`; None: by the shape, `dense_wg_for`; 1 also takes the shape rule's
    /// choice from before the splits).
    dense_wg_k_splits: Option<usize>,
    /// `PEREGRINE_GEMV_TILE=NTxR` forces that tile shape at every token count (benchmarks).
    mma_forced: Option<usize>,
    split_bf16: CudaFunction,
    zero_words: CudaFunction,
    split_f16: CudaFunction,
    /// `silu_mul_split_f16`: a dense MLP's silu(gate) x up, split for its FP8 down projection.
    silu_split_f16: CudaFunction,
    gate_up_mma: CudaFunction,
    down_mma: CudaFunction,
    /// Pipelined MoE kernels for K splits 1, 2, 4, 8.
    gate_up_pipe: [CudaFunction; 4],
    down_pipe: [CudaFunction; 4],
    /// Tiled-layout MoE kernels (kernels/moe.cu), one per `TILED_VARIANTS` entry.
    gate_up_tiled: Vec<CudaFunction>,
    down_tiled: Vec<CudaFunction>,
    /// The same rings reading rows split already (`presplit`).
    gate_up_split: Vec<CudaFunction>,
    down_split: Vec<CudaFunction>,
    /// The one-launch gate_up + down kernels, one per `TILED_VARIANTS` entry.
    fused_tiled: Vec<CudaFunction>,
    /// The same for one token, routing it in the kernel (`moe_mxfp4_routed`).
    fused_routed: Vec<CudaFunction>,
    /// `moe_fused_acc_*`: the fused one-token MoE after the o_proj that did its router.
    fused_acc: Vec<CudaFunction>,
    /// The grouped-GEMM MoE kernels (`MoeKernel::Gemm`) and the row split they read.
    gemm_gate_up: CudaFunction,
    gemm_down: CudaFunction,
    split_rows: CudaFunction,
    /// The same GEMM on wgmma (`moe_gemm_wg_*`, sm_90a only; the same bits), and when
    /// `MoeKernel::Gemm` runs it: None from `GEMM_WGMMA_MIN_PAIRS_PER_EXPERT`, Some: always or never
    /// (`PEREGRINE_MOE_WGMMA=1` / `0`, `set_moe_gemm_wgmma`).
    gemm_wg_gate_up: CudaFunction,
    gemm_wg_down: CudaFunction,
    split_rows_wg: CudaFunction,
    /// Row tiles per block of the wgmma GEMM (its block size / 32: MOE_WG_TILES in moe.cu).
    gemm_wg_tiles: usize,
    /// Blocks per tile group of the wgmma GEMM, each taking every `gemm_wg_chunk_blocks`-th
    /// chunk of a slot's pairs (`PEREGRINE_MOE_WG_CHUNK_BLOCKS`, default 4).
    gemm_wg_chunk_blocks: usize,
    wgmma_arch: bool,
    gemm_wgmma: Option<bool>,
    /// Streaming multiprocessors of the GPU (the fused MoE's resident grid).
    sms: usize,
    /// At `SLOT_WAIT_TOKENS` tokens, the two-launch tiled MoE's down blocks wait for their
    /// own expert slot's gate_up blocks (per-slot counters) rather than the whole gate_up grid;
    /// `PEREGRINE_MOE_SLOT_WAIT=0` keeps the whole-grid wait at every size, for comparison;
    /// `PEREGRINE_MOE_SLOT_WAIT=a-b` sets the token counts instead.
    slot_wait: std::ops::RangeInclusive<usize>,
    /// A pass of the tiled MoE kernels stages fewer pairs than it could when that keeps two
    /// blocks per SM (`staged_pairs`); `PEREGRINE_MOE_TWO_BLOCKS=0` sizes by tokens alone.
    two_blocks: bool,
    /// From 2 tokens the two-launch tiled MoE's gate_up reads x split already (`moe_split_rows`,
    /// one launch before it) by bulk copies with its weights, instead of every block staging its
    /// pairs' rows after the wait; with the per-slot wait (`slot_wait`) the down blocks read h
    /// split by their slot's last gate_up block. `PEREGRINE_MOE_PRESPLIT=0` stages in the
    /// kernels, for comparison.
    presplit: bool,
    /// h split too (`PEREGRINE_MOE_PRESPLIT=x` splits x only, for comparison).
    presplit_h: bool,
    /// The MoE GEMM is a tuning candidate from 2 tokens and the kernel above the tuned token
    /// counts (`MoeKernel::for_tiled`); `PEREGRINE_MOE_GEMM=0` keeps to the tiled kernels (unless
    /// forced), for comparison.
    gemm: bool,
    /// Resident 256-thread blocks per SM by (kernel, dynamic shared memory), asked of the
    /// driver once: every eager MoE launch needs them.
    occupancy: std::sync::Mutex<std::collections::HashMap<(usize, usize), usize>>,
    /// MoE kernels chosen by measurement (`tune_moe`).
    pub(crate) moe_choices: std::sync::Mutex<crate::moe_tune::MoeChoices>,
    /// The one-block sampler (every GPU) and the cluster sampler (Hopper on; None elsewhere or
    /// with PEREGRINE_SAMPLE_CLUSTER=0): both draw the same tokens.
    sample: CudaFunction,
    sample_cluster: Option<CudaFunction>,
    /// Bytes of dynamic shared memory a block of the cluster sampler may stage its slice in.
    sample_stage_max: usize,
    /// Blocks per row of the cluster sampler and logprobs (their compiled cluster width).
    sample_width: usize,
    adjust: CudaFunction,
    /// Logprobs likewise: one block per row, or (with the cluster sampler) a cluster.
    logprobs: CudaFunction,
    logprobs_cluster: Option<CudaFunction>,
    /// The PTX came from the on-disk cache.
    pub cached: bool,
    /// kernels/moe.cu's module (for `moe_trace`).
    moe_module: Arc<cudarc::driver::CudaModule>,
    /// Where step buffers come from (a pool of their own while a step is captured).
    pub(crate) alloc: Arc<crate::alloc::StepAlloc>,
    /// gemv.cu's and sample.cu's modules (for `step_trace`, with moe.cu's).
    gemv_module: Arc<cudarc::driver::CudaModule>,
    sample_module: Arc<cudarc::driver::CudaModule>,
}

/// Tile shapes of the tensor-core GEMV kernels (kernels/gemv.cu, `GEMV_MMA`): 8 NT tokens and
/// 16 R rows per block. More rows per block share each activation load; more tokens per block
/// share each weight load but cost registers.
pub const MMA_GEMV_TILES: [(usize, usize); 5] = [(1, 1), (2, 2), (2, 4), DENSE_GEMM_TILE, DEEP_GEMM_TILE];

/// The entry of `MMA_GEMV_TILES` that is the GEMM (`gemm_mma_*`: 128 rows x 64 tokens per
/// block, weights and activations staged in shared memory; the GEMV's bits).
const DENSE_GEMM_TILE: (usize, usize) = (8, 8);

/// The entry that is the GEMM with a deep pipeline for decode batches (`gemm_mma_deep_*`: one
/// block per SM, 6 (FP8) or 5 (BF16) chunks in flight). (8, 6) is its label.
const DEEP_GEMM_TILE: (usize, usize) = (8, 6);

/// Shared memory of a `gemm_mma_*` block (kernels/gemv.cu's GemmTile): 2 stages of 128 rows'
/// weights and 64 tokens' hi + lo parts of a 64-k chunk, rows padded to 144 bytes but FP8's;
/// `gemm_mma_deep_*` (`deep`) has 6 (FP8) or 5 (BF16), as kernels/gemv.cu instantiates it.
const fn dense_gemm_smem(fp8: bool, deep: bool) -> usize {
    let stages = match (deep, fp8) {
        (false, _) => 2,
        (true, true) => 6,
        (true, false) => 5,
    };
    stages * (128 * if fp8 { 64 } else { 144 } + 2 * 64 * 144)
}

/// Block heights of the wgmma dense GEMM (`gemm_wg_*`: 256 rows, `gemm_wg128_*`, `gemm_wg64_*`).
/// The shape rule (`dense_wg_for`) never takes 128: at every decode shape measured it was
/// within 1-3 points of 64 or 256 rows, whichever led; it stays for `PEREGRINE_GEMM_WG_ROWS`.
pub const DENSE_WG_ROWS: [usize; 3] = [256, 128, 64];

/// Groups of 8 values each thread of `silu_mul_split_f16` holds (SILU_SPLIT_GROUPS in kernels/gemv.cu).
const SILU_SPLIT_GROUPS: usize = 4;

/// K splits of the wgmma dense GEMM: split z of S takes the K classes 8 z / S .. 8 (z + 1) / S
/// (class c: K blocks c, c + 8, ...) and `gemm_wg_combine` adds them in class order, so every
/// split gives the same bits.
pub const DENSE_WG_SPLITS: [usize; 4] = [1, 2, 4, 8];

/// Shared memory of a `gemm_wg*` block of `rows` rows: at least kernels/gemv.cu's GemmWg::SMEM
/// (the kernel traps otherwise): FP8 2 stages of a 128-k block and its class totals (192 / 128 /
/// 96 KB at 256 / 128 / 64 rows), BF16 4 stages of a 64-k half (208 / 136 / 100 KB), each half
/// the rows' weights (BF16 rows padded to 144 bytes) and 16 KB of B. 256 and 128 rows: one block
/// per SM (it fills the registers or the shared memory), so the sizes leave room for every form
/// the GWG_* measurement defines build; 64 rows: two blocks per SM, so only the default forms.
const fn dense_wg_smem(rows: usize) -> usize {
    match rows {
        256 => 224 * 1024,
        128 => 160 * 1024,
        _ => 104 * 1024,
    }
}

/// Tokens from which a tensor-core GEMV or GEMM of at least `DENSE_WGMMA_MIN_BLOCKS` blocks of
/// 256 rows x 64 tokens runs as the wgmma GEMM where the GPU has it. H100, Flash shapes against
/// the GEMV tiles below 256 tokens and the mma.sync GEMM above: q/k/v (53 row tiles) 0.94x at
/// 64 tokens, 1.9x at 128, 1.5-2.0x from 192; o_proj (16) 0.38x at 64, 0.76x at 128 (32 blocks),
/// 1.17x at 192 (48), 1.3-1.8x from 256 (benches/results/2026-11-26-dense-gemm-wgmma.md).
pub const DENSE_WGMMA_MIN_TOKENS: usize = 128;
/// See `DENSE_WGMMA_MIN_TOKENS`.
const DENSE_WGMMA_MIN_BLOCKS: usize = 48;

/// The wgmma GEMM's block height for `t` tokens x `n` rows by the shape, or None where the GEMV
/// tiles or the mma.sync GEMM run instead. From `DENSE_WGMMA_MIN_TOKENS` 256 rows where that
/// makes `DENSE_WGMMA_MIN_BLOCKS` blocks. Below, decode batches, whose 256-row blocks leave SMs
/// idle on small matrices: from 32 tokens 256 rows where that makes `DENSE_WG_DECODE_BLOCKS`
/// blocks, else 64 rows where that makes `DENSE_WG_DECODE_BLOCKS` (from 49 tokens) or
/// `DENSE_WG_SMALL_BATCH_BLOCKS` (from 32). H100, % of copy bandwidth
/// (benches/results/2026-11-26-dense-wgmma-decode.md):
/// - Flash's FP8 q/k/v (13568 x 4096) at 32 / 64 tokens 39 / 37% in 64-row blocks (212) against
///   the GEMV tiles' 35 / 26%, at 96 tokens 24.5% in 256-row blocks (106) against 13.9%;
/// - Pro's (27136 x 6144) at 32 / 64 tokens 55 / 52% in 256-row blocks (106) against 43 / 41%;
/// - the BF16 o_proj at 96 tokens 27% (Flash, 4096 x 8192) and 36% (Pro, 6144 x 16384) in
///   64-row blocks against 15 / 35%, at 64 tokens Pro's 42 against 32%; at 16-48 tokens the GEMV
///   tiles are as fast or faster (Flash's o_proj to 64 tokens: 37-70% against at most 33%);
/// - the lm_head (152064 x 4096) at 32 / 64 tokens 80-84 / 78-80% at every height against 73%
///   (GEMV tiles) / 58% (mma.sync GEMM).
///
/// At 16 tokens the GEMV tiles beat every height on every matrix (Flash q/k/v 55 against 40%).
///
/// Split over K (`DENSE_WG_SPLITS`): at 33-64 tokens a matrix of `DENSE_WG_SPLIT_BLOCKS` 64-row
/// blocks runs them in 8 K splits (each of at least 4 K blocks), so the grid has 256-1024 blocks:
/// Flash's o_proj (64 blocks) at 48 / 64 tokens 48.2 / 46.0% against the GEMV tiles' 39.9 /
/// 37.0%, Pro's (96) 60.7 / 59.0% against 42.2 / 42.2% (64 rows unsplit); at 32 tokens Flash's
/// GEMV tiles lead (65.8 against 47.5%). At 65-128 tokens (two token tiles, below the prefill
/// rule) the same matrices take 256-row blocks in 8 splits: Flash's at 96 / 128 tokens 33.2 /
/// 31.4% against 26.4 / 25.6% (64 rows unsplit), Pro's at 96 41.2 against 34.2%. More blocks do
/// not help matrices of 212+ blocks (Flash's q/k/v at 64 tokens 37.7% unsplit, 24-27% split) or
/// the lm_head (benches/results/2026-11-26-dense-wg-k-splits.md).
///
/// Returns (block rows, K splits); without `split`, the choice from before the splits.
pub fn dense_wg_for(t: usize, n: usize, k: usize, split: bool) -> Option<(usize, usize)> {
    let tiles = t.div_ceil(64);
    let blocks = |rows: usize| n.div_ceil(rows) * tiles;
    match t {
        _ if t >= DENSE_WGMMA_MIN_TOKENS && blocks(256) >= DENSE_WGMMA_MIN_BLOCKS => Some((256, 1)),
        32.. if blocks(256) >= DENSE_WG_DECODE_BLOCKS => Some((256, 1)),
        33..=64 if split && DENSE_WG_SPLIT_BLOCKS.contains(&blocks(64)) && k >= 8 * 4 * 128 => Some((64, 8)),
        65..=128 if split && DENSE_WG_SPLIT_BLOCKS.contains(&n.div_ceil(64)) && k >= 8 * 4 * 128 => Some((256, 8)),
        49.. if blocks(64) >= DENSE_WG_DECODE_BLOCKS => Some((64, 1)),
        32.. if blocks(64) >= DENSE_WG_SMALL_BATCH_BLOCKS => Some((64, 1)),
        _ => None,
    }
}

/// 64-row blocks (of one 64-token tile) for which a GEMV of 33-128 tokens runs as the wgmma GEMM
/// in 8 K splits (see `dense_wg_for`): Flash's o_proj 64, Pro's 96.
const DENSE_WG_SPLIT_BLOCKS: std::ops::Range<usize> = 32..128;

/// Blocks from which a GEMV of 32-127 tokens runs as the wgmma GEMM in 256-row blocks, or one of
/// 49-127 tokens in 64-row blocks (see `dense_wg_for`).
const DENSE_WG_DECODE_BLOCKS: usize = 96;
/// Blocks of 64 rows from which a GEMV of 32-48 tokens runs as the wgmma GEMM: Pro's o_proj (96)
/// keeps the GEMV tiles there (63 against 44% at 32 tokens), Flash's q/k/v (212) does not.
const DENSE_WG_SMALL_BATCH_BLOCKS: usize = 192;

fn mma_gemv_name(format: &str, nt: usize, r: usize) -> String {
    if (nt, r) == DEEP_GEMM_TILE {
        format!("gemm_mma_deep_{format}")
    } else if (nt, r) == DENSE_GEMM_TILE {
        format!("gemm_mma_{format}")
    } else if r == 1 {
        format!("gemv_mma_{format}_t{nt}")
    } else {
        format!("gemv_mma_{format}_t{nt}_r{r}")
    }
}

/// The index in `MMA_GEMV_TILES` of the tile shape for `t` tokens: up to 8 tokens one tile of
/// 16 rows per block; above, 2 or 4 row tiles per block of 16 tokens each, so the activations
/// are read from L2 2-4 times less. H100, decode shapes (q/k/v FP8, o_proj BF16) at 16 / 64
/// tokens: FP8 48 -> 55% / 10 -> 21% of copy bandwidth, BF16 60 -> 70% / 25 -> 37%
/// (benches/results/2026-11-23-gemv-row-tiles.md). From `dense_gemm_min_tokens()` (256) the GEMM:
/// the 2048-token prompt's attention block 109 -> 87 ms, a 256-token prompt 43.6 -> 42.4 ms; at
/// 128 tokens it was 4% slower and at 64 its few blocks (q/k/v 106, o_proj 32) lose clearly
/// (benches/results/2026-11-24-decode-launches.md).
/// From 64 tokens, a matrix of at least `dense_gemm_min_blocks()` GEMM tiles (the lm_head of a
/// 152k vocabulary: 1188) runs the GEMM too: at 64 tokens the lm_head's GEMV tiles read 35.6% of
/// copy bandwidth and the GEMM 58.1% (at 32 tokens the GEMV tiles 73.1 against 48.7%). At 64-127
/// tokens a matrix of 64-1023 tiles runs the deep GEMM (one block per SM, 5-6 chunks in flight):
/// q/k/v's 106 tiles at 64 tokens 25.6% against the GEMV tiles' 21.4% and the GEMM's 18.9% (at
/// 32 tokens 19.1 against 34.3%; benches/results/2026-11-24-attention-heads.md).
/// Where the GPU has the wgmma GEMM, `dense_wg_for` is asked first (`mma_launch`), and from
/// 32 tokens it takes most of these matrices.
fn mma_gemv_tile(fp8: bool, t: usize, n: usize, dense_gemm: bool) -> usize {
    let gemm_blocks = n.div_ceil(128) * t.div_ceil(64);
    let tile = match (t, fp8) {
        (0..=8, _) => (1, 1),
        _ if dense_gemm && t >= dense_gemm_min_tokens() => DENSE_GEMM_TILE,
        _ if dense_gemm && t >= 64 && gemm_blocks >= dense_gemm_min_blocks() => DENSE_GEMM_TILE,
        _ if dense_gemm && (deep_gemm_min_tokens()..128).contains(&t) && gemm_blocks >= DEEP_GEMM_MIN_BLOCKS => DEEP_GEMM_TILE,
        (_, true) => (2, 4),
        (_, false) => (2, 2),
    };
    mma_gemv_index(tile).expect("a compiled tile")
}

/// Tokens from which the tensor-core GEMV runs as the GEMM (`PEREGRINE_GEMM_MIN_TOKENS`, for
/// measurements).
fn dense_gemm_min_tokens() -> usize {
    static MIN: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *MIN.get_or_init(|| std::env::var("PEREGRINE_GEMM_MIN_TOKENS").ok().and_then(|v| v.parse().ok()).unwrap_or(256))
}

/// GEMM tiles from which a matrix runs the GEMM from 64 tokens (see `mma_gemv_tile`;
/// `PEREGRINE_GEMM_MIN_BLOCKS`, for measurements).
fn dense_gemm_min_blocks() -> usize {
    static MIN: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *MIN.get_or_init(|| std::env::var("PEREGRINE_GEMM_MIN_BLOCKS").ok().and_then(|v| v.parse().ok()).unwrap_or(1024))
}

/// Tokens from which a decode batch's matrix of `DEEP_GEMM_MIN_BLOCKS` to
/// `dense_gemm_min_blocks()` GEMM tiles runs the deep GEMM, up to 127
/// (`PEREGRINE_GEMM_DEEP_MIN_TOKENS`, for measurements).
fn deep_gemm_min_tokens() -> usize {
    static MIN: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *MIN.get_or_init(|| std::env::var("PEREGRINE_GEMM_DEEP_MIN_TOKENS").ok().and_then(|v| v.parse().ok()).unwrap_or(64))
}

/// GEMM tiles from which the deep GEMM may run (o_proj's 32 at 64 tokens keep the GEMV tiles:
/// 14.9% of copy bandwidth as the deep GEMM against 37.1%).
const DEEP_GEMM_MIN_BLOCKS: usize = 64;

fn mma_gemv_index(tile: (usize, usize)) -> Result<usize> {
    MMA_GEMV_TILES.iter().position(|&x| x == tile).ok_or_else(|| Error::Backend(format!("GEMV tile {tile:?} is not one of {MMA_GEMV_TILES:?} (NT x R)")))
}

/// Shared memory of a tiled MoE block's rings: 8 warps x `stages` x `steps` tile steps (a
/// step's 512 bytes of codes and 32 of scales).
const fn ring_bytes(stages: usize, steps: usize) -> usize {
    8 * stages * steps * crate::mxfp4_tiles::TILE_STEP_BYTES
}

/// Token counts at which the two-launch MoE's down blocks wait per expert slot: the slots whose
/// gate_up finished first then stream their down while the last gate_up blocks drain. On the
/// H100 (Flash shapes) that took the 4-token MoE from ~80% to ~83% of copy bandwidth and the
/// batch-4 step from 5.12-5.14 to 5.01-5.03 ms (batch 8: 7.63-7.67 to 7.59-7.60), but made the
/// steps of batch 2 (1.5-2%), 32 (1%) and 64 (0.6%) slower, for a reason not found
/// (benches/results/2026-11-23-moe-slot-wait.md). With h split once per slot for the down blocks
/// (which needs this wait) it pays at 2 tokens too: Flash 78.1-78.2% against 76.0%, the batch-2
/// step 3.619-3.638 against 3.661-3.671 ms (benches/results/2026-11-24-moe-presplit.md).
const SLOT_WAIT_TOKENS: std::ops::RangeInclusive<usize> = 2..=16;

pub(crate) fn drv(what: &str) -> impl Fn(cudarc::driver::DriverError) -> Error + '_ {
    move |e| Error::Backend(format!("{what}: {e}"))
}

fn check(cond: bool, msg: impl FnOnce() -> String) -> Result<()> {
    if cond {
        Ok(())
    } else {
        Err(Error::Backend(msg()))
    }
}

/// The kernels of the q/k/v projection that feeds the ready attention (`Kernels::gemv_qkv_ready`,
/// chosen by `Kernels::qkv_ready_kernel`); all give the same bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QkvReady {
    /// Blocks of 8 warps, one K class each (`gemv_mma_fp8_t1_ready`).
    Warps8,
    /// Blocks of 4 warps, two K classes each (`gemv_mma_fp8_t1_ready4`).
    Warps4,
    /// `Warps4` loading its next K block ahead, 7 blocks per SM (`gemv_mma_fp8_t1_ready4_pipe`).
    Pipe,
    /// `Pipe` for one token with its activations shuffled between lanes, 8 blocks per SM
    /// (`gemv_mma_fp8_t1_ready4_pipe1`).
    PipeShuffled,
}

impl QkvReady {
    /// The kernel's name in kernels/gemv.cu.
    pub fn name(self) -> &'static str {
        match self {
            QkvReady::Warps8 => "gemv_mma_fp8_t1_ready",
            QkvReady::Warps4 => "gemv_mma_fp8_t1_ready4",
            QkvReady::Pipe => "gemv_mma_fp8_t1_ready4_pipe",
            QkvReady::PipeShuffled => "gemv_mma_fp8_t1_ready4_pipe1",
        }
    }

    /// Threads a block.
    fn threads(self) -> u32 {
        if self == QkvReady::Warps8 { 256 } else { 128 }
    }
}

/// The generations of the MXFP4 MoE decode kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MoeKernel {
    /// One output row per warp (CUDA cores).
    V1,
    /// Four rows per warp, compile-time pair counts (CUDA cores).
    V2,
    /// mma.sync on F16 with the activations split into hi + lo parts.
    TensorCore,
    /// TensorCore's arithmetic with the weights streamed through per-warp shared-memory rings
    /// by cp.async (more bytes in flight per SM without holding registers); `*_split` warps
    /// (1, 2, 4 or 8) share each 16-row tile's K in the gate_up and down kernels.
    Pipelined { gate_up_split: usize, down_split: usize },
    /// `kernels/moe.cu` over the tiled layout (`MoeLayout::Tiled`): 16-byte fragment loads,
    /// e4m3 decode, activations staged per block, each warp's weights brought by the bulk-copy
    /// engine (cp.async.bulk on an mbarrier) into a shared-memory ring of `stages` x `steps`
    /// tile steps in the gate_up kernel and `down_stages` x `down_steps` in the down
    /// kernel; the routed combine fused into the down kernel. Compiled rings: `TILED_VARIANTS`.
    Tiled { stages: usize, steps: usize, down_stages: usize, down_steps: usize },
    /// Tiled's arithmetic and rings in one persistent launch (`moe_fused_bulk_*`): gate_up
    /// items, then down items that wait per expert slot for its gate_up items, each warp's ring
    /// running on from one item to the next; block b takes items b, b + grid, ... At most
    /// `max_blocks` blocks (0: as many as are resident at once; never more, which the waits
    /// rely on).
    Fused { stages: usize, steps: usize, max_blocks: usize },
    /// For many pairs per expert (prefill): the tiled layout's arithmetic as a grouped GEMM
    /// (`moe_gemm_*` in kernels/moe.cu): each block takes 16 row tiles of one expert slot and
    /// 32 of its pairs at a time, so a weight fragment is decoded once for 8 MMA column tiles
    /// instead of streamed again for every 4 pairs. The pairs' rows are split once per call
    /// (`moe_split_rows`), and the results are bit-identical to `Tiled`'s.
    Gemm,
}

impl MoeKernel {
    /// The pipelined kernels' best K splits on the H100 (a sweep of all 16 at 1, 8 and 64
    /// tokens, Flash and Pro shapes: within 1% of each other except split 1, 6-8% slower).
    pub const PIPELINED: MoeKernel = MoeKernel::Pipelined { gate_up_split: 4, down_split: 2 };

    /// The kernel `moe_mxfp4` uses for row-major weights and `tokens` tokens when both
    /// dimensions are multiples of 64: register-loaded up to 16 tokens, pipelined above, as
    /// measured on the H100 (1 token:
    /// 35.7% against 34.3% of copy bandwidth for Flash shapes, 42.1% against 38.6% for Pro; 64
    /// tokens: 54.1% against 58.2%, 59.6% against 60.2%).
    pub fn for_tokens(tokens: usize) -> MoeKernel {
        if tokens <= 16 { MoeKernel::TensorCore } else { MoeKernel::PIPELINED }
    }

    /// Two launches with a ring of 2 stages of 4 steps: the default above 1 token (H100, calls
    /// back to back, Flash shapes 4-64 tokens: 73-82% of copy bandwidth;
    /// benches/results/2026-11-23-moe-fused.md).
    pub const TILED: MoeKernel = MoeKernel::tiled(2, 4);

    /// Two launches with the same ring of `stages` x `steps` in both.
    pub const fn tiled(stages: usize, steps: usize) -> MoeKernel {
        MoeKernel::Tiled { stages, steps, down_stages: stages, down_steps: steps }
    }

    /// The one-launch form of `TILED`, on as many blocks as are resident.
    pub const FUSED: MoeKernel = MoeKernel::Fused { stages: 2, steps: 4, max_blocks: 0 };

    /// The kernel `moe_mxfp4` uses for tiled weights and `tokens` tokens when nothing was
    /// tuned (`Kernels::tune_moe`) for the shape: the one-launch kernel at 1 token, where the
    /// boundary between two launches costs most (H100, calls back to back: Flash shapes 67.3%
    /// of copy bandwidth against 50.5%, Pro 64.6% against 59.3%); two launches above (2 tokens
    /// within 2% either way, 8 tokens 80.7% against 74.8%; benches/results/2026-11-23-moe-fused.md).
    /// Above the tuned token counts, the MoE GEMM (since 2026-11-26 the tuner also measures the
    /// row buckets up to 48 tokens, `moe_tune::tuned_counts`, where the tiled kernels won in
    /// steps): on the H100 it took 0.95-1.01x the tiled
    /// kernels' time at 16-32 tokens of uniform routing, 0.85x at 64 and 0.3x at 2048, and
    /// 0.5-0.7x at 8-16 tokens drawn from one pool of 16 experts, as a verify block's tokens may
    /// be (benches/results/2026-11-24-prefill-gemm.md).
    pub fn for_tiled(tokens: usize, top_k: usize) -> MoeKernel {
        if tokens > crate::moe_tune::TUNED_TOKENS {
            MoeKernel::Gemm
        } else if top_k <= MAX_FUSED_TOPK && tokens == 1 {
            MoeKernel::FUSED
        } else {
            MoeKernel::TILED
        }
    }

    /// `PEREGRINE_MOE_KERNEL=tiled` (two launches, 2 x 4 ring), `fused` (one launch, 2 x 4),
    /// `fused:SxC` or `tiled:SxC` (that ring of `TILED_VARIANTS`), `gemm` or `default`
    /// (`for_tiled`, no tuning) overrides the tuned choice, for measurements: Some(Some(kind)),
    /// Some(None) for `default`, None when unset or not one of those.
    fn forced() -> Option<Option<MoeKernel>> {
        static CHOICE: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
        Self::parse_forced(CHOICE.get_or_init(|| std::env::var("PEREGRINE_MOE_KERNEL").ok()).as_deref()?)
    }

    /// `forced`'s reading of one value.
    fn parse_forced(v: &str) -> Option<Option<MoeKernel>> {
        let ring = |r: &str| -> Option<(usize, usize)> {
            let (s, c) = r.split_once('x')?;
            let ring = (s.parse().ok()?, c.parse().ok()?);
            TILED_VARIANTS.contains(&ring).then_some(ring)
        };
        match v.split_once(':') {
            Some(("fused", r)) => ring(r).map(|(stages, steps)| Some(MoeKernel::Fused { stages, steps, max_blocks: 0 })),
            Some(("tiled", r)) => ring(r).map(|(stages, steps)| Some(MoeKernel::tiled(stages, steps))),
            _ => match v {
                "fused" => Some(Some(MoeKernel::FUSED)),
                "tiled" => Some(Some(MoeKernel::TILED)),
                "gemm" => Some(Some(MoeKernel::Gemm)),
                "default" => Some(None),
                _ => None,
            },
        }
    }
}

/// Host-side grouping of a batch's routing (token -> top-k (expert, weight)) by expert, so
/// each routed expert's weights are streamed once for all its tokens.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MoeRouting {
    /// Distinct experts, ascending.
    pub experts: Vec<i32>,
    /// Pairs of expert u: `pair_off[u]..pair_off[u + 1]`.
    pub pair_off: Vec<i32>,
    /// Token of each (token, slot) pair, grouped by expert.
    pub pair_tok: Vec<i32>,
    /// Routing weight of each pair.
    pub pair_w: Vec<f32>,
    /// `tok_pairs[t * top_k + s]`: the pair of token t's slot s.
    pub tok_pairs: Vec<i32>,
    pub top_k: usize,
}

impl MoeRouting {
    pub fn new(choices: &[Vec<(usize, f32)>]) -> MoeRouting {
        let top_k = choices.first().map_or(0, Vec::len);
        let mut pairs: Vec<(usize, usize, usize, f32)> = Vec::new(); // (expert, token, slot, w)
        for (t, c) in choices.iter().enumerate() {
            for (s, &(e, w)) in c.iter().enumerate() {
                pairs.push((e, t, s, w));
            }
        }
        pairs.sort_by_key(|p| (p.0, p.1, p.2));
        let mut r = MoeRouting { top_k, tok_pairs: vec![0; choices.len() * top_k], ..Default::default() };
        for (i, &(e, t, s, w)) in pairs.iter().enumerate() {
            if r.experts.last() != Some(&(e as i32)) {
                r.experts.push(e as i32);
                r.pair_off.push(i as i32);
            }
            r.pair_tok.push(t as i32);
            r.pair_w.push(w);
            r.tok_pairs[t * top_k + s] = i as i32;
        }
        r.pair_off.push(pairs.len() as i32);
        r
    }
    pub fn num_pairs(&self) -> usize {
        self.pair_tok.len()
    }
}

/// The routing uploaded to the GPU.
pub struct DeviceRouting {
    pub(crate) experts: CudaSlice<i32>,
    pub(crate) pair_off: CudaSlice<i32>,
    pub(crate) pair_tok: CudaSlice<i32>,
    pub(crate) pair_w: CudaSlice<f32>,
    pub(crate) tok_pairs: CudaSlice<i32>,
    pub(crate) num_experts_used: usize,
    pub(crate) num_pairs: usize,
    pub(crate) num_tokens: usize,
    pub(crate) top_k: usize,
}

/// How one layer's MXFP4 experts sit in GPU memory. (One per MoE layer, built at load and
/// never moved after: the variants' sizes do not matter.)
#[allow(clippy::large_enum_variant)]
pub enum MoeLayout {
    /// As stored: gate/up [E, I, H/2] + scales [E, I, H/32], down [E, H, I/2] + [E, H, I/32].
    RowMajor {
        gate: CudaSlice<u8>,
        gate_s: CudaSlice<u8>,
        up: CudaSlice<u8>,
        up_s: CudaSlice<u8>,
        down: CudaSlice<u8>,
        down_s: CudaSlice<u8>,
    },
    /// The layout of `mxfp4_tiles` (gate and up interleaved per tile; each tile step's codes
    /// and scales together), read by `kernels/moe.cu`: per expert 2I x H and H x I values, the
    /// same bytes as RowMajor.
    Tiled { gate_up: CudaSlice<u8>, down: CudaSlice<u8> },
}

/// One layer's experts in MXFP4.
pub struct MoeWeights {
    pub layout: MoeLayout,
    pub num_experts: usize,
    pub hidden: usize,
    pub inter: usize,
}

impl MoeWeights {
    /// Whether the experts are in the tiled layout (kernels/moe.cu).
    pub fn is_tiled(&self) -> bool {
        matches!(self.layout, MoeLayout::Tiled { .. })
    }

    /// Bytes of one expert (the three matrices with their scales).
    pub fn expert_bytes(&self) -> usize {
        3 * (self.hidden * self.inter / 2 + self.hidden * self.inter / 32)
    }

    /// Uploads row-major host arrays ([E, rows, cols/2] codes and [E, rows, cols/32] scales of
    /// gate, up and down), tiled when `tiled` (which needs `mxfp4_tiles::moe_tileable`).
    #[allow(clippy::too_many_arguments)]
    pub fn upload(stream: &Arc<CudaStream>, tiled: bool, gate: &[u8], gate_s: &[u8], up: &[u8], up_s: &[u8], down: &[u8], down_s: &[u8], num_experts: usize, hidden: usize, inter: usize) -> Result<MoeWeights> {
        let (e, h, i) = (num_experts, hidden, inter);
        check(gate.len() == e * i * h / 2 && up.len() == gate.len() && down.len() == gate.len(), || "expert code arrays of the wrong size".into())?;
        check(gate_s.len() == e * i * h / 32 && up_s.len() == gate_s.len() && down_s.len() == gate_s.len(), || "expert scale arrays of the wrong size".into())?;
        let up_ = |v: &[u8]| stream.clone_htod(v).map_err(drv("expert upload"));
        let layout = if tiled {
            check(crate::mxfp4_tiles::moe_tileable(h, i), || format!("experts {h}x{i} cannot be tiled"))?;
            // Expert x's matrix of `codes`/`scales` (each expert's slice is the same size).
            fn part<'a>(codes: &'a [u8], scales: &'a [u8], x: usize, cols: usize, rows: usize) -> crate::mxfp4_tiles::RowMajor<'a> {
                let (cb, sb) = (rows * cols / 2, rows * cols / 32);
                crate::mxfp4_tiles::RowMajor { codes: &codes[x * cb..(x + 1) * cb], scales: &scales[x * sb..(x + 1) * sb], cols }
            }
            let (mut gu, mut d) = (Vec::new(), Vec::new());
            for x in 0..e {
                let [g, dn] = crate::mxfp4_tiles::tile_expert(part(gate, gate_s, x, h, i), part(up, up_s, x, h, i), part(down, down_s, x, i, h), i, h);
                gu.extend(g);
                d.extend(dn);
            }
            MoeLayout::Tiled { gate_up: up_(&gu)?, down: up_(&d)? }
        } else {
            MoeLayout::RowMajor { gate: up_(gate)?, gate_s: up_(gate_s)?, up: up_(up)?, up_s: up_(up_s)?, down: up_(down)?, down_s: up_(down_s)? }
        };
        Ok(MoeWeights { layout, num_experts, hidden, inter })
    }
}

/// Scratch of the MoE decode: `h` [pairs, I], `out` [pairs, H].
pub struct MoeScratch {
    pub h: CudaSlice<f32>,
    pub out: CudaSlice<f32>,
    /// Arrival counters of the tiled down kernel's fused combine, one per block column; zero
    /// between calls (the last block of each column resets its own).
    pub counters: CudaSlice<u32>,
}

impl Kernels {
    pub fn load(gpu: &Gpu) -> Result<Kernels> {
        let (ptx, cached) = compile::ptx("gemv", compile::GEMV_CU, nvrtc_arch(gpu.capability))?;
        let m = gpu.ctx.load_module(ptx).map_err(drv("loading gemv.cu"))?;
        let f = |n: &str| m.load_function(n).map_err(|e| Error::Backend(format!("kernel {n}: {e}")));
        let (sptx, _) = compile::ptx("sample", compile::SAMPLE_CU, nvrtc_arch(gpu.capability))?;
        let sm = gpu.ctx.load_module(sptx).map_err(drv("loading sample.cu"))?;
        let sample = sm.load_function("sample_rows").map_err(drv("kernel sample_rows"))?;
        // The cluster sampler (Hopper on): its compiled cluster width; past 8 blocks, a
        // non-portable size the GPU must allow.
        use cudarc::driver::sys::CUfunction_attribute as FnAttr;
        let width = |f: &CudaFunction| f.get_attribute(FnAttr::CU_FUNC_ATTRIBUTE_REQUIRED_CLUSTER_WIDTH).unwrap_or(0).max(0) as usize;
        let allows = |f: &CudaFunction| width(f) <= 8 || f.set_attribute(FnAttr::CU_FUNC_ATTRIBUTE_NON_PORTABLE_CLUSTER_SIZE_ALLOWED, 1).is_ok();
        let sample_cluster = (gpu.capability.0 >= 9 && std::env::var("PEREGRINE_SAMPLE_CLUSTER").map_or(true, |v| v != "0"))
            .then(|| sm.load_function("sample_rows_cluster").ok())
            .flatten()
            .filter(|f| width(f) > 1 && allows(f));
        let sample_width = sample_cluster.as_ref().map_or(1, width);
        // The room a block has for its staged slice: what a block may opt in to, less the
        // kernel's own shared memory (none: the slices stay in global memory).
        let sample_stage_max = sample_cluster.as_ref().map_or(0, |f| {
            let optin = gpu.ctx.attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN).unwrap_or(0);
            let own = f.get_attribute(FnAttr::CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES).unwrap_or(i32::MAX);
            let room = (optin - own).clamp(0, SAMPLE_STAGE_MAX as i32);
            if f.set_attribute(FnAttr::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, room).is_ok() { room as usize } else { 0 }
        });
        let adjust = sm.load_function("adjust_logits").map_err(drv("kernel adjust_logits"))?;
        let logprobs = sm.load_function("row_logprobs").map_err(drv("kernel row_logprobs"))?;
        let logprobs_cluster = sample_cluster.as_ref().and_then(|_| sm.load_function("row_logprobs_cluster").ok()).filter(|f| width(f) == sample_width && allows(f));
        let (mptx, _) = compile::ptx("moe", compile::MOE_CU, nvrtc_arch(gpu.capability))?;
        let mm = gpu.ctx.load_module(mptx).map_err(drv("loading moe.cu"))?;
        let fm = |n: &str| -> Result<CudaFunction> {
            let f = mm.load_function(n).map_err(|e| Error::Backend(format!("kernel {n}: {e}")))?;
            // The staged activations take K * 16 bytes at 4 pairs per pass (96 KB for
            // MiMo-V2.5-Pro). Best effort: a GPU with less shared memory fails at launch instead.
            let _ = f.set_attribute(cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, TILED_MAX_SMEM as i32);
            Ok(f)
        };
        let mma_fp8 = MMA_GEMV_TILES.iter().map(|&(nt, r)| f(&mma_gemv_name("fp8", nt, r))).collect::<Result<Vec<_>>>()?;
        let mma_bf16 = MMA_GEMV_TILES.iter().map(|&(nt, r)| f(&mma_gemv_name("bf16", nt, r))).collect::<Result<Vec<_>>>()?;
        // The GEMM's stages take more than the default 48 KB of dynamic shared memory; a GPU
        // that cannot give them keeps the GEMV tiles.
        let (gi, di) = (mma_gemv_index(DENSE_GEMM_TILE)?, mma_gemv_index(DEEP_GEMM_TILE)?);
        let dense_gemm = [(&mma_fp8[gi], true, false), (&mma_bf16[gi], false, false), (&mma_fp8[di], true, true), (&mma_bf16[di], false, true)]
            .iter()
            .all(|(func, fp8, deep)| func.set_attribute(cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, dense_gemm_smem(*fp8, *deep) as i32).is_ok());
        let dense_wg_fns = DENSE_WG_ROWS
            .iter()
            .map(|&rows| {
                let name = |format: &str| if rows == 256 { format!("gemm_wg_{format}") } else { format!("gemm_wg{rows}_{format}") };
                Ok([f(&name("fp8"))?, f(&name("bf16"))?, f(&name("fp8_ks"))?, f(&name("bf16_ks"))?])
            })
            .collect::<Result<Vec<_>>>()?;
        let wgmma_arch = nvrtc_arch(gpu.capability) == "sm_90a";
        let dense_wg = wgmma_arch
            && dense_wg_fns.iter().zip(DENSE_WG_ROWS).all(|(fns, rows)| {
                fns.iter().all(|func| func.set_attribute(cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, dense_wg_smem(rows) as i32).is_ok())
            });
        let sms = gpu.ctx.attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT).map_err(drv("SM count"))? as usize;
        let mma_bf16_argmax = f("gemv_mma_bf16_t1_argmax")?;
        let mma_bf16_argmax_pf = f("gemv_mma_bf16_t1_argmax_pf")?;
        let mma_bf16_pipe = f("gemv_mma_bf16_t1_pipe")?;
        let mma_bf16_pipe_route = f("gemv_mma_bf16_t1_pipe_route")?;
        let mma_bf16_pipe_wave = mma_bf16_pipe.occupancy_max_active_blocks_per_multiprocessor(256, 0, None).map_err(drv("GEMV occupancy"))? as usize * sms;
        let mma_fp8_pipe = f("gemv_mma_fp8_t1_pipe")?;
        let mma_fp8_pipe_wave = mma_fp8_pipe.occupancy_max_active_blocks_per_multiprocessor(256, 0, None).map_err(drv("GEMV occupancy"))? as usize * sms;
        // The wgmma GEMM's stages may take more than the tiled kernels' cap (16 tiles: 203 KB).
        let (gemm_wg_gate_up, gemm_wg_down) = (fm("moe_gemm_wg_gate_up")?, fm("moe_gemm_wg_down")?);
        let wg_tiles = gemm_wg_gate_up.get_attribute(cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_THREADS_PER_BLOCK).map_err(drv("MoE GEMM block size"))? as usize / 32;
        for f in [&gemm_wg_gate_up, &gemm_wg_down] {
            let _ = f.set_attribute(cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, gemm_smem(wg_tiles, GEMM_WG_STAGES) as i32);
        }
        let mma_fp8_ready = f("gemv_mma_fp8_t1_ready")?;
        let mma_fp8_ready_wave = mma_fp8_ready.occupancy_max_active_blocks_per_multiprocessor(256, 0, None).map_err(drv("GEMV occupancy"))? as usize * sms;
        let mma_fp8_ready4_pipe = [f("gemv_mma_fp8_t1_ready4_pipe")?, f("gemv_mma_fp8_t1_ready4_pipe1")?];
        let mut mma_fp8_ready4_pipe_wave = [0; 2];
        for (f, wave) in mma_fp8_ready4_pipe.iter().zip(&mut mma_fp8_ready4_pipe_wave) {
            *wave = f.occupancy_max_active_blocks_per_multiprocessor(128, 0, None).map_err(drv("GEMV occupancy"))? as usize * sms;
        }
        Ok(Kernels {
            stream: gpu.stream.clone(),
            bf16: f("gemv_bf16")?,
            fp8: f("gemv_fp8")?,
            mxfp4: f("gemv_mxfp4")?,
            mxfp4_t: [f("gemv_mxfp4_t1")?, f("gemv_mxfp4_t2")?, f("gemv_mxfp4_t4")?, f("gemv_mxfp4_t8")?],
            gate_up: f("moe_gate_up_mxfp4")?,
            down: f("moe_down_mxfp4")?,
            gate_up_v2: f("moe_gate_up_mxfp4_v2")?,
            down_v2: f("moe_down_mxfp4_v2")?,
            combine: f("moe_combine")?,
            mma_fp8,
            mma_bf16,
            mma_fp8_ready,
            mma_fp8_ready4: f("gemv_mma_fp8_t1_ready4")?,
            mma_fp8_ready_wave,
            qkv_ready4: std::env::var("PEREGRINE_QKV_READY4").ok().map(|v| v != "0"),
            mma_fp8_ready4_pipe,
            mma_fp8_ready4_pipe_wave,
            qkv_pipe: std::env::var("PEREGRINE_QKV_PIPE").ok().map(|v| v != "0"),
            qkv_pipe_shuffle: std::env::var("PEREGRINE_QKV_PIPE_SHUFFLE").ok().map(|v| v != "0"),
            mma_bf16_pipe,
            mma_bf16_argmax,
            mma_bf16_argmax_pf,
            lm_head_prefetch: std::env::var("PEREGRINE_LM_HEAD_PREFETCH").map_or(true, |v| v != "0"),
            mma_bf16_pipe_route,
            mma_bf16_pipe_wave,
            mma_fp8_pipe,
            mma_fp8_pipe_wave,
            gemv_pipe: std::env::var("PEREGRINE_GEMV_PIPE").map_or(true, |v| v != "0"),
            dense_gemm,
            dense_wg_fns,
            dense_wg_split: f("gemm_wg_split")?,
            dense_wg_combine: f("gemm_wg_combine")?,
            dense_wg,
            dense_wgmma: std::env::var("PEREGRINE_GEMM_WGMMA").ok().map(|v| v != "0"),
            dense_wg_rows: match std::env::var("PEREGRINE_GEMM_WG_ROWS") {
                Ok(v) => Some(v.parse().ok().filter(|r| DENSE_WG_ROWS.contains(r)).ok_or_else(|| Error::Backend(format!("PEREGRINE_GEMM_WG_ROWS={v}: expected one of {DENSE_WG_ROWS:?}")))?),
                Err(_) => None,
            },
            dense_wg_k_splits: match std::env::var("PEREGRINE_GEMM_WG_SPLIT") {
                Ok(v) => Some(v.parse().ok().filter(|r| DENSE_WG_SPLITS.contains(r)).ok_or_else(|| Error::Backend(format!("PEREGRINE_GEMM_WG_SPLIT={v}: expected one of {DENSE_WG_SPLITS:?}")))?),
                Err(_) => None,
            },
            mma_forced: match std::env::var("PEREGRINE_GEMV_TILE") {
                Ok(v) => {
                    let tile = v.split_once('x').and_then(|(nt, r)| Some((nt.parse().ok()?, r.parse().ok()?)));
                    Some(mma_gemv_index(tile.ok_or_else(|| Error::Backend(format!("PEREGRINE_GEMV_TILE={v}: expected NTxR, e.g. 2x4")))?)?)
                }
                Err(_) => None,
            },
            split_bf16: f("split_bf16")?,
            zero_words: f("zero_words")?,
            split_f16: f("split_f16")?,
            silu_split_f16: f("silu_mul_split_f16")?,
            gate_up_mma: f("moe_gate_up_mma")?,
            down_mma: f("moe_down_mma")?,
            gate_up_pipe: [f("moe_gate_up_pipe_s1")?, f("moe_gate_up_pipe_s2")?, f("moe_gate_up_pipe_s4")?, f("moe_gate_up_pipe_s8")?],
            down_pipe: [f("moe_down_pipe_s1")?, f("moe_down_pipe_s2")?, f("moe_down_pipe_s4")?, f("moe_down_pipe_s8")?],
            gate_up_tiled: TILED_VARIANTS.iter().map(|(n, c)| fm(&format!("moe_gate_up_bulk_n{n}_c{c}"))).collect::<Result<_>>()?,
            down_tiled: TILED_VARIANTS.iter().map(|(n, c)| fm(&format!("moe_down_bulk_n{n}_c{c}"))).collect::<Result<_>>()?,
            gate_up_split: TILED_VARIANTS.iter().map(|(n, c)| fm(&format!("moe_gate_up_split_n{n}_c{c}"))).collect::<Result<_>>()?,
            down_split: TILED_VARIANTS.iter().map(|(n, c)| fm(&format!("moe_down_split_n{n}_c{c}"))).collect::<Result<_>>()?,
            fused_tiled: TILED_VARIANTS.iter().map(|(n, c)| fm(&format!("moe_fused_bulk_n{n}_c{c}"))).collect::<Result<_>>()?,
            fused_routed: TILED_VARIANTS.iter().map(|(n, c)| fm(&format!("moe_fused_routed_bulk_n{n}_c{c}"))).collect::<Result<_>>()?,
            fused_acc: TILED_VARIANTS.iter().map(|(n, c)| fm(&format!("moe_fused_acc_bulk_n{n}_c{c}"))).collect::<Result<_>>()?,
            gemm_gate_up: fm("moe_gemm_gate_up")?,
            gemm_down: fm("moe_gemm_down")?,
            split_rows: fm("moe_split_rows")?,
            gemm_wg_tiles: wg_tiles,
            gemm_wg_chunk_blocks: std::env::var("PEREGRINE_MOE_WG_CHUNK_BLOCKS").ok().and_then(|v| v.parse().ok()).filter(|&n: &usize| (1..=64).contains(&n)).unwrap_or(4),
            gemm_wg_gate_up,
            gemm_wg_down,
            split_rows_wg: fm("moe_split_rows_wg")?,
            wgmma_arch,
            gemm_wgmma: std::env::var("PEREGRINE_MOE_WGMMA").ok().map(|v| v != "0"),
            moe_choices: Default::default(),
            slot_wait: match std::env::var("PEREGRINE_MOE_SLOT_WAIT").as_deref() {
                Ok("0") => 0..=0, // (no MoE call that reaches the kernels has 0 tokens)
                Ok(v) => v.split_once('-').and_then(|(a, b)| Some(a.trim().parse().ok()?..=b.trim().parse().ok()?)).unwrap_or(SLOT_WAIT_TOKENS),
                Err(_) => SLOT_WAIT_TOKENS,
            },
            two_blocks: std::env::var("PEREGRINE_MOE_TWO_BLOCKS").map_or(true, |v| v != "0"),
            presplit: std::env::var("PEREGRINE_MOE_PRESPLIT").map_or(true, |v| v != "0"),
            presplit_h: std::env::var("PEREGRINE_MOE_PRESPLIT").map_or(true, |v| v != "0" && v != "x"),
            gemm: std::env::var("PEREGRINE_MOE_GEMM").map_or(true, |v| v != "0"),
            occupancy: Default::default(),
            sms,
            sample,
            sample_cluster,
            sample_stage_max,
            sample_width,
            adjust,
            logprobs,
            logprobs_cluster,
            cached,
            moe_module: mm.clone(),
            alloc: Arc::new(crate::alloc::StepAlloc::new(gpu.stream.clone())),
            gemv_module: m.clone(),
            sample_module: sm.clone(),
        })
    }

    fn rows_cfg(n: usize, y: u32) -> LaunchConfig {
        LaunchConfig { grid_dim: ((n as u32).div_ceil(ROWS_PER_BLOCK), y, 1), block_dim: (32 * ROWS_PER_BLOCK, 1, 1), shared_mem_bytes: 0 }
    }

    /// Runs `launch(x_chunk, y_chunk, tokens)` over chunks of at most 8 tokens.
    fn per_pass(
        x: &CudaSlice<f32>,
        y: &mut CudaSlice<f32>,
        n: usize,
        k: usize,
        t: usize,
        mut launch: impl FnMut(CudaView<'_, f32>, CudaViewMut<'_, f32>, i32) -> Result<()>,
    ) -> Result<()> {
        check(x.len() >= t * k && y.len() >= t * n, || format!("gemv buffers too small for {t} tokens of {k} -> {n}"))?;
        let mut t0 = 0;
        while t0 < t {
            let tt = (t - t0).min(MAX_TOKENS_PER_PASS);
            launch(x.slice(t0 * k..(t0 + tt) * k), y.slice_mut(t0 * n..(t0 + tt) * n), tt as i32)?;
            t0 += tt;
        }
        Ok(())
    }

    /// `y[t, n] = W[n, :] · x[t, :]` for BF16 `W` [N, K] (as u16 bits); K % 32 == 0. The
    /// tensor-core kernel when K % 128 == 0, else the one-row-per-warp kernel.
    pub fn gemv_bf16(&self, w: &CudaSlice<u16>, x: &CudaSlice<f32>, y: &mut CudaSlice<f32>, n: usize, k: usize, t: usize) -> Result<()> {
        if k.is_multiple_of(128) {
            check(w.len() >= n * k && y.len() >= t * n, || format!("gemv_bf16: W must hold {n}x{k} and y {t}x{n}"))?;
            let (wp, _w) = w.device_ptr(&self.stream);
            let (yp, _y) = y.device_ptr_mut(&self.stream);
            return self.gemv_mma(false, wp, None, x, [yp; 3], [n, 0, 0], k, t);
        }
        self.gemv_bf16_simt(w, x, y, n, k, t)
    }

    /// One GEMV whose rows are split over three outputs: rows `[0, n[0])` into `ys[0]`
    /// ([T, n[0]]), the next `n[1]` into `ys[1]`, the last `n[2]` into `ys[2]` (a fused q/k/v
    /// projection). `W` is FP8 (with `scales`) or BF16 (`scales` None); K % 128 == 0. An FP8
    /// GEMV may be given `x_split`, x already split as `split_f16` would (by
    /// `add_rms_norm_split`: F16 hi, lo and the rows' inverse scales), instead of splitting x.
    pub fn gemv_split3(&self, w: cudarc::driver::sys::CUdeviceptr, scales: Option<&CudaSlice<f32>>, x: &CudaSlice<f32>, x_split: Option<&F16Split>, ys: [&mut CudaSlice<f32>; 3], n: [usize; 3], k: usize, t: usize) -> Result<()> {
        check(k.is_multiple_of(128) && ys.iter().zip(n).all(|(y, r)| y.len() >= t * r), || format!("gemv_split3: bad shapes {n:?}x{k}"))?;
        let [y0, y1, y2] = ys;
        let (p0, _a) = y0.device_ptr_mut(&self.stream);
        let (p1, _b) = y1.device_ptr_mut(&self.stream);
        let (p2, _c) = y2.device_ptr_mut(&self.stream);
        match (scales, x_split) {
            (Some(sc), Some((xh, xl, inv))) => {
                check(xh.len() >= t * k && xl.len() >= t * k && inv.len() >= t, || format!("gemv_split3: split input too small for {t} tokens of {k}"))?;
                if t == 0 || n.iter().sum::<usize>() == 0 {
                    return Ok(());
                }
                self.mma_launch(true, w, Some(sc), xh, xl, Some(inv), [p0, p1, p2], n, k, t, None)
            }
            _ => self.gemv_mma(scales.is_some(), w, scales, x, [p0, p1, p2], n, k, t),
        }
    }

    /// Whether `gemv_qkv_ready` takes a fused q/k/v projection of `t` tokens with rows `n`
    /// (q, k, v) of `heads` q heads of `hd` rows and KV heads of `hd` (k) and `vd` (v) rows: the
    /// one-tile kernel (1-8 tokens, no other tile forced), no 16-row tile across two heads.
    pub fn qkv_ready_takes(&self, n: [usize; 3], heads: usize, hd: usize, vd: usize, k: usize, t: usize) -> bool {
        let one_tile = self.mma_forced.is_none_or(|v| MMA_GEMV_TILES[v] == (1, 1)) && mma_gemv_tile(true, t, n.iter().sum(), self.dense_gemm) == 0;
        let kv_heads = n[1].checked_div(hd).unwrap_or(0);
        one_tile && hd.is_multiple_of(16) && vd.is_multiple_of(16) && hd > 0 && vd > 0 && heads > 0 && k.is_multiple_of(128)
            && n[0] == heads * hd && kv_heads > 0 && n[1] == kv_heads * hd && n[2] == kv_heads * vd
    }

    /// `gemv_split3` of an FP8 q/k/v projection over x's F16 split, for `attention_v2_kv_ready`
    /// launched right after it: the tiles of k and v run first, then q's in head order, and every
    /// finished 16-row tile is counted into `ready` (q rows of head h at `ready[h]`, k and v rows
    /// of KV head j at `ready[heads + j]`; `ready` holds heads + KV heads + 1 zeroed counters,
    /// which that attention zeroes again). Only shapes `qkv_ready_takes` takes.
    #[allow(clippy::too_many_arguments)]
    pub fn gemv_qkv_ready(&self, w: cudarc::driver::sys::CUdeviceptr, scales: &CudaSlice<f32>, x_split: &F16Split, ys: [&mut CudaSlice<f32>; 3], n: [usize; 3], k: usize, t: usize, ready: &CudaSlice<u32>, heads: usize, hd: usize, vd: usize) -> Result<()> {
        check(self.qkv_ready_takes(n, heads, hd, vd, k, t), || format!("gemv_qkv_ready: rows {n:?} of {heads} heads ({hd}, {vd}) x {k}, {t} tokens is not a shape it takes"))?;
        let (xh, xl, inv) = x_split;
        check(xh.len() >= t * k && xl.len() >= t * k && inv.len() >= t && ys.iter().zip(n).all(|(y, r)| y.len() >= t * r), || format!("gemv_qkv_ready: buffers too small for {t} tokens of {n:?}x{k}"))?;
        check(ready.len() > heads + n[1] / hd, || format!("gemv_qkv_ready: {} counters for {heads} + {} heads", ready.len(), n[1] / hd))?;
        let [y0, y1, y2] = ys;
        let rows = n.iter().sum::<usize>();
        let (ni, ki, ti) = (rows as i32, k as i32, t as i32);
        let (n0, n1, hh, hdi, vdi) = (n[0] as i32, n[1] as i32, heads as i32, hd as i32, vd as i32);
        let kernel = self.qkv_ready_kernel(rows, t);
        let (name, threads) = (kernel.name(), kernel.threads());
        let f = match kernel {
            QkvReady::Warps8 => &self.mma_fp8_ready,
            QkvReady::Warps4 => &self.mma_fp8_ready4,
            QkvReady::Pipe => &self.mma_fp8_ready4_pipe[0],
            QkvReady::PipeShuffled => &self.mma_fp8_ready4_pipe[1],
        };
        let mut b = crate::launch::builder(&self.stream, f);
        b.arg(&w).arg(scales).arg(xh).arg(xl).arg(inv).arg(y0).arg(y1).arg(y2).arg(&n0).arg(&n1).arg(&ni).arg(&ki).arg(&ti);
        b.arg(ready).arg(&hh).arg(&hdi).arg(&vdi);
        let cfg = LaunchConfig { grid_dim: (rows.div_ceil(16) as u32, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 };
        unsafe { b.launch(cfg) }.map_err(drv(name))?;
        Ok(())
    }

    /// The one-row-per-warp BF16 GEMV (CUDA cores), kept for shapes the tensor-core kernel
    /// does not take and for comparison in the bench.
    pub fn gemv_bf16_simt(&self, w: &CudaSlice<u16>, x: &CudaSlice<f32>, y: &mut CudaSlice<f32>, n: usize, k: usize, t: usize) -> Result<()> {
        check(k.is_multiple_of(32) && w.len() >= n * k, || format!("gemv_bf16: K {k} must be a multiple of 32 and W hold {n}x{k}"))?;
        let (ni, ki) = (n as i32, k as i32);
        Self::per_pass(x, y, n, k, t, |xs, mut ys, tt| {
            let mut b = crate::launch::builder(&self.stream, &self.bf16);
            b.arg(w).arg(&xs).arg(&mut ys).arg(&ni).arg(&ki).arg(&tt);
            unsafe { b.launch(Self::rows_cfg(n, 1)) }.map(|_| ()).map_err(drv("gemv_bf16"))
        })
    }

    /// FP8 e4m3 `W` [N, K] with f32 block scales [ceil(N/128), K/128]; K % 128 == 0
    /// (tensor-core kernel).
    pub fn gemv_fp8(&self, w: &CudaSlice<u8>, scales: &CudaSlice<f32>, x: &CudaSlice<f32>, y: &mut CudaSlice<f32>, n: usize, k: usize, t: usize) -> Result<()> {
        check(k.is_multiple_of(128) && w.len() >= n * k && scales.len() >= n.div_ceil(128) * (k / 128), || format!("gemv_fp8: bad shapes {n}x{k}"))?;
        check(y.len() >= t * n, || format!("gemv_fp8: y must hold {t}x{n}"))?;
        let (wp, _w) = w.device_ptr(&self.stream);
        let (yp, _y) = y.device_ptr_mut(&self.stream);
        self.gemv_mma(true, wp, Some(scales), x, [yp; 3], [n, 0, 0], k, t)
    }

    /// The one-row-per-warp FP8 GEMV (CUDA cores), kept for comparison in the bench.
    pub fn gemv_fp8_simt(&self, w: &CudaSlice<u8>, scales: &CudaSlice<f32>, x: &CudaSlice<f32>, y: &mut CudaSlice<f32>, n: usize, k: usize, t: usize) -> Result<()> {
        check(k.is_multiple_of(128) && w.len() >= n * k && scales.len() >= n.div_ceil(128) * (k / 128), || format!("gemv_fp8: bad shapes {n}x{k}"))?;
        let (ni, ki) = (n as i32, k as i32);
        Self::per_pass(x, y, n, k, t, |xs, mut ys, tt| {
            let mut b = crate::launch::builder(&self.stream, &self.fp8);
            b.arg(w).arg(scales).arg(&xs).arg(&mut ys).arg(&ni).arg(&ki).arg(&tt);
            unsafe { b.launch(Self::rows_cfg(n, 1)) }.map(|_| ()).map_err(drv("gemv_fp8"))
        })
    }

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

    /// `n` zeroed elements of a 4-byte T: a memset eagerly, a kernel while a step is captured
    /// (crate::alloc).
    pub(crate) fn zeros<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(&self, n: usize) -> Result<CudaSlice<T>> {
        check(std::mem::size_of::<T>() == 4, || "zeros: 4-byte elements only".into())?;
        if !self.alloc.capturing() {
            return self.stream.alloc_zeros::<T>(n.max(1)).map_err(drv("alloc"));
        }
        // SAFETY: zero_words writes all n.max(1) words before anything reads them.
        let mut v = unsafe { self.alloc.alloc::<T>(n) }?;
        let words = v.len() as u64;
        let mut b = crate::launch::builder(&self.stream, &self.zero_words);
        b.arg(&mut v).arg(&words);
        let blocks = words.div_ceil(256).clamp(1, 1024) as u32;
        unsafe { b.launch(LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }) }.map_err(drv("zero_words"))?;
        Ok(v)
    }

    /// x [n] -> BF16 hi and lo parts (`gemv_bf16_presplit`'s input; no scales: the third is None).
    #[allow(clippy::type_complexity)]
    pub fn split_bf16(&self, x: &CudaSlice<f32>, len: usize) -> Result<(CudaSlice<u16>, CudaSlice<u16>, Option<CudaSlice<f32>>)> {
        let mut xh = unsafe { self.alloc.alloc::<u16>(len) }?;
        let mut xl = unsafe { self.alloc.alloc::<u16>(len) }?;
        let li = len as i32;
        let mut b = crate::launch::builder(&self.stream, &self.split_bf16);
        b.arg(x).arg(&mut xh).arg(&mut xl).arg(&li);
        unsafe { b.launch(LaunchConfig::for_num_elems(len as u32)) }.map_err(drv("split_bf16"))?;
        Ok((xh, xl, None))
    }

    /// x [rows, K] -> F16 hi and lo parts of x scaled per row by a power of two, and the inverse
    /// scales; `interleave` stores each group of 8 as 0,4,1,5,2,6,3,7 (the MXFP4 kernels' order).
    pub fn split_f16(&self, x: &CudaSlice<f32>, rows: usize, k: usize, interleave: bool) -> Result<F16Split> {
        let len = rows * k;
        let mut xh = unsafe { self.alloc.alloc::<u16>(len) }?;
        let mut xl = unsafe { self.alloc.alloc::<u16>(len) }?;
        let mut inv = unsafe { self.alloc.alloc::<f32>(rows) }?;
        let (ki, il) = (k as i32, interleave as i32);
        let mut b = crate::launch::builder(&self.stream, &self.split_f16);
        b.arg(x).arg(&mut xh).arg(&mut xl).arg(&mut inv).arg(&ki).arg(&il);
        // One block per row, since decode has few rows and each needs a max first: a thread per 8
        // elements when the row fits (the kernel's register path), else 1024 threads.
        let threads = if k.is_multiple_of(8) && k <= 8 * 1024 { (k / 8).div_ceil(32).max(1) * 32 } else { 1024 };
        unsafe { b.launch(LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (threads as u32, 1, 1), shared_mem_bytes: 0 }) }.map_err(drv("split_f16"))?;
        Ok((xh, xl, inv))
    }

    /// The tensor-core GEMV: x split into BF16 hi + lo, then 16 rows per block of 8 warps,
    /// 8, 16, 32 or 64 tokens per pass (grid.y passes).
    #[allow(clippy::too_many_arguments)]
    fn gemv_mma(&self, fp8: bool, w: cudarc::driver::sys::CUdeviceptr, scales: Option<&CudaSlice<f32>>, x: &CudaSlice<f32>, ys: [cudarc::driver::sys::CUdeviceptr; 3], rows: [usize; 3], k: usize, t: usize) -> Result<()> {
        let n = rows.iter().sum::<usize>();
        check(x.len() >= t * k, || format!("gemv input too small for {t} tokens of {k}"))?;
        if t == 0 || n == 0 {
            return Ok(());
        }
        // FP8 weights run as F16 (exact) against F16 hi + lo activations scaled per row by a
        // power of two; BF16 weights against BF16 hi + lo activations.
        let (xh, xl, inv) = if fp8 {
            let (h, l, inv) = self.split_f16(x, t, k, false)?;
            (h, l, Some(inv))
        } else {
            self.split_bf16(x, t * k)?
        };
        self.mma_launch(fp8, w, scales, &xh, &xl, inv.as_ref(), ys, rows, k, t, None)
    }

    /// Runs the tensor-core GEMVs with tile `(nt, r)` (one of `MMA_GEMV_TILES`) at every token
    /// count, or with the default per token count (`None`). Every tile gives the same bits.
    pub fn force_gemv_tile(&mut self, tile: Option<(usize, usize)>) -> Result<()> {
        self.mma_forced = tile.map(mma_gemv_index).transpose()?;
        Ok(())
    }

    /// The tensor-core GEMV over activations already split into hi + lo parts.
    /// `zero`: counters its block 0 zeroes after its work, past its PDL wait (`zero_after_wait`;
    /// the one-tile kernels only).
    #[allow(clippy::too_many_arguments)]
    fn mma_launch(&self, fp8: bool, w: cudarc::driver::sys::CUdeviceptr, scales: Option<&CudaSlice<f32>>, xh: &CudaSlice<u16>, xl: &CudaSlice<u16>, inv: Option<&CudaSlice<f32>>, ys: [cudarc::driver::sys::CUdeviceptr; 3], rows: [usize; 3], k: usize, t: usize, zero: Option<&CudaSlice<u32>>) -> Result<()> {
        let n = rows.iter().sum::<usize>();
        let v = self.mma_tile(fp8, t, n);
        let (nt, r) = MMA_GEMV_TILES[v];
        check(zero.is_none() || (nt, r) == (1, 1), || format!("only the one-tile GEMV zeroes counters, not tile {nt}x{r} ({t} tokens)"))?;
        if zero.is_none() && k.is_multiple_of(128) {
            if let Some((block_rows, splits)) = self.dense_gemm_wg(t, n, k) {
                return self.dense_wg_launch(fp8, block_rows, splits, w, scales, xh, xl, inv, ys, rows, k, t);
            }
        }
        let (groups, ty) = (n.div_ceil(16 * r), t.div_ceil(8 * nt));
        let f = match () {
            _ if self.pipe_takes(fp8, nt, r, groups * ty) => if fp8 { &self.mma_fp8_pipe } else { &self.mma_bf16_pipe },
            _ if fp8 => &self.mma_fp8[v],
            _ => &self.mma_bf16[v],
        };
        let (ni, ki, ti) = (n as i32, k as i32, t as i32);
        let mut b = crate::launch::builder(&self.stream, f);
        b.arg(&w);
        match scales {
            Some(s) => b.arg(s),
            None => b.arg(&0u64),
        };
        let (n0, n1) = (rows[0] as i32, rows[1] as i32);
        b.arg(xh).arg(xl);
        match inv {
            Some(i) => b.arg(i),
            None => b.arg(&0u64),
        };
        b.arg(&ys[0]).arg(&ys[1]).arg(&ys[2]).arg(&n0).arg(&n1).arg(&ni).arg(&ki).arg(&ti);
        let nzero = zero.map_or(0, |z| z.len() as i32);
        b.arg_or_null(zero).arg(&nzero);
        // Row groups of 16 r rows x token groups of 8 nt: one row tile per block on grid (x, y);
        // several, as one index the kernel splits (a row group's token groups adjacent).
        let (dense_gemm, deep) = ((nt, r) == DENSE_GEMM_TILE, (nt, r) == DEEP_GEMM_TILE);
        // The GEMMs: 128-row x 64-token tiles.
        let grid_dim = match () {
            _ if deep => (n.div_ceil(128) as u32, t.div_ceil(64) as u32, 1),
            _ if r == 1 || dense_gemm => (groups as u32, ty as u32, 1),
            _ => ((groups * ty) as u32, 1, 1),
        };
        let smem = if dense_gemm || deep { dense_gemm_smem(fp8, deep) as u32 } else { 0 };
        let cfg = LaunchConfig { grid_dim, block_dim: (256, 1, 1), shared_mem_bytes: smem };
        unsafe { b.launch(cfg) }.map_err(drv(if fp8 { "gemv_mma_fp8" } else { "gemv_mma_bf16" }))?;
        Ok(())
    }

    /// The dense GEMM on wgmma: `gemm_wg_split` lays x's hi + lo out for it (16 KB per 64 tokens
    /// and 64 k), then `block_rows` (one of `DENSE_WG_ROWS`) rows x 64 tokens per block of one
    /// warpgroup per 64 rows, K in `splits` (one of `DENSE_WG_SPLITS`) parts by class, which
    /// `gemm_wg_combine` adds up. The same bits as `gemm_mma_*`.
    #[allow(clippy::too_many_arguments)]
    fn dense_wg_launch(&self, fp8: bool, block_rows: usize, splits: usize, w: cudarc::driver::sys::CUdeviceptr, scales: Option<&CudaSlice<f32>>, xh: &CudaSlice<u16>, xl: &CudaSlice<u16>, inv: Option<&CudaSlice<f32>>, ys: [cudarc::driver::sys::CUdeviceptr; 3], rows: [usize; 3], k: usize, t: usize) -> Result<()> {
        let n = rows.iter().sum::<usize>();
        let tiles = t.div_ceil(64);
        // 4 bytes (hi and lo) per token and k, tokens padded to the tile.
        let mut xw = unsafe { self.alloc.alloc::<u32>(tiles * 64 * k) }?;
        let (ki, ti) = (k as i32, t as i32);
        let threads = tiles * (k / 64) * 128;
        let mut b = crate::launch::builder(&self.stream, &self.dense_wg_split);
        b.arg(xh).arg(xl).arg(&mut xw).arg(&ki).arg(&ti);
        unsafe { b.launch(LaunchConfig { grid_dim: (threads.div_ceil(256) as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }) }.map_err(drv("gemm_wg_split"))?;
        let i = DENSE_WG_ROWS.iter().position(|&r| r == block_rows).ok_or_else(|| Error::Backend(format!("wgmma GEMM blocks of {block_rows} rows: expected one of {DENSE_WG_ROWS:?}")))?;
        let f = &self.dense_wg_fns[i][usize::from(!fp8) + 2 * usize::from(splits > 1)];
        let mut b = crate::launch::builder(&self.stream, f);
        b.arg(&w);
        match scales {
            Some(s) => b.arg(s),
            None => b.arg(&0u64),
        };
        b.arg(&xw);
        match inv {
            Some(i) => b.arg(i),
            None => b.arg(&0u64),
        };
        let (n0, n1, ni) = (rows[0] as i32, rows[1] as i32, n as i32);
        b.arg(&ys[0]).arg(&ys[1]).arg(&ys[2]).arg(&n0).arg(&n1).arg(&ni).arg(&ki).arg(&ti);
        check(DENSE_WG_SPLITS.contains(&splits), || format!("wgmma GEMM in {splits} K splits: expected one of {DENSE_WG_SPLITS:?}"))?;
        // Split: the class sums, (9 - 8 / S) slots of every tile's 64 tokens x n rows.
        let csum = if splits > 1 { Some(unsafe { self.alloc.alloc::<f32>((9 - 8 / splits) * tiles * 64 * n) }?) } else { None };
        b.arg_or_null(csum.as_ref());
        let cfg = LaunchConfig { grid_dim: (tiles as u32, n.div_ceil(block_rows) as u32, splits as u32), block_dim: (2 * block_rows as u32, 1, 1), shared_mem_bytes: dense_wg_smem(block_rows) as u32 };
        unsafe { b.launch(cfg) }.map_err(drv(if fp8 { "gemm_wg*_fp8" } else { "gemm_wg*_bf16" }))?;
        if let Some(csum) = &csum {
            let mut b = crate::launch::builder(&self.stream, &self.dense_wg_combine);
            b.arg(csum);
            match inv {
                Some(i) => b.arg(i),
                None => b.arg(&0u64),
            };
            let si = splits as i32;
            b.arg(&ys[0]).arg(&ys[1]).arg(&ys[2]).arg(&n0).arg(&n1).arg(&ni).arg(&ti).arg(&si);
            unsafe { b.launch(LaunchConfig { grid_dim: ((n * t).div_ceil(256) as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }) }.map_err(drv("gemm_wg_combine"))?;
        }
        Ok(())
    }

    /// The block height and K splits with which a tensor-core GEMV of `t` tokens x `n` rows x
    /// `k` columns (K % 128 == 0) runs as the wgmma GEMM, or None: where the GPU has it, always
    /// when forced by `set_dense_gemm_wgmma` (at the forced height and splits, else the shape's,
    /// else 256 rows unsplit), never while a tile is forced (`force_gemv_tile`,
    /// `PEREGRINE_GEMV_TILE`) unless so, else where `dense_wg_for` takes it (at the forced height
    /// and splits if any).
    fn dense_gemm_wg(&self, t: usize, n: usize, k: usize) -> Option<(usize, usize)> {
        if !self.dense_wg {
            return None;
        }
        // (Splits forced to 1: the shapes the splits serve run what ran before them.)
        let by_shape = if self.mma_forced.is_none() { dense_wg_for(t, n, k, self.dense_wg_k_splits != Some(1)) } else { None };
        let forced = |(rows, splits): (usize, usize)| (self.dense_wg_rows.unwrap_or(rows), self.dense_wg_k_splits.unwrap_or(splits));
        match self.dense_wgmma {
            Some(false) => None,
            Some(true) => Some(forced(by_shape.unwrap_or((256, 1)))),
            None => by_shape.map(forced),
        }
    }

    /// Forces the wgmma GEMM's K splits (one of `DENSE_WG_SPLITS`) wherever it runs, or leaves
    /// them to the shape (`None`). The same bits either way; returns the setting before.
    pub fn set_dense_wg_k_splits(&mut self, splits: Option<usize>) -> Result<Option<usize>> {
        check(splits.is_none_or(|s| DENSE_WG_SPLITS.contains(&s)), || format!("wgmma GEMM in {splits:?} K splits: expected one of {DENSE_WG_SPLITS:?}"))?;
        Ok(std::mem::replace(&mut self.dense_wg_k_splits, splits))
    }

    /// Forces the wgmma GEMM's block height (one of `DENSE_WG_ROWS`) wherever it runs, or leaves
    /// it to the shape (`None`). The same bits either way; returns the setting before.
    pub fn set_dense_wg_rows(&mut self, rows: Option<usize>) -> Result<Option<usize>> {
        check(rows.is_none_or(|r| DENSE_WG_ROWS.contains(&r)), || format!("wgmma GEMM blocks of {rows:?} rows: expected one of {DENSE_WG_ROWS:?}"))?;
        Ok(std::mem::replace(&mut self.dense_wg_rows, rows))
    }

    /// Whether this GPU runs the wgmma dense GEMM (sm_90a, its shared memory granted).
    pub fn has_dense_gemm_wgmma(&self) -> bool {
        self.dense_wg
    }

    /// Runs every tensor-core GEMV and GEMM with K % 128 == 0 that zeroes no counters as the
    /// wgmma GEMM (`Some(true)`, where the GPU has it), never (`Some(false)`), or by the shape
    /// (`None`: `dense_wg_for`). The same bits either way; returns the setting before.
    pub fn set_dense_gemm_wgmma(&mut self, on: Option<bool>) -> Option<bool> {
        std::mem::replace(&mut self.dense_wgmma, on)
    }

    /// Whether a GEMV of tile `(nt, r)` over `blocks` blocks runs `gemv_mma_{bf16,fp8}_t1_pipe`:
    /// the one-tile kernel whose grid fits one wave of the pipelined kernel.
    fn pipe_takes(&self, fp8: bool, nt: usize, r: usize, blocks: usize) -> bool {
        let wave = if fp8 { self.mma_fp8_pipe_wave } else { self.mma_bf16_pipe_wave };
        self.gemv_pipe && (nt, r) == (1, 1) && blocks <= wave
    }

    /// Puts `MoeKernel::Gemm` on the wgmma kernels (`Some(true)`, where the GPU has them:
    /// sm_90a), on mma.sync (`Some(false)`), or lets the pairs per expert choose (`None`: from
    /// `GEMM_WGMMA_MIN_PAIRS_PER_EXPERT`). The same bits either way; returns the setting before.
    pub fn set_moe_gemm_wgmma(&mut self, on: Option<bool>) -> Option<bool> {
        std::mem::replace(&mut self.gemm_wgmma, on)
    }

    /// Whether `MoeKernel::Gemm` of `pairs` routed pairs over `experts` experts runs on wgmma.
    pub fn moe_gemm_on_wgmma(&self, pairs: usize, experts: usize) -> bool {
        self.wgmma_arch && self.gemm_wgmma.unwrap_or(pairs >= GEMM_WGMMA_MIN_PAIRS_PER_EXPERT * experts)
    }

    /// Whether this GPU has the wgmma MoE GEMM (sm_90a).
    pub fn has_moe_gemm_wgmma(&self) -> bool {
        self.wgmma_arch
    }

    /// Sets whether the one-token argmax lm_head asks L2 for its first K blocks before its PDL
    /// wait (`gemv_mma_bf16_t1_argmax_pf`; on by default), for measurements. Same bits.
    pub fn set_lm_head_prefetch(&mut self, on: bool) {
        self.lm_head_prefetch = on;
    }

    /// Runs the BF16 one-tile GEMV with its next K block loaded ahead where its grid fits
    /// (`gemv_mma_bf16_t1_pipe`, the default), or never (`false`). Same bits either way.
    pub fn set_gemv_pipe(&mut self, on: bool) {
        self.gemv_pipe = on;
    }

    /// Forces whether the q/k/v projection feeding the ready attention runs in blocks of 4
    /// warps (Some) or leaves it to the grid's waves (None, the default); tests compare both.
    pub fn set_qkv_ready4(&mut self, on: Option<bool>) {
        self.qkv_ready4 = on;
    }

    /// Runs the 4-warp q/k/v projection with its next K block loaded ahead always
    /// (`Some(true)`), never (`Some(false)`), or where its tiles fit one wave of it (`None`, the
    /// default). Same bits either way.
    pub fn set_qkv_pipe(&mut self, on: Option<bool>) {
        self.qkv_pipe = on;
    }

    /// Forces the one-token form of the pipelined 4-warp q/k/v projection (activations
    /// shuffled between lanes) on or off; None: only where the other does not fit one wave.
    pub fn set_qkv_pipe_shuffle(&mut self, on: Option<bool>) {
        self.qkv_pipe_shuffle = on;
    }

    /// The kernel `gemv_qkv_ready` runs for `rows` stacked rows of `t` tokens: in blocks of 8
    /// warps, or of 4 (`qkv_ready4_takes`), those loading their next K block ahead where the
    /// tiles fit one wave: of the 7-block kernel, else (one token) of the 8-block one with the
    /// activations shuffled. The 7-block kernel streamed better where both fit (Flash's
    /// full-attention layers, 848 tiles: 23.0 against 23.6 us in a batch-1 step);
    /// `qkv_pipe` and `qkv_pipe_shuffle` force either choice.
    pub fn qkv_ready_kernel(&self, rows: usize, t: usize) -> QkvReady {
        let tiles = rows.div_ceil(16);
        let fits = tiles <= self.mma_fp8_ready4_pipe_wave[0];
        let fits_shuffled = t == 1 && tiles <= self.mma_fp8_ready4_pipe_wave[1];
        if !self.qkv_ready4_takes(rows) {
            QkvReady::Warps8
        } else if !self.qkv_pipe.unwrap_or(fits || fits_shuffled) {
            QkvReady::Warps4
        } else if t == 1 && self.qkv_pipe_shuffle.unwrap_or(!fits) {
            QkvReady::PipeShuffled
        } else {
            QkvReady::Pipe
        }
    }

    /// Whether `gemv_qkv_ready` of `rows` stacked rows runs in blocks of 4 warps: forced, or
    /// where its 16-row tiles in blocks of 8 warps need more than one wave.
    pub fn qkv_ready4_takes(&self, rows: usize) -> bool {
        self.qkv_ready4.unwrap_or(rows.div_ceil(16) > self.mma_fp8_ready_wave)
    }

    /// The `MMA_GEMV_TILES` index a tensor-core GEMV of `t` tokens x `n` rows runs: the forced
    /// tile, or the default for the shape.
    fn mma_tile(&self, fp8: bool, t: usize, n: usize) -> usize {
        self.mma_forced.unwrap_or_else(|| mma_gemv_tile(fp8, t, n, self.dense_gemm))
    }

    /// Whether `gemv_bf16_presplit` of `t` tokens x `n` rows runs the one-tile GEMV, the only one
    /// that zeroes counters (`zero`).
    pub fn bf16_presplit_zeroes(&self, t: usize, n: usize) -> bool {
        MMA_GEMV_TILES[self.mma_tile(false, t, n)] == (1, 1)
    }

    /// `y[t, n] = W[n, :] · x[t, :]` for BF16 `W` [N, K] with x given as its BF16 hi + lo parts
    /// [T, K] (as the attention kernels write them); K % 128 == 0.
    /// `zero`: counters to zero once the kernel ahead has finished (a ready attention's,
    /// `zero_after_wait`).
    #[allow(clippy::too_many_arguments)]
    pub fn gemv_bf16_presplit(&self, w: &CudaSlice<u16>, xh: &CudaSlice<u16>, xl: &CudaSlice<u16>, y: &mut CudaSlice<f32>, n: usize, k: usize, t: usize, zero: Option<&CudaSlice<u32>>) -> Result<()> {
        check(k.is_multiple_of(128) && w.len() >= n * k && xh.len() >= t * k && xl.len() >= t * k && y.len() >= t * n, || format!("gemv_bf16_presplit: bad shapes {n}x{k}, {t} tokens"))?;
        // An empty launch would leave the counters as they are.
        check(zero.is_none() || (t > 0 && n > 0), || "gemv_bf16_presplit: counters to zero, but nothing to launch".to_string())?;
        if t == 0 || n == 0 {
            return Ok(());
        }
        let (wp, _w) = w.device_ptr(&self.stream);
        let (yp, _y) = y.device_ptr_mut(&self.stream);
        self.mma_launch(false, wp, None, xh, xl, None, [yp; 3], [n, 0, 0], k, t, zero)
    }

    /// Whether `gemv_bf16_presplit_argmax` takes `t` tokens of an `n` x `k` BF16 matrix: one
    /// token on the one-tile GEMV that `gemv_bf16_presplit` would run (a grid of more than one
    /// wave of the pipelined one, the lm_head's; no forced tile).
    pub fn bf16_argmax_takes(&self, t: usize, n: usize, k: usize) -> bool {
        t == 1 && n > 0 && k.is_multiple_of(128) && MMA_GEMV_TILES[self.mma_tile(false, 1, n)] == (1, 1) && self.dense_gemm_wg(1, n, k).is_none() && !self.pipe_takes(false, 1, 1, n.div_ceil(16))
    }

    /// `gemv_bf16_presplit` of one token (`bf16_argmax_takes`) that also folds its rows into the
    /// argmax keys `keys[s * ARGMAX_KEY_STRIDE]`, s < `ARGMAX_KEY_SLOTS` (zero before the call;
    /// `argmax_unpack` reads and zeroes them): the same y, and the id argmax_rows would pick.
    #[allow(clippy::too_many_arguments)]
    pub fn gemv_bf16_presplit_argmax(&self, w: &CudaSlice<u16>, xh: &CudaSlice<u16>, xl: &CudaSlice<u16>, y: &mut CudaSlice<f32>, n: usize, k: usize, keys: &CudaSlice<u64>) -> Result<()> {
        check(self.bf16_argmax_takes(1, n, k), || format!("gemv_bf16_presplit_argmax: {n}x{k} is not its shape"))?;
        check(w.len() >= n * k && xh.len() >= k && xl.len() >= k && y.len() >= n && keys.len() >= ARGMAX_KEY_SLOTS * ARGMAX_KEY_STRIDE, || format!("gemv_bf16_presplit_argmax: bad shapes {n}x{k}"))?;
        let (ni, ki, ti, slots, stride) = (n as i32, k as i32, 1i32, ARGMAX_KEY_SLOTS as i32, ARGMAX_KEY_STRIDE as i32);
        let mut b = crate::launch::builder(&self.stream, if self.lm_head_prefetch { &self.mma_bf16_argmax_pf } else { &self.mma_bf16_argmax });
        let (yp, _y) = y.device_ptr_mut(&self.stream);
        b.arg(w).arg(&0u64).arg(xh).arg(xl).arg(&0u64).arg(&yp).arg(&yp).arg(&yp).arg(&ni).arg(&0i32).arg(&ni).arg(&ki).arg(&ti);
        b.arg(keys).arg(&slots).arg(&stride);
        let cfg = LaunchConfig { grid_dim: (n.div_ceil(16) as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        unsafe { b.launch(cfg) }.map_err(drv("gemv_mma_bf16_t1_argmax"))?;
        Ok(())
    }

    /// Whether `gemv_bf16_presplit_route` takes an o_proj of `n` x `k` at one token with a
    /// router of `experts` rows: the pipelined one-tile kernel's shapes (one wave).
    pub fn oproj_route_takes(&self, n: usize, k: usize, experts: usize) -> bool {
        n.is_multiple_of(16) && k.is_multiple_of(128) && (1..=ROUTE_OPROJ_MAX_EXPERTS).contains(&experts) && self.pipe_takes(false, 1, 1, n / 16)
    }

    /// `gemv_bf16_presplit` of one token (`oproj_route_takes`) that also starts the MoE's router
    /// (gemv_mma_bf16_t1_pipe_route): y = o as before, and with h = res + o, norm * h, the
    /// blocks' sums of squares of h and the router's fixed-point sums over norm * h into `r`'s
    /// buffers.
    #[allow(clippy::too_many_arguments)]
    pub fn gemv_bf16_presplit_route(&self, w: &CudaSlice<u16>, xh: &CudaSlice<u16>, xl: &CudaSlice<u16>, y: &mut CudaSlice<f32>, n: usize, k: usize, zero: Option<&CudaSlice<u32>>, r: &RouteInOproj) -> Result<()> {
        check(self.oproj_route_takes(n, k, r.experts), || format!("gemv_bf16_presplit_route: {n}x{k} with {} experts is not its shape", r.experts))?;
        check(w.len() >= n * k && xh.len() >= k && xl.len() >= k && y.len() >= n, || format!("gemv_bf16_presplit_route: bad shapes {n}x{k}"))?;
        check(r.res.len() >= n && r.norm.len() >= n && r.router.len() >= r.experts * n && r.ssq.len() >= n / 16 && r.hg.len() >= n && r.acc != 0 && r.copies >= 1, || "gemv_bf16_presplit_route: router buffers too small".into())?;
        let (wp, _w) = w.device_ptr(&self.stream);
        let (ni, ki, ti, ei) = (n as i32, k as i32, 1i32, r.experts as i32);
        let mut b = crate::launch::builder(&self.stream, &self.mma_bf16_pipe_route);
        b.arg(&wp).arg(&0u64).arg(xh).arg(xl).arg(&0u64);
        b.arg(&mut *y).arg(&0u64).arg(&0u64).arg(&ni).arg(&0i32).arg(&ni).arg(&ki).arg(&ti);
        let nzero = zero.map_or(0, |z| z.len() as i32);
        b.arg_or_null(zero).arg(&nzero);
        let ci = r.copies as i32;
        b.arg(r.res).arg(r.norm).arg(r.router).arg(&ei).arg(&r.acc).arg(&ci).arg(r.ssq).arg(r.hg);
        let cfg = LaunchConfig { grid_dim: ((n / 16) as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: (r.experts * 64) as u32 };
        unsafe { b.launch(cfg) }.map_err(drv("gemv_mma_bf16_t1_pipe_route"))?;
        Ok(())
    }

    /// `gemv_fp8` over x given as its F16 split (`split_f16`'s hi, lo and inverse scales, e.g.
    /// from `silu_mul_split_f16`).
    #[allow(clippy::too_many_arguments)]
    pub fn gemv_fp8_presplit(&self, w: &CudaSlice<u8>, scales: &CudaSlice<f32>, x: &F16Split, y: &mut CudaSlice<f32>, n: usize, k: usize, t: usize) -> Result<()> {
        let (xh, xl, inv) = x;
        check(k.is_multiple_of(128) && w.len() >= n * k && scales.len() >= n.div_ceil(128) * (k / 128), || format!("gemv_fp8_presplit: bad shapes {n}x{k}"))?;
        check(xh.len() >= t * k && xl.len() >= t * k && inv.len() >= t && y.len() >= t * n, || format!("gemv_fp8_presplit: buffers too small for {t} tokens of {n}x{k}"))?;
        if t == 0 || n == 0 {
            return Ok(());
        }
        let (wp, _w) = w.device_ptr(&self.stream);
        let (yp, _y) = y.device_ptr_mut(&self.stream);
        self.mma_launch(true, wp, Some(scales), xh, xl, Some(inv), [yp; 3], [n, 0, 0], k, t, None)
    }

    /// Whether `silu_mul_split_f16` takes rows of `i` values: I % 8 == 0, held in registers by
    /// 1024 threads of SILU_SPLIT_GROUPS groups of 8.
    pub fn silu_split_takes(i: usize) -> bool {
        i > 0 && i.is_multiple_of(8) && i <= 8 * SILU_SPLIT_GROUPS * 1024
    }

    /// a = silu(gate) x up of `rows` rows of a stacked gate_up output `y` ([rows, 2 i]: gate
    /// then up), as its F16 split (`split_f16` without interleave): the bits of `silu_mul`
    /// then `split_f16`, one launch.
    pub fn silu_mul_split_f16(&self, y: &CudaSlice<f32>, rows: usize, i: usize) -> Result<F16Split> {
        check(Self::silu_split_takes(i) && y.len() >= rows * 2 * i, || format!("silu_mul_split_f16: {rows} rows of 2 x {i} (I % 8 == 0, at most {})", 8 * SILU_SPLIT_GROUPS * 1024))?;
        let len = rows * i;
        let mut xh = unsafe { self.alloc.alloc::<u16>(len) }?;
        let mut xl = unsafe { self.alloc.alloc::<u16>(len) }?;
        let mut inv = unsafe { self.alloc.alloc::<f32>(rows) }?;
        let (ld, ii) = ((2 * i) as i32, i as i32);
        let mut b = crate::launch::builder(&self.stream, &self.silu_split_f16);
        b.arg(y).arg(&ld).arg(&ii).arg(&mut xh).arg(&mut xl).arg(&mut inv);
        // A thread per group of 8 up to 1024 threads, then up to SILU_SPLIT_GROUPS groups each
        // (the row's max is exact whatever the layout, so the same bits): Flash's I = 16384 ran
        // 512 threads of 4 groups, one block on one SM at the head of the dense down.
        let threads = (i / 8).div_ceil(32).clamp(1, 32) * 32;
        unsafe { b.launch(LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (threads as u32, 1, 1), shared_mem_bytes: 0 }) }.map_err(drv("silu_mul_split_f16"))?;
        Ok((xh, xl, inv))
    }

    /// MXFP4 `W` [N, K/2] bytes with E8M0 scales [N, K/32]; K % 32 == 0.
    pub fn gemv_mxfp4(&self, w: &CudaSlice<u8>, s: &CudaSlice<u8>, x: &CudaSlice<f32>, y: &mut CudaSlice<f32>, n: usize, k: usize, t: usize) -> Result<()> {
        check(k.is_multiple_of(32) && w.len() >= n * k / 2 && s.len() >= n * k / 32, || format!("gemv_mxfp4: bad shapes {n}x{k}"))?;
        let (ni, ki) = (n as i32, k as i32);
        Self::per_pass(x, y, n, k, t, |xs, mut ys, tt| {
            // The smallest compiled token count that covers this pass.
            let v = match tt { 1 => 0, 2 => 1, 3 | 4 => 2, _ => 3 };
            let mut b = crate::launch::builder(&self.stream, &self.mxfp4_t[v]);
            b.arg(w).arg(s).arg(&xs).arg(&mut ys).arg(&ni).arg(&ki).arg(&tt);
            let cfg = LaunchConfig { grid_dim: ((n as u32).div_ceil(ROWS_PER_BLOCK * 4), 1, 1), block_dim: (32 * ROWS_PER_BLOCK, 1, 1), shared_mem_bytes: 0 };
            unsafe { b.launch(cfg) }.map(|_| ()).map_err(drv("gemv_mxfp4"))
        })
    }

    /// The first MXFP4 GEMV (one row per warp), kept for comparison in the bench.
    pub fn gemv_mxfp4_v1(&self, w: &CudaSlice<u8>, s: &CudaSlice<u8>, x: &CudaSlice<f32>, y: &mut CudaSlice<f32>, n: usize, k: usize, t: usize) -> Result<()> {
        check(k.is_multiple_of(32) && w.len() >= n * k / 2 && s.len() >= n * k / 32, || format!("gemv_mxfp4: bad shapes {n}x{k}"))?;
        let (ni, ki) = (n as i32, k as i32);
        Self::per_pass(x, y, n, k, t, |xs, mut ys, tt| {
            let mut b = crate::launch::builder(&self.stream, &self.mxfp4);
            b.arg(w).arg(s).arg(&xs).arg(&mut ys).arg(&ni).arg(&ki).arg(&tt);
            unsafe { b.launch(Self::rows_cfg(n, 1)) }.map(|_| ()).map_err(drv("gemv_mxfp4"))
        })
    }

    pub fn upload_routing(&self, r: &MoeRouting, num_experts: usize) -> Result<DeviceRouting> {
        check(r.experts.iter().all(|&e| (e as usize) < num_experts), || "routing names an expert out of range".into())?;
        let up_i = |v: &[i32]| self.stream.clone_htod(v).map_err(drv("routing upload"));
        Ok(DeviceRouting {
            experts: up_i(&r.experts)?,
            pair_off: up_i(&r.pair_off)?,
            pair_tok: up_i(&r.pair_tok)?,
            pair_w: self.stream.clone_htod(&r.pair_w).map_err(drv("routing upload"))?,
            tok_pairs: up_i(&r.tok_pairs)?,
            num_experts_used: r.experts.len(),
            num_pairs: r.num_pairs(),
            num_tokens: r.tok_pairs.len() / r.top_k.max(1),
            top_k: r.top_k,
        })
    }

    /// Counters the tiled kernels need for up to `max_pairs` pairs: the combine's arrivals per
    /// group of 8 down tiles, then two per expert slot for the waits of the fused kernel and of
    /// the two-launch down kernel.
    pub fn moe_counters(w: &MoeWeights, max_pairs: usize) -> usize {
        ((w.hidden / 16).div_ceil(8) + 2 * max_pairs.min(w.num_experts)).max(1)
    }

    pub fn moe_scratch(&self, w: &MoeWeights, max_pairs: usize) -> Result<MoeScratch> {
        let counters = self.zeros(Self::moe_counters(w, max_pairs))?;
        self.moe_scratch_with(w, max_pairs, counters)
    }

    /// Scratch around counters kept from an earlier call (zero between calls: the kernels reset
    /// them), so a decode step sets no memory per layer.
    pub fn moe_scratch_with(&self, w: &MoeWeights, max_pairs: usize, counters: CudaSlice<u32>) -> Result<MoeScratch> {
        check(counters.len() >= Self::moe_counters(w, max_pairs), || "MoE counters too small".into())?;
        Ok(MoeScratch {
            // Written in full (rows of every pair) before they are read.
            h: unsafe { self.alloc.alloc(max_pairs.max(1) * w.inter) }?,
            out: unsafe { self.alloc.alloc(max_pairs.max(1) * w.hidden) }?,
            counters,
        })
    }

    /// The MXFP4 MoE decode: `y[t] = sum_s w[t,s] * down_e(silu(gate_e x_t) * up_e x_t)` over
    /// token t's routed experts e, for x [T, H] -> y [T, H]: the tiled kernels for tiled
    /// weights; for row-major ones the tensor-core kernels when H and I are multiples of 64,
    /// else the CUDA-core v2 kernels.
    ///
    /// `input` says how old `x` is: with `MoeInput::Settled` one token's x is read before the
    /// kernel waits for the one ahead (see `MoeInput`).
    #[allow(clippy::too_many_arguments)]
    pub fn moe_mxfp4(&self, w: &MoeWeights, r: &DeviceRouting, x: &CudaSlice<f32>, input: MoeInput, scratch: &mut MoeScratch, y: &mut CudaSlice<f32>) -> Result<()> {
        self.moe_mxfp4_with(self.moe_kernel(w, r.num_tokens, r.top_k), w, r, x, input, scratch, y)
    }

    /// The fused MoE kernel's %globaltimer stamps from its last call (`MOE_TRACE_SLOTS` per
    /// block; see kernels/moe.cu), then zeroed: only in a measurement build of the kernels
    /// (`PEREGRINE_KERNEL_DEFINES=-DMOE_TRACE`), else None.
    pub fn moe_trace(&self) -> Result<Option<Vec<u64>>> {
        self.take_global(&self.moe_module, "moe_trace")
    }

    /// The wgmma GEMM's per-stage clock stamps from its last call (see GWG_TRACE in
    /// kernels/gemv.cu), then zeroed: only in a measurement build (`-DGWG_TRACE`), else None.
    pub fn gwg_trace(&self) -> Result<Option<Vec<u32>>> {
        self.take_global(&self.gemv_module, "gwg_trace")
    }

    /// The sampler's phase stamps from its last call (row 0's first block: phase id in the top
    /// 16 bits, clock64 below; see SAMPLE_TRACE in kernels/sample.cu), then zeroed: only in a
    /// measurement build (`-DSAMPLE_TRACE`), else None.
    pub fn sample_trace(&self) -> Result<Option<Vec<u64>>> {
        self.take_global(&self.sample_module, "sample_trace")
    }

    /// A measurement build's device array `name` of `module`, copied out and zeroed; None where
    /// the module has no such symbol (a build without the define).
    fn take_global<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits + Default + Clone>(&self, module: &Arc<cudarc::driver::CudaModule>, name: &str) -> Result<Option<Vec<T>>> {
        let Ok(mut g) = module.get_global(name, &self.stream) else { return Ok(None) };
        let n = g.len() / std::mem::size_of::<T>();
        let mut v = unsafe { g.transmute_mut::<T>(n) }.ok_or_else(|| Error::Backend(format!("{name}: bad size")))?;
        let host = self.stream.clone_dtoh(&v).map_err(drv(name))?;
        self.stream.memset_zeros(&mut v).map_err(drv(name))?;
        Ok(Some(host))
    }

    /// The step-trace stamps of this object's modules and `more` since the last read, then
    /// cleared: only in a measurement build (`-DSTEP_TRACE`, crate::trace), else None.
    pub fn step_trace(&self, more: &[&Arc<cudarc::driver::CudaModule>]) -> Result<Option<crate::trace::StepTrace>> {
        let mut modules = vec![&self.gemv_module, &self.sample_module, &self.moe_module];
        modules.extend_from_slice(more);
        crate::trace::read(&modules, &self.stream)
    }

    /// The kernel `moe_mxfp4` runs for `tokens` tokens of top-k routing over `w`: for tiled
    /// weights the forced one (`PEREGRINE_MOE_KERNEL`), else the tuned one, else `for_tiled`.
    pub fn moe_kernel(&self, w: &MoeWeights, tokens: usize, top_k: usize) -> MoeKernel {
        match w.layout {
            MoeLayout::Tiled { .. } => match MoeKernel::forced() {
                Some(kind) => kind.filter(|k| !matches!(k, MoeKernel::Fused { .. }) || top_k <= MAX_FUSED_TOPK).unwrap_or_else(|| MoeKernel::for_tiled(tokens, top_k)),
                None if !self.gemm && tokens > crate::moe_tune::TUNED_TOKENS => MoeKernel::TILED,
                None => self.tuned_moe(w, top_k, tokens).unwrap_or_else(|| MoeKernel::for_tiled(tokens, top_k)),
            },
            MoeLayout::RowMajor { .. } if w.hidden.is_multiple_of(64) && w.inter.is_multiple_of(64) => MoeKernel::for_tokens(tokens),
            MoeLayout::RowMajor { .. } => MoeKernel::V2,
        }
    }

    /// Whether the two-launch tiled MoE reads x split once per token (`split_x`) and h once per
    /// expert slot (`split_h`, which needs `split_x`) from 2 tokens, as `PEREGRINE_MOE_PRESPLIT`
    /// sets at load: for tests of the other paths (every setting gives the same bits). Returns
    /// the settings it replaces.
    pub fn set_moe_presplit(&mut self, split_x: bool, split_h: bool) -> (bool, bool) {
        let old = (self.presplit, self.presplit_h);
        self.presplit = split_x;
        self.presplit_h = split_h;
        old
    }

    /// Whether the MoE GEMM may be chosen without being forced (`PEREGRINE_MOE_GEMM`).
    pub(crate) fn gemm_enabled(&self) -> bool {
        self.gemm
    }

    /// Pairs one pass of the two-launch tiled MoE kernel with a `stages` x `steps` gate_up ring
    /// stages for `tokens` tokens of `w`, as `moe_mxfp4_with` launches it (tests check that wide
    /// experts take fewer than 4; the tuner compares rings by it).
    pub fn moe_tiled_staged_pairs(&self, w: &MoeWeights, stages: usize, steps: usize, tokens: usize) -> Result<usize> {
        let v = Self::tiled_variant(stages, steps)?;
        self.staged_pairs(self.gate_up_kernel(v, tokens), ring_bytes(stages, steps), w.hidden.max(w.inter), tokens, 0)
    }

    /// Whether the two-launch MoE of `tokens` tokens reads x split once per token: from 2
    /// tokens, unless `presplit` is off.
    fn splits_x(&self, tokens: usize) -> bool {
        self.presplit && tokens >= 2
    }

    /// Whether `moe_mxfp4` of `tokens` tokens of top-k routing over `w` reads x split, so that
    /// x's producer may write the split (`MoeInput::Split`) and save the call its split launch.
    pub fn moe_reads_split(&self, w: &MoeWeights, tokens: usize, top_k: usize) -> bool {
        self.moe_kind_reads_split(self.moe_kernel(w, tokens, top_k), w, tokens, top_k)
    }

    /// `moe_reads_split` for a step's MoE of `tokens` rows (`moe_kernel_rows`).
    pub fn moe_reads_split_rows(&self, w: &MoeWeights, tokens: usize, top_k: usize, decode: bool) -> bool {
        self.moe_kind_reads_split(self.moe_kernel_rows(w, tokens, top_k, decode), w, tokens, top_k)
    }

    /// The kernel a step's MoE of `tokens` rows runs: `moe_kernel`, except that above
    /// `moe_tune::TUNED_TOKENS` rows the tuned choice serves decode rows only (`decode`: each row
    /// its sequence's only new token, routed about as the tuner's uniform routings). A verify
    /// block's tokens may share experts, where the tiled kernels lose to the MoE GEMM (H100,
    /// Flash, 16 tokens drawn from a pool of 16 / 32 experts: 27 / 53% of copy bandwidth against
    /// 53 / 74%; benches/results/2026-11-26-moe-tuned-decode-buckets.md), so those rows keep the default.
    pub fn moe_kernel_rows(&self, w: &MoeWeights, tokens: usize, top_k: usize, decode: bool) -> MoeKernel {
        if !decode && tokens > crate::moe_tune::TUNED_TOKENS && matches!(w.layout, MoeLayout::Tiled { .. }) && MoeKernel::forced().is_none() {
            return if self.gemm { MoeKernel::for_tiled(tokens, top_k) } else { MoeKernel::TILED };
        }
        self.moe_kernel(w, tokens, top_k)
    }

    /// Whether MoE kernel `kind` reads x split for `tokens` tokens of top-k routing over `w`
    /// (takes `MoeInput::Split`'s rows): the two-launch tiled kernels from 2 tokens
    /// (`splits_x`) and the MoE GEMM.
    pub fn moe_kind_reads_split(&self, kind: MoeKernel, w: &MoeWeights, tokens: usize, top_k: usize) -> bool {
        match kind {
            MoeKernel::Tiled { .. } => self.splits_x(tokens),
            // (On wgmma it splits x itself, into that kernel's layout.)
            MoeKernel::Gemm => !self.moe_gemm_on_wgmma(tokens * top_k, w.num_experts),
            _ => false,
        }
    }

    /// The two-launch gate_up kernel of ring `v` for `tokens` tokens (`splits_x`: the one that
    /// reads x split already).
    fn gate_up_kernel(&self, v: usize, tokens: usize) -> &CudaFunction {
        if self.splits_x(tokens) { &self.gate_up_split[v] } else { &self.gate_up_tiled[v] }
    }

    /// Pairs a pass of tiled MoE kernel `f` stages (shared memory: `ring` bytes of rings, 4 `k`
    /// bytes per staged pair, at least `floor` bytes): one per token, at most 4 (`NP` in
    /// moe.cu), and fewer where that keeps two blocks resident per SM. Eight warps alone do not
    /// keep enough bytes in flight: 4 staged rows of a 6144-wide x (MiMo-V2.5-Pro) left room
    /// for one block, and its 4-16 token MoE ran at 77-79% of copy bandwidth against 86-91%
    /// now. The price: an expert with more pairs than a pass stages streams its weights again
    /// per extra pass, which costs where tokens share experts (all 8 tokens drawing from 16
    /// experts: 44 -> 35%; benches/results/2026-11-23-moe-two-blocks.md).
    fn staged_pairs(&self, f: &CudaFunction, ring: usize, k: usize, tokens: usize, floor: usize) -> Result<usize> {
        let mut np = tokens.clamp(1, 4);
        if !self.two_blocks {
            return Ok(np);
        }
        while np > 1 {
            let smem = (ring + k * 4 * np).max(floor);
            if smem <= TILED_MAX_SMEM && self.blocks_per_sm(f, smem)? >= 2 {
                break;
            }
            np -= 1;
        }
        Ok(np)
    }

    /// Resident 256-thread blocks of `f` per SM with `smem` bytes of dynamic shared memory.
    fn blocks_per_sm(&self, f: &CudaFunction, smem: usize) -> Result<usize> {
        let key = (f.cu_function() as usize, smem);
        let mut cache = self.occupancy.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(&n) = cache.get(&key) {
            return Ok(n);
        }
        let n = f.occupancy_max_active_blocks_per_multiprocessor(256, smem, None).map_err(drv("MoE occupancy"))? as usize;
        cache.insert(key, n);
        Ok(n)
    }

    /// The index in `TILED_VARIANTS` of a ring of `stages` x `steps`.
    fn tiled_variant(stages: usize, steps: usize) -> Result<usize> {
        TILED_VARIANTS
            .iter()
            .position(|&p| p == (stages, steps))
            .ok_or_else(|| Error::Backend(format!("tiled MoE kernel ({stages} stages of {steps}) is not compiled; have {TILED_VARIANTS:?}")))
    }

    /// The launch of fused kernel `f` (a ring of `stages` x `steps`) for `tokens` tokens over
    /// `u` expert slots: shared memory for the rings and up to 4 staged rows (at least
    /// `scratch` bytes), a grid no larger than what is resident at once (block b starts with
    /// item b, and down items wait on gate_up items), at most `max_blocks` blocks (0: no limit).
    #[allow(clippy::too_many_arguments)]
    fn fused_grid(&self, f: &CudaFunction, w: &MoeWeights, stages: usize, steps: usize, max_blocks: usize, tokens: usize, u: usize, scratch: usize, counters: &CudaSlice<u32>) -> Result<LaunchConfig> {
        let (h, i) = (w.hidden, w.inter);
        let ring = ring_bytes(stages, steps);
        let np = self.staged_pairs(f, ring, h.max(i), tokens, scratch)?;
        let smem = (ring + h.max(i) * 4 * np).max(scratch);
        check(smem <= TILED_MAX_SMEM, || format!("MoE dims {h}, {i} need more than {TILED_MAX_SMEM} bytes of shared memory"))?;
        let (gug, dg) = ((i / 8).div_ceil(8), (h / 16).div_ceil(8));
        check(counters.len() >= dg + 2 * u, || "MoE scratch counters too small".into())?;
        let fit = self.blocks_per_sm(f, smem)?;
        check(fit > 0, || format!("the fused MoE kernel does not fit an SM with {smem} bytes of shared memory"))?;
        let resident = fit * self.sms;
        let blocks = if max_blocks == 0 { resident } else { max_blocks.min(resident) };
        let items = u * (gug + dg);
        Ok(LaunchConfig { grid_dim: (items.min(blocks) as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: smem as u32 })
    }

    /// One token's routed MLP with its routing done inside the fused kernel
    /// (`moe_fused_routed_*`: each block runs moe_route's router on the token's `logits` [E] and
    /// groups the choices itself), so a batch-1 step has no routing launch. Same experts,
    /// weights and arithmetic as `moe_route` followed by `moe_mxfp4_with(kind, ..)`, bit for bit.
    /// `kind` must be `MoeKernel::Fused` and the weights tiled. `input` as for `moe_mxfp4`: x is
    /// settled when it is older than the launch that wrote `logits` (the router GEMV).
    #[allow(clippy::too_many_arguments)]
    pub fn moe_mxfp4_routed(&self, kind: MoeKernel, spec: &MoeSpec, w: &MoeWeights, logits: &CudaSlice<f32>, bias: Option<&CudaSlice<f32>>, x: &CudaSlice<f32>, input: MoeInput, scratch: &mut MoeScratch, y: &mut CudaSlice<f32>) -> Result<()> {
        self.moe_routed_run(kind, spec, w, logits, bias, x, input, scratch, RoutedOut::Combined(y))
    }

    /// `moe_mxfp4_routed` without the routed combine: each of the token's top-k pairs' weighted
    /// output stays in `scratch.out` [top_k, H], and `tok_pairs` [top_k] gets the token's pair
    /// indices, for the residual add after the MoE to sum (ops.cu's PairsAddend: the same bits
    /// as the combine). The down items then skip the combine's fence, count and last-item sum.
    #[allow(clippy::too_many_arguments)]
    pub fn moe_mxfp4_routed_pairs(&self, kind: MoeKernel, spec: &MoeSpec, w: &MoeWeights, logits: &CudaSlice<f32>, bias: Option<&CudaSlice<f32>>, x: &CudaSlice<f32>, input: MoeInput, scratch: &mut MoeScratch, tok_pairs: &mut CudaSlice<i32>) -> Result<()> {
        self.moe_routed_run(kind, spec, w, logits, bias, x, input, scratch, RoutedOut::Pairs(tok_pairs))
    }

    #[allow(clippy::too_many_arguments)]
    fn moe_routed_run(&self, kind: MoeKernel, spec: &MoeSpec, w: &MoeWeights, logits: &CudaSlice<f32>, bias: Option<&CudaSlice<f32>>, x: &CudaSlice<f32>, input: MoeInput, scratch: &mut MoeScratch, mut result: RoutedOut) -> Result<()> {
        let (e, k, h) = (spec.num_experts, spec.top_k, w.hidden);
        let (MoeLayout::Tiled { gate_up, down }, MoeKernel::Fused { stages, steps, max_blocks }) = (&w.layout, kind) else {
            return Err(Error::Backend(format!("the routed MoE kernel runs the fused kernel over tiled weights, not {kind:?}")));
        };
        Self::check_routed_spec(spec, w)?;
        let out_fits = match &result {
            RoutedOut::Combined(y) => y.len() >= h,
            RoutedOut::Pairs(tp) => tp.len() >= k,
        };
        check(logits.len() >= e && bias.is_none_or(|b| b.len() >= e) && x.len() >= h && out_fits, || "routed MoE: buffers too small".into())?;
        check(scratch.h.len() >= k * w.inter && scratch.out.len() >= k * h, || "MoE scratch too small".into())?;
        let u = k.min(e);
        let f = &self.fused_routed[Self::tiled_variant(stages, steps)?];
        let cfg = self.fused_grid(f, w, stages, steps, max_blocks, 1, u, 8 * e, &scratch.counters)?;
        let (hh, ii, ui) = (h as i32, w.inter as i32, u as i32);
        let mut b = crate::launch::builder(&self.stream, f);
        b.arg(logits);
        match bias {
            Some(bb) => b.arg(bb),
            None => b.arg(&0u64),
        };
        Self::routing_args(&mut b, spec);
        b.arg(gate_up).arg(down).arg(x).arg(&mut scratch.h).arg(&mut scratch.out).arg(&hh).arg(&ii).arg(&ui).arg(&mut scratch.counters);
        let settled = input.settled_flag();
        match &mut result {
            RoutedOut::Combined(y) => b.arg(&mut **y).arg(&settled).arg(&0u64),
            RoutedOut::Pairs(tp) => b.arg(&0u64).arg(&settled).arg(&mut **tp),
        };
        unsafe { b.launch(cfg) }.map_err(drv("moe (fused, routed)"))?;
        Ok(())
    }

    /// `moe_mxfp4_routed_pairs` after the o_proj that did the router (`gemv_bf16_presplit_route`
    /// with `r`): the logits from `r.acc` and the post-attention norm's 1 / rms from `r.ssq`,
    /// x = (norm * h) * inv staged from `r.hg` (moe_fused_acc_*). `zero_acc` (device address, 0
    /// for none) of `nzero` u64: the accumulators of the MoE layer before, which block 0 zeroes.
    #[allow(clippy::too_many_arguments)]
    pub fn moe_mxfp4_acc_pairs(&self, kind: MoeKernel, spec: &MoeSpec, w: &MoeWeights, r: &RouteInOproj, eps: f32, bias: Option<&CudaSlice<f32>>, scratch: &mut MoeScratch, tok_pairs: &mut CudaSlice<i32>, zero_acc: u64, nzero: usize) -> Result<()> {
        let (e, k, h) = (spec.num_experts, spec.top_k, w.hidden);
        let (MoeLayout::Tiled { gate_up, down }, MoeKernel::Fused { stages, steps, max_blocks }) = (&w.layout, kind) else {
            return Err(Error::Backend(format!("the routed MoE kernel runs the fused kernel over tiled weights, not {kind:?}")));
        };
        Self::check_routed_spec(spec, w)?;
        check(e == r.experts, || format!("routed MoE: {e} experts, the o_proj's router has {}", r.experts))?;
        check(h.is_multiple_of(16) && r.ssq.len() >= h / 16 && r.hg.len() >= h && r.acc != 0 && r.copies >= 1 && bias.is_none_or(|b| b.len() >= e) && tok_pairs.len() >= k, || "routed MoE (router in the o_proj): buffers too small".into())?;
        check(scratch.h.len() >= k * w.inter && scratch.out.len() >= k * h, || "MoE scratch too small".into())?;
        let u = k.min(e);
        let f = &self.fused_acc[Self::tiled_variant(stages, steps)?];
        // Shared scratch before the rings: scores, choices, logits and the bias, E floats each.
        let cfg = self.fused_grid(f, w, stages, steps, max_blocks, 1, u, 16 * e, &scratch.counters)?;
        let (hh, ii, ui, nssq, nz) = (h as i32, w.inter as i32, u as i32, (h / 16) as i32, nzero as i32);
        let mut b = crate::launch::builder(&self.stream, f);
        let ci = r.copies as i32;
        b.arg(&r.acc).arg(&ci).arg(r.ssq).arg(&nssq).arg(&eps);
        match bias {
            Some(bb) => b.arg(bb),
            None => b.arg(&0u64),
        };
        Self::routing_args(&mut b, spec);
        b.arg(gate_up).arg(down).arg(r.hg).arg(&mut scratch.h).arg(&mut scratch.out).arg(&hh).arg(&ii).arg(&ui).arg(&mut scratch.counters);
        b.arg(&0u64).arg(&mut *tok_pairs).arg(&zero_acc).arg(&nz);
        unsafe { b.launch(cfg) }.map_err(drv("moe (fused, router in the o_proj)"))?;
        Ok(())
    }

    /// What the routed fused kernels take of a routing: E experts, top-K within
    /// MAX_FUSED_TOPK, groups that divide E.
    fn check_routed_spec(spec: &MoeSpec, w: &MoeWeights) -> Result<()> {
        let (e, k) = (spec.num_experts, spec.top_k);
        check(e == w.num_experts && (1..=MAX_FUSED_TOPK).contains(&k) && spec.n_group <= 64 && (spec.n_group <= 1 || e.is_multiple_of(spec.n_group)), || format!("routed MoE: {e} experts in {} groups, top-{k}", spec.n_group))
    }

    /// The routed fused kernels' routing arguments, in their order: E, K, softmax, n_group,
    /// topk_group, norm, scale.
    fn routing_args(b: &mut crate::launch::Launch<'_>, spec: &MoeSpec) {
        let (ei, ki, sm, ng, tg, norm) = (spec.num_experts as i32, spec.top_k as i32, matches!(spec.scoring, RouterScoring::Softmax) as i32, spec.n_group as i32, spec.topk_group as i32, spec.norm_topk_prob as i32);
        b.arg(&ei).arg(&ki).arg(&sm).arg(&ng).arg(&tg).arg(&norm).arg(&spec.routed_scaling_factor);
    }

    /// The MoE decode with a chosen kernel generation (the bench compares them); the kernel
    /// must read the weights' layout.
    #[allow(clippy::too_many_arguments)]
    pub fn moe_mxfp4_with(&self, kind: MoeKernel, w: &MoeWeights, r: &DeviceRouting, x: &CudaSlice<f32>, input: MoeInput, scratch: &mut MoeScratch, y: &mut CudaSlice<f32>) -> Result<()> {
        self.moe_mxfp4_run(kind, w, r, x, input, scratch, Some(y))
    }

    /// Whether MoE kernel `kind` is a tiled kernel with its combine fused (the two-launch pair
    /// or the fused kernel), which `moe_mxfp4_pairs` can run without it.
    pub fn moe_leaves_pairs(w: &MoeWeights, kind: MoeKernel, top_k: usize) -> bool {
        w.is_tiled() && top_k <= MAX_FUSED_TOPK && matches!(kind, MoeKernel::Tiled { .. } | MoeKernel::Fused { .. })
    }

    /// The MoE decode on `kind` without its routed combine (only where `moe_leaves_pairs`):
    /// each routed pair's output stays in `scratch.out` [pairs, H], weighted, for its consumer
    /// to sum per token (ops.cu's PairsAddend: the same bits as the combine). The down blocks
    /// then skip the combine's fence, count and last-block sum: 4-6 points of the copy
    /// bandwidth at 2-8 tokens in the two-launch kernels.
    pub fn moe_mxfp4_pairs(&self, kind: MoeKernel, w: &MoeWeights, r: &DeviceRouting, x: &CudaSlice<f32>, input: MoeInput, scratch: &mut MoeScratch) -> Result<()> {
        self.moe_mxfp4_run(kind, w, r, x, input, scratch, None)
    }

    /// `moe_mxfp4_with`; y None: the pairs stay uncombined (where `moe_leaves_pairs`).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn moe_mxfp4_run(&self, kind: MoeKernel, w: &MoeWeights, r: &DeviceRouting, x: &CudaSlice<f32>, input: MoeInput, scratch: &mut MoeScratch, mut y: Option<&mut CudaSlice<f32>>) -> Result<()> {
        let (h, i) = (w.hidden, w.inter);
        check(h % 32 == 0 && i % 32 == 0, || format!("MoE dims {h}, {i} must be multiples of 32"))?;
        check(scratch.h.len() >= r.num_pairs * i && scratch.out.len() >= r.num_pairs * h, || "MoE scratch too small".into())?;
        check(x.len() >= r.num_tokens * h && y.as_ref().is_none_or(|y| y.len() >= r.num_tokens * h), || "MoE activations too small".into())?;
        check(y.is_some() || Self::moe_leaves_pairs(w, kind, r.top_k), || format!("the MoE kernel {kind:?} (top-{}) combines its pairs itself", r.top_k))?;
        let u = r.num_experts_used as u32;
        if u == 0 {
            return Ok(());
        }
        let (hh, ii) = (h as i32, i as i32);
        match (&w.layout, kind) {
            (MoeLayout::Tiled { gate_up, down }, MoeKernel::Tiled { stages, steps, down_stages, down_steps }) => {
                let (v, dv) = (Self::tiled_variant(stages, steps)?, Self::tiled_variant(down_stages, down_steps)?);
                let (ti, ki, settled) = (r.num_tokens as i32, r.top_k as i32, input.settled_flag());
                let fused = r.top_k <= MAX_FUSED_TOPK;
                let groups = (h / 16).div_ceil(8);
                check(scratch.counters.len() >= groups, || "MoE scratch counters too small".into())?;
                // Per-slot counters after the combine's (done, then passed; moe_counters sizes
                // them), zero between calls like the combine's; 0: the whole-grid wait.
                let slot_wait = fused && self.slot_wait.contains(&r.num_tokens) && scratch.counters.len() >= groups + 2 * u as usize;
                let slot_ptr = if slot_wait { scratch.counters.device_ptr(&self.stream).0 + (groups * std::mem::size_of::<u32>()) as u64 } else { 0u64 };
                // From 2 tokens the _split_ kernels: x split once per token (here), and with the
                // per-slot wait h once per slot (by its last gate_up block); both written in full
                // before they are read.
                let fg = self.gate_up_kernel(v, r.num_tokens);
                let split_x = self.splits_x(r.num_tokens);
                let split_h = split_x && self.presplit_h && slot_wait;
                let fd = if split_h { &self.down_split[dv] } else { &self.down_tiled[dv] };
                let ring = ring_bytes(stages, steps);
                // A routed expert has at most one pair per token; a pass stages up to 4.
                let np = self.staged_pairs(fg, ring, h.max(i), r.num_tokens, 0)?;
                let (gu_smem, d_smem) = (ring + h * 4 * np, ring_bytes(down_stages, down_steps) + i * 4 * np);
                check(gu_smem.max(d_smem) <= TILED_MAX_SMEM, || format!("MoE dims {h}, {i} need more than {TILED_MAX_SMEM} bytes of shared memory"))?;
                // A block's 8 warps stream one 16-row tile each.
                let cfg = |tiles: usize, smem: usize| LaunchConfig { grid_dim: (tiles.div_ceil(8) as u32, u, 1), block_dim: (256, 1, 1), shared_mem_bytes: smem as u32 };
                let alloc_u32 = |n: usize| unsafe { self.alloc.alloc::<u32>(n) };
                let alloc_f32 = |n: usize| unsafe { self.alloc.alloc::<f32>(n) };
                let mut b = crate::launch::builder(&self.stream, fg);
                b.arg(gate_up).arg(&r.experts).arg(&r.pair_off).arg(&r.pair_tok);
                // (The split rows live to the end of the call: freed in stream order after both launches.)
                let (_xsplit, mut hsplit) = if split_x {
                    let xsplit = self.x_split(input, x, r.num_tokens, h)?;
                    let sp = xsplit.rows();
                    let mut hsplit = if split_h { Some((alloc_u32(r.num_pairs * i)?, alloc_f32(r.num_pairs)?)) } else { None };
                    b.arg(&mut scratch.h).arg(&hh).arg(&ii).arg(&slot_ptr).arg(&sp.xs).arg(&sp.inv);
                    match &mut hsplit {
                        Some((hs, hinv)) => b.arg(hs).arg(hinv),
                        None => b.arg(&0u64).arg(&0u64),
                    };
                    unsafe { b.launch(cfg(2 * i / 16, gu_smem)) }.map_err(drv("moe gate_up (tiled, split)"))?;
                    (Some(xsplit), hsplit)
                } else {
                    // One settled token's x is staged before the kernel waits for the one ahead
                    // (moe.cu, stage_token_early).
                    b.arg(x).arg(&mut scratch.h).arg(&hh).arg(&ii).arg(&ti).arg(&settled).arg(&slot_ptr);
                    unsafe { b.launch(cfg(2 * i / 16, gu_smem)) }.map_err(drv("moe gate_up (tiled)"))?;
                    (None, None)
                };
                // The down kernel asks for its weights before it waits for gate_up (see launch.rs).
                let mut b = crate::launch::builder(&self.stream, fd);
                b.arg(down).arg(&r.experts).arg(&r.pair_off).arg(&r.pair_w);
                if hsplit.is_none() {
                    b.arg(&scratch.h);
                }
                b.arg(&mut scratch.out).arg(&hh).arg(&ii);
                // Null counters: no combine (the pairs' consumer sums them, or moe_combine).
                match &mut y {
                    Some(_) if fused => b.arg(&mut scratch.counters),
                    _ => b.arg(&0u64),
                };
                b.arg(&r.tok_pairs);
                match &mut y {
                    Some(y) => b.arg(&mut **y),
                    None => b.arg(&0u64),
                };
                b.arg(&ti).arg(&ki).arg(&slot_ptr);
                if let Some((hs, hinv)) = &mut hsplit {
                    b.arg(&*hs).arg(&*hinv);
                }
                unsafe { b.launch(cfg(h / 16, d_smem)) }.map_err(drv("moe down (tiled)"))?;
                if fused || y.is_none() {
                    return Ok(());
                }
            }
            (MoeLayout::Tiled { gate_up, down }, MoeKernel::Fused { stages, steps, max_blocks }) => {
                check(r.top_k <= MAX_FUSED_TOPK, || format!("the fused MoE kernel combines at most {MAX_FUSED_TOPK} experts per token, not {}", r.top_k))?;
                let f = &self.fused_tiled[Self::tiled_variant(stages, steps)?];
                let cfg = self.fused_grid(f, w, stages, steps, max_blocks, r.num_tokens, u as usize, 0, &scratch.counters)?;
                let (ti, ki, ui) = (r.num_tokens as i32, r.top_k as i32, u as i32);
                let mut b = crate::launch::builder(&self.stream, f);
                b.arg(gate_up).arg(down).arg(&r.experts).arg(&r.pair_off).arg(&r.pair_tok).arg(&r.pair_w).arg(x);
                b.arg(&mut scratch.h).arg(&mut scratch.out).arg(&hh).arg(&ii).arg(&ui).arg(&mut scratch.counters).arg(&r.tok_pairs);
                // Null y: no combine.
                match y {
                    Some(y) => b.arg(y),
                    None => b.arg(&0u64),
                };
                b.arg(&ti).arg(&ki);
                let settled = input.settled_flag();
                b.arg(&settled);
                unsafe { b.launch(cfg) }.map_err(drv("moe (fused, tiled)"))?;
                return Ok(());
            }
            (MoeLayout::Tiled { gate_up, down }, MoeKernel::Gemm) => {
                let (t, p) = (r.num_tokens, r.num_pairs);
                // Both written in full by moe_split_rows.
                let alloc_u32 = |n: usize| unsafe { self.alloc.alloc::<u32>(n) };
                let alloc_f32 = |n: usize| unsafe { self.alloc.alloc::<f32>(n) };
                let wg = self.moe_gemm_on_wgmma(p, w.num_experts);
                let xsplit = if wg { XSplit::Own(self.split_x(x, t, h, true)?) } else { self.x_split(input, x, t, h)? };
                let (xs, xinv) = (&xsplit.rows().xs, &xsplit.rows().inv);
                let (bt, smem) = if wg { (self.gemm_wg_tiles, gemm_smem(self.gemm_wg_tiles, GEMM_WG_STAGES)) } else { (GEMM_TILES, GEMM_SMEM) };
                // The wgmma kernels: `cb` blocks per tile group share its weights through L2.
                let cb = if wg { self.gemm_wg_chunk_blocks } else { 1 };
                let cbi = cb as i32;
                let cfg = |tiles: usize| LaunchConfig { grid_dim: ((tiles.div_ceil(bt) * cb) as u32, u, 1), block_dim: (32 * bt as u32, 1, 1), shared_mem_bytes: smem as u32 };
                let (f_gate_up, f_down) = if wg { (&self.gemm_wg_gate_up, &self.gemm_wg_down) } else { (&self.gemm_gate_up, &self.gemm_down) };
                let mut b = crate::launch::builder(&self.stream, f_gate_up);
                b.arg(gate_up).arg(&r.experts).arg(&r.pair_off).arg(&r.pair_tok).arg(xs).arg(xinv).arg(&mut scratch.h).arg(&hh).arg(&ii);
                if wg {
                    b.arg(&cbi);
                }
                unsafe { b.launch(cfg(i / 8)) }.map_err(drv("moe gate_up (GEMM)"))?;
                let (mut hs, mut hinv) = (alloc_u32(p * i)?, alloc_f32(p)?);
                self.split_rows(&scratch.h, p, i, &mut hs, &mut hinv, wg)?;
                let mut b = crate::launch::builder(&self.stream, f_down);
                b.arg(down).arg(&r.experts).arg(&r.pair_off).arg(&r.pair_w).arg(&hs).arg(&hinv).arg(&mut scratch.out).arg(&hh).arg(&ii);
                if wg {
                    b.arg(&cbi);
                }
                unsafe { b.launch(cfg(h / 16)) }.map_err(drv("moe down (GEMM)"))?;
            }
            (MoeLayout::RowMajor { gate, gate_s, up, up_s, down, down_s }, MoeKernel::TensorCore | MoeKernel::Pipelined { .. }) => {
                check(h % 64 == 0 && i % 64 == 0, || format!("MoE dims {h}, {i} must be multiples of 64 for the tensor-core kernels"))?;
                // (gate_up kernel, down kernel, rows per block of each).
                let split = |s: usize| -> Result<usize> {
                    check(matches!(s, 1 | 2 | 4 | 8), || format!("MoE K split {s} is not 1, 2, 4 or 8"))?;
                    Ok(s.trailing_zeros() as usize)
                };
                let (fg, fd, rg, rd) = match kind {
                    MoeKernel::Pipelined { gate_up_split: a, down_split: b } => (&self.gate_up_pipe[split(a)?], &self.down_pipe[split(b)?], 16 * 8 / a, 16 * 8 / b),
                    _ => (&self.gate_up_mma, &self.down_mma, 16, 16),
                };
                let cfg = |rows: usize, per: usize| LaunchConfig { grid_dim: (rows.div_ceil(per) as u32, u, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
                let (xh, xl, xinv) = self.split_f16(x, r.num_tokens, h, true)?;
                let mut b = crate::launch::builder(&self.stream, fg);
                b.arg(gate).arg(gate_s).arg(up).arg(up_s).arg(&r.experts).arg(&r.pair_off).arg(&r.pair_tok).arg(&xh).arg(&xl).arg(&xinv).arg(&mut scratch.h).arg(&hh).arg(&ii);
                unsafe { b.launch(cfg(i, rg)) }.map_err(drv("moe gate_up"))?;
                let (hh_, hl, hinv) = self.split_f16(&scratch.h, r.num_pairs, i, true)?;
                let mut b = crate::launch::builder(&self.stream, fd);
                b.arg(down).arg(down_s).arg(&r.experts).arg(&r.pair_off).arg(&r.pair_w).arg(&hh_).arg(&hl).arg(&hinv).arg(&mut scratch.out).arg(&hh).arg(&ii);
                unsafe { b.launch(cfg(h, rd)) }.map_err(drv("moe down"))?;
            }
            (MoeLayout::RowMajor { gate, gate_s, up, up_s, down, down_s }, MoeKernel::V1 | MoeKernel::V2) => {
                self.moe_simt(kind == MoeKernel::V2, [gate, gate_s, up, up_s, down, down_s], w, r, x, scratch)?;
            }
            _ => return Err(Error::Backend(format!("MoE kernel {kind:?} does not read this weight layout"))),
        }
        let mut b = crate::launch::builder(&self.stream, &self.combine);
        let topk = r.top_k as i32;
        let y = y.ok_or_else(|| Error::Backend("moe_combine needs its output rows".into()))?;
        b.arg(&scratch.out).arg(&r.tok_pairs).arg(y).arg(&hh).arg(&topk);
        let cfg = LaunchConfig { grid_dim: ((h as u32).div_ceil(256), r.num_tokens as u32, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        unsafe { b.launch(cfg) }.map_err(drv("moe_combine"))?;
        Ok(())
    }

    /// The `t` rows of x [t, h] split as the MoE kernels that read x split take them: the
    /// caller's (`MoeInput::Split`), else split here (`moe_split_rows`, one launch).
    fn x_split<'a>(&self, input: MoeInput<'a>, x: &CudaSlice<f32>, t: usize, h: usize) -> Result<XSplit<'a>> {
        if let MoeInput::Split(sp) = input {
            check(sp.xs.len() >= t * h && sp.inv.len() >= t, || format!("MoE: split x holds {} words and {} scales, not {t} rows of {h}", sp.xs.len(), sp.inv.len()))?;
            return Ok(XSplit::Given(sp));
        }
        Ok(XSplit::Own(self.moe_split_x(x, t, h)?))
    }

    /// The `rows` rows of x [rows, k] split as the MoE kernels read them (`moe_split_rows`, one
    /// launch): what a producer writing `MoeInput::Split` must match bit for bit.
    pub fn moe_split_x(&self, x: &CudaSlice<f32>, rows: usize, k: usize) -> Result<MoeSplit> {
        self.split_x(x, rows, k, false)
    }

    /// `moe_split_x`; `wg`: in the wgmma MoE GEMM's layout (`moe_split_rows_wg`).
    fn split_x(&self, x: &CudaSlice<f32>, rows: usize, k: usize, wg: bool) -> Result<MoeSplit> {
        // Both written in full by the split.
        let mut xs = unsafe { self.alloc.alloc::<u32>(rows * k) }?;
        let mut inv = unsafe { self.alloc.alloc::<f32>(rows) }?;
        self.split_rows(x, rows, k, &mut xs, &mut inv, wg)?;
        Ok(MoeSplit { xs, inv })
    }

    /// `rows` rows of `x` [rows, k] split for the MoE GEMM (`moe_split_rows`): each row's F16
    /// hi + lo of x * 2^s in one pair's staged-fragment layout, and 2^-s per row.
    /// `wg`: in the wgmma GEMM's layout instead (`moe_split_rows_wg`; the same values).
    fn split_rows(&self, x: &CudaSlice<f32>, rows: usize, k: usize, xs: &mut CudaSlice<u32>, inv: &mut CudaSlice<f32>, wg: bool) -> Result<()> {
        check(k.is_multiple_of(64) && x.len() >= rows * k && xs.len() >= rows * k && inv.len() >= rows, || format!("moe_split_rows: {rows} rows of {k}"))?;
        if rows == 0 {
            return Ok(());
        }
        let ki = k as i32;
        let mut b = crate::launch::builder(&self.stream, if wg { &self.split_rows_wg } else { &self.split_rows });
        b.arg(x).arg(&ki).arg(xs).arg(inv);
        unsafe { b.launch(LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }) }.map_err(drv("moe_split_rows"))?;
        Ok(())
    }

    /// The CUDA-core gate_up and down phases (v2: 4 rows per warp; v1: one row per warp).
    fn moe_simt(&self, v2: bool, m: [&CudaSlice<u8>; 6], w: &MoeWeights, r: &DeviceRouting, x: &CudaSlice<f32>, scratch: &mut MoeScratch) -> Result<()> {
        let [gate, gate_s, up, up_s, down, down_s] = m;
        let (h, i) = (w.hidden, w.inter);
        let u = r.num_experts_used as u32;
        let (hh, ii) = (h as i32, i as i32);
        let rows = if v2 { 4 } else { 1 };
        let cfg_rows = |n: usize| LaunchConfig { grid_dim: ((n as u32).div_ceil(ROWS_PER_BLOCK * rows), u, 1), block_dim: (32 * ROWS_PER_BLOCK, 1, 1), shared_mem_bytes: 0 };
        let mut b = crate::launch::builder(&self.stream, if v2 { &self.gate_up_v2 } else { &self.gate_up });
        b.arg(gate).arg(gate_s).arg(up).arg(up_s).arg(&r.experts).arg(&r.pair_off).arg(&r.pair_tok).arg(x).arg(&mut scratch.h).arg(&hh).arg(&ii);
        unsafe { b.launch(cfg_rows(i)) }.map_err(drv("moe_gate_up_mxfp4"))?;
        let mut b = crate::launch::builder(&self.stream, if v2 { &self.down_v2 } else { &self.down });
        b.arg(down).arg(down_s).arg(&r.experts).arg(&r.pair_off).arg(&r.pair_w).arg(&scratch.h).arg(&mut scratch.out).arg(&hh).arg(&ii);
        unsafe { b.launch(cfg_rows(h)) }.map_err(drv("moe_down_mxfp4"))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `PEREGRINE_MOE_KERNEL`'s values: the named kernels, a ring of `TILED_VARIANTS` after
    /// `fused:` or `tiled:`, and nothing for a ring that is not compiled or a word it does not know.
    #[test]
    fn forced_moe_kernels_parse_their_rings() {
        assert_eq!(MoeKernel::parse_forced("fused"), Some(Some(MoeKernel::FUSED)));
        assert_eq!(MoeKernel::parse_forced("default"), Some(None));
        assert_eq!(MoeKernel::parse_forced("fused:3x4"), Some(Some(MoeKernel::Fused { stages: 3, steps: 4, max_blocks: 0 })));
        assert_eq!(MoeKernel::parse_forced("tiled:2x6"), Some(Some(MoeKernel::tiled(2, 6))));
        assert_eq!(MoeKernel::parse_forced("fused:5x5"), None);
        assert_eq!(MoeKernel::parse_forced("fused:3"), None);
        assert_eq!(MoeKernel::parse_forced("gemm:2x4"), None);
        assert_eq!(MoeKernel::parse_forced("fast"), None);
    }

    /// The wgmma GEMM's block heights and K splits for the decode batches' matrices, as
    /// measured: the FP8 q/k/v (Flash 13568 x 4096, Pro 27136 x 6144), the BF16 o_proj (Flash
    /// 4096 x 8192, Pro 6144 x 16384), the lm_head (152064 x 4096).
    #[test]
    fn dense_wgmma_block_heights_follow_the_measured_shapes() {
        let (qkv, o, head, pro_qkv, pro_o) = ((13568, 4096), (4096, 8192), (152064, 4096), (27136, 6144), (6144, 16384));
        let at = |t: usize, (n, k): (usize, usize)| dense_wg_for(t, n, k, true);
        for t in [1, 8, 16, 31] {
            for m in [qkv, o, head, pro_qkv, pro_o] {
                assert_eq!(at(t, m), None, "{t} tokens x {m:?}: the GEMV tiles");
            }
        }
        for t in [32, 48, 64] {
            assert_eq!(at(t, qkv), Some((64, 1)), "{t} tokens");
            assert_eq!(at(t, pro_qkv), Some((256, 1)), "{t} tokens");
            assert_eq!(at(t, head), Some((256, 1)), "{t} tokens");
        }
        // The o_proj: the GEMV tiles at 32 tokens, 8 K splits of 64-row blocks from 33 to 64.
        assert_eq!(at(32, o), None);
        assert_eq!(at(32, pro_o), None);
        for t in [33, 48, 64] {
            assert_eq!(at(t, o), Some((64, 8)), "{t} tokens");
            assert_eq!(at(t, pro_o), Some((64, 8)), "{t} tokens");
        }
        // Without splits (PEREGRINE_GEMM_WG_SPLIT=1), what ran before them.
        assert_eq!(dense_wg_for(64, o.0, o.1, false), None);
        assert_eq!(dense_wg_for(48, pro_o.0, pro_o.1, false), None);
        assert_eq!(dense_wg_for(64, pro_o.0, pro_o.1, false), Some((64, 1)));
        // Too short a K for 8 splits of 4 K blocks: unsplit where the rule takes it, else the tiles.
        assert_eq!(at(64, (6144, 2048)), Some((64, 1)));
        assert_eq!(at(48, (4096, 2048)), None);
        for t in [65, 96, 127, 128, 2048] {
            assert_eq!(at(t, qkv), Some((256, 1)), "{t} tokens");
            assert_eq!(at(t, head), Some((256, 1)), "{t} tokens");
        }
        // 65-128 tokens: the o_proj in 256-row blocks and 8 K splits (unsplit 64 rows without).
        for t in [65, 96, 128] {
            assert_eq!(at(t, o), Some((256, 8)), "{t} tokens");
            assert_eq!(dense_wg_for(t, o.0, o.1, false), Some((64, 1)), "{t} tokens");
        }
        assert_eq!(at(96, pro_o), Some((256, 8)));
        assert_eq!(dense_wg_for(96, pro_o.0, pro_o.1, false), Some((64, 1)));
        // From 128 tokens Pro's o_proj has 48 blocks of 256 rows (the prefill rule).
        assert_eq!(at(128, pro_o), Some((256, 1)));
        // From 192 tokens the o_proj's 256-row blocks are 48 (measured 1.17x the GEMV tiles).
        assert_eq!(at(192, o), Some((256, 1)));
    }
}
