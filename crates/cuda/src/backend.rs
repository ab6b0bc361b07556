//! `CudaModel`: the whole MiMo-V2 / Llama-style forward on one GPU, implementing
//! `peregrine_core::Backend`. Correctness first: f32 activations, one kernel per operation (the
//! operations of the CPU reference, in its order), weights in their stored formats where a
//! kernel exists for them (MXFP4, FP8 blocks, BF16), f32 otherwise; the MoE router runs on the
//! host between kernels. Not yet: fused kernels, CUDA graphs, GPU sampling, the drafter.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, CudaFunction, LaunchConfig, PushKernelArg};
use peregrine_core::backend::{Backend, KvBlockBytes, KvConfig, Logits, SeqForward, NULL_BLOCK};
use peregrine_core::{AttentionKind, AttentionSpec, DType, Error, MlpSpec, ModelSpec, MoeSpec, QkvLayout, Result};
use peregrine_model::weights::WeightSource;

use crate::compile;
use crate::device::{nvrtc_arch, Gpu};
use crate::draft::Drafter;
use crate::kernels::Kernels;

pub(crate) fn drv(e: cudarc::driver::DriverError) -> Error {
    Error::Backend(format!("CUDA: {e}"))
}

/// A weight matrix [n, k] on the GPU, in the format it was stored in when a kernel reads it.
pub(crate) enum GpuMatrix {
    F32(CudaSlice<f32>),
    Bf16(CudaSlice<u16>),
    Fp8 { w: CudaSlice<u8>, s: CudaSlice<f32> },
    Mxfp4 { w: CudaSlice<u8>, s: CudaSlice<u8> },
}

pub(crate) struct Mat {
    pub(crate) m: GpuMatrix,
    pub(crate) n: usize,
    pub(crate) k: usize,
}

pub(crate) struct Attn {
    pub(crate) spec: AttentionSpec,
    pub(crate) q: Mat,
    pub(crate) k: Mat,
    pub(crate) v: Mat,
    pub(crate) bias: Option<(CudaSlice<f32>, CudaSlice<f32>, CudaSlice<f32>)>,
    pub(crate) q_norm: Option<CudaSlice<f32>>,
    pub(crate) k_norm: Option<CudaSlice<f32>>,
    pub(crate) o: Mat,
    pub(crate) sinks: Option<CudaSlice<f32>>,
}

pub(crate) struct Ffn {
    gate: Mat,
    up: Mat,
    down: Mat,
}

enum Mlp {
    Dense(Ffn),
    Moe { spec: MoeSpec, router: Mat, bias: Option<Vec<f32>>, experts: Vec<Ffn> },
}

struct Layer {
    input_norm: CudaSlice<f32>,
    post_norm: CudaSlice<f32>,
    attn: Attn,
    mlp: Mlp,
    swa: bool,
}

pub(crate) struct Ops {
    pub(crate) embed: CudaFunction,
    rms_norm: CudaFunction,
    add_bias: CudaFunction,
    add_inplace: CudaFunction,
    rope: CudaFunction,
    kv_write: CudaFunction,
    attention: CudaFunction,
    silu_mul: CudaFunction,
    pub(crate) gather_rows: CudaFunction,
    scatter_add_scaled: CudaFunction,
    gemv_f32: CudaFunction,
    pub(crate) copy_cols: CudaFunction,
    pub(crate) fill_rows: CudaFunction,
    pub(crate) scale: CudaFunction,
    pub(crate) draft_attention: CudaFunction,
}

pub struct CudaModel {
    pub(crate) spec: ModelSpec,
    gpu: Gpu,
    pub(crate) stream: Arc<CudaStream>,
    kernels: Kernels,
    pub(crate) ops: Ops,
    pub(crate) embed: CudaSlice<f32>,
    pub(crate) lm_head: Option<Mat>,
    pub(crate) final_norm: CudaSlice<f32>,
    layers: Vec<Layer>,
    /// Per layer: K and V pools [slots, kv_heads, dim].
    kv: Vec<(CudaSlice<f32>, CudaSlice<f32>)>,
    pub(crate) kv_config: Option<KvConfig>,
    pub(crate) drafter: Option<Drafter>,
    /// The drafter's context K/V per drafter layer, indexed like the full-attention group.
    pub(crate) draft_kv: Vec<(CudaSlice<f32>, CudaSlice<f32>)>,
}

