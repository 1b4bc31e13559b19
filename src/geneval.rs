//! Generation evals (`ft eval --generate`): answers to held-out prompts, greedy or sampled,
//! scored by the rule scorers GRPO's rewards use (`train::rewards`: regex, exact/normalised
//! answer, numeric, `\boxed{}`/`<answer>` extraction, length, an external command), summarised
//! as a mean score and a pass rate with 95% confidence intervals, and compared with a baseline
//! run on the same prompts (paired difference, exact sign test).

use std::path::Path;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::data::groups::PromptRecord;
use crate::data::template::ChatTemplate;
use crate::data::tokenizer::{TextTokenizer, TokenizerError};
use crate::generate::{generate_batch, GenerateOptions};
use crate::model::Decoder;
use crate::ops::Kernels;
use crate::train::rewards::{RewardError, RewardKind, RewardSpec, Scorer, ToScore};

/// What a generation eval does.
#[derive(Debug, Clone)]
pub struct GenEvalSettings {
    /// Scorers, weighted and summed into each answer's score.
    pub scorers: Vec<RewardSpec>,
    /// Decoding (temperature 0: greedy); `seed` seeds every answer's own RNG.
    pub options: GenerateOptions,
    /// Answers per prompt.
    pub samples: usize,
    /// Sequences generated together.
    pub batch: usize,
    /// An answer passes with a score ≥ this (default: the sum of the positive weights of the
    /// rule and command scorers, i.e. every rule met; a reward model's weight is left out, so
    /// that with it alone a positive reward passes).
    pub pass_threshold: Option<f64>,
}

impl GenEvalSettings {
    /// The pass threshold in force.
    pub fn threshold(&self) -> f64 {
        self.pass_threshold.unwrap_or_else(|| self.scorers.iter().filter(|s| s.kind != RewardKind::Model).map(|s| s.weight.max(0.0)).sum())
    }
}

/// One scored answer (a line of `--out`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Answer {
    /// The prompt's index in the data (0-based) and the answer's among its samples.
    pub index: usize,
    pub sample: usize,
    /// Where the prompt came from (`file:line`).
    pub at: String,
    /// The prompt as rendered by the chat template.
    pub prompt: String,
    pub completion: String,
    pub ids: Vec<u32>,
    /// Whether the answer hit the token limit.
    pub truncated: bool,
    /// Σ log p(token) under the model (before temperature and top-p).
    pub sum_logprob: f64,
    /// The weighted sum of the scorers.
    pub score: f64,
    pub passed: bool,
    /// Each scorer's value by name.
    pub scores: Map<String, Value>,
}

/// A 95% interval.
pub type Interval = [f64; 2];

/// The summary of a generation eval.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub prompts: usize,
    pub answers: usize,
    pub mean_score: f64,
    /// Mean ± 1.96 standard errors, within the scores' range.
    pub score_ci95: Interval,
    pub pass_threshold: f64,
    pub pass_rate: f64,
    /// Wilson score interval.
    pub pass_ci95: Interval,
    /// Each scorer's mean.
    pub scorers: Map<String, Value>,
    pub mean_tokens: f64,
    pub truncated: usize,
    pub seconds: f64,
    pub answers_per_s: f64,
}

/// Errors of a generation eval.
#[derive(Debug, thiserror::Error)]
pub enum GenEvalError {
    #[error(transparent)]
    Scorer(#[from] RewardError),
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error("{at}: rendering the chat template: {msg}")]
    Template { at: String, msg: String },
    #[error("{path}: {msg}")]
    Baseline { path: String, msg: String },
}

/// The seed of answer `sample` to prompt `index`.
fn answer_seed(seed: u64, index: usize, sample: usize) -> u64 {
    let mut h = seed ^ 0x2545_F491_4F6C_DD1D;
    for x in [index as u64, sample as u64] {
        h = (h ^ x).wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(31);
    }
    h
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

/// Mean ± 1.96 standard errors (unbiased variance; a single value has a zero-width interval),
/// kept within the smallest and largest value (a mean of 0/1 scores stays in [0, 1]).
fn normal_interval(v: &[f64]) -> Interval {
    let m = mean(v);
    if v.len() < 2 {
        return [m, m];
    }
    let var = v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (v.len() - 1) as f64;
    let half = 1.96 * (var / v.len() as f64).sqrt();
    let (lo, hi) = v.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &x| (a.min(x), b.max(x)));
    [(m - half).max(lo), (m + half).min(hi)]
}

