//! Delta-LoRA (Zi et al. 2023): A and B train as in LoRA (without dropout), and after each
//! optimizer step t > K the frozen weight moves by the change of the adapter's product:
//! `W0 ← W0 + λ · s · (B_{t+1} A_{t+1} − B_t A_t)`.
//!
//! The hook runs entirely on the GPU: before the optimizer step the old A and B are copied aside;
//! after it, two accumulating matmuls add `+λs·B'A'` and `−λs·B A` into W0 in its own layout. No
//! product is materialised anywhere. (`(B' − B)(A' − A)` is a known wrong variant.) W0 is f32 on
//! the GPU, so small updates survive; the result is exported as a merged model.

use super::lora::Lora;
use super::{add_product, zeros, Adapter, AdapterConfig, Param, Result, Site, SiteBackward, SiteWeights, Slot};
use crate::gpu::{Context, Step, Tensor};
use crate::ops::elementwise::copy_forward;

pub struct DeltaLora {
    pub lora: Lora,
    old_a: Vec<Tensor>,      // per site: (r, in)
    old_b: Vec<Vec<Tensor>>, // per site and output part: (out_j, r)
}

impl DeltaLora {
    pub fn new(ctx: &Context, cfg: &AdapterConfig, sites: Vec<Site>, n: usize) -> Result<Self> {
        // The paper removes dropout from the branch: AdapterConfig::validate refuses it.
        let lora = Lora::new(ctx, cfg, sites, n, true)?;
        let mut old_a = Vec::new();
        let mut old_b = Vec::new();
        for l in &lora.layers {
            old_a.push(zeros(ctx, "delta_old_A", l.a.shape())?);
            old_b.push(l.b.iter().map(|b| zeros(ctx, "delta_old_B", b.shape())).collect::<Result<_>>()?);
        }
        Ok(DeltaLora { lora, old_a, old_b })
    }
}

impl Adapter for DeltaLora {
    fn config(&self) -> &AdapterConfig {
        &self.lora.cfg
    }
    fn sites(&self) -> &[Site] {
        &self.lora.sites
    }
    fn forward(&self, ctx: &Context, s: &mut Step, i: usize, x: &Tensor, ys: &[&Tensor], train: bool) -> Result<()> {
        self.lora.forward(ctx, s, i, x, ys, train)
    }
    fn fusable_input_product(&self, i: usize, train: bool) -> Option<(&Tensor, &Tensor)> {
        self.lora.fusable_input_product(i, train)
    }
    fn forward_fused(&self, ctx: &Context, s: &mut Step, i: usize, ys: &[&Tensor]) -> Result<()> {
        self.lora.forward_fused(ctx, s, i, ys)
    }
    fn backward(&self, ctx: &Context, s: &mut Step, i: usize, io: &SiteBackward) -> Result<()> {
        self.lora.backward(ctx, s, i, io)
    }
    fn needs_input(&self) -> bool {
        true
    }
    fn params(&self) -> Vec<Param<'_>> {
        self.lora.params()
    }
    fn slots(&self) -> Vec<Slot<'_>> {
        self.lora.slots()
    }
    fn kept_bytes(&self) -> u64 {
        self.lora.kept_bytes()
    }
    fn rows(&self) -> usize {
        self.lora.rows()
    }

    fn before_update(&self, ctx: &Context, s: &mut Step) -> Result<()> {
        for (l, (oa, ob)) in self.lora.layers.iter().zip(self.old_a.iter().zip(&self.old_b)) {
            copy_forward(ctx, s, &l.a, oa, 0)?;
            for (b, o) in l.b.iter().zip(ob) {
                copy_forward(ctx, s, b, o, 0)?;
            }
        }
        Ok(())
    }

    fn after_update(&self, ctx: &Context, s: &mut Step, weights: &[SiteWeights]) -> Result<bool> {
        let layers = self.lora.layers.iter().zip(&self.lora.scales);
        for (((l, sc), w), (oa, ob)) in layers.zip(weights).zip(self.old_a.iter().zip(&self.old_b)) {
            let k = (self.lora.cfg.delta_lambda * *sc as f64) as f32;
            for ((b, o), part) in l.b.iter().zip(ob).zip(&w.parts) {
                add_product(ctx, s, b, &l.a, part, w.conv1d, k)?;
                add_product(ctx, s, o, oa, part, w.conv1d, -k)?;
            }
        }
        Ok(true)
    }

    fn merge(&self, ctx: &Context, s: &mut Step, weights: &[SiteWeights], sign: f32) -> Result<()> {
        self.lora.merge(ctx, s, weights, sign)
    }
}
