//! The step's dense operations on `CudaModel`: projections, RMSNorms fused with the residual
//! add (and the activation splits the next projection reads), dense MLPs, the embedding, the
//! lm_head and argmax.

use super::*;

/// Row copies (embedding, gathers): 256 threads, enough blocks per row for one element each
/// (at most 64).
fn row_copy_cfg(rows: usize, d: usize) -> LaunchConfig {
    LaunchConfig { grid_dim: (rows as u32, d.div_ceil(256).clamp(1, 64) as u32, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }
}

/// Threads of `gemv_f32` (and `gemv_f32_norm`) for rows of `k` (k % 4 == 0): one block per row,
/// up to four float4s of it per thread (the kernels' register path), whole warps.
fn gemv_f32_threads(k: usize) -> usize {
    (k / 4).div_ceil(4).div_ceil(32).clamp(1, 32) * 32
}

/// One block per row of `d`: a thread per float4 (the norm kernels' register path, whole
/// warps, at most 1024), or 256 threads for rows that are not a multiple of 4.
fn norm_cfg(rows: usize, d: usize) -> LaunchConfig {
    // One float4 per thread: 512 or 256 threads holding 2 or 4 each made the batch-1 step
    // 0.2% / 2.3% slower (benches/results/2026-11-24-moe-pairs-one-token.md).
    let threads = if d.is_multiple_of(4) { (d / 4).div_ceil(32).clamp(1, 32) * 32 } else { 256 };
    LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (threads as u32, 1, 1), shared_mem_bytes: 0 }
}

/// Rows from which an f32 matrix is applied by the tiled `gemm_f32_nt` (`gemv_f32_into`).
pub(crate) const GEMM_F32_MIN_ROWS: usize = 32;
/// Rows up to which (exclusive) an f32 matrix is applied by `gemv_f32_tiles` (`gemv_f32_into`).
pub(crate) const F32_TILES_MAX_ROWS: usize = 128;
/// `gemv_f32_tiles`' block: weight rows x at most this many tokens (F32T_ROWS, F32T_TOKENS in
/// ops.cu).
const F32_TILES_ROWS: usize = 4;
const F32_TILES_TOKENS: usize = 16;

impl CudaModel {
    pub(crate) fn zeros(&self, n: usize) -> Result<CudaSlice<f32>> {
        self.kernels.zeros(n)
    }

    /// An uninitialised buffer, for outputs a kernel writes in full (saves a memset per op).
    pub(crate) fn empty(&self, n: usize) -> Result<CudaSlice<f32>> {
        // SAFETY: every caller passes it to a kernel that writes all `n` elements before reads.
        unsafe { self.kernels.alloc.alloc::<f32>(n) }
    }

    pub(crate) fn matvec(&self, m: &Mat, x: &CudaSlice<f32>, t: usize) -> Result<CudaSlice<f32>> {
        let mut y = self.empty(t * m.n)?;
        self.matvec_into(m, x, t, &mut y)?;
        Ok(y)
    }

    pub(crate) fn matvec_into(&self, m: &Mat, x: &CudaSlice<f32>, t: usize, y: &mut CudaSlice<f32>) -> Result<()> {
        match &m.m {
            GpuMatrix::Bf16(w) => self.kernels.gemv_bf16(w, x, y, m.n, m.k, t),
            GpuMatrix::Fp8 { w, s } => self.kernels.gemv_fp8(w, s, x, y, m.n, m.k, t),
            GpuMatrix::Mxfp4 { w, s } => self.kernels.gemv_mxfp4(w, s, x, y, m.n, m.k, t),
            GpuMatrix::F32(w) => self.gemv_f32_into(w, m.n, m.k, x, t, y),
        }
    }

