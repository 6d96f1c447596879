//! Documents to tokens: each document of [`super::formats`] tokenized with the model's
//! tokenizer, conversations rendered with its chat template, and which tokens are loss targets
//! (see the parent module's docs); what `portalora tokenize` shows.

use std::path::Path;

use super::formats::Document;
use super::{documents, documents_of_text, files_of, DataError, Result, Sources};
use crate::io::chat::ChatTemplate;
use crate::io::tokenizer::Tokenizer;

/// Which tokens of a conversation are loss targets.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TrainOn {
    /// Each assistant message and the end-of-turn text that closes it (TRL's
    /// `assistant_only_loss`).
    #[default]
    Assistant,
    /// Every token.
    All,
}

impl std::str::FromStr for TrainOn {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "assistant" => Ok(TrainOn::Assistant),
            "all" => Ok(TrainOn::All),
            _ => Err(format!("--train-on {s:?}: use assistant or all")),
        }
    }
}

/// How conversations become tokens.
#[derive(Clone, Copy, Debug, Default)]
pub struct ChatOptions<'a> {
    /// A template file (`--chat-template`) that replaces the model's.
    pub template_file: Option<&'a Path>,
    pub train_on: TrainOn,
    /// The model's name, for the message when conversations come without a template.
    pub model: &'a str,
    /// The chat flags the user gave (`--chat-template`, `--train-on`): refused when the data
    /// holds no conversation, which would ignore them.
    pub given: &'a [&'a str],
}

/// The chat flags given, as a user wrote them, for [`ChatOptions::given`].
pub fn chat_flags(template_file: Option<&Path>, train_on: Option<TrainOn>) -> Vec<&'static str> {
    let given = [(template_file.is_some(), "--chat-template"), (train_on.is_some(), "--train-on")];
    given.into_iter().filter_map(|(g, f)| g.then_some(f)).collect()
}

/// One document's tokens before packing, and which are loss targets.
#[derive(Clone, Debug, PartialEq)]
pub struct Tokenized {
    pub ids: Vec<u32>,
    pub predict: Vec<bool>,
    /// A conversation without an assistant turn (it has no targets with `--train-on assistant`).
    pub no_assistant: bool,
    /// A conversation (rendered with the chat template).
    pub chat: bool,
}

/// Every document under `path` tokenized (what `portalora tokenize` prints), and what it came
/// from (the files read, the keys not read). The chat template is compiled at the first
/// conversation.
pub fn tokenized_documents(path: &Path, tok: &Tokenizer, chat: &ChatOptions) -> Result<(Vec<Tokenized>, Sources)> {
    let (files, hidden) = files_of(path)?;
    let mut out = Vec::new();
    let mut template = None;
    let mut sources = Sources { files: files.len(), hidden, ..Sources::default() };
    for file in &files {
        let mut d = documents(file)?;
        sources.add(file, &mut d);
        out.extend(tokenize_all(file, d.docs, tok, chat, &mut template)?);
    }
    check_chat_flags(path, chat, &template)?;
    Ok((out, sources))
}

/// A text pasted or picked in the browser, read as a file named `name` would be: JSONL when its
/// first non-empty line is a JSON object, else one text.
pub fn tokenized_text(
    name: &str,
    text: String,
    tok: &Tokenizer,
    chat: &ChatOptions,
) -> Result<(Vec<Tokenized>, Sources)> {
    let path = Path::new(name);
    // (A byte-order mark, dropped as the text is read, is no sign of either.)
    let first = |l: &str| l.trim_start_matches('\u{feff}').trim_start().to_string();
    let jsonl = text.lines().map(first).find(|l| !l.is_empty()).is_some_and(|l| l.starts_with('{'));
    let mut template = None;
    let mut d = documents_of_text(path, text, jsonl)?;
    let mut sources = Sources { files: 1, ..Sources::default() };
    sources.add(path, &mut d);
    let out = tokenize_all(path, d.docs, tok, chat, &mut template)?;
    check_chat_flags(path, chat, &template)?;
    Ok((out, sources))
}

/// Tokenizes `docs` of `path`, compiling the chat template into `template` at the first
/// conversation (`Some(None)`: the model has none).
fn tokenize_all(
    path: &Path,
    docs: Vec<(usize, Document)>,
    tok: &Tokenizer,
    chat: &ChatOptions,
    template: &mut Option<Option<ChatTemplate>>,
) -> Result<Vec<Tokenized>> {
    let mut out = Vec::with_capacity(docs.len());
    for (line, doc) in docs {
        if matches!(doc, Document::Chat(_)) && template.is_none() {
            let t = tok.chat_template(chat.template_file);
            *template = Some(t.map_err(|source| DataError::Template { path: path.to_path_buf(), source })?);
        }
        out.push(tokenize(path, line, doc, tok, template.as_ref().and_then(Option::as_ref), chat)?);
    }
    Ok(out)
}

