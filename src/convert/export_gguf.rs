//! `ft export gguf`: a Hugging Face model directory (merged with a LoRA adapter when given) →
//! one GGUF v3 file that llama.cpp and Ollama load, written the way llama.cpp's
//! `convert_hf_to_gguf.py` lays it out (architecture, metadata keys and types, tensor names and
//! order, Q/K rows permuted for the llama architecture, Gemma's `1 + w` norms, stacked experts,
//! the tokenizer) and, for the 4-bit and K-quant types, quantized with the tensor mixture
//! `llama-quantize` chooses from an f32 file.
//!
//! Streamed: tensors are read from the memory-mapped checkpoint, converted and written one at a
//! time (peak memory about one tensor; an MoE layer's experts are one stacked tensor). The file
//! appears whole or not at all.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use serde_json::Value;

use super::gguf_arch::{arch_name, gguf_name, norm_offset, permute, permutes_qk};
use super::gguf_vocab;
use super::ConvertError;
use crate::formats::gguf::dequant::{type_name, BF16, F16, F32, Q4_0, Q4_1, Q4_K, Q5_0, Q5_1, Q5_K, Q6_K, Q8_0};
use crate::formats::gguf::quant::{block_size, quantize_into};
use crate::formats::gguf::writer::{self, Meta, TensorSpec, WriteError};
use crate::formats::model_dir::config_json;
use crate::formats::safetensors::TensorFiles;
use crate::model::config::Family;
use crate::model::rope::RopeScaling;
use crate::model::ModelConfig;

impl From<WriteError> for ConvertError {
    fn from(e: WriteError) -> Self {
        match e {
            WriteError::Io { what, path, source } => ConvertError::invalid(&path, format!("{what}: {source}")),
            WriteError::Tensor { name, msg } => ConvertError::Invalid { path: PathBuf::from(name), msg },
        }
    }
}

/// The file's tensor type, as `convert_hf_to_gguf.py --outtype` (f32, f16, bf16, q8_0) or
/// `llama-quantize` (q4_0, q4_1, q4_k_m, q6_k) names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgufType {
    F32,
    F16,
    Bf16,
    Q8_0,
    Q4_0,
    Q4_1,
    Q4KM,
    Q6K,
}

impl GgufType {
    /// llama.cpp's `general.file_type` (`LLAMA_FTYPE_*`).
    pub fn file_type(self) -> u32 {
        match self {
            GgufType::F32 => 0,
            GgufType::F16 => 1,
            GgufType::Q4_0 => 2,
            GgufType::Q4_1 => 3,
            GgufType::Q8_0 => 7,
            GgufType::Q4KM => 15,
            GgufType::Q6K => 18,
            GgufType::Bf16 => 32,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            GgufType::F32 => "f32",
            GgufType::F16 => "f16",
            GgufType::Bf16 => "bf16",
            GgufType::Q8_0 => "q8_0",
            GgufType::Q4_0 => "q4_0",
            GgufType::Q4_1 => "q4_1",
            GgufType::Q4KM => "q4_k_m",
            GgufType::Q6K => "q6_k",
        }
    }

    /// The types `llama-quantize` makes from a float file (the rest `convert_hf_to_gguf.py` writes).
    fn quantizer_mixture(self) -> Option<u32> {
        match self {
            GgufType::Q4_0 => Some(Q4_0),
            GgufType::Q4_1 => Some(Q4_1),
            GgufType::Q4KM => Some(Q4_K),
            GgufType::Q6K => Some(Q6_K),
            _ => None,
        }
    }
}

/// What an export wrote.
#[derive(Debug, serde::Serialize)]
pub struct ExportReport {
    pub out: PathBuf,
    pub architecture: String,
    pub file_type: &'static str,
    pub tensors: usize,
    pub bytes: u64,
    /// Tensor count per GGUF type.
    pub types: BTreeMap<String, usize>,
    /// Where llama.cpp will read the model differently from transformers, or a guess was made.
    pub warnings: Vec<String>,
}

/// Where a GGUF tensor's values come from.
enum Source {
    Tensor(String),
    /// Per-expert matrices stacked into `[E, rows, cols]`.
    Stack(Vec<String>),
    /// Rows `part` of `parts` of each expert of a fused 3-D `[E, rows, cols]` tensor.
    FusedPart { name: String, part: usize, parts: usize },
    Values(Vec<f32>),
}

struct Planned {
    name: String,
    shape: Vec<usize>,
    source: Source,
    /// Permute rows for llama.cpp's rotary layout with this many heads.
    permute_heads: Option<usize>,
    /// Gemma: store `1 + w`.
    add_one: bool,
    /// Multiply every value (Gemma's attention scale folded into q).
    scale: Option<f32>,
}

fn raw_get<'a>(raw: &'a Value, key: &str) -> Option<&'a Value> {
    raw.get(key).filter(|v| !v.is_null())
}

/// The rotary settings of the global (full-attention) rope as the raw config spells them.
fn rope_params(raw: &Value) -> Value {
    let p = raw_get(raw, "rope_parameters").or_else(|| raw_get(raw, "rope_scaling")).cloned().unwrap_or(Value::Null);
    p.get("full_attention").cloned().unwrap_or(p)
}

