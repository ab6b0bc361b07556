//! Anthropic's Messages API (`POST /v1/messages`, and `/v1/messages/count_tokens`) on the chat
//! route, as `/v1/responses` is: a request's system prompt, content blocks (text, tool_use,
//! tool_result, thinking), tools and tool choice become a chat request, run streamed, and one
//! state machine turns its chunks into Anthropic's stream events or (not streamed) the message.
//! Errors come in Anthropic's shape (`{"type": "error", "error": {"type", "message"}}`).

use std::convert::Infallible;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::stream::{self, StreamExt};
use serde_json::{json, Map, Value};

use crate::error::ApiError;
use crate::routes::{body_bytes, chat_run, chunks, count_chat_tokens, read_chunk, ChatChunk, ChatRun};
use crate::state::AppState;

pub async fn messages(State(state): State<AppState>, body: Result<Bytes, BytesRejection>) -> Response {
    run(state, body).await.unwrap_or_else(anthropic_error)
}

async fn run(state: AppState, body: Result<Bytes, BytesRejection>) -> Result<Response, ApiError> {
    let body = body_bytes(body)?;
    let model = state.ready()?.model_name.clone();
    let req = crate::protocol::body_value(&body)?;
    let (chat, stream) = chat_request(&req, true)?;
    let ChatRun::Stream(st) = chat_run(&state, Bytes::from(chat.to_string()), None).await.map_err(as_messages_error)? else {
        return Err(ApiError::internal("the chat route answered a streamed request whole"));
    };
    let mut blocks = Blocks::new(format!("msg_{:032x}", rand::random::<u128>()), model);
    if !stream {
        let mut chunks = std::pin::pin!(chunks(*st));
        while let Some(data) = chunks.next().await {
            blocks.chunk(&data);
        }
        return blocks.outcome().map(|m| Json(m).into_response());
    }
    let events = chunks(*st).flat_map(move |data| stream::iter(blocks.chunk(&data)));
    let sse = events.map(|e| Ok::<_, Infallible>(Event::default().event(e["type"].as_str().unwrap_or_default()).data(e.to_string())));
    Ok(Sse::new(sse).keep_alive(KeepAlive::default()).into_response())
}

/// `POST /v1/messages/count_tokens`: the prompt's tokens as `/v1/messages` would render it.
pub async fn count_tokens(State(state): State<AppState>, body: Result<Bytes, BytesRejection>) -> Response {
    let counted = async {
        let body = body_bytes(body)?;
        let req = crate::protocol::body_value(&body)?;
        let (chat, _) = chat_request(&req, false)?;
        let keep = ["model", "messages", "tools", "chat_template_kwargs", "continue_final_message"];
        let tokenize: Map<String, Value> = chat.as_object().into_iter().flatten().filter(|(k, _)| keep.contains(&k.as_str())).map(|(k, v)| (k.clone(), v.clone())).collect();
        count_chat_tokens(&state, Bytes::from(Value::Object(tokenize).to_string())).await.map_err(as_messages_error)
    };
    match counted.await {
        Ok(n) => Json(json!({"input_tokens": n})).into_response(),
        Err(e) => anthropic_error(e),
    }
}

/// A method other than POST on these routes, answered in Anthropic's shape.
pub async fn method_not_allowed() -> Response {
    anthropic_error(ApiError::method_not_allowed())
}

/// An error in Anthropic's shape, with its status.
pub fn anthropic_error(e: ApiError) -> Response {
    let kind = match e.status {
        StatusCode::BAD_REQUEST => "invalid_request_error",
        StatusCode::UNAUTHORIZED => "authentication_error",
        StatusCode::FORBIDDEN => "permission_error",
        StatusCode::NOT_FOUND => "not_found_error",
        StatusCode::PAYLOAD_TOO_LARGE => "request_too_large",
        StatusCode::TOO_MANY_REQUESTS => "rate_limit_error",
        StatusCode::SERVICE_UNAVAILABLE => "overloaded_error",
        _ => "api_error",
    };
    (e.status, Json(json!({"type": "error", "error": {"type": kind, "message": e.message}}))).into_response()
}

/// The chat's field names in errors, as this route's.
fn as_messages_error(mut e: ApiError) -> ApiError {
    if e.param.as_deref() == Some("stop") {
        e.param = Some("stop_sequences".into());
        e.message = e.message.replace("`stop`", "`stop_sequences`");
    }
    e
}

