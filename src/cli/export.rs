//! `ft export gguf`, `ft export gguf-lora` and `ft export ollama`.

use std::path::PathBuf;

use anyhow::Result;

use crate::convert::export_gguf::{export, export_lora, ExportReport, GgufType};

#[derive(Debug, clap::Subcommand)]
pub enum ExportCommand {
    /// The model (merged with an adapter when given) as one GGUF file for llama.cpp / Ollama.
    Gguf(GgufArgs),
    /// A LoRA adapter as llama.cpp's GGUF adapter (`llama-cli --lora`, Ollama's ADAPTER), applied
    /// over the base exported with `ft export gguf`.
    #[command(name = "gguf-lora")]
    GgufLora(GgufLoraArgs),
    /// An Ollama model directory: model.gguf (+ adapter.gguf) and a Modelfile; then
    /// `ollama create NAME -f OUT/Modelfile`.
    Ollama(OllamaArgs),
}

#[derive(Debug, clap::Args)]
pub struct OllamaArgs {
    /// Hugging Face model directory (or a cached hub id).
    #[arg(long, value_parser = crate::cli::args::model_dir)]
    pub model: PathBuf,
    /// A PEFT LoRA adapter: written as adapter.gguf (the Modelfile's ADAPTER), or merged with --merge.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Merge the adapter into model.gguf instead of an ADAPTER file (DoRA and modules_to_save
    /// adapters need this).
    #[arg(long, requires = "adapter")]
    pub merge: bool,
    /// Output directory (must not exist yet).
    #[arg(long)]
    pub out: PathBuf,
    /// The model's tensor type (as `ft export gguf --type`).
    #[arg(long = "type", value_enum, default_value_t = TypeArg::Q8_0)]
    pub ty: TypeArg,
    /// Print a JSON report.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, clap::Args)]
pub struct GgufLoraArgs {
    /// The PEFT LoRA adapter directory.
    #[arg(long)]
    pub adapter: PathBuf,
    /// The base model directory it was trained on (its config names llama.cpp's tensors).
    #[arg(long, value_parser = crate::cli::args::model_dir)]
    pub model: PathBuf,
    /// The .gguf file to write.
    #[arg(long)]
    pub out: PathBuf,
    /// Tensor type (f32, f16, bf16, q8_0).
    #[arg(long = "type", value_enum, default_value_t = TypeArg::F32)]
    pub ty: TypeArg,
    /// Print a JSON report.
    #[arg(long)]
    pub json: bool,
}

/// The GGUF tensor type (`convert_hf_to_gguf.py --outtype` or `llama-quantize`'s name).
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum TypeArg {
    F32,
    F16,
    Bf16,
    #[value(name = "q8_0")]
    Q8_0,
    #[value(name = "q4_0")]
    Q4_0,
    #[value(name = "q4_1")]
    Q4_1,
    #[value(name = "q4_k_m")]
    Q4KM,
    #[value(name = "q6_k")]
    Q6K,
}

impl From<TypeArg> for GgufType {
    fn from(t: TypeArg) -> Self {
        match t {
            TypeArg::F32 => GgufType::F32,
            TypeArg::F16 => GgufType::F16,
            TypeArg::Bf16 => GgufType::Bf16,
            TypeArg::Q8_0 => GgufType::Q8_0,
            TypeArg::Q4_0 => GgufType::Q4_0,
            TypeArg::Q4_1 => GgufType::Q4_1,
            TypeArg::Q4KM => GgufType::Q4KM,
            TypeArg::Q6K => GgufType::Q6K,
        }
    }
}

#[derive(Debug, clap::Args)]
pub struct GgufArgs {
    /// Hugging Face model directory (or a cached hub id).
    #[arg(long, value_parser = crate::cli::args::model_dir)]
    pub model: PathBuf,
    /// A PEFT LoRA adapter to merge first (in f32, as `ft merge` does).
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// The .gguf file to write (replaced atomically if it exists).
    #[arg(long)]
    pub out: PathBuf,
    /// Tensor type: f32/f16/bf16/q8_0 as llama.cpp's converter writes them; q4_0/q4_1/q4_k_m/q6_k
    /// with the per-tensor mixture `llama-quantize` chooses.
    #[arg(long = "type", value_enum, default_value_t = TypeArg::F16)]
    pub ty: TypeArg,
    /// Print a JSON report.
    #[arg(long)]
    pub json: bool,
}

fn print_report(r: &ExportReport, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string(r)?);
        return Ok(());
    }
    for w in &r.warnings {
        eprintln!("warning: {w}");
    }
    let types: Vec<String> = r.types.iter().map(|(k, v)| format!("{v} {k}")).collect();
    println!(
        "wrote {} ({}, {}): {} tensors ({}), {:.1} MiB",
        r.out.display(),
        r.architecture,
        r.file_type,
        r.tensors,
        types.join(", "),
        r.bytes as f64 / 1048576.0
    );
    Ok(())
}

pub fn run(c: ExportCommand) -> Result<()> {
    match c {
        ExportCommand::Gguf(a) => {
            let r = export(&a.model, a.adapter.as_deref(), &a.out, a.ty.into())?;
            print_report(&r, a.json)
        }
        ExportCommand::Ollama(a) => {
            let r = crate::convert::ollama::export_ollama(&a.model, a.adapter.as_deref(), a.merge, &a.out, a.ty.into())?;
            if a.json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                for w in &r.warnings {
                    eprintln!("warning: {w}");
                }
                let template = if r.template == "chatml" { "TEMPLATE: ChatML".to_string() } else { "no TEMPLATE: Ollama takes the chat template from the GGUF's tokenizer.chat_template".to_string() };
                println!("wrote {} ({}); {template}; stop {:?}", r.out.display(), r.files.join(", "), r.stop);
                println!("next: ollama create NAME -f {}", r.out.join("Modelfile").display());
            }
            Ok(())
        }
        ExportCommand::GgufLora(a) => {
            let r = export_lora(&a.adapter, &a.model, &a.out, a.ty.into())?;
            if a.json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                for w in &r.warnings {
                    eprintln!("warning: {w}");
                }
                println!("wrote {} ({} adapter): {} LoRA modules, alpha {}, {:.1} KiB", r.out.display(), r.architecture, r.modules, r.alpha, r.bytes as f64 / 1024.0);
            }
            Ok(())
        }
    }
}
