//! Where a step's device buffers come from, so that a captured decode step is kernels only.
//!
//! Eagerly, buffers come from the stream's stream-ordered allocator (`cuMemAllocAsync`). Under
//! stream capture that call records a graph memory node, and a memory node (or a memset)
//! between two kernels breaks their programmatic edge: the second kernel then starts only
//! after the first has finished (+0.7 us after it, against ~20 us before it with the edge kept;
//! benches/micro/pdl_edges.cu), and the captured step ran most of its launch boundaries that
//! way (357 alloc and 357 free nodes for 122 kernels at batch 1).
//!
//! So while a step is captured (`StepAlloc::capturing`), buffers come from a memory pool of
//! their own through a side stream that is never captured: no node in the graph (the capture
//! is relaxed, crate::graph, since the thread-local mode refuses this allocation). A buffer
//! dropped during the capture goes back to that pool at once and a later allocation of the
//! same capture may reuse it, as the stream-ordered allocator reuses memory in stream order.
//! That is safe because every kernel of a step writes only after its PDL wait (the kernel ahead
//! and so every kernel before it has finished), except a kernel that writes before its wait
//! (attention_v2_kv_ready): its outputs are allocated before the kernel ahead is launched, while
//! every buffer that kernel reads is still alive. Graphs share the pool's memory: a captured
//! buffer carries nothing from one replay to the next (each replay writes it before reading,
//! `zeros` by a kernel), and replays run one at a time on the model's stream. The pool keeps its
//! memory (release threshold u64::MAX), so a buffer freed at capture stays mapped for replays.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use cudarc::driver::{sys, CudaSlice, CudaStream, DeviceRepr};
use peregrine_core::{Error, Result};

struct CapturePool {
    pool: sys::CUmemoryPool,
    side: Arc<CudaStream>,
}

// SAFETY: a CUmemoryPool handle may be used from any thread of its context.
unsafe impl Send for CapturePool {}
unsafe impl Sync for CapturePool {}

pub(crate) struct StepAlloc {
    stream: Arc<CudaStream>,
    capturing: AtomicBool,
    pool: OnceLock<std::result::Result<CapturePool, String>>,
}

impl StepAlloc {
    pub(crate) fn new(stream: Arc<CudaStream>) -> StepAlloc {
        StepAlloc { stream, capturing: AtomicBool::new(false), pool: OnceLock::new() }
    }

    /// Whether buffers come from the capture pool (set around a graph capture).
    pub(crate) fn capturing(&self) -> bool {
        self.capturing.load(Ordering::Relaxed)
    }

    /// Creates the capture pool and its side stream (once), before a capture begins: neither
    /// may be created while the stream is capturing.
    pub(crate) fn prepare(&self) -> Result<()> {
        self.capture_pool().map(|_| ())
    }

    /// Runs `body` with buffers from the capture pool (`prepare` first).
    pub(crate) fn while_capturing<R>(&self, body: impl FnOnce() -> R) -> R {
        while_set(&self.capturing, body)
    }

    fn capture_pool(&self) -> Result<&CapturePool> {
        self.pool.get_or_init(|| create_pool(&self.stream)).as_ref().map_err(|e| Error::Backend(e.clone()))
    }

    /// `n` elements of T, uninitialised (n = 0 gets one).
    ///
    /// # Safety
    /// The caller writes every element it reads (as with `CudaStream::alloc`).
    pub(crate) unsafe fn alloc<T: DeviceRepr>(&self, n: usize) -> Result<CudaSlice<T>> {
        let n = n.max(1);
        if !self.capturing() {
            return self.stream.alloc::<T>(n).map_err(|e| Error::Backend(format!("device allocation of {n} elements: {e}")));
        }
        let p = self.capture_pool()?;
        let bytes = n * std::mem::size_of::<T>();
        let mut ptr: sys::CUdeviceptr = 0;
        sys::cuMemAllocFromPoolAsync(&mut ptr, bytes, p.pool, p.side.cu_stream())
            .result()
            .map_err(|e| Error::Backend(format!("capture pool: allocating {bytes} bytes: {e}")))?;
        // Dropped, it is freed on the side stream: back to the pool at once.
        Ok(p.side.upgrade_device_ptr(ptr, n))
    }
}

