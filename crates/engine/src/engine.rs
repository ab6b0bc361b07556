//! The engine thread: request intake, scheduling, the forward step, sampling and output.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use peregrine_core::backend::{accepted_prefix, token_mask_words, Backend, DraftForward, KeptRows, KvConfig, LogitAdjust, OutputRows, RowLogprobs, RowSampling, SeqForward, SpecRows, SpecSampling, TokenMask, MAX_BACKEND_TOP_LOGPROBS};
use peregrine_core::{Error, Guide, ModelSpec, SamplingParams};
use peregrine_model::tokenizer::IncrementalDecoder;
use tokio::sync::mpsc::{unbounded_channel, UnboundedSender};

use crate::api::*;
use crate::constraint::{AllowedTokens, Constraint};
use crate::guided::{GuideCompiler, GuidedConstraint};
use crate::json_mode::{JsonConstraint, TokenBytes};
use crate::kv::{KvManager, SeqBlocks};
use crate::metrics::Metrics;
use crate::sampler::{self, SeqRng};
use crate::spec_policy::{SeqRounds, SpecPolicy, SpeculationMode};

enum Cmd {
    Submit(Box<Seq>),
    Shutdown,
}

/// Handle to the engine thread; cheap to clone.
#[derive(Clone)]
pub struct EngineHandle {
    inner: Arc<Inner>,
}

struct Inner {
    tx: Mutex<mpsc::Sender<Cmd>>,
    waiting: Arc<AtomicUsize>,
    /// Sequences submitted and not yet dropped by the engine (each holds an `Unfinished`).
    unfinished: Arc<AtomicUsize>,
    stats: Arc<Mutex<EngineStats>>,
    metrics: Arc<Metrics>,
    /// Set once when the backend can serve nothing more (`Backend::check_health` failed).
    failure: Arc<OnceLock<String>>,
    tokenizer: SharedTokenizer,
    spec: ModelSpec,
    config: EngineConfig,
    spec_block: Option<usize>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// The vocabulary's bytes for JSON mode, made on its first request (or why it cannot be).
    json_tokens: OnceLock<Result<Arc<TokenBytes>, String>>,
    /// The guide compiler over those bytes, made on the first guided request.
    guides: OnceLock<Result<Arc<GuideCompiler>, String>>,
    /// The model's EOS ids (never allowed in JSON mode, where the object's end stops the output;
    /// for a guide, only where its match may end).
    eos: Vec<u32>,
}

/// Sizes the KV pools, initialises the backend's KV memory and starts the engine thread.
pub fn start_engine(mut backend: Box<dyn Backend>, tokenizer: SharedTokenizer, config: EngineConfig) -> Result<EngineHandle, Error> {
    let spec = backend.spec().clone();
    let bs = config.block_size;
    if bs == 0 || config.max_num_seqs == 0 || config.max_num_batched_tokens == 0 || config.max_model_len == 0 {
        return Err(Error::config("engine", "block_size, max_num_seqs, max_num_batched_tokens and max_model_len must be > 0"));
    }
    let spec_block = match (backend.draft_spec(), config.speculative_block_size) {
        (None, _) => None,
        (Some(d), None) => Some(d.block_size),
        (Some(_), Some(b)) if (2..=16).contains(&b) => Some(b),
        (Some(_), Some(b)) => return Err(Error::config("speculative_block_size", format!("{b} is outside 2..=16"))),
    };
    if let Some(dtype) = config.kv_cache_dtype {
        backend.set_kv_dtype(dtype).map_err(|e| Error::config("kv_cache_dtype", e.to_string()))?;
    }
    let window = spec.layers.iter().filter_map(|l| l.attention.window()).max();
    let bytes = backend.kv_block_bytes(bs);
    // Each running sequence may look ahead `block - 1` positions past its window.
    let lookahead = spec_block.map_or(0, |b| b.div_ceil(bs));
    let num_swa = match window {
        Some(w) if bytes.swa > 0 => config.max_num_seqs * (w / bs + 2 + lookahead) + config.max_num_batched_tokens.div_ceil(bs) + 1,
        _ => 0,
    };
    let swa_bytes = num_swa * bytes.swa;
    let need_full = config.max_model_len.div_ceil(bs);
    let (kv_memory, field) = match config.gpu_memory_utilization {
        Some(u) => {
            let sized = crate::kv_sizing::kv_bytes_for_utilization(backend.as_mut(), &config, u, bytes, num_swa, spec_block)?;
            tracing::info!(utilization = u, device_bytes = sized.total, in_use_bytes = sized.in_use, kv_bytes = sized.kv_bytes, "KV cache sized to the device's memory after a profiling step");
            (sized.kv_bytes, "gpu_memory_utilization")
        }
        None => (config.kv_cache_memory_bytes, "kv_cache_memory_bytes"),
    };
    // A backend without full-attention layers still gets block tables (of no memory).
    let num_full = kv_memory.saturating_sub(swa_bytes).checked_div(bytes.full).unwrap_or(need_full * config.max_num_seqs);
    if num_full < need_full {
        let least = swa_bytes + need_full * bytes.full;
        return Err(Error::config(
            field,
            format!(
                "{kv_memory} bytes for the KV cache hold {num_full} full-attention blocks after {num_swa} sliding-window blocks ({swa_bytes} bytes, for max_num_seqs {}); one sequence of max_model_len {} needs {need_full} blocks of {} bytes: give the cache at least {least} bytes ({} MiB), or lower max_num_seqs or max_model_len",
                config.max_num_seqs,
                config.max_model_len,
                bytes.full,
                least.div_ceil(1 << 20)
            ),
        ));
    }
    backend.init_kv(KvConfig { block_size: bs, num_full_blocks: num_full, num_swa_blocks: num_swa })?;
    tracing::info!(
        backend = backend.name(),
        full_blocks = num_full,
        swa_blocks = num_swa,
        full_bytes = num_full * bytes.full,
        swa_bytes,
        block_size = bs,
        kv_dtype = backend.kv_dtype().name(),
        speculative_block = spec_block,
        "KV cache allocated"
    );
    let metrics = Arc::new(Metrics::new(config.model_name.as_deref().unwrap_or(&spec.model_type), config.max_model_len));
    metrics.record_cache_config(bs, backend.kv_dtype().name(), num_full, config.enable_prefix_caching);
    let kv = KvManager::new(num_full, num_swa, bs, window, config.enable_prefix_caching);
    let (tx, rx) = mpsc::channel();
    let waiting = Arc::new(AtomicUsize::new(0));
    let stats = Arc::new(Mutex::new(EngineStats { total_full_blocks: num_full, free_full_blocks: num_full, ..Default::default() }));
    let failure = Arc::new(OnceLock::new());
    let tokenizer_eos = tokenizer.eos_token_ids();
    let mut eos = spec.eos_token_ids.clone();
    eos.extend(&tokenizer_eos);
    let handle_eos = eos.clone();
    let core = Core {
        backend,
        kv,
        config: config.clone(),
        waiting: VecDeque::new(),
        running: Vec::new(),
        waiting_count: waiting.clone(),
        stats: stats.clone(),
        metrics: metrics.clone(),
        failure: failure.clone(),
        eos,
        tokenizer_eos,
        next_id: 0,
        spec_block,
        policy: SpecPolicy::new(config.speculation, spec_block.unwrap_or(1)),
        spec_now: true,
        spec_decided: None,
        last_commit: None,
        in_flight: None,
    };
    let thread = std::thread::Builder::new()
        .name("peregrine-engine".into())
        .spawn(move || core.run(rx))
        .map_err(|e| Error::Backend(format!("cannot spawn the engine thread: {e}")))?;
    Ok(EngineHandle {
        inner: Arc::new(Inner {
            tx: Mutex::new(tx),
            waiting,
            unfinished: Arc::new(AtomicUsize::new(0)),
            stats,
            metrics,
            failure,
            tokenizer,
            spec,
            config,
            spec_block,
            thread: Mutex::new(Some(thread)),
            json_tokens: OnceLock::new(),
            guides: OnceLock::new(),
            eos: handle_eos,
        }),
    })
}

impl EngineHandle {
    /// The request's output constraint (JSON mode, or its guide), or why it cannot have one.
    fn constraint(&self, req: &GenerateRequest) -> Result<Option<Constraint>, String> {
        let guide = req.sampling.guide.as_ref();
        if let Some(ids) = &req.sampling.allowed_token_ids {
            if req.sampling.json_object || guide.is_some() {
                return Err("allowed_token_ids cannot be combined with JSON mode or a guide".into());
            }
            return Ok(Some(Constraint::Allowed(AllowedTokens::new(ids))));
        }
        if !req.sampling.json_object && guide.is_none() {
            return Ok(None);
        }
        let tokens = self.inner.json_tokens.get_or_init(|| TokenBytes::from_tokenizer(&self.inner.tokenizer).map(Arc::new)).clone()?;
        // A prompt that leaves a `<think>` block open (a thinking mode's template) gets its
        // thinking first, the constrained output after `</think>`.
        let thinking = tokens.ends_in_open_think(&req.prompt_tokens);
        let eos = self.inner.eos.clone();
        Ok(Some(match guide {
            Some(guide) => {
                let compiler = self.inner.guides.get_or_init(|| GuideCompiler::new(tokens).map(Arc::new)).clone()?;
                let matcher = compiler.compile(guide)?;
                Constraint::Guided(Box::new(GuidedConstraint::new(&compiler, matcher, eos, thinking, matches!(guide, Guide::JsonSchema(_)))?))
            }
            None if thinking => Constraint::Json(JsonConstraint::after_thinking(tokens, eos)),
            None => Constraint::Json(JsonConstraint::new(tokens, eos)),
        }))
    }

