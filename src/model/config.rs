//! Model hyperparameters, read from `config.json` or from GGUF metadata.

use std::path::Path;

use super::arch::{Block, Family, LayerSpec, Rope};
use super::weights::ModelError;
use crate::io::gguf::Gguf;
use crate::ops::attention::AttentionShape;
use crate::ops::rope::RopeShape;

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
    /// The tensor naming and layout scheme (Hugging Face's LLaMA-style names, or GPT-2's).
    pub arch: Arch,
    pub family: Family,
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
    /// The global (full-attention) layers' rotary base, for exported configs; each layer's own
    /// rotary embedding is in `layers`.
    pub rope_theta: f64,
    /// The LM head reuses the token embedding.
    pub tie_embeddings: bool,
    /// What one decoder block computes (norms, biases, activation, positions, layouts).
    pub block: Block,
    /// Per layer: its attention window and rotary embedding.
    pub layers: Vec<LayerSpec>,
}

impl ModelConfig {
    /// Refuses a sequence of `seq` positions beyond the model's context.
    pub fn check_seq(&self, seq: usize) -> Result<(), String> {
        match seq > self.max_positions {
            true => {
                Err(format!("sequence length {seq} exceeds the model's context of {} positions", self.max_positions))
            }
            false => Ok(()),
        }
    }

    /// The longest sequence [`ModelConfig::check_seq`] accepts.
    pub fn usable_positions(&self) -> usize {
        self.max_positions
    }

    /// A configuration of `arch`'s own block with plain rotary embeddings (base 10000) and no
    /// windows in every layer: for tests and programs that build models by hand.
    #[allow(clippy::too_many_arguments)]
    pub fn simple(
        arch: Arch,
        vocab_size: usize,
        hidden_size: usize,
        num_layers: usize,
        num_heads: usize,
        num_kv_heads: usize,
        intermediate_size: usize,
        max_positions: usize,
    ) -> ModelConfig {
        let (family, block) = match arch {
            Arch::Llama => (Family::Llama, Block::LLAMA),
            Arch::Gpt2 => (Family::Gpt2, Block::GPT2),
        };
        ModelConfig {
            arch,
            family,
            vocab_size,
            hidden_size,
            num_layers,
            num_heads,
            num_kv_heads,
            head_dim: hidden_size / num_heads,
            intermediate_size,
            max_positions,
            norm_eps: 1e-5,
            rope_theta: 10_000.0,
            tie_embeddings: arch == Arch::Gpt2,
            block,
            layers: vec![LayerSpec { window: 0, rope: Rope::plain(10_000.0) }; num_layers],
        }
    }

    /// Reads `config.json` of a Hugging Face folder.
    pub fn from_hf_json(path: &Path) -> Result<Self, ModelError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ModelError::Io { path: path.to_path_buf(), source })?;
        Self::from_hf_str(path, &text)
    }

    /// Parses the text of a `config.json`; `path` names it in messages.
    pub fn from_hf_str(path: &Path, text: &str) -> Result<Self, ModelError> {
        let cfg = super::hf_config::parse(path, text)?;
        cfg.validate().map_err(|message| ModelError::Config { path: path.to_path_buf(), message })?;
        Ok(cfg)
    }

    /// Reads the metadata of a GGUF file (llama, qwen2, qwen3, gemma3, gpt2).
    pub fn from_gguf(g: &Gguf) -> Result<Self, ModelError> {
        super::gguf_model::config(g)
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
        if self.layers.len() != self.num_layers {
            return Err(format!("{} layer descriptions for {} layers", self.layers.len(), self.num_layers));
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

    /// Layer `l`'s attention call for `batch` rows of `seq` new positions after `q_offset`
    /// cached ones.
    pub fn attention_shape(&self, l: usize, batch: usize, seq: usize, q_offset: usize) -> AttentionShape {
        AttentionShape {
            q_offset,
            window: self.layers[l].window,
            scale: self.block.attn_scale.map_or(1.0 / (self.head_dim as f32).sqrt(), |s| s as f32),
            ..AttentionShape::new(batch, seq, self.num_heads, self.num_kv_heads, self.head_dim)
        }
    }

    /// The rotary calls for queries and keys of `seq` positions starting at `pos_offset`.
    pub fn rope_shapes(&self, seq: usize, pos_offset: usize) -> (RopeShape, RopeShape) {
        let q = RopeShape { seq, heads: self.num_heads, head_dim: self.head_dim, pos_offset };
        (q, RopeShape { heads: self.num_kv_heads, ..q })
    }

    /// Parameter count of the base model (a tied head counted once): every tensor it has.
    pub fn num_parameters(&self) -> usize {
        super::weights::expected_tensors(self).iter().map(|(_, shape)| shape.iter().product::<usize>()).sum()
    }
}
