//! The training loop, read top to bottom: run directory, data (through the method's
//! [`Objective`]), model and adapters, then per step: learning rate, micro-batches, step, log,
//! checkpoint, eval; finally the adapter and the summary. SFT and DPO differ only in their
//! objective. This is the one function (with `cli`) that sees the [`Recipe`]: it hands each
//! component its own settings.

use std::path::PathBuf;
use std::time::Instant;

use burn::module::AutodiffModule;
use serde_json::{Map, Value};

use super::checkpoint;
use super::objective::{Objective, StepReport, StepSettings};
use super::optim::{learning_rate, AdamW};
use super::recipe::{Method, Recipe};
use super::run_dir::RunDir;
use super::state::{DataOrder, Fingerprint, TrainState};
use super::step::trainable_params;
use super::TrainError;
use crate::adapters::attach::{attach_new, make_trainable, save_modules};
use crate::adapters::peft;
use crate::data::tokenizer::TextTokenizer;
use crate::ops::TrainBackend;
use crate::progress::Progress;

/// What a finished run reports (also written to `RUN/summary.json`).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
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
    /// GPU runs: how often each of ft's kernels ran, and how often its tensor-op fallback ran
    /// instead (`ops::kernel_use`).
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub gpu_kernels: Vec<crate::ops::kernel_use::Use>,
    /// What serving engines will refuse or change about the adapter (`ft adapter check`; vLLM
    /// at its default `--max-lora-rank` 16).
    #[serde(default)]
    pub serving: Vec<crate::adapters::serving::Finding>,
    /// What a user should know about the result (PiSSA over a 4-bit base, where the residual
    /// base was written, …).
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub notes: Vec<String>,
}

