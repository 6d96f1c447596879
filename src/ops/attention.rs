//! Causal grouped-query attention, two ways that compute the same thing:
//!
//! - fused kernels (shaders/attention.wgsl, attention_vec4.wgsl: [`attention_forward`],
//!   [`attention_backward`]), one invocation per query (or key) row with an online softmax,
//!   which never hold a (T, T) score matrix: any sequence length, and generation with a KV cache;
//! - batched matrix products ([`attention_forward_mm`], [`attention_backward_mm`]): head-major
//!   copies of q, k, v (ops::heads), `Sᵀ = k·qᵀ/√d` for all B·H heads in one matmul (stored
//!   key-major for the softmax's sake), the causal softmax in place (ops::softmax), `O = P·v`;
//!   the backward pass recomputes Sᵀ and runs five
//!   such products. The score matrices (B·H, T, T) must fit a budget, and the products run on
//!   the register-blocked subgroup matmul, several times faster than the fused kernels on CPU
//!   drivers (SmolLM2, 4 × 128 tokens: 0.08 s for a product across 30 layers).

use super::heads::{heads_backward, heads_forward, HeadsShape};
use super::matmul::{matmul, Matmul};
use super::softmax::{softmax_backward, softmax_forward, Docs};
use super::{check_f32, check_numel, grid_for, shape_err, uniform};
use crate::gpu::layout::wgsl_struct;
use crate::gpu::{kernel_sources, Arg, Context, KernelSpec, Result, Step, Tensor};

wgsl_struct! {
    pub(crate) struct Params for [("attention.wgsl", "Params"), ("attention_vec4.wgsl", "Params")] {
        batch: u32,
        seq: u32,
        heads: u32,
        kv_heads: u32,
        head_dim: u32,
        gx: u32,
        scale: f32,
        kv_seq: u32,
        q_offset: u32,
        window: u32,
        docs: u32,
    }
}

/// Shapes of one attention call.
#[derive(Clone, Copy, Debug)]
pub struct AttentionShape {
    pub batch: usize,
    /// Query rows per batch entry.
    pub seq: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Positions before the first query (a KV cache's length during generation; 0 in training).
    /// Keys and values then have `q_offset + seq` rows per batch entry.
    pub q_offset: usize,
    /// A sliding window: the query at position i attends to keys i − window < s ≤ i (0: every
    /// key up to i).
    pub window: usize,
    /// The scores' scale (1/√head_dim unless the model says otherwise, as Gemma 3 does).
    pub scale: f32,
    /// Documents packed into the rows see only themselves: query t sees no key before its
    /// document's first token (each token's position in its document is given; training shapes).
    /// `lse` then holds (B·H·T + B·T) values: the fused kernels keep each token's document start
    /// after the log-sum-exps.
    pub docs: bool,
}

impl AttentionShape {
    /// Causal attention over the whole prefix, scaled by 1/√head_dim, without a KV cache.
    pub fn new(batch: usize, seq: usize, heads: usize, kv_heads: usize, head_dim: usize) -> Self {
        let scale = 1.0 / (head_dim as f32).sqrt();
        AttentionShape { batch, seq, heads, kv_heads, head_dim, q_offset: 0, window: 0, scale, docs: false }
    }

    /// Checks the head layout, naming the op.
    fn check(&self, op: &'static str) -> Result<()> {
        if self.kv_heads == 0 || !self.heads.is_multiple_of(self.kv_heads) || self.head_dim == 0 || self.head_dim > 256
        {
            return Err(shape_err(
                op,
                format!("{self:?}: heads must be a multiple of kv_heads and head_dim in 1..=256"),
            ));
        }
        Ok(())
    }

    /// Whether [`attention_forward_mm`] / [`attention_backward_mm`] can serve this shape on this
    /// adapter with score matrices of at most `budget` bytes: training shapes (no KV cache),
    /// head_dim a multiple of 4, and the subgroup matmul (elsewhere the fused kernels are as
    /// fast as the portable matmul).
    pub fn fits_matmul_path(&self, ctx: &Context, budget: u64) -> bool {
        let bytes = (self.batch * self.heads * self.seq * self.seq * 4) as u64;
        self.check("attention").is_ok()
            && self.q_offset == 0
            && self.head_dim.is_multiple_of(4)
            && ctx.subgroup_size().is_some_and(|s| (4..=128).contains(&s))
            && bytes <= budget.min(ctx.limits().max_storage_binding)
            && self.batch * self.heads <= ctx.limits().max_workgroups_per_dimension as usize
    }

