//! Reference-free preference losses as TRL 1.16 computes them: ORPO (`ORPOTrainer`) and CPO with
//! its loss types, SimPO among them (`CPOTrainer`). No reference model is scored.
//!
//! Per pair, `S` is a side's completion log-prob sum and `ℓ = S / tokens` its per-token mean.
//!
//! | objective | per-pair loss | averaged, plus |
//! |---|---|---|
//! | ORPO | `−β·logσ(log_odds)`, `log_odds = (ℓc − ℓr) − (log(1 − e^ℓc) − log(1 − e^ℓr))` | the chosen sequences' NLL over **every** next token (prompt included) |
//! | CPO sigmoid | `−(1−ε)·logσ(β(Sc − Sr)) − ε·logσ(−β(Sc − Sr))` | `cpo_alpha ×` the chosen completions' token NLL |
//! | CPO hinge | `relu(1 − β(Sc − Sr))` | the same |
//! | CPO ipo | `((ℓc − ℓr) − 1/(2β))²` | the same |
//! | SimPO (CPO `simpo`) | `−(1−ε)·logσ(β(ℓc − ℓr) − γ) − ε·logσ(−β(ℓc − ℓr) + γ)` | the same (`cpo_alpha` 0 by default) |
//!
//! Rewards are `β·S` (`β·ℓ` where the loss uses means). The f64 formulas give the reported
//! metrics; the tensor ones drive the gradient (a test keeps them in step).

use crate::ops::SumAll;
use burn::prelude::*;
use burn::tensor::activation::{log_sigmoid, relu};
use burn::tensor::{DType, Int, TensorData};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::{nll, values};
use crate::data::batch::Batch;
use crate::data::encode::Encoded;
use crate::data::preference::EncodedPair;
use crate::model::Decoder;
use crate::ops::Kernels;

/// CPO's loss types (TRL's `CPOConfig.loss_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum CpoLossType {
    Sigmoid,
    Hinge,
    Ipo,
    Simpo,
}

impl CpoLossType {
    /// Whether the loss uses per-token mean log-probs (TRL's `average_log_prob`).
    fn averaged(self) -> bool {
        matches!(self, CpoLossType::Ipo | CpoLossType::Simpo)
    }
}

/// A reference-free objective and its settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RefFree {
    Orpo { beta: f64 },
    Cpo { beta: f64, loss_type: CpoLossType, label_smoothing: f64, cpo_alpha: f64, simpo_gamma: f64 },
}

impl RefFree {
    /// TRL's `ORPOConfig` defaults.
    pub fn orpo() -> Self {
        RefFree::Orpo { beta: 0.1 }
    }
    /// TRL's `CPOConfig` defaults.
    pub fn cpo() -> Self {
        RefFree::Cpo { beta: 0.1, loss_type: CpoLossType::Sigmoid, label_smoothing: 0.0, cpo_alpha: 1.0, simpo_gamma: 0.5 }
    }
    /// SimPO: CPO's `simpo` loss with the SimPO paper's β 2.0 and no NLL term (TRL's CPOTrainer
    /// keeps `cpo_alpha` 1 unless told otherwise; that is `cpo_alpha = 1`, "CPO-SimPO").
    pub fn simpo() -> Self {
        RefFree::Cpo { beta: 2.0, loss_type: CpoLossType::Simpo, label_smoothing: 0.0, cpo_alpha: 0.0, simpo_gamma: 0.5 }
    }

