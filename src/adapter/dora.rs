//! DoRA (Liu et al. 2024; PEFT's `use_dora`): LoRA's A and B plus a trained magnitude `m` per
//! output, which rescales the adapted weight's rows: `W' = m ⊙ (W0 + s·B·A) / n`, with
//! `n_o = ‖W0_o + s·(B·A)_o‖` over the input dimension, treated as a constant in backward (PEFT
//! detaches it, as the paper recommends). With `g = m / n` (per output):
//!
//! - no dropout (and evaluation): `y = g ⊙ (x·W0ᵀ + s·z·Bᵀ) + bias`, `z = x·Aᵀ`. The model adds
//!   the bias after the branch, so the branch scales the frozen product it is given in place.
//! - dropout while training, as PEFT computes it: `y = x·W0ᵀ + bias + (g − 1) ⊙ (x'·W0ᵀ) +
//!   g ⊙ s·(x'·Aᵀ)·Bᵀ` with `x' = dropout(x)`: one more frozen product, and its sum with the
//!   branch, `u = x'·W0ᵀ + s·z'·Bᵀ`, kept for the magnitude's gradient.
//!
//! `n` is reduced on the GPU without materialising `W0 + s·B·A`:
//! `n_o² = ‖W0_o‖² + Σ_j B[o, j] · U[j, o]` with `U = 2s·A·W0ᵀ + s²·(A·Aᵀ)·Bᵀ` (r × out), where
//! `‖W0_o‖²` is computed once when the adapter is bound to its model (the frozen weight as the
//! GPU holds it, packed or not). Backward, with `dy` the output's gradient: `dm = Σ_t dy ⊙ v / k`
//! (v = y − bias and k = m without dropout, since y − bias = g ⊙ (x·W0ᵀ + s·z·Bᵀ); v = u and k = n
//! with it) and LoRA's gradients from `g ⊙ dy`. Without dropout the model's frozen
//! input-gradient product takes `g ⊙ dy` itself, handed to it before it runs
//! ([`Adapter::scaled_output_grads`]); with dropout that product uses `dy` (the unscaled
//! `x·W0ᵀ` term), and the missing `(g − 1) ⊙ dy · W0` goes through the mask with `dz · A`.
//! (Reading `y` instead of keeping `x·W0ᵀ + s·z·Bᵀ` divides by m: a magnitude of exactly 0, which
//! PEFT would train through, makes its gradient NaN here, and the step's gradient check stops the
//! run.)

use std::collections::BTreeMap;

use super::lora::Lora;
use super::{
    activation, add_product, first_rows, scratch_view, zeros, Adapter, AdapterConfig, AdapterError, Param, ParamKind,
    Result, Site, SiteBackward, SiteBase, SiteWeights, Slot,
};
use crate::gpu::{Context, DType, Step, Tensor};
use crate::model::weights::HostTensor;
use crate::ops::dora::{dora_backward, dora_forward, dora_norm, dora_sumsq, dora_weight, DoraSaved};
use crate::ops::elementwise::{axpy_forward, copy_forward};
use crate::ops::matmul::{matmul, Matmul};

/// One site's magnitude and what is derived from it, per output part.
struct Magnitude {
    m: Vec<Tensor>,  // (out_j,) trained
    dm: Vec<Tensor>, // (out_j,)
    c: Vec<Tensor>,  // (out_j,) ‖W0_o‖², set when bound
    n: Vec<Tensor>,  // (out_j,) this step's norms
    g: Vec<Tensor>,  // (out_j,) m / n
    u: Vec<Tensor>,  // (N, out_j) with dropout: x'·W0ᵀ + s·z·Bᵀ, kept for backward
}

pub struct Dora {
    pub lora: Lora,
    mags: Vec<Magnitude>,
    gram: Tensor, // (max r²,) scratch: A·Aᵀ
    ut: Tensor,   // (max r · max out,) scratch: U
    /// g ⊙ dy of every site of one projection group (the sites sharing an input, whose frozen
    /// products all run before their adapters' backward: see [`Adapter::scaled_output_grads`]),
    /// each part at its own aligned offset (`dyg_at`, elements).
    dyg: Tensor,
    dyg_at: Vec<Vec<usize>>,
    h: Tensor, // (N · max out,) scratch: (g − 1) ⊙ dy
    bases: Vec<SiteBase>,
    /// The magnitudes hold values (a file's, or the norms at binding); binding again (after a
    /// detach) must not reset them.
    m_set: bool,
}

