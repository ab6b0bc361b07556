//! End-to-end over real HTTP against a spawned `peregrine serve` (CPU backend, embedded model).

mod common;

use common::Server;
use futures::StreamExt;
use serde_json::{json, Value};

fn chat_body(extra: Value) -> Value {
    let mut b = json!({"messages": [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "def fib(n):"}]});
    b.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
    b
}

fn text_of(v: &Value, i: usize) -> String {
    let c = &v["choices"][i];
    c["message"]["content"].as_str().or(c["text"].as_str()).unwrap().to_owned()
}

#[tokio::test]
async fn chat_and_completions_end_to_end() {
    let s = Server::start(&[]).await;

    // Models.
    let m: Value = s.client.get(s.url("/v1/models")).send().await.unwrap().json().await.unwrap();
    let model = m["data"][0]["id"].as_str().unwrap().to_owned();
    assert_eq!(m["object"], "list");
    // Retrieve one model by its id, its slashes sent as they are or percent-encoded (this id is
    // a path with `..` segments, which the client would fold, so encoded here); an unknown one
    // is a 404.
    let one: Value = s.client.get(s.url(&format!("/v1/models/{}", model.replace('/', "%2F")))).send().await.unwrap().json().await.unwrap();
    assert_eq!(one, m["data"][0]);
    let r = s.client.get(s.url("/v1/models/nope")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["error"]["code"], "model_not_found", "{e}");
    let v: Value = s.client.get(s.url("/version")).send().await.unwrap().json().await.unwrap();
    assert_eq!(v["version"], env!("CARGO_PKG_VERSION"));

    // Non-streaming chat, greedy: usage is exact (prompt = the /tokenize count of the same messages).
    let (st, v) = s.post("/v1/chat/completions", chat_body(json!({"model": model, "temperature": 0, "max_tokens": 12, "ignore_eos": true}))).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(v["usage"]["completion_tokens"], 12);
    let (_, t) = s.post("/tokenize", json!({"messages": chat_body(json!({}))["messages"]})).await;
    assert_eq!(v["usage"]["prompt_tokens"], t["count"]);
    assert_eq!(v["usage"]["total_tokens"].as_u64().unwrap(), t["count"].as_u64().unwrap() + 12);
    let greedy = text_of(&v, 0);

    // Greedy is deterministic, and the stream carries the same text.
    let (_, v2) = s.post("/v1/chat/completions", chat_body(json!({"temperature": 0, "max_tokens": 12, "ignore_eos": true}))).await;
    assert_eq!(text_of(&v2, 0), greedy);
    let events = s.stream("/v1/chat/completions", chat_body(json!({"temperature": 0, "max_tokens": 12, "ignore_eos": true, "stream": true, "stream_options": {"include_usage": true}}))).await;
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1].iter().map(|e| serde_json::from_str(e).unwrap()).collect();
    assert_eq!(chunks[0]["choices"][0]["delta"], json!({"role": "assistant", "content": ""}));
    let usage = chunks.last().unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["completion_tokens"], 12);
    let finish = &chunks[chunks.len() - 2]["choices"][0];
    assert_eq!(finish["finish_reason"], "length");
    assert_eq!(finish["delta"], json!({}));
    let streamed: String = chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
    assert_eq!(streamed, greedy);

    // Seeds: same seed, same output; sampling at temperature 1 differs across seeds at least once.
    let sample = |seed: u64| chat_body(json!({"temperature": 1.0, "max_tokens": 16, "seed": seed, "ignore_eos": true}));
    let (_, a) = s.post("/v1/chat/completions", sample(7)).await;
    let (_, b) = s.post("/v1/chat/completions", sample(7)).await;
    assert_eq!(text_of(&a, 0), text_of(&b, 0));
    let mut differs = false;
    for seed in 8..12 {
        let (_, c) = s.post("/v1/chat/completions", sample(seed)).await;
        differs |= text_of(&c, 0) != text_of(&a, 0);
    }
    assert!(differs, "different seeds never changed the output");

    // n > 1 with a seed: n choices, indices 0..n, reproducible.
    let (_, v) = s.post("/v1/chat/completions", chat_body(json!({"n": 3, "seed": 1, "max_tokens": 6, "ignore_eos": true}))).await;
    let idx: Vec<u64> = v["choices"].as_array().unwrap().iter().map(|c| c["index"].as_u64().unwrap()).collect();
    assert_eq!(idx, [0, 1, 2]);
    assert_eq!(v["usage"]["completion_tokens"], 18);

    // Stop strings are not emitted: stop at a piece of the greedy text.
    let chars: Vec<char> = greedy.chars().collect();
    let cut = chars.len() / 2;
    let stop: String = chars[cut..cut + 2].iter().collect();
    let (_, v) = s.post("/v1/chat/completions", chat_body(json!({"temperature": 0, "max_tokens": 12, "ignore_eos": true, "stop": [stop.clone()]}))).await;
    let got = text_of(&v, 0);
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert!(greedy.starts_with(&got) && !got.contains(&stop), "got {got:?}, greedy {greedy:?}, stop {stop:?}");

    // Chat logprobs: top entries sorted, chosen logprob <= 0, one entry per token.
    let (_, v) = s.post("/v1/chat/completions", chat_body(json!({"temperature": 0, "max_tokens": 5, "ignore_eos": true, "logprobs": true, "top_logprobs": 3}))).await;
    let content = v["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(content.len(), 5);
    for e in content {
        let top = e["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 3);
        let lps: Vec<f64> = top.iter().map(|t| t["logprob"].as_f64().unwrap()).collect();
        assert!(lps.windows(2).all(|w| w[0] >= w[1]));
        // Greedy: the chosen token is the most likely one.
        assert_eq!(e["logprob"].as_f64().unwrap(), lps[0]);
        assert!(lps[0] <= 0.0);
    }

    // Completions: string, list of strings, token ids, list of lists.
    for prompt in [json!("import os\n"), json!(["a = 1", "b = 2"]), json!([11, 12, 13]), json!([[11, 12], [13, 14, 15]])] {
        let (st, v) = s.post("/v1/completions", json!({"prompt": prompt, "max_tokens": 4, "temperature": 0, "ignore_eos": true})).await;
        assert_eq!(st, 200, "{v}");
        let want = if prompt.is_array() && (prompt[0].is_string() || prompt[0].is_array()) { 2 } else { 1 };
        assert_eq!(v["choices"].as_array().unwrap().len(), want);
        assert_eq!(v["usage"]["completion_tokens"], 4 * want);
    }
    // Token-id prompt usage is exact.
    let (_, v) = s.post("/v1/completions", json!({"prompt": [11, 12, 13], "max_tokens": 2})).await;
    assert_eq!(v["usage"]["prompt_tokens"], 3);

    // Echo with logprobs: the prompt text comes first and the first prompt token has no logprob.
    let (_, v) = s.post("/v1/completions", json!({"prompt": "x = 1", "max_tokens": 3, "echo": true, "logprobs": 2, "temperature": 0, "ignore_eos": true})).await;
    let text = text_of(&v, 0);
    assert!(text.starts_with("x = 1"), "{text}");
    let lp = &v["choices"][0]["logprobs"];
    assert!(lp["token_logprobs"][0].is_null());
    let n_prompt = v["usage"]["prompt_tokens"].as_u64().unwrap() as usize;
    assert_eq!(lp["tokens"].as_array().unwrap().len(), n_prompt + 3);
    assert!(lp["token_logprobs"][1].as_f64().unwrap() <= 0.0);

    // Streamed, the same logprobs: offsets count from the start of the whole text (echo
    // included), and the echo chunk carries the prompt's.
    for echo in [false, true] {
        let body = json!({"prompt": "x = 1", "max_tokens": 6, "echo": echo, "logprobs": 2, "temperature": 0, "ignore_eos": true});
        let (_, whole) = s.post("/v1/completions", body.clone()).await;
        let mut streamed = body;
        streamed["stream"] = json!(true);
        let events = s.stream("/v1/completions", streamed).await;
        let (mut text, mut tokens, mut offsets, mut lps) = (String::new(), Vec::new(), Vec::new(), Vec::new());
        for e in &events[..events.len() - 1] {
            let c: Value = serde_json::from_str(e).unwrap();
            text.push_str(c["choices"][0]["text"].as_str().unwrap());
            let lp = &c["choices"][0]["logprobs"];
            if !lp.is_null() {
                tokens.extend(lp["tokens"].as_array().unwrap().clone());
                offsets.extend(lp["text_offset"].as_array().unwrap().clone());
                lps.extend(lp["token_logprobs"].as_array().unwrap().clone());
            }
        }
        let want = &whole["choices"][0]["logprobs"];
        assert_eq!(text, text_of(&whole, 0), "echo {echo}");
        assert_eq!(json!(tokens), want["tokens"], "echo {echo}");
        assert_eq!(json!(offsets), want["text_offset"], "echo {echo}");
        assert_eq!(json!(lps), want["token_logprobs"], "echo {echo}");
    }

    // Streaming completions end with a finish chunk and [DONE].
    let events = s.stream("/v1/completions", json!({"prompt": "def ", "max_tokens": 3, "stream": true, "ignore_eos": true})).await;
    assert_eq!(events.last().unwrap(), "[DONE]");
    let fin: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert_eq!(fin["choices"][0]["finish_reason"], "length");

    // Sampling parameters are accepted and keep outputs well formed.
    let (st, v) = s.post("/v1/completions", json!({"prompt": "for i in", "max_tokens": 8, "temperature": 0.8, "top_p": 0.9, "top_k": 20, "min_p": 0.05,
        "presence_penalty": 0.5, "frequency_penalty": 0.5, "repetition_penalty": 1.2, "logit_bias": {"7": 5.0}, "min_tokens": 2, "stop_token_ids": [4], "seed": 3})).await;
    assert_eq!(st, 200, "{v}");
    // A huge logit bias forces the token.
    let (_, v) = s.post("/v1/completions", json!({"prompt": [11, 12], "max_tokens": 3, "temperature": 0, "logit_bias": {"100": 100}, "ignore_eos": true})).await;
    let (_, d) = s.post("/detokenize", json!({"tokens": [100, 100, 100]})).await;
    assert_eq!(text_of(&v, 0), d["prompt"].as_str().unwrap());
}

#[tokio::test]
async fn errors_are_openai_error_objects() {
    let s = Server::start(&[]).await;
    let check = |st: u16, v: &Value, want: u16, param: Option<&str>| {
        assert_eq!(st, want, "{v}");
        assert!(v["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
        assert!(v["error"]["type"].is_string(), "{v}");
        if let Some(p) = param {
            assert_eq!(v["error"]["param"], p, "{v}");
        }
    };
    let (st, v) = s.post_raw("/v1/chat/completions", b"{not json".to_vec()).await;
    check(st, &v, 400, None);
    let (st, v) = s.post_raw("/v1/chat/completions", vec![0xff, 0xfe, b'{']).await;
    check(st, &v, 400, None);
    // Valid JSON nested past serde_json's limit: refused for its depth, not called invalid.
    let deep = format!("{{\"prompt\": \"x\", \"deep\": {}1{}}}", "[".repeat(200), "]".repeat(200));
    let (st, v) = s.post_raw("/v1/completions", deep.into_bytes()).await;
    check(st, &v, 400, None);
    assert!(v["error"]["message"].as_str().unwrap().contains("deeper than 128 levels"), "{v}");
    let (st, v) = s.post("/v1/chat/completions", chat_body(json!({"temperature": "hot"}))).await;
    check(st, &v, 400, Some("temperature"));
    let (st, v) = s.post("/v1/chat/completions", chat_body(json!({"temperature": 3}))).await;
    check(st, &v, 400, Some("temperature"));
    let (st, v) = s.post("/v1/chat/completions", chat_body(json!({"top_p": 0}))).await;
    check(st, &v, 400, Some("top_p"));
    // Above an open bound, but not as the f32 the sampler reads.
    let (st, v) = s.post("/v1/chat/completions", chat_body(json!({"repetition_penalty": 1e-300}))).await;
    check(st, &v, 400, Some("repetition_penalty"));
    let (st, v) = s.post("/v1/chat/completions", chat_body(json!({"n": 0}))).await;
    check(st, &v, 400, Some("n"));
    let (st, v) = s.post("/v1/chat/completions", chat_body(json!({"max_tokens": 0}))).await;
    check(st, &v, 400, Some("max_tokens"));
    let (st, v) = s.post("/v1/chat/completions", chat_body(json!({"top_logprobs": 50, "logprobs": true}))).await;
    check(st, &v, 400, Some("top_logprobs"));
    let (st, v) = s.post("/v1/chat/completions", chat_body(json!({"logit_bias": {"abc": 1}}))).await;
    check(st, &v, 400, Some("logit_bias"));
    let (st, v) = s.post("/v1/chat/completions", chat_body(json!({"model": "no-such-model"}))).await;
    check(st, &v, 404, Some("model"));
    let (st, v) = s.post("/v1/chat/completions", json!({"messages": []})).await;
    check(st, &v, 400, Some("messages"));
    let (st, v) = s.post("/v1/chat/completions", json!({"messages": [{"content": "no role"}]})).await;
    check(st, &v, 400, Some("messages"));
    let (st, v) = s.post("/v1/chat/completions", json!({"messages": [{"role": "wizard", "content": "x"}]})).await;
    check(st, &v, 400, Some("messages"));
    let (st, v) = s.post("/v1/chat/completions", json!({})).await;
    check(st, &v, 400, Some("messages"));
    let (st, v) = s.post("/v1/completions", json!({"prompt": [1, 2, 99999999]})).await;
    check(st, &v, 400, Some("prompt"));
    let (st, v) = s.post("/v1/completions", json!({"prompt": {"a": 1}})).await;
    check(st, &v, 400, Some("prompt"));
    let long: Vec<u32> = vec![11; 5000];
    let (st, v) = s.post("/v1/completions", json!({"prompt": long})).await;
    check(st, &v, 400, Some("prompt"));
    let (st, v) = s.post("/v1/chat/completions", json!({"messages": [{"role": "user", "content": "x ".repeat(5000)}]})).await;
    check(st, &v, 400, Some("messages"));
    let (st, v) = s.post("/v1/completions", json!({"prompt": [1, 2], "max_tokens": 100000})).await;
    check(st, &v, 400, Some("max_tokens"));
    let (st, v) = s.post("/v1/completions", json!({"prompt": [1, 2], "max_completion_tokens": 100000})).await;
    check(st, &v, 400, Some("max_completion_tokens"));
    // min_tokens past what the completion can hold (here the context's room, no max_tokens).
    let (st, v) = s.post("/v1/completions", json!({"prompt": [1, 2], "min_tokens": 100000})).await;
    check(st, &v, 400, Some("min_tokens"));
    // Fields that cannot be honoured are refused, not ignored.
    let (st, v) = s.post("/v1/completions", json!({"prompt": "x", "best_of": 3})).await;
    check(st, &v, 400, Some("best_of"));
    let (st, v) = s.post("/v1/completions", json!({"prompt": "x", "max_tokens": 1, "n": 2, "best_of": 2})).await;
    assert_eq!((st, v["choices"].as_array().map(Vec::len)), (200, Some(2)), "best_of = n is n: {v}");
    let (st, v) = s.post("/v1/chat/completions", chat_body(json!({"functions": [{"name": "f", "parameters": {}}]}))).await;
    check(st, &v, 400, Some("functions"));
    let (st, v) = s.post("/v1/chat/completions", chat_body(json!({"function_call": "auto"}))).await;
    check(st, &v, 400, Some("function_call"));
    // A guide the compiler refuses is named by the field it came from.
    let (st, v) = s.post("/v1/completions", json!({"prompt": "x", "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "wat"}}}})).await;
    check(st, &v, 400, Some("response_format"));
    let (st, v) = s.post("/v1/completions", json!({"prompt": "x", "guided_regex": "(unclosed"})).await;
    check(st, &v, 400, Some("guided_regex"));
    let (st, v) = s.post("/v1/completions", json!({"prompt": "x", "structured_outputs": {"grammar": "root ::= missing_rule"}})).await;
    check(st, &v, 400, Some("structured_outputs"));
    // vLLM's fields whose effect this server does not have: refused when set, on both routes,
    // and served where they ask for nothing (their neutral value).
    for (field, set, neutral) in [
        ("use_beam_search", json!(true), json!(false)),
        ("length_penalty", json!(0.8), json!(1.0)),
        ("chat_template", json!("{{ messages }}"), Value::Null),
        ("logits_processors", json!(["pkg.Proc"]), json!([])),
        ("structural_tag", json!("{}"), Value::Null),
        ("prompt_embeds", json!("AAAA"), Value::Null),
        ("kv_transfer_params", json!({"do_remote_decode": true}), Value::Null),
        ("repetition_min_count", json!(3), json!(0)),
    ] {
        for (path, mut body) in [("/v1/chat/completions", chat_body(json!({"max_tokens": 1}))), ("/v1/completions", json!({"prompt": "x", "max_tokens": 1}))] {
            body[field] = set.clone();
            let (st, v) = s.post(path, body.clone()).await;
            check(st, &v, 400, Some(field));
            body[field] = neutral.clone();
            let (st, v) = s.post(path, body).await;
            assert_eq!(st, 200, "{path} {field}: {neutral}: {v}");
        }
    }
    let (st, v) = s.post("/v1/chat/completions", chat_body(json!({"best_of": 2}))).await;
    check(st, &v, 400, Some("best_of"));
    let (st, v) = s.post("/v1/chat/completions", chat_body(json!({"reasoning_effort": "extreme"}))).await;
    check(st, &v, 400, Some("reasoning_effort"));
    let (st, v) = s.post("/v1/chat/completions", chat_body(json!({"documents": ["not an object"]}))).await;
    check(st, &v, 400, Some("documents"));
    // The template's own variables are the request's fields, not kwargs; nor is the template.
    for k in ["messages", "add_generation_prompt", "tools", "bos_token", "chat_template"] {
        let (st, v) = s.post("/v1/chat/completions", chat_body(json!({"chat_template_kwargs": {k: []}}))).await;
        check(st, &v, 400, Some("chat_template_kwargs"));
    }
    // Over the body limit (32 MiB by default). The server answers and closes the connection
    // without reading the rest, so a client that reads only after writing the whole body (as
    // reqwest does) may fail with a broken pipe first: write the 40 MiB body and read the
    // answer concurrently over a raw connection, ignoring the write's failure.
    let (st, v) = {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let addr = s.url("").trim_start_matches("http://").trim_end_matches('/').to_string();
        let c = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let (mut rd, mut wr) = c.into_split();
        let head = format!("POST /v1/completions HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n", 40 << 20);
        let writer = tokio::spawn(async move {
            let _ = wr.write_all(head.as_bytes()).await;
            let _ = wr.write_all(&vec![b' '; 40 << 20]).await;
            wr
        });
        let mut raw = Vec::new();
        let _ = tokio::time::timeout(std::time::Duration::from_secs(30), rd.read_to_end(&mut raw)).await;
        drop(writer.await);
        let text = String::from_utf8_lossy(&raw).to_string();
        let status: u16 = text.split(' ').nth(1).and_then(|x| x.parse().ok()).unwrap_or_else(|| panic!("no HTTP status in {text:?}"));
        let body = text.split("\r\n\r\n").nth(1).unwrap_or("");
        (status, serde_json::from_str::<Value>(body).unwrap_or_else(|e| panic!("body {body:?}: {e}")))
    };
    check(st, &v, 413, None);
    let r = s.client.get(s.url("/v1/nothing")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    let v: Value = r.json().await.unwrap();
    assert!(v["error"]["message"].is_string());
    let r = s.client.get(s.url("/v1/chat/completions")).send().await.unwrap();
    assert_eq!(r.status(), 405);
    let v: Value = r.json().await.unwrap();
    assert!(v["error"]["message"].is_string());
    // Unknown fields are ignored.
    let (st, _) = s.post("/v1/completions", json!({"prompt": "x", "max_tokens": 1, "frobnicate": true})).await;
    assert_eq!(st, 200);
    // The server is still fine.
    let (st, _) = s.post("/v1/completions", json!({"prompt": "x", "max_tokens": 1})).await;
    assert_eq!(st, 200);
}

/// Message shapes read as vLLM reads them: text parts joined by newlines, and an assistant turn
/// that only calls tools (content null, as the OpenAI SDK sends it back) rendered by the
/// embedded model's template, which concatenates content.
#[tokio::test]
async fn chat_messages_in_openai_shapes_render() {
    let s = Server::start(&[]).await;
    let tokens = |messages: Value| {
        let s = &s;
        async move {
            let (st, v) = s.post("/tokenize", json!({"messages": messages})).await;
            assert_eq!(st, 200, "{v}");
            v["tokens"].clone()
        }
    };
    let parts = tokens(json!([{"role": "user", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": "world"}]}])).await;
    assert_eq!(parts, tokens(json!([{"role": "user", "content": "Hello\nworld"}])).await);
    let calls = json!([{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]);
    let history = |content: Value| json!([
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": content, "tool_calls": calls},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C"}]);
    assert_eq!(tokens(history(Value::Null)).await, tokens(history(json!(""))).await);
    let (st, v) = s.post("/v1/chat/completions", json!({"messages": history(Value::Null), "max_tokens": 2})).await;
    assert_eq!(st, 200, "{v}");
}

#[tokio::test]
async fn api_key_is_required_when_set() {
    let s = Server::start(&["--api-key", "sekret"]).await;
    let (st, v) = s.post("/v1/completions", json!({"prompt": "x", "max_tokens": 1})).await;
    assert_eq!(st, 401, "{v}");
    assert_eq!(v["error"]["code"], "invalid_api_key");
    let r = s.client.post(s.url("/v1/completions")).bearer_auth("wrong").json(&json!({"prompt": "x", "max_tokens": 1})).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let r = s.client.post(s.url("/v1/completions")).bearer_auth("sekret").json(&json!({"prompt": "x", "max_tokens": 1})).send().await.unwrap();
    assert_eq!(r.status(), 200);
    // The scheme's name in any case (RFC 9110); the token exactly.
    for (header, want) in [("bearer sekret", 200), ("BEARER sekret", 200), ("Bearer Sekret", 401), ("Basic sekret", 401), ("sekret", 401)] {
        let r = s.client.post(s.url("/v1/completions")).header("authorization", header).json(&json!({"prompt": "x", "max_tokens": 1})).send().await.unwrap();
        assert_eq!(r.status(), want, "{header}");
    }
    // Health (and SageMaker's /ping) and metrics stay open; /invocations needs the key.
    assert_eq!(s.client.get(s.url("/health")).send().await.unwrap().status(), 200);
    assert_eq!(s.client.get(s.url("/ping")).send().await.unwrap().status(), 200);
    assert_eq!(s.client.get(s.url("/metrics")).send().await.unwrap().status(), 200);
    assert_eq!(s.post("/invocations", json!({"prompt": "x", "max_tokens": 1})).await.0, 401);
    // A browser's CORS preflight is answered without the key (any origin by default, as vLLM),
    // and answers carry the header.
    let preflight = |s: &Server, origin: &str| {
        s.client.request(reqwest::Method::OPTIONS, s.url("/v1/chat/completions")).header("origin", origin)
            .header("access-control-request-method", "POST").header("access-control-request-headers", "authorization,content-type").send()
    };
    let r = preflight(&s, "https://ui.example").await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["access-control-allow-origin"], "*");
    let r = s.client.post(s.url("/v1/completions")).header("origin", "https://ui.example").bearer_auth("sekret").json(&json!({"prompt": "x", "max_tokens": 1})).send().await.unwrap();
    assert_eq!((r.status().as_u16(), r.headers().get("access-control-allow-origin").map(|v| v.to_str().unwrap().to_owned())), (200, Some("*".into())));
    // Listed origins only.
    let s = Server::start(&["--allowed-origins", "https://ui.example,http://localhost:3000"]).await;
    let r = preflight(&s, "http://localhost:3000").await.unwrap();
    assert_eq!(r.headers()["access-control-allow-origin"], "http://localhost:3000");
    let r = preflight(&s, "https://elsewhere.example").await.unwrap();
    assert!(r.headers().get("access-control-allow-origin").is_none(), "{:?}", r.headers());
}

/// 64 concurrent streams, about half dropped mid-stream: afterwards nothing runs and every KV
/// block is free again.
#[tokio::test]
async fn concurrent_streams_with_disconnects_leave_no_running_requests_or_kv() {
    let s = Server::start(&["--max-num-seqs", "16"]).await;
    let mut tasks = Vec::new();
    for i in 0..64u64 {
        let client = s.client.clone();
        let url = s.url("/v1/completions");
        tasks.push(tokio::spawn(async move {
            let body = json!({"prompt": format!("item_{i} = "), "max_tokens": 48, "stream": true, "ignore_eos": true, "seed": i, "temperature": 1.0});
            let r = client.post(url).json(&body).send().await.unwrap();
            assert_eq!(r.status(), 200);
            let mut stream = r.bytes_stream();
            let drop_after = if i % 2 == 0 { (i % 5) as usize + 1 } else { usize::MAX };
            let mut n = 0;
            let mut done = false;
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.unwrap();
                n += 1;
                if String::from_utf8_lossy(&chunk).contains("[DONE]") {
                    done = true;
                }
                if n >= drop_after {
                    return false; // disconnect: the stream is dropped here
                }
            }
            assert!(done, "a kept stream must end with [DONE]");
            true
        }));
    }
    let mut finished = 0;
    for t in tasks {
        finished += usize::from(t.await.unwrap());
    }
    assert_eq!(finished, 32);
    // The engine notices dropped streams at its next step.
    let t0 = std::time::Instant::now();
    loop {
        let running = s.metric("vllm:num_requests_running").await;
        let waiting = s.metric("vllm:num_requests_waiting").await;
        let kv = s.metric("vllm:kv_cache_usage_perc").await;
        if running == 0.0 && waiting == 0.0 && kv == 0.0 {
            break;
        }
        assert!(t0.elapsed().as_secs() < 30, "still running {running}, waiting {waiting}, kv {kv}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    // And it still serves.
    let (st, _) = s.post("/v1/completions", json!({"prompt": "x", "max_tokens": 2})).await;
    assert_eq!(st, 200);
}

/// With no MODEL the binary serves the embedded, trained demo model, which continues Python code.
#[tokio::test]
async fn embedded_default_model_completes_python() {
    let s = Server::start_embedded(&[]).await;
    let m: Value = s.client.get(s.url("/v1/models")).send().await.unwrap().json().await.unwrap();
    assert_eq!(m["data"][0]["id"], "peregrine-mimo-tiny");
    let (st, v) = s.post("/v1/completions", json!({"prompt": "def fibonacci(n):\n", "max_tokens": 24, "temperature": 0})).await;
    assert_eq!(st, 200, "{v}");
    let text = text_of(&v, 0);
    // Greedy output of the committed weights (identical to HF transformers', see the model card).
    assert!(text.starts_with("\ndef _fibonacci(n):\n    \"\"\""), "{text:?}");
    // Its drafter is on by default, and drafts are accepted.
    let details = &v["usage"]["completion_tokens_details"];
    assert!(details["accepted_prediction_tokens"].as_u64().unwrap() > 0, "{v}");
    assert!(s.metric("vllm:spec_decode_num_drafts_total").await > 0.0);
    // Metrics carry the served model name, as vLLM's do.
    let text = s.client.get(s.url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(text.contains("vllm:generation_tokens_total{model_name=\"peregrine-mimo-tiny\"}"), "{text}");
}

/// `--kv-cache-dtype fp8` (on the CPU the pools' values rounded to e4m3): served, and named in
/// vLLM's `cache_config_info`; `fp8_e5m2` refuses to start, naming what is supported.
#[tokio::test]
async fn fp8_kv_pools_serve_and_are_named_in_the_metrics() {
    let s = Server::start(&["--kv-cache-dtype", "fp8"]).await;
    let (status, v) = s.post("/v1/completions", json!({"prompt": "a b c", "max_tokens": 6, "ignore_eos": true})).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["usage"]["completion_tokens"], 6, "{v}");
    let metrics = s.client.get(s.url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(metrics.lines().any(|l| l.starts_with("vllm:cache_config_info{") && l.contains("cache_dtype=\"fp8_e4m3\"")), "{metrics}");
    let fixture = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/golden/default");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_peregrine")).args(["serve", fixture, "--kv-cache-dtype", "fp8_e5m2"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("fp8_e5m2") && err.contains("not supported"), "{err}");
}

/// vLLM's request fields `continue_final_message` (the reply continues the final message: its
/// prompt is /tokenize's of the same chat, which ends in that message's text),
/// `truncate_prompt_tokens` (the prompt's last k tokens), `allowed_token_ids`,
/// `return_tokens_as_token_ids` and `include_stop_str_in_output`.
#[tokio::test]
async fn continue_final_message_truncate_prompt_tokens_and_include_stop_str() {
    let s = Server::start(&["--max-model-len", "64"]).await;
    // Continue the final message.
    let messages = json!([{"role": "user", "content": "def fib(n):"}, {"role": "assistant", "content": "    return fib(n - 1) +"}]);
    let (status, t) = s.post("/tokenize", json!({"messages": messages, "continue_final_message": true})).await;
    assert_eq!(status, 200, "{t}");
    let (_, d) = s.post("/detokenize", json!({"tokens": t["tokens"]})).await;
    assert!(d["prompt"].as_str().unwrap().ends_with("return fib(n - 1) +"), "{d}");
    let (_, full) = s.post("/tokenize", json!({"messages": messages, "add_generation_prompt": false})).await;
    assert!(t["count"].as_u64() < full["count"].as_u64(), "the end of the turn is cut: {t} {full}");
    let (status, v) = s.post("/v1/chat/completions", json!({"messages": messages, "continue_final_message": true, "max_tokens": 4, "ignore_eos": true})).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["usage"]["prompt_tokens"], t["count"], "{v}");
    for (body, words) in [
        (json!({"messages": messages, "continue_final_message": true, "add_generation_prompt": true}), "set one of them"),
        (json!({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}], "continue_final_message": true}), "empty"),
    ] {
        let (status, v) = s.post("/v1/chat/completions", body.clone()).await;
        assert_eq!(status, 400, "{body}: {v}");
        assert!(v["error"]["message"].as_str().unwrap().contains(words), "{body}: {v}");
    }
    // Truncated prompts: the last k tokens, or (-1) as many as the context holds.
    let long: Vec<u32> = (0..100).map(|i| 3 + i % 50).collect();
    let (status, v) = s.post("/v1/completions", json!({"prompt": long, "max_tokens": 1, "truncate_prompt_tokens": 10})).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["usage"]["prompt_tokens"], 10, "{v}");
    let (status, v) = s.post("/v1/completions", json!({"prompt": long, "max_tokens": 1, "truncate_prompt_tokens": -1, "echo": true, "logprobs": 0})).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["usage"]["prompt_tokens"], 63, "{v}");
    assert_eq!(v["choices"][0]["logprobs"]["tokens"].as_array().unwrap().len(), 64, "the echo is of the prompt read: {v}");
    let (status, v) = s.post("/v1/completions", json!({"prompt": long, "max_tokens": 1})).await;
    assert_eq!(status, 400, "without truncation the prompt is too long: {v}");
    for k in [0, -2] {
        let (status, v) = s.post("/v1/completions", json!({"prompt": "a", "truncate_prompt_tokens": k})).await;
        assert_eq!(status, 400, "{k}: {v}");
        assert!(v["error"]["message"].as_str().unwrap().contains("truncate_prompt_tokens"), "{v}");
    }
    // Allowed tokens only: two one-character tokens, so the text is made of those characters.
    let mut ids = Vec::new();
    for c in ["x", "y"] {
        let (_, t) = s.post("/tokenize", json!({"prompt": c, "add_special_tokens": false})).await;
        assert_eq!(t["count"], 1, "{t}");
        ids.push(t["tokens"][0].clone());
    }
    let (status, v) = s.post("/v1/completions", json!({"prompt": "def", "max_tokens": 8, "temperature": 1.0, "seed": 3, "ignore_eos": true, "allowed_token_ids": ids})).await;
    assert_eq!(status, 200, "{v}");
    let t = text_of(&v, 0);
    assert!(t.len() == 8 && t.chars().all(|c| c == 'x' || c == 'y'), "{v}");
    for (extra, words) in [
        (json!({"allowed_token_ids": []}), "must not be empty"),
        (json!({"allowed_token_ids": [99999999]}), "outside the vocabulary"),
        (json!({"allowed_token_ids": ids, "guided_regex": "x+"}), "cannot be combined"),
    ] {
        let mut body = json!({"prompt": "def", "max_tokens": 2});
        body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        let (status, v) = s.post("/v1/completions", body).await;
        assert_eq!(status, 400, "{extra}: {v}");
        assert!(v["error"]["message"].as_str().unwrap().contains(words), "{extra}: {v}");
    }
    // Logprobs naming tokens by id: the same tokens as by text, whose ids detokenize to them.
    let ask = json!({"prompt": "def", "max_tokens": 5, "temperature": 0, "ignore_eos": true, "logprobs": 2});
    let (_, by_text) = s.post("/v1/completions", ask.clone()).await;
    let mut by_id_body = ask.clone();
    by_id_body["return_tokens_as_token_ids"] = json!(true);
    let (_, by_id) = s.post("/v1/completions", by_id_body.clone()).await;
    by_id_body["stream"] = json!(true);
    let streamed: Vec<Value> = s.stream("/v1/completions", by_id_body).await.iter().filter(|c| *c != "[DONE]").map(|c| serde_json::from_str(c).unwrap()).collect();
    let streamed_names: Vec<&Value> = streamed.iter().flat_map(|c| c["choices"][0]["logprobs"]["tokens"].as_array().into_iter().flatten()).collect();
    assert!(streamed_names.len() == 5 && streamed_names.iter().all(|n| n.as_str().is_some_and(|n| n.starts_with("token_id:"))), "{streamed:?}");
    let names = by_id["choices"][0]["logprobs"]["tokens"].as_array().unwrap().clone();
    assert_eq!(names.len(), 5, "{by_id}");
    for (name, text) in names.iter().zip(by_text["choices"][0]["logprobs"]["tokens"].as_array().unwrap()) {
        let id: u64 = name.as_str().and_then(|n| n.strip_prefix("token_id:")).and_then(|n| n.parse().ok()).unwrap_or_else(|| panic!("{name}"));
        let (_, d) = s.post("/detokenize", json!({"tokens": [id]})).await;
        assert_eq!(&d["prompt"], text, "{by_id}");
    }
    assert!(by_id["choices"][0]["logprobs"]["top_logprobs"][0].as_object().unwrap().keys().all(|k| k.starts_with("token_id:")), "{by_id}");
    let (_, chat) = s.post("/v1/chat/completions", json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "logprobs": true, "top_logprobs": 1, "return_tokens_as_token_ids": true})).await;
    let entry = &chat["choices"][0]["logprobs"]["content"][0];
    assert!(entry["token"].as_str().unwrap().starts_with("token_id:") && entry["top_logprobs"][0]["token"].as_str().unwrap().starts_with("token_id:"), "{chat}");
    // The stop string in the output.
    let (_, full) = s.post("/v1/completions", json!({"prompt": "def", "max_tokens": 16, "temperature": 0, "ignore_eos": true})).await;
    let text = text_of(&full, 0);
    let chars: Vec<char> = text.chars().collect();
    assert!(chars.len() > 8, "{text:?}");
    let stop: String = chars[4..7].iter().collect();
    let at = text.find(&stop).unwrap();
    for (include, want) in [(false, &text[..at]), (true, &text[..at + stop.len()])] {
        let (_, v) = s.post("/v1/completions", json!({"prompt": "def", "max_tokens": 16, "temperature": 0, "ignore_eos": true, "stop": stop, "include_stop_str_in_output": include})).await;
        assert_eq!((text_of(&v, 0).as_str(), &v["choices"][0]["finish_reason"]), (want, &json!("stop")), "include {include}: {v}");
    }
}

/// `stream_options.continuous_usage_stats` (vLLM's), with `include_usage`: every chunk carries
/// its choice's usage so far, counting each token as it streams, ending at the choice's own
/// count; the final usage chunk still sums the choices. With `include_usage` false or null, no
/// chunk has it; `stream_options` without `include_usage` gets the final usage chunk (vLLM's
/// default).
#[tokio::test]
async fn continuous_usage_stats_count_each_choice_as_it_streams() {
    let s = Server::start(&[]).await;
    for chat in [true, false] {
        let (path, mut body) = if chat {
            ("/v1/chat/completions", chat_body(json!({})))
        } else {
            ("/v1/completions", json!({"prompt": ["one two", "three four five six"]}))
        };
        for (k, v) in [("max_tokens", json!(9)), ("ignore_eos", json!(true)), ("n", json!(2)), ("stream", json!(true)), ("temperature", json!(1.0))] {
            body[k] = v;
        }
        body["stream_options"] = json!({"include_usage": true, "continuous_usage_stats": true});
        let events = s.stream(path, body.clone()).await;
        let chunks: Vec<Value> = events[..events.len() - 1].iter().map(|e| serde_json::from_str(e).unwrap()).collect();
        let (last, choices) = chunks.split_last().unwrap();
        let mut seen: std::collections::HashMap<u64, (u64, u64)> = Default::default();
        for c in choices {
            let u = &c["usage"];
            let (prompt, done) = (u["prompt_tokens"].as_u64().unwrap(), u["completion_tokens"].as_u64().unwrap());
            assert_eq!(u["total_tokens"].as_u64(), Some(prompt + done), "{c}");
            let index = c["choices"][0]["index"].as_u64().unwrap();
            let (p0, before) = *seen.get(&index).unwrap_or(&(prompt, 0));
            assert!(p0 == prompt && done >= before && done <= 9, "chat {chat}: {c}");
            seen.insert(index, (prompt, done));
            if !c["choices"][0]["finish_reason"].is_null() {
                assert_eq!(done, 9, "chat {chat}: the finish chunk counts every token: {c}");
            }
        }
        let choices_n = if chat { 2 } else { 4 };
        assert_eq!(seen.len(), choices_n, "chat {chat}");
        assert!(seen.values().all(|&(_, done)| done == 9), "chat {chat}: {seen:?}");
        // Each prompt counted once, however many choices it has (n = 2: choices 2i and 2i + 1).
        let prompts: u64 = seen.iter().filter(|(i, _)| *i % 2 == 0).map(|(_, &(p, _))| p).sum();
        assert_eq!(last["choices"], json!([]));
        assert_eq!((last["usage"]["completion_tokens"].as_u64(), last["usage"]["prompt_tokens"].as_u64()), (Some(9 * choices_n as u64), Some(prompts)), "{last}");
        // Streamed one token at a time here, so the counts rise through every value.
        let counts: std::collections::BTreeSet<u64> = choices.iter().map(|c| c["usage"]["completion_tokens"].as_u64().unwrap()).collect();
        assert!(counts.len() >= 5, "chat {chat}: {counts:?}");
        for off in [json!(false), Value::Null] {
            body["stream_options"] = json!({"include_usage": off, "continuous_usage_stats": true});
            let events = s.stream(path, body.clone()).await;
            assert!(events.iter().all(|e| !e.contains("\"usage\"")), "usage with include_usage {off}: {events:?}");
        }
        // `stream_options` without `include_usage` asks for it (vLLM's default).
        body["stream_options"] = json!({});
        let events = s.stream(path, body).await;
        let usage: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
        assert_eq!((&usage["choices"], usage["usage"]["completion_tokens"].as_u64()), (&json!([]), Some(9 * choices_n as u64)), "{usage}");
        assert!(events[..events.len() - 2].iter().all(|e| !e.contains("\"usage\"")), "{events:?}");
    }
}

/// `add_special_tokens` (vLLM's): a text prompt gets the tokenizer's special tokens by default
/// on /v1/completions and not on chats (the template writes them), and either way when asked.
/// The fixture's tokenizer adds none, so a copy of it here adds a BOS.
#[tokio::test]
async fn add_special_tokens_is_honoured_on_both_routes() {
    let fixture = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/golden/default");
    let dir = tempfile::tempdir().unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer_config.json"] {
        std::fs::copy(fixture.join(f), dir.path().join(f)).unwrap();
    }
    let mut tok: Value = serde_json::from_str(&std::fs::read_to_string(fixture.join("tokenizer.json")).unwrap()).unwrap();
    tok["post_processor"] = json!({"type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "<|bos|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"SpecialToken": {"id": "<|bos|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<|bos|>": {"id": "<|bos|>", "ids": [0], "tokens": ["<|bos|>"]}}});
    std::fs::write(dir.path().join("tokenizer.json"), tok.to_string()).unwrap();
    let s = Server::start(&[dir.path().to_str().unwrap()]).await;
    let prompt_tokens = |v: &Value| v["usage"]["prompt_tokens"].as_u64().unwrap_or_else(|| panic!("{v}"));
    let (_, plain) = s.post("/tokenize", json!({"prompt": "hello there", "add_special_tokens": false})).await;
    let n = plain["count"].as_u64().unwrap();
    for (add, want) in [(None, n + 1), (Some(true), n + 1), (Some(false), n)] {
        let mut body = json!({"prompt": "hello there", "max_tokens": 1});
        if let Some(a) = add {
            body["add_special_tokens"] = json!(a);
        }
        let (st, v) = s.post("/v1/completions", body).await;
        assert_eq!((st, prompt_tokens(&v)), (200, want), "completions, add_special_tokens {add:?}: {v}");
    }
    let (_, chat) = s.post("/tokenize", json!({"messages": [{"role": "user", "content": "hello"}]})).await;
    let m = chat["count"].as_u64().unwrap();
    for (add, want) in [(None, m), (Some(false), m), (Some(true), m + 1)] {
        let mut body = json!({"messages": [{"role": "user", "content": "hello"}], "max_tokens": 1});
        if let Some(a) = add {
            body["add_special_tokens"] = json!(a);
        }
        let (st, v) = s.post("/v1/chat/completions", body).await;
        assert_eq!((st, prompt_tokens(&v)), (200, want), "chat, add_special_tokens {add:?}: {v}");
    }
}

/// `cache_salt` (vLLM's): a prompt's prefix-cache entries serve only requests with the same salt
/// (`usage.prompt_tokens_details.cached_tokens` shows the hits); an empty salt is refused.
#[tokio::test]
async fn cache_salt_keeps_prefix_cache_hits_within_a_salt() {
    let s = Server::start(&[]).await;
    let prompt = "a long shared system prompt ".repeat(12);
    let cached = |v: &Value| v["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap_or_else(|| panic!("{v}"));
    let run = |salt: Option<&str>| {
        let mut body = json!({"prompt": prompt, "max_tokens": 1});
        if let Some(salt) = salt {
            body["cache_salt"] = json!(salt);
        }
        s.post("/v1/completions", body)
    };
    let (st, first) = run(Some("tenant-a")).await;
    assert_eq!((st, cached(&first)), (200, 0), "{first}");
    let (_, again) = run(Some("tenant-a")).await;
    assert!(cached(&again) > 0, "the same salt hits the cache: {again}");
    let (_, other) = run(Some("tenant-b")).await;
    assert_eq!(cached(&other), 0, "another salt does not: {other}");
    let (_, plain) = run(None).await;
    assert_eq!(cached(&plain), 0, "nor does no salt: {plain}");
    let (st, v) = run(Some("")).await;
    assert_eq!((st, v["error"]["param"].as_str()), (400, Some("cache_salt")), "{v}");
}

/// A vLLM command line serves as it would there (its spellings, its no-op flags, its parser
/// names), and `--no-enable-prefix-caching` turns the prefix cache off: a repeated prompt finds
/// nothing cached, and the cache's info metric says so.
#[tokio::test]
async fn a_vllm_command_line_serves_and_can_turn_prefix_caching_off() {
    let fixture = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/golden/default");
    let s = Server::start(&[
        fixture, "-tp", "1", "--trust-remote-code", "--enable-auto-tool-choice", "--tool-call-parser", "hermes", "--reasoning-parser", "qwen3",
        "--generation-config", "vllm", "--dtype", "auto", "--disable-log-requests", "--max_num_seqs", "4", "--no-enable-prefix-caching",
    ])
    .await;
    let body = json!({"prompt": "a long shared system prompt ".repeat(12), "max_tokens": 4, "temperature": 0});
    let cached = |v: &Value| v["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap_or_else(|| panic!("{v}"));
    let (st, first) = s.post("/v1/completions", body.clone()).await;
    assert_eq!((st, cached(&first)), (200, 0), "{first}");
    let (st, again) = s.post("/v1/completions", body).await;
    assert_eq!((st, cached(&again)), (200, 0), "nothing is cached: {again}");
    assert_eq!(first["choices"][0]["text"], again["choices"][0]["text"], "{first} {again}");
    let metrics = s.client.get(s.url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains(r#"enable_prefix_caching="false""#), "{metrics}");
}

/// `/v1/responses` is the chat route reshaped: the same text and token counts as the chat
/// completion of the same messages (greedy and seeded), streamed events that add up to it, and
/// the chat's validation under this route's field names.
#[tokio::test]
async fn responses_answer_what_the_chat_route_answers() {
    let s = Server::start(&[]).await;
    for sampling in [json!({"temperature": 0}), json!({"temperature": 0.9, "seed": 7})] {
        let mut chat = json!({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "def add(a, b):"}], "max_completion_tokens": 12});
        let mut resp = json!({"instructions": "Be brief.", "input": [{"role": "user", "content": [{"type": "input_text", "text": "def add(a, b):"}]}], "max_output_tokens": 12});
        for (k, v) in sampling.as_object().unwrap() {
            chat[k] = v.clone();
            resp[k] = v.clone();
        }
        let (st, c) = s.post("/v1/chat/completions", chat).await;
        assert_eq!(st, 200, "{c}");
        let (st, r) = s.post("/v1/responses", resp.clone()).await;
        assert_eq!(st, 200, "{r}");
        let text = c["choices"][0]["message"]["content"].as_str().unwrap();
        assert!(!text.is_empty(), "{c}");
        assert_eq!(r["output"][0]["content"][0]["text"], text, "{r}");
        assert_eq!((&r["usage"]["input_tokens"], &r["usage"]["output_tokens"]), (&c["usage"]["prompt_tokens"], &c["usage"]["completion_tokens"]));
        let status = if c["choices"][0]["finish_reason"] == "length" { "incomplete" } else { "completed" };
        assert_eq!((&r["object"], &r["status"], &r["instructions"]), (&json!("response"), &json!(status), &json!("Be brief.")));
        // Streamed: numbered typed events whose deltas add up to the same text.
        resp["stream"] = json!(true);
        let events: Vec<Value> = s.stream("/v1/responses", resp).await.iter().map(|e| serde_json::from_str(e).unwrap()).collect();
        assert!(events.iter().enumerate().all(|(i, e)| e["sequence_number"] == json!(i)), "{events:?}");
        let streamed: String = events.iter().filter(|e| e["type"] == "response.output_text.delta").map(|e| e["delta"].as_str().unwrap()).collect();
        assert_eq!(streamed, text);
        let last = events.last().unwrap();
        assert_eq!(last["response"]["output"][0]["content"][0]["text"], text, "{last}");
        assert_eq!(last["response"]["usage"]["output_tokens"], c["usage"]["completion_tokens"], "{last}");
    }
    // The chat's checks, named as this route's fields.
    for (body, param) in [
        (json!({"input": "x", "max_output_tokens": 0}), "max_output_tokens"),
        (json!({"input": "x", "reasoning": {"effort": "extreme"}}), "reasoning.effort"),
        (json!({"input": "x", "text": {"format": {"type": "json_schema", "name": "s", "schema": 5}}}), "text.format"),
        (json!({"input": "x", "temperature": -1}), "temperature"),
        (json!({"input": "x", "model": "other"}), "model"),
    ] {
        let (st, v) = s.post("/v1/responses", body.clone()).await;
        assert!(st == 400 || st == 404, "{body}: {st} {v}");
        assert_eq!(v["error"]["param"], param, "{body}: {v}");
    }
    // A tool loop's history as items renders as the chat's messages do: the same prompt tokens
    // and the same greedy text.
    let chat = json!({"temperature": 0, "max_completion_tokens": 8, "messages": [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": "", "reasoning_content": "look it up", "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C"},
        {"role": "user", "content": "and then?"}]});
    let resp = json!({"temperature": 0, "max_output_tokens": 8, "metadata": {"run": "7"}, "input": [
        {"role": "user", "content": "weather?"},
        {"type": "reasoning", "id": "rs_1", "summary": [], "content": [{"type": "reasoning_text", "text": "look it up"}]},
        {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": "{\"city\": \"Paris\"}"},
        {"type": "function_call_output", "call_id": "call_1", "output": "18 C"},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "and then?"}]}]});
    let ((_, c), (st, r)) = (s.post("/v1/chat/completions", chat).await, s.post("/v1/responses", resp).await);
    assert_eq!(st, 200, "{r}");
    assert_eq!((&r["usage"]["input_tokens"], &r["output"][0]["content"][0]["text"]), (&c["usage"]["prompt_tokens"], &c["choices"][0]["message"]["content"]), "{r}\n{c}");
    assert_eq!(r["metadata"], json!({"run": "7"}));
    let r = s.client.get(s.url("/v1/responses/resp_123")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    assert!(r.text().await.unwrap().contains("not stored"));
    let (st, v) = s.post_raw("/v1/responses", b"{not json".to_vec()).await;
    assert_eq!((st, v["error"]["type"].as_str()), (400, Some("invalid_request_error")), "{v}");
}

/// `/v1/messages` (Anthropic's API) is the chat route reshaped: the same text and token counts
/// as the chat completion of the same conversation, streamed events that add up to it,
/// count_tokens agreeing with the usage, the key accepted as `x-api-key`, and errors in
/// Anthropic's shape.
#[tokio::test]
async fn messages_answer_what_the_chat_route_answers() {
    let s = Server::start(&["--api-key", "sk-a"]).await;
    let post = |path: &'static str, body: Value, key: (&'static str, &'static str)| {
        let r = s.client.post(s.url(path)).header(key.0, key.1).json(&body).send();
        async move {
            let r = r.await.unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        }
    };
    let (bearer, x_key) = (("authorization", "Bearer sk-a"), ("x-api-key", "sk-a"));
    let chat = json!({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "def add(a, b):"}], "max_tokens": 12, "temperature": 0});
    let (st, c) = post("/v1/chat/completions", chat, bearer).await;
    assert_eq!(st, 200, "{c}");
    let c: Value = serde_json::from_str(&c).unwrap();
    let msg = json!({"model": c["model"], "system": "Be brief.", "messages": [{"role": "user", "content": [{"type": "text", "text": "def add(a, b):"}]}], "max_tokens": 12, "temperature": 0});
    let (st, m) = post("/v1/messages", msg.clone(), x_key).await;
    assert_eq!(st, 200, "{m}");
    let m: Value = serde_json::from_str(&m).unwrap();
    let text = c["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(!text.is_empty());
    // (The chat request before it cached some of the prompt: Anthropic counts those apart.)
    let input = m["usage"]["input_tokens"].as_u64().unwrap() + m["usage"]["cache_read_input_tokens"].as_u64().unwrap();
    assert_eq!((&m["content"][0]["text"], &json!(input), &m["usage"]["output_tokens"]), (&json!(text), &c["usage"]["prompt_tokens"], &c["usage"]["completion_tokens"]), "{m}");
    let want_stop = if c["choices"][0]["finish_reason"] == "length" { "max_tokens" } else { "end_turn" };
    assert_eq!((&m["type"], &m["role"], &m["stop_reason"]), (&json!("message"), &json!("assistant"), &json!(want_stop)));
    let (_, n) = post("/v1/messages/count_tokens", json!({"system": "Be brief.", "messages": msg["messages"]}), x_key).await;
    assert_eq!(serde_json::from_str::<Value>(&n).unwrap()["input_tokens"], c["usage"]["prompt_tokens"], "{n}");
    // Streamed: the text deltas add up to the same text; the stop reason and usage come last.
    let mut streamed = msg.clone();
    streamed["stream"] = json!(true);
    let (st, body) = post("/v1/messages", streamed, x_key).await;
    assert_eq!(st, 200);
    let events: Vec<Value> = body.lines().filter_map(|l| l.strip_prefix("data: ")).map(|d| serde_json::from_str(d).unwrap()).collect();
    let deltas: String = events.iter().filter(|e| e["type"] == "content_block_delta").map(|e| e["delta"]["text"].as_str().unwrap()).collect();
    assert_eq!(deltas, text);
    assert_eq!((&events[0]["type"], &events.last().unwrap()["type"]), (&json!("message_start"), &json!("message_stop")));
    let delta = &events[events.len() - 2];
    assert_eq!((&delta["delta"]["stop_reason"], &delta["usage"]["output_tokens"]), (&json!(want_stop), &c["usage"]["completion_tokens"]), "{delta}");
    // Errors in Anthropic's shape: a missing max_tokens, a wrong key.
    let (st, e) = post("/v1/messages", json!({"messages": [{"role": "user", "content": "x"}]}), x_key).await;
    let e: Value = serde_json::from_str(&e).unwrap();
    assert_eq!((st, &e["type"], &e["error"]["type"]), (400, &json!("error"), &json!("invalid_request_error")), "{e}");
    let (st, e) = post("/v1/messages", msg, ("x-api-key", "wrong")).await;
    assert_eq!((st, serde_json::from_str::<Value>(&e).unwrap()["error"]["type"].as_str()), (401, Some("authentication_error")), "{e}");
    let r = s.client.get(s.url("/v1/messages")).header("x-api-key", "sk-a").send().await.unwrap();
    assert_eq!(r.status(), 405);
    assert_eq!(r.json::<Value>().await.unwrap()["type"], "error");
}

/// vLLM's `stop_reason` on each choice: the stop string or stop token id that ended it, null
/// where EOS or the length did; on the finishing chunk when streamed; on both routes.
#[tokio::test]
async fn stop_reason_names_the_stop_that_ended_a_choice() {
    let s = Server::start(&[]).await;
    let sampling = json!({"max_tokens": 16, "temperature": 0, "ignore_eos": true, "return_token_ids": true});
    let completion = json!({"prompt": "def add(a, b):"});
    let chat = json!({"messages": [{"role": "user", "content": "def add(a, b):"}]});
    for (route, input) in [("/v1/completions", completion), ("/v1/chat/completions", chat)] {
        let with = |extra: &Value| {
            let mut b = input.clone();
            for (k, v) in sampling.as_object().unwrap().iter().chain(extra.as_object().unwrap()) {
                b[k] = v.clone();
            }
            b
        };
        let text_of = |v: &Value| v["choices"][0]["text"].as_str().or(v["choices"][0]["message"]["content"].as_str()).unwrap().to_owned();
        let (_, free) = s.post(route, with(&json!({}))).await;
        assert_eq!((&free["choices"][0]["finish_reason"], &free["choices"][0]["stop_reason"]), (&json!("length"), &Value::Null), "{route}: {free}");
        let (text, ids) = (text_of(&free), free["choices"][0]["token_ids"].clone());
        let stop: String = text.chars().skip(3).take(4).collect();
        assert_eq!(stop.chars().count(), 4, "{route}: {text:?}");
        for (extra, want) in [(json!({"stop": ["\u{1}never", stop]}), json!(stop)), (json!({"stop_token_ids": [ids[2]]}), ids[2].clone())] {
            let body = with(&extra);
            let (st, v) = s.post(route, body.clone()).await;
            assert_eq!((st, &v["choices"][0]["finish_reason"], &v["choices"][0]["stop_reason"]), (200, &json!("stop"), &want), "{route} {extra}: {v}");
            let mut streamed = body;
            streamed["stream"] = json!(true);
            let chunks: Vec<Value> = s.stream(route, streamed).await.iter().filter(|c| *c != "[DONE]").map(|c| serde_json::from_str(c).unwrap()).collect();
            let last = chunks.iter().rfind(|c| !c["choices"][0]["finish_reason"].is_null()).unwrap();
            assert_eq!(last["choices"][0]["stop_reason"], want, "{route} {extra}, streamed");
            if route == "/v1/completions" {
                assert!(chunks.iter().filter(|c| c["choices"].as_array().is_some_and(|a| !a.is_empty())).all(|c| c["choices"][0].get("stop_reason").is_some()), "every completion chunk has the key, as vLLM's");
            }
        }
    }
}

/// `--seed`: unseeded sampled requests draw from seeds of the server's seed and their arrival
/// number, so a restarted server sent the same requests in order samples the same texts (each
/// request its own); without it two servers sample apart. A request's `seed` wins either way.
#[tokio::test]
async fn server_seed_makes_unseeded_sampling_repeat_across_restarts() {
    let chat = json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 24, "temperature": 1.5, "ignore_eos": true});
    let completion = json!({"prompt": ["def f(x):", "class A:"], "n": 2, "max_tokens": 24, "temperature": 1.5, "ignore_eos": true});
    let seeded = json!({"prompt": "x = ", "max_tokens": 24, "temperature": 1.5, "ignore_eos": true, "seed": 3});
    let run = |args: &'static [&'static str]| {
        let (chat, completion, seeded) = (chat.clone(), completion.clone(), seeded.clone());
        async move {
            let s = Server::start(args).await;
            let mut texts = Vec::new();
            for body in [&chat, &completion, &chat, &seeded] {
                let (st, v) = s.post(if body.get("messages").is_some() { "/v1/chat/completions" } else { "/v1/completions" }, body.clone()).await;
                assert_eq!(st, 200, "{v}");
                texts.extend((0..v["choices"].as_array().unwrap().len()).map(|i| text_of(&v, i)));
            }
            texts
        }
    };
    let (a, b) = (run(&["--seed", "11"]).await, run(&["--seed", "11"]).await);
    assert_eq!(a, b, "one seed, the same requests in the same order");
    assert_eq!(a.len(), 7);
    let distinct: std::collections::HashSet<&String> = a[..6].iter().collect();
    assert_eq!(distinct.len(), 6, "each request and choice its own seed: {a:?}");
    let (c, d) = (run(&[]).await, run(&[]).await);
    assert_ne!(c[..6], d[..6], "without --seed, unseeded requests sample apart run to run");
    assert_eq!((&c[6], &d[6], &a[6]), (&b[6], &b[6], &b[6]), "a request's own seed, whatever the server's");
    let e = run(&["--seed", "12"]).await;
    assert_ne!(a[..6], e[..6], "another server seed, other samples");
}

