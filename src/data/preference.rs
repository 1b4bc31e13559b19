//! Preference pairs for DPO, one JSON object per line, in TRL's two spellings:
//! conversational `{"prompt": [messages], "chosen": [messages], "rejected": [messages]}` and the
//! string form `{"prompt": str, "chosen": str, "rejected": str}` (read as one user turn and one
//! assistant turn, so the chat template applies as it does for the conversational form).
//!
//! A side is encoded as the whole conversation `prompt + completion`, rendered and tokenized once;
//! its scored positions are the completion's assistant tokens (content and closing end-of-turn
//! token), found the same way as SFT masks. Assistant turns inside the prompt are never scored.

use std::path::Path;

use serde_json::Value;

use super::conversation::{parse_messages, parse_tools, read_lines, schema, DataError, Location, Message, Record, RecordError, Role};
use super::encode::{encode_chat, Encoded};
use super::template::ChatTemplate;
use super::tokenizer::TextTokenizer;

/// One preference pair and its source line.
#[derive(Debug, Clone)]
pub struct PreferencePair {
    pub prompt: Vec<Message>,
    pub chosen: Vec<Message>,
    pub rejected: Vec<Message>,
    /// The record's `tools`, given to the chat template.
    pub tools: Option<minijinja::Value>,
    /// The record's `margin` (reward models: how much more the chosen side should score).
    pub margin: Option<f64>,
    pub at: Location,
}

fn side(o: &serde_json::Map<String, Value>, key: &str, role: Role, record: &Record) -> Result<Vec<Message>, RecordError> {
    let v = o.get(key).ok_or_else(|| schema(format!("a preference record needs \"prompt\", \"chosen\" and \"rejected\"; \"{key}\" is missing")))?;
    let msgs = match v {
        Value::String(s) => vec![Message::new(role, s.clone())],
        Value::Array(_) => parse_messages(v, key, record)?,
        _ => return Err(schema(format!("\"{key}\" must be a string or a list of messages"))),
    };
    if msgs.is_empty() {
        return Err(schema(format!("\"{key}\" is empty")));
    }
    Ok(msgs)
}

/// True when a JSON record looks like a preference pair (has `chosen` and `rejected`).
pub fn is_preference(v: &Value) -> bool {
    v.get("chosen").is_some() && v.get("rejected").is_some()
}

/// Parses one JSONL line (from `at`) into a pair.
pub fn parse_pair(line: &str, at: Location) -> Result<PreferencePair, RecordError> {
    let record = Record::new(line);
    let v: Value = serde_json::from_str(line).map_err(|e| RecordError::Json(e.to_string()))?;
    let o = v.as_object().ok_or_else(|| schema("expected a JSON object with \"prompt\", \"chosen\" and \"rejected\""))?;
    let prompt = side(o, "prompt", Role::User, &record)?;
    let chosen = side(o, "chosen", Role::Assistant, &record)?;
    let rejected = side(o, "rejected", Role::Assistant, &record)?;
    for (name, s) in [("chosen", &chosen), ("rejected", &rejected)] {
        if !s.iter().any(|m| m.role == Role::Assistant) {
            return Err(schema(format!("\"{name}\" has no assistant message to score")));
        }
        if s.iter().filter(|m| m.role == Role::Assistant).all(|m| m.content.is_empty() && m.tool_calls().is_none()) {
            return Err(schema(format!("\"{name}\" is an empty completion")));
        }
    }
    let tools = parse_tools(o, &record)?;
    let margin = match o.get("margin") {
        None | Some(Value::Null) => None,
        Some(m) => Some(m.as_f64().filter(|m| m.is_finite()).ok_or_else(|| schema(format!("\"margin\" must be a number, not {m}")))?),
    };
    Ok(PreferencePair { prompt, chosen, rejected, tools, margin, at })
}

/// Reads every pair of a JSONL file (plain or `.gz`); the first bad line is an error naming
/// `file:line`.
pub fn read_preferences(path: &Path) -> Result<Vec<PreferencePair>, DataError> {
    let mut out = Vec::new();
    read_lines(path, |at, text| {
        out.push(parse_pair(text, at.clone()).map_err(|e| e.at(at))?);
        Ok(())
    })?;
    if out.is_empty() {
        return Err(DataError::Empty { path: path.into() });
    }
    Ok(out)
}

