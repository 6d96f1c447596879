//! Models on the GPU: parameters uploaded once ([`params`]), activations planned for a fixed
//! batch and sequence length ([`plan`]), and the forward pass (and forward + loss + backward)
//! recorded once as a [`Step`] and replayed. Every family's layers are recorded by the one layer
//! recorder ([`block`]) from the block's description; the embedding, LM head and loss are in
//! [`head`]; generation with a KV cache in [`generate`].
//!
//! Conventions: the residual stream and every activation are row-major `(N, ·)` with
//! N = batch · seq and row n = b · seq + t. Every activation the backward pass needs is kept (one
//! tensor per layer and role, except what [`PlanOptions::recompute_mlp`] recomputes); their
//! memory is planned from traces of the recorded steps themselves ([`plan`], `GpuModel::replan`),
//! so a tensor holds its value only between the dispatches that write and read it.

pub mod block;
pub mod generate;
pub mod head;
pub mod params;
pub mod plan;

use std::fmt;

use super::config::ModelConfig;
use super::weights::Weights;
use crate::adapter::{Adapter, AdapterError, Input, Proj, SiteWeights};
use crate::gpu::{Context, DType, GpuError, Step, Tensor};
use crate::ops::half::{half_pack, half_unpack};
use crate::ops::xent::IGNORE;
use block::{Hooks, Keys, Recorder};

pub use params::{BaseDType, BlockParams, Norm, ParameterTensors, SplitTable};
pub use plan::{Activations, Gradients, LayerActivations, Recomputed};

#[derive(Debug, thiserror::Error)]
pub enum GpuModelError {
    #[error(transparent)]
    Gpu(#[from] GpuError),
    #[error("{0}")]
    Unsupported(String),
    #[error("token id {id} at row {row}, position {pos} is outside the vocabulary of {vocab} tokens")]
    BadId { id: u32, row: usize, pos: usize, vocab: usize },
    #[error("input rows must all have {expected} tokens (the planned sequence length); row {row} has {found}")]
    RowLength { row: usize, expected: usize, found: usize },
    #[error("{found} input rows do not fit the planned batch of {batch}")]
    BatchSize { batch: usize, found: usize },
    #[error("sequence length {seq} exceeds the model's context of {max} positions")]
    TooLong { seq: usize, max: usize },
    #[error(transparent)]
    Adapter(#[from] AdapterError),
    #[error(transparent)]
    Model(#[from] crate::model::weights::ModelError),
}

pub(crate) type Result<T> = std::result::Result<T, GpuModelError>;

/// How the plan splits what could exceed one storage binding (`None` picks the largest that
/// fits), whether it plans for training, and what it keeps per layer.
#[derive(Clone, Debug, Default)]
pub struct PlanOptions {
    /// Rows of logits computed at a time (a positive multiple of 64; default: what fits 32 MiB).
    pub logit_chunk_rows: Option<usize>,
    /// Rows per part of the token-embedding / LM-head tables.
    pub table_part_rows: Option<usize>,
    /// Slices of the vocabulary the LM head's input gradient is summed over in parallel
    /// ([`crate::ops::matmul::matmul_split_k`]; 0 or 1: none). Default, when training with
    /// subgroups on a GPU: as many of 16, 8 or 4 as the vocabulary divides into (a product of
    /// (rows, C) outputs over a vocabulary-long K leaves most of the GPU idle); none on CPU
    /// drivers.
    pub head_splits: Option<usize>,
    /// How the frozen matrices are stored (default here: f32; `Auto` keeps a GGUF's types).
    pub base_dtype: Option<BaseDType>,
    /// Plan (and record) the training step too. Without it the plan is for the forward pass
    /// alone, and a layer's activations share memory with the next layer's.
    pub backward: bool,
    /// Recompute the MLP's up-projections (and the norm before them) in the backward pass
    /// instead of keeping them: activation checkpointing of the largest per-layer activations,
    /// for two more projections per layer (LLaMA: gate and up, (N, F) each; GPT-2: c_fc).
    pub recompute_mlp: bool,
    /// Keep what each layer's backward pass reads of its forward pass as f16 in between
    /// (`--activations f16`; [`plan::LayerHalves`]): about half the kept activation bytes, for
    /// two more dispatches per kept tensor and rounding them to f16's 11 significant bits. A
    /// value beyond f16's range (±65504) becomes Inf, which the step's gradient check reports.
    pub activations_f16: bool,
    /// Keep every layer's input gradient `dx[l]` after the step (tests inspect them); by default
    /// each lives until the layer below has read it.
    pub keep_layer_grads: bool,
}

/// A model on the GPU with its forward pass (and, for training, forward + backward) recorded
/// for one (batch, seq).
pub struct GpuModel {
    pub config: ModelConfig,
    pub params: ParameterTensors,
    pub acts: Activations,
    pub grads: Option<Gradients>,
    /// The inputs and loss, which outlive every plan.
    fixed: plan::Fixed,
    forward: Step,
    train: Option<Step>,
    adapter: Option<Box<dyn Adapter>>,
    /// The adapter's ΔW has been added into the base weights (its branch is then skipped).
    merged: bool,
    /// The options the memory plan was made with.
    opts: PlanOptions,
}

impl fmt::Debug for GpuModel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "GpuModel {{ {:?}, batch {}, seq {} }}", self.config.arch, self.acts.batch, self.acts.seq)
    }
}

