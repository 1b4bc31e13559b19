//! `config.json` (Hugging Face) → [`ModelConfig`], the resolved settings the decoder reads.
//!
//! One decoder covers Llama 2/3/3.x, Mistral, Qwen2/2.5, Qwen3 and SmolLM2; what differs between
//! them is data here (biases, q/k norm, head_dim, tied head, rope kind), not code elsewhere.
//! Both rope spellings load: transformers 5's `rope_parameters` and the classic `rope_theta` +
//! `rope_scaling`.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;

use super::rope::RopeScaling;
use crate::formats::model_dir::token_ids;

/// Errors from reading or resolving a `config.json`.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path} is not a valid model config (expected the config.json that transformers writes)")]
    Parse { path: PathBuf, source: serde_json::Error },
    #[error("{path}: unknown architecture {model_type:?}; ft supports model_type llama, mistral, qwen2, qwen3 (and SmolLM2, which is llama)")]
    UnknownArchitecture { path: PathBuf, model_type: String },
    #[error("{path}: {key}: {msg}")]
    Invalid { path: PathBuf, key: &'static str, msg: String },
}

/// The architecture family, from `model_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    Llama,
    Mistral,
    Qwen2,
    Qwen3,
}

impl Family {
    pub fn as_str(self) -> &'static str {
        match self {
            Family::Llama => "llama",
            Family::Mistral => "mistral",
            Family::Qwen2 => "qwen2",
            Family::Qwen3 => "qwen3",
        }
    }
}

/// `config.json` as transformers writes it. Keys that old checkpoints lack are `Option`s.
#[derive(Debug, Clone, Deserialize)]
pub struct HfConfig {
    pub model_type: Option<String>,
    #[serde(default)]
    pub architectures: Vec<String>,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: Option<usize>,
    pub head_dim: Option<usize>,
    pub rms_norm_eps: Option<f64>,
    pub hidden_act: Option<String>,
    pub max_position_embeddings: Option<usize>,
    pub tie_word_embeddings: Option<bool>,
    pub attention_bias: Option<bool>,
    pub mlp_bias: Option<bool>,
    pub rope_theta: Option<f64>,
    pub rope_scaling: Option<Value>,
    pub rope_parameters: Option<Value>,
    pub partial_rotary_factor: Option<f64>,
    pub eos_token_id: Option<Value>,
    pub pad_token_id: Option<Value>,
    pub num_labels: Option<usize>,
    pub id2label: Option<serde_json::Map<String, Value>>,
    pub initializer_range: Option<f64>,
}

/// Resolved model settings: everything the decoder needs, nothing it has to interpret.
#[derive(Debug, Clone)]
pub struct ModelConfig {
    pub family: Family,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// Biases on q, k and v projections.
    pub qkv_bias: bool,
    /// Bias on the attention output projection.
    pub o_bias: bool,
    /// Biases on gate, up and down projections.
    pub mlp_bias: bool,
    /// Per-head RMSNorm on q and k before RoPE (Qwen3).
    pub qk_norm: bool,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    /// All end-of-sequence ids (configs may list several).
    pub eos_token_ids: Vec<u32>,
    /// A sequence-classification checkpoint (`*ForSequenceClassification`: a reward model): its
    /// number of labels; the head is `score`, not `lm_head`.
    pub num_labels: Option<usize>,
    pub pad_token_id: Option<u32>,
    /// The std of transformers' normal init of new linear weights (a classifier head).
    pub initializer_range: f64,
}

