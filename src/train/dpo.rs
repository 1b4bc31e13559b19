//! Direct Preference Optimization as an objective: TRL's losses and scoring (`loss::dpo`) over
//! prepared preference pairs, the reference being the same model with its adapters off (no
//! second copy of the weights). Reference log-probs can be precomputed once and cached in the
//! run directory.

use crate::ops::SumAll;
use std::path::PathBuf;

use serde_json::{Map, Value};

use super::objective::{Objective, StepReport, StepSettings};
use super::optim::AdamW;
use super::recompute::Recompute;
use super::step::train_step;
use super::reference::{self, Precomputed, ReferenceCache};
use super::TrainError;
use crate::data::prepare::{DataCounts, PrepareOptions};
use crate::data::preference::EncodedPair;
use crate::data::template::ChatTemplate;
use crate::data::tokenizer::TextTokenizer;
use crate::loss::dpo::{policy_logps_with, reference_logps, score_pairs, DpoConfig, PairLogps, SideLogps, SCORE_BATCH};
use crate::loss::values;
use crate::model::Decoder;
use crate::ops::TrainBackend;
use crate::progress::Progress;

/// What DPO needs to know.
#[derive(Debug, Clone)]
pub struct DpoSettings {
    pub config: DpoConfig,
    pub train: PathBuf,
    pub eval: Option<PathBuf>,
    pub prepare: PrepareOptions,
    /// Precompute the reference log-probs before training and cache them here.
    pub reference_cache: Option<ReferenceCache>,
    pub recompute: Recompute,
}

/// DPO over prepared pairs, with an optional eval split and optionally precomputed reference
/// log-probs.
pub struct Dpo {
    pub config: DpoConfig,
    pub train: Vec<EncodedPair>,
    pub eval: Option<Vec<EncodedPair>>,
    pub dropped: usize,
    /// Reference `(chosen, rejected)` log-probs per training pair, where computed
    /// (`precompute_ref`), and their cache.
    pub reference: Option<Precomputed<(f64, f64)>>,
    /// The eval split's reference log-probs, kept after the first eval (they never change).
    eval_reference: Option<Vec<(f64, f64)>>,
    recompute: Recompute,
}

impl Dpo {
    /// Prepares the data. With `s.reference_cache`, reads back cached reference log-probs when
    /// their key matches; [`Objective::before_training`] computes the rest.
    pub fn new(tok: &TextTokenizer, template: &ChatTemplate, s: &DpoSettings, progress: &dyn Progress) -> Result<Self, TrainError> {
        let (train, eval, dropped) = super::pair_splits(tok, template, &s.train, s.eval.as_deref(), &s.prepare, progress)?;
        let reference = match &s.reference_cache {
            Some(rc) => {
                let salt = format!("dpo {} {:?}", s.prepare.max_len, s.prepare.max_prompt_len);
                Some(Precomputed::open(&rc.path, reference::key(rc, &s.train, template, &salt)?, train.len()))
            }
            None => None,
        };
        Ok(Dpo { config: s.config, train, eval, dropped, reference, eval_reference: None, recompute: s.recompute })
    }
}

impl<B: TrainBackend> Objective<B> for Dpo {
    fn len(&self) -> usize {
        self.train.len()
    }

    fn data_counts(&self) -> DataCounts {
        DataCounts { dropped_too_long: self.dropped, ..Default::default() }
    }

    /// Computes the reference log-probs of the pairs the run will visit that the cache lacks,
    /// then saves the cache.
    fn before_training(&mut self, model: &mut Decoder<B>, upcoming: &[usize], progress: &dyn Progress) -> Result<(), TrainError> {
        let Some(reference) = &mut self.reference else { return Ok(()) };
        let train = &self.train;
        reference.fill(upcoming, SCORE_BATCH, "pairs", progress, |chunk| reference_logps(model, &chunk.iter().map(|&i| &train[i]).collect::<Vec<_>>()))
    }

    fn step(&mut self, model: &mut Decoder<B>, opt: &mut AdamW<B::InnerBackend>, micro: &[Vec<usize>], settings: StepSettings) -> Result<StepReport, TrainError> {
        let cfg = self.config;
        let n_pairs: usize = micro.iter().map(Vec::len).sum();
        let chosen_tokens: usize = micro.iter().flatten().map(|&i| self.train[i].chosen.trainable()).sum();
        let mut seen = Vec::with_capacity(n_pairs);
        let mut input_tokens = 0;
        let (train, reference) = (&self.train, &self.reference);
        let (loss, grad_norm) = train_step(
            model,
            opt,
            micro.len(),
            |m, fwd, k| {
                let pairs: Vec<&EncodedPair> = micro[k].iter().map(|&i| &train[i]).collect();
                let refs = match reference.as_ref().and_then(|r| r.all(&micro[k])) {
                    Some(r) => r,
                    None => reference_logps(m, &pairs),
                };
                let m: &Decoder<B> = m;
                let (chosen, rejected) = policy_logps_with(m, &pairs, &mut |ids| fwd.hidden(m, ids, None));
                input_tokens += pairs.iter().map(|p| p.chosen.ids.len() + p.rejected.ids.len() - 2).sum::<usize>();
                let (vc, vr) = (values(chosen.0.clone().detach()), values(rejected.0.clone().detach()));
                let logps: Vec<PairLogps> = (0..pairs.len())
                    .map(|i| PairLogps {
                        chosen: SideLogps { policy: vc[i], reference: refs[i].0, tokens: chosen.1[i] },
                        rejected: SideLogps { policy: vr[i], reference: refs[i].1, tokens: rejected.1[i] },
                    })
                    .collect();
                let (chosen, rejected) = (chosen.0, rejected.0);
                let mut loss = cfg.loss_tensor(chosen.clone(), rejected, &logps).sum_all() / n_pairs as f64;
                if let Some(alpha) = cfg.rpo_alpha {
                    loss = loss - chosen.sum_all() * (alpha / chosen_tokens.max(1) as f64);
                }
                seen.extend(logps);
                loss
            },
            settings,
            self.recompute,
        );
        let mut metrics = cfg.metrics(&seen, "");
        // The loss that was differentiated (equal to the f64 one up to float rounding).
        metrics.insert("loss".into(), loss.into());
        Ok(StepReport { loss, grad_norm, input_tokens, metrics, samples: Vec::new() })
    }

    fn evaluate(&mut self, model: &mut Decoder<B::InnerBackend>) -> Option<Map<String, Value>> {
        let logps = score_pairs(model, self.eval.as_ref()?, self.eval_reference.as_deref());
        self.eval_reference = Some(logps.iter().map(|p| (p.chosen.reference, p.rejected.reference)).collect());
        Some(self.config.metrics(&logps, "eval_"))
    }
}

