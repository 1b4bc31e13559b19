//! Text generation with a KV cache: greedy at temperature 0, else temperature + top-p sampling
//! from a seeded RNG.

use std::time::Instant;

use burn::prelude::*;
use burn::tensor::{Int, TensorData};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::data::conversation::{read_jsonl, DataError, Message, Role};
use crate::data::template::ChatTemplate;
use crate::data::tokenizer::{TextTokenizer, TokenizerError};
use crate::model::{Decoder, KvCache};
use crate::ops::Kernels;

/// Decoding settings.
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    /// 0 = greedy.
    pub temperature: f32,
    pub top_p: f32,
    pub seed: u64,
    /// Keep generating past end-of-sequence tokens.
    pub ignore_eos: bool,
    /// Ids that end generation (the EOS token is kept in the output).
    pub stop_ids: Vec<u32>,
}

/// What a generation produced.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Generation {
    /// New token ids (including a final stop token, if one was produced).
    pub ids: Vec<u32>,
    /// Decode time per new token, prompt processing included.
    pub tokens_per_s: f64,
}

/// Index of the first maximum (as torch.argmax).
pub fn argmax(v: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best
}

fn sample(logits: &[f32], temperature: f32, top_p: f32, rng: &mut StdRng) -> usize {
    if temperature <= 0.0 {
        return argmax(logits);
    }
    let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let mut probs: Vec<(usize, f64)> =
        logits.iter().enumerate().map(|(i, &l)| (i, (((l - max) / temperature) as f64).exp())).collect();
    let total: f64 = probs.iter().map(|p| p.1).sum();
    probs.iter_mut().for_each(|p| p.1 /= total);
    probs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    // Keep the smallest prefix whose mass reaches top_p.
    let mut keep = probs.len();
    if top_p < 1.0 {
        let mut cum = 0.0;
        for (j, p) in probs.iter().enumerate() {
            cum += p.1;
            if cum >= top_p as f64 {
                keep = j + 1;
                break;
            }
        }
    }
    let kept = &probs[..keep];
    let mass: f64 = kept.iter().map(|p| p.1).sum();
    let mut r = rng.random::<f64>() * mass;
    for p in kept {
        r -= p.1;
        if r <= 0.0 {
            return p.0;
        }
    }
    kept[kept.len() - 1].0
}

/// Generates up to `max_new_tokens` after `prompt`.
pub fn generate<B: Kernels>(model: &Decoder<B>, prompt: &[u32], opts: &GenerateOptions) -> Generation {
    let device = model.device();
    let start = Instant::now();
    let mut rng = StdRng::seed_from_u64(opts.seed);
    let mut cache = KvCache::new(model.config.num_layers);
    let mut out = Vec::new();
    let mut next_input: Vec<u32> = prompt.to_vec();
    for _ in 0..opts.max_new_tokens {
        let n = next_input.len();
        let ids = Tensor::<B, 2, Int>::from_data(
            TensorData::new(next_input.iter().map(|&x| x as i64).collect::<Vec<_>>(), [1, n]),
            &device,
        );
        let hidden = model.hidden(ids, Some(&mut cache));
        let last = hidden.narrow(1, n - 1, 1);
        let logits: Vec<f32> = model.head(last).into_data().convert::<f32>().to_vec().expect("f32 logits");
        let id = sample(&logits, opts.temperature, opts.top_p, &mut rng) as u32;
        out.push(id);
        if !opts.ignore_eos && opts.stop_ids.contains(&id) {
            break;
        }
        next_input = vec![id];
    }
    let secs = start.elapsed().as_secs_f64();
    Generation { tokens_per_s: out.len() as f64 / secs.max(1e-9), ids: out }
}

/// One completion of [`generate_batch`]: its ids (with the stop token if one came), each one's
/// log-probability under the model (the f32 logits' log-softmax, before temperature and top-p)
/// and whether it was cut at the length limit.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampled {
    pub ids: Vec<u32>,
    pub logprobs: Vec<f64>,
    pub truncated: bool,
}

/// `log softmax(logits)[id]`, accumulated in f64.
fn logprob(logits: &[f32], id: usize) -> f64 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = logits.iter().map(|&l| (l as f64 - max).exp()).sum();
    logits[id] as f64 - max - sum.ln()
}