fn given<'a>(obj: &'a Map<String, Value>, field: &str) -> Option<&'a Value> {
    obj.get(field).filter(|v| !v.is_null())
}

/// The chat request (streamed, with its usage on every chunk) a Messages request stands for, and
/// whether the caller asked for a stream. `generating`: `max_tokens` is required (not for
/// count_tokens).
fn chat_request(req: &Value, generating: bool) -> Result<(Value, bool), ApiError> {
    let obj = req.as_object().ok_or_else(|| ApiError::invalid("the request body must be a JSON object"))?;
    let mut chat = Map::new();
    for field in ["model", "temperature", "top_p", "top_k"] {
        if let Some(v) = given(obj, field) {
            chat.insert(field.into(), v.clone());
        }
    }
    match given(obj, "max_tokens") {
        Some(n) => {
            chat.insert("max_tokens".into(), n.clone());
        }
        None if generating => return Err(ApiError::param("max_tokens", "`max_tokens` is required")),
        None => {}
    }
    if let Some(stops) = given(obj, "stop_sequences") {
        chat.insert("stop".into(), stops.clone());
    }
    for (field, why) in [("mcp_servers", "MCP servers are not run by this server"), ("container", "containers are not run by this server")] {
        if given(obj, field).is_some_and(|v| v.as_array().is_none_or(|a| !a.is_empty())) {
            return Err(ApiError::param(field, format!("`{field}` is not supported: {why}")));
        }
    }
    let mut messages = Vec::new();
    match given(obj, "system") {
        None => {}
        Some(Value::String(s)) => messages.push(json!({"role": "system", "content": s})),
        Some(blocks @ Value::Array(_)) => messages.push(json!({"role": "system", "content": block_text(blocks, "system")?})),
        Some(_) => return Err(ApiError::param("system", "`system` must be a string or a list of text blocks")),
    }
    messages.extend(chat_messages(given(obj, "messages"))?);
    // A final assistant turn is a prefill: the reply continues it, as Anthropic's does.
    if messages.last().is_some_and(|m| m["role"] == "assistant" && m.get("tool_calls").is_none()) {
        chat.insert("continue_final_message".into(), json!(true));
    }
    chat.insert("messages".into(), Value::Array(messages));
    if let Some(tools) = given(obj, "tools") {
        chat.insert("tools".into(), chat_tools(tools)?);
    }
    if let Some(choice) = given(obj, "tool_choice") {
        let (choice, parallel) = chat_tool_choice(choice)?;
        chat.insert("tool_choice".into(), choice);
        if !parallel {
            chat.insert("parallel_tool_calls".into(), json!(false));
        }
    }
    // Thinking is off unless asked for, as Anthropic's default (templates read enable_thinking).
    match given(obj, "thinking").map(|t| t.get("type").and_then(Value::as_str)) {
        None => {
            chat.insert("chat_template_kwargs".into(), json!({"enable_thinking": false}));
        }
        Some(Some("enabled" | "adaptive")) => {
            chat.insert("chat_template_kwargs".into(), json!({"enable_thinking": true}));
        }
        Some(Some("disabled")) => {
            chat.insert("chat_template_kwargs".into(), json!({"enable_thinking": false}));
        }
        Some(_) => return Err(ApiError::param("thinking", "`thinking.type` must be enabled, adaptive or disabled")),
    }
    if let Some(user) = given(obj, "metadata").and_then(|m| m.get("user_id")).filter(|u| u.is_string()) {
        chat.insert("user".into(), user.clone());
    }
    let stream = match given(obj, "stream") {
        None => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(ApiError::param("stream", "`stream` must be a boolean")),
    };
    chat.insert("stream".into(), json!(true));
    chat.insert("stream_options".into(), json!({"include_usage": true, "continuous_usage_stats": true}));
    Ok((Value::Object(chat), stream))
}

