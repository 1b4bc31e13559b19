//! Supervised fine-tuning: the assistant-only next-token loss over tokenized conversations.

use crate::backend::Kernels;
use std::path::Path;

use anyhow::{bail, Result};
use burn::prelude::*;
use crate::backend::TrainBackend;
use burn::tensor::{Int, TensorData};
use serde_json::{json, Map, Value};

use super::optim::AdamW;
use super::recipe::{Overlong, Recipe};
use super::run::{Objective, StepReport};
use super::step::train_step;
use crate::data::conversation::{read_jsonl, DataError};
use crate::data::cache;
use crate::data::encode::{encode_conversation, Encoded};
use crate::data::packing::{pack, Packed};
use crate::model::Decoder;
use crate::tokenizer::TextTokenizer;

/// What preparing a data file did besides producing samples.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct PrepareCounts {
    /// Dropped for being longer than `data.max_len` (`overlong = "drop"`).
    pub dropped_too_long: usize,
    /// Cut to `data.max_len` tokens (`overlong = "truncate"`).
    pub truncated: usize,
    /// Dropped for having no trainable token (`drop_untrainable = true`).
    pub dropped_untrainable: usize,
}

/// Encodes a data path (rendering and tokenizing on all cores). Over-long samples are dropped or
/// truncated as `data.overlong` says; a sample without trainable tokens is an error naming
/// `file:line` unless `data.drop_untrainable`.
pub fn prepare(tok: &TextTokenizer, recipe: &Recipe, file: &Path) -> Result<(Vec<Encoded>, PrepareCounts)> {
    use rayon::prelude::*;
    let template = tok.template(recipe.data.template)?;
    let d = &recipe.data;
    let convs = read_jsonl(file)?;
    // Tokenized data is cached beside the run directory (`.ft-cache/`), keyed by the data, the
    // tokenizer and the template.
    let cache_dir = recipe.output.dir.parent().unwrap_or(Path::new(".")).join(".ft-cache");
    let key = cache::key(file, &recipe.model.path, &template.source, "sft-v1").ok();
    let cached = key.as_ref().and_then(|k| cache::load(&cache_dir, k)).filter(|c| c.len() == convs.len());
    let encoded: Vec<Result<Encoded, DataError>> = match cached {
        Some(c) => c.into_iter().map(Ok).collect(),
        None => {
            let e: Vec<Result<Encoded, DataError>> = convs
                .par_iter()
                .map(|conv| encode_conversation(tok, &template, &conv.messages).map_err(|msg| DataError::At { at: conv.at.clone(), msg }))
                .collect();
            if let (Some(k), true) = (&key, e.iter().all(Result::is_ok)) {
                let ok: Vec<Encoded> = e.iter().filter_map(|r| r.as_ref().ok().cloned()).collect();
                // A cache that cannot be written only costs time next run.
                let _ = cache::store(&cache_dir, k, &ok);
            }
            e
        }
    };
    let mut out = Vec::with_capacity(convs.len());
    let mut counts = PrepareCounts::default();
    for (conv, enc) in convs.iter().zip(encoded) {
        let mut enc = enc?;
        if enc.ids.len() > d.max_len {
            match d.overlong {
                Overlong::Drop => {
                    counts.dropped_too_long += 1;
                    continue;
                }
                Overlong::Truncate => {
                    enc.ids.truncate(d.max_len);
                    enc.mask.truncate(d.max_len);
                    counts.truncated += 1;
                }
            }
        }
        // The first token is never a target: trainable tokens are masked positions after it.
        if enc.mask.iter().skip(1).all(|&m| m == 0) {
            if d.drop_untrainable {
                counts.dropped_untrainable += 1;
                continue;
            }
            let why = if counts.truncated > 0 && enc.ids.len() == d.max_len { " (after truncation to data.max_len)" } else { "" };
            return Err(DataError::At { at: conv.at.clone(), msg: format!("no trainable assistant tokens{why}; set data.drop_untrainable = true to drop such samples") }.into());
        }
        out.push(enc);
    }
    if out.is_empty() {
        bail!("{}: no usable samples ({counts:?}, data.max_len = {})", file.display(), d.max_len);
    }
    Ok((out, counts))
}

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
    /// For packed rows: the lengths of the samples in each row.
    pub segments: Option<Vec<Vec<usize>>>,
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
        MicroBatch { real_tokens, input, target, weight, b, t, segments: None }
    }

    /// Packed rows: every token of a row is an input; a target never crosses from one sample
    /// into the next.
    pub fn packed(rows: &[&Packed]) -> Self {
        let t = rows.iter().map(|r| r.ids.len()).max().unwrap_or(1).max(1);
        let b = rows.len();
        let (mut input, mut target, mut weight) = (vec![0i64; b * t], vec![0i64; b * t], vec![0f32; b * t]);
        let mut real_tokens = 0;
        for (i, r) in rows.iter().enumerate() {
            let mut start = 0;
            for &len in &r.segments {
                for o in 0..len {
                    let j = start + o;
                    input[i * t + j] = r.ids[j] as i64;
                    if o + 1 < len {
                        target[i * t + j] = r.ids[j + 1] as i64;
                        weight[i * t + j] = r.mask[j + 1] as f32;
                    }
                }
                real_tokens += len.saturating_sub(1);
                start += len;
            }
        }
        MicroBatch { real_tokens, input, target, weight, b, t, segments: Some(rows.iter().map(|r| r.segments.clone()).collect()) }
    }

    /// Tokens the loss is taken over.
    pub fn trainable(&self) -> usize {
        self.weight.iter().filter(|&&w| w > 0.0).count()
    }
}