pub(crate) fn upload<T: cudarc::driver::DeviceRepr>(s: &Arc<CudaStream>, v: &[T]) -> Result<CudaSlice<T>> {
    s.clone_htod(v).map_err(drv)
}

/// Loads `name` [rows, cols] in its stored format when a kernel reads that format at this shape.
pub(crate) fn load_mat(s: &Arc<CudaStream>, w: &dyn WeightSource, name: &str, rows: usize, cols: usize) -> Result<Mat> {
    let base = name.strip_suffix(".weight").unwrap_or(name);
    if let Some(t) = w.stored(name) {
        match t.dtype {
            DType::U8 if cols % 32 == 0 && t.shape == [rows, cols / 2] => {
                if let Some(sc) = w.stored(&format!("{base}.weight_scale")).filter(|x| x.dtype == DType::U8 && x.shape == [rows, cols / 32]) {
                    return Ok(Mat { m: GpuMatrix::Mxfp4 { w: upload(s, t.data)?, s: upload(s, sc.data)? }, n: rows, k: cols });
                }
            }
            DType::F8E4M3 if cols % 128 == 0 && t.shape == [rows, cols] => {
                let sname = format!("{base}.weight_scale_inv");
                if let Some(sc) = w.stored(&sname).filter(|x| x.shape == [rows.div_ceil(128), cols / 128]) {
                    let scales = w.vector(&sname, sc.shape.iter().product()).ok();
                    if let Some(scales) = scales {
                        return Ok(Mat { m: GpuMatrix::Fp8 { w: upload(s, t.data)?, s: upload(s, &scales)? }, n: rows, k: cols });
                    }
                }
            }
            DType::BF16 if cols % 32 == 0 && t.shape == [rows, cols] => {
                let bits: Vec<u16> = t.data.chunks_exact(2).map(|b| u16::from_le_bytes([b[0], b[1]])).collect();
                return Ok(Mat { m: GpuMatrix::Bf16(upload(s, &bits)?), n: rows, k: cols });
            }
            _ => {}
        }
    }
    // Everything else (f32/f16 tensors, fused layouts, GGUF blocks) as exact f32.
    Ok(Mat { m: GpuMatrix::F32(upload(s, &w.matrix(name, rows, cols)?)?), n: rows, k: cols })
}

/// MiMo-V2.5-Pro's fused `qkv_proj` (rows grouped per KV head: [Q of its heads | K | V]) split
/// into q, k and v as exact f32 (a 128-row FP8 scale block may straddle K and V, so the split is
/// done after decoding, as the CPU reference does).
fn split_fused_qkv(s: &Arc<CudaStream>, w: &dyn WeightSource, pa: &str, a: &AttentionSpec, h: usize) -> Result<(Mat, Mat, Mat)> {
    let fused = w.matrix(&format!("{pa}.qkv_proj.weight"), a.q_dim() + a.k_dim() + a.v_dim(), h)?;
    let qpg = a.num_heads / a.num_kv_heads * a.head_dim;
    let group = qpg + a.head_dim + a.v_head_dim;
    let (mut q, mut k, mut v) = (Vec::new(), Vec::new(), Vec::new());
    for g in 0..a.num_kv_heads {
        let base = g * group * h;
        q.extend_from_slice(&fused[base..base + qpg * h]);
        k.extend_from_slice(&fused[base + qpg * h..base + (qpg + a.head_dim) * h]);
        v.extend_from_slice(&fused[base + (qpg + a.head_dim) * h..base + group * h]);
    }
    let m = |d: Vec<f32>, n: usize| -> Result<Mat> { Ok(Mat { m: GpuMatrix::F32(upload(s, &d)?), n, k: h }) };
    Ok((m(q, a.q_dim())?, m(k, a.k_dim())?, m(v, a.v_dim())?))
}