/// Text blocks' texts joined by newlines (as the chat route joins text parts).
fn block_text(blocks: &Value, p: &str) -> Result<String, ApiError> {
    let list = blocks.as_array().ok_or_else(|| ApiError::param("messages", format!("`{p}` must be a string or a list of text blocks")))?;
    let mut texts = Vec::with_capacity(list.len());
    for (j, b) in list.iter().enumerate() {
        match (b.get("type").and_then(Value::as_str), b.get("text").and_then(Value::as_str)) {
            (Some("text"), Some(t)) => texts.push(t),
            (Some(t), _) if t != "text" => return Err(ApiError::param("messages", format!("`{p}[{j}]`: content type `{t}` is not supported by this model"))),
            _ => return Err(ApiError::param("messages", format!("`{p}[{j}]` must be {{\"type\": \"text\", \"text\": ...}}"))),
        }
    }
    Ok(texts.join("\n"))
}

/// Messages' content blocks as chat messages: a user turn's `tool_result` blocks become tool
/// messages (before its text), an assistant turn's `tool_use` blocks its tool calls and its
/// `thinking` its `reasoning_content`.
fn chat_messages(messages: Option<&Value>) -> Result<Vec<Value>, ApiError> {
    let list = messages.and_then(Value::as_array).filter(|l| !l.is_empty()).ok_or_else(|| ApiError::param("messages", "`messages` must be a list of at least one message"))?;
    let mut out = Vec::with_capacity(list.len());
    for (i, m) in list.iter().enumerate() {
        let p = format!("messages[{i}]");
        let role = m.get("role").and_then(Value::as_str).filter(|r| matches!(*r, "user" | "assistant"));
        let role = role.ok_or_else(|| ApiError::param("messages", format!("`{p}.role` must be user or assistant")))?;
        let blocks = match m.get("content") {
            Some(Value::String(s)) => {
                out.push(json!({"role": role, "content": s}));
                continue;
            }
            Some(Value::Array(blocks)) if !blocks.is_empty() => blocks,
            _ => return Err(ApiError::param("messages", format!("`{p}.content` must be a string or a non-empty list of content blocks"))),
        };
        let (mut texts, mut calls, mut thinking) = (Vec::new(), Vec::new(), Vec::new());
        for (j, b) in blocks.iter().enumerate() {
            let bp = format!("{p}.content[{j}]");
            let field = |f: &str| b.get(f).filter(|v| v.is_string()).ok_or_else(|| ApiError::param("messages", format!("`{bp}.{f}` is required and must be a string")));
            match (role, b.get("type").and_then(Value::as_str)) {
                (_, Some("text")) => texts.push(field("text")?.as_str().unwrap_or_default().to_owned()),
                ("user", Some("tool_result")) => {
                    let id = field("tool_use_id")?.clone();
                    let content = match b.get("content") {
                        None | Some(Value::Null) => String::new(),
                        Some(Value::String(s)) => s.clone(),
                        Some(list) => block_text(list, &format!("{bp}.content"))?,
                    };
                    out.push(json!({"role": "tool", "tool_call_id": id, "content": content}));
                }
                ("assistant", Some("tool_use")) => {
                    let input = b.get("input").filter(|v| v.is_object()).ok_or_else(|| ApiError::param("messages", format!("`{bp}.input` is required and must be an object")))?;
                    calls.push(json!({"id": field("id")?, "type": "function", "function": {"name": field("name")?, "arguments": input.to_string()}}));
                }
                ("assistant", Some("thinking")) => thinking.push(field("thinking")?.as_str().unwrap_or_default().to_owned()),
                ("assistant", Some("redacted_thinking")) => {}
                (_, Some(t)) => return Err(ApiError::param("messages", format!("`{bp}`: content type `{t}` is not supported here"))),
                (_, None) => return Err(ApiError::param("messages", format!("`{bp}.type` is required"))),
            }
        }
        if role == "user" && texts.is_empty() {
            continue;
        }
        let mut message = json!({"role": role, "content": texts.join("\n")});
        if !calls.is_empty() {
            message["tool_calls"] = json!(calls);
        }
        if !thinking.is_empty() {
            message["reasoning_content"] = json!(thinking.join("\n"));
        }
        out.push(message);
    }
    Ok(out)
}

