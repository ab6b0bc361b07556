//! `peregrine serve`: flags (each also an environment variable), model loading and the server's
//! life cycle (listen at once, answer 503 while loading, graceful shutdown on SIGTERM/ctrl-c).

use std::io::IsTerminal;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use axum::serve::ListenerExt;
use clap::{Parser, Subcommand, ValueEnum};
use peregrine_engine::{start_engine, EngineConfig};
use peregrine_core::KvDtype;
use peregrine_model::chat_template::ChatTemplate;

use crate::generation_defaults::SamplingDefaults;
use crate::state::{unix_now, AppState, Ready, Settings};

#[derive(Parser, Debug)]
#[command(name = "peregrine", version, about = "OpenAI-compatible inference server for MiMo-V2 models")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

// Parsed once per process: the size difference between the variants costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Serve a model over HTTP.
    Serve(ServeArgs),
    /// Compile the CUDA kernels into the kernel cache ($PEREGRINE_CACHE_DIR, else
    /// ~/.cache/peregrine) for a GPU architecture, without a GPU (only libnvrtc): a later
    /// `serve --device cuda` on such a GPU then starts without compiling (a container image
    /// built with it starts in about a second instead of compiling for ~25 s on a many-core host).
    CompileKernels(CompileKernelsArgs),
}

#[derive(clap::Args, Debug)]
pub struct CompileKernelsArgs {
    /// The GPU architecture, as `serve` picks it for the GPU it finds: sm_90a for Hopper (H100,
    /// H200); sm_100a / sm_120 for Blackwell's; compute_90 (PTX only) for other newer GPUs.
    #[arg(long, default_value = "sm_90a", value_parser = clap::builder::PossibleValuesParser::new(peregrine_cuda::device::NVRTC_ARCHES))]
    pub arch: String,
}

/// `peregrine compile-kernels`: every build a server may load for the architecture (both K/V
/// pool types), compiled into the cache unless there already; one line per build.
pub fn compile_kernels(args: &CompileKernelsArgs) -> anyhow::Result<()> {
    let start = std::time::Instant::now();
    let builds = peregrine_cuda::compile::fill(&args.arch).context("compiling the CUDA kernels")?;
    for (path, compiled) in &builds {
        println!("{} {}", if *compiled { "compiled" } else { "cached  " }, path.display());
    }
    let n = builds.iter().filter(|b| b.1).count();
    println!("{n} of {} kernel builds compiled for {} in {:.1} s", builds.len(), args.arch, start.elapsed().as_secs_f64());
    Ok(())
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum Device {
    Cpu,
    Cuda,
}

/// Where the weights come from.
#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum LoadFormat {
    /// The checkpoint's.
    Auto,
    /// Random weights for the model's config.json (the checkpoint need not exist), as vLLM's
    /// `--load-format dummy`: load tests and benchmarks at a model's real shapes. The text means
    /// nothing. Without tokenizer.json the words `t0` .. `t{vocab_size - 1}` are the tokens.
    Dummy,
}

/// The seed of `--load-format dummy`'s weights (fixed, so a config serves one model).
pub const DUMMY_SEED: u64 = 0x5eed;

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum ToolCallParserKind {
    /// Also under vLLM's names for the two forms it parses: `hermes` (JSON) and `qwen3_coder` /
    /// `qwen3_xml` (XML), so a vLLM command line runs unchanged.
    #[value(aliases = ["hermes", "qwen3_coder", "qwen3_xml"])]
    Auto,
    None,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum ReasoningParserKind {
    /// Also under `qwen3`, the vLLM parser name MiMo is served with. Unlike vLLM's current
    /// parser, a reply that neither opens `<think>` nor follows a prompt that opened it is all
    /// content.
    #[value(alias = "qwen3")]
    Auto,
    None,
}

/// `--generation-config`: where a request's unset sampling fields come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GenerationConfig {
    /// The model directory's generation_config.json.
    Auto,
    /// The OpenAI defaults (vLLM calls this `vllm`).
    None,
    /// The generation_config.json of another directory (as vLLM's folder form).
    Folder(std::path::PathBuf),
}

