//! Request bodies of the OpenAI routes, parsed strictly (types and ranges, naming the
//! parameter) into what the engine needs. Unknown fields are ignored and logged at debug level.

use std::collections::{BTreeMap, HashMap};

use peregrine_core::{Guide, SamplingParams};
use peregrine_engine::StopParams;
use serde::Deserialize;
use serde_json::Value;

use crate::error::ApiError;

/// Parses JSON into `T`, turning serde's complaint into a 400 that names the field.
pub fn parse_body<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    from_value(body_value(bytes)?)
}

/// The body as a JSON object.
pub fn body_value(bytes: &[u8]) -> Result<Value, ApiError> {
    let text = std::str::from_utf8(bytes).map_err(|e| ApiError::invalid(format!("request body is not valid UTF-8: {e}")))?;
    let value: Value = serde_json::from_str(text).map_err(|e| {
        // serde_json stops at 128 levels of nesting (so a crafted body cannot exhaust the stack):
        // valid JSON, refused for its depth.
        if e.to_string().starts_with("recursion limit exceeded") {
            ApiError::invalid(format!("request body nests JSON deeper than 128 levels (the server's limit), at line {} column {}", e.line(), e.column()))
        } else {
            ApiError::invalid(format!("request body is not valid JSON: {e}"))
        }
    })?;
    if !value.is_object() {
        return Err(ApiError::invalid("request body must be a JSON object"));
    }
    Ok(value)
}

/// A route's own fields and the shared ones, each parsed from the same body (no `flatten`, which
/// would hide the failing field's name), with unknown fields logged.
pub fn parse_request<T: serde::de::DeserializeOwned>(bytes: &[u8], route: &str, own: &[&str]) -> Result<(T, CommonParams), ApiError> {
    let value = body_value(bytes)?;
    let unknown: Vec<&String> = value
        .as_object()
        .map(|o| o.keys().filter(|k| !own.contains(&k.as_str()) && !COMMON_FIELDS.contains(&k.as_str())).collect())
        .unwrap_or_default();
    if !unknown.is_empty() {
        tracing::debug!(route, ?unknown, "ignoring unknown request fields");
    }
    if let Some((field, why)) = UNSUPPORTED.iter().find_map(|(field, set, why)| value.get(*field).filter(|v| set(v)).map(|_| (*field, *why))) {
        return Err(ApiError::param(field, format!("`{field}` is not supported: {why}")));
    }
    Ok((from_value(value.clone())?, from_value(value)?))
}

/// vLLM's request fields whose effect this server does not provide: a request setting one to
/// anything but its neutral value is refused, naming it, instead of being served as if it had
/// not (an unknown field is ignored; these would silently change what the caller gets).
#[allow(clippy::type_complexity)]
const UNSUPPORTED: &[(&str, fn(&Value) -> bool, &str)] = &[
    ("use_beam_search", |v| v.as_bool() != Some(false) && !v.is_null(), "beam search is not implemented; sampling with `n` and `seed` is"),
    ("length_penalty", |v| !v.is_null() && v.as_f64() != Some(1.0), "it weighs beam search, which is not implemented"),
    ("chat_template", |v| !v.is_null(), "the server's chat template (or --chat-template) renders every chat"),
    ("logits_processors", set_list, "custom logits processors cannot be loaded"),
    ("structural_tag", |v| !v.is_null(), "use `response_format` with a JSON schema, or `structured_outputs`"),
    ("prompt_embeds", |v| !v.is_null(), "send the prompt as text or token ids"),
    ("kv_transfer_params", |v| !v.is_null(), "there is no disaggregated prefill here"),
    ("max_repetition_pattern_size", set_number, "repetition stops are not implemented"),
    ("min_repetition_pattern_size", set_number, "repetition stops are not implemented"),
    ("repetition_min_count", set_number, "repetition stops are not implemented"),
];

/// At most this many `bad_words` (each costs every row of the request a suffix check a step).
pub const MAX_BAD_WORDS: usize = 256;

/// vLLM's `bad_words` as token sequences, tokenized as vLLM does: each word without its leading
/// spaces and, where that gives as many tokens starting with another one, after one space (the
/// word inside a text). `encode` tokenizes without special tokens.
pub fn bad_words(words: &[String], vocab_size: usize, encode: impl Fn(&str) -> Result<Vec<u32>, String>) -> Result<Vec<Vec<u32>>, ApiError> {
    if words.len() > MAX_BAD_WORDS {
        return Err(ApiError::param("bad_words", format!("at most {MAX_BAD_WORDS} `bad_words`, got {}", words.len())));
    }
    let mut out: Vec<Vec<u32>> = Vec::new();
    for w in words {
        let bare = w.trim_start();
        let err = |e: String| ApiError::param("bad_words", format!("bad word {w:?}: {e}"));
        let ids = encode(bare).map_err(err)?;
        let Some(&first) = ids.first() else {
            return Err(ApiError::param("bad_words", format!("bad word {w:?} has no tokens")));
        };
        let spaced = encode(&format!(" {bare}")).map_err(err)?;
        let with_space = (spaced.len() == ids.len() && spaced.first() != Some(&first)).then_some(spaced);
        for seq in std::iter::once(ids).chain(with_space) {
            if let Some(id) = seq.iter().find(|&&id| id as usize >= vocab_size) {
                return Err(ApiError::param("bad_words", format!("bad word {w:?} has token {id}, outside the model's vocabulary ({vocab_size})")));
            }
            if !out.contains(&seq) {
                out.push(seq);
            }
        }
    }
    Ok(out)
}

/// `best_of` = n returns every choice, as n alone does; more would need a ranking by logprob
/// that this server does not make (vLLM's V1 engine refuses it too).
pub fn check_best_of(best_of: Option<i64>, common: &CommonParams) -> Result<(), ApiError> {
    match best_of {
        Some(b) if b != common.n.unwrap_or(1) => Err(ApiError::param("best_of", format!("`best_of` other than `n` is not supported (got {b}): every choice is returned; set `n`"))),
        _ => Ok(()),
    }
}

