//! `ft eval`: the SFT loss, or with `--objective dpo` (alias `--dpo`) DPO metrics.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use serde_json::{Map, Value};

use super::args::{load_with_adapter, BackendArgs};
use super::UsageError;
use crate::data::conversation::read_jsonl;
use crate::data::tokenizer::{TemplateChoice, TextTokenizer};
use clap::ValueEnum;

use crate::loss::dpo::{DpoConfig, LossType};
use crate::loss::grpo::{GrpoConfig, GrpoLossType, ScaleRewards};
use crate::loss::kto::KtoConfig;
use crate::loss::ref_free::{CpoLossType, RefFree};
use crate::ops::Kernels;

/// What `ft eval` measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum EvalObjective {
    /// Mean next-token loss over the assistant tokens of conversations.
    Sft,
    /// DPO losses and TRL's reward metrics over preference pairs.
    Dpo,
    /// ORPO's loss and TRL's metrics over preference pairs (no reference).
    Orpo,
    /// CPO's loss (`--loss-type sigmoid|hinge|ipo|simpo`) and TRL's metrics (no reference).
    Cpo,
    /// SimPO (CPO's simpo loss, β 2, γ 0.5, no NLL term) and TRL's metrics (no reference).
    Simpo,
    /// KTO's loss and TRL's metrics over unpaired rows {"prompt", "completion", "label"} (or
    /// preference pairs, unpaired as TRL does), the adapter-disabled model as reference.
    Kto,
    /// GRPO's loss and TRL's metrics on groups of sampled, scored completions {"prompt",
    /// "completions": [{"text" | "completion_ids", "reward" | "rewards", "truncated"}]} (no sampling).
    Grpo,
    /// A reward model's (`*ForSequenceClassification`) loss and TRL RewardTrainer's metrics
    /// (`accuracy`, `margin`, rewards) over preference pairs (`--center-rewards-coefficient`).
    Reward,
    /// The divergence of the model from `--teacher` over the assistant tokens of conversations
    /// (`--loss-type forward_kl|reverse_kl|jsd`, `--beta`, `--temperature`), as TRL's GKD.
    Distill,
}

#[derive(Debug, clap::Args)]
pub struct EvalArgs {
    /// Hugging Face model directory.
    #[arg(long, value_parser = crate::cli::args::model_dir)]
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
    /// β [default: 0.1; simpo 2.0].
    #[arg(long)]
    pub beta: Option<f64>,
    /// The loss type: DPO `sigmoid|ipo|hinge|robust` (reported as `loss`; `losses` has all of
    /// them), CPO `sigmoid|hinge|ipo|simpo` [default: sigmoid].
    #[arg(long)]
    pub loss_type: Option<String>,
    /// Label smoothing for the sigmoid and robust losses [default: 0].
    #[arg(long)]
    pub label_smoothing: Option<f64>,
    /// CPO/SimPO: the weight of the chosen completions' NLL [default: cpo 1, simpo 0].
    #[arg(long)]
    pub cpo_alpha: Option<f64>,
    /// SimPO's γ (TRL's `simpo_gamma`) [default: 0.5].
    #[arg(long)]
    pub gamma: Option<f64>,
    /// DPO, KTO: a PEFT adapter that, frozen, is the reference (as when training continues from
    /// it) instead of the adapter-disabled model.
    #[arg(long)]
    pub reference_adapter: Option<PathBuf>,
    /// Reward: TRL's `center_rewards_coefficient` (adds c · mean((r_c + r_r)²)).
    #[arg(long)]
    pub center_rewards_coefficient: Option<f64>,
    /// Distill: the teacher model directory (the student's tokenizer).
    #[arg(long, value_parser = crate::cli::args::model_dir)]
    pub teacher: Option<PathBuf>,
    /// KTO: the weight of desirable rows' losses [default: 1].
    #[arg(long)]
    pub desirable_weight: Option<f64>,
    /// KTO: the weight of undesirable rows' losses [default: 1].
    #[arg(long)]
    pub undesirable_weight: Option<f64>,
    /// GRPO: how advantages are scaled [default: group].
    #[arg(long, value_enum)]
    pub scale_rewards: Option<ScaleRewards>,
    /// GRPO: reward function weights, `name=w,...` (unnamed functions weigh 1).
    #[arg(long, value_delimiter = ',')]
    pub reward_weights: Vec<String>,
    /// GRPO: the length limit completions were sampled with (`dr_grpo` divides by it)
    /// [default: the longest completion].
    #[arg(long)]
    pub max_completion_length: Option<usize>,
    /// KTO: rows per KL estimate (TRL's batch; the mismatched completions rotate within it)
    /// [default: all rows]; `--generate`: answers generated together [default: 16].
    #[arg(long)]
    pub batch_size: Option<usize>,
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
    pub generation: super::eval_generate::GenerateEvalArgs,
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

