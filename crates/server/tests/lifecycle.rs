//! Overload (429 with Retry-After), shutdown on SIGTERM, and `compile-kernels`
//! without libnvrtc.

mod common;

use common::Server;
use futures::StreamExt;
use serde_json::json;

#[tokio::test]
async fn a_full_queue_answers_429_with_retry_after() {
    let s = Server::start(&["--max-num-seqs", "1", "--max-waiting", "1"]).await;
    let mut tasks = Vec::new();
    for i in 0..12 {
        let (client, url) = (s.client.clone(), s.url("/v1/completions"));
        tasks.push(tokio::spawn(async move {
            let r = client.post(url).json(&json!({"prompt": format!("x{i}"), "max_tokens": 200, "ignore_eos": true})).send().await.unwrap();
            let status = r.status().as_u16();
            let retry = r.headers().get("retry-after").map(|v| v.to_str().unwrap().to_owned());
            let body: serde_json::Value = r.json().await.unwrap();
            (status, retry, body)
        }));
    }
    let (mut ok, mut limited) = (0, 0);
    for t in tasks {
        let (status, retry, body) = t.await.unwrap();
        match status {
            200 => ok += 1,
            429 => {
                limited += 1;
                assert!(retry.is_some(), "429 without Retry-After");
                assert_eq!(body["error"]["type"], "rate_limit_error");
            }
            other => panic!("unexpected status {other}: {body}"),
        }
    }
    assert!(ok >= 1 && limited >= 1, "ok {ok}, limited {limited}");
}