/// The Wilson score interval of `k` successes in `n` (95%).
pub fn wilson(k: usize, n: usize) -> Interval {
    if n == 0 {
        return [0.0, 1.0];
    }
    let (z, n_f) = (1.96f64, n as f64);
    let p = k as f64 / n_f;
    let denom = 1.0 + z * z / n_f;
    let centre = (p + z * z / (2.0 * n_f)) / denom;
    let half = z * (p * (1.0 - p) / n_f + z * z / (4.0 * n_f * n_f)).sqrt() / denom;
    [(centre - half).max(0.0), (centre + half).min(1.0)]
}

/// The two-sided exact sign test: the probability, with wins and losses equally likely, of a
/// split at least as uneven as `wins`:`losses` (ties left out).
pub fn sign_test(wins: usize, losses: usize) -> f64 {
    let n = wins + losses;
    if n == 0 {
        return 1.0;
    }
    let k = wins.min(losses);
    // P(X ≤ k) for X ~ Binomial(n, 1/2), summed in log space.
    let ln_choose = |n: usize, i: usize| -> f64 { (1..=i).map(|j| ((n - i + j) as f64).ln() - (j as f64).ln()).sum() };
    let terms: Vec<f64> = (0..=k).map(|i| ln_choose(n, i) - n as f64 * std::f64::consts::LN_2).collect();
    let max = terms.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let tail = max.exp() * terms.iter().map(|t| (t - max).exp()).sum::<f64>();
    (2.0 * tail).min(1.0)
}

/// Answers every prompt `samples` times and scores the answers.
pub fn run<B: Kernels>(model: &Decoder<B>, tok: &TextTokenizer, template: &ChatTemplate, records: &[PromptRecord], s: &GenEvalSettings) -> Result<(Vec<Answer>, Summary), GenEvalError> {
    let start = Instant::now();
    let scorers = s.scorers.iter().map(|spec| Scorer::new::<B>(spec.clone(), &model.device())).collect::<Result<Vec<_>, _>>()?;
    let mut prompts = Vec::with_capacity(records.len());
    for r in records {
        let text = template.render_with_tools(&r.prompt, r.tools.as_ref(), true).map_err(|e| GenEvalError::Template { at: r.at.to_string(), msg: format!("{e:#}") })?;
        let ids = tok.encode(&text)?.get_ids().to_vec();
        prompts.push((text, ids));
    }
    // Every (prompt, sample), generated `batch` at a time.
    let jobs: Vec<(usize, usize)> = (0..records.len()).flat_map(|i| (0..s.samples).map(move |j| (i, j))).collect();
    let mut answers = Vec::with_capacity(jobs.len());
    for chunk in jobs.chunks(s.batch.max(1)) {
        let mut distinct: Vec<usize> = chunk.iter().map(|&(i, _)| i).collect();
        distinct.dedup();
        let ids: Vec<&[u32]> = distinct.iter().map(|&i| prompts[i].1.as_slice()).collect();
        let rows: Vec<(usize, u64)> = chunk.iter().map(|&(i, j)| (distinct.iter().position(|&d| d == i).expect("listed"), answer_seed(s.options.seed, i, j))).collect();
        for (&(i, j), out) in chunk.iter().zip(generate_batch(model, &ids, &rows, &s.options)) {
            // The text without the stop token that ended it (as transformers' decode of the
            // completion minus a final end-of-turn).
            let body = if out.truncated { &out.ids[..] } else { &out.ids[..out.ids.len() - 1] };
            let completion = tok.decode(body)?;
            answers.push(Answer {
                index: i,
                sample: j,
                at: records[i].at.to_string(),
                prompt: prompts[i].0.clone(),
                completion,
                truncated: out.truncated,
                sum_logprob: out.logprobs.iter().sum(),
                ids: out.ids,
                score: 0.0,
                passed: false,
                scores: Map::new(),
            });
        }
    }
    // Scoring, one call per scorer over every answer (one process per command scorer).
    let items: Vec<ToScore> = answers
        .iter()
        .map(|a| ToScore { prompt: &prompts[a.index].0, messages: &records[a.index].prompt, completion: &a.completion, tokens: a.ids.len(), fields: &records[a.index].fields })
        .collect();
    let mut per: Vec<(String, f64, Vec<f64>)> = Vec::new();
    for scorer in &scorers {
        per.push((scorer.spec.name.clone(), scorer.spec.weight, scorer.score(&items)?));
    }
    drop(items);
    let threshold = s.threshold();
    for (k, a) in answers.iter_mut().enumerate() {
        for (name, w, v) in &per {
            a.score += w * v[k];
            a.scores.insert(name.clone(), v[k].into());
        }
        a.passed = a.score >= threshold;
    }
    let scores: Vec<f64> = answers.iter().map(|a| a.score).collect();
    let passed = answers.iter().filter(|a| a.passed).count();
    let seconds = start.elapsed().as_secs_f64();
    let summary = Summary {
        prompts: records.len(),
        answers: answers.len(),
        mean_score: mean(&scores),
        score_ci95: normal_interval(&scores),
        pass_threshold: threshold,
        pass_rate: passed as f64 / answers.len().max(1) as f64,
        pass_ci95: wilson(passed, answers.len()),
        scorers: per.iter().map(|(n, _, v)| (n.clone(), mean(v).into())).collect(),
        mean_tokens: mean(&answers.iter().map(|a| a.ids.len() as f64).collect::<Vec<_>>()),
        truncated: answers.iter().filter(|a| a.truncated).count(),
        seconds,
        answers_per_s: answers.len() as f64 / seconds.max(1e-9),
    };
    Ok((answers, summary))
}

