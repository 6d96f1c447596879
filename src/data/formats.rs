//! The JSONL formats of `--data`, one object per line, detected per line (a file holds one):
//! `{"text"}`, `{"prompt", "completion"}`, `{"messages": [{"role", "content"}]}` (OpenAI / TRL),
//! `{"conversations": [{"from", "value"}]}` (ShareGPT) and `{"instruction", "input", "output"}`
//! (Alpaca: the user says the instruction, plus a blank line and the input when there is one;
//! the assistant answers the output). ShareGPT and Alpaca lines may carry a `system` prompt. A
//! line holding another format's content keys too is refused (which would be trained?); other
//! keys (`id`, `source`, ...) are not read, and [`unread_keys`] names them for the summary.

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

impl Format {
    /// The keys this format reads.
    fn keys(self) -> &'static [&'static str] {
        match self {
            Format::Text => &["text"],
            Format::PromptCompletion => &["prompt", "completion"],
            Format::Messages => &["messages"],
            Format::ShareGpt => &["conversations", "system"],
            Format::Alpaca => &["instruction", "input", "output", "system"],
        }
    }
}

/// Keys that hold a format's content: one beside another format's is refused, not dropped.
const CONTENT_KEYS: [&str; 8] =
    ["text", "prompt", "completion", "messages", "conversations", "instruction", "input", "output"];
/// Keys that change what a conversation is, which portalora does not implement.
const REFUSED_KEYS: [(&str, &str); 3] = [
    ("tools", "tool definitions are not supported"),
    ("functions", "function definitions are not supported"),
    ("images", "images are not supported (portalora trains language models on text)"),
];

/// The keys of a line's object that `format` does not read and that change nothing it trains
/// on (`id`, `source`, ...): reported, not refused.
pub fn unread_keys(v: &Value, format: Format) -> Vec<String> {
    let Some(o) = v.as_object() else { return Vec::new() };
    o.keys().filter(|k| !format.keys().contains(&k.as_str())).cloned().collect()
}

/// Refuses a line that holds another format's content, or a key that changes the conversation.
fn check_keys(v: &Value, format: Format) -> Result<(), String> {
    let Some(o) = v.as_object() else { return Err("is not a JSON object".into()) };
    for k in o.keys().map(String::as_str) {
        if CONTENT_KEYS.contains(&k) && !format.keys().contains(&k) {
            return Err(format!(
                "holds \"{k}\" beside {}: a line is one format, and \"{k}\" would not be read; drop one",
                format.describe()
            ));
        }
        if let Some((_, why)) = REFUSED_KEYS.iter().find(|(r, _)| *r == k).filter(|_| !o[k].is_null()) {
            return Err(format!("\"{k}\": {why}"));
        }
    }
    Ok(())
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
    check_keys(v, format)?;
    // ShareGPT's and Alpaca's system prompt comes first.
    let system = match v.get("system") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.is_empty() => None,
        Some(Value::String(s)) => Some(Message::new("system", s)),
        Some(_) => return Err("\"system\" is not a string".into()),
    };
    let with_system = |mut m: Vec<Message>| {
        if let Some(s) = &system {
            m.insert(0, s.clone());
        }
        Document::Chat(m)
    };
    Ok(match format {
        Format::Text => Document::Pieces(vec![(string("text")?, true)]),
        Format::PromptCompletion => Document::Pieces(vec![(string("prompt")?, false), (string("completion")?, true)]),
        Format::Messages => Document::Chat(turns(v, "messages", "role", "content", &[])?),
        Format::ShareGpt => {
            let names = [("human", "user"), ("gpt", "assistant"), ("user", "user"), ("assistant", "assistant")];
            with_system(turns(v, "conversations", "from", "value", &names)?)
        }
        Format::Alpaca => {
            let (instruction, output) = (string("instruction")?, string("output")?);
            let input = match v.get("input") {
                None | Some(Value::Null) => String::new(),
                Some(Value::String(s)) => s.clone(),
                Some(_) => return Err("\"input\" is not a string".into()),
            };
            let user = if input.is_empty() { instruction } else { format!("{instruction}\n\n{input}") };
            with_system(vec![Message::new("user", &user), Message::new("assistant", &output)])
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
        check_message_keys(m, key, i, role_key, content_key)?;
        out.push(Message::new(role, content));
    }
    Ok(out)
}

/// A message's keys beyond its role and content change what is trained or rendered: OpenAI's
/// `weight` 0 (a turn not to learn), tool calls, a speaker's `name`. Refused, not dropped;
/// `weight` 1 (the default) is fine.
fn check_message_keys(m: &Value, key: &str, i: usize, role_key: &str, content_key: &str) -> Result<(), String> {
    let Some(o) = m.as_object() else { return Err(format!("{key}[{i}] is not an object")) };
    for (k, val) in o {
        if k == role_key || k == content_key || val.is_null() {
            continue;
        }
        let why = match k.as_str() {
            "weight" if val.as_f64() == Some(1.0) => continue,
            "weight" => {
                "a per-turn weight is not supported (every assistant turn is trained); drop the turn \
                         from the data, or the key"
            }
            "tool_calls" | "function_call" | "tool_call_id" => "tool calls are not supported",
            _ => "portalora renders role and content only; drop the key, or fold it into the content",
        };
        return Err(format!("{key}[{i}].{k} = {val}: {why}"));
    }
    Ok(())
}
