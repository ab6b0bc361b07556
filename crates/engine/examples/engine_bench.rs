//! Decoding through the engine on the CUDA backend with synthetic weights: what a client of
//! `start_engine` sees per output token at each batch size, for comparison with `step_bench`'s
//! step times (the same model, the same GPU). The gap between the two is the host's share of a
//! step: scheduling, the backend's uploads and downloads, detokenising and streaming.
//!
//!     cargo run --release -p peregrine-engine --example engine_bench -- \
//!         --config configs/mimo-v2-flash.json [--layers 18] [--batches 1,8,32,64] \
//!         [--prompt 128] [--tokens 64] [--temperature 0] [--no-overlap] [--max-num-seqs N] \
//!         [--kv-gib 3]
//!
//! Per batch size B: B requests of `--prompt` random tokens each are submitted together and
//! decode `--tokens` tokens (EOS ignored); one warm-up round of the same shape runs first (it
//! captures the step graphs and tunes nothing else). Reported: the median gap between request
//! 0's consecutive deltas (one decode step each once every prompt is in), B / that gap as output
//! tokens/s, and the mean of the engine's own step timer over the timed round (prefill steps
//! included), and the time to first token: request 0's first delta after the round's first
//! submission (its whole prompt prefilled, in chunks of at most 8192 tokens, beside the other
//! requests' prompts).
//! The tokenizer is a word-level one with one word per id of the config's vocabulary.
//! `--no-overlap` turns `EngineConfig::overlap_steps` off (each step committed before the next
//! one starts); the `overlapped` column counts steps started ahead of the round.
//! `--max-num-seqs N` (default: the largest batch) below a batch size leaves requests queued
//! behind full batches; the gap is then still request 0's, and tokens/s counts the N decoding.

#[path = "common/mod.rs"]
mod common;

use std::sync::Arc;
use std::time::Instant;

use clap::{ArgAction, Parser};
use peregrine_core::SamplingParams;
use peregrine_cuda::{probe, CudaModel};
use peregrine_engine::*;
use common::{median, metric};

/// Decoding through the engine on the CUDA backend with synthetic weights, per batch size.
#[derive(Parser)]
#[command(args_override_self = true)]
struct Args {
    /// Model config (synthetic weights of its shapes).
    #[arg(long, default_value = "configs/mimo-v2-flash.json")]
    config: String,
    /// Decoder layers of the config to keep.
    #[arg(long, default_value_t = 18)]
    layers: usize,
    /// Batch sizes to time, one round each (comma-separated).
    #[arg(long, default_value = "1,8,32,64", value_delimiter = ',', action = ArgAction::Set)]
    batches: Vec<usize>,
    /// Random prompt tokens of each request.
    #[arg(long, default_value_t = 128)]
    prompt: usize,
    /// Output tokens each request decodes (EOS ignored); at least 8, so the steady state has gaps
    /// to time.
    #[arg(long, default_value_t = 64, value_parser = at_least_8)]
    tokens: usize,
    /// Sampling temperature (0: greedy; seeded per request).
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Turn `EngineConfig::overlap_steps` off (each step committed before the next one starts).
    #[arg(long = "no-overlap", action = ArgAction::SetFalse)]
    overlap: bool,
    /// The engine's `max_num_seqs` (default: the largest batch).
    #[arg(long)]
    max_num_seqs: Option<usize>,
    /// KV cache memory in GiB.
    #[arg(long, default_value_t = 3.0)]
    kv_gib: f64,
}

fn at_least_8(s: &str) -> Result<usize, String> {
    let n: usize = s.parse().map_err(|e| format!("{e}"))?;
    if n < 8 {
        return Err("at least 8, so the steady state has gaps to time".into());
    }
    Ok(n)
}

