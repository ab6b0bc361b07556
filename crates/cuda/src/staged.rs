//! Copy-free graph steps: a decode graph reads its row data (tokens, positions, KV slots, block
//! tables, the chain address) from page-locked, device-mapped host memory with its first kernel
//! (`fetch_staged` in kernels/ops.cu), and its argmax kernel writes the step's ids back there,
//! so nothing runs on the stream between two steps but the graphs themselves.
//!
//! Why: a host-to-device copy before each replay is a stream operation the GPU waits on between
//! two graphs. The 7-8 copies of the row data cost an overlapped batch-1 step 5-9 us and a step
//! taken alone 18-41 us, and packing them into one copy won back only ~1 us
//! (benches/results/2026-11-27-step-tail-fused.md); a read over PCIe inside the graph is one
//! round trip and overlaps nothing else.
//!
//! Each graph owns `SLOTS` slots. A launch writes its rows into a free slot, points the graph's
//! first kernel (`fetch_staged`) at it (`cuGraphExecKernelNodeSetParams`: launches already
//! enqueued keep the slot they were given) and records the slot's event after the graph. A slot is written again
//! only once that event has completed and no overlapped step's ids wait in it uncollected
//! (`held`), so the host never rewrites rows a queued step has yet to read, nor ids the engine
//! has yet to see. `PEREGRINE_COPY_FREE_ROWS=0` goes back to a copy per array (for comparison).

use std::ffi::c_void;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use cudarc::driver::sys::{self, CUevent_flags};
use cudarc::driver::{CudaEvent, CudaFunction, CudaGraph, CudaSlice, CudaStream, DevicePtr, PinnedHostSlice};
use peregrine_core::{Error, Result};

use crate::backend::drv;

/// Slots per graph: the engine keeps one step in flight beside the one it collects.
pub(crate) const SLOTS: usize = 4;

/// Arrays a layout describes at most (`StagedLayout` in kernels/ops.cu): a decode graph's eight,
/// its sampling parameters, and its rows' drafter rings (crate::draft_staging).
const MAX_ARRAYS: usize = 10;

/// What `fetch_staged` copies, passed by value (the same C layout as in kernels/ops.cu): array a
/// is `bytes[a]` bytes at slot offset `off[a]`, for the device address `dst[a]`; the step's ids
/// go at `ids_off`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct StagedLayout {
    dst: [u64; MAX_ARRAYS],
    off: [u32; MAX_ARRAYS],
    bytes: [u32; MAX_ARRAYS],
    n: u32,
    ids_off: u32,
}

/// One device array of a graph's row data: its address and its length in bytes.
pub(crate) fn array<T>(s: &CudaSlice<T>, st: &CudaStream) -> (u64, usize) {
    (s.device_ptr(st).0, s.len() * std::mem::size_of::<T>())
}

impl StagedLayout {
    /// The slot layout of `arrays` (each from a 16-byte boundary), then `ids` ids; and the bytes
    /// of a slot.
    pub(crate) fn new(arrays: &[(u64, usize)], ids: usize) -> Result<(StagedLayout, usize)> {
        if arrays.len() > MAX_ARRAYS {
            return Err(Error::Backend(format!("staged row data: {} arrays, room for {MAX_ARRAYS}", arrays.len())));
        }
        let up = |b: usize| b.div_ceil(16) * 16;
        let mut l = StagedLayout { n: arrays.len() as u32, ..Default::default() };
        let mut at = 0usize;
        for (i, &(dst, bytes)) in arrays.iter().enumerate() {
            if bytes % 4 != 0 {
                return Err(Error::Backend(format!("staged row data: array {i} is {bytes} bytes, not whole 4-byte words")));
            }
            (l.dst[i], l.off[i], l.bytes[i]) = (dst, at as u32, bytes as u32);
            at += up(bytes);
        }
        l.ids_off = at as u32;
        Ok((l, up(at + 4 * ids)))
    }

    pub(crate) fn arrays(&self) -> usize {
        self.n as usize
    }
}

/// The host side of a graph's slots, shared with the overlapped steps whose ids wait in it (they
/// may outlive the graph).
pub(crate) struct HostSlots {
    _host: PinnedHostSlice<u8>,
    /// Host and device addresses of slot 0.
    base: usize,
    dev: u64,
    slot_bytes: usize,
    ids_off: usize,
    /// Recorded after the last graph launched on each slot.
    events: Vec<CudaEvent>,
    /// An overlapped step's ids wait in the slot, uncollected.
    held: Vec<AtomicBool>,
}

impl HostSlots {
    /// Slot `s`'s first `n` ids, once its step has completed (the caller holds it).
    pub(crate) fn ids(&self, s: usize, n: usize) -> Result<Vec<i32>> {
        if self.ids_off + 4 * n > self.slot_bytes {
            return Err(Error::Backend(format!("{n} ids for a slot of {} bytes", self.slot_bytes)));
        }
        self.events[s].synchronize().map_err(drv)?;
        let p = (self.base + s * self.slot_bytes + self.ids_off) as *const i32;
        // SAFETY: inside the slot (checked above); the GPU wrote them before the event completed,
        // and nothing writes the slot before the caller releases it or takes another step.
        Ok((0..n).map(|i| unsafe { std::ptr::read_volatile(p.add(i)) }).collect())
    }

