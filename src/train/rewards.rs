//! GRPO's reward functions, as the recipe declares them (`[[grpo.rewards]]`): built-in
//! verifiable rules and an external command. Each gives one number per completion; the
//! objective weights and sums them (TRL's `sum_then_normalize`).
//!
//! | kind | reward |
//! |---|---|
//! | `regex` | 1 if `pattern` matches the completion, else 0 |
//! | `answer` | 1 if the extracted answer equals the record's `field` (trimmed, case and inner whitespace folded), else 0 |
//! | `number` | 1 if the extracted answer and the record's `field` are numbers within `tolerance`, else 0 |
//! | `length` | `−max(0, tokens − max_tokens) / max_tokens` (a soft overlong penalty) |
//! | `command` | what the program prints: it reads one JSON object per completion on stdin (`prompt`, `completion`, and the record's fields) and answers one number per line |
//! | `model` | a reward model's score (`model`, a `*ForSequenceClassification` directory, or a causal LM with a SEQ_CLS `adapter`) of the prompt's messages plus the completion as the assistant's reply, rendered with the reward model's own chat template, batched in-process (TRL's GRPO reward-model path) |
//!
//! `extract` picks the answer from the completion: `none` (the whole text), `last_number`,
//! `boxed` (the last `\boxed{…}`) or `answer_tag` (the last `<answer>…</answer>`).

use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::data::conversation::{Message, Role};
use crate::data::tokenizer::TemplateChoice;
use crate::loss::reward::RewardModel;
use crate::ops::Kernels;

/// How an answer is taken from a completion.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Extract {
    #[default]
    None,
    LastNumber,
    Boxed,
    AnswerTag,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RewardKind {
    Regex,
    Answer,
    Number,
    Length,
    Command,
    Model,
}

/// One reward function of a recipe.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RewardSpec {
    /// The name in the metrics (`rewards/<name>/mean`).
    pub name: String,
    pub kind: RewardKind,
    #[serde(default = "one")]
    pub weight: f64,
    /// `regex`: the pattern (Rust regex syntax).
    pub pattern: Option<String>,
    /// `answer`, `number`: the record's field holding the expected answer.
    pub field: Option<String>,
    #[serde(default)]
    pub extract: Extract,
    /// `number`: the largest accepted absolute difference.
    #[serde(default = "d_tolerance")]
    pub tolerance: f64,
    /// `length`: tokens beyond which the penalty starts.
    pub max_tokens: Option<usize>,
    /// `command`: the program and its arguments.
    pub command: Option<Vec<String>>,
    /// `command`: seconds the program may take per step.
    #[serde(default = "d_timeout")]
    pub timeout_s: f64,
    /// `model`: the reward model's directory.
    pub model: Option<PathBuf>,
    /// `model`: a PEFT SEQ_CLS adapter on it.
    pub adapter: Option<PathBuf>,
}

fn one() -> f64 {
    1.0
}
fn d_tolerance() -> f64 {
    1e-6
}
fn d_timeout() -> f64 {
    60.0
}

/// Why a reward could not be computed.
#[derive(Debug, thiserror::Error)]
pub enum RewardError {
    #[error("reward function {name:?}: {msg}")]
    Spec { name: String, msg: String },
    #[error("reward command {name:?} ({command}): {msg}")]
    Command { name: String, command: String, msg: String },
}

impl RewardSpec {
    /// Checks the fields the kind needs; returns the compiled regex for `regex`.
    pub fn check(&self) -> Result<Option<regex::Regex>, RewardError> {
        let bad = |msg: &str| RewardError::Spec { name: self.name.clone(), msg: msg.into() };
        if !self.weight.is_finite() {
            return Err(bad("weight must be a number"));
        }
        match self.kind {
            RewardKind::Regex => {
                let p = self.pattern.as_deref().ok_or_else(|| bad("kind = \"regex\" needs pattern"))?;
                return regex::Regex::new(p).map(Some).map_err(|e| bad(&format!("pattern: {e}")));
            }
            RewardKind::Answer | RewardKind::Number if self.field.is_none() => return Err(bad("this kind needs field (the record's expected answer)")),
            RewardKind::Number if !(self.tolerance >= 0.0 && self.tolerance.is_finite()) => return Err(bad("tolerance must be a number ≥ 0")),
            RewardKind::Length if self.max_tokens.is_none_or(|m| m == 0) => return Err(bad("kind = \"length\" needs max_tokens ≥ 1")),
            RewardKind::Command if self.command.as_ref().is_none_or(|c| c.is_empty()) => return Err(bad("kind = \"command\" needs command = [\"program\", \"args\"...]")),
            RewardKind::Command if !(self.timeout_s > 0.0 && self.timeout_s.is_finite()) => return Err(bad("timeout_s must be positive")),
            RewardKind::Model if self.model.is_none() => return Err(bad("kind = \"model\" needs model = \"DIR\" (a reward model)")),
            _ => {}
        }
        Ok(None)
    }
}