fn parse_generation_config(s: &str) -> Result<GenerationConfig, String> {
    match s {
        "auto" => Ok(GenerationConfig::Auto),
        "none" | "vllm" => Ok(GenerationConfig::None),
        dir if std::path::Path::new(dir).join("generation_config.json").is_file() => Ok(GenerationConfig::Folder(dir.into())),
        other => Err(format!("`{other}` is neither auto, none (alias vllm) nor a directory holding a generation_config.json")),
    }
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    /// A model directory, a weights file, or an `org/name` id in the local HF cache. Without it,
    /// the embedded default model.
    #[arg(env = "PEREGRINE_MODEL")]
    pub model: Option<String>,
    #[arg(long, env = "PEREGRINE_HOST", default_value = "127.0.0.1")]
    pub host: String,
    #[arg(long, env = "PEREGRINE_PORT", default_value_t = 8000)]
    pub port: u16,
    #[arg(long, env = "PEREGRINE_DEVICE", value_enum, default_value_t = Device::Cpu)]
    pub device: Device,
    /// `auto`: the checkpoint's weights; `dummy`: random weights for its config.json (load tests
    /// and benchmarks without the checkpoint; the text means nothing).
    #[arg(long, env = "PEREGRINE_LOAD_FORMAT", value_enum, default_value_t = LoadFormat::Auto)]
    pub load_format: LoadFormat,
    /// config.json fields to replace, as a JSON object, e.g. '{"num_hidden_layers": 18}' (fewer
    /// layers keep the first ones).
    #[arg(long, env = "PEREGRINE_HF_OVERRIDES", value_parser = parse_overrides)]
    pub hf_overrides: Option<serde_json::Map<String, serde_json::Value>>,
    /// Tensor-parallel degree (GPUs); also `--tensor-parallel-size` and `-tp`, as vLLM spells it.
    #[arg(long, visible_alias = "tensor-parallel-size", env = "PEREGRINE_TP", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..))]
    pub tp: u16,
    /// Sequences in a decode batch at most (1..=4096).
    #[arg(long, env = "PEREGRINE_MAX_NUM_SEQS", default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub max_num_seqs: u32,
    /// Prompt + output tokens per sequence (default: the model's max_position_embeddings, capped
    /// at 8192 on the CPU; at least 2: a one-token prompt and its reply).
    #[arg(long, env = "PEREGRINE_MAX_MODEL_LEN", value_parser = clap::value_parser!(u32).range(2..=1 << 24))]
    pub max_model_len: Option<u32>,
    /// Memory for the KV cache, e.g. 512MiB, 4GiB. Default: 512MiB on the CPU; with --device
    /// cuda the cache is sized by --gpu-memory-utilization unless this is given.
    #[arg(long, env = "PEREGRINE_KV_CACHE_MEMORY", value_parser = parse_bytes, conflicts_with = "gpu_memory_utilization")]
    pub kv_cache_memory: Option<usize>,
    /// With --device cuda: give the KV cache what is left of this fraction of the GPU's memory
    /// after the weights and a profiling step of the largest batches (as vLLM's option of the
    /// same name; default 0.9 unless --kv-cache-memory is given). Counts memory other processes
    /// hold on the GPU as in use.
    #[arg(long, env = "PEREGRINE_GPU_MEMORY_UTILIZATION", value_parser = parse_fraction, allow_negative_numbers = true)]
    pub gpu_memory_utilization: Option<f64>,
    /// The KV cache's element type: auto (bfloat16 on a GPU, the checkpoints' precision as
    /// vLLM's auto; float32 on the CPU, the exact reference), float32, bfloat16 (half the
    /// memory of float32, so about twice the cached tokens, and half the bytes a long context's
    /// attention reads; K and V rounded to BF16 as they are written) or fp8 (alias fp8_e4m3:
    /// half of bfloat16's memory again; K and V rounded to FP8 e4m3 with a scale of 1, as vLLM's
    /// fp8 without calibrated scales, magnitudes past 448 saturated: it costs some accuracy).
    #[arg(long, env = "PEREGRINE_KV_CACHE_DTYPE", value_parser = parse_kv_dtype, default_value = "auto")]
    pub kv_cache_dtype: KvCacheDtype,
    /// Tokens a step computes at most (prefill chunks and decode rows together; 1..=2^20).
    #[arg(long, env = "PEREGRINE_MAX_NUM_BATCHED_TOKENS", default_value_t = 2048, value_parser = clap::value_parser!(u32).range(1..=1 << 20))]
    pub max_num_batched_tokens: u32,
    /// Waiting requests at most; more are answered 429 (1..=2^20).
    #[arg(long, env = "PEREGRINE_MAX_WAITING", default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..=1 << 20))]
    pub max_waiting: u32,
    /// Require `Authorization: Bearer <key>` on the API routes.
    #[arg(long, env = "PEREGRINE_API_KEY")]
    pub api_key: Option<String>,
    /// The model name clients use (default: the directory or id, or the default model's name).
    #[arg(long, env = "PEREGRINE_SERVED_MODEL_NAME")]
    pub served_model_name: Option<String>,
    /// A chat template file, or the template itself, overriding the model's.
    #[arg(long, env = "PEREGRINE_CHAT_TEMPLATE")]
    pub chat_template: Option<String>,
    /// Send the usage chunk on every stream, as if `stream_options.include_usage` were set.
    #[arg(long, env = "PEREGRINE_ALWAYS_INCLUDE_USAGE", value_parser = clap::builder::BoolishValueParser::new())]
    pub always_include_usage: bool,
    #[arg(long, env = "PEREGRINE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// How chat outputs of requests with `tools` become `tool_calls`: `auto` parses
    /// `<tool_call>` blocks in the JSON form (Hermes / Qwen2.5 templates) or the XML form (MiMo /
    /// Qwen3-Coder templates); `none` leaves every output as text.
    #[arg(long, env = "PEREGRINE_TOOL_CALL_PARSER", value_enum, default_value_t = ToolCallParserKind::Auto)]
    pub tool_call_parser: ToolCallParserKind,
    /// How reasoning models' thinking is returned: `auto` splits a chat reply's leading
    /// `<think>...</think>` (or a block the prompt left open) into `reasoning_content`, as the
    /// `qwen3` reasoning parser MiMo is served with does; `none` leaves it in `content`.
    #[arg(long, env = "PEREGRINE_REASONING_PARSER", value_enum, default_value_t = ReasoningParserKind::Auto)]
    pub reasoning_parser: ReasoningParserKind,
    /// `auto`: what a request leaves unset (temperature, top_p, top_k, min_p,
    /// repetition_penalty, and max_new_tokens as a cap on max_tokens) comes from the model
    /// directory's generation_config.json, as vLLM does; `none` (alias `vllm`): the OpenAI
    /// defaults; a directory: that directory's generation_config.json.
    #[arg(long, env = "PEREGRINE_GENERATION_CONFIG", value_parser = parse_generation_config, default_value = "auto")]
    pub generation_config: GenerationConfig,
    /// DFlash drafter directory for speculative decoding, or `none` to decode without one.
    /// Default: the model's own `dflash/` subfolder when it has one.
    #[arg(long, env = "PEREGRINE_SPECULATIVE_MODEL")]
    pub speculative_model: Option<String>,
    /// Tokens per speculative block (the last token plus N-1 drafts), 2..=16. Default: the
    /// drafter's `block_size`.
    #[arg(long, env = "PEREGRINE_SPECULATIVE_BLOCK_SIZE", value_parser = clap::value_parser!(u16).range(2..=16))]
    pub speculative_block_size: Option<u16>,
    /// vLLM's form of the two flags above, a JSON object: `{"method": "dflash", "model": PATH,
    /// "num_speculative_tokens": N}` (N drafts: a block of N + 1; `model` may be left out for
    /// the model's own dflash/ subfolder). N is at most 15: a block holds 16 tokens at most.
    #[arg(long, env = "PEREGRINE_SPECULATIVE_CONFIG", value_parser = parse_speculative_config)]
    pub speculative_config: Option<SpeculativeConfig>,
    /// When the drafter speculates: `adaptive` (while speculative steps measure faster than
    /// plain decoding: timed per batch size, with each sequence's own acceptance) or `always`.
    /// Outputs are the same either way; only the speed differs. On the GPU, `adaptive` decodes
    /// seeded sampling requests plainly, so they repeat (`always` drafts for them too).
    #[arg(long, env = "PEREGRINE_SPECULATIVE_MODE", default_value = "adaptive")]
    pub speculative_mode: peregrine_engine::SpeculationMode,
    /// Origins a browser may call the API from (CORS), comma-separated; `*` (the default, as
    /// vLLM's) lets any page call it, `none` no page.
    #[arg(long, env = "PEREGRINE_ALLOWED_ORIGINS", value_delimiter = ',', default_value = "*")]
    pub allowed_origins: Vec<String>,
    /// On SIGTERM or Ctrl-C, how many seconds requests already running may take to finish
    /// while new ones get a 503 and /health fails; what is left then is aborted. 0 (the default,
    /// as vLLM's) aborts at once. A second signal aborts at once too.
    #[arg(long, env = "PEREGRINE_SHUTDOWN_TIMEOUT", default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=86_400))]
    pub shutdown_timeout: u32,
    /// Do not log each request (method, path, status, time) at info level (vLLM's name for it,
    /// `--disable-uvicorn-access-log`, works too).
    #[arg(long, visible_alias = "disable-uvicorn-access-log", env = "PEREGRINE_DISABLE_ACCESS_LOG", value_parser = clap::builder::BoolishValueParser::new())]
    pub disable_access_log: bool,
    /// Turn off prefix caching: every prompt is computed in full, none of its blocks is shared
    /// (for measurements). On by default, as vLLM's; `--enable-prefix-caching` (vLLM's flag for
    /// the default) wins over this flag and its variable.
    #[arg(long, env = "PEREGRINE_NO_ENABLE_PREFIX_CACHING", value_parser = clap::builder::BoolishValueParser::new())]
    pub no_enable_prefix_caching: bool,
    #[arg(long, hide = true)]
    pub enable_prefix_caching: bool,
    // vLLM flags accepted so that its command lines run unchanged.
    /// No effect: Peregrine runs no model code (`mimo_v2`'s is built in).
    #[arg(long, help_heading = "Accepted for vLLM command lines (no effect)")]
    pub trust_remote_code: bool,
    /// No effect: tool calls are parsed whenever --tool-call-parser is on (the default); refused
    /// beside `--tool-call-parser none`.
    #[arg(long, help_heading = "Accepted for vLLM command lines (no effect)")]
    pub enable_auto_tool_choice: bool,
    /// No effect: prompts and outputs are never logged.
    #[arg(long, help_heading = "Accepted for vLLM command lines (no effect)")]
    pub disable_log_requests: bool,
    /// Only `auto`: every weight stays in its stored format on the GPU (BF16, FP8 blocks,
    /// MXFP4) and the CPU computes in f32.
    #[arg(long, default_value = "auto", value_parser = parse_dtype, help_heading = "Accepted for vLLM command lines (no effect)")]
    pub dtype: String,
    /// Largest accepted request body, in bytes.
    #[arg(long, env = "PEREGRINE_MAX_BODY_BYTES", default_value_t = 32 << 20, value_parser = parse_bytes)]
    pub max_body_bytes: usize,
    /// Commit each decode step only after starting the next one (the default where the backend
    /// can: the CUDA backend's captured decode steps) turned off: the host then works between
    /// steps while the GPU waits. Outputs are the same either way.
    #[arg(long, env = "PEREGRINE_NO_OVERLAP_STEPS", value_parser = clap::builder::BoolishValueParser::new())]
    pub no_overlap_steps: bool,
    /// Requests without a `seed` of their own sample from seeds made of this and their arrival
    /// number (the n-th generation request without a seed the server took, greedy ones
    /// included), so a server restarted with the same seed and sent the same requests in the
    /// same order samples the same text (given as each such request's seed: on a GPU under
    /// adaptive speculation its sampling then decodes plainly, as any seeded request's). Without
    /// it, unseeded requests sample independently run to run.
    #[arg(long, env = "PEREGRINE_SEED")]
    pub seed: Option<u64>,
    /// Decode steps run eagerly on the GPU, without CUDA graphs (vLLM's flag; slower; for
    /// debugging). No effect on the CPU.
    #[arg(long, env = "PEREGRINE_ENFORCE_EAGER", value_parser = clap::builder::BoolishValueParser::new())]
    pub enforce_eager: bool,
    /// No effect: prefill is always chunked to --max-num-batched-tokens.
    #[arg(long, help_heading = "Accepted for vLLM command lines (no effect)")]
    pub enable_chunked_prefill: bool,
    #[arg(long, hide = true)]
    pub no_enable_chunked_prefill: bool,
}

