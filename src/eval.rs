//! `ft eval`: a model's (+ adapter's) mean next-token loss over the assistant tokens of a ChatML
//! dataset ([`evaluate`]), or its DPO metrics on preference pairs ([`evaluate_dpo`]). The maths
//! is `loss::nll` and `loss::dpo`, the same code training's eval runs.

use std::path::Path;

use crate::data::conversation::{Conversation, DataError};
use crate::data::encode::{encode_chat, Encoded};
use crate::data::prepare::{self, Overlong, PrepareError, PrepareOptions};
use crate::data::template::ChatTemplate;
use crate::data::tokenizer::TextTokenizer;
use crate::loss::dpo::{score_pairs, DpoConfig, LossType, PairLogps, SideLogps};
use crate::loss::nll;
use crate::model::Decoder;
use crate::ops::Kernels;

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
    /// Mixture-of-experts models: per sparse layer, the fraction of routed choices each expert
    /// got (load balance; every position run, padding included).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub router_load: Option<Vec<Vec<f64>>>,
}

/// Why `ft eval` has no loss to report.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error(transparent)]
    Data(#[from] DataError),
    /// A NaN or infinite loss: the model or adapter computes non-finite values (exit 1).
    #[error("the loss is {loss}: the model (or adapter) computes non-finite values; check its weights")]
    NonFinite { loss: f64 },
    /// A reward objective on a model without a score head (not `*ForSequenceClassification`).
    #[error("the model has no score head: a reward model is a `*ForSequenceClassification` checkpoint (config.json `architectures`)")]
    NoScoreHead,
}

/// Scores every conversation (errors name the record's `file:line`). Samples longer than
/// `max_len` are cut (and counted). A non-finite loss is an error, never a number to report.
pub fn evaluate<B: Kernels>(
    model: &Decoder<B>,
    tok: &TextTokenizer,
    template: &ChatTemplate,
    data: &[Conversation],
    max_len: Option<usize>,
) -> Result<EvalReport, EvalError> {
    let (encoded, truncated, input_tokens) = encode_all(tok, template, data, max_len)?;
    model.take_router_load();
    let r = nll::evaluate(model, &encoded);
    if !r.loss.is_finite() {
        return Err(EvalError::NonFinite { loss: r.loss });
    }
    let router_load = model.take_router_load();
    Ok(EvalReport { loss: r.loss, tokens: r.tokens, samples: encoded.len(), perplexity: r.loss.exp(), input_tokens, truncated, per_sample: r.per_sample, router_load })
}

/// What `ft eval --objective distill` reports.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DistillEvalReport {
    /// The divergence's mean over the scored positions (TRL's reduction).
    pub loss: f64,
    pub tokens: usize,
    pub samples: usize,
    /// Per sample, the mean over its own positions.
    pub per_sample: Vec<f64>,
    pub truncated: usize,
}

/// The divergence of `student` from `teacher` over the conversations' assistant tokens.
pub fn evaluate_distill<B: Kernels>(
    student: &Decoder<B>,
    teacher: &Decoder<B>,
    tok: &TextTokenizer,
    template: &ChatTemplate,
    data: &[Conversation],
    max_len: Option<usize>,
    config: &crate::loss::distill::DistillConfig,
) -> Result<DistillEvalReport, EvalError> {
    let (encoded, truncated, _) = encode_all(tok, template, data, max_len)?;
    let r = crate::loss::distill::evaluate(student, teacher, &encoded, config);
    if !r.loss.is_finite() {
        return Err(EvalError::NonFinite { loss: r.loss });
    }
    let per_sample = r.per_sample.iter().map(|(s, n)| s / (*n).max(1) as f64).collect();
    Ok(DistillEvalReport { loss: r.loss, tokens: r.tokens, samples: encoded.len(), per_sample, truncated })
}

/// Every conversation encoded (errors name the record's `file:line`), cut to `max_len`; with the
/// count of cut samples and of input tokens.
fn encode_all(tok: &TextTokenizer, template: &ChatTemplate, data: &[Conversation], max_len: Option<usize>) -> Result<(Vec<Encoded>, usize, usize), EvalError> {
    let mut encoded: Vec<Encoded> = Vec::with_capacity(data.len());
    let (mut truncated, mut input_tokens) = (0, 0);
    for conv in data {
        let at = || conv.at.clone();
        let mut enc = encode_chat(tok, template, &conv.messages, conv.tools.as_ref()).map_err(|e| e.at(at()))?;
        if let Some(m) = max_len.filter(|&m| enc.ids.len() > m) {
            enc.ids.truncate(m);
            enc.mask.truncate(m);
            truncated += 1;
        }
        if enc.trainable() == 0 {
            return Err(DataError::At { at: at(), msg: "the conversation has no assistant tokens to score (after max_len)".into() }.into());
        }
        input_tokens += enc.ids.len();
        encoded.push(enc);
    }
    Ok((encoded, truncated, input_tokens))
}

