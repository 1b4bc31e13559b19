//! `ft export ollama`: an Ollama model directory — the model as GGUF (`model.gguf`), the LoRA
//! adapter as a GGUF adapter (`adapter.gguf`, Ollama's `ADAPTER`) or merged in, and a
//! `Modelfile` with the stop words of the model's end-of-turn tokens and, for ChatML models, the
//! chat template in Ollama's Go template syntax. Other chat templates are left to Ollama, which
//! picks its template from the GGUF's `tokenizer.chat_template`. `ollama create NAME -f
//! OUT/Modelfile` then builds the model. The directory appears whole or not at all.

use std::path::{Path, PathBuf};

use super::export_gguf::{export, export_lora, GgufType};
use super::ConvertError;
use crate::atomic::StagedDir;
use crate::data::tokenizer::TextTokenizer;
use crate::formats::model_dir::generation_eos_ids;
use crate::model::ModelConfig;

/// What an Ollama export wrote.
#[derive(Debug, serde::Serialize)]
pub struct OllamaReport {
    pub out: PathBuf,
    /// The files in the directory.
    pub files: Vec<String>,
    /// "chatml" (written as TEMPLATE) or "from tokenizer.chat_template" (Ollama's detection).
    pub template: &'static str,
    pub stop: Vec<String>,
    pub warnings: Vec<String>,
}

/// Ollama's ChatML template (Go text/template), for multi-turn chats and plain prompts; Ollama
/// passes the system message as `.System`.
const CHATML: &str = r#"{{- if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ end }}
{{- if .Messages }}
{{- range .Messages }}{{ if ne .Role "system" }}<|im_start|>{{ .Role }}
{{ .Content }}<|im_end|>
{{ end }}{{ end }}<|im_start|>assistant
{{ else }}{{ if .Prompt }}<|im_start|>user
{{ .Prompt }}<|im_end|>
{{ end }}<|im_start|>assistant
{{ end }}{{ .Response }}{{ if .Response }}<|im_end|>{{ end }}"#;

/// Quotes a Modelfile string parameter.
fn quoted(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// Exports `model` (with `adapter` as an Ollama ADAPTER, or merged when `merge`) to `out`.
pub fn export_ollama(model: &Path, adapter: Option<&Path>, merge: bool, out: &Path, ty: GgufType) -> Result<OllamaReport, ConvertError> {
    let c = ModelConfig::from_dir(model)?;
    let tok = TextTokenizer::from_dir(model).map_err(|e| ConvertError::invalid(&model.join("tokenizer.json"), e.to_string()))?;
    let staged = StagedDir::new(out).map_err(|e| ConvertError::invalid(out, e.to_string()))?;
    let mut warnings = Vec::new();
    let mut files = vec!["model.gguf".to_string()];
    let mut modelfile = String::from("FROM ./model.gguf\n");
    match (adapter, merge) {
        (Some(a), false) => {
            // The adapter first: what it cannot be (DoRA, ...) is said before the model is written.
            let r = export_lora(a, model, &staged.path("adapter.gguf"), GgufType::F32).map_err(|e| match e {
                ConvertError::Unsupported { path, msg } => ConvertError::Unsupported { path, msg: format!("{msg} (or pass --merge to bake it into model.gguf)") },
                e => e,
            })?;
            warnings.extend(r.warnings);
            files.push("adapter.gguf".into());
            modelfile.push_str("ADAPTER ./adapter.gguf\n");
            if ty != GgufType::F32 && ty != GgufType::F16 && ty != GgufType::Bf16 {
                warnings.push(format!("the base is {}: llama.cpp applies the adapter to the quantized weights, not the ones it was trained on; a float base (--type f16) or --merge keeps the trained numbers", ty.name()));
            }
            warnings.extend(export(model, None, &staged.path("model.gguf"), ty)?.warnings);
        }
        (a, _) => warnings.extend(export(model, a, &staged.path("model.gguf"), ty)?.warnings),
    }
    let chatml = tok.model_template.as_deref().is_some_and(|t| t.contains("<|im_start|>"));
    let template = if chatml {
        modelfile.push_str(&format!("TEMPLATE \"\"\"{CHATML}\"\"\"\n"));
        "chatml"
    } else {
        "from tokenizer.chat_template"
    };
    // Stop words: the end-of-sequence / end-of-turn tokens as text.
    let mut stop: Vec<String> = Vec::new();
    let ids = c.eos_token_ids.iter().chain(&generation_eos_ids(model)).copied().collect::<Vec<u32>>();
    for id in ids {
        if let Some(t) = tok.id_to_token(id).filter(|_| tok.is_special(id)) {
            if !stop.contains(&t) {
                stop.push(t);
            }
        }
    }
    for t in ["<|im_end|>", "<|im_start|>", "<end_of_turn>", "<|eot_id|>", "<|end|>"] {
        let in_template = tok.model_template.as_deref().is_some_and(|tpl| tpl.contains(t));
        if in_template && tok.token_id(t).is_some() && !stop.iter().any(|s| s == t) {
            stop.push(t.to_string());
        }
    }
    for s in &stop {
        modelfile.push_str(&format!("PARAMETER stop {}\n", quoted(s)));
    }
    let path = staged.path("Modelfile");
    crate::atomic::write_atomic(&path, modelfile.as_bytes()).map_err(|e| ConvertError::invalid(&path, e.to_string()))?;
    files.push("Modelfile".into());
    let out = staged.commit().map_err(|e| ConvertError::invalid(out, e.to_string()))?;
    Ok(OllamaReport { out, files, template, stop, warnings })
}
