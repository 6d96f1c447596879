//! Adapter and device selection, the features and limits this crate uses, and error capture.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::kernel::PipelineCache;
use super::options::{ContextOptions, CoopMode};
use super::{GpuError, Result};

/// What the user can do when no adapter is found. Kept in one place so the CLI, the tests and
/// docs/TROUBLESHOOTING.md say the same thing.
const NO_ADAPTER_HINT: &str = "Install a GPU driver with Vulkan, Metal or DX12 support. On Linux \
without a GPU, Mesa's CPU Vulkan driver works: `sudo apt-get install mesa-vulkan-drivers \
libvulkan1` (or run `scripts/setup`).";

/// The adapter as a user would describe it.
#[derive(Clone, Debug)]
pub struct DeviceInfo {
    pub name: String,
    pub backend: String,
    pub device_type: String,
    pub driver: String,
    pub driver_info: String,
    /// Subgroup ("warp", "wavefront", "SIMD lane group") sizes the adapter may use.
    pub subgroup_min_size: u32,
    pub subgroup_max_size: u32,
    /// The cooperative-matrix (tensor core, simdgroup matrix) shapes the adapter offers through
    /// wgpu, as `MxNxK A/B→C` (e.g. `16x16x16 f16→f32`); empty where it offers none or wgpu
    /// does not expose them. The matmul uses a square f16→f32 one ([`Features::coop_size`]).
    pub cooperative_matrices: Vec<String>,
}

/// The optional features this crate uses, as the device was opened with them.
#[derive(Clone, Copy, Debug, Default)]
pub struct Features {
    /// Subgroup operations (`subgroupBroadcast`, ...): lanes of one SIMD group exchange registers.
    pub subgroups: bool,
    /// 16-bit floats in shaders.
    pub shader_f16: bool,
    /// GPU timestamps, for per-kernel timing.
    pub timestamps: bool,
    /// wgpu's experimental cooperative matrices, as the device was opened (see [`CoopMode`]).
    pub cooperative_matrix: bool,
    /// The side (8 or 16) of the square f16 × f16 → f32 cooperative matrix the matmul uses,
    /// where the device has cooperative matrices and offers one.
    pub coop_size: Option<u32>,
    /// How products may use them.
    pub coop_mode: CoopMode,
}

/// The device limits that shape our kernels and memory plan.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Largest region of a buffer one storage binding may cover (lavapipe: 128 MiB).
    pub max_storage_binding: u64,
    pub max_buffer: u64,
    pub max_uniform_binding: u64,
    /// Workgroup (shared) memory per workgroup.
    pub max_workgroup_storage: u32,
    pub max_invocations_per_workgroup: u32,
    pub max_workgroup_size_x: u32,
    /// Largest dispatch in each grid dimension (65535 almost everywhere).
    pub max_workgroups_per_dimension: u32,
    pub max_storage_buffers_per_stage: u32,
    /// Bind offsets of storage buffers must be multiples of this (256 almost everywhere).
    pub storage_offset_alignment: u32,
}

/// Errors reported by wgpu outside any operation we could attach them to (it would otherwise
/// panic). On native backends wgpu reports them synchronously inside the call that caused them,
/// so [`Context::check`] right after that call attributes them precisely.
/// Errors are stored as text: `wgpu::Error` is not `Send` on the web.
type ErrorSink = Arc<Mutex<Vec<RawError>>>;

struct RawError {
    out_of_memory: bool,
    message: String,
}

/// One adapter, one device, one queue and the pipelines compiled for it.
pub struct Context {
    pub(super) device: wgpu::Device,
    pub(super) queue: wgpu::Queue,
    info: DeviceInfo,
    features: Features,
    limits: Limits,
    errors: ErrorSink,
    pub(super) pipelines: Mutex<PipelineCache>,
    /// Bytes of the tensors alive, by the kind that was current when each was allocated (see
    /// [`Context::alloc_kind`]); each buffer takes its bytes off again when dropped.
    alloc: Arc<Mutex<AllocStats>>,
    /// Set by wgpu's device-lost callback (driver reset, GPU removed, `destroy`).
    lost: Arc<Mutex<Option<String>>>,
    /// What the device was opened with, and the kernels' tuning settings.
    options: ContextOptions,
    /// What the recorded steps submitted so far encoded (benchmarks read the difference).
    pub(super) submitted: Mutex<SubmitStats>,
    /// Wall seconds spent so far in the named phases of building a model (see [`Context::timed`]).
    phases: Mutex<Phases>,
}

