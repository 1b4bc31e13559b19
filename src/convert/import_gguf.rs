//! `ft import-gguf`: a llama-architecture (or qwen2) GGUF → a plain Hugging Face directory
//! (config.json, model.safetensors, tokenizer.json, tokenizer_config.json with the GGUF's chat
//! template, generation_config.json), matching what transformers' GGUF loader produces.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::{json, Value as Json};

use super::ConvertError;
use crate::formats::gguf::dequant;
use crate::formats::gguf::reader::{GgufError, GgufFile, Value};
use crate::formats::model_dir::ModelDirWriter;
use crate::formats::safetensors::{encode, torch_name, OutDtype, RawTensors};

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

/// GGUF tensor name → HF name (`blk.N.attn_q.weight` → `model.layers.N.self_attn.q_proj.weight`).
pub fn hf_name(name: &str) -> Option<String> {
    match name {
        "token_embd.weight" => return Some("model.embed_tokens.weight".into()),
        "output_norm.weight" => return Some("model.norm.weight".into()),
        "output.weight" => return Some("lm_head.weight".into()),
        _ => {}
    }
    let rest = name.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, kind) = rest.rsplit_once('.')?;
    let hf = match module {
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "attn_q_norm" => "self_attn.q_norm",
        "attn_k_norm" => "self_attn.k_norm",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}.{kind}"))
}

