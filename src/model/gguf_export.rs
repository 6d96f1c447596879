//! Fine-tunes out as GGUF, for llama.cpp, Ollama and LM Studio: a LoRA adapter as llama.cpp's
//! `convert_lora_to_gguf.py` writes one, or the whole model with the adapter merged, its base's
//! metadata (tokenizer, chat template) copied. Both are built in memory from plain values (no GPU,
//! no files), so the page builds them too.
//!
//! A GGUF LoRA file: `general.architecture` (the base's), `general.type = "adapter"`,
//! `adapter.type = "lora"`, `adapter.lora.alpha`; per adapted weight `blk.N.<tensor>.weight` a
//! pair `….weight.lora_a` (r, in) and `….weight.lora_b` (out, r) in PyTorch order (GGUF lists them
//! innermost first: `[in, r]` and `[r, out]`), with the rows of B permuted where the converter
//! permuted the base's Q/K rows (LLaMA's interleaved rotary pairs). llama.cpp scales each pair by
//! alpha / r (r: that pair's rank), so a per-module scale that differs from alpha / r (rsLoRA,
//! alpha or rank patterns) is folded into B, and VeRA is written as the exact rank-r LoRA it
//! equals: A' = λ_d ⊙ A, B' = λ_b ⊙ B, alpha = r.

use std::collections::{BTreeMap, BTreeSet};

