//! A backend that is lost for good (a GPU context killed by a sticky CUDA error): the router is
//! served in-process over a backend whose every forward fails and whose health check reports
//! the loss. /health stays 200 until a step fails, then answers 503 naming the failure, and every
//! later request is refused with 503 and the same message.

use std::path::Path;
use std::sync::Arc;

use peregrine_core::backend::{Backend, KvBlockBytes, KvConfig, Logits, SeqForward};
use peregrine_core::{Error, ModelSpec, Result};
use peregrine_engine::{start_engine, EngineConfig};
use peregrine_server::routes::router;
use peregrine_server::state::{AppState, Ready, Settings};
use serde_json::{json, Value};

const FIX: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/golden/default");
const LOST: &str = "the GPU context is lost (injected CUDA_ERROR_ILLEGAL_ADDRESS); restart the server";

/// Every forward fails; the health check fails once a forward has.
struct Lost {
    spec: ModelSpec,
    forwards: usize,
}

impl Backend for Lost {
    fn spec(&self) -> &ModelSpec {
        &self.spec
    }
    fn kv_block_bytes(&self, _block_size: usize) -> KvBlockBytes {
        KvBlockBytes { full: 64, swa: 64 }
    }
    fn init_kv(&mut self, _config: KvConfig) -> Result<()> {
        Ok(())
    }
    fn forward(&mut self, _batch: &[SeqForward]) -> Result<Vec<Logits>> {
        self.forwards += 1;
        Err(Error::Backend("CUDA: CUDA_ERROR_ILLEGAL_ADDRESS".into()))
    }
    fn name(&self) -> &str {
        "lost"
    }
    fn check_health(&mut self) -> Result<()> {
        if self.forwards > 0 {
            return Err(Error::Backend(LOST.into()));
        }
        Ok(())
    }
}

async fn get(client: &reqwest::Client, url: &str) -> (u16, String) {
    let r = client.get(url).send().await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

async fn post(client: &reqwest::Client, url: &str, body: Value) -> (u16, Value) {
    let r = client.post(url).json(&body).send().await.unwrap();
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON ({status}): {text}")))
}

#[tokio::test]
async fn a_lost_backend_turns_health_and_requests_into_503() {
    let spec = peregrine_model::config::load_spec(Path::new(FIX)).unwrap();
    let tokenizer = peregrine_model::tokenizer::Tokenizer::from_file(&Path::new(FIX).join("tokenizer.json")).unwrap();
    let config = EngineConfig { max_model_len: 256, kv_cache_memory_bytes: 1 << 20, ..EngineConfig::default() };
    let engine = start_engine(Box::new(Lost { spec, forwards: 0 }), Arc::new(tokenizer), config).unwrap();
    let state = AppState::new(Settings { api_key: None, always_include_usage: false, parse_tool_calls: true, parse_reasoning: true, access_log: false, seed: None });
    assert!(state.ready.set(Ready { engine: engine.clone(), template: None, model_name: "lost".into(), created: 0, sampling_defaults: Default::default() }).is_ok());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let app = router(state, 1 << 20);
    tokio::spawn(async move { axum::serve(listener, app).await });
    let client = reqwest::Client::new();
    let url = |p: &str| format!("{base}{p}");

    // Healthy until a step fails.
    let (status, body) = get(&client, &url("/health")).await;
    assert_eq!((status, body.as_str()), (200, r#"{"status":"ok"}"#));

    // The first request's step fails: that request fails (500, as any failed request does).
    let (status, v) = post(&client, &url("/v1/completions"), json!({"prompt": "def f(x):", "max_tokens": 4})).await;
    assert_eq!(status, 500, "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains(LOST), "{v}");
    assert_eq!(engine.failure().as_deref(), Some(format!("backend: {LOST}").as_str()));

    // /health now names the failure in an OpenAI error object.
    let (status, body) = get(&client, &url("/health")).await;
    assert_eq!(status, 503, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    let err = v["error"].as_object().unwrap();
    assert_eq!(err.len(), 4, "{v}");
    assert!(err["message"].as_str().unwrap().contains(LOST), "{v}");
    assert_eq!(err["type"], "service_unavailable");
    assert_eq!(err["param"], Value::Null);
    assert_eq!(err["code"], "backend_failed");

    // Later requests are refused at submission with the same 503, streaming or not.
    for body in [json!({"prompt": "def g(y):", "max_tokens": 4}), json!({"prompt": "def g(y):", "max_tokens": 4, "stream": true})] {
        let (status, v) = post(&client, &url("/v1/completions"), body).await;
        assert_eq!(status, 503, "{v}");
        assert_eq!(v["error"], Value::Object(err.clone()), "{v}");
    }

    // The metrics say so too.
    let (_, metrics) = get(&client, &url("/metrics")).await;
    assert!(metrics.lines().any(|l| l.starts_with("peregrine:backend_failed{") && l.ends_with(" 1")), "{metrics}");
    let e = engine.clone();
    tokio::task::spawn_blocking(move || e.shutdown()).await.unwrap();
}