/// A list or value other than null and `[]`.
fn set_list(v: &Value) -> bool {
    !v.is_null() && v.as_array().is_none_or(|a| !a.is_empty())
}

/// Anything but null and 0.
fn set_number(v: &Value) -> bool {
    !v.is_null() && v.as_f64() != Some(0.0)
}

const COMMON_FIELDS: &[&str] = &[
    "model", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "min_p", "n", "stream",
    "stream_options", "stop", "stop_token_ids", "seed", "presence_penalty", "frequency_penalty",
    "repetition_penalty", "logit_bias", "ignore_eos", "min_tokens", "priority", "skip_special_tokens", "user",
    "response_format", "guided_json", "guided_regex", "guided_choice", "guided_grammar", "guided_decoding_backend",
    "guided_whitespace_pattern", "structured_outputs", "include_stop_str_in_output", "truncate_prompt_tokens", "allowed_token_ids",
    "return_tokens_as_token_ids", "add_special_tokens", "cache_salt", "return_token_ids", "prompt_logprobs",
    "bad_words", "request_id",
];
pub const CHAT_FIELDS: &[&str] = &["best_of", "echo", "reasoning_effort", "documents", "include_reasoning", "messages", "logprobs", "top_logprobs", "tools", "tool_choice", "parallel_tool_calls", "chat_template_kwargs", "add_generation_prompt", "continue_final_message", "functions", "function_call"];
pub const COMPLETION_FIELDS: &[&str] = &["prompt", "echo", "logprobs", "suffix", "best_of"];

fn from_value<T: serde::de::DeserializeOwned>(value: Value) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let msg = e.inner().to_string();
        if path == "." || path.is_empty() {
            // Top-level complaints ("missing field `messages`") still name their field.
            match msg.strip_prefix("missing field `").and_then(|r| r.split('`').next()) {
                Some(field) => ApiError::param(field, msg.clone()),
                None => ApiError::invalid(msg),
            }
        } else {
            let param = path.split(['.', '[']).next().unwrap_or(&path).to_owned();
            ApiError::param(&param, format!("`{path}`: {msg}"))
        }
    })
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum StopField {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
pub struct StreamOptions {
    /// None: absent (usage on, vLLM's default); Some(None): null (off, as vLLM reads it).
    #[serde(default, deserialize_with = "present")]
    pub include_usage: Option<Option<bool>>,
    /// vLLM's: with `include_usage`, every chunk carries its choice's usage so far.
    #[serde(default)]
    pub continuous_usage_stats: Option<bool>,
}

/// A field that is present (null or a value), told apart from an absent one (`#[serde(default)]`
/// gives None).
fn present<'de, D: serde::Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(d).map(Some)
}

/// Sampling and stopping fields shared by both routes.
#[derive(Debug, Deserialize, Default)]
pub struct CommonParams {
    pub model: Option<String>,
    pub max_tokens: Option<i64>,
    pub max_completion_tokens: Option<i64>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<i64>,
    pub min_p: Option<f64>,
    pub n: Option<i64>,
    #[serde(default)]
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub stop: Option<StopField>,
    pub stop_token_ids: Option<Vec<u32>>,
    pub seed: Option<i64>,
    pub presence_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
    pub repetition_penalty: Option<f64>,
    pub logit_bias: Option<HashMap<String, f64>>,
    pub ignore_eos: Option<bool>,
    pub min_tokens: Option<i64>,
    pub priority: Option<i32>,
    pub skip_special_tokens: Option<bool>,
    pub user: Option<String>,
    pub response_format: Option<Value>,
    /// vLLM's guided decoding fields (`structured_outputs` is their newer form); checked by
    /// `guide` rather than typed here, so a wrong type gets that field's own error.
    pub guided_json: Option<Value>,
    pub guided_regex: Option<Value>,
    pub guided_choice: Option<Value>,
    pub guided_grammar: Option<Value>,
    pub guided_whitespace_pattern: Option<Value>,
    pub structured_outputs: Option<Value>,
    /// vLLM's: the stop string that ended the output is part of it.
    pub include_stop_str_in_output: Option<bool>,
    /// vLLM's: only the prompt's last k tokens are read (-1: as many as the context holds).
    pub truncate_prompt_tokens: Option<i64>,
    /// vLLM's: only these tokens may be sampled.
    pub allowed_token_ids: Option<Vec<u32>>,
    /// vLLM's: logprobs name their tokens `token_id:<id>` instead of by their text.
    pub return_tokens_as_token_ids: Option<bool>,
    /// vLLM's: the tokenizer adds its special tokens (BOS) to a text prompt; by default on
    /// /v1/completions, off for chats (the template writes them).
    pub add_special_tokens: Option<bool>,
    /// vLLM's: prefix-cache entries are shared only among requests with the same salt.
    pub cache_salt: Option<String>,
    /// vLLM's: the response carries the prompt's and the output's token ids.
    pub return_token_ids: Option<bool>,
    /// vLLM's: each prompt token's logprob, rank and this many likeliest alternatives.
    pub prompt_logprobs: Option<i64>,
    /// vLLM's: words the output never contains (tokenized by `bad_words`).
    pub bad_words: Option<Vec<String>>,
    /// vLLM's: the response's `id` after its prefix (an `X-Request-Id` header comes first).
    pub request_id: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    pub messages: Value,
    pub logprobs: Option<bool>,
    pub top_logprobs: Option<i64>,
    pub tools: Option<Value>,
    pub tool_choice: Option<Value>,
    /// false: at most one tool call per reply (OpenAI's; true by default).
    pub parallel_tool_calls: Option<bool>,
    pub chat_template_kwargs: Option<serde_json::Map<String, Value>>,
    pub add_generation_prompt: Option<bool>,
    pub continue_final_message: Option<bool>,
    /// OpenAI's deprecated function calling, read only to be refused.
    pub functions: Option<Value>,
    pub function_call: Option<Value>,
    /// vLLM's legacy field: refused unless it equals `n`.
    pub best_of: Option<i64>,
    /// OpenAI's; reaches the chat template as the variable `reasoning_effort` (as vLLM hands it).
    pub reasoning_effort: Option<String>,
    /// vLLM's: documents for a RAG chat template, as its variable `documents`.
    pub documents: Option<Value>,
    /// vLLM's: false leaves the reasoning out of the reply (`reasoning_content`).
    pub include_reasoning: Option<bool>,
    /// vLLM's: the reply starts with the last message's text where that message is the
    /// assistant's (a prefill the reply continues).
    pub echo: Option<bool>,
}