    pub fn submit(&self, req: GenerateRequest) -> Result<RequestStream, SubmitError> {
        self.submit_group(vec![req]).map(|mut rx| rx.remove(0))
    }

    /// Submits the sequences of one request (its prompts times `n`) as a whole: all are queued
    /// or none is. A group larger than the whole queue (`max_waiting`) can never be, so it is
    /// refused as invalid rather than as full (a 429 would be retried forever), and a full
    /// queue refuses the group before any sequence enters it (none is queued, then aborted).
    pub fn submit_group(&self, reqs: Vec<GenerateRequest>) -> Result<Vec<RequestStream>, SubmitError> {
        if let Some(why) = self.inner.failure.get() {
            return Err(SubmitError::BackendFailed(why.clone()));
        }
        let cfg = &self.inner.config;
        let vocab = self.inner.spec.vocab_size as u32;
        for req in &reqs {
            if req.prompt_tokens.is_empty() {
                return Err(SubmitError::Invalid("the prompt is empty".into()));
            }
            if req.prompt_tokens.len() >= cfg.max_model_len {
                return Err(SubmitError::Invalid(format!(
                    "the prompt has {} tokens; this model's context is {} tokens (prompt + output)",
                    req.prompt_tokens.len(),
                    cfg.max_model_len
                )));
            }
            if let Some(t) = req.prompt_tokens.iter().find(|&&t| t >= vocab) {
                return Err(SubmitError::Invalid(format!("prompt token id {t} is outside the vocabulary ({vocab})")));
            }
        }
        let k = reqs.len();
        if k > cfg.max_waiting {
            return Err(SubmitError::Invalid(format!(
                "this request asks for {k} sequences (prompts x n), more than the server queues at once ({}, --max-waiting): lower `n` or send fewer prompts",
                cfg.max_waiting
            )));
        }
        if self.inner.waiting.fetch_add(k, Ordering::SeqCst) + k > cfg.max_waiting {
            self.inner.waiting.fetch_sub(k, Ordering::SeqCst);
            return Err(SubmitError::QueueFull);
        }
        let mut seqs = Vec::with_capacity(k);
        let mut rxs = Vec::with_capacity(k);
        for req in reqs {
            let constraint = match self.constraint(&req) {
                Ok(c) => c,
                Err(why) => {
                    self.inner.waiting.fetch_sub(k, Ordering::SeqCst);
                    return Err(SubmitError::Constraint(why));
                }
            };
            let (tx, rx) = unbounded_channel();
            let unfinished = Unfinished::count(&self.inner.unfinished);
            seqs.push(Seq::new(req, tx, self.inner.tokenizer.clone(), constraint, &self.inner.eos, unfinished));
            rxs.push(rx);
        }
        let tx = self.inner.tx.lock().unwrap();
        for (i, seq) in seqs.into_iter().enumerate() {
            // Only a stopped engine refuses a command, so the first send fails or none does.
            if tx.send(Cmd::Submit(Box::new(seq))).is_err() {
                self.inner.waiting.fetch_sub(k - i, Ordering::SeqCst);
                return Err(SubmitError::ShuttingDown);
            }
        }
        Ok(rxs)
    }

    pub fn stats(&self) -> EngineStats {
        *self.inner.stats.lock().unwrap()
    }
    /// Sequences submitted whose engine work is not over (waiting, running, or being finished):
    /// zero once every accepted request has had its last event sent. A draining server waits
    /// for it.
    pub fn unfinished(&self) -> usize {
        self.inner.unfinished.load(Ordering::SeqCst)
    }
    /// Why the engine has failed, once the backend reported that it can serve nothing more
    /// (`Backend::check_health` after a failed step): every request then failed and every later
    /// submit is refused with `SubmitError::BackendFailed`. None while the engine serves.
    pub fn failure(&self) -> Option<String> {
        self.inner.failure.get().cloned()
    }
    pub fn registry(&self) -> &prometheus::Registry {
        &self.inner.metrics.registry
    }
    pub fn render_metrics(&self) -> String {
        self.inner.metrics.render()
    }
    /// Aborts every request (each gets `Finished{Abort}`) and waits for the engine thread.
    pub fn shutdown(&self) {
        let _ = self.inner.tx.lock().unwrap().send(Cmd::Shutdown);
        if let Some(t) = self.inner.thread.lock().unwrap().take() {
            let _ = t.join();
        }
    }
    pub fn tokenizer(&self) -> &SharedTokenizer {
        &self.inner.tokenizer
    }
    pub fn spec(&self) -> &ModelSpec {
        &self.inner.spec
    }
    pub fn max_model_len(&self) -> usize {
        self.inner.config.max_model_len
    }
    /// The speculative block size when a drafter is attached (speculation is on).
    pub fn speculative_block_size(&self) -> Option<usize> {
        self.inner.spec_block
    }
}

/// One request's state inside the engine.
struct Seq {
    id: u64,
    req: GenerateRequest,
    tx: UnboundedSender<RequestEvent>,
    output: Vec<u32>,
    /// All tokens (prompt + output) whose K/V are written.
    computed: usize,
    blocks: SeqBlocks,
    decoder: IncrementalDecoder,
    /// Decoded text not yet sent: it could be the start of a stop string.
    held: String,
    rng: SeqRng,
    cached_tokens: usize,
    /// Speculation: drafts accepted into the output, and drafts proposed.
    spec_accepted: usize,
    spec_drafted: usize,
    /// Its verify rounds, for its expected tokens per round (`SpecPolicy::expected`).
    spec_rounds: SeqRounds,
    prompt_lp: Vec<Option<PromptLogprob>>,
    prompt_lp_done: bool,
    first_scheduled: Option<Instant>,
    first_token: Option<Instant>,
    last_token: Option<Instant>,
    finish_reason: Option<FinishReason>,
    /// The stop id or string that ended the output, once one has.
    stop_reason: Option<StopReason>,
    /// JSON mode's automaton or the guide's matcher over the output (sampled on the host,
    /// never speculated).
    constraint: Option<Constraint>,
    /// The tokens that would end the output (stop ids, and EOS unless ignored), banned from
    /// sampling before `min_tokens` (as vLLM bans them): empty without `min_tokens`.
    min_ban: Vec<u32>,
    /// Counts the sequence in `EngineHandle::unfinished` until it is dropped, whichever way it
    /// leaves the engine (finished, aborted, refused, failed).
    _unfinished: Unfinished,
}

/// One count in a shared number of unfinished sequences, given back on drop.
struct Unfinished(Arc<AtomicUsize>);

impl Unfinished {
    fn count(n: &Arc<AtomicUsize>) -> Self {
        n.fetch_add(1, Ordering::SeqCst);
        Unfinished(n.clone())
    }
}

impl Drop for Unfinished {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Seq {
    fn new(req: GenerateRequest, tx: UnboundedSender<RequestEvent>, tok: SharedTokenizer, constraint: Option<Constraint>, eos: &[u32], unfinished: Unfinished) -> Self {
        let seed = req.sampling.seed.unwrap_or_else(|| sampler::fnv1a(req.request_id.as_bytes()));
        let mut min_ban = Vec::new();
        if req.stop.min_tokens > 0 {
            min_ban.extend(&req.stop.stop_token_ids);
            if !req.stop.ignore_eos {
                min_ban.extend(eos);
            }
            min_ban.sort_unstable();
            min_ban.dedup();
        }
        let decoder = IncrementalDecoder::new(tok, &req.prompt_tokens, req.stop.skip_special_tokens);
        Seq {
            id: 0,
            tx,
            output: Vec::new(),
            computed: 0,
            blocks: SeqBlocks::salted(req.cache_salt.as_deref()),
            decoder,
            held: String::new(),
            rng: SeqRng::new(seed),
            cached_tokens: 0,
            spec_accepted: 0,
            spec_drafted: 0,
            spec_rounds: SeqRounds::default(),
            prompt_lp: Vec::new(),
            prompt_lp_done: req.prompt_logprobs.is_none(),
            first_scheduled: None,
            first_token: None,
            last_token: None,
            finish_reason: None,
            stop_reason: None,
            constraint,
            min_ban,
            _unfinished: unfinished,
            req,
        }
    }

    /// The tokens banned from output position `n` (`min_ban` before `min_tokens`).
    fn banned_at(&self, n: usize) -> &[u32] {
        if n < self.req.stop.min_tokens {
            &self.min_ban
        } else {
            &[]
        }
    }

