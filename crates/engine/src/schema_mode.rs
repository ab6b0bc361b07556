//! Schema-guided decoding (`response_format: {"type": "json_schema", ...}`): each sampled token
//! keeps the output a prefix of a JSON value the request's schema accepts, and the sequence stops
//! (reason `stop`) when that value is complete and nothing can extend it.
//!
//! llguidance (the library vLLM's `guidance` backend uses) compiles the schema to a grammar and
//! computes each step's token mask over a trie of the vocabulary's bytes: the same bytes JSON
//! mode reads ([`TokenBytes`], so the same byte-level BPE requirement). Tokens without bytes of
//! their own (special tokens) enter the trie under a marker byte no grammar produces, so they are
//! never allowed; the model's EOS is never sampled either (the value's end stops the sequence).

use std::sync::Arc;

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{ApproximateTokEnv, SimpleVob, TokEnv, TokRxInfo, TokTrie};
use llguidance::{Matcher, ParserFactory};
use serde_json::Value;

use crate::json_mode::{past_think_end, TokenBytes, THINK_END};

/// Whitespace between a value's tokens: at most this many bytes in a gap (as JSON mode's runs),
/// so a model cannot spend its tokens on endless newlines.
const WHITESPACE: &str = r"[\x20\x0A\x0D\x09]{1,24}";

/// Compiles schemas against one vocabulary. Building it walks the whole vocabulary (llguidance's
/// token slices), so the engine makes one, on the first schema request.
pub struct SchemaCompiler {
    factory: ParserFactory,
    tokens: Arc<TokenBytes>,
}

impl SchemaCompiler {
    pub fn new(tokens: Arc<TokenBytes>) -> Result<SchemaCompiler, String> {
        let n = tokens.len();
        let words: Vec<Vec<u8>> = (0..n as u32)
            .map(|id| match tokens.bytes(id) {
                [] => [&[TokTrie::SPECIAL_TOKEN_MARKER][..], format!("<[{id}]>").as_bytes()].concat(),
                b => b.to_vec(),
            })
            .collect();
        // llguidance allows its EOS id where the value may end; that is an id of its own past the
        // vocabulary, which `allowed` clears (the model's EOS ids are refused as `banned`).
        let mut words = words;
        words.push([&[TokTrie::SPECIAL_TOKEN_MARKER][..], b"<[end]>"].concat());
        let info = TokRxInfo::new(n as u32 + 1, n as u32);
        let env: TokEnv = Arc::new(ApproximateTokEnv::new(TokTrie::from(&info, &words)));
        let mut factory = ParserFactory::new_simple(&env).map_err(|e| format!("schema-guided decoding: {e}"))?;
        factory.quiet();
        Ok(SchemaCompiler { factory, tokens })
    }

    /// The schema's grammar, ready for a sequence; a schema llguidance cannot take is an error
    /// naming why (the request's 400).
    pub fn compile(&self, schema: &Value) -> Result<Matcher, String> {
        let mut schema = schema.clone();
        if let Value::Object(o) = &mut schema {
            o.entry("x-guidance").or_insert_with(|| serde_json::json!({"whitespace_pattern": WHITESPACE}));
        }
        let parser = self.factory.create_parser(TopLevelGrammar::from_json_schema(schema)).map_err(|e| format!("`json_schema` cannot be used: {e}"))?;
        let matcher = Matcher::new(Ok(parser));
        match matcher.get_error() {
            Some(e) => Err(format!("`json_schema` cannot be used: {e}")),
            None => Ok(matcher),
        }
    }
}

/// One sequence's constraint: the schema's matcher over its output so far.
pub struct SchemaConstraint {
    matcher: Matcher,
    tokens: Arc<TokenBytes>,
    /// Ids never allowed: the model's EOS (the value's end stops the sequence instead).
    banned: Vec<u32>,
    /// The tokens allowed next (computed when the last one was taken); None: nothing can follow.
    next: Option<SimpleVob>,
    /// Thinking first (the prompt opened a `<think>` block): free until `</think>`; the last bytes.
    thinking: Option<Vec<u8>>,
}

impl SchemaConstraint {
    /// `thinking`: the output thinks first (anything but a banned id until `</think>`, as vLLM
    /// starts a grammar only past the reasoning).
    pub fn new(compiler: &SchemaCompiler, mut matcher: Matcher, banned: Vec<u32>, thinking: bool) -> Result<SchemaConstraint, String> {
        let next = Self::allowed(&mut matcher, &compiler.tokens, &banned)?;
        Ok(SchemaConstraint { matcher, tokens: compiler.tokens.clone(), banned, next, thinking: thinking.then(Vec::new) })
    }

    /// The matcher's next tokens less the banned ones; None where only EOS (or nothing) remains.
    fn allowed(matcher: &mut Matcher, tokens: &TokenBytes, banned: &[u32]) -> Result<Option<SimpleVob>, String> {
        if matcher.is_stopped() {
            return Ok(None);
        }
        let mut m = matcher.compute_mask().map_err(|e| format!("schema-guided decoding: {e}"))?;
        for id in banned.iter().copied().chain([tokens.len() as u32]) {
            if (id as usize) < m.len() {
                m.disallow_token(id);
            }
        }
        Ok((m.num_set() > 0).then_some(m))
    }

