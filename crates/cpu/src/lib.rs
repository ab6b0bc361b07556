//! The CPU reference backend: plain, exact f32 math for every layer, read from `ModelSpec`.