    /// f32 weights (routers, exact fallbacks): `gemv_f32` at one row; from 2 rows up to
    /// `F32_TILES_MAX_ROWS` (where K % 4 == 0 and gemv_f32's block is at most 512 threads)
    /// `gemv_f32_tiles`, which gives gemv_f32's bits, so a router's logits of a token do not
    /// depend on the batch (decode and verify blocks alike); above, the tiled `gemm_f32_nt`
    /// from `GEMM_F32_MIN_ROWS` rows when K % 4 == 0 (a prefill chunk: gemv_f32 walks the rows one
    /// block per weight row, token after token, ~2.5 ms per layer for 2048 tokens of
    /// MiMo-V2-Flash's router).
    fn gemv_f32_into(&self, w: &CudaSlice<f32>, n: usize, k: usize, x: &CudaSlice<f32>, t: usize, y: &mut CudaSlice<f32>) -> Result<()> {
        let (ni, ki, tt) = (n as i32, k as i32, t as i32);
        let threads = gemv_f32_threads(k);
        if self.f32_tiles && (2..F32_TILES_MAX_ROWS).contains(&t) && k.is_multiple_of(4) && threads <= 512 {
            // Tokens per block: 4 below 32 rows (16 rows: 64 blocks walking 16 tokens each were no
            // faster than gemv_f32), else F32_TILES_TOKENS.
            let per = if t < GEMM_F32_MIN_ROWS { 4 } else { F32_TILES_TOKENS };
            let mut b = crate::launch::builder(&self.stream, &self.ops.gemv_f32_tiles);
            let pi = per as i32;
            b.arg(w).arg(x).arg(y).arg(&ni).arg(&ki).arg(&tt).arg(&pi);
            let grid = (n.div_ceil(F32_TILES_ROWS) as u32, t.div_ceil(per) as u32, 1);
            unsafe { b.launch(LaunchConfig { grid_dim: grid, block_dim: (threads as u32, 1, 1), shared_mem_bytes: 0 }) }.map_err(drv)?;
            return Ok(());
        }
        if t >= GEMM_F32_MIN_ROWS && k.is_multiple_of(4) {
            let mut b = crate::launch::builder(&self.stream, &self.ops.gemm_f32_nt);
            b.arg(w).arg(x).arg(y).arg(&ni).arg(&ki).arg(&tt);
            unsafe { b.launch(LaunchConfig { grid_dim: (n.div_ceil(64) as u32, t.div_ceil(32) as u32, 1), block_dim: (128, 1, 1), shared_mem_bytes: 0 }) }.map_err(drv)?;
            return Ok(());
        }
        let mut b = crate::launch::builder(&self.stream, &self.ops.gemv_f32);
        b.arg(w).arg(x).arg(y).arg(&ni).arg(&ki).arg(&tt);
        let threads = if k.is_multiple_of(4) { gemv_f32_threads(k) } else { 256 };
        unsafe { b.launch(LaunchConfig { grid_dim: (n as u32, 1, 1), block_dim: (threads as u32, 1, 1), shared_mem_bytes: 0 }) }.map_err(drv)?;
        Ok(())
    }

    /// logits = router(xn) with xn = RMSNorm(x + a) * w computed by every block of the router
    /// (`gemv_f32_norm`), and xn: the bits of `add_rms_norm` then `matvec`, with x not written
    /// (the caller leaves x + a to the residual add after the MoE). Routers `router_takes_norm`
    /// accepts only.
    pub(crate) fn router_normed(&self, router: &Mat, x: &CudaSlice<f32>, a: &CudaSlice<f32>, w: &CudaSlice<f32>, t: usize) -> Result<(CudaSlice<f32>, CudaSlice<f32>)> {
        let (GpuMatrix::F32(wr), true) = (&router.m, router_takes_norm(router, t)) else {
            return Err(Error::Backend(format!("router_normed: a {}x{} router at {t} rows does not take the norm", router.n, router.k)));
        };
        let k = router.k;
        if x.len() < t * k || a.len() < t * k || w.len() < k {
            return Err(Error::Backend(format!("router_normed: inputs hold fewer than {t} rows of {k}")));
        }
        let (mut y, mut xn) = (self.empty(t * router.n)?, self.empty(t * k)?);
        let (ni, ki, tt, eps) = (router.n as i32, k as i32, t as i32, self.spec.rms_norm_eps);
        let mut b = crate::launch::builder(&self.stream, &self.ops.gemv_f32_norm);
        b.arg(wr).arg(x).arg(a).arg(w).arg(&mut y).arg(&mut xn).arg(&ni).arg(&ki).arg(&tt).arg(&eps);
        // gemv_f32's threads: the kernel reproduces norm_cfg's reduction from them.
        let threads = gemv_f32_threads(k);
        unsafe { b.launch(LaunchConfig { grid_dim: (router.n as u32, 1, 1), block_dim: (threads as u32, 1, 1), shared_mem_bytes: 0 }) }.map_err(drv)?;
        Ok((y, xn))
    }