    /// Whether sampling this sequence's next token reads anything but its raw logits (bias,
    /// penalties, min_tokens' ban): a greedy row is then not the plain argmax.
    fn adjusts(&self) -> bool {
        !no_adjustments(&self.req.sampling) || !self.banned_at(self.output.len()).is_empty()
    }
    fn len(&self) -> usize {
        self.req.prompt_tokens.len() + self.output.len()
    }
    fn tokens(&self) -> Vec<u32> {
        let mut t = self.req.prompt_tokens.clone();
        t.extend(&self.output);
        t
    }
    fn token_at(&self, i: usize) -> u32 {
        let p = self.req.prompt_tokens.len();
        if i < p { self.req.prompt_tokens[i] } else { self.output[i - p] }
    }
}

struct Core {
    backend: Box<dyn Backend>,
    kv: KvManager,
    config: EngineConfig,
    waiting: VecDeque<Seq>,
    running: Vec<Seq>,
    waiting_count: Arc<AtomicUsize>,
    stats: Arc<Mutex<EngineStats>>,
    metrics: Arc<Metrics>,
    failure: Arc<OnceLock<String>>,
    eos: Vec<u32>,
    /// The tokenizer's own EOS: the one end that names no stop reason (vLLM reports the
    /// model's other EOS ids, which it treats as stop ids).
    tokenizer_eos: Vec<u32>,
    next_id: u64,
    spec_block: Option<usize>,
    /// When to speculate (`EngineConfig::speculation`), this step's choice, and a choice to
    /// speculate that ended a chain of overlapped plain steps (the next step takes it).
    policy: SpecPolicy,
    spec_now: bool,
    spec_decided: Option<bool>,
    /// When the last step was committed: an overlapped step, started before it, is timed from
    /// there (the interval between commits), so the policy compares throughputs.
    last_commit: Option<Instant>,
    /// A decode step the backend started (`Backend::enqueue_decode`) and nobody collected yet.
    in_flight: Option<InFlight>,
}

/// A started, uncollected decode step: one row per planned sequence, in plan order.
struct InFlight {
    t0: Instant,
    plan: Vec<(u64, usize, usize)>,
    /// Constrained sequences no token could continue at this step (their masks were empty):
    /// they end with their constraint's error when it is collected.
    stuck: Vec<u64>,
}

/// The step after an in-flight one, planned before its tokens are known.
struct Chained {
    plan: Vec<(u64, usize, usize)>,
    batch: Vec<SeqForward>,
    chain: Vec<Option<usize>>,
    /// None: every row takes its argmax.
    sampling: Option<(Vec<RowSampling>, Vec<LogitAdjust>)>,
    /// Some row's sampling reads the token ahead (a constraint's mask, penalties): the step is
    /// sampled once the step ahead of it is committed (`Backend::enqueue_decode_deferred`).
    deferred: bool,
}

impl Core {
    fn run(mut self, rx: mpsc::Receiver<Cmd>) {
        loop {
            // Block only when idle.
            let first = if self.running.is_empty() && self.waiting.is_empty() {
                match rx.recv() {
                    Ok(c) => Some(c),
                    Err(_) => return,
                }
            } else {
                None
            };
            let mut shutdown = false;
            for cmd in first.into_iter().chain(std::iter::from_fn(|| rx.try_recv().ok())) {
                match cmd {
                    Cmd::Submit(s) if self.failure.get().is_some() => {
                        // Submitted before the failure was visible to the handle.
                        self.waiting_count.fetch_sub(1, Ordering::SeqCst);
                        let _ = s.tx.send(RequestEvent::Error(self.failure.get().cloned().unwrap_or_default()));
                    }
                    Cmd::Submit(mut s) => {
                        s.id = self.next_id;
                        self.next_id += 1;
                        let pos = self.waiting.iter().position(|w| w.req.priority > s.req.priority).unwrap_or(self.waiting.len());
                        self.waiting.insert(pos, *s);
                    }
                    Cmd::Shutdown => shutdown = true,
                }
            }
            if shutdown {
                if self.in_flight.take().is_some() {
                    let _ = self.backend.collect_decode();
                }
                for mut s in self.running.drain(..).chain(self.waiting.drain(..)).collect::<Vec<_>>() {
                    self.finish(&mut s, FinishReason::Abort);
                }
                self.waiting_count.store(0, Ordering::SeqCst);
                self.publish();
                return;
            }
            // A panic inside a step (a bug, never user data by design) fails the engine as a
            // lost backend does: every request gets an error, /health and later submits say
            // why, instead of the thread dying with its requests' streams cut and the server
            // still answering 200 on /health.
            if let Err(p) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.step())) {
                let what = p.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| p.downcast_ref::<String>().cloned()).unwrap_or_default();
                let why = format!("the engine panicked ({what}); restart the server");
                if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.fail_engine(why.clone()))).is_err() {
                    let _ = self.failure.set(why);
                    self.metrics.backend_failed.set(1);
                    return;
                }
            }
            self.publish();
        }
    }

    fn publish(&self) {
        let st = EngineStats {
            running: self.running.len(),
            waiting: self.waiting.len(),
            kv_usage: self.kv.usage(),
            total_full_blocks: self.kv.total_full(),
            free_full_blocks: self.kv.free_full(),
        };
        *self.stats.lock().unwrap() = st;
        self.metrics.running.set(st.running as i64);
        self.metrics.waiting.set(st.waiting as i64);
        self.metrics.kv_usage.set(st.kv_usage);
    }

    /// Sends the final events, frees the blocks and records metrics.
    fn finish(&mut self, s: &mut Seq, reason: FinishReason) {
        if reason != FinishReason::Abort {
            let mut text = std::mem::take(&mut s.held);
            if reason == FinishReason::Length {
                text.push_str(&s.decoder.flush());
            }
            if !text.is_empty() {
                let _ = s.tx.send(RequestEvent::Delta { text, token_ids: vec![], logprobs: vec![] });
            }
        }
        self.kv.free(&mut s.blocks);
        let usage = Usage {
            prompt_tokens: s.req.prompt_tokens.len(),
            completion_tokens: s.output.len(),
            cached_tokens: s.cached_tokens,
            accepted_prediction_tokens: s.spec_accepted,
            rejected_prediction_tokens: s.spec_drafted - s.spec_accepted,
        };
        // Measured before the client hears of the end, so /metrics read after a response
        // counts it.
        self.metrics.success.with_label_values(&[reason.as_str()]).inc();
        let now = Instant::now();
        self.metrics.e2e.observe((now - s.req.arrival).as_secs_f64());
        self.metrics.request_prompt_tokens.observe(s.req.prompt_tokens.len() as f64);
        self.metrics.request_generation_tokens.observe(s.output.len() as f64);
        if let Some(t) = s.first_scheduled {
            self.metrics.inference_time.observe((now - t).as_secs_f64());
        }
        if let Some(t) = s.first_token {
            self.metrics.decode_time.observe((now - t).as_secs_f64());
        }
        let stop_reason = if reason == FinishReason::Stop { s.stop_reason.take() } else { None };
        let _ = s.tx.send(RequestEvent::Finished { reason, usage, stop_reason });
    }

    /// The backend can serve nothing more: remembers why (the handle then refuses submits),
    /// fails every running and waiting request with that message and frees their blocks.
    fn fail_engine(&mut self, why: String) {
        tracing::error!("the backend cannot serve any more, failing every request: {why}");
        let _ = self.failure.set(why.clone());
        self.metrics.backend_failed.set(1);
        self.waiting_count.fetch_sub(self.waiting.len(), Ordering::SeqCst);
        for mut s in self.running.drain(..).chain(self.waiting.drain(..)).collect::<Vec<_>>() {
            self.kv.free(&mut s.blocks);
            let _ = s.tx.send(RequestEvent::Error(why.clone()));
        }
    }

    fn drop_gone_clients(&mut self) {
        let mut i = 0;
        while i < self.waiting.len() {
            if self.waiting[i].tx.is_closed() {
                let mut s = self.waiting.remove(i).unwrap();
                self.waiting_count.fetch_sub(1, Ordering::SeqCst);
                self.finish(&mut s, FinishReason::Abort);
            } else {
                i += 1;
            }
        }
        let mut i = 0;
        while i < self.running.len() {
            if self.running[i].tx.is_closed() {
                let mut s = self.running.remove(i);
                self.finish(&mut s, FinishReason::Abort);
            } else {
                i += 1;
            }
        }
    }

    /// Preempts the running sequence of the lowest priority (the largest `priority`), the
    /// newest among those, as vLLM's priority policy does (with one priority: the newest, as
    /// its FCFS policy): its blocks are freed and it waits, ahead of the waiting requests of
    /// its priority (it came before them), to be computed again. Returns its id. Called only
    /// with a sequence running.
    fn preempt_one(&mut self) -> u64 {
        let i = (0..self.running.len()).max_by_key(|&i| (self.running[i].req.priority, self.running[i].id)).expect("a running sequence");
        let mut s = self.running.remove(i);
        self.kv.free(&mut s.blocks);
        s.computed = 0;
        s.prompt_lp.clear();
        self.metrics.preemptions.inc();
        let id = s.id;
        let at = self.waiting.iter().position(|w| w.req.priority >= s.req.priority).unwrap_or(self.waiting.len());
        self.waiting.insert(at, s);
        self.waiting_count.fetch_add(1, Ordering::SeqCst);
        id
    }

    /// Drafts a decoding sequence verifies this step: none when the policy decodes plainly,
    /// else `drafts_possible`.
    fn drafts_wanted(&self, s: &Seq) -> usize {
        if self.spec_now { self.drafts_possible(s) } else { 0 }
    }

    /// Drafts a decoding sequence may verify: `block - 1`, fewer near its max_tokens or the
    /// context limit (the reference's `min(block, max_length - start)`).
    fn drafts_possible(&self, s: &Seq) -> usize {
        let Some(block) = self.spec_block else { return 0 };
        if s.len() - s.computed != 1 || !s.prompt_lp_done || s.constraint.is_some() || self.seeded_decodes_plainly(s) {
            return 0;
        }
        let left = s.req.stop.max_tokens.saturating_sub(s.output.len());
        let room = self.config.max_model_len.saturating_sub(s.len());
        (block - 1).min(left).min(room)
    }

    /// A seeded sampling request under the adaptive policy on a backend whose verify rows round
    /// apart from decode rows: it never drafts. Which steps draft follows their timing there, and
    /// a sample near a boundary of its CDF would follow it too; decoded plainly, its text repeats
    /// (as without a drafter, or under `always`, whose mix of steps is fixed). At a temperature
    /// above 0 a round rarely pays anyway (a code drafter's ~1.7 tokens a round at T 0.7).
    fn seeded_decodes_plainly(&self, s: &Seq) -> bool {
        let p = &s.req.sampling;
        self.config.speculation == SpeculationMode::Adaptive && p.seed.is_some() && !p.is_greedy() && !self.backend.rows_compute_alike()
    }

    /// Whether this step's decoding sequences draft (`SpecPolicy::speculate` over the ones
    /// running now, each expected to commit its own tokens per round, capped by its drafts).
    fn choose_speculation(&mut self) -> bool {
        let (mut rows, mut tokens, mut any) = (0, 0.0, false);
        for s in self.running.iter().filter(|s| s.len() - s.computed == 1) {
            let k = self.drafts_possible(s);
            rows += 1;
            tokens += if k == 0 { 1.0 } else { self.policy.expected(&s.spec_rounds).min(k as f64 + 1.0) };
            any |= k > 0;
        }
        // No sequence can draft (constrained ones, or each at its last token): a plain step,
        // which may overlap (not counted as a plain step the policy chose).
        if !any {
            return false;
        }
        let speculate = self.policy.speculate(rows, tokens);
        if !speculate {
            self.metrics.spec_plain_steps.inc();
        }
        speculate
    }

    fn step(&mut self) {
        if let Some(prev) = self.in_flight.take() {
            return self.step_overlapped(prev);
        }
        let t0 = Instant::now();
        self.drop_gone_clients();
        self.spec_now = match self.spec_decided.take() {
            Some(d) => d,
            None => self.spec_block.is_some() && self.choose_speculation(),
        };
        let mut budget = self.config.max_num_batched_tokens;
        // (sequence id, tokens to compute, drafts to verify); decodes first, then prefill chunks.
        let mut plan: Vec<(u64, usize, usize)> = Vec::new();
        let mut preempted = false;
        let mut order: Vec<u64> = self.running.iter().filter(|s| s.len() - s.computed == 1).map(|s| s.id).collect();
        order.extend(self.running.iter().filter(|s| s.len() - s.computed > 1).map(|s| s.id));
        for id in order {
            if budget == 0 {
                break;
            }
            while let Some(i) = self.running.iter().position(|s| s.id == id) {
                let k = self.drafts_wanted(&self.running[i]).min(budget - 1);
                let s = &mut self.running[i];
                let chunk = (s.len() - s.computed).min(budget);
                // A verify step writes K/V for its drafts too; without room for them, decode plainly.
                let k = if k > 0 && self.kv.allocate(&mut s.blocks, s.computed, s.computed + chunk + k) { k } else { 0 };
                if k > 0 || self.kv.allocate(&mut s.blocks, s.computed, s.computed + chunk) {
                    plan.push((id, chunk, k));
                    budget -= chunk + k;
                    break;
                }
                preempted = true;
                let victim = self.preempt_one();
                // Give back the budget of a chunk already planned for it.
                if let Some(k) = plan.iter().position(|p| p.0 == victim) {
                    let (_, c, d) = plan.remove(k);
                    budget += c + d;
                }
                if victim == id {
                    break;
                }
            }
        }
        // Admit new sequences while blocks, slots and budget allow.
        while !preempted && budget > 0 && self.running.len() < self.config.max_num_seqs {
            let Some(mut s) = self.waiting.pop_front() else { break };
            if s.computed == 0 && s.blocks.full.is_empty() && s.prompt_lp_done {
                let toks = s.tokens();
                let hit = self.kv.match_prefix(&mut s.blocks, &toks);
                s.computed = hit;
                if s.first_scheduled.is_none() {
                    s.cached_tokens = hit;
                }
            }
            let chunk = (s.len() - s.computed).min(budget);
            if !self.kv.allocate(&mut s.blocks, s.computed, s.computed + chunk) {
                self.kv.free(&mut s.blocks);
                s.computed = 0;
                self.waiting.push_front(s);
                break;
            }
            self.waiting_count.fetch_sub(1, Ordering::SeqCst);
            if s.first_scheduled.is_none() {
                s.first_scheduled = Some(Instant::now());
                self.metrics.queue_time.observe(s.req.arrival.elapsed().as_secs_f64());
            }
            plan.push((s.id, chunk, 0));
            budget -= chunk;
            self.running.push(s);
        }
        self.metrics.prefix_queries.inc_by(self.kv.queries);
        self.metrics.prefix_hits.inc_by(self.kv.hits);
        self.kv.queries = 0;
        self.kv.hits = 0;
        if plan.is_empty() {
            return;
        }
        // Speculation in one backend call (draft, verify, accept) when it applies, else two.
        let fused = self.speculate_fused(&plan);
        let drafts = match &fused {
            Some(f) => f.iter().map(|r| r.drafts.clone()).collect(),
            None => self.draft(&plan),
        };
        let mut batch = Vec::with_capacity(plan.len());
        for (&(id, chunk, _), d) in plan.iter().zip(&drafts) {
            let s = self.running.iter().find(|s| s.id == id).unwrap();
            let end = s.computed + chunk;
            let output = if !s.prompt_lp_done || !d.is_empty() {
                OutputRows::All
            } else if end == s.len() {
                OutputRows::Last
            } else {
                OutputRows::None
            };
            let mut tokens: Vec<u32> = (s.computed..end).map(|i| s.token_at(i)).collect();
            tokens.extend(d);
            batch.push(SeqForward {
                seq_id: id,
                tokens,
                start_pos: s.computed,
                full_blocks: s.blocks.full.clone(),
                swa_blocks: s.blocks.swa.clone(),
                output,
            });
        }
        let ntok: usize = batch.iter().map(|b| b.tokens.len()).sum();
        // When nothing but the sampled token is read from any row, ask for ids only (a GPU
        // backend then keeps the logits on the device): the argmax when every sequence is
        // greedy, else a draw on the backend with each row's parameters and uniform number.
        let seqs: Vec<&Seq> = plan.iter().filter_map(|&(id, _, _)| self.running.iter().find(|s| s.id == id)).collect();
        let greedy = seqs.len() == plan.len() && seqs.iter().all(|s| s.req.sampling.is_greedy() && !s.adjusts() && sampled_ids_suffice(s));
        let sampled = seqs.len() == plan.len() && seqs.iter().all(|s| sampled_ids_suffice(s));
        // Logprobs (past the prompt's) are computed on the backend too when it can.
        let with_logprobs = !sampled
            && seqs.len() == plan.len()
            && seqs.iter().all(|s| s.prompt_lp_done && s.constraint.is_none() && s.req.sampling.logprobs.is_none_or(|k| k <= MAX_BACKEND_TOP_LOGPROBS));
        let vocab = self.backend.spec().vocab_size;
        if with_logprobs {
            let (rows, adjust) = row_sampling(&seqs, &batch, vocab, 0);
            let top: Vec<Option<u32>> = seqs.iter().zip(&batch).flat_map(|(s, b)| std::iter::repeat_n(s.req.sampling.logprobs.map(|k| k as u32), output_row_count(b))).collect();
            match self.backend.forward_sampled_logprobs(&batch, &rows, &adjust, &top) {
                Ok(None) => {}
                other => {
                    let rows = other.map(|o| o.unwrap_or_default().into_iter().map(StepRows::IdsLp).collect());
                    return self.finish_step(t0, plan, drafts, rows, ntok);
                }
            }
        }
        let constrained = seqs.iter().filter(|s| s.constraint.is_some()).count();
        // Constrained sequences sampled on the backend under their masks, built here while the
        // device computes the step; a sequence no token can continue ends as on the host path.
        if fused.is_none() && seqs.len() == plan.len() && constrained > 0 && seqs.iter().all(|s| s.prompt_lp_done && s.req.sampling.logprobs.is_none()) {
            let (rows, adjust) = row_sampling(&seqs, &batch, vocab, 0);
            // A decode step is started, then masked, and not waited for: the steps after it
            // chain on it (`plan_chained`), each masked once the one ahead is committed.
            if self.overlap_allowed() && drafts.iter().all(Vec::is_empty) && batch.iter().all(|b| b.tokens.len() == 1 && b.output == OutputRows::Last) {
                let chain = vec![None; batch.len()];
                match self.backend.enqueue_decode_deferred(&batch, &chain) {
                    Ok(true) => {
                        let mut stuck = vec![false; seqs.len()];
                        let masks = constraint_masks(&seqs, &batch, vocab, &mut stuck);
                        let stuck = seqs.iter().zip(stuck).filter(|(_, st)| *st).map(|(s, _)| s.id).collect();
                        match self.backend.sample_enqueued(&rows, &adjust, masks) {
                            Ok(()) => self.in_flight = Some(InFlight { t0, plan, stuck }),
                            Err(e) => self.finish_step(t0, plan, drafts, Err(e), ntok),
                        }
                        return;
                    }
                    Ok(false) => {}
                    Err(e) => return self.finish_step(t0, plan, drafts, Err(e), ntok),
                }
            }
            let stuck = std::cell::RefCell::new(vec![false; seqs.len()]);
            let masks = || constraint_masks(&seqs, &batch, vocab, &mut stuck.borrow_mut());
            match self.backend.forward_sampled_masked(&batch, &rows, &adjust, &masks) {
                Ok(None) => {}
                other => {
                    let stuck = stuck.into_inner();
                    let rows = other.map(|o| {
                        o.unwrap_or_default()
                            .into_iter()
                            .zip(seqs.iter().zip(&stuck))
                            .map(|(ids, (s, &stuck))| match (stuck, &s.constraint) {
                                (true, Some(c)) => StepRows::Stuck(stuck_reason(c, vocab)),
                                _ => StepRows::Ids(ids),
                            })
                            .collect()
                    });
                    return self.finish_step(t0, plan, drafts, rows, ntok);
                }
            }
        }
        // Else constrained sequences beside others: only theirs come back as logits (sampled
        // here, under the constraint), the others sampled on the backend as they would be alone.
        if fused.is_none() && seqs.len() == plan.len() && constrained > 0 && constrained < seqs.len() && seqs.iter().all(|s| s.prompt_lp_done && s.req.sampling.logprobs.is_none()) {
            let (rows, adjust) = row_sampling(&seqs, &batch, vocab, 0);
            let keep: Vec<bool> = seqs.iter().map(|s| s.constraint.is_some()).collect();
            match self.backend.forward_sampled_keeping(&batch, &rows, &adjust, &keep) {
                Ok(None) => {}
                other => {
                    let rows = other.map(|o| {
                        o.unwrap_or_default()
                            .into_iter()
                            .map(|k| match k {
                                KeptRows::Ids(ids) => StepRows::Ids(ids),
                                KeptRows::Logits(l) => StepRows::Logits(l),
                            })
                            .collect()
                    });
                    return self.finish_step(t0, plan, drafts, rows, ntok);
                }
            }
        }
        // Rows sampled on the backend (every row reads only its sampled id, not all greedy).
        let sampling = (sampled && !greedy && fused.is_none()).then(|| row_sampling(&seqs, &batch, vocab, 0));
        if fused.is_none() && (greedy || sampled) && self.overlap_allowed() && drafts.iter().all(Vec::is_empty) && batch.iter().all(|b| b.tokens.len() == 1 && b.output == OutputRows::Last) {
            // Started, not waited for: the next step() chains the step after it, then commits it.
            let chain = vec![None; batch.len()];
            match self.backend.enqueue_decode(&batch, &chain, sampling.as_ref().map(|(r, a)| (&r[..], &a[..]))) {
                Ok(true) => {
                    self.in_flight = Some(InFlight { t0, plan, stuck: Vec::new() });
                    return;
                }
                Ok(false) => {}
                Err(e) => return self.finish_step(t0, plan, drafts, Err(e), ntok),
            }
        }
        let ids = if let Some(f) = fused {
            Ok(Some(f.into_iter().map(|r| r.ids).collect()))
        } else if greedy {
            self.backend.forward_greedy(&batch)
        } else if let Some((rows, adjust)) = &sampling {
            self.backend.forward_sampled(&batch, rows, adjust)
        } else {
            Ok(None)
        };
        let result = match ids {
            Ok(Some(ids)) => Ok(ids.into_iter().map(StepRows::Ids).collect()),
            Ok(None) => self.backend.forward(&batch).map(|l| l.into_iter().map(StepRows::Logits).collect::<Vec<_>>()),
            Err(e) => Err(e),
        };
        self.finish_step(t0, plan, drafts, result, ntok);
    }

    /// Whether steps may overlap at all: configured, and no drafting this step (speculative
    /// steps have a round trip of their own).
    fn overlap_allowed(&self) -> bool {
        self.config.overlap_steps && (self.spec_block.is_none() || !self.spec_now)
    }

    /// With `prev` in flight: starts the step after it when that can be planned without prev's
    /// tokens (`plan_chained`), then commits prev. Otherwise commits prev alone, and the next
    /// step() plans from scratch (admitting, preempting, prefilling).
    fn step_overlapped(&mut self, prev: InFlight) {
        let t0 = Instant::now();
        self.drop_gone_clients();
        let mut next = None;
        let mut failed = None;
        let mut deferred = false;
        if let Some(c) = self.plan_chained(&prev) {
            let started = match c.deferred {
                true => self.backend.enqueue_decode_deferred(&c.batch, &c.chain),
                false => self.backend.enqueue_decode(&c.batch, &c.chain, c.sampling.as_ref().map(|(r, a)| (&r[..], &a[..]))),
            };
            match started {
                Ok(true) => {
                    self.metrics.overlapped_steps.inc();
                    next = Some(InFlight { t0, plan: c.plan, stuck: Vec::new() });
                    deferred = c.deferred;
                }
                Ok(false) => {}
                Err(e) => failed = Some((c.plan, e)),
            }
        }
        let ids = self.backend.collect_decode();
        if let Some(n) = &mut next {
            // The step timer of an overlapped step runs from the end of the step ahead of it,
            // when the device starts on it, not from its early start on the host.
            n.t0 = Instant::now();
        }
        self.finish_collected(prev, ids);
        // A deferred step's sampling follows from the tokens just committed.
        if let (true, Some(n)) = (deferred, &mut next) {
            let (rows, adjust, masks, stuck) = self.deferred_sampling(&n.plan);
            n.stuck = stuck;
            if let Err(e) = self.backend.sample_enqueued(&rows, &adjust, masks) {
                failed = next.take().map(|n| (n.plan, e));
            }
        }
        if let Some((plan, e)) = failed {
            self.finish_collected(InFlight { t0, plan, stuck: Vec::new() }, Err(e));
        }
        self.in_flight = next;
    }

    /// The sampling of a deferred step's rows (one per planned sequence) from the sequences as
    /// they stand now that the step ahead is committed: each row's parameters, uniform number
    /// and adjustments (penalties over the output so far), its constraint's mask, and the
    /// sequences no token can continue. A sequence that ended meanwhile takes its argmax.
    #[allow(clippy::type_complexity)]
    fn deferred_sampling(&self, plan: &[(u64, usize, usize)]) -> (Vec<RowSampling>, Vec<LogitAdjust>, Vec<Option<TokenMask>>, Vec<u64>) {
        let vocab = self.backend.spec().vocab_size;
        let (mut rows, mut adjust, mut masks, mut stuck) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for &(id, _, _) in plan {
            let Some(s) = self.running.iter().find(|s| s.id == id) else {
                rows.push(RowSampling { temperature: 0.0, top_k: 0, top_p: 1.0, min_p: 0.0, u: 0.0, adj_start: adjust.len() as u32, adj_len: 0 });
                masks.push(None);
                continue;
            };
            rows.push(sequence_row(s, &s.output, s.output.len(), vocab, &mut adjust));
            masks.push(s.constraint.as_ref().map(|c| {
                next_token_mask(s, c, vocab).unwrap_or_else(|| {
                    stuck.push(id);
                    vec![0; token_mask_words(vocab)]
                })
            }));
        }
        (rows, adjust, masks, stuck)
    }

    /// The decode step after `prev`, when every running sequence was a row of prev, stays
    /// decoding after prev's token whatever it is (no length limit reached; EOS and stop strings
    /// cannot be foreseen, and a sequence they end wastes its row), needs no logprobs (its rows'
    /// penalties and masks, which read prev's token, make it a deferred step: sampled once prev
    /// is committed), and gets a KV slot for the position after it
    /// without preempting anyone; with nobody waiting who could be admitted (a full batch keeps
    /// the queue waiting anyway; a slot that prev's commit frees is filled by the plain step
    /// after the chained one).
    fn plan_chained(&mut self, prev: &InFlight) -> Option<Chained> {
        let admits = !self.waiting.is_empty() && self.running.len() < self.config.max_num_seqs;
        if !self.overlap_allowed() || admits || self.running.is_empty() || self.running.len() > self.config.max_num_batched_tokens {
            return None;
        }
        let max_len = self.config.max_model_len;
        let mut rows = Vec::with_capacity(self.running.len());
        for s in &self.running {
            let r = prev.plan.iter().position(|p| p.0 == s.id)?;
            let continues = s.output.len() + 1 < s.req.stop.max_tokens && s.len() + 1 < max_len;
            // A constrained or penalised row is sampled once prev is committed (deferred).
            let ids_suffice = s.prompt_lp_done && s.req.sampling.logprobs.is_none();
            if s.len() != s.computed + 1 || !continues || !ids_suffice {
                return None;
            }
            rows.push(r);
        }
        // With a drafter the chain runs while the policy decodes plainly; its choice to
        // speculate ends it, and the next step takes that choice.
        if self.spec_block.is_some() && self.choose_speculation() {
            self.spec_decided = Some(true);
            return None;
        }
        for s in &mut self.running {
            if !self.kv.allocate(&mut s.blocks, s.computed + 1, s.computed + 2) {
                return None;
            }
        }
        let batch: Vec<SeqForward> = self
            .running
            .iter()
            .map(|s| SeqForward {
                seq_id: s.id,
                tokens: vec![0], // a placeholder: the backend feeds prev's sampled id
                start_pos: s.computed + 1,
                full_blocks: s.blocks.full.clone(),
                swa_blocks: s.blocks.swa.clone(),
                output: OutputRows::Last,
            })
            .collect();
        let seqs: Vec<&Seq> = self.running.iter().collect();
        let deferred = seqs.iter().any(|s| s.constraint.is_some() || !no_penalties(&s.req.sampling));
        let greedy = seqs.iter().all(|s| s.req.sampling.is_greedy() && !s.adjusts());
        let sampling = (!greedy && !deferred).then(|| row_sampling(&seqs, &batch, self.backend.spec().vocab_size, 1));
        Some(Chained { plan: self.running.iter().map(|s| (s.id, 1, 0)).collect(), batch, chain: rows.into_iter().map(Some).collect(), sampling, deferred })
    }

    /// Commits a collected overlapped step: the rows of sequences still running (one ended by
    /// the step ahead of it, or whose client left, computed a row nobody reads).
    fn finish_collected(&mut self, step: InFlight, ids: Result<Vec<u32>, Error>) {
        let ids = ids.and_then(|ids| {
            if ids.len() == step.plan.len() {
                Ok(ids)
            } else {
                Err(Error::Backend(format!("backend returned {} ids for a batch of {}", ids.len(), step.plan.len())))
            }
        });
        let live: Vec<bool> = step.plan.iter().map(|p| self.running.iter().any(|s| s.id == p.0)).collect();
        let plan: Vec<(u64, usize, usize)> = step.plan.iter().zip(&live).filter(|(_, &l)| l).map(|(p, _)| *p).collect();
        if plan.is_empty() {
            return;
        }
        let ntok = plan.len();
        let vocab = self.backend.spec().vocab_size;
        let stuck = |id: u64| step.stuck.contains(&id).then(|| self.running.iter().find(|s| s.id == id).and_then(|s| s.constraint.as_ref()).map(|c| stuck_reason(c, vocab))).flatten();
        let rows = ids.map(|ids| {
            ids.into_iter()
                .zip(step.plan.iter().zip(&live))
                .filter(|(_, (_, &l))| l)
                .map(|(t, (p, _))| match stuck(p.0) {
                    Some(why) => StepRows::Stuck(why),
                    None => StepRows::Ids(vec![t]),
                })
                .collect()
        });
        let drafts = vec![Vec::new(); plan.len()];
        self.finish_step(step.t0, plan, drafts, rows, ntok);
    }

    /// Commits a step's results: samples (or takes the sampled ids of) every asked-for row,
    /// accepts drafts, streams the new tokens and finishes the sequences that stop; a failed
    /// step fails its sequences, or, when the backend then reports that it can serve nothing
    /// more (`check_health`), every request and the engine itself.
    fn finish_step(&mut self, t0: Instant, plan: Vec<(u64, usize, usize)>, drafts: Vec<Vec<u32>>, result: Result<Vec<StepRows>, peregrine_core::Error>, ntok: usize) {
        let logits = match result {
            Ok(l) if l.len() == plan.len() => l,
            other => {
                let msg = match other {
                    Err(e) => e.to_string(),
                    Ok(l) => format!("backend returned {} logits for a batch of {}", l.len(), plan.len()),
                };
                tracing::error!("forward failed: {msg}");
                if let Err(e) = self.backend.check_health() {
                    self.fail_engine(e.to_string());
                    return;
                }
                for &(id, _, _) in &plan {
                    if let Some(i) = self.running.iter().position(|s| s.id == id) {
                        let mut s = self.running.remove(i);
                        self.kv.free(&mut s.blocks);
                        let _ = s.tx.send(RequestEvent::Error(msg.clone()));
                    }
                }
                return;
            }
        };
        self.metrics.batch_size.observe(plan.len() as f64);
        self.metrics.step_tokens.observe(ntok as f64);
        // A step of decodes alone (one fed token each) times its kind for the policy.
        let decode_rows = plan.iter().all(|&(_, chunk, _)| chunk == 1).then_some(plan.len());
        let speculated = drafts.iter().any(|d| !d.is_empty());
        let mut done = Vec::new();
        for (((id, chunk, _), lg), drafts) in plan.into_iter().zip(logits).zip(drafts) {
            let i = self.running.iter().position(|s| s.id == id).unwrap();
            let s = &mut self.running[i];
            let start = s.computed;
            let plen = s.req.prompt_tokens.len();
            if drafts.is_empty() {
                s.computed += chunk;
                if self.kv.commit_wants(&s.blocks, s.computed) {
                    let toks = s.tokens();
                    self.kv.commit(&mut s.blocks, &toks, s.computed);
                }
            }
            if let (false, StepRows::Logits(lg)) = (s.prompt_lp_done, &lg) {
                // Row r predicts position start + r + 1.
                if start == 0 {
                    s.prompt_lp.push(None);
                }
                let top = s.req.prompt_logprobs.unwrap_or(0);
                for r in 0..lg.rows {
                    let p = start + r + 1;
                    if p < plen {
                        s.prompt_lp.push(Some(sampler::prompt_logprob(lg.row(r), s.token_at(p), top)));
                    }
                }
                if s.computed >= plen {
                    s.prompt_lp_done = true;
                    let _ = s.tx.send(RequestEvent::PromptLogprobs(std::mem::take(&mut s.prompt_lp)));
                }
            }
            if drafts.is_empty() && s.computed < s.len() {
                continue;
            }
            if let StepRows::Stuck(why) = &lg {
                done.push((id, Some(why.to_string())));
                continue;
            }
            // The rows to sample: the last one, or (verification) one per fed token.
            let rows: Vec<Row> = match &lg {
                StepRows::Stuck(_) => Vec::new(),
                StepRows::Logits(lg) if drafts.is_empty() => lg.last().into_iter().map(Row::Logits).collect(),
                StepRows::Logits(lg) => (0..lg.rows).map(|r| Row::Logits(lg.row(r))).collect(),
                StepRows::Ids(ids) if drafts.is_empty() => ids.last().map(|&t| Row::Id(t, None)).into_iter().collect(),
                StepRows::Ids(ids) => ids.iter().map(|&t| Row::Id(t, None)).collect(),
                StepRows::IdsLp(rows) if drafts.is_empty() => rows.last().map(|(t, lp)| Row::Id(*t, lp.as_ref())).into_iter().collect(),
                StepRows::IdsLp(rows) => rows.iter().map(|(t, lp)| Row::Id(*t, lp.as_ref())).collect(),
            };
            if s.req.sampling.logprobs.is_some() && rows.iter().any(|r| matches!(r, Row::Id(_, None))) {
                done.push((id, Some("the backend sampled without the logprobs this request asked for".into())));
                continue;
            }
            if rows.len() != drafts.len() + 1 {
                done.push((id, Some(format!("backend returned {} logit rows for {} positions", rows.len(), drafts.len() + 1))));
                continue;
            }
            if s.output.is_empty() {
                self.metrics.prompt_tokens.inc_by(plen as u64);
            }
            let (mut text, mut ids, mut lps, mut fin) = (String::new(), Vec::new(), Vec::new(), None);
            let mut stuck: Option<String> = None;
            for (r, row) in rows.iter().enumerate() {
                // Plain sampling of this position, with the history (penalties) and the random
                // number (seed, output index) that decoding token by token would have used.
                // Accepting draft x exactly when the sample equals x accepts it with
                // probability p(x), and a mismatch is a sample from p without x,
                // renormalised: the rejection-sampling rule for one-hot proposals.
                let tok = match *row {
                    Row::Logits(raw) => {
                        let mut proc = raw.to_vec();
                        sampler::apply_penalties(&mut proc, &s.req.sampling, &s.req.prompt_tokens, &s.output);
                        for &t in s.banned_at(s.output.len()) {
                            if let Some(l) = proc.get_mut(t as usize) {
                                *l = f32::NEG_INFINITY;
                            }
                        }
                        if let Some(c) = &s.constraint {
                            if !c.mask(&mut proc) {
                                stuck = Some(c.stuck().to_string());
                                break;
                            }
                            // Bans (bad_words, min_tokens') over what the constraint allows can
                            // leave nothing; sampling would then make up token 0. (Unconstrained,
                            // the bans are far fewer than the vocabulary.)
                            if proc.iter().all(|&l| l == f32::NEG_INFINITY) {
                                stuck = Some(BANNED_ALL.to_string());
                                break;
                            }
                        }
                        let tok = sampler::sample(&proc, &s.req.sampling, &s.rng, s.output.len() as u64);
                        if let Some(k) = s.req.sampling.logprobs {
                            lps.push(sampler::logprobs(raw, tok, k));
                        }
                        tok
                    }
                    // Sampled on the backend (with the logprobs, when asked, from the raw logits).
                    Row::Id(tok, lp) => {
                        if let Some(lp) = lp {
                            lps.push(TokenLogprob { token_id: tok, logprob: lp.logprob, top: lp.top.clone() });
                        }
                        tok
                    }
                };
                s.output.push(tok);
                ids.push(tok);
                let (t, mut f) = commit_token(s, tok, &self.eos, &self.tokenizer_eos, self.config.max_model_len);
                text.push_str(&t);
                if let Some(c) = s.constraint.as_mut() {
                    if let Err(e) = c.advance(tok) {
                        stuck = Some(e);
                        break;
                    }
                    // The output is whole: nothing may follow it.
                    if c.done() && f.is_none() {
                        f = Some(FinishReason::Stop);
                    }
                }
                let accepted = r < drafts.len() && drafts[r] == tok;
                if accepted {
                    s.spec_accepted += 1;
                    self.metrics.spec_accepted.inc();
                    self.metrics.spec_accepted_per_pos.with_label_values(&[&r.to_string()]).inc();
                }
                if f.is_some() {
                    fin = f;
                    break;
                }
                if !accepted {
                    break;
                }
            }
            if let Some(why) = stuck {
                done.push((id, Some(why)));
                continue;
            }
            if !drafts.is_empty() {
                self.policy.record_round(&mut s.spec_rounds, ids.len());
                // Positions start..start+c hold the fed tokens that were committed; the K/V
                // written for rejected drafts lie past `computed` and are overwritten later.
                s.computed = start + ids.len();
                let upto = s.computed.min(s.len());
                if self.kv.commit_wants(&s.blocks, upto) {
                    let toks = s.tokens();
                    self.kv.commit(&mut s.blocks, &toks, upto);
                }
            }
            self.metrics.generation_tokens.inc_by(ids.len() as u64);
            let now = Instant::now();
            match s.last_token {
                None => {
                    self.metrics.ttft.observe((now - s.req.arrival).as_secs_f64());
                    if let Some(t) = s.first_scheduled {
                        self.metrics.prefill_time.observe((now - t).as_secs_f64());
                    }
                    s.first_token = Some(now);
                }
                Some(t) => {
                    let per = (now - t).as_secs_f64() / ids.len() as f64;
                    for _ in 0..ids.len() {
                        self.metrics.itl.observe(per);
                    }
                }
            }
            s.last_token = Some(now);
            let _ = s.tx.send(RequestEvent::Delta { text, token_ids: ids, logprobs: lps });
            if fin.is_some() {
                s.finish_reason = fin;
                done.push((id, None));
            }
        }
        for (id, err) in done {
            let i = self.running.iter().position(|s| s.id == id).unwrap();
            let mut s = self.running.remove(i);
            if let Some(e) = err {
                self.kv.free(&mut s.blocks);
                let _ = s.tx.send(RequestEvent::Error(e));
                continue;
            }
            let reason = s.finish_reason.unwrap_or(FinishReason::Length);
            self.finish(&mut s, reason);
        }
        let now = Instant::now();
        let secs = (now - t0).as_secs_f64();
        if let (Some(rows), Some(_)) = (decode_rows, self.spec_block) {
            let from = self.last_commit.map_or(t0, |c| c.max(t0));
            self.policy.record_step(rows, speculated, (now - from).as_secs_f64());
        }
        self.last_commit = Some(now);
        self.metrics.step_time.observe(secs);
    }

    /// The whole speculative step in one backend call (draft, verify, accept on the backend),
    /// when every planned sequence verifies drafts and reads nothing but the sampled ids, with no
    /// penalties (their adjustments would depend on the drafts). None: the step drafts and
    /// verifies in two calls (also after a failed or malformed fused call, which is logged and
    /// counted; nothing was committed, so the retry overwrites what it wrote).
    fn speculate_fused(&mut self, plan: &[(u64, usize, usize)]) -> Option<Vec<SpecRows>> {
        let mask = self.backend.draft_spec()?.mask_token_id;
        if plan.is_empty() || plan.iter().any(|&(_, chunk, k)| chunk != 1 || k == 0) {
            return None;
        }
        let seqs: Vec<&Seq> = plan.iter().map(|&(id, _, _)| self.running.iter().find(|s| s.id == id)).collect::<Option<_>>()?;
        if !seqs.iter().all(|s| sampled_ids_suffice(s)) {
            return None;
        }
        let greedy = seqs.iter().all(|s| s.req.sampling.is_greedy() && !s.adjusts());
        if !greedy && !seqs.iter().all(|s| no_penalties(&s.req.sampling)) {
            return None;
        }
        let batch: Vec<SeqForward> = plan
            .iter()
            .zip(&seqs)
            .map(|(&(id, _, k), s)| SeqForward {
                seq_id: id,
                tokens: std::iter::once(s.token_at(s.computed)).chain(std::iter::repeat_n(mask, k)).collect(),
                start_pos: s.computed,
                full_blocks: s.blocks.full.clone(),
                swa_blocks: s.blocks.swa.clone(),
                output: OutputRows::All,
            })
            .collect();
        let vocab = self.backend.spec().vocab_size;
        let (rows, adjust) = if greedy { (Vec::new(), Vec::new()) } else { row_sampling(&seqs, &batch, vocab, 0) };
        let sampling = if greedy { SpecSampling::Greedy } else { SpecSampling::Sampled { rows: &rows, adjust: &adjust } };
        let res = match self.backend.forward_speculative(&batch, sampling) {
            Ok(None) => return None,
            Ok(Some(r)) => r,
            Err(e) => {
                tracing::error!("fused speculative step failed, drafting and verifying in two calls: {e}");
                self.metrics.spec_draft_failures.inc();
                return None;
            }
        };
        let well_formed = res.len() == plan.len()
            && res.iter().zip(plan).all(|(r, &(_, _, k))| {
                r.drafts.len() == k
                    && r.ids.len() == k + 1
                    && r.drafts.iter().chain(&r.ids).all(|&t| (t as usize) < vocab)
                    && r.accepted == accepted_prefix(&r.drafts, &r.ids)
            });
        if !well_formed {
            tracing::error!("the backend's fused speculative step returned malformed rows; drafting and verifying in two calls");
            self.metrics.spec_draft_failures.inc();
            return None;
        }
        self.metrics.spec_fused_steps.inc();
        for &(id, _, k) in plan {
            self.metrics.spec_drafts.inc();
            self.metrics.spec_draft_tokens.inc_by(k as u64);
            if let Some(s) = self.running.iter_mut().find(|s| s.id == id) {
                s.spec_drafted += k;
            }
        }
        Some(res)
    }

    /// Runs the drafter for the planned verify steps; returns each plan entry's drafts (empty
    /// for prefill chunks and plain decodes). A failed or malformed draft pass is logged and
    /// counted, and the step decodes without drafts: drafts never affect correctness.
    fn draft(&mut self, plan: &[(u64, usize, usize)]) -> Vec<Vec<u32>> {
        let mut out = vec![Vec::new(); plan.len()];
        let mut reqs = Vec::new();
        let mut idx = Vec::new();
        for (pi, &(id, _, k)) in plan.iter().enumerate() {
            if k == 0 {
                continue;
            }
            let s = self.running.iter().find(|s| s.id == id).unwrap();
            reqs.push(DraftForward {
                seq_id: id,
                last_token: s.token_at(s.computed),
                start_pos: s.computed,
                num_drafts: k,
                full_blocks: s.blocks.full.clone(),
            });
            idx.push(pi);
        }
        if reqs.is_empty() {
            return out;
        }
        let vocab = self.backend.spec().vocab_size as u32;
        match self.backend.draft(&reqs) {
            Ok(d) if d.len() == reqs.len() && d.iter().zip(&reqs).all(|(d, r)| d.len() == r.num_drafts && d.iter().all(|&t| t < vocab)) => {
                for ((pi, d), r) in idx.into_iter().zip(d).zip(&reqs) {
                    self.metrics.spec_drafts.inc();
                    self.metrics.spec_draft_tokens.inc_by(r.num_drafts as u64);
                    if let Some(s) = self.running.iter_mut().find(|s| s.id == r.seq_id) {
                        s.spec_drafted += r.num_drafts;
                    }
                    out[pi] = d;
                }
            }
            other => {
                let why = match other {
                    Err(e) => e.to_string(),
                    Ok(_) => "the drafter returned drafts of the wrong count or outside the vocabulary".into(),
                };
                tracing::error!("draft pass failed, decoding without drafts this step: {why}");
                self.metrics.spec_draft_failures.inc();
            }
        }
        out
    }
}