/// One round of `b` requests decoding `tokens` tokens each: when the first was submitted, and
/// request 0's delta arrival times.
fn round(e: &EngineHandle, b: usize, a: &Args, vocab: usize, salt: u64) -> (Instant, Vec<Instant>) {
    // Distinct prompts (a simple LCG over the vocabulary), so no prefix-cache hits.
    let mut x = salt.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    let mut next = || {
        x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((x >> 33) % vocab as u64) as u32
    };
    let submitted = Instant::now();
    let rxs: Vec<_> = (0..b)
        .map(|i| {
            let sampling = SamplingParams { temperature: a.temperature, seed: Some(i as u64), ..SamplingParams::greedy() };
            e.submit(GenerateRequest {
                request_id: format!("r{salt}-{i}"),
                prompt_tokens: (0..a.prompt).map(|_| next()).collect(),
                sampling,
                stop: StopParams { max_tokens: a.tokens, ignore_eos: true, skip_special_tokens: true, ..Default::default() },
                prompt_logprobs: None,
                priority: 0,
                arrival: Instant::now(),
                cache_salt: None,
            })
            .expect("submit")
        })
        .collect();
    let mut times = Vec::new();
    for (i, mut rx) in rxs.into_iter().enumerate() {
        let mut got = 0;
        while let Some(ev) = rx.blocking_recv() {
            match ev {
                RequestEvent::Delta { token_ids, .. } => {
                    got += token_ids.len();
                    if i == 0 {
                        times.push(Instant::now());
                    }
                }
                RequestEvent::Finished { .. } => break,
                RequestEvent::Error(err) => panic!("request {i}: {err}"),
                RequestEvent::PromptLogprobs(_) => {}
            }
        }
        assert_eq!(got, a.tokens, "request {i} decoded {got} of {} tokens", a.tokens);
    }
    (submitted, times)
}

fn main() {
    let a = Args::parse();
    let gpu = match probe(0) {
        Ok(g) => g,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    let text = std::fs::read_to_string(&a.config).expect("config");
    let mut spec = peregrine_model::config::parse_config(&serde_json::from_str(&text).expect("json"), None).expect("config parses");
    spec.layers.truncate(a.layers);
    let vocab = spec.vocab_size;
    println!("GPU {}; {} layers of {}; prompts {} tokens, {} output tokens, temperature {}, overlapped steps {}", gpu.name, spec.layers.len(), a.config, a.prompt, a.tokens, a.temperature, if a.overlap { "on" } else { "off" });
    let t0 = Instant::now();
    let model = CudaModel::synthetic(gpu, &spec, 1).expect("synthetic weights");
    println!("synthetic weights in {:.1} s", t0.elapsed().as_secs_f64());
    let tok = Arc::new(common::word_tokenizer(vocab));
    let max_b = a.batches.iter().copied().max().unwrap_or(1);
    let cfg = EngineConfig {
        max_num_seqs: a.max_num_seqs.unwrap_or(max_b),
        max_model_len: a.prompt + a.tokens + 16,
        kv_cache_memory_bytes: (a.kv_gib * (1u64 << 30) as f64) as usize,
        max_num_batched_tokens: 8192,
        overlap_steps: a.overlap,
        ..EngineConfig::default()
    };
    let e = start_engine(Box::new(model), tok, cfg).expect("engine");
    println!("{:>5} {:>12} {:>12} {:>14} {:>12} {:>11} {:>10}", "batch", "gap_p50_ms", "gap_p90_ms", "tokens/s", "step_ms_avg", "overlapped", "ttft_ms");
    for (salt, &b) in a.batches.iter().enumerate() {
        round(&e, b, &a, vocab, 1000 + salt as u64);
        let (s0, n0) = (metric(&e, "peregrine:step_duration_seconds_sum"), metric(&e, "peregrine:step_duration_seconds_count"));
        let o0 = metric(&e, "peregrine:overlapped_steps_total");
        let (submitted, times) = round(&e, b, &a, vocab, salt as u64);
        let ttft = (times[0] - submitted).as_secs_f64() * 1e3;
        let (s1, n1) = (metric(&e, "peregrine:step_duration_seconds_sum"), metric(&e, "peregrine:step_duration_seconds_count"));
        let overlapped = metric(&e, "peregrine:overlapped_steps_total") - o0;
        // Gaps after every prompt is in: request 0's first delta comes with the prefill steps.
        let gaps: Vec<f64> = times.windows(2).skip(2).map(|w| (w[1] - w[0]).as_secs_f64() * 1e3).collect();
        let p50 = median(gaps.clone());
        let mut sorted = gaps;
        sorted.sort_by(f64::total_cmp);
        let p90 = sorted[sorted.len() * 9 / 10];
        let step_avg = if n1 > n0 { (s1 - s0) / (n1 - n0) * 1e3 } else { f64::NAN };
        // Sequences decoding together (the rest wait behind them).
        let running = b.min(a.max_num_seqs.unwrap_or(b));
        println!("{b:>5} {p50:>12.3} {p90:>12.3} {:>14.1} {step_avg:>12.3} {overlapped:>11} {ttft:>10.1}", running as f64 / (p50 / 1e3));
    }
    e.shutdown();
}
