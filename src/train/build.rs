//! Building a [`Trainer`]: the optimizer buffers and parameter groups for an attached adapter,
//! and the recorded steps (gradient accumulation, clipping + optimizer, loss copies) it replays.

use super::{Group, OptimizerKind, ParamState, Result, TrainConfig, TrainError, Trainer};
use crate::adapter::{self, lora_plus, peft, Adapter, AdapterConfig, Method};
use crate::gpu::{Context, DType, Step, Tensor};
use crate::model::gpu::{BaseDType, GpuModel, PlanOptions};
use crate::model::Weights;
use crate::ops::elementwise::{axpy_forward, copy_forward};
use crate::ops::optim::{adamw_steps, grad_norm_clip, grad_norm_partials, sgd_steps, Hyper};

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
        let (groups, params) = param_states(ctx, adapter, method, config)?;
        let clip = ctx.tensor("clip", &[3], DType::F32)?;
        // With accumulation the optimizer reads the summed gradients.
        let grads: Vec<&Tensor> = params.iter().map(|p| p.acc.as_ref().unwrap_or(&p.grad)).collect();
        let (acc_first, acc_add) = accumulation_steps(ctx, &params)?;
        let update = update_step(ctx, adapter, config, &groups, &params, &grads, &clip)?;
        let mut after = Step::new();
        let has_after = adapter.after_update(ctx, &mut after, &model.site_weights()?)?;
        let (losses, loss_copy, clip_copy) = loss_ring(ctx, &model, config, &clip)?;
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
}

/// The optimizer groups (one per learning-rate multiplier) and every trainable tensor of
/// `adapter` with its zeroed optimizer buffers.
fn param_states(
    ctx: &Context,
    adapter: &dyn Adapter,
    method: Method,
    config: &TrainConfig,
) -> Result<(Vec<Group>, Vec<ParamState>)> {
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
                groups.push(Group { lr_mult, hyper: ctx.tensor("hyper", &[Hyper::FLOATS], DType::F32)? });
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
    Ok((groups, params))
}

/// Gradient accumulation's steps: the first micro-batch's `acc = grad`, the others' `acc += grad`
/// (both empty without accumulation).
fn accumulation_steps(ctx: &Context, params: &[ParamState]) -> Result<(Step, Step)> {
    let (mut acc_first, mut acc_add) = (Step::new(), Step::new());
    for p in params {
        if let Some(acc) = &p.acc {
            copy_forward(ctx, &mut acc_first, &p.grad, acc, 0)?;
            axpy_forward(ctx, &mut acc_add, 1.0, &p.grad, acc)?;
        }
    }
    Ok((acc_first, acc_add))
}

/// The update step: global gradient-norm clipping of `grads` into `clip`, the adapter's
/// before-update hooks, then the optimizer on every group.
fn update_step(
    ctx: &Context,
    adapter: &dyn Adapter,
    config: &TrainConfig,
    groups: &[Group],
    params: &[ParamState],
    grads: &[&Tensor],
    clip: &Tensor,
) -> Result<Step> {
    // The step holds the partial sums' memory as long as it lives (see `Step::record`).
    let partials = ctx.tensor("grad_norm_partials", &[grad_norm_partials(grads)], DType::F32)?;
    let mut update = Step::new();
    grad_norm_clip(ctx, &mut update, grads, &partials, config.max_grad_norm as f32, clip)?;
    adapter.before_update(ctx, &mut update)?;
    // One group's tensors share their step values: as few dispatches as the bindings allow.
    for (g, group) in groups.iter().enumerate() {
        let mine = || params.iter().zip(grads).filter(move |(p, _)| p.group == g);
        if config.optimizer == OptimizerKind::AdamW {
            let t: Vec<_> = mine().filter_map(|(p, gr)| Some((*gr, &p.value, &p.m, p.v.as_ref()?))).collect();
            adamw_steps(ctx, &mut update, &group.hyper, clip, &t)?;
        } else {
            let t: Vec<_> = mine().map(|(p, gr)| (*gr, &p.value, &p.m)).collect();
            sgd_steps(ctx, &mut update, &group.hyper, clip, &t)?;
        }
    }
    Ok(update)
}

/// The ring of `loss_every` slots the steps in flight copy their micro-batches' losses and their
/// `clip` into (see `Trainer::losses`), with the copy steps: `loss_copy[r·K + i]`, `clip_copy[r]`.
fn loss_ring(
    ctx: &Context,
    model: &GpuModel,
    config: &TrainConfig,
    clip: &Tensor,
) -> Result<(Tensor, Vec<Step>, Vec<Step>)> {
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
        copy_forward(ctx, &mut s, clip, &losses, r * (k + 3) + k)?;
        clip_copy.push(s);
    }
    Ok((losses, loss_copy, clip_copy))
}
