//! Base-model weights on the host, in Hugging Face names and PyTorch layouts, loaded from a GGUF
//! file or a Hugging Face folder (`config.json` + `model.safetensors`, possibly sharded).
//!
//! Layouts are exactly transformers' so that adapters and merged folders exchange with PEFT:
//! LLaMA linear weights are `nn.Linear` `(out, in)`; GPT-2's are `Conv1D` `(in, out)`. GGUF files
//! differ in two ways we undo here: llama.cpp permutes the rows of q_proj and k_proj so that rotary
//! pairs are adjacent, and it stores GPT-2's Conv1D weights transposed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::arch::Family;
use super::config::{Arch, ModelConfig};
use crate::io::gguf::{Gguf, GgufError};

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: bad model config: {message}")]
    Config { path: PathBuf, message: String },
    /// `config.json` (or a part of it, `what`, such as "text_config: ") is not the JSON expected.
    #[error("{path}: bad model config: {what}{source}")]
    ConfigJson {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error("{path}: {message}")]
    Safetensors { path: PathBuf, message: String },
    #[error("{path}: {source}")]
    IndexJson {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error(
        "{path}: not a valid safetensors file ({source}); it is truncated or corrupt: download or export it again"
    )]
    BadSafetensors {
        path: PathBuf,
        #[source]
        source: safetensors::SafeTensorError,
    },
    #[error("{path}: tensor {name:?} is missing; a {arch:?} model with this config needs it")]
    Missing { path: PathBuf, name: String, arch: Family },
    #[error("{path}: tensor {name:?} has shape {found:?} but the config implies {expected:?}; the config and the weights disagree")]
    Shape { path: PathBuf, name: String, expected: Vec<usize>, found: Vec<usize> },
    #[error("{path}: tensor {name:?} has dtype {dtype}; portalora reads F32, F16 and BF16 safetensors")]
    Dtype { path: PathBuf, name: String, dtype: String },
    #[error(
        "{path}: tensor {name:?} is not part of a {arch:?} model as portalora runs it{hint}; ignoring it would make \
         every result wrong, so the model is not loaded"
    )]
    Unused { path: PathBuf, name: String, arch: Family, hint: String },
    /// A model a `config.json` cannot describe (written for a GGUF base).
    #[error("{message}")]
    Undescribable { message: String },
    #[error("{path}: not a model: expected a .gguf file or a folder with config.json and model.safetensors")]
    NotAModel { path: PathBuf },
}

/// A tensor's bytes as a GGUF file stores them: row-major blocks of `ty`.
#[derive(Clone, Debug)]
pub struct RawTensor {
    pub ty: crate::io::gguf::GgmlType,
    pub bytes: Vec<u8>,
}

/// A dense f32 tensor in host memory.
#[derive(Clone, Debug, PartialEq)]
pub struct HostTensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// A model's configuration and its weights by Hugging Face name.
#[derive(Debug)]
pub struct Weights {
    pub config: ModelConfig,
    pub tensors: BTreeMap<String, HostTensor>,
    /// The file's own encoding of tensors stored quantized or as f16 (GGUF, LLaMA family), in
    /// the layout of `tensors` (rows in Hugging Face order): a quantized base uploads these
    /// bytes as they are instead of re-quantizing the f32 values.
    pub raw: BTreeMap<String, RawTensor>,
    /// Where they came from, for messages.
    pub source: PathBuf,
    /// What the checkpoint holds beyond the model portalora runs (Gemma 3's vision tower), for
    /// programs to state: loading it is not silent.
    pub left_out: Option<LeftOut>,
}

/// The part of a checkpoint a load did not take.
#[derive(Clone, Debug, PartialEq)]
pub struct LeftOut {
    /// How many tensors.
    pub tensors: usize,
    /// What they are and what follows from leaving them out.
    pub what: String,
}

impl std::fmt::Display for LeftOut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} tensors not loaded, {}", self.tensors, self.what)
    }
}

impl Weights {
    pub fn get(&self, name: &str) -> Result<&HostTensor, ModelError> {
        self.tensors.get(name).ok_or_else(|| ModelError::Missing {
            path: self.source.clone(),
            name: name.to_string(),
            arch: self.config.family,
        })
    }
}

