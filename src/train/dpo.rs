//! Direct Preference Optimization as TRL defines it.
//!
//! A side's log-probability is the sum of the per-token log-probs of its completion (the
//! assistant response and its end-of-turn token) given the prompt. The reference is the same
//! model with its adapters switched off, so no second copy of the weights is held. With
//! `x = (π_c − π_r) − (ref_c − ref_r)` (for `ipo`, each side's log-prob divided by its length):
//!
//! | loss_type | per-pair loss |
//! |---|---|
//! | sigmoid | `−(1−ε)·logσ(βx) − ε·logσ(−βx)` |
//! | robust  | `(−(1−ε)·logσ(βx) + ε·logσ(−βx)) / (1 − 2ε)` |
//! | hinge   | `relu(1 − βx)` |
//! | ipo     | `(x − 1/(2β))²` |
//!
//! averaged over pairs, plus `rpo_alpha ×` the chosen completions' mean token NLL when set.
//! Rewards are `β·(π − ref)` per side. Losses on tensors drive the gradient; the same formulas in
//! f64 give the reported metrics (a test keeps the two in step).

use crate::backend::Kernels;
use std::path::Path;

use anyhow::{bail, Context, Result};
use burn::prelude::*;
use burn::tensor::activation::{log_sigmoid, relu};
use crate::backend::TrainBackend;
use burn::tensor::{DType, FloatDType, Int, TensorData};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha2::Digest;

use super::optim::AdamW;
use super::recipe::Recipe;
use super::run::{Objective, StepReport};
use super::step::train_step;
use crate::data::cache;
use crate::data::conversation::{expand_data_path, DataError};
use crate::data::encode::Encoded;
use crate::data::preference::{encode_pair, read_preferences, EncodedPair};
use crate::data::template::ChatTemplate;
use crate::eval::ScoredBatch;
use crate::model::Decoder;
use crate::tokenizer::TextTokenizer;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LossType {
    Sigmoid,
    Ipo,
    Hinge,
    Robust,
}

impl LossType {
    pub const ALL: [LossType; 4] = [LossType::Sigmoid, LossType::Ipo, LossType::Hinge, LossType::Robust];

    pub fn name(self) -> &'static str {
        match self {
            LossType::Sigmoid => "sigmoid",
            LossType::Ipo => "ipo",
            LossType::Hinge => "hinge",
            LossType::Robust => "robust",
        }
    }
}

/// The DPO objective's settings (TRL's `DPOConfig` names and defaults).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DpoConfig {
    pub beta: f64,
    pub loss_type: LossType,
    pub label_smoothing: f64,
    pub rpo_alpha: Option<f64>,
}

impl Default for DpoConfig {
    fn default() -> Self {
        DpoConfig { beta: 0.1, loss_type: LossType::Sigmoid, label_smoothing: 0.0, rpo_alpha: None }
    }
}

/// One side's completion log-probabilities under the policy and the reference.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SideLogps {
    pub policy: f64,
    pub reference: f64,
    /// Completion tokens scored.
    pub tokens: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PairLogps {
    pub chosen: SideLogps,
    pub rejected: SideLogps,
}

impl DpoConfig {
    fn scale(&self, tokens: usize) -> f64 {
        if self.loss_type == LossType::Ipo {
            1.0 / tokens.max(1) as f64
        } else {
            1.0
        }
    }

    /// `x` of the module docs.
    fn logit(&self, p: &PairLogps) -> f64 {
        let (c, r) = (self.scale(p.chosen.tokens), self.scale(p.rejected.tokens));
        (p.chosen.policy * c - p.rejected.policy * r) - (p.chosen.reference * c - p.rejected.reference * r)
    }

