//! Guided decoding: each sampled token keeps the output a prefix of a whole match of the request's
//! grammar (`response_format` `json_schema`, vLLM's `guided_json` / `guided_regex` /
//! `guided_choice` / `guided_grammar` / `structured_outputs`), and the sequence stops (reason `stop`) where the match
//! is complete and nothing can extend it. Where the match is complete but could go on (a number,
//! a regex's `+`), the model's EOS is allowed and it chooses.
//!
//! llguidance (the library vLLM's `guidance` backend uses) compiles the grammar and computes each
//! step's token mask over a trie of the vocabulary's bytes: the same bytes JSON mode reads
//! ([`TokenBytes`], so the same byte-level BPE requirement). Tokens without bytes of their own
//! (special tokens) enter the trie under a marker byte no grammar here produces, so they are
//! never allowed, and the model's EOS only as said above.

use std::sync::Arc;

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{ApproximateTokEnv, SimpleVob, TokEnv, TokRxInfo, TokTrie};
use llguidance::{Matcher, ParserFactory};
use peregrine_core::Guide;
use serde_json::Value;

use crate::json_mode::{past_think_end, TokenBytes, THINK_END};

/// Whitespace between a JSON value's tokens: at most this many bytes in a gap (as JSON mode's
/// runs), so a model cannot spend its tokens on endless newlines.
const WHITESPACE: &str = r"[\x20\x0A\x0D\x09]{1,24}";

/// Compiles guides against one vocabulary. Building it walks the whole vocabulary (llguidance's
/// token slices), so the engine makes one, on the first guided request.
pub struct GuideCompiler {
    factory: ParserFactory,
    tokens: Arc<TokenBytes>,
}

impl GuideCompiler {
    pub fn new(tokens: Arc<TokenBytes>) -> Result<GuideCompiler, String> {
        let n = tokens.len();
        let mut words: Vec<Vec<u8>> = (0..n as u32)
            .map(|id| match tokens.bytes(id) {
                [] => [&[TokTrie::SPECIAL_TOKEN_MARKER][..], format!("<[{id}]>").as_bytes()].concat(),
                b => b.to_vec(),
            })
            .collect();
        // llguidance allows its EOS id where the match may end: an id of its own past the
        // vocabulary, which `Next::from_mask` reads and clears.
        words.push([&[TokTrie::SPECIAL_TOKEN_MARKER][..], b"<[end]>"].concat());
        let info = TokRxInfo::new(n as u32 + 1, n as u32);
        let env: TokEnv = Arc::new(ApproximateTokEnv::new(TokTrie::from(&info, &words)));
        let mut factory = ParserFactory::new_simple(&env).map_err(|e| format!("guided decoding: {e}"))?;
        factory.quiet();
        Ok(GuideCompiler { factory, tokens })
    }

    /// The guide's grammar, ready for a sequence; one llguidance cannot take is an error naming
    /// the request field and why (the request's 400).
    pub fn compile(&self, guide: &Guide) -> Result<Matcher, String> {
        let (grammar, what) = match guide {
            Guide::JsonSchema(schema) => {
                let mut schema = schema.clone();
                if let Value::Object(o) = &mut schema {
                    o.entry("x-guidance").or_insert_with(|| serde_json::json!({"whitespace_pattern": WHITESPACE}));
                }
                (TopLevelGrammar::from_json_schema(schema), "the JSON schema")
            }
            Guide::Regex(rx) => (TopLevelGrammar::from_regex(rx), "the regex"),
            Guide::Choice(choices) => {
                let alternatives: Vec<String> = choices.iter().map(|c| escape_regex(c)).collect();
                (TopLevelGrammar::from_regex(&format!("(?:{})", alternatives.join("|"))), "the choice")
            }
            Guide::Grammar(lark) => (TopLevelGrammar::from_lark(lark.clone()), "the grammar"),
        };
        let parser = self.factory.create_parser(grammar).map_err(|e| format!("{what} cannot be used: {e}"))?;
        let matcher = Matcher::new(Ok(parser));
        match matcher.get_error() {
            Some(e) => Err(format!("{what} cannot be used: {e}")),
            None => Ok(matcher),
        }
    }
}

/// An llguidance error's first line: the rest is its parser's state, for its developers.
fn first_line(e: &impl std::fmt::Display) -> String {
    e.to_string().lines().next().unwrap_or_default().trim().to_owned()
}

