//! Where the GPU weights come from: a checkpoint, uploaded in its stored formats (MXFP4 and FP8
//! stay packed, BF16 stays BF16; anything else becomes exact f32; the tensor-core kernels'
//! matrices re-laid out in tiles as they go up: `mxfp4_tiles`, `tc_tiles`), or random weights generated
//! directly on the GPU in the formats a real checkpoint would use, so real shapes (MiMo-V2-Flash,
//! MiMo-V2.5-Pro) can be benchmarked without checkpoints.

use std::cell::Cell;
use std::sync::Arc;

use cudarc::driver::{CudaFunction, CudaSlice, CudaStream, LaunchConfig};
use peregrine_core::{DType, QuantFormat, Result};
use peregrine_model::weights::WeightSource;

use crate::backend::{drv, upload, GpuMatrix, Mat};
use crate::kernels::{MoeLayout, MoeWeights};
use crate::{mxfp4_tiles, tc_tiles};
use rayon::prelude::*;

/// The embedding table on the GPU.
pub(crate) enum Embed {
    F32(CudaSlice<f32>),
    Bf16(CudaSlice<u16>),
}

/// Random-weight generation on the GPU (kernels `fill_random_u8` / `fill_random_f`).
pub(crate) struct Synthetic {
    pub(crate) fill_u8: CudaFunction,
    pub(crate) fill_f: CudaFunction,
    /// Linear layers (attention, dense MLP) are FP8 blocks when the config says so, else BF16.
    pub(crate) fp8_linear: bool,
    pub(crate) seed: Cell<u64>,
}

