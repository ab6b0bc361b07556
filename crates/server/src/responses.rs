//! OpenAI's Responses API (`POST /v1/responses`) on the chat route: a request's instructions,
//! input items, tools and text format become a chat request (so the same validation, template,
//! sampling, guides and output parsers apply), and the chat's reply or chunks become a response
//! object or its typed stream events. Nothing is stored: `previous_response_id` is refused, and
//! a client sends the whole conversation in `input` (earlier outputs included, as items).

use std::convert::Infallible;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::stream::{self, StreamExt};
use serde_json::{json, Map, Value};

use crate::error::ApiError;
use crate::routes::{body_bytes, chat_run, chunks, read_chunk, ChatChunk, ChatRun};
use crate::state::{unix_now, AppState};

/// Fields this route reads itself (others are passed on or ignored).
const OWN_FIELDS: &[&str] = &[
    "input", "instructions", "max_output_tokens", "tools", "tool_choice", "text", "reasoning", "stream", "stream_options", "store",
    "metadata", "truncation", "include", "top_logprobs", "previous_response_id", "background", "service_tier", "prompt_cache_key",
    "safety_identifier", "max_tool_calls", "conversation", "prompt",
];
/// Fields that mean the same in a chat request, passed on as they are (OpenAI's and vLLM's
/// sampling extensions among them).
const PASSED_FIELDS: &[&str] = &[
    "model", "temperature", "top_p", "parallel_tool_calls", "user", "top_k", "min_p", "repetition_penalty", "presence_penalty",
    "frequency_penalty", "seed", "priority", "cache_salt", "chat_template_kwargs", "ignore_eos", "min_tokens", "stop",
    "stop_token_ids", "logit_bias", "bad_words", "skip_special_tokens",
];

pub async fn responses(State(state): State<AppState>, body: Result<Bytes, BytesRejection>) -> Result<Response, ApiError> {
    let body = body_bytes(body)?;
    let model = state.ready()?.model_name.clone();
    let req = crate::protocol::body_value(&body)?;
    let (chat, echo, stream) = chat_request(&req)?;
    // The chat always streams: one reading of its chunks gives both forms, so a response is
    // the same items streamed or not.
    let ChatRun::Stream(st) = chat_run(&state, Bytes::from(chat.to_string()), None).await.map_err(as_responses_error)? else {
        return Err(ApiError::internal("the chat route answered a streamed request whole"));
    };
    let mut events = Events::new(Shape { echo, id: item_id("resp"), created: unix_now(), model });
    if !stream {
        let mut chunks = std::pin::pin!(chunks(*st));
        while let Some(data) = chunks.next().await {
            events.chunk(&data);
        }
        return events.outcome().map(|r| Json(r).into_response());
    }
    let start = events.start();
    let rest = chunks(*st).flat_map(move |data| stream::iter(events.chunk(&data)));
    let sse = stream::iter(start).chain(rest).map(|e| Ok::<_, Infallible>(Event::default().event(e["type"].as_str().unwrap_or_default()).data(e.to_string())));
    Ok(Sse::new(sse).keep_alive(KeepAlive::default()).into_response())
}

/// `GET /v1/responses/{id}` and the like (retrieve, delete, cancel, input items): nothing is
/// stored, so there is nothing to find; said plainly rather than as an unknown route.
pub async fn not_stored() -> ApiError {
    ApiError::not_found("responses are not stored (every response is answered with `store: false`): there is nothing to retrieve, cancel or delete")
}

/// OpenAI's item ids: a type prefix, an underscore, hex.
fn item_id(prefix: &str) -> String {
    format!("{prefix}_{:032x}", rand::random::<u128>())
}

fn given(obj: &Map<String, Value>, field: &str) -> Option<Value> {
    obj.get(field).filter(|v| !v.is_null()).cloned()
}

/// The chat's fields this route sends under other names, as (chat, Responses).
const RENAMED: &[(&str, &str)] = &[
    ("messages", "input"),
    ("max_completion_tokens", "max_output_tokens"),
    ("max_tokens", "max_output_tokens"),
    ("response_format", "text.format"),
    ("reasoning_effort", "reasoning.effort"),
];

/// A chat error names the chat's field; the caller sent this route's (in `param`, and in the
/// message where it names the field whole).
fn as_responses_error(mut e: ApiError) -> ApiError {
    if let Some(&(chat, ours)) = RENAMED.iter().find(|(chat, _)| e.param.as_deref() == Some(*chat)) {
        e.param = Some(ours.to_owned());
        e.message = e.message.replace(&format!("`{chat}`"), &format!("`{ours}`"));
    }
    e
}