#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    pub prompt: Value,
    pub echo: Option<bool>,
    pub logprobs: Option<i64>,
    pub suffix: Option<String>,
    pub best_of: Option<i64>,
}

pub const MAX_N: usize = 64;
pub const MAX_STOP_STRINGS: usize = 16;
pub const MAX_TOP_LOGPROBS: usize = 20;

/// What one choice needs from the engine, before the prompt is known.
#[derive(Debug, Clone)]
pub struct Plan {
    pub sampling: SamplingParams,
    pub stop: StopParams,
    /// None: up to the context limit.
    pub max_tokens: Option<usize>,
    /// The field `max_tokens` came from (`max_completion_tokens` or `max_tokens`), for errors.
    pub max_tokens_param: &'static str,
    /// The field the output's constraint came from (`response_format`, a guided field,
    /// `tool_choice`), for the errors of building it.
    pub guide_param: &'static str,
    /// Where `max_tokens` is None: at most this many (the model's `max_new_tokens`).
    pub default_max_tokens: Option<usize>,
    pub n: usize,
    pub stream: bool,
    pub include_usage: bool,
    /// Every streamed chunk carries its choice's usage so far (`continuous_usage_stats`).
    pub continuous_usage: bool,
    /// `add_special_tokens` as sent (each route has its own default).
    pub add_special_tokens: Option<bool>,
    pub cache_salt: Option<String>,
    /// The response carries `prompt_token_ids` and each choice's `token_ids`.
    pub return_token_ids: bool,
    pub priority: i32,
    /// Only the prompt's last this many tokens are read; `usize::MAX`: as many as the context
    /// holds with room for one token (vLLM's `truncate_prompt_tokens: -1`).
    pub truncate_prompt_tokens: Option<usize>,
    /// Logprobs name tokens `token_id:<id>` (vLLM's `return_tokens_as_token_ids`).
    pub tokens_as_ids: bool,
    /// The response carries the prompt's logprobs with this many alternatives each (vLLM's
    /// `prompt_logprobs`; never when streamed).
    pub prompt_logprobs: Option<usize>,
    /// The caller's id for the response (`request_id`), checked by `client_request_id`.
    pub request_id: Option<String>,
}

impl Plan {
    /// `ids` cut to the prompt's tokens this request reads (`truncate_prompt_tokens`: its last
    /// k, a left truncation), for a context of `max_model_len`.
    pub fn truncate_prompt(&self, ids: &mut Vec<u32>, max_model_len: usize) {
        if let Some(k) = self.truncate_prompt_tokens {
            let keep = k.min(max_model_len.saturating_sub(1));
            if ids.len() > keep {
                ids.drain(..ids.len() - keep);
            }
        }
    }
}

fn range(param: &str, v: Option<f64>, lo: f64, hi: f64, lo_open: bool) -> Result<Option<f64>, ApiError> {
    match v {
        None => Ok(None),
        // An open bound holds for the f32 the sampler uses too (1e-300 is > 0, its f32 is not).
        Some(x) if !x.is_finite() || x > hi || x < lo || (lo_open && x as f32 as f64 <= lo) => Err(ApiError::param(
            param,
            format!("`{param}` must be {} {lo} and <= {hi}, got {x}", if lo_open { ">" } else { ">=" }),
        )),
        Some(x) => Ok(Some(x)),
    }
}

