//! Load generator for a running Peregrine (or any OpenAI-compatible) server: streamed text
//! completions at several concurrency levels; reports TTFT, inter-token latency (gaps between
//! streamed chunks) and output tokens/s (from the usage chunk, over the level's wall time, so
//! prefills and first tokens count against it).
//!
//!     cargo run --release -p peregrine-server --example loadgen -- [URL] [CONCURRENCY,...] [REQUESTS] [MAX_TOKENS]
//!         [--temperature T] [--prompt-words N [--vocab V]]
//!     e.g. loadgen http://127.0.0.1:8000 1,4,16,64 64 64
//!
//! `--prompt-words N`: each prompt is N random words `t0` .. `t{V-1}` (V: `--vocab`, default
//! MiMo-V2-Flash's 152576), which a server with random weights and the stand-in tokenizer
//! (`peregrine serve CONFIG --load-format dummy`) reads as exactly N tokens, all prompts distinct.
//! Without it, short code prompts for a real tokenizer. `--temperature` (default 0.7, seeded per
//! request; 0: greedy).

use std::time::{Duration, Instant};

use clap::{ArgAction, Parser};
use futures::StreamExt;
use serde_json::{json, Value};

/// Streamed text completions at several concurrency levels: TTFT, inter-token latency, output tokens/s.
#[derive(Parser)]
struct Args {
    /// The server's base URL.
    #[arg(value_name = "URL", default_value = "http://127.0.0.1:8000")]
    url: String,
    /// Concurrency levels (comma-separated), one run each.
    #[arg(value_name = "CONCURRENCY,...", default_value = "1,4,16,64", value_delimiter = ',', num_args = 1, action = ArgAction::Set)]
    levels: Vec<usize>,
    /// Requests per level.
    #[arg(value_name = "REQUESTS", default_value_t = 64)]
    requests: usize,
    /// Output tokens per request (EOS ignored).
    #[arg(value_name = "MAX_TOKENS", default_value_t = 64)]
    max_tokens: usize,
    /// Sampling temperature, seeded per request (0: greedy).
    #[arg(long, default_value_t = 0.7)]
    temperature: f64,
    /// Each prompt is N random words `t0` .. `t{V-1}` (read as exactly N tokens by the stand-in
    /// tokenizer); without it, short code prompts for a real tokenizer.
    #[arg(long, value_name = "N")]
    prompt_words: Option<usize>,
    /// V of `--prompt-words` (MiMo-V2-Flash's vocabulary size by default).
    #[arg(long, value_name = "V", default_value_t = 152_576, value_parser = clap::value_parser!(u64).range(1..))]
    vocab: u64,
}

struct Sample {
    ttft: Duration,
    gaps: Vec<Duration>,
    tokens: u64,
}

/// What each request asks for.
#[derive(Clone, Copy)]
struct Load {
    max_tokens: usize,
    temperature: f64,
    /// Some((N, V)): N random stand-in words below V.
    words: Option<(usize, u64)>,
}

/// Request i's prompt.
fn prompt(load: &Load, i: usize) -> String {
    match load.words {
        None => format!("def function_{i}(x):\n    "),
        Some((n, vocab)) => {
            // xorshift64 from the request's index: distinct prompts, the same on every run.
            let mut s = (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
            (0..n)
                .map(|_| {
                    s ^= s << 13;
                    s ^= s >> 7;
                    s ^= s << 17;
                    format!("t{}", s % vocab)
                })
                .collect::<Vec<_>>()
                .join(" ")
        }
    }
}

async fn one(client: &reqwest::Client, url: &str, i: usize, load: Load) -> Sample {
    let body = json!({"prompt": prompt(&load, i), "max_tokens": load.max_tokens, "stream": true,
                      "ignore_eos": true, "temperature": load.temperature, "seed": i, "stream_options": {"include_usage": true}});
    let t0 = Instant::now();
    let r = client.post(format!("{url}/v1/completions")).json(&body).send().await.expect("request");
    assert!(r.status().is_success(), "status {}", r.status());
    let mut stream = r.bytes_stream();
    let (mut first, mut last, mut gaps, mut tokens, mut buf) = (None, t0, Vec::new(), 0, String::new());
    while let Some(chunk) = stream.next().await {
        buf.push_str(&String::from_utf8_lossy(&chunk.expect("chunk")));
        while let Some(end) = buf.find("\n\n") {
            let event: String = buf.drain(..end + 2).collect();
            let Some(data) = event.trim().strip_prefix("data: ") else { continue };
            if data == "[DONE]" {
                continue;
            }
            let v: Value = serde_json::from_str(data).expect("json chunk");
            if let Some(u) = v.get("usage").filter(|u| !u.is_null()) {
                tokens = u["completion_tokens"].as_u64().unwrap_or(0);
            }
            if v["choices"][0]["text"].as_str().is_some_and(|t| !t.is_empty()) {
                let now = Instant::now();
                match first {
                    None => first = Some(now - t0),
                    Some(_) => gaps.push(now - last),
                }
                last = now;
            }
        }
    }
    Sample { ttft: first.unwrap_or_default(), gaps, tokens }
}

fn pct(v: &mut [Duration], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort();
    v[((v.len() - 1) as f64 * p).round() as usize].as_secs_f64() * 1e3
}

#[tokio::main]
async fn main() {
    let Args { url, levels, requests, max_tokens, temperature, prompt_words, vocab } = Args::parse();
    let load = Load { max_tokens, temperature, words: prompt_words.map(|n| (n, vocab)) };
    let client = reqwest::Client::new();
    println!("{:>5} {:>9} {:>10} {:>10} {:>10} {:>10} {:>12}", "conc", "requests", "ttft_p50", "ttft_p90", "itl_p50", "itl_p90", "out_tok/s");
    for &c in &levels {
        let t0 = Instant::now();
        let tasks: Vec<_> = (0..c)
            .map(|w| {
                let (client, url) = (client.clone(), url.clone());
                tokio::spawn(async move {
                    let mut out = Vec::new();
                    for i in (w..requests).step_by(c) {
                        out.push(one(&client, &url, i, load).await);
                    }
                    out
                })
            })
            .collect();
        let mut samples = Vec::new();
        for t in tasks {
            samples.extend(t.await.unwrap());
        }
        let wall = t0.elapsed().as_secs_f64();
        let mut ttft: Vec<Duration> = samples.iter().map(|s| s.ttft).collect();
        let mut gaps: Vec<Duration> = samples.iter().flat_map(|s| s.gaps.clone()).collect();
        let tokens: u64 = samples.iter().map(|s| s.tokens).sum();
        println!("{c:>5} {:>9} {:>8.1}ms {:>8.1}ms {:>8.2}ms {:>8.2}ms {:>12.1}", samples.len(), pct(&mut ttft, 0.5), pct(&mut ttft, 0.9),
                 pct(&mut gaps, 0.5), pct(&mut gaps, 0.9), tokens as f64 / wall);
    }
}
