//! `ft data check`: validate JSONL conversation files in one streaming pass and report every
//! problem with its `file:line`, plus the statistics a user wants before training.

use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use super::conversation::{parse_line, Location};
use super::encode::encode_conversation;
use super::template::ChatTemplate;
use crate::tokenizer::TextTokenizer;

/// One problem found in a file.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Problem {
    pub at: String,
    pub message: String,
}

/// What `ft data check` reports.
#[derive(Debug, Default, serde::Serialize)]
pub struct CheckReport {
    pub files: Vec<PathBuf>,
    pub samples: usize,
    pub tokens: usize,
    pub trainable_tokens: usize,
    pub max_len: Option<usize>,
    /// Samples longer than `max_len` (training drops them).
    pub too_long: usize,
    /// Sample counts per length bucket `[lo, hi)`, powers of two.
    pub length_histogram: Vec<(usize, usize, usize)>,
    pub errors: Vec<Problem>,
    pub warnings: Vec<Problem>,
}

/// Checks every line of `files`; errors are collected, not fatal.
pub fn check(files: &[PathBuf], tok: &TextTokenizer, template: &ChatTemplate, max_len: Option<usize>) -> std::io::Result<CheckReport> {
    let mut r = CheckReport { files: files.to_vec(), max_len, ..Default::default() };
    let mut seen = HashSet::new();
    let mut lengths = Vec::new();
    for file in files {
        let f = std::fs::File::open(file).map_err(|e| std::io::Error::new(e.kind(), format!("cannot read {}: {e}", file.display())))?;
        for (i, line) in BufReader::new(f).split(b'\n').enumerate() {
            let at = Location { file: file.clone(), line: i + 1 };
            let bytes = line?;
            let err = |r: &mut CheckReport, message: String| r.errors.push(Problem { at: at.to_string(), message });
            let Ok(text) = std::str::from_utf8(&bytes) else {
                err(&mut r, "invalid UTF-8".into());
                continue;
            };
            if text.trim().is_empty() {
                continue;
            }
            let messages = match parse_line(text) {
                Ok(m) => m,
                Err(e) => {
                    err(&mut r, e);
                    continue;
                }
            };
            if let Some(j) = messages.iter().position(|m| m.content.trim().is_empty()) {
                r.warnings.push(Problem { at: at.to_string(), message: format!("message {j} has empty content") });
            }
            if !seen.insert(text.to_string()) {
                r.warnings.push(Problem { at: at.to_string(), message: "duplicate of an earlier line".into() });
            }
            match encode_conversation(tok, template, &messages) {
                Ok(enc) => {
                    if enc.trainable() == 0 {
                        err(&mut r, "no trainable tokens (every assistant turn has train: false?)".into());
                        continue;
                    }
                    r.samples += 1;
                    r.tokens += enc.ids.len();
                    r.trainable_tokens += enc.trainable();
                    if max_len.is_some_and(|m| enc.ids.len() > m) {
                        r.too_long += 1;
                    }
                    lengths.push(enc.ids.len());
                }
                Err(e) => err(&mut r, e),
            }
        }
    }
    let mut lo = 1;
    while lengths.iter().any(|&l| l >= lo) {
        let n = lengths.iter().filter(|&&l| l >= lo && l < lo * 2).count();
        if n > 0 {
            r.length_histogram.push((lo, lo * 2, n));
        }
        lo *= 2;
    }
    Ok(r)
}

/// Warns when padding and end-of-sequence are the same token: a loader that masks padding by id
/// would then also mask the end-of-turn token, and the model never learns to stop.
pub fn pad_eos_warning(model_dir: &Path, tok: &TextTokenizer) -> Option<String> {
    let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(model_dir.join("tokenizer_config.json")).ok()?).ok()?;
    let pad = cfg.get("pad_token").and_then(|v| v.as_str().map(String::from).or_else(|| v.get("content")?.as_str().map(String::from)))?;
    (Some(&pad) == tok.eos_token.as_ref()).then(|| {
        format!("pad_token == eos_token ({pad}); ft masks by assistant spans, never by the pad id, so training is unaffected, but other tools may drop the end-of-turn token")
    })
}
