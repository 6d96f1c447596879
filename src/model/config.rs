//! Model hyperparameters, read from `config.json` or from GGUF metadata.

use std::path::Path;

use serde::Deserialize;

use super::arch::Block;
use super::weights::ModelError;
use crate::io::gguf::{Gguf, Value};

/// The architectures portalora runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    /// LLaMA family: RMSNorm, rotary embeddings, grouped-query attention, SwiGLU MLP (SmolLM2).
    Llama,
    /// GPT-2: LayerNorm, learned positions, GELU-tanh MLP, Conv1D weights, tied head.
    Gpt2,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    pub arch: Arch,
    pub vocab_size: usize,
    /// Width of the residual stream (C).
    pub hidden_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    /// Key/value heads (grouped-query attention shares each among num_heads / num_kv_heads).
    pub num_kv_heads: usize,
    pub head_dim: usize,
    /// MLP inner width.
    pub intermediate_size: usize,
    pub max_positions: usize,
    /// RMSNorm / LayerNorm epsilon.
    pub norm_eps: f64,
    /// Rotary base (LLaMA only).
    pub rope_theta: f64,
    /// The LM head reuses the token embedding.
    pub tie_embeddings: bool,
    /// Mistral's / Qwen2's sliding attention window, when the config turns one on. Attention is
    /// not limited to a window yet, so sequences longer than this are refused (shorter ones are
    /// exactly what the model computes).
    pub sliding_window: Option<usize>,
    /// What one decoder block computes (norms, biases, activation, positions, layouts).
    pub block: Block,
}

/// The fields of a Hugging Face `config.json` we read (LLaMA and GPT-2 naming).
#[derive(Deserialize)]
struct HfConfig {
    model_type: Option<String>,
    vocab_size: Option<usize>,
    hidden_size: Option<usize>,
    n_embd: Option<usize>,
    num_hidden_layers: Option<usize>,
    n_layer: Option<usize>,
    num_attention_heads: Option<usize>,
    n_head: Option<usize>,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    intermediate_size: Option<usize>,
    n_inner: Option<usize>,
    max_position_embeddings: Option<usize>,
    n_positions: Option<usize>,
    rms_norm_eps: Option<f64>,
    layer_norm_epsilon: Option<f64>,
    rope_theta: Option<f64>,
    /// transformers ≥ 5 moves rope_theta here.
    rope_parameters: Option<RopeParameters>,
    tie_word_embeddings: Option<bool>,
    /// Fields that change what the model computes; each is refused unless it has the value
    /// portalora implements (never silently ignored).
    rope_scaling: Option<serde_json::Value>,
    hidden_act: Option<String>,
    activation_function: Option<String>,
    sliding_window: Option<usize>,
    use_sliding_window: Option<bool>,
    scale_attn_by_inverse_layer_idx: Option<bool>,
    scale_attn_weights: Option<bool>,
}

#[derive(Deserialize)]
struct RopeParameters {
    rope_theta: Option<f64>,
    rope_type: Option<String>,
}

/// The block an architecture's checkpoints describe.
fn block_of(arch: Arch) -> Block {
    match arch {
        Arch::Llama => Block::LLAMA,
        Arch::Gpt2 => Block::GPT2,
    }
}

/// Refuses `config.json` fields whose value changes what the model computes in a way portalora
/// does not implement: running the model anyway would give wrong numbers without a word.
fn check_semantics(c: &HfConfig, arch: Arch) -> Result<(), String> {
    let scaling = c.rope_scaling.as_ref().filter(|v| !v.is_null());
    if let Some(v) = scaling {
        let ty = v.get("rope_type").or_else(|| v.get("type")).and_then(|t| t.as_str()).unwrap_or("?");
        if ty != "default" {
            return Err(format!(
                "rope_scaling {{\"rope_type\": {ty:?}}} is not supported yet (only default rotary embeddings); \
                 ignoring it would make every result wrong"
            ));
        }
    }
    let act = match arch {
        Arch::Llama => c.hidden_act.as_deref().filter(|a| *a != "silu").map(|a| ("hidden_act", a, "silu")),
        Arch::Gpt2 => c
            .activation_function
            .as_deref()
            .filter(|a| !matches!(*a, "gelu_new" | "gelu_pytorch_tanh"))
            .map(|a| ("activation_function", a, "gelu_new")),
    };
    if let Some((field, a, want)) = act {
        return Err(format!("{field} {a:?} is not supported for this architecture; portalora runs {want:?}"));
    }
    if c.scale_attn_by_inverse_layer_idx == Some(true) || c.scale_attn_weights == Some(false) {
        return Err("GPT-2 attention scaling other than 1/sqrt(head_dim) (scale_attn_by_inverse_layer_idx, \
                    scale_attn_weights) is not supported"
            .into());
    }
    Ok(())
}

