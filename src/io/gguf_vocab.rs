//! A Hugging Face folder's tokenizer as `tokenizer.ggml.*` metadata, as llama.cpp's
//! `convert_hf_to_gguf.py` writes it: byte-level BPE vocabularies from `tokenizer.json` (GPT-2,
//! SmolLM2, Llama 3, Qwen2.5 / Qwen3) and SentencePiece ones from `tokenizer.model` (Gemma 3,
//! Llama 2 style): every id up to the model's `vocab_size` (ids the tokenizer lacks as
//! `[PAD{i}]`, unused), added tokens as control or user-defined tokens, the merges or scores,
//! the special tokens, whether BOS and EOS are added, and the chat template.
//!
//! llama.cpp names the pre-tokenizer by hashing how the tokenizer splits a test text; here the
//! `tokenizer.json`'s pre-tokenizer is matched against the four that portalora and llama.cpp both
//! know (`gpt-2`, `smollm`, `llama-bpe`, `qwen2`), and anything else is refused: a GGUF whose
//! `tokenizer.ggml.pre` splits text otherwise gives other ids than the model learned.

use std::path::Path;

use serde_json::Value as Json;

use super::gguf::Value;
use super::tokenizer::{TokenizerError, LLAMA3_REGEX, QWEN2_REGEX};

/// llama.cpp's token types.
const NORMAL: i32 = 1;
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;
const UNUSED: i32 = 5;

fn load(path: &Path, message: impl Into<String>) -> TokenizerError {
    TokenizerError::Load { path: path.to_path_buf(), message: message.into() }
}