/// Decodes a new token, applies the stop conditions and returns the text that may be sent now
/// and the finish reason if the sequence ends here.
fn commit_token(s: &mut Seq, tok: u32, eos: &[u32], tokenizer_eos: &[u32], max_model_len: usize) -> (String, Option<FinishReason>) {
    let stop = &s.req.stop;
    // (The stop ids and EOS are banned from sampling before min_tokens, so this holds for them.)
    let is_eos = !stop.ignore_eos && eos.contains(&tok);
    if s.output.len() >= stop.min_tokens && (is_eos || stop.stop_token_ids.contains(&tok)) {
        // The tokenizer's EOS names no stop reason (vLLM checks it first); the model's other
        // EOS ids and the stop ids name themselves.
        s.stop_reason = (!(is_eos && tokenizer_eos.contains(&tok))).then_some(StopReason::Token(tok));
        // The stop token's text is not emitted; held text is, by finish().
        return (String::new(), Some(FinishReason::Stop));
    }
    // A stop string may end only in the tokens after the first min_tokens (vLLM's rule: its
    // output's first min_tokens tokens never end it), though it may start before them.
    let can_stop = s.output.len() > stop.min_tokens;
    let new = s.decoder.push(tok).unwrap_or_default();
    // A match must end in this token's text: one within the text before (held through
    // min_tokens) is over.
    let before = s.held.len();
    s.held.push_str(&new);
    let mut out = String::new();
    if !stop.stop_strings.is_empty() {
        if can_stop {
            // The earliest match (the first listed where two start at one place) ends the
            // output, before it or, asked for, after it.
            let ends_here = |x: &String| {
                let from = (before + 1).saturating_sub(x.len());
                let from = (from..=s.held.len()).find(|&i| s.held.is_char_boundary(i)).unwrap_or(s.held.len());
                s.held[from..].find(x.as_str()).map(|i| (from + i, x.len()))
            };
            let matched = stop.stop_strings.iter().filter(|x| !x.is_empty()).filter_map(|x| ends_here(x).map(|m| (m, x))).min_by_key(|&((i, _), _)| i);
            if let Some(((i, len), x)) = matched {
                out = s.held[..if stop.include_stop_str { i + len } else { i }].to_string();
                s.held.clear();
                s.stop_reason = Some(StopReason::Text(x.clone()));
                return (out, Some(FinishReason::Stop));
            }
        }
        // Hold back the longest tail that could start a stop string (and, before min_tokens,
        // end after it: a proper prefix).
        let cut = (0..=s.held.len())
            .filter(|&i| s.held.is_char_boundary(i))
            .find(|&i| i < s.held.len() && stop.stop_strings.iter().any(|x| x.starts_with(&s.held[i..]) && (can_stop || x.len() > s.held.len() - i)))
            .unwrap_or(s.held.len());
        out.push_str(&s.held[..cut]);
        s.held.drain(..cut);
    } else {
        out = std::mem::take(&mut s.held);
    }
    if s.output.len() >= stop.max_tokens || s.len() >= max_model_len {
        return (out, Some(FinishReason::Length));
    }
    (out, None)
}