/// `seeds.len()` completions of one prompt, sampled together as one batch (see
/// [`generate_batch`]).
pub fn generate_group<B: Kernels>(model: &Decoder<B>, prompt: &[u32], seeds: &[u64], opts: &GenerateOptions) -> Vec<Sampled> {
    let rows: Vec<(usize, u64)> = seeds.iter().map(|&s| (0, s)).collect();
    generate_batch(model, &[prompt], &rows, opts)
}

/// One completion per row `(prompt index, seed)`, every row sampled together as one batch with
/// the KV cache: prompts of different lengths are left-padded (padding is never attended and
/// positions count from each row's first token), and each distinct prompt is run once, its cache
/// shared by the rows that continue it. Row `i` draws from its own RNG seeded with its seed, so
/// each completion is a function of its seed and of the batch (which a resumed run rebuilds the
/// same). A row stops at a stop id (kept) and then leaves the batch.
pub fn generate_batch<B: Kernels>(model: &Decoder<B>, prompts: &[&[u32]], rows: &[(usize, u64)], opts: &GenerateOptions) -> Vec<Sampled> {
    let device = model.device();
    let mut out: Vec<Sampled> = vec![Sampled { ids: Vec::new(), logprobs: Vec::new(), truncated: true }; rows.len()];
    if rows.is_empty() {
        return out;
    }
    if opts.max_new_tokens == 0 {
        return out;
    }
    let mut rngs: Vec<StdRng> = rows.iter().map(|&(_, s)| StdRng::seed_from_u64(s)).collect();
    // Each distinct prompt is run once (left-padded with the others); its keys and values are
    // then copied to every row that continues it (GRPO's generations share their prompt).
    let mut used: Vec<usize> = Vec::new();
    let mut slot_of = vec![usize::MAX; prompts.len()];
    for &(p, _) in rows {
        if slot_of[p] == usize::MAX {
            slot_of[p] = used.len();
            used.push(p);
        }
    }
    let longest = used.iter().map(|&p| prompts[p].len()).max().unwrap_or(0);
    let prompt_pads: Vec<usize> = used.iter().map(|&p| longest - prompts[p].len()).collect();
    let mut input: Vec<i64> = Vec::with_capacity(used.len() * longest);
    for (&p, &pad) in used.iter().zip(&prompt_pads) {
        input.extend(std::iter::repeat_n(0, pad));
        input.extend(prompts[p].iter().map(|&x| x as i64));
    }
    let mut cache = KvCache::new(model.config.num_layers);
    let forward = |cache: &mut KvCache<B>, ids: Vec<i64>, b: usize, n: usize, pads: &[usize]| -> Vec<f32> {
        let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [b, n]), &device);
        let hidden = if pads.iter().all(|&p| p == 0) { model.hidden(ids, Some(cache)) } else { model.hidden_left_padded(ids, cache, pads) };
        model.head(hidden.narrow(1, n - 1, 1)).into_data().convert::<f32>().to_vec().expect("f32 logits")
    };
    let mut logits = forward(&mut cache, input, used.len(), longest, &prompt_pads);
    let vocab = logits.len() / used.len();
    let row_prompts: Vec<usize> = rows.iter().map(|&(p, _)| slot_of[p]).collect();
    cache.retain_rows(&row_prompts);
    // The batch's rows (indices into `rows`), their padding and their logits' row, in cache order.
    let mut active: Vec<usize> = (0..rows.len()).collect();
    let mut pads: Vec<usize> = row_prompts.iter().map(|&u| prompt_pads[u]).collect();
    let mut logits_row = row_prompts;
    for step in 0..opts.max_new_tokens {
        let b = active.len();
        let mut next = Vec::with_capacity(b);
        let mut keep = Vec::with_capacity(b);
        for (slot, &r) in active.iter().enumerate() {
            let row = &logits[logits_row[slot] * vocab..(logits_row[slot] + 1) * vocab];
            let id = sample(row, opts.temperature, opts.top_p, &mut rngs[r]) as u32;
            out[r].ids.push(id);
            out[r].logprobs.push(logprob(row, id as usize));
            if !opts.ignore_eos && opts.stop_ids.contains(&id) {
                out[r].truncated = false;
            } else {
                keep.push(slot);
                next.push(id as i64);
            }
        }
        if keep.is_empty() || step + 1 == opts.max_new_tokens {
            break;
        }
        if keep.len() < b {
            cache.retain_rows(&keep);
            pads = keep.iter().map(|&k| pads[k]).collect();
            active = keep.iter().map(|&k| active[k]).collect();
        }
        logits = forward(&mut cache, next, active.len(), 1, &pads);
        logits_row = (0..active.len()).collect();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argmax_takes_first_maximum() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, 2.0]), 1);
    }

    #[test]
    fn top_p_keeps_only_the_nucleus() {
        let mut rng = StdRng::seed_from_u64(0);
        // One token holds 97% of the mass: top_p 0.9 must always pick it.
        let logits = [10.0, 6.0, 5.0, 4.0];
        for _ in 0..100 {
            assert_eq!(sample(&logits, 1.0, 0.9, &mut rng), 0);
        }
        let picked: std::collections::HashSet<usize> = (0..400).map(|_| sample(&logits, 5.0, 1.0, &mut rng)).collect();
        assert!(picked.len() > 1);
    }
}

