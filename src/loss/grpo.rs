//! GRPO's loss and metrics as TRL 1.16's `GRPOTrainer` computes them, for completions already
//! sampled and scored (`ft eval --objective grpo`; the loss of one generation batch).
//!
//! Rewards `r = Σ_f w_f R_f`; advantages `A = (r − mean_group) / (std + 1e-4)` with the group's
//! std (`group`), the whole batch's (`batch`) or none (`r − mean_group`); stds unbiased. Per
//! completion token, with the importance ratio `ρ = exp(logp − logp_old)` (1 in value when the
//! completions come from this very policy; `logp_old` is the sampling policy's when a generation
//! is reused, `num_iterations > 1`) and `k3 = e^(ref − logp) − (ref − logp) − 1`:
//! `ℓ = −min(ρA, clip(ρ, 1 − ε, 1 + ε_high)·A) + β·k3` (`β·k3·ρ` with `use_bias_correction_kl`,
//! which TRL leaves off by default: equal in value, not in gradient). The
//! loss aggregates `ℓ` by `loss_type`:
//!
//! | loss_type | aggregation |
//! |---|---|
//! | grpo | mean over completions of `Σ_t ℓ / L_i` |
//! | bnpo | `Σ ℓ / Σ L` |
//! | dapo | `Σ ℓ / ` the generation batch's completion tokens (= bnpo for one batch) |
//! | dr_grpo | `Σ ℓ / (N · max_completion_length)` |

use crate::ops::SumAll;
use burn::prelude::*;
use burn::tensor::{DType, TensorData};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum GrpoLossType {
    Grpo,
    Dapo,
    #[value(name = "dr_grpo")]
    DrGrpo,
    Bnpo,
}

/// How advantages are scaled (TRL's `scale_rewards`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ScaleRewards {
    Group,
    Batch,
    None,
}

/// GRPO's settings for scoring a batch (TRL's names and defaults).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GrpoConfig {
    pub loss_type: GrpoLossType,
    pub beta: f64,
    pub epsilon: f64,
    pub epsilon_high: f64,
    pub scale_rewards: ScaleRewards,
    /// `dr_grpo` divides by completions × this.
    pub max_completion_length: usize,
    /// Weigh the KL term by the importance ratio (TRL's `use_bias_correction_kl`).
    pub bias_correction_kl: bool,
}

impl Default for GrpoConfig {
    fn default() -> Self {
        GrpoConfig { loss_type: GrpoLossType::Dapo, beta: 0.0, epsilon: 0.2, epsilon_high: 0.28, scale_rewards: ScaleRewards::Group, max_completion_length: 256, bias_correction_kl: false }
    }
}

fn mean(x: &[f64]) -> f64 {
    x.iter().sum::<f64>() / x.len().max(1) as f64
}

/// The unbiased standard deviation (NaN for one value, as torch).
fn std(x: &[f64]) -> f64 {
    let m = mean(x);
    (x.iter().map(|v| (v - m).powi(2)).sum::<f64>() / (x.len() as f64 - 1.0)).sqrt()
}

/// Advantages of `rewards` in groups of `group` consecutive completions.
pub fn advantages(rewards: &[f64], group: usize, scale: ScaleRewards) -> Vec<f64> {
    let batch_std = std(rewards);
    rewards
        .chunks(group.max(1))
        .flat_map(|g| {
            let (m, s) = (mean(g), std(g));
            g.iter().map(move |r| match scale {
                ScaleRewards::Group => (r - m) / (s + 1e-4),
                ScaleRewards::Batch => (r - m) / (batch_std + 1e-4),
                ScaleRewards::None => r - m,
            })
        })
        .collect()
}

/// One completion as scored: per-token log-probs under the policy, the reference and the policy
/// that sampled it (`None`: this policy; every completion token, the end-of-turn token
/// included), the policy's summed next-token entropy, its prompt's length, whether it was cut at
/// the length limit, and its rewards by function.
#[derive(Debug, Clone, PartialEq)]
pub struct ScoredCompletion {
    pub policy: Vec<f64>,
    pub reference: Vec<f64>,
    pub old: Option<Vec<f64>>,
    pub entropy: f64,
    pub prompt_tokens: usize,
    pub truncated: bool,
    pub rewards: Vec<(String, f64)>,
}

impl GrpoConfig {
    /// Per-token `ℓ` of a completion with advantage `a`.
    fn token_losses(&self, c: &ScoredCompletion, a: f64) -> Vec<f64> {
        c.policy
            .iter()
            .zip(&c.reference)
            .zip(ratios(c))
            .map(|((&lp, &rf), rho)| {
                let clipped = rho.clamp(1.0 - self.epsilon, 1.0 + self.epsilon_high);
                let mut l = -(rho * a).min(clipped * a);
                if self.beta != 0.0 {
                    l += self.beta * k3(lp, rf) * if self.bias_correction_kl { rho } else { 1.0 };
                }
                l
            })
            .collect()
    }

