//! Reward-model training as an objective: TRL's RewardTrainer loss (`loss::reward`) over
//! prepared preference pairs, each side scored by the model's `score` head at its last non-pad
//! token. The head is trained in full (PEFT's `modules_to_save`), the backbone through LoRA.

use std::path::PathBuf;

use burn::prelude::*;
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
use crate::loss::reward::{score_batch, score_pairs, PairRewards, RewardConfig};
use crate::loss::values;
use crate::model::Decoder;
use crate::ops::TrainBackend;
use crate::progress::Progress;

/// What reward-model training needs to know.
#[derive(Debug, Clone)]
pub struct RewardSettings {
    pub config: RewardConfig,
    pub train: PathBuf,
    pub eval: Option<PathBuf>,
    pub prepare: PrepareOptions,
    pub recompute: Recompute,
}

/// Reward-model training over prepared pairs, with an optional eval split.
pub struct RewardTraining {
    config: RewardConfig,
    train: Vec<EncodedPair>,
    eval: Option<Vec<EncodedPair>>,
    dropped: usize,
    recompute: Recompute,
}

impl RewardTraining {
    pub fn new(tok: &TextTokenizer, template: &ChatTemplate, s: &RewardSettings, progress: &dyn Progress) -> Result<Self, TrainError> {
        let (train, eval, dropped) = super::pair_splits(tok, template, &s.train, s.eval.as_deref(), &s.prepare, progress)?;
        Ok(RewardTraining { config: s.config, train, eval, dropped, recompute: s.recompute })
    }
}

/// Tokens of a pair's two sides (TRL's `num_tokens`: the attention mask's sum).
fn pair_tokens(p: &EncodedPair) -> usize {
    p.chosen.ids.len() + p.rejected.ids.len()
}

impl<B: TrainBackend> Objective<B> for RewardTraining {
    fn len(&self) -> usize {
        self.train.len()
    }

    fn data_counts(&self) -> DataCounts {
        DataCounts { dropped_too_long: self.dropped, ..Default::default() }
    }

    fn step(&mut self, model: &mut Decoder<B>, opt: &mut AdamW<B::InnerBackend>, micro: &[Vec<usize>], settings: StepSettings) -> Result<StepReport, TrainError> {
        let cfg = self.config;
        let n_pairs: usize = micro.iter().map(Vec::len).sum();
        let mut seen: Vec<PairRewards> = Vec::with_capacity(n_pairs);
        let mut input_tokens = 0;
        let train = &self.train;
        let (loss, grad_norm) = train_step(
            model,
            opt,
            micro.len(),
            |m, fwd, k| {
                let pairs: Vec<&EncodedPair> = micro[k].iter().map(|&i| &train[i]).collect();
                let n = pairs.len();
                // TRL's batch: every chosen side, then every rejected one.
                let sides: Vec<&[u32]> = pairs.iter().map(|p| p.chosen.ids.as_slice()).chain(pairs.iter().map(|p| p.rejected.ids.as_slice())).collect();
                let m: &Decoder<B> = m;
                let (ids, positions) = score_batch(m, &sides, &m.device());
                let scores = m.scores_at(fwd.hidden(m, ids, None), positions);
                let r: Tensor<B, 1> = scores.slice([0..2 * n, 0..1]).reshape([2 * n]);
                let (chosen, rejected) = (r.clone().narrow(0, 0, n), r.narrow(0, n, n));
                let (vc, vr) = (values(chosen.clone().detach()), values(rejected.clone().detach()));
                let margins: Vec<f64> = pairs.iter().map(|p| p.margin).collect();
                seen.extend((0..n).map(|i| PairRewards { chosen: vc[i], rejected: vr[i], margin: margins[i] }));
                input_tokens += pairs.iter().map(|p| pair_tokens(p)).sum::<usize>();
                cfg.loss_tensor(chosen, rejected, &margins) / n_pairs as f64
            },
            settings,
            self.recompute,
        );
        let mut metrics = cfg.metrics(&seen, input_tokens, "");
        // The loss that was differentiated (equal to the f64 one up to float rounding); the
        // run's line gives the cumulative `num_tokens`, as TRL logs it.
        metrics.insert("loss".into(), loss.into());
        metrics.remove("num_tokens");
        Ok(StepReport { loss, grad_norm, input_tokens, metrics, samples: Vec::new() })
    }

    fn evaluate(&mut self, model: &mut Decoder<B::InnerBackend>) -> Option<Map<String, Value>> {
        let eval = self.eval.as_ref()?;
        let rewards = score_pairs(model, eval);
        Some(self.config.metrics(&rewards, eval.iter().map(pair_tokens).sum(), "eval_"))
    }
}
