//! Model conversions: `ft merge` ([`merge`]), `ft quantize` ([`quantize`]) and `ft import-gguf`
//! ([`import_gguf`]) write model directories through `formats::model_dir::ModelDirWriter`;
//! `ft export gguf` ([`export_gguf`]) writes llama.cpp's format, both GGUF directions sharing
//! the family table of [`gguf_arch`].

pub mod export_gguf;
pub mod gguf_arch;
pub mod gguf_vocab;
pub mod import_gguf;
pub mod merge;
pub mod ollama;
pub mod quantize;

use std::path::PathBuf;

use crate::formats::gguf::reader::GgufError;
use crate::formats::model_dir::ModelDirError;
use crate::formats::peft::PeftError;
use crate::formats::safetensors::WeightsError;
use crate::model::ConfigError;

/// Errors from a conversion; each names the file concerned.
#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Weights(#[from] WeightsError),
    #[error(transparent)]
    ModelDir(#[from] ModelDirError),
    #[error(transparent)]
    Peft(#[from] PeftError),
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error("{}: {msg}", path.display())]
    Invalid { path: PathBuf, msg: String },
    /// What the target format or runtime cannot represent (exit code 2).
    #[error("{}: {msg}", path.display())]
    Unsupported { path: PathBuf, msg: String },
}

impl ConvertError {
    fn invalid(path: &std::path::Path, msg: impl Into<String>) -> Self {
        ConvertError::Invalid { path: path.into(), msg: msg.into() }
    }
    fn unsupported(path: &std::path::Path, msg: impl Into<String>) -> Self {
        ConvertError::Unsupported { path: path.into(), msg: msg.into() }
    }
}
