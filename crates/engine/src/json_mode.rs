//! JSON mode (`response_format: {"type": "json_object"}`): each sampled token is one whose bytes
//! keep the output a prefix of a JSON object, and the sequence stops (reason `stop`) the moment
//! the object closes. The grammar is JSON's (RFC 8259) as a byte-level pushdown automaton; a
//! token is allowed when the automaton accepts all of its bytes. Inside a string, the tokens
//! made only of plain string bytes are allowed as a set, so only the few holding a quote, a
//! backslash or a control byte are walked byte by byte; and the walks go by first byte, in byte
//! order, skipping at once every token that shares a refused prefix (0.06-0.8 ms a token for
//! Qwen3's 151k vocabulary: benches/results/2026-11-27-json-mode-mask.md).
//!
//! Token bytes come from a byte-level BPE vocabulary (GPT-2's byte-to-character map: Qwen, MiMo,
//! Llama 3, SmolLM2); another tokenizer cannot be constrained and the request is refused.
//! Special tokens are never allowed (the object's end stops the sequence instead of EOS).

use std::collections::HashMap;
use std::sync::Arc;

use peregrine_model::tokenizer::Tokenizer;

/// Whitespace bytes allowed in a row outside strings: enough for indented output, not for the
/// endless newlines a constrained model can fall into.
const MAX_WHITESPACE_RUN: u8 = 24;
/// Nesting depth of objects and arrays.
const MAX_DEPTH: usize = 64;

/// Every token's bytes, grouped for the mask's walks.
pub struct TokenBytes {
    /// Per id; empty where the token has no bytes of its own (special tokens, unmapped).
    bytes: Vec<Vec<u8>>,
    /// Ids whose every byte may appear unescaped inside a JSON string.
    plain_in_string: Vec<u32>,
    /// Every id with bytes, by its first byte: a walk skips the groups whose first byte the
    /// automaton refuses (outside strings, nearly all).
    by_first: Vec<Vec<u32>>,
    /// The ids not in `plain_in_string`, by first byte (the only ones walked inside a string).
    other_by_first: Vec<Vec<u32>>,
    /// The ids holding `>`: the only ones that can end a thinking block (`</think>`).
    with_gt: Vec<u32>,
}

impl TokenBytes {
    /// The vocabulary's bytes, or an error naming why it cannot be constrained.
    pub fn from_tokenizer(tok: &Tokenizer) -> Result<TokenBytes, String> {
        if !tok.is_byte_level() {
            return Err("JSON mode and `json_schema` need a byte-level BPE tokenizer (GPT-2's byte map), which this model's is not".into());
        }
        let unmap = char_to_byte();
        let n = tok.vocab_size();
        let mut bytes = vec![Vec::new(); n];
        let added = tok.inner().get_added_tokens_decoder();
        for (id, slot) in bytes.iter_mut().enumerate() {
            let id = id as u32;
            if let Some(a) = added.get(&id) {
                // Added tokens hold their text literally (not through the byte map).
                if !a.special {
                    *slot = a.content.as_bytes().to_vec();
                }
                continue;
            }
            let Some(text) = tok.id_to_token(id) else { continue };
            let mapped: Option<Vec<u8>> = text.chars().map(|c| unmap.get(&c).copied()).collect();
            *slot = mapped.unwrap_or_default();
        }
        let mut plain_in_string = Vec::new();
        let (mut by_first, mut other_by_first) = (vec![Vec::new(); 256], vec![Vec::new(); 256]);
        for (id, b) in bytes.iter().enumerate() {
            let Some(&first) = b.first() else { continue };
            by_first[first as usize].push(id as u32);
            if b.iter().all(|&c| plain_string_byte(c)) {
                plain_in_string.push(id as u32);
            } else {
                other_by_first[first as usize].push(id as u32);
            }
        }
        // In byte order, tokens sharing a refused prefix sit together and a walk skips them.
        for group in by_first.iter_mut().chain(other_by_first.iter_mut()) {
            group.sort_by(|&a, &b| bytes[a as usize].cmp(&bytes[b as usize]));
        }
        let with_gt = (0..n as u32).filter(|&id| bytes[id as usize].contains(&b'>')).collect();
        Ok(TokenBytes { bytes, plain_in_string, by_first, other_by_first, with_gt })
    }

