//! DoRA's non-matmul pieces (shaders/dora.wgsl): the per-output norms and scales, the scaling of
//! the branch's output, the magnitude's gradient with the scaled output gradients, and the
//! per-output sums of squares and scaling of a frozen weight. See [`crate::adapter::dora`].

use super::{check_f32, check_numel, grid_for, shape_err, uniform};
use crate::gpu::layout::wgsl_struct;
use crate::gpu::{kernel_sources, Arg, Context, KernelSpec, Result, Step, Tensor};

wgsl_struct! {
    #[derive(Default)]
    pub(crate) struct Params for [("dora.wgsl", "Params")] {
        rows: u32,
        cols: u32,
        r: u32,
        gx: u32,
        flag: u32,
        flag2: u32,
    }
}

fn record(ctx: &Context, s: &mut Step, op: &'static str, items: usize, p: Params, args: Vec<Arg>) -> Result<()> {
    for a in &args {
        if let Arg::Read(t) | Arg::Write(t) = a {
            check_f32(op, t)?;
        }
    }
    let groups = grid_for(ctx, items, 256);
    let mut all = vec![Arg::Uniform(uniform(op, &Params { gx: groups[0], ..p })?)];
    all.extend(args);
    ctx.record(s, &KernelSpec::new(&kernel_sources::DORA, op), &all, groups)
}

/// `n_o = sqrt(c_o + Σ_j B[o, j] · U[j, o])` and `g_o = m_o / n_o`, for B `(out, r)`, U `(r, out)`.
#[allow(clippy::too_many_arguments)]
pub fn dora_norm(
    ctx: &Context,
    s: &mut Step,
    c: &Tensor,
    b: &Tensor,
    u: &Tensor,
    m: &Tensor,
    n: &Tensor,
    g: &Tensor,
) -> Result<()> {
    const OP: &str = "dora_norm";
    let [out, r] = b.shape()[..] else { return Err(shape_err(OP, format!("B {:?} is not 2-D", b.label()))) };
    for (what, t) in [("c", c), ("m", m), ("n", n), ("g", g)] {
        check_numel(OP, t, out, what)?;
    }
    check_numel(OP, u, r * out, "U")?;
    let p = Params { rows: 1, cols: out as u32, r: r as u32, ..Params::default() };
    let args = [Arg::Read(c), Arg::Read(b), Arg::Read(u), Arg::Read(m), Arg::Write(n), Arg::Write(g)];
    record(ctx, s, OP, out, p, args.into())
}

/// `y = g ⊙ y` per column (`u` None), or `y += g ⊙ u` (dropout), for `y` `(rows, out)`.
pub fn dora_forward(ctx: &Context, s: &mut Step, g: &Tensor, u: Option<&Tensor>, y: &Tensor) -> Result<()> {
    const OP: &str = "dora_forward";
    let out = g.numel();
    let rows = y.numel() / out.max(1);
    check_numel(OP, y, rows * out, "y")?;
    if let Some(u) = u {
        check_numel(OP, u, rows * out, "u")?;
    }
    let p = Params { rows: rows as u32, cols: out as u32, flag: u.is_some() as u32, ..Params::default() };
    record(ctx, s, OP, rows * out, p, vec![Arg::Read(g), Arg::Read(u.unwrap_or(g)), Arg::Write(y)])
}

/// What [`dora_backward`] reads of the forward pass: the site's output and its bias (no
/// dropout), or the kept `u = W0·x' + s·B·A·x'` (dropout).
pub enum DoraSaved<'a> {
    Output { y: &'a Tensor, bias: Option<&'a Tensor> },
    Dropout { u: &'a Tensor },
}

/// `dm = k ⊙ Σ_t dy ⊙ v` (see shaders/dora.wgsl), `dyg = g ⊙ dy`, `h = (g − 1) ⊙ dy`.
#[allow(clippy::too_many_arguments)]
pub fn dora_backward(
    ctx: &Context,
    s: &mut Step,
    dy: &Tensor,
    saved: DoraSaved,
    m: &Tensor,
    n: &Tensor,
    g: &Tensor,
    dm: &Tensor,
    dyg: &Tensor,
    h: &Tensor,
) -> Result<()> {
    const OP: &str = "dora_backward";
    let out = g.numel();
    let rows = dy.numel() / out.max(1);
    for (what, t) in [("dy", dy), ("dyg", dyg), ("h", h)] {
        check_numel(OP, t, rows * out, what)?;
    }
    for (what, t) in [("m", m), ("n", n), ("dm", dm)] {
        check_numel(OP, t, out, what)?;
    }
    let (v, bias, dropout) = match saved {
        DoraSaved::Output { y, bias } => (y, bias, false),
        DoraSaved::Dropout { u } => (u, None, true),
    };
    check_numel(OP, v, rows * out, "y")?;
    if let Some(b) = bias {
        check_numel(OP, b, out, "bias")?;
    }
    let p = Params {
        rows: rows as u32,
        cols: out as u32,
        flag: dropout as u32,
        flag2: bias.is_some() as u32,
        ..Params::default()
    };
    let args = [
        Arg::Read(dy),
        Arg::Read(v),
        Arg::Read(bias.unwrap_or(g)),
        Arg::Read(m),
        Arg::Read(n),
        Arg::Read(g),
        Arg::Write(dm),
        Arg::Write(dyg),
        Arg::Write(h),
    ];
    record(ctx, s, OP, out, p, args.into())
}

/// `c_o = Σ_k W[o, k]²` for W `(out, in)` (`per_row`), or `Σ_k W[k, o]²` for W `(in, out)`.
pub fn dora_sumsq(ctx: &Context, s: &mut Step, w: &Tensor, per_row: bool, c: &Tensor) -> Result<()> {
    const OP: &str = "dora_sumsq";
    let [rows, cols] = w.shape()[..] else { return Err(shape_err(OP, format!("W {:?} is not 2-D", w.label()))) };
    check_numel(OP, c, if per_row { rows } else { cols }, "c")?;
    let p = Params { rows: rows as u32, cols: cols as u32, flag: per_row as u32, ..Params::default() };
    record(ctx, s, OP, c.numel(), p, vec![Arg::Read(w), Arg::Write(c)])
}

/// W's row o (`per_row`: W `(out, in)`) or column o (W `(in, out)`) times `g_o`, or divided by
/// it (`invert`), in place.
pub fn dora_weight(ctx: &Context, s: &mut Step, g: &Tensor, w: &Tensor, per_row: bool, invert: bool) -> Result<()> {
    const OP: &str = "dora_weight";
    let [rows, cols] = w.shape()[..] else { return Err(shape_err(OP, format!("W {:?} is not 2-D", w.label()))) };
    check_numel(OP, g, if per_row { rows } else { cols }, "g")?;
    let p = Params {
        rows: rows as u32,
        cols: cols as u32,
        flag: per_row as u32,
        flag2: invert as u32,
        ..Params::default()
    };
    record(ctx, s, OP, rows * cols, p, vec![Arg::Read(g), Arg::Write(w)])
}
