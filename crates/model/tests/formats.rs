//! Decoders against fixtures written by tools/formats_reference.py (torch casts and HF
//! transformers' MXFP4 dequantisation), compared bit for bit.

use std::path::PathBuf;

use peregrine_model::checkpoint::Checkpoint;
use peregrine_model::formats::*;

fn fixture(name: &str) -> Checkpoint {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/formats").join(name);
    Checkpoint::open(&p).unwrap()
}

fn f32s(ck: &Checkpoint, name: &str) -> Vec<f32> {
    f32_from_le(ck.get(name).unwrap().data)
}

/// Bit equality, except that any NaN matches any NaN (payloads are not part of the contract).
fn assert_bits(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let ok = if w.is_nan() { g.is_nan() } else { g.to_bits() == w.to_bits() };
        assert!(ok, "{what}[{i}]: got {g:e} ({:#010x}), want {w:e} ({:#010x})", g.to_bits(), w.to_bits());
    }
}

#[test]
fn bf16_and_f16_every_bit_pattern() {
    let ck = fixture("float16.safetensors");
    let bits = ck.get("bf16_bits").unwrap().data;
    assert_eq!(bits.len(), 65536 * 2);
    assert_bits(&bf16_to_f32(bits), &f32s(&ck, "bf16_expected"), "bf16");
    assert_bits(&f16_to_f32(bits), &f32s(&ck, "f16_expected"), "f16");
}

#[test]
fn fp8_e4m3_every_code() {
    let ck = fixture("fp8.safetensors");
    let codes = ck.get("codes").unwrap().data;
    let got: Vec<f32> = codes.iter().map(|&c| fp8_e4m3_to_f32(c)).collect();
    let want = f32s(&ck, "codes_expected");
    assert_bits(&got, &want, "fp8");
    assert_eq!(want.iter().filter(|x| x.is_nan()).count(), 2, "e4m3fn has exactly two NaN codes");
}

#[test]
fn fp8_block_dequant_with_partial_edge_blocks() {
    let ck = fixture("fp8.safetensors");
    let w = ck.get("block_weight").unwrap();
    assert_eq!(w.shape, [200, 300]);
    let s = ck.get("block_scale_inv").unwrap();
    assert_eq!(s.shape, [2, 3]);
    let got = dequant_fp8_block(w.data, &f32_from_le(s.data), 200, 300, 128, 128);
    assert_bits(&got, &f32s(&ck, "block_expected"), "fp8 block");
}

#[test]
fn mxfp4_mimo_layout_matches_hf_with_nan_for_ff() {
    let ck = fixture("mxfp4_mimo.safetensors");
    let b = ck.get("mimo_blocks").unwrap();
    let s = ck.get("mimo_scales").unwrap();
    let (rows, cols) = (b.shape[0], b.shape[1] * 2);
    let got = dequant_mxfp4(b.data, s.data, rows, cols);
    let want = f32s(&ck, "mimo_expected");
    assert!(want.iter().any(|x| x.is_nan()), "fixture covers scale 0xFF");
    assert!(want.iter().any(|&x| x != 0.0 && x.abs() < f32::MIN_POSITIVE), "fixture covers subnormal results");
    assert_bits(&got, &want, "mxfp4 mimo");
}

#[test]
fn mxfp4_gpt_oss_layout_matches_hf_convert_moe_packed_tensors() {
    let ck = fixture("mxfp4_gpt_oss.safetensors");
    let b = ck.get("gpt_oss_blocks").unwrap();
    let s = ck.get("gpt_oss_scales").unwrap();
    let (e, n, k) = (b.shape[0], b.shape[1], b.shape[2] * 32);
    // HF returns [E, K, N] (transposed for gpt-oss's `x @ W`); we decode [N, K] per expert.
    let want_ekn = f32s(&ck, "gpt_oss_expected_ekn");
    for ex in 0..e {
        let got = dequant_mxfp4_gpt_oss(
            &b.data[ex * n * k / 2..(ex + 1) * n * k / 2],
            &s.data[ex * n * k / 32..(ex + 1) * n * k / 32],
            n,
            k,
        );
        let want: Vec<f32> =
            (0..n).flat_map(|r| (0..k).map(move |c| (r, c))).map(|(r, c)| want_ekn[ex * k * n + c * n + r]).collect();
        assert_bits(&got, &want, &format!("gpt-oss expert {ex}"));
    }
}

#[test]
fn e2m1_table_and_e8m0_extremes() {
    assert_eq!(E2M1_VALUES[7], 6.0);
    assert_eq!(E2M1_VALUES[15], -6.0);
    assert_eq!(e8m0_to_f32(127), 1.0);
    assert_eq!(e8m0_to_f32(0), 2f32.powi(-127));
    assert_eq!(e8m0_to_f32(254), 2f32.powi(127));
    assert!(e8m0_to_f32(255).is_nan());
}

#[test]
fn mxfp4_quantize_round_trips_representable_values() {
    // Values already on the E2M1 grid times a power of two survive quantisation exactly.
    let rows = 3;
    let cols = 64;
    let w: Vec<f32> = (0..rows * cols).map(|i| E2M1_VALUES[(i * 7) % 16] * 2f32.powi((i / 32) as i32 - 2)).collect();
    let (b, s) = quantize_mxfp4(&w, rows, cols);
    let back = dequant_mxfp4(&b, &s, rows, cols);
    for (x, y) in w.iter().zip(&back) {
        assert_eq!(x.abs(), y.abs(), "{w:?}");
    }
}
