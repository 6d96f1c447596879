//! LoRA (Hu et al. 2021): `y = x W0ᵀ + s · dropout(x) Aᵀ Bᵀ`, A `(r, in)`, B `(out, r)`; r and s
//! may differ per site (PEFT's `rank_pattern` / `alpha_pattern`).
//!
//! Forward keeps `z = dropout(x) Aᵀ` `(N, r)` per site. Backward, with `g = dL/dy`:
//! `dB = s · gᵀ z`, `dz = s · g B`, `dA = dzᵀ dropout(x)`, `dx += mask ⊙ (dz A)`. The dropout
//! mask is regenerated from its seed, never stored. With A frozen (LoRA-FA) `dA` is skipped and
//! `x` is never read in backward. The same struct serves LoRA+ (an optimizer setting) and, with an
//! after-step hook, Delta-LoRA.

use super::{
    activation, add_product, first_rows, normal_init, scratch_view, uniform_init, zeros, Adapter, AdapterConfig,
    AdapterError, Dropout, Init, Param, ParamKind, Result, Site, SiteBackward, SiteWeights, Slot,
};
use std::collections::BTreeMap;

use crate::gpu::{Context, Step, Tensor};
use crate::model::weights::HostTensor;
use crate::ops::matmul::{matmul, Matmul};

/// One site's adapter tensors.
pub struct LoraLayer {
    pub a: Tensor,          // (r, in)
    pub b: Vec<Tensor>,     // per output part: (out_j, r)
    pub z: Tensor,          // (N, r) kept for backward
    pub da: Option<Tensor>, // (r, in); None when A is frozen
    pub db: Vec<Tensor>,    // per output part: (out_j, r)
    /// LoRA-FA's projected optimizer: the raw dB before `dB · (A Aᵀ + εI)⁻¹ / s²`.
    pub db_raw: Vec<Tensor>, // per output part: (out_j, r); empty otherwise
}

pub struct Lora {
    pub cfg: AdapterConfig,
    pub sites: Vec<Site>,
    pub layers: Vec<LoraLayer>,
    pub train_a: bool,
    /// Per site: s = alpha / r (or alpha / sqrt(r)).
    pub scales: Vec<f32>,
    pub n: usize,
    pub(crate) dz: Tensor, // (N · max r,) scratch, viewed as (N, r) per site
    pub(crate) dropout: Option<Dropout>,
    /// LoRA-FA projected: `(A Aᵀ + 1e-8 I)⁻¹` `(r, r)` per site (A is frozen, so computed once).
    pub proj: Vec<Tensor>,
}

impl Lora {
    /// A LoRA adapter with PEFT's init: A kaiming-uniform (or gaussian), B = 0.
    pub fn new(ctx: &Context, cfg: &AdapterConfig, sites: Vec<Site>, n: usize, train_a: bool) -> Result<Self> {
        let mut rng = crate::rng::Rng::new(cfg.seed ^ 0x4c6f_5241);
        let projected = !train_a && cfg.lorafa_projected;
        let mut layers = Vec::with_capacity(sites.len());
        let mut host_a = Vec::with_capacity(sites.len());
        let mut scales = Vec::with_capacity(sites.len());
        let mut max_r = 1;
        for site in &sites {
            let k = site.in_features;
            let r = cfg.rank_for(&site.module)?;
            max_r = max_r.max(r);
            scales.push(cfg.scale_for(&site.module)? as f32);
            host_a.push(match cfg.init {
                Init::Kaiming => uniform_init(&mut rng, r * k, 1.0 / (k as f64).sqrt()),
                Init::Gaussian => normal_init(&mut rng, r * k, 1.0 / r as f64),
            });
            let a = ctx.upload_f32(&format!("{}.lora_A", site.module), &[r, k], host_a.last().expect("pushed"))?;
            let part = |label: &str, o: usize| zeros(ctx, &format!("{}.{label}", site.module), &[o, r]);
            layers.push(LoraLayer {
                a,
                b: site.outs.iter().map(|&o| part("lora_B", o)).collect::<Result<_>>()?,
                z: activation(ctx, &format!("{}.z", site.module), &[n, r])?,
                da: if train_a { Some(zeros(ctx, &format!("{}.lora_A.grad", site.module), &[r, k])?) } else { None },
                db: site.outs.iter().map(|&o| part("lora_B.grad", o)).collect::<Result<_>>()?,
                db_raw: if projected {
                    site.outs.iter().map(|&o| part("lora_B.grad_raw", o)).collect::<Result<_>>()?
                } else {
                    Vec::new()
                },
            });
        }
        let dropout = Dropout::new(ctx, cfg.dropout, n, &sites)?;
        let mut lora = Lora {
            cfg: cfg.clone(),
            scales,
            dz: activation(ctx, "lora_dz", &[n * max_r])?,
            dropout,
            n,
            train_a,
            layers,
            sites,
            proj: Vec::new(),
        };
        if projected {
            lora.set_projection(ctx, &host_a.iter().map(Vec::as_slice).collect::<Vec<_>>())?;
        }
        Ok(lora)
    }