/// One row of unpaired feedback (TRL's KTO format): a prompt, a completion and whether the
/// completion is desirable.
#[derive(Debug, Clone)]
pub struct UnpairedRow {
    pub prompt: Vec<Message>,
    pub completion: Vec<Message>,
    pub label: bool,
    pub tools: Option<minijinja::Value>,
    pub at: Location,
}

/// True when a JSON record is a KTO row (has `completion` and `label`).
pub fn is_unpaired(v: &Value) -> bool {
    v.get("completion").is_some() && v.get("label").is_some()
}

/// Parses one JSONL line in TRL's unpaired format `{"prompt", "completion", "label": bool}`
/// (conversational or strings).
pub fn parse_unpaired(line: &str, at: Location) -> Result<UnpairedRow, RecordError> {
    let record = Record::new(line);
    let v: Value = serde_json::from_str(line).map_err(|e| RecordError::Json(e.to_string()))?;
    let o = v.as_object().ok_or_else(|| schema("expected a JSON object with \"prompt\", \"completion\" and \"label\""))?;
    let label = match o.get("label") {
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(schema("\"label\" must be true (desirable) or false (undesirable)")),
        None => return Err(schema("an unpaired record needs \"prompt\", \"completion\" and \"label\"; \"label\" is missing")),
    };
    let prompt = side(o, "prompt", Role::User, &record)?;
    let completion = side(o, "completion", Role::Assistant, &record)?;
    if !completion.iter().any(|m| m.role == Role::Assistant && (!m.content.is_empty() || m.tool_calls().is_some())) {
        return Err(schema("\"completion\" has no assistant message to score"));
    }
    let tools = parse_tools(o, &record)?;
    Ok(UnpairedRow { prompt, completion, label, tools, at })
}

/// How many records TRL's `unpair_preference_dataset` unpairs at once (`datasets.map`'s batch):
/// within each block, every chosen completion (label true) comes before every rejected one.
pub const UNPAIR_BLOCK: usize = 1000;

/// The rows of a data path for KTO: TRL's unpaired records as they are, or preference pairs
/// unpaired as TRL does it (per block of [`UNPAIR_BLOCK`] pairs: the chosen rows, then the
/// rejected ones). A file mixing the two formats is an error naming the first odd line.
pub fn read_unpaired(path: &Path) -> Result<Vec<UnpairedRow>, DataError> {
    let (mut rows, mut pairs) = (Vec::new(), Vec::new());
    read_lines(path, |at, text| {
        let paired = serde_json::from_str::<Value>(text).map(|v| is_preference(&v)).unwrap_or(false);
        if paired {
            if !rows.is_empty() {
                return Err(DataError::At { at, msg: "a preference pair among unpaired rows: use one format per dataset".into() });
            }
            pairs.push(parse_pair(text, at.clone()).map_err(|e| e.at(at))?);
        } else {
            if !pairs.is_empty() {
                return Err(DataError::At { at, msg: "an unpaired row among preference pairs: use one format per dataset".into() });
            }
            rows.push(parse_unpaired(text, at.clone()).map_err(|e| e.at(at))?);
        }
        Ok(())
    })?;
    for block in pairs.chunks(UNPAIR_BLOCK) {
        for label in [true, false] {
            for p in block {
                let completion = if label { p.chosen.clone() } else { p.rejected.clone() };
                rows.push(UnpairedRow { prompt: p.prompt.clone(), completion, label, tools: p.tools.clone(), at: p.at.clone() });
            }
        }
    }
    if rows.is_empty() {
        return Err(DataError::Empty { path: path.into() });
    }
    Ok(rows)
}

/// Encodes `prompt + completion` (rendered with `tools`): the completion's assistant tokens are
/// scored, the prompt's never.
pub fn encode_completion(tok: &TextTokenizer, template: &ChatTemplate, prompt: &[Message], completion: &[Message], tools: Option<&minijinja::Value>) -> Result<Encoded, RecordError> {
    let mut msgs: Vec<Message> = prompt.iter().map(|m| Message { train: false, ..m.clone() }).collect();
    msgs.extend(completion.iter().map(|m| Message { train: m.role == Role::Assistant, ..m.clone() }));
    let e = encode_chat(tok, template, &msgs, tools)?;
    if e.trainable() == 0 {
        return Err(RecordError::NoCompletionTokens);
    }
    Ok(e)
}

