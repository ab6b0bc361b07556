//! Element types as stored in checkpoints, and the storage format of each weight.

use serde::{Deserialize, Serialize};

/// Element type of a stored tensor (safetensors / GGUF names map onto these).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum DType {
    F32,
    F16,
    BF16,
    /// FP8 e4m3 (finite-only "fn" variant, as torch.float8_e4m3fn).
    F8E4M3,
    U8,
    I8,
    I32,
    I64,
}

impl DType {
    /// Bytes of one element.
    pub fn size(self) -> usize {
        match self {
            DType::F32 | DType::I32 => 4,
            DType::F16 | DType::BF16 => 2,
            DType::F8E4M3 | DType::U8 | DType::I8 => 1,
            DType::I64 => 8,
        }
    }
}

/// How a (linear) weight is stored. Backends keep weights in this format; only the CPU
/// reference expands them to f32.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum QuantFormat {
    /// Plain floating point elements.
    Plain(DType),
    /// FP8 e4m3 with one f32 `weight_scale_inv` per `[block_n, block_k]` block (partial edge
    /// blocks allowed): w = fp8 * scale_inv.
    Fp8Block { block_n: usize, block_k: usize },
    /// OCP MXFP4: E2M1 codes, two per byte (low nibble = even element), one E8M0 scale byte per
    /// 32 consecutive elements along K.
    Mxfp4,
}

/// Element type of the KV cache's K and V pools (`--kv-cache-dtype`). Values are rounded to it
/// when written and read back exactly, so every backend holding the same type computes the same
/// attention inputs (BF16: `half`'s round to nearest even, NaN kept, as kernels/ops.cu's
/// `kv_store`; FP8: [`fp8_e4m3_round`], as PTX's `cvt.rn.satfinite.e4m3x2.f32`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvDtype {
    /// f32, as the projections compute them.
    F32,
    /// BF16, rounded to nearest even: half the bytes, the checkpoints' own precision.
    Bf16,
    /// FP8 e4m3 with a scale of 1 (vLLM's `fp8` where a checkpoint gives no K/V scales): a
    /// quarter of f32's bytes, 3 mantissa bits, magnitudes past 448 saturated.
    Fp8E4m3,
}

impl KvDtype {
    /// Bytes of one element.
    pub fn size(self) -> usize {
        match self {
            KvDtype::F32 => 4,
            KvDtype::Bf16 => 2,
            KvDtype::Fp8E4m3 => 1,
        }
    }

    /// The name `--kv-cache-dtype` takes and logs print.
    pub fn name(self) -> &'static str {
        match self {
            KvDtype::F32 => "float32",
            KvDtype::Bf16 => "bfloat16",
            KvDtype::Fp8E4m3 => "fp8_e4m3",
        }
    }

    /// `x` as the cache holds it, back in f32.
    pub fn round(self, x: f32) -> f32 {
        match self {
            KvDtype::F32 => x,
            KvDtype::Bf16 => half::bf16::from_f32(x).to_f32(),
            KvDtype::Fp8E4m3 => fp8_e4m3_round(x),
        }
    }
}

/// `x` rounded to FP8 e4m3fn (bias 7, 3 mantissa bits, subnormals from 2^-9, no infinities)
/// as PTX's `cvt.rn.satfinite.e4m3x2.f32` rounds it: to nearest, ties to even; magnitudes past
/// the largest finite value (448), infinities included, become +-448; NaN stays NaN.
pub fn fp8_e4m3_round(x: f32) -> f32 {
    if x.is_nan() {
        return f32::NAN;
    }
    let a = x.abs();
    // The spacing of e4m3 values around `a`: 2^-9 below the smallest normal (2^-6), else an
    // eighth of a's power of two. Dividing and multiplying by it is exact in f32.
    let exp = if a < 2f32.powi(-6) { -6 } else { ((a.to_bits() >> 23) as i32) - 127 };
    let ulp = 2f32.powi(exp - 3);
    let q = ((a / ulp).round_ties_even() * ulp).min(448.0);
    q.copysign(x)
}

