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

/// Every architecture `nvrtc_arch` gives (what `peregrine compile-kernels --arch` takes).
pub const NVRTC_ARCHES: [&str; 4] = ["sm_90a", "sm_100a", "sm_120", "compute_90"];

/// The NVRTC architecture for a GPU of compute capability `cap` that `unsupported` lets through:
/// `arch_for(cap)`, unless `PEREGRINE_KERNEL_ARCH` names one of `NVRTC_ARCHES` (for tests:
/// `compute_90` on a Hopper GPU runs the kernels as a newer GPU without sm_90a would, without
/// wgmma).
pub fn nvrtc_arch(cap: (i32, i32)) -> &'static str {
    match std::env::var("PEREGRINE_KERNEL_ARCH") {
        Ok(v) if !v.is_empty() => NVRTC_ARCHES.iter().find(|a| **a == v).copied().unwrap_or_else(|| {
            tracing::warn!("PEREGRINE_KERNEL_ARCH={v} is none of {NVRTC_ARCHES:?}; ignored");
            arch_for(cap)
        }),
        _ => arch_for(cap),
    }
}

/// The arch-specific `sm_90a` on Hopper (for wgmma), the Blackwell GPUs NVRTC 13 names, else
/// `compute_90` (PTX only, which the driver compiles for any newer GPU).
fn arch_for(cap: (i32, i32)) -> &'static str {
    match cap {
        (9, 0) => "sm_90a",
        (10, 0) => "sm_100a",
        (12, 0) => "sm_120",
        _ => "compute_90",
    }
}

/// Why the kernels cannot run on a GPU of compute capability `cap`, if they cannot: they use
/// Hopper's bulk copies, clusters and programmatic dependent launches throughout, so ptxas
/// refuses them below 9.0 (`cp.async.bulk.prefetch requires .target sm_90 or higher`).
/// Checked on Hopper only; newer GPUs compile (sm_100a, sm_120) but have not been run.
pub fn unsupported(cap: (i32, i32)) -> Option<String> {
    (cap.0 < 9).then(|| format!("has compute capability {}.{}, and the CUDA kernels need 9.0 or newer (Hopper: H100, H200)", cap.0, cap.1))
}

/// What the driver says about this machine's GPUs; `probe` and `probe_for_tests` share it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Presence {
    /// The driver loads and sees this many GPUs (at least one).
    Devices(usize),
    /// There is no GPU here at all: the driver library cannot be loaded (or is only the
    /// toolkit's stub), or the driver reports no device. The reason says what to do.
    NoGpu(String),
}

/// Loads the driver and counts the GPUs. Err: the driver loads but fails otherwise (a driver
/// and a GPU that cannot be used is a broken machine, not a machine without a GPU).
fn presence() -> Result<Presence> {
    use cudarc::driver::sys::CUresult;
    // SAFETY: only tries to dlopen libcuda.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Ok(Presence::NoGpu("no NVIDIA driver found (libcuda.so could not be loaded); run with `--device cpu`".into()));
    }
    match CudaContext::device_count() {
        Ok(n) if n > 0 => Ok(Presence::Devices(n as usize)),
        Ok(_) => Ok(Presence::NoGpu("the NVIDIA driver reports no GPU; run with `--device cpu`".into())),
        Err(e) if matches!(e.0, CUresult::CUDA_ERROR_NO_DEVICE | CUresult::CUDA_ERROR_STUB_LIBRARY) => {
            Ok(Presence::NoGpu(format!("the NVIDIA driver reports no GPU ({e}); run with `--device cpu`")))
        }
        Err(e) => Err(Error::Backend(format!("the NVIDIA driver reports an error ({e}); run with `--device cpu`"))),
    }
}

/// Opens GPU `ordinal`, or explains why it cannot.
pub fn probe(ordinal: usize) -> Result<Gpu> {
    match presence()? {
        Presence::NoGpu(why) => Err(Error::Backend(why)),
        Presence::Devices(count) => open(ordinal, count),
    }
}

