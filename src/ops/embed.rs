//! Token embedding lookup (shaders/embed.wgsl).

use super::{check_f32, check_numel, grid_for, shape_err, uniform};
use crate::gpu::layout::wgsl_struct;
use crate::gpu::{kernel_sources, Arg, Context, DType, KernelSpec, Result, Step, Tensor};

wgsl_struct! {
    pub(crate) struct Params for [("embed.wgsl", "Params")] {
        tokens: u32,
        dim: u32,
        gx: u32,
        first: u32,
        last: u32,
        qoff: u32,
    }
}

/// `out[t] = table[ids[t]]` with ids `(tokens,)` u32, table `(vocab, dim)`, out `(tokens, dim)`.
/// Ids must already be checked against the vocabulary (see `GpuModel::check_ids`).
pub fn embed_forward(ctx: &Context, step: &mut Step, ids: &Tensor, table: &Tensor, out: &Tensor) -> Result<()> {
    embed_forward_part(ctx, step, ids, table, 0, out)
}

/// As [`embed_forward`] for one part of a table split by rows: `table` holds the rows of ids
/// `first..first + table rows`; only tokens with those ids are written.
pub fn embed_forward_part(
    ctx: &Context,
    step: &mut Step,
    ids: &Tensor,
    table: &Tensor,
    first: usize,
    out: &Tensor,
) -> Result<()> {
    const OP: &str = "embed_forward";
    let packed = table.dtype() != DType::F32;
    if packed && !crate::ops::quant::fits(table.dtype(), table.shape()) {
        return Err(shape_err(
            OP,
            format!("packed table {:?} {:?} has rows of partial blocks", table.label(), table.shape()),
        ));
    }
    if !packed {
        check_f32(OP, table)?;
    }
    check_f32(OP, out)?;
    if ids.dtype() != DType::U32 || table.shape().len() != 2 {
        return Err(shape_err(
            OP,
            format!("ids {:?} must be u32 and table {:?} {:?} 2-D", ids.label(), table.label(), table.shape()),
        ));
    }
    let dim = table.shape()[1];
    check_numel(OP, out, ids.numel() * dim, "(tokens, dim)")?;
    let per = if packed { 4 } else { 1 };
    let groups = grid_for(ctx, out.numel() / per, 256);
    let params = uniform(
        OP,
        &Params {
            tokens: ids.numel() as u32,
            dim: dim as u32,
            gx: groups[0],
            first: first as u32,
            last: (first + table.shape()[0]) as u32,
            qoff: if packed { table.dtype().quant_words(table.numel()) as u32 } else { 0 },
        },
    )?;
    let spec = embed_kernel(table.dtype());
    ctx.record(step, &spec, &[Arg::Uniform(params), Arg::Read(ids), Arg::Read(table), Arg::Write(out)], groups)
}

/// The embedding kernel for a table stored as `dtype` (public for the WGSL validation test).
pub fn embed_kernel(dtype: DType) -> KernelSpec {
    let packed = dtype != DType::F32;
    KernelSpec::new(&kernel_sources::EMBED, "embed_forward").flag("PACKED", packed).var(
        "QLOAD",
        if packed { crate::ops::quant::load4_wgsl(dtype, "qload4", "table", "p.qoff") } else { String::new() },
    )
}
