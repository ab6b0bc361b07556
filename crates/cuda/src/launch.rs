//! Kernel launches with programmatic dependent launch (PDL, compute capability 9.0+): a kernel's
//! blocks may be scheduled while the kernel before it in the stream is still finishing, instead
//! of after a full drain and a fresh launch. Every kernel in `kernels/*.cu` begins with
//! `PDL_ENTER()` (`griddepcontrol.wait`, then `griddepcontrol.launch_dependents`), so it touches
//! nothing the previous kernel writes before that kernel has finished and its writes are
//! visible; what is saved is the launch and block dispatch between dependent kernels, and
//! kernels that read only weights first (the MoE down projection) may fetch them before
//! waiting. Graph capture turns these launches into programmatic edges.
//!
//! cudarc's launch builder sets no launch attributes, so this is a small builder of its own
//! over `cuLaunchKernelEx`. `PEREGRINE_PDL=0` launches every kernel plainly (for comparison).
//!
//! `PEREGRINE_REPEAT_KERNELS=name,prefix*,...` (benchmarks only) launches each named kernel
//! twice in a row: a captured step then shows what one more of that kernel costs inside the
//! graph, which per-operation events (they break the PDL overlap) cannot. Output is wrong while
//! it is set (in-place kernels apply twice). `PEREGRINE_SKIP_KERNELS` (same form) launches them
//! not at all: a step without them bounds what fusing them away could save (output is wrong).

use std::ffi::c_void;
use std::sync::OnceLock;

use cudarc::driver::{sys, CudaFunction, CudaSlice, CudaStream, CudaView, CudaViewMut, DevicePtr, DriverError, LaunchConfig};

/// One kernel argument as the 8-byte word the driver reads from (scalars use its low bytes).
pub(crate) trait KernelArg {
    fn word(&self, stream: &CudaStream) -> u64;
}

impl<T> KernelArg for CudaSlice<T> {
    fn word(&self, stream: &CudaStream) -> u64 {
        self.device_ptr(stream).0
    }
}
impl<T> KernelArg for CudaView<'_, T> {
    fn word(&self, stream: &CudaStream) -> u64 {
        self.device_ptr(stream).0
    }
}
impl<T> KernelArg for CudaViewMut<'_, T> {
    fn word(&self, stream: &CudaStream) -> u64 {
        self.device_ptr(stream).0
    }
}
macro_rules! scalar_arg {
    ($($t:ty => $e:expr),*) => {$(
        impl KernelArg for $t {
            fn word(&self, _: &CudaStream) -> u64 {
                let f: fn($t) -> u64 = $e;
                f(*self)
            }
        }
    )*};
}
scalar_arg!(i32 => |v| v as u32 as u64, u32 => |v| v as u64, f32 => |v| v.to_bits() as u64, u64 => |v| v, i64 => |v| v as u64, f64 => |v| v.to_bits());

/// What `Launch::arg` takes: a shared reference to an input, or a mutable one to an output.
pub(crate) trait ArgRef {
    fn word(self, stream: &CudaStream) -> u64;
}
impl<T: KernelArg + ?Sized> ArgRef for &T {
    fn word(self, stream: &CudaStream) -> u64 {
        KernelArg::word(self, stream)
    }
}
impl<T: KernelArg + ?Sized> ArgRef for &mut T {
    fn word(self, stream: &CudaStream) -> u64 {
        KernelArg::word(&*self, stream)
    }
}

/// A kernel launch being built: `arg` in the kernel's parameter order, then `launch`.
pub(crate) struct Launch<'a> {
    stream: &'a CudaStream,
    f: &'a CudaFunction,
    words: Vec<u64>,
    /// Where each argument starts in `words` (a struct passed by value spans several).
    starts: Vec<usize>,
    /// Blocks a cluster along x (`cluster`; 1: no cluster attribute).
    cluster: u32,
}

pub(crate) fn builder<'a>(stream: &'a CudaStream, f: &'a CudaFunction) -> Launch<'a> {
    Launch { stream, f, words: Vec::with_capacity(16), starts: Vec::with_capacity(16), cluster: 1 }
}

