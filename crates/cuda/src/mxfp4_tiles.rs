//! The tiled MXFP4 layout of the MoE decode kernels in `kernels/moe.cu`, written at load time
//! from the stored row-major layout (codes `[rows, K/2]`, low nibble = even column; E8M0 scales
//! `[rows, K/32]`). Still 4.25 bits per weight; only the order of the bits changes:
//!
//! `[rows/16 tiles][K/64 steps]` of `TILE_STEP_BYTES`: a step's 512 bytes of codes, then its 32
//! of scales, so a run of a tile's steps is one contiguous copy for the kernels' rings (with the
//! scales in an array of their own every stage took two bulk copies, which cost plain reads ~1
//! point of copy bandwidth on the H100).
//!
//! - codes `[32 lanes][4 words][4 bytes]`: lane `4g + t`, word `s`
//!   holds the A fragment of the step's MMA `s` (m16n8k16: rows `g`, `g + 8`; columns
//!   `16s + 2t + {0, 1}` and `+ {8, 9}`). Byte `j` of the word holds the codes of rows `g` and
//!   `g + 8` at column `16s + 2t + (j & 1) + 8 (j >> 1)`: row `g`'s in bits 7 (sign) and 4..2
//!   (e1 e0 m), which is the e4m3 encoding of its value times 2^-6; row `g + 8`'s in bits 5
//!   (sign), 6 (e1), 1 (e0), 0 (m), which the kernel moves there with two shifts. So one mask
//!   gives row `g`'s four values of the word as e4m3 bytes, two shifts and masks row `g + 8`'s:
//!   each is one register of an FP8 warpgroup MMA's A fragment as it is (m64n8k32: a warp's row
//!   `g` at four k), and two F16 pairs of the F16 MMA's (kernels/moe.cu's `tile_decode`).
//! - scales `[8 g][4]`: rows `(g, 2j)`, `(g, 2j + 1)`, `(g + 8, 2j)`,
//!   `(g + 8, 2j + 1)` of step `j`'s two 32-blocks.
//!
//! Gate and up projections are interleaved tile by tile (gate rows `8r..8r + 8`, then up rows
//! `8r..8r + 8`), so the kernel fuses SiLU(gate) * up in registers.

/// Rows per tile, columns per step, bytes of a tile step (512 of codes, 32 of scales;
/// STEP_BYTES in kernels/common.cuh).
pub const TILE_ROWS: usize = 16;
pub const STEP_COLS: usize = 64;
pub const TILE_STEP_BYTES: usize = 544;

/// Whether a matrix of `rows` x `cols` can be tiled.
pub fn tileable(rows: usize, cols: usize) -> bool {
    rows > 0 && cols > 0 && rows.is_multiple_of(TILE_ROWS) && cols.is_multiple_of(STEP_COLS)
}

/// The e4m3 placement of E2M1 code `c` (bit 3 = sign): bits 7 and 4..2.
fn place_first(c: u8) -> u8 {
    ((c & 8) << 4) | ((c & 7) << 2)
}

/// The second code of a byte: sign in bit 5, e1 in bit 6, e0 and m in bits 1 and 0.
fn place_second(c: u8) -> u8 {
    ((c & 8) << 2) | ((c & 4) << 4) | (c & 3)
}

/// A row-major MXFP4 matrix by reference: `codes` [rows, cols/2], `scales` [rows, cols/32].
#[derive(Clone, Copy)]
pub struct RowMajor<'a> {
    pub codes: &'a [u8],
    pub scales: &'a [u8],
    pub cols: usize,
}

impl RowMajor<'_> {
    fn code(&self, row: usize, col: usize) -> u8 {
        let b = self.codes[row * self.cols / 2 + col / 2];
        if col.is_multiple_of(2) {
            b & 15
        } else {
            b >> 4
        }
    }
    fn scale(&self, row: usize, block: usize) -> u8 {
        self.scales[row * self.cols / 32 + block]
    }
}

