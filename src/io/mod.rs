//! Files in and out: GGUF model files (more formats follow: safetensors, PEFT adapters).

pub mod gguf;
pub mod half;
pub mod quants;
pub mod spm;
pub mod tokenizer;
