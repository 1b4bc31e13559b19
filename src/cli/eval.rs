//! `ft eval`: the SFT loss, or with `--objective dpo` (alias `--dpo`) DPO metrics.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;

use super::args::{load_with_adapter, BackendArgs};
use super::UsageError;
use crate::data::conversation::read_jsonl;
use crate::data::tokenizer::{TemplateChoice, TextTokenizer};
use crate::loss::dpo::{DpoConfig, LossType};
use crate::ops::Kernels;

/// What `ft eval` measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum EvalObjective {
    /// Mean next-token loss over the assistant tokens of conversations.
    Sft,
    /// DPO losses and TRL's reward metrics over preference pairs.
    Dpo,
}

#[derive(Debug, clap::Args)]
pub struct EvalArgs {
    /// Hugging Face model directory.
    #[arg(long)]
    pub model: PathBuf,
    /// A PEFT LoRA adapter directory to apply on top of the model.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Data: JSONL conversations {"messages": [{"role", "content"}, ...]} per line, or for
    /// `--objective dpo` preference pairs {"prompt", "chosen", "rejected"}; a file, `.jsonl.gz`,
    /// directory or glob.
    #[arg(long)]
    pub data: PathBuf,
    /// Chat template: the model's own, or built-in ChatML.
    #[arg(long, value_enum, default_value_t = TemplateChoice::Model)]
    pub template: TemplateChoice,
    /// Cut samples to at most N tokens (the count of cut samples is reported); with
    /// `--objective dpo`, pairs longer than N are dropped (and counted).
    #[arg(long)]
    pub max_len: Option<usize>,
    /// What to measure: `sft` (the assistant-token loss) or `dpo` (DPO losses and TRL's reward
    /// metrics, the adapter-disabled model as reference).
    #[arg(long, value_enum, default_value_t = EvalObjective::Sft)]
    pub objective: EvalObjective,
    /// The same as `--objective dpo`.
    #[arg(long, conflicts_with = "objective")]
    pub dpo: bool,
    /// DPO β [default: 0.1].
    #[arg(long)]
    pub beta: Option<f64>,
    /// The DPO loss reported as `loss` (`losses` has all of them) [default: sigmoid].
    #[arg(long, value_enum)]
    pub loss_type: Option<LossType>,
    /// Label smoothing for the sigmoid and robust DPO losses [default: 0].
    #[arg(long)]
    pub label_smoothing: Option<f64>,
    /// Adds this times the chosen NLL to the DPO loss (RPO).
    #[arg(long)]
    pub rpo_alpha: Option<f64>,
    /// Prompts longer than this lose tokens from their start.
    #[arg(long)]
    pub max_prompt_len: Option<usize>,
    /// With `--objective dpo --json`: each pair's ids, completion positions and log-probs.
    #[arg(long)]
    pub per_pair: bool,
    #[command(flatten)]
    pub backend: BackendArgs,
    /// Print {"loss", "tokens", "samples", "perplexity"} as JSON.
    #[arg(long)]
    pub json: bool,
}

impl EvalArgs {
    fn objective(&self) -> EvalObjective {
        if self.dpo {
            EvalObjective::Dpo
        } else {
            self.objective
        }
    }

    /// The DPO settings; flags that only DPO reads are usage errors without it.
    fn dpo_config(&self) -> Result<Option<DpoConfig>, UsageError> {
        let dpo_only = [
            ("--beta", self.beta.is_some()),
            ("--loss-type", self.loss_type.is_some()),
            ("--label-smoothing", self.label_smoothing.is_some()),
            ("--rpo-alpha", self.rpo_alpha.is_some()),
            ("--max-prompt-len", self.max_prompt_len.is_some()),
            ("--per-pair", self.per_pair),
        ];
        if self.objective() == EvalObjective::Sft {
            return match dpo_only.iter().find(|(_, set)| *set) {
                Some((flag, _)) => Err(UsageError(format!("{flag} is a DPO setting: add --objective dpo"))),
                None => Ok(None),
            };
        }
        let d = DpoConfig::default();
        let config = DpoConfig {
            beta: self.beta.unwrap_or(d.beta),
            loss_type: self.loss_type.unwrap_or(d.loss_type),
            label_smoothing: self.label_smoothing.unwrap_or(d.label_smoothing),
            rpo_alpha: self.rpo_alpha,
        };
        if config.label_smoothing < 0.0 || config.label_smoothing >= 0.5 || config.beta.is_nan() || config.beta <= 0.0 {
            return Err(UsageError("--beta must be positive and --label-smoothing in [0, 0.5)".into()));
        }
        Ok(Some(config))
    }
}

pub fn run(a: EvalArgs) -> Result<()> {
    crate::dispatch_backend!(a.backend.device, a.backend.dtype, eval_on, a)
}

fn eval_on<B: Kernels>(a: EvalArgs, device: B::Device) -> Result<()> {
    if let Some(config) = a.dpo_config()? {
        return eval_dpo_on::<B>(a, config, device);
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

fn eval_dpo_on<B: Kernels>(a: EvalArgs, config: DpoConfig, device: B::Device) -> Result<()> {
    let t0 = Instant::now();
    let tok = TextTokenizer::from_dir(&a.model)?;
    let template = tok.template(a.template)?;
    let mut model = load_with_adapter::<B>(&a.model, a.adapter.as_deref(), &device)?;
    let r = crate::eval::evaluate_dpo(&mut model, &tok, &template, &a.data, config, a.max_len, a.max_prompt_len)?;
    for w in &r.warnings {
        eprintln!("warning: {w}");
    }
    let secs = t0.elapsed().as_secs_f64();
    let mut report = r.metrics;
    if a.json {
        report.insert("losses".into(), r.losses.into());
        report.insert("pairs".into(), r.pairs.len().into());
        report.insert("dropped".into(), r.dropped.into());
        report.insert("warnings".into(), r.warnings.len().into());
        report.insert("seconds".into(), secs.into());
        if a.per_pair {
            let side = crate::eval::side_json;
            let per: Vec<serde_json::Value> = r
                .pairs
                .iter()
                .zip(&r.logps)
                .map(|(p, l)| serde_json::json!({"chosen": side(&p.chosen, &l.chosen), "rejected": side(&p.rejected, &l.rejected)}))
                .collect();
            report.insert("per_pair".into(), per.into());
        }
        println!("{}", serde_json::Value::Object(report));
    } else {
        let g = |k: &str| report[k].as_f64().unwrap_or(f64::NAN);
        println!(
            "dpo {} loss {:.6}  reward accuracy {:.4}  margin {:.6}  chosen {:.6}  rejected {:.6}  pairs {}{}  ({:.1}s)",
            config.loss_type.name(),
            g("loss"),
            g("rewards/accuracies"),
            g("rewards/margins"),
            g("rewards/chosen"),
            g("rewards/rejected"),
            r.pairs.len(),
            if r.dropped > 0 { format!("  dropped {}", r.dropped) } else { String::new() },
            secs
        );
    }
    Ok(())
}