/// Anthropic's tools (`{"name", "description", "input_schema"}`) in the chat's form.
fn chat_tools(tools: &Value) -> Result<Value, ApiError> {
    let list = tools.as_array().ok_or_else(|| ApiError::param("tools", "`tools` must be a list"))?;
    let mut out = Vec::with_capacity(list.len());
    for (i, t) in list.iter().enumerate() {
        if let Some(kind) = t.get("type").and_then(Value::as_str).filter(|k| *k != "custom") {
            return Err(ApiError::param("tools", format!("`tools[{i}].type` `{kind}` is not supported: only custom tools are (the server runs no tools itself)")));
        }
        let mut function = json!({"name": t.get("name").cloned().unwrap_or(Value::Null), "parameters": t.get("input_schema").cloned().unwrap_or(json!({"type": "object"}))});
        if let Some(d) = t.get("description") {
            function["description"] = d.clone();
        }
        out.push(json!({"type": "function", "function": function}));
    }
    Ok(Value::Array(out))
}

/// `tool_choice` in the chat's form, and whether parallel calls are allowed.
fn chat_tool_choice(choice: &Value) -> Result<(Value, bool), ApiError> {
    let parallel = choice.get("disable_parallel_tool_use").and_then(Value::as_bool) != Some(true);
    let chat = match (choice.get("type").and_then(Value::as_str), choice.get("name")) {
        (Some("auto"), _) => json!("auto"),
        (Some("any"), _) => json!("required"),
        (Some("none"), _) => json!("none"),
        (Some("tool"), Some(name @ Value::String(_))) => json!({"type": "function", "function": {"name": name}}),
        _ => return Err(ApiError::param("tool_choice", "`tool_choice` must be {\"type\": \"auto\" | \"any\" | \"none\"} or {\"type\": \"tool\", \"name\": ...}")),
    };
    Ok((chat, parallel))
}

#[derive(Copy, Clone, PartialEq, Eq, Debug)]
enum Kind {
    Thinking,
    Text,
}

/// A streamed chat's chunks as Anthropic's events: `message_start` (with the prompt's tokens),
/// per block `content_block_start`, deltas and `content_block_stop`, then `message_delta` (the
/// stop reason and usage) and `message_stop`; a failure is an `error` event. A request not
/// streamed runs the same machine and answers the message.
struct Blocks {
    id: String,
    model: String,
    started: bool,
    /// Finished blocks, in order (their index is their place).
    content: Vec<Value>,
    open: Option<(Kind, String)>,
    /// Blank text outside a text block (between tool calls): shown only if text follows.
    held: String,
    usage: (u64, u64, u64),
    finish: Option<String>,
    stop_reason: Value,
    outcome: Option<Result<Value, ApiError>>,
}

impl Blocks {
    fn new(id: String, model: String) -> Self {
        Blocks { id, model, started: false, content: Vec::new(), open: None, held: String::new(), usage: (0, 0, 0), finish: None, stop_reason: Value::Null, outcome: None }
    }

    fn outcome(self) -> Result<Value, ApiError> {
        self.outcome.unwrap_or_else(|| Err(ApiError::internal("the chat stream ended without its end")))
    }

