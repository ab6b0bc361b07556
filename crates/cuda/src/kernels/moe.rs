//! The MXFP4 MoE (`kernels/moe.cu`): its weights, routing and scratch on the device, the
//! kernel choices (tiled one- and two-launch kernels, the GEMMs) and their launches.

// Kernel launches take their buffers and shapes explicitly.
#![allow(clippy::too_many_arguments)]

use super::*;

/// The (stages, steps per stage) rings the tiled MoE kernels are compiled for, each as two
/// launches (gate_up and down may take different ones) and as one; `Kernels::tune_moe` picks
/// among them per shape and token count. On the H100 at 1 token: one launch with 2 x 3 for
/// MiMo-V2-Flash's experts, two launches with 3 x 4 for MiMo-V2.5-Pro's; at 2-8 tokens two
/// launches, often a deep gate_up ring with a 2 x 4 down ring
/// (benches/results/2026-11-23-moe-fused.md, 2026-11-23-moe-ring-variants.md,
/// 2026-11-24-moe-mixed-rings.md). 3 x 2, 8 x 2, 8 x 1, 6 x 1 and 2 x 8 rings, register rings of
/// 4 and 8 steps, and 2 or 4 warps sharing a tile's K were slower everywhere and dropped.
pub const TILED_VARIANTS: [(usize, usize); 7] = [(2, 4), (4, 2), (3, 4), (4, 4), (2, 3), (3, 3), (2, 6)];

/// Peak memory bandwidth (bytes/s) from which the MoE of 1-`FP8_MOE_TOKENS` decode rows runs on
/// FP8 digits by default:
/// where the F16 math cannot keep up with DRAM. On an H200 (4.8 TB/s peak) the one-token Flash
/// MoE's F16 decode and MMAs cost it 18-20 points of copy bandwidth; the digit form read 76.5%
/// against 61.6% alone in one call, 65.9% against 62.5% in another, and the batch-1 step ran
/// 2.1% faster (one process, 10 of 10 rounds); on an H100 (3.35 TB/s) they cost 6-8
/// points, FP8 warpgroup MMAs were worth ~2 as a measurement proxy (before the digits' staging),
/// and the digit form is not measured there, so the H100 keeps the F16 form and its bits
/// (benches/results/2026-11-28-h200-fp8-digit-moe.md).
pub const FP8_MOE_MIN_BANDWIDTH: f64 = 4.0e12;

/// Token counts up to which the fused and two-launch tiled kernels run on FP8 digits by default
/// where `moe_fp8_for` holds (`Kernels::moe_fp8_at`; `PEREGRINE_MOE_FP8_TOKENS` sets it): the
/// decode row buckets up to 16; past them the mixed MoE (`MIXED_FROM`). From 2 tokens the
/// two-launch kernels win there (x as digit rows one launch ahead, h as the pairs' digit rows).
/// H200, Flash, as a step runs them: 81.3 / 88.5 / 87.4% of copy bandwidth at 2 / 4 / 8 tokens
/// against 77.9 / 84.1 / 84.6% on F16 MMAs, decode steps at batch 2 / 4 0.8-2% faster, batch 8 even
/// (benches/results/2026-11-28-h200-digit-moe-2-8-tokens.md). From `FP8_MOE_PAIRS_FROM` tokens a
/// pass takes two pairs of a slot: the 18-layer Flash step's graph replay at batch 12 / 16 / 24 /
/// 32 7.06 / 8.56-8.64 / 11.85 / 13.94-13.97 ms against 7.58-7.63 / 9.03-9.06 / 12.41-12.51 /
/// 14.46-14.75 on F16 (-7.1 / -4.9 / -4.8 / -4.4%, means of two processes each; two pairs a
/// pass from 12 there), while at 48 rows it was 3.6% slower (slots of 3+ pairs still re-read
/// their tiles), so 48 stays on F16
/// (benches/results/2026-11-29-h200-two-pair-digit-moe-default.md). At 24 and 32 rows (the
/// default up to 2026-11-30) the mixed MoE is as fast (24) or 3% faster (32): slots of 3+ pairs
/// (7% of used slots at 24 rows, 13% at 32) take one F16 pass instead of two digit passes
/// (benches/results/2026-11-30-h200-mixed-moe.md). Past 8 rows only where two pairs a pass fit
/// (`Kernels::moe_fp8_at`): not Pro's. Rows that may share experts (verify
/// blocks) stay off the digits (`Kernels::moe_kernel_rows`).
pub const FP8_MOE_TOKENS: usize = 16;

/// Token counts from which the two-launch digit MoE takes two pairs of an expert slot a pass
/// (`moe_gate_up_dg2_*`, `moe_down_dg2_*`: one read of the expert's tiles per two of its pairs
/// instead of one a pair; the same bits). A slot with two pairs then streams its tiles once, not
/// twice, and no longer holds up the down items waiting for it; but the second digit row leaves
/// room for fewer gate_up blocks an SM (Flash on the 2 x 4 ring: two instead of three). H200,
/// Flash, 18 layers, graph replay, three processes each: batch 2 / 3 / 4 / 6 / 8 +0.6 / +0.6 / -0.1 /
/// -1.6 / -3.0% against one pair a pass (batch 12-32 in `FP8_MOE_TOKENS`)
/// (benches/results/2026-11-29-h200-two-pair-digit-moe-default.md). Only where two-pair blocks
/// still fit two to an SM (`Kernels::moe_two_pairs_at`): not Pro's. `PEREGRINE_MOE_FP8_PAIRS_FROM`
/// sets it.
pub const FP8_MOE_PAIRS_FROM: usize = 6;

