//! Distillation as an objective: the student (the model with its LoRA adapter) learns the
//! next-token distributions of a frozen teacher of the same tokenizer on the SFT data
//! (`loss::distill`: forward/reverse KL or TRL GKD's generalized JSD), optionally plus the SFT
//! loss. The teacher runs on the same device without autodiff, on the same (packed or padded)
//! batches; its logits are formed a chunk of positions at a time.

use std::path::PathBuf;

use burn::prelude::*;
use burn::tensor::{DType, Int, TensorData};
use serde_json::{Map, Value};

use super::objective::{Objective, StepReport, StepSettings};
use super::optim::AdamW;
use super::recompute::Recompute;
use super::sft::{Sft, SftSettings};
use super::step::train_step;
use super::TrainError;
use crate::data::batch::Batch;
use crate::data::prepare::DataCounts;
use crate::data::template::ChatTemplate;
use crate::data::tokenizer::TextTokenizer;
use crate::loss::distill::{self, chunk_rows, chunks, logits_at, DistillConfig};
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
}

/// Distillation over the SFT data, with the teacher's model.
pub struct Distill<I: Backend> {
    sft: Sft,
    teacher: Decoder<I>,
    config: DistillConfig,
    sft_weight: f64,
    recompute: Recompute,
}

impl<I: crate::ops::Kernels> Distill<I> {
    pub fn new(tok: &TextTokenizer, template: &ChatTemplate, s: &DistillSettings, teacher: Decoder<I>) -> Result<Self, TrainError> {
        Ok(Distill { sft: Sft::new(tok, template, &s.data)?, teacher, config: s.config, sft_weight: s.sft_weight, recompute: s.data.recompute })
    }
}

impl<B: TrainBackend> Objective<B> for Distill<B::InnerBackend> {
    fn len(&self) -> usize {
        <Sft as Objective<B>>::len(&self.sft)
    }

    fn data_counts(&self) -> DataCounts {
        self.sft.counts
    }

    fn step(&mut self, model: &mut Decoder<B>, opt: &mut AdamW<B::InnerBackend>, micro: &[Vec<usize>], settings: StepSettings) -> Result<StepReport, TrainError> {
        let batches: Vec<Batch> = micro.iter().map(|idx| self.sft.batch(idx)).collect();
        let tokens: usize = batches.iter().map(Batch::scored).sum();
        let norm = tokens.max(1) as f64;
        let (cfg, sft_weight, teacher) = (self.config, self.sft_weight, &self.teacher);
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
                let mut loss: Option<Tensor<B, 1>> = None;
                let mut offset = 0;
                for positions in chunks(batch, chunk_rows(m.config.vocab_size)) {
                    let n = positions.len();
                    let s = logits_at(m, hs.clone(), positions.clone());
                    let t = Tensor::<B, 2>::from_inner(logits_at(teacher, ht.clone(), positions));
                    let d = cfg.loss_tensor(s.clone(), t);
                    divergence += crate::loss::scalar(d.clone().detach());
                    let mut part = d / norm;
                    if sft_weight != 0.0 {
                        let targets = Tensor::<B, 1, Int>::from_data(TensorData::new(batch.targets[offset..offset + n].to_vec(), [n]), &device);
                        let lp = crate::ops::token_logprobs(s, targets).sum();
                        nll_sum -= crate::loss::scalar(lp.clone().detach());
                        part = part - lp * (sft_weight / norm);
                    }
                    offset += n;
                    loss = Some(match loss {
                        Some(l) => l + part,
                        None => part,
                    });
                }
                loss.expect("at least one chunk")
            },
            settings,
            self.recompute,
        );
        let mut metrics = Map::new();
        metrics.insert("loss".into(), loss.into());
        metrics.insert("distill_loss".into(), (divergence / norm).into());
        if sft_weight != 0.0 {
            metrics.insert("nll_loss".into(), (nll_sum / norm).into());
        }
        Ok(StepReport { loss, grad_norm, input_tokens: batches.iter().map(|b| b.real_tokens).sum(), metrics, samples: Vec::new() })
    }

    /// The eval split's divergence (`eval_loss`; plus the SFT loss `eval_nll_loss`).
    fn evaluate(&mut self, model: &mut Decoder<B::InnerBackend>) -> Option<Map<String, Value>> {
        let eval = self.sft.eval.as_ref()?;
        let report = distill::evaluate(model, &self.teacher, eval, &self.config);
        let mut m = Map::new();
        m.insert("eval_loss".into(), report.loss.into());
        m.insert("eval_nll_loss".into(), nll::evaluate(model, eval).loss.into());
        Some(m)
    }
}
