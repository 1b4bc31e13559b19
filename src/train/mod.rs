//! Training: the recipe (the only place that knows the TOML), the loop ([`run`]), its run
//! directory, checkpoints and state, the step and the optimizer, and the objectives as
//! components ([`objective`]; [`sft`], [`dpo`]) that receive their own settings.

pub mod checkpoint;
pub mod distill;
pub mod dpo;
pub mod grpo;
pub mod kto;
pub mod objective;
pub mod optim;
pub mod recipe;
pub mod recompute;
pub mod reference;
pub mod reward;
pub mod rewards;
pub mod ref_free;
pub mod run;
pub mod run_dir;
pub mod sft;
pub mod state;
pub mod step;

use std::path::{Path, PathBuf};

/// Errors from a training run; each names the file or setting concerned.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("{what} {}", path.display())]
    Io { what: &'static str, path: PathBuf, source: std::io::Error },
    #[error("{}: {msg}", path.display())]
    Invalid { path: PathBuf, msg: String },
    /// `--resume` on a run whose recipe (exit 2) or data (exit 3) changed since it started.
    #[error("--resume: {what}: the run in {} was started with other inputs; resume it with those, or train into a new output directory", run.display())]
    Changed { run: PathBuf, what: String, data: bool },
    #[error(transparent)]
    Recipe(#[from] recipe::RecipeError),
    #[error(transparent)]
    Load(#[from] crate::model::LoadError),
    #[error(transparent)]
    Tokenizer(#[from] crate::data::tokenizer::TokenizerError),
    #[error(transparent)]
    Prepare(#[from] crate::data::prepare::PrepareError),
    #[error(transparent)]
    Data(#[from] crate::data::conversation::DataError),
    #[error(transparent)]
    Peft(#[from] crate::formats::peft::PeftError),
    #[error(transparent)]
    Weights(#[from] crate::formats::safetensors::WeightsError),
    #[error(transparent)]
    Output(#[from] crate::atomic::AtomicError),
    #[error(transparent)]
    NoTargets(#[from] crate::adapters::attach::AttachError),
    #[error(transparent)]
    Teacher(#[from] crate::loss::distill::TeacherError),
    #[error(transparent)]
    Diverged(#[from] run::Divergence),
    #[error(transparent)]
    Interrupted(#[from] run::Interrupted),
}

/// `(train pairs, eval pairs, pairs dropped as too long)`.
pub(crate) type PairSplits = (Vec<crate::data::preference::EncodedPair>, Option<Vec<crate::data::preference::EncodedPair>>, usize);

/// Preference pairs of a training file and of the optional eval file, as the pair objectives
/// (DPO, ORPO/CPO/SimPO, reward models) read them: `(train, eval, pairs dropped as too long)`;
/// the first warnings (identical sides) go to `progress`.
pub(crate) fn pair_splits(
    tok: &crate::data::tokenizer::TextTokenizer,
    template: &crate::data::template::ChatTemplate,
    train: &Path,
    eval: Option<&Path>,
    prepare: &crate::data::prepare::PrepareOptions,
    progress: &dyn crate::progress::Progress,
) -> Result<PairSplits, TrainError> {
    let (pairs, dropped, warnings) = crate::data::prepare::pairs(tok, template, train, prepare)?;
    for w in warnings.iter().take(10) {
        progress.warning(w);
    }
    let eval = match eval {
        Some(f) => Some(crate::data::prepare::pairs(tok, template, f, prepare)?.0),
        None => None,
    };
    Ok((pairs, eval, dropped))
}

/// Attaches what was being done and to which path to an I/O error.
pub(crate) trait IoAt<T> {
    fn at(self, what: &'static str, path: &Path) -> Result<T, TrainError>;
}

impl<T> IoAt<T> for std::io::Result<T> {
    fn at(self, what: &'static str, path: &Path) -> Result<T, TrainError> {
        self.map_err(|source| TrainError::Io { what, path: path.into(), source })
    }
}