fn read_json(path: &Path) -> Result<Option<Json>, TokenizerError> {
    match std::fs::read_to_string(path) {
        Ok(text) => serde_json::from_str(&text).map(Some).map_err(|source| TokenizerError::Json {
            path: path.to_path_buf(),
            what: "",
            source,
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(TokenizerError::Io { path: path.to_path_buf(), source }),
    }
}

/// The `tokenizer.ggml.*` keys (and `add_space_prefix`) for the folder `dir` of a model whose
/// embedding has `vocab_size` rows and whose GGUF architecture is `arch`, as the converter writes
/// them: a SentencePiece vocabulary from `tokenizer.model` where the architecture's converter
/// prefers one (`llama`, `gemma3`), else the byte-level BPE of `tokenizer.json`.
pub fn vocab_metadata(dir: &Path, vocab_size: usize, arch: &str) -> Result<Vec<(String, Value)>, TokenizerError> {
    let config = read_json(&dir.join("tokenizer_config.json"))?;
    let model_config = read_json(&dir.join("config.json"))?.unwrap_or(Json::Null);
    let tok = read_json(&dir.join("tokenizer.json"))?;
    let spm = dir.join("tokenizer.model");
    let mut m = if matches!(arch, "llama" | "gemma3") && spm.exists() {
        spm_tokens(&spm, config.as_ref(), vocab_size, dir)?
    } else {
        let Some(tok) = &tok else {
            return Err(load(
                dir,
                "no tokenizer.json: llama.cpp needs the model's tokenizer in the GGUF; add the tokenizer files of the \
                 model this folder was fine-tuned from",
            ));
        };
        bpe_tokens(&dir.join("tokenizer.json"), tok, vocab_size)?
    };
    let llama = arch == "llama";
    m.extend(special_tokens(tok.as_ref().unwrap_or(&Json::Null), config.as_ref(), &model_config, vocab_size, llama));
    if let Some(c) = &config {
        m.extend(chat_templates(dir, c)?);
    }
    // Gemma 3's converter says no space prefix; LLaMA's repeats tokenizer_config's.
    let space = match arch {
        "gemma3" if spm.exists() => Some(false),
        "llama" => config.as_ref().and_then(|c| c["add_prefix_space"].as_bool()),
        _ => None,
    };
    if let Some(space) = space {
        m.push(("tokenizer.ggml.add_space_prefix".into(), Value::Bool(space)));
    }
    Ok(m)
}

/// A byte-level BPE `tokenizer.json`'s model, pre-tokenizer, tokens, types and merges.
fn bpe_tokens(path: &Path, tok: &Json, vocab_size: usize) -> Result<Vec<(String, Value)>, TokenizerError> {
    let model = &tok["model"];
    if model["type"].as_str() != Some("BPE") || model["byte_fallback"].as_bool() == Some(true) {
        return Err(load(
            path,
            "not a byte-level BPE tokenizer (a SentencePiece-style vocabulary without its tokenizer.model): \
             portalora writes byte-level BPE vocabularies from tokenizer.json and SentencePiece ones from \
             tokenizer.model; convert the folder with llama.cpp's convert_hf_to_gguf.py",
        ));
    }
    let pre = pre_name(&tok["pre_tokenizer"]).ok_or_else(|| {
        load(
            path,
            format!(
                "its pre-tokenizer {} is none of llama.cpp's gpt-2, smollm, llama-bpe or qwen2; a GGUF naming another \
                 would split text otherwise than the model learned. Convert it with llama.cpp's convert_hf_to_gguf.py",
                tok["pre_tokenizer"]
            ),
        )
    })?;
    let (tokens, types) = tokens(path, tok, vocab_size)?;
    Ok(vec![
        ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
        ("tokenizer.ggml.pre".into(), Value::String(pre.into())),
        ("tokenizer.ggml.tokens".into(), Value::Array(tokens.into_iter().map(Value::String).collect())),
        ("tokenizer.ggml.token_type".into(), Value::Array(types.into_iter().map(Value::I32).collect())),
        ("tokenizer.ggml.merges".into(), Value::Array(merges(path, model)?.into_iter().map(Value::String).collect())),
    ])
}

/// A SentencePiece `tokenizer.model` as the converter's `_create_vocab_sentencepiece` lays it out:
/// every id below `vocab_size` (`[PAD{i}]`, score −10000, unused, where the model has none), each
/// piece with its score and type (unknown, control, unused and byte kept; user-defined pieces
/// normal), `added_tokens.json` user-defined at −1000, and `tokenizer_config.json`'s
/// `added_tokens_decoder` over them (control if special or special-looking, else user-defined).
fn spm_tokens(
    path: &Path,
    config: Option<&Json>,
    vocab_size: usize,
    dir: &Path,
) -> Result<Vec<(String, Value)>, TokenizerError> {
    let bytes = std::fs::read(path).map_err(|source| TokenizerError::Io { path: path.to_path_buf(), source })?;
    let pieces = super::spm::read_model_proto(&bytes).map_err(|e| load(path, e))?;
    let mut slots: Vec<(String, f32, i32)> = (0..vocab_size).map(|i| (format!("[PAD{i}]"), -10000.0, UNUSED)).collect();
    for (slot, p) in slots.iter_mut().zip(&pieces) {
        let kind = match p.kind {
            2 | 3 | 5 | 6 => p.kind as i32,
            _ => NORMAL,
        };
        *slot = (p.piece.clone(), p.score, kind);
    }
    if let Some(added) = read_json(&dir.join("added_tokens.json"))? {
        for (text, id) in added.as_object().into_iter().flatten() {
            if let Some(slot) = id.as_u64().and_then(|i| slots.get_mut(i as usize)) {
                *slot = (text.clone(), -1000.0, USER_DEFINED);
            }
        }
    }
    let decoder = config.and_then(|c| c["added_tokens_decoder"].as_object());
    for (id, t) in decoder.into_iter().flatten() {
        let (Some(slot), Some(text)) = (id.parse::<usize>().ok().and_then(|i| slots.get_mut(i)), t["content"].as_str())
        else {
            continue;
        };
        *slot = match t["special"] == true || looks_special(text) {
            true => (text.to_string(), -1000.0, CONTROL),
            false => (text.replace('\u{2581}', " "), -1000.0, USER_DEFINED),
        };
    }
    let strings = slots.iter().map(|s| Value::String(s.0.clone())).collect();
    Ok(vec![
        ("tokenizer.ggml.model".into(), Value::String("llama".into())),
        ("tokenizer.ggml.pre".into(), Value::String("default".into())),
        ("tokenizer.ggml.tokens".into(), Value::Array(strings)),
        ("tokenizer.ggml.scores".into(), Value::Array(slots.iter().map(|s| Value::F32(s.1)).collect())),
        ("tokenizer.ggml.token_type".into(), Value::Array(slots.iter().map(|s| Value::I32(s.2)).collect())),
    ])
}

/// llama.cpp's name for a `tokenizer.json` pre-tokenizer, where it is one of the four.
fn pre_name(pre: &Json) -> Option<&'static str> {
    let bytes = |v: &Json, regex: bool| {
        v["type"] == "ByteLevel"
            && v["use_regex"].as_bool().unwrap_or(true) == regex
            && !v["add_prefix_space"].as_bool().unwrap_or(false)
    };
    if bytes(pre, true) {
        return Some("gpt-2");
    }
    let parts = pre["pretokenizers"].as_array().filter(|_| pre["type"] == "Sequence")?;
    match parts.as_slice() {
        [d, b] if d["type"] == "Digits" && d["individual_digits"] == true && bytes(b, true) => Some("smollm"),
        [s, b] if s["type"] == "Split" && s["behavior"] == "Isolated" && s["invert"] != true && bytes(b, false) => {
            match s["pattern"]["Regex"].as_str()? {
                LLAMA3_REGEX => Some("llama-bpe"),
                QWEN2_REGEX => Some("qwen2"),
                _ => None,
            }
        }
        _ => None,
    }
}

/// Whether the converter takes an added token for a control token although it is not marked
/// special (`does_token_look_special`).
fn looks_special(t: &str) -> bool {
    matches!(t, "<pad>" | "<mask>" | "<2mass>" | "[@BOS@]")
        || (t.starts_with("<|") && t.ends_with("|>"))
        || (t.starts_with("<｜") && t.ends_with("｜>"))
        || (t.starts_with("<unused") && t.ends_with('>'))
}

/// Every id below `vocab_size` with its text and type.
fn tokens(path: &Path, tok: &Json, vocab_size: usize) -> Result<(Vec<String>, Vec<i32>), TokenizerError> {
    let mut slots: Vec<Option<(String, i32)>> = vec![None; vocab_size];
    let mut put = |id: u64, text: &str, ty: i32| -> Result<(), TokenizerError> {
        let slot = slots.get_mut(id as usize).ok_or_else(|| {
            load(
                path,
                format!(
                    "token {text:?} has id {id}, beyond the model's vocab_size of {vocab_size}: this tokenizer is not \
                     the model's"
                ),
            )
        })?;
        *slot = Some((text.to_string(), ty));
        Ok(())
    };
    let vocab = tok["model"]["vocab"].as_object().ok_or_else(|| load(path, "model.vocab is not a map"))?;
    for (text, id) in vocab {
        put(id.as_u64().ok_or_else(|| load(path, format!("token {text:?}: id {id} is not a number")))?, text, NORMAL)?;
    }
    for a in tok["added_tokens"].as_array().into_iter().flatten() {
        let (Some(id), Some(text)) = (a["id"].as_u64(), a["content"].as_str()) else {
            return Err(load(path, format!("added token {a} has no id or content")));
        };
        if a["special"] == true || looks_special(text) {
            put(id, text, CONTROL)?;
        } else {
            put(id, &text.replace('\u{2581}', " "), USER_DEFINED)?;
        }
    }
    Ok(slots.into_iter().enumerate().map(|(i, s)| s.unwrap_or((format!("[PAD{i}]"), UNUSED))).unzip())
}

/// The merges as `"a b"` (pairs of the newer format joined, a space inside a part as U+0120).
fn merges(path: &Path, model: &Json) -> Result<Vec<String>, TokenizerError> {
    let list = model["merges"].as_array().ok_or_else(|| load(path, "model.merges is not a list"))?;
    list.iter()
        .map(|m| match m {
            Json::String(s) => Ok(s.clone()),
            Json::Array(pair) => {
                let parts: Option<Vec<String>> =
                    pair.iter().map(|p| p.as_str().map(|s| s.replace(' ', "\u{120}"))).collect();
                parts
                    .filter(|p| p.len() == 2)
                    .map(|p| p.join(" "))
                    .ok_or_else(|| load(path, format!("merge {m} is not a pair")))
            }
            _ => Err(load(path, format!("merge {m} is neither \"a b\" nor [a, b]"))),
        })
        .collect()
}

/// The special tokens' ids and whether BOS / EOS are added, as gguf-py's `SpecialVocab` finds
/// them: `tokenizer_config.json`'s `<kind>_token` looked up among the added tokens, else
/// `config.json`'s `<kind>_token_id`; adding from the post-processor's template, overridden by
/// `add_bos_token` / `add_eos_token`.
fn special_tokens(tok: &Json, config: Option<&Json>, model: &Json, vocab: usize, llama: bool) -> Vec<(String, Value)> {
    let added = tok["added_tokens"].as_array().cloned().unwrap_or_default();
    let id_of = |content: &str| added.iter().find(|a| a["content"] == content).and_then(|a| a["id"].as_u64());
    let named = |kind: &str| -> Option<String> {
        let v = &config?[format!("{kind}_token")];
        v.as_str().or_else(|| v["content"].as_str()).map(str::to_string)
    };
    // A template that starts (ends) with a special token adds it; without a tokenizer_config
    // that token is BOS (EOS).
    let single = tok["post_processor"]["single"].as_array().cloned().unwrap_or_default();
    let special_at = |i: Option<&Json>| i.and_then(|t| t["SpecialToken"]["id"].as_str()).map(str::to_string);
    let (first, last) = match single.len() > 1 {
        true => (special_at(single.first()), special_at(single.last())),
        false => (None, None),
    };
    let text = |kind: &str| match (kind, config) {
        ("bos", None) => first.clone(),
        ("eos", None) => last.clone(),
        _ => named(kind),
    };
    let mut m = Vec::new();
    for (kind, key) in [
        ("bos", "bos_token_id"),
        ("eos", "eos_token_id"),
        ("unk", "unknown_token_id"),
        ("sep", "seperator_token_id"),
        ("pad", "padding_token_id"),
        ("mask", "mask_token_id"),
    ] {
        let id = text(kind).and_then(|t| id_of(&t)).or_else(|| model[format!("{kind}_token_id")].as_u64());
        if let Some(id) = id.filter(|id| (*id as usize) < vocab) {
            m.push((format!("tokenizer.ggml.{key}"), Value::U32(id as u32)));
        }
    }
    let flag = |kind: &str, from_template: Option<bool>| {
        config.and_then(|c| c[format!("add_{kind}_token")].as_bool()).or(from_template)
    };
    let bos = first.as_ref().map(|f| Some(f) == text("bos").as_ref());
    let eos = last.as_ref().map(|l| Some(l) == text("eos").as_ref());
    // llama.cpp's LLaMA class never adds BOS for SmolLM's vocabulary of 49152.
    let bos = if llama && vocab == 49152 { Some(false) } else { flag("bos", bos) };
    for (kind, v) in [("bos", bos), ("eos", flag("eos", eos))] {
        if let Some(v) = v {
            m.push((format!("tokenizer.ggml.add_{kind}_token"), Value::Bool(v)));
        }
    }
    m
}

/// The chat templates as the converter takes them (read only where a `tokenizer_config.json`
/// exists): its `chat_template`, else `chat_template.jinja` (with `additional_chat_templates/*.jinja`
/// beside it as named ones), else `chat_template.json`'s. A list of `{name, template}` gives the
/// `default` one as `tokenizer.chat_template` and each other as `tokenizer.chat_template.NAME`
/// (non-alphanumerics as `_`), listed in `tokenizer.chat_templates`.
fn chat_templates(dir: &Path, config: &Json) -> Result<Vec<(String, Value)>, TokenizerError> {
    let read =
        |p: std::path::PathBuf| std::fs::read_to_string(&p).map_err(|source| TokenizerError::Io { path: p, source });
    let value = match &config["chat_template"] {
        Json::Null => {
            let jinja = dir.join("chat_template.jinja");
            if jinja.exists() {
                let mut extra: Vec<std::path::PathBuf> = std::fs::read_dir(dir.join("additional_chat_templates"))
                    .into_iter()
                    .flatten()
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p.extension().is_some_and(|x| x == "jinja"))
                    .collect();
                extra.sort();
                let default = Json::String(read(jinja)?);
                match extra.is_empty() {
                    true => default,
                    false => {
                        let mut list = vec![serde_json::json!({"name": "default", "template": default})];
                        for p in extra {
                            let name = p.file_stem().and_then(|n| n.to_str()).unwrap_or_default().to_string();
                            list.push(serde_json::json!({"name": name, "template": read(p)?}));
                        }
                        Json::Array(list)
                    }
                }
            } else {
                read_json(&dir.join("chat_template.json"))?.map(|j| j["chat_template"].clone()).unwrap_or(Json::Null)
            }
        }
        v => v.clone(),
    };
    let key = |name: &str| format!("tokenizer.chat_template{name}");
    Ok(match value {
        Json::Null => Vec::new(),
        Json::String(t) => vec![(key(""), Value::String(t))],
        Json::Array(list) => {
            let (mut out, mut names) = (Vec::new(), Vec::new());
            for t in &list {
                let name: String = t["name"]
                    .as_str()
                    .unwrap_or_default()
                    .chars()
                    .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
                    .collect();
                match (name.as_str(), t["template"].as_str()) {
                    ("", _) | (_, None) => {}
                    ("default", Some(text)) => out.push((key(""), Value::String(text.into()))),
                    (_, Some(text)) => {
                        out.push((key(&format!(".{name}")), Value::String(text.into())));
                        names.push(name);
                    }
                }
            }
            names.sort();
            names.dedup();
            if !names.is_empty() {
                out.push((
                    "tokenizer.chat_templates".into(),
                    Value::Array(names.into_iter().map(Value::String).collect()),
                ));
            }
            out
        }
        other => {
            return Err(load(
                &dir.join("tokenizer_config.json"),
                format!("chat_template is {other}: a chat template is a string or a list of {{name, template}}"),
            ))
        }
    })
}
