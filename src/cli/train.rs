//! `ft train` and `ft recipe check`, and the progress sink training reports through.

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::Result;
use burn::backend::Autodiff;
use clap::Subcommand;

use super::exit;
use crate::backend::DeviceChoice;
use crate::progress::Progress;
use crate::train::recipe::Recipe;

#[derive(Debug, Subcommand)]
pub enum RecipeCommand {
    /// Validate a recipe: unknown keys, wrong types and out-of-range values are errors naming the line.
    Check {
        /// The recipe (TOML).
        recipe: PathBuf,
        /// Override a recipe key, e.g. `--set train.lr=1e-4` (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
    },
}

#[derive(Debug, clap::Args)]
pub struct TrainArgs {
    /// The recipe (TOML).
    pub recipe: PathBuf,
    /// Override a recipe key, e.g. `--set train.lr=1e-4` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Output directory (overrides `output.dir`).
    #[arg(long)]
    pub output: Option<PathBuf>,
    /// Continue the run in the output directory from its newest complete checkpoint.
    #[arg(long)]
    pub resume: bool,
    /// Only validate the recipe and print it with defaults resolved.
    #[arg(long)]
    pub check: bool,
    /// Print the final summary as JSON on stdout (progress lines go to stderr).
    #[arg(long)]
    pub json: bool,
    /// No per-step progress lines.
    #[arg(long)]
    pub quiet: bool,
}

pub fn run_recipe(c: RecipeCommand) -> Result<()> {
    let RecipeCommand::Check { recipe, set } = c;
    print!("{}", Recipe::load(&recipe, &set)?.resolved_toml());
    Ok(())
}

/// Progress on stderr: a bar on a terminal, plain periodic lines otherwise (CI logs); with
/// `--quiet` only warnings.
struct Stderr {
    quiet: bool,
    bar: std::sync::Mutex<Option<indicatif::ProgressBar>>,
    first: std::sync::atomic::AtomicUsize,
}

impl Progress for Stderr {
    fn status(&self, message: &str) {
        if !self.quiet {
            eprintln!("{message}");
        }
    }

    fn warning(&self, message: &str) {
        if !self.quiet {
            eprintln!("warning: {message}");
        }
    }

    fn start(&self, done: usize, total: usize) {
        self.first.store(done + 1, std::sync::atomic::Ordering::SeqCst);
        if self.quiet || !std::io::stderr().is_terminal() {
            return;
        }
        let b = indicatif::ProgressBar::new(total as u64).with_position(done as u64);
        b.set_style(
            indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} steps [{elapsed_precise}<{eta_precise}] {msg}").expect("template"),
        );
        *self.bar.lock().expect("progress bar") = Some(b);
    }

    fn step(&self, step: usize, total: usize, message: &str, tokens_per_s: f64) {
        if self.quiet {
            return;
        }
        if let Some(b) = self.bar.lock().expect("progress bar").as_ref() {
            b.set_message(message.to_string());
            b.inc(1);
            return;
        }
        let log_every = (total / 20).max(1);
        if step.is_multiple_of(log_every) || step == total || step == self.first.load(std::sync::atomic::Ordering::SeqCst) {
            eprintln!("step {step}/{total} {message} ({tokens_per_s:.0} tokens/s)");
        }
    }

    fn finish(&self) {
        if let Some(b) = self.bar.lock().expect("progress bar").as_ref() {
            b.finish();
        }
    }
}

pub fn run(a: TrainArgs) -> Result<()> {
    let mut recipe = Recipe::load(&a.recipe, &a.set)?;
    if let Some(o) = a.output {
        recipe.output.dir = o;
    }
    if a.check {
        print!("{}", recipe.resolved_toml());
        return Ok(());
    }
    // Hugging Face ids the cache does not have yet: downloaded now (not for --check).
    recipe.model.path = crate::formats::hf_cache::resolve_or_download(&recipe.model.path)?;
    if let Some(d) = recipe.distill.as_mut() {
        d.teacher = crate::formats::hf_cache::resolve_or_download(&d.teacher)?;
    }
    // First Ctrl-C (or SIGTERM, as schedulers and CI runners send before SIGKILL): finish the
    // step, save a checkpoint, exit 130. A second one kills.
    // While loading (nothing written yet), it exits at once.
    ctrlc::set_handler(|| {
        use std::sync::atomic::Ordering::SeqCst;
        if !crate::train::run::WRITING.load(SeqCst) {
            eprintln!("interrupted while loading; nothing was written");
            std::process::exit(exit::INTERRUPTED as i32);
        }
        if crate::train::run::INTERRUPTED.swap(true, SeqCst) {
            std::process::exit(exit::INTERRUPTED as i32);
        }
    })
    .ok();
    let progress = Stderr { quiet: a.quiet, bar: Default::default(), first: Default::default() };
    let r = a.resume;
    let summary = match recipe.train.device {
        DeviceChoice::Cpu => crate::train::run::run::<Autodiff<crate::backend::Cpu>>(&recipe, Default::default(), &progress, r)?,
        #[cfg(feature = "cuda")]
        DeviceChoice::Cuda => {
            crate::backend::check_cuda()?;
            crate::backend::init_cuda_runtime();
            crate::train::run::run::<Autodiff<crate::backend::CudaBf16>>(&recipe, Default::default(), &progress, r)?
        }
        #[cfg(not(feature = "cuda"))]
        DeviceChoice::Cuda => return Err(crate::backend::BackendError::NoCuda.into()),
    };
    if a.json {
        println!("{}", serde_json::to_string(&summary)?);
    } else {
        println!(
            "trained {} steps: loss {:.4}{} in {:.1}s ({:.0} tokens/s) → {}",
            summary.steps,
            summary.final_loss,
            summary.eval_loss.map(|l| format!(", eval loss {l:.4}")).unwrap_or_default(),
            summary.seconds,
            summary.tokens_per_s,
            summary.output_dir.join("adapter").display()
        );
        if !summary.serving.is_empty() || summary.steps > 0 {
            super::adapter::print_findings(&summary.output_dir.join("adapter"), &crate::adapters::serving::Engine::ALL, &summary.serving);
        }
    }
    Ok(())
}