thread_local! {
    /// Live `PlainLaunches` guards on this thread.
    static PLAIN: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
    /// The next launch on this thread goes without PDL (`plain_next`).
    static PLAIN_NEXT: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// The next kernel launched on this thread waits for the whole stream before it, without PDL:
/// every SM drains first, so each can take the shared-memory carveout the new kernel prefers.
/// Under PDL a kernel's blocks are placed beside the running kernel's, in the SM configuration
/// that one chose, and a chain of PDL launches after the MoE (up to ~200 KB of shared memory
/// per SM) leaves the decode GEMVs little L1 for the activations every block re-reads: at 4-8
/// rows the o_proj and q/k/v projections ran 1.3-2x longer (benches/results/2026-11-25-pdl-edges.md).
pub(crate) fn plain_next() {
    PLAIN_NEXT.with(|c| c.set(true));
}

/// While one lives, this thread's launches go without programmatic dependent launch. A prompt's
/// kernels are long grids of many waves, and with PDL each next grid's blocks take SMs (and the
/// shared-memory carveout) while they wait: on the H100 a 2048-token prefill took 295.7 ms with
/// PDL and 262.5 ms without (the tensor-core attention, 199 KB of shared memory per block, lost
/// most; benches/results/2026-11-24-prefill-gemm.md). Decode steps keep PDL.
pub(crate) struct PlainLaunches(());

impl PlainLaunches {
    pub(crate) fn new() -> PlainLaunches {
        PLAIN.with(|c| c.set(c.get() + 1));
        PlainLaunches(())
    }
}

impl Drop for PlainLaunches {
    fn drop(&mut self) {
        PLAIN.with(|c| c.set(c.get() - 1));
    }
}

/// Whether launches use PDL: the device supports it and `PEREGRINE_PDL` is not `0`.
fn pdl_enabled(stream: &CudaStream) -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| {
        let major = stream.context().attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR).unwrap_or(0);
        major >= 9 && std::env::var("PEREGRINE_PDL").map_or(true, |v| v != "0")
    })
}

/// Kernel names (or `prefix*` patterns) from the environment variable `var`.
fn kernel_patterns(var: &str) -> Vec<String> {
    std::env::var(var).map(|v| v.split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect()).unwrap_or_default()
}

/// How many times to launch `f`: 2 when `PEREGRINE_REPEAT_KERNELS` names it, 0 when
/// `PEREGRINE_SKIP_KERNELS` does, else 1. Each name is reported once on stderr.
fn launches(f: &CudaFunction) -> usize {
    static PATTERNS: OnceLock<(Vec<String>, Vec<String>)> = OnceLock::new();
    let (repeat, skip) = PATTERNS.get_or_init(|| (kernel_patterns("PEREGRINE_REPEAT_KERNELS"), kernel_patterns("PEREGRINE_SKIP_KERNELS")));
    if repeat.is_empty() && skip.is_empty() {
        return 1;
    }
    let mut name: *const std::ffi::c_char = std::ptr::null();
    // SAFETY: cuFuncGetName writes a pointer to a driver-owned NUL-terminated string.
    if unsafe { sys::cuFuncGetName(&mut name, f.cu_function()) }.result().is_err() || name.is_null() {
        return 1;
    }
    let name = unsafe { std::ffi::CStr::from_ptr(name) }.to_string_lossy();
    let hit = |pats: &[String]| {
        pats.iter().any(|p| match p.strip_suffix('*') {
            Some(pre) => name.starts_with(pre),
            None => name == p.as_str(),
        })
    };
    let (times, what) = if hit(skip) {
        (0, "skipping")
    } else if hit(repeat) {
        (2, "launching twice")
    } else {
        return 1;
    };
    static SEEN: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
    let mut seen = SEEN.lock().unwrap_or_else(|e| e.into_inner());
    if !seen.iter().any(|s| *s == name) {
        eprintln!("PEREGRINE_REPEAT_KERNELS / PEREGRINE_SKIP_KERNELS: {what} {name}");
        seen.push(name.to_string());
    }
    times
}

