//! Assistant-only next-token loss of a model over a ChatML dataset.

use burn::prelude::*;
use burn::tensor::activation::log_softmax;
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

/// Per-token log-probabilities of `ids[1..]` given their prefixes: `out[j-1] = log p(ids[j] | ids[..j])`.
pub fn token_logprobs<B: Backend>(model: &Decoder<B>, ids: &[u32]) -> Vec<f32> {
    let device = model.device();
    let t = ids.len();
    if t < 2 {
        return vec![];
    }
    let input = Tensor::<B, 2, Int>::from_data(
        TensorData::new(ids[..t - 1].iter().map(|&x| x as i64).collect::<Vec<_>>(), [1, t - 1]),
        &device,
    );
    let targets = Tensor::<B, 3, Int>::from_data(
        TensorData::new(ids[1..].iter().map(|&x| x as i64).collect::<Vec<_>>(), [1, t - 1, 1]),
        &device,
    );
    let logp = log_softmax(model.forward(input, None), 2).gather(2, targets);
    logp.into_data().convert::<f32>().to_vec().expect("f32 log-probs")
}

/// NLL sum and token count of one encoded sample.
pub fn sample_nll<B: Backend>(model: &Decoder<B>, enc: &Encoded) -> (f64, usize) {
    let lp = token_logprobs(model, &enc.ids);
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

/// Scores every conversation (errors name the record's `file:line`).
pub fn evaluate<B: Backend>(
    model: &Decoder<B>,
    tok: &TextTokenizer,
    template: &ChatTemplate,
    data: &[Conversation],
    max_len: Option<usize>,
) -> anyhow::Result<EvalReport> {
    let mut per_sample = Vec::with_capacity(data.len());
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
        per_sample.push(sample_nll(model, &enc));
    }
    let nll: f64 = per_sample.iter().map(|s| s.0).sum();
    let tokens: usize = per_sample.iter().map(|s| s.1).sum();
    let loss = if tokens > 0 { nll / tokens as f64 } else { f64::NAN };
    Ok(EvalReport { loss, tokens, samples: per_sample.len(), perplexity: loss.exp(), input_tokens, truncated, per_sample })
}
