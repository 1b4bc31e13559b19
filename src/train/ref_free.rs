//! Reference-free preference training (ORPO, CPO, SimPO) as an objective: TRL's losses
//! (`loss::ref_free`) over prepared preference pairs. Only the policy is scored: no reference
//! forward, no reference cache.

use std::path::PathBuf;

use serde_json::{Map, Value};

use super::objective::{Objective, StepReport, StepSettings};
use super::optim::AdamW;
use super::recompute::Recompute;
use super::step::train_step;
use super::TrainError;
use crate::data::prepare::{DataCounts, PrepareOptions};
use crate::data::preference::EncodedPair;
use crate::data::template::ChatTemplate;
use crate::data::tokenizer::TextTokenizer;
use crate::loss::ref_free::{score_pairs, side_tensors_with, RefFree};
use crate::model::Decoder;
use crate::ops::TrainBackend;
use crate::progress::Progress;

/// What a reference-free objective needs to know.
#[derive(Debug, Clone)]
pub struct RefFreeSettings {
    pub objective: RefFree,
    pub train: PathBuf,
    pub eval: Option<PathBuf>,
    pub prepare: PrepareOptions,
    pub recompute: Recompute,
}

/// ORPO, CPO or SimPO over prepared pairs, with an optional eval split.
pub struct RefFreeTraining {
    pub objective: RefFree,
    pub train: Vec<EncodedPair>,
    pub eval: Option<Vec<EncodedPair>>,
    pub dropped: usize,
    recompute: Recompute,
}

impl RefFreeTraining {
    pub fn new(tok: &TextTokenizer, template: &ChatTemplate, s: &RefFreeSettings, progress: &dyn Progress) -> Result<Self, TrainError> {
        let (train, eval, dropped) = super::pair_splits(tok, template, &s.train, s.eval.as_deref(), &s.prepare, progress)?;
        Ok(RefFreeTraining { objective: s.objective, train, eval, dropped, recompute: s.recompute })
    }
}

impl<B: TrainBackend> Objective<B> for RefFreeTraining {
    fn len(&self) -> usize {
        self.train.len()
    }

    fn data_counts(&self) -> DataCounts {
        DataCounts { dropped_too_long: self.dropped, ..Default::default() }
    }

    fn step(&mut self, model: &mut Decoder<B>, opt: &mut AdamW<B::InnerBackend>, micro: &[Vec<usize>], settings: StepSettings) -> Result<StepReport, TrainError> {
        let objective = self.objective;
        let train = &self.train;
        let n_pairs: usize = micro.iter().map(Vec::len).sum();
        let all: Vec<&EncodedPair> = micro.iter().flatten().map(|&i| &train[i]).collect();
        // The NLL term averages over the tokens of the whole step, as one batch in TRL.
        let nll_tokens = objective.nll_tokens(&all);
        let mut seen = Vec::with_capacity(n_pairs);
        let mut input_tokens = 0;
        let (loss, grad_norm) = train_step(
            model,
            opt,
            micro.len(),
            |m, fwd, k| {
                let pairs: Vec<&EncodedPair> = micro[k].iter().map(|&i| &train[i]).collect();
                let m: &Decoder<B> = m;
                let sides = side_tensors_with(m, &pairs, objective.needs_full_nll(), &mut |ids| fwd.hidden(m, ids, None));
                input_tokens += pairs.iter().map(|p| p.chosen.ids.len() + p.rejected.ids.len() - 2).sum::<usize>();
                seen.extend(sides.scores());
                objective.loss_tensor(&sides, n_pairs, nll_tokens)
            },
            settings,
            self.recompute,
        );
        let mut metrics = objective.metrics(&seen, "");
        // The loss that was differentiated (equal to the f64 one up to float rounding).
        metrics.insert("loss".into(), loss.into());
        Ok(StepReport { loss, grad_norm, input_tokens, metrics, samples: Vec::new() })
    }

    fn evaluate(&mut self, model: &mut Decoder<B::InnerBackend>) -> Option<Map<String, Value>> {
        let scores = score_pairs(model, self.eval.as_ref()?, &self.objective);
        Some(self.objective.metrics(&scores, "eval_"))
    }
}
