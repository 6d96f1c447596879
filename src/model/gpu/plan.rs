//! The memory of a step, planned up front from the config and (batch, seq): every activation and,
//! for training, every activation gradient, laid out by lifetime through [`crate::gpu::plan`], so
//! a tensor holds its value only between the phases that write and read it.

use super::{GpuModelError, PlanOptions, Result};
use crate::adapter::Input;
use crate::gpu::plan::{Lifetime, Planner};
use crate::gpu::{Context, DType, Tensor};
use crate::model::arch::NormKind;
use crate::model::config::ModelConfig;
use crate::ops::attention::AttentionScratch;

/// The logits buffer's budget (see [`plan`]).
const LOGIT_CHUNK_BYTES: u64 = 32 << 20;
/// The budget of attention's score matrices on the matmul path (see [`plan`]).
const ATTENTION_SCORES_BYTES: u64 = 32 << 20;

/// One layer's activations for a batch of N = B·T tokens. Optional fields exist where the block
/// has that part. (Generic only so that the planner can build the same structure of request ids
/// first; everywhere else `T` is [`Tensor`].)
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
    pub lse: T,                 // (B, H, T)  softmax log-sum-exp per query row
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
pub struct Recomputed<T = Tensor> {
    pub h2: T,           // (N, C)  norm2(x_mid) again; the kept `h2` when an adapter keeps it
    pub gate: Option<T>, // (N, F)
    pub up: T,           // (N, F)
}