impl ModelConfig {
    /// Reads and resolves `dir/config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self, ConfigError> {
        Self::from_file(&dir.join("config.json"))
    }

    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.into(), source })?;
        let hf: HfConfig =
            serde_json::from_str(&text).map_err(|source| ConfigError::Parse { path: path.into(), source })?;
        Self::resolve(&hf, path)
    }

    /// Resolves the raw config (defaults as transformers applies them per family).
    pub fn resolve(hf: &HfConfig, path: &Path) -> Result<Self, ConfigError> {
        let model_type = hf
            .model_type
            .clone()
            .or_else(|| hf.architectures.first().map(|a| a.to_lowercase().replace("forcausallm", "").replace("forsequenceclassification", "")))
            .unwrap_or_default();
        let family = match model_type.as_str() {
            "llama" => Family::Llama,
            "mistral" => Family::Mistral,
            "qwen2" => Family::Qwen2,
            "qwen3" => Family::Qwen3,
            _ => return Err(ConfigError::UnknownArchitecture { path: path.into(), model_type }),
        };
        let invalid = |key: &'static str, msg: String| ConfigError::Invalid { path: path.into(), key, msg };
        if let Some(act) = &hf.hidden_act {
            if act != "silu" && act != "swish" {
                return Err(invalid("hidden_act", format!("{act:?} is not supported (expected \"silu\")")));
            }
        }
        if hf.num_attention_heads == 0 || hf.hidden_size == 0 || hf.num_hidden_layers == 0 {
            return Err(invalid("num_attention_heads", "sizes must be positive".into()));
        }
        let num_kv_heads = hf.num_key_value_heads.unwrap_or(hf.num_attention_heads);
        if num_kv_heads == 0 || !hf.num_attention_heads.is_multiple_of(num_kv_heads) {
            return Err(invalid(
                "num_key_value_heads",
                format!("{num_kv_heads} does not divide num_attention_heads = {}", hf.num_attention_heads),
            ));
        }
        if hf.head_dim.is_none() && !hf.hidden_size.is_multiple_of(hf.num_attention_heads) {
            return Err(invalid(
                "num_attention_heads",
                format!("{} does not divide hidden_size = {} (and no head_dim is given)", hf.num_attention_heads, hf.hidden_size),
            ));
        }
        if hf.vocab_size == 0 || hf.intermediate_size == 0 || hf.head_dim == Some(0) {
            return Err(invalid("vocab_size", "vocab_size, intermediate_size and head_dim must be positive".into()));
        }
        if let Some(eps) = hf.rms_norm_eps.filter(|e| !(e.is_finite() && *e > 0.0)) {
            return Err(invalid("rms_norm_eps", format!("{eps} must be a positive number")));
        }
        let head_dim = hf.head_dim.unwrap_or(hf.hidden_size / hf.num_attention_heads);
        if !head_dim.is_multiple_of(2) {
            return Err(invalid("head_dim", format!("{head_dim} must be even for rotary embeddings")));
        }
        if let Some(p) = hf.partial_rotary_factor {
            if p != 1.0 {
                return Err(invalid("partial_rotary_factor", format!("{p} is not supported (expected 1.0)")));
            }
        }
        let max_pos = hf.max_position_embeddings.unwrap_or(4096);

        // Rope: `rope_parameters` (transformers 5) holds theta and the scaling; the classic
        // spelling splits them into `rope_theta` and `rope_scaling`.
        let default_theta = match family {
            Family::Qwen2 | Family::Qwen3 => 1_000_000.0,
            _ => 10_000.0,
        };
        let (theta, scaling_value) = match &hf.rope_parameters {
            Some(Value::Object(p)) => {
                let theta = match p.get("rope_theta") {
                    None | Some(Value::Null) => hf.rope_theta.unwrap_or(default_theta),
                    Some(v) => v.as_f64().ok_or_else(|| invalid("rope_parameters", format!("rope_theta must be a number, got {v}")))?,
                };
                (theta, Some(Value::Object(p.clone())))
            }
            _ => (hf.rope_theta.unwrap_or(default_theta), hf.rope_scaling.clone()),
        };
        if !(theta.is_finite() && theta > 0.0) {
            return Err(invalid("rope_theta", format!("{theta} must be a positive number")));
        }
        let rope_scaling = RopeScaling::from_json(scaling_value.as_ref(), max_pos)
            .map_err(|e| invalid(if hf.rope_parameters.is_some() { "rope_parameters" } else { "rope_scaling" }, e.to_string()))?;

        let (qkv_bias, o_bias, qk_norm) = match family {
            Family::Qwen2 => (true, false, false),
            Family::Qwen3 => {
                let b = hf.attention_bias.unwrap_or(false);
                (b, b, true)
            }
            Family::Llama | Family::Mistral => {
                let b = hf.attention_bias.unwrap_or(false);
                (b, b, false)
            }
        };
        let tie_default = matches!(family, Family::Qwen2);
        Ok(ModelConfig {
            family,
            vocab_size: hf.vocab_size,
            hidden_size: hf.hidden_size,
            intermediate_size: hf.intermediate_size,
            num_layers: hf.num_hidden_layers,
            num_heads: hf.num_attention_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: hf.rms_norm_eps.unwrap_or(1e-6),
            max_position_embeddings: max_pos,
            tie_word_embeddings: hf.tie_word_embeddings.unwrap_or(tie_default),
            qkv_bias,
            o_bias,
            mlp_bias: matches!(family, Family::Llama) && hf.mlp_bias.unwrap_or(false),
            qk_norm,
            rope_theta: theta,
            rope_scaling,
            eos_token_ids: token_ids(hf.eos_token_id.as_ref()),
            // transformers: `num_labels` is the length of `id2label` (2 when neither is given).
            num_labels: hf
                .architectures
                .iter()
                .any(|a| a.ends_with("ForSequenceClassification"))
                .then(|| hf.id2label.as_ref().map(|m| m.len()).or(hf.num_labels).unwrap_or(2)),
            pad_token_id: token_ids(hf.pad_token_id.as_ref()).first().copied(),
            initializer_range: hf.initializer_range.unwrap_or(0.02),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> serde_json::Value {
        serde_json::json!({
            "model_type": "llama", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
            "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1
        })
    }

    fn resolve(v: serde_json::Value) -> Result<ModelConfig, ConfigError> {
        let hf: HfConfig = serde_json::from_value(v).unwrap();
        ModelConfig::resolve(&hf, Path::new("config.json"))
    }

    #[test]
    fn both_rope_spellings_resolve_alike() {
        let mut a = base();
        a["rope_parameters"] = serde_json::json!({"rope_theta": 500000.0, "rope_type": "linear", "factor": 2.0});
        let mut b = base();
        b["rope_theta"] = 500000.0.into();
        b["rope_scaling"] = serde_json::json!({"type": "linear", "factor": 2.0});
        let (a, b) = (resolve(a).unwrap(), resolve(b).unwrap());
        assert_eq!(a.rope_theta, 500000.0);
        assert_eq!(b.rope_theta, 500000.0);
        assert_eq!(a.rope_scaling, b.rope_scaling);
        assert_eq!(a.rope_scaling, RopeScaling::Linear { factor: 2.0 });
    }

    #[test]
    fn wrong_values_name_their_key() {
        for (key, value, want) in [
            ("rms_norm_eps", serde_json::json!(-1.0), "rms_norm_eps"),
            ("num_attention_heads", serde_json::json!(3), "does not divide hidden_size"),
            ("rope_parameters", serde_json::json!({"rope_theta": "1000000.0"}), "rope_theta must be a number"),
            ("rope_theta", serde_json::json!(0.0), "rope_theta"),
        ] {
            let mut c = base();
            c[key] = value;
            if key == "num_attention_heads" {
                c["num_key_value_heads"] = 1.into();
            }
            let e = resolve(c).unwrap_err().to_string();
            assert!(e.contains(want), "{key}: {e}");
        }
    }

    #[test]
    fn unknown_architecture_and_rope_are_errors() {
        let mut a = base();
        a["model_type"] = "gpt_neox".into();
        let e = resolve(a).unwrap_err().to_string();
        assert!(e.contains("unknown architecture \"gpt_neox\""), "{e}");
        let mut b = base();
        b["rope_scaling"] = serde_json::json!({"rope_type": "longrope", "factor": 2.0});
        let e = resolve(b).unwrap_err().to_string();
        assert!(e.contains("unsupported rope_scaling \"longrope\""), "{e}");
    }
}