/// Where each site's output parts keep `g ⊙ dy` in the shared scratch: sites of one layer that
/// share an input are live together (one projection group's backward), so they get distinct
/// offsets, rounded to the storage alignment; other groups reuse the space. Returns the offsets
/// (elements) per site and part, and the scratch's length.
fn group_offsets(ctx: &Context, sites: &[Site], n: usize) -> (Vec<Vec<usize>>, usize) {
    let align = (ctx.limits().storage_offset_alignment as usize / 4).max(1);
    let mut next: BTreeMap<(usize, u8), usize> = BTreeMap::new();
    let mut len = 0;
    let at = sites
        .iter()
        .map(|site| {
            let end = next.entry((site.layer, site.proj.input() as u8)).or_insert(0);
            let parts = site
                .outs
                .iter()
                .map(|&o| {
                    let start = *end;
                    *end = (start + n * o).next_multiple_of(align);
                    start
                })
                .collect();
            len = len.max(*end);
            parts
        })
        .collect();
    (at, len)
}

/// The frozen product's op for a site's layout: `x·W0ᵀ` (Linear `(out, in)`) or `x·W0` (Conv1D).
fn forward_op(conv1d: bool) -> Matmul {
    if conv1d {
        Matmul::nn()
    } else {
        Matmul::nt()
    }
}

/// The input gradient's op: `dy·W0` (Linear) or `dy·W0ᵀ` (Conv1D).
fn backward_op(conv1d: bool) -> Matmul {
    if conv1d {
        Matmul::nt()
    } else {
        Matmul::nn()
    }
}

impl Dora {
    /// LoRA's init (A kaiming-uniform, B = 0); the magnitudes become the norms of W0 when the
    /// adapter is bound to its model (PEFT's init), unless a file set them first.
    pub fn new(ctx: &Context, cfg: &AdapterConfig, sites: Vec<Site>, n: usize) -> Result<Self> {
        let lora = Lora::new(ctx, cfg, sites, n, true)?;
        let dropout = cfg.dropout > 0.0;
        let mut mags = Vec::with_capacity(lora.sites.len());
        let (mut max_r, mut max_out) = (1, 1);
        for (site, l) in lora.sites.iter().zip(&lora.layers) {
            max_r = max_r.max(l.a.shape()[0]);
            max_out = max_out.max(site.outs.iter().copied().max().unwrap_or(1));
            let vec = |label: &str| -> Result<Vec<Tensor>> {
                site.outs.iter().map(|&o| zeros(ctx, &format!("{}.{label}", site.module), &[o])).collect()
            };
            let u = match dropout {
                true => {
                    site.outs.iter().map(|&o| activation(ctx, &format!("{}.dora_u", site.module), &[n, o])).collect()
                }
                false => Ok(Vec::new()),
            };
            mags.push(Magnitude {
                m: vec("lora_magnitude_vector")?,
                dm: vec("lora_magnitude_vector.grad")?,
                c: vec("dora_c")?,
                n: vec("dora_n")?,
                g: vec("dora_g")?,
                u: u?,
            });
        }
        let (dyg_at, dyg_len) = group_offsets(ctx, &lora.sites, n);
        Ok(Dora {
            gram: activation(ctx, "dora_gram", &[max_r * max_r])?,
            ut: activation(ctx, "dora_u_norm", &[max_r * max_out])?,
            dyg: activation(ctx, "dora_dyg", &[dyg_len.max(n * max_out)])?,
            dyg_at,
            h: activation(ctx, "dora_h", &[n * max_out])?,
            lora,
            mags,
            bases: Vec::new(),
            m_set: false,
        })
    }

    fn base(&self, i: usize) -> Result<&SiteBase> {
        self.bases.get(i).ok_or_else(|| {
            AdapterError::Option("DoRA reads its model's frozen weights: attach the adapter to a model first".into())
        })
    }

