//! Prometheus metrics with vLLM's names (REFERENCE.md §5) plus `peregrine:*` extras.

use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Gauge, Opts, Registry};

pub struct Metrics {
    pub registry: Registry,
    pub running: IntGauge,
    pub waiting: IntGauge,
    pub kv_usage: Gauge,
    pub prompt_tokens: IntCounter,
    pub generation_tokens: IntCounter,
    pub success: IntCounterVec,
    pub preemptions: IntCounter,
    pub prefix_queries: IntCounter,
    pub prefix_hits: IntCounter,
    pub ttft: Histogram,
    pub itl: Histogram,
    pub e2e: Histogram,
    pub queue_time: Histogram,
    pub prefill_time: Histogram,
    pub decode_time: Histogram,
    pub inference_time: Histogram,
    pub request_prompt_tokens: Histogram,
    pub request_generation_tokens: Histogram,
    pub step_time: Histogram,
    pub batch_size: Histogram,
    pub step_tokens: Histogram,
    pub spec_drafts: IntCounter,
    pub spec_draft_tokens: IntCounter,
    pub spec_accepted: IntCounter,
    pub spec_accepted_per_pos: IntCounterVec,
    pub spec_draft_failures: IntCounter,
    pub spec_fused_steps: IntCounter,
    pub spec_plain_steps: IntCounter,
    pub overlapped_steps: IntCounter,
    pub backend_failed: IntGauge,
    /// The `model_name` label every metric carries.
    model_name: String,
}

fn buckets() -> Vec<f64> {
    // 100us .. ~100s, four per decade.
    let mut v = Vec::new();
    let mut x = 1e-4;
    while x < 200.0 {
        for m in [1.0, 2.5, 5.0, 7.5] {
            v.push(x * m);
        }
        x *= 10.0;
    }
    v
}

/// 1, 2, 5, 10, 20, 50, ... up to `max` (vLLM's buckets for per-request token counts).
fn one_two_five(max: usize) -> Vec<f64> {
    let mut v = Vec::new();
    let mut x = 1usize;
    'out: loop {
        for m in [1, 2, 5] {
            match x.checked_mul(m) {
                Some(b) if b <= max => v.push(b as f64),
                _ => break 'out,
            }
        }
        x = match x.checked_mul(10) {
            Some(next) => next,
            None => break,
        };
    }
    v
}

