//! `ft import-gguf`: a GGUF of any family ft trains (llama, mistral, mixtral, qwen2, qwen3,
//! qwen3moe, smollm3, gemma2, gemma3, phi3) → a plain Hugging Face directory (config.json,
//! model.safetensors, tokenizer.json, tokenizer_config.json with the GGUF's chat template,
//! generation_config.json): the inverse of `ft export gguf` and of llama.cpp's converter (q/k
//! rows un-permuted, Gemma norms back to `w`, stacked experts split per expert, rotary factor
//! tensors back into the config).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::{json, Value as Json};

use super::ConvertError;
use super::gguf_arch::{hf_name, norm_offset, permutes_qk, unpermute};
use crate::formats::gguf::dequant;
use crate::formats::gguf::reader::{GgufError, GgufFile, Value};
use crate::formats::model_dir::ModelDirWriter;
use crate::formats::safetensors::{encode, torch_name, OutDtype, RawTensors};
use crate::model::config::Family;

type Result<T> = std::result::Result<T, ConvertError>;

fn key_error(g: &GgufFile, key: &str, msg: &str) -> ConvertError {
    GgufError::Key { path: g.path.clone(), key: key.into(), msg: msg.into() }.into()
}

/// What an import wrote.
#[derive(Debug, serde::Serialize)]
pub struct ImportReport {
    pub out: PathBuf,
    pub architecture: String,
    pub tensors: usize,
    pub parameters: usize,
    /// Tensor count per GGUF type.
    pub types: BTreeMap<String, usize>,
}

fn meta_u(g: &GgufFile, key: &str) -> Result<usize> {
    g.get(key)
        .and_then(Value::as_u64)
        .map(|x| x as usize)
        .ok_or_else(|| key_error(g, key, "missing or not an integer"))
}

fn tokenizer_json(g: &GgufFile) -> Result<(Json, Vec<String>)> {
    let model = g.get("tokenizer.ggml.model").and_then(Value::as_str).unwrap_or("");
    if model != "gpt2" {
        return Err(key_error(g, "tokenizer.ggml.model", &format!("{model:?}; ft converts GPT2-style byte-level BPE tokenizers (\"gpt2\")")));
    }
    let strings = |key: &str| -> Result<Vec<String>> {
        g.get(key)
            .and_then(Value::as_array)
            .ok_or_else(|| key_error(g, key, "missing"))?
            .iter()
            .map(|v| v.as_str().map(String::from).ok_or_else(|| key_error(g, key, "holds a non-string")))
            .collect()
    };
    let tokens = strings("tokenizer.ggml.tokens")?;
    let merges = strings("tokenizer.ggml.merges")?;
    let types: Vec<u64> = g
        .get("tokenizer.ggml.token_type")
        .and_then(Value::as_array)
        .map(|a| a.iter().map(|v| v.as_u64().unwrap_or(1)).collect())
        .unwrap_or_default();
    if !types.is_empty() && types.len() != tokens.len() {
        let msg = format!("has {} entries for {} tokens (tokenizer.ggml.tokens); they must match one to one", types.len(), tokens.len());
        return Err(key_error(g, "tokenizer.ggml.token_type", &msg));
    }
    let vocab: serde_json::Map<String, Json> = tokens.iter().enumerate().map(|(i, t)| (t.clone(), json!(i))).collect();
    // Control tokens (type 3) are special; user-defined ones (type 4) are plain added tokens.
    let added: Vec<Json> = types
        .iter()
        .enumerate()
        .filter(|(_, &t)| t == 3 || t == 4)
        .map(|(i, &t)| {
            json!({"id": i, "content": tokens[i], "single_word": false, "lstrip": false, "rstrip": false,
                   "normalized": t != 3, "special": t == 3})
        })
        .collect();
    let tj = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": true},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": true},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab, "merges": merges,
        }
    });
    Ok((tj, tokens))
}

