//! GRPO (Group Relative Policy Optimization) as an objective, as TRL 1.16's `GRPOTrainer`
//! trains: for every prompt of a step, `num_generations` completions are sampled from the
//! current policy (prompts × generations batched, left-padded, with the KV cache, each from an
//! RNG seeded by `(seed, step, prompt, generation)`, so a resumed run samples the same), scored by the recipe's reward functions,
//! turned into group advantages (`loss::grpo`), and the policy takes a gradient step on
//! `−min(ρA, clip(ρ)A) (+ β·k3·ρ)` per completion token, aggregated by `loss_type`. With
//! `num_iterations = μ > 1` that generation batch serves μ steps (TRL's buffer): the sampling
//! policy's log-probs are kept and `ρ = exp(logp − logp_old)` moves away from 1.

use std::path::PathBuf;

use burn::module::AutodiffModule;
use burn::prelude::*;
use burn::tensor::{DType, TensorData};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use super::objective::{Objective, StepReport, StepSettings};
use super::optim::AdamW;
use super::recompute::Recompute;
use super::rewards::{RewardSpec, Scorer, ToScore};
use super::step::train_step;
use super::TrainError;
use crate::data::batch::Batch;
use crate::data::encode::Encoded;
use crate::data::groups::{read_prompts, PromptRecord};
use crate::data::prepare::DataCounts;
use crate::data::template::ChatTemplate;
use crate::data::tokenizer::TextTokenizer;
use crate::generate::{generate_batch, GenerateOptions};
use crate::loss::grpo::{advantages, GrpoConfig, GrpoLossType, ScoredCompletion, TokenInputs};
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
    /// Steps trained on each generation batch (importance ratios and clipping after the first).
    pub num_iterations: usize,
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
    messages: Vec<crate::data::conversation::Message>,
    ids: Vec<u32>,
    fields: Map<String, Value>,
}

/// GRPO over prompts, with an optional eval split (greedy completions, mean reward).
pub struct Grpo {
    s: GrpoSettings,
    train: Vec<Prompt>,
    eval: Option<Vec<Prompt>>,
    scorers: Vec<Scorer>,
    tok: TextTokenizer,
    /// The generation batch being trained on.
    buffer: Option<Generation>,
}

fn prompts(tok: &TextTokenizer, template: &ChatTemplate, records: Vec<PromptRecord>) -> Result<Vec<Prompt>, TrainError> {
    records
        .into_iter()
        .map(|r| {
            let text = template
                .render_with_tools(&r.prompt, r.tools.as_ref(), true)
                .map_err(|e| crate::data::conversation::RecordError::Template(format!("{e:#}")).at(r.at.clone()))?;
            let ids = tok.encode(&text)?.get_ids().to_vec();
            Ok(Prompt { text, ids, messages: r.prompt, fields: r.fields })
        })
        .collect()
}

impl Grpo {
    /// Prepares the prompts and the reward functions (a reward model is loaded on `device`).
    pub fn new<K: crate::ops::Kernels>(tok: &TextTokenizer, template: &ChatTemplate, s: &GrpoSettings, device: &K::Device) -> Result<Self, TrainError> {
        let scorers = s.rewards.iter().map(|r| Scorer::new::<K>(r.clone(), device)).collect::<Result<Vec<_>, _>>().map_err(|e| TrainError::Invalid { path: "recipe".into(), msg: e.to_string() })?;
        let train = prompts(tok, template, read_prompts(&s.train)?)?;
        let eval = match &s.eval {
            Some(f) => Some(prompts(tok, template, read_prompts(f)?)?),
            None => None,
        };
        let tok = TextTokenizer::from_dir(&tok.dir)?;
        Ok(Grpo { s: s.clone(), train, eval, scorers, tok, buffer: None })
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
        let to_score: Vec<ToScore> = items.iter().map(|(p, text, n)| ToScore { prompt: &p.text, messages: &p.messages, completion: text, tokens: *n, fields: &p.fields }).collect();
        let mut total = vec![0.0; items.len()];
        let mut per = Vec::new();
        for scorer in &self.scorers {
            let spec = &scorer.spec;
            let v = scorer.score(&to_score).map_err(|e| TrainError::Invalid { path: "recipe".into(), msg: e.to_string() })?;
            for (t, x) in total.iter_mut().zip(&v) {
                *t += spec.weight * x;
            }
            per.push((spec.name.clone(), v));
        }
        Ok((total, per))
    }
}