    /// The preference objective and its settings; a flag the chosen objective does not read is
    /// a usage error.
    fn preference(&self) -> Result<Option<Preference>, UsageError> {
        let objective = self.objective();
        // Each flag and the objectives that read it.
        let flags = [
            ("--beta", self.beta.is_some(), "dpo|orpo|cpo|simpo|kto|grpo|distill"),
            ("--teacher", self.teacher.is_some(), "distill"),
            ("--center-rewards-coefficient", self.center_rewards_coefficient.is_some(), "reward"),
            ("--temperature", self.generation.temperature.is_some(), "distill"),
            ("--scale-rewards", self.scale_rewards.is_some(), "grpo"),
            ("--reward-weights", !self.reward_weights.is_empty(), "grpo"),
            ("--max-completion-length", self.max_completion_length.is_some(), "grpo"),
            ("--desirable-weight", self.desirable_weight.is_some(), "kto"),
            ("--undesirable-weight", self.undesirable_weight.is_some(), "kto"),
            ("--batch-size", self.batch_size.is_some(), "kto"),
            ("--reference-adapter", self.reference_adapter.is_some(), "dpo|kto|grpo"),
            ("--loss-type", self.loss_type.is_some(), "dpo|cpo|grpo|distill"),
            ("--label-smoothing", self.label_smoothing.is_some(), "dpo|cpo|simpo"),
            ("--rpo-alpha", self.rpo_alpha.is_some(), "dpo"),
            ("--cpo-alpha", self.cpo_alpha.is_some(), "cpo|simpo"),
            ("--gamma", self.gamma.is_some(), "cpo|simpo"),
            ("--max-prompt-len", self.max_prompt_len.is_some(), "dpo|orpo|cpo|simpo"),
            ("--per-pair", self.per_pair, "dpo"),
        ];
        let name = format!("{objective:?}").to_lowercase();
        if let Some((flag, _, readers)) = flags.iter().find(|(_, set, readers)| *set && !readers.split('|').any(|r| r == name)) {
            let readers = readers.replace('|', ", ");
            return Err(UsageError(format!("{flag} is not a setting of --objective {name}; it is one of --objective {readers}")));
        }
        let beta_ok = |b: f64| b > 0.0 && b.is_finite();
        let ls = self.label_smoothing.unwrap_or(0.0);
        if !(0.0..0.5).contains(&ls) || (!matches!(objective, EvalObjective::Grpo | EvalObjective::Distill) && self.beta.is_some_and(|b| !beta_ok(b))) {
            return Err(UsageError("--beta must be positive and --label-smoothing in [0, 0.5)".into()));
        }
        if self.cpo_alpha.is_some_and(|a| !(a >= 0.0 && a.is_finite())) || self.gamma.is_some_and(|g| !g.is_finite()) {
            return Err(UsageError("--cpo-alpha must be a number ≥ 0 and --gamma a number".into()));
        }
        let parse = |what: &str, allowed: &str| -> Result<String, UsageError> {
            let t = self.loss_type.clone().unwrap_or_else(|| "sigmoid".into());
            match allowed.split('|').any(|a| a == t) {
                true => Ok(t),
                false => Err(UsageError(format!("--loss-type {t:?} is not a {what} loss type ({allowed})"))),
            }
        };
        let weight_ok = |w: Option<f64>| w.is_none_or(|w| w >= 0.0 && w.is_finite());
        if !weight_ok(self.desirable_weight) || !weight_ok(self.undesirable_weight) || self.batch_size == Some(0) {
            return Err(UsageError("--desirable-weight and --undesirable-weight must be numbers ≥ 0 and --batch-size at least 1".into()));
        }
        Ok(Some(match objective {
            EvalObjective::Sft => return Ok(None),
            EvalObjective::Reward => {
                if self.center_rewards_coefficient.is_some_and(|c| !(c >= 0.0 && c.is_finite())) {
                    return Err(UsageError("--center-rewards-coefficient must be a number ≥ 0".into()));
                }
                Preference::Reward(crate::loss::reward::RewardConfig { center_rewards_coefficient: self.center_rewards_coefficient })
            }
            EvalObjective::Distill => {
                let d = crate::loss::distill::DistillConfig::default();
                let t = self.loss_type.clone().unwrap_or_else(|| "jsd".into());
                let divergence = crate::loss::distill::Divergence::from_str(&t, true).map_err(|_| UsageError(format!("--loss-type {t:?} is not a divergence (forward_kl|reverse_kl|jsd)")))?;
                let beta = self.beta.unwrap_or(d.beta);
                let temperature = self.generation.temperature.map_or(d.temperature, f64::from);
                if !((0.0..=1.0).contains(&beta) && temperature > 0.0 && temperature.is_finite()) {
                    return Err(UsageError("--beta must be in [0, 1] and --temperature positive for --objective distill".into()));
                }
                if self.teacher.is_none() {
                    return Err(UsageError("--objective distill needs --teacher DIR".into()));
                }
                Preference::Distill(crate::loss::distill::DistillConfig { divergence, beta, temperature })
            }
            EvalObjective::Grpo => {
                let d = GrpoConfig::default();
                let t = self.loss_type.clone().unwrap_or_else(|| "dapo".into());
                let loss_type = GrpoLossType::from_str(&t, true).map_err(|_| UsageError(format!("--loss-type {t:?} is not a GRPO loss type (grpo|dapo|dr_grpo|bnpo)")))?;
                if self.beta.is_some_and(|b| b < 0.0) {
                    return Err(UsageError("--beta must be ≥ 0 for GRPO".into()));
                }
                Preference::Grpo(GrpoConfig { loss_type, beta: self.beta.unwrap_or(0.0), scale_rewards: self.scale_rewards.unwrap_or(d.scale_rewards), ..d })
            }
            EvalObjective::Kto => {
                let d = KtoConfig::default();
                Preference::Kto(KtoConfig {
                    beta: self.beta.unwrap_or(d.beta),
                    desirable_weight: self.desirable_weight.unwrap_or(d.desirable_weight),
                    undesirable_weight: self.undesirable_weight.unwrap_or(d.undesirable_weight),
                })
            }
            EvalObjective::Dpo => {
                let d = DpoConfig::default();
                let loss_type = LossType::from_str(&parse("DPO", "sigmoid|ipo|hinge|robust")?, true).map_err(UsageError)?;
                Preference::Dpo(DpoConfig { beta: self.beta.unwrap_or(d.beta), loss_type, label_smoothing: ls, rpo_alpha: self.rpo_alpha })
            }
            EvalObjective::Orpo => Preference::RefFree(RefFree::Orpo { beta: self.beta.unwrap_or(0.1) }),
            EvalObjective::Cpo | EvalObjective::Simpo => {
                let defaults = if objective == EvalObjective::Cpo { RefFree::cpo() } else { RefFree::simpo() };
                let RefFree::Cpo { beta, loss_type, cpo_alpha, simpo_gamma, .. } = defaults else {
                    unreachable!("cpo() and simpo() are CPO objectives")
                };
                let loss_type = match objective {
                    EvalObjective::Cpo => CpoLossType::from_str(&parse("CPO", "sigmoid|hinge|ipo|simpo")?, true).map_err(UsageError)?,
                    _ => loss_type,
                };
                Preference::RefFree(RefFree::Cpo {
                    beta: self.beta.unwrap_or(beta),
                    loss_type,
                    label_smoothing: ls,
                    cpo_alpha: self.cpo_alpha.unwrap_or(cpo_alpha),
                    simpo_gamma: self.gamma.unwrap_or(simpo_gamma),
                })
            }
        }))
    }
}