/// How many GPUs the driver sees (0 without a driver, or where it fails).
pub fn gpu_count() -> usize {
    match presence() {
        Ok(Presence::Devices(n)) => n,
        _ => 0,
    }
}

/// The environment variable that makes GPU tests fail instead of skipping on a machine without
/// a GPU (scripts/gpu-check.sh sets it): any non-empty value other than "0".
pub const REQUIRE_GPU_ENV: &str = "PEREGRINE_REQUIRE_GPU";

/// What a GPU test does when it wants a GPU.
#[derive(Debug, Clone, PartialEq, Eq)]
enum TestGpu {
    /// Open the GPU; any failure to do so fails the test.
    Open,
    /// No GPU on this machine and none required: the test passes without running (the reason).
    Skip(String),
    /// The test fails with this message.
    Fail(String),
}

/// Whether the value of [`REQUIRE_GPU_ENV`] (None: unset) asks for a GPU: any non-empty value
/// other than "0".
fn gpu_required(value: Option<&str>) -> bool {
    value.is_some_and(|v| !v.is_empty() && v != "0")
}

/// The rule of [`probe_for_tests`]: a test may skip only on a machine with no GPU at all
/// (`no_gpu` holds why) and only when [`REQUIRE_GPU_ENV`] (its value `require_gpu`, None when
/// unset) does not ask for one. A machine with a GPU always opens it, so a GPU that cannot be
/// opened (a lost context, a broken driver) fails the test instead of passing it silently.
fn test_gpu_decision(no_gpu: Option<&str>, require_gpu: Option<&str>) -> TestGpu {
    match no_gpu {
        None => TestGpu::Open,
        Some(why) if gpu_required(require_gpu) => TestGpu::Fail(format!(
            "{REQUIRE_GPU_ENV}={} asks for a GPU, but {why}",
            require_gpu.unwrap_or_default()
        )),
        Some(why) => TestGpu::Skip(why.to_string()),
    }
}

/// GPU `ordinal` for a test. None (after printing `skipped: <reason>`) only when this machine
/// has no GPU at all (no driver library, or the driver reports no device) and
/// [`REQUIRE_GPU_ENV`] is not set; panics, failing the test, whenever `probe` fails otherwise
/// (for example a GPU whose context was lost by an earlier test in the same process) or when a
/// GPU is required and there is none.
pub fn probe_for_tests(ordinal: usize) -> Option<Gpu> {
    let no_gpu = match presence() {
        Ok(Presence::NoGpu(why)) => Some(why),
        _ => None,
    };
    let require = std::env::var_os(REQUIRE_GPU_ENV).map(|v| v.to_string_lossy().into_owned());
    match test_gpu_decision(no_gpu.as_deref(), require.as_deref()) {
        TestGpu::Skip(why) => {
            eprintln!("skipped: {why}");
            None
        }
        TestGpu::Fail(msg) => panic!("{msg}"),
        TestGpu::Open => Some(probe(ordinal).unwrap_or_else(|e| panic!("this machine has a GPU driver and a GPU, but GPU {ordinal} cannot be used: {e}"))),
    }
}

