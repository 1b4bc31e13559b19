//! Assistant-only next-token loss of a model over a ChatML dataset.

use crate::backend::Kernels;
use burn::prelude::*;
use burn::tensor::{Int, TensorData};

use crate::data::conversation::Conversation;
use crate::data::encode::{encode_conversation, Encoded};
use crate::data::template::ChatTemplate;
use crate::model::Decoder;
use crate::tokenizer::TextTokenizer;

/// Loss report, as `ft eval --json` prints it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct EvalReport {
    /// Mean negative log-likelihood per scored token.
    pub loss: f64,
    /// Scored (assistant) tokens.
    pub tokens: usize,
    pub samples: usize,
    pub perplexity: f64,
    /// All tokens run through the model (prompt and completion).
    pub input_tokens: usize,
    /// Samples cut to `max_len` tokens.
    pub truncated: usize,
    /// Per sample: (NLL sum, scored tokens).
    #[serde(skip)]
    pub per_sample: Vec<(f64, usize)>,
}

/// Per-token log-probabilities of a batch of sequences: `out[i][j-1] = log p(seqs[i][j] | seqs[i][..j])`.
///
/// Sequences are right-padded into one forward pass; with a causal mask, padding after a
/// sequence cannot change its logits, so every value equals the unbatched one.
pub fn batch_logprobs<B: Kernels>(model: &Decoder<B>, seqs: &[&[u32]]) -> Vec<Vec<f32>> {
    let device = model.device();
    let t = seqs.iter().map(|s| s.len()).max().unwrap_or(0);
    if t < 2 {
        return seqs.iter().map(|_| vec![]).collect();
    }
    let b = seqs.len();
    let mut input = vec![0i64; b * (t - 1)];
    let mut target = vec![0i64; b * (t - 1)];
    for (i, s) in seqs.iter().enumerate() {
        for j in 0..s.len().saturating_sub(1) {
            input[i * (t - 1) + j] = s[j] as i64;
            target[i * (t - 1) + j] = s[j + 1] as i64;
        }
    }
    let input = Tensor::<B, 2, Int>::from_data(TensorData::new(input, [b, t - 1]), &device);
    let target = Tensor::<B, 1, Int>::from_data(TensorData::new(target, [b * (t - 1)]), &device);
    let logits = model.forward(input, None);
    let vocab = logits.dims()[2];
    let logp: Vec<f32> = crate::ops::token_logprobs(logits.reshape([b * (t - 1), vocab]), target).into_data().convert::<f32>().to_vec().expect("f32 log-probs");
    seqs.iter()
        .enumerate()
        .map(|(i, s)| logp[i * (t - 1)..i * (t - 1) + s.len().saturating_sub(1)].to_vec())
        .collect()
}

/// Per-token log-probabilities of `ids[1..]` given their prefixes: `out[j-1] = log p(ids[j] | ids[..j])`.
pub fn token_logprobs<B: Kernels>(model: &Decoder<B>, ids: &[u32]) -> Vec<f32> {
    batch_logprobs(model, &[ids]).pop().unwrap_or_default()
}

fn masked_nll(enc: &Encoded, lp: &[f32]) -> (f64, usize) {
    let mut nll = 0.0;
    let mut n = 0;
    for (j, &m) in enc.mask.iter().enumerate().skip(1) {
        if m == 1 {
            nll -= lp[j - 1] as f64;
            n += 1;
        }
    }
    (nll, n)
}

/// NLL sum and token count of one encoded sample.
pub fn sample_nll<B: Kernels>(model: &Decoder<B>, enc: &Encoded) -> (f64, usize) {
    masked_nll(enc, &token_logprobs(model, &enc.ids))
}

/// A right-padded batch of encoded samples (`input[i, j] = ids[j]`) and the flat positions
/// `i · T + j` whose next token `ids[j + 1]` is scored (mask 1), with that target and its sample.
pub struct ScoredBatch {
    pub input: Vec<i64>,
    pub b: usize,
    pub t: usize,
    pub positions: Vec<i64>,
    pub targets: Vec<i64>,
    pub owner: Vec<usize>,
}