pub(crate) fn load_ffn(s: &Arc<CudaStream>, w: &dyn WeightSource, p: &str, h: usize, i: usize) -> Result<Ffn> {
    Ok(Ffn {
        gate: load_mat(s, w, &format!("{p}.gate_proj.weight"), i, h)?,
        up: load_mat(s, w, &format!("{p}.up_proj.weight"), i, h)?,
        down: load_mat(s, w, &format!("{p}.down_proj.weight"), h, i)?,
    })
}

impl CudaModel {
    /// Uploads the weights. Running out of GPU memory is reported with the numbers.
    pub fn load(gpu: Gpu, spec: &ModelSpec, w: &dyn WeightSource) -> Result<CudaModel> {
        let (free0, total) = gpu.ctx.mem_get_info().map_err(drv)?;
        Self::load_inner(gpu, spec, w).map_err(|e| {
            if e.to_string().contains("OUT_OF_MEMORY") {
                Error::Backend(format!(
                    "the GPU ran out of memory while loading the weights of a {}-parameter model: {free0} of {total} bytes were free (run with `--device cpu`, or use a larger GPU)",
                    spec.num_parameters()
                ))
            } else {
                e
            }
        })
    }

    fn load_inner(gpu: Gpu, spec: &ModelSpec, w: &dyn WeightSource) -> Result<CudaModel> {
        let s = gpu.stream.clone();
        let kernels = Kernels::load(&gpu)?;
        let (ptx, _) = compile::ptx("ops", compile::OPS_CU, nvrtc_arch(gpu.capability))?;
        let m = gpu.ctx.load_module(ptx).map_err(drv)?;
        let f = |n: &str| m.load_function(n).map_err(|e| Error::Backend(format!("kernel {n}: {e}")));
        let ops = Ops {
            embed: f("embed")?,
            rms_norm: f("rms_norm")?,
            add_bias: f("add_bias")?,
            add_inplace: f("add_inplace")?,
            rope: f("rope")?,
            kv_write: f("kv_write")?,
            attention: f("attention")?,
            silu_mul: f("silu_mul")?,
            gather_rows: f("gather_rows")?,
            scatter_add_scaled: f("scatter_add_scaled")?,
            gemv_f32: f("gemv_f32")?,
            copy_cols: f("copy_cols")?,
            fill_rows: f("fill_rows")?,
            scale: f("scale")?,
            draft_attention: f("draft_attention")?,
        };
        let h = spec.hidden_size;
        let mut layers = Vec::with_capacity(spec.layers.len());
        for (li, ls) in spec.layers.iter().enumerate() {
            let a = ls.attention;
            if a.v_head_dim > 128 {
                return Err(Error::Unsupported(format!("V head dim {} > 128 on the CUDA backend", a.v_head_dim)));
            }
            let p = format!("model.layers.{li}");
            let pa = format!("{p}.self_attn");
            let bias = if a.qkv_bias {
                Some((
                    upload(&s, &w.vector(&format!("{pa}.q_proj.bias"), a.q_dim())?)?,
                    upload(&s, &w.vector(&format!("{pa}.k_proj.bias"), a.k_dim())?)?,
                    upload(&s, &w.vector(&format!("{pa}.v_proj.bias"), a.v_dim())?)?,
                ))
            } else {
                None
            };
            let (q, k, v) = match a.qkv_layout {
                QkvLayout::Separate => (
                    load_mat(&s, w, &format!("{pa}.q_proj.weight"), a.q_dim(), h)?,
                    load_mat(&s, w, &format!("{pa}.k_proj.weight"), a.k_dim(), h)?,
                    load_mat(&s, w, &format!("{pa}.v_proj.weight"), a.v_dim(), h)?,
                ),
                QkvLayout::FusedPerKvHead => split_fused_qkv(&s, w, &pa, &a, h)?,
            };
            let attn = Attn {
                spec: a,
                q,
                k,
                v,
                bias,
                q_norm: if a.qk_norm { Some(upload(&s, &w.vector(&format!("{pa}.q_norm.weight"), a.head_dim)?)?) } else { None },
                k_norm: if a.qk_norm { Some(upload(&s, &w.vector(&format!("{pa}.k_norm.weight"), a.head_dim)?)?) } else { None },
                o: load_mat(&s, w, &format!("{pa}.o_proj.weight"), h, a.o_dim())?,
                sinks: if a.sinks { Some(upload(&s, &w.vector(&format!("{pa}.attention_sink_bias"), a.num_heads)?)?) } else { None },
            };
            let mlp = match ls.mlp {
                MlpSpec::Dense { intermediate_size } => Mlp::Dense(load_ffn(&s, w, &format!("{p}.mlp"), h, intermediate_size)?),
                MlpSpec::Moe(ms) => Mlp::Moe {
                    spec: ms,
                    router: load_mat(&s, w, &format!("{p}.mlp.gate.weight"), ms.num_experts, h)?,
                    bias: if ms.correction_bias { Some(w.vector(&format!("{p}.mlp.gate.e_score_correction_bias"), ms.num_experts)?) } else { None },
                    experts: (0..ms.num_experts)
                        .map(|e| load_ffn(&s, w, &format!("{p}.mlp.experts.{e}"), h, ms.intermediate_size))
                        .collect::<Result<_>>()?,
                },
            };
            layers.push(Layer {
                input_norm: upload(&s, &w.vector(&format!("{p}.input_layernorm.weight"), h)?)?,
                post_norm: upload(&s, &w.vector(&format!("{p}.post_attention_layernorm.weight"), h)?)?,
                attn,
                mlp,
                swa: matches!(a.kind, AttentionKind::Sliding { .. }),
            });
        }
        let embed = upload(&s, &w.matrix("model.embed_tokens.weight", spec.vocab_size, h)?)?;
        let lm_head = if spec.tie_word_embeddings && !w.contains("lm_head.weight") {
            None
        } else {
            Some(load_mat(&s, w, "lm_head.weight", spec.vocab_size, h)?)
        };
        Ok(CudaModel {
            spec: spec.clone(),
            final_norm: upload(&s, &w.vector("model.norm.weight", h)?)?,
            stream: s,
            gpu,
            kernels,
            ops,
            embed,
            lm_head,
            layers,
            kv: Vec::new(),
            kv_config: None,
            drafter: None,
            draft_kv: Vec::new(),
        })
    }

