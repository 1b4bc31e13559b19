//! Knowledge distillation from a frozen teacher of the same tokenizer, as TRL's GKD computes it
//! (`GKDTrainer.generalized_jsd_loss`): at every scored position of a batch (the SFT
//! convention: the predictions of the assistant tokens and their end-of-turn token), with
//! `p = softmax(logits / T)` for both models,
//!
//! | divergence | per token |
//! |---|---|
//! | `forward_kl` | KL(teacher ‖ student) = Σ_v p_t (log p_t − log p_s) |
//! | `reverse_kl` | KL(student ‖ teacher) |
//! | `jsd` (β) | β·KL(teacher ‖ m) + (1 − β)·KL(student ‖ m), m = β p_t + (1 − β) p_s; β 0 is `forward_kl` and β 1 `reverse_kl` (TRL special-cases both) |
//!
//! reduced as TRL does: the sum over positions divided by the scored positions of the whole
//! (accumulated) batch. No T² factor. The teacher's logits are formed a chunk of positions at a
//! time ([`chunk_rows`]), never for the whole batch × vocabulary.

use crate::ops::SumAll;
use burn::prelude::*;
use burn::tensor::activation::log_softmax;
use burn::tensor::{DType, Int, TensorData};
use serde::{Deserialize, Serialize};

use std::path::{Path, PathBuf};

use crate::data::batch::Batch;
use crate::data::encode::Encoded;
use crate::data::tokenizer::{TextTokenizer, TokenizerError};
use crate::model::{Decoder, LoadOptions, ModelConfig};
use crate::ops::Kernels;

/// Which divergence between the teacher's and the student's next-token distributions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Divergence {
    #[value(name = "forward_kl")]
    ForwardKl,
    #[value(name = "reverse_kl")]
    ReverseKl,
    Jsd,
}

/// The distillation loss's settings (TRL GKD's `beta`; `temperature` divides both models' logits).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DistillConfig {
    pub divergence: Divergence,
    pub beta: f64,
    pub temperature: f64,
}

impl Default for DistillConfig {
    fn default() -> Self {
        DistillConfig { divergence: Divergence::Jsd, beta: 0.5, temperature: 1.0 }
    }
}

/// The divergence as it is computed: JSD at β 0 or 1 is the forward or reverse KL.
#[derive(Clone, Copy)]
enum Form {
    Forward,
    Reverse,
    Jsd(f64),
}

impl DistillConfig {
    fn form(&self) -> Form {
        match self.divergence {
            Divergence::ForwardKl => Form::Forward,
            Divergence::ReverseKl => Form::Reverse,
            Divergence::Jsd if self.beta == 0.0 => Form::Forward,
            Divergence::Jsd if self.beta == 1.0 => Form::Reverse,
            Divergence::Jsd => Form::Jsd(self.beta),
        }
    }

    /// The divergence at one position, in f64 from the two models' f32 logits.
    pub fn token(&self, student: &[f32], teacher: &[f32]) -> f64 {
        let log_softmax = |l: &[f32]| -> Vec<f64> {
            let x: Vec<f64> = l.iter().map(|&v| v as f64 / self.temperature).collect();
            let max = x.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let lse = max + x.iter().map(|v| (v - max).exp()).sum::<f64>().ln();
            x.iter().map(|v| v - lse).collect()
        };
        let (ls, lt) = (log_softmax(student), log_softmax(teacher));
        let kl = |p: &[f64], q: &[f64]| p.iter().zip(q).map(|(a, b)| a.exp() * (a - b)).sum::<f64>();
        match self.form() {
            Form::Forward => kl(&lt, &ls),
            Form::Reverse => kl(&ls, &lt),
            Form::Jsd(beta) => {
                let lm: Vec<f64> = ls
                    .iter()
                    .zip(&lt)
                    .map(|(s, t)| {
                        let (a, b) = (s + (1.0 - beta).ln(), t + beta.ln());
                        let m = a.max(b);
                        m + ((a - m).exp() + (b - m).exp()).ln()
                    })
                    .collect();
                beta * kl(&lt, &lm) + (1.0 - beta) * kl(&ls, &lm)
            }
        }
    }

    /// The divergence summed over rows of `student [n, vocab]` against `teacher [n, vocab]`
    /// (constants), `[1]`, differentiable in the student's logits.
    pub fn loss_tensor<B: Backend>(&self, student: Tensor<B, 2>, teacher: Tensor<B, 2>) -> Tensor<B, 1> {
        let t = self.temperature;
        let ls = log_softmax(student.cast(DType::F32) / t, 1);
        let lt = log_softmax(teacher.cast(DType::F32).detach() / t, 1);
        let kl = |p: Tensor<B, 2>, q: Tensor<B, 2>| (p.clone().exp() * (p - q)).sum_all();
        match self.form() {
            Form::Forward => kl(lt, ls),
            Form::Reverse => kl(ls, lt),
            Form::Jsd(beta) => {
                let (a, b) = (ls.clone() + (1.0 - beta).ln(), lt.clone() + beta.ln());
                let m = a.clone().max_pair(b.clone()).detach();
                let lm = m.clone() + ((a - m.clone()).exp() + (b - m).exp()).log();
                kl(lt, lm.clone()) * beta + kl(ls, lm) * (1.0 - beta)
            }
        }
    }
}

