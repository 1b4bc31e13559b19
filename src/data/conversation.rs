//! Conversations in ChatML JSONL: one `{"messages": [{"role", "content"}, ...]}` per line (also
//! ShareGPT's `{"conversations": [{"from", "value"}]}`). Every problem is reported with its
//! `file:line`. A data path is a file (`.jsonl` or `.jsonl.gz`), a directory (its `*.jsonl` and
//! `*.jsonl.gz` files, sorted) or a glob pattern (`data/part-*.jsonl`).

use std::fmt;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use serde_json::Value;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    User,
    Assistant,
    Tool,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
            Role::Tool => "tool",
        }
    }

    fn parse(s: &str) -> Option<Role> {
        Some(match s {
            "system" => Role::System,
            "user" | "human" => Role::User,
            "assistant" | "gpt" => Role::Assistant,
            "tool" => Role::Tool,
            _ => return None,
        })
    }
}

/// One chat message.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    pub role: Role,
    /// The text; empty when the record has none (an assistant turn of only `tool_calls`).
    pub content: String,
    /// `false` excludes an assistant turn from the loss.
    pub train: bool,
    /// The record's other keys of this message (`tool_calls`, `name`, `tool_call_id`,
    /// `reasoning_content`, …; `content` when it is null), in the record's order. The chat template
    /// sees them as transformers passes them.
    pub extra: Vec<(String, minijinja::Value)>,
}

impl Message {
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        Message { role, content: content.into(), train: true, extra: Vec::new() }
    }

    /// The message's `tool_calls`, when it has any.
    pub fn tool_calls(&self) -> Option<&minijinja::Value> {
        self.extra.iter().find(|(k, v)| k == "tool_calls" && !v.is_none()).map(|(_, v)| v)
    }

    /// The message as the chat template sees it: `role`, `content`, then the other keys; a
    /// reasoning field (`reasoning_content`, `thinking`, `reasoning`) is also given as `thinking`
    /// and `reasoning_content`, as transformers 5 aliases them.
    pub fn template_value(&self) -> minijinja::Value {
        let mut map: Vec<(String, minijinja::Value)> = Vec::new();
        let mut insert = |k: &str, v: minijinja::Value| match map.iter_mut().find(|(n, _)| n == k) {
            Some(slot) => slot.1 = v,
            None => map.push((k.to_string(), v)),
        };
        let reasoning = ["reasoning_content", "thinking", "reasoning"]
            .iter()
            .find_map(|f| self.extra.iter().find(|(k, v)| k == f && !v.is_none()).map(|(_, v)| v.clone()));
        if let Some(r) = &reasoning {
            insert("thinking", r.clone());
        }
        insert("role", minijinja::Value::from(self.role.as_str()));
        insert("content", minijinja::Value::from(self.content.as_str()));
        for (k, v) in &self.extra {
            insert(k, v.clone());
        }
        if let Some(r) = reasoning {
            insert("reasoning_content", r);
        }
        minijinja::Value::from_iter(map)
    }
}

/// Where a record came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    pub file: PathBuf,
    pub line: usize,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.file.display(), self.line)
    }
}

/// A data error at a location.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("cannot read {path}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{at}: {msg}")]
    At { at: Location, msg: String },
    #[error("{at}: {error}")]
    Record { at: Location, error: RecordError },
    #[error("{count} bad line(s); the first: {first}")]
    Invalid { count: usize, first: String },
    #[error("{}: no records (the data is empty)", path.display())]
    Empty { path: PathBuf },
}

/// What is wrong with one record (a JSONL line); [`DataError::Record`] adds where it is.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RecordError {
    #[error("invalid JSON: {0}")]
    Json(String),
    /// The record's structure: a missing key, a wrong type, an empty message, a role order.
    #[error("{0}")]
    Schema(String),
    #[error("chat template: {0}")]
    Template(String),
    #[error("tokenizing failed: {0}")]
    Tokenize(String),
    #[error("assistant message {0} does not appear verbatim in the rendered text; the chat template changes it")]
    NotVerbatim(usize),
    #[error("a completion has no tokens to score")]
    NoCompletionTokens,
}

impl RecordError {
    /// This problem at `at`.
    pub fn at(self, at: Location) -> DataError {
        DataError::Record { at, error: self }
    }
}

/// A schema problem of a record.
pub(crate) fn schema(msg: impl Into<String>) -> RecordError {
    RecordError::Schema(msg.into())
}

