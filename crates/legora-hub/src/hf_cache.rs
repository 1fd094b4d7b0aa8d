//! Models by Hugging Face repo id, offline: `Qwen/Qwen2-0.5B` (or `Qwen/Qwen2-0.5B@rev`)
//! is the snapshot folder that the Hugging Face cache already holds, as
//! `huggingface_hub` lays it out: `models--Qwen--Qwen2-0.5B/refs/main` names a commit,
//! `models--Qwen--Qwen2-0.5B/snapshots/<commit>/` holds the files. Nothing is downloaded.

use std::path::{Path, PathBuf};

use crate::error::{HubError, Result};

/// The cache folders looked in, in `huggingface_hub`'s order: `$HF_HUB_CACHE`, else
/// `$HF_HOME/hub`, else `$XDG_CACHE_HOME/huggingface/hub`, else
/// `~/.cache/huggingface/hub`.
pub fn hf_cache_dirs() -> Vec<PathBuf> {
    let var = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    if let Some(d) = var("HF_HUB_CACHE") {
        return vec![d];
    }
    if let Some(d) = var("HF_HOME") {
        return vec![d.join("hub")];
    }
    let cache = var("XDG_CACHE_HOME").or_else(|| var("HOME").map(|h| h.join(".cache")));
    cache
        .map(|c| vec![c.join("huggingface").join("hub")])
        .unwrap_or_default()
}

/// `spec` as a model path: a path that exists, or anything that cannot be a repo id, as
/// is (reading it then names the missing file); a repo id (`org/name`, optionally
/// `@revision`) that is not a path, resolved in the Hugging Face cache
/// ([`hf_cache_dirs`]), or an error naming it and every place looked at.
pub fn resolve_model(spec: &Path) -> Result<PathBuf> {
    resolve_model_in(spec, &hf_cache_dirs())
}

/// [`resolve_model`] over the given cache folders.
pub fn resolve_model_in(spec: &Path, caches: &[PathBuf]) -> Result<PathBuf> {
    if spec.exists() {
        return Ok(spec.to_path_buf());
    }
    let Some((repo, revision)) = spec.to_str().and_then(repo_id) else {
        return Ok(spec.to_path_buf());
    };
    let mut looked = vec![spec.to_path_buf()];
    for cache in caches {
        let repo_dir = cache.join(format!("models--{}", repo.replace('/', "--")));
        let commit = match std::fs::read_to_string(repo_dir.join("refs").join(revision)) {
            Ok(c) => c.trim().to_string(),
            // a commit hash names its snapshot directly
            Err(_) => revision.to_string(),
        };
        let snapshot = repo_dir.join("snapshots").join(&commit);
        if is_name(&commit) && snapshot.is_dir() {
            return Ok(snapshot);
        }
        looked.push(snapshot);
    }
    Err(HubError::ModelNotFound {
        spec: spec.display().to_string(),
        looked,
    })
}

/// `(org/name, revision)` of a repo id, `None` for anything else.
fn repo_id(s: &str) -> Option<(&str, &str)> {
    let (repo, revision) = s.split_once('@').unwrap_or((s, "main"));
    let (org, name) = repo.split_once('/')?;
    (is_name(org) && is_name(name) && is_name(revision)).then_some((repo, revision))
}

/// A repo, org or revision name: letters, digits, `-`, `_`, `.`, not starting with `.`.
fn is_name(s: &str) -> bool {
    !s.is_empty()
        && !s.starts_with('.')
        && s.len() <= 96
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_ids() {
        assert_eq!(
            repo_id("Qwen/Qwen2-0.5B"),
            Some(("Qwen/Qwen2-0.5B", "main"))
        );
        assert_eq!(repo_id("a/b@v1.0"), Some(("a/b", "v1.0")));
        for bad in ["a", "a/b/c", "../x", "a/..", "/abs/path", "a/b@", "a b/c"] {
            assert_eq!(repo_id(bad), None, "{bad}");
        }
    }
}
