//! The official OpenAI Python SDK (strict response validation) against the server. Needs the
//! repository's `.venv` with `openai` (scripts/test.sh prepares it); skips with a message when
//! it is absent.

mod common;

use std::path::PathBuf;

#[tokio::test]
async fn openai_python_sdk_conformance() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let python = root.join(".venv/bin/python");
    let has_sdk = python.is_file()
        && std::process::Command::new(&python).args(["-c", "import openai"]).status().is_ok_and(|s| s.success());
    if !has_sdk {
        eprintln!("skipped: .venv with the openai SDK not found (run scripts/test.sh)");
        return;
    }
    let s = common::Server::start(&["--api-key", "sk-test"]).await;
    let out = tokio::process::Command::new(&python)
        .arg(root.join("tests/sdk/test_openai_sdk.py"))
        .arg(s.url("/v1"))
        .output()
        .await
        .unwrap();
    let text = format!("{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "SDK conformance failed:\n{text}");
    assert!(text.contains("all checks passed"), "{text}");
}
