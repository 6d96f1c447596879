//! Training an adapter: optimizer state on the GPU, parameter groups, learning-rate schedules,
//! global gradient-norm clipping, and the whole step (forward, loss, backward, clipping,
//! optimizer, after-step hooks) replayed from recorded dispatches in one submission.
//!
//! Per-step values (learning rate after the schedule, bias corrections, the dropout seed) live in
//! small tensors the host rewrites before each submission; nothing in the step waits for the CPU.
//! Only the loss is read back.

use crate::adapter::{self, lora_plus, peft, Adapter, AdapterConfig, AdapterError, Method};
use crate::gpu::{Context, DType, Step, Tensor};
use crate::model::gpu::{BaseDType, GpuModel, GpuModelError, PlanOptions};
#[cfg(not(target_arch = "wasm32"))]
use crate::model::HostTensor;
use crate::model::Weights;
use crate::ops::elementwise::{axpy_forward, copy_forward};
use crate::ops::optim::{adamw_steps, grad_norm_clip, grad_norm_partials, partial_owner, sgd_steps};
#[cfg(not(target_arch = "wasm32"))]
use std::collections::BTreeMap;

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
    /// The run's length (for the schedule).
    pub total_steps: u64,
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
            total_steps: 1,
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
        if self.grad_accum == 0 {
            return bad("gradient accumulation 0: use 1 or more micro-batches per step".into());
        }
        if !(1..=4096).contains(&self.loss_every) {
            return bad(format!("loss read-back every {} steps: use 1 to 4096", self.loss_every));
        }
        Ok(())
    }
}

