//! DFlash speculative decoding inside continuous batching, on the CPU reference:
//! - greedy output with speculation equals greedy output without it, token for token;
//! - seeded sampling (penalties, logit_bias, bad_words, stop strings, min_tokens, logprobs) is identical too,
//!   because each position is sampled with the random number plain decoding would use there;
//! - under KV pressure (preemption) and with prefix caching it stays identical;
//! - a chi-square test that speculative sampling follows the target's distribution;
//! - usage and the spec-decode metrics add up.
//!
//! Pairs: the golden random target with the random reference drafter (acceptance ~0: rejection
//! paths) and, when the repository carries it, the trained demo model with its drafter
//! (acceptance well above 1: multi-token accepts, rollback).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use peregrine_core::SamplingParams;
use peregrine_cpu::CpuModel;
use peregrine_engine::*;
use peregrine_model::dflash::open_drafter;
use peregrine_model::loader::open_model;
use peregrine_model::tokenizer::Tokenizer;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

struct Pair {
    name: &'static str,
    target: PathBuf,
    drafter: PathBuf,
    /// Least mean tokens per verify round expected from greedy decoding of the prompts below.
    min_greedy_acceptance: f64,
}

fn pairs() -> Vec<Pair> {
    let mut v = vec![Pair {
        name: "golden+random",
        target: root().join("tests/fixtures/golden/default"),
        drafter: root().join("tests/fixtures/dflash/random"),
        min_greedy_acceptance: 1.0,
    }];
    let demo = root().join("models/peregrine-mimo-tiny");
    if demo.join("dflash/config.json").is_file() {
        v.push(Pair { name: "demo", target: demo.clone(), drafter: demo.join("dflash"), min_greedy_acceptance: 2.0 });
    }
    v
}

fn config() -> EngineConfig {
    EngineConfig {
        max_num_seqs: 8,
        max_num_batched_tokens: 96,
        max_model_len: 256,
        kv_cache_memory_bytes: 32 << 20,
        gpu_memory_utilization: None,
        block_size: 4,
        max_waiting: 256,
        enable_prefix_caching: true,
        speculative_block_size: None,
        model_name: None,
        overlap_steps: true,
        // These tests check the speculative mechanics on every step; the adaptive policy has
        // tests of its own.
        speculation: SpeculationMode::Always,
        kv_cache_dtype: None,
    }
}

/// An engine over the pair's target; with `block` Some, the drafter attached and that block size.
fn engine(p: &Pair, block: Option<usize>, cfg: EngineConfig) -> EngineHandle {
    let files = open_model(p.target.to_str().unwrap()).unwrap();
    let mut m = CpuModel::load(&files.spec, files.weights.as_ref()).unwrap();
    if let Some(b) = block {
        m.attach_drafter(&open_drafter(&p.drafter).unwrap()).unwrap();
        let cfg = EngineConfig { speculative_block_size: Some(b), ..cfg };
        return start_engine(Box::new(m), Arc::new(files.tokenizer.unwrap()), cfg).unwrap();
    }
    start_engine(Box::new(m), Arc::new(files.tokenizer.unwrap()), cfg).unwrap()
}

fn tokenizer(p: &Pair) -> Tokenizer {
    open_model(p.target.to_str().unwrap()).unwrap().tokenizer.unwrap()
}

const SNIPPETS: &[&str] = &[
    "import os\n\ndef list_python_files(path):\n",
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n",
    "def fibonacci(n):\n",
    "for i in range(10):\n    print(",
    "import json\n\nwith open('config.json') as f:\n    data = ",
    "def __repr__(self):\n        return ",
    "    if not isinstance(value, str):\n        raise TypeError(",
    "from collections import defaultdict\n\ncounts = defaultdict(int)\nfor word in words:\n",
    "\"\"\"Utilities for parsing command-line arguments.\"\"\"\n\nimport argparse\n",
    "    def test_empty(self):\n        self.assertEqual(",
    "try:\n    import numpy as np\nexcept ImportError:\n",
    "x",
];

#[derive(Debug, Clone, PartialEq)]
struct Outcome {
    text: String,
    ids: Vec<u32>,
    logprobs: Vec<TokenLogprob>,
    finish: FinishReason,
    usage: Usage,
    stop_reason: Option<StopReason>,
}

fn request(id: &str, prompt: Vec<u32>, sampling: SamplingParams, stop: StopParams) -> GenerateRequest {
    GenerateRequest { request_id: id.into(), prompt_tokens: prompt, sampling, stop, prompt_logprobs: None, priority: 0, arrival: Instant::now(), cache_salt: None }
}

/// An engine over the pair's target (with its drafter and `block` when set), wrapped by `wrap`.
fn wrapped_engine(p: &Pair, block: Option<usize>, wrap: impl FnOnce(CpuModel) -> Wrap) -> EngineHandle {
    let files = open_model(p.target.to_str().unwrap()).unwrap();
    let mut m = CpuModel::load(&files.spec, files.weights.as_ref()).unwrap();
    if block.is_some() {
        m.attach_drafter(&open_drafter(&p.drafter).unwrap()).unwrap();
    }
    let cfg = EngineConfig { speculative_block_size: block, ..config() };
    start_engine(Box::new(wrap(m)), Arc::new(files.tokenizer.unwrap()), cfg).unwrap()
}

/// Submits every request at once (they batch together) and collects their outcomes.
fn run(e: &EngineHandle, reqs: Vec<GenerateRequest>) -> Vec<Outcome> {
    run_streams(reqs.into_iter().map(|r| e.submit(r).unwrap()).collect())
}

/// The outcomes of submitted requests' streams.
fn run_streams(rxs: Vec<RequestStream>) -> Vec<Outcome> {
    rxs.into_iter()
        .map(|mut rx| {
            let (mut text, mut ids, mut logprobs) = (String::new(), Vec::new(), Vec::new());
            while let Some(ev) = rx.blocking_recv() {
                match ev {
                    RequestEvent::Delta { text: t, token_ids, logprobs: l } => {
                        text.push_str(&t);
                        ids.extend(token_ids);
                        logprobs.extend(l);
                    }
                    RequestEvent::Finished { reason, usage, stop_reason } => return Outcome { text, ids, logprobs, finish: reason, usage, stop_reason },
                    RequestEvent::Error(e) => panic!("request failed: {e}"),
                    RequestEvent::PromptLogprobs(_) => {}
                }
            }
            panic!("stream ended without Finished")
        })
        .collect()
}

