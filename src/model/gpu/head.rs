//! The ends of the model: token embeddings (with learned positions where the block has them) in
//! front of the layers, and after them the final norm, the LM head and the cross-entropy loss,
//! chunk by chunk through one logits buffer, with their backward in the same pass.

use super::block::Recorder;
use super::params::ParameterTensors;
use super::plan::{Activations, Gradients};
use super::{need, GpuModelError, Result};
use crate::gpu::{Step, Tensor};
use crate::ops::elementwise::{add_forward, scale_forward, softcap_forward};
use crate::ops::embed::embed_forward;
use crate::ops::reduce::reduce_forward;
use crate::ops::xent::{xent_backward, xent_forward};

/// Learned positions: the ids of each row's positions, and where their embeddings go.
pub struct Positions<'t> {
    pub ids: &'t Tensor,
    pub pos: &'t Tensor,
}

impl Recorder<'_> {
    /// `x0 = embed(ids)`, plus the position embeddings where the block learns them, or times
    /// √hidden where the block scales them (Gemma); `emb` holds the token embeddings before
    /// either.
    pub fn embed_forward(
        &self,
        s: &mut Step,
        p: &ParameterTensors,
        ids: &Tensor,
        x0: &Tensor,
        emb: Option<&Tensor>,
        learned: Option<Positions>,
    ) -> Result<()> {
        let ctx = self.ctx;
        match (&p.pos_embed, learned, emb) {
            (Some(wpe), Some(l), Some(emb)) => {
                p.embed.embed(ctx, s, ids, emb)?;
                embed_forward(ctx, s, l.ids, wpe, l.pos)?;
                add_forward(ctx, s, emb, l.pos, x0)?;
            }
            (None, None, Some(emb)) if self.config.block.embed_scale => {
                // transformers scales by √hidden rounded to the weights' dtype (f32 here).
                let scale = (self.config.hidden_size as f64).sqrt() as f32;
                p.embed.embed(ctx, s, ids, emb)?;
                scale_forward(ctx, s, emb, scale, x0)?;
            }
            (None, None, _) if !self.config.block.embed_scale => p.embed.embed(ctx, s, ids, x0)?,
            _ => return Err(GpuModelError::Unsupported("the embedding's scratch tensors are missing".into())),
        }
        Ok(())
    }

    /// The final norm of `x`, into `hf`.
    pub fn final_norm(&self, s: &mut Step, p: &ParameterTensors, x: &Tensor, a: &Activations) -> Result<()> {
        self.norm_forward(s, x, &p.norm, &a.hf, a.meanf.as_ref(), &a.rstdf)
    }

    /// The LM head, the loss and (with `grads`) their backward into `dhf`, one chunk of rows at a
    /// time through the one logits buffer: the vocabulary-sized activation never exists whole.
    /// Then the loss sum.
    pub fn head_forward(
        &self,
        s: &mut Step,
        p: &ParameterTensors,
        a: &Activations,
        grads: Option<&Gradients>,
    ) -> Result<()> {
        let ctx = self.ctx;
        let head = p.lm_head.as_ref().unwrap_or(&p.embed);
        let cap = self.config.block.final_softcap.map(|c| c as f32);
        let n = a.batch * a.seq;
        let align = ctx.limits().storage_offset_alignment;
        let mut start = 0;
        while start < n {
            let rows = a.chunk_rows.min(n - start);
            let logits = a.logits.rows(0, rows, align)?;
            let targets = a.targets.rows(start, rows, align)?;
            let lse = a.lse_rows.rows(start, rows, align)?;
            head.project(ctx, s, &a.hf.rows(start, rows, align)?, &logits)?;
            if let Some(cap) = cap {
                softcap_forward(ctx, s, cap, &logits)?;
            }
            xent_forward(ctx, s, &logits, &targets, &a.loss_rows.rows(start, rows, align)?, &lse)?;
            if let Some(g) = grads {
                xent_backward(ctx, s, &logits, &targets, &lse, &a.loss_scale, cap.unwrap_or(0.0))?;
                let h = self.config.hidden_size;
                let splits = a.head_splits();
                let partials = match &a.head_partials {
                    Some(p) => Some(p.rows(0, splits * rows, align)?.reshape(&[splits, rows, h])?),
                    None => None,
                };
                let split = partials.as_ref().map(|p| (p, splits));
                head.project_backward(ctx, s, &logits, &g.dhf.rows(start, rows, align)?, split)?;
            }
            start += rows;
        }
        reduce_forward(ctx, s, &a.loss_rows.reshape(&[1, n])?, 1, false, &a.loss_sum)?;
        Ok(())
    }

    /// The final norm's backward: from `dhf` into the last residual stream's gradient.
    pub fn final_norm_backward(
        &self,
        s: &mut Step,
        p: &ParameterTensors,
        a: &Activations,
        g: &Gradients,
    ) -> Result<()> {
        let last = a.x.len() - 1;
        self.norm_backward(s, &a.x[last], &p.norm, a.meanf.as_ref(), &a.rstdf, &g.dhf, None, &g.dx[last])
    }

    /// The learned-position tensors of a plan, where it has them.
    pub fn positions<'t>(&self, a: &'t Activations) -> Result<Option<Positions<'t>>> {
        if self.config.block.rope {
            return Ok(None);
        }
        Ok(Some(Positions { ids: &a.pos_ids, pos: need(&a.pos)? }))
    }
}