/// An activation that exists for some blocks only (laid out in [`plan::layout`]).
fn need(t: &Option<Tensor>) -> Result<&Tensor> {
    t.as_ref().ok_or_else(|| GpuModelError::Unsupported("an activation this block does not have was asked for".into()))
}

impl GpuModel {
    /// Uploads `w` and plans and records the forward pass for `batch` rows of `seq` tokens.
    pub fn new(ctx: &Context, w: &Weights, batch: usize, seq: usize) -> Result<Self> {
        Self::with_options(ctx, w, batch, seq, PlanOptions::default())
    }

    /// As [`GpuModel::new`], with the memory plan's options (see [`PlanOptions`]); with
    /// `opts.backward` the training step's memory is planned too ([`GpuModel::enable_backward`]
    /// records it, once the adapter is attached).
    pub fn with_options(ctx: &Context, w: &Weights, batch: usize, seq: usize, opts: PlanOptions) -> Result<Self> {
        let c = w.config.clone();
        if seq > c.max_positions {
            return Err(GpuModelError::TooLong { seq, max: c.max_positions });
        }
        c.check_seq(seq).map_err(GpuModelError::Unsupported)?; // a sliding window
        let dtype = opts.base_dtype.unwrap_or(BaseDType::F32);
        let params = ctx.timed("upload", || ParameterTensors::upload_as(ctx, w, opts.table_part_rows, dtype))?;
        let fixed = plan::Fixed::new(ctx, batch, seq)?;
        let mut layout = plan::layout(ctx, &c, batch, seq, &opts, false)?;
        let (acts, grads) = layout.stand_ins(ctx, &fixed)?;
        let mut model = GpuModel {
            config: c,
            params,
            acts,
            grads,
            fixed,
            forward: Step::new(),
            train: None,
            adapter: None,
            merged: false,
            opts,
        };
        model.replan(ctx, false)?;
        Ok(model)
    }

    /// Plans the memory of the steps from traces of them, then records them: the layout's
    /// stand-ins first replace the current tensors (so that their memory is freed first), the
    /// forward step (and, with `opts.backward`, the training step) is traced over them, the
    /// planner gives each tensor the spans the traces show, and the steps are recorded over
    /// the tensors allocated (the training step only when `train`).
    fn replan(&mut self, ctx: &Context, train: bool) -> Result<()> {
        ctx.timed("plan", || self.replan_untimed(ctx, train))
    }