/// SageMaker's routes as vLLM serves them: `/ping` (GET or POST) answers as /health does, and
/// `/invocations` runs a chat body as /v1/chat/completions and a completion body as
/// /v1/completions (the same greedy output, errors included); a body that is both or neither
/// is a 400.
#[tokio::test]
async fn sagemaker_ping_and_invocations() {
    let s = Server::start(&[]).await;
    for r in [s.client.get(s.url("/ping")).send().await.unwrap(), s.client.post(s.url("/ping")).send().await.unwrap()] {
        assert_eq!(r.status(), 200);
        assert_eq!(r.json::<Value>().await.unwrap(), json!({"status": "ok"}));
    }
    let chat = chat_body(json!({"max_tokens": 8, "temperature": 0}));
    let completion = json!({"prompt": "def f(x):", "max_tokens": 8, "temperature": 0});
    for (route, body, object) in [("/v1/chat/completions", chat, "chat.completion"), ("/v1/completions", completion, "text_completion")] {
        let ((st, direct), (st2, via)) = (s.post(route, body.clone()).await, s.post("/invocations", body.clone()).await);
        assert_eq!((st, st2, &via["object"]), (200, 200, &json!(object)), "{via}");
        // (The second of the two reads the first's prompt from the prefix cache.)
        assert_eq!((text_of(&via, 0), &via["usage"]["prompt_tokens"], &via["usage"]["completion_tokens"]), (text_of(&direct, 0), &direct["usage"]["prompt_tokens"], &direct["usage"]["completion_tokens"]), "{via} vs {direct}");
        let mut streamed = body.clone();
        streamed["stream"] = json!(true);
        assert_eq!(s.stream("/invocations", streamed).await.last().map(String::as_str), Some("[DONE]"));
        // The route's own checks.
        let mut bad = body.clone();
        bad["temperature"] = json!(-1);
        let ((_, want), (st, got)) = (s.post(route, bad.clone()).await, s.post("/invocations", bad).await);
        assert_eq!((st, &got["error"]["param"]), (400, &want["error"]["param"]), "{got}");
    }
    let (st, both) = s.post("/invocations", json!({"prompt": "x", "messages": [{"role": "user", "content": "x"}]})).await;
    assert!(st == 400 && both["error"]["message"].as_str().unwrap().contains("not both"), "{both}");
    let (st, neither) = s.post("/invocations", json!({"max_tokens": 1})).await;
    assert!(st == 400 && neither["error"]["message"].as_str().unwrap().contains("`messages`"), "{neither}");
    let (st, broken) = s.post_raw("/invocations", b"{\"prompt\": ".to_vec()).await;
    assert_eq!(st, 400, "{broken}");
    assert_eq!(s.post_raw("/invocations", b"[1]".to_vec()).await.0, 400);
}

