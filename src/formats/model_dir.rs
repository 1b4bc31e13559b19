//! A Hugging Face model directory: `config.json`, safetensors weights (one file or shards with
//! `model.safetensors.index.json`), `tokenizer.json`, `tokenizer_config.json`,
//! `generation_config.json` and whatever else it holds.
//!
//! Reading: the sidecar values ft needs besides the config (special tokens, generation stop ids),
//! each read in one place. Writing: [`ModelDirWriter`], the one writer `ft merge`, `ft quantize`
//! and `ft import-gguf` use — staged under a temporary name, shards written one at a time, the
//! index and `config.json` patched, every other file copied, fsynced and renamed into place.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::safetensors::{write_safetensors, RawTensors, WeightsError};
use crate::atomic::{AtomicError, StagedDir};

/// Errors from reading sidecars or writing a model directory.
#[derive(Debug, thiserror::Error)]
pub enum ModelDirError {
    #[error("cannot read {path}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path} is not valid JSON")]
    Json { path: PathBuf, source: serde_json::Error },
    #[error(transparent)]
    Weights(#[from] WeightsError),
    #[error(transparent)]
    Output(#[from] AtomicError),
}

fn read_json(path: &Path) -> Result<Value, ModelDirError> {
    let bytes = std::fs::read(path).map_err(|source| ModelDirError::Read { path: path.into(), source })?;
    serde_json::from_slice(&bytes).map_err(|source| ModelDirError::Json { path: path.into(), source })
}

/// `config.json` as a JSON value (for patching; [`crate::model::ModelConfig`] resolves it).
pub fn config_json(dir: &Path) -> Result<Value, ModelDirError> {
    read_json(&dir.join("config.json"))
}

/// Token ids written as a number or a list of numbers (`eos_token_id` and friends).
pub fn token_ids(v: Option<&Value>) -> Vec<u32> {
    match v {
        Some(Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        Some(Value::Array(a)) => a.iter().filter_map(|x| x.as_u64().map(|x| x as u32)).collect(),
        _ => vec![],
    }
}

/// A token string as `tokenizer_config.json` writes it: a plain string or an AddedToken object.
pub fn token_str(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(String::from),
        _ => None,
    }
}

/// `tokenizer_config.json`, or `Null` when the directory has none.
pub fn tokenizer_config(dir: &Path) -> Result<Value, ModelDirError> {
    let path = dir.join("tokenizer_config.json");
    if path.exists() {
        read_json(&path)
    } else {
        Ok(Value::Null)
    }
}

/// The `eos_token_id`s of `generation_config.json` (none when it is missing or unreadable:
/// the file is optional).
pub fn generation_eos_ids(dir: &Path) -> Vec<u32> {
    read_json(&dir.join("generation_config.json")).map(|v| token_ids(v.get("eos_token_id"))).unwrap_or_default()
}

/// Writes a model directory: shards through [`Self::write_shard`], the remaining files through
/// [`Self::write_file`] or [`Self::copy_sidecars`], then [`Self::commit`]. Dropped without a
/// commit, nothing is left behind.
pub struct ModelDirWriter {
    staged: StagedDir,
    weight_map: serde_json::Map<String, Value>,
    total_size: usize,
}

impl ModelDirWriter {
    /// Starts writing `out`, which must not exist yet (or be empty).
    pub fn new(out: &Path) -> Result<Self, ModelDirError> {
        Ok(ModelDirWriter { staged: StagedDir::new(out)?, weight_map: Default::default(), total_size: 0 })
    }

    /// Writes one safetensors file of the model (with `{"format": "pt"}` added to `metadata`).
    pub fn write_shard(&mut self, file_name: &str, tensors: &RawTensors, metadata: Option<HashMap<String, String>>) -> Result<(), ModelDirError> {
        for (name, _, _, bytes) in tensors {
            self.total_size += bytes.len();
            self.weight_map.insert(name.clone(), file_name.into());
        }
        write_safetensors(&self.staged.path(file_name), tensors, metadata)?;
        Ok(())
    }

    /// Where the directory is being written (it is renamed into place by [`Self::commit`]).
    pub fn staged(&self) -> &Path {
        &self.staged.tmp
    }

    /// Bytes of tensor data written so far.
    pub fn total_size(&self) -> usize {
        self.total_size
    }

    /// Writes a file of the directory.
    pub fn write_file(&self, name: &str, bytes: &[u8]) -> Result<(), ModelDirError> {
        Ok(crate::atomic::write_atomic(&self.staged.path(name), bytes)?)
    }

    /// Writes a JSON file of the directory, pretty-printed as transformers writes them.
    pub fn write_json(&self, name: &str, value: &Value) -> Result<(), ModelDirError> {
        self.write_file(name, &serde_json::to_vec_pretty(value).expect("JSON values serialize"))
    }

    /// Copies every file of `src` that is not a safetensors file: `config.json` through `patch`
    /// (which returns whether it changed anything; an unchanged config is copied byte for byte),
    /// `model.safetensors.index.json` with the weight map and total size of the shards written
    /// here, everything else (tokenizer, generation config, ...) as it is.
    pub fn copy_sidecars(&self, src: &Path, patch: impl FnOnce(&mut Value) -> bool) -> Result<(), ModelDirError> {
        let entries = std::fs::read_dir(src).map_err(|source| ModelDirError::Read { path: src.into(), source })?;
        let mut patch = Some(patch);
        for entry in entries {
            let p = entry.map_err(|source| ModelDirError::Read { path: src.into(), source })?.path();
            let name = p.file_name().expect("directory entry").to_string_lossy().into_owned();
            if !p.is_file() || name.ends_with(".safetensors") {
                continue;
            }
            match name.as_str() {
                "config.json" => {
                    let mut v = read_json(&p)?;
                    if patch.take().is_some_and(|f| f(&mut v)) {
                        self.write_json(&name, &v)?;
                    } else {
                        let bytes = std::fs::read(&p).map_err(|source| ModelDirError::Read { path: p.clone(), source })?;
                        self.write_file(&name, &bytes)?;
                    }
                }
                "model.safetensors.index.json" => {
                    let mut v = read_json(&p)?;
                    v["metadata"]["total_size"] = self.total_size.into();
                    v["weight_map"] = self.weight_map.clone().into();
                    self.write_json(&name, &v)?;
                }
                _ => {
                    let bytes = std::fs::read(&p).map_err(|source| ModelDirError::Read { path: p.clone(), source })?;
                    self.write_file(&name, &bytes)?;
                }
            }
        }
        Ok(())
    }

    /// fsyncs everything and renames the directory into place.
    pub fn commit(self) -> Result<PathBuf, ModelDirError> {
        Ok(self.staged.commit()?)
    }
}