impl<T> LayerActivations<T> {
    pub(super) fn map<U>(self, mut f: impl FnMut(T) -> U) -> LayerActivations<U> {
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
    /// `(H, n)` by [`LayerActivations::first_rows`].
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
    pub ids: Tensor,             // (N,) u32
    pub targets: Tensor,         // (N,) u32, IGNORE where nothing is predicted
    pub pos_ids: Option<Tensor>, // (N,) u32 positions, learned-position blocks
    pub emb: Option<Tensor>,     // (N, C) token embeddings before positions are added
    pub pos: Option<Tensor>,     // (N, C) position embeddings
    pub x: Vec<Tensor>,          // L+1 × (N, C): the residual stream entering each layer, and the last
    pub layers: Vec<LayerActivations>,
    pub hf: Tensor,            // (N, C)  final norm
    pub meanf: Option<Tensor>, // (N,)    LayerNorm
    pub rstdf: Tensor,         // (N,)
    /// (rows, V) logits of one chunk of rows at a time: the vocabulary-sized activation is the
    /// largest, so the LM head and the loss run chunk by chunk through this one buffer.
    pub logits: Tensor,
    pub chunk_rows: usize,
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

/// Gradients of the loss with respect to activations (the base weights get none: they are
/// frozen). Scratch tensors serve every layer, since the backward pass visits the layers one at a
/// time; `dx[l]` carries the gradient from layer l to layer l − 1 (the planner lets the `dx` of
/// layers two apart share memory unless [`PlanOptions::keep_layer_grads`] keeps them all).
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
    fn map<U>(self, mut f: impl FnMut(T) -> U) -> Gradients<U> {
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

/// How many logit rows are computed at a time: as many as fit 32 MiB (and one storage binding),
/// a multiple of 64 rows so that every chunk's offset into the (N, C) activations is 256-byte
/// aligned. Larger chunks gain nothing measurable (SmolLM2, 512 rows: 11.16 s of GPU time per
/// step in one chunk, 11.18 s in chunks of 128) and would hold 96 MiB instead of 24.
fn chunk_rows(ctx: &Context, c: &ModelConfig, n: usize, asked: Option<usize>) -> Result<usize> {
    let row_bytes = (c.vocab_size * 4) as u64;
    let fit = (ctx.limits().max_storage_binding.min(LOGIT_CHUNK_BYTES) / row_bytes).max(1) as usize;
    Ok(match asked {
        Some(r) if r > 0 && r % 64 == 0 => r.min(n),
        Some(r) => {
            return Err(GpuModelError::Unsupported(format!("logit chunks of {r} rows: use a positive multiple of 64")))
        }
        None if fit >= n => n,
        None => (fit / 64 * 64).max(64).min(n),
    })
}

/// Plans every activation (and, for training, every gradient) of a step of `batch` rows of
/// `seq` tokens through the lifetime planner ([`crate::gpu::plan`]).
///
/// Phases, in step order: layer l's forward is phase l (the embedding belongs to phase 0);
/// the head (final norm, LM head, loss and, in training, their backward) is phase L; layer
/// l's backward is phase 2L − l. What a layer's backward reads lives from its forward phase
/// to its backward phase; the rest lives one phase, so that the layers' q-before-rotary (say)
/// share one buffer, the residual-stream gradients alternate between two, and the backward
/// scratch reuses the logits' memory.
pub(super) fn plan(
    ctx: &Context,
    c: &ModelConfig,
    batch: usize,
    seq: usize,
    opts: &PlanOptions,
) -> Result<(Activations, Option<Gradients>)> {
    let _kind = ctx.alloc_kind("activations");
    let n = batch * seq;
    let nl = c.num_layers;
    let (h, q, kv, f) = (c.hidden_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.intermediate_size);
    let b = c.block;
    let (layer_norm, rope, gated, qkn, post) =
        (b.norm == NormKind::Layer, b.rope, b.act.gated(), b.qk_norm, b.post_norms);
    let (heads, kv_heads) = (c.num_heads, c.num_kv_heads);
    let train = opts.backward;
    let (head, end) = (nl, if train { 2 * nl } else { nl });
    // The phase in which layer l's backward reads what its forward kept (the head reads the
    // last residual stream; without a backward pass, a layer reads only its own).
    let back = |l: usize| if train { 2 * nl - l } else { l };
    let keep = |i: Input| train && opts.keep_inputs.contains(&i);
    let recompute = train && opts.recompute_mlp;
    let mut p = Planner::new();
    let mut add = |label: &str, shape: &[usize], first: usize, last: usize| {
        p.add(label, shape, DType::F32, Lifetime::new(first, last))
    };
    let x: Vec<usize> = (0..=nl).map(|l| add("x", &[n, h], l.saturating_sub(1), back(l))).collect();
    let learned = (!rope).then(|| add("pos", &[n, h], 0, 0));
    // Token embeddings before positions are added or the embedding scale is applied.
    let emb = (!rope || b.embed_scale).then(|| add("emb", &[n, h], 0, 0));
    let mut layers = Vec::with_capacity(nl);
    for l in 0..nl {
        let kept = back(l);
        let input = |i: Input| if keep(i) { kept } else { l };
        // Without rotary, attention's backward reads q and k themselves; with q/k norms, their
        // backward does.
        let qk = if rope && !qkn { l } else { kept };
        // With post-norms, their backward reads the projections' outputs.
        let proj_out = if post { kept } else { l };
        let mlp = if recompute { l } else { kept };
        let h2 = add("h2", &[n, h], l, input(Input::H2));
        layers.push(LayerActivations {
            h1: add("h1", &[n, h], l, input(Input::H1)),
            mean1: layer_norm.then(|| add("mean1", &[n], l, kept)),
            rstd1: add("rstd1", &[n], l, kept),
            q: add("q", &[n, q], l, qk),
            k: add("k", &[n, kv], l, qk),
            v: add("v", &[n, kv], l, kept),
            q_normed: qkn.then(|| add("q_normed", &[n, q], l, l)),
            k_normed: qkn.then(|| add("k_normed", &[n, kv], l, l)),
            rstd_q: qkn.then(|| add("rstd_q", &[n * heads], l, kept)),
            rstd_k: qkn.then(|| add("rstd_k", &[n * kv_heads], l, kept)),
            q_rot: rope.then(|| add("q_rot", &[n, q], l, kept)),
            k_rot: rope.then(|| add("k_rot", &[n, kv], l, kept)),
            att: add("att", &[n, q], l, kept),
            lse: add("lse", &[batch, c.num_heads, seq], l, kept),
            o: add("o", &[n, h], l, proj_out),
            o_normed: post.then(|| add("o_normed", &[n, h], l, l)),
            rstd_o: post.then(|| add("rstd_o", &[n], l, kept)),
            x_mid: add("x_mid", &[n, h], l, kept),
            h2,
            mean2: layer_norm.then(|| add("mean2", &[n], l, kept)),
            rstd2: add("rstd2", &[n], l, kept),
            gate: gated.then(|| add("gate", &[n, f], l, mlp)),
            up: add("up", &[n, f], l, mlp),
            act: add("act", &[n, f], l, input(Input::Act)),
            down: add("down", &[n, h], l, proj_out),
            down_normed: post.then(|| add("down_normed", &[n, h], l, l)),
            rstd_down: post.then(|| add("rstd_down", &[n], l, kept)),
            recomputed: recompute.then(|| Recomputed {
                h2: if keep(Input::H2) { h2 } else { add("h2 (recomputed)", &[n, h], kept, kept) },
                gate: gated.then(|| add("gate (recomputed)", &[n, f], kept, kept)),
                up: add("up (recomputed)", &[n, f], kept, kept),
            }),
        });
    }
    let chunk_rows = chunk_rows(ctx, c, n, opts.logit_chunk_rows)?;
    // Attention as batched matrix products where its score matrices fit 32 MiB (the fused
    // kernels otherwise; PORTALORA_ATTENTION=fused forces them, for comparisons).
    let shape = c.attention_shape(0, batch, seq, 0);
    let fused = std::env::var("PORTALORA_ATTENTION").is_ok_and(|v| v == "fused");
    let attn = (!fused && shape.fits_matmul_path(ctx, ATTENTION_SCORES_BYTES)).then(|| {
        let (hm, ss) = (shape.head_major_shape(), shape.scores_shape());
        (
            [
                add("attention q (head-major)", &hm, 0, end),
                add("attention k (head-major)", &hm, 0, end),
                add("attention v (head-major)", &hm, 0, end),
                add("attention out (head-major)", &hm, 0, end),
                add("attention scores", &ss, 0, end),
            ],
            train.then(|| add("attention dscores", &ss, head + 1, end)),
        )
    });
    let hf = add("hf", &[n, h], head, head);
    let rstdf = add("rstdf", &[n], head, head);
    let meanf = layer_norm.then(|| add("meanf", &[n], head, head));
    let logits = add("logits", &[chunk_rows, c.vocab_size], head, head);
    let grads = train.then(|| {
        // dx[l] is written by layer l's backward (dx[L] by the head) and read by layer l − 1's.
        let dx_last = |l: usize| if opts.keep_layer_grads || l == 0 { end } else { back(l) + 1 };
        let dx = (0..=nl).map(|l| add("dx", &[n, h], back(l), dx_last(l))).collect();
        let dhf = add("dhf", &[n, h], head, head);
        // Scratch for every layer's backward pass.
        let mut scratch = |label: &str, shape: &[usize]| add(label, shape, head + 1, end);
        Gradients {
            dx,
            dhf,
            d_xmid: scratch("d_xmid", &[n, h]),
            d_h: scratch("d_h", &[n, h]),
            d_act: scratch("d_act", &[n, f]),
            d_gate: gated.then(|| scratch("d_gate", &[n, f])),
            d_up: scratch("d_up", &[n, f]),
            d_att: scratch("d_att", &[n, q]),
            d_o: post.then(|| scratch("d_o", &[n, h])),
            d_down: post.then(|| scratch("d_down", &[n, h])),
            d_qn: qkn.then(|| scratch("d_qn", &[n, q])),
            d_kn: qkn.then(|| scratch("d_kn", &[n, kv])),
            d_qrot: rope.then(|| scratch("d_qrot", &[n, q])),
            d_q: scratch("d_q", &[n, q]),
            d_krot: rope.then(|| scratch("d_krot", &[n, kv])),
            d_k: scratch("d_k", &[n, kv]),
            d_v: scratch("d_v", &[n, kv]),
            dsum: scratch("dsum", &[batch, c.num_heads, seq]),
        }
    });
    let planned = p.allocate(ctx)?;
    let g = |id: usize| planned.get(id);
    let layers: Vec<LayerActivations> = layers.into_iter().map(|la| la.map(g)).collect();
    let kept_bytes =
        if train { kept_bytes(&layers, opts, rope && !qkn, recompute) + ((nl + 1) * n * h * 4) as u64 } else { 0 };
    let pos_ids = if rope {
        None
    } else {
        let ids: Vec<u32> = (0..n).map(|i| (i % seq) as u32).collect();
        Some(ctx.upload_u32("pos_ids", &[n], &ids)?)
    };
    let acts = Activations {
        batch,
        seq,
        ids: ctx.tensor("ids", &[n], DType::U32)?,
        targets: ctx.tensor("targets", &[n], DType::U32)?,
        pos_ids,
        emb: emb.map(g),
        pos: learned.map(g),
        meanf: meanf.map(g),
        x: x.into_iter().map(g).collect(),
        layers,
        hf: g(hf),
        rstdf: g(rstdf),
        logits: g(logits),
        chunk_rows,
        loss_rows: ctx.tensor("loss_rows", &[n], DType::F32)?,
        lse_rows: ctx.tensor("lse_rows", &[n], DType::F32)?,
        loss_sum: ctx.tensor("loss_sum", &[1], DType::F32)?,
        loss_scale: ctx.tensor("loss_scale", &[1], DType::F32)?,
        attn: attn.map(|([q, k, v, o, scores], dscores)| AttentionScratch {
            q: g(q),
            k: g(k),
            v: g(v),
            o: g(o),
            scores: g(scores),
            dscores: dscores.map(g),
        }),
        kept_bytes,
        planned_bytes: planned.bytes,
        unshared_bytes: planned.unshared_bytes,
    };
    Ok((acts, grads.map(|gr| gr.map(g))))
}

/// What the backward pass reads of each layer's activations (the residual streams aside).
/// `qk_transient` says whether q and k (before norms and rotary) live one phase only.
fn kept_bytes(layers: &[LayerActivations], opts: &PlanOptions, qk_transient: bool, recompute: bool) -> u64 {
    let keep = |i: Input| opts.keep_inputs.contains(&i);
    let mut bytes = 0u64;
    for la in layers {
        let mut ts: Vec<&Tensor> = vec![&la.rstd1, &la.v, &la.att, &la.lse, &la.x_mid, &la.rstd2];
        ts.extend([&la.mean1, &la.q_rot, &la.k_rot, &la.mean2, &la.rstd_q, &la.rstd_k].into_iter().flatten());
        ts.extend([&la.rstd_o, &la.rstd_down].into_iter().flatten());
        if la.o_normed.is_some() {
            ts.extend([&la.o, &la.down]);
        }
        if !recompute {
            ts.push(&la.up);
            ts.extend(&la.gate);
        }
        if !qk_transient {
            ts.extend([&la.q, &la.k]);
        }
        for (input, tensor) in [(Input::H1, &la.h1), (Input::H2, &la.h2), (Input::Act, &la.act)] {
            if keep(input) {
                ts.push(tensor);
            }
        }
        bytes += ts.iter().map(|t| t.byte_len()).sum::<u64>();
    }
    bytes
}