    fn replan_untimed(&mut self, ctx: &Context, train: bool) -> Result<()> {
        let keep_h2 = self.adapter_reads(Input::H2);
        let mut layout = plan::layout(ctx, &self.config, self.acts.batch, self.acts.seq, &self.opts, keep_h2)?;
        (self.forward, self.train) = (Step::new(), None);
        (self.acts, self.grads) = layout.stand_ins(ctx, &self.fixed)?;
        let mut forward = self.record_into(ctx, Step::trace(), false)?;
        let mut backward = self.grads.is_some().then(|| self.record_into(ctx, Step::trace(), true)).transpose()?;
        if let (Some(b), true) = (&backward, self.opts.activations_f16) {
            // What the backward pass reads of the forward pass is what this trace shows; those
            // tensors get f16 copies, and the steps are traced again with them.
            let kept = b.marked("head").map(|at| layout.live_across(b, at)).unwrap_or_default();
            layout.keep_halves(&kept);
            (self.acts, self.grads) = layout.stand_ins(ctx, &self.fixed)?;
            forward = self.record_into(ctx, Step::trace(), false)?;
            backward = Some(self.record_into(ctx, Step::trace(), true)?);
        }
        let traces: Vec<&Step> = std::iter::once(&forward).chain(backward.as_ref()).collect();
        // Read after their step: the logits of a forward pass, and kept layer gradients.
        let mut outputs = vec![(0, layout.logits)];
        if let (Some(g), true) = (&layout.grads, self.opts.keep_layer_grads) {
            outputs.extend(g.dx.iter().map(|&d| (1, d)));
        }
        let (mut acts, grads, planned) = layout.allocate(ctx, &self.fixed, &traces, &outputs)?;
        // What the training step keeps from the layers' forward pass for their backward pass.
        acts.kept_bytes = backward.and_then(|b| b.marked("head")).map_or(0, |at| planned.bytes_live_across(1, at));
        (self.acts, self.grads) = (acts, grads);
        self.forward = self.record(ctx, false)?;
        if train {
            self.train = Some(self.record(ctx, true)?);
        }
        Ok(())
    }

    /// Whether the attached (unmerged) adapter reads `input` in its backward pass.
    fn adapter_reads(&self, input: Input) -> bool {
        let Some(a) = self.adapter.as_deref().filter(|a| !self.merged && a.needs_input()) else { return false };
        a.sites().iter().any(|s| s.proj.input() == input)
    }

    /// Makes the model trainable: records forward + loss + backward as one step. A model
    /// planned for the forward pass alone (whose layers share activation memory) is planned
    /// again for training first.
    pub fn enable_backward(&mut self, ctx: &Context) -> Result<()> {
        if self.train.is_some() {
            return Ok(());
        }
        self.opts.backward = true;
        self.replan(ctx, true)
    }

    /// The layer recorder for this model, with the adapter's hooks unless it is merged.
    fn recorder<'a>(&'a self, ctx: &'a Context, train: bool) -> Recorder<'a> {
        let adapter = self.adapter.as_deref().filter(|_| !self.merged);
        let a = &self.acts;
        let docs = Some((a.batch, a.seq, &a.pos_ids));
        Recorder { ctx, config: &self.config, hooks: Hooks { adapter, train }, attn: a.attn.as_ref(), docs }
    }

    /// Records the forward pass and the loss; with `backward`, also the gradient of the mean loss
    /// over every predicted position of a full batch back to the input of every layer, in exact
    /// reverse order.
    fn record(&self, ctx: &Context, backward: bool) -> Result<Step> {
        self.record_into(ctx, Step::new(), backward)
    }

