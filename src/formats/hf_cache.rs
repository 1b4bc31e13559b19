//! Hugging Face model ids (`org/name`, `org/name@revision`) resolved from the local hub cache,
//! laid out as `huggingface_hub` lays it out: `$HF_HUB_CACHE` (else `$HF_HOME/hub`, else
//! `$XDG_CACHE_HOME/huggingface/hub`, else `~/.cache/huggingface/hub`), a folder
//! `models--org--name` per repository with `refs/<branch or tag>` holding a commit hash and
//! `snapshots/<commit>/` holding the files (symlinks into `blobs/`). A revision is a branch or
//! tag name (default `main`, read through `refs/`) or a 40-hex commit hash (the snapshot itself).
//!
//! Whatever names an existing path is taken as a path; only what does not exist and looks like an
//! id is looked up. [`resolve_or_download`] (the command line's `--model` and friends, `ft
//! train`'s model) downloads a model that is not cached with the `hf-hub` crate into that same
//! cache (its model files only: configs, tokenizer files, chat template, safetensors weights),
//! unless `HF_HUB_OFFLINE` is set; `HF_ENDPOINT` and `HF_TOKEN` are honoured.

use std::path::{Path, PathBuf};

/// A model id that is not in the local cache.
#[derive(Debug, Clone, thiserror::Error)]
pub enum HubError {
    #[error("{id} is not a directory, nor a model in the Hugging Face cache ({cache} has no {repo_dir}){hint}")]
    NotCached { id: String, cache: PathBuf, repo_dir: String, hint: String },
    #[error("{id}: the Hugging Face cache has {repo} but no revision {revision:?} ({missing} is missing){hint}")]
    NoRevision { id: String, repo: PathBuf, revision: String, missing: PathBuf, hint: String },
    #[error("{id}: not cached, and downloading it from {endpoint} failed: {msg}")]
    Download { id: String, endpoint: String, msg: String },
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
        format!("; fetch it with `hf download {repo}{}` (huggingface_hub), or pass a directory", if revision == "main" { String::new() } else { format!(" --revision {revision}") })
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

/// The files of a model repository ft uses (weights as safetensors only).
fn wanted(file: &str) -> bool {
    const SIDECARS: [&str; 9] = [
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "chat_template.jinja",
        "chat_template.json",
        "tokenizer.model",
        "model.safetensors.index.json",
    ];
    SIDECARS.contains(&file) || file == "model.safetensors" || (file.starts_with("model-") && file.ends_with(".safetensors") && !file.contains('/'))
}

/// [`resolve`], downloading a model id that is not cached (unless `HF_HUB_OFFLINE`): its model
/// files go into the hub cache as huggingface_hub lays them out (hf-hub's `blobs/`, `snapshots/`,
/// `refs/`), and the snapshot is returned.
pub fn resolve_or_download(path: &Path) -> Result<PathBuf, HubError> {
    // `runs/x` with a local `runs/` is a directory not made yet, not an organisation's model.
    let local_parent = path.parent().is_some_and(|p| !p.as_os_str().is_empty() && p.is_dir());
    match resolve(path) {
        Err(e @ (HubError::NotCached { .. } | HubError::NoRevision { .. })) if !offline() && !local_parent => {
            let (repo, revision) = path.to_str().and_then(parse_id).expect("only ids are looked up");
            download(repo, revision).map_err(|d| match d {
                HubError::Download { id, endpoint, msg } => HubError::Download { id, endpoint, msg: format!("{msg} ({e})") },
                other => other,
            })
        }
        r => r,
    }
}

/// Downloads `repo` at `revision` into the hub cache with the hf-hub crate.
pub fn download(repo: &str, revision: &str) -> Result<PathBuf, HubError> {
    use hf_hub::api::sync::ApiBuilder;
    use hf_hub::{Repo, RepoType};
    use std::io::IsTerminal;
    let endpoint = std::env::var("HF_ENDPOINT").unwrap_or_else(|_| "https://huggingface.co".into());
    let fail = |msg: String| HubError::Download { id: format!("{repo}@{revision}"), endpoint: endpoint.clone(), msg };
    let mut builder = ApiBuilder::from_env().with_cache_dir(cache_dir()).with_progress(std::io::stderr().is_terminal());
    if let Some(token) = std::env::var("HF_TOKEN").ok().filter(|t| !t.is_empty()) {
        builder = builder.with_token(Some(token));
    }
    let api = builder.build().map_err(|e| fail(e.to_string()))?;
    let r = api.repo(Repo::with_revision(repo.to_string(), RepoType::Model, revision.to_string()));
    let info = r.info().map_err(|e| fail(format!("listing the repository: {e}")))?;
    let files: Vec<&str> = info.siblings.iter().map(|s| s.rfilename.as_str()).filter(|f| wanted(f)).collect();
    if !files.iter().any(|f| f.ends_with(".safetensors")) || !files.contains(&"config.json") {
        return Err(fail(format!("the repository has no config.json and safetensors weights (files: {})", info.siblings.iter().map(|s| s.rfilename.as_str()).collect::<Vec<_>>().join(", "))));
    }
    let mut snapshot = None;
    for f in files {
        eprintln!("downloading {repo}/{f}");
        let local = r.get(f).map_err(|e| fail(format!("{f}: {e}")))?;
        snapshot = local.parent().map(Path::to_path_buf);
    }
    Ok(snapshot.expect("at least config.json"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_and_paths_are_told_apart() {
        assert_eq!(parse_id("HuggingFaceTB/SmolLM2-135M-Instruct"), Some(("HuggingFaceTB/SmolLM2-135M-Instruct", "main")));
        assert_eq!(parse_id("org/name@v1.0"), Some(("org/name", "v1.0")));
        assert!(wanted("model-00001-of-00002.safetensors") && wanted("tokenizer.json"));
        assert!(!wanted("pytorch_model.bin") && !wanted("onnx/model.safetensors") && !wanted("model.gguf") && !wanted("adapter_model.safetensors"));
        for path in ["./org/name", "/abs/dir", "dir", "a/b/c", "../x", "org/", "org/name@", "runs/../x", ".cache/smollm2-hf", "org/-x", "a--b/c"] {
            assert_eq!(parse_id(path), None, "{path}");
        }
    }
}
