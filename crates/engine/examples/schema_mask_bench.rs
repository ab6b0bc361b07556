//! The host cost of schema-guided decoding (`guided`) for a tokenizer's vocabulary: the
//! compiler's one-time build, one schema's compile, each token's step (taking the token and
//! computing the next mask) and each mask's application to a row of logits, along outputs sampled
//! from random logits under the constraint.
//!
//!     cargo run --release -p peregrine-engine --example schema_mask_bench -- path/to/tokenizer.json

use std::sync::Arc;
use std::time::Instant;

use clap::Parser;
use peregrine_engine::json_mode::TokenBytes;
use peregrine_core::Guide;
use peregrine_engine::guided::{GuideCompiler, GuidedConstraint};
use peregrine_model::tokenizer::Tokenizer;
use rand::{Rng, SeedableRng};
use serde_json::json;

/// The host cost of schema-guided decoding for a tokenizer's vocabulary.
#[derive(Parser)]
struct Args {
    /// The tokenizer's tokenizer.json.
    #[arg(value_name = "TOKENIZER_JSON")]
    path: String,
    /// Outputs sampled (each with its own seed).
    #[arg(long, default_value_t = 8)]
    runs: u64,
}

/// This process's resident memory (Linux; 0 elsewhere).
fn rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok()).map_or(0.0, |kb| kb / 1024.0)
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

fn main() {
    let args = Args::parse();
    let tok = Tokenizer::from_file(std::path::Path::new(&args.path)).unwrap();
    let tb = Arc::new(TokenBytes::from_tokenizer(&tok).unwrap());
    let (t, rss0) = (Instant::now(), rss_mib());
    let compiler = GuideCompiler::new(tb.clone()).unwrap();
    println!("vocabulary {} tokens: compiler built in {:.1} ms, resident memory +{:.0} MiB", tok.vocab_size(), ms(t), rss_mib() - rss0);
    let schema = Guide::JsonSchema(json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 40},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "email": {"type": "string", "format": "email"},
            "pets": {"type": "array", "items": {"$ref": "#/$defs/pet"}, "maxItems": 3}
        },
        "required": ["name", "age", "pets"],
        "$defs": {"pet": {"type": "object", "properties": {"kind": {"enum": ["cat", "dog", "fish"]}, "legs": {"type": "integer"}}, "required": ["kind"]}}
    }));
    let (mut compiles, mut steps, mut first, mut masks) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut tokens = 0;
    for seed in 0..args.runs {
        let t = Instant::now();
        let matcher = compiler.compile(&schema).unwrap();
        let mut c = GuidedConstraint::new(&compiler, matcher, Vec::new(), false, true).unwrap();
        compiles.push(ms(t));
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut logits = vec![0.0f32; tok.vocab_size()];
        for i in 0..200 {
            if c.done() {
                break;
            }
            logits.iter_mut().for_each(|l| *l = rng.random::<f32>());
            let t = Instant::now();
            assert!(c.mask(&mut logits));
            masks.push(ms(t));
            let (id, _) = logits.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap();
            let t = Instant::now();
            c.advance(id as u32).unwrap();
            if i == 0 { first.push(ms(t)) } else { steps.push(ms(t)) }
            tokens += 1;
        }
    }
    let summary = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        format!("median {:.3} ms, p90 {:.3}, max {:.3} ({} samples)", v[v.len() / 2], v[v.len() * 9 / 10], v[v.len() - 1], v.len())
    };
    println!("schema compile + first mask: {}", summary(&mut compiles));
    println!("first token's step: {}", summary(&mut first));
    println!("later steps (take the token, compute the next mask): {}", summary(&mut steps));
    println!("masks applied to the logits: {}", summary(&mut masks));
    println!("{tokens} tokens over {} runs", args.runs);
}
