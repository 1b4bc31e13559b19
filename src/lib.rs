//! ft: parameter-efficient fine-tuning of Hugging Face language models.
//!
//! The library behind the `ft` command: model loading ([`model`]), data ([`data`]),
//! tokenization ([`tokenizer`]), GGUF import ([`gguf`]), LoRA adapters and merging
//! ([`adapters`]), NF4 quantization ([`quant`]), SFT and DPO training ([`train`]), generation
//! ([`generate`]) and evaluation ([`eval`]). The CLI ([`cli`]) is a thin layer over these.

pub mod adapters;
pub mod backend;
pub mod cli;
pub mod data;
pub mod eval;
pub mod fsutil;
pub mod generate;
pub mod gguf;
pub mod model;
pub mod ops;
pub mod quant;
pub mod tokenizer;
pub mod train;
