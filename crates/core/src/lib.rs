//! Shared types of Peregrine. Every other crate depends on this one and on nothing above it.
//!
//! - [`spec`]: `ModelSpec`, the one per-layer description of a model that loaders produce and
//!   backends read;
//! - [`draft`]: `DraftSpec`, the shape of a DFlash block drafter;
//! - [`dtype`]: element types and the storage formats weights keep (BF16, FP8 block, MXFP4);
//! - [`sampling`]: the sampling parameters of one request;
//! - [`error`]: the error type shared by the loaders and backends;
//! - [`cache`]: where compiled kernels and the unpacked embedded model are kept.

pub mod backend;
pub mod cache;
pub mod draft;
pub mod dtype;
pub mod error;
pub mod sampling;
pub mod spec;

pub use draft::{DraftLayerSpec, DraftSpec};
pub use dtype::{DType, KvDtype, QuantFormat};
pub use error::{Error, Result};
pub use sampling::{Guide, SamplingParams};
pub use spec::{
    AttentionKind, AttentionSpec, LayerSpec, MlpSpec, ModelSpec, MoeSpec, QkvLayout, RopeSpec,
    RouterScoring,
};
