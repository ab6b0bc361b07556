//! `org/name` model ids resolved in the local Hugging Face cache, offline (never a download).

use std::path::PathBuf;

use hf_hub::{Cache, Repo};

/// The cache roots searched, in order: `$HF_HUB_CACHE`, `$HF_HOME/hub`,
/// `~/.cache/huggingface/hub`.
pub fn cache_roots() -> Vec<PathBuf> {
    let mut roots = Vec::new();
    if let Ok(p) = std::env::var("HF_HUB_CACHE") {
        roots.push(PathBuf::from(p));
    }
    roots.push(Cache::from_env().path().clone());
    roots.dedup();
    roots
}

/// The snapshot directory of `id` (at `refs/main`, or `id@revision`) holding its config.json.
pub fn resolve(id: &str) -> Option<PathBuf> {
    let (name, revision) = match id.split_once('@') {
        Some((n, r)) => (n, r.to_owned()),
        None => (id, "main".to_owned()),
    };
    for root in cache_roots() {
        let repo = Cache::new(root).repo(Repo::with_revision(name.to_owned(), hf_hub::RepoType::Model, revision.clone()));
        if let Some(config) = repo.get("config.json") {
            return config.parent().map(PathBuf::from);
        }
    }
    None
}
