//! HF `config.json` -> [`ModelSpec`].
//!
//! Supported `model_type`s:
//! - `mimo_v2_flash` (HF transformers' native class; every field and default of
//!   `MiMoV2FlashConfig`);
//! - `mimo_v2` (MiMo-V2.5-Pro remote code: `hybrid_layer_pattern`, `swa_*`, `moe_layer_freq`,
//!   fused or split qkv);
//! - dense Llama-style stacks (`llama`, `mistral`, `qwen2`, `qwen3`).
//!
//! Every error names the offending field; nothing here panics on user data.

use std::path::Path;

use peregrine_core::spec::RopeStyle;
use peregrine_core::{
    AttentionKind, AttentionSpec, DType, Error, LayerSpec, MlpSpec, ModelSpec, MoeSpec, QkvLayout,
    QuantFormat, Result, RopeSpec, RouterScoring,
};
use peregrine_core::spec::QuantSpec;
use peregrine_core::{DraftLayerSpec, DraftSpec};
use serde_json::{Map, Value};

/// Reads `config.json` (and `generation_config.json` when present) from a model directory.
pub fn load_spec(dir: &Path) -> Result<ModelSpec> {
    load_spec_with(dir, None)
}

/// The config fields that hold one entry per layer.
const PER_LAYER_FIELDS: [&str; 4] = ["layer_types", "mlp_layer_types", "hybrid_layer_pattern", "moe_layer_freq"];

/// `load_spec` with `overrides` merged into config.json first (each top-level field replaced,
/// as vLLM's `--hf-overrides` does). A smaller `num_hidden_layers` keeps the first layers: the
/// per-layer lists it does not override are cut to that length, so a model can be cut to what
/// one GPU holds with that one field.
pub fn load_spec_with(dir: &Path, overrides: Option<&serde_json::Map<String, Value>>) -> Result<ModelSpec> {
    let gen_path = dir.join("generation_config.json");
    load_spec_file(&dir.join("config.json"), Some(&gen_path).filter(|p| p.is_file()).map(|p| p.as_path()), overrides)
}

/// A spec from a config file of any name (and a generation_config.json), with `overrides` as
/// in `load_spec_with`.
pub fn load_spec_file(path: &Path, generation: Option<&Path>, overrides: Option<&serde_json::Map<String, Value>>) -> Result<ModelSpec> {
    let mut config = read_json(path)?;
    if let Some(o) = overrides {
        apply_overrides(&mut config, o).map_err(|e| Error::file(path, e))?;
    }
    let generation = generation.map(read_json).transpose()?;
    parse_config(&config, generation.as_ref())
}

/// Merges `overrides` into `config` (see `load_spec_with`).
fn apply_overrides(config: &mut Value, overrides: &serde_json::Map<String, Value>) -> std::result::Result<(), String> {
    let Value::Object(fields) = config else {
        return Err("config.json is not a JSON object".into());
    };
    if let Some(n) = overrides.get("num_hidden_layers") {
        let n = n.as_u64().ok_or_else(|| format!("the override of num_hidden_layers must be a non-negative integer, not {n}"))? as usize;
        for f in PER_LAYER_FIELDS {
            if let (false, Some(Value::Array(list))) = (overrides.contains_key(f), fields.get_mut(f)) {
                list.truncate(n);
            }
        }
    }
    for (k, v) in overrides {
        // A key config.json does not have is most often a typo (`num_hidden_layer`): said, since
        // the run would otherwise go on as if it had not been given.
        match fields.insert(k.clone(), v.clone()) {
            Some(old) => tracing::info!("--hf-overrides: {k} = {v} (config.json: {old})"),
            None => tracing::warn!("--hf-overrides: {k} = {v} is not a field of config.json (added; a typo would be ignored by the model)"),
        }
    }
    Ok(())
}

pub(crate) fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::file(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::file(path, format!("invalid JSON: {e}")))
}

/// Parses a config.json value (plus an optional generation_config.json value).
pub fn parse_config(config: &Value, generation_config: Option<&Value>) -> Result<ModelSpec> {
    let c = Fields::new(config, "")?;
    let model_type = c.req_str("model_type")?;
    let mut spec = match model_type.as_str() {
        "mimo_v2_flash" => parse_mimo_v2_flash(&c)?,
        "mimo_v2" => parse_mimo_v2(&c)?,
        "llama" | "mistral" | "qwen2" | "qwen3" => parse_dense(&c, &model_type)?,
        other => {
            return Err(Error::config(
                "model_type",
                format!("unsupported model type `{other}` (supported: mimo_v2_flash, mimo_v2, llama, mistral, qwen2, qwen3)"),
            ))
        }
    };
    spec.quant = parse_quant(config.get("quantization_config"))?;
    if let Some(g) = generation_config {
        let g = Fields::new(g, "generation_config.")?;
        for id in g.opt_ids("eos_token_id")? {
            if !spec.eos_token_ids.contains(&id) {
                spec.eos_token_ids.push(id);
            }
        }
        if spec.bos_token_id.is_none() {
            spec.bos_token_id = g.opt_ids("bos_token_id")?.first().copied();
        }
    }
    validate(&spec)?;
    Ok(spec)
}