/// Tiles a matrix whose row `r` is `row(r)` (a source matrix and its row there), `rows` x
/// `cols` (`tileable`), in the tiled layout, appended to `out`.
fn tile_rows<'a>(rows: usize, cols: usize, row: impl Fn(usize) -> (RowMajor<'a>, usize), out: &mut Vec<u8>) {
    assert!(tileable(rows, cols), "{rows}x{cols} is not tileable");
    let steps = cols / STEP_COLS;
    out.reserve(rows * cols / 2 + rows * cols / 32);
    for tile in 0..rows / TILE_ROWS {
        let src: Vec<(RowMajor, usize)> = (0..TILE_ROWS).map(|i| row(tile * TILE_ROWS + i)).collect();
        for step in 0..steps {
            for lane in 0..32 {
                let (g, t) = (lane / 4, lane % 4);
                for s in 0..4 {
                    for j in 0..4 {
                        let ((m, r), (m8, r8)) = (src[g], src[g + 8]);
                        let col = step * STEP_COLS + 16 * s + 2 * t + (j & 1) + 8 * (j >> 1);
                        out.push(place_first(m.code(r, col)) | place_second(m8.code(r8, col)));
                    }
                }
            }
            for g in 0..8 {
                for (i, blk) in [(g, 0), (g, 1), (g + 8, 0), (g + 8, 1)] {
                    let (m, r) = src[i];
                    out.push(m.scale(r, 2 * step + blk));
                }
            }
        }
    }
    debug_assert_eq!(out.len() % TILE_STEP_BYTES, 0);
}

/// Bytes of a tiled matrix of `rows` x `cols` (codes and scales).
pub fn tiled_bytes(rows: usize, cols: usize) -> usize {
    rows / TILE_ROWS * (cols / STEP_COLS) * TILE_STEP_BYTES
}

/// One matrix (a down projection, `rows` = hidden) in the tiled layout, appended.
pub fn tile_matrix(m: RowMajor<'_>, rows: usize, out: &mut Vec<u8>) {
    tile_rows(rows, m.cols, |r| (m, r), out);
}

/// Gate and up (`inter` rows each) interleaved per tile, appended.
pub fn tile_gate_up(gate: RowMajor<'_>, up: RowMajor<'_>, inter: usize, out: &mut Vec<u8>) {
    assert!(inter.is_multiple_of(8) && gate.cols == up.cols, "gate/up of {inter} rows cannot be interleaved");
    tile_rows(2 * inter, gate.cols, |r| if r % 16 < 8 { (gate, 8 * (r / 16) + r % 16) } else { (up, 8 * (r / 16) + r % 16 - 8) }, out);
}

/// One expert in the tiled layout: [gate/up, down].
pub fn tile_expert(gate: RowMajor<'_>, up: RowMajor<'_>, down: RowMajor<'_>, inter: usize, hidden: usize) -> [Vec<u8>; 2] {
    let (mut gu, mut d) = (Vec::new(), Vec::new());
    tile_gate_up(gate, up, inter, &mut gu);
    tile_matrix(down, hidden, &mut d);
    [gu, d]
}

/// The largest K the tiled kernels stage: K * 16 bytes of shared memory at 4 pairs per pass,
/// plus 8 warps' rings (35 KB), within `kernels::TILED_MAX_SMEM` (200 KB).
pub const MAX_TILED_K: usize = 10 * 1024;

/// Whether an expert stack of hidden size `hidden` and expert intermediate `inter` can use the
/// tiled kernels.
pub fn moe_tileable(hidden: usize, inter: usize) -> bool {
    tileable(2 * inter, hidden) && inter.is_multiple_of(8) && tileable(hidden, inter) && hidden.max(inter) <= MAX_TILED_K
}

#[cfg(test)]
mod tests {
    use super::*;
    use peregrine_model::formats::dequant_mxfp4;

    /// The kernel's decode of one word (moe.cu `tile_decode`), emulated: the four f16 pairs'
    /// values as f32, each the code's value times 2^-6 (via the e4m3 bytes).
    fn decode_word(w: u32) -> [f32; 8] {
        let ea = w & 0x9C9C_9C9C;
        let eb = ((w << 2) & 0x8C8C_8C8C) | ((w >> 2) & 0x1010_1010);
        let e4m3 = |b: u32| peregrine_model::formats::fp8_e4m3_to_f32((b & 0xff) as u8);
        [e4m3(ea), e4m3(ea >> 8), e4m3(ea >> 16), e4m3(ea >> 24), e4m3(eb), e4m3(eb >> 8), e4m3(eb >> 16), e4m3(eb >> 24)]
    }

