//! Models on the GPU (LLaMA family and GPT-2): parameters uploaded once, activations planned for a
//! fixed batch and sequence length, and the forward pass (and forward + loss + backward) recorded
//! once as a [`Step`] and replayed.
//!
//! Conventions: the residual stream and every activation are row-major `(N, ·)` with
//! N = batch · seq and row n = b · seq + t. LLaMA's linear weights keep `nn.Linear`'s `(out, in)`,
//! so a projection is `y = x·Wᵀ` ([`Matmul::nt`]) and its input gradient `dx = dy·W`; GPT-2's keep
//! `Conv1D`'s `(in, out)`, so `y = x·W + b` ([`Matmul::nn`]) and `dx = dy·Wᵀ`. Every activation
//! the backward pass needs is kept (one tensor per layer and role, except what
//! [`PlanOptions::recompute_mlp`] recomputes); the plan lays them and the gradients out up
//! front by lifetime, so a tensor holds its value only between the phases that write and read it.

use std::fmt;

use super::config::{Arch, ModelConfig};
use super::weights::{HostTensor, RawTensor, Weights};
use crate::adapter::{Adapter, AdapterError, Input, Proj, SiteWeights};
use crate::gpu::plan::{Lifetime, Planner};
use crate::gpu::{Context, DType, GpuError, Step, Tensor};
use crate::ops::act::{gelu_backward, gelu_forward, swiglu_backward, swiglu_forward};
use crate::ops::attention::{
    attention_backward, attention_backward_mm, attention_forward, attention_forward_mm, AttentionScratch,
};
use crate::ops::elementwise::{add_forward, bias_forward};
use crate::ops::embed::{embed_forward, embed_forward_part};
use crate::ops::matmul::{can_fuse_side, matmul, matmul_side, Matmul, Side};
use crate::ops::norm::{layernorm_backward, layernorm_forward, rmsnorm_backward, rmsnorm_forward};
use crate::ops::reduce::reduce_forward;
use crate::ops::rope::{rope_backward, rope_forward};
use crate::ops::xent::{xent_backward, xent_forward, IGNORE};

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
}

type Result<T> = std::result::Result<T, GpuModelError>;

/// One decoder layer's frozen weights.
pub enum LayerParams {
    Llama(Box<LlamaLayer>),
    Gpt2(Box<Gpt2Layer>),
}

/// A LLaMA decoder layer (`nn.Linear` layouts).
pub struct LlamaLayer {
    pub ln1: Tensor,    // (C,)
    pub wq: Tensor,     // (H·hd, C)
    pub wk: Tensor,     // (KV·hd, C)
    pub wv: Tensor,     // (KV·hd, C)
    pub wo: Tensor,     // (C, H·hd)
    pub ln2: Tensor,    // (C,)
    pub w_gate: Tensor, // (F, C)
    pub w_up: Tensor,   // (F, C)
    pub w_down: Tensor, // (C, F)
}

/// A GPT-2 block (`Conv1D` layouts; c_attn split into its q, k and v thirds at upload).
pub struct Gpt2Layer {
    pub ln1_w: Tensor,  // (C,)
    pub ln1_b: Tensor,  // (C,)
    pub wq: Tensor,     // (C, C)
    pub wk: Tensor,     // (C, C)
    pub wv: Tensor,     // (C, C)
    pub bq: Tensor,     // (C,)
    pub bk: Tensor,     // (C,)
    pub bv: Tensor,     // (C,)
    pub wo: Tensor,     // (C, C)  attn.c_proj
    pub bo: Tensor,     // (C,)
    pub ln2_w: Tensor,  // (C,)
    pub ln2_b: Tensor,  // (C,)
    pub w_fc: Tensor,   // (C, F)
    pub b_fc: Tensor,   // (F,)
    pub w_proj: Tensor, // (F, C)  mlp.c_proj
    pub b_proj: Tensor, // (C,)
}

/// A `(rows, cols)` table (token embeddings, LM head) stored as parts of consecutive rows that
/// each fit one storage binding: GPT-2's f32 token embeddings (147 MiB) exceed lavapipe's 128 MiB.
/// Part boundaries are multiples of the storage alignment in columns of the logits, so that each
/// part's logits are a column view of the one logits buffer.
pub struct SplitTable {
    pub parts: Vec<(usize, Tensor)>, // (first row, (part rows, cols))
    pub rows: usize,
    pub cols: usize,
}

impl SplitTable {
    /// Uploads a host table, splitting it when it exceeds one binding (or `max_part_rows`).
    pub fn upload(ctx: &Context, label: &str, t: &HostTensor, max_part_rows: Option<usize>) -> Result<Self> {
        Self::upload_as(ctx, label, t, None, max_part_rows, BaseDType::F32)
    }

    /// As [`SplitTable::upload`], stored as `base` asks (see [`BaseDType`]); each part is packed
    /// on its own.
    pub fn upload_as(
        ctx: &Context,
        label: &str,
        t: &HostTensor,
        raw: Option<&RawTensor>,
        max_part_rows: Option<usize>,
        base: BaseDType,
    ) -> Result<Self> {
        let (rows, cols) = (t.shape[0], t.shape[1]);
        let align_rows = (ctx.limits().storage_offset_alignment as usize / 4).max(1);
        // Sized for f32 rows even when packed: the logits of a part are a column view.
        let fit = (ctx.limits().max_storage_binding / (cols as u64 * 4)).max(1) as usize;
        let part = max_part_rows.unwrap_or(fit).min(fit);
        let part = if part >= rows { rows } else { (part / align_rows * align_rows).max(align_rows) };
        let mut parts = Vec::new();
        for first in (0..rows).step_by(part) {
            let n = part.min(rows - first);
            let data = HostTensor { shape: vec![n, cols], data: t.data[first * cols..(first + n) * cols].to_vec() };
            let part_raw = raw.map(|r| {
                let row_bytes = r.bytes.len() / rows;
                RawTensor { ty: r.ty, bytes: r.bytes[first * row_bytes..(first + n) * row_bytes].to_vec() }
            });
            parts.push((first, upload_matrix(ctx, label, &data, part_raw.as_ref(), base)?));
        }
        Ok(SplitTable { parts, rows, cols })
    }

    /// `out[t] = table[ids[t]]`.
    pub fn embed(&self, ctx: &Context, s: &mut Step, ids: &Tensor, out: &Tensor) -> Result<()> {
        for (first, part) in &self.parts {
            embed_forward_part(ctx, s, ids, part, *first, out)?;
        }
        Ok(())
    }

    /// `logits = x · tableᵀ` for logits `(n, rows)`, part by part into column views.
    pub fn project(&self, ctx: &Context, s: &mut Step, x: &Tensor, logits: &Tensor) -> Result<()> {
        let align = ctx.limits().storage_offset_alignment;
        for (first, part) in &self.parts {
            let out =
                if self.parts.len() == 1 { logits.clone() } else { logits.cols(*first, part.shape()[0], align)? };
            matmul(ctx, s, x, part, &out, Matmul::nt())?;
        }
        Ok(())
    }