/// What a step brought back for one sequence: its logits rows, or only their argmax ids.
enum StepRows {
    Logits(peregrine_core::backend::Logits),
    Ids(Vec<u32>),
    /// Sampled ids with their logprobs (rows of sequences that asked for them).
    IdsLp(Vec<(u32, Option<RowLogprobs>)>),
    /// A constrained sequence no token could continue (its mask was empty): it ends with this.
    Stuck(&'static str),
}

/// The token masks of a step's sampled rows (`output_rows` order) for
/// `Backend::forward_sampled_masked`: a constrained sequence's mask on each of its rows, None on
/// the others' rows. A sequence whose constraint leaves no token is marked in `stuck` (its rows
/// get an empty mask; the engine drops what was sampled there).
fn constraint_masks(seqs: &[&Seq], batch: &[SeqForward], vocab: usize, stuck: &mut [bool]) -> Vec<Option<TokenMask>> {
    let mut masks = Vec::new();
    for (i, (s, b)) in seqs.iter().zip(batch).enumerate() {
        let n = output_row_count(b);
        let mask = match (&s.constraint, n) {
            (Some(c), 1..) => Some(next_token_mask(s, c, vocab).unwrap_or_else(|| {
                stuck[i] = true;
                vec![0; token_mask_words(vocab)]
            })),
            _ => None,
        };
        masks.extend(std::iter::repeat_n(mask, n));
    }
    masks
}

/// A sequence's error when bans over its constraint leave no token to sample.
const BANNED_ALL: &str = "no token is left to sample: `bad_words` or `min_tokens` ban every token the output allows here";

/// What `s`'s next token may be under its constraint `c`, less the tokens banned there
/// (min_tokens', bad_words'; they are -inf adjustments too, but an empty mask is how a backend
/// tells that nothing is left); None when nothing is.
fn next_token_mask(s: &Seq, c: &Constraint, vocab: usize) -> Option<TokenMask> {
    let mut mask = c.token_mask(vocab)?;
    let bans = s.banned_at(s.output.len()).iter().copied().chain(sampler::bad_word_bans(&s.req.sampling.bad_words, &s.output));
    for t in bans.filter(|&t| (t as usize) < vocab) {
        mask[t as usize / 32] &= !(1u32 << (t % 32));
    }
    mask.iter().any(|&w| w != 0).then_some(mask)
}

/// Why a sequence under `c` that `next_token_mask` left nothing cannot go on: the constraint's
/// own reason, or (where the constraint alone allows some) the bans over it.
fn stuck_reason(c: &Constraint, vocab: usize) -> &'static str {
    if c.token_mask(vocab).is_some() {
        BANNED_ALL
    } else {
        c.stuck()
    }
}

