//! A Hugging Face tokenizer as llama.cpp's GGUF metadata (`tokenizer.ggml.*` and
//! `tokenizer.chat_template`), the way `convert_hf_to_gguf.py` writes a byte-level BPE
//! ("gpt2") vocabulary: every id below the model's vocab size with its type (normal, control,
//! user-defined, unused padding), the merges, the pre-tokenizer name llama.cpp identifies by
//! hashing the tokenization of a fixed text, the special ids and whether BOS/EOS are added.

use std::path::Path;

use serde_json::Value;
use sha2::{Digest, Sha256};

use super::ConvertError;
use crate::data::tokenizer::TextTokenizer;
use crate::formats::gguf::writer::Meta;

/// llama.cpp's token types.
const NORMAL: i32 = 1;
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;
const UNUSED: i32 = 5;

/// The text whose tokenization identifies a BPE pre-tokenizer (`get_vocab_base_pre` in
/// llama.cpp's converter; the hash is SHA-256 of the Python list of ids).
const CHKTXT: &str = "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u{200d}🌫️ (multiple emojis concatenated) ✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL";

/// Pre-tokenizer hashes of the model families ft trains, as llama.cpp's converter lists them
/// (`tokenizer.ggml.pre` selects llama.cpp's split regex).
const PRE_TOKENIZERS: &[(&str, &str)] = &[
    ("0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5", "llama-bpe"),
    ("855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249", "smollm"),
    ("e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea", "qwen2"),
    ("d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c", "qwen2"),
    ("d30d75d9059f1aa2c19359de71047b3ae408c70875e8a3ccf8c5fba56c9d8af4", "qwen35"),
    ("b3f499bb4255f8ca19fccd664443283318f2fd2414d5e0b040fbdd0cc195d6c5", "deepseek-r1-qwen"),
    ("877081d19cf6996e2c4ff0e1236341e9b7bde288f5311a56a937f0afbbb3aeb5", "deepseek-v3"),
    ("3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454", "gpt-2"),
    ("ccc2ef013c104be7bae2965776d611e1d7a8a2a9c547dd93a682c9a9fc80352e", "gpt-4o"),
    ("fcace8b9cac38ce847670c970cd5892031a753a1ef381abd1d9af00f713da085", "phi-2"),
    ("63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e", "tekken"),
    ("9d032fcbd5501f4a38150912590928bfb36091efb5df11b8e2124b0390e3fb1e", "falcon3"),
    ("35d91631860c815f952d711435f48d356ebac988362536bed955d43bfa436e34", "starcoder"),
    ("b6dc8df998e1cfbdc4eac8243701a65afe638679230920b50d6f17d81c098166", "olmo"),
    ("9c2227e4dd922002fb81bde4fc02b0483ca4f12911410dee2255e4987644e3f8", "command-r"),
    ("d353350c764d8c3b39c763113960e4fb4919bea5fbf208a0e3b22e8469dc7406", "llama4"),
    ("d5f1dd6f980fec569fb218a81a7658ac45fc56b38c5a0adeb1c232fbe04ef5ec", "seed-coder"),
];

/// The vocabulary's metadata and what the export should say about it.
pub struct Vocab {
    pub meta: Vec<(String, Meta)>,
    pub warnings: Vec<String>,
}

fn json(path: &Path) -> Result<Option<Value>, ConvertError> {
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|e| ConvertError::invalid(path, format!("cannot read: {e}")))?;
    serde_json::from_str(&text).map(Some).map_err(|e| ConvertError::invalid(path, format!("invalid JSON: {e}")))
}

/// The token string a `tokenizer_config.json` entry names (a string or `{"content": ...}`).
fn entry_content(v: Option<&Value>) -> Option<&str> {
    match v? {
        Value::String(s) => Some(s),
        Value::Object(o) => o.get("content").and_then(Value::as_str),
        _ => None,
    }
}

