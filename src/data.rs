//! Training data: a text file, a folder of text files, or JSONL (`{"text": …}` or
//! `{"prompt": …, "completion": …}`), tokenized with the model's tokenizer and packed into rows
//! of `seq` tokens, split into training and validation rows, and walked in a seeded order.
//!
//! Packing: documents are tokenized one by one, each followed by the end-of-sequence token when
//! the tokenizer has one, and concatenated into one stream that is cut into rows of exactly `seq`
//! tokens (the last partial row is dropped and counted in the summary). Each token carries a flag
//! saying whether it is a target of the loss: every token of a text, and only the completion's
//! tokens (and its end-of-sequence token) of a prompt/completion pair, so the loss is masked to
//! completions as in supervised fine-tuning.

use std::path::{Path, PathBuf};

use crate::io::tokenizer::Tokenizer;
use crate::reference::Rng;

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not UTF-8 text (the first bad byte is at offset {offset}); convert it to UTF-8")]
    NotUtf8 { path: PathBuf, offset: usize },
    #[error("{path}:{line}: {message}")]
    Jsonl { path: PathBuf, line: usize, message: String },
    #[error("{path}: {message}")]
    Empty { path: PathBuf, message: String },
    #[error("{path}: {message}")]
    Format { path: PathBuf, message: String },
    #[error("{path}: tokenizing: {message}")]
    Tokenize { path: PathBuf, message: String },
}

type Result<T> = std::result::Result<T, DataError>;

/// One packed row: `seq` token ids and which of them are loss targets.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    pub ids: Vec<u32>,
    pub predict: Vec<bool>,
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
}

impl std::fmt::Display for DataSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} file{}, {} document{}, {} tokens ({} loss targets, {} dropped) → {} training + {} validation rows of {}",
            self.files,
            if self.files == 1 { "" } else { "s" },
            self.documents,
            if self.documents == 1 { "" } else { "s" },
            self.tokens,
            self.target_tokens,
            self.dropped_tokens,
            self.train_rows,
            self.val_rows,
            self.seq
        )
    }
}

/// Packed training and validation rows.
#[derive(Clone, Debug)]
pub struct Dataset {
    pub train: Vec<Row>,
    pub val: Vec<Row>,
    pub summary: DataSummary,
}

/// A document before tokenization: (text, is it a loss target) pieces.
type Document = Vec<(String, bool)>;

/// The files under `path` (a file, or every file of a folder and its subfolders, sorted).
fn files_of(path: &Path) -> Result<Vec<PathBuf>> {
    let io = |source| DataError::Io { path: path.to_path_buf(), source };
    let meta = std::fs::metadata(path).map_err(io)?;
    if !meta.is_dir() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut out = Vec::new();
    let mut stack = vec![path.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let entries = std::fs::read_dir(&dir).map_err(|source| DataError::Io { path: dir.clone(), source })?;
        for e in entries {
            let p = e.map_err(|source| DataError::Io { path: dir.clone(), source })?.path();
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if name.starts_with('.') {
                continue;
            }
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out.sort();
    if out.is_empty() {
        return Err(DataError::Empty { path: path.to_path_buf(), message: "the folder holds no files".into() });
    }
    Ok(out)
}

fn read_text(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).map_err(|source| DataError::Io { path: path.to_path_buf(), source })?;
    String::from_utf8(bytes)
        .map_err(|e| DataError::NotUtf8 { path: path.to_path_buf(), offset: e.utf8_error().valid_up_to() })
}

/// The documents of one file: JSONL (by extension `.jsonl`) or plain text. A `.json` file is
/// refused with a hint rather than trained on as text (its brackets and quotes would be learnt).
pub fn documents(path: &Path) -> Result<Vec<Document>> {
    let text = read_text(path)?;
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
    if ext == "json" {
        return Err(json_hint(path, &text));
    }
    if ext != "jsonl" {
        return Ok(if text.trim().is_empty() { Vec::new() } else { vec![vec![(text, true)]] });
    }
    let mut docs = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let err = |message: String| DataError::Jsonl { path: path.to_path_buf(), line: i + 1, message };
        let v: serde_json::Value = serde_json::from_str(line).map_err(|e| err(format!("not JSON: {e}")))?;
        let field = |k: &str| v.get(k).map(|x| x.as_str().ok_or_else(|| err(format!("\"{k}\" is not a string"))));
        match (field("text"), field("prompt"), field("completion")) {
            (Some(t), _, _) => docs.push(vec![(t?.to_string(), true)]),
            (None, Some(p), Some(c)) => docs.push(vec![(p?.to_string(), false), (c?.to_string(), true)]),
            _ => return Err(err("expected {\"text\": ...} or {\"prompt\": ..., \"completion\": ...}".into())),
        }
    }
    Ok(docs)
}

/// Why a `.json` file is not read as data, and what to do instead.
fn json_hint(path: &Path, text: &str) -> DataError {
    let message = match serde_json::from_str::<serde_json::Value>(text) {
        Ok(serde_json::Value::Array(_)) => format!(
            "holds a JSON array; --data reads JSON Lines, one object per line in a .jsonl file: convert it \
             with jq -c '.[]' {} > data.jsonl",
            path.display()
        ),
        Ok(v) if v.get("input_ids").is_some() => "holds token ids; pass it with --ids instead of --data".into(),
        _ => "a .json file is not read as training data; use text (.txt), a folder of texts, or JSON Lines (.jsonl)"
            .into(),
    };
    DataError::Format { path: path.to_path_buf(), message }
}

/// Tokenizes `path` (see the module docs), packs it into rows of `seq` tokens and splits off
/// `val_fraction` of the rows (at least one when there are two or more) for validation, chosen
/// by a shuffle seeded with `seed`.
pub fn load(path: &Path, tok: &Tokenizer, seq: usize, val_fraction: f64, seed: u64) -> Result<Dataset> {
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
    let files = files_of(path)?;
    let mut summary = DataSummary { files: files.len(), seq, ..DataSummary::default() };
    let (mut ids, mut predict) = (Vec::new(), Vec::new());
    for file in &files {
        for doc in documents(file)? {
            summary.documents += 1;
            // A model that expects BOS before a text gets it before every document (never a target).
            if let Some(bos) = tok.bos_id.filter(|_| tok.add_bos) {
                ids.push(bos);
                predict.push(false);
            }
            for (text, target) in doc {
                let t = tok
                    .encode(&text)
                    .map_err(|e| DataError::Tokenize { path: file.clone(), message: e.to_string() })?;
                predict.extend(std::iter::repeat_n(target, t.len()));
                ids.extend(t);
            }
            if let Some(eos) = tok.eos_id {
                ids.push(eos);
                predict.push(true);
            }
        }
    }
    let (rows, summary) = pack(ids, predict, seq, summary);
    let mut ds = split(rows, val_fraction, seed, summary);
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
    ds.summary.train_rows = ds.train.len();
    ds.summary.val_rows = ds.val.len();
    Ok(ds)
}

/// Cuts the token stream into rows of `seq`.
pub fn pack(ids: Vec<u32>, predict: Vec<bool>, seq: usize, mut summary: DataSummary) -> (Vec<Row>, DataSummary) {
    summary.tokens = ids.len();
    summary.target_tokens = predict.iter().filter(|&&p| p).count();
    let rows: Vec<Row> = ids
        .chunks_exact(seq)
        .zip(predict.chunks_exact(seq))
        .map(|(i, p)| Row { ids: i.to_vec(), predict: p.to_vec() })
        .collect();
    summary.dropped_tokens = ids.len() % seq;
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