    fn message(&self, stop_reason: Value, stop_sequence: Value) -> Value {
        json!({"id": self.id, "type": "message", "role": "assistant", "model": self.model, "content": self.content,
               "stop_reason": stop_reason, "stop_sequence": stop_sequence,
               // Anthropic's input tokens leave out the cached ones (the total is their sum).
               "usage": {"input_tokens": self.usage.0 - self.usage.2.min(self.usage.0), "output_tokens": self.usage.1, "cache_read_input_tokens": self.usage.2, "cache_creation_input_tokens": 0}})
    }

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
            self.usage.0 = u["prompt_tokens"].as_u64().unwrap_or(self.usage.0);
            self.usage.1 = u["completion_tokens"].as_u64().unwrap_or(self.usage.1);
            self.usage.2 = u["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap_or(self.usage.2);
        }
        let mut out = Vec::new();
        if !self.started {
            self.started = true;
            let mut m = self.message(Value::Null, Value::Null);
            m["usage"]["output_tokens"] = json!(0);
            out.push(json!({"type": "message_start", "message": m}));
        }
        for choice in v["choices"].as_array().into_iter().flatten() {
            let delta = &choice["delta"];
            if let Some(t) = delta["reasoning_content"].as_str().filter(|t| !t.is_empty()) {
                out.extend(self.text(Kind::Thinking, t));
            }
            if let Some(t) = delta["content"].as_str().filter(|t| !t.is_empty()) {
                out.extend(self.text(Kind::Text, t));
            }
            for call in delta["tool_calls"].as_array().into_iter().flatten() {
                out.extend(self.close());
                self.held.clear();
                out.extend(self.tool_use(call));
            }
            if let Some(f) = choice["finish_reason"].as_str() {
                self.finish = Some(f.to_owned());
                self.stop_reason = choice["stop_reason"].clone();
            }
        }
        out
    }

    fn text(&mut self, kind: Kind, text: &str) -> Vec<Value> {
        let mut out = Vec::new();
        let mut text = text.to_owned();
        if self.open.as_ref().map(|o| o.0) != Some(kind) {
            if kind == Kind::Text && text.trim().is_empty() {
                self.held.push_str(&text);
                return out;
            }
            out.extend(self.close());
            let block = match kind {
                Kind::Thinking => json!({"type": "thinking", "thinking": "", "signature": ""}),
                Kind::Text => json!({"type": "text", "text": ""}),
            };
            out.push(json!({"type": "content_block_start", "index": self.content.len(), "content_block": block}));
            self.open = Some((kind, String::new()));
            if kind == Kind::Text {
                text.insert_str(0, &std::mem::take(&mut self.held));
            }
        }
        let delta = match kind {
            Kind::Thinking => json!({"type": "thinking_delta", "thinking": text}),
            Kind::Text => json!({"type": "text_delta", "text": text}),
        };
        out.push(json!({"type": "content_block_delta", "index": self.content.len(), "delta": delta}));
        self.open.as_mut().expect("opened above").1.push_str(&text);
        out
    }

    fn close(&mut self) -> Vec<Value> {
        let Some((kind, text)) = self.open.take() else { return Vec::new() };
        let index = self.content.len();
        self.content.push(match kind {
            Kind::Thinking => json!({"type": "thinking", "thinking": text, "signature": ""}),
            Kind::Text => json!({"type": "text", "text": text}),
        });
        vec![json!({"type": "content_block_stop", "index": index})]
    }

    /// A tool call, whole: its arguments as one `input_json_delta`.
    fn tool_use(&mut self, call: &Value) -> Vec<Value> {
        let index = self.content.len();
        // The input as parsed, streamed as its JSON: the same object either way.
        let input: Value = call["function"]["arguments"].as_str().and_then(|a| serde_json::from_str(a).ok()).filter(Value::is_object).unwrap_or(json!({}));
        let arguments = input.to_string();
        let (id, name) = (call["id"].clone(), call["function"]["name"].clone());
        self.content.push(json!({"type": "tool_use", "id": id, "name": name, "input": input}));
        vec![
            json!({"type": "content_block_start", "index": index, "content_block": {"type": "tool_use", "id": id, "name": name, "input": {}}}),
            json!({"type": "content_block_delta", "index": index, "delta": {"type": "input_json_delta", "partial_json": arguments}}),
            json!({"type": "content_block_stop", "index": index}),
        ]
    }

    fn end(&mut self) -> Vec<Value> {
        if self.finish.as_deref() == Some("abort") {
            return self.fail(ApiError::unavailable("the request was aborted (server shutting down)"));
        }
        let mut out = Vec::new();
        if self.open.is_none() && self.content.is_empty() {
            let held = std::mem::take(&mut self.held);
            out.extend(self.text(Kind::Text, &held));
            if self.open.is_none() {
                out.push(json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}));
                self.open = Some((Kind::Text, String::new()));
            }
        }
        out.extend(self.close());
        // A reply with calls asks for them (a forced call's chat finish is `stop`).
        let calls = self.content.iter().any(|b| b["type"] == "tool_use");
        let (stop_reason, stop_sequence) = match (self.finish.as_deref(), &self.stop_reason) {
            (Some("length"), _) => ("max_tokens", Value::Null),
            _ if calls => ("tool_use", Value::Null),
            (_, Value::String(s)) => ("stop_sequence", json!(s)),
            _ => ("end_turn", Value::Null),
        };
        let usage = json!({"output_tokens": self.usage.1, "input_tokens": self.usage.0 - self.usage.2.min(self.usage.0), "cache_read_input_tokens": self.usage.2});
        out.push(json!({"type": "message_delta", "delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence}, "usage": usage}));
        out.push(json!({"type": "message_stop"}));
        self.outcome = Some(Ok(self.message(json!(stop_reason), stop_sequence)));
        out
    }

    fn fail(&mut self, e: ApiError) -> Vec<Value> {
        let out = vec![json!({"type": "error", "error": {"type": if e.status == StatusCode::SERVICE_UNAVAILABLE { "overloaded_error" } else { "api_error" }, "message": e.message}})];
        self.outcome = Some(Err(e));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// System, text, tool_use / tool_result and thinking blocks become the chat's messages; the
    /// tools, tool choice, thinking switch and stop sequences its fields.
    #[test]
    fn a_messages_request_becomes_a_chat_request() {
        let schema = json!({"type": "object", "properties": {"city": {"type": "string"}}});
        let (chat, stream) = chat_request(
            &json!({
                "model": "m", "max_tokens": 64, "system": [{"type": "text", "text": "Be brief."}], "stop_sequences": ["END"], "top_k": 5,
                "tools": [{"name": "get_weather", "description": "d", "input_schema": schema}],
                "tool_choice": {"type": "any", "disable_parallel_tool_use": true}, "thinking": {"type": "enabled", "budget_tokens": 1024},
                "messages": [
                    {"role": "user", "content": "weather?"},
                    {"role": "assistant", "content": [{"type": "thinking", "thinking": "look", "signature": "s"}, {"type": "text", "text": "Checking."},
                        {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}]},
                    {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "18 C"}]}, {"type": "text", "text": "and?"}]},
                ],
            }),
            true,
        )
        .unwrap();
        assert!(!stream);
        assert_eq!(
            chat["messages"],
            json!([
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "weather?"},
                {"role": "assistant", "content": "Checking.", "reasoning_content": "look",
                 "tool_calls": [{"id": "toolu_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}]},
                {"role": "tool", "tool_call_id": "toolu_1", "content": "18 C"},
                {"role": "user", "content": "and?"},
            ])
        );
        assert_eq!(chat["tools"], json!([{"type": "function", "function": {"name": "get_weather", "parameters": schema, "description": "d"}}]));
        assert_eq!((&chat["tool_choice"], &chat["parallel_tool_calls"], &chat["stop"]), (&json!("required"), &json!(false), &json!(["END"])));
        assert_eq!((&chat["chat_template_kwargs"], &chat["max_tokens"], &chat["top_k"], &chat["stream"]), (&json!({"enable_thinking": true}), &json!(64), &json!(5), &json!(true)));
        for (req, param) in [
            (json!({"messages": [{"role": "user", "content": "x"}]}), "max_tokens"),
            (json!({"max_tokens": 5, "messages": []}), "messages"),
            (json!({"max_tokens": 5, "messages": [{"role": "user", "content": []}]}), "messages"),
            (json!({"max_tokens": 5, "messages": [{"role": "system", "content": "x"}]}), "messages"),
            (json!({"max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]}), "messages"),
            (json!({"max_tokens": 5, "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "web_search_20250305", "name": "w"}]}), "tools"),
            (json!({"max_tokens": 5, "messages": [{"role": "user", "content": "x"}], "tool_choice": {"type": "tool"}}), "tool_choice"),
            (json!({"max_tokens": 5, "messages": [{"role": "user", "content": "x"}], "stream": "yes"}), "stream"),
            (json!({"max_tokens": 5, "messages": [{"role": "user", "content": "x"}], "mcp_servers": [{}]}), "mcp_servers"),
        ] {
            let e = chat_request(&req, true).unwrap_err();
            assert_eq!((e.status.as_u16(), e.param.as_deref()), (400, Some(param)), "{req}: {}", e.message);
        }
        assert!(chat_request(&json!({"messages": [{"role": "user", "content": "x"}]}), false).is_ok(), "count_tokens needs no max_tokens");
        // A final assistant turn is continued; thinking is off unless asked for.
        let (chat, _) = chat_request(&json!({"max_tokens": 5, "messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "The answer is"}]}), true).unwrap();
        assert_eq!((&chat["continue_final_message"], &chat["chat_template_kwargs"]), (&json!(true), &json!({"enable_thinking": false})));
        for bad in [json!({"type": "text", "text": 5}), json!({"type": "text"})] {
            let req = json!({"max_tokens": 5, "messages": [{"role": "user", "content": [bad]}]});
            assert_eq!(chat_request(&req, true).unwrap_err().param.as_deref(), Some("messages"), "{req}");
        }
        let req = json!({"max_tokens": 5, "messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "f", "input": "{}"}]}]});
        assert_eq!(chat_request(&req, true).unwrap_err().param.as_deref(), Some("messages"));
    }

    fn events_of(chunks: &[Value]) -> (Vec<Value>, Result<Value, ApiError>) {
        let mut b = Blocks::new("msg_1".into(), "m".into());
        let mut out = Vec::new();
        for c in chunks {
            out.extend(b.chunk(&if c == &json!("[DONE]") { "[DONE]".to_owned() } else { c.to_string() }));
        }
        (out, b.outcome())
    }

    /// Thinking, text and a call stream as numbered blocks, the stop reason and usage at the
    /// end; a stop string is `stop_sequence`; the message is the same blocks.
    #[test]
    fn chat_chunks_become_anthropic_events() {
        let d = |delta: Value, prompt: u64| json!({"choices": [{"index": 0, "delta": delta, "finish_reason": null}], "usage": {"prompt_tokens": prompt, "completion_tokens": 1}});
        let call = json!({"index": 0, "id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{\"a\":1}"}});
        let (events, message) = events_of(&[
            d(json!({"role": "assistant", "content": ""}), 7),
            d(json!({"reasoning_content": "hm"}), 7),
            d(json!({"content": "Hi"}), 7),
            d(json!({"content": "\n"}), 7),
            d(json!({"tool_calls": [call]}), 7),
            d(json!({"content": "\n"}), 7),
            json!({"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls", "stop_reason": null}]}),
            json!({"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 9, "prompt_tokens_details": {"cached_tokens": 4}}}),
            json!("[DONE]"),
        ]);
        let types: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
        assert_eq!(
            types,
            ["message_start", "content_block_start", "content_block_delta", "content_block_stop", "content_block_start", "content_block_delta", "content_block_delta",
             "content_block_stop", "content_block_start", "content_block_delta", "content_block_stop", "message_delta", "message_stop"]
        );
        assert_eq!(events[0]["message"]["usage"]["input_tokens"], 7);
        assert_eq!((&events[8]["index"], &events[9]["delta"]["partial_json"]), (&json!(2), &json!("{\"a\":1}")));
        assert_eq!((&events[11]["delta"]["stop_reason"], &events[11]["usage"]["output_tokens"]), (&json!("tool_use"), &json!(9)));
        let m = message.unwrap();
        assert_eq!(
            m["content"],
            json!([{"type": "thinking", "thinking": "hm", "signature": ""}, {"type": "text", "text": "Hi\n"}, {"type": "tool_use", "id": "call_1", "name": "f", "input": {"a": 1}}])
        );
        assert_eq!((&m["usage"]["input_tokens"], &m["usage"]["cache_read_input_tokens"]), (&json!(3), &json!(4)), "the total is their sum");
        // A forced call finishes `stop` on the chat route: still tool use here.
        let (_, m) = events_of(&[d(json!({"tool_calls": [call]}), 3), json!({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop", "stop_reason": null}]}), json!("[DONE]")]);
        assert_eq!(m.unwrap()["stop_reason"], "tool_use");
        let (_, m) = events_of(&[d(json!({"content": "x"}), 3), json!({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop", "stop_reason": "END"}]}), json!("[DONE]")]);
        let m = m.unwrap();
        assert_eq!((&m["stop_reason"], &m["stop_sequence"]), (&json!("stop_sequence"), &json!("END")));
        let (_, m) = events_of(&[d(json!({"content": "x"}), 3), json!({"choices": [{"index": 0, "delta": {}, "finish_reason": "length", "stop_reason": null}]}), json!("[DONE]")]);
        assert_eq!(m.unwrap()["stop_reason"], "max_tokens");
        let (events, m) = events_of(&[d(json!({"content": "x"}), 3), json!({"error": {"message": "boom"}})]);
        assert_eq!((events.last().unwrap()["type"].as_str(), m.unwrap_err().status.as_u16()), (Some("error"), 500));
        let (_, m) = events_of(&[json!({"choices": [{"index": 0, "delta": {}, "finish_reason": "abort"}]}), json!("[DONE]")]);
        assert_eq!(m.unwrap_err().status.as_u16(), 503);
    }
}
