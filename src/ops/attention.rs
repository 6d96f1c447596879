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
            scale: 1.0 / (self.head_dim as f32).sqrt(),
            kv_seq: (self.q_offset + self.seq) as u32,
            q_offset: self.q_offset as u32,
        }
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
    let (spec, groups) = s.spec(ctx, OP, h);
    let params = s.params(groups[0]);
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
