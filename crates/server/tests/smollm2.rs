//! The real SmolLM2-135M-Instruct GGUF served over HTTP: a greedy answer that knows the capital
//! of France, and a streamed multi-turn chat through the OpenAI SDK. Skips when the GGUF was not
//! fetched (scripts/fetch-test-assets.sh) or the SDK venv is absent.

mod common;

use std::path::PathBuf;

use serde_json::json;

#[tokio::test]
async fn smollm2_answers_over_http() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let gguf = std::env::var_os("PEREGRINE_SMOLLM2_GGUF")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target/test-assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"));
    if !gguf.is_file() {
        eprintln!("skipped: {} not found (run scripts/fetch-test-assets.sh)", gguf.display());
        return;
    }
    let s = common::Server::start(&[gguf.to_str().unwrap(), "--max-model-len", "1024"]).await;
    let (st, v) = s
        .post("/v1/chat/completions", json!({"messages": [{"role": "user", "content": "What is the capital of France?"}], "temperature": 0, "max_tokens": 32}))
        .await;
    assert_eq!(st, 200, "{v}");
    let answer = v["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(answer.contains("Paris"), "answer: {answer}");
    assert_eq!(v["choices"][0]["finish_reason"], "stop", "the model ends its answer with <|im_end|>");

    let python = root.join(".venv/bin/python");
    if !python.is_file() {
        eprintln!("skipped: SDK part (.venv absent)");
        return;
    }
    let out = tokio::process::Command::new(&python).arg(root.join("tests/sdk/test_smollm2_chat.py")).arg(s.url("/v1")).output().await.unwrap();
    let text = format!("{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    eprintln!("{text}");
    assert!(out.status.success() && text.contains("smollm2 multi-turn: ok"), "{text}");
}
