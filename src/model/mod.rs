//! Transformer models: configuration, weights in PyTorch layout, and loading from GGUF files and
//! Hugging Face folders.

pub mod arch;
pub mod config;
#[cfg(not(target_arch = "wasm32"))]
pub mod export;
pub mod gguf_export;
pub mod gguf_hf;
mod gguf_model;
pub mod gpu;
mod hf_config;
pub mod weights;

pub use config::{Arch, ModelConfig};
pub use gpu::{generate, BaseDType};
pub use hf_config::model_dropout_note;
pub use weights::{load_model, read_config, HostTensor, LeftOut, ModelError, RawTensor, Weights};
