//! Training and evaluation datasets from data paths: read, render and tokenize on all cores
//! (through the tokenized-data cache), then apply the length policy. SFT gets encoded
//! conversations ([`sft`]), DPO encoded preference pairs ([`pairs`]).

use std::path::{Path, PathBuf};

use rayon::prelude::*;

use super::cache;
use super::conversation::{read_jsonl, DataError};
use super::encode::{encode_chat, Encoded};
use super::preference::{encode_completion, encode_pair, read_preferences, read_unpaired, EncodedPair};
use super::template::ChatTemplate;
use super::tokenizer::TextTokenizer;

/// What happens to a sample longer than `max_len`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Overlong {
    /// Dropped (and counted).
    Drop,
    /// Cut to its first `max_len` tokens (the prompt head is kept).
    Truncate,
}

/// Where the tokenized-data cache lives and which tokenizer it is keyed by.
#[derive(Debug, Clone)]
pub struct CacheAt {
    pub dir: PathBuf,
    pub model_dir: PathBuf,
}

/// How a dataset is prepared.
#[derive(Debug, Clone)]
pub struct PrepareOptions {
    pub max_len: usize,
    pub overlong: Overlong,
    /// A sample without trainable tokens is dropped (and counted) instead of being an error.
    pub drop_untrainable: bool,
    /// DPO: prompts longer than this lose tokens from their start.
    pub max_prompt_len: Option<usize>,
    pub cache: Option<CacheAt>,
}

/// What preparing a data path did besides producing samples.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct DataCounts {
    /// Dropped for being longer than `max_len` (`Overlong::Drop`).
    pub dropped_too_long: usize,
    /// Cut to `max_len` tokens (`Overlong::Truncate`).
    pub truncated: usize,
    /// Dropped for having no trainable token (`drop_untrainable`).
    pub dropped_untrainable: usize,
}

/// Errors from preparing a dataset.
#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    #[error(transparent)]
    Data(#[from] DataError),
    #[error("{}: no usable samples: {} longer than data.max_len = {max_len} (set data.overlong = \"truncate\" or raise it), {} without trainable tokens", path.display(), counts.dropped_too_long, counts.dropped_untrainable)]
    NoSamples { path: PathBuf, counts: DataCounts, max_len: usize },
    #[error("{}: no usable preference pairs (dropped {dropped} longer than data.max_len = {max_len})", path.display())]
    NoPairs { path: PathBuf, dropped: usize, max_len: usize },
}

/// Encodes items on all cores through the tokenized-data cache (one cache entry holds
/// `per_item` encoded sequences per item, in order).
fn cached_encode<T: Sync, E: Send>(
    items: &[T],
    key: Option<(&Path, String)>,
    per_item: usize,
    from_cache: impl Fn(&[Encoded]) -> E,
    encode: impl Fn(&T) -> Result<E, DataError> + Sync + Send,
    to_cache: impl Fn(&E) -> Vec<Encoded>,
) -> Vec<Result<E, DataError>> {
    let cached = key.as_ref().and_then(|(dir, k)| cache::load(dir, k)).filter(|c| c.len() == per_item * items.len());
    if let Some(c) = cached {
        return c.chunks_exact(per_item).map(|s| Ok(from_cache(s))).collect();
    }
    let e: Vec<Result<E, DataError>> = items
        .par_iter()
        .map(|item| {
            slow_for_tests();
            encode(item)
        })
        .collect();
    if let (Some((dir, k)), true) = (&key, e.iter().all(Result::is_ok)) {
        let all: Vec<Encoded> = e.iter().filter_map(|r| r.as_ref().ok()).flat_map(&to_cache).collect();
        // A cache that cannot be written only costs time next run.
        let _ = cache::store(dir, k, &all);
    }
    e
}

/// Tests only (the `fault-injection` feature): `FT_SLOW_PREPARE_MS` makes encoding each record
/// take that long, so that a test can interrupt data preparation.
fn slow_for_tests() {
    #[cfg(feature = "fault-injection")]
    if let Some(ms) = std::env::var("FT_SLOW_PREPARE_MS").ok().and_then(|v| v.parse().ok()) {
        std::thread::sleep(std::time::Duration::from_millis(ms));
    }
}

/// The cache key of `path` under `opts`, when caching is on and the files can be hashed.
fn cache_key<'a>(opts: &'a PrepareOptions, path: &Path, template: &ChatTemplate, settings: &str) -> Option<(&'a Path, String)> {
    let c = opts.cache.as_ref()?;
    Some((c.dir.as_path(), cache::key(path, &c.model_dir, &template.source, settings).ok()?))
}