/// Sequences sampled together at most (prompts × generations; whole groups, so at least one).
const MAX_SAMPLING_ROWS: usize = 64;

/// The seed of generation `g` of the `k`-th prompt of step `step`.
fn sample_seed(seed: u64, step: usize, k: usize, g: usize) -> u64 {
    let mut h = seed ^ 0x5851_F42D_4C95_7F2D;
    for x in [step as u64, k as u64, g as u64] {
        h = (h ^ x).wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(29);
    }
    h
}

/// One completion of a generation batch: its micro-batch, its prompt, its ids (the stop token
/// included) and whether it was cut at the length limit.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Completion {
    micro: usize,
    prompt: usize,
    ids: Vec<u32>,
    truncated: bool,
}

/// A generation batch, sampled and scored once and trained on for `num_iterations` steps (TRL's
/// buffered inputs). Kept in checkpoints, so a run resumed between its steps trains on the same.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Generation {
    /// Micro-batches of the step that sampled it.
    micro: usize,
    completions: Vec<Completion>,
    texts: Vec<String>,
    #[serde(with = "exact")]
    rewards: Vec<f64>,
    per_fn: Vec<Named>,
    #[serde(with = "exact")]
    adv: Vec<f64>,
    /// The reference's per-token log-probs (zeros with β = 0).
    #[serde(with = "exact_rows")]
    reference: Vec<Vec<f64>>,
    /// The sampling policy's per-token log-probs (`num_iterations > 1` only).
    #[serde(with = "exact_opt_rows")]
    old: Option<Vec<Vec<f64>>>,
}

/// One reward function's values.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Named {
    name: String,
    #[serde(with = "exact")]
    values: Vec<f64>,
}

/// f64 values saved as their bits: a resumed run must read back exactly what it wrote.
mod exact {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};
    pub fn serialize<S: Serializer>(v: &[f64], s: S) -> Result<S::Ok, S::Error> {
        v.iter().map(|x| x.to_bits()).collect::<Vec<u64>>().serialize(s)
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<f64>, D::Error> {
        Ok(Vec::<u64>::deserialize(d)?.into_iter().map(f64::from_bits).collect())
    }
}

mod exact_rows {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};
    pub fn serialize<S: Serializer>(v: &[Vec<f64>], s: S) -> Result<S::Ok, S::Error> {
        v.iter().map(|r| r.iter().map(|x| x.to_bits()).collect()).collect::<Vec<Vec<u64>>>().serialize(s)
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Vec<f64>>, D::Error> {
        Ok(Vec::<Vec<u64>>::deserialize(d)?.into_iter().map(|r| r.into_iter().map(f64::from_bits).collect()).collect())
    }
}

mod exact_opt_rows {
    use serde::{Deserialize, Deserializer, Serializer};
    pub fn serialize<S: Serializer>(v: &Option<Vec<Vec<f64>>>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(rows) => super::exact_rows::serialize(rows, s),
            None => s.serialize_none(),
        }
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<Vec<f64>>>, D::Error> {
        Ok(Option::<Vec<Vec<u64>>>::deserialize(d)?.map(|rows| rows.into_iter().map(|r| r.into_iter().map(f64::from_bits).collect()).collect()))
    }
}

impl Grpo {
    /// The scored sample of each completion: prompt + completion, the completion's tokens scored
    /// (none of a truncated completion's with mask_truncated_completions).
    fn samples(&self, gen: &Generation) -> Vec<Encoded> {
        gen.completions
            .iter()
            .map(|c| {
                let p = &self.train[c.prompt].ids;
                let on = u8::from(!(c.truncated && self.s.mask_truncated_completions));
                let mut mask = vec![0u8; p.len()];
                mask.extend(std::iter::repeat_n(on, c.ids.len()));
                Encoded { text: String::new(), ids: [p.clone(), c.ids.clone()].concat(), mask }
            })
            .collect()
    }

