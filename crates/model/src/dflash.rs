//! A DFlash drafter checkpoint on disk: `config.json` (Qwen3 fields + `dflash_config`),
//! `model.safetensors` and, when present, `mask_embedding.pt` (the embedding of the MASK token
//! to use for masked block slots: the MiMo release's embedding row for it is about zero).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use peregrine_core::{DraftSpec, Error, Result};

use crate::checkpoint::Checkpoint;
use crate::torch_file::{PickleValue, TorchFile};
use crate::weights::{SafetensorsWeights, WeightSource};

pub struct DraftFiles {
    pub dir: PathBuf,
    pub spec: DraftSpec,
    pub weights: Arc<dyn WeightSource>,
    /// Prefix of every weight name ("" as the reference saves it, or "model.").
    pub prefix: String,
    /// Replaces the target's embedding row of the mask token inside draft blocks.
    pub mask_embedding: Option<Vec<f32>>,
}

/// The drafter a model directory carries in its `dflash/` subfolder, if any.
pub fn bundled_drafter(model_dir: &Path) -> Option<PathBuf> {
    let d = model_dir.join("dflash");
    d.join("config.json").is_file().then_some(d)
}

pub fn open_drafter(dir: &Path) -> Result<DraftFiles> {
    let config_path = dir.join("config.json");
    if !config_path.is_file() {
        return Err(Error::ModelNotFound(dir.display().to_string(), "drafter directory has no config.json".into()));
    }
    let config = crate::config::read_json(&config_path)?;
    let spec = crate::config::parse_draft_config(&config)?;
    let ckpt = Checkpoint::open(dir)?;
    let prefix = if ckpt.contains("fc.weight") {
        ""
    } else if ckpt.contains("model.fc.weight") {
        "model."
    } else {
        return Err(Error::tensor("fc.weight", format!("missing from the drafter checkpoint in {}", dir.display())));
    };
    let mask_path = dir.join("mask_embedding.pt");
    let mask_embedding = if mask_path.is_file() { Some(read_mask_embedding(&mask_path, &spec)?) } else { None };
    Ok(DraftFiles {
        dir: dir.to_path_buf(),
        spec,
        weights: Arc::new(SafetensorsWeights::new(ckpt, (128, 128))),
        prefix: prefix.to_owned(),
        mask_embedding,
    })
}

/// Reads `{"mask_token_id": int, "embedding": tensor [hidden] or [1, hidden]}`.
pub fn read_mask_embedding(path: &Path, spec: &DraftSpec) -> Result<Vec<f32>> {
    let f = TorchFile::open(path)?;
    let bad = |m: String| Error::file(path, m);
    if let Some(id) = f.get("mask_token_id") {
        match id {
            PickleValue::Int(i) if *i == spec.mask_token_id as i64 => {}
            other => {
                return Err(bad(format!("mask_token_id {other:?} differs from the drafter config's {}", spec.mask_token_id)))
            }
        }
    }
    let t = f.get("embedding").ok_or_else(|| bad("no `embedding` entry".into()))?;
    let t = f.tensor(t)?;
    if t.data.len() != spec.hidden_size || t.shape.iter().filter(|&&d| d != 1).count() > 1 {
        return Err(bad(format!("embedding has shape {:?}, expected [{}]", t.shape, spec.hidden_size)));
    }
    if t.data.iter().any(|x| !x.is_finite()) {
        return Err(bad("embedding holds a non-finite value".into()));
    }
    Ok(t.data)
}
