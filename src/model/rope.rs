//! Rotary position embeddings as transformers computes them (`modeling_rope_utils.py`):
//! rotate-half layout, inverse frequencies in f32, and the scaling kinds `linear`, `dynamic`,
//! `yarn`, `llama3` and `longrope` (Phi-3.5 / Phi-4-mini; also spelled `su`). (burn-nn's RoPE is interleaved, so it is not used.)

use serde_json::Value;

/// How the rotary frequencies are scaled, from `rope_scaling` / `rope_parameters`.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    None,
    Linear { factor: f64 },
    /// Dynamic NTK: the base grows once the sequence is longer than `original_max`.
    Dynamic { factor: f64, original_max: usize },
    Yarn { factor: f64, original_max: usize, beta_fast: f64, beta_slow: f64, attention_factor: f64, truncate: bool },
    Llama3 { factor: f64, low_freq_factor: f64, high_freq_factor: f64, original_max: usize },
    /// LongRoPE: per-frequency factors, `short` up to `original_max` positions, `long` beyond,
    /// and cos/sin scaled by `attention_factor`.
    LongRope { short: Vec<f64>, long: Vec<f64>, original_max: usize, attention_factor: f64 },
}

/// A `rope_scaling` / `rope_parameters` value ft cannot use.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RopeError {
    #[error("expected an object, got {0}")]
    NotAnObject(String),
    #[error("rope type {kind:?} needs a numeric {key:?}")]
    Missing { kind: String, key: &'static str },
    #[error("rope type {kind:?} needs {key:?}: a list of numbers")]
    MissingList { kind: String, key: &'static str },
    #[error("unsupported rope_scaling {0:?} (ft supports default, linear, dynamic, yarn, llama3, longrope)")]
    Unsupported(String),
}

fn get_f64(o: &serde_json::Map<String, Value>, k: &str) -> Option<f64> {
    o.get(k).and_then(Value::as_f64)
}

impl RopeScaling {
    /// Parses a `rope_scaling` object (or `rope_parameters`, which also holds `rope_theta`).
    /// `max_pos` is the config's `max_position_embeddings`, the default original context;
    /// `top_original_max` a top-level `original_max_position_embeddings` (Phi-3 keeps it there;
    /// transformers gives it priority for yarn and longrope).
    pub fn from_json(v: Option<&Value>, max_pos: usize, top_original_max: Option<usize>) -> Result<Self, RopeError> {
        let o = match v {
            None | Some(Value::Null) => return Ok(RopeScaling::None),
            Some(Value::Object(o)) => o,
            Some(other) => return Err(RopeError::NotAnObject(other.to_string())),
        };
        let kind = o.get("rope_type").or_else(|| o.get("type")).and_then(Value::as_str).unwrap_or("default");
        let need = |key: &'static str| get_f64(o, key).ok_or_else(|| RopeError::Missing { kind: kind.to_string(), key });
        let factor = || need("factor");
        let original_max = top_original_max.or_else(|| get_f64(o, "original_max_position_embeddings").map(|x| x as usize)).unwrap_or(max_pos);
        Ok(match kind {
            "default" => RopeScaling::None,
            "linear" => RopeScaling::Linear { factor: factor()? },
            "dynamic" => RopeScaling::Dynamic { factor: factor()?, original_max: max_pos },
            "llama3" => RopeScaling::Llama3 {
                factor: factor()?,
                low_freq_factor: need("low_freq_factor")?,
                high_freq_factor: need("high_freq_factor")?,
                original_max: need("original_max_position_embeddings")? as usize,
            },
            "yarn" => {
                let factor = factor()?;
                let mscale = |scale: f64, m: f64| if scale <= 1.0 { 1.0 } else { 0.1 * m * scale.ln() + 1.0 };
                let attention_factor = match (get_f64(o, "attention_factor"), get_f64(o, "mscale"), get_f64(o, "mscale_all_dim")) {
                    (Some(a), _, _) => a,
                    (None, Some(m), Some(ma)) if m != 0.0 && ma != 0.0 => mscale(factor, m) / mscale(factor, ma),
                    _ => mscale(factor, 1.0),
                };
                RopeScaling::Yarn {
                    factor,
                    original_max,
                    beta_fast: get_f64(o, "beta_fast").unwrap_or(32.0),
                    beta_slow: get_f64(o, "beta_slow").unwrap_or(1.0),
                    attention_factor,
                    truncate: o.get("truncate").and_then(Value::as_bool).unwrap_or(true),
                }
            }
            "longrope" | "su" => {
                let list = |key: &'static str| -> Result<Vec<f64>, RopeError> {
                    o.get(key)
                        .and_then(Value::as_array)
                        .and_then(|a| a.iter().map(Value::as_f64).collect::<Option<Vec<_>>>())
                        .ok_or_else(|| RopeError::MissingList { kind: kind.to_string(), key })
                };
                // transformers: without `factor`, max_position_embeddings / original.
                let factor = get_f64(o, "factor").unwrap_or(max_pos as f64 / original_max as f64);
                let attention_factor = match get_f64(o, "attention_factor") {
                    Some(a) => a,
                    None if factor <= 1.0 => 1.0,
                    None => (1.0 + factor.ln() / (original_max as f64).ln()).sqrt(),
                };
                RopeScaling::LongRope { short: list("short_factor")?, long: list("long_factor")?, original_max, attention_factor }
            }
            other => return Err(RopeError::Unsupported(other.to_string())),
        })
    }
}