/// The header's sizes against the tensors, before anything is converted: the block count is the
/// number of `blk.N` layers, and each layer's q/k projections have the rows the head counts say.
fn check_header_against_tensors(g: &GgufFile, k: &dyn Fn(&str) -> String, layers: usize, q_rows: usize, kv_rows: usize, hidden: usize) -> Result<()> {
    let blocks = g
        .tensors
        .iter()
        .filter_map(|t| t.name.strip_prefix("blk.")?.split_once('.')?.0.parse::<usize>().ok())
        .max()
        .map_or(0, |m| m + 1);
    if blocks != layers {
        return Err(key_error(g, &k("block_count"), &format!("says {layers} but the file has tensors for {blocks} blocks")));
    }
    for (suffix, rows, key) in [("attn_q.weight", q_rows, "attention.head_count"), ("attn_k.weight", kv_rows, "attention.head_count_kv")] {
        for t in g.tensors.iter().filter(|t| t.name.starts_with("blk.") && t.name.ends_with(suffix)) {
            if t.shape() != [rows, hidden] {
                let msg = format!("implies [{rows}, {hidden}] for {} but the tensor is {:?}", t.name, t.shape());
                return Err(key_error(g, &k(key), &msg));
            }
        }
    }
    Ok(())
}

/// The model family a GGUF architecture (and its metadata) describes.
fn family_of(g: &GgufFile, arch: &str) -> Result<Family> {
    let has = |key: &str| g.get(&format!("{arch}.{key}")).is_some();
    Ok(match arch {
        "llama" | "mistral" if has("expert_count") && meta_u(g, &format!("{arch}.expert_count"))? > 0 => Family::Mixtral,
        "llama" | "mistral" if has("attention.sliding_window") => Family::Mistral,
        "llama" => Family::Llama,
        "mistral" => Family::Mistral,
        "qwen2" => Family::Qwen2,
        "qwen3" => Family::Qwen3,
        "qwen3moe" => Family::Qwen3Moe,
        "smollm3" => Family::SmolLM3,
        "gemma2" => Family::Gemma2,
        "gemma3" => Family::Gemma3,
        "phi3" => Family::Phi3,
        _ => {
            let msg = format!("{arch:?} is not supported for import (llama, mistral, qwen2, qwen3, qwen3moe, smollm3, gemma2, gemma3, phi3)");
            return Err(key_error(g, "general.architecture", &msg));
        }
    })
}

/// A GGUF tensor's values as f32.
fn tensor_f32(g: &GgufFile, name: &str) -> Result<Option<Vec<f32>>> {
    let Some(t) = g.tensor(name) else { return Ok(None) };
    let bytes = g.tensor_bytes(t)?;
    dequant::dequantize(t.ggml_type, bytes, t.numel())
        .map(Some)
        .map_err(|e| GgufError::Tensor { path: g.path.clone(), name: name.into(), msg: e.to_string() }.into())
}

/// Converts `gguf` into a Hugging Face model directory at `out`.
pub fn import(gguf: &Path, out: &Path, dtype: OutDtype) -> Result<ImportReport> {
    import_with_lora(gguf, None, out, dtype)
}

/// A GGUF LoRA adapter (llama.cpp's format) to bake into an imported model.
struct GgufLora {
    file: GgufFile,
    alpha: Option<f64>,
}

impl GgufLora {
    fn open(path: &Path, arch: &str) -> Result<Self> {
        let file = GgufFile::open(path)?;
        let kind = file.get("adapter.type").and_then(Value::as_str);
        if file.get("general.type").and_then(Value::as_str) != Some("adapter") || kind != Some("lora") {
            return Err(key_error(&file, "adapter.type", "not a LoRA adapter (general.type = adapter, adapter.type = lora)"));
        }
        if file.get("general.architecture").and_then(Value::as_str) != Some(arch) {
            return Err(key_error(&file, "general.architecture", &format!("the adapter is for another architecture than the base ({arch})")));
        }
        let alpha = file.get("adapter.lora.alpha").and_then(Value::as_f64).filter(|a| *a != 0.0);
        Ok(GgufLora { file, alpha })
    }

