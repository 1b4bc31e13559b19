//! `ft score`.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;

use super::args::BackendArgs;
use crate::data::tokenizer::TemplateChoice;
use crate::loss::reward::RewardModel;
use crate::ops::Kernels;

#[derive(Debug, clap::Args)]
pub struct ScoreArgs {
    /// The reward model: a `*ForSequenceClassification` directory, or the base of `--adapter`.
    #[arg(long, value_parser = crate::cli::args::model_dir)]
    pub model: PathBuf,
    /// A PEFT SEQ_CLS adapter (LoRA and the trained `score` head), e.g. a `train.method =
    /// "reward"` run's `adapter/`.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// JSONL: `{"messages": [...]}`, `{"prompt", "completion"}`, `{"prompt", "chosen",
    /// "rejected"}` (both scored) or `{"text"}` per line.
    #[arg(long)]
    pub data: PathBuf,
    /// Write the records with their rewards here (JSONL) instead of standard output.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Chat template: the reward model's own, or built-in ChatML.
    #[arg(long, value_enum, default_value_t = TemplateChoice::Model)]
    pub template: TemplateChoice,
    #[command(flatten)]
    pub backend: BackendArgs,
    /// Print the summary as JSON (on standard error when the records go to standard output).
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: ScoreArgs) -> Result<()> {
    crate::dispatch_backend!(a.backend.device, a.backend.dtype, score_on, a)
}

fn score_on<B: Kernels>(a: ScoreArgs, device: B::Device) -> Result<()> {
    let t0 = Instant::now();
    let rm = RewardModel::<B>::load(&a.model, a.adapter.as_deref(), a.template, &device)?;
    let (records, summary) = crate::score::score_file(&rm, &a.data)?;
    let mut bytes = Vec::new();
    for r in &records {
        serde_json::to_writer(&mut bytes, r)?;
        bytes.push(b'\n');
    }
    match &a.out {
        Some(out) => crate::atomic::write_atomic(out, &bytes)?,
        None => {
            use std::io::Write;
            std::io::stdout().write_all(&bytes)?;
        }
    }
    let seconds = t0.elapsed().as_secs_f64();
    if a.json {
        let mut v = serde_json::to_value(&summary)?;
        v["seconds"] = seconds.into();
        if a.out.is_some() {
            println!("{v}");
        } else {
            eprintln!("{v}");
        }
    } else {
        let mut line = format!("{} records, mean reward {:.4} [{:.4}, {:.4}]", summary.records, summary.mean_reward, summary.min_reward, summary.max_reward);
        if let (Some(acc), Some(m)) = (summary.accuracy, summary.margin) {
            line.push_str(&format!("; {} pairs: accuracy {acc:.4}, margin {m:.4}", summary.pairs));
        }
        eprintln!("{line} ({seconds:.1} s)");
    }
    Ok(())
}
