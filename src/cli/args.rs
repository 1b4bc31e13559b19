//! Flags several commands share, declared once, and the model loading they share.

use std::path::{Path, PathBuf};

use anyhow::Result;

use crate::adapters::peft::PeftAdapter;
use crate::backend::{ComputeDtype, DeviceChoice};
use crate::model::{Decoder, LoadOptions};
use crate::ops::Kernels;

/// A `--model` value: a directory, or a Hugging Face model id (`org/name[@revision]`) resolved
/// from the local hub cache (`formats::hf_cache`).
pub fn model_dir(s: &str) -> std::result::Result<PathBuf, String> {
    crate::formats::hf_cache::resolve_or_download(Path::new(s)).map_err(|e| e.to_string())
}

/// Where to run and in which dtype.
#[derive(Debug, Clone, Copy, clap::Args)]
pub struct BackendArgs {
    /// Where to run: cpu, or cuda (needs a build with `--features cuda`).
    #[arg(long, value_enum, default_value_t = DeviceChoice::Cpu)]
    pub device: DeviceChoice,
    /// Compute dtype: f32, or bf16 (CUDA only).
    #[arg(long, value_enum, default_value_t = ComputeDtype::F32)]
    pub dtype: ComputeDtype,
}

/// Loads a model and, if given, attaches a PEFT adapter.
pub fn load_with_adapter<B: Kernels>(model: &Path, adapter: Option<&Path>, device: &B::Device) -> Result<Decoder<B>> {
    let mut m = crate::model::load::<B>(model, device, LoadOptions::default())?;
    if let Some(dir) = adapter {
        PeftAdapter::open(dir)?.attach(&mut m)?;
    }
    Ok(m)
}