/// One optimizer group: its learning-rate multiplier, weight decay and step values.
struct Group {
    lr_mult: f64,
    hyper: Tensor, // (8,)
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
    pub clip: Tensor, // (2,) [scale, norm]
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

#[cfg(not(target_arch = "wasm32"))]
fn host(ctx: &Context, t: &Tensor) -> Result<HostTensor> {
    Ok(HostTensor { shape: t.shape().to_vec(), data: ctx.read_f32(t)? })
}

/// The positions of `ids` whose next token is a loss target, as `GpuModel::write_batch` counts them.
fn predicted_positions(ids: &[Vec<u32>], predict: Option<&[Vec<bool>]>) -> usize {
    ids.iter()
        .enumerate()
        .map(|(r, row)| match predict.and_then(|p| p.get(r)) {
            None => row.len().saturating_sub(1),
            Some(m) => m.iter().skip(1).filter(|&&p| p).count(),
        })
        .sum()
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
    /// Uploads the model, plans it for (batch, seq), builds the adapter (random init, or the
    /// tensors of `init` when given), and records the training step.
    pub fn new(
        ctx: &Context,
        weights: &Weights,
        batch: usize,
        seq: usize,
        adapter_config: &AdapterConfig,
        config: &TrainConfig,
        init: Option<&peft::PeftFile>,
    ) -> Result<Self> {
        config.validate()?;
        adapter_config.validate()?;
        let sites = match init {
            Some(f) => f.fits(&weights.source, adapter_config.sites(&weights.config))?,
            None => adapter_config.sites(&weights.config)?,
        };
        // Delta-LoRA adds ΔW into W0 after every step: the base must be f32.
        let base_dtype = match (adapter_config.method, config.base_dtype) {
            (Method::DeltaLora, BaseDType::Auto | BaseDType::F32) => BaseDType::F32,
            (Method::DeltaLora, other) => {
                return Err(TrainError::Config(format!(
                    "delta-lora updates the base weights, which --base-dtype {other} would keep quantized; \
                     use --base-dtype f32 (or auto)"
                )))
            }
            (_, d) => d,
        };
        let plan = PlanOptions {
            base_dtype: Some(base_dtype),
            backward: true,
            recompute_mlp: config.recompute_mlp,
            activations_f16: config.activations_f16,
            logit_chunk_rows: config.logit_chunk_rows,
            ..PlanOptions::default()
        };
        let mut model = GpuModel::with_options(ctx, weights, batch, seq, plan)?;
        let mut adapter = adapter::build(ctx, adapter_config, sites, batch * seq)?;
        if let Some(f) = init {
            f.fits(&weights.source, f.load_into(ctx, adapter.as_mut(), &weights.config))?;
        }
        // Attached first, so that the training step is recorded once, with the adapter.
        model.attach(ctx, adapter)?;
        model.enable_backward(ctx)?;
        Self::with_model(ctx, model, adapter_config, config)
    }

    /// Builds the optimizer for a model that already has its adapter attached and backward enabled.
    pub fn with_model(
        ctx: &Context,
        model: GpuModel,
        adapter_config: &AdapterConfig,
        config: &TrainConfig,
    ) -> Result<Self> {
        let adapter = model.adapter().ok_or_else(|| TrainError::Config("the model has no adapter to train".into()))?;
        let method = adapter_config.method;
        let hf_adamw = method == Method::LoraFa && adapter_config.lorafa_projected;
        let mut groups: Vec<Group> = Vec::new();
        let mut params = Vec::new();
        let optimizer_kind = ctx.alloc_kind("optimizer");
        for p in adapter.params() {
            let lr_mult = match method == Method::LoraPlus || config.lora_plus {
                true => lora_plus::lr_multiplier(p.kind, config.lr_ratio),
                false => 1.0,
            };
            let group = match groups.iter().position(|g| g.lr_mult == lr_mult) {
                Some(i) => i,
                None => {
                    groups.push(Group { lr_mult, hyper: ctx.tensor("hyper", &[8], DType::F32)? });
                    groups.len() - 1
                }
            };
            let zero = |label: &str| -> Result<Tensor> {
                let t = ctx.tensor(label, p.value.shape(), DType::F32)?;
                ctx.fill_f32(&t, 0.0)?;
                Ok(t)
            };
            params.push(ParamState {
                name: p.name.clone(),
                value: p.value.clone(),
                grad: p.grad.clone(),
                acc: if config.grad_accum > 1 { Some(zero("grad_acc")?) } else { None },
                m: zero("adam_m")?,
                v: if config.optimizer == OptimizerKind::AdamW { Some(zero("adam_v")?) } else { None },
                group,
            });
        }
        if params.is_empty() {
            return Err(TrainError::Config("the adapter has no trainable parameters".into()));
        }
        drop(optimizer_kind);
        let clip = ctx.tensor("clip", &[3], DType::F32)?;
        // With accumulation the optimizer reads the summed gradients.
        let grads: Vec<&Tensor> = params.iter().map(|p| p.acc.as_ref().unwrap_or(&p.grad)).collect();
        let (mut acc_first, mut acc_add) = (Step::new(), Step::new());
        for p in &params {
            if let Some(acc) = &p.acc {
                copy_forward(ctx, &mut acc_first, &p.grad, acc, 0)?;
                axpy_forward(ctx, &mut acc_add, 1.0, &p.grad, acc)?;
            }
        }
        let partials = ctx.tensor("grad_norm_partials", &[grad_norm_partials(&grads)], DType::F32)?;
        let mut update = Step::new();
        grad_norm_clip(ctx, &mut update, &grads, &partials, config.max_grad_norm as f32, &clip)?;
        adapter.before_update(ctx, &mut update)?;
        // One group's tensors share their step values: as few dispatches as the bindings allow.
        for (g, group) in groups.iter().enumerate() {
            let mine = || params.iter().zip(&grads).filter(move |(p, _)| p.group == g);
            if config.optimizer == OptimizerKind::AdamW {
                let t: Vec<_> = mine().filter_map(|(p, gr)| Some((*gr, &p.value, &p.m, p.v.as_ref()?))).collect();
                adamw_steps(ctx, &mut update, &group.hyper, &clip, &t)?;
            } else {
                let t: Vec<_> = mine().map(|(p, gr)| (*gr, &p.value, &p.m)).collect();
                sgd_steps(ctx, &mut update, &group.hyper, &clip, &t)?;
            }
        }
        let mut after = Step::new();
        let has_after = adapter.after_update(ctx, &mut after, &model.site_weights()?)?;
        let k = config.grad_accum.max(1);
        let ring = config.loss_every.max(1);
        let losses = ctx.tensor("micro_losses", &[ring, k + 3], DType::F32)?;
        let mut loss_copy = Vec::with_capacity(ring * k);
        let mut clip_copy = Vec::with_capacity(ring);
        for r in 0..ring {
            for i in 0..k {
                let mut s = Step::new();
                copy_forward(ctx, &mut s, &model.acts.loss_sum, &losses, r * (k + 3) + i)?;
                loss_copy.push(s);
            }
            let mut s = Step::new();
            copy_forward(ctx, &mut s, &clip, &losses, r * (k + 3) + k)?;
            clip_copy.push(s);
        }
        Ok(Trainer {
            model,
            adapter_config: adapter_config.clone(),
            config: config.clone(),
            params,
            groups,
            clip,
            update,
            after: if has_after { Some(after) } else { None },
            acc_first,
            acc_add,
            losses,
            loss_copy,
            clip_copy,
            pending: Vec::new(),
            step: 0,
            hf_adamw,
        })
    }

    pub fn adapter(&self) -> &dyn Adapter {
        self.model.adapter().expect("a trainer always has an adapter")
    }

    /// The learning rate of step `t` (1-based) before group multipliers.
    pub fn lr_at(&self, t: u64) -> f64 {
        let c = &self.config;
        c.lr * c.schedule.multiplier(t - 1, c.warmup_steps, c.total_steps)
    }

    fn hyper(&self, g: &Group, t: u64) -> [f32; 8] {
        let c = &self.config;
        let lr = self.lr_at(t) * g.lr_mult;
        match c.optimizer {
            OptimizerKind::AdamW => {
                let (b1, b2) = c.betas;
                let bc1 = 1.0 - b1.powf(t as f64);
                let bc2 = 1.0 - b2.powf(t as f64);
                // transformers' AdamW adds eps to sqrt(v) before the bias correction.
                let (eps, after) = if self.hf_adamw { (c.eps / bc2.sqrt(), 1.0) } else { (c.eps, 0.0) };
                [lr, b1, b2, eps, c.weight_decay, bc1, bc2, after].map(|v| v as f32)
            }
            OptimizerKind::Sgd => {
                [lr, c.momentum, c.weight_decay, if t <= 1 { 1.0 } else { 0.0 }, 0.0, 0.0, 0.0, 0.0].map(|v| v as f32)
            }
        }
    }

    /// Bytes of activations kept from forward to backward: the model's and the adapter's.
    pub fn kept_bytes(&self) -> u64 {
        self.model.acts.kept_bytes + self.adapter().kept_bytes()
    }

    /// Trainable parameter count.
    pub fn trainable_parameters(&self) -> usize {
        self.params.iter().map(|p| p.value.numel()).sum()
    }

    /// One training step on a full batch of `ids` (B rows of T tokens), every token after the
    /// first predicted.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn train_step(&mut self, ctx: &Context, ids: &[Vec<u32>]) -> Result<StepStats> {
        self.train_step_batches(ctx, &[Batch { ids, predict: None, positions: None }])
    }