/// `s` as a regex matching exactly itself (the `regex` crate's meta characters escaped).
fn escape_regex(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if "\\.+*?()|[]{}^$#&-~".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// What may come next.
struct Next {
    /// The tokens of the vocabulary that continue the match (the model's EOS among them where
    /// the match may end here).
    mask: SimpleVob,
    /// Nothing but the end can follow: the sequence stops without asking the model.
    only_end: bool,
}

impl Next {
    /// From llguidance's mask (its EOS bit at `n`, the vocabulary's size); None: nothing at all.
    fn from_mask(mut m: SimpleVob, n: usize, eos: &[u32]) -> Option<Next> {
        let may_end = n < m.len() && m.is_allowed(n as u32);
        for id in eos.iter().map(|&e| e as usize).chain([n]) {
            if id < m.len() {
                m.disallow_token(id as u32);
            }
        }
        let only_end = m.num_set() == 0;
        if only_end && !may_end {
            return None;
        }
        if may_end {
            eos.iter().filter(|&&e| (e as usize) < n).for_each(|&e| m.allow_token(e));
        }
        Some(Next { mask: m, only_end })
    }
}

/// One sequence's constraint: the guide's matcher over its output so far.
pub struct GuidedConstraint {
    matcher: Matcher,
    tokens: Arc<TokenBytes>,
    /// The model's EOS ids: allowed only where the match may end.
    eos: Vec<u32>,
    /// What may follow the output so far (computed when the last token was taken); None:
    /// nothing can, or the output has ended.
    next: Option<Next>,
    /// The model chose EOS where the match could end.
    ended: bool,
    /// Thinking first (the prompt opened a `<think>` block): free until `</think>`; the last bytes.
    thinking: Option<Vec<u8>>,
    /// A JSON guide just past the thinking: whitespace the value may start after (as models
    /// write after `</think>`; bytes so far, at most `MAX_LEAD_WS`). None once the value starts.
    lead_ws: Option<usize>,
    json: bool,
}

/// Whitespace allowed between `</think>` and a JSON value.
const MAX_LEAD_WS: usize = 24;

impl GuidedConstraint {
    /// `thinking`: the output thinks first (anything but EOS until `</think>`, as vLLM starts a
    /// grammar only past the reasoning).
    /// `json`: the guide is a JSON schema (whitespace may come between the thinking and it).
    pub fn new(compiler: &GuideCompiler, mut matcher: Matcher, eos: Vec<u32>, thinking: bool, json: bool) -> Result<GuidedConstraint, String> {
        // Where no token can start the output and none is wanted (`root ::= root`), nothing can
        // match: the request's 400.
        let next = Self::next(&mut matcher, &compiler.tokens, &eos).map_err(|e| format!("no output can match the guide ({e})"))?;
        Ok(GuidedConstraint { matcher, tokens: compiler.tokens.clone(), eos, next, ended: false, thinking: thinking.then(Vec::new), lead_ws: None, json })
    }

    /// A token of whitespace only, which may still come before the value.
    fn leading_ws(&self, id: u32) -> bool {
        let b = self.tokens.bytes(id);
        self.lead_ws.is_some_and(|n| n + b.len() <= MAX_LEAD_WS) && !b.is_empty() && b.iter().all(u8::is_ascii_whitespace)
    }

    fn next(matcher: &mut Matcher, tokens: &TokenBytes, eos: &[u32]) -> Result<Option<Next>, String> {
        if matcher.is_stopped() {
            // Whole, and nothing can follow: only the end (the EOS ids, for `mask` before any token).
            let mut m = SimpleVob::alloc(tokens.len() + 1);
            if matcher.is_accepting().unwrap_or(false) {
                m.allow_token(tokens.len() as u32);
            }
            return Ok(Next::from_mask(m, tokens.len(), eos));
        }
        let m = matcher.compute_mask().map_err(|e| format!("guided decoding: {}", first_line(&e)))?;
        Ok(Next::from_mask(m, tokens.len(), eos))
    }

    /// Sets the logits of every token that cannot come next to -inf; false if none can.
    pub fn mask(&self, logits: &mut [f32]) -> bool {
        if let Some(seen) = &self.thinking {
            // Free text but EOS, and a token that ends the block must end with the tag (the
            // match then starts at the next token).
            let mut refuse = self.eos.clone();
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
        // (`only_end` before any token, a grammar matching only the empty string: the EOS ids
        // are the mask.)
        let n = self.tokens.len().min(logits.len());
        // Whether a token is left (allowed, and not at -inf already: a bias, min_tokens' EOS).
        let mut any = false;
        if self.lead_ws.is_some() {
            for (id, l) in logits[..n].iter_mut().enumerate() {
                if !(next.mask.is_allowed(id as u32) || self.leading_ws(id as u32)) {
                    *l = f32::NEG_INFINITY;
                }
                any |= *l > f32::NEG_INFINITY;
            }
        } else {
            // By 32-token words: most are all refused (filled at once) or all allowed (kept), and
            // a mixed word's refused bits are visited alone: 0.11 -> 0.03 ms a row (median) for
            // Qwen3's vocabulary (benches/results/2026-11-30-json-schema.md).
            for (w, &bits) in next.mask.as_slice().iter().enumerate() {
                let row = &mut logits[(w * 32).min(n)..(w * 32 + 32).min(n)];
                if bits == 0 {
                    row.fill(f32::NEG_INFINITY);
                    continue;
                }
                // Each refused bit of the word, lowest first.
                let mut refused = !bits;
                while refused != 0 {
                    if let Some(l) = row.get_mut(refused.trailing_zeros() as usize) {
                        *l = f32::NEG_INFINITY;
                    }
                    refused &= refused - 1;
                }
                any = any || row.iter().any(|l| *l > f32::NEG_INFINITY);
            }
        }
        // Ids past the vocabulary (a model's padded rows) are never tokens.
        logits[n..].fill(f32::NEG_INFINITY);
        any
    }

    /// The tokens `mask` allows over a vocabulary of `vocab`, as token-mask words, straight
    /// from the matcher's bitmask (no pass over a row of logits): Some(None) if none can come
    /// next; None where the mask is not the matcher's alone (thinking, or the whitespace before a
    /// JSON value), and the caller goes through `mask`.
    pub fn token_words(&self, vocab: usize) -> Option<Option<Vec<u32>>> {
        if self.thinking.is_some() || self.lead_ws.is_some() {
            return None;
        }
        let Some(next) = &self.next else { return Some(None) };
        // Ids past the tokenizer's vocabulary (a model's padded rows) are never tokens.
        let n = self.tokens.len().min(vocab);
        let mut words = vec![0u32; vocab.div_ceil(32)];
        for (w, &bits) in words.iter_mut().zip(next.mask.as_slice()) {
            *w = bits;
        }
        if !n.is_multiple_of(32) {
            words[n / 32] &= (1u32 << (n % 32)) - 1;
        }
        for w in words.iter_mut().skip(n.div_ceil(32)) {
            *w = 0;
        }
        Some(words.iter().any(|&w| w != 0).then_some(words))
    }

    /// Takes the sampled token (one `mask` allowed); an error where the matcher refuses it.
    pub fn advance(&mut self, token: u32) -> Result<(), String> {
        if let Some(seen) = &mut self.thinking {
            seen.extend_from_slice(self.tokens.bytes(token));
            if past_think_end(seen).is_some() {
                self.thinking = None;
                self.lead_ws = self.json.then_some(0);
            } else if seen.len() > THINK_END.len() {
                seen.drain(..seen.len() - (THINK_END.len() - 1));
            }
            return Ok(());
        }
        if self.leading_ws(token) {
            // Before the value, not part of it (the grammar starts at the value's first byte).
            self.lead_ws = self.lead_ws.map(|n| n + self.tokens.bytes(token).len());
            return Ok(());
        }
        self.lead_ws = None;
        if self.eos.contains(&token) {
            // Allowed only where the match may end: the output is whole.
            self.ended = true;
            self.next = None;
            return Ok(());
        }
        self.matcher.consume_token(token).map_err(|e| format!("guided decoding: {}", first_line(&e)))?;
        self.next = Self::next(&mut self.matcher, &self.tokens, &self.eos)?;
        Ok(())
    }

    /// Whether the match is whole and the output ends (the sequence then stops).
    pub fn done(&self) -> bool {
        self.thinking.is_none() && (self.ended || self.next.as_ref().is_some_and(|n| n.only_end))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use peregrine_model::tokenizer::Tokenizer;
    use rand::{Rng, SeedableRng};
    use serde_json::json;

    /// The golden fixture's byte-level vocabulary (512 tokens) and a compiler over it.
    fn golden() -> (Tokenizer, GuideCompiler) {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/golden/default/tokenizer.json");
        let tok = Tokenizer::from_file(std::path::Path::new(path)).unwrap();
        let tb = Arc::new(TokenBytes::from_tokenizer(&tok).unwrap());
        let c = GuideCompiler::new(tb).unwrap();
        (tok, c)
    }

    /// Samples from random logits under the guide until it is done (or `max` tokens), with
    /// `eos` as the model's EOS ids (taken as the end: their bytes are not output): the output's
    /// bytes, and whether it finished.
    fn run(c: &GuideCompiler, guide: &Guide, seed: u64, max: usize, eos: &[u32]) -> (Vec<u8>, bool) {
        let mut k = GuidedConstraint::new(c, c.compile(guide).unwrap(), eos.to_vec(), false, matches!(guide, Guide::JsonSchema(_))).unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut out = Vec::new();
        for _ in 0..max {
            if k.done() {
                return (out, true);
            }
            let mut logits: Vec<f32> = (0..c.tokens.len() + 3).map(|_| rng.random::<f32>() * 4.0).collect();
            assert!(k.mask(&mut logits), "no token can continue {:?}", String::from_utf8_lossy(&out));
            let (id, _) = logits.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap();
            assert!(id < c.tokens.len(), "masked token {id} sampled");
            if !eos.contains(&(id as u32)) {
                out.extend_from_slice(c.tokens.bytes(id as u32));
            }
            k.advance(id as u32).unwrap();
        }
        (out, k.done())
    }

    #[test]
    fn random_samples_under_a_schema_are_values_it_accepts() {
        let (_, c) = golden();
        let schema = Guide::JsonSchema(json!({
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
        }));
        // Token 0 as EOS: never allowed inside an object, and nothing follows its close.
        for (text, v) in closed_values(&c, &schema, &[0]) {
            let o = v.as_object().unwrap();
            assert_eq!(o.len(), 4, "{text}");
            assert!(o["name"].as_str().unwrap().chars().count() <= 6, "{text}");
            assert!((0..=99).contains(&o["age"].as_i64().unwrap()), "{text}");
            assert!(["cat", "dog"].contains(&o["kind"].as_str().unwrap()), "{text}");
            let tags = o["tags"].as_array().unwrap();
            assert!(tags.len() <= 2 && tags.iter().all(Value::is_boolean), "{text}");
            assert!(text.ends_with('}'), "{text}");
        }
    }

    /// The outputs of 12 sampled runs (400 tokens at most) that finished, as text and value;
    /// random logits choose whitespace and long strings often, but most runs must close.
    fn closed_values(c: &GuideCompiler, guide: &Guide, eos: &[u32]) -> Vec<(String, Value)> {
        let done: Vec<(String, Value)> = (0..12)
            .filter_map(|seed| {
                let (out, done) = run(c, guide, seed, 400, eos);
                let text = String::from_utf8(out).unwrap();
                done.then(|| (text.clone(), serde_json::from_str(&text).unwrap_or_else(|e| panic!("{text:?}: {e}"))))
            })
            .collect();
        assert!(done.len() >= 8, "only {} of 12 runs completed their value", done.len());
        done
    }

    #[test]
    fn patterns_consts_unions_and_item_counts_hold() {
        let (_, c) = golden();
        let schema = Guide::JsonSchema(json!({
            "type": "object",
            "properties": {
                "id": {"type": "string", "pattern": "^[a-c]{2}[0-9]$"},
                "v": {"const": 3},
                "x": {"anyOf": [{"type": "integer", "minimum": 10, "maximum": 12}, {"type": "null"}]},
                "list": {"type": "array", "items": {"type": "integer"}, "minItems": 1, "maxItems": 2}
            },
            "required": ["id", "v", "x", "list"],
            "additionalProperties": false
        }));
        for (text, v) in closed_values(&c, &schema, &[]) {
            let id = v["id"].as_str().unwrap().as_bytes();
            assert!(id.len() == 3 && id[..2].iter().all(|b| (b'a'..=b'c').contains(b)) && id[2].is_ascii_digit(), "{text}");
            assert_eq!(v["v"], json!(3), "{text}");
            assert!(v["x"].is_null() || (10..=12).contains(&v["x"].as_i64().unwrap()), "{text}");
            let list = v["list"].as_array().unwrap();
            // JSON Schema's integers are numbers without a fraction (`-0` among them).
            assert!((1..=2).contains(&list.len()) && list.iter().all(|i| i.as_f64().is_some_and(|f| f.fract() == 0.0)), "{text}");
            assert_eq!(v.as_object().unwrap().len(), 4, "{text}");
        }
    }

    #[test]
    fn eos_is_allowed_exactly_where_the_match_may_end() {
        let (tok, c) = golden();
        let eos = 0u32;
        // A value nothing can extend is done at once, without EOS.
        for seed in 0..6 {
            let (out, done) = run(&c, &Guide::JsonSchema(json!({"enum": ["yes", "no"]})), seed, 40, &[eos]);
            assert!(done, "{:?}", String::from_utf8_lossy(&out));
            let v: Value = serde_json::from_slice(&out).unwrap();
            assert!(v == json!("yes") || v == json!("no"), "{v}");
        }
        // `[0-9]+`: EOS refused before the first digit, allowed after it; the model's EOS ends it.
        let digits = Guide::Regex("[0-9]+".into());
        let mut k = GuidedConstraint::new(&c, c.compile(&digits).unwrap(), vec![eos], false, false).unwrap();
        let mut logits = vec![0.0f32; c.tokens.len()];
        assert!(k.mask(&mut logits) && logits[eos as usize] == f32::NEG_INFINITY);
        let seven = tok.encode("7", false).unwrap();
        assert_eq!(seven.len(), 1);
        k.advance(seven[0]).unwrap();
        assert!(!k.done());
        let mut logits = vec![0.0f32; c.tokens.len()];
        assert!(k.mask(&mut logits) && logits[eos as usize] == 0.0);
        for id in 0..c.tokens.len() as u32 {
            if id != eos && logits[id as usize] == 0.0 {
                assert!(c.tokens.bytes(id).iter().all(u8::is_ascii_digit), "{:?} allowed", c.tokens.bytes(id));
            }
        }
        k.advance(eos).unwrap();
        assert!(k.done());
        // Sampled, every output is digits (ended by EOS, or cut).
        for seed in 0..6 {
            let (out, _) = run(&c, &digits, seed, 30, &[eos]);
            assert!(!out.is_empty() && out.iter().all(u8::is_ascii_digit), "{:?}", String::from_utf8_lossy(&out));
        }
    }

    #[test]
    fn whitespace_between_a_values_tokens_is_at_most_24_bytes_a_gap() {
        let (_, c) = golden();
        // No strings, so every whitespace byte lies between tokens of the value.
        let ints = Guide::JsonSchema(json!({"type": "array", "items": {"type": "integer"}}));
        let mut longest = 0;
        for seed in 0..8 {
            let (out, _) = run(&c, &ints, seed, 200, &[0]);
            let run_len = out.split(|b| !b.is_ascii_whitespace()).map(<[u8]>::len).max().unwrap_or(0);
            longest = longest.max(run_len);
        }
        // Random logits take whitespace often: the cap is reached, never passed.
        assert_eq!(longest, 24, "longest whitespace run {longest}");
    }

    #[test]
    fn the_mask_refuses_exactly_the_tokens_the_matcher_refuses() {
        let (tok, c) = golden();
        let schema = Guide::JsonSchema(json!({"type": "object", "properties": {"a": {"type": "string"}, "b": {"type": "array"}}}));
        let mut k = GuidedConstraint::new(&c, c.compile(&schema).unwrap(), vec![], false, true).unwrap();
        // Along a fixed prefix (structural states and inside a string), rows padded past the vocabulary.
        for t in tok.encode("{\"a\": \"x y", false).unwrap() {
            let mut logits = vec![1.0f32; c.tokens.len() + 40];
            assert!(k.mask(&mut logits));
            let next = &k.next.as_ref().unwrap().mask;
            for (id, l) in logits.iter().enumerate() {
                let allowed = id < c.tokens.len() && next.is_allowed(id as u32);
                assert_eq!(l.is_finite(), allowed, "token {id} ({:?})", c.tokens.bytes(id as u32));
            }
            // With every allowed token already at -inf (biases), nothing is left.
            let mut gone: Vec<f32> = logits.iter().map(|_| f32::NEG_INFINITY).collect();
            assert!(!k.mask(&mut gone));
            k.advance(t).unwrap();
        }
    }

    /// The matcher's bitmask taken straight (`token_words`) allows exactly what `mask` leaves
    /// finite over a row of zeros, along a schema's and a regex's outputs, for vocabularies
    /// shorter than, equal to and longer than the tokenizer's (padded rows refused).
    #[test]
    fn token_words_are_the_mask_of_a_row_of_zeros() {
        let (tok, c) = golden();
        let mut checked = 0;
        for (guide, text) in [
            (Guide::JsonSchema(json!({"type": "object", "properties": {"a": {"type": "string"}, "b": {"type": "integer"}}})), "{\"a\": \"x y\", \"b\": 12}"),
            (Guide::Regex("[a-z]+ [0-9]{1,3}".into()), "abc 42"),
        ] {
            let mut k = GuidedConstraint::new(&c, c.compile(&guide).unwrap(), vec![3], false, false).unwrap();
            for t in tok.encode(text, false).unwrap() {
                for vocab in [c.tokens.len() - 7, c.tokens.len(), c.tokens.len() + 40] {
                    let mut zeros = vec![0f32; vocab];
                    let any = k.mask(&mut zeros);
                    let words = k.token_words(vocab).expect("no thinking: the matcher's mask");
                    assert_eq!(words.is_some(), any, "{guide:?}, vocabulary {vocab}");
                    let words = words.unwrap_or_default();
                    for (id, l) in zeros.iter().enumerate() {
                        let bit = words.get(id / 32).is_some_and(|w| w >> (id % 32) & 1 == 1);
                        assert_eq!(bit, l.is_finite(), "{guide:?}, vocabulary {vocab}: token {id}");
                    }
                    assert!(words.len() == vocab.div_ceil(32) || words.is_empty());
                    for id in vocab..words.len() * 32 {
                        assert_eq!(words[id / 32] >> (id % 32) & 1, 0, "{guide:?}, vocabulary {vocab}: id {id} past it allowed");
                    }
                    checked += 1;
                }
                k.advance(t).unwrap();
            }
        }
        assert!(checked > 20, "{checked} masks compared");
    }

    #[test]
    fn a_grammar_of_the_empty_string_asks_for_eos_alone() {
        let (_, c) = golden();
        let k = GuidedConstraint::new(&c, c.compile(&Guide::Regex("a{0}".into())).unwrap(), vec![7], false, false).unwrap();
        assert!(k.done(), "nothing can follow the empty match");
        let mut logits = vec![0.0f32; c.tokens.len()];
        assert!(k.mask(&mut logits));
        assert!(logits.iter().enumerate().all(|(id, l)| (id == 7) == l.is_finite()), "only EOS may come");
    }

    #[test]
    fn a_choice_is_one_of_its_strings_whatever_they_hold() {
        let (_, c) = golden();
        let choices = vec!["a+b (c)".to_string(), "x|y".into(), "[ok]".into(), "a.b".into()];
        let guide = Guide::Choice(choices.clone());
        for seed in 0..16 {
            let (out, done) = run(&c, &guide, seed, 40, &[0]);
            let text = String::from_utf8(out).unwrap();
            assert!(done && choices.contains(&text), "{text:?}");
        }
    }

    /// GBNF (rewritten by `gbnf::gbnf_to_lark`) and Lark grammars: every finished sample is in
    /// the grammar's language, a recursive one included, and EOS ends a match only where it may.
    #[test]
    fn random_samples_under_a_grammar_are_in_its_language() {
        let (_, c) = golden();
        let eos = 0u32;
        let lark = |g: &str| Guide::Grammar(crate::gbnf::gbnf_to_lark(g).unwrap());
        // A list of words or numbers.
        let list = lark("root ::= \"[\" item (\",\" item)* \"]\"\nitem ::= [a-c]+ | num\nnum ::= [0-9]{1,3}\n");
        // Balanced parentheses around an x: not a regular language.
        let nested = lark("root ::= \"(\" root \")\" | \"x\"\n");
        // Lark as given: a word, then digits the model may stop anywhere after the first.
        let direct = Guide::Grammar("start: (\"yes\" | \"no\") \"-\" /[0-9]+/\n".into());
        let mut finished = [0; 3];
        for seed in 0..12 {
            let (out, done) = run(&c, &list, seed, 60, &[eos]);
            let text = String::from_utf8(out).unwrap();
            if done {
                finished[0] += 1;
                let inner = text.strip_prefix('[').and_then(|t| t.strip_suffix(']')).unwrap_or_else(|| panic!("{text:?}"));
                for item in inner.split(',') {
                    let word = !item.is_empty() && item.bytes().all(|b| (b'a'..=b'c').contains(&b));
                    let num = (1..=3).contains(&item.len()) && item.bytes().all(|b| b.is_ascii_digit());
                    assert!(word || num, "{text:?}: item {item:?}");
                }
            }
            let (out, done) = run(&c, &nested, seed, 60, &[eos]);
            let text = String::from_utf8(out).unwrap();
            if done {
                finished[1] += 1;
                let n = text.len() / 2;
                assert_eq!(text, format!("{}x{}", "(".repeat(n), ")".repeat(n)), "{text:?}");
            } else {
                assert!(text.bytes().all(|b| b == b'('), "an unfinished sample is open parentheses: {text:?}");
            }
            let (out, done) = run(&c, &direct, seed, 30, &[eos]);
            let text = String::from_utf8(out).unwrap();
            if done {
                finished[2] += 1;
                let digits = text.strip_prefix("yes-").or_else(|| text.strip_prefix("no-")).unwrap_or_else(|| panic!("{text:?}"));
                assert!(!digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()), "{text:?}");
            }
        }
        assert!(finished.iter().all(|&f| f > 0), "some sample of each grammar finishes: {finished:?}");
        let e = c.compile(&Guide::Grammar("start: missing_rule\n".into())).err().expect("an undefined rule compiled");
        assert!(e.starts_with("the grammar cannot be used: "), "{e}");
        // A grammar no output matches (no finite derivation) is refused in one line.
        let endless = c.compile(&Guide::Grammar(crate::gbnf::gbnf_to_lark("root ::= root\n").unwrap())).unwrap();
        let e = GuidedConstraint::new(&c, endless, vec![eos], false, false).err().expect("a grammar matching nothing started");
        assert!(e.starts_with("no output can match the guide (guided decoding: ") && !e.contains('\n'), "{e}");
    }

    /// Random GBNF text that converts compiles, or is refused with a message; never a panic.
    #[test]
    fn random_converted_grammars_compile_or_are_refused() {
        let (_, c) = golden();
        let alphabet: Vec<char> = "root ::= ab|()[]^-\"\\{},*+?.#\n xé0123".chars().collect();
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        let (mut compiled, mut refused) = (0, 0);
        while compiled + refused < 1500 {
            let g: String = std::iter::once("root ::= ".to_string()).chain((0..rng.random_range(0..30)).map(|_| alphabet[rng.random_range(0..alphabet.len())].to_string())).collect();
            let Ok(lark) = crate::gbnf::gbnf_to_lark(&g) else { continue };
            match c.compile(&Guide::Grammar(lark)) {
                Ok(_) => compiled += 1,
                Err(e) => {
                    assert!(e.starts_with("the grammar cannot be used: "), "{g:?}: {e}");
                    refused += 1;
                }
            }
        }
        eprintln!("random converted grammars: {compiled} compiled, {refused} refused");
        assert!(compiled > 100, "{compiled} compiled, {refused} refused");
    }

    #[test]
    fn guides_that_cannot_be_used_are_errors_that_say_why() {
        let (_, c) = golden();
        for bad in [json!({"type": "no-such-type"}), json!({"$ref": "#/$defs/missing"}), json!({"type": "integer", "minimum": 5, "maximum": 1})] {
            let e = c.compile(&Guide::JsonSchema(bad.clone())).err().unwrap_or_else(|| panic!("{bad} compiled"));
            assert!(e.starts_with("the JSON schema cannot be used: "), "{e}");
        }
        let e = c.compile(&Guide::Regex("(unclosed".into())).err().expect("an unclosed group compiled");
        assert!(e.starts_with("the regex cannot be used: "), "{e}");
    }

    #[test]
    fn thinking_is_free_until_the_tag_then_the_guide_holds() {
        let (tok, c) = golden();
        let schema = Guide::JsonSchema(json!({"type": "boolean"}));
        let mut k = GuidedConstraint::new(&c, c.compile(&schema).unwrap(), vec![], true, true).unwrap();
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