/// How many clusters of `blocks` blocks (along x) of `threads` threads and `smem` bytes of
/// dynamic shared memory `f` can have resident at once on the stream's GPU (0: it cannot be
/// launched so there), or None where the driver cannot say (before Hopper).
pub(crate) fn max_active_clusters(stream: &CudaStream, f: &CudaFunction, blocks: u32, threads: u32, smem: u32) -> Option<i32> {
    // SAFETY: the attribute and config are plain data read by the call; the function is loaded.
    unsafe {
        let mut attr: sys::CUlaunchAttribute = std::mem::zeroed();
        attr.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION;
        attr.value.clusterDim.x = blocks;
        attr.value.clusterDim.y = 1;
        attr.value.clusterDim.z = 1;
        let config = sys::CUlaunchConfig {
            gridDimX: blocks,
            gridDimY: 1,
            gridDimZ: 1,
            blockDimX: threads,
            blockDimY: 1,
            blockDimZ: 1,
            sharedMemBytes: smem,
            hStream: stream.cu_stream(),
            attrs: &mut attr,
            numAttrs: 1,
        };
        let mut n = 0;
        sys::cuOccupancyMaxActiveClusters(&mut n, f.cu_function(), &config).result().ok().map(|_| n)
    }
}

impl Launch<'_> {
    pub(crate) fn arg(&mut self, a: impl ArgRef) -> &mut Self {
        self.starts.push(self.words.len());
        self.words.push(a.word(self.stream));
        self
    }

    /// A plain-data struct passed by value (its C layout, at most 8-byte aligned).
    pub(crate) fn arg_struct<T: Copy>(&mut self, v: &T) -> &mut Self {
        const { assert!(std::mem::align_of::<T>() <= 8) };
        let n = std::mem::size_of::<T>().div_ceil(8);
        let at = self.words.len();
        self.starts.push(at);
        self.words.resize(at + n, 0);
        // SAFETY: the words hold at least size_of::<T>() bytes, 8-byte aligned; T is Copy.
        unsafe { std::ptr::copy_nonoverlapping(v as *const T as *const u8, self.words[at..].as_mut_ptr() as *mut u8, std::mem::size_of::<T>()) };
        self
    }

    /// An optional buffer: its address, or a null pointer for the kernel to test.
    pub(crate) fn arg_or_null(&mut self, a: Option<impl ArgRef>) -> &mut Self {
        match a {
            Some(a) => self.arg(a),
            None => self.arg(&0u64),
        }
    }

    /// Launches the grid in clusters of `blocks` blocks along x (compute capability 9.0+; the
    /// grid's x a multiple of it), for kernels that size their clusters at run time.
    pub(crate) fn cluster(&mut self, blocks: u32) -> &mut Self {
        self.cluster = blocks;
        self
    }

    /// # Safety
    /// The arguments must match the kernel's parameters in order and type, and every buffer
    /// must outlive the kernel's execution.
    pub(crate) unsafe fn launch(&mut self, cfg: LaunchConfig) -> Result<(), DriverError> {
        self.stream.context().bind_to_thread()?;
        let base = self.words.as_mut_ptr();
        let mut params: Vec<*mut c_void> = self.starts.iter().map(|&i| base.add(i) as *mut c_void).collect();
        let plain_next = PLAIN_NEXT.with(|c| c.replace(false));
        let pdl = pdl_enabled(self.stream) && PLAIN.with(|c| c.get() == 0) && !plain_next;
        let mut attrs: [sys::CUlaunchAttribute; 2] = std::mem::zeroed();
        let mut n_attrs = 0;
        if pdl {
            attrs[n_attrs].id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
            attrs[n_attrs].value.programmaticStreamSerializationAllowed = 1;
            n_attrs += 1;
        }
        if self.cluster > 1 {
            attrs[n_attrs].id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION;
            attrs[n_attrs].value.clusterDim.x = self.cluster;
            attrs[n_attrs].value.clusterDim.y = 1;
            attrs[n_attrs].value.clusterDim.z = 1;
            n_attrs += 1;
        }
        let config = sys::CUlaunchConfig {
            gridDimX: cfg.grid_dim.0,
            gridDimY: cfg.grid_dim.1,
            gridDimZ: cfg.grid_dim.2,
            blockDimX: cfg.block_dim.0,
            blockDimY: cfg.block_dim.1,
            blockDimZ: cfg.block_dim.2,
            sharedMemBytes: cfg.shared_mem_bytes,
            hStream: self.stream.cu_stream(),
            attrs: if n_attrs > 0 { attrs.as_mut_ptr() } else { std::ptr::null_mut() },
            numAttrs: n_attrs as u32,
        };
        for _ in 0..launches(self.f) {
            sys::cuLaunchKernelEx(&config, self.f.cu_function(), params.as_mut_ptr(), std::ptr::null_mut()).result()?;
        }
        Ok(())
    }
}
