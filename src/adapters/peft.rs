//! PEFT's adapter format: `adapter_config.json` and `adapter_model.safetensors` with tensors
//! `base_model.model.<module>.lora_A.weight` `[r, in]` and `.lora_B.weight` `[out, r]`. This is the
//! one name map between ft's projections and PEFT's files.

use crate::backend::Kernels;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use serde::Deserialize;
use serde_json::Value;

use super::lora::Lora;
use crate::model::weights::Checkpoint;
use crate::model::Decoder;

/// Which modules get adapters (`target_modules`).
#[derive(Debug, Clone, PartialEq)]
pub enum Targets {
    /// Names matched exactly or as a `.`-separated suffix (`q_proj` matches `model.layers.0.self_attn.q_proj`).
    Names(Vec<String>),
    /// A regular expression the whole module path must match.
    Regex(String),
    /// Every linear layer except the output head.
    AllLinear,
}

impl Targets {
    pub fn matches(&self, module: &str) -> bool {
        match self {
            Targets::AllLinear => module != "lm_head",
            Targets::Names(names) => names.iter().any(|t| module == t || module.ends_with(&format!(".{t}"))),
            Targets::Regex(re) => regex_full_match(re, module),
        }
    }
}

/// PEFT's `re.fullmatch` for the simple patterns configs use (alternations of literal names
/// with `.*`); anything richer is refused at load.
fn regex_full_match(re: &str, s: &str) -> bool {
    fn m(p: &[u8], s: &[u8]) -> bool {
        if p.is_empty() {
            return s.is_empty();
        }
        if p.len() >= 2 && p[0] == b'.' && p[1] == b'*' {
            return (0..=s.len()).any(|i| m(&p[2..], &s[i..]));
        }
        if p[0] == b'\\' && p.len() >= 2 {
            return !s.is_empty() && s[0] == p[1] && m(&p[2..], &s[1..]);
        }
        !s.is_empty() && (p[0] == b'.' || p[0] == s[0]) && m(&p[1..], &s[1..])
    }
    let body = re.trim_start_matches('^').trim_end_matches('$');
    let body = body.strip_prefix('(').and_then(|b| b.strip_suffix(')')).filter(|b| !b.contains('(')).unwrap_or(body);
    body.split('|').any(|alt| m(alt.as_bytes(), s.as_bytes()))
}

#[derive(Debug, Deserialize)]
struct RawConfig {
    r: usize,
    lora_alpha: f64,
    #[serde(default)]
    use_rslora: bool,
    target_modules: Option<Value>,
    #[serde(default)]
    lora_dropout: f64,
    #[serde(default)]
    fan_in_fan_out: bool,
    bias: Option<String>,
    #[serde(default)]
    use_dora: bool,
    modules_to_save: Option<Value>,
    #[serde(default)]
    rank_pattern: serde_json::Map<String, Value>,
    #[serde(default)]
    alpha_pattern: serde_json::Map<String, Value>,
    peft_type: Option<String>,
    base_model_name_or_path: Option<String>,
}

/// A LoRA configuration, as PEFT's `LoraConfig` holds it.
#[derive(Debug, Clone)]
pub struct LoraConfig {
    pub r: usize,
    pub alpha: f64,
    pub use_rslora: bool,
    pub dropout: f64,
    pub targets: Targets,
    pub base_model: Option<String>,
    /// How the adapter was initialised (written as `init_lora_weights`).
    pub init: crate::adapters::lora::LoraInit,
}

