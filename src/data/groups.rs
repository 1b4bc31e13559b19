//! Groups of scored completions for `ft eval --objective grpo`: one JSON object per line,
//! `{"prompt": [messages] | "text", "completions": [{"text": str | "completion_ids": [ids],
//! "reward": number | "rewards": {"name": number, ...}, "truncated": bool}, ...]}`. A completion
//! given as text ends with the end-of-turn token unless it is `truncated` (cut at the length
//! limit); given as ids, it is taken as it is.

use std::path::Path;

use serde_json::Value;

use super::conversation::{read_lines, schema, DataError, Location, Message, Record, RecordError, Role};
use super::encode::Encoded;
use super::template::ChatTemplate;
use super::tokenizer::TextTokenizer;

/// One completion of a group.
#[derive(Debug, Clone)]
pub struct GroupCompletion {
    pub text: Option<String>,
    pub ids: Option<Vec<u32>>,
    /// `(reward function, value)`; one `("reward", r)` for a plain `"reward"`.
    pub rewards: Vec<(String, f64)>,
    pub truncated: bool,
}

/// A prompt and its group of completions.
#[derive(Debug, Clone)]
pub struct Group {
    pub prompt: Vec<Message>,
    pub completions: Vec<GroupCompletion>,
    pub at: Location,
}

fn completion(v: &Value, j: usize) -> Result<GroupCompletion, RecordError> {
    let o = v.as_object().ok_or_else(|| schema(format!("completions[{j}] must be an object")))?;
    let text = match o.get("text") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => return Err(schema(format!("completions[{j}].text must be a string"))),
    };
    let ids = match o.get("completion_ids") {
        None | Some(Value::Null) => None,
        Some(Value::Array(a)) => Some(
            a.iter()
                .map(|x| x.as_u64().and_then(|x| u32::try_from(x).ok()).ok_or_else(|| schema(format!("completions[{j}].completion_ids must be token ids"))))
                .collect::<Result<Vec<u32>, _>>()?,
        ),
        Some(_) => return Err(schema(format!("completions[{j}].completion_ids must be a list of token ids"))),
    };
    if text.is_some() == ids.is_some() {
        return Err(schema(format!("completions[{j}] needs exactly one of \"text\" and \"completion_ids\"")));
    }
    let finite = |x: &Value, what: &str| x.as_f64().filter(|x| x.is_finite()).ok_or_else(|| schema(format!("completions[{j}].{what} must be a finite number")));
    let rewards = match (o.get("reward"), o.get("rewards")) {
        (Some(r), None) => vec![("reward".to_string(), finite(r, "reward")?)],
        (None, Some(Value::Object(m))) if !m.is_empty() => m.iter().map(|(k, v)| Ok((k.clone(), finite(v, &format!("rewards.{k}"))?))).collect::<Result<_, RecordError>>()?,
        _ => return Err(schema(format!("completions[{j}] needs \"reward\" (a number) or \"rewards\" (an object of numbers), not both"))),
    };
    let truncated = match o.get("truncated") {
        None => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(schema(format!("completions[{j}].truncated must be true or false"))),
    };
    Ok(GroupCompletion { text, ids, rewards, truncated })
}

/// Parses one line.
pub fn parse_group(line: &str, at: Location) -> Result<Group, RecordError> {
    let record = Record::new(line);
    let v: Value = serde_json::from_str(line).map_err(|e| RecordError::Json(e.to_string()))?;
    let o = v.as_object().ok_or_else(|| schema("expected a JSON object with \"prompt\" and \"completions\""))?;
    let prompt = match o.get("prompt") {
        Some(Value::String(s)) => vec![Message::new(Role::User, s.clone())],
        Some(p @ Value::Array(_)) => super::conversation::parse_messages(p, "prompt", &record)?,
        _ => return Err(schema("\"prompt\" must be a string or a list of messages")),
    };
    let list = o.get("completions").and_then(Value::as_array).filter(|a| !a.is_empty()).ok_or_else(|| schema("\"completions\" must be a non-empty list"))?;
    let completions = list.iter().enumerate().map(|(j, c)| completion(c, j)).collect::<Result<Vec<_>, _>>()?;
    let names = |c: &GroupCompletion| c.rewards.iter().map(|r| r.0.clone()).collect::<Vec<_>>();
    if completions.iter().any(|c| names(c) != names(&completions[0])) {
        return Err(schema("every completion needs the same reward functions"));
    }
    Ok(Group { prompt, completions, at })
}

/// Every group of a data path; groups must be the same size and name the same reward functions.
pub fn read_groups(path: &Path) -> Result<Vec<Group>, DataError> {
    let mut out: Vec<Group> = Vec::new();
    read_lines(path, |at, text| {
        let g = parse_group(text, at.clone()).map_err(|e| e.at(at.clone()))?;
        if let Some(first) = out.first() {
            if g.completions.len() != first.completions.len() {
                return Err(DataError::At { at, msg: format!("{} completions; the first group has {} (GRPO groups are one size)", g.completions.len(), first.completions.len()) });
            }
            if g.completions[0].rewards.iter().map(|r| &r.0).ne(first.completions[0].rewards.iter().map(|r| &r.0)) {
                return Err(DataError::At { at, msg: "other reward functions than the first group's".into() });
            }
        }
        out.push(g);
        Ok(())
    })?;
    if out.is_empty() {
        return Err(DataError::Empty { path: path.into() });
    }
    Ok(out)
}

