//! The one layer recorder: every part of a decoder block (norm, attention, MLP) with its forward
//! and its backward side by side, as llm.c pairs them, following the block's description
//! ([`crate::model::arch::Block`]). Adapter sites are hooks on the projections ([`Hooks`]). The
//! same code records the training forward, the MLP recomputed in backward, and KV-cache
//! generation (where attention reads a cache, see [`Keys`]).
//!
//! Layouts: a projection is `y = x·Wᵀ` (`nn.Linear`, [`Matmul::nt`]) with input gradient
//! `dx = dy·W`, or, in GPT-2's `Conv1D` layout, `y = x·W` and `dx = dy·Wᵀ`.

use super::params::{BlockParams, Norm};
use super::plan::{Gradients, LayerActivations};
use super::{need, GpuModelError, Result};
use crate::adapter::{Adapter, Proj, SiteBackward};
use crate::gpu::{Context, Step, Tensor};
use crate::model::arch::{Act, NormKind};
use crate::model::config::ModelConfig;
use crate::ops::act::{geglu_backward, geglu_forward, gelu_backward, gelu_forward, swiglu_backward, swiglu_forward};
use crate::ops::attention::{
    attention_backward, attention_backward_mm, attention_forward, attention_forward_in_docs, attention_forward_mm,
    AttentionScratch, AttentionShape,
};
use crate::ops::elementwise::{add_forward, bias_forward, copy_forward};
use crate::ops::matmul::{can_fuse_side, matmul, matmul_side, Matmul, Side};
use crate::ops::norm::{layernorm_backward, layernorm_forward, rmsnorm_backward, rmsnorm_forward};
use crate::ops::rope::{rope_backward_in_docs, rope_forward, rope_forward_in_docs};

/// Where attention finds its keys and values.
#[derive(Clone, Copy)]
pub enum Keys<'a> {
    /// In the batch itself (training, evaluation): `batch` rows of `seq` tokens, through the
    /// batched-matmul path when the recorder has its scratch ([`Recorder::attn`]), else the
    /// fused kernels.
    Batch {
        batch: usize,
        seq: usize,
        /// Each token's position in its document `(batch · seq,)`: packed documents see only
        /// themselves (one document per row when the positions are 0..seq in every row).
        positions: &'a Tensor,
    },
    /// In this layer's KV cache (generation): the new keys and values are written at row `pos`,
    /// and the queries attend to every cached row up to their own.
    Cache { k: &'a Tensor, v: &'a Tensor, pos: usize },
}

/// The adapter's hooks on the projections: which site (if any) a (layer, projection) is, and
/// whether the branch runs in training mode (dropout).
#[derive(Clone, Copy)]
pub struct Hooks<'a> {
    pub adapter: Option<&'a dyn Adapter>,
    pub train: bool,
}

impl Hooks<'_> {
    fn site(&self, layer: usize, proj: Proj) -> Option<(&dyn Adapter, usize)> {
        let a = self.adapter?;
        a.sites().iter().position(|s| s.layer == layer && s.proj == proj).map(|i| (a, i))
    }
}

/// One projection's frozen part: its weight, optional bias, and output.
type Part<'t> = (&'t Tensor, Option<&'t Tensor>, &'t Tensor);
/// One projection part in backward: its weight, its output's gradient, and its output (what
/// the forward pass wrote, bias included; only an adapter that reads it keeps it alive).
type BackPart<'t> = (&'t Tensor, &'t Tensor, &'t Tensor);

/// Records one model's layers.
pub struct Recorder<'a> {
    pub ctx: &'a Context,
    pub config: &'a ModelConfig,
    pub hooks: Hooks<'a>,
    /// Attention's scratch for the batched-matmul path, where planned.
    pub attn: Option<&'a AttentionScratch>,
    /// A batch plan's (batch, seq) and each token's position in its document, for the backward
    /// pass's attention and rotary calls.
    pub docs: Option<(usize, usize, &'a Tensor)>,
}

