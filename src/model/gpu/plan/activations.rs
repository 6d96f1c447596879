//! The tensors of a step's memory: each layer's activations, the whole forward pass's, and the
//! backward pass's gradients, as plain structures; how they are laid out is in the parent module.

use crate::gpu::{Context, DType, Tensor};
use crate::model::arch::NormKind;
use crate::model::config::ModelConfig;
use crate::model::gpu::{GpuModelError, Result};
// Only the docs link to it.
#[cfg(doc)]
use crate::model::gpu::PlanOptions;
use crate::ops::attention::AttentionScratch;

/// One layer's activations for a batch of N = B·T tokens. Optional fields exist where the block
/// has that part. (Generic only so that the planner can build the same structure of request ids
/// first; everywhere else `T` is [`Tensor`].)
#[derive(Clone)]
pub struct LayerActivations<T = Tensor> {
    pub h1: T,                  // (N, C)    norm1(x)
    pub mean1: Option<T>,       // (N,)      LayerNorm mean
    pub rstd1: T,               // (N,)
    pub q: T,                   // (N, H·hd)  (before the q/k norms and rotary)
    pub k: T,                   // (N, KV·hd)
    pub v: T,                   // (N, KV·hd)
    pub q_normed: Option<T>,    // (N, H·hd)  q/k-norm blocks: each head of q normalised
    pub k_normed: Option<T>,    // (N, KV·hd)
    pub rstd_q: Option<T>,      // (N·H,)
    pub rstd_k: Option<T>,      // (N·KV,)
    pub q_rot: Option<T>,       // (N, H·hd)  rotary blocks
    pub k_rot: Option<T>,       // (N, KV·hd) rotary blocks
    pub att: T,                 // (N, H·hd)  attention output before the output projection
    pub lse: T,                 // (B·H·T + B·T,): log-sum-exp per query row, then each token's document start
    pub o: T,                   // (N, C)    output projection
    pub o_normed: Option<T>,    // (N, C)  post-norm blocks: norm(o)
    pub rstd_o: Option<T>,      // (N,)
    pub x_mid: T,               // (N, C)    x + o (or + norm(o))
    pub h2: T,                  // (N, C)    norm2(x_mid)
    pub mean2: Option<T>,       // (N,)      LayerNorm mean
    pub rstd2: T,               // (N,)
    pub gate: Option<T>,        // (N, F)    gated MLPs: the gate projection's output
    pub up: T,                  // (N, F)    the up projection's output (GPT-2: c_fc, before GELU)
    pub act: T,                 // (N, F)    the activation (SwiGLU: silu(gate)·up; GELU: gelu(up))
    pub down: T,                // (N, C)
    pub down_normed: Option<T>, // (N, C)  post-norm blocks: norm(down)
    pub rstd_down: Option<T>,   // (N,)
    /// With [`PlanOptions::recompute_mlp`]: where the backward pass recomputes the MLP's inputs.
    pub recomputed: Option<Recomputed<T>>,
}

/// What the backward pass recomputes instead of keeping (activation checkpointing of the MLP):
/// the second norm's output (unless an adapter keeps it) and the up-projections from it.
#[derive(Clone)]
pub struct Recomputed<T = Tensor> {
    pub h2: T,           // (N, C)  norm2(x_mid) again; the kept `h2` when an adapter keeps it
    pub gate: Option<T>, // (N, F)
    pub up: T,           // (N, F)
}

/// `--activations f16` ([`super::PlanOptions::activations_f16`]): what one layer's backward pass
/// reads of its forward pass (found in a trace of the step, not listed by hand) kept as half
/// floats in between: packed after the layer's forward pass, widened again just before its
/// backward pass, so that only one layer's activations are ever f32 at a time.
#[derive(Clone)]
pub struct LayerHalves<T = Tensor> {
    /// (the f32 the forward pass writes, its f16 copy, the f32 the backward pass reads).
    pub kept: Vec<(T, T, T)>,
    /// The layer's activations as its backward pass sees them: the widened tensors in place of
    /// the kept ones.
    pub back: LayerActivations<T>,
    /// The residual stream entering the layer, as the backward pass sees it.
    pub x: T,
}

