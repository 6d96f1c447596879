//! Files in and out: GGUF model files, tokenizers and their chat templates.

pub mod chat;
pub mod gguf;
pub mod gguf_vocab;
pub mod gguf_write;
pub mod half;
pub mod quants;
pub mod spm;
pub mod tokenizer;