    /// The loss of a batch of completions with their advantages.
    pub fn loss(&self, completions: &[ScoredCompletion], adv: &[f64]) -> f64 {
        let per: Vec<Vec<f64>> = completions.iter().zip(adv).map(|(c, &a)| self.token_losses(c, a)).collect();
        let total: f64 = per.iter().flatten().sum();
        let tokens: usize = per.iter().map(Vec::len).sum();
        match self.loss_type {
            GrpoLossType::Grpo => mean(&per.iter().map(|l| l.iter().sum::<f64>() / l.len().max(1) as f64).collect::<Vec<_>>()),
            GrpoLossType::Bnpo | GrpoLossType::Dapo => total / tokens.max(1) as f64,
            GrpoLossType::DrGrpo => total / (completions.len() * self.max_completion_length).max(1) as f64,
        }
    }

    /// The loss and TRL's metrics of a batch of completions in groups of `group`: `loss`,
    /// `num_tokens`, `completions/*`, `rewards/<fn>/{mean,std}`, `reward`, `reward_std`,
    /// `frac_reward_zero_std`, `kl` (β > 0), `entropy`, `clip_ratio/*`, and the advantages.
    pub fn metrics(&self, completions: &[ScoredCompletion], group: usize, weights: &[(String, f64)]) -> (Map<String, Value>, Vec<f64>) {
        let weight = |name: &str| weights.iter().find(|(n, _)| n == name).map_or(1.0, |w| w.1);
        let rewards: Vec<f64> = completions.iter().map(|c| c.rewards.iter().map(|(n, r)| weight(n) * r).sum()).collect();
        let adv = advantages(&rewards, group, self.scale_rewards);
        let mut m = Map::new();
        let mut put = |k: &str, v: f64| {
            m.insert(k.to_string(), v.into());
        };
        put("loss", self.loss(completions, &adv));
        let lengths: Vec<f64> = completions.iter().map(|c| c.policy.len() as f64).collect();
        put("num_tokens", completions.iter().map(|c| (c.prompt_tokens + c.policy.len()) as f64).sum());
        put("completions/mean_length", mean(&lengths));
        put("completions/min_length", lengths.iter().copied().fold(f64::INFINITY, f64::min));
        put("completions/max_length", lengths.iter().copied().fold(f64::NEG_INFINITY, f64::max));
        put("completions/clipped_ratio", completions.iter().filter(|c| c.truncated).count() as f64 / completions.len().max(1) as f64);
        let terminated: Vec<f64> = completions.iter().filter(|c| !c.truncated).map(|c| c.policy.len() as f64).collect();
        let or0 = |v: f64| if v.is_finite() { v } else { 0.0 };
        put("completions/mean_terminated_length", or0(mean(&terminated)));
        put("completions/min_terminated_length", or0(terminated.iter().copied().fold(f64::INFINITY, f64::min)));
        put("completions/max_terminated_length", or0(terminated.iter().copied().fold(f64::NEG_INFINITY, f64::max)));
        if let Some(first) = completions.first() {
            for (name, _) in &first.rewards {
                let values: Vec<f64> = completions.iter().filter_map(|c| c.rewards.iter().find(|(n, _)| n == name).map(|r| r.1)).collect();
                put(&format!("rewards/{name}/mean"), mean(&values));
                put(&format!("rewards/{name}/std"), std(&values));
            }
        }
        put("reward", mean(&rewards));
        put("reward_std", std(&rewards));
        let zero_std = |g: &[f64]| std(g) < 1e-6;
        let frac = match self.scale_rewards {
            ScaleRewards::Batch => f64::from(u8::from(zero_std(&rewards))),
            _ => rewards.chunks(group.max(1)).map(|g| if zero_std(g) { g.len() } else { 0 }).sum::<usize>() as f64 / rewards.len().max(1) as f64,
        };
        put("frac_reward_zero_std", frac);
        let tokens: usize = completions.iter().map(|c| c.policy.len()).sum();
        if self.beta != 0.0 {
            // TRL logs the KL term as it enters the loss (times ρ with the bias correction).
            let kl: f64 = completions
                .iter()
                .flat_map(|c| c.policy.iter().zip(&c.reference).zip(ratios(c)).map(|((&lp, &rf), rho)| k3(lp, rf) * if self.bias_correction_kl { rho } else { 1.0 }))
                .sum();
            put("kl", kl / tokens.max(1) as f64);
        }
        put("entropy", completions.iter().map(|c| c.entropy).sum::<f64>() / tokens.max(1) as f64);
        // Clipped tokens: ρ below 1 − ε with A < 0, above 1 + ε_high with A > 0 (TRL's masks);
        // `low_min`/`high_max` over the completions' own fractions.
        let (mut low, mut high, mut region) = (0usize, 0usize, 0usize);
        let (mut low_min, mut high_max) = (f64::INFINITY, f64::NEG_INFINITY);
        for (c, &a) in completions.iter().zip(&adv) {
            let (mut l, mut h) = (0usize, 0usize);
            for rho in ratios(c) {
                let is_low = rho < 1.0 - self.epsilon && a < 0.0;
                let is_high = rho > 1.0 + self.epsilon_high && a > 0.0;
                l += usize::from(is_low);
                h += usize::from(is_high);
                region += usize::from(is_low || is_high);
            }
            low += l;
            high += h;
            // A completion without tokens has the fraction NaN, which torch's nanmin skips.
            if !c.policy.is_empty() {
                low_min = low_min.min(l as f64 / c.policy.len() as f64);
                high_max = high_max.max(h as f64 / c.policy.len() as f64);
            }
        }
        let frac = |n: usize| n as f64 / tokens.max(1) as f64;
        put("clip_ratio/low_mean", frac(low));
        put("clip_ratio/high_mean", frac(high));
        put("clip_ratio/region_mean", frac(region));
        put("clip_ratio/low_min", or0(low_min));
        put("clip_ratio/high_max", or0(high_max));
        (m, adv)
    }
}