    /// The per-pair loss (without the RPO term), in f64.
    pub fn pair_loss(&self, p: &PairLogps) -> f64 {
        let bx = self.beta * self.logit(p);
        let ls = self.label_smoothing;
        let log_sigmoid = |z: f64| -(1.0 + (-z).exp()).ln();
        let log_sigmoid = |z: f64| if z < -30.0 { z } else { log_sigmoid(z) };
        match self.loss_type {
            LossType::Sigmoid => -(1.0 - ls) * log_sigmoid(bx) - ls * log_sigmoid(-bx),
            LossType::Robust => (-(1.0 - ls) * log_sigmoid(bx) + ls * log_sigmoid(-bx)) / (1.0 - 2.0 * ls),
            LossType::Hinge => (1.0 - bx).max(0.0),
            LossType::Ipo => (self.logit(p) - 1.0 / (2.0 * self.beta)).powi(2),
        }
    }

    /// `(chosen, rejected)` rewards `β·(π − ref)` (per-token averaged for ipo, as TRL).
    pub fn rewards(&self, p: &PairLogps) -> (f64, f64) {
        let r = |s: &SideLogps| self.beta * (s.policy - s.reference) * self.scale(s.tokens);
        (r(&p.chosen), r(&p.rejected))
    }

    /// TRL's metrics over `pairs`, names prefixed with `prefix` (`""` or `"eval_"`): `loss`,
    /// `rewards/{chosen,rejected,accuracies,margins}`, `logps/{chosen,rejected}`.
    pub fn metrics(&self, pairs: &[PairLogps], prefix: &str) -> Map<String, Value> {
        let n = pairs.len().max(1) as f64;
        let mean = |f: &dyn Fn(&PairLogps) -> f64| pairs.iter().map(f).sum::<f64>() / n;
        let mut loss = mean(&|p| self.pair_loss(p));
        if let Some(alpha) = self.rpo_alpha {
            let tokens: usize = pairs.iter().map(|p| p.chosen.tokens).sum();
            loss += alpha * -pairs.iter().map(|p| p.chosen.policy).sum::<f64>() / tokens.max(1) as f64;
        }
        let scale = |s: &SideLogps| s.policy * self.scale(s.tokens);
        let mut m = Map::new();
        let mut put = |k: &str, v: f64| {
            m.insert(format!("{prefix}{k}"), v.into());
        };
        put("loss", loss);
        put("rewards/chosen", mean(&|p| self.rewards(p).0));
        put("rewards/rejected", mean(&|p| self.rewards(p).1));
        put("rewards/accuracies", mean(&|p| f64::from(u8::from(self.rewards(p).0 > self.rewards(p).1))));
        put("rewards/margins", mean(&|p| self.rewards(p).0 - self.rewards(p).1));
        put("logps/chosen", mean(&|p| scale(&p.chosen)));
        put("logps/rejected", mean(&|p| scale(&p.rejected)));
        m
    }

    /// Per-pair losses as a differentiable tensor, from the policy's completion log-probs
    /// (`chosen`, `rejected`: `[n]`) and the reference's (constants).
    pub fn loss_tensor<B: Backend>(&self, chosen: Tensor<B, 1>, rejected: Tensor<B, 1>, pairs: &[PairLogps]) -> Tensor<B, 1> {
        let device = chosen.device();
        let n = pairs.len();
        let col = |f: &dyn Fn(&PairLogps) -> f64| {
            Tensor::<B, 1>::from_data(TensorData::new(pairs.iter().map(|p| f(p) as f32).collect::<Vec<_>>(), [n]), (&device, chosen.dtype()))
        };
        let sc = col(&|p| self.scale(p.chosen.tokens));
        let sr = col(&|p| self.scale(p.rejected.tokens));
        let reference = col(&|p| {
            p.chosen.reference * self.scale(p.chosen.tokens) - p.rejected.reference * self.scale(p.rejected.tokens)
        });
        let x = chosen * sc - rejected * sr - reference;
        let ls = self.label_smoothing;
        let bx = x.clone() * self.beta;
        match self.loss_type {
            LossType::Sigmoid => log_sigmoid(bx.clone()) * -(1.0 - ls) - log_sigmoid(bx.neg()) * ls,
            LossType::Robust => (log_sigmoid(bx.clone()) * -(1.0 - ls) + log_sigmoid(bx.neg()) * ls) / (1.0 - 2.0 * ls),
            LossType::Hinge => relu(bx.neg() + 1.0),
            LossType::Ipo => (x - 1.0 / (2.0 * self.beta)).powi_scalar(2),
        }
    }
}

