//! `--load-format dummy` (random weights for a config.json alone, the stand-in tokenizer) and
//! `--hf-overrides`, served over HTTP on the CPU; and the clear errors of bad uses.

mod common;

use std::process::Command;

use common::Server;
use serde_json::json;

const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/golden/default");

/// A directory holding only the golden fixture's config.json (no weights, no tokenizer).
fn config_only() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(format!("{FIXTURE}/config.json"), dir.path().join("config.json")).unwrap();
    dir
}

/// The words of a stand-in tokenizer's text, as token ids.
fn ids(text: &str, vocab: u32) -> Vec<u32> {
    text.split_whitespace()
        .map(|w| {
            let id: u32 = w.strip_prefix('t').and_then(|n| n.parse().ok()).unwrap_or_else(|| panic!("`{w}` is not a stand-in token in {text:?}"));
            assert!(id < vocab, "{w} is past the vocabulary");
            id
        })
        .collect()
}

#[tokio::test]
async fn a_config_alone_serves_random_weights_with_the_stand_in_tokenizer() {
    let dir = config_only();
    let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.path().join("config.json")).unwrap()).unwrap();
    let vocab = cfg["vocab_size"].as_u64().unwrap() as u32;
    let s = Server::start(&[dir.path().to_str().unwrap(), "--load-format", "dummy", "--hf-overrides", r#"{"num_hidden_layers": 2}"#]).await;
    let body = json!({"prompt": "t1 t2 t3 t4 t5", "max_tokens": 12, "ignore_eos": true, "temperature": 0});
    let (status, r) = s.post("/v1/completions", body.clone()).await;
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["usage"]["prompt_tokens"], 5, "one token per word: {r}");
    assert_eq!(r["usage"]["completion_tokens"], 12, "{r}");
    let text = r["choices"][0]["text"].as_str().unwrap();
    assert_eq!(ids(text, vocab).len(), 12, "twelve stand-in words: {text:?}");
    // Greedy twice, and streamed: the same words (the weights are a function of the seed).
    let (_, again) = s.post("/v1/completions", body.clone()).await;
    assert_eq!(again["choices"][0]["text"], r["choices"][0]["text"]);
    let mut streamed = String::new();
    for d in s.stream("/v1/completions", json!({"prompt": "t1 t2 t3 t4 t5", "max_tokens": 12, "ignore_eos": true, "temperature": 0, "stream": true})).await {
        if d == "[DONE]" {
            break;
        }
        let v: serde_json::Value = serde_json::from_str(&d).unwrap();
        streamed.push_str(v["choices"][0]["text"].as_str().unwrap_or(""));
    }
    assert_eq!(ids(&streamed, vocab), ids(text, vocab), "streamed {streamed:?} against {text:?}");
    // A chat request needs a template, which a bare config does not have: a clear 400.
    let (status, r) = s.post("/v1/chat/completions", json!({"messages": [{"role": "user", "content": "t7"}], "max_tokens": 2})).await;
    assert_eq!(status, 400, "{r}");
    assert!(r["error"]["message"].as_str().unwrap().contains("template"), "{r}");
    // JSON mode needs token bytes, which the word-level stand-in tokenizer does not have: a 400
    // that says so, and the server serves on.
    let (status, r) = s.post("/v1/completions", json!({"prompt": "t1", "max_tokens": 2, "response_format": {"type": "json_object"}})).await;
    assert_eq!(status, 400, "{r}");
    assert!(r["error"]["message"].as_str().unwrap().contains("byte-level"), "{r}");
    let (status, _) = s.post("/v1/completions", body).await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn a_config_file_of_any_name_is_served_under_its_stem() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("tiny-mimo.json");
    std::fs::copy(format!("{FIXTURE}/config.json"), &cfg).unwrap();
    let s = Server::start(&[cfg.to_str().unwrap(), "--load-format", "dummy"]).await;
    let models: serde_json::Value = s.client.get(s.url("/v1/models")).send().await.unwrap().json().await.unwrap();
    assert_eq!(models["data"][0]["id"], "tiny-mimo", "{models}");
    let (status, r) = s.post("/v1/completions", json!({"model": "tiny-mimo", "prompt": "t3 t4", "max_tokens": 3, "ignore_eos": true})).await;
    assert_eq!((status, r["usage"]["completion_tokens"].as_u64()), (200, Some(3)), "{r}");
}