/// Largest integer accepted for any size or count (2^32).
const MAX_SIZE: u64 = 1 << 32;
/// Largest `num_hidden_layers` accepted: the spec allocates one entry per layer.
pub(crate) const MAX_LAYERS: usize = 1 << 16;
/// Elements of one weight (a stack of experts counts as one) at most: 2^40, ~100x the largest
/// real one (MiMo-V2.5-Pro's 384 experts of 2048 x 6144 are 4.8e9).
const MAX_MATRIX_ELEMENTS: usize = 1 << 40;

/// Typed access to a JSON object, with errors naming the field.
pub(crate) struct Fields<'a> {
    map: &'a Map<String, Value>,
    prefix: &'a str,
}

impl<'a> Fields<'a> {
    pub(crate) fn new(v: &'a Value, prefix: &'a str) -> Result<Self> {
        let map = v
            .as_object()
            .ok_or_else(|| Error::config(prefix.trim_end_matches('.'), "expected a JSON object"))?;
        Ok(Fields { map, prefix })
    }
    fn name(&self, key: &str) -> String {
        format!("{}{}", self.prefix, key)
    }
    /// The value, treating JSON null as absent.
    pub(crate) fn get(&self, key: &str) -> Option<&'a Value> {
        self.map.get(key).filter(|v| !v.is_null())
    }
    pub(crate) fn req_str(&self, key: &str) -> Result<String> {
        match self.get(key) {
            Some(Value::String(s)) => Ok(s.clone()),
            Some(_) => Err(Error::config(self.name(key), "expected a string")),
            None => Err(Error::config(self.name(key), "missing")),
        }
    }
    pub(crate) fn opt_str(&self, key: &str) -> Result<Option<String>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(Error::config(self.name(key), "expected a string")),
        }
    }
    pub(crate) fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => match v.as_u64() {
                // Bounded so that a product of two sizes cannot overflow (real sizes are far
                // below); `validate` bounds the weights' products of three.
                Some(n) if n <= MAX_SIZE => Ok(Some(n as usize)),
                Some(n) => Err(Error::config(self.name(key), format!("{n} is too large (at most {MAX_SIZE})"))),
                None => match v.as_f64() {
                    Some(f) if f >= 0.0 && f.fract() == 0.0 && f <= MAX_SIZE as f64 => Ok(Some(f as usize)),
                    _ => Err(Error::config(self.name(key), format!("expected a non-negative integer, got {v}"))),
                },
            },
        }
    }
    pub(crate) fn usize_or(&self, key: &str, default: usize) -> Result<usize> {
        Ok(self.opt_usize(key)?.unwrap_or(default))
    }
    pub(crate) fn req_usize(&self, key: &str) -> Result<usize> {
        self.opt_usize(key)?.ok_or_else(|| Error::config(self.name(key), "missing"))
    }
    pub(crate) fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .filter(|f| f.is_finite())
                .map(Some)
                .ok_or_else(|| Error::config(self.name(key), format!("expected a number, got {v}"))),
        }
    }
    pub(crate) fn f64_or(&self, key: &str, default: f64) -> Result<f64> {
        Ok(self.opt_f64(key)?.unwrap_or(default))
    }
    pub(crate) fn bool_or(&self, key: &str, default: bool) -> Result<bool> {
        match self.get(key) {
            None => Ok(default),
            Some(Value::Bool(b)) => Ok(*b),
            Some(_) => Err(Error::config(self.name(key), "expected true or false")),
        }
    }
    /// A token id given as an integer or a list of integers.
    pub(crate) fn opt_ids(&self, key: &str) -> Result<Vec<u32>> {
        let bad = || Error::config(self.name(key), "expected a token id or a list of token ids");
        let one = |v: &Value| v.as_u64().and_then(|n| u32::try_from(n).ok()).ok_or_else(bad);
        match self.get(key) {
            None => Ok(Vec::new()),
            Some(Value::Array(items)) => items.iter().map(one).collect(),
            Some(v) => Ok(vec![one(v)?]),
        }
    }
    fn opt_list(&self, key: &str) -> Result<Option<&'a Vec<Value>>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Array(a)) => Ok(Some(a)),
            Some(_) => Err(Error::config(self.name(key), "expected a list")),
        }
    }
    fn opt_str_list(&self, key: &str) -> Result<Option<Vec<String>>> {
        self.opt_list(key)?
            .map(|a| {
                a.iter()
                    .map(|v| {
                        v.as_str().map(str::to_owned).ok_or_else(|| {
                            Error::config(self.name(key), "expected a list of strings")
                        })
                    })
                    .collect()
            })
            .transpose()
    }
    fn opt_int_list(&self, key: &str) -> Result<Option<Vec<u64>>> {
        self.opt_list(key)?
            .map(|a| {
                a.iter()
                    .map(|v| {
                        v.as_u64().ok_or_else(|| {
                            Error::config(self.name(key), "expected a list of integers")
                        })
                    })
                    .collect()
            })
            .transpose()
    }
    fn sub(&self, key: &str) -> Result<Option<Value>> {
        Ok(self.get(key).cloned())
    }
}