/// Completion log-prob sums of `sides` (one right-padded forward), differentiable: `[n]`, and
/// the scored-token counts. The head runs only at completion positions.
pub fn completion_logps<B: Kernels>(model: &Decoder<B>, sides: &[&Encoded]) -> (Tensor<B, 1>, Vec<usize>) {
    completion_logps_with(model, sides, &mut |ids| model.hidden(ids, None))
}

/// As [`completion_logps`], with the hidden states from `hidden`.
pub fn completion_logps_with<B: Kernels>(model: &Decoder<B>, sides: &[&Encoded], hidden: &mut dyn FnMut(Tensor<B, 2, Int>) -> Tensor<B, 3>) -> (Tensor<B, 1>, Vec<usize>) {
    let device = model.device();
    let n = sides.len();
    let batch = ScoredBatch::new(sides);
    let mut counts = vec![0usize; n];
    for &i in &batch.owner {
        counts[i] += 1;
    }
    let p = batch.positions.len();
    if p == 0 {
        let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(batch.input, [batch.b, batch.t]), &device);
        return (hidden(ids).sum().cast(FloatDType::F32).reshape([1]).repeat_dim(0, n) * 0.0, counts);
    }
    // Sum per sequence: a 0/1 [n, p] matrix times the token log-probs.
    let mut owners = vec![0f32; n * p];
    for (k, &i) in batch.owner.iter().enumerate() {
        owners[i * p + k] = 1.0;
    }
    // The log-probs are f32 (see `ops::token_logprobs`); so are the sums.
    let owners = Tensor::<B, 2>::from_data(TensorData::new(owners, [n, p]), (&device, DType::F32));
    (owners.matmul(batch.logprobs_with(model, hidden)).reshape([n]), counts)
}

fn values<B: Backend>(t: Tensor<B, 1>) -> Vec<f64> {
    t.into_data().convert::<f64>().to_vec().expect("f64 values")
}

/// Completion log-probs (differentiable) and token counts of the chosen and of the rejected
/// sides of `pairs`. Each side is its own forward: rejected replies are often much longer than
/// chosen ones, and padding both to the longest of all would waste the difference.
#[allow(clippy::type_complexity)]
pub fn policy_logps<B: Kernels>(model: &Decoder<B>, pairs: &[&EncodedPair]) -> ((Tensor<B, 1>, Vec<usize>), (Tensor<B, 1>, Vec<usize>)) {
    policy_logps_with(model, pairs, &mut |ids| model.hidden(ids, None))
}

/// As [`policy_logps`], with the hidden states from `hidden`.
#[allow(clippy::type_complexity)]
pub fn policy_logps_with<B: Kernels>(
    model: &Decoder<B>,
    pairs: &[&EncodedPair],
    hidden: &mut dyn FnMut(Tensor<B, 2, Int>) -> Tensor<B, 3>,
) -> ((Tensor<B, 1>, Vec<usize>), (Tensor<B, 1>, Vec<usize>)) {
    let chosen: Vec<&Encoded> = pairs.iter().map(|p| &p.chosen).collect();
    let rejected: Vec<&Encoded> = pairs.iter().map(|p| &p.rejected).collect();
    (completion_logps_with(model, &chosen, hidden), completion_logps_with(model, &rejected, hidden))
}

/// Reference log-probs `(chosen, rejected)` of `pairs`: the model with adapters off.
pub fn reference_logps<B: Kernels>(model: &mut Decoder<B>, pairs: &[&EncodedPair]) -> Vec<(f64, f64)> {
    model.set_adapters_enabled(false);
    let (c, r) = policy_logps(model, pairs);
    let (c, r) = (values(c.0.detach()), values(r.0.detach()));
    model.set_adapters_enabled(true);
    c.into_iter().zip(r).collect()
}