/// Per phase (`"compile"`, `"upload"`, `"plan"`): how many times it ran and its wall seconds.
pub type Phases = std::collections::BTreeMap<&'static str, (u64, f64)>;

/// Counts of what [`Context::run_steps`] and its kin encoded (each pass is one submission).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SubmitStats {
    pub passes: u64,
    pub dispatches: u64,
}

impl std::ops::Sub for SubmitStats {
    type Output = SubmitStats;
    fn sub(self, o: SubmitStats) -> SubmitStats {
        SubmitStats { passes: self.passes - o.passes, dispatches: self.dispatches - o.dispatches }
    }
}

#[derive(Default)]
struct AllocStats {
    kind: &'static str,
    bytes: std::collections::BTreeMap<&'static str, u64>,
}

/// A buffer's bytes in its context's count, taken off when the buffer is dropped.
pub(super) struct AllocTicket {
    stats: Arc<Mutex<AllocStats>>,
    kind: &'static str,
    bytes: u64,
}

impl Drop for AllocTicket {
    fn drop(&mut self) {
        let mut a = self.stats.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(b) = a.bytes.get_mut(self.kind) {
            *b = b.saturating_sub(self.bytes);
        }
    }
}

/// Restores the previous allocation kind when dropped (see [`Context::alloc_kind`]).
pub struct AllocKind<'a> {
    ctx: &'a Context,
    previous: &'static str,
}

impl Drop for AllocKind<'_> {
    fn drop(&mut self) {
        self.ctx.alloc.lock().unwrap_or_else(|p| p.into_inner()).kind = self.previous;
    }
}

fn backend_label(backends: &Option<String>) -> String {
    match backends {
        Some(b) => format!(" for WGPU_BACKEND={b}"),
        None => String::new(),
    }
}

impl Context {
    /// Runs `f` as part of `phase`, adding its wall time to the phase's (what `bench step`'s
    /// start-up breakdown reads: kernels compiled, weights uploaded, steps planned and recorded).
    /// Kernels compiled inside another phase count as `"compile"` only, so phases add up.
    pub fn timed<T>(&self, phase: &'static str, f: impl FnOnce() -> T) -> T {
        let compiling = || self.phases().get("compile").map_or(0.0, |c| c.1);
        let (t0, c0) = (super::now_seconds(), compiling());
        let out = f();
        let mut dt = super::now_seconds() - t0;
        if phase != "compile" {
            dt -= compiling() - c0;
        }
        let mut p = self.phases.lock().unwrap_or_else(|p| p.into_inner());
        let e = p.entry(phase).or_default();
        (e.0, e.1) = (e.0 + 1, e.1 + dt.max(0.0));
        out
    }

