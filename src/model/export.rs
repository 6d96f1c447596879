//! Writing models back out as Hugging Face folders: the weights an adapter was merged into (or
//! that Delta-LoRA moved) read back from the GPU, under the base's key names and layouts.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::{json, Value};

use super::arch::{Family, LayerSpec, RopeScaling};
use super::config::{Arch, ModelConfig};
use super::gpu::{GpuModel, GpuModelError};
use super::weights::{HostTensor, ModelError, Weights};
use crate::adapter::peft::{safetensors_bytes, write_atomic};
use crate::adapter::AdapterError;
use crate::gpu::Context;

/// Copies the weights of every projection the attached adapter touches from the GPU into `w`
/// (see [`GpuModel::read_site_weights_async`]).
pub fn read_back_site_weights(ctx: &Context, model: &GpuModel, w: &mut Weights) -> Result<(), GpuModelError> {
    for (name, t) in crate::gpu::block_on(model.read_site_weights_async(ctx))? {
        let have = w.tensors.get_mut(&name).ok_or_else(|| {
            GpuModelError::Unsupported(format!("the base model has no tensor {name:?} to write back"))
        })?;
        if have.data.len() != t.data.len() {
            return Err(GpuModelError::Unsupported(format!(
                "{name}: {} values read back, {} expected",
                t.data.len(),
                have.data.len()
            )));
        }
        have.data = t.data;
    }
    Ok(())
}

/// transformers' `config.json` for a config (used when the base came from a GGUF file), in the
/// transformers 4 layout that transformers 5 also reads. A setting transformers' class for the
/// family cannot express is an error naming it, never a config that computes something else.
pub fn hf_config_json(c: &ModelConfig) -> Result<Value, ModelError> {
    let undescribable = |message: String| ModelError::Undescribable { message };
    if c.arch == Arch::Gpt2 {
        return Ok(json!({
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "vocab_size": c.vocab_size,
            "n_embd": c.hidden_size,
            "n_layer": c.num_layers,
            "n_head": c.num_heads,
            "n_inner": c.intermediate_size,
            "n_positions": c.max_positions,
            "layer_norm_epsilon": c.norm_eps,
            "activation_function": "gelu_new",
            "tie_word_embeddings": c.tie_embeddings,
            "torch_dtype": "float32",
        }));
    }
    let (class, model_type) = match c.family {
        Family::Llama => ("LlamaForCausalLM", "llama"),
        Family::Mistral => ("MistralForCausalLM", "mistral"),
        Family::Qwen2 => ("Qwen2ForCausalLM", "qwen2"),
        Family::Qwen3 => ("Qwen3ForCausalLM", "qwen3"),
        Family::Gemma3 => ("Gemma3ForCausalLM", "gemma3_text"),
        Family::Gpt2 => unreachable!("GPT-2 has the Gpt2 layout"),
    };
    let mut v = json!({
        "architectures": [class],
        "model_type": model_type,
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads,
        "head_dim": c.head_dim,
        "max_position_embeddings": c.max_positions,
        "rms_norm_eps": c.norm_eps,
        "tie_word_embeddings": c.tie_embeddings,
        "torch_dtype": "float32",
    });
    let b = &c.block;
    // LLaMA's (and Qwen3's) attention_bias puts biases on q, k, v and o; mlp_bias on the MLP.
    if matches!(c.family, Family::Llama | Family::Qwen3) {
        v["attention_bias"] = json!(b.o_bias || b.qkv_bias);
    }
    if c.family == Family::Llama {
        v["mlp_bias"] = json!(b.mlp_bias);
    }
    if c.family != Family::Gemma3 {
        v["hidden_act"] = json!("silu");
    }
    rope_and_windows(c, &mut v).map_err(undescribable)?;
    if c.family == Family::Gemma3 {
        v["hidden_activation"] = json!("gelu_pytorch_tanh");
        // transformers types query_pre_attn_scalar as an integer.
        let scalar = b.attn_scale.map_or(c.head_dim as f64, |s| (s * s).recip());
        v["query_pre_attn_scalar"] = json!(scalar.round() as u64);
        v["final_logit_softcapping"] = json!(b.final_softcap);
    }
    // What transformers will build from this file must be what runs here.
    let back = super::hf_config::parse(Path::new("config.json"), &v.to_string())?;
    if back.block != *b {
        return Err(undescribable(format!("a {model_type} config.json cannot describe this block ({b:?})")));
    }
    let freqs = |l: &LayerSpec| l.rope.inv_freq(c.head_dim);
    for (i, (x, y)) in back.layers.iter().zip(&c.layers).enumerate() {
        let close = freqs(x).iter().zip(freqs(y)).all(|(p, q)| (p - q).abs() <= 1e-5 * q.abs());
        if x.window != y.window || !close {
            return Err(undescribable(format!(
                "a {model_type} config.json cannot describe layer {i}'s attention ({y:?})"
            )));
        }
    }
    Ok(v)
}

