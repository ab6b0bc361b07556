//! tokenizer.json through the `tokenizers` crate, with tokenizer_config.json's special tokens and
//! chat template, and an incremental detokeniser for streaming.

use std::path::Path;
use std::sync::Arc;

use peregrine_core::{Error, Result};
use serde_json::Value;

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    bos: Option<String>,
    eos: Option<String>,
    add_bos: bool,
    chat_template: Option<String>,
}

fn tok_err(e: impl std::fmt::Display) -> Error {
    Error::Tokenizer(e.to_string())
}

/// A special token given as a string or as an AddedToken dict `{"content": ...}`.
fn token_string(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_owned),
        _ => None,
    }
}

impl Tokenizer {
    pub fn from_file(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| Error::file(path, e))?;
        Self::from_bytes(&bytes).map_err(|e| Error::file(path, e))
    }

    pub fn from_bytes(json: &[u8]) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_bytes(json).map_err(tok_err)?;
        Ok(Self::from_tokenizers(inner))
    }

    pub fn from_tokenizers(inner: tokenizers::Tokenizer) -> Self {
        Tokenizer { inner, bos: None, eos: None, add_bos: false, chat_template: None }
    }

    /// Applies tokenizer_config.json: bos/eos tokens, `add_bos_token`, `chat_template` (a string
    /// or a list of `{name, template}` of which "default" is taken).
    pub fn with_config(mut self, config: &Value) -> Result<Self> {
        self.bos = token_string(config.get("bos_token"));
        self.eos = token_string(config.get("eos_token"));
        self.add_bos = config.get("add_bos_token").and_then(Value::as_bool).unwrap_or(false);
        self.chat_template = match config.get("chat_template") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                .or_else(|| list.first())
                .and_then(|t| t.get("template").and_then(Value::as_str))
                .map(str::to_owned),
            Some(_) => return Err(Error::Tokenizer("tokenizer_config.json: chat_template must be a string or a list".into())),
        };
        Ok(self)
    }

    pub fn set_special_tokens(&mut self, bos: Option<String>, eos: Option<String>, add_bos: bool) {
        self.bos = bos;
        self.eos = eos;
        self.add_bos = add_bos;
    }

    pub fn set_chat_template(&mut self, template: Option<String>) {
        self.chat_template = template;
    }

    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, add_special_tokens).map_err(tok_err)?;
        let mut ids = enc.get_ids().to_vec();
        // tokenizer.json post-processors usually add BOS themselves; `add_bos_token` covers
        // those that do not.
        if add_special_tokens && self.add_bos {
            if let Some(b) = self.bos.as_deref().and_then(|b| self.token_to_id(b)) {
                if ids.first() != Some(&b) {
                    ids.insert(0, b);
                }
            }
        }
        Ok(ids)
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner.decode(ids, skip_special_tokens).map_err(tok_err)
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    pub fn bos_token(&self) -> Option<&str> {
        self.bos.as_deref()
    }

    pub fn eos_token(&self) -> Option<&str> {
        self.eos.as_deref()
    }

    pub fn eos_token_ids(&self) -> Vec<u32> {
        self.eos.as_deref().and_then(|e| self.token_to_id(e)).into_iter().collect()
    }

    pub fn is_special(&self, id: u32) -> bool {
        self.inner.get_added_tokens_decoder().get(&id).is_some_and(|t| t.special)
    }

    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// Whether the decoder is byte-level BPE's (GPT-2's byte-to-character map), alone or in a
    /// sequence: then each token's bytes follow from its vocabulary string.
    pub fn is_byte_level(&self) -> bool {
        let d = serde_json::to_value(self.inner.get_decoder()).unwrap_or_default();
        d["type"] == "ByteLevel" || d["decoders"].as_array().is_some_and(|l| l.iter().any(|x| x["type"] == "ByteLevel"))
    }
}

/// Incremental detokeniser that never emits a broken UTF-8 character (the "prefix offset / read
/// offset" method of TGI and vLLM): decode a short window of recent tokens, emit only what
/// extends the previously decoded text, and hold back text ending in U+FFFD (an incomplete
/// character whose remaining bytes are in later tokens).
pub struct IncrementalDecoder {
    tokenizer: Arc<Tokenizer>,
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
    skip_special_tokens: bool,
}

impl IncrementalDecoder {
    pub fn new(tokenizer: Arc<Tokenizer>, prompt_ids: &[u32], skip_special_tokens: bool) -> Self {
        // A few prompt tokens of context make the first output token decode with the right
        // leading space.
        let ctx = &prompt_ids[prompt_ids.len().saturating_sub(5)..];
        IncrementalDecoder {
            tokenizer,
            ids: ctx.to_vec(),
            prefix_offset: 0,
            read_offset: ctx.len(),
            skip_special_tokens,
        }
    }

    pub fn push(&mut self, id: u32) -> Result<String> {
        self.ids.push(id);
        let prefix = self.tokenizer.decode(&self.ids[self.prefix_offset..self.read_offset], self.skip_special_tokens)?;
        let full = self.tokenizer.decode(&self.ids[self.prefix_offset..], self.skip_special_tokens)?;
        if full.len() > prefix.len() && !full.ends_with('\u{FFFD}') && full.is_char_boundary(prefix.len()) {
            let new = full[prefix.len()..].to_owned();
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            Ok(new)
        } else {
            Ok(String::new())
        }
    }

    /// Text still held back (an incomplete character at the very end), emitted as decoded.
    pub fn flush(&mut self) -> String {
        let prefix = self.tokenizer.decode(&self.ids[self.prefix_offset..self.read_offset], self.skip_special_tokens).unwrap_or_default();
        let full = self.tokenizer.decode(&self.ids[self.prefix_offset..], self.skip_special_tokens).unwrap_or_default();
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        if full.len() > prefix.len() && full.is_char_boundary(prefix.len()) {
            full[prefix.len()..].to_owned()
        } else {
            String::new()
        }
    }
}
