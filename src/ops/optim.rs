//! Optimizer steps (shaders/optim.wgsl): AdamW and SGD with momentum, in place on the GPU.
//!
//! The per-step values live in a small `hyper` tensor ([`Hyper`], [`Hyper::FLOATS`] floats) that
//! the host rewrites before each submission ([`AdamW::hyper`], [`Sgd::hyper`] build it), so a
//! recorded step replays with a new learning rate and bias corrections and no CPU round trip;
//! `clip` is a tensor `[scale, norm]` (or `[scale, norm, first non-finite partial]`) that
//! [`grad_norm_clip`] fills on the GPU (`[1, _]` without clipping).

use super::{check_f32, check_numel, shape_err, uniform};
use crate::gpu::layout::wgsl_struct;
use crate::gpu::{kernel_sources, Arg, Context, KernelSpec, Result, Step, Tensor};

wgsl_struct! {
    pub(crate) struct Params for [("optim.wgsl", "Params")] {
        n: u32,
        gx: u32,
        offset: u32,
        max_norm: f32,
    }
}

wgsl_struct! {
    /// One tensor of a multi-tensor dispatch.
    #[derive(Clone, Copy, Default)]
    pub(crate) struct TensorRow for [("optim.wgsl", "TensorRow")] {
        first_group: u32,
        n: u32,
        first_slot: u32,
        pad: u32,
    }
}

wgsl_struct! {
    /// The uniform of a multi-tensor dispatch: its tensors and the grid's width.
    pub(crate) struct Multi for [("optim.wgsl", "Multi")] {
        count: u32,
        gx: u32,
        pad0: u32,
        pad1: u32,
        t: [TensorRow; MAX_TENSORS],
    }
}

wgsl_struct! {
    /// The optimizer's values for one step, as the `hyper` tensor holds them: AdamW reads lr,
    /// the betas, eps, weight decay, the bias corrections and `decay_after`; SGD lr, momentum,
    /// weight decay and `first`.
    #[derive(Clone, Copy, Debug, Default, PartialEq)]
    pub struct Hyper for [("optim.wgsl", "Hyper")] {
        pub lr: f32,
        pub beta1: f32,
        pub beta2: f32,
        pub eps: f32,
        pub weight_decay: f32,
        /// 1 − β1^t.
        pub bias_correction1: f32,
        /// 1 − β2^t.
        pub bias_correction2: f32,
        /// 1: the decoupled decay after the update, as transformers' AdamW (PEFT's LoRA-FA).
        pub decay_after: f32,
        pub momentum: f32,
        /// 1 on SGD's first step (its momentum buffer starts as the gradient).
        pub first: f32,
    }
}

impl Hyper {
    /// The `hyper` tensor's length in f32.
    pub const FLOATS: usize = (<Hyper as encase::ShaderSize>::SHADER_SIZE.get() / 4) as usize;

