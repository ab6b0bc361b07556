//! The HTTP routes: OpenAI chat and text completions (streaming and not), models, health,
//! metrics, tokenize/detokenize; JSON errors everywhere, also for rejections and unknown routes.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::stream::{self, SelectAll, StreamExt};
use peregrine_engine::{FinishReason, GenerateRequest, PromptLogprob, RequestEvent, RequestStream, StopReason, SubmitError, TokenLogprob, Usage};
use serde_json::{json, Value};
use tokio_stream::wrappers::UnboundedReceiverStream;

use crate::chat_output::{ChoiceStream, OutputParsing};
use crate::error::ApiError;
use crate::protocol::{self, ChatRequest, CompletionRequest, Forced, Plan, PromptInput, ToolUse};
use crate::reasoning::ReasoningParser;
use crate::state::{random_id, unix_now, AppState, Ready};
use crate::tool_calls::ToolSchemas;

pub fn router(state: AppState, max_body_bytes: usize) -> Router {
    let api = Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/responses", post(crate::responses::responses))
        .route("/v1/responses/{*id}", axum::routing::any(crate::responses::not_stored))
        .route("/v1/messages", post(crate::messages::messages).fallback(crate::messages::method_not_allowed))
        .route("/v1/messages/count_tokens", post(crate::messages::count_tokens).fallback(crate::messages::method_not_allowed))
        .route("/v1/models", get(models))
        .route("/v1/models/{*model}", get(model))
        .route("/tokenize", post(tokenize))
        .route("/detokenize", post(detokenize))
        .route("/invocations", post(invocations))
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), auth));
    Router::new()
        .route("/health", get(health))
        // SageMaker's health probe (GET or POST), as vLLM answers it.
        .route("/ping", get(health).post(health))
        .route("/metrics", get(metrics))
        .route("/version", get(version))
        .merge(api)
        .fallback(|| async { ApiError::not_found("no such route") })
        .method_not_allowed_fallback(|| async { ApiError::method_not_allowed() })
        .layer(axum::extract::DefaultBodyLimit::max(max_body_bytes))
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(|_: Box<dyn std::any::Any + Send>| {
            ApiError::internal("internal error while handling the request").into_response()
        }))
        // Outside the panic layer, so a panic's 500 is logged and echoes the id too.
        .layer(axum::middleware::from_fn_with_state(state.clone(), access_log))
        .with_state(state)
}

/// The CORS policy for `origins` (`--allowed-origins`): any origin for `*`, none for `none`,
/// else those listed; any method and header, no credentials (vLLM's defaults), so a browser
/// chat UI on another origin can call the API (its preflight `OPTIONS` is answered here,
/// before the routes and the API key check).
pub fn cors(origins: &[String]) -> anyhow::Result<tower_http::cors::CorsLayer> {
    use tower_http::cors::{AllowOrigin, Any, CorsLayer};
    // A page may read the echoed X-Request-Id (`access_log`).
    let layer = CorsLayer::new().allow_methods(Any).allow_headers(Any).expose_headers([header::HeaderName::from_static("x-request-id")]);
    let origins: Vec<&str> = origins.iter().map(|o| o.trim()).filter(|o| !o.is_empty()).collect();
    Ok(match origins.as_slice() {
        ["*"] => layer.allow_origin(Any),
        [] | ["none"] => layer.allow_origin(AllowOrigin::list([])),
        list => {
            let values = list
                .iter()
                .map(|o| {
                    if *o == "*" || *o == "none" {
                        anyhow::bail!("--allowed-origins: `{o}` stands alone, not in a list");
                    }
                    header::HeaderValue::from_str(o).map_err(|_| anyhow::anyhow!("--allowed-origins: `{o}` is not a valid origin"))
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            layer.allow_origin(AllowOrigin::list(values))
        }
    })
}

/// Echoes the client's `X-Request-Id` on the response (so a caller's own id ties its request to
/// its logs), and with the access log on (the default; `--disable-access-log`) logs the request
/// once its response starts: method, path, status, that id and the time to the response's start
/// (a stream's own length is not in it). A request whose client left before its response
/// started is logged as 499 (nginx's "client closed request"). /health and /metrics log at debug
/// level (and /ping, SageMaker's /health): probes and scrapes come every few seconds.
async fn access_log(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let request_id = req.headers().get("x-request-id").cloned();
    let mut entry = state.settings.access_log.then(|| AccessLine {
        method: req.method().to_string(),
        path: req.uri().path().to_owned(),
        request_id: request_id.as_ref().and_then(|v| v.to_str().ok()).unwrap_or("-").to_owned(),
        t0: Instant::now(),
        status: None,
    });
    let mut response = next.run(req).await;
    if let Some(e) = entry.as_mut() {
        e.status = Some(response.status().as_u16());
    }
    if let Some(id) = request_id {
        response.headers_mut().insert("x-request-id", id);
    }
    response
}

/// One request's access log line, written when dropped: with its status once the response
/// started, as 499 where the request was dropped before (its client went away).
struct AccessLine {
    method: String,
    path: String,
    request_id: String,
    t0: Instant,
    status: Option<u16>,
}

impl Drop for AccessLine {
    fn drop(&mut self) {
        let (method, path, request_id) = (&self.method, &self.path, &self.request_id);
        let (status, ms) = (self.status.unwrap_or(499), (self.t0.elapsed().as_secs_f64() * 1e4).round() / 10.0);
        if matches!(path.as_str(), "/health" | "/ping" | "/metrics") {
            tracing::debug!(target: "peregrine::access", method, path, status, ms, request_id, "request");
        } else {
            tracing::info!(target: "peregrine::access", method, path, status, ms, request_id, "request");
        }
    }
}

/// Bearer-token check with a constant-time comparison.
async fn auth(State(state): State<AppState>, req: Request, next: Next) -> Response {
    if let Some(key) = &state.settings.api_key {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            // The scheme's name is case-insensitive (RFC 9110), the token is not.
            .and_then(|v| v.split_once(' ').filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer")).map(|(_, token)| token.trim_start()))
            // Anthropic's clients send the key as `x-api-key`.
            .or_else(|| req.headers().get("x-api-key").and_then(|v| v.to_str().ok()))
            .unwrap_or("");
        if !constant_time_eq(given.as_bytes(), key.as_bytes()) {
            if req.uri().path().starts_with("/v1/messages") {
                return crate::messages::anthropic_error(ApiError::unauthorized());
            }
            return ApiError::unauthorized().into_response();
        }
    }
    next.run(req).await
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    // Compare over the longer length so the time does not depend on where they differ.
    let n = a.len().max(b.len());
    let mut diff = (a.len() ^ b.len()) as u8 | u8::from(a.len() != b.len());
    for i in 0..n {
        diff |= a.get(i).copied().unwrap_or(0) ^ b.get(i).copied().unwrap_or(0);
    }
    diff == 0
}

pub(crate) fn body_bytes(body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    body.map_err(|r| {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::too_large(format!("request body too large: {}", r.body_text()))
        } else {
            ApiError::invalid(r.body_text())
        }
    })
}

/// Prompt texts longer than this are tokenized on tokio's blocking pool instead of the runtime
/// worker serving the request: BPE costs ~1.2 us a token here (a 144k-token prompt ~175 ms, a
/// 32 MiB body many seconds), and a worker held that long holds back every stream it would
/// write (2 cores, two 2.3 MB prompts at once: another client's SSE gaps up to ~1 s;
/// benches/results/2026-11-30-cpu-tokenize-off-runtime.md).
const ENCODE_INLINE_MAX_BYTES: usize = 16 << 10;

/// `text` as token ids, off the runtime where it is long.
async fn encode(tok: &peregrine_engine::SharedTokenizer, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, ApiError> {
    let ids = if text.len() <= ENCODE_INLINE_MAX_BYTES {
        tok.encode(text, add_special_tokens)
    } else {
        let (tok, text) = (tok.clone(), text.to_owned());
        tokio::task::spawn_blocking(move || tok.encode(&text, add_special_tokens))
            .await
            .map_err(|e| ApiError::internal(format!("tokenizing the prompt failed: {e}")))?
    };
    ids.map_err(|e| ApiError::invalid(e.to_string()))
}

/// Bodies longer than this are read (parsed, checked, a chat's template rendered) on tokio's
/// blocking pool instead of the runtime worker serving the request, as long prompts are
/// tokenized (`encode`): the JSON is parsed into a value, then into the route's two request
/// types, and a chat's template rendered, ~3-5 ms a megabyte, and a body may be 32 MiB (with one
/// runtime worker, a 33 MB chat body read inline stopped another stream for 222-1056 ms;
/// benches/results/2026-11-30-cpu-read-off-runtime.md).
const READ_INLINE_MAX_BYTES: usize = 64 << 10;

/// `read(state, body)`: inline for a short body, else on tokio's blocking pool.
async fn read_request<T: Send + 'static>(state: &AppState, body: Bytes, read: fn(&AppState, &[u8]) -> Result<T, ApiError>) -> Result<T, ApiError> {
    if body.len() <= READ_INLINE_MAX_BYTES {
        return read(state, &body);
    }
    let state = state.clone();
    tokio::task::spawn_blocking(move || read(&state, &body)).await.map_err(|e| ApiError::internal(format!("reading the request failed: {e}")))?
}

/// /health: 200 while the engine serves; 503 while the model loads, once the engine has failed
/// (the failure named in the error object), or while a shutdown drains.
async fn health(State(state): State<AppState>) -> Response {
    if state.draining() {
        return ApiError::shutting_down().into_response();
    }
    match state.ready.get().map(|r| r.engine.failure()) {
        Some(None) => (StatusCode::OK, Json(json!({"status": "ok"}))).into_response(),
        Some(Some(why)) => ApiError::backend_failed(&why).into_response(),
        None => ApiError::loading().into_response(),
    }
}

async fn metrics(State(state): State<AppState>) -> Response {
    let body = state.ready.get().map(|r| r.engine.render_metrics()).unwrap_or_default();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], body).into_response()
}