/// Python's `int(head_dim * factor)`, in f64 like Python; a negative factor is refused (it
/// would turn RoPE off where transformers fails).
fn rotary_dim(head_dim: usize, factor: f64) -> Result<usize> {
    if factor < 0.0 {
        return Err(Error::config("partial_rotary_factor", format!("must be between 0 and 1, got {factor}")));
    }
    Ok((head_dim as f64 * factor).floor() as usize)
}

struct Common {
    vocab_size: usize,
    hidden_size: usize,
    num_layers: usize,
    max_pos: usize,
    tie: bool,
    bos: Option<u32>,
    eos: Vec<u32>,
    pad: Option<u32>,
}

/// Defaults of vocab_size, hidden_size and num_hidden_layers, where the HF class has them.
type SizeDefaults = Option<(usize, usize, usize)>;

fn common(c: &Fields, sizes: SizeDefaults, bos_default: Option<u32>, max_pos_default: usize) -> Result<Common> {
    let size = |key: &str, d: Option<usize>| match d {
        Some(d) => c.usize_or(key, d),
        None => c.req_usize(key),
    };
    let num_layers = size("num_hidden_layers", sizes.map(|s| s.2))?;
    if num_layers > MAX_LAYERS {
        return Err(Error::config("num_hidden_layers", format!("{num_layers} is too large")));
    }
    let bos = match c.get("bos_token_id") {
        None if !c.map.contains_key("bos_token_id") => bos_default,
        _ => c.opt_ids("bos_token_id")?.first().copied(),
    };
    Ok(Common {
        vocab_size: size("vocab_size", sizes.map(|s| s.0))?,
        hidden_size: size("hidden_size", sizes.map(|s| s.1))?,
        num_layers,
        max_pos: c.usize_or("max_position_embeddings", max_pos_default)?,
        tie: c.bool_or("tie_word_embeddings", false)?,
        bos,
        eos: c.opt_ids("eos_token_id")?,
        pad: c.opt_ids("pad_token_id")?.first().copied(),
    })
}

fn spec_from(com: Common, model_type: &str, eps: f64, layers: Vec<LayerSpec>) -> ModelSpec {
    ModelSpec {
        model_type: model_type.to_owned(),
        vocab_size: com.vocab_size,
        hidden_size: com.hidden_size,
        rms_norm_eps: eps as f32,
        max_position_embeddings: com.max_pos,
        tie_word_embeddings: com.tie,
        bos_token_id: com.bos,
        eos_token_ids: com.eos,
        pad_token_id: com.pad,
        layers,
        quant: QuantSpec::unquantized(),
    }
}

fn parse_moe(c: &Fields, defaults: (usize, usize, usize)) -> Result<MoeSpec> {
    let scoring = match c.opt_str("scoring_func")?.as_deref() {
        None | Some("sigmoid") => RouterScoring::Sigmoid,
        Some("softmax") => RouterScoring::Softmax,
        Some(o) => return Err(Error::config("scoring_func", format!("unsupported `{o}` (sigmoid, softmax)"))),
    };
    let correction_bias = match c.opt_str("topk_method")?.as_deref() {
        None => scoring == RouterScoring::Sigmoid,
        Some("noaux_tc") => true,
        Some("greedy") | Some("group_limited_greedy") => false,
        Some(o) => return Err(Error::config("topk_method", format!("unsupported `{o}`"))),
    };
    Ok(MoeSpec {
        num_experts: c.usize_or("n_routed_experts", defaults.0)?,
        top_k: c.usize_or("num_experts_per_tok", defaults.1)?,
        intermediate_size: c.usize_or("moe_intermediate_size", defaults.2)?,
        scoring,
        correction_bias,
        n_group: c.usize_or("n_group", 1)?,
        topk_group: c.usize_or("topk_group", 1)?,
        norm_topk_prob: c.bool_or("norm_topk_prob", true)?,
        // The hub stores null, which HF reads as 1.0.
        routed_scaling_factor: c.f64_or("routed_scaling_factor", 1.0)? as f32,
    })
}

