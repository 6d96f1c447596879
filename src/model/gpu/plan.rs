//! The memory of a step, laid out from the config and (batch, seq): every activation and, for
//! training, every activation gradient, as requests to [`crate::gpu::plan`]. When each is live
//! is not written here: the model records its steps over stand-ins ([`Layout::stand_ins`]), and
//! the planner reads each tensor's span of dispatches from those traces, so a tensor holds its
//! value only from the dispatch that first binds it to the last.

use super::{GpuModelError, PlanOptions, Result};
use crate::gpu::plan::{Planned, Planner};
use crate::gpu::{Context, DType, Tensor};
use crate::model::arch::NormKind;
use crate::model::config::ModelConfig;
use crate::ops::attention::AttentionScratch;

/// The logits buffer's budget (see [`plan`]) where memory is shared with the system (CPU
/// drivers, integrated GPUs, browsers).
const LOGIT_CHUNK_BYTES: u64 = 32 << 20;
/// The budget on a discrete GPU: one chunk of a SmolLM2 step's 512 rows (96 MiB) gives its head's
/// products four times the workgroups of four chunks, which a large GPU needs to be busy (an
/// H200: the head's input gradient took 35 ms of a 170 ms step in chunks of 128 rows).
const LOGIT_CHUNK_BYTES_DISCRETE: u64 = 256 << 20;
/// The budget of attention's score matrices on the matmul path (see [`plan`]).
const ATTENTION_SCORES_BYTES: u64 = 32 << 20;

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
    fn all(&self) -> Vec<T> {
        let mut all = Vec::new();
        self.clone().map(|t| all.push(t));
        all
    }
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

/// How many logit rows are computed at a time: as many as fit 32 MiB (256 MiB on a discrete GPU;
/// and one storage binding),
/// a multiple of 64 rows so that every chunk's offset into the (N, C) activations is 256-byte
/// aligned. On lavapipe larger chunks gain nothing measurable (SmolLM2, 512 rows: 11.16 s of GPU
/// time per step in one chunk, 11.18 s in chunks of 128) and would hold 96 MiB instead of 24; a
/// large GPU needs the workgroups of one chunk (see [`LOGIT_CHUNK_BYTES_DISCRETE`]).
fn chunk_rows(ctx: &Context, c: &ModelConfig, n: usize, asked: Option<usize>) -> Result<usize> {
    let row_bytes = (c.vocab_size * 4) as u64;
    let budget = match ctx.info().device_type.as_str() {
        "DiscreteGpu" => LOGIT_CHUNK_BYTES_DISCRETE,
        _ => LOGIT_CHUNK_BYTES,
    };
    let fit = (ctx.limits().max_storage_binding.min(budget) / row_bytes).max(1) as usize;
    Ok(match asked {
        Some(r) if r > 0 && r % 64 == 0 => r.min(n),
        Some(r) => {
            return Err(GpuModelError::Unsupported(format!("logit chunks of {r} rows: use a positive multiple of 64")))
        }
        None if fit >= n => n,
        None => (fit / 64 * 64).max(64).min(n),
    })
}

/// Tensors of one (batch, seq) that outlive every plan of a model: the inputs written before
/// each run and the loss read after it.
pub struct Fixed {
    ids: Tensor,
    targets: Tensor,
    pos_ids: Tensor,
    loss_rows: Tensor,
    lse_rows: Tensor,
    loss_sum: Tensor,
    loss_scale: Tensor,
}

impl Fixed {
    pub(super) fn new(ctx: &Context, batch: usize, seq: usize) -> Result<Fixed> {
        let _kind = ctx.alloc_kind("activations");
        let n = batch * seq;
        // Each token's position in its document (rotary angles, learned positions, the attention
        // mask of packed documents), for every block; rewritten with every batch.
        let pos_ids = ctx.upload_u32("pos_ids", &[n], &(0..n).map(|i| (i % seq) as u32).collect::<Vec<_>>())?;
        Ok(Fixed {
            ids: ctx.tensor("ids", &[n], DType::U32)?,
            targets: ctx.tensor("targets", &[n], DType::U32)?,
            pos_ids,
            loss_rows: ctx.tensor("loss_rows", &[n], DType::F32)?,
            lse_rows: ctx.tensor("lse_rows", &[n], DType::F32)?,
            loss_sum: ctx.tensor("loss_sum", &[1], DType::F32)?,
            loss_scale: ctx.tensor("loss_scale", &[1], DType::F32)?,
        })
    }
}