    /// `(B·H, T, T)`: the score matrices of the matmul path.
    pub fn scores_shape(&self) -> [usize; 3] {
        [self.batch * self.heads, self.seq, self.seq]
    }

    /// `(B, H, T, d)`: the head-major copies of the matmul path.
    pub fn head_major_shape(&self) -> [usize; 4] {
        [self.batch, self.heads, self.seq, self.head_dim]
    }

    /// The specialised kernels (shaders/attention_vec4.wgsl) serve head dimensions that are a
    /// multiple of 4; others take the generic ones. Both compute the same thing.
    fn vec4(&self) -> bool {
        self.head_dim.is_multiple_of(4) && self.batch * self.heads <= 65535
    }

    /// The kernel and grid of `entry` for `rows_per_head` rows of `heads` heads.
    fn spec(&self, ctx: &Context, entry: &'static str, heads: usize) -> (KernelSpec, [u32; 3]) {
        if self.vec4() {
            let spec = vec4_kernel(entry, self.head_dim / 4);
            (spec, [self.seq.div_ceil(64) as u32, (self.batch * heads) as u32, 1])
        } else {
            (KernelSpec::new(&kernel_sources::ATTENTION, entry), grid_for(ctx, self.batch * heads * self.seq, 64))
        }
    }

    /// The kernel's uniforms for a grid `gx` workgroups wide.
    fn params(&self, gx: u32) -> Params {
        Params {
            batch: self.batch as u32,
            seq: self.seq as u32,
            heads: self.heads as u32,
            kv_heads: self.kv_heads as u32,
            head_dim: self.head_dim as u32,
            gx,
            scale: self.scale,
            kv_seq: (self.q_offset + self.seq) as u32,
            q_offset: self.q_offset as u32,
            window: self.window as u32,
            docs: u32::from(self.docs),
        }
    }

