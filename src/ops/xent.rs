//! Cross-entropy (shaders/xent.wgsl).

use super::{check_f32, check_numel, grid_2d, shape_err, uniform};
use crate::gpu::layout::wgsl_struct;
use crate::gpu::{kernel_sources, Arg, Context, DType, KernelSpec, Result, Step, Tensor};

/// Target id meaning "this position predicts nothing" (its loss is 0 and it is not counted).
pub const IGNORE: u32 = u32::MAX;

wgsl_struct! {
    pub(crate) struct Params for [("xent.wgsl", "Params")] {
        rows: u32,
        vocab: u32,
        gx: u32,
        softcap: f32,
    }
}

/// Per-row `loss = logsumexp(logits) − logits[target]` for logits `(rows, vocab)` and u32
/// targets `(rows,)`; also writes `lse` `(rows,)`. Rows whose target is [`IGNORE`] get 0.
pub fn xent_forward(
    ctx: &Context,
    step: &mut Step,
    logits: &Tensor,
    targets: &Tensor,
    loss: &Tensor,
    lse: &Tensor,
) -> Result<()> {
    const OP: &str = "xent_forward";
    for t in [logits, loss, lse] {
        check_f32(OP, t)?;
    }
    if targets.dtype() != DType::U32 {
        return Err(shape_err(OP, format!("targets {:?} must be u32", targets.label())));
    }
    let rows = targets.numel();
    let vocab = logits.numel() / rows.max(1);
    check_numel(OP, logits, rows * vocab, "(rows, vocab)")?;
    check_numel(OP, loss, rows, "(rows,)")?;
    check_numel(OP, lse, rows, "(rows,)")?;
    let groups = grid_2d(rows as u64, ctx.limits().max_workgroups_per_dimension);
    let params = uniform(OP, &Params { rows: rows as u32, vocab: vocab as u32, gx: groups[0], softcap: 0.0 })?;
    let spec = KernelSpec::new(&kernel_sources::XENT, OP);
    ctx.record(
        step,
        &spec,
        &[Arg::Uniform(params), Arg::Read(logits), Arg::Read(targets), Arg::Write(loss), Arg::Write(lse)],
        groups,
    )
}

/// The gradient of `scale[0] · sum(loss)` with respect to the logits, written over `logits` in
/// place: `scale · (softmax(logits) − onehot(target))` per row, 0 for ignored rows. `scale` is a
/// one-element tensor, so the host can change it between replays. With `softcap` > 0 the logits
/// were soft-capped ([`crate::ops::elementwise::softcap_forward`]) and the gradient is that of the
/// raw logits.
pub fn xent_backward(
    ctx: &Context,
    step: &mut Step,
    logits: &Tensor,
    targets: &Tensor,
    lse: &Tensor,
    scale: &Tensor,
    softcap: f32,
) -> Result<()> {
    const OP: &str = "xent_backward";
    check_f32(OP, logits)?;
    check_f32(OP, lse)?;
    check_f32(OP, scale)?;
    check_numel(OP, scale, 1, "(1,) the loss scale")?;
    if targets.dtype() != DType::U32 {
        return Err(shape_err(OP, format!("targets {:?} must be u32", targets.label())));
    }
    let rows = targets.numel();
    let vocab = logits.numel() / rows.max(1);
    check_numel(OP, logits, rows * vocab, "(rows, vocab)")?;
    check_numel(OP, lse, rows, "(rows,)")?;
    let groups = grid_2d(rows as u64, ctx.limits().max_workgroups_per_dimension);
    let params = uniform(OP, &Params { rows: rows as u32, vocab: vocab as u32, gx: groups[0], softcap })?;
    let spec = KernelSpec::new(&kernel_sources::XENT, OP);
    let args = [Arg::Uniform(params), Arg::Write(logits), Arg::Read(targets), Arg::Read(lse), Arg::Read(scale)];
    ctx.record(step, &spec, &args, groups)
}
