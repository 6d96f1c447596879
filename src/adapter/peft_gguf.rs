//! GGUF LoRA adapters (llama.cpp's format, as `portalora export` and llama.cpp's
//! `convert_lora_to_gguf.py` write them) read as a [`PeftFile`], so that one is accepted wherever
//! an adapter folder is (`eval`, `generate`, `train --init-adapter`, the page). Pairs become PEFT's
//! `lora_A` / `lora_B` under transformers' module names; the rows of LLaMA's q/k B factors, which
//! the file holds in llama.cpp's rotary order, are put back in transformers' order once the model
//! (its head counts) is known: [`PeftFile::tensors_for`].

use std::borrow::Cow;
use std::collections::BTreeMap;

use serde_json::json;

use super::peft::PeftFile;
use super::{AdapterError, Result};
use crate::io::gguf::Gguf;
use crate::model::gguf_export::{permuted_heads, read_gguf_lora};
use crate::model::weights::{unpermute_rotary, HostTensor};
use crate::model::ModelConfig;

impl PeftFile {
    /// A GGUF LoRA adapter file.
    pub fn from_gguf(g: &Gguf) -> Result<PeftFile> {
        let lora = read_gguf_lora(g).map_err(|e| AdapterError::GgufLora(Box::new(e)))?;
        let rank = lora.pairs[0].1.shape[0];
        // Without an alpha llama.cpp scales every pair by 1: alpha = r, pair by pair.
        let alpha = lora.alpha.unwrap_or(rank as f64);
        let mut tensors = BTreeMap::new();
        let (mut targets, mut layers, mut rank_pattern, mut alpha_pattern) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for (module, a, b) in lora.pairs {
            // The last two parts name the projection unambiguously (GPT-2 has two c_proj).
            let parts: Vec<&str> = module.rsplitn(3, '.').collect();
            let target = format!("{}.{}", parts[1], parts[0]);
            if !targets.contains(&target) {
                targets.push(target);
            }
            if let Some(l) = module.split('.').find_map(|p| p.parse::<usize>().ok()) {
                layers.push(l);
            }
            if a.shape[0] != rank {
                rank_pattern.push((regex::escape(&module), a.shape[0]));
                if lora.alpha.is_none() {
                    alpha_pattern.push((regex::escape(&module), a.shape[0] as f64));
                }
            }
            tensors.insert(format!("base_model.model.{module}.lora_A.weight"), a);
            tensors.insert(format!("base_model.model.{module}.lora_B.weight"), b);
        }
        layers.sort_unstable();
        layers.dedup();
        let config = json!({
            "peft_type": "LORA", "r": rank, "lora_alpha": alpha, "target_modules": targets,
            "layers_to_transform": layers, "rank_pattern": rank_pattern.iter().cloned().collect::<BTreeMap<_, _>>(),
            "alpha_pattern": alpha_pattern.iter().cloned().collect::<BTreeMap<_, _>>(),
        });
        Ok(PeftFile {
            dir: g.path.clone(),
            config,
            peft_type: "LORA".into(),
            rank,
            alpha: Some(alpha),
            rslora: false,
            targets,
            target_regex: None,
            rank_pattern,
            alpha_pattern,
            layers: Some(layers),
            dropout: 0.0,
            // llama.cpp has no DoRA adapters.
            use_dora: false,
            tensors,
            rotary: lora.rotary,
        })
    }

    /// The tensors in transformers' layout for `model`: the B rows a GGUF file holds in llama.cpp's
    /// rotary order put back (a no-op for adapter folders).
    pub fn tensors_for(&self, model: &ModelConfig) -> Cow<'_, BTreeMap<String, HostTensor>> {
        if self.rotary.is_empty() {
            return Cow::Borrowed(&self.tensors);
        }
        let mut t = self.tensors.clone();
        for module in &self.rotary {
            let (key, hf) = (format!("base_model.model.{module}.lora_B.weight"), format!("{module}.weight"));
            if let (Some(b), Some(heads)) = (t.get_mut(&key), permuted_heads(model, &hf)) {
                if b.shape[0] % heads == 0 {
                    b.data = unpermute_rotary(&b.data, b.shape[0], b.shape[1], heads);
                }
            }
        }
        Cow::Owned(t)
    }
}