    /// [`GpuModel::record`] into `s` (a trace, for planning).
    fn record_into(&self, ctx: &Context, mut s: Step, backward: bool) -> Result<Step> {
        let r = self.recorder(ctx, backward);
        let (p, a) = (&self.params, &self.acts);
        r.embed_forward(&mut s, p, &a.ids, &a.x[0], a.emb.as_ref(), r.positions(a)?)?;
        let keys = Keys::Batch { batch: a.batch, seq: a.seq, positions: &a.pos_ids };
        for (l, (lp, la)) in p.layers.iter().zip(&a.layers).enumerate() {
            r.layer_forward(&mut s, l, lp, &a.x[l], la, keys, &a.x[l + 1])?;
            for (full, half, _) in a.halves.get(l).filter(|_| backward).map_or(&[][..], |h| &h.kept) {
                half_pack(ctx, &mut s, full, half)?;
            }
        }
        s.mark("head");
        r.final_norm(&mut s, p, &a.x[self.config.num_layers], a)?;
        let grads = if backward { self.grads.as_ref() } else { None };
        r.head_forward(&mut s, p, a, grads)?;
        if let Some(g) = grads {
            r.final_norm_backward(&mut s, p, a, g)?;
            let recompute_h2 = !self.adapter_reads(Input::H2);
            for l in (0..self.config.num_layers).rev() {
                let (lp, mut la, mut x) = (&p.layers[l], &a.layers[l], &a.x[l]);
                if let Some(h) = a.halves.get(l) {
                    for (_, half, back) in &h.kept {
                        half_unpack(ctx, &mut s, half, back)?;
                    }
                    (la, x) = (&h.back, &h.x);
                }
                r.layer_backward(&mut s, l, lp, x, la, g, &g.dx[l + 1], &g.dx[l], recompute_h2)?;
            }
        }
        Ok(s)
    }

    /// Attaches an adapter to the projections its sites name and plans and records the steps
    /// again (its backward may keep projection inputs alive).
    pub fn attach(&mut self, ctx: &Context, adapter: Box<dyn Adapter>) -> Result<()> {
        if let Some(site) = adapter.sites().iter().find(|s| s.layer >= self.config.num_layers) {
            return Err(GpuModelError::Unsupported(format!("{} is not a layer of this model", site.module)));
        }
        let mut adapter = adapter;
        adapter.bind(ctx, site_bases(&self.params, adapter.sites())?)?;
        self.adapter = Some(adapter);
        self.merged = false;
        self.rerecord(ctx)
    }

    /// Detaches the adapter (unmerged first if merged) and re-records the steps.
    pub fn detach(&mut self, ctx: &Context) -> Result<Option<Box<dyn Adapter>>> {
        if self.merged {
            self.unmerge(ctx)?;
        }
        let a = self.adapter.take();
        self.rerecord(ctx)?;
        Ok(a)
    }

    fn rerecord(&mut self, ctx: &Context) -> Result<()> {
        let train = self.train.is_some();
        self.replan(ctx, train)
    }

    pub fn adapter(&self) -> Option<&dyn Adapter> {
        self.adapter.as_deref()
    }

    pub fn adapter_mut(&mut self) -> Option<&mut (dyn Adapter + 'static)> {
        self.adapter.as_deref_mut()
    }

