//! Training recipes (`recipes/*.toml`): every key known, typed and range-checked; unknown keys are
//! errors naming the line (toml's spans) and the keys that exist. Defaults follow PEFT's
//! `LoraConfig` and TRL's `SFTConfig`.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::dpo::DpoSettings;
use super::reference::ReferenceCache;
use super::grpo::GrpoSettings;
use super::distill::DistillSettings;
use crate::generate::GenerateOptions;
use super::kto::KtoSettings;
use super::reward::RewardSettings;
use crate::loss::reward::RewardConfig;
use super::rewards::RewardSpec;
use super::ref_free::RefFreeSettings;
use super::optim::Schedule;
use super::recompute::Recompute;
use super::sft::SftSettings;
use crate::adapters::config::{LoraConfig, LoraInit, Targets};
use crate::backend::DeviceChoice;
use crate::data::prepare::{CacheAt, Overlong, PrepareOptions};
use crate::data::tokenizer::TemplateChoice;
use crate::loss::dpo::{DpoConfig, LossType};
use crate::loss::grpo::{GrpoConfig, GrpoLossType, ScaleRewards};
use crate::loss::distill::{DistillConfig, Divergence};
use crate::loss::kto::KtoConfig;
use crate::loss::ref_free::{CpoLossType, RefFree};
use crate::model::{BaseFormat, LoadOptions};

/// A recipe that does not validate (exit code 2): the file, the line when the TOML parser knows
/// it, the key when one is at fault, and what was expected.
#[derive(Debug, thiserror::Error)]
pub enum RecipeError {
    #[error("cannot read recipe {}", path.display())]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{}{}: {msg}", path.display(), if *with_set { " (with --set)" } else { "" })]
    Invalid {
        path: PathBuf,
        /// 1-based line of the offending text, when known.
        line: Option<usize>,
        /// The key at fault (`train.lr`, `learning_rate`), when known.
        key: Option<String>,
        msg: String,
        with_set: bool,
    },
}

type Result<T> = std::result::Result<T, RecipeError>;

/// The largest `train.micro_batch_size` a recipe may ask for (sequences per forward).
pub const MAX_MICRO_BATCH: usize = 1 << 12;
/// The largest `train.grad_accum`.
pub const MAX_GRAD_ACCUM: usize = 1 << 16;
/// The largest `train.epochs` (more is a typo, not a plan).
pub const MAX_EPOCHS: f64 = 1e6;

/// A validation failure: the key and the message.
type Invalid = (&'static str, String);

fn invalid(key: &'static str, msg: String) -> std::result::Result<(), Invalid> {
    Err((key, msg))
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    pub model: ModelSection,
    pub data: DataSection,
    #[serde(default)]
    pub lora: LoraSection,
    #[serde(default)]
    pub train: TrainSection,
    /// DPO settings (only with `train.method = "dpo"`).
    pub dpo: Option<DpoSection>,
    /// ORPO settings (only with `train.method = "orpo"`).
    pub orpo: Option<OrpoSection>,
    /// CPO settings (only with `train.method = "cpo"`).
    pub cpo: Option<CpoSection>,
    /// SimPO settings (only with `train.method = "simpo"`).
    pub simpo: Option<SimpoSection>,
    /// KTO settings (only with `train.method = "kto"`).
    pub kto: Option<KtoSection>,
    /// GRPO settings (required with `train.method = "grpo"`: the reward functions).
    pub grpo: Option<GrpoSection>,
    /// Distillation settings (required with `train.method = "distill"`: the teacher).
    pub distill: Option<DistillSection>,
    /// Reward-model settings (only with `train.method = "reward"`).
    pub reward: Option<RewardSection>,
    pub output: OutputSection,
}

/// Reward-model settings, with TRL's `RewardConfig` names and defaults.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RewardSection {
    /// Adds `c · mean((r_c + r_r)²)` to the loss (TRL's `center_rewards_coefficient`; off by
    /// default) so that rewards stay centred on zero.
    pub center_rewards_coefficient: Option<f64>,
}

/// Distillation settings (TRL GKD's names where it has them).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DistillSection {
    /// The teacher: a Hugging Face model directory with the student's tokenizer.
    pub teacher: PathBuf,
    /// `"nf4"`: hold the teacher's block weights in 4-bit NF4 (a bitsandbytes 4-bit teacher is
    /// always loaded so).
    pub teacher_quantize: Option<Quantize>,
    /// `forward_kl`, `reverse_kl` or `jsd` (generalized JSD with `beta`).
    #[serde(default = "d_divergence")]
    pub loss: Divergence,
    /// JSD's β (GKD's; 0 = forward KL, 1 = reverse KL).
    #[serde(default = "d_jsd_beta")]
    pub beta: f64,
    /// Divides both models' logits.
    #[serde(default = "d_cpo_alpha")]
    pub temperature: f64,
    /// Adds this times the SFT loss (the assistant tokens' NLL) to the divergence.
    #[serde(default)]
    pub sft_weight: f64,
    /// The share of steps trained on the student's own completions to the data's prompts
    /// (GKD's `lmbda`; TRL's GKDTrainer defaults to 0.5, ft to plain distillation).
    #[serde(default)]
    pub lmbda: f64,
    /// The other steps train on the teacher's completions instead of the data's (GKD's `seq_kd`).
    #[serde(default)]
    pub seq_kd: bool,
    /// Sampling of those completions (GKD's `temperature`, `max_new_tokens`).
    #[serde(default = "d_generation_temperature")]
    pub generation_temperature: f64,
    #[serde(default = "d_distill_new_tokens")]
    pub max_new_tokens: usize,
    /// Scored positions whose logits (teacher's and student's) are formed at a time; default
    /// about 16 Mi logits' worth (341 positions for a 49k vocabulary).
    pub chunk_positions: Option<usize>,
}

fn d_generation_temperature() -> f64 {
    0.9
}
fn d_distill_new_tokens() -> usize {
    128
}

fn d_divergence() -> Divergence {
    Divergence::Jsd
}
fn d_jsd_beta() -> f64 {
    0.5
}

/// ORPO settings, with TRL's `ORPOConfig` names and defaults.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OrpoSection {
    #[serde(default = "d_beta")]
    pub beta: f64,
    /// Prompts longer than this lose tokens from their start.
    pub max_prompt_len: Option<usize>,
}

/// CPO settings, with TRL's `CPOConfig` names and defaults.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CpoSection {
    #[serde(default = "d_beta")]
    pub beta: f64,
    #[serde(default = "d_cpo_loss_type")]
    pub loss_type: CpoLossType,
    #[serde(default)]
    pub label_smoothing: f64,
    #[serde(default = "d_cpo_alpha")]
    pub cpo_alpha: f64,
    /// γ of the `simpo` loss type.
    #[serde(default = "d_gamma")]
    pub simpo_gamma: f64,
    pub max_prompt_len: Option<usize>,
}

