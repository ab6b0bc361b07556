//! Speculative decoding on the CPU backend: acceptance length and output tokens/s with and without
//! the drafter, greedy and at temperature 0.7, over held-out prompts.
//!
//!     cargo run --release -p peregrine-engine --example spec_bench -- \
//!         [MODEL_DIR] [PROMPTS_JSON] [MAX_TOKENS] [CONCURRENCY] [cpu|cuda]
//!
//! Defaults: models/peregrine-mimo-tiny (drafter: its dflash/), benches/data/heldout_prompts.json,
//! 128 tokens, concurrency 1 (requests one after another). Acceptance length = tokens committed
//! per verify round = 1 + accepted drafts per round.

#[path = "common/mod.rs"]
mod common;

use std::sync::Arc;
use std::time::Instant;

use clap::Parser;
use peregrine_core::backend::Backend;
use peregrine_core::SamplingParams;
use peregrine_cpu::CpuModel;
use peregrine_engine::*;
use peregrine_model::dflash::{bundled_drafter, open_drafter};
use peregrine_model::loader::open_model;
use common::metric;

/// Speculative decoding: acceptance length and output tokens/s with and without the drafter.
#[derive(Parser)]
struct Args {
    /// The target model's directory (with its drafter in dflash/).
    #[arg(value_name = "MODEL_DIR", default_value = "models/peregrine-mimo-tiny")]
    model: String,
    /// The prompts: a JSON object whose "prompts" array holds objects with a "prompt" string.
    #[arg(value_name = "PROMPTS_JSON", default_value = "benches/data/heldout_prompts.json")]
    prompts_path: String,
    /// Output tokens per request (EOS ignored).
    #[arg(value_name = "MAX_TOKENS", default_value_t = 128)]
    max_tokens: usize,
    /// Requests in flight together (1: one after another).
    #[arg(value_name = "CONCURRENCY", default_value_t = 1)]
    conc: usize,
    /// The backend.
    #[arg(value_name = "DEVICE", default_value = "cpu", value_parser = ["cpu", "cuda"])]
    device: String,
}

/// The target model on `device`, with the drafter attached when given.
fn load(device: &str, files: &peregrine_model::loader::ModelFiles, drafter: Option<&peregrine_model::dflash::DraftFiles>) -> Box<dyn Backend> {
    if device == "cuda" {
        let mut m = peregrine_cuda::CudaModel::load(peregrine_cuda::probe(0).unwrap(), &files.spec, files.weights.as_ref()).unwrap();
        if let Some(d) = drafter {
            m.attach_drafter(d).unwrap();
        }
        return Box::new(m);
    }
    let mut m = CpuModel::load(&files.spec, files.weights.as_ref()).unwrap();
    if let Some(d) = drafter {
        m.attach_drafter(d).unwrap();
    }
    Box::new(m)
}

/// Median wall time of one verify forward of n = 1..8 tokens after a 256-token context, and of one
/// draft pass of 7 drafts.
fn cost_breakdown(device: &str, files: &peregrine_model::loader::ModelFiles, drafter: &peregrine_model::dflash::DraftFiles, prompt: &[u32]) {
    use peregrine_core::backend::{DraftForward, KvConfig, OutputRows, SeqForward};
    let mut m = load(device, files, Some(drafter));
    let bs = 16;
    m.init_kv(KvConfig { block_size: bs, num_full_blocks: 64, num_swa_blocks: 64 }).unwrap();
    let table: Vec<u32> = (0..64).collect();
    let ctx: Vec<u32> = prompt.iter().copied().cycle().take(256).collect();
    let fwd = |m: &mut Box<dyn Backend>, tokens: Vec<u32>, start: usize, output| {
        m.forward(&[SeqForward { seq_id: 1, tokens, start_pos: start, full_blocks: table.clone(), swa_blocks: table.clone(), output }]).unwrap();
    };
    fwd(&mut m, ctx.clone(), 0, OutputRows::None);
    let median = |f: &mut dyn FnMut()| {
        let mut t: Vec<f64> = (0..25).map(|_| { let t0 = Instant::now(); f(); t0.elapsed().as_secs_f64() * 1e3 }).collect();
        t.sort_by(f64::total_cmp);
        t[12]
    };
    let one = median(&mut || fwd(&mut m, vec![ctx[0]], 256, OutputRows::All));
    let mut line = "verify forward ms (x of 1 token):".to_string();
    for n in [1, 2, 4, 8] {
        let t = median(&mut || fwd(&mut m, ctx[..n].to_vec(), 256, OutputRows::All));
        line += &format!(" n={n}: {t:.2} ({:.2}x)", t / one);
    }
    println!("{line}");
    let d = median(&mut || {
        m.draft(&[DraftForward { seq_id: 1, last_token: ctx[0], start_pos: 256, num_drafts: 7, full_blocks: table.clone() }]).unwrap();
    });
    println!("draft pass (7 drafts) ms: {d:.2} ({:.2}x a 1-token forward)", d / one);
    // The same forward without a drafter: what writing the drafter's context K/V costs a step.
    let mut bare = load(device, files, None);
    bare.init_kv(KvConfig { block_size: bs, num_full_blocks: 64, num_swa_blocks: 64 }).unwrap();
    fwd(&mut bare, ctx.clone(), 0, OutputRows::None);
    let plain = median(&mut || fwd(&mut bare, vec![ctx[0]], 256, OutputRows::All));
    println!("1-token forward without the drafter ms: {plain:.2} (with it {one:.2}: {:+.1}%)", (one / plain - 1.0) * 100.0);
    // Decode steps over a whole block, per step: a backend that defers the drafter's context
    // (CUDA) stages it each step and writes it when the block fills, so one step alone
    // understates what the context costs.
    let per_block = |m: &mut Box<dyn Backend>| median(&mut || (256..256 + bs).for_each(|p| fwd(m, vec![ctx[p % ctx.len()]], p, OutputRows::Last))) / bs as f64;
    let (plain_b, one_b) = (per_block(&mut bare), per_block(&mut m));
    println!("1-token forwards over a block of {bs}, per step, without the drafter ms: {plain_b:.3} (with it {one_b:.3}: {:+.1}%)", (one_b / plain_b - 1.0) * 100.0);
}