/// llama.cpp's `rope_freqs` for Llama 3 scaling, as its converter computes them (in f32).
fn llama3_factors(theta: f64, dim: usize, factor: f64, low: f64, high: f64, old_ctx: usize) -> Vec<f32> {
    let (low_wavelen, high_wavelen) = (old_ctx as f64 / low, old_ctx as f64 / high);
    (0..dim)
        .step_by(2)
        .map(|i| {
            let freq = 1.0f32 / (theta as f32).powf(i as f32 / dim as f32);
            let wavelen = 2.0 * std::f32::consts::PI / freq;
            if (wavelen as f64) < high_wavelen {
                1.0
            } else if wavelen as f64 > low_wavelen {
                factor as f32
            } else {
                let smooth = (old_ctx as f32 / wavelen - low as f32) / (high as f32 - low as f32);
                1.0 / ((1.0 - smooth) / factor as f32 + smooth)
            }
        })
        .collect()
}

/// `…experts.<e>.…`: one expert's matrix of a per-expert checkpoint.
fn is_expert_matrix(name: &str) -> bool {
    let parts: Vec<&str> = name.split('.').collect();
    parts.windows(2).any(|w| w[0] == "experts" && w[1].parse::<usize>().is_ok())
}

/// `llama-quantize`'s layers that get more bits in Q4_K_M: the first and last eighth, and every
/// third layer between.
fn use_more_bits(i: usize, n: usize) -> bool {
    i < n / 8 || i >= 7 * n / 8 || (i as i64 - (n / 8) as i64) % 3 == 2
}

