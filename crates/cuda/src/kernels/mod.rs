//! Typed launches of the kernels in `kernels/`: [`Kernels`] holds the loaded functions and the
//! switches that choose among them; each family's launches live in a module of their own
//! (`gemv`: dense projections, `moe`: the MXFP4 MoE, `sampling`: the GPU sampler).

// Kernel launches take their buffers and shapes explicitly.
#![allow(clippy::too_many_arguments)]

use std::sync::Arc;

use cudarc::driver::{CudaFunction, CudaSlice, CudaStream, CudaView, CudaViewMut, DevicePtr, DevicePtrMut, LaunchConfig};
use peregrine_core::backend::{LogitAdjust, RowLogprobs, RowSampling};
use peregrine_core::{Error, MoeSpec, Result, RouterScoring};

use crate::compile;
use crate::device::{nvrtc_arch, Gpu};

mod gemv;
mod moe;
mod sampling;

pub use gemv::*;
pub use moe::*;
pub(crate) use sampling::*;

/// Tokens one kernel pass handles (MAXT in the source); more are done in passes.
pub const MAX_TOKENS_PER_PASS: usize = 8;

/// Activations as F16 hi and lo parts of each row times a power of two, and the inverse powers
/// (the FP8 tensor-core GEMV's input; `split_f16`'s output).
pub type F16Split = (CudaSlice<u16>, CudaSlice<u16>, CudaSlice<f32>);

/// Output rows per thread block (WARPS in the source: one warp per row).
const ROWS_PER_BLOCK: u32 = 8;

/// The loaded kernel modules of one GPU's stream: every function the backend launches, with the
/// shapes and switches that choose among them.
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
    mma_fp8_ready4_wave: usize,
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
    /// Whether the lm_head prefetches (off: on the H200 the batch-1 step was 7-9 us faster
    /// without it in every round of five processes, on the H100 it had gained at most ~1 us;
    /// `PEREGRINE_LM_HEAD_PREFETCH=1` for comparison).
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
    /// The three fused kernels with the FP8 digit math (`moe_fused*_dg_*`, sm_90a only; the
    /// routed and o_proj-router ones for one token), one per `DG_RINGS` entry, and whether the
    /// MoE runs on digits (`moe_fp8_for`; by default on GPUs of `FP8_MOE_MIN_BANDWIDTH` and
    /// more, `PEREGRINE_MOE_FP8=1` / `0` or `set_moe_fp8` sets it).
    fused_tiled_dg: Vec<CudaFunction>,
    fused_routed_dg: Vec<CudaFunction>,
    fused_acc_dg: Vec<CudaFunction>,
    /// The two-launch tiled kernels with that math (`moe_gate_up_dg_*`, `moe_down_dg_*`), one
    /// per `DG_RINGS` entry.
    gate_up_dg: Vec<CudaFunction>,
    down_dg: Vec<CudaFunction>,
    /// The same whose passes take two pairs of a slot at once (`moe_gate_up_dg2_*`,
    /// `moe_down_dg2_*`), and the token count from which the two-launch digit MoE runs them
    /// (`moe_fp8_pairs_from`; `PEREGRINE_MOE_FP8_PAIRS_FROM`).
    gate_up_dg2: Vec<CudaFunction>,
    down_dg2: Vec<CudaFunction>,
    moe_fp8_pairs_from: usize,
    /// Decode rows from which the two-launch F16 MoE sends slots of 1-2 pairs to the digit
    /// kernels (`moe_mixed_at`; `MIXED_FROM`, `PEREGRINE_MOE_MIXED_FROM`).
    moe_mixed_from: usize,
    moe_fp8: bool,
    /// Token counts up to which the MoE kernels run on FP8 digits where `moe_fp8` holds
    /// (`moe_fp8_at`; `PEREGRINE_MOE_FP8_TOKENS`, 1..=`moe_fp8_tokens_max`).
    moe_fp8_tokens: usize,
    /// The largest row bucket `tune_moe` measures (`moe_tune::tune_tokens_for` this GPU).
    moe_tune_tokens: usize,
    /// The grouped-GEMM MoE kernels (`MoeKernel::Gemm`) and the row split they read.
    gemm_gate_up: CudaFunction,
    gemm_down: CudaFunction,
    split_rows: CudaFunction,
    /// x as the FP8 digit kernels stage it, a row per token (`moe_digit_rows`).
    digit_rows: CudaFunction,
    /// The same from the o_proj that did the router (`moe_digit_rows_acc`).
    digit_rows_acc: CudaFunction,
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
    /// Where `moe_fp8_at` holds from 2 tokens, the fastest kernel off the digits (F16 rings or
    /// the MoE GEMM) per shape and token count, for rows that may share experts
    /// (`moe_kernel_rows`' verify rows).
    pub(crate) moe_verify_choices: std::sync::Mutex<crate::moe_tune::MoeChoices>,
    /// The one-block sampler (every GPU) and the cluster sampler (Hopper on; None elsewhere or
    /// with PEREGRINE_SAMPLE_CLUSTER=0): both draw the same tokens.
    sample: CudaFunction,
    sample_cluster: Option<CudaFunction>,
    /// Bytes of dynamic shared memory a block of the cluster sampler may stage its slice in.
    sample_stage_max: usize,
    /// Blocks per row of the cluster sampler and logprobs (their compiled cluster width).
    sample_width: usize,
    adjust: CudaFunction,
    /// Token masks of constrained rows (`mask_logits`).
    mask: CudaFunction,
    /// Logprobs likewise: one block per row, or (with the cluster sampler) a cluster.
    logprobs: CudaFunction,
    logprobs_cluster: Option<CudaFunction>,
    /// gemv.cu's kernels came from the on-disk cache (or were compiled ahead, `compile::prepare`).
    pub cached: bool,
    /// kernels/moe.cu's modules, one per part (`compile::MOE_PARTS`; for `moe_trace`).
    moe_modules: Vec<Arc<cudarc::driver::CudaModule>>,
    /// Where step buffers come from (a pool of their own while a step is captured).
    pub(crate) alloc: Arc<crate::alloc::StepAlloc>,
    /// gemv.cu's and sample.cu's modules (for `step_trace`, with moe.cu's).
    gemv_module: Arc<cudarc::driver::CudaModule>,
    sample_module: Arc<cudarc::driver::CudaModule>,
}

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

