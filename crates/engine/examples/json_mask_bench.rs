//! The host cost of one JSON-mode mask (`json_mode::JsonConstraint::mask`) for a tokenizer's
//! vocabulary, in the automaton's states that cost most: structural (every token walked) and
//! inside a string (only the non-plain tokens walked).
//!
//!     cargo run --release -p peregrine-engine --example json_mask_bench -- path/to/tokenizer.json

use std::sync::Arc;
use std::time::Instant;

use clap::Parser;
use peregrine_engine::json_mode::{JsonConstraint, TokenBytes};
use peregrine_model::tokenizer::Tokenizer;

/// The host cost of one JSON-mode mask for a tokenizer's vocabulary.
#[derive(Parser)]
struct Args {
    /// The tokenizer's tokenizer.json.
    #[arg(value_name = "TOKENIZER_JSON")]
    path: String,
}

fn main() {
    let path = Args::parse().path;
    let tok = Tokenizer::from_file(std::path::Path::new(&path)).unwrap();
    let t0 = Instant::now();
    let tb = Arc::new(TokenBytes::from_tokenizer(&tok).unwrap());
    println!("vocabulary {} tokens, bytes table built in {:.1} ms", tok.vocab_size(), t0.elapsed().as_secs_f64() * 1e3);
    let id = |s: &str| (0..tok.vocab_size() as u32).find(|&i| tb.bytes(i) == s.as_bytes()).unwrap();
    for (state, prefix) in [("start", &[][..]), ("after `{`", &["{"][..]), ("in a key", &["{", "\"", "a"][..]), ("after `:`", &["{", "\"", "a", "\"", ":"][..])] {
        let mut c = JsonConstraint::new(tb.clone(), Vec::new());
        for p in prefix {
            c.advance(id(p));
        }
        let mut times = Vec::new();
        let mut allowed = 0;
        for _ in 0..21 {
            let mut logits = vec![0.0f32; tok.vocab_size()];
            let t = Instant::now();
            c.mask(&mut logits);
            times.push(t.elapsed().as_secs_f64() * 1e3);
            allowed = logits.iter().filter(|l| l.is_finite()).count();
        }
        times.sort_by(f64::total_cmp);
        println!("{state:>10}: median {:.3} ms over 21 masks ({allowed} tokens allowed)", times[10]);
    }
}