impl std::fmt::Display for KvDtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for KvDtype {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "float32" | "fp32" | "f32" => Ok(KvDtype::F32),
            "bfloat16" | "bf16" => Ok(KvDtype::Bf16),
            "fp8" | "fp8_e4m3" | "float8_e4m3fn" => Ok(KvDtype::Fp8E4m3),
            "fp8_e5m2" => Err("KV cache dtype \"fp8_e5m2\" is not supported (fp8_e4m3, alias fp8, is)".to_string()),
            _ => Err(format!("unknown KV cache dtype {s:?} (expected float32, bfloat16 or fp8)")),
        }
    }
}

#[cfg(test)]
mod kv_dtype_tests {
    use super::KvDtype;

    #[test]
    fn kv_dtype_names_parse_back_and_bf16_rounds_to_nearest_even() {
        for d in [KvDtype::F32, KvDtype::Bf16] {
            assert_eq!(d.name().parse::<KvDtype>(), Ok(d));
        }
        assert_eq!("BF16".parse::<KvDtype>(), Ok(KvDtype::Bf16));
        assert_eq!("fp8".parse::<KvDtype>(), Ok(KvDtype::Fp8E4m3));
        assert!("fp8_e5m2".parse::<KvDtype>().unwrap_err().contains("not supported"));
        assert!("int8".parse::<KvDtype>().unwrap_err().contains("fp8"));
        assert_eq!((KvDtype::F32.size(), KvDtype::Bf16.size()), (4, 2));
        // 1 + 2^-8 lies halfway between bf16 neighbours 1 and 1 + 2^-7: even (1) wins.
        assert_eq!(KvDtype::Bf16.round(1.0 + 1.0 / 256.0), 1.0);
        assert_eq!(KvDtype::Bf16.round(1.0 + 3.0 / 256.0), 1.0 + 4.0 / 256.0);
        let x = 0.123_456_7_f32;
        assert_eq!(KvDtype::F32.round(x), x);
        assert!((KvDtype::Bf16.round(x) - x).abs() <= x * 2f32.powi(-8));
        assert!(KvDtype::Bf16.round(f32::NAN).is_nan());
    }

    /// Every e4m3fn code's value (positive codes 0..=0x7e; 0x7f is NaN).
    fn e4m3(code: u8) -> f32 {
        let (e, m) = ((code >> 3) as i32, (code & 7) as f32);
        if e == 0 { m / 8.0 * 2f32.powi(-6) } else { (1.0 + m / 8.0) * 2f32.powi(e - 7) }
    }

    #[test]
    fn fp8_pools_round_to_nearest_e4m3_ties_to_even_and_saturate() {
        let r = |x: f32| KvDtype::Fp8E4m3.round(x);
        assert_eq!((KvDtype::Fp8E4m3.size(), KvDtype::Fp8E4m3.name()), (1, "fp8_e4m3"));
        for c in 0..0x7eu8 {
            let (lo, hi) = (e4m3(c), e4m3(c + 1));
            // Each value is kept, and so is its negative.
            assert_eq!(r(lo).to_bits(), lo.to_bits(), "code {c:#x}");
            assert_eq!(r(-hi), -hi, "code {:#x}, negative", c + 1);
            // Halfway between neighbours, the even code wins; either side, the nearer.
            let mid = (lo + hi) / 2.0;
            assert_eq!(r(mid), if c % 2 == 0 { lo } else { hi }, "halfway {mid} between codes {c:#x} and {:#x}", c + 1);
            let step = (hi - lo) / 8.0;
            assert_eq!((r(mid - step), r(mid + step)), (lo, hi), "around {mid}");
        }
        assert_eq!(e4m3(0x7e), 448.0);
        // Past the largest value: saturated, infinities too (no inf in e4m3fn).
        for x in [449.0, 464.0, 500.0, 1e30, f32::INFINITY] {
            assert_eq!((r(x), r(-x)), (448.0, -448.0), "{x}");
        }
        // Below half the smallest subnormal (2^-9): a signed zero.
        assert_eq!(r(2f32.powi(-11)).to_bits(), 0);
        assert_eq!(r(-2f32.powi(-11)).to_bits(), (-0f32).to_bits());
        assert_eq!(r(3.0 * 2f32.powi(-11)), 2f32.powi(-9));
        assert!(r(f32::NAN).is_nan());
    }
}
