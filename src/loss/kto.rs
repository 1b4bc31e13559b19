//! KTO (Kahneman-Tversky Optimization) as TRL 1.16's `KTOTrainer` computes it, loss type `kto`.
//!
//! Each row is a prompt, a completion and a label (desirable or not). With `r = S_pol − S_ref`
//! (summed completion log-probs of the policy and the reference) and the batch's KL estimate
//! `kl = max(0, mean_j(S_pol − S_ref))` over mismatched samples (row `j`'s prompt with another
//! row's completion; no gradient):
//!
//! | row | loss |
//! |---|---|
//! | desirable | `desirable_weight · (1 − σ(β (r − kl)))` |
//! | undesirable | `undesirable_weight · (1 − σ(β (kl − r)))` |
//!
//! averaged over the rows. Rewards are `β·r`. The f64 formulas give the reported metrics; the
//! tensor ones drive the gradient (a test keeps them in step).

use burn::prelude::*;
use burn::tensor::activation::sigmoid;
use burn::tensor::{DType, TensorData};
use serde_json::{Map, Value};

use super::nll::{sample_stats, SampleStats};
use crate::data::encode::Encoded;
use crate::data::prepare::EncodedRow;
use crate::model::Decoder;
use crate::ops::Kernels;

/// KTO's settings (TRL's `KTOConfig` names and defaults).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KtoConfig {
    pub beta: f64,
    pub desirable_weight: f64,
    pub undesirable_weight: f64,
}

impl Default for KtoConfig {
    fn default() -> Self {
        KtoConfig { beta: 0.1, desirable_weight: 1.0, undesirable_weight: 1.0 }
    }
}

/// One row's completion log-prob sums under the policy and the reference.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct RowLogps {
    pub policy: f64,
    pub reference: f64,
    pub desirable: bool,
    /// The policy's statistics over the completion tokens, where measured.
    pub stats: SampleStats,
}

/// TRL's KL estimate of a batch from its mismatched samples' `(policy, reference)` sums:
/// `(unclamped mean, clamped at 0)`.
pub fn kl_estimate(kl: &[(f64, f64)]) -> (f64, f64) {
    let mean = kl.iter().map(|(p, r)| p - r).sum::<f64>() / kl.len().max(1) as f64;
    (mean, mean.max(0.0))
}

impl KtoConfig {
    fn row_loss(&self, r: &RowLogps, kl: f64) -> f64 {
        let x = r.policy - r.reference;
        let sigma = |z: f64| 1.0 / (1.0 + (-z).exp());
        if r.desirable {
            self.desirable_weight * (1.0 - sigma(self.beta * (x - kl)))
        } else {
            self.undesirable_weight * (1.0 - sigma(self.beta * (kl - x)))
        }
    }

    /// The loss and TRL's metrics over `batches` (each its rows and its clamped KL), names
    /// prefixed with `prefix`: `loss` (the mean row loss), `kl` (the mean over batches),
    /// `rewards/{chosen,rejected,margins}`, `logps/{chosen,rejected}`, and, where the rows carry
    /// statistics, `logits/{chosen,rejected}` and `entropy` (per completion token).
    pub fn metrics(&self, batches: &[(Vec<RowLogps>, f64)], prefix: &str) -> Map<String, Value> {
        let rows: Vec<(&RowLogps, f64)> = batches.iter().flat_map(|(rows, kl)| rows.iter().map(move |r| (r, *kl))).collect();
        let n = rows.len().max(1) as f64;
        let mean_over = |desirable: bool, f: &dyn Fn(&RowLogps) -> f64| {
            let sel: Vec<f64> = rows.iter().filter(|(r, _)| r.desirable == desirable).map(|(r, _)| f(r)).collect();
            if sel.is_empty() {
                f64::NAN
            } else {
                sel.iter().sum::<f64>() / sel.len() as f64
            }
        };
        let reward = |r: &RowLogps| self.beta * (r.policy - r.reference);
        let mut m = Map::new();
        let mut put = |k: &str, v: f64| {
            m.insert(format!("{prefix}{k}"), v.into());
        };
        put("loss", rows.iter().map(|(r, kl)| self.row_loss(r, *kl)).sum::<f64>() / n);
        put("kl", batches.iter().map(|(_, kl)| kl).sum::<f64>() / batches.len().max(1) as f64);
        let (c, rj) = (mean_over(true, &reward), mean_over(false, &reward));
        put("rewards/chosen", c);
        put("rewards/rejected", rj);
        put("rewards/margins", c - rj);
        put("logps/chosen", mean_over(true, &|r| r.policy));
        put("logps/rejected", mean_over(false, &|r| r.policy));
        if rows.iter().any(|(r, _)| r.stats.tokens > 0) {
            let per_token = |sel: &dyn Fn(&RowLogps) -> bool, f: &dyn Fn(&SampleStats) -> f64| {
                let (sum, count) = rows.iter().filter(|(r, _)| sel(r)).fold((0.0, 0), |(s, c), (r, _)| (s + f(&r.stats), c + r.stats.tokens));
                sum / count.max(1) as f64
            };
            put("logits/chosen", per_token(&|r| r.desirable, &|s| s.mean_logit));
            put("logits/rejected", per_token(&|r| !r.desirable, &|s| s.mean_logit));
            put("entropy", per_token(&|_| true, &|s| s.entropy));
        }
        m
    }

