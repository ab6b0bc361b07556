//! The CPU reference backend: plain, exact f32 math for every layer, read only from `ModelSpec`.
//! It is the oracle for every other backend and serves the embedded model on any machine.

mod draft;
pub mod model;
pub mod ops;

pub use model::CpuModel;