    /// The input gradient of [`SplitTable::project`]: `dx = dlogits · table`, summed over parts.
    pub fn project_backward(&self, ctx: &Context, s: &mut Step, dlogits: &Tensor, dx: &Tensor) -> Result<()> {
        let align = ctx.limits().storage_offset_alignment;
        for (i, (first, part)) in self.parts.iter().enumerate() {
            let dl =
                if self.parts.len() == 1 { dlogits.clone() } else { dlogits.cols(*first, part.shape()[0], align)? };
            matmul(ctx, s, &dl, part, dx, Matmul::nn().accumulate(i > 0))?;
        }
        Ok(())
    }
}

/// The frozen base model's weights on the GPU, f32.
pub struct ParameterTensors {
    pub embed: SplitTable,         // (V, C)
    pub pos_embed: Option<Tensor>, // (P, C) GPT-2's learned positions
    pub layers: Vec<LayerParams>,
    pub norm: Tensor,                // (C,)
    pub norm_bias: Option<Tensor>,   // (C,) GPT-2's ln_f bias
    pub lm_head: Option<SplitTable>, // (V, C); None when tied to `embed`
}

/// One layer's activations for a batch of N = B·T tokens. Fields marked LLaMA or GPT-2 exist
/// for that architecture only. (Generic only so that the planner can build the same structure
/// of request ids first; everywhere else `T` is [`Tensor`].)
pub struct LayerActivations<T = Tensor> {
    pub h1: T,            // (N, C)    norm(x)
    pub mean1: Option<T>, // (N,)      GPT-2: LayerNorm mean
    pub rstd1: T,         // (N,)
    pub q: T,             // (N, H·hd)  (LLaMA: before rotary)
    pub k: T,             // (N, KV·hd)
    pub v: T,             // (N, KV·hd)
    pub q_rot: Option<T>, // (N, H·hd)  LLaMA
    pub k_rot: Option<T>, // (N, KV·hd) LLaMA
    pub att: T,           // (N, H·hd)  attention output before the output projection
    pub lse: T,           // (B, H, T)  softmax log-sum-exp per query row
    pub o: T,             // (N, C)    output projection
    pub x_mid: T,         // (N, C)    x + o
    pub h2: T,            // (N, C)    norm(x_mid)
    pub mean2: Option<T>, // (N,)      GPT-2
    pub rstd2: T,         // (N,)
    pub gate: T,          // (N, F)    LLaMA: gate_proj output; GPT-2: c_fc output before GELU
    pub up: Option<T>,    // (N, F)    LLaMA
    pub act: T,           // (N, F)    LLaMA: silu(gate)·up; GPT-2: gelu(c_fc)
    pub down: T,          // (N, C)
    /// With [`PlanOptions::recompute_mlp`]: where the backward pass recomputes the MLP's inputs.
    pub recomputed: Option<Recomputed<T>>,
}

/// What the backward pass recomputes instead of keeping (activation checkpointing of the MLP):
/// the second norm's output (unless an adapter keeps it) and the up-projections from it.
pub struct Recomputed<T = Tensor> {
    pub h2: T,         // (N, C)  norm(x_mid) again; the kept `h2` when an adapter keeps it
    pub gate: T,       // (N, F)
    pub up: Option<T>, // (N, F)  LLaMA
}

impl<T> LayerActivations<T> {
    fn map<U>(self, mut f: impl FnMut(T) -> U) -> LayerActivations<U> {
        LayerActivations {
            h1: f(self.h1),
            mean1: self.mean1.map(&mut f),
            rstd1: f(self.rstd1),
            q: f(self.q),
            k: f(self.k),
            v: f(self.v),
            q_rot: self.q_rot.map(&mut f),
            k_rot: self.k_rot.map(&mut f),
            att: f(self.att),
            lse: f(self.lse),
            o: f(self.o),
            x_mid: f(self.x_mid),
            h2: f(self.h2),
            mean2: self.mean2.map(&mut f),
            rstd2: f(self.rstd2),
            gate: f(self.gate),
            up: self.up.map(&mut f),
            act: f(self.act),
            down: f(self.down),
            recomputed: self.recomputed.map(|r| Recomputed { h2: f(r.h2), gate: f(r.gate), up: r.up.map(&mut f) }),
        }
    }
}

/// Every activation of one forward pass, sized from the config and (batch, seq).
pub struct Activations {
    pub batch: usize,
    pub seq: usize,
    pub ids: Tensor,             // (N,) u32
    pub targets: Tensor,         // (N,) u32, IGNORE where nothing is predicted
    pub pos_ids: Option<Tensor>, // (N,) u32 positions, GPT-2
    pub emb: Option<Tensor>,     // (N, C) token embeddings before positions are added, GPT-2
    pub pos: Option<Tensor>,     // (N, C) position embeddings, GPT-2
    pub x: Vec<Tensor>,          // L+1 × (N, C): the residual stream entering each layer, and the last
    pub layers: Vec<LayerActivations>,
    pub hf: Tensor,            // (N, C)  final norm
    pub meanf: Option<Tensor>, // (N,)    GPT-2
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
    pub dx: Vec<T>, // L+1 × (N, C): d loss / d residual stream entering layer l (dx[L]: the final norm)
    pub dhf: T,     // (N, C)
    pub d_xmid: T,  // (N, C)
    pub d_h: T,     // (N, C)
    pub d_act: T,   // (N, F)
    pub d_gate: T,  // (N, F)
    pub d_up: T,    // (N, F)
    pub d_att: T,   // (N, H·hd)
    pub d_qrot: T,  // (N, H·hd)
    pub d_q: T,     // (N, H·hd)
    pub d_krot: T,  // (N, KV·hd)
    pub d_k: T,     // (N, KV·hd)
    pub d_v: T,     // (N, KV·hd)
    pub dsum: T,    // (B, H, T) attention backward scratch
}

impl<T> Gradients<T> {
    fn map<U>(self, mut f: impl FnMut(T) -> U) -> Gradients<U> {
        Gradients {
            dx: self.dx.into_iter().map(&mut f).collect(),
            dhf: f(self.dhf),
            d_xmid: f(self.d_xmid),
            d_h: f(self.d_h),
            d_act: f(self.d_act),
            d_gate: f(self.d_gate),
            d_up: f(self.d_up),
            d_att: f(self.d_att),
            d_qrot: f(self.d_qrot),
            d_q: f(self.d_q),
            d_krot: f(self.d_krot),
            d_k: f(self.d_k),
            d_v: f(self.d_v),
            dsum: f(self.dsum),
        }
    }
}

/// How the frozen base's matrices (projections, token embeddings, LM head) are stored on the
/// GPU. Packed types are dequantized inside the kernels that read them (QLoRA-style: no f32
/// copy); norms, biases and position tables stay f32, as do the adapters and optimizer state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BaseDType {
    /// As the file stores them: a GGUF's Q8_0 / Q4_0 / Q4_1 / f16 tensors stay packed (LLaMA
    /// family, on adapters with subgroup operations); everything else f32.
    #[default]
    Auto,
    F32,
    F16,
    Q8_0,
    Q4_0,
    Q4_1,
}