    /// Samples every prompt's group from the current policy (no graph), scores it, and takes the
    /// reference's and (`num_iterations > 1`) the sampling policy's per-token log-probs.
    /// Returns the batch and the seconds spent sampling and scoring.
    fn generate<B: TrainBackend>(&self, model: &Decoder<B>, micro: &[Vec<usize>], step: usize) -> Result<(Generation, f64, f64), TrainError> {
        let g = self.s.num_generations;
        let cfg = self.s.config;
        let t_sample = std::time::Instant::now();
        let mut policy = model.valid();
        let opts = self.options(false);
        // Every prompt × generation of the step, in batches of whole groups.
        let prompts: Vec<(usize, usize)> = micro.iter().enumerate().flat_map(|(k, idx)| idx.iter().map(move |&i| (k, i))).collect();
        let mut completions = Vec::new();
        for (c, chunk) in prompts.chunks((MAX_SAMPLING_ROWS / g).max(1)).enumerate() {
            let ids: Vec<&[u32]> = chunk.iter().map(|&(_, i)| self.train[i].ids.as_slice()).collect();
            let first = c * (MAX_SAMPLING_ROWS / g).max(1);
            let rows: Vec<(usize, u64)> = (0..chunk.len()).flat_map(|p| (0..g).map(move |j| (p, sample_seed(self.s.seed, step, first + p, j)))).collect();
            for (r, out) in generate_batch(&policy, &ids, &rows, &opts).into_iter().enumerate() {
                let (k, i) = chunk[r / g];
                completions.push(Completion { micro: k, prompt: i, ids: out.ids, truncated: out.truncated });
            }
        }
        let sample_s = t_sample.elapsed().as_secs_f64();
        // Rewards and advantages (groups are consecutive).
        let t_reward = std::time::Instant::now();
        let texts: Vec<String> = completions
            .iter()
            .map(|c| {
                let body: Vec<u32> = c.ids.iter().copied().filter(|id| !self.s.stop_ids.contains(id)).collect();
                self.tok.decode(&body).unwrap_or_default()
            })
            .collect();
        let items: Vec<(&Prompt, String, usize)> = completions.iter().zip(&texts).map(|(c, t)| (&self.train[c.prompt], t.clone(), c.ids.len())).collect();
        let (rewards, per_fn) = self.rewards(&items)?;
        let adv = advantages(&rewards, g, cfg.scale_rewards);
        let reward_s = t_reward.elapsed().as_secs_f64();
        let per_fn = per_fn.into_iter().map(|(name, values)| Named { name, values }).collect();
        let mut gen = Generation { micro: micro.len(), completions, texts, rewards, per_fn, adv, reference: Vec::new(), old: None };
        let samples = self.samples(&gen);
        let logps = |m: &Decoder<B::InnerBackend>| -> Vec<Vec<f64>> { samples.chunks(8).flat_map(|c| nll::token_logps(m, &c.iter().collect::<Vec<_>>())).collect() };
        if self.s.num_iterations > 1 {
            gen.old = Some(logps(&policy));
        }
        gen.reference = if cfg.beta != 0.0 {
            policy.set_reference(true);
            let r = logps(&policy);
            policy.set_reference(false);
            r
        } else {
            samples.iter().map(|s| vec![0.0; s.trainable()]).collect()
        };
        Ok((gen, sample_s, reward_s))
    }
}

impl<B: TrainBackend> Objective<B> for Grpo {
    fn len(&self) -> usize {
        self.train.len()
    }

    fn data_counts(&self) -> DataCounts {
        DataCounts::default()
    }

    /// A generation serves `num_iterations` steps; the loop draws prompts once per generation.
    fn steps_per_batch(&self) -> usize {
        self.s.num_iterations
    }