/// Exports `model` (merged with `adapter` when given) to `out` as `ty`.
pub fn export(model: &Path, adapter: Option<&Path>, out: &Path, ty: GgufType) -> Result<ExportReport, ConvertError> {
    let Some(adapter) = adapter else {
        return export_dir(model, out, ty);
    };
    // Merge in f32 next to the output (same filesystem, removed afterwards), then export.
    let name = out.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let merged = out.with_file_name(format!(".{name}.merged-{}", std::process::id()));
    struct Remove(PathBuf);
    impl Drop for Remove {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let _cleanup = Remove(merged.clone());
    super::merge::merge(super::merge::MergeBase::AsTrained(model), adapter, &merged, Some(crate::formats::safetensors::OutDtype::F32))?;
    export_dir(&merged, out, ty)
}

/// llama.cpp's attention scale dimension for Gemma (`1/sqrt(d)`): head_dim, except the 27B
/// models, which it recognises by layer count and gives `hidden / heads`.
fn gemma_scale_dim(c: &ModelConfig) -> usize {
    let is_27b = matches!((c.family, c.num_layers), (Family::Gemma2, 46) | (Family::Gemma3, 62));
    if is_27b {
        c.hidden_size / c.num_heads
    } else {
        c.head_dim
    }
}

/// The model's config; an architecture ft does not know is a family llama.cpp's export cannot
/// take from ft (exit 2).
fn family_config(dir: &Path) -> Result<ModelConfig, ConvertError> {
    ModelConfig::from_dir(dir).map_err(|e| match e {
        crate::model::ConfigError::UnknownArchitecture { path, model_type } => ConvertError::Unsupported {
            path,
            msg: format!("model_type {model_type:?}: ft exports the families it trains (llama, mistral, mixtral, qwen2, qwen3, qwen3_moe, smollm3, gemma2, gemma3_text, phi3); llama.cpp's convert_hf_to_gguf.py covers more"),
        },
        e => e.into(),
    })
}

fn export_dir(dir: &Path, out: &Path, ty: GgufType) -> Result<ExportReport, ConvertError> {
    let c = family_config(dir)?;
    let raw = config_json(dir)?;
    let config_path = dir.join("config.json");
    let refuse = |msg: String| ConvertError::unsupported(&config_path, msg);
    if c.num_labels.is_some() {
        return Err(refuse("a sequence-classification model (a reward model): GGUF export is for causal language models".into()));
    }
    let arch = arch_name(c.family);
    let mut warnings = Vec::new();

    // What llama.cpp cannot represent: refuse, naming the key.
    if c.family == Family::SmolLM3 {
        for (il, l) in c.layers.iter().enumerate() {
            if l.rope.is_none() != ((il + 1) % 4 == 0) {
                return Err(refuse(format!("no_rope_layers: llama.cpp's smollm3 skips RoPE in every 4th layer (3, 7, ...), but layer {il} {} RoPE here; the GGUF would compute a different model", if l.rope.is_none() { "has no" } else { "has" })));
            }
        }
    }
    if let Some(m) = &c.moe {
        if c.family == Family::Qwen3Moe && !m.norm_topk_prob {
            return Err(refuse("norm_topk_prob: false — llama.cpp's qwen3moe always renormalizes the top-k routing weights".into()));
        }
    }
    for (i, r) in c.ropes.iter().enumerate() {
        let ok = match &r.scaling {
            RopeScaling::None | RopeScaling::Linear { .. } | RopeScaling::Yarn { .. } | RopeScaling::Llama3 { .. } => true,
            RopeScaling::LongRope { .. } => c.family == Family::Phi3,
            RopeScaling::Dynamic { .. } => false,
        };
        // Gemma 3's local rope is plain in llama.cpp (scale 1).
        let local_scaled = c.family == Family::Gemma3 && i > 0 && r.scaling != RopeScaling::None;
        if !ok || local_scaled {
            return Err(refuse(format!("rope scaling {:?}: llama.cpp's {arch} architecture cannot apply it", r.scaling)));
        }
    }
    let windowed = c.layers.iter().filter_map(|l| l.sliding_window).max();
    if let (Some(w), "llama" | "qwen2") = (windowed, arch) {
        warnings.push(format!("sliding_window {w}: llama.cpp's {arch} architecture attends to the whole context; past {w} tokens its outputs differ from transformers'"));
    }

    let ck = TensorFiles::open(dir)?;
    if ck.names().any(|n| n.ends_with(crate::formats::bnb::STATE_SUFFIX)) {
        return Err(ConvertError::unsupported(dir, "a bitsandbytes 4-bit checkpoint: export the full-precision base (with --adapter for a QLoRA adapter)"));
    }
    let vocab = gguf_vocab::vocab(dir, c.vocab_size)?;
    warnings.extend(vocab.warnings.iter().cloned());

    // Gemma's query_pre_attn_scalar, folded into q where llama.cpp's fixed scale differs.
    let q_fold = c.family.is_gemma().then(|| (c.attn_scale * (gemma_scale_dim(&c) as f64).sqrt()) as f32).filter(|s| *s != 1.0);

    // ---- the tensors, in the converter's order (shard by shard, names sorted) ----
    let mut plans: Vec<Planned> = Vec::new();
    let plain = |name: String, shape: Vec<usize>, source: Source| Planned { name, shape, source, permute_heads: None, add_one: false, scale: None };
    let (global_rope, rotary_dim) = (&c.ropes[0], c.rotary_dim);
    match &global_rope.scaling {
        RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max } => {
            let f = llama3_factors(global_rope.theta, c.head_dim, *factor, *low_freq_factor, *high_freq_factor, *original_max);
            plans.push(plain("rope_freqs.weight".into(), vec![f.len()], Source::Values(f)));
        }
        RopeScaling::LongRope { short, long, .. } => {
            let v = |x: &[f64]| x.iter().map(|&f| f as f32).collect::<Vec<f32>>();
            plans.push(plain("rope_factors_long.weight".into(), vec![long.len()], Source::Values(v(long))));
            plans.push(plain("rope_factors_short.weight".into(), vec![short.len()], Source::Values(v(short))));
        }
        _ => {}
    }
    let mut files: Vec<(PathBuf, usize)> = ck.files().into_iter().enumerate().map(|(i, p)| (p.to_path_buf(), i)).collect();
    files.sort();
    let mut experts: BTreeMap<usize, Vec<String>> = BTreeMap::new();
    let n_exp = c.moe.as_ref().map_or(0, |m| m.num_experts);
    for (_, shard) in files {
        let mut names = ck.shard_names(shard);
        names.sort();
        for name in names {
            let shape = ck.info(&name).map(|(s, _)| s).unwrap_or_default();
            if name.ends_with("rotary_emb.inv_freq") || (name == "lm_head.weight" && c.tie_word_embeddings) {
                ck.skip(&name);
                continue;
            }
            let layer = name.strip_prefix("model.layers.").and_then(|r| r.split_once('.')).and_then(|(l, _)| l.parse::<usize>().ok());
            // Per-expert matrices: stacked when the layer's last one arrives.
            if is_expert_matrix(&name) {
                let l = layer.ok_or_else(|| ConvertError::invalid(dir, format!("{name}: an expert outside model.layers")))?;
                let seen = experts.entry(l).or_default();
                seen.push(name.clone());
                if seen.len() == 3 * n_exp {
                    let mixtral = c.family == Family::Mixtral;
                    let order: [(&str, &str); 3] = if mixtral {
                        [("w1", "ffn_gate_exps"), ("w2", "ffn_down_exps"), ("w3", "ffn_up_exps")]
                    } else {
                        [("down_proj", "ffn_down_exps"), ("gate_proj", "ffn_gate_exps"), ("up_proj", "ffn_up_exps")]
                    };
                    let block = if mixtral { "block_sparse_moe" } else { "mlp" };
                    for (hf, g) in order {
                        let names: Vec<String> = (0..n_exp).map(|e| format!("model.layers.{l}.{block}.experts.{e}.{hf}.weight")).collect();
                        let s = ck.info(&names[0]).map(|(s, _)| s).ok_or_else(|| ConvertError::invalid(dir, format!("{} is missing", names[0])))?;
                        plans.push(plain(format!("blk.{l}.{g}.weight"), vec![n_exp, s[0], s[1]], Source::Stack(names)));
                    }
                }
                continue;
            }
            if let (Some(l), true) = (layer, name.contains("mlp.experts.gate_up_proj") || name.contains("mlp.experts.down_proj")) {
                if shape.len() != 3 {
                    return Err(ConvertError::invalid(dir, format!("{name}: expected a 3-D [experts, rows, cols] tensor, got {shape:?}")));
                }
                if name.contains("gate_up_proj") {
                    for (part, g) in [(0, "ffn_gate_exps"), (1, "ffn_up_exps")] {
                        plans.push(plain(format!("blk.{l}.{g}.weight"), vec![shape[0], shape[1] / 2, shape[2]], Source::FusedPart { name: name.clone(), part, parts: 2 }));
                    }
                } else {
                    plans.push(plain(format!("blk.{l}.ffn_down_exps.weight"), shape.clone(), Source::Tensor(name.clone())));
                }
                continue;
            }
            let g = gguf_name(arch, &name).ok_or_else(|| ConvertError::unsupported(dir, format!("tensor {name} has no counterpart in llama.cpp's {arch} architecture")))?;
            let mut p = plain(g, shape, Source::Tensor(name.clone()));
            if permutes_qk(arch) {
                if name.contains("self_attn.q_proj.") {
                    p.permute_heads = Some(c.num_heads);
                } else if name.contains("self_attn.k_proj.") {
                    p.permute_heads = Some(c.num_kv_heads);
                }
            }
            p.add_one = norm_offset(arch) && name.ends_with("norm.weight");
            if let Some(s) = q_fold {
                let target = if c.qk_norm { "self_attn.q_norm.weight" } else { "self_attn.q_proj.weight" };
                if name.ends_with(target) {
                    p.scale = Some(s);
                }
            }
            plans.push(p);
        }
    }
    if let Some((l, seen)) = experts.iter().find(|(_, v)| v.len() != 3 * n_exp) {
        return Err(ConvertError::invalid(dir, format!("layer {l} has {} expert matrices, expected {} (3 per expert)", seen.len(), 3 * n_exp)));
    }
    if let Some(s) = q_fold {
        warnings.push(format!(
            "query_pre_attn_scalar {}: llama.cpp scales Gemma's attention by 1/sqrt({}); the difference (x{s}) is folded into the query {}",
            (c.attn_scale.powi(-2)).round(),
            gemma_scale_dim(&c),
            if c.qk_norm { "norm weights" } else { "projection" }
        ));
    }

    // llama-quantize reads (and counts layers over) tensors by block, then by name.
    if ty.quantizer_mixture().is_some() {
        let layer = |n: &str| n.strip_prefix("blk.").and_then(|r| r.split('.').next()).and_then(|l| l.parse::<i64>().ok()).unwrap_or(-1);
        plans.sort_by(|a, b| (layer(&a.name), &a.name).cmp(&(layer(&b.name), &b.name)));
    }
    let types = choose_types(ty, &plans, &c);

    // ---- metadata ----
    let k = |s: &str| format!("{arch}.{s}");
    let size_label = size_label(&plans);
    let mut meta: Vec<(String, Meta)> = vec![
        ("general.architecture".into(), Meta::str(arch)),
        ("general.type".into(), Meta::str("model")),
        ("general.name".into(), Meta::Str(dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into()))),
        ("general.size_label".into(), Meta::Str(size_label)),
        (k("block_count"), Meta::U32(c.num_layers as u32)),
        (k("context_length"), Meta::U32(c.max_position_embeddings as u32)),
        (k("embedding_length"), Meta::U32(c.hidden_size as u32)),
        (k("feed_forward_length"), Meta::U32(c.intermediate_size as u32)),
        (k("attention.head_count"), Meta::U32(c.num_heads as u32)),
        (k("attention.head_count_kv"), Meta::U32(c.num_kv_heads as u32)),
        (k("rope.freq_base"), Meta::F32(global_rope.theta as f32)),
        (k("attention.layer_norm_rms_epsilon"), Meta::F32(c.rms_norm_eps as f32)),
    ];
    if raw_get(&raw, "head_dim").is_some() || c.family.is_gemma() {
        meta.push((k("attention.key_length"), Meta::U32(c.head_dim as u32)));
        meta.push((k("attention.value_length"), Meta::U32(c.head_dim as u32)));
    }
    if let Some(m) = &c.moe {
        meta.push((k("expert_count"), Meta::U32(m.num_experts as u32)));
        meta.push((k("expert_used_count"), Meta::U32(m.top_k as u32)));
        if c.family == Family::Qwen3Moe {
            meta.push((k("expert_feed_forward_length"), Meta::U32(m.intermediate_size as u32)));
        }
    }
    if matches!(arch, "llama" | "smollm3") {
        meta.push((k("vocab_size"), Meta::U32(c.vocab_size as u32)));
        meta.push((k("rope.dimension_count"), Meta::U32(c.head_dim as u32)));
    }
    let rp = rope_params(&raw);
    match &global_rope.scaling {
        RopeScaling::Linear { factor } => {
            meta.push((k("rope.scaling.type"), Meta::str("linear")));
            meta.push((k("rope.scaling.factor"), Meta::F32(*factor as f32)));
        }
        RopeScaling::Yarn { factor, original_max, .. } => {
            meta.push((k("rope.scaling.type"), Meta::str("yarn")));
            meta.push((k("rope.scaling.factor"), Meta::F32(*factor as f32)));
            meta.push((k("rope.scaling.original_context_length"), Meta::U32(*original_max as u32)));
            for (key, gk) in [("extrapolation_factor", "rope.scaling.yarn_ext_factor"), ("beta_fast", "rope.scaling.yarn_beta_fast"), ("beta_slow", "rope.scaling.yarn_beta_slow")] {
                if let Some(v) = rp.get(key).and_then(Value::as_f64) {
                    meta.push((k(gk), Meta::F32(v as f32)));
                }
            }
            if let Some(v) = rp.get("attention_factor").or_else(|| rp.get("attn_factor")).and_then(Value::as_f64) {
                meta.push((k("rope.scaling.yarn_attn_factor"), Meta::F32(v as f32)));
            }
        }
        RopeScaling::LongRope { attention_factor, .. } => {
            meta.push((k("rope.scaling.attn_factor"), Meta::F32(*attention_factor as f32)));
        }
        _ => {}
    }
    match c.family {
        Family::Gemma2 => {
            meta.push((k("attn_logit_softcapping"), Meta::F32(c.attn_softcap.unwrap_or(0.0) as f32)));
            meta.push((k("final_logit_softcapping"), Meta::F32(c.final_softcap.unwrap_or(0.0) as f32)));
            meta.push((k("attention.sliding_window"), Meta::U32(windowed.unwrap_or(0) as u32)));
        }
        Family::Gemma3 => {
            if let Some(cap) = c.final_softcap {
                meta.push((k("final_logit_softcapping"), Meta::F32(cap as f32)));
            }
            if let Some(w) = windowed {
                meta.push((k("attention.sliding_window"), Meta::U32(w as u32)));
            }
            if let Some(local) = c.layers.iter().filter(|l| l.sliding_window.is_some()).find_map(|l| l.rope) {
                meta.push((k("rope.freq_base_swa"), Meta::F32(c.ropes[local].theta as f32)));
            }
        }
        Family::Phi3 => {
            meta.push((k("rope.dimension_count"), Meta::U32(rotary_dim as u32)));
            let orig = raw_get(&raw, "original_max_position_embeddings").or_else(|| rp.get("original_max_position_embeddings")).and_then(Value::as_u64);
            meta.push((k("rope.scaling.original_context_length"), Meta::U32(orig.unwrap_or(c.max_position_embeddings as u64) as u32)));
            meta.push((k("attention.sliding_window"), Meta::U32(windowed.unwrap_or(0) as u32)));
        }
        Family::Mistral | Family::Qwen2 | Family::Llama | Family::Mixtral => {
            if let Some(w) = windowed {
                meta.push((k("attention.sliding_window"), Meta::U32(w as u32)));
            }
        }
        _ => {}
    }
    // Gemma's layer pattern, when it is not llama.cpp's default (every 2nd / 6th layer global).
    if c.family.is_gemma() && windowed.is_some() {
        let period = if c.family == Family::Gemma2 { 2 } else { 6 };
        let pattern: Vec<bool> = c.layers.iter().map(|l| l.sliding_window.is_some()).collect();
        let default: Vec<bool> = (0..c.num_layers).map(|il| il % period < period - 1).collect();
        if pattern != default {
            meta.push((k("attention.sliding_window_pattern"), Meta::BoolArray(pattern)));
            warnings.push(format!("the sliding-window layers are not llama.cpp's default pattern (every {period}th layer global): written as {arch}.attention.sliding_window_pattern, which llama.cpp builds from 2025-06 read"));
        }
    }
    meta.push(("general.file_type".into(), Meta::U32(ty.file_type())));
    meta.push(("general.quantization_version".into(), Meta::U32(2)));
    meta.extend(vocab.meta.iter().cloned());

    // ---- write ----
    let specs: Vec<TensorSpec> = plans.iter().zip(&types).map(|(p, &t)| TensorSpec { name: p.name.clone(), shape: p.shape.clone(), ggml_type: t }).collect();
    let produce = |i: usize| -> Result<Vec<u8>, ConvertError> {
        let p = &plans[i];
        let read = |n: &str, shape: &[usize]| {
            let v = ck.f32(n, shape);
            ck.release(n);
            v
        };
        let mut v = match &p.source {
            Source::Tensor(n) => read(n, &p.shape)?,
            Source::Values(v) => v.clone(),
            Source::Stack(names) => {
                let mut v = Vec::with_capacity(p.shape.iter().product());
                for n in names {
                    v.extend(read(n, &p.shape[1..])?);
                }
                v
            }
            Source::FusedPart { name, part, parts } => {
                let full = read(name, &[p.shape[0], p.shape[1] * parts, p.shape[2]])?;
                let per = p.shape[1] * p.shape[2];
                (0..p.shape[0]).flat_map(|e| full[(e * parts + part) * per..(e * parts + part + 1) * per].to_vec()).collect()
            }
        };
        if let Some(h) = p.permute_heads {
            let rows = p.shape[0];
            let cols = p.shape.get(1).copied().unwrap_or(1);
            v = permute(&v, rows, cols, h);
        }
        if p.add_one {
            v.iter_mut().for_each(|x| *x += 1.0);
        }
        if let Some(s) = p.scale {
            v.iter_mut().for_each(|x| *x *= s);
        }
        encode(types[i], &v).ok_or_else(|| ConvertError::invalid(out, format!("tensor {}: cannot write type {}", p.name, type_name(types[i]))))
    };
    let bytes = writer::write(out, &meta, &specs, produce)?;
    ck.check_all_used()?;
    let mut counts = BTreeMap::new();
    for t in &types {
        *counts.entry(type_name(*t)).or_insert(0) += 1;
    }
    Ok(ExportReport { out: out.into(), architecture: arch.into(), file_type: ty.name(), tensors: plans.len(), bytes, types: counts, warnings })
}