/// The chat request a Responses request stands for, and the request fields its response repeats.
/// Returns the chat request (always streamed), the fields to repeat, and whether the caller
/// asked for a stream.
fn chat_request(req: &Value) -> Result<(Value, Map<String, Value>, bool), ApiError> {
    let obj = req.as_object().ok_or_else(|| ApiError::invalid("the request body must be a JSON object"))?;
    let unknown: Vec<&String> = obj.keys().filter(|k| !OWN_FIELDS.contains(&k.as_str()) && !PASSED_FIELDS.contains(&k.as_str())).collect();
    if !unknown.is_empty() {
        tracing::debug!(route = "responses", ?unknown, "ignoring unknown request fields");
    }
    refuse_unsupported(obj)?;
    let mut chat: Map<String, Value> = PASSED_FIELDS.iter().filter_map(|f| obj.get(*f).map(|v| (f.to_string(), v.clone()))).collect();
    let mut messages = Vec::new();
    match obj.get("instructions") {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) => messages.push(json!({"role": "system", "content": s})),
        Some(_) => return Err(ApiError::param("instructions", "`instructions` must be a string")),
    }
    messages.extend(input_messages(obj.get("input"))?);
    chat.insert("messages".into(), Value::Array(messages));
    if let Some(n) = given(obj, "max_output_tokens") {
        chat.insert("max_completion_tokens".into(), n);
    }
    if let Some(tools) = given(obj, "tools") {
        chat.insert("tools".into(), chat_tools(&tools)?);
    }
    if let Some(choice) = given(obj, "tool_choice") {
        chat.insert("tool_choice".into(), chat_tool_choice(&choice)?);
    }
    if let Some(format) = text_format(obj)? {
        chat.insert("response_format".into(), format);
    }
    match given(obj, "reasoning") {
        None => {}
        Some(Value::Object(r)) => {
            if let Some(effort) = given(&r, "effort") {
                chat.insert("reasoning_effort".into(), effort);
            }
        }
        Some(_) => return Err(ApiError::param("reasoning", "`reasoning` must be an object")),
    }
    let stream = match obj.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(ApiError::param("stream", "`stream` must be a boolean")),
    };
    // The usage comes as the stream's last chunk.
    chat.insert("stream".into(), json!(true));
    chat.insert("stream_options".into(), json!({"include_usage": true}));
    let mut echo = Map::new();
    for field in ["instructions", "max_output_tokens", "temperature", "top_p", "user", "reasoning"] {
        echo.insert(field.into(), given(obj, field).unwrap_or(Value::Null));
    }
    echo.insert("tools".into(), given(obj, "tools").unwrap_or(json!([])));
    echo.insert("tool_choice".into(), given(obj, "tool_choice").unwrap_or(json!("auto")));
    echo.insert("parallel_tool_calls".into(), given(obj, "parallel_tool_calls").unwrap_or(json!(true)));
    echo.insert("text".into(), json!({"format": given(obj, "text").and_then(|t| given(t.as_object()?, "format")).unwrap_or(json!({"type": "text"}))}));
    echo.insert("metadata".into(), given(obj, "metadata").unwrap_or(json!({})));
    Ok((Value::Object(chat), echo, stream))
}

/// Responses fields whose effect this server does not provide: refused, naming them, rather
/// than answered as if they had not been sent.
fn refuse_unsupported(obj: &Map<String, Value>) -> Result<(), ApiError> {
    let stateless = "responses are not stored: send the whole conversation in `input` (earlier outputs as items)";
    let set = |f: &str| given(obj, f);
    if set("previous_response_id").is_some() {
        return Err(ApiError::param("previous_response_id", format!("`previous_response_id` is not supported: {stateless}")));
    }
    if set("conversation").is_some() {
        return Err(ApiError::param("conversation", format!("`conversation` is not supported: {stateless}")));
    }
    if set("background").is_some_and(|b| b != json!(false)) {
        return Err(ApiError::param("background", "`background` is not supported: responses are served while the request waits (or streamed)"));
    }
    if set("store").is_some_and(|v| !v.is_boolean()) {
        return Err(ApiError::param("store", "`store` must be a boolean"));
    }
    if set("metadata").is_some_and(|m| m.as_object().is_none_or(|o| o.values().any(|v| !v.is_string()))) {
        return Err(ApiError::param("metadata", "`metadata` must be an object of string values"));
    }
    if set("prompt").is_some() {
        return Err(ApiError::param("prompt", "stored prompt templates are not supported: send `instructions` and `input`"));
    }
    if set("max_tool_calls").is_some() {
        return Err(ApiError::param("max_tool_calls", "`max_tool_calls` is not supported: use `parallel_tool_calls: false` for one call at most"));
    }
    if set("truncation").is_some_and(|t| t != json!("disabled")) {
        return Err(ApiError::param("truncation", "only `truncation: \"disabled\"` is supported: a conversation longer than the context is refused"));
    }
    // Encrypted reasoning, which stateless clients ask for to send it back, is accepted: the
    // reasoning comes as plain `content`, which a later request's reasoning items are read from.
    if let Some(other) = set("include").and_then(|i| match i.as_array() {
        Some(list) => list.iter().find(|v| v.as_str() != Some("reasoning.encrypted_content")).cloned(),
        None => Some(i),
    }) {
        return Err(ApiError::param("include", format!("`include` {other} is not supported: only \"reasoning.encrypted_content\" is taken (reasoning comes back as plain content); /v1/chat/completions gives logprobs")));
    }
    if set("top_logprobs").is_some_and(|k| k != json!(0)) {
        return Err(ApiError::param("top_logprobs", "logprobs are not returned on this route: use /v1/chat/completions with `logprobs`"));
    }
    if let Some(verbosity) = set("text").and_then(|t| given(t.as_object()?, "verbosity")).filter(|v| v != &json!("medium")) {
        return Err(ApiError::param("text.verbosity", format!("`text.verbosity` {verbosity} is not supported (only \"medium\", the default)")));
    }
    Ok(())
}

