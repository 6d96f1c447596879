//! Training data: a text file, a folder of text files, or JSONL in one of the formats of
//! [`formats`] (text, prompt/completion, OpenAI messages, ShareGPT, Alpaca), tokenized with the
//! model's tokenizer (conversations rendered with its chat template) and packed into rows of
//! `seq` tokens, split into training and validation rows, and walked in a seeded order.
//!
//! Packing: documents are tokenized one by one and concatenated into one stream that is cut into
//! rows of exactly `seq` tokens (the last partial row is dropped and counted in the summary); each
//! token keeps its position in its document, so that the model attends within documents only,
//! and a document's first token is never a target ([`pack`]). A
//! text gets BOS first where the model asks for it and the end-of-sequence token after it; a
//! conversation is its template's text as rendered (the template writes its own BOS and
//! end-of-turn tokens). Each token carries a flag saying whether it is a target of the loss:
//! every token of a text; the completion's tokens (and its end-of-sequence token) of a
//! prompt/completion pair; of a conversation, with `--train-on assistant` (the default), the
//! tokens of each assistant message and the end-of-turn text that closes it, with `--train-on
//! all` every token.

mod files;
pub mod formats;
mod tokenize;

use files::files_of;
pub use files::{documents, documents_of_text, Documents};

pub use tokenize::{
    chat_flags, target_runs, tokenize, tokenized_documents, tokenized_text, ChatOptions, Tokenized, TrainOn,
};

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use crate::io::tokenizer::Tokenizer;
use crate::rng::Rng;

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: no such file or folder")]
    Missing { path: PathBuf },
    #[error("{path}: not UTF-8 text (the first bad byte is at offset {offset}); convert it to UTF-8")]
    NotUtf8 { path: PathBuf, offset: usize },
    #[error("{path}:{line}: {message}")]
    Jsonl { path: PathBuf, line: usize, message: String },
    #[error("{path}:{line}: not JSON: {source}")]
    JsonLine {
        path: PathBuf,
        line: usize,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path}: {message}")]
    Empty { path: PathBuf, message: String },
    #[error("{path}: {message}")]
    Format { path: PathBuf, message: String },
    /// Tokenizing line `line` (0: a whole file) of `path` (`None`: decoding, of no file).
    #[error("{}: tokenizing: {}{source}", place(.path), at_line(.line))]
    Tokenize {
        path: Option<PathBuf>,
        line: usize,
        #[source]
        source: crate::io::tokenizer::TokenizerError,
    },
    #[error(
        "{path}: holds conversations, and the model {model} has no chat template to render them with; pass one \
         with --chat-template FILE (a Jinja file such as the chat_template.jinja of the model's instruct version)"
    )]
    NoTemplate { path: PathBuf, model: String },
    #[error("{path}: {source}")]
    Template {
        path: PathBuf,
        #[source]
        source: crate::io::tokenizer::TokenizerError,
    },
    #[error("{path}:{line}: {source}")]
    Chat {
        path: PathBuf,
        line: usize,
        #[source]
        source: crate::io::chat::ChatError,
    },
}

type Result<T> = std::result::Result<T, DataError>;

/// [`DataError::Tokenize`]'s file, or what it was doing without one.
fn place(path: &Option<PathBuf>) -> std::path::Display<'_> {
    path.as_deref().unwrap_or(Path::new("(decoding)")).display()
}

fn at_line(line: &usize) -> String {
    if *line > 0 {
        format!("line {line}: ")
    } else {
        String::new()
    }
}

/// One packed row: `seq` token ids, which of them are loss targets, and each token's position
/// in its document (0 where one starts).
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    pub ids: Vec<u32>,
    pub predict: Vec<bool>,
    pub pos: Vec<u32>,
}

/// What was read, for the user.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DataSummary {
    pub files: usize,
    pub documents: usize,
    pub tokens: usize,
    /// Tokens that are loss targets (fewer than `tokens` with prompt/completion data).
    pub target_tokens: usize,
    /// Tokens of the last partial row, not used.
    pub dropped_tokens: usize,
    pub train_rows: usize,
    pub val_rows: usize,
    pub seq: usize,
    /// Conversations without an assistant turn (no targets with `--train-on assistant`).
    #[serde(default)]
    pub no_assistant: usize,
    /// Conversations among the documents (rendered with the chat template).
    #[serde(default)]
    pub conversations: usize,
    /// Padding tokens added to make one document per row (`--no-packing`).
    #[serde(default)]
    pub padding_tokens: usize,
    /// JSONL keys the data's format does not read (`id`, `source`, ...), said rather than
    /// dropped silently.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unread_keys: Vec<String>,
    /// What was done to the files or should be checked in them, one line each ([`Sources::notes`]):
    /// shown as notes beside the summary's line, not in it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

