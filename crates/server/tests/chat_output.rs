//! Chat outputs parsed over HTTP: the router served in-process over a scripted backend whose
//! logits spell out a chosen reply (picked by the last key word in the prompt), so a reply
//! holding `<think>` reasoning or `<tool_call>` blocks comes back as OpenAI `reasoning_content` /
//! `tool_calls`, streamed and not; forced calls (`tool_choice` `required` or a named function)
//! are held to the calls' JSON and come back as `tool_calls`; malformed requests are refused up
//! front.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use peregrine_core::backend::{output_rows, Backend, KvBlockBytes, KvConfig, Logits, SeqForward};
use peregrine_core::{ModelSpec, Result};
use peregrine_engine::{start_engine, EngineConfig};
use peregrine_model::chat_template::ChatTemplate;
use peregrine_model::tokenizer::Tokenizer;
use peregrine_server::routes::router;
use peregrine_server::state::{AppState, Ready, Settings};
use serde_json::{json, Value};

const FIX: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/golden/default");

const WEATHER: &str = "I'll check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\", \"unit\": \"C\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"get_time\", \"arguments\": {}}\n</tool_call>";
const PLAIN: &str = "No tools needed: <tool> is not a call.";
/// Thinking, then a call (MiMo's thinking mode with tools).
const THINK: &str = "<think>\nThe user wants the time: call get_time.\n</think>\n\n<tool_call>\n{\"name\": \"get_time\", \"arguments\": {}}\n</tool_call>";
/// The rest of a thinking block the prompt opened, then the answer.
const OPENED: &str = "Short question, short answer.\n</think>\n\nIt is noon.";
/// A JSON object (for JSON mode: the output ends where it closes, before the script's EOS).
const JSON_REPLY: &str = "{\"city\": \"Paris\"}";
/// Thinking (braces and quotes in it are free), then the object.
const JSON_THINK: &str = "A city: {Paris} \"quoted\".\n</think>\n\n{\"city\": \"Paris\"}";
/// A forced call's arguments (`tool_choice` naming get_weather).
const FORCED: &str = "{\"city\": \"Paris\", \"unit\": \"C\"}";
/// `tool_choice: required`'s list of calls.
const REQUIRED: &str = "[{\"name\": \"get_time\", \"parameters\": {}}, {\"name\": \"get_weather\", \"parameters\": {\"city\": \"Paris\"}}]";
/// MiMo's own form (XML), with a parameter the tool declares as an integer.
const XML: &str = "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n<parameter=days>\n3\n</parameter>\n</function>\n</tool_call>";