fn parse_mimo_v2_flash(c: &Fields) -> Result<ModelSpec> {
    let com = common(c, Some((152576, 4096, 48)), Some(1), 131072)?;
    let n = com.num_layers;
    let heads = c.usize_or("num_attention_heads", 64)?;
    let kv_heads = c.usize_or("num_key_value_heads", 4)?;
    let head_dim = c.usize_or("head_dim", 192)?;
    let v_head_dim = c.usize_or("v_head_dim", 128)?;
    let window = c.usize_or("sliding_window", 128)?;
    let value_scale = c.f64_or("attention_value_scale", 1.0)?;
    // HF: `attention_value_scale` defaults to 0.707 when the key is absent, 1.0 when null.
    let value_scale = if c.map.contains_key("attention_value_scale") { value_scale } else { 0.707 };
    let bias = c.bool_or("attention_bias", false)?;
    let eps = c.f64_or("rms_norm_eps", 1e-5)?;
    let intermediate = c.usize_or("intermediate_size", 16384)?;
    let moe = parse_moe(c, (256, 8, 2048))?;

    let layer_types = c.opt_str_list("layer_types")?.unwrap_or_else(|| {
        (0..n)
            .map(|i| if i == 0 || (i + 1) % 6 == 0 { "full_attention" } else { "sliding_attention" }.to_owned())
            .collect()
    });
    let mlp_types = c.opt_str_list("mlp_layer_types")?.unwrap_or_else(|| {
        (0..n).map(|i| if i == 0 { "dense" } else { "sparse" }.to_owned()).collect()
    });
    check_len("layer_types", layer_types.len(), n)?;
    check_len("mlp_layer_types", mlp_types.len(), n)?;

    let rope_for = |layer_type: &str| -> Result<RopeSpec> {
        let (theta_default, field) = match layer_type {
            "full_attention" => (5_000_000.0, "rope_parameters.full_attention"),
            _ => (10_000.0, "rope_parameters.sliding_attention"),
        };
        let params = c.sub("rope_parameters")?;
        let (theta, factor) = match params {
            None => (c.f64_or("rope_theta", theta_default)?, c.f64_or("partial_rotary_factor", 0.334)?),
            Some(p) => {
                let per = p.get(layer_type).filter(|v| !v.is_null());
                match per {
                    None => return Err(Error::config(field, "missing")),
                    Some(v) => {
                        let f = Fields::new(v, "rope_parameters.")?;
                        match f.opt_str("rope_type")?.as_deref() {
                            None | Some("default") => {}
                            Some(o) => return Err(Error::config(format!("{field}.rope_type"), format!("unsupported `{o}` (only default)"))),
                        }
                        (
                            f.opt_f64("rope_theta")?.ok_or_else(|| Error::config(format!("{field}.rope_theta"), "missing"))?,
                            f.f64_or("partial_rotary_factor", 0.334)?,
                        )
                    }
                }
            }
        };
        Ok(RopeSpec { theta, rotary_dim: rotary_dim(head_dim, factor)?, style: RopeStyle::NeoX })
    };

    let mut layers = Vec::with_capacity(n);
    for i in 0..n {
        let swa = match layer_types[i].as_str() {
            "full_attention" => false,
            "sliding_attention" => true,
            o => return Err(Error::config(format!("layer_types[{i}]"), format!("unknown layer type `{o}`"))),
        };
        let attention = AttentionSpec {
            kind: if swa { AttentionKind::Sliding { window } } else { AttentionKind::Full },
            num_heads: heads,
            // HF doubles the KV heads of sliding-window layers.
            num_kv_heads: if swa { kv_heads * 2 } else { kv_heads },
            head_dim,
            v_head_dim,
            rope: rope_for(&layer_types[i])?,
            sinks: swa,
            value_scale: value_scale as f32,
            softmax_scale: (head_dim as f32).powf(-0.5),
            qkv_layout: QkvLayout::Separate,
            qkv_bias: bias,
            qk_norm: false,
        };
        let mlp = match mlp_types[i].as_str() {
            "dense" => MlpSpec::Dense { intermediate_size: intermediate },
            "sparse" => MlpSpec::Moe(moe),
            o => return Err(Error::config(format!("mlp_layer_types[{i}]"), format!("unknown MLP type `{o}`"))),
        };
        layers.push(LayerSpec { attention, mlp });
    }
    Ok(spec_from(com, "mimo_v2_flash", eps, layers))
}

fn parse_mimo_v2(c: &Fields) -> Result<ModelSpec> {
    let com = common(c, None, None, 1_048_576)?;
    let n = com.num_layers;
    let heads = c.req_usize("num_attention_heads")?;
    let kv_heads = c.req_usize("num_key_value_heads")?;
    let head_dim = c.usize_or("head_dim", 192)?;
    let v_head_dim = c.usize_or("v_head_dim", head_dim)?;
    let swa_heads = c.usize_or("swa_num_attention_heads", heads)?;
    let swa_kv = c.usize_or("swa_num_key_value_heads", kv_heads)?;
    let swa_head_dim = c.usize_or("swa_head_dim", head_dim)?;
    let swa_v_head_dim = c.usize_or("swa_v_head_dim", v_head_dim)?;
    let theta = c.f64_or("rope_theta", 10_000_000.0)?;
    let swa_theta = c.f64_or("swa_rope_theta", 10_000.0)?;
    let factor = c.f64_or("partial_rotary_factor", 1.0)?;
    let window = match c.opt_usize("sliding_window")? {
        Some(w) => w,
        None => c.usize_or("sliding_window_size", 128)?,
    };
    let eps = match c.opt_f64("layernorm_epsilon")? {
        Some(e) => e,
        None => c.f64_or("rms_norm_eps", 1e-5)?,
    };
    let value_scale = c.f64_or("attention_value_scale", 1.0)?;
    let bias = c.bool_or("attention_bias", false)?;
    let full_sinks = c.bool_or("add_full_attention_sink_bias", false)?;
    let swa_sinks = c.bool_or("add_swa_attention_sink_bias", true)?;
    let layout = match c.opt_str("attention_projection_layout")?.as_deref() {
        None | Some("split") => QkvLayout::Separate,
        Some("fused_qkv") | Some("fused") => QkvLayout::FusedPerKvHead,
        Some(o) => return Err(Error::config("attention_projection_layout", format!("unknown `{o}` (split, fused_qkv)"))),
    };
    let intermediate = c.req_usize("intermediate_size")?;
    let moe = parse_moe(c, (256, 8, 2048))?;
    let pattern = c
        .opt_int_list("hybrid_layer_pattern")?
        .unwrap_or_else(|| (0..n).map(|i| u64::from(i != 0 && i % 6 != 5)).collect());
    let moe_freq = c
        .opt_int_list("moe_layer_freq")?
        .unwrap_or_else(|| (0..n).map(|i| u64::from(i != 0)).collect());
    check_len("hybrid_layer_pattern", pattern.len(), n)?;
    check_len("moe_layer_freq", moe_freq.len(), n)?;

    let mut layers = Vec::with_capacity(n);
    for i in 0..n {
        let swa = match pattern[i] {
            0 => false,
            1 => true,
            o => return Err(Error::config(format!("hybrid_layer_pattern[{i}]"), format!("expected 0 or 1, got {o}"))),
        };
        let (h, kv, d, vd, th) = if swa {
            (swa_heads, swa_kv, swa_head_dim, swa_v_head_dim, swa_theta)
        } else {
            (heads, kv_heads, head_dim, v_head_dim, theta)
        };
        let attention = AttentionSpec {
            kind: if swa { AttentionKind::Sliding { window } } else { AttentionKind::Full },
            num_heads: h,
            num_kv_heads: kv,
            head_dim: d,
            v_head_dim: vd,
            rope: RopeSpec { theta: th, rotary_dim: rotary_dim(d, factor)?, style: RopeStyle::NeoX },
            sinks: if swa { swa_sinks } else { full_sinks },
            value_scale: value_scale as f32,
            softmax_scale: (d as f32).powf(-0.5),
            qkv_layout: layout,
            qkv_bias: bias,
            qk_norm: false,
        };
        let mlp = match moe_freq[i] {
            0 => MlpSpec::Dense { intermediate_size: intermediate },
            1 => MlpSpec::Moe(moe),
            o => return Err(Error::config(format!("moe_layer_freq[{i}]"), format!("expected 0 or 1, got {o}"))),
        };
        layers.push(LayerSpec { attention, mlp });
    }
    Ok(spec_from(com, "mimo_v2", eps, layers))
}