    pub(crate) fn release(&self, s: usize) {
        self.held[s].store(false, Ordering::Release);
    }
}

/// A graph's staged row data: its slots, their layout, and the device word through which the
/// argmax kernels find the current slot's ids.
pub(crate) struct StagedRows {
    pub(crate) slots: Arc<HostSlots>,
    pub(crate) layout: StagedLayout,
    /// fetch_staged writes the host address of the slot's ids here.
    pub(crate) ids_host: CudaSlice<u64>,
    /// The ids a slot has room for.
    ids_cap: usize,
    next: usize,
}

impl StagedRows {
    /// Slots for `arrays` (the graph's row-data buffers, in the order `write` takes them) and
    /// `ids` ids.
    pub(crate) fn new(st: &Arc<CudaStream>, arrays: &[(u64, usize)], ids: usize) -> Result<StagedRows> {
        let (layout, slot_bytes) = StagedLayout::new(arrays, ids)?;
        let ctx = st.context();
        // SAFETY: every slot is written before a launch reads it (`write`); zeroed below anyway.
        let mut host = unsafe { ctx.alloc_pinned_with_flags::<u8>(SLOTS * slot_bytes, sys::CU_MEMHOSTALLOC_DEVICEMAP) }.map_err(drv)?;
        let slice = host.as_mut_slice().map_err(drv)?;
        slice.fill(0);
        let base = slice.as_mut_ptr();
        let mut dev: sys::CUdeviceptr = 0;
        // SAFETY: `base` is a live DEVICEMAP allocation of this context.
        unsafe { sys::cuMemHostGetDevicePointer_v2(&mut dev, base as *mut c_void, 0) }.result().map_err(drv)?;
        let events = (0..SLOTS).map(|_| ctx.new_event(Some(CUevent_flags::CU_EVENT_DISABLE_TIMING)).map_err(drv)).collect::<Result<Vec<_>>>()?;
        Ok(StagedRows {
            slots: Arc::new(HostSlots { base: base as usize, _host: host, dev, slot_bytes, ids_off: layout.ids_off as usize, events, held: (0..SLOTS).map(|_| AtomicBool::new(false)).collect() }),
            layout,
            ids_host: st.alloc_zeros::<u64>(1).map_err(drv)?,
            ids_cap: ids,
            next: 0,
        })
    }

    /// The device address of slot `s`.
    pub(crate) fn src(&self, s: usize) -> u64 {
        self.slots.dev + (s * self.slots.slot_bytes) as u64
    }

    /// Writes `arrays` (the layout's, in its order and of its lengths) into a free slot and
    /// returns it: the next one no uncollected step holds, once the step that used it last has
    /// completed.
    pub(crate) fn write(&mut self, arrays: &[&[u8]]) -> Result<usize> {
        let l = &self.layout;
        if arrays.len() != l.arrays() {
            return Err(Error::Backend(format!("staged row data: {} arrays for a layout of {}", arrays.len(), l.arrays())));
        }
        if let Some((i, a)) = arrays.iter().enumerate().find(|(i, a)| a.len() != l.bytes[*i] as usize) {
            return Err(Error::Backend(format!("staged row data: array {i} is {} bytes, its buffer {}", a.len(), l.bytes[i])));
        }
        let h = &self.slots;
        let s = (0..SLOTS).map(|k| (self.next + k) % SLOTS).find(|&s| !h.held[s].load(Ordering::Acquire)).ok_or_else(|| Error::Backend(format!("all {SLOTS} row-data slots of a decode graph hold uncollected steps")))?;
        h.events[s].synchronize().map_err(drv)?;
        let slot = (h.base + s * h.slot_bytes) as *mut u8;
        for (i, a) in arrays.iter().enumerate() {
            // SAFETY: within the slot (lengths checked above against the layout); no launch reads
            // the slot now (its last one completed, and `fetch_staged` is pointed at it only next).
            unsafe { std::ptr::copy_nonoverlapping(a.as_ptr(), slot.add(l.off[i] as usize), a.len()) };
        }
        self.next = (s + 1) % SLOTS;
        Ok(s)
    }

    /// Records slot `s`'s event (after the graph launched on it).
    pub(crate) fn launched(&self, s: usize, st: &CudaStream) -> Result<()> {
        self.slots.events[s].record(st).map_err(drv)
    }

    /// Marks slot `s` as holding an overlapped step's `n` ids until `HostSlots::release`.
    pub(crate) fn hold(&self, s: usize, n: usize) -> Result<Arc<HostSlots>> {
        if n > self.ids_cap {
            return Err(Error::Backend(format!("{n} ids for a slot of {}", self.ids_cap)));
        }
        self.slots.held[s].store(true, Ordering::Release);
        Ok(self.slots.clone())
    }
}