/// A conversation and its source line.
#[derive(Debug, Clone)]
pub struct Conversation {
    pub messages: Vec<Message>,
    /// The record's `tools` (JSON schemas of callable functions), given to the chat template.
    pub tools: Option<minijinja::Value>,
    pub at: Location,
}

/// A parsed record: its messages and `tools`.
#[derive(Debug, Clone)]
pub struct Chat {
    pub messages: Vec<Message>,
    pub tools: Option<minijinja::Value>,
}

/// One JSONL record, parsed for checking (`serde_json`) and, only when a message has keys beyond
/// `role`/`content`/`train` or the record has `tools`, once more in the record's key order for
/// the chat template (JSON objects are ordered for Python, and templates print them).
pub(crate) struct Record<'a> {
    line: &'a str,
    ordered: std::cell::OnceCell<minijinja::Value>,
}

impl<'a> Record<'a> {
    pub(crate) fn new(line: &'a str) -> Self {
        Record { line, ordered: std::cell::OnceCell::new() }
    }

    /// The value at `path` (keys and list indices) in the record's order.
    fn ordered(&self, path: &[minijinja::Value]) -> minijinja::Value {
        let mut v = self.ordered.get_or_init(|| serde_json::from_str(self.line).unwrap_or_default()).clone();
        for p in path {
            v = v.get_item(p).unwrap_or_default();
        }
        v
    }
}

/// The function name of a tool schema or tool call (`{"function": {"name": …}}` or `{"name": …}`).
pub fn function_name(v: &Value) -> Option<&str> {
    v.get("function").and_then(|f| f.get("name")).or_else(|| v.get("name")).and_then(Value::as_str)
}

/// The function names of a template value holding tools or tool calls.
pub fn function_names(v: &minijinja::Value) -> Vec<String> {
    let json: Value = serde_json::to_value(v).unwrap_or_default();
    json.as_array().into_iter().flatten().filter_map(function_name).map(str::to_string).collect()
}

/// Checks a `tools` list or a message's `tool_calls`: a list of objects that each name a function.
fn check_functions(v: &Value, what: &str) -> Result<(), RecordError> {
    let items = v.as_array().ok_or_else(|| schema(format!("{what} must be a list")))?;
    for (j, item) in items.iter().enumerate() {
        if !item.is_object() || function_name(item).is_none() {
            return Err(schema(format!("{what}[{j}] must be an object naming its function ({{\"function\": {{\"name\": ...}}}})")));
        }
    }
    Ok(())
}

pub(crate) fn parse_messages(v: &Value, key: &str, record: &Record) -> Result<Vec<Message>, RecordError> {
    let arr = v
        .as_array()
        .ok_or_else(|| schema(format!("\"{key}\" must be a list of messages")))?;
    let sharegpt = key == "conversations";
    let (role_key, content_key) = if sharegpt { ("from", "value") } else { ("role", "content") };
    let mut out = Vec::with_capacity(arr.len());
    for (i, m) in arr.iter().enumerate() {
        let o = m.as_object().ok_or_else(|| schema(format!("{key}[{i}] must be an object")))?;
        let role = o
            .get(role_key)
            .ok_or_else(|| schema(format!("{key}[{i}] has no \"{role_key}\"")))?
            .as_str()
            .ok_or_else(|| schema(format!("{key}[{i}].{role_key} must be a string")))?;
        let role = Role::parse(role)
            .ok_or_else(|| schema(format!("{key}[{i}] has unknown role {role:?} (expected system, user, assistant or tool)")))?;
        let tool_calls = o.get("tool_calls").filter(|v| !v.is_null() && !sharegpt);
        if let Some(tc) = tool_calls {
            if role != Role::Assistant {
                return Err(schema(format!("{key}[{i}] has tool_calls, but only an assistant message can call tools")));
            }
            check_functions(tc, &format!("{key}[{i}].tool_calls"))?;
        }
        let calls = tool_calls.and_then(Value::as_array).is_some_and(|a| !a.is_empty());
        let content = match o.get(content_key) {
            Some(Value::String(s)) => s.clone(),
            None | Some(Value::Null) if calls => String::new(),
            None => return Err(schema(format!("{key}[{i}] has no \"{content_key}\""))),
            Some(_) => return Err(schema(format!("{key}[{i}].{content_key} must be a string"))),
        };
        let train = match o.get("train") {
            None => true,
            Some(Value::Bool(b)) => *b,
            Some(_) => return Err(schema(format!("{key}[{i}].train must be true or false"))),
        };
        let mut extra = Vec::new();
        let plain = |k: &str| matches!(k, "role" | "train") || (k == "content" && o[k].is_string());
        if !sharegpt && o.keys().any(|k| !plain(k)) {
            let at = [minijinja::Value::from(key), minijinja::Value::from(i)];
            let ordered = record.ordered(&at);
            for k in ordered.try_iter().into_iter().flatten() {
                let name = k.as_str().unwrap_or_default().to_string();
                if !plain(&name) {
                    extra.push((name, ordered.get_item(&k).unwrap_or_default()));
                }
            }
            if !o.contains_key("content") {
                extra.push(("content".into(), minijinja::Value::UNDEFINED));
            }
        }
        out.push(Message { role, content, train, extra });
    }
    Ok(out)
}