/// Chat flags given for data without conversations would be ignored: refused.
fn check_chat_flags(path: &Path, chat: &ChatOptions, template: &Option<Option<ChatTemplate>>) -> Result<()> {
    if template.is_none() && !chat.given.is_empty() {
        return Err(DataError::Format {
            path: path.to_path_buf(),
            message: format!(
                "holds no conversations, so {} would be ignored; drop it, or give messages / ShareGPT / Alpaca JSONL",
                chat.given.join(" and ")
            ),
        });
    }
    Ok(())
}

/// A document's text in runs of tokens that are all targets or all not, decoded together so
/// that characters split across tokens come out whole (for showing what is trained on).
pub fn target_runs(tok: &Tokenizer, d: &Tokenized) -> Result<Vec<(String, bool)>> {
    let mut runs = Vec::new();
    let mut start = 0;
    while start < d.ids.len() {
        let flag = d.predict[start];
        let end = (start..d.ids.len()).find(|&j| d.predict[j] != flag).unwrap_or(d.ids.len());
        let text =
            tok.decode(&d.ids[start..end]).map_err(|source| DataError::Tokenize { path: None, line: 0, source })?;
        runs.push((text, flag));
        start = end;
    }
    Ok(runs)
}

/// One document's tokens and targets (see the module docs).
pub fn tokenize(
    path: &Path,
    line: usize,
    doc: Document,
    tok: &Tokenizer,
    template: Option<&ChatTemplate>,
    chat: &ChatOptions,
) -> Result<Tokenized> {
    let tokenize_err = |source| DataError::Tokenize { path: Some(path.to_path_buf()), line, source };
    let (mut ids, mut predict) = (Vec::new(), Vec::new());
    let messages = match doc {
        Document::Pieces(pieces) => {
            // A model that expects BOS before a text gets it before every document (never a target).
            if let Some(bos) = tok.bos_id.filter(|_| tok.add_bos) {
                ids.push(bos);
                predict.push(false);
            }
            for (text, target) in pieces {
                let t = tok.encode(&text).map_err(tokenize_err)?;
                predict.extend(std::iter::repeat_n(target, t.len()));
                ids.extend(t);
            }
            if let Some(eos) = tok.eos_id {
                ids.push(eos);
                predict.push(true);
            }
            first_is_no_target(&mut predict);
            return Ok(Tokenized { ids, predict, no_assistant: false, chat: false });
        }
        Document::Chat(m) => m,
    };
    let template =
        template.ok_or_else(|| DataError::NoTemplate { path: path.to_path_buf(), model: chat.model.to_string() })?;
    let chat_err = |source| DataError::Chat { path: path.to_path_buf(), line, source };
    // Counted where it leaves the conversation without targets (with --train-on all it has some).
    let no_assistant =
        chat.train_on == TrainOn::Assistant && !messages.iter().any(|m| m.role == "assistant" && m.train);
    // (A user turn's weight 0, as SlimOrca writes it, says what --train-on assistant does anyway.)
    if chat.train_on == TrainOn::All && messages.iter().any(|m| m.role == "assistant" && !m.train) {
        return Err(DataError::Jsonl {
            path: path.to_path_buf(),
            line,
            message: "an assistant turn has \"weight\": 0, but --train-on all trains every token: drop \
                      --train-on all (assistant turns of weight 1 are then the targets) or the weights"
                .into(),
        });
    }
    let (text, ranges) = match chat.train_on {
        TrainOn::Assistant => template.render_with_targets(&messages).map_err(chat_err)?,
        TrainOn::All => {
            (template.render(&messages, false).map_err(chat_err)?, std::iter::once(0..usize::MAX).collect())
        }
    };
    let (ids, offsets) = tok.encode_with_offsets(&text).map_err(tokenize_err)?;
    // A token is a target when its text overlaps an assistant range (as transformers'
    // char_to_token marks the tokens of its generation spans).
    let mut predict: Vec<bool> =
        offsets.iter().map(|&(s, e)| ranges.iter().any(|r| s < r.end && e.max(s + 1) > r.start)).collect();
    first_is_no_target(&mut predict);
    Ok(Tokenized { ids, predict, no_assistant, chat: true })
}

/// A document's first token is never a target: nothing before it in its document predicts it
/// (what packing trains, and what `portalora tokenize` shows).
fn first_is_no_target(predict: &mut [bool]) {
    if let Some(p) = predict.first_mut() {
        *p = false;
    }
}
