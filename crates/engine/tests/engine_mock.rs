//! Engine behaviour over a deterministic mock backend whose logits are computed from the tokens
//! it reads back through the block tables, so any KV bookkeeping error changes the output.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use peregrine_core::backend::*;
use peregrine_core::{AttentionKind, ModelSpec, Result, SamplingParams};
use peregrine_engine::*;
use peregrine_model::tokenizer::Tokenizer;

const FIX: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/golden/default");

struct Mock {
    spec: ModelSpec,
    window: Option<usize>,
    bs: usize,
    full: Vec<Option<u32>>,
    swa: Vec<Option<u32>>,
    /// Some: overlapped decode steps are served (as a GPU backend would, from the same logits).
    overlap: Option<MockOverlap>,
    /// Some: a drafter is attached, drafting the last token's successor (`last + 1`) again and
    /// again (a few match the mock's targets), or with `perfect_drafts` the greedy targets.
    drafter: Option<peregrine_core::DraftSpec>,
    perfect_drafts: bool,
    /// Every forward takes at least this long (a device whose steps cost the same at 1-8 rows).
    forward_time: Option<Duration>,
    /// `Backend::rows_compute_alike` (false: as a GPU backend whose verify rows round apart).
    rows_alike: bool,
}

/// What the mock's logits at a position depend on: the tokens at positions 0 ..= that one (a
/// window mixes its own tokens in after, in `forward`).
fn context_hash(tokens: impl IntoIterator<Item = u32>) -> u64 {
    tokens.into_iter().fold(17u64, |h, t| h.wrapping_mul(31).wrapping_add(t as u64 + 1))
}

/// The token the mock's logits favour after `tokens` (a sequence without a window).
fn greedy_target(tokens: &[u32]) -> u32 {
    20 + (context_hash(tokens.iter().copied()) % 60) as u32
}

/// Started decode steps: their ids (computed at once; only the engine's order of calls is
/// under test), the last started step's ids while nothing else ran, and how many chained.
#[derive(Default)]
struct MockOverlap {
    pending: std::collections::VecDeque<Vec<u32>>,
    last: Option<Vec<u32>>,
    chained_rows: usize,
}

impl Mock {
    /// A mock over `spec(window)`, with `overlap` as in `engine_with`, no drafter.
    fn new(window: Option<usize>, overlap: bool) -> Self {
        Mock { spec: spec(window), window, bs: 0, full: vec![], swa: vec![], overlap: overlap.then(MockOverlap::default), drafter: None, perfect_drafts: false, forward_time: None, rows_alike: true }
    }
    fn read(pool: &[Option<u32>], table: &[u32], bs: usize, p: usize, what: &str) -> Result<u32> {
        let b = table.get(p / bs).copied().unwrap_or(NULL_BLOCK);
        if b == NULL_BLOCK {
            return Err(peregrine_core::Error::Backend(format!("{what} position {p} has no block")));
        }
        pool[b as usize * bs + p % bs].ok_or_else(|| peregrine_core::Error::Backend(format!("{what} position {p} unwritten")))
    }
}

impl Backend for Mock {
    fn spec(&self) -> &ModelSpec {
        &self.spec
    }
    fn kv_block_bytes(&self, _bs: usize) -> KvBlockBytes {
        KvBlockBytes { full: 100, swa: if self.window.is_some() { 50 } else { 0 } }
    }
    fn init_kv(&mut self, c: KvConfig) -> Result<()> {
        self.bs = c.block_size;
        self.full = vec![None; c.num_full_blocks * c.block_size];
        self.swa = vec![None; c.num_swa_blocks * c.block_size];
        Ok(())
    }
    fn forward(&mut self, batch: &[SeqForward]) -> Result<Vec<Logits>> {
        if let Some(o) = &mut self.overlap {
            o.last = None;
        }
        let t0 = Instant::now();
        let v = self.spec.vocab_size;
        let bs = self.bs;
        let mut out = Vec::new();
        for s in batch {
            let mut rows = Vec::new();
            for (k, &t) in s.tokens.iter().enumerate() {
                let p = s.start_pos + k;
                let b = s.full_blocks[p / bs] as usize;
                self.full[b * bs + p % bs] = Some(t);
                if self.window.is_some() {
                    let b = s.swa_blocks[p / bs] as usize;
                    self.swa[b * bs + p % bs] = Some(t);
                }
                // Everything the model "attends to", read back from the cache.
                let full = (0..=p).map(|j| Mock::read(&self.full, &s.full_blocks, bs, j, "full")).collect::<Result<Vec<u32>>>()?;
                let mut h = context_hash(full);
                if let Some(w) = self.window {
                    for j in p.saturating_sub(w - 1)..=p {
                        h = h.wrapping_mul(7).wrapping_add(Mock::read(&self.swa, &s.swa_blocks, bs, j, "swa")? as u64);
                    }
                }
                let want = match s.output {
                    OutputRows::None => false,
                    OutputRows::Last => k + 1 == s.tokens.len(),
                    OutputRows::All => true,
                };
                if want {
                    // A printable-ish target token, plus a spread so sampling has choices.
                    let target = 20 + (h % 60) as usize;  // (greedy_target without a window)
                    rows.extend((0..v).map(|i| {
                        let base = (((i as u64 * 2654435761) ^ h) % 97) as f32 / 40.0;
                        if i == target { base + 3.0 } else if i < 20 { -5.0 } else { base }
                    }));
                }
            }
            let n = rows.len() / v;
            out.push(Logits { rows: n, data: rows });
        }
        if let Some(d) = self.forward_time {
            std::thread::sleep(d.saturating_sub(t0.elapsed()));
        }
        Ok(out)
    }
    fn name(&self) -> &str {
        "mock"
    }
    fn rows_compute_alike(&self) -> bool {
        self.rows_alike
    }
    fn draft_spec(&self) -> Option<&peregrine_core::DraftSpec> {
        self.drafter.as_ref()
    }
    fn draft(&mut self, batch: &[DraftForward]) -> Result<Vec<Vec<u32>>> {
        if !self.perfect_drafts {
            return Ok(batch.iter().map(|d| vec![20 + (d.last_token + 1) % 60; d.num_drafts]).collect());
        }
        batch
            .iter()
            .map(|d| {
                let mut ctx = (0..d.start_pos).map(|p| Mock::read(&self.full, &d.full_blocks, self.bs, p, "draft context")).collect::<Result<Vec<u32>>>()?;
                ctx.push(d.last_token);
                Ok((0..d.num_drafts)
                    .map(|_| {
                        let t = greedy_target(&ctx);
                        ctx.push(t);
                        t
                    })
                    .collect())
            })
            .collect()
    }
    fn enqueue_decode(&mut self, batch: &[SeqForward], chain: &[Option<usize>], sampling: Option<(&[RowSampling], &[LogitAdjust])>) -> Result<bool> {
        let Some(o) = &self.overlap else { return Ok(false) };
        assert!(o.pending.len() < 2, "more than one step started ahead of the one being committed");
        assert!(batch.iter().all(|s| s.tokens.len() == 1 && s.output == OutputRows::Last), "an overlapped step that is not a decode step");
        let last = o.last.clone();
        let mut fed = batch.to_vec();
        for (s, c) in fed.iter_mut().zip(chain) {
            if let Some(r) = c {
                let ids = last.as_ref().expect("a chained step with no step started before it");
                s.tokens[0] = ids[*r];
            }
        }
        let logits = self.forward(&fed)?;
        let ids: Vec<u32> = logits
            .iter()
            .enumerate()
            .map(|(i, l)| {
                let row = l.last().expect("a decode row");
                match sampling {
                    None => peregrine_engine::sampler::argmax(row),
                    Some((rows, adjust)) => {
                        let r = rows[i];
                        let mut row = row.to_vec();
                        for a in &adjust[r.adj_start as usize..(r.adj_start + r.adj_len) as usize] {
                            row[a.token as usize] += a.bias;
                        }
                        let p = SamplingParams { temperature: r.temperature, top_k: r.top_k as usize, top_p: r.top_p, min_p: r.min_p, ..Default::default() };
                        peregrine_engine::sampler::sample_with(&row, &p, r.u)
                    }
                }
            })
            .collect();
        let o = self.overlap.as_mut().unwrap();
        o.chained_rows += chain.iter().flatten().count();
        o.pending.push_back(ids.clone());
        o.last = Some(ids);
        Ok(true)
    }
    fn collect_decode(&mut self) -> Result<Vec<u32>> {
        Ok(self.overlap.as_mut().and_then(|o| o.pending.pop_front()).expect("a collect with no step started"))
    }
}