/// SimPO settings: the SimPO paper's β 2.0 and γ 0.5 (TRL's `simpo_gamma`), no NLL term
/// (`cpo_alpha = 1` is "CPO-SimPO", what TRL's CPOTrainer does when only the loss type is set).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimpoSection {
    #[serde(default = "d_simpo_beta")]
    pub beta: f64,
    #[serde(default = "d_gamma")]
    pub gamma: f64,
    #[serde(default)]
    pub cpo_alpha: f64,
    #[serde(default)]
    pub label_smoothing: f64,
    pub max_prompt_len: Option<usize>,
}

/// KTO settings, with TRL's `KTOConfig` names and defaults.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KtoSection {
    #[serde(default = "d_beta")]
    pub beta: f64,
    #[serde(default = "d_cpo_alpha")]
    pub desirable_weight: f64,
    #[serde(default = "d_cpo_alpha")]
    pub undesirable_weight: f64,
    /// As `dpo.reference`.
    pub reference: Option<ReferenceChoice>,
    /// As `dpo.precompute_ref`: each row's reference log-probs, of its completion and of its KL
    /// sample, computed once before training.
    #[serde(default)]
    pub precompute_ref: bool,
}

/// GRPO settings, with TRL's `GRPOConfig` names and defaults.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrpoSection {
    #[serde(default = "d_generations")]
    pub num_generations: usize,
    #[serde(default = "d_completion_len")]
    pub max_completion_length: usize,
    #[serde(default = "d_cpo_alpha")]
    pub temperature: f64,
    #[serde(default = "d_cpo_alpha")]
    pub top_p: f64,
    #[serde(default = "d_grpo_loss")]
    pub loss_type: GrpoLossType,
    #[serde(default)]
    pub beta: f64,
    #[serde(default = "d_epsilon")]
    pub epsilon: f64,
    #[serde(default = "d_epsilon_high")]
    pub epsilon_high: f64,
    #[serde(default = "d_scale")]
    pub scale_rewards: ScaleRewards,
    /// Optimizer steps per generation batch (TRL's μ): after the first, the importance ratio
    /// to the sampling policy and clipping with `epsilon`/`epsilon_high` apply.
    #[serde(default = "d_iterations")]
    pub num_iterations: usize,
    /// Leave the tokens of completions cut at `max_completion_length` out of the loss.
    #[serde(default)]
    pub mask_truncated_completions: bool,
    /// Weigh the KL term by the importance ratio (DeepSeek-V3.2's unbiased estimator; TRL's
    /// default off). Equal in value, different in gradient.
    #[serde(default)]
    pub use_bias_correction_kl: bool,
    /// As `dpo.reference` (used when `beta > 0`).
    pub reference: Option<ReferenceChoice>,
    /// The reward functions (`[[grpo.rewards]]`), summed with their weights.
    #[serde(default)]
    pub rewards: Vec<RewardSpec>,
}

fn d_generations() -> usize {
    8
}
fn d_completion_len() -> usize {
    256
}
fn d_grpo_loss() -> GrpoLossType {
    GrpoLossType::Dapo
}
fn d_epsilon() -> f64 {
    0.2
}
fn d_epsilon_high() -> f64 {
    0.28
}
fn d_scale() -> ScaleRewards {
    ScaleRewards::Group
}
fn d_iterations() -> usize {
    1
}

fn d_cpo_loss_type() -> CpoLossType {
    CpoLossType::Sigmoid
}
fn d_cpo_alpha() -> f64 {
    1.0
}
fn d_gamma() -> f64 {
    0.5
}
fn d_simpo_beta() -> f64 {
    2.0
}

/// DPO settings, with TRL's `DPOConfig` names and defaults.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DpoSection {
    #[serde(default = "d_beta")]
    pub beta: f64,
    #[serde(default = "d_loss_type")]
    pub loss_type: LossType,
    /// Label smoothing ε for `sigmoid` (conservative DPO) and `robust`.
    #[serde(default)]
    pub label_smoothing: f64,
    /// Adds `rpo_alpha ×` the chosen completions' NLL to the loss (RPO).
    pub rpo_alpha: Option<f64>,
    /// Prompts longer than this lose tokens from their start (TRL's `keep_end`).
    pub max_prompt_len: Option<usize>,
    /// Compute the reference log-probs once before training and cache them in the run
    /// directory (keyed by model, data, template and lengths); steps then skip the reference
    /// forward.
    #[serde(default)]
    pub precompute_ref: bool,
    /// The reference: `"adapter"` (the starting adapter `model.adapter`, frozen; the default
    /// when there is one, as TRL) or `"base"` (adapters off; the default without one).
    pub reference: Option<ReferenceChoice>,
}

impl Default for DpoSection {
    fn default() -> Self {
        toml::from_str("").expect("defaults")
    }
}

impl DpoSection {
    pub fn config(&self) -> DpoConfig {
        DpoConfig { beta: self.beta, loss_type: self.loss_type, label_smoothing: self.label_smoothing, rpo_alpha: self.rpo_alpha }
    }
}

impl ModelSection {
    /// How the model is loaded: QLoRA keeps the block weights in NF4.
    pub fn load_options(&self) -> LoadOptions {
        LoadOptions { base: if self.quantize == Some(Quantize::Nf4) { BaseFormat::Nf4 } else { BaseFormat::AsStored } }
    }
}

impl LoraSection {
    /// The adapter configuration this section asks for.
    pub fn config(&self) -> LoraConfig {
        LoraConfig {
            r: self.r,
            alpha: self.alpha,
            use_rslora: self.use_rslora,
            dropout: self.dropout,
            targets: self.target_modules.targets(),
            exclude: self.exclude_modules.as_ref().map(TargetModules::targets),
            layers: self.layers_to_transform.clone(),
            base_model: None,
            init: self.init,
            modules_to_save: self.modules_to_save.clone(),
            use_dora: self.use_dora,
            rank_pattern: self.rank_pattern.iter().map(|(k, v)| (k.clone(), *v)).collect(),
            alpha_pattern: self.alpha_pattern.iter().map(|(k, v)| (k.clone(), *v)).collect(),
            target_parameters: self.target_parameters.clone(),
            ensure_weight_tying: self.ensure_weight_tying,
        }
    }
}

