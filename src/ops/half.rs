//! f32 ⇄ f16 storage of activations (shaders/half.wgsl): `--activations f16` keeps what a layer's
//! backward pass reads as half floats between its forward and its backward pass. The CPU twin is
//! [`crate::io::half`] (same rounding, to nearest even; ±Inf past f16's range).

use super::{check_f32, grid_2d, shape_err, uniform};
use crate::gpu::layout::wgsl_struct;
use crate::gpu::{kernel_sources, Arg, Context, DType, KernelSpec, Result, Step, Tensor};

wgsl_struct! {
    pub(crate) struct Params for [("half.wgsl", "Params")] {
        n: u32,
        gx: u32,
    }
}

/// Checks that `half` (F16) holds as many elements as `full` (F32) and neither overlaps.
fn check(op: &'static str, full: &Tensor, half: &Tensor) -> Result<()> {
    check_f32(op, full)?;
    if half.dtype() != DType::F16 || half.numel() != full.numel() {
        return Err(shape_err(
            op,
            format!(
                "tensor {:?} ({:?} {:?}) is not the f16 twin of {:?} {:?}",
                half.label(),
                half.dtype(),
                half.shape(),
                full.label(),
                full.shape()
            ),
        ));
    }
    if half.overlaps(full) {
        return Err(shape_err(op, format!("{:?} overlaps {:?}", half.label(), full.label())));
    }
    Ok(())
}

fn record(
    ctx: &Context,
    step: &mut Step,
    op: &'static str,
    x: &Tensor,
    out: &Tensor,
    items: usize,
    n: usize,
) -> Result<()> {
    let groups = grid_2d(items.div_ceil(256) as u64, ctx.limits().max_workgroups_per_dimension);
    let params = uniform(op, &Params { n: n as u32, gx: groups[0] })?;
    let spec = KernelSpec::new(&kernel_sources::HALF, op);
    ctx.record(step, &spec, &[Arg::Uniform(params), Arg::Read(x), Arg::Write(out)], groups)
}

/// `out = f16(x)`: `x` (f32) packed into `out` (F16, same shape).
pub fn half_pack(ctx: &Context, step: &mut Step, x: &Tensor, out: &Tensor) -> Result<()> {
    const OP: &str = "half_pack";
    check(OP, x, out)?;
    let n = x.numel();
    record(ctx, step, OP, x, out, n.div_ceil(2), n)
}

/// `out = f32(x)`: `x` (F16) widened into `out` (f32, same shape), exactly.
pub fn half_unpack(ctx: &Context, step: &mut Step, x: &Tensor, out: &Tensor) -> Result<()> {
    const OP: &str = "half_unpack";
    check(OP, out, x)?;
    let n = out.numel();
    record(ctx, step, OP, x, out, n, n)
}
