//! PEFT's adapter format: `adapter_config.json` and `adapter_model.safetensors` with tensors
//! `base_model.model.<module>.lora_A.weight` `[r, in]` and `.lora_B.weight` `[out, r]` (older
//! PEFT versions write `.lora_A.default.weight`). This is the one name map between module paths
//! and PEFT's files; what the settings mean for a model is `adapters::config`'s.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;

use super::safetensors::{write_safetensors, RawTensors, TensorFiles, WeightsError};
use crate::atomic::{write_atomic, AtomicError, StagedDir};

/// The file in an adapter directory that marks a QLoRA adapter (trained on an NF4 base). PEFT
/// ignores it.
pub const QUANTIZED_BASE_FILE: &str = "ft_quantized_base.json";

/// Errors from reading or writing a PEFT adapter directory.
#[derive(Debug, thiserror::Error)]
pub enum PeftError {
    #[error("cannot read {path}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path} is not a PEFT LoRA adapter_config.json")]
    Config { path: PathBuf, source: serde_json::Error },
    #[error("{path}: {what} is not supported by ft")]
    Unsupported { path: PathBuf, what: String },
    #[error("{path}: {msg}")]
    Invalid { path: PathBuf, msg: String },
    #[error("{dir}: no adapter_model.safetensors (expected a PEFT adapter directory)")]
    NoWeights { dir: PathBuf },
    #[error(transparent)]
    Weights(#[from] WeightsError),
    #[error(transparent)]
    Output(#[from] AtomicError),
}

/// A JSON object's entries in the order of the file (serde_json's map is sorted).
#[derive(Debug, Clone, Default)]
pub struct OrderedMap(pub Vec<(String, Value)>);

impl<'de> Deserialize<'de> for OrderedMap {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = OrderedMap;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an object")
            }
            fn visit_unit<E>(self) -> Result<OrderedMap, E> {
                Ok(OrderedMap::default())
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<OrderedMap, A::Error> {
                let mut v = Vec::new();
                while let Some(entry) = map.next_entry::<String, Value>()? {
                    v.push(entry);
                }
                Ok(OrderedMap(v))
            }
        }
        d.deserialize_any(V)
    }
}

/// `adapter_config.json` as PEFT writes it (the keys ft reads).
#[derive(Debug, Clone, Deserialize)]
pub struct RawConfig {
    pub r: usize,
    pub lora_alpha: f64,
    #[serde(default)]
    pub use_rslora: bool,
    pub target_modules: Option<Value>,
    #[serde(default)]
    pub lora_dropout: f64,
    #[serde(default)]
    pub fan_in_fan_out: bool,
    pub bias: Option<String>,
    #[serde(default)]
    pub use_dora: bool,
    pub modules_to_save: Option<Value>,
    /// Per-module ranks and alphas, keyed by patterns, in the file's order (PEFT tries them in
    /// that order).
    #[serde(default)]
    pub rank_pattern: OrderedMap,
    #[serde(default)]
    pub alpha_pattern: OrderedMap,
    pub peft_type: Option<String>,
    /// `CAUSAL_LM`, `SEQ_CLS`, …
    pub task_type: Option<String>,
    pub base_model_name_or_path: Option<String>,
    /// Modules left out although `target_modules` matches them (names or a regex).
    pub exclude_modules: Option<Value>,
    /// Only these layer indices are adapted (an index or a list).
    pub layers_to_transform: Option<Value>,
    pub layers_pattern: Option<Value>,
    /// Fields whose adapters ft cannot run: refused when set.
    pub layer_replication: Option<Value>,
    #[serde(default)]
    pub use_qalora: bool,
    pub target_parameters: Option<Value>,
    pub trainable_token_indices: Option<Value>,
    #[serde(default)]
    pub lora_bias: bool,
    pub alora_invocation_tokens: Option<Value>,
    pub use_bdlora: Option<Value>,
    /// Tied embeddings stay tied: a trained copy of `embed_tokens` is also the output head.
    #[serde(default)]
    pub ensure_weight_tying: bool,
}