/// End-of-sequence ids: `config.json`'s, `generation_config.json`'s and the tokenizer's EOS.
pub fn stop_ids(model_dir: &std::path::Path, config_eos: &[u32], tok: &TextTokenizer) -> Vec<u32> {
    let mut ids = config_eos.to_vec();
    ids.extend(crate::formats::model_dir::generation_eos_ids(model_dir));
    if let Some(id) = tok.eos_token.as_deref().and_then(|t| tok.token_id(t)) {
        ids.push(id);
    }
    ids.sort();
    ids.dedup();
    ids
}

/// Errors from generating over a dataset.
#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    #[error(transparent)]
    Data(#[from] DataError),
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error("rendering the chat template")]
    Template(#[source] minijinja::Error),
}

/// One reply per conversation of a ChatML JSONL file: the messages up to the last user turn
/// (after an optional `system` message) are the prompt; `each` gets the JSON line `ft generate
/// --data` prints (prompt, text, the reference reply, ids), in the file's order. Conversations
/// are generated `batch` at a time (left-padded, see [`generate_batch`]), each row with its own
/// RNG seeded with `opts.seed`, so a reply does not depend on the batch size (up to float
/// rounding).
#[allow(clippy::too_many_arguments)]
pub fn generate_over<B: Kernels>(
    model: &Decoder<B>,
    tok: &TextTokenizer,
    template: &ChatTemplate,
    file: &std::path::Path,
    system: Option<&str>,
    opts: &GenerateOptions,
    batch: usize,
    mut each: impl FnMut(serde_json::Value),
) -> Result<(), GenerateError> {
    let mut prompts = Vec::new();
    for conv in read_jsonl(file)? {
        let last_user = conv
            .messages
            .iter()
            .rposition(|m| m.role == Role::User)
            .ok_or_else(|| DataError::At { at: conv.at.clone(), msg: "no user turn to answer".into() })?;
        let mut messages = conv.messages[..=last_user].to_vec();
        if let Some(s) = system {
            messages.insert(0, Message::new(Role::System, s));
        }
        let prompt = template.render(&messages, true).map_err(GenerateError::Template)?;
        let ids = tok.encode(&prompt)?.get_ids().to_vec();
        let reference = conv.messages.get(last_user + 1).map(|m| m.content.clone());
        prompts.push((conv.messages[last_user].content.clone(), ids, reference));
    }
    for chunk in prompts.chunks(batch.max(1)) {
        let ids: Vec<&[u32]> = chunk.iter().map(|p| p.1.as_slice()).collect();
        let rows: Vec<(usize, u64)> = (0..chunk.len()).map(|p| (p, opts.seed)).collect();
        for ((prompt, _, reference), out) in chunk.iter().zip(generate_batch(model, &ids, &rows, opts)) {
            let text = tok.decode(&out.ids)?;
            each(serde_json::json!({"prompt": prompt, "text": text, "reference": reference, "ids": out.ids}));
        }
    }
    Ok(())
}
