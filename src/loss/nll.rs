//! The masked next-token negative log-likelihood over a [`Batch`]: the SFT loss, training's eval
//! loss and `ft eval`'s loss are this one computation. The vocabulary head and the softmax run
//! only at scored positions (the prompt's logits are never formed).

use crate::ops::SumAll;
use burn::prelude::*;
use burn::tensor::{Int, TensorData};

use crate::data::batch::Batch;
use crate::data::encode::Encoded;
use crate::model::Decoder;
use crate::ops::Kernels;

/// Where hidden states come from: `(ids [B, T], packed-row segments)` → `[B, T, hidden]`.
/// Training passes its `Forward` (which may recompute blocks in the backward).
pub type Hidden<'a, B> = dyn FnMut(Tensor<B, 2, Int>, Segments) -> Tensor<B, 3> + 'a;

/// Packed rows: the lengths of the samples in each row (`None` for padded rows).
pub type Segments<'a> = Option<&'a [Vec<usize>]>;

/// The model's own forward: plain or packed rows.
pub fn plain_hidden<B: Kernels>(model: &Decoder<B>) -> impl FnMut(Tensor<B, 2, Int>, Segments) -> Tensor<B, 3> + '_ {
    move |ids, segments| match segments {
        Some(s) => model.hidden_packed(ids, s),
        None => model.hidden(ids, None),
    }
}

/// `log p(target)` at every scored position of `batch`, `[n]` in f32 (differentiable), and
/// the logits there `[1, n, vocab]`. With no scored position, `None` and the hidden states.
fn scored<B: Kernels>(model: &Decoder<B>, batch: &Batch, hidden: &mut Hidden<B>) -> Result<(Tensor<B, 1>, Tensor<B, 3>), Tensor<B, 3>> {
    let device = model.device();
    let n = batch.positions.len();
    let input = Tensor::<B, 2, Int>::from_data(TensorData::new(batch.input.clone(), [batch.b, batch.t]), &device);
    let hidden = hidden(input, batch.segments.as_deref());
    if n == 0 {
        return Err(hidden);
    }
    let logits = model.head_at(hidden, batch.positions.clone());
    let target = Tensor::<B, 1, Int>::from_data(TensorData::new(batch.targets.clone(), [n]), &device);
    let vocab = logits.dims()[2];
    Ok((crate::ops::token_logprobs(logits.clone().reshape([n, vocab]), target), logits))
}

/// `log p(target)` at every scored position of `batch`, `[n]` in f32 (differentiable).
pub fn scored_logprobs<B: Kernels>(model: &Decoder<B>, batch: &Batch, hidden: &mut Hidden<B>) -> Option<Tensor<B, 1>> {
    scored(model, batch, hidden).ok().map(|(lp, _)| lp)
}

/// As [`scored_logprobs`], with the next-token entropy at each scored position (no gradient;
/// GRPO's `entropy` metric).
pub fn scored_logprobs_entropy<B: Kernels>(model: &Decoder<B>, batch: &Batch, hidden: &mut Hidden<B>) -> Option<(Tensor<B, 1>, Vec<f64>)> {
    scored(model, batch, hidden).ok().map(|(lp, logits)| (lp, entropies(logits.detach()).1))
}

/// Per position of `logits [1, n, vocab]`: the vocabulary-mean logit and the entropy of the
/// softmax, in f32.
fn entropies<B: Backend>(logits: Tensor<B, 3>) -> (Vec<f64>, Vec<f64>) {
    let [_, n, vocab] = logits.dims();
    let logits = logits.cast(burn::tensor::DType::F32).reshape([n, vocab]);
    let mean: Vec<f64> = logits.clone().mean_dim(1).into_data().convert::<f64>().to_vec().expect("f64");
    let ls = burn::tensor::activation::log_softmax(logits, 1);
    let entropy: Vec<f64> = (ls.clone().exp() * ls).sum_dim(1).neg().into_data().convert::<f64>().to_vec().expect("f64");
    (mean, entropy)
}

/// The SFT loss: the sum of the scored tokens' NLL divided by `norm` (the scored tokens of the
/// whole accumulated batch), and how many scored tokens the model predicts right (argmax).
pub fn sft_loss<B: Kernels>(model: &Decoder<B>, batch: &Batch, norm: f64, hidden: &mut Hidden<B>) -> (Tensor<B, 1>, usize) {
    match scored(model, batch, hidden) {
        Err(hidden) => (hidden.sum() * 0.0, 0),
        Ok((logp, logits)) => {
            let predicted: Vec<i64> = logits.detach().argmax(2).into_data().convert::<i64>().to_vec().expect("ids");
            let correct = predicted.iter().zip(&batch.targets).filter(|(p, t)| p == t).count();
            (logp.neg().sum_all() / norm, correct)
        }
    }
}

