//! A GGUF model as llama.cpp's converter writes it → [`ModelConfig`] and Hugging Face tensor
//! names, for the architectures `llama` (Llama 3 and Mistral included), `qwen2`, `qwen3`,
//! `gemma3` and `gpt2`. What the converter changed is undone here so that weights are exactly
//! transformers': the Q/K row permutation (llama only: qwen and gemma use NEOX rotary), Gemma's
//! norms stored as `1 + w`, GPT-2's transposed `Conv1D` weights. llama.cpp's fixed choices for
//! Gemma 3 (a global layer every sixth, base 10000 in the sliding layers) are followed as it
//! follows them.

use super::arch::{Block, Family, LayerSpec, Rope, RopeScaling};
use super::config::{Arch, ModelConfig};
use super::weights::ModelError;
use crate::io::gguf::{Gguf, Value};

/// The family a GGUF's `general.architecture` names.
pub(super) fn family_of(arch: &str) -> Option<Family> {
    Some(match arch {
        "llama" => Family::Llama,
        "qwen2" => Family::Qwen2,
        "qwen3" => Family::Qwen3,
        "gemma3" => Family::Gemma3,
        "gpt2" => Family::Gpt2,
        _ => return None,
    })
}

/// The `general.architecture` llama.cpp gives `family` (what [`family_of`] reads).
pub(super) fn arch_name(family: Family) -> &'static str {
    match family {
        // llama.cpp converts Mistral checkpoints as `llama`.
        Family::Llama | Family::Mistral => "llama",
        Family::Qwen2 => "qwen2",
        Family::Qwen3 => "qwen3",
        Family::Gemma3 => "gemma3",
        Family::Gpt2 => "gpt2",
    }
}

/// Reads the model's hyperparameters from `{arch}.*` metadata (and which tensors exist).
pub(super) fn config(g: &Gguf) -> Result<ModelConfig, ModelError> {
    let bad = |message: String| ModelError::Config { path: g.path.clone(), message };
    let arch_name = g.metadata.get("general.architecture").and_then(Value::as_str).unwrap_or("");
    let family = family_of(arch_name).ok_or_else(|| {
        bad(format!(
            "general.architecture {arch_name:?} is not supported; portalora runs llama, qwen2, qwen3, gemma3 and gpt2"
        ))
    })?;
    let key = |k: &str| format!("{arch_name}.{k}");
    let get = |k: &str| g.metadata.get(&key(k));
    let int = |k: &str| -> Result<usize, ModelError> {
        get(k).and_then(Value::as_u64).map(|v| v as usize).ok_or_else(|| bad(format!("missing metadata {:?}", key(k))))
    };
    let float = |k: &str| get(k).and_then(Value::as_f64);
    let has = |name: &str| g.tensors.iter().any(|t| t.name == name);
    let hidden_size = int("embedding_length")?;
    let num_heads = int("attention.head_count")?;
    let num_layers = int("block_count")?;
    // The vocabulary size is in the metadata of newer files, else the tokenizer's length.
    let vocab_size = match int("vocab_size") {
        Ok(v) => v,
        Err(e) => match g.metadata.get("tokenizer.ggml.tokens") {
            Some(Value::Array(a)) => a.len(),
            _ => return Err(e),
        },
    };
    let head_dim =
        int("attention.key_length").or_else(|_| int("rope.dimension_count")).unwrap_or(hidden_size / num_heads.max(1));
    let gpt2 = family == Family::Gpt2;
    let block = block_of(g, family, num_layers, hidden_size / num_heads.max(1), head_dim, float);
    // Each block has several tensors: a count beyond the tensors is corrupt metadata (and its
    // per-layer settings would exhaust memory).
    if num_layers > g.tensors.len() {
        return Err(bad(format!(
            "metadata {}.block_count = {num_layers}, but the file holds only {} tensors",
            arch_name,
            g.tensors.len()
        )));
    }
    let layers = layers(g, family, num_layers, head_dim)?;
    let cfg = ModelConfig {
        arch: if gpt2 { Arch::Gpt2 } else { Arch::Llama },
        family,
        vocab_size,
        hidden_size,
        num_layers,
        num_heads,
        num_kv_heads: int("attention.head_count_kv").unwrap_or(num_heads),
        head_dim,
        intermediate_size: int("feed_forward_length")?,
        max_positions: int("context_length")?,
        norm_eps: if gpt2 {
            float("attention.layer_norm_epsilon").unwrap_or(1e-5)
        } else {
            float("attention.layer_norm_rms_epsilon").unwrap_or(1e-6)
        },
        rope_theta: float("rope.freq_base").unwrap_or(10000.0),
        tie_embeddings: !has("output.weight"),
        block,
        layers,
    };
    cfg.validate().map_err(bad)?;
    Ok(cfg)
}

