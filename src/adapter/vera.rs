//! VeRA (Kopiczko et al. 2023): `y = x W0ᵀ + λ_b ⊙ (((dropout(x) A_sᵀ) ⊙ λ_d) B_sᵀ)` with one
//! frozen random pair for the whole model, A `(r, max_in)` and B `(max_out, r)`; a layer with
//! `in`, `out` uses `A[:, :in]` (a strided column view, no copy) and `B[:out, :]`. Trained per
//! layer: λ_d `(r,)` and λ_b `(out,)`. No alpha / r scale.
//!
//! Per site, with z = dropout(x) A_sᵀ `(N, r)` (kept), u = z ⊙ λ_d, t_j = u B_jᵀ `(N, out_j)`:
//! forward `y_j += t_j ⊙ λ_b,j`; backward `dλ_b,j = Σ_n g_j ⊙ t_j` (t_j recomputed from z),
//! `du = Σ_j (g_j ⊙ λ_b,j) B_j`, `dλ_d = Σ_n du ⊙ z`, `dx += mask ⊙ ((du ⊙ λ_d) A_s)`.
//! Like LoRA-FA it keeps only z: x is never read in backward.

use std::collections::BTreeMap;

use super::{
    activation, first_rows, scratch_view, uniform_init, Adapter, AdapterConfig, Dropout, Param, ParamKind, Result,
    Site, SiteBackward, SiteWeights, Slot,
};
use crate::gpu::{Context, DType, Step, Tensor};
use crate::model::weights::HostTensor;
use crate::ops::adapter::{scale_backward, scale_forward};
use crate::ops::matmul::{matmul, Matmul};

pub struct VeraLayer {
    pub lambda_d: Tensor,        // (r,)
    pub lambda_b: Vec<Tensor>,   // per output part: (out_j,)
    pub z: Tensor,               // (N, r) kept for backward
    pub d_lambda_d: Tensor,      // (r,)
    pub d_lambda_b: Vec<Tensor>, // per output part: (out_j,)
}

pub struct Vera {
    pub cfg: AdapterConfig,
    pub sites: Vec<Site>,
    pub shared_a: Tensor, // (r, max_in) frozen
    pub shared_b: Tensor, // (max_out, r) frozen
    /// Row ranges of B_s that are not a prefix (GPT-2 c_attn's k and v thirds) cannot be bound
    /// as views (offsets must be 256-byte aligned), so they are copied once, shared by all layers.
    b_rows: BTreeMap<(usize, usize), Tensor>, // (first row, rows) → (rows, r)
    pub layers: Vec<VeraLayer>,
    n: usize,
    u: Tensor,  // (N, r) scratch
    du: Tensor, // (N, r) scratch
    dz: Tensor, // (N, r) scratch
    t: Tensor,  // (N · max_out_part,) scratch
    dt: Tensor, // (N · max_out_part,) scratch
    dropout: Option<Dropout>,
}

impl Vera {
    /// VeRA with the shared pair from the seeded generator (kaiming-uniform, gain sqrt(2)),
    /// λ_d = d_initial and λ_b = 0, so the model starts exactly at the base.
    pub fn new(ctx: &Context, cfg: &AdapterConfig, sites: Vec<Site>, n: usize) -> Result<Self> {
        let r = cfg.rank;
        let max_in = sites.iter().map(|s| s.in_features).max().unwrap_or(1);
        let max_out = sites.iter().map(|s| s.out_features()).max().unwrap_or(1);
        let max_part = sites.iter().flat_map(|s| s.outs.iter().copied()).max().unwrap_or(1);
        let mut rng = crate::rng::Rng::new(cfg.vera_seed ^ 0x5665_5241);
        let a = uniform_init(&mut rng, r * max_in, (6.0 / max_in as f64).sqrt());
        let b = uniform_init(&mut rng, max_out * r, (6.0 / r as f64).sqrt());
        let shared_a = ctx.upload_f32("base_model.vera_A", &[r, max_in], &a)?;
        let shared_b = ctx.upload_f32("base_model.vera_B", &[max_out, r], &b)?;
        let mut layers = Vec::with_capacity(sites.len());
        for site in &sites {
            let vec = |label: &str, len: usize, v: f32| -> Result<Tensor> {
                Ok(ctx.upload_f32(&format!("{}.{label}", site.module), &[len], &vec![v; len])?)
            };
            layers.push(VeraLayer {
                lambda_d: vec("vera_lambda_d", r, cfg.vera_d_initial as f32)?,
                lambda_b: site.outs.iter().map(|&o| vec("vera_lambda_b", o, 0.0)).collect::<Result<_>>()?,
                z: activation(ctx, &format!("{}.z", site.module), &[n, r])?,
                d_lambda_d: vec("vera_lambda_d.grad", r, 0.0)?,
                d_lambda_b: site.outs.iter().map(|&o| vec("vera_lambda_b.grad", o, 0.0)).collect::<Result<_>>()?,
            });
        }
        let scratch = |label: &str, len: usize| activation(ctx, label, &[len]);
        let mut vera = Vera {
            shared_a,
            shared_b,
            b_rows: BTreeMap::new(),
            layers,
            n,
            u: activation(ctx, "vera_u", &[n, r])?,
            du: activation(ctx, "vera_du", &[n, r])?,
            dz: activation(ctx, "vera_dz", &[n, r])?,
            t: scratch("vera_t", n * max_part)?,
            dt: scratch("vera_dt", n * max_part)?,
            dropout: Dropout::new(ctx, cfg.dropout, n, &sites)?,
            cfg: cfg.clone(),
            sites,
        };
        vera.set_rows(ctx, &b)?;
        Ok(vera)
    }

