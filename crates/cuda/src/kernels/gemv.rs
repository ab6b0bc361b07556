//! The dense projections (`kernels/gemv.cu`): BF16 and FP8 GEMVs on CUDA cores and tensor
//! cores, the wgmma GEMM for larger batches, and the activation splits they read.

// Kernel launches take their buffers and shapes explicitly.
#![allow(clippy::too_many_arguments)]

use super::*;
use crate::tc_tiles;

/// The one-token lm_head's argmax keys (`gemv_bf16_presplit_argmax`): its warps spread their
/// atomics over this many keys, one 128-byte line (`ARGMAX_KEY_STRIDE` u64) apart.
pub const ARGMAX_KEY_SLOTS: usize = 64;
pub const ARGMAX_KEY_STRIDE: usize = 16;
// argmax_unpack reads at most 4 keys a lane of its one warp.
const _: () = assert!(ARGMAX_KEY_SLOTS <= 128);

/// Tile shapes of the tensor-core GEMV kernels (kernels/gemv.cu, `GEMV_MMA`): 8 NT tokens and
/// 16 R rows per block. More rows per block share each activation load; more tokens per block
/// share each weight load but cost registers.
pub const MMA_GEMV_TILES: [(usize, usize); 5] = [(1, 1), (2, 2), (2, 4), DENSE_GEMM_TILE, DEEP_GEMM_TILE];

/// The entry of `MMA_GEMV_TILES` that is the GEMM (`gemm_mma_*`: 128 rows x 64 tokens per
/// block, weights and activations staged in shared memory; the GEMV's bits).
pub(super) const DENSE_GEMM_TILE: (usize, usize) = (8, 8);

/// The entry that is the GEMM with a deep pipeline for decode batches (`gemm_mma_deep_*`: one
/// block per SM, 6 (FP8) or 5 (BF16) chunks in flight). (8, 6) is its label.
pub(super) const DEEP_GEMM_TILE: (usize, usize) = (8, 6);