/// The block the file describes: the family's, with the biases the tensors have and Gemma's
/// attention scale and soft-cap.
fn block_of(
    g: &Gguf,
    family: Family,
    num_layers: usize,
    hidden_per_head: usize,
    head_dim: usize,
    float: impl Fn(&str) -> Option<f64>,
) -> Block {
    let has = |name: &str| g.tensors.iter().any(|t| t.name == name);
    let mut block = match family {
        Family::Gpt2 => return Block::GPT2,
        Family::Qwen2 => Block::QWEN2,
        Family::Qwen3 => Block::QWEN3,
        // llama.cpp scales Gemma 3's queries by 1/√head_dim (1/√(hidden/heads) for the 62-layer 27B).
        Family::Gemma3 => Block {
            attn_scale: Some(if num_layers == 62 { hidden_per_head } else { head_dim } as f64).map(|d| d.powf(-0.5)),
            final_softcap: float("final_logit_softcapping").filter(|c| *c > 0.0),
            ..Block::GEMMA3
        },
        _ => Block::LLAMA,
    };
    // Biases where the file has them (LLaMA's attention_bias / mlp_bias).
    block.qkv_bias |= has("blk.0.attn_q.bias");
    block.o_bias |= has("blk.0.attn_output.bias");
    block.mlp_bias |= has("blk.0.ffn_up.bias");
    block
}

/// Each layer's window and rotary embedding.
fn layers(g: &Gguf, family: Family, n: usize, head_dim: usize) -> Result<Vec<LayerSpec>, ModelError> {
    let bad = |message: String| ModelError::Config { path: g.path.clone(), message };
    let arch = g.metadata.get("general.architecture").and_then(Value::as_str).unwrap_or("");
    let get = |k: &str| g.metadata.get(&format!("{arch}.{k}"));
    let theta = get("rope.freq_base").and_then(Value::as_f64).unwrap_or(10000.0);
    let scaling = match get("rope.scaling.type").and_then(Value::as_str) {
        None | Some("none") => None,
        Some("linear") => {
            let factor = get("rope.scaling.factor").and_then(Value::as_f64).unwrap_or(1.0);
            (factor != 1.0).then_some(RopeScaling::Linear { factor })
        }
        Some(t) => {
            return Err(bad(format!(
                "metadata {arch}.rope.scaling.type = {t:?}: only linear scaling is supported; ignoring it would make \
                 every result wrong"
            )))
        }
    };
    // Llama 3's rope scaling arrives as per-frequency divisors in rope_freqs.weight.
    let scaling = match g.tensors.iter().find(|t| t.name == "rope_freqs.weight") {
        Some(info) => {
            let f = g.tensor_f32(&info.name)?;
            if f.len() != head_dim / 2 {
                return Err(bad(format!(
                    "rope_freqs.weight has {} values; head_dim {head_dim} needs {}",
                    f.len(),
                    head_dim / 2
                )));
            }
            Some(RopeScaling::Factors(f))
        }
        None => scaling,
    };
    let global = Rope { theta, scaling };
    if family != Family::Gemma3 {
        return Ok(vec![LayerSpec { window: 0, rope: global }; n]);
    }
    let window = get("attention.sliding_window").and_then(Value::as_u64).unwrap_or(0) as usize;
    let local = Rope::plain(get("rope.freq_base_swa").and_then(Value::as_f64).unwrap_or(10000.0));
    Ok((0..n)
        .map(|i| match i % 6 < 5 && window > 0 {
            true => LayerSpec { window, rope: local.clone() },
            false => LayerSpec { window: 0, rope: global.clone() },
        })
        .collect())
}