fn parse_dense(c: &Fields, model_type: &str) -> Result<ModelSpec> {
    let com = common(c, None, None, 4096)?;
    let heads = c.req_usize("num_attention_heads")?;
    let kv = c.usize_or("num_key_value_heads", heads)?;
    if heads == 0 {
        return Err(Error::config("num_attention_heads", "must be positive"));
    }
    // (Without head_dim it is hidden_size / heads: a remainder would surface later as a
    // rotary or shape error that names neither.)
    if !c.map.contains_key("head_dim") && com.hidden_size % heads != 0 {
        return Err(Error::config("hidden_size", format!("{} is not a multiple of num_attention_heads {heads} (and no head_dim is given)", com.hidden_size)));
    }
    let head_dim = c.usize_or("head_dim", com.hidden_size / heads)?;
    let (theta, factor) = flat_rope(c)?;
    let eps = c.f64_or("rms_norm_eps", 1e-6)?;
    let intermediate = c.req_usize("intermediate_size")?;
    if c.bool_or("mlp_bias", false)? {
        return Err(Error::config("mlp_bias", "MLP biases are not supported"));
    }
    let windows = dense_windows(c, model_type, com.num_layers)?;
    let attention = AttentionSpec {
        kind: AttentionKind::Full,
        num_heads: heads,
        num_kv_heads: kv,
        head_dim,
        v_head_dim: head_dim,
        rope: RopeSpec { theta, rotary_dim: rotary_dim(head_dim, factor)?, style: RopeStyle::NeoX },
        sinks: false,
        value_scale: 1.0,
        softmax_scale: (head_dim as f32).powf(-0.5),
        qkv_layout: QkvLayout::Separate,
        qkv_bias: c.bool_or("attention_bias", model_type == "qwen2")?,
        qk_norm: model_type == "qwen3",
    };
    let layers = windows
        .into_iter()
        .map(|w| {
            let kind = w.map_or(AttentionKind::Full, |window| AttentionKind::Sliding { window });
            LayerSpec { attention: AttentionSpec { kind, ..attention }, mlp: MlpSpec::Dense { intermediate_size: intermediate } }
        })
        .collect();
    Ok(spec_from(com, model_type, eps, layers))
}

/// Each layer's sliding window in a dense config, as transformers reads it: Mistral slides every
/// layer by `sliding_window` (4096 when absent; null: none), with no switch; Qwen2/Qwen3 slide only
/// under `use_sliding_window`, and then only layers from `max_window_layers` on (default 28),
/// unless `layer_types` names each layer; Llama never slides.
fn dense_windows(c: &Fields, model_type: &str, num_layers: usize) -> Result<Vec<Option<usize>>> {
    let window = match model_type {
        "mistral" if !c.map.contains_key("sliding_window") => Some(4096),
        "mistral" => c.opt_usize("sliding_window")?,
        "qwen2" | "qwen3" if c.bool_or("use_sliding_window", false)? => c.opt_usize("sliding_window")?,
        _ => None,
    };
    if let Some(types) = c.opt_str_list("layer_types")?.filter(|_| matches!(model_type, "qwen2" | "qwen3")) {
        check_len("layer_types", types.len(), num_layers)?;
        return types
            .iter()
            .enumerate()
            .map(|(i, t)| match t.as_str() {
                "full_attention" => Ok(None),
                "sliding_attention" => window.map(Some).ok_or_else(|| Error::config(format!("layer_types[{i}]"), "a sliding layer needs `use_sliding_window` and `sliding_window`")),
                other => Err(Error::config(format!("layer_types[{i}]"), format!("unknown layer type `{other}`"))),
            })
            .collect();
    }
    let first_sliding = if model_type == "mistral" { 0 } else { c.usize_or("max_window_layers", 28)? };
    Ok((0..num_layers).map(|i| window.filter(|_| i >= first_sliding)).collect())
}