    pub fn bytes(&self, id: u32) -> &[u8] {
        self.bytes.get(id as usize).map_or(&[], Vec::as_slice)
    }

    /// The vocabulary's size (ids with and without bytes).
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// The ids holding `>`: the only ones that can end a thinking block.
    pub fn ids_with_gt(&self) -> &[u32] {
        &self.with_gt
    }

    /// Whether `prompt` ends inside an open `<think>` block (its last bytes, past whitespace).
    pub fn ends_in_open_think(&self, prompt: &[u32]) -> bool {
        let tail: Vec<u8> = prompt[prompt.len().saturating_sub(8)..].iter().flat_map(|&id| self.bytes(id).iter().copied()).collect();
        let end = tail.iter().rposition(|b| !b.is_ascii_whitespace()).map_or(0, |i| i + 1);
        tail[..end].ends_with(b"<think>")
    }
}

/// GPT-2's byte-level map inverted: the character each byte is written as, back to the byte.
fn char_to_byte() -> HashMap<char, u8> {
    let mut printable: Vec<u32> = (b'!' as u32..=b'~' as u32).chain(0xA1..=0xAC).chain(0xAE..=0xFF).collect();
    let mut chars: Vec<u32> = printable.clone();
    let mut next = 0u32;
    for b in 0..256u32 {
        if !printable.contains(&b) {
            printable.push(b);
            chars.push(256 + next);
            next += 1;
        }
    }
    printable.iter().zip(&chars).map(|(&b, &c)| (char::from_u32(c).unwrap(), b as u8)).collect()
}