/// What a step's memory holds, before the traces say when: the planner's requests and where
/// each goes in [`Activations`] and [`Gradients`].
pub(super) struct Layout {
    planner: Planner,
    batch: usize,
    seq: usize,
    chunk_rows: usize,
    x: Vec<usize>,
    emb: Option<usize>,
    pos: Option<usize>,
    layers: Vec<LayerActivations<usize>>,
    halves: Vec<LayerHalves<usize>>,
    hf: usize,
    meanf: Option<usize>,
    rstdf: usize,
    pub(super) logits: usize,
    head_partials: Option<usize>,
    attn: Option<([usize; 5], Option<usize>)>,
    pub(super) grads: Option<Gradients<usize>>,
}

/// Lays out every activation (and, with `opts.backward`, every gradient) of a step of `batch`
/// rows of `seq` tokens as requests to the planner ([`crate::gpu::plan`]); their lifetimes come
/// later, from traces of the steps. `keep_h2` says that the adapter's backward reads the MLP's
/// input, so a recomputing backward reuses the kept one.
pub(super) fn layout(
    ctx: &Context,
    c: &ModelConfig,
    batch: usize,
    seq: usize,
    opts: &PlanOptions,
    keep_h2: bool,
) -> Result<Layout> {
    let n = batch * seq;
    let h = c.hidden_size;
    let b = c.block;
    let mut p = Planner::new();
    let mut r = Req(&mut p);
    let x: Vec<usize> = (0..=c.num_layers).map(|_| r.one("x", &[n, h])).collect();
    let pos = (!b.rope).then(|| r.one("pos", &[n, h]));
    // Token embeddings before positions are added or the embedding scale is applied.
    let emb = (!b.rope || b.embed_scale).then(|| r.one("emb", &[n, h]));
    let recompute = opts.backward && opts.recompute_mlp;
    let layers = (0..c.num_layers).map(|_| layer_requests(&mut r, c, n, batch, seq, recompute, keep_h2)).collect();
    let chunk_rows = chunk_rows(ctx, c, n, opts.logit_chunk_rows)?;
    // Attention as batched matrix products where its score matrices fit 32 MiB (the fused
    // kernels otherwise; PORTALORA_ATTENTION=fused forces them, for comparisons).
    let shape = c.attention_shape(0, batch, seq, 0);
    let fused = std::env::var("PORTALORA_ATTENTION").is_ok_and(|v| v == "fused");
    let attn = (!fused && shape.fits_matmul_path(ctx, ATTENTION_SCORES_BYTES)).then(|| {
        let (hm, ss) = (shape.head_major_shape(), shape.scores_shape());
        let names = ["attention q (head-major)", "attention k (head-major)", "attention v (head-major)"];
        let [q, k, v] = names.map(|l| r.one(l, &hm));
        let o = r.one("attention out (head-major)", &hm);
        ([q, k, v, o, r.one("attention scores", &ss)], opts.backward.then(|| r.one("attention dscores", &ss)))
    });
    let hf = r.one("hf", &[n, h]);
    let rstdf = r.one("rstdf", &[n]);
    let meanf = (b.norm == NormKind::Layer).then(|| r.one("meanf", &[n]));
    let logits = r.one("logits", &[chunk_rows, c.vocab_size]);
    let head_splits = head_splits(ctx, c, opts);
    let head_partials = (head_splits > 1).then(|| r.one("head partials", &[head_splits * chunk_rows, h]));
    let grads = opts.backward.then(|| gradient_requests(&mut r, c, batch, seq));
    Ok(Layout {
        planner: p,
        batch,
        seq,
        chunk_rows,
        x,
        emb,
        pos,
        layers,
        halves: Vec::new(),
        hf,
        meanf,
        rstdf,
        logits,
        head_partials,
        attn,
        grads,
    })
}

/// How many vocabulary slices the LM head's input gradient is summed over in parallel (see
/// [`super::PlanOptions::head_splits`]): only for training, on GPUs with subgroups (a browser
/// does not say what its adapter is: none there), where the vocabulary divides into slices of
/// a multiple of 4 rows.
fn head_splits(ctx: &Context, c: &ModelConfig, opts: &PlanOptions) -> usize {
    if let Some(s) = opts.head_splits {
        return s;
    }
    let gpu =
        matches!(ctx.info().device_type.as_str(), "DiscreteGpu" | "IntegratedGpu") && ctx.subgroup_size().is_some();
    match opts.backward && gpu {
        true => [16, 8, 4].into_iter().find(|s| c.vocab_size.is_multiple_of(4 * s)).unwrap_or(0),
        false => 0,
    }
}

