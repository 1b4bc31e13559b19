//! `ft merge`: bake a LoRA adapter into the base weights, `W + s · B A` in f32, shard by shard
//! (peak memory is about one shard plus the adapter). The output is a plain checkpoint with the
//! base's index, config, tokenizer and generation config.
//!
//! QLoRA adapters merge into what training saw: the NF4-dequantized weights (of a bitsandbytes
//! 4-bit base, or of a dense base the run quantized on load), written bf16 unless `--dtype` says
//! otherwise; the result is never re-quantized. `--base DIR` merges into a full-precision base
//! instead.

use std::path::{Path, PathBuf};

use rayon::prelude::*;
use safetensors::tensor::Dtype;

use super::ConvertError;
use crate::adapters::peft::PeftAdapter;
use crate::formats::bnb;
use crate::formats::model_dir::ModelDirWriter;
use crate::formats::peft::AdapterFiles;
use crate::formats::safetensors::{encode, to_f32, torch_name, OutDtype, RawTensors, TensorFiles, WeightsError};
pub use crate::model::projection::add_lora_delta;
use crate::model::projection::{quantizable, row_norms};
use crate::model::ModelConfig;
use crate::quant::nf4::{Nf4, BLOCKSIZE};

/// What a merge wrote.
#[derive(Debug, serde::Serialize)]
pub struct MergeReport {
    pub out: PathBuf,
    pub merged_modules: usize,
    pub shards: usize,
}

