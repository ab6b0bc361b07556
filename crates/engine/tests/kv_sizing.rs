//! The KV cache sized to a fraction of a device's memory (`gpu_memory_utilization`), over a mock
//! device whose free memory is its total less the weights, the KV pools and what its steps
//! hold (kept at their peak while the engine asks it to hold freed memory).

use std::path::Path;
use std::sync::{Arc, Mutex};

use peregrine_core::backend::*;
use peregrine_core::{ModelSpec, Result};
use peregrine_engine::*;
use peregrine_model::tokenizer::Tokenizer;

const FIX: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/golden/default");
const TOTAL: usize = 1_000_000_000;
const WEIGHTS: usize = 300_000_000;
/// Bytes a step's buffers take per token it computes.
const PER_TOKEN: usize = 10_000;
/// Bytes of one full-attention KV block.
const BLOCK: usize = 100_000;

struct DeviceMock {
    spec: ModelSpec,
    /// False: a backend in host memory (no device memory to report).
    device: bool,
    kv_bytes: usize,
    holding: bool,
    /// Bytes of freed step buffers the device still holds.
    held: usize,
    /// Fail every forward (a profiling step that cannot run).
    fail: bool,
    log: Arc<Mutex<Vec<String>>>,
}

impl DeviceMock {
    fn step(&mut self, what: &str, batch: &[SeqForward]) -> Result<()> {
        if self.fail {
            return Err(peregrine_core::Error::Backend("out of memory".into()));
        }
        let tokens: usize = batch.iter().map(|s| s.tokens.len()).sum();
        let starts: Vec<usize> = batch.iter().map(|s| s.start_pos).collect();
        self.log.lock().unwrap().push(format!("{what} {} seqs {tokens} tokens from {:?}", batch.len(), starts.iter().min().zip(starts.iter().max())));
        if self.holding {
            self.held = self.held.max(tokens * PER_TOKEN);
        }
        Ok(())
    }
}

impl Backend for DeviceMock {
    fn spec(&self) -> &ModelSpec {
        &self.spec
    }
    fn kv_block_bytes(&self, _bs: usize) -> KvBlockBytes {
        KvBlockBytes { full: BLOCK, swa: 0 }
    }
    fn init_kv(&mut self, c: KvConfig) -> Result<()> {
        self.kv_bytes = c.num_full_blocks * BLOCK;
        self.log.lock().unwrap().push(format!("init_kv {} full {} swa", c.num_full_blocks, c.num_swa_blocks));
        Ok(())
    }
    fn forward(&mut self, batch: &[SeqForward]) -> Result<Vec<Logits>> {
        self.step("forward", batch)?;
        let v = self.spec.vocab_size;
        Ok(batch
            .iter()
            .map(|s| {
                let rows = match s.output {
                    OutputRows::None => 0,
                    OutputRows::Last => 1,
                    OutputRows::All => s.tokens.len(),
                };
                Logits { rows, data: vec![0.0; rows * v] }
            })
            .collect())
    }
    fn forward_greedy(&mut self, batch: &[SeqForward]) -> Result<Option<Vec<Vec<u32>>>> {
        self.step("greedy", batch)?;
        Ok(Some(batch.iter().map(|_| vec![0]).collect()))
    }
    fn forward_sampled(&mut self, batch: &[SeqForward], rows: &[RowSampling], _adjust: &[LogitAdjust]) -> Result<Option<Vec<Vec<u32>>>> {
        assert_eq!(rows.len(), batch.len(), "one sampling row per decode row");
        self.step("sampled", batch)?;
        Ok(Some(batch.iter().map(|_| vec![0]).collect()))
    }
    fn name(&self) -> &str {
        "mock-device"
    }
    fn device_memory(&mut self) -> Result<Option<DeviceMemory>> {
        Ok(self.device.then(|| DeviceMemory { free: TOTAL - WEIGHTS - self.kv_bytes - self.held, total: TOTAL }))
    }
    fn hold_freed_memory(&mut self, on: bool) -> Result<()> {
        self.holding = on;
        if !on {
            self.held = 0;
        }
        self.log.lock().unwrap().push(format!("hold {on}"));
        Ok(())
    }
}

fn config(utilization: f64) -> EngineConfig {
    EngineConfig { max_num_seqs: 8, max_num_batched_tokens: 64, max_model_len: 256, block_size: 4, gpu_memory_utilization: Some(utilization), ..EngineConfig::default() }
}