impl<T: Clone> LayerActivations<T> {
    /// Every tensor of the layer, in field order.
    pub(super) fn all(&self) -> Vec<T> {
        let mut all = Vec::new();
        self.clone().map(|t| all.push(t));
        all
    }
}

impl<T> LayerActivations<T> {
    pub(in crate::model::gpu) fn map<U>(self, mut f: impl FnMut(T) -> U) -> LayerActivations<U> {
        LayerActivations {
            h1: f(self.h1),
            mean1: self.mean1.map(&mut f),
            rstd1: f(self.rstd1),
            q: f(self.q),
            k: f(self.k),
            v: f(self.v),
            q_normed: self.q_normed.map(&mut f),
            k_normed: self.k_normed.map(&mut f),
            rstd_q: self.rstd_q.map(&mut f),
            rstd_k: self.rstd_k.map(&mut f),
            q_rot: self.q_rot.map(&mut f),
            k_rot: self.k_rot.map(&mut f),
            att: f(self.att),
            lse: f(self.lse),
            o: f(self.o),
            o_normed: self.o_normed.map(&mut f),
            rstd_o: self.rstd_o.map(&mut f),
            x_mid: f(self.x_mid),
            h2: f(self.h2),
            mean2: self.mean2.map(&mut f),
            rstd2: f(self.rstd2),
            gate: self.gate.map(&mut f),
            up: f(self.up),
            act: f(self.act),
            down: f(self.down),
            down_normed: self.down_normed.map(&mut f),
            rstd_down: self.rstd_down.map(&mut f),
            recomputed: self.recomputed.map(|r| Recomputed { h2: f(r.h2), gate: r.gate.map(&mut f), up: f(r.up) }),
        }
    }
}

impl LayerActivations {
    /// One layer's activations for up to `rows` new tokens at a time, shared by every layer
    /// (generation keeps nothing for a backward pass); `lse` is `(H · rows,)`, viewed as
    /// `(1, H, n)` by [`LayerActivations::first_rows`].
    pub fn scratch(ctx: &Context, c: &ModelConfig, rows: usize) -> Result<LayerActivations> {
        let (h, q, kv, f) = (c.hidden_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.intermediate_size);
        let b = c.block;
        let (layer_norm, rope, gated, qkn, post) =
            (b.norm == NormKind::Layer, b.rope, b.act.gated(), b.qk_norm, b.post_norms);
        let (heads, kv_heads) = (c.num_heads, c.num_kv_heads);
        let t = |label: &str, shape: &[usize]| ctx.tensor(label, shape, DType::F32);
        let opt = |on: bool, label: &str, shape: &[usize]| on.then(|| t(label, shape)).transpose();
        Ok(LayerActivations {
            h1: t("h1", &[rows, h])?,
            mean1: opt(layer_norm, "mean1", &[rows])?,
            rstd1: t("rstd1", &[rows])?,
            q: t("q", &[rows, q])?,
            k: t("k", &[rows, kv])?,
            v: t("v", &[rows, kv])?,
            q_normed: opt(qkn, "q_normed", &[rows, q])?,
            k_normed: opt(qkn, "k_normed", &[rows, kv])?,
            rstd_q: opt(qkn, "rstd_q", &[rows * heads])?,
            rstd_k: opt(qkn, "rstd_k", &[rows * kv_heads])?,
            q_rot: opt(rope, "q_rot", &[rows, q])?,
            k_rot: opt(rope, "k_rot", &[rows, kv])?,
            att: t("att", &[rows, q])?,
            lse: t("lse", &[c.num_heads * rows])?,
            o: t("o", &[rows, h])?,
            o_normed: opt(post, "o_normed", &[rows, h])?,
            rstd_o: opt(post, "rstd_o", &[rows])?,
            x_mid: t("x_mid", &[rows, h])?,
            h2: t("h2", &[rows, h])?,
            mean2: opt(layer_norm, "mean2", &[rows])?,
            rstd2: t("rstd2", &[rows])?,
            gate: opt(gated, "gate", &[rows, f])?,
            up: t("up", &[rows, f])?,
            act: t("act", &[rows, f])?,
            down: t("down", &[rows, h])?,
            down_normed: opt(post, "down_normed", &[rows, h])?,
            rstd_down: opt(post, "rstd_down", &[rows])?,
            recomputed: None,
        })
    }

