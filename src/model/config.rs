//! `config.json` (Hugging Face) → [`ModelConfig`], the resolved settings the decoder reads.
//!
//! One decoder covers Llama 2/3/3.x, Mistral, Qwen2/2.5, Qwen3, SmolLM2/3, Gemma 2/3, Phi-3/4 and
//! the mixture-of-experts Qwen3-MoE and Mixtral; what differs between them is data here (biases,
//! norms and their placement, activation, softcapping, per-layer attention kinds and rotary
//! settings, fused projections, experts), not code elsewhere. Both rope spellings load:
//! transformers 5's `rope_parameters` (per layer type for Gemma 3) and the classic `rope_theta` +
//! `rope_scaling` (with Gemma 3's `rope_local_base_freq` and `sliding_window_pattern`).

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
    #[error("{path}: unknown architecture {model_type:?}; ft supports model_type llama, mistral, qwen2, qwen3, smollm3, gemma2, gemma3_text, phi3, qwen3_moe, mixtral (SmolLM2 is llama)")]
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
    #[serde(rename = "smollm3")]
    SmolLM3,
    Gemma2,
    #[serde(rename = "gemma3_text")]
    Gemma3,
    Phi3,
    #[serde(rename = "qwen3_moe")]
    Qwen3Moe,
    Mixtral,
}

impl Family {
    /// The `model_type` transformers writes.
    pub fn as_str(self) -> &'static str {
        match self {
            Family::Llama => "llama",
            Family::Mistral => "mistral",
            Family::Qwen2 => "qwen2",
            Family::Qwen3 => "qwen3",
            Family::SmolLM3 => "smollm3",
            Family::Gemma2 => "gemma2",
            Family::Gemma3 => "gemma3_text",
            Family::Phi3 => "phi3",
            Family::Qwen3Moe => "qwen3_moe",
            Family::Mixtral => "mixtral",
        }
    }

    /// Gemma's conventions: `(1 + w)` norms, four norms per layer, embeddings × √hidden.
    pub fn is_gemma(self) -> bool {
        matches!(self, Family::Gemma2 | Family::Gemma3)
    }
}

/// The MLP's activation (`hidden_act` / Gemma's `hidden_activation`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `silu(gate) · up` (SwiGLU).
    Silu,
    /// `gelu_tanh(gate) · up` (GeGLU with the tanh approximation: `gelu_pytorch_tanh`).
    GeluTanh,
    /// `gelu(gate) · up` with the exact (erf) GELU.
    Gelu,
}

impl Activation {
    /// The gated MLP's activation applied to `gate`, times `up` (any rank).
    pub fn gated<B: crate::ops::Kernels, const D: usize>(self, gate: burn::prelude::Tensor<B, D>, up: burn::prelude::Tensor<B, D>) -> burn::prelude::Tensor<B, D> {
        match self {
            Activation::Silu => crate::ops::swiglu(gate, up),
            Activation::GeluTanh => crate::ops::geglu(gate, up),
            Activation::Gelu => burn::tensor::activation::gelu(gate) * up,
        }
    }
}

/// One rotary setting (a model has one, or one per attention kind: Gemma 3).
#[derive(Debug, Clone, PartialEq)]
pub struct RopeSpec {
    pub theta: f64,
    pub scaling: RopeScaling,
}

/// What differs between the layers of one model.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerSpec {
    /// Sliding-window attention: query i attends key j iff `i − W < j ≤ i`.
    pub sliding_window: Option<usize>,
    /// Index into [`ModelConfig::ropes`]; `None`: no position encoding in this layer (SmolLM3).
    pub rope: Option<usize>,
    /// A sparse (mixture-of-experts) MLP instead of the dense one.
    pub moe: bool,
}

