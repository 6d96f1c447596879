//! Chat templates: the Jinja text a model ships (`tokenizer_config.json`'s `chat_template`, a
//! `chat_template.jinja` beside it, or a GGUF's `tokenizer.chat_template`) rendered as
//! transformers' `apply_chat_template` renders it: trim_blocks and lstrip_blocks on,
//! `raise_exception`, a `tojson` that writes what Python's `json.dumps` writes, `strftime_now`,
//! the special tokens as variables (`bos_token`, `eos_token`), `tools` and `documents` as none,
//! Python's string and dict methods (minijinja-contrib's pycompat).
//!
//! [`ChatTemplate::render_with_targets`] also says which characters of a conversation are the
//! assistant's: for each assistant message, the text between the conversation rendered up to
//! the message before it with the generation prompt and the conversation rendered up to and
//! including it (the message and the template's end-of-turn text that closes it).

use std::ops::Range;

use minijinja::value::{Kwargs, Value};
use minijinja::{Environment, Error as JinjaError, ErrorKind};

#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    #[error("{origin}: the chat template does not parse: {message} (line {line}, column {column})")]
    Parse {
        origin: String,
        line: usize,
        column: usize,
        message: String,
        #[source]
        source: JinjaError,
    },
    #[error("{origin}: the chat template raised: {message}")]
    Raised { origin: String, message: String },
    #[error("{origin}: rendering the chat template failed: {source}")]
    Render {
        origin: String,
        #[source]
        source: JinjaError,
    },
    #[error(
        "{origin}: the chat template renders the conversation up to message {index} ({role}) as a text that \
         does not start with its rendering of the messages before it, so the assistant's tokens cannot be \
         told apart; train with --train-on all, or pass a template that renders prefixes consistently \
         (--chat-template)"
    )]
    NotPrefix { origin: String, index: usize, role: String },
}

type Result<T> = std::result::Result<T, ChatError>;

/// One message of a conversation.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Message {
    pub role: String,
    pub content: String,
    /// Whether an assistant message is a loss target under `--train-on assistant` (OpenAI's
    /// `"weight": 0` makes it context only). Not shown to the template.
    #[serde(skip)]
    pub train: bool,
}

impl Message {
    pub fn new(role: &str, content: &str) -> Message {
        Message { role: role.into(), content: content.into(), train: true }
    }
}

/// A compiled chat template with the special tokens it may print.
pub struct ChatTemplate {
    env: Environment<'static>,
    /// Where the template came from (a file, a GGUF key), for messages.
    pub origin: String,
    pub source: String,
    pub bos_token: String,
    pub eos_token: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ChatTemplate {{ origin: {:?}, {} bytes }}", self.origin, self.source.len())
    }
}

impl Clone for ChatTemplate {
    fn clone(&self) -> Self {
        Self::new(&self.origin, &self.source, &self.bos_token, &self.eos_token).expect("compiled once already")
    }
}

const NAME: &str = "chat_template";

impl ChatTemplate {
    /// Compiles `source`; a syntax error names the line and column.
    pub fn new(origin: &str, source: &str, bos_token: &str, eos_token: &str) -> Result<ChatTemplate> {
        let mut env = Environment::new();
        // Jinja's defaults in transformers' sandbox: blocks eat the newline after them and the
        // spaces before them; a single trailing newline of the template is dropped.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_filter("tojson", tojson);
        env.add_function("raise_exception", |message: String| -> std::result::Result<Value, JinjaError> {
            Err(JinjaError::new(ErrorKind::InvalidOperation, RAISED).with_source(Raised(message)))
        });
        env.add_function("strftime_now", |format: String| strftime_now(&format));
        let cleaned = strip_generation_tags(source);
        env.add_template_owned(NAME, cleaned.clone()).map_err(|e| parse_error(origin, &cleaned, e))?;
        Ok(ChatTemplate {
            env,
            origin: origin.into(),
            source: source.into(),
            bos_token: bos_token.into(),
            eos_token: eos_token.into(),
        })
    }