    /// Sets the logits of every token that cannot come next to -inf; false if none can.
    pub fn mask(&self, logits: &mut [f32]) -> bool {
        if let Some(seen) = &self.thinking {
            // Free text, but a token that ends the block must end with the tag (the value then
            // starts at the next token).
            let mut refuse = self.banned.clone();
            let mut tail = Vec::new();
            for &id in self.tokens.ids_with_gt() {
                tail.clear();
                tail.extend_from_slice(seen);
                tail.extend_from_slice(self.tokens.bytes(id));
                if past_think_end(&tail).is_some_and(|past| past < tail.len()) {
                    refuse.push(id);
                }
            }
            for id in refuse {
                if let Some(l) = logits.get_mut(id as usize) {
                    *l = f32::NEG_INFINITY;
                }
            }
            return logits.iter().any(|l| *l > f32::NEG_INFINITY);
        }
        let Some(next) = &self.next else {
            return false;
        };
        for (id, l) in logits.iter_mut().enumerate() {
            if id >= self.tokens.len() || !next.is_allowed(id as u32) {
                *l = f32::NEG_INFINITY;
            }
        }
        logits.iter().any(|l| *l > f32::NEG_INFINITY)
    }

    /// Takes the sampled token (one `mask` allowed); an error where the matcher refuses it.
    pub fn advance(&mut self, token: u32) -> Result<(), String> {
        if let Some(seen) = &mut self.thinking {
            seen.extend_from_slice(self.tokens.bytes(token));
            if past_think_end(seen).is_some() {
                self.thinking = None;
            } else if seen.len() > THINK_END.len() {
                seen.drain(..seen.len() - (THINK_END.len() - 1));
            }
            return Ok(());
        }
        self.matcher.consume_token(token).map_err(|e| format!("schema-guided decoding: {e}"))?;
        self.next = Self::allowed(&mut self.matcher, &self.tokens, &self.banned)?;
        Ok(())
    }