    pub fn gpu(&self) -> &Gpu {
        &self.gpu
    }

    pub(crate) fn zeros(&self, n: usize) -> Result<CudaSlice<f32>> {
        self.stream.alloc_zeros(n.max(1)).map_err(drv)
    }

    pub(crate) fn matvec(&self, m: &Mat, x: &CudaSlice<f32>, t: usize) -> Result<CudaSlice<f32>> {
        let mut y = self.zeros(t * m.n)?;
        match &m.m {
            GpuMatrix::Bf16(w) => self.kernels.gemv_bf16(w, x, &mut y, m.n, m.k, t)?,
            GpuMatrix::Fp8 { w, s } => self.kernels.gemv_fp8(w, s, x, &mut y, m.n, m.k, t)?,
            GpuMatrix::Mxfp4 { w, s } => self.kernels.gemv_mxfp4(w, s, x, &mut y, m.n, m.k, t)?,
            GpuMatrix::F32(w) => return self.gemv_f32(w, m.n, m.k, x, t),
        }
        Ok(y)
    }

    pub(crate) fn gemv_f32(&self, w: &CudaSlice<f32>, n: usize, k: usize, x: &CudaSlice<f32>, t: usize) -> Result<CudaSlice<f32>> {
        let mut y = self.zeros(t * n)?;
        let (ni, ki, tt) = (n as i32, k as i32, t as i32);
        let mut b = self.stream.launch_builder(&self.ops.gemv_f32);
        b.arg(w).arg(x).arg(&mut y).arg(&ni).arg(&ki).arg(&tt);
        let warps = (n * t) as u32;
        unsafe { b.launch(LaunchConfig { grid_dim: (warps.div_ceil(8), 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }) }.map_err(drv)?;
        Ok(y)
    }

    pub(crate) fn rms_norm(&self, x: &CudaSlice<f32>, w: &CudaSlice<f32>, rows: usize, d: usize) -> Result<CudaSlice<f32>> {
        let mut y = self.zeros(rows * d)?;
        self.rms_norm_into(x, w, &mut y, rows, d)?;
        Ok(y)
    }

    fn rms_norm_into(&self, x: &CudaSlice<f32>, w: &CudaSlice<f32>, y: &mut CudaSlice<f32>, rows: usize, d: usize) -> Result<()> {
        let (dd, eps) = (d as i32, self.spec.rms_norm_eps);
        let mut b = self.stream.launch_builder(&self.ops.rms_norm);
        b.arg(x).arg(w).arg(y).arg(&dd).arg(&eps);
        unsafe { b.launch(LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }) }.map_err(drv)?;
        Ok(())
    }

