//! The LoRA adapter branch of a linear layer, as products of the matmul kernels
//! (METHODS.md: `y += s · x Aᵀ Bᵀ`, A `(r, in)`, B `(out, r)`).
//!
//! Forward keeps `z = x Aᵀ` `(N, r)` for the backward pass. Backward, with `g = dL/dy`:
//! `dB = s · gᵀ z`, `dz = s · g B`, `dA = dzᵀ x`, `dx += dz A`. With A frozen (LoRA-FA) `dA` is
//! skipped and `x` is not needed at all: only the rank-r `z` is kept, which is LoRA-FA's saving.

use super::matmul::{matmul, Matmul};
use crate::gpu::{Context, Result, Step, Tensor};

/// `z = x Aᵀ`, then `y += s · z Bᵀ` (y already holds the frozen projection).
pub fn lora_forward(
    ctx: &Context,
    step: &mut Step,
    x: &Tensor,
    a: &Tensor,
    b: &Tensor,
    scale: f32,
    z: &Tensor,
    y: &Tensor,
) -> Result<()> {
    matmul(ctx, step, x, a, z, Matmul::nt())?;
    matmul(ctx, step, z, b, y, Matmul::nt().alpha(scale).accumulate(true))?;
    Ok(())
}

/// Gradients of the adapter branch from `dy`: writes `db`, `da` (unless `None`, for a frozen A),
/// uses `dz` `(N, r)` as scratch, and adds the branch's input gradient into `dx`. `x` is only
/// read when `da` is wanted.
pub fn lora_backward(
    ctx: &Context,
    step: &mut Step,
    x: &Tensor,
    a: &Tensor,
    b: &Tensor,
    z: &Tensor,
    dy: &Tensor,
    scale: f32,
    dz: &Tensor,
    da: Option<&Tensor>,
    db: &Tensor,
    dx: &Tensor,
) -> Result<()> {
    matmul(ctx, step, dy, z, db, Matmul::tn().alpha(scale))?;
    matmul(ctx, step, dy, b, dz, Matmul::nn().alpha(scale))?;
    if let Some(da) = da {
        matmul(ctx, step, dz, x, da, Matmul::tn())?;
    }
    matmul(ctx, step, dz, a, dx, Matmul::nn().accumulate(true))?;
    Ok(())
}