    /// Computes LoRA-FA's `(A Aᵀ + 1e-8 I)⁻¹` per site from A's values `a[i]` (f64 on the host,
    /// r × r), writing existing tensors in place (recorded steps hold them).
    fn set_projection(&mut self, ctx: &Context, a: &[&[f32]]) -> Result<()> {
        for (i, (site, a)) in self.sites.iter().zip(a).enumerate() {
            let (r, k) = (self.layers[i].a.shape()[0], site.in_features);
            let mut m = vec![0f64; r * r];
            for p in 0..r {
                for q in 0..r {
                    m[p * r + q] = (0..k).map(|c| a[p * k + c] as f64 * a[q * k + c] as f64).sum::<f64>()
                        + if p == q { 1e-8 } else { 0.0 };
                }
            }
            let inv = invert(&m, r).ok_or_else(|| {
                AdapterError::Option(format!(
                    "{}: A·Aᵀ is singular; LoRA-FA's projection needs a full-rank A",
                    site.module
                ))
            })?;
            let inv: Vec<f32> = inv.into_iter().map(|v| v as f32).collect();
            match self.proj.get(i) {
                Some(t) => ctx.write_f32(t, &inv)?,
                None => self.proj.push(ctx.upload_f32(&format!("{}.lorafa_proj", site.module), &[r, r], &inv)?),
            }
        }
        Ok(())
    }
}

impl Lora {
    /// `y_j += scale · z · B_jᵀ` for site `i`, accumulated straight into the projection's output.
    fn branch_out(&self, ctx: &Context, s: &mut Step, i: usize, z: &Tensor, ys: &[&Tensor]) -> Result<()> {
        for (b, y) in self.layers[i].b.iter().zip(ys) {
            matmul(ctx, s, z, b, y, Matmul::nt().alpha(self.scales[i]).accumulate(true))?;
        }
        Ok(())
    }
}

/// Gauss–Jordan inverse with partial pivoting of an `(n, n)` f64 matrix.
fn invert(m: &[f64], n: usize) -> Option<Vec<f64>> {
    let mut a = m.to_vec();
    let mut inv: Vec<f64> = (0..n * n).map(|i| if i / n == i % n { 1.0 } else { 0.0 }).collect();
    for col in 0..n {
        let piv = (col..n).max_by(|&x, &y| a[x * n + col].abs().total_cmp(&a[y * n + col].abs()))?;
        if a[piv * n + col].abs() < 1e-300 {
            return None;
        }
        for j in 0..n {
            a.swap(col * n + j, piv * n + j);
            inv.swap(col * n + j, piv * n + j);
        }
        let d = a[col * n + col];
        for j in 0..n {
            a[col * n + j] /= d;
            inv[col * n + j] /= d;
        }
        for row in 0..n {
            if row != col {
                let f = a[row * n + col];
                if f != 0.0 {
                    for j in 0..n {
                        a[row * n + j] -= f * a[col * n + j];
                        inv[row * n + j] -= f * inv[col * n + j];
                    }
                }
            }
        }
    }
    Some(inv)
}

impl Adapter for Lora {
    fn config(&self) -> &AdapterConfig {
        &self.cfg
    }
    fn sites(&self) -> &[Site] {
        &self.sites
    }

    fn forward(&self, ctx: &Context, s: &mut Step, i: usize, x: &Tensor, ys: &[&Tensor], train: bool) -> Result<()> {
        let l = &self.layers[i];
        let xd = Dropout::input(&self.dropout, ctx, s, i, x, train)?;
        // Generation runs fewer rows than training: z's first rows.
        let z = first_rows(&l.z, x.shape()[0])?;
        matmul(ctx, s, &xd, &l.a, &z, Matmul::nt())?;
        self.branch_out(ctx, s, i, &z, ys)
    }

