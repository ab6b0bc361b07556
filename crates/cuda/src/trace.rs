//! A kernel-by-kernel timeline of one decode step, from a measurement build of the kernels
//! (`PEREGRINE_KERNEL_DEFINES=-DSTEP_TRACE`, kernels/common.cuh): every block's thread 0 stamps
//! `%globaltimer` at its kernel's start, once past its PDL wait and at its exit, with its launch's
//! `%gridid`. Events around each operation break the overlap PDL gives a graph replay, and the
//! device has no nsys; these stamps come from the replay itself (`step_bench --trace`).

use std::sync::Arc;

use cudarc::driver::{CudaModule, CudaStream};

use crate::kernels::drv;
use peregrine_core::Result;

/// Bytes of one record (kernels/common.cuh's `StepTraceRec`).
const RECORD_BYTES: usize = 104;

/// One block's stamps (ns of `%globaltimer`).
#[derive(Clone, Debug, PartialEq)]
pub struct BlockStamp {
    pub grid: u64,
    pub enter: u64,
    pub waited: u64,
    pub exit: u64,
    /// `TRACE_MARK` points 0-2 inside the block (0: not reached).
    pub marks: [u64; 3],
    pub sm: u32,
    pub block: u32,
    pub kernel: String,
}

impl BlockStamp {
    fn parse(b: &[u8]) -> BlockStamp {
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
        let name = &b[64..RECORD_BYTES];
        let len = name.iter().position(|&c| c == 0).unwrap_or(name.len());
        BlockStamp {
            grid: u64_at(0),
            enter: u64_at(8),
            waited: u64_at(16),
            exit: u64_at(24),
            marks: [u64_at(32), u64_at(40), u64_at(48)],
            sm: u32_at(56),
            block: u32_at(60),
            kernel: String::from_utf8_lossy(&name[..len]).into_owned(),
        }
    }
}

/// What the modules stamped since the last read: the blocks that found room, and how many did
/// not (each module holds STEP_TRACE_CAP).
#[derive(Default)]
pub struct StepTrace {
    pub stamps: Vec<BlockStamp>,
    pub dropped: usize,
}

/// Reads and clears the stamps of `modules` (None when they were not built with STEP_TRACE).
pub(crate) fn read(modules: &[&Arc<CudaModule>], stream: &Arc<CudaStream>) -> Result<Option<StepTrace>> {
    let mut out = StepTrace::default();
    let mut found = false;
    for m in modules {
        let (Ok(recs), Ok(mut n)) = (m.get_global("step_trace", stream), m.get_global("step_trace_n", stream)) else { continue };
        found = true;
        let count = u32::from_le_bytes(stream.clone_dtoh(&n).map_err(drv("step_trace"))?[..4].try_into().unwrap()) as usize;
        let kept = count.min(recs.len() / RECORD_BYTES);
        out.dropped += count - kept;
        let bytes = stream.clone_dtoh(&recs.slice(..kept * RECORD_BYTES)).map_err(drv("step_trace"))?;
        out.stamps.extend(bytes.chunks_exact(RECORD_BYTES).map(BlockStamp::parse));
        stream.memset_zeros(&mut n).map_err(drv("step_trace"))?;
    }
    Ok(found.then_some(out))
}

/// One launch: its blocks' first start, first and last pass of the PDL wait, last exit.
#[derive(Clone, Debug, PartialEq)]
pub struct LaunchSpan {
    pub grid: u64,
    pub kernel: String,
    pub blocks: usize,
    pub start: u64,
    pub first_waited: u64,
    pub last_waited: u64,
    pub end: u64,
}

/// Launches in order of their first block's start. A block may stamp twice in one run (a
/// kernel and a device function it calls each open a scope): it still counts once. A graph's
/// kernel node keeps its %gridid from replay to replay, so only each block's last run counts:
/// the stamps that end after that block's last start.
pub fn launches(stamps: &[BlockStamp]) -> Vec<LaunchSpan> {
    let mut by_grid: std::collections::BTreeMap<u64, (LaunchSpan, std::collections::BTreeSet<u32>)> = Default::default();
    for s in last_runs(stamps) {
        let e = by_grid.entry(s.grid).or_insert_with(|| {
            (LaunchSpan { grid: s.grid, kernel: s.kernel.clone(), blocks: 0, start: u64::MAX, first_waited: u64::MAX, last_waited: 0, end: 0 }, Default::default())
        });
        e.1.insert(s.block);
        let l = &mut e.0;
        l.start = l.start.min(s.enter);
        l.first_waited = l.first_waited.min(s.waited);
        l.last_waited = l.last_waited.max(s.waited);
        l.end = l.end.max(s.exit);
    }
    let mut v: Vec<LaunchSpan> = by_grid
        .into_values()
        .map(|(mut l, blocks)| {
            l.blocks = blocks.len();
            l
        })
        .collect();
    v.sort_by_key(|l| (l.start, l.end));
    v
}