/// Shared memory of a `gemm_mma_*` block (kernels/gemv.cu's GemmTile): 2 stages of 128 rows'
/// weights and 64 tokens' hi + lo parts of a 64-k chunk, rows padded to 144 bytes but FP8's;
/// `gemm_mma_deep_*` (`deep`) has 6 (FP8) or 5 (BF16), as kernels/gemv.cu instantiates it.
pub(super) const fn dense_gemm_smem(fp8: bool, deep: bool) -> usize {
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
pub(super) const fn dense_wg_smem(rows: usize) -> usize {
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

pub(super) fn mma_gemv_name(format: &str, nt: usize, r: usize) -> String {
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

pub(super) fn mma_gemv_index(tile: (usize, usize)) -> Result<usize> {
    MMA_GEMV_TILES.iter().position(|&x| x == tile).ok_or_else(|| Error::Backend(format!("GEMV tile {tile:?} is not one of {MMA_GEMV_TILES:?} (NT x R)")))
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

impl Kernels {
    /// `y[t, n] = W[n, :] · x[t, :]` for BF16 `W` [N, K] (as u16 bits); K % 32 == 0. The
    /// tensor-core kernel when K % 128 == 0, `W` then in the tile layout (`tc_tiles`), else the
    /// one-row-per-warp kernel over `W` row-major.
    pub fn gemv_bf16(&self, w: &CudaSlice<u16>, x: &CudaSlice<f32>, y: &mut CudaSlice<f32>, n: usize, k: usize, t: usize) -> Result<()> {
        if k.is_multiple_of(128) {
            check(w.len() >= tc_tiles::padded_rows(n) * k && y.len() >= t * n, || format!("gemv_bf16: W must hold {n}x{k} in tiles and y {t}x{n}"))?;
            let (wp, _w) = w.device_ptr(&self.stream);
            let (yp, _y) = y.device_ptr_mut(&self.stream);
            return self.gemv_mma(false, wp, None, x, [yp; 3], [n, 0, 0], k, t);
        }
        self.gemv_bf16_simt(w, x, y, n, k, t)
    }

    /// One GEMV whose rows are split over three outputs: rows `[0, n[0])` into `ys[0]`
    /// ([T, n[0]]), the next `n[1]` into `ys[1]`, the last `n[2]` into `ys[2]` (a fused q/k/v
    /// projection). `W` is FP8 (with `scales`) or BF16 (`scales` None), the parts' rows stacked
    /// in the tile layout (`tc_tiles`; parts before the last of whole tiles); K % 128 == 0. An FP8
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

    /// FP8 e4m3 `W` [N, K] in the tile layout (`tc_tiles`) with f32 block scales
    /// [ceil(N/128), K/128]; K % 128 == 0 (tensor-core kernel).
    pub fn gemv_fp8(&self, w: &CudaSlice<u8>, scales: &CudaSlice<f32>, x: &CudaSlice<f32>, y: &mut CudaSlice<f32>, n: usize, k: usize, t: usize) -> Result<()> {
        check(k.is_multiple_of(128) && w.len() >= tc_tiles::padded_rows(n) * k && scales.len() >= n.div_ceil(128) * (k / 128), || format!("gemv_fp8: bad shapes {n}x{k}"))?;
        check(y.len() >= t * n, || format!("gemv_fp8: y must hold {t}x{n}"))?;
        let (wp, _w) = w.device_ptr(&self.stream);
        let (yp, _y) = y.device_ptr_mut(&self.stream);
        self.gemv_mma(true, wp, Some(scales), x, [yp; 3], [n, 0, 0], k, t)
    }

    /// The one-row-per-warp FP8 GEMV (CUDA cores) over `W` row-major, kept for comparison in the
    /// bench.
    pub fn gemv_fp8_simt(&self, w: &CudaSlice<u8>, scales: &CudaSlice<f32>, x: &CudaSlice<f32>, y: &mut CudaSlice<f32>, n: usize, k: usize, t: usize) -> Result<()> {
        check(k.is_multiple_of(128) && w.len() >= n * k && scales.len() >= n.div_ceil(128) * (k / 128), || format!("gemv_fp8: bad shapes {n}x{k}"))?;
        let (ni, ki) = (n as i32, k as i32);
        Self::per_pass(x, y, n, k, t, |xs, mut ys, tt| {
            let mut b = crate::launch::builder(&self.stream, &self.fp8);
            b.arg(w).arg(scales).arg(&xs).arg(&mut ys).arg(&ni).arg(&ki).arg(&tt);
            unsafe { b.launch(Self::rows_cfg(n, 1)) }.map(|_| ()).map_err(drv("gemv_fp8"))
        })
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

    /// Sets whether the one-token argmax lm_head asks L2 for its first K blocks before its PDL
    /// wait (`gemv_mma_bf16_t1_argmax_pf`; off by default), for measurements. Same bits.
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

    /// Waves of its kernel's blocks that `gemv_qkv_ready` of `rows` stacked rows and `t` tokens
    /// takes (the kernel `qkv_ready_kernel` chooses, one 16-row tile a block).
    pub fn qkv_ready_waves(&self, rows: usize, t: usize) -> usize {
        let wave = match self.qkv_ready_kernel(rows, t) {
            QkvReady::Warps8 => self.mma_fp8_ready_wave,
            QkvReady::Warps4 => self.mma_fp8_ready4_wave,
            QkvReady::Pipe => self.mma_fp8_ready4_pipe_wave[0],
            QkvReady::PipeShuffled => self.mma_fp8_ready4_pipe_wave[1],
        };
        rows.div_ceil(16).div_ceil(wave.max(1))
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

    /// `y[t, n] = W[n, :] · x[t, :]` for BF16 `W` [N, K] in the tile layout (`tc_tiles`) with x
    /// given as its BF16 hi + lo parts [T, K] (as the attention kernels write them); K % 128 == 0.
    /// `zero`: counters to zero once the kernel ahead has finished (a ready attention's,
    /// `zero_after_wait`).
    #[allow(clippy::too_many_arguments)]
    pub fn gemv_bf16_presplit(&self, w: &CudaSlice<u16>, xh: &CudaSlice<u16>, xl: &CudaSlice<u16>, y: &mut CudaSlice<f32>, n: usize, k: usize, t: usize, zero: Option<&CudaSlice<u32>>) -> Result<()> {
        check(k.is_multiple_of(128) && w.len() >= tc_tiles::padded_rows(n) * k && xh.len() >= t * k && xl.len() >= t * k && y.len() >= t * n, || format!("gemv_bf16_presplit: bad shapes {n}x{k}, {t} tokens"))?;
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
        check(w.len() >= tc_tiles::padded_rows(n) * k && xh.len() >= k && xl.len() >= k && y.len() >= n && keys.len() >= ARGMAX_KEY_SLOTS * ARGMAX_KEY_STRIDE, || format!("gemv_bf16_presplit_argmax: bad shapes {n}x{k}"))?;
        let (ni, ki, ti, slots, stride) = (n as i32, k as i32, 1i32, ARGMAX_KEY_SLOTS as i32, ARGMAX_KEY_STRIDE as i32);
        let mut b = crate::launch::builder(&self.stream, if self.lm_head_prefetch { &self.mma_bf16_argmax_pf } else { &self.mma_bf16_argmax });
        let (yp, _y) = y.device_ptr_mut(&self.stream);
        b.arg(w).arg(&0u64).arg(xh).arg(xl).arg(&0u64).arg(&yp).arg(&yp).arg(&yp).arg(&ni).arg(&0i32).arg(&ni).arg(&ki).arg(&ti);
        b.arg(keys).arg(&slots).arg(&stride);
        let cfg = LaunchConfig { grid_dim: (n.div_ceil(16) as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        unsafe { b.launch(cfg) }.map_err(drv("gemv_mma_bf16_t1_argmax"))?;
        Ok(())
    }

    /// Whether `gemv_bf16_presplit_route` takes an o_proj of `n` x `k` (up to
    /// `ROUTE_OPROJ_MAX_ROWS` tokens) with a router of `experts` rows: the pipelined one-tile
    /// kernel's shapes (one wave).
    pub fn oproj_route_takes(&self, n: usize, k: usize, experts: usize) -> bool {
        n.is_multiple_of(16) && k.is_multiple_of(128) && (1..=ROUTE_OPROJ_MAX_EXPERTS).contains(&experts) && self.pipe_takes(false, 1, 1, n / 16)
    }

    /// `gemv_bf16_presplit` of `t` <= `ROUTE_OPROJ_MAX_ROWS` tokens (`oproj_route_takes`) that
    /// also starts the MoE's router (gemv_mma_bf16_t1_pipe_route): y = o as before, and with
    /// h = res + o, norm * h, each token's blocks' sums of squares of h and the router's
    /// fixed-point sums over norm * h into `r`'s buffers (token j's sums `r.tok` words on).
    #[allow(clippy::too_many_arguments)]
    pub fn gemv_bf16_presplit_route(&self, w: &CudaSlice<u16>, xh: &CudaSlice<u16>, xl: &CudaSlice<u16>, y: &mut CudaSlice<f32>, n: usize, k: usize, t: usize, zero: Option<&CudaSlice<u32>>, r: &RouteInOproj) -> Result<()> {
        check(self.oproj_route_takes(n, k, r.experts) && (1..=ROUTE_OPROJ_MAX_ROWS).contains(&t), || format!("gemv_bf16_presplit_route: {n}x{k} with {} experts at {t} tokens is not its shape", r.experts))?;
        check(w.len() >= tc_tiles::padded_rows(n) * k && xh.len() >= t * k && xl.len() >= t * k && y.len() >= t * n, || format!("gemv_bf16_presplit_route: bad shapes {n}x{k}, {t} tokens"))?;
        check(
            r.res.len() >= t * n && r.norm.len() >= n && r.router.len() >= r.experts * n && r.ssq.len() >= t * (n / 16) && r.hg.len() >= t * n && r.acc != 0 && r.copies >= 1 && (t == 1 || r.tok > r.copies * r.experts),
            || "gemv_bf16_presplit_route: router buffers too small".into(),
        )?;
        let (wp, _w) = w.device_ptr(&self.stream);
        let (ni, ki, ti, ei, tok) = (n as i32, k as i32, t as i32, r.experts as i32, r.tok as i32);
        let mut b = crate::launch::builder(&self.stream, &self.mma_bf16_pipe_route);
        b.arg(&wp).arg(&0u64).arg(xh).arg(xl).arg(&0u64);
        b.arg(&mut *y).arg(&0u64).arg(&0u64).arg(&ni).arg(&0i32).arg(&ni).arg(&ki).arg(&ti);
        let nzero = zero.map_or(0, |z| z.len() as i32);
        b.arg_or_null(zero).arg(&nzero);
        let ci = r.copies as i32;
        b.arg(r.res).arg(r.norm).arg(r.router).arg(&ei).arg(&r.acc).arg(&ci).arg(r.ssq).arg(r.hg).arg(&tok);
        let cfg = LaunchConfig { grid_dim: ((n / 16) as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: (r.experts * 64) as u32 };
        unsafe { b.launch(cfg) }.map_err(drv("gemv_mma_bf16_t1_pipe_route"))?;
        Ok(())
    }

    /// `gemv_fp8` over x given as its F16 split (`split_f16`'s hi, lo and inverse scales, e.g.
    /// from `silu_mul_split_f16`).
    #[allow(clippy::too_many_arguments)]
    pub fn gemv_fp8_presplit(&self, w: &CudaSlice<u8>, scales: &CudaSlice<f32>, x: &F16Split, y: &mut CudaSlice<f32>, n: usize, k: usize, t: usize) -> Result<()> {
        let (xh, xl, inv) = x;
        check(k.is_multiple_of(128) && w.len() >= tc_tiles::padded_rows(n) * k && scales.len() >= n.div_ceil(128) * (k / 128), || format!("gemv_fp8_presplit: bad shapes {n}x{k}"))?;
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
}

#[cfg(test)]
mod tests {
    use super::*;

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
