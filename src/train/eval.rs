//! Evaluation: the mean loss of the current model (with its adapter) over any number of rows.

use super::{Batch, Result, Trainer};
use crate::gpu::Context;

impl Trainer {
    /// Mean next-token loss of the current model (with its adapter) over `rows`, in batches.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn eval_loss(&self, ctx: &Context, rows: &[Vec<u32>]) -> Result<f64> {
        self.eval_loss_masked(ctx, rows, None)
    }

    /// [`Trainer::eval_loss`] over the positions `predict` marks.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn eval_loss_masked(&self, ctx: &Context, rows: &[Vec<u32>], predict: Option<&[Vec<bool>]>) -> Result<f64> {
        crate::gpu::block_on(self.eval_loss_async(ctx, rows, predict))
    }

    /// [`Trainer::eval_loss_masked`] for callers that cannot block (browsers).
    pub async fn eval_loss_async(
        &self,
        ctx: &Context,
        rows: &[Vec<u32>],
        predict: Option<&[Vec<bool>]>,
    ) -> Result<f64> {
        self.eval_rows_async(ctx, &Batch { ids: rows, predict, positions: None }).await
    }

    /// Mean loss over the targets of `rows` (any number of rows, with their masks and document
    /// positions), in batches of the model's.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn eval_rows(&self, ctx: &Context, rows: &Batch) -> Result<f64> {
        crate::gpu::block_on(self.eval_rows_async(ctx, rows))
    }

    /// [`Trainer::eval_rows`] for callers that cannot block (browsers).
    pub async fn eval_rows_async(&self, ctx: &Context, rows: &Batch<'_>) -> Result<f64> {
        let (mut sum, mut count) = (0.0, 0usize);
        let b = self.model.acts.batch;
        for (i, chunk) in rows.ids.chunks(b).enumerate() {
            let mask = rows.predict.map(|p| &p[i * b..i * b + chunk.len()]);
            let positions = rows.positions.map(|p| &p[i * b..i * b + chunk.len()]);
            let (s, c) = self.model.loss_sum_docs_async(ctx, chunk, mask, positions).await?;
            sum += s;
            count += c;
        }
        Ok(sum / count.max(1) as f64)
    }
}