fn d_beta() -> f64 {
    0.1
}
fn d_loss_type() -> LossType {
    LossType::Sigmoid
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// Hugging Face model directory.
    pub path: PathBuf,
    /// `"nf4"`: QLoRA, the decoder blocks' linear weights held in 4-bit NF4 (double
    /// quantization, blocksize 64, as bitsandbytes) and dequantized per layer in each forward.
    /// A bitsandbytes 4-bit checkpoint is always loaded this way.
    pub quantize: Option<Quantize>,
    /// Benchmarks: random weights of the shape `path/config.json` describes (no safetensors
    /// needed; `path` still supplies the tokenizer).
    #[serde(default)]
    pub random_init: bool,
    /// A PEFT LoRA adapter (ft's or PEFT's) to start from: training continues it, with its own
    /// rank, alpha, targets and dropout (the [lora] section is not read).
    pub adapter: Option<PathBuf>,
}

/// What DPO compares the policy with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReferenceChoice {
    /// The starting adapter (`model.adapter`), frozen.
    Adapter,
    /// The base model (adapters off).
    Base,
}

fn d_overlong() -> Overlong {
    Overlong::Drop
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Quantize {
    Nf4,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSection {
    /// Training data (see `eval`).
    pub train: PathBuf,
    /// Optional held-out data for eval metrics. Data paths are JSONL files (`.jsonl`,
    /// `.jsonl.gz`), directories of them, or glob patterns; conversations for SFT, preference
    /// pairs for DPO.
    pub eval: Option<PathBuf>,
    #[serde(default = "d_template")]
    pub template: TemplateChoice,
    /// Samples longer than this many tokens are dropped (and counted).
    #[serde(default = "d_max_len")]
    pub max_len: usize,
    /// What happens to a sample longer than `max_len`: `"drop"` it (counted in the summary) or
    /// `"truncate"` it to its first `max_len` tokens (the prompt head is kept).
    #[serde(default = "d_overlong")]
    pub overlong: Overlong,
    /// A sample with no trainable token (every assistant turn `train: false`, or cut away by
    /// truncation) is an error naming its line; with `true` it is dropped and counted instead.
    #[serde(default)]
    pub drop_untrainable: bool,
    /// SFT: pack samples into sequences of `max_len` tokens (best-fit-decreasing; positions
    /// restart per sample and samples never attend to each other).
    #[serde(default)]
    pub packing: bool,
}

/// How a PiSSA / OLoRA run's adapter is saved (`lora.pissa_save`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PissaSave {
    #[default]
    Converted,
    Residual,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraSection {
    #[serde(default = "d_r")]
    pub r: usize,
    #[serde(default = "d_alpha")]
    pub alpha: f64,
    #[serde(default)]
    pub dropout: f64,
    /// Module names (suffix match, as PEFT) or `["all-linear"]`; or one string, a regular
    /// expression the whole module path must match (as PEFT).
    #[serde(default = "d_targets")]
    pub target_modules: TargetModules,
    /// Modules left out although `target_modules` matches them (PEFT's `exclude_modules`).
    #[serde(default)]
    pub exclude_modules: Option<TargetModules>,
    /// Only decoder layers with these indices get adapters (PEFT's `layers_to_transform`).
    #[serde(default)]
    pub layers_to_transform: Option<Vec<usize>>,
    #[serde(default)]
    pub use_rslora: bool,
    /// PEFT's `init_lora_weights`: `"default"` (True), `"gaussian"`, `"random"` (False).
    #[serde(default)]
    pub init: LoraInit,
    /// Modules trained in full beside the adapters (PEFT's `modules_to_save`): `"lm_head"` (an
    /// untied output head), `"score"` (a reward model's head; always trained by
    /// `train.method = "reward"`).
    #[serde(default)]
    pub modules_to_save: Vec<String>,
    /// DoRA (PEFT's `use_dora`): LoRA plus a learned magnitude per output row.
    #[serde(default)]
    pub use_dora: bool,
    /// Per-module ranks (PEFT's `rank_pattern`): `{ "q_proj" = 16, "layers\\.0\\..*" = 4 }`; a
    /// module takes the first key (in key order) whose regex matches the end of its path.
    #[serde(default)]
    pub rank_pattern: std::collections::BTreeMap<String, usize>,
    /// Per-module alphas (PEFT's `alpha_pattern`), matched as `rank_pattern`.
    #[serde(default)]
    pub alpha_pattern: std::collections::BTreeMap<String, f64>,
    /// PEFT's `ensure_weight_tying`: with tied embeddings, `modules_to_save = ["embed_tokens"]`
    /// (or `"lm_head"`) trains one copy that is both the embeddings and the output head.
    #[serde(default)]
    pub ensure_weight_tying: bool,
    /// How a PiSSA / OLoRA run's final adapter is saved: `converted` (a plain LoRA of rank 2r
    /// for the original base, PEFT's `path_initial_model_for_weight_conversion`) or `residual`
    /// (the rank-r adapter plus the residual base as `RUN/residual_model/`).
    #[serde(default)]
    pub pissa_save: PissaSave,
    /// Parameters adapted directly (PEFT's `target_parameters`): the experts' stacks
    /// `mlp.experts.gate_up_proj` / `mlp.experts.down_proj` or the router `mlp.gate.weight`.
    /// `all-linear` and module names already reach the experts; the router only this way.
    #[serde(default)]
    pub target_parameters: Vec<String>,
}

/// `lora.target_modules` (and `exclude_modules`): names or one regular expression.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TargetModules {
    Names(Vec<String>),
    Regex(String),
}

impl TargetModules {
    pub fn targets(&self) -> Targets {
        match self {
            TargetModules::Names(n) => Targets::from_list(n),
            TargetModules::Regex(r) => Targets::parse_string(r),
        }
    }

    /// The names given (none for a regex).
    pub fn names(&self) -> &[String] {
        match self {
            TargetModules::Names(n) => n,
            TargetModules::Regex(_) => &[],
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    Sft,
    Dpo,
    Orpo,
    Cpo,
    Simpo,
    Kto,
    Grpo,
    Distill,
    /// A reward model: a score head on the decoder trained on preference pairs (TRL's
    /// RewardTrainer).
    Reward,
}

impl Method {
    /// Whether the method trains on preference pairs.
    pub fn pairs(self) -> bool {
        !matches!(self, Method::Sft | Method::Grpo | Method::Distill)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainSection {
    #[serde(default = "d_method")]
    pub method: Method,
    #[serde(default = "d_epochs")]
    pub epochs: f64,
    /// Overrides `epochs` when set.
    pub max_steps: Option<usize>,
    #[serde(default = "d_micro")]
    pub micro_batch_size: usize,
    #[serde(default = "d_one")]
    pub grad_accum: usize,
    #[serde(default = "d_lr")]
    pub lr: f64,
    #[serde(default = "d_schedule")]
    pub schedule: Schedule,
    #[serde(default)]
    pub warmup_steps: usize,
    #[serde(default)]
    pub warmup_ratio: f64,
    #[serde(default)]
    pub weight_decay: f64,
    #[serde(default = "d_clip")]
    pub max_grad_norm: f64,
    #[serde(default = "d_seed")]
    pub seed: u64,
    /// Evaluate every N optimizer steps (0 = only at the end).
    #[serde(default)]
    pub eval_every: usize,
    /// Also evaluate before the first step (logged as step 0; TRL's `eval_on_start`).
    #[serde(default)]
    pub eval_on_start: bool,
    /// Keep only each decoder block's input and recompute the block in the backward pass
    /// (`train::recompute`): less memory, one more forward of the blocks; same numbers.
    #[serde(default)]
    pub gradient_checkpointing: bool,
    /// Write `checkpoint-STEP/` every N optimizer steps (0 = never).
    #[serde(default)]
    pub save_every: usize,
    /// Complete checkpoints kept (older ones are deleted).
    #[serde(default = "d_keep")]
    pub keep_last: usize,
    #[serde(default = "d_device")]
    pub device: DeviceChoice,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputSection {
    pub dir: PathBuf,
    /// Trackers fed with every metrics line as the run goes: `"tensorboard"` (event files in
    /// `RUN/tb/`, TRL's names as tags under `train/` and `eval/`), or `"none"`.
    #[serde(default)]
    pub report_to: Vec<String>,
}

fn d_template() -> TemplateChoice {
    TemplateChoice::Model
}
fn d_max_len() -> usize {
    1024
}
fn d_r() -> usize {
    8
}
fn d_alpha() -> f64 {
    8.0
}
fn d_targets() -> TargetModules {
    TargetModules::Names(vec!["all-linear".into()])
}
fn d_method() -> Method {
    Method::Sft
}
fn d_epochs() -> f64 {
    3.0
}
fn d_micro() -> usize {
    8
}
fn d_one() -> usize {
    1
}
fn d_lr() -> f64 {
    2e-5
}
fn d_schedule() -> Schedule {
    Schedule::Linear
}
fn d_clip() -> f64 {
    1.0
}
fn d_seed() -> u64 {
    42
}
fn d_keep() -> usize {
    2
}
fn d_device() -> DeviceChoice {
    DeviceChoice::Cpu
}

impl Default for LoraSection {
    fn default() -> Self {
        toml::from_str("").expect("defaults")
    }
}

impl Default for TrainSection {
    fn default() -> Self {
        toml::from_str("").expect("defaults")
    }
}

/// For serde's "unknown field `x`, expected one of `a`, `b`" message: the valid key meant, by
/// the name TRL / PEFT / transformers give it or by spelling (edit distance ≤ 2 or a prefix).
fn did_you_mean(message: &str) -> String {
    let Some(rest) = message.split("unknown field `").nth(1) else { return String::new() };
    let Some((unknown, rest)) = rest.split_once('`') else { return String::new() };
    let valid: Vec<&str> = rest.split('`').skip(1).step_by(2).collect();
    const ALIASES: [(&str, &str); 14] = [
        ("learning_rate", "lr"),
        ("per_device_train_batch_size", "micro_batch_size"),
        ("batch_size", "micro_batch_size"),
        ("gradient_accumulation_steps", "grad_accum"),
        ("num_train_epochs", "epochs"),
        ("lr_scheduler_type", "schedule"),
        ("lora_alpha", "alpha"),
        ("lora_dropout", "dropout"),
        ("lora_r", "r"),
        ("rank", "r"),
        ("max_seq_length", "max_len"),
        ("max_length", "max_len"),
        ("output_dir", "dir"),
        ("loss", "loss_type"),
    ];
    let alias = ALIASES.iter().find(|(a, v)| *a == unknown && valid.contains(v)).map(|(_, v)| *v);
    let close = || {
        valid
            .iter()
            .map(|v| (edit_distance(unknown, v), *v))
            .filter(|(d, v)| *d <= 2 || (v.len() >= 3 && unknown.starts_with(v)) || (unknown.len() >= 3 && v.starts_with(unknown)))
            .min()
            .map(|(_, v)| v)
    };
    match alias.or_else(close) {
        Some(v) => format!("\ndid you mean `{v}`?"),
        None => String::new(),
    }
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != *cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

impl Recipe {
    /// Reads a recipe and applies `--set key=value` overrides (`train.lr=1e-4`).
    /// Reads and validates a recipe, with `--set key=value` overrides applied.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| RecipeError::Read { path: path.into(), source })?;
        let with_set = !overrides.is_empty();
        let error = |line: Option<usize>, key: Option<String>, msg: String| RecipeError::Invalid { path: path.into(), line, key, msg, with_set };
        let line_of = |e: &toml::de::Error| e.span().map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1);
        let mut doc: toml::Table = text.parse().map_err(|e: toml::de::Error| error(line_of(&e), None, e.to_string()))?;
        for o in overrides {
            let set_error = |msg: &str| error(None, Some(o.clone()), format!("--set {o}: {msg}"));
            let (key, value) = o.split_once('=').ok_or_else(|| set_error("expected key=value"))?;
            let value: toml::Value = format!("v = {value}")
                .parse::<toml::Table>()
                .ok()
                .and_then(|mut t| t.remove("v"))
                .unwrap_or_else(|| toml::Value::String(value.to_string()));
            let mut parts: Vec<&str> = key.split('.').collect();
            let last = parts.pop().filter(|l| !l.is_empty()).ok_or_else(|| set_error("empty key"))?;
            let mut table = &mut doc;
            for p in parts {
                table = table
                    .entry(p)
                    .or_insert_with(|| toml::Value::Table(Default::default()))
                    .as_table_mut()
                    .ok_or_else(|| set_error(&format!("{p} is not a section")))?;
            }
            table.insert(last.to_string(), value);
        }
        let schema_error = |e: toml::de::Error, line: Option<usize>| {
            let msg = e.to_string();
            let key = msg.split("unknown field `").nth(1).and_then(|r| r.split('`').next()).map(String::from);
            error(line, key, format!("{msg}{}", did_you_mean(&msg)))
        };
        let recipe: Recipe = if overrides.is_empty() {
            toml::from_str(&text).map_err(|e| {
                let line = line_of(&e);
                schema_error(e, line)
            })?
        } else {
            Recipe::deserialize(doc).map_err(|e| schema_error(e, None))?
        };
        let mut recipe = recipe;
        // Hugging Face model ids from the local hub cache (paths that exist stay as they are; a
        // path that does not exist yet, or an id not cached, is reported when the model loads).
        recipe.model.path = crate::formats::hf_cache::resolve_if_cached(&recipe.model.path);
        if let Some(d) = recipe.distill.as_mut() {
            d.teacher = crate::formats::hf_cache::resolve_if_cached(&d.teacher);
        }
        recipe.validate().map_err(|(key, msg)| error(None, Some(key.into()), msg))?;
        Ok(recipe)
    }

    /// Checks every range the schema cannot express; the error names the key.
    pub fn validate(&self) -> std::result::Result<(), Invalid> {
        if let Some(r) = self.output.report_to.iter().find(|r| !matches!(r.as_str(), "tensorboard" | "none")) {
            return Err(("output.report_to", format!("output.report_to: {r:?} is not a tracker ft writes (expected \"tensorboard\" or \"none\")")));
        }
        let t = &self.train;
        let l = &self.lora;
        if l.r == 0 {
            return invalid("lora.r", "lora.r must be at least 1".into());
        }
        if !(0.0..1.0).contains(&l.dropout) {
            return invalid("lora.dropout", format!("lora.dropout must be in [0, 1), got {}", l.dropout));
        }
        if !(l.alpha.is_finite() && l.alpha > 0.0) {
            return invalid("lora.alpha", format!("lora.alpha must be a positive number (0 makes the adapter do nothing), got {}", l.alpha));
        }
        if l.use_dora && l.init.split().is_some() {
            return invalid("lora.init", "lora.init = \"pissa\" with lora.use_dora: ft does not combine them".into());
        }
        if l.pissa_save == PissaSave::Residual && l.init.split().is_none() {
            return invalid("lora.pissa_save", "lora.pissa_save = \"residual\" needs lora.init = \"pissa\", \"pissa_niter_N\" or \"olora\" (only they change the base)".into());
        }
        if matches!(l.target_modules, TargetModules::Regex(_)) && l.layers_to_transform.is_some() {
            return invalid("lora.layers_to_transform", "lora.layers_to_transform needs lora.target_modules as a list of names (PEFT refuses it with a regex: put the layer in the regex)".into());
        }
        if let (TargetModules::Regex(re), _) | (_, Some(TargetModules::Regex(re))) = (&l.target_modules, &l.exclude_modules) {
            if crate::adapters::config::pattern_regex(re).is_err() || regex::Regex::new(re).is_err() {
                return invalid("lora.target_modules", format!("lora.target_modules / exclude_modules: {re:?} is not a regular expression"));
            }
        }
        if l.use_dora && l.target_modules.names().iter().any(|t| crate::formats::peft::is_embedding(t)) {
            return invalid("lora.use_dora", "lora.use_dora: ft runs DoRA on linear layers only; leave embed_tokens out of lora.target_modules".into());
        }
        for (k, r) in &l.rank_pattern {
            if let Err(e) = crate::adapters::config::pattern_regex(k) {
                return invalid("lora.rank_pattern", format!("lora.rank_pattern key {k:?}: {e}"));
            }
            if *r == 0 {
                return invalid("lora.rank_pattern", format!("lora.rank_pattern[{k:?}] must be at least 1"));
            }
        }
        for (k, a) in &l.alpha_pattern {
            if let Err(e) = crate::adapters::config::pattern_regex(k) {
                return invalid("lora.alpha_pattern", format!("lora.alpha_pattern key {k:?}: {e}"));
            }
            if !(a.is_finite() && *a > 0.0) {
                return invalid("lora.alpha_pattern", format!("lora.alpha_pattern[{k:?}] must be a positive number"));
            }
        }
        if let Some(m) = l.modules_to_save.iter().find(|m| !crate::formats::peft::MODULES_TO_SAVE.contains(&m.as_str())) {
            return invalid("lora.modules_to_save", format!("lora.modules_to_save: {m:?} cannot be trained in full (ft trains the output heads {:?})", crate::formats::peft::MODULES_TO_SAVE));
        }
        if t.micro_batch_size == 0 || t.grad_accum == 0 {
            return invalid("train.micro_batch_size", "train.micro_batch_size and train.grad_accum must be at least 1".into());
        }
        if t.micro_batch_size > MAX_MICRO_BATCH {
            return invalid("train.micro_batch_size", format!("train.micro_batch_size must be at most {MAX_MICRO_BATCH}, got {}", t.micro_batch_size));
        }
        if t.grad_accum > MAX_GRAD_ACCUM {
            return invalid("train.grad_accum", format!("train.grad_accum must be at most {MAX_GRAD_ACCUM}, got {}", t.grad_accum));
        }
        if t.max_steps == Some(0) {
            return invalid("train.max_steps", "train.max_steps must be at least 1".into());
        }
        if !(t.lr > 0.0 && t.lr.is_finite()) {
            return invalid("train.lr", format!("train.lr must be a positive number, got {}", t.lr));
        }
        if !(0.0..=1.0).contains(&t.warmup_ratio) {
            return invalid("train.warmup_ratio", format!("train.warmup_ratio must be in [0, 1], got {}", t.warmup_ratio));
        }
        // Checked even when train.max_steps decides the length: a NaN or infinite value in a
        // recipe is a mistake wherever it is.
        if !(t.epochs > 0.0 && t.epochs <= MAX_EPOCHS) {
            return invalid("train.epochs", format!("train.epochs must be positive and at most {MAX_EPOCHS} (or set train.max_steps), got {}", t.epochs));
        }
        if !(t.max_grad_norm.is_finite() && t.max_grad_norm >= 0.0) {
            return invalid("train.max_grad_norm", format!("train.max_grad_norm must be a number ≥ 0 (0 = no clipping), got {}", t.max_grad_norm));
        }
        if !(t.weight_decay.is_finite() && t.weight_decay >= 0.0) {
            return invalid("train.weight_decay", format!("train.weight_decay must be a number ≥ 0, got {}", t.weight_decay));
        }
        if self.data.max_len < 2 {
            return invalid("data.max_len", "data.max_len must be at least 2".into());
        }
        if self.data.packing && t.method.pairs() {
            return invalid("data.packing", "data.packing is for SFT; preference methods batch chosen and rejected sequences unpacked".into());
        }
        // A method's section only with that method.
        let sections = [("dpo", Method::Dpo, self.dpo.is_some()), ("orpo", Method::Orpo, self.orpo.is_some()), ("cpo", Method::Cpo, self.cpo.is_some()), ("simpo", Method::Simpo, self.simpo.is_some()), ("kto", Method::Kto, self.kto.is_some()), ("grpo", Method::Grpo, self.grpo.is_some()), ("distill", Method::Distill, self.distill.is_some()), ("reward", Method::Reward, self.reward.is_some())];
        for (name, method, set) in sections {
            if set && t.method != method {
                return invalid(name, format!("a [{name}] section is set but train.method is {:?} (set train.method = \"{name}\")", format!("{:?}", t.method).to_lowercase()));
            }
        }
        let positive = |key: &'static str, v: f64| if v > 0.0 && v.is_finite() { Ok(()) } else { Err((key, format!("{key} must be a positive number, got {v}"))) };
        let smoothing = |key: &'static str, v: f64| if (0.0..0.5).contains(&v) { Ok(()) } else { Err((key, format!("{key} must be in [0, 0.5), got {v}"))) };
        let non_negative = |key: &'static str, v: f64| if v >= 0.0 && v.is_finite() { Ok(()) } else { Err((key, format!("{key} must be a number ≥ 0, got {v}"))) };
        let prompt = |key: &'static str, m: Option<usize>| match m {
            Some(m) if m == 0 || m >= self.data.max_len => Err((key, format!("{key} must be between 1 and data.max_len - 1"))),
            _ => Ok(()),
        };
        if let Some(o) = &self.orpo {
            positive("orpo.beta", o.beta)?;
            prompt("orpo.max_prompt_len", o.max_prompt_len)?;
        }
        if let Some(c) = &self.cpo {
            positive("cpo.beta", c.beta)?;
            smoothing("cpo.label_smoothing", c.label_smoothing)?;
            non_negative("cpo.cpo_alpha", c.cpo_alpha)?;
            if !c.simpo_gamma.is_finite() {
                return invalid("cpo.simpo_gamma", format!("cpo.simpo_gamma must be a number, got {}", c.simpo_gamma));
            }
            prompt("cpo.max_prompt_len", c.max_prompt_len)?;
        }
        if let Some(c) = &self.simpo {
            positive("simpo.beta", c.beta)?;
            smoothing("simpo.label_smoothing", c.label_smoothing)?;
            non_negative("simpo.cpo_alpha", c.cpo_alpha)?;
            if !c.gamma.is_finite() {
                return invalid("simpo.gamma", format!("simpo.gamma must be a number, got {}", c.gamma));
            }
            prompt("simpo.max_prompt_len", c.max_prompt_len)?;
        }
        match (&self.distill, t.method) {
            (None, Method::Distill) => return invalid("distill", "train.method = \"distill\" needs a [distill] section with the teacher (distill.teacher = \"DIR\")".into()),
            (Some(d), _) => {
                if !(0.0..=1.0).contains(&d.beta) {
                    return invalid("distill.beta", format!("distill.beta must be in [0, 1], got {}", d.beta));
                }
                positive("distill.temperature", d.temperature)?;
                non_negative("distill.sft_weight", d.sft_weight)?;
                if !(0.0..=1.0).contains(&d.lmbda) {
                    return invalid("distill.lmbda", format!("distill.lmbda must be in [0, 1], got {}", d.lmbda));
                }
                positive("distill.generation_temperature", d.generation_temperature)?;
                if d.max_new_tokens == 0 {
                    return invalid("distill.max_new_tokens", "distill.max_new_tokens must be at least 1".into());
                }
                if (d.lmbda > 0.0 || d.seq_kd) && self.data.packing {
                    return invalid("data.packing", "data.packing cannot be combined with distill.lmbda > 0 or distill.seq_kd: generated completions are batched unpacked".into());
                }
            }
            _ => {}
        }
        if t.method == Method::Grpo && self.data.packing {
            return invalid("data.packing", "data.packing is for SFT; GRPO scores sampled completions unpacked".into());
        }
        match (&self.grpo, t.method) {
            (None, Method::Grpo) => return invalid("grpo", "train.method = \"grpo\" needs a [grpo] section with at least one [[grpo.rewards]]".into()),
            (Some(g), _) => {
                if g.num_generations < 2 {
                    return invalid("grpo.num_generations", format!("grpo.num_generations must be at least 2 (advantages compare a group), got {}", g.num_generations));
                }
                if g.max_completion_length == 0 || g.max_completion_length >= self.data.max_len {
                    return invalid("grpo.max_completion_length", "grpo.max_completion_length must be between 1 and data.max_len - 1".into());
                }
                positive("grpo.temperature", g.temperature)?;
                if !(g.top_p > 0.0 && g.top_p <= 1.0) {
                    return invalid("grpo.top_p", format!("grpo.top_p must be in (0, 1], got {}", g.top_p));
                }
                non_negative("grpo.beta", g.beta)?;
                non_negative("grpo.epsilon", g.epsilon)?;
                non_negative("grpo.epsilon_high", g.epsilon_high)?;
                if g.num_iterations == 0 {
                    return invalid("grpo.num_iterations", "grpo.num_iterations: at least 1 (the steps each generation batch serves)".into());
                }
                if g.rewards.is_empty() {
                    return invalid("grpo.rewards", "GRPO needs at least one [[grpo.rewards]] function".into());
                }
                for r in &g.rewards {
                    if let Err(e) = r.check() {
                        return invalid("grpo.rewards", e.to_string());
                    }
                }
                if g.reference == Some(ReferenceChoice::Adapter) && self.model.adapter.is_none() {
                    return invalid("grpo.reference", "grpo.reference = \"adapter\" needs model.adapter (the adapter to start from)".into());
                }
            }
            _ => {}
        }
        if self.distill.as_ref().is_some_and(|d| d.chunk_positions == Some(0)) {
            return invalid("distill.chunk_positions", "distill.chunk_positions must be at least 1".into());
        }
        if let Some(c) = self.reward.as_ref().and_then(|r| r.center_rewards_coefficient) {
            non_negative("reward.center_rewards_coefficient", c)?;
        }
        if let Some(k) = &self.kto {
            positive("kto.beta", k.beta)?;
            non_negative("kto.desirable_weight", k.desirable_weight)?;
            non_negative("kto.undesirable_weight", k.undesirable_weight)?;
            if k.reference == Some(ReferenceChoice::Adapter) && self.model.adapter.is_none() {
                return invalid("kto.reference", "kto.reference = \"adapter\" needs model.adapter (the adapter to start from)".into());
            }
        }
        if let Some(d) = &self.dpo {
            positive("dpo.beta", d.beta)?;
            smoothing("dpo.label_smoothing", d.label_smoothing)?;
            if d.rpo_alpha.is_some_and(|a| !(a >= 0.0 && a.is_finite())) {
                return invalid("dpo.rpo_alpha", "dpo.rpo_alpha must not be negative".into());
            }
            prompt("dpo.max_prompt_len", d.max_prompt_len)?;
            if d.reference == Some(ReferenceChoice::Adapter) && self.model.adapter.is_none() {
                return invalid("dpo.reference", "dpo.reference = \"adapter\" needs model.adapter (the adapter to start from)".into());
            }
        }
        Ok(())
    }

    /// How the training data is prepared (SFT and DPO alike).
    pub fn prepare_options(&self) -> PrepareOptions {
        let d = &self.data;
        // Tokenized data is cached beside the run directory (`.ft-cache/`).
        let cache_dir = self.output.dir.parent().unwrap_or(Path::new(".")).join(".ft-cache");
        PrepareOptions {
            max_len: d.max_len,
            overlong: d.overlong,
            drop_untrainable: d.drop_untrainable,
            max_prompt_len: self.dpo.as_ref().and_then(|p| p.max_prompt_len),
            cache: Some(CacheAt { dir: cache_dir, model_dir: self.model.path.clone() }),
        }
    }

    fn recompute(&self) -> Recompute {
        if self.train.gradient_checkpointing {
            Recompute::PerBlock
        } else {
            Recompute::Off
        }
    }

    /// The SFT objective's settings.
    pub fn sft_settings(&self) -> SftSettings {
        SftSettings {
            train: self.data.train.clone(),
            eval: self.data.eval.clone(),
            prepare: self.prepare_options(),
            packing: self.data.packing,
            recompute: self.recompute(),
        }
    }

    /// The DPO objective's settings.
    pub fn dpo_settings(&self) -> DpoSettings {
        let section = self.dpo.clone().unwrap_or_default();
        let mut prepare = self.prepare_options();
        // Pairs longer than max_len are dropped (DPO never truncates a side).
        prepare.overlong = Overlong::Drop;
        DpoSettings {
            config: section.config(),
            train: self.data.train.clone(),
            eval: self.data.eval.clone(),
            prepare,
            reference_cache: self.reference_cache(section.precompute_ref),
            recompute: self.recompute(),
        }
    }

    /// Where precomputed reference log-probs go (`precompute_ref`): the run directory.
    fn reference_cache(&self, precompute: bool) -> Option<ReferenceCache> {
        precompute.then(|| ReferenceCache {
            path: self.output.dir.join("reference_logps.json"),
            model_dir: self.model.path.clone(),
            adapter: self.reference_is_start_adapter().then(|| self.model.adapter.clone()).flatten(),
        })
    }

    /// Whether DPO's reference is the frozen starting adapter (`model.adapter` set and
    /// `dpo.reference` not "base").
    pub fn reference_is_start_adapter(&self) -> bool {
        let choice = self.dpo.as_ref().and_then(|d| d.reference).or(self.kto.as_ref().and_then(|k| k.reference)).or(self.grpo.as_ref().and_then(|g| g.reference));
        self.model.adapter.is_some() && choice != Some(ReferenceChoice::Base)
    }

    /// GRPO's settings; `stop_ids` end a completion.
    pub fn grpo_settings(&self, stop_ids: Vec<u32>) -> GrpoSettings {
        let g = self.grpo.clone().unwrap_or_else(|| toml::from_str("").expect("defaults"));
        GrpoSettings {
            config: GrpoConfig {
                loss_type: g.loss_type,
                beta: g.beta,
                epsilon: g.epsilon,
                epsilon_high: g.epsilon_high,
                scale_rewards: g.scale_rewards,
                max_completion_length: g.max_completion_length,
                bias_correction_kl: g.use_bias_correction_kl,
            },
            train: self.data.train.clone(),
            eval: self.data.eval.clone(),
            num_generations: g.num_generations,
            num_iterations: g.num_iterations,
            temperature: g.temperature as f32,
            top_p: g.top_p as f32,
            mask_truncated_completions: g.mask_truncated_completions,
            rewards: g.rewards,
            seed: self.train.seed,
            stop_ids,
            recompute: self.recompute(),
        }
    }

    /// Distillation's settings; `stop_ids` end sampled completions.
    pub fn distill_settings(&self, stop_ids: Vec<u32>) -> Option<DistillSettings> {
        let d = self.distill.as_ref()?;
        Some(DistillSettings {
            config: DistillConfig { divergence: d.loss, beta: d.beta, temperature: d.temperature },
            sft_weight: d.sft_weight,
            data: self.sft_settings(),
            teacher: d.teacher.clone(),
            lmbda: d.lmbda,
            seq_kd: d.seq_kd,
            generation: GenerateOptions { max_new_tokens: d.max_new_tokens, temperature: d.generation_temperature as f32, top_p: 1.0, seed: 0, ignore_eos: false, stop_ids },
            seed: self.train.seed,
            chunk_positions: d.chunk_positions,
        })
    }

    /// The reward model's settings.
    pub fn reward_settings(&self) -> RewardSettings {
        let r = self.reward.clone().unwrap_or_default();
        let mut prepare = self.prepare_options();
        prepare.overlong = Overlong::Drop;
        RewardSettings {
            config: RewardConfig { center_rewards_coefficient: r.center_rewards_coefficient },
            train: self.data.train.clone(),
            eval: self.data.eval.clone(),
            prepare,
            recompute: self.recompute(),
        }
    }

    /// KTO's settings.
    pub fn kto_settings(&self) -> KtoSettings {
        let k = self.kto.clone().unwrap_or_else(|| toml::from_str("").expect("defaults"));
        let mut prepare = self.prepare_options();
        prepare.overlong = Overlong::Drop;
        KtoSettings {
            config: KtoConfig { beta: k.beta, desirable_weight: k.desirable_weight, undesirable_weight: k.undesirable_weight },
            train: self.data.train.clone(),
            eval: self.data.eval.clone(),
            prepare,
            kl_block: self.train.micro_batch_size,
            reference_cache: self.reference_cache(k.precompute_ref),
            recompute: self.recompute(),
        }
    }

    /// The reference-free preference objective's settings (ORPO, CPO, SimPO).
    pub fn ref_free_settings(&self) -> RefFreeSettings {
        let (objective, max_prompt_len) = match self.train.method {
            Method::Orpo => {
                let o = self.orpo.clone().unwrap_or_else(|| toml::from_str("").expect("defaults"));
                (RefFree::Orpo { beta: o.beta }, o.max_prompt_len)
            }
            Method::Simpo => {
                let o = self.simpo.clone().unwrap_or_else(|| toml::from_str("").expect("defaults"));
                let c = RefFree::Cpo { beta: o.beta, loss_type: CpoLossType::Simpo, label_smoothing: o.label_smoothing, cpo_alpha: o.cpo_alpha, simpo_gamma: o.gamma };
                (c, o.max_prompt_len)
            }
            _ => {
                let o = self.cpo.clone().unwrap_or_else(|| toml::from_str("").expect("defaults"));
                let c = RefFree::Cpo { beta: o.beta, loss_type: o.loss_type, label_smoothing: o.label_smoothing, cpo_alpha: o.cpo_alpha, simpo_gamma: o.simpo_gamma };
                (c, o.max_prompt_len)
            }
        };
        let mut prepare = self.prepare_options();
        prepare.overlong = Overlong::Drop;
        prepare.max_prompt_len = max_prompt_len;
        RefFreeSettings { objective, train: self.data.train.clone(), eval: self.data.eval.clone(), prepare, recompute: self.recompute() }
    }

    /// The recipe with every default filled in, as TOML (saved into the run directory).
    pub fn resolved_toml(&self) -> String {
        toml::to_string_pretty(self).expect("recipe serializes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(text: &str) -> PathBuf {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let p = std::env::temp_dir().join(format!("ft-recipe-{}-{n}.toml", std::process::id()));
        std::fs::write(&p, text).unwrap();
        p
    }

    const MIN: &str = "[model]\npath = \"m\"\n[data]\ntrain = \"t.jsonl\"\n[output]\ndir = \"out\"\n";

    #[test]
    fn defaults_follow_peft_and_trl() {
        let r = Recipe::load(&write(MIN), &[]).unwrap();
        assert_eq!((r.lora.r, r.lora.alpha, r.lora.dropout), (8, 8.0, 0.0));
        assert_eq!(r.train.lr, 2e-5);
        assert_eq!(r.train.max_grad_norm, 1.0);
        assert_eq!(r.train.schedule, Schedule::Linear);
        // Without their sections, the reference-free methods take TRL's defaults (SimPO the
        // paper's β 2 and no NLL term).
        for (method, want) in [("orpo", RefFree::orpo()), ("cpo", RefFree::cpo()), ("simpo", RefFree::simpo())] {
            let r = Recipe::load(&write(MIN), &[format!("train.method=\"{method}\"")]).unwrap();
            assert_eq!(r.ref_free_settings().objective, want, "{method}");
        }
        assert_eq!(RefFree::orpo(), RefFree::Orpo { beta: 0.1 });
        // A method's section with another method, and out-of-range values, name the key.
        for (set, key) in [
            (vec!["orpo.beta=0.2"], "orpo"),
            (vec!["train.method=\"simpo\"", "simpo.beta=0"], "simpo.beta"),
            (vec!["train.method=\"cpo\"", "cpo.label_smoothing=0.5"], "cpo.label_smoothing"),
            (vec!["train.method=\"cpo\"", "cpo.cpo_alpha=nan"], "cpo.cpo_alpha"),
            (vec!["train.method=\"orpo\"", "data.packing=true"], "data.packing"),
        ] {
            let sets: Vec<String> = set.iter().map(|s| s.to_string()).collect();
            let e = Recipe::load(&write(MIN), &sets).unwrap_err().to_string();
            assert!(e.contains(key), "{set:?}: {e}");
        }
    }

    #[test]
    fn shipped_recipes_are_valid() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("recipes");
        let mut n = 0;
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "toml") {
                Recipe::load(&p, &[]).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
                n += 1;
            }
        }
        assert!(n >= 5, "{n} recipes");
    }

    #[test]
    fn unknown_keys_and_bad_values_name_the_line() {
        let e = Recipe::load(&write(&format!("{MIN}[train]\nlearning_rate = 1e-4\n")), &[]).unwrap_err().to_string();
        assert!(e.contains("line 8") && e.contains("unknown field `learning_rate`") && e.contains("`lr`"), "{e}");
        let e = Recipe::load(&write(&format!("{MIN}[train]\nlr = \"fast\"\n")), &[]).unwrap_err().to_string();
        assert!(e.contains("line 8") && e.contains("lr"), "{e}");
        let e = Recipe::load(&write(&format!("{MIN}[train]\nlearning_rate = 1e-4\n")), &[]).unwrap_err().to_string();
        assert!(e.contains("line") && e.contains("learning_rate") && e.contains("did you mean `lr`?"), "{e}");
        let e = Recipe::load(&write(&format!("{MIN}[train]\nmicro_bach_size = 2\n")), &[]).unwrap_err().to_string();
        assert!(e.contains("did you mean `micro_batch_size`?"), "{e}");
        let e = Recipe::load(&write(MIN), &["lora.lora_alpha=8".to_string()]).unwrap_err().to_string();
        assert!(e.contains("did you mean `alpha`?"), "{e}");
        let e = Recipe::load(&write(&format!("{MIN}[train]\nzzz = 1\n")), &[]).unwrap_err().to_string();
        assert!(!e.contains("did you mean"), "{e}");
        let e = Recipe::load(&write(&format!("{MIN}[lora]\ndropout = 1.5\n")), &[]).unwrap_err().to_string();
        assert!(e.contains("lora.dropout"), "{e}");
    }

    #[test]
    fn recipe_errors_carry_file_line_and_key() {
        let path = write(&format!("{MIN}[train]\nlearning_rate = 1e-4\n"));
        match Recipe::load(&path, &[]).unwrap_err() {
            RecipeError::Invalid { path: p, line, key, .. } => {
                assert_eq!((p, line, key.as_deref()), (path, Some(8), Some("learning_rate")));
            }
            e => panic!("{e}"),
        }
        let path = write(&format!("{MIN}[train]\nlr = -1.0\n"));
        match Recipe::load(&path, &[]).unwrap_err() {
            RecipeError::Invalid { key, .. } => assert_eq!(key.as_deref(), Some("train.lr")),
            e => panic!("{e}"),
        }
    }

    #[test]
    fn numbers_are_checked_where_they_enter() {
        for (set, key) in [
            ("lora.alpha=0", "lora.alpha"),
            ("lora.alpha=nan", "lora.alpha"),
            ("train.weight_decay=inf", "train.weight_decay"),
            ("train.max_grad_norm=nan", "train.max_grad_norm"),
            ("train.max_steps=0", "train.max_steps"),
            ("train.epochs=1e300", "train.epochs"),
            ("train.epochs=nan", "train.epochs"),
            ("train.micro_batch_size=1000000000", "train.micro_batch_size"),
            ("train.grad_accum=100000000000", "train.grad_accum"),
        ] {
            match Recipe::load(&write(MIN), &[set.to_string()]) {
                Err(RecipeError::Invalid { key: Some(k), msg, .. }) => assert_eq!(k, key, "{set}: {msg}"),
                other => panic!("{set}: {:?}", other.map(|_| ())),
            }
        }
        // Large but plannable: a run this long is generated step by step, never listed.
        assert!(Recipe::load(&write(MIN), &["train.max_steps=9223372036854775807".to_string()]).is_ok());
    }

    #[test]
    fn set_overrides_keys() {
        let r = Recipe::load(&write(MIN), &["train.lr=1e-3".into(), "lora.r=4".into()]).unwrap();
        assert_eq!((r.train.lr, r.lora.r), (1e-3, 4));
        assert!(Recipe::load(&write(MIN), &["train.lrr=1".into()]).is_err());
    }
}
