//! Opens a model given as a directory, a weights file, or an HF id in the local cache, and
//! returns everything a backend and the server need.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use peregrine_core::{Error, ModelSpec, QkvLayout, QuantFormat, Result};

use crate::checkpoint::Checkpoint;
use crate::synthetic::SyntheticWeights;
use crate::tokenizer::Tokenizer;
use crate::weights::{SafetensorsWeights, WeightSource};

pub struct ModelFiles {
    pub dir: PathBuf,
    pub spec: ModelSpec,
    pub weights: Arc<dyn WeightSource>,
    pub tokenizer_json: Option<PathBuf>,
    pub tokenizer_config: Option<serde_json::Value>,
    /// tokenizer.json with tokenizer_config.json applied, when the model has them.
    pub tokenizer: Option<Tokenizer>,
    /// The default chat template (tokenizer_config.json or chat_template.jinja).
    pub chat_template: Option<String>,
}

/// How [`open_model_with`] reads a model.
#[derive(Clone, Debug, Default)]
pub struct LoadOptions {
    /// Random weights ([`crate::synthetic::SyntheticWeights`] with this seed) instead of the
    /// checkpoint's, which need not exist (vLLM's `--load-format dummy`); without tokenizer.json
    /// the stand-in tokenizer ([`crate::synthetic::synthetic_tokenizer`]).
    pub dummy_weights: Option<u64>,
    /// Fields merged into config.json before it is parsed (vLLM's `--hf-overrides`), e.g.
    /// `{"num_hidden_layers": 18}`.
    pub config_overrides: Option<serde_json::Map<String, serde_json::Value>>,
}

/// Opens `path_or_id`: a directory with config.json, a `.safetensors` file (config.json beside
/// it), or an `org/name` id found in the local HF cache; with random weights, also a config
/// file of any name.
pub fn open_model(path_or_id: &str) -> Result<ModelFiles> {
    open_model_with(path_or_id, &LoadOptions::default())
}

/// [`open_model`] with [`LoadOptions`] (a GGUF file takes none: its description is the file's).
pub fn open_model_with(path_or_id: &str, opts: &LoadOptions) -> Result<ModelFiles> {
    let path = Path::new(path_or_id);
    if path.is_file() {
        let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
        return match ext {
            "safetensors" => {
                let dir = path.parent().unwrap_or(Path::new(".")).to_path_buf();
                open_dir(&dir, Some(path), opts)
            }
            // GGUF: spec, weights, tokenizer and chat template all come from the one file.
            "gguf" if opts.dummy_weights.is_some() || opts.config_overrides.is_some() => Err(Error::ModelNotFound(
                path_or_id.to_owned(),
                "random weights and config overrides need a config.json model, not a GGUF file".into(),
            )),
            "gguf" => crate::gguf::open_gguf(path),
            "json" if path.file_name().is_some_and(|n| n == "config.json") => {
                open_dir(path.parent().unwrap_or(Path::new(".")), None, opts)
            }
            // A config of another name (configs/mimo-v2-flash.json) describes a model only.
            "json" if opts.dummy_weights.is_some() => open_config_file(path, opts.dummy_weights.unwrap_or_default(), opts),
            _ => Err(Error::ModelNotFound(
                path_or_id.to_owned(),
                format!("unsupported file type `.{ext}` (expected a model directory, a .safetensors or .gguf file, or config.json; any .json config with random weights)"),
            )),
        };
    }
    if path.is_dir() {
        return open_dir(path, None, opts);
    }
    if !path_or_id.starts_with('.') && !path_or_id.starts_with('/') && path_or_id.matches('/').count() == 1 {
        if let Some(dir) = crate::hub::resolve(path_or_id) {
            return open_dir(&dir, None, opts);
        }
        let roots: Vec<String> = crate::hub::cache_roots().iter().map(|p| p.display().to_string()).collect();
        return Err(Error::ModelNotFound(
            path_or_id.to_owned(),
            format!("no such file or directory, and not in the local Hugging Face cache (searched {}); downloads are never made", roots.join(", ")),
        ));
    }
    Err(Error::ModelNotFound(path_or_id.to_owned(), "no such file or directory".into()))
}

