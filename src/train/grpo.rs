//! GRPO (Group Relative Policy Optimization) as an objective, as TRL 1.16's `GRPOTrainer`
//! trains with `num_iterations = 1`: for every prompt of a step, `num_generations` completions
//! are sampled from the current policy (batched, KV cache, each from an RNG seeded by
//! `(seed, step, prompt, generation)`, so a resumed run samples the same), scored by the
//! recipe's reward functions, turned into group advantages (`loss::grpo`), and the policy takes
//! one gradient step on `−A·ρ (+ β·k3·ρ)` per completion token, aggregated by `loss_type`.

use std::path::PathBuf;

use burn::module::AutodiffModule;
use burn::prelude::*;
use burn::tensor::{DType, TensorData};
use serde_json::{json, Map, Value};

use super::objective::{Objective, StepReport, StepSettings};
use super::optim::AdamW;
use super::recompute::Recompute;
use super::rewards::{score, RewardError, RewardSpec, ToScore};
use super::step::train_step;
use super::TrainError;
use crate::data::batch::Batch;
use crate::data::encode::Encoded;
use crate::data::groups::{read_prompts, PromptRecord};
use crate::data::prepare::DataCounts;
use crate::data::template::ChatTemplate;
use crate::data::tokenizer::TextTokenizer;
use crate::generate::{generate_group, GenerateOptions};
use crate::loss::grpo::{advantages, GrpoConfig, GrpoLossType, ScoredCompletion};
use crate::loss::nll;
use crate::model::Decoder;
use crate::ops::TrainBackend;

/// What GRPO needs to know.
#[derive(Debug, Clone)]
pub struct GrpoSettings {
    pub config: GrpoConfig,
    pub train: PathBuf,
    pub eval: Option<PathBuf>,
    pub num_generations: usize,
    pub temperature: f32,
    pub top_p: f32,
    pub mask_truncated_completions: bool,
    pub rewards: Vec<RewardSpec>,
    pub seed: u64,
    pub stop_ids: Vec<u32>,
    pub recompute: Recompute,
}

/// Each reward function's name and values.
type PerFunction = Vec<(String, Vec<f64>)>;

/// A prompt, rendered and tokenized.
struct Prompt {
    text: String,
    ids: Vec<u32>,
    fields: Map<String, Value>,
}

/// GRPO over prompts, with an optional eval split (greedy completions, mean reward).
pub struct Grpo {
    s: GrpoSettings,
    train: Vec<Prompt>,
    eval: Option<Vec<Prompt>>,
    regexes: Vec<Option<regex::Regex>>,
    tok: TextTokenizer,
}

fn prompts(tok: &TextTokenizer, template: &ChatTemplate, records: Vec<PromptRecord>) -> Result<Vec<Prompt>, TrainError> {
    records
        .into_iter()
        .map(|r| {
            let text = template
                .render_with_tools(&r.prompt, r.tools.as_ref(), true)
                .map_err(|e| crate::data::conversation::RecordError::Template(format!("{e:#}")).at(r.at.clone()))?;
            let ids = tok.encode(&text)?.get_ids().to_vec();
            Ok(Prompt { text, ids, fields: r.fields })
        })
        .collect()
}

impl Grpo {
    pub fn new(tok: &TextTokenizer, template: &ChatTemplate, s: &GrpoSettings) -> Result<Self, TrainError> {
        let regexes = s.rewards.iter().map(RewardSpec::check).collect::<Result<Vec<_>, RewardError>>().map_err(|e| TrainError::Invalid { path: "recipe".into(), msg: e.to_string() })?;
        let train = prompts(tok, template, read_prompts(&s.train)?)?;
        let eval = match &s.eval {
            Some(f) => Some(prompts(tok, template, read_prompts(f)?)?),
            None => None,
        };
        let tok = TextTokenizer::from_dir(&tok.dir)?;
        Ok(Grpo { s: s.clone(), train, eval, regexes, tok })
    }

    fn options(&self, greedy: bool) -> GenerateOptions {
        GenerateOptions {
            max_new_tokens: self.s.config.max_completion_length,
            temperature: if greedy { 0.0 } else { self.s.temperature },
            top_p: self.s.top_p,
            seed: 0,
            ignore_eos: false,
            stop_ids: self.s.stop_ids.clone(),
        }
    }

    /// The weighted rewards of completions `(prompt, text, tokens)`, and each function's values.
    fn rewards(&self, items: &[(&Prompt, String, usize)]) -> Result<(Vec<f64>, PerFunction), TrainError> {
        let to_score: Vec<ToScore> = items.iter().map(|(p, text, n)| ToScore { prompt: &p.text, completion: text, tokens: *n, fields: &p.fields }).collect();
        let mut total = vec![0.0; items.len()];
        let mut per = Vec::new();
        for (spec, re) in self.s.rewards.iter().zip(&self.regexes) {
            let v = score(spec, re.as_ref(), &to_score).map_err(|e| TrainError::Invalid { path: "recipe".into(), msg: e.to_string() })?;
            for (t, x) in total.iter_mut().zip(&v) {
                *t += spec.weight * x;
            }
            per.push((spec.name.clone(), v));
        }
        Ok((total, per))
    }
}