/// This run against a baseline's answers to the same prompts.
#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    pub paired: usize,
    pub baseline_mean_score: f64,
    /// Mean of (this − baseline) per paired answer, with its 95% interval.
    pub mean_difference: f64,
    pub difference_ci95: Interval,
    pub wins: usize,
    pub losses: usize,
    pub ties: usize,
    /// Two-sided exact sign test over wins and losses.
    pub sign_test_p: f64,
}

/// Reads a baseline (`--out` of an earlier `ft eval --generate`) and pairs it with `answers` by
/// prompt and sample; the prompts must be the same.
pub fn compare(answers: &[Answer], baseline: &Path) -> Result<Comparison, GenEvalError> {
    let path = baseline.display().to_string();
    let bad = |msg: String| GenEvalError::Baseline { path: path.clone(), msg };
    let text = std::fs::read_to_string(baseline).map_err(|e| bad(format!("cannot read: {e}")))?;
    let mut base = std::collections::HashMap::new();
    for (n, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let a: Answer = serde_json::from_str(line).map_err(|e| bad(format!("line {}: not an answer of `ft eval --generate --out`: {e}", n + 1)))?;
        base.insert((a.index, a.sample), (n + 1, a));
    }
    let mut diffs = Vec::new();
    let (mut wins, mut losses, mut ties, mut base_scores) = (0, 0, 0, Vec::new());
    for a in answers {
        let Some((line, b)) = base.get(&(a.index, a.sample)) else { continue };
        if b.prompt != a.prompt {
            return Err(bad(format!("line {line}: prompt {} differs from this run's (the same data and template are needed)", a.index + 1)));
        }
        let d = a.score - b.score;
        diffs.push(d);
        base_scores.push(b.score);
        match d.partial_cmp(&0.0) {
            Some(std::cmp::Ordering::Greater) => wins += 1,
            Some(std::cmp::Ordering::Less) => losses += 1,
            _ => ties += 1,
        }
    }
    if diffs.is_empty() {
        return Err(bad("no answer pairs with this run's (prompt, sample)".into()));
    }
    Ok(Comparison {
        paired: diffs.len(),
        baseline_mean_score: mean(&base_scores),
        mean_difference: mean(&diffs),
        difference_ci95: normal_interval(&diffs),
        wins,
        losses,
        ties,
        sign_test_p: sign_test(wins, losses),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_test_and_wilson_match_scipy() {
        // scipy.stats.binomtest(k, n, 0.5).pvalue and statsmodels' proportion_confint(method="wilson").
        assert!((sign_test(8, 2) - 0.109375).abs() < 1e-12);
        assert!((sign_test(0, 10) - 0.001953125).abs() < 1e-12);
        assert_eq!(sign_test(5, 5), 1.0);
        assert!((sign_test(60, 40) - 0.056887933640403).abs() < 1e-9);
        let [lo, hi] = wilson(7, 10);
        assert!((lo - 0.396774).abs() < 1e-5 && (hi - 0.892209).abs() < 1e-5, "{lo} {hi}");
    }
}