fn spec(window: Option<usize>) -> ModelSpec {
    let mut s = peregrine_model::config::load_spec(Path::new(FIX)).unwrap();
    for l in &mut s.layers {
        if let AttentionKind::Sliding { .. } = l.attention.kind {
            l.attention.kind = match window {
                Some(w) => AttentionKind::Sliding { window: w },
                None => AttentionKind::Full,
            };
        }
    }
    s
}

fn tokenizer() -> SharedTokenizer {
    Arc::new(Tokenizer::from_file(&Path::new(FIX).join("tokenizer.json")).unwrap())
}

fn engine(window: Option<usize>, cfg: EngineConfig) -> EngineHandle {
    engine_with(window, cfg, false)
}

/// `overlap`: the mock serves overlapped decode steps (`Backend::enqueue_decode`).
fn engine_with(window: Option<usize>, cfg: EngineConfig, overlap: bool) -> EngineHandle {
    let mock = Mock::new(window, overlap);
    start_engine(Box::new(mock), tokenizer(), cfg).unwrap()
}

/// `engine_with(None, cfg, true)` with a drafter of `block`-token blocks attached.
fn engine_drafting(cfg: EngineConfig, block: usize) -> EngineHandle {
    engine_drafting_with(cfg, block, false, None)
}

fn engine_drafting_with(cfg: EngineConfig, block: usize, perfect_drafts: bool, forward_time: Option<Duration>) -> EngineHandle {
    start_engine(Box::new(drafting_mock(block, perfect_drafts, forward_time)), tokenizer(), cfg).unwrap()
}

/// The mock of `engine_drafting_with`.
fn drafting_mock(block: usize, perfect_drafts: bool, forward_time: Option<Duration>) -> Mock {
    let mock = Mock::new(None, true);
    let drafter = peregrine_core::DraftSpec {
        block_size: block,
        mask_token_id: 0,
        target_layer_ids: vec![],
        hidden_size: mock.spec.hidden_size,
        rms_norm_eps: 1e-6,
        vocab_size: mock.spec.vocab_size,
        layers: vec![],
        input_embedding_scale: 1.0,
        output_multiplier: 1.0,
        final_logit_softcapping: None,
    };
    Mock { drafter: Some(drafter), perfect_drafts, forward_time, ..mock }
}

fn cfg() -> EngineConfig {
    EngineConfig { max_num_seqs: 16, max_num_batched_tokens: 64, max_model_len: 256, kv_cache_memory_bytes: 100 * 400, gpu_memory_utilization: None, block_size: 4, max_waiting: 64, enable_prefix_caching: true, speculative_block_size: None, model_name: None, overlap_steps: true, speculation: SpeculationMode::Always, kv_cache_dtype: None }
}

fn req(id: &str, prompt: Vec<u32>, sampling: SamplingParams, max_tokens: usize) -> GenerateRequest {
    GenerateRequest {
        request_id: id.into(),
        prompt_tokens: prompt,
        sampling,
        stop: StopParams { max_tokens, ignore_eos: true, skip_special_tokens: true, ..Default::default() },
        prompt_logprobs: None,
        priority: 0,
        arrival: Instant::now(),
        cache_salt: None,
    }
}

#[derive(Debug, Default, PartialEq)]
struct Out {
    tokens: Vec<u32>,
    text: String,
    reason: Option<FinishReason>,
    usage: Usage,
    stop_reason: Option<StopReason>,
}

fn collect(mut rx: RequestStream) -> Out {
    let mut o = Out::default();
    while let Some(ev) = rx.blocking_recv() {
        match ev {
            RequestEvent::Delta { text, token_ids, .. } => {
                o.text.push_str(&text);
                o.tokens.extend(token_ids);
            }
            RequestEvent::Finished { reason, usage, stop_reason } => {
                o.reason = Some(reason);
                o.usage = usage;
                o.stop_reason = stop_reason;
                break;
            }
            RequestEvent::Error(e) => panic!("request failed: {e}"),
            RequestEvent::PromptLogprobs(_) => {}
        }
    }
    o
}