/// What a LoRA export wrote.
#[derive(Debug, serde::Serialize)]
pub struct LoraExportReport {
    pub out: PathBuf,
    pub architecture: String,
    /// Adapted modules (pairs of lora_a / lora_b tensors).
    pub modules: usize,
    /// `adapter.lora.alpha` as written (rsLoRA's scale folded in).
    pub alpha: f64,
    pub bytes: u64,
    pub warnings: Vec<String>,
}

/// Exports the PEFT LoRA adapter in `adapter` (trained on `model`) as llama.cpp's GGUF adapter:
/// `general.type = adapter`, `adapter.type = lora`, `adapter.lora.alpha`, and for each adapted
/// module `blk.N.<name>.weight.lora_a` (PEFT's A, `[r, in]`) and `.lora_b` (B, `[out, r]`, rows
/// permuted like the base's q/k for the llama architecture), as llama.cpp's
/// `convert_lora_to_gguf.py` writes them. llama.cpp scales every module by `alpha / r`: rsLoRA's
/// `alpha / sqrt(r)` becomes `alpha · sqrt(r)`, and a module whose scale differs (rank or alpha
/// patterns; Gemma 2's query scale folded into the base) has the difference multiplied into B.
/// DoRA, `modules_to_save` and expert (`target_parameters`) adapters have no GGUF adapter form:
/// refused, pointing at the merged export.
pub fn export_lora(adapter: &Path, model: &Path, out: &Path, ty: GgufType) -> Result<LoraExportReport, ConvertError> {
    let c = family_config(model)?;
    let arch = arch_name(c.family);
    let ad = crate::adapters::peft::PeftAdapter::open(adapter)?;
    let cfg = &ad.config;
    let config_path = adapter.join("adapter_config.json");
    let merged_hint = format!("export the merged model instead: ft export gguf --model {} --adapter {}", model.display(), adapter.display());
    if cfg.use_dora {
        return Err(ConvertError::unsupported(&config_path, format!("use_dora: llama.cpp applies plain LoRA (alpha/r · B A); a DoRA adapter's magnitude vector has no GGUF adapter form — {merged_hint}")));
    }
    if !cfg.target_parameters.is_empty() {
        return Err(ConvertError::unsupported(&config_path, format!("target_parameters (expert stacks): llama.cpp's GGUF adapters hold per-module LoRA pairs only — {merged_hint}")));
    }
    if !matches!(ty, GgufType::F32 | GgufType::F16 | GgufType::Bf16 | GgufType::Q8_0) {
        return Err(ConvertError::unsupported(out, format!("--type {}: a GGUF adapter is f32, f16, bf16 or q8_0 (as llama.cpp's convert_lora_to_gguf.py writes it)", ty.name())));
    }
    let ck = &ad.files.tensors;
    // Modules in order of first appearance among the sorted tensor names (the converter's order).
    let mut modules: Vec<String> = Vec::new();
    let mut names: Vec<&str> = ck.names().collect();
    names.sort();
    for n in &names {
        let Some(rest) = n.strip_prefix("base_model.model.") else { continue };
        let module = rest
            .strip_suffix(".lora_A.weight")
            .or_else(|| rest.strip_suffix(".lora_B.weight"))
            .or_else(|| rest.strip_suffix(".lora_embedding_A"))
            .or_else(|| rest.strip_suffix(".lora_embedding_B"));
        match module {
            Some(m) => {
                if !modules.iter().any(|x| x == m) {
                    modules.push(m.to_string());
                }
            }
            // PEFT's copy of the base embedding beside an embedding LoRA is the base's own.
            None if rest.ends_with(".base_layer.weight") => ck.skip(n),
            None => {
                return Err(ConvertError::unsupported(&config_path, format!("{n}: a fully trained module (modules_to_save) — a GGUF adapter holds LoRA pairs only; {merged_hint}")));
            }
        }
    }
    if modules.is_empty() {
        return Err(ConvertError::invalid(adapter, "adapter_model.safetensors holds no LoRA tensors"));
    }
    // One alpha for the file: the default module's scale times its rank.
    let alpha = cfg.scale() * cfg.r as f64;
    let q_fold = (c.family == Family::Gemma2).then(|| (c.attn_scale * (gemma_scale_dim(&c) as f64).sqrt()) as f32).filter(|s| *s != 1.0);
    let mut warnings = Vec::new();
    if cfg.use_rslora {
        warnings.push(format!("rsLoRA: adapter.lora.alpha = {alpha} (lora_alpha {} · sqrt(r {})) so that llama.cpp's alpha/r is PEFT's alpha/sqrt(r)", cfg.alpha, cfg.r));
    }
    struct Pair {
        name: String,
        a: (String, Vec<usize>),
        b: (String, Vec<usize>),
        /// Multiply B by this (the module's scale against the file's alpha/r; Gemma's q fold).
        factor: f32,
        permute_heads: Option<usize>,
        embedding: bool,
    }
    let mut pairs = Vec::new();
    for m in &modules {
        let embedding = crate::formats::peft::is_embedding(m);
        let (an, bn) = crate::formats::peft::tensor_names(m);
        let shape = |n: &str| ck.info(n).map(|(s, _)| s).ok_or_else(|| ConvertError::invalid(adapter, format!("{m}: {n} is missing (LoRA tensors come in A/B pairs)")));
        let (sa, sb) = (shape(&an)?, shape(&bn)?);
        let weight = format!("{m}.weight");
        if weight == "lm_head.weight" && c.tie_word_embeddings {
            return Err(ConvertError::unsupported(&config_path, format!("a LoRA on lm_head of a model with tied embeddings: llama.cpp's GGUF has no separate output tensor to adapt — {merged_hint}")));
        }
        let g = gguf_name(arch, &weight).ok_or_else(|| ConvertError::unsupported(&config_path, format!("{m} has no counterpart in llama.cpp's {arch} architecture")))?;
        let r = sa[0];
        let mut factor = (cfg.scale_for(m) * r as f64 / alpha) as f32;
        if let (Some(s), true) = (q_fold, m.ends_with("self_attn.q_proj")) {
            factor *= s;
        }
        let permute_heads = match (permutes_qk(arch), m.rsplit('.').next()) {
            (true, Some("q_proj")) => Some(c.num_heads),
            (true, Some("k_proj")) => Some(c.num_kv_heads),
            _ => None,
        };
        pairs.push(Pair { name: g, a: (an, sa), b: (bn, sb), factor, permute_heads, embedding });
    }
    // Tensor types: as the converter's rule (2-D lora tensors take the type; q8_0 needs rows of 32).
    let pick = |shape: &[usize]| match ty {
        GgufType::F16 => F16,
        GgufType::Bf16 => BF16,
        GgufType::Q8_0 if shape.last().is_some_and(|c| c % 32 == 0) => Q8_0,
        GgufType::Q8_0 => F16,
        _ => F32,
    };
    let mut specs = Vec::new();
    for p in &pairs {
        let a_shape = if p.embedding { vec![p.a.1[1], p.a.1[0]] } else { p.a.1.clone() };
        specs.push(TensorSpec { name: format!("{}.lora_a", p.name), ggml_type: pick(&a_shape), shape: a_shape });
        specs.push(TensorSpec { name: format!("{}.lora_b", p.name), ggml_type: pick(&p.b.1), shape: p.b.1.clone() });
    }
    let meta: Vec<(String, Meta)> = vec![
        ("general.architecture".into(), Meta::str(arch)),
        ("general.type".into(), Meta::str("adapter")),
        ("adapter.type".into(), Meta::str("lora")),
        ("general.name".into(), Meta::Str(adapter.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "adapter".into()))),
        ("adapter.lora.alpha".into(), Meta::F32(alpha as f32)),
        ("general.quantization_version".into(), Meta::U32(2)),
    ];
    let produce = |i: usize| -> Result<Vec<u8>, ConvertError> {
        let p = &pairs[i / 2];
        let v = if i.is_multiple_of(2) {
            let a = ck.f32(&p.a.0, &p.a.1)?;
            if p.embedding {
                // llama.cpp's embedding LoRA takes A transposed ([vocab, r]).
                let (r, n) = (p.a.1[0], p.a.1[1]);
                (0..n).flat_map(|j| (0..r).map(move |i| (i, j))).map(|(i, j)| a[i * n + j]).collect()
            } else {
                a
            }
        } else {
            let mut b = ck.f32(&p.b.0, &p.b.1)?;
            if let Some(h) = p.permute_heads {
                b = permute(&b, p.b.1[0], p.b.1[1], h);
            }
            if p.factor != 1.0 {
                b.iter_mut().for_each(|x| *x *= p.factor);
            }
            b
        };
        encode(specs[i].ggml_type, &v).ok_or_else(|| ConvertError::invalid(out, format!("tensor {}: cannot write its type", specs[i].name)))
    };
    let bytes = writer::write(out, &meta, &specs, produce)?;
    ck.check_all_used()?;
    Ok(LoraExportReport { out: out.into(), architecture: arch.into(), modules: pairs.len(), alpha, bytes, warnings })
}