impl BaseDType {
    pub const ALL: [BaseDType; 6] =
        [BaseDType::Auto, BaseDType::F32, BaseDType::F16, BaseDType::Q8_0, BaseDType::Q4_0, BaseDType::Q4_1];
    pub fn name(self) -> &'static str {
        match self {
            BaseDType::Auto => "auto",
            BaseDType::F32 => "f32",
            BaseDType::F16 => "f16",
            BaseDType::Q8_0 => "q8_0",
            BaseDType::Q4_0 => "q4_0",
            BaseDType::Q4_1 => "q4_1",
        }
    }
    fn dtype(self) -> Option<DType> {
        match self {
            BaseDType::Auto => None,
            BaseDType::F32 => Some(DType::F32),
            BaseDType::F16 => Some(DType::F16),
            BaseDType::Q8_0 => Some(DType::Q8_0),
            BaseDType::Q4_0 => Some(DType::Q4_0),
            BaseDType::Q4_1 => Some(DType::Q4_1),
        }
    }
}

impl fmt::Display for BaseDType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for BaseDType {
    type Err = GpuModelError;
    fn from_str(s: &str) -> Result<Self> {
        let t = s.trim().to_ascii_lowercase().replace('-', "_");
        BaseDType::ALL.into_iter().find(|d| d.name() == t).ok_or_else(|| {
            GpuModelError::Unsupported(format!(
                "unknown base dtype {s:?}; use one of {}",
                BaseDType::ALL.map(|d| d.name()).join(", ")
            ))
        })
    }
}

/// Uploads the 2-D frozen matrix `name` as `base` asks: the file's own bytes where they are
/// already that type, else quantized from f32 on the host (ggml's reference quantizers), else
/// f32 (shapes whose rows are not whole blocks; adapters without subgroup operations).
fn upload_matrix(
    ctx: &Context,
    name: &str,
    data: &HostTensor,
    raw: Option<&RawTensor>,
    base: BaseDType,
) -> Result<Tensor> {
    use crate::ops::quant;
    let want = match base.dtype() {
        Some(d) => d,
        None => raw.and_then(|r| quant::dtype_of(r.ty)).unwrap_or(DType::F32),
    };
    if want == DType::F32 || data.shape.len() != 2 || !quant::fits(want, &data.shape) {
        return Ok(ctx.upload_f32(name, &data.shape, &data.data)?);
    }
    if !ctx.features().subgroups {
        if base == BaseDType::Auto {
            return Ok(ctx.upload_f32(name, &data.shape, &data.data)?);
        }
        return Err(GpuModelError::Unsupported(format!(
            "--base-dtype {base} needs subgroup operations, which adapter {:?} lacks; use --base-dtype f32",
            ctx.info().name
        )));
    }
    let ty = quant::ggml_of(want).expect("packed dtype");
    let words = match raw {
        Some(r) if r.ty == ty => quant::pack(ty, &r.bytes),
        _ => quant::pack(ty, &quant::quantize(ty, &data.data)),
    };
    Ok(ctx.upload_packed(name, want, &data.shape, &words)?)
}

/// How the plan splits what could exceed one storage binding (`None` picks the largest that
/// fits), whether it plans for training, and what it keeps per layer.
#[derive(Clone, Debug, Default)]
pub struct PlanOptions {
    /// Rows of logits computed at a time (a positive multiple of 64; default: what fits 32 MiB).
    pub logit_chunk_rows: Option<usize>,
    /// Rows per part of the token-embedding / LM-head tables.
    pub table_part_rows: Option<usize>,
    /// Projection inputs kept per layer for an adapter's backward pass. The frozen base's own
    /// backward never reads them, so by default each is one tensor shared by all layers.
    pub keep_inputs: Vec<Input>,
    /// How the frozen matrices are stored (default here: f32; `Auto` keeps a GGUF's types).
    pub base_dtype: Option<BaseDType>,
    /// Plan (and record) the training step too. Without it the plan is for the forward pass
    /// alone, and a layer's activations share memory with the next layer's.
    pub backward: bool,
    /// Recompute the MLP's up-projections (and the norm before them) in the backward pass
    /// instead of keeping them: activation checkpointing of the largest per-layer activations,
    /// for two more projections per layer (LLaMA: gate and up, (N, F) each; GPT-2: c_fc).
    pub recompute_mlp: bool,
    /// Keep every layer's input gradient `dx[l]` after the step (tests inspect them); by default
    /// they share memory two layers apart.
    pub keep_layer_grads: bool,
}

/// A model on the GPU with its forward pass (and, for training, forward + backward) recorded
/// for one (batch, seq).
pub struct GpuModel {
    pub config: ModelConfig,
    pub params: ParameterTensors,
    pub acts: Activations,
    pub grads: Option<Gradients>,
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

fn upload(ctx: &Context, w: &Weights, name: &str) -> Result<Tensor> {
    let t = w.get(name).map_err(|e| GpuModelError::Unsupported(e.to_string()))?;
    Ok(ctx.upload_f32(name, &t.shape, &t.data)?)
}

/// Columns `part · C .. (part + 1) · C` of a row-major `(rows, 3C)` matrix (GPT-2's fused c_attn).
fn third(data: &[f32], rows: usize, part: usize) -> Vec<f32> {
    let c3 = data.len() / rows;
    let c = c3 / 3;
    (0..rows).flat_map(|r| data[r * c3 + part * c..r * c3 + (part + 1) * c].iter().copied()).collect()
}

impl ParameterTensors {
    pub fn upload(ctx: &Context, w: &Weights) -> Result<Self> {
        Self::upload_with(ctx, w, None)
    }

    /// As [`ParameterTensors::upload`], splitting the vocabulary tables into parts of at most
    /// `table_part_rows` rows (tests use it to exercise the split on small models).
    pub fn upload_with(ctx: &Context, w: &Weights, table_part_rows: Option<usize>) -> Result<Self> {
        Self::upload_as(ctx, w, table_part_rows, BaseDType::F32)
    }