/// Decode rows from which the mixed MoE runs by default (`Kernels::moe_mixed_at`, which also
/// needs the rows past the digits' own, `Kernels::moe_fp8_at`): every row bucket past the tuned
/// counts (12-64). On Flash that is 24-64 (12 and 16 run on digits); on MiMo-V2.5-Pro, whose
/// digits stop at 8 rows, also 12 and 16, where mixed the step ran 8-10% shorter than on F16
/// (H200, 15 layers, 10 of 10 rounds: benches/results/2026-11-30-h200-pro-mixed-from-12.md).
pub const MIXED_FROM: usize = crate::moe_tune::TUNED_TOKENS + 1;

/// The most rows the FP8 digit MoE may be set to take where `tune_tokens` rows are tuned:
/// `moe_tune::TUNED_BUCKETS_MAX`, or more where more are tuned (a count on digits is tuned among
/// the digit kernels).
pub(crate) fn fp8_tokens_max(tune_tokens: usize) -> usize {
    tune_tokens.max(crate::moe_tune::TUNED_BUCKETS_MAX)
}

/// The rings of the fused kernels on FP8 digits (`moe_fused*_dg_*`): steps of 2 or 4, which
/// divide every pass where `moe_fp8_for` holds (H and I multiples of 256), so their streaming
/// has no partial stage to branch around.
pub const DG_RINGS: [(usize, usize); 4] = [(2, 4), (4, 2), (3, 4), (4, 4)];

/// Shared-memory bytes of one staged core matrix of digits (16 values of k, 8 digits of 16
/// bytes, padded to keep the staging's stores conflict-free): DG_CORE in kernels/moe.cu.
const DG_CORE_BYTES: usize = 144;

/// Floats of one pair's digit row of h in the digit MoE (`dg_row_bytes` in
/// kernels/moe.cu): the gate_up items stage h there as digits, I / 16 core matrices, then one
/// inverse scale per 64 values, for the down items to copy whole. `MoeScratch::h` is large
/// enough for the rows of the pairs of up to `moe_fp8_tokens` (at least `moe_tune::TUNED_TOKENS`)
/// tokens (`MAX_FUSED_TOPK` each) as well as for its `[pairs, I]` floats.
fn dg_row_floats(inter: usize) -> usize {
    (inter / 16 * DG_CORE_BYTES + inter / 64 * 4) / 4
}

/// Bytes of one token's row of x as digits for the two-launch digit gate_up (`dg_x_row_bytes`
/// in kernels/moe.cu): the staged core matrices, then the row's inverse scale, padded to 16.
fn dg_x_row_bytes(hidden: usize) -> usize {
    hidden / 16 * DG_CORE_BYTES + 16
}

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
    /// x as the FP8 digit kernels' rows already (`moe_digit_rows_acc`, `dg_x_row_bytes` each),
    /// for the two-launch digit kernels of 2+ tokens only: x itself is not read.
    Digits(&'a CudaSlice<u8>),
}

impl MoeInput<'_> {
    fn settled_flag(self) -> i32 {
        matches!(self, MoeInput::Settled | MoeInput::Split(_) | MoeInput::Digits(_)) as i32
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
    /// The norm's weight times h, g h [T, H].
    pub hg: &'a CudaSlice<f32>,
    /// u64 words from one token's sums (and flag) to the next's, past `copies` x E (more than
    /// one token: `ROUTE_OPROJ_MAX_ROWS`).
    pub tok: usize,
}

/// The most router rows `gemv_bf16_presplit_route` takes (64 bytes of shared memory each).
pub const ROUTE_OPROJ_MAX_EXPERTS: usize = 512;

/// The most tokens `gemv_bf16_presplit_route` takes (one token group of its GEMV: 8 columns).
pub const ROUTE_OPROJ_MAX_ROWS: usize = 8;

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
/// 0.4-0.8% slower and at 4-8 even then. On the H200 with today's MoE (FP8 digit kernels at 2-8
/// rows, whose pairs left to the norm also let the o_proj do the router) Pro's decode steps
/// leaving their pairs were 0.3 / 1.9 / 3.2% faster at 2 / 4 / 8 rows (every round), 0.2%
/// slower at 1, 1.4% at 16 and even at 32-64 (in-process, `step_bench --ab combine-in-norm`;
/// benches/results/2026-11-30-h200-pro-mixed-from-12.md): so up to 128 KB a row at any count,
/// up to 192 KB at 2-8 `rows`. PEREGRINE_MOE_COMBINE_IN_NORM=1|0 forces it either way. The
/// tuner times the tiled kernels as the step will run them.
pub fn moe_pairs_pay(top_k: usize, hidden: usize, rows: usize) -> bool {
    static FORCED: std::sync::OnceLock<Option<bool>> = std::sync::OnceLock::new();
    let bytes = top_k * hidden * 4;
    FORCED
        .get_or_init(|| std::env::var("PEREGRINE_MOE_COMBINE_IN_NORM").ok().map(|v| v != "0"))
        .unwrap_or(bytes <= PAIRS_NORM_MAX_BYTES || (bytes <= PAIRS_NORM_MAX_BYTES_FEW_ROWS && (2..=crate::moe_tune::TUNED_TOKENS).contains(&rows)))
}