    fn random_bytes(n: usize, seed: u64) -> Vec<u8> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
                (s >> 33) as u8
            })
            .collect()
    }

    /// Reads element (row, col) of a tiled matrix the way the kernel does: the lane's word,
    /// the decoded value, the step's scale.
    fn tiled_value(tiled: &[u8], cols: usize, row: usize, col: usize) -> f32 {
        let (tile, r) = (row / 16, row % 16);
        let (step, c) = (col / 64, col % 64);
        let (s, rest) = (c / 16, c % 16);
        let (hi8, t, odd) = (rest >= 8, (rest % 8) / 2, rest % 2);
        let (g, lower) = (r % 8, r >= 8);
        let lane = 4 * g + t;
        let at = (tile * (cols / 64) + step) * TILE_STEP_BYTES;
        let base = at + lane * 16 + 4 * s;
        let w = u32::from_le_bytes(tiled[base..base + 4].try_into().unwrap());
        // The first codes (E_A) are row g's, the second (E_B) row g + 8's; byte 2 (hi8) + odd.
        let v = decode_word(w);
        let idx = if lower { 4 } else { 0 } + if hi8 { 2 } else { 0 } + odd;
        let sb = at + 512 + g * 4 + if lower { 2 } else { 0 } + (c / 32);
        let scale = 2f32.powi(tiled[sb] as i32 - 127);
        v[idx] * 64.0 * scale
    }

    #[test]
    fn the_decode_is_exact_for_every_pair_of_codes() {
        let e2m1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0];
        let val = |c: u8| if c & 8 != 0 { -e2m1[(c & 7) as usize] } else { e2m1[(c & 7) as usize] };
        for a in 0..16u8 {
            for b in 0..16u8 {
                let byte = place_first(a) | place_second(b);
                let w = u32::from(byte) * 0x0101_0101;
                let v = decode_word(w);
                for k in 0..4 {
                    assert_eq!(v[k] * 64.0, val(a), "first code {a} in byte {byte:#04x}");
                    assert_eq!(v[4 + k] * 64.0, val(b), "second code {b} in byte {byte:#04x}");
                }
            }
        }
    }

    #[test]
    fn tiling_moves_every_weight_and_scale_where_the_kernel_reads_it() {
        for (rows, cols) in [(16usize, 64usize), (48, 320), (32, 576)] {
            let codes = random_bytes(rows * cols / 2, rows as u64);
            let scales: Vec<u8> = random_bytes(rows * cols / 32, cols as u64).iter().map(|b| 110 + b % 30).collect();
            let mut tiled = Vec::new();
            tile_matrix(RowMajor { codes: &codes, scales: &scales, cols }, rows, &mut tiled);
            assert_eq!(tiled.len(), codes.len() + scales.len());
            assert_eq!(tiled.len(), tiled_bytes(rows, cols));
            let want = dequant_mxfp4(&codes, &scales, rows, cols);
            for r in 0..rows {
                for c in 0..cols {
                    assert_eq!(tiled_value(&tiled, cols, r, c), want[r * cols + c], "{rows}x{cols} at ({r}, {c})");
                }
            }
        }
    }

    #[test]
    fn gate_and_up_interleave_by_tile() {
        let (inter, hidden) = (24usize, 128usize);
        let gate = random_bytes(inter * hidden / 2, 1);
        let up = random_bytes(inter * hidden / 2, 2);
        let gs: Vec<u8> = random_bytes(inter * hidden / 32, 3).iter().map(|b| 120 + b % 8).collect();
        let us: Vec<u8> = random_bytes(inter * hidden / 32, 4).iter().map(|b| 120 + b % 8).collect();
        let mut tiled = Vec::new();
        let m = |c, s| RowMajor { codes: c, scales: s, cols: hidden };
        tile_gate_up(m(&gate, &gs), m(&up, &us), inter, &mut tiled);
        assert_eq!(tiled.len(), tiled_bytes(2 * inter, hidden));
        let (wg, wu) = (dequant_mxfp4(&gate, &gs, inter, hidden), dequant_mxfp4(&up, &us, inter, hidden));
        for i in 0..inter {
            let (gr, ur) = (16 * (i / 8) + i % 8, 16 * (i / 8) + i % 8 + 8);
            for c in 0..hidden {
                assert_eq!(tiled_value(&tiled, hidden, gr, c), wg[i * hidden + c], "gate row {i} col {c}");
                assert_eq!(tiled_value(&tiled, hidden, ur, c), wu[i * hidden + c], "up row {i} col {c}");
            }
        }
        assert!(moe_tileable(256, 256) && moe_tileable(4096, 2048) && !moe_tileable(64, 32) && !moe_tileable(160, 96));
    }
}