/// Pairs per scoring step (one forward for their chosen sides, one for their rejected sides).
pub const SCORE_BATCH: usize = 8;

/// Policy and reference log-probs of every pair, in batches of [`SCORE_BATCH`]; the reference
/// forward is skipped where `reference` already holds the pair's values. No gradient.
pub fn score_pairs<B: Kernels>(model: &mut Decoder<B>, pairs: &[EncodedPair], reference: Option<&[(f64, f64)]>) -> Vec<PairLogps> {
    let mut out = Vec::with_capacity(pairs.len());
    // Without adapters the policy is the reference: one forward serves both.
    let adapters = model.projections_mut().iter().any(|(_, p)| p.lora.is_some());
    for (c, chunk) in pairs.chunks(SCORE_BATCH).enumerate() {
        let refs: Vec<&EncodedPair> = chunk.iter().collect();
        let ((c_lp, cn), (r_lp, rn)) = policy_logps(model, &refs);
        let (c_lp, r_lp) = (values(c_lp.detach()), values(r_lp.detach()));
        let reference = match reference {
            Some(r) => r[c * SCORE_BATCH..c * SCORE_BATCH + chunk.len()].to_vec(),
            None if !adapters => c_lp.iter().copied().zip(r_lp.iter().copied()).collect(),
            None => reference_logps(model, &refs),
        };
        let (c, r) = (c_lp, r_lp);
        for i in 0..chunk.len() {
            out.push(PairLogps {
                chosen: SideLogps { policy: c[i], reference: reference[i].0, tokens: cn[i] },
                rejected: SideLogps { policy: r[i], reference: reference[i].1, tokens: rn[i] },
            });
        }
    }
    out
}

/// Encoded pairs of a data path and how many were dropped for exceeding `max_len`. An empty
/// completion is an error naming `file:line`; identical chosen and rejected completions are
/// returned as warnings (they carry no preference signal).
pub fn prepare_pairs(
    tok: &TextTokenizer,
    template: &ChatTemplate,
    path: &Path,
    max_len: usize,
    max_prompt_len: Option<usize>,
    cache_at: Option<(&Path, &Path)>,
) -> Result<(Vec<EncodedPair>, usize, Vec<String>)> {
    use rayon::prelude::*;
    let pairs = read_preferences(path)?;
    // With `cache_at = (cache dir, model dir)`, the tokenized sides are cached like SFT data
    // (chosen and rejected alternating).
    let key = cache_at.and_then(|(_, model)| cache::key(path, model, &template.source, &format!("dpo-v1 {max_prompt_len:?}")).ok());
    let cached = match (cache_at, &key) {
        (Some((dir, _)), Some(k)) => cache::load(dir, k).filter(|c| c.len() == 2 * pairs.len()),
        _ => None,
    };
    let encoded: Vec<Result<EncodedPair, DataError>> = match cached {
        Some(sides) => sides
            .chunks_exact(2)
            .map(|s| {
                let first = |e: &Encoded| e.mask.iter().position(|&m| m == 1).unwrap_or(0);
                let prompt_len = first(&s[0]).min(first(&s[1]));
                Ok(EncodedPair { chosen: s[0].clone(), rejected: s[1].clone(), prompt_len })
            })
            .collect(),
        None => {
            let e: Vec<Result<EncodedPair, DataError>> = pairs
                .par_iter()
                .map(|p| encode_pair(tok, template, p, max_prompt_len).map_err(|msg| DataError::At { at: p.at.clone(), msg }))
                .collect();
            if let (Some((dir, _)), Some(k), true) = (cache_at, &key, e.iter().all(Result::is_ok)) {
                let sides: Vec<Encoded> =
                    e.iter().filter_map(|r| r.as_ref().ok()).flat_map(|p| [p.chosen.clone(), p.rejected.clone()]).collect();
                // A cache that cannot be written only costs time next run.
                let _ = cache::store(dir, k, &sides);
            }
            e
        }
    };
    let (mut out, mut dropped, mut warnings) = (Vec::new(), 0, Vec::new());
    for (pair, enc) in pairs.iter().zip(encoded) {
        let enc = enc?;
        if pair.chosen == pair.rejected {
            warnings.push(format!("{}: chosen and rejected are identical (no preference to learn)", pair.at));
        }
        if enc.chosen.ids.len() > max_len || enc.rejected.ids.len() > max_len {
            dropped += 1;
            continue;
        }
        out.push(enc);
    }
    if out.is_empty() {
        bail!("{}: no usable preference pairs (dropped {dropped} longer than data.max_len = {max_len})", path.display());
    }
    Ok((out, dropped, warnings))
}