/// Replies with the script whose key the prompt contains, token by token, then EOS.
struct Scripted {
    spec: ModelSpec,
    tokenizer: Arc<Tokenizer>,
    scripts: Vec<(&'static str, Vec<u32>)>,
    /// Per sequence: its script and prompt length.
    seqs: HashMap<u64, (usize, usize)>,
}

impl Backend for Scripted {
    fn spec(&self) -> &ModelSpec {
        &self.spec
    }
    fn kv_block_bytes(&self, _block_size: usize) -> KvBlockBytes {
        KvBlockBytes { full: 64, swa: 64 }
    }
    fn init_kv(&mut self, _config: KvConfig) -> Result<()> {
        Ok(())
    }
    fn forward(&mut self, batch: &[SeqForward]) -> Result<Vec<Logits>> {
        let vocab = self.spec.vocab_size;
        let (_, counts) = output_rows(batch);
        let mut out = Vec::new();
        for (s, &rows) in batch.iter().zip(&counts) {
            if s.start_pos == 0 {
                let prompt = self.tokenizer.decode(&s.tokens, false).unwrap();
                // The key named last (the latest user turn) picks the reply.
                let script = (0..self.scripts.len())
                    .filter_map(|i| prompt.rfind(self.scripts[i].0).map(|at| (at, i)))
                    .max()
                    .expect("a prompt naming a script")
                    .1;
                self.seqs.insert(s.seq_id, (script, s.tokens.len()));
            }
            let (script, prompt_len) = self.seqs[&s.seq_id];
            let end = s.start_pos + s.tokens.len();
            let mut data = vec![0f32; rows * vocab];
            for r in 0..rows {
                // Row r is the logits after position end - rows + r: the reply's next token.
                let produced = end - rows + r + 1 - prompt_len;
                let next = self.scripts[script].1.get(produced).copied().unwrap_or(self.spec.eos_token_ids[0]);
                data[r * vocab + next as usize] = 10.0;
            }
            out.push(Logits { rows, data });
        }
        Ok(out)
    }
    fn name(&self) -> &str {
        "scripted"
    }
}

struct Harness {
    base: String,
    client: reqwest::Client,
    engine: peregrine_engine::EngineHandle,
}

impl Harness {
    /// `parse`: the server's `--tool-call-parser` and `--reasoning-parser` (`auto` or `none`).
    async fn start(parse: bool) -> Harness {
        let spec = peregrine_model::config::load_spec(Path::new(FIX)).unwrap();
        let tokenizer = Arc::new(Tokenizer::from_file(&Path::new(FIX).join("tokenizer.json")).unwrap());
        let scripts: Vec<(&'static str, Vec<u32>)> =
            [("ask-weather", WEATHER), ("ask-plain", PLAIN), ("ask-xml", XML), ("ask-think", THINK), ("ask-opened", OPENED), ("ask-json", JSON_REPLY), ("ask-json-think", JSON_THINK), ("ask-forced", FORCED), ("ask-required", REQUIRED)].iter().map(|&(k, t)| (k, tokenizer.encode(t, false).unwrap())).collect();
        for ((key, ids), text) in scripts.iter().zip([WEATHER, PLAIN, XML, THINK, OPENED, JSON_REPLY, JSON_THINK]) {
            assert_eq!(tokenizer.decode(ids, false).unwrap(), text, "the fixture tokenizer must round-trip the {key} script");
        }
        let backend = Scripted { spec, tokenizer: tokenizer.clone(), scripts, seqs: HashMap::new() };
        let config = EngineConfig { max_model_len: 1024, kv_cache_memory_bytes: 1 << 20, enable_prefix_caching: false, ..EngineConfig::default() };
        let engine = start_engine(Box::new(backend), tokenizer, config).unwrap();
        let template = ChatTemplate::new(
            concat!(
                "{% if tools %}tools:{% for t in tools %} {{ t.function.name }}{% endfor %}\n{% endif %}",
                "{% if reasoning_effort %}effort: {{ reasoning_effort }}\n{% endif %}",
                "{% for d in documents or [] %}document: {{ d.title }}\n{% endfor %}",
                "{% for m in messages %}{{ m.role }}: {{ m.content }}",
                // History calls listed as MiMo's XML template does: arguments must be an object.
                "{% for c in m.tool_calls or [] %}<function={{ c.function.name }}>{% for k, v in c.function.arguments|items %}",
                "<parameter={{ k }}>{{ v }}</parameter>{% endfor %}</function>{% endfor %}\n{% endfor %}",
                "assistant:{% if enable_thinking %}<think>\n{% endif %}"
            ),
            None,
            None,
        )
        .unwrap();
        let state = AppState::new(Settings { api_key: None, always_include_usage: false, parse_tool_calls: parse, parse_reasoning: parse, access_log: false, seed: None });
        assert!(state.ready.set(Ready { engine: engine.clone(), template: Some(template), model_name: "scripted".into(), created: 0, sampling_defaults: Default::default() }).is_ok());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, router(state, 1 << 20)).await });
        Harness { base, client: reqwest::Client::new(), engine }
    }

    async fn chat(&self, body: Value) -> (u16, Value) {
        let r = self.client.post(format!("{}/v1/chat/completions", self.base)).json(&body).send().await.unwrap();
        let status = r.status().as_u16();
        let text = r.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON ({status}): {text}")))
    }

    /// One choice's reply, streamed (its chunks gathered) or whole: (reasoning, content, tool
    /// calls, finish reason), absent text as "".
    async fn reply(&self, mut body: Value, stream: bool) -> (String, String, Vec<Value>, Value) {
        body["stream"] = json!(stream);
        if stream {
            return gather(&self.chat_stream(body).await);
        }
        let (status, v) = self.chat(body).await;
        assert_eq!(status, 200, "{v}");
        let m = &v["choices"][0]["message"];
        let text = |f: &str| m[f].as_str().unwrap_or_default().to_owned();
        (text("reasoning_content"), text("content"), m["tool_calls"].as_array().cloned().unwrap_or_default(), v["choices"][0]["finish_reason"].clone())
    }

    /// The stream's chunks (the data lines before `[DONE]`).
    async fn chat_stream(&self, body: Value) -> Vec<Value> {
        let r = self.client.post(format!("{}/v1/chat/completions", self.base)).json(&body).send().await.unwrap();
        assert_eq!(r.status().as_u16(), 200);
        let text = r.text().await.unwrap();
        let data: Vec<&str> = text.lines().filter_map(|l| l.strip_prefix("data: ")).collect();
        assert_eq!(data.last(), Some(&"[DONE]"), "{text}");
        data[..data.len() - 1].iter().map(|d| serde_json::from_str(d).unwrap()).collect()
    }
}