/// RoPE base and partial factor of a single-rope config: transformers 5's flat
/// `rope_parameters` or the older top-level `rope_theta` / `rope_scaling`.
fn flat_rope(c: &Fields) -> Result<(f64, f64)> {
    for key in ["rope_scaling", "rope_parameters"] {
        if let Some(s) = c.get(key) {
            let kind = s.get("rope_type").or_else(|| s.get("type")).and_then(Value::as_str);
            if !matches!(kind, None | Some("default")) {
                return Err(Error::config(key, format!("unsupported rope type in {s} (only default)")));
            }
        }
    }
    let p = match c.get("rope_parameters") {
        Some(v) => Some(Fields::new(v, "rope_parameters.")?),
        None => None,
    };
    let theta = match p.as_ref().map(|p| p.opt_f64("rope_theta")).transpose()?.flatten() {
        Some(t) => t,
        None => c.f64_or("rope_theta", 10_000.0)?,
    };
    let factor = match p.as_ref().map(|p| p.opt_f64("partial_rotary_factor")).transpose()?.flatten() {
        Some(f) => f,
        None => c.f64_or("partial_rotary_factor", 1.0)?,
    };
    Ok((theta, factor))
}

/// Parses a DFlash drafter's config.json (a Qwen3 config plus `dflash_config`; each DFlash
/// field may also sit at the top level, as in the reference's `_draft_value`).
pub fn parse_draft_config(config: &Value) -> Result<DraftSpec> {
    let c = Fields::new(config, "")?;
    let d = match c.get("dflash_config") {
        Some(v) => Some(Fields::new(v, "dflash_config.")?),
        None => None,
    };
    let hidden = c.req_usize("hidden_size")?;
    let n = c.req_usize("num_hidden_layers")?;
    if n == 0 || n > MAX_LAYERS {
        return Err(Error::config("num_hidden_layers", format!("{n} is out of range")));
    }
    let heads = c.req_usize("num_attention_heads")?;
    if heads == 0 {
        return Err(Error::config("num_attention_heads", "must be positive"));
    }
    let kv = c.usize_or("num_key_value_heads", heads)?;
    let head_dim = c.usize_or("head_dim", hidden / heads)?;
    let (theta, factor) = flat_rope(&c)?;
    let eps = c.f64_or("rms_norm_eps", 1e-6)?;
    let layer_types = c.opt_str_list("layer_types")?.unwrap_or_else(|| vec!["full_attention".into(); n]);
    check_len("layer_types", layer_types.len(), n)?;
    let is_causal = match c.get("is_causal") {
        None => None,
        Some(Value::Bool(b)) => Some(*b),
        Some(_) => return Err(Error::config("is_causal", "expected true or false")),
    };
    let value_scale = c.f64_or("attention_value_scale", 1.0)?;
    let draft_usize = |key: &str| -> Result<Option<usize>> {
        match d.as_ref().map(|d| d.opt_usize(key)).transpose()?.flatten() {
            Some(v) => Ok(Some(v)),
            None => c.opt_usize(key),
        }
    };
    let draft_f64 = |key: &str| -> Result<Option<f64>> {
        match d.as_ref().map(|d| d.opt_f64(key)).transpose()?.flatten() {
            Some(v) => Ok(Some(v)),
            None => c.opt_f64(key),
        }
    };
    let target_layer_ids: Vec<usize> = match d.as_ref().map(|d| d.opt_int_list("target_layer_ids")).transpose()?.flatten() {
        Some(ids) => ids.into_iter().map(|i| i as usize).collect(),
        None => match c.opt_int_list("target_layer_ids")? {
            Some(ids) => ids.into_iter().map(|i| i as usize).collect(),
            None => {
                // The reference's `build_target_layer_ids`.
                let t = c.req_usize("num_target_layers").map_err(|_| match d {
                    // Nothing of DFlash at all: most likely a model's own directory.
                    None => Error::config("dflash_config", "missing: this config.json is not a DFlash drafter's (no dflash_config, target_layer_ids or num_target_layers)"),
                    Some(_) => Error::config("dflash_config.target_layer_ids", "missing (and no num_target_layers to derive it from)"),
                })?;
                if n == 1 {
                    vec![t / 2]
                } else {
                    let (start, end) = (1.0, t as f64 - 3.0);
                    (0..n).map(|i| (start + i as f64 * (end - start) / (n - 1) as f64).round() as usize).collect()
                }
            }
        },
    };
    if target_layer_ids.is_empty() {
        return Err(Error::config("dflash_config.target_layer_ids", "must not be empty"));
    }
    let mask_token_id = draft_usize("mask_token_id")?
        .ok_or_else(|| Error::config("dflash_config.mask_token_id", "missing"))?;
    let mask_token_id = u32::try_from(mask_token_id).map_err(|_| Error::config("dflash_config.mask_token_id", "too large"))?;
    let block_size = draft_usize("block_size")?.unwrap_or(16);
    if !(2..=64).contains(&block_size) {
        return Err(Error::config("dflash_config.block_size", format!("{block_size} is outside 2..=64")));
    }
    let sinks_full = c.bool_or("add_full_attention_sink_bias", false)?;
    let sinks_swa = c.bool_or("add_swa_attention_sink_bias", c.bool_or("attention_sink_bias", false)?)?;
    let window = c.opt_usize("sliding_window")?;
    let mut layers = Vec::with_capacity(n);
    for (i, t) in layer_types.iter().enumerate() {
        let swa = match t.as_str() {
            "full_attention" => false,
            "sliding_attention" => true,
            o => return Err(Error::config(format!("layer_types[{i}]"), format!("unknown layer type `{o}`"))),
        };
        let kind = match (swa, window) {
            (true, Some(w)) if w > 0 => AttentionKind::Sliding { window: w },
            (true, _) => return Err(Error::config("sliding_window", "sliding_attention layers need a positive sliding_window")),
            (false, _) => AttentionKind::Full,
        };
        let attention = AttentionSpec {
            kind,
            num_heads: heads,
            num_kv_heads: kv,
            head_dim,
            v_head_dim: head_dim,
            rope: RopeSpec { theta, rotary_dim: rotary_dim(head_dim, factor)?, style: RopeStyle::NeoX },
            sinks: if swa { sinks_swa } else { sinks_full },
            value_scale: value_scale as f32,
            softmax_scale: (head_dim as f32).powf(-0.5),
            qkv_layout: QkvLayout::Separate,
            qkv_bias: c.bool_or("attention_bias", false)?,
            qk_norm: true,
        };
        layers.push(DraftLayerSpec {
            attention,
            // The reference: sliding layers are causal unless `is_causal` says otherwise.
            causal: is_causal.unwrap_or(swa),
            intermediate_size: c.req_usize("intermediate_size")?,
        });
    }
    let spec = DraftSpec {
        block_size,
        mask_token_id,
        target_layer_ids,
        hidden_size: hidden,
        rms_norm_eps: eps as f32,
        vocab_size: c.usize_or("vocab_size", 0)?,
        layers,
        input_embedding_scale: draft_f64("input_embedding_scale")?.unwrap_or(1.0) as f32,
        output_multiplier: draft_f64("output_multiplier")?.unwrap_or(1.0) as f32,
        final_logit_softcapping: draft_f64("final_logit_softcapping")?.filter(|&c| c > 0.0).map(|c| c as f32),
    };
    for (i, l) in spec.layers.iter().enumerate() {
        let a = &l.attention;
        if kv == 0 || heads % kv != 0 {
            return Err(Error::config("num_key_value_heads", format!("{heads} query heads are not a multiple of {kv} KV heads")));
        }
        if head_dim == 0 || l.intermediate_size == 0 || hidden == 0 {
            return Err(Error::config("hidden_size", "hidden_size, head_dim and intermediate_size must be positive"));
        }
        if a.rope.rotated_dims() > head_dim || theta <= 0.0 {
            return Err(Error::config("rope_parameters", format!("layer {i}: bad rotary setup (theta {theta}, {} rotated dims of {head_dim})", a.rope.rotated_dims())));
        }
    }
    if spec.rms_norm_eps.is_nan() || spec.rms_norm_eps <= 0.0 {
        return Err(Error::config("rms_norm_eps", "must be positive"));
    }
    Ok(spec)
}

