//! Logits buffers shared by the captured graphs (crate::graph, crate::speculate).
//!
//! Every captured step writes its logits into a device buffer that its kernel nodes name by
//! address, so the buffer must outlive the graph. Given one each, the graphs held rows x
//! vocabulary floats apiece: for MiMo-V2-Flash (152,576 logits a row) the 14 decode buckets
//! of one block-table width held 141 MB, sampled graphs as much again, every width and verify
//! shape more, and a fused speculative step up to 146 MB by itself.
//!
//! Graphs replay one at a time on the model's stream, and whatever reads a graph's logits
//! (the sampler after a greedy graph, a copy to the host, the graph's own kernels) is enqueued
//! on that stream before the next graph is launched. So one buffer can serve every graph: a
//! `LogitsPool` hands out views of its current buffer, and makes a larger one only when a graph
//! needs more than it holds. Graphs captured on an older buffer keep it alive (each view holds
//! its buffer), so memory is never freed under a graph, and the older buffers go when those
//! graphs are dropped.

use std::ops::{Deref, DerefMut};
use std::sync::Arc;

use cudarc::driver::{CudaSlice, DevicePtr};
use peregrine_core::Result;

/// Hands out shares of one buffer of `B` while it is large enough; a request for more makes a
/// new buffer of at least `floor` elements and at least twice the old one (so a pool that grows
/// step by step makes few buffers).
pub(crate) struct LogitsPool<B> {
    current: Option<Arc<B>>,
    floor: usize,
}

impl<B> LogitsPool<B> {
    /// A pool whose first buffer holds at least `floor` elements.
    pub(crate) fn new(floor: usize) -> LogitsPool<B> {
        LogitsPool { current: None, floor }
    }

    /// A share of a buffer of at least `n` elements (`len` measures one, `alloc(k)` makes one of
    /// `k` elements).
    pub(crate) fn get(&mut self, n: usize, len: impl Fn(&B) -> usize, alloc: impl FnOnce(usize) -> Result<B>) -> Result<Arc<B>> {
        match &self.current {
            Some(b) if len(b) >= n => Ok(b.clone()),
            cur => {
                let grown = cur.as_ref().map_or(0, |b| 2 * len(b));
                let b = Arc::new(alloc(n.max(self.floor).max(grown))?);
                self.current = Some(b.clone());
                Ok(b)
            }
        }
    }

    /// The buffer new shares come from.
    pub(crate) fn current(&self) -> Option<&Arc<B>> {
        self.current.as_ref()
    }

    /// Forgets the current buffer (shares already handed out keep theirs).
    pub(crate) fn clear(&mut self) {
        self.current = None;
    }
}

/// A graph's logits: a slice over the first `len` floats of a shared buffer, used wherever the
/// step's code takes the logits as a `CudaSlice`. The buffer is held for as long as the view.
pub(crate) struct SharedLogits {
    /// An alias of `owner`'s memory; never freed by its own drop (see `Drop`).
    view: std::mem::ManuallyDrop<CudaSlice<f32>>,
    owner: Arc<CudaSlice<f32>>,
}

impl SharedLogits {
    /// The first `len` floats of `owner` (at most its length).
    pub(crate) fn new(owner: Arc<CudaSlice<f32>>, len: usize) -> SharedLogits {
        let len = len.min(owner.len());
        let st = owner.stream().clone();
        let (ptr, _) = owner.device_ptr(&st);
        // SAFETY: `ptr` is `owner`'s allocation, at least `len` floats, alive while `owner` is
        // (held beside the view); the view is leaked in `Drop`, so it never frees it.
        let view = unsafe { st.upgrade_device_ptr::<f32>(ptr, len.max(1)) };
        SharedLogits { view: std::mem::ManuallyDrop::new(view), owner }
    }

    /// The buffer this view is over (graphs that share it hold the same one).
    pub(crate) fn owner(&self) -> &Arc<CudaSlice<f32>> {
        &self.owner
    }
}

impl Deref for SharedLogits {
    type Target = CudaSlice<f32>;
    fn deref(&self) -> &CudaSlice<f32> {
        &self.view
    }
}

impl DerefMut for SharedLogits {
    fn deref_mut(&mut self) -> &mut CudaSlice<f32> {
        &mut self.view
    }
}

impl Drop for SharedLogits {
    fn drop(&mut self) {
        // SAFETY: taken once, here; the alias gives up its pointer without freeing it.
        let view = unsafe { std::mem::ManuallyDrop::take(&mut self.view) };
        view.leak();
    }
}

/// Bytes of the distinct buffers among `owners` (each counted once however many graphs share
/// it).
pub(crate) fn distinct_bytes<'a>(owners: impl IntoIterator<Item = &'a Arc<CudaSlice<f32>>>) -> usize {
    let mut seen: Vec<*const CudaSlice<f32>> = Vec::new();
    let mut bytes = 0;
    for o in owners {
        let p = Arc::as_ptr(o);
        if !seen.contains(&p) {
            seen.push(p);
            bytes += o.len() * std::mem::size_of::<f32>();
        }
    }
    bytes
}

#[cfg(test)]
mod tests {
    use super::LogitsPool;
    use std::sync::Arc;

    fn get(p: &mut LogitsPool<Vec<f32>>, n: usize, made: &mut Vec<usize>) -> Arc<Vec<f32>> {
        p.get(n, Vec::len, |k| {
            made.push(k);
            Ok(vec![0.0; k])
        })
        .unwrap()
    }

    #[test]
    fn requests_that_fit_share_one_buffer_and_larger_ones_grow_it() {
        let mut made = Vec::new();
        let mut p = LogitsPool::new(64);
        let a = get(&mut p, 1, &mut made);
        let b = get(&mut p, 64, &mut made);
        assert!(Arc::ptr_eq(&a, &b), "both fit the first buffer");
        assert_eq!(made, [64], "the first buffer is the floor's size");
        // 65 does not fit: a new buffer of twice the old one; later requests share it.
        let c = get(&mut p, 65, &mut made);
        assert_eq!(made, [64, 128]);
        let d = get(&mut p, 3, &mut made);
        assert!(Arc::ptr_eq(&c, &d) && !Arc::ptr_eq(&a, &c));
        // A request past twice the buffer gets exactly what it asked for.
        let e = get(&mut p, 1000, &mut made);
        assert_eq!(made, [64, 128, 1000]);
        assert_eq!(e.len(), 1000);
        // Older shares keep their buffers; the pool holds only the newest.
        assert_eq!((Arc::strong_count(&a), Arc::strong_count(&c), Arc::strong_count(&e)), (2, 2, 2));
        assert!(Arc::ptr_eq(p.current().unwrap(), &e));
        p.clear();
        assert!(p.current().is_none() && Arc::strong_count(&e) == 1);
        let f = get(&mut p, 2, &mut made);
        assert_eq!((made.len(), f.len()), (4, 64), "after clear the next buffer starts at the floor again");
    }

    #[test]
    fn a_failed_allocation_keeps_the_buffer_it_had() {
        let mut p: LogitsPool<Vec<f32>> = LogitsPool::new(4);
        let a = p.get(4, Vec::len, |k| Ok(vec![0.0; k])).unwrap();
        let err = p.get(5, Vec::len, |_| Err(peregrine_core::Error::Backend("out of memory".into())));
        assert!(err.is_err());
        assert!(Arc::ptr_eq(p.current().unwrap(), &a));
    }
}