/// A tokenized pair: both sides share the prompt.
#[derive(Debug, Clone)]
pub struct EncodedPair {
    pub chosen: Encoded,
    pub rejected: Encoded,
    /// Tokens before the first scored token of `chosen` (the rendered prompt).
    pub prompt_len: usize,
    /// The record's `margin` (0 without one): reward models' target score difference.
    pub margin: f64,
}

fn encode_side(tok: &TextTokenizer, template: &ChatTemplate, pair: &PreferencePair, completion: &[Message]) -> Result<Encoded, RecordError> {
    let mut msgs: Vec<Message> = pair.prompt.iter().map(|m| Message { train: false, ..m.clone() }).collect();
    msgs.extend(completion.iter().map(|m| Message { train: m.role == Role::Assistant, ..m.clone() }));
    encode_chat(tok, template, &msgs, pair.tools.as_ref())
}

/// Encodes a pair. With `max_prompt_len`, a longer prompt loses tokens from its start (TRL's
/// `keep_end`), the same tokens on both sides.
pub fn encode_pair(
    tok: &TextTokenizer,
    template: &ChatTemplate,
    pair: &PreferencePair,
    max_prompt_len: Option<usize>,
) -> Result<EncodedPair, RecordError> {
    let mut chosen = encode_side(tok, template, pair, &pair.chosen)?;
    let mut rejected = encode_side(tok, template, pair, &pair.rejected)?;
    let first = |e: &Encoded| e.mask.iter().position(|&m| m == 1);
    let (Some(pc), Some(pr)) = (first(&chosen), first(&rejected)) else {
        return Err(RecordError::NoCompletionTokens);
    };
    // The shared prompt is the common token prefix up to the first scored token.
    let prompt_len = pc.min(pr);
    if let Some(limit) = max_prompt_len {
        if prompt_len > limit {
            let cut = prompt_len - limit;
            for e in [&mut chosen, &mut rejected] {
                e.ids.drain(..cut);
                e.mask.drain(..cut);
            }
            return Ok(EncodedPair { chosen, rejected, prompt_len: limit, margin: pair.margin.unwrap_or(0.0) });
        }
    }
    Ok(EncodedPair { chosen, rejected, prompt_len, margin: pair.margin.unwrap_or(0.0) })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(line: &str) -> Result<PreferencePair, RecordError> {
        parse_pair(line, Location { file: "t.jsonl".into(), line: 1 })
    }

    #[test]
    fn both_spellings_parse() {
        let p = parse(r#"{"prompt": "q", "chosen": "a", "rejected": "b"}"#).unwrap();
        assert_eq!((p.prompt[0].role, p.chosen[0].role, p.rejected[0].content.as_str()), (Role::User, Role::Assistant, "b"));
        let p = parse(
            r#"{"prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}], "chosen": [{"role": "assistant", "content": "a"}], "rejected": [{"role": "assistant", "content": "b"}]}"#,
        )
        .unwrap();
        assert_eq!((p.prompt.len(), p.chosen[0].content.as_str()), (2, "a"));
    }

    #[test]
    fn bad_pairs_are_errors() {
        let cases = [
            (r#"{"prompt": "q", "chosen": "a"}"#, "\"rejected\" is missing"),
            (r#"{"prompt": "q", "chosen": "", "rejected": "b"}"#, "empty completion"),
            (r#"{"prompt": "q", "chosen": 3, "rejected": "b"}"#, "string or a list"),
            (r#"{"prompt": "q", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"}"#, "no assistant message"),
            (r#"{"prompt": "q", "chosen": [], "rejected": "b"}"#, "\"chosen\" is empty"),
        ];
        for (line, want) in cases {
            let e = parse(line).unwrap_err().to_string();
            assert!(e.contains(want), "{line}: {e}");
        }
    }
}