    /// As [`ParameterTensors::upload_with`], with the frozen matrices stored as `base` asks.
    pub fn upload_as(ctx: &Context, w: &Weights, table_part_rows: Option<usize>, base: BaseDType) -> Result<Self> {
        let _kind = ctx.alloc_kind("weights");
        let c = &w.config;
        let get = |name: &str| w.get(name).map_err(|e| GpuModelError::Unsupported(e.to_string()));
        let table = |name: &str| -> Result<SplitTable> {
            SplitTable::upload_as(ctx, name, get(name)?, w.raw.get(name), table_part_rows, base)
        };
        let matrix = |name: &str| -> Result<Tensor> { upload_matrix(ctx, name, get(name)?, w.raw.get(name), base) };
        let mut layers = Vec::with_capacity(c.num_layers);
        for i in 0..c.num_layers {
            layers.push(match c.arch {
                Arch::Llama => {
                    let p = |n: &str| upload(ctx, w, &format!("model.layers.{i}.{n}"));
                    let m = |n: &str| matrix(&format!("model.layers.{i}.{n}"));
                    LayerParams::Llama(Box::new(LlamaLayer {
                        ln1: p("input_layernorm.weight")?,
                        wq: m("self_attn.q_proj.weight")?,
                        wk: m("self_attn.k_proj.weight")?,
                        wv: m("self_attn.v_proj.weight")?,
                        wo: m("self_attn.o_proj.weight")?,
                        ln2: p("post_attention_layernorm.weight")?,
                        w_gate: m("mlp.gate_proj.weight")?,
                        w_up: m("mlp.up_proj.weight")?,
                        w_down: m("mlp.down_proj.weight")?,
                    }))
                }
                Arch::Gpt2 => {
                    let name = |n: &str| format!("transformer.h.{i}.{n}");
                    let p = |n: &str| upload(ctx, w, &name(n));
                    let get = |n: &str| w.get(&name(n)).map_err(|e| GpuModelError::Unsupported(e.to_string()));
                    let (aw, ab) = (get("attn.c_attn.weight")?, get("attn.c_attn.bias")?);
                    let h = c.hidden_size;
                    let part = |k: usize| -> Result<(Tensor, Tensor)> {
                        let w3 = HostTensor { shape: vec![h, h], data: third(&aw.data, h, k) };
                        Ok((
                            upload_matrix(ctx, &name("attn.c_attn.weight"), &w3, None, base)?,
                            ctx.upload_f32(&name("attn.c_attn.bias"), &[h], &third(&ab.data, 1, k))?,
                        ))
                    };
                    let ((wq, bq), (wk, bk), (wv, bv)) = (part(0)?, part(1)?, part(2)?);
                    LayerParams::Gpt2(Box::new(Gpt2Layer {
                        ln1_w: p("ln_1.weight")?,
                        ln1_b: p("ln_1.bias")?,
                        wq,
                        wk,
                        wv,
                        bq,
                        bk,
                        bv,
                        wo: matrix(&name("attn.c_proj.weight"))?,
                        bo: p("attn.c_proj.bias")?,
                        ln2_w: p("ln_2.weight")?,
                        ln2_b: p("ln_2.bias")?,
                        w_fc: matrix(&name("mlp.c_fc.weight"))?,
                        b_fc: p("mlp.c_fc.bias")?,
                        w_proj: matrix(&name("mlp.c_proj.weight"))?,
                        b_proj: p("mlp.c_proj.bias")?,
                    }))
                }
            });
        }
        let lm_head = if c.tie_embeddings { None } else { Some(table("lm_head.weight")?) };
        Ok(match c.arch {
            Arch::Llama => ParameterTensors {
                embed: table("model.embed_tokens.weight")?,
                pos_embed: None,
                layers,
                norm: upload(ctx, w, "model.norm.weight")?,
                norm_bias: None,
                lm_head,
            },
            Arch::Gpt2 => ParameterTensors {
                embed: table("transformer.wte.weight")?,
                pos_embed: Some(upload(ctx, w, "transformer.wpe.weight")?),
                layers,
                norm: upload(ctx, w, "transformer.ln_f.weight")?,
                norm_bias: Some(upload(ctx, w, "transformer.ln_f.bias")?),
                lm_head,
            },
        })
    }
}

/// The logits buffer's budget (see [`GpuModel::plan`]).
const LOGIT_CHUNK_BYTES: u64 = 32 << 20;
/// The budget of attention's score matrices on the matmul path (see [`GpuModel::plan`]).
const ATTENTION_SCORES_BYTES: u64 = 32 << 20;

/// An activation that exists for one architecture only (planned in [`GpuModel::plan`]).
fn need(t: &Option<Tensor>) -> Result<&Tensor> {
    t.as_ref().ok_or_else(|| GpuModelError::Unsupported("an activation of another architecture was asked for".into()))
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
        let params =
            ParameterTensors::upload_as(ctx, w, opts.table_part_rows, opts.base_dtype.unwrap_or(BaseDType::F32))?;
        let (acts, grads) = Self::plan(ctx, &c, batch, seq, &opts)?;
        let mut model = GpuModel {
            config: c,
            params,
            acts,
            grads,
            forward: Step::new(),
            train: None,
            adapter: None,
            merged: false,
            opts,
        };
        model.forward = model.record_forward(ctx, false)?;
        Ok(model)
    }

