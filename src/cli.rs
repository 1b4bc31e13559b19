//! The `ft` command line: argument definitions (clap) and one function per subcommand. Each
//! subcommand is a thin layer over the library.

use crate::backend::Kernels;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

use crate::backend::{ComputeDtype, DeviceChoice};
use crate::data::conversation::{read_jsonl, DataError, Message, Role};
use crate::generate::{generate, GenerateOptions};
use crate::gguf::import::{import, SaveDtype};
use crate::tokenizer::{TemplateChoice, TextTokenizer};

/// Exit codes (documented in the README).
pub mod exit {
    pub const OK: u8 = 0;
    /// Anything else: a model, file or I/O problem.
    pub const FAILURE: u8 = 1;
    /// Bad command-line usage or recipe.
    pub const USAGE: u8 = 2;
    /// Bad data (a dataset line, a conversation).
    pub const DATA: u8 = 3;
    /// Training diverged (non-finite loss or gradient norm).
    pub const DIVERGED: u8 = 4;
    /// Interrupted (SIGINT) after saving a checkpoint.
    pub const INTERRUPTED: u8 = 130;
}

fn long_version() -> &'static str {
    Box::leak(format!("{}\nbackends: {}", env!("CARGO_PKG_VERSION"), crate::backend::enabled()).into_boxed_str())
}

/// ft: fine-tune Hugging Face language models with LoRA/QLoRA, fast and reproducibly.
#[derive(Debug, Parser)]
#[command(name = "ft", version = long_version(), about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Fine-tune a LoRA adapter as a TOML recipe describes (see recipes/README.md).
    Train(TrainArgs),
    /// Check datasets: every problem with file:line, token statistics, what training would drop.
    #[command(subcommand)]
    Data(DataCommand),
    /// Validate a recipe and print it with every default resolved.
    #[command(name = "recipe", subcommand)]
    Recipe(RecipeCommand),
    /// Generate a chat reply: render the model's chat template with a generation prompt and decode.
    Generate(GenerateArgs),
    /// Mean next-token loss over the assistant tokens of a ChatML JSONL dataset.
    Eval(EvalArgs),
    /// Merge a LoRA adapter into the base weights (W + scale·B·A in f32), writing a plain checkpoint.
    Merge(MergeArgs),
    /// Quantize a model's decoder linear weights to bitsandbytes NF4 (the `*-bnb-4bit` format
    /// transformers loads), so that QLoRA runs skip the quantization.
    Quantize(QuantizeArgs),
    /// Convert a llama-architecture GGUF (F32/F16/BF16/Q8_0/Q4_0/Q4_1) into a Hugging Face directory.
    #[command(name = "import-gguf")]
    ImportGguf(ImportArgs),
}