/// The served model as OpenAI's model object.
fn model_object(r: &Ready) -> Value {
    json!({"id": r.model_name, "object": "model", "created": r.created, "owned_by": "peregrine",
           "max_model_len": r.engine.max_model_len()})
}

async fn models(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let r = state.ready()?;
    Ok(Json(json!({"object": "list", "data": [model_object(r)]})))
}

/// OpenAI's retrieve-model route (`client.models.retrieve(id)`).
async fn model(State(state): State<AppState>, axum::extract::Path(id): axum::extract::Path<String>) -> Result<Json<Value>, ApiError> {
    let r = state.ready()?;
    if id != r.model_name {
        return Err(ApiError::model_not_found(&id));
    }
    Ok(Json(model_object(r)))
}

/// The server's version (vLLM's `/version`).
async fn version() -> Json<Value> {
    Json(json!({"version": env!("CARGO_PKG_VERSION")}))
}

fn check_model(r: &Ready, model: &Option<String>) -> Result<(), ApiError> {
    match model {
        Some(m) if m != &r.model_name => Err(ApiError::model_not_found(m)),
        _ => Ok(()),
    }
}

/// Submits one engine request per (prompt, choice); on failure drops those already submitted.
struct Submitted {
    /// (choice index, prompt index, stream)
    streams: Vec<(usize, usize, RequestStream)>,
    prompt_lens: Vec<usize>,
    /// The prompts' token ids, kept where the response returns them (`return_token_ids`).
    prompt_ids: Option<Vec<Vec<u32>>>,
}

/// `submit_all`, on the blocking pool when the request has a guide (a JSON schema, a regex, a
/// choice): compiling it, and on the first such request the vocabulary's guide compiler (~0.5 s
/// for a 152k-token vocabulary: benches/results/2026-11-30-json-schema.md), must not stall the
/// runtime's other requests.
async fn submit(state: &AppState, id: &str, prompts: &[Vec<u32>], plan: &Plan, prompt_logprobs: Option<usize>, prompt_param: &'static str) -> Result<Submitted, ApiError> {
    // Held until the engine counts the sequences (or refuses them), for a drain to wait on.
    let _submitting = state.start_submit().ok_or_else(ApiError::shutting_down)?;
    if plan.sampling.guide.is_none() {
        return submit_all(state.ready()?, id, prompts, plan, prompt_logprobs, prompt_param);
    }
    let (state, id, prompts, plan) = (state.clone(), id.to_owned(), prompts.to_vec(), plan.clone());
    tokio::task::spawn_blocking(move || submit_all(state.ready()?, &id, &prompts, &plan, prompt_logprobs, prompt_param))
        .await
        .map_err(|e| ApiError::internal(format!("submitting the request failed: {e}")))?
}

/// Checks every prompt, then submits all the request's sequences as one group (all queued or
/// none). `prompt_param`: the field that holds the prompt (`messages`, `prompt`), for errors.
fn submit_all(r: &Ready, id: &str, prompts: &[Vec<u32>], plan: &Plan, prompt_logprobs: Option<usize>, prompt_param: &str) -> Result<Submitted, ApiError> {
    let max_len = r.engine.max_model_len();
    let vocab = r.engine.spec().vocab_size;
    let mut reqs = Vec::with_capacity(prompts.len() * plan.n);
    let mut prompt_lens = Vec::new();
    for (pi, p) in prompts.iter().enumerate() {
        if p.is_empty() {
            return Err(ApiError::param(prompt_param, "the prompt is empty"));
        }
        if let Some(&bad) = p.iter().find(|&&t| t as usize >= vocab) {
            return Err(ApiError::param(prompt_param, format!("token id {bad} is outside the vocabulary ({vocab})")));
        }
        if p.len() >= max_len {
            return Err(ApiError::param(prompt_param, format!(
                "This model's maximum context length is {max_len} tokens. However, your prompt has {} tokens.", p.len())));
        }
        let room = max_len - p.len();
        let max_tokens = match plan.max_tokens {
            Some(m) if m > room => {
                return Err(ApiError::param(plan.max_tokens_param, format!(
                    "This model's maximum context length is {max_len} tokens. However, you requested {} tokens ({} in the prompt, {m} for the completion).",
                    p.len() + m, p.len())))
            }
            Some(m) => m,
            None => plan.default_max_tokens.map_or(room, |d| d.min(room)),
        };
        if plan.stop.min_tokens > max_tokens {
            return Err(ApiError::param("min_tokens", format!(
                "`min_tokens` ({}) exceeds the most tokens this completion can have ({max_tokens}: the model's default or the context's room)", plan.stop.min_tokens)));
        }
        prompt_lens.push(p.len());
        for i in 0..plan.n {
            let mut sampling = plan.sampling.clone();
            if let Some(s) = sampling.seed {
                sampling.seed = Some(s.wrapping_add((pi * plan.n + i) as u64));
            }
            let mut stop = plan.stop.clone();
            stop.max_tokens = max_tokens;
            reqs.push(GenerateRequest {
                request_id: format!("{id}-{pi}-{i}"),
                prompt_tokens: p.clone(),
                sampling,
                stop,
                prompt_logprobs,
                priority: plan.priority,
                arrival: Instant::now(),
                cache_salt: plan.cache_salt.clone(),
            });
        }
    }
    let streams = match r.engine.submit_group(reqs) {
        Ok(rxs) => rxs,
        Err(SubmitError::QueueFull) => return Err(ApiError::overloaded()),
        Err(SubmitError::Invalid(m)) => return Err(ApiError::invalid(m)),
        Err(SubmitError::Constraint(m)) => return Err(ApiError::param(plan.guide_param, m)),
        Err(SubmitError::ShuttingDown) => return Err(ApiError::shutting_down()),
        Err(SubmitError::BackendFailed(why)) => return Err(ApiError::backend_failed(&why)),
    };
    // Sequence j is prompt j / n's choice j % n; its choice index counts over all prompts.
    let streams = streams.into_iter().enumerate().map(|(j, rx)| (j, j / plan.n, rx)).collect();
    Ok(Submitted { streams, prompt_lens, prompt_ids: plan.return_token_ids.then(|| prompts.to_vec()) })
}

fn finish_str(f: FinishReason) -> &'static str {
    f.as_str()
}

/// vLLM's `stop_reason`: the stop token id or stop string that ended a choice, else null.
fn stop_reason_json(r: &Option<StopReason>) -> Value {
    match r {
        Some(StopReason::Token(id)) => json!(id),
        Some(StopReason::Text(t)) => json!(t),
        None => Value::Null,
    }
}

/// The text of one token as the logprobs formats show it.
fn token_text(r: &Ready, id: u32) -> String {
    r.engine.tokenizer().decode(&[id], false).unwrap_or_default()
}

/// How logprobs name token `id` whose text is `text`: that text, or (`as_ids`, vLLM's
/// `return_tokens_as_token_ids`) `token_id:<id>`, which stays exact where a token's text is part
/// of a character.
fn token_name(id: u32, text: &str, as_ids: bool) -> String {
    if as_ids {
        format!("token_id:{id}")
    } else {
        text.to_owned()
    }
}

