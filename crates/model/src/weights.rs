//! [`WeightSource`]: tensors by canonical HF hub name as f32, whatever layout and format the
//! checkpoint stores them in. The CPU reference reads weights only through this.

use peregrine_core::{DType, Error, Result};

use crate::checkpoint::{Checkpoint, TensorView};
use crate::formats;

pub trait WeightSource: Send + Sync {
    /// `name` as a row-major f32 `[rows, cols]` matrix, dequantised from its stored format.
    fn matrix(&self, name: &str, rows: usize, cols: usize) -> Result<Vec<f32>>;
    /// A 1-D tensor (norm weights, biases, sinks, router bias) as f32.
    fn vector(&self, name: &str, len: usize) -> Result<Vec<f32>>;
    fn contains(&self, name: &str) -> bool;
    /// The tensor exactly as stored (format, shape, bytes), for backends that keep stored
    /// formats on the device. None when the source has no such stored tensor.
    fn stored(&self, name: &str) -> Option<crate::checkpoint::TensorView<'_>> {
        let _ = name;
        None
    }
}

/// A [`WeightSource`] over a safetensors [`Checkpoint`]. Understands:
/// - plain F32/F16/BF16 tensors;
/// - FP8 e4m3 `X.weight` with f32 `X.weight_scale_inv` block scales;
/// - MXFP4 in the MiMo layout: U8 `X.weight` [N, K/2] with U8 `X.weight_scale` [N, K/32];
/// - experts asked per expert (`...mlp.experts.{e}.gate_proj.weight`) but stored fused in HF's
///   layout (`mlp.experts.gate_up_proj` [E, 2I, H], gate rows first; `mlp.experts.down_proj`
///   [E, H, I]) or in the gpt-oss MXFP4 layout (`..._blocks` [E, N, K/32, 16] + `..._scales`;
///   gate_up rows interleaved gate/up as HF's gpt-oss does; biases are not handled here);
/// - `self_attn.attention_sink_bias` stored as HF's `self_attn.sinks`.
pub struct SafetensorsWeights {
    ckpt: Checkpoint,
    /// Block size of FP8 scales (from quantization_config).
    fp8_block: (usize, usize),
}

impl SafetensorsWeights {
    pub fn new(ckpt: Checkpoint, fp8_block: (usize, usize)) -> Self {
        SafetensorsWeights { ckpt, fp8_block }
    }

    pub fn checkpoint(&self) -> &Checkpoint {
        &self.ckpt
    }

    fn plain(name: &str, t: TensorView<'_>) -> Result<Vec<f32>> {
        Ok(match t.dtype {
            DType::F32 => formats::f32_from_le(t.data),
            DType::F16 => formats::f16_to_f32(t.data),
            DType::BF16 => formats::bf16_to_f32(t.data),
            DType::F8E4M3 => t.data.iter().map(|&b| formats::fp8_e4m3_to_f32(b)).collect(),
            d => return Err(Error::tensor(name, format!("dtype {d:?} is not a floating-point format"))),
        })
    }

    fn stored_matrix(&self, name: &str, rows: usize, cols: usize) -> Result<Vec<f32>> {
        let t = self.ckpt.get(name)?;
        let shape_err = |want: String| {
            Error::tensor(name, format!("shape {:?} ({:?}) but the model needs {want}", t.shape, t.dtype))
        };
        let base = name.strip_suffix(".weight").unwrap_or(name);
        match t.dtype {
            DType::U8 => {
                let scale_name = format!("{base}.weight_scale");
                if !cols.is_multiple_of(formats::MXFP4_BLOCK) {
                    return Err(Error::tensor(name, format!("MXFP4 needs K divisible by 32, K = {cols}")));
                }
                if t.shape != [rows, cols / 2] {
                    return Err(shape_err(format!("[{rows}, {}] (MXFP4)", cols / 2)));
                }
                let s = self.ckpt.get(&scale_name)?;
                if s.dtype != DType::U8 || s.shape != [rows, cols / 32] {
                    return Err(Error::tensor(&scale_name, format!("shape {:?} ({:?}), expected U8 [{rows}, {}]", s.shape, s.dtype, cols / 32)));
                }
                Ok(formats::dequant_mxfp4(t.data, s.data, rows, cols))
            }
            DType::F8E4M3 => {
                if t.shape != [rows, cols] {
                    return Err(shape_err(format!("[{rows}, {cols}]")));
                }
                let scale_name = format!("{base}.weight_scale_inv");
                let (bn, bk) = self.fp8_block;
                let s = self.ckpt.get(&scale_name)?;
                let want = [rows.div_ceil(bn), cols.div_ceil(bk)];
                if s.shape != want {
                    return Err(Error::tensor(&scale_name, format!("shape {:?}, expected {want:?} for {bn}x{bk} blocks", s.shape)));
                }
                let scales = Self::plain(&scale_name, s)?;
                Ok(formats::dequant_fp8_block(t.data, &scales, rows, cols, bn, bk))
            }
            _ => {
                if t.shape != [rows, cols] {
                    return Err(shape_err(format!("[{rows}, {cols}]")));
                }
                Self::plain(name, t)
            }
        }
    }

