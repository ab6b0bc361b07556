//! schemathesis against OpenAI's OpenAPI spec (kept in ../shared/openai/openapi.yaml, never
//! copied into the repository), restricted to createChatCompletion, createCompletion,
//! createResponse and listModels: generated requests must never get a 5xx. Skips with a message when the spec or
//! the `.venv` with schemathesis is absent.

mod common;

use std::path::PathBuf;

#[tokio::test]
async fn openapi_fuzzing_finds_no_server_errors() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let spec = root.join("../shared/openai/openapi.yaml");
    let tool = root.join(".venv/bin/schemathesis");
    if !spec.is_file() {
        eprintln!("skipped: {} not found", spec.display());
        return;
    }
    if !tool.is_file() {
        eprintln!("skipped: .venv/bin/schemathesis not found (run scripts/test.sh)");
        return;
    }
    let s = common::Server::start(&["--max-model-len", "512"]).await;
    let out = tokio::process::Command::new(&tool)
        .arg("run")
        .arg(&spec)
        .args(["--url", &s.url("/v1")])
        .args(["--include-operation-id", "createChatCompletion", "--include-operation-id", "createCompletion", "--include-operation-id", "createResponse", "--include-operation-id", "listModels"])
        .args(["--checks", "not_a_server_error", "--max-examples", "30", "--generation-deterministic"])
        .env("NO_COLOR", "1")
        // schemathesis keeps a cache in its working directory: under target/, not in the tree.
        .current_dir(env!("CARGO_TARGET_TMPDIR"))
        .output()
        .await
        .unwrap();
    let text = format!("{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "schemathesis found failures:\n{text}");
    assert!(text.contains("Tested: 4"), "schemathesis did not test the 4 operations:\n{text}");
}
