//! A spawned `peregrine serve` on 127.0.0.1 with a free port, killed on drop.

#![allow(dead_code)]

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A port for a spawned server, free when asked. Not bind(0)'s: that port is released before the
/// server binds it, and meanwhile it may become the source port of a client connection (Linux
/// takes both from 32768-60999; CI once saw a server exit with "Address already in use"). These
/// come from 20000-31999, counted within the test binary so that its parallel tests differ.
pub fn free_port() -> u16 {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let start = std::process::id().wrapping_mul(7919);
    for _ in 0..12000 {
        let port = 20000 + (start.wrapping_add(NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)) % 12000) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in 20000-31999");
}

pub struct Server {
    pub child: Child,
    pub base: String,
    pub client: reqwest::Client,
}

impl Server {
    /// A server on the small random golden model (fast, deterministic), unless `extra` starts
    /// with a model path.
    pub async fn start(extra: &[&str]) -> Server {
        let fixture = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/golden/default");
        let mut args: Vec<&str> = Vec::new();
        if extra.first().is_none_or(|a| a.starts_with("--")) {
            args.push(fixture);
        }
        args.extend_from_slice(extra);
        Self::spawn(&args).await
    }

    /// A server on the embedded default model (no MODEL argument).
    pub async fn start_embedded(extra: &[&str]) -> Server {
        Self::spawn(extra).await
    }

    async fn spawn(extra: &[&str]) -> Server {
        let port = free_port();
        let cache = std::env::temp_dir().join("peregrine-test-cache");
        let child = Command::new(env!("CARGO_BIN_EXE_peregrine"))
            .args(["serve", "--host", "127.0.0.1", "--port", &port.to_string(), "--kv-cache-memory", "64MiB"])
            .args(extra)
            .env("PEREGRINE_CACHE_DIR", cache)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn peregrine");
        let mut s = Server { child, base: format!("http://127.0.0.1:{port}"), client: reqwest::Client::new() };
        let t0 = Instant::now();
        loop {
            if let Some(status) = s.child.try_wait().unwrap() {
                panic!("server exited during start-up: {status}");
            }
            if let Ok(r) = s.client.get(format!("{}/health", s.base)).send().await {
                if r.status() == 200 {
                    return s;
                }
            }
            assert!(t0.elapsed() < Duration::from_secs(60), "server did not become healthy");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub async fn post(&self, path: &str, body: serde_json::Value) -> (u16, serde_json::Value) {
        let r = self.client.post(self.url(path)).json(&body).send().await.unwrap();
        let status = r.status().as_u16();
        let text = r.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON ({status}): {text}")))
    }

    pub async fn post_raw(&self, path: &str, body: Vec<u8>) -> (u16, serde_json::Value) {
        let r = self.client.post(self.url(path)).header("content-type", "application/json").body(body).send().await.unwrap();
        let status = r.status().as_u16();
        let text = r.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON ({status}): {text}")))
    }

    /// A streamed request's `data:` payloads, in order.
    pub async fn stream(&self, path: &str, body: serde_json::Value) -> Vec<String> {
        let r = self.client.post(self.url(path)).json(&body).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert!(r.headers()["content-type"].to_str().unwrap().starts_with("text/event-stream"));
        let text = r.text().await.unwrap();
        text.lines().filter_map(|l| l.strip_prefix("data: ")).map(str::to_owned).collect()
    }

    pub async fn metric(&self, name: &str) -> f64 {
        let text = self.client.get(self.url("/metrics")).send().await.unwrap().text().await.unwrap();
        text.lines()
            .find(|l| l.starts_with(name) && (l.as_bytes().get(name.len()) == Some(&b'{') || l.as_bytes().get(name.len()) == Some(&b' ')))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("metric {name} missing"))
    }
}

/// The repository's `.venv` Python, where it has the openai SDK (scripts/test.sh prepares it).
pub fn sdk_python() -> Option<std::path::PathBuf> {
    let python = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.venv/bin/python");
    let has_sdk = python.is_file() && Command::new(&python).args(["-c", "import openai"]).status().is_ok_and(|s| s.success());
    has_sdk.then_some(python)
}

/// Whether the repository's `.venv` Python can import `module`.
pub fn python_has(module: &str) -> bool {
    let python = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.venv/bin/python");
    python.is_file() && Command::new(&python).args(["-c", &format!("import {module}")]).status().is_ok_and(|s| s.success())
}

/// Runs tests/sdk/`script` against `base_url` with the SDK's Python and asserts it passed
/// ("all checks passed"); skips with a message where the `.venv` is absent.
pub async fn run_sdk_script(script: &str, base_url: &str) {
    let Some(python) = sdk_python() else {
        eprintln!("skipped: .venv with the openai SDK not found (run scripts/test.sh)");
        return;
    };
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/sdk").join(script);
    let out = tokio::process::Command::new(&python).arg(path).arg(base_url).output().await.unwrap();
    let text = format!("{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{script} failed:\n{text}");
    assert!(text.contains("all checks passed"), "{text}");
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