    /// (Re)creates the copies of B_s's non-prefix row ranges from the shared B's values `all`
    /// `(max_out, r)`, writing existing tensors in place (recorded steps hold them).
    fn set_rows(&mut self, ctx: &Context, all: &[f32]) -> Result<()> {
        let r = self.cfg.rank;
        for site in &self.sites {
            let mut first = 0;
            for &o in &site.outs {
                if first > 0 {
                    let data = &all[first * r..(first + o) * r];
                    match self.b_rows.get(&(first, o)) {
                        Some(t) => ctx.write_f32(t, data)?,
                        None => {
                            self.b_rows.insert((first, o), ctx.upload_f32("vera_B_rows", &[o, r], data)?);
                        }
                    }
                }
                first += o;
            }
        }
        Ok(())
    }

    /// `B_s` rows `first .. first + rows`, `(rows, r)`.
    fn b_part(&self, first: usize, rows: usize) -> Result<Tensor> {
        if first == 0 {
            return Ok(self.shared_b.rows(0, rows, 1)?);
        }
        Ok(self.b_rows[&(first, rows)].clone())
    }

    /// `A_s[:, :in]` as a column view `(r, in)`.
    fn a_part(&self, ctx: &Context, k: usize) -> Result<Tensor> {
        if k == self.shared_a.shape()[1] {
            return Ok(self.shared_a.clone());
        }
        Ok(self.shared_a.cols(0, k, ctx.limits().storage_offset_alignment)?)
    }

    fn parts(&self, i: usize) -> Result<Vec<Tensor>> {
        let mut first = 0;
        let mut out = Vec::new();
        for &o in &self.sites[i].outs {
            out.push(self.b_part(first, o)?);
            first += o;
        }
        Ok(out)
    }
}

impl Adapter for Vera {
    fn config(&self) -> &AdapterConfig {
        &self.cfg
    }
    fn sites(&self) -> &[Site] {
        &self.sites
    }

    fn forward(&self, ctx: &Context, s: &mut Step, i: usize, x: &Tensor, ys: &[&Tensor], train: bool) -> Result<()> {
        let l = &self.layers[i];
        // Generation runs fewer rows than training: the first rows of each activation.
        let n = x.shape()[0];
        let (z, u) = (first_rows(&l.z, n)?, first_rows(&self.u, n)?);
        let xd = Dropout::input(&self.dropout, ctx, s, i, x, train)?;
        matmul(ctx, s, &xd, &self.a_part(ctx, self.sites[i].in_features)?, &z, Matmul::nt())?;
        scale_forward(ctx, s, &z, &l.lambda_d, None, &u, false)?;
        for ((bp, lb), y) in self.parts(i)?.iter().zip(&l.lambda_b).zip(ys) {
            let t = scratch_view(&self.t, n, bp.shape()[0])?;
            matmul(ctx, s, &u, bp, &t, Matmul::nt())?;
            scale_forward(ctx, s, &t, lb, None, y, true)?;
        }
        Ok(())
    }