    /// Row losses as a differentiable tensor `[n]` from the policy's completion log-prob sums
    /// (`policy: [n]`), the reference's, the labels and the batch's clamped KL (constants).
    pub fn loss_tensor<B: Backend>(&self, policy: Tensor<B, 1>, rows: &[RowLogps], kl: f64) -> Tensor<B, 1> {
        let device = policy.device();
        let n = rows.len();
        let col = |f: &dyn Fn(&RowLogps) -> f64| Tensor::<B, 1>::from_data(TensorData::new(rows.iter().map(|r| f(r) as f32).collect::<Vec<_>>(), [n]), (&device, DType::F32));
        let sign = col(&|r| if r.desirable { 1.0 } else { -1.0 });
        let weight = col(&|r| if r.desirable { self.desirable_weight } else { self.undesirable_weight });
        let reference = col(&|r| r.reference);
        let z = (policy - reference - kl) * sign * self.beta;
        (sigmoid(z).neg() + 1.0) * weight
    }
}

/// Rows per scoring forward.
pub const SCORE_BATCH: usize = 8;

/// Completion log-prob sums of `samples` under the reference (`Decoder::set_reference`), no
/// gradient.
pub fn reference_sums<B: Kernels>(model: &mut Decoder<B>, samples: &[&Encoded]) -> Vec<f64> {
    model.set_reference(true);
    let out = policy_sums(model, samples);
    model.set_reference(false);
    out
}

/// Completion log-prob sums of `samples` under the model as it is, no gradient (per-token f32
/// log-probs summed in f64, as [`sample_stats`] sums them).
pub fn policy_sums<B: Kernels>(model: &Decoder<B>, samples: &[&Encoded]) -> Vec<f64> {
    sample_stats(model, samples).iter().map(|s| s.logp).collect()
}

/// Scores `rows` (no gradient) in KL batches of `kl_batch` consecutive rows: each row's policy
/// sum and statistics and its reference sum, and each batch's clamped KL estimate with its
/// unclamped value.
pub fn score_rows<B: Kernels>(model: &mut Decoder<B>, rows: &[EncodedRow], kl_batch: usize) -> Vec<(Vec<RowLogps>, f64, f64)> {
    let mut out = Vec::new();
    for batch in rows.chunks(kl_batch.max(1)) {
        let (mut scored, mut kl) = (Vec::new(), Vec::new());
        for chunk in batch.chunks(SCORE_BATCH) {
            let samples: Vec<&Encoded> = chunk.iter().map(|r| &r.sample).collect();
            let kls: Vec<&Encoded> = chunk.iter().map(|r| &r.kl).collect();
            let stats = sample_stats(model, &samples);
            let reference = reference_sums(model, &samples);
            let kl_policy = policy_sums(model, &kls);
            let kl_reference = reference_sums(model, &kls);
            for (i, r) in chunk.iter().enumerate() {
                scored.push(RowLogps { policy: stats[i].logp, reference: reference[i], desirable: r.desirable, stats: stats[i] });
                kl.push((kl_policy[i], kl_reference[i]));
            }
        }
        let (unclamped, clamped) = kl_estimate(&kl);
        out.push((scored, clamped, unclamped));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Cpu;

    #[test]
    fn tensor_losses_equal_the_f64_formulas() {
        let rows = [
            RowLogps { policy: -10.0, reference: -11.0, desirable: true, ..Default::default() },
            RowLogps { policy: -3.0, reference: -2.5, desirable: false, ..Default::default() },
            RowLogps { policy: -7.0, reference: -7.0, desirable: true, ..Default::default() },
        ];
        let cfg = KtoConfig { beta: 0.3, desirable_weight: 1.5, undesirable_weight: 0.7 };
        let policy = Tensor::<Cpu, 1>::from_data(TensorData::new(rows.iter().map(|r| r.policy as f32).collect::<Vec<_>>(), [3]), &Default::default());
        let got = crate::loss::scalar(cfg.loss_tensor(policy, &rows, 0.2).mean());
        let want = cfg.metrics(&[(rows.to_vec(), 0.2)], "")["loss"].as_f64().unwrap();
        assert!((got - want).abs() < 1e-6, "{got} vs {want}");
        assert_eq!(kl_estimate(&[(-3.0, -2.0), (-1.0, -1.5)]), (-0.25, 0.0));
    }
}
