//! The one place where forward, backward and the update happen.

use burn::module::Param;
use burn::prelude::*;
use burn::tensor::activation::log_softmax;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Int, TensorData};

use super::optim::{clip_global_norm, AdamW};
use crate::data::encode::Encoded;
use crate::model::Decoder;

/// A right-padded micro-batch: `input[b, t] = ids[t]`, `target[b, t] = ids[t + 1]`, `weight` 1
/// where the target is trained on.
pub struct MicroBatch {
    /// Non-padding input tokens.
    pub real_tokens: usize,
    pub input: Vec<i64>,
    pub target: Vec<i64>,
    pub weight: Vec<f32>,
    pub b: usize,
    pub t: usize,
}

impl MicroBatch {
    pub fn new(samples: &[&Encoded]) -> Self {
        let t = samples.iter().map(|s| s.ids.len().saturating_sub(1)).max().unwrap_or(1).max(1);
        let b = samples.len();
        let (mut input, mut target, mut weight) = (vec![0i64; b * t], vec![0i64; b * t], vec![0f32; b * t]);
        for (i, s) in samples.iter().enumerate() {
            for j in 0..s.ids.len().saturating_sub(1) {
                input[i * t + j] = s.ids[j] as i64;
                target[i * t + j] = s.ids[j + 1] as i64;
                weight[i * t + j] = s.mask[j + 1] as f32;
            }
        }
        let real_tokens = samples.iter().map(|s| s.ids.len().saturating_sub(1)).sum();
        MicroBatch { real_tokens, input, target, weight, b, t }
    }

    /// Tokens the loss is taken over.
    pub fn trainable(&self) -> usize {
        self.weight.iter().filter(|&&w| w > 0.0).count()
    }
}

/// Sum of masked token NLLs divided by `norm` (the trainable tokens of the whole accumulated
/// batch), and the number of correctly predicted trainable tokens. The vocabulary head and the
/// softmax run only on the trainable positions (the prompt's logits are never formed).
pub fn sft_loss<B: Backend>(model: &Decoder<B>, mb: &MicroBatch, norm: f64) -> (Tensor<B, 1>, usize) {
    let device = model.device();
    let (b, t) = (mb.b, mb.t);
    let positions: Vec<i64> = (0..b * t).filter(|&i| mb.weight[i] > 0.0).map(|i| i as i64).collect();
    let targets: Vec<i64> = positions.iter().map(|&i| mb.target[i as usize]).collect();
    let n = positions.len();
    let input = Tensor::<B, 2, Int>::from_data(TensorData::new(mb.input.clone(), [b, t]), &device);
    if n == 0 {
        return (model.hidden(input, None).sum() * 0.0, 0);
    }
    let logits = model.logits_at(input, positions);
    let predicted: Vec<i64> = logits.clone().detach().argmax(2).into_data().convert::<i64>().to_vec().expect("ids");
    let correct = predicted.iter().zip(&targets).filter(|(p, t)| p == t).count();
    let target = Tensor::<B, 3, Int>::from_data(TensorData::new(targets, [1, n, 1]), &device);
    let nll = log_softmax(logits, 2).gather(2, target).neg();
    (nll.sum() / norm, correct)
}

/// The trainable tensors (LoRA A and B of every adapted projection), in a fixed order.
pub fn trainable_params<B: AutodiffBackend>(model: &mut Decoder<B>) -> Vec<Tensor<B::InnerBackend, 2>> {
    let mut out = Vec::new();
    for (_, p) in model.projections_mut() {
        if let Some(l) = &p.lora {
            out.push(l.a.val().inner());
            out.push(l.b.val().inner());
        }
    }
    out
}

fn set_params<B: AutodiffBackend>(model: &mut Decoder<B>, params: Vec<Tensor<B::InnerBackend, 2>>) {
    let mut it = params.into_iter();
    for (_, p) in model.projections_mut() {
        if let Some(l) = &mut p.lora {
            l.a = Param::from_tensor(Tensor::from_inner(it.next().expect("param count")).require_grad());
            l.b = Param::from_tensor(Tensor::from_inner(it.next().expect("param count")).require_grad());
        }
    }
}

/// What one optimizer step measured.
#[derive(Debug, Clone, Copy)]
pub struct StepStats {
    /// Mean loss per trainable token over the accumulated batch.
    pub loss: f64,
    pub grad_norm: f64,
    /// Trainable (scored) tokens.
    pub tokens: usize,
    /// All non-padding input tokens processed.
    pub input_tokens: usize,
    pub correct: usize,
}

/// One optimizer step over `micro_batches` (gradient accumulation): each micro-batch's loss is
/// divided by the trainable tokens of all of them, so accumulation equals one big batch.
pub fn train_step<B: AutodiffBackend>(
    model: &mut Decoder<B>,
    opt: &mut AdamW<B::InnerBackend>,
    micro_batches: &[MicroBatch],
    lr: f64,
    max_grad_norm: f64,
) -> StepStats {
    let tokens: usize = micro_batches.iter().map(MicroBatch::trainable).sum();
    let norm = tokens.max(1) as f64;
    let mut grads: Option<Vec<Tensor<B::InnerBackend, 2>>> = None;
    let (mut loss, mut correct) = (0.0, 0);
    for mb in micro_batches {
        let (l, c) = sft_loss(model, mb, norm);
        correct += c;
        loss += l.clone().into_scalar().elem::<f64>();
        let g = l.backward();
        let mut this = Vec::new();
        for (_, p) in model.projections_mut() {
            if let Some(lo) = &p.lora {
                this.push(lo.a.val().grad(&g).unwrap_or_else(|| lo.a.val().inner().zeros_like()));
                this.push(lo.b.val().grad(&g).unwrap_or_else(|| lo.b.val().inner().zeros_like()));
            }
        }
        grads = Some(match grads {
            None => this,
            Some(acc) => acc.into_iter().zip(this).map(|(a, b)| a + b).collect(),
        });
    }
    let mut grads = grads.unwrap_or_default();
    let grad_norm = clip_global_norm(&mut grads, max_grad_norm);
    let params = trainable_params(model);
    let new = opt.step(params, grads, lr);
    set_params(model, new);
    let input_tokens = micro_batches.iter().map(|m| m.real_tokens).sum();
    StepStats { loss, grad_norm, tokens, input_tokens, correct }
}
