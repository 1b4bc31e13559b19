//! The DPO losses as TRL defines them, and the completion scoring they need (training, training's
//! eval and `ft eval --objective dpo` all score here).
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

use burn::prelude::*;
use burn::tensor::activation::{log_sigmoid, relu};
use burn::tensor::{DType, FloatDType, Int, TensorData};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::{nll, values};
use crate::data::batch::Batch;
use crate::data::encode::Encoded;
use crate::data::preference::EncodedPair;
use crate::model::Decoder;
use crate::ops::Kernels;

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
            // TRL's relu(1 − βx); a NaN stays NaN (`f64::max` would make it 0).
            LossType::Hinge if bx.is_nan() => f64::NAN,
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
            // `+ z·0` keeps relu's gradient and lets a NaN through (a backend's relu may map it
            // to 0, which would hide a diverged step).
            LossType::Hinge => {
                let z = bx.neg() + 1.0;
                relu(z.clone()) + z * 0.0
            }
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
    let batch = Batch::padded(sides);
    let counts = batch.counts(n);
    let p = batch.positions.len();
    let mut hidden = |ids: Tensor<B, 2, Int>, _: Option<&[Vec<usize>]>| hidden(ids);
    let Some(logp) = nll::scored_logprobs(model, &batch, &mut hidden) else {
        let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(batch.input, [batch.b, batch.t]), &device);
        return (hidden(ids, None).sum().cast(FloatDType::F32).reshape([1]).repeat_dim(0, n) * 0.0, counts);
    };
    // Sum per sequence: a 0/1 [n, p] matrix times the token log-probs.
    let mut owners = vec![0f32; n * p];
    for (k, &i) in batch.owner.iter().enumerate() {
        owners[i * p + k] = 1.0;
    }
    // The log-probs are f32 (see `ops::token_logprobs`); so are the sums.
    let owners = Tensor::<B, 2>::from_data(TensorData::new(owners, [n, p]), (&device, DType::F32));
    (owners.matmul(logp.reshape([p, 1])).reshape([n]), counts)
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

/// Reference log-probs `(chosen, rejected)` of `pairs`: the model with adapters off, or with
/// its frozen reference adapter (training from a starting adapter; see `Decoder::set_reference`).
pub fn reference_logps<B: Kernels>(model: &mut Decoder<B>, pairs: &[&EncodedPair]) -> Vec<(f64, f64)> {
    model.set_reference(true);
    let (c, r) = policy_logps(model, pairs);
    let (c, r) = (values(c.0.detach()), values(r.0.detach()));
    model.set_reference(false);
    c.into_iter().zip(r).collect()
}

/// Pairs per scoring step (one forward for their chosen sides, one for their rejected sides).
pub const SCORE_BATCH: usize = 8;

/// Policy and reference log-probs of every pair, in batches of [`SCORE_BATCH`]; the reference
/// forward is skipped where `reference` already holds the pair's values. No gradient.
pub fn score_pairs<B: Kernels>(model: &mut Decoder<B>, pairs: &[EncodedPair], reference: Option<&[(f64, f64)]>) -> Vec<PairLogps> {
    let mut out = Vec::with_capacity(pairs.len());
    // Without adapters the policy is the reference: one forward serves both.
    let adapters = model.has_adapters();
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
    fn a_nan_log_prob_gives_a_nan_loss_of_every_type() {
        let pairs = [pair(f64::NAN, -20.0, -11.0, -19.0), pair(-3.0, -1.0, -2.5, -1.5)];
        let dev = Default::default();
        let t = |f: fn(&PairLogps) -> f64| {
            Tensor::<Cpu, 1>::from_data(TensorData::new(pairs.iter().map(|p| f(p) as f32).collect::<Vec<_>>(), [2]), &dev)
        };
        for loss_type in LossType::ALL {
            let cfg = DpoConfig { loss_type, label_smoothing: 0.1, beta: 0.3, rpo_alpha: None };
            assert!(cfg.pair_loss(&pairs[0]).is_nan(), "{loss_type:?}");
            assert!(cfg.metrics(&pairs, "")["loss"].as_f64().is_none_or(f64::is_nan), "{loss_type:?}");
            let got: Vec<f32> = cfg.loss_tensor(t(|p| p.chosen.policy), t(|p| p.rejected.policy), &pairs).into_data().to_vec().unwrap();
            assert!(got[0].is_nan() && got[1].is_finite(), "{loss_type:?}: {got:?}");
        }
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