    /// One optimizer step over `micro` batches (one per gradient-accumulation micro-batch, each
    /// B rows of T tokens): the gradient is that of the mean loss over every predicted position
    /// of all of them, so accumulating k micro-batches equals one batch k times larger.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn train_step_batches(&mut self, ctx: &Context, micro: &[Batch]) -> Result<StepStats> {
        crate::gpu::block_on(self.train_step_async(ctx, micro))
    }

    /// [`Trainer::train_step_batches`] for callers that cannot block (browsers). The step's
    /// submissions go out back to back; the losses are read once, at the end.
    pub async fn train_step_async(&mut self, ctx: &Context, micro: &[Batch<'_>]) -> Result<StepStats> {
        if !self.pending.is_empty() {
            return Err(TrainError::Config("read the submitted steps' losses (collect_losses) first".into()));
        }
        self.submit_step(ctx, micro)?;
        let mut v = self.collect_losses_async(ctx).await?;
        v.pop().ok_or_else(|| TrainError::Config("no step was submitted".into()))
    }

    /// Whether `loss_every` steps are in flight (their losses must be collected before the next).
    pub fn losses_due(&self) -> bool {
        self.pending.len() >= self.config.loss_every.max(1)
    }

    /// Submits one optimizer step over `micro` batches without reading anything back: its loss
    /// lands in a ring of `loss_every` slots on the GPU, read by [`Trainer::collect_losses`].
    pub fn submit_step(&mut self, ctx: &Context, micro: &[Batch<'_>]) -> Result<()> {
        if self.losses_due() {
            return Err(TrainError::Config(format!(
                "{} steps are in flight (loss_every); collect their losses first",
                self.pending.len()
            )));
        }
        let slot = self.pending.len();
        let t = self.step + 1;
        let k = self.config.grad_accum;
        if micro.len() != k {
            return Err(TrainError::Config(format!("{} micro-batches for a step that accumulates {k}", micro.len())));
        }
        for m in micro {
            if m.ids.len() != self.model.acts.batch {
                return Err(GpuModelError::BatchSize { batch: self.model.acts.batch, found: m.ids.len() }.into());
            }
            self.model.check_ids(m.ids)?;
        }
        for g in &self.groups {
            ctx.write_f32(&g.hyper, &self.hyper(g, t))?;
        }
        let train = self.model.train_step().ok_or_else(|| TrainError::Config("backward is not enabled".into()))?;
        // Every micro-batch's loss is scaled by 1 / (all predicted positions of the step).
        let total = micro.iter().map(|m| predicted_positions(m.ids, m.predict)).sum::<usize>().max(1);
        let mut tokens = 0;
        for (i, m) in micro.iter().enumerate() {
            self.model.write_batch_docs(ctx, m.ids, m.predict, m.positions)?;
            ctx.write_f32(&self.model.acts.loss_scale, &[1.0 / total as f32])?;
            if let Some(seed) = self.adapter().dropout_seed() {
                let s = self.adapter_config.seed ^ (t * k as u64 + i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
                ctx.write_u32(seed, &[(s ^ (s >> 32)) as u32])?;
            }
            let mut steps = vec![train, &self.loss_copy[slot * k + i]];
            if k > 1 {
                steps.push(if i == 0 { &self.acc_first } else { &self.acc_add });
            }
            if i + 1 == k {
                steps.push(&self.update);
                steps.push(&self.clip_copy[slot]);
                if let (Some(after), true) = (&self.after, t > self.adapter_config.delta_warmup) {
                    steps.push(after);
                }
            }
            ctx.run_steps(&steps)?;
            tokens += m.ids.len() * m.ids[0].len();
        }
        self.step = t;
        self.pending.push((t, total, tokens));
        Ok(())
    }

    /// Reads the losses of every submitted step (one readback) and returns their stats in order.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn collect_losses(&mut self, ctx: &Context) -> Result<Vec<StepStats>> {
        crate::gpu::block_on(self.collect_losses_async(ctx))
    }

    /// [`Trainer::collect_losses`] for callers that cannot block.
    pub async fn collect_losses_async(&mut self, ctx: &Context) -> Result<Vec<StepStats>> {
        if self.pending.is_empty() {
            return Ok(Vec::new());
        }
        let k = self.config.grad_accum;
        let all = ctx.read(&self.losses)?.await?;
        let numels: Vec<usize> = self.params.iter().map(|p| p.value.numel()).collect();
        let out = self
            .pending
            .iter()
            .enumerate()
            .map(|(slot, &(t, total, tokens))| {
                let row = &all[slot * (k + 3)..(slot + 1) * (k + 3)];
                let sum: f64 = row[..k].iter().map(|&l| l as f64).sum();
                let bad = row[k + 2];
                let nonfinite_grad = (bad >= 0.0).then(|| partial_owner(&numels, bad as usize)).flatten();
                StepStats {
                    step: t,
                    loss: sum / total as f64,
                    lr: self.lr_at(t),
                    tokens,
                    grad_norm: row[k + 1] as f64,
                    nonfinite_grad,
                }
            })
            .collect();
        self.pending.clear();
        Ok(out)
    }

    /// The recorded steps one training step (without gradient accumulation) submits, in order:
    /// forward + loss + backward, the loss copy, clipping + optimizer, after-step hooks.
    pub fn recorded_steps(&self) -> Vec<&Step> {
        let mut v: Vec<&Step> = self.model.train_step().into_iter().collect();
        v.push(&self.loss_copy[0]);
        v.push(&self.update);
        v.push(&self.clip_copy[0]);
        v.extend(&self.after);
        v
    }

    /// The optimizer's state and the step count, keyed by parameter name (checkpoints).
    #[cfg(not(target_arch = "wasm32"))]
    pub fn optimizer_state(&self, ctx: &Context) -> Result<BTreeMap<String, HostTensor>> {
        let mut out = BTreeMap::new();
        for p in &self.params {
            out.insert(format!("{}.exp_avg", p.name), host(ctx, &p.m)?);
            if let Some(v) = &p.v {
                out.insert(format!("{}.exp_avg_sq", p.name), host(ctx, v)?);
            }
        }
        // Delta-LoRA moves W0: its current values belong to the state too.
        if self.after.is_some() {
            for (site, w) in self.adapter().sites().iter().zip(self.model.site_weights()?) {
                for (j, part) in w.parts.iter().enumerate() {
                    out.insert(format!("{}.base_weight.{j}", site.module), host(ctx, part)?);
                }
            }
        }
        Ok(out)
    }

    /// Restores [`Trainer::optimizer_state`] and the step count.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn load_optimizer_state(
        &mut self,
        ctx: &Context,
        state: &BTreeMap<String, HostTensor>,
        step: u64,
    ) -> Result<()> {
        let get = |k: &str, want: usize| -> Result<&HostTensor> {
            let t = state.get(k).ok_or_else(|| TrainError::Config(format!("the checkpoint has no {k:?}")))?;
            if t.data.len() != want {
                return Err(TrainError::Config(format!(
                    "checkpoint tensor {k:?} has {} values, not {want}",
                    t.data.len()
                )));
            }
            Ok(t)
        };
        for p in &self.params {
            ctx.write_f32(&p.m, &get(&format!("{}.exp_avg", p.name), p.m.numel())?.data)?;
            if let Some(v) = &p.v {
                ctx.write_f32(v, &get(&format!("{}.exp_avg_sq", p.name), v.numel())?.data)?;
            }
        }
        if self.after.is_some() {
            for (site, w) in self.adapter().sites().iter().zip(self.model.site_weights()?) {
                for (j, part) in w.parts.iter().enumerate() {
                    ctx.write_f32(part, &get(&format!("{}.base_weight.{j}", site.module), part.numel())?.data)?;
                }
            }
        }
        self.step = step;
        Ok(())
    }

    /// Mean next-token loss of the current model (with its adapter) over `rows`, in batches.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn eval_loss(&self, ctx: &Context, rows: &[Vec<u32>]) -> Result<f64> {
        self.eval_loss_masked(ctx, rows, None)
    }

    /// [`Trainer::eval_loss`] over the positions `predict` marks.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn eval_loss_masked(&self, ctx: &Context, rows: &[Vec<u32>], predict: Option<&[Vec<bool>]>) -> Result<f64> {
        crate::gpu::block_on(self.eval_loss_async(ctx, rows, predict))
    }

    /// [`Trainer::eval_loss_masked`] for callers that cannot block (browsers).
    pub async fn eval_loss_async(
        &self,
        ctx: &Context,
        rows: &[Vec<u32>],
        predict: Option<&[Vec<bool>]>,
    ) -> Result<f64> {
        self.eval_rows_async(ctx, &Batch { ids: rows, predict, positions: None }).await
    }

    /// Mean loss over the targets of `rows` (any number of rows, with their masks and document
    /// positions), in batches of the model's.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn eval_rows(&self, ctx: &Context, rows: &Batch) -> Result<f64> {
        crate::gpu::block_on(self.eval_rows_async(ctx, rows))
    }

    /// [`Trainer::eval_rows`] for callers that cannot block (browsers).
    pub async fn eval_rows_async(&self, ctx: &Context, rows: &Batch<'_>) -> Result<f64> {
        let (mut sum, mut count) = (0.0, 0usize);
        let b = self.model.acts.batch;
        for (i, chunk) in rows.ids.chunks(b).enumerate() {
            let mask = rows.predict.map(|p| &p[i * b..i * b + chunk.len()]);
            let positions = rows.positions.map(|p| &p[i * b..i * b + chunk.len()]);
            let (s, c) = self.model.loss_sum_docs_async(ctx, chunk, mask, positions).await?;
            sum += s;
            count += c;
        }
        Ok(sum / count.max(1) as f64)
    }

    /// The gradients of the last step, keyed by parameter name (tests, diagnostics).
    #[cfg(not(target_arch = "wasm32"))]
    pub fn gradients(&self, ctx: &Context) -> Result<Vec<(String, Vec<f32>)>> {
        self.params.iter().map(|p| Ok((p.name.clone(), ctx.read_f32(&p.grad)?))).collect()
    }

    /// Writes the adapter in PEFT's format to `dir`.
    #[cfg(not(target_arch = "wasm32"))]
    /// `base_model` is recorded as `base_model_name_or_path` (see [`peft::config_json`]).
    pub fn save_adapter(&self, ctx: &Context, base_model: Option<&str>, dir: &std::path::Path) -> Result<()> {
        peft::save(ctx, self.adapter(), self.model.config.arch == crate::model::Arch::Gpt2, base_model, dir)?;
        Ok(())
    }
}

