//! bitsandbytes' 4-bit checkpoint format, as transformers saves `*-bnb-4bit` models: for a
//! quantized `X.weight`,
//!
//! | tensor | dtype | contents |
//! |---|---|---|
//! | `X.weight` | U8 `[n/2, 1]` | packed NF4 codes |
//! | `X.weight.absmax` | F32, or U8 with double quantization | per-64 absmax |
//! | `X.weight.quant_map` | F32 `[16]` | the NF4 code |
//! | `X.weight.nested_absmax` | F32 | per-256 absmax of the absmax (double quantization) |
//! | `X.weight.nested_quant_map` | F32 `[256]` | the 8-bit dynamic map (double quantization) |
//! | `X.weight.quant_state.bitsandbytes__nf4` | U8 | JSON: quant_type, blocksize, dtype, shape, nested_* |
//!
//! and `config.json` carries a `quantization_config` with `quant_method = "bitsandbytes"`.
//! `ft quantize` (`convert::quantize`) writes this, tensors byte for byte as bitsandbytes would,
//! and the model loader reads it.

use safetensors::tensor::Dtype;

use super::safetensors::{to_f32, torch_name, RawTensors, TensorFiles, WeightsError};
use crate::quant::dynamic::dynamic_map;
use crate::quant::nf4::{Absmax, DoubleQuant, Nf4, BLOCKSIZE, NF4_CODE};

/// The suffix of the tensor holding a quantized weight's quant-state JSON.
pub const STATE_SUFFIX: &str = ".quant_state.bitsandbytes__nf4";

/// A float as Python's `repr` writes it (what `json.dumps` puts in the quant state).
fn python_float(x: f64) -> String {
    if x == 0.0 {
        return "0.0".into();
    }
    // Rust's `{:e}` gives the shortest round-trip digits, as Python's repr does.
    let sci = format!("{x:e}");
    let (mantissa, exp) = sci.split_once('e').expect("exponent");
    let exp: i32 = exp.parse().expect("exponent");
    let neg = mantissa.starts_with('-');
    let digits: String = mantissa.chars().filter(|c| c.is_ascii_digit()).collect();
    let sign = if neg { "-" } else { "" };
    if (-4..16).contains(&exp) {
        let point = exp + 1;
        let body = if point <= 0 {
            format!("0.{}{}", "0".repeat((-point) as usize), digits)
        } else if point as usize >= digits.len() {
            format!("{}{}.0", digits, "0".repeat(point as usize - digits.len()))
        } else {
            format!("{}.{}", &digits[..point as usize], &digits[point as usize..])
        };
        format!("{sign}{body}")
    } else {
        let m = if digits.len() > 1 { format!("{}.{}", &digits[..1], &digits[1..]) } else { digits };
        format!("{sign}{m}e{}{:02}", if exp < 0 { "-" } else { "+" }, exp.abs())
    }
}

/// The quant-state JSON of a weight of `shape` whose original dtype is `dtype`.
pub fn quant_state_json(q: &Nf4, shape: &[usize], dtype: Dtype) -> String {
    let dtype = torch_name(dtype);
    let shape: Vec<String> = shape.iter().map(usize::to_string).collect();
    let mut s = format!(
        "{{\"quant_type\": \"nf4\", \"blocksize\": {}, \"dtype\": \"{dtype}\", \"shape\": [{}]",
        q.blocksize,
        shape.join(", ")
    );
    if let Absmax::Double(d) = &q.absmax {
        s.push_str(&format!(
            ", \"nested_blocksize\": 256, \"nested_dtype\": \"float32\", \"nested_offset\": {}",
            python_float(d.offset as f64)
        ));
    }
    s.push('}');
    s
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    bytemuck::cast_slice(v).to_vec()
}

/// The tensors that store quantized `name` (`X.weight`), in bitsandbytes' names.
pub fn tensors(name: &str, q: &Nf4, shape: &[usize], dtype: Dtype) -> RawTensors {
    let mut out = vec![(name.to_string(), Dtype::U8, vec![q.packed.len(), 1], q.packed.clone())];
    match &q.absmax {
        Absmax::Plain(a) => out.push((format!("{name}.absmax"), Dtype::F32, vec![a.len()], f32_bytes(a))),
        Absmax::Double(d) => {
            out.push((format!("{name}.absmax"), Dtype::U8, vec![d.codes.len()], d.codes.clone()));
            out.push((format!("{name}.nested_absmax"), Dtype::F32, vec![d.nested_absmax.len()], f32_bytes(&d.nested_absmax)));
            out.push((format!("{name}.nested_quant_map"), Dtype::F32, vec![256], f32_bytes(&dynamic_map())));
        }
    }
    out.push((format!("{name}.quant_map"), Dtype::F32, vec![16], f32_bytes(&NF4_CODE)));
    let state = quant_state_json(q, shape, dtype).into_bytes();
    out.push((format!("{name}{STATE_SUFFIX}"), Dtype::U8, vec![state.len()], state));
    out
}

/// True when `X.weight` is stored 4-bit in `ck`.
pub fn is_quantized(ck: &TensorFiles, name: &str) -> bool {
    ck.contains(&format!("{name}{STATE_SUFFIX}"))
}