/// The request's `bad_words` as the model's token sequences; refused where its one-token words
/// ban every one of `allowed_token_ids` (no token could ever be sampled).
fn set_bad_words(r: &Ready, common: &protocol::CommonParams, plan: &mut Plan) -> Result<(), ApiError> {
    let words = common.bad_words.as_deref().unwrap_or_default();
    let ids = protocol::bad_words(words, r.engine.spec().vocab_size, |w| r.engine.tokenizer().encode(w, false).map_err(|e| e.to_string()))?;
    if let Some(allowed) = &plan.sampling.allowed_token_ids {
        if allowed.iter().all(|a| ids.iter().any(|w| w[..] == [*a])) {
            return Err(ApiError::param("bad_words", "`bad_words` ban every token of `allowed_token_ids`"));
        }
    }
    plan.sampling.bad_words = ids;
    Ok(())
}

/// A logprob as JSON: an impossible token's -inf as -9999, as vLLM clamps it (JSON has no -inf,
/// and serde_json would write `null`, which the OpenAI SDK's float fields refuse).
fn logprob_json(l: f32) -> Value {
    json!(if l == f32::NEG_INFINITY { -9999.0 } else { l })
}

fn chat_logprob_entry(r: &Ready, lp: &TokenLogprob, as_ids: bool) -> Value {
    let entry = |id: u32, l: f32| {
        let text = token_text(r, id);
        json!({"token": token_name(id, &text, as_ids), "logprob": logprob_json(l), "bytes": text.as_bytes()})
    };
    let mut e = entry(lp.token_id, lp.logprob);
    e["top_logprobs"] = lp.top.iter().map(|&(id, l)| entry(id, l)).collect();
    e
}