    /// Checks `lse`'s length ((B·H·T,), plus (B·T,) document starts with `docs`; the matmul path
    /// takes either) and returns its log-sum-exp part as (B·H·T,).
    fn lse_part(&self, op: &'static str, lse: &Tensor, starts_needed: bool) -> Result<Tensor> {
        let n = self.batch * self.heads * self.seq;
        let with_starts = n + self.batch * self.seq;
        let ok = lse.numel() == with_starts || (lse.numel() == n && !(self.docs && starts_needed));
        if !ok {
            let want = if self.docs && starts_needed { "(B·H·T + B·T,)" } else { "(B, H, T)" };
            return Err(shape_err(op, format!("lse {:?} {:?} must be {want} for {self:?}", lse.label(), lse.shape())));
        }
        lse.reshape(&[lse.numel(), 1])?.rows(0, n, 4)?.reshape(&[n])
    }
}

/// shaders/attention_vec4.wgsl for head_dim = 4·`d4`: the per-row loops over the head dimension are
/// written out here, one line per vec4, so that every row and accumulator lives in registers
/// (a private array indexed in a loop may end up in memory).
pub fn vec4_kernel(entry: &'static str, d4: usize) -> KernelSpec {
    let lines = |f: &dyn Fn(usize) -> String| (0..d4).map(f).collect::<Vec<_>>().join("\n");
    KernelSpec::new(&kernel_sources::ATTENTION_VEC4, entry)
        .var("D4", d4)
        .var("FWD_DECL", lines(&|i| format!("    let q{i} = q[qb + {i}u] * p.scale;\n    var a{i} = vec4<f32>(0.0);")))
        .var("FWD_DOT", lines(&|i| format!("        dot += q{i} * k[kb + {i}u];")))
        .var("FWD_ACC", lines(&|i| format!("            a{i} = a{i} * c + e * v[kb + {i}u];")))
        .var("FWD_STORE", lines(&|i| format!("        out[qb + {i}u] = a{i} * inv;")))
        .var(
            "DQ_DECL",
            lines(&|i| {
                format!(
                    "    let q{i} = bq[qb + {i}u];\n    let d{i} = dout[qb + {i}u];\n    dsum4 += d{i} * bout[qb + {i}u];\n    var a{i} = vec4<f32>(0.0);"
                )
            }),
        )
        .var("DQ_DOT", lines(&|i| format!("        qk += q{i} * bk[kb + {i}u];\n        dvd += d{i} * bv[kb + {i}u];")))
        .var("DQ_ACC", lines(&|i| format!("            a{i} += ds * bk[kb + {i}u];")))
        .var("DQ_STORE", lines(&|i| format!("        dq[qb + {i}u] = a{i};")))
        .var(
            "DKV_DECL",
            lines(&|i| {
                format!(
                    "    let k{i} = bk[kb + {i}u];\n    let v{i} = bv[kb + {i}u];\n    var ak{i} = vec4<f32>(0.0);\n    var av{i} = vec4<f32>(0.0);"
                )
            }),
        )
        .var("DKV_DOT", lines(&|i| format!("            qk += k{i} * bq[qb + {i}u];\n            dvd += v{i} * kdout[qb + {i}u];")))
        .var(
            "DKV_ACC",
            lines(&|i| format!("                ak{i} += ds * bq[qb + {i}u];\n                av{i} += pr * kdout[qb + {i}u];")),
        )
        .var("DKV_STORE", lines(&|i| format!("        dk[kb + {i}u] = ak{i};\n        dv[kb + {i}u] = av{i};")))
}

/// `out = softmax(q·kᵀ/√d + causal mask)·v` with q, out `(B, T, H, d)`, k, v `(B, q_offset + T, KV, d)`;
/// also writes each row's log-sum-exp `lse` `(B, H, T)` for the backward pass.
pub fn attention_forward(
    ctx: &Context,
    step: &mut Step,
    s: AttentionShape,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    out: &Tensor,
    lse: &Tensor,
) -> Result<()> {
    attention_forward_in_docs(ctx, step, s, q, k, v, out, lse, None)
}

/// [`attention_forward`] where `s.docs`: `positions` `(B·T,)` u32 gives each token's position
/// in its document, and `lse` is (B·H·T + B·T,) (the document starts follow the log-sum-exps).
#[allow(clippy::too_many_arguments)]
pub fn attention_forward_in_docs(
    ctx: &Context,
    step: &mut Step,
    s: AttentionShape,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    out: &Tensor,
    lse: &Tensor,
    positions: Option<&Tensor>,
) -> Result<()> {
    const OP: &str = "attention_forward";
    if s.docs != positions.is_some() || (s.docs && s.q_offset != 0) {
        return Err(shape_err(OP, format!("{s:?}: packed documents need positions and training shapes")));
    }
    if let Some(p) = positions {
        check_numel(OP, p, s.batch * s.seq, "(B·T,) positions")?;
    }
    for t in [q, k, v, out, lse] {
        check_f32(OP, t)?;
    }
    s.check(OP)?;
    let (b, t, h, kv, d) = (s.batch, s.seq, s.heads, s.kv_heads, s.head_dim);
    check_numel(OP, q, b * t * h * d, "(B, T, H, d)")?;
    check_numel(OP, out, b * t * h * d, "(B, T, H, d)")?;
    let kv_seq = s.q_offset + t;
    check_numel(OP, k, b * kv_seq * kv * d, "(B, q_offset + T, KV, d)")?;
    check_numel(OP, v, b * kv_seq * kv * d, "(B, q_offset + T, KV, d)")?;
    s.lse_part(OP, lse, true)?;
    let (spec, groups) = s.spec(ctx, OP, h);
    let params = s.params(groups[0]);
    let args = [
        Arg::Uniform(uniform(OP, &params)?),
        Arg::Read(q),
        Arg::Read(k),
        Arg::Read(v),
        Arg::Write(out),
        Arg::Write(lse),
        // Without documents the kernel reads no positions; q stands in for the binding.
        Arg::Read(positions.unwrap_or(q)),
    ];
    ctx.record(step, &spec, &args, groups)
}

/// The gradient through [`attention_forward`] (training shapes: `q_offset == 0`): `dq`, `dk`,
/// `dv` from `dout` and the forward's inputs, output and `lse`. `dsum` `(B, H, T)` is scratch.
/// Key/value gradients sum over the query heads that share them.
pub fn attention_backward(
    ctx: &Context,
    step: &mut Step,
    s: AttentionShape,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    out: &Tensor,
    lse: &Tensor,
    dout: &Tensor,
    dq: &Tensor,
    dk: &Tensor,
    dv: &Tensor,
    dsum: &Tensor,
) -> Result<()> {
    const OP: &str = "attention_backward";
    for t in [q, k, v, out, lse, dout, dq, dk, dv, dsum] {
        check_f32(OP, t)?;
    }
    s.check(OP)?;
    if s.q_offset != 0 {
        return Err(shape_err(OP, format!("{s:?}: the backward pass takes training shapes (q_offset 0)")));
    }
    let (b, t, h, kv, d) = (s.batch, s.seq, s.heads, s.kv_heads, s.head_dim);
    for x in [q, out, dout, dq] {
        check_numel(OP, x, b * t * h * d, "(B, T, H, d)")?;
    }
    for x in [k, v, dk, dv] {
        check_numel(OP, x, b * t * kv * d, "(B, T, KV, d)")?;
    }
    s.lse_part(OP, lse, true)?;
    check_numel(OP, dsum, b * h * t, "(B, H, T)")?;
    let (spec, groups_q) = s.spec(ctx, "attention_backward_dq", h);
    let params = |gx| s.params(gx);
    let args = [
        Arg::Uniform(uniform(OP, &params(groups_q[0]))?),
        Arg::Read(q),
        Arg::Read(k),
        Arg::Read(v),
        Arg::Read(out),
        Arg::Read(lse),
        Arg::Read(dout),
        Arg::Write(dq),
        Arg::Write(dsum),
    ];
    ctx.record(step, &spec, &args, groups_q)?;
    let (spec, groups_kv) = s.spec(ctx, "attention_backward_dkv", kv);
    let args = [
        Arg::Uniform(uniform(OP, &params(groups_kv[0]))?),
        Arg::Read(q),
        Arg::Read(k),
        Arg::Read(v),
        Arg::Read(lse),
        Arg::Read(dout),
        Arg::Read(dsum),
        Arg::Write(dk),
        Arg::Write(dv),
    ];
    ctx.record(step, &spec, &args, groups_kv)
}

/// Scratch of the matmul path, planned by the model (shapes from [`AttentionShape`]). The
/// backward pass reuses the forward's copies for the gradients, as noted.
pub struct AttentionScratch {
    pub q: Tensor,               // (B, H, T, d)  head-major q; backward: then dL/dv per query head
    pub k: Tensor,               // (B, H, T, d)  k, each key head repeated per query head; backward: then dL/dk
    pub v: Tensor,               // (B, H, T, d)  v likewise; backward: then dL/dq
    pub o: Tensor,               // (B, H, T, d)  head-major output; backward: dL/dout
    pub scores: Tensor,          // (B·H, T, T)   key-major scaled scores Sᵀ, then probabilities Pᵀ
    pub dscores: Option<Tensor>, // (B·H, T, T)   backward: dL/dPᵀ, then dL/dSᵀ
    /// Each token's position in its document `(B·T,)` u32, for a shape with `docs`.
    pub positions: Option<Tensor>,
}

impl AttentionScratch {
    /// The softmax's document positions, when the shape packs documents.
    fn docs(&self, op: &'static str, s: &AttentionShape) -> Result<Option<Docs<'_>>> {
        match (s.docs, &self.positions) {
            (false, _) => Ok(None),
            (true, Some(p)) => Ok(Some(Docs { positions: p, heads: s.heads })),
            (true, None) => Err(shape_err(op, format!("{s:?}: packed documents need the scratch's positions"))),
        }
    }

    fn check(&self, op: &'static str, s: &AttentionShape, backward: bool) -> Result<()> {
        let (b, t, h, d) = (s.batch, s.seq, s.heads, s.head_dim);
        for x in [&self.q, &self.k, &self.v, &self.o] {
            check_numel(op, x, b * h * t * d, "(B, H, T, d)")?;
        }
        if self.scores.shape() != s.scores_shape() {
            return Err(shape_err(
                op,
                format!("scores {:?} must be (B·H, T, T) = {:?}", self.scores.shape(), s.scores_shape()),
            ));
        }
        if backward && self.dscores.as_ref().map(|t| t.shape()) != Some(&s.scores_shape()[..]) {
            return Err(shape_err(op, format!("the backward pass needs dscores of shape {:?}", s.scores_shape())));
        }
        Ok(())
    }
}

/// [`attention_forward`] as batched matrix products through `scratch` (see the module notes);
/// same inputs, outputs and `lse`. Needs [`AttentionShape::fits_matmul_path`].
#[allow(clippy::too_many_arguments)]
pub fn attention_forward_mm(
    ctx: &Context,
    step: &mut Step,
    s: AttentionShape,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    out: &Tensor,
    lse: &Tensor,
    scratch: &AttentionScratch,
) -> Result<()> {
    const OP: &str = "attention_forward_mm";
    s.check(OP)?;
    if s.q_offset != 0 {
        return Err(shape_err(OP, format!("{s:?}: the matmul path takes training shapes (q_offset 0)")));
    }
    let (b, t, h, kv, d) = (s.batch, s.seq, s.heads, s.kv_heads, s.head_dim);
    let lse = s.lse_part(OP, lse, false)?;
    scratch.check(OP, &s, false)?;
    let docs = scratch.docs(OP, &s)?;
    let hs = |rep| HeadsShape { batch: b, seq: t, heads: h, rep, head_dim: d };
    let bh = |x: &Tensor| x.reshape(&[b * h, t, d]);
    let scale = s.scale;
    heads_forward(ctx, step, hs(1), q, &scratch.q)?;
    heads_forward(ctx, step, hs(h / kv), k, &scratch.k)?;
    heads_forward(ctx, step, hs(h / kv), v, &scratch.v)?;
    // Key-major scores Sᵀ = k·qᵀ·scale (see ops::softmax), so O = P·v reads them transposed.
    matmul(ctx, step, &bh(&scratch.k)?, &bh(&scratch.q)?, &scratch.scores, Matmul::nt().alpha(scale))?;
    softmax_forward(ctx, step, &scratch.scores, &lse, s.window, docs, &scratch.q)?;
    matmul(ctx, step, &scratch.scores, &bh(&scratch.v)?, &bh(&scratch.o)?, Matmul::tn())?;
    heads_backward(ctx, step, hs(1), &scratch.o, out)
}

/// [`attention_backward`] as batched matrix products (the forward's `out` is not needed: the
/// softmax's backward gets `Σ P·dP` from the recomputed P). Writes `dq`, `dk`, `dv`.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward_mm(
    ctx: &Context,
    step: &mut Step,
    s: AttentionShape,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    lse: &Tensor,
    dout: &Tensor,
    dq: &Tensor,
    dk: &Tensor,
    dv: &Tensor,
    scratch: &AttentionScratch,
) -> Result<()> {
    const OP: &str = "attention_backward_mm";
    s.check(OP)?;
    if s.q_offset != 0 {
        return Err(shape_err(OP, format!("{s:?}: the backward pass takes training shapes (q_offset 0)")));
    }
    let (b, t, h, kv, d) = (s.batch, s.seq, s.heads, s.kv_heads, s.head_dim);
    for x in [dq, dk, dv, dout] {
        check_f32(OP, x)?;
    }
    let lse = s.lse_part(OP, lse, false)?;
    scratch.check(OP, &s, true)?;
    let docs = scratch.docs(OP, &s)?;
    let ds = scratch.dscores.as_ref().expect("checked");
    let hs = |rep| HeadsShape { batch: b, seq: t, heads: h, rep, head_dim: d };
    let bh = |x: &Tensor| x.reshape(&[b * h, t, d]);
    let scale = s.scale;
    let (sq, sk, sv, so) = (bh(&scratch.q)?, bh(&scratch.k)?, bh(&scratch.v)?, bh(&scratch.o)?);
    heads_forward(ctx, step, hs(1), q, &scratch.q)?;
    heads_forward(ctx, step, hs(h / kv), k, &scratch.k)?;
    heads_forward(ctx, step, hs(h / kv), v, &scratch.v)?;
    heads_forward(ctx, step, hs(1), dout, &scratch.o)?;
    // Sᵀ again, dPᵀ = v·dOᵀ, then Pᵀ and dSᵀ = Pᵀ ∘ (dPᵀ − Σ P·dP) in place (all key-major).
    matmul(ctx, step, &sk, &sq, &scratch.scores, Matmul::nt().alpha(scale))?;
    matmul(ctx, step, &sv, &so, ds, Matmul::nt())?;
    softmax_backward(ctx, step, &scratch.scores, &lse, ds, s.window, docs, &scratch.v)?;
    // dq = dS·k/√d into v's copy (v is done), dk = dSᵀ·q/√d into k's (k is done once dq is),
    // dv = Pᵀ·dO into q's (q is done once dk is).
    matmul(ctx, step, ds, &sk, &sv, Matmul::tn().alpha(scale))?;
    matmul(ctx, step, ds, &sq, &sk, Matmul::nn().alpha(scale))?;
    matmul(ctx, step, &scratch.scores, &so, &sq, Matmul::nn())?;
    heads_backward(ctx, step, hs(1), &scratch.v, dq)?;
    heads_backward(ctx, step, hs(h / kv), &scratch.k, dk)?;
    heads_backward(ctx, step, hs(h / kv), &scratch.q, dv)
}
