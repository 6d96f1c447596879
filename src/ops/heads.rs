//! Head-major copies of attention's tensors (shaders/heads.wgsl).
//!
//! The model keeps q, k, v and the attention output token-major, `(B, T, Hx, d)`; attention as
//! a batch of B·H matrix products needs them head-major, `(B, H, T, d)`. `heads_forward` copies
//! in (repeating each of Hx = H / rep key/value heads `rep` times for grouped-query attention);
//! `heads_backward` is its adjoint: it copies out, summing the repeats.

use super::{check_f32, check_numel, shape_err, uniform};
use crate::gpu::layout::wgsl_struct;
use crate::gpu::{kernel_sources, Arg, Context, KernelSpec, Result, Step, Tensor};

wgsl_struct! {
    pub(crate) struct Params for [("heads.wgsl", "Params")] {
        seq: u32,
        heads: u32,
        rep: u32,
    }
}

/// The layout of one copy: `batch` × `seq` tokens, `heads` head-major heads of `head_dim`,
/// `rep` of which share each token-major head.
#[derive(Clone, Copy, Debug)]
pub struct HeadsShape {
    pub batch: usize,
    pub seq: usize,
    pub heads: usize,
    pub rep: usize,
    pub head_dim: usize,
}

impl HeadsShape {
    /// Checks the operands; returns the uniforms, the kernel and the grid for `grid_heads` heads.
    fn check(
        &self,
        ctx: &Context,
        op: &'static str,
        token_major: &Tensor,
        head_major: &Tensor,
        grid_heads: usize,
    ) -> Result<(Params, KernelSpec, [u32; 3])> {
        let HeadsShape { batch, seq, heads, rep, head_dim } = *self;
        if rep == 0 || !heads.is_multiple_of(rep) || !head_dim.is_multiple_of(4) || head_dim == 0 {
            return Err(shape_err(op, format!("{self:?}: heads must be a multiple of rep, head_dim of 4")));
        }
        for t in [token_major, head_major] {
            check_f32(op, t)?;
        }
        check_numel(op, token_major, batch * seq * (heads / rep) * head_dim, "(B, T, H / rep, d)")?;
        check_numel(op, head_major, batch * heads * seq * head_dim, "(B, H, T, d)")?;
        let limit = ctx.limits().max_workgroups_per_dimension as usize;
        let gx = (seq * head_dim / 4).div_ceil(64);
        if gx > limit || grid_heads > limit || batch > limit {
            return Err(shape_err(op, format!("{self:?} exceeds the device's grid limit of {limit}")));
        }
        let params = Params { seq: seq as u32, heads: heads as u32, rep: rep as u32 };
        let spec = KernelSpec::new(&kernel_sources::HEADS, op).constant("D4", (head_dim / 4) as f64);
        Ok((params, spec, [gx as u32, grid_heads as u32, batch as u32]))
    }
}

/// `y[b, h, t, :] = x[b, t, h / rep, :]`: x `(B, T, H / rep, d)` to y `(B, H, T, d)`.
pub fn heads_forward(ctx: &Context, step: &mut Step, s: HeadsShape, x: &Tensor, y: &Tensor) -> Result<()> {
    const OP: &str = "heads_forward";
    let (params, spec, groups) = s.check(ctx, OP, x, y, s.heads)?;
    let args = [Arg::Uniform(uniform(OP, &params)?), Arg::Read(x), Arg::Write(y)];
    ctx.record(step, &spec, &args, groups)
}

/// `x[b, t, g, :] = Σ_{j < rep} y[b, g·rep + j, t, :]` (written, not accumulated): the adjoint of
/// [`heads_forward`], y `(B, H, T, d)` to x `(B, T, H / rep, d)`.
pub fn heads_backward(ctx: &Context, step: &mut Step, s: HeadsShape, y: &Tensor, x: &Tensor) -> Result<()> {
    const OP: &str = "heads_backward";
    let (params, spec, groups) = s.check(ctx, OP, x, y, s.heads / s.rep.max(1))?;
    let args = [Arg::Uniform(uniform(OP, &params)?), Arg::Read(y), Arg::Write(x)];
    ctx.record(step, &spec, &args, groups)
}
