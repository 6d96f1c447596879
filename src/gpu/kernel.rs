//! The WGSL kernel registry: one file per kernel family under `shaders/`, compiled into the
//! binary with `include_str!`, specialised by template flags and override constants, and cached
//! as pipelines with explicit bind group layouts.

use std::collections::HashMap;
use std::num::NonZeroU64;
use std::sync::Arc;

use super::context::Context;
use super::tensor::Tensor;
use super::{GpuError, Result};

/// One WGSL file.
#[derive(Debug)]
pub struct KernelSource {
    /// File name under `shaders/`, used in errors and cache keys.
    pub file: &'static str,
    pub wgsl: &'static str,
    /// Whether the file uses subgroup operations (then it only compiles where they exist).
    pub needs_subgroups: bool,
    /// Whether the file is a template for [`preprocess`] (`{{NAME}}` and `// #if FLAG` lines).
    pub template: bool,
}

macro_rules! source {
    ($name:ident, $file:literal, subgroups: $sg:expr, template: $tpl:expr) => {
        pub const $name: KernelSource = KernelSource {
            file: $file,
            wgsl: include_str!(concat!("../../shaders/", $file)),
            needs_subgroups: $sg,
            template: $tpl,
        };
    };
}

source!(MATMUL, "matmul.wgsl", subgroups: false, template: false);
source!(MATMUL_SUBGROUP, "matmul_subgroup.wgsl", subgroups: true, template: true);
source!(REDUCE, "reduce.wgsl", subgroups: false, template: false);
source!(ELEMENTWISE, "elementwise.wgsl", subgroups: false, template: false);
source!(NORM, "norm.wgsl", subgroups: false, template: false);
source!(ROPE, "rope.wgsl", subgroups: false, template: false);
source!(ATTENTION, "attention.wgsl", subgroups: false, template: false);
source!(ATTENTION_VEC4, "attention_vec4.wgsl", subgroups: false, template: true);
source!(HEADS, "heads.wgsl", subgroups: false, template: false);
source!(SOFTMAX, "softmax.wgsl", subgroups: false, template: false);
source!(ACT, "act.wgsl", subgroups: false, template: false);
source!(EMBED, "embed.wgsl", subgroups: false, template: true);
source!(XENT, "xent.wgsl", subgroups: false, template: false);
source!(OPTIM, "optim.wgsl", subgroups: false, template: true);
source!(ADAPTER, "adapter.wgsl", subgroups: false, template: false);
source!(MATMUL_COOP, "matmul_coop.wgsl", subgroups: false, template: true);
source!(HALF, "half.wgsl", subgroups: false, template: false);
source!(DORA, "dora.wgsl", subgroups: false, template: false);

/// Every WGSL file of the crate (the naga test validates each one).
pub const ALL_SOURCES: &[&KernelSource] = &[
    &MATMUL,
    &MATMUL_SUBGROUP,
    &REDUCE,
    &ELEMENTWISE,
    &NORM,
    &ROPE,
    &ATTENTION,
    &ATTENTION_VEC4,
    &HEADS,
    &SOFTMAX,
    &ACT,
    &EMBED,
    &XENT,
    &OPTIM,
    &ADAPTER,
    &MATMUL_COOP,
    &HALF,
    &DORA,
];

/// Expands a template: a line `// #if FLAG` (or `// #if !FLAG`) keeps the lines up to its
/// `// #else` / `// #endif` only when the flag is set (unset); `{{NAME}}` is replaced by its value.
/// Unknown flags and names left over are errors, so a typo cannot silently change a kernel.
pub fn preprocess(file: &'static str, src: &str, flags: &[(&str, bool)], vars: &[(&str, String)]) -> Result<String> {
    let err = |message: String| GpuError::Kernel { file, message, source: None };
    let mut out = String::with_capacity(src.len() * 2);
    // Stack of (this branch is kept, the enclosing region is kept).
    let mut stack: Vec<(bool, bool)> = Vec::new();
    for (no, line) in src.lines().enumerate() {
        let t = line.trim();
        let active = stack.last().is_none_or(|&(on, outer)| on && outer);
        if let Some(cond) = t.strip_prefix("// #if ") {
            let (neg, name) = match cond.trim().strip_prefix('!') {
                Some(n) => (true, n.trim()),
                None => (false, cond.trim()),
            };
            let value = flags
                .iter()
                .find(|(n, _)| *n == name)
                .map(|&(_, v)| v)
                .ok_or_else(|| err(format!("line {}: unknown template flag {name:?}", no + 1)))?;
            stack.push((value != neg, active));
        } else if t == "// #else" {
            let top = stack.last_mut().ok_or_else(|| err(format!("line {}: #else without #if", no + 1)))?;
            top.0 = !top.0;
        } else if t == "// #endif" {
            stack.pop().ok_or_else(|| err(format!("line {}: #endif without #if", no + 1)))?;
        } else if active {
            out.push_str(line);
            out.push('\n');
        }
    }
    if !stack.is_empty() {
        return Err(err("unterminated // #if".into()));
    }
    for (name, value) in vars {
        out = out.replace(&format!("{{{{{name}}}}}"), value);
    }
    if let Some(pos) = out.find("{{") {
        let rest: String = out[pos..].chars().take(40).collect();
        return Err(err(format!("template variable left unexpanded: {rest}")));
    }
    Ok(out)
}

