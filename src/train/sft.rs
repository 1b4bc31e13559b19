//! The SFT training loop, read top to bottom: data, adapters, then per step: learning rate,
//! micro-batches, step, log, eval; finally the adapter and the summary.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use burn::tensor::backend::AutodiffBackend;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;

use super::checkpoint::{self, TrainState};
use super::optim::{learning_rate, AdamW};
use super::recipe::Recipe;
use super::step::{train_step, trainable_params, MicroBatch};
use crate::adapters::lora::Lora;
use crate::adapters::peft::{self, LoraConfig, Targets};
use crate::data::conversation::{read_jsonl, DataError};
use crate::data::encode::{encode_conversation, Encoded};
use crate::model::Decoder;
use crate::tokenizer::TextTokenizer;

/// What a finished run reports (also written to `RUN/summary.json`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct Summary {
    pub output_dir: PathBuf,
    pub steps: usize,
    pub epochs: f64,
    pub train_samples: usize,
    pub dropped_too_long: usize,
    pub trainable_parameters: usize,
    pub final_loss: f64,
    pub eval_loss: Option<f64>,
    /// Input tokens processed (prompt and completion, no padding), as TRL's `num_tokens`.
    pub train_tokens: usize,
    pub seconds: f64,
    pub tokens_per_s: f64,
}

/// Encodes a JSONL file; over-long samples are dropped and counted, samples without trainable
/// tokens are errors naming `file:line`.
pub fn prepare(tok: &TextTokenizer, recipe: &Recipe, file: &Path) -> Result<(Vec<Encoded>, usize)> {
    let template = tok.template(recipe.data.template)?;
    let mut out = Vec::new();
    let mut dropped = 0;
    for conv in read_jsonl(file)? {
        let enc = encode_conversation(tok, &template, &conv.messages).map_err(|msg| DataError::At { at: conv.at.clone(), msg })?;
        if enc.trainable() == 0 {
            return Err(DataError::At { at: conv.at, msg: "no trainable assistant tokens".into() }.into());
        }
        if enc.ids.len() > recipe.data.max_len {
            dropped += 1;
            continue;
        }
        out.push(enc);
    }
    if out.is_empty() {
        bail!("{}: no usable samples (dropped {dropped} longer than data.max_len = {})", file.display(), recipe.data.max_len);
    }
    Ok((out, dropped))
}

/// The adapter configuration a recipe asks for.
pub fn lora_config(recipe: &Recipe) -> LoraConfig {
    let l = &recipe.lora;
    let targets = if l.target_modules.iter().any(|t| t == "all-linear") {
        Targets::AllLinear
    } else {
        Targets::Names(l.target_modules.clone())
    };
    LoraConfig { r: l.r, alpha: l.alpha, use_rslora: l.use_rslora, dropout: l.dropout, targets, base_model: None }
}