/// What a sample's scored positions give (no gradient): the log-prob sum and count, and the sums
/// over those positions of the vocabulary-mean logit and of the next-token entropy (TRL's
/// `logits/*` and `entropy` metrics).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SampleStats {
    pub logp: f64,
    pub tokens: usize,
    pub mean_logit: f64,
    pub entropy: f64,
}

/// [`SampleStats`] of each sample of a padded batch.
pub fn sample_stats<B: Kernels>(model: &Decoder<B>, samples: &[&Encoded]) -> Vec<SampleStats> {
    let batch = Batch::padded(samples);
    let mut out = vec![SampleStats::default(); samples.len()];
    let Ok((logp, logits)) = scored(model, &batch, &mut plain_hidden(model)) else { return out };
    let (mean, entropy) = entropies(logits);
    let logp: Vec<f64> = logp.into_data().convert::<f64>().to_vec().expect("f64");
    for (k, &i) in batch.owner.iter().enumerate() {
        let s = &mut out[i];
        s.logp += logp[k];
        s.tokens += 1;
        s.mean_logit += mean[k];
        s.entropy += entropy[k];
    }
    out
}

/// The log-prob of every scored token of each sample of a padded batch, in order (no gradient).
pub fn token_logps<B: Kernels>(model: &Decoder<B>, samples: &[&Encoded]) -> Vec<Vec<f64>> {
    let batch = Batch::padded(samples);
    let mut out = vec![Vec::new(); samples.len()];
    let Some(logp) = scored_logprobs(model, &batch, &mut plain_hidden(model)) else { return out };
    let logp: Vec<f64> = logp.into_data().convert::<f64>().to_vec().expect("f64 log-probs");
    for (&i, lp) in batch.owner.iter().zip(logp) {
        out[i].push(lp);
    }
    out
}

/// The NLL sum and scored-token count of each sample of a padded batch (no gradient).
pub fn per_sample<B: Kernels>(model: &Decoder<B>, samples: &[&Encoded]) -> Vec<(f64, usize)> {
    let batch = Batch::padded(samples);
    let mut out = vec![(0.0, 0); samples.len()];
    let Some(logp) = scored_logprobs(model, &batch, &mut plain_hidden(model)) else { return out };
    let logp: Vec<f32> = logp.into_data().convert::<f32>().to_vec().expect("f32 log-probs");
    for (&i, lp) in batch.owner.iter().zip(logp) {
        out[i].0 -= lp as f64;
        out[i].1 += 1;
    }
    out
}

/// Padded tokens per evaluation forward (length-sorted batches keep padding small).
const EVAL_BATCH_TOKENS: usize = 4096;

/// Mean NLL per scored token of `samples` and its parts.
#[derive(Debug, Clone)]
pub struct NllReport {
    pub loss: f64,
    pub tokens: usize,
    /// Per sample, in input order: (NLL sum, scored tokens).
    pub per_sample: Vec<(f64, usize)>,
}

/// The evaluation loss of `samples` (training's eval and `ft eval`): length-sorted batches of
/// about [`EVAL_BATCH_TOKENS`] padded tokens, per-token log-probs summed in f64.
pub fn evaluate<B: Kernels>(model: &Decoder<B>, samples: &[Encoded]) -> NllReport {
    let mut order: Vec<usize> = (0..samples.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(samples[i].ids.len()));
    let mut per = vec![(0.0, 0); samples.len()];
    let mut k = 0;
    while k < order.len() {
        let longest = samples[order[k]].ids.len().max(1);
        let n = (EVAL_BATCH_TOKENS / longest).clamp(1, 64).min(order.len() - k);
        let batch = &order[k..k + n];
        let refs: Vec<&Encoded> = batch.iter().map(|&i| &samples[i]).collect();
        for (&i, r) in batch.iter().zip(per_sample(model, &refs)) {
            per[i] = r;
        }
        k += n;
    }
    let nll: f64 = per.iter().map(|s| s.0).sum();
    let tokens: usize = per.iter().map(|s| s.1).sum();
    let loss = if tokens > 0 { nll / tokens as f64 } else { f64::NAN };
    NllReport { loss, tokens, per_sample: per }
}