impl std::fmt::Display for DataSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let rows = format!("{} training + {} validation rows", self.train_rows, self.val_rows);
        self.write(f, &rows, "loss targets")
    }
}

impl DataSummary {
    /// The summary as `eval` reads data: every row scored, none held out.
    pub fn scored(&self) -> String {
        let n = self.train_rows + self.val_rows;
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = self.write(&mut out, &format!("{n} row{}", if n == 1 { "" } else { "s" }), "scored");
        out
    }

    fn write(&self, f: &mut impl std::fmt::Write, rows: &str, targets: &str) -> std::fmt::Result {
        let s = |n: usize| if n == 1 { "" } else { "s" };
        write!(
            f,
            "{} file{}, {} document{}{}, {} tokens ({} {targets}, {} dropped) → {rows} of {}",
            self.files,
            s(self.files),
            self.documents,
            s(self.documents),
            if self.conversations > 0 { format!(" ({} conversations)", self.conversations) } else { String::new() },
            self.tokens,
            self.target_tokens,
            self.dropped_tokens,
            self.seq
        )?;
        if self.padding_tokens > 0 {
            write!(f, ", one document per row ({} padding tokens, never targets)", self.padding_tokens)?;
        }
        if self.no_assistant > 0 {
            write!(f, "; {} conversation(s) without an assistant turn (no targets)", self.no_assistant)?;
        }
        if !self.unread_keys.is_empty() {
            let keys: Vec<String> = self.unread_keys.iter().map(|k| format!("{k:?}")).collect();
            write!(f, "; keys not read: {}", keys.join(", "))?;
        }
        Ok(())
    }
}

/// Packed training and validation rows.
#[derive(Clone, Debug)]
pub struct Dataset {
    pub train: Vec<Row>,
    pub val: Vec<Row>,
    pub summary: DataSummary,
}

/// Tokenizes `path` (see the module docs), packs it into rows of `seq` tokens and splits off
/// `val_fraction` of the rows (at least one when there are two or more) for validation, chosen
/// by a shuffle seeded with `seed`. Conversations are refused (no template); see [`load_with`].
pub fn load(path: &Path, tok: &Tokenizer, seq: usize, val_fraction: f64, seed: u64) -> Result<Dataset> {
    load_with(path, tok, &ChatOptions::default(), Packing::Packed, seq, val_fraction, seed)
}

/// How documents become rows.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Packing {
    /// One stream of documents cut into rows of exactly `seq` tokens.
    #[default]
    Packed,
    /// One document per row (a longer one cut into pieces of `seq`), padded to `seq` with tokens
    /// that are never targets; causal attention never looks ahead, so nothing attends to them.
    PerDocument,
}

/// [`load`] with conversations rendered as `chat` says and rows made as `packing` says.
pub fn load_with(
    path: &Path,
    tok: &Tokenizer,
    chat: &ChatOptions,
    packing: Packing,
    seq: usize,
    val_fraction: f64,
    seed: u64,
) -> Result<Dataset> {
    let (docs, sources) = tokenized_documents(path, tok, chat)?;
    dataset(path, docs, sources, packing, seq, val_fraction, seed, tok)
}

/// What the documents came from: how many files, the JSONL keys their format did not read, and
/// what the user should hear of (a BOM dropped, CRLF read as LF, hidden files skipped, warnings).
#[derive(Clone, Debug, Default)]
pub struct Sources {
    pub files: usize,
    pub unread_keys: BTreeSet<String>,
    /// Files that began with a UTF-8 byte-order mark (dropped).
    pub bom_files: Vec<PathBuf>,
    /// Plain-text files whose CRLF line ends were read as LF.
    pub crlf_files: Vec<PathBuf>,
    /// Names under a `--data` folder skipped because they start with `.`.
    pub hidden: usize,
    pub warnings: Vec<String>,
}

