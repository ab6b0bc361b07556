//! The CUDA backend (issue 6): finding the GPU without panicking, compiling the kernels of
//! `kernels/` with NVRTC for the GPU found (cached on disk by content hash), and the decode
//! kernels over weights in their stored formats — BF16, FP8 e4m3 with 128x128 block scales,
//! MXFP4 with E8M0 scales — including the MXFP4 MoE decode, whose experts are re-laid out at
//! load for it (`mxfp4_tiles`, `kernels/moe.cu`), and FP8 and BF16 matrices laid out in tiles for
//! the tensor-core GEMVs (`tc_tiles`). Every launch allows programmatic dependent
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
mod draft_staging;
mod graph;
mod shared_logits;
mod speculate;
mod staged;
pub mod step;
pub mod trace;
pub mod kernels;
mod launch;
mod kv_pool;
mod overlap;
pub mod moe_tune;
pub mod mxfp4_tiles;
pub mod tc_tiles;
mod weights;
#[cfg(test)]
mod op_tests;

pub use backend::{CudaModel, KernelSet};
pub use graph::NodeKinds;
pub use device::{gpu_count, probe, probe_for_tests, Gpu, REQUIRE_GPU_ENV};
pub use kernels::{Kernels, MoeKernel, MoeLayout, MoeRouting};

/// docs/cuda-switches.md lists every environment variable this crate reads, and nothing else.
#[cfg(test)]
mod switches_doc {
    use std::collections::BTreeSet;
    use std::path::Path;

    /// Every string literal under `dir` (a directory or one file) that is a whole variable name
    /// of this project (the crate reads variables by name); the needle is built at run time so
    /// this file does not match it.
    fn literals(dir: &Path, out: &mut BTreeSet<String>) {
        let needle = format!("\"{}_", "PEREGRINE");
        let entries: Vec<std::path::PathBuf> = match dir.is_dir() {
            true => std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect(),
            false => vec![dir.to_path_buf()],
        };
        for path in entries {
            if path.is_dir() {
                literals(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let text = std::fs::read_to_string(&path).unwrap();
                for (i, _) in text.match_indices(&needle) {
                    let name: String = text[i + 1..].chars().take_while(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == '_').collect();
                    if name.len() > needle.len() - 1 && text[i + 1 + name.len()..].starts_with('"') {
                        out.insert(name);
                    }
                }
            }
        }
    }

    #[test]
    fn every_switch_the_code_reads_is_documented_and_no_other() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut code = BTreeSet::new();
        // (The kernel cache's directory is read through peregrine_core::cache.)
        for dir in ["src", "examples", "tests", "../core/src/cache.rs"] {
            literals(&root.join(dir), &mut code);
        }
        assert!(code.contains("PEREGRINE_PDL") && code.len() > 30, "the scan found too few variables: {code:?}");
        let doc = std::fs::read_to_string(root.join("../../docs/cuda-switches.md")).unwrap();
        let documented: BTreeSet<String> = doc
            .split('`')
            .filter(|w| w.starts_with("PEREGRINE_") && w.chars().all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_'))
            .map(str::to_string)
            .collect();
        let undocumented: Vec<&String> = code.difference(&documented).collect();
        let stale: Vec<&String> = documented.difference(&code).collect();
        assert!(undocumented.is_empty(), "read by crates/cuda but missing from docs/cuda-switches.md: {undocumented:?}");
        assert!(stale.is_empty(), "in docs/cuda-switches.md but read nowhere in crates/cuda: {stale:?}");
    }
}
