//! LoRA-FA (Zhang et al. 2023): LoRA with A frozen at its random init; only B trains.
//!
//! The point is activation memory. `dB = s · gᵀ z` needs only `z = x Aᵀ` `(N, r)`, and the
//! input gradient `s · (g B) A` needs no stored activation at all (W0 and A are frozen), so the
//! adapter keeps z and never the full-width input: [`Adapter::needs_input`] is false and the
//! model's memory plan then keeps no per-layer copy of the projections' inputs (see
//! `GpuModel`'s plan). PEFT's implementation does not realise this saving.
//!
//! `--lorafa-projected` selects PEFT's `create_lorafa_optimizer` instead of plain AdamW on B:
//! `dB ← (1/s²) · dB · (A Aᵀ + 1e-8 I)⁻¹` (A is frozen, so the r × r inverse is computed once on
//! the host) followed by transformers' AdamW (betas 0.9/0.999, eps 1e-6, weight decay after the
//! update).
//!
//! [`Adapter::needs_input`]: super::Adapter::needs_input

use super::lora::Lora;
use super::{AdapterConfig, Result, Site};
use crate::gpu::Context;

/// A LoRA adapter whose A is frozen.
pub fn new(ctx: &Context, cfg: &AdapterConfig, sites: Vec<Site>, n: usize) -> Result<Lora> {
    Lora::new(ctx, cfg, sites, n, false)
}