/// The most pair bytes per row for which `moe_pairs_pay` leaves the combine to the norm.
const PAIRS_NORM_MAX_BYTES: usize = 128 * 1024;
/// The same at 2 to `moe_tune::TUNED_TOKENS` rows.
const PAIRS_NORM_MAX_BYTES_FEW_ROWS: usize = 192 * 1024;

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
pub(super) const fn gemm_smem(tiles: usize, stages: usize) -> usize {
    stages * (32 * 4 * 256 + tiles * 4 * crate::mxfp4_tiles::TILE_STEP_BYTES)
}
/// Stages of the wgmma MoE GEMM (WG_STAGES in moe.cu).
pub(super) const GEMM_WG_STAGES: usize = 3;
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
pub(super) const SLOT_WAIT_TOKENS: std::ops::RangeInclusive<usize> = 2..=16;

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
    /// row buckets up to 48 tokens, 64 on GPUs as fast as an H200, `Kernels::tuned_counts`,
    /// where the tiled kernels won in steps): on the H100 it took 0.95-1.01x the tiled
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
        // The token counts whose pairs may take digit rows of h: those on digits, and up to the
        // tuned counts where the mixed MoE may run (its digit half indexes h by every pair).
        let dg_tokens = if self.moe_mixed_from <= self.moe_tune_tokens { self.moe_tune_tokens } else { 0 };
        let dg_tokens = dg_tokens.max(self.moe_fp8_tokens).max(crate::moe_tune::TUNED_TOKENS);
        Ok(MoeScratch {
            // Written in full (rows of every pair) before they are read; as large as the digit
            // rows of the pairs of the token counts that may run on digits too (dg_row_floats).
            h: unsafe { self.alloc.alloc((max_pairs.max(1) * w.inter).max(max_pairs.clamp(1, dg_tokens * MAX_FUSED_TOPK) * dg_row_floats(w.inter))) }?,
            out: unsafe { self.alloc.alloc(max_pairs.max(1) * w.hidden) }?,
            counters,
        })
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

    /// Whether the MoE over `w` may run on FP8 digits (`moe_fused*_dg_*`, `moe_gate_up_dg_*`,
    /// `moe_down_dg_*` in kernels/moe.cu, rings `DG_RINGS`; which token counts: `moe_fp8_at`):
    /// the activation as eight balanced base-16 digits in e4m3, the MXFP4 codes as e4m3 A
    /// fragments, one exact m64n8k32 wgmma per 32-block. Not tile_math's bits (nor the F16
    /// kernels'), but as accurate: every 32-block's sum is
    /// exact and the digits keep 30 bits below the row's largest magnitude. Needs sm_90a, row
    /// tiles that fill a block's warpgroups and passes that the rings' stages divide (H and I
    /// multiples of 256).
    pub fn moe_fp8_for(&self, w: &MoeWeights) -> bool {
        // (I <= 4096: the down passes' chunk scales, DG_MAX_CHUNKS in kernels/moe.cu.)
        self.moe_fp8 && self.wgmma_arch && w.is_tiled() && w.inter.is_multiple_of(256) && w.hidden.is_multiple_of(256) && w.inter <= 4096
    }

    /// The FP8 digit form of fused kernel `f` of ring `stages` x `steps` (`table`: one of the
    /// three fused `*_dg` tables), when `tokens` tokens over `w` run on it: `moe_fp8_at` and a
    /// `DG_RINGS` ring (a forced other ring keeps the F16 form).
    fn fp8_fused<'a>(&self, table: &'a [CudaFunction], w: &MoeWeights, stages: usize, steps: usize, tokens: usize) -> Option<&'a CudaFunction> {
        let i = DG_RINGS.iter().position(|&r| r == (stages, steps))?;
        self.moe_fp8_at(w, tokens).then(|| &table[i])
    }

    /// Whether the fused and two-launch tiled MoE of `tokens` tokens over `w` run on FP8 digits
    /// (on `DG_RINGS` rings; other rings keep the F16 form): `moe_fp8_for`, up to
    /// `FP8_MOE_TOKENS` tokens (`PEREGRINE_MOE_FP8_TOKENS`); past `moe_tune::TUNED_TOKENS` only
    /// where two pairs a pass fit (`two_pairs_fit`): with one pair a pass the digits lose there.
    pub fn moe_fp8_at(&self, w: &MoeWeights, tokens: usize) -> bool {
        tokens <= self.moe_fp8_tokens && self.moe_fp8_for(w) && (tokens <= crate::moe_tune::TUNED_TOKENS || self.two_pairs_fit(w))
    }

    /// Whether the two-launch digit MoE of `tokens` tokens over `w` takes two pairs of a slot a
    /// pass (`moe_gate_up_dg2_*`, `moe_down_dg2_*`): from `moe_fp8_pairs_from` tokens, where
    /// `two_pairs_fit`.
    pub fn moe_two_pairs_at(&self, w: &MoeWeights, tokens: usize) -> bool {
        tokens >= self.moe_fp8_pairs_from && self.two_pairs_fit(w)
    }

    /// Whether decode rows of `tokens` over `w` on a two-launch F16 kind run the mixed MoE
    /// (`moe_mxfp4_decode_pairs`): from `moe_mixed_from` rows (`PEREGRINE_MOE_MIXED_FROM`),
    /// where the digits could run (`moe_fp8_for`) but `tokens` is past their rows
    /// (`moe_fp8_at`). There a slot of more pairs than a digit pass takes would take several
    /// digit passes, each a read of its expert's tiles, against one F16 pass of up to 4.
    pub fn moe_mixed_at(&self, w: &MoeWeights, tokens: usize) -> bool {
        tokens >= self.moe_mixed_from && self.moe_fp8_for(w) && !self.moe_fp8_at(w, tokens)
    }

    /// The most pairs of a slot the mixed MoE's digit half takes at `tokens` rows (in one
    /// pass): two where two pairs a digit pass run (`moe_two_pairs_at`: Flash), else one (Pro's
    /// 6144-wide x: two digit rows leave one block an SM).
    fn mixed_digit_pairs(&self, w: &MoeWeights, tokens: usize) -> usize {
        if self.moe_two_pairs_at(w, tokens) { 2 } else { 1 }
    }

    /// The digit rings (`DG_RINGS` indices of gate_up, down) of the mixed MoE's digit half for
    /// `kind` at `tokens` rows, where it runs (`moe_mixed_at`, `kind` two-launch F16): those the
    /// tuner chose for the most digit rows (`moe_fp8_tokens`, or 8 where past 8 rows only two
    /// pairs a pass may run digits and they do not fit), else the first.
    fn mixed_digit_rings(&self, w: &MoeWeights, kind: MoeKernel, tokens: usize, top_k: usize) -> Option<(usize, usize)> {
        let MoeKernel::Tiled { stages, steps, down_stages, down_steps } = kind else { return None };
        if !self.moe_mixed_at(w, tokens) || self.tiled_digits(w, tokens, (stages, steps), (down_stages, down_steps)).is_some() {
            return None;
        }
        let most = if self.two_pairs_fit(w) { self.moe_fp8_tokens } else { self.moe_fp8_tokens.min(crate::moe_tune::TUNED_TOKENS) };
        let tuned = match self.moe_kernel(w, most, top_k) {
            MoeKernel::Tiled { stages, steps, down_stages, down_steps } => self.tiled_digits(w, most, (stages, steps), (down_stages, down_steps)),
            _ => None,
        };
        Some(tuned.unwrap_or((0, 0)))
    }

    /// Sets `moe_mixed_from` (decode rows from which `moe_mixed_at` may hold; `usize::MAX`:
    /// never); returns the setting before.
    pub fn set_moe_mixed_from(&mut self, tokens: usize) -> usize {
        std::mem::replace(&mut self.moe_mixed_from, tokens.max(2))
    }

    /// Decode rows from which the mixed MoE may run (`moe_mixed_at`).
    pub fn moe_mixed_from(&self) -> usize {
        self.moe_mixed_from
    }

    /// Whether two-pair gate_up blocks over `w` (two digit rows of x beside the smallest digit
    /// ring) stay resident two to an SM. Flash's (H 4096) do, as one-pair blocks three; Pro's
    /// (H 6144) do not: one a SM, and its batch-6 / 8 steps ran 4-5% slower than with one pair a
    /// pass, its 16- and 32-row steps no faster than on F16
    /// (benches/results/2026-11-29-h200-two-pair-digit-moe-default.md).
    fn two_pairs_fit(&self, w: &MoeWeights) -> bool {
        let (stages, steps) = DG_RINGS[0];
        let smem = ring_bytes(stages, steps) + 2 * (w.hidden / 16) * DG_CORE_BYTES;
        smem <= TILED_MAX_SMEM && self.blocks_per_sm(&self.gate_up_dg2[0], smem).is_ok_and(|n| n >= 2)
    }

    /// The indices in `DG_RINGS` of the gate_up and down rings of a two-launch tiled MoE of
    /// `tokens` tokens over `w` when it runs on FP8 digits (`moe_fp8_at`, both rings digit rings).
    fn tiled_digits(&self, w: &MoeWeights, tokens: usize, gate_up: (usize, usize), down: (usize, usize)) -> Option<(usize, usize)> {
        if !self.moe_fp8_at(w, tokens) {
            return None;
        }
        let ring = |r: (usize, usize)| DG_RINGS.iter().position(|&d| d == r);
        Some((ring(gate_up)?, ring(down)?))
    }

    /// Whether MoE kernel `kind` of `tokens` tokens over `w` runs on FP8 digits (`moe_fp8_at`
    /// and digit rings), so that its bits are the digit family's.
    pub fn moe_kind_on_digits(&self, kind: MoeKernel, w: &MoeWeights, tokens: usize) -> bool {
        match kind {
            MoeKernel::Fused { stages, steps, .. } => DG_RINGS.contains(&(stages, steps)) && self.moe_fp8_at(w, tokens),
            MoeKernel::Tiled { stages, steps, down_stages, down_steps } => self.tiled_digits(w, tokens, (stages, steps), (down_stages, down_steps)).is_some(),
            _ => false,
        }
    }

    /// Sets `moe_fp8_tokens` (1..=`moe_fp8_tokens_max`: above, the MoE GEMM runs);
    /// returns the setting before. As with `set_moe_fp8`, kernels tuned before keep their
    /// choice, and scratch allocated before holds the digit rows of the setting it saw.
    pub fn set_moe_fp8_tokens(&mut self, tokens: usize) -> Result<usize> {
        let most = self.moe_fp8_tokens_max();
        check((1..=most).contains(&tokens), || format!("FP8 digit MoE token counts must be 1..={most}, not {tokens}"))?;
        Ok(std::mem::replace(&mut self.moe_fp8_tokens, tokens))
    }

    /// Rows up to which the MoE may run on FP8 digits (`moe_fp8_at`).
    pub fn moe_fp8_tokens(&self) -> usize {
        self.moe_fp8_tokens
    }

    /// The token counts `tune_moe` measures on this GPU: 1..=`moe_tune::TUNED_TOKENS`, then the
    /// decode row buckets up to `moe_tune_tokens`.
    pub fn tuned_counts(&self) -> Vec<usize> {
        crate::moe_tune::tuned_counts_up_to(self.moe_tune_tokens)
    }

    /// The most rows `set_moe_fp8_tokens` takes on this GPU (`fp8_tokens_max`).
    pub fn moe_fp8_tokens_max(&self) -> usize {
        fp8_tokens_max(self.moe_tune_tokens)
    }

    /// Sets the token count from which the two-launch digit MoE passes take two pairs of a slot
    /// at once (`moe_fp8_pairs_from`; 1: always); returns the setting before.
    pub fn set_moe_fp8_pairs_from(&mut self, tokens: usize) -> usize {
        std::mem::replace(&mut self.moe_fp8_pairs_from, tokens.max(1))
    }

    /// Turns the FP8 digit MoE (`moe_fp8_for`) on or off; returns the setting before. Tuned
    /// choices stay as tuned (`tune_moe` keeps the digit token counts on digit kernels while it
    /// is on, so the choice between kernels never changes the bits).
    pub fn set_moe_fp8(&mut self, on: bool) -> bool {
        std::mem::replace(&mut self.moe_fp8, on)
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
        if self.tiled_digits(w, tokens, (stages, steps), (stages, steps)).is_some() {
            return Ok(1);
        }
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
    /// Where the tuned kernel runs on FP8 digits (`moe_fp8_at`), whose passes take one pair each,
    /// such rows take the tuner's fastest kernel off the digits instead (`tuned_verify_moe`):
    /// H200, Flash, 8 tokens of one sequence 5.49-5.51 ms a verify step on digits against 4.94.
    pub fn moe_kernel_rows(&self, w: &MoeWeights, tokens: usize, top_k: usize, decode: bool) -> MoeKernel {
        if !decode && matches!(w.layout, MoeLayout::Tiled { .. }) && MoeKernel::forced().is_none() {
            if tokens > crate::moe_tune::TUNED_TOKENS {
                return if self.gemm { MoeKernel::for_tiled(tokens, top_k) } else { MoeKernel::TILED };
            }
            if let Some(kind) = self.tuned_verify_moe(w, top_k, tokens) {
                return kind;
            }
        }
        self.moe_kernel(w, tokens, top_k)
    }

    /// Whether MoE kernel `kind` reads x split for `tokens` tokens of top-k routing over `w`
    /// (takes `MoeInput::Split`'s rows): the two-launch tiled kernels from 2 tokens
    /// (`splits_x`) and the MoE GEMM.
    pub fn moe_kind_reads_split(&self, kind: MoeKernel, w: &MoeWeights, tokens: usize, top_k: usize) -> bool {
        match kind {
            MoeKernel::Tiled { .. } => self.splits_x(tokens) && !self.moe_kind_on_digits(kind, w, tokens),
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
    fn fused_grid(&self, f: &CudaFunction, w: &MoeWeights, stages: usize, steps: usize, max_blocks: usize, tokens: usize, u: usize, scratch: usize, ms: &MoeScratch, pairs: usize, fp8: bool) -> Result<LaunchConfig> {
        let (h, i) = (w.hidden, w.inter);
        let counters = &ms.counters;
        // The digit form hands h over as digit rows (dg_row_floats).
        check(!fp8 || ms.h.len() >= pairs * dg_row_floats(i), || "MoE scratch too small for the digit rows of h".into())?;
        let ring = ring_bytes(stages, steps);
        // The FP8 digit kernels stage one row a pass, in core matrices of 16 values.
        let staged = if fp8 { h.max(i) / 16 * DG_CORE_BYTES } else { h.max(i) * 4 * self.staged_pairs(f, ring, h.max(i), tokens, scratch)? };
        let smem = (ring + staged).max(scratch);
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
        let (f, fp8) = match self.fp8_fused(&self.fused_routed_dg, w, stages, steps, 1) {
            Some(f) => (f, true),
            None => (&self.fused_routed[Self::tiled_variant(stages, steps)?], false),
        };
        let cfg = self.fused_grid(f, w, stages, steps, max_blocks, 1, u, 8 * e, scratch, k, fp8)?;
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
        let (f, fp8) = match self.fp8_fused(&self.fused_acc_dg, w, stages, steps, 1) {
            Some(f) => (f, true),
            None => (&self.fused_acc[Self::tiled_variant(stages, steps)?], false),
        };
        // Shared scratch before the rings: scores, choices, logits and the bias, E floats each.
        let cfg = self.fused_grid(f, w, stages, steps, max_blocks, 1, u, 16 * e, scratch, k, fp8)?;
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
        self.moe_mxfp4_run(kind, w, r, x, input, scratch, Some(y), false)
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
        self.moe_mxfp4_run(kind, w, r, x, input, scratch, None, false)
    }

    /// `moe_mxfp4_pairs` for decode rows (one per sequence): where `moe_mixed_at` holds and
    /// `kind` is a two-launch kernel on F16 MMAs, the slots of up to `mixed_digit_pairs` pairs
    /// run on the digit kernels and only the others on `kind` (other bits for those pairs: the
    /// digit kernels'). Rows that may share experts (verify blocks) keep `moe_mxfp4_pairs`.
    pub fn moe_mxfp4_decode_pairs(&self, kind: MoeKernel, w: &MoeWeights, r: &DeviceRouting, x: &CudaSlice<f32>, input: MoeInput, scratch: &mut MoeScratch) -> Result<()> {
        self.moe_mxfp4_run(kind, w, r, x, input, scratch, None, true)
    }

    /// `moe_mxfp4_with` for decode rows: `moe_mxfp4_decode_pairs`, then the pairs combined
    /// into y (`moe_combine`) where the mixed form ran.
    pub fn moe_mxfp4_decode(&self, kind: MoeKernel, w: &MoeWeights, r: &DeviceRouting, x: &CudaSlice<f32>, input: MoeInput, scratch: &mut MoeScratch, y: &mut CudaSlice<f32>) -> Result<()> {
        self.moe_mxfp4_run(kind, w, r, x, input, scratch, Some(y), true)
    }

    /// `moe_mxfp4_with`; y None: the pairs stay uncombined (where `moe_leaves_pairs`).
    /// `decode`: decode rows (one per sequence), which run the mixed form where `moe_mixed_at`
    /// holds.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn moe_mxfp4_run(&self, kind: MoeKernel, w: &MoeWeights, r: &DeviceRouting, x: &CudaSlice<f32>, input: MoeInput, scratch: &mut MoeScratch, mut y: Option<&mut CudaSlice<f32>>, decode: bool) -> Result<()> {
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
            (MoeLayout::Tiled { .. }, MoeKernel::Tiled { stages, steps, down_stages, down_steps }) => {
                let rings = ((stages, steps), (down_stages, down_steps));
                let MoeScratch { h: hbuf, out, counters } = &mut *scratch;
                // (Scratch sized before the mixed MoE was set keeps the plain form.)
                let fits = hbuf.len() >= r.num_pairs * dg_row_floats(i);
                if let Some(dr) = self.mixed_digit_rings(w, kind, r.num_tokens, r.top_k).filter(|_| decode && fits) {
                    // Mixed (`moe_mixed_at`): the slots of 1..=npd pairs (`mixed_digit_pairs`) on
                    // the digit kernels (a pass each), then the others on `kind`'s F16
                    // kernels (up to 4 pairs a pass), with h of their own (the two halves lay h
                    // out differently). The F16 gate_up waits for the digit down, so each
                    // launch's completion covers the ones before it (programmatic dependent
                    // launch orders only neighbours). Both leave their pairs (the fused combine
                    // counts every slot): with y, moe_combine below sums them, in its order.
                    let npd = self.mixed_digit_pairs(w, r.num_tokens);
                    self.tiled_launches(w, r, x, input, (DG_RINGS[dr.0], DG_RINGS[dr.1]), Some(dr), npd, hbuf, out, counters, None, (1, npd as i32))?;
                    // Written in full by the F16 gate_up before its down reads it.
                    let mut hf = unsafe { self.alloc.alloc::<f32>(r.num_pairs * i) }?;
                    self.tiled_launches(w, r, x, input, rings, None, 1, &mut hf, out, counters, None, (npd as i32 + 1, i32::MAX))?;
                    if y.is_none() {
                        return Ok(());
                    }
                } else {
                    let digits = self.tiled_digits(w, r.num_tokens, rings.0, rings.1);
                    // Two pairs of a slot a digit pass from `moe_fp8_pairs_from` tokens, where they fit.
                    let npd = if digits.is_some() && self.moe_two_pairs_at(w, r.num_tokens) { 2 } else { 1 };
                    self.tiled_launches(w, r, x, input, rings, digits, npd, hbuf, out, counters, y.as_deref_mut(), (1, i32::MAX))?;
                    if r.top_k <= MAX_FUSED_TOPK || y.is_none() {
                        return Ok(());
                    }
                }
            }
            (MoeLayout::Tiled { gate_up, down }, MoeKernel::Fused { stages, steps, max_blocks }) => {
                check(r.top_k <= MAX_FUSED_TOPK, || format!("the fused MoE kernel combines at most {MAX_FUSED_TOPK} experts per token, not {}", r.top_k))?;
                // FP8 digits where the GPU, shape and token count allow (`moe_fp8_at`).
                let (f, fp8) = match self.fp8_fused(&self.fused_tiled_dg, w, stages, steps, r.num_tokens) {
                    Some(f) => (f, true),
                    None => (&self.fused_tiled[Self::tiled_variant(stages, steps)?], false),
                };
                let cfg = self.fused_grid(f, w, stages, steps, max_blocks, r.num_tokens, u as usize, 0, scratch, r.num_pairs, fp8)?;
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

    /// The two-launch tiled MoE (gate_up, then down) of routing `r` over the expert slots of
    /// `slots.0..=slots.1` pairs (the others' blocks leave at once): on `rings` (gate_up,
    /// down), on FP8 digits where `digits` gives their `DG_RINGS` indices (passes of `npd`
    /// pairs), else on F16 MMAs; h in `hbuf`, the pairs' outputs in `out`, combined into `y`
    /// where given (every slot in range only: the combine counts them all).
    fn tiled_launches(&self, w: &MoeWeights, r: &DeviceRouting, x: &CudaSlice<f32>, input: MoeInput, rings: ((usize, usize), (usize, usize)), digits: Option<(usize, usize)>, npd: usize, hbuf: &mut CudaSlice<f32>, out: &mut CudaSlice<f32>, counters: &mut CudaSlice<u32>, mut y: Option<&mut CudaSlice<f32>>, slots: (i32, i32)) -> Result<()> {
        let ((stages, steps), (down_stages, down_steps)) = rings;
        let (v, dv) = (Self::tiled_variant(stages, steps)?, Self::tiled_variant(down_stages, down_steps)?);
        let (h, i, u) = (w.hidden, w.inter, r.num_experts_used as u32);
        let (hh, ii) = (h as i32, i as i32);
        let MoeLayout::Tiled { gate_up, down } = &w.layout else {
            return Err(Error::Backend("the tiled MoE kernels read the tiled layout".into()));
        };
        let (np_min, np_max) = slots;
        let (ti, ki, settled) = (r.num_tokens as i32, r.top_k as i32, input.settled_flag());
        let fused = r.top_k <= MAX_FUSED_TOPK;
        let groups = (h / 16).div_ceil(8);
        check(counters.len() >= groups, || "MoE scratch counters too small".into())?;
        // Per-slot counters after the combine's (done, then passed; moe_counters sizes
        // them), zero between calls like the combine's; 0: the whole-grid wait.
        let slot_wait = fused && self.slot_wait.contains(&r.num_tokens) && counters.len() >= groups + 2 * u as usize;
        let slot_ptr = if slot_wait { counters.device_ptr(&self.stream).0 + (groups * std::mem::size_of::<u32>()) as u64 } else { 0u64 };
        // From 2 tokens the _split_ kernels: x split once per token (here), and with the
        // per-slot wait h once per slot (by its last gate_up block); both written in full
        // before they are read. On FP8 digits (`tiled_digits`) neither: a pass stages its
        // pair's x as digits, and gate_up hands h over as the pairs' digit rows.
        let fg = match digits {
            Some((g, _)) if npd == 2 => &self.gate_up_dg2[g],
            Some((g, _)) => &self.gate_up_dg[g],
            None => self.gate_up_kernel(v, r.num_tokens),
        };
        let split_x = digits.is_none() && self.splits_x(r.num_tokens);
        let split_h = split_x && self.presplit_h && slot_wait;
        let fd = match digits {
            Some((_, d)) if npd == 2 => &self.down_dg2[d],
            Some((_, d)) => &self.down_dg[d],
            None if split_h => &self.down_split[dv],
            None => &self.down_tiled[dv],
        };
        let ring = ring_bytes(stages, steps);
        let (gu_smem, d_smem) = if digits.is_some() {
            check(hbuf.len() >= r.num_pairs * dg_row_floats(i), || "MoE scratch too small for the digit rows of h".into())?;
            (ring + npd * h / 16 * DG_CORE_BYTES, ring_bytes(down_stages, down_steps) + npd * i / 16 * DG_CORE_BYTES)
        } else {
            // A routed expert has at most one pair per token; a pass stages up to 4.
            let np = self.staged_pairs(fg, ring, h.max(i), r.num_tokens, 0)?;
            (ring + h * 4 * np, ring_bytes(down_stages, down_steps) + i * 4 * np)
        };
        check(gu_smem.max(d_smem) <= TILED_MAX_SMEM, || format!("MoE dims {h}, {i} need more than {TILED_MAX_SMEM} bytes of shared memory"))?;
        // A block's 8 warps stream one 16-row tile each.
        let cfg = |tiles: usize, smem: usize| LaunchConfig { grid_dim: (tiles.div_ceil(8) as u32, u, 1), block_dim: (256, 1, 1), shared_mem_bytes: smem as u32 };
        let alloc_u32 = |n: usize| unsafe { self.alloc.alloc::<u32>(n) };
        let alloc_f32 = |n: usize| unsafe { self.alloc.alloc::<f32>(n) };
        // On digits from 2 tokens, x as digit rows, written one launch ahead.
        // (The split and digit rows live to the end of the call: freed in stream order after both launches.)
        // (Given as `MoeInput::Digits`, or written here.)
        let own_digits;
        let x_digits = match (digits, input) {
            (Some(_), MoeInput::Digits(d)) if r.num_tokens >= 2 => {
                check(d.len() >= r.num_tokens * dg_x_row_bytes(h), || format!("MoE: {} digit rows of {h} given in {} bytes", r.num_tokens, d.len()))?;
                Some(d)
            }
            (_, MoeInput::Digits(_)) => return Err(Error::Backend(format!("MoE: x given as digit rows, but the {} kernels at {} tokens do not read them", if digits.is_some() { "digit" } else { "F16" }, r.num_tokens))),
            (Some(_), _) if r.num_tokens >= 2 => {
                own_digits = self.digit_rows(x, r.num_tokens, h)?;
                Some(&own_digits)
            }
            _ => None,
        };
        let mut b = crate::launch::builder(&self.stream, fg);
        b.arg(gate_up).arg(&r.experts).arg(&r.pair_off).arg(&r.pair_tok);
        let (_xsplit, mut hsplit) = if split_x {
            let xsplit = self.x_split(input, x, r.num_tokens, h)?;
            let sp = xsplit.rows();
            let mut hsplit = if split_h { Some((alloc_u32(r.num_pairs * i)?, alloc_f32(r.num_pairs)?)) } else { None };
            b.arg(&mut *hbuf).arg(&hh).arg(&ii).arg(&slot_ptr).arg(&sp.xs).arg(&sp.inv);
            match &mut hsplit {
                Some((hs, hinv)) => b.arg(hs).arg(hinv),
                None => b.arg(&0u64).arg(&0u64),
            };
            b.arg(&np_min).arg(&np_max);
            unsafe { b.launch(cfg(2 * i / 16, gu_smem)) }.map_err(drv("moe gate_up (tiled, split)"))?;
            (Some(xsplit), hsplit)
        } else {
            // One settled token's x is staged before the kernel waits for the one ahead
            // (moe.cu, stage_token_early).
            b.arg(x).arg(&mut *hbuf).arg(&hh).arg(&ii).arg(&ti).arg(&settled).arg(&slot_ptr);
            if digits.is_some() {
                match x_digits {
                    Some(xd) => b.arg(xd),
                    None => b.arg(&0u64),
                };
            }
            b.arg(&np_min).arg(&np_max);
            unsafe { b.launch(cfg(2 * i / 16, gu_smem)) }.map_err(drv("moe gate_up (tiled)"))?;
            (None, None)
        };
        // The down kernel asks for its weights before it waits for gate_up (see launch.rs).
        let mut b = crate::launch::builder(&self.stream, fd);
        b.arg(down).arg(&r.experts).arg(&r.pair_off).arg(&r.pair_w);
        if hsplit.is_none() {
            b.arg(&*hbuf);
        }
        b.arg(&mut *out).arg(&hh).arg(&ii);
        // Null counters: no combine (the pairs' consumer sums them, or moe_combine).
        match &mut y {
            Some(_) if fused => b.arg(&mut *counters),
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
        b.arg(&np_min).arg(&np_max);
        unsafe { b.launch(cfg(h / 16, d_smem)) }.map_err(drv("moe down (tiled)"))?;
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

    /// `rows` rows of `x` [rows, k] as the FP8 digit kernels stage them (`moe_digit_rows`,
    /// `dg_x_row_bytes` each), for the two-launch digit gate_up; written in full.
    fn digit_rows(&self, x: &CudaSlice<f32>, rows: usize, k: usize) -> Result<CudaSlice<u8>> {
        check(k.is_multiple_of(256) && k <= 8192 && x.len() >= rows * k, || format!("moe_digit_rows: {rows} rows of {k}"))?;
        let mut xd = unsafe { self.alloc.alloc::<u8>(rows.max(1) * dg_x_row_bytes(k)) }?;
        let ki = k as i32;
        let mut b = crate::launch::builder(&self.stream, &self.digit_rows);
        b.arg(x).arg(&ki).arg(&mut xd);
        // A row's digits in shared memory: the kernel stages them before its wait, writes them after.
        let smem = dg_x_row_bytes(k) as u32;
        unsafe { b.launch(LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: smem }) }.map_err(drv("moe_digit_rows"))?;
        Ok(xd)
    }

    /// `digit_rows` of the post-attention norm's output where the o_proj did the router for
    /// `rows` tokens (`gemv_bf16_presplit_route` into `r`): row t is g h_t (`r.hg`) times its
    /// 1 / rms from `r.ssq` (`moe_digit_rows_acc`); written in full.
    pub fn digit_rows_acc(&self, r: &RouteInOproj, rows: usize, k: usize, eps: f32) -> Result<CudaSlice<u8>> {
        let nssq = k / 16;
        check(k.is_multiple_of(256) && k <= 8192 && r.hg.len() >= rows * k && r.ssq.len() >= rows * nssq, || format!("moe_digit_rows_acc: {rows} rows of {k}"))?;
        let mut xd = unsafe { self.alloc.alloc::<u8>(rows.max(1) * dg_x_row_bytes(k)) }?;
        let (ki, ni) = (k as i32, nssq as i32);
        let mut b = crate::launch::builder(&self.stream, &self.digit_rows_acc);
        b.arg(r.hg).arg(&ki).arg(&mut xd).arg(r.ssq).arg(&ni).arg(&eps);
        // As digit_rows: a row's digits in shared memory, written after the wait.
        let smem = dg_x_row_bytes(k) as u32;
        unsafe { b.launch(LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: smem }) }.map_err(drv("moe_digit_rows_acc"))?;
        Ok(xd)
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

    /// The norm after the MoE sums rows of pairs up to 128 KB at any count, up to 192 KB (Pro's
    /// 8 x 6144 floats) only at 2-8 rows, where that measured faster (unless
    /// PEREGRINE_MOE_COMBINE_IN_NORM forces it, which this test then leaves alone).
    #[test]
    fn pairs_go_to_the_norm_by_row_bytes_and_row_count() {
        if std::env::var_os("PEREGRINE_MOE_COMBINE_IN_NORM").is_some() {
            return;
        }
        for rows in [1, 2, 8, 9, 16, 64, 2048] {
            assert!(moe_pairs_pay(8, 4096, rows), "Flash's 128 KB rows at {rows} rows");
            assert_eq!(moe_pairs_pay(8, 6144, rows), (2..=8).contains(&rows), "Pro's 192 KB rows at {rows} rows");
            assert!(!moe_pairs_pay(8, 8192, rows), "256 KB rows at {rows} rows");
        }
    }

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
}
