//! Adapter settings, as PEFT's `LoraConfig` holds them: rank, alpha, dropout, which modules
//! (`target_modules`) and how new adapters are initialised.

use std::path::Path;

use serde_json::Value;

use crate::formats::peft::{PeftError, RawConfig};

/// How new adapters are initialised, as PEFT's `init_lora_weights`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum LoraInit {
    /// PEFT's `True`: A kaiming-uniform (U(±1/√in)), B zero: the adapted model starts as the base.
    #[default]
    Default,
    /// PEFT's `"gaussian"`: A ~ N(0, 1/r²) (std 1/r), B zero.
    Gaussian,
    /// PEFT's `False`: A and B both as `nn.Linear` initialises them (U(±1/√in), U(±1/√r)), so
    /// the adapter is not the identity from the start (for tests and experiments).
    Random,
    /// PEFT's `"pissa"`: A and B the top-r singular components of the base weight, the base
    /// the residual (`adapters::pissa`); saved converted for the original base (rank 2r).
    Pissa,
    /// PEFT's `"pissa_niter_N"`: PiSSA from a randomized SVD with N subspace iterations (fast on
    /// large matrices).
    PissaNiter(usize),
    /// PEFT's `"olora"`: A and B from the QR decomposition of the base weight (`R_r`, `Q_r`).
    Olora,
}

impl TryFrom<String> for LoraInit {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        Ok(match s.as_str() {
            "default" => LoraInit::Default,
            "gaussian" => LoraInit::Gaussian,
            "random" => LoraInit::Random,
            "pissa" => LoraInit::Pissa,
            "olora" => LoraInit::Olora,
            _ => match s.strip_prefix("pissa_niter_").and_then(|n| n.parse().ok()) {
                Some(n) => LoraInit::PissaNiter(n),
                None => return Err(format!("unknown init {s:?} (default, gaussian, random, pissa, pissa_niter_N, olora)")),
            },
        })
    }
}

impl From<LoraInit> for String {
    fn from(i: LoraInit) -> String {
        match i {
            LoraInit::Default => "default".into(),
            LoraInit::Gaussian => "gaussian".into(),
            LoraInit::Random => "random".into(),
            LoraInit::Pissa => "pissa".into(),
            LoraInit::PissaNiter(n) => format!("pissa_niter_{n}"),
            LoraInit::Olora => "olora".into(),
        }
    }
}

impl LoraInit {
    /// PiSSA-like inits: the adapter is cut out of the base (which becomes the residual).
    pub fn split(self) -> Option<crate::adapters::pissa::Split> {
        use crate::adapters::pissa::Split;
        match self {
            LoraInit::Pissa => Some(Split::Pissa),
            LoraInit::PissaNiter(n) => Some(Split::PissaNiter(n)),
            LoraInit::Olora => Some(Split::Olora),
            _ => None,
        }
    }
}

impl LoraInit {
    /// The value of `init_lora_weights` in PEFT's adapter_config.json.
    pub fn peft_value(self) -> Value {
        match self {
            LoraInit::Default => Value::Bool(true),
            LoraInit::Gaussian => Value::String("gaussian".into()),
            // Saved converted for the original base, where it is a plain LoRA (as PEFT's own
            // converted PiSSA adapters say).
            LoraInit::Pissa | LoraInit::PissaNiter(_) | LoraInit::Olora => Value::Bool(true),
            LoraInit::Random => Value::Bool(false),
        }
    }
}

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
    /// `target_modules` given as one string: PEFT's `"all-linear"`, else a regular expression.
    pub fn parse_string(s: &str) -> Self {
        if s == "all-linear" {
            Targets::AllLinear
        } else {
            Targets::Regex(s.to_string())
        }
    }

    /// `target_modules` given as a list (a recipe's): `["all-linear"]` or module names.
    pub fn from_list(names: &[String]) -> Self {
        if names.iter().any(|t| t == "all-linear") {
            Targets::AllLinear
        } else {
            Targets::Names(names.to_vec())
        }
    }

    pub fn matches(&self, module: &str) -> bool {
        match self {
            // PEFT's "all-linear" leaves out the output layer (the LM head or a classifier's) and
            // an MoE router (not an `nn.Linear` in transformers 5); ft's includes the experts,
            // which PEFT reaches only through `target_parameters`.
            Targets::AllLinear => !matches!(module, "lm_head" | "score" | "classifier") && !module.ends_with("embed_tokens") && !module.ends_with(".mlp.gate"),
            Targets::Names(names) => names.iter().any(|t| module == t || module.ends_with(&format!(".{t}"))),
            Targets::Regex(re) => regex_full_match(re, module),
        }
    }
}