/// A request's sequences (prompts x n) enter the queue together or not at all: more than the
/// whole queue is a 400 naming the limit (a 429 would be retried forever), and a refused
/// request leaves nothing behind (no sequence queued, then counted as aborted).
#[tokio::test]
async fn a_request_larger_than_the_queue_is_refused_whole() {
    let s = Server::start(&["--max-num-seqs", "4", "--max-waiting", "4"]).await;
    for _ in 0..2 {
        let (st, v) = s.post("/v1/completions", json!({"prompt": "x", "max_tokens": 2, "n": 8})).await;
        assert_eq!(st, 400, "{v}");
        assert!(v["error"]["message"].as_str().unwrap().contains("8 sequences"), "{v}");
        let (st, v) = s.post("/v1/completions", json!({"prompt": ["a", "b", "c"], "max_tokens": 2, "n": 2})).await;
        assert_eq!(st, 400, "{v}");
    }
    let (st, v) = s.post("/v1/completions", json!({"prompt": ["a", "b"], "max_tokens": 2, "n": 2})).await;
    assert_eq!((st, v["choices"].as_array().map(Vec::len)), (200, Some(4)), "{v}");
    let text = s.client.get(s.url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(!text.lines().any(|l| l.starts_with("vllm:request_success_total{finished_reason=\"abort\"") && !l.ends_with(" 0")), "refused requests counted as aborted:\n{text}");
}

#[cfg(unix)]
#[tokio::test]
async fn sigterm_ends_streams_cleanly_and_exits() {
    let mut s = Server::start(&[]).await;
    // A request that is not streamed, running when the signal comes: a 503 to retry, not a 200
    // holding part of an answer.
    let (client, url) = (s.client.clone(), s.url("/v1/completions"));
    let whole = tokio::spawn(async move {
        let r = client.post(url).json(&json!({"prompt": "y", "max_tokens": 3000, "ignore_eos": true})).send().await.unwrap();
        (r.status().as_u16(), r.json::<serde_json::Value>().await.unwrap())
    });
    while s.metric("vllm:num_requests_running").await < 1.0 {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let r = s.client.post(s.url("/v1/completions"))
        .json(&json!({"prompt": "x", "max_tokens": 3000, "ignore_eos": true, "stream": true}))
        .send().await.unwrap();
    let mut stream = r.bytes_stream();
    // Wait for the first chunk, then ask the server to stop.
    let first = stream.next().await.unwrap().unwrap();
    assert!(String::from_utf8_lossy(&first).contains("data: "));
    let pid = s.child.id().to_string();
    assert!(std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let mut rest = String::new();
    while let Some(c) = stream.next().await {
        rest.push_str(&String::from_utf8_lossy(&c.unwrap()));
    }
    assert!(rest.contains("\"finish_reason\":\"abort\""), "stream did not end with a finish chunk");
    assert!(rest.trim_end().ends_with("data: [DONE]"), "stream did not end with [DONE]: {}", &rest[rest.len().saturating_sub(200)..]);
    let (status, body) = whole.await.unwrap();
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["type"], "service_unavailable", "{body}");
    let status = tokio::task::spawn_blocking(move || s.child.wait().unwrap()).await.unwrap();
    assert!(status.success(), "server exit status {status}");
}

/// Sends SIGTERM to the server.
#[cfg(unix)]
fn terminate(child: &std::process::Child) {
    assert!(std::process::Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap().success());
}

/// A streamed request's body, read to its end.
async fn rest_of(stream: &mut (impl futures::Stream<Item = reqwest::Result<axum::body::Bytes>> + Unpin)) -> String {
    let mut rest = String::new();
    while let Some(c) = stream.next().await {
        rest.push_str(&String::from_utf8_lossy(&c.unwrap()));
    }
    rest
}

/// A streamed completion of `max_tokens` tokens that ignores EOS, once its first chunk came.
async fn streaming(s: &Server, max_tokens: usize) -> impl futures::Stream<Item = reqwest::Result<axum::body::Bytes>> + Unpin {
    let r = s.client.post(s.url("/v1/completions"))
        .json(&json!({"prompt": "x", "max_tokens": max_tokens, "ignore_eos": true, "stream": true, "stream_options": {"include_usage": true}}))
        .send().await.unwrap();
    assert_eq!(r.status(), 200);
    let mut stream = r.bytes_stream();
    let first = stream.next().await.unwrap().unwrap();
    assert!(String::from_utf8_lossy(&first).contains("data: "));
    stream
}

/// With `--shutdown-timeout`, SIGTERM drains: the requests running finish whole (streamed and
/// not), while new ones and /health get a 503 naming the shutdown (a load balancer takes the
/// replica out), and the server exits once they are done.
#[cfg(unix)]
#[tokio::test]
async fn sigterm_with_a_shutdown_timeout_lets_running_requests_finish() {
    let mut s = Server::start(&["--shutdown-timeout", "300"]).await;
    let (client, url) = (s.client.clone(), s.url("/v1/completions"));
    let whole = tokio::spawn(async move {
        let r = client.post(url).json(&json!({"prompt": "y", "max_tokens": 3000, "ignore_eos": true})).send().await.unwrap();
        (r.status().as_u16(), r.json::<serde_json::Value>().await.unwrap())
    });
    let mut stream = streaming(&s, 3000).await;
    while s.metric("vllm:num_requests_running").await < 2.0 {
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    terminate(&s.child);
    // Refused from now on; the first answer may come before the signal is handled.
    let t0 = std::time::Instant::now();
    while s.client.get(s.url("/health")).send().await.unwrap().status() == 200 {
        assert!(t0.elapsed().as_secs() < 10, "/health still 200 after SIGTERM");
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    let r = s.client.get(s.url("/health")).send().await.unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(r.json::<serde_json::Value>().await.unwrap()["error"]["code"], "shutting_down");
    let (status, body) = s.post("/v1/chat/completions", json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})).await;
    assert_eq!((status, body["error"]["code"].as_str()), (503, Some("shutting_down")), "{body}");
    assert!(s.metric("vllm:num_requests_running").await >= 1.0, "the running requests finished before the refusals were checked");
    let rest = rest_of(&mut stream).await;
    assert!(rest.contains("\"finish_reason\":\"length\""), "the stream was cut: {}", &rest[rest.len().saturating_sub(300)..]);
    assert!(rest.contains("\"completion_tokens\":3000"), "{}", &rest[rest.len().saturating_sub(300)..]);
    assert!(rest.trim_end().ends_with("data: [DONE]"));
    let (status, body) = whole.await.unwrap();
    assert_eq!((status, body["usage"]["completion_tokens"].as_u64()), (200, Some(3000)), "{body}");
    assert_eq!(body["choices"][0]["finish_reason"], "length");
    let status = tokio::task::spawn_blocking(move || s.child.wait().unwrap()).await.unwrap();
    assert!(status.success(), "server exit status {status}");
}

/// A drain ends when `--shutdown-timeout` passes, or at a second signal: what still runs is
/// aborted (streams end with `abort` and `[DONE]`) and the server exits.
#[cfg(unix)]
#[tokio::test]
async fn a_drain_ends_at_its_timeout_or_a_second_signal() {
    for second_signal in [false, true] {
        let timeout = if second_signal { "300" } else { "1" };
        let mut s = Server::start(&["--shutdown-timeout", timeout]).await;
        let mut stream = streaming(&s, 4000).await;
        terminate(&s.child);
        let t0 = std::time::Instant::now();
        if second_signal {
            // Still streaming after the first signal.
            let more = stream.next().await.unwrap().unwrap();
            assert!(String::from_utf8_lossy(&more).contains("\"text\""), "{}", String::from_utf8_lossy(&more));
            while s.client.get(s.url("/health")).send().await.unwrap().status() == 200 {
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
            terminate(&s.child);
        }
        let rest = rest_of(&mut stream).await;
        assert!(rest.contains("\"finish_reason\":\"abort\""), "second signal {second_signal}: {}", &rest[rest.len().saturating_sub(300)..]);
        assert!(rest.trim_end().ends_with("data: [DONE]"));
        assert!(t0.elapsed().as_secs() < 60, "the drain ran {:?}", t0.elapsed());
        let status = tokio::task::spawn_blocking(move || s.child.wait().unwrap()).await.unwrap();
        assert!(status.success(), "server exit status {status}");
    }
}

/// `peregrine serve ARGS` on a free port with its info-level log written to `log`.
fn spawn_logged(args: &[&str], log: &std::path::Path) -> (std::process::Child, u16) {
    let port = common::free_port();
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_peregrine"))
        .arg("serve")
        .args(args)
        .args(["--host", "127.0.0.1", "--port", &port.to_string(), "--kv-cache-memory", "64MiB"])
        .env("RUST_LOG", "info")
        .env_remove("PEREGRINE_DISABLE_ACCESS_LOG")
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap();
    (child, port)
}

/// Each request is logged once (method, path, status, time, the caller's X-Request-Id, which
/// comes back on the response), one whose client left before its answer as 499; probes of
/// /health are not at info level; `--disable-access-log` logs none.
#[tokio::test]
async fn requests_are_logged_with_the_callers_request_id() {
    let fixture = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/golden/default");
    for disabled in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        let mut args = vec![fixture];
        if disabled {
            args.push("--disable-access-log");
        }
        let (mut child, port) = spawn_logged(&args, &log);
        let base = format!("http://127.0.0.1:{port}");
        let client = reqwest::Client::new();
        let t0 = std::time::Instant::now();
        while !client.get(format!("{base}/health")).send().await.is_ok_and(|r| r.status() == 200) {
            assert!(t0.elapsed().as_secs() < 60, "the server never became healthy");
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        let r = client.post(format!("{base}/v1/completions")).header("x-request-id", "trace-42").json(&json!({"prompt": "x", "max_tokens": 2})).send().await.unwrap();
        assert_eq!((r.status().as_u16(), r.headers().get("x-request-id").map(|v| v.to_str().unwrap().to_owned())), (200, Some("trace-42".into())));
        let r = client.post(format!("{base}/v1/completions")).json(&json!({"prompt": "x", "max_tokens": -1})).send().await.unwrap();
        assert_eq!((r.status().as_u16(), r.headers().get("x-request-id")), (400, None));
        // A client that leaves before its (long, whole) answer: logged as 499.
        let gone = client.post(format!("{base}/v1/completions")).header("x-request-id", "gone-1").timeout(std::time::Duration::from_millis(300))
            .json(&json!({"prompt": "x", "max_tokens": 3000, "ignore_eos": true})).send().await;
        assert!(gone.is_err(), "answered within 300 ms: {gone:?}");
        let t0 = std::time::Instant::now();
        while !std::fs::read_to_string(&log).unwrap().contains("gone-1") && !disabled {
            assert!(t0.elapsed().as_secs() < 10, "no line for the request whose client left");
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        let _ = child.kill();
        let _ = child.wait();
        let text = std::fs::read_to_string(&log).unwrap();
        let lines: Vec<&str> = text.lines().filter(|l| l.contains("peregrine::access")).collect();
        if disabled {
            assert!(lines.is_empty(), "{text}");
            continue;
        }
        assert_eq!(lines.len(), 3, "one line per request, none for /health: {text}");
        assert!(lines[0].contains("method=\"POST\"") && lines[0].contains("path=\"/v1/completions\"") && lines[0].contains("status=200") && lines[0].contains("request_id=\"trace-42\""), "{}", lines[0]);
        assert!(lines[1].contains("status=400") && lines[1].contains("request_id=\"-\""), "{}", lines[1]);
        assert!(lines[2].contains("status=499") && lines[2].contains("request_id=\"gone-1\""), "{}", lines[2]);
    }
}

/// A signal while the model loads stops the server then, without loading the model to the end
/// first (a large model takes minutes; the process used to wait for it).
#[cfg(unix)]
#[tokio::test]
async fn a_signal_while_the_model_loads_exits_without_finishing_the_load() {
    // Random weights for the golden config made wider: ~1.5 s to make here, ~1 GB.
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/golden/default/config.json"), dir.path().join("config.json")).unwrap();
    let wide = r#"{"hidden_size": 1024, "moe_intermediate_size": 512, "n_routed_experts": 32}"#;
    let log = dir.path().join("log");
    let (mut child, port) = spawn_logged(&[dir.path().to_str().unwrap(), "--load-format", "dummy", "--hf-overrides", wide], &log);
    // The port answers (503, loading) long before the weights are made.
    let client = reqwest::Client::new();
    let t0 = std::time::Instant::now();
    loop {
        if let Ok(r) = client.get(format!("http://127.0.0.1:{port}/health")).send().await {
            assert_eq!(r.status(), 503, "loaded before the test could signal it");
            break;
        }
        assert!(t0.elapsed().as_secs() < 30 && child.try_wait().unwrap().is_none(), "the server never answered");
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    terminate(&child);
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap()).await.unwrap();
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(status.success(), "exit status {status}: {text}");
    assert!(text.contains("before the model was loaded"), "{text}");
    assert!(!text.contains(" ready "), "the load ran to its end before the server stopped: {text}");
}

/// Options that would serve wrongly or not at all are refused at start, with exit status 1 and
/// the option named: an empty API key (it would let every request in), a --chat-template that is
/// neither a file nor a template (a mistyped path rendered every chat as its text), an empty
/// served name, a body limit that refuses every request, vLLM's switch for unchunked prefill
/// (which is not there: the error says what does that).
#[test]
fn bad_startup_options_are_refused_before_serving() {
    for (args, words) in [
        (&["--api-key", ""][..], "--api-key"),
        (&["--chat-template", "/no/such/template.jinja"][..], "--chat-template"),
        (&["--chat-template", ""][..], "--chat-template"),
        (&["--served-model-name", " "][..], "--served-model-name"),
        (&["--max-body-bytes", "0"][..], "--max-body-bytes"),
        (&["--no-enable-chunked-prefill"][..], "--max-num-batched-tokens"),
    ] {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_peregrine"));
        cmd.args(["serve", "--port", "0"]).args(args).env_remove("PEREGRINE_API_KEY");
        let out = cmd.output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(err.contains(words), "{args:?}: {err}");
    }
}

/// `peregrine compile-kernels` on a machine without libnvrtc (CI's) fails with what to install
/// and exit status 1, writing nothing; with libnvrtc the lib tests (`compile::tests`) cover it.
#[test]
fn compile_kernels_without_nvrtc_says_what_is_missing() {
    if peregrine_cuda::compile::nvrtc_present() {
        eprintln!("skipped: this machine has libnvrtc");
        return;
    }
    let cache = std::env::temp_dir().join(format!("peregrine-ck-{}", std::process::id()));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_peregrine")).args(["compile-kernels", "--arch", "sm_90a"]).env("PEREGRINE_CACHE_DIR", &cache).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("libnvrtc (CUDA 13's NVRTC) was not found") && err.contains("LD_LIBRARY_PATH"), "{err}");
    assert!(!cache.exists(), "nothing written");
}

/// A connection that never finishes its request (a body that never arrives whole) does not keep
/// the server up after a signal: it exits once the connections had their grace after the engine
/// stopped, or at once at a further signal.
#[cfg(unix)]
#[tokio::test]
async fn a_stalled_connection_does_not_hold_the_exit() {
    use tokio::io::AsyncWriteExt;
    for second_signal in [true, false] {
        let mut s = Server::start(&[]).await;
        let addr = s.url("").trim_start_matches("http://").trim_end_matches('/').to_string();
        let mut stalled = tokio::net::TcpStream::connect(&addr).await.unwrap();
        stalled.write_all(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{").await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        terminate(&s.child);
        let t0 = std::time::Instant::now();
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        assert!(s.child.try_wait().unwrap().is_none(), "exited without waiting for the open request at all");
        if second_signal {
            terminate(&s.child);
        }
        let status = tokio::task::spawn_blocking(move || {
            while s.child.try_wait().unwrap().is_none() {
                assert!(t0.elapsed().as_secs() < 30, "still up 30 s after the signal");
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            s.child.wait().unwrap()
        })
        .await
        .unwrap();
        let took = t0.elapsed();
        assert!(status.success(), "exit status {status}");
        if second_signal {
            assert!(took.as_secs_f64() < 3.0, "a second signal took {took:?}");
        } else {
            assert!(took.as_secs_f64() >= 4.0, "closed before the grace: {took:?}");
        }
        drop(stalled);
    }
}