impl Sources {
    /// Takes in what one file's [`Documents`] say besides the documents.
    pub fn add(&mut self, path: &Path, d: &mut Documents) {
        self.unread_keys.append(&mut d.unread_keys);
        if d.bom {
            self.bom_files.push(path.to_path_buf());
        }
        if d.crlf {
            self.crlf_files.push(path.to_path_buf());
        }
        self.warnings.append(&mut d.warnings);
    }

    /// What to say about the files, once each (a folder of many files gets one line per kind).
    pub fn notes(&self) -> Vec<String> {
        let some = |files: &[PathBuf]| match files {
            [one] => one.display().to_string(),
            [first, rest @ ..] => format!("{} files ({} and {} more)", files.len(), first.display(), rest.len()),
            [] => String::new(),
        };
        let mut notes = Vec::new();
        if !self.bom_files.is_empty() {
            notes.push(format!("{}: a UTF-8 byte-order mark at the start was dropped", some(&self.bom_files)));
        }
        if !self.crlf_files.is_empty() {
            notes.push(format!("{}: CRLF line ends were read as LF", some(&self.crlf_files)));
        }
        if self.hidden > 0 {
            notes.push(format!("{} hidden file(s) or folder(s) (names starting with '.') skipped", self.hidden));
        }
        notes.extend(self.warnings.iter().cloned());
        notes
    }
}

/// Tokenized documents (of the files under `path`, or a text pasted in the page) made into
/// rows as `packing` says and split into training and validation rows: what `train --data` and
/// the page's runs train on.
pub fn dataset(
    path: &Path,
    docs: Vec<Tokenized>,
    sources: Sources,
    packing: Packing,
    seq: usize,
    val_fraction: f64,
    seed: u64,
    tok: &Tokenizer,
) -> Result<Dataset> {
    if seq < 2 {
        return Err(DataError::Empty {
            path: path.to_path_buf(),
            message: format!("--seq {seq}: rows need 2 tokens or more"),
        });
    }
    if !(0.0..1.0).contains(&val_fraction) {
        return Err(DataError::Empty {
            path: path.to_path_buf(),
            message: format!("validation fraction {val_fraction} must be in [0, 1)"),
        });
    }
    let notes = sources.notes();
    let unread_keys = sources.unread_keys.into_iter().collect();
    let summary = DataSummary { files: sources.files, seq, unread_keys, notes, ..DataSummary::default() };
    let (rows, summary) = rows_of(docs, packing, seq, tok.eos_id.unwrap_or(0), summary);
    let ds = split(rows, val_fraction, seed, summary);
    if ds.train.is_empty() {
        return Err(DataError::Empty {
            path: path.to_path_buf(),
            message: format!(
                "{} tokens make {} rows of --seq {seq}; that leaves nothing to train on: use a smaller --seq or more text",
                ds.summary.tokens,
                ds.train.len() + ds.val.len()
            ),
        });
    }
    Ok(ds)
}

/// Packs tokenized documents into rows as `packing` says, with the summary's counts.
pub fn rows_of(
    docs: Vec<Tokenized>,
    packing: Packing,
    seq: usize,
    pad: u32,
    mut summary: DataSummary,
) -> (Vec<Row>, DataSummary) {
    summary.documents += docs.len();
    summary.no_assistant += docs.iter().filter(|d| d.no_assistant).count();
    summary.conversations += docs.iter().filter(|d| d.chat).count();
    match packing {
        Packing::Packed => pack(docs, seq, summary),
        Packing::PerDocument => pad_rows(docs, seq, pad, summary),
    }
}