fn tools() -> Value {
    json!([
        {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"type": "string"}, "days": {"type": "integer"}}}}},
        {"type": "function", "function": {"name": "get_time"}}
    ])
}

fn request(word: &str, extra: Value) -> Value {
    let mut body = json!({"messages": [{"role": "user", "content": format!("{word}, please")}], "temperature": 0, "max_tokens": 400});
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

/// The two calls of the weather script, as OpenAI tool calls.
fn assert_weather_calls(calls: &[Value]) {
    assert_eq!(calls.len(), 2, "{calls:?}");
    for c in calls {
        assert_eq!(c["type"], "function");
        let id = c["id"].as_str().unwrap();
        assert!(id.starts_with("call_") && id.len() > 10, "{id}");
    }
    assert_ne!(calls[0]["id"], calls[1]["id"]);
    assert_eq!(calls[0]["function"]["name"], "get_weather");
    let args: Value = serde_json::from_str(calls[0]["function"]["arguments"].as_str().unwrap()).unwrap();
    assert_eq!(args, json!({"city": "Paris", "unit": "C"}));
    assert_eq!(calls[1]["function"]["name"], "get_time");
    assert_eq!(calls[1]["function"]["arguments"], "{}");
}

#[tokio::test]
async fn tool_calls_come_back_parsed_streamed_or_not() {
    let h = Harness::start(true).await;

    // Not streamed: the text before the calls is the content, the calls are tool_calls.
    let (status, v) = h.chat(request("ask-weather", json!({"tools": tools()}))).await;
    assert_eq!(status, 200, "{v}");
    let choice = &v["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls", "{v}");
    assert_eq!(choice["message"]["role"], "assistant");
    assert_eq!(choice["message"]["content"], "I'll check.\n\n", "{v}");
    assert_weather_calls(choice["message"]["tool_calls"].as_array().unwrap());
    assert_eq!(v["usage"]["completion_tokens"].as_u64().unwrap() as usize, {
        let t = Tokenizer::from_file(&Path::new(FIX).join("tokenizer.json")).unwrap();
        t.encode(WEATHER, false).unwrap().len() + 1
    });

    // Streamed: the same content in content deltas, each call as one tool_calls delta with its
    // index, and the finish reason on the last choice chunk.
    let chunks = h.chat_stream(request("ask-weather", json!({"tools": tools(), "stream": true}))).await;
    let mut content = String::new();
    let mut calls = Vec::new();
    let mut finishes = Vec::new();
    for c in &chunks {
        let choice = &c["choices"][0];
        if let Some(t) = choice["delta"]["content"].as_str() {
            assert!(!t.contains("<tool_call"), "a tag leaked into the content: {c}");
            content.push_str(t);
        }
        if let Some(list) = choice["delta"]["tool_calls"].as_array() {
            for call in list {
                assert_eq!(call["index"].as_u64().unwrap() as usize, calls.len(), "{c}");
                calls.push(call.clone());
            }
        }
        if !choice["finish_reason"].is_null() {
            finishes.push(choice["finish_reason"].clone());
        }
    }
    assert_eq!(content, "I'll check.\n\n");
    assert_weather_calls(&calls);
    assert_eq!(finishes, vec![json!("tool_calls")]);
    assert_eq!(chunks.last().unwrap()["choices"][0]["finish_reason"], "tool_calls");

    // MiMo's XML form, its integer parameter read as a number (the request's declaration).
    for stream in [false, true] {
        let body = request("ask-xml", json!({"tools": tools(), "stream": stream}));
        let (calls, finish) = if stream {
            let chunks = h.chat_stream(body).await;
            let calls: Vec<Value> = chunks.iter().filter_map(|c| c["choices"][0]["delta"]["tool_calls"].as_array().cloned()).flatten().collect();
            (calls, chunks.last().unwrap()["choices"][0]["finish_reason"].clone())
        } else {
            let (_, v) = h.chat(body).await;
            assert_eq!(v["choices"][0]["message"]["content"], Value::Null, "{v}");
            (v["choices"][0]["message"]["tool_calls"].as_array().unwrap().clone(), v["choices"][0]["finish_reason"].clone())
        };
        assert_eq!(finish, "tool_calls");
        assert_eq!(calls.len(), 1, "{calls:?}");
        assert_eq!(calls[0]["function"]["name"], "get_weather");
        assert_eq!(calls[0]["function"]["arguments"], r#"{"city":"Paris","days":3}"#);
    }

    // tool_choice none, no tools, or a reply without calls: the text as written, finish stop.
    for body in [
        request("ask-weather", json!({"tools": tools(), "tool_choice": "none"})),
        request("ask-weather", json!({})),
        request("ask-weather", json!({"tool_choice": "auto"})),
    ] {
        let (status, v) = h.chat(body.clone()).await;
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["choices"][0]["message"]["content"], WEATHER, "{body}");
        assert!(v["choices"][0]["message"].get("tool_calls").is_none(), "{v}");
        assert_eq!(v["choices"][0]["finish_reason"], "stop");
    }
    let (_, v) = h.chat(request("ask-plain", json!({"tools": tools()}))).await;
    assert_eq!(v["choices"][0]["message"]["content"], PLAIN);
    assert!(v["choices"][0]["message"].get("tool_calls").is_none(), "{v}");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    let chunks = h.chat_stream(request("ask-plain", json!({"tools": tools(), "stream": true}))).await;
    let streamed: String = chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
    assert_eq!(streamed, PLAIN);

    // Cut inside the first call by max_tokens: no call, nothing lost, finish length.
    let t = Tokenizer::from_file(&Path::new(FIX).join("tokenizer.json")).unwrap();
    let ids = t.encode(WEATHER, false).unwrap();
    let cut = (1..ids.len()).find(|&n| t.decode(&ids[..n], false).unwrap().contains("\"city\"")).unwrap();
    let (_, v) = h.chat(request("ask-weather", json!({"tools": tools(), "max_tokens": cut}))).await;
    let partial = t.decode(&ids[..cut], false).unwrap();
    assert!(partial.contains("<tool_call>") && !partial.contains("</tool_call>"), "the cut must fall inside the first call: {partial:?}");
    assert_eq!(v["choices"][0]["message"]["content"], partial.as_str(), "{v}");
    assert!(v["choices"][0]["message"].get("tool_calls").is_none(), "{v}");
    assert_eq!(v["choices"][0]["finish_reason"], "length");

    // n = 2, streamed: each choice parses its own calls.
    let chunks = h.chat_stream(request("ask-weather", json!({"tools": tools(), "stream": true, "n": 2}))).await;
    for i in 0..2 {
        let calls: Vec<Value> = chunks
            .iter()
            .filter(|c| c["choices"][0]["index"] == i)
            .filter_map(|c| c["choices"][0]["delta"]["tool_calls"].as_array().cloned())
            .flatten()
            .collect();
        assert_weather_calls(&calls);
    }

    let e = h.engine.clone();
    tokio::task::spawn_blocking(move || e.shutdown()).await.unwrap();
}

/// The OpenAI Python SDK (strict response validation) reads the calls and the reasoning,
/// streamed and not, and sends the calls back as history. Needs the repository's `.venv` with `openai` (scripts/test.sh
/// prepares it); skips with a message when it is absent.
#[tokio::test]
async fn the_openai_sdk_reads_the_tool_calls() {
    sdk_script_on_the_scripted_server("test_chat_output_sdk.py").await;
}

/// The Responses API (/v1/responses) through the OpenAI Python SDK (strict validation): text,
/// a cut by max_output_tokens, function calls and their outputs sent back as items, reasoning
/// items, typed stream events, structured outputs, and refusals naming their field. Skips like
/// the test above without the `.venv`.
#[tokio::test]
async fn the_openai_sdk_reads_responses() {
    sdk_script_on_the_scripted_server("test_responses_sdk.py").await;
}

/// Anthropic's Messages API (/v1/messages) through the anthropic Python SDK (strict
/// validation): text, stop sequences, the length limit, tool use and results sent back, thinking
/// blocks, the stream helper, count_tokens, and errors in Anthropic's shape.
#[tokio::test]
async fn the_anthropic_sdk_reads_messages() {
    sdk_script_on_the_scripted_server("test_anthropic_sdk.py").await;
}

/// Runs tests/sdk/`script` against a scripted server with the output parsers on (the script
/// gets the server's base URL; OpenAI's clients add /v1 to it).
async fn sdk_script_on_the_scripted_server(script: &str) {
    let module = if script.contains("anthropic") { "anthropic" } else { "openai" };
    if !common::python_has(module) {
        eprintln!("skipped: .venv with the {module} SDK not found (run scripts/test.sh)");
        return;
    }
    let h = Harness::start(true).await;
    let base = if script.contains("anthropic") { h.base.clone() } else { format!("{}/v1", h.base) };
    common::run_sdk_script(script, &base).await;
    let e = h.engine.clone();
    tokio::task::spawn_blocking(move || e.shutdown()).await.unwrap();
}

/// Streamed chunks of one choice gathered per field: (reasoning, content, tool calls, finish).
fn gather(chunks: &[Value]) -> (String, String, Vec<Value>, Value) {
    let (mut reasoning, mut content, mut calls, mut finish) = (String::new(), String::new(), Vec::new(), Value::Null);
    for c in chunks {
        let choice = &c["choices"][0];
        reasoning.push_str(choice["delta"]["reasoning_content"].as_str().unwrap_or(""));
        content.push_str(choice["delta"]["content"].as_str().unwrap_or(""));
        calls.extend(choice["delta"]["tool_calls"].as_array().cloned().unwrap_or_default());
        if !choice["finish_reason"].is_null() {
            finish = choice["finish_reason"].clone();
        }
    }
    (reasoning, content, calls, finish)
}

#[tokio::test]
async fn reasoning_is_split_from_the_answer() {
    let h = Harness::start(true).await;

    // Thinking, then a tool call: reasoning_content beside tool_calls, streamed or not.
    let (_, v) = h.chat(request("ask-think", json!({"tools": tools()}))).await;
    let m = &v["choices"][0]["message"];
    assert_eq!(m["reasoning_content"], "\nThe user wants the time: call get_time.\n", "{v}");
    assert_eq!(m["content"], Value::Null, "{v}");
    assert_eq!(m["tool_calls"][0]["function"]["name"], "get_time", "{v}");
    assert_eq!(v["choices"][0]["finish_reason"], "tool_calls");
    let (reasoning, content, calls, finish) = gather(&h.chat_stream(request("ask-think", json!({"tools": tools(), "stream": true}))).await);
    assert_eq!(reasoning, "\nThe user wants the time: call get_time.\n");
    assert_eq!(content, "");
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0]["function"]["name"], "get_time");
    assert_eq!(finish, "tool_calls");

    // Without tools the call stays in the answer's text; the reasoning is still split off.
    let (_, v) = h.chat(request("ask-think", json!({}))).await;
    let m = &v["choices"][0]["message"];
    assert!(m["reasoning_content"].as_str().unwrap().contains("get_time"), "{v}");
    assert!(m["content"].as_str().unwrap().starts_with("<tool_call>"), "{v}");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");

    // The template opened the block (enable_thinking): the reply starts inside it.
    let kwargs = json!({"chat_template_kwargs": {"enable_thinking": true}});
    let (_, v) = h.chat(request("ask-opened", kwargs.clone())).await;
    let m = &v["choices"][0]["message"];
    assert_eq!(m["reasoning_content"], "Short question, short answer.\n", "{v}");
    assert_eq!(m["content"], "It is noon.", "{v}");
    let mut streamed = kwargs.clone();
    streamed["stream"] = json!(true);
    let (reasoning, content, calls, finish) = gather(&h.chat_stream(request("ask-opened", streamed)).await);
    assert_eq!((reasoning.as_str(), content.as_str(), calls.len(), finish), ("Short question, short answer.\n", "It is noon.", 0, json!("stop")));

    // JSON mode where the prompt opened a thinking block: free thinking, then the object, which
    // ends the reply (before the script's EOS); without the block, the object at once.
    let mut json_kw = kwargs.clone();
    json_kw["response_format"] = json!({"type": "json_object"});
    for stream in [false, true] {
        let mut body = request("ask-json-think", json_kw.clone());
        body["stream"] = json!(stream);
        let (reasoning, content, finish) = if stream {
            let (r, c, _, f) = gather(&h.chat_stream(body).await);
            (json!(r), c, f)
        } else {
            let (_, v) = h.chat(body).await;
            let m = &v["choices"][0]["message"];
            (m["reasoning_content"].clone(), m["content"].as_str().unwrap().to_owned(), v["choices"][0]["finish_reason"].clone())
        };
        assert_eq!(reasoning, "A city: {Paris} \"quoted\".\n", "stream {stream}");
        assert_eq!(content, JSON_REPLY, "stream {stream}");
        assert_eq!(finish, "stop");
    }
    let (_, v) = h.chat(request("ask-json", json!({"response_format": {"type": "json_object"}}))).await;
    let m = &v["choices"][0]["message"];
    assert_eq!(m["content"], JSON_REPLY, "{v}");
    assert!(m.get("reasoning_content").is_none(), "{v}");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");

    // Not opened by the prompt and not opening with <think>: all content, no reasoning field.
    let (_, v) = h.chat(request("ask-opened", json!({}))).await;
    assert_eq!(v["choices"][0]["message"]["content"], OPENED, "{v}");
    assert!(v["choices"][0]["message"].get("reasoning_content").is_none(), "{v}");

    // Cut by max_tokens inside the thinking: what there is is reasoning, the answer empty.
    let (_, v) = h.chat(request("ask-think", json!({"max_tokens": 10}))).await;
    let m = &v["choices"][0]["message"];
    assert!(!m["reasoning_content"].as_str().unwrap().is_empty(), "{v}");
    assert_eq!(m["content"], "", "{v}");
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    let e = h.engine.clone();
    tokio::task::spawn_blocking(move || e.shutdown()).await.unwrap();
}

