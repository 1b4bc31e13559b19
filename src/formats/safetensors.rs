//! safetensors files: reading a model's tensors (`model.safetensors` or a sharded
//! `model.safetensors.index.json`, or one file such as an adapter's), memory-mapped (the page cache holds the file; ft converts one tensor at a time, so the
//! weights never exist twice in anonymous memory). f32, bf16 and f16 on disk all load as f32.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use memmap2::Mmap;
use safetensors::tensor::{Dtype, Metadata};
use safetensors::SafeTensors;

/// Errors from reading checkpoint tensors. Each names the file or tensor concerned.
#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    #[error("{dir}: no model.safetensors or model.safetensors.index.json (expected a Hugging Face checkpoint directory)")]
    NoWeights { dir: PathBuf },
    #[error("cannot read {path}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path} is not a valid safetensors file; the file may be truncated or corrupt")]
    Corrupt { path: PathBuf, source: safetensors::SafeTensorError },
    #[error("{path}: invalid index: {msg}")]
    Index { path: PathBuf, msg: String },
    #[error("shard {shard} listed in {index} is missing")]
    MissingShard { index: PathBuf, shard: PathBuf },
    #[error("tensor {name} is missing from the checkpoint in {dir}")]
    MissingTensor { name: String, dir: PathBuf },
    #[error("tensor {name} in {path} has shape {got:?}, expected {expected:?}")]
    ShapeMismatch { name: String, path: PathBuf, expected: Vec<usize>, got: Vec<usize> },
    #[error("tensor {name} in {path} has dtype {dtype:?}; expected F32, BF16 or F16")]
    UnsupportedDtype { name: String, path: PathBuf, dtype: Dtype },
    #[error("the checkpoint in {dir} has tensors the model does not use: {names}")]
    Unused { dir: PathBuf, names: String },
    #[error("writing {path}")]
    Write { path: PathBuf, source: safetensors::SafeTensorError },
}

struct Shard {
    path: PathBuf,
    mmap: Mmap,
    header_len: usize,
    meta: Metadata,
}

/// A tensor as stored: its bytes, dtype and shape, and the file holding it.
pub type RawTensor<'a> = (&'a [u8], Dtype, Vec<usize>, &'a Path);

/// Memory-mapped safetensors files (one, or the shards of an index). Tracks which tensors were
/// read so that leftovers can be reported.
pub struct TensorFiles {
    dir: PathBuf,
    /// A stand-in with no files: every weight is drawn from a seeded RNG (benchmarks of a
    /// model's shape without its weights).
    random: Option<u64>,
    shards: Vec<Shard>,
    /// tensor name → shard index
    names: BTreeMap<String, usize>,
    used: Mutex<HashSet<String>>,
}

fn open_shard(path: &Path) -> Result<Shard, WeightsError> {
    let file = File::open(path).map_err(|source| WeightsError::Io { path: path.into(), source })?;
    // SAFETY: the file is opened read-only; a checkpoint modified while ft runs is outside
    // what any loader can guard against (transformers and candle map files the same way).
    let mmap = unsafe { Mmap::map(&file) }.map_err(|source| WeightsError::Io { path: path.into(), source })?;
    let (header_len, meta) =
        SafeTensors::read_metadata(&mmap).map_err(|source| WeightsError::Corrupt { path: path.into(), source })?;
    Ok(Shard { path: path.into(), mmap, header_len, meta })
}