fn start(device: bool, fail: bool, cfg: EngineConfig) -> (std::result::Result<EngineHandle, peregrine_core::Error>, Vec<String>) {
    let spec = peregrine_model::config::load_spec(Path::new(FIX)).unwrap();
    let log = Arc::new(Mutex::new(Vec::new()));
    let mock = DeviceMock { spec, device, kv_bytes: 0, holding: false, held: 0, fail, log: log.clone() };
    let tok = Arc::new(Tokenizer::from_file(&Path::new(FIX).join("tokenizer.json")).unwrap());
    let e = start_engine(Box::new(mock), tok, cfg);
    let log = log.lock().unwrap().clone();
    (e, log)
}

#[test]
fn the_kv_cache_gets_what_is_left_of_the_fraction_after_the_largest_steps() {
    let (e, log) = start(true, false, config(0.5));
    let e = e.unwrap();
    // The profile: a small cache for the 64-token chunk (16 blocks and one more), the largest
    // steps held at their peak, then the real cache.
    let want = [
        "init_kv 17 full 0 swa",
        "hold true",
        "forward 1 seqs 64 tokens from Some((0, 0))",
        "greedy 8 seqs 8 tokens from Some((255, 255))",
        "sampled 8 seqs 8 tokens from Some((255, 255))",
        "hold false",
    ];
    assert_eq!(&log[..want.len()], want, "{log:?}");
    // Half the device, less the weights and the prefill chunk's buffers at their peak; the
    // profile's own small cache is not counted as in use.
    let kv = TOTAL / 2 - WEIGHTS - 64 * PER_TOKEN;
    assert_eq!(log[want.len()], format!("init_kv {} full 0 swa", kv / BLOCK), "{log:?}");
    assert_eq!(e.stats().total_full_blocks, kv / BLOCK);
    e.shutdown();
}

#[test]
fn too_small_a_fraction_a_host_backend_and_a_failed_profile_are_clear_errors() {
    // 0.2 of the device is less than the weights alone.
    let (e, _) = start(true, false, config(0.2));
    let err = e.err().unwrap().to_string();
    assert!(err.contains("gpu_memory_utilization") && err.contains(&format!("{}", TOTAL / 5)) && err.contains(&format!("{}", WEIGHTS + 64 * PER_TOKEN)), "{err}");
    // A fraction that leaves less than one sequence of max_model_len (64 blocks).
    let (e, _) = start(true, false, config((WEIGHTS + 64 * PER_TOKEN + 10 * BLOCK) as f64 / TOTAL as f64));
    let err = e.err().unwrap().to_string();
    assert!(err.contains("gpu_memory_utilization") && err.contains("needs 64 blocks"), "{err}");
    // A backend in host memory has no device memory to take a fraction of.
    let (e, log) = start(false, false, config(0.9));
    let err = e.err().unwrap().to_string();
    assert!(err.contains("kv_cache_memory_bytes") && log.is_empty(), "{err} {log:?}");
    // Out of range.
    let (e, _) = start(true, false, config(1.5));
    assert!(e.err().unwrap().to_string().contains("not in (0, 1]"));
    // A profiling step that fails: reported as such, and the held memory given back.
    let (e, log) = start(true, true, config(0.9));
    let err = e.err().unwrap().to_string();
    assert!(err.contains("profiling step") && err.contains("out of memory"), "{err}");
    assert_eq!(log.last().map(String::as_str), Some("hold false"), "{log:?}");
}

/// `kv_cache_dtype` reaches the backend before the cache is sized; a backend holding only f32
/// pools refuses BF16 with a clear error, before any KV memory is allocated.
#[test]
fn a_kv_cache_dtype_the_backend_cannot_hold_is_a_clear_error_before_sizing() {
    let cfg = EngineConfig { kv_cache_dtype: Some(peregrine_core::KvDtype::Bf16), ..config(0.5) };
    let (e, log) = start(true, false, cfg);
    let err = e.err().expect("BF16 pools refused").to_string();
    assert!(err.contains("kv_cache_dtype") && err.contains("mock-device") && err.contains("bfloat16"), "{err}");
    assert!(log.is_empty(), "nothing allocated or run: {log:?}");
    let (e, _) = start(true, false, EngineConfig { kv_cache_dtype: Some(peregrine_core::KvDtype::F32), ..config(0.5) });
    let e = e.unwrap();
    // The cache's settings as vLLM exports them.
    let blocks = e.stats().total_full_blocks;
    let info = e.render_metrics().lines().find(|l| l.starts_with("vllm:cache_config_info{")).map(str::to_string).expect("vllm:cache_config_info");
    for label in ["block_size=\"4\"", "cache_dtype=\"float32\"", "enable_prefix_caching=\"true\"", &format!("num_gpu_blocks=\"{blocks}\"")] {
        assert!(info.contains(label), "{label} in {info}");
    }
    assert!(info.ends_with(" 1"), "{info}");
    e.shutdown();
}