    pub fn name(&self) -> &'static str {
        match self {
            RefFree::Orpo { .. } => "orpo",
            RefFree::Cpo { loss_type: CpoLossType::Simpo, .. } => "simpo",
            RefFree::Cpo { .. } => "cpo",
        }
    }

    fn beta(&self) -> f64 {
        match *self {
            RefFree::Orpo { beta } | RefFree::Cpo { beta, .. } => beta,
        }
    }

    /// Whether the loss takes per-token means of the completion log-probs.
    fn averaged(&self) -> bool {
        match self {
            RefFree::Orpo { .. } => true,
            RefFree::Cpo { loss_type, .. } => loss_type.averaged(),
        }
    }

    /// Whether the NLL of the chosen sequences counts every next token (ORPO) rather than the
    /// completion's.
    pub fn needs_full_nll(&self) -> bool {
        matches!(self, RefFree::Orpo { .. })
    }

    /// The per-pair loss (without the NLL term), in f64, from the policy's `(chosen, rejected)`
    /// log-probs as the loss uses them (sums or means).
    fn pair_loss(&self, c: f64, r: f64) -> f64 {
        let log_sigmoid = |z: f64| if z < -30.0 { z } else { -(1.0 + (-z).exp()).ln() };
        match *self {
            RefFree::Orpo { beta } => -beta * log_sigmoid(log_odds(c, r)),
            RefFree::Cpo { beta, loss_type, label_smoothing: ls, simpo_gamma, .. } => {
                let x = c - r;
                match loss_type {
                    CpoLossType::Sigmoid => -(1.0 - ls) * log_sigmoid(beta * x) - ls * log_sigmoid(-beta * x),
                    CpoLossType::Simpo => {
                        let z = beta * x - simpo_gamma;
                        -(1.0 - ls) * log_sigmoid(z) - ls * log_sigmoid(-z)
                    }
                    CpoLossType::Hinge if x.is_nan() => f64::NAN,
                    CpoLossType::Hinge => (1.0 - beta * x).max(0.0),
                    CpoLossType::Ipo => (x - 1.0 / (2.0 * beta)).powi(2),
                }
            }
        }
    }

    /// A side's log-prob as the loss uses it.
    fn side(&self, sum: f64, tokens: usize) -> f64 {
        if self.averaged() {
            sum / tokens.max(1) as f64
        } else {
            sum
        }
    }

    /// The NLL term and its weight: ORPO's over every token of the chosen sequences, CPO's over
    /// their completions (`cpo_alpha` 0: none, reported as 0 as TRL does).
    fn nll(&self, pairs: &[PairScore]) -> (f64, f64) {
        let (sum, count) = match self {
            RefFree::Orpo { .. } => pairs.iter().fold((0.0, 0), |(s, n), p| (s + p.chosen_all_nll, n + p.chosen_all_tokens)),
            RefFree::Cpo { cpo_alpha, .. } if *cpo_alpha == 0.0 => (0.0, 1),
            RefFree::Cpo { .. } => pairs.iter().fold((0.0, 0), |(s, n), p| (s - p.chosen, n + p.chosen_tokens)),
        };
        let weight = match *self {
            RefFree::Orpo { .. } => 1.0,
            RefFree::Cpo { cpo_alpha, .. } => cpo_alpha,
        };
        (sum / count.max(1) as f64, weight)
    }

    /// The loss and TRL's metrics over `pairs`, names prefixed with `prefix` (`""` or
    /// `"eval_"`): `loss`, `nll_loss`, `rewards/{chosen,rejected,accuracies,margins}`,
    /// `logps/{chosen,rejected}`, and for ORPO `log_odds_ratio`, `log_odds_chosen`.
    pub fn metrics(&self, pairs: &[PairScore], prefix: &str) -> Map<String, Value> {
        let n = pairs.len().max(1) as f64;
        let mean = |f: &dyn Fn(&PairScore) -> f64| pairs.iter().map(f).sum::<f64>() / n;
        let c = |p: &PairScore| self.side(p.chosen, p.chosen_tokens);
        let r = |p: &PairScore| self.side(p.rejected, p.rejected_tokens);
        let beta = self.beta();
        let (nll, weight) = self.nll(pairs);
        let mut m = Map::new();
        let mut put = |k: &str, v: f64| {
            m.insert(format!("{prefix}{k}"), v.into());
        };
        put("loss", mean(&|p| self.pair_loss(c(p), r(p))) + weight * nll);
        put("nll_loss", nll);
        put("rewards/chosen", mean(&|p| beta * c(p)));
        put("rewards/rejected", mean(&|p| beta * r(p)));
        put("rewards/accuracies", mean(&|p| f64::from(u8::from(c(p) > r(p)))));
        put("rewards/margins", mean(&|p| beta * (c(p) - r(p))));
        put("logps/chosen", mean(&|p| c(p)));
        put("logps/rejected", mean(&|p| r(p)));
        if let RefFree::Orpo { .. } = self {
            let log_sigmoid = |z: f64| -(1.0 + (-z).exp()).ln();
            put("log_odds_ratio", mean(&|p| log_sigmoid(log_odds(c(p), r(p)))));
            put("log_odds_chosen", mean(&|p| log_odds(c(p), r(p))));
        }
        m
    }

    /// The loss of a micro-batch as a differentiable scalar `[1]`: per-pair losses summed and
    /// divided by `n_pairs` (the pairs of the whole step), plus the NLL term over `nll_count`
    /// tokens (the step's). `chosen`, `rejected` are completion log-prob sums `[n]`;
    /// `chosen_all` the chosen sequences' all-token log-prob sums (ORPO).
    pub fn loss_tensor<B: Backend>(&self, s: &SideTensors<B>, n_pairs: usize, nll_count: usize) -> Tensor<B, 1> {
        let device = s.chosen.device();
        let per_token = |t: &Tensor<B, 1>, counts: &[usize]| {
            let inv: Vec<f32> = counts.iter().map(|&n| 1.0 / n.max(1) as f32).collect();
            t.clone() * Tensor::<B, 1>::from_data(TensorData::new(inv, [counts.len()]), (&device, DType::F32))
        };
        let (c, r) = if self.averaged() {
            (per_token(&s.chosen, &s.chosen_tokens), per_token(&s.rejected, &s.rejected_tokens))
        } else {
            (s.chosen.clone(), s.rejected.clone())
        };
        let pairs = match *self {
            RefFree::Orpo { beta } => {
                // log(1 − e^ℓ) as TRL's log1p(−exp(ℓ)).
                let log1m_exp = |l: Tensor<B, 1>| l.exp().neg().log1p();
                let odds = (c.clone() - r.clone()) - (log1m_exp(c) - log1m_exp(r));
                log_sigmoid(odds) * -beta
            }
            RefFree::Cpo { beta, loss_type, label_smoothing: ls, simpo_gamma, .. } => {
                let x = c - r;
                match loss_type {
                    CpoLossType::Sigmoid => log_sigmoid(x.clone() * beta) * -(1.0 - ls) - log_sigmoid(x * -beta) * ls,
                    CpoLossType::Simpo => {
                        let z = x * beta - simpo_gamma;
                        log_sigmoid(z.clone()) * -(1.0 - ls) - log_sigmoid(z.neg()) * ls
                    }
                    // `+ z·0` lets a NaN through (see `dpo::DpoConfig::loss_tensor`).
                    CpoLossType::Hinge => {
                        let z = x * -beta + 1.0;
                        relu(z.clone()) + z * 0.0
                    }
                    CpoLossType::Ipo => (x - 1.0 / (2.0 * beta)).powi_scalar(2),
                }
            }
        };
        let mut loss = pairs.sum_all() / n_pairs.max(1) as f64;
        match (*self, &s.chosen_all) {
            (RefFree::Orpo { .. }, Some(all)) => loss = loss - all.clone().sum_all() / nll_count.max(1) as f64,
            (RefFree::Cpo { cpo_alpha, .. }, _) if cpo_alpha != 0.0 => loss = loss - s.chosen.clone().sum_all() * (cpo_alpha / nll_count.max(1) as f64),
            _ => {}
        }
        loss
    }

    /// The tokens the NLL term of `pairs` averages over.
    pub fn nll_tokens(&self, pairs: &[&EncodedPair]) -> usize {
        match self {
            RefFree::Orpo { .. } => pairs.iter().map(|p| full_mask(&p.chosen).iter().map(|&m| m as usize).sum::<usize>()).sum(),
            RefFree::Cpo { .. } => pairs.iter().map(|p| p.chosen.trainable()).sum(),
        }
    }
}

