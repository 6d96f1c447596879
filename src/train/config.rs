//! The training configuration: the optimizer, its settings and the learning-rate schedules,
//! plain data checked by [`TrainConfig::validate`] before anything touches the GPU.

use super::{Result, TrainError};
use crate::model::gpu::BaseDType;
// Only the docs link to it.
#[cfg(doc)]
use crate::model::gpu::PlanOptions;

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerKind {
    AdamW,
    Sgd,
}

/// Learning-rate schedules, as transformers' `get_*_schedule_with_warmup` (step index from 0).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    Constant,
    Linear,
    Cosine,
}

impl std::str::FromStr for Schedule {
    type Err = TrainError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "constant" => Ok(Schedule::Constant),
            "linear" => Ok(Schedule::Linear),
            "cosine" => Ok(Schedule::Cosine),
            _ => Err(TrainError::Config(format!("unknown schedule {s:?}; use constant, linear or cosine"))),
        }
    }
}

impl Schedule {
    /// The name the command line, the page and TOML use.
    pub fn name(self) -> &'static str {
        match self {
            Schedule::Constant => "constant",
            Schedule::Linear => "linear",
            Schedule::Cosine => "cosine",
        }
    }

    /// The learning-rate multiplier at step index `i` (0 for the first step) of `total`.
    pub fn multiplier(self, i: u64, warmup: u64, total: u64) -> f64 {
        if i < warmup {
            return i as f64 / warmup.max(1) as f64;
        }
        let rest = total.saturating_sub(warmup).max(1) as f64;
        let progress = (i - warmup) as f64 / rest;
        match self {
            Schedule::Constant => 1.0,
            Schedule::Linear => (total.saturating_sub(i) as f64 / rest).max(0.0),
            Schedule::Cosine => (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0),
        }
    }
}

/// The optimizer's settings.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TrainConfig {
    pub optimizer: OptimizerKind,
    pub lr: f64,
    pub betas: (f64, f64),
    pub eps: f64,
    pub weight_decay: f64,
    /// SGD's momentum.
    pub momentum: f64,
    /// Global gradient-norm clipping (0 disables it).
    pub max_grad_norm: f64,
    pub schedule: Schedule,
    pub warmup_steps: u64,
    /// The run's length in optimizer steps, which the linear and cosine schedules decay over.
    /// `None` (the default) in a [`crate::finetune::RunConfig`] or the page: the run's own
    /// length (`--steps`, or what `--epochs` makes of the data) fills it in, and a value that
    /// disagrees with it is refused ([`crate::run::fit_length`]). A [`crate::train::Trainer`]
    /// used alone needs it for those schedules. (Run folders of earlier versions wrote 0 for
    /// "not yet known": read as `None`.)
    #[serde(default, deserialize_with = "zero_is_none")]
    pub total_steps: Option<u64>,
    /// LoRA+'s lr_B / lr_A.
    pub lr_ratio: f64,
    /// Micro-batches whose gradients are summed into one optimizer step.
    pub grad_accum: usize,
    /// How the frozen base is stored on the GPU (a GGUF's quantized tensors stay quantized by
    /// default; Delta-LoRA, which writes into the base, always uses f32).
    #[serde(default)]
    pub base_dtype: BaseDType,
    /// Steps between loss read-backs: the only CPU–GPU sync of training (1: every step).
    #[serde(default = "one")]
    pub loss_every: usize,
    /// Recompute the MLP's up-projections in the backward pass instead of keeping them
    /// (activation checkpointing; see [`PlanOptions::recompute_mlp`]).
    #[serde(default)]
    pub recompute_mlp: bool,
    /// LoRA+'s parameter groups (B and the 1-D parameters at `lr × lr_ratio`) for a method
    /// other than LoRA+ itself: DoRA given `--lr-ratio` (PEFT's `create_loraplus_optimizer` on a
    /// DoRA model puts its magnitudes with B).
    #[serde(default)]
    pub lora_plus: bool,
    /// Keep activations as f16 between the forward and the backward pass (`--activations f16`;
    /// see [`PlanOptions::activations_f16`]).
    #[serde(default)]
    pub activations_f16: bool,
    /// Rows of logits computed at a time (see [`PlanOptions::logit_chunk_rows`]; benchmarks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logit_chunk_rows: Option<usize>,
}

fn one() -> usize {
    1
}

fn zero_is_none<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Option<u64>, D::Error> {
    let v: Option<u64> = serde::Deserialize::deserialize(d)?;
    Ok(v.filter(|&n| n > 0))
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            optimizer: OptimizerKind::AdamW,
            lr: crate::run::DEFAULTS.lr,
            betas: (0.9, 0.999),
            eps: 1e-8,
            weight_decay: 0.0,
            momentum: 0.9,
            max_grad_norm: crate::run::DEFAULTS.max_grad_norm,
            schedule: Schedule::Constant, // crate::run::DEFAULTS.schedule
            warmup_steps: crate::run::DEFAULTS.warmup_steps,
            total_steps: None,
            lr_ratio: crate::run::DEFAULTS.lr_ratio,
            grad_accum: crate::run::DEFAULTS.grad_accum,
            base_dtype: BaseDType::Auto,
            loss_every: 1,
            recompute_mlp: false,
            lora_plus: false,
            activations_f16: false,
            logit_chunk_rows: None,
        }
    }
}

impl TrainConfig {
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(TrainError::Config(m));
        if !self.lr.is_finite() || self.lr < 0.0 {
            return bad(format!("learning rate {} must be a non-negative number", self.lr));
        }
        for (name, b) in [("beta1", self.betas.0), ("beta2", self.betas.1)] {
            if !(0.0..1.0).contains(&b) {
                return bad(format!("{name} {b} must be in [0, 1)"));
            }
        }
        for (name, v) in [
            ("eps", self.eps),
            ("weight decay", self.weight_decay),
            ("momentum", self.momentum),
            ("max grad norm", self.max_grad_norm),
            ("lr ratio", self.lr_ratio),
        ] {
            if !v.is_finite() || v < 0.0 {
                return bad(format!("{name} {v} must be a non-negative number"));
            }
        }
        if self.total_steps == Some(0) {
            return bad("total_steps 0: a run has 1 step or more (or leave it None: the run's length)".into());
        }
        if self.total_steps.is_none() && matches!(self.schedule, Schedule::Linear | Schedule::Cosine) {
            return bad(format!(
                "the {} schedule decays over the run's length, and total_steps is not set: give \
                 TrainConfig::total_steps, or train through finetune::run, which sets it from the run's steps",
                self.schedule.name()
            ));
        }
        if self.grad_accum == 0 {
            return bad("gradient accumulation 0: use 1 or more micro-batches per step".into());
        }
        if !(1..=4096).contains(&self.loss_every) {
            return bad(format!("loss read-back every {} steps: use 1 to 4096", self.loss_every));
        }
        Ok(())
    }
}
