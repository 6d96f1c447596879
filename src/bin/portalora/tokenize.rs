//! `portalora tokenize`: each document of --data as training sees it, before packing.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;

use portalora::data::{self, ChatOptions, TrainOn};
use portalora::io::tokenizer::Tokenizer;

#[derive(clap::Args, Debug)]
pub(crate) struct TokenizeArgs {
    /// A .gguf file or a Hugging Face folder (its tokenizer and chat template are used).
    #[arg(long)]
    model: PathBuf,
    /// Text, a folder of texts, or JSONL, read as `train --data` reads it.
    #[arg(long)]
    data: PathBuf,
    /// A chat template (Jinja) for conversations in --data, replacing the model's.
    #[arg(long)]
    chat_template: Option<PathBuf>,
    /// Which tokens of a conversation are loss targets: assistant or all [default: assistant].
    #[arg(long, value_parser = |s: &str| s.parse::<TrainOn>())]
    train_on: Option<TrainOn>,
    /// One JSON object per document: {"ids": [...], "targets": [...]}.
    #[arg(long)]
    json: bool,
}

impl TokenizeArgs {
    pub(crate) fn check_inputs(&self) -> Result<(), String> {
        let chat = self.chat_template.as_deref();
        super::check_inputs(&[("--model", Some(&self.model)), ("--data", Some(&self.data)), ("--chat-template", chat)])
    }
}

pub(crate) fn tokenize(a: &TokenizeArgs) -> Result<(), Box<dyn std::error::Error>> {
    let tok = Tokenizer::for_model(&a.model)?;
    let name = a.model.display().to_string();
    let given = data::chat_flags(a.chat_template.as_deref(), a.train_on);
    let opts = ChatOptions {
        template_file: a.chat_template.as_deref(),
        train_on: a.train_on.unwrap_or_default(),
        model: &name,
        given: &given,
    };
    let (docs, sources) = data::tokenized_documents(&a.data, &tok, &opts)?;
    if !sources.unread_keys.is_empty() {
        let keys: Vec<String> = sources.unread_keys.iter().map(|k| format!("{k:?}")).collect();
        errln!("note: {}: keys not read: {}", a.data.display(), keys.join(", "));
    }
    for n in sources.notes() {
        errln!("note: {n}");
    }
    let mut out = std::io::stdout().lock();
    if a.json {
        for d in &docs {
            let targets: Vec<u8> = d.predict.iter().map(|&p| u8::from(p)).collect();
            writeln!(out, "{}", serde_json::json!({"ids": d.ids, "targets": targets}))?;
        }
        return Ok(());
    }
    // Targets in bold green on a terminal, between [[ and ]] elsewhere.
    let (on, off) = if std::io::stdout().is_terminal() { ("\x1b[1;32m", "\x1b[0m") } else { ("[[", "]]") };
    let plural = if docs.len() == 1 { "" } else { "s" };
    writeln!(out, "{} document{plural}; loss targets shown {on}like this{off}", docs.len())?;
    for (i, d) in docs.iter().enumerate() {
        let targets = d.predict.iter().filter(|&&p| p).count();
        let note = if d.no_assistant { ", no assistant turn" } else { "" };
        writeln!(out, "\n--- document {} ({} tokens, {targets} targets{note})", i + 1, d.ids.len())?;
        for (text, target) in data::target_runs(&tok, d)? {
            if target {
                write!(out, "{on}{text}{off}")?;
            } else {
                write!(out, "{text}")?;
            }
        }
        writeln!(out)?;
    }
    Ok(())
}