impl ServeArgs {
    /// Whether the prefix cache is on: unless turned off, and always with
    /// `--enable-prefix-caching` (from the command line; the off switch may come from its
    /// environment variable, where clap cannot order the two).
    pub fn prefix_caching(&self) -> bool {
        self.enable_prefix_caching || !self.no_enable_prefix_caching
    }

    /// The drafter (`none`: no speculation; None: the model's own dflash/ subfolder) and block
    /// size, from the two flags or from `--speculative-config`, never both.
    pub fn speculation(&self) -> anyhow::Result<(Option<&str>, Option<u16>)> {
        match &self.speculative_config {
            None => Ok((self.speculative_model.as_deref(), self.speculative_block_size)),
            Some(_) if self.speculative_model.is_some() || self.speculative_block_size.is_some() => bail!(
                "--speculative-config is vLLM's form of --speculative-model and --speculative-block-size (PEREGRINE_SPECULATIVE_MODEL, PEREGRINE_SPECULATIVE_BLOCK_SIZE): give one form, not both"
            ),
            Some(c) => Ok((c.model.as_deref(), c.block_size)),
        }
    }
}

/// `--speculative-config`: vLLM's JSON form of --speculative-model and --speculative-block-size.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpeculativeConfig {
    /// The drafter's directory (None: the model's own dflash/ subfolder).
    pub model: Option<String>,
    /// Tokens per block: `num_speculative_tokens` drafts after the last token.
    pub block_size: Option<u16>,
}

fn parse_speculative_config(s: &str) -> Result<SpeculativeConfig, String> {
    let fields = match serde_json::from_str(s) {
        Ok(serde_json::Value::Object(m)) => m,
        Ok(other) => return Err(format!("expected a JSON object such as '{{\"method\": \"dflash\", \"model\": \"PATH\", \"num_speculative_tokens\": 7}}', not {other}")),
        Err(e) => return Err(format!("not JSON: {e}")),
    };
    let mut config = SpeculativeConfig { model: None, block_size: None };
    for (key, value) in &fields {
        match key.as_str() {
            "method" if value.as_str() == Some("dflash") => {}
            "method" => return Err(format!("method {value} is not supported: Peregrine speculates with DFlash drafters only (\"dflash\")")),
            "model" => match value.as_str() {
                Some("none") => return Err("model \"none\" speculates with no drafter: leave --speculative-config out instead".into()),
                Some(m) if !m.trim().is_empty() => config.model = Some(m.to_owned()),
                _ => return Err(format!("model must be the drafter's directory, got {value}")),
            },
            "num_speculative_tokens" => match value.as_u64() {
                Some(n @ 1..=15) => config.block_size = Some(n as u16 + 1),
                _ => return Err(format!("num_speculative_tokens must be an integer from 1 to 15 (a block holds the last token and at most 15 drafts), got {value}")),
            },
            other => return Err(format!("`{other}` is not supported (accepted: method, model, num_speculative_tokens)")),
        }
    }
    Ok(config)
}

/// `--dtype`: only `auto` (vLLM's default), since weights keep their stored formats.
fn parse_dtype(s: &str) -> Result<String, String> {
    match s {
        "auto" => Ok(s.to_owned()),
        other => Err(format!("`{other}` is not supported: Peregrine keeps every weight in its stored format on the GPU (BF16, FP8 blocks, MXFP4) and computes in f32 on the CPU, so only `auto` is taken")),
    }
}

/// vLLM's spellings of flags, rewritten to Peregrine's before parsing: `-tp N` is `--tp N`, and
/// underscores in a long flag's name are dashes (`--max_model_len`), as vLLM's parser allows.
/// Values and everything after a bare `--` are left as they are.
pub fn vllm_spellings(args: impl IntoIterator<Item = std::ffi::OsString>) -> Vec<std::ffi::OsString> {
    let mut out = Vec::new();
    let mut flags_end = false;
    for arg in args {
        let Some(text) = arg.to_str().filter(|_| !flags_end) else {
            out.push(arg);
            continue;
        };
        let rewritten = if text == "--" {
            flags_end = true;
            text.to_owned()
        } else if text == "-tp" || text.starts_with("-tp=") {
            format!("-{text}")
        } else if let Some(flag) = text.strip_prefix("--") {
            let (name, value) = flag.split_once('=').map_or((flag, None), |(n, v)| (n, Some(v)));
            let name = name.replace('_', "-");
            value.map_or(format!("--{name}"), |v| format!("--{name}={v}"))
        } else {
            text.to_owned()
        };
        out.push(rewritten.into());
    }
    out
}

