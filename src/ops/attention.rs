//! Causal grouped-query attention (shaders/attention.wgsl).

use super::{check_f32, check_numel, grid_for, shape_err, uniform};
use crate::gpu::{kernel_sources, Arg, Context, KernelSpec, Result, Step, Tensor};

#[derive(encase::ShaderType)]
struct Params {
    batch: u32,
    seq: u32,
    heads: u32,
    kv_heads: u32,
    head_dim: u32,
    gx: u32,
    scale: f32,
    kv_seq: u32,
    q_offset: u32,
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
}

impl AttentionShape {
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

    /// The kernel's uniforms for a grid `gx` workgroups wide.
    fn params(&self, gx: u32) -> Params {
        Params {
            batch: self.batch as u32,
            seq: self.seq as u32,
            heads: self.heads as u32,
            kv_heads: self.kv_heads as u32,
            head_dim: self.head_dim as u32,
            gx,
            scale: 1.0 / (self.head_dim as f32).sqrt(),
            kv_seq: (self.q_offset + self.seq) as u32,
            q_offset: self.q_offset as u32,
        }
    }
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
    const OP: &str = "attention_forward";
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
    check_numel(OP, lse, b * h * t, "(B, H, T)")?;
    let groups = grid_for(ctx, b * h * t, 64);
    let params = s.params(groups[0]);
    let spec = KernelSpec::new(&kernel_sources::ATTENTION, OP);
    let args = [
        Arg::Uniform(uniform(OP, &params)?),
        Arg::Read(q),
        Arg::Read(k),
        Arg::Read(v),
        Arg::Write(out),
        Arg::Write(lse),
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
    check_numel(OP, lse, b * h * t, "(B, H, T)")?;
    check_numel(OP, dsum, b * h * t, "(B, H, T)")?;
    let groups_q = grid_for(ctx, b * h * t, 64);
    let groups_kv = grid_for(ctx, b * kv * t, 64);
    let params = |gx| s.params(gx);
    let spec = KernelSpec::new(&kernel_sources::ATTENTION, "attention_backward_dq");
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
    let spec = KernelSpec::new(&kernel_sources::ATTENTION, "attention_backward_dkv");
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
