//! The CUDA backend (issue 6): finding the GPU without panicking, compiling the kernels of
//! `kernels/` with NVRTC for the GPU found (cached on disk by content hash), and the decode
//! kernels over weights in their stored formats — BF16, FP8 e4m3 with 128x128 block scales,
//! MXFP4 with E8M0 scales — including the MXFP4 MoE decode, whose experts are re-laid out at
//! load for it (`mxfp4_tiles`, `kernels/moe.cu`). Every launch allows programmatic dependent
//! launch (`launch`). Each kernel is checked against the CPU reference on the GPU machine
//! (`scripts/gpu-check.sh`) and benchmarked against the device's copy bandwidth
//! (`examples/bench.rs`).
//!
//! [`CudaModel`] implements the `Backend` for the whole model, correctness first (see its docs).

mod alloc;
pub mod backend;
pub mod compile;
pub mod device;
mod draft;
mod graph;
mod speculate;
pub mod step;
pub mod trace;
pub mod kernels;
mod launch;
pub mod moe_tune;
pub mod mxfp4_tiles;
mod weights;
#[cfg(test)]
mod op_tests;

pub use backend::CudaModel;
pub use graph::NodeKinds;
pub use device::{probe, probe_for_tests, Gpu, REQUIRE_GPU_ENV};
pub use kernels::{Kernels, MoeKernel, MoeLayout, MoeRouting};