/// What `ft eval --objective dpo` reports.
pub struct DpoReport {
    /// TRL's metrics for `config` (`loss`, `rewards/*`, `logps/*`).
    pub metrics: serde_json::Map<String, serde_json::Value>,
    /// `loss` under every loss type.
    pub losses: serde_json::Map<String, serde_json::Value>,
    pub pairs: Vec<crate::data::preference::EncodedPair>,
    pub logps: Vec<PairLogps>,
    /// Pairs dropped for exceeding `max_len`.
    pub dropped: usize,
    pub warnings: Vec<String>,
}

/// DPO metrics of `model` on the preference pairs of `data`, the adapter-disabled model as
/// reference. Pairs longer than `max_len` are dropped (and counted).
pub fn evaluate_dpo<B: Kernels>(
    model: &mut Decoder<B>,
    tok: &TextTokenizer,
    template: &ChatTemplate,
    data: &Path,
    config: DpoConfig,
    max_len: Option<usize>,
    max_prompt_len: Option<usize>,
) -> Result<DpoReport, PrepareError> {
    let opts = PrepareOptions { max_len: max_len.unwrap_or(usize::MAX), overlong: Overlong::Drop, drop_untrainable: false, max_prompt_len, cache: None };
    let (pairs, dropped, warnings) = prepare::pairs(tok, template, data, &opts)?;
    let logps = score_pairs(model, &pairs, None);
    let metrics = config.metrics(&logps, "");
    let losses = LossType::ALL
        .iter()
        .map(|&loss_type| (loss_type.name().to_string(), DpoConfig { loss_type, ..config }.metrics(&logps, "")["loss"].clone()))
        .collect();
    Ok(DpoReport { metrics, losses, pairs, logps, dropped, warnings })
}

/// A reference-free preference objective's loss and metrics on a file of pairs.
pub struct RefFreeReport {
    pub metrics: serde_json::Map<String, serde_json::Value>,
    pub pairs: usize,
    pub dropped: usize,
    pub warnings: Vec<String>,
}

/// ORPO, CPO or SimPO of `model` on the preference pairs of `data` (no reference).
pub fn evaluate_ref_free<B: Kernels>(
    model: &Decoder<B>,
    tok: &TextTokenizer,
    template: &ChatTemplate,
    data: &Path,
    objective: crate::loss::ref_free::RefFree,
    max_len: Option<usize>,
    max_prompt_len: Option<usize>,
) -> Result<RefFreeReport, PrepareError> {
    let opts = PrepareOptions { max_len: max_len.unwrap_or(usize::MAX), overlong: Overlong::Drop, drop_untrainable: false, max_prompt_len, cache: None };
    let (pairs, dropped, warnings) = prepare::pairs(tok, template, data, &opts)?;
    let scores = crate::loss::ref_free::score_pairs(model, &pairs, &objective);
    Ok(RefFreeReport { metrics: objective.metrics(&scores, ""), pairs: pairs.len(), dropped, warnings })
}

/// A reward model's (TRL RewardTrainer's) loss and metrics on prepared preference pairs.
pub fn evaluate_reward<B: Kernels>(
    model: &Decoder<B>,
    pairs: &[crate::data::preference::EncodedPair],
    config: crate::loss::reward::RewardConfig,
) -> Result<serde_json::Map<String, serde_json::Value>, EvalError> {
    if model.score.is_none() {
        return Err(EvalError::NoScoreHead);
    }
    let rewards = crate::loss::reward::score_pairs(model, pairs);
    let tokens: usize = pairs.iter().map(|p| p.chosen.ids.len() + p.rejected.ids.len()).sum();
    let metrics = config.metrics(&rewards, tokens, "");
    if !metrics["loss"].as_f64().is_some_and(f64::is_finite) {
        return Err(EvalError::NonFinite { loss: metrics["loss"].as_f64().unwrap_or(f64::NAN) });
    }
    Ok(metrics)
}

/// KTO's loss and metrics on a file of rows.
pub struct KtoReport {
    pub metrics: serde_json::Map<String, serde_json::Value>,
    pub rows: usize,
    pub dropped: usize,
    /// The mean KL estimate before the clamp at 0.
    pub kl_unclamped: f64,
}

