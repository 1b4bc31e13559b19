//! `ft merge`: bake a LoRA adapter into the base weights, `W + s · B A` in f32, shard by shard
//! (peak memory is about one shard plus the adapter). The output is a plain checkpoint with the
//! base's index, config, tokenizer and generation config.
//!
//! QLoRA adapters merge into what training saw: the NF4-dequantized weights (of a bitsandbytes
//! 4-bit base, or of a dense base the run quantized on load), written bf16 unless `--dtype` says
//! otherwise; the result is never re-quantized. `--base DIR` merges into a full-precision base
//! instead.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use rayon::prelude::*;
use safetensors::tensor::Dtype;

use super::peft::PeftAdapter;
use crate::fsutil::{write_atomic, StagedDir};
use crate::model::weights::{to_f32, write_safetensors, Checkpoint, RawTensors};
use crate::model::ModelConfig;
use crate::quant as quantize;

/// Output dtype of `ft merge` (default: each tensor keeps the base's dtype).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum MergeDtype {
    F32,
    Bf16,
    F16,
}

impl MergeDtype {
    fn dtype(self) -> Dtype {
        match self {
            MergeDtype::F32 => Dtype::F32,
            MergeDtype::Bf16 => Dtype::BF16,
            MergeDtype::F16 => Dtype::F16,
        }
    }
    fn torch_name(self) -> &'static str {
        match self {
            MergeDtype::F32 => "float32",
            MergeDtype::Bf16 => "bfloat16",
            MergeDtype::F16 => "float16",
        }
    }
}

/// What a merge wrote.
#[derive(Debug, serde::Serialize)]
pub struct MergeReport {
    pub out: PathBuf,
    pub merged_modules: usize,
    pub shards: usize,
}

/// `w [out, in] += scale · (b [out, r] · a [r, in])`, rows in parallel.
pub fn add_lora_delta(w: &mut [f32], a: &[f32], b: &[f32], r: usize, d_in: usize, scale: f32) {
    w.par_chunks_mut(d_in).enumerate().for_each(|(o, row)| {
        let mut delta = vec![0f32; d_in];
        for k in 0..r {
            let c = b[o * r + k];
            for (d, &x) in delta.iter_mut().zip(&a[k * d_in..(k + 1) * d_in]) {
                *d += c * x;
            }
        }
        for (x, d) in row.iter_mut().zip(delta) {
            *x += d * scale;
        }
    });
}

fn encode(values: &[f32], dtype: Dtype) -> Vec<u8> {
    match dtype {
        Dtype::BF16 => values.iter().flat_map(|&x| half::bf16::from_f32(x).to_bits().to_le_bytes()).collect(),
        Dtype::F16 => values.iter().flat_map(|&x| half::f16::from_f32(x).to_bits().to_le_bytes()).collect(),
        _ => bytemuck::cast_slice(values).to_vec(),
    }
}