/// `include_reasoning: false` (vLLM's) leaves the reasoning out, streamed or not, while the
/// answer stays clean of it; `reasoning_effort` and `documents` reach the template as its
/// variables of those names.
#[tokio::test]
async fn include_reasoning_false_and_template_variables() {
    let h = Harness::start(true).await;
    for stream in [false, true] {
        let body = request("ask-think", json!({"tools": tools(), "include_reasoning": false}));
        let (reasoning, content, calls, _) = h.reply(body, stream).await;
        assert_eq!(reasoning, "", "stream {stream}");
        assert!(!content.contains("wants the time"), "stream {stream}: the reasoning reached the content: {content:?}");
        assert_eq!(calls.len(), 1, "stream {stream}: {calls:?}");
        assert_eq!(calls[0]["function"]["name"], "get_time");
    }
    let prompt_tokens = |v: &Value| v["usage"]["prompt_tokens"].as_u64().unwrap_or_else(|| panic!("{v}"));
    let (_, base) = h.chat(request("ask-plain", json!({}))).await;
    let (_, effort) = h.chat(request("ask-plain", json!({"reasoning_effort": "high"}))).await;
    let (_, docs) = h.chat(request("ask-plain", json!({"documents": [{"title": "Paris weather", "text": "sunny"}]}))).await;
    assert!(prompt_tokens(&effort) > prompt_tokens(&base), "{effort} against {base}");
    assert!(prompt_tokens(&docs) > prompt_tokens(&base), "{docs} against {base}");
    // The field wins over the same name in the kwargs.
    let (_, both) = h.chat(request("ask-plain", json!({"reasoning_effort": "high", "chat_template_kwargs": {"reasoning_effort": "a much longer effort than high"}}))).await;
    assert_eq!(prompt_tokens(&both), prompt_tokens(&effort), "{both}");
    let e = h.engine.clone();
    tokio::task::spawn_blocking(move || e.shutdown()).await.unwrap();
}