/// One row to sample from, or its sample from the backend (with its logprobs when computed there).
enum Row<'a> {
    Logits(&'a [f32]),
    Id(u32, Option<&'a RowLogprobs>),
}

/// How many rows of `b` ask for logits (its `output`).
fn output_row_count(b: &SeqForward) -> usize {
    match b.output {
        OutputRows::None => 0,
        OutputRows::Last => usize::from(!b.tokens.is_empty()),
        OutputRows::All => b.tokens.len(),
    }
}

/// Whether the sampled token of each row is all this sequence needs from a step: past its
/// prompt logprobs, with no logprobs and not in JSON mode (whose mask needs the logits; bias and
/// penalties travel as logit adjustments).
fn sampled_ids_suffice(s: &Seq) -> bool {
    s.prompt_lp_done && s.req.sampling.logprobs.is_none() && s.constraint.is_none()
}

/// Whether sampling reads the raw logits (no bias, bans or penalties): then a greedy row's
/// sample is the argmax of the logits.
fn no_adjustments(p: &SamplingParams) -> bool {
    p.logit_bias.is_empty() && p.bad_words.is_empty() && no_penalties(p)
}

/// Whether sampling has no history-dependent adjustment (repetition, presence, frequency, a
/// bad word of several tokens; a one-token word is banned everywhere, as a bias).
fn no_penalties(p: &SamplingParams) -> bool {
    (p.repetition_penalty == 1.0 || p.repetition_penalty <= 0.0) && p.presence_penalty == 0.0 && p.frequency_penalty == 0.0 && p.bad_words.iter().all(|w| w.len() <= 1)
}

/// The logit adjustments of one row, exactly as `sampler::apply_penalties` would apply them with
/// `output` as the tokens generated so far (`bad_words`' bans included), then `banned` at -inf
/// (min_tokens' ban, as the host sampler sets it): one entry per touched token, ascending ids.
fn row_adjustments(p: &SamplingParams, prompt: &[u32], output: &[u32], banned: &[u32], vocab: usize, out: &mut Vec<LogitAdjust>) {
    let mut touched: std::collections::BTreeMap<u32, LogitAdjust> = std::collections::BTreeMap::new();
    let none = |t: u32| LogitAdjust { token: t, bias: 0.0, repetition: 1.0, subtract: 0.0 };
    for (&t, &b) in &p.logit_bias {
        if (t as usize) < vocab {
            touched.entry(t).or_insert_with(|| none(t)).bias += b;
        }
    }
    for t in banned.iter().copied().chain(sampler::bad_word_bans(&p.bad_words, output)) {
        if (t as usize) < vocab {
            touched.entry(t).or_insert_with(|| none(t)).bias = f32::NEG_INFINITY;
        }
    }
    if p.repetition_penalty != 1.0 && p.repetition_penalty > 0.0 {
        for &t in prompt.iter().chain(output) {
            if (t as usize) < vocab {
                touched.entry(t).or_insert_with(|| none(t)).repetition = p.repetition_penalty;
            }
        }
    }
    if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
        let mut counts = std::collections::HashMap::<u32, u32>::new();
        for &t in output {
            *counts.entry(t).or_default() += 1;
        }
        for (t, c) in counts {
            if (t as usize) < vocab {
                touched.entry(t).or_insert_with(|| none(t)).subtract = p.presence_penalty + p.frequency_penalty * c as f32;
            }
        }
    }
    out.extend(touched.into_values());
}