    /// Whether the value is complete and nothing can extend it (the sequence then stops).
    pub fn done(&mut self) -> bool {
        self.thinking.is_none() && self.next.is_none() && self.matcher.is_accepting().unwrap_or(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use peregrine_model::tokenizer::Tokenizer;
    use rand::{Rng, SeedableRng};
    use serde_json::json;

    /// The golden fixture's byte-level vocabulary (512 tokens) and a compiler over it.
    fn golden() -> (Tokenizer, SchemaCompiler) {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/golden/default/tokenizer.json");
        let tok = Tokenizer::from_file(std::path::Path::new(path)).unwrap();
        let tb = Arc::new(TokenBytes::from_tokenizer(&tok).unwrap());
        let c = SchemaCompiler::new(tb).unwrap();
        (tok, c)
    }

    /// Samples from random logits under the constraint until it is done (or `max` tokens):
    /// the output's bytes, and whether it finished.
    fn run(c: &SchemaCompiler, schema: &Value, seed: u64, max: usize, banned: Vec<u32>) -> (Vec<u8>, bool) {
        let mut k = SchemaConstraint::new(c, c.compile(schema).unwrap(), banned.clone(), false).unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut out = Vec::new();
        for _ in 0..max {
            if k.done() {
                return (out, true);
            }
            let mut logits: Vec<f32> = (0..c.tokens.len() + 3).map(|_| rng.random::<f32>() * 4.0).collect();
            assert!(k.mask(&mut logits), "no token can continue {:?}", String::from_utf8_lossy(&out));
            let (id, _) = logits.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap();
            assert!(id < c.tokens.len() && !banned.contains(&(id as u32)), "masked token {id} sampled");
            out.extend_from_slice(c.tokens.bytes(id as u32));
            k.advance(id as u32).unwrap();
        }
        (out, k.done())
    }

    #[test]
    fn random_samples_under_a_schema_are_values_it_accepts() {
        let (_, c) = golden();
        let schema = json!({
            "type": "object",
            "properties": {
                "name": {"type": "string", "maxLength": 6},
                "age": {"type": "integer", "minimum": 0, "maximum": 99},
                "kind": {"enum": ["cat", "dog"]},
                "tags": {"type": "array", "items": {"$ref": "#/$defs/tag"}, "maxItems": 2}
            },
            "required": ["name", "age", "kind", "tags"],
            "additionalProperties": false,
            "$defs": {"tag": {"type": "boolean"}}
        });
        let mut finished = 0;
        for seed in 0..12 {
            let (out, done) = run(&c, &schema, seed, 400, vec![]);
            if !done {
                continue;
            }
            finished += 1;
            let text = String::from_utf8(out).unwrap();
            let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
            let o = v.as_object().unwrap();
            assert_eq!(o.len(), 4, "{text}");
            assert!(o["name"].as_str().unwrap().chars().count() <= 6, "{text}");
            assert!((0..=99).contains(&o["age"].as_i64().unwrap()), "{text}");
            assert!(["cat", "dog"].contains(&o["kind"].as_str().unwrap()), "{text}");
            let tags = o["tags"].as_array().unwrap();
            assert!(tags.len() <= 2 && tags.iter().all(Value::is_boolean), "{text}");
        }
        // Random logits choose whitespace and long strings often; most runs still close.
        assert!(finished >= 8, "only {finished} of 12 runs completed their value");
    }

    #[test]
    fn patterns_consts_unions_and_item_counts_hold() {
        let (_, c) = golden();
        let schema = json!({
            "type": "object",
            "properties": {
                "id": {"type": "string", "pattern": "^[a-c]{2}[0-9]$"},
                "v": {"const": 3},
                "x": {"anyOf": [{"type": "integer", "minimum": 10, "maximum": 12}, {"type": "null"}]},
                "list": {"type": "array", "items": {"type": "integer"}, "minItems": 1, "maxItems": 2}
            },
            "required": ["id", "v", "x", "list"],
            "additionalProperties": false
        });
        let mut finished = 0;
        for seed in 0..12 {
            let (out, done) = run(&c, &schema, seed, 400, vec![]);
            if !done {
                continue;
            }
            finished += 1;
            let text = String::from_utf8(out).unwrap();
            let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
            let id = v["id"].as_str().unwrap().as_bytes();
            assert!(id.len() == 3 && id[..2].iter().all(|b| (b'a'..=b'c').contains(b)) && id[2].is_ascii_digit(), "{text}");
            assert_eq!(v["v"], json!(3), "{text}");
            assert!(v["x"].is_null() || (10..=12).contains(&v["x"].as_i64().unwrap()), "{text}");
            let list = v["list"].as_array().unwrap();
            // JSON Schema's integers are numbers without a fraction (`-0` among them).
            assert!((1..=2).contains(&list.len()) && list.iter().all(|i| i.as_f64().is_some_and(|f| f.fract() == 0.0)), "{text}");
            assert_eq!(v.as_object().unwrap().len(), 4, "{text}");
        }
        assert!(finished >= 8, "only {finished} of 12 runs completed their value");
    }

    #[test]
    fn a_closed_value_is_done_and_banned_ids_never_come() {
        let (_, c) = golden();
        // An enum of fixed strings: a few tokens, then nothing can follow.
        let schema = json!({"enum": ["yes", "no"]});
        let banned: Vec<u32> = (0..c.tokens.len() as u32).filter(|&id| c.tokens.bytes(id) == b"\"").collect();
        for seed in 0..6 {
            let (out, done) = run(&c, &schema, seed, 40, vec![]);
            assert!(done, "{:?}", String::from_utf8_lossy(&out));
            let v: Value = serde_json::from_slice(&out).unwrap();
            assert!(v == json!("yes") || v == json!("no"), "{v}");
        }
        // With the lone quote banned the value still forms from the other tokens, or the
        // constraint reports that nothing can continue; a banned id is never sampled (run asserts).
        if !banned.is_empty() {
            let mut k = SchemaConstraint::new(&c, c.compile(&schema).unwrap(), banned.clone(), false).unwrap();
            let mut logits = vec![0.0f32; c.tokens.len()];
            if k.mask(&mut logits) {
                assert!(banned.iter().all(|&b| logits[b as usize] == f32::NEG_INFINITY));
            }
            assert!(!k.done());
        }
    }

    #[test]
    fn schemas_that_cannot_be_used_are_errors_that_say_why() {
        let (_, c) = golden();
        for bad in [json!({"type": "no-such-type"}), json!({"$ref": "#/$defs/missing"}), json!({"type": "integer", "minimum": 5, "maximum": 1})] {
            let e = c.compile(&bad).err().unwrap_or_else(|| panic!("{bad} compiled"));
            assert!(e.starts_with("`json_schema` cannot be used: "), "{e}");
        }
    }

    #[test]
    fn thinking_is_free_until_the_tag_then_the_schema_holds() {
        let (tok, c) = golden();
        let schema = json!({"type": "boolean"});
        let mut k = SchemaConstraint::new(&c, c.compile(&schema).unwrap(), vec![], true).unwrap();
        // Any token while thinking (the schema alone would allow only t/f starts).
        let think = tok.encode("hmm </think>", false).unwrap();
        for &t in &think {
            let mut logits = vec![0.0f32; c.tokens.len()];
            assert!(k.mask(&mut logits));
            assert!(logits[t as usize].is_finite(), "thinking token {t} refused");
            k.advance(t).unwrap();
        }
        assert!(!k.done());
        let mut logits = vec![0.0f32; c.tokens.len()];
        assert!(k.mask(&mut logits));
        for id in 0..c.tokens.len() as u32 {
            let b = c.tokens.bytes(id);
            if logits[id as usize].is_finite() {
                assert!(b"true".starts_with(b) || b"false".starts_with(b) || b.iter().all(|x| x.is_ascii_whitespace()), "{:?} allowed", String::from_utf8_lossy(b));
            }
        }
    }
}