    /// The phases timed so far (see [`Context::timed`]).
    pub fn phases(&self) -> Phases {
        self.phases.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Opens the best adapter as the environment says ([`ContextOptions::from_env`]).
    pub async fn new() -> Result<Self> {
        Self::with_options(ContextOptions::from_env()?).await
    }

    pub async fn with_options(opts: ContextOptions) -> Result<Self> {
        let mut desc = wgpu::InstanceDescriptor::new_without_display_handle();
        if let Some(b) = &opts.backends {
            desc.backends = wgpu::Backends::from_comma_list(b);
        }
        let instance = wgpu::Instance::new(desc);
        let adapter = Self::pick_adapter(&instance, &opts).await?;
        let ainfo = adapter.get_info();

        let (wanted, coop) = wanted_features(adapter.features(), &opts);
        // Ask for everything the adapter really has: the defaults are far below what real GPUs
        // (and lavapipe) offer, e.g. 128 MiB storage bindings instead of WebGPU's default.
        let required_limits = adapter.limits();
        let (device, queue) = adapter
            .request_device(&wgpu::DeviceDescriptor {
                label: Some("portalora"),
                required_features: wanted,
                required_limits: required_limits.clone(),
                // SAFETY: wgpu's experimental features may have bugs; they are asked for only
                // where the adapter offers cooperative matrices, and `PORTALORA_COOP=off` keeps
                // them out. Products use them only after the autotune checked their results.
                experimental_features: if coop {
                    unsafe { wgpu::ExperimentalFeatures::enabled() }
                } else {
                    wgpu::ExperimentalFeatures::disabled()
                },
                memory_hints: wgpu::MemoryHints::Performance,
                trace: wgpu::Trace::Off,
            })
            .await
            .map_err(|source| GpuError::RequestDevice { adapter: ainfo.name.clone(), source })?;

        let (errors, lost) = error_hooks(&device);
        let limits = limits_of(&required_limits);
        let features = Features {
            subgroups: wanted.contains(wgpu::Features::SUBGROUP) && !opts.disable_subgroups,
            shader_f16: wanted.contains(wgpu::Features::SHADER_F16),
            timestamps: wanted.contains(wgpu::Features::TIMESTAMP_QUERY),
            cooperative_matrix: coop,
            coop_size: if coop && wanted.contains(wgpu::Features::SHADER_F16) { coop_size(&adapter) } else { None },
            coop_mode: opts.coop,
        };
        let info = DeviceInfo {
            name: ainfo.name.clone(),
            backend: format!("{:?}", ainfo.backend),
            device_type: format!("{:?}", ainfo.device_type),
            driver: ainfo.driver.clone(),
            driver_info: ainfo.driver_info.clone(),
            subgroup_min_size: ainfo.subgroup_min_size,
            subgroup_max_size: ainfo.subgroup_max_size,
            cooperative_matrices: cooperative_matrices(&adapter),
        };
        Ok(Context {
            device,
            queue,
            info,
            features,
            limits,
            errors,
            pipelines: Mutex::new(HashMap::new()),
            alloc: Arc::new(Mutex::new(AllocStats { kind: "other", bytes: Default::default() })),
            submitted: Mutex::default(),
            lost,
            options: opts,
            phases: Mutex::default(),
        })
    }

    async fn pick_adapter(instance: &wgpu::Instance, opts: &ContextOptions) -> Result<wgpu::Adapter> {
        let backends = match &opts.backends {
            Some(b) => wgpu::Backends::from_comma_list(b),
            None => wgpu::Backends::all(),
        };
        if let Some(wanted) = &opts.adapter_name {
            // wgpu's own helper panics when nothing matches; we list what there is instead.
            let adapters = instance.enumerate_adapters(backends).await;
            let needle = wanted.to_lowercase();
            let mut names = Vec::new();
            for a in adapters {
                let info = a.get_info();
                if info.name.to_lowercase().contains(&needle) {
                    return Ok(a);
                }
                names.push(format!("{:?} ({:?})", info.name, info.backend));
            }
            return Err(GpuError::AdapterNameNotFound {
                wanted: wanted.clone(),
                available: if names.is_empty() { "none".into() } else { names.join(", ") },
            });
        }
        instance
            .request_adapter(&wgpu::RequestAdapterOptions {
                power_preference: wgpu::PowerPreference::HighPerformance,
                force_fallback_adapter: false,
                compatible_surface: None,
                // Bucketing hides the adapter's real limits to resist fingerprinting; a
                // training engine needs the real ones.
                apply_limit_buckets: false,
            })
            .await
            .map_err(|source| GpuError::NoAdapter {
                backends: backend_label(&opts.backends),
                hint: NO_ADAPTER_HINT,
                source,
            })
    }

    pub fn info(&self) -> &DeviceInfo {
        &self.info
    }
    pub fn features(&self) -> Features {
        self.features
    }
    pub fn limits(&self) -> Limits {
        self.limits
    }
    /// The options the context was opened with (the kernels' tuning settings among them).
    pub fn options(&self) -> &ContextOptions {
        &self.options
    }

    /// The subgroup size the subgroup kernels are generated for: the smallest the adapter may
    /// use, so that a workgroup of this many invocations always fits in one subgroup.
    pub fn subgroup_size(&self) -> Option<u32> {
        self.features.subgroups.then_some(self.info.subgroup_min_size.max(1))
    }

    /// Until the returned guard is dropped, tensors allocated are counted under `kind`
    /// ("weights", "adapters", "optimizer", "activations"; "other" otherwise). Benchmarks report
    /// the sums ([`Context::allocated_bytes`]).
    pub fn alloc_kind(&self, kind: &'static str) -> AllocKind<'_> {
        let mut a = self.alloc.lock().unwrap_or_else(|p| p.into_inner());
        let previous = std::mem::replace(&mut a.kind, kind);
        AllocKind { ctx: self, previous }
    }

    pub(super) fn count_alloc(&self, bytes: u64) -> AllocTicket {
        let mut a = self.alloc.lock().unwrap_or_else(|p| p.into_inner());
        let kind = a.kind;
        *a.bytes.entry(kind).or_default() += bytes;
        AllocTicket { stats: self.alloc.clone(), kind, bytes }
    }

    /// What the recorded steps submitted so far encoded: compute passes (one submission each) and
    /// dispatches.
    pub fn submit_stats(&self) -> SubmitStats {
        *self.submitted.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Bytes of the tensors alive on this device, by kind (a plan made again frees the memory of
    /// the one it replaces).
    pub fn allocated_bytes(&self) -> std::collections::BTreeMap<&'static str, u64> {
        self.alloc.lock().unwrap_or_else(|p| p.into_inner()).bytes.clone()
    }

    /// A value memoised per adapter (autotune results), computed by `f` on first use. Kept for
    /// the process, keyed by the adapter's name and driver, so that every context opened on the
    /// same adapter reuses it, and natively on disk (see `gpu/tuned.rs`), so that later processes
    /// do too. `key` should name a version of what is tuned.
    pub fn tuned(&self, key: &str, f: impl FnOnce() -> u32) -> u32 {
        static ACROSS_CONTEXTS: Mutex<Option<HashMap<String, u32>>> = Mutex::new(None);
        let full = format!("{}|{}|{}|{key}", self.info.name, self.info.driver, self.info.driver_info);
        let cached =
            ACROSS_CONTEXTS.lock().unwrap_or_else(|p| p.into_inner()).as_ref().and_then(|m| m.get(&full).copied());
        if let Some(v) = cached {
            return v;
        }
        #[cfg(not(target_arch = "wasm32"))]
        let file = super::tuned::path();
        #[cfg(not(target_arch = "wasm32"))]
        let on_disk = file.as_deref().and_then(|p| super::tuned::load(p, &full));
        #[cfg(target_arch = "wasm32")]
        let on_disk = None;
        // Computed outside the lock: `f` may run kernels that ask for other tuned values.
        let v = on_disk.unwrap_or_else(|| {
            let v = f();
            #[cfg(not(target_arch = "wasm32"))]
            if let Some(p) = &file {
                super::tuned::store(p, &full, v);
            }
            v
        });
        ACROSS_CONTEXTS.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert_with(HashMap::new).insert(full, v);
        v
    }

    /// Runs `f` inside wgpu error scopes for out-of-memory and validation errors and returns
    /// what they caught as an error naming `context` (out of memory: with the suggestion to use
    /// a smaller batch or sequence). Natively the scopes resolve at once; in browsers they
    /// resolve asynchronously, so there the device's uncaptured-error handler catches the same
    /// errors and [`Context::check`] reports them.
    pub(super) fn scoped<T>(&self, context: &str, f: impl FnOnce() -> T) -> Result<T> {
        #[cfg(not(target_arch = "wasm32"))]
        {
            let oom = self.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
            let validation = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
            let out = f();
            // Inner scope first.
            let v = super::block_on(validation.pop());
            let o = super::block_on(oom.pop());
            if let Some(e) = o.or(v) {
                return Err(self.lost_error(context).unwrap_or_else(|| convert_error(raw_error(e), context)));
            }
            self.check(context)?;
            Ok(out)
        }
        #[cfg(target_arch = "wasm32")]
        {
            let out = f();
            self.check(context)?;
            Ok(out)
        }
    }

    /// Destroys the device, as a driver reset or an unplugged GPU would: every later operation
    /// fails with [`GpuError::DeviceLost`]. For tests of what a run does when its device goes
    /// away, and for apps that want the GPU memory back at once.
    pub fn destroy(&self) {
        self.device.destroy();
    }

    /// The device-lost error, if the device is gone. wgpu reports a loss from its maintenance
    /// pass, so natively this polls once first: the errors a lost device causes (every object
    /// "invalid") then read as what they are.
    fn lost_error(&self, context: &str) -> Option<GpuError> {
        #[cfg(not(target_arch = "wasm32"))]
        let _ = self.device.poll(wgpu::PollType::Poll);
        let lost = self.lost.lock().unwrap_or_else(|p| p.into_inner()).clone();
        lost.map(|message| GpuError::DeviceLost { message: format!("{message} (while {context})") })
    }

    /// Turns any error wgpu reported since the last check into a Rust error naming `context`.
    pub fn check(&self, context: &str) -> Result<()> {
        let first = {
            let mut errs = self.errors.lock().unwrap_or_else(|p| p.into_inner());
            let first = (!errs.is_empty()).then(|| errs.remove(0));
            errs.clear();
            first
        };
        match first {
            None => match self.lost.lock().unwrap_or_else(|p| p.into_inner()).clone() {
                Some(message) => Err(GpuError::DeviceLost { message: format!("{message} (while {context})") }),
                None => Ok(()),
            },
            Some(e) => Err(self.lost_error(context).unwrap_or_else(|| convert_error(e, context))),
        }
    }

    /// Blocks until all submitted work has finished (native); a no-op on the web, where the
    /// browser drives the queue. Reports errors raised meanwhile.
    pub fn wait_idle(&self) -> Result<()> {
        #[cfg(not(target_arch = "wasm32"))]
        self.device.poll(wgpu::PollType::wait_indefinitely()).map_err(|source| GpuError::Poll { source })?;
        self.check("waiting for the GPU")
    }
}

fn raw_error(e: wgpu::Error) -> RawError {
    match e {
        wgpu::Error::OutOfMemory { source } => RawError { out_of_memory: true, message: source.to_string() },
        wgpu::Error::Validation { description, .. } | wgpu::Error::Internal { description, .. } => {
            RawError { out_of_memory: false, message: description }
        }
    }
}

fn convert_error(e: RawError, context: &str) -> GpuError {
    let context = context.to_string();
    if e.out_of_memory {
        GpuError::OutOfMemory { context, message: e.message }
    } else {
        GpuError::Validation { context, message: e.message }
    }
}

/// The optional features to open the device with (what the adapter offers of those this crate
/// uses), and whether cooperative matrices are among them.
fn wanted_features(offered: wgpu::Features, opts: &ContextOptions) -> (wgpu::Features, bool) {
    let mut wanted = wgpu::Features::empty();
    for f in [wgpu::Features::SUBGROUP, wgpu::Features::SHADER_F16, wgpu::Features::TIMESTAMP_QUERY] {
        if offered.contains(f) {
            wanted |= f;
        }
    }
    let coop = opts.coop != CoopMode::Off && offered.contains(wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX);
    if coop {
        wanted |= wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX;
    }
    (wanted, coop)
}

/// Catches wgpu's uncaptured errors (it would otherwise panic) and the device-lost reason.
fn error_hooks(device: &wgpu::Device) -> (ErrorSink, Arc<Mutex<Option<String>>>) {
    let errors: ErrorSink = Arc::new(Mutex::new(Vec::new()));
    let sink = errors.clone();
    device.on_uncaptured_error(Arc::new(move |e| {
        sink.lock().unwrap_or_else(|p| p.into_inner()).push(raw_error(e));
    }));
    let lost: Arc<Mutex<Option<String>>> = Arc::default();
    let lost_sink = lost.clone();
    device.set_device_lost_callback(move |reason, message| {
        *lost_sink.lock().unwrap_or_else(|p| p.into_inner()) = Some(format!("{reason:?}: {message}"));
    });
    (errors, lost)
}

fn limits_of(l: &wgpu::Limits) -> Limits {
    Limits {
        max_storage_binding: l.max_storage_buffer_binding_size,
        max_buffer: l.max_buffer_size,
        max_uniform_binding: l.max_uniform_buffer_binding_size,
        max_workgroup_storage: l.max_compute_workgroup_storage_size,
        max_invocations_per_workgroup: l.max_compute_invocations_per_workgroup,
        max_workgroup_size_x: l.max_compute_workgroup_size_x,
        max_workgroups_per_dimension: l.max_compute_workgroups_per_dimension,
        max_storage_buffers_per_stage: l.max_storage_buffers_per_shader_stage,
        storage_offset_alignment: l.min_storage_buffer_offset_alignment,
    }
}

/// The side of the largest square f16 × f16 → f32 cooperative matrix the adapter offers.
fn coop_size(adapter: &wgpu::Adapter) -> Option<u32> {
    adapter
        .cooperative_matrix_properties()
        .iter()
        .filter(|p| p.m_size == p.n_size && p.n_size == p.k_size && matches!(p.m_size, 8 | 16))
        .filter(|p| p.ab_type == wgpu::CooperativeScalarType::F16 && p.cr_type == wgpu::CooperativeScalarType::F32)
        .map(|p| p.m_size)
        .max()
}

/// The cooperative-matrix configurations an adapter reports (see [`DeviceInfo::cooperative_matrices`]).
fn cooperative_matrices(adapter: &wgpu::Adapter) -> Vec<String> {
    if !adapter.features().contains(wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX) {
        return Vec::new();
    }
    adapter
        .cooperative_matrix_properties()
        .iter()
        .map(|p| format!("{}x{}x{} {:?}→{:?}", p.m_size, p.n_size, p.k_size, p.ab_type, p.cr_type).to_lowercase())
        .collect()
}