/// The record's `tools`, checked, in the record's order.
pub(crate) fn parse_tools(o: &serde_json::Map<String, Value>, record: &Record) -> Result<Option<minijinja::Value>, RecordError> {
    match o.get("tools") {
        None | Some(Value::Null) => Ok(None),
        Some(t) => {
            check_functions(t, "tools")?;
            Ok(Some(record.ordered(&[minijinja::Value::from("tools")])))
        }
    }
}

/// Parses one JSONL line into messages and tools.
pub fn parse_line(line: &str) -> Result<Chat, RecordError> {
    let record = Record::new(line);
    let v: Value = serde_json::from_str(line).map_err(|e| RecordError::Json(e.to_string()))?;
    let o = v.as_object().ok_or_else(|| schema("expected a JSON object with \"messages\""))?;
    let msgs = if let Some(m) = o.get("messages") {
        parse_messages(m, "messages", &record)?
    } else if let Some(m) = o.get("conversations") {
        parse_messages(m, "conversations", &record)?
    } else {
        return Err(schema("expected a \"messages\" key (ChatML) or \"conversations\" (ShareGPT)"));
    };
    if msgs.is_empty() {
        return Err(schema("the conversation has no messages"));
    }
    if let Some(i) = msgs.iter().position(|m| m.content.trim().is_empty() && m.tool_calls().is_none()) {
        return Err(schema(format!("message {i} ({}) has empty content", msgs[i].role.as_str())));
    }
    if let Some(i) = msgs.iter().skip(1).position(|m| m.role == Role::System) {
        return Err(schema(format!("wrong role order: message {} is a system message; a system message may only come first", i + 1)));
    }
    if !msgs.iter().any(|m| m.role == Role::Assistant) {
        return Err(schema("the conversation has no assistant turn, so there is nothing to learn or score"));
    }
    let tools = parse_tools(o, &record)?;
    Ok(Chat { messages: msgs, tools })
}

/// The files a data path names: the file itself, a directory's `*.jsonl`/`*.jsonl.gz` files, or
/// a glob's matches, sorted. Naming nothing is an error.
pub fn expand_data_path(path: &Path) -> Result<Vec<PathBuf>, DataError> {
    let io = |source| DataError::Io { path: path.into(), source };
    let is_data = |p: &Path| {
        let n = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
        n.ends_with(".jsonl") || n.ends_with(".jsonl.gz")
    };
    let files: Vec<PathBuf> = if path.is_dir() {
        let mut v = Vec::new();
        for e in std::fs::read_dir(path).map_err(io)? {
            let p = e.map_err(io)?.path();
            if p.is_file() && is_data(&p) {
                v.push(p);
            }
        }
        v.sort();
        v
    } else if path.to_str().is_some_and(|s| s.contains(['*', '?', '['])) && !path.exists() {
        let pattern = path.to_str().unwrap_or_default();
        let paths = glob::glob(pattern).map_err(|e| DataError::At {
            at: Location { file: path.into(), line: 0 },
            msg: format!("bad glob pattern: {e}"),
        })?;
        let mut v: Vec<PathBuf> = paths.filter_map(Result::ok).filter(|p| p.is_file()).collect();
        v.sort();
        v
    } else {
        return Ok(vec![path.into()]);
    };
    if files.is_empty() {
        return Err(io(std::io::Error::new(std::io::ErrorKind::NotFound, "no .jsonl or .jsonl.gz files there")));
    }
    Ok(files)
}

