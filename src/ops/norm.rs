//! RMSNorm and LayerNorm (shaders/norm.wgsl).

use super::{check_f32, check_numel, grid_2d, uniform};
use crate::gpu::layout::wgsl_struct;
use crate::gpu::{kernel_sources, Arg, Context, KernelSpec, Result, Step, Tensor};

/// (rows, dim) of `x` normalised over the length of `w`.
fn rows_dim(op: &'static str, x: &Tensor, w: &Tensor) -> Result<(usize, usize)> {
    let dim = w.numel();
    let rows = x.numel() / dim;
    check_numel(op, x, rows * dim, "(rows, dim)")?;
    Ok((rows, dim))
}

wgsl_struct! {
    pub(crate) struct Params for [("norm.wgsl", "Params")] {
        rows: u32,
        dim: u32,
        gx: u32,
        eps: f32,
        has_resid: u32,
    }
}

/// `out = x · rstd · w` per row of `x` `(rows, dim)`; also writes `rstd` `(rows,)` for backward.
pub fn rmsnorm_forward(
    ctx: &Context,
    step: &mut Step,
    x: &Tensor,
    w: &Tensor,
    eps: f32,
    out: &Tensor,
    rstd: &Tensor,
) -> Result<()> {
    const OP: &str = "rmsnorm_forward";
    for t in [x, w, out, rstd] {
        check_f32(OP, t)?;
    }
    let (rows, dim) = rows_dim(OP, x, w)?;
    check_numel(OP, out, rows * dim, "x's shape")?;
    check_numel(OP, rstd, rows, "(rows,)")?;
    let groups = grid_2d(rows as u64, ctx.limits().max_workgroups_per_dimension);
    let params = uniform(OP, &Params { rows: rows as u32, dim: dim as u32, gx: groups[0], eps, has_resid: 0 })?;
    let spec = KernelSpec::new(&kernel_sources::NORM, OP);
    ctx.record(
        step,
        &spec,
        &[Arg::Uniform(params), Arg::Read(x), Arg::Read(w), Arg::Write(out), Arg::Write(rstd)],
        groups,
    )
}

/// The gradient through [`rmsnorm_forward`]: `dx = dresid + dL/dx` given `dy = dL/dout`, the
/// forward input `x` and the saved `rstd`. `dresid` (the gradient arriving around the norm
/// through the residual connection) may be `None`.
pub fn rmsnorm_backward(
    ctx: &Context,
    step: &mut Step,
    x: &Tensor,
    w: &Tensor,
    rstd: &Tensor,
    dy: &Tensor,
    dresid: Option<&Tensor>,
    dx: &Tensor,
) -> Result<()> {
    norm_backward(ctx, step, "rmsnorm_backward", x, w, &[rstd], dy, dresid, dx)
}

/// `out = (x − mean) · rstd · w + b` per row of `x` `(rows, dim)`; also writes `mean` and
/// `rstd` `(rows,)` for backward.
pub fn layernorm_forward(
    ctx: &Context,
    step: &mut Step,
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    eps: f32,
    out: &Tensor,
    mean: &Tensor,
    rstd: &Tensor,
) -> Result<()> {
    const OP: &str = "layernorm_forward";
    for t in [x, w, b, out, mean, rstd] {
        check_f32(OP, t)?;
    }
    let (rows, dim) = rows_dim(OP, x, w)?;
    check_numel(OP, b, dim, "(dim,)")?;
    check_numel(OP, out, rows * dim, "x's shape")?;
    check_numel(OP, mean, rows, "(rows,)")?;
    check_numel(OP, rstd, rows, "(rows,)")?;
    let groups = grid_2d(rows as u64, ctx.limits().max_workgroups_per_dimension);
    let params = uniform(OP, &Params { rows: rows as u32, dim: dim as u32, gx: groups[0], eps, has_resid: 0 })?;
    let spec = KernelSpec::new(&kernel_sources::NORM, OP);
    let args = [
        Arg::Uniform(params),
        Arg::Read(x),
        Arg::Read(w),
        Arg::Read(b),
        Arg::Write(out),
        Arg::Write(mean),
        Arg::Write(rstd),
    ];
    ctx.record(step, &spec, &args, groups)
}

/// The gradient through [`layernorm_forward`] with respect to `x`: `dx = dresid + dL/dx`.
pub fn layernorm_backward(
    ctx: &Context,
    step: &mut Step,
    x: &Tensor,
    w: &Tensor,
    mean: &Tensor,
    rstd: &Tensor,
    dy: &Tensor,
    dresid: Option<&Tensor>,
    dx: &Tensor,
) -> Result<()> {
    norm_backward(ctx, step, "layernorm_backward", x, w, &[mean, rstd], dy, dresid, dx)
}

/// Records either norm's backward: `stats` are the saved per-row statistics in binding order
/// (`[rstd]` for RMSNorm, `[mean, rstd]` for LayerNorm), each `(rows,)`.
fn norm_backward(
    ctx: &Context,
    step: &mut Step,
    op: &'static str,
    x: &Tensor,
    w: &Tensor,
    stats: &[&Tensor],
    dy: &Tensor,
    dresid: Option<&Tensor>,
    dx: &Tensor,
) -> Result<()> {
    for t in [x, w, dy, dx].into_iter().chain(stats.iter().copied()) {
        check_f32(op, t)?;
    }
    let (rows, dim) = rows_dim(op, x, w)?;
    for t in stats {
        check_numel(op, t, rows, "(rows,)")?;
    }
    for t in [dy, dx].into_iter().chain(dresid) {
        check_numel(op, t, rows * dim, "x's shape")?;
    }
    let groups = grid_2d(rows as u64, ctx.limits().max_workgroups_per_dimension);
    let params =
        Params { rows: rows as u32, dim: dim as u32, gx: groups[0], eps: 0.0, has_resid: dresid.is_some() as u32 };
    let mut args = vec![Arg::Uniform(uniform(op, &params)?), Arg::Read(x), Arg::Read(w)];
    args.extend(stats.iter().map(|t| Arg::Read(t)));
    args.extend([Arg::Read(dy), Arg::Read(dresid.unwrap_or(dy)), Arg::Write(dx)]);
    ctx.record(step, &KernelSpec::new(&kernel_sources::NORM, op), &args, groups)
}