    pub(crate) fn add_inplace(&self, a: &mut CudaSlice<f32>, b2: &CudaSlice<f32>, n: usize) -> Result<()> {
        let nn = n as i32;
        let mut b = self.stream.launch_builder(&self.ops.add_inplace);
        b.arg(a).arg(b2).arg(&nn);
        unsafe { b.launch(LaunchConfig::for_num_elems(n as u32)) }.map_err(drv)?;
        Ok(())
    }

    pub(crate) fn ffn(&self, f: &Ffn, x: &CudaSlice<f32>, t: usize) -> Result<CudaSlice<f32>> {
        let g = self.matvec(&f.gate, x, t)?;
        let u = self.matvec(&f.up, x, t)?;
        let n = t * f.gate.n;
        let mut a = self.zeros(n)?;
        let nn = n as i32;
        let mut b = self.stream.launch_builder(&self.ops.silu_mul);
        b.arg(&g).arg(&u).arg(&mut a).arg(&nn);
        unsafe { b.launch(LaunchConfig::for_num_elems(n as u32)) }.map_err(drv)?;
        self.matvec(&f.down, &a, t)
    }

    fn attention(&self, li: usize, hn: &CudaSlice<f32>, n: usize, meta: &RowMeta) -> Result<CudaSlice<f32>> {
        let l = &self.layers[li];
        let a = &l.attn;
        let s = a.spec;
        let mut q = self.matvec(&a.q, hn, n)?;
        let mut k = self.matvec(&a.k, hn, n)?;
        let mut v = self.matvec(&a.v, hn, n)?;
        if let Some((bq, bk, bv)) = &a.bias {
            for (t, bb, d) in [(&mut q, bq, s.q_dim()), (&mut k, bk, s.k_dim()), (&mut v, bv, s.v_dim())] {
                let (dd, nn) = (d as i32, n as i32);
                let mut b = self.stream.launch_builder(&self.ops.add_bias);
                b.arg(&mut *t).arg(bb).arg(&dd).arg(&nn);
                unsafe { b.launch(LaunchConfig::for_num_elems((n * d) as u32)) }.map_err(drv)?;
            }
        }
        if let (Some(qn), Some(kn)) = (&a.q_norm, &a.k_norm) {
            q = self.rms_norm(&q, qn, n * s.num_heads, s.head_dim)?;
            k = self.rms_norm(&k, kn, n * s.num_kv_heads, s.head_dim)?;
        }
        self.rope(&mut q, &meta.pos, n, s.num_heads, &s)?;
        self.rope(&mut k, &meta.pos, n, s.num_kv_heads, &s)?;
        let (kc, vc) = &self.kv[li];
        let slots = if l.swa { &meta.swa_slots } else { &meta.full_slots };
        self.kv_write(&k, &v, kc, vc, slots, n, &s)?;
        let mut o = self.zeros(n * s.o_dim())?;
        {
            let tables = if l.swa { &meta.swa_tables } else { &meta.full_tables };
            let (mb, bs, hh, kvh, hd, vd) = (meta.max_blocks as i32, meta.block_size as i32, s.num_heads as i32, s.num_kv_heads as i32, s.head_dim as i32, s.v_head_dim as i32);
            let window = s.window().map_or(0, |w| w as i32);
            let scale = s.softmax_scale;
            let mut b = self.stream.launch_builder(&self.ops.attention);
            b.arg(&q).arg(kc).arg(vc).arg(&mut o).arg(&meta.pos).arg(&meta.seq).arg(tables).arg(&mb).arg(&bs).arg(&hh).arg(&kvh).arg(&hd).arg(&vd).arg(&window).arg(&scale);
            match &a.sinks {
                Some(sk) => b.arg(sk),
                None => b.arg(&0u64),
            };
            unsafe { b.launch(LaunchConfig { grid_dim: (n as u32, s.num_heads as u32, 1), block_dim: (32, 1, 1), shared_mem_bytes: 0 }) }.map_err(drv)?;
        }
        self.matvec(&a.o, &o, n)
    }

