//! Supervised fine-tuning: the assistant-only next-token loss (`loss::nll`) over tokenized
//! conversations, packed or padded.

use std::path::PathBuf;

use serde_json::{json, Map, Value};

use super::objective::{Objective, StepReport, StepSettings};
use super::optim::AdamW;
use super::recompute::Recompute;
use super::step::train_step;
use super::TrainError;
use crate::data::batch::Batch;
use crate::data::encode::Encoded;
use crate::data::packing::{pack, Packed};
use crate::data::prepare::{self, DataCounts, PrepareOptions};
use crate::data::template::ChatTemplate;
use crate::data::tokenizer::TextTokenizer;
use crate::loss::nll;
use crate::model::Decoder;
use crate::ops::TrainBackend;

/// What SFT needs to know.
#[derive(Debug, Clone)]
pub struct SftSettings {
    pub train: PathBuf,
    pub eval: Option<PathBuf>,
    pub prepare: PrepareOptions,
    /// Pack samples into rows of `prepare.max_len` tokens.
    pub packing: bool,
    pub recompute: Recompute,
}

/// SFT over prepared samples, with an optional eval split.
pub struct Sft {
    pub train: Vec<Encoded>,
    /// With packing: the training samples packed into rows; the loop then runs over these.
    pub packed: Option<Vec<Packed>>,
    pub eval: Option<Vec<Encoded>>,
    pub counts: DataCounts,
    pub recompute: Recompute,
}

impl Sft {
    pub fn new(tok: &TextTokenizer, template: &ChatTemplate, s: &SftSettings) -> Result<Self, TrainError> {
        let (train, counts) = prepare::sft(tok, template, &s.train, &s.prepare)?;
        let eval = match &s.eval {
            Some(f) => Some(prepare::sft(tok, template, f, &s.prepare)?.0),
            None => None,
        };
        let packed = s.packing.then(|| pack(&train, s.prepare.max_len));
        Ok(Sft { train, packed, eval, counts, recompute: s.recompute })
    }
}

impl Sft {
    /// The batch of examples `idx` (packed rows or padded samples).
    pub fn batch(&self, idx: &[usize]) -> Batch {
        match &self.packed {
            Some(p) => Batch::packed(&idx.iter().map(|&i| &p[i]).collect::<Vec<_>>()),
            None => Batch::padded(&idx.iter().map(|&i| &self.train[i]).collect::<Vec<_>>()),
        }
    }
}

impl<B: TrainBackend> Objective<B> for Sft {
    fn len(&self) -> usize {
        self.packed.as_ref().map_or(self.train.len(), Vec::len)
    }

    fn data_counts(&self) -> DataCounts {
        self.counts
    }

    fn step(&mut self, model: &mut Decoder<B>, opt: &mut AdamW<B::InnerBackend>, micro: &[Vec<usize>], settings: StepSettings) -> Result<StepReport, TrainError> {
        let batches: Vec<Batch> = micro.iter().map(|idx| self.batch(idx)).collect();
        let tokens: usize = batches.iter().map(Batch::scored).sum();
        let norm = tokens.max(1) as f64;
        let mut correct = 0;
        let (loss, grad_norm) = train_step(
            model,
            opt,
            batches.len(),
            |m, fwd, k| {
                let m: &Decoder<B> = m;
                let (l, c) = nll::sft_loss(m, &batches[k], norm, &mut |ids, segments| fwd.hidden(m, ids, segments));
                correct += c;
                l
            },
            settings,
            self.recompute,
        );
        let mut metrics = Map::new();
        metrics.insert("loss".into(), loss.into());
        metrics.insert("mean_token_accuracy".into(), (correct as f64 / tokens.max(1) as f64).into());
        Ok(StepReport { loss, grad_norm, input_tokens: batches.iter().map(|b| b.real_tokens).sum(), metrics, samples: Vec::new() })
    }

    fn evaluate(&mut self, model: &mut Decoder<B::InnerBackend>) -> Option<Map<String, Value>> {
        let report = nll::evaluate(model, self.eval.as_ref()?);
        let Value::Object(m) = json!({ "eval_loss": report.loss }) else { unreachable!() };
        Some(m)
    }
}