impl TensorFiles {
    /// Opens the safetensors checkpoint in `dir`.
    pub fn open(dir: &Path) -> Result<Self, WeightsError> {
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        let mut shards = Vec::new();
        let mut names = BTreeMap::new();
        if index.exists() {
            let text = std::fs::read_to_string(&index).map_err(|source| WeightsError::Io { path: index.clone(), source })?;
            let v: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| WeightsError::Index { path: index.clone(), msg: e.to_string() })?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| WeightsError::Index { path: index.clone(), msg: "no \"weight_map\" object".into() })?;
            let mut files: Vec<String> = map.values().filter_map(|f| f.as_str().map(String::from)).collect();
            files.sort();
            files.dedup();
            let mut shard_of: HashMap<String, usize> = HashMap::new();
            for f in &files {
                let p = dir.join(f);
                if !p.exists() {
                    return Err(WeightsError::MissingShard { index: index.clone(), shard: p });
                }
                shard_of.insert(f.clone(), shards.len());
                shards.push(open_shard(&p)?);
            }
            for (name, f) in map {
                let f = f.as_str().unwrap_or_default();
                let i = shard_of[f];
                if shards[i].meta.info(name).is_none() {
                    return Err(WeightsError::Index {
                        path: index.clone(),
                        msg: format!("{name} is mapped to {f}, which does not hold it"),
                    });
                }
                names.insert(name.clone(), i);
            }
        } else if single.exists() {
            let shard = open_shard(&single)?;
            for name in shard.meta.tensors().keys() {
                names.insert(name.clone(), 0);
            }
            shards.push(shard);
        } else {
            return Err(WeightsError::NoWeights { dir: dir.into() });
        }
        Ok(TensorFiles { dir: dir.into(), random: None, shards, names, used: Mutex::new(HashSet::new()) })
    }

    /// Opens one safetensors file (an adapter, a single shard).
    pub fn open_file(path: &Path) -> Result<Self, WeightsError> {
        let shard = open_shard(path)?;
        let names = shard.meta.tensors().keys().map(|n| (n.clone(), 0)).collect();
        let dir = path.parent().unwrap_or(Path::new(".")).to_path_buf();
        Ok(TensorFiles { dir, random: None, shards: vec![shard], names, used: Mutex::new(HashSet::new()) })
    }

    /// A checkpoint of random weights for the model configured in `dir`: norm weights 1, biases
    /// 0, everything else uniform with standard deviation 0.02 (transformers' initializer range),
    /// each tensor from an RNG seeded by `seed` and its name.
    pub fn random(dir: &Path, seed: u64) -> Self {
        TensorFiles { dir: dir.into(), random: Some(seed), shards: vec![], names: BTreeMap::new(), used: Mutex::new(HashSet::new()) }
    }

    fn random_tensor(seed: u64, name: &str, n: usize) -> Vec<f32> {
        use rand::{Rng, SeedableRng};
        if name.ends_with("norm.weight") {
            return vec![1.0; n];
        }
        if name.ends_with(".bias") {
            return vec![0.0; n];
        }
        let h = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3));
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ h);
        let a = 0.02 * 3f32.sqrt();
        (0..n).map(|_| rng.random_range(-a..a)).collect()
    }

    /// The files holding the tensors (one per shard).
    pub fn files(&self) -> Vec<&Path> {
        self.shards.iter().map(|s| s.path.as_path()).collect()
    }

    /// Names of the tensors stored in shard `i`, in file order.
    pub fn shard_names(&self, i: usize) -> Vec<String> {
        let mut v: Vec<(usize, String)> =
            self.shards[i].meta.tensors().iter().map(|(n, t)| (t.data_offsets.0, n.clone())).collect();
        v.sort();
        v.into_iter().map(|(_, n)| n).collect()
    }

    /// The `__metadata__` of shard `i`.
    pub fn shard_metadata(&self, i: usize) -> Option<std::collections::HashMap<String, String>> {
        self.shards[i].meta.metadata().clone()
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn contains(&self, name: &str) -> bool {
        self.names.contains_key(name)
    }

    /// All tensor names, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.names.keys().map(String::as_str)
    }

    /// Shape and dtype of a tensor, if present.
    pub fn info(&self, name: &str) -> Option<(Vec<usize>, Dtype)> {
        let i = *self.names.get(name)?;
        self.shards[i].meta.info(name).map(|t| (t.shape.clone(), t.dtype))
    }

    /// Raw bytes of a tensor as stored, with its dtype and shape. Marks it used.
    pub fn raw(&self, name: &str) -> Result<RawTensor<'_>, WeightsError> {
        let i = *self
            .names
            .get(name)
            .ok_or_else(|| WeightsError::MissingTensor { name: name.into(), dir: self.dir.clone() })?;
        let shard = &self.shards[i];
        let info = shard.meta.info(name).expect("index checked at open");
        let start = 8 + shard.header_len + info.data_offsets.0;
        let end = 8 + shard.header_len + info.data_offsets.1;
        self.used.lock().expect("poisoned").insert(name.to_string());
        Ok((&shard.mmap[start..end], info.dtype, info.shape.clone(), &shard.path))
    }

    /// A float tensor's values as stored (or generated, for a random checkpoint), checked against
    /// `expected` shape and for a float dtype; read them with [`Values::get`] without making an
    /// f32 copy.
    pub fn values(&self, name: &str, expected: &[usize]) -> Result<Values<'_>, WeightsError> {
        if self.random.is_some() {
            return Ok(Values::F32Vec(self.f32(name, expected)?));
        }
        let (bytes, dtype, shape, path) = self.raw(name)?;
        if shape != expected {
            return Err(WeightsError::ShapeMismatch { name: name.into(), path: path.into(), expected: expected.to_vec(), got: shape });
        }
        match dtype {
            Dtype::F32 | Dtype::BF16 | Dtype::F16 => Ok(Values::Bytes(bytes, dtype)),
            _ => Err(WeightsError::UnsupportedDtype { name: name.into(), path: path.into(), dtype }),
        }
    }

    /// A tensor converted to f32, checked against `expected` shape.
    pub fn f32(&self, name: &str, expected: &[usize]) -> Result<Vec<f32>, WeightsError> {
        if let Some(seed) = self.random {
            return Ok(Self::random_tensor(seed, name, expected.iter().product()));
        }
        let (bytes, dtype, shape, path) = self.raw(name)?;
        if shape != expected {
            return Err(WeightsError::ShapeMismatch {
                name: name.into(),
                path: path.into(),
                expected: expected.to_vec(),
                got: shape,
            });
        }
        to_f32(bytes, dtype).ok_or_else(|| WeightsError::UnsupportedDtype { name: name.into(), path: path.into(), dtype })
    }

    /// Drops a tensor's pages from this process's resident memory once it has been read (they stay
    /// in the page cache; a later read faults them back in from the file), so a pass over the
    /// whole checkpoint holds about one tensor, not the model. Best effort; a no-op off Unix.
    pub fn release(&self, name: &str) {
        #[cfg(unix)]
        if let Some(&i) = self.names.get(name) {
            let shard = &self.shards[i];
            if let Some(info) = shard.meta.info(name) {
                let start = 8 + shard.header_len + info.data_offsets.0;
                let len = info.data_offsets.1 - info.data_offsets.0;
                // SAFETY: a read-only, file-backed private map: after MADV_DONTNEED the pages read
                // back the file's bytes, which ft never modifies, so no observer sees a change.
                let _ = unsafe { shard.mmap.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, len) };
            }
        }
        #[cfg(not(unix))]
        let _ = name;
    }

    /// Marks a tensor as deliberately ignored (e.g. a tied `lm_head.weight`).
    pub fn skip(&self, name: &str) {
        self.used.lock().expect("poisoned").insert(name.to_string());
    }

    /// Errors if any tensor was never read (a wrong architecture or a misnamed checkpoint).
    pub fn check_all_used(&self) -> Result<(), WeightsError> {
        let used = self.used.lock().expect("poisoned");
        let unused: Vec<&str> = self
            .names
            .keys()
            .filter(|n| !used.contains(*n) && !n.ends_with("rotary_emb.inv_freq"))
            .map(String::as_str)
            .collect();
        if unused.is_empty() {
            Ok(())
        } else {
            let mut names = unused.iter().take(8).copied().collect::<Vec<_>>().join(", ");
            if unused.len() > 8 {
                names.push_str(&format!(" and {} more", unused.len() - 8));
            }
            Err(WeightsError::Unused { dir: self.dir.clone(), names })
        }
    }
}