fn main() {
    let Args { model, prompts_path, max_tokens, conc, device } = Args::parse();
    let mut files = open_model(&model).unwrap();
    let tok = Arc::new(files.tokenizer.take().unwrap());
    let prompts: serde_json::Value = serde_json::from_slice(&std::fs::read(&prompts_path).unwrap()).unwrap();
    let prompts: Vec<Vec<u32>> = prompts["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| tok.encode(p["prompt"].as_str().unwrap(), false).unwrap())
        .collect();
    let drafter = open_drafter(&bundled_drafter(&files.dir).expect("the model has no dflash/ drafter")).unwrap();
    println!("model {model} on {device}, {} prompts, {max_tokens} tokens each, concurrency {conc}, rayon threads {}", prompts.len(), rayon::current_num_threads());
    cost_breakdown(&device, &files, &drafter, &prompts[0]);
    println!("{:<8} {:<6} {:>9} {:>10} {:>12} {:>10}", "sampling", "spec", "tokens", "seconds", "tokens/s", "accept_len");
    for (label, temp) in [("greedy", 0.0f32), ("T=0.7", 0.7)] {
        let mut base_tps = 0.0;
        // Without the drafter, speculating on every step, and the adaptive policy (the default).
        for (spec, mode) in [(false, SpeculationMode::Always), (true, SpeculationMode::Always), (true, SpeculationMode::Adaptive)] {
            let m = load(&device, &files, spec.then_some(&drafter));
            let cfg = EngineConfig { max_num_seqs: conc.max(1), max_model_len: 1024, kv_cache_memory_bytes: 256 << 20, speculation: mode, ..EngineConfig::default() };
            let e = start_engine(m, tok.clone(), cfg).unwrap();
            let t0 = Instant::now();
            let mut total = 0;
            for chunk in prompts.chunks(conc.max(1)) {
                let rxs: Vec<_> = chunk
                    .iter()
                    .enumerate()
                    .map(|(i, p)| {
                        // Seeded, so each mode samples the same texts; but the adaptive policy
                        // runs unseeded ones, since on a backend whose rows round apart (the
                        // GPU's) it decodes seeded sampling requests plainly.
                        let seed = (mode == SpeculationMode::Always || temp == 0.0).then_some(i as u64);
                        let sampling = SamplingParams { temperature: temp, seed, ..SamplingParams::greedy() };
                        e.submit(GenerateRequest {
                            request_id: format!("b{i}"),
                            prompt_tokens: p.clone(),
                            sampling,
                            stop: StopParams { max_tokens, ignore_eos: true, skip_special_tokens: true, ..Default::default() },
                            prompt_logprobs: None,
                            priority: 0,
                            arrival: Instant::now(),
                            cache_salt: None,
                        })
                        .unwrap()
                    })
                    .collect();
                for mut rx in rxs {
                    while let Some(ev) = rx.blocking_recv() {
                        match ev {
                            RequestEvent::Finished { usage, .. } => {
                                total += usage.completion_tokens;
                                break;
                            }
                            RequestEvent::Error(err) => panic!("{err}"),
                            _ => {}
                        }
                    }
                }
            }
            let secs = t0.elapsed().as_secs_f64();
            let tps = total as f64 / secs;
            let rounds = metric(&e, "vllm:spec_decode_num_drafts_total");
            let accepted = metric(&e, "vllm:spec_decode_num_accepted_tokens_total");
            let acc = if rounds > 0.0 { format!("{:.2}", (rounds + accepted) / rounds) } else { "-".into() };
            if !spec {
                base_tps = tps;
            }
            let fused = metric(&e, "peregrine:spec_decode_fused_steps_total");
            let plain = metric(&e, "peregrine:spec_decode_plain_steps_total");
            let speedup = if spec { format!("  ({:.2}x; {fused} steps drafted, verified and accepted in one backend call; {plain} steps plain by the policy)", tps / base_tps) } else { String::new() };
            let name = match (spec, mode) {
                (false, _) => "off",
                (true, SpeculationMode::Always) => "dflash",
                (true, SpeculationMode::Adaptive) => "adapt",
            };
            println!("{label:<8} {name:<6} {total:>9} {secs:>10.2} {tps:>12.1} {acc:>10}{speedup}");
            e.shutdown();
        }
    }
}