/// `input` as chat messages: a string is one user message; a list holds messages (with text
/// parts), earlier function calls (an assistant turn's tool calls), their outputs (tool
/// messages) and earlier reasoning, which goes on the assistant turn after it as
/// `reasoning_content` (what MiMo's template reads back in multi-turn tool use).
fn input_messages(input: Option<&Value>) -> Result<Vec<Value>, ApiError> {
    let items = match input {
        None | Some(Value::Null) => return Err(ApiError::param("input", "`input` is required: a string or a list of input items")),
        Some(Value::String(s)) => return Ok(vec![json!({"role": "user", "content": s})]),
        Some(Value::Array(items)) if !items.is_empty() => items,
        Some(Value::Array(_)) => return Err(ApiError::param("input", "`input` must hold at least one item")),
        Some(_) => return Err(ApiError::param("input", "`input` must be a string or a list of input items")),
    };
    let mut out: Vec<Value> = Vec::with_capacity(items.len());
    // Reasoning waiting for the assistant turn it belongs to.
    let mut reasoning: Option<String> = None;
    for (i, item) in items.iter().enumerate() {
        let p = format!("input[{i}]");
        let obj = item.as_object().ok_or_else(|| ApiError::param("input", format!("`{p}` must be an object")))?;
        let string = |field: &str| {
            obj.get(field).and_then(Value::as_str).map(str::to_owned).ok_or_else(|| ApiError::param("input", format!("`{p}.{field}` is required and must be a string")))
        };
        let kind = match obj.get("type") {
            None | Some(Value::Null) if obj.contains_key("role") => "message",
            Some(Value::String(t)) => t.as_str(),
            _ => return Err(ApiError::param("input", format!("`{p}.type` is required (message, function_call, function_call_output or reasoning)"))),
        };
        match kind {
            "message" => {
                let role = string("role")?;
                if !matches!(role.as_str(), "user" | "system" | "developer" | "assistant") {
                    return Err(ApiError::param("input", format!("`{p}.role` `{role}` is not one of user, system, developer, assistant")));
                }
                let mut message = json!({"role": role, "content": message_text(obj.get("content"), &format!("{p}.content"))?});
                if let Some(r) = reasoning.take().filter(|_| role == "assistant") {
                    message["reasoning_content"] = json!(r);
                }
                out.push(message);
            }
            "function_call" => {
                let call = json!({"id": string("call_id")?, "type": "function", "function": {"name": string("name")?, "arguments": string("arguments")?}});
                // Calls after an assistant message (or after each other) belong to that turn,
                // unless reasoning came between: that starts a turn of its own.
                match out.last_mut().filter(|m| m["role"] == "assistant" && reasoning.is_none()) {
                    Some(turn) => match turn.get_mut("tool_calls").and_then(Value::as_array_mut) {
                        Some(calls) => calls.push(call),
                        None => turn["tool_calls"] = json!([call]),
                    },
                    None => {
                        let mut turn = json!({"role": "assistant", "content": "", "tool_calls": [call]});
                        if let Some(r) = reasoning.take() {
                            turn["reasoning_content"] = json!(r);
                        }
                        out.push(turn);
                    }
                }
            }
            "function_call_output" => {
                let output = match obj.get("output") {
                    Some(Value::String(s)) => s.clone(),
                    Some(parts @ Value::Array(_)) => message_text(Some(parts), &format!("{p}.output"))?,
                    _ => return Err(ApiError::param("input", format!("`{p}.output` is required and must be a string or a list of text parts"))),
                };
                reasoning = None;
                out.push(json!({"role": "tool", "tool_call_id": string("call_id")?, "content": output}));
            }
            "reasoning" => {
                // Its full text where the item has it, else its summary.
                let texts = |field: &str| obj.get(field).and_then(Value::as_array).map(|parts| parts.iter().filter_map(|t| t["text"].as_str()).collect::<Vec<_>>().join("\n"));
                let text = texts("content").filter(|t| !t.is_empty()).or_else(|| texts("summary")).unwrap_or_default();
                reasoning = Some(match reasoning.take() {
                    Some(before) => format!("{before}\n{text}"),
                    None => text,
                });
            }
            other => {
                return Err(ApiError::param("input", format!("`{p}.type` `{other}` is not supported (message, function_call, function_call_output and reasoning items are)")))
            }
        }
    }
    Ok(out)
}

/// A message's content (at path `p`) as text: a string, or text parts (`input_text`,
/// `output_text`) joined by newlines as the chat route joins its parts.
fn message_text(content: Option<&Value>, p: &str) -> Result<String, ApiError> {
    match content {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Array(parts)) => {
            let mut texts = Vec::with_capacity(parts.len());
            for (j, part) in parts.iter().enumerate() {
                match (part.get("type").and_then(Value::as_str), part.get("text").and_then(Value::as_str)) {
                    (Some("input_text" | "output_text"), Some(t)) => texts.push(t),
                    (Some(t @ ("input_image" | "input_file" | "input_audio")), _) => {
                        return Err(ApiError::param("input", format!("`{p}[{j}]`: content type `{t}` is not supported by this model")))
                    }
                    _ => return Err(ApiError::param("input", format!("`{p}[{j}]` must be {{\"type\": \"input_text\", \"text\": ...}}"))),
                }
            }
            Ok(texts.join("\n"))
        }
        _ => Err(ApiError::param("input", format!("`{p}` is required and must be a string or a list of text parts"))),
    }
}

/// Responses' flat function tools (`{"type": "function", "name", "parameters", ...}`) in the
/// chat's nested form.
fn chat_tools(tools: &Value) -> Result<Value, ApiError> {
    let list = tools.as_array().ok_or_else(|| ApiError::param("tools", "`tools` must be a list"))?;
    let mut out = Vec::with_capacity(list.len());
    for (i, tool) in list.iter().enumerate() {
        let obj = tool.as_object().ok_or_else(|| ApiError::param("tools", format!("`tools[{i}]` must be an object")))?;
        match obj.get("type").and_then(Value::as_str) {
            Some("function") => {}
            Some(other) => return Err(ApiError::param("tools", format!("`tools[{i}].type` `{other}` is not supported: only function tools are (the server runs no tools itself)"))),
            None => return Err(ApiError::param("tools", format!("`tools[{i}].type` is required"))),
        }
        let function: Map<String, Value> = ["name", "description", "parameters", "strict"].iter().filter_map(|f| obj.get(*f).map(|v| (f.to_string(), v.clone()))).collect();
        out.push(json!({"type": "function", "function": function}));
    }
    Ok(Value::Array(out))
}