    /// The tensor's contents, laid out as the shader reads them.
    pub fn to_f32s(&self) -> Vec<f32> {
        let mut buf = encase::StorageBuffer::new(Vec::<u8>::new());
        buf.write(self).expect("a fixed-size struct of f32 fits a Vec");
        buf.into_inner().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
    }
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
    /// The step values for step `t` (1-based).
    pub fn hyper(&self, t: u64) -> Hyper {
        Hyper {
            lr: self.lr as f32,
            beta1: self.beta1 as f32,
            beta2: self.beta2 as f32,
            eps: self.eps as f32,
            weight_decay: self.weight_decay as f32,
            bias_correction1: (1.0 - self.beta1.powf(t as f64)) as f32,
            bias_correction2: (1.0 - self.beta2.powf(t as f64)) as f32,
            ..Hyper::default()
        }
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
    /// The step values for step `t` (1-based; the momentum buffer starts at step 1).
    pub fn hyper(&self, t: u64) -> Hyper {
        Hyper {
            lr: self.lr as f32,
            momentum: self.momentum as f32,
            weight_decay: self.weight_decay as f32,
            first: if t <= 1 { 1.0 } else { 0.0 },
            ..Hyper::default()
        }
    }
}

fn check(op: &'static str, hyper: &Tensor, clip: &Tensor, grad: &Tensor, state: &[&Tensor]) -> Result<()> {
    for t in [hyper, clip, grad].into_iter().chain(state.iter().copied()) {
        check_f32(op, t)?;
    }
    check_numel(op, hyper, Hyper::FLOATS, "the step values (Hyper::FLOATS,)")?;
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

/// Most tensors of one dispatch of the multi-tensor kernels: the rows the host writes into the
/// uniform ([`Multi`]); the WGSL struct declares as many as its dispatch has (template K).
const MAX_TENSORS: usize = 16;

/// How many tensors of `bindings_each` storage bindings one dispatch takes beside `fixed` ones,
/// within the adapter's storage bindings per stage (a browser's default of 8 gives AdamW one).
fn tensors_per_dispatch(ctx: &Context, fixed: usize, bindings_each: usize) -> usize {
    let limit = ctx.limits().max_storage_buffers_per_stage as usize;
    (limit.saturating_sub(fixed) / bindings_each).clamp(1, MAX_TENSORS)
}

/// The kernel family specialised for `k` tensors per dispatch: the binding declarations and the
/// cases of the optimizer step (`sgd_step`, else `adamw_step`: tensor j's gradient, parameter and
/// buffers at 3 + 4j.. or 3 + 3j..) and of the sums (gradient j at 2 + j).
pub fn multi_spec(entry: &'static str, k: usize) -> KernelSpec {
    let sgd = entry == "sgd_step";
    let names: &[&str] = if sgd { &["g", "w", "m"] } else { &["g", "w", "m", "v"] };
    let (mut decls, mut cases, mut sums) = (String::new(), String::new(), String::new());
    let var = |b: usize, access: &str, name: String| {
        format!("@group(0) @binding({b}) var<storage, {access}> {name}: array<f32>;\n")
    };
    for j in 0..k {
        for (x, name) in names.iter().enumerate() {
            let access = if x == 0 { "read" } else { "read_write" };
            decls += &var(3 + names.len() * j + x, access, format!("{name}{j}"));
        }
        decls += &var(2 + j, "read", format!("qg{j}"));
        cases += &match sgd {
            true => format!("        case {j}u: {{ let r = sgd_update(g{j}[i], w{j}[i], m{j}[i]); w{j}[i] = r.x; m{j}[i] = r.y; }}\n"),
            false => format!(
                "        case {j}u: {{ let r = adamw_update(g{j}[i], w{j}[i], m{j}[i], v{j}[i]); w{j}[i] = r.x; m{j}[i] = r.y; v{j}[i] = r.z; }}\n"
            ),
        };
        sums += &format!("        case {j}u: {{ return qg{j}[i]; }}\n");
    }
    KernelSpec::new(&kernel_sources::OPTIM, entry)
        .var("K", k)
        .var("BINDINGS", decls)
        .var("STEP", if sgd { "sgd_step" } else { "adamw_step" })
        .var("STEP_CASES", cases)
        .var("SUMSQ_CASES", sums)
}

/// The uniform of one multi-tensor dispatch of `tensors` (elements, first partial slot) and its
/// grid.
fn multi_uniform(ctx: &Context, tensors: &[(usize, usize)], per_group: usize) -> Result<(Vec<u8>, [u32; 3])> {
    let mut t = [TensorRow::default(); MAX_TENSORS];
    let mut first = 0usize;
    for (row, &(n, slot)) in t.iter_mut().zip(tensors) {
        *row = TensorRow { first_group: first as u32, n: n as u32, first_slot: slot as u32, pad: 0 };
        first += n.div_ceil(per_group);
    }
    let groups = super::grid_2d(first as u64, ctx.limits().max_workgroups_per_dimension);
    let multi = Multi { count: tensors.len() as u32, gx: groups[0], pad0: 0, pad1: 0, t };
    Ok((uniform("optim", &multi)?, groups))
}

/// Records an optimizer step over `tensors` (each its gradient, then the parameter and its
/// optimizer buffers, all written in place), as few dispatches as the bindings allow.
fn record_steps(
    ctx: &Context,
    step: &mut Step,
    op: &'static str,
    hyper: &Tensor,
    clip: &Tensor,
    tensors: &[(&Tensor, Vec<&Tensor>)],
) -> Result<()> {
    let Some(each) = tensors.first().map(|(_, state)| 1 + state.len()) else { return Ok(()) };
    for (grad, state) in tensors {
        check(op, hyper, clip, grad, state)?;
        if 1 + state.len() != each {
            return Err(shape_err(
                op,
                format!("tensor {:?} has {} buffers, the others {}", grad.label(), state.len(), each - 1),
            ));
        }
    }
    // Each dispatch's kernel binds exactly its tensors (a last, smaller group gets its own).
    for chunk in tensors.chunks(tensors_per_dispatch(ctx, 2, each)) {
        let spec = multi_spec(op, chunk.len());
        let sizes: Vec<(usize, usize)> = chunk.iter().map(|(g, _)| (g.numel(), 0)).collect();
        let (params, groups) = multi_uniform(ctx, &sizes, 256)?;
        let mut args = vec![Arg::Uniform(params), Arg::Read(hyper), Arg::Read(clip)];
        for (grad, state) in chunk {
            args.push(Arg::Read(grad));
            args.extend(state.iter().map(|t| Arg::Write(t)));
        }
        ctx.record(step, &spec, &args, groups)?;
    }
    Ok(())
}

/// AdamW steps on `tensors`: (gradient, parameter, first moment, second moment) each.
pub fn adamw_steps(
    ctx: &Context,
    step: &mut Step,
    hyper: &Tensor,
    clip: &Tensor,
    tensors: &[(&Tensor, &Tensor, &Tensor, &Tensor)],
) -> Result<()> {
    let t: Vec<_> = tensors.iter().map(|&(g, p, m, v)| (g, vec![p, m, v])).collect();
    record_steps(ctx, step, "adamw_step", hyper, clip, &t)
}

/// SGD-with-momentum steps on `tensors`: (gradient, parameter, momentum buffer) each.
pub fn sgd_steps(
    ctx: &Context,
    step: &mut Step,
    hyper: &Tensor,
    clip: &Tensor,
    tensors: &[(&Tensor, &Tensor, &Tensor)],
) -> Result<()> {
    let t: Vec<_> = tensors.iter().map(|&(g, p, m)| (g, vec![p, m])).collect();
    record_steps(ctx, step, "sgd_step", hyper, clip, &t)
}

/// One AdamW step on `param` with its moments `m`, `v`.
#[allow(clippy::too_many_arguments)]
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
    adamw_steps(ctx, step, hyper, clip, &[(grad, param, m, v)])
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
    sgd_steps(ctx, step, hyper, clip, &[(grad, param, buf)])
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
    let mut offset = 0;
    let mut slots = Vec::with_capacity(grads.len());
    for g in grads {
        check_f32(OP, g)?;
        slots.push((g.numel(), offset));
        offset += g.numel().div_ceil(BLOCK);
    }
    // The partials first, then up to k gradients per dispatch.
    let k = tensors_per_dispatch(ctx, 1, 1);
    for (chunk, sizes) in grads.chunks(k).zip(slots.chunks(k)) {
        let spec = multi_spec("sumsq_partial", chunk.len());
        let (params, groups) = multi_uniform(ctx, sizes, BLOCK)?;
        let mut args = vec![Arg::Uniform(params), Arg::Write(partials)];
        args.extend(chunk.iter().map(|g| Arg::Read(g)));
        ctx.record(step, &spec, &args, groups)?;
    }
    let spec = multi_spec("clip_scale", 1);
    let params = uniform(OP, &Params { n: offset as u32, gx: 1, offset: 0, max_norm })?;
    ctx.record(step, &spec, &[Arg::Uniform(params), Arg::Read(partials), Arg::Write(clip)], [1, 1, 1])
}
