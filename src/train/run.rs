//! The training loop, read top to bottom: run directory, data (through the method's
//! [`Objective`]), model and adapters, then per step: learning rate, micro-batches, step, log,
//! checkpoint, eval; finally the adapter and the summary. SFT and DPO differ only in their
//! objective.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use burn::module::AutodiffModule;
use crate::backend::TrainBackend;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde_json::{Map, Value};

use super::checkpoint::{self, TrainState};
use super::optim::{learning_rate, AdamW};
use super::recipe::{Method, Recipe};
use super::step::trainable_params;
use crate::adapters::lora::Lora;
use crate::adapters::peft::{self, LoraConfig, Targets};
use crate::model::Decoder;
use crate::tokenizer::TextTokenizer;

/// What a training method contributes to the loop: its examples, one optimizer step over
/// micro-batches of example indices, and its eval metrics.
pub trait Objective<B: TrainBackend> {
    /// Training examples (samples for SFT, pairs for DPO).
    fn len(&self) -> usize;
    /// What preparing the training data dropped or truncated.
    fn data_counts(&self) -> super::sft::PrepareCounts;
    /// Work before the first step, given the examples the run will visit (DPO precomputes its
    /// reference log-probs here).
    fn before_training(&mut self, _model: &mut Decoder<B>, _upcoming: &[usize]) -> Result<()> {
        Ok(())
    }
    /// One optimizer step (forward, backward, update) over `micro`.
    fn step(&mut self, model: &mut Decoder<B>, opt: &mut AdamW<B::InnerBackend>, micro: &[Vec<usize>], lr: f64, max_grad_norm: f64) -> StepReport;
    /// Metrics on the eval split (names prefixed `eval_`, including `eval_loss`), if there is one.
    /// Runs on the inner backend: no autodiff graph is recorded.
    fn evaluate(&mut self, model: &mut Decoder<B::InnerBackend>) -> Option<Map<String, Value>>;
}

/// What one optimizer step measured.
pub struct StepReport {
    pub loss: f64,
    pub grad_norm: f64,
    /// Non-padding input tokens processed.
    pub input_tokens: usize,
    /// The method's metrics with TRL's names (including `loss`).
    pub metrics: Map<String, Value>,
}

/// What a finished run reports (also written to `RUN/summary.json`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct Summary {
    pub output_dir: PathBuf,
    pub steps: usize,
    pub epochs: f64,
    pub method: Method,
    /// Training examples: samples (SFT) or pairs (DPO).
    pub train_samples: usize,
    pub dropped_too_long: usize,
    /// Samples cut to `data.max_len` (`data.overlong = "truncate"`).
    pub truncated: usize,
    /// Samples without trainable tokens dropped (`data.drop_untrainable`).
    pub dropped_untrainable: usize,
    pub trainable_parameters: usize,
    /// Resident bytes per parameter of the decoder blocks' frozen linear weights: 4 for f32,
    /// about 0.56 for NF4 (codes and f32 absmax).
    pub base_bytes_per_parameter: f64,
    pub final_loss: f64,
    pub eval_loss: Option<f64>,
    /// Input tokens processed (prompt and completion, no padding), as TRL's `num_tokens`.
    pub train_tokens: usize,
    pub seconds: f64,
    pub tokens_per_s: f64,
    /// Seconds spent in optimizer steps (this process), and their input tokens per second.
    pub step_seconds: f64,
    pub step_tokens_per_s: f64,
    /// CUDA runs: the most device memory ft's allocator held after any step.
    pub peak_gpu_reserved_gib: Option<f64>,
}

/// The adapter configuration a recipe asks for.
pub fn lora_config(recipe: &Recipe) -> LoraConfig {
    let l = &recipe.lora;
    let targets = if l.target_modules.iter().any(|t| t == "all-linear") {
        Targets::AllLinear
    } else {
        Targets::Names(l.target_modules.clone())
    };
    LoraConfig { r: l.r, alpha: l.alpha, use_rslora: l.use_rslora, dropout: l.dropout, targets, base_model: None, init: l.init }
}

/// Attaches freshly initialised adapters (PEFT init) to the projections the recipe targets.
/// The RNG is seeded first, so the same seed gives the same adapters.
pub fn attach_new_adapters<B: TrainBackend>(model: &mut Decoder<B>, recipe: &Recipe) -> Result<LoraConfig> {
    let l = &recipe.lora;
    let config = lora_config(recipe);
    let mut rng = StdRng::seed_from_u64(recipe.train.seed);
    let device = model.device();
    let scale = config.scale();
    let mut n = 0;
    for (name, proj) in model.projections_mut() {
        if config.targets.matches(&name) {
            let (d_in, d_out) = proj.dims();
            let mut lora = Lora::init(d_in, d_out, l.r, scale, l.init, &mut rng, &device);
            lora.dropout = l.dropout;
            proj.lora = Some(lora);
            n += 1;
        }
    }
    if n == 0 {
        bail!("lora.target_modules {:?} matches no module of the model", l.target_modules);
    }
    Ok(config)
}