    /// Views of the first `n` rows of a [`LayerActivations::scratch`] (`lse` as `(1, H, n)`).
    pub fn first_rows(&self, n: usize, heads: usize) -> Result<LayerActivations> {
        // Views of the first rows start at offset 0, so they need no alignment care.
        let r = |t: &Tensor| t.rows(0, n, 4).map_err(GpuModelError::from);
        let o = |t: &Option<Tensor>| t.as_ref().map(r).transpose();
        // Per-head statistics: n rows of `heads` entries each.
        let per_head = |t: &Option<Tensor>, heads: usize| t.as_ref().map(|t| t.rows(0, n * heads, 4)).transpose();
        let kv_heads = heads * self.k.shape()[1] / self.q.shape()[1];
        Ok(LayerActivations {
            h1: r(&self.h1)?,
            mean1: o(&self.mean1)?,
            rstd1: r(&self.rstd1)?,
            q: r(&self.q)?,
            k: r(&self.k)?,
            v: r(&self.v)?,
            q_normed: o(&self.q_normed)?,
            k_normed: o(&self.k_normed)?,
            rstd_q: per_head(&self.rstd_q, heads)?,
            rstd_k: per_head(&self.rstd_k, kv_heads)?,
            q_rot: o(&self.q_rot)?,
            k_rot: o(&self.k_rot)?,
            att: r(&self.att)?,
            lse: self.lse.rows(0, heads * n, 4)?.reshape(&[1, heads, n])?,
            o: r(&self.o)?,
            o_normed: o(&self.o_normed)?,
            rstd_o: o(&self.rstd_o)?,
            x_mid: r(&self.x_mid)?,
            h2: r(&self.h2)?,
            mean2: o(&self.mean2)?,
            rstd2: r(&self.rstd2)?,
            gate: o(&self.gate)?,
            up: r(&self.up)?,
            act: r(&self.act)?,
            down: r(&self.down)?,
            down_normed: o(&self.down_normed)?,
            rstd_down: o(&self.rstd_down)?,
            recomputed: None,
        })
    }

    /// The queries and keys attention reads: after rotary in rotary blocks.
    pub fn qk_for_attention(&self) -> (&Tensor, &Tensor) {
        match (&self.q_rot, &self.k_rot) {
            (Some(q), Some(k)) => (q, k),
            _ => (&self.q, &self.k),
        }
    }
}

/// Every activation of one forward pass, sized from the config and (batch, seq).
pub struct Activations {
    pub batch: usize,
    pub seq: usize,
    pub ids: Tensor,         // (N,) u32
    pub targets: Tensor,     // (N,) u32, IGNORE where nothing is predicted
    pub pos_ids: Tensor,     // (N,) u32 each token's position in its document
    pub emb: Option<Tensor>, // (N, C) token embeddings before positions are added
    pub pos: Option<Tensor>, // (N, C) position embeddings
    pub x: Vec<Tensor>,      // L+1 × (N, C): the residual stream entering each layer, and the last
    pub layers: Vec<LayerActivations>,
    /// Per layer, with `--activations f16`: what is kept as f16 (empty otherwise).
    pub halves: Vec<LayerHalves>,
    pub hf: Tensor,            // (N, C)  final norm
    pub meanf: Option<Tensor>, // (N,)    LayerNorm
    pub rstdf: Tensor,         // (N,)
    /// (rows, V) logits of one chunk of rows at a time: the vocabulary-sized activation is the
    /// largest, so the LM head and the loss run chunk by chunk through this one buffer.
    pub logits: Tensor,
    pub chunk_rows: usize,
    /// (splits × chunk_rows, C): the LM head's input gradient summed over this many slices of the
    /// vocabulary in parallel (see [`super::PlanOptions::head_splits`]); `None` where it is not.
    pub head_partials: Option<Tensor>,
    pub loss_rows: Tensor, // (N,) per-position loss, 0 where ignored
    pub lse_rows: Tensor,  // (N,)
    pub loss_sum: Tensor,  // (1,)
    /// (1,) 1 / the batch's predicted positions: the backward pass's loss scale (the loss is the
    /// mean over predicted positions, as transformers computes it with ignored labels).
    pub loss_scale: Tensor,
    /// Attention's scratch when it runs as batched matrix products (see ops::attention); `None`
    /// where the fused kernels run instead.
    pub attn: Option<AttentionScratch>,
    /// Bytes of activations the backward pass reads (per-layer tensors and the residual streams).
    pub kept_bytes: u64,
    /// Bytes of the buffers the planner allocated for activations and gradients, and what one
    /// buffer per tensor would have taken.
    pub planned_bytes: u64,
    pub unshared_bytes: u64,
}