#[tokio::test]
async fn with_the_parsers_off_replies_stay_text() {
    let h = Harness::start(false).await;
    for (key, text) in [("ask-weather", WEATHER), ("ask-think", THINK)] {
        let (status, v) = h.chat(request(key, json!({"tools": tools()}))).await;
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["choices"][0]["message"]["content"], text);
        assert!(v["choices"][0]["message"].get("tool_calls").is_none(), "{v}");
        assert!(v["choices"][0]["message"].get("reasoning_content").is_none(), "{v}");
        assert_eq!(v["choices"][0]["finish_reason"], "stop");
    }
    // A forced call is the calls' JSON, whatever the model's own syntax: read back without the parser.
    let (status, v) = h.chat(request("ask-required", json!({"tools": tools(), "tool_choice": "required"}))).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["choices"][0]["message"]["tool_calls"].as_array().map(Vec::len), Some(2), "{v}");
    // Where the prompt opened a thinking block the model thinks before the call: the thinking
    // stays content (no parser splits it off), the call still comes back as one.
    for stream in [false, true] {
        let mut body = request("ask-json-think", json!({"tools": tools(), "tool_choice": {"type": "function", "function": {"name": "get_weather"}}, "chat_template_kwargs": {"enable_thinking": true}}));
        body["stream"] = json!(stream);
        let (content, calls) = if stream {
            let (_, c, calls, _) = gather(&h.chat_stream(body).await);
            (c, calls)
        } else {
            let (_, v) = h.chat(body).await;
            let m = &v["choices"][0]["message"];
            (m["content"].as_str().unwrap_or_default().to_owned(), m["tool_calls"].as_array().cloned().unwrap_or_default())
        };
        assert_eq!(content, "A city: {Paris} \"quoted\".\n</think>", "stream {stream}");
        assert_eq!(calls.len(), 1, "stream {stream}: {calls:?}");
        assert_eq!(serde_json::from_str::<Value>(calls[0]["function"]["arguments"].as_str().unwrap()).unwrap(), json!({"city": "Paris"}));
    }
    let e = h.engine.clone();
    tokio::task::spawn_blocking(move || e.shutdown()).await.unwrap();
}