/// The response's `id` carries the caller's id as vLLM's does: `chatcmpl-` / `cmpl-` and the
/// `X-Request-Id` header, else the body's `request_id`, else a random one; streamed chunks too.
/// Two unseeded sampled requests with one id still sample apart (the engine's seed is its own);
/// a bad `request_id` is a 400, a bad header is left out of the id.
#[tokio::test]
async fn response_ids_carry_the_callers_request_id() {
    let s = Server::start(&[]).await;
    let post = |path: &'static str, body: Value, header: Option<&'static str>| {
        let mut r = s.client.post(s.url(path)).json(&body);
        if let Some(h) = header {
            r = r.header("x-request-id", h);
        }
        async move {
            let r = r.send().await.unwrap();
            let (status, echoed) = (r.status().as_u16(), r.headers().get("x-request-id").map(|v| v.to_str().unwrap().to_owned()));
            let text = r.text().await.unwrap();
            (status, echoed, text)
        }
    };
    let chat = json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 24, "temperature": 1.5, "ignore_eos": true});
    let completion = json!({"prompt": "def f(x):", "max_tokens": 24, "temperature": 1.5, "ignore_eos": true});
    let id = |text: &str| serde_json::from_str::<Value>(text).unwrap_or_else(|_| panic!("{text}"))["id"].as_str().unwrap().to_owned();
    let with_field = |b: &Value, rid: &str| {
        let mut b = b.clone();
        b["request_id"] = json!(rid);
        b
    };
    for (path, body, prefix) in [("/v1/chat/completions", &chat, "chatcmpl-"), ("/v1/completions", &completion, "cmpl-")] {
        let (st, echoed, a) = post(path, body.clone(), Some("trace-42")).await;
        assert_eq!((st, echoed.as_deref(), id(&a)), (200, Some("trace-42"), format!("{prefix}trace-42")), "{a}");
        let (_, _, b) = post(path, body.clone(), Some("trace-42")).await;
        assert_eq!(id(&b), format!("{prefix}trace-42"));
        let text = |t: &str| serde_json::from_str::<Value>(t).unwrap()["choices"][0].to_string();
        assert_ne!(text(&a), text(&b), "one caller id, yet the same unseeded sample twice: the id seeded it");
        // The body's field, and the header over it.
        let (_, _, c) = post(path, with_field(body, "mine 1"), None).await;
        assert_eq!(id(&c), format!("{prefix}mine 1"));
        let (_, _, d) = post(path, with_field(body, "mine 1"), Some("theirs")).await;
        assert_eq!(id(&d), format!("{prefix}theirs"));
        // Neither: random, and unlike the next.
        let (_, _, e) = post(path, body.clone(), None).await;
        let (_, _, f) = post(path, body.clone(), None).await;
        assert!(id(&e).starts_with(prefix) && id(&e).len() > prefix.len() + 16 && id(&e) != id(&f), "{e} {f}");
        // Streamed: every chunk.
        let mut streamed = with_field(body, "streamed-7");
        streamed["stream"] = json!(true);
        let chunks = s.stream(path, streamed).await;
        let chunks: Vec<&String> = chunks.iter().filter(|c| *c != "[DONE]").collect();
        assert!(chunks.len() > 2 && chunks.iter().all(|c| id(c) == format!("{prefix}streamed-7")), "{chunks:?}");
        // A bad field is refused, naming it; a bad header (too long) is only not used.
        for bad in [json!(""), json!("x".repeat(257)), json!("a\nb"), json!(7)] {
            let mut b = body.clone();
            b["request_id"] = bad.clone();
            let (st, v) = s.post(path, b).await;
            assert_eq!((st, v["error"]["param"].as_str()), (400, Some("request_id")), "{bad}: {v}");
        }
        let long: &'static str = Box::leak("y".repeat(300).into_boxed_str());
        let (st, _, g) = post(path, body.clone(), Some(long)).await;
        assert!(st == 200 && !id(&g).contains("yyy"), "{g}");
    }
}