/// gguf-py's parameter-count label (`general.size_label`): "135M", or "8x7.2B" for experts.
fn size_label(plans: &[Planned]) -> String {
    let (mut total, mut shared, mut expert_params, mut expert_sum, mut expert_tensors) = (0usize, 0usize, 0usize, 0usize, 0usize);
    for p in plans {
        let size: usize = p.shape.iter().product();
        total += size;
        if p.name.contains("_exps.") && p.shape.len() >= 3 {
            let e = p.shape[p.shape.len() - 3];
            expert_params += size / e;
            expert_sum += e;
            expert_tensors += 1;
        } else {
            shared += size;
        }
    }
    let rounded = |n: usize| {
        let n = n as f64;
        let (x, suffix) = if n > 1e12 {
            (n * 1e-12, "T")
        } else if n > 1e9 {
            (n * 1e-9, "B")
        } else if n > 1e6 {
            (n * 1e-6, "M")
        } else {
            (n * 1e-3, "K")
        };
        let digits = format!("{}", x.round() as u64).trim_start_matches('0').len();
        format!("{x:.*}{suffix}", 2usize.saturating_sub(digits))
    };
    match expert_sum.checked_div(expert_tensors) {
        Some(experts) => format!("{experts}x{}", rounded(shared + expert_params)),
        None => rounded(total),
    }
}

