//! `ft quantize`: a model with its decoder linear weights in bitsandbytes NF4 (the `*-bnb-4bit`
//! format transformers loads; tensors as `formats::bnb` writes them), shard by shard.

use std::path::{Path, PathBuf};

use super::ConvertError;
use crate::formats::bnb;
use crate::formats::model_dir::{config_json, ModelDirWriter};
use crate::formats::safetensors::{to_f32, RawTensors, TensorFiles, WeightsError};
use crate::model::projection::quantizable;
use crate::model::ModelConfig;
use crate::quant::nf4::{Nf4, BLOCKSIZE};

/// What `ft quantize` wrote.
#[derive(Debug, serde::Serialize)]
pub struct QuantizeReport {
    pub out: PathBuf,
    pub quantized: usize,
    pub parameters_quantized: usize,
    pub bytes_before: usize,
    pub bytes_after: usize,
}

/// Whether the per-block absmax is itself quantized (bitsandbytes' `bnb_4bit_use_double_quant`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Absmax {
    F32,
    DoubleQuant,
}

/// Writes `model` with its decoder linear weights in NF4 to `out`, plus every other file of the
/// directory and a `quantization_config` in `config.json`.
pub fn quantize(model: &Path, out: &Path, absmax: Absmax) -> Result<QuantizeReport, ConvertError> {
    let double = absmax == Absmax::DoubleQuant;
    ModelConfig::from_dir(model)?;
    if config_json(model)?.get("quantization_config").is_some() {
        return Err(ConvertError::invalid(&model.join("config.json"), "the model is already quantized"));
    }
    let ck = TensorFiles::open(model)?;
    let mut writer = ModelDirWriter::new(out)?;
    let (mut quantized, mut params, mut before) = (0, 0, 0);
    let mut compute_dtype = safetensors::Dtype::F32;
    for (i, file) in ck.files().into_iter().enumerate() {
        let file_name = file.file_name().expect("file").to_string_lossy().into_owned();
        let mut tensors: RawTensors = Vec::new();
        for name in ck.shard_names(i) {
            let (bytes, dtype, shape, path) = ck.raw(&name)?;
            before += bytes.len();
            if quantizable(&name, &shape) {
                let w = to_f32(bytes, dtype).ok_or_else(|| WeightsError::UnsupportedDtype { name: name.clone(), path: path.into(), dtype })?;
                let q = Nf4::quantize(&w, BLOCKSIZE, double);
                compute_dtype = dtype;
                tensors.extend(bnb::tensors(&name, &q, &shape, dtype));
                quantized += 1;
                params += w.len();
            } else {
                tensors.push((name, dtype, shape, bytes.to_vec()));
            }
        }
        writer.write_shard(&file_name, &tensors, ck.shard_metadata(i))?;
    }
    if quantized == 0 {
        return Err(ConvertError::invalid(model, "no decoder linear weight to quantize"));
    }
    let after = writer.total_size();
    writer.copy_sidecars(model, |config| {
        config["quantization_config"] = bnb::quantization_config(compute_dtype, double);
        true
    })?;
    let out = writer.commit()?;
    Ok(QuantizeReport { out, quantized, parameters_quantized: params, bytes_before: before, bytes_after: after })
}
