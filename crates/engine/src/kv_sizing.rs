//! Sizing the KV cache to a fraction of the device's memory (`gpu_memory_utilization`), as
//! vLLM's `--gpu-memory-utilization` does, instead of a byte count the user must guess.
//!
//! The weights are loaded when the engine starts, but a step's own buffers (activations, the
//! decode graphs and what they hold) appear only when steps run, and a KV cache that takes
//! that room leaves graphs uncapturable or steps failing for memory. So the engine first runs
//! the largest steps it will ever schedule on a small KV cache, with the backend keeping every
//! byte it frees (`Backend::hold_freed_memory`): a prefill chunk of `max_num_batched_tokens`
//! tokens, a decode step of `max_num_seqs` rows at the last position `max_model_len` allows
//! (greedy and sampled, which capture their graphs), and with a drafter a verify step. What the
//! device then has in use, less the small cache, is what serving needs besides the KV cache;
//! the cache gets the rest of `utilization` x the device's memory.

use peregrine_core::backend::{Backend, KvBlockBytes, KvConfig, OutputRows, RowSampling, SeqForward};
use peregrine_core::{Error, Result};

use crate::api::EngineConfig;

/// What the sizing found (logged by the engine).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvSizing {
    /// Bytes for the KV cache.
    pub kv_bytes: usize,
    /// The device's memory.
    pub total: usize,
    /// In use after the profiling steps, their small KV cache not counted: weights, the steps'
    /// buffers at their peak, graphs (and anything else on the device, other processes too).
    pub in_use: usize,
}

/// Bytes for the KV cache when it gets what is left of `utilization` x the device's memory
/// (see the module docs). `bytes`: one block of each group; `num_swa`: sliding-window blocks
/// the cache will hold (so the profile's tables are shaped like serving's); `spec_block`: the
/// speculative block size when a drafter speculates. Leaves the backend's KV pools at the
/// profile's small size (the caller initialises them again).
pub fn kv_bytes_for_utilization(backend: &mut dyn Backend, config: &EngineConfig, utilization: f64, bytes: KvBlockBytes, num_swa: usize, spec_block: Option<usize>) -> Result<KvSizing> {
    if !(utilization > 0.0 && utilization <= 1.0) {
        return Err(Error::config("gpu_memory_utilization", format!("{utilization} is not in (0, 1]")));
    }
    if backend.device_memory()?.is_none() {
        return Err(Error::config(
            "gpu_memory_utilization",
            format!("the {} backend holds its KV cache in host memory: size it in bytes (kv_cache_memory_bytes, --kv-cache-memory)", backend.name()),
        ));
    }
    let bs = config.block_size;
    let chunk = config.max_num_batched_tokens.min(config.max_model_len);
    // Blocks for the prefill chunk, one more, and at least the verify step's block.
    let full_blocks = chunk.div_ceil(bs) + spec_block.map_or(0, |b| b.div_ceil(bs)) + 1;
    let swa_blocks = if num_swa > 0 { full_blocks } else { 0 };
    let profile_kv = full_blocks * bytes.full + swa_blocks * bytes.swa;
    backend.init_kv(KvConfig { block_size: bs, num_full_blocks: full_blocks, num_swa_blocks: swa_blocks })?;
    backend.hold_freed_memory(true)?;
    let profiled = profile_steps(backend, config, chunk, full_blocks, swa_blocks, spec_block).and_then(|_| backend.device_memory());
    let released = backend.hold_freed_memory(false);
    let mem = profiled.map_err(|e| Error::Backend(format!("the profiling step that sizes the KV cache failed: {e}")))?;
    released?;
    let mem = mem.ok_or_else(|| Error::Backend("the backend stopped reporting its device memory".into()))?;
    let in_use = mem.total.saturating_sub(mem.free).saturating_sub(profile_kv);
    let budget = (utilization * mem.total as f64) as usize;
    if budget <= in_use {
        return Err(Error::config(
            "gpu_memory_utilization",
            format!(
                "{utilization} of the device's {} bytes is {budget} bytes, but the weights and the largest step's buffers already take {in_use} bytes: raise it, or lower max_num_seqs / max_num_batched_tokens / max_model_len",
                mem.total
            ),
        ));
    }
    Ok(KvSizing { kv_bytes: budget - in_use, total: mem.total, in_use })
}

/// The largest steps the engine schedules, on `full_blocks` / `swa_blocks` of KV (tables
/// cycle through them: their contents do not matter here).
fn profile_steps(backend: &mut dyn Backend, config: &EngineConfig, chunk: usize, full_blocks: usize, swa_blocks: usize, spec_block: Option<usize>) -> Result<()> {
    let bs = config.block_size;
    let table = |len: usize, blocks: usize| -> Vec<u32> { (0..len).map(|j| (j % blocks.max(1)) as u32).collect() };
    let seq = |id: usize, tokens: usize, start: usize, output: OutputRows| {
        let len = (start + tokens).div_ceil(bs);
        SeqForward { seq_id: id as u64, tokens: vec![0; tokens], start_pos: start, full_blocks: table(len, full_blocks), swa_blocks: table(len, swa_blocks), output }
    };
    // A prefill chunk from position 0.
    backend.forward(&[seq(0, chunk, 0, OutputRows::Last)])?;
    // A full decode batch at the last position: greedy, then sampled (their graphs).
    let rows = config.max_num_seqs.min(config.max_num_batched_tokens).max(1);
    let last = config.max_model_len - 1;
    let decode: Vec<SeqForward> = (0..rows).map(|i| seq(i, 1, last, OutputRows::Last)).collect();
    if backend.forward_greedy(&decode)?.is_none() {
        backend.forward(&decode)?;
    }
    let sampling = vec![RowSampling { temperature: 1.0, top_k: 0, top_p: 1.0, min_p: 0.0, u: 0.5, adj_start: 0, adj_len: 0 }; rows];
    backend.forward_sampled(&decode, &sampling, &[])?;
    // A verify step: as many blocks of drafts as a step takes, each ending at the last position.
    if let Some(b) = spec_block.filter(|&b| b <= config.max_model_len) {
        let seqs = (config.max_num_batched_tokens / b).min(config.max_num_seqs).max(1);
        let verify: Vec<SeqForward> = (0..seqs).map(|i| seq(i, b, config.max_model_len - b, OutputRows::All)).collect();
        if backend.forward_greedy(&verify)?.is_none() {
            backend.forward(&verify)?;
        }
    }
    Ok(())
}
