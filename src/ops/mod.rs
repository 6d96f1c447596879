//! GPU operations: one file per kernel family, each recording dispatches into a [`Step`].
//!
//! Every op checks shapes before it records anything and names the tensors in its errors. Ops
//! never synchronise with the GPU: they only record; [`Context::run`] submits.
//!
//! [`Step`]: crate::gpu::Step
//! [`Context::run`]: crate::gpu::Context::run

pub mod act;
pub mod adapter;
pub mod attention;
pub mod dora;
pub mod elementwise;
pub mod embed;
pub mod half;
pub mod heads;
pub mod matmul;
pub mod norm;
pub mod optim;
pub mod quant;
mod quant_bytes;
pub mod reduce;
pub mod rope;
pub mod softmax;
pub mod xent;

use crate::gpu::{GpuError, Result, Tensor};

/// Lays out a uniform struct with WGSL's alignment rules.
pub(crate) fn uniform<T: encase::ShaderType + encase::internal::WriteInto>(kernel: &str, value: &T) -> Result<Vec<u8>> {
    let mut buf = encase::UniformBuffer::new(Vec::new());
    buf.write(value).map_err(|source| GpuError::Uniform { kernel: kernel.to_string(), source })?;
    Ok(buf.into_inner())
}

/// A 2-D grid of workgroups covering `count` workgroups, each dimension within `limit`.
/// Kernels recover the linear index as `y * gx + x` and skip indices past the end.
pub(crate) fn grid_2d(count: u64, limit: u32) -> [u32; 3] {
    if count == 0 {
        return [0, 1, 1];
    }
    let gx = count.min(limit as u64);
    let gy = count.div_ceil(gx);
    [gx as u32, gy.min(u32::MAX as u64) as u32, 1]
}

/// The grid for `n` invocations in workgroups of `wg`.
pub(crate) fn grid_for(ctx: &crate::gpu::Context, n: usize, wg: usize) -> [u32; 3] {
    grid_2d(n.div_ceil(wg) as u64, ctx.limits().max_workgroups_per_dimension)
}

/// Checks a tensor's element count, naming it and the expected shape in the error.
pub(crate) fn check_numel(op: &'static str, t: &Tensor, want: usize, what: &str) -> Result<()> {
    if t.numel() != want {
        return Err(shape_err(
            op,
            format!(
                "tensor {:?} has shape {:?} ({} elements); expected {what} = {want} elements",
                t.label(),
                t.shape(),
                t.numel()
            ),
        ));
    }
    Ok(())
}

pub(crate) fn shape_err(op: &'static str, message: String) -> GpuError {
    GpuError::Shape { op, message }
}

pub(crate) fn check_f32(op: &'static str, t: &Tensor) -> Result<()> {
    if t.dtype() != crate::gpu::DType::F32 {
        return Err(shape_err(op, format!("tensor {:?} is {:?}; this op takes f32", t.label(), t.dtype())));
    }
    if t.numel() == 0 {
        return Err(shape_err(op, format!("tensor {:?} of shape {:?} is empty", t.label(), t.shape())));
    }
    if !t.is_contiguous() {
        return Err(shape_err(
            op,
            format!("tensor {:?} is a strided column view; this op needs contiguous rows", t.label()),
        ));
    }
    Ok(())
}