impl Kernels {
    pub fn load(gpu: &Gpu) -> Result<Kernels> {
        // Every file not in the cache yet compiled at once (ops.cu's too, for `load_ops`).
        let arch = nvrtc_arch(gpu.capability);
        compile::prepare(arch);
        let (m, cached) = compile::load(&gpu.ctx, "gemv", compile::GEMV_CU, arch)?;
        let f = |n: &str| m.load_function(n).map_err(|e| Error::Backend(format!("kernel {n}: {e}")));
        let (sm, _) = compile::load(&gpu.ctx, "sample", compile::SAMPLE_CU, arch)?;
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
        let mask = sm.load_function("mask_logits").map_err(drv("kernel mask_logits"))?;
        let logprobs = sm.load_function("row_logprobs").map_err(drv("kernel row_logprobs"))?;
        let logprobs_cluster = sample_cluster.as_ref().and_then(|_| sm.load_function("row_logprobs_cluster").ok()).filter(|f| width(f) == sample_width && allows(f));
        let mm = compile::load_parts(&gpu.ctx, "moe", compile::MOE_CU, arch, &compile::MOE_PARTS)?;
        let fm = |n: &str| -> Result<CudaFunction> {
            // Each kernel is in one part.
            let f = mm.iter().find_map(|m| m.load_function(n).ok()).ok_or_else(|| Error::Backend(format!("kernel {n}: in none of moe.cu's {} parts", mm.len())))?;
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
        // The GPU's peak memory bandwidth (bytes/s; 0 where the driver does not say), which
        // decides where one token's MoE runs on FP8 digits by default (`moe_fp8`).
        let attr = |a| gpu.ctx.attribute(a).map_or(0.0, |v| v.max(0) as f64);
        let peak_bandwidth = 2.0 * attr(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MEMORY_CLOCK_RATE) * 1e3
            * attr(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_GLOBAL_MEMORY_BUS_WIDTH) / 8.0;
        // The largest row bucket the MoE tuner measures on this GPU.
        let moe_tune_tokens = crate::moe_tune::tune_tokens_for(peak_bandwidth);
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
        let mma_fp8_ready4 = f("gemv_mma_fp8_t1_ready4")?;
        let mma_fp8_ready4_wave = mma_fp8_ready4.occupancy_max_active_blocks_per_multiprocessor(128, 0, None).map_err(drv("GEMV occupancy"))? as usize * sms;
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
            mma_fp8_ready4,
            mma_fp8_ready_wave,
            mma_fp8_ready4_wave,
            qkv_ready4: std::env::var("PEREGRINE_QKV_READY4").ok().map(|v| v != "0"),
            mma_fp8_ready4_pipe,
            mma_fp8_ready4_pipe_wave,
            qkv_pipe: std::env::var("PEREGRINE_QKV_PIPE").ok().map(|v| v != "0"),
            qkv_pipe_shuffle: std::env::var("PEREGRINE_QKV_PIPE_SHUFFLE").ok().map(|v| v != "0"),
            mma_bf16_pipe,
            mma_bf16_argmax,
            mma_bf16_argmax_pf,
            lm_head_prefetch: std::env::var("PEREGRINE_LM_HEAD_PREFETCH").is_ok_and(|v| v != "0"),
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
            fused_tiled_dg: DG_RINGS.iter().map(|(n, c)| fm(&format!("moe_fused_dg_n{n}_c{c}"))).collect::<Result<_>>()?,
            fused_routed_dg: DG_RINGS.iter().map(|(n, c)| fm(&format!("moe_fused_routed_dg_n{n}_c{c}"))).collect::<Result<_>>()?,
            fused_acc_dg: DG_RINGS.iter().map(|(n, c)| fm(&format!("moe_fused_acc_dg_n{n}_c{c}"))).collect::<Result<_>>()?,
            gate_up_dg: DG_RINGS.iter().map(|(n, c)| fm(&format!("moe_gate_up_dg_n{n}_c{c}"))).collect::<Result<_>>()?,
            down_dg: DG_RINGS.iter().map(|(n, c)| fm(&format!("moe_down_dg_n{n}_c{c}"))).collect::<Result<_>>()?,
            gate_up_dg2: DG_RINGS.iter().map(|(n, c)| fm(&format!("moe_gate_up_dg2_n{n}_c{c}"))).collect::<Result<_>>()?,
            down_dg2: DG_RINGS.iter().map(|(n, c)| fm(&format!("moe_down_dg2_n{n}_c{c}"))).collect::<Result<_>>()?,
            moe_mixed_from: match std::env::var("PEREGRINE_MOE_MIXED_FROM").as_deref() {
                Ok("0") => usize::MAX,
                Ok(v) => v.parse().ok().filter(|&n| n >= 2).unwrap_or(MIXED_FROM),
                Err(_) => MIXED_FROM,
            },
            moe_fp8_pairs_from: std::env::var("PEREGRINE_MOE_FP8_PAIRS_FROM").ok().and_then(|v| v.parse().ok()).filter(|&n| n >= 1).unwrap_or(FP8_MOE_PAIRS_FROM),
            moe_fp8: std::env::var("PEREGRINE_MOE_FP8").map_or(peak_bandwidth >= FP8_MOE_MIN_BANDWIDTH, |v| v != "0"),
            moe_fp8_tokens: std::env::var("PEREGRINE_MOE_FP8_TOKENS")
                .ok()
                .and_then(|v| v.parse().ok())
                .filter(|n| (1..=fp8_tokens_max(moe_tune_tokens)).contains(n))
                .unwrap_or(FP8_MOE_TOKENS),
            moe_tune_tokens,
            gemm_gate_up: fm("moe_gemm_gate_up")?,
            gemm_down: fm("moe_gemm_down")?,
            split_rows: fm("moe_split_rows")?,
            digit_rows: fm("moe_digit_rows")?,
            digit_rows_acc: fm("moe_digit_rows_acc")?,
            gemm_wg_tiles: wg_tiles,
            gemm_wg_chunk_blocks: std::env::var("PEREGRINE_MOE_WG_CHUNK_BLOCKS").ok().and_then(|v| v.parse().ok()).filter(|&n: &usize| (1..=64).contains(&n)).unwrap_or(4),
            gemm_wg_gate_up,
            gemm_wg_down,
            split_rows_wg: fm("moe_split_rows_wg")?,
            wgmma_arch,
            gemm_wgmma: std::env::var("PEREGRINE_MOE_WGMMA").ok().map(|v| v != "0"),
            moe_choices: Default::default(),
            moe_verify_choices: Default::default(),
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
            mask,
            logprobs,
            logprobs_cluster,
            cached,
            moe_modules: mm.clone(),
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

    /// The fused MoE kernel's %globaltimer stamps from its last call (`MOE_TRACE_SLOTS` per
    /// block; see kernels/moe.cu), then zeroed: only in a measurement build of the kernels
    /// (`PEREGRINE_KERNEL_DEFINES=-DMOE_TRACE`), else None.
    pub fn moe_trace(&self) -> Result<Option<Vec<u64>>> {
        // Each part has its own array, written by its kernels that ran: a stamp is the latest
        // of the parts' (unwritten ones are zero).
        let mut merged: Option<Vec<u64>> = None;
        for m in &self.moe_modules {
            if let Some(t) = self.take_global::<u64>(m, "moe_trace")? {
                match merged.as_mut() {
                    None => merged = Some(t),
                    Some(all) => all.iter_mut().zip(t).for_each(|(a, b)| *a = (*a).max(b)),
                }
            }
        }
        Ok(merged)
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
        let mut modules = vec![&self.gemv_module, &self.sample_module];
        modules.extend(&self.moe_modules);
        modules.extend_from_slice(more);
        crate::trace::read(&modules, &self.stream)
    }
}