/// A forward-only model for `batch` rows of `seq` tokens with the PEFT adapter folder `dir`
/// (LoRA or VeRA files, ours or PEFT's) attached: for evaluation and merging.
#[cfg(not(target_arch = "wasm32"))]
pub fn model_with_adapter(
    ctx: &Context,
    weights: &Weights,
    batch: usize,
    seq: usize,
    dir: &std::path::Path,
) -> Result<GpuModel> {
    let mut model = GpuModel::new(ctx, weights, batch, seq)?;
    model.attach(ctx, adapter_from(ctx, weights, dir, batch * seq)?)?;
    Ok(model)
}

/// The PEFT adapter folder `dir` (LoRA or VeRA files, ours or PEFT's) built for `weights` with
/// activations for `rows` tokens at a time (for a [`crate::model::generate::Generator`], say).
#[cfg(not(target_arch = "wasm32"))]
pub fn adapter_from(ctx: &Context, weights: &Weights, dir: &std::path::Path, rows: usize) -> Result<Box<dyn Adapter>> {
    let file = peft::PeftFile::read(dir)?;
    let method = file.method();
    let cfg = file.adapter_config(method, &AdapterConfig::new(method))?;
    let sites = file.fits(&weights.source, cfg.sites(&weights.config))?;
    let mut a = file.fits(&weights.source, adapter::build(ctx, &cfg, sites, rows))?;
    file.fits(&weights.source, file.load_into(ctx, a.as_mut(), &weights.config))?;
    Ok(a)
}