/// The rotary and window fields: the global layers' `rope_theta` and `rope_scaling`, Gemma's
/// `rope_local_base_freq`, and `sliding_window` with the per-layer `layer_types`.
fn rope_and_windows(c: &ModelConfig, v: &mut Value) -> Result<(), String> {
    let global = c.layers.iter().find(|l| l.window == 0).unwrap_or(&c.layers[0]);
    v["rope_theta"] = json!(global.rope.theta);
    if let Some(s) = &global.rope.scaling {
        v["rope_scaling"] = match s {
            RopeScaling::Linear { factor } => json!({"rope_type": "linear", "factor": factor}),
            RopeScaling::Llama3 { .. } => llama3_json(s),
            RopeScaling::Factors(_) => llama3_json(&global.rope.as_llama3(c.head_dim).ok_or(
                "rope_freqs.weight does not follow Llama 3's rope scaling, which is all a config.json can describe",
            )?),
        };
    }
    let window = c.layers.iter().map(|l| l.window).max().unwrap_or(0);
    let sliding = c.layers.iter().filter(|l| l.window > 0);
    if let Some(l) = sliding.clone().find(|l| l.window != window) {
        return Err(format!("layers with different windows ({} and {window}) cannot be described", l.window));
    }
    let local = sliding.clone().next().map(|l| &l.rope);
    match (c.family, local) {
        (Family::Gemma3, Some(r)) if r.scaling.is_none() => v["rope_local_base_freq"] = json!(r.theta),
        (Family::Gemma3, None) => v["rope_local_base_freq"] = json!(global.rope.theta),
        (_, None) => {}
        (_, Some(r)) if *r == global.rope => {}
        _ => return Err("sliding layers with their own rotary embedding are only Gemma 3's".into()),
    }
    if c.family != Family::Gemma3 && c.layers.iter().any(|l| l.rope != global.rope) {
        return Err("layers with different rotary embeddings are only Gemma 3's".into());
    }
    v["sliding_window"] = if window > 0 { json!(window) } else { Value::Null };
    if matches!(c.family, Family::Qwen2 | Family::Qwen3) {
        v["use_sliding_window"] = json!(window > 0);
    }
    let kind = |l: &LayerSpec| if l.window > 0 { "sliding_attention" } else { "full_attention" };
    v["layer_types"] = json!(c.layers.iter().map(kind).collect::<Vec<_>>());
    Ok(())
}

fn llama3_json(s: &RopeScaling) -> Value {
    let RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_positions } = s else {
        unreachable!("called with Llama 3 scaling")
    };
    json!({
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": low_freq_factor,
        "high_freq_factor": high_freq_factor,
        "original_max_position_embeddings": *original_max_positions as u64,
    })
}

/// Files of a Hugging Face folder other than the weights that a merged copy keeps.
const SIDE_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "generation_config.json",
];

/// Writes `w` as a Hugging Face folder `dir`: `model.safetensors` (f32, the same keys as the
/// base; a tied head stays tied) and `config.json` (the base's own when it was a folder of the
/// same model, else written from the config), plus
/// the base folder's tokenizer files, or `tokenizer.json` built from a GGUF's vocabulary.
/// Every file goes through a temporary name and a rename.
pub fn write_hf_folder(w: &Weights, dir: &Path) -> Result<(), AdapterError> {
    let io = |p: &Path| {
        let p = p.display().to_string();
        move |source| AdapterError::Io { path: p.clone(), source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let copy = |src: &Path, to: &Path| -> Result<(), AdapterError> {
        match src.exists() {
            true => write_atomic(to, &std::fs::read(src).map_err(io(src))?),
            false => Ok(()),
        }
    };
    let tensors: BTreeMap<String, HostTensor> = w.tensors.clone();
    write_atomic(&dir.join("model.safetensors"), &safetensors_bytes(&tensors)?)?;
    // The base's own config.json, unless the base was a GGUF file or the text model of a
    // multimodal checkpoint (whose config describes a vision tower the copy does not have).
    if w.source.is_dir() && w.left_out.is_none() {
        copy(&w.source.join("config.json"), &dir.join("config.json"))?;
    } else {
        let cfg = hf_config_json(&w.config).map_err(|source| AdapterError::HfConfig {
            dir: dir.to_path_buf(),
            base: w.source.clone(),
            source: Box::new(source),
        })?;
        let cfg = serde_json::to_string_pretty(&cfg)?;
        write_atomic(&dir.join("config.json"), cfg.as_bytes())?;
    }
    if w.source.is_dir() {
        for name in SIDE_FILES {
            copy(&w.source.join(name), &dir.join(name))?;
        }
    } else if let Ok(tok) = crate::io::tokenizer::Tokenizer::for_model(&w.source) {
        if let Ok(text) = tok.to_json() {
            write_atomic(&dir.join("tokenizer.json"), text.as_bytes())?;
            let config = serde_json::to_string_pretty(&tok.config_json())?;
            write_atomic(&dir.join("tokenizer_config.json"), config.as_bytes())?;
        }
    }
    Ok(())
}