fn wait_idle(e: &EngineHandle) -> EngineStats {
    let t = Instant::now();
    loop {
        let s = e.stats();
        if s.running == 0 && s.waiting == 0 && s.kv_usage == 0.0 && s.free_full_blocks == s.total_full_blocks {
            return s;
        }
        assert!(t.elapsed() < Duration::from_secs(10), "engine not idle: {s:?}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn prompts() -> Vec<Vec<u32>> {
    (0..10).map(|i| (0..(5 + i * 7)).map(|j| 20 + ((j * 13 + i * 5) % 70) as u32).collect()).collect()
}

fn sampling(i: usize) -> SamplingParams {
    if i.is_multiple_of(2) {
        SamplingParams::greedy()
    } else {
        SamplingParams { temperature: 0.9, top_p: 0.95, seed: Some(i as u64), ..Default::default() }
    }
}

fn run_alone(window: Option<usize>, c: EngineConfig) -> Vec<Out> {
    let e = engine(window, c);
    let outs = prompts().into_iter().enumerate().map(|(i, p)| collect(e.submit(req(&format!("r{i}"), p, sampling(i), 20)).unwrap())).collect();
    wait_idle(&e);
    e.shutdown();
    outs
}

fn run_together(window: Option<usize>, c: EngineConfig) -> (Vec<Out>, String) {
    run_together_with(window, c, false, &[])
}

/// Every prompt at once; `overlap` as in `engine_with`; `stop_ids` end any request early.
fn run_together_with(window: Option<usize>, c: EngineConfig, overlap: bool, stop_ids: &[u32]) -> (Vec<Out>, String) {
    run_together_on(engine_with(window, c, overlap), stop_ids)
}

fn run_together_on(e: EngineHandle, stop_ids: &[u32]) -> (Vec<Out>, String) {
    let rx: Vec<_> = prompts()
        .into_iter()
        .enumerate()
        .map(|(i, p)| {
            let mut r = req(&format!("r{i}"), p, sampling(i), 20);
            r.stop.stop_token_ids = stop_ids.to_vec();
            e.submit(r).unwrap()
        })
        .collect();
    let outs = rx.into_iter().map(collect).collect();
    wait_idle(&e);
    let m = e.render_metrics();
    e.shutdown();
    (outs, m)
}

fn counter(metrics: &str, name: &str) -> f64 {
    metrics.lines().find(|l| l.starts_with(name)).and_then(|l| l.rsplit(' ').next()).unwrap().parse().unwrap()
}

#[test]
fn batched_and_chunked_equals_alone() {
    for window in [None, Some(6)] {
        let alone = run_alone(window, EngineConfig { max_num_seqs: 1, enable_prefix_caching: false, ..cfg() });
        assert!(alone.iter().all(|o| o.tokens.len() == 20 && o.reason == Some(FinishReason::Length)));
        let c = EngineConfig { max_num_batched_tokens: 16, ..cfg() };
        let (together, m) = run_together(window, c);
        assert_eq!(alone, together, "window {window:?}");
        assert!(counter(&m, "vllm:generation_tokens_total") >= 200.0);
    }
}

#[test]
fn overlapped_steps_give_the_outputs_of_plain_steps() {
    for window in [None, Some(6)] {
        let swa = if window.is_some() { 16 * 3 + 5 } else { 0 };
        let tiny_kv = EngineConfig { max_model_len: 90, kv_cache_memory_bytes: 100 * 40 + 50 * swa, ..cfg() };
        let small_chunks = EngineConfig { max_num_batched_tokens: 16, ..cfg() };
        // Three running at a time: the others wait while full batches overlap.
        let full_batches = EngineConfig { max_num_seqs: 3, ..cfg() };
        for c in [cfg(), small_chunks, tiny_kv, full_batches] {
            let (plain, _) = run_together_with(window, c.clone(), false, &[]);
            let (over, m) = run_together_with(window, c.clone(), true, &[]);
            assert_eq!(plain, over, "window {window:?}, {c:?}");
            let overlapped = counter(&m, "peregrine:overlapped_steps_total");
            assert!(overlapped > 0.0, "no step overlapped");
            if c.max_num_seqs == 3 {
                // ~70 decode steps, most with requests queued behind a full batch (waiting for
                // an empty queue, only the last ~18 overlapped).
                assert!(overlapped >= 40.0, "full batches with requests queued overlapped {overlapped} steps");
            }
            // A stop token that ends some requests in the middle: the step already started
            // after it computes a row nobody reads.
            let stop = [plain[0].tokens[6], plain[1].tokens[3]];
            let (plain, _) = run_together_with(window, c.clone(), false, &stop);
            let (over, m) = run_together_with(window, c.clone(), true, &stop);
            assert_eq!(plain, over, "window {window:?}, stop ids {stop:?}");
            assert!(plain.iter().filter(|o| o.reason == Some(FinishReason::Stop)).count() >= 2, "the stop ids ended too few requests");
            assert!(counter(&m, "peregrine:overlapped_steps_total") > 0.0, "no step overlapped");
        }
    }
}

/// With a drafter, the adaptive policy's plain steps overlap as steps without a drafter do (its
/// speculative steps cannot: they have a round trip of their own), and a chain of them ends
/// where the policy speculates again; outputs stay those without a drafter.
#[test]
fn adaptive_speculation_overlaps_its_plain_steps() {
    let (base, _) = run_together_with(None, cfg(), true, &[]);
    let (always, m) = run_together_on(engine_drafting(cfg(), 4), &[]);
    assert_eq!(counter(&m, "peregrine:overlapped_steps_total"), 0.0, "drafting on every step, nothing overlaps");
    assert!(counter(&m, "vllm:spec_decode_num_drafts_total") > 0.0);
    let c = EngineConfig { speculation: SpeculationMode::Adaptive, ..cfg() };
    let (adaptive, m) = run_together_on(engine_drafting(c, 4), &[]);
    for (a, b) in base.iter().zip(&adaptive).chain(base.iter().zip(&always)) {
        assert_eq!((&a.tokens, &a.text, a.reason), (&b.tokens, &b.text, b.reason));
    }
    let (rounds, plain, over) = (counter(&m, "vllm:spec_decode_num_drafts_total"), counter(&m, "peregrine:spec_decode_plain_steps_total"), counter(&m, "peregrine:overlapped_steps_total"));
    assert!(rounds > 0.0 && plain > 0.0 && over > 0.0, "{rounds} draft rounds, {plain} plain steps, {over} overlapped");
}

/// Where speculation pays (every step costs the same 3 ms at 1-4 rows, and the drafts are the
/// target's own greedy tokens, so a round commits 4 tokens in the time of 1), the adaptive
/// policy keeps drafting: only its exploration and its probes decode plainly.
#[test]
fn adaptive_speculation_keeps_drafting_where_it_pays() {
    let c = EngineConfig { speculation: SpeculationMode::Adaptive, max_num_seqs: 1, ..cfg() };
    let e = engine_drafting_with(c, 4, true, Some(Duration::from_millis(3)));
    let outs: Vec<Out> = prompts().into_iter().take(4).enumerate().map(|(i, p)| collect(e.submit(req(&format!("r{i}"), p, SamplingParams::greedy(), 80)).unwrap())).collect();
    wait_idle(&e);
    let m = e.render_metrics();
    e.shutdown();
    assert!(outs.iter().all(|o| o.tokens.len() == 80));
    let (rounds, accepted, plain) = (counter(&m, "vllm:spec_decode_num_drafts_total"), counter(&m, "vllm:spec_decode_num_accepted_tokens_total"), counter(&m, "peregrine:spec_decode_plain_steps_total"));
    eprintln!("{rounds} rounds, {accepted} drafts accepted, {plain} plain steps");
    // 4 x 79 tokens after the first: ~80 rounds of 4 if every step drafted.
    assert!(accepted >= 2.5 * rounds, "{accepted} drafts accepted in {rounds} rounds: the drafts are the targets");
    assert!((3.0..=12.0).contains(&plain), "{plain} plain steps beside {rounds} rounds: 3 to explore, then a few probes");
}

/// On a backend whose verify rows round apart from decode rows (the CUDA backend's), the
/// adaptive policy keeps a seeded sampling request from drafting, so which steps draft (their
/// timing) cannot change its text; greedy and unseeded requests still draft, `always` drafts for
/// every request, and on an exact backend seeded requests draft under the adaptive policy too.
/// Every output is the one without a drafter.
#[test]
fn seeded_sampling_decodes_plainly_under_adaptive_where_rows_round_apart() {
    let seeded = SamplingParams { temperature: 0.8, top_p: 0.95, seed: Some(7), ..Default::default() };
    let unseeded = SamplingParams { temperature: 0.8, ..Default::default() };
    let greedy = SamplingParams::greedy();
    let submit = |e: &EngineHandle, sampling: &SamplingParams| {
        let o = collect(e.submit(req("r", prompts()[0].clone(), sampling.clone(), 40)).unwrap());
        wait_idle(e);
        assert_eq!(o.tokens.len(), 40);
        o
    };
    let base = engine_with(None, cfg(), true);
    let (base_seeded, base_greedy) = (submit(&base, &seeded), submit(&base, &greedy));
    base.shutdown();
    // (mode, rows alike, request): whether it drafts.
    let cases = [
        (SpeculationMode::Adaptive, false, &seeded, false),
        (SpeculationMode::Adaptive, false, &greedy, true),
        (SpeculationMode::Adaptive, false, &unseeded, true),
        (SpeculationMode::Always, false, &seeded, true),
        (SpeculationMode::Adaptive, true, &seeded, true),
    ];
    for (mode, alike, sampling, drafts) in cases {
        let c = EngineConfig { speculation: mode, max_num_seqs: 1, ..cfg() };
        let e = start_engine(Box::new(Mock { rows_alike: alike, ..drafting_mock(4, true, None) }), tokenizer(), c).unwrap();
        let o = submit(&e, sampling);
        let rounds = counter(&e.render_metrics(), "vllm:spec_decode_num_drafts_total");
        e.shutdown();
        let case = format!("{mode:?}, rows alike {alike}, seed {:?}, T {}", sampling.seed, sampling.temperature);
        assert_eq!(rounds > 0.0, drafts, "{case}: {rounds} draft rounds");
        if sampling.seed.is_some() {
            assert_eq!(o.tokens, base_seeded.tokens, "{case}");
        } else if sampling.is_greedy() {
            assert_eq!(o.tokens, base_greedy.tokens, "{case}");
        }
    }
    // Together: the greedy request drafts and the seeded one rides its speculative steps
    // without drafts; both outputs as without a drafter.
    let c = EngineConfig { speculation: SpeculationMode::Adaptive, ..cfg() };
    let e = start_engine(Box::new(Mock { rows_alike: false, ..drafting_mock(4, true, None) }), tokenizer(), c).unwrap();
    let (rs, rg) = (e.submit(req("s", prompts()[0].clone(), seeded.clone(), 40)).unwrap(), e.submit(req("g", prompts()[0].clone(), greedy.clone(), 40)).unwrap());
    let (os, og) = (collect(rs), collect(rg));
    wait_idle(&e);
    let rounds = counter(&e.render_metrics(), "vllm:spec_decode_num_drafts_total");
    e.shutdown();
    assert!(rounds > 0.0, "the greedy request never drafted");
    assert_eq!((os.tokens, og.tokens), (base_seeded.tokens, base_greedy.tokens));
}

#[test]
fn overlapped_steps_off_or_with_a_client_gone_leave_nothing_behind() {
    // overlap_steps = false: the backend is never asked to start a step ahead.
    let (outs, m) = run_together_with(None, EngineConfig { overlap_steps: false, ..cfg() }, true, &[]);
    assert!(outs.iter().all(|o| o.tokens.len() == 20));
    assert_eq!(counter(&m, "peregrine:overlapped_steps_total"), 0.0);
    // A client that leaves while its steps overlap: its blocks come back, the others finish.
    let e = engine_with(Some(6), cfg(), true);
    let mut gone = e.submit(req("gone", prompts()[3].clone(), SamplingParams::greedy(), 200)).unwrap();
    let stays = e.submit(req("stays", prompts()[4].clone(), SamplingParams::greedy(), 40)).unwrap();
    let mut seen = 0;
    while seen < 5 {
        if let Some(RequestEvent::Delta { token_ids, .. }) = gone.blocking_recv() {
            seen += token_ids.len();
        }
    }
    drop(gone);
    let o = collect(stays);
    assert_eq!(o.tokens.len(), 40);
    wait_idle(&e);
    assert!(counter(&e.render_metrics(), "peregrine:overlapped_steps_total") > 0.0);
    e.shutdown();
}

#[test]
fn preemption_under_tiny_kv_keeps_outputs() {
    for window in [None, Some(6)] {
        let alone = run_alone(window, EngineConfig { max_num_seqs: 1, enable_prefix_caching: false, ..cfg() });
        // 90 tokens of context need 23 blocks; 40 blocks cannot hold all ten sequences.
        let swa = if window.is_some() { 16 * 3 + 5 } else { 0 };
        let c = EngineConfig { max_model_len: 90, kv_cache_memory_bytes: 100 * 40 + 50 * swa, ..cfg() };
        let (together, m) = run_together(window, c);
        assert!(counter(&m, "vllm:num_preemptions_total") > 0.0, "no preemption happened");
        for (a, t) in alone.iter().zip(&together) {
            assert_eq!(a.tokens, t.tokens);
            assert_eq!(a.text, t.text);
        }
    }
}

#[test]
fn prefix_cache_reuse_gives_same_output() {
    let e = engine(None, cfg());
    let p = prompts()[5].clone();
    let a = collect(e.submit(req("a", p.clone(), SamplingParams::greedy(), 10)).unwrap());
    assert_eq!(a.usage.cached_tokens, 0);
    let b = collect(e.submit(req("b", p.clone(), SamplingParams::greedy(), 10)).unwrap());
    assert_eq!(b.usage.cached_tokens, (p.len() - 1) / 4 * 4);
    assert!(b.usage.cached_tokens > 0);
    assert_eq!(a.tokens, b.tokens);
    wait_idle(&e);
    let m = e.render_metrics();
    assert!(counter(&m, "vllm:prefix_cache_hits_total") > 0.0);
    // With sliding-window layers the window blocks before the hit are cached too.
    let e2 = engine(Some(6), cfg());
    let c = collect(e2.submit(req("a", p.clone(), SamplingParams::greedy(), 10)).unwrap());
    let d = collect(e2.submit(req("b", p.clone(), SamplingParams::greedy(), 10)).unwrap());
    assert_eq!(d.usage.cached_tokens, (p.len() - 1) / 4 * 4);
    assert_eq!(c.tokens, d.tokens);
    // A longer prompt sharing the prompt + generated text hits past the original prompt.
    let mut longer = p.clone();
    longer.extend(&c.tokens);
    longer.push(33);
    let f = collect(e2.submit(req("f", longer.clone(), SamplingParams::greedy(), 10)).unwrap());
    assert!(f.usage.cached_tokens > d.usage.cached_tokens);
    let e3 = engine(Some(6), EngineConfig { enable_prefix_caching: false, ..cfg() });
    let g = collect(e3.submit(req("g", longer, SamplingParams::greedy(), 10)).unwrap());
    assert_eq!(g.usage.cached_tokens, 0);
    assert_eq!(f.tokens, g.tokens);
    wait_idle(&e2);
    wait_idle(&e3);
}

#[test]
fn dropped_streams_free_everything() {
    let e = engine(Some(6), EngineConfig { max_num_batched_tokens: 8, max_num_seqs: 2, ..cfg() });
    let long: Vec<u32> = (0..100).map(|i| 20 + i % 50).collect();
    // Mid-decode: read one delta, then drop.
    let mut rx = e.submit(req("a", prompts()[0].clone(), SamplingParams::greedy(), 200)).unwrap();
    assert!(matches!(rx.blocking_recv(), Some(RequestEvent::Delta { .. })));
    // Mid-prefill (100 tokens at 8 per step) and still waiting.
    let rx2 = e.submit(req("b", long.clone(), SamplingParams::greedy(), 200)).unwrap();
    let rx3 = e.submit(req("c", long, SamplingParams::greedy(), 200)).unwrap();
    drop(rx);
    drop(rx2);
    drop(rx3);
    wait_idle(&e);
    // The engine still serves.
    let o = collect(e.submit(req("d", prompts()[1].clone(), SamplingParams::greedy(), 3)).unwrap());
    assert_eq!(o.tokens.len(), 3);
    wait_idle(&e);
    e.shutdown();
}

/// `unfinished` counts every sequence the engine holds, whichever way it leaves: finished,
/// dropped by its client, refused as a group, aborted at shutdown. A draining server waits for
/// it to reach zero, so a sequence it forgets would hold a shutdown to its deadline, and one it
/// loses would cut a request short.
#[test]
fn unfinished_counts_each_sequence_until_it_leaves() {
    // Steps of 2 ms, so none of these requests (50 tokens and more) can finish before the counts
    // are read.
    let mock = Mock { forward_time: Some(Duration::from_millis(2)), ..Mock::new(None, false) };
    let e = start_engine(Box::new(mock), tokenizer(), EngineConfig { max_num_seqs: 2, max_waiting: 3, ..cfg() }).unwrap();
    assert_eq!(e.unfinished(), 0);
    let a = e.submit(req("a", prompts()[0].clone(), SamplingParams::greedy(), 50)).unwrap();
    let b = e.submit(req("b", prompts()[1].clone(), SamplingParams::greedy(), 1000)).unwrap();
    let c = e.submit(req("c", prompts()[2].clone(), SamplingParams::greedy(), 50)).unwrap();
    assert_eq!(e.unfinished(), 3, "running and waiting sequences");
    // A group the full queue refuses adds nothing: c waits (two run at most), so three more
    // cannot join it in a queue of three, whether a and b were admitted yet or not.
    let group = (0..3).map(|i| req(&format!("g{i}"), prompts()[3].clone(), SamplingParams::greedy(), 5)).collect();
    assert_eq!(e.submit_group(group).unwrap_err(), SubmitError::QueueFull);
    assert_eq!(e.unfinished(), 3, "a refused group");
    drop(c);
    let until = |n: usize| {
        let t = Instant::now();
        while e.unfinished() != n {
            assert!(t.elapsed() < Duration::from_secs(10), "unfinished stays {} (want {n})", e.unfinished());
            std::thread::sleep(Duration::from_millis(1));
        }
    };
    until(2);
    // A group refused after its first sequence was made (the second's constraint is refused)
    // gives that sequence's count back.
    let mut bad = req("g1", prompts()[3].clone(), SamplingParams::greedy(), 5);
    (bad.sampling.json_object, bad.sampling.allowed_token_ids) = (true, Some(vec![20, 21]));
    let group = vec![req("g0", prompts()[3].clone(), SamplingParams::greedy(), 5), bad];
    assert!(matches!(e.submit_group(group), Err(SubmitError::Constraint(_))));
    assert_eq!(e.unfinished(), 2, "a group refused for its constraint");
    assert_eq!(collect(a).tokens.len(), 50);
    until(1);
    let d = e.submit(req("d", prompts()[4].clone(), SamplingParams::greedy(), 1000)).unwrap();
    assert_eq!(e.unfinished(), 2);
    e.shutdown();
    assert_eq!(e.unfinished(), 0, "aborted at shutdown");
    assert_eq!(collect(b).reason, Some(FinishReason::Abort));
    assert_eq!(collect(d).reason, Some(FinishReason::Abort));
}

/// Per-request histograms with vLLM's names: prompt and output lengths of each finished request
/// (1-2-5 buckets up to the context), and its prefill, decode and inference times.
#[test]
fn finished_requests_are_measured_per_request() {
    let e = engine(None, cfg());
    let (a, b) = (prompts()[1].clone(), prompts()[4].clone());
    collect(e.submit(req("a", a.clone(), SamplingParams::greedy(), 7)).unwrap());
    collect(e.submit(req("b", b.clone(), SamplingParams::greedy(), 3)).unwrap());
    let m = e.render_metrics();
    let value = |name: &str| counter(&m, &format!("{name}{{model_name="));
    assert_eq!((value("vllm:request_prompt_tokens_count"), value("vllm:request_prompt_tokens_sum")), (2.0, (a.len() + b.len()) as f64), "{m}");
    assert_eq!((value("vllm:request_generation_tokens_count"), value("vllm:request_generation_tokens_sum")), (2.0, 10.0), "{m}");
    // cfg's context is 256 tokens: buckets 1, 2, 5, .. 200 (and +Inf).
    let les: Vec<&str> = m.lines().filter(|l| l.starts_with("vllm:request_generation_tokens_bucket")).filter_map(|l| l.split("le=\"").nth(1)?.split('"').next()).collect();
    assert_eq!(les, ["1", "2", "5", "10", "20", "50", "100", "200", "+Inf"], "{m}");
    for name in ["vllm:request_prefill_time_seconds", "vllm:request_decode_time_seconds", "vllm:request_inference_time_seconds"] {
        assert_eq!(value(&format!("{name}_count")), 2.0, "{name}: {m}");
        assert!(value(&format!("{name}_sum")) > 0.0, "{name}: {m}");
    }
    assert!(value("vllm:request_inference_time_seconds_sum") >= value("vllm:request_decode_time_seconds_sum"));
    wait_idle(&e);
}

#[test]
fn stop_strings_across_token_boundaries() {
    let e = engine(None, cfg());
    let p = prompts()[2].clone();
    let full = collect(e.submit(req("a", p.clone(), SamplingParams::greedy(), 30)).unwrap());
    let chars: Vec<(usize, char)> = full.text.char_indices().collect();
    assert!(chars.len() > 12, "text too short: {:?}", full.text);
    // A stop string spanning several tokens, starting in the middle of the text.
    let (s, _) = chars[chars.len() / 2];
    let (e_, _) = chars[chars.len() / 2 + 5];
    let stop = full.text[s..e_].to_string();
    let first = full.text.find(&stop).unwrap();
    let mut r = req("b", p, SamplingParams::greedy(), 30);
    r.stop.stop_strings = vec!["\u{1}never".into(), stop.clone()];
    let o = collect(e.submit(r).unwrap());
    assert_eq!((o.reason, &o.stop_reason), (Some(FinishReason::Stop), &Some(StopReason::Text(stop.clone()))));
    assert_eq!((full.reason, &full.stop_reason), (Some(FinishReason::Length), &None));
    assert_eq!(o.text, full.text[..first], "stop {stop:?}");
    assert!(o.tokens.len() < full.tokens.len());
    // Asked for, the stop string is in the output too, and the output ends there.
    let mut r = req("b2", prompts()[2].clone(), SamplingParams::greedy(), 30);
    (r.stop.stop_strings, r.stop.include_stop_str) = (vec!["\u{1}never".into(), stop.clone()], true);
    let o2 = collect(e.submit(r).unwrap());
    assert_eq!((o2.reason, o2.text.as_str(), &o2.tokens), (Some(FinishReason::Stop), &full.text[..first + stop.len()], &o.tokens), "stop {stop:?}, included");
    assert_eq!(o2.stop_reason, Some(StopReason::Text(stop.clone())));
    // Stop token id: ends at that token, its text not emitted.
    let mut r = req("c", prompts()[2].clone(), SamplingParams::greedy(), 30);
    let k = 7;
    r.stop.stop_token_ids = vec![full.tokens[k]];
    let o = collect(e.submit(r).unwrap());
    let at = full.tokens.iter().position(|&t| t == full.tokens[k]).unwrap();
    assert_eq!(o.tokens, full.tokens[..=at]);
    assert_eq!((o.reason, o.stop_reason), (Some(FinishReason::Stop), Some(StopReason::Token(full.tokens[k]))));
    wait_idle(&e);
}

#[test]
fn queue_full_invalid_and_shutdown() {
    let e = engine(None, EngineConfig { max_waiting: 2, max_num_seqs: 1, ..cfg() });
    let mut rxs = vec![];
    let mut full = false;
    for i in 0..20 {
        match e.submit(req(&format!("q{i}"), prompts()[9].clone(), SamplingParams::greedy(), 100)) {
            Ok(rx) => rxs.push(rx),
            Err(SubmitError::QueueFull) => full = true,
            Err(x) => panic!("{x:?}"),
        }
    }
    assert!(full);
    let too_long = vec![30u32; 300];
    assert!(matches!(e.submit(req("x", too_long, SamplingParams::greedy(), 1)), Err(SubmitError::Invalid(_))));
    e.shutdown();
    for rx in rxs {
        let o = collect(rx);
        assert!(matches!(o.reason, Some(FinishReason::Abort) | Some(FinishReason::Length)));
    }
    assert_eq!(e.submit(req("y", vec![30], SamplingParams::greedy(), 1)).unwrap_err(), SubmitError::ShuttingDown);
}

#[test]
fn too_small_kv_is_a_clear_error() {
    let mock = Mock::new(None, false);
    let err = start_engine(Box::new(mock), tokenizer(), EngineConfig { kv_cache_memory_bytes: 1000, ..cfg() }).err().unwrap();
    assert!(err.to_string().contains("kv_cache_memory_bytes"), "{err}");
}

fn logprob_run(chunk: usize) -> (Vec<Option<PromptLogprob>>, Vec<TokenLogprob>, Vec<u32>) {
    let e = engine(Some(6), EngineConfig { max_num_batched_tokens: chunk, ..cfg() });
    let p = prompts()[3].clone();
    let mut r = req("lp", p, SamplingParams { logprobs: Some(3), ..SamplingParams::greedy() }, 5);
    r.prompt_logprobs = Some(2);
    let mut rx = e.submit(r).unwrap();
    let (mut plp, mut lps, mut toks) = (None, vec![], vec![]);
    while let Some(ev) = rx.blocking_recv() {
        match ev {
            RequestEvent::PromptLogprobs(v) => {
                assert!(toks.is_empty(), "prompt logprobs come first");
                plp = Some(v)
            }
            RequestEvent::Delta { logprobs, token_ids, .. } => {
                lps.extend(logprobs);
                toks.extend(token_ids)
            }
            RequestEvent::Finished { .. } => break,
            RequestEvent::Error(e) => panic!("{e}"),
        }
    }
    wait_idle(&e);
    (plp.expect("no prompt logprobs"), lps, toks)
}

#[test]
fn logprobs_and_prompt_logprobs() {
    let p = prompts()[3].clone();
    let (plp, lps, toks) = logprob_run(4);
    assert_eq!(plp.len(), p.len());
    assert!(plp[0].is_none());
    for (i, e) in plp.iter().enumerate().skip(1) {
        let PromptLogprob { token: e, rank } = e.as_ref().unwrap();
        assert_eq!(e.token_id, p[i]);
        assert_eq!(e.top.len(), 2);
        assert!(e.logprob <= 0.0 && e.top[0].1 >= e.top[1].1);
        // Its rank agrees with the top entries: one of them, it counts those at least as likely
        // (itself included; exact unless every entry is, when a tie past them may count too);
        // not one of them, it ranks below them all.
        let at_least = e.top.iter().filter(|x| x.1 >= e.logprob).count();
        if e.top.iter().any(|&(t, _)| t == e.token_id) {
            if at_least < e.top.len() {
                assert_eq!(*rank as usize, at_least, "position {i}");
            } else {
                assert!(*rank as usize >= at_least, "position {i}: rank {rank}");
            }
        } else {
            assert!(*rank as usize > e.top.len(), "position {i}: rank {rank}");
        }
    }
    assert_eq!(lps.len(), toks.len());
    for (l, &t) in lps.iter().zip(&toks) {
        assert_eq!(l.token_id, t);
        assert_eq!(l.top.len(), 3);
        // Greedy picks the most likely raw token here (no penalties).
        assert_eq!(l.top[0], (t, l.logprob));
        let total: f32 = l.top.iter().map(|x| x.1.exp()).sum();
        assert!(total <= 1.0 + 1e-5);
    }
    // Chunking does not change anything.
    assert_eq!(logprob_run(64), (plp, lps, toks));
}

#[test]
fn priority_orders_waiting_requests() {
    let e = engine(None, EngineConfig { max_num_seqs: 1, max_model_len: 4096, kv_cache_memory_bytes: 100 * 1100, ..cfg() });
    // Occupy the only slot with a long request, queue a low- and a high-priority request, then
    // free the slot by dropping the long one.
    let mut busy = e.submit(req("busy", prompts()[0].clone(), SamplingParams::greedy(), 4000)).unwrap();
    assert!(matches!(busy.blocking_recv(), Some(RequestEvent::Delta { .. })));
    // With one slot the two run one after the other. low is long: had it run first, its
    // Finished would already be queued when high's arrives; run second, it is still hundreds of
    // steps from done. (Polling both streams for the first Finished raced: both short requests
    // could finish before the test looked, and the poll order picked the winner.)
    let mut low = req("low", prompts()[1].clone(), SamplingParams::greedy(), 3000);
    low.priority = 5;
    let mut high = req("high", prompts()[2].clone(), SamplingParams::greedy(), 2);
    high.priority = -1;
    let mut rl = e.submit(low).unwrap();
    let rh = e.submit(high).unwrap();
    // Both wait before the slot frees (a loaded machine could otherwise free it, and schedule
    // low, before the engine had taken high in).
    let t = Instant::now();
    while e.stats().waiting < 2 {
        assert!(t.elapsed() < Duration::from_secs(10), "the two requests never waited together: {:?}", e.stats());
        std::thread::sleep(Duration::from_millis(1));
    }
    drop(busy);
    let high_out = collect(rh);
    assert_eq!(high_out.tokens.len(), 2);
    let (mut low_finished, mut low_tokens) = (false, 0);
    while let Ok(ev) = rl.try_recv() {
        match ev {
            RequestEvent::Delta { token_ids, .. } => low_tokens += token_ids.len(),
            RequestEvent::Finished { .. } => low_finished = true,
            _ => {}
        }
    }
    assert!(!low_finished, "the low-priority request finished before the high-priority one");
    assert_eq!(low_tokens + collect(rl).tokens.len(), 3000, "low still completes");
    wait_idle(&e);
}

#[test]
fn unmatched_stop_prefix_is_held_then_released() {
    let e = engine(None, cfg());
    let p = prompts()[4].clone();
    let full = collect(e.submit(req("a", p.clone(), SamplingParams::greedy(), 25)).unwrap());
    // Starts like the output but never completes: the text is held back, then all released.
    let head: String = full.text.chars().take(3).collect();
    let mut r = req("b", p, SamplingParams::greedy(), 25);
    r.stop.stop_strings = vec![format!("{head}\u{2}")];
    let stop = format!("{head}\u{2}");
    let mut rx = e.submit(r).unwrap();
    let mut text = String::new();
    let mut checked = 0;
    while let Some(ev) = rx.blocking_recv() {
        match ev {
            RequestEvent::Delta { text: t, token_ids, .. } => {
                text.push_str(&t);
                if !token_ids.is_empty() && text.len() < full.text.len() {
                    // While generating, sent text never ends with a possible stop-string start.
                    let bad = (1..=stop.len()).filter(|&n| stop.is_char_boundary(n)).any(|n| text.ends_with(&stop[..n]));
                    assert!(!bad, "held-back text was sent: {text:?}");
                    checked += 1;
                }
            }
            RequestEvent::Finished { reason, .. } => {
                assert_eq!(reason, FinishReason::Length);
                break;
            }
            _ => {}
        }
    }
    assert!(checked > 5);
    assert_eq!(text, full.text);
    wait_idle(&e);
}

#[test]
fn concurrent_copies_of_a_seeded_request_agree() {
    let e = engine(Some(6), EngineConfig { max_num_batched_tokens: 12, ..cfg() });
    let s = SamplingParams { temperature: 1.3, top_k: 20, seed: Some(99), ..Default::default() };
    let rxs: Vec<_> = (0..6).map(|i| e.submit(req(&format!("c{i}"), prompts()[6].clone(), s.clone(), 30)).unwrap()).collect();
    let outs: Vec<Out> = rxs.into_iter().map(collect).collect();
    for o in &outs[1..] {
        assert_eq!(o.tokens, outs[0].tokens);
    }
    // A different seed gives a different sample path.
    let other = collect(e.submit(req("d", prompts()[6].clone(), SamplingParams { seed: Some(100), ..s }, 30)).unwrap());
    assert_ne!(other.tokens, outs[0].tokens);
    wait_idle(&e);
    let m = e.render_metrics();
    assert!(m.contains("vllm:time_to_first_token_seconds_bucket{model_name=\"mimo_v2_flash\",le=\"0.0001\"}"), "{m}");
    assert!(m.contains("vllm:request_success_total{finished_reason=\"length\",model_name=\"mimo_v2_flash\"} 7"), "{m}");
    assert!(m.contains("peregrine:step_duration_seconds_count"));
}

/// The mock with an injected failure: forward call number `fail_at` (from 1) fails. A `sticky`
/// failure breaks the backend for good, like a lost GPU context: every later forward fails and
/// `check_health` reports it; otherwise only that call fails and the backend stays healthy.
/// Forward calls first wait for `gate`, so a test holding it can queue requests before the
/// engine's second step.
struct Failing {
    inner: Mock,
    /// Forward calls so far.
    calls: Arc<std::sync::atomic::AtomicUsize>,
    fail_at: usize,
    sticky: bool,
    /// The failing call panics instead of returning an error (a bug inside the step).
    panics: bool,
    broken: bool,
    gate: Arc<std::sync::Mutex<()>>,
    /// Sequences in the batch of the failed call.
    failed_batch: Arc<std::sync::Mutex<Option<usize>>>,
    health_checks: Arc<std::sync::atomic::AtomicUsize>,
}

const LOST: &str = "the GPU context is lost (injected CUDA_ERROR_ILLEGAL_ADDRESS); restart the server";

impl Backend for Failing {
    fn spec(&self) -> &ModelSpec {
        self.inner.spec()
    }
    fn kv_block_bytes(&self, bs: usize) -> KvBlockBytes {
        self.inner.kv_block_bytes(bs)
    }
    fn init_kv(&mut self, c: KvConfig) -> Result<()> {
        self.inner.init_kv(c)
    }
    fn forward(&mut self, batch: &[SeqForward]) -> Result<Vec<Logits>> {
        drop(self.gate.lock().unwrap());
        let call = self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
        if self.broken {
            return Err(peregrine_core::Error::Backend("CUDA_ERROR_ILLEGAL_ADDRESS".into()));
        }
        if call == self.fail_at {
            if self.panics {
                panic!("injected panic in forward");
            }
            self.broken = self.sticky;
            *self.failed_batch.lock().unwrap() = Some(batch.len());
            return Err(peregrine_core::Error::Backend("injected forward failure".into()));
        }
        self.inner.forward(batch)
    }
    fn name(&self) -> &str {
        "failing-mock"
    }
    fn check_health(&mut self) -> Result<()> {
        self.health_checks.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        if self.broken {
            return Err(peregrine_core::Error::Backend(LOST.into()));
        }
        Ok(())
    }
}

struct FailingEngine {
    e: EngineHandle,
    calls: Arc<std::sync::atomic::AtomicUsize>,
    gate: Arc<std::sync::Mutex<()>>,
    failed_batch: Arc<std::sync::Mutex<Option<usize>>>,
    health_checks: Arc<std::sync::atomic::AtomicUsize>,
}

fn failing_engine(fail_at: usize, sticky: bool, c: EngineConfig) -> FailingEngine {
    failing_engine_as(fail_at, sticky, false, c)
}

fn failing_engine_as(fail_at: usize, sticky: bool, panics: bool, c: EngineConfig) -> FailingEngine {
    let gate = Arc::new(std::sync::Mutex::new(()));
    let failed_batch = Arc::new(std::sync::Mutex::new(None));
    let health_checks = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let backend = Failing {
        inner: Mock::new(None, false),
        calls: calls.clone(),
        fail_at,
        sticky,
        panics,
        broken: false,
        gate: gate.clone(),
        failed_batch: failed_batch.clone(),
        health_checks: health_checks.clone(),
    };
    let e = start_engine(Box::new(backend), tokenizer(), c).unwrap();
    FailingEngine { e, calls, gate, failed_batch, health_checks }
}

/// Submits four greedy requests while the backend is held, so that the second forward call
/// runs `f0` and `f1` (two slots) with `f2` and `f3` waiting, whatever the thread timing.
fn submit_four(f: &FailingEngine) -> Vec<RequestStream> {
    let held = f.gate.lock().unwrap();
    let rxs = (0..4).map(|i| f.e.submit(req(&format!("f{i}"), prompts()[i].clone(), SamplingParams::greedy(), 100)).unwrap()).collect();
    drop(held);
    rxs
}

/// The events of a request that must fail: the error message, after checking that nothing
/// follows it and that it did not finish.
fn expect_error(mut rx: RequestStream) -> String {
    while let Some(ev) = rx.blocking_recv() {
        match ev {
            RequestEvent::Error(m) => {
                assert!(rx.blocking_recv().is_none(), "an event followed the error");
                return m;
            }
            RequestEvent::Finished { reason, .. } => panic!("finished ({reason:?}) instead of failing"),
            RequestEvent::Delta { .. } | RequestEvent::PromptLogprobs(_) => {}
        }
    }
    panic!("the stream closed without an error");
}

#[test]
fn lost_backend_fails_every_request_and_refuses_new_ones() {
    let f = failing_engine(2, true, EngineConfig { max_num_seqs: 2, ..cfg() });
    assert_eq!(f.e.failure(), None);
    let rxs = submit_four(&f);
    // Running and waiting requests alike get the backend's reason.
    let msgs: Vec<String> = rxs.into_iter().map(expect_error).collect();
    assert_eq!(*f.failed_batch.lock().unwrap(), Some(2), "the failed step ran two sequences; two were waiting");
    let failure = f.e.failure().expect("the engine has failed");
    assert!(failure.contains(LOST), "{failure}");
    for m in &msgs {
        assert_eq!(m, &failure);
    }
    // Every block is back, nothing runs or waits.
    let st = wait_idle(&f.e);
    assert_eq!(st.kv_usage, 0.0);
    assert_eq!(st.free_full_blocks, st.total_full_blocks);
    // Later submits are refused with the reason, before touching the queue.
    for i in 0..3 {
        match f.e.submit(req(&format!("late{i}"), prompts()[0].clone(), SamplingParams::greedy(), 5)) {
            Err(SubmitError::BackendFailed(m)) => assert_eq!(m, failure),
            Err(x) => panic!("{x:?}"),
            Ok(_) => panic!("a failed engine accepted a request"),
        }
    }
    assert_eq!(f.e.stats().waiting, 0);
    // The waiting requests failed at once: nothing was scheduled after the failed step.
    assert_eq!(f.calls.load(std::sync::atomic::Ordering::SeqCst), 2);
    assert_eq!(f.health_checks.load(std::sync::atomic::Ordering::SeqCst), 1);
    assert_eq!(counter(&f.e.render_metrics(), "peregrine:backend_failed"), 1.0);
    f.e.shutdown();
    assert_eq!(f.e.failure(), Some(failure));
}

/// A panic inside a step fails the engine as a lost backend does: running and waiting requests
/// get the reason as an error (their streams are not just cut), every block is back, and
/// later submits are refused with it (the server's /health says it too).
#[test]
fn a_panic_in_a_step_fails_every_request_with_the_reason() {
    let f = failing_engine_as(2, false, true, EngineConfig { max_num_seqs: 2, ..cfg() });
    let rxs = submit_four(&f);
    let msgs: Vec<String> = rxs.into_iter().map(expect_error).collect();
    let failure = f.e.failure().expect("the engine has failed");
    assert!(failure.contains("the engine panicked (injected panic in forward)"), "{failure}");
    assert!(msgs.iter().all(|m| m == &failure), "{msgs:?}");
    let st = wait_idle(&f.e);
    assert_eq!((st.kv_usage, st.running, st.waiting), (0.0, 0, 0));
    match f.e.submit(req("late", prompts()[0].clone(), SamplingParams::greedy(), 5)) {
        Err(SubmitError::BackendFailed(m)) => assert_eq!(m, failure),
        Err(x) => panic!("{x:?}"),
        Ok(_) => panic!("a failed engine accepted a request"),
    }
    assert_eq!(counter(&f.e.render_metrics(), "peregrine:backend_failed"), 1.0);
    f.e.shutdown();
}

#[test]
fn failed_step_with_a_healthy_backend_fails_only_its_sequences() {
    let c = EngineConfig { max_num_seqs: 2, ..cfg() };
    let f = failing_engine(2, false, c.clone());
    let mut rxs = submit_four(&f);
    let waiting = rxs.split_off(2);
    // The step's two sequences fail with the forward's error...
    for rx in rxs {
        let m = expect_error(rx);
        assert!(m.contains("injected forward failure"), "{m}");
    }
    assert_eq!(*f.failed_batch.lock().unwrap(), Some(2));
    // ... the waiting ones run afterwards exactly as on a backend that never failed ...
    let got: Vec<Out> = waiting.into_iter().map(collect).collect();
    let clean = engine(None, c);
    let want: Vec<Out> = (2..4).map(|i| collect(clean.submit(req(&format!("f{i}"), prompts()[i].clone(), SamplingParams::greedy(), 100)).unwrap())).collect();
    assert_eq!(got, want);
    assert!(got.iter().all(|o| o.tokens.len() == 100 && o.reason == Some(FinishReason::Length)));
    // ... and the engine keeps serving new requests.
    let o = collect(f.e.submit(req("after", prompts()[5].clone(), SamplingParams::greedy(), 7)).unwrap());
    assert_eq!(o.tokens.len(), 7);
    assert_eq!(f.e.failure(), None);
    assert_eq!(f.health_checks.load(std::sync::atomic::Ordering::SeqCst), 1);
    assert_eq!(counter(&f.e.render_metrics(), "peregrine:backend_failed"), 0.0);
    wait_idle(&f.e);
    wait_idle(&clean);
    f.e.shutdown();
    clean.shutdown();
}

/// `allowed_token_ids`: sampled (greedy and seeded) and drafted beside unconstrained sequences,
/// every output token is one of the allowed ids, and the other sequences decode as alone.
#[test]
fn allowed_token_ids_hold_every_output_token() {
    for e in [engine(None, cfg()), engine_drafting(cfg(), 4)] {
        let alone = collect(e.submit(req("plain-alone", prompts()[3].clone(), SamplingParams::greedy(), 12)).unwrap());
        let allowed = vec![23u32, 41, 57];
        let mut rxs = Vec::new();
        for (i, sampling) in [SamplingParams::greedy(), SamplingParams { temperature: 1.0, seed: Some(5), ..SamplingParams::default() }].into_iter().enumerate() {
            let s = SamplingParams { allowed_token_ids: Some(allowed.clone()), ..sampling };
            rxs.push(e.submit(req(&format!("allowed-{i}"), prompts()[i].clone(), s, 12)).unwrap());
        }
        let beside = collect(e.submit(req("plain", prompts()[3].clone(), SamplingParams::greedy(), 12)).unwrap());
        for rx in rxs {
            let o = collect(rx);
            assert_eq!(o.tokens.len(), 12);
            assert!(o.tokens.iter().all(|t| allowed.contains(t)), "{:?}", o.tokens);
        }
        assert_eq!(beside.tokens, alone.tokens, "an unconstrained sequence decodes as alone");
        wait_idle(&e);
        e.shutdown();
    }
}

/// `min_tokens` bans the tokens that would end the output (stop ids, EOS unless ignored) from
/// sampling until it is reached, as vLLM does, rather than sampling them and carrying on past
/// them: on the host sampler and in overlapped steps (the backend's logit adjustments), greedy
/// and sampled.
#[test]
fn min_tokens_bans_the_stop_tokens_until_reached() {
    let eos = *spec(None).eos_token_ids.iter().chain(&tokenizer().eos_token_ids()).next().expect("the fixture has an EOS");
    let seeded = SamplingParams { temperature: 1.0, seed: Some(5), ..Default::default() };
    for overlap in [false, true] {
        for p in [SamplingParams::greedy(), seeded.clone()] {
            let e = engine_with(None, cfg(), overlap);
            let run = |r: GenerateRequest| collect(e.submit(r).unwrap());
            // A stop id this output would reach at its second token.
            let free = run(req("free", prompts()[0].clone(), p.clone(), 12));
            let x = free.tokens[1];
            let mut r = req("stop-id", prompts()[0].clone(), p.clone(), 12);
            r.stop.stop_token_ids = vec![x];
            let o = run(r.clone());
            assert_eq!((o.tokens.len(), o.reason), (2, Some(FinishReason::Stop)), "overlap {overlap}, {p:?}: {o:?}");
            r.stop.min_tokens = 6;
            let o = run(r);
            let cut = o.tokens.len().min(6);
            assert!(o.tokens.len() >= 6, "overlap {overlap}, {p:?}: {o:?}");
            assert!(!o.tokens[..cut].contains(&x), "overlap {overlap}, {p:?}: {x} sampled before min_tokens: {o:?}");
            // EOS made every step's choice: exactly min_tokens tokens come first, then it ends.
            let mut r = req("eos", prompts()[1].clone(), p.clone(), 12);
            r.sampling.logit_bias.insert(eos, 50.0);
            r.stop.ignore_eos = false;
            r.stop.min_tokens = 4;
            let o = run(r);
            assert_eq!(o.reason, Some(FinishReason::Stop), "overlap {overlap}, {p:?}: {o:?}");
            assert!(!o.tokens[..4].contains(&eos), "overlap {overlap}, {p:?}: {o:?}");
            assert_eq!(o.usage.completion_tokens, 5, "four tokens, then EOS: {o:?}");
            e.shutdown();
        }
    }
}

/// `stop_reason` for the model's ends, as vLLM gives it: the tokenizer's EOS names none (also
/// when listed as a stop id: EOS is checked first), another EOS id of the model's config names
/// itself (vLLM makes it a stop id), and with `ignore_eos` only stop ids end the output.
#[test]
fn only_the_tokenizers_eos_ends_without_a_stop_reason() {
    let mut tok = Tokenizer::from_file(&Path::new(FIX).join("tokenizer.json")).unwrap();
    tok.set_special_tokens(None, Some("<|im_end|>".into()), false);
    let tok_eos = tok.eos_token_ids()[0];
    let other = (5..100).find(|t| *t != tok_eos).unwrap();
    let mut mock = Mock::new(None, false);
    mock.spec.eos_token_ids = vec![tok_eos, other];
    let e = start_engine(Box::new(mock), Arc::new(tok), cfg()).unwrap();
    let forced = |id: u32, ignore_eos: bool, stop_ids: &[u32]| {
        let mut r = req(&format!("eos-{id}-{ignore_eos}-{stop_ids:?}"), prompts()[1].clone(), SamplingParams::greedy(), 6);
        r.sampling.logit_bias.insert(id, 50.0);
        (r.stop.ignore_eos, r.stop.stop_token_ids) = (ignore_eos, stop_ids.to_vec());
        let o = collect(e.submit(r).unwrap());
        (o.tokens.len(), o.reason, o.stop_reason)
    };
    let (stop, length) = (Some(FinishReason::Stop), Some(FinishReason::Length));
    assert_eq!(forced(tok_eos, false, &[]), (1, stop, None));
    assert_eq!(forced(tok_eos, false, &[tok_eos]), (1, stop, None));
    assert_eq!(forced(tok_eos, true, &[tok_eos]), (1, stop, Some(StopReason::Token(tok_eos))));
    assert_eq!(forced(tok_eos, true, &[]), (6, length, None));
    assert_eq!(forced(other, false, &[]), (1, stop, Some(StopReason::Token(other))));
    assert_eq!(forced(other, true, &[]), (6, length, None));
    e.shutdown();
}

/// Of two stop strings ending in one token, the match that starts first ends the output and is
/// the reason given, whichever is listed first.
#[test]
fn the_earliest_stop_string_is_the_reason() {
    let e = engine(None, cfg());
    let full = collect(e.submit(req("free", prompts()[2].clone(), SamplingParams::greedy(), 30)).unwrap());
    let chars: Vec<(usize, char)> = full.text.char_indices().collect();
    let (a, b, c) = (chars[chars.len() / 2].0, chars[chars.len() / 2 + 3].0, chars[chars.len() / 2 + 5].0);
    // `late` starts inside `early` and both end at c: `early` wins though listed second.
    let (early, late) = (full.text[a..c].to_string(), full.text[b..c].to_string());
    assert!(full.text.find(&late).unwrap() >= b && full.text.find(&early).unwrap() == a, "the text repeats: {:?}", full.text);
    let mut r = req("two", prompts()[2].clone(), SamplingParams::greedy(), 30);
    r.stop.stop_strings = vec![late.clone(), early.clone()];
    let o = collect(e.submit(r).unwrap());
    assert_eq!((o.text.as_str(), o.stop_reason), (&full.text[..a], Some(StopReason::Text(early))));
    e.shutdown();
}

/// `bad_words` (vLLM's): a word's last token is never sampled where the output ends with the
/// tokens before it, and a one-token word never at all; up to the first place a ban bites the
/// output is the free one's (the same draws). On the host sampler, in overlapped steps (the
/// backend's logit adjustments) and verifying drafts that propose exactly the banned tokens;
/// greedy and sampled.
#[test]
fn bad_words_never_appear_in_the_output() {
    let seeded = SamplingParams { temperature: 1.0, seed: Some(5), ..Default::default() };
    for kind in ["host", "overlap", "drafts"] {
        for p in [SamplingParams::greedy(), seeded.clone()] {
            let e = match kind {
                "drafts" => engine_drafting_with(cfg(), 4, true, None),
                _ => engine_with(None, cfg(), kind == "overlap"),
            };
            let run = |words: Vec<Vec<u32>>| {
                let mut r = req("bad", prompts()[0].clone(), p.clone(), 16);
                r.sampling.bad_words = words;
                collect(e.submit(r).unwrap())
            };
            let free = run(vec![]);
            assert_eq!(free.tokens.len(), 16);
            // Two tokens the free output has side by side, first at `at`.
            let (a, b) = (free.tokens[2], free.tokens[3]);
            let at = free.tokens.windows(2).position(|w| w == [a, b]).unwrap();
            let o = run(vec![vec![a, b]]);
            assert_eq!(o.tokens.len(), 16, "{kind}, {p:?}: {o:?}");
            assert!(!o.tokens.windows(2).any(|w| w == [a, b]), "{kind}, {p:?}: {a} {b} in {:?}", o.tokens);
            assert_eq!(o.tokens[..=at], free.tokens[..=at], "{kind}, {p:?}");
            // One token: never; the output the free one's until its first place.
            let x = free.tokens[1];
            let first = free.tokens.iter().position(|&t| t == x).unwrap();
            let o = run(vec![vec![x], vec![a, b]]);
            assert!(!o.tokens.contains(&x), "{kind}, {p:?}: {x} in {:?}", o.tokens);
            assert!(!o.tokens.windows(2).any(|w| w == [a, b]), "{kind}, {p:?}: {a} {b} in {:?}", o.tokens);
            assert_eq!(o.tokens[..first], free.tokens[..first], "{kind}, {p:?}");
            e.shutdown();
        }
    }
}

/// Bans over a constraint that leave no token end the sequence with an error saying so, where
/// sampling an all -inf row would make up token 0: a one-token bad word that is the only allowed
/// id, and a two-token one whose last token is the only one allowed after its first.
#[test]
fn bans_that_leave_no_token_end_the_sequence_with_an_error() {
    let e = engine(None, cfg());
    let mut r = req("all-banned", prompts()[0].clone(), SamplingParams::greedy(), 8);
    r.sampling.allowed_token_ids = Some(vec![23]);
    r.sampling.bad_words = vec![vec![23]];
    let m = expect_error(e.submit(r.clone()).unwrap());
    assert!(m.contains("no token is left to sample"), "{m}");
    r.sampling.bad_words = vec![vec![23, 23]];
    let mut rx = e.submit(r).unwrap();
    let mut tokens = Vec::new();
    let m = loop {
        match rx.blocking_recv() {
            Some(RequestEvent::Delta { token_ids, .. }) => tokens.extend(token_ids),
            Some(RequestEvent::Error(m)) => break m,
            other => panic!("{other:?} instead of an error"),
        }
    };
    assert_eq!((tokens, m.contains("no token is left to sample")), (vec![23], true), "{m}");
    // The engine serves on.
    assert_eq!(collect(e.submit(req("after", prompts()[1].clone(), SamplingParams::greedy(), 4)).unwrap()).tokens.len(), 4);
    wait_idle(&e);
    e.shutdown();
}

/// A stop string may end the output only in the tokens after the first `min_tokens` (vLLM's
/// rule), even where it starts in the text before them; one that ends within them never does.
#[test]
fn a_stop_string_may_start_before_min_tokens_and_end_after() {
    let e = engine(None, cfg());
    let p = prompts()[2].clone();
    let run = |stop: &str, min_tokens: usize| {
        let mut r = req("s", p.clone(), SamplingParams::greedy(), 30);
        (r.stop.stop_strings, r.stop.min_tokens) = (vec![stop.to_owned()], min_tokens);
        collect(e.submit(r).unwrap())
    };
    let full = collect(e.submit(req("a", p.clone(), SamplingParams::greedy(), 30)).unwrap());
    // The text of each prefix of the output (as the engine streams it whole).
    let prefix = |k: usize| collect(e.submit(req("k", p.clone(), SamplingParams::greedy(), k)).unwrap()).text;
    let mut tested = 0;
    for k in 3..20 {
        let (at_k, next) = (prefix(k), prefix(k + 1));
        // Two characters of the first k tokens' text and one of token k's.
        let Some(start) = at_k.char_indices().rev().nth(1).map(|(i, _)| i) else { continue };
        let Some(end) = next[at_k.len()..].chars().next().map(|c| at_k.len() + c.len_utf8()) else { continue };
        let stop = &full.text[start..end];
        if full.text.find(stop) != Some(start) {
            continue;
        }
        // Token k (the (k + 1)-th) is the first after min_tokens = k: the match that starts
        // before it ends the output there.
        let o = run(stop, k);
        assert_eq!((o.reason, o.text.as_str(), o.tokens.len()), (Some(FinishReason::Stop), &full.text[..start], k + 1), "stop {stop:?} at min_tokens {k}");
        // Token k is among the first min_tokens = k + 1: the match ends within them, so the whole
        // output comes.
        let o = run(stop, k + 1);
        assert_eq!((o.reason, o.text.as_str()), (Some(FinishReason::Length), full.text.as_str()), "stop {stop:?} at min_tokens {}", k + 1);
        tested += 1;
    }
    assert!(tested >= 3, "only {tested} token boundaries had a stop string that occurs once: {:?}", full.text);
    wait_idle(&e);
}

/// Out of blocks, the engine preempts the running request of the lowest priority, not merely
/// the newest: a high-priority request admitted after a low-priority one keeps running and
/// finishes first, the low one resuming after it (preempted, it would be the other way round).
#[test]
fn preemption_takes_the_lowest_priority_first() {
    // One 256-token sequence fits (64 blocks of 80), the two together do not. Steps of at least
    // 2 ms: the low request's ~240 steps cannot all run before the test has submitted the high
    // one (a loaded machine could let a mock's microsecond steps do that).
    let mock = Mock { forward_time: Some(Duration::from_millis(2)), ..Mock::new(None, false) };
    let c = EngineConfig { max_num_seqs: 2, max_model_len: 256, kv_cache_memory_bytes: 100 * 80, enable_prefix_caching: false, ..cfg() };
    let e = start_engine(Box::new(mock), tokenizer(), c).unwrap();
    let mut low = req("low", prompts()[1].clone(), SamplingParams::greedy(), 240);
    low.priority = 5;
    let mut rl = e.submit(low).unwrap();
    assert!(matches!(rl.blocking_recv(), Some(RequestEvent::Delta { .. })), "low runs first");
    let mut high = req("high", prompts()[2].clone(), SamplingParams::greedy(), 150);
    high.priority = -1;
    let high = collect(e.submit(high).unwrap());
    assert_eq!(high.tokens.len(), 150);
    let mut low_finished = false;
    while let Ok(ev) = rl.try_recv() {
        low_finished |= matches!(ev, RequestEvent::Finished { .. });
    }
    assert!(!low_finished, "the low-priority request ran on while the high-priority one waited");
    assert!(counter(&e.render_metrics(), "vllm:num_preemptions_total") > 0.0, "no preemption happened");
    collect(rl);
    wait_idle(&e);
    e.shutdown();
}
