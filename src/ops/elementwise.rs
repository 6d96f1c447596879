//! Elementwise f32 ops (shaders/elementwise.wgsl): add, scale, axpy.

use super::{check_f32, grid_2d, shape_err, uniform};
use crate::gpu::{kernel_sources, Arg, Context, KernelSpec, Result, Step, Tensor};

#[derive(encase::ShaderType)]
struct Params {
    n: u32,
    gx: u32,
    alpha: f32,
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
    for t in [x, y, out] {
        check_f32(entry, t)?;
    }
    for t in [x, y] {
        if t.numel() != out.numel() {
            return Err(shape_err(
                entry,
                format!(
                    "tensor {:?} {:?} and output {:?} {:?} differ in size",
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
                format!(
                    "input {:?} overlaps output {:?}; use a separate output",
                    t.label(),
                    out.label()
                ),
            ));
        }
    }
    let n = out.numel();
    let groups = grid_2d(
        n.div_ceil(256) as u64,
        ctx.limits().max_workgroups_per_dimension,
    );
    let params = uniform(
        entry,
        &Params {
            n: n as u32,
            gx: groups[0],
            alpha,
        },
    )?;
    let spec = KernelSpec::new(&kernel_sources::ELEMENTWISE, entry);
    ctx.record(
        step,
        &spec,
        &[
            Arg::Uniform(params),
            Arg::Read(x),
            Arg::Read(y),
            Arg::Write(out),
        ],
        groups,
    )
}

/// `out = x + y`.
pub fn add_forward(
    ctx: &Context,
    step: &mut Step,
    x: &Tensor,
    y: &Tensor,
    out: &Tensor,
) -> Result<()> {
    record(ctx, step, "add_forward", x, y, out, 1.0)
}

/// `out = alpha * x`.
pub fn scale_forward(
    ctx: &Context,
    step: &mut Step,
    x: &Tensor,
    alpha: f32,
    out: &Tensor,
) -> Result<()> {
    record(ctx, step, "scale_forward", x, x, out, alpha)
}

/// `out += alpha * x`.
pub fn axpy_forward(
    ctx: &Context,
    step: &mut Step,
    alpha: f32,
    x: &Tensor,
    out: &Tensor,
) -> Result<()> {
    record(ctx, step, "axpy_forward", x, x, out, alpha)
}