fn parse_quant(q: Option<&Value>) -> Result<QuantSpec> {
    let Some(q) = q.filter(|v| !v.is_null()) else { return Ok(QuantSpec::unquantized()) };
    let f = Fields::new(q, "quantization_config.")?;
    let method = f.req_str("quant_method")?;
    let ignored = |key: &str| -> Result<Vec<String>> { Ok(f.opt_str_list(key)?.unwrap_or_default()) };
    match method.as_str() {
        "fp8" => {
            let (bn, bk) = match f.opt_int_list("weight_block_size")? {
                None => (128, 128),
                Some(b) if b.len() == 2 && b[0] > 0 && b[1] > 0 => (b[0] as usize, b[1] as usize),
                Some(_) => return Err(Error::config("quantization_config.weight_block_size", "expected two positive integers")),
            };
            let linear = QuantFormat::Fp8Block { block_n: bn, block_k: bk };
            let experts = match f.opt_str("store_dtype")?.as_deref() {
                None | Some("fp8") | Some("float8_e4m3fn") => linear,
                Some("mxfp4") => {
                    let b = f.usize_or("mxfp4_block_size", 32)?;
                    if b != 32 {
                        return Err(Error::config("quantization_config.mxfp4_block_size", format!("only 32 is supported, got {b}")));
                    }
                    QuantFormat::Mxfp4
                }
                Some(o) => return Err(Error::config("quantization_config.store_dtype", format!("unsupported `{o}`"))),
            };
            Ok(QuantSpec { linear, experts, ignored: ignored("ignored_layers")? })
        }
        "mxfp4" => Ok(QuantSpec {
            linear: QuantFormat::Plain(DType::BF16),
            experts: QuantFormat::Mxfp4,
            ignored: ignored("modules_to_not_convert")?,
        }),
        o => Err(Error::config("quantization_config.quant_method", format!("unsupported `{o}` (fp8, mxfp4)"))),
    }
}

