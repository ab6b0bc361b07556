//! Sampling defaults from the model directory's generation_config.json (vLLM's
//! `--generation-config auto`): a request's unset fields take them, its own fields win, and
//! `--generation-config none` ignores the file. Served on the CPU over HTTP.

mod common;

use common::Server;
use serde_json::{json, Value};

const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/golden/default");

/// The golden fixture model with `generation` as its generation_config.json.
fn model_with(generation: Value) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(format!("{FIXTURE}/{f}"), dir.path().join(f)).unwrap();
    }
    std::fs::write(dir.path().join("generation_config.json"), generation.to_string()).unwrap();
    dir
}

async fn complete(s: &Server, extra: Value) -> (usize, String) {
    let mut body = json!({"prompt": "def add(a, b):", "ignore_eos": true});
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    let (status, r) = s.post("/v1/completions", body).await;
    assert_eq!(status, 200, "{r}");
    (r["usage"]["completion_tokens"].as_u64().unwrap() as usize, r["choices"][0]["text"].as_str().unwrap().to_owned())
}

#[tokio::test]
async fn unset_fields_take_the_model_s_defaults() {
    let dir = model_with(json!({"temperature": 0.0, "max_new_tokens": 5, "eos_token_id": 1}));
    let path = dir.path().to_str().unwrap();
    let s = Server::start(&[path, "--max-model-len", "64"]).await;
    // Unset: greedy (the file's temperature 0) and 5 tokens (its max_new_tokens), twice the same.
    let greedy = complete(&s, json!({"temperature": 0, "max_tokens": 5})).await;
    assert_eq!(greedy.0, 5);
    assert_eq!(complete(&s, json!({})).await, greedy);
    assert_eq!(complete(&s, json!({})).await, greedy);
    // The request's own fields win: a longer completion, and sampling with its seed.
    let (n, text) = complete(&s, json!({"max_tokens": 9})).await;
    assert_eq!(n, 9);
    assert!(text.starts_with(&greedy.1), "greedy continues: {text:?} / {:?}", greedy.1);
    let a = complete(&s, json!({"temperature": 1.0, "seed": 3, "max_tokens": 5})).await;
    assert_eq!(complete(&s, json!({"temperature": 1.0, "seed": 3, "max_tokens": 5})).await, a);
    // The default cap never asks for more than the context leaves.
    let long_prompt: Vec<u32> = (0..60).map(|i| 10 + i).collect();
    let (status, r) = s.post("/v1/completions", json!({"prompt": long_prompt, "ignore_eos": true})).await;
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["usage"]["completion_tokens"], 4, "64 - 60 tokens of room: {r}");
}

/// `--generation-config DIR` (vLLM's folder form) takes that directory's file, not the model's.
#[tokio::test]
async fn a_directory_gives_its_own_file() {
    let model = model_with(json!({"max_new_tokens": 9}));
    let other = tempfile::tempdir().unwrap();
    std::fs::write(other.path().join("generation_config.json"), json!({"temperature": 0.0, "max_new_tokens": 3}).to_string()).unwrap();
    let s = Server::start(&[model.path().to_str().unwrap(), "--max-model-len", "64", "--generation-config", other.path().to_str().unwrap()]).await;
    let greedy = complete(&s, json!({"temperature": 0, "max_tokens": 3})).await;
    assert_eq!(greedy.0, 3);
    assert_eq!(complete(&s, json!({})).await, greedy, "the directory's cap (3) and temperature (0), not the model's cap (9)");
}

#[tokio::test]
async fn none_ignores_the_file_and_bad_fields_are_left_out() {
    let dir = model_with(json!({"temperature": 0.0, "max_new_tokens": 5}));
    let s = Server::start(&[dir.path().to_str().unwrap(), "--max-model-len", "64", "--generation-config", "none"]).await;
    let (status, r) = s.post("/v1/completions", json!({"prompt": [10, 11, 12, 13], "ignore_eos": true})).await;
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["usage"]["completion_tokens"], 60, "up to the context without the file's cap: {r}");
    drop(s);
    // A default no request could send (temperature 9) is left out; the valid one still applies.
    let dir = model_with(json!({"temperature": 9.0, "max_new_tokens": 3}));
    let s = Server::start(&[dir.path().to_str().unwrap(), "--max-model-len", "64"]).await;
    let (status, r) = s.post("/v1/completions", json!({"prompt": "x = ", "ignore_eos": true})).await;
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["usage"]["completion_tokens"], 3, "{r}");
}