/// The mixture-of-experts MLP of sparse layers.
#[derive(Debug, Clone, PartialEq)]
pub struct MoeSpec {
    pub num_experts: usize,
    pub top_k: usize,
    /// Divide the top-k probabilities by their sum (Mixtral always does).
    pub norm_topk_prob: bool,
    /// Each expert's intermediate size.
    pub intermediate_size: usize,
    /// Module names of the published per-expert layout: `mlp` + `gate_proj`/`up_proj`/`down_proj`
    /// (Qwen3-MoE) or `block_sparse_moe` + `w1`/`w3`/`w2` (Mixtral).
    pub mixtral_names: bool,
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
    /// Gemma's spelling of `hidden_act`.
    pub hidden_activation: Option<String>,
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
    pub original_max_position_embeddings: Option<usize>,
    pub sliding_window: Option<usize>,
    pub use_sliding_window: Option<bool>,
    pub max_window_layers: Option<usize>,
    pub layer_types: Option<Vec<String>>,
    pub sliding_window_pattern: Option<usize>,
    pub rope_local_base_freq: Option<f64>,
    pub query_pre_attn_scalar: Option<f64>,
    /// `None`: not in the file (the family's default); `Some(None)`: `null` (off).
    #[serde(default, deserialize_with = "present")]
    pub attn_logit_softcapping: Option<Option<f64>>,
    #[serde(default, deserialize_with = "present")]
    pub final_logit_softcapping: Option<Option<f64>>,
    pub no_rope_layers: Option<Vec<u8>>,
    pub no_rope_layer_interval: Option<usize>,
    pub num_experts: Option<usize>,
    pub num_local_experts: Option<usize>,
    pub num_experts_per_tok: Option<usize>,
    pub norm_topk_prob: Option<bool>,
    pub moe_intermediate_size: Option<usize>,
    pub decoder_sparse_step: Option<usize>,
    pub mlp_only_layers: Option<Vec<usize>>,
    pub router_jitter_noise: Option<f64>,
    pub shared_expert_intermediate_size: Option<usize>,
    pub n_shared_experts: Option<usize>,
    /// Routers of other MoE families (DeepSeek-style): refused when set to anything but the
    /// softmax top-k router.
    pub scoring_func: Option<String>,
    pub routed_scaling_factor: Option<f64>,
    pub n_group: Option<usize>,
    pub topk_group: Option<usize>,
    pub text_config: Option<Value>,
}

