//! A Hugging Face folder as llama.cpp's `convert_hf_to_gguf.py` writes it, so that a merged
//! export needs no GGUF base: the architecture's `{arch}.*` keys from the configuration, the
//! tokenizer's keys from `tokenizer.json` ([`crate::io::gguf_vocab`]), and every tensor under its
//! GGUF name in GGUF's layout (LLaMA's Q/K rows permuted, Gemma's norms as `1 + w`, GPT-2's
//! `Conv1D` weights transposed), stored as the folder stores it (1-D tensors in F32, as the
//! converter keeps them). What llama.cpp reads back from those keys is compared with the folder's
//! own configuration: a model llama.cpp would run differently (a Mistral window, a Gemma 3 scale
//! it fixes) is refused, never written.

use std::collections::BTreeMap;
use std::path::Path;

use super::arch::{Family, RopeScaling};
use super::config::{Arch, ModelConfig};
use super::gguf_export::{gguf_name, permuted_heads, ExportError};
use super::gguf_model::{arch_name, plus_one};
use super::weights::{expected_tensors, permute_rotary, transpose, Weights};
use crate::io::gguf::{GgmlType, Gguf, Value};
use crate::io::gguf_write::{GgufOut, OutTensor};
use crate::ops::quant::quantize;

type Result<T> = std::result::Result<T, ExportError>;

/// The folder `dir` (its configuration and tokenizer; its tensors from `weights`, loaded from it)
/// as a GGUF model, checked to mean to llama.cpp what it means to transformers.
pub fn folder_gguf(dir: &Path, weights: &Weights) -> Result<Gguf> {
    let model = &weights.config;
    let name = dir.file_name().and_then(|n| n.to_str()).unwrap_or("model");
    let mut g = GgufOut::default();
    let arch = arch_name(model.family);
    g.set("general.architecture", Value::String(arch.into()));
    g.set("general.type", Value::String("model".into()));
    g.set("general.name", Value::String(name.into()));
    for (k, v) in arch_metadata(model) {
        g.set(&format!("{arch}.{k}"), v);
    }
    let stored = stored_types(dir)?;
    let ftype = file_type(stored.values().copied());
    g.set("general.file_type", Value::U32(ftype));
    g.set("general.quantization_version", Value::U32(2));
    let vocab = crate::io::gguf_vocab::vocab_metadata(dir, model.vocab_size, arch)?;
    for (k, v) in vocab {
        g.set(&k, v);
    }
    g.tensors = tensors(model, weights, &stored)?;
    let bytes = g.to_bytes();
    let parsed = Gguf::from_bytes(&format!("{} as GGUF", dir.display()), bytes)?;
    let theirs =
        ModelConfig::from_gguf(&parsed).map_err(|source| ExportError::Reread { dir: dir.to_path_buf(), source })?;
    let differ = differences(model, &theirs);
    if !differ.is_empty() {
        return Err(ExportError::Refused(format!(
            "{}: llama.cpp's {arch} would run this model differently from transformers ({}); no GGUF is written",
            dir.display(),
            differ.join("; ")
        )));
    }
    Ok(parsed)
}

