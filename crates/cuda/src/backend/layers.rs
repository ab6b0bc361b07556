//! The model's weights as the step reads them: matrices in their stored formats (`Mat`), the
//! q/k/v projection, MLPs and experts, per layer; and how a checkpoint's tensors become them.

use super::*;

/// A weight matrix [n, k] on the GPU, in the format it was stored in when a kernel reads it. FP8
/// and BF16 matrices with K % 128 == 0 lie in the tensor-core tile layout (`tc_tiles`: rows
/// padded to whole tiles), the others row-major.
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

/// The q, k and v projections: three matrices, or one with their rows stacked (one launch
/// and one read of the activations; when all three share a tensor-core format). One per layer:
/// the size difference between the variants does not matter.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Qkv {
    Separate { q: Mat, k: Mat, v: Mat },
    Stacked { m: Mat, rows: [usize; 3] },
}

/// Matrices with their rows stacked into one (first's rows, then the next's), where the
/// tensor-core GEMV can run them as one: all FP8 with whole 128-row scale blocks before the
/// last, or all BF16 with whole 16-row tiles before the last (`tc_tiles`), with one K,
/// K % 128 == 0. None otherwise. The copies are made on the GPU.
pub(crate) fn stack_rows(st: &Arc<CudaStream>, parts: &[&Mat]) -> Result<Option<Mat>> {
    let Some(first) = parts.first() else { return Ok(None) };
    let (kk, n) = (first.k, parts.iter().map(|p| p.n).sum());
    if kk % 128 != 0 || parts.iter().any(|p| p.k != kk) {
        return Ok(None);
    }
    fn cat<T: cudarc::driver::DeviceRepr>(st: &Arc<CudaStream>, parts: &[&CudaSlice<T>]) -> Result<CudaSlice<T>> {
        let mut out = unsafe { st.alloc::<T>(parts.iter().map(|p| p.len()).sum()) }.map_err(drv)?;
        let mut off = 0;
        for p in parts {
            st.memcpy_dtod(*p, &mut out.slice_mut(off..off + p.len())).map_err(drv)?;
            off += p.len();
        }
        Ok(out)
    }
    let whole_blocks = parts[..parts.len() - 1].iter().all(|p| p.n.is_multiple_of(128));
    let whole_tiles = parts[..parts.len() - 1].iter().all(|p| p.n.is_multiple_of(16));
    let fp8: Option<Vec<_>> = parts.iter().map(|p| if let GpuMatrix::Fp8 { w, s } = &p.m { Some((w, s)) } else { None }).collect();
    let bf16: Option<Vec<_>> = parts.iter().map(|p| if let GpuMatrix::Bf16(w) = &p.m { Some(w) } else { None }).collect();
    let m = match (fp8, bf16) {
        (Some(f), _) if whole_blocks => {
            let (ws, ss): (Vec<_>, Vec<_>) = f.into_iter().unzip();
            GpuMatrix::Fp8 { w: cat(st, &ws)?, s: cat(st, &ss)? }
        }
        (_, Some(b)) if whole_tiles => GpuMatrix::Bf16(cat(st, &b)?),
        _ => return Ok(None),
    };
    Ok(Some(Mat { m, n, k: kk }))
}

impl Qkv {
    /// Stacks q, k and v when the tensor-core GEMV can run them as one (`stack_rows`).
    pub(crate) fn stack(st: &Arc<CudaStream>, q: Mat, k: Mat, v: Mat) -> Result<Qkv> {
        let rows = [q.n, k.n, v.n];
        Ok(match stack_rows(st, &[&q, &k, &v])? {
            Some(m) => Qkv::Stacked { m, rows },
            None => Qkv::Separate { q, k, v },
        })
    }
}

pub(crate) struct Attn {
    pub(crate) spec: AttentionSpec,
    pub(crate) qkv: Qkv,
    pub(crate) bias: Option<(CudaSlice<f32>, CudaSlice<f32>, CudaSlice<f32>)>,
    pub(crate) q_norm: Option<CudaSlice<f32>>,
    pub(crate) k_norm: Option<CudaSlice<f32>>,
    pub(crate) o: Mat,
    pub(crate) sinks: Option<CudaSlice<f32>>,
}

pub(crate) struct Ffn {
    pub(crate) gate_up: GateUp,
    pub(crate) down: Mat,
}

/// A dense MLP's gate and up projections: two matrices, or one with up's rows after gate's
/// (`stack_rows`): one GEMV launch and one split of x instead of two each.
pub(crate) enum GateUp {
    Separate { gate: Mat, up: Mat },
    Stacked { m: Mat, i: usize },
}

#[allow(clippy::large_enum_variant)]
pub(crate) enum Experts {
    /// MXFP4 experts stacked for the grouped MoE kernels (routing stays on the GPU).
    Stacked(MoeWeights),
    /// Any other format: one GEMV chain per routed expert, routed on the host.
    PerExpert(Vec<Ffn>),
}

#[allow(clippy::large_enum_variant)]
pub(crate) enum Mlp {
    Dense(Ffn),
    Moe {
        spec: MoeSpec,
        router: Mat,
        /// The correction bias on the GPU, and on the host for the per-expert path.
        bias: Option<(CudaSlice<f32>, Vec<f32>)>,
        experts: Experts,
    },
}

pub(crate) struct Layer {
    pub(crate) input_norm: CudaSlice<f32>,
    pub(crate) post_norm: CudaSlice<f32>,
    pub(crate) attn: Attn,
    pub(crate) mlp: Mlp,
    pub(crate) swa: bool,
}

/// MiMo-V2.5-Pro's fused `qkv_proj` (rows grouped per KV head: [Q of its heads | K | V]) split
/// into q, k and v as exact f32 (a 128-row FP8 scale block may straddle K and V, so the split is
/// done after decoding, as the CPU reference does).
pub(super) fn split_fused_qkv(s: &Arc<CudaStream>, w: &dyn WeightSource, pa: &str, a: &AttentionSpec, h: usize) -> Result<(Mat, Mat, Mat)> {
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

pub(crate) fn load_ffn(s: &Arc<CudaStream>, w: &Source, p: &str, h: usize, i: usize) -> Result<Ffn> {
    let (gate, up) = (w.mat(s, &format!("{p}.gate_proj.weight"), i, h)?, w.mat(s, &format!("{p}.up_proj.weight"), i, h)?);
    let stack = std::env::var("PEREGRINE_FFN_STACK").map_or(true, |v| v != "0");
    let gate_up = match if stack { stack_rows(s, &[&gate, &up])? } else { None } {
        Some(m) => GateUp::Stacked { m, i },
        None => GateUp::Separate { gate, up },
    };
    Ok(Ffn { gate_up, down: w.mat(s, &format!("{p}.down_proj.weight"), h, i)? })
}