fn log_odds(c: f64, r: f64) -> f64 {
    // TRL: (ℓc − ℓr) − (log1p(−exp(ℓc)) − log1p(−exp(ℓr))).
    (c - r) - ((-c.exp()).ln_1p() - (-r.exp()).ln_1p())
}

/// One pair's policy log-probs (no gradient).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PairScore {
    /// Completion log-prob sums and their token counts.
    pub chosen: f64,
    pub rejected: f64,
    pub chosen_tokens: usize,
    pub rejected_tokens: usize,
    /// ORPO: −Σ log p over every next token of the chosen sequence up to its last completion
    /// token (prompt included), and their count.
    pub chosen_all_nll: f64,
    pub chosen_all_tokens: usize,
}

/// The policy's differentiable log-prob sums of a micro-batch.
pub struct SideTensors<B: Backend> {
    pub chosen: Tensor<B, 1>,
    pub rejected: Tensor<B, 1>,
    /// ORPO: the chosen sequences' all-token log-prob sums.
    pub chosen_all: Option<Tensor<B, 1>>,
    pub chosen_tokens: Vec<usize>,
    pub rejected_tokens: Vec<usize>,
    pub chosen_all_tokens: Vec<usize>,
}

impl<B: Backend> SideTensors<B> {
    /// The values, pair by pair.
    pub fn scores(&self) -> Vec<PairScore> {
        let (c, r) = (values(self.chosen.clone().detach()), values(self.rejected.clone().detach()));
        let all = self.chosen_all.as_ref().map(|a| values(a.clone().detach()));
        (0..c.len())
            .map(|i| PairScore {
                chosen: c[i],
                rejected: r[i],
                chosen_tokens: self.chosen_tokens[i],
                rejected_tokens: self.rejected_tokens[i],
                chosen_all_nll: all.as_ref().map_or(0.0, |a| -a[i]),
                chosen_all_tokens: self.chosen_all_tokens.get(i).copied().unwrap_or(0),
            })
            .collect()
    }
}

