//! `ft adapter info` and `ft adapter check`.

use std::path::{Path, PathBuf};

use anyhow::Result;

use crate::adapters::serving::{self, Engine, Finding, Severity};

#[derive(Debug, clap::Subcommand)]
pub enum AdapterCommand {
    /// What an adapter directory holds: kind, ranks, targets, parameters, base model, steps.
    Info {
        dir: PathBuf,
        /// The base model directory (for its model type), if not the adapter's local base.
        #[arg(long, value_parser = crate::cli::args::model_dir)]
        model: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Which serving engines will refuse the adapter or compute something else with it, and the
    /// fix for each; with `--for`, exits 5 when one of those engines refuses it.
    Check {
        dir: PathBuf,
        /// The base model directory (for its model type), if not the adapter's local base.
        #[arg(long, value_parser = crate::cli::args::model_dir)]
        model: Option<PathBuf>,
        /// Engines to check (comma-separated or repeated) [default: all, reporting only].
        #[arg(long = "for", value_enum, value_delimiter = ',')]
        engines: Vec<Engine>,
        /// vLLM's `--max-lora-rank` the adapter will be served with.
        #[arg(long, default_value_t = 16)]
        max_lora_rank: usize,
        #[arg(long)]
        json: bool,
    },
}

/// An adapter that an engine named with `--for` refuses (exit code 5).
#[derive(Debug, thiserror::Error)]
#[error("{} refuses this adapter", engines.join(", "))]
pub struct Refused {
    pub engines: Vec<String>,
}

pub fn run(c: AdapterCommand) -> Result<()> {
    match c {
        AdapterCommand::Info { dir, model, json } => {
            let i = serving::info(&dir, model.as_deref())?;
            if json {
                println!("{}", serde_json::to_string(&i)?);
            } else {
                println!("adapter        {}", i.dir.display());
                println!("kind           {}{}{}", i.kind, if i.use_rslora { " (rsLoRA)" } else { "" }, i.task_type.as_deref().map(|t| format!(", {t}")).unwrap_or_default());
                println!("base           {}{}", i.base_model.as_deref().unwrap_or("?"), i.base_model_type.as_deref().map(|t| format!(" ({t})")).unwrap_or_default());
                println!("rank / alpha   {:?} / {:?}", i.ranks, i.alphas);
                println!("targets        {} modules: {}", i.adapted_modules, i.target_kinds.join(", "));
                if !i.modules_to_save.is_empty() {
                    println!("trained whole  {}", i.modules_to_save.join(", "));
                }
                println!("parameters     {}", i.parameters);
                if i.quantized_base {
                    println!("trained on     an NF4 (4-bit) base");
                }
                if let Some(s) = i.trained_steps {
                    println!("steps          {s}");
                }
            }
            Ok(())
        }
        AdapterCommand::Check { dir, model, engines, max_lora_rank, json } => {
            let i = serving::info(&dir, model.as_deref())?;
            let gate = !engines.is_empty();
            let engines = if gate { engines } else { Engine::ALL.to_vec() };
            let findings = serving::check(&i, &engines, max_lora_rank);
            if json {
                println!("{}", serde_json::json!({"adapter": i.dir, "engines": engines, "findings": findings}));
            } else {
                print_findings(&dir, &engines, &findings);
            }
            let refused: Vec<String> = engines.iter().filter(|e| findings.iter().any(|f| f.engine == **e && f.severity == Severity::Refused)).map(|e| e.name().to_string()).collect();
            if gate && !refused.is_empty() {
                return Err(Refused { engines: refused }.into());
            }
            Ok(())
        }
    }
}

/// Each engine's verdict and findings, as `ft adapter check` and `ft train` print them.
pub fn print_findings(dir: &Path, engines: &[Engine], findings: &[Finding]) {
    println!("serving {}:", dir.display());
    for e in engines {
        let mine: Vec<&Finding> = findings.iter().filter(|f| f.engine == *e).collect();
        let verdict = if mine.iter().any(|f| f.severity == Severity::Refused) {
            "refused"
        } else if mine.iter().any(|f| f.severity == Severity::Changed) {
            "loads, but computes something else"
        } else if mine.is_empty() {
            "ok"
        } else {
            "ok, with a caveat"
        };
        println!("  {:<11} {verdict}", e.name());
        for f in mine {
            println!("      {}; fix: {}", f.what, f.fix);
        }
    }
}
