//! tokenizer.json through the `tokenizers` crate.

/// A loaded tokenizer (placeholder until implemented).
pub struct Tokenizer {
    pub inner: tokenizers::Tokenizer,
}