/// KTO of `model` on the rows of `data` (TRL's unpaired format, or pairs unpaired as TRL does),
/// the reference being the adapter-disabled model; KL estimates over batches of `kl_batch` rows
/// (all rows in one when `None`).
pub fn evaluate_kto<B: Kernels>(
    model: &mut Decoder<B>,
    tok: &TextTokenizer,
    template: &ChatTemplate,
    data: &Path,
    config: crate::loss::kto::KtoConfig,
    max_len: Option<usize>,
    kl_batch: Option<usize>,
) -> Result<KtoReport, PrepareError> {
    let opts = PrepareOptions { max_len: max_len.unwrap_or(usize::MAX), overlong: Overlong::Drop, drop_untrainable: false, max_prompt_len: None, cache: None };
    let block = kl_batch.unwrap_or(usize::MAX);
    let (rows, dropped) = prepare::kto(tok, template, data, &opts, block)?;
    let scored = crate::loss::kto::score_rows(model, &rows, block);
    let kl_unclamped = scored.iter().map(|b| b.2).sum::<f64>() / scored.len().max(1) as f64;
    let batches: Vec<_> = scored.into_iter().map(|(r, kl, _)| (r, kl)).collect();
    Ok(KtoReport { metrics: config.metrics(&batches, ""), rows: rows.len(), dropped, kl_unclamped })
}

/// GRPO's loss and metrics on fixed groups of completions.
pub struct GrpoReport {
    pub metrics: serde_json::Map<String, serde_json::Value>,
    pub advantages: Vec<f64>,
    pub groups: usize,
}

/// GRPO of `model` on groups of already sampled and scored completions (no sampling): per-token
/// log-probs of the policy and of the reference (adapters off, or `--reference-adapter`), the
/// advantages and the loss of one generation batch, as TRL computes them. `max_completion_length`
/// (for `dr_grpo`) defaults to the longest completion.
pub fn evaluate_grpo<B: Kernels>(
    model: &mut Decoder<B>,
    tok: &TextTokenizer,
    template: &ChatTemplate,
    data: &Path,
    mut config: crate::loss::grpo::GrpoConfig,
    weights: &[(String, f64)],
    max_completion_length: Option<usize>,
) -> Result<GrpoReport, PrepareError> {
    use crate::loss::grpo::ScoredCompletion;
    let groups = crate::data::groups::read_groups(data)?;
    let mut samples = Vec::new();
    let mut meta = Vec::new();
    for g in &groups {
        let (enc, prompt_tokens) = crate::data::groups::encode_group(tok, template, g).map_err(|e| e.at(g.at.clone()))?;
        for (e, c) in enc.into_iter().zip(&g.completions) {
            meta.push((prompt_tokens, c.truncated, c.rewards.clone()));
            samples.push(e);
        }
    }
    let mut scored = Vec::with_capacity(samples.len());
    for (chunk, meta) in samples.chunks(8).zip(meta.chunks(8)) {
        let refs: Vec<&Encoded> = chunk.iter().collect();
        let policy = crate::loss::nll::token_logps(model, &refs);
        let stats = crate::loss::nll::sample_stats(model, &refs);
        model.set_reference(true);
        let reference = crate::loss::nll::token_logps(model, &refs);
        model.set_reference(false);
        for (((p, r), s), (prompt_tokens, truncated, rewards)) in policy.into_iter().zip(reference).zip(stats).zip(meta) {
            scored.push(ScoredCompletion { policy: p, reference: r, old: None, entropy: s.entropy, prompt_tokens: *prompt_tokens, truncated: *truncated, rewards: rewards.clone() });
        }
    }
    config.max_completion_length = max_completion_length.unwrap_or_else(|| scored.iter().map(|c| c.policy.len()).max().unwrap_or(1));
    let (metrics, advantages) = config.metrics(&scored, groups[0].completions.len(), weights);
    Ok(GrpoReport { metrics, advantages, groups: groups.len() })
}

/// One pair's side as `--per-pair` prints it: ids, completion positions and log-probs.
pub fn side_json(e: &Encoded, s: &SideLogps) -> serde_json::Value {
    let positions: Vec<usize> = (0..e.mask.len()).filter(|&j| e.mask[j] == 1).collect();
    serde_json::json!({"input_ids": e.ids, "completion_positions": positions, "logp_policy": s.policy, "logp_ref": s.reference, "tokens": s.tokens})
}