fn metric(e: &EngineHandle, name: &str) -> f64 {
    e.render_metrics()
        .lines()
        .filter(|l| l.starts_with(name) && (l.as_bytes().get(name.len()) == Some(&b'{') || l.as_bytes().get(name.len()) == Some(&b' ')))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn prompts(t: &Tokenizer) -> Vec<Vec<u32>> {
    SNIPPETS.iter().map(|s| t.encode(s, false).unwrap()).collect()
}

fn greedy_requests(t: &Tokenizer, max_tokens: usize) -> Vec<GenerateRequest> {
    prompts(t)
        .into_iter()
        .enumerate()
        .map(|(i, p)| {
            request(&format!("g{i}"), p, SamplingParams::greedy(), StopParams { max_tokens, skip_special_tokens: true, ..Default::default() })
        })
        .collect()
}

/// Compares outcomes, ignoring the speculation counters of usage.
fn assert_same(name: &str, base: &[Outcome], spec: &[Outcome]) {
    assert_eq!(base.len(), spec.len());
    for (i, (a, b)) in base.iter().zip(spec).enumerate() {
        assert_eq!(a.ids, b.ids, "{name}: request {i} token ids");
        assert_eq!(a.text, b.text, "{name}: request {i} text");
        assert_eq!((a.finish, &a.stop_reason), (b.finish, &b.stop_reason), "{name}: request {i} finish and stop reason");
        assert_eq!(a.logprobs, b.logprobs, "{name}: request {i} logprobs");
        assert_eq!(a.usage.completion_tokens, b.usage.completion_tokens, "{name}: request {i} completion tokens");
        assert_eq!(a.usage.prompt_tokens, b.usage.prompt_tokens);
        assert!(b.usage.accepted_prediction_tokens <= b.usage.completion_tokens);
    }
}

#[test]
fn greedy_with_speculation_equals_greedy_without() {
    for p in pairs() {
        let t = tokenizer(&p);
        let base = run(&engine(&p, None, config()), greedy_requests(&t, 48));
        assert!(base.iter().map(|o| o.ids.len()).sum::<usize>() > 200, "{}: too little output to compare", p.name);
        for block in [8, 3] {
            let e = engine(&p, Some(block), config());
            let spec = run(&e, greedy_requests(&t, 48));
            assert_same(&format!("{} block {block}", p.name), &base, &spec);
            // Usage and metrics add up: every draft is accepted or rejected, per position too.
            let accepted: usize = spec.iter().map(|o| o.usage.accepted_prediction_tokens).sum();
            let rejected: usize = spec.iter().map(|o| o.usage.rejected_prediction_tokens).sum();
            assert_eq!(metric(&e, "vllm:spec_decode_num_accepted_tokens_total") as usize, accepted, "{}", p.name);
            assert_eq!(metric(&e, "vllm:spec_decode_num_draft_tokens_total") as usize, accepted + rejected, "{}", p.name);
            assert_eq!(metric(&e, "vllm:spec_decode_num_accepted_tokens_per_pos_total") as usize, accepted);
            assert_eq!(metric(&e, "peregrine:spec_decode_draft_failures_total"), 0.0);
            let rounds = metric(&e, "vllm:spec_decode_num_drafts_total");
            assert!(rounds > 0.0, "{}: no draft rounds ran", p.name);
            // Tokens per round: the verified token plus the accepted drafts.
            let per_round = (rounds + accepted as f64) / rounds;
            eprintln!("{} block {block}: {rounds} rounds, {accepted} accepted, {rejected} rejected, {per_round:.2} tokens/round", p.name);
            if block == 8 {
                assert!(per_round >= p.min_greedy_acceptance, "{}: {per_round:.2} tokens per round", p.name);
            }
        }
    }
}

fn sampling_requests(t: &Tokenizer) -> Vec<GenerateRequest> {
    let mut bias = std::collections::BTreeMap::new();
    bias.insert(t.encode(" the", false).unwrap()[0], 2.0f32);
    // A one-token word (banned everywhere, as a bias) and a longer one, which seldom bites here
    // but puts its requests on the history-dependent paths (bad_words_bite_alike_on_every_path
    // makes bans bite).
    let bad_words = vec![t.encode(" the", false).unwrap()[..1].to_vec(), t.encode("(self, ", false).unwrap()];
    // A stop id (a newline's token), which may end a round inside its accepted drafts.
    let newline = *t.encode("\n", false).unwrap().last().unwrap();
    prompts(t)
        .into_iter()
        .enumerate()
        .map(|(i, p)| {
            let sampling = SamplingParams {
                temperature: [0.7, 1.0, 0.3][i % 3],
                top_p: [1.0, 0.9, 0.95][i % 3],
                top_k: [0, 50, 0][i % 3],
                min_p: [0.0, 0.0, 0.05][i % 3],
                repetition_penalty: if i % 2 == 0 { 1.15 } else { 1.0 },
                presence_penalty: if i % 4 == 1 { 0.4 } else { 0.0 },
                frequency_penalty: if i % 4 == 3 { 0.3 } else { 0.0 },
                logit_bias: if i % 5 == 0 { bias.clone() } else { Default::default() },
                seed: Some(1000 + i as u64),
                logprobs: Some(2),
                json_object: false,
                guide: None,
                allowed_token_ids: None,
                bad_words: if i % 4 == 2 { bad_words.clone() } else { Vec::new() },
            };
            let stop = StopParams {
                max_tokens: 40,
                min_tokens: if i % 3 == 0 { 10 } else { 0 },
                stop_strings: if i % 2 == 0 { vec!["\n\n".into(), "):".into()] } else { vec![] },
                stop_token_ids: if i % 4 == 3 { vec![newline] } else { vec![] },
                skip_special_tokens: true,
                ..Default::default()
            };
            request(&format!("s{i}"), p, sampling, stop)
        })
        .collect()
}

#[test]
fn seeded_sampling_with_every_option_is_identical_with_speculation() {
    for p in pairs() {
        let t = tokenizer(&p);
        let base = run(&engine(&p, None, config()), sampling_requests(&t));
        assert!(base.iter().any(|o| o.finish == FinishReason::Stop) || p.name != "demo", "{}: no request stopped early", p.name);
        let named: Vec<_> = base.iter().filter_map(|o| o.stop_reason.as_ref()).collect();
        assert!(p.name != "demo" || (named.iter().any(|r| matches!(r, StopReason::Text(_))) && named.iter().any(|r| matches!(r, StopReason::Token(_)))), "{}: stop reasons {named:?}", p.name);
        let e = engine(&p, Some(8), config());
        let spec = run(&e, sampling_requests(&t));
        assert_same(&format!("{} sampling", p.name), &base, &spec);
    }
}

/// The adaptive policy (the default) decodes some steps plainly and speculates in others, each
/// sequence going from one kind to the other (every batch bucket first takes three speculative
/// steps, then three plain ones, whatever the timings); outputs stay those without a drafter.
#[test]
fn adaptive_speculation_mixes_plain_and_speculative_steps_with_the_same_outputs() {
    for p in pairs() {
        let t = tokenizer(&p);
        let plain = engine(&p, None, config());
        let (base_g, base_s) = (run(&plain, greedy_requests(&t, 48)), run(&plain, sampling_requests(&t)));
        let e = engine(&p, Some(8), EngineConfig { speculation: SpeculationMode::Adaptive, ..config() });
        let g = run(&e, greedy_requests(&t, 48));
        assert_same(&format!("{} adaptive greedy", p.name), &base_g, &g);
        // Drafting on every step, each token after a request's first would come from a round
        // (the round's sample or an accepted draft), so rounds + accepted >= those tokens; fewer
        // means plain steps committed the rest.
        let (rounds, accepted) = (metric(&e, "vllm:spec_decode_num_drafts_total"), metric(&e, "vllm:spec_decode_num_accepted_tokens_total"));
        let after_first = g.iter().map(|o| o.usage.completion_tokens - 1).sum::<usize>() as f64;
        let plain_steps = metric(&e, "peregrine:spec_decode_plain_steps_total");
        eprintln!("{} adaptive: {rounds} draft rounds, {accepted} accepted, {after_first} tokens after the first, {plain_steps} plain steps", p.name);
        assert!(rounds > 0.0 && plain_steps > 0.0, "{}: {rounds} draft rounds, {plain_steps} plain steps", p.name);
        assert!(rounds + accepted < after_first, "{}: no token came from a plain step", p.name);
        assert_same(&format!("{} adaptive sampling", p.name), &base_s, &run(&e, sampling_requests(&t)));
        assert_eq!(metric(&plain, "peregrine:spec_decode_plain_steps_total"), 0.0, "no drafter, no policy");
    }
}

#[test]
fn preemption_and_prefix_caching_keep_speculation_exact() {
    for p in pairs() {
        let t = tokenizer(&p);
        // Twice each prompt (prefix hits) under a KV budget that forces preemptions.
        let reqs = || {
            let mut r = greedy_requests(&t, 40);
            r.extend(greedy_requests(&t, 40));
            r
        };
        let base = run(&engine(&p, None, config()), reqs());
        let files = open_model(p.target.to_str().unwrap()).unwrap();
        let mut probe = CpuModel::load(&files.spec, files.weights.as_ref()).unwrap();
        probe.attach_drafter(&open_drafter(&p.drafter).unwrap()).unwrap();
        let bytes = peregrine_core::backend::Backend::kv_block_bytes(&probe, 4);
        // The engine's sliding-window pool (start_engine's formula), then 48 full blocks: about
        // two sequences' worth, for eight running sequences.
        let cfg = config();
        let window = files.spec.layers.iter().filter_map(|l| l.attention.window()).max().unwrap_or(0);
        let num_swa = cfg.max_num_seqs * (window / 4 + 2 + 2) + cfg.max_num_batched_tokens.div_ceil(4) + 1;
        let tight = EngineConfig { kv_cache_memory_bytes: bytes.full * 48 + bytes.swa * num_swa, max_model_len: 104, ..cfg };
        let e = engine(&p, Some(8), tight);
        let spec = run(&e, reqs());
        assert_same(&format!("{} tight KV", p.name), &base, &spec);
        assert!(metric(&e, "vllm:num_preemptions_total") > 0.0, "{}: the KV budget did not force a preemption", p.name);
        assert!(metric(&e, "vllm:prefix_cache_hits_total") > 0.0, "{}: no prefix-cache hit", p.name);
    }
}

/// Exact target probabilities of sampling (T=1, top-k 4): p(first) and p(second | first) ...
fn topk_probs(m: &mut CpuModel, ctx: &[u32], k: usize) -> Vec<(u32, f64)> {
    let rows = m.forward_sequence(ctx).unwrap();
    let params = SamplingParams { temperature: 1.0, top_k: k, ..SamplingParams::greedy() };
    peregrine_engine::sampler::sampling_distribution(rows.last().unwrap(), &params)
}

#[test]
fn speculative_sampling_follows_the_target_distribution() {
    // The pair with the best drafter, so accepted drafts are common.
    let p = pairs().pop().unwrap();
    let t = tokenizer(&p);
    let prompt = t.encode(SNIPPETS[0], false).unwrap();
    let files = open_model(p.target.to_str().unwrap()).unwrap();
    let mut m = CpuModel::load(&files.spec, files.weights.as_ref()).unwrap();
    // The exact distribution of the first three sampled tokens.
    let mut expected: HashMap<Vec<u32>, f64> = HashMap::new();
    for (a, pa) in topk_probs(&mut m, &prompt, 4) {
        let ctx_a = [prompt.clone(), vec![a]].concat();
        for (b, pb) in topk_probs(&mut m, &ctx_a, 4) {
            let ctx_b = [ctx_a.clone(), vec![b]].concat();
            for (c, pc) in topk_probs(&mut m, &ctx_b, 4) {
                expected.insert(vec![a, b, c], pa * pb * pc);
            }
        }
    }
    let n = 3000;
    let e = engine(&p, Some(8), EngineConfig { max_num_seqs: 64, max_num_batched_tokens: 1024, max_waiting: 4096, kv_cache_memory_bytes: 256 << 20, ..config() });
    let params = SamplingParams { temperature: 1.0, top_k: 4, ..SamplingParams::greedy() };
    let reqs: Vec<_> = (0..n)
        .map(|i| {
            let sampling = SamplingParams { seed: Some(7_000_000 + i as u64), ..params.clone() };
            request(&format!("c{i}"), prompt.clone(), sampling, StopParams { max_tokens: 3, ignore_eos: true, skip_special_tokens: true, ..Default::default() })
        })
        .collect();
    let out = run(&e, reqs);
    let mut counts: HashMap<Vec<u32>, usize> = HashMap::new();
    for o in &out {
        assert_eq!(o.ids.len(), 3);
        *counts.entry(o.ids.clone()).or_default() += 1;
    }
    for k in counts.keys() {
        assert!(expected.contains_key(k), "sampled {k:?}, which has probability 0 under top-k 4");
    }
    // Chi-square over cells with expected count >= 5; the rest pooled into one cell.
    let (mut chi, mut dof, mut pool_e, mut pool_o) = (0.0, 0usize, 0.0, 0.0);
    for (k, pr) in &expected {
        let ex = pr * n as f64;
        let ob = *counts.get(k).unwrap_or(&0) as f64;
        if ex >= 5.0 {
            chi += (ob - ex).powi(2) / ex;
            dof += 1;
        } else {
            pool_e += ex;
            pool_o += ob;
        }
    }
    if pool_e > 0.0 {
        chi += (pool_o - pool_e).powi(2) / pool_e.max(1e-9);
        dof += 1;
    }
    let dof = dof - 1;
    // Wilson-Hilferty p = 0.001 critical value of chi-square with `dof` degrees of freedom.
    let z = 3.090;
    let d = dof as f64;
    let crit = d * (1.0 - 2.0 / (9.0 * d) + z * (2.0 / (9.0 * d)).sqrt()).powi(3);
    let accepted = metric(&e, "vllm:spec_decode_num_accepted_tokens_total");
    eprintln!("{}: chi-square {chi:.1} over {dof} dof (critical {crit:.1}), {accepted} drafts accepted", p.name);
    assert!(chi < crit, "chi-square {chi:.1} >= {crit:.1} ({dof} dof)");
    assert!(dof >= 5, "too few cells ({dof}) for a meaningful test");
    if p.name == "demo" {
        assert!(accepted > n as f64 * 0.2, "only {accepted} drafts accepted: the acceptance path was barely exercised");
    }
}

/// A backend wrapper: `ids` false hides `forward_greedy` (the engine then reads logits);
/// true forwards it and counts the steps it answered.
struct Wrap {
    inner: CpuModel,
    ids: bool,
    answered: Arc<std::sync::atomic::AtomicUsize>,
    /// Answer `forward_speculative` (composed of the two calls) and count the steps it answered.
    fused: Option<Arc<std::sync::atomic::AtomicUsize>>,
    /// Steps answered with logprobs computed on the "backend".
    logprob_steps: Arc<std::sync::atomic::AtomicUsize>,
    /// Answer `forward_sampled_masked` (constrained rows sampled under their masks) and count
    /// the steps it answered; None: no such path (the constrained rows' logits come back).
    masked: Option<Arc<std::sync::atomic::AtomicUsize>>,
    /// Overlapped steps (`enqueue_decode`, `enqueue_decode_deferred`, both with `masked`): a
    /// deferred step's logits, waiting for its sampling; the ids of the last sampled step (what
    /// a chained row reads); sampled steps' ids not collected yet.
    pending: Option<Vec<peregrine_core::backend::Logits>>,
    last_ids: Vec<u32>,
    sampled: std::collections::VecDeque<Vec<u32>>,
}

impl Wrap {
    /// `inner` answering ids when `ids`, counting in `answered`; no fused, masked or overlapped
    /// steps.
    fn new(inner: CpuModel, ids: bool, answered: &Arc<std::sync::atomic::AtomicUsize>) -> Wrap {
        Wrap { inner, ids, answered: answered.clone(), fused: None, logprob_steps: Default::default(), masked: None, pending: None, last_ids: Vec::new(), sampled: Default::default() }
    }

    /// Every output row sampled through the host sampler with its parameters, uniform number
    /// and adjustments (as LogitAdjust documents them: what the GPU applies), and its logprobs
    /// from the raw logits when `top` asks.
    #[allow(clippy::type_complexity)]
    fn sample_rows(&mut self, b: &[peregrine_core::backend::SeqForward], rows: &[peregrine_core::backend::RowSampling], adjust: &[peregrine_core::backend::LogitAdjust], top: &[Option<u32>]) -> peregrine_core::Result<Option<Vec<Vec<(u32, Option<peregrine_core::backend::RowLogprobs>)>>>> {
        if !self.ids {
            return Ok(None);
        }
        let logits = peregrine_core::backend::Backend::forward(&mut self.inner, b)?;
        let out = Self::sample_logits(&logits, rows, adjust, top, None);
        self.answered.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Ok(Some(out))
    }

    /// The forward of an overlapped step, each chained row fed the last sampled step's id.
    fn chained_forward(&mut self, b: &[peregrine_core::backend::SeqForward], chain: &[Option<usize>]) -> peregrine_core::Result<Vec<peregrine_core::backend::Logits>> {
        let mut b = b.to_vec();
        for (s, c) in b.iter_mut().zip(chain) {
            if let Some(r) = c {
                s.tokens = vec![self.last_ids[*r]];
            }
        }
        peregrine_core::backend::Backend::forward(&mut self.inner, &b)
    }

    /// `sample_rows` of logits already computed; with `masks`, each row's refused tokens at
    /// -inf after its adjustments (as `forward_sampled_masked` documents).
    #[allow(clippy::type_complexity)]
    fn sample_logits(logits: &[peregrine_core::backend::Logits], rows: &[peregrine_core::backend::RowSampling], adjust: &[peregrine_core::backend::LogitAdjust], top: &[Option<u32>], masks: Option<&[Option<Vec<u32>>]>) -> Vec<Vec<(u32, Option<peregrine_core::backend::RowLogprobs>)>> {
        assert_eq!(rows.len(), top.len(), "one logprobs entry per sampling row");
        if let Some(m) = masks {
            assert_eq!(m.len(), rows.len(), "one mask entry per sampling row");
        }
        let mut masks = masks.into_iter().flatten();
        let mut it = rows.iter().zip(top);
        let out = logits
            .iter()
            .map(|l| {
                (0..l.rows)
                    .map(|r| {
                        let (p, top) = it.next().expect("one sampling row per output row");
                        let params = SamplingParams { temperature: p.temperature, top_k: p.top_k as usize, top_p: p.top_p, min_p: p.min_p, ..SamplingParams::greedy() };
                        let raw = l.row(r);
                        let mut row = raw.to_vec();
                        for a in &adjust[p.adj_start as usize..(p.adj_start + p.adj_len) as usize] {
                            let x = &mut row[a.token as usize];
                            *x += a.bias;
                            if a.repetition != 1.0 {
                                *x = if *x > 0.0 { *x / a.repetition } else { *x * a.repetition };
                            }
                            *x -= a.subtract;
                        }
                        if let Some(Some(mask)) = masks.next() {
                            let words = peregrine_core::backend::token_mask_words(row.len());
                            assert_eq!(mask.len(), words, "a mask of the vocabulary's words");
                            for (i, x) in row.iter_mut().enumerate() {
                                if !peregrine_core::backend::token_mask_allows(mask, i as u32) {
                                    *x = f32::NEG_INFINITY;
                                }
                            }
                        }
                        let tok = peregrine_engine::sampler::sample_with(&row, &params, p.u);
                        let lp = top.map(|k| {
                            let t = peregrine_engine::sampler::logprobs(raw, tok, k as usize);
                            peregrine_core::backend::RowLogprobs { logprob: t.logprob, top: t.top }
                        });
                        (tok, lp)
                    })
                    .collect()
            })
            .collect();
        assert!(it.next().is_none(), "more sampling rows than output rows");
        out
    }
}

impl peregrine_core::backend::Backend for Wrap {
    fn spec(&self) -> &peregrine_core::ModelSpec {
        self.inner.spec()
    }
    fn kv_block_bytes(&self, bs: usize) -> peregrine_core::backend::KvBlockBytes {
        self.inner.kv_block_bytes(bs)
    }
    fn init_kv(&mut self, c: peregrine_core::backend::KvConfig) -> peregrine_core::Result<()> {
        self.inner.init_kv(c)
    }
    fn forward(&mut self, b: &[peregrine_core::backend::SeqForward]) -> peregrine_core::Result<Vec<peregrine_core::backend::Logits>> {
        self.inner.forward(b)
    }
    fn forward_greedy(&mut self, b: &[peregrine_core::backend::SeqForward]) -> peregrine_core::Result<Option<Vec<Vec<u32>>>> {
        if !self.ids {
            return Ok(None);
        }
        let r = self.inner.forward_greedy(b)?;
        self.answered.fetch_add(r.is_some() as usize, std::sync::atomic::Ordering::SeqCst);
        Ok(r)
    }
    /// Draws each row on the "backend" with the row's parameters and uniform number, through
    /// the host sampler (what a GPU sampler computes in its own order).
    fn forward_sampled(&mut self, b: &[peregrine_core::backend::SeqForward], rows: &[peregrine_core::backend::RowSampling], adjust: &[peregrine_core::backend::LogitAdjust]) -> peregrine_core::Result<Option<Vec<Vec<u32>>>> {
        let top = vec![None; rows.len()];
        Ok(self.sample_rows(b, rows, adjust, &top)?.map(|v| v.into_iter().map(|r| r.into_iter().map(|x| x.0).collect()).collect()))
    }
    /// As forward_sampled, with the kept sequences' rows as their logits.
    fn forward_sampled_keeping(&mut self, b: &[peregrine_core::backend::SeqForward], rows: &[peregrine_core::backend::RowSampling], adjust: &[peregrine_core::backend::LogitAdjust], keep: &[bool]) -> peregrine_core::Result<Option<Vec<peregrine_core::backend::KeptRows>>> {
        if !self.ids {
            return Ok(None);
        }
        let logits = peregrine_core::backend::Backend::forward(&mut self.inner, b)?;
        let sampled = Self::sample_logits(&logits, rows, adjust, &vec![None; rows.len()], None);
        self.answered.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Ok(Some(
            logits
                .into_iter()
                .zip(sampled)
                .zip(keep)
                .map(|((l, s), &k)| if k { peregrine_core::backend::KeptRows::Logits(l) } else { peregrine_core::backend::KeptRows::Ids(s.into_iter().map(|x| x.0).collect()) })
                .collect(),
        ))
    }
    /// As forward_sampled, each row held to its mask, asked for between the forward and the
    /// draws as a device backend does.
    fn forward_sampled_masked(&mut self, b: &[peregrine_core::backend::SeqForward], rows: &[peregrine_core::backend::RowSampling], adjust: &[peregrine_core::backend::LogitAdjust], masks: peregrine_core::backend::MaskSource) -> peregrine_core::Result<Option<Vec<Vec<u32>>>> {
        let Some(count) = self.masked.clone().filter(|_| self.ids) else { return Ok(None) };
        let logits = peregrine_core::backend::Backend::forward(&mut self.inner, b)?;
        let m = masks();
        let sampled = Self::sample_logits(&logits, rows, adjust, &vec![None; rows.len()], Some(&m));
        count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Ok(Some(sampled.into_iter().map(|r| r.into_iter().map(|x| x.0).collect()).collect()))
    }
    /// Started as a GPU would: the forward now (a chained row fed the last sampled step's id),
    /// the draws when the sampling comes.
    fn enqueue_decode_deferred(&mut self, b: &[peregrine_core::backend::SeqForward], chain: &[Option<usize>]) -> peregrine_core::Result<bool> {
        if self.masked.is_none() || !self.ids {
            return Ok(false);
        }
        assert!(self.pending.is_none(), "a deferred step started while another waits for its sampling");
        self.pending = Some(self.chained_forward(b, chain)?);
        Ok(true)
    }
    fn sample_enqueued(&mut self, rows: &[peregrine_core::backend::RowSampling], adjust: &[peregrine_core::backend::LogitAdjust], masks: Vec<Option<Vec<u32>>>) -> peregrine_core::Result<()> {
        let logits = self.pending.take().expect("sampling for a started step");
        let ids: Vec<u32> = Self::sample_logits(&logits, rows, adjust, &vec![None; rows.len()], Some(&masks)).into_iter().flatten().map(|x| x.0).collect();
        self.masked.as_ref().unwrap().fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.last_ids = ids.clone();
        self.sampled.push_back(ids);
        Ok(())
    }
    /// An overlapped step sampled at once (argmax without `sampling`), chained as above.
    fn enqueue_decode(&mut self, b: &[peregrine_core::backend::SeqForward], chain: &[Option<usize>], sampling: Option<(&[peregrine_core::backend::RowSampling], &[peregrine_core::backend::LogitAdjust])>) -> peregrine_core::Result<bool> {
        if self.masked.is_none() || !self.ids {
            return Ok(false);
        }
        let logits = self.chained_forward(b, chain)?;
        let ids: Vec<u32> = match sampling {
            Some((rows, adjust)) => Self::sample_logits(&logits, rows, adjust, &vec![None; rows.len()], None).into_iter().flatten().map(|x| x.0).collect(),
            None => peregrine_core::backend::argmax_rows(&logits).into_iter().flatten().collect(),
        };
        self.last_ids = ids.clone();
        self.sampled.push_back(ids);
        Ok(true)
    }
    fn collect_decode(&mut self) -> peregrine_core::Result<Vec<u32>> {
        self.sampled.pop_front().ok_or_else(|| peregrine_core::Error::Backend("nothing in flight".into()))
    }
    /// As forward_sampled, with each asked-for row's logprobs from its raw logits.
    fn forward_sampled_logprobs(&mut self, b: &[peregrine_core::backend::SeqForward], rows: &[peregrine_core::backend::RowSampling], adjust: &[peregrine_core::backend::LogitAdjust], top: &[Option<u32>]) -> peregrine_core::Result<Option<Vec<Vec<(u32, Option<peregrine_core::backend::RowLogprobs>)>>>> {
        let r = self.sample_rows(b, rows, adjust, top)?;
        if r.is_some() {
            self.logprob_steps.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
        Ok(r)
    }

    fn forward_speculative(&mut self, b: &[peregrine_core::backend::SeqForward], sampling: peregrine_core::backend::SpecSampling) -> peregrine_core::Result<Option<Vec<peregrine_core::backend::SpecRows>>> {
        let Some(count) = self.fused.clone() else { return Ok(None) };
        for s in b {
            assert_eq!(s.output, peregrine_core::backend::OutputRows::All, "a fused step's blocks want every row");
            let mask = self.inner.draft_spec().unwrap().mask_token_id;
            assert!(s.tokens.len() >= 2 && s.tokens[1..].iter().all(|&t| t == mask), "placeholders are the mask token");
        }
        let r = peregrine_core::backend::speculate_in_two_calls(self, b, sampling)?;
        count.fetch_add(r.is_some() as usize, std::sync::atomic::Ordering::SeqCst);
        Ok(r)
    }

    fn name(&self) -> &str {
        "wrapped-cpu"
    }
    fn draft_spec(&self) -> Option<&peregrine_core::DraftSpec> {
        self.inner.draft_spec()
    }
    fn draft(&mut self, b: &[peregrine_core::backend::DraftForward]) -> peregrine_core::Result<Vec<Vec<u32>>> {
        self.inner.draft(b)
    }
}

/// `bad_words` that bite (from each free output: its tokens 2-3 as a word, its token 5 alone):
/// the host sampler's outputs without a drafter are the reference, and the same come back
/// sampled on the backend (ids, overlapped steps deferred until the step ahead is committed),
/// with speculation (verify rows whose history holds the drafts) and both, greedy and seeded,
/// and under allowed ids (masks less the bans); no output holds a banned word.
#[test]
fn bad_words_bite_alike_on_every_path() {
    for p in pairs() {
        let t = tokenizer(&p);
        let answered = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let masked_steps = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let start = |ids: bool, block: Option<usize>| wrapped_engine(&p, block, |m| Wrap { masked: Some(masked_steps.clone()), ..Wrap::new(m, ids, &answered) });
        let mut reqs = greedy_requests(&t, 24);
        for (i, r) in reqs.iter_mut().enumerate() {
            r.stop.ignore_eos = true;
            if i % 2 == 1 {
                r.sampling = SamplingParams { temperature: 0.8, seed: Some(50 + i as u64), ..Default::default() };
            }
        }
        let free = run(&start(false, None), reqs.clone());
        for (r, f) in reqs.iter_mut().zip(&free) {
            r.sampling.bad_words = vec![f.ids[2..4].to_vec(), vec![f.ids[5]]];
        }
        // Under allowed ids too: the free output's tokens and a few more.
        let mut allowed = reqs.clone();
        for (r, f) in allowed.iter_mut().zip(&free) {
            let mut ids = f.ids.clone();
            ids.extend(t.encode(" the cat sat on a mat", false).unwrap());
            r.sampling.allowed_token_ids = Some(ids);
        }
        for (what, reqs) in [("free", reqs), ("allowed ids", allowed)] {
            let base = run(&start(false, None), reqs.clone());
            for ((r, b), f) in reqs.iter().zip(&base).zip(&free) {
                for w in &r.sampling.bad_words {
                    assert!(!b.ids.windows(w.len()).any(|x| x == &w[..]), "{} {what}: {w:?} in {:?}", p.name, b.ids);
                }
                assert_ne!(b.ids, f.ids, "{} {what}: the bans did not bite", p.name);
            }
            for (ids, block) in [(true, None), (false, Some(8)), (true, Some(8))] {
                masked_steps.store(0, std::sync::atomic::Ordering::SeqCst);
                let got = run(&start(ids, block), reqs.clone());
                assert_same(&format!("{} {what}, ids {ids}, block {block:?}", p.name), &base, &got);
                if ids && block.is_none() {
                    assert!(masked_steps.load(std::sync::atomic::Ordering::SeqCst) > 0, "{} {what}: no deferred or masked step", p.name);
                }
            }
        }
        // Bans leaving nothing of the allowed ids: an error saying so, on the host and where
        // the backend samples under the mask.
        for ids in [false, true] {
            let e = start(ids, None);
            let mut r = greedy_requests(&t, 8).remove(0);
            r.sampling.allowed_token_ids = Some(vec![free[0].ids[0]]);
            r.sampling.bad_words = vec![vec![free[0].ids[0]]];
            let mut rx = e.submit(r).unwrap();
            let m = loop {
                match rx.blocking_recv() {
                    Some(RequestEvent::Error(m)) => break m,
                    Some(RequestEvent::Delta { .. }) => {}
                    other => panic!("{} ids {ids}: {other:?} instead of an error", p.name),
                }
            };
            assert!(m.contains("no token is left to sample"), "{} ids {ids}: {m}", p.name);
        }
    }
}

/// Steps can bring back ids only (`forward_greedy`, `forward_sampled`): the outputs equal those
/// sampled from logits on the host, greedy and seeded, with and without speculation (so the
/// rows' uniform numbers follow the output positions), and a batch with one request that needs
/// logits (logprobs) still gets them.
#[test]
fn greedy_ids_path_equals_the_logits_path() {
    for p in pairs() {
        let t = tokenizer(&p);
        let answered = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let logprob_steps = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (masked, masked_steps) = (std::cell::Cell::new(false), Arc::new(std::sync::atomic::AtomicUsize::new(0)));
        let start = |ids: bool, block: Option<usize>| wrapped_engine(&p, block, |m| Wrap { logprob_steps: logprob_steps.clone(), masked: masked.get().then(|| masked_steps.clone()), ..Wrap::new(m, ids, &answered) });
        let mut mixed = greedy_requests(&t, 24);
        mixed[3].sampling.logprobs = Some(3);
        // Greedy only, with bias and penalties: the argmax of the raw logits would be wrong.
        let mut greedy_adjusted = greedy_requests(&t, 24);
        for (i, r) in greedy_adjusted.iter_mut().enumerate() {
            match i % 3 {
                0 => r.sampling.repetition_penalty = 1.3,
                1 => r.sampling.presence_penalty = 0.8,
                _ => {
                    r.sampling.logit_bias.insert(t.encode(" the", false).unwrap()[0], 5.0);
                }
            }
        }
        // Seeded sampling with every option but logprobs (which need the logits on the host):
        // penalties and bias travel as per-row logit adjustments; one request is greedy.
        let mut sampled = sampling_requests(&t);
        for (i, r) in sampled.iter_mut().enumerate() {
            r.sampling.logprobs = None;
            if i == 4 {
                r.sampling.temperature = 0.0;
            }
        }
        // Logprobs (2 alternatives) with sampling, penalties and bias, and greedy with 5.
        let mut with_logprobs = sampling_requests(&t);
        with_logprobs[4].sampling.temperature = 0.0;
        with_logprobs[4].sampling.logprobs = Some(5);
        for block in [None, Some(8)] {
            let base = run(&start(false, block), greedy_requests(&t, 32));
            assert_eq!(answered.load(std::sync::atomic::Ordering::SeqCst), 0);
            let ids = run(&start(true, block), greedy_requests(&t, 32));
            assert_same(&format!("{} ids path, block {block:?}", p.name), &base, &ids);
            assert!(answered.swap(0, std::sync::atomic::Ordering::SeqCst) > 0, "{}: no step used the ids path", p.name);
            let base = run(&start(false, block), mixed.clone());
            let got = run(&start(true, block), mixed.clone());
            assert_same(&format!("{} mixed batch, block {block:?}", p.name), &base, &got);
            assert_eq!(got[3].logprobs.len(), got[3].ids.len(), "{}: the logprobs request lost its logprobs", p.name);
            answered.store(0, std::sync::atomic::Ordering::SeqCst);
            let base = run(&start(false, block), greedy_adjusted.clone());
            let got = run(&start(true, block), greedy_adjusted.clone());
            assert_same(&format!("{} greedy with bias and penalties, block {block:?}", p.name), &base, &got);
            answered.store(0, std::sync::atomic::Ordering::SeqCst);
            let base = run(&start(false, block), sampled.clone());
            let got = run(&start(true, block), sampled.clone());
            assert_same(&format!("{} sampled on the backend, block {block:?}", p.name), &base, &got);
            assert!(answered.swap(0, std::sync::atomic::Ordering::SeqCst) > 0, "{}: no step sampled on the backend", p.name);
            // One JSON-mode sequence among sampled ones: only its rows come back as logits
            // (forward_sampled_keeping), the others are drawn on the backend, as alone; or,
            // where the backend masks rows, every row is drawn there (forward_sampled_masked).
            let mut constrained = sampled.clone();
            constrained[2].sampling.json_object = true;
            // Every sequence constrained: JSON mode (greedy and sampled), a regex, a choice and
            // allowed ids, penalties and bias kept.
            let mut all_constrained = sampled.clone();
            for (i, r) in all_constrained.iter_mut().enumerate() {
                match i % 4 {
                    0 => r.sampling.json_object = true,
                    1 => r.sampling.guide = Some(peregrine_core::Guide::Regex("[a-z ]{3,40}\\.".into())),
                    2 => r.sampling.guide = Some(peregrine_core::Guide::Choice(vec!["yes indeed".into(), "no way".into(), "maybe".into()])),
                    _ => r.sampling.allowed_token_ids = Some(t.encode(" the cat sat on a mat", false).unwrap()),
                }
            }
            all_constrained[0].sampling.temperature = 0.0;
            // Without penalties too (with them the chained steps are sampled the same way).
            let mut no_penalties = all_constrained.clone();
            for r in no_penalties.iter_mut() {
                r.sampling.repetition_penalty = 1.0;
                r.sampling.presence_penalty = 0.0;
                r.sampling.frequency_penalty = 0.0;
                r.sampling.bad_words.clear();
            }
            for m in [false, true] {
                masked.set(m);
                let base = run(&start(false, block), constrained.clone());
                let got = run(&start(true, block), constrained.clone());
                assert_same(&format!("{} a JSON-mode sequence among sampled ones, block {block:?}, masked {m}", p.name), &base, &got);
                assert!(answered.swap(0, std::sync::atomic::Ordering::SeqCst) > 0, "{}: no step kept the constrained rows alone", p.name);
                assert!(got[2].text.trim_start().starts_with('{'), "{}: {:?}", p.name, got[2].text);
                for (reqs, what) in [(&all_constrained, "with penalties"), (&no_penalties, "without penalties")] {
                    let base = run(&start(false, block), reqs.clone());
                    let e = start(true, block);
                    let got = run(&e, reqs.clone());
                    assert_same(&format!("{} every sequence constrained {what}, block {block:?}, masked {m}", p.name), &base, &got);
                    // Masked steps overlap: each chained on the one ahead, masked once it is committed.
                    assert_eq!(metric(&e, "peregrine:overlapped_steps_total") > 0.0, m, "{}: overlapped masked steps {what}, masked path {m}", p.name);
                    assert!(got[0].text.trim_start().starts_with('{'), "{}: {:?}", p.name, got[0].text);
                    assert!(["yes indeed", "no way", "maybe"].contains(&got[2].text.as_str()), "{}: {:?}", p.name, got[2].text);
                }
                assert_eq!(masked_steps.swap(0, std::sync::atomic::Ordering::SeqCst) > 0, m, "{}: masked steps, with the masked path {m}", p.name);
                answered.store(0, std::sync::atomic::Ordering::SeqCst);
            }
            // Penalties and bias without constraints on overlapped steps: each chained step is
            // sampled once the step ahead is committed (`enqueue_decode_deferred`).
            masked.set(true);
            for (reqs, what) in [(&sampled, "sampled"), (&greedy_adjusted, "greedy with bias and penalties")] {
                let base = run(&start(false, block), reqs.clone());
                let e = start(true, block);
                let got = run(&e, reqs.clone());
                assert_same(&format!("{} {what} on overlapped steps, block {block:?}", p.name), &base, &got);
                if block.is_none() {
                    assert!(metric(&e, "peregrine:overlapped_steps_total") > 0.0, "{}: no {what} step overlapped", p.name);
                }
            }
            masked.set(false);
            masked_steps.store(0, std::sync::atomic::Ordering::SeqCst);
            answered.store(0, std::sync::atomic::Ordering::SeqCst);
            // Logprobs computed with the sample on the backend: every option, verify rows too.
            logprob_steps.store(0, std::sync::atomic::Ordering::SeqCst);
            let base = run(&start(false, block), with_logprobs.clone());
            assert_eq!(logprob_steps.load(std::sync::atomic::Ordering::SeqCst), 0);
            let got = run(&start(true, block), with_logprobs.clone());
            assert_same(&format!("{} logprobs on the backend, block {block:?}", p.name), &base, &got);
            assert!(logprob_steps.swap(0, std::sync::atomic::Ordering::SeqCst) > 0, "{}: no step computed logprobs on the backend", p.name);
            assert!(got.iter().all(|o| o.logprobs.len() == o.ids.len()), "{}: a token lost its logprobs", p.name);
            answered.store(0, std::sync::atomic::Ordering::SeqCst);
        }
    }
}

/// A constrained sequence no token can continue (allowed ids all past the vocabulary) ends with
/// its constraint's error whether its rows are masked on the backend or sampled on the host,
/// and the sequence beside it decodes as alone.
#[test]
fn a_stuck_constrained_sequence_ends_with_its_error_on_either_path() {
    let p = &pairs()[0];
    let t = tokenizer(p);
    let vocab = open_model(p.target.to_str().unwrap()).unwrap().spec.vocab_size as u32;
    let plain = greedy_requests(&t, 12).remove(1);
    let mut stuck = greedy_requests(&t, 12).remove(0);
    stuck.sampling.allowed_token_ids = Some(vec![vocab + 3, vocab + 9]);
    for (ids, masked) in [(false, false), (true, false), (true, true)] {
        let masked_steps = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let e = wrapped_engine(p, None, |m| Wrap { masked: masked.then(|| masked_steps.clone()), ..Wrap::new(m, ids, &Default::default()) });
        let alone = run(&e, vec![plain.clone()]);
        let (mut rx, beside) = (e.submit(stuck.clone()).unwrap(), e.submit(plain.clone()).unwrap());
        let mut error = None;
        while let Some(ev) = rx.blocking_recv() {
            match ev {
                RequestEvent::Error(why) => error = Some(why),
                RequestEvent::Delta { token_ids, .. } => assert!(token_ids.is_empty(), "the stuck sequence sampled {token_ids:?}"),
                RequestEvent::Finished { .. } => panic!("the stuck sequence finished"),
                RequestEvent::PromptLogprobs(_) => {}
            }
        }
        assert_eq!(error.as_deref(), Some("allowed_token_ids: none of the allowed tokens is in the vocabulary"), "ids {ids}, masked {masked}");
        let beside = run_streams(vec![beside]);
        assert_same(&format!("beside a stuck sequence, ids {ids}, masked {masked}"), &alone, &beside);
        assert_eq!(masked_steps.load(std::sync::atomic::Ordering::SeqCst) > 0, masked);
        e.shutdown();
    }
}

/// The fused speculative step (`forward_speculative`: draft, verify and accept in one backend
/// call) gives exactly what the two-call path gives: greedy, and seeded sampling with bias (no
/// penalties, which keep the two calls); a batch with penalties or logprobs still decodes
/// correctly through the two calls.
#[test]
fn fused_speculative_step_equals_the_two_call_path() {
    for p in pairs() {
        let t = tokenizer(&p);
        let answered = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let fused = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let start = |f: bool| wrapped_engine(&p, Some(8), |m| Wrap { fused: f.then(|| fused.clone()), ..Wrap::new(m, true, &answered) });
        let mut plain_sampled = sampling_requests(&t);
        for r in plain_sampled.iter_mut() {
            r.sampling.logprobs = None;
            r.sampling.repetition_penalty = 1.0;
            r.sampling.presence_penalty = 0.0;
            r.sampling.frequency_penalty = 0.0;
            r.sampling.bad_words.clear();
        }
        let mut with_penalties = sampling_requests(&t);
        for r in with_penalties.iter_mut() {
            r.sampling.logprobs = None;
        }
        for (what, reqs, expect_fused) in [
            ("greedy", greedy_requests(&t, 32), true),
            ("sampled with bias", plain_sampled, true),
            ("sampled with penalties", with_penalties, false),
        ] {
            let base = run(&start(false), reqs.clone());
            assert_eq!(fused.load(std::sync::atomic::Ordering::SeqCst), 0);
            let got = run(&start(true), reqs);
            assert_same(&format!("{} fused, {what}", p.name), &base, &got);
            let n = fused.swap(0, std::sync::atomic::Ordering::SeqCst);
            // Penalties depend on the drafts, so those batches must keep the two calls.
            assert_eq!(n > 0, expect_fused, "{}: fused steps taken: {n} ({what})", p.name);
        }
    }
}
