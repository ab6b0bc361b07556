//! Speculative decoding over HTTP: same output as without, usage's completion_tokens_details,
//! spec-decode metrics, and the CLI's validation (speculation and device flags).

mod common;

use common::Server;
use serde_json::{json, Value};

const DRAFTER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/dflash/random");

fn body(stream: bool) -> Value {
    let mut b = json!({"messages": [{"role": "user", "content": "def main():"}], "max_tokens": 24,
           "temperature": 0.8, "seed": 42, "logprobs": true, "top_logprobs": 2, "stream": stream});
    if stream {
        b["stream_options"] = json!({"include_usage": true});
    }
    b
}

#[tokio::test]
async fn speculation_changes_nothing_but_speed_and_reports_drafts() {
    let plain = Server::start(&[]).await;
    // Every step drafts, so the counts below are exact; the adaptive default must agree too.
    let spec = Server::start(&["--speculative-model", DRAFTER, "--speculative-block-size", "4", "--speculative-mode", "always"]).await;
    let adaptive = Server::start(&["--speculative-model", DRAFTER, "--speculative-block-size", "4"]).await;
    let (st, a) = plain.post("/v1/chat/completions", body(false)).await;
    assert_eq!(st, 200, "{a}");
    let (st, b) = spec.post("/v1/chat/completions", body(false)).await;
    assert_eq!(st, 200, "{b}");
    assert_eq!(a["choices"], b["choices"], "seeded output differs with speculation");
    let (st, c) = adaptive.post("/v1/chat/completions", body(false)).await;
    assert_eq!(st, 200, "{c}");
    assert_eq!(a["choices"], c["choices"], "seeded output differs with adaptive speculation");
    assert!(adaptive.metric("vllm:spec_decode_num_drafts_total").await > 0.0, "the policy starts by speculating");
    assert!(a["usage"].get("completion_tokens_details").is_none());
    let d = &b["usage"]["completion_tokens_details"];
    let (acc, rej) = (d["accepted_prediction_tokens"].as_u64().unwrap(), d["rejected_prediction_tokens"].as_u64().unwrap());
    assert!(acc + rej > 0, "no drafts were proposed: {d}");
    assert_eq!(b["usage"]["completion_tokens"], a["usage"]["completion_tokens"]);
    // Streaming gives the same text, and the usage chunk carries the draft counts.
    let chunks = spec.stream("/v1/chat/completions", body(true)).await;
    let mut text = String::new();
    let mut usage = Value::Null;
    for c in chunks.iter().filter(|c| *c != "[DONE]") {
        let v: Value = serde_json::from_str(c).unwrap();
        if let Some(t) = v["choices"].get(0).and_then(|c| c["delta"]["content"].as_str()) {
            text.push_str(t);
        }
        if !v["usage"].is_null() {
            usage = v["usage"].clone();
        }
    }
    assert_eq!(text, b["choices"][0]["message"]["content"].as_str().unwrap());
    assert!(usage["completion_tokens_details"]["rejected_prediction_tokens"].as_u64().unwrap() > 0, "{usage}");
    // Metrics: two requests' drafts.
    let drafted = spec.metric("vllm:spec_decode_num_draft_tokens_total").await;
    let accepted = spec.metric("vllm:spec_decode_num_accepted_tokens_total").await;
    assert_eq!(drafted as u64, 2 * (acc + rej));
    assert_eq!(accepted as u64, 2 * acc);
    assert!(spec.metric("vllm:spec_decode_num_drafts_total").await > 0.0);
    assert_eq!(plain.metric("vllm:spec_decode_num_drafts_total").await, 0.0);
}

/// vLLM's `--speculative-config` is the same drafter and block as the two flags it stands for:
/// `num_speculative_tokens` 3 is a block of 4 (the drafter's own is 8), so the same seeded
/// output and the same accepted and rejected drafts.
#[tokio::test]
async fn speculative_config_is_the_flags_it_stands_for() {
    let config = format!(r#"{{"method": "dflash", "model": "{DRAFTER}", "num_speculative_tokens": 3}}"#);
    let flags = Server::start(&["--speculative-model", DRAFTER, "--speculative-block-size", "4", "--speculative-mode", "always"]).await;
    let json_form = Server::start(&["--speculative-config", &config, "--speculative-mode", "always"]).await;
    let (st, a) = flags.post("/v1/chat/completions", body(false)).await;
    assert_eq!(st, 200, "{a}");
    let (st, b) = json_form.post("/v1/chat/completions", body(false)).await;
    assert_eq!(st, 200, "{b}");
    assert_eq!(a["choices"], b["choices"]);
    assert_eq!(a["usage"], b["usage"]);
    let (drafted, rounds) = (json_form.metric("vllm:spec_decode_num_draft_tokens_total").await, json_form.metric("vllm:spec_decode_num_drafts_total").await);
    assert!(rounds > 0.0 && drafted <= 3.0 * rounds, "at most 3 drafts a round: {drafted} in {rounds}");
}

fn serve_fails(args: &[&str]) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_peregrine"))
        .arg("serve")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/golden/default"))
        .args(["--port", "0"])
        .args(args)
        .output()
        .unwrap();
    assert!(!out.status.success(), "serve {args:?} should fail");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn bad_speculation_flags_fail_clearly() {
    let e = serve_fails(&["--speculative-block-size", "4"]);
    assert!(e.contains("needs a drafter"), "{e}");
    let e = serve_fails(&["--speculative-model", DRAFTER, "--speculative-block-size", "17"]);
    assert!(e.contains("17") && e.contains("speculative-block-size"), "{e}");
    let e = serve_fails(&["--speculative-model", DRAFTER, "--speculative-mode", "sometimes"]);
    assert!(e.contains("sometimes") && e.contains("adaptive, always"), "{e}");
    let e = serve_fails(&["--speculative-model", "/nonexistent/drafter"]);
    assert!(e.contains("/nonexistent/drafter"), "{e}");
    // The JSON form without a model needs the model's own dflash/ subfolder (the fixture has none).
    let e = serve_fails(&["--speculative-config", r#"{"num_speculative_tokens": 3}"#]);
    assert!(e.contains("--speculative-config") && e.contains("dflash/"), "{e}");
    let e = serve_fails(&["--enable-auto-tool-choice", "--tool-call-parser", "none"]);
    assert!(e.contains("--enable-auto-tool-choice"), "{e}");
    // A drafter built for another target (hidden size 64 vs the demo model's 256) is refused.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_peregrine"))
        .args(["serve", "--port", "0", "--speculative-model", DRAFTER])
        .env("PEREGRINE_CACHE_DIR", std::env::temp_dir().join("peregrine-test-cache"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("hidden size"), "{e}");
}

/// `--device cuda` on a machine without a GPU fails at start-up, pointing at `--device cpu`.
#[test]
fn device_cuda_without_a_gpu_fails_clearly() {
    if has_driver() {
        eprintln!("skipped: this machine has an NVIDIA driver");
        return;
    }
    let e = serve_fails(&["--device", "cuda"]);
    assert!(e.contains("--device cpu"), "{e}");
}

fn has_driver() -> bool {
    std::path::Path::new("/usr/lib/x86_64-linux-gnu/libcuda.so.1").exists() || std::path::Path::new("/usr/lib64/libcuda.so.1").exists()
}