    /// Records `n` and `g = m / n` of every output part of site `i` from the current A and B.
    fn norms(&self, ctx: &Context, s: &mut Step, i: usize) -> Result<()> {
        let (l, mg, base) = (&self.lora.layers[i], &self.mags[i], self.base(i)?);
        let (r, sc) = (l.a.shape()[0], self.lora.scales[i]);
        let gram = scratch_view(&self.gram, r, r)?;
        matmul(ctx, s, &l.a, &l.a, &gram, Matmul::nt())?;
        for (j, (w, b)) in base.parts.iter().zip(&l.b).enumerate() {
            let ut = scratch_view(&self.ut, r, b.shape()[0])?;
            matmul(ctx, s, &l.a, w, &ut, forward_op(base.conv1d).alpha(2.0 * sc))?;
            matmul(ctx, s, &gram, b, &ut, Matmul::nt().alpha(sc * sc).accumulate(true))?;
            dora_norm(ctx, s, &mg.c[j], b, &ut, &mg.m[j], &mg.n[j], &mg.g[j])?;
        }
        Ok(())
    }

    /// Records `c = ‖W0_o‖²` of every part of every site: straight from an f32 weight, or from
    /// the rows of a packed one dequantized by the embedding gather (packed weights are Linear)
    /// into one scratch the size of the largest, so that binding never holds an f32 copy of the
    /// base. Returns the scratch tensors, to be dropped once the step is submitted.
    fn record_sums(&self, ctx: &Context, s: &mut Step) -> Result<Vec<Tensor>> {
        let packed = || self.bases.iter().flat_map(|b| &b.parts).filter(|w| w.dtype() != DType::F32);
        let rows = packed().map(|w| w.shape()[0]).max().unwrap_or(0);
        let size = packed().map(|w| w.numel()).max().unwrap_or(0);
        let scratch = match rows {
            0 => None,
            _ => Some((
                ctx.upload_u32("dora rows", &[rows], &(0..rows as u32).collect::<Vec<_>>())?,
                ctx.tensor("dora W0 rows", &[size], DType::F32)?,
            )),
        };
        for (base, mg) in self.bases.iter().zip(&self.mags) {
            for (w, c) in base.parts.iter().zip(&mg.c) {
                match (&scratch, w.shape()) {
                    (Some((ids, flat)), &[rows, cols]) if w.dtype() != DType::F32 => {
                        let f32_rows = scratch_view(flat, rows, cols)?;
                        crate::ops::embed::embed_forward(ctx, s, &ids.rows(0, rows, 4)?, w, &f32_rows)?;
                        dora_sumsq(ctx, s, &f32_rows, true, c)?;
                    }
                    _ => dora_sumsq(ctx, s, w, !base.conv1d, c)?,
                }
            }
        }
        Ok(scratch.map(|(ids, flat)| vec![ids, flat]).unwrap_or_default())
    }

    /// `y_j += g_j ⊙ u_j − x'·W0ᵀ` for the branch with dropout (see the module doc).
    fn forward_dropout(&self, ctx: &Context, s: &mut Step, i: usize, x: &Tensor, ys: &[&Tensor]) -> Result<()> {
        let (l, mg, base) = (&self.lora.layers[i], &self.mags[i], self.base(i)?);
        let d = self.lora.dropout.as_ref().expect("called with dropout");
        let rows = x.shape()[0];
        let xd = d.apply(ctx, s, i, x)?;
        let z = first_rows(&l.z, rows)?;
        matmul(ctx, s, &xd, &l.a, &z, Matmul::nt())?;
        for (j, ((w, b), y)) in base.parts.iter().zip(&l.b).zip(ys).enumerate() {
            let u = first_rows(&mg.u[j], rows)?;
            matmul(ctx, s, &xd, w, &u, forward_op(base.conv1d))?;
            axpy_forward(ctx, s, -1.0, &u, y)?;
            matmul(ctx, s, &z, b, &u, Matmul::nt().alpha(self.lora.scales[i]).accumulate(true))?;
            dora_forward(ctx, s, &mg.g[j], Some(&u), y)?;
        }
        Ok(())
    }

    fn scale_outputs(&self, ctx: &Context, s: &mut Step, i: usize, ys: &[&Tensor]) -> Result<()> {
        for (g, y) in self.mags[i].g.iter().zip(ys) {
            dora_forward(ctx, s, g, None, y)?;
        }
        Ok(())
    }
}

