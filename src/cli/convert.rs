//! `ft merge`, `ft quantize` and `ft import-gguf`.

use std::path::PathBuf;

use anyhow::Result;

use crate::convert::import_gguf::import_with_lora;
use crate::convert::merge::{merge, MergeBase};
use crate::convert::quantize::{quantize, Absmax};
use crate::formats::safetensors::OutDtype;

#[derive(Debug, clap::Args)]
pub struct MergeArgs {
    /// The base model directory the adapter was trained on.
    #[arg(long, value_parser = crate::cli::args::model_dir)]
    pub model: PathBuf,
    /// PEFT adapter directory (adapter_config.json, adapter_model.safetensors).
    #[arg(long)]
    pub adapter: PathBuf,
    /// Output directory (must not exist yet).
    #[arg(long)]
    pub out: PathBuf,
    /// Dtype of the written weights (default: the base's).
    #[arg(long, value_enum)]
    pub dtype: Option<OutDtype>,
    /// For a QLoRA adapter: merge into this full-precision base instead of the NF4-dequantized
    /// weights training saw.
    #[arg(long, value_parser = crate::cli::args::model_dir)]
    pub base: Option<PathBuf>,
    /// Print a JSON report.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, clap::Args)]
pub struct QuantizeArgs {
    /// Hugging Face model directory (f32, bf16 or f16 weights).
    #[arg(long, value_parser = crate::cli::args::model_dir)]
    pub model: PathBuf,
    /// Output directory (must not exist yet).
    #[arg(long)]
    pub out: PathBuf,
    /// Keep the per-block absmax in f32 instead of double-quantizing it (bitsandbytes'
    /// `bnb_4bit_use_double_quant = False`).
    #[arg(long)]
    pub no_double_quant: bool,
    /// Print a JSON report.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, clap::Args)]
pub struct ImportArgs {
    /// The .gguf file.
    pub gguf: PathBuf,
    /// Output directory (must not exist yet).
    #[arg(long)]
    pub out: PathBuf,
    /// Dtype of the written weights (f32 keeps the dequantized values exactly).
    #[arg(long, value_enum, default_value_t = OutDtype::F32)]
    pub dtype: OutDtype,
    /// A GGUF LoRA adapter (llama.cpp's format, `ft export gguf-lora`) to merge into the weights
    /// as llama.cpp applies it.
    #[arg(long)]
    pub lora: Option<PathBuf>,
    /// Print a JSON report.
    #[arg(long)]
    pub json: bool,
}

pub fn run_merge(a: MergeArgs) -> Result<()> {
    let base = match &a.base {
        Some(dense) => MergeBase::FullPrecision(dense),
        None => MergeBase::AsTrained(&a.model),
    };
    let r = merge(base, &a.adapter, &a.out, a.dtype)?;
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        println!("merged {} adapted modules into {} shard(s) → {}", r.merged_modules, r.shards, r.out.display());
    }
    Ok(())
}

pub fn run_quantize(a: QuantizeArgs) -> Result<()> {
    let absmax = if a.no_double_quant { Absmax::F32 } else { Absmax::DoubleQuant };
    let r = quantize(&a.model, &a.out, absmax)?;
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        println!(
            "quantized {} weights ({} parameters) to NF4: {:.1} MiB → {:.1} MiB in {}",
            r.quantized,
            r.parameters_quantized,
            r.bytes_before as f64 / 1048576.0,
            r.bytes_after as f64 / 1048576.0,
            r.out.display()
        );
    }
    Ok(())
}

pub fn run_import(a: ImportArgs) -> Result<()> {
    let r = import_with_lora(&a.gguf, a.lora.as_deref(), &a.out, a.dtype)?;
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        let types: Vec<String> = r.types.iter().map(|(k, v)| format!("{v} {k}")).collect();
        println!(
            "imported {} ({}): {} tensors ({}), {:.1}M parameters → {}",
            a.gguf.display(),
            r.architecture,
            r.tensors,
            types.join(", "),
            r.parameters as f64 / 1e6,
            r.out.display()
        );
    }
    Ok(())
}
