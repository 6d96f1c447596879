//! The JSONL formats of `--data`, one object per line, detected per line (a file holds one):
//! `{"text"}`, `{"prompt", "completion"}`, `{"messages": [{"role", "content"}]}` (OpenAI / TRL),
//! `{"conversations": [{"from", "value"}]}` (ShareGPT) and `{"instruction", "input", "output"}`
//! (Alpaca: the user says the instruction, plus a blank line and the input when there is one;
//! the assistant answers the output).

use serde_json::Value;

use crate::io::chat::Message;

/// A document before tokenization.
#[derive(Clone, Debug, PartialEq)]
pub enum Document {
    /// Text pieces, each a loss target or not (a text; a prompt and its completion).
    Pieces(Vec<(String, bool)>),
    /// A conversation, rendered with the model's chat template.
    Chat(Vec<Message>),
}

/// The format of one line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Text,
    PromptCompletion,
    Messages,
    ShareGpt,
    Alpaca,
}

impl Format {
    pub fn describe(self) -> &'static str {
        match self {
            Format::Text => "text ({\"text\"})",
            Format::PromptCompletion => "prompt/completion ({\"prompt\", \"completion\"})",
            Format::Messages => "messages ({\"messages\": [...]})",
            Format::ShareGpt => "ShareGPT ({\"conversations\": [...]})",
            Format::Alpaca => "Alpaca ({\"instruction\", \"input\", \"output\"})",
        }
    }

    /// The format of a line's object, by its keys.
    pub fn of(v: &Value) -> Option<Format> {
        let has = |k: &str| v.get(k).is_some();
        Some(if has("messages") {
            Format::Messages
        } else if has("conversations") {
            Format::ShareGpt
        } else if has("instruction") && has("output") {
            Format::Alpaca
        } else if has("text") {
            Format::Text
        } else if has("prompt") && has("completion") {
            Format::PromptCompletion
        } else {
            return None;
        })
    }
}

pub const EXPECTED: &str = "expected one of {\"text\"}, {\"prompt\", \"completion\"}, {\"messages\": [{\"role\", \
                            \"content\"}, ...]}, {\"conversations\": [{\"from\", \"value\"}, ...]} or \
                            {\"instruction\", \"input\", \"output\"}";

/// The document of one line's object in `format`; errors say what is wrong in words.
pub fn document(v: &Value, format: Format) -> Result<Document, String> {
    let string = |k: &str| -> Result<String, String> {
        match v.get(k) {
            Some(Value::String(s)) => Ok(s.clone()),
            Some(_) => Err(format!("\"{k}\" is not a string")),
            None => Err(format!("\"{k}\" is missing")),
        }
    };
    Ok(match format {
        Format::Text => Document::Pieces(vec![(string("text")?, true)]),
        Format::PromptCompletion => Document::Pieces(vec![(string("prompt")?, false), (string("completion")?, true)]),
        Format::Messages => Document::Chat(turns(v, "messages", "role", "content", &[])?),
        Format::ShareGpt => {
            let names = [("human", "user"), ("gpt", "assistant"), ("user", "user"), ("assistant", "assistant")];
            Document::Chat(turns(v, "conversations", "from", "value", &names)?)
        }
        Format::Alpaca => {
            let (instruction, output) = (string("instruction")?, string("output")?);
            let input = match v.get("input") {
                None | Some(Value::Null) => String::new(),
                Some(Value::String(s)) => s.clone(),
                Some(_) => return Err("\"input\" is not a string".into()),
            };
            let user = if input.is_empty() { instruction } else { format!("{instruction}\n\n{input}") };
            Document::Chat(vec![Message::new("user", &user), Message::new("assistant", &output)])
        }
    })
}

/// The messages of a conversation list `key`, each `{role_key, content_key}`; roles are renamed
/// by `names` (ShareGPT's human/gpt) and must then be system, user or assistant.
fn turns(
    v: &Value,
    key: &str,
    role_key: &str,
    content_key: &str,
    names: &[(&str, &str)],
) -> Result<Vec<Message>, String> {
    let list = v[key].as_array().ok_or_else(|| format!("\"{key}\" is not a list of messages"))?;
    let mut out = Vec::with_capacity(list.len());
    for (i, m) in list.iter().enumerate() {
        let role = m[role_key].as_str().ok_or_else(|| format!("{key}[{i}].{role_key} is missing or not a string"))?;
        let role = names.iter().find(|(from, _)| *from == role).map(|(_, to)| *to).unwrap_or(role);
        if !matches!(role, "system" | "user" | "assistant") {
            let known = if names.is_empty() { "system, user or assistant" } else { "system, human or gpt" };
            return Err(format!("{key}[{i}].{role_key} is {role:?}: portalora trains on {known} turns"));
        }
        let content = match &m[content_key] {
            Value::String(s) => s,
            Value::Null => return Err(format!("{key}[{i}].{content_key} is missing")),
            other => {
                let what = if other.is_array() { "a list (of content parts?)" } else { "not a string" };
                return Err(format!("{key}[{i}].{content_key} is {what}: give each message's text as a string"));
            }
        };
        out.push(Message::new(role, content));
    }
    Ok(out)
}
