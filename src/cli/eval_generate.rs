//! `ft eval --generate`: answers to prompts, scored; a CI gate with `--fail-under`.

use std::path::PathBuf;

use anyhow::Result;

use super::args::load_with_adapter;
use super::UsageError;
use crate::data::groups::read_prompts;
use crate::data::tokenizer::{TemplateChoice, TextTokenizer};
use crate::generate::{stop_ids, GenerateOptions};
use crate::geneval::{self, Answer, GenEvalSettings};
use crate::ops::Kernels;
use crate::train::rewards::RewardSpec;

/// The flags of `ft eval --generate`.
#[derive(Debug, Clone, clap::Args)]
pub struct GenerateEvalArgs {
    /// Generate answers to the prompts of `--data` ({"prompt": [messages] | "text", ...fields}
    /// or conversations {"messages": [...]}, answered after their last user turn, the next
    /// assistant reply becoming the field `reference`) and score them with `--scorer`s.
    #[arg(long)]
    pub generate: bool,
    /// A scorer (repeat for several; scores are weighted and summed): `regex:PATTERN`,
    /// `answer:FIELD` (the whole answer equals the record's FIELD, case and spacing folded),
    /// `number:FIELD` (the last number of the answer equals FIELD's), `model:DIR` (a reward
    /// model's score of the conversation; give `--pass-threshold`), `command:PROGRAM ARGS...`
    /// (split at spaces; it reads one JSON object per answer on stdin and prints one number per
    /// line), or a TOML
    /// inline table with the keys of GRPO's `[[grpo.rewards]]`, e.g.
    /// `{kind = "answer", field = "answer", extract = "answer_tag", weight = 2}`.
    #[arg(long = "scorer", requires = "generate")]
    pub scorers: Vec<String>,
    /// Write every prompt, answer and score here (JSONL; the input of `--baseline`).
    #[arg(long, requires = "generate")]
    pub out: Option<PathBuf>,
    /// Exit with code 5 when the mean score is below X (a CI gate).
    #[arg(long, requires = "generate")]
    pub fail_under: Option<f64>,
    /// An earlier run's `--out` on the same prompts: paired score difference and sign test.
    #[arg(long, requires = "generate")]
    pub baseline: Option<PathBuf>,
    /// New tokens per answer at most.
    #[arg(long, default_value_t = 256, requires = "generate")]
    pub max_new_tokens: usize,
    /// `--generate`: the sampling temperature (0, the default, decodes greedily); `--objective
    /// distill`: divides both models' logits [default: 1].
    #[arg(long)]
    pub temperature: Option<f32>,
    /// Nucleus sampling mass.
    #[arg(long, default_value_t = 1.0, requires = "generate")]
    pub top_p: f32,
    /// Seed of the answers' RNGs (each answer its own, from the seed, prompt and sample).
    #[arg(long, default_value_t = 0, requires = "generate")]
    pub seed: u64,
    /// Answers per prompt.
    #[arg(long, default_value_t = 1, requires = "generate", value_parser = clap::value_parser!(u64).range(1..))]
    pub samples: u64,
    /// An answer passes with a score ≥ T [default: the sum of the positive scorer weights: every
    /// rule met].
    #[arg(long, requires = "generate")]
    pub pass_threshold: Option<f64>,
    /// More token ids that end an answer (besides the model's end-of-sequence tokens).
    #[arg(long = "stop-id", requires = "generate")]
    pub stop_ids: Vec<u32>,
}

/// The evaluation gate failed (`--fail-under`; exit code 5).
#[derive(Debug, thiserror::Error)]
#[error("mean score {mean:.4} is below --fail-under {threshold}")]
pub struct GateFailed {
    pub mean: f64,
    pub threshold: f64,
}

/// A `--scorer` argument as a reward function.
fn scorer(arg: &str, k: usize) -> Result<RewardSpec, UsageError> {
    let bad = |msg: String| UsageError(format!("--scorer {arg:?}: {msg}"));
    let table = if arg.trim_start().starts_with('{') {
        arg.to_string()
    } else {
        let (kind, value) = arg.split_once(':').ok_or_else(|| bad("expected KIND:VALUE (regex, answer, number, command, model) or a TOML inline table".into()))?;
        let v = toml::Value::String(value.to_string()).to_string();
        match kind {
            "regex" => format!("{{kind = \"regex\", pattern = {v}}}"),
            "answer" => format!("{{kind = \"answer\", field = {v}}}"),
            "number" => format!("{{kind = \"number\", field = {v}, extract = \"last_number\"}}"),
            "model" => format!("{{kind = \"model\", model = {v}}}"),
            "command" => {
                let argv: Vec<String> = value.split_whitespace().map(|w| toml::Value::String(w.to_string()).to_string()).collect();
                format!("{{kind = \"command\", command = [{}]}}", argv.join(", "))
            }
            other => return Err(bad(format!("unknown scorer kind {other:?} (regex, answer, number, command, model)"))),
        }
    };
    let mut value: toml::Table = toml::from_str(&format!("s = {table}")).map_err(|e| bad(format!("not a TOML inline table: {e}")))?;
    let mut t = match value.remove("s") {
        Some(toml::Value::Table(t)) => t,
        _ => return Err(bad("not a TOML inline table".into())),
    };
    if !t.contains_key("name") {
        let kind = t.get("kind").and_then(|k| k.as_str()).unwrap_or("scorer").to_string();
        t.insert("name".into(), toml::Value::String(if k == 0 { kind } else { format!("{kind}{}", k + 1) }));
    }
    let spec: RewardSpec = t.try_into().map_err(|e: toml::de::Error| bad(e.message().to_string()))?;
    spec.check().map_err(|e| bad(e.to_string()))?;
    Ok(spec)
}

