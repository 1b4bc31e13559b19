//! The model's text side: `tokenizer.json`, the special tokens named in `tokenizer_config.json`,
//! and the chat template (`tokenizer_config.json` `chat_template`, else `chat_template.jinja`,
//! else built-in ChatML).

use std::path::{Path, PathBuf};

use serde_json::Value;

use super::template::ChatTemplate;
use crate::formats::model_dir::token_str;

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("{path}: cannot load tokenizer: {msg} (expected a Hugging Face tokenizer.json)")]
    Load { path: PathBuf, msg: String },
    #[error("{path}: {msg}")]
    Config { path: PathBuf, msg: String },
    #[error("{path}: chat template does not compile: {msg}")]
    Template { path: PathBuf, msg: String },
    #[error("tokenizing failed: {0}")]
    Encode(String),
}

/// Which chat template to render conversations with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TemplateChoice {
    /// The model's own template (falls back to ChatML when it has none).
    Model,
    /// ft's built-in ChatML template.
    Chatml,
}

/// Tokenizer plus the model's special tokens and chat template.
pub struct TextTokenizer {
    pub inner: tokenizers::Tokenizer,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    /// `tokenizer_config.json`'s `pad_token`, if it names one.
    pub pad_token: Option<String>,
    /// The model's own template, if it has one.
    pub model_template: Option<String>,
    pub dir: PathBuf,
}

impl TextTokenizer {
    pub fn from_dir(dir: &Path) -> Result<Self, TokenizerError> {
        let tpath = dir.join("tokenizer.json");
        let inner = tokenizers::Tokenizer::from_file(&tpath)
            .map_err(|e| TokenizerError::Load { path: tpath.clone(), msg: e.to_string() })?;
        let cpath = dir.join("tokenizer_config.json");
        let cfg: Value = if cpath.exists() {
            let text = std::fs::read_to_string(&cpath).map_err(|e| TokenizerError::Config { path: cpath.clone(), msg: e.to_string() })?;
            serde_json::from_str(&text).map_err(|e| TokenizerError::Config { path: cpath.clone(), msg: format!("invalid JSON: {e}") })?
        } else {
            Value::Null
        };
        let mut model_template = match cfg.get("chat_template") {
            Some(Value::String(s)) => Some(s.clone()),
            // A list of named templates: take "default".
            Some(Value::Array(a)) => a
                .iter()
                .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                .and_then(|t| t.get("template").and_then(Value::as_str).map(String::from)),
            _ => None,
        };
        let jinja = dir.join("chat_template.jinja");
        if model_template.is_none() && jinja.exists() {
            model_template = Some(std::fs::read_to_string(&jinja).map_err(|e| TokenizerError::Config { path: jinja, msg: e.to_string() })?);
        }
        Ok(TextTokenizer {
            inner,
            bos_token: token_str(cfg.get("bos_token")),
            eos_token: token_str(cfg.get("eos_token")),
            pad_token: token_str(cfg.get("pad_token")),
            model_template,
            dir: dir.into(),
        })
    }

    /// The chat template to use for `choice`.
    pub fn template(&self, choice: TemplateChoice) -> Result<ChatTemplate, TokenizerError> {
        let bos = self.bos_token.as_deref().unwrap_or("");
        let eos = self.eos_token.as_deref().unwrap_or("");
        match (choice, &self.model_template) {
            (TemplateChoice::Model, Some(src)) => ChatTemplate::new(src, bos, eos).map_err(|e| TokenizerError::Template {
                path: self.dir.join("tokenizer_config.json"),
                msg: format!("{e:#}"),
            }),
            _ => Ok(ChatTemplate::chatml(bos, eos)),
        }
    }

    /// Token ids of `text`, tokenized as a whole, with no special tokens added (chat templates
    /// write their own BOS, so none is doubled).
    pub fn encode(&self, text: &str) -> Result<tokenizers::Encoding, TokenizerError> {
        self.inner.encode(text, false).map_err(|e| TokenizerError::Encode(e.to_string()))
    }

    /// The padding token's id (`pad_token`), if the tokenizer names one it knows.
    pub fn pad_token_id(&self) -> Option<u32> {
        self.pad_token.as_deref().and_then(|t| self.inner.token_to_id(t))
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String, TokenizerError> {
        self.inner.decode(ids, false).map_err(|e| TokenizerError::Encode(e.to_string()))
    }

    /// The vocabulary string of `id` (byte-level BPE spelling, e.g. `Ġthe`).
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Every token of the vocabulary (added tokens included) with its id, by id.
    pub fn vocab(&self) -> Vec<(String, u32)> {
        let mut v: Vec<(String, u32)> = self.inner.get_vocab(true).into_iter().collect();
        v.sort_by_key(|(_, id)| *id);
        v
    }

    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Whether `id` is a special added token (`<|im_end|>`, `<|eot_id|>`, ...).
    pub fn is_special(&self, id: u32) -> bool {
        self.inner.get_added_tokens_decoder().get(&id).map(|t| t.special).unwrap_or(false)
    }
}