/// Sum of masked token NLLs divided by `norm` (the trainable tokens of the whole accumulated
/// batch), and the number of correctly predicted trainable tokens. The vocabulary head and the
/// softmax run only on the trainable positions (the prompt's logits are never formed).
pub fn sft_loss<B: Kernels>(model: &Decoder<B>, mb: &MicroBatch, norm: f64) -> (Tensor<B, 1>, usize) {
    sft_loss_with(model, mb, norm, &mut |ids, segments| match segments {
        Some(s) => model.hidden_packed(ids, s),
        None => model.hidden(ids, None),
    })
}

/// As [`sft_loss`], with the hidden states from `hidden(ids, segments)`.
pub fn sft_loss_with<B: Kernels>(
    model: &Decoder<B>,
    mb: &MicroBatch,
    norm: f64,
    hidden: &mut dyn FnMut(Tensor<B, 2, Int>, Option<&[Vec<usize>]>) -> Tensor<B, 3>,
) -> (Tensor<B, 1>, usize) {
    let device = model.device();
    let (b, t) = (mb.b, mb.t);
    let positions: Vec<i64> = (0..b * t).filter(|&i| mb.weight[i] > 0.0).map(|i| i as i64).collect();
    let targets: Vec<i64> = positions.iter().map(|&i| mb.target[i as usize]).collect();
    let n = positions.len();
    let input = Tensor::<B, 2, Int>::from_data(TensorData::new(mb.input.clone(), [b, t]), &device);
    let hidden = hidden(input, mb.segments.as_deref());
    if n == 0 {
        return (hidden.sum() * 0.0, 0);
    }
    let logits = model.head_at(hidden, positions);
    let predicted: Vec<i64> = logits.clone().detach().argmax(2).into_data().convert::<i64>().to_vec().expect("ids");
    let correct = predicted.iter().zip(&targets).filter(|(p, t)| p == t).count();
    let target = Tensor::<B, 1, Int>::from_data(TensorData::new(targets, [n]), &device);
    let vocab = logits.dims()[2];
    let nll = crate::ops::token_logprobs(logits.reshape([n, vocab]), target).neg();
    (nll.sum() / norm, correct)
}