/// Concatenates the documents into one stream and cuts it into rows of `seq` (the shorter tail
/// dropped). Each token keeps its position in its document, counted afresh where a document
/// continues into the next row (a piece of at most `seq` tokens): the model attends within each
/// document only. A document's first token is never a target: nothing before it in its document
/// predicts it.
pub fn pack(docs: Vec<Tokenized>, seq: usize, mut summary: DataSummary) -> (Vec<Row>, DataSummary) {
    let (mut ids, mut predict, mut pos) = (Vec::new(), Vec::new(), Vec::new());
    for d in docs {
        for (i, (id, p)) in d.ids.into_iter().zip(d.predict).enumerate() {
            ids.push(id);
            predict.push(p && i > 0);
            pos.push(i as u32);
        }
    }
    summary.tokens = ids.len();
    let mut rows = Vec::with_capacity(ids.len() / seq);
    for start in (0..ids.len() / seq).map(|r| r * seq) {
        let (mut p, mut row_pos) = (predict[start..start + seq].to_vec(), pos[start..start + seq].to_vec());
        // The rest of a document begun in an earlier row: a piece of its own here.
        let carried = row_pos[0];
        if carried > 0 {
            // Its positions run on from `carried` until the next document starts at 0.
            for q in row_pos.iter_mut().take_while(|q| **q >= carried) {
                *q -= carried;
            }
        }
        p[0] = false;
        rows.push(Row { ids: ids[start..start + seq].to_vec(), predict: p, pos: row_pos });
    }
    let tail = rows.len() * seq;
    summary.dropped_tokens = ids.len() - tail;
    summary.target_tokens = rows.iter().map(|r| r.predict.iter().filter(|&&p| p).count()).sum::<usize>()
        + predict[tail..].iter().filter(|&&p| p).count();
    (rows, summary)
}

/// One row per document piece of at most `seq` tokens, padded with `pad` (never a target). A
/// piece's first token is not a target either: nothing before it in its row predicts it.
pub fn pad_rows(docs: Vec<Tokenized>, seq: usize, pad: u32, mut summary: DataSummary) -> (Vec<Row>, DataSummary) {
    let mut rows = Vec::new();
    for d in docs {
        summary.tokens += d.ids.len();
        for (ids, predict) in d.ids.chunks(seq).zip(d.predict.chunks(seq)) {
            let n = seq - ids.len();
            summary.padding_tokens += n;
            let ids = ids.iter().copied().chain(std::iter::repeat_n(pad, n)).collect();
            let mut predict: Vec<bool> = predict.iter().copied().chain(std::iter::repeat_n(false, n)).collect();
            predict[0] = false;
            summary.target_tokens += predict.iter().filter(|&&p| p).count();
            // The padding is a document of its own after the piece (never attended by it).
            let pos = (0..seq - n).chain(0..n).map(|p| p as u32).collect();
            rows.push(Row { ids, predict, pos });
        }
    }
    (rows, summary)
}

/// Splits rows into training and validation by a seeded shuffle.
pub fn split(rows: Vec<Row>, val_fraction: f64, seed: u64, summary: DataSummary) -> Dataset {
    let n = rows.len();
    let n_val =
        if n >= 2 && val_fraction > 0.0 { ((n as f64 * val_fraction).round() as usize).clamp(1, n - 1) } else { 0 };
    let order = permutation(n, seed ^ 0x5eed_da7a);
    let mut is_val = vec![false; n];
    for &i in &order[..n_val] {
        is_val[i] = true;
    }
    let (mut train, mut val) = (Vec::new(), Vec::new());
    for (i, r) in rows.into_iter().enumerate() {
        if is_val[i] {
            val.push(r);
        } else {
            train.push(r);
        }
    }
    Dataset { summary: DataSummary { train_rows: train.len(), val_rows: val.len(), ..summary }, train, val }
}

/// A seeded Fisher–Yates permutation of 0..n.
pub fn permutation(n: usize, seed: u64) -> Vec<usize> {
    let mut rng = Rng::new(seed);
    let mut p: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        p.swap(i, j);
    }
    p
}

/// The order rows are read in: epoch after epoch, each a fresh seeded shuffle of the training
/// rows. Its whole state is the number of rows read, so a checkpoint stores just that.
#[derive(Clone, Debug)]
pub struct Order {
    n: usize,
    seed: u64,
    shuffle: bool,
    epoch: u64,
    perm: Vec<usize>,
}

impl Order {
    pub fn new(n: usize, seed: u64, shuffle: bool) -> Order {
        let mut o = Order { n, seed, shuffle, epoch: u64::MAX, perm: Vec::new() };
        o.set_epoch(0);
        o
    }

    fn set_epoch(&mut self, e: u64) {
        if self.epoch != e {
            self.epoch = e;
            self.perm = if self.shuffle {
                permutation(self.n, self.seed ^ e.wrapping_mul(0x9E37_79B9))
            } else {
                (0..self.n).collect()
            };
        }
    }

    /// The index of the `k`-th row read (from 0), and its epoch.
    pub fn at(&mut self, k: u64) -> (usize, u64) {
        let e = k / self.n as u64;
        self.set_epoch(e);
        (self.perm[(k % self.n as u64) as usize], e)
    }
}
