//! Training an adapter: optimizer state on the GPU, parameter groups, learning-rate schedules,
//! global gradient-norm clipping, and the whole step (forward, loss, backward, clipping,
//! optimizer, after-step hooks) replayed from recorded dispatches in one submission.
//!
//! Per-step values (learning rate after the schedule, bias corrections, the dropout seed) live in
//! small tensors the host rewrites before each submission; nothing in the step waits for the CPU.
//! Only the loss and the clipping values are read back.
//!
//! This file holds the trainer's types; the settings are in `config`, building a trainer in
//! `build`, running steps in `step`, evaluation in `eval`, checkpoints and adapter folders in `state`.

use crate::adapter::{Adapter, AdapterConfig, AdapterError};
use crate::gpu::{Step, Tensor};
use crate::model::gpu::{GpuModel, GpuModelError};

mod build;
mod config;
mod eval;
#[cfg(not(target_arch = "wasm32"))]
mod state;
mod step;

pub use config::{OptimizerKind, Schedule, TrainConfig};
#[cfg(not(target_arch = "wasm32"))]
pub use state::{adapter_from, model_with_adapter};

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Model(#[from] GpuModelError),
    #[error(transparent)]
    Adapter(#[from] AdapterError),
    #[error(transparent)]
    Gpu(#[from] crate::gpu::GpuError),
    #[error("{0}")]
    Config(String),
}

pub type Result<T> = std::result::Result<T, TrainError>;

/// One optimizer group: its learning-rate multiplier and step values.
struct Group {
    lr_mult: f64,
    hyper: Tensor, // (Hyper::FLOATS,): the group's ops::optim::Hyper
}

/// A trainable tensor with its optimizer buffers.
pub struct ParamState {
    pub name: String,
    pub value: Tensor,
    pub grad: Tensor,
    /// The sum of the micro-batches' gradients (gradient accumulation only).
    pub acc: Option<Tensor>,
    pub m: Tensor,         // first moment / momentum buffer
    pub v: Option<Tensor>, // second moment (AdamW)
    group: usize,
}

/// A model with an adapter attached, its optimizer and its recorded step.
pub struct Trainer {
    pub model: GpuModel,
    pub adapter_config: AdapterConfig,
    pub config: TrainConfig,
    pub params: Vec<ParamState>,
    groups: Vec<Group>,
    pub clip: Tensor, // (3,) [scale, norm, first non-finite partial sum or −1]
    update: Step,     // clipping, before-update hooks, optimizer
    acc_first: Step,  // acc = grad (gradient accumulation)
    acc_add: Step,    // acc += grad
    /// (R, K + 3) per step in flight: each micro-batch's loss sum, copied into (r, i) by
    /// `loss_copy[r·K + i]`, then the step's `clip` (scale, gradient norm, first non-finite
    /// gradient partial or -1) copied by `clip_copy[r]`; up to R = `loss_every` steps in flight,
    /// read back once per R steps, so the CPU never waits for the GPU inside that window.
    losses: Tensor,
    loss_copy: Vec<Step>,
    clip_copy: Vec<Step>,
    /// Steps submitted whose losses are not read yet: (step, predicted positions, tokens).
    pending: Vec<(u64, usize, usize)>,
    after: Option<Step>, // Delta-LoRA's W0 update
    /// Steps completed.
    pub step: u64,
    /// transformers' AdamW form (PEFT's LoRA-FA optimizer).
    hf_adamw: bool,
}

/// One micro-batch: B rows of T tokens and, optionally, which tokens are predicted.
#[derive(Clone, Copy)]
pub struct Batch<'a> {
    pub ids: &'a [Vec<u32>],
    pub predict: Option<&'a [Vec<bool>]>,
    /// Each token's position in its document, when documents are packed into the rows (see
    /// [`crate::model::gpu::GpuModel::write_batch_docs`]); `None`: one document per row.
    pub positions: Option<&'a [Vec<u32>]>,
}

/// Statistics of one step.
#[derive(Clone, Copy, Debug)]
pub struct StepStats {
    pub step: u64,
    /// The mean next-token loss of the step's forward pass (before its update).
    pub loss: f64,
    pub lr: f64,
    /// Tokens the step read (all micro-batches).
    pub tokens: usize,
    /// The global L2 norm of the step's gradients (before clipping).
    pub grad_norm: f64,
    /// The first trainable tensor (index into [`Trainer::params`]) whose gradient had a NaN or
    /// Inf, found on the GPU by the clipping pass and read back with the loss.
    pub nonfinite_grad: Option<usize>,
}

impl Trainer {
    pub fn adapter(&self) -> &dyn Adapter {
        self.model.adapter().expect("a trainer always has an adapter")
    }

    /// Bytes of activations kept from forward to backward: the model's and the adapter's.
    pub fn kept_bytes(&self) -> u64 {
        self.model.acts.kept_bytes + self.adapter().kept_bytes()
    }

    /// Trainable parameter count.
    pub fn trainable_parameters(&self) -> usize {
        self.params.iter().map(|p| p.value.numel()).sum()
    }
}