    /// Makes the model trainable: records forward + loss + backward as one step. A model
    /// planned for the forward pass alone (whose layers share activation memory) is planned
    /// again for training first.
    pub fn enable_backward(&mut self, ctx: &Context) -> Result<()> {
        if let Some(a) = self.adapter.as_deref() {
            self.check_kept_inputs(a)?;
        }
        if self.train.is_some() {
            return Ok(());
        }
        if self.grads.is_none() {
            self.opts.backward = true;
            let (acts, grads) = Self::plan(ctx, &self.config, self.acts.batch, self.acts.seq, &self.opts)?;
            (self.acts, self.grads) = (acts, grads);
            self.forward = self.record_forward(ctx, false)?;
        }
        self.train = Some(self.record_forward(ctx, true)?);
        Ok(())
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
    fn plan(
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
        let llama = c.arch == Arch::Llama;
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
        let gpt2 = (!llama).then(|| (add("emb", &[n, h], 0, 0), add("pos", &[n, h], 0, 0)));
        let mut layers = Vec::with_capacity(nl);
        for l in 0..nl {
            let kept = back(l);
            let input = |i: Input| if keep(i) { kept } else { l };
            let qk = if llama { l } else { kept };
            let mlp = if recompute { l } else { kept };
            let h2 = add("h2", &[n, h], l, input(Input::H2));
            layers.push(LayerActivations {
                h1: add("h1", &[n, h], l, input(Input::H1)),
                mean1: (!llama).then(|| add("mean1", &[n], l, kept)),
                rstd1: add("rstd1", &[n], l, kept),
                q: add("q", &[n, q], l, qk),
                k: add("k", &[n, kv], l, qk),
                v: add("v", &[n, kv], l, kept),
                q_rot: llama.then(|| add("q_rot", &[n, q], l, kept)),
                k_rot: llama.then(|| add("k_rot", &[n, kv], l, kept)),
                att: add("att", &[n, q], l, kept),
                lse: add("lse", &[batch, c.num_heads, seq], l, kept),
                o: add("o", &[n, h], l, l),
                x_mid: add("x_mid", &[n, h], l, kept),
                h2,
                mean2: (!llama).then(|| add("mean2", &[n], l, kept)),
                rstd2: add("rstd2", &[n], l, kept),
                gate: add("gate", &[n, f], l, mlp),
                up: llama.then(|| add("up", &[n, f], l, mlp)),
                act: add("act", &[n, f], l, input(Input::Act)),
                down: add("down", &[n, h], l, l),
                recomputed: recompute.then(|| Recomputed {
                    h2: if keep(Input::H2) { h2 } else { add("h2 (recomputed)", &[n, h], kept, kept) },
                    gate: add("gate (recomputed)", &[n, f], kept, kept),
                    up: llama.then(|| add("up (recomputed)", &[n, f], kept, kept)),
                }),
            });
        }
        // Logit chunks: as many rows as fit 32 MiB (and one storage binding), a multiple of 64
        // rows so that every chunk's offset into the (N, C) activations is 256-byte aligned.
        // Larger chunks gain nothing measurable (SmolLM2, 512 rows: 11.16 s of GPU time per step
        // in one chunk, 11.18 s in chunks of 128) and would hold 96 MiB instead of 24.
        let row_bytes = (c.vocab_size * 4) as u64;
        let fit = (ctx.limits().max_storage_binding.min(LOGIT_CHUNK_BYTES) / row_bytes).max(1) as usize;
        let chunk_rows = match opts.logit_chunk_rows {
            Some(r) if r > 0 && r % 64 == 0 => r.min(n),
            Some(r) => {
                return Err(GpuModelError::Unsupported(format!(
                    "logit chunks of {r} rows: use a positive multiple of 64"
                )))
            }
            None if fit >= n => n,
            None => (fit / 64 * 64).max(64).min(n),
        };
        // Attention as batched matrix products where its score matrices fit 32 MiB (the fused
        // kernels otherwise; PORTALORA_ATTENTION=fused forces them, for comparisons).
        let shape = c.attention_shape(batch, seq, 0);
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
        let meanf = (!llama).then(|| add("meanf", &[n], head, head));
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
                d_gate: scratch("d_gate", &[n, f]),
                d_up: scratch("d_up", &[n, f]),
                d_att: scratch("d_att", &[n, q]),
                d_qrot: scratch("d_qrot", &[n, q]),
                d_q: scratch("d_q", &[n, q]),
                d_krot: scratch("d_krot", &[n, kv]),
                d_k: scratch("d_k", &[n, kv]),
                d_v: scratch("d_v", &[n, kv]),
                dsum: scratch("dsum", &[batch, c.num_heads, seq]),
            }
        });
        let planned = p.allocate(ctx)?;
        let g = |id: usize| planned.get(id);
        let layers: Vec<LayerActivations> = layers.into_iter().map(|la| la.map(g)).collect();
        // What the backward pass reads, per layer and for the stack of residual streams.
        let mut kept_bytes = 0u64;
        if train {
            for la in &layers {
                let mut ts: Vec<&Tensor> = vec![&la.rstd1, &la.v, &la.att, &la.lse, &la.x_mid, &la.rstd2];
                ts.extend([&la.mean1, &la.q_rot, &la.k_rot, &la.mean2].into_iter().flatten());
                if !recompute {
                    ts.push(&la.gate);
                    ts.extend(&la.up);
                }
                if !llama {
                    ts.extend([&la.q, &la.k]);
                }
                for (input, tensor) in [(Input::H1, &la.h1), (Input::H2, &la.h2), (Input::Act, &la.act)] {
                    if keep(input) {
                        ts.push(tensor);
                    }
                }
                kept_bytes += ts.iter().map(|t| t.byte_len()).sum::<u64>();
            }
            kept_bytes += ((nl + 1) * n * h * 4) as u64;
        }
        let pos_ids = if llama {
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
            emb: gpt2.map(|e| g(e.0)),
            pos: gpt2.map(|e| g(e.1)),
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

    /// Records the forward pass and the loss; with `backward`, also the gradient of the mean loss
    /// over every predicted position of a full batch (scale 1 / (B·(T−1))) back to the input of
    /// every layer, in exact reverse order.
    fn record_forward(&self, ctx: &Context, backward: bool) -> Result<Step> {
        let c = &self.config;
        let (p, a) = (&self.params, &self.acts);
        let (b, t) = (a.batch, a.seq);
        let eps = c.norm_eps as f32;
        let mut s = Step::new();
        match &p.pos_embed {
            None => p.embed.embed(ctx, &mut s, &a.ids, &a.x[0])?,
            Some(wpe) => {
                p.embed.embed(ctx, &mut s, &a.ids, need(&a.emb)?)?;
                embed_forward(ctx, &mut s, need(&a.pos_ids)?, wpe, need(&a.pos)?)?;
                add_forward(ctx, &mut s, need(&a.emb)?, need(&a.pos)?, &a.x[0])?;
            }
        }
        let shape = c.attention_shape(b, t, 0);
        let (rope_q, rope_k) = c.rope_shapes(t, 0);
        for (l, (lp, la)) in p.layers.iter().zip(&a.layers).enumerate() {
            let x = &a.x[l];
            match lp {
                LayerParams::Llama(lp) => {
                    let (q_rot, k_rot) = (need(&la.q_rot)?, need(&la.k_rot)?);
                    rmsnorm_forward(ctx, &mut s, x, &lp.ln1, eps, &la.h1, &la.rstd1)?;
                    let f =
                        self.frozen_matmul(ctx, &mut s, backward, l, Proj::Q, &la.h1, &lp.wq, &la.q, Matmul::nt())?;
                    self.adapt_forward(ctx, &mut s, backward, l, Proj::Q, &la.h1, &[&la.q], f)?;
                    let f =
                        self.frozen_matmul(ctx, &mut s, backward, l, Proj::K, &la.h1, &lp.wk, &la.k, Matmul::nt())?;
                    self.adapt_forward(ctx, &mut s, backward, l, Proj::K, &la.h1, &[&la.k], f)?;
                    let f =
                        self.frozen_matmul(ctx, &mut s, backward, l, Proj::V, &la.h1, &lp.wv, &la.v, Matmul::nt())?;
                    self.adapt_forward(ctx, &mut s, backward, l, Proj::V, &la.h1, &[&la.v], f)?;
                    rope_forward(ctx, &mut s, rope_q, &la.q, q_rot)?;
                    rope_forward(ctx, &mut s, rope_k, &la.k, k_rot)?;
                    match &a.attn {
                        Some(sc) => {
                            attention_forward_mm(ctx, &mut s, shape, q_rot, k_rot, &la.v, &la.att, &la.lse, sc)?
                        }
                        None => attention_forward(ctx, &mut s, shape, q_rot, k_rot, &la.v, &la.att, &la.lse)?,
                    }
                    let f =
                        self.frozen_matmul(ctx, &mut s, backward, l, Proj::O, &la.att, &lp.wo, &la.o, Matmul::nt())?;
                    self.adapt_forward(ctx, &mut s, backward, l, Proj::O, &la.att, &[&la.o], f)?;
                    add_forward(ctx, &mut s, x, &la.o, &la.x_mid)?;
                    rmsnorm_forward(ctx, &mut s, &la.x_mid, &lp.ln2, eps, &la.h2, &la.rstd2)?;
                    let f = self.frozen_matmul(
                        ctx,
                        &mut s,
                        backward,
                        l,
                        Proj::Gate,
                        &la.h2,
                        &lp.w_gate,
                        &la.gate,
                        Matmul::nt(),
                    )?;
                    self.adapt_forward(ctx, &mut s, backward, l, Proj::Gate, &la.h2, &[&la.gate], f)?;
                    let f = self.frozen_matmul(
                        ctx,
                        &mut s,
                        backward,
                        l,
                        Proj::Up,
                        &la.h2,
                        &lp.w_up,
                        need(&la.up)?,
                        Matmul::nt(),
                    )?;
                    self.adapt_forward(ctx, &mut s, backward, l, Proj::Up, &la.h2, &[need(&la.up)?], f)?;
                    swiglu_forward(ctx, &mut s, &la.gate, need(&la.up)?, &la.act)?;
                    let f = self.frozen_matmul(
                        ctx,
                        &mut s,
                        backward,
                        l,
                        Proj::Down,
                        &la.act,
                        &lp.w_down,
                        &la.down,
                        Matmul::nt(),
                    )?;
                    self.adapt_forward(ctx, &mut s, backward, l, Proj::Down, &la.act, &[&la.down], f)?;
                }
                LayerParams::Gpt2(lp) => {
                    layernorm_forward(ctx, &mut s, x, &lp.ln1_w, &lp.ln1_b, eps, &la.h1, need(&la.mean1)?, &la.rstd1)?;
                    // The adapter's z rides along with the q third's product.
                    let f =
                        self.frozen_matmul(ctx, &mut s, backward, l, Proj::CAttn, &la.h1, &lp.wq, &la.q, Matmul::nn())?;
                    matmul(ctx, &mut s, &la.h1, &lp.wk, &la.k, Matmul::nn())?;
                    matmul(ctx, &mut s, &la.h1, &lp.wv, &la.v, Matmul::nn())?;
                    for (bias, out) in [(&lp.bq, &la.q), (&lp.bk, &la.k), (&lp.bv, &la.v)] {
                        bias_forward(ctx, &mut s, bias, out)?;
                    }
                    self.adapt_forward(ctx, &mut s, backward, l, Proj::CAttn, &la.h1, &[&la.q, &la.k, &la.v], f)?;
                    match &a.attn {
                        Some(sc) => {
                            attention_forward_mm(ctx, &mut s, shape, &la.q, &la.k, &la.v, &la.att, &la.lse, sc)?
                        }
                        None => attention_forward(ctx, &mut s, shape, &la.q, &la.k, &la.v, &la.att, &la.lse)?,
                    }
                    let f = self.frozen_matmul(
                        ctx,
                        &mut s,
                        backward,
                        l,
                        Proj::AttnProj,
                        &la.att,
                        &lp.wo,
                        &la.o,
                        Matmul::nn(),
                    )?;
                    bias_forward(ctx, &mut s, &lp.bo, &la.o)?;
                    self.adapt_forward(ctx, &mut s, backward, l, Proj::AttnProj, &la.att, &[&la.o], f)?;
                    add_forward(ctx, &mut s, x, &la.o, &la.x_mid)?;
                    layernorm_forward(
                        ctx,
                        &mut s,
                        &la.x_mid,
                        &lp.ln2_w,
                        &lp.ln2_b,
                        eps,
                        &la.h2,
                        need(&la.mean2)?,
                        &la.rstd2,
                    )?;
                    let f = self.frozen_matmul(
                        ctx,
                        &mut s,
                        backward,
                        l,
                        Proj::Fc,
                        &la.h2,
                        &lp.w_fc,
                        &la.gate,
                        Matmul::nn(),
                    )?;
                    bias_forward(ctx, &mut s, &lp.b_fc, &la.gate)?;
                    self.adapt_forward(ctx, &mut s, backward, l, Proj::Fc, &la.h2, &[&la.gate], f)?;
                    gelu_forward(ctx, &mut s, &la.gate, &la.act)?;
                    let f = self.frozen_matmul(
                        ctx,
                        &mut s,
                        backward,
                        l,
                        Proj::MlpProj,
                        &la.act,
                        &lp.w_proj,
                        &la.down,
                        Matmul::nn(),
                    )?;
                    bias_forward(ctx, &mut s, &lp.b_proj, &la.down)?;
                    self.adapt_forward(ctx, &mut s, backward, l, Proj::MlpProj, &la.act, &[&la.down], f)?;
                }
            }
            add_forward(ctx, &mut s, &la.x_mid, &la.down, &a.x[l + 1])?;
        }
        let x_last = &a.x[c.num_layers];
        match &p.norm_bias {
            None => rmsnorm_forward(ctx, &mut s, x_last, &p.norm, eps, &a.hf, &a.rstdf)?,
            Some(bias) => layernorm_forward(ctx, &mut s, x_last, &p.norm, bias, eps, &a.hf, need(&a.meanf)?, &a.rstdf)?,
        }
        let head = p.lm_head.as_ref().unwrap_or(&p.embed);
        let n = b * t;
        let align = ctx.limits().storage_offset_alignment;
        let grads = if backward { self.grads.as_ref() } else { None };
        let mut start = 0;
        while start < n {
            // The LM head, the loss and (in training) their backward, one chunk of rows at a time
            // through the one logits buffer: the vocabulary-sized activation never exists whole.
            let rows = a.chunk_rows.min(n - start);
            let logits = a.logits.rows(0, rows, align)?;
            let targets = a.targets.rows(start, rows, align)?;
            let lse = a.lse_rows.rows(start, rows, align)?;
            head.project(ctx, &mut s, &a.hf.rows(start, rows, align)?, &logits)?;
            xent_forward(ctx, &mut s, &logits, &targets, &a.loss_rows.rows(start, rows, align)?, &lse)?;
            if let Some(g) = grads {
                xent_backward(ctx, &mut s, &logits, &targets, &lse, &a.loss_scale)?;
                head.project_backward(ctx, &mut s, &logits, &g.dhf.rows(start, rows, align)?)?;
            }
            start += rows;
        }
        reduce_forward(ctx, &mut s, &a.loss_rows.reshape(&[1, n])?, 1, false, &a.loss_sum)?;
        if let Some(g) = grads {
            self.record_backward(ctx, &mut s, g)?;
        }
        Ok(s)
    }

    /// The backward pass from `dhf` down to `dx[0]`. Each linear projection's input gradient is
    /// `dx = dy·W` (and `+=` where several projections share an input): the places where an
    /// adapter adds its own term and computes its parameter gradients.
    fn record_backward(&self, ctx: &Context, s: &mut Step, g: &Gradients) -> Result<()> {
        let c = &self.config;
        let (p, a) = (&self.params, &self.acts);
        let (b, t) = (a.batch, a.seq);
        let shape = c.attention_shape(b, t, 0);
        let (rope_q, rope_k) = c.rope_shapes(t, 0);
        let eps = c.norm_eps as f32;
        let last = c.num_layers;
        match &a.meanf {
            None => rmsnorm_backward(ctx, s, &a.x[last], &p.norm, &a.rstdf, &g.dhf, None, &g.dx[last])?,
            Some(meanf) => layernorm_backward(ctx, s, &a.x[last], &p.norm, meanf, &a.rstdf, &g.dhf, None, &g.dx[last])?,
        }
        for l in (0..c.num_layers).rev() {
            let la = &a.layers[l];
            let dxo = &g.dx[l + 1];
            match &p.layers[l] {
                LayerParams::Llama(lp) => {
                    let acc = Matmul::nn().accumulate(true);
                    // MLP: down_proj, swiglu, gate_proj + up_proj, post-attention norm (+ residual).
                    let (h2, gate, up) = match &la.recomputed {
                        None => (&la.h2, &la.gate, need(&la.up)?),
                        Some(rc) => {
                            // Activation checkpointing: the same kernels as the forward pass, on
                            // the same inputs, give the same values bit for bit.
                            if !self.opts.keep_inputs.contains(&Input::H2) {
                                rmsnorm_forward(ctx, s, &la.x_mid, &lp.ln2, eps, &rc.h2, &la.rstd2)?;
                            }
                            let up = need(&rc.up)?;
                            for (proj, w, y) in [(Proj::Gate, &lp.w_gate, &rc.gate), (Proj::Up, &lp.w_up, up)] {
                                let fused = self.frozen_matmul(ctx, s, true, l, proj, &rc.h2, w, y, Matmul::nt())?;
                                self.adapt_forward(ctx, s, true, l, proj, &rc.h2, &[y], fused)?;
                            }
                            (&rc.h2, &rc.gate, up)
                        }
                    };
                    matmul(ctx, s, dxo, &lp.w_down, &g.d_act, Matmul::nn())?;
                    self.adapt_backward(ctx, s, l, Proj::Down, &la.act, &[dxo], &g.d_act)?;
                    swiglu_backward(ctx, s, gate, up, &g.d_act, &g.d_gate, &g.d_up)?;
                    matmul(ctx, s, &g.d_gate, &lp.w_gate, &g.d_h, Matmul::nn())?;
                    matmul(ctx, s, &g.d_up, &lp.w_up, &g.d_h, acc)?;
                    self.adapt_backward(ctx, s, l, Proj::Gate, h2, &[&g.d_gate], &g.d_h)?;
                    self.adapt_backward(ctx, s, l, Proj::Up, h2, &[&g.d_up], &g.d_h)?;
                    rmsnorm_backward(ctx, s, &la.x_mid, &lp.ln2, &la.rstd2, &g.d_h, Some(dxo), &g.d_xmid)?;
                    // Attention: o_proj, attention, rotary, q/k/v projections, input norm (+ residual).
                    matmul(ctx, s, &g.d_xmid, &lp.wo, &g.d_att, Matmul::nn())?;
                    self.adapt_backward(ctx, s, l, Proj::O, &la.att, &[&g.d_xmid], &g.d_att)?;
                    let (q_rot, k_rot) = (need(&la.q_rot)?, need(&la.k_rot)?);
                    match &a.attn {
                        Some(sc) => attention_backward_mm(
                            ctx, s, shape, q_rot, k_rot, &la.v, &la.lse, &g.d_att, &g.d_qrot, &g.d_krot, &g.d_v, sc,
                        )?,
                        None => attention_backward(
                            ctx, s, shape, q_rot, k_rot, &la.v, &la.att, &la.lse, &g.d_att, &g.d_qrot, &g.d_krot,
                            &g.d_v, &g.dsum,
                        )?,
                    }
                    rope_backward(ctx, s, rope_q, &g.d_qrot, &g.d_q)?;
                    rope_backward(ctx, s, rope_k, &g.d_krot, &g.d_k)?;
                    matmul(ctx, s, &g.d_q, &lp.wq, &g.d_h, Matmul::nn())?;
                    matmul(ctx, s, &g.d_k, &lp.wk, &g.d_h, acc)?;
                    matmul(ctx, s, &g.d_v, &lp.wv, &g.d_h, acc)?;
                    self.adapt_backward(ctx, s, l, Proj::Q, &la.h1, &[&g.d_q], &g.d_h)?;
                    self.adapt_backward(ctx, s, l, Proj::K, &la.h1, &[&g.d_k], &g.d_h)?;
                    self.adapt_backward(ctx, s, l, Proj::V, &la.h1, &[&g.d_v], &g.d_h)?;
                    rmsnorm_backward(ctx, s, &a.x[l], &lp.ln1, &la.rstd1, &g.d_h, Some(&g.d_xmid), &g.dx[l])?;
                }
                LayerParams::Gpt2(lp) => {
                    // Conv1D: y = x·W + b, so dx = dy·Wᵀ.
                    let acc = Matmul::nt().accumulate(true);
                    let (h2, fc) = match &la.recomputed {
                        None => (&la.h2, &la.gate),
                        Some(rc) => {
                            if !self.opts.keep_inputs.contains(&Input::H2) {
                                let (w, b, mean) = (&lp.ln2_w, &lp.ln2_b, need(&la.mean2)?);
                                layernorm_forward(ctx, s, &la.x_mid, w, b, eps, &rc.h2, mean, &la.rstd2)?;
                            }
                            let fused = self.frozen_matmul(
                                ctx,
                                s,
                                true,
                                l,
                                Proj::Fc,
                                &rc.h2,
                                &lp.w_fc,
                                &rc.gate,
                                Matmul::nn(),
                            )?;
                            bias_forward(ctx, s, &lp.b_fc, &rc.gate)?;
                            self.adapt_forward(ctx, s, true, l, Proj::Fc, &rc.h2, &[&rc.gate], fused)?;
                            (&rc.h2, &rc.gate)
                        }
                    };
                    matmul(ctx, s, dxo, &lp.w_proj, &g.d_act, Matmul::nt())?;
                    self.adapt_backward(ctx, s, l, Proj::MlpProj, &la.act, &[dxo], &g.d_act)?;
                    gelu_backward(ctx, s, fc, &g.d_act, &g.d_gate)?;
                    matmul(ctx, s, &g.d_gate, &lp.w_fc, &g.d_h, Matmul::nt())?;
                    self.adapt_backward(ctx, s, l, Proj::Fc, h2, &[&g.d_gate], &g.d_h)?;
                    layernorm_backward(
                        ctx,
                        s,
                        &la.x_mid,
                        &lp.ln2_w,
                        need(&la.mean2)?,
                        &la.rstd2,
                        &g.d_h,
                        Some(dxo),
                        &g.d_xmid,
                    )?;
                    matmul(ctx, s, &g.d_xmid, &lp.wo, &g.d_att, Matmul::nt())?;
                    self.adapt_backward(ctx, s, l, Proj::AttnProj, &la.att, &[&g.d_xmid], &g.d_att)?;
                    match &a.attn {
                        Some(sc) => attention_backward_mm(
                            ctx, s, shape, &la.q, &la.k, &la.v, &la.lse, &g.d_att, &g.d_q, &g.d_k, &g.d_v, sc,
                        )?,
                        None => attention_backward(
                            ctx, s, shape, &la.q, &la.k, &la.v, &la.att, &la.lse, &g.d_att, &g.d_q, &g.d_k, &g.d_v,
                            &g.dsum,
                        )?,
                    }
                    matmul(ctx, s, &g.d_q, &lp.wq, &g.d_h, Matmul::nt())?;
                    matmul(ctx, s, &g.d_k, &lp.wk, &g.d_h, acc)?;
                    matmul(ctx, s, &g.d_v, &lp.wv, &g.d_h, acc)?;
                    self.adapt_backward(ctx, s, l, Proj::CAttn, &la.h1, &[&g.d_q, &g.d_k, &g.d_v], &g.d_h)?;
                    layernorm_backward(
                        ctx,
                        s,
                        &a.x[l],
                        &lp.ln1_w,
                        need(&la.mean1)?,
                        &la.rstd1,
                        &g.d_h,
                        Some(&g.d_xmid),
                        &g.dx[l],
                    )?;
                }
            }
        }
        Ok(())
    }

    /// The attached adapter's site for (layer, projection), unless merged.
    fn site(&self, layer: usize, proj: Proj) -> Option<(&dyn Adapter, usize)> {
        let a = self.adapter.as_deref().filter(|_| !self.merged)?;
        a.sites().iter().position(|s| s.layer == layer && s.proj == proj).map(|i| (a, i))
    }

    /// Records the frozen projection `y = op(x, w)` of (layer, proj) and returns whether the
    /// adapter's `z = x·Aᵀ` was fused into it (then [`GpuModel::adapt_forward`] skips it).
    #[allow(clippy::too_many_arguments)]
    fn frozen_matmul(
        &self,
        ctx: &Context,
        s: &mut Step,
        train: bool,
        l: usize,
        proj: Proj,
        x: &Tensor,
        w: &Tensor,
        y: &Tensor,
        opts: Matmul,
    ) -> Result<bool> {
        if let Some((a2, c2)) = self.site(l, proj).and_then(|(a, i)| a.fusable_input_product(i, train)) {
            let side = Side { a2, c2 };
            if can_fuse_side(ctx, x, w, y, opts, side) {
                matmul_side(ctx, s, x, w, y, opts, side)?;
                return Ok(true);
            }
        }
        matmul(ctx, s, x, w, y, opts)?;
        Ok(false)
    }

    /// Records the adapter branch of (layer, proj), if adapted: `ys += branch(x)` (its first
    /// product already done when `fused`).
    #[allow(clippy::too_many_arguments)]
    fn adapt_forward(
        &self,
        ctx: &Context,
        s: &mut Step,
        train: bool,
        l: usize,
        proj: Proj,
        x: &Tensor,
        ys: &[&Tensor],
        fused: bool,
    ) -> Result<()> {
        if let Some((a, i)) = self.site(l, proj) {
            if fused {
                a.forward_fused(ctx, s, i, ys)?;
            } else {
                a.forward(ctx, s, i, x, ys, train)?;
            }
        }
        Ok(())
    }

    /// Records the adapter's gradients for (layer, proj), if adapted, and `dx += ` its input gradient.
    fn adapt_backward(
        &self,
        ctx: &Context,
        s: &mut Step,
        l: usize,
        proj: Proj,
        x: &Tensor,
        dys: &[&Tensor],
        dx: &Tensor,
    ) -> Result<()> {
        if let Some((a, i)) = self.site(l, proj) {
            a.backward(ctx, s, i, x, dys, dx)?;
        }
        Ok(())
    }

    /// Attaches an adapter to the projections its sites name and re-records the steps. Fails when
    /// the adapter's backward reads projection inputs this plan does not keep per layer.
    pub fn attach(&mut self, ctx: &Context, adapter: Box<dyn Adapter>) -> Result<()> {
        if self.grads.is_some() {
            self.check_kept_inputs(adapter.as_ref())?;
        }
        if let Some(site) = adapter.sites().iter().find(|s| s.layer >= self.config.num_layers) {
            return Err(GpuModelError::Unsupported(format!("{} is not a layer of this model", site.module)));
        }
        self.adapter = Some(adapter);
        self.merged = false;
        self.rerecord(ctx)
    }

    /// Training needs every projection input the adapter's backward reads kept per layer.
    fn check_kept_inputs(&self, adapter: &dyn Adapter) -> Result<()> {
        if !adapter.needs_input() {
            return Ok(());
        }
        match adapter.sites().iter().find(|s| !self.opts.keep_inputs.contains(&s.proj.input())) {
            None => Ok(()),
            Some(site) => Err(GpuModelError::Unsupported(format!(
                "the {} adapter on {} reads its input in backward, but the model was planned without \
                 keeping {:?}; plan it with PlanOptions::keep_inputs",
                adapter.config().method,
                site.module,
                site.proj.input()
            ))),
        }
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
        self.forward = self.record_forward(ctx, false)?;
        if self.train.is_some() {
            self.train = Some(self.record_forward(ctx, true)?);
        }
        Ok(())
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
            let parts = match &self.params.layers[site.layer] {
                LayerParams::Llama(lp) => vec![match site.proj {
                    Proj::Q => &lp.wq,
                    Proj::K => &lp.wk,
                    Proj::V => &lp.wv,
                    Proj::O => &lp.wo,
                    Proj::Gate => &lp.w_gate,
                    Proj::Up => &lp.w_up,
                    Proj::Down => &lp.w_down,
                    p => return Err(GpuModelError::Unsupported(format!("{p:?} is not a LLaMA projection"))),
                }],
                LayerParams::Gpt2(lp) => match site.proj {
                    Proj::CAttn => vec![&lp.wq, &lp.wk, &lp.wv],
                    Proj::AttnProj => vec![&lp.wo],
                    Proj::Fc => vec![&lp.w_fc],
                    Proj::MlpProj => vec![&lp.w_proj],
                    p => return Err(GpuModelError::Unsupported(format!("{p:?} is not a GPT-2 projection"))),
                },
            };
            out.push(SiteWeights { parts, conv1d: site.conv1d });
        }
        Ok(out)
    }

    /// Adds the adapter's ΔW into the frozen weights on the GPU (`W0 += s·B·A`, PEFT's merge);
    /// the branch is then skipped, so the forward pass gives the same results faster.
    /// Whether any frozen matrix is stored packed (f16 or quantized; see [`BaseDType`]).
    pub fn base_is_packed(&self) -> bool {
        self.params.layers.iter().any(|l| match l {
            LayerParams::Llama(p) => {
                [&p.wq, &p.wk, &p.wv, &p.wo, &p.w_gate, &p.w_up, &p.w_down].iter().any(|t| t.dtype() != DType::F32)
            }
            LayerParams::Gpt2(p) => {
                [&p.wq, &p.wk, &p.wv, &p.wo, &p.w_fc, &p.w_proj].iter().any(|t| t.dtype() != DType::F32)
            }
        }) || self.params.embed.parts.iter().any(|(_, t)| t.dtype() != DType::F32)
    }

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
        let count = self.write_batch(ctx, ids, predict)?;
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
        self.check_ids(ids)?;
        let (b, t) = (self.acts.batch, self.acts.seq);
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
