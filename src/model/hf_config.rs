//! A Hugging Face `config.json` → [`ModelConfig`], for `model_type` llama, mistral, qwen2, qwen3,
//! gemma3_text (and gemma3 with its `text_config`) and gpt2, in both the transformers 4 layout
//! (`rope_theta`, `rope_scaling`, `sliding_window_pattern`) and transformers 5's
//! (`rope_parameters`, `layer_types`). A field that changes what the model computes is used or
//! refused by name, never ignored.

use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

use super::arch::{Act, Block, Family, LayerSpec, Rope, RopeScaling};
use super::config::{Arch, ModelConfig};
use super::weights::ModelError;

/// More layers than any model has.
const MAX_LAYERS: usize = 10_000;

/// The fields we read (LLaMA-style and GPT-2 naming).
#[derive(Deserialize, Default)]
struct Hf {
    model_type: Option<String>,
    text_config: Option<Value>,
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
    tie_word_embeddings: Option<bool>,
    rope_theta: Option<f64>,
    rope_scaling: Option<Value>,
    rope_parameters: Option<Value>,
    rope_local_base_freq: Option<f64>,
    partial_rotary_factor: Option<f64>,
    hidden_act: Option<String>,
    hidden_activation: Option<String>,
    activation_function: Option<String>,
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
    sliding_window: Option<usize>,
    use_sliding_window: Option<bool>,
    max_window_layers: Option<usize>,
    layer_types: Option<Vec<String>>,
    sliding_window_pattern: Option<usize>,
    query_pre_attn_scalar: Option<f64>,
    final_logit_softcapping: Option<f64>,
    attn_logit_softcapping: Option<f64>,
    use_bidirectional_attention: Option<bool>,
    scale_attn_by_inverse_layer_idx: Option<bool>,
    scale_attn_weights: Option<bool>,
}

/// Parses the text of a `config.json`; `path` names it in messages.
pub(super) fn parse(path: &Path, text: &str) -> Result<ModelConfig, ModelError> {
    let bad = |message: String| ModelError::Config { path: path.to_path_buf(), message };
    let json = |what: &'static str| move |source| ModelError::ConfigJson { path: path.to_path_buf(), what, source };
    let mut c: Hf = serde_json::from_str(text).map_err(json(""))?;
    if c.model_type.as_deref() == Some("gemma3") {
        // The multimodal checkpoint: its language model is a gemma3_text one.
        let t = c.text_config.take().ok_or_else(|| bad("model_type \"gemma3\" without a text_config".into()))?;
        let tie = c.tie_word_embeddings;
        c = serde_json::from_value(t).map_err(json("text_config: "))?;
        // The tying is the whole model's setting.
        c.tie_word_embeddings = c.tie_word_embeddings.or(tie);
        c.model_type = Some("gemma3_text".into());
        gemma3_defaults(&mut c);
    }
    let family = match c.model_type.as_deref() {
        Some("llama") => Family::Llama,
        Some("mistral") => Family::Mistral,
        Some("qwen2") => Family::Qwen2,
        Some("qwen3") => Family::Qwen3,
        Some("gemma3_text") => Family::Gemma3,
        Some("gpt2") => Family::Gpt2,
        other => {
            return Err(bad(format!(
                "model_type {other:?} is not supported; portalora runs llama, mistral, qwen2, qwen3, gemma3_text \
                 (and gemma3's text model) and gpt2"
            )))
        }
    };
    let need = |v: Option<usize>, name: &str| v.ok_or_else(|| bad(format!("missing field {name:?}")));
    let hidden_size = need(c.hidden_size.or(c.n_embd), "hidden_size")?;
    let num_heads = need(c.num_attention_heads.or(c.n_head), "num_attention_heads")?;
    let num_layers = need(c.num_hidden_layers.or(c.n_layer), "num_hidden_layers")?;
    // The largest models have a few hundred layers; a count far beyond is a corrupt file (and its
    // per-layer settings would exhaust memory).
    if num_layers > MAX_LAYERS {
        return Err(bad(format!("num_hidden_layers {num_layers} is beyond any model's ({MAX_LAYERS} at most)")));
    }
    let head_dim = c.head_dim.unwrap_or(hidden_size / num_heads.max(1));
    let block = block_of(&c, family).map_err(bad)?;
    let layers = layers_of(&c, family, num_layers, head_dim).map_err(bad)?;
    let gpt2 = family == Family::Gpt2;
    Ok(ModelConfig {
        arch: if gpt2 { Arch::Gpt2 } else { Arch::Llama },
        family,
        vocab_size: need(c.vocab_size, "vocab_size")?,
        hidden_size,
        num_layers,
        num_heads,
        num_kv_heads: c.num_key_value_heads.unwrap_or(num_heads),
        head_dim,
        intermediate_size: if gpt2 {
            c.n_inner.unwrap_or(4 * hidden_size)
        } else {
            need(c.intermediate_size, "intermediate_size")?
        },
        max_positions: need(c.max_position_embeddings.or(c.n_positions), "max_position_embeddings")?,
        norm_eps: if gpt2 { c.layer_norm_epsilon.unwrap_or(1e-5) } else { c.rms_norm_eps.unwrap_or(1e-6) },
        rope_theta: layers.iter().map(|l| l.rope.theta).fold(0.0, f64::max),
        tie_embeddings: c.tie_word_embeddings.unwrap_or(gpt2 || family == Family::Gemma3),
        block,
        layers,
    })
}