    /// The frozen weights of every site of the attached adapter, in site order.
    pub fn site_weights(&self) -> Result<Vec<SiteWeights<'_>>> {
        let Some(a) = self.adapter.as_deref() else { return Ok(Vec::new()) };
        let mut out = Vec::new();
        for site in a.sites() {
            let parts = site_parts(&self.params, site)?.into_iter().map(|(w, _)| w).collect();
            out.push(SiteWeights { parts, conv1d: site.conv1d });
        }
        Ok(out)
    }

    /// The weights of every projection the attached adapter touches, read back from the GPU, by
    /// transformers name in its layout (GPT-2's q, k and v thirds joined back into `c_attn`'s
    /// `(C, 3C)`): after a merge, or Delta-LoRA's moved W0. Async so that a page can await it.
    pub async fn read_site_weights_async(
        &self,
        ctx: &Context,
    ) -> Result<std::collections::BTreeMap<String, super::weights::HostTensor>> {
        let Some(adapter) = self.adapter() else { return Ok(Default::default()) };
        let mut reads = Vec::new();
        for (site, sw) in adapter.sites().iter().zip(self.site_weights()?) {
            reads.push((site, sw.parts.iter().map(|p| ctx.read(p)).collect::<std::result::Result<Vec<_>, _>>()?));
        }
        let mut out = std::collections::BTreeMap::new();
        for (site, parts) in reads {
            let mut got = Vec::new();
            for r in parts {
                got.push(r.await?);
            }
            let (data, shape) = if site.proj == Proj::CAttn {
                // Conv1D (in, out): row i of the fused weight is [q row i | k row i | v row i].
                let rows = site.in_features;
                let mut out = Vec::with_capacity(rows * site.out_features());
                for i in 0..rows {
                    for (p, &o) in got.iter().zip(&site.outs) {
                        out.extend_from_slice(&p[i * o..(i + 1) * o]);
                    }
                }
                (out, vec![rows, site.out_features()])
            } else if site.conv1d {
                (got.concat(), vec![site.in_features, site.out_features()])
            } else {
                (got.concat(), vec![site.out_features(), site.in_features])
            };
            out.insert(format!("{}.weight", site.module), super::weights::HostTensor { shape, data });
        }
        Ok(out)
    }

    /// Whether any frozen matrix is stored packed (f16 or quantized; see [`BaseDType`]).
    pub fn base_is_packed(&self) -> bool {
        self.params.layers.iter().any(|l| l.matrices().any(|t| t.dtype() != DType::F32))
            || self.params.embed.parts.iter().any(|(_, t)| t.dtype() != DType::F32)
    }

    /// Adds the adapter's ΔW into the frozen weights on the GPU (`W0 += s·B·A`, PEFT's merge);
    /// the branch is then skipped, so the forward pass gives the same results faster.
    pub fn merge(&mut self, ctx: &Context) -> Result<()> {
        self.merge_sign(ctx, 1.0)?;
        self.merged = true;
        self.rerecord(ctx)
    }

    /// Subtracts what [`GpuModel::merge`] added (the base comes back within f32 rounding).
    pub fn unmerge(&mut self, ctx: &Context) -> Result<()> {
        if !self.merged {
            return Ok(());
        }
        self.merge_sign(ctx, -1.0)?;
        self.merged = false;
        self.rerecord(ctx)
    }

    fn merge_sign(&self, ctx: &Context, sign: f32) -> Result<()> {
        let Some(a) = self.adapter.as_deref() else {
            return Err(GpuModelError::Unsupported("no adapter is attached to merge".into()));
        };
        if self.base_is_packed() {
            return Err(GpuModelError::Unsupported(
                "the base weights are stored quantized on the GPU and cannot take the adapter's ΔW; \
                 load the base as f32 (--base-dtype f32) to merge"
                    .into(),
            ));
        }
        let mut s = Step::new();
        a.merge(ctx, &mut s, &self.site_weights()?, sign)?;
        ctx.run(&s)?;
        Ok(())
    }

    /// The recorded forward pass and loss (evaluation).
    pub fn forward_step(&self) -> &Step {
        &self.forward
    }

    /// The recorded forward + loss + backward step (after [`GpuModel::enable_backward`]).
    pub fn train_step(&self) -> Option<&Step> {
        self.train.as_ref()
    }

    /// Checks that `ids` fit the plan and the vocabulary, with the row and position of any fault.
    pub fn check_ids(&self, ids: &[Vec<u32>]) -> Result<()> {
        if ids.len() > self.acts.batch || ids.is_empty() {
            return Err(GpuModelError::BatchSize { batch: self.acts.batch, found: ids.len() });
        }
        for (row, r) in ids.iter().enumerate() {
            if r.len() != self.acts.seq {
                return Err(GpuModelError::RowLength { row, expected: self.acts.seq, found: r.len() });
            }
            if let Some((pos, &id)) = r.iter().enumerate().find(|&(_, &id)| id as usize >= self.config.vocab_size) {
                return Err(GpuModelError::BadId { id, row, pos, vocab: self.config.vocab_size });
            }
        }
        Ok(())
    }

    /// Runs the forward pass on `ids` (up to `batch` rows of `seq` tokens; missing rows are
    /// padding whose positions are ignored) and returns (sum of next-token losses, positions).
    /// Only the loss sum is read back.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn loss_sum(&self, ctx: &Context, ids: &[Vec<u32>]) -> Result<(f64, usize)> {
        self.loss_sum_masked(ctx, ids, None)
    }

    /// [`GpuModel::loss_sum`] over the positions `predict` marks (see [`GpuModel::write_batch`]).
    #[cfg(not(target_arch = "wasm32"))]
    pub fn loss_sum_masked(
        &self,
        ctx: &Context,
        ids: &[Vec<u32>],
        predict: Option<&[Vec<bool>]>,
    ) -> Result<(f64, usize)> {
        crate::gpu::block_on(self.loss_sum_async(ctx, ids, predict))
    }

    /// [`GpuModel::loss_sum_masked`] for callers that cannot block (browsers).
    pub async fn loss_sum_async(
        &self,
        ctx: &Context,
        ids: &[Vec<u32>],
        predict: Option<&[Vec<bool>]>,
    ) -> Result<(f64, usize)> {
        self.loss_sum_docs_async(ctx, ids, predict, None).await
    }

    /// [`GpuModel::loss_sum_async`] with documents packed into the rows (see
    /// [`GpuModel::write_batch_docs`]).
    pub async fn loss_sum_docs_async(
        &self,
        ctx: &Context,
        ids: &[Vec<u32>],
        predict: Option<&[Vec<bool>]>,
        positions: Option<&[Vec<u32>]>,
    ) -> Result<(f64, usize)> {
        let count = self.write_batch_docs(ctx, ids, predict, positions)?;
        ctx.run(&self.forward)?;
        let sum = ctx.read(&self.acts.loss_sum)?.await?;
        Ok((sum[0] as f64, count))
    }

    /// Uploads ids and next-token targets (padding rows ignored); returns the predicted positions.
    pub fn write_inputs(&self, ctx: &Context, ids: &[Vec<u32>]) -> Result<usize> {
        self.write_batch(ctx, ids, None)
    }

    /// Uploads ids and, per row, which positions count in the loss: `predict[r][t]` says whether
    /// token t of row r is a target (predicted from the tokens before it). `None` predicts every
    /// token after the first, as a language model's loss does. Writes the loss scale
    /// 1 / (predicted positions); returns that count.
    pub fn write_batch(&self, ctx: &Context, ids: &[Vec<u32>], predict: Option<&[Vec<bool>]>) -> Result<usize> {
        self.write_batch_docs(ctx, ids, predict, None)
    }

    /// [`GpuModel::write_batch`] with documents packed into the rows: `positions[r][t]` is token
    /// t's position in its document (0 where a document starts; each other token one more than
    /// the token before it). Attention then stays within each document and rotary or learned
    /// positions count from its start. `None`: one document per row.
    pub fn write_batch_docs(
        &self,
        ctx: &Context,
        ids: &[Vec<u32>],
        predict: Option<&[Vec<bool>]>,
        positions: Option<&[Vec<u32>]>,
    ) -> Result<usize> {
        self.check_ids(ids)?;
        let (b, t) = (self.acts.batch, self.acts.seq);
        let mut pos: Vec<u32> = (0..b * t).map(|i| (i % t) as u32).collect();
        for (r, row) in positions.unwrap_or(&[]).iter().enumerate() {
            let ok = row.len() == t && row.iter().enumerate().all(|(i, &p)| p == 0 || (i > 0 && p == row[i - 1] + 1));
            if !ok || r >= b {
                return Err(GpuModelError::Unsupported(format!(
                    "positions of row {r}: need {t} values, each 0 (a document starts) or one more than the one before"
                )));
            }
            pos[r * t..(r + 1) * t].copy_from_slice(row);
        }
        ctx.write_u32(&self.acts.pos_ids, &pos)?;
        let mut flat = vec![0u32; b * t];
        let mut targets = vec![IGNORE; b * t];
        let mut count = 0;
        for (r, row) in ids.iter().enumerate() {
            flat[r * t..(r + 1) * t].copy_from_slice(row);
            let mask = predict.and_then(|p| p.get(r));
            if let Some(m) = mask.filter(|m| m.len() != t) {
                return Err(GpuModelError::RowLength { row: r, expected: t, found: m.len() });
            }
            for pos in 0..t - 1 {
                if mask.is_none_or(|m| m[pos + 1]) {
                    targets[r * t + pos] = row[pos + 1];
                    count += 1;
                }
            }
        }
        ctx.write_u32(&self.acts.ids, &flat)?;
        ctx.write_u32(&self.acts.targets, &targets)?;
        ctx.write_f32(&self.acts.loss_scale, &[1.0 / count.max(1) as f32])?;
        Ok(count)
    }

    /// Forward, loss and backward on a full batch of `ids` (B rows of T tokens). Returns (sum of
    /// next-token losses, positions); the gradients of their mean are left in [`GpuModel::grads`].
    #[cfg(not(target_arch = "wasm32"))]
    pub fn forward_backward(&mut self, ctx: &Context, ids: &[Vec<u32>]) -> Result<(f64, usize)> {
        if self.train.is_none() {
            self.enable_backward(ctx)?;
        }
        if ids.len() != self.acts.batch {
            return Err(GpuModelError::BatchSize { batch: self.acts.batch, found: ids.len() });
        }
        let count = self.write_inputs(ctx, ids)?;
        ctx.run(self.train.as_ref().expect("recorded above"))?;
        let sum = ctx.read_f32(&self.acts.loss_sum)?;
        Ok((sum[0] as f64, count))
    }

    /// Logits `(rows, V)` of the last forward pass, when they fit one chunk (tests, generation).
    #[cfg(not(target_arch = "wasm32"))]
    pub fn last_logits(&self, ctx: &Context) -> Result<Vec<f32>> {
        if self.acts.chunk_rows < self.acts.batch * self.acts.seq {
            return Err(GpuModelError::Unsupported("logits of this batch span several chunks".into()));
        }
        Ok(ctx.read_f32(&self.acts.logits)?)
    }
}

