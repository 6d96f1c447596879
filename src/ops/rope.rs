//! Rotary position embeddings (shaders/rope.wgsl).

use super::{check_f32, check_numel, grid_for, shape_err, uniform};
use crate::gpu::{kernel_sources, Arg, Context, KernelSpec, Result, Step, Tensor};

#[derive(encase::ShaderType)]
struct Params {
    rows: u32,
    seq: u32,
    heads: u32,
    head_dim: u32,
    log_theta: f32,
    gx: u32,
}

fn record(
    ctx: &Context,
    step: &mut Step,
    entry: &'static str,
    x: &Tensor,
    seq: usize,
    heads: usize,
    head_dim: usize,
    theta: f64,
    out: &Tensor,
) -> Result<()> {
    check_f32(entry, x)?;
    check_f32(entry, out)?;
    if !head_dim.is_multiple_of(2) || seq == 0 {
        return Err(shape_err(
            entry,
            format!("head_dim {head_dim} must be even and seq {seq} positive"),
        ));
    }
    let rows = x.numel() / (heads * head_dim);
    if !rows.is_multiple_of(seq) {
        return Err(shape_err(
            entry,
            format!(
                "tensor {:?} {:?} is not (batch · {seq}, {heads}, {head_dim})",
                x.label(),
                x.shape()
            ),
        ));
    }
    check_numel(entry, x, rows * heads * head_dim, "(rows, heads, head_dim)")?;
    check_numel(entry, out, x.numel(), "x's shape")?;
    if x.overlaps(out) {
        return Err(shape_err(
            entry,
            format!("input {:?} overlaps output {:?}", x.label(), out.label()),
        ));
    }
    let groups = grid_for(ctx, rows * heads * head_dim / 2, 64);
    let params = Params {
        rows: rows as u32,
        seq: seq as u32,
        heads: heads as u32,
        head_dim: head_dim as u32,
        log_theta: theta.ln() as f32,
        gx: groups[0],
    };
    let spec = KernelSpec::new(&kernel_sources::ROPE, entry);
    ctx.record(
        step,
        &spec,
        &[
            Arg::Uniform(uniform(entry, &params)?),
            Arg::Read(x),
            Arg::Write(out),
        ],
        groups,
    )
}

/// Rotates `x` `(batch · seq, heads, head_dim)` by each position's angles into `out`.
pub fn rope_forward(
    ctx: &Context,
    step: &mut Step,
    x: &Tensor,
    seq: usize,
    heads: usize,
    head_dim: usize,
    theta: f64,
    out: &Tensor,
) -> Result<()> {
    record(
        ctx,
        step,
        "rope_forward",
        x,
        seq,
        heads,
        head_dim,
        theta,
        out,
    )
}

/// The gradient through [`rope_forward`]: rotates `dout` back by the same angles into `dx`.
pub fn rope_backward(
    ctx: &Context,
    step: &mut Step,
    dout: &Tensor,
    seq: usize,
    heads: usize,
    head_dim: usize,
    theta: f64,
    dx: &Tensor,
) -> Result<()> {
    record(
        ctx,
        step,
        "rope_backward",
        dout,
        seq,
        heads,
        head_dim,
        theta,
        dx,
    )
}
