//! The model: config resolution, rotary embeddings, the projection seam, the decoder and its
//! mixture-of-experts MLP.

pub mod config;
pub mod decoder;
pub mod moe;
pub mod projection;
pub mod rope;

use std::path::{Path, PathBuf};

pub use config::{ConfigError, ModelConfig};
pub use decoder::{BlockInputs, Decoder, KvCache};
pub use projection::BaseFormat;

use crate::formats::safetensors::{TensorFiles, WeightsError};
use crate::ops::Kernels;
use projection::WeightSource;

/// Errors from loading a model directory.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{}: not a directory (expected a Hugging Face model directory with config.json and safetensors){hub}", dir.display())]
    NotADirectory { dir: PathBuf, hub: String },
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("loading the {family} model in {}", dir.display())]
    Weights { family: &'static str, dir: PathBuf, source: Box<WeightsError> },
    #[error(transparent)]
    Files(#[from] WeightsError),
}

/// How a model is loaded.
#[derive(Debug, Clone, Copy, Default)]
pub struct LoadOptions {
    /// How the decoder blocks' frozen linear weights are held (QLoRA: [`BaseFormat::Nf4`]).
    pub base: BaseFormat,
}

/// Loads `config.json` and the safetensors weights of a Hugging Face model directory.
pub fn load<B: Kernels>(dir: &Path, device: &B::Device, options: LoadOptions) -> Result<Decoder<B>, LoadError> {
    if !dir.is_dir() {
        return Err(LoadError::NotADirectory { dir: dir.into(), hub: crate::formats::hf_cache::not_found_hint(dir) });
    }
    let config = ModelConfig::from_dir(dir)?;
    build(&TensorFiles::open(dir)?, &config, dir, device, options)
}

/// A model of the shape `dir/config.json` describes with random weights (seeded), for
/// benchmarks.
pub fn random<B: Kernels>(dir: &Path, device: &B::Device, options: LoadOptions, seed: u64) -> Result<Decoder<B>, LoadError> {
    let config = ModelConfig::from_dir(dir)?;
    build(&TensorFiles::random(dir, seed), &config, dir, device, options)
}

fn build<B: Kernels>(files: &TensorFiles, config: &ModelConfig, dir: &Path, device: &B::Device, options: LoadOptions) -> Result<Decoder<B>, LoadError> {
    let src = WeightSource { files, format: options.base };
    Decoder::load(&src, config, device).map_err(|e| LoadError::Weights { family: config.family.as_str(), dir: dir.into(), source: Box::new(e) })
}