/// Named tensors as stored: name, dtype, shape, little-endian bytes.
pub type RawTensors = Vec<(String, Dtype, Vec<usize>, Vec<u8>)>;

/// Writes `tensors` as a safetensors file with `metadata` plus `"format": "pt"` (what
/// transformers expects).
pub fn write_safetensors(path: &Path, tensors: &RawTensors, metadata: Option<HashMap<String, String>>) -> Result<(), WeightsError> {
    let write = |source| WeightsError::Write { path: path.into(), source };
    let views = tensors
        .iter()
        .map(|(n, d, s, b)| Ok((n.clone(), safetensors::tensor::TensorView::new(*d, s.clone(), b)?)))
        .collect::<Result<Vec<_>, safetensors::SafeTensorError>>()
        .map_err(write)?;
    let mut meta = metadata.unwrap_or_default();
    meta.insert("format".into(), "pt".into());
    safetensors::serialize_to_file(views, Some(meta), path).map_err(write)
}

/// Little-endian f32/bf16/f16 bytes to f32 values; `None` for other dtypes.
/// A float tensor's values in the checkpoint: its little-endian bytes (F32, BF16 or F16), or
/// generated f32s.
pub enum Values<'a> {
    Bytes(&'a [u8], Dtype),
    F32Vec(Vec<f32>),
}