    /// The text of `messages`, with the assistant's turn opened after them when
    /// `add_generation_prompt`.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let t = self.env.get_template(NAME).expect("added in new");
        let ctx = minijinja::context! {
            messages => Value::from_serialize(messages),
            add_generation_prompt => add_generation_prompt,
            bos_token => &self.bos_token,
            eos_token => &self.eos_token,
            tools => Value::from(()),
            documents => Value::from(()),
        };
        t.render(ctx).map_err(|e| self.render_error(e))
    }

    /// The text of the whole conversation and the character ranges (byte offsets) that are the
    /// assistant's (see the module docs).
    pub fn render_with_targets(&self, messages: &[Message]) -> Result<(String, Vec<Range<usize>>)> {
        let full = self.render(messages, false)?;
        let mut ranges = Vec::new();
        for (i, m) in messages.iter().enumerate() {
            if m.role != "assistant" || !m.train {
                continue;
            }
            let before = self.render(&messages[..i], true)?;
            let through = self.render(&messages[..=i], false)?;
            let consistent = through.starts_with(&before) && full.starts_with(&through);
            if !consistent {
                return Err(ChatError::NotPrefix { origin: self.origin.clone(), index: i, role: m.role.clone() });
            }
            if through.len() > before.len() {
                ranges.push(before.len()..through.len());
            }
        }
        Ok((full, ranges))
    }

    /// The text the template writes after an assistant message to close its turn (ChatML's
    /// `<|im_end|>\n`, Llama 3's `<|eot_id|>`, Gemma's `<end_of_turn>\n`): generation stops at
    /// its first token.
    pub fn end_of_turn(&self) -> Result<String> {
        const MARK: &str = "\u{1}portalora-end-of-turn\u{1}";
        let msgs = [Message::new("user", "Hi"), Message::new("assistant", MARK)];
        let text = self.render(&msgs, false)?;
        Ok(text.rsplit_once(MARK).map(|(_, after)| after.to_string()).unwrap_or_default())
    }

    fn render_error(&self, e: JinjaError) -> ChatError {
        let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&e);
        while let Some(s) = source {
            if let Some(r) = s.downcast_ref::<Raised>() {
                return ChatError::Raised { origin: self.origin.clone(), message: r.0.clone() };
            }
            source = s.source();
        }
        ChatError::Render { origin: self.origin.clone(), source: e }
    }
}

const RAISED: &str = "raise_exception";

/// The message of a template's `raise_exception(...)`, carried through minijinja's error.
#[derive(Debug)]
struct Raised(String);

impl std::fmt::Display for Raised {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Raised {}

fn parse_error(origin: &str, source: &str, e: JinjaError) -> ChatError {
    let line = e.line().unwrap_or(0);
    let column = match (e.range(), line) {
        (Some(r), _) => {
            let start = r.start.min(source.len());
            start - source[..start].rfind('\n').map(|i| i + 1).unwrap_or(0) + 1
        }
        _ => 0,
    };
    let message = e.detail().map_or_else(|| e.to_string(), str::to_string);
    ChatError::Parse { origin: origin.into(), line, column, message, source: e }
}

/// transformers' `{% generation %}` blocks mark assistant text for its own mask and print
/// nothing themselves; the targets here come from rendering prefixes, so the tags go.
fn strip_generation_tags(source: &str) -> String {
    let re = regex::Regex::new(r"\{%-?\s*(end)?generation\s*-?%\}").expect("a valid pattern");
    re.replace_all(source, "").into_owned()
}

/// Python's `json.dumps(x, ensure_ascii=False, indent=..., separators=..., sort_keys=...)`.
fn tojson(v: Value, kwargs: Kwargs) -> std::result::Result<Value, JinjaError> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let separators: Option<Vec<String>> = kwargs.get("separators")?;
    let _ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    kwargs.assert_all_used()?;
    let json = serde_json::to_value(&v)
        .map_err(|e| JinjaError::new(ErrorKind::InvalidOperation, format!("tojson: {e}")).with_source(e))?;
    let (item, key) = match (&separators, indent) {
        (Some(s), _) if s.len() == 2 => (s[0].clone(), s[1].clone()),
        (_, Some(_)) => (",".into(), ": ".into()),
        _ => (", ".into(), ": ".into()),
    };
    let mut out = String::new();
    write_json(&json, &Json { indent, item: &item, key: &key, sort_keys: sort_keys.unwrap_or(false) }, 0, &mut out);
    Ok(Value::from(out))
}

struct Json<'a> {
    indent: Option<usize>,
    item: &'a str,
    key: &'a str,
    sort_keys: bool,
}

fn write_json(v: &serde_json::Value, f: &Json, depth: usize, out: &mut String) {
    use serde_json::Value as J;
    let newline = |out: &mut String, depth: usize| {
        if let Some(n) = f.indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * depth));
        }
    };
    // With an indent, Python ends items with the separator stripped of trailing spaces.
    let item = if f.indent.is_some() { f.item.trim_end() } else { f.item };
    match v {
        J::Array(a) if !a.is_empty() => {
            out.push('[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push_str(item);
                }
                newline(out, depth + 1);
                write_json(x, f, depth + 1, out);
            }
            newline(out, depth);
            out.push(']');
        }
        J::Object(o) if !o.is_empty() => {
            let mut keys: Vec<&String> = o.keys().collect();
            if f.sort_keys {
                keys.sort();
            }
            out.push('{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push_str(item);
                }
                newline(out, depth + 1);
                out.push_str(&serde_json::to_string(k).expect("a string serializes"));
                out.push_str(f.key);
                write_json(&o[k], f, depth + 1, out);
            }
            newline(out, depth);
            out.push('}');
        }
        J::Number(n) if n.is_f64() => out.push_str(&python_float(n.as_f64().unwrap_or(0.0))),
        other => out.push_str(&serde_json::to_string(other).expect("a JSON value serializes")),
    }
}