    /// Adds this adapter's `alpha/r · B A` for GGUF tensor `name` (`w` in GGUF layout) as
    /// llama.cpp applies it; returns whether the tensor had one.
    fn apply(&self, name: &str, shape: &[usize], w: &mut [f32]) -> Result<bool> {
        let (Some(a), Some(b)) = (tensor_f32(&self.file, &format!("{name}.lora_a"))?, tensor_f32(&self.file, &format!("{name}.lora_b"))?) else {
            return Ok(false);
        };
        let bt = self.file.tensor(&format!("{name}.lora_b")).expect("read above");
        let (out_dim, r) = (bt.shape()[0], bt.shape()[1]);
        let scale = self.alpha.map_or(1.0, |al| al / r as f64) as f32;
        let bad = |msg: String| GgufError::Tensor { path: self.file.path.clone(), name: format!("{name}.lora_b"), msg };
        if name == "token_embd.weight" {
            // llama.cpp's embedding LoRA: lora_a is [vocab, r] (A transposed), lora_b [dim, r].
            let (vocab, dim) = (shape[0], shape[1]);
            if a.len() != vocab * r || out_dim != dim {
                return Err(bad(format!("shapes do not fit token_embd {shape:?}")).into());
            }
            for t in 0..vocab {
                for d in 0..dim {
                    w[t * dim + d] += scale * (0..r).map(|k| a[t * r + k] * b[d * r + k]).sum::<f32>();
                }
            }
            return Ok(true);
        }
        let (rows, cols) = (shape[0], shape.get(1).copied().unwrap_or(1));
        if out_dim != rows || a.len() != r * cols {
            return Err(bad(format!("lora_b {:?} / lora_a of {} values do not fit {name} {shape:?}", bt.shape(), a.len())).into());
        }
        for i in 0..rows {
            for j in 0..cols {
                w[i * cols + j] += scale * (0..r).map(|k| b[i * r + k] * a[k * cols + j]).sum::<f32>();
            }
        }
        Ok(true)
    }
}

