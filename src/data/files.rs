//! Reading `--data`: the files under a path (hidden ones skipped), each file's documents (plain
//! text, or JSONL in one format of [`super::formats`]), and what was done to their text or
//! should be checked in it (a byte-order mark dropped, CRLF read as LF, warnings).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use super::formats::{self, Document, Format};
use super::{DataError, Result};

/// The files under `path` (a file, or every file of a folder and its subfolders, sorted; names
/// starting with `.` — `.git`, `.DS_Store`, an editor's swap file — are skipped, and counted),
/// and how many were skipped.
pub(super) fn files_of(path: &Path) -> Result<(Vec<PathBuf>, usize)> {
    let meta = std::fs::metadata(path).map_err(|source| match source.kind() {
        std::io::ErrorKind::NotFound => DataError::Missing { path: path.to_path_buf() },
        _ => DataError::Io { path: path.to_path_buf(), source },
    })?;
    if !meta.is_dir() {
        return Ok((vec![path.to_path_buf()], 0));
    }
    let mut hidden = 0;
    let mut out = Vec::new();
    let mut stack = vec![path.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let entries = std::fs::read_dir(&dir).map_err(|source| DataError::Io { path: dir.clone(), source })?;
        for e in entries {
            let p = e.map_err(|source| DataError::Io { path: dir.clone(), source })?.path();
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if name.starts_with('.') {
                hidden += 1;
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
        let why =
            if hidden > 0 { format!(" but {hidden} hidden one(s), whose names start with '.'") } else { String::new() };
        return Err(DataError::Empty { path: path.to_path_buf(), message: format!("the folder holds no files{why}") });
    }
    Ok((out, hidden))
}

fn read_text(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).map_err(|source| DataError::Io { path: path.to_path_buf(), source })?;
    String::from_utf8(bytes)
        .map_err(|e| DataError::NotUtf8 { path: path.to_path_buf(), offset: e.utf8_error().valid_up_to() })
}

/// The documents of one file: JSONL (by extension `.jsonl`, in one format of [`formats`]) or
/// plain text. A `.json` file is refused with a hint rather than trained on as text (its brackets
/// and quotes would be learnt). Each comes with its line (0 for plain text).
pub fn documents(path: &Path) -> Result<Documents> {
    let text = read_text(path)?;
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
    if ext == "json" {
        return Err(json_hint(path, &text));
    }
    documents_of_text(path, text, ext == "jsonl")
}

/// A file's documents, each with its line, the JSONL keys its format did not read, and what was
/// done to its text that the user should hear of.
#[derive(Debug, Default)]
pub struct Documents {
    pub docs: Vec<(usize, Document)>,
    pub unread_keys: BTreeSet<String>,
    /// It began with a UTF-8 byte-order mark, which was dropped (a tokenizer would make tokens
    /// of it, and JSON does not allow it).
    pub bom: bool,
    /// Its CRLF line ends were read as LF (plain text; JSONL's lines end either way).
    pub crlf: bool,
    /// Warnings naming the file and line: what is read as asked but likely not what was meant.
    pub warnings: Vec<String>,
}

/// The documents of a text as [`documents`] reads a file (`path` names it in messages): JSONL
/// when `jsonl`, else one plain-text document.
pub fn documents_of_text(path: &Path, text: String, jsonl: bool) -> Result<Documents> {
    let (bom, text) = match text.strip_prefix('\u{feff}') {
        Some(rest) => (true, rest.to_string()),
        None => (false, text),
    };
    if !jsonl {
        let crlf = text.contains("\r\n");
        let text = if crlf { text.replace("\r\n", "\n") } else { text };
        let warnings = json_lines_warning(path, &text).into_iter().collect();
        let docs = if text.trim().is_empty() { Vec::new() } else { vec![(0, Document::Pieces(vec![(text, true)]))] };
        return Ok(Documents { docs, bom, crlf, warnings, ..Documents::default() });
    }
    let mut docs = Vec::new();
    let mut unread_keys = BTreeSet::new();
    let mut first: Option<(usize, Format)> = None;
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let err = |message: String| DataError::Jsonl { path: path.to_path_buf(), line: i + 1, message };
        let v: serde_json::Value = serde_json::from_str(line).map_err(|source| DataError::JsonLine {
            path: path.to_path_buf(),
            line: i + 1,
            source,
        })?;
        let format = Format::of(&v).ok_or_else(|| err(formats::EXPECTED.into()))?;
        match first {
            None => first = Some((i + 1, format)),
            Some((l, f)) if f != format => {
                return Err(err(format!(
                    "this line is {} but line {l} is {}; a file holds one format (split it, or convert one)",
                    format.describe(),
                    f.describe()
                )))
            }
            _ => {}
        }
        docs.push((i + 1, formats::document(&v, format).map_err(err)?));
        unread_keys.extend(formats::unread_keys(&v, format));
    }
    let warnings = formats::turn_order_warning(path, &docs).into_iter().collect();
    Ok(Documents { docs, unread_keys, bom, warnings, ..Documents::default() })
}

/// A plain-text file whose first line is a JSON object of a `--data` format was most likely meant
/// as JSONL: it is trained on as text, braces and quotes included, and said.
fn json_lines_warning(path: &Path, text: &str) -> Option<String> {
    let (i, line) = text.lines().enumerate().find(|(_, l)| !l.trim().is_empty())?;
    let v: serde_json::Value = serde_json::from_str(line.trim()).ok()?;
    let format = Format::of(&v)?;
    Some(format!(
        "{}:{}: this line is a JSON object ({}), but the file is read as plain text (it does not end in \
         .jsonl), so its braces and quotes are trained on; name it .jsonl to read one object per line",
        path.display(),
        i + 1,
        format.describe()
    ))
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