pub(crate) enum Source<'a> {
    Files(&'a dyn WeightSource),
    Synthetic(&'a Synthetic),
}

fn grid(n: usize) -> LaunchConfig {
    LaunchConfig { grid_dim: ((n.div_ceil(256) as u32).clamp(1, 65_535), 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }
}

impl Synthetic {
    pub(crate) fn new(fill_u8: CudaFunction, fill_f: CudaFunction, quant_linear: QuantFormat, seed: u64) -> Synthetic {
        Synthetic { fill_u8, fill_f, fp8_linear: matches!(quant_linear, QuantFormat::Fp8Block { .. }), seed: Cell::new(seed) }
    }

    fn next_seed(&self) -> u64 {
        let s = self.seed.get();
        self.seed.set(s.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407));
        s
    }

    /// kind 0: random bytes; 1: `lo + h % span`; 2: FP8 e4m3 with exponent field in lo..lo+span;
    /// 3: tiled MXFP4 steps (`mxfp4_tiles`): in each 544 bytes, 512 random, then 32 as kind 1.
    fn bytes(&self, st: &Arc<CudaStream>, buf: &mut CudaSlice<u8>, n: usize, kind: i32, lo: i32, span: i32) -> Result<()> {
        let (nn, seed) = (n as u64, self.next_seed());
        let mut b = crate::launch::builder(st, &self.fill_u8);
        b.arg(buf).arg(&nn).arg(&seed).arg(&kind).arg(&lo).arg(&span);
        unsafe { b.launch(grid(n)) }.map_err(drv)?;
        Ok(())
    }

    fn u8s(&self, st: &Arc<CudaStream>, n: usize, kind: i32, lo: i32, span: i32) -> Result<CudaSlice<u8>> {
        let mut buf = unsafe { st.alloc::<u8>(n.max(1)) }.map_err(drv)?;
        self.bytes(st, &mut buf, n, kind, lo, span)?;
        Ok(buf)
    }

    /// Uniform in [offset - amp, offset + amp).
    pub(crate) fn floats(&self, st: &Arc<CudaStream>, n: usize, amp: f32, offset: f32) -> Result<CudaSlice<f32>> {
        let mut buf = unsafe { st.alloc::<f32>(n.max(1)) }.map_err(drv)?;
        self.fill_floats(st, &mut buf, amp, offset)?;
        Ok(buf)
    }

    /// Overwrites all of `buf` with values uniform in [offset - amp, offset + amp).
    pub(crate) fn fill_floats(&self, st: &Arc<CudaStream>, buf: &mut CudaSlice<f32>, amp: f32, offset: f32) -> Result<()> {
        let n = buf.len();
        self.fill(st, buf, n, amp, offset, false)
    }

    /// `fill_floats` for a buffer of BF16 bits.
    pub(crate) fn fill_bf16(&self, st: &Arc<CudaStream>, buf: &mut CudaSlice<u16>, amp: f32, offset: f32) -> Result<()> {
        let n = buf.len();
        self.fill(st, buf, n, amp, offset, true)
    }

    /// Overwrites all of `buf` with random FP8 e4m3 values of magnitude below 2 (exponent
    /// fields 0..7: no NaN), for FP8 K/V pools.
    pub(crate) fn fill_fp8(&self, st: &Arc<CudaStream>, buf: &mut CudaSlice<u8>) -> Result<()> {
        let n = buf.len();
        self.bytes(st, buf, n, 2, 0, 8)
    }

    /// The first `n` elements of `buf` (f32, or BF16 bits with `bf16`) uniform in
    /// [offset - amp, offset + amp) (`fill_random_f`).
    fn fill<T>(&self, st: &Arc<CudaStream>, buf: &mut CudaSlice<T>, n: usize, amp: f32, offset: f32, bf16: bool) -> Result<()> {
        let (nn, seed, bf) = (n as u64, self.next_seed(), bf16 as i32);
        let mut b = crate::launch::builder(st, &self.fill_f);
        b.arg(buf).arg(&nn).arg(&seed).arg(&amp).arg(&offset).arg(&bf);
        unsafe { b.launch(grid(n)) }.map_err(drv)?;
        Ok(())
    }

    fn bf16(&self, st: &Arc<CudaStream>, n: usize, amp: f32) -> Result<CudaSlice<u16>> {
        let mut buf = unsafe { st.alloc::<u16>(n.max(1)) }.map_err(drv)?;
        self.fill(st, &mut buf, n, amp, 0.0, true)?;
        Ok(buf)
    }

    /// E8M0 exponent giving MXFP4 rows of `k` random E2M1 codes (RMS ~2.9) an RMS of 1/sqrt(k).
    fn e8m0_for(k: usize) -> i32 {
        127 + (1.0 / (2.9 * (k as f64).sqrt())).log2().round() as i32
    }

    fn matrix(&self, st: &Arc<CudaStream>, name: &str, n: usize, k: usize) -> Result<Mat> {
        // Entries of RMS ~1/sqrt(k) keep activations O(1) through any depth.
        let amp = (3.0 / k as f32).sqrt();
        let m = if name.ends_with("mlp.gate.weight") || !k.is_multiple_of(32) {
            GpuMatrix::F32(self.floats(st, n * k, amp, 0.0)?) // routers are kept in f32
        } else if self.fp8_linear && k.is_multiple_of(128) && !name.contains("o_proj") && !name.contains("lm_head") {
            // e4m3 with exponent field 4..7: |w| in [0.125, 1.875], RMS ~0.9 (random, so the
            // tile layout is only the padding rows: tc_tiles).
            let w = self.u8s(st, tc_tiles::padded_rows(n) * k, 2, 4, 4)?;
            let s = upload(st, &vec![1.0 / (0.9 * (k as f32).sqrt()); n.div_ceil(128) * (k / 128)])?;
            GpuMatrix::Fp8 { w, s }
        } else {
            let rows = if tc_tiles::tiled(k) { tc_tiles::padded_rows(n) } else { n };
            GpuMatrix::Bf16(self.bf16(st, rows * k, amp)?)
        };
        Ok(Mat { m, n, k })
    }
}

impl Source<'_> {
    /// Weight matrix `name` [rows, cols].
    pub(crate) fn mat(&self, st: &Arc<CudaStream>, name: &str, rows: usize, cols: usize) -> Result<Mat> {
        match self {
            Source::Files(w) => load_mat(st, *w, name, rows, cols),
            Source::Synthetic(s) => s.matrix(st, name, rows, cols),
        }
    }

    /// A 1-D tensor as f32 on the GPU. Synthetic: norms 1, sinks and biases small.
    pub(crate) fn vector(&self, st: &Arc<CudaStream>, name: &str, n: usize) -> Result<CudaSlice<f32>> {
        match self {
            Source::Files(w) => upload(st, &w.vector(name, n)?),
            Source::Synthetic(s) if name.ends_with("norm.weight") => s.floats(st, n, 0.0, 1.0),
            Source::Synthetic(s) if name.ends_with("attention_sink_bias") => s.floats(st, n, 1.0, 0.0),
            Source::Synthetic(s) => s.floats(st, n, 0.01, 0.0),
        }
    }

    pub(crate) fn contains(&self, name: &str) -> bool {
        match self {
            Source::Files(w) => w.contains(name),
            Source::Synthetic(_) => true,
        }
    }

    /// The embedding table: BF16 when stored so (or synthetic), else exact f32.
    pub(crate) fn embed(&self, st: &Arc<CudaStream>, vocab: usize, h: usize) -> Result<Embed> {
        let name = "model.embed_tokens.weight";
        match self {
            Source::Files(w) => match w.stored(name) {
                Some(t) if t.dtype == DType::BF16 && t.shape == [vocab, h] => Ok(Embed::Bf16(upload(st, &bf16_bits(t.data))?)),
                _ => Ok(Embed::F32(upload(st, &w.matrix(name, vocab, h)?)?)),
            },
            Source::Synthetic(s) => Ok(Embed::Bf16(s.bf16(st, vocab * h, 1.0)?)),
        }
    }

    /// A layer's routed experts stacked for the MXFP4 MoE kernels, when every expert is stored
    /// in MXFP4 (always for synthetic weights); None otherwise (the per-expert path is used).
    /// Shapes the tiled kernels take are re-laid out on the host one expert at a time
    /// (`mxfp4_tiles`), so the checkpoint is never held twice.
    pub(crate) fn experts_mxfp4(&self, st: &Arc<CudaStream>, p: &str, num: usize, h: usize, inter: usize) -> Result<Option<MoeWeights>> {
        if !h.is_multiple_of(32) || !inter.is_multiple_of(32) {
            return Ok(None);
        }
        let tiled = mxfp4_tiles::moe_tileable(h, inter);
        // [E, rows, cols/2] codes and [E, rows, cols/32] scales per projection.
        let shapes = [("gate_proj", inter, h), ("up_proj", inter, h), ("down_proj", h, inter)];
        let (cn, sn) = (inter * h / 2, inter * h / 32); // one expert's matrix, any of the three
        let alloc = |n: usize| unsafe { st.alloc::<u8>(n) }.map_err(drv);
        let layout = match self {
            Source::Files(w) => {
                let stored = |e: usize, proj: &str, rows: usize, cols: usize| {
                    let c = w.stored(&format!("{p}.{e}.{proj}.weight")).filter(|t| t.dtype == DType::U8 && t.shape == [rows, cols / 2]);
                    let s = w.stored(&format!("{p}.{e}.{proj}.weight_scale")).filter(|t| t.dtype == DType::U8 && t.shape == [rows, cols / 32]);
                    c.zip(s).map(|(c, s)| mxfp4_tiles::RowMajor { codes: c.data, scales: s.data, cols })
                };
                if (0..num).any(|e| shapes.iter().any(|&(proj, rows, cols)| stored(e, proj, rows, cols).is_none())) {
                    return Ok(None);
                }
                let get = |e: usize, i: usize| stored(e, shapes[i].0, shapes[i].1, shapes[i].2).expect("checked above");
                if tiled {
                    let (gb, db) = (mxfp4_tiles::tiled_bytes(2 * inter, h), mxfp4_tiles::tiled_bytes(h, inter));
                    let (mut gu, mut d) = (alloc(num * gb)?, alloc(num * db)?);
                    // Re-laid out on the host in parallel, a batch of experts at a time (one
                    // thread tiles ~400 MB/s: a 300 GB checkpoint would take minutes serially),
                    // then copied; at most TILE_BATCH experts are held twice.
                    const TILE_BATCH: usize = 32;
                    for e0 in (0..num).step_by(TILE_BATCH) {
                        let tiles: Vec<[Vec<u8>; 2]> = (e0..(e0 + TILE_BATCH).min(num))
                            .into_par_iter()
                            .map(|e| mxfp4_tiles::tile_expert(get(e, 0), get(e, 1), get(e, 2), inter, h))
                            .collect();
                        for (i, [g, dn]) in tiles.iter().enumerate() {
                            let e = e0 + i;
                            st.memcpy_htod(g, &mut gu.slice_mut(e * gb..(e + 1) * gb)).map_err(drv)?;
                            st.memcpy_htod(dn, &mut d.slice_mut(e * db..(e + 1) * db)).map_err(drv)?;
                        }
                        // The host buffers are dropped next: wait for the copies out of them.
                        st.synchronize().map_err(drv)?;
                    }
                    MoeLayout::Tiled { gate_up: gu, down: d }
                } else {
                    let mut bufs = Vec::with_capacity(6);
                    for i in 0..3 {
                        let (mut codes, mut scales) = (alloc(num * cn)?, alloc(num * sn)?);
                        for e in 0..num {
                            let m = get(e, i);
                            st.memcpy_htod(m.codes, &mut codes.slice_mut(e * cn..(e + 1) * cn)).map_err(drv)?;
                            st.memcpy_htod(m.scales, &mut scales.slice_mut(e * sn..(e + 1) * sn)).map_err(drv)?;
                        }
                        bufs.push(codes);
                        bufs.push(scales);
                    }
                    let mut it = bufs.into_iter();
                    let mut next = || it.next().expect("six buffers");
                    MoeLayout::RowMajor { gate: next(), gate_s: next(), up: next(), up_s: next(), down: next(), down_s: next() }
                }
            }
            Source::Synthetic(s) => {
                // Any byte is a valid pair of codes in either layout; scales as a real layer's.
                let codes = |n: usize| s.u8s(st, n, 0, 0, 1);
                // Scales alone (kind 1) or tiled steps (kind 3: 512 code bytes, then 32 scales).
                let with_scales = |n: usize, k: usize, kind: i32| s.u8s(st, n, kind, Synthetic::e8m0_for(k) - 1, 3);
                let scales = |n: usize, k: usize| with_scales(n, k, 1);
                let tiled_steps = |n: usize, k: usize| with_scales(n, k, 3);
                if tiled {
                    MoeLayout::Tiled { gate_up: tiled_steps(num * mxfp4_tiles::tiled_bytes(2 * inter, h), h)?, down: tiled_steps(num * mxfp4_tiles::tiled_bytes(h, inter), inter)? }
                } else {
                    MoeLayout::RowMajor {
                        gate: codes(num * cn)?,
                        gate_s: scales(num * sn, h)?,
                        up: codes(num * cn)?,
                        up_s: scales(num * sn, h)?,
                        down: codes(num * cn)?,
                        down_s: scales(num * sn, inter)?,
                    }
                }
            }
        };
        Ok(Some(MoeWeights { layout, num_experts: num, hidden: h, inter }))
    }
}