/// [`import`], with a GGUF LoRA adapter (`ft export gguf-lora`, llama.cpp's
/// `convert_lora_to_gguf.py`) merged into the weights as llama.cpp applies it.
pub fn import_with_lora(gguf: &Path, lora: Option<&Path>, out: &Path, dtype: OutDtype) -> Result<ImportReport> {
    let g = GgufFile::open(gguf)?;
    let arch = g
        .get("general.architecture")
        .and_then(Value::as_str)
        .ok_or_else(|| key_error(&g, "general.architecture", "missing"))?
        .to_string();
    let family = family_of(&g, &arch)?;
    let lora = lora.map(|p| GgufLora::open(p, &arch)).transpose()?;
    let mut lora_applied = 0;
    let k = |s: &str| format!("{arch}.{s}");
    let get_f = |key: &str| g.get(&k(key)).and_then(Value::as_f64);
    let get_u = |key: &str| g.get(&k(key)).and_then(Value::as_u64).map(|x| x as usize);
    let hidden = meta_u(&g, &k("embedding_length"))?;
    let n_head = meta_u(&g, &k("attention.head_count"))?;
    let n_kv = get_u("attention.head_count_kv").unwrap_or(n_head);
    let layers = meta_u(&g, &k("block_count"))?;
    let (tok_json, tokens) = tokenizer_json(&g)?;
    let vocab = match g.tensor("token_embd.weight") {
        Some(t) => t.shape()[0],
        None => get_u("vocab_size").unwrap_or(tokens.len()),
    };
    if n_head == 0 || n_kv == 0 || !n_head.is_multiple_of(n_kv) {
        return Err(key_error(&g, &k("attention.head_count"), &format!("{n_head} query heads and {n_kv} key/value heads: both must be positive, the second dividing the first")));
    }
    let head_dim = match get_u("attention.key_length") {
        Some(d) => d,
        None if hidden.is_multiple_of(n_head) => hidden / n_head,
        None => return Err(key_error(&g, &k("attention.head_count"), &format!("{n_head} does not divide embedding_length = {hidden}"))),
    };
    let (q_rows, kv_rows) = (n_head * head_dim, n_kv * head_dim);
    if family != Family::Phi3 {
        check_header_against_tensors(&g, &k, layers, q_rows, kv_rows, hidden)?;
    }
    let tied = g.tensor("output.weight").is_none();
    let id = |key: &str| g.get(key).and_then(Value::as_u64);
    let (bos, eos, pad, unk) = (
        id("tokenizer.ggml.bos_token_id"),
        id("tokenizer.ggml.eos_token_id"),
        id("tokenizer.ggml.padding_token_id"),
        id("tokenizer.ggml.unknown_token_id"),
    );
    let tok_str = |i: Option<u64>| i.and_then(|i| tokens.get(i as usize)).cloned();
    let rope_theta = get_f("rope.freq_base").unwrap_or(10000.0);
    let max_pos = meta_u(&g, &k("context_length"))?;
    let window = get_u("attention.sliding_window").filter(|&w| w > 0);

    let class = match family {
        Family::Llama => "LlamaForCausalLM",
        Family::Mistral => "MistralForCausalLM",
        Family::Mixtral => "MixtralForCausalLM",
        Family::Qwen2 => "Qwen2ForCausalLM",
        Family::Qwen3 => "Qwen3ForCausalLM",
        Family::Qwen3Moe => "Qwen3MoeForCausalLM",
        Family::SmolLM3 => "SmolLM3ForCausalLM",
        Family::Gemma2 => "Gemma2ForCausalLM",
        Family::Gemma3 => "Gemma3ForCausalLM",
        Family::Phi3 => "Phi3ForCausalLM",
    };
    let mut config = json!({
        "architectures": [class],
        "model_type": family.as_str(),
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": meta_u(&g, &k("feed_forward_length"))?,
        "num_hidden_layers": layers,
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv,
        "head_dim": head_dim,
        "max_position_embeddings": max_pos,
        "rms_norm_eps": get_f("attention.layer_norm_rms_epsilon").unwrap_or(1e-5),
        "rope_theta": rope_theta,
        "tie_word_embeddings": tied,
        "attention_bias": g.tensor("blk.0.attn_q.bias").is_some() && family != Family::Qwen2,
        "torch_dtype": torch_name(dtype.dtype()),
    });
    if family.is_gemma() {
        config["hidden_activation"] = json!("gelu_pytorch_tanh");
        // llama.cpp's Gemma attention scale (the export folds any other scale into q).
        let is_27b = matches!((family, layers), (Family::Gemma2, 46) | (Family::Gemma3, 62));
        config["query_pre_attn_scalar"] = json!(if is_27b { hidden / n_head } else { head_dim });
    } else {
        config["hidden_act"] = json!("silu");
    }
    for (key, v) in [("bos_token_id", bos), ("eos_token_id", eos), ("pad_token_id", pad)] {
        if let Some(v) = v {
            config[key] = json!(v);
        }
    }
    // Rotary scaling: linear/yarn keys, or per-frequency factors (llama.cpp's rope_freqs for
    // Llama 3, Phi-3's long/short factors), which transformers expresses as longrope.
    let scaling = g.get(&k("rope.scaling.type")).and_then(Value::as_str).unwrap_or("none");
    let factor = get_f("rope.scaling.factor");
    let orig_ctx = get_u("rope.scaling.original_context_length");
    let rope_scaling = match (scaling, factor) {
        ("linear", Some(f)) => Some(json!({"rope_type": "linear", "factor": f})),
        ("yarn", Some(f)) => {
            let mut y = json!({"rope_type": "yarn", "factor": f, "original_max_position_embeddings": orig_ctx.unwrap_or(max_pos)});
            for (gk, hk) in [("rope.scaling.yarn_beta_fast", "beta_fast"), ("rope.scaling.yarn_beta_slow", "beta_slow"), ("rope.scaling.yarn_attn_factor", "attention_factor")] {
                if let Some(v) = get_f(gk) {
                    y[hk] = json!(v);
                }
            }
            Some(y)
        }
        _ => None,
    };
    let rope_scaling = match (tensor_f32(&g, "rope_factors_long.weight")?, tensor_f32(&g, "rope_factors_short.weight")?, tensor_f32(&g, "rope_freqs.weight")?) {
        (Some(long), Some(short), _) => Some(json!({
            "rope_type": "longrope", "short_factor": short, "long_factor": long,
            "original_max_position_embeddings": orig_ctx.unwrap_or(max_pos),
            "attention_factor": get_f("rope.scaling.attn_factor").unwrap_or(1.0),
        })),
        (_, _, Some(f)) => Some(json!({
            "rope_type": "longrope", "short_factor": f, "long_factor": f,
            "original_max_position_embeddings": max_pos, "attention_factor": 1.0,
        })),
        _ => rope_scaling,
    };
    if let Some(r) = &rope_scaling {
        if family != Family::Gemma3 {
            config["rope_scaling"] = r.clone();
        }
    }
    let layer_types = |period: usize| -> Vec<&'static str> {
        let pattern: Option<Vec<bool>> = g
            .get(&k("attention.sliding_window_pattern"))
            .and_then(Value::as_array)
            .and_then(|a| a.iter().map(|v| match v { Value::Bool(b) => Some(*b), _ => None }).collect());
        (0..layers)
            .map(|il| pattern.as_ref().map_or(il % period < period - 1, |p| p.get(il).copied().unwrap_or(false)))
            .map(|swa| if swa { "sliding_attention" } else { "full_attention" })
            .collect()
    };
    match family {
        Family::Mistral | Family::Qwen2 => {
            if let Some(w) = window {
                config["sliding_window"] = json!(w);
                if family == Family::Qwen2 {
                    config["use_sliding_window"] = json!(true);
                    config["max_window_layers"] = json!(layers);
                }
            }
        }
        Family::Mixtral | Family::Qwen3Moe => {
            let experts = meta_u(&g, &k("expert_count"))?;
            let used = meta_u(&g, &k("expert_used_count"))?;
            config["num_experts_per_tok"] = json!(used);
            if family == Family::Mixtral {
                config["num_local_experts"] = json!(experts);
                config["router_jitter_noise"] = json!(0.0);
            } else {
                config["num_experts"] = json!(experts);
                config["moe_intermediate_size"] = json!(meta_u(&g, &k("expert_feed_forward_length"))?);
                config["norm_topk_prob"] = json!(true);
                config["decoder_sparse_step"] = json!(1);
                config["mlp_only_layers"] = json!([]);
            }
        }
        Family::SmolLM3 => {
            // llama.cpp: no RoPE in every 4th layer.
            config["no_rope_layer_interval"] = json!(4);
            config["no_rope_layers"] = json!((0..layers).map(|il| u8::from((il + 1) % 4 != 0)).collect::<Vec<_>>());
        }
        Family::Gemma2 => {
            config["attn_logit_softcapping"] = json!(get_f("attn_logit_softcapping").filter(|&c| c > 0.0));
            config["final_logit_softcapping"] = json!(get_f("final_logit_softcapping").filter(|&c| c > 0.0));
            config["sliding_window"] = json!(window.unwrap_or(4096));
            config["layer_types"] = json!(layer_types(2));
        }
        Family::Gemma3 => {
            config["final_logit_softcapping"] = json!(get_f("final_logit_softcapping").filter(|&c| c > 0.0));
            let mut full = rope_scaling.clone().unwrap_or_else(|| json!({"rope_type": "default"}));
            full["rope_theta"] = json!(rope_theta);
            config["rope_parameters"] = json!({
                "full_attention": full,
                "sliding_attention": {"rope_type": "default", "rope_theta": get_f("rope.freq_base_swa").unwrap_or(10000.0)},
            });
            config.as_object_mut().expect("an object").remove("rope_theta");
            match window {
                Some(w) => {
                    config["sliding_window"] = json!(w);
                    config["layer_types"] = json!(layer_types(6));
                }
                None => config["layer_types"] = json!(vec!["full_attention"; layers]),
            }
        }
        Family::Phi3 => {
            let rot = get_u("rope.dimension_count").unwrap_or(head_dim);
            config["partial_rotary_factor"] = json!(rot as f64 / head_dim as f64);
            config["original_max_position_embeddings"] = json!(orig_ctx.unwrap_or(max_pos));
            config["sliding_window"] = json!(window);
        }
        Family::Llama | Family::Qwen3 => {}
    }

    // Tensors, dequantized to f32 (then cast if asked), in HF names and layout.
    let mut types = BTreeMap::new();
    let mut tensors: RawTensors = Vec::new();
    let mut parameters = 0;
    let mut push = |name: String, shape: Vec<usize>, v: &[f32]| {
        parameters += v.len();
        tensors.push((name, dtype.dtype(), shape, encode(v, dtype.dtype())));
    };
    for t in &g.tensors {
        let tensor_error = |msg: String| -> ConvertError { GgufError::Tensor { path: gguf.into(), name: t.name.clone(), msg }.into() };
        *types.entry(dequant::type_name(t.ggml_type)).or_insert(0) += 1;
        if matches!(t.name.as_str(), "rope_freqs.weight" | "rope_factors_long.weight" | "rope_factors_short.weight") {
            continue; // read into the config above
        }
        let shape = t.shape();
        let bytes = g.tensor_bytes(t)?;
        let mut v = dequant::dequantize(t.ggml_type, bytes, t.numel()).map_err(|e| tensor_error(e.to_string()))?;
        if let Some(l) = &lora {
            lora_applied += usize::from(l.apply(&t.name, &shape, &mut v)?);
        }
        // Stacked experts → one matrix per expert, under the family's module names.
        if let Some((layer, which)) = t.name.strip_prefix("blk.").and_then(|r| r.split_once('.')).and_then(|(l, rest)| Some((l.parse::<usize>().ok()?, rest.strip_suffix("_exps.weight")?))) {
            if shape.len() != 3 {
                return Err(tensor_error(format!("expected [experts, rows, cols], got {shape:?}")));
            }
            let names = match (family, which) {
                (Family::Mixtral, "ffn_gate") => ("block_sparse_moe", "w1"),
                (Family::Mixtral, "ffn_up") => ("block_sparse_moe", "w3"),
                (Family::Mixtral, "ffn_down") => ("block_sparse_moe", "w2"),
                (_, "ffn_gate") => ("mlp", "gate_proj"),
                (_, "ffn_up") => ("mlp", "up_proj"),
                (_, "ffn_down") => ("mlp", "down_proj"),
                _ => return Err(tensor_error("has no Hugging Face counterpart".into())),
            };
            let per = shape[1] * shape[2];
            for e in 0..shape[0] {
                push(format!("model.layers.{layer}.{}.experts.{e}.{}.weight", names.0, names.1), vec![shape[1], shape[2]], &v[e * per..(e + 1) * per]);
            }
            continue;
        }
        let name = hf_name(&arch, family, &t.name).ok_or_else(|| tensor_error("has no Hugging Face counterpart".into()))?;
        if permutes_qk(&arch) && (t.name.contains(".attn_q.") || t.name.contains(".attn_k.")) {
            let heads = if t.name.contains(".attn_q.") { n_head } else { n_kv };
            let (rows, cols) = (shape[0], shape.get(1).copied().unwrap_or(1));
            v = unpermute(&v, rows, cols, heads);
        }
        if norm_offset(&arch) && t.name.ends_with("norm.weight") {
            v.iter_mut().for_each(|x| *x -= 1.0);
        }
        push(name, shape, &v);
    }
    if let Some(l) = &lora {
        let pairs = l.file.tensors.iter().filter(|t| t.name.ends_with(".lora_a")).count();
        if lora_applied != pairs {
            let msg = format!("{pairs} LoRA pairs, {lora_applied} of them on tensors of the base (wrong base model?)");
            return Err(GgufError::Format { path: l.file.path.clone(), msg }.into());
        }
    }
    let mut writer = ModelDirWriter::new(out)?;
    writer.write_shard("model.safetensors", &tensors, None)?;
    let chat_template = g.get("tokenizer.chat_template").and_then(Value::as_str);
    let mut tok_cfg = json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": false,
        "add_eos_token": false,
        "clean_up_tokenization_spaces": false,
        "model_max_length": config["max_position_embeddings"],
    });
    for (key, v) in [("bos_token", bos), ("eos_token", eos), ("pad_token", pad), ("unk_token", unk)] {
        if let Some(s) = tok_str(v) {
            tok_cfg[key] = json!(s);
        }
    }
    if let Some(t) = chat_template {
        tok_cfg["chat_template"] = json!(t);
    }
    let mut gen_cfg = json!({"_from_model_config": true});
    if let Some(b) = bos {
        gen_cfg["bos_token_id"] = json!(b);
    }
    if let Some(e) = eos {
        gen_cfg["eos_token_id"] = json!(e);
    }
    writer.write_json("config.json", &config)?;
    writer.write_file("tokenizer.json", &serde_json::to_vec(&tok_json).expect("JSON values serialize"))?;
    writer.write_json("tokenizer_config.json", &tok_cfg)?;
    writer.write_json("generation_config.json", &gen_cfg)?;
    // The directory must load before it appears: every name and shape as the config says.
    crate::model::load::<crate::backend::Cpu>(writer.staged(), &Default::default(), Default::default())
        .map_err(|e| ConvertError::invalid(gguf, format!("the converted model does not load (the GGUF header does not describe its tensors): {e}")))?;
    let out = writer.commit()?;
    Ok(ImportReport { out, architecture: arch, tensors: tensors.len(), parameters, types })
}