#[tokio::test]
async fn requests_the_server_cannot_honour_are_refused() {
    let h = Harness::start(true).await;
    let cases = [
        (json!({"tool_choice": "required"}), "tool_choice", "needs `tools`"),
        (json!({"tools": tools(), "tool_choice": {"type": "function", "function": {"name": "get_date"}}}), "tool_choice", "`get_date`, which is not among"),
        (json!({"tools": tools(), "tool_choice": {"type": "function", "function": {}}}), "tool_choice", "name` is required"),
        (json!({"tools": tools(), "tool_choice": "required", "response_format": {"type": "json_object"}}), "tool_choice", "cannot be combined"),
        (json!({"tools": tools(), "tool_choice": "sometimes"}), "tool_choice", "sometimes"),
        (json!({"tools": tools(), "tool_choice": 3}), "tool_choice", "must be"),
        (json!({"tools": {"type": "function"}}), "tools", "must be a list"),
        (json!({"tools": [{"type": "retrieval"}]}), "tools", "tools[0].type"),
        (json!({"tools": [{"type": "function", "function": {"description": "no name"}}]}), "tools", "tools[0].function.name"),
        (json!({"tools": [{"type": "function", "function": {"name": "f", "parameters": "x"}}]}), "tools", "parameters"),
        (json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": 3}}}), "response_format", "json_schema.schema"),
        (json!({"response_format": {"type": "yaml"}}), "response_format", "yaml"),
        (json!({"response_format": "json"}), "response_format", "must be an object"),
    ];
    for (extra, param, words) in cases {
        let (status, v) = h.chat(request("ask-weather", extra.clone())).await;
        assert_eq!(status, 400, "{extra}: {v}");
        assert_eq!(v["error"]["param"], param, "{extra}: {v}");
        assert!(v["error"]["message"].as_str().unwrap().contains(words), "{extra}: {v}");
    }
    // A history turn's calls reach the template with their arguments as objects (its loop over
    // them would fail on the wire's JSON strings); arguments that are not an object stay as sent.
    let history = json!({"messages": [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": null, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C"},
        {"role": "user", "content": "ask-plain"}], "tools": tools(), "max_tokens": 400, "temperature": 0});
    let (status, v) = h.chat(history.clone()).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["choices"][0]["message"]["content"], PLAIN);
    let mut bad = history;
    bad["messages"][1]["tool_calls"][0]["function"]["arguments"] = json!("not json");
    let (status, v) = h.chat(bad).await;
    assert_eq!((status, v["error"]["param"].as_str()), (400, Some("messages")), "{v}");
    // Plain text output is what every reply is: accepted.
    let (status, v) = h.chat(request("ask-plain", json!({"response_format": {"type": "text"}}))).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["choices"][0]["message"]["content"], PLAIN);
    let e = h.engine.clone();
    tokio::task::spawn_blocking(move || e.shutdown()).await.unwrap();
}