/// Encodes f32 values as GGUF type `t` (quantized types in parallel over blocks).
pub fn encode(t: u32, v: &[f32]) -> Option<Vec<u8>> {
    match t {
        F32 => Some(v.iter().flat_map(|x| x.to_le_bytes()).collect()),
        F16 => Some(v.iter().flat_map(|x| half::f16::from_f32(*x).to_bits().to_le_bytes()).collect()),
        BF16 => Some(v.iter().flat_map(|x| half::bf16::from_f32(*x).to_bits().to_le_bytes()).collect()),
        _ => {
            let chunk = block_size(t) * 1024;
            let parts: Vec<Option<Vec<u8>>> = v
                .par_chunks(chunk)
                .map(|c| {
                    let mut out = Vec::new();
                    quantize_into(t, c, &mut out).map(|_| out)
                })
                .collect();
            parts.into_iter().collect::<Option<Vec<_>>>().map(|p| p.concat())
        }
    }
}

/// What `llama-quantize` groups tensors by when choosing their types.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Category {
    TokenEmbd,
    Output,
    AttnQkv,
    AttnV,
    AttnK,
    AttnQ,
    AttnOutput,
    FfnUp,
    FfnGate,
    FfnDown,
    Other,
}

fn category(name: &str) -> Category {
    match name {
        "output.weight" => Category::Output,
        "token_embd.weight" => Category::TokenEmbd,
        n if n.contains("attn_qkv.weight") => Category::AttnQkv,
        n if n.contains("attn_v.weight") => Category::AttnV,
        n if n.contains("attn_k.weight") => Category::AttnK,
        n if n.contains("attn_q.weight") => Category::AttnQ,
        n if n.contains("attn_output.weight") => Category::AttnOutput,
        n if n.contains("ffn_up") => Category::FfnUp,
        n if n.contains("ffn_gate") => Category::FfnGate,
        n if n.contains("ffn_down") => Category::FfnDown,
        _ => Category::Other,
    }
}

