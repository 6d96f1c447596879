//! Recording dispatches once and replaying them in one submission.
//!
//! wgpu command buffers cannot be submitted twice, so "replay" means: everything expensive
//! (pipelines, bind groups, uniform buffers) is created once when a [`Step`] is recorded, and
//! each [`Context::run`] only re-encodes the list of dispatches into one command encoder, which is
//! a few microseconds per dispatch, and submits it once. A training step is one `Step`.

use std::sync::Arc;

use super::context::Context;
use super::kernel::{Arg, CachedPipeline, KernelSpec};
use super::tensor::{GpuMemory, Tensor};
use super::{GpuError, Result};

struct Dispatch {
    label: String,
    /// What it binds: the source of memory plans' lifetimes and of their checker.
    accesses: Vec<Access>,
    /// The compiled pipeline and bound buffers (`None` in a trace).
    gpu: Option<(Arc<CachedPipeline>, wgpu::BindGroup)>,
    /// The memory of the tensors it binds, held as long as the dispatch can run: the bind group
    /// alone would keep the buffers, but not their place in the memory count nor their identity
    /// (a dropped tensor's key could come back for a new one, confusing the lifetimes checker).
    _memory: Vec<Arc<GpuMemory>>,
    groups: [u32; 3],
}

/// One tensor a dispatch binds.
#[derive(Clone, Debug)]
pub(super) struct Access {
    /// The buffer ([`Tensor::memory_key`]) and the bytes `start..end` of it.
    pub memory: u64,
    pub start: u64,
    pub end: u64,
    /// The tensor, as the planner knows it ([`Tensor::tenant`]), and its label.
    pub tenant: u64,
    pub label: Arc<str>,
    /// Bound writable (the kernel writes and may read it).
    pub write: bool,
}

/// An ordered list of recorded dispatches. Dispatches run in order; writes of one are visible
/// to the next (wgpu inserts the barriers between dispatches of one compute pass).
#[derive(Default)]
pub struct Step {
    dispatches: Vec<Dispatch>,
    /// A trace records which tensors each dispatch binds and nothing for the GPU: memory plans
    /// derive lifetimes from it before any memory exists ([`super::plan`]).
    trace: bool,
    /// Named positions in the dispatch list (e.g. where the backward pass begins).
    marks: Vec<(&'static str, usize)>,
}

impl Step {
    pub fn new() -> Self {
        Self::default()
    }
    /// A step that only records what each dispatch binds; it accepts tensors without memory
    /// and cannot run.
    pub fn trace() -> Self {
        Step { trace: true, ..Self::default() }
    }
    pub fn is_trace(&self) -> bool {
        self.trace
    }
    /// Names the position after the dispatches recorded so far.
    pub fn mark(&mut self, name: &'static str) {
        self.marks.push((name, self.dispatches.len()));
    }
    /// The position [`Step::mark`] named.
    pub fn marked(&self, name: &str) -> Option<usize> {
        self.marks.iter().find(|(n, _)| *n == name).map(|&(_, i)| i)
    }
    /// Each dispatch's label and bindings, in order.
    pub(super) fn accesses(&self) -> impl Iterator<Item = (&str, &[Access])> {
        self.dispatches.iter().map(|d| (d.label.as_str(), d.accesses.as_slice()))
    }
    pub fn len(&self) -> usize {
        self.dispatches.len()
    }
    pub fn is_empty(&self) -> bool {
        self.dispatches.is_empty()
    }
    /// Labels of the recorded dispatches, in order.
    pub fn labels(&self) -> impl Iterator<Item = &str> {
        self.dispatches.iter().map(|d| d.label.as_str())
    }
}

impl Context {
    /// Records one dispatch of `spec` over a grid of `groups` workgroups into `step`.
    pub fn record(&self, step: &mut Step, spec: &KernelSpec, args: &[Arg], groups: [u32; 3]) -> Result<()> {
        let limit = self.limits().max_workgroups_per_dimension;
        if groups.iter().any(|&g| g > limit) {
            return Err(GpuError::DispatchTooLarge { label: spec.label(), groups, limit });
        }
        let bound: Vec<(&Tensor, bool)> = args
            .iter()
            .filter_map(|a| match a {
                Arg::Read(t) => Some((*t, false)),
                Arg::Write(t) => Some((*t, true)),
                Arg::Uniform(_) => None,
            })
            .collect();
        let memory = bound.iter().filter_map(|(t, _)| t.memory()).collect();
        let accesses = bound
            .into_iter()
            .map(|(t, write)| Access {
                memory: t.memory_key(),
                start: t.byte_offset(),
                end: t.byte_offset() + t.byte_len(),
                tenant: t.tenant(),
                label: t.label().into(),
                write,
            })
            .collect();
        let gpu = if step.trace {
            None
        } else {
            let pipeline = self.pipeline(spec, args)?;
            let bind_group = self.bind_group(spec, &pipeline.layout, args)?;
            Some((pipeline, bind_group))
        };
        step.dispatches.push(Dispatch { label: spec.label(), accesses, gpu, _memory: memory, groups });
        Ok(())
    }

