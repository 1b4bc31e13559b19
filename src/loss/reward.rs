//! Reward models: TRL 1.16 RewardTrainer's pairwise loss and metrics over the scores a
//! sequence-classification model gives each side of a preference pair (`Decoder::sequence_scores`,
//! at the rightmost non-pad token).
//!
//! `loss = mean(−log σ(r_c − r_r − margin)) + c · mean((r_c + r_r)²)` with `c` TRL's
//! `center_rewards_coefficient` (the square of each pair's sum). Metrics: `accuracy` (share of
//! pairs with r_c > r_r, strict), `margin` (mean r_c − r_r), `min_reward`, `mean_reward`,
//! `max_reward` over all 2N rewards, `num_tokens` (the sides' tokens); the margin column and the
//! centering term do not enter them.

use crate::ops::SumAll;
use burn::prelude::*;
use burn::tensor::{Int, TensorData};
use serde_json::{Map, Value};

use crate::data::preference::EncodedPair;
use crate::model::Decoder;
use crate::ops::Kernels;

/// RewardTrainer's settings.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RewardConfig {
    pub center_rewards_coefficient: Option<f64>,
}

/// One pair's rewards and its margin (0 without a margin column).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PairRewards {
    pub chosen: f64,
    pub rejected: f64,
    pub margin: f64,
}

/// `−log σ(x)`, stable for large |x|.
fn neg_log_sigmoid(x: f64) -> f64 {
    if x > 0.0 {
        (-x).exp().ln_1p()
    } else {
        -x + x.exp().ln_1p()
    }
}

impl RewardConfig {
    /// The loss of `pairs`.
    pub fn loss(&self, pairs: &[PairRewards]) -> f64 {
        let n = pairs.len().max(1) as f64;
        let mut loss = pairs.iter().map(|p| neg_log_sigmoid(p.chosen - p.rejected - p.margin)).sum::<f64>() / n;
        if let Some(c) = self.center_rewards_coefficient {
            loss += c * pairs.iter().map(|p| (p.chosen + p.rejected).powi(2)).sum::<f64>() / n;
        }
        loss
    }

    /// The summed loss of a batch's pairs as a tensor (the caller divides by the step's pairs):
    /// `Σ −log σ(r_c − r_r − m) + c · Σ (r_c + r_r)²`.
    ///
    /// # Shapes
    /// `chosen`, `rejected`: `[n]`, `margins`: n → `[1]`
    pub fn loss_tensor<B: Backend>(&self, chosen: Tensor<B, 1>, rejected: Tensor<B, 1>, margins: &[f64]) -> Tensor<B, 1> {
        let n = margins.len();
        let m = Tensor::<B, 1>::from_data(TensorData::new(margins.iter().map(|&x| x as f32).collect::<Vec<_>>(), [n]), &chosen.device());
        let mut loss = -burn::tensor::activation::log_sigmoid(chosen.clone() - rejected.clone() - m).sum_all();
        if let Some(c) = self.center_rewards_coefficient {
            loss = loss + (chosen + rejected).powi_scalar(2).sum_all() * c;
        }
        loss
    }

    /// The loss and TRL's metrics, names prefixed with `prefix` (`eval_`).
    pub fn metrics(&self, pairs: &[PairRewards], num_tokens: usize, prefix: &str) -> Map<String, Value> {
        let n = pairs.len().max(1) as f64;
        let all: Vec<f64> = pairs.iter().map(|p| p.chosen).chain(pairs.iter().map(|p| p.rejected)).collect();
        let mut m = Map::new();
        let mut put = |k: &str, v: f64| {
            m.insert(format!("{prefix}{k}"), v.into());
        };
        put("loss", self.loss(pairs));
        put("accuracy", pairs.iter().filter(|p| p.chosen > p.rejected).count() as f64 / n);
        put("margin", pairs.iter().map(|p| p.chosen - p.rejected).sum::<f64>() / n);
        put("min_reward", all.iter().copied().fold(f64::INFINITY, f64::min));
        put("mean_reward", all.iter().sum::<f64>() / all.len().max(1) as f64);
        put("max_reward", all.iter().copied().fold(f64::NEG_INFINITY, f64::max));
        put("num_tokens", num_tokens as f64);
        m
    }
}

/// Pairs per scoring forward (their chosen and rejected sides together).
pub const SCORE_BATCH: usize = 8;

/// The rewards of `sequences`, label 0's score, each read where transformers reads an unpadded
/// sequence ([`Decoder::scored_position`]): a batch right-padded with the pad id (or 0), never
/// read at the padding, whether or not the model has a pad id.
pub fn sequence_rewards<B: Kernels>(model: &Decoder<B>, sequences: &[&[u32]]) -> Vec<f64> {
    let (ids, positions) = score_batch(model, sequences, &model.device());
    let scores = model.scores_at(model.hidden(ids, None), positions);
    let labels = scores.dims()[1];
    let v: Vec<f64> = scores.into_data().convert::<f64>().to_vec().expect("f64 scores");
    v.chunks(labels).map(|row| row[0]).collect()
}