/// `parallel_tool_calls: false` (OpenAI's): one call at most, streamed or not; a forced
/// `required` list is held to one item by its guide (the script's second item is never
/// generated, not only dropped).
#[tokio::test]
async fn parallel_tool_calls_false_gives_one_call() {
    let h = Harness::start(true).await;
    let mut contents = Vec::new();
    for stream in [false, true] {
        for (word, choice) in [("ask-weather", json!("auto")), ("ask-required", json!("required"))] {
            let body = request(word, json!({"tools": tools(), "tool_choice": choice, "parallel_tool_calls": false}));
            let (_, content, calls, finish) = h.reply(body, stream).await;
            assert_eq!((calls.len(), &finish), (1, &json!("tool_calls")), "{word}, stream {stream}: {calls:?} {content}");
            let args: Value = serde_json::from_str(calls[0]["function"]["arguments"].as_str().unwrap()).unwrap();
            let first = if word == "ask-weather" { ("get_weather", json!({"city": "Paris", "unit": "C"})) } else { ("get_time", json!({})) };
            assert_eq!((calls[0]["function"]["name"].as_str().unwrap(), args), first, "{word}, stream {stream}");
            if word == "ask-weather" {
                contents.push(content);
            }
        }
    }
    assert_eq!(contents[0], contents[1], "streamed content differs");
    assert!(contents[0].starts_with("I'll check."), "{contents:?}");
    let tokens = |v: &Value| v["usage"]["completion_tokens"].as_u64().unwrap_or_else(|| panic!("{v}"));
    let (_, both) = h.chat(request("ask-required", json!({"tools": tools(), "tool_choice": "required"}))).await;
    let (_, one) = h.chat(request("ask-required", json!({"tools": tools(), "tool_choice": "required", "parallel_tool_calls": false}))).await;
    assert!(tokens(&one) < tokens(&both), "the guide let a second item be generated: {one} against {both}");
    let e = h.engine.clone();
    tokio::task::spawn_blocking(move || e.shutdown()).await.unwrap();
}