/// Python's `repr` of a float as JSON writes it (`1.0`, `1e-07`, `Infinity`).
fn python_float(x: f64) -> String {
    if x.is_nan() {
        return "NaN".into();
    }
    if x.is_infinite() {
        return if x > 0.0 { "Infinity".into() } else { "-Infinity".into() };
    }
    let s = format!("{x:?}");
    if s.contains('e') {
        // Rust writes 1e-7, Python 1e-07.
        let (m, e) = s.split_once('e').expect("checked");
        let (sign, digits) = if let Some(d) = e.strip_prefix('-') { ("-", d) } else { ("+", e) };
        return format!("{m}e{sign}{digits:0>2}");
    }
    s
}

/// `strftime_now(format)`: the current time (UTC) formatted by the common strftime directives.
fn strftime_now(format: &str) -> std::result::Result<String, JinjaError> {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    strftime(format, secs)
}

fn strftime(format: &str, unix: u64) -> std::result::Result<String, JinjaError> {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const DAYS: [&str; 7] = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"];
    let days = (unix / 86400) as i64;
    let rem = unix % 86400;
    let (y, m, d) = civil_from_days(days);
    let weekday = ((days + 3).rem_euclid(7)) as usize; // 1970-01-01 was a Thursday
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('Y') => out.push_str(&y.to_string()),
            Some('y') => out.push_str(&format!("{:02}", y.rem_euclid(100))),
            Some('m') => out.push_str(&format!("{m:02}")),
            Some('d') => out.push_str(&format!("{d:02}")),
            Some('B') => out.push_str(MONTHS[m as usize - 1]),
            Some('b') => out.push_str(&MONTHS[m as usize - 1][..3]),
            Some('A') => out.push_str(DAYS[weekday]),
            Some('a') => out.push_str(&DAYS[weekday][..3]),
            Some('H') => out.push_str(&format!("{:02}", rem / 3600)),
            Some('M') => out.push_str(&format!("{:02}", rem % 3600 / 60)),
            Some('S') => out.push_str(&format!("{:02}", rem % 60)),
            Some('%') => out.push('%'),
            other => {
                return Err(JinjaError::new(
                    ErrorKind::InvalidOperation,
                    format!(
                        "strftime_now: the directive %{} is not supported",
                        other.map(String::from).unwrap_or_default()
                    ),
                ))
            }
        }
    }
    Ok(out)
}

/// (year, month, day) of a day count since 1970-01-01 (Howard Hinnant's civil_from_days).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719468;
    let era = z.div_euclid(146097);
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + \
                          message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}\
                          {{ '<|im_start|>assistant\\n' }}{% endif %}";

    #[test]
    fn chatml_renders_and_marks_the_assistant() {
        let t = ChatTemplate::new("t", CHATML, "", "<|im_end|>").unwrap();
        let msgs = [Message::new("user", "Hi"), Message::new("assistant", "Hello!")];
        let (text, ranges) = t.render_with_targets(&msgs).unwrap();
        assert_eq!(text, "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n");
        assert_eq!(ranges.len(), 1);
        assert_eq!(&text[ranges[0].clone()], "Hello!<|im_end|>\n");
        assert_eq!(t.end_of_turn().unwrap(), "<|im_end|>\n");
    }

    #[test]
    fn errors_name_where_and_what() {
        let e = ChatTemplate::new("f.jinja", "hello\n{% if x %}oops", "", "").unwrap_err().to_string();
        assert!(e.contains("f.jinja") && e.contains("line 2"), "{e}");
        let t = ChatTemplate::new("f", "{{ raise_exception('no system role, please') }}", "", "").unwrap();
        let e = t.render(&[], false).unwrap_err().to_string();
        assert!(e.contains("raised: no system role, please"), "{e}");
    }

    #[test]
    fn python_helpers() {
        let t = ChatTemplate::new(
            "t",
            "{{ {'a': [1, 2.5, 'é'], 'b': none} | tojson }}|{{ 'x' | tojson(indent=2) }}|{{ ' hi '.strip() }}|{{ [1] | tojson(indent=2) }}",
            "",
            "",
        )
        .unwrap();
        assert_eq!(t.render(&[], false).unwrap(), "{\"a\": [1, 2.5, \"é\"], \"b\": null}|\"x\"|hi|[\n  1\n]");
        assert_eq!(strftime("%d %b %Y %H:%M:%S %A", 1_764_460_800 + 3661).unwrap(), "30 Nov 2025 01:01:01 Sunday");
        assert_eq!(python_float(1e-7), "1e-07");
        assert_eq!(python_float(2.0), "2.0");
    }
}
