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
