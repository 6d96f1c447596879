//! The only module where `wgpu` types appear.
//!
//! wgpu changes its API with nearly every release; keeping it behind this thin layer means one
//! place absorbs each upgrade. Everything above (ops, models, adapters, the CLI) speaks in
//! [`Context`], [`Tensor`], [`KernelSpec`] and [`Step`].
//!
//! A few GPU ideas the rest of the crate relies on:
//! - A *compute pipeline* is a compiled WGSL entry point plus the layout of the buffers it binds.
//!   Compiling is slow, so pipelines are cached by (file, entry point, template flags, override
//!   constants, binding kinds).
//! - A *bind group* ties concrete buffer regions to a pipeline's bindings. Creating one is cheap
//!   but not free, so a [`Step`] creates them once when it is recorded and reuses them on replay.
//! - Work reaches the GPU in *submissions*. Each costs a round trip through the driver, so a
//!   [`Step`] encodes all its dispatches into one command encoder and one submission.

mod context;
mod kernel;
pub mod layout;
mod options;
pub mod plan;
mod step;
mod tensor;
#[cfg(not(target_arch = "wasm32"))]
mod tuned;

pub use context::{AllocKind, Context, DeviceInfo, Features, Limits, Phases, SubmitStats};

/// Seconds since an arbitrary origin, for the phase timings (the browser has no `Instant`).
pub(crate) fn now_seconds() -> f64 {
    #[cfg(not(target_arch = "wasm32"))]
    {
        static ORIGIN: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
        ORIGIN.get_or_init(std::time::Instant::now).elapsed().as_secs_f64()
    }
    #[cfg(all(target_arch = "wasm32", feature = "web"))]
    {
        js_sys::Date::now() / 1000.0
    }
    #[cfg(all(target_arch = "wasm32", not(feature = "web")))]
    {
        0.0
    }
}
pub use kernel::{preprocess, Arg, KernelSource, KernelSpec, ALL_SOURCES};
pub use options::{ContextOptions, CoopMode};

/// The WGSL files, one per kernel family.
pub mod kernel_sources {
    pub use super::kernel::{
        ACT, ADAPTER, ATTENTION, ATTENTION_VEC4, DORA, ELEMENTWISE, EMBED, HALF, HEADS, MATMUL, MATMUL_COOP,
        MATMUL_SUBGROUP, NORM, OPTIM, REDUCE, ROPE, SOFTMAX, XENT,
    };
}
pub use step::Step;
pub use tensor::{DType, Readback, Tensor};

/// Errors of the GPU layer. Messages carry the values involved and, where one exists, what the
/// user can do about it.
#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    #[error("no GPU adapter found{backends}. {hint}")]
    NoAdapter {
        backends: String,
        hint: &'static str,
        #[source]
        source: wgpu::RequestAdapterError,
    },
    #[error("{name}={value:?}: use {expected}")]
    BadEnv { name: &'static str, value: String, expected: &'static str },
    #[error("WGPU_ADAPTER_NAME={wanted:?} matches no adapter; available: {available}")]
    AdapterNameNotFound { wanted: String, available: String },
    #[error("could not open a device on adapter {adapter:?}")]
    RequestDevice {
        adapter: String,
        #[source]
        source: wgpu::RequestDeviceError,
    },
    #[error("GPU validation error in {context}: {message}")]
    Validation { context: String, message: String },
    #[error("GPU out of memory in {context}: {message}. Try a smaller batch or sequence length.")]
    OutOfMemory { context: String, message: String },
    #[error(
        "the GPU device was lost ({message}): a driver reset, a removed GPU or an exhausted device; \
         run again (a fine-tuning run continues from its last checkpoint with --resume)"
    )]
    DeviceLost { message: String },
    /// Waiting for the device failed (natively): reported as the device lost.
    #[error(
        "the GPU device was lost ({source}): a driver reset, a removed GPU or an exhausted device; \
         run again (a fine-tuning run continues from its last checkpoint with --resume)"
    )]
    Poll {
        #[source]
        source: wgpu::PollError,
    },
    /// A kernel's template, or its compilation (`source`: what the device reported; `message`
    /// says it too).
    #[error("kernel {file}: {message}")]
    Kernel {
        file: &'static str,
        message: String,
        #[source]
        source: Option<Box<GpuError>>,
    },
    #[error(
        "tensor {label:?} of {bytes} bytes exceeds this device's {limit}-byte {what} limit; \
         use a smaller batch or sequence length"
    )]
    TooLarge { label: String, bytes: u64, limit: u64, what: &'static str },
    #[error("{op}: {message}")]
    Shape { op: &'static str, message: String },
    #[error(
        "dispatch {label}: {groups:?} workgroups exceeds the device limit of {limit} per dimension; use a smaller \
         batch or sequence length"
    )]
    DispatchTooLarge { label: String, groups: [u32; 3], limit: u32 },
    #[error("reading back tensor {label:?} failed: {message}")]
    Readback { label: String, message: String },
    #[error("reading back tensor {label:?} failed: {source}")]
    Map {
        label: String,
        #[source]
        source: wgpu::BufferAsyncError,
    },
    #[error("reading back tensor {label:?} failed: {source}")]
    MapRange {
        label: String,
        #[source]
        source: wgpu::MapRangeError,
    },
    #[error("{feature} is not available on adapter {adapter:?}")]
    MissingFeature { feature: &'static str, adapter: String },
    #[error("encoding uniforms for {kernel}")]
    Uniform {
        kernel: String,
        #[source]
        source: encase::internal::Error,
    },
}

pub type Result<T, E = GpuError> = std::result::Result<T, E>;

/// Runs a future to completion on this thread (native). The futures of this crate are GPU
/// readbacks, whose poll waits for the device natively, so this never spins; it lets one async
/// code path (needed by browsers) serve native callers too.
#[cfg(not(target_arch = "wasm32"))]
pub fn block_on<F: std::future::Future>(f: F) -> F::Output {
    let mut f = std::pin::pin!(f);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    loop {
        if let std::task::Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return v;
        }
        std::thread::yield_now();
    }
}
