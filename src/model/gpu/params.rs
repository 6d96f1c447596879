//! The frozen base model's weights on the GPU: one [`BlockParams`] per layer whatever the
//! family (what a family lacks is `None`), the vocabulary tables split to fit storage bindings,
//! and the frozen matrices stored as [`BaseDType`] asks.

use std::fmt;

use super::{GpuModelError, Result};
use crate::gpu::{Context, DType, Step, Tensor};
use crate::model::arch::{Block, NormKind};
use crate::model::config::Arch;
use crate::model::weights::{HostTensor, RawTensor, Weights};
use crate::ops::embed::embed_forward_part;
use crate::ops::matmul::{matmul, Matmul};

/// A norm's weight, and its bias for a LayerNorm.
pub struct Norm {
    pub w: Tensor,         // (C,)
    pub b: Option<Tensor>, // (C,) LayerNorm
}

/// One decoder layer's frozen weights, in the block's layout (`nn.Linear` `(out, in)`, or GPT-2's
/// `Conv1D` `(in, out)` with c_attn split into its q, k and v thirds at upload). What the block
/// lacks is `None`.
pub struct BlockParams {
    pub ln1: Norm,
    pub wq: Tensor, // (H·hd, C)
    pub wk: Tensor, // (KV·hd, C)
    pub wv: Tensor, // (KV·hd, C)
    pub wo: Tensor, // (C, H·hd)
    pub bq: Option<Tensor>,
    pub bk: Option<Tensor>,
    pub bv: Option<Tensor>,
    pub bo: Option<Tensor>,
    /// Per-head RMSNorm weights of q and k, before rotary.
    pub q_norm: Option<Tensor>, // (hd,)
    pub k_norm: Option<Tensor>, // (hd,)
    /// The rotary inverse frequencies of this layer (rotary blocks).
    pub rope: Option<Tensor>, // (hd / 2,)
    /// The norm after attention, before the residual add (Gemma).
    pub post_attn: Option<Norm>,
    pub ln2: Norm,
    /// The gate projection of a gated MLP (SwiGLU, GeGLU).
    pub w_gate: Option<Tensor>, // (F, C)
    pub w_up: Tensor,   // (F, C)  GPT-2: c_fc
    pub w_down: Tensor, // (C, F)  GPT-2: mlp.c_proj
    pub b_gate: Option<Tensor>,
    pub b_up: Option<Tensor>,
    pub b_down: Option<Tensor>,
    /// The norm after the MLP, before the residual add (Gemma).
    pub post_mlp: Option<Norm>,
}

impl BlockParams {
    /// The frozen matrices, for checks over all of them.
    pub fn matrices(&self) -> impl Iterator<Item = &Tensor> {
        [&self.wq, &self.wk, &self.wv, &self.wo, &self.w_up, &self.w_down].into_iter().chain(&self.w_gate)
    }
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
            // x is the final norm's output: f16 operands are fine (cooperative matrices).
            matmul(ctx, s, x, part, &out, Matmul::nt().coop(true))?;
        }
        Ok(())
    }

    /// The input gradient of [`SplitTable::project`]: `dx = dlogits · table`, summed over parts;
    /// with `split` (partials (splits, rows, C), splits) and an f32 table in one part, summed over
    /// slices of the vocabulary in parallel instead (a packed table keeps the plain product).
    pub fn project_backward(
        &self,
        ctx: &Context,
        s: &mut Step,
        dlogits: &Tensor,
        dx: &Tensor,
        split: Option<(&Tensor, usize)>,
    ) -> Result<()> {
        if let (Some((partials, splits)), [(_, table)]) = (split, self.parts.as_slice()) {
            if table.dtype() == crate::gpu::DType::F32 && self.rows.is_multiple_of(4 * splits) {
                crate::ops::matmul::matmul_split_k(ctx, s, dlogits, table, dx, partials, splits)?;
                return Ok(());
            }
        }
        let align = ctx.limits().storage_offset_alignment;
        for (i, (first, part)) in self.parts.iter().enumerate() {
            let dl =
                if self.parts.len() == 1 { dlogits.clone() } else { dlogits.cols(*first, part.shape()[0], align)? };
            matmul(ctx, s, &dl, part, dx, Matmul::nn().accumulate(i > 0))?;
        }
        Ok(())
    }
}

