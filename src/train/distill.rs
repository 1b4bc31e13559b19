//! Distillation as an objective: the student (the model with its LoRA adapter) learns the
//! next-token distributions of a frozen teacher of the same tokenizer on the SFT data
//! (`loss::distill`: forward/reverse KL or TRL GKD's generalized JSD), optionally plus the SFT
//! loss. The teacher runs on the same device without autodiff, on the same (packed or padded)
//! batches; its logits are formed a chunk of positions at a time. As TRL's GKD, a share `lmbda`
//! of the steps trains on completions the student samples for the data's prompts (on-policy),
//! and with `seq_kd` the other steps on the teacher's.

use crate::ops::SumAll;
use std::path::PathBuf;

use burn::module::AutodiffModule;
use burn::prelude::*;
use burn::tensor::{DType, Int, TensorData};
use serde_json::{Map, Value};

use super::objective::{Objective, StepReport, StepSettings};
use super::optim::AdamW;
use super::sft::{Sft, SftSettings};
use super::step::train_step;
use super::TrainError;
use crate::data::batch::Batch;
use crate::data::encode::Encoded;
use crate::data::prepare::DataCounts;
use crate::data::template::ChatTemplate;
use crate::data::tokenizer::TextTokenizer;
use crate::loss::distill::{self, chunk_rows, chunks, logits_at, DistillConfig};
use crate::generate::{generate_batch, GenerateOptions};
use crate::loss::nll;
use crate::model::Decoder;
use crate::ops::TrainBackend;

/// What distillation needs to know.
#[derive(Debug, Clone)]
pub struct DistillSettings {
    pub config: DistillConfig,
    /// Weight of the SFT loss added to the divergence (0: distillation only).
    pub sft_weight: f64,
    pub data: SftSettings,
    pub teacher: PathBuf,
    /// The share of steps trained on the student's own completions (GKD's `lmbda`).
    pub lmbda: f64,
    /// Off-policy steps train on the teacher's completions instead of the data's (GKD's `seq_kd`).
    pub seq_kd: bool,
    /// How completions are sampled (`seed` unused: each completion's RNG comes from the run's
    /// seed, the step and the sample).
    pub generation: GenerateOptions,
    pub seed: u64,
    /// Positions per chunk of logits (default [`chunk_rows`]).
    pub chunk_positions: Option<usize>,
}

/// Distillation over the SFT data, with the teacher's model.
pub struct Distill<I: Backend> {
    sft: Sft,
    teacher: Decoder<I>,
    s: DistillSettings,
}

impl<I: crate::ops::Kernels> Distill<I> {
    pub fn new(tok: &TextTokenizer, template: &ChatTemplate, s: &DistillSettings, teacher: Decoder<I>) -> Result<Self, TrainError> {
        Ok(Distill { sft: Sft::new(tok, template, &s.data)?, teacher, s: s.clone() })
    }
}