    /// Rotate-half RoPE of `heads` head vectors per row at the rows' positions.
    pub(crate) fn rope(&self, t: &mut CudaSlice<f32>, pos: &CudaSlice<i32>, n: usize, heads: usize, s: &AttentionSpec) -> Result<()> {
        let half = s.rope.rotary_dim.div_ceil(2);
        if half == 0 {
            return Ok(());
        }
        let (hh, hd, hf, rd, th) = (heads as i32, s.head_dim as i32, half as i32, s.rope.rotary_dim as i32, s.rope.theta as f32);
        let mut b = self.stream.launch_builder(&self.ops.rope);
        b.arg(t).arg(pos).arg(&hh).arg(&hd).arg(&hf).arg(&rd).arg(&th);
        unsafe { b.launch(LaunchConfig { grid_dim: (n as u32, heads as u32, 1), block_dim: (half.next_multiple_of(32) as u32, 1, 1), shared_mem_bytes: 0 }) }.map_err(drv)?;
        Ok(())
    }

    /// K/V rows into paged pools (V times the value scale).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn kv_write(&self, k: &CudaSlice<f32>, v: &CudaSlice<f32>, kc: &CudaSlice<f32>, vc: &CudaSlice<f32>, slots: &CudaSlice<i64>, n: usize, s: &AttentionSpec) -> Result<()> {
        let (kd, vd, vs) = (s.k_dim() as i32, s.v_dim() as i32, s.value_scale);
        let mut b = self.stream.launch_builder(&self.ops.kv_write);
        b.arg(k).arg(v).arg(kc).arg(vc).arg(slots).arg(&kd).arg(&vd).arg(&vs);
        unsafe { b.launch(LaunchConfig { grid_dim: (n as u32, 1, 1), block_dim: (128, 1, 1), shared_mem_bytes: 0 }) }.map_err(drv)?;
        Ok(())
    }

    fn moe(&self, spec: &MoeSpec, router: &Mat, bias: Option<&[f32]>, experts: &[Ffn], hn: &CudaSlice<f32>, n: usize) -> Result<CudaSlice<f32>> {
        let h = self.spec.hidden_size;
        let logits = self.stream.clone_dtoh(&self.matvec(router, hn, n)?).map_err(drv)?;
        let mut per_expert: Vec<Vec<(i32, f32)>> = vec![Vec::new(); spec.num_experts];
        for t in 0..n {
            for (e, wgt) in peregrine_cpu::model::route(spec, &logits[t * spec.num_experts..(t + 1) * spec.num_experts], bias) {
                per_expert[e].push((t as i32, wgt));
            }
        }
        let mut y = self.zeros(n * h)?;
        let hh = h as i32;
        for (e, toks) in per_expert.iter().enumerate().filter(|(_, t)| !t.is_empty()) {
            let idx = upload(&self.stream, &toks.iter().map(|x| x.0).collect::<Vec<_>>())?;
            let wts = upload(&self.stream, &toks.iter().map(|x| x.1).collect::<Vec<_>>())?;
            let mut xs = self.zeros(toks.len() * h)?;
            let mut b = self.stream.launch_builder(&self.ops.gather_rows);
            b.arg(hn).arg(&idx).arg(&mut xs).arg(&hh);
            unsafe { b.launch(LaunchConfig { grid_dim: (toks.len() as u32, 1, 1), block_dim: (128, 1, 1), shared_mem_bytes: 0 }) }.map_err(drv)?;
            let out = self.ffn(&experts[e], &xs, toks.len())?;
            let mut b = self.stream.launch_builder(&self.ops.scatter_add_scaled);
            b.arg(&out).arg(&idx).arg(&wts).arg(&mut y).arg(&hh);
            unsafe { b.launch(LaunchConfig { grid_dim: (toks.len() as u32, 1, 1), block_dim: (128, 1, 1), shared_mem_bytes: 0 }) }.map_err(drv)?;
        }
        Ok(y)
    }
}