/// `sequences` right-padded into one batch `[n, T]` with the pad id (or 0), and the flat
/// position each is scored at.
pub fn score_batch<B: Backend>(model: &Decoder<impl Kernels>, sequences: &[&[u32]], device: &B::Device) -> (Tensor<B, 2, Int>, Vec<i64>) {
    let t = sequences.iter().map(|s| s.len()).max().unwrap_or(1).max(1);
    let pad = model.config.pad_token_id.unwrap_or(0) as i64;
    let mut flat = vec![pad; sequences.len() * t];
    let mut positions = Vec::with_capacity(sequences.len());
    for (i, s) in sequences.iter().enumerate() {
        let row: Vec<i64> = s.iter().map(|&x| x as i64).collect();
        flat[i * t..i * t + row.len()].copy_from_slice(&row);
        positions.push((i * t + model.scored_position(&row)) as i64);
    }
    (Tensor::from_data(TensorData::new(flat, [sequences.len(), t]), device), positions)
}

/// Each pair's rewards and margin, scored [`SCORE_BATCH`] pairs at a time.
pub fn score_pairs<B: Kernels>(model: &Decoder<B>, pairs: &[EncodedPair]) -> Vec<PairRewards> {
    let mut out = Vec::with_capacity(pairs.len());
    for chunk in pairs.chunks(SCORE_BATCH) {
        let sides: Vec<&[u32]> = chunk.iter().map(|p| p.chosen.ids.as_slice()).chain(chunk.iter().map(|p| p.rejected.ids.as_slice())).collect();
        let r = sequence_rewards(model, &sides);
        let n = chunk.len();
        out.extend((0..n).map(|i| PairRewards { chosen: r[i], rejected: r[n + i], margin: chunk[i].margin }));
    }
    out
}

/// Why a reward model could not be loaded or could not score.
#[derive(Debug, thiserror::Error)]
pub enum RewardModelError {
    #[error(transparent)]
    Load(#[from] crate::model::LoadError),
    #[error(transparent)]
    Adapter(#[from] crate::formats::peft::PeftError),
    #[error(transparent)]
    Tokenizer(#[from] crate::data::tokenizer::TokenizerError),
    #[error("{}: not a reward model: no score head (config.json is not a *ForSequenceClassification with num_labels, and no adapter brings a trained `score`)", dir.display())]
    NoScoreHead { dir: std::path::PathBuf },
    #[error("{}: rendering its chat template: {msg}", dir.display())]
    Template { dir: std::path::PathBuf, msg: String },
}

/// A reward model ready to score conversations: a sequence classifier (with its adapter), its
/// own tokenizer and chat template. A conversation is rendered whole (no generation prompt),
/// tokenized without added special tokens and scored at its last token, as TRL's GRPOTrainer
/// scores completions with a reward model.
pub struct RewardModel<B: Kernels> {
    pub model: Decoder<B>,
    pub tok: crate::data::tokenizer::TextTokenizer,
    pub template: crate::data::template::ChatTemplate,
    pub dir: std::path::PathBuf,
}

impl<B: Kernels> RewardModel<B> {
    /// Loads `dir` (a `*ForSequenceClassification` checkpoint, or a causal LM with a SEQ_CLS
    /// `adapter`) and its tokenizer; `template` picks the chat template.
    pub fn load(dir: &std::path::Path, adapter: Option<&std::path::Path>, template: crate::data::tokenizer::TemplateChoice, device: &B::Device) -> Result<Self, RewardModelError> {
        let mut model = crate::model::load::<B>(dir, device, Default::default())?;
        if let Some(a) = adapter {
            crate::adapters::peft::PeftAdapter::open(a)?.attach(&mut model)?;
        }
        if model.score.is_none() {
            return Err(RewardModelError::NoScoreHead { dir: adapter.unwrap_or(dir).into() });
        }
        let tok = crate::data::tokenizer::TextTokenizer::from_dir(dir)?;
        let template = tok.template(template)?;
        Ok(RewardModel { model, tok, template, dir: dir.into() })
    }

    /// The rendering of a conversation the model scores.
    pub fn render(&self, messages: &[crate::data::conversation::Message]) -> Result<String, RewardModelError> {
        self.template.render(messages, false).map_err(|e| RewardModelError::Template { dir: self.dir.clone(), msg: format!("{e:#}") })
    }

    /// The rewards of `texts` (already rendered), [`SCORE_BATCH`]·2 at a time, in order.
    pub fn score_texts(&self, texts: &[String]) -> Result<Vec<f64>, RewardModelError> {
        let ids: Vec<Vec<u32>> = texts.iter().map(|t| Ok(self.tok.encode(t)?.get_ids().to_vec())).collect::<Result<_, RewardModelError>>()?;
        // Similar lengths batched together: less padding.
        let mut order: Vec<usize> = (0..ids.len()).collect();
        order.sort_by_key(|&i| ids[i].len());
        let mut out = vec![0.0; ids.len()];
        for chunk in order.chunks(2 * SCORE_BATCH) {
            let seqs: Vec<&[u32]> = chunk.iter().map(|&i| ids[i].as_slice()).collect();
            for (&i, r) in chunk.iter().zip(sequence_rewards(&self.model, &seqs)) {
                out[i] = r;
            }
        }
        Ok(out)
    }

    /// The rewards of whole conversations.
    pub fn score_conversations(&self, conversations: &[Vec<crate::data::conversation::Message>]) -> Result<Vec<f64>, RewardModelError> {
        let texts = conversations.iter().map(|c| self.render(c)).collect::<Result<Vec<_>, _>>()?;
        self.score_texts(&texts)
    }
}
