//! Finding the GPU. `CudaContext::new` panics when the driver library is missing, so the driver
//! is probed first and every failure becomes an error that says what to do.

use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaStream};
use peregrine_core::{Error, Result};

/// One GPU with its context and the stream kernels run on.
pub struct Gpu {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    pub name: String,
    /// Compute capability (major, minor).
    pub capability: (i32, i32),
    pub total_memory: usize,
}

/// The NVRTC architecture for a compute capability: the arch-specific `sm_90a` on Hopper (for
/// wgmma/setmaxnreg), otherwise the plain `sm_XY`.
pub fn nvrtc_arch(cap: (i32, i32)) -> &'static str {
    match cap {
        (9, 0) => "sm_90a",
        (10, 0) => "sm_100a",
        (8, 9) => "sm_89",
        (8, 6) => "sm_86",
        (8, 0) => "sm_80",
        (12, 0) => "sm_120",
        _ => "sm_80",
    }
}

/// Opens GPU `ordinal`, or explains why it cannot.
pub fn probe(ordinal: usize) -> Result<Gpu> {
    // SAFETY: only tries to dlopen libcuda.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err(Error::Backend(
            "no NVIDIA driver found (libcuda.so could not be loaded); run with `--device cpu`".into(),
        ));
    }
    let count = CudaContext::device_count()
        .map_err(|e| Error::Backend(format!("the NVIDIA driver reports an error ({e}); run with `--device cpu`")))?;
    if ordinal >= count.max(0) as usize {
        return Err(Error::Backend(format!("GPU {ordinal} requested but {count} found; run with `--device cpu`")));
    }
    let ctx = CudaContext::new(ordinal).map_err(|e| Error::Backend(format!("cannot open GPU {ordinal}: {e}")))?;
    let err = |e: cudarc::driver::DriverError| Error::Backend(format!("GPU {ordinal}: {e}"));
    let name = ctx.name().map_err(err)?;
    let capability = ctx.compute_capability().map_err(err)?;
    let total_memory = ctx.total_mem().map_err(err)?;
    // One stream does all the work, so cudarc's cross-stream event tracking is only overhead
    // (and would record events inside CUDA-graph captures); a created stream, not the legacy
    // default one, because graphs cannot be captured on the legacy stream.
    // SAFETY: nothing is allocated yet, and every later allocation and launch uses `stream`.
    unsafe { ctx.disable_event_tracking() };
    let stream = ctx.new_stream().map_err(err)?;
    Ok(Gpu { ctx, stream, name, capability, total_memory })
}