/// Rotary tables for one model: inverse frequencies and the attention scaling applied to cos/sin.
#[derive(Debug, Clone)]
pub struct Rope {
    head_dim: usize,
    theta: f64,
    scaling: RopeScaling,
    inv_freq: Vec<f32>,
    attention_scaling: f32,
}

/// LongRoPE's `1 / (ext_i · theta^(2i/d))` in f32.
fn long_rope_inv_freq(theta: f64, dim: usize, ext: &[f64]) -> Vec<f32> {
    (0..dim / 2).map(|i| 1.0f32 / (ext[i] as f32 * (theta as f32).powf((2 * i) as f32 / dim as f32))).collect()
}

/// `1 / theta^(2i/d)` in f32, as torch computes it.
fn base_inv_freq(theta: f64, dim: usize) -> Vec<f32> {
    (0..dim / 2).map(|i| 1.0f32 / (theta as f32).powf((2 * i) as f32 / dim as f32)).collect()
}

impl Rope {
    pub fn new(head_dim: usize, theta: f64, scaling: RopeScaling) -> Self {
        let dim = head_dim;
        let mut attention_scaling = 1.0f32;
        let inv_freq = match &scaling {
            RopeScaling::None | RopeScaling::Dynamic { .. } => base_inv_freq(theta, dim),
            RopeScaling::LongRope { short, attention_factor, .. } => {
                attention_scaling = *attention_factor as f32;
                long_rope_inv_freq(theta, dim, short)
            }
            RopeScaling::Linear { factor } => base_inv_freq(theta, dim).into_iter().map(|f| f / *factor as f32).collect(),
            RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max } => {
                let (factor, lo, hi) = (*factor as f32, *low_freq_factor as f32, *high_freq_factor as f32);
                let old = *original_max as f32;
                let low_wavelen = old / lo;
                let high_wavelen = old / hi;
                base_inv_freq(theta, dim)
                    .into_iter()
                    .map(|f| {
                        let wavelen = 2.0 * std::f32::consts::PI / f;
                        let scaled = if wavelen > low_wavelen { f / factor } else { f };
                        // transformers' `~(wavelen < high) * ~(wavelen > low)`, NaN-safe alike.
                        #[allow(clippy::neg_cmp_op_on_partial_ord)]
                        let medium = !(wavelen < high_wavelen) && !(wavelen > low_wavelen);
                        if medium {
                            let smooth = (old / wavelen - lo) / (hi - lo);
                            (1.0 - smooth) * scaled / factor + smooth * scaled
                        } else {
                            scaled
                        }
                    })
                    .collect()
            }
            RopeScaling::Yarn { factor, original_max, beta_fast, beta_slow, attention_factor, truncate } => {
                attention_scaling = *attention_factor as f32;
                let d = dim as f64;
                let corr_dim = |rot: f64| d * ((*original_max as f64) / (rot * 2.0 * std::f64::consts::PI)).ln() / (2.0 * theta.ln());
                let (mut low, mut high) = (corr_dim(*beta_fast), corr_dim(*beta_slow));
                if *truncate {
                    low = low.floor();
                    high = high.ceil();
                }
                let low = low.max(0.0);
                let high = high.min(d - 1.0);
                let high = if low == high { high + 0.001 } else { high };
                (0..dim / 2)
                    .map(|i| {
                        let pos_freq = (theta as f32).powf((2 * i) as f32 / dim as f32);
                        let extra = 1.0 / pos_freq;
                        let inter = 1.0 / (*factor as f32 * pos_freq);
                        let ramp = (((i as f64) - low) / (high - low)).clamp(0.0, 1.0) as f32;
                        let extra_factor = 1.0 - ramp;
                        inter * (1.0 - extra_factor) + extra * extra_factor
                    })
                    .collect()
            }
        };
        Rope { head_dim, theta, scaling, inv_freq, attention_scaling }
    }

    pub fn inv_freq(&self) -> &[f32] {
        &self.inv_freq
    }

    /// cos and sin tables, each `[len, head_dim]` row-major, for positions `start..start+len`.
    /// `total_len` is the longest sequence seen so far (dynamic scaling depends on it).
    pub fn tables(&self, start: usize, len: usize, total_len: usize) -> (Vec<f32>, Vec<f32>) {
        let dynamic;
        let inv_freq = match &self.scaling {
            // Past the original context, the long factors (transformers' `longrope_frequency_update`).
            RopeScaling::LongRope { long, original_max, .. } if total_len > *original_max => {
                dynamic = long_rope_inv_freq(self.theta, self.head_dim, long);
                &dynamic
            }
            RopeScaling::Dynamic { factor, original_max } if total_len > *original_max => {
                let d = self.head_dim as f64;
                let base = self.theta
                    * ((factor * total_len as f64 / *original_max as f64) - (factor - 1.0)).powf(d / (d - 2.0));
                dynamic = base_inv_freq(base, self.head_dim);
                &dynamic
            }
            _ => &self.inv_freq,
        };
        let half = self.head_dim / 2;
        let mut cos = Vec::with_capacity(len * self.head_dim);
        let mut sin = Vec::with_capacity(len * self.head_dim);
        for p in start..start + len {
            for _ in 0..2 {
                for f in inv_freq.iter().take(half) {
                    let angle = p as f32 * f;
                    cos.push(angle.cos() * self.attention_scaling);
                    sin.push(angle.sin() * self.attention_scaling);
                }
            }
        }
        (cos, sin)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_frequencies() {
        let r = Rope::new(4, 10000.0, RopeScaling::None);
        assert_eq!(r.inv_freq(), &[1.0, 0.01]);
        let (cos, sin) = r.tables(1, 1, 2);
        assert!((cos[0] - 1f32.cos()).abs() < 1e-7 && (cos[2] - 1f32.cos()).abs() < 1e-7);
        assert!((sin[1] - 0.01f32.sin()).abs() < 1e-7);
    }

    #[test]
    fn llama3_scaling_divides_low_frequencies_only() {
        let plain = Rope::new(64, 500000.0, RopeScaling::None);
        let s = RopeScaling::Llama3 { factor: 8.0, low_freq_factor: 1.0, high_freq_factor: 4.0, original_max: 8192 };
        let scaled = Rope::new(64, 500000.0, s);
        // The highest frequency (wavelength 2π) is untouched; the lowest is divided by the factor.
        assert_eq!(plain.inv_freq()[0], scaled.inv_freq()[0]);
        let last = plain.inv_freq().len() - 1;
        assert!((scaled.inv_freq()[last] - plain.inv_freq()[last] / 8.0).abs() < 1e-12);
    }
}