    /// Encodes every dispatch of `step` into one command encoder and submits it once. Returns
    /// without waiting for the GPU.
    pub fn run(&self, step: &Step) -> Result<()> {
        self.run_repeated(step, 1)
    }

    /// Like [`Context::run`], with the whole step encoded `times` times in the same submission
    /// (benchmarks use this to keep the submission overhead out of the figures).
    pub fn run_repeated(&self, step: &Step, times: usize) -> Result<()> {
        self.encode_and_submit(&vec![step; times])
    }

    /// Encodes `steps` one after the other into one command encoder and submits it once (a
    /// training step = forward/backward, optimizer, after-step hooks, with no sync between).
    pub fn run_steps(&self, steps: &[&Step]) -> Result<()> {
        self.encode_and_submit(steps)
    }

    fn encode_and_submit(&self, steps: &[&Step]) -> Result<()> {
        refuse_traces(steps)?;
        let mut enc = self.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("step") });
        let dispatches = self.encode_pass(&mut enc, steps, None);
        self.scoped("submitting a step", || self.queue.submit([enc.finish()]))?;
        let mut s = self.submitted.lock().unwrap_or_else(|p| p.into_inner());
        s.passes += 1;
        s.dispatches += dispatches;
        Ok(())
    }

    /// Encodes every dispatch of `steps` into one compute pass of `enc` (with `timestamps` at its
    /// beginning and end); returns how many dispatches it encoded.
    fn encode_pass(
        &self,
        enc: &mut wgpu::CommandEncoder,
        steps: &[&Step],
        timestamps: Option<wgpu::ComputePassTimestampWrites<'_>>,
    ) -> u64 {
        let mut n = 0;
        let mut pass =
            enc.begin_compute_pass(&wgpu::ComputePassDescriptor { label: Some("step"), timestamp_writes: timestamps });
        for step in steps {
            for d in &step.dispatches {
                let Some((pipeline, bind_group)) = d.gpu.as_ref().filter(|_| !d.groups.contains(&0)) else {
                    continue;
                };
                pass.set_pipeline(&pipeline.pipeline);
                pass.set_bind_group(0, bind_group, &[]);
                pass.dispatch_workgroups(d.groups[0], d.groups[1], d.groups[2]);
                n += 1;
            }
        }
        n
    }
}

/// A trace has nothing to run.
fn refuse_traces(steps: &[&Step]) -> Result<()> {
    match steps.iter().any(|s| s.trace) {
        true => Err(GpuError::Shape { op: "run", message: "a trace step records bindings only and cannot run".into() }),
        false => Ok(()),
    }
}

/// Timestamps per query set; wgpu caps a set at 4096 queries.
#[cfg(not(target_arch = "wasm32"))]
const QUERIES_PER_SET: usize = 4096;