/// Which kernel to run: a file, an entry point and its specialisation.
#[derive(Clone, Debug)]
pub struct KernelSpec {
    pub source: &'static KernelSource,
    pub entry: &'static str,
    /// Template flags (only for template files).
    pub flags: Vec<(&'static str, bool)>,
    /// Template values (only for template files).
    pub vars: Vec<(&'static str, String)>,
    /// WGSL `override` constants, fixed when the pipeline is created.
    pub constants: Vec<(&'static str, f64)>,
}

impl KernelSpec {
    pub fn new(source: &'static KernelSource, entry: &'static str) -> Self {
        KernelSpec { source, entry, flags: Vec::new(), vars: Vec::new(), constants: Vec::new() }
    }
    /// Sets a template flag (again: the last setting counts).
    pub fn flag(mut self, name: &'static str, on: bool) -> Self {
        match self.flags.iter_mut().find(|(n, _)| *n == name) {
            Some(f) => f.1 = on,
            None => self.flags.push((name, on)),
        }
        self
    }
    pub fn var(mut self, name: &'static str, value: impl ToString) -> Self {
        self.vars.push((name, value.to_string()));
        self
    }
    pub fn constant(mut self, name: &'static str, value: f64) -> Self {
        self.constants.push((name, value));
        self
    }
    /// The WGSL text this spec compiles.
    pub fn wgsl(&self) -> Result<String> {
        if self.source.template {
            preprocess(self.source.file, self.source.wgsl, &self.flags, &self.vars)
        } else {
            Ok(self.source.wgsl.to_string())
        }
    }
    pub fn label(&self) -> String {
        format!("{}:{}", self.source.file, self.entry)
    }
}

/// One binding of a dispatch, in binding order (`@binding(0)`, `@binding(1)`, ...).
pub enum Arg<'a> {
    /// A small uniform struct, already laid out (see the `encase` crate).
    Uniform(Vec<u8>),
    /// A tensor the kernel only reads.
    Read(&'a Tensor),
    /// A tensor the kernel writes (and may read).
    Write(&'a Tensor),
}

impl Arg<'_> {
    fn kind(&self) -> u8 {
        match self {
            Arg::Uniform(_) => 0,
            Arg::Read(_) => 1,
            Arg::Write(_) => 2,
        }
    }
}

#[derive(Clone, PartialEq, Eq, Hash)]
pub(super) struct PipelineKey {
    file: &'static str,
    entry: &'static str,
    flags: Vec<(&'static str, bool)>,
    vars: Vec<(&'static str, String)>,
    constants: Vec<(&'static str, u64)>,
    bindings: Vec<u8>,
}

pub(super) struct CachedPipeline {
    pub pipeline: wgpu::ComputePipeline,
    pub layout: wgpu::BindGroupLayout,
}

pub(super) type PipelineCache = HashMap<PipelineKey, Arc<CachedPipeline>>;

/// An error compiling `file`'s kernel as [`GpuError::Kernel`]; a lost device or exhausted memory
/// stays what it is.
fn kernel_err(file: &'static str) -> impl FnOnce(GpuError) -> GpuError {
    move |e| match e {
        GpuError::DeviceLost { .. } | GpuError::Poll { .. } | GpuError::OutOfMemory { .. } => e,
        e => GpuError::Kernel { file, message: e.to_string(), source: Some(Box::new(e)) },
    }
}

impl Context {
    /// Returns the cached pipeline for `spec` with these binding kinds, compiling it on first use.
    pub(super) fn pipeline(&self, spec: &KernelSpec, args: &[Arg]) -> Result<Arc<CachedPipeline>> {
        let key = PipelineKey {
            file: spec.source.file,
            entry: spec.entry,
            flags: spec.flags.clone(),
            vars: spec.vars.clone(),
            constants: spec.constants.iter().map(|&(n, v)| (n, v.to_bits())).collect(),
            bindings: args.iter().map(Arg::kind).collect(),
        };
        if let Some(p) = self.pipelines.lock().unwrap_or_else(|p| p.into_inner()).get(&key) {
            return Ok(p.clone());
        }
        if spec.source.needs_subgroups && !self.features().subgroups {
            return Err(GpuError::MissingFeature { feature: "subgroup operations", adapter: self.info().name.clone() });
        }
        let cached = self.timed("compile", || self.compile(spec, args))?;
        self.pipelines.lock().unwrap_or_else(|p| p.into_inner()).insert(key, cached.clone());
        Ok(cached)
    }

    /// Compiles `spec`'s kernel for these binding kinds (the driver's shader compiler runs here).
    fn compile(&self, spec: &KernelSpec, args: &[Arg]) -> Result<Arc<CachedPipeline>> {
        let label = spec.label();
        let wgsl = spec.wgsl()?;
        self.check("before compiling a kernel")?;
        let module = self.device.create_shader_module(wgpu::ShaderModuleDescriptor {
            label: Some(&label),
            source: wgpu::ShaderSource::Wgsl(wgsl.into()),
        });
        self.check(&format!("compiling {}", spec.source.file)).map_err(kernel_err(spec.source.file))?;

        let entries: Vec<wgpu::BindGroupLayoutEntry> = args
            .iter()
            .enumerate()
            .map(|(i, a)| wgpu::BindGroupLayoutEntry {
                binding: i as u32,
                visibility: wgpu::ShaderStages::COMPUTE,
                ty: wgpu::BindingType::Buffer {
                    ty: match a {
                        Arg::Uniform(_) => wgpu::BufferBindingType::Uniform,
                        Arg::Read(_) => wgpu::BufferBindingType::Storage { read_only: true },
                        Arg::Write(_) => wgpu::BufferBindingType::Storage { read_only: false },
                    },
                    has_dynamic_offset: false,
                    min_binding_size: None,
                },
                count: None,
            })
            .collect();
        let layout = self
            .device
            .create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor { label: Some(&label), entries: &entries });
        let pipeline_layout = self.device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
            label: Some(&label),
            bind_group_layouts: &[Some(&layout)],
            immediate_size: 0,
        });
        let pipeline = self.device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some(&label),
            layout: Some(&pipeline_layout),
            module: &module,
            entry_point: Some(spec.entry),
            compilation_options: wgpu::PipelineCompilationOptions {
                constants: &spec.constants,
                // Our kernels initialise the workgroup memory they read; skipping the implicit
                // zeroing saves a pass over it per workgroup.
                zero_initialize_workgroup_memory: false,
            },
            cache: None,
        });
        self.check(&format!("creating pipeline {label}")).map_err(kernel_err(spec.source.file))?;
        Ok(Arc::new(CachedPipeline { pipeline, layout }))
    }

    /// Creates the bind group for one dispatch. Uniform args get a small buffer of their own.
    pub(super) fn bind_group(
        &self,
        spec: &KernelSpec,
        layout: &wgpu::BindGroupLayout,
        args: &[Arg],
    ) -> Result<wgpu::BindGroup> {
        use wgpu::util::DeviceExt;
        let label = spec.label();
        let uniforms: Vec<Option<wgpu::Buffer>> = args
            .iter()
            .map(|a| match a {
                Arg::Uniform(bytes) => Some(self.device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
                    label: Some(&label),
                    contents: bytes,
                    usage: wgpu::BufferUsages::UNIFORM,
                })),
                _ => None,
            })
            .collect();
        let mut entries = Vec::with_capacity(args.len());
        for (i, a) in args.iter().enumerate() {
            let resource = match a {
                Arg::Uniform(_) => uniforms[i].as_ref().expect("uniform buffer created above").as_entire_binding(),
                Arg::Read(t) | Arg::Write(t) => {
                    let bytes = t.byte_len();
                    if bytes > self.limits().max_storage_binding {
                        return Err(GpuError::TooLarge {
                            label: t.label().to_string(),
                            bytes,
                            limit: self.limits().max_storage_binding,
                            what: "storage binding",
                        });
                    }
                    wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                        buffer: t.buffer()?,
                        offset: t.byte_offset(),
                        size: NonZeroU64::new(bytes.max(4)),
                    })
                }
            };
            entries.push(wgpu::BindGroupEntry { binding: i as u32, resource });
        }
        let bg = self.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some(&label),
            layout,
            entries: &entries,
        });
        self.check(&format!("binding {label}"))?;
        Ok(bg)
    }
}