/// PEFT's `re.fullmatch(re, module)`, with the regex crate (Python's syntax for what configs use:
/// classes, alternations, repetitions); a pattern that does not compile matches nothing (configs
/// and recipes are checked when read).
pub fn regex_full_match(re: &str, s: &str) -> bool {
    regex::Regex::new(&format!("^(?:{re})$")).is_ok_and(|r| r.is_match(s))
}

/// A LoRA configuration, as PEFT's `LoraConfig` holds it.
#[derive(Debug, Clone)]
pub struct LoraConfig {
    pub r: usize,
    pub alpha: f64,
    pub use_rslora: bool,
    pub dropout: f64,
    pub targets: Targets,
    /// Modules left out although `targets` matches them (PEFT's `exclude_modules`).
    pub exclude: Option<Targets>,
    /// Only decoder layers with these indices are adapted (PEFT's `layers_to_transform`).
    pub layers: Option<Vec<usize>>,
    pub base_model: Option<String>,
    /// How the adapter was initialised (written as `init_lora_weights`).
    pub init: LoraInit,
    /// Modules trained in full besides the LoRA matrices (PEFT's `modules_to_save`; ft: the
    /// output heads, a reward model's `score`), as written in `adapter_config.json`.
    pub modules_to_save: Vec<String>,
    /// DoRA (PEFT's `use_dora`): a magnitude per output row besides A and B.
    pub use_dora: bool,
    /// Per-module ranks (PEFT's `rank_pattern`), tried in order: the first key `k` such that the
    /// module path matches `(.*\.)?(k)$` gives the rank; else `r`.
    pub rank_pattern: Vec<(String, usize)>,
    /// Per-module alphas (PEFT's `alpha_pattern`), matched the same way; else `alpha`.
    pub alpha_pattern: Vec<(String, f64)>,
    /// Parameters adapted directly (PEFT's `target_parameters`): expert stacks and routers.
    pub target_parameters: Vec<String>,
    /// PEFT's `ensure_weight_tying`: on a model with tied embeddings, the trained copy of
    /// `embed_tokens` (`modules_to_save`) is the output head too.
    pub ensure_weight_tying: bool,
}

/// The first of `keys` that `module` matches as PEFT's `get_pattern_key` does
/// (`re.match(rf"(.*\.)?({key})$", module)`).
pub fn pattern_match<'a, T>(keys: &'a [(String, T)], module: &str) -> Option<&'a T> {
    keys.iter().find(|(k, _)| pattern_regex(k).is_ok_and(|re| re.is_match(module))).map(|(_, v)| v)
}

/// A pattern key as the regex PEFT builds from it (anchored at both ends).
pub fn pattern_regex(key: &str) -> Result<regex::Regex, regex::Error> {
    regex::Regex::new(&format!(r"^(?:.*\.)?(?:{key})$"))
}

impl LoraConfig {
    /// Whether the module at `path` gets an adapter, as PEFT decides it: `targets` match, no
    /// exclusion matches, and its layer (if it is in one) is among `layers`.
    pub fn covers(&self, path: &str) -> bool {
        let layer = path.strip_prefix("model.layers.").and_then(|r| r.split('.').next()).and_then(|i| i.parse::<usize>().ok());
        let by_parameter = crate::formats::peft::parameter_path(path)
            .is_some_and(|p| self.target_parameters.iter().any(|t| crate::formats::peft::parameter_matches(t, &p)));
        // (`all-linear` leaves the router out: it is adapted only when named or targeted as a
        // parameter.)
        (by_parameter || self.targets.matches(path))
            && !self.exclude.as_ref().is_some_and(|e| e.matches(path))
            && match (&self.layers, layer) {
                (Some(allowed), Some(i)) => allowed.contains(&i),
                (Some(_), None) => false,
                (None, _) => true,
            }
    }

    /// Whether `module` is trained in full (`modules_to_save` names it, as a name or a suffix).
    pub fn saves(&self, module: &str) -> bool {
        self.modules_to_save.iter().any(|m| module == m || module.ends_with(&format!(".{m}")))
    }

    /// The rank of `module` (`rank_pattern`, else `r`).
    pub fn rank_for(&self, module: &str) -> usize {
        pattern_match(&self.rank_pattern, module).copied().unwrap_or(self.r)
    }

