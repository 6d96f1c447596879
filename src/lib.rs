//! portalora: fine-tune language models with LoRA-family adapters on any GPU through WebGPU.
//!
//! WGSL compute shaders (in `shaders/`) do the math; this crate records and dispatches them
//! through `wgpu` on Vulkan, Metal, DX12 or, compiled to wasm, a browser's WebGPU.
//!
//! Layers, from the bottom:
//! - [`gpu`]: the only module that touches `wgpu`: device context, kernel registry, tensors,
//!   step recording and replay.
//! - [`ops`]: one file per kernel family (matmul, reduce, elementwise), each recording
//!   dispatches into a [`gpu::Step`].
//! - [`reference`]: f64 CPU twins of every op, for tests.
//!
//! ```no_run
//! # #[cfg(not(target_arch = "wasm32"))]
//! # fn main() -> Result<(), portalora::gpu::GpuError> {
//! use portalora::gpu::{Context, Step};
//! use portalora::ops::matmul::{matmul, Matmul};
//! let ctx = pollster::block_on(Context::new())?;
//! let x = ctx.upload_f32("x", &[2, 3], &[1., 2., 3., 4., 5., 6.])?;
//! let w = ctx.upload_f32("w", &[4, 3], &[1.; 12])?; // nn.Linear layout (out, in)
//! let y = ctx.tensor("y", &[2, 4], portalora::gpu::DType::F32)?;
//! let mut step = Step::new();
//! matmul(&ctx, &mut step, &x, &w, &y, Matmul::nt())?; // y = x·Wᵀ
//! ctx.run(&step)?;
//! assert_eq!(ctx.read_f32(&y)?, vec![6., 6., 6., 6., 15., 15., 15., 15.]);
//! # Ok(()) }
//! # #[cfg(target_arch = "wasm32")] fn main() {}
//! ```

// GPU ops take their tensors as separate arguments, named as in the kernels' bindings; packing
// them into structs to satisfy this lint would hide which buffer goes where.
#![allow(clippy::too_many_arguments)]

pub mod adapter;
pub mod gpu;
pub mod io;
pub mod model;
pub mod ops;
pub mod reference;
#[cfg(not(target_arch = "wasm32"))]
pub mod train;

#[cfg(all(feature = "native", not(target_arch = "wasm32")))]
pub mod bench;