/// True when `name` is one of the statistics tensors that accompany a 4-bit weight
/// (`X.weight.absmax`, `X.weight.quant_state…`, ...), not a weight of its own.
pub fn is_statistic(name: &str) -> bool {
    !name.ends_with(".weight") && name.contains(".weight.")
}

/// The `[out, in]` shape recorded in a 4-bit weight's quant state.
pub fn stored_shape(ck: &TensorFiles, name: &str) -> Result<Vec<usize>, WeightsError> {
    let state_name = format!("{name}{STATE_SUFFIX}");
    let (state, _, _, _) = ck.raw(&state_name)?;
    let state: serde_json::Value =
        serde_json::from_slice(state).map_err(|e| bad(ck, &state_name, format!("quant state is not JSON: {e}")))?;
    Ok(state["shape"].as_array().into_iter().flatten().filter_map(|v| v.as_u64().map(|v| v as usize)).collect())
}

fn f32_tensor(ck: &TensorFiles, name: &str) -> Result<Vec<f32>, WeightsError> {
    let (bytes, dtype, _, path) = ck.raw(name)?;
    to_f32(bytes, dtype).ok_or_else(|| WeightsError::UnsupportedDtype { name: name.into(), path: path.into(), dtype })
}

fn bad(ck: &TensorFiles, name: &str, msg: String) -> WeightsError {
    WeightsError::Index { path: ck.dir().join(name), msg }
}

/// Reads quantized `X.weight` and checks it has `shape` (`[out, in]`).
pub fn read(ck: &TensorFiles, name: &str, shape: &[usize]) -> Result<Nf4, WeightsError> {
    let state_name = format!("{name}{STATE_SUFFIX}");
    let (state, _, _, _) = ck.raw(&state_name)?;
    let state: serde_json::Value =
        serde_json::from_slice(state).map_err(|e| bad(ck, &state_name, format!("quant state is not JSON: {e}")))?;
    if state["quant_type"] != "nf4" {
        return Err(bad(ck, &state_name, format!("quant_type {} is not supported (only nf4)", state["quant_type"])));
    }
    let got: Vec<usize> = state["shape"].as_array().into_iter().flatten().filter_map(|v| v.as_u64().map(|v| v as usize)).collect();
    if got != shape {
        return Err(WeightsError::ShapeMismatch { name: name.into(), path: ck.dir().into(), expected: shape.to_vec(), got });
    }
    let blocksize = state["blocksize"].as_u64().unwrap_or(BLOCKSIZE as u64) as usize;
    let numel: usize = shape.iter().product();
    let (packed, _, _, _) = ck.raw(name)?;
    if packed.len() != numel.div_ceil(2) {
        return Err(bad(ck, name, format!("{} packed bytes for {numel} values", packed.len())));
    }
    let quant_map = f32_tensor(ck, &format!("{name}.quant_map"))?;
    if quant_map != NF4_CODE {
        return Err(bad(ck, name, "quant_map is not the NF4 code".into()));
    }
    let blocks = numel.div_ceil(blocksize);
    let absmax = if let Some(offset) = state.get("nested_offset").and_then(|v| v.as_f64()) {
        let (codes, _, _, _) = ck.raw(&format!("{name}.absmax"))?;
        let nested_absmax = f32_tensor(ck, &format!("{name}.nested_absmax"))?;
        let map = f32_tensor(ck, &format!("{name}.nested_quant_map"))?;
        if map != dynamic_map() {
            return Err(bad(ck, name, "nested_quant_map is not bitsandbytes' dynamic map".into()));
        }
        if codes.len() != blocks || nested_absmax.len() != blocks.div_ceil(256) {
            return Err(bad(ck, name, format!("{} absmax codes / {} nested absmax for {blocks} blocks", codes.len(), nested_absmax.len())));
        }
        Absmax::Double(DoubleQuant { codes: codes.to_vec(), nested_absmax, offset: offset as f32 })
    } else {
        let a = f32_tensor(ck, &format!("{name}.absmax"))?;
        if a.len() != blocks {
            return Err(bad(ck, name, format!("{} absmax for {blocks} blocks", a.len())));
        }
        Absmax::Plain(a)
    };
    Ok(Nf4 { packed: packed.to_vec(), absmax, numel, blocksize })
}

/// The `quantization_config` transformers writes for bitsandbytes NF4.
pub fn quantization_config(compute_dtype: Dtype, double: bool) -> serde_json::Value {
    serde_json::json!({
        "_load_in_4bit": true,
        "_load_in_8bit": false,
        "bnb_4bit_compute_dtype": torch_name(compute_dtype),
        "bnb_4bit_quant_storage": "uint8",
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": double,
        "llm_int8_enable_fp32_cpu_offload": false,
        "llm_int8_has_fp16_weight": false,
        "llm_int8_skip_modules": null,
        "llm_int8_threshold": 6.0,
        "load_in_4bit": true,
        "load_in_8bit": false,
        "quant_method": "bitsandbytes"
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floats_print_as_python_repr() {
        for (x, want) in [
            (0.052369531244039536, "0.052369531244039536"),
            (1e-05, "1e-05"),
            (0.0001, "0.0001"),
            (-2.5e-07, "-2.5e-07"),
            (1.0, "1.0"),
            (123.5, "123.5"),
            (1e16, "1e+16"),
        ] {
            assert_eq!(python_float(x), want);
        }
    }
}
