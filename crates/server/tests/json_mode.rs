//! JSON mode over HTTP (`response_format: {"type": "json_object"}`) on the CPU reference backend
//! and the golden fixture model (random weights, so only the constraint makes its output JSON):
//! a finished output is a JSON object and ends where the object closes; a cut one is a prefix
//! of one; streamed the same; with speculation on too.

mod common;

use common::Server;
use peregrine_engine::json_mode::JsonState;
use serde_json::{json, Value};

/// The token id of `text` (one token) in the served model's vocabulary.
async fn token(s: &Server, text: &str) -> u64 {
    let (status, r) = s.post("/tokenize", json!({"prompt": text, "add_special_tokens": false})).await;
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["count"], 1, "{text:?} is not one token: {r}");
    r["tokens"][0].as_u64().unwrap()
}

/// Whether `text` is a prefix of a JSON object (the automaton's own unit tests check it
/// against serde_json).
fn json_prefix(text: &str) -> bool {
    let mut st = JsonState::default();
    text.bytes().all(|b| st.push(b))
}

fn chat(extra: Value) -> Value {
    let mut body = json!({"messages": [{"role": "user", "content": "Describe a cat as JSON."}], "response_format": {"type": "json_object"}});
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

#[tokio::test]
async fn outputs_are_json_objects_that_end_where_they_close() {
    let s = Server::start(&["--max-model-len", "512"]).await;
    // Greedy, with the quote and the closing brace pushed up: the object closes within a few
    // tokens, and the output ends right there (no EOS needed; finish_reason stop).
    let quote = token(&s, "\"").await;
    let close = token(&s, "}").await;
    let bias = json!({quote.to_string(): 100, close.to_string(): 50});
    let (status, v) = s.post("/v1/chat/completions", chat(json!({"temperature": 0, "max_tokens": 100, "logit_bias": bias}))).await;
    assert_eq!(status, 200, "{v}");
    let text = v["choices"][0]["message"]["content"].as_str().unwrap().to_owned();
    assert_eq!(v["choices"][0]["finish_reason"], "stop", "{v}");
    let obj: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
    assert!(obj.is_object() && text.trim_start().starts_with('{') && text.ends_with('}'), "{text:?}");
    // Streamed: the same text.
    let mut body = chat(json!({"temperature": 0, "max_tokens": 100, "logit_bias": bias, "stream": true}));
    body["stream"] = json!(true);
    let chunks = s.stream("/v1/chat/completions", body).await;
    let streamed: String = chunks
        .iter()
        .filter(|c| *c != "[DONE]")
        .filter_map(|c| serde_json::from_str::<Value>(c).ok()?["choices"][0]["delta"]["content"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(streamed, text);

    // Sampled, 6 seeds, both routes: every output is a JSON object prefix, whole where it stopped.
    let mut whole = 0;
    for seed in 0..6 {
        let (status, v) = s.post("/v1/chat/completions", chat(json!({"temperature": 1.0, "seed": seed, "max_tokens": 48}))).await;
        assert_eq!(status, 200, "{v}");
        let text = v["choices"][0]["message"]["content"].as_str().unwrap();
        assert!(json_prefix(text), "seed {seed}: {text:?} is not a JSON object's prefix");
        match v["choices"][0]["finish_reason"].as_str().unwrap() {
            "stop" => {
                assert!(serde_json::from_str::<Value>(text).is_ok_and(|o| o.is_object()), "seed {seed}: {text:?}");
                whole += 1;
            }
            "length" => assert_eq!(v["usage"]["completion_tokens"], 48, "{v}"),
            other => panic!("finish_reason {other}: {v}"),
        }
        let (status, v) = s
            .post("/v1/completions", json!({"prompt": "x = ", "temperature": 1.0, "seed": seed, "max_tokens": 48, "response_format": {"type": "json_object"}}))
            .await;
        assert_eq!(status, 200, "{v}");
        assert!(json_prefix(v["choices"][0]["text"].as_str().unwrap()), "{v}");
    }
    eprintln!("{whole} of 6 sampled outputs closed within 48 tokens");
}

#[tokio::test]
async fn json_mode_with_speculation_and_schemas_refused() {
    // The demo model with its DFlash drafter: JSON-mode requests decode without drafts, beside
    // requests that speculate.
    let s = Server::start_embedded(&["--max-model-len", "512"]).await;
    let (status, v) = s.post("/v1/chat/completions", chat(json!({"temperature": 0.7, "seed": 1, "max_tokens": 40}))).await;
    assert_eq!(status, 200, "{v}");
    assert!(json_prefix(v["choices"][0]["message"]["content"].as_str().unwrap()), "{v}");
    let plain = json!({"prompt": "def f(x):\n", "temperature": 0, "max_tokens": 24});
    let (status, alone) = s.post("/v1/completions", plain.clone()).await;
    assert_eq!(status, 200, "{alone}");
    // Both at once, so they share steps: the plain request's greedy text is what it was alone
    // (its drafts verified beside a sequence that has none), and the JSON one still an object's.
    let json_req = chat(json!({"temperature": 0, "max_tokens": 40}));
    let ((st1, together), (st2, j)) = tokio::join!(s.post("/v1/completions", plain), s.post("/v1/chat/completions", json_req));
    assert_eq!((st1, st2), (200, 200), "{together} {j}");
    assert_eq!(together["choices"][0]["text"], alone["choices"][0]["text"]);
    assert!(json_prefix(j["choices"][0]["message"]["content"].as_str().unwrap()), "{j}");
    let (status, v) = s.post("/v1/chat/completions", chat(json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}}))).await;
    assert_eq!(status, 400, "{v}");
    assert_eq!(v["error"]["param"], "response_format");
}
