//! The tensor-core tile layout of FP8 and BF16 weight matrices: how every matrix the tensor-core
//! GEMVs and GEMMs of `kernels/gemv.cu` read lies on the GPU (those with K % 128 == 0; others
//! stay row-major for the CUDA-core kernels).
//!
//! The kernels give a lane of a warp (g = lane / 4, q = lane % 4) rows g and g + 8 of a 16-row
//! tile and 16 k of each 64-k chunk: FP8 bytes 16q .. 16q + 15 of each row (one 16-byte load a
//! row), BF16 the 32 bytes 32q .. 32q + 31 (two). Row-major, each warp load then read 8 rows x
//! 64 bytes (FP8) or 8 rows x four 16-byte pieces 32 apart (BF16), the rows K apart; here the
//! tile's chunk is `chunk_bytes` contiguous bytes in which
//! warp load i of lane l is the 16 bytes at 512 i + 16 l: FP8 load 0 row g, load 1 row g + 8;
//! BF16 loads 0, 1 row g's two pieces, 2, 3 row g + 8's. The lanes' registers hold what they
//! held row-major, so the arithmetic and its bits are the same. Chunks follow each other along
//! K, tiles along N; rows are padded with zeros to whole tiles (`padded_rows`), so a stacked
//! matrix (`stack_rows`) may only end a part inside a tile if it is the last.
//! On an H200 the GEMVs alone read 3-11 points more of copy bandwidth and decode steps ran
//! 0.6-2.2% faster (benches/results/2026-11-29-h200-tc-tile-layout.md).

/// Whether an FP8 or BF16 matrix of `k` columns runs on the tensor-core kernels and so is stored
/// tiled.
pub fn tiled(k: usize) -> bool {
    k.is_multiple_of(128)
}

/// Rows of a tiled matrix of `n` rows: whole 16-row tiles.
pub fn padded_rows(n: usize) -> usize {
    n.div_ceil(16) * 16
}

/// Bytes of one tile's 64-k chunk for elements of `esize` bytes (1: FP8, 2: BF16).
pub fn chunk_bytes(esize: usize) -> usize {
    16 * 64 * esize
}

/// Where the 16-byte unit holding columns 16 p / esize .. of row rr (< 16) of a 64-k chunk lies
/// in that tile chunk, in units.
fn unit_in_chunk(rr: usize, p: usize, esize: usize) -> usize {
    let per_lane = esize; // a lane's units of a row's chunk: 1 (FP8) or 2 (BF16)
    let (g, hi, q, sub) = (rr % 8, rr / 8, p / per_lane, p % per_lane);
    (hi * per_lane + sub) * 32 + 4 * g + q
}

/// A row-major [n, k] matrix of FP8 bytes or BF16 bits as the GPU kernels read it: tiled where
/// the tensor-core kernels run it (`tiled(k)`), else as it is (the CUDA-core kernels').
pub fn laid_out<T: Copy + Default + Send + Sync>(rows: Vec<T>, n: usize, k: usize) -> Vec<T> {
    if tiled(k) { tile(&rows, n, k) } else { rows }
}

/// A row-major [n, k] matrix of FP8 bytes (`u8`) or BF16 bits (`u16`) in the tiled layout,
/// `padded_rows(n) * k` elements (the padding zero). k % 64 == 0. Tiles in parallel.
pub fn tile<T: Copy + Default + Send + Sync>(rows: &[T], n: usize, k: usize) -> Vec<T> {
    use rayon::prelude::*;
    let esize = std::mem::size_of::<T>();
    assert!(esize == 1 || esize == 2, "tc_tiles: FP8 or BF16 elements only");
    assert!(k.is_multiple_of(64) && rows.len() == n * k, "tc_tiles: a [{n}, {k}] matrix needs k % 64 == 0 and {} elements, got {}", n * k, rows.len());
    let (per_unit, units_per_row, chunk) = (16 / esize, 4 * esize, chunk_bytes(esize) / esize);
    let mut out = vec![T::default(); padded_rows(n) * k];
    out.par_chunks_mut(16 * k).enumerate().for_each(|(t, tile_out)| {
        for rr in 0..16.min(n.saturating_sub(16 * t)) {
            let row = &rows[(16 * t + rr) * k..(16 * t + rr + 1) * k];
            for c in 0..k / 64 {
                for p in 0..units_per_row {
                    let dst = c * chunk + unit_in_chunk(rr, p, esize) * per_unit;
                    let src = c * 64 + p * per_unit;
                    tile_out[dst..dst + per_unit].copy_from_slice(&row[src..src + per_unit]);
                }
            }
        }
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a lane's warp load reads from a tile's chunk, as (row, first column) of the 16 bytes
    /// the kernel expects there: FP8 load 0 / 1 rows g / g + 8 at 16 q; BF16 loads 0-3 rows g, g,
    /// g + 8, g + 8 at 16 q, 16 q + 8, 16 q, 16 q + 8.
    fn expected(lane: usize, load: usize, esize: usize) -> (usize, usize) {
        let (g, q) = (lane / 4, lane % 4);
        if esize == 1 {
            (g + 8 * load, 16 * q)
        } else {
            (g + 8 * (load / 2), 16 * q + 8 * (load % 2))
        }
    }

    /// Every element lands once, and each lane's warp loads find the rows and columns the
    /// kernels' fragments take, for both element sizes, over several tiles and chunks, with a
    /// partial last tile padded with zeros.
    #[test]
    fn warp_loads_find_the_fragments_of_the_row_major_matrix() {
        for esize in [1usize, 2] {
            let (n, k) = (37usize, 192usize);
            let rows: Vec<u16> = (0..n * k).map(|i| (i % 65_521 + 1) as u16).collect();
            let out = if esize == 2 {
                tile(&rows, n, k)
            } else {
                let bytes: Vec<u8> = rows.iter().map(|&v| (v % 251 + 1) as u8).collect();
                tile(&bytes, n, k).into_iter().map(u16::from).collect()
            };
            let src = |r: usize, c: usize| if esize == 2 { rows[r * k + c] } else { rows[r * k + c] % 251 + 1 };
            assert_eq!(out.len(), padded_rows(n) * k);
            let per_unit = 16 / esize;
            for tile_i in 0..padded_rows(n) / 16 {
                for chunk in 0..k / 64 {
                    let base = (tile_i * (k / 64) + chunk) * chunk_bytes(esize) / esize;
                    for load in 0..2 * esize {
                        for lane in 0..32 {
                            let (row, col) = expected(lane, load, esize);
                            let (r, c0) = (tile_i * 16 + row, chunk * 64 + col);
                            for e in 0..per_unit {
                                let got = out[base + (load * 512 + lane * 16) / esize + e];
                                let want = if r < n { src(r, c0 + e) } else { 0 };
                                assert_eq!(got, want, "esize {esize}: tile {tile_i} chunk {chunk} load {load} lane {lane} element {e}");
                            }
                        }
                    }
                }
            }
        }
    }
}