#[derive(Debug, clap::Args)]
pub struct GenerateArgs {
    /// Hugging Face model directory (config.json, safetensors, tokenizer.json).
    #[arg(long)]
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
    /// Where to run: cpu, or cuda (needs a build with `--features cuda`).
    #[arg(long, value_enum, default_value_t = DeviceChoice::Cpu)]
    pub device: DeviceChoice,
    /// Compute dtype: f32, or bf16 (CUDA only).
    #[arg(long, value_enum, default_value_t = ComputeDtype::F32)]
    pub dtype: ComputeDtype,
    /// Print {"text", "ids", "tokens", "tokens_per_s"} as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, clap::Args)]
pub struct EvalArgs {
    /// Hugging Face model directory.
    #[arg(long)]
    pub model: PathBuf,
    /// A PEFT LoRA adapter directory to apply on top of the model.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Data: JSONL conversations {"messages": [{"role", "content"}, ...]} per line, or with
    /// `--dpo` preference pairs {"prompt", "chosen", "rejected"}; a file, `.jsonl.gz`, directory
    /// or glob.
    #[arg(long)]
    pub data: PathBuf,
    /// Chat template: the model's own, or built-in ChatML.
    #[arg(long, value_enum, default_value_t = TemplateChoice::Model)]
    pub template: TemplateChoice,
    /// Cut samples to at most N tokens (the count of cut samples is reported); with `--dpo`,
    /// pairs longer than N are dropped (and counted).
    #[arg(long)]
    pub max_len: Option<usize>,
    /// Score preference pairs: DPO losses and TRL's reward metrics, the adapter-disabled model
    /// as reference.
    #[arg(long)]
    pub dpo: bool,
    /// DPO β.
    #[arg(long, default_value_t = 0.1, requires = "dpo")]
    pub beta: f64,
    /// The DPO loss reported as `loss` (`losses` has all of them).
    #[arg(long, value_enum, default_value_t = crate::train::dpo::LossType::Sigmoid, requires = "dpo")]
    pub loss_type: crate::train::dpo::LossType,
    /// Label smoothing for the sigmoid and robust DPO losses.
    #[arg(long, default_value_t = 0.0, requires = "dpo")]
    pub label_smoothing: f64,
    /// Adds this times the chosen NLL to the DPO loss (RPO).
    #[arg(long, requires = "dpo")]
    pub rpo_alpha: Option<f64>,
    /// Prompts longer than this lose tokens from their start.
    #[arg(long, requires = "dpo")]
    pub max_prompt_len: Option<usize>,
    /// With `--dpo --json`: each pair's ids, completion positions and log-probs.
    #[arg(long, requires = "dpo")]
    pub per_pair: bool,
    /// Where to run: cpu, or cuda (needs a build with `--features cuda`).
    #[arg(long, value_enum, default_value_t = DeviceChoice::Cpu)]
    pub device: DeviceChoice,
    /// Compute dtype: f32, or bf16 (CUDA only).
    #[arg(long, value_enum, default_value_t = ComputeDtype::F32)]
    pub dtype: ComputeDtype,
    /// Print {"loss", "tokens", "samples", "perplexity"} as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum DataCommand {
    /// Validate JSONL conversation files and print statistics; exits 3 if any line is bad.
    Check {
        /// JSONL files.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Model directory (tokenizer and chat template).
        #[arg(long)]
        model: PathBuf,
        #[arg(long, value_enum, default_value_t = TemplateChoice::Model)]
        template: TemplateChoice,
        /// Count samples longer than N tokens (training drops them) and report how well packing
        /// into N-token sequences would fill them.
        #[arg(long)]
        max_len: Option<usize>,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show one record as the model sees it: the rendered text with trainable spans marked
    /// `[[...]]`, and the token ids with their mask.
    Show {
        /// JSONL file (conversations or preference pairs; `.jsonl.gz`, directory or glob).
        file: PathBuf,
        /// Model directory (tokenizer and chat template).
        #[arg(long)]
        model: PathBuf,
        /// 0-based record index (blank lines do not count).
        #[arg(long, default_value_t = 0)]
        index: usize,
        #[arg(long, value_enum, default_value_t = TemplateChoice::Model)]
        template: TemplateChoice,
        /// Print {"text", "marked", "ids", "mask", "tokens"} (per side for pairs) as JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum RecipeCommand {
    /// Validate a recipe: unknown keys, wrong types and out-of-range values are errors naming the line.
    Check {
        /// The recipe (TOML).
        recipe: PathBuf,
        /// Override a recipe key, e.g. `--set train.lr=1e-4` (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
    },
}

#[derive(Debug, clap::Args)]
pub struct TrainArgs {
    /// The recipe (TOML).
    pub recipe: PathBuf,
    /// Override a recipe key, e.g. `--set train.lr=1e-4` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Output directory (overrides `output.dir`).
    #[arg(long)]
    pub output: Option<PathBuf>,
    /// Continue the run in the output directory from its newest complete checkpoint.
    #[arg(long)]
    pub resume: bool,
    /// Only validate the recipe and print it with defaults resolved.
    #[arg(long)]
    pub check: bool,
    /// Print the final summary as JSON on stdout (progress lines go to stderr).
    #[arg(long)]
    pub json: bool,
    /// No per-step progress lines.
    #[arg(long)]
    pub quiet: bool,
}

#[derive(Debug, clap::Args)]
pub struct MergeArgs {
    /// The base model directory the adapter was trained on.
    #[arg(long)]
    pub model: PathBuf,
    /// PEFT adapter directory (adapter_config.json, adapter_model.safetensors).
    #[arg(long)]
    pub adapter: PathBuf,
    /// Output directory (must not exist yet).
    #[arg(long)]
    pub out: PathBuf,
    /// Dtype of the written weights (default: the base's).
    #[arg(long, value_enum)]
    pub dtype: Option<crate::adapters::merge::MergeDtype>,
    /// For a QLoRA adapter: merge into this full-precision base instead of the NF4-dequantized
    /// weights training saw.
    #[arg(long)]
    pub base: Option<PathBuf>,
    /// Print a JSON report.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, clap::Args)]
pub struct QuantizeArgs {
    /// Hugging Face model directory (f32, bf16 or f16 weights).
    #[arg(long)]
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
    #[arg(long, value_enum, default_value_t = SaveDtype::F32)]
    pub dtype: SaveDtype,
    /// Print a JSON report.
    #[arg(long)]
    pub json: bool,
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Train(a) => cmd_train(a),
        Command::Data(DataCommand::Check { files, model, template, max_len, json }) => cmd_data_check(&files, &model, template, max_len, json),
        Command::Data(DataCommand::Show { file, model, index, template, json }) => cmd_data_show(&file, &model, index, template, json),
        Command::Recipe(RecipeCommand::Check { recipe, set }) => {
            let r = crate::train::recipe::Recipe::load(&recipe, &set).map_err(|e| RecipeError(format!("{e:#}")))?;
            print!("{}", r.resolved_toml());
            Ok(())
        }
        Command::Generate(a) => cmd_generate(a),
        Command::Eval(a) => cmd_eval(a),
        Command::Merge(a) => cmd_merge(a),
        Command::ImportGguf(a) => cmd_import(a),
        Command::Quantize(a) => {
            let r = crate::quant::bnb::quantize_checkpoint(&a.model, &a.out, !a.no_double_quant)?;
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
    }
}

/// The exit code for an error: data problems are distinguished for pipelines.
pub fn exit_code(err: &anyhow::Error) -> u8 {
    if err.chain().any(|e| e.downcast_ref::<crate::train::run::Divergence>().is_some()) {
        exit::DIVERGED
    } else if err.chain().any(|e| e.downcast_ref::<crate::train::run::Interrupted>().is_some()) {
        exit::INTERRUPTED
    } else if err.chain().any(|e| e.downcast_ref::<RecipeError>().is_some()) {
        exit::USAGE
    } else if err.chain().any(|e| e.downcast_ref::<DataError>().is_some()) {
        exit::DATA
    } else {
        exit::FAILURE
    }
}

/// End-of-sequence ids from config.json, generation_config.json and the tokenizer.
pub fn stop_ids(model_dir: &Path, config_eos: &[u32], tok: &TextTokenizer) -> Vec<u32> {
    let mut ids = config_eos.to_vec();
    if let Ok(text) = std::fs::read_to_string(model_dir.join("generation_config.json")) {
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) {
            match v.get("eos_token_id") {
                Some(serde_json::Value::Number(n)) => ids.extend(n.as_u64().map(|x| x as u32)),
                Some(serde_json::Value::Array(a)) => ids.extend(a.iter().filter_map(|x| x.as_u64().map(|x| x as u32))),
                _ => {}
            }
        }
    }
    if let Some(id) = tok.eos_token.as_deref().and_then(|t| tok.token_id(t)) {
        ids.push(id);
    }
    ids.sort();
    ids.dedup();
    ids
}

fn cmd_data_check(files: &[PathBuf], model: &Path, template: TemplateChoice, max_len: Option<usize>, json: bool) -> Result<()> {
    let tok = TextTokenizer::from_dir(model)?;
    let tpl = tok.template(template)?;
    let mut r = crate::data::check::check(files, &tok, &tpl, max_len)?;
    if let Some(w) = crate::data::check::pad_eos_warning(model, &tok) {
        r.warnings.push(crate::data::check::Problem { at: model.display().to_string(), message: w });
    }
    if json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        for p in &r.errors {
            eprintln!("error: {}: {}", p.at, p.message);
        }
        for p in &r.warnings {
            eprintln!("warning: {}: {}", p.at, p.message);
        }
        println!(
            "{} samples, {} tokens, {} trainable ({:.1}%){}",
            r.samples,
            r.tokens,
            r.trainable_tokens,
            100.0 * r.trainable_tokens as f64 / r.tokens.max(1) as f64,
            max_len.map(|m| format!(", {} longer than {m}", r.too_long)).unwrap_or_default()
        );
        for (lo, hi, n) in &r.length_histogram {
            println!("  {lo:>6}..{hi:<6} {n}");
        }
    }
    if !r.errors.is_empty() {
        let first = &r.errors[0];
        return Err(DataError::Invalid { count: r.errors.len(), first: format!("{}: {}", first.at, first.message) }.into());
    }
    Ok(())
}

fn cmd_data_show(file: &Path, model: &Path, index: usize, template: TemplateChoice, json: bool) -> Result<()> {
    use crate::data::encode::Encoded;
    let tok = TextTokenizer::from_dir(model)?;
    let tpl = tok.template(template)?;
    let mut found: Option<(crate::data::conversation::Location, String)> = None;
    let mut n = 0;
    crate::data::conversation::read_lines(file, |at, text| {
        if n == index && found.is_none() {
            found = Some((at, text.to_string()));
        }
        n += 1;
        Ok(())
    })?;
    let Some((at, text)) = found else {
        return Err(RecipeError(format!("--index {index}: {} has only {n} records", file.display())).into());
    };
    let located = |msg: String| DataError::At { at: at.clone(), msg };
    let show = |e: &Encoded| -> Result<serde_json::Value> {
        let enc = tok.encode(&e.text)?;
        // Trainable spans as byte ranges of the text, merged.
        let mut marked = String::new();
        let (mut pos, mut open) = (0, false);
        for (j, &(a, b)) in enc.get_offsets().iter().enumerate() {
            let on = e.mask.get(j) == Some(&1);
            if on != open {
                marked.push_str(&e.text[pos..a]);
                marked.push_str(if on { "[[" } else { "]]" });
                pos = a;
                open = on;
            }
            let _ = b;
        }
        marked.push_str(&e.text[pos..]);
        if open {
            marked.push_str("]]");
        }
        let tokens: Vec<String> = e.ids.iter().map(|&i| tok.id_to_token(i).unwrap_or_default()).collect();
        Ok(serde_json::json!({"text": e.text, "marked": marked, "ids": e.ids, "mask": e.mask, "tokens": tokens,
            "trainable": e.trainable()}))
    };
    let value: serde_json::Value = serde_json::from_str(&text).map_err(|e| located(format!("invalid JSON: {e}")))?;
    let report = if crate::data::preference::is_preference(&value) {
        let (prompt, chosen, rejected) = crate::data::preference::parse_pair(&text).map_err(located)?;
        let pair = crate::data::preference::PreferencePair { prompt, chosen, rejected, at: at.clone() };
        let e = crate::data::preference::encode_pair(&tok, &tpl, &pair, None).map_err(located)?;
        serde_json::json!({"at": at.to_string(), "chosen": show(&e.chosen)?, "rejected": show(&e.rejected)?})
    } else {
        let messages = crate::data::conversation::parse_line(&text).map_err(located)?;
        let e = crate::data::encode::encode_conversation(&tok, &tpl, &messages).map_err(located)?;
        let mut v = show(&e)?;
        v["at"] = at.to_string().into();
        v
    };
    if json {
        println!("{report}");
        return Ok(());
    }
    let print = |title: &str, v: &serde_json::Value| {
        println!("── {title} ({} tokens, {} trainable)", v["ids"].as_array().map_or(0, Vec::len), v["trainable"]);
        println!("{}", v["marked"].as_str().unwrap_or_default());
        let ids: Vec<String> = v["ids"]
            .as_array()
            .into_iter()
            .flatten()
            .zip(v["mask"].as_array().into_iter().flatten())
            .map(|(i, m)| if m == 1 { format!("{i}*") } else { i.to_string() })
            .collect();
        println!("ids (* = trained): {}", ids.join(" "));
    };
    println!("{}", report["at"].as_str().unwrap_or_default());
    if report.get("chosen").is_some() {
        print("chosen", &report["chosen"]);
        print("rejected", &report["rejected"]);
    } else {
        print("conversation", &report);
    }
    Ok(())
}

/// A recipe or an argument that does not validate (exit code 2).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct RecipeError(String);

fn cmd_train(a: TrainArgs) -> Result<()> {
    use crate::train::recipe::Recipe;
    let mut recipe = Recipe::load(&a.recipe, &a.set).map_err(|e| RecipeError(format!("{e:#}")))?;
    if let Some(o) = a.output {
        recipe.output.dir = o;
    }
    if a.check {
        print!("{}", recipe.resolved_toml());
        return Ok(());
    }
    // First Ctrl-C: finish the step, save a checkpoint, exit 130. A second one kills.
    ctrlc::set_handler(|| {
        if crate::train::run::INTERRUPTED.swap(true, std::sync::atomic::Ordering::SeqCst) {
            std::process::exit(exit::INTERRUPTED as i32);
        }
    })
    .ok();
    use burn::backend::Autodiff;
    let (q, r) = (a.quiet, a.resume);
    let summary = match recipe.train.device {
        DeviceChoice::Cpu => crate::train::run::run::<Autodiff<crate::backend::Cpu>>(&recipe, Default::default(), q, r)?,
        #[cfg(feature = "cuda")]
        DeviceChoice::Cuda => {
            crate::backend::init_cuda_runtime();
            crate::train::run::run::<Autodiff<crate::backend::CudaBf16>>(&recipe, Default::default(), q, r)?
        }
        #[cfg(not(feature = "cuda"))]
        DeviceChoice::Cuda => anyhow::bail!("this ft was built without CUDA; rebuild with `cargo build --release --features cuda`"),
    };
    if a.json {
        println!("{}", serde_json::to_string(&summary)?);
    } else {
        println!(
            "trained {} steps: loss {:.4}{} in {:.1}s ({:.0} tokens/s) → {}",
            summary.steps,
            summary.final_loss,
            summary.eval_loss.map(|l| format!(", eval loss {l:.4}")).unwrap_or_default(),
            summary.seconds,
            summary.tokens_per_s,
            summary.output_dir.join("adapter").display()
        );
    }
    Ok(())
}

fn cmd_generate(a: GenerateArgs) -> Result<()> {
    crate::dispatch_backend!(a.device, a.dtype, generate_on, a)
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
        for conv in read_jsonl(file)? {
            let last_user = conv.messages.iter().rposition(|m| m.role == Role::User).ok_or_else(|| {
                DataError::At { at: conv.at.clone(), msg: "no user turn to answer".into() }
            })?;
            let mut messages = conv.messages[..=last_user].to_vec();
            if let Some(s) = &a.system {
                messages.insert(0, Message::new(Role::System, s.clone()));
            }
            let prompt = template.render(&messages, true).context("rendering the chat template")?;
            let out = generate(&model, tok.encode(&prompt)?.get_ids(), &opts);
            let reference = conv.messages.get(last_user + 1).map(|m| m.content.clone());
            let text = tok.decode(&out.ids)?;
            println!(
                "{}",
                serde_json::json!({"prompt": conv.messages[last_user].content, "text": text, "reference": reference, "ids": out.ids})
            );
        }
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

fn eval_dpo_on<B: Kernels>(a: EvalArgs, device: B::Device) -> Result<()> {
    use crate::train::dpo::{prepare_pairs, score_pairs, DpoConfig, LossType};
    if a.label_smoothing < 0.0 || a.label_smoothing >= 0.5 || !(a.beta > 0.0) {
        return Err(RecipeError("--beta must be positive and --label-smoothing in [0, 0.5)".into()).into());
    }
    let t0 = Instant::now();
    let tok = TextTokenizer::from_dir(&a.model)?;
    let template = tok.template(a.template)?;
    let (pairs, dropped, warnings) = prepare_pairs(&tok, &template, &a.data, a.max_len.unwrap_or(usize::MAX), a.max_prompt_len, None)?;
    for w in &warnings {
        eprintln!("warning: {w}");
    }
    let mut model = load_with_adapter::<B>(&a.model, a.adapter.as_deref(), &device)?;
    let logps = score_pairs(&mut model, &pairs, None);
    let config = DpoConfig { beta: a.beta, loss_type: a.loss_type, label_smoothing: a.label_smoothing, rpo_alpha: a.rpo_alpha };
    let mut report = config.metrics(&logps, "");
    let losses: serde_json::Map<String, serde_json::Value> = LossType::ALL
        .iter()
        .map(|&loss_type| {
            let c = DpoConfig { loss_type, ..config };
            (loss_type.name().to_string(), c.metrics(&logps, "")["loss"].clone())
        })
        .collect();
    let secs = t0.elapsed().as_secs_f64();
    if a.json {
        report.insert("losses".into(), losses.into());
        report.insert("pairs".into(), pairs.len().into());
        report.insert("dropped".into(), dropped.into());
        report.insert("warnings".into(), warnings.len().into());
        report.insert("seconds".into(), secs.into());
        if a.per_pair {
            let side = |e: &crate::data::encode::Encoded, s: &crate::train::dpo::SideLogps| {
                let positions: Vec<usize> = (0..e.mask.len()).filter(|&j| e.mask[j] == 1).collect();
                serde_json::json!({"input_ids": e.ids, "completion_positions": positions,
                    "logp_policy": s.policy, "logp_ref": s.reference, "tokens": s.tokens})
            };
            let per: Vec<serde_json::Value> = pairs
                .iter()
                .zip(&logps)
                .map(|(p, l)| serde_json::json!({"chosen": side(&p.chosen, &l.chosen), "rejected": side(&p.rejected, &l.rejected)}))
                .collect();
            report.insert("per_pair".into(), per.into());
        }
        println!("{}", serde_json::Value::Object(report));
    } else {
        let g = |k: &str| report[k].as_f64().unwrap_or(f64::NAN);
        println!(
            "dpo {} loss {:.6}  reward accuracy {:.4}  margin {:.6}  chosen {:.6}  rejected {:.6}  pairs {}{}  ({:.1}s)",
            a.loss_type.name(),
            g("loss"),
            g("rewards/accuracies"),
            g("rewards/margins"),
            g("rewards/chosen"),
            g("rewards/rejected"),
            pairs.len(),
            if dropped > 0 { format!("  dropped {dropped}") } else { String::new() },
            secs
        );
    }
    Ok(())
}

fn cmd_eval(a: EvalArgs) -> Result<()> {
    crate::dispatch_backend!(a.device, a.dtype, eval_on, a)
}

fn eval_on<B: Kernels>(a: EvalArgs, device: B::Device) -> Result<()> {
    if a.dpo {
        return eval_dpo_on::<B>(a, device);
    }
    let data = read_jsonl(&a.data)?;
    let t0 = Instant::now();
    let model = load_with_adapter::<B>(&a.model, a.adapter.as_deref(), &device)?;
    let load_s = t0.elapsed().as_secs_f64();
    let tok = TextTokenizer::from_dir(&a.model)?;
    let template = tok.template(a.template)?;
    let t1 = Instant::now();
    let report = crate::eval::evaluate(&model, &tok, &template, &data, a.max_len)?;
    let eval_s = t1.elapsed().as_secs_f64();
    let secs = t0.elapsed().as_secs_f64();
    if a.json {
        let mut v = serde_json::to_value(&report)?;
        v["load_s"] = load_s.into();
        v["eval_s"] = eval_s.into();
        v["tokens_per_s"] = (report.input_tokens as f64 / eval_s).into();
        println!("{v}");
    } else {
        println!(
            "loss {:.6}  perplexity {:.4}  tokens {}  samples {}{}  ({:.1}s)",
            report.loss,
            report.perplexity,
            report.tokens,
            report.samples,
            if report.truncated > 0 { format!("  truncated {}", report.truncated) } else { String::new() },
            secs
        );
    }
    Ok(())
}

/// Loads a model and, if given, attaches a PEFT adapter.
fn load_with_adapter<B: Kernels>(model: &Path, adapter: Option<&Path>, device: &B::Device) -> Result<crate::model::Decoder<B>> {
    let mut m = crate::model::load::<B>(model, device)?;
    if let Some(dir) = adapter {
        crate::adapters::peft::PeftAdapter::open(dir)?.attach(&mut m)?;
    }
    Ok(m)
}

fn cmd_merge(a: MergeArgs) -> Result<()> {
    let r = crate::adapters::merge::merge(&a.model, &a.adapter, &a.out, a.dtype, a.base.as_deref())?;
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        println!("merged {} LoRA modules into {} shard(s) → {}", r.merged_modules, r.shards, r.out.display());
    }
    Ok(())
}

fn cmd_import(a: ImportArgs) -> Result<()> {
    let r = import(&a.gguf, &a.out, a.dtype)?;
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
