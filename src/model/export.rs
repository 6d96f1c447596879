//! Writing models back out as Hugging Face folders: the weights an adapter was merged into (or
//! that Delta-LoRA moved) read back from the GPU, under the base's key names and layouts.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::{json, Value};

use super::config::{Arch, ModelConfig};
use super::gpu::{GpuModel, GpuModelError};
use super::weights::{HostTensor, Weights};
use crate::adapter::peft::{safetensors_bytes, write_atomic};
use crate::adapter::{AdapterError, Proj};
use crate::gpu::Context;

/// Copies the weights of every projection the attached adapter touches from the GPU into `w`
/// (GPT-2's q, k and v thirds joined back into `c_attn`'s `(C, 3C)`).
pub fn read_back_site_weights(ctx: &Context, model: &GpuModel, w: &mut Weights) -> Result<(), GpuModelError> {
    let Some(adapter) = model.adapter() else { return Ok(()) };
    for (site, sw) in adapter.sites().iter().zip(model.site_weights()?) {
        let name = format!("{}.weight", site.module);
        let parts: Vec<Vec<f32>> = sw.parts.iter().map(|p| ctx.read_f32(p)).collect::<Result<_, _>>()?;
        let data = if site.proj == Proj::CAttn {
            // Conv1D (in, out): row i of the fused weight is [q row i | k row i | v row i].
            let rows = site.in_features;
            let mut out = Vec::with_capacity(rows * site.out_features());
            for i in 0..rows {
                for (p, &o) in parts.iter().zip(&site.outs) {
                    out.extend_from_slice(&p[i * o..(i + 1) * o]);
                }
            }
            out
        } else {
            parts.concat()
        };
        let t = w.tensors.get_mut(&name).ok_or_else(|| {
            GpuModelError::Unsupported(format!("the base model has no tensor {name:?} to write back"))
        })?;
        if t.data.len() != data.len() {
            return Err(GpuModelError::Unsupported(format!(
                "{name}: {} values read back, {} expected",
                data.len(),
                t.data.len()
            )));
        }
        t.data = data;
    }
    Ok(())
}

/// transformers' `config.json` for a config (used when the base came from a GGUF file).
pub fn hf_config_json(c: &ModelConfig) -> Value {
    match c.arch {
        Arch::Llama => json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": c.vocab_size,
            "hidden_size": c.hidden_size,
            "intermediate_size": c.intermediate_size,
            "num_hidden_layers": c.num_layers,
            "num_attention_heads": c.num_heads,
            "num_key_value_heads": c.num_kv_heads,
            "head_dim": c.head_dim,
            "max_position_embeddings": c.max_positions,
            "rms_norm_eps": c.norm_eps,
            "rope_theta": c.rope_theta,
            "hidden_act": "silu",
            "attention_bias": false,
            "mlp_bias": false,
            "tie_word_embeddings": c.tie_embeddings,
            "torch_dtype": "float32",
        }),
        Arch::Gpt2 => json!({
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
        }),
    }
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
/// base; a tied head stays tied) and `config.json` (the base's own when it was a folder), plus
/// the base folder's tokenizer files, or `tokenizer.json` built from a GGUF's vocabulary.
/// Every file goes through a temporary name and a rename.
pub fn write_hf_folder(w: &Weights, dir: &Path) -> Result<(), AdapterError> {
    let io = |p: &Path| {
        let p = p.display().to_string();
        move |source| AdapterError::Io { path: p.clone(), source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let tensors: BTreeMap<String, HostTensor> = w.tensors.clone();
    write_atomic(&dir.join("model.safetensors"), &safetensors_bytes(&tensors)?)?;
    if w.source.is_dir() {
        for name in std::iter::once("config.json").chain(SIDE_FILES.iter().copied()) {
            let src = w.source.join(name);
            if src.exists() {
                let bytes = std::fs::read(&src).map_err(io(&src))?;
                write_atomic(&dir.join(name), &bytes)?;
            }
        }
    } else {
        let cfg = serde_json::to_string_pretty(&hf_config_json(&w.config))
            .map_err(|e| AdapterError::Option(e.to_string()))?;
        write_atomic(&dir.join("config.json"), cfg.as_bytes())?;
        if let Ok(tok) = crate::io::tokenizer::Tokenizer::for_model(&w.source) {
            if let Ok(text) = tok.to_json() {
                write_atomic(&dir.join("tokenizer.json"), text.as_bytes())?;
            }
        }
    }
    Ok(())
}