    /// `...mlp.experts.{e}.{proj}_proj.weight` from a fused per-layer expert tensor.
    fn fused_expert(&self, name: &str, rows: usize, cols: usize) -> Result<Option<Vec<f32>>> {
        let Some((prefix, rest)) = name.split_once(".mlp.experts.") else { return Ok(None) };
        let mut parts = rest.split('.');
        let (Some(e), Some(proj), Some("weight"), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
            return Ok(None);
        };
        let Ok(e) = e.parse::<usize>() else { return Ok(None) };
        let base = format!("{prefix}.mlp.experts");
        let (fused, half) = match proj {
            "gate_proj" => ("gate_up_proj", Some(0)),
            "up_proj" => ("gate_up_proj", Some(1)),
            "down_proj" => ("down_proj", None),
            _ => return Ok(None),
        };
        let fused_rows = if half.is_some() { 2 * rows } else { rows };
        // HF fused float layout: [E, N, K].
        let fname = format!("{base}.{fused}");
        if self.ckpt.contains(&fname) {
            let t = self.ckpt.get(&fname)?;
            if t.shape.len() != 3 || e >= t.shape[0] || t.shape[1] != fused_rows || t.shape[2] != cols {
                return Err(Error::tensor(&fname, format!("shape {:?}, expected [E > {e}, {fused_rows}, {cols}]", t.shape)));
            }
            if t.dtype == DType::F8E4M3 {
                // Its block scales would be silently dropped by a plain decode.
                return Err(Error::tensor(&fname, "FP8 fused expert tensors are not supported (store experts per expert)"));
            }
            let per = fused_rows * cols * t.dtype.size();
            let sub = TensorView { dtype: t.dtype, shape: &t.shape[1..], data: &t.data[e * per..(e + 1) * per] };
            let all = Self::plain(&fname, sub)?;
            return Ok(Some(select_half(all, half, rows, cols)));
        }
        // gpt-oss MXFP4 layout: blocks [E, N, K/32, 16], scales [E, N, K/32].
        let bname = format!("{base}.{fused}_blocks");
        if self.ckpt.contains(&bname) {
            let sname = format!("{base}.{fused}_scales");
            if !cols.is_multiple_of(formats::MXFP4_BLOCK) {
                return Err(Error::tensor(&bname, format!("MXFP4 needs K divisible by 32, K = {cols}")));
            }
            let b = self.ckpt.get(&bname)?;
            let s = self.ckpt.get(&sname)?;
            if b.dtype != DType::U8 || b.shape.len() != 4 || e >= b.shape[0] || b.shape[1..] != [fused_rows, cols / 32, 16] {
                return Err(Error::tensor(&bname, format!("shape {:?}, expected U8 [E > {e}, {fused_rows}, {}, 16]", b.shape, cols / 32)));
            }
            if s.dtype != DType::U8 || s.shape.len() != 3 || s.shape[0] != b.shape[0] || s.shape[1..] != [fused_rows, cols / 32] {
                return Err(Error::tensor(&sname, format!("shape {:?}, expected U8 [{}, {fused_rows}, {}]", s.shape, b.shape[0], cols / 32)));
            }
            let bper = fused_rows * cols / 2;
            let sper = fused_rows * cols / 32;
            let all = formats::dequant_mxfp4_gpt_oss(
                &b.data[e * bper..(e + 1) * bper],
                &s.data[e * sper..(e + 1) * sper],
                fused_rows,
                cols,
            );
            // gpt-oss interleaves: HF takes `gate_up[..., ::2]` / `[..., 1::2]` after transposing
            // the dequantised [2I, H] to [H, 2I], so gate = even rows, up = odd rows here.
            return Ok(Some(select_interleaved(all, half, rows, cols)));
        }
        Ok(None)
    }

    fn resolve_alias(&self, name: &str) -> String {
        if !self.ckpt.contains(name) {
            if let Some(p) = name.strip_suffix(".self_attn.attention_sink_bias") {
                let alt = format!("{p}.self_attn.sinks");
                if self.ckpt.contains(&alt) {
                    return alt;
                }
            }
        }
        name.to_owned()
    }
}

/// Gate rows come first in HF's fused `gate_up_proj` (`chunk(2)`); `half = None` keeps all.
fn select_half(all: Vec<f32>, half: Option<usize>, rows: usize, cols: usize) -> Vec<f32> {
    match half {
        None => all,
        Some(h) => all[h * rows * cols..(h + 1) * rows * cols].to_vec(),
    }
}

/// Rows `h, h + 2, h + 4, ..` of a `[2 * rows, cols]` matrix; `half = None` keeps all.
fn select_interleaved(all: Vec<f32>, half: Option<usize>, rows: usize, cols: usize) -> Vec<f32> {
    match half {
        None => all,
        Some(h) => (0..rows).flat_map(|r| all[(2 * r + h) * cols..(2 * r + h + 1) * cols].iter().copied()).collect(),
    }
}

impl WeightSource for SafetensorsWeights {
    fn matrix(&self, name: &str, rows: usize, cols: usize) -> Result<Vec<f32>> {
        if self.ckpt.contains(name) {
            return self.stored_matrix(name, rows, cols);
        }
        if let Some(m) = self.fused_expert(name, rows, cols)? {
            return Ok(m);
        }
        Err(Error::tensor(name, "missing from the checkpoint"))
    }

    fn vector(&self, name: &str, len: usize) -> Result<Vec<f32>> {
        let name = self.resolve_alias(name);
        let t = self.ckpt.get(&name)?;
        if t.numel() != len || t.shape.len() > 1 && t.shape.iter().filter(|&&d| d != 1).count() > 1 {
            return Err(Error::tensor(&name, format!("shape {:?}, expected [{len}]", t.shape)));
        }
        Self::plain(&name, t)
    }

    fn contains(&self, name: &str) -> bool {
        self.ckpt.contains(name) || self.ckpt.contains(&self.resolve_alias(name))
    }

    fn stored(&self, name: &str) -> Option<TensorView<'_>> {
        self.ckpt.get(name).ok()
    }
}
