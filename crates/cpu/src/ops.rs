//! The f32 building blocks of the reference forward: matmul, RMSNorm, RoPE, SiLU, softmax.
//! Plain loops that the compiler vectorises, parallelised with rayon over output features.

use rayon::prelude::*;

/// Dot product with 8 independent accumulators (vectorisable; order fixed, so deterministic).
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0f32; 8];
    let chunks = n / 8;
    for i in 0..chunks {
        let (x, y) = (&a[i * 8..i * 8 + 8], &b[i * 8..i * 8 + 8]);
        for j in 0..8 {
            acc[j] += x[j] * y[j];
        }
    }
    let mut tail = 0f32;
    for i in chunks * 8..n {
        tail += a[i] * b[i];
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail
}

/// `out[r, n] = sum_k x[r, k] * w[n, k]` for `x` [rows, k] and `w` [n_out, k] (PyTorch's
/// `F.linear` orientation). Parallel over output features in chunks.
pub fn matmul(x: &[f32], rows: usize, w: &[f32], n_out: usize, k: usize) -> Vec<f32> {
    debug_assert_eq!(x.len(), rows * k);
    debug_assert_eq!(w.len(), n_out * k);
    // Transposed result [n_out, rows]: each task writes a contiguous piece.
    let chunk = (n_out / (rayon::current_num_threads() * 8)).clamp(8, 256);
    let mut t = vec![0f32; n_out * rows];
    if n_out * k * rows < 1 << 16 {
        for n in 0..n_out {
            for r in 0..rows {
                t[n * rows + r] = dot(&x[r * k..(r + 1) * k], &w[n * k..(n + 1) * k]);
            }
        }
    } else {
        t.par_chunks_mut(chunk * rows).enumerate().for_each(|(ci, out)| {
            let n0 = ci * chunk;
            for (i, o) in out.chunks_mut(rows).enumerate() {
                let wr = &w[(n0 + i) * k..(n0 + i + 1) * k];
                for (r, v) in o.iter_mut().enumerate() {
                    *v = dot(&x[r * k..(r + 1) * k], wr);
                }
            }
        });
    }
    if rows == 1 {
        return t;
    }
    let mut out = vec![0f32; rows * n_out];
    for n in 0..n_out {
        for r in 0..rows {
            out[r * n_out + n] = t[n * rows + r];
        }
    }
    out
}

/// HF RMSNorm in f32: `w * (x * rsqrt(mean(x^2) + eps))`, row by row.
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let d = w.len();
    let mut out = vec![0f32; x.len()];
    for (o, r) in out.chunks_mut(d).zip(x.chunks(d)) {
        rms_norm_row(r, w, eps, o);
    }
    out
}

pub fn rms_norm_row(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let ms = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let inv = 1.0 / (ms + eps).sqrt();
    for ((o, v), g) in out.iter_mut().zip(x).zip(w) {
        *o = g * (v * inv);
    }
}

pub fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// RoPE inverse frequencies as HF computes them: `1 / theta^(2i / dim)` for `2i < dim`
/// (so an odd `dim` gets `ceil(dim/2)` frequencies).
pub fn rope_inv_freq(theta: f64, rotary_dim: usize) -> Vec<f32> {
    (0..rotary_dim.div_ceil(2))
        .map(|i| {
            let e = (2 * i) as f32 / rotary_dim as f32;
            1.0 / (theta as f32).powf(e)
        })
        .collect()
}

/// Rotate-half (NeoX) RoPE on the first `2 * inv_freq.len()` dims of one head vector.
pub fn apply_rope(x: &mut [f32], pos: usize, inv_freq: &[f32]) {
    let half = inv_freq.len();
    for (i, &f) in inv_freq.iter().enumerate() {
        let ang = pos as f32 * f;
        let (s, c) = ang.sin_cos();
        let (a, b) = (x[i], x[i + half]);
        x[i] = a * c - b * s;
        x[i + half] = b * c + a * s;
    }
}

/// In-place log-softmax-free softmax over `x` (max-subtracted).
pub fn softmax_in_place(x: &mut [f32]) {
    let m = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0f32;
    for v in x.iter_mut() {
        *v = (*v - m).exp();
        sum += *v;
    }
    for v in x.iter_mut() {
        *v /= sum;
    }
}