impl RawConfig {
    /// Reads `path`, refusing what ft does not implement (each refusal names the key).
    pub fn read(path: &Path) -> Result<Self, PeftError> {
        let text = std::fs::read_to_string(path).map_err(|source| PeftError::Read { path: path.into(), source })?;
        let raw: RawConfig = serde_json::from_str(&text).map_err(|source| PeftError::Config { path: path.into(), source })?;
        let unsupported = |what: &str| Err(PeftError::Unsupported { path: path.into(), what: what.into() });
        if let Some(t) = raw.peft_type.as_deref().filter(|t| *t != "LORA") {
            return unsupported(&format!("peft_type {t:?}"));
        }
        if raw.fan_in_fan_out {
            return unsupported("fan_in_fan_out (GPT-2 Conv1D layers)");
        }
        if raw.bias.as_deref().is_some_and(|b| b != "none") {
            return unsupported("a trained bias (bias != \"none\")");
        }
        // Whole modules trained alongside the adapter: the output heads (a reward model's
        // `score`; PEFT adds "classifier" and "score" for SEQ_CLS, matching or not).
        match &raw.modules_to_save {
            None | Some(Value::Null) => {}
            Some(Value::Array(a)) => {
                for m in a {
                    match m.as_str() {
                        Some(name) if MODULES_TO_SAVE.contains(&name) => {}
                        _ => return unsupported(&format!("modules_to_save {m} (ft trains only the heads {MODULES_TO_SAVE:?} in full)")),
                    }
                }
            }
            Some(other) => return Err(PeftError::Invalid { path: path.into(), msg: format!("modules_to_save must be a list of module names, not {other}") }),
        }
        let set = |v: &Option<Value>| match v {
            None | Some(Value::Null) | Some(Value::Bool(false)) => false,
            Some(Value::Array(a)) => !a.is_empty(),
            Some(Value::Object(o)) => !o.is_empty(),
            Some(_) => true,
        };
        match &raw.target_parameters {
            None | Some(Value::Null) => {}
            Some(Value::Array(a)) => {
                for t in a {
                    match t.as_str() {
                        Some(p) if target_parameter_kind(p).is_some() => {}
                        _ => return unsupported(&format!("target_parameters entry {t} (ft adapts the experts' `mlp.experts.gate_up_proj` and `mlp.experts.down_proj` and the router's `mlp.gate.weight`)")),
                    }
                }
            }
            Some(other) => return Err(PeftError::Invalid { path: path.into(), msg: format!("target_parameters must be a list of parameter names, not {other}") }),
        }
        for (name, value) in [
            ("layer_replication", &raw.layer_replication),
            ("trainable_token_indices", &raw.trainable_token_indices),
            ("alora_invocation_tokens", &raw.alora_invocation_tokens),
            ("use_bdlora", &raw.use_bdlora),
        ] {
            if set(value) {
                return unsupported(name);
            }
        }
        if raw.use_qalora {
            return unsupported("use_qalora");
        }
        if raw.lora_bias {
            return unsupported("lora_bias");
        }
        match &raw.layers_pattern {
            None | Some(Value::Null) => {}
            Some(Value::String(p)) if p == "layers" => {}
            Some(Value::Array(a)) if a.iter().all(|p| p == "layers") => {}
            Some(other) => return unsupported(&format!("layers_pattern {other} (the decoder's layers are `model.layers`)")),
        }
        if raw.r == 0 {
            return Err(PeftError::Invalid { path: path.into(), msg: "r must be positive".into() });
        }
        Ok(raw)
    }
}

/// What a `target_parameters` entry names: an expert stack (`…experts.gate_up_proj` /
/// `…experts.down_proj`, 3-D) or the router (`…mlp.gate.weight`, 2-D).
pub fn target_parameter_kind(p: &str) -> Option<&'static str> {
    let last2: Vec<&str> = p.rsplit('.').take(2).collect();
    match last2.as_slice() {
        ["gate_up_proj", "experts"] => Some("gate_up_proj"),
        ["down_proj", "experts"] => Some("down_proj"),
        ["weight", "gate"] => Some("router"),
        _ => None,
    }
}

/// An expert's projection in ft's module paths, `<layer>.mlp.experts.<e>.<param>` →
/// (`<layer>.mlp.experts`, e, param).
pub fn expert_projection(module: &str) -> Option<(&str, usize, &str)> {
    let (rest, param) = module.rsplit_once('.')?;
    let (stack, e) = rest.rsplit_once('.')?;
    (stack.ends_with(".mlp.experts") && matches!(param, "gate_up_proj" | "down_proj")).then_some(())?;
    Some((stack, e.parse().ok()?, param))
}

/// The parameter path PEFT's `target_parameters` matches for one of ft's projections: an expert
/// stack (`<layer>.mlp.experts.gate_up_proj`) or the router (`<layer>.mlp.gate.weight`).
pub fn parameter_path(module: &str) -> Option<String> {
    if let Some((stack, _, param)) = expert_projection(module) {
        return Some(format!("{stack}.{param}"));
    }
    module.ends_with(".mlp.gate").then(|| format!("{module}.weight"))
}

