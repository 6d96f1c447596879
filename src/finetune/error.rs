//! [`FinetuneError`], the errors of a run.

use std::path::{Path, PathBuf};

use crate::adapter::AdapterError;
use crate::data::DataError;
use crate::io::tokenizer::TokenizerError;
use crate::outdir::OutDirError;
use crate::run::RunError;
use crate::train::TrainError;

#[derive(Debug, thiserror::Error)]
pub enum FinetuneError {
    #[error(transparent)]
    Train(#[from] TrainError),
    #[error(transparent)]
    Data(#[from] DataError),
    #[error(transparent)]
    Run(#[from] RunError),
    #[error(transparent)]
    Adapter(#[from] AdapterError),
    #[error(transparent)]
    Model(#[from] crate::model::ModelError),
    #[error(transparent)]
    GpuModel(#[from] crate::model::gpu::GpuModelError),
    #[error(transparent)]
    Gpu(#[from] crate::gpu::GpuError),
    #[error(transparent)]
    OutDir(#[from] OutDirError),
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    /// Reading or writing `path` (`what` starts the message: "" or what was being done).
    #[error("{path}: {what}{source}")]
    Io {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// `out/run.json` unreadable: `out` is likely not a run's folder.
    #[error("{path}: {source}; is {out} the --out of an earlier run?")]
    NoRun {
        path: PathBuf,
        out: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A JSON file that does not parse as what it should hold (`what` starts the message).
    #[error("{path}: {what}{source}")]
    Json {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
    /// Writing JSON out.
    #[error(transparent)]
    Serialize(#[from] serde_json::Error),
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error("prompt {prompt:?}: {source}")]
    Prompt {
        prompt: String,
        #[source]
        source: TokenizerError,
    },
    #[error("{0}")]
    Config(String),
    #[error(
        "step {step}: {what} is not finite (NaN or Inf); the run stopped before saving anything from it{kept}. \
         {hint}Lower the learning rate or clip gradients (--max-grad-norm), check the data, then {then}"
    )]
    NonFinite { step: u64, what: String, kept: String, hint: &'static str, then: &'static str },
    /// The tokenizer of a model that must read text (`--data`, or eval's).
    #[error("{source}; or give token ids (--ids FILE.json)")]
    NoTokenizer {
        #[source]
        source: TokenizerError,
    },
}

pub(super) fn file_err(path: &Path, message: impl std::fmt::Display) -> FinetuneError {
    FinetuneError::File { path: path.to_path_buf(), message: message.to_string() }
}

pub(super) fn config_err(message: impl Into<String>) -> FinetuneError {
    FinetuneError::Config(message.into())
}

/// A closure making an I/O error of `path` a [`FinetuneError::Io`].
pub(super) fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> FinetuneError + '_ {
    move |source| FinetuneError::Io { path: path.to_path_buf(), what: "", source }
}
