//! `ft data check` and `ft data show`: validate data files (conversations or preference pairs, per line) in one
//! streaming pass, tokenizing on all cores, and report every problem with its `file:line`, plus
//! the statistics a user wants before training.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use rayon::prelude::*;

use super::conversation::{parse_line, read_raw_lines, DataError, Location};
use super::encode::encode_chat;
use super::packing::pack_lengths;
use super::preference::{encode_pair, is_preference, parse_pair};
use super::template::ChatTemplate;
use super::tokenizer::TextTokenizer;

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
    /// Valid records (conversations and preference pairs).
    pub samples: usize,
    /// Of those, preference pairs.
    pub pairs: usize,
    pub tokens: usize,
    pub trainable_tokens: usize,
    pub max_len: Option<usize>,
    /// Samples longer than `max_len` (training drops them).
    pub too_long: usize,
    /// Sample counts per length bucket `[lo, hi)`, powers of two.
    pub length_histogram: Vec<(usize, usize, usize)>,
    /// With `max_len`: sequences that packing (best-fit-decreasing) would make of the samples
    /// that fit, and the share of their slots filled with real tokens.
    pub packed_sequences: Option<usize>,
    pub packing_efficiency: Option<f64>,
    pub seconds: f64,
    /// Rendered-and-tokenized tokens per second.
    pub tokens_per_s: f64,
    pub errors: Vec<Problem>,
    pub warnings: Vec<Problem>,
}

/// What one line gave.
enum Outcome {
    Error(String),
    Sample { tokens: usize, trainable: usize, longest: usize, pair: bool, warnings: Vec<String> },
}

fn check_line(bytes: &[u8], tok: &TextTokenizer, template: &ChatTemplate) -> Outcome {
    let Ok(text) = std::str::from_utf8(bytes) else {
        return Outcome::Error("invalid UTF-8".into());
    };
    let pair = serde_json::from_str::<serde_json::Value>(text).map(|v| is_preference(&v)).unwrap_or(false);
    let mut warnings = Vec::new();
    if pair {
        let p = match parse_pair(text, Location { file: PathBuf::new(), line: 0 }) {
            Ok(p) => p,
            Err(e) => return Outcome::Error(e.to_string()),
        };
        if p.chosen == p.rejected {
            warnings.push("chosen and rejected are identical (no preference to learn)".to_string());
        }
        return match encode_pair(tok, template, &p, None) {
            Ok(e) => Outcome::Sample {
                tokens: e.chosen.ids.len() + e.rejected.ids.len(),
                trainable: e.chosen.trainable() + e.rejected.trainable(),
                longest: e.chosen.ids.len().max(e.rejected.ids.len()),
                pair: true,
                warnings,
            },
            Err(e) => Outcome::Error(e.to_string()),
        };
    }
    let chat = match parse_line(text) {
        Ok(m) => m,
        Err(e) => return Outcome::Error(e.to_string()),
    };
    match encode_chat(tok, template, &chat.messages, chat.tools.as_ref()) {
        Ok(enc) if enc.trainable() == 0 => Outcome::Error("no trainable tokens (every assistant turn has train: false?)".into()),
        Ok(enc) => Outcome::Sample { tokens: enc.ids.len(), trainable: enc.trainable(), longest: enc.ids.len(), pair: false, warnings },
        Err(e) => Outcome::Error(e.to_string()),
    }
}

/// Lines tokenized together on all cores.
const CHUNK: usize = 4096;

/// Checks every line of `files` (files, `.jsonl.gz`, directories or globs); errors are
/// collected, not fatal.
pub fn check(files: &[PathBuf], tok: &TextTokenizer, template: &ChatTemplate, max_len: Option<usize>) -> Result<CheckReport, DataError> {
    let t0 = std::time::Instant::now();
    let mut r = CheckReport { files: files.to_vec(), max_len, ..Default::default() };
    let mut seen = HashSet::new();
    let mut lengths = Vec::new();
    let mut chunk: Vec<(Location, Vec<u8>)> = Vec::with_capacity(CHUNK);
    let mut flush = |chunk: &mut Vec<(Location, Vec<u8>)>, r: &mut CheckReport| {
        let outcomes: Vec<Outcome> = chunk.par_iter().map(|(_, b)| check_line(b, tok, template)).collect();
        for ((at, bytes), outcome) in chunk.drain(..).zip(outcomes) {
            let at = at.to_string();
            if !seen.insert(sha2::Digest::finalize(<sha2::Sha256 as sha2::Digest>::new_with_prefix(&bytes))) {
                r.warnings.push(Problem { at: at.clone(), message: "duplicate of an earlier line".into() });
            }
            match outcome {
                Outcome::Error(message) => r.errors.push(Problem { at, message }),
                Outcome::Sample { tokens, trainable, longest, pair, warnings } => {
                    r.samples += 1;
                    r.pairs += usize::from(pair);
                    r.tokens += tokens;
                    r.trainable_tokens += trainable;
                    if let Some(m) = max_len.filter(|&m| longest > m) {
                        r.too_long += 1;
                        r.warnings.push(Problem { at: at.clone(), message: format!("{longest} tokens, longer than --max-len {m} (training drops it, or truncates with data.overlong = \"truncate\")") });
                    }
                    lengths.push(longest);
                    r.warnings.extend(warnings.into_iter().map(|message| Problem { at: at.clone(), message }));
                }
            }
        }
    };
    for file in files {
        read_raw_lines(file, |at, bytes| {
            chunk.push((at, bytes.to_vec()));
            if chunk.len() == CHUNK {
                flush(&mut chunk, &mut r);
            }
            Ok(())
        })?;
    }
    flush(&mut chunk, &mut r);
    let mut lo = 1;
    while lengths.iter().any(|&l| l >= lo) {
        let n = lengths.iter().filter(|&&l| l >= lo && l < lo * 2).count();
        if n > 0 {
            r.length_histogram.push((lo, lo * 2, n));
        }
        lo *= 2;
    }
    if let Some(m) = max_len {
        let fitting: Vec<usize> = lengths.iter().copied().filter(|&l| l <= m).collect();
        let bins = pack_lengths(&fitting, m);
        r.packed_sequences = Some(bins.len());
        r.packing_efficiency = Some(super::packing::efficiency(fitting.iter().sum(), bins.len(), m));
    }
    if r.samples == 0 && r.errors.is_empty() {
        let at = files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>().join(", ");
        r.errors.push(Problem { at, message: "no records (the data is empty)".into() });
    }
    r.seconds = t0.elapsed().as_secs_f64();
    r.tokens_per_s = r.tokens as f64 / r.seconds.max(1e-9);
    Ok(r)
}