/// Gemma3TextConfig's defaults for what a multimodal checkpoint's `text_config` leaves out.
fn gemma3_defaults(c: &mut Hf) {
    c.vocab_size.get_or_insert(262_208);
    c.hidden_size.get_or_insert(2304);
    c.intermediate_size.get_or_insert(9216);
    c.num_hidden_layers.get_or_insert(26);
    c.num_attention_heads.get_or_insert(8);
    c.num_key_value_heads.get_or_insert(4);
    c.head_dim.get_or_insert(256);
    c.max_position_embeddings.get_or_insert(131_072);
    c.query_pre_attn_scalar.get_or_insert(256.0);
    c.sliding_window.get_or_insert(4096);
}

/// The block a family's config describes; settings it does not implement are refused.
fn block_of(c: &Hf, family: Family) -> Result<Block, String> {
    let act = c.hidden_act.as_deref().or(c.hidden_activation.as_deref());
    let want = match family {
        Family::Gpt2 => {
            if c.scale_attn_by_inverse_layer_idx == Some(true) || c.scale_attn_weights == Some(false) {
                return Err("GPT-2 attention scaling other than 1/sqrt(head_dim) (scale_attn_by_inverse_layer_idx, \
                            scale_attn_weights) is not supported"
                    .into());
            }
            let a = c.activation_function.as_deref().unwrap_or("gelu_new");
            if !matches!(a, "gelu_new" | "gelu_pytorch_tanh") {
                return Err(format!(
                    "activation_function {a:?} is not supported for GPT-2; portalora runs \"gelu_new\""
                ));
            }
            return Ok(Block::GPT2);
        }
        Family::Gemma3 => ("gelu_pytorch_tanh", "hidden_activation"),
        _ => ("silu", "hidden_act"),
    };
    if let Some(a) = act.filter(|a| *a != want.0) {
        return Err(format!("{} {a:?} is not supported for this architecture; portalora runs {:?}", want.1, want.0));
    }
    if c.partial_rotary_factor.is_some_and(|f| f != 1.0) {
        return Err(format!(
            "partial_rotary_factor {:?} is not supported (rotary over the whole head only)",
            c.partial_rotary_factor
        ));
    }
    if c.attn_logit_softcapping.is_some() {
        return Err("attn_logit_softcapping is not supported (Gemma 2's attention soft-capping)".into());
    }
    if c.use_bidirectional_attention == Some(true) {
        return Err("use_bidirectional_attention = true (an embedding model) is not supported".into());
    }
    let mut b = match family {
        Family::Qwen2 => Block::QWEN2,
        Family::Qwen3 => Block::QWEN3,
        Family::Gemma3 => Block {
            attn_scale: Some(c.query_pre_attn_scalar.unwrap_or(256.0).powf(-0.5)),
            final_softcap: c.final_logit_softcapping,
            ..Block::GEMMA3
        },
        _ => Block::LLAMA,
    };
    // LLaMA's attention_bias puts biases on q, k, v and o; mlp_bias on gate, up and down.
    if c.attention_bias == Some(true) {
        b.qkv_bias = true;
        b.o_bias = true;
    }
    if c.mlp_bias == Some(true) {
        b.mlp_bias = true;
    }
    debug_assert!(b.act == Act::GeGluTanh || family != Family::Gemma3);
    Ok(b)
}

/// A `rope_scaling` / `rope_parameters` entry → the layer's rotary embedding.
fn rope_of(v: Option<&Value>, theta: Option<f64>) -> Result<Rope, String> {
    let theta = v.and_then(|v| v.get("rope_theta")).and_then(Value::as_f64).or(theta).unwrap_or(10_000.0);
    let Some(v) = v.filter(|v| !v.is_null()) else { return Ok(Rope::plain(theta)) };
    let ty = v.get("rope_type").or_else(|| v.get("type")).and_then(Value::as_str).unwrap_or("default");
    let num = |k: &str| v.get(k).and_then(Value::as_f64).ok_or_else(|| format!("rope scaling {ty:?} needs {k:?}"));
    let scaling = match ty {
        "default" => None,
        "linear" => Some(RopeScaling::Linear { factor: num("factor")? }),
        "llama3" => Some(RopeScaling::Llama3 {
            factor: num("factor")?,
            low_freq_factor: num("low_freq_factor")?,
            high_freq_factor: num("high_freq_factor")?,
            original_max_positions: num("original_max_position_embeddings")?,
        }),
        other => {
            return Err(format!(
                "rope scaling {other:?} is not supported (default, linear and llama3 are); ignoring it would make \
                 every result wrong"
            ))
        }
    };
    Ok(Rope { theta, scaling })
}