use super::config::{Arch, ModelConfig};
use super::gguf_model::{arch_name, family_of, hf_name, permuted, Mapped};
use super::weights::{permute_rotary, HostTensor, Weights};
use crate::adapter::{AdapterConfig, Method};
use crate::io::gguf::{dequantize, GgmlType, Gguf, Value};
use crate::io::gguf_write::{metadata_in_order, GgufOut, OutTensor};
use crate::ops::quant::quantize;

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("{0}")]
    Refused(String),
    #[error("the adapter has no tensor {key:?}; is it an adapter of this model with these settings?")]
    Missing { key: String },
    #[error("tensor {key:?} has shape {got:?}, but this model's {module} needs {want:?}")]
    Shape { key: String, got: Vec<usize>, want: Vec<usize>, module: String },
    #[error(transparent)]
    Adapter(#[from] crate::adapter::AdapterError),
    #[error(transparent)]
    Gguf(#[from] crate::io::gguf::GgufError),
    #[error(transparent)]
    Tokenizer(#[from] crate::io::tokenizer::TokenizerError),
    #[error(transparent)]
    Model(#[from] super::weights::ModelError),
    /// The folder's model as llama.cpp reads it back from the GGUF written for it.
    #[error("{dir}: llama.cpp's reading of its GGUF fails: {source}")]
    Reread {
        dir: std::path::PathBuf,
        #[source]
        source: super::weights::ModelError,
    },
    #[error("{path}: {source}")]
    Io {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Json {
        path: std::path::PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

type Result<T> = std::result::Result<T, ExportError>;

/// One adapted weight's branch as an exact low-rank product `scale · B · A`, in the Hugging
/// Face layout of the weight (`(out, in)` as nn.Linear holds it; GPT-2's Conv1D included).
#[derive(Clone, Debug)]
pub struct Factors {
    /// transformers' module name, e.g. `model.layers.3.self_attn.q_proj`.
    pub module: String,
    /// `(r, in)`.
    pub a: HostTensor,
    /// `(out, r)`.
    pub b: HostTensor,
    pub scale: f64,
}

fn get<'a>(
    tensors: &'a BTreeMap<String, HostTensor>,
    key: &str,
    want: &[usize],
    module: &str,
) -> Result<&'a HostTensor> {
    let t = tensors.get(key).ok_or_else(|| ExportError::Missing { key: key.to_string() })?;
    if t.shape != want {
        return Err(ExportError::Shape {
            key: key.to_string(),
            got: t.shape.clone(),
            want: want.to_vec(),
            module: module.to_string(),
        });
    }
    Ok(t)
}

/// The adapter's branches as low-rank products, one per adapted weight, from its tensors under
/// PEFT's names (an adapter folder's, or an adapter read back from the GPU).
pub fn factors(
    cfg: &AdapterConfig,
    tensors: &BTreeMap<String, HostTensor>,
    model: &ModelConfig,
) -> Result<Vec<Factors>> {
    let sites = cfg.sites(model)?;
    let mut out = Vec::with_capacity(sites.len());
    for s in &sites {
        let (m, inf, outf) = (&s.module, s.in_features, s.out_features());
        let key = |t: &str| format!("base_model.model.{m}.{t}");
        if cfg.method == Method::Vera {
            // PEFT slices the shared pair to each layer's size: A[:, :in], B[:out, :].
            let r = cfg.rank;
            let sa = tensors
                .get("base_model.vera_A")
                .ok_or_else(|| ExportError::Missing { key: "base_model.vera_A".into() })?;
            let sb = tensors
                .get("base_model.vera_B")
                .ok_or_else(|| ExportError::Missing { key: "base_model.vera_B".into() })?;
            let (max_in, max_out) = (sa.shape[1], sb.shape[0]);
            if sa.shape[0] != r || sb.shape[1] != r || max_in < inf || max_out < outf {
                return Err(ExportError::Shape {
                    key: "base_model.vera_A / vera_B".into(),
                    got: [sa.shape.clone(), sb.shape.clone()].concat(),
                    want: vec![r, inf, outf, r],
                    module: m.clone(),
                });
            }
            let ld = get(tensors, &key("vera_lambda_d"), &[r], m)?;
            let lb = get(tensors, &key("vera_lambda_b"), &[outf], m)?;
            let a =
                (0..r).flat_map(|i| (0..inf).map(move |j| (i, j))).map(|(i, j)| ld.data[i] * sa.data[i * max_in + j]);
            let b = (0..outf).flat_map(|o| (0..r).map(move |i| (o, i))).map(|(o, i)| lb.data[o] * sb.data[o * r + i]);
            out.push(Factors {
                module: m.clone(),
                a: HostTensor { shape: vec![r, inf], data: a.collect() },
                b: HostTensor { shape: vec![outf, r], data: b.collect() },
                scale: 1.0,
            });
        } else {
            let r = cfg.rank_for(m)?;
            let a = get(tensors, &key("lora_A.weight"), &[r, inf], m)?.clone();
            let b = get(tensors, &key("lora_B.weight"), &[outf, r], m)?.clone();
            out.push(Factors { module: m.clone(), a, b, scale: cfg.scale_for(m)? });
        }
    }
    Ok(out)
}

/// DoRA's adapted weights merged on the host as PEFT merges them, in f64: `W' = g ⊙ (W0 + s·B·A)`
/// per output o, `g_o = m_o / ‖W0_o + s·(B·A)_o‖` (over the input dimension), each weight in its
/// Hugging Face layout (GPT-2's Conv1D `(in, out)`: outputs are columns). Returns a [`Weights`]
/// holding those tensors only, for [`merged_gguf`] with factors of scale 0 (a DoRA branch is not a
/// low-rank product).
pub fn dora_merged(weights: &Weights, factors: &[Factors], tensors: &BTreeMap<String, HostTensor>) -> Result<Weights> {
    let conv1d = weights.config.block.conv1d;
    let mut out = BTreeMap::new();
    for f in factors {
        let key = format!("{}.weight", f.module);
        let w0 = weights.tensors.get(&key).ok_or_else(|| ExportError::Missing { key: key.clone() })?;
        let (r, inf, outf) = (f.a.shape[0], f.a.shape[1], f.b.shape[0]);
        let m_key = format!("base_model.model.{}.lora_magnitude_vector", f.module);
        let m = get(tensors, &m_key, &[outf], &f.module)?;
        let at = |o: usize, k: usize| if conv1d { k * outf + o } else { o * inf + k };
        if w0.data.len() != outf * inf {
            return Err(ExportError::Shape {
                key,
                got: w0.shape.clone(),
                want: vec![outf, inf],
                module: f.module.clone(),
            });
        }
        let mut merged = w0.data.clone();
        for o in 0..outf {
            let row: Vec<f64> = (0..inf)
                .map(|k| {
                    let ba: f64 = (0..r).map(|j| f.b.data[o * r + j] as f64 * f.a.data[j * inf + k] as f64).sum();
                    w0.data[at(o, k)] as f64 + f.scale * ba
                })
                .collect();
            let g = m.data[o] as f64 / row.iter().map(|v| v * v).sum::<f64>().sqrt();
            for (k, v) in row.iter().enumerate() {
                merged[at(o, k)] = (g * v) as f32;
            }
        }
        out.insert(key, HostTensor { shape: w0.shape.clone(), data: merged });
    }
    Ok(Weights {
        config: weights.config.clone(),
        tensors: out,
        raw: Default::default(),
        source: weights.source.clone(),
        left_out: None,
    })
}

/// The GGUF tensor name of a transformers tensor (`model.layers.3.self_attn.q_proj.weight` →
/// `blk.3.attn_q.weight`, `model.norm.weight` → `output_norm.weight`): the loader's mapping,
/// inverted.
pub fn gguf_name(model: &ModelConfig, hf: &str) -> Option<String> {
    const BLOCK: [&str; 14] = [
        "attn_norm",
        "attn_q",
        "attn_k",
        "attn_v",
        "attn_output",
        "attn_qkv",
        "attn_q_norm",
        "attn_k_norm",
        "ffn_norm",
        "post_attention_norm",
        "post_ffw_norm",
        "ffn_gate",
        "ffn_up",
        "ffn_down",
    ];
    const TOP: [&str; 4] = ["token_embd", "position_embd", "output_norm", "output"];
    let (prefix, param) = hf.rsplit_once('.')?;
    let names: Vec<String> = match prefix.split('.').find_map(|p| p.parse::<usize>().ok()) {
        Some(layer) => BLOCK.iter().map(|m| format!("blk.{layer}.{m}.{param}")).collect(),
        None => TOP.iter().map(|m| format!("{m}.{param}")).collect(),
    };
    names.into_iter().find(|g| matches!(hf_name(model.family, g), Some(Mapped::Tensor(h)) if h == hf))
}

/// The heads whose rotary rows llama.cpp's converter permuted in the transformers weight `hf`
/// (`….q_proj.weight`), if it did.
pub fn permuted_heads(model: &ModelConfig, hf: &str) -> Option<usize> {
    match (permuted(model.family), hf.contains("q_proj."), hf.contains("k_proj.")) {
        (true, true, _) => Some(model.num_heads),
        (true, _, true) => Some(model.num_kv_heads),
        _ => None,
    }
}

/// A GGUF LoRA adapter (see the module docs) of `factors` for `model`, its tensors stored as `ty`
/// (F32 or F16). `alpha` is what the file records; `name` becomes `general.name`.
pub fn lora_gguf(model: &ModelConfig, factors: &[Factors], alpha: f64, ty: GgmlType, name: &str) -> Result<GgufOut> {
    if !matches!(ty, GgmlType::F32 | GgmlType::F16) {
        return Err(ExportError::Refused(format!(
            "--type {}: a LoRA adapter is written as f32 or f16 (llama.cpp's converter offers those)",
            ty.name().to_lowercase()
        )));
    }
    let mut g = GgufOut::default();
    g.set("general.architecture", Value::String(arch_name(model.family).into()));
    g.set("general.type", Value::String("adapter".into()));
    g.set("general.name", Value::String(name.into()));
    g.set("adapter.type", Value::String("lora".into()));
    g.set("adapter.lora.alpha", Value::F32(alpha as f32));
    for f in factors {
        let hf = format!("{}.weight", f.module);
        let base = gguf_name(model, &hf).ok_or_else(|| {
            ExportError::Refused(format!("{hf} has no GGUF tensor name in llama.cpp's {:?}", model.family))
        })?;
        let r = f.a.shape[0];
        // llama.cpp scales the pair by alpha / r: another scale is folded into B.
        let fold = (f.scale * r as f64 / alpha) as f32;
        let mut b: Vec<f32> = if fold == 1.0 { f.b.data.clone() } else { f.b.data.iter().map(|v| v * fold).collect() };
        if let Some(h) = permuted_heads(model, &hf) {
            b = permute_rotary(&b, f.b.shape[0], r, h);
        }
        let t = |suffix: &str, shape: &[usize], data: &[f32]| OutTensor {
            name: format!("{base}.{suffix}"),
            shape: shape.to_vec(),
            ty,
            bytes: quantize(ty, data),
        };
        g.tensors.push(t("lora_a", &f.a.shape, &f.a.data));
        g.tensors.push(t("lora_b", &f.b.shape, &b));
    }
    Ok(g)
}

/// The alpha a GGUF LoRA file records for `cfg`: LoRA's own when its scale is alpha / r; else
/// one that makes llama.cpp's alpha / r equal the scale at the adapter's rank (VeRA: r, so 1).
pub fn file_alpha(cfg: &AdapterConfig) -> f64 {
    match cfg.method {
        Method::Vera => cfg.rank as f64,
        _ => cfg.scale() * cfg.rank as f64,
    }
}

/// `base` (a parsed GGUF model) with the adapter's `factors` merged in: every metadata key and
/// every tensor the adapter does not touch copied as stored (or converted to `ty` when given),
/// each merged weight `W + scale · B · A` (`W` from `weights`, in transformers' layout; a scale
/// of 0 writes `W` as it is, for Delta-LoRA's already merged model) quantized to `ty` or to its
/// own type. Returns the file
/// and what it had to say (a tensor whose rows do not fit `ty`'s blocks, stored otherwise).
pub fn merged_gguf(
    base: &Gguf,
    weights: &Weights,
    factors: &[Factors],
    ty: Option<GgmlType>,
) -> Result<(GgufOut, Vec<String>)> {
    let model = &weights.config;
    let by_weight: BTreeMap<String, &Factors> = factors.iter().map(|f| (format!("{}.weight", f.module), f)).collect();
    let mut notes = Vec::new();
    let mut g = GgufOut { metadata: metadata_in_order(&base.metadata), tensors: Vec::new() };
    if let Some(t) = ty {
        // llama.cpp's file types for whole-file conversions (LLAMA_FTYPE_*).
        let ftype = match t {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::Q4_0 => 2,
            GgmlType::Q4_1 => 3,
            GgmlType::Q8_0 => 7,
            GgmlType::Q5_0 => 8,
            GgmlType::Q5_1 => 9,
            GgmlType::Q2_K => 10,
            GgmlType::Q3_K => 11,
            GgmlType::Q4_K => 15,
            GgmlType::Q5_K => 16,
            GgmlType::Q6_K => 18,
            GgmlType::BF16 => 32,
        };
        g.set("general.file_type", Value::U32(ftype));
    }
    let mut merged = BTreeSet::new();
    let mut kept = Kept::default();
    // (row length, wanted type, type stored) → tensors.
    let mut fallbacks: BTreeMap<(usize, &str, &str), usize> = BTreeMap::new();
    for info in &base.tensors {
        let hf = match hf_name(model.family, &info.name) {
            Some(Mapped::Tensor(h)) => Some(h),
            _ => None,
        };
        let factor = hf.as_ref().and_then(|h| by_weight.get(h));
        let want = match (ty, info.shape.len()) {
            // Norms and biases stay as stored (llama.cpp keeps 1-D tensors in F32).
            (Some(t), 2) => t,
            _ => info.ty,
        };
        let (out_ty, fallback) = fitting_type(want, &info.shape);
        if let Some(f) = fallback {
            *fallbacks.entry((info.shape[1], want.name(), f.name())).or_insert(0) += 1;
        }
        let bytes = match factor {
            None if out_ty == info.ty => base.raw(info)?,
            None => quantize(out_ty, &dequantize(info.ty, &base.raw(info)?)),
            Some(f) => {
                let h = hf.as_deref().unwrap_or_default();
                merged.insert(h.to_string());
                let rows = merged_rows(model, weights, h, f)?;
                let q = quantize(out_ty, &rows);
                if !matches!(out_ty, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16) {
                    kept.add(&dequantize(info.ty, &base.raw(info)?), &rows, &dequantize(out_ty, &q));
                }
                q
            }
        };
        g.tensors.push(OutTensor { name: info.name.clone(), shape: info.shape.clone(), ty: out_ty, bytes });
    }
    if let Some(missed) = by_weight.keys().find(|k| !merged.contains(*k)) {
        return Err(ExportError::Refused(format!(
            "{missed} is adapted but the base GGUF {} has no tensor for it",
            base.path.display()
        )));
    }
    for ((cols, want, stored), n) in fallbacks {
        notes.push(format!(
            "{n} tensor(s) with rows of {cols} values do not fill {want}'s blocks of {}: stored as {stored} (as \
             llama.cpp's quantizer falls back)",
            GgmlType::from_name(want).map(|t| t.block().0).unwrap_or(0)
        ));
    }
    notes.extend(kept.note());
    Ok((g, notes))
}

/// How much of the adapter's change to the weights survives their quantization: a change smaller
/// than the type's steps rounds back to the base's own values (merging into a Q4 base and
/// quantizing to Q4 again can lose most of a fine-tune).
#[derive(Default)]
struct Kept {
    /// Σ ⟨stored − W0, ΔW⟩, Σ ‖ΔW‖², Σ ‖stored − (W0 + ΔW)‖², Σ ‖W0 + ΔW‖².
    along: f64,
    change: f64,
    error: f64,
    size: f64,
}

impl Kept {
    /// Adds one tensor: the base's values `w0`, the merged values `want` and what the file stores.
    fn add(&mut self, w0: &[f32], want: &[f32], stored: &[f32]) {
        for ((&b, &m), &q) in w0.iter().zip(want).zip(stored) {
            let (d, got) = ((m - b) as f64, (q - b) as f64);
            self.along += got * d;
            self.change += d * d;
            self.error += (q as f64 - m as f64).powi(2);
            self.size += (m as f64).powi(2);
        }
    }

    /// What quantizing did to the adapter's change, with advice when it lost much of it.
    fn note(&self) -> Option<String> {
        if self.change == 0.0 {
            return None;
        }
        let kept = self.along / self.change;
        let (noise, relative) = ((self.error / self.change).sqrt(), (self.error / self.size.max(1e-300)).sqrt());
        // The rounding error is the type's own (any file of that type carries it) and lies across
        // the change, not along it; what says whether the fine-tune survived is the kept share.
        let verdict = if kept < 0.75 {
            ": the change is smaller than the type's steps and mostly rounds away. For the fine-tune whole, \
             export --type f16 or q8_0, or the adapter --as lora to run beside the quantized base"
        } else {
            ", so the fine-tune survives the quantization"
        };
        Some(format!(
            "quantized, the merged weights keep {:.0}% of the adapter's change (the rounding error, {:.2}% of the \
             weights' size as in any file of this type, is {noise:.1}× the change's size but lies across it, not \
             along it){verdict}",
            100.0 * kept,
            100.0 * relative
        ))
    }
}

/// `ty` when a `shape`'s rows fill its blocks, else the nearest that does (Q8_0, then F16), said.
fn fitting_type(ty: GgmlType, shape: &[usize]) -> (GgmlType, Option<GgmlType>) {
    let cols = *shape.last().unwrap_or(&1) as u64;
    if cols.is_multiple_of(ty.block().0) {
        return (ty, None);
    }
    let f = if cols.is_multiple_of(32) { GgmlType::Q8_0 } else { GgmlType::F16 };
    (f, Some(f))
}

/// `W + scale · B · A` for the Hugging Face weight `hf`, in the GGUF file's row order and layout.
fn merged_rows(model: &ModelConfig, w: &Weights, hf: &str, f: &Factors) -> Result<Vec<f32>> {
    let t = w.tensors.get(hf).ok_or_else(|| ExportError::Missing { key: hf.to_string() })?;
    let (r, inf, outf) = (f.a.shape[0], f.a.shape[1], f.b.shape[0]);
    // GPT-2's Conv1D holds (in, out); GGUF and the product are (out, in).
    let conv1d = model.arch == Arch::Gpt2;
    // W in (out, in), then s·B·A added in f64 (a scale of 0 leaves W as it is).
    let mut out: Vec<f32> =
        (0..outf * inf).map(|k| if conv1d { t.data[(k % inf) * outf + k / inf] } else { t.data[k] }).collect();
    if f.scale != 0.0 {
        for o in 0..outf {
            for i in 0..inf {
                let d: f64 = (0..r).map(|k| f.b.data[o * r + k] as f64 * f.a.data[k * inf + i] as f64).sum();
                out[o * inf + i] = (out[o * inf + i] as f64 + f.scale * d) as f32;
            }
        }
    }
    Ok(match permuted_heads(model, hf) {
        Some(h) => permute_rotary(&out, outf, inf, h),
        None => out,
    })
}

/// A GGUF LoRA adapter read back: each pair under transformers' module name, in PEFT's layout.
#[derive(Debug)]
pub struct GgufLora {
    /// `adapter.lora.alpha`; `None` when the file has 0 or none, which llama.cpp reads as a scale
    /// of 1 for every pair (whatever its rank).
    pub alpha: Option<f64>,
    /// `(module, A (r, in), B (out, r))`, B's rows as the file holds them.
    pub pairs: Vec<(String, HostTensor, HostTensor)>,
    /// The modules whose B rows are in llama.cpp's rotary order (LLaMA's q/k): see
    /// [`permuted_heads`] and [`super::weights::unpermute_rotary`].
    pub rotary: Vec<String>,
}

/// Reads a GGUF LoRA adapter (as [`lora_gguf`] and llama.cpp's converter write them).
pub fn read_gguf_lora(g: &Gguf) -> Result<GgufLora> {
    let text = |k: &str| g.metadata.get(k).and_then(Value::as_str).unwrap_or("");
    let path = g.path.display();
    if text("general.type") != "adapter" || text("adapter.type") != "lora" {
        return Err(ExportError::Refused(format!(
            "{path}: not a GGUF LoRA adapter (general.type {:?}, adapter.type {:?}; expected \"adapter\" and \"lora\")",
            text("general.type"),
            text("adapter.type")
        )));
    }
    let family = family_of(text("general.architecture")).ok_or_else(|| {
        ExportError::Refused(format!(
            "{path}: general.architecture {:?} is not one portalora runs",
            text("general.architecture")
        ))
    })?;
    let mut pairs = Vec::new();
    let mut rotary = Vec::new();
    for a in g.tensors.iter().filter(|t| t.name.ends_with(".lora_a")) {
        let base = a.name.trim_end_matches(".lora_a");
        let b = g.tensor(&format!("{base}.lora_b"))?;
        let hf = match hf_name(family, base) {
            Some(Mapped::Tensor(h)) => h,
            _ => {
                return Err(ExportError::Refused(format!("{path}: {} adapts no weight of a {family:?} model", a.name)))
            }
        };
        if a.shape.len() != 2 || b.shape.len() != 2 || a.shape[0] != b.shape[1] {
            return Err(ExportError::Refused(format!(
                "{path}: {} {:?} and {} {:?} are not a (r, in), (out, r) pair",
                a.name, a.shape, b.name, b.shape
            )));
        }
        let module = hf.trim_end_matches(".weight").to_string();
        if permuted(family) && (hf.contains("q_proj.") || hf.contains("k_proj.")) {
            rotary.push(module.clone());
        }
        let t = |info: &crate::io::gguf::TensorInfo| -> Result<HostTensor> {
            Ok(HostTensor { shape: info.shape.clone(), data: dequantize(info.ty, &g.raw(info)?) })
        };
        pairs.push((module, t(a)?, t(b)?));
    }
    let bases: BTreeSet<&str> = g.tensors.iter().filter_map(|t| t.name.strip_suffix(".lora_a")).collect();
    if let Some(b) = g.tensors.iter().find(|t| t.name.strip_suffix(".lora_b").is_some_and(|n| !bases.contains(n))) {
        return Err(ExportError::Refused(format!("{path}: {} has no .lora_a beside it", b.name)));
    }
    // A whole tensor (a trained embedding or head, say) is no low-rank pair: not applying it
    // would run another model than the one trained.
    if let Some(t) = g.tensors.iter().find(|t| !t.name.ends_with(".lora_a") && !t.name.ends_with(".lora_b")) {
        return Err(ExportError::Refused(format!(
            "{path}: {} is not a .lora_a / .lora_b tensor; portalora applies low-rank pairs only",
            t.name
        )));
    }
    if pairs.is_empty() {
        return Err(ExportError::Refused(format!("{path}: holds no lora_a / lora_b pairs")));
    }
    let alpha = g.metadata.get("adapter.lora.alpha").and_then(Value::as_f64).filter(|&a| a != 0.0);
    Ok(GgufLora { alpha, pairs, rotary })
}