impl Context {
    /// Runs `steps` once with a GPU timestamp before and after every dispatch and returns each
    /// dispatch's label (`file:entry [groups]`) with its GPU seconds. Every dispatch gets its own
    /// compute pass (pass-boundary timestamps need only the basic timestamp feature), all in one
    /// submission per 2048 dispatches, so the figures include no CPU round trips. Falls back to
    /// [`Context::profile`]'s wall-clock timing where the adapter has no timestamps.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn time_dispatches(&self, steps: &[&Step]) -> Result<Vec<(String, f64)>> {
        refuse_traces(steps)?;
        let all: Vec<(&Dispatch, &(Arc<CachedPipeline>, wgpu::BindGroup))> = steps
            .iter()
            .flat_map(|s| s.dispatches.iter())
            .filter(|d| !d.groups.contains(&0))
            .filter_map(|d| Some((d, d.gpu.as_ref()?)))
            .collect();
        if !self.features().timestamps {
            let mut out = Vec::new();
            for s in steps {
                out.extend(self.profile(s)?);
            }
            return Ok(out);
        }
        let period_ns = self.queue.get_timestamp_period() as f64;
        let mut out = Vec::with_capacity(all.len());
        self.wait_idle()?;
        for chunk in all.chunks(QUERIES_PER_SET / 2) {
            let n = (2 * chunk.len()) as u32;
            let set = self.device.create_query_set(&wgpu::QuerySetDescriptor {
                label: Some("timestamps"),
                ty: wgpu::QueryType::Timestamp,
                count: n,
            });
            let bytes = 8 * n as u64;
            let resolve = self.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("timestamps"),
                size: bytes,
                usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
                mapped_at_creation: false,
            });
            let staging = self.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("timestamps readback"),
                size: bytes,
                usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            });
            let mut enc = self.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("timed") });
            for (i, (d, (pipeline, bind_group))) in chunk.iter().enumerate() {
                let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                    label: Some("timed"),
                    timestamp_writes: Some(wgpu::ComputePassTimestampWrites {
                        query_set: &set,
                        beginning_of_pass_write_index: Some(2 * i as u32),
                        end_of_pass_write_index: Some(2 * i as u32 + 1),
                    }),
                });
                pass.set_pipeline(&pipeline.pipeline);
                pass.set_bind_group(0, bind_group, &[]);
                pass.dispatch_workgroups(d.groups[0], d.groups[1], d.groups[2]);
            }
            enc.resolve_query_set(&set, 0..n, &resolve, 0);
            enc.copy_buffer_to_buffer(&resolve, 0, &staging, 0, bytes);
            self.queue.submit([enc.finish()]);
            let ticks = self.read_ticks(&staging)?;
            for (i, (d, _)) in chunk.iter().enumerate() {
                let dt = ticks[2 * i + 1].saturating_sub(ticks[2 * i]) as f64 * period_ns * 1e-9;
                out.push((format!("{} {:?}", d.label, d.groups), dt));
            }
        }
        self.check("timing a step")?;
        Ok(out)
    }

    /// The resolved timestamps in `staging` once the GPU is done.
    #[cfg(not(target_arch = "wasm32"))]
    fn read_ticks(&self, staging: &wgpu::Buffer) -> Result<Vec<u64>> {
        staging.slice(..).map_async(wgpu::MapMode::Read, |_| {});
        self.wait_idle()?;
        let ticks = {
            let view = staging
                .slice(..)
                .get_mapped_range()
                .map_err(|source| GpuError::MapRange { label: "timestamps".into(), source })?;
            bytemuck::pod_collect_to_vec::<u8, u64>(&view)
        };
        staging.unmap();
        Ok(ticks)
    }

    /// GPU seconds of `steps` run as training runs them (one compute pass), from timestamps at
    /// the pass's beginning and end; `None` where the adapter has no timestamps.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn time_whole(&self, steps: &[&Step]) -> Result<Option<f64>> {
        refuse_traces(steps)?;
        if !self.features().timestamps {
            return Ok(None);
        }
        let set = self.device.create_query_set(&wgpu::QuerySetDescriptor {
            label: Some("step timestamps"),
            ty: wgpu::QueryType::Timestamp,
            count: 2,
        });
        let buffer = |usage| {
            self.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("step timestamps"),
                size: 16,
                usage,
                mapped_at_creation: false,
            })
        };
        let resolve = buffer(wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC);
        let staging = buffer(wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST);
        self.wait_idle()?;
        let mut enc = self.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("timed step") });
        let writes = wgpu::ComputePassTimestampWrites {
            query_set: &set,
            beginning_of_pass_write_index: Some(0),
            end_of_pass_write_index: Some(1),
        };
        self.encode_pass(&mut enc, steps, Some(writes));
        enc.resolve_query_set(&set, 0..2, &resolve, 0);
        enc.copy_buffer_to_buffer(&resolve, 0, &staging, 0, 16);
        self.queue.submit([enc.finish()]);
        let ticks = self.read_ticks(&staging)?;
        self.check("timing a whole step")?;
        let period_ns = self.queue.get_timestamp_period() as f64;
        Ok(Some(ticks[1].saturating_sub(ticks[0]) as f64 * period_ns * 1e-9))
    }

    /// Runs every dispatch of `step` in a submission of its own and waits for it: wall seconds
    /// per dispatch, labelled `file:entry`. Slow (a sync per dispatch); for finding hot kernels.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn profile(&self, step: &Step) -> Result<Vec<(String, f64)>> {
        refuse_traces(&[step])?;
        let mut out = Vec::with_capacity(step.dispatches.len());
        self.wait_idle()?;
        for d in &step.dispatches {
            let t0 = std::time::Instant::now();
            let mut enc =
                self.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("profile") });
            {
                let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                    label: Some("profile"),
                    timestamp_writes: None,
                });
                if let Some((pipeline, bind_group)) = d.gpu.as_ref().filter(|_| !d.groups.contains(&0)) {
                    pass.set_pipeline(&pipeline.pipeline);
                    pass.set_bind_group(0, bind_group, &[]);
                    pass.dispatch_workgroups(d.groups[0], d.groups[1], d.groups[2]);
                }
            }
            self.queue.submit([enc.finish()]);
            self.wait_idle()?;
            out.push((format!("{} {:?}", d.label, d.groups), t0.elapsed().as_secs_f64()));
        }
        self.check("profiling a step")?;
        Ok(out)
    }
}
