//! KTO as an objective: TRL's loss (`loss::kto`) over unpaired rows (or pairs unpaired as TRL
//! does), the reference being the adapter-disabled model or the frozen starting adapter. Each
//! micro-batch estimates its KL term from its rows' mismatched samples, as each TRL batch does.

use crate::ops::SumAll;
use std::path::PathBuf;

use serde_json::{Map, Value};

use super::objective::{Objective, StepReport, StepSettings};
use super::optim::AdamW;
use super::recompute::Recompute;
use super::reference::{self, Precomputed, ReferenceCache};
use super::step::train_step;
use super::TrainError;
use crate::data::encode::Encoded;
use crate::data::prepare::{self, DataCounts, EncodedRow, PrepareOptions};
use crate::data::template::ChatTemplate;
use crate::data::tokenizer::TextTokenizer;
use crate::loss::dpo::completion_logps_with;
use crate::loss::kto::{kl_estimate, policy_sums, reference_sums, score_rows, KtoConfig, RowLogps, SCORE_BATCH};
use crate::loss::values;
use crate::model::Decoder;
use crate::ops::TrainBackend;
use crate::progress::Progress;

/// What KTO needs to know.
#[derive(Debug, Clone)]
pub struct KtoSettings {
    pub config: KtoConfig,
    pub train: PathBuf,
    pub eval: Option<PathBuf>,
    pub prepare: PrepareOptions,
    /// Rows per KL estimate in the data's order (TRL: the per-device batch size).
    pub kl_block: usize,
    /// Precompute the reference log-probs before training and cache them here.
    pub reference_cache: Option<ReferenceCache>,
    pub recompute: Recompute,
}

/// KTO over prepared rows, with an optional eval split.
pub struct Kto {
    pub config: KtoConfig,
    pub train: Vec<EncodedRow>,
    pub eval: Option<Vec<EncodedRow>>,
    pub dropped: usize,
    kl_block: usize,
    /// Per row, the reference's log-probs of its completion and of its KL sample, where computed
    /// (`precompute_ref`), and their cache.
    reference: Option<Precomputed<(f64, f64)>>,
    recompute: Recompute,
}

impl Kto {
    pub fn new(tok: &TextTokenizer, template: &ChatTemplate, s: &KtoSettings) -> Result<Self, TrainError> {
        let (train, dropped) = prepare::kto(tok, template, &s.train, &s.prepare, s.kl_block)?;
        let eval = match &s.eval {
            Some(f) => Some(prepare::kto(tok, template, f, &s.prepare, s.kl_block)?.0),
            None => None,
        };
        let reference = match &s.reference_cache {
            Some(rc) => {
                let salt = format!("kto {} {:?} {}", s.prepare.max_len, s.prepare.max_prompt_len, s.kl_block);
                Some(Precomputed::open(&rc.path, reference::key(rc, &s.train, template, &salt)?, train.len()))
            }
            None => None,
        };
        Ok(Kto { config: s.config, train, eval, dropped, kl_block: s.kl_block, reference, recompute: s.recompute })
    }
}

impl<B: TrainBackend> Objective<B> for Kto {
    fn len(&self) -> usize {
        self.train.len()
    }

    fn data_counts(&self) -> DataCounts {
        DataCounts { dropped_too_long: self.dropped, ..Default::default() }
    }

    /// Computes the reference log-probs of the rows the run will visit that the cache lacks (with
    /// `precompute_ref`), then saves the cache.
    fn before_training(&mut self, model: &mut Decoder<B>, upcoming: &[usize], progress: &dyn Progress) -> Result<(), TrainError> {
        let Some(reference) = &mut self.reference else { return Ok(()) };
        let train = &self.train;
        reference.fill(upcoming, SCORE_BATCH, "rows", progress, |chunk| {
            let samples: Vec<&Encoded> = chunk.iter().map(|&i| &train[i].sample).collect();
            let kls: Vec<&Encoded> = chunk.iter().map(|&i| &train[i].kl).collect();
            reference_sums(model, &samples).into_iter().zip(reference_sums(model, &kls)).collect()
        })
    }

    fn step(&mut self, model: &mut Decoder<B>, opt: &mut AdamW<B::InnerBackend>, micro: &[Vec<usize>], settings: StepSettings) -> Result<StepReport, TrainError> {
        let cfg = self.config;
        let (train, precomputed) = (&self.train, &self.reference);
        let n_rows: usize = micro.iter().map(Vec::len).sum();
        let mut batches = Vec::with_capacity(micro.len());
        let mut input_tokens = 0;
        let (loss, grad_norm) = train_step(
            model,
            opt,
            micro.len(),
            |m, fwd, k| {
                let rows: Vec<&EncodedRow> = micro[k].iter().map(|&i| &train[i]).collect();
                let samples: Vec<&Encoded> = rows.iter().map(|r| &r.sample).collect();
                let kls: Vec<&Encoded> = rows.iter().map(|r| &r.kl).collect();
                // The reference and the KL term carry no gradient.
                let (reference, kl_reference): (Vec<f64>, Vec<f64>) = match precomputed.as_ref().and_then(|r| r.all(&micro[k])) {
                    Some(r) => r.into_iter().unzip(),
                    None => (reference_sums(m, &samples), reference_sums(m, &kls)),
                };
                let kl_policy = policy_sums(m, &kls);
                let (_, kl) = kl_estimate(&kl_policy.iter().copied().zip(kl_reference).collect::<Vec<_>>());
                let m: &Decoder<B> = m;
                let (policy, _) = completion_logps_with(m, &samples, &mut |ids| fwd.hidden(m, ids, None));
                input_tokens += rows.iter().map(|r| r.sample.ids.len() + r.kl.ids.len() - 2).sum::<usize>();
                let pol = values(policy.clone().detach());
                let logps: Vec<RowLogps> = rows
                    .iter()
                    .zip(pol)
                    .zip(reference)
                    .map(|((r, p), rf)| RowLogps { policy: p, reference: rf, desirable: r.desirable, ..Default::default() })
                    .collect();
                let loss = cfg.loss_tensor(policy, &logps, kl).sum_all() / n_rows as f64;
                batches.push((logps, kl));
                loss
            },
            settings,
            self.recompute,
        );
        let mut metrics = cfg.metrics(&batches, "");
        metrics.insert("loss".into(), loss.into());
        Ok(StepReport { loss, grad_norm, input_tokens, metrics, samples: Vec::new() })
    }

    fn evaluate(&mut self, model: &mut Decoder<B::InnerBackend>) -> Option<Map<String, Value>> {
        let scored = score_rows(model, self.eval.as_ref()?, self.kl_block);
        let batches: Vec<_> = scored.into_iter().map(|(r, kl, _)| (r, kl)).collect();
        Some(self.config.metrics(&batches, "eval_"))
    }
}