    pub(crate) fn rms_norm(&self, x: &CudaSlice<f32>, w: &CudaSlice<f32>, rows: usize, d: usize) -> Result<CudaSlice<f32>> {
        let mut y = self.empty(rows * d)?;
        self.rms_norm_into(x, w, &mut y, rows, d)?;
        Ok(y)
    }

    fn rms_norm_into(&self, x: &CudaSlice<f32>, w: &CudaSlice<f32>, y: &mut CudaSlice<f32>, rows: usize, d: usize) -> Result<()> {
        let (dd, eps) = (d as i32, self.spec.rms_norm_eps);
        let mut b = crate::launch::builder(&self.stream, &self.ops.rms_norm);
        b.arg(x).arg(w).arg(y).arg(&dd).arg(&eps);
        unsafe { b.launch(norm_cfg(rows, d)) }.map_err(drv)?;
        Ok(())
    }

    pub(crate) fn add_inplace(&self, a: &mut CudaSlice<f32>, b2: &CudaSlice<f32>, n: usize) -> Result<()> {
        let nn = n as i32;
        let mut b = crate::launch::builder(&self.stream, &self.ops.add_inplace);
        b.arg(a).arg(b2).arg(&nn);
        unsafe { b.launch(LaunchConfig::for_num_elems(n as u32)) }.map_err(drv)?;
        Ok(())
    }

    /// A dense MLP, down(silu(gate(x)) * up(x)), over `t` rows of x. Stacked gate and up run
    /// as one GEMV; an FP8 down then reads silu x up split by `silu_mul_split_f16` (one launch
    /// for `silu_mul` and the down GEMV's own split). The bits of the separate launches.
    pub(crate) fn ffn(&self, f: &Ffn, x: &CudaSlice<f32>, t: usize) -> Result<CudaSlice<f32>> {
        self.ffn_split(f, x, None, t)
    }

    /// `ffn`, with x's F16 split when the norm ahead wrote it (`wants_dense_split`).
    pub(crate) fn ffn_split(&self, f: &Ffn, x: &CudaSlice<f32>, x_split: Option<&F16Split>, t: usize) -> Result<CudaSlice<f32>> {
        let a = match &f.gate_up {
            GateUp::Stacked { m, i } => {
                let gu = match (&m.m, x_split) {
                    (GpuMatrix::Fp8 { w, s }, Some(split)) => {
                        let mut gu = self.empty(t * m.n)?;
                        self.kernels.gemv_fp8_presplit(w, s, split, &mut gu, m.n, m.k, t)?;
                        gu
                    }
                    _ => self.matvec(m, x, t)?,
                };
                if let (GpuMatrix::Fp8 { w, s }, true) = (&f.down.m, Kernels::silu_split_takes(*i) && f.down.k.is_multiple_of(128)) {
                    let a = self.kernels.silu_mul_split_f16(&gu, t, *i)?;
                    let mut y = self.empty(t * f.down.n)?;
                    self.kernels.gemv_fp8_presplit(w, s, &a, &mut y, f.down.n, f.down.k, t)?;
                    return Ok(y);
                }
                self.silu_mul(&gu.slice(..), &gu.slice(*i..), t, *i, 2 * *i)?
            }
            GateUp::Separate { gate, up } => {
                let (g, u) = (self.matvec(gate, x, t)?, self.matvec(up, x, t)?);
                self.silu_mul(&g.slice(..), &u.slice(..), t, gate.n, gate.n)?
            }
        };
        self.matvec(&f.down, &a, t)
    }

    /// [rows, i] silu(g) * u, row r of g and u starting at r x `ld`.
    pub(crate) fn silu_mul(&self, g: &CudaView<f32>, u: &CudaView<f32>, rows: usize, i: usize, ld: usize) -> Result<CudaSlice<f32>> {
        let n = rows * i;
        if g.len() < (rows.max(1) - 1) * ld + i || u.len() < (rows.max(1) - 1) * ld + i {
            return Err(Error::Backend(format!("silu_mul: inputs hold fewer than {rows} rows of {i} ({ld} apart)")));
        }
        let mut a = self.empty(n)?;
        let (ii, ld, nn) = (i as i32, ld as i32, n as i32);
        let mut b = crate::launch::builder(&self.stream, &self.ops.silu_mul);
        b.arg(g).arg(u).arg(&mut a).arg(&ii).arg(&ld).arg(&nn);
        unsafe { b.launch(LaunchConfig::for_num_elems(n as u32)) }.map_err(drv)?;
        Ok(a)
    }

