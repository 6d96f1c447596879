//! The memory of a step, laid out from the config and (batch, seq): every activation and, for
//! training, every activation gradient, as requests to [`crate::gpu::plan`]. When each is live
//! is not written here: the model records its steps over stand-ins (`Layout::stand_ins`), and
//! the planner reads each tensor's span of dispatches from those traces, so a tensor holds its
//! value only from the dispatch that first binds it to the last.
//!
//! This file lays the tensors out; the structures that hold them are in `activations`.

use super::{GpuModelError, PlanOptions, Result};
use crate::gpu::plan::{Planned, Planner};
use crate::gpu::{Context, DType, Tensor};
use crate::model::arch::NormKind;
use crate::model::config::ModelConfig;
use crate::ops::attention::AttentionScratch;

mod activations;

pub use activations::{Activations, Gradients, LayerActivations, LayerHalves, Recomputed};

/// The logits buffer's budget (see [`chunk_rows`]) where memory is shared with the system (CPU
/// drivers, integrated GPUs, browsers).
const LOGIT_CHUNK_BYTES: u64 = 32 << 20;
/// The budget on a discrete GPU: one chunk of a SmolLM2 step's 512 rows (96 MiB) gives its head's
/// products four times the workgroups of four chunks, which a large GPU needs to be busy (an
/// H200: the head's input gradient took 35 ms of a 170 ms step in chunks of 128 rows).
const LOGIT_CHUNK_BYTES_DISCRETE: u64 = 256 << 20;
/// The budget of attention's score matrices on the matmul path (see [`layout`]).
const ATTENTION_SCORES_BYTES: u64 = 32 << 20;

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
    let fused = ctx.options().fused_attention;
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
