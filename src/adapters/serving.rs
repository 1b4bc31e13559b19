//! What an adapter directory is (`ft adapter info`) and which serving engines will take it
//! (`ft adapter check`, also printed at the end of `ft train`): the rules users otherwise meet at
//! deployment time, from the engines' own code and docs as of 2026 (`design/frontier.md` §6):
//!
//! | engine | refuses | changes silently |
//! |---|---|---|
//! | vLLM | DoRA; `modules_to_save`; rank above `--max-lora-rank` (default 16, one of 1, 8, 16, 32, 64, 128, 256, 320, 512) | — |
//! | SGLang | DoRA; `modules_to_save` (it takes LoRA on `embed_tokens`/`lm_head`, not full copies) | — |
//! | Ollama | safetensors adapters of families other than Llama, Mistral/Mixtral, Gemma 1/2; DoRA and full module copies (it converts to GGUF as llama.cpp) | — (QLoRA adapters: "best to use non-quantized") |
//! | llama.cpp | DoRA magnitudes; full `embed_tokens`/`lm_head` weights | rsLoRA (scaled α/r, √r too weak); `rank_pattern`/`alpha_pattern` (one scale for all) — when converted by its `convert_lora_to_gguf.py`; `ft export gguf-lora` folds both |
//! | mistral.rs | DoRA; `modules_to_save`; embedding/head adapters; rank above 256 | — |
//!
//! MoE expert adapters (PEFT's `target_parameters`, 3-D stacks): vLLM loads them only for models it
//! flags `is_3d_moe_weight`; SGLang has fused-MoE LoRA; for llama.cpp, Ollama and mistral.rs the
//! stacked form is unverified — each is a warning with the merged model as the fix.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::config::LoraConfig;
use crate::formats::peft::{AdapterFiles, PeftError};

/// A serving engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Engine {
    Vllm,
    Sglang,
    Ollama,
    #[value(name = "llama.cpp")]
    #[serde(rename = "llama.cpp")]
    LlamaCpp,
    #[value(name = "mistral.rs")]
    #[serde(rename = "mistral.rs")]
    MistralRs,
}

impl Engine {
    pub const ALL: [Engine; 5] = [Engine::Vllm, Engine::Sglang, Engine::Ollama, Engine::LlamaCpp, Engine::MistralRs];

    pub fn name(self) -> &'static str {
        match self {
            Engine::Vllm => "vLLM",
            Engine::Sglang => "SGLang",
            Engine::Ollama => "Ollama",
            Engine::LlamaCpp => "llama.cpp",
            Engine::MistralRs => "mistral.rs",
        }
    }
}

/// How bad a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// The engine refuses to load the adapter.
    Refused,
    /// The engine loads it but computes something else.
    Changed,
    /// Loads, with a caveat.
    Warning,
}

/// One thing an engine will do with the adapter, and what to do about it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Finding {
    pub engine: Engine,
    pub severity: Severity,
    pub what: String,
    pub fix: String,
}

/// What an adapter directory holds.
#[derive(Debug, Clone, Serialize)]
pub struct AdapterInfo {
    pub dir: PathBuf,
    /// `lora` or `dora`.
    pub kind: &'static str,
    pub task_type: Option<String>,
    pub base_model: Option<String>,
    /// The base's `model_type` (from `--model`, or the base path when it is a local directory).
    pub base_model_type: Option<String>,
    pub r: usize,
    pub lora_alpha: f64,
    /// Every rank and alpha in use (several with `rank_pattern` / `alpha_pattern`).
    pub ranks: Vec<usize>,
    pub alphas: Vec<f64>,
    pub use_rslora: bool,
    /// The kinds of module adapted (`q_proj`, …) and how many modules.
    pub target_kinds: Vec<String>,
    pub adapted_modules: usize,
    pub modules_to_save: Vec<String>,
    /// LoRA on the token embeddings (`lora_embedding_A/B`).
    pub embedding_lora: bool,
    /// Parameters adapted directly (PEFT's `target_parameters`: MoE expert stacks, a router).
    pub target_parameters: Vec<String>,
    /// The whole base embedding saved beside it (PEFT's `save_embedding_layers`).
    pub saved_embedding_layer: bool,
    pub parameters: usize,
    /// Trained on an NF4 base (ft's QLoRA marker).
    pub quantized_base: bool,
    /// Steps of the run that wrote it (its `summary.json`), when it sits in a run directory.
    pub trained_steps: Option<usize>,
}