    fn backward(&self, ctx: &Context, s: &mut Step, i: usize, io: &SiteBackward) -> Result<()> {
        let (dys, dx) = (io.dys, io.dx);
        let l = &self.layers[i];
        let n = self.n;
        scale_forward(ctx, s, &l.z, &l.lambda_d, None, &self.u, false)?;
        for (j, ((bp, lb), dy)) in self.parts(i)?.iter().zip(&l.lambda_b).zip(dys).enumerate() {
            let o = bp.shape()[0];
            let t = scratch_view(&self.t, n, o)?;
            let dt = scratch_view(&self.dt, n, o)?;
            matmul(ctx, s, &self.u, bp, &t, Matmul::nt())?;
            scale_backward(ctx, s, dy, &t, &l.d_lambda_b[j], false)?;
            scale_forward(ctx, s, dy, lb, None, &dt, false)?;
            matmul(ctx, s, &dt, bp, &self.du, Matmul::nn().accumulate(j > 0))?;
        }
        scale_backward(ctx, s, &self.du, &l.z, &l.d_lambda_d, false)?;
        scale_forward(ctx, s, &self.du, &l.lambda_d, None, &self.dz, false)?;
        let a = self.a_part(ctx, self.sites[i].in_features)?;
        Dropout::add_input_grad(&self.dropout, ctx, s, i, &self.dz, &a, dx)
    }

    fn needs_input(&self) -> bool {
        false
    }

    fn rows(&self) -> usize {
        self.n
    }

    fn params(&self) -> Vec<Param<'_>> {
        let mut out = Vec::new();
        for (site, l) in self.sites.iter().zip(&self.layers) {
            for (j, (lb, dlb)) in l.lambda_b.iter().zip(&l.d_lambda_b).enumerate() {
                let name = if l.lambda_b.len() == 1 {
                    format!("{}.vera_lambda_b", site.module)
                } else {
                    format!("{}.vera_lambda_b[part {j}]", site.module)
                };
                out.push(Param { name, kind: ParamKind::Vector, value: lb, grad: dlb });
            }
            out.push(Param {
                name: format!("{}.vera_lambda_d", site.module),
                kind: ParamKind::Vector,
                value: &l.lambda_d,
                grad: &l.d_lambda_d,
            });
        }
        out
    }

    fn slots(&self) -> Vec<Slot<'_>> {
        let mut out = vec![
            Slot {
                key: "base_model.vera_A".into(),
                shape: self.shared_a.shape().to_vec(),
                parts: vec![&self.shared_a],
            },
            Slot {
                key: "base_model.vera_B".into(),
                shape: self.shared_b.shape().to_vec(),
                parts: vec![&self.shared_b],
            },
        ];
        for (site, l) in self.sites.iter().zip(&self.layers) {
            let key = |t: &str| format!("base_model.model.{}.{t}", site.module);
            out.push(Slot {
                key: key("vera_lambda_b"),
                shape: vec![site.out_features()],
                parts: l.lambda_b.iter().collect(),
            });
            out.push(Slot { key: key("vera_lambda_d"), shape: vec![self.cfg.rank], parts: vec![&l.lambda_d] });
        }
        out
    }

    fn kept_bytes(&self) -> u64 {
        self.layers.iter().map(|l| l.z.byte_len()).sum()
    }

    fn dropout_seed(&self) -> Option<&Tensor> {
        self.dropout.as_ref().map(|d| &d.seed)
    }

    fn loaded(&mut self, ctx: &Context, tensors: &BTreeMap<String, HostTensor>) -> Result<()> {
        match tensors.get("base_model.vera_B") {
            Some(b) => self.set_rows(ctx, &b.data),
            None => Err(super::AdapterError::Option("a VeRA adapter needs base_model.vera_B".into())),
        }
    }

    /// `W0 += sign · λ_b ⊙ B_s (λ_d ⊙ A_s)`: B_s's rows scaled by λ_b and its columns by λ_d into
    /// a scratch `(out_j, r)`, then one accumulating matmul per part.
    fn merge(&self, ctx: &Context, s: &mut Step, weights: &[SiteWeights], sign: f32) -> Result<()> {
        let r = self.cfg.rank;
        let max_out = self.shared_b.shape()[0];
        let scaled = ctx.tensor("vera_merge_B", &[max_out * r], DType::F32)?;
        for (i, (l, w)) in self.layers.iter().zip(weights).enumerate() {
            let a = self.a_part(ctx, self.sites[i].in_features)?;
            for ((bp, lb), part) in self.parts(i)?.iter().zip(&l.lambda_b).zip(&w.parts) {
                let bs = scratch_view(&scaled, bp.shape()[0], r)?;
                scale_forward(ctx, s, bp, &l.lambda_d, Some(lb), &bs, false)?;
                super::add_product(ctx, s, &bs, &a, part, w.conv1d, sign)?;
            }
        }
        Ok(())
    }
}