/// Validates the shared fields. `logprobs` is the number of top log-probabilities asked for.
pub fn plan(c: &CommonParams, logprobs: Option<usize>, vocab_size: usize, always_usage: bool) -> Result<Plan, ApiError> {
    let (json_object, guide) = response_format(c.response_format.as_ref())?;
    let from_vllm = vllm_guide(c)?;
    // The field errors in building the guide name (`allowed_token_ids` combines with no guide).
    let guide_param = from_vllm.as_ref().map_or("response_format", |g| g.1);
    let guide = one_guide(json_object, guide, from_vllm.map(|g| g.0))?;
    let mut s = SamplingParams { json_object, guide, ..SamplingParams::default() };
    if let Some(t) = range("temperature", c.temperature, 0.0, 2.0, false)? {
        s.temperature = t as f32;
    }
    if let Some(p) = range("top_p", c.top_p, 0.0, 1.0, true)? {
        s.top_p = p as f32;
    }
    if let Some(k) = c.top_k {
        if k < -1 {
            return Err(ApiError::param("top_k", format!("`top_k` must be -1 (disabled) or >= 0, got {k}")));
        }
        s.top_k = k.max(0) as usize;
    }
    if let Some(p) = range("min_p", c.min_p, 0.0, 1.0, false)? {
        s.min_p = p as f32;
    }
    if let Some(p) = range("presence_penalty", c.presence_penalty, -2.0, 2.0, false)? {
        s.presence_penalty = p as f32;
    }
    if let Some(p) = range("frequency_penalty", c.frequency_penalty, -2.0, 2.0, false)? {
        s.frequency_penalty = p as f32;
    }
    if let Some(p) = range("repetition_penalty", c.repetition_penalty, 0.0, 10.0, true)? {
        s.repetition_penalty = p as f32;
    }
    if let Some(bias) = &c.logit_bias {
        let mut m = BTreeMap::new();
        for (k, v) in bias {
            let id: u32 = k.parse().map_err(|_| ApiError::param("logit_bias", format!("`logit_bias` keys must be token ids, got `{k}`")))?;
            if id as usize >= vocab_size {
                return Err(ApiError::param("logit_bias", format!("token id {id} is outside the vocabulary ({vocab_size})")));
            }
            range("logit_bias", Some(*v), -100.0, 100.0, false)?;
            m.insert(id, *v as f32);
        }
        s.logit_bias = m;
    }
    s.seed = c.seed.map(|x| x as u64);
    s.logprobs = logprobs;
    if let Some(ids) = &c.allowed_token_ids {
        if ids.is_empty() {
            return Err(ApiError::param("allowed_token_ids", "`allowed_token_ids` must not be empty"));
        }
        if let Some(id) = ids.iter().find(|&&id| id as usize >= vocab_size) {
            return Err(ApiError::param("allowed_token_ids", format!("token id {id} is outside the vocabulary ({vocab_size})")));
        }
        if s.json_object || s.guide.is_some() {
            return Err(ApiError::param("allowed_token_ids", "`allowed_token_ids` cannot be combined with `response_format` or guided fields (each holds the output to its own tokens)"));
        }
        s.allowed_token_ids = Some(ids.clone());
    }

    let n = match c.n {
        None => 1,
        Some(n) if n >= 1 && n as usize <= MAX_N => n as usize,
        Some(n) => return Err(ApiError::param("n", format!("`n` must be between 1 and {MAX_N}, got {n}"))),
    };
    let max_tokens = match (c.max_completion_tokens, c.max_tokens) {
        (Some(m), _) | (None, Some(m)) if m < 1 => {
            let p = if c.max_completion_tokens.is_some() { "max_completion_tokens" } else { "max_tokens" };
            return Err(ApiError::param(p, format!("`{p}` must be at least 1, got {m}")));
        }
        (Some(m), _) | (None, Some(m)) => Some(m as usize),
        (None, None) => None,
    };
    let stop_strings = match &c.stop {
        None => vec![],
        Some(StopField::One(s)) => vec![s.clone()],
        Some(StopField::Many(v)) => v.clone(),
    };
    if stop_strings.len() > MAX_STOP_STRINGS {
        return Err(ApiError::param("stop", format!("at most {MAX_STOP_STRINGS} stop sequences, got {}", stop_strings.len())));
    }
    if stop_strings.iter().any(String::is_empty) {
        return Err(ApiError::param("stop", "stop sequences must not be empty"));
    }
    let stop_token_ids = c.stop_token_ids.clone().unwrap_or_default();
    if let Some(id) = stop_token_ids.iter().find(|&&id| id as usize >= vocab_size) {
        return Err(ApiError::param("stop_token_ids", format!("token id {id} is outside the vocabulary ({vocab_size})")));
    }
    let min_tokens = match c.min_tokens {
        None => 0,
        Some(m) if m >= 0 => m as usize,
        Some(m) => return Err(ApiError::param("min_tokens", format!("`min_tokens` must be >= 0, got {m}"))),
    };
    if let Some(m) = max_tokens {
        if min_tokens > m {
            return Err(ApiError::param("min_tokens", format!("`min_tokens` ({min_tokens}) exceeds max_tokens ({m})")));
        }
    }
    let stream = c.stream.unwrap_or(false);
    if c.stream_options.is_some() && !stream {
        return Err(ApiError::param("stream_options", "`stream_options` is only allowed with `stream: true`"));
    }
    // `stream_options` without `include_usage` asks for it, as vLLM reads it (its default is true).
    let include_usage = always_usage || c.stream_options.as_ref().is_some_and(|o| o.include_usage.is_none_or(|given| given == Some(true)));
    let continuous_usage = include_usage && c.stream_options.as_ref().and_then(|o| o.continuous_usage_stats).unwrap_or(false);
    let cache_salt = match &c.cache_salt {
        Some(salt) if salt.is_empty() => return Err(ApiError::param("cache_salt", "`cache_salt` must be a non-empty string")),
        salt => salt.clone(),
    };
    let prompt_logprobs = match c.prompt_logprobs {
        None => None,
        // vLLM's rules and words: refused with a stream, where it would fill something.
        Some(k) if stream && (k > 0 || k == -1) => return Err(ApiError::param("prompt_logprobs", "`prompt_logprobs` are not available when `stream=true`")),
        Some(0) if stream => None,
        Some(k) if (0..=MAX_TOP_LOGPROBS as i64).contains(&k) => Some(k as usize),
        Some(-1) => return Err(ApiError::param("prompt_logprobs", format!("`prompt_logprobs` -1 (the whole vocabulary, {vocab_size} tokens) is more than the {MAX_TOP_LOGPROBS} allowed"))),
        Some(k) => return Err(ApiError::param("prompt_logprobs", format!("`prompt_logprobs` must be between 0 and {MAX_TOP_LOGPROBS}, got {k}"))),
    };
    let truncate_prompt_tokens = match c.truncate_prompt_tokens {
        None => None,
        Some(-1) => Some(usize::MAX),
        Some(k) if k >= 1 => Some(k as usize),
        Some(k) => return Err(ApiError::param("truncate_prompt_tokens", format!("`truncate_prompt_tokens` must be -1 (as many as the context holds) or at least 1, got {k}"))),
    };
    Ok(Plan {
        sampling: s,
        stop: StopParams {
            stop_strings,
            include_stop_str: c.include_stop_str_in_output.unwrap_or(false),
            stop_token_ids,
            ignore_eos: c.ignore_eos.unwrap_or(false),
            min_tokens,
            max_tokens: max_tokens.unwrap_or(usize::MAX),
            skip_special_tokens: c.skip_special_tokens.unwrap_or(true),
        },
        max_tokens,
        max_tokens_param: if c.max_completion_tokens.is_some() { "max_completion_tokens" } else { "max_tokens" },
        guide_param,
        default_max_tokens: None,
        n,
        stream,
        include_usage,
        continuous_usage,
        add_special_tokens: c.add_special_tokens,
        cache_salt,
        return_token_ids: c.return_token_ids.unwrap_or(false),
        priority: c.priority.unwrap_or(0),
        truncate_prompt_tokens,
        tokens_as_ids: c.return_tokens_as_token_ids.unwrap_or(false),
        prompt_logprobs,
        request_id: c.request_id.as_deref().map(|id| client_request_id(id).map_err(|why| ApiError::param("request_id", format!("`request_id` {why}")))).transpose()?,
    })
}