/// Positions per chunk of logits: about 16 Mi logits (64 MB in f32) whatever the vocabulary.
pub fn chunk_rows(vocab: usize) -> usize {
    ((1usize << 24) / vocab.max(1)).max(1)
}

/// The scored positions of `batch` in chunks of at most `rows`: flat positions (into `[B·T]`).
pub fn chunks(batch: &Batch, rows: usize) -> impl Iterator<Item = Vec<i64>> + '_ {
    batch.positions.chunks(rows.max(1)).map(<[i64]>::to_vec)
}

/// Hidden states of `batch` through `model`'s own forward (padded or packed rows).
pub fn hidden<B: Kernels>(model: &Decoder<B>, batch: &Batch) -> Tensor<B, 3> {
    let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(batch.input.clone(), [batch.b, batch.t]), &model.device());
    match &batch.segments {
        Some(s) => model.hidden_packed(ids, s),
        None => model.hidden(ids, None),
    }
}

/// The logits at flat `positions` of `hidden`, `[n, vocab]`.
pub fn logits_at<B: Kernels>(model: &Decoder<B>, hidden: Tensor<B, 3>, positions: Vec<i64>) -> Tensor<B, 2> {
    let n = positions.len();
    model.head_at(hidden, positions).reshape([n, model.config.vocab_size])
}

/// Why a teacher cannot teach this student.
#[derive(Debug, thiserror::Error)]
pub enum TeacherError {
    #[error(transparent)]
    Load(#[from] crate::model::LoadError),
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error("{}: the distillation teacher must share the student's tokenizer: {msg}", path.display())]
    Mismatch { path: PathBuf, msg: String },
}

/// Loads the teacher in `dir`, checked to share the student's (in `student_dir`) tokenizer and
/// vocabulary size: every token of the student's vocabulary has the same id in the teacher's.
pub fn load_teacher<B: Kernels>(dir: &Path, student_dir: &Path, device: &B::Device, options: LoadOptions) -> Result<Decoder<B>, TeacherError> {
    let (ts, ss) = (TextTokenizer::from_dir(dir)?, TextTokenizer::from_dir(student_dir)?);
    let mismatch = |msg: String| TeacherError::Mismatch { path: dir.join("tokenizer.json"), msg };
    if let Some((token, id)) = ss.vocab().into_iter().find(|(t, id)| ts.token_id(t) != Some(*id)) {
        let there = ts.token_id(&token).map_or("missing".to_string(), |i| format!("id {i}"));
        return Err(mismatch(format!("the student's token {token:?} (id {id}) is {there} in the teacher's")));
    }
    let (student, teacher) = (ModelConfig::from_dir(student_dir).map_err(crate::model::LoadError::from)?, crate::model::load::<B>(dir, device, options)?);
    if teacher.config.vocab_size != student.vocab_size {
        return Err(mismatch(format!("its config.json has vocab_size {}, the student's {}", teacher.config.vocab_size, student.vocab_size)));
    }
    Ok(teacher)
}

/// What `ft eval --objective distill` reports: the token mean of the divergence and, per
/// sample, its sum and scored positions.
#[derive(Debug, Clone, Serialize)]
pub struct DistillReport {
    pub loss: f64,
    pub tokens: usize,
    pub per_sample: Vec<(f64, usize)>,
}

/// Samples per evaluation forward.
const EVAL_BATCH: usize = 8;

/// The divergence of `student` from `teacher` over `samples` (no gradient; f64 per position).
pub fn evaluate<B: Kernels>(student: &Decoder<B>, teacher: &Decoder<B>, samples: &[Encoded], cfg: &DistillConfig) -> DistillReport {
    let mut per_sample = vec![(0.0, 0usize); samples.len()];
    let vocab = student.config.vocab_size;
    for (c, group) in samples.chunks(EVAL_BATCH).enumerate() {
        let batch = Batch::padded(&group.iter().collect::<Vec<_>>());
        let (hs, ht) = (hidden(student, &batch), hidden(teacher, &batch));
        let mut k = 0;
        for positions in chunks(&batch, chunk_rows(vocab)) {
            let n = positions.len();
            let values = |m: &Decoder<B>, h: &Tensor<B, 3>| -> Vec<f32> { logits_at(m, h.clone(), positions.clone()).cast(DType::F32).into_data().convert::<f32>().to_vec().expect("f32 logits") };
            let (s, t) = (values(student, &hs), values(teacher, &ht));
            for r in 0..n {
                let d = cfg.token(&s[r * vocab..(r + 1) * vocab], &t[r * vocab..(r + 1) * vocab]);
                let owner = c * EVAL_BATCH + batch.owner[k];
                per_sample[owner].0 += d;
                per_sample[owner].1 += 1;
                k += 1;
            }
        }
    }
    let tokens: usize = per_sample.iter().map(|p| p.1).sum();
    let loss = per_sample.iter().map(|p| p.0).sum::<f64>() / tokens.max(1) as f64;
    DistillReport { loss, tokens, per_sample }
}