/// Reads `dir` (an adapter) and, for the base's model type, `model` or the base named in its
/// config when that is a local directory.
pub fn info(dir: &Path, model: Option<&Path>) -> Result<AdapterInfo, PeftError> {
    let files = AdapterFiles::open(dir)?;
    let config = LoraConfig::from_peft(&files.config, &dir.join("adapter_config.json"))?;
    let names: Vec<String> = files.tensors.names().map(String::from).collect();
    let mut parameters = 0;
    let mut kinds = BTreeSet::new();
    let (mut ranks, mut alphas, mut adapted) = (BTreeSet::new(), Vec::<f64>::new(), 0);
    for n in &names {
        parameters += files.tensors.info(n).map(|(s, _)| s.iter().product::<usize>()).unwrap_or(0);
        if let Some(module) = n.strip_suffix(".lora_A.weight").or_else(|| n.strip_suffix(".lora_embedding_A")) {
            let module = module.trim_start_matches("base_model.model.");
            adapted += 1;
            // An expert stack (`….mlp.experts[.base_layer…]`): which parameter, as PEFT nests them.
            let stripped = module.trim_end_matches(".base_layer").trim_end_matches(".base_layer");
            let kind = if stripped.ends_with(".mlp.experts") {
                let stack = stripped.to_string();
                let param = ["gate_up_proj", "down_proj"].into_iter().find(|p| crate::formats::peft::stack_tensor_names(&stack, p, &config.target_parameters).0 == *n);
                format!("experts.{}", param.unwrap_or("?"))
            } else {
                module.rsplit('.').next().unwrap_or(module).to_string()
            };
            kinds.insert(kind);
            ranks.insert(config.rank_for(module));
            let alpha = config.scale_for(module) * if config.use_rslora { (config.rank_for(module) as f64).sqrt() } else { config.rank_for(module) as f64 };
            if !alphas.iter().any(|a| (a - alpha).abs() < 1e-9) {
                alphas.push(alpha);
            }
        }
    }
    let embedding_lora = names.iter().any(|n| n.contains("lora_embedding_"));
    let base_dir = model.map(Path::to_path_buf).or_else(|| config.base_model.as_ref().map(PathBuf::from).filter(|p| p.join("config.json").is_file()));
    let base_model_type = base_dir.and_then(|d| crate::formats::model_dir::config_json(&d).ok()).and_then(|c| c["model_type"].as_str().map(String::from));
    let trained_steps = dir
        .parent()
        .map(|p| p.join("summary.json"))
        .and_then(|p| std::fs::read(p).ok())
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|v| v["steps"].as_u64())
        .map(|s| s as usize);
    Ok(AdapterInfo {
        dir: dir.into(),
        kind: if config.use_dora { "dora" } else { "lora" },
        task_type: files.config.task_type.clone(),
        base_model: config.base_model.clone(),
        base_model_type,
        r: config.r,
        lora_alpha: config.alpha,
        ranks: ranks.into_iter().collect(),
        alphas,
        use_rslora: config.use_rslora,
        target_kinds: kinds.into_iter().collect(),
        adapted_modules: adapted,
        modules_to_save: names
            .iter()
            .filter_map(|n| n.strip_prefix("base_model.model.").and_then(|m| m.strip_suffix(".weight")))
            .filter(|m| !m.contains("lora_") && !m.ends_with(".base_layer"))
            .map(String::from)
            .collect(),
        embedding_lora,
        target_parameters: config.target_parameters.clone(),
        saved_embedding_layer: names.iter().any(|n| n.ends_with("embed_tokens.base_layer.weight")),
        parameters,
        quantized_base: AdapterFiles::quantized_base(dir),
        trained_steps,
    })
}

/// The ranks vLLM's `--max-lora-rank` may take.
pub const VLLM_RANKS: [usize; 9] = [1, 8, 16, 32, 64, 128, 256, 320, 512];