/// The KV cache's memory on the CPU when --kv-cache-memory is not given.
pub const DEFAULT_KV_CACHE_MEMORY: usize = 512 << 20;

/// The fraction of a GPU the KV cache is sized to when neither --kv-cache-memory nor
/// --gpu-memory-utilization is given (vLLM's default).
pub const DEFAULT_GPU_MEMORY_UTILIZATION: f64 = 0.9;

/// `--kv-cache-dtype`: the backend's choice, or one type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvCacheDtype {
    Auto,
    Given(KvDtype),
}

fn parse_kv_dtype(s: &str) -> Result<KvCacheDtype, String> {
    if s.eq_ignore_ascii_case("auto") {
        return Ok(KvCacheDtype::Auto);
    }
    s.parse().map(KvCacheDtype::Given).map_err(|e: String| e.replace("(expected ", "(expected auto, "))
}

/// The fraction of the GPU the KV cache is sized to: the one given, else on a GPU without a
/// byte size the default; None: the byte size (on the CPU always).
pub fn gpu_memory_utilization(device: Device, kv_cache_memory: Option<usize>, given: Option<f64>) -> Option<f64> {
    match (device, kv_cache_memory, given) {
        (Device::Cuda, None, None) => Some(DEFAULT_GPU_MEMORY_UTILIZATION),
        (_, _, u) => u,
    }
}

/// A fraction in (0, 1], e.g. `0.9`.
pub fn parse_fraction(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(f) if f > 0.0 && f <= 1.0 => Ok(f),
        Ok(f) => Err(format!("{f} is not in (0, 1]")),
        Err(_) => Err(format!("`{s}` is not a number (a fraction such as 0.9)")),
    }
}

/// "512MiB", "4GiB", "1G", "1000000" -> bytes.
pub fn parse_bytes(s: &str) -> Result<usize, String> {
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num.parse().map_err(|_| format!("invalid size `{s}`"))?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "kib" => 1024.0,
        "m" | "mb" => 1e6,
        "mib" => 1024.0 * 1024.0,
        "g" | "gb" => 1e9,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        "t" | "tb" => 1e12,
        "tib" => 1024f64.powi(4),
        u => return Err(format!("unknown unit `{u}` in `{s}` (use B, KiB, MiB, GiB, TiB)")),
    };
    Ok((n * mult) as usize)
}

/// `--hf-overrides`: a JSON object.
pub fn parse_overrides(s: &str) -> Result<serde_json::Map<String, serde_json::Value>, String> {
    match serde_json::from_str(s) {
        Ok(serde_json::Value::Object(m)) => Ok(m),
        Ok(other) => Err(format!("expected a JSON object of config.json fields, e.g. '{{\"num_hidden_layers\": 18}}', not {other}")),
        Err(e) => Err(format!("not JSON: {e}")),
    }
}

/// The CPU backend holds every weight as f32: refuse a model that cannot fit before trying
/// (an allocation failure would abort the process). `available`: bytes free, where known.
pub fn check_cpu_memory(params: u64, kv_bytes: u64, available: Option<u64>) -> anyhow::Result<()> {
    let need = params.saturating_mul(4);
    if let Some(avail) = available.filter(|&a| need > a) {
        bail!(
            "the CPU backend holds every weight as f32: this {params}-parameter model needs {:.1} GB, and {:.1} GB of memory are available (use --device cuda; a load test with --load-format dummy can also take fewer layers: --hf-overrides '{{\"num_hidden_layers\": N}}')",
            need as f64 / 1e9,
            avail as f64 / 1e9
        );
    }
    // The cache is zeroed memory the kernel hands out as it is written: too large a one starts
    // and is killed later under load (or aborts allocating), so it is refused here.
    if let Some(avail) = available.filter(|&a| need.saturating_add(kv_bytes) > a) {
        bail!(
            "--kv-cache-memory {:.1} GB with the {:.1} GB of f32 weights exceeds the {:.1} GB of memory available: give a smaller --kv-cache-memory",
            kv_bytes as f64 / 1e9,
            need as f64 / 1e9,
            avail as f64 / 1e9
        );
    }
    Ok(())
}

/// MemAvailable of /proc/meminfo, in bytes (None where there is none).
fn memory_available() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kb: u64 = info.lines().find_map(|l| l.strip_prefix("MemAvailable:"))?.trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kb * 1024)
}

pub fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    // Colours only on a terminal: logs sent to a file or a collector stay plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let b = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    match format {
        LogFormat::Json => b.json().init(),
        LogFormat::Text => b.init(),
    }
}

