//! Crash-safe training checkpoints: `RUN/checkpoint-STEP/` holds the adapter (PEFT format), the
//! optimizer moments, the trainer state (step, epoch, data cursor, tokens seen), the objective's
//! own state where it has one (`objective_state.json`: GRPO's generation batch) and a manifest of
//! sha256 sums. It is written under a temporary name, fsynced, marked `COMPLETE` last and renamed;
//! resume only ever reads complete checkpoints whose files match their manifest.

use std::path::{Path, PathBuf};

use burn::prelude::*;
use burn::tensor::TensorData;
use sha2::Digest;

use super::state::{Fingerprint, TrainState};
use super::{IoAt, TrainError};
use crate::atomic::{write_atomic, StagedDir};
use crate::formats::safetensors::{write_safetensors, RawTensors, TensorFiles};

type Result<T> = std::result::Result<T, TrainError>;

/// Tests only (the `fault-injection` feature): the step whose checkpoint fails like a full disk
/// halfway through, from `FT_FAIL_CHECKPOINT_AT`.
#[cfg(feature = "fault-injection")]
fn failing_step() -> Option<usize> {
    std::env::var("FT_FAIL_CHECKPOINT_AT").ok().and_then(|v| v.parse().ok())
}

#[cfg(not(feature = "fault-injection"))]
fn failing_step() -> Option<usize> {
    None
}

const COMPLETE: &str = "COMPLETE";

fn sha256_file(p: &Path) -> Result<String> {
    let bytes = std::fs::read(p).at("cannot read", p)?;
    Ok(sha2::Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect())
}

fn tensors_to_file<B: Backend>(path: &Path, named: Vec<(String, Tensor<B, 2>)>) -> Result<()> {
    let data: RawTensors = named
        .into_iter()
        .map(|(n, t)| {
            let shape = t.dims().to_vec();
            let v: Vec<f32> = t.into_data().convert::<f32>().to_vec().expect("f32");
            (n, safetensors::Dtype::F32, shape, bytemuck::cast_slice(&v).to_vec())
        })
        .collect();
    Ok(write_safetensors(path, &data, None)?)
}

const OBJECTIVE_STATE: &str = "objective_state.json";

/// The optimizer's first and second moments.
pub type Moments<'a, B> = (&'a [Tensor<B, 2>], &'a [Tensor<B, 2>]);

/// Writes `checkpoint-{state.step}` into `run`: `save_adapter` writes the PEFT adapter into the
/// directory it is given; `(m, v)` are the optimizer moments; `objective` the objective's state.
pub fn save<B: Backend>(
    run: &Path,
    state: &TrainState,
    fingerprint: &Fingerprint,
    save_adapter: impl FnOnce(&Path) -> Result<()>,
    (m, v): Moments<B>,
    objective: Option<&serde_json::Value>,
    keep_last: usize,
) -> Result<PathBuf> {
    let target = run.join(format!("checkpoint-{}", state.step));
    if target.exists() {
        std::fs::remove_dir_all(&target).at("cannot replace", &target)?;
    }
    let staged = StagedDir::new(&target)?;
    save_adapter(&staged.path("adapter"))?;
    // Fault injection for tests: fail like a full disk halfway through this checkpoint.
    if failing_step() == Some(state.step) {
        return Err(std::io::Error::new(std::io::ErrorKind::StorageFull, "No space left on device (simulated)")).at("writing", &target);
    }
    let mut named = Vec::new();
    for (i, (a, b)) in m.iter().zip(v).enumerate() {
        named.push((format!("m.{i}"), a.clone()));
        named.push((format!("v.{i}"), b.clone()));
    }
    tensors_to_file(&staged.path("optimizer.safetensors"), named)?;
    write_atomic(&staged.path("trainer_state.json"), &serde_json::to_vec_pretty(state).expect("state serializes"))?;
    write_atomic(&staged.path("fingerprint.json"), &serde_json::to_vec_pretty(fingerprint).expect("fingerprint serializes"))?;
    let mut files = vec!["adapter/adapter_model.safetensors", "adapter/adapter_config.json", "optimizer.safetensors", "trainer_state.json", "fingerprint.json"];
    if let Some(o) = objective {
        write_atomic(&staged.path(OBJECTIVE_STATE), &serde_json::to_vec(o).expect("JSON serializes"))?;
        files.push(OBJECTIVE_STATE);
    }
    let mut manifest = serde_json::Map::new();
    for f in files {
        manifest.insert(f.into(), sha256_file(&staged.tmp.join(f))?.into());
    }
    write_atomic(&staged.path("manifest.json"), &serde_json::to_vec_pretty(&manifest).expect("JSON serializes"))?;
    write_atomic(&staged.path(COMPLETE), b"")?;
    let out = staged.commit()?;
    prune(run, keep_last)?;
    Ok(out)
}