    /// The scale of `module`'s adapter: its alpha over its rank (or √rank with rsLoRA).
    pub fn scale_for(&self, module: &str) -> f64 {
        let (r, alpha) = (self.rank_for(module) as f64, pattern_match(&self.alpha_pattern, module).copied().unwrap_or(self.alpha));
        if self.use_rslora {
            alpha / r.sqrt()
        } else {
            alpha / r
        }
    }

    /// `alpha / r`, or `alpha / sqrt(r)` with rsLoRA (of modules no pattern names).
    pub fn scale(&self) -> f64 {
        if self.use_rslora {
            self.alpha / (self.r as f64).sqrt()
        } else {
            self.alpha / self.r as f64
        }
    }

    /// From a PEFT `adapter_config.json` read from `path`.
    pub fn from_peft(raw: &RawConfig, path: &Path) -> Result<Self, PeftError> {
        let invalid = |msg: &str| PeftError::Invalid { path: path.into(), msg: msg.into() };
        let names = |key: &str, v: &Value| -> Result<Targets, PeftError> {
            match v {
                Value::String(s) => Ok(Targets::parse_string(s)),
                Value::Array(a) => a
                    .iter()
                    .map(|v| v.as_str().map(String::from))
                    .collect::<Option<Vec<_>>>()
                    .map(Targets::Names)
                    .ok_or_else(|| invalid(&format!("{key} must be a list of names or a string"))),
                _ => Err(invalid(&format!("{key} must be a list of names or a string"))),
            }
        };
        let targets = match &raw.target_modules {
            Some(Value::Null) | None if raw.target_parameters.as_ref().is_some_and(Value::is_array) => Targets::Names(Vec::new()),
            Some(v) => names("target_modules", v)?,
            None => return Err(invalid("target_modules must be a list of names or a string")),
        };
        if let Targets::Regex(re) = &targets {
            regex::Regex::new(re).map_err(|e| invalid(&format!("target_modules {re:?} is not a regular expression ft can run: {e}")))?;
        }
        let exclude = match &raw.exclude_modules {
            None | Some(Value::Null) => None,
            Some(v) => Some(names("exclude_modules", v)?),
        };
        let layers = match &raw.layers_to_transform {
            None | Some(Value::Null) => None,
            Some(Value::Number(n)) => Some(vec![n.as_u64().ok_or_else(|| invalid("layers_to_transform must be layer indices"))? as usize]),
            Some(Value::Array(a)) => Some(
                a.iter()
                    .map(|v| v.as_u64().map(|i| i as usize))
                    .collect::<Option<Vec<_>>>()
                    .ok_or_else(|| invalid("layers_to_transform must be layer indices"))?,
            ),
            Some(_) => return Err(invalid("layers_to_transform must be a layer index or a list of them")),
        };
        let mut rank_pattern = Vec::new();
        for (k, v) in &raw.rank_pattern.0 {
            pattern_regex(k).map_err(|e| invalid(&format!("rank_pattern key {k:?} is not a regex ft can run: {e}")))?;
            let r = v.as_u64().filter(|&r| r > 0).ok_or_else(|| invalid(&format!("rank_pattern[{k:?}] must be a positive integer, not {v}")))?;
            rank_pattern.push((k.clone(), r as usize));
        }
        let mut alpha_pattern = Vec::new();
        for (k, v) in &raw.alpha_pattern.0 {
            pattern_regex(k).map_err(|e| invalid(&format!("alpha_pattern key {k:?} is not a regex ft can run: {e}")))?;
            let a = v.as_f64().filter(|a| a.is_finite()).ok_or_else(|| invalid(&format!("alpha_pattern[{k:?}] must be a number, not {v}")))?;
            alpha_pattern.push((k.clone(), a));
        }
        Ok(LoraConfig {
            rank_pattern,
            alpha_pattern,
            r: raw.r,
            alpha: raw.lora_alpha,
            use_rslora: raw.use_rslora,
            dropout: raw.lora_dropout,
            targets,
            exclude,
            layers,
            base_model: raw.base_model_name_or_path.clone(),
            init: Default::default(),
            // Checked by `RawConfig::read`: a list of head names.
            use_dora: raw.use_dora,
            ensure_weight_tying: raw.ensure_weight_tying,
            modules_to_save: match &raw.modules_to_save {
                Some(Value::Array(a)) => a.iter().filter_map(|v| v.as_str().map(String::from)).collect(),
                _ => Vec::new(),
            },
            // Checked by `RawConfig::read`: a list of names.
            target_parameters: match &raw.target_parameters {
                Some(Value::Array(a)) => a.iter().filter_map(|v| v.as_str().map(String::from)).collect(),
                _ => Vec::new(),
            },
        })
    }
}

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
