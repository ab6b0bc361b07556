//! The real CPU model behind the engine: greedy output (batched, chunked prefill, paged KV with
//! sliding-window release) equals plain greedy decoding with the model run directly.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use peregrine_core::SamplingParams;
use peregrine_cpu::CpuModel;
use peregrine_engine::*;
use peregrine_model::loader::open_model;
use peregrine_model::tokenizer::Tokenizer;

const FIX: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/golden/default");

fn load() -> CpuModel {
    let files = open_model(FIX).unwrap();
    CpuModel::load(&files.spec, files.weights.as_ref()).unwrap()
}

#[test]
fn engine_greedy_equals_direct_greedy() {
    let n_out = 24;
    let prompts: Vec<Vec<u32>> = [5usize, 20, 37].iter().enumerate().map(|(k, &n)| (0..n).map(|i| 10 + ((i * 7 + k * 3) % 90) as u32).collect()).collect();
    let mut direct = load();
    let mut expected = Vec::new();
    for p in &prompts {
        let mut toks = p.clone();
        for _ in 0..n_out {
            let rows = direct.forward_sequence(&toks).unwrap();
            toks.push(peregrine_engine::sampler::argmax(rows.last().unwrap()));
        }
        expected.push(toks[p.len()..].to_vec());
    }
    let tok = Arc::new(Tokenizer::from_file(&Path::new(FIX).join("tokenizer.json")).unwrap());
    let cfg = EngineConfig { max_num_seqs: 4, max_num_batched_tokens: 16, max_model_len: 128, kv_cache_memory_bytes: 4 << 20, gpu_memory_utilization: None, block_size: 4, max_waiting: 16, enable_prefix_caching: true, speculative_block_size: None, model_name: None, overlap_steps: true, speculation: SpeculationMode::Always, kv_cache_dtype: None };
    let e = start_engine(Box::new(load()), tok, cfg).unwrap();
    let rxs: Vec<_> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            e.submit(GenerateRequest {
                request_id: format!("r{i}"),
                prompt_tokens: p.clone(),
                sampling: SamplingParams::greedy(),
                stop: StopParams { max_tokens: n_out, ignore_eos: true, skip_special_tokens: true, ..Default::default() },
                prompt_logprobs: None,
                priority: 0,
                arrival: Instant::now(),
                cache_salt: None,
            })
            .unwrap()
        })
        .collect();
    let mut outs = Vec::new();
    for (mut rx, want) in rxs.into_iter().zip(expected.clone()) {
        let mut got = Vec::new();
        while let Some(ev) = rx.blocking_recv() {
            match ev {
                RequestEvent::Delta { token_ids, .. } => got.extend(token_ids),
                RequestEvent::Finished { reason, .. } => {
                    assert_eq!(reason, FinishReason::Length);
                    break;
                }
                RequestEvent::Error(e) => panic!("{e}"),
                _ => {}
            }
        }
        assert_eq!(got, want);
        outs.push(got);
    }
    // Prefix caching with sliding-window layers (window 16): the same prompt again hits the
    // cache and still decodes the same tokens.
    let mut rx = e
        .submit(GenerateRequest {
            request_id: "again".into(),
            prompt_tokens: prompts[2].clone(),
            sampling: SamplingParams::greedy(),
            stop: StopParams { max_tokens: n_out, ignore_eos: true, skip_special_tokens: true, ..Default::default() },
            prompt_logprobs: None,
            priority: 0,
            arrival: Instant::now(),
            cache_salt: None,
        })
        .unwrap();
    let mut got = Vec::new();
    while let Some(ev) = rx.blocking_recv() {
        match ev {
            RequestEvent::Delta { token_ids, .. } => got.extend(token_ids),
            RequestEvent::Finished { usage, .. } => {
                assert_eq!(usage.cached_tokens, 36);
                break;
            }
            RequestEvent::Error(e) => panic!("{e}"),
            _ => {}
        }
    }
    assert_eq!(got, expected[2]);
    e.shutdown();
    assert_eq!(e.stats().kv_usage, 0.0);
}