/// What `ft eval --generate` reads of `ft eval`'s other flags.
pub struct Inputs {
    pub model: PathBuf,
    pub adapter: Option<PathBuf>,
    pub data: PathBuf,
    pub template: TemplateChoice,
    pub batch_size: Option<usize>,
    pub json: bool,
}

pub fn eval_generate_on<B: Kernels>(a: Inputs, g: GenerateEvalArgs, device: B::Device) -> Result<()> {
    if g.scorers.is_empty() {
        return Err(UsageError("--generate needs at least one --scorer (e.g. --scorer regex:PATTERN)".into()).into());
    }
    let temperature = g.temperature.unwrap_or(0.0);
    let scorers = g.scorers.iter().enumerate().map(|(k, s)| scorer(s, k)).collect::<Result<Vec<_>, _>>()?;
    if g.fail_under.is_some_and(|x| !x.is_finite()) || g.pass_threshold.is_some_and(|x| !x.is_finite()) || temperature.is_nan() || temperature < 0.0 || g.top_p.is_nan() || g.top_p <= 0.0 || g.top_p > 1.0 {
        return Err(UsageError("--fail-under and --pass-threshold must be numbers, --temperature ≥ 0, --top-p in (0, 1]".into()).into());
    }
    let records = read_prompts(&a.data)?;
    let model = load_with_adapter::<B>(&a.model, a.adapter.as_deref(), &device)?;
    let tok = TextTokenizer::from_dir(&a.model)?;
    let template = tok.template(a.template)?;
    let mut stop = stop_ids(&a.model, &model.config.eos_token_ids, &tok);
    stop.extend(&g.stop_ids);
    let settings = GenEvalSettings {
        scorers,
        options: GenerateOptions { max_new_tokens: g.max_new_tokens, temperature, top_p: g.top_p, seed: g.seed, ignore_eos: false, stop_ids: stop },
        samples: g.samples as usize,
        batch: a.batch_size.unwrap_or(16),
        pass_threshold: g.pass_threshold,
    };
    let (answers, summary) = geneval::run(&model, &tok, &template, &records, &settings)?;
    let comparison = match &g.baseline {
        Some(b) => Some(geneval::compare(&answers, b)?),
        None => None,
    };
    if let Some(out) = &g.out {
        let mut bytes = Vec::new();
        for ans in &answers {
            serde_json::to_writer(&mut bytes, ans)?;
            bytes.push(b'\n');
        }
        crate::atomic::write_atomic(out, &bytes)?;
    }
    if a.json {
        let mut v = serde_json::to_value(&summary)?;
        if let Some(c) = &comparison {
            v["baseline"] = serde_json::to_value(c)?;
        }
        println!("{v}");
    } else {
        print_summary(&summary, &answers);
        if let Some(c) = &comparison {
            println!(
                "vs baseline ({} paired): mean score {:.4} → {:.4}, difference {:+.4} [{:+.4}, {:+.4}]; {} better, {} worse, {} same; sign test p = {:.4}",
                c.paired, c.baseline_mean_score, summary.mean_score, c.mean_difference, c.difference_ci95[0], c.difference_ci95[1], c.wins, c.losses, c.ties, c.sign_test_p
            );
        }
    }
    if let Some(threshold) = g.fail_under {
        if summary.mean_score < threshold {
            return Err(GateFailed { mean: summary.mean_score, threshold }.into());
        }
    }
    Ok(())
}

fn print_summary(s: &geneval::Summary, answers: &[Answer]) {
    println!("prompts          {}", s.prompts);
    println!("answers          {} ({} hit the token limit, mean {:.1} tokens)", s.answers, s.truncated, s.mean_tokens);
    println!("mean score       {:.4}  95% CI [{:.4}, {:.4}]", s.mean_score, s.score_ci95[0], s.score_ci95[1]);
    println!("pass rate        {:.4}  95% CI [{:.4}, {:.4}]  (score ≥ {})", s.pass_rate, s.pass_ci95[0], s.pass_ci95[1], s.pass_threshold);
    for (name, m) in &s.scorers {
        println!("  {name:<14} {:.4}", m.as_f64().unwrap_or(f64::NAN));
    }
    println!("answers/s        {:.2} ({:.1} s)", s.answers_per_s, s.seconds);
    let _ = answers;
}
