//! Activation functions (shaders/act.wgsl).

use super::{check_f32, check_numel, grid_for, uniform};
use crate::gpu::layout::wgsl_struct;
use crate::gpu::{kernel_sources, Arg, Context, KernelSpec, Result, Step, Tensor};

wgsl_struct! {
    pub(crate) struct Params for [("act.wgsl", "Params")] {
        n: u32,
        gx: u32,
    }
}

/// `out = silu(gate) · up`, elementwise.
pub fn swiglu_forward(ctx: &Context, step: &mut Step, gate: &Tensor, up: &Tensor, out: &Tensor) -> Result<()> {
    glu_forward(ctx, step, "swiglu_forward", gate, up, out)
}

/// `out = gelu_tanh(gate) · up`, elementwise (Gemma's GeGLU).
pub fn geglu_forward(ctx: &Context, step: &mut Step, gate: &Tensor, up: &Tensor, out: &Tensor) -> Result<()> {
    glu_forward(ctx, step, "geglu_forward", gate, up, out)
}

/// The gradient through [`geglu_forward`]: `dgate`, `dup` from `dout` and the forward inputs.
pub fn geglu_backward(
    ctx: &Context,
    step: &mut Step,
    gate: &Tensor,
    up: &Tensor,
    dout: &Tensor,
    dgate: &Tensor,
    dup: &Tensor,
) -> Result<()> {
    glu_backward(ctx, step, "geglu_backward", gate, up, dout, dgate, dup)
}

fn glu_forward(
    ctx: &Context,
    step: &mut Step,
    op: &'static str,
    gate: &Tensor,
    up: &Tensor,
    out: &Tensor,
) -> Result<()> {
    for t in [gate, up, out] {
        check_f32(op, t)?;
    }
    check_numel(op, up, gate.numel(), "gate's shape")?;
    check_numel(op, out, gate.numel(), "gate's shape")?;
    let groups = grid_for(ctx, gate.numel(), 256);
    let params = uniform(op, &Params { n: gate.numel() as u32, gx: groups[0] })?;
    let spec = KernelSpec::new(&kernel_sources::ACT, op);
    ctx.record(step, &spec, &[Arg::Uniform(params), Arg::Read(gate), Arg::Read(up), Arg::Write(out)], groups)
}

/// The gradient through [`swiglu_forward`]: `dgate`, `dup` from `dout` and the forward inputs.
pub fn swiglu_backward(
    ctx: &Context,
    step: &mut Step,
    gate: &Tensor,
    up: &Tensor,
    dout: &Tensor,
    dgate: &Tensor,
    dup: &Tensor,
) -> Result<()> {
    glu_backward(ctx, step, "swiglu_backward", gate, up, dout, dgate, dup)
}

#[allow(clippy::too_many_arguments)]
fn glu_backward(
    ctx: &Context,
    step: &mut Step,
    op: &'static str,
    gate: &Tensor,
    up: &Tensor,
    dout: &Tensor,
    dgate: &Tensor,
    dup: &Tensor,
) -> Result<()> {
    for t in [gate, up, dout, dgate, dup] {
        check_f32(op, t)?;
        check_numel(op, t, gate.numel(), "gate's shape")?;
    }
    let groups = grid_for(ctx, gate.numel(), 256);
    let params = uniform(op, &Params { n: gate.numel() as u32, gx: groups[0] })?;
    let spec = KernelSpec::new(&kernel_sources::ACT, op);
    let args =
        [Arg::Uniform(params), Arg::Read(gate), Arg::Read(up), Arg::Read(dout), Arg::Write(dgate), Arg::Write(dup)];
    ctx.record(step, &spec, &args, groups)
}

/// GPT-2's GELU (tanh approximation), elementwise.
pub fn gelu_forward(ctx: &Context, step: &mut Step, x: &Tensor, out: &Tensor) -> Result<()> {
    const OP: &str = "gelu_forward";
    check_f32(OP, x)?;
    check_f32(OP, out)?;
    check_numel(OP, out, x.numel(), "x's shape")?;
    let groups = grid_for(ctx, x.numel(), 256);
    let params = uniform(OP, &Params { n: x.numel() as u32, gx: groups[0] })?;
    let spec = KernelSpec::new(&kernel_sources::ACT, OP);
    ctx.record(step, &spec, &[Arg::Uniform(params), Arg::Read(x), Arg::Write(out)], groups)
}

/// The gradient through [`gelu_forward`]: `dx` from `dout` and the forward input `x`.
pub fn gelu_backward(ctx: &Context, step: &mut Step, x: &Tensor, dout: &Tensor, dx: &Tensor) -> Result<()> {
    const OP: &str = "gelu_backward";
    for t in [x, dout, dx] {
        check_f32(OP, t)?;
        check_numel(OP, t, x.numel(), "x's shape")?;
    }
    let groups = grid_for(ctx, x.numel(), 256);
    let params = uniform(OP, &Params { n: x.numel() as u32, gx: groups[0] })?;
    let spec = KernelSpec::new(&kernel_sources::ACT, OP);
    ctx.record(step, &spec, &[Arg::Uniform(params), Arg::Read(x), Arg::Read(dout), Arg::Write(dx)], groups)
}