    /// `x += a` then `RMSNorm(x) * w` in one kernel (the residual add fused with the next norm).
    pub(crate) fn add_rms_norm(&self, x: &mut CudaSlice<f32>, a: &CudaSlice<f32>, w: &CudaSlice<f32>, rows: usize, d: usize) -> Result<CudaSlice<f32>> {
        let mut y = self.empty(rows * d)?;
        let (dd, eps) = (d as i32, self.spec.rms_norm_eps);
        let mut b = crate::launch::builder(&self.stream, &self.ops.add_rms_norm);
        b.arg(x).arg(a).arg(w).arg(&mut y).arg(&dd).arg(&eps);
        unsafe { b.launch(norm_cfg(rows, d)) }.map_err(drv)?;
        Ok(y)
    }

    /// Whether layer `li`'s q/k/v GEMV reads F16-split activations that `add_rms_norm_split`
    /// can write (a stacked FP8 projection, and a row the norm keeps in registers).
    pub(crate) fn wants_f16_split(&self, li: usize) -> bool {
        self.norm_holds_row() && matches!(&self.layers[li].attn.qkv, Qkv::Stacked { m, .. } if matches!(m.m, GpuMatrix::Fp8 { .. }))
    }

    /// Whether layer `li`'s dense MLP reads its input split (FP8 gate and up stacked), which the
    /// norm ahead then writes (`add_rms_norm_split`, as for the q/k/v projection).
    pub(crate) fn wants_dense_split(&self, li: usize) -> bool {
        self.norm_holds_row() && matches!(&self.layers[li].mlp, Mlp::Dense(Ffn { gate_up: GateUp::Stacked { m: Mat { m: GpuMatrix::Fp8 { .. }, .. }, .. }, .. }))
    }

    /// Whether the norms keep a row in registers (NORM_V = 4 float4s per thread), which their
    /// split-writing forms need.
    fn norm_holds_row(&self) -> bool {
        let d = self.spec.hidden_size;
        d.is_multiple_of(4) && d <= 4 * 4 * norm_cfg(1, d).block_dim.0 as usize
    }

    /// Whether layer `li`'s MoE of `rows` rows reads its input split (`Kernels::moe_reads_split_rows`)
    /// and the norm ahead can write it (`add_rms_norm_moe_split`): from 2 rows on the tiled
    /// kernels, the MoE GEMM. `decode`: the rows are decode rows (`Op::Mlp`'s).
    pub(crate) fn wants_moe_split(&self, li: usize, rows: usize, decode: bool) -> bool {
        self.moe_norm_split && self.norm_holds_row() && matches!(&self.layers[li].mlp, Mlp::Moe { spec, experts: Experts::Stacked(w), .. } if self.kernels.moe_reads_split_rows(w, rows, spec.top_k, decode))
    }

    /// `add_rms_norm`, also writing y split as the MoE kernels read x (`MoeSplit`), exactly as
    /// their own split launch (`moe_split_rows`) would.
    pub(crate) fn add_rms_norm_moe_split(&self, x: &mut CudaSlice<f32>, a: &CudaSlice<f32>, w: &CudaSlice<f32>, rows: usize, d: usize) -> Result<(CudaSlice<f32>, MoeSplit)> {
        let mut y = self.empty(rows * d)?;
        // Both written in full by the kernel.
        let mut xs = unsafe { self.kernels.alloc.alloc::<u32>(rows * d) }?;
        let mut inv = self.empty(rows)?;
        let (dd, eps) = (d as i32, self.spec.rms_norm_eps);
        let mut b = crate::launch::builder(&self.stream, &self.ops.add_rms_norm_moe_split);
        b.arg(x).arg(a).arg(w).arg(&mut y).arg(&mut xs).arg(&mut inv).arg(&dd).arg(&eps);
        unsafe { b.launch(norm_cfg(rows, d)) }.map_err(drv)?;
        Ok((y, MoeSplit { xs, inv }))
    }