#[tokio::test]
async fn forced_tool_calls_come_back_as_tool_calls() {
    let h = Harness::start(true).await;
    let named = json!({"tools": tools(), "tool_choice": {"type": "function", "function": {"name": "get_weather"}}});
    for stream in [false, true] {
        // A named function: the reply is its arguments object, returned as that function's call.
        let mut body = request("ask-forced", named.clone());
        body["stream"] = json!(stream);
        let (content, calls, finish) = if stream {
            let (_, c, calls, f) = gather(&h.chat_stream(body).await);
            (json!(c), calls, f)
        } else {
            let (_, v) = h.chat(body).await;
            let m = &v["choices"][0]["message"];
            (m["content"].clone(), m["tool_calls"].as_array().cloned().unwrap_or_default(), v["choices"][0]["finish_reason"].clone())
        };
        assert!(content.is_null() || content == "", "stream {stream}: {content}");
        assert_eq!(calls.len(), 1, "stream {stream}: {calls:?}");
        assert_eq!(calls[0]["function"]["name"], "get_weather");
        let args: Value = serde_json::from_str(calls[0]["function"]["arguments"].as_str().unwrap()).unwrap();
        assert_eq!(args, json!({"city": "Paris", "unit": "C"}));
        // OpenAI and vLLM end a named call `stop` (the caller asked for it), `required` and
        // `auto` calls `tool_calls`.
        assert_eq!(finish, "stop", "stream {stream}");

        // `required`: a list of calls, each its tool's name and arguments.
        let mut body = request("ask-required", json!({"tools": tools(), "tool_choice": "required"}));
        body["stream"] = json!(stream);
        let (calls, finish) = if stream {
            let (_, _, calls, finish) = gather(&h.chat_stream(body).await);
            (calls, finish)
        } else {
            let (_, v) = h.chat(body).await;
            (v["choices"][0]["message"]["tool_calls"].as_array().cloned().unwrap_or_default(), v["choices"][0]["finish_reason"].clone())
        };
        let got: Vec<(Value, Value)> = calls.iter().map(|c| (c["function"]["name"].clone(), serde_json::from_str(c["function"]["arguments"].as_str().unwrap()).unwrap())).collect();
        assert_eq!(got, [(json!("get_time"), json!({})), (json!("get_weather"), json!({"city": "Paris"}))], "stream {stream}");
        assert_eq!(finish, "tool_calls", "stream {stream}");
    }
    // The model's own syntax does not get through: the weather script's `<tool_call>` tags are
    // refused, so the reply is the calls' JSON (whole, or cut by max_tokens and left as content).
    let (status, v) = h.chat(request("ask-weather", json!({"tools": tools(), "tool_choice": "required", "max_tokens": 60}))).await;
    assert_eq!(status, 200, "{v}");
    let m = &v["choices"][0]["message"];
    match v["choices"][0]["finish_reason"].as_str().unwrap() {
        "tool_calls" => assert!(!m["tool_calls"].as_array().unwrap().is_empty(), "{v}"),
        "length" => assert!(m["content"].as_str().unwrap().trim_start().starts_with('['), "{v}"),
        other => panic!("finish_reason {other}: {v}"),
    }
    assert!(!v.to_string().contains("<tool_call>"), "{v}");
    // Where the prompt opened a thinking block: the thinking first, then the call.
    let mut body = request("ask-json-think", named.clone());
    body["chat_template_kwargs"] = json!({"enable_thinking": true});
    let (_, v) = h.chat(body).await;
    let m = &v["choices"][0]["message"];
    assert_eq!(m["reasoning_content"], "A city: {Paris} \"quoted\".\n", "{v}");
    assert_eq!(m["tool_calls"][0]["function"]["name"], "get_weather", "{v}");
    assert_eq!(serde_json::from_str::<Value>(m["tool_calls"][0]["function"]["arguments"].as_str().unwrap()).unwrap(), json!({"city": "Paris"}));
    let e = h.engine.clone();
    tokio::task::spawn_blocking(move || e.shutdown()).await.unwrap();
}