impl Values<'_> {
    /// The values as a `[rows, cols]` matrix (`[cols, rows]`, transposed, when `transpose`), each
    /// converted by `conv` from its exact f32 value, in one parallel pass without an f32 copy.
    pub fn arrange<T: Copy + Default + Send>(&self, rows: usize, cols: usize, transpose: bool, conv: impl Fn(f32) -> T + Sync) -> Vec<T> {
        match self {
            Values::F32Vec(v) => arrange(rows, cols, transpose, |i| conv(v[i])),
            Values::Bytes(b, Dtype::F32) => arrange(rows, cols, transpose, |i| conv(f32::from_le_bytes([b[4 * i], b[4 * i + 1], b[4 * i + 2], b[4 * i + 3]]))),
            Values::Bytes(b, Dtype::BF16) => arrange(rows, cols, transpose, |i| conv(half::bf16::from_bits(u16::from_le_bytes([b[2 * i], b[2 * i + 1]])).to_f32())),
            Values::Bytes(b, _) => arrange(rows, cols, transpose, |i| conv(half::f16::from_bits(u16::from_le_bytes([b[2 * i], b[2 * i + 1]])).to_f32())),
        }
    }
}

/// `get(i)` for every element `i` of a row-major `[rows, cols]` matrix, in that layout or
/// transposed (`out[c · rows + r] = get(r · cols + c)`, in 32 × 32 tiles), output rows in parallel.
pub fn arrange<T: Copy + Default + Send>(rows: usize, cols: usize, transpose: bool, get: impl Fn(usize) -> T + Sync) -> Vec<T> {
    use rayon::prelude::*;
    const TILE: usize = 32;
    let mut out = vec![T::default(); rows * cols];
    if out.is_empty() {
        return out;
    }
    if !transpose {
        out.par_chunks_mut(cols).enumerate().for_each(|(r, row)| row.iter_mut().enumerate().for_each(|(c, o)| *o = get(r * cols + c)));
        return out;
    }
    out.par_chunks_mut(TILE * rows).enumerate().for_each(|(k, block)| {
        let c0 = k * TILE;
        let width = block.len() / rows;
        for r0 in (0..rows).step_by(TILE) {
            for dc in 0..width {
                for r in r0..(r0 + TILE).min(rows) {
                    block[dc * rows + r] = get(r * cols + c0 + dc);
                }
            }
        }
    });
    out
}

pub fn to_f32(bytes: &[u8], dtype: Dtype) -> Option<Vec<f32>> {
    Some(match dtype {
        Dtype::F32 => bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
        Dtype::BF16 => bytes
            .chunks_exact(2)
            .map(|c| half::bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
            .collect(),
        Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|c| half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
            .collect(),
        _ => return None,
    })
}

/// The dtype a converted model is written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OutDtype {
    F32,
    Bf16,
    F16,
}

impl OutDtype {
    pub fn dtype(self) -> Dtype {
        match self {
            OutDtype::F32 => Dtype::F32,
            OutDtype::Bf16 => Dtype::BF16,
            OutDtype::F16 => Dtype::F16,
        }
    }
}

/// The name PyTorch (and `config.json`'s `torch_dtype`) gives a float dtype: `float32`,
/// `bfloat16`, `float16`.
pub fn torch_name(d: Dtype) -> &'static str {
    match d {
        Dtype::BF16 => "bfloat16",
        Dtype::F16 => "float16",
        _ => "float32",
    }
}

/// f32 values as little-endian bytes of `dtype` (F32, BF16 or F16; round to nearest even).
pub fn encode(values: &[f32], dtype: Dtype) -> Vec<u8> {
    match dtype {
        Dtype::BF16 => values.iter().flat_map(|&x| half::bf16::from_f32(x).to_bits().to_le_bytes()).collect(),
        Dtype::F16 => values.iter().flat_map(|&x| half::f16::from_f32(x).to_bits().to_le_bytes()).collect(),
        _ => bytemuck::cast_slice(values).to_vec(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encode_roundtrips_f32() {
        let v = [1.5f32, -2.25];
        assert_eq!(to_f32(&encode(&v, Dtype::F32), Dtype::F32).unwrap(), v);
        assert_eq!(to_f32(&encode(&v, Dtype::BF16), Dtype::BF16).unwrap(), v);
        assert_eq!(to_f32(&encode(&v, Dtype::F16), Dtype::F16).unwrap(), v);
    }
}