/// Attaches freshly initialised adapters (PEFT init) to the projections the recipe targets.
/// The RNG is seeded first, so the same seed gives the same adapters.
pub fn attach_new_adapters<B: AutodiffBackend>(model: &mut Decoder<B>, recipe: &Recipe) -> Result<LoraConfig> {
    let l = &recipe.lora;
    let config = lora_config(recipe);
    let mut rng = StdRng::seed_from_u64(recipe.train.seed);
    let device = model.device();
    let scale = config.scale();
    let mut n = 0;
    for (name, proj) in model.projections_mut() {
        if config.targets.matches(&name) {
            let (d_in, d_out) = proj.dims();
            let mut lora = Lora::init(d_in, d_out, l.r, scale, &mut rng, &device);
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

fn mean_loss<B: AutodiffBackend>(model: &Decoder<B>, data: &[Encoded], batch: usize) -> f64 {
    let (mut nll, mut n) = (0.0, 0usize);
    for chunk in data.chunks(batch.max(1)) {
        let refs: Vec<&Encoded> = chunk.iter().collect();
        let mb = MicroBatch::new(&refs);
        let tokens = mb.trainable();
        let (loss, _) = super::step::sft_loss(model, &mb, 1.0);
        nll += burn::prelude::ElementConversion::elem::<f64>(loss.into_scalar());
        n += tokens;
    }
    nll / n.max(1) as f64
}

/// Runs SFT as the recipe says, writing the run directory.
/// With `resume`, continues from the newest complete checkpoint in the output directory (the
/// recipe must be the one the run started with); on CPU the result is bit-identical to an
/// uninterrupted run.
pub fn run<B: AutodiffBackend>(recipe: &Recipe, device: B::Device, quiet: bool, resume: bool) -> Result<Summary> {
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
    let (train, dropped) = prepare(&tok, recipe, &recipe.data.train)?;
    let eval = match &recipe.data.eval {
        Some(f) => Some(prepare(&tok, recipe, f)?.0),
        None => None,
    };
    let mut model = crate::model::load::<B>(&recipe.model.path, &device)?;
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
    let steps_per_epoch = train.len().div_ceil(per_step);
    let total = t.max_steps.unwrap_or_else(|| (t.epochs * steps_per_epoch as f64).ceil() as usize).max(1);
    let warmup = if t.warmup_steps > 0 { t.warmup_steps } else { (t.warmup_ratio * total as f64).ceil() as usize };

    // Data order: a pure function of (seed, epoch).
    let order_for = |epoch: usize| {
        let mut o: Vec<usize> = (0..train.len()).collect();
        o.shuffle(&mut StdRng::seed_from_u64(t.seed.wrapping_add(epoch as u64)));
        o
    };
    let mut epoch = state.epoch;
    let mut order = order_for(epoch);
    let mut cursor = state.cursor;
    let mut metrics = open_metrics(&out.join("metrics.jsonl"), state.step)?;
    let (mut last_loss, mut tokens_seen, mut eval_loss) = (f64::NAN, state.tokens_seen, None);
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
        let mut micro = Vec::with_capacity(t.grad_accum);
        for _ in 0..t.grad_accum {
            let mut samples = Vec::with_capacity(t.micro_batch_size);
            for _ in 0..t.micro_batch_size {
                if cursor == order.len() {
                    epoch += 1;
                    order = order_for(epoch);
                    cursor = 0;
                }
                samples.push(&train[order[cursor]]);
                cursor += 1;
            }
            micro.push(MicroBatch::new(&samples));
        }
        model.set_training(true);
        let stats = train_step(&mut model, &mut opt, &micro, lr, t.max_grad_norm);
        model.set_training(false);
        if !stats.loss.is_finite() || !stats.grad_norm.is_finite() {
            bail!(Divergence { step: step + 1, loss: stats.loss, grad_norm: stats.grad_norm });
        }
        last_loss = stats.loss;
        tokens_seen += stats.input_tokens;
        let secs = t0.elapsed().as_secs_f64();
        let line = serde_json::json!({
            "step": step + 1,
            "epoch": (epoch as f64) + cursor as f64 / train.len() as f64,
            "loss": stats.loss,
            "grad_norm": stats.grad_norm,
            "learning_rate": lr,
            "num_tokens": tokens_seen,
            "mean_token_accuracy": stats.correct as f64 / stats.tokens.max(1) as f64,
            "tokens_per_s": tokens_seen as f64 / secs,
        });
        writeln!(metrics, "{line}")?;
        let msg = format!("loss {:.4} grad_norm {:.3} lr {:.2e}", stats.loss, stats.grad_norm, lr);
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
            let st = TrainState { step: step + 1, epoch, cursor, tokens_seen, optimizer_t: opt.t };
            let (m, v) = opt.moments();
            let cfg = lora_config.clone();
            let base = recipe.model.path.display().to_string();
            let saved = checkpoint::save(out, &st, |dir| peft::save(&mut model, &cfg, &base, dir), m, v, t.keep_last)?;
            if interrupted {
                bail!(Interrupted { checkpoint: saved });
            }
        }
        if let Some(ev) = &eval {
            if last || (t.eval_every > 0 && (step + 1) % t.eval_every == 0) {
                let l = mean_loss(&model, ev, t.micro_batch_size);
                writeln!(metrics, "{}", serde_json::json!({"step": step + 1, "eval_loss": l}))?;
                eval_loss = Some(l);
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
    let summary = Summary {
        output_dir: out.clone(),
        steps: total,
        epochs: total as f64 / steps_per_epoch as f64,
        train_samples: train.len(),
        dropped_too_long: dropped,
        trainable_parameters,
        final_loss: last_loss,
        eval_loss,
        train_tokens: tokens_seen,
        seconds,
        tokens_per_s: tokens_seen as f64 / seconds,
    };
    crate::fsutil::write_atomic(&out.join("summary.json"), &serde_json::to_vec_pretty(&summary)?)?;
    Ok(summary)
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
fn make_trainable<B: AutodiffBackend>(model: &mut Decoder<B>, dropout: f64) {
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