/// /tokenize's `return_token_strs` (vLLM's): each id's vocabulary string (byte-level symbols
/// such as `Ġ`, not decoded text), for a prompt and for a chat; `null` unless asked for.
#[tokio::test]
async fn tokenize_returns_token_strings_when_asked() {
    let s = Server::start(&[]).await;
    let tok: Value = serde_json::from_str(&std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/golden/default/tokenizer.json")).unwrap()).unwrap();
    let id_of = |piece: &str| tok["model"]["vocab"][piece].as_u64().or_else(|| tok["added_tokens"].as_array().unwrap().iter().find(|t| t["content"] == piece).and_then(|t| t["id"].as_u64()));
    for body in [json!({"prompt": "def hello world():", "return_token_strs": true}), json!({"messages": [{"role": "user", "content": "hello world"}], "return_token_strs": true})] {
        let (st, v) = s.post("/tokenize", body.clone()).await;
        assert_eq!(st, 200, "{v}");
        let (ids, strs) = (v["tokens"].as_array().unwrap(), v["token_strs"].as_array().unwrap_or_else(|| panic!("{v}")));
        assert_eq!(strs.len(), ids.len(), "{v}");
        for (id, piece) in ids.iter().zip(strs) {
            assert_eq!(id_of(piece.as_str().unwrap()), id.as_u64(), "{piece} names another token than {id}: {v}");
        }
        assert!(strs.iter().any(|p| p.as_str().unwrap().starts_with('Ġ')), "a word after a space is spelled as the vocabulary spells it: {v}");
        let mut plain = body;
        plain.as_object_mut().unwrap().remove("return_token_strs");
        let (_, p) = s.post("/tokenize", plain).await;
        assert_eq!((&p["tokens"], &p["token_strs"]), (&v["tokens"], &Value::Null), "{p}");
    }
}

/// `return_token_ids` (vLLM's): the prompt's ids (`prompt_token_ids`: on the response for chats,
/// on each choice for completions; streamed, on each choice's first chunk) and each choice's
/// output ids (`token_ids`; streamed, each chunk its own), the same streamed or not.
#[tokio::test]
async fn return_token_ids_gives_prompt_and_output_ids() {
    let s = Server::start(&[]).await;
    let messages = json!([{"role": "user", "content": "count to three"}]);
    let (_, t) = s.post("/tokenize", json!({"messages": messages})).await;
    let chat_prompt = t["tokens"].clone();
    let body = json!({"messages": messages, "max_tokens": 12, "temperature": 0, "ignore_eos": true, "return_token_ids": true});
    let (st, v) = s.post("/v1/chat/completions", body.clone()).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["prompt_token_ids"], chat_prompt, "{v}");
    let ids = v["choices"][0]["token_ids"].as_array().unwrap().clone();
    assert_eq!(ids.len(), 12, "{v}");
    let mut streamed_body = body.clone();
    streamed_body["stream"] = json!(true);
    let chunks: Vec<Value> = s.stream("/v1/chat/completions", streamed_body).await.iter().filter(|d| *d != "[DONE]").map(|d| serde_json::from_str(d).unwrap()).collect();
    assert_eq!(chunks[0]["prompt_token_ids"], chat_prompt, "{}", chunks[0]);
    assert!(chunks[1..].iter().all(|c| c.get("prompt_token_ids").is_none()), "prompt ids once");
    let streamed: Vec<Value> = chunks.iter().filter_map(|c| c["choices"][0]["token_ids"].as_array().cloned()).flatten().collect();
    assert_eq!(streamed, ids, "streamed ids");
    // Without the field, none of it.
    let (_, plain) = s.post("/v1/chat/completions", json!({"messages": messages, "max_tokens": 2})).await;
    assert!(plain.get("prompt_token_ids").is_none() && plain["choices"][0].get("token_ids").is_none(), "{plain}");

    // Completions: two prompts, two choices each.
    let prompts = ["one two", "three four five six"];
    let mut want = Vec::new();
    for p in prompts {
        let (_, t) = s.post("/tokenize", json!({"prompt": p})).await;
        want.push(t["tokens"].clone());
    }
    let body = json!({"prompt": prompts, "n": 2, "max_tokens": 5, "temperature": 0, "ignore_eos": true, "return_token_ids": true});
    let (_, v) = s.post("/v1/completions", body.clone()).await;
    for c in v["choices"].as_array().unwrap() {
        let i = c["index"].as_u64().unwrap() as usize;
        assert_eq!(c["prompt_token_ids"], want[i / 2], "{c}");
        assert_eq!(c["token_ids"].as_array().map(Vec::len), Some(5), "{c}");
    }
    let mut streamed_body = body;
    streamed_body["stream"] = json!(true);
    let chunks: Vec<Value> = s.stream("/v1/completions", streamed_body).await.iter().filter(|d| *d != "[DONE]").map(|d| serde_json::from_str(d).unwrap()).collect();
    for i in 0..4 {
        let mine: Vec<&Value> = chunks.iter().filter(|c| c["choices"][0]["index"] == i).collect();
        assert_eq!(mine[0]["choices"][0]["prompt_token_ids"], want[i / 2], "{}", mine[0]);
        assert!(mine[1..].iter().all(|c| c["choices"][0].get("prompt_token_ids").is_none()));
        let ids: Vec<Value> = mine.iter().filter_map(|c| c["choices"][0]["token_ids"].as_array().cloned()).flatten().collect();
        assert_eq!(Value::Array(ids), v["choices"][i]["token_ids"], "choice {i}");
    }
}