    /// The F16 split (hi, lo, inverse scales) of `rows` rows of `d` that a norm kernel writes
    /// in full.
    fn split_outputs(&self, rows: usize, d: usize) -> Result<F16Split> {
        // SAFETY: every word is written by the kernel the caller launches before any read.
        let (yh, yl) = unsafe { (self.kernels.alloc.alloc::<u16>(rows * d)?, self.kernels.alloc.alloc::<u16>(rows * d)?) };
        Ok((yh, yl, self.empty(rows)?))
    }

    /// `add_rms_norm`, also writing y's F16 split exactly as `split_f16` would.
    pub(crate) fn add_rms_norm_split(&self, x: &mut CudaSlice<f32>, a: &CudaSlice<f32>, w: &CudaSlice<f32>, rows: usize, d: usize) -> Result<(CudaSlice<f32>, F16Split)> {
        let mut y = self.empty(rows * d)?;
        let (mut yh, mut yl, mut yinv) = self.split_outputs(rows, d)?;
        let (dd, eps) = (d as i32, self.spec.rms_norm_eps);
        let mut b = crate::launch::builder(&self.stream, &self.ops.add_rms_norm_split);
        b.arg(x).arg(a).arg(w).arg(&mut y).arg(&mut yh).arg(&mut yl).arg(&mut yinv).arg(&dd).arg(&eps);
        unsafe { b.launch(norm_cfg(rows, d)) }.map_err(drv)?;
        Ok((y, (yh, yl, yinv)))
    }

    /// `rms_norm` that also writes y's F16 split (`split_f16`'s bits), for a layer whose input
    /// norm has no residual add ahead (the first, after the embedding). Shapes
    /// `norm_holds_row` takes.
    pub(crate) fn rms_norm_split(&self, x: &CudaSlice<f32>, w: &CudaSlice<f32>, rows: usize, d: usize) -> Result<(CudaSlice<f32>, F16Split)> {
        if !(d.is_multiple_of(4) && d <= 4 * 4 * norm_cfg(1, d).block_dim.0 as usize) || x.len() < rows * d || w.len() < d {
            return Err(Error::Backend(format!("rms_norm_split: {rows} rows of {d} is not a shape it takes (or x / w are short)")));
        }
        let mut y = self.empty(rows * d)?;
        let (mut yh, mut yl, mut yinv) = self.split_outputs(rows, d)?;
        let (dd, eps) = (d as i32, self.spec.rms_norm_eps);
        let mut b = crate::launch::builder(&self.stream, &self.ops.rms_norm_split);
        b.arg(x).arg(w).arg(&mut y).arg(&mut yh).arg(&mut yl).arg(&mut yinv).arg(&dd).arg(&eps);
        unsafe { b.launch(norm_cfg(rows, d)) }.map_err(drv)?;
        Ok((y, (yh, yl, yinv)))
    }

    /// The embeddings of `n` rows' tokens (as `embed_rows`) and their RMSNorm by `w` with its F16
    /// split (as `rms_norm_split` over them) in one launch: (x, y, split). Rows the norm keeps
    /// in registers only (`wants_f16_split`).
    pub(crate) fn embed_rms_norm_split(&self, tok: &CudaSlice<i32>, chain: Option<&CudaSlice<u64>>, w: &CudaSlice<f32>, n: usize) -> Result<(CudaSlice<f32>, CudaSlice<f32>, F16Split)> {
        let d = self.spec.hidden_size;
        if !(d.is_multiple_of(4) && d <= 4 * 4 * norm_cfg(1, d).block_dim.0 as usize) || w.len() < d || tok.len() < n {
            return Err(Error::Backend(format!("embed_rms_norm_split: {n} rows of {d} is not a shape it takes (or tok / w are short)")));
        }
        let mut x = self.empty(n * d)?;
        let mut y = self.empty(n * d)?;
        let (mut yh, mut yl, mut yinv) = self.split_outputs(n, d)?;
        let (dd, eps) = (d as i32, self.spec.rms_norm_eps);
        let mut b = crate::launch::builder(&self.stream, match &self.embed {
            Embed::F32(_) => &self.ops.embed_rms_norm_split,
            Embed::Bf16(_) => &self.ops.embed_rms_norm_split_bf16,
        });
        match &self.embed {
            Embed::F32(t) => b.arg(t),
            Embed::Bf16(t) => b.arg(t),
        };
        b.arg(tok).arg_or_null(chain).arg(&mut x).arg(w).arg(&mut y).arg(&mut yh).arg(&mut yl).arg(&mut yinv).arg(&dd).arg(&eps);
        unsafe { b.launch(norm_cfg(n, d)) }.map_err(drv)?;
        Ok((x, y, (yh, yl, yinv)))
    }

