//! Device memory the decode-step graphs hold: a synthetic model of a config's shapes (its first
//! `--layers` layers) captures the greedy and the sampled graph of every row bucket at each
//! block-table width asked for, and the GPU's free memory is read before the first capture and
//! after the last (the KV cache and weights are allocated before).
//!
//!     cargo run --release -p peregrine-cuda --example graph_memory -- \
//!         --config configs/mimo-v2-flash.json [--layers 2] [--widths 8,64]

use clap::Parser;
use peregrine_core::backend::{Backend, KvConfig, OutputRows, RowSampling, SeqForward};
use peregrine_cuda::{probe, CudaModel};

#[derive(Parser)]
struct Args {
    #[arg(long)]
    config: std::path::PathBuf,
    /// Layers of the model kept (the graphs' logits do not depend on them).
    #[arg(long, default_value_t = 2)]
    layers: usize,
    /// Block-table widths (blocks of 16 tokens a sequence) to capture graphs for.
    #[arg(long, value_delimiter = ',', default_value = "8,64")]
    widths: Vec<usize>,
}

/// The decode graphs' row buckets (crate::graph::ROW_BUCKETS).
const BUCKETS: [usize; 14] = [1, 2, 3, 4, 5, 6, 7, 8, 12, 16, 24, 32, 48, 64];
const BS: usize = 16;

fn main() {
    let args = Args::parse();
    let gpu = match probe(0) {
        Ok(g) => g,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    let text = std::fs::read_to_string(&args.config).expect("config");
    let mut cfg: serde_json::Value = serde_json::from_str(&text).expect("json");
    cfg["num_hidden_layers"] = serde_json::json!(args.layers);
    let spec = peregrine_model::config::parse_config(&cfg, None).expect("config parses");
    let ctx = gpu.ctx.clone();
    let free = || ctx.mem_get_info().unwrap().0 as i64;
    let mut model = CudaModel::synthetic(gpu, &spec, 1).expect("synthetic model");
    let widest = args.widths.iter().copied().max().unwrap_or(8);
    // 64 sequences, each with a table `widest` blocks long (the last block holds the token).
    let blocks = 64 * widest + 1;
    model.init_kv(KvConfig { block_size: BS, num_full_blocks: blocks, num_swa_blocks: blocks }).expect("KV cache");
    let vocab = spec.vocab_size as u32;
    let batch = |rows: usize, width: usize| -> Vec<SeqForward> {
        (0..rows)
            .map(|s| {
                let first = (s * widest) as u32;
                let table: Vec<u32> = (first..first + width as u32).collect();
                SeqForward { seq_id: s as u64, tokens: vec![(s as u32 * 7919) % vocab], start_pos: (width - 1) * BS, full_blocks: table.clone(), swa_blocks: table, output: OutputRows::Last }
            })
            .collect()
    };
    // The kernels loaded and an eager step's buffers made before the first reading.
    model.set_cuda_graphs(false);
    model.forward_argmax(&batch(1, 8)).unwrap();
    model.set_cuda_graphs(true);
    let (before, graphs0) = (free(), model.cuda_graphs());
    println!("GPU memory free before the captures: {:.1} MiB ({graphs0} graphs)", before as f64 / 1048576.0);
    println!("| width (blocks) | graphs | free memory taken since the first capture, MiB | logits buffers held, MiB |");
    println!("|---|---|---|---|");
    for &w in &args.widths {
        for &b in &BUCKETS {
            let rows: Vec<RowSampling> = (0..b).map(|s| RowSampling { temperature: 0.8, top_k: 0, top_p: 0.95, min_p: 0.0, u: (s % 10) as f64 / 10.0, adj_start: 0, adj_len: 0 }).collect();
            model.forward_argmax(&batch(b, w)).unwrap();
            model.forward_sample(&batch(b, w), &rows, &[]).unwrap();
        }
        println!("| {w} | {} | {:.1} | {:.1} |", model.cuda_graphs() - graphs0, (before - free()) as f64 / 1048576.0, model.graph_logits_bytes() as f64 / 1048576.0);
    }
}