/// Warns when padding and end-of-sequence are the same token: a loader that masks padding by id
/// would then also mask the end-of-turn token, and the model never learns to stop.
pub fn pad_eos_warning(model_dir: &Path, tok: &TextTokenizer) -> Option<String> {
    let cfg = crate::formats::model_dir::tokenizer_config(model_dir).ok()?;
    let pad = crate::formats::model_dir::token_str(cfg.get("pad_token"))?;
    (Some(&pad) == tok.eos_token.as_ref()).then(|| {
        format!("pad_token == eos_token ({pad}); ft masks by assistant spans, never by the pad id, so training is unaffected, but other tools may drop the end-of-turn token")
    })
}

/// Why a record cannot be shown.
#[derive(Debug, thiserror::Error)]
pub enum ShowError {
    #[error(transparent)]
    Data(#[from] DataError),
    #[error(transparent)]
    Tokenizer(#[from] super::tokenizer::TokenizerError),
    #[error("--index {index}: {} has only {count} records", file.display())]
    NoRecord { file: PathBuf, index: usize, count: usize },
}

/// Record `index` of `file` (blank lines do not count) as the model sees it: the rendered text
/// with trained spans marked `[[...]]`, ids, mask and token strings (per side for a preference
/// pair), and its `file:line` under `"at"`.
pub fn show(file: &Path, tok: &TextTokenizer, tpl: &ChatTemplate, index: usize) -> Result<serde_json::Value, ShowError> {
    use super::encode::Encoded;
    let mut found: Option<(Location, String)> = None;
    let mut n = 0;
    super::conversation::read_lines(file, |at, text| {
        if n == index && found.is_none() {
            found = Some((at, text.to_string()));
        }
        n += 1;
        Ok(())
    })?;
    let Some((at, text)) = found else {
        return Err(ShowError::NoRecord { file: file.into(), index, count: n });
    };
    let located = |e: super::conversation::RecordError| e.at(at.clone());
    let show = |e: &Encoded| -> Result<serde_json::Value, ShowError> {
        let enc = tok.encode(&e.text)?;
        // Trainable spans as byte ranges of the text, merged.
        let mut marked = String::new();
        let (mut pos, mut open) = (0, false);
        for (j, &(a, _)) in enc.get_offsets().iter().enumerate() {
            let on = e.mask.get(j) == Some(&1);
            if on != open {
                marked.push_str(&e.text[pos..a]);
                marked.push_str(if on { "[[" } else { "]]" });
                pos = a;
                open = on;
            }
        }
        marked.push_str(&e.text[pos..]);
        if open {
            marked.push_str("]]");
        }
        let tokens: Vec<String> = e.ids.iter().map(|&i| tok.id_to_token(i).unwrap_or_default()).collect();
        Ok(serde_json::json!({"text": e.text, "marked": marked, "ids": e.ids, "mask": e.mask, "tokens": tokens,
            "trainable": e.trainable()}))
    };
    let value: serde_json::Value = serde_json::from_str(&text).map_err(|e| located(super::conversation::RecordError::Json(e.to_string())))?;
    Ok(if is_preference(&value) {
        let pair = parse_pair(&text, at.clone()).map_err(located)?;
        let e = encode_pair(tok, tpl, &pair, None).map_err(located)?;
        serde_json::json!({"at": at.to_string(), "chosen": show(&e.chosen)?, "rejected": show(&e.rejected)?})
    } else {
        let chat = parse_line(&text).map_err(located)?;
        let e = encode_chat(tok, tpl, &chat.messages, chat.tools.as_ref()).map_err(located)?;
        let mut v = show(&e)?;
        v["at"] = at.to_string().into();
        v
    })
}

