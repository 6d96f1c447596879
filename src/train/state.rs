//! What outlives a run: the optimizer state for checkpoints, and the adapter in PEFT's folder
//! format, written by a trainer or read back for evaluation and merging. Native only (it blocks
//! on GPU reads and touches files), so `mod.rs` leaves the whole module out of wasm builds.

use super::{Result, TrainError, Trainer};
use crate::adapter::{self, peft, Adapter, AdapterConfig};
use crate::gpu::{Context, Tensor};
use crate::model::gpu::GpuModel;
use crate::model::{HostTensor, Weights};
use std::collections::BTreeMap;

fn host(ctx: &Context, t: &Tensor) -> Result<HostTensor> {
    Ok(HostTensor { shape: t.shape().to_vec(), data: ctx.read_f32(t)? })
}

impl Trainer {
    /// The optimizer's state and the step count, keyed by parameter name (checkpoints).
    pub fn optimizer_state(&self, ctx: &Context) -> Result<BTreeMap<String, HostTensor>> {
        let mut out = BTreeMap::new();
        for p in &self.params {
            out.insert(format!("{}.exp_avg", p.name), host(ctx, &p.m)?);
            if let Some(v) = &p.v {
                out.insert(format!("{}.exp_avg_sq", p.name), host(ctx, v)?);
            }
        }
        // Delta-LoRA moves W0: its current values belong to the state too.
        if self.after.is_some() {
            for (site, w) in self.adapter().sites().iter().zip(self.model.site_weights()?) {
                for (j, part) in w.parts.iter().enumerate() {
                    out.insert(format!("{}.base_weight.{j}", site.module), host(ctx, part)?);
                }
            }
        }
        Ok(out)
    }

    /// Restores [`Trainer::optimizer_state`] and the step count.
    pub fn load_optimizer_state(
        &mut self,
        ctx: &Context,
        state: &BTreeMap<String, HostTensor>,
        step: u64,
    ) -> Result<()> {
        let get = |k: &str, want: usize| -> Result<&HostTensor> {
            let t = state.get(k).ok_or_else(|| TrainError::Config(format!("the checkpoint has no {k:?}")))?;
            if t.data.len() != want {
                return Err(TrainError::Config(format!(
                    "checkpoint tensor {k:?} has {} values, not {want}",
                    t.data.len()
                )));
            }
            Ok(t)
        };
        for p in &self.params {
            ctx.write_f32(&p.m, &get(&format!("{}.exp_avg", p.name), p.m.numel())?.data)?;
            if let Some(v) = &p.v {
                ctx.write_f32(v, &get(&format!("{}.exp_avg_sq", p.name), v.numel())?.data)?;
            }
        }
        if self.after.is_some() {
            for (site, w) in self.adapter().sites().iter().zip(self.model.site_weights()?) {
                for (j, part) in w.parts.iter().enumerate() {
                    ctx.write_f32(part, &get(&format!("{}.base_weight.{j}", site.module), part.numel())?.data)?;
                }
            }
        }
        self.step = step;
        Ok(())
    }

    /// Writes the adapter in PEFT's format to `dir`.
    /// `base_model` is recorded as `base_model_name_or_path` (see [`peft::config_json`]).
    pub fn save_adapter(&self, ctx: &Context, base_model: Option<&str>, dir: &std::path::Path) -> Result<()> {
        peft::save(ctx, self.adapter(), self.model.config.arch == crate::model::Arch::Gpt2, base_model, dir)?;
        Ok(())
    }
}

/// A forward-only model for `batch` rows of `seq` tokens with the PEFT adapter folder `dir`
/// (any method's files, ours or PEFT's, or a GGUF LoRA file) attached: for evaluation and merging.
pub fn model_with_adapter(
    ctx: &Context,
    weights: &Weights,
    batch: usize,
    seq: usize,
    dir: &std::path::Path,
) -> Result<GpuModel> {
    let mut model = GpuModel::new(ctx, weights, batch, seq)?;
    model.attach(ctx, adapter_from(ctx, weights, dir, batch * seq)?)?;
    Ok(model)
}

/// The PEFT adapter folder `dir` (any method's files, ours or PEFT's, or a GGUF LoRA file) built for `weights` with
/// activations for `rows` tokens at a time (for a [`crate::model::generate::Generator`], say).
pub fn adapter_from(ctx: &Context, weights: &Weights, dir: &std::path::Path, rows: usize) -> Result<Box<dyn Adapter>> {
    peft::refuse_delta_lora_alone(dir)?;
    let file = peft::PeftFile::read(dir)?;
    let method = file.method();
    let cfg = file.adapter_config(method, &AdapterConfig::new(method))?;
    let sites = file.fits(&weights.source, cfg.sites(&weights.config))?;
    let mut a = file.fits(&weights.source, adapter::build(ctx, &cfg, sites, rows))?;
    file.fits(&weights.source, file.load_into(ctx, a.as_mut(), &weights.config))?;
    Ok(a)
}
