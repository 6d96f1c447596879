//! Rotary position embeddings (shaders/rope.wgsl).

use super::{check_f32, check_numel, grid_for, shape_err, uniform};
use crate::gpu::layout::wgsl_struct;
use crate::gpu::{kernel_sources, Arg, Context, KernelSpec, Result, Step, Tensor};

wgsl_struct! {
    pub(crate) struct Params for [("rope.wgsl", "Params")] {
        rows: u32,
        seq: u32,
        heads: u32,
        head_dim: u32,
        gx: u32,
        pos_offset: u32,
        docs: u32,
    }
}

/// Where the rows of a rotary call sit: `x` is `(batch · seq, heads, head_dim)` and row `r` is at
/// position `pos_offset + r % seq`.
#[derive(Clone, Copy, Debug)]
pub struct RopeShape {
    pub seq: usize,
    pub heads: usize,
    pub head_dim: usize,
    /// Positions already in a KV cache before these rows (0 in training).
    pub pos_offset: usize,
}

#[allow(clippy::too_many_arguments)] // the op's tensors, one argument each
fn record(
    ctx: &Context,
    step: &mut Step,
    entry: &'static str,
    s: RopeShape,
    inv_freq: &Tensor,
    positions: Option<&Tensor>,
    x: &Tensor,
    out: &Tensor,
) -> Result<()> {
    check_f32(entry, x)?;
    check_f32(entry, out)?;
    check_f32(entry, inv_freq)?;
    check_numel(entry, inv_freq, s.head_dim / 2, "(head_dim / 2,)")?;
    if !s.head_dim.is_multiple_of(2) || s.seq == 0 || s.heads == 0 {
        return Err(shape_err(entry, format!("{s:?}: head_dim must be even, seq and heads positive")));
    }
    let rows = x.numel() / (s.heads * s.head_dim);
    if !rows.is_multiple_of(s.seq) {
        return Err(shape_err(
            entry,
            format!("tensor {:?} {:?} is not (batch · {}, {}, {})", x.label(), x.shape(), s.seq, s.heads, s.head_dim),
        ));
    }
    check_numel(entry, x, rows * s.heads * s.head_dim, "(rows, heads, head_dim)")?;
    check_numel(entry, out, x.numel(), "x's shape")?;
    if x.overlaps(out) {
        return Err(shape_err(entry, format!("input {:?} overlaps output {:?}", x.label(), out.label())));
    }
    if let Some(p) = positions {
        check_numel(entry, p, rows, "(rows,) positions")?;
    }
    let groups = grid_for(ctx, rows * s.heads * s.head_dim / 2, 64);
    let params = Params {
        rows: rows as u32,
        seq: s.seq as u32,
        heads: s.heads as u32,
        head_dim: s.head_dim as u32,
        gx: groups[0],
        pos_offset: s.pos_offset as u32,
        docs: u32::from(positions.is_some()),
    };
    let spec = KernelSpec::new(&kernel_sources::ROPE, entry);
    // Without positions the kernel reads none; inv_freq stands in for the binding.
    let pos = positions.unwrap_or(inv_freq);
    let args =
        [Arg::Uniform(uniform(entry, &params)?), Arg::Read(x), Arg::Write(out), Arg::Read(inv_freq), Arg::Read(pos)];
    ctx.record(step, &spec, &args, groups)
}

/// Rotates `x` by each row's position angles (position · `inv_freq[i]` for pair i) into `out`.
pub fn rope_forward(
    ctx: &Context,
    step: &mut Step,
    s: RopeShape,
    inv_freq: &Tensor,
    x: &Tensor,
    out: &Tensor,
) -> Result<()> {
    record(ctx, step, "rope_forward", s, inv_freq, None, x, out)
}

/// [`rope_forward`] with each row's position read from `positions` `(rows,)` (its position in
/// its document, when documents are packed into rows).
pub fn rope_forward_in_docs(
    ctx: &Context,
    step: &mut Step,
    s: RopeShape,
    inv_freq: &Tensor,
    positions: &Tensor,
    x: &Tensor,
    out: &Tensor,
) -> Result<()> {
    record(ctx, step, "rope_forward", s, inv_freq, Some(positions), x, out)
}

/// The gradient through [`rope_forward_in_docs`].
pub fn rope_backward_in_docs(
    ctx: &Context,
    step: &mut Step,
    s: RopeShape,
    inv_freq: &Tensor,
    positions: &Tensor,
    dout: &Tensor,
    dx: &Tensor,
) -> Result<()> {
    record(ctx, step, "rope_backward", s, inv_freq, Some(positions), dout, dx)
}

/// The gradient through [`rope_forward`]: rotates `dout` back by the same angles into `dx`.
pub fn rope_backward(
    ctx: &Context,
    step: &mut Step,
    s: RopeShape,
    inv_freq: &Tensor,
    dout: &Tensor,
    dx: &Tensor,
) -> Result<()> {
    record(ctx, step, "rope_backward", s, inv_freq, None, dout, dx)
}