fn bf16_bits(data: &[u8]) -> Vec<u16> {
    data.chunks_exact(2).map(|b| u16::from_le_bytes([b[0], b[1]])).collect()
}

/// Loads `name` [rows, cols] in its stored format when a kernel reads that format at this shape,
/// else as exact f32.
pub(crate) fn load_mat(s: &Arc<CudaStream>, w: &dyn WeightSource, name: &str, rows: usize, cols: usize) -> Result<Mat> {
    let base = name.strip_suffix(".weight").unwrap_or(name);
    if let Some(t) = w.stored(name) {
        match t.dtype {
            DType::U8 if cols.is_multiple_of(32) && t.shape == [rows, cols / 2] => {
                if let Some(sc) = w.stored(&format!("{base}.weight_scale")).filter(|x| x.dtype == DType::U8 && x.shape == [rows, cols / 32]) {
                    return Ok(Mat { m: GpuMatrix::Mxfp4 { w: upload(s, t.data)?, s: upload(s, sc.data)? }, n: rows, k: cols });
                }
            }
            DType::F8E4M3 if cols.is_multiple_of(128) && t.shape == [rows, cols] => {
                let sname = format!("{base}.weight_scale_inv");
                if let Some(sc) = w.stored(&sname).filter(|x| x.shape == [rows.div_ceil(128), cols / 128]) {
                    let scales = w.vector(&sname, sc.shape.iter().product()).ok();
                    if let Some(scales) = scales {
                        return Ok(Mat { m: GpuMatrix::Fp8 { w: upload(s, &tc_tiles::tile(t.data, rows, cols))?, s: upload(s, &scales)? }, n: rows, k: cols });
                    }
                }
            }
            DType::BF16 if cols.is_multiple_of(32) && t.shape == [rows, cols] => {
                let bits = tc_tiles::laid_out(bf16_bits(t.data), rows, cols);
                return Ok(Mat { m: GpuMatrix::Bf16(upload(s, &bits)?), n: rows, k: cols });
            }
            _ => {}
        }
    }
    // Everything else (f32/f16 tensors, fused layouts, GGUF blocks) as exact f32.
    Ok(Mat { m: GpuMatrix::F32(upload(s, &w.matrix(name, rows, cols)?)?), n: rows, k: cols })
}
