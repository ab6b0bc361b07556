//! Random weights and a stand-in tokenizer for any config.json: vLLM's `--load-format dummy`,
//! for load tests and benchmarks at a model's real shapes without its checkpoint. The text such
//! a model writes means nothing; its speed is the real model's.

use std::collections::HashMap;

use peregrine_core::{Error, Result};

use crate::tokenizer::Tokenizer;
use crate::weights::WeightSource;

/// Deterministic random weights: every tensor a function of its name and the seed, so two loads
/// of one config give the same model. Matrices are uniform in +-1/sqrt(cols) (activations keep
/// their scale through a layer), norm weights 1, other vectors (biases, sinks, the router's
/// correction bias) uniform in +-0.1.
pub struct SyntheticWeights {
    seed: u64,
}

impl SyntheticWeights {
    pub fn new(seed: u64) -> Self {
        SyntheticWeights { seed }
    }

    fn fill(&self, name: &str, n: usize, amp: f32) -> Vec<f32> {
        // FNV-1a of the name, mixed with the seed; then xorshift64.
        let mut s = name.bytes().fold(0xcbf2_9ce4_8422_2325u64 ^ self.seed.wrapping_mul(0x9e37_79b9_7f4a_7c15), |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3));
        s |= 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 2.0 * amp
            })
            .collect()
    }
}

impl WeightSource for SyntheticWeights {
    fn matrix(&self, name: &str, rows: usize, cols: usize) -> Result<Vec<f32>> {
        Ok(self.fill(name, rows * cols, 1.0 / (cols.max(1) as f32).sqrt()))
    }

    fn vector(&self, name: &str, len: usize) -> Result<Vec<f32>> {
        Ok(if name.ends_with("norm.weight") { vec![1.0; len] } else { self.fill(name, len, 0.1) })
    }

    fn contains(&self, _: &str) -> bool {
        true
    }
}

/// The largest vocabulary [`synthetic_tokenizer`] builds.
pub const MAX_STAND_IN_VOCAB: usize = 1 << 22;

/// The stand-in tokenizer of a model without tokenizer.json: one token per whitespace-separated
/// word, the words `t0` .. `t{vocab_size - 1}` being tokens 0 .. vocab_size - 1 (any other word
/// is `t0`), decoded back joined by spaces. `eos` names the end-of-sequence token (its word
/// stays `t{eos}`). So a load test chooses its prompts' lengths and contents exactly: "t17 t4
/// t9000" is three tokens. At most [`MAX_STAND_IN_VOCAB`] tokens.
pub fn synthetic_tokenizer(vocab_size: usize, eos: Option<u32>) -> Result<Tokenizer> {
    use tokenizers::models::wordlevel::WordLevel;
    use tokenizers::pre_tokenizers::whitespace::WhitespaceSplit;
    // (Real vocabularies hold up to a few hundred thousand tokens; the word list is built here.)
    if vocab_size == 0 || vocab_size > MAX_STAND_IN_VOCAB {
        return Err(Error::Tokenizer(format!("a stand-in tokenizer holds 1 to {MAX_STAND_IN_VOCAB} tokens, not {vocab_size}")));
    }
    let vocab: HashMap<String, u32> = (0..vocab_size as u32).map(|i| (format!("t{i}"), i)).collect();
    let model = WordLevel::builder().vocab(vocab.into_iter().collect()).unk_token("t0".into()).build().map_err(|e| Error::Tokenizer(e.to_string()))?;
    let mut inner = tokenizers::Tokenizer::new(model);
    inner.with_pre_tokenizer(Some(WhitespaceSplit));
    let mut t = Tokenizer::from_tokenizers(inner);
    t.set_special_tokens(None, eos.filter(|&e| (e as usize) < vocab_size).map(|e| format!("t{e}")), false);
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synthetic_weights_are_deterministic_and_scaled() {
        let w = SyntheticWeights::new(7);
        let a = w.matrix("model.layers.0.mlp.down_proj.weight", 64, 256).unwrap();
        assert_eq!(a, w.matrix("model.layers.0.mlp.down_proj.weight", 64, 256).unwrap(), "same name, same tensor");
        assert_ne!(a, w.matrix("model.layers.1.mlp.down_proj.weight", 64, 256).unwrap(), "another name, another tensor");
        assert_ne!(a, SyntheticWeights::new(8).matrix("model.layers.0.mlp.down_proj.weight", 64, 256).unwrap(), "another seed, another tensor");
        let bound = 1.0 / 16.0;
        assert!(a.iter().all(|v| v.abs() <= bound), "entries within +-1/sqrt(cols)");
        let mean = a.iter().sum::<f32>() / a.len() as f32;
        let rms = (a.iter().map(|v| v * v).sum::<f32>() / a.len() as f32).sqrt();
        assert!(mean.abs() < 0.1 * bound && rms > 0.5 * bound && rms < 0.65 * bound, "uniform in +-1/16: mean {mean}, rms {rms}");
        assert!(w.vector("model.norm.weight", 8).unwrap().iter().all(|&v| v == 1.0));
        assert!(w.vector("model.layers.0.self_attn.attention_sink_bias", 8).unwrap().iter().all(|v| v.abs() <= 0.1));
    }

    #[test]
    fn the_stand_in_tokenizer_maps_words_to_ids_and_back() {
        let t = synthetic_tokenizer(1000, Some(2)).unwrap();
        assert_eq!(t.vocab_size(), 1000);
        assert_eq!(t.encode("t17 t4  t999\nt0", true).unwrap(), vec![17, 4, 999, 0]);
        assert_eq!(t.encode("hello t5 t1000", false).unwrap(), vec![0, 5, 0], "unknown words are t0");
        assert_eq!(t.decode(&[17, 4, 999], false).unwrap(), "t17 t4 t999");
        assert_eq!(t.eos_token(), Some("t2"));
        assert_eq!(t.eos_token_ids(), vec![2]);
        assert_eq!(synthetic_tokenizer(1000, Some(5000)).unwrap().eos_token(), None, "an EOS past the vocabulary is dropped");
        assert!(synthetic_tokenizer(0, None).is_err());
        assert!(synthetic_tokenizer(MAX_STAND_IN_VOCAB + 1, None).is_err());
    }
}