/// `fetch_staged`'s arguments (the same order and C layout), where the node's parameters point.
#[repr(C)]
struct FetchArgs {
    src: u64,
    layout: StagedLayout,
    ids_host: u64,
}

/// A copy-free graph's `fetch_staged` node, pointed at a slot before each launch.
pub(crate) struct FetchNode {
    node: sys::CUgraphNode,
    params: sys::CUDA_KERNEL_NODE_PARAMS,
    args: Box<FetchArgs>,
}

// SAFETY: the node and the parameters' pointers are only used through `&mut` of the graph that
// owns them, one thread at a time (as `crate::graph::Graph`).
unsafe impl Send for FetchNode {}

impl FetchNode {
    /// The one kernel node of `graph` that runs `f` (`fetch_staged`), with the layout and ids
    /// word of `staged` it was captured with.
    pub(crate) fn find(graph: &CudaGraph, f: &CudaFunction, staged: &StagedRows, st: &CudaStream) -> Result<FetchNode> {
        let g = graph.cu_graph();
        let mut n = 0usize;
        // SAFETY: the graph is alive; the first call asks for the count, the second fills it.
        unsafe { sys::cuGraphGetNodes(g, std::ptr::null_mut(), &mut n) }.result().map_err(drv)?;
        let mut nodes = vec![std::ptr::null_mut(); n];
        unsafe { sys::cuGraphGetNodes(g, nodes.as_mut_ptr(), &mut n) }.result().map_err(drv)?;
        let mut found = None;
        for node in nodes.into_iter().take(n) {
            let mut t = sys::CUgraphNodeType::CU_GRAPH_NODE_TYPE_EMPTY;
            unsafe { sys::cuGraphNodeGetType(node, &mut t) }.result().map_err(drv)?;
            if t != sys::CUgraphNodeType::CU_GRAPH_NODE_TYPE_KERNEL {
                continue;
            }
            // SAFETY: a kernel node; the driver fills the struct.
            let mut p: sys::CUDA_KERNEL_NODE_PARAMS = unsafe { std::mem::zeroed() };
            unsafe { sys::cuGraphKernelNodeGetParams_v2(node, &mut p) }.result().map_err(drv)?;
            if p.func == f.cu_function() {
                if found.is_some() {
                    return Err(Error::Backend("a decode graph holds two fetch_staged nodes".into()));
                }
                found = Some((node, p));
            }
        }
        let (node, params) = found.ok_or_else(|| Error::Backend("a copy-free decode graph holds no fetch_staged node".into()))?;
        let args = Box::new(FetchArgs { src: staged.src(0), layout: staged.layout, ids_host: staged.ids_host.device_ptr(st).0 });
        Ok(FetchNode { node, params, args })
    }

    /// Points the node at slot address `src` for the next launches of `graph`.
    pub(crate) fn point_at(&mut self, graph: &CudaGraph, src: u64) -> Result<()> {
        self.args.src = src;
        let a = &mut *self.args;
        let mut ptrs: [*mut c_void; 3] = [&mut a.src as *mut u64 as *mut c_void, &mut a.layout as *mut StagedLayout as *mut c_void, &mut a.ids_host as *mut u64 as *mut c_void];
        let mut p = self.params;
        p.kernelParams = ptrs.as_mut_ptr();
        p.extra = std::ptr::null_mut();
        // SAFETY: the node belongs to the graph the exec was instantiated from; the driver copies
        // the argument values during the call.
        unsafe { sys::cuGraphExecKernelNodeSetParams_v2(graph.cu_graph_exec(), self.node, &p) }.result().map_err(drv)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_places_each_array_on_a_16_byte_boundary_then_the_ids() {
        let (l, slot) = StagedLayout::new(&[(0x1000, 4), (0x2000, 8), (0x3000, 40), (0x4000, 8)], 3).unwrap();
        assert_eq!(l.arrays(), 4);
        assert_eq!(&l.off[..4], &[0, 16, 32, 80]);
        assert_eq!(&l.bytes[..4], &[4, 8, 40, 8]);
        assert_eq!(&l.dst[..4], &[0x1000, 0x2000, 0x3000, 0x4000]);
        assert_eq!(l.ids_off, 96);
        assert_eq!(slot, 112);
        // The kernel reads whole 16-byte chunks: every array's last chunk lies in the slot.
        for i in 0..4 {
            assert!(l.off[i] as usize + (l.bytes[i] as usize).div_ceil(16) * 16 <= l.ids_off as usize);
        }
    }

    #[test]
    fn layout_refuses_too_many_arrays_and_partial_words() {
        assert!(StagedLayout::new(&[(0, 4); MAX_ARRAYS + 1], 1).is_err());
        assert!(StagedLayout::new(&[(0, 6)], 1).is_err());
        // The C struct: 10 addresses, 10 offsets, 10 lengths, the count and the ids' offset.
        assert_eq!(std::mem::size_of::<StagedLayout>(), 8 * 10 + 4 * 10 + 4 * 10 + 8);
    }
}