/// Every tensor a model with this config has, with its shape, in Hugging Face naming.
pub fn expected_tensors(c: &ModelConfig) -> Vec<(String, Vec<usize>)> {
    let (v, h, f) = (c.vocab_size, c.hidden_size, c.intermediate_size);
    let q = c.num_heads * c.head_dim;
    let kv = c.num_kv_heads * c.head_dim;
    let b = c.block;
    let mut out = Vec::new();
    match c.arch {
        Arch::Llama => {
            out.push(("model.embed_tokens.weight".into(), vec![v, h]));
            for i in 0..c.num_layers {
                let p = format!("model.layers.{i}");
                let mut add = |n: &str, shape: Vec<usize>| out.push((format!("{p}.{n}"), shape));
                add("input_layernorm.weight", vec![h]);
                for (proj, rows, cols, bias) in
                    [("q", q, h, b.qkv_bias), ("k", kv, h, b.qkv_bias), ("v", kv, h, b.qkv_bias), ("o", h, q, b.o_bias)]
                {
                    add(&format!("self_attn.{proj}_proj.weight"), vec![rows, cols]);
                    if bias {
                        add(&format!("self_attn.{proj}_proj.bias"), vec![rows]);
                    }
                }
                if b.qk_norm {
                    add("self_attn.q_norm.weight", vec![c.head_dim]);
                    add("self_attn.k_norm.weight", vec![c.head_dim]);
                }
                if b.post_norms {
                    add("post_attention_layernorm.weight", vec![h]);
                    add("pre_feedforward_layernorm.weight", vec![h]);
                    add("post_feedforward_layernorm.weight", vec![h]);
                } else {
                    add("post_attention_layernorm.weight", vec![h]);
                }
                let mut mlp = vec![("up", f, h), ("down", h, f)];
                if b.act.gated() {
                    mlp.insert(0, ("gate", f, h));
                }
                for (proj, rows, cols) in mlp {
                    add(&format!("mlp.{proj}_proj.weight"), vec![rows, cols]);
                    if b.mlp_bias {
                        add(&format!("mlp.{proj}_proj.bias"), vec![rows]);
                    }
                }
            }
            out.push(("model.norm.weight".into(), vec![h]));
            if !c.tie_embeddings {
                out.push(("lm_head.weight".into(), vec![v, h]));
            }
        }
        Arch::Gpt2 => {
            out.push(("transformer.wte.weight".into(), vec![v, h]));
            out.push(("transformer.wpe.weight".into(), vec![c.max_positions, h]));
            for i in 0..c.num_layers {
                let p = format!("transformer.h.{i}");
                for (n, s) in [
                    ("ln_1.weight", vec![h]),
                    ("ln_1.bias", vec![h]),
                    ("attn.c_attn.weight", vec![h, 3 * h]),
                    ("attn.c_attn.bias", vec![3 * h]),
                    ("attn.c_proj.weight", vec![h, h]),
                    ("attn.c_proj.bias", vec![h]),
                    ("ln_2.weight", vec![h]),
                    ("ln_2.bias", vec![h]),
                    ("mlp.c_fc.weight", vec![h, f]),
                    ("mlp.c_fc.bias", vec![f]),
                    ("mlp.c_proj.weight", vec![f, h]),
                    ("mlp.c_proj.bias", vec![h]),
                ] {
                    out.push((format!("{p}.{n}"), s));
                }
            }
            out.push(("transformer.ln_f.weight".into(), vec![h]));
            out.push(("transformer.ln_f.bias".into(), vec![h]));
            if !c.tie_embeddings {
                out.push(("lm_head.weight".into(), vec![v, h]));
            }
        }
    }
    out
}

fn missing(path: &Path) -> ModelError {
    ModelError::Io {
        path: path.to_path_buf(),
        source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or folder"),
    }
}

/// A model's configuration without its weights (a folder's `config.json`, a GGUF's metadata):
/// what settings are checked against before the long work.
pub fn read_config(path: impl AsRef<Path>) -> Result<ModelConfig, ModelError> {
    let path = path.as_ref();
    let gguf = path.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf")) || is_gguf(path);
    if !path.exists() {
        Err(missing(path))
    } else if path.is_dir() && path.join("config.json").exists() {
        ModelConfig::from_hf_json(&path.join("config.json"))
    } else if path.is_file() && gguf {
        ModelConfig::from_gguf(&Gguf::open(path)?)
    } else {
        // What load_model says of it.
        load_model(path).map(|w| w.config)
    }
}

/// Loads a model from a `.gguf` file or a Hugging Face folder.
pub fn load_model(path: impl AsRef<Path>) -> Result<Weights, ModelError> {
    let path = path.as_ref();
    if !path.exists() {
        return Err(missing(path));
    }
    if path.is_dir() {
        load_hf_folder(path)
    } else if path.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf")) || is_gguf(path) {
        load_gguf(path)
    } else {
        Err(ModelError::NotAModel { path: path.to_path_buf() })
    }
}

