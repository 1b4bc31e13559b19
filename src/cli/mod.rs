//! The `ft` command line: argument definitions (clap) and one function per subcommand, one file
//! per command; the work is the library's. Exit codes are decided here, in [`exit_code`], from
//! the kind of error.

pub mod adapter;
pub mod args;
pub mod convert;
pub mod data;
pub mod eval;
pub mod eval_generate;
pub mod export;
pub mod generate;
pub mod score;
pub mod train;

use anyhow::Result;
use clap::{Parser, Subcommand};

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
    /// An evaluation gate failed (`ft eval --generate --fail-under`).
    pub const GATE: u8 = 5;
    /// Interrupted (SIGINT) after saving a checkpoint.
    pub const INTERRUPTED: u8 = 130;
}

/// A command line that parses but does not make sense (exit code 2).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

static VERSION: std::sync::LazyLock<String> =
    std::sync::LazyLock::new(|| format!("{}\nbackends: {}", env!("CARGO_PKG_VERSION"), crate::backend::ENABLED));

/// ft: fine-tune Hugging Face language models with LoRA/QLoRA, fast and reproducibly.
#[derive(Debug, Parser)]
#[command(name = "ft", version = VERSION.as_str(), about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Fine-tune a LoRA adapter as a TOML recipe describes (see recipes/README.md).
    Train(train::TrainArgs),
    /// Check datasets: every problem with file:line, token statistics, what training would drop.
    #[command(subcommand)]
    Data(data::DataCommand),
    /// Validate a recipe and print it with every default resolved.
    #[command(name = "recipe", subcommand)]
    Recipe(train::RecipeCommand),
    /// Generate a chat reply: render the model's chat template with a generation prompt and decode.
    Generate(generate::GenerateArgs),
    /// Mean next-token loss over the assistant tokens of a ChatML JSONL dataset; with
    /// `--objective`, a preference objective's metrics; with `--generate`, scored answers.
    Eval(Box<eval::EvalArgs>),
    /// A reward model's scores for conversations, prompt-completion records or preference pairs
    /// (JSONL in, the records with their rewards out).
    Score(score::ScoreArgs),
    /// Adapter directories: what one holds (`info`) and which serving engines take it (`check`).
    #[command(subcommand)]
    Adapter(adapter::AdapterCommand),
    /// Merge a LoRA adapter into the base weights (W + scale·B·A in f32), writing a plain checkpoint.
    Merge(convert::MergeArgs),
    /// Quantize a model's decoder linear weights to bitsandbytes NF4 (the `*-bnb-4bit` format
    /// transformers loads), so that QLoRA runs skip the quantization.
    Quantize(convert::QuantizeArgs),
    /// Convert a GGUF (F32/F16/BF16, Q8_0/Q4_0/Q4_1/Q5_0/Q5_1, Q4_K/Q5_K/Q6_K) into a Hugging Face directory.
    #[command(name = "import-gguf")]
    ImportGguf(convert::ImportArgs),
    /// Export for local runtimes: GGUF for llama.cpp (`gguf`), a LoRA adapter as a GGUF adapter
    /// (`gguf-lora`), an Ollama model directory with its Modelfile (`ollama`).
    #[command(subcommand)]
    Export(export::ExportCommand),
    /// Print a shell completion script: `ft completions bash > /etc/bash_completion.d/ft`,
    /// `ft completions zsh > ~/.zfunc/_ft`, `ft completions fish > ~/.config/fish/completions/ft.fish`.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Train(a) => train::run(a),
        Command::Data(c) => data::run(c),
        Command::Recipe(c) => train::run_recipe(c),
        Command::Generate(a) => generate::run(a),
        Command::Eval(a) => eval::run(*a),
        Command::Score(a) => score::run(a),
        Command::Adapter(c) => adapter::run(c),
        Command::Merge(a) => convert::run_merge(a),
        Command::ImportGguf(a) => convert::run_import(a),
        Command::Quantize(a) => convert::run_quantize(a),
        Command::Export(c) => export::run(c),
        Command::Completions { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(shell, &mut Cli::command(), "ft", &mut std::io::stdout());
            Ok(())
        }
    }
}

/// The exit code for an error, by its kind: the one place where errors become exit codes.
pub fn exit_code(err: &anyhow::Error) -> u8 {
    use crate::data::conversation::DataError;
    use crate::data::prepare::PrepareError;
    use crate::train::TrainError;
    // A data file that cannot be read is a file problem; what is in it is a data problem.
    fn data(e: &DataError) -> u8 {
        match e {
            DataError::Io { .. } => exit::FAILURE,
            _ => exit::DATA,
        }
    }
    fn prepare(e: &PrepareError) -> u8 {
        match e {
            PrepareError::Data(e) => data(e),
            PrepareError::NoSamples { .. } | PrepareError::NoPairs { .. } => exit::DATA,
        }
    }
    for cause in err.chain() {
        if let Some(crate::convert::ConvertError::Unsupported { .. }) = cause.downcast_ref() {
            return exit::USAGE;
        }
        if cause.is::<UsageError>() || cause.is::<crate::train::recipe::RecipeError>() {
            return exit::USAGE;
        }
        if cause.is::<eval_generate::GateFailed>() || cause.is::<adapter::Refused>() {
            return exit::GATE;
        }
        if let Some(e) = cause.downcast_ref::<DataError>() {
            return data(e);
        }
        if let Some(crate::eval::EvalError::Data(e)) = cause.downcast_ref() {
            return data(e);
        }
        if let Some(e) = cause.downcast_ref::<PrepareError>() {
            return prepare(e);
        }
        if let Some(crate::score::ScoreError::Data(e)) = cause.downcast_ref() {
            return data(e);
        }
        if let Some(crate::generate::GenerateError::Data(e)) = cause.downcast_ref() {
            return data(e);
        }
        if let Some(crate::data::check::ShowError::Data(e)) = cause.downcast_ref() {
            return data(e);
        }
        if let Some(e) = cause.downcast_ref::<TrainError>() {
            return match e {
                TrainError::Diverged(_) => exit::DIVERGED,
                TrainError::Interrupted(_) => exit::INTERRUPTED,
                TrainError::Recipe(_) | TrainError::NoTargets(_) => exit::USAGE,
                TrainError::Changed { data: true, .. } => exit::DATA,
                TrainError::Changed { data: false, .. } => exit::USAGE,
                TrainError::Data(e) => data(e),
                TrainError::Prepare(p) => prepare(p),
                _ => exit::FAILURE,
            };
        }
    }
    exit::FAILURE
}