/// Whether `target_parameters` entry `t` names the parameter at `path` (PEFT: the path itself or
/// a `.`-separated suffix of it).
pub fn parameter_matches(t: &str, path: &str) -> bool {
    path == t || path.ends_with(&format!(".{t}"))
}

/// The tensor names of the LoRA of expert stack `stack.param` (`[E·r, in]` A, `[out, E·r]` B).
/// PEFT wraps each targeted parameter of a module in turn, the first listed innermost: with
/// both of a stack's parameters targeted, the first one's tensors sit under `base_layer`.
pub fn stack_tensor_names(stack: &str, param: &str, target_parameters: &[String]) -> (String, String) {
    let mut wrapped: Vec<&str> = Vec::new();
    for t in target_parameters {
        for p in ["gate_up_proj", "down_proj"] {
            if parameter_matches(t, &format!("{stack}.{p}")) && !wrapped.contains(&p) {
                wrapped.push(p);
            }
        }
    }
    let depth = wrapped.iter().position(|p| *p == param).map_or(0, |i| wrapped.len() - 1 - i);
    let at = format!("base_model.model.{stack}{}", ".base_layer".repeat(depth));
    (format!("{at}.lora_A.weight"), format!("{at}.lora_B.weight"))
}

/// The modules `modules_to_save` may name: the output heads and the token embeddings.
pub const MODULES_TO_SAVE: [&str; 4] = ["score", "classifier", "lm_head", "embed_tokens"];

/// The PEFT tensor name of a module saved whole (`modules_to_save`).
pub fn saved_module_name(module: &str) -> String {
    format!("base_model.model.{module}.weight")
}

/// The PEFT tensor name of a DoRA module's magnitude vector (no `.weight`).
pub fn magnitude_name(module: &str) -> String {
    format!("base_model.model.{module}.lora_magnitude_vector")
}

/// The PEFT tensor names of a module's adapter.
pub fn tensor_names(module: &str) -> (String, String) {
    if is_embedding(module) {
        // PEFT's embedding LoRA: parameters, not modules (no `.weight`).
        return (format!("base_model.model.{module}.lora_embedding_A"), format!("base_model.model.{module}.lora_embedding_B"));
    }
    (format!("base_model.model.{module}.lora_A.weight"), format!("base_model.model.{module}.lora_B.weight"))
}

/// Whether `module` is the token embedding (`…embed_tokens`).
pub fn is_embedding(module: &str) -> bool {
    module == "embed_tokens" || module.ends_with(".embed_tokens")
}

/// The copy of the base embedding PEFT saves beside an embedding LoRA
/// (`save_embedding_layers="auto"`).
pub fn saved_embedding_name(module: &str) -> String {
    format!("base_model.model.{module}.base_layer.weight")
}

/// One module's LoRA matrices in PEFT layout: A `[r, in]`, B `[out, r]`, row-major f32.
pub type LoraMatrices = (Vec<f32>, Vec<f32>);

/// An adapter directory on disk: its config and its tensors.
pub struct AdapterFiles {
    pub dir: PathBuf,
    pub config: RawConfig,
    pub tensors: TensorFiles,
}

impl AdapterFiles {
    pub fn open(dir: &Path) -> Result<Self, PeftError> {
        let config = RawConfig::read(&dir.join("adapter_config.json"))?;
        let file = dir.join("adapter_model.safetensors");
        if !file.exists() {
            return Err(PeftError::NoWeights { dir: dir.into() });
        }
        Ok(AdapterFiles { dir: dir.into(), config, tensors: TensorFiles::open_file(&file)? })
    }

    /// Whether the adapter was trained on an NF4 base (ft's QLoRA marker).
    pub fn quantized_base(dir: &Path) -> bool {
        dir.join(QUANTIZED_BASE_FILE).exists()
    }

    /// The adapter of `module` in PEFT layout (`a: [r, in]`, `b: [out, r]`), if it has one.
    pub fn matrices(&self, module: &str, r: usize, d_in: usize, d_out: usize) -> Result<Option<LoraMatrices>, WeightsError> {
        let (an, bn) = tensor_names(module);
        let (an, bn) = if self.tensors.contains(&an) {
            (an, bn)
        } else {
            let (a2, b2) = (an.replace(".lora_A.weight", ".lora_A.default.weight"), bn.replace(".lora_B.weight", ".lora_B.default.weight"));
            if !self.tensors.contains(&a2) {
                return Ok(None);
            }
            (a2, b2)
        };
        let a = self.tensors.f32(&an, &[r, d_in])?;
        let b = self.tensors.f32(&bn, &[d_out, r])?;
        Ok(Some((a, b)))
    }
}