/// Legacy completions logprobs for a run of tokens (prompt entries may be None), whose text
/// starts at character `start_offset` of the choice's text; and the offset after the run.
fn legacy_logprobs(r: &Ready, entries: &[Option<TokenLogprob>], ids: &[u32], start_offset: usize, as_ids: bool) -> (Value, usize) {
    let mut tokens = Vec::new();
    let mut lps = Vec::new();
    let mut tops = Vec::new();
    let mut offsets = Vec::new();
    let mut off = start_offset;
    for (e, &id) in entries.iter().zip(ids) {
        let text = token_text(r, id);
        offsets.push(off);
        off += text.chars().count();
        tokens.push(token_name(id, &text, as_ids));
        match e {
            Some(lp) => {
                lps.push(logprob_json(lp.logprob));
                let mut m = serde_json::Map::new();
                for &(tid, l) in &lp.top {
                    m.insert(token_name(tid, &token_text(r, tid), as_ids), logprob_json(l));
                }
                tops.push(Value::Object(m));
            }
            None => {
                lps.push(Value::Null);
                tops.push(Value::Null);
            }
        }
    }
    (json!({"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}), off)
}

/// `lp` with only its first `k` alternatives (the engine computed as many as the largest ask).
fn with_top(lp: &TokenLogprob, k: usize) -> TokenLogprob {
    TokenLogprob { top: lp.top.iter().take(k).copied().collect(), ..lp.clone() }
}

/// vLLM's `prompt_logprobs`: per prompt token, null for the first (nothing precedes it), else an
/// object keyed by token id holding the token itself and its `k` likeliest alternatives, each
/// `{logprob, rank, decoded_token}`.
fn prompt_logprobs_json(r: &Ready, entries: &[Option<PromptLogprob>], prompt_len: usize, k: usize) -> Value {
    let one = |id: u32, logprob: f32, rank: u32| {
        json!({"logprob": logprob_json(logprob), "rank": rank, "decoded_token": token_text(r, id)})
    };
    let list = (0..prompt_len).map(|i| match entries.get(i) {
        Some(Some(PromptLogprob { token, rank })) => {
            let mut m = serde_json::Map::new();
            m.insert(token.token_id.to_string(), one(token.token_id, token.logprob, *rank));
            // As vLLM's dict: a prompt token among the alternatives keeps its first position
            // but takes its place's rank (with ties, its counted rank can exceed its place).
            for (place, &(id, l)) in token.top.iter().take(k).enumerate() {
                m.insert(id.to_string(), one(id, l, place as u32 + 1));
            }
            Value::Object(m)
        }
        _ => Value::Null,
    });
    Value::Array(list.collect())
}

/// OpenAI's usage object. With speculation on, `completion_tokens_details` counts the drafted
/// tokens that were accepted and rejected (as vLLM and OpenAI's predicted outputs report them).
fn usage_json(prompt: usize, completion: usize, cached: usize, spec: Option<(usize, usize)>) -> Value {
    let mut u = json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
           "prompt_tokens_details": {"cached_tokens": cached}});
    if let Some((accepted, rejected)) = spec {
        u["completion_tokens_details"] =
            json!({"accepted_prediction_tokens": accepted, "rejected_prediction_tokens": rejected});
    }
    u
}

/// Accepted and rejected draft tokens, when the engine speculates.
fn spec_sums(speculative: bool, accepted: usize, rejected: usize) -> Option<(usize, usize)> {
    speculative.then_some((accepted, rejected))
}

/// One choice's collected output.
#[derive(Default)]
struct Collected {
    text: String,
    ids: Vec<u32>,
    logprobs: Vec<TokenLogprob>,
    prompt_logprobs: Option<Vec<Option<PromptLogprob>>>,
    finish: Option<FinishReason>,
    stop_reason: Option<StopReason>,
    completion_tokens: usize,
    cached: usize,
    accepted: usize,
    rejected: usize,
}

async fn collect(sub: Submitted) -> Result<Vec<(usize, usize, Collected)>, ApiError> {
    let futs = sub.streams.into_iter().map(|(ci, pi, mut rx)| async move {
        let mut c = Collected::default();
        while let Some(ev) = rx.recv().await {
            match ev {
                RequestEvent::PromptLogprobs(p) => c.prompt_logprobs = Some(p),
                RequestEvent::Delta { text, token_ids, logprobs } => {
                    c.text.push_str(&text);
                    c.ids.extend(token_ids);
                    c.logprobs.extend(logprobs);
                }
                RequestEvent::Finished { reason, usage, stop_reason } => {
                    c.finish = Some(reason);
                    c.stop_reason = stop_reason;
                    c.completion_tokens = usage.completion_tokens;
                    c.cached = usage.cached_tokens;
                    c.accepted = usage.accepted_prediction_tokens;
                    c.rejected = usage.rejected_prediction_tokens;
                }
                RequestEvent::Error(m) => return Err(ApiError::internal(m)),
            }
        }
        // Aborted (the engine shut down under it; a client that went away reads nothing): a 503
        // the client may retry elsewhere, not a 200 holding part of an answer.
        if matches!(c.finish, None | Some(FinishReason::Abort)) {
            return Err(ApiError::unavailable("the request was aborted (server shutting down)"));
        }
        Ok((ci, pi, c))
    });
    let mut out = futures::future::try_join_all(futs).await?;
    out.sort_by_key(|x| x.0);
    Ok(out)
}

fn total_usage(results: &[(usize, usize, Collected)], prompt_lens: &[usize], speculative: bool) -> Value {
    let completion: usize = results.iter().map(|x| x.2.completion_tokens).sum();
    let mut cached = vec![0; prompt_lens.len()];
    for (_, pi, c) in results {
        cached[*pi] = cached[*pi].max(c.cached);
    }
    let accepted = results.iter().map(|x| x.2.accepted).sum();
    let rejected = results.iter().map(|x| x.2.rejected).sum();
    usage_json(prompt_lens.iter().sum(), completion, cached.iter().sum(), spec_sums(speculative, accepted, rejected))
}

// ---------------------------------------------------------------------------------------------
// Chat completions
// ---------------------------------------------------------------------------------------------

/// `reasoning_effort`'s values (OpenAI's).
const REASONING_EFFORTS: &[&str] = &["none", "minimal", "low", "medium", "high"];

/// A chat request as read from its body: the template rendered, the plan made.
struct ChatRead {
    top: Option<usize>,
    plan: Plan,
    /// The tools' declared parameter types, when their calls are parsed from the output.
    tools: Option<ToolSchemas>,
    /// A forced call (`tool_choice` `required` or a function): the output is its JSON.
    forced: Option<Forced>,
    /// `parallel_tool_calls: false`: one call at most.
    one_call: bool,
    /// `include_reasoning: false`: the reasoning is parsed out and left out.
    hide_reasoning: bool,
    /// `echo`: the final assistant message's text, which the reply starts with.
    echo: Option<String>,
    text: String,
}

fn read_chat(state: &AppState, body: &[u8]) -> Result<ChatRead, ApiError> {
    let r = state.ready()?;
    let (req, mut common): (ChatRequest, _) = protocol::parse_request(body, "chat", protocol::CHAT_FIELDS)?;
    r.sampling_defaults.apply(&mut common);
    check_model(r, &common.model)?;
    protocol::check_best_of(req.best_of, &common)?;
    for (field, given, now) in [("functions", &req.functions, "tools"), ("function_call", &req.function_call, "tool_choice")] {
        if given.is_some() {
            return Err(ApiError::param(field, format!("`{field}` (OpenAI's deprecated function calling) is not supported: use `{now}`")));
        }
    }
    let top = match (req.logprobs.unwrap_or(false), req.top_logprobs) {
        (false, Some(_)) => return Err(ApiError::param("top_logprobs", "`top_logprobs` requires `logprobs: true`")),
        (false, None) => None,
        (true, None) => Some(0),
        (true, Some(k)) if (0..=protocol::MAX_TOP_LOGPROBS as i64).contains(&k) => Some(k as usize),
        (true, Some(k)) => return Err(ApiError::param("top_logprobs", format!("`top_logprobs` must be between 0 and {}, got {k}", protocol::MAX_TOP_LOGPROBS))),
    };
    let mut plan = protocol::plan(&common, top, r.engine.spec().vocab_size, state.settings.always_include_usage)?;
    plan.default_max_tokens = r.sampling_defaults.max_tokens;
    set_bad_words(r, &common, &mut plan)?;
    let (parse_tools, forced) = match protocol::tool_use(req.tools.as_ref(), req.tool_choice.as_ref(), req.parallel_tool_calls != Some(false))? {
        ToolUse::Off => (false, None),
        ToolUse::Parse => (state.settings.parse_tool_calls, None),
        ToolUse::Forced { forced, guide } => {
            if plan.sampling.json_object || plan.sampling.guide.is_some() || plan.sampling.allowed_token_ids.is_some() {
                return Err(ApiError::param("tool_choice", "a forced tool call (`tool_choice` `required` or a function) holds the output to the call's JSON; it cannot be combined with `response_format`, guided fields or `allowed_token_ids`"));
            }
            plan.sampling.guide = Some(guide);
            plan.guide_param = "tool_choice";
            (false, Some(forced))
        }
    };
    let messages = protocol::chat_messages(&req.messages)?;
    let template = r.template.as_ref().ok_or_else(|| ApiError::invalid("this model has no chat template: use /v1/completions or start the server with --chat-template"))?;
    let mut kwargs = req.chat_template_kwargs.clone().unwrap_or_default();
    // The request's own fields for template variables, over the same names in the kwargs.
    if let Some(effort) = &req.reasoning_effort {
        if !REASONING_EFFORTS.contains(&effort.as_str()) {
            return Err(ApiError::param("reasoning_effort", format!("`reasoning_effort` must be one of {}, got `{effort}`", REASONING_EFFORTS.join(", "))));
        }
        kwargs.insert("reasoning_effort".into(), json!(effort));
    }
    if let Some(docs) = req.documents.as_ref().filter(|d| !d.is_null()) {
        if !docs.as_array().is_some_and(|list| list.iter().all(Value::is_object)) {
            return Err(ApiError::param("documents", "`documents` must be a list of objects"));
        }
        kwargs.insert("documents".into(), docs.clone());
    }
    let text = render_chat(template, &messages, req.tools.as_ref(), req.add_generation_prompt, req.continue_final_message, &kwargs)?;
    let tools = parse_tools.then(|| ToolSchemas::from_tools(req.tools.as_ref()));
    // (Text parts are joined already.)
    let echo = req.echo.unwrap_or(false).then(|| messages.as_array().and_then(|m| m.last()).filter(|m| m["role"] == "assistant").and_then(|m| m["content"].as_str()).unwrap_or_default().to_owned());
    Ok(ChatRead { top, plan, tools, forced, one_call: req.parallel_tool_calls == Some(false), hide_reasoning: req.include_reasoning == Some(false), echo, text })
}

/// The chat's prompt text: rendered with a generation prompt (by default), or
/// (`continue_final_message`) without one and cut after the final message's text, so that the
/// reply continues it (vLLM's and transformers' fields).
fn render_chat(template: &peregrine_model::chat_template::ChatTemplate, messages: &Value, tools: Option<&Value>, add_generation_prompt: Option<bool>, continue_final: Option<bool>, kwargs: &serde_json::Map<String, Value>) -> Result<String, ApiError> {
    // The template's own variables come from the request's fields, checked there: kwargs
    // overriding them would render what was never checked (messages) or contradict the
    // server's reading of the prompt (add_generation_prompt).
    if let Some(k) = kwargs.keys().find(|k| peregrine_model::chat_template::RESERVED_VARIABLES.contains(&k.as_str())) {
        return Err(ApiError::param("chat_template_kwargs", format!("`chat_template_kwargs.{k}` is set by the server from the request; send it as the request's own field")));
    }
    // (vLLM would render with it as the template: here it would be a variable nothing reads.)
    if kwargs.contains_key("chat_template") {
        return Err(ApiError::param("chat_template_kwargs", "`chat_template_kwargs.chat_template` is not supported: the server's chat template (or --chat-template) renders every chat"));
    }
    let continue_final = continue_final.unwrap_or(false);
    let add_generation_prompt = match (continue_final, add_generation_prompt) {
        (true, Some(true)) => {
            return Err(ApiError::param("continue_final_message", "`continue_final_message` continues the final message, `add_generation_prompt` starts a new one: set one of them"));
        }
        (true, _) => false,
        (false, a) => a.unwrap_or(true),
    };
    let text = template.render(messages, tools, add_generation_prompt, kwargs).map_err(|e| ApiError::param("messages", e.to_string()))?;
    if !continue_final {
        return Ok(text);
    }
    peregrine_model::chat_template::continue_final_message(&text, messages).map_err(|e| ApiError::param("continue_final_message", e.to_string()))
}

async fn chat(State(state): State<AppState>, headers: HeaderMap, body: Result<Bytes, BytesRejection>) -> Result<Response, ApiError> {
    let body = body_bytes(body)?;
    Ok(match chat_run(&state, body, header_request_id(&headers)).await? {
        ChatRun::Stream(st) => sse(*st).into_response(),
        ChatRun::Reply(reply) => Json(reply).into_response(),
    })
}

/// SageMaker's `/invocations` (as vLLM serves it): a chat body (`messages`) goes to
/// /v1/chat/completions, a completion body (`prompt`) to /v1/completions.
async fn invocations(state: State<AppState>, headers: HeaderMap, body: Result<Bytes, BytesRejection>) -> Result<Response, ApiError> {
    let bytes = body_bytes(body)?;
    // Only which of the two keys is there (the route's handler reads the body for itself).
    #[derive(serde::Deserialize)]
    struct Kind {
        messages: Option<serde::de::IgnoredAny>,
        prompt: Option<serde::de::IgnoredAny>,
    }
    fn read_kind(_: &AppState, body: &[u8]) -> Result<(bool, bool), ApiError> {
        match serde_json::from_slice::<Kind>(body) {
            Ok(k) => Ok((k.messages.is_some(), k.prompt.is_some())),
            // What is wrong with it, in the routes' words (not UTF-8, not JSON, not an object).
            Err(_) => protocol::body_value(body).map(|_| (false, false)),
        }
    }
    match read_request(&state.0, bytes.clone(), read_kind).await? {
        (true, false) => chat(state, headers, Ok(bytes)).await,
        (false, true) => completions(state, headers, Ok(bytes)).await,
        (true, true) => Err(ApiError::invalid("/invocations takes a chat body (with `messages`) or a completion body (with `prompt`), not both")),
        (false, false) => Err(ApiError::invalid("/invocations takes a chat body (with `messages`) or a completion body (with `prompt`)")),
    }
}

/// A usable `X-Request-Id` header (one that is not is left to the access log alone: a proxy's
/// header should not fail the request).
fn header_request_id(headers: &HeaderMap) -> Option<String> {
    headers.get("x-request-id").and_then(|v| v.to_str().ok()).and_then(|id| protocol::client_request_id(id).ok())
}

/// The response's `id`, `{prefix}-` and the caller's id (the `X-Request-Id` header, else the
/// body's `request_id`, as vLLM picks) or a random one; and the engine's id for the request's
/// sequences, unique whatever the caller sent (a hash of it seeds unseeded sampling). Under
/// `--seed`, a request without a seed gets one here (`AppState::arrival_seed`).
fn request_ids(state: &AppState, prefix: &str, header_id: Option<String>, plan: &mut Plan) -> (String, String) {
    let id = match header_id.or_else(|| plan.request_id.clone()) {
        Some(caller) => format!("{prefix}-{caller}"),
        None => random_id(prefix),
    };
    if plan.sampling.seed.is_none() {
        plan.sampling.seed = state.arrival_seed();
    }
    let engine_id = random_id(&id);
    (id, engine_id)
}

/// A chat request under way: its chunks still to come, or its whole reply.
pub(crate) enum ChatRun {
    Stream(Box<StreamState>),
    Reply(Value),
}

/// Reads, submits and (unless streamed) collects a chat request's body: what `/v1/chat/completions`
/// answers, and what `/v1/responses` reshapes.
pub(crate) async fn chat_run(state: &AppState, body: Bytes, header_id: Option<String>) -> Result<ChatRun, ApiError> {
    let r = state.ready()?;
    let ChatRead { top, mut plan, tools, forced, one_call, hide_reasoning, echo, text } = read_request(state, body, read_chat).await?;
    let tok = r.engine.tokenizer();
    let mut ids = encode(tok, &text, plan.add_special_tokens.unwrap_or(false)).await?;
    plan.truncate_prompt(&mut ids, r.engine.max_model_len());
    let parsing = OutputParsing {
        reasoning: state.settings.parse_reasoning.then(|| ReasoningParser::prompt_opens_thinking(&text)),
        hide_reasoning,
        // The declared parameter types, for reading XML tool call values.
        tools: tools.map(Arc::new),
        forced,
        one_call,
    };
    let (id, engine_id) = request_ids(state, "chatcmpl", header_id, &mut plan);
    let prompt_len = ids.len();
    let sub = submit(state, &engine_id, &[ids], &plan, plan.prompt_logprobs, "messages").await?;
    let created = unix_now();
    if plan.stream {
        let mut st = StreamState::new(state.clone(), sub, id, created, true, &plan, None);
        if parsing.any() {
            st.parsing = Some(parsing);
        }
        // The echo follows each choice's role chunk (as vLLM sends it).
        if let Some(prefix) = echo.filter(|e| !e.is_empty()) {
            st.echo_chat(&prefix);
        }
        return Ok(ChatRun::Stream(Box::new(st)));
    }
    let (prompt_lens, prompt_ids) = (sub.prompt_lens.clone(), sub.prompt_ids.clone());
    let results = collect(sub).await?;
    let choices: Vec<Value> = results
        .iter()
        .map(|(ci, _, c)| {
            let (mut message, calls) = parsing.message(&c.text);
            if let Some(prefix) = echo.as_deref().filter(|e| !e.is_empty()) {
                message["content"] = json!(format!("{prefix}{}", message["content"].as_str().unwrap_or_default()));
            }
            let finish = c.finish.map(|f| parsing.finish_reason(f, calls));
            let mut choice = json!({"index": ci, "message": message,
                   "logprobs": top.map(|_| json!({"content": c.logprobs.iter().map(|lp| chat_logprob_entry(r, lp, plan.tokens_as_ids)).collect::<Vec<_>>()})),
                   "finish_reason": finish, "stop_reason": stop_reason_json(&c.stop_reason)});
            if plan.return_token_ids {
                choice["token_ids"] = json!(c.ids);
            }
            choice
        })
        .collect();
    let mut response = json!({"id": id, "object": "chat.completion", "created": created, "model": r.model_name,
                   "choices": choices, "usage": total_usage(&results, &prompt_lens, r.engine.speculative_block_size().is_some())});
    if let Some(ids) = prompt_ids {
        response["prompt_token_ids"] = json!(ids[0]);
    }
    // One prompt: vLLM gives its logprobs once, beside the choices.
    if let Some(k) = plan.prompt_logprobs {
        response["prompt_logprobs"] = prompt_logprobs_json(r, results[0].2.prompt_logprobs.as_deref().unwrap_or_default(), prompt_len, k);
    }
    Ok(ChatRun::Reply(response))
}

// ---------------------------------------------------------------------------------------------
// Text completions
// ---------------------------------------------------------------------------------------------

/// A text completion request as read from its body: the plan made, the prompts not yet
/// tokenized.
struct CompletionRead {
    top: Option<usize>,
    plan: Plan,
    echo: bool,
    /// `echo` with `max_tokens: 0`: the prompt alone comes back (`without_output`).
    prompt_only: bool,
    prompts: Vec<PromptInput>,
}

fn read_completion(state: &AppState, body: &[u8]) -> Result<CompletionRead, ApiError> {
    let r = state.ready()?;
    let (req, mut common): (CompletionRequest, _) = protocol::parse_request(body, "completions", protocol::COMPLETION_FIELDS)?;
    r.sampling_defaults.apply(&mut common);
    check_model(r, &common.model)?;
    if req.suffix.is_some() {
        return Err(ApiError::param("suffix", "`suffix` is not supported"));
    }
    protocol::check_best_of(req.best_of, &common)?;
    // OpenAI's legacy API: `echo` with `max_tokens: 0` scores the prompt and generates nothing
    // (how evaluation harnesses read a text's loglikelihood). The engine runs one token, which
    // `without_output` drops (vLLM runs one too but reports it: completion_tokens 1).
    let prompt_only = req.echo == Some(true) && common.max_tokens == Some(0) && common.max_completion_tokens.is_none();
    if prompt_only {
        common.max_tokens = Some(1);
    }
    let top = match req.logprobs {
        None => None,
        Some(k) if (0..=protocol::MAX_TOP_LOGPROBS as i64).contains(&k) => Some(k as usize),
        Some(k) => return Err(ApiError::param("logprobs", format!("`logprobs` must be between 0 and {}, got {k}", protocol::MAX_TOP_LOGPROBS))),
    };
    let mut plan = protocol::plan(&common, top, r.engine.spec().vocab_size, state.settings.always_include_usage)?;
    plan.default_max_tokens = r.sampling_defaults.max_tokens;
    set_bad_words(r, &common, &mut plan)?;
    Ok(CompletionRead { top, plan, echo: req.echo.unwrap_or(false), prompt_only, prompts: protocol::prompts(&req.prompt)? })
}

async fn completions(State(state): State<AppState>, headers: HeaderMap, body: Result<Bytes, BytesRejection>) -> Result<Response, ApiError> {
    let body = body_bytes(body)?;
    let r = state.ready()?;
    let CompletionRead { top, mut plan, echo, prompt_only, prompts: inputs } = read_request(&state, body, read_completion).await?;
    let tok = r.engine.tokenizer();
    let mut prompts = Vec::new();
    let mut echo_texts = Vec::new();
    for p in inputs {
        let (mut ids, text) = match p {
            PromptInput::Text(t) => (encode(tok, &t, plan.add_special_tokens.unwrap_or(true)).await?, Some(t)),
            PromptInput::Tokens(ids) => (ids, None),
        };
        let whole = ids.len();
        plan.truncate_prompt(&mut ids, r.engine.max_model_len());
        if echo {
            // The prompt as sent, where it was text and kept whole (as vLLM echoes it: decoding
            // the ids would add what the tokenizer adds, a BOS, and undo its normalisation).
            echo_texts.push(match text {
                Some(t) if ids.len() == whole => t,
                _ => tok.decode(&ids, false).unwrap_or_default(),
            });
        }
        prompts.push(ids);
    }
    let echo_texts = echo.then_some(echo_texts);
    let (id, engine_id) = request_ids(&state, "cmpl", header_request_id(&headers), &mut plan);
    // The engine's prompt entries serve the echo's logprobs and `prompt_logprobs` both.
    let prompt_lp = if echo { top.max(plan.prompt_logprobs) } else { plan.prompt_logprobs };
    let mut sub = submit(&state, &engine_id, &prompts, &plan, prompt_lp, "prompt").await?;
    if prompt_only {
        sub = without_output(sub);
    }
    let created = unix_now();
    if plan.stream {
        let echo = echo_texts.map(|texts| Echo { texts, prompts: prompt_lp.map(|_| prompts.clone()) });
        let st = StreamState::new(state.clone(), sub, id, created, false, &plan, echo);
        return Ok(sse(st).into_response());
    }
    let prompt_lens = sub.prompt_lens.clone();
    let results = collect(sub).await?;
    let choices: Vec<Value> = results
        .iter()
        .map(|(ci, pi, c)| {
            let prefix = echo_texts.as_ref().map(|e| e[*pi].clone()).unwrap_or_default();
            let logprobs = top.map(|_| {
                let mut entries: Vec<Option<TokenLogprob>> = Vec::new();
                let mut ids: Vec<u32> = Vec::new();
                if echo {
                    let pl = c.prompt_logprobs.as_deref().unwrap_or_default();
                    entries.extend(pl.iter().map(|e| e.as_ref().map(|e| with_top(&e.token, top.unwrap_or(0)))));
                    ids.extend(&prompts[*pi]);
                    entries.resize(ids.len(), None);
                }
                entries.extend(c.logprobs.iter().cloned().map(Some));
                ids.extend(c.logprobs.iter().map(|l| l.token_id));
                legacy_logprobs(r, &entries, &ids, 0, plan.tokens_as_ids).0
            });
            let mut choice = json!({"index": ci, "text": format!("{prefix}{}", c.text), "logprobs": logprobs,
                   "finish_reason": c.finish.map(finish_str), "stop_reason": stop_reason_json(&c.stop_reason)});
            if let Some(k) = plan.prompt_logprobs {
                choice["prompt_logprobs"] = prompt_logprobs_json(r, c.prompt_logprobs.as_deref().unwrap_or_default(), prompts[*pi].len(), k);
            }
            if plan.return_token_ids {
                choice["prompt_token_ids"] = json!(prompts[*pi]);
                choice["token_ids"] = json!(c.ids);
            }
            choice
        })
        .collect();
    Ok(Json(json!({"id": id, "object": "text_completion", "created": created, "model": r.model_name,
                   "choices": choices, "usage": total_usage(&results, &prompt_lens, r.engine.speculative_block_size().is_some())})).into_response())
}

/// A completion's streams with the output left out (`echo` with `max_tokens: 0`): no text, ids
/// or logprobs, no completion tokens, and `length` as the finish (OpenAI's legacy API; vLLM
/// instead reports the one token it runs). Each forwarder leaves when its client does, which drops the engine's stream and so
/// aborts the request.
fn without_output(sub: Submitted) -> Submitted {
    let streams = sub
        .streams
        .into_iter()
        .map(|(ci, pi, mut rx)| {
            let (tx, out) = tokio::sync::mpsc::unbounded_channel();
            tokio::spawn(async move {
                loop {
                    let ev = tokio::select! {
                        ev = rx.recv() => ev,
                        _ = tx.closed() => None,
                    };
                    let ev = match ev {
                        None => break,
                        Some(RequestEvent::Delta { .. }) => continue,
                        Some(RequestEvent::Finished { reason, usage, .. }) => RequestEvent::Finished {
                            reason: if reason == FinishReason::Abort { reason } else { FinishReason::Length },
                            usage: Usage { completion_tokens: 0, accepted_prediction_tokens: 0, rejected_prediction_tokens: 0, ..usage },
                            stop_reason: None,
                        },
                        Some(other) => other,
                    };
                    if tx.send(ev).is_err() {
                        break;
                    }
                }
            });
            (ci, pi, out)
        })
        .collect();
    Submitted { streams, ..sub }
}

// ---------------------------------------------------------------------------------------------
// Streaming (SSE)
// ---------------------------------------------------------------------------------------------

type Tagged = futures::stream::Map<UnboundedReceiverStream<RequestEvent>, Box<dyn FnMut(RequestEvent) -> (usize, usize, RequestEvent) + Send>>;

/// A streamed completion's echo: per prompt its text, and its ids where the prompt's logprobs
/// go with it.
struct Echo {
    texts: Vec<String>,
    prompts: Option<Vec<Vec<u32>>>,
}

/// Turns the engine events of every choice into OpenAI chunks. Dropping it (client gone) drops
/// the engine streams, which aborts the requests at the next engine step.
pub(crate) struct StreamState {
    state: AppState,
    merged: SelectAll<Tagged>,
    pending: VecDeque<String>,
    id: String,
    created: u64,
    chat: bool,
    include_usage: bool,
    echo: Option<Echo>,
    /// Choices whose echo waits for their prompt's logprobs, to go out in one chunk with them.
    echo_waiting: std::collections::HashSet<usize>,
    /// Per choice, the character offset its next legacy logprobs start at (`text_offset`).
    text_offset: HashMap<usize, usize>,
    prompt_lens: Vec<usize>,
    completion_tokens: usize,
    cached: Vec<usize>,
    accepted: usize,
    rejected: usize,
    done: bool,
    /// Chat requests whose outputs are parsed (reasoning, tool calls), and per choice its
    /// parsers.
    parsing: Option<OutputParsing>,
    choice_streams: HashMap<usize, ChoiceStream>,
    /// Logprobs name tokens `token_id:<id>` (`Plan::tokens_as_ids`).
    tokens_as_ids: bool,
    /// Every chunk carries its choice's usage so far (`Plan::continuous_usage`).
    continuous_usage: bool,
    /// Per choice, its prompt's index and the tokens it has generated so far.
    choice_prompt: HashMap<usize, usize>,
    choice_tokens: HashMap<usize, usize>,
    /// `return_token_ids`: the prompts' ids, which go out on each choice's first chunk (vLLM's
    /// place for them), and the choices whose first chunk went.
    prompt_ids: Option<Vec<Vec<u32>>>,
    prompt_ids_sent: std::collections::HashSet<usize>,
}

impl StreamState {
    fn new(state: AppState, sub: Submitted, id: String, created: u64, chat: bool, plan: &Plan, echo: Option<Echo>) -> Self {
        let mut merged = SelectAll::new();
        let mut st = StreamState {
            state,
            merged: SelectAll::new(),
            pending: VecDeque::new(),
            id,
            created,
            chat,
            include_usage: plan.include_usage,
            echo,
            echo_waiting: Default::default(),
            text_offset: HashMap::new(),
            cached: vec![0; sub.prompt_lens.len()],
            prompt_lens: sub.prompt_lens,
            completion_tokens: 0,
            accepted: 0,
            rejected: 0,
            done: false,
            parsing: None,
            choice_streams: HashMap::new(),
            tokens_as_ids: plan.tokens_as_ids,
            continuous_usage: plan.continuous_usage,
            choice_prompt: sub.streams.iter().map(|&(ci, pi, _)| (ci, pi)).collect(),
            choice_tokens: HashMap::new(),
            prompt_ids: sub.prompt_ids,
            prompt_ids_sent: Default::default(),
        };
        for (ci, pi, rx) in sub.streams {
            if chat {
                let c = st.chunk(ci, json!({"role": "assistant", "content": ""}), Value::Null, None);
                st.pending.push_back(c);
            } else if let Some(e) = &st.echo {
                if e.prompts.is_some() {
                    st.echo_waiting.insert(ci);
                } else {
                    let c = st.chunk(ci, json!(e.texts[pi]), Value::Null, None);
                    st.pending.push_back(c);
                }
            }
            let f: Box<dyn FnMut(RequestEvent) -> (usize, usize, RequestEvent) + Send> = Box::new(move |ev| (ci, pi, ev));
            merged.push(UnboundedReceiverStream::new(rx).map(f));
        }
        st.add_token_ids(0, None);
        st.merged = merged;
        st
    }

    /// A chat's echo (`echo`: the final assistant message's text) as a content chunk after each
    /// choice's role chunk.
    fn echo_chat(&mut self, prefix: &str) {
        let roles: Vec<String> = self.pending.drain(..).collect();
        for role in roles {
            let ci = serde_json::from_str::<Value>(&role).ok().and_then(|c| c["choices"][0]["index"].as_u64()).unwrap_or(0) as usize;
            self.pending.push_back(role);
            let c = self.chunk(ci, json!({"content": prefix}), Value::Null, None);
            self.pending.push_back(c);
        }
    }

    /// With `return_token_ids`, the chunks queued from `from` on get their ids: each choice's
    /// first chunk its prompt's (`prompt_token_ids`, on the chunk for chats and on the choice for
    /// completions, as vLLM places them), and the first of them `ids` (an event's output ids, as
    /// the choice's `token_ids`; an empty delta carries them where the event sent no text).
    fn add_token_ids(&mut self, from: usize, ids: Option<(usize, &[u32])>) {
        let Some(prompts) = &self.prompt_ids else { return };
        if let Some((ci, list)) = ids.filter(|(_, list)| !list.is_empty()) {
            if self.pending.len() == from {
                let delta = if self.chat { json!({"content": ""}) } else { json!("") };
                let c = self.chunk(ci, delta, Value::Null, None);
                self.pending.push_back(c);
            }
            let mut c: Value = serde_json::from_str(&self.pending[from]).expect("a chunk is JSON");
            c["choices"][0]["token_ids"] = json!(list);
            self.pending[from] = c.to_string();
        }
        for i in from..self.pending.len() {
            let Ok(mut c) = serde_json::from_str::<Value>(&self.pending[i]) else { continue };
            let Some(ci) = c["choices"][0]["index"].as_u64().map(|ci| ci as usize) else { continue };
            if !self.prompt_ids_sent.insert(ci) {
                continue;
            }
            let ids = json!(prompts[self.choice_prompt[&ci]]);
            if self.chat {
                c["prompt_token_ids"] = ids;
            } else {
                c["choices"][0]["prompt_token_ids"] = ids;
            }
            self.pending[i] = c.to_string();
        }
    }

    fn model(&self) -> String {
        self.state.ready.get().map(|r| r.model_name.clone()).unwrap_or_default()
    }

    /// One chunk; `delta` is the chat delta object or the completions text.
    fn chunk(&self, index: usize, delta: Value, logprobs: Value, finish: Option<&str>) -> String {
        self.chunk_value(index, delta, logprobs, finish).to_string()
    }

    fn chunk_value(&self, index: usize, delta: Value, logprobs: Value, finish: Option<&str>) -> Value {
        let choice = if self.chat {
            json!({"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish})
        } else {
            // vLLM's completion chunks all carry the key (null until the last).
            json!({"index": index, "text": delta, "logprobs": logprobs, "finish_reason": finish, "stop_reason": null})
        };
        let object = if self.chat { "chat.completion.chunk" } else { "text_completion" };
        let mut c = json!({"id": self.id, "object": object, "created": self.created, "model": self.model(), "choices": [choice]});
        if self.continuous_usage {
            let prompt = self.choice_prompt.get(&index).map_or(0, |&pi| self.prompt_lens[pi]);
            let generated = self.choice_tokens.get(&index).copied().unwrap_or(0);
            c["usage"] = json!({"prompt_tokens": prompt, "completion_tokens": generated, "total_tokens": prompt + generated});
        }
        c
    }

    /// A choice's echo chunk, once, with its prompt's logprobs where they came (`lp`: the
    /// engine's entries, one per prompt token, the first None).
    fn send_echo(&mut self, ci: usize, pi: usize, lp: Option<Vec<Option<PromptLogprob>>>) {
        if !self.echo_waiting.remove(&ci) {
            return;
        }
        let (Some(r), Some(echo)) = (self.state.ready.get(), &self.echo) else { return };
        let text = echo.texts[pi].clone();
        let (logprobs, end) = match (lp, &echo.prompts) {
            (Some(entries), Some(prompts)) => {
                let mut entries: Vec<Option<TokenLogprob>> = entries.into_iter().map(|e| e.map(|e| e.token)).collect();
                entries.resize(prompts[pi].len(), None);
                legacy_logprobs(r, &entries, &prompts[pi], 0, self.tokens_as_ids)
            }
            _ => (Value::Null, text.chars().count()),
        };
        self.text_offset.insert(ci, end);
        let c = self.chunk(ci, json!(text), logprobs, None);
        self.pending.push_back(c);
    }

    fn handle(&mut self, ci: usize, pi: usize, ev: RequestEvent) {
        let from = self.pending.len();
        let ids = match &ev {
            RequestEvent::Delta { token_ids, .. } if self.prompt_ids.is_some() => token_ids.clone(),
            _ => Vec::new(),
        };
        self.handle_event(ci, pi, ev);
        self.add_token_ids(from, Some((ci, &ids)));
    }

    fn handle_event(&mut self, ci: usize, pi: usize, ev: RequestEvent) {
        if !matches!(ev, RequestEvent::PromptLogprobs(_)) {
            // No prompt logprobs came before the output (or the end): the echo goes without.
            self.send_echo(ci, pi, None);
        }
        let Some(r) = self.state.ready.get() else { return };
        match ev {
            RequestEvent::PromptLogprobs(lp) => self.send_echo(ci, pi, Some(lp)),
            RequestEvent::Delta { text, logprobs, token_ids } => {
                *self.choice_tokens.entry(ci).or_insert(0) += token_ids.len();
                if text.is_empty() && logprobs.is_empty() {
                    return;
                }
                let lp = if logprobs.is_empty() {
                    Value::Null
                } else if self.chat {
                    json!({"content": logprobs.iter().map(|l| chat_logprob_entry(r, l, self.tokens_as_ids)).collect::<Vec<_>>()})
                } else {
                    let entries: Vec<Option<TokenLogprob>> = logprobs.iter().cloned().map(Some).collect();
                    let ids: Vec<u32> = logprobs.iter().map(|l| l.token_id).collect();
                    // Offsets count from the start of the choice's whole text, echo included,
                    // as without streaming.
                    let offset = self.text_offset.entry(ci).or_insert(0);
                    let (lp, end) = legacy_logprobs(r, &entries, &ids, *offset, self.tokens_as_ids);
                    *offset = end;
                    lp
                };
                if let Some(parsing) = &self.parsing {
                    let deltas = self.choice_streams.entry(ci).or_insert_with(|| parsing.stream()).deltas(Some(&text));
                    self.push_deltas(ci, deltas, lp);
                    return;
                }
                let delta = if self.chat { json!({"content": text}) } else { json!(text) };
                let c = self.chunk(ci, delta, lp, None);
                self.pending.push_back(c);
            }
            RequestEvent::Finished { reason, usage, stop_reason } => {
                self.completion_tokens += usage.completion_tokens;
                self.choice_tokens.insert(ci, usage.completion_tokens);
                self.cached[pi] = self.cached[pi].max(usage.cached_tokens);
                self.accepted += usage.accepted_prediction_tokens;
                self.rejected += usage.rejected_prediction_tokens;
                let mut finish = finish_str(reason);
                if let Some(parsing) = &self.parsing {
                    let mut p = self.choice_streams.remove(&ci).unwrap_or_else(|| parsing.stream());
                    let deltas = p.deltas(None);
                    finish = parsing.finish_reason(reason, p.calls());
                    self.push_deltas(ci, deltas, Value::Null);
                }
                let delta = if self.chat { json!({}) } else { json!("") };
                let mut c = self.chunk_value(ci, delta, Value::Null, Some(finish));
                c["choices"][0]["stop_reason"] = stop_reason_json(&stop_reason);
                self.pending.push_back(c.to_string());
            }
            RequestEvent::Error(m) => {
                self.pending.push_back(ApiError::internal(m).body().to_string());
                self.pending.push_back("[DONE]".into());
                self.done = true;
            }
        }
    }

    /// A choice's parsed deltas as chunks. The event's logprobs ride on the first chunk (on an
    /// empty content delta where all of its text is held back).
    fn push_deltas(&mut self, ci: usize, deltas: Vec<Value>, mut logprobs: Value) {
        if deltas.is_empty() && !logprobs.is_null() {
            let c = self.chunk(ci, json!({"content": ""}), logprobs, None);
            self.pending.push_back(c);
            return;
        }
        for delta in deltas {
            let c = self.chunk(ci, delta, std::mem::take(&mut logprobs), None);
            self.pending.push_back(c);
        }
    }

    fn finish(&mut self) {
        if self.include_usage {
            let object = if self.chat { "chat.completion.chunk" } else { "text_completion" };
            let speculative = self.state.ready.get().is_some_and(|r| r.engine.speculative_block_size().is_some());
            let spec = spec_sums(speculative, self.accepted, self.rejected);
            let u = usage_json(self.prompt_lens.iter().sum(), self.completion_tokens, self.cached.iter().sum(), spec);
            let c = json!({"id": self.id, "object": object, "created": self.created, "model": self.model(), "choices": [], "usage": u});
            self.pending.push_back(c.to_string());
        }
        self.pending.push_back("[DONE]".into());
        self.done = true;
    }
}

fn sse(st: StreamState) -> Sse<impl futures::Stream<Item = Result<Event, Infallible>>> {
    Sse::new(chunks(st).map(|data| Ok(Event::default().data(data)))).keep_alive(KeepAlive::default())
}

/// One `data:` payload of a chat stream, as the routes that reshape it read it.
pub(crate) enum ChatChunk {
    /// `[DONE]`.
    Done,
    /// An error object (or a payload that is not JSON).
    Failed(ApiError),
    Chunk(Value),
}

pub(crate) fn read_chunk(data: &str) -> ChatChunk {
    if data == "[DONE]" {
        return ChatChunk::Done;
    }
    match serde_json::from_str::<Value>(data) {
        Ok(v) => match v.get("error") {
            Some(e) => ChatChunk::Failed(ApiError::internal(e["message"].as_str().unwrap_or("the request failed"))),
            None => ChatChunk::Chunk(v),
        },
        Err(_) => ChatChunk::Failed(ApiError::internal("the chat stream carried a malformed chunk")),
    }
}

/// A stream's `data:` payloads in order (JSON chunks, an error object, then `[DONE]`); dropping
/// it aborts the requests.
pub(crate) fn chunks(st: StreamState) -> impl futures::Stream<Item = String> + Send {
    stream::unfold(st, |mut st| async move {
        loop {
            if let Some(data) = st.pending.pop_front() {
                return Some((data, st));
            }
            if st.done {
                return None;
            }
            match st.merged.next().await {
                Some((ci, pi, ev)) => st.handle(ci, pi, ev),
                None => st.finish(),
            }
        }
    })
}

// ---------------------------------------------------------------------------------------------
// Tokenize / detokenize (vLLM shapes)
// ---------------------------------------------------------------------------------------------

#[derive(serde::Deserialize)]
struct TokenizeRequest {
    model: Option<String>,
    prompt: Option<String>,
    messages: Option<Value>,
    add_special_tokens: Option<bool>,
    add_generation_prompt: Option<bool>,
    continue_final_message: Option<bool>,
    tools: Option<Value>,
    chat_template_kwargs: Option<serde_json::Map<String, Value>>,
    /// vLLM's: each token's vocabulary string (`"Ġworld"`, not its decoded text) beside the ids.
    return_token_strs: Option<bool>,
}

/// What a /tokenize body asks for: the text to encode (a chat's rendered), whether special
/// tokens are added, and whether the tokens' strings come back.
struct Tokenize {
    text: String,
    add_special_tokens: bool,
    token_strs: bool,
}

fn read_tokenize(state: &AppState, body: &[u8]) -> Result<Tokenize, ApiError> {
    let r = state.ready()?;
    let req: TokenizeRequest = protocol::parse_body(body)?;
    check_model(r, &req.model)?;
    let token_strs = req.return_token_strs.unwrap_or(false);
    match (req.prompt, req.messages) {
        (Some(text), None) => Ok(Tokenize { text, add_special_tokens: req.add_special_tokens.unwrap_or(true), token_strs }),
        (None, Some(m)) => {
            let messages = protocol::chat_messages(&m)?;
            let t = r.template.as_ref().ok_or_else(|| ApiError::invalid("this model has no chat template"))?;
            let text = render_chat(t, &messages, req.tools.as_ref(), req.add_generation_prompt, req.continue_final_message, &req.chat_template_kwargs.unwrap_or_default())?;
            Ok(Tokenize { text, add_special_tokens: req.add_special_tokens.unwrap_or(false), token_strs })
        }
        _ => Err(ApiError::invalid("give exactly one of `prompt` or `messages`")),
    }
}

/// The tokens of a /tokenize body (a chat's rendered prompt): what `/v1/messages/count_tokens`
/// answers.
pub(crate) async fn count_chat_tokens(state: &AppState, body: Bytes) -> Result<usize, ApiError> {
    let r = state.ready()?;
    let t = read_request(state, body, read_tokenize).await?;
    Ok(encode(r.engine.tokenizer(), &t.text, t.add_special_tokens).await?.len())
}

async fn tokenize(State(state): State<AppState>, body: Result<Bytes, BytesRejection>) -> Result<Json<Value>, ApiError> {
    let body = body_bytes(body)?;
    let r = state.ready()?;
    let t = read_request(&state, body, read_tokenize).await?;
    let tok = r.engine.tokenizer();
    let tokens = encode(tok, &t.text, t.add_special_tokens).await?;
    // vLLM answers `token_strs: null` unless asked; an id the vocabulary has no string for
    // (none the encoder made) would be `null` in the list.
    let token_strs = t.token_strs.then(|| tokens.iter().map(|&id| tok.id_to_token(id)).collect::<Vec<_>>());
    Ok(Json(json!({"tokens": tokens, "count": tokens.len(), "max_model_len": r.engine.max_model_len(), "token_strs": token_strs})))
}

#[derive(serde::Deserialize)]
struct DetokenizeRequest {
    model: Option<String>,
    tokens: Vec<u32>,
}

async fn detokenize(State(state): State<AppState>, body: Result<Bytes, BytesRejection>) -> Result<Json<Value>, ApiError> {
    let body = body_bytes(body)?;
    let r = state.ready()?;
    let req: DetokenizeRequest = protocol::parse_body(&body)?;
    check_model(r, &req.model)?;
    let vocab = r.engine.spec().vocab_size;
    if let Some(t) = req.tokens.iter().find(|&&t| t as usize >= vocab) {
        return Err(ApiError::param("tokens", format!("token id {t} is outside the vocabulary ({vocab})")));
    }
    let text = r.engine.tokenizer().decode(&req.tokens, false).map_err(|e| ApiError::invalid(e.to_string()))?;
    Ok(Json(json!({"prompt": text})))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// An impossible token's logprob is written as vLLM's -9999, never as `null` (what
    /// serde_json makes of -inf); finite ones as they are.
    #[test]
    fn minus_infinity_logprobs_are_written_as_minus_9999() {
        assert_eq!(json!(f32::NEG_INFINITY), Value::Null, "why the clamp is needed");
        assert_eq!(serde_json::to_string(&logprob_json(f32::NEG_INFINITY)).unwrap(), "-9999.0");
        assert_eq!(logprob_json(-1.5), json!(-1.5));
        assert_eq!(logprob_json(0.0), json!(0.0));
    }

    /// A long body is read on the blocking pool, a short one on the runtime's thread, and a
    /// reader's error comes back as it was.
    #[tokio::test(flavor = "current_thread")]
    async fn long_bodies_are_read_off_the_runtime() {
        fn read(_: &AppState, body: &[u8]) -> Result<(std::thread::ThreadId, usize), ApiError> {
            let v: Value = protocol::parse_body(body)?;
            Ok((std::thread::current().id(), v["prompt"].as_str().map_or(0, str::len)))
        }
        let state = AppState::new(crate::state::Settings { api_key: None, always_include_usage: false, parse_tool_calls: false, parse_reasoning: false, access_log: false, seed: None });
        let runtime = std::thread::current().id();
        let body = |n: usize| Bytes::from(serde_json::to_vec(&json!({"prompt": "x".repeat(n)})).unwrap());
        let (thread, n) = read_request(&state, body(100), read).await.unwrap();
        assert_eq!((thread, n), (runtime, 100));
        let (thread, n) = read_request(&state, body(READ_INLINE_MAX_BYTES), read).await.unwrap();
        assert_ne!(thread, runtime, "the prompt's bytes and the JSON around them are over the limit");
        assert_eq!(n, READ_INLINE_MAX_BYTES);
        let mut bad = body(READ_INLINE_MAX_BYTES).to_vec();
        bad.push(b'}');
        let err = read_request(&state, Bytes::from(bad), read).await.unwrap_err();
        assert_eq!(err.status, StatusCode::BAD_REQUEST);
        assert!(err.message.contains("not valid JSON"), "{}", err.message);
    }

    /// A long prompt is tokenized without holding the runtime: on a one-thread runtime another
    /// task runs while it is encoded (inline, it could not run before the encode returned), and
    /// the ids are the tokenizer's.
    #[tokio::test(flavor = "current_thread")]
    async fn long_prompts_are_tokenized_off_the_runtime() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/peregrine-mimo-tiny/tokenizer.json");
        let tok: peregrine_engine::SharedTokenizer = Arc::new(peregrine_model::tokenizer::Tokenizer::from_file(&path).unwrap());
        let long: String = (0..20_000).map(|i| format!("value_{} ", i % 977)).collect();
        assert!(long.len() > ENCODE_INLINE_MAX_BYTES);
        let ticks = Arc::new(AtomicUsize::new(0));
        let t = ticks.clone();
        let ticker = tokio::spawn(async move {
            loop {
                t.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            }
        });
        let ids = encode(&tok, &long, false).await.unwrap();
        let ran = ticks.load(Ordering::SeqCst);
        ticker.abort();
        assert!(ran >= 1, "another task ran while the long prompt was tokenized");
        assert_eq!(ids, tok.encode(&long, false).unwrap());
        // A short one stays inline, with the same ids.
        assert_eq!(encode(&tok, "def f(x):", true).await.unwrap(), tok.encode("def f(x):", true).unwrap());
    }
}
