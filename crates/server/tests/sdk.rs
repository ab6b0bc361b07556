//! The official OpenAI Python SDK (strict response validation) against the server. Needs the
//! repository's `.venv` with `openai` (scripts/test.sh prepares it); skips with a message when
//! it is absent.

mod common;

#[tokio::test]
async fn openai_python_sdk_conformance() {
    if common::sdk_python().is_none() {
        eprintln!("skipped: .venv with the openai SDK not found (run scripts/test.sh)");
        return;
    }
    let s = common::Server::start(&["--api-key", "sk-test"]).await;
    common::run_sdk_script("test_openai_sdk.py", &s.url("/v1")).await;
}