impl AdapterFiles {
    /// The per-expert LoRA matrices (PEFT layout, expert order) of the expert stack
    /// `stack.param` (`<layer>.mlp.experts.gate_up_proj`, …) of `n` experts, if the adapter
    /// holds it. PEFT stores a stack as A `[n·r, in]` (expert e's rows `e·r..(e+1)·r`) and
    /// B `[out, r·n]` with expert e's column j at `j·n + e`.
    #[allow(clippy::too_many_arguments)]
    pub fn stack_matrices(&self, stack: &str, param: &str, target_parameters: &[String], n: usize, r: usize, d_in: usize, d_out: usize) -> Result<Option<Vec<LoraMatrices>>, WeightsError> {
        let (an, bn) = stack_tensor_names(stack, param, target_parameters);
        if !self.tensors.contains(&an) {
            return Ok(None);
        }
        let a = self.tensors.f32(&an, &[n * r, d_in])?;
        let b = self.tensors.f32(&bn, &[d_out, r * n])?;
        Ok(Some(
            (0..n)
                .map(|e| {
                    let ae = a[e * r * d_in..(e + 1) * r * d_in].to_vec();
                    let be = (0..d_out).flat_map(|o| (0..r).map(move |j| (o, j))).map(|(o, j)| b[o * r * n + j * n + e]).collect();
                    (ae, be)
                })
                .collect(),
        ))
    }
}

/// The inverse of [`AdapterFiles::stack_matrices`]: per-expert A `[r, in]` and B `[out, r]` as
/// PEFT's stacked A `[n·r, in]` and B `[out, r·n]`.
pub fn stack(experts: &[LoraMatrices], r: usize, d_out: usize) -> LoraMatrices {
    let n = experts.len();
    let a = experts.iter().flat_map(|(a, _)| a.iter().copied()).collect();
    let mut b = vec![0f32; d_out * r * n];
    for (e, (_, be)) in experts.iter().enumerate() {
        for o in 0..d_out {
            for j in 0..r {
                b[o * r * n + j * n + e] = be[o * r + j];
            }
        }
    }
    (a, b)
}

impl AdapterFiles {
    /// DoRA's magnitude vector `[out]` of `module`, if the adapter holds one.
    pub fn magnitude(&self, module: &str, d_out: usize) -> Result<Option<Vec<f32>>, WeightsError> {
        let Some(name) = [magnitude_name(module), format!("{}.default", magnitude_name(module))].into_iter().find(|n| self.tensors.contains(n)) else {
            return Ok(None);
        };
        Ok(Some(self.tensors.f32(&name, &[d_out])?))
    }

    /// The shape of the saved copy of `module` (`modules_to_save`), if the adapter holds one.
    pub fn saved_module_shape(&self, module: &str) -> Option<Vec<usize>> {
        let name = [saved_module_name(module), format!("base_model.model.{module}.modules_to_save.default.weight")].into_iter().find(|n| self.tensors.contains(n))?;
        self.tensors.info(&name).map(|(shape, _)| shape)
    }

    /// The saved copy of `module` (`modules_to_save`, `[out, in]` row-major f32), if the adapter
    /// holds one.
    pub fn saved_module(&self, module: &str, d_in: usize, d_out: usize) -> Result<Option<Vec<f32>>, WeightsError> {
        let Some(name) = [saved_module_name(module), format!("base_model.model.{module}.modules_to_save.default.weight")].into_iter().find(|n| self.tensors.contains(n)) else {
            return Ok(None);
        };
        Ok(Some(self.tensors.f32(&name, &[d_out, d_in])?))
    }
}

/// Writes an adapter directory atomically: `adapter_model.safetensors` (with `{"format": "pt"}`),
/// `adapter_config.json` and, for an adapter trained on an NF4 base, the marker file saying so.
pub fn write(out: &Path, tensors: &RawTensors, config: &Value, quantized_base: Option<&Value>) -> Result<(), PeftError> {
    let staged = StagedDir::new(out)?;
    write_safetensors(&staged.path("adapter_model.safetensors"), tensors, None)?;
    let pretty = |v: &Value| serde_json::to_vec_pretty(v).expect("JSON values serialize");
    write_atomic(&staged.path("adapter_config.json"), &pretty(config))?;
    if let Some(base) = quantized_base {
        write_atomic(&staged.path(QUANTIZED_BASE_FILE), &pretty(base))?;
    }
    staged.commit()?;
    Ok(())
}