/// Loads the model and starts the engine (blocking; runs on a worker thread).
pub fn load(args: &ServeArgs) -> anyhow::Result<Ready> {
    if args.tp != 1 {
        bail!("--tp {} is not supported yet (one GPU or the CPU)", args.tp);
    }
    if args.api_key.as_deref().is_some_and(|k| k.trim().is_empty()) {
        bail!("--api-key (PEREGRINE_API_KEY) is empty: an empty key would let every request in; give a key, or leave the option out for an open server");
    }
    if args.served_model_name.as_deref().is_some_and(|n| n.trim().is_empty()) {
        bail!("--served-model-name is empty");
    }
    if args.max_body_bytes < 1024 {
        bail!("--max-body-bytes {} refuses every request (at least 1 KiB)", args.max_body_bytes);
    }
    if args.enable_auto_tool_choice && args.tool_call_parser == ToolCallParserKind::None {
        bail!("--enable-auto-tool-choice asks for tool calls, and --tool-call-parser none turns their parsing off: leave one of them out");
    }
    if args.no_enable_chunked_prefill {
        bail!("--no-enable-chunked-prefill: prefill is always chunked here, --max-num-batched-tokens tokens a step; give that the --max-model-len for a whole prompt in one step");
    }
    if args.gpu_memory_utilization.is_some() && args.device != Device::Cuda {
        bail!("--gpu-memory-utilization sizes the KV cache on a GPU (--device cuda); on the CPU give its size with --kv-cache-memory");
    }
    let (path, default_name) = match &args.model {
        // A config file alone (--load-format dummy) is named by its stem.
        Some(m) if m.ends_with(".json") && std::path::Path::new(m).file_name().is_some_and(|n| n != "config.json") => {
            let stem = std::path::Path::new(m).file_stem().map(|s| s.to_string_lossy().into_owned());
            (m.clone(), stem.unwrap_or_else(|| m.clone()))
        }
        Some(m) => (m.clone(), m.trim_end_matches('/').to_owned()),
        None => (crate::default_model::unpack()?.display().to_string(), crate::default_model::NAME.to_owned()),
    };
    let spinner = std::io::stderr().is_terminal().then(|| {
        let p = indicatif::ProgressBar::new_spinner();
        p.set_message(format!("loading weights of {default_name}"));
        p.enable_steady_tick(std::time::Duration::from_millis(120));
        p
    });
    let opts = peregrine_model::loader::LoadOptions {
        dummy_weights: (args.load_format == LoadFormat::Dummy).then_some(DUMMY_SEED),
        config_overrides: args.hf_overrides.clone(),
    };
    let files = peregrine_model::loader::open_model_with(&path, &opts).with_context(|| format!("cannot open model `{path}`"))?;
    let tokenizer = files.tokenizer.ok_or_else(|| anyhow::anyhow!("model `{path}` has no tokenizer.json"))?;
    let template_src = match &args.chat_template {
        Some(t) if std::path::Path::new(t).is_file() => Some(std::fs::read_to_string(t).with_context(|| format!("reading {t}"))?),
        // Inline only where it is a template: a mistyped path would render every chat as its text.
        Some(t) if t.contains("{{") || t.contains("{%") => Some(t.clone()),
        Some(t) => bail!("--chat-template `{t}` is neither a readable file nor a template (no `{{{{` or `{{%`)"),
        None => files.chat_template.clone(),
    };
    let template = template_src
        .map(|s| ChatTemplate::new(&s, tokenizer.bos_token(), tokenizer.eos_token()))
        .transpose()
        .context("invalid chat template")?;
    let t0 = std::time::Instant::now();
    let (speculative_model, speculative_block_size) = args.speculation()?;
    let drafter_dir = match speculative_model {
        Some("none") => None,
        Some(p) => Some(std::path::PathBuf::from(p)),
        None => peregrine_model::dflash::bundled_drafter(&files.dir),
    };
    if args.speculative_config.is_some() && drafter_dir.is_none() {
        bail!("--speculative-config names no \"model\" and model `{path}` has no dflash/ subfolder: give the drafter's directory");
    }
    if speculative_block_size.is_some() && drafter_dir.is_none() {
        bail!("--speculative-block-size needs a drafter (--speculative-model PATH, or a model with a dflash/ subfolder)");
    }
    // `auto` on the CPU: the backend's own f32 (None); on a GPU, the CUDA backend's choice below.
    let mut kv_cache_dtype = match args.kv_cache_dtype {
        KvCacheDtype::Auto => None,
        KvCacheDtype::Given(d) => Some(d),
    };
    let backend: Box<dyn peregrine_core::backend::Backend> = match args.device {
        Device::Cpu => {
            check_cpu_memory(files.spec.num_parameters() as u64, args.kv_cache_memory.unwrap_or(DEFAULT_KV_CACHE_MEMORY) as u64, memory_available())?;
            let mut model = peregrine_cpu::CpuModel::load(&files.spec, files.weights.as_ref()).context("loading weights")?;
            if let Some(dir) = &drafter_dir {
                let draft = peregrine_model::dflash::open_drafter(dir).with_context(|| format!("cannot open the drafter in {}", dir.display()))?;
                model.attach_drafter(&draft).with_context(|| format!("drafter {} does not fit this model", dir.display()))?;
                tracing::info!(drafter = %dir.display(), block_size = speculative_block_size.map_or(draft.spec.block_size, usize::from), layers = draft.spec.layers.len(), mode = ?args.speculative_mode, "DFlash speculative decoding on");
            }
            Box::new(model)
        }
        Device::Cuda => {
            let gpu = peregrine_cuda::probe(0)?;
            tracing::info!(gpu = %gpu.name, capability = ?gpu.capability, "CUDA device");
            peregrine_cuda::CudaModel::expect_kv_dtype(kv_cache_dtype.unwrap_or_else(|| peregrine_cuda::CudaModel::auto_kv_dtype_for(&files.spec)));
            // Random weights are made on the GPU, in the formats the config names.
            let mut model = match args.load_format {
                LoadFormat::Auto => peregrine_cuda::CudaModel::load(gpu, &files.spec, files.weights.as_ref()),
                LoadFormat::Dummy => peregrine_cuda::CudaModel::synthetic(gpu, &files.spec, DUMMY_SEED),
            }
            .context("loading weights onto the GPU")?;
            if let Some(dir) = &drafter_dir {
                let draft = peregrine_model::dflash::open_drafter(dir).with_context(|| format!("cannot open the drafter in {}", dir.display()))?;
                model.attach_drafter(&draft).with_context(|| format!("drafter {} does not fit this model", dir.display()))?;
                tracing::info!(drafter = %dir.display(), layers = draft.spec.layers.len(), mode = ?args.speculative_mode, "DFlash speculative decoding on (cuda)");
            }
            kv_cache_dtype = kv_cache_dtype.or(Some(model.auto_kv_dtype()));
            if args.enforce_eager {
                model.set_cuda_graphs(false);
                tracing::info!("--enforce-eager: decode steps run without CUDA graphs");
            }
            Box::new(model)
        }
    };
    if let Some(p) = spinner {
        p.finish_and_clear();
    }
    if let Some(block) = speculative_block_size.map(usize::from).or(backend.draft_spec().map(|d| d.block_size)) {
        if (args.max_num_batched_tokens as usize) < block {
            tracing::warn!(block, max_num_batched_tokens = args.max_num_batched_tokens, "--max-num-batched-tokens is below the speculative block: a step has no room for a block of drafts, so none will be verified");
        }
    }
    tracing::info!(model = %default_name, params = files.spec.num_parameters(), layers = files.spec.num_layers(), secs = t0.elapsed().as_secs_f32(), backend = backend.name(), "weights loaded");
    if args.load_format == LoadFormat::Dummy {
        tracing::warn!("random weights (--load-format dummy): for load tests and benchmarks; the text means nothing");
    }
    if kv_cache_dtype == Some(KvDtype::Fp8E4m3) {
        tracing::warn!("FP8 K/V pools (--kv-cache-dtype fp8): K and V rounded to e4m3 with a scale of 1 (the checkpoint gives none), values past +-448 saturated; expect some loss of accuracy");
    }
    let max_model_len = args.max_model_len.map_or(files.spec.max_position_embeddings.min(8192), |n| n as usize);
    if max_model_len > files.spec.max_position_embeddings {
        bail!("--max-model-len {max_model_len} exceeds the model's max_position_embeddings {}", files.spec.max_position_embeddings);
    }
    let config = EngineConfig {
        max_num_seqs: args.max_num_seqs as usize,
        max_num_batched_tokens: args.max_num_batched_tokens as usize,
        max_model_len,
        kv_cache_memory_bytes: args.kv_cache_memory.unwrap_or(DEFAULT_KV_CACHE_MEMORY),
        gpu_memory_utilization: gpu_memory_utilization(args.device, args.kv_cache_memory, args.gpu_memory_utilization),
        max_waiting: args.max_waiting as usize,
        speculative_block_size: speculative_block_size.map(usize::from),
        enable_prefix_caching: args.prefix_caching(),
        model_name: Some(args.served_model_name.clone().unwrap_or_else(|| default_name.clone())),
        overlap_steps: !args.no_overlap_steps,
        speculation: args.speculative_mode,
        kv_cache_dtype,
        ..EngineConfig::default()
    };
    let sampling_defaults = match &args.generation_config {
        // Only a model directory's own file (a config or weights file is read alone).
        GenerationConfig::Auto if !std::path::Path::new(&path).is_file() => sampling_defaults(&files.dir.join("generation_config.json"), files.spec.vocab_size)?,
        GenerationConfig::Folder(dir) => sampling_defaults(&dir.join("generation_config.json"), files.spec.vocab_size)?,
        _ => SamplingDefaults::default(),
    };
    // (The engine names its own fields: kv_cache_memory_bytes is --kv-cache-memory, and so on.)
    let engine = start_engine(backend, Arc::new(tokenizer), config).context("starting the engine (--kv-cache-memory, --gpu-memory-utilization, --max-num-seqs, --max-model-len, --max-num-batched-tokens)")?;
    Ok(Ready {
        engine,
        template,
        model_name: args.served_model_name.clone().unwrap_or(default_name),
        created: unix_now(),
        sampling_defaults,
    })
}