/// Merges the PEFT adapter in `adapter` into the model in `base`, writing `out`. With
/// `full_precision`, a QLoRA adapter merges into that (dense) base instead of NF4 values.
pub fn merge(base: &Path, adapter: &Path, out: &Path, dtype: Option<MergeDtype>, full_precision: Option<&Path>) -> Result<MergeReport> {
    let qlora = adapter.join(super::peft::QUANTIZED_BASE_FILE).exists();
    let (base, nf4) = match full_precision {
        Some(dense) => (dense, false),
        None => (base, qlora),
    };
    // Refuse what ft cannot load (unknown architecture, bad config) before writing anything.
    ModelConfig::from_dir(base)?;
    let ad = PeftAdapter::open(adapter)?;
    let ck = Checkpoint::open(base)?;
    let quantized_base = ck.names().any(|n| n.ends_with(".quant_state.bitsandbytes__nf4"));
    if quantized_base && full_precision.is_some() {
        bail!("--base {}: a 4-bit checkpoint is not a full-precision base", base.display());
    }
    // Merging into NF4 values writes bf16 by default (the weights have no more precision).
    let dtype = dtype.or((nf4 || quantized_base).then_some(MergeDtype::Bf16));
    let scale = ad.config.scale() as f32;
    let staged = StagedDir::new(out)?;
    let mut merged = 0;
    let mut total_size = 0usize;
    for (i, file) in ck.files().into_iter().enumerate() {
        let mut tensors: RawTensors = Vec::new();
        for name in ck.shard_names(i) {
            if quantized_base && !name.ends_with(".weight") && name.contains(".weight.") {
                ck.skip(&name); // bitsandbytes statistics: folded into the dequantized weight
                continue;
            }
            let (bytes, src_dtype, shape, _) = ck.raw(&name)?;
            // The weight training saw, in f32: NF4-dequantized for QLoRA, else as stored.
            let dequantized: Option<(Vec<f32>, Vec<usize>)> = if quantize::bnb::is_quantized(&ck, &name) {
                let state: serde_json::Value = serde_json::from_slice(ck.raw(&format!("{name}.quant_state.bitsandbytes__nf4"))?.0)?;
                let shape: Vec<usize> = state["shape"].as_array().into_iter().flatten().filter_map(|v| v.as_u64().map(|v| v as usize)).collect();
                Some((quantize::bnb::read(&ck, &name, &shape)?.dequantize(), shape))
            } else if nf4 && quantize::bnb::quantizable(&name, &shape) {
                let w = to_f32(bytes, src_dtype).ok_or_else(|| anyhow!("{name}: not a float tensor"))?;
                Some((quantize::nf4::Nf4::quantize(&w, quantize::nf4::BLOCKSIZE, true).dequantize(), shape.clone()))
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
            let lora = match (module, shape.as_slice()) {
                (Some(m), [d_out, d_in]) => ad.matrices(m, *d_in, *d_out)?,
                _ => None,
            };
            let data = if let Some((a, b)) = lora {
                let mut w = to_f32(bytes, src_dtype)
                    .ok_or_else(|| anyhow!("{name}: cannot merge into a {src_dtype:?} weight (quantized base?)"))?;
                add_lora_delta(&mut w, &a, &b, ad.config.r, shape[1], scale);
                merged += 1;
                encode(&w, out_dtype)
            } else if out_dtype == src_dtype {
                bytes.to_vec()
            } else {
                encode(&to_f32(bytes, src_dtype).expect("float dtype"), out_dtype)
            };
            total_size += data.len();
            tensors.push((name, out_dtype, shape, data));
        }
        write_safetensors(&staged.path(&file.file_name().expect("file").to_string_lossy()), &tensors, ck.shard_metadata(i))?;
    }
    ad.checkpoint
        .check_all_used()
        .with_context(|| format!("the adapter in {} does not fit the model in {}", adapter.display(), base.display()))?;
    if merged == 0 {
        bail!("{}: no adapter tensor matched a weight of {}", adapter.display(), base.display());
    }
    // Everything else the base directory holds: config, tokenizer, generation config, index.
    for entry in std::fs::read_dir(base).with_context(|| format!("cannot read {}", base.display()))? {
        let p = entry?.path();
        let name = p.file_name().expect("entry").to_string_lossy().into_owned();
        if !p.is_file() || name.ends_with(".safetensors") {
            continue;
        }
        let bytes = std::fs::read(&p).with_context(|| format!("cannot read {}", p.display()))?;
        let bytes = match name.as_str() {
            "model.safetensors.index.json" => {
                let mut v: serde_json::Value = serde_json::from_slice(&bytes)?;
                v["metadata"]["total_size"] = total_size.into();
                serde_json::to_vec_pretty(&v)?
            }
            "config.json" if dtype.is_some() || quantized_base => {
                let mut v: serde_json::Value = serde_json::from_slice(&bytes)?;
                if let Some(o) = v.as_object_mut() {
                    o.remove("quantization_config");
                }
                if let Some(d) = dtype {
                    for key in ["torch_dtype", "dtype"] {
                        if v.get(key).is_some() {
                            v[key] = d.torch_name().into();
                        }
                    }
                }
                serde_json::to_vec_pretty(&v)?
            }
            _ => bytes,
        };
        write_atomic(&staged.path(&name), &bytes)?;
    }
    let shards = ck.files().len();
    let out = staged.commit()?;
    Ok(MergeReport { out, merged_modules: merged, shards })
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

    #[test]
    fn encode_roundtrips_f32() {
        let v = [1.5f32, -2.25];
        assert_eq!(to_f32(&encode(&v, Dtype::F32), Dtype::F32).unwrap(), v);
        assert_eq!(to_f32(&encode(&v, Dtype::BF16), Dtype::BF16).unwrap(), v);
    }
}