/// The frozen base model's weights on the GPU.
pub struct ParameterTensors {
    pub embed: SplitTable,         // (V, C)
    pub pos_embed: Option<Tensor>, // (P, C) GPT-2's learned positions
    pub layers: Vec<BlockParams>,
    pub norm: Norm,                  // the final norm
    pub lm_head: Option<SplitTable>, // (V, C); None when tied to `embed`
}

/// How the frozen base's matrices (projections, token embeddings, LM head) are stored on the
/// GPU. Packed types are dequantized inside the kernels that read them (QLoRA-style: no f32
/// copy); norms, biases and position tables stay f32, as do the adapters and optimizer state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BaseDType {
    /// As the file stores them: a GGUF's quantized and f16 tensors stay packed (on adapters with
    /// subgroup operations); everything else f32.
    #[default]
    Auto,
    F32,
    F16,
    Q8_0,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    #[serde(rename = "q2_k")]
    Q2K,
    #[serde(rename = "q3_k")]
    Q3K,
    #[serde(rename = "q4_k")]
    Q4K,
    #[serde(rename = "q5_k")]
    Q5K,
    #[serde(rename = "q6_k")]
    Q6K,
}

impl BaseDType {
    pub const ALL: [BaseDType; 13] = [
        BaseDType::Auto,
        BaseDType::F32,
        BaseDType::F16,
        BaseDType::Q8_0,
        BaseDType::Q4_0,
        BaseDType::Q4_1,
        BaseDType::Q5_0,
        BaseDType::Q5_1,
        BaseDType::Q2K,
        BaseDType::Q3K,
        BaseDType::Q4K,
        BaseDType::Q5K,
        BaseDType::Q6K,
    ];
    pub fn name(self) -> &'static str {
        match self {
            BaseDType::Auto => "auto",
            BaseDType::F32 => "f32",
            BaseDType::F16 => "f16",
            BaseDType::Q8_0 => "q8_0",
            BaseDType::Q4_0 => "q4_0",
            BaseDType::Q4_1 => "q4_1",
            BaseDType::Q5_0 => "q5_0",
            BaseDType::Q5_1 => "q5_1",
            BaseDType::Q2K => "q2_k",
            BaseDType::Q3K => "q3_k",
            BaseDType::Q4K => "q4_k",
            BaseDType::Q5K => "q5_k",
            BaseDType::Q6K => "q6_k",
        }
    }
    fn dtype(self) -> Option<DType> {
        Some(match self {
            BaseDType::Auto => return None,
            BaseDType::F32 => DType::F32,
            BaseDType::F16 => DType::F16,
            BaseDType::Q8_0 => DType::Q8_0,
            BaseDType::Q4_0 => DType::Q4_0,
            BaseDType::Q4_1 => DType::Q4_1,
            BaseDType::Q5_0 => DType::Q5_0,
            BaseDType::Q5_1 => DType::Q5_1,
            BaseDType::Q2K => DType::Q2_K,
            BaseDType::Q3K => DType::Q3_K,
            BaseDType::Q4K => DType::Q4_K,
            BaseDType::Q5K => DType::Q5_K,
            BaseDType::Q6K => DType::Q6_K,
        })
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
    // The packed matmul reads four rows of B at a time too (a vocabulary of 61 rows stays f32).
    if want == DType::F32
        || data.shape.len() != 2
        || !quant::fits(want, &data.shape)
        || !data.shape[0].is_multiple_of(4)
    {
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

fn upload(ctx: &Context, w: &Weights, name: &str) -> Result<Tensor> {
    let t = w.get(name)?;
    Ok(ctx.upload_f32(name, &t.shape, &t.data)?)
}

/// Columns `part · C .. (part + 1) · C` of a row-major `(rows, 3C)` matrix (GPT-2's fused c_attn).
fn third(data: &[f32], rows: usize, part: usize) -> Vec<f32> {
    let c3 = data.len() / rows;
    let c = c3 / 3;
    (0..rows).flat_map(|r| data[r * c3 + part * c..r * c3 + (part + 1) * c].iter().copied()).collect()
}

/// Hugging Face names of one layer's tensors, by role.
struct Names {
    prefix: String,
    gpt2: bool,
    /// Gemma's names: its post_attention_layernorm is the norm after attention, and the MLP's
    /// norm is pre_feedforward_layernorm.
    post_norms: bool,
}

impl Names {
    fn of(&self, role: &str) -> String {
        let n = match (self.gpt2, role) {
            (false, "ln1") => "input_layernorm",
            (false, "ln2") if self.post_norms => "pre_feedforward_layernorm",
            (false, "ln2") => "post_attention_layernorm",
            (false, "post_attn") => "post_attention_layernorm",
            (false, "post_mlp") => "post_feedforward_layernorm",
            (false, "q") => "self_attn.q_proj",
            (false, "k") => "self_attn.k_proj",
            (false, "v") => "self_attn.v_proj",
            (false, "o") => "self_attn.o_proj",
            (false, "q_norm") => "self_attn.q_norm",
            (false, "k_norm") => "self_attn.k_norm",
            (false, "gate") => "mlp.gate_proj",
            (false, "up") => "mlp.up_proj",
            (false, "down") => "mlp.down_proj",
            (true, "ln1") => "ln_1",
            (true, "ln2") => "ln_2",
            (true, "qkv") => "attn.c_attn",
            (true, "o") => "attn.c_proj",
            (true, "up") => "mlp.c_fc",
            (true, "down") => "mlp.c_proj",
            _ => unreachable!("role {role}"),
        };
        format!("{}.{n}", self.prefix)
    }
}

impl ParameterTensors {
    /// Where `base` names a packed type, the frozen matrices kept f32 all the same (rows that
    /// are not whole blocks of it, or a row count that is no multiple of 4), said in one line:
    /// the user asked for a type, and some of the model does not have it.
    pub fn kept_f32(&self, base: BaseDType) -> Option<String> {
        let want = base.dtype().filter(|d| *d != DType::F32)?;
        let tables = self.lm_head.iter().chain([&self.embed]).flat_map(|t| t.parts.iter().map(|(_, p)| p));
        let all: Vec<&Tensor> = self.layers.iter().flat_map(BlockParams::matrices).chain(tables).collect();
        let kept: Vec<&&Tensor> = all.iter().filter(|t| t.dtype() == DType::F32).collect();
        let first = kept.first()?;
        let cols = if want.is_block_quantized() { want.block() } else { 4 };
        Some(format!(
            "--base-dtype {base}: {} of {} frozen matrices stay f32, e.g. {} {:?}: {base} needs rows of whole \
             blocks of {cols} values and a multiple of 4 rows{}",
            kept.len(),
            all.len(),
            first.label(),
            first.shape(),
            if cols > 32 { "; a type with blocks of 32 (q8_0, q4_0, q4_1, q5_0, q5_1) fits more" } else { "" }
        ))
    }

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
        let get = |name: &str| w.get(name);
        let table = |name: &str| -> Result<SplitTable> {
            SplitTable::upload_as(ctx, name, get(name)?, w.raw.get(name), table_part_rows, base)
        };
        let gpt2 = c.arch == Arch::Gpt2;
        let layers = (0..c.num_layers)
            .map(|i| {
                let prefix = if gpt2 { format!("transformer.h.{i}") } else { format!("model.layers.{i}") };
                upload_block(ctx, w, i, &Names { prefix, gpt2, post_norms: c.block.post_norms }, base)
            })
            .collect::<Result<Vec<_>>>()?;
        let lm_head = if c.tie_embeddings { None } else { Some(table("lm_head.weight")?) };
        let (emb, norm) =
            if gpt2 { ("transformer.wte", "transformer.ln_f") } else { ("model.embed_tokens", "model.norm") };
        Ok(ParameterTensors {
            embed: table(&format!("{emb}.weight"))?,
            pos_embed: if gpt2 { Some(upload(ctx, w, "transformer.wpe.weight")?) } else { None },
            layers,
            norm: upload_norm(ctx, w, norm, c.block)?,
            lm_head,
        })
    }
}

/// A norm's weight (and a LayerNorm's bias) by module name; Gemma's `1 + w` is stored as such.
fn upload_norm(ctx: &Context, w: &Weights, module: &str, b: Block) -> Result<Norm> {
    let name = format!("{module}.weight");
    let t = w.get(&name)?;
    let data: Vec<f32> = if b.norm_plus_one { t.data.iter().map(|v| 1.0 + v).collect() } else { t.data.clone() };
    Ok(Norm {
        w: ctx.upload_f32(&name, &t.shape, &data)?,
        b: if b.norm == NormKind::Layer { Some(upload(ctx, w, &format!("{module}.bias"))?) } else { None },
    })
}

/// Layer `i`'s weights as its block describes them.
fn upload_block(ctx: &Context, w: &Weights, i: usize, n: &Names, base: BaseDType) -> Result<BlockParams> {
    let c = &w.config;
    let b = c.block;
    let get = |name: &str| w.get(name);
    let matrix = |role: &str| -> Result<Tensor> {
        let name = format!("{}.weight", n.of(role));
        upload_matrix(ctx, &name, get(&name)?, w.raw.get(&name), base)
    };
    let bias = |role: &str, on: bool| -> Result<Option<Tensor>> {
        on.then(|| upload(ctx, w, &format!("{}.bias", n.of(role)))).transpose()
    };
    let norm =
        |role: &str, on: bool| -> Result<Option<Norm>> { on.then(|| upload_norm(ctx, w, &n.of(role), b)).transpose() };
    let (wq, wk, wv, bq, bk, bv) = if n.gpt2 {
        // GPT-2's c_attn holds q, k and v side by side; each third becomes its own projection.
        let (name, h) = (n.of("qkv"), c.hidden_size);
        let (aw, ab) = (get(&format!("{name}.weight"))?, get(&format!("{name}.bias"))?);
        let part = |k: usize| -> Result<(Tensor, Tensor)> {
            let w3 = HostTensor { shape: vec![h, h], data: third(&aw.data, h, k) };
            Ok((
                upload_matrix(ctx, &format!("{name}.weight"), &w3, None, base)?,
                ctx.upload_f32(&format!("{name}.bias"), &[h], &third(&ab.data, 1, k))?,
            ))
        };
        let ((wq, bq), (wk, bk), (wv, bv)) = (part(0)?, part(1)?, part(2)?);
        (wq, wk, wv, Some(bq), Some(bk), Some(bv))
    } else {
        let (q, k, v) = (matrix("q")?, matrix("k")?, matrix("v")?);
        (q, k, v, bias("q", b.qkv_bias)?, bias("k", b.qkv_bias)?, bias("v", b.qkv_bias)?)
    };
    let gated = b.act.gated();
    let inv_freq = c.layers[i].rope.inv_freq(c.head_dim);
    Ok(BlockParams {
        ln1: upload_norm(ctx, w, &n.of("ln1"), b)?,
        wq,
        wk,
        wv,
        wo: matrix("o")?,
        bq,
        bk,
        bv,
        bo: bias("o", b.o_bias)?,
        q_norm: norm("q_norm", b.qk_norm)?.map(|n| n.w),
        k_norm: norm("k_norm", b.qk_norm)?.map(|n| n.w),
        rope: if b.rope { Some(ctx.upload_f32("rope inv_freq", &[inv_freq.len()], &inv_freq)?) } else { None },
        post_attn: norm("post_attn", b.post_norms)?,
        ln2: upload_norm(ctx, w, &n.of("ln2"), b)?,
        w_gate: if gated { Some(matrix("gate")?) } else { None },
        w_up: matrix("up")?,
        w_down: matrix("down")?,
        b_gate: bias("gate", gated && b.mlp_bias)?,
        b_up: bias("up", b.mlp_bias)?,
        b_down: bias("down", b.mlp_bias)?,
        post_mlp: norm("post_mlp", b.post_norms)?,
    })
}