/// llama.cpp's converter also treats `<|...|>`-style and `<unused...>` added tokens as control.
fn looks_special(t: &str) -> bool {
    (t.starts_with("<|") && t.ends_with("|>")) || (t.starts_with("<｜") && t.ends_with("｜>")) || (t.starts_with("<unused") && t.ends_with('>'))
}

/// The tokenizer of model directory `dir` with `vocab_size` ids (the embedding's rows).
pub fn vocab(dir: &Path, vocab_size: usize) -> Result<Vocab, ConvertError> {
    let tok_path = dir.join("tokenizer.json");
    let tj = json(&tok_path)?.ok_or_else(|| ConvertError::invalid(&tok_path, "missing: the GGUF needs the model's tokenizer"))?;
    let model = &tj["model"];
    let byte_level = |v: &Value| {
        v["type"] == "ByteLevel" || v["pretokenizers"].as_array().is_some_and(|a| a.iter().any(|p| p["type"] == "ByteLevel"))
    };
    if model["type"] != "BPE" || model["byte_fallback"] == true || !byte_level(&tj["pre_tokenizer"]) {
        return Err(ConvertError::unsupported(
            &tok_path,
            "ft writes byte-level BPE tokenizers (GPT-2 style: Llama 3, Qwen, SmolLM, Phi-4, Mistral Nemo); this one is SentencePiece-style (byte fallback or a Metaspace pre-tokenizer). Export with llama.cpp's convert_hf_to_gguf.py, which reads tokenizer.model",
        ));
    }
    let tok = TextTokenizer::from_dir(dir).map_err(|e| ConvertError::invalid(&tok_path, e.to_string()))?;
    let added = tok.inner.get_added_tokens_decoder();
    let mut tokens = Vec::with_capacity(vocab_size);
    let mut types = Vec::with_capacity(vocab_size);
    let max_id = tok.vocab().last().map_or(0, |(_, id)| *id as usize);
    if max_id >= vocab_size {
        return Err(ConvertError::invalid(&tok_path, format!("holds id {max_id}, past the model's vocab_size {vocab_size}")));
    }
    for i in 0..vocab_size as u32 {
        match (tok.id_to_token(i), added.get(&i)) {
            (None, _) => {
                tokens.push(format!("[PAD{i}]"));
                types.push(UNUSED);
            }
            (Some(t), Some(a)) => {
                types.push(if a.special || looks_special(&t) { CONTROL } else { USER_DEFINED });
                tokens.push(t);
            }
            (Some(t), None) => {
                types.push(NORMAL);
                tokens.push(t);
            }
        }
    }
    let merges: Vec<String> = match model["merges"].as_array() {
        Some(m) => m
            .iter()
            .map(|e| match e {
                Value::String(s) => Some(s.clone()),
                // transformers ≥ 4.45 writes pairs; spaces inside a part become U+0120 as llama.cpp encodes them.
                Value::Array(p) if p.len() == 2 => {
                    let enc = |v: &Value| v.as_str().map(|s| s.replace(' ', "\u{0120}"));
                    Some(format!("{} {}", enc(&p[0])?, enc(&p[1])?))
                }
                _ => None,
            })
            .collect::<Option<_>>()
            .ok_or_else(|| ConvertError::invalid(&tok_path, "model.merges: expected strings or pairs of strings"))?,
        None => Vec::new(),
    };
    let mut warnings = Vec::new();
    // The pre-tokenizer, identified as llama.cpp does.
    let ids = tok.inner.encode(CHKTXT, true).map_err(|e| ConvertError::invalid(&tok_path, e.to_string()))?;
    let listed = format!("[{}]", ids.get_ids().iter().map(u32::to_string).collect::<Vec<_>>().join(", "));
    let hash = hex(&Sha256::digest(listed.as_bytes()));
    let pre = match PRE_TOKENIZERS.iter().find(|(h, _)| *h == hash) {
        Some((_, name)) => name.to_string(),
        None => {
            warnings.push(format!(
                "the tokenizer's pre-tokenizer (hash {hash}) is not one ft knows; tokenizer.ggml.pre = \"gpt-2\" (llama.cpp's GPT-2 split). Check llama.cpp tokenizes like transformers, or convert with llama.cpp's convert_hf_to_gguf.py"
            ));
            "gpt-2".to_string()
        }
    };

    let mut meta = vec![
        ("tokenizer.ggml.model".to_string(), Meta::str("gpt2")),
        ("tokenizer.ggml.pre".to_string(), Meta::Str(pre)),
        ("tokenizer.ggml.tokens".to_string(), Meta::StrArray(tokens)),
        ("tokenizer.ggml.token_type".to_string(), Meta::I32Array(types)),
    ];
    if !merges.is_empty() {
        meta.push(("tokenizer.ggml.merges".to_string(), Meta::StrArray(merges)));
    }

    // Special ids: tokenizer_config's token strings (as added tokens), then config.json's ids.
    let tc = json(&dir.join("tokenizer_config.json"))?.unwrap_or(Value::Null);
    let config = json(&dir.join("config.json"))?.unwrap_or(Value::Null);
    let added_list = tj["added_tokens"].as_array().cloned().unwrap_or_default();
    let mut ids: Vec<(&str, u32)> = Vec::new();
    for typ in ["bos", "eos", "unk", "sep", "pad", "mask"] {
        let from_tc = entry_content(tc.get(format!("{typ}_token"))).and_then(|c| {
            added_list.iter().find(|a| a["content"] == c).and_then(|a| a["id"].as_u64())
        });
        let from_config = config.get(format!("{typ}_token_id")).and_then(Value::as_u64);
        if let Some(id) = from_tc.or(from_config).filter(|&id| (id as usize) < vocab_size) {
            ids.push((typ, id as u32));
        }
    }
    // Whether BOS/EOS are added: the post-processor first (ByteLevel: neither; a template: its
    // first/last special tokens), then tokenizer_config's add_*_token.
    let (mut add_bos, mut add_eos) = (None, None);
    let pp = &tj["post_processor"];
    let processors: Vec<&Value> = match pp["processors"].as_array() {
        Some(a) => a.iter().collect(),
        None if !pp.is_null() => vec![pp],
        None => vec![],
    };
    let bos_str = entry_content(tc.get("bos_token"));
    let eos_str = entry_content(tc.get("eos_token"));
    for p in processors {
        match p["type"].as_str() {
            Some("ByteLevel") => {
                add_bos.get_or_insert(false);
                add_eos.get_or_insert(false);
            }
            Some("TemplateProcessing") => {
                let single = p["single"].as_array().cloned().unwrap_or_default();
                if single.len() > 1 {
                    let special = |v: &Value| v["SpecialToken"]["id"].as_str().map(String::from);
                    if let Some(first) = special(&single[0]) {
                        add_bos = Some(Some(first.as_str()) == bos_str);
                    }
                    if let Some(last) = special(&single[single.len() - 1]) {
                        add_eos = Some(Some(last.as_str()) == eos_str);
                    }
                }
            }
            _ => {}
        }
    }
    for (typ, slot) in [("bos", &mut add_bos), ("eos", &mut add_eos)] {
        if slot.is_none() {
            *slot = tc.get(format!("add_{typ}_token")).and_then(Value::as_bool);
        }
    }
    for (typ, id) in &ids {
        // gguf's key names (llama.cpp spells the separator "seperator").
        let key = match *typ {
            "unk" => "unknown",
            "sep" => "seperator",
            "pad" => "padding",
            t => t,
        };
        meta.push((format!("tokenizer.ggml.{key}_token_id"), Meta::U32(*id)));
    }
    for (typ, v) in [("bos", add_bos), ("eos", add_eos)] {
        if let Some(v) = v {
            meta.push((format!("tokenizer.ggml.add_{typ}_token"), Meta::Bool(v)));
        }
    }
    if let Some(t) = &tok.model_template {
        meta.push(("tokenizer.chat_template".to_string(), Meta::Str(t.clone())));
    }
    Ok(Vocab { meta, warnings })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