/// The most bytes a caller's request id may have: it is repeated in every streamed chunk.
pub const MAX_REQUEST_ID_BYTES: usize = 256;

/// A caller's request id (the body's `request_id` or an `X-Request-Id` header), as it will
/// follow `chatcmpl-` / `cmpl-` in the response's `id`; or why it cannot.
pub fn client_request_id(id: &str) -> Result<String, String> {
    if id.is_empty() {
        return Err("must be a non-empty string".into());
    }
    if id.len() > MAX_REQUEST_ID_BYTES {
        return Err(format!("must be at most {MAX_REQUEST_ID_BYTES} bytes, got {}", id.len()));
    }
    if id.chars().any(char::is_control) {
        return Err("must not contain control characters".into());
    }
    Ok(id.to_owned())
}

/// `response_format`: JSON mode (`json_object`: the output is kept a JSON object, engine's
/// json_mode) or a JSON schema (`json_schema`: the output is kept a value of
/// `json_schema.schema`, engine's guided; `strict` is accepted and always holds). Returns
/// (JSON mode, the schema's guide).
fn response_format(v: Option<&Value>) -> Result<(bool, Option<Guide>), ApiError> {
    let kind = match v {
        None | Some(Value::Null) => return Ok((false, None)),
        Some(v) => v.get("type").and_then(Value::as_str),
    };
    match kind {
        Some("text") => Ok((false, None)),
        Some("json_object") => Ok((true, None)),
        Some("json_schema") => json_schema(v.and_then(|v| v.get("json_schema"))).map(|s| (false, Some(Guide::JsonSchema(s)))),
        Some(t) => Err(ApiError::param("response_format", format!("`response_format.type` must be `text`, `json_object` or `json_schema`, got `{t}`"))),
        None => Err(ApiError::param("response_format", "`response_format` must be an object with a string `type`")),
    }
}

/// `response_format.json_schema`: `{"name": .., "schema": {..}, "strict": ..}` (OpenAI's form).
/// A missing `schema` is `{}`, any JSON value, as OpenAI's is optional.
fn json_schema(v: Option<&Value>) -> Result<Value, ApiError> {
    let err = |m: String| ApiError::param("response_format", m);
    let Some(Value::Object(o)) = v else {
        return Err(err("`response_format` of type `json_schema` needs a `json_schema` object: {\"name\": .., \"schema\": {..}}".into()));
    };
    if let Some(n) = o.get("name").filter(|n| !n.is_null()) {
        match n.as_str() {
            Some(n) if !n.is_empty() && n.len() <= 64 && n.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') => {}
            _ => return Err(err(format!("`response_format.json_schema.name` must be 1-64 letters, digits, `_` or `-`, got {n}"))),
        }
    }
    if let Some(s) = o.get("strict").filter(|s| !s.is_null() && !s.is_boolean()) {
        return Err(err(format!("`response_format.json_schema.strict` must be a boolean, got {s}")));
    }
    match o.get("schema") {
        None | Some(Value::Null) => Ok(Value::Object(Default::default())),
        Some(s @ (Value::Object(_) | Value::Bool(true))) => Ok(s.clone()),
        Some(s) => Err(err(format!("`response_format.json_schema.schema` must be a JSON Schema object, got {s}"))),
    }
}

/// vLLM's guided decoding fields: `guided_json` (a schema, or its JSON text), `guided_regex`,
/// `guided_choice`, `guided_grammar`, or `structured_outputs` holding one of `json` / `regex` /
/// `choice` / `grammar`. A grammar is GBNF (llama.cpp's, the EBNF vLLM's clients send; rewritten
/// by `gbnf::gbnf_to_lark`) or llguidance's Lark, told apart as vLLM's guidance backend does.
/// Returns the guide and the field it came from.
fn vllm_guide(c: &CommonParams) -> Result<Option<(Guide, &'static str)>, ApiError> {
    let mut found = Vec::new();
    for (field, v) in [("guided_json", &c.guided_json), ("guided_regex", &c.guided_regex), ("guided_choice", &c.guided_choice), ("guided_grammar", &c.guided_grammar)] {
        if let Some(v) = v.as_ref().filter(|v| !v.is_null()) {
            found.push((guide_of(field, field.trim_start_matches("guided_"), v)?, field));
        }
    }
    // How a JSON guide's whitespace and objects are read (vLLM's switches).
    let mut options = JsonOptions::default();
    if let Some(p) = c.guided_whitespace_pattern.as_ref().filter(|p| !p.is_null()) {
        options.whitespace_pattern = Some(p.as_str().ok_or_else(|| ApiError::param("guided_whitespace_pattern", "`guided_whitespace_pattern` must be a regex string"))?.to_owned());
    }
    match &c.structured_outputs {
        None | Some(Value::Null) => {}
        Some(Value::Object(o)) => {
            for (key, v) in o.iter().filter(|(_, v)| !v.is_null()) {
                let flag = || v.as_bool().ok_or_else(|| ApiError::param("structured_outputs", format!("`structured_outputs.{key}` must be a boolean")));
                match key.as_str() {
                    "json" | "regex" | "choice" | "grammar" => found.push((guide_of("structured_outputs", key, v)?, "structured_outputs")),
                    // One backend here, so nothing to fall back from.
                    "disable_fallback" => {
                        flag()?;
                    }
                    "disable_any_whitespace" => options.compact = flag()?,
                    "disable_additional_properties" => options.closed_objects = flag()?,
                    "whitespace_pattern" => {
                        options.whitespace_pattern = Some(v.as_str().ok_or_else(|| ApiError::param("structured_outputs", "`structured_outputs.whitespace_pattern` must be a regex string"))?.to_owned())
                    }
                    other => return Err(ApiError::param("structured_outputs", format!("`structured_outputs.{other}` is not supported (`json`, `regex`, `choice` and `grammar` are)"))),
                }
            }
        }
        Some(v) => return Err(ApiError::param("structured_outputs", format!("`structured_outputs` must be an object, got {v}"))),
    }
    match found.len() {
        0 => Ok(None),
        1 => Ok(found.pop().map(|(g, field)| (options.apply(g), field))),
        _ => Err(ApiError::invalid("give one of `guided_json`, `guided_regex`, `guided_choice`, `guided_grammar` and `structured_outputs`'s `json` / `regex` / `choice` / `grammar`, not several")),
    }
}

