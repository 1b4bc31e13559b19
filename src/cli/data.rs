//! `ft data check` and `ft data show`.

use std::path::{Path, PathBuf};

use anyhow::Result;
use clap::Subcommand;

use crate::data::check::{check, pad_eos_warning, show, Problem};
use crate::data::conversation::DataError;
use crate::data::tokenizer::{TemplateChoice, TextTokenizer};

#[derive(Debug, Subcommand)]
pub enum DataCommand {
    /// Validate JSONL conversation files and print statistics; exits 3 if any line is bad.
    Check {
        /// JSONL files.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Model directory (tokenizer and chat template).
        #[arg(long, value_parser = crate::cli::args::model_dir)]
        model: PathBuf,
        #[arg(long, value_enum, default_value_t = TemplateChoice::Model)]
        template: TemplateChoice,
        /// Count samples longer than N tokens (training drops them) and report how well packing
        /// into N-token sequences would fill them.
        #[arg(long)]
        max_len: Option<usize>,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show one record as the model sees it: the rendered text with trainable spans marked
    /// `[[...]]`, and the token ids with their mask.
    Show {
        /// JSONL file (conversations or preference pairs; `.jsonl.gz`, directory or glob).
        file: PathBuf,
        /// Model directory (tokenizer and chat template).
        #[arg(long, value_parser = crate::cli::args::model_dir)]
        model: PathBuf,
        /// 0-based record index (blank lines do not count).
        #[arg(long, default_value_t = 0)]
        index: usize,
        #[arg(long, value_enum, default_value_t = TemplateChoice::Model)]
        template: TemplateChoice,
        /// Print {"text", "marked", "ids", "mask", "tokens"} (per side for pairs) as JSON.
        #[arg(long)]
        json: bool,
    },
}

pub fn run(c: DataCommand) -> Result<()> {
    match c {
        DataCommand::Check { files, model, template, max_len, json } => cmd_data_check(&files, &model, template, max_len, json),
        DataCommand::Show { file, model, index, template, json } => cmd_data_show(&file, &model, index, template, json),
    }
}

fn cmd_data_check(files: &[PathBuf], model: &Path, template: TemplateChoice, max_len: Option<usize>, json: bool) -> Result<()> {
    let tok = TextTokenizer::from_dir(model)?;
    let tpl = tok.template(template)?;
    let mut r = check(files, &tok, &tpl, max_len)?;
    if let Some(w) = pad_eos_warning(model, &tok) {
        r.warnings.push(Problem { at: model.display().to_string(), message: w });
    }
    if json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        for p in &r.errors {
            eprintln!("error: {}: {}", p.at, p.message);
        }
        for p in &r.warnings {
            eprintln!("warning: {}: {}", p.at, p.message);
        }
        println!(
            "{} samples, {} tokens, {} trainable ({:.1}%){}",
            r.samples,
            r.tokens,
            r.trainable_tokens,
            100.0 * r.trainable_tokens as f64 / r.tokens.max(1) as f64,
            max_len.map(|m| format!(", {} longer than {m}", r.too_long)).unwrap_or_default()
        );
        for (lo, hi, n) in &r.length_histogram {
            println!("  {lo:>6}..{hi:<6} {n}");
        }
    }
    if !r.errors.is_empty() {
        let first = &r.errors[0];
        return Err(DataError::Invalid { count: r.errors.len(), first: format!("{}: {}", first.at, first.message) }.into());
    }
    Ok(())
}

fn cmd_data_show(file: &Path, model: &Path, index: usize, template: TemplateChoice, json: bool) -> Result<()> {
    let tok = TextTokenizer::from_dir(model)?;
    let tpl = tok.template(template)?;
    let report = show(file, &tok, &tpl, index).map_err(|e| match e {
        crate::data::check::ShowError::NoRecord { .. } => anyhow::Error::new(super::UsageError(e.to_string())),
        e => e.into(),
    })?;
    if json {
        println!("{report}");
        return Ok(());
    }
    let print = |title: &str, v: &serde_json::Value| {
        println!("── {title} ({} tokens, {} trainable)", v["ids"].as_array().map_or(0, Vec::len), v["trainable"]);
        println!("{}", v["marked"].as_str().unwrap_or_default());
        let ids: Vec<String> = v["ids"]
            .as_array()
            .into_iter()
            .flatten()
            .zip(v["mask"].as_array().into_iter().flatten())
            .map(|(i, m)| if m == 1 { format!("{i}*") } else { i.to_string() })
            .collect();
        println!("ids (* = trained): {}", ids.join(" "));
    };
    println!("{}", report["at"].as_str().unwrap_or_default());
    if report.get("chosen").is_some() {
        print("chosen", &report["chosen"]);
        print("rejected", &report["rejected"]);
    } else {
        print("conversation", &report);
    }
    Ok(())
}