impl Drop for StepAlloc {
    fn drop(&mut self) {
        if let Some(Ok(p)) = self.pool.get() {
            // Deferred by the driver until every buffer of the pool is freed.
            let _ = unsafe { sys::cuMemPoolDestroy(p.pool) };
        }
    }
}

/// While `on`, memory freed into the device's current pool (where eager steps' stream-ordered
/// buffers come from) stays reserved by it, so the free memory read after a profiling step
/// shows the step's peak (`Backend::hold_freed_memory`); turned off, the pool gives back what
/// it holds past what is allocated, as by default (release threshold 0).
pub(crate) fn hold_freed_memory(stream: &Arc<CudaStream>, on: bool) -> Result<()> {
    let ctx = stream.context();
    let err = |what: &str, e: cudarc::driver::DriverError| Error::Backend(format!("device memory pool: {what}: {e}"));
    ctx.bind_to_thread().map_err(|e| err("binding the context", e))?;
    // SAFETY: plain driver calls on the pool of this context's device.
    unsafe {
        let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
        sys::cuDeviceGetMemPool(&mut pool, ctx.cu_device()).result().map_err(|e| err("cuDeviceGetMemPool", e))?;
        let mut threshold: u64 = if on { u64::MAX } else { 0 };
        sys::cuMemPoolSetAttribute(pool, sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD, &mut threshold as *mut u64 as *mut std::ffi::c_void)
            .result()
            .map_err(|e| err("setting the release threshold", e))?;
        if !on {
            stream.synchronize().map_err(|e| err("synchronising", e))?;
            sys::cuMemPoolTrimTo(pool, 0).result().map_err(|e| err("cuMemPoolTrimTo", e))?;
        }
    }
    Ok(())
}

fn create_pool(stream: &Arc<CudaStream>) -> std::result::Result<CapturePool, String> {
    let ctx = stream.context();
    ctx.bind_to_thread().map_err(|e| format!("capture pool: {e}"))?;
    // SAFETY: plain driver calls on a zeroed property struct naming this context's device.
    unsafe {
        let mut props: sys::CUmemPoolProps = std::mem::zeroed();
        props.allocType = sys::CUmemAllocationType::CU_MEM_ALLOCATION_TYPE_PINNED;
        props.handleTypes = sys::CUmemAllocationHandleType::CU_MEM_HANDLE_TYPE_NONE;
        props.location.type_ = sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE;
        props.location.id = ctx.ordinal() as i32;
        let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
        sys::cuMemPoolCreate(&mut pool, &props).result().map_err(|e| format!("capture pool: cuMemPoolCreate: {e}"))?;
        let mut keep = u64::MAX;
        sys::cuMemPoolSetAttribute(pool, sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD, &mut keep as *mut u64 as *mut std::ffi::c_void)
            .result()
            .map_err(|e| format!("capture pool: release threshold: {e}"))?;
        let side = ctx.new_stream().map_err(|e| format!("capture pool: side stream: {e}"))?;
        Ok(CapturePool { pool, side })
    }
}


/// Runs `body` with `flag` set, then restores it, also when `body` panics: a step buffer taken
/// from the capture pool after a failed capture would go back to the pool at its drop while
/// kernels on the model's stream may still read it.
fn while_set<R>(flag: &AtomicBool, body: impl FnOnce() -> R) -> R {
    struct Restore<'a>(&'a AtomicBool, bool);
    impl Drop for Restore<'_> {
        fn drop(&mut self) {
            self.0.store(self.1, Ordering::Relaxed);
        }
    }
    let _restore = Restore(flag, flag.swap(true, Ordering::Relaxed));
    body()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_capture_flag_is_set_inside_only_and_restored_after_a_panic() {
        let flag = AtomicBool::new(false);
        assert!(while_set(&flag, || flag.load(Ordering::Relaxed)));
        assert!(!flag.load(Ordering::Relaxed));
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| while_set(&flag, || panic!("in the body"))));
        assert!(r.is_err());
        assert!(!flag.load(Ordering::Relaxed), "the flag stayed set after a panic");
        // Nested: the inner call restores the outer state.
        while_set(&flag, || {
            while_set(&flag, || ());
            assert!(flag.load(Ordering::Relaxed));
        });
        assert!(!flag.load(Ordering::Relaxed));
    }
}