/// The scored positions of ORPO's NLL: every next token up to the last completion token.
fn full_mask(e: &Encoded) -> Vec<u8> {
    let last = e.mask.iter().rposition(|&m| m == 1).unwrap_or(0);
    (0..e.ids.len()).map(|j| u8::from(j >= 1 && j <= last)).collect()
}

/// The policy's log-prob sums of `pairs` (differentiable), hidden states from `hidden`: one
/// forward for the chosen sides, one for the rejected. With `full` (ORPO), the chosen forward
/// scores every token and also yields the all-token sums.
pub fn side_tensors_with<B: Kernels>(
    model: &Decoder<B>,
    pairs: &[&EncodedPair],
    full: bool,
    hidden: &mut dyn FnMut(Tensor<B, 2, Int>) -> Tensor<B, 3>,
) -> SideTensors<B> {
    let rejected: Vec<&Encoded> = pairs.iter().map(|p| &p.rejected).collect();
    let (rejected, rejected_tokens) = super::dpo::completion_logps_with(model, &rejected, hidden);
    let chosen: Vec<&Encoded> = pairs.iter().map(|p| &p.chosen).collect();
    if !full {
        let (chosen, chosen_tokens) = super::dpo::completion_logps_with(model, &chosen, hidden);
        return SideTensors { chosen, rejected, chosen_all: None, chosen_tokens, rejected_tokens, chosen_all_tokens: vec![] };
    }
    // One forward scoring every token; two 0/1 rows per sequence pick the completion's and all.
    let device = model.device();
    let wide: Vec<Encoded> = chosen.iter().map(|e| Encoded { text: String::new(), ids: e.ids.clone(), mask: full_mask(e) }).collect();
    let batch = Batch::padded(&wide.iter().collect::<Vec<_>>());
    let n = chosen.len();
    let p = batch.positions.len();
    let all_tokens = batch.counts(n);
    let mut completion_tokens = vec![0usize; n];
    let mut owners = vec![0f32; 2 * n * p];
    for (k, (&i, &pos)) in batch.owner.iter().zip(&batch.positions).enumerate() {
        let j = pos as usize - i * batch.t;
        owners[(n + i) * p + k] = 1.0;
        if chosen[i].mask[j + 1] == 1 {
            owners[i * p + k] = 1.0;
            completion_tokens[i] += 1;
        }
    }
    let mut hidden2 = |ids: Tensor<B, 2, Int>, _: Option<&[Vec<usize>]>| hidden(ids);
    let sums = match nll::scored_logprobs(model, &batch, &mut hidden2) {
        Some(logp) => {
            let owners = Tensor::<B, 2>::from_data(TensorData::new(owners, [2 * n, p]), (&device, DType::F32));
            owners.matmul(logp.reshape([p, 1])).reshape([2 * n])
        }
        None => Tensor::<B, 1>::zeros([2 * n], (&device, DType::F32)),
    };
    SideTensors {
        chosen: sums.clone().narrow(0, 0, n),
        rejected,
        chosen_all: Some(sums.narrow(0, n, n)),
        chosen_tokens: completion_tokens,
        rejected_tokens,
        chosen_all_tokens: all_tokens,
    }
}

