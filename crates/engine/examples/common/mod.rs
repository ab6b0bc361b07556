//! Helpers the engine's examples share (`#[path]`-included; not an example of its own).

use std::collections::HashMap;

use peregrine_engine::EngineHandle;
use peregrine_model::tokenizer::Tokenizer;

/// The sum of every series of the metric `name` (all label sets) in the engine's /metrics text.
pub fn metric(e: &EngineHandle, name: &str) -> f64 {
    e.render_metrics()
        .lines()
        .filter(|l| l.starts_with(name) && matches!(l.as_bytes().get(name.len()), Some(b' ') | Some(b'{')))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A word-level tokenizer with one word ("t<id>") per id below `vocab` (for synthetic models).
#[allow(dead_code)] // not every example decodes text
pub fn word_tokenizer(vocab: usize) -> Tokenizer {
    use tokenizers::models::wordlevel::WordLevel;
    let words: HashMap<String, u32> = (0..vocab as u32).map(|i| (format!("t{i}"), i)).collect();
    let model = WordLevel::builder().vocab(words.into_iter().collect()).unk_token("t0".into()).build().expect("word-level vocabulary");
    Tokenizer::from_tokenizers(tokenizers::Tokenizer::new(model))
}

/// The median of `v` (the upper one of an even count).
#[allow(dead_code)] // not every example times steps
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}
