//! Rendering a conversation and tokenizing it with its trainable-token mask.
//!
//! The whole rendered text is tokenized once (so tokens equal what inference sees). The mask
//! marks, for each assistant turn, the tokens of its content and the closing end-of-turn token
//! (e.g. `<|im_end|>`), not the newline after it. Spans are found for any template by rendering
//! the conversation up to each assistant turn with a generation prompt: what follows that prefix
//! is the turn's content.

use super::conversation::{Message, RecordError, Role};
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

/// Byte spans `[start, end)` of each trainable assistant content in the rendered `full` text.
fn assistant_spans(template: &ChatTemplate, messages: &[Message], full: &str) -> Result<Vec<(usize, usize)>, RecordError> {
    let mut spans = Vec::new();
    let mut cursor = 0;
    for (i, m) in messages.iter().enumerate() {
        if m.role != Role::Assistant {
            continue;
        }
        let prefix = template.render(&messages[..i], true).map_err(|e| RecordError::Template(format!("{e:#}")))?;
        let start = if full.starts_with(&prefix) && full[prefix.len()..].starts_with(&m.content) && prefix.len() >= cursor {
            prefix.len()
        } else {
            // Templates that rewrite earlier turns: find the content after the previous turn.
            cursor
                + full[cursor..].find(&m.content).ok_or(RecordError::NotVerbatim(i))?
        };
        let end = start + m.content.len();
        cursor = end;
        if m.train {
            spans.push((start, end));
        }
    }
    Ok(spans)
}

/// Renders and tokenizes `messages`, with the assistant mask.
pub fn encode_conversation(tok: &TextTokenizer, template: &ChatTemplate, messages: &[Message]) -> Result<Encoded, RecordError> {
    let text = template.render(messages, false).map_err(|e| RecordError::Template(format!("{e:#}")))?;
    let spans = assistant_spans(template, messages, &text)?;
    let enc = tok.encode(&text).map_err(|e| RecordError::Tokenize(e.to_string()))?;
    let ids = enc.get_ids().to_vec();
    let offsets = enc.get_offsets();
    let mut mask = vec![0u8; ids.len()];
    for &(s, e) in &spans {
        for (j, &(a, b)) in offsets.iter().enumerate() {
            if a < e && b > s {
                mask[j] = 1;
            }
            // The closing end-of-turn token starts where the content ends.
            if a == e && b > a && tok.is_special(ids[j]) {
                mask[j] = 1;
            }
        }
    }
    Ok(Encoded { text, ids, mask })
}
