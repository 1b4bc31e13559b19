//! The model: config resolution, rotary embeddings, checkpoint reading and the decoder.

pub mod config;
pub mod decoder;
pub mod rope;
pub mod weights;

use crate::backend::Kernels;
use std::path::Path;

pub use config::{ConfigError, ModelConfig};
pub use decoder::{BlockInputs, Decoder, KvCache};
pub use weights::{Checkpoint, WeightsError};


/// Loads `config.json` and the safetensors weights of a Hugging Face model directory.
pub fn load<B: Kernels>(dir: &Path, device: &B::Device) -> anyhow::Result<Decoder<B>> {
    load_with(dir, device, false)
}

/// [`load`], with the decoder blocks' linear weights quantized to NF4 as they are read when
/// `quantize_base` (QLoRA).
pub fn load_with<B: Kernels>(dir: &Path, device: &B::Device, quantize_base: bool) -> anyhow::Result<Decoder<B>> {
    if !dir.is_dir() {
        anyhow::bail!("{}: not a directory (expected a Hugging Face model directory with config.json and safetensors)", dir.display());
    }
    let mut config = ModelConfig::from_dir(dir)?;
    config.quantize_base = quantize_base;
    let ck = Checkpoint::open(dir)?;
    build(ck, config, dir, device)
}

/// A model of the shape `dir/config.json` describes with random weights (seeded), for
/// benchmarks; `quantize_base` as in [`load_with`].
pub fn random<B: Kernels>(dir: &Path, device: &B::Device, quantize_base: bool, seed: u64) -> anyhow::Result<Decoder<B>> {
    let mut config = ModelConfig::from_dir(dir)?;
    config.quantize_base = quantize_base;
    build(Checkpoint::random(dir, seed), config, dir, device)
}

fn build<B: Kernels>(ck: Checkpoint, config: ModelConfig, dir: &Path, device: &B::Device) -> anyhow::Result<Decoder<B>> {
    use anyhow::Context;
    let model = Decoder::load(&ck, &config, device).with_context(|| format!("loading the {} model in {}", config.family.as_str(), dir.display()))?;
    Ok(model)
}
