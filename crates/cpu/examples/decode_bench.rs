//! CPU decode throughput of the reference backend: tokens/s at batch 1 and 8, on a model
//! directory (e.g. a golden fixture) or on a synthetic ~30M-parameter MiMo-V2-shaped model with
//! random weights.
//!
//!     cargo run --release -p peregrine-cpu --example decode_bench -- [MODEL_DIR]

use std::time::Instant;

use clap::Parser;
use peregrine_core::backend::{Backend, KvConfig, OutputRows, SeqForward};
use peregrine_cpu::CpuModel;
use peregrine_model::synthetic::SyntheticWeights;

/// CPU decode throughput of the reference backend at batch 1 and 8.
#[derive(Parser)]
struct Args {
    /// Model directory (e.g. a golden fixture); default: a synthetic ~30M-parameter
    /// MiMo-V2-shaped model with random weights.
    #[arg(value_name = "MODEL_DIR")]
    model_dir: Option<String>,
}

fn synthetic_spec() -> peregrine_core::ModelSpec {
    let c = serde_json::json!({"model_type": "mimo_v2_flash", "vocab_size": 8192, "hidden_size": 512,
        "intermediate_size": 1024, "num_hidden_layers": 8, "num_attention_heads": 8, "num_key_value_heads": 2,
        "head_dim": 64, "v_head_dim": 64, "sliding_window": 128, "n_routed_experts": 8, "num_experts_per_tok": 2,
        "moe_intermediate_size": 256, "tie_word_embeddings": false});
    peregrine_model::config::parse_config(&c, None).unwrap()
}

fn bench(model: &mut CpuModel, batch: usize, prompt: usize, steps: usize) -> f64 {
    let bs = 16;
    let per_seq = (prompt + steps).div_ceil(bs) + 1;
    model.init_kv(KvConfig { block_size: bs, num_full_blocks: per_seq * batch, num_swa_blocks: per_seq * batch }).unwrap();
    let tables: Vec<Vec<u32>> = (0..batch).map(|b| ((b * per_seq) as u32..((b + 1) * per_seq) as u32).collect()).collect();
    let seq = |b: usize, tokens: Vec<u32>, start: usize| SeqForward {
        seq_id: b as u64, tokens, start_pos: start, full_blocks: tables[b].clone(), swa_blocks: tables[b].clone(), output: OutputRows::Last,
    };
    let prompt_batch: Vec<SeqForward> = (0..batch).map(|b| seq(b, (0..prompt as u32).map(|t| (t * 7 + b as u32) % 500).collect(), 0)).collect();
    model.forward(&prompt_batch).unwrap();
    let t0 = Instant::now();
    for i in 0..steps {
        let step: Vec<SeqForward> = (0..batch).map(|b| seq(b, vec![((i * 13 + b) % 500) as u32], prompt + i)).collect();
        model.forward(&step).unwrap();
    }
    (batch * steps) as f64 / t0.elapsed().as_secs_f64()
}

fn main() {
    let arg = Args::parse().model_dir;
    let (name, mut model) = match &arg {
        Some(dir) => {
            let f = peregrine_model::loader::open_model(dir).unwrap();
            (dir.clone(), CpuModel::load(&f.spec, f.weights.as_ref()).unwrap())
        }
        None => {
            let spec = synthetic_spec();
            ("synthetic".to_owned(), CpuModel::load(&spec, &SyntheticWeights::new(0)).unwrap())
        }
    };
    let params = model.spec().num_parameters();
    println!("model {name}: {params} parameters, {} threads", rayon::current_num_threads());
    for batch in [1, 8] {
        let tps = bench(&mut model, batch, 64, 64);
        println!("decode batch {batch}: {tps:.1} tokens/s (prompt 64, 64 steps)");
    }
}