/// Complete checkpoints of a run, oldest first.
pub fn complete_checkpoints(run: &Path) -> Vec<(usize, PathBuf)> {
    let mut v: Vec<(usize, PathBuf)> = std::fs::read_dir(run)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter_map(|p| {
            let step = p.file_name()?.to_str()?.strip_prefix("checkpoint-")?.parse().ok()?;
            p.join(COMPLETE).exists().then_some((step, p))
        })
        .collect();
    v.sort();
    v
}

fn prune(run: &Path, keep_last: usize) -> Result<()> {
    let all = complete_checkpoints(run);
    if keep_last > 0 && all.len() > keep_last {
        for (_, p) in &all[..all.len() - keep_last] {
            std::fs::remove_dir_all(p).at("cannot remove the old checkpoint", p)?;
        }
    }
    Ok(())
}

/// A checkpoint read back: state, adapter directory, and the optimizer moments.
pub struct Loaded<B: Backend> {
    pub dir: PathBuf,
    pub state: TrainState,
    /// What the run trained on (`None` for checkpoints written before ft recorded it).
    pub fingerprint: Option<Fingerprint>,
    pub m: Vec<Tensor<B, 2>>,
    pub v: Vec<Tensor<B, 2>>,
    /// The objective's state, where it saved one.
    pub objective: Option<serde_json::Value>,
}

/// The newest complete checkpoint of `run` whose files match its manifest.
pub fn load_latest<B: Backend>(run: &Path, device: &B::Device) -> Result<Option<Loaded<B>>> {
    let Some((_, dir)) = complete_checkpoints(run).pop() else { return Ok(None) };
    let read_json = |name: &str| -> Result<serde_json::Value> {
        let path = dir.join(name);
        let bytes = std::fs::read(&path).at("cannot read", &path)?;
        serde_json::from_slice(&bytes).map_err(|e| TrainError::Invalid { path, msg: format!("not valid JSON: {e}") })
    };
    let manifest = read_json("manifest.json")?;
    for (f, sum) in manifest.as_object().into_iter().flatten() {
        if sha256_file(&dir.join(f))? != sum.as_str().unwrap_or_default() {
            let msg = format!("{f} does not match its sha256 in manifest.json; the checkpoint is damaged");
            return Err(TrainError::Invalid { path: dir.clone(), msg });
        }
    }
    let state: TrainState = serde_json::from_value(read_json("trainer_state.json")?)
        .map_err(|e| TrainError::Invalid { path: dir.join("trainer_state.json"), msg: e.to_string() })?;
    let fingerprint = match dir.join("fingerprint.json").exists() {
        true => Some(
            serde_json::from_value(read_json("fingerprint.json")?)
                .map_err(|e| TrainError::Invalid { path: dir.join("fingerprint.json"), msg: e.to_string() })?,
        ),
        false => None,
    };
    let ck = TensorFiles::open_file(&dir.join("optimizer.safetensors"))?;
    let (mut m, mut v) = (Vec::new(), Vec::new());
    let mut i = 0;
    while let Some((shape, _)) = ck.info(&format!("m.{i}")) {
        for (name, out) in [(format!("m.{i}"), &mut m), (format!("v.{i}"), &mut v)] {
            let data = ck.f32(&name, &shape)?;
            out.push(Tensor::from_data(TensorData::new(data, [shape[0], shape[1]]), (device, burn::tensor::DType::F32)));
        }
        i += 1;
    }
    let objective = match dir.join(OBJECTIVE_STATE).exists() {
        true => Some(read_json(OBJECTIVE_STATE)?),
        false => None,
    };
    Ok(Some(Loaded { dir, state, fingerprint, m, v, objective }))
}