/// The stamps of each block's last run (see `launches`).
pub fn last_runs(stamps: &[BlockStamp]) -> Vec<&BlockStamp> {
    let mut last_enter: std::collections::HashMap<(u64, u32), u64> = Default::default();
    for s in stamps {
        let e = last_enter.entry((s.grid, s.block)).or_insert(0);
        *e = (*e).max(s.enter);
    }
    stamps.iter().filter(|s| s.exit >= last_enter[&(s.grid, s.block)]).collect()
}

/// Each launch's exposed time: how far its end moved the timeline's end past every launch
/// before it (a launch hidden under its predecessor's tail counts 0; the first counts from its
/// own start). They sum to the span from the first start to the last end.
pub fn exposed_ns(launches: &[LaunchSpan]) -> Vec<u64> {
    let mut frontier = launches.first().map_or(0, |l| l.start);
    launches
        .iter()
        .map(|l| {
            let e = l.end.saturating_sub(frontier);
            frontier = frontier.max(l.end);
            e
        })
        .collect()
}

/// Stamps per block in the fused MoE kernel's trace (MOE_TRACE_SLOTS in kernels/moe.cu).
pub const MOE_TRACE_SLOTS: usize = 21;

/// The fused MoE kernel's stamps (`Kernels::moe_trace`, a `-DMOE_TRACE` build) as a table: for
/// each point of a block's work, microseconds after the first block passed its wait (min, p10,
/// median, p90, max over the blocks that reached it). `inter`: the experts' intermediate size;
/// `slots`: the call's expert slots. The blocks below the call's gate_up item count start with
/// one (moe_fused: `slots` x `gug` groups of 8 warps' 16-row tiles of the I / 8 interleaved
/// gate_up tiles; the rest start with a down item).
pub fn moe_trace_report(what: &str, tr: &[u64], inter: usize, slots: usize) -> String {
    use std::fmt::Write;
    let gu_items = (inter / 8).div_ceil(8) * slots;
    let blocks: Vec<&[u64]> = tr.chunks(MOE_TRACE_SLOTS).filter(|b| b[2] != 0).collect();
    let Some(t0) = blocks.iter().map(|b| b[2]).min() else { return String::new() };
    let rel = |v: u64| (v as f64 - t0 as f64) / 1e3;
    let mut out = format!("\ntrace: {what}: {} blocks; us after the first block passed its wait (min / p10 / median / p90 / max)\n", blocks.len());
    let mut row = |label: &str, vals: Vec<f64>| {
        if vals.is_empty() {
            return;
        }
        let mut v = vals;
        v.sort_by(f64::total_cmp);
        let p = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
        let _ = writeln!(out, "  {label:<34} {:>7.2} {:>7.2} {:>7.2} {:>7.2} {:>7.2}  (n={})", p(0.0), p(0.1), p(0.5), p(0.9), p(1.0), v.len());
    };
    let pick = |first_down: Option<bool>, item: usize, slot: usize| -> Vec<f64> {
        blocks
            .iter()
            .enumerate()
            .filter(|(bi, b)| b[3 + 5 * item] != 0 && first_down.is_none_or(|d| (*bi >= gu_items) == d))
            .map(|(_, b)| rel(b[3 + 5 * item + slot]))
            .collect()
    };
    row("entry (before the wait)", blocks.iter().map(|b| rel(b[1])).collect());
    row("past the wait", blocks.iter().map(|b| rel(b[2])).collect());
    // The routed kernels' routing: its loads in (moe_fused_acc only), route_token's phases, its
    // experts chosen.
    for (label, slot) in [
        ("routing: loads in", 15),
        ("routing: scores", 17),
        ("routing: top K (warp 0)", 18),
        ("routing: weights (warp 0)", 19),
        ("routing: grouped (warp 0)", 20),
        ("routing: experts chosen", 16),
    ] {
        row(label, blocks.iter().filter(|b| b[slot] != 0).map(|b| rel(b[slot])).collect());
    }
    let names = ["start", "past its gate_up wait", "activations staged", "weights streamed", "done"];
    for (label, first_down, item) in [("gate_up item", Some(false), 0), ("down item (first)", Some(true), 0), ("down item (second)", None, 1)] {
        for (si, n) in names.iter().enumerate() {
            // A gate_up item waits for nothing: its second stamp is its ring's first weight
            // copies asked for and the block's barrier after them.
            let n = if si == 1 && label.starts_with("gate_up") { "weights asked for" } else { n };
            row(&format!("{label}: {n}"), pick(first_down, item, si));
        }
    }
    row("exit", blocks.iter().map(|b| rel(b[13])).collect());
    let mut sms: Vec<u64> = blocks.iter().map(|b| b[0]).collect();
    sms.sort();
    sms.dedup();
    let _ = writeln!(out, "  on {} SMs", sms.len());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stamp(grid: u64, block: u32, enter: u64, waited: u64, exit: u64, kernel: &str) -> BlockStamp {
        BlockStamp { grid, enter, waited, exit, marks: [0; 3], sm: 0, block, kernel: kernel.into() }
    }

    #[test]
    fn a_record_parses_from_the_kernels_layout() {
        let mut b = vec![0u8; RECORD_BYTES];
        for (o, v) in [(0usize, 7u64), (8, 100), (16, 150), (24, 900), (32, 200), (48, 600)] {
            b[o..o + 8].copy_from_slice(&v.to_le_bytes());
        }
        b[56..60].copy_from_slice(&5u32.to_le_bytes());
        b[60..64].copy_from_slice(&42u32.to_le_bytes());
        b[64..64 + 12].copy_from_slice(b"gemv_mma_fp8");
        let mut want = stamp(7, 42, 100, 150, 900, "gemv_mma_fp8").with_sm(5);
        want.marks = [200, 0, 600];
        assert_eq!(BlockStamp::parse(&b), want);
        // A name filling the whole field has no terminator.
        b[64..].copy_from_slice(&[b'x'; 40]);
        assert_eq!(BlockStamp::parse(&b).kernel.len(), 40);
    }

    impl BlockStamp {
        fn with_sm(mut self, sm: u32) -> Self {
            self.sm = sm;
            self
        }
    }

    #[test]
    fn launches_group_blocks_by_grid_and_order_by_start() {
        let stamps = vec![
            stamp(9, 0, 300, 310, 500, "b"),
            stamp(4, 0, 100, 100, 250, "a"),
            stamp(4, 1, 120, 130, 400, "a"),
            // block 1 of grid 4 again, from a device function's own scope
            stamp(4, 1, 125, 140, 390, "a_inner"),
            // block 0 of grid 4 in an earlier replay of the same graph: left out
            stamp(4, 0, 10, 12, 20, "a"),
            stamp(9, 1, 280, 420, 450, "b"),
        ];
        let l = launches(&stamps);
        assert_eq!(l.len(), 2);
        assert_eq!((l[0].kernel.as_str(), l[0].blocks, l[0].start, l[0].first_waited, l[0].last_waited, l[0].end), ("a", 2, 100, 100, 140, 400));
        assert_eq!((l[1].kernel.as_str(), l[1].blocks, l[1].start, l[1].first_waited, l[1].last_waited, l[1].end), ("b", 2, 280, 310, 420, 500));
    }

    #[test]
    fn exposed_time_counts_only_what_moves_the_end() {
        let span = |start, end| LaunchSpan { grid: 0, kernel: String::new(), blocks: 1, start, first_waited: start, last_waited: start, end };
        // b ends inside a's span (hidden), c ends 50 past a, d starts after a gap.
        let l = vec![span(0, 100), span(20, 90), span(80, 150), span(200, 260)];
        assert_eq!(exposed_ns(&l), vec![100, 0, 50, 110]);
        assert_eq!(exposed_ns(&l).iter().sum::<u64>(), 260);
        assert!(exposed_ns(&[]).is_empty());
    }
}
