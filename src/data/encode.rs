//! Rendering a conversation and tokenizing it with its trainable-token mask.
//!
//! The whole rendered text is tokenized once (so tokens equal what inference sees). The mask
//! marks, for each assistant turn, the tokens of its content and the closing end-of-turn token
//! (e.g. `<|im_end|>`), not the newline after it. Spans are found for any template by rendering
//! the conversation up to each assistant turn with a generation prompt: what follows that prefix
//! is the turn's content.

use super::conversation::{function_names, Message, RecordError, Role};
use super::template::ChatTemplate;
use super::tokenizer::TextTokenizer;

/// A tokenized sample.
#[derive(Debug, Clone, PartialEq)]
pub struct Encoded {
    pub text: String,
    pub ids: Vec<u32>,
    /// 1 where the token is trained on / scored.
    pub mask: Vec<u8>,
}

impl Encoded {
    pub fn trainable(&self) -> usize {
        self.mask.iter().map(|&m| m as usize).sum()
    }
}

/// A trained byte span `[start, end)` of the rendered text; `close` adds the end-of-turn special
/// token that starts where the span ends.
struct Span {
    start: usize,
    end: usize,
    close: bool,
}

/// The trainable spans of each assistant turn in the rendered `full` text. A plain turn's span is
/// its content (plus the closing special token); a turn with other keys (`tool_calls`, reasoning)
/// is everything the template renders for it after the generation prompt, up to its trailing
/// whitespace. A turn whose `tool_calls` the template does not render, or a record whose `tools`
/// it does not render, is an error rather than a silent drop.
fn assistant_spans(template: &ChatTemplate, messages: &[Message], tools: Option<&minijinja::Value>, full: &str) -> Result<Vec<Span>, RecordError> {
    let render = |msgs: &[Message], gen: bool| template.render_with_tools(msgs, tools, gen).map_err(|e| RecordError::Template(format!("{e:#}")));
    if let Some(t) = tools {
        if let Some(name) = function_names(t).into_iter().find(|n| !full.contains(n.as_str())) {
            return Err(RecordError::Template(format!(
                "the record has tools, but the chat template does not render them (the function name {name:?} is not in the rendered text); use a model whose template supports tools"
            )));
        }
    }
    let mut spans = Vec::new();
    let mut cursor = 0;
    for (i, m) in messages.iter().enumerate() {
        if m.role != Role::Assistant {
            continue;
        }
        let prefix = render(&messages[..i], true)?;
        let span = if m.extra.is_empty() {
            let start = if full.starts_with(&prefix) && full[prefix.len()..].starts_with(&m.content) && prefix.len() >= cursor {
                prefix.len()
            } else {
                // Templates that rewrite earlier turns: find the content after the previous turn.
                cursor + full[cursor..].find(&m.content).ok_or(RecordError::NotVerbatim(i))?
            };
            Span { start, end: start + m.content.len(), close: true }
        } else {
            let upto = render(&messages[..=i], false)?;
            if !(full.starts_with(&upto) && upto.starts_with(&prefix) && prefix.len() >= cursor) {
                return Err(RecordError::NotVerbatim(i));
            }
            let end = prefix.len() + upto[prefix.len()..].trim_end().len();
            if let Some(calls) = m.tool_calls() {
                if let Some(name) = function_names(calls).into_iter().find(|n| !full[prefix.len()..end].contains(n.as_str())) {
                    return Err(RecordError::Template(format!(
                        "message {i} has tool_calls, but the chat template does not render them (the function name {name:?} is not in the rendered turn); use a model whose template supports tool calls"
                    )));
                }
            }
            Span { start: prefix.len(), end, close: false }
        };
        cursor = span.end;
        if m.train {
            spans.push(span);
        }
    }
    Ok(spans)
}

/// Renders and tokenizes `messages`, with the assistant mask.
pub fn encode_conversation(tok: &TextTokenizer, template: &ChatTemplate, messages: &[Message]) -> Result<Encoded, RecordError> {
    encode_chat(tok, template, messages, None)
}

/// Renders `messages` with the record's `tools` and tokenizes them, with the assistant mask.
pub fn encode_chat(tok: &TextTokenizer, template: &ChatTemplate, messages: &[Message], tools: Option<&minijinja::Value>) -> Result<Encoded, RecordError> {
    let text = template.render_with_tools(messages, tools, false).map_err(|e| RecordError::Template(format!("{e:#}")))?;
    let spans = assistant_spans(template, messages, tools, &text)?;
    let enc = tok.encode(&text).map_err(|e| RecordError::Tokenize(e.to_string()))?;
    let ids = enc.get_ids().to_vec();
    let offsets = enc.get_offsets();
    let mut mask = vec![0u8; ids.len()];
    for &Span { start: s, end: e, close } in &spans {
        for (j, &(a, b)) in offsets.iter().enumerate() {
            if a < e && b > s {
                mask[j] = 1;
            }
            // The closing end-of-turn token starts where the content ends.
            if close && a == e && b > a && tok.is_special(ids[j]) {
                mask[j] = 1;
            }
        }
    }
    Ok(Encoded { text, ids, mask })
}