/// `peregrine serve ARGS` run to its exit: (success, stderr).
fn serve_exit(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_peregrine"))
        .args(["serve", "--port", "0"])
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("spawn peregrine");
    (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn bad_overrides_and_oversized_models_are_refused_before_serving() {
    let dir = config_only();
    let path = dir.path().to_str().unwrap();
    let (ok, err) = serve_exit(&[path, "--load-format", "dummy", "--hf-overrides", "[1, 2]"]);
    assert!(!ok && err.contains("expected a JSON object"), "{err}");
    let (ok, err) = serve_exit(&[path, "--load-format", "dummy", "--hf-overrides", "{num_hidden_layers: 2}"]);
    assert!(!ok && err.contains("not JSON"), "{err}");
    // A key config.json does not have (a typo of num_hidden_layers) is said, not passed over.
    let (ok, err) = serve_exit(&[path, "--load-format", "dummy", "--hf-overrides", r#"{"num_hidden_layer": 1}"#, "--max-model-len", "1000000"]);
    assert!(!ok && err.contains("num_hidden_layer = 1 is not a field of config.json"), "{err}");
    // Without random weights a config alone has nothing to load.
    let (ok, err) = serve_exit(&[path]);
    assert!(!ok && err.contains("cannot open model"), "{err}");
    // A dense MLP of 10^9 rows, or MiMo-V2-Flash whole: terabytes of f32 on the CPU, refused
    // with the numbers before anything is allocated.
    let (ok, err) = serve_exit(&[path, "--load-format", "dummy", "--hf-overrides", r#"{"intermediate_size": 1000000000}"#]);
    assert!(!ok && err.contains("holds every weight as f32") && err.contains("GB"), "{err}");
    let flash = concat!(env!("CARGO_MANIFEST_DIR"), "/../../configs/mimo-v2-flash.json");
    let (ok, err) = serve_exit(&[flash, "--load-format", "dummy"]);
    assert!(!ok && err.contains("holds every weight as f32"), "{err}");
}

#[test]
fn gpu_memory_utilization_is_refused_off_the_gpu_out_of_range_and_beside_a_byte_size() {
    let dir = config_only();
    let path = dir.path().to_str().unwrap();
    let (ok, err) = serve_exit(&[path, "--load-format", "dummy", "--gpu-memory-utilization", "0.9"]);
    assert!(!ok && err.contains("--device cuda") && err.contains("--kv-cache-memory"), "{err}");
    for bad in ["0", "1.5", "-0.2", "most"] {
        let (ok, err) = serve_exit(&[path, "--load-format", "dummy", "--device", "cuda", "--gpu-memory-utilization", bad]);
        assert!(!ok && err.contains("--gpu-memory-utilization"), "{bad}: {err}");
    }
    let (ok, err) = serve_exit(&[path, "--load-format", "dummy", "--device", "cuda", "--gpu-memory-utilization", "0.9", "--kv-cache-memory", "1GiB"]);
    assert!(!ok && err.contains("cannot be used with"), "{err}");
}

#[test]
fn logs_written_to_a_pipe_have_no_colour_codes() {
    let dir = config_only();
    // Loads the random weights (a warning is logged), then refuses the context length.
    let (ok, err) = serve_exit(&[dir.path().to_str().unwrap(), "--load-format", "dummy", "--max-model-len", "1000000"]);
    assert!(!ok && err.contains("random weights") && err.contains("exceeds"), "{err}");
    assert!(!err.contains('\u{1b}'), "ANSI escapes in piped logs: {err:?}");
}