/// One completion to score: the prompt as rendered and as messages, the completion's text and
/// tokens, the record's fields.
pub struct ToScore<'a> {
    pub prompt: &'a str,
    pub messages: &'a [Message],
    pub completion: &'a str,
    pub tokens: usize,
    pub fields: &'a Map<String, Value>,
}

/// The answer `extract` takes from `text` (`None` when there is none).
pub fn extract(text: &str, how: Extract) -> Option<String> {
    match how {
        Extract::None => Some(text.to_string()),
        Extract::LastNumber => {
            let re = regex::Regex::new(r"-?\d[\d,]*(?:\.\d+)?").expect("valid regex");
            re.find_iter(text).last().map(|m| m.as_str().replace(',', ""))
        }
        Extract::Boxed => {
            let start = text.rfind("\\boxed{")? + "\\boxed{".len();
            let mut depth = 1;
            for (i, c) in text[start..].char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' => {
                        depth -= 1;
                        if depth == 0 {
                            return Some(text[start..start + i].to_string());
                        }
                    }
                    _ => {}
                }
            }
            None
        }
        Extract::AnswerTag => {
            let end = text.rfind("</answer>")?;
            let start = text[..end].rfind("<answer>")? + "<answer>".len();
            Some(text[start..end].to_string())
        }
    }
}

fn normalise(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ").to_lowercase()
}

fn field_text(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        other => Some(other.to_string()),
    }
}

/// Something that scores whole conversations (a loaded reward model, whatever its backend).
pub trait ConversationScorer {
    fn score(&self, conversations: &[Vec<Message>]) -> Result<Vec<f64>, String>;
}

impl<B: Kernels> ConversationScorer for RewardModel<B> {
    fn score(&self, conversations: &[Vec<Message>]) -> Result<Vec<f64>, String> {
        self.score_conversations(conversations).map_err(|e| e.to_string())
    }
}

/// A reward function ready to score: its spec and what it needs loaded (a compiled regex, a
/// reward model on the run's device).
pub struct Scorer {
    pub spec: RewardSpec,
    regex: Option<regex::Regex>,
    model: Option<Box<dyn ConversationScorer>>,
}

impl Scorer {
    /// Checks `spec` and loads what it needs; a reward model goes on `device`.
    pub fn new<B: Kernels>(spec: RewardSpec, device: &B::Device) -> Result<Self, RewardError> {
        let regex = spec.check()?;
        let model: Option<Box<dyn ConversationScorer>> = match (&spec.kind, &spec.model) {
            (RewardKind::Model, Some(dir)) => {
                let rm = RewardModel::<B>::load(dir, spec.adapter.as_deref(), TemplateChoice::Model, device)
                    .map_err(|e| RewardError::Spec { name: spec.name.clone(), msg: e.to_string() })?;
                Some(Box::new(rm))
            }
            _ => None,
        };
        Ok(Scorer { spec, regex, model })
    }

    /// The rewards of `items`.
    pub fn score(&self, items: &[ToScore]) -> Result<Vec<f64>, RewardError> {
        match &self.model {
            Some(m) => {
                let conversations: Vec<Vec<Message>> = items
                    .iter()
                    .map(|it| {
                        let mut c = it.messages.to_vec();
                        c.push(Message::new(Role::Assistant, it.completion));
                        c
                    })
                    .collect();
                m.score(&conversations).map_err(|msg| RewardError::Spec { name: self.spec.name.clone(), msg })
            }
            None => score(&self.spec, self.regex.as_ref(), items),
        }
    }
}