    /// `add_rms_norm` (`split`: `add_rms_norm_split`) adding the routed MoE's output from its
    /// pairs: the same bits as combining them first.
    pub(crate) fn add_rms_norm_pairs(&self, x: &mut CudaSlice<f32>, pairs: &MoePairs, w: &CudaSlice<f32>, rows: usize, d: usize, split: bool) -> Result<(CudaSlice<f32>, Option<F16Split>)> {
        pairs.check(rows, d)?;
        let MoePairs { out, tok_pairs, topk, pre } = pairs;
        let mut y = self.empty(rows * d)?;
        let (dd, eps, k) = (d as i32, self.spec.rms_norm_eps, *topk as i32);
        if !split {
            let mut b = crate::launch::builder(&self.stream, &self.ops.add_rms_norm_pairs);
            b.arg(x).arg(out).arg(tok_pairs).arg(&k).arg_or_null(pre.as_ref()).arg(w).arg(&mut y).arg(&dd).arg(&eps);
            unsafe { b.launch(norm_cfg(rows, d)) }.map_err(drv)?;
            return Ok((y, None));
        }
        let (mut yh, mut yl, mut yinv) = self.split_outputs(rows, d)?;
        let mut b = crate::launch::builder(&self.stream, &self.ops.add_rms_norm_split_pairs);
        b.arg(x).arg(out).arg(tok_pairs).arg(&k).arg_or_null(pre.as_ref()).arg(w).arg(&mut y).arg(&mut yh).arg(&mut yl).arg(&mut yinv).arg(&dd).arg(&eps);
        unsafe { b.launch(norm_cfg(rows, d)) }.map_err(drv)?;
        Ok((y, Some((yh, yl, yinv))))
    }

    /// `add_rms_norm_pairs` that also writes y's BF16 hi + lo parts (`split_bf16`'s bits): the
    /// last layer's residual add and the final norm in one launch, for an lm_head that reads
    /// them (`lm_head_takes_split`).
    pub(crate) fn add_rms_norm_pairs_bf16(&self, x: &mut CudaSlice<f32>, pairs: &MoePairs, w: &CudaSlice<f32>, rows: usize, d: usize) -> Result<(CudaSlice<f32>, Bf16Split)> {
        pairs.check(rows, d)?;
        if x.len() < rows * d || w.len() < d {
            return Err(Error::Backend(format!("add_rms_norm_pairs_bf16: x or w shorter than {rows} rows of {d}")));
        }
        let MoePairs { out, tok_pairs, topk, pre } = pairs;
        let mut y = self.empty(rows * d)?;
        // SAFETY: the kernel writes every word of both before any read.
        let (mut yh, mut yl) = unsafe { (self.kernels.alloc.alloc::<u16>(rows * d)?, self.kernels.alloc.alloc::<u16>(rows * d)?) };
        let (dd, eps, k) = (d as i32, self.spec.rms_norm_eps, *topk as i32);
        let mut b = crate::launch::builder(&self.stream, &self.ops.add_rms_norm_pairs_bf16);
        b.arg(x).arg(out).arg(tok_pairs).arg(&k).arg_or_null(pre.as_ref()).arg(w).arg(&mut y).arg(&mut yh).arg(&mut yl).arg(&dd).arg(&eps);
        unsafe { b.launch(norm_cfg(rows, d)) }.map_err(drv)?;
        Ok((y, (yh, yl)))
    }