impl Recorder<'_> {
    fn forward_op(&self) -> Matmul {
        if self.config.block.conv1d {
            Matmul::nn()
        } else {
            Matmul::nt()
        }
    }

    fn backward_op(&self) -> Matmul {
        if self.config.block.conv1d {
            Matmul::nt()
        } else {
            Matmul::nn()
        }
    }

    /// `y = norm(x)`, keeping the statistics backward reads.
    pub(crate) fn norm_forward(
        &self,
        s: &mut Step,
        x: &Tensor,
        n: &Norm,
        y: &Tensor,
        mean: Option<&Tensor>,
        rstd: &Tensor,
    ) -> Result<()> {
        let eps = self.config.norm_eps as f32;
        match (self.config.block.norm, &n.b, mean) {
            (NormKind::Layer, Some(b), Some(mean)) => layernorm_forward(self.ctx, s, x, &n.w, b, eps, y, mean, rstd)?,
            _ => rmsnorm_forward(self.ctx, s, x, &n.w, eps, y, rstd)?,
        }
        Ok(())
    }

    /// `dx = dnorm(dy)` (`+ dresid`, the residual's gradient, when given).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn norm_backward(
        &self,
        s: &mut Step,
        x: &Tensor,
        n: &Norm,
        mean: Option<&Tensor>,
        rstd: &Tensor,
        dy: &Tensor,
        dresid: Option<&Tensor>,
        dx: &Tensor,
    ) -> Result<()> {
        match mean {
            Some(mean) => layernorm_backward(self.ctx, s, x, &n.w, mean, rstd, dy, dresid, dx)?,
            None => rmsnorm_backward(self.ctx, s, x, &n.w, rstd, dy, dresid, dx)?,
        }
        Ok(())
    }

    /// The frozen products of one projection (its parts: GPT-2's c_attn has three), their biases,
    /// and the adapter's branch of its site. The adapter's `z = x·Aᵀ` rides along with the first
    /// part's product where the matmul can fuse it.
    fn proj_forward(&self, s: &mut Step, l: usize, proj: Proj, x: &Tensor, parts: &[Part]) -> Result<()> {
        // The block's inputs are normed activations: f16 operands are fine (cooperative matrices).
        let (ctx, op) = (self.ctx, self.forward_op().coop(true));
        let site = self.hooks.site(l, proj);
        let mut fused = false;
        for (j, (w, _, y)) in parts.iter().enumerate() {
            let side = site.filter(|_| j == 0).and_then(|(a, i)| a.fusable_input_product(i, self.hooks.train));
            match side.map(|(a2, c2)| Side { a2, c2 }).filter(|side| can_fuse_side(ctx, x, w, y, op, *side)) {
                Some(side) => {
                    matmul_side(ctx, s, x, w, y, op, side)?;
                    fused = true;
                }
                None => {
                    matmul(ctx, s, x, w, y, op)?;
                }
            }
        }
        // The branch before the biases: DoRA scales what it is given (W0·x plus its branch), and
        // PEFT's DoRA leaves the bias unscaled.
        if let Some((a, i)) = site {
            let ys: Vec<&Tensor> = parts.iter().map(|(_, _, y)| *y).collect();
            if fused {
                a.forward_fused(ctx, s, i, &ys)?;
            } else {
                a.forward(ctx, s, i, x, &ys, self.hooks.train)?;
            }
        }
        for (_, b, y) in parts {
            if let Some(b) = b {
                bias_forward(ctx, s, b, y)?;
            }
        }
        Ok(())
    }

    /// The input gradient of projections that share the input `x`: `dx = Σ dy·W` over every part
    /// (weight, output gradient, forward output) of every projection, then each adapter's
    /// parameter gradients and `dx += ` its term.
    fn projs_backward(
        &self,
        s: &mut Step,
        l: usize,
        x: &Tensor,
        projs: &[(Proj, &[BackPart])],
        dx: &Tensor,
    ) -> Result<()> {
        let op = self.backward_op();
        // An adapter that scales its site's output (DoRA) hands the frozen product its own
        // output gradients; everyone else's are the model's.
        let mut grads: Vec<Vec<Tensor>> = Vec::with_capacity(projs.len());
        for (proj, parts) in projs {
            let dys: Vec<&Tensor> = parts.iter().map(|(_, dy, _)| *dy).collect();
            let scaled = match self.hooks.site(l, *proj) {
                Some((a, i)) => {
                    let ys: Vec<&Tensor> = parts.iter().map(|(_, _, y)| *y).collect();
                    a.scaled_output_grads(self.ctx, s, i, &ys, &dys)?
                }
                None => None,
            };
            grads.push(scaled.unwrap_or_else(|| dys.into_iter().cloned().collect()));
        }
        let mut first = true;
        for ((_, parts), dys) in projs.iter().zip(&grads) {
            for ((w, _, _), dy) in parts.iter().zip(dys) {
                matmul(self.ctx, s, dy, w, dx, op.accumulate(!first))?;
                first = false;
            }
        }
        for ((proj, parts), dys) in projs.iter().zip(&grads) {
            if let Some((a, i)) = self.hooks.site(l, *proj) {
                let dys: Vec<&Tensor> = dys.iter().collect();
                let ys: Vec<&Tensor> = parts.iter().map(|(_, _, y)| *y).collect();
                a.backward(self.ctx, s, i, &SiteBackward { x, ys: &ys, dys: &dys, dx })?;
            }
        }
        Ok(())
    }

    /// The projection names of this block (GPT-2 names them differently).
    fn projs(&self) -> [Proj; 4] {
        if self.config.block.conv1d {
            [Proj::CAttn, Proj::AttnProj, Proj::Fc, Proj::MlpProj]
        } else {
            [Proj::Q, Proj::O, Proj::Up, Proj::Down]
        }
    }

    /// The RMSNorm of every head of `x` `(N, heads·hd)` with the weight `w` `(hd,)` (q/k norms).
    fn head_norm_forward(&self, s: &mut Step, x: &Tensor, w: &Tensor, y: &Tensor, rstd: Option<&Tensor>) -> Result<()> {
        let hd = w.numel();
        let rows = x.numel() / hd;
        let (xv, yv) = (x.reshape(&[rows, hd])?, y.reshape(&[rows, hd])?);
        let rstd = rstd.ok_or_else(|| GpuModelError::Unsupported("q/k norms without their statistics".into()))?;
        rmsnorm_forward(self.ctx, s, &xv, w, self.config.norm_eps as f32, &yv, rstd)?;
        Ok(())
    }

    /// The gradient through [`Recorder::head_norm_forward`].
    fn head_norm_backward(
        &self,
        s: &mut Step,
        x: &Tensor,
        w: &Tensor,
        rstd: &Tensor,
        dy: &Tensor,
        dx: &Tensor,
    ) -> Result<()> {
        let hd = w.numel();
        let rows = x.numel() / hd;
        let v = |t: &Tensor| t.reshape(&[rows, hd]);
        rmsnorm_backward(self.ctx, s, &v(x)?, w, rstd, &v(dy)?, None, &v(dx)?)?;
        Ok(())
    }

    /// One layer's forward pass: `x_mid = x + attn(norm1(x))`, `x_out = x_mid + mlp(norm2(x_mid))`
    /// (with post-norms: `x + post1(attn(…))` and `x_mid + post2(mlp(…))`).
    #[allow(clippy::too_many_arguments)]
    pub fn layer_forward(
        &self,
        s: &mut Step,
        l: usize,
        p: &BlockParams,
        x: &Tensor,
        la: &LayerActivations,
        keys: Keys,
        x_out: &Tensor,
    ) -> Result<()> {
        self.attn_forward(s, l, p, x, la, keys)?;
        self.norm_forward(s, &la.x_mid, &p.ln2, &la.h2, la.mean2.as_ref(), &la.rstd2)?;
        self.mlp_up_forward(s, l, p, &la.h2, la.gate.as_ref(), &la.up)?;
        self.mlp_down_forward(s, l, p, la)?;
        add_forward(self.ctx, s, &la.x_mid, la.down_normed.as_ref().unwrap_or(&la.down), x_out)?;
        Ok(())
    }

    /// Attention: norm1, q/k/v (+ biases, rotary), attention, o (+ bias), the residual.
    fn attn_forward(
        &self,
        s: &mut Step,
        l: usize,
        p: &BlockParams,
        x: &Tensor,
        la: &LayerActivations,
        keys: Keys,
    ) -> Result<()> {
        let (ctx, c) = (self.ctx, self.config);
        let [qkv, o, ..] = self.projs();
        self.norm_forward(s, x, &p.ln1, &la.h1, la.mean1.as_ref(), &la.rstd1)?;
        let (q, k, v) = ((&p.wq, p.bq.as_ref(), &la.q), (&p.wk, p.bk.as_ref(), &la.k), (&p.wv, p.bv.as_ref(), &la.v));
        if c.block.conv1d {
            self.proj_forward(s, l, qkv, &la.h1, &[q, k, v])?;
        } else {
            for (proj, part) in [(Proj::Q, q), (Proj::K, k), (Proj::V, v)] {
                self.proj_forward(s, l, proj, &la.h1, &[part])?;
            }
        }
        let n = la.h1.shape()[0];
        let (pos, shape, positions) = match keys {
            Keys::Batch { batch, seq, positions } => {
                (0, AttentionShape { docs: true, ..c.attention_shape(l, batch, seq, 0) }, Some(positions))
            }
            Keys::Cache { pos, .. } => (pos, c.attention_shape(l, 1, n, pos), None),
        };
        if let (Some(wq), Some(wk), Some(qn), Some(kn)) = (&p.q_norm, &p.k_norm, &la.q_normed, &la.k_normed) {
            self.head_norm_forward(s, &la.q, wq, qn, la.rstd_q.as_ref())?;
            self.head_norm_forward(s, &la.k, wk, kn, la.rstd_k.as_ref())?;
        }
        if let (Some(q_rot), Some(k_rot), Some(inv_freq)) = (&la.q_rot, &la.k_rot, &p.rope) {
            let (rope_q, rope_k) = c.rope_shapes(shape.seq, pos);
            let (q_in, k_in) = (la.q_normed.as_ref().unwrap_or(&la.q), la.k_normed.as_ref().unwrap_or(&la.k));
            match positions {
                Some(ps) => {
                    rope_forward_in_docs(ctx, s, rope_q, inv_freq, ps, q_in, q_rot)?;
                    rope_forward_in_docs(ctx, s, rope_k, inv_freq, ps, k_in, k_rot)?;
                }
                None => {
                    rope_forward(ctx, s, rope_q, inv_freq, q_in, q_rot)?;
                    rope_forward(ctx, s, rope_k, inv_freq, k_in, k_rot)?;
                }
            }
        }
        let (qa, ka) = la.qk_for_attention();
        match (keys, self.attn) {
            (Keys::Batch { .. }, Some(sc)) => attention_forward_mm(ctx, s, shape, qa, ka, &la.v, &la.att, &la.lse, sc)?,
            (Keys::Batch { .. }, None) => {
                attention_forward_in_docs(ctx, s, shape, qa, ka, &la.v, &la.att, &la.lse, positions)?
            }
            (Keys::Cache { k, v, pos }, _) => {
                let kv = c.num_kv_heads * c.head_dim;
                copy_forward(ctx, s, ka, k, pos * kv)?;
                copy_forward(ctx, s, &la.v, v, pos * kv)?;
                let (kc, vc) = (k.rows(0, pos + n, 4)?, v.rows(0, pos + n, 4)?);
                attention_forward(ctx, s, shape, qa, &kc, &vc, &la.att, &la.lse)?;
            }
        }
        self.proj_forward(s, l, o, &la.att, &[(&p.wo, p.bo.as_ref(), &la.o)])?;
        if let (Some(n), Some(on)) = (&p.post_attn, &la.o_normed) {
            self.norm_forward(s, &la.o, n, on, None, need(&la.rstd_o)?)?;
        }
        add_forward(ctx, s, x, la.o_normed.as_ref().unwrap_or(&la.o), &la.x_mid)?;
        Ok(())
    }

    /// The MLP's up-projections of `h2` (gate and up; GPT-2: c_fc) with their adapters. The
    /// backward pass calls it again to recompute them ([`super::PlanOptions::recompute_mlp`]):
    /// the same kernels on the same inputs give the same values bit for bit.
    pub fn mlp_up_forward(
        &self,
        s: &mut Step,
        l: usize,
        p: &BlockParams,
        h2: &Tensor,
        gate: Option<&Tensor>,
        up: &Tensor,
    ) -> Result<()> {
        let [_, _, up_proj, _] = self.projs();
        if let (Some(wg), Some(gate)) = (&p.w_gate, gate) {
            self.proj_forward(s, l, Proj::Gate, h2, &[(wg, p.b_gate.as_ref(), gate)])?;
        }
        self.proj_forward(s, l, up_proj, h2, &[(&p.w_up, p.b_up.as_ref(), up)])
    }

    /// The activation and the down projection.
    fn mlp_down_forward(&self, s: &mut Step, l: usize, p: &BlockParams, la: &LayerActivations) -> Result<()> {
        let [_, _, _, down] = self.projs();
        match (self.config.block.act, &la.gate) {
            (Act::SwiGlu, Some(gate)) => swiglu_forward(self.ctx, s, gate, &la.up, &la.act)?,
            (Act::GeGluTanh, Some(gate)) => geglu_forward(self.ctx, s, gate, &la.up, &la.act)?,
            _ => gelu_forward(self.ctx, s, &la.up, &la.act)?,
        }
        self.proj_forward(s, l, down, &la.act, &[(&p.w_down, p.b_down.as_ref(), &la.down)])?;
        if let (Some(n), Some(dn)) = (&p.post_mlp, &la.down_normed) {
            self.norm_forward(s, &la.down, n, dn, None, need(&la.rstd_down)?)?;
        }
        Ok(())
    }

    /// One layer's backward pass, from `dx_out` (the gradient of the residual stream leaving the
    /// layer) to `dx_in` (entering it), in exact reverse order of [`Recorder::layer_forward`].
    /// `recompute_h2` says whether the MLP's recomputation must also redo norm2 (unless an
    /// adapter keeps its output).
    #[allow(clippy::too_many_arguments)]
    pub fn layer_backward(
        &self,
        s: &mut Step,
        l: usize,
        p: &BlockParams,
        x: &Tensor,
        la: &LayerActivations,
        g: &Gradients,
        dx_out: &Tensor,
        dx_in: &Tensor,
        recompute_h2: bool,
    ) -> Result<()> {
        self.mlp_backward(s, l, p, la, g, dx_out, recompute_h2)?;
        self.attn_backward(s, l, p, x, la, g, dx_in)
    }

    /// MLP: down, the activation, the up-projections, norm2 (+ the residual), into `g.d_xmid`.
    #[allow(clippy::too_many_arguments)]
    fn mlp_backward(
        &self,
        s: &mut Step,
        l: usize,
        p: &BlockParams,
        la: &LayerActivations,
        g: &Gradients,
        dxo: &Tensor,
        recompute_h2: bool,
    ) -> Result<()> {
        let [_, _, up_proj, down] = self.projs();
        let (h2, gate, up) = match &la.recomputed {
            None => (&la.h2, la.gate.as_ref(), &la.up),
            Some(rc) => {
                if recompute_h2 {
                    self.norm_forward(s, &la.x_mid, &p.ln2, &rc.h2, la.mean2.as_ref(), &la.rstd2)?;
                }
                self.mlp_up_forward(s, l, p, &rc.h2, rc.gate.as_ref(), &rc.up)?;
                (&rc.h2, rc.gate.as_ref(), &rc.up)
            }
        };
        // Through the post-MLP norm (where the block has one) to the down projection's output.
        let d_down = match (&p.post_mlp, &g.d_down) {
            (Some(n), Some(d_down)) => {
                self.norm_backward(s, &la.down, n, None, need(&la.rstd_down)?, dxo, None, d_down)?;
                d_down
            }
            _ => dxo,
        };
        self.projs_backward(s, l, &la.act, &[(down, &[(&p.w_down, d_down, &la.down)])], &g.d_act)?;
        match (self.config.block.act, gate, &g.d_gate) {
            (Act::SwiGlu, Some(gate), Some(d_gate)) => {
                swiglu_backward(self.ctx, s, gate, up, &g.d_act, d_gate, &g.d_up)?
            }
            (Act::GeGluTanh, Some(gate), Some(d_gate)) => {
                geglu_backward(self.ctx, s, gate, up, &g.d_act, d_gate, &g.d_up)?
            }
            _ => gelu_backward(self.ctx, s, up, &g.d_act, &g.d_up)?,
        }
        match (&p.w_gate, &g.d_gate, gate) {
            (Some(wg), Some(dg), Some(gate)) => {
                let projs = [(Proj::Gate, &[(wg, dg, gate)][..]), (up_proj, &[(&p.w_up, &g.d_up, up)][..])];
                self.projs_backward(s, l, h2, &projs, &g.d_h)?
            }
            _ => self.projs_backward(s, l, h2, &[(up_proj, &[(&p.w_up, &g.d_up, up)])], &g.d_h)?,
        }
        self.norm_backward(s, &la.x_mid, &p.ln2, la.mean2.as_ref(), &la.rstd2, &g.d_h, Some(dxo), &g.d_xmid)
    }

    /// Attention: o, attention, rotary, q/k/v, norm1 (+ the residual), into `dx_in`.
    #[allow(clippy::too_many_arguments)]
    fn attn_backward(
        &self,
        s: &mut Step,
        l: usize,
        p: &BlockParams,
        x: &Tensor,
        la: &LayerActivations,
        g: &Gradients,
        dx_in: &Tensor,
    ) -> Result<()> {
        let (ctx, c) = (self.ctx, self.config);
        let [qkv, o, ..] = self.projs();
        // Through the post-attention norm (where the block has one) to o's output.
        let d_o = match (&p.post_attn, &g.d_o) {
            (Some(n), Some(d_o)) => {
                self.norm_backward(s, &la.o, n, None, need(&la.rstd_o)?, &g.d_xmid, None, d_o)?;
                d_o
            }
            _ => &g.d_xmid,
        };
        self.projs_backward(s, l, &la.att, &[(o, &[(&p.wo, d_o, &la.o)])], &g.d_att)?;
        let (b, t, positions) =
            self.docs.ok_or_else(|| GpuModelError::Unsupported("backward without a batch".into()))?;
        let shape = AttentionShape { docs: true, ..c.attention_shape(l, b, t, 0) };
        let (qa, ka) = la.qk_for_attention();
        let (dqa, dka) = g.dqk_of_attention();
        match self.attn {
            Some(sc) => attention_backward_mm(ctx, s, shape, qa, ka, &la.v, &la.lse, &g.d_att, dqa, dka, &g.d_v, sc)?,
            None => {
                attention_backward(ctx, s, shape, qa, ka, &la.v, &la.att, &la.lse, &g.d_att, dqa, dka, &g.d_v, &g.dsum)?
            }
        }
        // Rotary, then the q/k norms, back to the projections' outputs.
        let (dq_in, dk_in) = match (&g.d_qn, &g.d_kn) {
            (Some(dqn), Some(dkn)) => (dqn, dkn),
            _ => (&g.d_q, &g.d_k),
        };
        if let Some(inv_freq) = &p.rope {
            let (rope_q, rope_k) = c.rope_shapes(t, 0);
            rope_backward_in_docs(ctx, s, rope_q, inv_freq, positions, dqa, dq_in)?;
            rope_backward_in_docs(ctx, s, rope_k, inv_freq, positions, dka, dk_in)?;
        }
        if let (Some(wq), Some(wk), Some(dqn), Some(dkn)) = (&p.q_norm, &p.k_norm, &g.d_qn, &g.d_kn) {
            self.head_norm_backward(s, &la.q, wq, need(&la.rstd_q)?, dqn, &g.d_q)?;
            self.head_norm_backward(s, &la.k, wk, need(&la.rstd_k)?, dkn, &g.d_k)?;
        }
        let (q, k, v) = ([(&p.wq, &g.d_q, &la.q)], [(&p.wk, &g.d_k, &la.k)], [(&p.wv, &g.d_v, &la.v)]);
        if c.block.conv1d {
            let all = [q[0], k[0], v[0]];
            self.projs_backward(s, l, &la.h1, &[(qkv, &all)], &g.d_h)?;
        } else {
            self.projs_backward(s, l, &la.h1, &[(Proj::Q, &q), (Proj::K, &k), (Proj::V, &v)], &g.d_h)?;
        }
        self.norm_backward(s, x, &p.ln1, la.mean1.as_ref(), &la.rstd1, &g.d_h, Some(&g.d_xmid), dx_in)
    }
}