/// SFT over prepared samples, with an optional eval split.
pub struct Sft {
    pub train: Vec<Encoded>,
    /// With `data.packing`: the training samples packed into sequences of `data.max_len`; the
    /// loop then runs over these.
    pub packed: Option<Vec<Packed>>,
    pub eval: Option<Vec<Encoded>>,
    pub counts: PrepareCounts,
    pub micro_batch_size: usize,
    /// Recompute blocks in the backward (`train.gradient_checkpointing`).
    pub gradient_checkpointing: bool,
}

impl Sft {
    pub fn new(tok: &TextTokenizer, recipe: &Recipe) -> Result<Self> {
        let (train, counts) = prepare(tok, recipe, &recipe.data.train)?;
        let eval = match &recipe.data.eval {
            Some(f) => Some(prepare(tok, recipe, f)?.0),
            None => None,
        };
        let packed = recipe.data.packing.then(|| pack(&train, recipe.data.max_len));
        Ok(Sft { train, packed, eval, counts, micro_batch_size: recipe.train.micro_batch_size, gradient_checkpointing: recipe.train.gradient_checkpointing })
    }
}

/// Mean loss per trainable token of `data`, in batches.
pub fn mean_loss<B: Kernels>(model: &Decoder<B>, data: &[Encoded], batch: usize) -> f64 {
    let (mut nll, mut n) = (0.0, 0usize);
    for chunk in data.chunks(batch.max(1)) {
        let refs: Vec<&Encoded> = chunk.iter().collect();
        let mb = MicroBatch::new(&refs);
        let tokens = mb.trainable();
        let (loss, _) = sft_loss(model, &mb, 1.0);
        nll += super::scalar(loss);
        n += tokens;
    }
    nll / n.max(1) as f64
}

impl<B: TrainBackend> Objective<B> for Sft {
    fn len(&self) -> usize {
        self.packed.as_ref().map_or(self.train.len(), Vec::len)
    }

    fn data_counts(&self) -> PrepareCounts {
        self.counts
    }

    fn step(&mut self, model: &mut Decoder<B>, opt: &mut AdamW<B::InnerBackend>, micro: &[Vec<usize>], lr: f64, max_grad_norm: f64) -> StepReport {
        let batches: Vec<MicroBatch> = micro
            .iter()
            .map(|idx| match &self.packed {
                Some(p) => MicroBatch::packed(&idx.iter().map(|&i| &p[i]).collect::<Vec<_>>()),
                None => MicroBatch::new(&idx.iter().map(|&i| &self.train[i]).collect::<Vec<_>>()),
            })
            .collect();
        let tokens: usize = batches.iter().map(MicroBatch::trainable).sum();
        let norm = tokens.max(1) as f64;
        let mut correct = 0;
        let (loss, grad_norm) = train_step(
            model,
            opt,
            batches.len(),
            |m, fwd, k| {
                let m: &Decoder<B> = m;
                let (l, c) = sft_loss_with(m, &batches[k], norm, &mut |ids, segments| fwd.hidden(m, ids, segments));
                correct += c;
                l
            },
            lr,
            max_grad_norm,
            self.gradient_checkpointing,
        );
        let mut metrics = Map::new();
        metrics.insert("loss".into(), loss.into());
        metrics.insert("mean_token_accuracy".into(), (correct as f64 / tokens.max(1) as f64).into());
        StepReport { loss, grad_norm, input_tokens: batches.iter().map(|b| b.real_tokens).sum(), metrics }
    }

    fn evaluate(&mut self, model: &mut Decoder<B::InnerBackend>) -> Option<Map<String, Value>> {
        let l = mean_loss(model, self.eval.as_ref()?, self.micro_batch_size);
        let Value::Object(m) = json!({ "eval_loss": l }) else { unreachable!() };
        Some(m)
    }
}