    fn fusable_input_product(&self, i: usize, train: bool) -> Option<(&Tensor, &Tensor)> {
        // With dropout on, z reads dropout(x), not the x the frozen product reads.
        let l = &self.layers[i];
        (self.dropout.is_none() || !train).then_some((&l.a, &l.z))
    }

    fn forward_fused(&self, ctx: &Context, s: &mut Step, i: usize, ys: &[&Tensor]) -> Result<()> {
        self.branch_out(ctx, s, i, &self.layers[i].z, ys)
    }

    fn backward(&self, ctx: &Context, s: &mut Step, i: usize, io: &SiteBackward) -> Result<()> {
        let (x, dys, dx) = (io.x, io.dys, io.dx);
        let l = &self.layers[i];
        let sc = self.scales[i];
        let dz = &scratch_view(&self.dz, self.n, l.a.shape()[0])?;
        for (j, (b, dy)) in l.b.iter().zip(dys).enumerate() {
            let db = if l.db_raw.is_empty() { &l.db[j] } else { &l.db_raw[j] };
            matmul(ctx, s, dy, &l.z, db, Matmul::tn().alpha(sc))?;
            matmul(ctx, s, dy, b, dz, Matmul::nn().alpha(sc).accumulate(j > 0))?;
            if !l.db_raw.is_empty() {
                // PEFT's LoRA-FA optimizer: dB ← (1/s²) · dB · (A Aᵀ + εI)⁻¹.
                matmul(ctx, s, &l.db_raw[j], &self.proj[i], &l.db[j], Matmul::nn().alpha(1.0 / (sc * sc)))?;
            }
        }
        if let Some(da) = &l.da {
            let xd = Dropout::input(&self.dropout, ctx, s, i, x, true)?;
            matmul(ctx, s, dz, &xd, da, Matmul::tn())?;
        }
        Dropout::add_input_grad(&self.dropout, ctx, s, i, dz, &l.a, dx)
    }

    fn needs_input(&self) -> bool {
        self.train_a
    }

    fn params(&self) -> Vec<Param<'_>> {
        let mut out = Vec::new();
        for (site, l) in self.sites.iter().zip(&self.layers) {
            if let Some(da) = &l.da {
                out.push(Param {
                    name: format!("{}.lora_A.weight", site.module),
                    kind: ParamKind::A,
                    value: &l.a,
                    grad: da,
                });
            }
            for (j, (b, db)) in l.b.iter().zip(&l.db).enumerate() {
                let name = if l.b.len() == 1 {
                    format!("{}.lora_B.weight", site.module)
                } else {
                    format!("{}.lora_B.weight[part {j}]", site.module)
                };
                out.push(Param { name, kind: ParamKind::B, value: b, grad: db });
            }
        }
        out
    }

    fn slots(&self) -> Vec<Slot<'_>> {
        let mut out = Vec::new();
        for (site, l) in self.sites.iter().zip(&self.layers) {
            let r = l.a.shape()[0];
            let key = |t: &str| format!("base_model.model.{}.{t}.weight", site.module);
            out.push(Slot { key: key("lora_A"), shape: vec![r, site.in_features], parts: vec![&l.a] });
            out.push(Slot { key: key("lora_B"), shape: vec![site.out_features(), r], parts: l.b.iter().collect() });
        }
        out
    }

    fn kept_bytes(&self) -> u64 {
        self.layers.iter().map(|l| l.z.byte_len()).sum()
    }

    fn rows(&self) -> usize {
        self.n
    }

    fn dropout_seed(&self) -> Option<&Tensor> {
        self.dropout.as_ref().map(|d| &d.seed)
    }

    fn loaded(&mut self, ctx: &Context, tensors: &BTreeMap<String, HostTensor>) -> Result<()> {
        if self.proj.is_empty() {
            return Ok(());
        }
        let keys: Vec<String> =
            self.sites.iter().map(|s| format!("base_model.model.{}.lora_A.weight", s.module)).collect();
        let a = keys
            .iter()
            .map(|k| tensors.get(k).map(|t| t.data.as_slice()))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| AdapterError::Option("LoRA-FA's projection needs every lora_A".into()))?;
        self.set_projection(ctx, &a)
    }

    fn merge(&self, ctx: &Context, s: &mut Step, weights: &[SiteWeights], sign: f32) -> Result<()> {
        for ((l, w), sc) in self.layers.iter().zip(weights).zip(&self.scales) {
            for (b, part) in l.b.iter().zip(&w.parts) {
                add_product(ctx, s, b, &l.a, part, w.conv1d, sign * sc)?;
            }
        }
        Ok(())
    }
}