/// vLLM's switches for a JSON guide.
#[derive(Default)]
struct JsonOptions {
    /// `whitespace_pattern`: the whitespace allowed between a value's tokens.
    whitespace_pattern: Option<String>,
    /// `disable_any_whitespace`: none at all.
    compact: bool,
    /// `disable_additional_properties`: objects whose schema does not say take no other keys.
    closed_objects: bool,
}

impl JsonOptions {
    fn apply(&self, guide: Guide) -> Guide {
        let Guide::JsonSchema(mut schema) = guide else {
            return guide;
        };
        if self.closed_objects {
            close_objects(&mut schema);
        }
        let whitespace = match (&self.whitespace_pattern, self.compact) {
            (_, true) => Some(serde_json::json!({"whitespace_flexible": false})),
            (Some(p), false) => Some(serde_json::json!({"whitespace_pattern": p})),
            (None, false) => None,
        };
        if let (Some(w), Value::Object(o)) = (whitespace, &mut schema) {
            o.entry("x-guidance").or_insert(w);
        }
        Guide::JsonSchema(schema)
    }
}

/// Sets `additionalProperties: false` on every object schema in `schema` (through its
/// subschemas, not its data: `const`, `enum`, `default` stay as sent) that leaves it unset.
fn close_objects(schema: &mut Value) {
    let Value::Object(o) = schema else {
        return;
    };
    let is_object = o.get("type").is_some_and(|t| t == "object" || t.as_array().is_some_and(|a| a.iter().any(|t| t == "object"))) || o.contains_key("properties");
    if is_object && !o.contains_key("additionalProperties") {
        o.insert("additionalProperties".into(), Value::Bool(false));
    }
    for (key, sub) in o.iter_mut() {
        match (key.as_str(), sub) {
            ("properties" | "patternProperties" | "$defs" | "definitions", Value::Object(map)) => map.values_mut().for_each(close_objects),
            ("anyOf" | "oneOf" | "allOf" | "prefixItems", Value::Array(list)) => list.iter_mut().for_each(close_objects),
            ("items" | "additionalProperties" | "not" | "if" | "then" | "else" | "contains", sub) => close_objects(sub),
            _ => {}
        }
    }
}

/// One guided field's value as a guide: `kind` is `json`, `regex` or `choice`; `field` names it
/// in errors.
fn guide_of(field: &str, kind: &str, v: &Value) -> Result<Guide, ApiError> {
    let err = |m: String| ApiError::param(field, m);
    match (kind, v) {
        ("json", Value::Object(_) | Value::Bool(true)) => Ok(Guide::JsonSchema(v.clone())),
        ("json", Value::String(text)) => match serde_json::from_str::<Value>(text) {
            Ok(s @ Value::Object(_)) => Ok(Guide::JsonSchema(s)),
            _ => Err(err(format!("`{field}` must be a JSON Schema object or its JSON text"))),
        },
        ("json", _) => Err(err(format!("`{field}` must be a JSON Schema object or its JSON text"))),
        ("regex", Value::String(rx)) if !rx.is_empty() => Ok(Guide::Regex(rx.clone())),
        ("regex", _) => Err(err(format!("`{field}` must be a non-empty regular expression string"))),
        ("choice", Value::Array(list)) if !list.is_empty() && list.iter().all(Value::is_string) => {
            Ok(Guide::Choice(list.iter().filter_map(|c| c.as_str().map(str::to_owned)).collect()))
        }
        ("choice", _) => Err(err(format!("`{field}` must be a non-empty list of strings"))),
        ("grammar", Value::String(g)) if !g.trim().is_empty() => {
            if peregrine_engine::gbnf::looks_like_gbnf(g) {
                peregrine_engine::gbnf::gbnf_to_lark(g).map(Guide::Grammar).map_err(|e| err(format!("`{field}` (GBNF): {e}")))
            } else {
                Ok(Guide::Grammar(g.clone()))
            }
        }
        _ => Err(err(format!("`{field}` must be a grammar string (GBNF, as llama.cpp's, or Lark)"))),
    }
}

/// At most one constraint a request: JSON mode, `response_format`'s schema or vLLM's fields.
fn one_guide(json_object: bool, from_format: Option<Guide>, from_vllm: Option<Guide>) -> Result<Option<Guide>, ApiError> {
    match (json_object || from_format.is_some(), from_vllm) {
        (true, Some(_)) => Err(ApiError::param("response_format", "`response_format` and vLLM's guided fields (`guided_json`, `structured_outputs`, ...) constrain the output both; give one")),
        (_, Some(g)) => Ok(Some(g)),
        (_, None) => Ok(from_format),
    }
}

/// What a chat request's tools ask of its output.
#[derive(Debug)]
pub enum ToolUse {
    /// No tools, or `tool_choice: none`.
    Off,
    /// `auto` (the default with tools): calls parsed out of the output in the model's syntax.
    Parse,
    /// `required` or a named function: the output is held to the calls' JSON by `guide` (as
    /// vLLM forces them) and read back as `forced` says.
    Forced { forced: Forced, guide: Guide },
}

/// A forced tool call's output: the named function's arguments object, or (`required`) a list
/// of `{"name": .., "parameters": {..}}`, one or more.
#[derive(Debug, Clone, PartialEq)]
pub enum Forced {
    Named(String),
    Required,
}