/// A preference objective of `ft eval`.
enum Preference {
    Dpo(DpoConfig),
    RefFree(RefFree),
    Kto(KtoConfig),
    Grpo(GrpoConfig),
    Distill(crate::loss::distill::DistillConfig),
    Reward(crate::loss::reward::RewardConfig),
}

pub fn run(a: EvalArgs) -> Result<()> {
    crate::dispatch_backend!(a.backend.device, a.backend.dtype, eval_on, a)
}

fn eval_on<B: Kernels>(a: EvalArgs, device: B::Device) -> Result<()> {
    if a.generation.generate {
        // The flags `--generate` does not read.
        let unused = [
            ("--objective/--dpo", a.dpo || a.objective != EvalObjective::Sft),
            ("--max-len", a.max_len.is_some()),
            ("--beta", a.beta.is_some()),
            ("--loss-type", a.loss_type.is_some()),
            ("--reference-adapter", a.reference_adapter.is_some()),
            ("--per-pair", a.per_pair),
        ];
        if let Some((flag, _)) = unused.iter().find(|(_, set)| *set) {
            return Err(UsageError(format!("{flag} is not a setting of --generate")).into());
        }
        let inputs = super::eval_generate::Inputs { model: a.model, adapter: a.adapter, data: a.data, template: a.template, batch_size: a.batch_size, json: a.json };
        return super::eval_generate::eval_generate_on::<B>(inputs, a.generation, device);
    }
    match a.preference()? {
        Some(Preference::Dpo(config)) => return eval_dpo_on::<B>(a, config, device),
        Some(Preference::RefFree(objective)) => return eval_ref_free_on::<B>(a, objective, device),
        Some(Preference::Kto(config)) => return eval_kto_on::<B>(a, config, device),
        Some(Preference::Grpo(config)) => return eval_grpo_on::<B>(a, config, device),
        Some(Preference::Distill(config)) => return eval_distill_on::<B>(a, config, device),
        Some(Preference::Reward(config)) => return eval_reward_on::<B>(a, config, device),
        None => {}
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
        let kernels = crate::ops::kernel_use::snapshot();
        if !kernels.is_empty() {
            v["gpu_kernels"] = serde_json::to_value(&kernels)?;
        }
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

/// `ft eval --objective reward`: a reward model's loss and metrics on preference pairs.
fn eval_reward_on<B: Kernels>(a: EvalArgs, config: crate::loss::reward::RewardConfig, device: B::Device) -> Result<()> {
    let t0 = Instant::now();
    let (tok, template, model) = preference_setup::<B>(&a, &device)?;
    if model.score.is_none() {
        return Err(crate::loss::reward::RewardModelError::NoScoreHead { dir: a.adapter.clone().unwrap_or_else(|| a.model.clone()) }.into());
    }
    let opts = crate::data::prepare::PrepareOptions {
        max_len: a.max_len.unwrap_or(usize::MAX),
        overlong: crate::data::prepare::Overlong::Drop,
        drop_untrainable: false,
        max_prompt_len: None,
        cache: None,
    };
    let (pairs, dropped, warnings) = crate::data::prepare::pairs(&tok, &template, &a.data, &opts)?;
    for w in &warnings {
        eprintln!("warning: {w}");
    }
    let metrics = crate::eval::evaluate_reward(&model, &pairs, config)?;
    let extra = vec![("pairs", pairs.len().into()), ("dropped", dropped.into())];
    let shown = [("loss", "loss"), ("accuracy", "accuracy"), ("margin", "margin"), ("mean reward", "mean_reward")];
    let tail = counted("pairs", pairs.len(), dropped);
    print_preference(&a, metrics, extra, "reward", &shown, &tail, t0.elapsed().as_secs_f64());
    Ok(())
}

/// `ft eval --objective distill`: the divergence from `--teacher`.
fn eval_distill_on<B: Kernels>(a: EvalArgs, config: crate::loss::distill::DistillConfig, device: B::Device) -> Result<()> {
    let data = read_jsonl(&a.data)?;
    let teacher_dir = a.teacher.clone().expect("checked: distill has --teacher");
    let teacher = crate::loss::distill::load_teacher::<B>(&teacher_dir, &a.model, &device, Default::default())?;
    let model = load_with_adapter::<B>(&a.model, a.adapter.as_deref(), &device)?;
    let tok = TextTokenizer::from_dir(&a.model)?;
    let template = tok.template(a.template)?;
    let t0 = Instant::now();
    let report = crate::eval::evaluate_distill(&model, &teacher, &tok, &template, &data, a.max_len, &config)?;
    if a.json {
        let mut v = serde_json::to_value(&report)?;
        v["eval_s"] = t0.elapsed().as_secs_f64().into();
        println!("{v}");
    } else {
        println!("{:?} {:.6}  tokens {}  samples {}  ({:.1}s)", config.divergence, report.loss, report.tokens, report.samples, t0.elapsed().as_secs_f64());
    }
    Ok(())
}

/// The tokenizer, chat template and model (+ `--adapter`, + `--reference-adapter` frozen as the
/// reference) of a preference eval.
fn preference_setup<B: Kernels>(a: &EvalArgs, device: &B::Device) -> Result<(TextTokenizer, crate::data::template::ChatTemplate, crate::model::Decoder<B>)> {
    let tok = TextTokenizer::from_dir(&a.model)?;
    let template = tok.template(a.template)?;
    let mut model = load_with_adapter::<B>(&a.model, a.adapter.as_deref(), device)?;
    if let Some(dir) = &a.reference_adapter {
        crate::adapters::peft::PeftAdapter::open(dir)?.attach_reference(&mut model)?;
    }
    Ok((tok, template, model))
}

/// Prints a preference report: with `--json` the metrics plus `extra` and `seconds`; else one line,
/// `title` then each `(label, metric)` and `tail`.
fn print_preference(a: &EvalArgs, mut report: Map<String, Value>, extra: Vec<(&str, Value)>, title: &str, shown: &[(&str, &str)], tail: &str, secs: f64) {
    if a.json {
        for (k, v) in extra {
            report.insert(k.into(), v);
        }
        report.insert("seconds".into(), secs.into());
        println!("{}", Value::Object(report));
    } else {
        let mut line = title.to_string();
        for (label, key) in shown {
            line.push_str(&format!("  {label} {:.6}", report.get(*key).and_then(Value::as_f64).unwrap_or(f64::NAN)));
        }
        println!("{line}  {tail}  ({secs:.1}s)");
    }
}

/// `pairs 3  dropped 1` (the drop count only when there is one).
fn counted(what: &str, n: usize, dropped: usize) -> String {
    if dropped > 0 {
        format!("{what} {n}  dropped {dropped}")
    } else {
        format!("{what} {n}")
    }
}

fn eval_dpo_on<B: Kernels>(a: EvalArgs, config: DpoConfig, device: B::Device) -> Result<()> {
    let t0 = Instant::now();
    let (tok, template, mut model) = preference_setup::<B>(&a, &device)?;
    let r = crate::eval::evaluate_dpo(&mut model, &tok, &template, &a.data, config, a.max_len, a.max_prompt_len)?;
    for w in &r.warnings {
        eprintln!("warning: {w}");
    }
    let mut extra = vec![("losses", Value::Object(r.losses)), ("pairs", r.pairs.len().into()), ("dropped", r.dropped.into()), ("warnings", r.warnings.len().into())];
    if a.per_pair {
        let side = crate::eval::side_json;
        let per: Vec<Value> =
            r.pairs.iter().zip(&r.logps).map(|(p, l)| serde_json::json!({"chosen": side(&p.chosen, &l.chosen), "rejected": side(&p.rejected, &l.rejected)})).collect();
        extra.push(("per_pair", per.into()));
    }
    let shown = [("loss", "loss"), ("reward accuracy", "rewards/accuracies"), ("margin", "rewards/margins"), ("chosen", "rewards/chosen"), ("rejected", "rewards/rejected")];
    let tail = counted("pairs", r.pairs.len(), r.dropped);
    print_preference(&a, r.metrics, extra, &format!("dpo {}", config.loss_type.name()), &shown, &tail, t0.elapsed().as_secs_f64());
    Ok(())
}

fn eval_ref_free_on<B: Kernels>(a: EvalArgs, objective: RefFree, device: B::Device) -> Result<()> {
    let t0 = Instant::now();
    let (tok, template, model) = preference_setup::<B>(&a, &device)?;
    let r = crate::eval::evaluate_ref_free(&model, &tok, &template, &a.data, objective, a.max_len, a.max_prompt_len)?;
    for w in &r.warnings {
        eprintln!("warning: {w}");
    }
    let extra = vec![("pairs", r.pairs.into()), ("dropped", r.dropped.into()), ("warnings", r.warnings.len().into())];
    let shown = [("loss", "loss"), ("nll", "nll_loss"), ("reward accuracy", "rewards/accuracies"), ("margin", "rewards/margins"), ("chosen", "rewards/chosen"), ("rejected", "rewards/rejected")];
    let tail = counted("pairs", r.pairs, r.dropped);
    print_preference(&a, r.metrics, extra, objective.name(), &shown, &tail, t0.elapsed().as_secs_f64());
    Ok(())
}

fn eval_kto_on<B: Kernels>(a: EvalArgs, config: KtoConfig, device: B::Device) -> Result<()> {
    let t0 = Instant::now();
    let (tok, template, mut model) = preference_setup::<B>(&a, &device)?;
    let r = crate::eval::evaluate_kto(&mut model, &tok, &template, &a.data, config, a.max_len, a.batch_size)?;
    let extra = vec![("kl_unclamped", r.kl_unclamped.into()), ("rows", r.rows.into()), ("dropped", r.dropped.into())];
    let shown = [("loss", "loss"), ("kl", "kl"), ("margin", "rewards/margins"), ("chosen", "rewards/chosen"), ("rejected", "rewards/rejected")];
    let tail = counted("rows", r.rows, r.dropped);
    print_preference(&a, r.metrics, extra, "kto", &shown, &tail, t0.elapsed().as_secs_f64());
    Ok(())
}

fn eval_grpo_on<B: Kernels>(a: EvalArgs, config: GrpoConfig, device: B::Device) -> Result<()> {
    let t0 = Instant::now();
    let weights: Vec<(String, f64)> = a
        .reward_weights
        .iter()
        .map(|w| {
            let (n, v) = w.split_once('=').ok_or_else(|| UsageError(format!("--reward-weights {w:?}: expected name=weight")))?;
            let v: f64 = v.parse().ok().filter(|v: &f64| v.is_finite()).ok_or_else(|| UsageError(format!("--reward-weights {w:?}: the weight is not a number")))?;
            Ok((n.to_string(), v))
        })
        .collect::<Result<_, UsageError>>()?;
    let (tok, template, mut model) = preference_setup::<B>(&a, &device)?;
    let r = crate::eval::evaluate_grpo(&mut model, &tok, &template, &a.data, config, &weights, a.max_completion_length)?;
    let extra = vec![("advantages", r.advantages.into()), ("groups", r.groups.into())];
    let shown = [("loss", "loss"), ("reward", "reward"), ("reward std", "reward_std"), ("mean length", "completions/mean_length"), ("entropy", "entropy")];
    let tail = format!("groups {}", r.groups);
    print_preference(&a, r.metrics, extra, &format!("grpo {:?}", config.loss_type), &shown, &tail, t0.elapsed().as_secs_f64());
    Ok(())
}