/// One layer's activation requests.
fn layer_requests(
    r: &mut Req,
    c: &ModelConfig,
    n: usize,
    batch: usize,
    seq: usize,
    recompute: bool,
    keep_h2: bool,
) -> LayerActivations<usize> {
    let (h, q, kv, f) = (c.hidden_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.intermediate_size);
    let b = c.block;
    let (layer_norm, rope, gated, qkn, post) =
        (b.norm == NormKind::Layer, b.rope, b.act.gated(), b.qk_norm, b.post_norms);
    let h2 = r.one("h2", &[n, h]);
    LayerActivations {
        h1: r.one("h1", &[n, h]),
        mean1: r.opt(layer_norm, "mean1", &[n]),
        rstd1: r.one("rstd1", &[n]),
        q: r.one("q", &[n, q]),
        k: r.one("k", &[n, kv]),
        v: r.one("v", &[n, kv]),
        q_normed: r.opt(qkn, "q_normed", &[n, q]),
        k_normed: r.opt(qkn, "k_normed", &[n, kv]),
        rstd_q: r.opt(qkn, "rstd_q", &[n * c.num_heads]),
        rstd_k: r.opt(qkn, "rstd_k", &[n * c.num_kv_heads]),
        q_rot: r.opt(rope, "q_rot", &[n, q]),
        k_rot: r.opt(rope, "k_rot", &[n, kv]),
        att: r.one("att", &[n, q]),
        // The log-sum-exps (B, H, T), then each token's document start (B, T) (ops::attention).
        lse: r.one("lse", &[batch * c.num_heads * seq + batch * seq]),
        o: r.one("o", &[n, h]),
        o_normed: r.opt(post, "o_normed", &[n, h]),
        rstd_o: r.opt(post, "rstd_o", &[n]),
        x_mid: r.one("x_mid", &[n, h]),
        h2,
        mean2: r.opt(layer_norm, "mean2", &[n]),
        rstd2: r.one("rstd2", &[n]),
        gate: r.opt(gated, "gate", &[n, f]),
        up: r.one("up", &[n, f]),
        act: r.one("act", &[n, f]),
        down: r.one("down", &[n, h]),
        down_normed: r.opt(post, "down_normed", &[n, h]),
        rstd_down: r.opt(post, "rstd_down", &[n]),
        recomputed: recompute.then(|| Recomputed {
            h2: if keep_h2 { h2 } else { r.one("h2 (recomputed)", &[n, h]) },
            gate: gated.then(|| r.one("gate (recomputed)", &[n, f])),
            up: r.one("up (recomputed)", &[n, f]),
        }),
    }
}

/// The backward pass's requests: the residual-stream gradients and one scratch per role.
fn gradient_requests(r: &mut Req, c: &ModelConfig, batch: usize, seq: usize) -> Gradients<usize> {
    let n = batch * seq;
    let (h, q, kv, f) = (c.hidden_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.intermediate_size);
    let b = c.block;
    let (rope, gated, qkn, post) = (b.rope, b.act.gated(), b.qk_norm, b.post_norms);
    Gradients {
        dx: (0..=c.num_layers).map(|_| r.one("dx", &[n, h])).collect(),
        dhf: r.one("dhf", &[n, h]),
        d_xmid: r.one("d_xmid", &[n, h]),
        d_h: r.one("d_h", &[n, h]),
        d_act: r.one("d_act", &[n, f]),
        d_gate: r.opt(gated, "d_gate", &[n, f]),
        d_up: r.one("d_up", &[n, f]),
        d_att: r.one("d_att", &[n, q]),
        d_o: r.opt(post, "d_o", &[n, h]),
        d_down: r.opt(post, "d_down", &[n, h]),
        d_qn: r.opt(qkn, "d_qn", &[n, q]),
        d_kn: r.opt(qkn, "d_kn", &[n, kv]),
        d_qrot: r.opt(rope, "d_qrot", &[n, q]),
        d_q: r.one("d_q", &[n, q]),
        d_krot: r.opt(rope, "d_krot", &[n, kv]),
        d_k: r.one("d_k", &[n, kv]),
        d_v: r.one("d_v", &[n, kv]),
        dsum: r.one("dsum", &[batch, c.num_heads, seq]),
    }
}

/// Requests to a planner, all f32.
struct Req<'a>(&'a mut Planner);

impl Req<'_> {
    fn one(&mut self, label: &str, shape: &[usize]) -> usize {
        self.0.add(label, shape, DType::F32)
    }
    fn opt(&mut self, on: bool, label: &str, shape: &[usize]) -> Option<usize> {
        on.then(|| self.one(label, shape))
    }
}

impl Activations {
    /// The vocabulary slices of the LM head's split input gradient (0: not split).
    pub fn head_splits(&self) -> usize {
        self.head_partials.as_ref().map_or(0, |p| p.shape()[0] / self.chunk_rows)
    }
}