/// `{arch}.*` keys (without the prefix) as the converter writes them from `config.json`.
fn arch_metadata(c: &ModelConfig) -> Vec<(&'static str, Value)> {
    let u = |v: usize| Value::U32(v as u32);
    let mut m = vec![
        ("block_count", u(c.num_layers)),
        ("context_length", u(c.max_positions)),
        ("embedding_length", u(c.hidden_size)),
        ("feed_forward_length", u(c.intermediate_size)),
        ("attention.head_count", u(c.num_heads)),
    ];
    if c.family == Family::Gpt2 {
        m.push(("attention.layer_norm_epsilon", Value::F32(c.norm_eps as f32)));
        return m;
    }
    m.push(("attention.head_count_kv", u(c.num_kv_heads)));
    // The global layers' rotary base (Gemma 3's sliding layers have their own, freq_base_swa).
    let global = c.layers.iter().find(|l| l.window == 0).unwrap_or(&c.layers[0]);
    m.push(("rope.freq_base", Value::F32(global.rope.theta as f32)));
    if let Some(local) = c.layers.iter().find(|l| l.window > 0).filter(|_| c.family == Family::Gemma3) {
        m.push(("rope.freq_base_swa", Value::F32(local.rope.theta as f32)));
    }
    m.push(("attention.layer_norm_rms_epsilon", Value::F32(c.norm_eps as f32)));
    if matches!(c.family, Family::Llama | Family::Mistral) {
        m.push(("vocab_size", u(c.vocab_size)));
        m.push(("rope.dimension_count", u(c.head_dim)));
    }
    if c.head_dim * c.num_heads != c.hidden_size || matches!(c.family, Family::Qwen3 | Family::Gemma3) {
        m.push(("attention.key_length", u(c.head_dim)));
        m.push(("attention.value_length", u(c.head_dim)));
    }
    if let Some(RopeScaling::Linear { factor }) = &global.rope.scaling {
        m.push(("rope.scaling.type", Value::String("linear".into())));
        m.push(("rope.scaling.factor", Value::F32(*factor as f32)));
    }
    if c.family == Family::Gemma3 {
        let window = c.layers.iter().map(|l| l.window).max().unwrap_or(0);
        m.push(("attention.sliding_window", u(window)));
        if let Some(cap) = c.block.final_softcap {
            m.push(("final_logit_softcapping", Value::F32(cap as f32)));
        }
    }
    m
}

/// LLAMA_FTYPE of a file whose 2-D tensors are stored as `types`: all F32 0, F16 1, BF16 32
/// (mixed: the most common).
fn file_type(types: impl Iterator<Item = GgmlType>) -> u32 {
    let mut count: BTreeMap<u32, usize> = BTreeMap::new();
    for t in types {
        let f = match t {
            GgmlType::F16 => 1,
            GgmlType::BF16 => 32,
            _ => 0,
        };
        *count.entry(f).or_insert(0) += 1;
    }
    count.into_iter().max_by_key(|(_, n)| *n).map_or(0, |(f, _)| f)
}

/// Each tensor's dtype in the folder's safetensors files (read from their headers alone), as the
/// GGUF type that keeps it exactly.
fn stored_types(dir: &Path) -> Result<BTreeMap<String, GgmlType>> {
    let mut files: Vec<std::path::PathBuf> = std::fs::read_dir(dir)
        .map_err(|source| ExportError::Io { path: dir.to_path_buf(), source })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    let mut out = BTreeMap::new();
    for f in files {
        let header = read_header(&f)?;
        for (name, info) in header.as_object().into_iter().flatten() {
            let ty = match info["dtype"].as_str() {
                Some("F16") => GgmlType::F16,
                Some("BF16") => GgmlType::BF16,
                _ => GgmlType::F32,
            };
            out.insert(name.clone(), ty);
        }
    }
    Ok(out)
}

/// A safetensors file's JSON header (8 bytes of length, then the JSON).
fn read_header(path: &Path) -> Result<serde_json::Value> {
    use std::io::Read;
    let io = |source| ExportError::Io { path: path.to_path_buf(), source };
    let mut f = std::fs::File::open(path).map_err(io)?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len).map_err(io)?;
    let len = u64::from_le_bytes(len);
    if len > 100 << 20 {
        return Err(ExportError::Refused(format!(
            "{}: a safetensors header of {len} bytes: the file is corrupt",
            path.display()
        )));
    }
    let mut text = vec![0u8; len as usize];
    f.read_exact(&mut text).map_err(io)?;
    serde_json::from_slice(&text).map_err(|source| ExportError::Json { path: path.to_path_buf(), source })
}