fn is_gguf(path: &Path) -> bool {
    use std::io::Read;
    let mut magic = [0u8; 4];
    std::fs::File::open(path).and_then(|mut f| f.read_exact(&mut magic)).is_ok() && &magic == b"GGUF"
}

/// Why a tensor portalora does not use may be there, for the message.
fn unused_hint(name: &str) -> String {
    if name.ends_with(".bias") {
        " (a bias the config does not declare: check attention_bias / mlp_bias and model_type)".into()
    } else if name.contains("norm") {
        " (a norm this family does not have: check model_type)".into()
    } else if name.contains("rope_freqs") {
        " (rotary frequency factors in a model without rotary embeddings)".into()
    } else {
        String::new()
    }
}

/// Checks that exactly the expected tensors are present with the expected shapes: a missing
/// tensor, a wrong shape, and a tensor the model would not use (a bias, an extra norm) are each
/// an error naming it.
fn check_complete(path: &Path, c: &ModelConfig, tensors: &BTreeMap<String, HostTensor>) -> Result<(), ModelError> {
    // Each layer has several tensors: a layer count beyond the tensor count is a corrupt or
    // mismatched config (and listing its expected tensors would exhaust memory).
    if c.num_layers > tensors.len() {
        return Err(ModelError::Config {
            path: path.to_path_buf(),
            message: format!(
                "{} layers, but the weights hold only {} tensors; the config does not match the weights",
                c.num_layers,
                tensors.len()
            ),
        });
    }
    for (name, shape) in expected_tensors(c) {
        match tensors.get(&name) {
            None => return Err(ModelError::Missing { path: path.to_path_buf(), name, arch: c.family }),
            Some(t) if t.shape != shape => {
                return Err(ModelError::Shape {
                    path: path.to_path_buf(),
                    name,
                    expected: shape,
                    found: t.shape.clone(),
                })
            }
            Some(_) => {}
        }
    }
    let expected: std::collections::HashSet<String> = expected_tensors(c).into_iter().map(|(n, _)| n).collect();
    if let Some(name) = tensors.keys().find(|k| !expected.contains(*k)) {
        return Err(ModelError::Unused {
            path: path.to_path_buf(),
            name: name.clone(),
            arch: c.family,
            hint: unused_hint(name),
        });
    }
    Ok(())
}

/// Undoes llama.cpp's rotary permutation of q_proj / k_proj rows: within each head, GGUF row
/// `2j + t` is Hugging Face row `t · head_dim/2 + j`.
pub fn unpermute_rotary<T: Copy + Default>(data: &[T], rows: usize, cols: usize, heads: usize) -> Vec<T> {
    rotary_rows(data, rows, cols, heads, false)
}

/// llama.cpp's rotary permutation of q_proj / k_proj rows (what its converter does, and the
/// inverse of [`unpermute_rotary`]).
pub fn permute_rotary<T: Copy + Default>(data: &[T], rows: usize, cols: usize, heads: usize) -> Vec<T> {
    rotary_rows(data, rows, cols, heads, true)
}