/// A key that is present (possibly `null`) as `Some`.
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Option<f64>>, D::Error> {
    Option::<f64>::deserialize(d).map(Some)
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
    /// Per-head RMSNorm on q and k before RoPE (Qwen3, Gemma 3).
    pub qk_norm: bool,
    /// The first rope's theta and scaling (= `ropes[0]`).
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    /// Every rotary setting the layers use (one, or per attention kind).
    pub ropes: Vec<RopeSpec>,
    /// Dimensions of each head that rotate (`head_dim · partial_rotary_factor`: Phi-3/4); the
    /// rest pass unchanged.
    pub rotary_dim: usize,
    /// Per layer: window, rope, sparse MLP.
    pub layers: Vec<LayerSpec>,
    pub activation: Activation,
    /// Gemma: RMSNorm scales by `1 + w`, each block has four norms (`pre_feedforward_layernorm`,
    /// `post_feedforward_layernorm`, and `post_attention_layernorm` on the attention's output),
    /// and the embeddings are multiplied by √hidden.
    pub gemma_norms: bool,
    /// Attention scores are multiplied by this (`head_dim^−½`, or Gemma's
    /// `query_pre_attn_scalar^−½`).
    pub attn_scale: f64,
    /// `scores = tanh(scores / c) · c` before the mask (Gemma 2).
    pub attn_softcap: Option<f64>,
    /// `logits = tanh(logits / c) · c` (Gemma 2).
    pub final_softcap: Option<f64>,
    /// Phi-3: one `qkv_proj` ([q; k; v] rows) and one `gate_up_proj` ([gate; up] rows).
    pub fused_projections: bool,
    /// The sparse layers' experts.
    pub moe: Option<MoeSpec>,
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
            "smollm3" => Family::SmolLM3,
            "gemma2" => Family::Gemma2,
            "gemma3_text" => Family::Gemma3,
            "phi3" => Family::Phi3,
            "qwen3_moe" => Family::Qwen3Moe,
            "mixtral" => Family::Mixtral,
            "gemma3" if hf.text_config.is_some() => {
                return Err(ConfigError::Invalid {
                    path: path.into(),
                    key: "text_config",
                    msg: "a multimodal Gemma 3 checkpoint (model_type \"gemma3\"); ft trains the text model: Gemma3ForCausalLM with model_type \"gemma3_text\"".into(),
                })
            }
            _ => return Err(ConfigError::UnknownArchitecture { path: path.into(), model_type }),
        };
        let invalid = |key: &'static str, msg: String| ConfigError::Invalid { path: path.into(), key, msg };
        let gemma = family.is_gemma();
        let (act_key, act) = match (&hf.hidden_activation, &hf.hidden_act) {
            (Some(a), _) => ("hidden_activation", Some(a.as_str())),
            (None, Some(a)) => ("hidden_act", Some(a.as_str())),
            (None, None) => ("hidden_act", None),
        };
        let activation = match act {
            None if gemma => Activation::GeluTanh,
            None | Some("silu" | "swish") => Activation::Silu,
            Some("gelu_pytorch_tanh" | "gelu_new" | "gelu_fast") => Activation::GeluTanh,
            Some("gelu") => Activation::Gelu,
            Some(other) => {
                return Err(invalid(act_key, format!("{other:?} is not supported (expected \"silu\", \"gelu_pytorch_tanh\" or \"gelu\")")))
            }
        };
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
        let max_pos = hf.max_position_embeddings.unwrap_or(4096);
        let n_layers = hf.num_hidden_layers;

        // Rope: `rope_parameters` (transformers 5) holds theta and the scaling — per layer type
        // for Gemma 3; the classic spelling splits them into `rope_theta` and `rope_scaling`
        // (Gemma 3: plus `rope_local_base_freq` for its sliding layers).
        let default_theta = match family {
            Family::Qwen2 | Family::Qwen3 | Family::Qwen3Moe | Family::Mixtral | Family::Gemma3 => 1_000_000.0,
            Family::SmolLM3 => 2_000_000.0,
            _ => 10_000.0,
        };
        let rope_key = if hf.rope_parameters.is_some() { "rope_parameters" } else { "rope_scaling" };
        let parse_rope = |params: Option<&Value>, fallback_theta: f64, classic: Option<&Value>| -> Result<(RopeSpec, Option<f64>), ConfigError> {
            let (theta, scaling_value) = match params {
                Some(Value::Object(p)) => {
                    let theta = match p.get("rope_theta") {
                        None | Some(Value::Null) => fallback_theta,
                        Some(v) => v.as_f64().ok_or_else(|| invalid("rope_parameters", format!("rope_theta must be a number, got {v}")))?,
                    };
                    (theta, Some(Value::Object(p.clone())))
                }
                _ => (fallback_theta, classic.cloned()),
            };
            if !(theta.is_finite() && theta > 0.0) {
                return Err(invalid("rope_theta", format!("{theta} must be a positive number")));
            }
            let partial = scaling_value.as_ref().and_then(|v| v.get("partial_rotary_factor")).and_then(Value::as_f64);
            let scaling = RopeScaling::from_json(scaling_value.as_ref(), max_pos, hf.original_max_position_embeddings).map_err(|e| invalid(rope_key, e.to_string()))?;
            Ok((RopeSpec { theta, scaling }, partial))
        };
        let per_type = hf
            .rope_parameters
            .as_ref()
            .and_then(Value::as_object)
            .filter(|p| p.contains_key("full_attention") || p.contains_key("sliding_attention"));
        let theta = hf.rope_theta.unwrap_or(default_theta);
        // ropes[0]: full attention (and every layer of a one-rope model); ropes[1]: Gemma 3's
        // sliding layers.
        let (ropes, partial_in_rope) = if let Some(p) = per_type {
            let (full, pf) = parse_rope(p.get("full_attention"), theta, None)?;
            let (local, _) = parse_rope(p.get("sliding_attention"), hf.rope_local_base_freq.unwrap_or(10_000.0), None)?;
            (vec![full, local], pf)
        } else if family == Family::Gemma3 {
            let (full, pf) = parse_rope(hf.rope_parameters.as_ref(), theta, hf.rope_scaling.as_ref())?;
            let local = RopeSpec { theta: hf.rope_local_base_freq.unwrap_or(10_000.0), scaling: RopeScaling::None };
            (vec![full, local], pf)
        } else {
            let (r, pf) = parse_rope(hf.rope_parameters.as_ref(), theta, hf.rope_scaling.as_ref())?;
            (vec![r], pf)
        };
        let partial = partial_in_rope.or(hf.partial_rotary_factor).unwrap_or(1.0);
        if !(partial > 0.0 && partial <= 1.0) {
            return Err(invalid("partial_rotary_factor", format!("{partial} must be in (0, 1]")));
        }
        // transformers: `int(head_dim * partial_rotary_factor)`.
        let rotary_dim = (head_dim as f64 * partial) as usize;
        if rotary_dim == 0 || !rotary_dim.is_multiple_of(2) {
            return Err(invalid("head_dim", format!("the rotary dimension {rotary_dim} (head_dim {head_dim} × partial_rotary_factor {partial}) must be even and positive")));
        }
        for r in &ropes {
            if let RopeScaling::LongRope { short, long, .. } = &r.scaling {
                if short.len() != rotary_dim / 2 || long.len() != rotary_dim / 2 {
                    return Err(invalid(rope_key, format!("longrope short_factor and long_factor need {} entries (rotary dimension {rotary_dim} / 2), got {} and {}", rotary_dim / 2, short.len(), long.len())));
                }
            }
        }

        // Layer types: explicit `layer_types` decide; else each family's rule.
        let sliding_types: Vec<bool> = match &hf.layer_types {
            Some(types) => {
                if types.len() != n_layers {
                    return Err(invalid("layer_types", format!("{} entries for {n_layers} layers", types.len())));
                }
                types
                    .iter()
                    .map(|t| match t.as_str() {
                        "sliding_attention" => Ok(true),
                        "full_attention" => Ok(false),
                        other => Err(invalid("layer_types", format!("{other:?} is not supported (expected \"sliding_attention\" or \"full_attention\")"))),
                    })
                    .collect::<Result<_, _>>()?
            }
            None => match family {
                Family::Gemma2 => (0..n_layers).map(|i| (i + 1) % 2 != 0).collect(),
                Family::Gemma3 => {
                    let pattern = hf.sliding_window_pattern.unwrap_or(6).max(1);
                    (0..n_layers).map(|i| (i + 1) % pattern != 0).collect()
                }
                Family::Qwen2 | Family::Qwen3 | Family::Qwen3Moe | Family::SmolLM3 => {
                    let from = hf.max_window_layers.unwrap_or(n_layers);
                    (0..n_layers).map(|i| hf.use_sliding_window == Some(true) && i >= from).collect()
                }
                _ => vec![true; n_layers],
            },
        };
        // Qwen and SmolLM3 configs keep a `sliding_window` that only counts with
        // `use_sliding_window`.
        let window = match family {
            Family::Qwen2 | Family::Qwen3 | Family::Qwen3Moe | Family::SmolLM3 if hf.use_sliding_window != Some(true) => None,
            _ => hf.sliding_window,
        };
        if window == Some(0) {
            return Err(invalid("sliding_window", "must be positive".into()));
        }
        let uses_rope: Vec<bool> = match (family, &hf.no_rope_layers) {
            (Family::SmolLM3, Some(v)) if v.len() != n_layers => {
                return Err(invalid("no_rope_layers", format!("{} entries for {n_layers} layers", v.len())))
            }
            (Family::SmolLM3, Some(v)) => v.iter().map(|&x| x != 0).collect(),
            (Family::SmolLM3, None) => {
                let every = hf.no_rope_layer_interval.unwrap_or(4).max(1);
                (0..n_layers).map(|i| (i + 1) % every != 0).collect()
            }
            _ => vec![true; n_layers],
        };

        // Mixture of experts.
        let moe = match family {
            Family::Qwen3Moe | Family::Mixtral => {
                if let Some(n) = hf.shared_expert_intermediate_size.filter(|&n| n > 0) {
                    return Err(invalid("shared_expert_intermediate_size", format!("{n}: shared experts are not supported (Qwen3-MoE and Mixtral route to experts only)")));
                }
                if let Some(n) = hf.n_shared_experts.filter(|&n| n > 0) {
                    return Err(invalid("n_shared_experts", format!("{n}: shared experts are not supported")));
                }
                if let Some(f) = hf.scoring_func.as_deref().filter(|f| *f != "softmax") {
                    return Err(invalid("scoring_func", format!("{f:?}: ft's router is a softmax over the experts (expected \"softmax\")")));
                }
                if let Some(f) = hf.routed_scaling_factor.filter(|&f| f != 1.0) {
                    return Err(invalid("routed_scaling_factor", format!("{f}: scaled routing weights are not supported (expected 1)")));
                }
                if let Some(g) = hf.n_group.filter(|&g| g > 1).or(hf.topk_group.filter(|&g| g > 1)) {
                    return Err(invalid("n_group", format!("{g}: group-limited routing is not supported")));
                }
                if let Some(j) = hf.router_jitter_noise.filter(|&j| j != 0.0) {
                    return Err(invalid("router_jitter_noise", format!("{j}: router jitter is not supported (expected 0)")));
                }
                let num_experts = hf.num_experts.or(hf.num_local_experts).ok_or_else(|| invalid("num_experts", "missing (also spelled num_local_experts)".into()))?;
                let top_k = hf.num_experts_per_tok.unwrap_or(2);
                if num_experts == 0 || top_k == 0 || top_k > num_experts {
                    return Err(invalid("num_experts_per_tok", format!("{top_k} experts per token out of {num_experts}")));
                }
                let mixtral = family == Family::Mixtral;
                let intermediate = if mixtral { hf.intermediate_size } else { hf.moe_intermediate_size.unwrap_or(768) };
                if intermediate == 0 {
                    return Err(invalid("moe_intermediate_size", "must be positive".into()));
                }
                Some(MoeSpec { num_experts, top_k, norm_topk_prob: mixtral || hf.norm_topk_prob.unwrap_or(false), intermediate_size: intermediate, mixtral_names: mixtral })
            }
            _ => None,
        };
        let sparse_step = hf.decoder_sparse_step.unwrap_or(1).max(1);
        let mlp_only = hf.mlp_only_layers.clone().unwrap_or_default();
        let layers: Vec<LayerSpec> = (0..n_layers)
            .map(|i| LayerSpec {
                sliding_window: if sliding_types[i] { window } else { None },
                rope: uses_rope[i].then_some(if ropes.len() > 1 && sliding_types[i] { 1 } else { 0 }),
                moe: moe.is_some() && (family == Family::Mixtral || (!mlp_only.contains(&i) && (i + 1) % sparse_step == 0)),
            })
            .collect();

        let (qkv_bias, o_bias, qk_norm) = match family {
            Family::Qwen2 => (true, false, false),
            Family::Qwen3 | Family::Qwen3Moe | Family::Gemma3 => {
                let b = hf.attention_bias.unwrap_or(false);
                (b, b, true)
            }
            Family::Phi3 | Family::Mixtral => (false, false, false),
            Family::Llama | Family::Mistral | Family::SmolLM3 | Family::Gemma2 => {
                let b = hf.attention_bias.unwrap_or(false);
                (b, b, false)
            }
        };
        let softcap = |v: Option<f64>, key: &'static str| match v {
            Some(c) if !(c.is_finite() && c > 0.0) => Err(invalid(key, format!("{c} must be a positive number"))),
            v => Ok(v),
        };
        let attn_scale = match hf.query_pre_attn_scalar {
            Some(s) if gemma => {
                if !(s.is_finite() && s > 0.0) {
                    return Err(invalid("query_pre_attn_scalar", format!("{s} must be a positive number")));
                }
                s.powf(-0.5)
            }
            _ => (head_dim as f64).powf(-0.5),
        };
        let tie_default = matches!(family, Family::Qwen2 | Family::Gemma2 | Family::Gemma3 | Family::SmolLM3);
        Ok(ModelConfig {
            family,
            vocab_size: hf.vocab_size,
            hidden_size: hf.hidden_size,
            intermediate_size: hf.intermediate_size,
            num_layers: n_layers,
            num_heads: hf.num_attention_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: hf.rms_norm_eps.unwrap_or(1e-6),
            max_position_embeddings: max_pos,
            tie_word_embeddings: hf.tie_word_embeddings.unwrap_or(tie_default),
            qkv_bias,
            o_bias,
            mlp_bias: matches!(family, Family::Llama | Family::SmolLM3) && hf.mlp_bias.unwrap_or(false),
            qk_norm,
            rope_theta: ropes[0].theta,
            rope_scaling: ropes[0].scaling.clone(),
            ropes,
            rotary_dim,
            layers,
            activation,
            gemma_norms: gemma,
            attn_scale,
            // Gemma 2's defaults are 50 and 30 (Gemma 3's: off).
            attn_softcap: match family {
                Family::Gemma2 => softcap(hf.attn_logit_softcapping.unwrap_or(Some(50.0)), "attn_logit_softcapping")?,
                Family::Gemma3 => softcap(hf.attn_logit_softcapping.flatten(), "attn_logit_softcapping")?,
                _ => None,
            },
            final_softcap: match family {
                Family::Gemma2 => softcap(hf.final_logit_softcapping.unwrap_or(Some(30.0)), "final_logit_softcapping")?,
                Family::Gemma3 => softcap(hf.final_logit_softcapping.flatten(), "final_logit_softcapping")?,
                _ => None,
            },
            fused_projections: family == Family::Phi3,
            moe,
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
        b["rope_scaling"] = serde_json::json!({"rope_type": "mrope", "factor": 2.0});
        let e = resolve(b).unwrap_err().to_string();
        assert!(e.contains("unsupported rope_scaling \"mrope\""), "{e}");
    }
}
