//! Recording dispatches once and replaying them in one submission.
//!
//! wgpu command buffers cannot be submitted twice, so "replay" means: everything expensive
//! (pipelines, bind groups, uniform buffers) is created once when a [`Step`] is recorded, and
//! each [`Context::run`] only re-encodes the list of dispatches into one command encoder, which is
//! a few microseconds per dispatch, and submits it once. A training step is one `Step`.

use std::sync::Arc;

use super::context::Context;
use super::kernel::{Arg, CachedPipeline, KernelSpec};
use super::{GpuError, Result};

struct Dispatch {
    label: String,
    pipeline: Arc<CachedPipeline>,
    bind_group: wgpu::BindGroup,
    groups: [u32; 3],
}

/// An ordered list of recorded dispatches. Dispatches run in order; writes of one are visible
/// to the next (wgpu inserts the barriers between dispatches of one compute pass).
#[derive(Default)]
pub struct Step {
    dispatches: Vec<Dispatch>,
}

impl Step {
    pub fn new() -> Self {
        Self::default()
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
        let pipeline = self.pipeline(spec, args)?;
        let bind_group = self.bind_group(spec, &pipeline.layout, args)?;
        step.dispatches.push(Dispatch { label: spec.label(), pipeline, bind_group, groups });
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
        let mut enc = self.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("step") });
        {
            let mut pass =
                enc.begin_compute_pass(&wgpu::ComputePassDescriptor { label: Some("step"), timestamp_writes: None });
            for step in steps {
                for d in &step.dispatches {
                    if d.groups.contains(&0) {
                        continue;
                    }
                    pass.set_pipeline(&d.pipeline.pipeline);
                    pass.set_bind_group(0, &d.bind_group, &[]);
                    pass.dispatch_workgroups(d.groups[0], d.groups[1], d.groups[2]);
                }
            }
        }
        self.queue.submit([enc.finish()]);
        self.check("submitting a step")
    }
}

impl Context {
    /// Runs every dispatch of `step` in a submission of its own and waits for it: wall seconds
    /// per dispatch, labelled `file:entry`. Slow (a sync per dispatch); for finding hot kernels.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn profile(&self, step: &Step) -> Result<Vec<(String, f64)>> {
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
                if !d.groups.contains(&0) {
                    pass.set_pipeline(&d.pipeline.pipeline);
                    pass.set_bind_group(0, &d.bind_group, &[]);
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