impl ModelConfig {
    /// Refuses a sequence of `seq` positions that the model cannot run as it was trained: past
    /// its context, or past a sliding attention window (not implemented yet).
    pub fn check_seq(&self, seq: usize) -> Result<(), String> {
        if seq > self.max_positions {
            return Err(format!(
                "sequence length {seq} exceeds the model's context of {} positions",
                self.max_positions
            ));
        }
        match self.sliding_window {
            Some(w) if seq > w => Err(format!(
                "sequence length {seq} exceeds the model's sliding attention window of {w} positions, which \
                 portalora does not implement yet"
            )),
            _ => Ok(()),
        }
    }

    /// The longest sequence [`ModelConfig::check_seq`] accepts.
    pub fn usable_positions(&self) -> usize {
        self.sliding_window.map_or(self.max_positions, |w| w.min(self.max_positions))
    }

    /// Reads `config.json` of a Hugging Face folder.
    pub fn from_hf_json(path: &Path) -> Result<Self, ModelError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ModelError::Io { path: path.to_path_buf(), source })?;
        Self::from_hf_str(path, &text)
    }

    /// Parses the text of a `config.json`; `path` names it in messages.
    pub fn from_hf_str(path: &Path, text: &str) -> Result<Self, ModelError> {
        let c: HfConfig = serde_json::from_str(text)
            .map_err(|e| ModelError::Config { path: path.to_path_buf(), message: e.to_string() })?;
        let bad = |message: String| ModelError::Config { path: path.to_path_buf(), message };
        let need = |v: Option<usize>, name: &str| v.ok_or_else(|| bad(format!("missing field {name:?}")));
        let arch = match c.model_type.as_deref() {
            Some("llama") | Some("mistral") | Some("qwen2") => Arch::Llama,
            Some("gpt2") => Arch::Gpt2,
            other => {
                return Err(bad(format!(
                    "model_type {other:?} is not supported; portalora runs \"llama\" and \"gpt2\" models"
                )))
            }
        };
        if let Some(t) = c.rope_parameters.as_ref().and_then(|r| r.rope_type.as_deref()).filter(|t| *t != "default") {
            return Err(bad(format!("rope_type {t:?} is not supported yet; only \"default\" rotary embeddings")));
        }
        check_semantics(&c, arch).map_err(bad)?;
        let hidden_size = need(c.hidden_size.or(c.n_embd), "hidden_size")?;
        let num_heads = need(c.num_attention_heads.or(c.n_head), "num_attention_heads")?;
        let cfg = ModelConfig {
            arch,
            vocab_size: need(c.vocab_size, "vocab_size")?,
            hidden_size,
            num_layers: need(c.num_hidden_layers.or(c.n_layer), "num_hidden_layers")?,
            num_heads,
            num_kv_heads: c.num_key_value_heads.unwrap_or(num_heads),
            head_dim: c.head_dim.unwrap_or(hidden_size / num_heads.max(1)),
            intermediate_size: match arch {
                Arch::Llama => need(c.intermediate_size, "intermediate_size")?,
                Arch::Gpt2 => c.n_inner.unwrap_or(4 * hidden_size),
            },
            max_positions: need(c.max_position_embeddings.or(c.n_positions), "max_position_embeddings")?,
            norm_eps: match arch {
                Arch::Llama => c.rms_norm_eps.unwrap_or(1e-6),
                Arch::Gpt2 => c.layer_norm_epsilon.unwrap_or(1e-5),
            },
            rope_theta: c.rope_parameters.as_ref().and_then(|r| r.rope_theta).or(c.rope_theta).unwrap_or(10000.0),
            tie_embeddings: c.tie_word_embeddings.unwrap_or(arch == Arch::Gpt2),
            sliding_window: match c.model_type.as_deref() {
                Some("mistral") => c.sliding_window,
                Some("qwen2") if c.use_sliding_window == Some(true) => c.sliding_window,
                _ => None,
            },
            block: block_of(arch),
        };
        cfg.validate().map_err(bad)?;
        Ok(cfg)
    }

    /// Reads the `llama.*` / `gpt2.*` metadata of a GGUF file.
    pub fn from_gguf(g: &Gguf) -> Result<Self, ModelError> {
        let bad = |message: String| ModelError::Config { path: g.path.clone(), message };
        let arch_name = g.metadata.get("general.architecture").and_then(Value::as_str).unwrap_or("");
        let arch = match arch_name {
            "llama" => Arch::Llama,
            "gpt2" => Arch::Gpt2,
            other => {
                return Err(bad(format!(
                    "general.architecture {other:?} is not supported; portalora runs llama and gpt2"
                )))
            }
        };
        let key = |k: &str| format!("{arch_name}.{k}");
        let int = |k: &str| -> Result<usize, ModelError> {
            g.metadata
                .get(&key(k))
                .and_then(Value::as_u64)
                .map(|v| v as usize)
                .ok_or_else(|| bad(format!("missing metadata {:?}", key(k))))
        };
        let float = |k: &str| g.metadata.get(&key(k)).and_then(Value::as_f64);
        let hidden_size = int("embedding_length")?;
        let num_heads = int("attention.head_count")?;
        let num_kv_heads = int("attention.head_count_kv").unwrap_or(num_heads);
        // The vocabulary size is in the metadata of newer files, else the tokenizer's length.
        let vocab_size = match int("vocab_size") {
            Ok(v) => v,
            Err(e) => match g.metadata.get("tokenizer.ggml.tokens") {
                Some(Value::Array(a)) => a.len(),
                _ => return Err(e),
            },
        };
        let has_output = g.tensors.iter().any(|t| t.name == "output.weight");
        let cfg = ModelConfig {
            arch,
            vocab_size,
            hidden_size,
            num_layers: int("block_count")?,
            num_heads,
            num_kv_heads,
            head_dim: int("rope.dimension_count").unwrap_or(hidden_size / num_heads.max(1)),
            intermediate_size: int("feed_forward_length")?,
            max_positions: int("context_length")?,
            norm_eps: match arch {
                Arch::Llama => float("attention.layer_norm_rms_epsilon").unwrap_or(1e-6),
                Arch::Gpt2 => float("attention.layer_norm_epsilon").unwrap_or(1e-5),
            },
            rope_theta: float("rope.freq_base").unwrap_or(10000.0),
            tie_embeddings: !has_output,
            sliding_window: None,
            block: block_of(arch),
        };
        if let Some(t) = g.metadata.get(&key("rope.scaling.type")).and_then(Value::as_str).filter(|t| *t != "none") {
            return Err(bad(format!(
                "metadata {:?} = {t:?}: scaled rotary embeddings are not supported yet, and ignoring them \
                 would make every result wrong",
                key("rope.scaling.type")
            )));
        }
        cfg.validate().map_err(bad)?;
        Ok(cfg)
    }

    /// Checks the numbers fit together; the message names the fields.
    pub fn validate(&self) -> Result<(), String> {
        let nonzero = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("num_layers", self.num_layers),
            ("num_heads", self.num_heads),
            ("num_kv_heads", self.num_kv_heads),
            ("head_dim", self.head_dim),
            ("intermediate_size", self.intermediate_size),
            ("max_positions", self.max_positions),
        ];
        for (name, v) in nonzero {
            if v == 0 {
                return Err(format!("{name} is 0"));
            }
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return Err(format!(
                "num_heads {} is not a multiple of num_kv_heads {}",
                self.num_heads, self.num_kv_heads
            ));
        }
        if self.arch == Arch::Llama && !self.head_dim.is_multiple_of(2) {
            return Err(format!("head_dim {} must be even for rotary embeddings", self.head_dim));
        }
        if self.arch == Arch::Gpt2 && self.num_heads * self.head_dim != self.hidden_size {
            return Err(format!(
                "GPT-2 needs num_heads {} × head_dim {} = hidden_size {}",
                self.num_heads, self.head_dim, self.hidden_size
            ));
        }
        if !(self.norm_eps > 0.0 && self.norm_eps.is_finite()) {
            return Err(format!("norm epsilon {} must be positive", self.norm_eps));
        }
        Ok(())
    }

    /// The attention call for `batch` rows of `seq` new positions after `q_offset` cached ones.
    pub fn attention_shape(&self, batch: usize, seq: usize, q_offset: usize) -> crate::ops::attention::AttentionShape {
        crate::ops::attention::AttentionShape {
            batch,
            seq,
            heads: self.num_heads,
            kv_heads: self.num_kv_heads,
            head_dim: self.head_dim,
            q_offset,
        }
    }

    /// The rotary calls for queries and keys of `seq` positions starting at `pos_offset`.
    pub fn rope_shapes(
        &self,
        seq: usize,
        pos_offset: usize,
    ) -> (crate::ops::rope::RopeShape, crate::ops::rope::RopeShape) {
        let q = crate::ops::rope::RopeShape {
            seq,
            heads: self.num_heads,
            head_dim: self.head_dim,
            theta: self.rope_theta,
            pos_offset,
        };
        (q, crate::ops::rope::RopeShape { heads: self.num_kv_heads, ..q })
    }

    /// Parameter count of the base model (tied head counted once).
    pub fn num_parameters(&self) -> usize {
        let c = self.hidden_size;
        let q = self.num_heads * self.head_dim;
        let kv = self.num_kv_heads * self.head_dim;
        let f = self.intermediate_size;
        let emb = self.vocab_size * c;
        let head = if self.tie_embeddings { 0 } else { emb };
        match self.arch {
            Arch::Llama => emb + head + c + self.num_layers * (2 * c + c * q + 2 * c * kv + q * c + 3 * c * f),
            Arch::Gpt2 => {
                emb + head
                    + self.max_positions * c
                    + 2 * c
                    + self.num_layers * (4 * c + (c * 3 * c + 3 * c) + (c * c + c) + (c * f + f) + (f * c + c))
            }
        }
    }
}