/// DPO over prepared pairs, with an optional eval split and optionally precomputed reference
/// log-probs.
pub struct Dpo {
    pub config: DpoConfig,
    pub train: Vec<EncodedPair>,
    pub eval: Option<Vec<EncodedPair>>,
    pub dropped: usize,
    /// Reference `(chosen, rejected)` log-probs per training pair, where computed
    /// (`precompute_ref`).
    pub reference: Option<Vec<Option<(f64, f64)>>>,
    /// The eval split's reference log-probs, kept after the first eval (they never change).
    eval_reference: Option<Vec<(f64, f64)>>,
    /// Where precomputed reference log-probs are cached, and their key.
    cache: Option<(std::path::PathBuf, String)>,
    quiet: bool,
    /// Recompute blocks in the backward (`train.gradient_checkpointing`).
    gradient_checkpointing: bool,
}

/// Reference log-probs cached in the run directory, valid for one key.
#[derive(Serialize, Deserialize)]
struct RefCache {
    key: String,
    logps: Vec<Option<(f64, f64)>>,
}

/// The cache key: every byte of the model's weights, config and tokenizer, of the data, the
/// template source and the length limits.
fn reference_key(recipe: &Recipe, template: &ChatTemplate) -> Result<String> {
    let mut h = sha2::Sha256::new();
    let mut files: Vec<_> = std::fs::read_dir(&recipe.model.path)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let n = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            n.ends_with(".safetensors") || n == "config.json" || n == "tokenizer.json"
        })
        .collect();
    files.sort();
    files.extend(expand_data_path(&recipe.data.train)?);
    for f in files {
        let mut file = std::fs::File::open(&f).with_context(|| format!("cannot read {}", f.display()))?;
        h.update(f.file_name().map(|n| n.as_encoded_bytes()).unwrap_or_default());
        std::io::copy(&mut file, &mut h)?;
    }
    let d = recipe.dpo.clone().unwrap_or_default();
    h.update(template.source.as_bytes());
    h.update(format!("{} {:?}", recipe.data.max_len, d.max_prompt_len).as_bytes());
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

impl Dpo {
    /// Prepares the data. With `dpo.precompute_ref`, reads back cached reference log-probs from
    /// the run directory when their key matches; [`Objective::before_training`] computes the rest.
    pub fn new(tok: &TextTokenizer, recipe: &Recipe, quiet: bool) -> Result<Self> {
        let section = recipe.dpo.clone().unwrap_or_default();
        let template = tok.template(recipe.data.template)?;
        let cache_dir = recipe.output.dir.parent().unwrap_or(Path::new(".")).join(".ft-cache");
        let cache_at = Some((cache_dir.as_path(), recipe.model.path.as_path()));
        let (train, dropped, warnings) =
            prepare_pairs(tok, &template, &recipe.data.train, recipe.data.max_len, section.max_prompt_len, cache_at)?;
        if !quiet {
            for w in warnings.iter().take(10) {
                eprintln!("warning: {w}");
            }
        }
        let eval = match &recipe.data.eval {
            Some(f) => Some(prepare_pairs(tok, &template, f, recipe.data.max_len, section.max_prompt_len, cache_at)?.0),
            None => None,
        };
        let mut dpo =
            Dpo { config: section.config(), train, eval, dropped, reference: None, eval_reference: None, cache: None, quiet, gradient_checkpointing: recipe.train.gradient_checkpointing };
        if section.precompute_ref {
            let key = reference_key(recipe, &template)?;
            let path = recipe.output.dir.join("reference_logps.json");
            let cached = std::fs::read(&path).ok().and_then(|b| serde_json::from_slice::<RefCache>(&b).ok());
            dpo.reference = Some(match cached {
                Some(c) if c.key == key && c.logps.len() == dpo.train.len() => c.logps,
                _ => vec![None; dpo.train.len()],
            });
            dpo.cache = Some((path, key));
        }
        Ok(dpo)
    }
}

