//! Everything about a model on disk: its description, its weights, its tokenizer.
//!
//! - [`config`]: HF `config.json` (`mimo_v2_flash`, `mimo_v2`, Llama-style) -> `ModelSpec`;
//! - [`formats`]: element and block decoders (BF16/F16/F32, FP8 e4m3 + block scales, MXFP4);
//! - [`checkpoint`]: safetensors through mmap, single-file and sharded;
//! - [`hub`]: `org/name` ids resolved in the local HF cache, offline;
//! - [`weights`]: [`weights::WeightSource`], tensors by canonical HF name as f32 for the CPU
//!   reference, whatever layout and format the checkpoint stores them in;
//! - [`tokenizer`], [`chat_template`]: tokenizer.json and the Jinja chat template;
//! - [`dflash`]: DFlash drafter checkpoints (config, weights, `mask_embedding.pt` through
//!   [`torch_file`], a Python-free reader of small `torch.save` files);
//! - [`synthetic`]: random weights and a stand-in tokenizer for any config.json (load tests and
//!   benchmarks without a checkpoint);
//! - [`loader`]: one entry point from a path or id to all of the above.

pub mod chat_template;
pub mod checkpoint;
pub mod config;
pub mod dflash;
pub mod formats;
pub mod gguf;
pub mod hub;
pub mod loader;
pub mod synthetic;
pub mod torch_file;
pub mod tokenizer;
pub mod weights;