/// The sampling defaults of a model's generation_config.json (none without one), logged.
fn sampling_defaults(path: &std::path::Path, vocab_size: usize) -> anyhow::Result<SamplingDefaults> {
    if !path.is_file() {
        return Ok(SamplingDefaults::default());
    }
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let value: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))?;
    let (defaults, warnings) = SamplingDefaults::from_generation_config(&value, vocab_size);
    for w in warnings {
        tracing::warn!("{w}");
    }
    if !defaults.is_empty() {
        tracing::info!(defaults = %defaults.describe(), file = %path.display(), "sampling defaults from generation_config.json (requests override them; --generation-config none ignores them)");
    }
    Ok(defaults)
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
}

/// Resolves once the server may stop: after the first signal, at once with `drain_for` zero,
/// else once every request the engine holds has finished, `drain_for` has passed or a second
/// signal came; the engine is then shut down (what it still holds is aborted: streams end with
/// `abort`, others get a 503). Until then generation requests get a 503 and /health fails.
async fn stop_serving(state: AppState, drain_for: Duration, stopped: tokio::sync::oneshot::Sender<()>) {
    shutdown_signal().await;
    let Some(engine) = state.ready.get().map(|r| r.engine.clone()) else {
        tracing::info!("shutting down before the model was loaded");
        let _ = stopped.send(());
        return;
    };
    if !drain_for.is_zero() {
        state.start_draining();
        tracing::info!(unfinished = engine.unfinished(), timeout_s = drain_for.as_secs(), "shutting down: refusing new requests, letting running ones finish (a second signal aborts them)");
        let drained = async {
            // The requests on their way in first, then the engine's: one counted by neither
            // had seen the drain and was refused (`AppState::start_submit`).
            while state.submitting() > 0 || engine.unfinished() > 0 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        tokio::select! {
            _ = drained => tracing::info!("every request finished"),
            _ = tokio::time::sleep(drain_for) => tracing::warn!(unfinished = engine.unfinished(), "--shutdown-timeout passed: aborting the requests still running"),
            _ = shutdown_signal() => tracing::warn!(unfinished = engine.unfinished(), "a second signal: aborting the requests still running"),
        }
    } else {
        tracing::info!("shutting down: aborting in-flight requests (streams end with finish_reason `abort`, others get 503; --shutdown-timeout lets them finish)");
    }
    let _ = tokio::task::spawn_blocking(move || engine.shutdown()).await;
    let _ = stopped.send(());
}

/// How long the connections may take to finish their responses once the engine has stopped
/// (the last events of streams, the errors of aborted requests): a client that stops reading,
/// or a body that never arrives whole, must not keep the process up.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// Resolves `CLOSE_GRACE` after the engine stopped (`stopped`), or at a further signal then;
/// never if the server ended first.
async fn closing_deadline(stopped: tokio::sync::oneshot::Receiver<()>) {
    if stopped.await.is_err() {
        return std::future::pending().await;
    }
    tokio::select! {
        _ = tokio::time::sleep(CLOSE_GRACE) => tracing::warn!("connections still open {}s after the engine stopped: closing them", CLOSE_GRACE.as_secs()),
        _ = shutdown_signal() => tracing::warn!("another signal: closing the connections still open"),
    }
}

/// The listener with TCP_NODELAY on every accepted connection, so each response write goes out
/// at once. With Nagle's algorithm on, an SSE event written while the previous segment waited for
/// the client's delayed ACK (up to 40 ms on Linux) was held back: on a kept-alive connection the
/// first streamed token arrived ~17 ms late (a Flash-shaped model on an H200) to ~31 ms (the tiny
/// model on the CPU) and later ones in bursts (benches/results/2026-11-30-http-nodelay.md).
fn without_nagle(listener: tokio::net::TcpListener) -> impl axum::serve::Listener<Io = tokio::net::TcpStream, Addr = std::net::SocketAddr> {
    listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!("cannot set TCP_NODELAY on a connection: {e}");
        }
    })
}