impl Adapter for Dora {
    fn config(&self) -> &AdapterConfig {
        &self.lora.cfg
    }
    fn sites(&self) -> &[Site] {
        &self.lora.sites
    }

    fn forward(&self, ctx: &Context, s: &mut Step, i: usize, x: &Tensor, ys: &[&Tensor], train: bool) -> Result<()> {
        self.norms(ctx, s, i)?;
        if train && self.lora.dropout.is_some() {
            return self.forward_dropout(ctx, s, i, x, ys);
        }
        self.lora.forward(ctx, s, i, x, ys, train)?;
        self.scale_outputs(ctx, s, i, ys)
    }

    fn fusable_input_product(&self, i: usize, train: bool) -> Option<(&Tensor, &Tensor)> {
        self.lora.fusable_input_product(i, train)
    }

    fn forward_fused(&self, ctx: &Context, s: &mut Step, i: usize, ys: &[&Tensor]) -> Result<()> {
        self.norms(ctx, s, i)?;
        self.lora.forward_fused(ctx, s, i, ys)?;
        self.scale_outputs(ctx, s, i, ys)
    }

    fn scaled_output_grads(
        &self,
        ctx: &Context,
        s: &mut Step,
        i: usize,
        ys: &[&Tensor],
        dys: &[&Tensor],
    ) -> Result<Option<Vec<Tensor>>> {
        // With dropout the frozen product's `x·W0ᵀ` term is not scaled: backward adds the rest.
        if self.lora.dropout.is_some() {
            return Ok(None);
        }
        let (mg, base, n) = (&self.mags[i], self.base(i)?, self.lora.n);
        let flat = self.dyg.reshape(&[self.dyg.numel(), 1])?;
        let align = ctx.limits().storage_offset_alignment;
        let mut out = Vec::with_capacity(dys.len());
        for (j, (dy, y)) in dys.iter().zip(ys).enumerate() {
            let o = mg.g[j].numel();
            let dyg = flat.rows(self.dyg_at[i][j], n * o, align)?.reshape(&[n, o])?;
            let h = scratch_view(&self.h, n, o)?;
            let saved = DoraSaved::Output { y, bias: base.biases[j].as_ref() };
            dora_backward(ctx, s, dy, saved, &mg.m[j], &mg.n[j], &mg.g[j], &mg.dm[j], &dyg, &h)?;
            out.push(dyg);
        }
        Ok(Some(out))
    }

    fn backward(&self, ctx: &Context, s: &mut Step, i: usize, io: &SiteBackward) -> Result<()> {
        let (x, dys, dx) = (io.x, io.dys, io.dx);
        let (l, mg, base) = (&self.lora.layers[i], &self.mags[i], self.base(i)?);
        let (n, r, sc) = (self.lora.n, l.a.shape()[0], self.lora.scales[i]);
        let Some(d) = self.lora.dropout.as_ref() else {
            // `dys` are g ⊙ dy already (scaled_output_grads; dm is done): LoRA's gradients.
            return self.lora.backward(ctx, s, i, io);
        };
        // With dropout: dm from the kept u; LoRA's gradients from g ⊙ dy; the frozen product's
        // missing (g − 1) ⊙ dy · W0 and the branch's dz · A both through the mask, gathered
        // before it.
        let dz = scratch_view(&self.lora.dz, n, r)?;
        let pre = scratch_view(&d.dxs, n, dx.shape()[1])?;
        for (j, ((w, b), dy)) in base.parts.iter().zip(&l.b).zip(dys).enumerate() {
            let out = b.shape()[0];
            let (dyg, h) = (scratch_view(&self.dyg, n, out)?, scratch_view(&self.h, n, out)?);
            let saved = DoraSaved::Dropout { u: &mg.u[j] };
            dora_backward(ctx, s, dy, saved, &mg.m[j], &mg.n[j], &mg.g[j], &mg.dm[j], &dyg, &h)?;
            matmul(ctx, s, &dyg, &l.z, &l.db[j], Matmul::tn().alpha(sc))?;
            matmul(ctx, s, &dyg, b, &dz, Matmul::nn().alpha(sc).accumulate(j > 0))?;
            matmul(ctx, s, &h, w, &pre, backward_op(base.conv1d).accumulate(j > 0))?;
        }
        let xd = d.apply(ctx, s, i, x)?;
        if let Some(da) = &l.da {
            matmul(ctx, s, &dz, &xd, da, Matmul::tn())?;
        }
        matmul(ctx, s, &dz, &l.a, &pre, Matmul::nn().accumulate(true))?;
        crate::ops::adapter::dropout_backward(ctx, s, &pre, &d.seed, i as u32, d.p, dx)?;
        Ok(())
    }

