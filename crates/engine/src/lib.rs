//! The serving core: one engine thread runs continuous batching over a backend.

pub mod api;
pub use api::*;