impl Metrics {
    /// `max_model_len` bounds the per-request token histograms' buckets.
    pub fn new(model_name: &str, max_model_len: usize) -> Self {
        let registry = Registry::new();
        let lbl = |o: Opts| o.const_label("model_name", model_name);
        let hist = |name: &str, help: &str, b: Vec<f64>| {
            let h = Histogram::with_opts(HistogramOpts::new(name, help).const_label("model_name", model_name).buckets(b)).unwrap();
            registry.register(Box::new(h.clone())).unwrap();
            h
        };
        let ig = |name: &str, help: &str| {
            let g = IntGauge::with_opts(lbl(Opts::new(name, help))).unwrap();
            registry.register(Box::new(g.clone())).unwrap();
            g
        };
        let ic = |name: &str, help: &str| {
            let c = IntCounter::with_opts(lbl(Opts::new(name, help))).unwrap();
            registry.register(Box::new(c.clone())).unwrap();
            c
        };
        let kv_usage = Gauge::with_opts(lbl(Opts::new("vllm:kv_cache_usage_perc", "Fraction of KV blocks in use"))).unwrap();
        registry.register(Box::new(kv_usage.clone())).unwrap();
        let success = IntCounterVec::new(lbl(Opts::new("vllm:request_success_total", "Finished requests")), &["finished_reason"]).unwrap();
        registry.register(Box::new(success.clone())).unwrap();
        let per_pos = IntCounterVec::new(
            lbl(Opts::new("vllm:spec_decode_num_accepted_tokens_per_pos_total", "Accepted drafts by position in the block (0 = first draft)")),
            &["position"],
        )
        .unwrap();
        registry.register(Box::new(per_pos.clone())).unwrap();
        let tok_buckets = vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0];
        Metrics {
            running: ig("vllm:num_requests_running", "Requests running"),
            waiting: ig("vllm:num_requests_waiting", "Requests waiting"),
            kv_usage,
            prompt_tokens: ic("vllm:prompt_tokens_total", "Prompt tokens processed"),
            generation_tokens: ic("vllm:generation_tokens_total", "Tokens generated"),
            success,
            preemptions: ic("vllm:num_preemptions_total", "Preemptions"),
            prefix_queries: ic("vllm:prefix_cache_queries_total", "Prompt tokens looked up in the prefix cache"),
            prefix_hits: ic("vllm:prefix_cache_hits_total", "Prompt tokens found in the prefix cache"),
            ttft: hist("vllm:time_to_first_token_seconds", "Time to first token", buckets()),
            itl: hist("vllm:inter_token_latency_seconds", "Time between output tokens", buckets()),
            e2e: hist("vllm:e2e_request_latency_seconds", "Request latency", buckets()),
            queue_time: hist("vllm:request_queue_time_seconds", "Time waiting before first schedule", buckets()),
            prefill_time: hist("vllm:request_prefill_time_seconds", "Time from first schedule to the first output token", buckets()),
            decode_time: hist("vllm:request_decode_time_seconds", "Time from the first output token to the request's end", buckets()),
            inference_time: hist("vllm:request_inference_time_seconds", "Time from first schedule to the request's end", buckets()),
            request_prompt_tokens: hist("vllm:request_prompt_tokens", "Prompt tokens of each finished request", one_two_five(max_model_len)),
            request_generation_tokens: hist("vllm:request_generation_tokens", "Output tokens of each finished request", one_two_five(max_model_len)),
            step_time: hist("peregrine:step_duration_seconds", "Duration of one engine step (an overlapped decode step: from the end of the step ahead of it to its commit)", buckets()),
            batch_size: hist("peregrine:batch_size", "Sequences per step", tok_buckets.clone()),
            step_tokens: hist("peregrine:tokens_per_step", "Tokens per step", tok_buckets),
            spec_drafts: ic("vllm:spec_decode_num_drafts_total", "Draft rounds (one per sequence and step)"),
            spec_draft_tokens: ic("vllm:spec_decode_num_draft_tokens_total", "Drafted tokens"),
            spec_accepted: ic("vllm:spec_decode_num_accepted_tokens_total", "Drafted tokens accepted"),
            spec_accepted_per_pos: per_pos,
            spec_draft_failures: ic("peregrine:spec_decode_draft_failures_total", "Draft passes that failed (those steps decode without drafts)"),
            spec_fused_steps: ic("peregrine:spec_decode_fused_steps_total", "Speculative steps drafted, verified and accepted in one backend call"),
            spec_plain_steps: ic("peregrine:spec_decode_plain_steps_total", "Decode steps run without drafts because plain decoding measured faster (adaptive speculation)"),
            overlapped_steps: ic("peregrine:overlapped_steps_total", "Decode steps started before the step ahead of them was committed (their host work overlapped the GPU's)"),
            backend_failed: ig("peregrine:backend_failed", "1 once the backend can serve nothing more (a lost GPU context): restart the server"),
            registry,
            model_name: model_name.to_string(),
        }
    }

    /// `vllm:cache_config_info` (always 1) with the KV cache's settings as labels, as vLLM
    /// exports them (a subset: `cache_dtype` is the pools' element type, `float32`, `bfloat16` or
    /// `fp8_e4m3`, and `num_gpu_blocks` the full-attention blocks), once the cache is allocated.
    pub fn record_cache_config(&self, block_size: usize, cache_dtype: &str, num_gpu_blocks: usize, enable_prefix_caching: bool) {
        let opts = Opts::new("vllm:cache_config_info", "Information of the KV cache's settings")
            .const_label("model_name", &self.model_name)
            .const_label("block_size", block_size.to_string())
            .const_label("cache_dtype", cache_dtype)
            .const_label("num_gpu_blocks", num_gpu_blocks.to_string())
            .const_label("enable_prefix_caching", enable_prefix_caching.to_string());
        let g = IntGauge::with_opts(opts).unwrap();
        g.set(1);
        // (Registered once per engine: a second call's duplicate is refused and changes nothing.)
        let _ = self.registry.register(Box::new(g));
    }

    pub fn render(&self) -> String {
        use prometheus::Encoder;
        let mut buf = Vec::new();
        prometheus::TextEncoder::new().encode(&self.registry.gather(), &mut buf).ok();
        String::from_utf8(buf).unwrap_or_default()
    }
}