/// A site's frozen weight parts in `params` with their biases.
fn site_parts<'p>(
    params: &'p ParameterTensors,
    site: &crate::adapter::Site,
) -> Result<Vec<(&'p Tensor, Option<&'p Tensor>)>> {
    let lp = &params.layers[site.layer];
    Ok(match site.proj {
        Proj::Q => vec![(&lp.wq, lp.bq.as_ref())],
        Proj::K => vec![(&lp.wk, lp.bk.as_ref())],
        Proj::V => vec![(&lp.wv, lp.bv.as_ref())],
        Proj::CAttn => vec![(&lp.wq, lp.bq.as_ref()), (&lp.wk, lp.bk.as_ref()), (&lp.wv, lp.bv.as_ref())],
        Proj::O | Proj::AttnProj => vec![(&lp.wo, lp.bo.as_ref())],
        Proj::Gate => vec![(need(&lp.w_gate)?, lp.b_gate.as_ref())],
        Proj::Up | Proj::Fc => vec![(&lp.w_up, lp.b_up.as_ref())],
        Proj::Down | Proj::MlpProj => vec![(&lp.w_down, lp.b_down.as_ref())],
    })
}

/// Every site's frozen weight parts and biases in `params`, for [`Adapter::bind`]: what an
/// adapter run beside weights it is not attached to (generation) reads.
pub fn site_bases(params: &ParameterTensors, sites: &[crate::adapter::Site]) -> Result<Vec<crate::adapter::SiteBase>> {
    let mut bases = Vec::with_capacity(sites.len());
    for site in sites {
        let parts = site_parts(params, site)?;
        bases.push(crate::adapter::SiteBase {
            parts: parts.iter().map(|(w, _)| (*w).clone()).collect(),
            biases: parts.iter().map(|(_, b)| b.cloned()).collect(),
            conv1d: site.conv1d,
        });
    }
    Ok(bases)
}