/// A model from a config file alone, with random weights and the stand-in tokenizer (nothing
/// else is read from its directory, which may hold other models' files).
fn open_config_file(path: &Path, seed: u64, opts: &LoadOptions) -> Result<ModelFiles> {
    let spec = crate::config::load_spec_file(path, None, opts.config_overrides.as_ref())?;
    let tokenizer = crate::synthetic::synthetic_tokenizer(spec.vocab_size, spec.eos_token_ids.first().copied())?;
    Ok(ModelFiles {
        dir: path.parent().unwrap_or(Path::new(".")).to_path_buf(),
        spec,
        weights: Arc::new(SyntheticWeights::new(seed)),
        tokenizer_json: None,
        tokenizer_config: None,
        tokenizer: Some(tokenizer),
        chat_template: None,
    })
}

fn open_dir(dir: &Path, weights_file: Option<&Path>, opts: &LoadOptions) -> Result<ModelFiles> {
    if !dir.join("config.json").is_file() {
        return Err(Error::ModelNotFound(dir.display().to_string(), "directory has no config.json".into()));
    }
    let mut spec = crate::config::load_spec_with(dir, opts.config_overrides.as_ref())?;
    let weights: Arc<dyn WeightSource> = match opts.dummy_weights {
        Some(seed) => Arc::new(SyntheticWeights::new(seed)),
        None => {
            let ckpt = match weights_file {
                Some(f) => Checkpoint::open(f)?,
                None => Checkpoint::open(dir)?,
            };
            // A fused qkv_proj in the checkpoint decides the layout even when the config is silent.
            for (i, l) in spec.layers.iter_mut().enumerate() {
                let fused = format!("model.layers.{i}.self_attn.qkv_proj.weight");
                if ckpt.contains(&fused) {
                    l.attention.qkv_layout = QkvLayout::FusedPerKvHead;
                }
            }
            let fp8_block = match spec.quant.linear {
                QuantFormat::Fp8Block { block_n, block_k } => (block_n, block_k),
                _ => (128, 128),
            };
            Arc::new(SafetensorsWeights::new(ckpt, fp8_block))
        }
    };
    let tokenizer_json = Some(dir.join("tokenizer.json")).filter(|p| p.is_file());
    let tc_path = dir.join("tokenizer_config.json");
    let tokenizer_config = if tc_path.is_file() { Some(crate::config::read_json(&tc_path)?) } else { None };
    let tokenizer = match &tokenizer_json {
        Some(p) => {
            let t = Tokenizer::from_file(p)?;
            Some(match &tokenizer_config {
                Some(c) => t.with_config(c)?,
                None => t,
            })
        }
        None if opts.dummy_weights.is_some() => Some(crate::synthetic::synthetic_tokenizer(spec.vocab_size, spec.eos_token_ids.first().copied())?),
        None => None,
    };
    let jinja = dir.join("chat_template.jinja");
    let chat_template = if jinja.is_file() {
        Some(std::fs::read_to_string(&jinja).map_err(|e| Error::file(&jinja, e))?)
    } else {
        tokenizer.as_ref().and_then(|t| t.chat_template().map(str::to_owned))
    };
    if let Some(t) = &tokenizer {
        for id in t.eos_token_ids() {
            if !spec.eos_token_ids.contains(&id) && (id as usize) < spec.vocab_size {
                spec.eos_token_ids.push(id);
            }
        }
    }
    Ok(ModelFiles {
        dir: dir.to_path_buf(),
        spec,
        weights,
        tokenizer_json,
        tokenizer_config,
        tokenizer,
        chat_template,
    })
}