/// Pairs per scoring forward.
pub const SCORE_BATCH: usize = 8;

/// The policy's scores of every pair (no gradient), in batches of [`SCORE_BATCH`].
pub fn score_pairs<B: Kernels>(model: &Decoder<B>, pairs: &[EncodedPair], objective: &RefFree) -> Vec<PairScore> {
    let mut out = Vec::with_capacity(pairs.len());
    for chunk in pairs.chunks(SCORE_BATCH) {
        let refs: Vec<&EncodedPair> = chunk.iter().collect();
        let s = side_tensors_with(model, &refs, objective.needs_full_nll(), &mut |ids| model.hidden(ids, None));
        out.extend(s.scores());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Cpu;

    fn score(c: f64, r: f64, nc: usize, nr: usize) -> PairScore {
        PairScore { chosen: c, rejected: r, chosen_tokens: nc, rejected_tokens: nr, chosen_all_nll: -c * 2.0, chosen_all_tokens: 2 * nc }
    }

    #[test]
    fn tensor_losses_equal_the_f64_formulas() {
        let pairs = [score(-10.0, -20.0, 5, 9), score(-3.0, -1.0, 2, 1), score(-7.0, -7.5, 4, 4)];
        let dev = Default::default();
        let t = |f: fn(&PairScore) -> f64| Tensor::<Cpu, 1>::from_data(TensorData::new(pairs.iter().map(|p| f(p) as f32).collect::<Vec<_>>(), [3]), &dev);
        let sides = SideTensors {
            chosen: t(|p| p.chosen),
            rejected: t(|p| p.rejected),
            chosen_all: Some(t(|p| -p.chosen_all_nll)),
            chosen_tokens: pairs.iter().map(|p| p.chosen_tokens).collect(),
            rejected_tokens: pairs.iter().map(|p| p.rejected_tokens).collect(),
            chosen_all_tokens: pairs.iter().map(|p| p.chosen_all_tokens).collect(),
        };
        let mut objectives = vec![RefFree::Orpo { beta: 0.3 }, RefFree::simpo()];
        for loss_type in [CpoLossType::Sigmoid, CpoLossType::Hinge, CpoLossType::Ipo, CpoLossType::Simpo] {
            objectives.push(RefFree::Cpo { beta: 0.2, loss_type, label_smoothing: 0.1, cpo_alpha: 0.7, simpo_gamma: 0.4 });
        }
        for o in objectives {
            let nll_count = match o {
                RefFree::Orpo { .. } => pairs.iter().map(|p| p.chosen_all_tokens).sum(),
                RefFree::Cpo { .. } => pairs.iter().map(|p| p.chosen_tokens).sum(),
            };
            let got = crate::loss::scalar(o.loss_tensor(&sides, 3, nll_count));
            let want = o.metrics(&pairs, "")["loss"].as_f64().unwrap();
            assert!((got - want).abs() <= 1e-5 * want.abs().max(1.0), "{o:?}: {got} vs {want}");
        }
    }
}