impl<B: TrainBackend> Objective<B> for Dpo {
    fn len(&self) -> usize {
        self.train.len()
    }

    fn data_counts(&self) -> super::sft::PrepareCounts {
        super::sft::PrepareCounts { dropped_too_long: self.dropped, ..Default::default() }
    }

    /// Computes the reference log-probs of the pairs the run will visit that the cache lacks,
    /// then saves the cache.
    fn before_training(&mut self, model: &mut Decoder<B>, upcoming: &[usize]) -> Result<()> {
        let (Some(reference), Some((path, key))) = (&mut self.reference, &self.cache) else {
            return Ok(());
        };
        let mut missing: Vec<usize> = upcoming.iter().copied().filter(|&i| reference[i].is_none()).collect();
        missing.sort_unstable();
        missing.dedup();
        if missing.is_empty() {
            return Ok(());
        }
        if !self.quiet {
            eprintln!("precomputing reference log-probs of {} pairs", missing.len());
        }
        for chunk in missing.chunks(SCORE_BATCH) {
            let pairs: Vec<&EncodedPair> = chunk.iter().map(|&i| &self.train[i]).collect();
            for (&i, lp) in chunk.iter().zip(reference_logps(model, &pairs)) {
                reference[i] = Some(lp);
            }
        }
        let cache = RefCache { key: key.clone(), logps: reference.clone() };
        crate::fsutil::write_atomic(path, &serde_json::to_vec(&cache)?)
    }

    fn step(&mut self, model: &mut Decoder<B>, opt: &mut AdamW<B::InnerBackend>, micro: &[Vec<usize>], lr: f64, max_grad_norm: f64) -> StepReport {
        let cfg = self.config;
        let n_pairs: usize = micro.iter().map(Vec::len).sum();
        let chosen_tokens: usize = micro.iter().flatten().map(|&i| self.train[i].chosen.trainable()).sum();
        let mut seen = Vec::with_capacity(n_pairs);
        let mut input_tokens = 0;
        let (train, reference) = (&self.train, &self.reference);
        let (loss, grad_norm) = train_step(
            model,
            opt,
            micro.len(),
            |m, fwd, k| {
                let pairs: Vec<&EncodedPair> = micro[k].iter().map(|&i| &train[i]).collect();
                let refs = match reference {
                    Some(r) if micro[k].iter().all(|&i| r[i].is_some()) => micro[k].iter().filter_map(|&i| r[i]).collect(),
                    _ => reference_logps(m, &pairs),
                };
                let m: &Decoder<B> = m;
                let (chosen, rejected) = policy_logps_with(m, &pairs, &mut |ids| fwd.hidden(m, ids, None));
                input_tokens += pairs.iter().map(|p| p.chosen.ids.len() + p.rejected.ids.len() - 2).sum::<usize>();
                let (vc, vr) = (values(chosen.0.clone().detach()), values(rejected.0.clone().detach()));
                let logps: Vec<PairLogps> = (0..pairs.len())
                    .map(|i| PairLogps {
                        chosen: SideLogps { policy: vc[i], reference: refs[i].0, tokens: chosen.1[i] },
                        rejected: SideLogps { policy: vr[i], reference: refs[i].1, tokens: rejected.1[i] },
                    })
                    .collect();
                let (chosen, rejected) = (chosen.0, rejected.0);
                let mut loss = cfg.loss_tensor(chosen.clone(), rejected, &logps).sum() / n_pairs as f64;
                if let Some(alpha) = cfg.rpo_alpha {
                    loss = loss - chosen.sum() * (alpha / chosen_tokens.max(1) as f64);
                }
                seen.extend(logps);
                loss
            },
            lr,
            max_grad_norm,
            self.gradient_checkpointing,
        );
        let mut metrics = cfg.metrics(&seen, "");
        // The loss that was differentiated (equal to the f64 one up to float rounding).
        metrics.insert("loss".into(), loss.into());
        StepReport { loss, grad_norm, input_tokens, metrics }
    }