impl LoraConfig {
    /// `alpha / r`, or `alpha / sqrt(r)` with rsLoRA.
    pub fn scale(&self) -> f64 {
        if self.use_rslora {
            self.alpha / (self.r as f64).sqrt()
        } else {
            self.alpha / self.r as f64
        }
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
        let raw: RawConfig = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a PEFT LoRA adapter_config.json", path.display()))?;
        let bad = |what: &str| anyhow!("{}: {what} is not supported by ft", path.display());
        if raw.peft_type.as_deref().is_some_and(|t| t != "LORA") {
            return Err(bad(&format!("peft_type {:?}", raw.peft_type.unwrap_or_default())));
        }
        if raw.use_dora {
            return Err(bad("use_dora"));
        }
        if raw.fan_in_fan_out {
            return Err(bad("fan_in_fan_out (GPT-2 Conv1D layers)"));
        }
        if raw.bias.as_deref().is_some_and(|b| b != "none") {
            return Err(bad("a trained bias (bias != \"none\")"));
        }
        if raw.modules_to_save.as_ref().is_some_and(|m| !m.is_null()) {
            return Err(bad("modules_to_save"));
        }
        if !raw.rank_pattern.is_empty() || !raw.alpha_pattern.is_empty() {
            return Err(bad("rank_pattern / alpha_pattern"));
        }
        if raw.r == 0 {
            bail!("{}: r must be positive", path.display());
        }
        let targets = match raw.target_modules {
            Some(Value::String(s)) if s == "all-linear" => Targets::AllLinear,
            Some(Value::String(s)) => Targets::Regex(s),
            Some(Value::Array(a)) => Targets::Names(a.iter().filter_map(|v| v.as_str().map(String::from)).collect()),
            _ => bail!("{}: target_modules must be a list of names or a string", path.display()),
        };
        Ok(LoraConfig {
            r: raw.r,
            alpha: raw.lora_alpha,
            use_rslora: raw.use_rslora,
            dropout: raw.lora_dropout,
            targets,
            base_model: raw.base_model_name_or_path,
            init: Default::default(),
        })
    }
}

/// The PEFT tensor names of a module's adapter.
pub fn tensor_names(module: &str) -> (String, String) {
    (format!("base_model.model.{module}.lora_A.weight"), format!("base_model.model.{module}.lora_B.weight"))
}

/// A PEFT adapter read from disk: its config and the (A, B) matrices per module, PEFT layout.
pub struct PeftAdapter {
    pub dir: PathBuf,
    pub config: LoraConfig,
    pub checkpoint: Checkpoint,
}

impl PeftAdapter {
    pub fn open(dir: &Path) -> Result<Self> {
        let config = LoraConfig::from_file(&dir.join("adapter_config.json"))?;
        let file = dir.join("adapter_model.safetensors");
        if !file.exists() {
            bail!("{}: no adapter_model.safetensors (expected a PEFT adapter directory)", dir.display());
        }
        let checkpoint = Checkpoint::open_file(&file)?;
        Ok(PeftAdapter { dir: dir.into(), config, checkpoint })
    }

    /// The adapter of `module` in PEFT layout (`a: [r, in]`, `b: [out, r]`), if it has one.
    pub fn matrices(&self, module: &str, d_in: usize, d_out: usize) -> Result<Option<(Vec<f32>, Vec<f32>)>> {
        let (an, bn) = tensor_names(module);
        let (an, bn) = if self.checkpoint.contains(&an) {
            (an, bn)
        } else {
            let (a2, b2) = (an.replace(".lora_A.weight", ".lora_A.default.weight"), bn.replace(".lora_B.weight", ".lora_B.default.weight"));
            if !self.checkpoint.contains(&a2) {
                return Ok(None);
            }
            (a2, b2)
        };
        let r = self.config.r;
        let a = self.checkpoint.f32(&an, &[r, d_in])?;
        let b = self.checkpoint.f32(&bn, &[d_out, r])?;
        Ok(Some((a, b)))
    }

    /// Attaches the adapters to `model`; every adapter tensor must find its module.
    pub fn attach<B: Kernels>(&self, model: &mut Decoder<B>) -> Result<usize> {
        let device = model.device();
        let scale = self.config.scale();
        let r = self.config.r;
        let mut n = 0;
        for (name, proj) in model.projections_mut() {
            let (d_in, d_out) = proj.dims();
            if let Some((a, b)) = self.matrices(&name, d_in, d_out)? {
                proj.lora = Some(Lora::from_peft(&a, &b, r, d_in, d_out, scale, &device));
                n += 1;
            }
        }
        self.checkpoint
            .check_all_used()
            .with_context(|| format!("the adapter in {} does not fit this model", self.dir.display()))?;
        if n == 0 {
            bail!("{}: the adapter has no LoRA tensors for this model's modules", self.dir.display());
        }
        Ok(n)
    }
}