impl Layout {
    /// The activations and gradients over `tensor(request)`.
    fn build(&self, fixed: &Fixed, tensor: &dyn Fn(usize) -> Tensor) -> (Activations, Option<Gradients>) {
        let g = |id: &usize| tensor(*id);
        let by_id = |id: usize| tensor(id);
        let acts = Activations {
            batch: self.batch,
            seq: self.seq,
            ids: fixed.ids.clone(),
            targets: fixed.targets.clone(),
            pos_ids: fixed.pos_ids.clone(),
            emb: self.emb.as_ref().map(g),
            pos: self.pos.as_ref().map(g),
            x: self.x.iter().map(g).collect(),
            layers: self.layers.iter().map(|la| la.clone().map(by_id)).collect(),
            halves: self
                .halves
                .iter()
                .map(|h| LayerHalves {
                    kept: h.kept.iter().map(|&(f, p, b)| (tensor(f), tensor(p), tensor(b))).collect(),
                    back: h.back.clone().map(by_id),
                    x: tensor(h.x),
                })
                .collect(),
            hf: g(&self.hf),
            meanf: self.meanf.as_ref().map(g),
            rstdf: g(&self.rstdf),
            logits: g(&self.logits),
            chunk_rows: self.chunk_rows,
            head_partials: self.head_partials.as_ref().map(g),
            loss_rows: fixed.loss_rows.clone(),
            lse_rows: fixed.lse_rows.clone(),
            loss_sum: fixed.loss_sum.clone(),
            loss_scale: fixed.loss_scale.clone(),
            attn: self.attn.as_ref().map(|([q, k, v, o, scores], dscores)| AttentionScratch {
                q: g(q),
                k: g(k),
                v: g(v),
                o: g(o),
                scores: g(scores),
                dscores: dscores.as_ref().map(g),
                positions: Some(fixed.pos_ids.clone()),
            }),
            kept_bytes: 0,
            planned_bytes: 0,
            unshared_bytes: 0,
        };
        (acts, self.grads.clone().map(|gr| gr.map(by_id)))
    }

    /// The requests `trace` keeps across its dispatch `at` (see [`Planner::live_across`]).
    pub(super) fn live_across(&self, trace: &crate::gpu::Step, at: usize) -> std::collections::HashSet<usize> {
        self.planner.live_across(trace, at)
    }

    /// Keeps, per layer, the 2-D tensors among its activations and its input that are in
    /// `kept` (requests the forward pass writes and the backward pass reads, from a trace) as
    /// f16 between the two passes ([`LayerHalves`]): two more requests each, the f16 copy and
    /// the f32 the backward pass widens it into. New stand-ins and traces must follow.
    pub(super) fn keep_halves(&mut self, kept: &std::collections::HashSet<usize>) {
        self.halves.clear();
        for (l, la) in self.layers.iter().enumerate() {
            let mut back_of = std::collections::HashMap::new();
            let mut halves = Vec::new();
            for id in std::iter::once(self.x[l]).chain(la.all()) {
                let (label, shape) = self.planner.request(id);
                let (label, shape) = (label.to_string(), shape.to_vec());
                if shape.len() != 2 || !kept.contains(&id) || back_of.contains_key(&id) {
                    continue;
                }
                let half = self.planner.add(&format!("{label} (f16)"), &shape, DType::F16);
                let back = self.planner.add(&format!("{label} (widened)"), &shape, DType::F32);
                back_of.insert(id, back);
                halves.push((id, half, back));
            }
            let back = |id: usize| back_of.get(&id).copied().unwrap_or(id);
            self.halves.push(LayerHalves { kept: halves, back: la.clone().map(back), x: back(self.x[l]) });
        }
    }

    /// The activations and gradients as stand-ins without memory, for recording traces.
    pub(super) fn stand_ins(&mut self, ctx: &Context, fixed: &Fixed) -> Result<(Activations, Option<Gradients>)> {
        let t = self.planner.stand_ins(ctx)?;
        Ok(self.build(fixed, &|id| t[id].clone()))
    }

    /// Allocates for the lifetimes the traces show (see [`Planner::allocate`]).
    pub(super) fn allocate(
        self,
        ctx: &Context,
        fixed: &Fixed,
        traces: &[&crate::gpu::Step],
        outputs: &[(usize, usize)],
    ) -> Result<(Activations, Option<Gradients>, Planned)> {
        let _kind = ctx.alloc_kind("activations");
        let layout = Layout { planner: Planner::new(), ..self };
        let planned = self.planner.allocate(ctx, traces, outputs)?;
        let (mut acts, grads) = layout.build(fixed, &|id| planned.get(id));
        (acts.planned_bytes, acts.unshared_bytes) = (planned.bytes, planned.unshared_bytes);
        Ok((acts, grads, planned))
    }
}