/// The conversations of a data path, encoded. Over-long samples are dropped or truncated as
/// `opts.overlong` says; a sample without trainable tokens is an error naming `file:line` unless
/// `opts.drop_untrainable`.
pub fn sft(tok: &TextTokenizer, template: &ChatTemplate, path: &Path, opts: &PrepareOptions) -> Result<(Vec<Encoded>, DataCounts), PrepareError> {
    let convs = read_jsonl(path)?;
    let encoded = cached_encode(
        &convs,
        cache_key(opts, path, template, "sft-v2"),
        1,
        |s| s[0].clone(),
        |conv| encode_chat(tok, template, &conv.messages, conv.tools.as_ref()).map_err(|e| e.at(conv.at.clone())),
        |e| vec![e.clone()],
    );
    let max_len = opts.max_len;
    let mut out = Vec::with_capacity(convs.len());
    let mut counts = DataCounts::default();
    for (conv, enc) in convs.iter().zip(encoded) {
        let mut enc = enc?;
        if enc.ids.len() > max_len {
            match opts.overlong {
                Overlong::Drop => {
                    counts.dropped_too_long += 1;
                    continue;
                }
                Overlong::Truncate => {
                    enc.ids.truncate(max_len);
                    enc.mask.truncate(max_len);
                    counts.truncated += 1;
                }
            }
        }
        // The first token is never a target: trainable tokens are masked positions after it.
        if enc.mask.iter().skip(1).all(|&m| m == 0) {
            if opts.drop_untrainable {
                counts.dropped_untrainable += 1;
                continue;
            }
            let why = if counts.truncated > 0 && enc.ids.len() == max_len { " (after truncation to data.max_len)" } else { "" };
            let msg = format!("no trainable assistant tokens{why}; set data.drop_untrainable = true to drop such samples");
            return Err(DataError::At { at: conv.at.clone(), msg }.into());
        }
        out.push(enc);
    }
    if out.is_empty() {
        return Err(PrepareError::NoSamples { path: path.into(), counts, max_len });
    }
    Ok((out, counts))
}

/// The preference pairs of a data path, encoded, and how many were dropped for exceeding
/// `opts.max_len`. An empty completion is an error naming `file:line`; identical chosen and
/// rejected completions come back as warnings (they carry no preference signal).
pub fn pairs(tok: &TextTokenizer, template: &ChatTemplate, path: &Path, opts: &PrepareOptions) -> Result<(Vec<EncodedPair>, usize, Vec<String>), PrepareError> {
    let pairs = read_preferences(path)?;
    let encoded = cached_encode(
        &pairs,
        cache_key(opts, path, template, &format!("dpo-v2 {:?}", opts.max_prompt_len)),
        2,
        |s| {
            let first = |e: &Encoded| e.mask.iter().position(|&m| m == 1).unwrap_or(0);
            let prompt_len = first(&s[0]).min(first(&s[1]));
            EncodedPair { chosen: s[0].clone(), rejected: s[1].clone(), prompt_len, margin: 0.0 }
        },
        |p| encode_pair(tok, template, p, opts.max_prompt_len).map_err(|e| e.at(p.at.clone())),
        |p| vec![p.chosen.clone(), p.rejected.clone()],
    );
    let max_len = opts.max_len;
    let (mut out, mut dropped, mut warnings) = (Vec::new(), 0, Vec::new());
    for (pair, enc) in pairs.iter().zip(encoded) {
        let mut enc = enc?;
        // Not part of the cached encoding: read from the record each time.
        enc.margin = pair.margin.unwrap_or(0.0);
        if pair.chosen == pair.rejected {
            warnings.push(format!("{}: chosen and rejected are identical (no preference to learn)", pair.at));
        }
        if enc.chosen.ids.len() > max_len || enc.rejected.ids.len() > max_len {
            dropped += 1;
            continue;
        }
        out.push(enc);
    }
    if out.is_empty() {
        return Err(PrepareError::NoPairs { path: path.into(), dropped, max_len });
    }
    Ok((out, dropped, warnings))
}

/// A KTO row, encoded: its prompt + completion (completion tokens scored), its label, and the
/// mismatched sample of TRL's KL estimate (this row's prompt with the completion of the row
/// before it in its block).
#[derive(Debug, Clone)]
pub struct EncodedRow {
    pub sample: Encoded,
    pub kl: Encoded,
    pub desirable: bool,
}

/// The rows of a data path for KTO (unpaired records, or pairs unpaired as TRL does), encoded.
/// The KL sample of row `j` pairs its prompt with the completion of row `j − 1` within blocks
/// of `kl_block` consecutive rows (the first takes the block's last: TRL's rotation over each
/// batch of its KL dataset map). Rows whose sample or KL sample exceeds `opts.max_len` are
/// dropped (and counted).
pub fn kto(tok: &TextTokenizer, template: &ChatTemplate, path: &Path, opts: &PrepareOptions, kl_block: usize) -> Result<(Vec<EncodedRow>, usize), PrepareError> {
    let rows = read_unpaired(path)?;
    let kl_block = kl_block.max(1);
    let companion = |j: usize| {
        let start = j / kl_block * kl_block;
        let len = kl_block.min(rows.len() - start);
        start + (j - start + len - 1) % len
    };
    let indexed: Vec<usize> = (0..rows.len()).collect();
    let encoded = cached_encode(
        &indexed,
        cache_key(opts, path, template, &format!("kto-v1 {kl_block}")),
        2,
        |s| (s[0].clone(), s[1].clone()),
        |&j| {
            let (r, c) = (&rows[j], &rows[companion(j)]);
            let sample = encode_completion(tok, template, &r.prompt, &r.completion, r.tools.as_ref()).map_err(|e| e.at(r.at.clone()))?;
            let kl = encode_completion(tok, template, &r.prompt, &c.completion, r.tools.as_ref()).map_err(|e| e.at(r.at.clone()))?;
            Ok((sample, kl))
        },
        |(a, b)| vec![a.clone(), b.clone()],
    );
    let (mut out, mut dropped) = (Vec::new(), 0);
    for (row, enc) in rows.iter().zip(encoded) {
        let (sample, kl) = enc?;
        if sample.ids.len() > opts.max_len || kl.ids.len() > opts.max_len {
            dropped += 1;
            continue;
        }
        out.push(EncodedRow { sample, kl, desirable: row.label });
    }
    if out.is_empty() {
        return Err(PrepareError::NoPairs { path: path.into(), dropped, max_len: opts.max_len });
    }
    Ok((out, dropped))
}