/// Trains as the recipe says (SFT or DPO), writing the run directory.
/// With `resume`, continues from the newest complete checkpoint in the output directory (the
/// recipe must be the one the run started with); on CPU the result is bit-identical to an
/// uninterrupted run.
pub fn run<B: TrainBackend>(recipe: &Recipe, device: B::Device, quiet: bool, resume: bool) -> Result<Summary> {
    let t0 = Instant::now();
    let out = &recipe.output.dir;
    let resolved = recipe.resolved_toml();
    let non_empty = out.exists() && std::fs::read_dir(out).map(|mut d| d.next().is_some()).unwrap_or(false);
    if resume {
        let saved = std::fs::read_to_string(out.join("recipe.resolved.toml"))
            .with_context(|| format!("--resume: {} holds no run to resume", out.display()))?;
        if saved != resolved {
            bail!("--resume: the recipe differs from the one {} was started with (see its recipe.resolved.toml)", out.display());
        }
    } else if non_empty {
        bail!("output directory {} already exists and is not empty (use --resume to continue it)", out.display());
    } else {
        std::fs::create_dir_all(out).with_context(|| format!("cannot create output directory {}", out.display()))?;
        crate::fsutil::write_atomic(&out.join("recipe.resolved.toml"), resolved.as_bytes())?;
    }

    let tok = TextTokenizer::from_dir(&recipe.model.path)?;
    let quantize = recipe.model.quantize == Some(super::recipe::Quantize::Nf4);
    let mut model = if recipe.model.random_init {
        crate::model::random::<B>(&recipe.model.path, &device, quantize, recipe.train.seed)?
    } else {
        crate::model::load_with::<B>(&recipe.model.path, &device, quantize)?
    };
    let (base_bytes, base_params) = model.block_weight_bytes();
    let mut objective: Box<dyn Objective<B>> = match recipe.train.method {
        Method::Sft => Box::new(super::sft::Sft::new(&tok, recipe)?),
        Method::Dpo => Box::new(super::dpo::Dpo::new(&tok, recipe, quiet)?),
    };
    let n_examples = objective.len();
    let loaded = if resume { checkpoint::load_latest::<B::InnerBackend>(out, &device)? } else { None };
    let lora_config = match &loaded {
        Some(ck) => {
            peft::PeftAdapter::open(&ck.dir.join("adapter"))?.attach(&mut model)?;
            make_trainable(&mut model, recipe.lora.dropout);
            lora_config(recipe)
        }
        None => attach_new_adapters(&mut model, recipe)?,
    };
    let params = trainable_params(&mut model);
    let trainable_parameters: usize = params.iter().map(|p| p.shape().num_elements()).sum();
    let t = &recipe.train;
    let mut opt = AdamW::new(&params, t.weight_decay);
    let mut state = TrainState { step: 0, epoch: 0, cursor: 0, tokens_seen: 0, optimizer_t: 0 };
    if let Some(ck) = loaded {
        opt.restore(ck.m, ck.v, ck.state.optimizer_t);
        state = ck.state;
        if !quiet {
            eprintln!("resuming from {} (step {})", ck.dir.display(), state.step);
        }
    }

    let per_step = t.micro_batch_size * t.grad_accum;
    let steps_per_epoch = n_examples.div_ceil(per_step);
    let total = t.max_steps.unwrap_or_else(|| (t.epochs * steps_per_epoch as f64).ceil() as usize).max(1);
    let warmup = if t.warmup_steps > 0 { t.warmup_steps } else { (t.warmup_ratio * total as f64).ceil() as usize };

    let mut data = DataOrder::new(t.seed, n_examples, state.epoch, state.cursor);
    // The examples the remaining steps will visit, in order.
    let mut ahead = data.clone();
    let upcoming: Vec<usize> = (0..total.saturating_sub(state.step) * per_step).map(|_| ahead.next_index()).collect();
    objective.before_training(&mut model, &upcoming)?;
    let mut metrics = open_metrics(&out.join("metrics.jsonl"), state.step)?;
    let (mut last_loss, mut tokens_seen, mut eval_loss) = (f64::NAN, state.tokens_seen, None);
    // Time and tokens inside optimizer steps only (no loading, reference precompute or eval).
    let (mut step_seconds, mut step_tokens) = (0.0, 0usize);
    let mut peak_gpu = 0f64;
    // A progress bar on a terminal; plain periodic lines otherwise (CI logs).
    let bar = (!quiet && std::io::IsTerminal::is_terminal(&std::io::stderr())).then(|| {
        let b = indicatif::ProgressBar::new(total as u64).with_position(state.step as u64);
        b.set_style(
            indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} steps [{elapsed_precise}<{eta_precise}] {msg}")
                .expect("template"),
        );
        b
    });
    let log_every = (total / 20).max(1);
    for step in state.step..total {
        // Dropout masks are a function of (seed, step), so a resumed run draws the same ones.
        B::seed(&device, t.seed ^ ((step as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15)));
        let lr = learning_rate(t.lr, t.schedule, step, total, warmup);
        let micro: Vec<Vec<usize>> =
            (0..t.grad_accum).map(|_| (0..t.micro_batch_size).map(|_| data.next_index()).collect()).collect();
        model.set_training(true);
        let ts = Instant::now();
        let stats = objective.step(&mut model, &mut opt, &micro, lr, t.max_grad_norm);
        let step_s = ts.elapsed().as_secs_f64();
        step_seconds += step_s;
        step_tokens += stats.input_tokens;
        model.set_training(false);
        if !stats.loss.is_finite() || !stats.grad_norm.is_finite() {
            bail!(Divergence { step: step + 1, loss: stats.loss, grad_norm: stats.grad_norm });
        }
        last_loss = stats.loss;
        tokens_seen += stats.input_tokens;
        let secs = t0.elapsed().as_secs_f64();
        let mut line = Map::new();
        line.insert("step".into(), (step + 1).into());
        line.insert("epoch".into(), data.progress().into());
        line.extend(stats.metrics);
        line.insert("grad_norm".into(), stats.grad_norm.into());
        line.insert("learning_rate".into(), lr.into());
        line.insert("num_tokens".into(), tokens_seen.into());
        line.insert("tokens_per_s".into(), (tokens_seen as f64 / secs).into());
        line.insert("step_s".into(), step_s.into());
        if let Some((in_use, reserved)) = crate::backend::gpu_memory() {
            let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
            peak_gpu = peak_gpu.max(gib(reserved));
            line.insert("gpu_mem_gib".into(), gib(in_use).into());
            line.insert("gpu_reserved_gib".into(), gib(reserved).into());
        }
        let line = Value::Object(line);
        writeln!(metrics, "{line}")?;
        let mut msg = format!("loss {:.4} grad_norm {:.3} lr {:.2e}", stats.loss, stats.grad_norm, lr);
        if let (Some(acc), Some(margin)) = (line["rewards/accuracies"].as_f64(), line["rewards/margins"].as_f64()) {
            msg.push_str(&format!(" reward acc {acc:.2} margin {margin:.3}"));
        }
        match &bar {
            Some(b) => {
                b.set_message(msg);
                b.inc(1);
            }
            None if !quiet && ((step + 1) % log_every == 0 || step + 1 == total || step == state.step) => {
                eprintln!("step {}/{total} {msg} ({:.0} tokens/s)", step + 1, tokens_seen as f64 / secs);
            }
            None => {}
        }
        let last = step + 1 == total;
        let interrupted = INTERRUPTED.load(std::sync::atomic::Ordering::SeqCst);
        if (t.save_every > 0 && (step + 1) % t.save_every == 0 && !last) || (interrupted && !last) {
            metrics.sync_all()?;
            let st = TrainState { step: step + 1, epoch: data.epoch, cursor: data.cursor, tokens_seen, optimizer_t: opt.t };
            let (m, v) = opt.moments();
            let cfg = lora_config.clone();
            let base = recipe.model.path.display().to_string();
            let saved = checkpoint::save(out, &st, |dir| peft::save(&mut model, &cfg, &base, dir), &m, &v, t.keep_last)?;
            if interrupted {
                bail!(Interrupted { checkpoint: saved });
            }
        }
        if last || (t.eval_every > 0 && (step + 1) % t.eval_every == 0) {
            if let Some(mut m) = objective.evaluate(&mut model.valid()) {
                eval_loss = m.get("eval_loss").and_then(Value::as_f64);
                let mut line = Map::new();
                line.insert("step".into(), (step + 1).into());
                line.append(&mut m);
                writeln!(metrics, "{}", Value::Object(line))?;
            }
        }
    }
    if let Some(b) = &bar {
        b.finish();
    }
    metrics.sync_all()?;
    write_loss_svg(out)?;
    peft::save(&mut model, &lora_config, &recipe.model.path.display().to_string(), &out.join("adapter"))?;
    let seconds = t0.elapsed().as_secs_f64();
    let counts = objective.data_counts();
    let summary = Summary {
        output_dir: out.clone(),
        steps: total,
        epochs: total as f64 / steps_per_epoch as f64,
        method: recipe.train.method,
        train_samples: n_examples,
        dropped_too_long: counts.dropped_too_long,
        truncated: counts.truncated,
        dropped_untrainable: counts.dropped_untrainable,
        trainable_parameters,
        base_bytes_per_parameter: base_bytes as f64 / base_params.max(1) as f64,
        final_loss: last_loss,
        eval_loss,
        train_tokens: tokens_seen,
        seconds,
        tokens_per_s: tokens_seen as f64 / seconds,
        step_seconds,
        step_tokens_per_s: step_tokens as f64 / step_seconds.max(1e-9),
        peak_gpu_reserved_gib: (peak_gpu > 0.0).then_some(peak_gpu),
    };
    crate::fsutil::write_atomic(&out.join("summary.json"), &serde_json::to_vec_pretty(&summary)?)?;
    Ok(summary)
}