/// The rewards of one rule or command function for `items`.
fn score(spec: &RewardSpec, re: Option<&regex::Regex>, items: &[ToScore]) -> Result<Vec<f64>, RewardError> {
    let field = |it: &ToScore| field_text(spec.field.as_ref().and_then(|f| it.fields.get(f)));
    Ok(match spec.kind {
        RewardKind::Regex => items.iter().map(|it| f64::from(u8::from(re.is_some_and(|r| r.is_match(it.completion))))).collect(),
        RewardKind::Answer => items
            .iter()
            .map(|it| {
                let ok = matches!((extract(it.completion, spec.extract), field(it)), (Some(a), Some(b)) if normalise(&a) == normalise(&b));
                f64::from(u8::from(ok))
            })
            .collect(),
        RewardKind::Number => items
            .iter()
            .map(|it| {
                let num = |s: Option<String>| s.and_then(|s| s.trim().replace(',', "").parse::<f64>().ok());
                let ok = matches!((num(extract(it.completion, spec.extract)), num(field(it))), (Some(a), Some(b)) if (a - b).abs() <= spec.tolerance);
                f64::from(u8::from(ok))
            })
            .collect(),
        RewardKind::Length => {
            let m = spec.max_tokens.unwrap_or(1) as f64;
            items.iter().map(|it| -((it.tokens as f64 - m).max(0.0)) / m).collect()
        }
        RewardKind::Command => run_command(spec, items)?,
        RewardKind::Model => return Err(RewardError::Spec { name: spec.name.clone(), msg: "a reward model is scored through Scorer".into() }),
    })
}

/// Runs a reward command over `items`: JSONL in, one number per line out.
fn run_command(spec: &RewardSpec, items: &[ToScore]) -> Result<Vec<f64>, RewardError> {
    let argv = spec.command.clone().unwrap_or_default();
    let err = |msg: String| RewardError::Command { name: spec.name.clone(), command: argv.join(" "), msg };
    let mut input = Vec::new();
    for it in items {
        let mut o = it.fields.clone();
        o.insert("prompt".into(), it.prompt.into());
        o.insert("completion".into(), it.completion.into());
        writeln!(input, "{}", Value::Object(o)).expect("writing to a Vec");
    }
    let mut child = std::process::Command::new(PathBuf::from(&argv[0]))
        .args(&argv[1..])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| err(format!("cannot start: {e}")))?;
    let mut stdin = child.stdin.take().expect("piped stdin");
    let writer = std::thread::spawn(move || {
        // A program that exits without reading all of its input is judged by its output.
        let _ = stdin.write_all(&input);
    });
    let deadline = Instant::now() + Duration::from_secs_f64(spec.timeout_s);
    loop {
        match child.try_wait().map_err(|e| err(e.to_string()))? {
            Some(_) => break,
            None if Instant::now() > deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(err(format!("no answer within timeout_s = {} s", spec.timeout_s)));
            }
            None => std::thread::sleep(Duration::from_millis(5)),
        }
    }
    let _ = writer.join();
    let out = child.wait_with_output().map_err(|e| err(e.to_string()))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        return Err(err(format!("exited with {}: {}", out.status, stderr.trim().lines().last().unwrap_or(""))));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    if lines.len() != items.len() {
        return Err(err(format!("printed {} numbers for {} completions (one per line expected)", lines.len(), items.len())));
    }
    lines
        .iter()
        .enumerate()
        .map(|(i, l)| l.trim().parse::<f64>().ok().filter(|v| v.is_finite()).ok_or_else(|| err(format!("output line {}: {l:?} is not a finite number", i + 1))))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_extracted_as_documented() {
        assert_eq!(extract("so 1,234.5 then 42.", Extract::LastNumber).as_deref(), Some("42"));
        assert_eq!(extract("x \\boxed{\\frac{1}{2}} y", Extract::Boxed).as_deref(), Some("\\frac{1}{2}"));
        assert_eq!(extract("<answer>a</answer> <answer> 7 </answer>", Extract::AnswerTag).as_deref(), Some(" 7 "));
        assert_eq!(extract("none here", Extract::LastNumber), None);
    }
}
