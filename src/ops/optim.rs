//! Optimizer steps (shaders/optim.wgsl): AdamW and SGD with momentum, in place on the GPU.
//!
//! The per-step values live in a small `hyper` tensor that the host rewrites before each
//! submission (`*_hyper` below build it), so a recorded step replays with a new learning rate and
//! bias corrections and no CPU round trip; `clip` is a two-element tensor `[scale, norm]` that
//! [`grad_norm_clip`] fills on the GPU (`[1, _]` without clipping).

use super::{check_f32, check_numel, grid_for, shape_err, uniform};
use crate::gpu::{kernel_sources, Arg, Context, KernelSpec, Result, Step, Tensor};

#[derive(encase::ShaderType)]
struct Params {
    n: u32,
    gx: u32,
    offset: u32,
    max_norm: f32,
}

/// AdamW's hyperparameters (PyTorch's names and defaults but for the learning rate).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamW {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl AdamW {
    pub fn new(lr: f64) -> Self {
        AdamW { lr, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01 }
    }
    /// The `hyper` tensor's contents for step `t` (1-based).
    pub fn hyper(&self, t: u64) -> [f32; 8] {
        let bc1 = 1.0 - self.beta1.powf(t as f64);
        let bc2 = 1.0 - self.beta2.powf(t as f64);
        [self.lr, self.beta1, self.beta2, self.eps, self.weight_decay, bc1, bc2, 0.0].map(|v| v as f32)
    }
}

/// SGD's hyperparameters.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sgd {
    pub lr: f64,
    pub momentum: f64,
    pub weight_decay: f64,
}

impl Sgd {
    /// The `hyper` tensor's contents for step `t` (1-based; the momentum buffer starts at step 1).
    pub fn hyper(&self, t: u64) -> [f32; 8] {
        [self.lr, self.momentum, self.weight_decay, if t <= 1 { 1.0 } else { 0.0 }, 0.0, 0.0, 0.0, 0.0]
            .map(|v| v as f32)
    }
}

fn check(op: &'static str, hyper: &Tensor, clip: &Tensor, grad: &Tensor, state: &[&Tensor]) -> Result<()> {
    for t in [hyper, clip, grad].into_iter().chain(state.iter().copied()) {
        check_f32(op, t)?;
    }
    check_numel(op, hyper, 8, "(8,) step values")?;
    if !(2..=3).contains(&clip.numel()) {
        check_numel(op, clip, 2, "(2,) [gradient scale, norm] (or (3,) with the non-finite flag)")?;
    }
    for t in state {
        check_numel(op, t, grad.numel(), "the gradient's size")?;
        if t.overlaps(grad) {
            return Err(shape_err(op, format!("state {:?} overlaps gradient {:?}", t.label(), grad.label())));
        }
    }
    Ok(())
}

/// Records an optimizer step: `state` (the parameter first, then its optimizer buffers) is bound
/// after `hyper`, `clip` and `grad`, all written in place.
fn record_step(
    ctx: &Context,
    step: &mut Step,
    op: &'static str,
    hyper: &Tensor,
    clip: &Tensor,
    grad: &Tensor,
    state: &[&Tensor],
) -> Result<()> {
    check(op, hyper, clip, grad, state)?;
    let groups = grid_for(ctx, grad.numel(), 256);
    let params = uniform(op, &Params { n: grad.numel() as u32, gx: groups[0], offset: 0, max_norm: 0.0 })?;
    let mut args = vec![Arg::Uniform(params), Arg::Read(hyper), Arg::Read(clip), Arg::Read(grad)];
    args.extend(state.iter().map(|t| Arg::Write(t)));
    ctx.record(step, &KernelSpec::new(&kernel_sources::OPTIM, op), &args, groups)
}

/// One AdamW step on `param` with its moments `m`, `v`.
pub fn adamw_step(
    ctx: &Context,
    step: &mut Step,
    hyper: &Tensor,
    clip: &Tensor,
    grad: &Tensor,
    param: &Tensor,
    m: &Tensor,
    v: &Tensor,
) -> Result<()> {
    record_step(ctx, step, "adamw_step", hyper, clip, grad, &[param, m, v])
}

/// One SGD-with-momentum step on `param` with its momentum buffer `buf`.
pub fn sgd_step(
    ctx: &Context,
    step: &mut Step,
    hyper: &Tensor,
    clip: &Tensor,
    grad: &Tensor,
    param: &Tensor,
    buf: &Tensor,
) -> Result<()> {
    record_step(ctx, step, "sgd_step", hyper, clip, grad, &[param, buf])
}

/// Elements per partial sum of [`grad_norm_clip`].
const BLOCK: usize = 4096;

/// The partial-sum slots [`grad_norm_clip`] needs for these gradients.
pub fn grad_norm_partials(grads: &[&Tensor]) -> usize {
    grads.iter().map(|g| g.numel().div_ceil(BLOCK)).sum()
}

/// Which of `numels` (the gradients given to [`grad_norm_clip`], in order) owns partial `index`.
pub fn partial_owner(numels: &[usize], index: usize) -> Option<usize> {
    let mut start = 0;
    for (i, n) in numels.iter().enumerate() {
        let end = start + n.div_ceil(BLOCK);
        if index < end {
            return Some(i);
        }
        start = end;
    }
    None
}

/// Writes `clip = [min(1, max_norm / (‖g‖ + 1e-6)), ‖g‖]` for the global L2 norm of all `grads`
/// (`max_norm <= 0` computes the norm without clipping), deterministically, without leaving the
/// GPU. `partials` needs [`grad_norm_partials`] elements. A `(3,)` clip also gets the index of the
/// first partial sum that is NaN or Inf (-1 if none): partials `offset..offset + blocks` belong
/// to `grads[i]` in order, `blocks = numel.div_ceil(4096)` (see [`partial_owner`]).
pub fn grad_norm_clip(
    ctx: &Context,
    step: &mut Step,
    grads: &[&Tensor],
    partials: &Tensor,
    max_norm: f32,
    clip: &Tensor,
) -> Result<()> {
    const OP: &str = "grad_norm_clip";
    check_f32(OP, partials)?;
    check_f32(OP, clip)?;
    if !(2..=3).contains(&clip.numel()) {
        check_numel(OP, clip, 3, "(3,) [gradient scale, norm, first non-finite partial or -1] (or the first two)")?;
    }
    check_numel(OP, partials, grad_norm_partials(grads), "one slot per 4096 gradient elements")?;
    let spec = KernelSpec::new(&kernel_sources::OPTIM, "sumsq_partial");
    let mut offset = 0;
    for g in grads {
        check_f32(OP, g)?;
        let blocks = g.numel().div_ceil(BLOCK);
        let groups = super::grid_2d(blocks as u64, ctx.limits().max_workgroups_per_dimension);
        let params = uniform(OP, &Params { n: g.numel() as u32, gx: groups[0], offset: offset as u32, max_norm })?;
        ctx.record(step, &spec, &[Arg::Uniform(params), Arg::Read(g), Arg::Write(partials)], groups)?;
        offset += blocks;
    }
    let spec = KernelSpec::new(&kernel_sources::OPTIM, "clip_scale");
    let params = uniform(OP, &Params { n: offset as u32, gx: 1, offset: 0, max_norm })?;
    ctx.record(step, &spec, &[Arg::Uniform(params), Arg::Read(partials), Arg::Write(clip)], [1, 1, 1])
}
