//! The causal softmax of attention scores (shaders/softmax.wgsl), in place. Scores are stored
//! key-major, `st[z, s, t]` = score of query t against key s, so that each invocation walks
//! down one query's column with the lanes reading consecutive addresses.

use super::{check_f32, check_numel, shape_err, uniform};
use crate::gpu::{kernel_sources, Arg, Context, KernelSpec, Result, Step, Tensor};

#[derive(encase::ShaderType)]
struct Params {
    seq: u32,
    window: u32,
}

fn params(ctx: &Context, op: &'static str, scores: &Tensor, lse: &Tensor, window: usize) -> Result<(Params, [u32; 3])> {
    check_f32(op, scores)?;
    check_f32(op, lse)?;
    let [z, t, t2] = *scores.shape() else {
        return Err(shape_err(op, format!("scores {:?} {:?} must be (B·H, T, T)", scores.label(), scores.shape())));
    };
    if t != t2 {
        return Err(shape_err(op, format!("scores {:?} {:?} must be (B·H, T, T)", scores.label(), scores.shape())));
    }
    check_numel(op, lse, z * t, "(B·H·T,)")?;
    if z > ctx.limits().max_workgroups_per_dimension as usize {
        return Err(shape_err(op, format!("{z} (batch, head) pairs exceed the device's grid limit")));
    }
    Ok((Params { seq: t as u32, window: window as u32 }, [t.div_ceil(64) as u32, z as u32, 1]))
}

/// Key-major scores `st` `(B·H, T, T)` (scaled) become causal softmax probabilities in place:
/// query t's column keeps keys `0..=t` (with a `window`, only `t − window < s ≤ t`) and is 0
/// elsewhere; `lse` `(B·H·T,)` gets each query's log-sum-exp.
pub fn softmax_forward(ctx: &Context, step: &mut Step, scores: &Tensor, lse: &Tensor, window: usize) -> Result<()> {
    const OP: &str = "softmax_forward";
    let (p, groups) = params(ctx, OP, scores, lse, window)?;
    let args = [Arg::Uniform(uniform(OP, &p)?), Arg::Write(scores), Arg::Write(lse)];
    ctx.record(step, &KernelSpec::new(&kernel_sources::SOFTMAX, OP), &args, groups)
}

/// The gradient through [`softmax_forward`]: from the scores (recomputed), their `lse` and
/// `dp = dL/dP` (all key-major), writes the probabilities P over `scores` and
/// `dL/dscores = P ∘ (dp − Σ_keys P·dp)` over `dp`.
pub fn softmax_backward(
    ctx: &Context,
    step: &mut Step,
    scores: &Tensor,
    lse: &Tensor,
    dp: &Tensor,
    window: usize,
) -> Result<()> {
    const OP: &str = "softmax_backward";
    let (p, groups) = params(ctx, OP, scores, lse, window)?;
    check_f32(OP, dp)?;
    if dp.shape() != scores.shape() {
        return Err(shape_err(OP, format!("dp {:?} must have the scores' shape {:?}", dp.shape(), scores.shape())));
    }
    let args = [Arg::Uniform(uniform(OP, &p)?), Arg::Write(scores), Arg::Read(lse), Arg::Write(dp)];
    ctx.record(step, &KernelSpec::new(&kernel_sources::SOFTMAX, OP), &args, groups)
}