/// The seed of generation `g` of the `k`-th prompt of step `step`.
fn sample_seed(seed: u64, step: usize, k: usize, g: usize) -> u64 {
    let mut h = seed ^ 0x5851_F42D_4C95_7F2D;
    for x in [step as u64, k as u64, g as u64] {
        h = (h ^ x).wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(29);
    }
    h
}

impl<B: TrainBackend> Objective<B> for Grpo {
    fn len(&self) -> usize {
        self.train.len()
    }

    fn data_counts(&self) -> DataCounts {
        DataCounts::default()
    }

    fn step(&mut self, model: &mut Decoder<B>, opt: &mut AdamW<B::InnerBackend>, micro: &[Vec<usize>], settings: StepSettings) -> Result<StepReport, TrainError> {
        let g = self.s.num_generations;
        let cfg = self.s.config;
        // 1. Sample every prompt's group from the current policy (no graph).
        let t_sample = std::time::Instant::now();
        let policy = model.valid();
        let opts = self.options(false);
        let mut completions = Vec::new(); // (micro k, prompt index, ids, truncated)
        let mut k_prompt = 0;
        for (k, idx) in micro.iter().enumerate() {
            for &i in idx {
                let seeds: Vec<u64> = (0..g).map(|j| sample_seed(self.s.seed, settings.step, k_prompt, j)).collect();
                for c in generate_group(&policy, &self.train[i].ids, &seeds, &opts) {
                    completions.push((k, i, c.ids, c.truncated));
                }
                k_prompt += 1;
            }
        }
        let sample_s = t_sample.elapsed().as_secs_f64();
        // 2. Rewards and advantages (groups are consecutive).
        let t_reward = std::time::Instant::now();
        let texts: Vec<(&Prompt, String, usize)> = completions
            .iter()
            .map(|(_, i, ids, _)| {
                let body: Vec<u32> = ids.iter().copied().filter(|id| !self.s.stop_ids.contains(id)).collect();
                (&self.train[*i], self.tok.decode(&body).unwrap_or_default(), ids.len())
            })
            .collect();
        let (rewards, per_fn) = self.rewards(&texts)?;
        let adv = advantages(&rewards, g, cfg.scale_rewards);
        let reward_s = t_reward.elapsed().as_secs_f64();
        let t_update = std::time::Instant::now();
        // 3. The samples to score: prompt + completion, the completion's tokens scored (none of a
        //    truncated completion's with mask_truncated_completions).
        let samples: Vec<Encoded> = completions
            .iter()
            .map(|(_, i, ids, truncated)| {
                let p = &self.train[*i].ids;
                let on = u8::from(!(*truncated && self.s.mask_truncated_completions));
                let mut mask = vec![0u8; p.len()];
                mask.extend(std::iter::repeat_n(on, ids.len()));
                Encoded { text: String::new(), ids: [p.clone(), ids.clone()].concat(), mask }
            })
            .collect();
        // The reference's per-token log-probs (β > 0 only), without gradient.
        let reference: Vec<Vec<f64>> = if cfg.beta != 0.0 {
            let mut inner = policy;
            inner.set_reference(true);
            let r = samples.chunks(8).flat_map(|c| nll::token_logps(&inner, &c.iter().collect::<Vec<_>>())).collect();
            inner.set_reference(false);
            r
        } else {
            samples.iter().map(|s| vec![0.0; s.trainable()]).collect()
        };
        // 4. Per-token weights of the aggregation.
        let n_micro = micro.len() as f64;
        let tokens_all: usize = samples.iter().map(Encoded::trainable).sum();
        let per_micro_tokens: Vec<usize> = (0..micro.len()).map(|k| completions.iter().zip(&samples).filter(|(c, _)| c.0 == k).map(|(_, s)| s.trainable()).sum()).collect();
        let per_micro_n: Vec<usize> = (0..micro.len()).map(|k| completions.iter().filter(|c| c.0 == k).count()).collect();
        let weight = |k: usize, len: usize| -> f64 {
            match cfg.loss_type {
                GrpoLossType::Dapo => 1.0 / tokens_all.max(1) as f64,
                GrpoLossType::Bnpo => 1.0 / per_micro_tokens[k].max(1) as f64 / n_micro,
                GrpoLossType::Grpo => 1.0 / len.max(1) as f64 / per_micro_n[k].max(1) as f64 / n_micro,
                GrpoLossType::DrGrpo => 1.0 / (per_micro_n[k] * cfg.max_completion_length).max(1) as f64 / n_micro,
            }
        };
        // 5. One gradient step.
        let mut policy_tokens: Vec<Vec<f64>> = vec![Vec::new(); samples.len()];
        let mut input_tokens = 0;
        let beta = cfg.beta;
        let (loss, grad_norm) = train_step(
            model,
            opt,
            micro.len(),
            |m, fwd, k| {
                let rows: Vec<usize> = (0..samples.len()).filter(|&r| completions[r].0 == k).collect();
                let refs: Vec<&Encoded> = rows.iter().map(|&r| &samples[r]).collect();
                input_tokens += refs.iter().map(|s| s.ids.len() - 1).sum::<usize>();
                let m: &Decoder<B> = m;
                let batch = Batch::padded(&refs);
                let device = m.device();
                let Some(lp) = nll::scored_logprobs(m, &batch, &mut |ids, _| fwd.hidden(m, ids, None)) else {
                    let ids = Tensor::<B, 2, burn::tensor::Int>::from_data(TensorData::new(batch.input.clone(), [batch.b, batch.t]), &device);
                    return fwd.hidden(m, ids, None).sum().cast(DType::F32).reshape([1]) * 0.0;
                };
                let values: Vec<f64> = lp.clone().detach().into_data().convert::<f64>().to_vec().expect("f64");
                let (mut a, mut w, mut rf) = (Vec::new(), Vec::new(), Vec::new());
                let mut cursor = vec![0usize; rows.len()];
                for (p, &owner) in batch.owner.iter().enumerate() {
                    let r = rows[owner];
                    a.push(adv[r] as f32);
                    w.push(weight(k, samples[r].trainable()) as f32);
                    rf.push(reference[r][cursor[owner]] as f32);
                    cursor[owner] += 1;
                    policy_tokens[r].push(values[p]);
                }
                crate::loss::grpo::token_loss(lp, a, w, rf, beta)
            },
            settings,
            self.s.recompute,
        );
        let update_s = t_update.elapsed().as_secs_f64();
        // 6. Metrics (TRL's names) and the completions log.
        let scored: Vec<ScoredCompletion> = completions
            .iter()
            .enumerate()
            .map(|(r, (_, i, ids, truncated))| ScoredCompletion {
                policy: if policy_tokens[r].is_empty() { vec![0.0; ids.len()] } else { policy_tokens[r].clone() },
                reference: reference[r].clone(),
                entropy: 0.0,
                prompt_tokens: self.train[*i].ids.len(),
                truncated: *truncated,
                rewards: per_fn.iter().map(|(name, v)| (name.clone(), v[r])).collect(),
            })
            .collect();
        let weights: Vec<(String, f64)> = self.s.rewards.iter().map(|s| (s.name.clone(), s.weight)).collect();
        let (mut metrics, _) = cfg.metrics(&scored, g, &weights);
        metrics.remove("entropy");
        metrics.insert("loss".into(), loss.into());
        // Where the step's time went: sampling, reward functions, reference and update.
        metrics.insert("time/sample_s".into(), sample_s.into());
        metrics.insert("time/reward_s".into(), reward_s.into());
        metrics.insert("time/update_s".into(), update_s.into());
        let generated: usize = completions.iter().map(|c| c.2.len()).sum();
        metrics.insert("time/generated_tokens_per_s".into(), (generated as f64 / sample_s.max(1e-9)).into());
        let samples_log = completions
            .iter()
            .enumerate()
            .map(|(r, (_, i, ids, truncated))| {
                json!({"prompt": self.train[*i].text, "completion": texts[r].1, "tokens": ids.len(), "truncated": truncated,
                       "reward": rewards[r], "rewards": per_fn.iter().map(|(n, v)| (n.clone(), Value::from(v[r]))).collect::<Map<_, _>>(), "advantage": adv[r]})
            })
            .collect();
        Ok(StepReport { loss, grad_norm, input_tokens, metrics, samples: samples_log })
    }

    /// Greedy completions of the eval prompts: `eval_reward` and `eval_rewards/<fn>/mean`.
    fn evaluate(&mut self, model: &mut Decoder<B::InnerBackend>) -> Option<Map<String, Value>> {
        let eval = self.eval.as_ref()?;
        let opts = self.options(true);
        let mut items = Vec::new();
        for p in eval {
            let c = generate_group(model, &p.ids, &[0], &opts).remove(0);
            let body: Vec<u32> = c.ids.iter().copied().filter(|id| !self.s.stop_ids.contains(id)).collect();
            items.push((p, self.tok.decode(&body).unwrap_or_default(), c.ids.len()));
        }
        let (total, per_fn) = self.rewards(&items).ok()?;
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
        let mut m = Map::new();
        m.insert("eval_reward".into(), mean(&total).into());
        for (name, v) in per_fn {
            m.insert(format!("eval_rewards/{name}/mean"), mean(&v).into());
        }
        Some(m)
    }
}