/// Each layer's window and rotary embedding.
fn layers_of(c: &Hf, family: Family, n: usize, head_dim: usize) -> Result<Vec<LayerSpec>, String> {
    if !head_dim.is_multiple_of(2) && family != Family::Gpt2 {
        return Err(format!("head_dim {head_dim} must be even for rotary embeddings"));
    }
    // transformers 5 keeps rope settings in rope_parameters (per layer type for Gemma 3);
    // transformers 4 in rope_theta + rope_scaling (+ rope_local_base_freq).
    let params = c.rope_parameters.as_ref().filter(|v| !v.is_null());
    let per_type = params.is_some_and(|p| p.get("full_attention").is_some() || p.get("sliding_attention").is_some());
    // A legacy rope_scaling beside rope_parameters still applies, as transformers merges it in.
    let scaling = c.rope_scaling.as_ref().filter(|v| !v.is_null());
    let global_params = if per_type { params.and_then(|p| p.get("full_attention")) } else { params };
    let theta = global_params.and_then(|p| p.get("rope_theta")).and_then(Value::as_f64).or(c.rope_theta);
    let global = rope_of(scaling.or(global_params), theta)?;
    let local = match (family, params, per_type) {
        (Family::Gemma3, Some(p), true) => rope_of(p.get("sliding_attention"), Some(10_000.0))?,
        (Family::Gemma3, _, _) => Rope::plain(c.rope_local_base_freq.unwrap_or(10_000.0)),
        _ => global.clone(),
    };
    let sliding: Vec<bool> = match (&c.layer_types, family) {
        (Some(t), _) if t.len() == n => t.iter().map(|t| t == "sliding_attention").collect(),
        (Some(t), _) => return Err(format!("layer_types has {} entries for {n} layers", t.len())),
        (None, Family::Gemma3) => {
            let pattern = c.sliding_window_pattern.unwrap_or(6).max(1);
            (0..n).map(|i| (i + 1) % pattern != 0).collect()
        }
        (None, Family::Mistral) => vec![c.sliding_window.is_some(); n],
        (None, Family::Qwen2 | Family::Qwen3) => {
            let on = c.use_sliding_window == Some(true) && c.sliding_window.is_some();
            (0..n).map(|i| on && i >= c.max_window_layers.unwrap_or(28)).collect()
        }
        (None, _) => vec![false; n],
    };
    // Mistral's window applies to every layer without layer_types; Qwen's only where switched on.
    let window = match family {
        Family::Qwen2 | Family::Qwen3 if c.use_sliding_window != Some(true) && c.layer_types.is_none() => 0,
        _ => c.sliding_window.unwrap_or(0),
    };
    sliding
        .into_iter()
        .map(|s| {
            if s && window == 0 {
                return Err("a layer is a sliding_attention layer but sliding_window is not set".to_string());
            }
            Ok(LayerSpec { window: if s { window } else { 0 }, rope: if s { local.clone() } else { global.clone() } })
        })
        .collect()
}

/// Dropout a Hugging Face `config.json` asks of the model itself (GPT-2's `resid_pdrop`,
/// `embd_pdrop`, `attn_pdrop` are 0.1; others' `attention_dropout`, `hidden_dropout`):
/// transformers applies it while training, portalora does not (its `--dropout` is the
/// adapter's). Said, since a run then differs from a transformers run on purpose. `config_json`
/// is the file's text; `None` when all are 0 or absent, or the text is no JSON (the model's load
/// reports that).
pub fn model_dropout_note(config_json: &str) -> Option<String> {
    const KEYS: [&str; 7] = [
        "resid_pdrop",
        "embd_pdrop",
        "attn_pdrop",
        "attention_dropout",
        "hidden_dropout",
        "hidden_dropout_prob",
        "attention_probs_dropout_prob",
    ];
    let v: Value = serde_json::from_str(config_json).ok()?;
    let v = v.get("text_config").filter(|t| t.is_object()).unwrap_or(&v);
    let set: Vec<String> =
        KEYS.iter().filter_map(|k| v.get(*k)?.as_f64().filter(|p| *p > 0.0).map(|p| format!("{k} = {p}"))).collect();
    (!set.is_empty()).then(|| {
        format!(
            "config.json sets {}: transformers applies that dropout to the model while training; portalora \
             does not (--dropout is the adapter's own), so losses differ from a transformers run by that",
            set.join(", ")
        )
    })
}

#[cfg(test)]
mod tests {
    use super::model_dropout_note;

    #[test]
    fn model_dropout_is_noted_when_set() {
        let gpt2 = r#"{"model_type": "gpt2", "resid_pdrop": 0.1, "embd_pdrop": 0.1, "attn_pdrop": 0.0}"#;
        let n = model_dropout_note(gpt2).unwrap();
        assert!(n.starts_with("config.json sets resid_pdrop = 0.1, embd_pdrop = 0.1: "), "{n}");
        let gemma = r#"{"model_type": "gemma3", "text_config": {"attention_dropout": 0.25}}"#;
        assert!(model_dropout_note(gemma).unwrap().contains("attention_dropout = 0.25"));
        assert_eq!(model_dropout_note(r#"{"attention_dropout": 0.0}"#), None);
        assert_eq!(model_dropout_note("not json"), None);
    }
}