/// Per-row data of one forward, on the GPU.
struct RowMeta {
    pos: CudaSlice<i32>,
    seq: CudaSlice<i32>,
    full_slots: CudaSlice<i64>,
    swa_slots: CudaSlice<i64>,
    full_tables: CudaSlice<i32>,
    swa_tables: CudaSlice<i32>,
    max_blocks: usize,
    block_size: usize,
}

impl Backend for CudaModel {
    fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    fn kv_block_bytes(&self, block_size: usize) -> KvBlockBytes {
        let mut b = KvBlockBytes { full: 0, swa: 0 };
        for l in &self.layers {
            let per = block_size * (l.attn.spec.k_dim() + l.attn.spec.v_dim()) * 4;
            if l.swa { b.swa += per } else { b.full += per }
        }
        if let Some(d) = &self.drafter {
            b.full += block_size * d.kv_floats_per_token() * 4;
        }
        b
    }

    fn init_kv(&mut self, config: KvConfig) -> Result<()> {
        self.kv.clear();
        let bytes: usize = self
            .layers
            .iter()
            .map(|l| {
                let blocks = if l.swa { config.num_swa_blocks } else { config.num_full_blocks };
                blocks * config.block_size * (l.attn.spec.k_dim() + l.attn.spec.v_dim()) * 4
            })
            .sum::<usize>()
            + self.drafter.as_ref().map_or(0, |d| config.num_full_blocks * config.block_size * d.kv_floats_per_token() * 4);
        self.draft_kv.clear();
        let (free, total) = self.gpu.ctx.mem_get_info().map_err(drv)?;
        if bytes > free {
            return Err(Error::Backend(format!(
                "the KV cache needs {bytes} bytes but the GPU has {free} of {total} free after the weights; lower --kv-cache-memory"
            )));
        }
        for l in &self.layers {
            let blocks = if l.swa { config.num_swa_blocks } else { config.num_full_blocks };
            let slots = (blocks * config.block_size).max(1);
            let s = &l.attn.spec;
            self.kv.push((self.zeros(slots * s.k_dim())?, self.zeros(slots * s.v_dim())?));
        }
        if let Some(d) = &self.drafter {
            let slots = (config.num_full_blocks * config.block_size).max(1);
            for l in &d.layers {
                let s = &l.attn.spec;
                self.draft_kv.push((self.zeros(slots * s.k_dim())?, self.zeros(slots * s.v_dim())?));
            }
        }
        self.kv_config = Some(config);
        Ok(())
    }