/// A chat's `echo` (vLLM's): where the final message is the assistant's (a prefill the reply
/// continues), the reply starts with its text, streamed as its own chunk after the role's; where
/// it is not, nothing changes.
#[tokio::test]
async fn chat_echo_starts_the_reply_with_the_assistant_prefill() {
    let s = Server::start(&[]).await;
    let prefill = json!([{"role": "user", "content": "tell a story"}, {"role": "assistant", "content": "Once upon"}]);
    let body = |echo: bool, messages: &Value| json!({"messages": messages, "continue_final_message": messages[messages.as_array().unwrap().len() - 1]["role"] == "assistant",
                                                      "echo": echo, "max_tokens": 6, "temperature": 0, "ignore_eos": true});
    let content = |v: &Value| v["choices"][0]["message"]["content"].as_str().unwrap_or_else(|| panic!("{v}")).to_owned();
    let (_, plain) = s.post("/v1/chat/completions", body(false, &prefill)).await;
    let (_, echoed) = s.post("/v1/chat/completions", body(true, &prefill)).await;
    assert_eq!(content(&echoed), format!("Once upon{}", content(&plain)), "{echoed}");
    let mut streamed = body(true, &prefill);
    streamed["stream"] = json!(true);
    let chunks: Vec<Value> = s.stream("/v1/chat/completions", streamed).await.iter().filter(|d| *d != "[DONE]").map(|d| serde_json::from_str(d).unwrap()).collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert_eq!(chunks[1]["choices"][0]["delta"]["content"], "Once upon", "{}", chunks[1]);
    let text: String = chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
    assert_eq!(text, content(&echoed));
    // The final message the user's: no echo.
    let user_last = json!([{"role": "user", "content": "tell a story"}]);
    let (_, a) = s.post("/v1/chat/completions", body(true, &user_last)).await;
    let (_, b) = s.post("/v1/chat/completions", body(false, &user_last)).await;
    assert_eq!(content(&a), content(&b));
}