fn check_len(field: &str, got: usize, want: usize) -> Result<()> {
    if got != want {
        return Err(Error::config(field, format!("has {got} entries but num_hidden_layers is {want}")));
    }
    Ok(())
}

/// Cross-field consistency checks shared by every model type.
pub(crate) fn validate(spec: &ModelSpec) -> Result<()> {
    let pos = |field: &str, v: usize| {
        if v == 0 {
            Err(Error::config(field, "must be positive"))
        } else {
            Ok(())
        }
    };
    pos("vocab_size", spec.vocab_size)?;
    pos("hidden_size", spec.hidden_size)?;
    pos("num_hidden_layers", spec.layers.len())?;
    pos("max_position_embeddings", spec.max_position_embeddings)?;
    // (As f32: 1e300 passes as f64 and is infinite where it is used.)
    if !spec.rms_norm_eps.is_finite() || spec.rms_norm_eps <= 0.0 {
        return Err(Error::config("rms_norm_eps", "must be positive and finite as an f32"));
    }
    // Each size is at most MAX_SIZE, so a product of two cannot overflow, but one of three can:
    // the weights' element counts are bounded here, before anything is sized from them.
    let elems = |field: &str, dims: &[usize]| match dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).filter(|&n| n <= MAX_MATRIX_ELEMENTS) {
        Some(_) => Ok(()),
        None => Err(Error::config(field, format!("a weight of {dims:?} elements is larger than any model's (at most {MAX_MATRIX_ELEMENTS} elements)"))),
    };
    elems("vocab_size", &[spec.vocab_size, spec.hidden_size])?;
    for id in spec.eos_token_ids.iter().chain(spec.bos_token_id.iter()) {
        if *id as usize >= spec.vocab_size {
            return Err(Error::config("eos_token_id", format!("token id {id} outside the vocabulary of {}", spec.vocab_size)));
        }
    }
    for (i, l) in spec.layers.iter().enumerate() {
        let a = &l.attention;
        pos("num_attention_heads", a.num_heads)?;
        pos("num_key_value_heads", a.num_kv_heads)?;
        pos("head_dim", a.head_dim)?;
        pos("v_head_dim", a.v_head_dim)?;
        if a.num_heads % a.num_kv_heads != 0 {
            return Err(Error::config("num_key_value_heads", format!("layer {i}: {} query heads are not a multiple of {} KV heads", a.num_heads, a.num_kv_heads)));
        }
        if a.rope.rotated_dims() > a.head_dim {
            return Err(Error::config("partial_rotary_factor", format!("layer {i}: {} rotated dims exceed head_dim {}", a.rope.rotated_dims(), a.head_dim)));
        }
        if a.rope.theta.is_nan() || a.rope.theta <= 0.0 {
            return Err(Error::config("rope_theta", format!("layer {i}: must be positive")));
        }
        if let AttentionKind::Sliding { window } = a.kind {
            pos("sliding_window", window)?;
        }
        elems("num_attention_heads", &[a.num_heads, a.head_dim.max(a.v_head_dim), spec.hidden_size])?;
        if !a.value_scale.is_finite() {
            return Err(Error::config("attention_value_scale", format!("layer {i}: must be finite as an f32")));
        }
        match l.mlp {
            MlpSpec::Dense { intermediate_size } => {
                pos("intermediate_size", intermediate_size)?;
                elems("intermediate_size", &[intermediate_size, spec.hidden_size])?;
            }
            MlpSpec::Moe(m) => {
                pos("n_routed_experts", m.num_experts)?;
                pos("moe_intermediate_size", m.intermediate_size)?;
                pos("num_experts_per_tok", m.top_k)?;
                pos("n_group", m.n_group)?;
                pos("topk_group", m.topk_group)?;
                elems("moe_intermediate_size", &[m.num_experts, m.intermediate_size, spec.hidden_size])?;
                if m.top_k > m.num_experts {
                    return Err(Error::config("num_experts_per_tok", format!("{} exceeds n_routed_experts {}", m.top_k, m.num_experts)));
                }
                if m.num_experts % m.n_group != 0 {
                    return Err(Error::config("n_group", format!("{} does not divide n_routed_experts {}", m.n_group, m.num_experts)));
                }
                if m.topk_group > m.n_group {
                    return Err(Error::config("topk_group", format!("{} exceeds n_group {}", m.topk_group, m.n_group)));
                }
                let per_group = m.num_experts / m.n_group;
                if m.n_group > 1 && per_group < 2 {
                    return Err(Error::config("n_group", "group-limited routing needs at least 2 experts per group"));
                }
                if m.top_k > m.topk_group * per_group {
                    return Err(Error::config("num_experts_per_tok", format!("{} exceeds the experts of the {} chosen groups", m.top_k, m.topk_group)));
                }
                if !m.routed_scaling_factor.is_finite() {
                    return Err(Error::config("routed_scaling_factor", "must be finite"));
                }
            }
        }
    }
    Ok(())
}