/// The group's samples: the prompt rendered with the generation prompt, then each completion
/// (scored), and the prompt's length in tokens.
pub fn encode_group(tok: &TextTokenizer, template: &ChatTemplate, g: &Group) -> Result<(Vec<Encoded>, usize), RecordError> {
    let text = template.render(&g.prompt, true).map_err(|e| RecordError::Template(format!("{e:#}")))?;
    let prompt: Vec<u32> = tok.encode(&text).map_err(|e| RecordError::Tokenize(e.to_string()))?.get_ids().to_vec();
    let eos = tok.eos_token.as_deref().and_then(|t| tok.token_id(t));
    let mut out = Vec::with_capacity(g.completions.len());
    for c in &g.completions {
        let ids = match (&c.ids, &c.text) {
            (Some(ids), _) => ids.clone(),
            (None, Some(t)) => {
                let mut ids = tok.encode(t).map_err(|e| RecordError::Tokenize(e.to_string()))?.get_ids().to_vec();
                if !c.truncated {
                    ids.push(eos.ok_or_else(|| RecordError::Tokenize("the tokenizer has no end-of-turn token to end a completion".into()))?);
                }
                ids
            }
            (None, None) => unreachable!("parse_group requires one"),
        };
        if ids.is_empty() {
            return Err(RecordError::NoCompletionTokens);
        }
        let mut mask = vec![0u8; prompt.len()];
        mask.extend(std::iter::repeat_n(1u8, ids.len()));
        out.push(Encoded { text: String::new(), ids: [prompt.clone(), ids].concat(), mask });
    }
    Ok((out, prompt.len()))
}

/// A prompt to sample completions for (GRPO): its messages, the record's other fields (for
/// reward functions) and where it came from.
#[derive(Debug, Clone)]
pub struct PromptRecord {
    pub prompt: Vec<Message>,
    pub fields: serde_json::Map<String, Value>,
    pub tools: Option<minijinja::Value>,
    pub at: Location,
}

/// Every prompt of a data path: `{"prompt": [messages] | "text", ...other fields}` per line, or
/// a conversation `{"messages": [...], ...}` whose messages up to the last user turn are the
/// prompt and whose next assistant reply, if any, becomes the field `reference`.
pub fn read_prompts(path: &Path) -> Result<Vec<PromptRecord>, DataError> {
    let mut out = Vec::new();
    read_lines(path, |at, text| {
        let parse = || -> Result<PromptRecord, RecordError> {
            let record = Record::new(text);
            let v: Value = serde_json::from_str(text).map_err(|e| RecordError::Json(e.to_string()))?;
            let o = v.as_object().ok_or_else(|| schema("expected a JSON object with \"prompt\""))?;
            let mut reference = None;
            let prompt = match (o.get("prompt"), o.get("messages")) {
                (Some(Value::String(s)), _) if !s.trim().is_empty() => vec![Message::new(Role::User, s.clone())],
                (Some(p @ Value::Array(_)), _) => super::conversation::parse_messages(p, "prompt", &record)?,
                (None, Some(m @ Value::Array(_))) => {
                    let mut messages = super::conversation::parse_messages(m, "messages", &record)?;
                    let last_user = messages.iter().rposition(|m| m.role == Role::User).ok_or_else(|| schema("\"messages\" has no user turn to answer"))?;
                    reference = messages.get(last_user + 1).filter(|m| m.role == Role::Assistant).map(|m| m.content.clone());
                    messages.truncate(last_user + 1);
                    messages
                }
                _ => return Err(schema("\"prompt\" must be a non-empty string or a list of messages (or give \"messages\", a conversation)")),
            };
            if prompt.is_empty() || prompt.last().is_some_and(|m| m.role == Role::Assistant) {
                return Err(schema("\"prompt\" must end with a user (or tool) message: the completion is the assistant's reply"));
            }
            let tools = super::conversation::parse_tools(o, &record)?;
            let mut fields: serde_json::Map<String, Value> = o.iter().filter(|(k, _)| !matches!(k.as_str(), "prompt" | "messages")).map(|(k, v)| (k.clone(), v.clone())).collect();
            if let Some(r) = reference {
                fields.entry("reference").or_insert(r.into());
            }
            Ok(PromptRecord { prompt, fields, tools, at: at.clone() })
        };
        out.push(parse().map_err(|e| e.at(at.clone()))?);
        Ok(())
    })?;
    if out.is_empty() {
        return Err(DataError::Empty { path: path.into() });
    }
    Ok(out)
}