/// Each tensor's type: `convert_hf_to_gguf.py`'s rule for the float and q8_0 outputs (1-D
/// tensors, norms, biases and routers in f32; q8_0 rows not a multiple of 32 in f16), and
/// `llama-quantize`'s mixture for the others (from an f32 file; no importance matrix).
fn choose_types(ty: GgufType, plans: &[Planned], c: &ModelConfig) -> Vec<u32> {
    let kept_f32 = |p: &Planned| p.shape.len() <= 1 || p.name.ends_with("_norm.weight") || p.name.contains("ffn_gate_inp") || !p.name.ends_with(".weight");
    let cols = |p: &Planned| *p.shape.last().unwrap_or(&1);
    let Some(default) = ty.quantizer_mixture() else {
        return plans
            .iter()
            .map(|p| match ty {
                _ if kept_f32(p) => F32,
                GgufType::F16 => F16,
                GgufType::Bf16 => BF16,
                GgufType::Q8_0 if cols(p) % 32 == 0 => Q8_0,
                GgufType::Q8_0 => F16,
                _ => F32,
            })
            .collect();
    };
    let n_expert = c.moe.as_ref().map_or(1, |m| m.num_experts);
    let tied = !plans.iter().any(|p| p.name == "output.weight");
    let n_attention_wv = plans.iter().filter(|p| matches!(category(&p.name), Category::AttnV | Category::AttnQkv)).count();
    let n_ffn_down = plans.iter().filter(|p| category(&p.name) == Category::FfnDown).count();
    let (mut i_wv, mut i_down) = (0usize, 0usize);
    let q4km = ty == GgufType::Q4KM;
    plans
        .iter()
        .map(|p| {
            // llama-quantize leaves 1-D tensors, norms and routers as the input has them (f32).
            if p.shape.len() < 2 || p.name.ends_with("_norm.weight") || p.name.contains("ffn_gate_inp") || !p.name.ends_with("weight") {
                return F32;
            }
            let cat = category(&p.name);
            let mut t = default;
            match cat {
                Category::Output | Category::TokenEmbd if cat == Category::Output || tied => {
                    if cols(p) % block_size(default) != 0 {
                        t = Q8_0;
                    } else if default != Q8_0 {
                        t = Q6_K;
                    }
                }
                Category::AttnV | Category::AttnQkv => {
                    if q4km && use_more_bits(i_wv, n_attention_wv) {
                        t = Q6_K;
                    }
                    if n_expert == 8 {
                        t = Q8_0;
                    }
                    i_wv += 1;
                }
                Category::AttnK if n_expert == 8 => t = Q8_0,
                Category::FfnDown => {
                    let i_layer = if n_expert > 1 {
                        p.name.strip_prefix("blk.").and_then(|r| r.split('.').next()).and_then(|l| l.parse().ok()).unwrap_or(i_down)
                    } else {
                        i_down
                    };
                    if q4km && use_more_bits(i_layer, n_ffn_down) {
                        t = Q6_K;
                    }
                    i_down += 1;
                }
                Category::AttnOutput if n_expert == 8 && q4km => t = Q5_K,
                _ => {}
            }
            // Rows the type's blocks do not divide: llama-quantize's fallbacks.
            if cols(p) % block_size(t) != 0 {
                t = match t {
                    Q4_K => Q5_0,
                    Q5_K => Q5_1,
                    Q6_K => Q8_0,
                    other => other,
                };
                if cols(p) % block_size(t) != 0 {
                    t = F16;
                }
            }
            t
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expert_matrices_are_recognised() {
        assert!(is_expert_matrix("model.layers.0.mlp.experts.3.up_proj.weight"));
        assert!(is_expert_matrix("model.layers.0.block_sparse_moe.experts.0.w1.weight"));
        assert!(!is_expert_matrix("model.layers.0.mlp.experts.gate_up_proj"));
        assert!(!is_expert_matrix("model.layers.0.mlp.gate.weight"));
    }

    #[test]
    fn llama3_factors_follow_the_converter() {
        // Llama 3.1's settings: high frequencies unscaled, low ones divided by 8, smooth between.
        let f = llama3_factors(500000.0, 128, 8.0, 1.0, 4.0, 8192);
        assert_eq!(f.len(), 64);
        assert_eq!(f[0], 1.0);
        assert_eq!(f[63], 8.0);
        assert!(f.windows(2).all(|w| w[0] <= w[1]), "{f:?}");
        assert!(f.iter().any(|&x| x > 1.0 && x < 8.0));
    }

    #[test]
    fn use_more_bits_matches_llama_quantize() {
        // n = 30 (SmolLM2): the first 3, the last 4, and every third in between from layer 5.
        let n = 30usize;
        let more: Vec<usize> = (0..n).filter(|&i| use_more_bits(i, n)).collect();
        assert_eq!(more, vec![0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29]);
    }
}
