//! Decoders from stored element and block formats to f32. Pure functions over bytes
//! (little-endian, row-major), checked bit-exactly against torch and HF transformers.

use half::{bf16, f16};

/// FP4 E2M1 values of codes 0..15 (8..15 are the negatives of 0..7).
pub const E2M1_VALUES: [f32; 16] =
    [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0];

/// Elements sharing one E8M0 scale in MXFP4.
pub const MXFP4_BLOCK: usize = 32;

pub fn bf16_to_f32(bytes: &[u8]) -> Vec<f32> {
    bytes.chunks_exact(2).map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect()
}

pub fn f16_to_f32(bytes: &[u8]) -> Vec<f32> {
    bytes.chunks_exact(2).map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32()).collect()
}

pub fn f32_from_le(bytes: &[u8]) -> Vec<f32> {
    bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
}

/// FP8 e4m3fn (torch.float8_e4m3fn): bias 7, no infinities, S.1111.111 is NaN.
pub fn fp8_e4m3_to_f32(byte: u8) -> f32 {
    let sign = if byte & 0x80 != 0 { -1.0f32 } else { 1.0 };
    let exp = ((byte >> 3) & 0x0f) as i32;
    let man = (byte & 0x07) as f32;
    if exp == 0x0f && byte & 0x07 == 0x07 {
        return f32::NAN;
    }
    if exp == 0 {
        sign * man / 8.0 * 2f32.powi(-6)
    } else {
        sign * (1.0 + man / 8.0) * 2f32.powi(exp - 7)
    }
}

/// E8M0 scale: 2^(byte - 127); 0xFF is NaN.
pub fn e8m0_to_f32(byte: u8) -> f32 {
    if byte == 0xff {
        f32::NAN
    } else {
        // 2^-127 is subnormal in f32; build it exactly from bits.
        if byte == 0 {
            f32::from_bits(0x0040_0000)
        } else {
            f32::from_bits((byte as u32) << 23)
        }
    }
}

/// FP8 block dequantisation: `w[n, k] = fp8[n, k] * scale_inv[n / block_n, k / block_k]`, where
/// `scale_inv` is f32 `[ceil(n/block_n), ceil(k/block_k)]` (edge blocks may be partial).
pub fn dequant_fp8_block(
    data: &[u8],
    scale_inv: &[f32],
    rows: usize,
    cols: usize,
    block_n: usize,
    block_k: usize,
) -> Vec<f32> {
    let sc = cols.div_ceil(block_k);
    let lut: Vec<f32> = (0..=255u8).map(fp8_e4m3_to_f32).collect();
    let mut out = Vec::with_capacity(rows * cols);
    for r in 0..rows {
        let srow = &scale_inv[(r / block_n) * sc..(r / block_n + 1) * sc];
        for (c, &b) in data[r * cols..(r + 1) * cols].iter().enumerate() {
            out.push(lut[b as usize] * srow[c / block_k]);
        }
    }
    out
}

/// MXFP4 in the MiMo layout: `blocks` U8 `[rows, cols/2]` (low nibble = even element), `scales`
/// U8 `[rows, cols/32]` (E8M0). `cols` must be a multiple of 32.
pub fn dequant_mxfp4(blocks: &[u8], scales: &[u8], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(rows * cols);
    let per_row_bytes = cols / 2;
    let per_row_scales = cols / MXFP4_BLOCK;
    for r in 0..rows {
        let row = &blocks[r * per_row_bytes..(r + 1) * per_row_bytes];
        let srow = &scales[r * per_row_scales..(r + 1) * per_row_scales];
        for (i, &b) in row.iter().enumerate() {
            let s = e8m0_to_f32(srow[(2 * i) / MXFP4_BLOCK]);
            out.push(E2M1_VALUES[(b & 0x0f) as usize] * s);
            out.push(E2M1_VALUES[(b >> 4) as usize] * s);
        }
    }
    out
}

/// gpt-oss layout: `blocks` U8 `[.., rows, cols/32, 16]` and `scales` U8 `[.., rows, cols/32]`
/// is the MiMo layout with the last two block dims flattened. Scales follow HF's
/// `convert_moe_packed_tensors` exactly (`ldexp(v, s - 127)`): 0xFF means 2^128, so zeros stay
/// zero, 0.5 becomes 2^127 and larger values overflow to inf — not the OCP NaN of [`dequant_mxfp4`].
pub fn dequant_mxfp4_gpt_oss(blocks: &[u8], scales: &[u8], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(rows * cols);
    for (i, &b) in blocks[..rows * cols / 2].iter().enumerate() {
        let sb = scales[(2 * i) / MXFP4_BLOCK];
        // 2^128 is not an f32: scale by 2^127 then by 2, both exact or overflowing like ldexp.
        let ldexp = |v: f32| if sb == 0xff { v * 2f32.powi(127) * 2.0 } else { v * e8m0_to_f32(sb) };
        out.push(ldexp(E2M1_VALUES[(b & 0x0f) as usize]));
        out.push(ldexp(E2M1_VALUES[(b >> 4) as usize]));
    }
    out
}

/// Quantises one row-major f32 matrix to MXFP4 (scale = floor(log2(amax)) - 2, nearest E2M1,
/// ties to even code) — used by tests and tools, not on the serving path.
pub fn quantize_mxfp4(w: &[f32], rows: usize, cols: usize) -> (Vec<u8>, Vec<u8>) {
    let mut blocks = vec![0u8; rows * cols / 2];
    let mut scales = vec![0u8; rows * cols / MXFP4_BLOCK];
    for r in 0..rows {
        for g in 0..cols / MXFP4_BLOCK {
            let chunk = &w[r * cols + g * MXFP4_BLOCK..r * cols + (g + 1) * MXFP4_BLOCK];
            let amax = chunk.iter().fold(0f32, |m, x| m.max(x.abs()));
            let e = if amax > 0.0 { amax.log2().floor() as i32 - 2 } else { -127 };
            let e = e.clamp(-127, 127);
            scales[r * cols / MXFP4_BLOCK + g] = (e + 127) as u8;
            let s = e8m0_to_f32((e + 127) as u8);
            for (j, &x) in chunk.iter().enumerate() {
                let v = x / s;
                let mut best = 0usize;
                for (code, &q) in E2M1_VALUES.iter().enumerate().take(8) {
                    if (v.abs() - q).abs() < (v.abs() - E2M1_VALUES[best]).abs() {
                        best = code;
                    }
                }
                let code = best as u8 | if v < 0.0 && best != 0 { 8 } else { 0 };
                let idx = r * cols + g * MXFP4_BLOCK + j;
                if idx.is_multiple_of(2) {
                    blocks[idx / 2] |= code;
                } else {
                    blocks[idx / 2] |= code << 4;
                }
            }
        }
    }
    (blocks, scales)
}