/// Trains as the recipe says (SFT or DPO), writing the run directory.
/// With `resume`, continues from the newest complete checkpoint in the output directory (the
/// recipe must be the one the run started with); on CPU the result is bit-identical to an
/// uninterrupted run.
pub fn run<B: TrainBackend>(recipe: &Recipe, device: B::Device, progress: &dyn Progress, resume: bool) -> Result<Summary, TrainError> {
    let t0 = Instant::now();
    let mut run_dir = RunDir::open(&recipe.output.dir, &recipe.resolved_toml(), resume)?;
    let out = run_dir.path.clone();
    if let Some(summary) = run_dir.finished::<Summary>()? {
        progress.status(&format!("{} already finished (summary.json); nothing to resume", out.display()));
        return Ok(summary);
    }

    if !recipe.model.path.is_dir() {
        let dir = recipe.model.path.clone();
        return Err(crate::model::LoadError::NotADirectory { hub: crate::formats::hf_cache::not_found_hint(&dir), dir }.into());
    }
    let tok = TextTokenizer::from_dir(&recipe.model.path)?;
    let template = tok.template(recipe.data.template)?;
    let options = recipe.model.load_options();
    let mut model = if recipe.model.random_init {
        crate::model::random::<B>(&recipe.model.path, &device, options, recipe.train.seed)?
    } else {
        crate::model::load::<B>(&recipe.model.path, &device, options)?
    };
    if recipe.train.method == Method::Reward && model.score.is_none() {
        // TRL's RewardTrainer on a causal checkpoint: AutoModelForSequenceClassification with one
        // label, a fresh head, the tokenizer's pad id (else its eos) where the config has none.
        let pad = tok.pad_token_id().or_else(|| model.config.eos_token_ids.first().copied());
        let std = model.config.initializer_range;
        model.make_sequence_classifier(1, pad, std, recipe.train.seed);
    }
    let (base_bytes, base_params) = model.block_weight_bytes();
    progress.status(&format!("reading and tokenizing {}", recipe.data.train.display()));
    let mut objective: Box<dyn Objective<B>> = match recipe.train.method {
        Method::Sft => Box::new(super::sft::Sft::new(&tok, &template, &recipe.sft_settings())?),
        Method::Dpo => Box::new(super::dpo::Dpo::new(&tok, &template, &recipe.dpo_settings(), progress)?),
        Method::Kto => Box::new(super::kto::Kto::new(&tok, &template, &recipe.kto_settings())?),
        Method::Grpo => {
            let stop = crate::generate::stop_ids(&recipe.model.path, &model.config.eos_token_ids, &tok);
            Box::new(super::grpo::Grpo::new::<B::InnerBackend>(&tok, &template, &recipe.grpo_settings(stop), &device)?)
        }
        Method::Distill => {
            let stop = crate::generate::stop_ids(&recipe.model.path, &model.config.eos_token_ids, &tok);
            let s = recipe.distill_settings(stop).expect("validated: distill has its section");
            let nf4 = recipe.distill.as_ref().and_then(|d| d.teacher_quantize) == Some(super::recipe::Quantize::Nf4);
            let options = crate::model::LoadOptions { base: if nf4 { crate::model::BaseFormat::Nf4 } else { crate::model::BaseFormat::AsStored } };
            progress.status(&format!("loading the teacher {}", s.teacher.display()));
            let teacher = crate::loss::distill::load_teacher::<B::InnerBackend>(&s.teacher, &recipe.model.path, &device, options)?;
            Box::new(super::distill::Distill::new(&tok, &template, &s, teacher)?)
        }
        Method::Reward => Box::new(super::reward::RewardTraining::new(&tok, &template, &recipe.reward_settings(), progress)?),
        Method::Orpo | Method::Cpo | Method::Simpo => Box::new(super::ref_free::RefFreeTraining::new(&tok, &template, &recipe.ref_free_settings(), progress)?),
    };
    let n_examples = objective.len();
    let fingerprint = {
        let data: Vec<&std::path::Path> = [Some(&recipe.data.train), recipe.data.eval.as_ref()].into_iter().flatten().map(|p| p.as_path()).collect();
        Fingerprint::of(&data, &recipe.model.path, &template.source)?
    };
    let loaded = if resume { checkpoint::load_latest::<B::InnerBackend>(&out, &device)? } else { None };
    if let Some(ck) = &loaded {
        match &ck.fingerprint {
            Some(saved) => {
                if let Some((what, data)) = fingerprint.changed_since(saved) {
                    return Err(TrainError::Changed { run: out, what, data });
                }
            }
            None => progress.warning(&format!("{} records no data fingerprint (an older ft): the data is not checked", ck.dir.display())),
        }
        if ck.state.cursor > n_examples {
            let what = format!("the number of training examples changed ({n_examples}; the checkpoint is at example {})", ck.state.cursor);
            return Err(TrainError::Changed { run: out, what, data: true });
        }
    }
    // Training from a starting adapter takes its settings (rank, alpha, targets, dropout), as
    // TRL does with a PeftModel; else the recipe's [lora] section.
    let mut notes: Vec<String> = Vec::new();
    let start = match &recipe.model.adapter {
        Some(dir) => Some(peft::PeftAdapter::open(dir)?),
        None => None,
    };
    let mut lora_config = match &start {
        Some(a) => a.config.clone(),
        None => recipe.lora.config(),
    };
    // A reward model's head is trained in full (PEFT's SEQ_CLS adds these two names).
    if recipe.train.method == Method::Reward && !lora_config.saves("score") {
        lora_config.modules_to_save.extend(["classifier".to_string(), "score".to_string()]);
    }
    match (&loaded, &start) {
        (Some(ck), None) if lora_config.init.split().is_some() => {
            // The residual base and (A₀, B₀) again (the SVD is deterministic), then the
            // checkpoint's A and B out of its converted adapter.
            attach_new(&mut model, &lora_config, recipe.train.seed)?;
            peft::PeftAdapter::open(&ck.dir.join("adapter"))?.restore_pissa(&mut model)?;
            make_trainable(&mut model, lora_config.dropout);
        }
        (Some(ck), _) => {
            peft::PeftAdapter::open(&ck.dir.join("adapter"))?.attach(&mut model)?;
            make_trainable(&mut model, lora_config.dropout);
        }
        (None, Some(a)) => {
            a.attach(&mut model)?;
            make_trainable(&mut model, lora_config.dropout);
        }
        (None, None) => {
            if lora_config.init.split().is_some() && model.block_weight_bytes().0 < model.block_weight_bytes().1 * 4 {
                let note = "PiSSA/OLoRA over an NF4 base: the residual weights were quantized to NF4 again (the adapter is relative to that 4-bit residual)";
                progress.warning(note);
                notes.push(note.to_string());
            }
            attach_new(&mut model, &lora_config, recipe.train.seed)?;
        }
    }
    // Modules trained in full that the loaded adapter did not hold (a reward model's head when
    // training starts from a causal LM's adapter).
    if model.config.tie_word_embeddings {
        if let Some(m) = ["lm_head", "embed_tokens"].iter().find(|m| lora_config.saves(m)) {
            if !lora_config.ensure_weight_tying {
                let msg = format!(
                    "lora.modules_to_save names {m:?}, but this model ties its output head to the embeddings: a copy of one would untie them (set lora.ensure_weight_tying = true to train one copy that is both, as PEFT's ensure_weight_tying)"
                );
                return Err(TrainError::Invalid { path: recipe.model.path.clone(), msg });
            }
            // One trained copy of the embeddings, which the tied head reads too.
            if !lora_config.modules_to_save.iter().any(|x| x == "embed_tokens" || x.ends_with(".embed_tokens")) {
                lora_config.modules_to_save.push("embed_tokens".into());
            }
            model.tie_head_to_adapted_embeddings = true;
        }
    }
    save_modules(&mut model, &lora_config);
    for m in &lora_config.modules_to_save {
        // PEFT's SEQ_CLS default "classifier" matches nothing in a decoder; anything else must.
        let tied_head = m == "lm_head" && model.tie_head_to_adapted_embeddings;
        if m != "classifier" && !tied_head && !model.projections_mut().iter().any(|(name, p)| lora_config.saves(name) && name.ends_with(m.as_str()) && p.adapter.is_some()) {
            let why = if m == "lm_head" && model.config.tie_word_embeddings { " (this model ties its output head to the embeddings)" } else { "" };
            return Err(TrainError::Invalid { path: recipe.model.path.clone(), msg: format!("lora.modules_to_save names {m:?}, which this model does not have{why}") });
        }
    }
    // The reference of DPO is the starting adapter, frozen (unless the recipe asks for the base).
    if let (Some(a), true) = (&start, recipe.reference_is_start_adapter()) {
        a.attach_reference(&mut model)?;
    }
    let params = trainable_params(&mut model);
    let trainable_parameters: usize = params.iter().map(|p| p.shape().num_elements()).sum();
    let t = &recipe.train;
    let mut opt = AdamW::new(&params, t.weight_decay);
    let mut state = TrainState { step: 0, epoch: 0, cursor: 0, tokens_seen: 0, optimizer_t: 0 };
    let mut restored = false;
    if let Some(ck) = loaded {
        if let Some(saved) = ck.objective {
            objective.restore(saved).map_err(|msg| TrainError::Invalid { path: ck.dir.join("objective_state.json"), msg })?;
            restored = true;
        }
        opt.restore(ck.m, ck.v, ck.state.optimizer_t);
        state = ck.state;
        progress.status(&format!("resuming from {} (step {})", ck.dir.display(), state.step));
    }

    let per_step = t.micro_batch_size * t.grad_accum;
    // GRPO's num_iterations: each draw of examples serves this many steps (as TRL's sampler
    // repeats each batch), so an epoch takes as many times more steps.
    let steps_per_draw = objective.steps_per_batch().max(1);
    let steps_per_epoch = n_examples.div_ceil(per_step) * steps_per_draw;
    let total = t.max_steps.unwrap_or_else(|| (t.epochs * steps_per_epoch as f64).ceil() as usize).max(1);
    let warmup = if t.warmup_steps > 0 { t.warmup_steps } else { (t.warmup_ratio * total as f64).ceil() as usize };
    if warmup >= total {
        progress.warning(&format!("the warmup ({warmup} steps) is not shorter than the run ({total} steps): the learning rate never reaches train.lr"));
    }

    let mut data = DataOrder::new(t.seed, n_examples, state.epoch, state.cursor);
    // The examples the remaining steps will visit, in order, as far as needed to know which:
    // after the rest of this epoch and one more, every example has come up (a long run is never
    // listed whole).
    let mut ahead = data.clone();
    let draws = total.saturating_sub(state.step).div_ceil(steps_per_draw).saturating_mul(per_step).min(2 * n_examples);
    let upcoming: Vec<usize> = (0..draws).map(|_| ahead.next_index()).collect();
    // The run directory appears only now: a run that fails while loading leaves nothing behind.
    run_dir.create()?;
    WRITING.store(true, std::sync::atomic::Ordering::SeqCst);
    objective.before_training(&mut model, &upcoming, progress)?;
    run_dir.start_metrics(state.step)?;
    if recipe.output.report_to.iter().any(|r| r == "tensorboard") {
        run_dir.enable_tensorboard();
    }
    if t.eval_on_start && state.step == 0 {
        if let Some(mut m) = objective.evaluate(&mut model.valid()) {
            let mut line = Map::new();
            line.insert("step".into(), 0.into());
            line.append(&mut m);
            run_dir.log(&Value::Object(line))?;
        }
    }
    let (mut last_loss, mut tokens_seen, mut eval_loss) = (f64::NAN, state.tokens_seen, None);
    // Time and tokens inside optimizer steps only (no loading, reference precompute or eval).
    let (mut step_seconds, mut step_tokens) = (0.0, 0usize);
    let mut peak_gpu = 0f64;
    progress.start(state.step, total);
    let mut micro: Vec<Vec<usize>> = Vec::new();
    for step in state.step..total {
        // Dropout masks are a function of (seed, step), so a resumed run draws the same ones.
        B::seed(&device, t.seed ^ ((step as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15)));
        let settings = StepSettings { step, lr: learning_rate(t.lr, t.schedule, step, total, warmup), max_grad_norm: t.max_grad_norm };
        // A run resumed between the steps of one draw continues with the objective's saved state.
        if step.is_multiple_of(steps_per_draw) || (micro.is_empty() && !restored) {
            micro = (0..t.grad_accum).map(|_| (0..t.micro_batch_size).map(|_| data.next_index()).collect()).collect();
        }
        model.set_training(true);
        model.take_router_load(); // what evaluation routed is not this step's
        let ts = Instant::now();
        let mut stats = objective.step(&mut model, &mut opt, &micro, settings)?;
        if let Some(load) = model.take_router_load() {
            stats.metrics.insert("router_load".into(), serde_json::json!(load));
        }
        let samples = std::mem::take(&mut stats.samples);
        let step_s = ts.elapsed().as_secs_f64();
        step_seconds += step_s;
        step_tokens += stats.input_tokens;
        model.set_training(false);
        if !stats.loss.is_finite() || !stats.grad_norm.is_finite() {
            return Err(Divergence { step: step + 1, loss: stats.loss, grad_norm: stats.grad_norm }.into());
        }
        last_loss = stats.loss;
        tokens_seen += stats.input_tokens;
        let tokens_per_s = tokens_seen as f64 / t0.elapsed().as_secs_f64();
        let (line, reserved_gib) = step_line(step + 1, data.progress(), stats, settings.lr, tokens_seen, tokens_per_s, step_s);
        peak_gpu = peak_gpu.max(reserved_gib.unwrap_or(0.0));
        run_dir.log(&line)?;
        if let Some(w) = run_dir.take_warning() {
            progress.warning(&w);
        }
        run_dir.log_samples(step + 1, samples)?;
        progress.step(step + 1, total, &step_message(&line), tokens_per_s);
        let last = step + 1 == total;
        let interrupted = INTERRUPTED.load(std::sync::atomic::Ordering::SeqCst);
        if (t.save_every > 0 && (step + 1) % t.save_every == 0 && !last) || (interrupted && !last) {
            run_dir.sync()?;
            let st = TrainState { step: step + 1, epoch: data.epoch, cursor: data.cursor, tokens_seen, optimizer_t: opt.t };
            let (m, v) = opt.moments();
            let base = recipe.model.path.display().to_string();
            let save = |dir: &std::path::Path| Ok(peft::save(&mut model, &lora_config, &base, dir)?);
            let saved = checkpoint::save(&out, &st, &fingerprint, save, (&m, &v), objective.state().as_ref(), t.keep_last)?;
            if interrupted {
                return Err(Interrupted { checkpoint: saved }.into());
            }
        }
        if last || (t.eval_every > 0 && (step + 1) % t.eval_every == 0) {
            if let Some(mut m) = objective.evaluate(&mut model.valid()) {
                eval_loss = m.get("eval_loss").and_then(Value::as_f64);
                let mut line = Map::new();
                line.insert("step".into(), (step + 1).into());
                line.append(&mut m);
                run_dir.log(&Value::Object(line))?;
                if let Some(w) = run_dir.take_warning() {
                    progress.warning(&w);
                }
            }
        }
    }
    progress.finish();
    run_dir.sync()?;
    run_dir.write_loss_svg()?;
    // A run killed after writing its adapter but before summary.json wrote the same bytes.
    let final_adapter = out.join("adapter");
    if final_adapter.exists() {
        std::fs::remove_dir_all(&final_adapter).map_err(|source| TrainError::Io { what: "cannot replace", path: final_adapter.clone(), source })?;
    }
    let residual = out.join("residual_model");
    if recipe.lora.pissa_save == crate::train::recipe::PissaSave::Residual && recipe.model.adapter.is_none() && lora_config.init.split().is_some() {
        if residual.exists() {
            std::fs::remove_dir_all(&residual).map_err(|source| TrainError::Io { what: "cannot replace", path: residual.clone(), source })?;
        }
        peft::save_pissa_residual(&mut model, &lora_config, &recipe.model.path, &final_adapter, &residual)?;
        notes.push(format!("PiSSA saved unconverted: load {} with the adapter (rank {})", residual.display(), lora_config.r));
    } else {
        peft::save(&mut model, &lora_config, &recipe.model.path.display().to_string(), &final_adapter)?;
    }
    let serving = crate::adapters::serving::info(&final_adapter, Some(&recipe.model.path))
        .map(|i| crate::adapters::serving::check(&i, &crate::adapters::serving::Engine::ALL, 16))
        .unwrap_or_default();
    let seconds = t0.elapsed().as_secs_f64();
    let counts = objective.data_counts();
    let gpu_kernels = crate::ops::kernel_use::snapshot();
    if let Some(w) = crate::ops::kernel_use::fallback_warning(&gpu_kernels) {
        progress.warning(&w);
    }
    let summary = Summary {
        output_dir: out,
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
        gpu_kernels,
        serving,
        notes,
    };
    run_dir.write_summary(&summary)?;
    Ok(summary)
}