/// Writes `model`'s adapters as a PEFT adapter directory (`adapter_config.json` with PEFT's keys,
/// `adapter_model.safetensors` in f32 with `{"format": "pt"}`), atomically.
pub fn save<B: Kernels>(model: &mut Decoder<B>, config: &LoraConfig, base_model: &str, out: &Path) -> Result<()> {
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    let mut short: Vec<String> = Vec::new();
    for (name, proj) in model.projections_mut() {
        if let Some(l) = &proj.lora {
            let (a, b) = l.to_peft();
            let (d_in, d_out) = proj.dims();
            let (an, bn) = tensor_names(&name);
            tensors.push((an, vec![l.rank(), d_in], bytemuck::cast_slice(&a).to_vec()));
            tensors.push((bn, vec![d_out, l.rank()], bytemuck::cast_slice(&b).to_vec()));
            let s = name.rsplit('.').next().unwrap_or(&name).to_string();
            if !short.contains(&s) {
                short.push(s);
            }
        }
    }
    if tensors.is_empty() {
        bail!("the model has no adapters to save");
    }
    let tensors: crate::model::weights::RawTensors =
        tensors.into_iter().map(|(n, s, b)| (n, safetensors::Dtype::F32, s, b)).collect();
    let staged = crate::fsutil::StagedDir::new(out)?;
    crate::model::weights::write_safetensors(&staged.path("adapter_model.safetensors"), &tensors, None)?;
    let cfg = serde_json::json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": config.r,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "use_rslora": config.use_rslora,
        "target_modules": short,
        "bias": "none",
        "fan_in_fan_out": false,
        "init_lora_weights": config.init.peft_value(),
        "inference_mode": true,
        "modules_to_save": null,
        "use_dora": false,
        "rank_pattern": {},
        "alpha_pattern": {},
        "layers_to_transform": null,
        "layers_pattern": null,
        "revision": null,
    });
    crate::fsutil::write_atomic(&staged.path("adapter_config.json"), &serde_json::to_vec_pretty(&cfg)?)?;
    // A QLoRA adapter says what base it was trained against, so `ft merge` merges into the same
    // (dequantized NF4) weights. PEFT ignores the extra file.
    if model.projections_mut().iter().any(|(_, p)| p.nf4.is_some()) {
        let base = serde_json::json!({"quantization": "nf4", "blocksize": crate::quant::nf4::BLOCKSIZE, "double_quant": true});
        crate::fsutil::write_atomic(&staged.path(QUANTIZED_BASE_FILE), &serde_json::to_vec_pretty(&base)?)?;
    }
    staged.commit()?;
    Ok(())
}

/// The file in an adapter directory that marks a QLoRA adapter (trained on an NF4 base).
pub const QUANTIZED_BASE_FILE: &str = "ft_quantized_base.json";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_matching_follows_peft() {
        let t = Targets::Names(vec!["q_proj".into(), "model.layers.1.mlp.up_proj".into()]);
        assert!(t.matches("model.layers.0.self_attn.q_proj"));
        assert!(t.matches("model.layers.1.mlp.up_proj"));
        assert!(!t.matches("model.layers.0.mlp.up_proj"));
        assert!(!t.matches("model.layers.0.self_attn.xq_proj"));
        assert!(Targets::AllLinear.matches("model.layers.3.mlp.down_proj") && !Targets::AllLinear.matches("lm_head"));
        let re = Targets::Regex(r".*\.(q_proj|v_proj)".into());
        assert!(!re.matches("model.layers.0.self_attn.k_proj"));
        let re = Targets::Regex(r".*q_proj|.*v_proj".into());
        assert!(re.matches("model.layers.0.self_attn.q_proj") && !re.matches("model.layers.0.self_attn.k_proj"));
    }
}