/// The longest record (JSONL line) ft reads: 4 MiB, about a million tokens of English, beyond any
/// training length in use. A longer line is refused with its `file:line` before it is held in
/// memory whole. (Tokenizing takes about 150 bytes per token, so a record's text costs up to
/// ~170× its size while it is tokenized: this limit bounds that to well under a gigabyte.)
pub const MAX_RECORD_BYTES: usize = 4 << 20;

/// Calls `f` with every non-blank line (raw bytes, without the newline) of the files `path`
/// names, gzip-decompressed for `.gz`, with its location. A line longer than
/// [`MAX_RECORD_BYTES`] is an error.
pub fn read_raw_lines(path: &Path, mut f: impl FnMut(Location, &[u8]) -> Result<(), DataError>) -> Result<(), DataError> {
    for file in expand_data_path(path)? {
        let io = |source| DataError::Io { path: file.clone(), source };
        let raw = std::fs::File::open(&file).map_err(io)?;
        let reader: Box<dyn Read> = if file.extension().is_some_and(|e| e == "gz") {
            Box::new(flate2::read::MultiGzDecoder::new(raw))
        } else {
            Box::new(raw)
        };
        let mut reader = BufReader::new(reader);
        let mut buf = Vec::new();
        for i in 0.. {
            buf.clear();
            let n = (&mut reader).take(MAX_RECORD_BYTES as u64 + 2).read_until(b'\n', &mut buf).map_err(io)?;
            if n == 0 {
                break;
            }
            let bytes = buf.strip_suffix(b"\n").unwrap_or(&buf);
            let bytes = bytes.strip_suffix(b"\r").unwrap_or(bytes);
            if bytes.len() > MAX_RECORD_BYTES {
                let msg = format!("the line is longer than {} MiB, ft's limit for one record", MAX_RECORD_BYTES >> 20);
                return Err(DataError::At { at: Location { file: file.clone(), line: i + 1 }, msg });
            }
            // A UTF-8 byte-order mark (some editors write one) is not part of the first record.
            let bytes = if i == 0 { bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes) } else { bytes };
            if bytes.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            f(Location { file: file.clone(), line: i + 1 }, bytes)?;
        }
    }
    Ok(())
}

/// [`read_raw_lines`] as text: invalid UTF-8 is a located error.
pub fn read_lines(path: &Path, mut f: impl FnMut(Location, &str) -> Result<(), DataError>) -> Result<(), DataError> {
    read_raw_lines(path, |at, bytes| {
        let text = std::str::from_utf8(bytes).map_err(|e| DataError::At { at: at.clone(), msg: format!("invalid UTF-8: {e}") })?;
        f(at, text)
    })
}

/// Reads every conversation of a data path; the first bad line is an error naming `file:line`,
/// and a path without any record is an error too.
pub fn read_jsonl(path: &Path) -> Result<Vec<Conversation>, DataError> {
    let mut out = Vec::new();
    read_lines(path, |at, text| {
        let chat = parse_line(text).map_err(|e| e.at(at.clone()))?;
        out.push(Conversation { messages: chat.messages, tools: chat.tools, at });
        Ok(())
    })?;
    if out.is_empty() {
        return Err(DataError::Empty { path: path.into() });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_lines_are_located_errors() {
        let cases = [
            ("{\"messages\": [", "invalid JSON"),
            ("[1]", "expected a JSON object"),
            ("{\"messages\": [{\"role\": \"bot\", \"content\": \"x\"}]}", "unknown role \"bot\""),
            ("{\"messages\": [{\"role\": \"user\", \"content\": 3}]}", "must be a string"),
            ("{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}]}", "no assistant turn"),
            ("{\"text\": \"x\"}", "expected a \"messages\" key"),
            ("{\"messages\": [{\"role\": \"user\", \"content\": \" \"}, {\"role\": \"assistant\", \"content\": \"b\"}]}", "message 0 (user) has empty content"),
            (
                "{\"messages\": [{\"role\": \"user\", \"content\": \"a\"}, {\"role\": \"system\", \"content\": \"s\"}, {\"role\": \"assistant\", \"content\": \"b\"}]}",
                "wrong role order",
            ),
        ];
        for (line, want) in cases {
            let e = parse_line(line).unwrap_err().to_string();
            assert!(e.contains(want), "{line}: {e}");
        }
    }

    #[test]
    fn sharegpt_is_accepted() {
        let m = parse_line(r#"{"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]}"#).unwrap();
        assert_eq!(m.messages[1], Message::new(Role::Assistant, "b"));
    }
}
