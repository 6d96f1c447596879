//! Elementwise f32 ops (shaders/elementwise.wgsl): add, scale, axpy, copy, bias, soft-capping.

use super::{check_f32, grid_2d, shape_err, uniform};
use crate::gpu::layout::wgsl_struct;
use crate::gpu::{kernel_sources, Arg, Context, KernelSpec, Result, Step, Tensor};

wgsl_struct! {
    pub(crate) struct Params for [("elementwise.wgsl", "Params")] {
        n: u32,
        gx: u32,
        alpha: f32,
        offset: u32,
    }
}

fn record(
    ctx: &Context,
    step: &mut Step,
    entry: &'static str,
    x: &Tensor,
    y: &Tensor,
    out: &Tensor,
    alpha: f32,
) -> Result<()> {
    record_at(ctx, step, entry, x, y, out, alpha, 0)
}

/// Records one elementwise dispatch over `x`'s elements, writing `out` from element `offset`.
fn record_at(
    ctx: &Context,
    step: &mut Step,
    entry: &'static str,
    x: &Tensor,
    y: &Tensor,
    out: &Tensor,
    alpha: f32,
    offset: usize,
) -> Result<()> {
    for t in [x, y, out] {
        check_f32(entry, t)?;
    }
    for t in [x, y] {
        if t.numel() + offset > out.numel() || (entry != "copy_forward" && t.numel() != out.numel()) {
            return Err(shape_err(
                entry,
                format!(
                    "tensor {:?} {:?} does not fit output {:?} {:?} at element offset {offset}",
                    t.label(),
                    t.shape(),
                    out.label(),
                    out.shape()
                ),
            ));
        }
        if t.overlaps(out) {
            return Err(shape_err(
                entry,
                format!("input {:?} overlaps output {:?}; use a separate output", t.label(), out.label()),
            ));
        }
    }
    let n = x.numel();
    let groups = grid_2d(n.div_ceil(256) as u64, ctx.limits().max_workgroups_per_dimension);
    let params = uniform(entry, &Params { n: n as u32, gx: groups[0], alpha, offset: offset as u32 })?;
    let spec = KernelSpec::new(&kernel_sources::ELEMENTWISE, entry);
    ctx.record(step, &spec, &[Arg::Uniform(params), Arg::Read(x), Arg::Read(y), Arg::Write(out)], groups)
}

/// `out = x + y`.
pub fn add_forward(ctx: &Context, step: &mut Step, x: &Tensor, y: &Tensor, out: &Tensor) -> Result<()> {
    record(ctx, step, "add_forward", x, y, out, 1.0)
}

/// `out = alpha * x`.
pub fn scale_forward(ctx: &Context, step: &mut Step, x: &Tensor, alpha: f32, out: &Tensor) -> Result<()> {
    record(ctx, step, "scale_forward", x, x, out, alpha)
}

/// `out += alpha * x`.
pub fn axpy_forward(ctx: &Context, step: &mut Step, alpha: f32, x: &Tensor, out: &Tensor) -> Result<()> {
    record(ctx, step, "axpy_forward", x, x, out, alpha)
}

/// `out[offset..offset + x.len()] = x` (appends rows to a cache without bind-offset alignment).
pub fn copy_forward(ctx: &Context, step: &mut Step, x: &Tensor, out: &Tensor, offset: usize) -> Result<()> {
    record_at(ctx, step, "copy_forward", x, x, out, 1.0, offset)
}

/// `out[r, :] += bias` for every row of `out` `(rows, bias.len())`, in place.
pub fn bias_forward(ctx: &Context, step: &mut Step, bias: &Tensor, out: &Tensor) -> Result<()> {
    const OP: &str = "bias_forward";
    check_f32(OP, bias)?;
    check_f32(OP, out)?;
    let dim = bias.numel();
    if !out.numel().is_multiple_of(dim) || bias.overlaps(out) {
        return Err(shape_err(
            OP,
            format!(
                "output {:?} {:?} is not rows of bias {:?} {:?}",
                out.label(),
                out.shape(),
                bias.label(),
                bias.shape()
            ),
        ));
    }
    let n = out.numel();
    let groups = grid_2d(n.div_ceil(256) as u64, ctx.limits().max_workgroups_per_dimension);
    let params = uniform(OP, &Params { n: n as u32, gx: groups[0], alpha: 1.0, offset: dim as u32 })?;
    let spec = KernelSpec::new(&kernel_sources::ELEMENTWISE, OP);
    ctx.record(step, &spec, &[Arg::Uniform(params), Arg::Read(bias), Arg::Read(bias), Arg::Write(out)], groups)
}

/// `v = cap · tanh(v / cap)`, in place (final logit soft-capping).
pub fn softcap_forward(ctx: &Context, step: &mut Step, cap: f32, v: &Tensor) -> Result<()> {
    const OP: &str = "softcap_forward";
    check_f32(OP, v)?;
    if !(cap > 0.0 && cap.is_finite()) {
        return Err(shape_err(OP, format!("soft-cap {cap} must be a positive number")));
    }
    let n = v.numel();
    let groups = grid_2d(n.div_ceil(256) as u64, ctx.limits().max_workgroups_per_dimension);
    let params = uniform(OP, &Params { n: n as u32, gx: groups[0], alpha: cap, offset: 0 })?;
    let spec = KernelSpec::new(&kernel_sources::ELEMENTWISE, OP);
    ctx.record(step, &spec, &[Arg::Uniform(params), Arg::Write(v)], groups)
}
