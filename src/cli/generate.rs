//! `ft generate`.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};

use super::args::{load_with_adapter, BackendArgs};
use crate::data::conversation::{Message, Role};
use crate::data::tokenizer::{TemplateChoice, TextTokenizer};
use crate::generate::{generate, generate_over, stop_ids, GenerateOptions};
use crate::ops::Kernels;

#[derive(Debug, clap::Args)]
pub struct GenerateArgs {
    /// Hugging Face model directory (config.json, safetensors, tokenizer.json).
    #[arg(long, value_parser = crate::cli::args::model_dir)]
    pub model: PathBuf,
    /// A PEFT LoRA adapter directory to apply on top of the model.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// The user message.
    #[arg(long, required_unless_present = "data")]
    pub prompt: Option<String>,
    /// Generate for every conversation of a ChatML JSONL file instead: the messages up to the last
    /// user turn are the prompt; prints one JSON line per conversation with the reference reply.
    #[arg(long, conflicts_with = "prompt")]
    pub data: Option<PathBuf>,
    /// With `--data`: conversations generated together as one batch (left-padded; a reply does
    /// not depend on it, up to float rounding).
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..))]
    pub batch_size: u64,
    /// An optional system message placed before the prompt.
    #[arg(long)]
    pub system: Option<String>,
    /// Maximum number of new tokens.
    #[arg(long, default_value_t = 128)]
    pub max_new_tokens: usize,
    /// Sampling temperature; 0 decodes greedily.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Nucleus sampling: keep the smallest set of tokens whose probability reaches P.
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// Random seed for sampling.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Keep generating past end-of-sequence tokens (for tests and benchmarks).
    #[arg(long)]
    pub ignore_eos: bool,
    /// Chat template: the model's own, or built-in ChatML.
    #[arg(long, value_enum, default_value_t = TemplateChoice::Model)]
    pub template: TemplateChoice,
    #[command(flatten)]
    pub backend: BackendArgs,
    /// Print {"text", "ids", "tokens", "tokens_per_s"} as JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: GenerateArgs) -> Result<()> {
    crate::dispatch_backend!(a.backend.device, a.backend.dtype, generate_on, a)
}

fn generate_on<B: Kernels>(a: GenerateArgs, device: B::Device) -> Result<()> {
    let t0 = Instant::now();
    let model = load_with_adapter::<B>(&a.model, a.adapter.as_deref(), &device)?;
    let load_s = t0.elapsed().as_secs_f64();
    let tok = TextTokenizer::from_dir(&a.model)?;
    let template = tok.template(a.template)?;
    let opts = GenerateOptions {
        max_new_tokens: a.max_new_tokens,
        temperature: a.temperature,
        top_p: a.top_p,
        seed: a.seed,
        ignore_eos: a.ignore_eos,
        stop_ids: stop_ids(&a.model, &model.config.eos_token_ids, &tok),
    };
    if let Some(file) = &a.data {
        generate_over(&model, &tok, &template, file, a.system.as_deref(), &opts, a.batch_size as usize, |line| println!("{line}"))?;
        return Ok(());
    }
    let mut messages = Vec::new();
    if let Some(s) = a.system {
        messages.push(Message::new(Role::System, s));
    }
    messages.push(Message::new(Role::User, a.prompt.unwrap_or_default()));
    let prompt = template.render(&messages, true).context("rendering the chat template")?;
    let prompt_ids = tok.encode(&prompt)?.get_ids().to_vec();
    let out = generate(&model, &prompt_ids, &opts);
    let text = tok.decode(&out.ids)?;
    if a.json {
        let v = serde_json::json!({
            "text": text, "ids": out.ids, "tokens": out.ids.len(), "tokens_per_s": out.tokens_per_s,
            "prompt_ids": prompt_ids, "load_s": load_s,
        });
        println!("{v}");
    } else {
        println!("{text}");
        eprintln!("[{} tokens, {:.1} tokens/s]", out.ids.len(), out.tokens_per_s);
    }
    Ok(())
}
