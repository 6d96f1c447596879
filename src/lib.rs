//! portalora: fine-tune language models with LoRA-family adapters on any GPU through WebGPU.
//!
//! WGSL compute shaders (in `shaders/`) do the math; this crate records and dispatches them
//! through `wgpu` on Vulkan, Metal, DX12 or, compiled to wasm, a browser's WebGPU.
//!
//! Layers, from the bottom:
//! - [`gpu`]: the only module that touches `wgpu`: device context, kernel registry, tensors,
//!   step recording and replay.
//! - [`ops`]: one file per kernel family (matmul, norms, attention, adapters, optimizers, …),
//!   each recording dispatches into a [`gpu::Step`].
//! - [`io`] and [`model`]: GGUF and safetensors, tokenizers, model configs, the model on the GPU
//!   (forward, loss, backward, generation) and Hugging Face export.
//! - [`adapter`]: the six methods behind one trait, and PEFT's files.
//! - [`train`]: the optimizer and the recorded training step; [`data`]: packing text into rows;
//!   [`run`]: a run's state without files (rows, order, step, evaluations) and the one set of
//!   defaults, shared by the command line and the browser; [`finetune`]: a whole run with its
//!   files (data, loop, evaluation, checkpoints, resume, log, plot, samples) — what `portalora
//!   train` and `examples/finetune.rs` use.
//! - [`mod@reference`]: f64 CPU twins of every op, for tests; [`rng`]: the one random generator
//!   (adapter initialisation, data order, sampling).
//!
//! The whole of an embedding app's fine-tuning, natively (README.md shows the same program; an
//! app's `Cargo.toml` takes `default-features = false, features = ["native"]` and `pollster`):
//!
//! ```no_run
//! # #[cfg(all(feature = "native", not(target_arch = "wasm32")))]
//! # mod app {
//! use portalora::adapter::{AdapterConfig, Method};
//! use portalora::finetune::{run, Event, RunConfig};
//!
//! fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     let ctx = pollster::block_on(portalora::gpu::Context::new())?; // the engine: one GPU device
//!     let mut cfg = RunConfig::new("SmolLM2-135M-Instruct.Q4_1.gguf", "my-adapter");
//!     cfg.data = Some("hamlet.txt".into());
//!     cfg.adapter = AdapterConfig { rank: 8, alpha: 16.0, targets: vec!["q_proj".into(), "v_proj".into()], ..AdapterConfig::new(Method::Lora) };
//!     cfg.train.lr = 1e-3;
//!     cfg.steps = Some(50); // any cfg.train.schedule runs over these 50 steps
//!     let summary = run(&ctx, &cfg, false, &mut |e: &Event| {
//!         if let Event::Step { stats, .. } = e { println!("step {} loss {:.3}", stats.step, stats.loss) }
//!     })?;
//!     println!("validation loss {:?} → {:?}; adapter in {}", summary.val_before, summary.val_after, summary.adapter_dir.display());
//!     Ok(())
//! }
//! # }
//! # fn main() {}
//! ```
//!
//! And the engine's lowest level, one matmul:
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
pub mod data;
#[cfg(all(feature = "native", not(target_arch = "wasm32")))]
pub mod finetune;
pub mod fuzz;
pub mod gpu;
pub mod io;
pub mod model;
pub mod ops;
#[cfg(all(feature = "native", not(target_arch = "wasm32")))]
pub mod outdir;
pub mod plot;
pub mod reference;
pub mod rng;
pub mod run;
pub mod train;

#[cfg(all(feature = "native", not(target_arch = "wasm32")))]
pub mod bench;
#[cfg(all(feature = "web", target_arch = "wasm32"))]
pub mod web;