/// What a GGUF tensor becomes on the Hugging Face side.
pub(super) enum Mapped {
    /// This Hugging Face tensor.
    Tensor(String),
    /// Read into the config instead (Llama 3's `rope_freqs.weight`).
    Config,
}

/// GGUF tensor name → Hugging Face name, for `family`'s tensors.
pub(super) fn hf_name(family: Family, gguf_name: &str) -> Option<Mapped> {
    if gguf_name == "rope_freqs.weight" && family != Family::Gpt2 {
        return Some(Mapped::Config);
    }
    let (layer, rest) = match gguf_name.strip_prefix("blk.") {
        Some(r) => {
            let (i, rest) = r.split_once('.')?;
            (Some(i.parse::<usize>().ok()?), rest)
        }
        None => (None, gguf_name),
    };
    let (module, param) = rest.rsplit_once('.')?;
    let name = match (family, layer) {
        (Family::Gpt2, None) => match module {
            "token_embd" => "transformer.wte".to_string(),
            "position_embd" => "transformer.wpe".to_string(),
            "output_norm" => "transformer.ln_f".to_string(),
            "output" => "lm_head".to_string(),
            _ => return None,
        },
        (Family::Gpt2, Some(i)) => {
            let m = match module {
                "attn_norm" => "ln_1",
                "attn_qkv" => "attn.c_attn",
                "attn_output" => "attn.c_proj",
                "ffn_norm" => "ln_2",
                "ffn_up" => "mlp.c_fc",
                "ffn_down" => "mlp.c_proj",
                _ => return None,
            };
            format!("transformer.h.{i}.{m}")
        }
        (_, None) => match module {
            "token_embd" => "model.embed_tokens".to_string(),
            "output_norm" => "model.norm".to_string(),
            "output" => "lm_head".to_string(),
            _ => return None,
        },
        (_, Some(i)) => {
            let gemma = family == Family::Gemma3;
            let m = match module {
                "attn_norm" => "input_layernorm",
                "attn_q" => "self_attn.q_proj",
                "attn_k" => "self_attn.k_proj",
                "attn_v" => "self_attn.v_proj",
                "attn_output" => "self_attn.o_proj",
                "attn_q_norm" => "self_attn.q_norm",
                "attn_k_norm" => "self_attn.k_norm",
                "ffn_norm" if gemma => "pre_feedforward_layernorm",
                "ffn_norm" => "post_attention_layernorm",
                "post_attention_norm" if gemma => "post_attention_layernorm",
                "post_ffw_norm" if gemma => "post_feedforward_layernorm",
                "ffn_gate" => "mlp.gate_proj",
                "ffn_up" => "mlp.up_proj",
                "ffn_down" => "mlp.down_proj",
                _ => return None,
            };
            format!("model.layers.{i}.{m}")
        }
    };
    Some(Mapped::Tensor(format!("{name}.{param}")))
}

/// Whether llama.cpp's converter permuted this family's q/k rows for interleaved rotary pairs
/// (HF LLaMA and Mistral checkpoints converted as `llama`; qwen and gemma use NEOX rotary).
pub(super) fn permuted(family: Family) -> bool {
    matches!(family, Family::Llama | Family::Mistral)
}

/// Whether the converter stored this tensor's values as `1 + w` (Gemma's norms).
pub(super) fn plus_one(family: Family, hf_name: &str) -> bool {
    family == Family::Gemma3 && hf_name.ends_with("norm.weight")
}
