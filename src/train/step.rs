//! Running steps: per-step values written, recorded steps submitted, and the losses of up to
//! `loss_every` steps in flight read back in one go.

use super::{Batch, Group, OptimizerKind, Result, StepStats, TrainError, Trainer};
use crate::gpu::{Context, Step};
use crate::model::gpu::GpuModelError;
use crate::ops::optim::{partial_owner, AdamW, Hyper, Sgd};

/// The positions of `ids` whose next token is a loss target, as `GpuModel::write_batch` counts them.
fn predicted_positions(ids: &[Vec<u32>], predict: Option<&[Vec<bool>]>) -> usize {
    ids.iter()
        .enumerate()
        .map(|(r, row)| match predict.and_then(|p| p.get(r)) {
            None => row.len().saturating_sub(1),
            Some(m) => m.iter().skip(1).filter(|&&p| p).count(),
        })
        .sum()
}

impl Trainer {
    /// The learning rate of step `t` (1-based) before group multipliers.
    pub fn lr_at(&self, t: u64) -> f64 {
        let c = &self.config;
        // Without a length (validate allows it for the constant schedule alone) nothing decays.
        c.lr * c.schedule.multiplier(t - 1, c.warmup_steps, c.total_steps.unwrap_or(u64::MAX))
    }

    /// Group `g`'s optimizer values for step `t` (1-based).
    fn hyper(&self, g: &Group, t: u64) -> Hyper {
        let c = &self.config;
        let lr = self.lr_at(t) * g.lr_mult;
        match c.optimizer {
            OptimizerKind::AdamW => {
                let (beta1, beta2) = c.betas;
                let mut h = AdamW { lr, beta1, beta2, eps: c.eps, weight_decay: c.weight_decay }.hyper(t);
                if self.hf_adamw {
                    // transformers' AdamW adds eps to sqrt(v) before the bias correction, and
                    // decays after the update.
                    h.eps = (c.eps / (1.0 - beta2.powf(t as f64)).sqrt()) as f32;
                    h.decay_after = 1.0;
                }
                h
            }
            OptimizerKind::Sgd => Sgd { lr, momentum: c.momentum, weight_decay: c.weight_decay }.hyper(t),
        }
    }

