//! The adapter branches' non-matmul pieces (shaders/adapter.wgsl): dropout with a mask that is
//! regenerated rather than stored, and VeRA's per-column scale vectors with their gradients.

use super::{check_f32, check_numel, grid_for, shape_err, uniform};
use crate::gpu::layout::wgsl_struct;
use crate::gpu::{kernel_sources, Arg, Context, DType, KernelSpec, Result, Step, Tensor};

wgsl_struct! {
    #[derive(Default)]
    pub(crate) struct Params for [("adapter.wgsl", "Params")] {
        n: u32,
        gx: u32,
        cols: u32,
        rows: u32,
        salt: u32,
        threshold: u32,
        keep_scale: f32,
        accumulate: u32,
        has_rows: u32,
    }
}

/// Dropout's probability as the kernel's integer threshold and the kept values' scale.
pub fn dropout_params(p: f32) -> (u32, f32) {
    ((p as f64 * (1u64 << 24) as f64).round() as u32, if p < 1.0 { 1.0 / (1.0 - p) } else { 0.0 })
}

fn record_dropout(
    ctx: &Context,
    step: &mut Step,
    entry: &'static str,
    x: &Tensor,
    seed: &Tensor,
    salt: u32,
    p: f32,
    out: &Tensor,
) -> Result<()> {
    check_f32(entry, x)?;
    check_f32(entry, out)?;
    check_numel(entry, out, x.numel(), "the input's size")?;
    if seed.dtype() != DType::U32 || seed.numel() != 1 {
        return Err(shape_err(entry, format!("seed {:?} must be one u32", seed.label())));
    }
    if !(0.0..1.0).contains(&p) {
        return Err(shape_err(entry, format!("dropout probability {p} is outside [0, 1)")));
    }
    if x.overlaps(out) {
        return Err(shape_err(entry, format!("input {:?} overlaps output {:?}", x.label(), out.label())));
    }
    let groups = grid_for(ctx, x.numel(), 256);
    let (threshold, keep_scale) = dropout_params(p);
    let params = Params { n: x.numel() as u32, gx: groups[0], salt, threshold, keep_scale, ..Default::default() };
    let args = [Arg::Uniform(uniform(entry, &params)?), Arg::Read(seed), Arg::Read(x), Arg::Write(out)];
    ctx.record(step, &KernelSpec::new(&kernel_sources::ADAPTER, entry), &args, groups)
}

/// `out = x ⊙ keep / (1 − p)`, the mask a hash of (`seed[0]`, `salt`, element index).
pub fn dropout_forward(
    ctx: &Context,
    step: &mut Step,
    x: &Tensor,
    seed: &Tensor,
    salt: u32,
    p: f32,
    out: &Tensor,
) -> Result<()> {
    record_dropout(ctx, step, "dropout_forward", x, seed, salt, p, out)
}

/// `dx += g ⊙ keep / (1 − p)` with the same mask as [`dropout_forward`] for the same seed and salt.
pub fn dropout_backward(
    ctx: &Context,
    step: &mut Step,
    g: &Tensor,
    seed: &Tensor,
    salt: u32,
    p: f32,
    dx: &Tensor,
) -> Result<()> {
    record_dropout(ctx, step, "dropout_backward", g, seed, salt, p, dx)
}

fn rows_cols(op: &'static str, a: &Tensor) -> Result<(usize, usize)> {
    match a.shape() {
        [r, c] => Ok((*r, *c)),
        s => Err(shape_err(op, format!("tensor {:?} has shape {s:?}; expected (rows, cols)", a.label()))),
    }
}

/// `out[i, j] (+)= a[i, j] · col[j]`, also `· row[i]` when `row` is given. `a` is `(rows, cols)`.
pub fn scale_forward(
    ctx: &Context,
    step: &mut Step,
    a: &Tensor,
    col: &Tensor,
    row: Option<&Tensor>,
    out: &Tensor,
    accumulate: bool,
) -> Result<()> {
    const OP: &str = "scale_forward";
    let (rows, cols) = rows_cols(OP, a)?;
    for t in [a, col, out].into_iter().chain(row) {
        check_f32(OP, t)?;
    }
    check_numel(OP, col, cols, "one value per column")?;
    check_numel(OP, out, rows * cols, "the input's size")?;
    if let Some(r) = row {
        check_numel(OP, r, rows, "one value per row")?;
    }
    if [a, col].into_iter().chain(row).any(|t| t.overlaps(out)) {
        return Err(shape_err(OP, format!("an input overlaps output {:?}", out.label())));
    }
    let groups = grid_for(ctx, rows * cols, 256);
    let params = Params {
        n: (rows * cols) as u32,
        gx: groups[0],
        cols: cols as u32,
        rows: rows as u32,
        accumulate: accumulate as u32,
        has_rows: row.is_some() as u32,
        ..Default::default()
    };
    let args = [
        Arg::Uniform(uniform(OP, &params)?),
        Arg::Read(a),
        Arg::Read(col),
        Arg::Read(row.unwrap_or(col)),
        Arg::Write(out),
    ];
    ctx.record(step, &KernelSpec::new(&kernel_sources::ADAPTER, OP), &args, groups)
}

/// The gradient of a column scale: `out[j] (+)= Σ_i a[i, j] · b[i, j]`, summed in row order.
pub fn scale_backward(
    ctx: &Context,
    step: &mut Step,
    a: &Tensor,
    b: &Tensor,
    out: &Tensor,
    accumulate: bool,
) -> Result<()> {
    const OP: &str = "scale_backward";
    let (rows, cols) = rows_cols(OP, a)?;
    for t in [a, b, out] {
        check_f32(OP, t)?;
    }
    check_numel(OP, b, rows * cols, "the first operand's size")?;
    check_numel(OP, out, cols, "one value per column")?;
    if a.overlaps(out) || b.overlaps(out) {
        return Err(shape_err(OP, format!("an input overlaps output {:?}", out.label())));
    }
    let groups = grid_for(ctx, cols, 256);
    let params = Params {
        n: cols as u32,
        gx: groups[0],
        cols: cols as u32,
        rows: rows as u32,
        accumulate: accumulate as u32,
        ..Default::default()
    };
    let args = [Arg::Uniform(uniform(OP, &params)?), Arg::Read(a), Arg::Read(b), Arg::Read(b), Arg::Write(out)];
    ctx.record(step, &KernelSpec::new(&kernel_sources::ADAPTER, OP), &args, groups)
}