impl ScoredBatch {
    pub fn new(encs: &[&Encoded]) -> Self {
        let t = encs.iter().map(|e| e.ids.len()).max().unwrap_or(0).saturating_sub(1).max(1);
        let b = encs.len();
        let mut input = vec![0i64; b * t];
        let (mut positions, mut targets, mut owner) = (Vec::new(), Vec::new(), Vec::new());
        for (i, e) in encs.iter().enumerate() {
            for j in 0..e.ids.len().saturating_sub(1) {
                input[i * t + j] = e.ids[j] as i64;
                if e.mask[j + 1] == 1 {
                    positions.push((i * t + j) as i64);
                    targets.push(e.ids[j + 1] as i64);
                    owner.push(i);
                }
            }
        }
        ScoredBatch { input, b, t, positions, targets, owner }
    }

    /// `log p(target)` at every scored position, `[n, 1]`: the head runs only there (right
    /// padding cannot change the logits of real tokens).
    pub fn logprobs<B: Kernels>(self, model: &Decoder<B>) -> Tensor<B, 2> {
        self.logprobs_with(model, &mut |ids| model.hidden(ids, None))
    }

    /// As [`Self::logprobs`], with the hidden states from `hidden` (training passes its
    /// `Forward`, which may recompute blocks in the backward).
    pub fn logprobs_with<B: Kernels>(self, model: &Decoder<B>, hidden: &mut dyn FnMut(Tensor<B, 2, Int>) -> Tensor<B, 3>) -> Tensor<B, 2> {
        let device = model.device();
        let n = self.positions.len();
        let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(self.input, [self.b, self.t]), &device);
        let target = Tensor::<B, 1, Int>::from_data(TensorData::new(self.targets, [n]), &device);
        let logits = model.head_at(hidden(ids), self.positions);
        let vocab = logits.dims()[2];
        crate::ops::token_logprobs(logits.reshape([n, vocab]), target).reshape([n, 1])
    }
}

/// NLL sums and scored-token counts of a batch of encoded samples.
pub fn batch_masked_nll<B: Kernels>(model: &Decoder<B>, encs: &[&Encoded]) -> Vec<(f64, usize)> {
    let batch = ScoredBatch::new(encs);
    let mut out = vec![(0.0, 0); encs.len()];
    if batch.positions.is_empty() {
        return out;
    }
    let owner = batch.owner.clone();
    let logp: Vec<f32> = batch.logprobs(model).into_data().convert::<f32>().to_vec().expect("f32 log-probs");
    for (k, &i) in owner.iter().enumerate() {
        out[i].0 -= logp[k] as f64;
        out[i].1 += 1;
    }
    out
}

/// Padded tokens per eval forward pass (length-sorted batches keep padding small).
const EVAL_BATCH_TOKENS: usize = 4096;

/// Scores every conversation (errors name the record's `file:line`).
pub fn evaluate<B: Kernels>(
    model: &Decoder<B>,
    tok: &TextTokenizer,
    template: &ChatTemplate,
    data: &[Conversation],
    max_len: Option<usize>,
) -> anyhow::Result<EvalReport> {
    let mut encoded = Vec::with_capacity(data.len());
    let mut truncated = 0;
    let mut input_tokens = 0;
    for conv in data {
        let mut enc = encode_conversation(tok, template, &conv.messages).map_err(|e| anyhow::anyhow!("{}: {e}", conv.at))?;
        if let Some(m) = max_len {
            if enc.ids.len() > m {
                enc.ids.truncate(m);
                enc.mask.truncate(m);
                truncated += 1;
            }
        }
        if enc.trainable() == 0 {
            anyhow::bail!("{}: the conversation has no assistant tokens to score (after max_len)", conv.at);
        }
        input_tokens += enc.ids.len();
        encoded.push(enc);
    }
    // Length-sorted batches; results go back in input order.
    let mut order: Vec<usize> = (0..encoded.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(encoded[i].ids.len()));
    let mut per_sample = vec![(0.0, 0); encoded.len()];
    let mut k = 0;
    while k < order.len() {
        let longest = encoded[order[k]].ids.len().max(1);
        let n = (EVAL_BATCH_TOKENS / longest).clamp(1, 64).min(order.len() - k);
        let batch = &order[k..k + n];
        let encs: Vec<&Encoded> = batch.iter().map(|&i| &encoded[i]).collect();
        for (&i, r) in batch.iter().zip(batch_masked_nll(model, &encs)) {
            per_sample[i] = r;
        }
        k += n;
    }
    let nll: f64 = per_sample.iter().map(|s| s.0).sum();
    let tokens: usize = per_sample.iter().map(|s| s.1).sum();
    let loss = if tokens > 0 { nll / tokens as f64 } else { f64::NAN };
    Ok(EvalReport { loss, tokens, samples: encoded.len(), perplexity: loss.exp(), input_tokens, truncated, per_sample })
}
