//! Reference log-probs computed once before training and cached in the run directory (DPO's and
//! KTO's `precompute_ref`): steps then skip the reference forward. The cache is keyed by
//! everything the values depend on, and holds each value's f64 bits, so a resumed run reads back
//! exactly what the first one computed.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::Digest;

use super::{IoAt, TrainError};
use crate::data::conversation::expand_data_path;
use crate::data::template::ChatTemplate;
use crate::progress::Progress;

/// Where precomputed reference log-probs are cached and which model they belong to.
#[derive(Debug, Clone)]
pub struct ReferenceCache {
    pub path: PathBuf,
    pub model_dir: PathBuf,
    /// The frozen starting adapter when it is the reference.
    pub adapter: Option<PathBuf>,
}

/// The cache key: every byte of the model's weights, config and tokenizer, of the reference
/// adapter if any, of the training data, the template source, and `salt` (the objective's
/// settings that change the values: length limits, KL blocks).
pub fn key(rc: &ReferenceCache, train: &Path, template: &ChatTemplate, salt: &str) -> Result<String, TrainError> {
    let model_dir = rc.model_dir.as_path();
    let mut h = sha2::Sha256::new();
    let mut files: Vec<_> = std::fs::read_dir(model_dir)
        .at("cannot read", model_dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let n = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            n.ends_with(".safetensors") || n == "config.json" || n == "tokenizer.json"
        })
        .collect();
    files.sort();
    if let Some(a) = &rc.adapter {
        files.extend([a.join("adapter_config.json"), a.join("adapter_model.safetensors")]);
    }
    files.extend(expand_data_path(train)?);
    for f in files {
        let mut file = std::fs::File::open(&f).at("cannot read", &f)?;
        h.update(f.file_name().map(|n| n.as_encoded_bytes()).unwrap_or_default());
        std::io::copy(&mut file, &mut h).at("cannot read", &f)?;
    }
    h.update(template.source.as_bytes());
    h.update(salt.as_bytes());
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// A value of the cache: a fixed number of f64s.
pub trait Values: Sized + Clone {
    fn to_values(&self) -> Vec<f64>;
    fn from_values(v: &[f64]) -> Option<Self>;
}

impl Values for (f64, f64) {
    fn to_values(&self) -> Vec<f64> {
        vec![self.0, self.1]
    }
    fn from_values(v: &[f64]) -> Option<Self> {
        match v {
            [a, b] => Some((*a, *b)),
            _ => None,
        }
    }
}

/// The file: the key and, per training example, its values' bits where computed.
#[derive(Serialize, Deserialize)]
struct CacheFile {
    key: String,
    bits: Vec<Option<Vec<u64>>>,
}

/// Reference values per training example, where computed, and their cache file.
pub struct Precomputed<T> {
    pub values: Vec<Option<T>>,
    path: PathBuf,
    key: String,
}

impl<T: Values> Precomputed<T> {
    /// Reads back the cache at `path` when its key matches and it has `n` examples; else starts
    /// empty.
    pub fn open(path: &Path, key: String, n: usize) -> Self {
        let cached = std::fs::read(path).ok().and_then(|b| serde_json::from_slice::<CacheFile>(&b).ok());
        let values = match cached {
            Some(c) if c.key == key && c.bits.len() == n => c
                .bits
                .iter()
                .map(|b| b.as_ref().and_then(|b| T::from_values(&b.iter().map(|x| f64::from_bits(*x)).collect::<Vec<_>>())))
                .collect(),
            _ => vec![None; n],
        };
        Precomputed { values, path: path.to_path_buf(), key }
    }

    /// The values of examples `idx`, if every one is computed.
    pub fn all(&self, idx: &[usize]) -> Option<Vec<T>> {
        idx.iter().map(|&i| self.values[i].clone()).collect()
    }

    /// Computes the values of the `upcoming` examples the cache lacks, `batch` at a time with
    /// `compute`, then saves the cache.
    pub fn fill(&mut self, upcoming: &[usize], batch: usize, what: &str, progress: &dyn Progress, mut compute: impl FnMut(&[usize]) -> Vec<T>) -> Result<(), TrainError> {
        let mut missing: Vec<usize> = upcoming.iter().copied().filter(|&i| self.values[i].is_none()).collect();
        missing.sort_unstable();
        missing.dedup();
        if missing.is_empty() {
            return Ok(());
        }
        progress.status(&format!("precomputing reference log-probs of {} {what}", missing.len()));
        for chunk in missing.chunks(batch.max(1)) {
            for (&i, v) in chunk.iter().zip(compute(chunk)) {
                self.values[i] = Some(v);
            }
        }
        let bits = self.values.iter().map(|v| v.as_ref().map(|v| v.to_values().iter().map(|x| x.to_bits()).collect())).collect();
        let file = CacheFile { key: self.key.clone(), bits };
        Ok(crate::atomic::write_atomic(&self.path, &serde_json::to_vec(&file).expect("cache serializes"))?)
    }
}