/// Checks `tools` and `tool_choice`, and says what they ask of the output; `parallel`: more
/// than one call may be made (`parallel_tool_calls`).
pub fn tool_use(tools: Option<&Value>, tool_choice: Option<&Value>, parallel: bool) -> Result<ToolUse, ApiError> {
    let list: &[Value] = match tools {
        None | Some(Value::Null) => &[],
        Some(Value::Array(list)) => {
            for (i, t) in list.iter().enumerate() {
                if t.get("type").and_then(Value::as_str) != Some("function") {
                    return Err(ApiError::param("tools", format!("`tools[{i}].type` must be `function`")));
                }
                let name = t.get("function").and_then(|f| f.get("name")).and_then(Value::as_str);
                if name.is_none_or(|n| n.trim().is_empty()) {
                    return Err(ApiError::param("tools", format!("`tools[{i}].function.name` is required and must be a non-empty string")));
                }
                if t["function"].get("parameters").is_some_and(|p| !p.is_object()) {
                    return Err(ApiError::param("tools", format!("`tools[{i}].function.parameters` must be a JSON Schema object")));
                }
            }
            list
        }
        Some(_) => return Err(ApiError::param("tools", "`tools` must be a list of {\"type\": \"function\", \"function\": {...}}")),
    };
    // Each tool's name and parameters schema (an object of any keys where none is given).
    let params = |t: &Value| t["function"].get("parameters").cloned().unwrap_or_else(|| serde_json::json!({"type": "object"}));
    let name_of = |t: &Value| t["function"]["name"].as_str().unwrap_or_default().to_owned();
    let choice = match tool_choice {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.as_str()),
        Some(Value::Object(o)) if o.get("type").and_then(Value::as_str) == Some("function") => {
            let Some(name) = o.get("function").and_then(|f| f.get("name")).and_then(Value::as_str) else {
                return Err(ApiError::param("tool_choice", "`tool_choice.function.name` is required"));
            };
            let Some(tool) = list.iter().find(|t| t["function"]["name"] == name) else {
                return Err(ApiError::param("tool_choice", format!("`tool_choice` names `{name}`, which is not among `tools`")));
            };
            return Ok(ToolUse::Forced { forced: Forced::Named(name.to_owned()), guide: Guide::JsonSchema(params(tool)) });
        }
        Some(_) => return Err(ApiError::param("tool_choice", "`tool_choice` must be `none`, `auto`, `required` or {\"type\": \"function\", ...}")),
    };
    match choice {
        None | Some("auto") if list.is_empty() => Ok(ToolUse::Off),
        None | Some("auto") => Ok(ToolUse::Parse),
        Some("none") => Ok(ToolUse::Off),
        Some("required") if list.is_empty() => Err(ApiError::param("tool_choice", "`tool_choice: required` needs `tools`")),
        Some("required") => {
            let calls: Vec<Value> = list
                .iter()
                .map(|t| {
                    serde_json::json!({"type": "object", "properties": {"name": {"const": name_of(t)}, "parameters": params(t)},
                                       "required": ["name", "parameters"], "additionalProperties": false})
                })
                .collect();
            let mut list = serde_json::json!({"type": "array", "minItems": 1, "items": {"anyOf": calls}});
            if !parallel {
                list["maxItems"] = 1.into();
            }
            let guide = Guide::JsonSchema(list);
            Ok(ToolUse::Forced { forced: Forced::Required, guide })
        }
        Some(s) => Err(ApiError::param("tool_choice", format!("`tool_choice` must be `none`, `auto` or `required`, got `{s}`"))),
    }
}

/// The prompt of /v1/completions: a string, a list of strings, a list of token ids, or a list of
/// lists of token ids.
pub enum PromptInput {
    Text(String),
    Tokens(Vec<u32>),
}

pub fn prompts(v: &Value) -> Result<Vec<PromptInput>, ApiError> {
    let bad = || ApiError::param("prompt", "`prompt` must be a string, a list of strings, a list of token ids, or a list of lists of token ids");
    let ids = |a: &[Value]| -> Result<Vec<u32>, ApiError> {
        a.iter()
            .map(|x| x.as_u64().and_then(|n| u32::try_from(n).ok()).ok_or_else(|| ApiError::param("prompt", format!("invalid token id {x}"))))
            .collect()
    };
    let out = match v {
        Value::String(s) => vec![PromptInput::Text(s.clone())],
        Value::Array(a) if a.is_empty() => return Err(ApiError::param("prompt", "`prompt` must not be empty")),
        Value::Array(a) if a.iter().all(Value::is_string) => a.iter().map(|s| PromptInput::Text(s.as_str().unwrap().to_owned())).collect(),
        Value::Array(a) if a.iter().all(Value::is_number) => vec![PromptInput::Tokens(ids(a)?)],
        Value::Array(a) if a.iter().all(Value::is_array) => {
            a.iter().map(|x| ids(x.as_array().unwrap()).map(PromptInput::Tokens)).collect::<Result<_, _>>()?
        }
        _ => return Err(bad()),
    };
    if out.len() > MAX_N {
        return Err(ApiError::param("prompt", format!("at most {MAX_N} prompts per request")));
    }
    Ok(out)
}