    fn forward(&mut self, batch: &[SeqForward]) -> Result<Vec<Logits>> {
        let cfg = self.kv_config.ok_or_else(|| Error::Backend("forward before init_kv".into()))?;
        let (h, vocab, bs) = (self.spec.hidden_size, self.spec.vocab_size, cfg.block_size);
        // Rows and their paging metadata.
        let mut toks = Vec::new();
        let mut pos = Vec::new();
        let mut seq = Vec::new();
        let mut full_slots = Vec::new();
        let mut swa_slots = Vec::new();
        let max_blocks = batch.iter().map(|s| s.full_blocks.len().max(s.swa_blocks.len())).max().unwrap_or(1).max(1);
        let mut full_tables = vec![0i32; batch.len() * max_blocks];
        let mut swa_tables = vec![0i32; batch.len() * max_blocks];
        for (si, s) in batch.iter().enumerate() {
            for (j, &b) in s.full_blocks.iter().enumerate() {
                full_tables[si * max_blocks + j] = if b == NULL_BLOCK { 0 } else { b as i32 };
            }
            for (j, &b) in s.swa_blocks.iter().enumerate() {
                swa_tables[si * max_blocks + j] = if b == NULL_BLOCK { 0 } else { b as i32 };
            }
            for (ti, &t) in s.tokens.iter().enumerate() {
                if t as usize >= vocab {
                    return Err(Error::Backend(format!("token id {t} outside the vocabulary of {vocab}")));
                }
                let p = s.start_pos + ti;
                let slot = |table: &[u32], group: &str| match table.get(p / bs) {
                    Some(&b) if b != NULL_BLOCK => Ok(b as i64 * bs as i64 + (p % bs) as i64),
                    _ => Err(Error::Backend(format!("sequence {}: no {group} KV block for position {p}", s.seq_id))),
                };
                full_slots.push(slot(&s.full_blocks, "full-attention")?);
                swa_slots.push(if self.layers.iter().any(|l| l.swa) { slot(&s.swa_blocks, "sliding-window")? } else { 0 });
                toks.push(t as i32);
                pos.push(p as i32);
                seq.push(si as i32);
            }
        }
        let n = toks.len();
        if n == 0 {
            return Ok(batch.iter().map(|_| Logits::default()).collect());
        }
        let st = &self.stream;
        let meta = RowMeta {
            pos: upload(st, &pos)?,
            seq: upload(st, &seq)?,
            full_slots: upload(st, &full_slots)?,
            swa_slots: upload(st, &swa_slots)?,
            full_tables: upload(st, &full_tables)?,
            swa_tables: upload(st, &swa_tables)?,
            max_blocks,
            block_size: bs,
        };
        let tok_d = upload(st, &toks)?;
        let mut x = self.zeros(n * h)?;
        {
            let hh = h as i32;
            let mut b = st.launch_builder(&self.ops.embed);
            b.arg(&self.embed).arg(&tok_d).arg(&mut x).arg(&hh);
            unsafe { b.launch(LaunchConfig { grid_dim: (n as u32, 1, 1), block_dim: (128, 1, 1), shared_mem_bytes: 0 }) }.map_err(drv)?;
        }
        let mut features = None;
        for li in 0..self.layers.len() {
            let hn = self.rms_norm(&x, &self.layers[li].input_norm, n, h)?;
            let o = self.attention(li, &hn, n, &meta)?;
            self.add_inplace(&mut x, &o, n * h)?;
            let hn = self.rms_norm(&x, &self.layers[li].post_norm, n, h)?;
            let m = match &self.layers[li].mlp {
                Mlp::Dense(f) => self.ffn(f, &hn, n)?,
                Mlp::Moe { spec, router, bias, experts } => self.moe(spec, router, bias.as_deref(), experts, &hn, n)?,
            };
            self.add_inplace(&mut x, &m, n * h)?;
            self.capture(li, &x, n, &mut features)?;
        }
        if let Some(f) = &features {
            self.write_draft_context(f, n, &meta.pos, &meta.full_slots)?;
        }
        // Logits for the rows asked for.
        let (want, counts) = peregrine_core::backend::output_rows(batch);
        let want: Vec<i32> = want.into_iter().map(|r| r as i32).collect();
        let data = if want.is_empty() {
            Vec::new()
        } else {
            let idx = upload(st, &want)?;
            let mut sel = self.zeros(want.len() * h)?;
            let hh = h as i32;
            let mut b = st.launch_builder(&self.ops.gather_rows);
            b.arg(&x).arg(&idx).arg(&mut sel).arg(&hh);
            unsafe { b.launch(LaunchConfig { grid_dim: (want.len() as u32, 1, 1), block_dim: (128, 1, 1), shared_mem_bytes: 0 }) }.map_err(drv)?;
            let normed = self.rms_norm(&sel, &self.final_norm, want.len(), h)?;
            let logits = match &self.lm_head {
                Some(m) => self.matvec(m, &normed, want.len())?,
                // Tied: the f32 embedding table is the head.
                None => self.gemv_f32(&self.embed, vocab, h, &normed, want.len())?,
            };
            st.clone_dtoh(&logits).map_err(drv)?
        };
        Ok(peregrine_core::backend::split_logits(&data, &counts, vocab))
    }

    fn name(&self) -> &str {
        "cuda"
    }

    fn draft_spec(&self) -> Option<&peregrine_core::DraftSpec> {
        self.drafter.as_ref().map(|d| &d.spec)
    }

    fn draft(&mut self, batch: &[peregrine_core::backend::DraftForward]) -> Result<Vec<Vec<u32>>> {
        self.draft_pass(batch)
    }
}
