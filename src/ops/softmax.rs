//! The causal softmax of attention scores (shaders/softmax.wgsl), in place. Scores are stored
//! key-major, `st[z, s, t]` = score of query t against key s, so that each invocation walks
//! down one query's column with the lanes reading consecutive addresses.

use super::{check_f32, check_numel, shape_err, uniform};
use crate::gpu::layout::wgsl_struct;
use crate::gpu::{kernel_sources, Arg, Context, KernelSpec, Result, Step, Tensor};

wgsl_struct! {
    pub(crate) struct Params for [("softmax.wgsl", "Params")] {
        seq: u32,
        window: u32,
        heads: u32,
        docs: u32,
    }
}

/// Packed documents for [`softmax_forward`] / [`softmax_backward`]: each token's position in its
/// document `(B·T,)` u32, and the heads per batch entry (grid row z = b·H + h). A query then sees
/// no key before its document's first token.
#[derive(Clone, Copy)]
pub struct Docs<'a> {
    pub positions: &'a Tensor,
    pub heads: usize,
}

fn params(
    ctx: &Context,
    op: &'static str,
    scores: &Tensor,
    lse: &Tensor,
    window: usize,
    docs: Option<Docs>,
) -> Result<(Params, [u32; 3])> {
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
    let heads = match docs {
        Some(d) => {
            if d.heads == 0 || !z.is_multiple_of(d.heads) || d.positions.numel() != z / d.heads * t {
                return Err(shape_err(
                    op,
                    format!("positions {:?} must be (B·T,) for {z} rows of {} heads", d.positions.shape(), d.heads),
                ));
            }
            d.heads
        }
        None => 1,
    };
    let p = Params { seq: t as u32, window: window as u32, heads: heads as u32, docs: u32::from(docs.is_some()) };
    Ok((p, [t.div_ceil(64) as u32, z as u32, 1]))
}

/// Key-major scores `st` `(B·H, T, T)` (scaled) become causal softmax probabilities in place:
/// query t's column keeps keys `0..=t` (with a `window`, only `t − window < s ≤ t`) and is 0
/// elsewhere (with `docs`, also before its document's first token); `lse` `(B·H·T,)` gets each
/// query's log-sum-exp. `spare` is bound in place of the positions without `docs` (any buffer
/// not written here: WebGPU binds every declared buffer).
pub fn softmax_forward(
    ctx: &Context,
    step: &mut Step,
    scores: &Tensor,
    lse: &Tensor,
    window: usize,
    docs: Option<Docs>,
    spare: &Tensor,
) -> Result<()> {
    const OP: &str = "softmax_forward";
    let (p, groups) = params(ctx, OP, scores, lse, window, docs)?;
    let pos = docs.map(|d| d.positions).unwrap_or(spare);
    let args = [Arg::Uniform(uniform(OP, &p)?), Arg::Write(scores), Arg::Write(lse), Arg::Read(pos)];
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
    docs: Option<Docs>,
    spare: &Tensor,
) -> Result<()> {
    const OP: &str = "softmax_backward";
    let (p, groups) = params(ctx, OP, scores, lse, window, docs)?;
    let pos = docs.map(|d| d.positions).unwrap_or(spare);
    check_f32(OP, dp)?;
    if dp.shape() != scores.shape() {
        return Err(shape_err(OP, format!("dp {:?} must have the scores' shape {:?}", dp.shape(), scores.shape())));
    }
    let args = [Arg::Uniform(uniform(OP, &p)?), Arg::Write(scores), Arg::Read(lse), Arg::Write(dp), Arg::Read(pos)];
    ctx.record(step, &KernelSpec::new(&kernel_sources::SOFTMAX, OP), &args, groups)
}