/// A number in [0, 1) drawn from `(seed, step)`: whether a step samples on-policy.
fn unit(seed: u64, step: usize) -> f64 {
    let h = (seed ^ 0xD1B5_4A32_D192_ED03).wrapping_add(step as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let h = (h ^ (h >> 31)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    (h >> 11) as f64 / (1u64 << 53) as f64
}

/// The prompt of a sample: its ids before its last trained span (the final assistant turn).
fn prompt_of(sample: &Encoded) -> &[u32] {
    let end = sample.mask.iter().rposition(|&m| m == 1).map_or(sample.ids.len(), |e| e + 1);
    let start = sample.mask[..end].iter().rposition(|&m| m == 0).map_or(0, |s| s + 1);
    &sample.ids[..start]
}

/// New samples: each sample's prompt completed by `model` (sampled, seeded per (seed, step,
/// sample)), the completion scored through its first stop token (GKD's mask).
fn complete<M: crate::ops::Kernels>(model: &Decoder<M>, samples: &[&Encoded], opts: &GenerateOptions, seed: u64, step: usize) -> Vec<Encoded> {
    let prompts: Vec<&[u32]> = samples.iter().map(|s| prompt_of(s)).collect();
    let rows: Vec<(usize, u64)> = (0..samples.len()).map(|i| (i, seed ^ unit(seed.wrapping_add(i as u64 + 1), step).to_bits())).collect();
    generate_batch(model, &prompts, &rows, opts)
        .into_iter()
        .zip(&prompts)
        .map(|(c, p)| {
            let mut mask = vec![0u8; p.len()];
            mask.extend(std::iter::repeat_n(1u8, c.ids.len()));
            Encoded { text: String::new(), ids: [p.to_vec(), c.ids].concat(), mask }
        })
        .collect()
}

impl<B: TrainBackend> Objective<B> for Distill<B::InnerBackend> {
    fn len(&self) -> usize {
        <Sft as Objective<B>>::len(&self.sft)
    }

    fn data_counts(&self) -> DataCounts {
        self.sft.counts
    }

    fn step(&mut self, model: &mut Decoder<B>, opt: &mut AdamW<B::InnerBackend>, micro: &[Vec<usize>], settings: StepSettings) -> Result<StepReport, TrainError> {
        // GKD: with probability lmbda the student's own completions (on-policy), else with
        // seq_kd the teacher's, else the data.
        let on_policy = self.s.lmbda > 0.0 && unit(self.s.seed, settings.step) <= self.s.lmbda;
        let generated = on_policy || self.s.seq_kd;
        let t_sample = std::time::Instant::now();
        let batches: Vec<Batch> = match generated {
            false => micro.iter().map(|idx| self.sft.batch(idx)).collect(),
            true => {
                let student = model.valid();
                micro
                    .iter()
                    .map(|idx| {
                        let samples: Vec<&Encoded> = idx.iter().map(|&i| &self.sft.train[i]).collect();
                        let new = match on_policy {
                            true => complete(&student, &samples, &self.s.generation, self.s.seed, settings.step),
                            false => complete(&self.teacher, &samples, &self.s.generation, self.s.seed, settings.step),
                        };
                        Batch::padded(&new.iter().collect::<Vec<_>>())
                    })
                    .collect()
            }
        };
        let sample_s = if generated { t_sample.elapsed().as_secs_f64() } else { 0.0 };
        let tokens: usize = batches.iter().map(Batch::scored).sum();
        let norm = tokens.max(1) as f64;
        let (cfg, sft_weight, teacher, chunk_positions) = (self.s.config, self.s.sft_weight, &self.teacher, self.s.chunk_positions);
        let (mut divergence, mut nll_sum) = (0.0, 0.0);
        let (loss, grad_norm) = train_step(
            model,
            opt,
            batches.len(),
            |m, fwd, k| {
                let m: &Decoder<B> = m;
                let batch = &batches[k];
                let device = m.device();
                let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(batch.input.clone(), [batch.b, batch.t]), &device);
                let hs = fwd.hidden(m, ids, batch.segments.as_deref());
                if batch.positions.is_empty() {
                    return hs.sum().cast(DType::F32).reshape([1]) * 0.0;
                }
                // The teacher's hidden states once; its logits chunk by chunk beside the student's.
                let ht = distill::hidden(teacher, batch);
                // With a frozen head, each chunk's loss is differentiated on its own down to the
                // final hidden states, so that one chunk's logits (both models', and what their
                // backward keeps) are alive at a time; the blocks' backward then runs once, from
                // the summed hidden-state gradient. A head with an adapter keeps one graph.
                let head_trained = m.lm_head.as_ref().is_some_and(|h| h.adapter.is_some());
                let hd = if head_trained { hs.clone() } else { hs.clone().detach().require_grad() };
                let mut grad_h: Option<Tensor<B::InnerBackend, 3>> = None;
                let mut value = 0.0;
                let mut loss: Option<Tensor<B, 1>> = None;
                let mut offset = 0;
                for positions in chunks(batch, chunk_positions.unwrap_or_else(|| chunk_rows(m.config.vocab_size))) {
                    let n = positions.len();
                    let s = logits_at(m, hd.clone(), positions.clone());
                    let t = Tensor::<B, 2>::from_inner(logits_at(teacher, ht.clone(), positions));
                    let d = cfg.loss_tensor(s.clone(), t);
                    divergence += crate::loss::scalar(d.clone().detach());
                    let mut part = d / norm;
                    if sft_weight != 0.0 {
                        let targets = Tensor::<B, 1, Int>::from_data(TensorData::new(batch.targets[offset..offset + n].to_vec(), [n]), &device);
                        let lp = crate::ops::token_logprobs(s, targets).sum_all();
                        nll_sum -= crate::loss::scalar(lp.clone().detach());
                        part = part - lp * (sft_weight / norm);
                    }
                    offset += n;
                    if head_trained {
                        loss = Some(match loss {
                            Some(l) => l + part,
                            None => part,
                        });
                    } else {
                        value += crate::loss::scalar(part.clone().detach());
                        let g = part.backward();
                        let gh = hd.grad(&g).expect("the hidden states take part in the loss");
                        grad_h = Some(match grad_h {
                            Some(a) => a + gh,
                            None => gh,
                        });
                    }
                }
                if let Some(l) = loss {
                    return l;
                }
                // d/dθ Σ ⟨h, ∂L/∂h⟩ = ∂L/∂θ through the blocks; its value replaced by the loss's.
                let surrogate = (hs * Tensor::from_inner(grad_h.expect("at least one chunk"))).sum().cast(DType::F32);
                surrogate.clone() - surrogate.detach() + Tensor::<B, 1>::from_data(TensorData::new(vec![value as f32], [1]), &device)
            },
            settings,
            self.s.data.recompute,
        );
        let mut metrics = Map::new();
        metrics.insert("loss".into(), loss.into());
        if self.s.lmbda > 0.0 || self.s.seq_kd {
            metrics.insert("on_policy".into(), f64::from(u8::from(on_policy)).into());
            metrics.insert("time/sample_s".into(), sample_s.into());
            metrics.insert("completions/mean_length".into(), (tokens as f64 / batches.iter().map(|b| b.b).sum::<usize>().max(1) as f64).into());
        }
        metrics.insert("distill_loss".into(), (divergence / norm).into());
        if sft_weight != 0.0 {
            metrics.insert("nll_loss".into(), (nll_sum / norm).into());
        }
        Ok(StepReport { loss, grad_norm, input_tokens: batches.iter().map(|b| b.real_tokens).sum(), metrics, samples: Vec::new() })
    }

    /// The eval split's divergence (`eval_loss`; plus the SFT loss `eval_nll_loss`).
    fn evaluate(&mut self, model: &mut Decoder<B::InnerBackend>) -> Option<Map<String, Value>> {
        let eval = self.sft.eval.as_ref()?;
        let report = distill::evaluate(model, &self.teacher, eval, &self.s.config);
        let mut m = Map::new();
        m.insert("eval_loss".into(), report.loss.into());
        m.insert("eval_nll_loss".into(), nll::evaluate(model, eval).loss.into());
        Some(m)
    }
}