    /// One training step on a full batch of `ids` (B rows of T tokens), every token after the
    /// first predicted.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn train_step(&mut self, ctx: &Context, ids: &[Vec<u32>]) -> Result<StepStats> {
        self.train_step_batches(ctx, &[Batch { ids, predict: None, positions: None }])
    }

    /// One optimizer step over `micro` batches (one per gradient-accumulation micro-batch, each
    /// B rows of T tokens): the gradient is that of the mean loss over every predicted position
    /// of all of them, so accumulating k micro-batches equals one batch k times larger.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn train_step_batches(&mut self, ctx: &Context, micro: &[Batch]) -> Result<StepStats> {
        crate::gpu::block_on(self.train_step_async(ctx, micro))
    }

    /// [`Trainer::train_step_batches`] for callers that cannot block (browsers). The step's
    /// submissions go out back to back; the losses are read once, at the end.
    pub async fn train_step_async(&mut self, ctx: &Context, micro: &[Batch<'_>]) -> Result<StepStats> {
        if !self.pending.is_empty() {
            return Err(TrainError::Config("read the submitted steps' losses (collect_losses) first".into()));
        }
        self.submit_step(ctx, micro)?;
        let mut v = self.collect_losses_async(ctx).await?;
        v.pop().ok_or_else(|| TrainError::Config("no step was submitted".into()))
    }

    /// Whether `loss_every` steps are in flight (their losses must be collected before the next).
    pub fn losses_due(&self) -> bool {
        self.pending.len() >= self.config.loss_every.max(1)
    }

    /// Submits one optimizer step over `micro` batches without reading anything back: its loss
    /// lands in a ring of `loss_every` slots on the GPU, read by [`Trainer::collect_losses`].
    pub fn submit_step(&mut self, ctx: &Context, micro: &[Batch<'_>]) -> Result<()> {
        if self.losses_due() {
            return Err(TrainError::Config(format!(
                "{} steps are in flight (loss_every); collect their losses first",
                self.pending.len()
            )));
        }
        let slot = self.pending.len();
        let t = self.step + 1;
        let k = self.config.grad_accum;
        if micro.len() != k {
            return Err(TrainError::Config(format!("{} micro-batches for a step that accumulates {k}", micro.len())));
        }
        for m in micro {
            if m.ids.len() != self.model.acts.batch {
                return Err(GpuModelError::BatchSize { batch: self.model.acts.batch, found: m.ids.len() }.into());
            }
            self.model.check_ids(m.ids)?;
        }
        for g in &self.groups {
            ctx.write_f32(&g.hyper, &self.hyper(g, t).to_f32s())?;
        }
        let train = self.model.train_step().ok_or_else(|| TrainError::Config("backward is not enabled".into()))?;
        // Every micro-batch's loss is scaled by 1 / (all predicted positions of the step).
        let total = micro.iter().map(|m| predicted_positions(m.ids, m.predict)).sum::<usize>().max(1);
        let mut tokens = 0;
        for (i, m) in micro.iter().enumerate() {
            self.model.write_batch_docs(ctx, m.ids, m.predict, m.positions)?;
            ctx.write_f32(&self.model.acts.loss_scale, &[1.0 / total as f32])?;
            if let Some(seed) = self.adapter().dropout_seed() {
                let s = self.adapter_config.seed ^ (t * k as u64 + i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
                ctx.write_u32(seed, &[(s ^ (s >> 32)) as u32])?;
            }
            let mut steps = vec![train, &self.loss_copy[slot * k + i]];
            if k > 1 {
                steps.push(if i == 0 { &self.acc_first } else { &self.acc_add });
            }
            if i + 1 == k {
                steps.push(&self.update);
                steps.push(&self.clip_copy[slot]);
                if let (Some(after), true) = (&self.after, t > self.adapter_config.delta_warmup) {
                    steps.push(after);
                }
            }
            ctx.run_steps(&steps)?;
            tokens += m.ids.len() * m.ids[0].len();
        }
        self.step = t;
        self.pending.push((t, total, tokens));
        Ok(())
    }

    /// Reads the losses of every submitted step (one readback) and returns their stats in order.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn collect_losses(&mut self, ctx: &Context) -> Result<Vec<StepStats>> {
        crate::gpu::block_on(self.collect_losses_async(ctx))
    }

    /// [`Trainer::collect_losses`] for callers that cannot block.
    pub async fn collect_losses_async(&mut self, ctx: &Context) -> Result<Vec<StepStats>> {
        if self.pending.is_empty() {
            return Ok(Vec::new());
        }
        let k = self.config.grad_accum;
        let all = ctx.read(&self.losses)?.await?;
        let numels: Vec<usize> = self.params.iter().map(|p| p.value.numel()).collect();
        let out = self
            .pending
            .iter()
            .enumerate()
            .map(|(slot, &(t, total, tokens))| {
                let row = &all[slot * (k + 3)..(slot + 1) * (k + 3)];
                let sum: f64 = row[..k].iter().map(|&l| l as f64).sum();
                let bad = row[k + 2];
                let nonfinite_grad = (bad >= 0.0).then(|| partial_owner(&numels, bad as usize)).flatten();
                StepStats {
                    step: t,
                    loss: sum / total as f64,
                    lr: self.lr_at(t),
                    tokens,
                    grad_norm: row[k + 1] as f64,
                    nonfinite_grad,
                }
            })
            .collect();
        self.pending.clear();
        Ok(out)
    }

    /// The recorded steps one training step (without gradient accumulation) submits, in order:
    /// forward + loss + backward, the loss copy, clipping + optimizer, after-step hooks.
    pub fn recorded_steps(&self) -> Vec<&Step> {
        let mut v: Vec<&Step> = self.model.train_step().into_iter().collect();
        v.push(&self.loss_copy[0]);
        v.push(&self.update);
        v.push(&self.clip_copy[0]);
        v.extend(&self.after);
        v
    }

    /// The gradients of the last step, keyed by parameter name (tests, diagnostics).
    #[cfg(not(target_arch = "wasm32"))]
    pub fn gradients(&self, ctx: &Context) -> Result<Vec<(String, Vec<f32>)>> {
        self.params.iter().map(|p| Ok((p.name.clone(), ctx.read_f32(&p.grad)?))).collect()
    }
}