    fn evaluate(&mut self, model: &mut Decoder<B::InnerBackend>) -> Option<Map<String, Value>> {
        let logps = score_pairs(model, self.eval.as_ref()?, self.eval_reference.as_deref());
        self.eval_reference = Some(logps.iter().map(|p| (p.chosen.reference, p.rejected.reference)).collect());
        Some(self.config.metrics(&logps, "eval_"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Cpu;

    fn pair(pc: f64, pr: f64, rc: f64, rr: f64) -> PairLogps {
        PairLogps {
            chosen: SideLogps { policy: pc, reference: rc, tokens: 5 },
            rejected: SideLogps { policy: pr, reference: rr, tokens: 9 },
        }
    }

    #[test]
    fn policy_equal_to_reference_gives_ln2_and_zero_rewards() {
        let cfg = DpoConfig::default();
        let pairs = [pair(-10.0, -20.0, -10.0, -20.0), pair(-3.0, -1.0, -3.0, -1.0)];
        let m = cfg.metrics(&pairs, "");
        assert!((m["loss"].as_f64().unwrap() - std::f64::consts::LN_2).abs() < 1e-12);
        for k in ["rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"] {
            assert_eq!(m[k].as_f64().unwrap(), 0.0, "{k}");
        }
    }

    #[test]
    fn rpo_adds_the_chosen_mean_token_nll() {
        // TRL: loss = mean DPO loss + rpo_alpha · (chosen NLL summed over tokens / chosen tokens).
        let pairs = [pair(-10.0, -20.0, -11.0, -19.0), pair(-3.0, -1.0, -2.5, -1.5)];
        let plain = DpoConfig::default();
        let rpo = DpoConfig { rpo_alpha: Some(0.5), ..plain };
        let want = plain.metrics(&pairs, "")["loss"].as_f64().unwrap() + 0.5 * (10.0 + 3.0) / (5.0 + 5.0);
        assert!((rpo.metrics(&pairs, "")["loss"].as_f64().unwrap() - want).abs() < 1e-12);
    }

    #[test]
    fn tensor_losses_equal_the_f64_formulas() {
        let pairs = [pair(-10.0, -20.0, -11.0, -19.0), pair(-3.0, -1.0, -2.5, -1.5), pair(-7.0, -7.5, -7.0, -7.0)];
        let dev = Default::default();
        let t = |f: fn(&PairLogps) -> f64| {
            Tensor::<Cpu, 1>::from_data(TensorData::new(pairs.iter().map(|p| f(p) as f32).collect::<Vec<_>>(), [3]), &dev)
        };
        for loss_type in LossType::ALL {
            let cfg = DpoConfig { loss_type, label_smoothing: 0.1, beta: 0.3, rpo_alpha: None };
            let got: Vec<f32> =
                cfg.loss_tensor(t(|p| p.chosen.policy), t(|p| p.rejected.policy), &pairs).into_data().to_vec().unwrap();
            for (g, p) in got.iter().zip(&pairs) {
                let want = cfg.pair_loss(p);
                assert!((*g as f64 - want).abs() <= 1e-5 * want.abs().max(1.0), "{loss_type:?}: {g} vs {want}");
            }
        }
    }
}