/// What each of `engines` will do with the adapter `a`; `max_lora_rank` is vLLM's setting
/// (default 16).
pub fn check(a: &AdapterInfo, engines: &[Engine], max_lora_rank: usize) -> Vec<Finding> {
    let merge = "serve the merged model instead (`ft merge`)".to_string();
    let rank = a.ranks.iter().copied().max().unwrap_or(a.r);
    let mut out = Vec::new();
    let mut add = |engine: Engine, severity: Severity, what: String, fix: String| out.push(Finding { engine, severity, what, fix });
    for &e in engines {
        if a.kind == "dora" {
            let what = match e {
                Engine::Vllm => "DoRA: \"vLLM does not yet support DoRA\"",
                Engine::LlamaCpp | Engine::Ollama => "DoRA: convert_lora_to_gguf.py has no place for the magnitude vectors",
                _ => "DoRA is not supported",
            };
            add(e, Severity::Refused, what.into(), merge.clone());
        }
        if !a.modules_to_save.is_empty() {
            let what = match e {
                Engine::Vllm => format!("modules_to_save {:?}: \"vLLM only supports modules_to_save being None\"", a.modules_to_save),
                Engine::LlamaCpp | Engine::Ollama => format!("full module weights {:?} in the adapter (\"Embeddings is present in the adapter\")", a.modules_to_save),
                _ => format!("full module weights {:?} (modules_to_save)", a.modules_to_save),
            };
            add(e, Severity::Refused, what, merge.clone());
        }
        // llama.cpp applies an embedding LoRA from a GGUF adapter (token_embd.weight.lora_a/b:
        // measured, benches/RESULTS.md); Ollama's safetensors import does not take one.
        if a.embedding_lora && matches!(e, Engine::Ollama | Engine::MistralRs | Engine::Vllm) {
            let severity = if e == Engine::Vllm { Severity::Warning } else { Severity::Refused };
            let what = if e == Engine::Vllm { "LoRA on embed_tokens: vLLM's extra-vocabulary LoRA support is deprecated" } else { "LoRA on embed_tokens is not supported" };
            let what = if a.saved_embedding_layer { format!("{what}; the adapter also carries the whole base embedding (PEFT's save_embedding_layers)") } else { what.to_string() };
            add(e, severity, what, merge.clone());
        }
        if !a.target_parameters.is_empty() {
            let what = match e {
                Engine::Vllm => Some("MoE expert adapters (target_parameters, 3-D stacks) load only for models vLLM flags is_3d_moe_weight".to_string()),
                Engine::Sglang => None,
                _ => Some(format!("MoE expert adapters (target_parameters {:?}): {} support for the stacked form is not verified", a.target_parameters, e.name())),
            };
            if let Some(what) = what {
                add(e, Severity::Warning, what, merge.clone());
            }
        }
        match e {
            Engine::Vllm => {
                if rank > 512 {
                    add(e, Severity::Refused, format!("rank {rank} is above the largest --max-lora-rank (512)"), format!("{merge}, or train with a rank ≤ 512"));
                } else if rank > max_lora_rank {
                    let need = VLLM_RANKS.iter().copied().find(|&r| r >= rank).unwrap_or(512);
                    add(e, Severity::Refused, format!("rank {rank} is greater than max_lora_rank {max_lora_rank}"), format!("start vLLM with --max-lora-rank {need}"));
                }
            }
            Engine::MistralRs if rank > 256 => add(e, Severity::Refused, format!("rank {rank} is above 256"), format!("{merge}, or train with a rank ≤ 256")),
            Engine::LlamaCpp | Engine::Ollama => {
                if a.use_rslora {
                    let fix = "export it with `ft export gguf-lora` (adapter.lora.alpha = α·√r, so llama.cpp's α/r is rsLoRA's α/√r), or serve the merged model".into();
                    add(e, Severity::Changed, format!("rsLoRA ignored: convert_lora_to_gguf.py scales by α/r, so the adapter acts at {:.3}× its strength (1/√{rank})", (rank as f64).sqrt().recip()), fix);
                }
                if a.ranks.len() > 1 || a.alphas.len() > 1 {
                    add(e, Severity::Changed, "rank_pattern / alpha_pattern ignored: every module gets lora_alpha / r".into(), "export it with `ft export gguf-lora` (each module's scale folded into its lora_b), or serve the merged model".into());
                }
                if e == Engine::Ollama {
                    if let Some(t) = &a.base_model_type {
                        if !matches!(t.as_str(), "llama" | "mistral" | "mixtral" | "gemma" | "gemma2") {
                            add(e, Severity::Refused, format!("Ollama imports safetensors adapters only for Llama, Mistral and Gemma models, not {t}"), "give Ollama a GGUF adapter: `ft export ollama --adapter DIR` writes adapter.gguf and the Modelfile".to_string());
                        }
                    }
                    if a.quantized_base {
                        add(e, Severity::Warning, "trained on a 4-bit base (QLoRA): Ollama advises non-quantized adapters".into(), "merge into the full-precision base (`ft merge --base DIR`)".into());
                    }
                }
            }
            _ => {}
        }
    }
    out
}