/// A byte that stands for itself inside a JSON string (not a quote, backslash or control byte).
fn plain_string_byte(b: u8) -> bool {
    b >= 0x20 && b != b'"' && b != b'\\'
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// The top-level value: only `{`, at once (no leading whitespace for a model to spend its
    /// tokens on).
    Start,
    /// The top-level value past a thinking block: whitespace (as models write after
    /// `</think>`), then `{`.
    StartAfterThinking,
    /// A value (after `:`, or `,` in an array).
    Value,
    /// After `[`: a value or `]`.
    ValueOrArrayEnd,
    /// After `{`: a key or `}`.
    KeyOrObjectEnd,
    /// After `,` in an object: a key.
    Key,
    /// After a key.
    Colon,
    /// After a value: `,`, or the end of the innermost object or array.
    CommaOrEnd,
    /// In a string; `key` says where it goes when it closes.
    Str { key: bool },
    /// After a backslash in a string.
    Escape { key: bool },
    /// In a `\uXXXX` escape, hex digits left.
    Unicode { key: bool, left: u8 },
    Number(Num),
    /// In `true` / `false` / `null`: the literal and the bytes matched.
    Literal { word: u8, at: u8 },
    /// The top-level object closed.
    Done,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Num {
    Minus,
    Zero,
    Int,
    Dot,
    Frac,
    Exp,
    ExpSign,
    ExpInt,
}

const LITERALS: [&[u8]; 3] = [b"true", b"false", b"null"];

/// The automaton's state: small and `Copy`, so a token is tried on a copy.
#[derive(Debug, Clone, Copy)]
pub struct JsonState {
    expect: Expect,
    /// Open containers, innermost last: true for an object.
    stack: [bool; MAX_DEPTH],
    depth: u8,
    /// Whitespace bytes in a row outside strings.
    ws: u8,
}

impl Default for JsonState {
    fn default() -> Self {
        JsonState { expect: Expect::Start, stack: [false; MAX_DEPTH], depth: 0, ws: 0 }
    }
}

impl JsonState {
    /// Whether the top-level object has closed.
    pub fn done(&self) -> bool {
        self.expect == Expect::Done
    }

    /// Takes one byte; false (state unspecified) where it cannot continue a JSON object.
    pub fn push(&mut self, b: u8) -> bool {
        let ws = matches!(b, b' ' | b'\t' | b'\n' | b'\r');
        match self.expect {
            Expect::Str { key } => {
                match b {
                    b'"' => self.expect = if key { Expect::Colon } else { self.after_value() },
                    b'\\' => self.expect = Expect::Escape { key },
                    _ if b < 0x20 => return false,
                    _ => {}
                }
                return true;
            }
            Expect::Escape { key } => {
                self.expect = match b {
                    b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => Expect::Str { key },
                    b'u' => Expect::Unicode { key, left: 4 },
                    _ => return false,
                };
                return true;
            }
            Expect::Unicode { key, left } => {
                if !b.is_ascii_hexdigit() {
                    return false;
                }
                self.expect = if left == 1 { Expect::Str { key } } else { Expect::Unicode { key, left: left - 1 } };
                return true;
            }
            Expect::Literal { word, at } => {
                let w = LITERALS[word as usize];
                if w[at as usize] != b {
                    return false;
                }
                self.expect = if at as usize + 1 == w.len() { self.after_value() } else { Expect::Literal { word, at: at + 1 } };
                return true;
            }
            Expect::Number(n) => {
                let next = match (n, b) {
                    (Num::Minus, b'0') => Some(Num::Zero),
                    (Num::Minus, b'1'..=b'9') => Some(Num::Int),
                    (Num::Int, b'0'..=b'9') => Some(Num::Int),
                    (Num::Zero | Num::Int, b'.') => Some(Num::Dot),
                    (Num::Dot | Num::Frac, b'0'..=b'9') => Some(Num::Frac),
                    (Num::Zero | Num::Int | Num::Frac, b'e' | b'E') => Some(Num::Exp),
                    (Num::Exp, b'+' | b'-') => Some(Num::ExpSign),
                    (Num::Exp | Num::ExpSign | Num::ExpInt, b'0'..=b'9') => Some(Num::ExpInt),
                    _ => None,
                };
                if let Some(n) = next {
                    self.expect = Expect::Number(n);
                    return true;
                }
                // The number ends here if it is whole; the byte then follows it.
                if !matches!(n, Num::Zero | Num::Int | Num::Frac | Num::ExpInt) {
                    return false;
                }
                self.expect = self.after_value();
            }
            _ => {}
        }
        if ws {
            if matches!(self.expect, Expect::Done | Expect::Start) || self.ws >= MAX_WHITESPACE_RUN {
                return false;
            }
            self.ws += 1;
            return true;
        }
        self.ws = 0;
        match (self.expect, b) {
            (Expect::Start | Expect::StartAfterThinking, b'{') => self.open(true),
            (Expect::KeyOrObjectEnd, b'}') => self.close(true),
            (Expect::KeyOrObjectEnd | Expect::Key, b'"') => {
                self.expect = Expect::Str { key: true };
                true
            }
            (Expect::Colon, b':') => {
                self.expect = Expect::Value;
                true
            }
            (Expect::ValueOrArrayEnd, b']') => self.close(false),
            (Expect::Value | Expect::ValueOrArrayEnd, _) => self.value_start(b),
            (Expect::CommaOrEnd, b',') => {
                self.expect = if self.stack[self.depth as usize - 1] { Expect::Key } else { Expect::Value };
                true
            }
            (Expect::CommaOrEnd, b'}') => self.close(true),
            (Expect::CommaOrEnd, b']') => self.close(false),
            _ => false,
        }
    }

    fn value_start(&mut self, b: u8) -> bool {
        self.expect = match b {
            b'{' => return self.open(true),
            b'[' => return self.open(false),
            b'"' => Expect::Str { key: false },
            b'-' => Expect::Number(Num::Minus),
            b'0' => Expect::Number(Num::Zero),
            b'1'..=b'9' => Expect::Number(Num::Int),
            b't' => Expect::Literal { word: 0, at: 1 },
            b'f' => Expect::Literal { word: 1, at: 1 },
            b'n' => Expect::Literal { word: 2, at: 1 },
            _ => return false,
        };
        true
    }

    fn open(&mut self, object: bool) -> bool {
        if self.depth as usize == MAX_DEPTH {
            return false;
        }
        self.stack[self.depth as usize] = object;
        self.depth += 1;
        self.expect = if object { Expect::KeyOrObjectEnd } else { Expect::ValueOrArrayEnd };
        true
    }

    fn close(&mut self, object: bool) -> bool {
        if self.depth == 0 || self.stack[self.depth as usize - 1] != object {
            return false;
        }
        self.depth -= 1;
        self.expect = self.after_value();
        true
    }

    fn after_value(&self) -> Expect {
        if self.depth == 0 { Expect::Done } else { Expect::CommaOrEnd }
    }

    /// Takes all of `bytes`; false where one cannot continue.
    pub fn push_all(&mut self, bytes: &[u8]) -> bool {
        !bytes.is_empty() && bytes.iter().all(|&b| self.push(b))
    }
}

/// One sequence's constraint: the automaton over its output so far.
pub struct JsonConstraint {
    tokens: Arc<TokenBytes>,
    /// Ids never allowed: the model's EOS (which may be a non-special added token).
    banned: Vec<u32>,
    state: JsonState,
    /// Thinking first (the prompt opened a `<think>` block): the output is free until it holds
    /// `</think>`, then the object starts. The last bytes seen while thinking.
    thinking: Option<Vec<u8>>,
}

/// What ends the free thinking before the object.
pub(crate) const THINK_END: &[u8] = b"</think>";

/// Where `bytes` hold `</think>`: the index just past it.
pub(crate) fn past_think_end(bytes: &[u8]) -> Option<usize> {
    bytes.windows(THINK_END.len()).position(|w| w == THINK_END).map(|at| at + THINK_END.len())
}

impl JsonConstraint {
    pub fn new(tokens: Arc<TokenBytes>, banned: Vec<u32>) -> JsonConstraint {
        JsonConstraint { tokens, banned, state: JsonState::default(), thinking: None }
    }

    /// The same, with the output thinking first: anything but a banned id until `</think>`
    /// (as vLLM starts a grammar only past the reasoning).
    pub fn after_thinking(tokens: Arc<TokenBytes>, banned: Vec<u32>) -> JsonConstraint {
        JsonConstraint { thinking: Some(Vec::new()), ..JsonConstraint::new(tokens, banned) }
    }

    /// Sets the logits of every token that cannot come next to -inf; false if none can.
    pub fn mask(&self, logits: &mut [f32]) -> bool {
        if let Some(seen) = &self.thinking {
            // Free text, but a token that ends the block must leave what follows the tag a
            // start of the object (whitespace, then `{`).
            let mut refuse: Vec<u32> = self.banned.clone();
            let mut tail = Vec::new();
            for &id in &self.tokens.with_gt {
                tail.clear();
                tail.extend_from_slice(seen);
                tail.extend_from_slice(self.tokens.bytes(id));
                if let Some(past) = past_think_end(&tail) {
                    let mut st = JsonState { expect: Expect::StartAfterThinking, ..JsonState::default() };
                    if !tail[past..].iter().all(|&b| st.push(b)) {
                        refuse.push(id);
                    }
                }
            }
            for id in refuse {
                if let Some(l) = logits.get_mut(id as usize) {
                    *l = f32::NEG_INFINITY;
                }
            }
            return logits.iter().any(|l| *l > f32::NEG_INFINITY);
        }
        let mut allowed = vec![false; logits.len()];
        let in_string = matches!(self.state.expect, Expect::Str { .. });
        let groups = if in_string {
            // Plain string bytes keep a string open: those tokens need no walk.
            for &id in &self.tokens.plain_in_string {
                if let Some(a) = allowed.get_mut(id as usize) {
                    *a = true;
                }
            }
            &self.tokens.other_by_first
        } else {
            &self.tokens.by_first
        };
        for (first, ids) in groups.iter().enumerate() {
            let mut st = self.state;
            if ids.is_empty() || !st.push(first as u8) {
                continue;
            }
            let mut i = 0;
            while i < ids.len() {
                let b = self.tokens.bytes(ids[i]);
                let mut st = self.state;
                match b.iter().position(|&x| !st.push(x)) {
                    None => {
                        if let Some(a) = allowed.get_mut(ids[i] as usize) {
                            *a = true;
                        }
                        i += 1;
                    }
                    // Every token that starts with the bytes up to the refused one is refused
                    // too; in byte order they follow this one, so skip past them at once.
                    Some(k) => {
                        let refused = &b[..=k];
                        i += 1 + ids[i + 1..].partition_point(|&id| self.tokens.bytes(id).starts_with(refused));
                    }
                }
            }
        }
        for &id in &self.banned {
            if let Some(a) = allowed.get_mut(id as usize) {
                *a = false;
            }
        }
        for (l, ok) in logits.iter_mut().zip(&allowed) {
            if !ok {
                *l = f32::NEG_INFINITY;
            }
        }
        allowed.iter().any(|&a| a)
    }

    /// Takes the sampled token (one `mask` allowed).
    pub fn advance(&mut self, token: u32) {
        let bytes = self.tokens.bytes(token);
        if let Some(seen) = &mut self.thinking {
            // Keep just enough bytes to find the end tag across tokens.
            seen.extend_from_slice(bytes);
            if let Some(past) = past_think_end(seen) {
                // Bytes after the tag in the same token (whitespace, as a rule) begin the object.
                let rest = seen[past..].to_vec();
                self.thinking = None;
                self.state.expect = Expect::StartAfterThinking;
                let ok = rest.is_empty() || self.state.push_all(&rest);
                debug_assert!(ok, "bytes after </think> that cannot open the object");
            } else if seen.len() > THINK_END.len() {
                seen.drain(..seen.len() - (THINK_END.len() - 1));
            }
            return;
        }
        let ok = self.state.push_all(bytes);
        debug_assert!(ok, "a token the mask did not allow");
    }

    /// Whether the object has closed (the sequence then stops).
    pub fn done(&self) -> bool {
        self.state.done()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The golden fixture's byte-level vocabulary (512 tokens) and its bytes.
    fn golden() -> (Tokenizer, Arc<TokenBytes>) {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/golden/default/tokenizer.json");
        let tok = Tokenizer::from_file(std::path::Path::new(path)).unwrap();
        let tb = Arc::new(TokenBytes::from_tokenizer(&tok).unwrap());
        (tok, tb)
    }

    fn accepts(s: &str) -> Option<JsonState> {
        let mut st = JsonState::default();
        s.bytes().all(|b| st.push(b)).then_some(st)
    }

    #[test]
    fn whole_objects_complete_and_their_prefixes_are_accepted() {
        let docs = [
            r#"{}"#,
            r#"{"a": 1}"#,
            "{\n  \"name\": \"Ada\",\n  \"tags\": [\"x\", \"y\\n\\u00e9\\\"\"],\n  \"n\": -0.5e+10,\n  \"ok\": true,\n  \"none\": null,\n  \"deep\": {\"l\": [[], {}, [1, 2.25, -3E2]]}\n}",
            r#"{"é 漢字 🙂": "ünï"}"#,
            r#"{"z":0,"f":false}"#,
        ];
        for d in docs {
            assert!(serde_json::from_str::<serde_json::Value>(d).unwrap().is_object(), "{d}");
            for cut in (0..d.len()).filter(|&i| d.is_char_boundary(i)) {
                let st = accepts(&d[..cut]).unwrap_or_else(|| panic!("prefix {:?} refused", &d[..cut]));
                assert!(!st.done(), "{:?} is not whole", &d[..cut]);
            }
            assert!(accepts(d).unwrap_or_else(|| panic!("{d} refused")).done(), "{d}");
        }
    }

    #[test]
    fn what_is_not_json_or_not_an_object_is_refused() {
        for bad in [
            "[1]", "\"s\"", "1", "{'a': 1}", "{\"a\" 1}", "{\"a\": 01}", "{\"a\": 1.}", "{\"a\": .5}", "{\"a\": -}",
            "{\"a\": tru}x", "{\"a\": True}", "{\"a\": [1,]}", "{\"a\": 1,}", "{,}", "{\"a\": 1]", "{\"a\": [1}", "{}}",
            "{\"a\": \"\\x\"}", "{\"a\": \"\\u12g4\"}", "{\"a\": \"line\nbreak\"}", "{\"a\": 1 2}", "{\"a\":: 1}",
        ] {
            assert!(accepts(bad).is_none_or(|s| !s.done()), "{bad:?} accepted as a whole object");
            // serde_json agrees that none of these is a JSON object.
            assert!(serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(bad).is_err(), "{bad:?}");
        }
        // A refused byte is refused wherever it comes.
        assert!(accepts("{\"a\": 1]").is_none());
        assert!(accepts("{}x").is_none());
        // Nothing follows the closed object, whitespace included: the sequence stops there.
        assert!(accepts("{} ").is_none());
    }

    #[test]
    fn whitespace_runs_and_depth_are_bounded() {
        let ok = format!("{{{}\"a\": 1}}", " ".repeat(MAX_WHITESPACE_RUN as usize));
        assert!(accepts(&ok).unwrap().done());
        assert!(accepts(" {}").is_none(), "the object starts at once");
        assert!(accepts(&format!("{{{}", " ".repeat(MAX_WHITESPACE_RUN as usize + 1))).is_none());
        // Whitespace inside strings is content, not a run.
        assert!(accepts(&format!("{{\"{}\": 1}}", " ".repeat(100))).unwrap().done());
        let deep = format!("{{\"a\": {}", "[".repeat(MAX_DEPTH - 1));
        assert!(accepts(&deep).is_some());
        assert!(accepts(&format!("{deep}[")).is_none());
    }

    #[test]
    fn token_bytes_are_what_the_tokenizer_decodes() {
        let (tok, tb) = golden();
        let mut checked = 0;
        for id in 0..tok.vocab_size() as u32 {
            let text = tok.decode(&[id], false).unwrap();
            if tok.is_special(id) {
                assert!(tb.bytes(id).is_empty(), "special token {id} has bytes");
            } else if !text.contains('\u{FFFD}') {
                assert_eq!(tb.bytes(id), text.as_bytes(), "token {id}");
                checked += 1;
            }
        }
        assert!(checked > 200, "{checked} tokens compared");
        // Every byte stands alone in a byte-level vocabulary, so no state is ever without a token.
        assert!((0..=255u8).all(|b| (0..tok.vocab_size() as u32).any(|id| tb.bytes(id) == [b])));
        let with_bytes = (0..tok.vocab_size() as u32).filter(|&id| !tb.bytes(id).is_empty()).count();
        assert_eq!(tb.by_first.iter().map(Vec::len).sum::<usize>(), with_bytes);
        assert_eq!(tb.plain_in_string.len() + tb.other_by_first.iter().map(Vec::len).sum::<usize>(), with_bytes);
    }

    #[test]
    fn the_mask_allows_exactly_the_tokens_that_keep_an_object() {
        let (tok, tb) = golden();
        let n = tok.vocab_size();
        let brace = (0..n as u32).find(|&id| tb.bytes(id) == b"{").unwrap();
        // At the start only `{` can come (alone or leading a token that goes on validly).
        let c = JsonConstraint::new(tb.clone(), Vec::new());
        let mut logits = vec![0.0f32; n];
        assert!(c.mask(&mut logits));
        assert_eq!(logits[brace as usize], 0.0);
        for id in 0..n as u32 {
            if logits[id as usize] == 0.0 {
                assert_eq!(tb.bytes(id)[0], b'{', "token {id} {:?}", tb.bytes(id));
            }
        }
        // A banned id (as EOS is) is never allowed, even where its bytes would be.
        let c = JsonConstraint::new(tb.clone(), vec![brace]);
        let mut logits = vec![0.0f32; n];
        c.mask(&mut logits);
        assert_eq!(logits[brace as usize], f32::NEG_INFINITY);
        // In every kind of state: a token is allowed exactly when the automaton takes all of its
        // bytes (the mask's grouped, skipping walk against trying each token whole).
        let single = |piece: u8| (0..n as u32).find(|&id| tb.bytes(id) == [piece]).unwrap();
        let mut c = JsonConstraint::new(tb.clone(), Vec::new());
        for &byte in b"{\"k\": [12, -3.5e2, \"s\\u00e9\", {\"n\": true}, null], \"x\":" {
            let mut logits = vec![0.0f32; n];
            c.mask(&mut logits);
            for id in 0..n as u32 {
                let mut st = c.state;
                assert_eq!(logits[id as usize] == 0.0, st.push_all(tb.bytes(id)), "after {:?}: token {id} {:?}", c.state.expect, tb.bytes(id));
            }
            assert!(logits[single(byte) as usize] == 0.0, "the next byte {byte} was masked");
            c.advance(single(byte));
        }
        assert!(!c.done());
    }

    #[test]
    fn thinking_first_is_free_until_the_block_ends_then_the_object() {
        let (tok, tb) = golden();
        let n = tok.vocab_size();
        let single = |piece: u8| (0..n as u32).find(|&id| tb.bytes(id) == [piece]).unwrap();
        let eos = single(b'~');
        let mut c = JsonConstraint::after_thinking(tb.clone(), vec![eos]);
        // Thinking: anything but the banned id, a quote or a brace included.
        for &b in b"Plan: {x} \"y\" </thin" {
            let mut logits = vec![0.0f32; n];
            assert!(c.mask(&mut logits));
            assert_eq!(logits.iter().filter(|l| l.is_finite()).count(), n - 1, "while thinking");
            assert_eq!(logits[eos as usize], f32::NEG_INFINITY);
            c.advance(single(b));
        }
        // `k` then `>` ends the block: then a token ending it must leave a start of the object.
        c.advance(single(b'k'));
        let mut logits = vec![0.0f32; n];
        c.mask(&mut logits);
        for id in 0..n as u32 {
            let b = tb.bytes(id);
            let mut tail = b"</think".to_vec();
            tail.extend_from_slice(b);
            let ok = match tail.windows(THINK_END.len()).position(|w| w == THINK_END) {
                None => true,
                Some(at) => {
                    let mut st = JsonState { expect: Expect::StartAfterThinking, ..JsonState::default() };
                    tail[at + THINK_END.len()..].iter().all(|&x| st.push(x))
                }
            };
            assert_eq!(logits[id as usize].is_finite(), ok && id != eos, "token {id} {b:?}");
        }
        assert!(logits[single(b'>') as usize].is_finite());
        c.advance(single(b'>'));
        assert!(c.thinking.is_none());
        // Past the block: whitespace (bounded), then the object.
        let mut logits = vec![0.0f32; n];
        c.mask(&mut logits);
        assert!(logits[single(b'{') as usize].is_finite() && logits[single(b'\n') as usize].is_finite());
        assert!(!logits[single(b'P') as usize].is_finite() && !logits[single(b'"') as usize].is_finite());
        c.advance(single(b'\n'));
        c.advance(single(b'{'));
        let mut logits = vec![0.0f32; n];
        c.mask(&mut logits);
        assert!(logits[single(b'"') as usize].is_finite() && logits[single(b'}') as usize].is_finite());
        // Which prompts open the block.
        let ids = |s: &str| tok.encode(s, false).unwrap();
        assert!(tb.ends_in_open_think(&ids("user: hi\nassistant:<think>\n")));
        assert!(!tb.ends_in_open_think(&ids("assistant:<think>\n\n</think>\n\n")));
        assert!(!tb.ends_in_open_think(&ids("assistant:")));
    }

    #[test]
    fn gpt2_byte_map_is_a_bijection() {
        let m = char_to_byte();
        assert_eq!(m.len(), 256);
        let mut seen = [false; 256];
        for &b in m.values() {
            seen[b as usize] = true;
        }
        assert!(seen.iter().all(|&s| s));
        assert_eq!(m[&'Ġ'], b' ');
        assert_eq!(m[&'Ċ'], b'\n');
        assert_eq!(m[&'a'], b'a');
    }
}
