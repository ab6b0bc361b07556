//! The KV cache's pools on the GPU: one K and one V buffer per layer, in the element type the
//! model was given (`KvDtype`, `Backend::set_kv_dtype`). ops.cu reads and writes them through
//! `kv_t`, compiled once per type (`-DKV_BF16` for BF16 pools, `-DKV_FP8` for FP8: `CudaModel::use_kv_dtype`).

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream};
use peregrine_core::{KvDtype, Result};

use crate::backend::drv;
use crate::launch::KernelArg;

/// One layer's K or V pool: `len` elements of the cache's type.
pub(crate) enum KvPool {
    F32(CudaSlice<f32>),
    /// BF16 bits.
    Bf16(CudaSlice<u16>),
    /// FP8 e4m3 bytes.
    Fp8(CudaSlice<u8>),
}

impl KvPool {
    /// `n` zeros of type `dtype`.
    pub(crate) fn zeros(st: &Arc<CudaStream>, dtype: KvDtype, n: usize) -> Result<KvPool> {
        Ok(match dtype {
            KvDtype::F32 => KvPool::F32(st.alloc_zeros::<f32>(n.max(1)).map_err(drv)?),
            KvDtype::Bf16 => KvPool::Bf16(st.alloc_zeros::<u16>(n.max(1)).map_err(drv)?),
            KvDtype::Fp8E4m3 => KvPool::Fp8(st.alloc_zeros::<u8>(n.max(1)).map_err(drv)?),
        })
    }

    /// `values` rounded to `dtype` (`KvDtype::round`), on the device: for tests.
    #[cfg(test)]
    pub(crate) fn upload(st: &Arc<CudaStream>, dtype: KvDtype, values: &[f32]) -> Result<KvPool> {
        Ok(match dtype {
            KvDtype::F32 => KvPool::F32(st.clone_htod(values).map_err(drv)?),
            KvDtype::Bf16 => {
                let bits: Vec<u16> = values.iter().map(|&v| half::bf16::from_f32(v).to_bits()).collect();
                KvPool::Bf16(st.clone_htod(&bits).map_err(drv)?)
            }
            KvDtype::Fp8E4m3 => {
                let bytes: Vec<u8> = values.iter().map(|&v| fp8_e4m3_code(KvDtype::Fp8E4m3.round(v))).collect();
                KvPool::Fp8(st.clone_htod(&bytes).map_err(drv)?)
            }
        })
    }

    /// Every element, widened to f32 (exactly): for tests.
    #[cfg(test)]
    pub(crate) fn download(&self, st: &Arc<CudaStream>) -> Result<Vec<f32>> {
        Ok(match self {
            KvPool::F32(s) => st.clone_dtoh(s).map_err(drv)?,
            KvPool::Bf16(s) => st.clone_dtoh(s).map_err(drv)?.into_iter().map(|b| f32::from_bits((b as u32) << 16)).collect(),
            KvPool::Fp8(s) => st.clone_dtoh(s).map_err(drv)?.into_iter().map(peregrine_model::formats::fp8_e4m3_to_f32).collect(),
        })
    }
}

/// The e4m3 byte holding `v`, a value FP8 pools hold (`KvDtype::round`'s result): for tests.
#[cfg(test)]
fn fp8_e4m3_code(v: f32) -> u8 {
    if v.is_nan() {
        return 0x7f;
    }
    let code = (0u8..0x7f).find(|&c| peregrine_model::formats::fp8_e4m3_to_f32(c) == v.abs()).expect("an e4m3 value");
    code | if v.is_sign_negative() { 0x80 } else { 0 }
}

impl KernelArg for KvPool {
    fn word(&self, stream: &CudaStream) -> u64 {
        match self {
            KvPool::F32(s) => s.word(stream),
            KvPool::Bf16(s) => s.word(stream),
            KvPool::Fp8(s) => s.word(stream),
        }
    }
}
