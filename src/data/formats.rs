//! The JSONL formats of `--data`, one object per line, detected per line (a file holds one):
//! `{"text"}`, `{"prompt", "completion"}`, `{"messages": [{"role", "content"}]}` (OpenAI / TRL),
//! `{"conversations": [{"from", "value"}]}` (ShareGPT) and `{"instruction", "input", "output"}`
//! (Alpaca: the user says the instruction, plus a blank line and the input when there is one;
//! the assistant answers the output). A line may carry a `system` prompt, the first turn. A
//! `text` beside a prompt/completion pair is refused (which would be trained?); other keys
//! (`id`, `source`, Alpaca's rendered `text`) are not read, and [`unread_keys`] names them for
//! the summary.

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

    /// The keys this format reads.
    fn keys(self) -> &'static [&'static str] {
        match self {
            Format::Text => &["text"],
            Format::PromptCompletion => &["prompt", "completion"],
            Format::Messages => &["messages", "system"],
            Format::ShareGpt => &["conversations", "system"],
            Format::Alpaca => &["instruction", "input", "output", "system"],
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

/// Keys of a conversation line that change what it is, which portalora does not implement.
const REFUSED_KEYS: [(&str, &str); 3] = [
    ("tools", "tool definitions are not supported"),
    ("functions", "function definitions are not supported"),
    ("images", "images are not supported (portalora trains language models on text)"),
];

/// Keys of a message that change how the template renders it.
const REFUSED_MESSAGE_KEYS: [(&str, &str); 6] = [
    ("tool_calls", "tool calls are not supported"),
    ("function_call", "tool calls are not supported"),
    ("tool_call_id", "tool calls are not supported"),
    ("name", "a speaker's name is not rendered; fold it into the content"),
    ("reasoning_content", "a separate reasoning text is not rendered; fold it into the content"),
    ("thinking", "a separate reasoning text is not rendered; fold it into the content"),
];

/// Whether a value says something: not null, false, empty.
fn set(v: &Value) -> bool {
    match v {
        Value::Null | Value::Bool(false) => false,
        Value::Array(a) => !a.is_empty(),
        Value::Object(o) => !o.is_empty(),
        Value::String(s) => !s.is_empty(),
        _ => true,
    }
}

/// The conversation list of a line in `format`, with its role and content keys.
fn conversation(format: Format) -> Option<(&'static str, &'static str, &'static str)> {
    match format {
        Format::Messages => Some(("messages", "role", "content")),
        Format::ShareGpt => Some(("conversations", "from", "value")),
        _ => None,
    }
}

/// The keys of a line's object that `format` does not read and that change nothing it trains
/// on (`id`, `source`, a message's `timestamp` as `messages[].timestamp`): reported, not refused.
pub fn unread_keys(v: &Value, format: Format) -> Vec<String> {
    let Some(o) = v.as_object() else { return Vec::new() };
    let mut out: Vec<String> = o.keys().filter(|k| !format.keys().contains(&k.as_str())).cloned().collect();
    if let Some((key, role, content)) = conversation(format) {
        for m in v[key].as_array().into_iter().flatten().filter_map(Value::as_object) {
            for k in m.keys().filter(|k| ![role, content, "weight"].contains(&k.as_str())) {
                let name = format!("{key}[].{k}");
                if !out.contains(&name) {
                    out.push(name);
                }
            }
        }
    }
    out
}

/// Refuses a line whose training text is ambiguous, or a key that changes the conversation.
/// A text beside a prompt/completion pair: which is the document, which the target? (A lone
/// `prompt` beside a text — Cosmopedia's — or a conversation's extra `text` or `prompt` —
/// Alpaca's rendered prompt, UltraChat's first question — only repeats it, and is reported.)
fn check_keys(v: &Value, format: Format) -> Result<(), String> {
    let Some(o) = v.as_object() else { return Err("is not a JSON object".into()) };
    if format == Format::Text && o.contains_key("prompt") && o.contains_key("completion") {
        return Err("holds \"prompt\" and \"completion\" beside \"text\": train on the text, or on the \
                    prompt/completion pair (the completion the target)? Keep one"
            .into());
    }
    let chat = matches!(format, Format::Messages | Format::ShareGpt | Format::Alpaca);
    match REFUSED_KEYS.iter().find(|(k, _)| chat && o.get(*k).is_some_and(set)) {
        Some((k, why)) => Err(format!("\"{k}\": {why}")),
        None => Ok(()),
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
    check_keys(v, format)?;
    // A line's system prompt (ShareGPT's, Alpaca's; a messages line may have one too) comes first.
    let system = match v.get("system") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.is_empty() => None,
        Some(Value::String(s)) => Some(Message::new("system", s)),
        Some(_) => return Err("\"system\" is not a string".into()),
    };
    let with_system = |mut m: Vec<Message>| {
        if let Some(s) = &system {
            if m.first().is_some_and(|f| f.role == "system") {
                return Err("has a \"system\" prompt and a system turn first: keep one".to_string());
            }
            m.insert(0, s.clone());
        }
        Ok(Document::Chat(m))
    };
    Ok(match format {
        Format::Text => Document::Pieces(vec![(string("text")?, true)]),
        Format::PromptCompletion => Document::Pieces(vec![(string("prompt")?, false), (string("completion")?, true)]),
        Format::Messages => with_system(turns(v, "messages", "role", "content", &[])?)?,
        Format::ShareGpt => {
            let names = [("human", "user"), ("gpt", "assistant"), ("user", "user"), ("assistant", "assistant")];
            with_system(turns(v, "conversations", "from", "value", &names)?)?
        }
        Format::Alpaca => {
            let (instruction, output) = (string("instruction")?, string("output")?);
            let input = match v.get("input") {
                None | Some(Value::Null) => String::new(),
                Some(Value::String(s)) => s.clone(),
                Some(_) => return Err("\"input\" is not a string".into()),
            };
            let user = if input.is_empty() { instruction } else { format!("{instruction}\n\n{input}") };
            with_system(vec![Message::new("user", &user), Message::new("assistant", &output)])?
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
        let train = check_message_keys(m, key, i)?;
        out.push(Message { train, ..Message::new(role, content) });
    }
    Ok(out)
}

/// A message's keys beyond its role and content: OpenAI's `weight` (1, or 0 for a turn that is
/// context only: returned as whether it trains) is read; keys that change what the template
/// renders (tool calls, a speaker's `name`, separate reasoning) are refused rather than
/// dropped; the rest (`timestamp`, `language`) change nothing and are reported
/// ([`unread_keys`]).
fn check_message_keys(m: &Value, key: &str, i: usize) -> Result<bool, String> {
    let Some(o) = m.as_object() else { return Err(format!("{key}[{i}] is not an object")) };
    if let Some((k, why)) = REFUSED_MESSAGE_KEYS.iter().find(|(k, _)| o.get(*k).is_some_and(set)) {
        return Err(format!("{key}[{i}].{k} = {}: {why}", o[*k]));
    }
    match o.get("weight") {
        None | Some(Value::Null) => Ok(true),
        Some(w) if w.as_f64() == Some(1.0) => Ok(true),
        Some(w) if w.as_f64() == Some(0.0) => Ok(false),
        Some(w) => Err(format!("{key}[{i}].weight = {w}: a turn's weight is 0 (context only) or 1 (trained)")),
    }
}

/// Why a conversation's turns do not alternate (a system turn first, then user and assistant by
/// turns), if they do not: most templates render such a conversation as it is, a few refuse it.
fn turn_order(messages: &[Message]) -> Option<String> {
    let start = usize::from(messages.first().is_some_and(|m| m.role == "system"));
    let mut last: Option<&str> = None;
    for (i, m) in messages.iter().enumerate().skip(start) {
        if m.role == "system" {
            return Some(format!("a system turn at turn {} of {}, not first", i + 1, messages.len()));
        }
        if last == Some(m.role.as_str()) {
            return Some(format!("turns {} and {} are both {}", i, i + 1, m.role));
        }
        last = Some(&m.role);
    }
    None
}

/// One warning for the conversations of a file whose turns do not alternate: the first one's
/// line and why, and the lines of the others.
pub fn turn_order_warning(path: &std::path::Path, docs: &[(usize, Document)]) -> Option<String> {
    let bad: Vec<(usize, String)> = docs
        .iter()
        .filter_map(|(line, d)| match d {
            Document::Chat(m) => turn_order(m).map(|why| (*line, why)),
            Document::Pieces(_) => None,
        })
        .collect();
    let ((line, why), rest) = bad.split_first()?;
    let more = match rest.len() {
        0 => String::new(),
        n => {
            let lines: Vec<String> = rest.iter().take(5).map(|(l, _)| l.to_string()).collect();
            let etc = if n > 5 { ", …" } else { "" };
            format!("; {n} more conversation(s) likewise (line {}{etc})", lines.join(", "))
        }
    };
    Some(format!(
        "{}:{line}: the turns do not alternate ({why}){more}; they are rendered as they stand — check the data \
         (system first, then user and assistant by turns)",
        path.display()
    ))
}