/// Checks OpenAI chat messages and flattens text-part lists into strings (templates expect
/// strings). An assistant turn's tool call arguments, a JSON string on the wire, go to the
/// template as the object they hold (as vLLM hands them): templates that list them (MiMo's and
/// Qwen3-Coder's XML form) need the object, and those that print a string print the object as
/// JSON. Returns the messages as the template will see them.
pub fn chat_messages(v: &Value) -> Result<Value, ApiError> {
    let list = v.as_array().ok_or_else(|| ApiError::param("messages", "`messages` must be a list"))?;
    if list.is_empty() {
        return Err(ApiError::param("messages", "`messages` must contain at least one message"));
    }
    let mut out = Vec::with_capacity(list.len());
    for (i, m) in list.iter().enumerate() {
        let p = format!("messages[{i}]");
        let obj = m.as_object().ok_or_else(|| ApiError::param("messages", format!("`{p}` must be an object")))?;
        let role = obj.get("role").and_then(Value::as_str).ok_or_else(|| ApiError::param("messages", format!("`{p}.role` is required and must be a string")))?;
        if !matches!(role, "system" | "developer" | "user" | "assistant" | "tool" | "function") {
            return Err(ApiError::param("messages", format!("`{p}.role` `{role}` is not one of system, developer, user, assistant, tool")));
        }
        let mut m = obj.clone();
        match obj.get("content") {
            // An assistant turn that only calls tools: its content as an empty string (as vLLM
            // hands it), since templates concatenate it (`'...' + message['content']`), which
            // fails on none.
            None | Some(Value::Null) => {
                let has_calls = obj.get("tool_calls").is_some_and(|c| c.is_array());
                if role != "assistant" || !has_calls {
                    return Err(ApiError::param("messages", format!("`{p}.content` is required")));
                }
                m.insert("content".into(), Value::String(String::new()));
            }
            Some(Value::String(_)) => {}
            // Text parts joined by newlines, as vLLM joins them: parts are separate pieces of
            // text, and run together their words would merge.
            Some(Value::Array(parts)) => {
                let mut texts = Vec::with_capacity(parts.len());
                for (j, part) in parts.iter().enumerate() {
                    match (part.get("type").and_then(Value::as_str), part.get("text").and_then(Value::as_str)) {
                        (Some("text"), Some(t)) => texts.push(t),
                        (Some(t), _) if t != "text" => {
                            return Err(ApiError::param("messages", format!("`{p}.content[{j}]`: content type `{t}` is not supported by this model")))
                        }
                        _ => return Err(ApiError::param("messages", format!("`{p}.content[{j}]` must be {{\"type\": \"text\", \"text\": ...}}"))),
                    }
                }
                m.insert("content".into(), Value::String(texts.join("\n")));
            }
            Some(_) => return Err(ApiError::param("messages", format!("`{p}.content` must be a string or a list of text parts"))),
        }
        if let Some(Value::Array(calls)) = m.get_mut("tool_calls") {
            for call in calls.iter_mut() {
                let Some(args) = call.get_mut("function").and_then(|f| f.get_mut("arguments")) else { continue };
                if let Some(object @ Value::Object(_)) = args.as_str().and_then(|a| serde_json::from_str::<Value>(a).ok()) {
                    *args = object;
                }
            }
        }
        out.push(Value::Object(m));
    }
    Ok(Value::Array(out))
}

#[cfg(test)]
mod guide_tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn closed_objects_reach_subschemas_but_not_data() {
        let mut schema = json!({
            "type": "object",
            "properties": {"a": {"type": "object", "properties": {"b": {"type": "integer"}}}, "c": {"const": {"type": "object"}}},
            "$defs": {"d": {"properties": {"e": {"type": "string"}}}},
            "items": {"anyOf": [{"type": ["object", "null"]}, {"type": "object", "additionalProperties": true}]}
        });
        close_objects(&mut schema);
        assert_eq!(schema["additionalProperties"], false);
        assert_eq!(schema["properties"]["a"]["additionalProperties"], false);
        assert!(schema["properties"]["a"]["properties"]["b"].get("additionalProperties").is_none());
        assert_eq!(schema["properties"]["c"], json!({"const": {"type": "object"}}), "data is not a schema");
        assert_eq!(schema["$defs"]["d"]["additionalProperties"], false);
        assert_eq!(schema["items"]["anyOf"][0]["additionalProperties"], false);
        assert_eq!(schema["items"]["anyOf"][1]["additionalProperties"], true, "what the schema says stays");
    }

    #[test]
    fn vllm_switches_reach_the_json_guide_only() {
        let guide = |so: Value| {
            let c = CommonParams { structured_outputs: Some(so), ..CommonParams::default() };
            vllm_guide(&c).map(|g| g.map(|(g, field)| {
                assert_eq!(field, "structured_outputs");
                g
            }))
        };
        let Ok(Some(Guide::JsonSchema(s))) = guide(json!({"json": {"type": "object"}, "disable_any_whitespace": true, "disable_additional_properties": true})) else {
            panic!("no JSON guide")
        };
        assert_eq!(s, json!({"type": "object", "additionalProperties": false, "x-guidance": {"whitespace_flexible": false}}));
        let Ok(Some(Guide::JsonSchema(s))) = guide(json!({"json": {"type": "object", "x-guidance": {"lenient": true}}, "whitespace_pattern": " ?"})) else {
            panic!("no JSON guide")
        };
        assert_eq!(s["x-guidance"], json!({"lenient": true}), "the schema's own x-guidance wins");
        assert_eq!(guide(json!({"regex": "a+", "disable_any_whitespace": true})).ok().flatten(), Some(Guide::Regex("a+".into())));
        assert!(guide(json!({"json": {}, "disable_any_whitespace": "yes"})).is_err());
        assert!(guide(json!({"json": {}, "whitespace_pattern": 3})).is_err());
    }
}

#[cfg(test)]
mod bad_words_tests {
    use super::*;

    /// vLLM's tokenization of `bad_words`: the bare word always; the spaced one where it has as
    /// many tokens and another first one; each sequence once; bad words refused by name.
    #[test]
    fn bad_words_are_tokenized_as_vllm_does() {
        let encode = |w: &str| -> Result<Vec<u32>, String> {
            Ok(match w {
                "ab" => vec![1, 2],
                " ab" => vec![3, 2],
                "cd" => vec![4, 5],
                " cd" => vec![6],
                "ef" => vec![7],
                " ef" => vec![7],
                "big" => vec![999],
                " big" => vec![9],
                _ => vec![],
            })
        };
        let words = |ws: &[&str]| ws.iter().map(|w| w.to_string()).collect::<Vec<_>>();
        assert_eq!(bad_words(&words(&["  ab", "cd", "ef", "ab"]), 100, encode).unwrap(), [vec![1, 2], vec![3, 2], vec![4, 5], vec![7]]);
        for (ws, says) in [(words(&[" "]), "has no tokens"), (words(&["big"]), "outside the model's vocabulary (100)"), (vec!["ab".to_string(); MAX_BAD_WORDS + 1], "at most 256")] {
            let e = bad_words(&ws, 100, encode).unwrap_err();
            assert_eq!(e.param.as_deref(), Some("bad_words"));
            assert!(e.message.contains(says), "{}", e.message);
        }
        let failing = |_: &str| -> Result<Vec<u32>, String> { Err("no tokenizer".into()) };
        assert!(bad_words(&words(&["ab"]), 100, failing).unwrap_err().message.contains("no tokenizer"));
    }
}
