//! What a training method contributes to the loop: its examples, one optimizer step over
//! micro-batches of example indices, and its eval metrics. SFT and DPO (`sft.rs`, `dpo.rs`) are
//! the two implementations; a new objective is a new file implementing [`Objective`].

use serde_json::{Map, Value};

use super::optim::AdamW;
use super::TrainError;
use crate::data::prepare::DataCounts;
use crate::model::Decoder;
use crate::ops::TrainBackend;
use crate::progress::Progress;

/// The settings of one optimizer step.
#[derive(Debug, Clone, Copy)]
pub struct StepSettings {
    /// The step's index (0-based): sampling is a function of (seed, step).
    pub step: usize,
    pub lr: f64,
    /// Global gradient-norm clipping (0 = off).
    pub max_grad_norm: f64,
}

/// What one optimizer step measured.
pub struct StepReport {
    pub loss: f64,
    pub grad_norm: f64,
    /// Non-padding input tokens processed.
    pub input_tokens: usize,
    /// The method's metrics with TRL's names (including `loss`).
    pub metrics: Map<String, Value>,
    /// Lines for `RUN/completions.jsonl` (GRPO's sampled completions, rewards, advantages).
    pub samples: Vec<Value>,
}

/// A training method.
pub trait Objective<B: TrainBackend> {
    /// Training examples (samples or packed rows for SFT, pairs for DPO).
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// What preparing the training data dropped or truncated.
    fn data_counts(&self) -> DataCounts;
    /// Work before the first step, given the examples the run will visit (DPO precomputes its
    /// reference log-probs here).
    fn before_training(&mut self, _model: &mut Decoder<B>, _upcoming: &[usize], _progress: &dyn Progress) -> Result<(), TrainError> {
        Ok(())
    }
    /// Optimizer steps that share one draw of examples: the loop draws new examples only every
    /// this many steps and hands the same `micro` to the others (GRPO's `num_iterations`).
    fn steps_per_batch(&self) -> usize {
        1
    }
    /// What a checkpoint must keep besides the adapter, optimizer and data position for a
    /// resumed run to continue exactly (GRPO's generation batch between its steps).
    fn state(&self) -> Option<Value> {
        None
    }
    /// Takes back what [`Objective::state`] saved; the error says what is wrong with it.
    fn restore(&mut self, _state: Value) -> Result<(), String> {
        Ok(())
    }
    /// One optimizer step (forward, backward, update) over `micro`.
    fn step(&mut self, model: &mut Decoder<B>, opt: &mut AdamW<B::InnerBackend>, micro: &[Vec<usize>], settings: StepSettings) -> Result<StepReport, TrainError>;
    /// Metrics on the eval split (names prefixed `eval_`, including `eval_loss`), if there is one.
    /// Runs on the inner backend: no autodiff graph is recorded.
    fn evaluate(&mut self, model: &mut Decoder<B::InnerBackend>) -> Option<Map<String, Value>>;
}