/// Moves whole rows between the two orders: Hugging Face row `t · head_dim/2 + j` of each head is
/// GGUF row `2j + t`.
fn rotary_rows<T: Copy + Default>(data: &[T], rows: usize, cols: usize, heads: usize, to_gguf: bool) -> Vec<T> {
    let hd = rows / heads;
    let half = hd / 2;
    let mut out = vec![T::default(); data.len()];
    for h in 0..heads {
        for j in 0..half {
            for t in 0..2 {
                let (gguf, hf) = (h * hd + 2 * j + t, h * hd + t * half + j);
                let (dst, src) = if to_gguf { (gguf, hf) } else { (hf, gguf) };
                out[dst * cols..(dst + 1) * cols].copy_from_slice(&data[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

pub(super) fn transpose(data: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0.0; data.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = data[r * cols + c];
        }
    }
    out
}

fn load_gguf(path: &Path) -> Result<Weights, ModelError> {
    weights_from_gguf(&Gguf::open(path)?)
}

/// Loads a model from the bytes of a GGUF file (`name` stands for its path in messages).
pub fn load_gguf_bytes(name: &str, bytes: Vec<u8>) -> Result<Weights, ModelError> {
    weights_from_gguf(&Gguf::from_bytes(name, bytes)?)
}

/// Loads a model from the text of its `config.json` and the bytes of its safetensors file(s)
/// (`name` stands for its folder in messages).
pub fn load_safetensors_bytes(name: &str, config_json: &str, files: &[&[u8]]) -> Result<Weights, ModelError> {
    let dir = Path::new(name);
    let config = ModelConfig::from_hf_str(&dir.join("config.json"), config_json)?;
    let mut tensors = BTreeMap::new();
    for (i, bytes) in files.iter().enumerate() {
        read_safetensors_bytes(&dir.join(format!("model-{i}.safetensors")), bytes, &mut tensors)?;
    }
    finish_hf(dir, config, tensors)
}

/// A model from a parsed GGUF file.
pub fn weights_from_gguf(g: &Gguf) -> Result<Weights, ModelError> {
    use super::gguf_model::{hf_name, permuted, plus_one, Mapped};
    let path = g.path.as_path();
    let config = ModelConfig::from_gguf(g)?;
    let family = config.family;
    let mut tensors = BTreeMap::new();
    let mut raw = BTreeMap::new();
    for info in &g.tensors {
        let name = match hf_name(family, &info.name) {
            Some(Mapped::Tensor(name)) => name,
            Some(Mapped::Config) => continue, // read into the config's rotary embeddings
            None => {
                return Err(ModelError::Unused {
                    path: path.to_path_buf(),
                    name: info.name.clone(),
                    arch: config.family,
                    hint: unused_hint(&info.name),
                })
            }
        };
        let mut data = g.tensor_f32(&info.name)?;
        let mut shape = info.shape.clone();
        if plus_one(family, &name) {
            // llama.cpp stores Gemma's norms as 1 + w; transformers' checkpoints hold w.
            data.iter_mut().for_each(|v| *v -= 1.0);
        }
        // llama.cpp permuted q/k rows (weights and biases) of `llama` checkpoints.
        let heads = match (permuted(family), name.contains("q_proj."), name.contains("k_proj.")) {
            (true, true, _) => Some(config.num_heads),
            (true, _, true) => Some(config.num_kv_heads),
            _ => None,
        };
        if let Some(h) = heads {
            let cols = shape.get(1).copied().unwrap_or(1);
            data = unpermute_rotary(&data, shape[0], cols, h);
        }
        if config.arch == Arch::Llama && shape.len() == 2 {
            // Blocks run along rows, so whole rows of the file's bytes move like rows of data.
            if crate::ops::quant::dtype_of(info.ty).is_some() && shape[1] % 32 == 0 {
                let mut bytes = g.raw(info)?;
                if let Some(h) = heads {
                    bytes = unpermute_rotary(&bytes, shape[0], bytes.len() / shape[0], h);
                }
                raw.insert(name.clone(), RawTensor { ty: info.ty, bytes });
            }
        }
        if config.arch == Arch::Gpt2 && shape.len() == 2 && name.starts_with("transformer.h.") {
            // Conv1D keeps (in, out); llama.cpp stored (out, in).
            data = transpose(&data, shape[0], shape[1]);
            shape.swap(0, 1);
        }
        tensors.insert(name, HostTensor { shape, data });
    }
    check_complete(path, &config, &tensors)?;
    Ok(Weights { config, tensors, raw, source: path.to_path_buf(), left_out: None })
}

fn load_hf_folder(dir: &Path) -> Result<Weights, ModelError> {
    let cfg_path = dir.join("config.json");
    if !cfg_path.exists() {
        return Err(ModelError::NotAModel { path: dir.to_path_buf() });
    }
    let config = ModelConfig::from_hf_json(&cfg_path)?;
    let single = dir.join("model.safetensors");
    let index = dir.join("model.safetensors.index.json");
    let files: Vec<PathBuf> = if single.exists() {
        vec![single]
    } else if index.exists() {
        let text = std::fs::read_to_string(&index).map_err(|source| ModelError::Io { path: index.clone(), source })?;
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|source| ModelError::IndexJson { path: index.clone(), source })?;
        let map = v["weight_map"].as_object().ok_or_else(|| ModelError::Safetensors {
            path: index.clone(),
            message: "no \"weight_map\" object".into(),
        })?;
        let mut names: Vec<String> = map.values().filter_map(|f| f.as_str().map(str::to_string)).collect();
        names.sort();
        names.dedup();
        names.into_iter().map(|n| dir.join(n)).collect()
    } else {
        return Err(ModelError::NotAModel { path: dir.to_path_buf() });
    };
    let mut tensors = BTreeMap::new();
    for file in files {
        read_safetensors(&file, &mut tensors)?;
    }
    finish_hf(dir, config, tensors)
}

/// Names, tied heads and completeness of a Hugging Face model's tensors.
fn finish_hf(
    dir: &Path,
    config: ModelConfig,
    mut tensors: BTreeMap<String, HostTensor>,
) -> Result<Weights, ModelError> {
    // GPT-2 checkpoints name tensors without the "transformer." prefix.
    if config.arch == Arch::Gpt2
        && !tensors.contains_key("transformer.wte.weight")
        && tensors.contains_key("wte.weight")
    {
        tensors = tensors
            .into_iter()
            .map(|(k, v)| if k == "lm_head.weight" { (k, v) } else { (format!("transformer.{k}"), v) })
            .collect();
    }
    let left_out = text_of_multimodal(&mut tensors);
    // Tied heads are sometimes saved anyway: the copy must equal the embedding it stands for.
    if config.tie_embeddings {
        if let Some(head) = tensors.remove("lm_head.weight") {
            let emb = if config.arch == Arch::Gpt2 { "transformer.wte.weight" } else { "model.embed_tokens.weight" };
            if tensors.get(emb).is_some_and(|e| *e != head) {
                return Err(ModelError::Config {
                    path: dir.join("config.json"),
                    message: format!(
                        "tie_word_embeddings is true but lm_head.weight differs from {emb}; set \
                         tie_word_embeddings to false to use the separate head"
                    ),
                });
            }
        }
    }
    tensors.retain(|k, _| {
        !k.ends_with(".attn.bias") && !k.ends_with(".attn.masked_bias") && !k.contains("rotary_emb.inv_freq")
    });
    check_complete(dir, &config, &tensors)?;
    Ok(Weights { config, tensors, raw: BTreeMap::new(), source: dir.to_path_buf(), left_out })
}

/// Gemma 3's multimodal checkpoints keep the language model under `language_model.model.`
/// (transformers 4 and Google's files) or `model.language_model.` (transformers 5's own layout)
/// beside a vision tower and its projector: the language model's tensors get the text model's
/// names, the vision tensors are left out and said so.
fn text_of_multimodal(tensors: &mut BTreeMap<String, HostTensor>) -> Option<LeftOut> {
    let prefixed = |k: &str| k.starts_with("language_model.") || k.starts_with("model.language_model.");
    if !tensors.keys().any(|k| prefixed(k)) {
        return None;
    }
    let vision = |k: &str| {
        let k = k.strip_prefix("model.").unwrap_or(k);
        k.starts_with("vision_tower.") || k.starts_with("multi_modal_projector.")
    };
    let mut dropped = 0;
    *tensors = std::mem::take(tensors)
        .into_iter()
        .filter_map(|(k, v)| {
            if vision(&k) {
                dropped += 1;
                return None;
            }
            let name = match (k.strip_prefix("language_model."), k.strip_prefix("model.language_model.")) {
                (Some(rest), _) => rest.to_string(),
                (_, Some(rest)) => format!("model.{rest}"),
                _ => k,
            };
            Some((name, v))
        })
        .collect();
    Some(LeftOut {
        tensors: dropped,
        what: "the vision tower and its projector: portalora fine-tunes the language model, and a merged copy \
               is a text-only gemma3_text model"
            .into(),
    })
}

/// Reads every tensor of one safetensors file as f32.
pub fn read_safetensors(path: &Path, out: &mut BTreeMap<String, HostTensor>) -> Result<(), ModelError> {
    let bytes = std::fs::read(path).map_err(|source| ModelError::Io { path: path.to_path_buf(), source })?;
    read_safetensors_bytes(path, &bytes, out)
}

/// Reads every tensor of safetensors bytes as f32 (`path` names them in messages).
pub fn read_safetensors_bytes(
    path: &Path,
    bytes: &[u8],
    out: &mut BTreeMap<String, HostTensor>,
) -> Result<(), ModelError> {
    use safetensors::{Dtype, SafeTensors};
    let st = SafeTensors::deserialize(bytes)
        .map_err(|source| ModelError::BadSafetensors { path: path.to_path_buf(), source })?;
    for (name, view) in st.tensors() {
        let raw = view.data();
        let data: Vec<f32> = match view.dtype() {
            Dtype::F32 => raw.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
            Dtype::F16 => {
                raw.chunks_exact(2).map(|c| crate::io::half::f16_to_f32(u16::from_le_bytes([c[0], c[1]]))).collect()
            }
            Dtype::BF16 => {
                raw.chunks_exact(2).map(|c| crate::io::half::bf16_to_f32(u16::from_le_bytes([c[0], c[1]]))).collect()
            }
            other => return Err(ModelError::Dtype { path: path.to_path_buf(), name, dtype: format!("{other:?}") }),
        };
        out.insert(name, HostTensor { shape: view.shape().to_vec(), data });
    }
    Ok(())
}
