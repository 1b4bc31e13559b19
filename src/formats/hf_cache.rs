//! Hugging Face model ids (`org/name`, `org/name@revision`) resolved from the local hub cache,
//! laid out as `huggingface_hub` lays it out: `$HF_HUB_CACHE` (else `$HF_HOME/hub`, else
//! `$XDG_CACHE_HOME/huggingface/hub`, else `~/.cache/huggingface/hub`), a folder
//! `models--org--name` per repository with `refs/<branch or tag>` holding a commit hash and
//! `snapshots/<commit>/` holding the files (symlinks into `blobs/`). A revision is a branch or
//! tag name (default `main`, read through `refs/`) or a 40-hex commit hash (the snapshot itself).
//!
//! Whatever names an existing path is taken as a path; only what does not exist and looks like an
//! id is looked up. Models that are not cached are not downloaded (no hub is reachable where ft
//! is tested); the error says where ft looked and how to fetch the model.

use std::path::{Path, PathBuf};

/// A model id that is not in the local cache.
#[derive(Debug, Clone, thiserror::Error)]
pub enum HubError {
    #[error("{id} is not a directory, nor a model in the Hugging Face cache ({cache} has no {repo_dir}){hint}")]
    NotCached { id: String, cache: PathBuf, repo_dir: String, hint: String },
    #[error("{id}: the Hugging Face cache has {repo} but no revision {revision:?} ({missing} is missing){hint}")]
    NoRevision { id: String, repo: PathBuf, revision: String, missing: PathBuf, hint: String },
}

/// The hub cache directory, from the environment as huggingface_hub reads it.
pub fn cache_dir() -> PathBuf {
    let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(d) = var("HF_HUB_CACHE").or_else(|| var("HUGGINGFACE_HUB_CACHE")) {
        return d;
    }
    let home = var("HF_HOME").unwrap_or_else(|| {
        let cache = var("XDG_CACHE_HOME").unwrap_or_else(|| var("HOME").unwrap_or_else(|| PathBuf::from(".")).join(".cache"));
        cache.join("huggingface")
    });
    home.join("hub")
}

/// Whether `HF_HUB_OFFLINE` is set to a true value (huggingface_hub's `1`, `ON`, `YES`, `TRUE`).
pub fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| matches!(v.to_ascii_uppercase().as_str(), "1" | "ON" | "YES" | "TRUE"))
}

/// `org/name[@revision]` → (repo id, revision), for strings that are ids (not paths).
pub fn parse_id(s: &str) -> Option<(&str, &str)> {
    let (repo, revision) = match s.split_once('@') {
        Some((r, rev)) if !rev.is_empty() => (r, rev),
        Some(_) => return None,
        None => (s, "main"),
    };
    let (org, name) = repo.split_once('/')?;
    // The hub's rule for names: [A-Za-z0-9_.-], not starting or ending with `.` or `-`, no `--`
    // or `..` (so `.cache/x` and `../x` are paths).
    let part = |p: &str| {
        !p.is_empty()
            && p.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            && !p.starts_with(['.', '-'])
            && !p.ends_with(['.', '-'])
            && !p.contains("--")
            && !p.contains("..")
    };
    (part(org) && part(name)).then_some((repo, revision))
}

/// `path` itself when it exists, or the snapshot of the cached model id it spells; `path` again
/// when it is an id that is not cached (a directory a recipe names may not exist yet; loading it
/// says what is missing, with [`not_found_hint`]).
pub fn resolve_if_cached(path: &Path) -> PathBuf {
    resolve(path).unwrap_or_else(|_| path.to_path_buf())
}

/// For a path that does not exist: why it is not a cached Hugging Face model either, when it
/// reads as an id (`""` otherwise).
pub fn not_found_hint(path: &Path) -> String {
    match resolve(path) {
        Err(e) => format!("; as a Hugging Face id: {e}"),
        Ok(_) => String::new(),
    }
}

/// `path` itself when it exists (or is not an id); else the cached snapshot of the model id it
/// spells.
pub fn resolve(path: &Path) -> Result<PathBuf, HubError> {
    let Some((repo, revision)) = path.to_str().filter(|_| !path.exists()).and_then(parse_id) else {
        return Ok(path.to_path_buf());
    };
    let id = path.display().to_string();
    let cache = cache_dir();
    let repo_dir = format!("models--{}", repo.replace('/', "--"));
    let hint = if offline() {
        " (HF_HUB_OFFLINE is set)".to_string()
    } else {
        format!("; ft does not download models: fetch it with `hf download {repo}{}` (huggingface_hub), or pass a directory", if revision == "main" { String::new() } else { format!(" --revision {revision}") })
    };
    let root = cache.join(&repo_dir);
    if !root.is_dir() {
        return Err(HubError::NotCached { id, cache, repo_dir, hint });
    }
    let commit = if revision.len() == 40 && revision.bytes().all(|b| b.is_ascii_hexdigit()) {
        revision.to_string()
    } else {
        let r = root.join("refs").join(revision);
        match std::fs::read_to_string(&r) {
            Ok(c) => c.trim().to_string(),
            Err(_) => return Err(HubError::NoRevision { id, repo: root, revision: revision.into(), missing: r, hint }),
        }
    };
    let snapshot = root.join("snapshots").join(&commit);
    if !snapshot.is_dir() {
        return Err(HubError::NoRevision { id, repo: root, revision: revision.into(), missing: snapshot, hint });
    }
    Ok(snapshot)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_and_paths_are_told_apart() {
        assert_eq!(parse_id("HuggingFaceTB/SmolLM2-135M-Instruct"), Some(("HuggingFaceTB/SmolLM2-135M-Instruct", "main")));
        assert_eq!(parse_id("org/name@v1.0"), Some(("org/name", "v1.0")));
        for path in ["./org/name", "/abs/dir", "dir", "a/b/c", "../x", "org/", "org/name@", "runs/../x", ".cache/smollm2-hf", "org/-x", "a--b/c"] {
            assert_eq!(parse_id(path), None, "{path}");
        }
    }
}