/// Where the loop stands in the data: the epoch, the position in that epoch's order, and the
/// order itself, a pure function of (seed, epoch).
#[derive(Clone)]
struct DataOrder {
    seed: u64,
    n: usize,
    epoch: usize,
    cursor: usize,
    order: Vec<usize>,
}

impl DataOrder {
    fn new(seed: u64, n: usize, epoch: usize, cursor: usize) -> Self {
        DataOrder { seed, n, epoch, cursor, order: Self::shuffled(seed, n, epoch) }
    }

    fn shuffled(seed: u64, n: usize, epoch: usize) -> Vec<usize> {
        let mut o: Vec<usize> = (0..n).collect();
        o.shuffle(&mut StdRng::seed_from_u64(seed.wrapping_add(epoch as u64)));
        o
    }

    /// The next example, moving on to the next epoch's order at the end of one.
    fn next_index(&mut self) -> usize {
        if self.cursor == self.order.len() {
            self.epoch += 1;
            self.order = Self::shuffled(self.seed, self.n, self.epoch);
            self.cursor = 0;
        }
        self.cursor += 1;
        self.order[self.cursor - 1]
    }

    /// Epochs done, fractional.
    fn progress(&self) -> f64 {
        self.epoch as f64 + self.cursor as f64 / self.n as f64
    }
}

