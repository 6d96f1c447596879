//! Transformer models: configuration, weights in PyTorch layout, and loading from GGUF files and
//! Hugging Face folders.

pub mod config;
pub mod weights;

pub use config::{Arch, ModelConfig};
pub use weights::{load_model, HostTensor, ModelError, Weights};