fn chat_tool_choice(choice: &Value) -> Result<Value, ApiError> {
    match choice {
        Value::String(_) => Ok(choice.clone()),
        Value::Object(o) if o.get("type") == Some(&json!("function")) => match o.get("name") {
            Some(name @ Value::String(_)) => Ok(json!({"type": "function", "function": {"name": name}})),
            _ => Err(ApiError::param("tool_choice", "`tool_choice.name` is required and must be a string")),
        },
        _ => Err(ApiError::param("tool_choice", "`tool_choice` must be \"none\", \"auto\", \"required\" or {\"type\": \"function\", \"name\": ...}")),
    }
}

/// `text.format` as the chat's `response_format` (None: plain text).
fn text_format(obj: &Map<String, Value>) -> Result<Option<Value>, ApiError> {
    let Some(text) = given(obj, "text") else { return Ok(None) };
    let text = text.as_object().ok_or_else(|| ApiError::param("text", "`text` must be an object"))?;
    let Some(format) = given(text, "format") else { return Ok(None) };
    match format.get("type").and_then(Value::as_str) {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(json!({"type": "json_object"}))),
        Some("json_schema") => {
            let fields = format.as_object().into_iter().flatten().filter(|(k, _)| k.as_str() != "type").map(|(k, v)| (k.clone(), v.clone()));
            Ok(Some(json!({"type": "json_schema", "json_schema": Map::from_iter(fields)})))
        }
        _ => Err(ApiError::param("text.format", "`text.format.type` must be text, json_object or json_schema")),
    }
}

/// What a response object holds besides its output: its id, times, model and the request's
/// own fields.
struct Shape {
    echo: Map<String, Value>,
    id: String,
    created: u64,
    model: String,
}

impl Shape {
    /// The response object at `status` with `output` and `usage` (null while in progress).
    fn response(&self, status: &str, output: &[Value], usage: Option<&Value>, finish: Option<&str>) -> Value {
        let mut r = json!({
            "id": self.id, "object": "response", "created_at": self.created, "status": status, "model": self.model,
            "output": output, "usage": usage, "error": null, "incomplete_details": null, "store": false,
            "previous_response_id": null, "truncation": "disabled", "background": false,
        });
        for (k, v) in &self.echo {
            r[k] = v.clone();
        }
        if finish == Some("length") {
            r["incomplete_details"] = json!({"reason": "max_output_tokens"});
        }
        if status != "in_progress" {
            r["completed_at"] = json!(unix_now());
        }
        r
    }

}

/// A reply cut by its length is incomplete; any other end completes it (an aborted or failed
/// one fails instead, in `Events::fail`).
fn status_of(finish: Option<&str>) -> &'static str {
    match finish {
        Some("length") => "incomplete",
        _ => "completed",
    }
}