/// The sampling of every output row of `batch` (`output_rows` order): the sequence's parameters
/// and the uniform number of the output position the row samples (row r of a verify block
/// samples output token `output.len() + r`, as plain decoding would).
/// `ahead`: output tokens the sequences hold that are not in `output` yet (a step chained on one
/// in flight samples output token `output.len() + 1`; its adjustments must not depend on them).
fn row_sampling(seqs: &[&Seq], batch: &[SeqForward], vocab: usize, ahead: usize) -> (Vec<RowSampling>, Vec<LogitAdjust>) {
    let mut rows = Vec::new();
    let mut adjust = Vec::new();
    for (s, b) in seqs.iter().zip(batch) {
        let n = output_row_count(b);
        let p = &s.req.sampling;
        // Row r of a verify block samples after the drafts before it were accepted: its history
        // is the output so far plus those drafts (the fed tokens past the first).
        let fed = &b.tokens[b.tokens.len() - n..];
        // The history only matters to penalties (copying it per row and step costs O(output)).
        let mut history = if no_penalties(p) { Vec::new() } else { s.output.clone() };
        for (r, &tok) in fed.iter().enumerate() {
            if r > 0 {
                history.push(tok);
            }
            rows.push(sequence_row(s, &history, s.output.len() + ahead + r, vocab, &mut adjust));
        }
    }
    (rows, adjust)
}

/// The sampling of one row of `s` that draws output token `n`, with `history` as the tokens
/// generated before it; its adjustments are appended to `adjust`.
fn sequence_row(s: &Seq, history: &[u32], n: usize, vocab: usize, adjust: &mut Vec<LogitAdjust>) -> RowSampling {
    let p = &s.req.sampling;
    let start = adjust.len();
    row_adjustments(p, &s.req.prompt_tokens, history, s.banned_at(n), vocab, adjust);
    RowSampling {
        temperature: p.temperature,
        top_k: i32::try_from(p.top_k).unwrap_or(i32::MAX),
        top_p: p.top_p,
        min_p: p.min_p,
        u: s.rng.uniform_at(n as u64),
        adj_start: start as u32,
        adj_len: (adjust.len() - start) as u32,
    }
}
