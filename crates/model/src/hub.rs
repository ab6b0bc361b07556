//! `org/name` model ids resolved in the local Hugging Face cache, offline (never a download).
//!
//! Cache layout: `<root>/models--org--name/refs/<ref>` holds a commit hash and
//! `<root>/models--org--name/snapshots/<hash>/` the files. Plain fs code rather than hf-hub's
//! cache API, so that a ref file with a trailing newline, a commit hash given as the revision and a
//! cache without `refs/main` (newest snapshot) all work.

use std::path::{Path, PathBuf};

/// The cache roots searched, in order: `$HF_HUB_CACHE`, `$HF_HOME/hub`,
/// `~/.cache/huggingface/hub`.
pub fn cache_roots() -> Vec<PathBuf> {
    let mut roots = Vec::new();
    if let Some(p) = std::env::var_os("HF_HUB_CACHE") {
        roots.push(PathBuf::from(p));
    }
    if let Some(p) = std::env::var_os("HF_HOME") {
        roots.push(PathBuf::from(p).join("hub"));
    }
    if let Some(home) = std::env::var_os("HOME") {
        roots.push(PathBuf::from(home).join(".cache/huggingface/hub"));
    }
    roots.dedup();
    roots
}

/// The snapshot directory of `id` (`org/name`, optionally `@revision`: a ref or a commit hash)
/// holding a config.json, searched in [`cache_roots`].
pub fn resolve(id: &str) -> Option<PathBuf> {
    cache_roots().iter().find_map(|root| resolve_in(root, id))
}

/// [`resolve`] in one cache root. Without a revision: `refs/main`, else the newest snapshot.
pub fn resolve_in(root: &Path, id: &str) -> Option<PathBuf> {
    let (name, revision) = match id.split_once('@') {
        Some((n, r)) => (n, Some(r)),
        None => (id, None),
    };
    let (org, model) = name.split_once('/')?;
    if org.is_empty() || model.is_empty() || model.contains('/') || name.contains("..") {
        return None;
    }
    let repo = root.join(format!("models--{org}--{model}"));
    let snapshots = repo.join("snapshots");
    let with_config = |dir: PathBuf| Some(dir).filter(|d| d.join("config.json").is_file());
    let by_ref = |r: &str| {
        let hash = std::fs::read_to_string(repo.join("refs").join(r)).ok()?;
        with_config(snapshots.join(hash.trim()))
    };
    match revision {
        Some(r) => by_ref(r).or_else(|| with_config(snapshots.join(r))),
        None => by_ref("main").or_else(|| {
            // No refs/main: the most recently modified snapshot that has a config.json.
            let mut dirs: Vec<(std::time::SystemTime, PathBuf)> = std::fs::read_dir(&snapshots)
                .ok()?
                .filter_map(|e| e.ok())
                .filter(|e| e.path().join("config.json").is_file())
                .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
                .collect();
            dirs.sort();
            dirs.pop().map(|(_, p)| p)
        }),
    }
}