    fn state(&self) -> Option<Value> {
        self.buffer.as_ref().map(|g| serde_json::to_value(g).expect("generation serializes"))
    }

    fn restore(&mut self, state: Value) -> Result<(), String> {
        let gen: Generation = serde_json::from_value(state).map_err(|e| format!("not GRPO's generation batch: {e}"))?;
        if gen.completions.iter().any(|c| c.prompt >= self.train.len()) {
            return Err("a completion's prompt is past the end of the training prompts".into());
        }
        self.buffer = Some(gen);
        Ok(())
    }

    fn step(&mut self, model: &mut Decoder<B>, opt: &mut AdamW<B::InnerBackend>, micro: &[Vec<usize>], settings: StepSettings) -> Result<StepReport, TrainError> {
        let cfg = self.s.config;
        // 1–2. A new generation batch every num_iterations steps (or when none is held).
        let fresh = settings.step.is_multiple_of(self.s.num_iterations) || self.buffer.is_none();
        let (mut sample_s, mut reward_s) = (0.0, 0.0);
        if fresh {
            let (gen, s, r) = self.generate(model, micro, settings.step)?;
            self.buffer = Some(gen);
            (sample_s, reward_s) = (s, r);
        }
        let gen = self.buffer.as_ref().expect("a generation batch");
        let t_update = std::time::Instant::now();
        let samples = self.samples(gen);
        let n_micro = gen.micro;
        // 3. Per-token weights of the aggregation.
        let tokens_all: usize = samples.iter().map(Encoded::trainable).sum();
        let in_micro = |k: usize| gen.completions.iter().zip(&samples).filter(move |(c, _)| c.micro == k);
        let per_micro_tokens: Vec<usize> = (0..n_micro).map(|k| in_micro(k).map(|(_, s)| s.trainable()).sum()).collect();
        let per_micro_n: Vec<usize> = (0..n_micro).map(|k| in_micro(k).count()).collect();
        let weight = |k: usize, len: usize| -> f64 {
            let n_micro = n_micro as f64;
            match cfg.loss_type {
                GrpoLossType::Dapo => 1.0 / tokens_all.max(1) as f64,
                GrpoLossType::Bnpo => 1.0 / per_micro_tokens[k].max(1) as f64 / n_micro,
                GrpoLossType::Grpo => 1.0 / len.max(1) as f64 / per_micro_n[k].max(1) as f64 / n_micro,
                GrpoLossType::DrGrpo => 1.0 / (per_micro_n[k] * cfg.max_completion_length).max(1) as f64 / n_micro,
            }
        };
        // 4. One gradient step.
        let mut policy_tokens: Vec<Vec<f64>> = vec![Vec::new(); samples.len()];
        let mut entropy = vec![0.0; samples.len()];
        let mut input_tokens = 0;
        let (loss, grad_norm) = train_step(
            model,
            opt,
            n_micro,
            |m, fwd, k| {
                let rows: Vec<usize> = (0..samples.len()).filter(|&r| gen.completions[r].micro == k).collect();
                let refs: Vec<&Encoded> = rows.iter().map(|&r| &samples[r]).collect();
                input_tokens += refs.iter().map(|s| s.ids.len() - 1).sum::<usize>();
                let m: &Decoder<B> = m;
                let batch = Batch::padded(&refs);
                let device = m.device();
                let Some((lp, entropies)) = nll::scored_logprobs_entropy(m, &batch, &mut |ids, _| fwd.hidden(m, ids, None)) else {
                    let ids = Tensor::<B, 2, burn::tensor::Int>::from_data(TensorData::new(batch.input.clone(), [batch.b, batch.t]), &device);
                    return fwd.hidden(m, ids, None).sum().cast(DType::F32).reshape([1]) * 0.0;
                };
                let values: Vec<f64> = lp.clone().detach().into_data().convert::<f64>().to_vec().expect("f64");
                let mut inputs = TokenInputs { old: gen.old.as_ref().map(|_| Vec::new()), ..Default::default() };
                let mut cursor = vec![0usize; rows.len()];
                for (p, &owner) in batch.owner.iter().enumerate() {
                    let r = rows[owner];
                    let t = cursor[owner];
                    inputs.adv.push(gen.adv[r] as f32);
                    inputs.weight.push(weight(k, samples[r].trainable()) as f32);
                    inputs.reference.push(gen.reference[r][t] as f32);
                    if let (Some(old), Some(o)) = (&mut inputs.old, &gen.old) {
                        old.push(o[r][t] as f32);
                    }
                    cursor[owner] += 1;
                    policy_tokens[r].push(values[p]);
                    entropy[r] += entropies[p];
                }
                crate::loss::grpo::token_loss(lp, inputs, &cfg)
            },
            settings,
            self.s.recompute,
        );
        let update_s = t_update.elapsed().as_secs_f64();
        // 5. Metrics (TRL's names) and, for a new generation, the completions log.
        let scored: Vec<ScoredCompletion> = gen
            .completions
            .iter()
            .enumerate()
            .map(|(r, c)| ScoredCompletion {
                policy: if policy_tokens[r].is_empty() { vec![0.0; c.ids.len()] } else { policy_tokens[r].clone() },
                reference: gen.reference[r].clone(),
                old: gen.old.as_ref().map(|o| o[r].clone()),
                entropy: entropy[r],
                prompt_tokens: self.train[c.prompt].ids.len(),
                truncated: c.truncated,
                rewards: gen.per_fn.iter().map(|f| (f.name.clone(), f.values[r])).collect(),
            })
            .collect();
        let weights: Vec<(String, f64)> = self.s.rewards.iter().map(|s| (s.name.clone(), s.weight)).collect();
        let (mut metrics, _) = cfg.metrics(&scored, self.s.num_generations, &weights);
        metrics.insert("loss".into(), loss.into());
        // Where the step's time went: sampling, reward functions, reference and update.
        metrics.insert("time/sample_s".into(), sample_s.into());
        metrics.insert("time/reward_s".into(), reward_s.into());
        metrics.insert("time/update_s".into(), update_s.into());
        let mut samples_log = Vec::new();
        if fresh {
            let generated: usize = gen.completions.iter().map(|c| c.ids.len()).sum();
            metrics.insert("time/generated_tokens_per_s".into(), (generated as f64 / sample_s.max(1e-9)).into());
            samples_log = gen
                .completions
                .iter()
                .enumerate()
                .map(|(r, c)| {
                    json!({"prompt": self.train[c.prompt].text, "completion": gen.texts[r], "tokens": c.ids.len(), "truncated": c.truncated,
                           "reward": gen.rewards[r], "rewards": gen.per_fn.iter().map(|f| (f.name.clone(), Value::from(f.values[r]))).collect::<Map<_, _>>(), "advantage": gen.adv[r]})
                })
                .collect();
        }
        Ok(StepReport { loss, grad_norm, input_tokens, metrics, samples: samples_log })
    }

    /// Greedy completions of the eval prompts: `eval_reward` and `eval_rewards/<fn>/mean`.
    fn evaluate(&mut self, model: &mut Decoder<B::InnerBackend>) -> Option<Map<String, Value>> {
        let eval = self.eval.as_ref()?;
        let opts = self.options(true);
        let mut items = Vec::new();
        for chunk in eval.chunks(MAX_SAMPLING_ROWS) {
            let ids: Vec<&[u32]> = chunk.iter().map(|p| p.ids.as_slice()).collect();
            let rows: Vec<(usize, u64)> = (0..chunk.len()).map(|p| (p, 0)).collect();
            for (p, c) in chunk.iter().zip(generate_batch(model, &ids, &rows, &opts)) {
                let body: Vec<u32> = c.ids.iter().copied().filter(|id| !self.s.stop_ids.contains(id)).collect();
                items.push((p, self.tok.decode(&body).unwrap_or_default(), c.ids.len()));
            }
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