/// Opens GPU `ordinal` of the `count` the driver sees.
fn open(ordinal: usize, count: usize) -> Result<Gpu> {
    if ordinal >= count {
        return Err(Error::Backend(format!("GPU {ordinal} requested but {count} found; run with `--device cpu`")));
    }
    let ctx = CudaContext::new(ordinal).map_err(|e| Error::Backend(format!("cannot open GPU {ordinal}: {e}")))?;
    let err = |e: cudarc::driver::DriverError| Error::Backend(format!("GPU {ordinal}: {e}"));
    let name = ctx.name().map_err(err)?;
    let capability = ctx.compute_capability().map_err(err)?;
    if let Some(why) = unsupported(capability) {
        return Err(Error::Backend(format!("GPU {ordinal} ({name}) {why}; run with `--device cpu`")));
    }
    let total_memory = ctx.total_mem().map_err(err)?;
    // One stream does all the work, so cudarc's cross-stream event tracking is only overhead
    // (and would record events inside CUDA-graph captures); a created stream, not the legacy
    // default one, because graphs cannot be captured on the legacy stream.
    // SAFETY: nothing is allocated yet, and every later allocation and launch uses `stream`.
    unsafe { ctx.disable_event_tracking() };
    let stream = ctx.new_stream().map_err(err)?;
    Ok(Gpu { ctx, stream, name, capability, total_memory })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// GPUs below Hopper are refused with what they have and what is needed (the kernels do not
    /// compile for them); Hopper and newer get an architecture NVRTC builds.
    #[test]
    fn gpus_below_hopper_are_refused_and_newer_ones_get_an_architecture() {
        for cap in [(7, 5), (8, 0), (8, 6), (8, 9)] {
            let why = unsupported(cap).unwrap_or_else(|| panic!("{cap:?} accepted"));
            assert!(why.contains(&format!("{}.{}", cap.0, cap.1)) && why.contains("9.0 or newer"), "{why}");
        }
        for (cap, arch) in [((9, 0), "sm_90a"), ((10, 0), "sm_100a"), ((12, 0), "sm_120"), ((10, 3), "compute_90"), ((12, 1), "compute_90"), ((11, 0), "compute_90")] {
            assert_eq!(unsupported(cap), None, "{cap:?}");
            assert_eq!(arch_for(cap), arch, "{cap:?}");
            assert!(NVRTC_ARCHES.contains(&arch), "{arch}");
        }
    }

    #[test]
    fn the_require_variable_is_any_non_empty_value_but_zero() {
        assert!(!gpu_required(None));
        assert!(!gpu_required(Some("")));
        assert!(!gpu_required(Some("0")));
        assert!(gpu_required(Some("1")));
        assert!(gpu_required(Some("yes")));
        assert!(gpu_required(Some("00")));
    }

    #[test]
    fn tests_skip_only_without_a_gpu_and_without_the_requirement() {
        let why = "no NVIDIA driver found (libcuda.so could not be loaded); run with `--device cpu`";
        // No GPU at all: skip unless required.
        for unset in [None, Some(""), Some("0")] {
            assert_eq!(test_gpu_decision(Some(why), unset), TestGpu::Skip(why.into()), "{unset:?}");
        }
        match test_gpu_decision(Some(why), Some("1")) {
            TestGpu::Fail(m) => {
                assert!(m.contains(REQUIRE_GPU_ENV) && m.contains("=1"), "{m}");
                assert!(m.contains(why), "{m}");
            }
            other => panic!("{other:?}"),
        }
        // A GPU is present: always opened (so a failure to open it fails the test), required or not.
        for v in [None, Some(""), Some("0"), Some("1")] {
            assert_eq!(test_gpu_decision(None, v), TestGpu::Open, "{v:?}");
        }
    }

    #[test]
    fn probe_reports_the_shared_presence_check() {
        // Whatever this machine has: without a GPU `probe` fails with the reason `presence`
        // gives (the one `probe_for_tests` prints); with n GPUs, `probe` refuses ordinal n with
        // the count `presence` found.
        match presence() {
            Ok(Presence::NoGpu(why)) => {
                assert!(why.contains("--device cpu"), "{why}");
                assert_eq!(probe(0).err().map(|e| e.to_string()).unwrap_or_default(), Error::Backend(why).to_string());
            }
            Ok(Presence::Devices(n)) => {
                let e = probe(n).err().map(|e| e.to_string()).unwrap_or_default();
                assert!(e.contains(&format!("GPU {n} requested but {n} found")) && e.contains("--device cpu"), "{e}");
            }
            Err(e) => assert!(e.to_string().contains("--device cpu"), "{e}"),
        }
    }
}