/// One step's line of `metrics.jsonl`: TRL's names, plus throughput and (CUDA) device memory;
/// also the GiB the device allocator holds, when on CUDA.
fn step_line(step: usize, epoch: f64, stats: StepReport, lr: f64, num_tokens: usize, tokens_per_s: f64, step_s: f64) -> (Value, Option<f64>) {
    let mut line = Map::new();
    line.insert("step".into(), step.into());
    line.insert("epoch".into(), epoch.into());
    line.extend(stats.metrics);
    line.insert("grad_norm".into(), stats.grad_norm.into());
    line.insert("learning_rate".into(), lr.into());
    line.insert("num_tokens".into(), num_tokens.into());
    line.insert("tokens_per_s".into(), tokens_per_s.into());
    line.insert("step_s".into(), step_s.into());
    let mut reserved_gib = None;
    if let Some((in_use, reserved)) = crate::backend::gpu_memory() {
        let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
        reserved_gib = Some(gib(reserved));
        line.insert("gpu_mem_gib".into(), gib(in_use).into());
        line.insert("gpu_reserved_gib".into(), gib(reserved).into());
    }
    (Value::Object(line), reserved_gib)
}

/// The progress message of a step's metrics line.
fn step_message(line: &Value) -> String {
    let g = |k: &str| line[k].as_f64().unwrap_or(f64::NAN);
    let mut msg = format!("loss {:.4} grad_norm {:.3} lr {:.2e}", g("loss"), g("grad_norm"), g("learning_rate"));
    if let (Some(acc), Some(margin)) = (line["rewards/accuracies"].as_f64(), line["rewards/margins"].as_f64()) {
        msg.push_str(&format!(" reward acc {acc:.2} margin {margin:.3}"));
    }
    if let (Some(r), Some(sd)) = (line["reward"].as_f64(), line["reward_std"].as_f64()) {
        msg.push_str(&format!(" reward {r:.3} ± {sd:.3}"));
    }
    msg
}

/// Set by the CLI's SIGINT handler; the loop checkpoints after the current step and stops. One of
/// the documented process-wide flags (with [`WRITING`] and `backend::CUDA_IN_USE`).
pub static INTERRUPTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Set once the run directory exists. Before that (loading the model, preparing data) an
/// interrupt has nothing to save: the CLI's handler exits at once instead of waiting for a step.
pub static WRITING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

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