/// Undoes llama.cpp's q/k row permutation (its converter interleaves the rotary halves):
/// rows `(head, i, a)` go back to `(head, a, i)`.
pub fn reverse_permute(w: &[f32], rows: usize, cols: usize, n_head: usize) -> Vec<f32> {
    let half = rows / n_head / 2;
    let mut out = vec![0f32; w.len()];
    for h in 0..n_head {
        for i in 0..half {
            for a in 0..2 {
                let src = h * 2 * half + i * 2 + a;
                let dst = h * 2 * half + a * half + i;
                out[dst * cols..(dst + 1) * cols].copy_from_slice(&w[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
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

/// Converts `gguf` into a Hugging Face model directory at `out`.
pub fn import(gguf: &Path, out: &Path, dtype: OutDtype) -> Result<ImportReport> {
    let g = GgufFile::open(gguf)?;
    let arch = g
        .get("general.architecture")
        .and_then(Value::as_str)
        .ok_or_else(|| key_error(&g, "general.architecture", "missing"))?
        .to_string();
    if !matches!(arch.as_str(), "llama" | "mistral" | "qwen2") {
        return Err(key_error(&g, "general.architecture", &format!("{arch:?} is not supported for import (llama, mistral, qwen2)")));
    }
    let k = |s: &str| format!("{arch}.{s}");
    let hidden = meta_u(&g, &k("embedding_length"))?;
    let n_head = meta_u(&g, &k("attention.head_count"))?;
    let n_kv = g.get(&k("attention.head_count_kv")).and_then(Value::as_u64).map(|x| x as usize).unwrap_or(n_head);
    let layers = meta_u(&g, &k("block_count"))?;
    let (tok_json, tokens) = tokenizer_json(&g)?;
    let vocab = g.get(&k("vocab_size")).and_then(Value::as_u64).map(|x| x as usize).unwrap_or(tokens.len());
    if n_head == 0 || n_kv == 0 || !n_head.is_multiple_of(n_kv) {
        return Err(key_error(&g, &k("attention.head_count"), &format!("{n_head} query heads and {n_kv} key/value heads: both must be positive, the second dividing the first")));
    }
    let head_dim = match g.get(&k("attention.key_length")).and_then(Value::as_u64) {
        Some(d) => d as usize,
        None if hidden.is_multiple_of(n_head) => hidden / n_head,
        None => return Err(key_error(&g, &k("attention.head_count"), &format!("{n_head} does not divide embedding_length = {hidden}"))),
    };
    check_header_against_tensors(&g, &k, layers, n_head * head_dim, n_kv * head_dim, hidden)?;
    let tied = g.tensor("output.weight").is_none();
    let id = |key: &str| g.get(key).and_then(Value::as_u64);
    let (bos, eos, pad, unk) = (
        id("tokenizer.ggml.bos_token_id"),
        id("tokenizer.ggml.eos_token_id"),
        id("tokenizer.ggml.padding_token_id"),
        id("tokenizer.ggml.unknown_token_id"),
    );
    let tok_str = |i: Option<u64>| i.and_then(|i| tokens.get(i as usize)).cloned();

    let mut config = json!({
        "architectures": [match arch.as_str() { "qwen2" => "Qwen2ForCausalLM", "mistral" => "MistralForCausalLM", _ => "LlamaForCausalLM" }],
        "model_type": arch,
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": meta_u(&g, &k("feed_forward_length"))?,
        "num_hidden_layers": layers,
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": meta_u(&g, &k("context_length"))?,
        "rms_norm_eps": g.get(&k("attention.layer_norm_rms_epsilon")).and_then(Value::as_f64).unwrap_or(1e-5),
        "rope_theta": g.get(&k("rope.freq_base")).and_then(Value::as_f64).unwrap_or(10000.0),
        "tie_word_embeddings": tied,
        "attention_bias": false,
        "torch_dtype": torch_name(dtype.dtype()),
    });
    for (key, v) in [("bos_token_id", bos), ("eos_token_id", eos), ("pad_token_id", pad)] {
        if let Some(v) = v {
            config[key] = json!(v);
        }
    }
    if let Some(factor) = g.get(&k("rope.scaling.factor")).and_then(Value::as_f64) {
        let kind = g.get(&k("rope.scaling.type")).and_then(Value::as_str).unwrap_or("linear");
        if kind != "none" {
            config["rope_scaling"] = json!({"rope_type": kind, "factor": factor});
        }
    }

    // Tensors, dequantized to f32 (then cast if asked), in HF names and layout.
    let mut types = BTreeMap::new();
    let mut tensors: RawTensors = Vec::new();
    let mut parameters = 0;
    for t in &g.tensors {
        let tensor_error = |msg: String| -> ConvertError { GgufError::Tensor { path: gguf.into(), name: t.name.clone(), msg }.into() };
        let name = hf_name(&t.name).ok_or_else(|| tensor_error("has no Hugging Face counterpart".into()))?;
        *types.entry(dequant::type_name(t.ggml_type)).or_insert(0) += 1;
        let shape = t.shape();
        let bytes = g.tensor_bytes(t)?;
        let mut v = dequant::dequantize(t.ggml_type, bytes, t.numel()).map_err(|e| tensor_error(e.to_string()))?;
        if arch != "qwen2" && (t.name.ends_with("attn_q.weight") || t.name.ends_with("attn_k.weight")) {
            let heads = if t.name.ends_with("attn_q.weight") { n_head } else { n_kv };
            let (rows, cols) = (shape[0], shape.get(1).copied().unwrap_or(1));
            v = reverse_permute(&v, rows, cols, heads);
        }
        parameters += v.len();
        tensors.push((name, dtype.dtype(), shape, encode(&v, dtype.dtype())));
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_to_hf() {
        assert_eq!(hf_name("blk.3.attn_q.weight").unwrap(), "model.layers.3.self_attn.q_proj.weight");
        assert_eq!(hf_name("blk.0.ffn_norm.weight").unwrap(), "model.layers.0.post_attention_layernorm.weight");
        assert_eq!(hf_name("output.weight").unwrap(), "lm_head.weight");
        assert!(hf_name("blk.0.unknown.weight").is_none());
    }

    #[test]
    fn reverse_permute_undoes_llama_cpp_permute() {
        // llama.cpp: w.reshape(n_head, 2, rows/n_head/2, cols).swapaxes(1, 2)
        let (rows, cols, n_head) = (8, 3, 2);
        let w: Vec<f32> = (0..rows * cols).map(|x| x as f32).collect();
        let half = rows / n_head / 2;
        let mut permuted = vec![0f32; w.len()];
        for h in 0..n_head {
            for a in 0..2 {
                for i in 0..half {
                    let src = h * 2 * half + a * half + i;
                    let dst = h * 2 * half + i * 2 + a;
                    permuted[dst * cols..(dst + 1) * cols].copy_from_slice(&w[src * cols..(src + 1) * cols]);
                }
            }
        }
        assert_eq!(reverse_permute(&permuted, rows, cols, n_head), w);
    }
}