/// Every tensor the converter writes, in the model's own order, in GGUF's layout.
fn tensors(model: &ModelConfig, w: &Weights, stored: &BTreeMap<String, GgmlType>) -> Result<Vec<OutTensor>> {
    // Llama 3's rotary divisors first, as the converter yields them.
    let mut out: Vec<OutTensor> = rope_freqs(model)
        .map(|f| OutTensor {
            name: "rope_freqs.weight".into(),
            shape: vec![f.len()],
            ty: GgmlType::F32,
            bytes: quantize(GgmlType::F32, &f),
        })
        .into_iter()
        .collect();
    for (hf, shape) in expected_tensors(model) {
        let t = w.get(&hf)?;
        let name = gguf_name(model, &hf)
            .ok_or_else(|| ExportError::Refused(format!("{hf} has no GGUF name in llama.cpp's {:?}", model.family)))?;
        let (mut data, mut shape) = (t.data.clone(), shape);
        if model.arch == Arch::Gpt2 && shape.len() == 2 && hf.contains(".h.") {
            // Conv1D holds (in, out); GGUF the (out, in) of every other linear layer.
            data = transpose(&data, shape[0], shape[1]);
            shape.swap(0, 1);
        }
        if let Some(h) = permuted_heads(model, &hf) {
            let cols = if shape.len() == 2 { shape[1] } else { 1 };
            data = permute_rotary(&data, shape[0], cols, h);
        }
        if plus_one(model.family, &hf) {
            data.iter_mut().for_each(|v| *v += 1.0);
        }
        let bare = hf.strip_prefix("transformer.").unwrap_or(&hf);
        // 1-D tensors and GPT-2's positions stay F32, as the converter keeps them.
        let ty = match shape.len() {
            _ if shape.len() == 1 || name.starts_with("position_embd") => GgmlType::F32,
            _ => stored.get(&hf).or_else(|| stored.get(bare)).copied().unwrap_or(GgmlType::F32),
        };
        out.push(OutTensor { name, shape, ty, bytes: quantize(ty, &data) });
    }
    Ok(out)
}

/// Llama 3's rotary scaling as llama.cpp carries it: per-frequency divisors.
fn rope_freqs(model: &ModelConfig) -> Option<Vec<f32>> {
    let rope = &model.layers.first()?.rope;
    if !matches!(rope.scaling, Some(RopeScaling::Llama3 { .. })) {
        return None;
    }
    let plain = super::arch::Rope::plain(rope.theta).inv_freq(model.head_dim);
    Some(plain.iter().zip(rope.inv_freq(model.head_dim)).map(|(p, s)| p / s).collect())
}

/// What llama.cpp's reading of the file (`theirs`) computes differently from the folder's
/// configuration (`ours`), each said with both values.
fn differences(ours: &ModelConfig, theirs: &ModelConfig) -> Vec<String> {
    let mut d = Vec::new();
    let mut same = |what: &str, a: String, b: String| {
        if a != b {
            d.push(format!("{what}: {a} here, {b} in llama.cpp"));
        }
    };
    same("vocab_size", ours.vocab_size.to_string(), theirs.vocab_size.to_string());
    same("hidden_size", ours.hidden_size.to_string(), theirs.hidden_size.to_string());
    same("layers", ours.num_layers.to_string(), theirs.num_layers.to_string());
    same("heads", ours.num_heads.to_string(), theirs.num_heads.to_string());
    same("key/value heads", ours.num_kv_heads.to_string(), theirs.num_kv_heads.to_string());
    same("head_dim", ours.head_dim.to_string(), theirs.head_dim.to_string());
    same("intermediate_size", ours.intermediate_size.to_string(), theirs.intermediate_size.to_string());
    same("context", ours.max_positions.to_string(), theirs.max_positions.to_string());
    same("norm epsilon", (ours.norm_eps as f32).to_string(), (theirs.norm_eps as f32).to_string());
    same("tied head", ours.tie_embeddings.to_string(), theirs.tie_embeddings.to_string());
    let f32s = |x: Option<f64>| format!("{:?}", x.map(|v| v as f32));
    let (a, b) = (ours.block, theirs.block);
    same("attention scale", f32s(a.attn_scale), f32s(b.attn_scale));
    same("final soft-cap", f32s(a.final_softcap), f32s(b.final_softcap));
    let plain = |b: super::arch::Block| super::arch::Block { attn_scale: None, final_softcap: None, ..b };
    same("block", format!("{:?}", plain(a)), format!("{:?}", plain(b)));
    for (i, (x, y)) in ours.layers.iter().zip(&theirs.layers).enumerate() {
        same(&format!("layer {i}'s attention window"), x.window.to_string(), y.window.to_string());
        let (p, q) = (x.rope.inv_freq(ours.head_dim), y.rope.inv_freq(theirs.head_dim));
        let close = p.len() == q.len() && p.iter().zip(&q).all(|(u, v)| (u - v).abs() <= 1e-6 * u.abs().max(v.abs()));
        if !close && ours.block.rope {
            same(&format!("layer {i}'s rotary embedding"), format!("{:?}", x.rope), format!("{:?}", y.rope));
        }
    }
    d
}