/// Where a merge reads its base weights from.
#[derive(Debug, Clone, Copy)]
pub enum MergeBase<'a> {
    /// The model the adapter was trained on, as training saw it: NF4-dequantized for a QLoRA
    /// adapter (or a bitsandbytes 4-bit base), else as stored.
    AsTrained(&'a Path),
    /// A full-precision base (for a QLoRA adapter: instead of the NF4 values training saw).
    FullPrecision(&'a Path),
}

/// Merges the PEFT adapter in `adapter` into the base, writing `out` in `dtype` (default: the
/// base's dtype; bf16 for NF4-derived weights).
pub fn merge(base: MergeBase, adapter: &Path, out: &Path, dtype: Option<OutDtype>) -> Result<MergeReport, ConvertError> {
    let full_precision = matches!(base, MergeBase::FullPrecision(_));
    let (base, nf4) = match base {
        MergeBase::FullPrecision(dense) => (dense, false),
        MergeBase::AsTrained(b) => (b, AdapterFiles::quantized_base(adapter)),
    };
    // Refuse what ft cannot load (unknown architecture, bad config) before writing anything.
    let config = ModelConfig::from_dir(base)?;
    let ad = PeftAdapter::open(adapter)?;
    let ck = TensorFiles::open(base)?;
    // A sequence-classification adapter's trained head (`modules_to_save`), `[labels, hidden]`;
    // on a causal base the output becomes a `*ForSequenceClassification` checkpoint.
    let head = ad.files.saved_module_shape("score").filter(|_| ad.config.saves("score"));
    let to_classifier = head.is_some() && !ck.contains("score.weight");
    if let Some(shape) = &head {
        if shape.len() != 2 || shape[1] != config.hidden_size {
            return Err(ConvertError::invalid(adapter, format!("its score head is {shape:?}, not [labels, {}]", config.hidden_size)));
        }
    }
    let modules: Vec<String> = ck.names().filter_map(|n| n.strip_suffix(".weight")).map(String::from).collect();
    ad.check_targets(modules.iter().map(String::as_str))?;
    let quantized_base = ck.names().any(|n| n.ends_with(bnb::STATE_SUFFIX));
    if quantized_base && full_precision {
        return Err(ConvertError::invalid(base, "--base: a 4-bit checkpoint is not a full-precision base"));
    }
    // Merging into NF4 values writes bf16 by default (the weights have no more precision).
    let dtype = dtype.or((nf4 || quantized_base).then_some(OutDtype::Bf16));
    let mut writer = ModelDirWriter::new(out)?;
    let mut merged = 0;
    let n_files = ck.files().len();
    for (i, file) in ck.files().into_iter().enumerate() {
        let mut tensors: RawTensors = Vec::new();
        for name in ck.shard_names(i) {
            if to_classifier && name == "lm_head.weight" {
                ck.skip(&name); // a classifier has no LM head
                continue;
            }
            if quantized_base && bnb::is_statistic(&name) {
                ck.skip(&name); // bitsandbytes statistics: folded into the dequantized weight
                continue;
            }
            let (bytes, src_dtype, shape, path) = ck.raw(&name)?;
            let not_float = || WeightsError::UnsupportedDtype { name: name.clone(), path: path.into(), dtype: src_dtype };
            // The weight training saw, in f32: NF4-dequantized for QLoRA, else as stored.
            let dequantized: Option<(Vec<f32>, Vec<usize>)> = if bnb::is_quantized(&ck, &name) {
                let shape = bnb::stored_shape(&ck, &name)?;
                Some((bnb::read(&ck, &name, &shape)?.dequantize(), shape))
            } else if nf4 && quantizable(&name, &shape) {
                let w = to_f32(bytes, src_dtype).ok_or_else(not_float)?;
                Some((Nf4::quantize(&w, BLOCKSIZE, true).dequantize(), shape.clone()))
            } else {
                None
            };
            let (bytes, src_dtype, shape): (std::borrow::Cow<[u8]>, Dtype, Vec<usize>) = match &dequantized {
                Some((w, s)) => (bytemuck::cast_slice(w).to_vec().into(), Dtype::F32, s.clone()),
                None => (bytes.into(), src_dtype, shape),
            };
            let bytes: &[u8] = &bytes;
            let out_dtype = match (dtype, src_dtype) {
                (Some(d), Dtype::F32 | Dtype::BF16 | Dtype::F16) => d.dtype(),
                _ => src_dtype,
            };
            let module = name.strip_suffix(".weight");
            if module.is_some_and(crate::formats::peft::is_embedding) {
                // PEFT's copy of the base embedding beside an embedding LoRA.
                ad.files.tensors.skip(&crate::formats::peft::saved_embedding_name(module.expect("checked")));
            }
            let lora = match (module, shape.as_slice()) {
                // An embedding `[vocab, hidden]` is `[in, out]`: E' = E + s·(B A)ᵀ.
                (Some(m), [vocab, hidden]) if crate::formats::peft::is_embedding(m) => {
                    if config.tie_word_embeddings && ad.matrices(m, *vocab, *hidden)?.is_some() {
                        return Err(ConvertError::invalid(adapter, "an embedding LoRA on a model with tied embeddings: merging it would change the output head too, which the adapter does not"));
                    }
                    ad.matrices(m, *vocab, *hidden)?.map(|(a, b)| {
                        let r = ad.config.rank_for(m);
                        (crate::model::projection::transpose(&b, *hidden, r), crate::model::projection::transpose(&a, r, *vocab))
                    })
                }
                (Some(m), [d_out, d_in]) => ad.matrices(m, *d_in, *d_out)?,
                _ => None,
            };
            // A module trained in full (`modules_to_save`: a reward model's score, an lm_head)
            // replaces the base's.
            let saved = match (module, shape.as_slice()) {
                (Some(m), [d_out, d_in]) if ad.config.saves(m) => ad.files.saved_module(m, *d_in, *d_out)?,
                _ => None,
            };
            // transformers 5's fused expert stacks `[E, out, in]` (no `.weight`): each expert
            // slice gets its expert's LoRA.
            if let (Some(stack), Some(param), [e, d_out, d_in]) = (name.rsplit_once('.').map(|x| x.0).filter(|s| s.ends_with(".mlp.experts")), name.rsplit('.').next().filter(|p| matches!(*p, "gate_up_proj" | "down_proj")), shape.as_slice()) {
                if let Some(all) = ad.stack(stack, param, *d_in, *d_out)? {
                    let mut w = to_f32(bytes, src_dtype).ok_or_else(not_float)?;
                    let internal = format!("{stack}.0.{param}");
                    for (x, (a, b)) in all.iter().enumerate().take(*e) {
                        let slice = &mut w[x * d_out * d_in..(x + 1) * d_out * d_in];
                        add_lora_delta(slice, a, b, ad.config.rank_for(&internal), *d_in, ad.config.scale_for(&internal) as f32);
                    }
                    merged += 1;
                    tensors.push((name, out_dtype, shape, encode(&w, out_dtype)));
                    continue;
                }
            }
            let data = if let Some(w) = saved {
                merged += 1;
                encode(&w, out_dtype)
            } else if let Some((a, b)) = lora {
                let mut w = to_f32(bytes, src_dtype).ok_or_else(not_float)?;
                let m = module.expect("a weight");
                add_lora_delta(&mut w, &a, &b, ad.config.rank_for(m), shape[1], ad.config.scale_for(m) as f32);
                // DoRA: W' = diag(m / ‖W + s·B A‖) (W + s·B A).
                if let Some(m) = ad.files.magnitude(module.expect("a weight"), shape[0])? {
                    let n = row_norms(&w, shape[1]);
                    w.par_chunks_mut(shape[1]).zip(m.par_iter().zip(n)).for_each(|(row, (&m, n))| {
                        let f = m / n;
                        row.iter_mut().for_each(|x| *x *= f);
                    });
                }
                if let Some(i) = w.iter().position(|x| !x.is_finite()) {
                    let msg = format!("merging into {name} gives a non-finite weight ({} at index {i}); the adapter or the base holds NaN or infinity", w[i]);
                    return Err(ConvertError::invalid(adapter, msg));
                }
                merged += 1;
                encode(&w, out_dtype)
            } else if out_dtype == src_dtype {
                bytes.to_vec()
            } else {
                encode(&to_f32(bytes, src_dtype).expect("float dtype"), out_dtype)
            };
            tensors.push((name, out_dtype, shape, data));
        }
        if let (true, Some(shape), true) = (to_classifier, &head, i + 1 == n_files) {
            let (labels, hidden) = (shape[0], shape[1]);
            let w = ad.files.saved_module("score", hidden, labels)?.expect("shape read above");
            let embed_dtype = ck.info("model.embed_tokens.weight").map(|(_, d)| d).unwrap_or(Dtype::F32);
            let out_dtype = dtype.map(|d| d.dtype()).unwrap_or(embed_dtype);
            tensors.push(("score.weight".into(), out_dtype, vec![labels, hidden], encode(&w, out_dtype)));
            merged += 1;
        }
        writer.write_shard(&file.file_name().expect("file").to_string_lossy(), &tensors, ck.shard_metadata(i))?;
    }
    if ad.config.ensure_weight_tying && config.tie_word_embeddings {
        // The tied head's copy (PEFT's ensure_weight_tying) is the embeddings' copy, merged above.
        ad.files.tensors.skip(&crate::formats::peft::saved_module_name("lm_head"));
    }
    ad.files.tensors.check_all_used().map_err(|e| {
        ConvertError::invalid(adapter, format!("the adapter does not fit the model in {}: {e}", base.display()))
    })?;
    if merged == 0 {
        return Err(ConvertError::invalid(adapter, format!("no adapter tensor matched a weight of {}", base.display())));
    }
    // Everything else the base directory holds: config, tokenizer, generation config, index.
    let pad = ad.config.saves("score").then(|| classifier_pad_id(base, &config)).flatten();
    writer.copy_sidecars(base, |config| {
        if let (true, Some(o), Some(shape)) = (to_classifier, config.as_object_mut(), &head) {
            as_classifier_config(o, shape[0], pad);
        }
        if dtype.is_none() && !quantized_base && !to_classifier {
            return false;
        }
        if let Some(o) = config.as_object_mut() {
            o.remove("quantization_config");
        }
        if let Some(d) = dtype {
            for key in ["torch_dtype", "dtype"] {
                if config.get(key).is_some() {
                    config[key] = torch_name(d.dtype()).into();
                }
            }
        }
        true
    })?;
    let shards = ck.files().len();
    let out = writer.commit()?;
    Ok(MergeReport { out, merged_modules: merged, shards })
}

/// The pad id a classifier made from `base` reads scores before: the config's, else the
/// tokenizer's `pad_token`, else the first eos id (as TRL's RewardTrainer sets it).
fn classifier_pad_id(base: &Path, config: &ModelConfig) -> Option<u32> {
    config.pad_token_id.or_else(|| crate::data::tokenizer::TextTokenizer::from_dir(base).ok()?.pad_token_id())
    .or_else(|| config.eos_token_ids.first().copied())
}

/// A causal LM's `config.json` rewritten as transformers saves a `*ForSequenceClassification`
/// with `labels` labels: the architecture, `id2label`/`label2id` (`LABEL_i`) and `pad_token_id`.
fn as_classifier_config(o: &mut serde_json::Map<String, serde_json::Value>, labels: usize, pad: Option<u32>) {
    if let Some(archs) = o.get_mut("architectures").and_then(|a| a.as_array_mut()) {
        for a in archs.iter_mut() {
            if let Some(name) = a.as_str() {
                *a = name.replace("ForCausalLM", "ForSequenceClassification").into();
            }
        }
    }
    let id2label: serde_json::Map<String, serde_json::Value> = (0..labels).map(|i| (i.to_string(), format!("LABEL_{i}").into())).collect();
    let label2id: serde_json::Map<String, serde_json::Value> = (0..labels).map(|i| (format!("LABEL_{i}"), i.into())).collect();
    o.insert("id2label".into(), id2label.into());
    o.insert("label2id".into(), label2id.into());
    if o.get("pad_token_id").is_none_or(|p| p.is_null()) {
        if let Some(p) = pad {
            o.insert("pad_token_id".into(), p.into());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delta_is_scaled_b_times_a() {
        // w = 0, a = [[1, 2, 3]], b = [[1], [2]], scale 0.5 → w = 0.5 · [[1,2,3],[2,4,6]]
        let mut w = vec![0f32; 6];
        add_lora_delta(&mut w, &[1.0, 2.0, 3.0], &[1.0, 2.0], 1, 3, 0.5);
        assert_eq!(w, vec![0.5, 1.0, 1.5, 1.0, 2.0, 3.0]);
    }
}