    /// x += the routed MoE's output from its pairs, `rows` rows of `d`.
    pub(crate) fn add_pairs_inplace(&self, x: &mut CudaSlice<f32>, pairs: &MoePairs, rows: usize, d: usize) -> Result<()> {
        pairs.check(rows, d)?;
        if x.len() < rows * d {
            return Err(Error::Backend(format!("add_pairs_inplace: x holds fewer than {rows} rows")));
        }
        let MoePairs { out, tok_pairs, topk, pre } = pairs;
        let (dd, k) = (d as i32, *topk as i32);
        let mut b = crate::launch::builder(&self.stream, &self.ops.add_pairs_inplace);
        b.arg(x).arg(out).arg(tok_pairs).arg(&k).arg_or_null(pre.as_ref()).arg(&dd);
        // A thread per float4 of a row (per element where d % 4 != 0), 256 a block.
        let col_blocks = if d.is_multiple_of(4) { d / 4 } else { d }.div_ceil(256).max(1) as u32;
        unsafe { b.launch(LaunchConfig { grid_dim: (rows as u32, col_blocks, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }) }.map_err(drv)?;
        Ok(())
    }

    /// Embedding rows of the token ids `tok` [n].
    /// The embeddings of `n` rows' tokens (`tok`; a negative entry -(j + 1) is row j of the ids
    /// at the device address `chain` holds: a step chained on the one before it).
    pub(crate) fn embed_rows(&self, tok: &CudaSlice<i32>, chain: Option<&CudaSlice<u64>>, n: usize) -> Result<CudaSlice<f32>> {
        let h = self.spec.hidden_size;
        let mut x = self.empty(n * h)?;
        let hh = h as i32;
        let mut b = crate::launch::builder(&self.stream, match &self.embed {
            Embed::F32(_) => &self.ops.embed,
            Embed::Bf16(_) => &self.ops.embed_bf16,
        });
        match &self.embed {
            Embed::F32(t) => b.arg(t),
            Embed::Bf16(t) => b.arg(t),
        };
        b.arg(tok);
        match chain {
            Some(c) => b.arg(c),
            None => b.arg(&0u64), // no step to chain on: a null address, never read
        };
        b.arg(&mut x).arg(&hh);
        unsafe { b.launch(row_copy_cfg(n, h)) }.map_err(drv)?;
        Ok(x)
    }

    /// y[j] = x[idx[j]] for `rows` rows of `d`.
    pub(crate) fn gather_rows(&self, x: &CudaSlice<f32>, idx: &CudaSlice<i32>, y: &mut CudaSlice<f32>, rows: usize, d: usize) -> Result<()> {
        let dd = d as i32;
        let mut b = crate::launch::builder(&self.stream, &self.ops.gather_rows);
        b.arg(x).arg(idx).arg(y).arg(&dd);
        unsafe { b.launch(row_copy_cfg(rows, d)) }.map_err(drv)?;
        Ok(())
    }

    /// ids[r] = the argmax of logits row r (ties to the lower id; all -inf/NaN: 0) for `rows`
    /// rows of the vocabulary: partial maxima over slices of ~2048 by many blocks, then one
    /// small block per row.
    pub(crate) fn argmax_into(&self, logits: &CudaSlice<f32>, rows: usize, ids: &mut CudaSlice<i32>, ids_host: Option<&CudaSlice<u64>>) -> Result<()> {
        self.argmax_rows_into(logits, rows, self.spec.vocab_size, ids, ids_host)
    }

    /// `argmax_into` over rows of `v` logits.
    /// `ids_host`: the ids also go to the host slot it points at (a copy-free graph step:
    /// crate::staged).
    pub(crate) fn argmax_rows_into(&self, logits: &CudaSlice<f32>, rows: usize, v: usize, ids: &mut CudaSlice<i32>, ids_host: Option<&CudaSlice<u64>>) -> Result<()> {
        let parts = v.div_ceil(2048).clamp(1, 128);
        let mut part_v = self.empty(rows * parts)?;
        // SAFETY: argmax_rows writes every (row, part) of both.
        let mut part_i = unsafe { self.kernels.alloc.alloc::<i32>(rows * parts) }?;
        let (vi, pi) = (v as i32, parts as i32);
        let mut b = crate::launch::builder(&self.stream, &self.ops.argmax_rows);
        b.arg(logits).arg(&vi).arg(&mut part_v).arg(&mut part_i);
        unsafe { b.launch(LaunchConfig { grid_dim: (rows as u32, parts as u32, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }) }.map_err(drv)?;
        let mut b = crate::launch::builder(&self.stream, &self.ops.argmax_final);
        b.arg(&part_v).arg(&part_i).arg(&pi).arg(ids).arg_or_null(ids_host);
        unsafe { b.launch(LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (128, 1, 1), shared_mem_bytes: 0 }) }.map_err(drv)?;
        Ok(())
    }

    /// The lm_head as a BF16 matrix [n, k] whose tensor-core GEMV reads its input as BF16 hi +
    /// lo parts (K % 128 == 0), so the final norm may hand it them split; None for other formats.
    /// (A tied BF16 embedding of such a K has a tiled copy as the lm_head: see `load`.)
    fn lm_head_bf16(&self) -> Option<(&CudaSlice<u16>, usize, usize)> {
        match &self.lm_head {
            Some(Mat { m: GpuMatrix::Bf16(w), n, k }) if k.is_multiple_of(128) => Some((w, *n, *k)),
            _ => None,
        }
    }

    /// Whether the lm_head reads the final norm's BF16 split (`lm_head_split_into`).
    pub(crate) fn lm_head_takes_split(&self) -> bool {
        self.lm_head_bf16().is_some()
    }

    /// `lm_head_into` over final-normed rows given as their BF16 hi + lo parts (the same bits as
    /// splitting them here). Only where `lm_head_takes_split`.
    pub(crate) fn lm_head_split_into(&self, (xh, xl): &Bf16Split, rows: usize, y: &mut CudaSlice<f32>) -> Result<()> {
        let (w, n, k) = self.lm_head_bf16().ok_or_else(|| Error::Backend("lm_head_split_into: the lm_head does not read a BF16 split".into()))?;
        self.kernels.gemv_bf16_presplit(w, xh, xl, y, n, k, rows, None)
    }

    /// Whether `lm_head_split_argmax_into` takes `rows` rows (one: the lm_head's one-tile GEMV
    /// folds the argmax), unless turned off.
    pub(crate) fn lm_head_argmax_takes(&self, rows: usize) -> bool {
        self.lm_head_argmax && self.lm_head_bf16().is_some_and(|(_, n, k)| self.kernels.bf16_argmax_takes(rows, n, k))
    }

    /// `lm_head_split_into` of one row (`lm_head_argmax_takes`) that also folds its argmax into
    /// the model's argmax keys, which `argmax_unpack_into` must read next.
    pub(crate) fn lm_head_split_argmax_into(&self, (xh, xl): &Bf16Split, y: &mut CudaSlice<f32>) -> Result<()> {
        let (w, n, k) = self.lm_head_bf16().ok_or_else(|| Error::Backend("lm_head_split_argmax_into: the lm_head does not read a BF16 split".into()))?;
        self.kernels.gemv_bf16_presplit_argmax(w, xh, xl, y, n, k, &self.argmax_key)
    }

    /// ids[0] = the id in the argmax keys the lm_head folded (`lm_head_split_argmax_into`), and
    /// the keys zeroed for the next step.
    pub(crate) fn argmax_unpack_into(&self, ids: &mut CudaSlice<i32>, ids_host: Option<&CudaSlice<u64>>) -> Result<()> {
        let (slots, stride) = (crate::kernels::ARGMAX_KEY_SLOTS as i32, crate::kernels::ARGMAX_KEY_STRIDE as i32);
        let mut b = crate::launch::builder(&self.stream, &self.ops.argmax_unpack);
        b.arg(&self.argmax_key).arg(&slots).arg(&stride).arg(ids).arg_or_null(ids_host);
        unsafe { b.launch(LaunchConfig { grid_dim: (1, 1, 1), block_dim: (32, 1, 1), shared_mem_bytes: 0 }) }.map_err(drv)?;
        Ok(())
    }

    /// Logits [rows, vocab] of final-normed hidden rows through the lm_head (or the tied
    /// embedding), into `y`.
    pub(crate) fn lm_head_into(&self, normed: &CudaSlice<f32>, rows: usize, y: &mut CudaSlice<f32>) -> Result<()> {
        let (vocab, h) = (self.spec.vocab_size, self.spec.hidden_size);
        match (&self.lm_head, &self.embed) {
            (Some(m), _) => self.matvec_into(m, normed, rows, y),
            (None, Embed::F32(t)) => self.gemv_f32_into(t, vocab, h, normed, rows, y),
            (None, Embed::Bf16(t)) => self.kernels.gemv_bf16(t, normed, y, vocab, h, rows),
        }
    }
}