/// The chat's usage in Responses' names. Reasoning tokens are not counted apart (0): they are
/// among the output tokens.
fn usage(u: &Value) -> Value {
    json!({
        "input_tokens": u["prompt_tokens"], "output_tokens": u["completion_tokens"], "total_tokens": u["total_tokens"],
        "input_tokens_details": {"cached_tokens": u["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap_or(0), "cache_write_tokens": 0},
        "output_tokens_details": {"reasoning_tokens": 0},
    })
}

#[derive(Copy, Clone, PartialEq, Eq, Debug)]
enum Kind {
    Reasoning,
    Message,
}

/// A reasoning or message item holding `text`.
fn text_item(kind: Kind, id: &str, text: &str, status: &str) -> Value {
    match kind {
        Kind::Reasoning => json!({"type": "reasoning", "id": id, "summary": [], "content": [{"type": "reasoning_text", "text": text}], "status": status}),
        Kind::Message => json!({"type": "message", "id": id, "role": "assistant", "status": status, "content": [output_text(text)]}),
    }
}

fn output_text(text: &str) -> Value {
    json!({"type": "output_text", "text": text, "annotations": []})
}

/// A chat tool call (`{"id", "function": {"name", "arguments"}}`) as a function call item.
fn call_item(id: &str, call: &Value, status: &str) -> Value {
    json!({"type": "function_call", "id": id, "call_id": call["id"], "name": call["function"]["name"],
           "arguments": call["function"]["arguments"], "status": status})
}

/// The item being streamed: a reasoning or message item's text so far.
struct Open {
    kind: Kind,
    id: String,
    text: String,
}

/// A streamed chat's chunks as Responses events: `response.created` and `in_progress`, then per
/// item `output_item.added`, its content part, text deltas, their `done` events, and at the end
/// `response.completed` (or `incomplete`) with the whole response; a failure mid-stream (or an
/// abort at shutdown) is an `error` event and `response.failed`. A request that is not streamed
/// runs the same machine and answers its outcome.
struct Events {
    shape: Shape,
    seq: u64,
    output: Vec<Value>,
    open: Option<Open>,
    /// Blank text outside a message (between tool calls): shown only if text follows.
    held: String,
    finish: Option<String>,
    usage: Option<Value>,
    /// The final response, or why there is none.
    outcome: Option<Result<Value, ApiError>>,
}

impl Events {
    fn new(shape: Shape) -> Self {
        Events { shape, seq: 0, output: Vec::new(), open: None, held: String::new(), finish: None, usage: None, outcome: None }
    }

    /// What a request that was not streamed answers once its chunks are read.
    fn outcome(self) -> Result<Value, ApiError> {
        self.outcome.unwrap_or_else(|| Err(ApiError::internal("the chat stream ended without its end")))
    }

    /// An event's payload (its `type` is also the SSE event's name).
    fn event(&mut self, kind: &str, mut body: Value) -> Value {
        body["type"] = json!(kind);
        body["sequence_number"] = json!(self.seq);
        self.seq += 1;
        body
    }

    fn start(&mut self) -> Vec<Value> {
        let r = self.shape.response("in_progress", &[], None, None);
        vec![self.event("response.created", json!({"response": r})), self.event("response.in_progress", json!({"response": r}))]
    }

    /// The events one chat chunk (a `data:` payload) releases.
    fn chunk(&mut self, data: &str) -> Vec<Value> {
        if self.outcome.is_some() {
            return Vec::new();
        }
        let v = match read_chunk(data) {
            ChatChunk::Done => return self.end(),
            ChatChunk::Failed(e) => return self.fail(e),
            ChatChunk::Chunk(v) => v,
        };
        if let Some(u) = v.get("usage").filter(|u| !u.is_null()) {
            self.usage = Some(usage(u));
        }
        let mut out = Vec::new();
        for choice in v["choices"].as_array().into_iter().flatten() {
            let delta = &choice["delta"];
            if let Some(r) = delta["reasoning_content"].as_str().filter(|t| !t.is_empty()) {
                out.extend(self.text_delta(Kind::Reasoning, r));
            }
            if let Some(t) = delta["content"].as_str().filter(|t| !t.is_empty()) {
                out.extend(self.text_delta(Kind::Message, t));
            }
            for call in delta["tool_calls"].as_array().into_iter().flatten() {
                out.extend(self.close("completed"));
                self.held.clear();
                out.extend(self.call(call));
            }
            if let Some(f) = choice["finish_reason"].as_str() {
                self.finish = Some(f.to_owned());
            }
        }
        out
    }

    fn text_delta(&mut self, kind: Kind, text: &str) -> Vec<Value> {
        let mut out = Vec::new();
        let mut text = text.to_owned();
        if self.open.as_ref().map(|o| o.kind) != Some(kind) {
            // Blank text between items (the newlines between tool calls) would be a message of
            // its own: held until text shows it is part of one.
            if kind == Kind::Message && text.trim().is_empty() {
                self.held.push_str(&text);
                return out;
            }
            out.extend(self.close("completed"));
            out.extend(self.open_item(kind));
            if kind == Kind::Message {
                text.insert_str(0, &std::mem::take(&mut self.held));
            }
        }
        let open = self.open.as_mut().expect("an item was opened above");
        open.text.push_str(&text);
        let (item_id, output_index) = (open.id.clone(), self.output.len());
        let body = json!({"item_id": item_id, "output_index": output_index, "content_index": 0, "delta": text});
        out.push(match kind {
            Kind::Reasoning => self.event("response.reasoning_text.delta", body),
            Kind::Message => {
                let mut body = body;
                body["logprobs"] = json!([]);
                self.event("response.output_text.delta", body)
            }
        });
        out
    }

    fn open_item(&mut self, kind: Kind) -> Vec<Value> {
        let id = item_id(if kind == Kind::Reasoning { "rs" } else { "msg" });
        let mut item = text_item(kind, &id, "", "in_progress");
        item["content"] = json!([]);
        let part = match kind {
            Kind::Reasoning => json!({"type": "reasoning_text", "text": ""}),
            Kind::Message => output_text(""),
        };
        let index = self.output.len();
        self.open = Some(Open { kind, id: id.clone(), text: String::new() });
        vec![
            self.event("response.output_item.added", json!({"output_index": index, "item": item})),
            self.event("response.content_part.added", json!({"item_id": id, "output_index": index, "content_index": 0, "part": part})),
        ]
    }

    /// Ends the item being streamed (if any) with its `done` events.
    fn close(&mut self, status: &str) -> Vec<Value> {
        let Some(Open { kind, id, text }) = self.open.take() else { return Vec::new() };
        let index = self.output.len();
        let item = text_item(kind, &id, &text, status);
        let at = json!({"item_id": id, "output_index": index, "content_index": 0});
        let (done, part) = match kind {
            Kind::Reasoning => ("response.reasoning_text.done", json!({"type": "reasoning_text", "text": text})),
            Kind::Message => ("response.output_text.done", output_text(&text)),
        };
        let mut done_body = at.clone();
        done_body["text"] = json!(text);
        if kind == Kind::Message {
            done_body["logprobs"] = json!([]);
        }
        let mut part_body = at;
        part_body["part"] = part;
        let out = vec![
            self.event(done, done_body),
            self.event("response.content_part.done", part_body),
            self.event("response.output_item.done", json!({"output_index": index, "item": item})),
        ];
        self.output.push(item);
        out
    }

    /// A tool call, whole (the chat stream releases each call at once).
    fn call(&mut self, call: &Value) -> Vec<Value> {
        let id = item_id("fc");
        let index = self.output.len();
        let mut added = call_item(&id, call, "in_progress");
        added["arguments"] = json!("");
        let done = call_item(&id, call, "completed");
        let arguments = done["arguments"].clone();
        let out = vec![
            self.event("response.output_item.added", json!({"output_index": index, "item": added})),
            self.event("response.function_call_arguments.delta", json!({"item_id": id, "output_index": index, "delta": arguments})),
            self.event("response.function_call_arguments.done", json!({"item_id": id, "output_index": index, "name": done["name"], "arguments": arguments})),
            self.event("response.output_item.done", json!({"output_index": index, "item": done})),
        ];
        self.output.push(done);
        out
    }

    fn end(&mut self) -> Vec<Value> {
        let finish = self.finish.clone();
        if finish.as_deref() == Some("abort") {
            return self.fail(ApiError::unavailable("the request was aborted (server shutting down)"));
        }
        let mut out = Vec::new();
        // A reply with nothing else to show is one message (blank, or empty).
        if self.open.is_none() && self.output.is_empty() {
            let held = std::mem::take(&mut self.held);
            out.extend(self.open_item(Kind::Message));
            if !held.is_empty() {
                out.extend(self.text_delta(Kind::Message, &held));
            }
        }
        let status = status_of(finish.as_deref());
        out.extend(self.close(if status == "completed" { "completed" } else { "incomplete" }));
        let r = self.shape.response(status, &self.output, self.usage.as_ref(), finish.as_deref());
        let kind = if status == "completed" { "response.completed" } else { "response.incomplete" };
        out.push(self.event(kind, json!({"response": r.clone()})));
        self.outcome = Some(Ok(r));
        out
    }

    /// Ends the response failed: the item under way closed incomplete (its text was sent), an
    /// `error` event, and `response.failed`.
    fn fail(&mut self, error: ApiError) -> Vec<Value> {
        let mut out = self.close("incomplete");
        let mut r = self.shape.response("failed", &self.output, self.usage.as_ref(), None);
        r["error"] = json!({"code": "server_error", "message": error.message});
        out.push(self.event("error", json!({"code": error.code, "message": error.message, "param": null})));
        out.push(self.event("response.failed", json!({"response": r})));
        self.outcome = Some(Err(error));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat_of(req: Value) -> Result<Value, ApiError> {
        chat_request(&req).map(|(chat, _, _)| chat)
    }

    /// Instructions, messages with parts, a function call and its output become the chat turns
    /// a client of /v1/chat/completions would send; reasoning goes on the assistant turn after it.
    #[test]
    fn input_items_become_chat_messages() {
        let chat = chat_of(json!({
            "model": "m", "instructions": "Be brief.", "max_output_tokens": 7, "temperature": 0.5, "top_k": 3,
            "input": [
                {"role": "user", "content": [{"type": "input_text", "text": "a"}, {"type": "input_text", "text": "b"}]},
                {"type": "reasoning", "id": "rs_1", "summary": [], "content": [{"type": "reasoning_text", "text": "hm"}]},
                {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "calling", "annotations": []}]},
                {"type": "function_call", "call_id": "call_1", "name": "f", "arguments": "{\"x\":1}"},
                {"type": "function_call", "call_id": "call_2", "name": "g", "arguments": "{}"},
                {"type": "function_call_output", "call_id": "call_1", "output": "42"},
                {"type": "function_call_output", "call_id": "call_2", "output": [{"type": "input_text", "text": "ok"}]},
            ],
        }))
        .unwrap();
        assert_eq!(
            chat["messages"],
            json!([
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "a\nb"},
                {"role": "assistant", "content": "calling", "reasoning_content": "hm", "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{\"x\":1}"}},
                    {"id": "call_2", "type": "function", "function": {"name": "g", "arguments": "{}"}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "42"},
                {"role": "tool", "tool_call_id": "call_2", "content": "ok"},
            ])
        );
        assert_eq!((&chat["max_completion_tokens"], &chat["temperature"], &chat["top_k"], &chat["model"]), (&json!(7), &json!(0.5), &json!(3), &json!("m")));
        assert!(chat.get("max_output_tokens").is_none());
        // The chat is streamed either way (its usage last); the caller's choice comes apart.
        assert_eq!((&chat["stream"], &chat["stream_options"]), (&json!(true), &json!({"include_usage": true})));
        assert!(!chat_request(&json!({"input": "x"})).unwrap().2 && chat_request(&json!({"input": "x", "stream": true})).unwrap().2);
        // A call with no assistant message before it is a turn of its own, its reasoning (a
        // summary only, here) with it; reasoning before a user turn goes nowhere.
        let chat = chat_of(json!({"input": [
            {"type": "reasoning", "summary": [{"type": "summary_text", "text": "old"}]}, {"role": "user", "content": "q"},
            {"type": "reasoning", "summary": [{"type": "summary_text", "text": "s"}]}, {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"}]}))
        .unwrap();
        assert_eq!(
            chat["messages"],
            json!([{"role": "user", "content": "q"}, {"role": "assistant", "content": "", "reasoning_content": "s", "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}])
        );
        assert_eq!(chat_of(json!({"input": "hi"})).unwrap()["messages"], json!([{"role": "user", "content": "hi"}]));
    }

    /// Tools, tool choice, text format, reasoning effort and streaming in the chat's forms.
    #[test]
    fn tools_formats_and_streaming_take_the_chats_forms() {
        let schema = json!({"type": "object", "properties": {"a": {"type": "integer"}}});
        let chat = chat_of(json!({
            "input": "x", "stream": true, "reasoning": {"effort": "low", "summary": "auto"},
            "tools": [{"type": "function", "name": "f", "description": "d", "parameters": schema, "strict": true}],
            "tool_choice": {"type": "function", "name": "f"},
            "text": {"format": {"type": "json_schema", "name": "s", "schema": schema, "strict": true}},
        }))
        .unwrap();
        assert_eq!(chat["tools"], json!([{"type": "function", "function": {"name": "f", "description": "d", "parameters": schema, "strict": true}}]));
        assert_eq!(chat["tool_choice"], json!({"type": "function", "function": {"name": "f"}}));
        assert_eq!(chat["response_format"], json!({"type": "json_schema", "json_schema": {"name": "s", "schema": schema, "strict": true}}));
        assert_eq!((&chat["reasoning_effort"], &chat["stream"], &chat["stream_options"]), (&json!("low"), &json!(true), &json!({"include_usage": true})));
        assert_eq!(chat_of(json!({"input": "x", "text": {"format": {"type": "json_object"}}})).unwrap()["response_format"], json!({"type": "json_object"}));
        assert!(chat_of(json!({"input": "x", "text": {"format": {"type": "text"}}, "tool_choice": "required"})).unwrap().get("response_format").is_none());
    }

    /// What the route cannot honour is refused naming its field.
    #[test]
    fn what_cannot_be_honoured_is_refused_naming_the_field() {
        for (req, param) in [
            (json!({"input": "x", "previous_response_id": "resp_1"}), "previous_response_id"),
            (json!({"input": "x", "conversation": "c"}), "conversation"),
            (json!({"input": "x", "background": true}), "background"),
            (json!({"input": "x", "include": ["message.output_text.logprobs"]}), "include"),
            (json!({"input": "x", "stream": "yes"}), "stream"),
            (json!({"input": "x", "store": "no"}), "store"),
            (json!({"input": "x", "metadata": "m"}), "metadata"),
            (json!({"input": "x", "metadata": {"k": 1}}), "metadata"),
            (json!({"input": "x", "top_logprobs": 2}), "top_logprobs"),
            (json!({"input": "x", "truncation": "auto"}), "truncation"),
            (json!({"input": "x", "text": {"verbosity": "low"}}), "text.verbosity"),
            (json!({"input": "x", "tools": [{"type": "web_search"}]}), "tools"),
            (json!({"input": "x", "tool_choice": {"type": "file_search"}}), "tool_choice"),
            (json!({"input": "x", "text": {"format": {"type": "xml"}}}), "text.format"),
            (json!({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "u"}]}]}), "input"),
            (json!({"input": [{"type": "item_reference", "id": "x"}]}), "input"),
            (json!({"input": [{"role": "tool", "content": "x"}]}), "input"),
            (json!({"input": []}), "input"),
            (json!({}), "input"),
            (json!({"input": "x", "instructions": 3}), "instructions"),
        ] {
            let e = chat_of(req.clone()).unwrap_err();
            assert_eq!((e.status.as_u16(), e.param.as_deref()), (400, Some(param)), "{req}: {}", e.message);
        }
        // Their neutral values pass.
        assert!(chat_of(json!({"input": "x", "include": ["reasoning.encrypted_content"], "top_logprobs": 0, "truncation": "disabled", "background": false,
                               "store": false, "metadata": {"k": "v"}, "text": {"verbosity": "medium"}}))
        .is_ok());
    }

    /// A chat error's field and message are renamed to this route's.
    #[test]
    fn chat_errors_name_this_routes_fields() {
        let e = as_responses_error(ApiError::param("max_completion_tokens", "`max_completion_tokens` must be at least 1"));
        assert_eq!((e.param.as_deref(), e.message.as_str()), (Some("max_output_tokens"), "`max_output_tokens` must be at least 1"));
        assert_eq!(as_responses_error(ApiError::param("messages", "bad")).param.as_deref(), Some("input"));
        assert_eq!(as_responses_error(ApiError::param("temperature", "bad")).param.as_deref(), Some("temperature"));
    }

    fn machine() -> Events {
        Events::new(Shape { echo: Map::new(), id: "resp_1".into(), created: 5, model: "m".into() })
    }

    fn events_of(chunks: &[Value]) -> Vec<Value> {
        let mut ev = machine();
        let mut all = ev.start();
        for c in chunks {
            let data = if c == &json!("[DONE]") { "[DONE]".to_owned() } else { c.to_string() };
            all.extend(ev.chunk(&data));
        }
        all
    }

    /// Reasoning, text and a call stream as their items' events in order, numbered, ending with
    /// the whole response; an error chunk ends the stream failed.
    #[test]
    fn chat_chunks_become_typed_events() {
        let d = |delta: Value| json!({"choices": [{"index": 0, "delta": delta, "finish_reason": null}]});
        let call = json!({"index": 0, "id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{\"a\":1}"}});
        let events = events_of(&[
            d(json!({"role": "assistant", "content": ""})),
            d(json!({"reasoning_content": "th"})),
            d(json!({"reasoning_content": "ink"})),
            d(json!({"content": "He"})),
            d(json!({"content": "llo"})),
            d(json!({"tool_calls": [call]})),
            json!({"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]}),
            json!({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8, "prompt_tokens_details": {"cached_tokens": 0}}}),
            json!("[DONE]"),
        ]);
        let types: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
        assert_eq!(
            types,
            [
                "response.created", "response.in_progress",
                "response.output_item.added", "response.content_part.added", "response.reasoning_text.delta", "response.reasoning_text.delta",
                "response.reasoning_text.done", "response.content_part.done", "response.output_item.done",
                "response.output_item.added", "response.content_part.added", "response.output_text.delta", "response.output_text.delta",
                "response.output_text.done", "response.content_part.done", "response.output_item.done",
                "response.output_item.added", "response.function_call_arguments.delta", "response.function_call_arguments.done", "response.output_item.done",
                "response.completed",
            ]
        );
        assert!(events.iter().enumerate().all(|(i, e)| e["sequence_number"] == json!(i)), "numbered in order");
        assert_eq!(events[13]["text"], "Hello");
        assert_eq!((&events[16]["output_index"], &events[18]["arguments"]), (&json!(2), &json!("{\"a\":1}")));
        let done = &events[20]["response"];
        assert_eq!((&done["status"], &done["usage"]["output_tokens"]), (&json!("completed"), &json!(5)));
        assert_eq!((&done["output"][0]["content"][0]["text"], &done["output"][1]["content"][0]["text"], &done["output"][2]["call_id"]), (&json!("think"), &json!("Hello"), &json!("call_1")));
        // Cut by max_output_tokens: the last item and the response are incomplete.
        let events = events_of(&[d(json!({"content": "x"})), json!({"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]}), json!("[DONE]")]);
        let last = events.last().unwrap();
        assert_eq!((&last["type"], &last["response"]["status"], &last["response"]["output"][0]["status"]), (&json!("response.incomplete"), &json!("incomplete"), &json!("incomplete")));
        // An empty reply is one empty message.
        let events = events_of(&[json!({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}), json!("[DONE]")]);
        assert_eq!(events.last().unwrap()["response"]["output"][0]["content"][0]["text"], "");
        // A failure mid-stream: the item under way closes incomplete, with the text it sent.
        let events = events_of(&[d(json!({"content": "x"})), json!({"error": {"message": "boom", "type": "server_error", "param": null, "code": null}}), json!("[DONE]")]);
        let types: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
        assert_eq!(&types[types.len() - 2..], ["error", "response.failed"]);
        let failed = &events.last().unwrap()["response"];
        assert_eq!((&failed["error"]["message"], &failed["status"]), (&json!("boom"), &json!("failed")));
        assert_eq!((&failed["output"][0]["content"][0]["text"], &failed["output"][0]["status"]), (&json!("x"), &json!("incomplete")));
        // Aborted at shutdown: failed too, saying so.
        let events = events_of(&[d(json!({"content": "x"})), json!({"choices": [{"index": 0, "delta": {}, "finish_reason": "abort"}]}), json!("[DONE]")]);
        let last = events.last().unwrap();
        assert_eq!(last["type"], "response.failed");
        assert!(last["response"]["error"]["message"].as_str().unwrap().contains("shutting down"), "{last}");
    }

    /// Blank text between tool calls (the newlines between `<tool_call>` blocks) makes no
    /// message of its own; text after the calls does, with the blank text it followed.
    #[test]
    fn blank_text_between_calls_is_no_message() {
        let d = |delta: Value| json!({"choices": [{"index": 0, "delta": delta, "finish_reason": null}]});
        let call = |id: &str| json!({"tool_calls": [{"index": 0, "id": id, "type": "function", "function": {"name": "f", "arguments": "{}"}}]});
        let end = json!({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]});
        let events = events_of(&[d(json!({"content": "Checking.\n"})), d(call("a")), d(json!({"content": "\n"})), d(call("b")), d(json!({"content": "\n"})), end.clone(), json!("[DONE]")]);
        let output = events.last().unwrap()["response"]["output"].as_array().unwrap().clone();
        let types: Vec<&str> = output.iter().map(|i| i["type"].as_str().unwrap()).collect();
        assert_eq!(types, ["message", "function_call", "function_call"]);
        let events = events_of(&[d(call("a")), d(json!({"content": "\n"})), d(json!({"content": "Done."})), end.clone(), json!("[DONE]")]);
        let output = &events.last().unwrap()["response"]["output"];
        assert_eq!((&output[1]["type"], &output[1]["content"][0]["text"]), (&json!("message"), &json!("\nDone.")));
        // A reply of blank text alone is still its message.
        let events = events_of(&[d(json!({"content": " \n"})), end, json!("[DONE]")]);
        assert_eq!(events.last().unwrap()["response"]["output"][0]["content"][0]["text"], " \n");
    }

    /// A request that is not streamed answers the final response, or the error that ended it
    /// (a 500 for a failure, a 503 for an abort), the same machine reading the chunks.
    #[test]
    fn the_outcome_is_the_final_response_or_the_error() {
        let usage = json!({"choices": [], "usage": {"prompt_tokens": 10, "completion_tokens": 4, "total_tokens": 14, "prompt_tokens_details": {"cached_tokens": 8}}});
        let mut m = machine();
        for c in [json!({"choices": [{"index": 0, "delta": {"content": "ab"}, "finish_reason": "length"}]}), usage] {
            m.chunk(&c.to_string());
        }
        m.chunk("[DONE]");
        let r = m.outcome().unwrap();
        assert_eq!((&r["status"], &r["incomplete_details"]["reason"], &r["output"][0]["content"][0]["text"]), (&json!("incomplete"), &json!("max_output_tokens"), &json!("ab")));
        assert_eq!(r["usage"], json!({"input_tokens": 10, "output_tokens": 4, "total_tokens": 14, "input_tokens_details": {"cached_tokens": 8, "cache_write_tokens": 0}, "output_tokens_details": {"reasoning_tokens": 0}}));
        let mut m = machine();
        m.chunk(&json!({"error": {"message": "boom"}}).to_string());
        assert_eq!(m.outcome().unwrap_err().status.as_u16(), 500);
        let mut m = machine();
        m.chunk(&json!({"choices": [{"index": 0, "delta": {}, "finish_reason": "abort"}]}).to_string());
        m.chunk("[DONE]");
        assert_eq!(m.outcome().unwrap_err().status.as_u16(), 503);
        assert_eq!(machine().outcome().unwrap_err().status.as_u16(), 500, "no end read");
    }
}
