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
/// `kv_store`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvDtype {
    /// f32, as the projections compute them.
    F32,
    /// BF16, rounded to nearest even: half the bytes, the checkpoints' own precision.
    Bf16,
}

impl KvDtype {
    /// Bytes of one element.
    pub fn size(self) -> usize {
        match self {
            KvDtype::F32 => 4,
            KvDtype::Bf16 => 2,
        }
    }

    /// The name `--kv-cache-dtype` takes and logs print.
    pub fn name(self) -> &'static str {
        match self {
            KvDtype::F32 => "float32",
            KvDtype::Bf16 => "bfloat16",
        }
    }

    /// `x` as the cache holds it, back in f32.
    pub fn round(self, x: f32) -> f32 {
        match self {
            KvDtype::F32 => x,
            KvDtype::Bf16 => half::bf16::from_f32(x).to_f32(),
        }
    }
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
            _ => Err(format!("unknown KV cache dtype {s:?} (expected float32 or bfloat16)")),
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
        assert!("fp8".parse::<KvDtype>().unwrap_err().contains("fp8"));
        assert_eq!((KvDtype::F32.size(), KvDtype::Bf16.size()), (4, 2));
        // 1 + 2^-8 lies halfway between bf16 neighbours 1 and 1 + 2^-7: even (1) wins.
        assert_eq!(KvDtype::Bf16.round(1.0 + 1.0 / 256.0), 1.0);
        assert_eq!(KvDtype::Bf16.round(1.0 + 3.0 / 256.0), 1.0 + 4.0 / 256.0);
        let x = 0.123_456_7_f32;
        assert_eq!(KvDtype::F32.round(x), x);
        assert!((KvDtype::Bf16.round(x) - x).abs() <= x * 2f32.powi(-8));
        assert!(KvDtype::Bf16.round(f32::NAN).is_nan());
    }
}