/// vLLM's `prompt_logprobs`: per prompt token (null for the first) its logprob and rank, and its
/// k likeliest alternatives ranked 1..k, keyed by token id; the same logprobs as `echo` with
/// `logprobs` gives; the whole prompt even where the prefix cache holds it; once beside a chat's
/// choices; refused with a stream (0 aside) and past 20.
#[tokio::test]
async fn prompt_logprobs_give_each_prompt_tokens_logprob_and_rank() {
    let s = Server::start(&[]).await;
    // Three cache blocks' worth, its blocks cached first by a plain request (the second of two
    // finds them): prompt logprobs read the whole prompt all the same.
    let prompt = json!((11..51).collect::<Vec<u32>>());
    let plain = json!({"prompt": prompt, "max_tokens": 1});
    s.post("/v1/completions", plain.clone()).await;
    let (_, warm) = s.post("/v1/completions", plain).await;
    assert!(warm["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap() >= 32, "{warm}");
    let body = json!({"prompt": prompt, "max_tokens": 2, "temperature": 0, "prompt_logprobs": 3, "echo": true, "logprobs": 1});
    let (st, v) = s.post("/v1/completions", body.clone()).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["usage"]["prompt_tokens_details"]["cached_tokens"], 0, "{v}");
    let plp = v["choices"][0]["prompt_logprobs"].as_array().unwrap_or_else(|| panic!("{v}")).clone();
    let legacy = &v["choices"][0]["logprobs"];
    assert_eq!(plp.len(), 40);
    assert!(plp[0].is_null() && legacy["token_logprobs"][0].is_null());
    for (i, entry) in plp.iter().enumerate().skip(1) {
        let m = entry.as_object().unwrap_or_else(|| panic!("entry {i}: {entry}"));
        let id = prompt[i].as_u64().unwrap();
        // The token first, its alternatives after it.
        assert_eq!(m.keys().next(), Some(&id.to_string()), "entry {i}: {entry}");
        let own = &m[&id.to_string()];
        let (lp, rank) = (own["logprob"].as_f64().unwrap(), own["rank"].as_u64().unwrap());
        // The echo's logprob of the same token (its top list cut to its own `logprobs`: 1).
        assert_eq!(json!(lp), legacy["token_logprobs"][i], "entry {i}");
        assert_eq!(legacy["top_logprobs"][i].as_object().unwrap().len(), 1, "entry {i}");
        let (_, d) = s.post("/detokenize", json!({"tokens": [id]})).await;
        assert_eq!(own["decoded_token"], d["prompt"], "entry {i}");
        // The alternatives: ranks 1..3 in falling logprob; the token among them takes its
        // place's rank, and one not among them ranks below all three.
        let mut alts: Vec<(u64, f64)> = m.iter().filter(|(k, _)| **k != id.to_string()).map(|(_, e)| (e["rank"].as_u64().unwrap(), e["logprob"].as_f64().unwrap())).collect();
        alts.sort_by_key(|a| a.0);
        let in_top = m.len() == 3;
        assert!(m.len() == 3 || m.len() == 4, "entry {i}: {entry}");
        if in_top {
            alts.push((rank, lp));
            alts.sort_by_key(|a| a.0);
        } else {
            assert!(rank > 3 && lp <= alts[2].1, "entry {i}: {entry}");
        }
        assert_eq!(alts.iter().map(|a| a.0).collect::<Vec<_>>(), [1, 2, 3], "entry {i}: {entry}");
        assert!(alts.windows(2).all(|w| w[0].1 >= w[1].1), "entry {i}: {entry}");
        // Ranked first, it is the likeliest: the first alternative.
        assert!(lp <= 0.0, "entry {i}: {entry}");
        if rank == 1 {
            assert!(in_top && lp == alts[0].1, "entry {i}: {entry}");
        }
    }
    // Asked again: the whole prompt again, the same numbers.
    let (_, again) = s.post("/v1/completions", body).await;
    assert_eq!(again["usage"]["prompt_tokens_details"]["cached_tokens"], 0, "{again}");
    assert_eq!(again["choices"][0]["prompt_logprobs"], json!(plp));
    // 0: the token alone; without `echo` the text is the output's only.
    let (_, zero) = s.post("/v1/completions", json!({"prompt": prompt, "max_tokens": 2, "temperature": 0, "prompt_logprobs": 0})).await;
    let zero_lp = zero["choices"][0]["prompt_logprobs"].as_array().unwrap().clone();
    for (i, e) in zero_lp.iter().enumerate().skip(1) {
        let id = prompt[i].to_string();
        assert_eq!(e.as_object().unwrap().keys().collect::<Vec<_>>(), [&id]);
        assert_eq!(e[&id], plp[i][&id], "entry {i}");
    }
    assert!(text_of(&again, 0).ends_with(&text_of(&zero, 0)) && text_of(&again, 0).len() > text_of(&zero, 0).len());
    // Chats: once, beside the choices, one entry per prompt token.
    let (st, c) = s.post("/v1/chat/completions", chat_body(json!({"n": 2, "max_tokens": 2, "prompt_logprobs": 1}))).await;
    assert_eq!(st, 200, "{c}");
    let chat_lp = c["prompt_logprobs"].as_array().unwrap_or_else(|| panic!("{c}"));
    assert_eq!(chat_lp.len() as u64, c["usage"]["prompt_tokens"].as_u64().unwrap());
    assert!(chat_lp[0].is_null() && chat_lp[1..].iter().all(|e| (1..=2).contains(&e.as_object().unwrap().len())));
    assert!(c["choices"][0].get("prompt_logprobs").is_none());
    // Streams: only 0; the range is vLLM's, -1 (the whole vocabulary) past it.
    let streamed = |k: i64| json!({"prompt": "x", "max_tokens": 1, "stream": true, "prompt_logprobs": k});
    assert_eq!(s.stream("/v1/completions", streamed(0)).await.last().map(String::as_str), Some("[DONE]"));
    for (route, bad) in [("/v1/completions", streamed(1)), ("/v1/chat/completions", chat_body(json!({"stream": true, "prompt_logprobs": 2}))),
                         ("/v1/completions", json!({"prompt": "x", "prompt_logprobs": 21})), ("/v1/completions", json!({"prompt": "x", "prompt_logprobs": -1})),
                         ("/v1/chat/completions", chat_body(json!({"prompt_logprobs": -2})))] {
        let (st, v) = s.post(route, bad.clone()).await;
        assert_eq!((st, v["error"]["param"].as_str()), (400, Some("prompt_logprobs")), "{bad}: {v}");
    }
}

/// vLLM's `bad_words`: a word the greedy output had (one token, as /tokenize spells it) is never
/// sampled, on both routes, and the output changes; a bad word with no tokens, too many words or
/// a wrong type is a 400 naming the field.
#[tokio::test]
async fn bad_words_keep_a_word_out_of_the_output() {
    let s = Server::start(&[]).await;
    let ask = json!({"prompt": "def fibonacci(n):\n", "max_tokens": 24, "temperature": 0, "ignore_eos": true, "return_token_ids": true});
    let (_, free) = s.post("/v1/completions", ask.clone()).await;
    let ids: Vec<u64> = serde_json::from_value(free["choices"][0]["token_ids"].clone()).unwrap();
    // The first output token that /tokenize spells as itself alone (with or without its space).
    let mut word = None;
    for &id in &ids {
        let (_, d) = s.post("/detokenize", json!({"tokens": [id]})).await;
        let text = d["prompt"].as_str().unwrap().to_owned();
        let (_, t) = s.post("/tokenize", json!({"prompt": text.trim_start(), "add_special_tokens": false})).await;
        if !text.trim().is_empty() && t["tokens"] == json!([id]) {
            word = Some((id, text));
            break;
        }
    }
    let (id, text) = word.unwrap_or_else(|| panic!("no one-token word in {free}"));
    let mut banned = ask.clone();
    banned["bad_words"] = json!([text]);
    let (st, v) = s.post("/v1/completions", banned).await;
    assert_eq!(st, 200, "{v}");
    let out: Vec<u64> = serde_json::from_value(v["choices"][0]["token_ids"].clone()).unwrap();
    assert_eq!(out.len(), 24, "{v}");
    assert!(!out.contains(&id), "{text:?} ({id}) in {v}");
    assert_ne!(out, ids);
    let (st, v) = s.post("/v1/chat/completions", json!({"messages": [{"role": "user", "content": "Write fibonacci."}], "max_tokens": 24, "temperature": 0, "bad_words": [text], "return_token_ids": true})).await;
    assert_eq!(st, 200, "{v}");
    let out: Vec<u64> = serde_json::from_value(v["choices"][0]["token_ids"].clone()).unwrap();
    assert!(!out.is_empty() && !out.contains(&id), "{text:?} ({id}) in {v}");
    // Logprobs are the model's own, read before bias and bans: banned or biased away, the first
    // token changes but its position's alternatives are the free run's.
    let lp = |extra: Value| {
        let mut body = json!({"prompt": "def fibonacci(n):\n", "max_tokens": 1, "temperature": 0, "logprobs": 5});
        body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        let s = &s;
        async move { s.post("/v1/completions", body).await.1["choices"][0]["logprobs"].clone() }
    };
    let free_lp = lp(json!({})).await;
    let first = free_lp["tokens"][0].as_str().unwrap().to_owned();
    let first_id = ids[0];
    for extra in [json!({"logit_bias": {first_id.to_string(): -100}}), json!({"bad_words": [first]})] {
        let got = lp(extra.clone()).await;
        assert_ne!(got["tokens"][0], free_lp["tokens"][0], "{extra}: {got}");
        assert_eq!(got["top_logprobs"][0], free_lp["top_logprobs"][0], "{extra}: {got}");
        let chosen = got["tokens"][0].as_str().unwrap();
        assert_eq!(got["token_logprobs"][0], free_lp["top_logprobs"][0][chosen], "{extra}: {got}");
    }
    // Its only allowed token banned: nothing could be sampled.
    let (st, v) = s.post("/v1/completions", json!({"prompt": "def", "max_tokens": 2, "allowed_token_ids": [id], "bad_words": [text]})).await;
    assert_eq!(st, 400, "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("ban every token of `allowed_token_ids`"), "{v}");
    let many: Vec<String> = (0..300).map(|i| format!("w{i}")).collect();
    for (bad, words) in [(json!(["  "]), "has no tokens"), (json!(many), "at most 256"), (json!("fib"), "bad_words")] {
        let (st, v) = s.post("/v1/completions", json!({"prompt": "def", "max_tokens": 2, "bad_words": bad})).await;
        assert_eq!(st, 400, "{bad}: {v}");
        assert!(v["error"]["message"].as_str().unwrap().contains(words), "{bad}: {v}");
        if words != "bad_words" {
            assert_eq!(v["error"]["param"], "bad_words", "{v}");
        }
    }
}

/// `echo` with `max_tokens: 0` (OpenAI's legacy API, vLLM; how evaluation harnesses score a
/// text): the prompt and its logprobs alone, no completion tokens, finish `length`; streamed
/// the same; without `echo`, 0 is refused.
#[tokio::test]
async fn echo_with_max_tokens_0_scores_the_prompt_alone() {
    let s = Server::start(&[]).await;
    let body = |max: u64| json!({"prompt": "x = 1", "max_tokens": max, "echo": true, "logprobs": 1, "temperature": 0, "ignore_eos": true, "return_token_ids": true});
    let (st, v) = s.post("/v1/completions", body(0)).await;
    assert_eq!(st, 200, "{v}");
    let (_, more) = s.post("/v1/completions", body(3)).await;
    let n_prompt = v["usage"]["prompt_tokens"].as_u64().unwrap() as usize;
    assert_eq!((text_of(&v, 0).as_str(), v["usage"]["completion_tokens"].as_u64(), v["choices"][0]["finish_reason"].as_str()), ("x = 1", Some(0), Some("length")), "{v}");
    assert_eq!(v["choices"][0]["token_ids"], json!([]));
    let lp = &v["choices"][0]["logprobs"];
    for field in ["tokens", "token_logprobs", "top_logprobs", "text_offset"] {
        let want: Vec<Value> = more["choices"][0]["logprobs"][field].as_array().unwrap()[..n_prompt].to_vec();
        assert_eq!(lp[field], json!(want), "{field}");
    }
    let mut streamed = body(0);
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    let chunks: Vec<Value> = s.stream("/v1/completions", streamed).await.iter().filter(|d| *d != "[DONE]").map(|d| serde_json::from_str(d).unwrap()).collect();
    let text: String = chunks.iter().filter_map(|c| c["choices"][0]["text"].as_str()).collect();
    let finish: Vec<&Value> = chunks.iter().map(|c| &c["choices"][0]["finish_reason"]).filter(|f| !f.is_null()).collect();
    assert_eq!((text.as_str(), finish), ("x = 1", vec![&json!("length")]), "{chunks:?}");
    assert_eq!(chunks.last().unwrap()["usage"]["completion_tokens"], 0);
    let (st, v) = s.post("/v1/completions", json!({"prompt": "x", "max_tokens": 0})).await;
    assert_eq!((st, v["error"]["param"].as_str()), (400, Some("max_tokens")), "{v}");
}