pub async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let addr = format!("{}:{}", args.host, args.port);
    let listener = tokio::net::TcpListener::bind(&addr).await.with_context(|| format!("cannot listen on {addr}"))?;
    // The address bound, not the one asked for (`--port 0` takes a free port).
    let addr = listener.local_addr().map_or(addr, |a| a.to_string());
    let listener = without_nagle(listener);
    let state = AppState::new(Settings {
        api_key: args.api_key.clone(),
        always_include_usage: args.always_include_usage,
        parse_tool_calls: args.tool_call_parser == ToolCallParserKind::Auto,
        parse_reasoning: args.reasoning_parser == ReasoningParserKind::Auto,
        access_log: !args.disable_access_log,
        seed: args.seed,
    });
    tracing::info!(%addr, "listening (503 until the model is loaded)");
    let app = crate::routes::router(state.clone(), args.max_body_bytes).layer(crate::routes::cors(&args.allowed_origins)?);
    let (shutdown_state, drain_for) = (state.clone(), Duration::from_secs(args.shutdown_timeout.into()));
    let (stopped, stopped_rx) = tokio::sync::oneshot::channel();
    let mut server = tokio::spawn(async move { axum::serve(listener, app).with_graceful_shutdown(stop_serving(shutdown_state, drain_for, stopped)).await });
    let deadline = closing_deadline(stopped_rx);
    tokio::pin!(deadline);
    // A signal while the model loads stops the server at once, not after the load (minutes for
    // a large model: a pod being replaced would wait for it, then be killed).
    let loading = tokio::task::spawn_blocking(move || load(&args));
    let ready = tokio::select! {
        ready = loading => ready??,
        stopped = &mut server => {
            stopped??;
            return Ok(());
        }
        _ = &mut deadline => return Ok(()),
    };
    tracing::info!(model = %ready.model_name, "ready");
    let _ = state.ready.set(ready);
    tokio::select! {
        done = server => done??,
        _ = &mut deadline => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn accepted_connections_send_without_nagle() {
        use axum::serve::Listener;
        let bound = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = bound.local_addr().unwrap();
        let mut listener = without_nagle(bound);
        let client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (served, _) = listener.accept().await;
        // (A plain accepted socket has Nagle on, so this is what the tap changes.)
        assert!(!client.nodelay().unwrap(), "a plain socket starts with Nagle's algorithm on");
        assert!(served.nodelay().unwrap(), "the server's side of the connection sends at once");
    }

    #[test]
    fn the_gpu_sizes_its_kv_cache_by_fraction_unless_given_bytes() {
        assert_eq!(gpu_memory_utilization(Device::Cuda, None, None), Some(DEFAULT_GPU_MEMORY_UTILIZATION));
        assert_eq!(gpu_memory_utilization(Device::Cuda, None, Some(0.5)), Some(0.5));
        assert_eq!(gpu_memory_utilization(Device::Cuda, Some(1 << 30), None), None);
        assert_eq!(gpu_memory_utilization(Device::Cpu, None, None), None);
        assert_eq!((parse_fraction("0.9"), parse_fraction("1")), (Ok(0.9), Ok(1.0)));
        for bad in ["0", "1.01", "-1", "nine"] {
            assert!(parse_fraction(bad).is_err(), "{bad}");
        }
    }
    #[test]
    fn kv_cache_dtype_takes_auto_or_a_type_and_names_the_choices_otherwise() {
        assert_eq!(parse_kv_dtype("auto"), Ok(KvCacheDtype::Auto));
        assert_eq!(parse_kv_dtype("bfloat16"), Ok(KvCacheDtype::Given(KvDtype::Bf16)));
        assert_eq!(parse_kv_dtype("float32"), Ok(KvCacheDtype::Given(KvDtype::F32)));
        assert_eq!(parse_kv_dtype("fp8"), Ok(KvCacheDtype::Given(KvDtype::Fp8E4m3)));
        assert_eq!(parse_kv_dtype("FP8_E4M3"), Ok(KvCacheDtype::Given(KvDtype::Fp8E4m3)));
        let err = parse_kv_dtype("int8").unwrap_err();
        assert!(err.contains("auto, float32, bfloat16 or fp8"), "{err}");
        assert!(parse_kv_dtype("fp8_e5m2").unwrap_err().contains("not supported"));
        let kv = |extra: &[&str]| match Cli::try_parse_from([&["peregrine", "serve"], extra].concat()) {
            Ok(Cli { command: Command::Serve(a) }) => Ok(a.kv_cache_dtype),
            Ok(other) => Err(format!("{other:?}")),
            Err(e) => Err(e.to_string()),
        };
        assert_eq!(kv(&[]), Ok(KvCacheDtype::Auto));
        assert_eq!(kv(&["--kv-cache-dtype", "bf16"]), Ok(KvCacheDtype::Given(KvDtype::Bf16)));
        assert!(kv(&["--kv-cache-dtype", "int4"]).unwrap_err().contains("int4"));
    }
    /// Sizes no run could use are refused while parsing, naming the flag (they used to fail after
    /// the weights loaded, or overflow); the defaults and real values parse.
    #[test]
    fn sizes_no_run_could_use_are_refused_naming_the_flag() {
        let serve = |extra: &[&str]| Cli::try_parse_from([&["peregrine", "serve"], extra].concat()).map(|_| ()).map_err(|e| e.to_string());
        for (flag, bad) in [("--max-num-seqs", "0"), ("--max-num-seqs", "18446744073709551615"), ("--max-num-batched-tokens", "0"), ("--max-model-len", "1"), ("--max-waiting", "0"), ("--tp", "0")] {
            let err = serve(&[flag, bad]).unwrap_err();
            assert!(err.contains(flag), "{flag} {bad}: {err}");
        }
        assert!(serve(&[]).is_ok());
        assert!(serve(&["--max-num-seqs", "256", "--max-num-batched-tokens", "8192", "--max-model-len", "2", "--max-waiting", "1"]).is_ok());
    }

    /// Switches given by environment take the usual words for on and off (`1`, `yes`, `0`, ...),
    /// not only `true` / `false`; the flag alone still turns them on.
    #[test]
    fn switches_in_the_environment_take_one_and_zero() {
        let overlap_off = || match Cli::try_parse_from(["peregrine", "serve"]) {
            Ok(Cli { command: Command::Serve(a) }) => Ok(a.no_overlap_steps),
            Ok(other) => Err(format!("{other:?}")),
            Err(e) => Err(e.to_string()),
        };
        // (No other test reads this variable.)
        for (value, want) in [("1", true), ("yes", true), ("true", true), ("0", false), ("off", false)] {
            std::env::set_var("PEREGRINE_NO_OVERLAP_STEPS", value);
            assert_eq!(overlap_off(), Ok(want), "{value}");
        }
        std::env::remove_var("PEREGRINE_NO_OVERLAP_STEPS");
        assert_eq!(overlap_off(), Ok(false));
        assert!(matches!(Cli::try_parse_from(["peregrine", "serve", "--no-overlap-steps"]), Ok(Cli { command: Command::Serve(ServeArgs { no_overlap_steps: true, .. }) })));
    }

    fn serve_args(extra: &[&str]) -> Result<ServeArgs, String> {
        let argv = [&["peregrine", "serve"], extra].concat().into_iter().map(std::ffi::OsString::from);
        match Cli::try_parse_from(vllm_spellings(argv)) {
            Ok(Cli { command: Command::Serve(a) }) => Ok(a),
            Ok(other) => Err(format!("{other:?}")),
            Err(e) => Err(e.to_string()),
        }
    }

    /// `-tp` and underscores in long flags are vLLM's spellings; values, positionals and what
    /// follows `--` keep theirs.
    #[test]
    fn vllm_spellings_become_peregrines() {
        let spelled = |args: &[&str]| vllm_spellings(args.iter().map(std::ffi::OsString::from)).into_iter().map(|a| a.into_string().unwrap()).collect::<Vec<_>>();
        assert_eq!(
            spelled(&["peregrine", "serve", "/m/my_model", "-tp", "2", "-tp=4", "--max_model_len=64", "--served_model_name", "my_name", "--", "--x_y"]),
            ["peregrine", "serve", "/m/my_model", "--tp", "2", "--tp=4", "--max-model-len=64", "--served-model-name", "my_name", "--", "--x_y"]
        );
        assert_eq!(spelled(&["peregrine", "serve", "-t", "--chat-template={{ a_b }}"]), ["peregrine", "serve", "-t", "--chat-template={{ a_b }}"]);
    }

    /// A vLLM `serve` command line for a MiMo model parses unchanged, each flag meaning what it
    /// means there.
    #[test]
    fn a_vllm_command_line_parses() {
        let spec = r#"{"method": "dflash", "model": "/drafts/d", "num_speculative_tokens": 7}"#;
        let a = serve_args(&[
            "/models/mimo", "--tensor-parallel-size", "1", "--trust-remote-code", "--enable-auto-tool-choice", "--tool-call-parser", "qwen3_coder",
            "--reasoning-parser", "qwen3", "--generation-config", "vllm", "--max_num_seqs", "8", "--dtype", "auto", "--disable-log-requests",
            "--disable-uvicorn-access-log", "--enable-prefix-caching", "--speculative-config", spec, "--seed", "42", "--enforce-eager",
            "--enable-chunked-prefill",
        ])
        .unwrap();
        assert_eq!((a.seed, a.enforce_eager, a.enable_chunked_prefill), (Some(42), true, true));
        assert_eq!(serve_args(&[]).unwrap().seed, None);
        assert_eq!((a.model.as_deref(), a.tp, a.max_num_seqs), (Some("/models/mimo"), 1, 8));
        assert_eq!((a.tool_call_parser, a.reasoning_parser, &a.generation_config), (ToolCallParserKind::Auto, ReasoningParserKind::Auto, &GenerationConfig::None));
        assert!(a.trust_remote_code && a.enable_auto_tool_choice && a.disable_log_requests && a.disable_access_log && a.prefix_caching());
        assert_eq!(a.speculative_config, Some(SpeculativeConfig { model: Some("/drafts/d".into()), block_size: Some(8) }));
        assert_eq!(serve_args(&["-tp", "2"]).unwrap().tp, 2);
        assert_eq!(serve_args(&["--tool-call-parser", "hermes"]).unwrap().tool_call_parser, ToolCallParserKind::Auto);
        assert_eq!(serve_args(&["--tool-call-parser", "none"]).unwrap().tool_call_parser, ToolCallParserKind::None);
    }

    /// Prefix caching is on unless turned off (by flag or variable); vLLM's
    /// `--enable-prefix-caching` keeps it on, beside either.
    #[test]
    fn prefix_caching_is_on_unless_turned_off() {
        let on = |extra: &[&str]| serve_args(extra).map(|a| a.prefix_caching());
        assert_eq!(on(&[]), Ok(true));
        assert_eq!(on(&["--no-enable-prefix-caching"]), Ok(false));
        assert_eq!(on(&["--no-enable-prefix-caching", "--enable-prefix-caching"]), Ok(true));
        assert_eq!(on(&["--enable-prefix-caching", "--no-enable-prefix-caching"]), Ok(true));
        // (No other test reads this variable.)
        std::env::set_var("PEREGRINE_NO_ENABLE_PREFIX_CACHING", "1");
        let (off_by_env, on_by_flag) = (on(&[]), on(&["--enable-prefix-caching"]));
        std::env::remove_var("PEREGRINE_NO_ENABLE_PREFIX_CACHING");
        assert_eq!((off_by_env, on_by_flag), (Ok(false), Ok(true)));
    }

    /// vLLM's flags this server cannot honour are refused while parsing, saying why: a dtype
    /// other than auto, a speculative method other than DFlash, keys it does not take, a draft
    /// count past a block of 16, and the JSON form beside the flags it stands for.
    #[test]
    fn vllm_flags_that_cannot_be_honoured_are_refused() {
        for (args, words) in [
            (&["--dtype", "bfloat16"][..], &["bfloat16", "auto"][..]),
            (&["--speculative-config", r#"{"method": "eagle3", "model": "/d"}"#], &["eagle3", "dflash"]),
            (&["--speculative-config", r#"{"num_speculative_tokens": 16}"#], &["num_speculative_tokens", "1 to 15"]),
            (&["--speculative-config", r#"{"num_speculative_tokens": 0}"#], &["num_speculative_tokens"]),
            (&["--speculative-config", r#"{"draft_tensor_parallel_size": 1}"#], &["draft_tensor_parallel_size", "accepted: method, model, num_speculative_tokens"]),
            (&["--speculative-config", r#"{"model": ""}"#], &["drafter's directory"]),
            (&["--speculative-config", "[7]"], &["JSON object"]),
            (&["--speculative-config", r#"{"model": "none"}"#], &["leave --speculative-config out"]),
            (&["--generation-config", "/no/such/dir"], &["/no/such/dir", "generation_config.json"]),
            (&["--tool-call-parser", "mistral"], &["mistral"]),
        ] {
            let err = serve_args(args).map(|_| ()).unwrap_err();
            assert!(words.iter().all(|w| err.contains(w)), "{args:?}: {err}");
        }
        assert_eq!(serve_args(&["--speculative-config", "{}"]).unwrap().speculative_config, Some(SpeculativeConfig { model: None, block_size: None }));
        // The JSON form beside the flags it stands for (or their variables) is refused.
        for extra in [&["--speculative-model", "/d"][..], &["--speculative-block-size", "4"]] {
            let a = serve_args(&[&["--speculative-config", "{}"][..], extra].concat()).unwrap();
            let err = a.speculation().unwrap_err().to_string();
            assert!(err.contains("give one form"), "{err}");
        }
        let a = serve_args(&["--speculative-config", r#"{"model": "/d", "num_speculative_tokens": 3}"#]).unwrap();
        assert_eq!(a.speculation().unwrap(), (Some("/d"), Some(4)));
        let a = serve_args(&["--speculative-model", "/e", "--speculative-block-size", "5"]).unwrap();
        assert_eq!(a.speculation().unwrap(), (Some("/e"), Some(5)));
    }

    /// `--generation-config DIR` reads that directory's file; `none` and `vllm` read none.
    #[test]
    fn generation_config_takes_a_directory() {
        let dir = std::env::temp_dir().join(format!("peregrine-gc-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("generation_config.json"), "{}").unwrap();
        let gc = |v: &str| serve_args(&["--generation-config", v]).map(|a| a.generation_config);
        assert_eq!(gc(dir.to_str().unwrap()), Ok(GenerationConfig::Folder(dir.clone())));
        assert_eq!((gc("none"), gc("vllm"), gc("auto")), (Ok(GenerationConfig::None), Ok(GenerationConfig::None), Ok(GenerationConfig::Auto)));
        assert_eq!(serve_args(&[]).unwrap().generation_config, GenerationConfig::Auto);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// The KV cache counts against the memory the CPU has, with the f32 weights.
    #[test]
    fn a_kv_cache_larger_than_memory_is_refused() {
        let gb = 1u64 << 30;
        assert!(check_cpu_memory(1000, gb / 2, Some(23 * gb)).is_ok());
        let err = check_cpu_memory(1000, 30 * gb, Some(23 * gb)).unwrap_err().to_string();
        assert!(err.contains("--kv-cache-memory"), "{err}");
        let err = check_cpu_memory(3 * gb, gb, Some(11 * gb)).unwrap_err().to_string();
        assert!(err.contains("f32"), "the weights alone: {err}");
        assert!(check_cpu_memory(1000, 1 << 50, None).is_ok(), "no MemAvailable: nothing to check against");
    }

    #[test]
    fn compile_kernels_takes_the_architectures_serve_uses() {
        let arch = |extra: &[&str]| match Cli::try_parse_from([&["peregrine", "compile-kernels"], extra].concat()) {
            Ok(Cli { command: Command::CompileKernels(a) }) => Ok(a.arch),
            Ok(other) => Err(format!("{other:?}")),
            Err(e) => Err(e.to_string()),
        };
        assert_eq!(arch(&[]), Ok("sm_90a".to_string()));
        assert_eq!(arch(&["--arch", "sm_100a"]), Ok("sm_100a".to_string()));
        for refused in ["sm_91", "sm_80"] {
            let err = arch(&["--arch", refused]).unwrap_err();
            assert!(err.contains(refused) && err.contains("sm_90a"), "{err}");
        }
        assert!(Cli::try_parse_from(["peregrine", "compile-kernels", "--device", "cuda"]).is_err(), "serve's flags are not compile-kernels'");
        // Every supported capability's architecture is one the flag takes.
        for cap in [(9, 0), (10, 0), (10, 3), (12, 0)] {
            assert!(peregrine_cuda::device::NVRTC_ARCHES.contains(&peregrine_cuda::device::nvrtc_arch(cap)), "{cap:?}");
        }
    }
}