/// The importance ratios `ρ = exp(logp − logp_old)` of a completion's tokens (1 without `old`).
fn ratios(c: &ScoredCompletion) -> Vec<f64> {
    match &c.old {
        Some(old) => c.policy.iter().zip(old).map(|(lp, o)| (lp - o).exp()).collect(),
        None => vec![1.0; c.policy.len()],
    }
}

/// Per-token inputs of [`token_loss`], one value per scored completion token.
#[derive(Debug, Clone, Default)]
pub struct TokenInputs {
    /// The completion's advantage.
    pub adv: Vec<f32>,
    /// The aggregation weight (see the module docs).
    pub weight: Vec<f32>,
    /// The reference's log-prob (read when β > 0).
    pub reference: Vec<f32>,
    /// The sampling policy's log-prob, when the generation is reused (`num_iterations > 1`).
    pub old: Option<Vec<f32>>,
}

/// The differentiable loss of scored completion tokens: `lp [n]` their log-probs under the
/// policy and the per-token inputs: `Σ w·(−min(ρA, clip(ρ, 1 − ε, 1 + ε_high)·A) + β·k3·ρ)` with
/// `ρ = exp(lp − old)`, or `exp(lp − lp.detach())` (1 in value, `∇lp` in the gradient) without
/// `old`, and `k3` taken on `lp` too (times ρ with `bias_correction_kl`).
pub fn token_loss<B: Backend>(lp: Tensor<B, 1>, inputs: TokenInputs, cfg: &GrpoConfig) -> Tensor<B, 1> {
    let device = lp.device();
    let n = inputs.adv.len();
    let t = |v: Vec<f32>| Tensor::<B, 1>::from_data(TensorData::new(v, [n]), (&device, DType::F32));
    let (a, w, rf) = (t(inputs.adv), t(inputs.weight), t(inputs.reference));
    let old = match inputs.old {
        Some(o) => t(o),
        None => lp.clone().detach(),
    };
    let rho = (lp.clone() - old).exp();
    let clipped = rho.clone().clamp(1.0 - cfg.epsilon, 1.0 + cfg.epsilon_high);
    let mut per_token = (rho.clone() * a.clone()).min_pair(clipped * a).neg();
    let beta = cfg.beta;
    if beta != 0.0 {
        let d = rf - lp;
        let k3 = d.clone().exp() - d - 1.0;
        let kl = if cfg.bias_correction_kl { k3 * rho } else { k3 };
        per_token = per_token + kl * beta;
    }
    (per_token * w).sum_all()
}

/// The k3 estimator of KL(π‖ref) at one token.
fn k3(lp: f64, rf: f64) -> f64 {
    (rf - lp).exp() - (rf - lp) - 1.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advantages_scale_by_group_batch_or_not_at_all() {
        let r = [1.0, 2.0, 3.0, 5.0, 5.0, 5.0];
        let g = advantages(&r, 3, ScaleRewards::Group);
        assert!((g[0] + 1.0 / 1.0001).abs() < 1e-12 && g[3] == 0.0, "{g:?}");
        assert_eq!(advantages(&r, 3, ScaleRewards::None)[2], 1.0);
        let b = advantages(&r, 3, ScaleRewards::Batch);
        assert!((b[0] - (-1.0 / (std(&r) + 1e-4))).abs() < 1e-12);
    }
}
