//! Sum and mean along one dimension (shaders/reduce.wgsl), deterministic.

use super::{check_f32, grid_2d, shape_err, uniform};
use crate::gpu::layout::wgsl_struct;
use crate::gpu::{kernel_sources, Arg, Context, KernelSpec, Result, Step, Tensor};

wgsl_struct! {
    pub(crate) struct Params for [("reduce.wgsl", "Params")] {
        outer: u32,
        d: u32,
        inner: u32,
        gx: u32,
        scale: f32,
    }
}

/// `out = sum over dim` of `x` (or the mean when `mean`), where `out` has `x`'s shape without
/// that dimension. The order of summation is fixed by the shapes, so results are bit-identical
/// from run to run.
pub fn reduce_forward(ctx: &Context, step: &mut Step, x: &Tensor, dim: usize, mean: bool, out: &Tensor) -> Result<()> {
    const OP: &str = "reduce_forward";
    check_f32(OP, x)?;
    check_f32(OP, out)?;
    let shape = x.shape();
    if dim >= shape.len() {
        return Err(shape_err(OP, format!("dim {dim} is out of range for tensor {:?} of shape {shape:?}", x.label())));
    }
    let expect: Vec<usize> = shape.iter().enumerate().filter(|&(i, _)| i != dim).map(|(_, &s)| s).collect();
    if out.numel() != expect.iter().product::<usize>() {
        return Err(shape_err(
            OP,
            format!(
                "output {:?} has shape {:?}; reducing {:?} {shape:?} over dim {dim} gives {expect:?}",
                out.label(),
                out.shape(),
                x.label()
            ),
        ));
    }
    if x.overlaps(out) {
        return Err(shape_err(OP, format!("input {:?} overlaps output {:?}", x.label(), out.label())));
    }
    let outer: usize = shape[..dim].iter().product();
    let d = shape[dim];
    let inner: usize = shape[dim + 1..].iter().product();
    let count = (outer * inner) as u64;
    let limit = ctx.limits().max_workgroups_per_dimension;
    // A whole workgroup per output pays off when each output sums many values; otherwise one
    // invocation per output keeps every lane busy.
    let (entry, groups) = if d >= 256 || count < 64 {
        ("reduce_forward", grid_2d(count, limit))
    } else {
        ("reduce_columns_forward", grid_2d(count.div_ceil(64), limit))
    };
    let scale = if mean { 1.0 / d as f32 } else { 1.0 };
    let params = uniform(OP, &Params { outer: outer as u32, d: d as u32, inner: inner as u32, gx: groups[0], scale })?;
    let spec = KernelSpec::new(&kernel_sources::REDUCE, entry);
    ctx.record(step, &spec, &[Arg::Uniform(params), Arg::Read(x), Arg::Write(out)], groups)
}
