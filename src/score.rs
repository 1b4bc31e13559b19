//! `ft score`: a reward model's scores for the records of a JSONL file. Each line is a
//! conversation (`{"messages": [...]}`), a prompt with a completion (`{"prompt", "completion"}`,
//! strings or messages, as TRL's prompt-completion format), a preference pair (`{"prompt",
//! "chosen", "rejected"}`: both sides scored) or raw text (`{"text"}`, scored as it is). Every
//! record comes back with its `reward` (`reward_chosen`, `reward_rejected` for a pair).

use std::path::Path;

use serde::Serialize;
use serde_json::Value;

use crate::data::conversation::{parse_messages, read_lines, schema, DataError, Message, Record, Role};
use crate::data::preference::{is_preference, parse_pair};
use crate::loss::reward::{RewardModel, RewardModelError};
use crate::ops::Kernels;

/// Errors of `ft score`.
#[derive(Debug, thiserror::Error)]
pub enum ScoreError {
    #[error(transparent)]
    Data(#[from] DataError),
    #[error(transparent)]
    Model(#[from] RewardModelError),
}

/// The summary of a scoring run.
#[derive(Debug, Clone, Serialize)]
pub struct ScoreSummary {
    pub records: usize,
    /// The mean reward over every scored sequence (both sides of pairs).
    pub mean_reward: f64,
    pub min_reward: f64,
    pub max_reward: f64,
    /// Preference pairs: their number, the share with reward_chosen > reward_rejected and the
    /// mean difference.
    pub pairs: usize,
    pub accuracy: Option<f64>,
    pub margin: Option<f64>,
}

/// What one record asks to score: one sequence or a pair's two.
enum Item {
    One(Scored),
    Pair(Scored, Scored),
}

enum Scored {
    Conversation(Vec<Message>),
    Text(String),
}

fn side(v: &Value, key: &str, role: Role, record: &Record) -> Result<Vec<Message>, crate::data::conversation::RecordError> {
    match v {
        Value::String(s) => Ok(vec![Message::new(role, s.clone())]),
        Value::Array(_) => parse_messages(v, key, record),
        _ => Err(schema(format!("\"{key}\" must be a string or a list of messages"))),
    }
}

fn parse(text: &str, at: &crate::data::conversation::Location) -> Result<(Value, Item), DataError> {
    let record = Record::new(text);
    let v: Value = serde_json::from_str(text).map_err(|e| crate::data::conversation::RecordError::Json(e.to_string()).at(at.clone()))?;
    let o = v.as_object().ok_or_else(|| schema("expected a JSON object").at(at.clone()))?;
    let item = if is_preference(&v) {
        let p = parse_pair(text, at.clone()).map_err(|e| e.at(at.clone()))?;
        let whole = |side: &[Message]| [p.prompt.clone(), side.to_vec()].concat();
        Item::Pair(Scored::Conversation(whole(&p.chosen)), Scored::Conversation(whole(&p.rejected)))
    } else if let Some(m) = o.get("messages") {
        Item::One(Scored::Conversation(parse_messages(m, "messages", &record).map_err(|e| e.at(at.clone()))?))
    } else if let (Some(p), Some(c)) = (o.get("prompt"), o.get("completion")) {
        let prompt = side(p, "prompt", Role::User, &record).map_err(|e| e.at(at.clone()))?;
        let completion = side(c, "completion", Role::Assistant, &record).map_err(|e| e.at(at.clone()))?;
        Item::One(Scored::Conversation([prompt, completion].concat()))
    } else if let Some(Value::String(t)) = o.get("text") {
        Item::One(Scored::Text(t.clone()))
    } else {
        return Err(schema("expected \"messages\", \"prompt\" with \"completion\", \"prompt\" with \"chosen\" and \"rejected\", or \"text\"").at(at.clone()));
    };
    Ok((v, item))
}

/// Scores every record of `data` with `rm`; returns the records with their rewards, in order,
/// and a summary. The first bad line is an error naming `file:line`.
pub fn score_file<B: Kernels>(rm: &RewardModel<B>, data: &Path) -> Result<(Vec<Value>, ScoreSummary), ScoreError> {
    let mut records = Vec::new();
    let mut texts = Vec::new();
    read_lines(data, |at, text| {
        let (v, item) = parse(text, &at)?;
        let render = |s: Scored| -> Result<String, DataError> {
            match s {
                Scored::Text(t) => Ok(t),
                Scored::Conversation(c) => rm.render(&c).map_err(|e| DataError::At { at: at.clone(), msg: e.to_string() }),
            }
        };
        let n = match item {
            Item::One(s) => {
                texts.push(render(s)?);
                1
            }
            Item::Pair(c, r) => {
                texts.push(render(c)?);
                texts.push(render(r)?);
                2
            }
        };
        records.push((v, n));
        Ok(())
    })?;
    if records.is_empty() {
        return Err(DataError::Empty { path: data.into() }.into());
    }
    let rewards = rm.score_texts(&texts)?;
    let mut out = Vec::with_capacity(records.len());
    let (mut k, mut pairs, mut right, mut margin) = (0, 0, 0, 0.0);
    for (mut v, n) in records {
        if n == 1 {
            v["reward"] = rewards[k].into();
        } else {
            let (c, r) = (rewards[k], rewards[k + 1]);
            v["reward_chosen"] = c.into();
            v["reward_rejected"] = r.into();
            pairs += 1;
            right += usize::from(c > r);
            margin += c - r;
        }
        k += n;
        out.push(v);
    }
    let summary = ScoreSummary {
        records: out.len(),
        mean_reward: rewards.iter().sum::<f64>() / rewards.len() as f64,
        min_reward: rewards.iter().copied().fold(f64::INFINITY, f64::min),
        max_reward: rewards.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        pairs,
        accuracy: (pairs > 0).then(|| right as f64 / pairs as f64),
        margin: (pairs > 0).then(|| margin / pairs as f64),
    };
    Ok((out, summary))
}