    fn bind(&mut self, ctx: &Context, bases: Vec<SiteBase>) -> Result<()> {
        for (site, base) in self.lora.sites.iter().zip(&bases) {
            if base.parts.len() != site.outs.len() {
                return Err(AdapterError::Option(format!("{}: {} weight parts bound", site.module, base.parts.len())));
            }
        }
        self.bases = bases;
        let mut s = Step::new();
        let _scratch = self.record_sums(ctx, &mut s)?;
        if !self.m_set {
            // PEFT's init: m = ‖W0 + s·B·A‖ (B = 0 unless a file set it).
            for i in 0..self.bases.len() {
                self.norms(ctx, &mut s, i)?;
                for (n, m) in self.mags[i].n.iter().zip(&self.mags[i].m) {
                    copy_forward(ctx, &mut s, n, m, 0)?;
                }
            }
            self.m_set = true;
        }
        ctx.run(&s)?;
        Ok(())
    }

    fn needs_input(&self) -> bool {
        true
    }

    fn params(&self) -> Vec<Param<'_>> {
        let mut out = self.lora.params();
        for (site, mg) in self.lora.sites.iter().zip(&self.mags) {
            for (j, (m, dm)) in mg.m.iter().zip(&mg.dm).enumerate() {
                let name = match mg.m.len() {
                    1 => format!("{}.lora_magnitude_vector.weight", site.module),
                    _ => format!("{}.lora_magnitude_vector.weight[part {j}]", site.module),
                };
                out.push(Param { name, kind: ParamKind::Vector, value: m, grad: dm });
            }
        }
        out
    }

    fn slots(&self) -> Vec<Slot<'_>> {
        let mut out = self.lora.slots();
        for (site, mg) in self.lora.sites.iter().zip(&self.mags) {
            out.push(Slot {
                key: format!("base_model.model.{}.lora_magnitude_vector", site.module),
                shape: vec![site.out_features()],
                parts: mg.m.iter().collect(),
            });
        }
        out
    }

    fn kept_bytes(&self) -> u64 {
        self.lora.kept_bytes() + self.mags.iter().flat_map(|m| &m.u).map(Tensor::byte_len).sum::<u64>()
    }

    fn rows(&self) -> usize {
        self.lora.rows()
    }

    fn dropout_seed(&self) -> Option<&Tensor> {
        self.lora.dropout_seed()
    }

    fn loaded(&mut self, ctx: &Context, tensors: &BTreeMap<String, HostTensor>) -> Result<()> {
        self.m_set |= tensors.keys().any(|k| k.ends_with(".lora_magnitude_vector"));
        self.lora.loaded(ctx, tensors)
    }

    fn merge(&self, ctx: &Context, s: &mut Step, weights: &[SiteWeights], sign: f32) -> Result<()> {
        for (i, w) in weights.iter().enumerate() {
            let (l, mg, sc) = (&self.lora.layers[i], &self.mags[i], self.lora.scales[i]);
            if sign > 0.0 {
                // W ← g ⊙ (W0 + s·B·A), g from W0 as it is before the merge (PEFT's merge).
                self.norms(ctx, s, i)?;
                for ((b, part), g) in l.b.iter().zip(&w.parts).zip(&mg.g) {
                    add_product(ctx, s, b, &l.a, part, w.conv1d, sc)?;
                    dora_weight(ctx, s, g, part, !w.conv1d, false)?;
                }
            } else {
                // The g of the merge (nothing trains while merged) undoes it.
                for ((b, part), g) in l.b.iter().zip(&w.parts).zip(&mg.g) {
                    dora_weight(ctx, s, g, part, !w.conv1d, true)?;
                    add_product(ctx, s, b, &l.a, part, w.conv1d, -sc)?;
                }
            }
        }
        Ok(())
    }
}