/// Draws `loss.svg` from `metrics.jsonl`.
fn write_loss_svg(out: &Path) -> Result<()> {
    let (mut train, mut eval) = (Vec::new(), Vec::new());
    for line in std::fs::read_to_string(out.join("metrics.jsonl"))?.lines() {
        let v: serde_json::Value = serde_json::from_str(line)?;
        let step = v["step"].as_f64().unwrap_or(0.0);
        if let Some(l) = v["loss"].as_f64() {
            train.push((step, l));
        }
        if let Some(l) = v["eval_loss"].as_f64() {
            eval.push((step, l));
        }
    }
    crate::fsutil::write_atomic(&out.join("loss.svg"), super::plot::loss_svg(&train, &eval).as_bytes())
}

/// Makes loaded adapters trainable (gradients on, dropout as the recipe says).
fn make_trainable<B: TrainBackend>(model: &mut Decoder<B>, dropout: f64) {
    for (_, p) in model.projections_mut() {
        if let Some(l) = &mut p.lora {
            l.a = burn::module::Param::from_tensor(l.a.val().require_grad());
            l.b = burn::module::Param::from_tensor(l.b.val().require_grad());
            l.dropout = dropout;
        }
    }
}

/// Opens metrics.jsonl for appending, keeping only the lines of steps ≤ `keep_through` (a
/// resumed run drops what the interrupted one logged after its checkpoint).
fn open_metrics(path: &Path, keep_through: usize) -> Result<std::fs::File> {
    let kept: String = if keep_through == 0 {
        String::new()
    } else {
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .filter(|l| {
                serde_json::from_str::<serde_json::Value>(l)
                    .ok()
                    .and_then(|v| v["step"].as_u64())
                    .is_some_and(|s| s as usize <= keep_through)
            })
            .map(|l| format!("{l}\n"))
            .collect()
    };
    crate::fsutil::write_atomic(path, kept.as_bytes())?;
    std::fs::OpenOptions::new().append(true).open(path).with_context(|| format!("opening {}", path.display()))
}

/// Set by the CLI's SIGINT handler; the loop checkpoints after the current step and stops.
pub static INTERRUPTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// The run was interrupted (SIGINT) and saved a checkpoint to resume from.
#[derive(Debug, thiserror::Error)]
#[error("interrupted; saved {} (continue with --resume)", checkpoint.display())]
pub struct Interrupted {
    pub checkpoint: PathBuf,
}

/// Training diverged (non-finite loss or gradient norm).
#[derive(Debug, thiserror::Error)]
#[error("training diverged at step {step}: loss {loss}, grad_norm {grad_norm}; lower train.lr or check the data")]
pub struct Divergence {
    pub step: usize,
    pub loss: f64,
    pub grad_norm: f64,
}
