//! The engine's own host time per decode step: scheduling, committing, detokenising and
//! streaming, over a backend that answers at once (no device), on MiMo-V2-Flash's vocabulary
//! with a word-level tokenizer. Runs anywhere (no GPU).
//!
//!     cargo run --release -p peregrine-engine --example engine_overhead -- [PROMPT_TOKENS]
//!
//! Per batch size (1, 8, 64): that many greedy requests of PROMPT_TOKENS (default 16384) random
//! tokens decode 512 tokens each; reported is the median gap between request 0's tokens once
//! every prompt is in. At batch 1 the gaps are below the client's wake-up time and read ~0.

use std::sync::Arc;
use std::time::Instant;

use clap::Parser;
use peregrine_core::backend::{output_rows, Backend, KvBlockBytes, KvConfig, Logits, SeqForward};
use peregrine_core::{ModelSpec, Result, SamplingParams};
use peregrine_engine::*;

#[path = "common/mod.rs"]
mod common;

/// The engine's own host time per decode step, over a backend that answers at once.
#[derive(Parser)]
struct Args {
    /// Random prompt tokens of each request.
    #[arg(value_name = "PROMPT_TOKENS", default_value_t = 16384)]
    prompt: usize,
}

/// Answers every forward at once: prompt chunks with nothing, decode rows with a token derived
/// from the position.
struct NoDevice {
    spec: ModelSpec,
}

impl Backend for NoDevice {
    fn spec(&self) -> &ModelSpec {
        &self.spec
    }
    fn kv_block_bytes(&self, _block_size: usize) -> KvBlockBytes {
        KvBlockBytes { full: 1000, swa: 500 }
    }
    fn init_kv(&mut self, _config: KvConfig) -> Result<()> {
        Ok(())
    }
    fn forward(&mut self, batch: &[SeqForward]) -> Result<Vec<Logits>> {
        Ok(batch.iter().map(|_| Logits { rows: 0, data: vec![] }).collect())
    }
    fn forward_greedy(&mut self, batch: &[SeqForward]) -> Result<Option<Vec<Vec<u32>>>> {
        let vocab = self.spec.vocab_size as u32;
        Ok(Some(batch.iter().map(|s| (0..output_rows(std::slice::from_ref(s)).1[0]).map(|i| ((s.start_pos + i) as u32 * 7919 + 11) % vocab).collect()).collect()))
    }
    fn name(&self) -> &str {
        "instant"
    }
}

fn main() {
    let prompt = Args::parse().prompt;
    let text = std::fs::read_to_string("configs/mimo-v2-flash.json").expect("configs/mimo-v2-flash.json (run from the repository root)");
    let spec = peregrine_model::config::parse_config(&serde_json::from_str(&text).expect("json"), None).expect("config parses");
    let vocab = spec.vocab_size;
    let tok = Arc::new(common::word_tokenizer(vocab));
    let max_len = prompt + 600;
    let cfg = EngineConfig { max_num_seqs: 64, max_model_len: max_len, kv_cache_memory_bytes: 64 * max_len.div_ceil(16) * 1000 + (64 << 20), max_num_batched_tokens: 8192, ..Default::default() };
    let e = start_engine(Box::new(NoDevice { spec }), tok, cfg).expect("engine");
    for b in [1usize, 8, 64] {
        let rxs: Vec<_> = (0..b)
            .map(|i| {
                let stop = StopParams { max_tokens: 512, ignore_eos: true, skip_special_tokens: true, ..Default::default() };
                let prompt_tokens = (0..prompt).map(|j| ((i * 131 + j * 17 + b) % vocab) as u32).collect();
                e.submit(GenerateRequest { request_id: format!("{b}-{i}"), prompt_tokens, sampling: SamplingParams::greedy(), stop, prompt_logprobs: None, priority: 0, arrival: Instant::now(), cache_salt: None }).expect("submit")
            })
            .collect();
        let mut times = Vec::new();
        for (i, mut rx) in rxs.into_iter().enumerate() {
            while let Some(ev) = rx.blocking_recv() {
                match ev {
                    RequestEvent::Delta { .. } if i == 0 => times.push(Instant::now()),
                    RequestEvent::Finished { .. } => break,
                    RequestEvent::Error(err) => panic!("{err}"),
                    _ => {}
                }
            }
        }
        let gaps: Vec<f64> = times.windows(2).skip(2).map(|w| (w[1] - w[0]).as_secs_f64() * 1e6).collect();
        println!("prompt {prompt}, batch {b}: median {:.1} us per decode step ({} steps)", common::median(gaps), common::metric(&e, "peregrine:step_duration_seconds_count"));
    }
    e.shutdown();
}