impl Activations {
    /// The vocabulary slices of the LM head's split input gradient (0: not split).
    pub fn head_splits(&self) -> usize {
        self.head_partials.as_ref().map_or(0, |p| p.shape()[0] / self.chunk_rows)
    }
}

/// Gradients of the loss with respect to activations (the base weights get none: they are
/// frozen). Scratch tensors serve every layer, since the backward pass visits the layers one at a
/// time; `dx[l]` carries the gradient from layer l to layer l − 1 (the planner lets the `dx` of
/// layers two apart share memory unless [`PlanOptions::keep_layer_grads`] keeps them all).
#[derive(Clone)]
pub struct Gradients<T = Tensor> {
    pub dx: Vec<T>,        // L+1 × (N, C): d loss / d residual stream entering layer l (dx[L]: the final norm)
    pub dhf: T,            // (N, C)
    pub d_xmid: T,         // (N, C)
    pub d_h: T,            // (N, C)
    pub d_act: T,          // (N, F)
    pub d_gate: Option<T>, // (N, F) gated MLPs
    pub d_up: T,           // (N, F)
    pub d_att: T,          // (N, H·hd)
    pub d_o: Option<T>,    // (N, C) post-norm blocks: the gradient of o (before its norm)
    pub d_down: Option<T>, // (N, C) post-norm blocks
    pub d_qn: Option<T>,   // (N, H·hd) q/k-norm blocks: the gradient of the normed q
    pub d_kn: Option<T>,   // (N, KV·hd)
    pub d_qrot: Option<T>, // (N, H·hd) rotary blocks
    pub d_q: T,            // (N, H·hd)
    pub d_krot: Option<T>, // (N, KV·hd) rotary blocks
    pub d_k: T,            // (N, KV·hd)
    pub d_v: T,            // (N, KV·hd)
    pub dsum: T,           // (B, H, T) attention backward scratch
}

impl<T> Gradients<T> {
    pub(super) fn map<U>(self, mut f: impl FnMut(T) -> U) -> Gradients<U> {
        Gradients {
            dx: self.dx.into_iter().map(&mut f).collect(),
            dhf: f(self.dhf),
            d_xmid: f(self.d_xmid),
            d_h: f(self.d_h),
            d_act: f(self.d_act),
            d_gate: self.d_gate.map(&mut f),
            d_up: f(self.d_up),
            d_att: f(self.d_att),
            d_o: self.d_o.map(&mut f),
            d_down: self.d_down.map(&mut f),
            d_qn: self.d_qn.map(&mut f),
            d_kn: self.d_kn.map(&mut f),
            d_qrot: self.d_qrot.map(&mut f),
            d_q: f(self.d_q),
            d_krot: self.d_krot.map(&mut f),
            d_k: f(self.d_k),
            d_v: f(self.d_v),
            dsum: f(self.dsum),
        }
    }
}

impl Gradients {
    /// The gradients attention writes for q and k: before rotary's backward in rotary blocks.
    pub fn dqk_of_attention(&self) -> (&Tensor, &Tensor) {
        match (&self.d_qrot, &self.d_krot) {
            (Some(q), Some(k)) => (q, k),
            _ => (&self.d_q, &self.d_k),
        }
    }
}
