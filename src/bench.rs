//! Benchmarks behind `portalora bench`. They print figures; nothing here asserts a speed.

use std::time::Instant;

use crate::gpu::{Context, DType, Result, Step};
use crate::ops::matmul::{matmul, Matmul, MatmulPath};
use crate::rng::Rng;

/// One product to time: C (M, N) = op(A) (M, K) · op(B) (K, N).
#[derive(Clone, Copy, Debug)]
pub struct MatmulShape {
    pub m: usize,
    pub k: usize,
    pub n: usize,
    pub trans_a: bool,
    pub trans_b: bool,
}

impl MatmulShape {
    pub const fn new(m: usize, k: usize, n: usize) -> Self {
        MatmulShape { m, k, n, trans_a: false, trans_b: false }
    }
    /// Parses `MxKxN` with an optional `nn`/`nt`/`tn`/`tt` suffix, e.g. `768x2048x768tn`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let t = text.trim();
        let (dims, op) = match t.get(t.len().saturating_sub(2)..) {
            Some(op @ ("nn" | "nt" | "tn" | "tt")) => (&t[..t.len() - 2], op),
            _ => (t, "nn"),
        };
        let d: Vec<usize> = dims
            .split('x')
            .map(|v| v.parse::<usize>())
            .collect::<Result<_, _>>()
            .map_err(|e| format!("shape {text:?}: {e}; expected MxKxN such as 2048x768x768"))?;
        match d[..] {
            [m, k, n] if m > 0 && k > 0 && n > 0 => {
                Ok(MatmulShape { m, k, n, trans_a: op.starts_with('t'), trans_b: op.ends_with('t') })
            }
            _ => Err(format!("shape {text:?}: expected three positive sizes MxKxN such as 2048x768x768")),
        }
    }
    pub fn op(&self) -> &'static str {
        match (self.trans_a, self.trans_b) {
            (false, false) => "nn",
            (false, true) => "nt",
            (true, false) => "tn",
            (true, true) => "tt",
        }
    }
}

/// The fixed list `portalora bench matmul` measures: GPT-2-small-sized projections at 2048
/// tokens, with LoRA's rank-16 shapes, in the three forms a linear layer needs.
pub const MATMUL_SHAPES: &[MatmulShape] = &[
    MatmulShape::new(2048, 768, 768),
    MatmulShape { m: 2048, k: 768, n: 768, trans_a: false, trans_b: true },
    MatmulShape { m: 768, k: 2048, n: 768, trans_a: true, trans_b: false },
    MatmulShape::new(2048, 768, 3072),
    MatmulShape::new(2048, 768, 16),
    MatmulShape::new(2048, 16, 768),
    MatmulShape::new(512, 512, 512),
];

#[derive(Clone, Debug)]
pub struct MatmulResult {
    pub shape: MatmulShape,
    pub path: MatmulPath,
    /// GFLOP/s of each repeat (2·M·N·K flops per product).
    pub gflops: Vec<f64>,
}

impl MatmulResult {
    fn sorted(&self) -> Vec<f64> {
        let mut v = self.gflops.clone();
        v.sort_by(|a, b| a.total_cmp(b));
        v
    }
    pub fn median(&self) -> f64 {
        let v = self.sorted();
        let n = v.len();
        if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        }
    }
    pub fn min(&self) -> f64 {
        self.sorted()[0]
    }
    pub fn max(&self) -> f64 {
        *self.sorted().last().expect("at least one repeat")
    }
}

/// Times one product: a warm-up, then `repeats` runs of a submission holding enough copies of
/// the dispatch to last about `target_s` seconds, so submission overhead stays out.
pub fn bench_matmul(
    ctx: &Context,
    shape: MatmulShape,
    path: MatmulPath,
    repeats: usize,
    target_s: f64,
) -> Result<MatmulResult> {
    let MatmulShape { m, k, n, trans_a, trans_b } = shape;
    let mut rng = Rng::new(42);
    let (ar, ac) = if trans_a { (k, m) } else { (m, k) };
    let (br, bc) = if trans_b { (n, k) } else { (k, n) };
    let a = ctx.upload_f32("A", &[ar, ac], &rng.vec(m * k))?;
    let b = ctx.upload_f32("B", &[br, bc], &rng.vec(k * n))?;
    let c = ctx.tensor("C", &[m, n], DType::F32)?;
    let mut step = Step::new();
    let opts = Matmul { trans_a, trans_b, path, ..Matmul::default() };
    let used = matmul(ctx, &mut step, &a, &b, &c, opts)?;

    // Warm-up (compiles the pipeline, faults in memory) and calibration.
    ctx.run(&step)?;
    ctx.wait_idle()?;
    let t0 = Instant::now();
    ctx.run(&step)?;
    ctx.wait_idle()?;
    let one = t0.elapsed().as_secs_f64().max(1e-6);
    let iters = ((target_s / one).ceil() as usize).clamp(1, 10_000);

    let flops = 2.0 * (m * n * k) as f64;
    let mut gflops = Vec::with_capacity(repeats);
    for _ in 0..repeats.max(1) {
        let t = Instant::now();
        ctx.run_repeated(&step, iters)?;
        ctx.wait_idle()?;
        let per = t.elapsed().as_secs_f64() / iters as f64;
        gflops.push(flops / per / 1e9);
    }
    Ok(MatmulResult { shape, path: used, gflops })
}

/// Why a step benchmark could not run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error(transparent)]
    Gpu(#[from] crate::gpu::GpuError),
    #[error(transparent)]
    Train(#[from] crate::train::TrainError),
    #[error(transparent)]
    Adapter(#[from] crate::adapter::AdapterError),
    #[error(transparent)]
    Model(#[from] crate::model::gpu::GpuModelError),
    #[error("{0}")]
    Config(String),
}

/// What `portalora bench step` measures.
#[derive(Clone, Debug)]
pub struct StepOptions {
    pub batch: usize,
    pub seq: usize,
    /// Timed steps (after `warmup` untimed ones).
    pub steps: usize,
    pub warmup: usize,
    /// Time every dispatch of one step with GPU timestamps.
    pub kernels: bool,
}

/// One kernel's share of a step: every dispatch with the same label and grid, summed.
#[derive(Clone, Debug)]
pub struct KernelTime {
    pub label: String,
    pub seconds: f64,
    pub count: usize,
}

#[derive(Clone, Debug)]
pub struct StepResult {
    /// Wall seconds of each timed step (submission to loss on the CPU).
    pub step_seconds: Vec<f64>,
    /// Wall seconds of each warm-up step (the first compiles pipelines and autotunes).
    pub warmup_seconds: Vec<f64>,
    pub tokens_per_step: usize,
    /// Bytes of GPU tensors by kind: weights (frozen base), adapters (trainable and frozen
    /// adapter tensors and their gradients), optimizer (moments, accumulators), activations
    /// (the model's and the adapter's activations and activation gradients), other.
    pub gpu_bytes: std::collections::BTreeMap<&'static str, u64>,
    /// Bytes of activations kept from forward to backward (part of `activations`).
    pub kept_bytes: u64,
    /// The model's activations and gradients as the lifetime planner placed them (part of
    /// `activations`), and what one buffer per tensor would have taken.
    pub planned_bytes: u64,
    pub unshared_bytes: u64,
    pub trainable: usize,
    /// Sorted by time, longest first; empty unless asked for.
    pub kernels: Vec<KernelTime>,
    /// GPU seconds of the timed dispatches of one step (sum over `kernels`).
    pub kernel_seconds: f64,
    /// Whether `kernels` came from GPU timestamps (else: wall clock per dispatch).
    pub timestamps: bool,
    /// CPU seconds of each timed step spent encoding and submitting it (writing its inputs
    /// included), before waiting for the GPU.
    pub encode_seconds: Vec<f64>,
    /// What one step submits: compute passes (one submission each), dispatches.
    pub submitted: crate::gpu::SubmitStats,
    /// GPU seconds of one step run as training runs it (pass timestamps; median of three), where
    /// the adapter has timestamps.
    pub gpu_step_seconds: Option<f64>,
    /// Where the time from building the trainer to the first step's submission went.
    pub startup: Startup,
}

/// Wall seconds of what comes before the first training step, by part (each exclusive of the
/// others: kernels compiled while planning count as `compile`). The process's own start, the
/// GPU context and loading the file are the caller's to add (`bench step` does).
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Startup {
    /// The frozen weights to the GPU, quantized or converted on the way.
    pub upload: f64,
    /// Tracing the steps, planning their memory and recording them (three times: the model, with
    /// its adapter, with backward).
    pub plan: f64,
    /// Shader modules and pipelines compiled by the driver, and how many.
    pub compile: f64,
    pub pipelines: u64,
    /// The rest of building the trainer: the adapter's tensors, the optimizer and its steps.
    pub optimizer: f64,
    /// Encoding and submitting the first step (its inputs written).
    pub first_submit: f64,
}

impl Startup {
    pub fn total(&self) -> f64 {
        self.upload + self.plan + self.compile + self.optimizer + self.first_submit
    }
}

impl StepResult {
    pub fn median_seconds(&self) -> f64 {
        median(&self.step_seconds)
    }
    pub fn tokens_per_s(&self) -> f64 {
        self.tokens_per_step as f64 / self.median_seconds()
    }
    pub fn median_encode_seconds(&self) -> f64 {
        median(&self.encode_seconds)
    }
    /// The wall time of a step the GPU spends idle (the median step less its GPU time).
    pub fn gpu_idle_seconds(&self) -> Option<f64> {
        self.gpu_step_seconds.map(|g| (self.median_seconds() - g).max(0.0))
    }
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    match n {
        0 => f64::NAN,
        _ if n % 2 == 1 => v[n / 2],
        _ => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Trains `adapter` on `weights` for `warmup + steps` steps of random tokens and reports the
/// median step time, the GPU memory by kind and (optionally) where one step's GPU time goes.
#[cfg(not(target_arch = "wasm32"))]
pub fn bench_step(
    ctx: &Context,
    weights: &crate::model::Weights,
    adapter: &crate::adapter::AdapterConfig,
    train: &crate::train::TrainConfig,
    opts: &StepOptions,
    mut progress: impl FnMut(usize, f64),
) -> std::result::Result<StepResult, BenchError> {
    use crate::train::Trainer;
    if opts.batch == 0 || opts.seq < 2 || opts.steps == 0 {
        return Err(BenchError::Config(format!(
            "batch {} × seq {} for {} steps: need a batch of at least 1, a sequence of at least 2 and 1 or more steps",
            opts.batch, opts.seq, opts.steps
        )));
    }
    let before = ctx.allocated_bytes();
    let (mut trainer, mut startup) =
        built(ctx, || Trainer::new(ctx, weights, opts.batch, opts.seq, adapter, train, None))?;
    let vocab = weights.config.vocab_size as u64;
    let mut rng = Rng::new(7);
    let mut batch = || -> Vec<Vec<u32>> {
        (0..opts.batch).map(|_| (0..opts.seq).map(|_| (rng.next_u64() % vocab) as u32).collect()).collect()
    };
    let (mut step_seconds, mut encode_seconds) = (Vec::with_capacity(opts.steps), Vec::with_capacity(opts.steps));
    let mut submitted = crate::gpu::SubmitStats::default();
    let mut warmup_seconds = Vec::new();
    for i in 0..opts.warmup + opts.steps {
        let ids = batch();
        let before = ctx.submit_stats();
        let t = Instant::now();
        trainer.submit_step(ctx, &[crate::train::Batch { ids: &ids, predict: None, positions: None }])?;
        let encode = t.elapsed().as_secs_f64();
        trainer.collect_losses(ctx)?;
        let s = t.elapsed().as_secs_f64();
        submitted = ctx.submit_stats() - before;
        if i == 0 {
            startup.first_submit = encode;
        }
        if i >= opts.warmup {
            step_seconds.push(s);
            encode_seconds.push(encode);
        } else {
            warmup_seconds.push(s);
        }
        progress(i, s);
    }
    let mut gpu = Vec::new();
    for _ in 0..3 {
        gpu.extend(ctx.time_whole(&trainer.recorded_steps())?);
    }
    let gpu_step_seconds = (!gpu.is_empty()).then(|| median(&gpu));
    // Bytes this trainer holds, by kind (the adapter's z = x·Aᵀ and scratch count as
    // activations: see adapter::activation).
    let gpu_bytes = bytes_since(ctx, before);

    let (kernels, kernel_seconds) =
        if opts.kernels { kernel_times(ctx, &trainer, &batch())? } else { (Vec::new(), 0.0) };
    Ok(StepResult {
        step_seconds,
        warmup_seconds,
        tokens_per_step: opts.batch * opts.seq,
        gpu_bytes,
        kept_bytes: trainer.kept_bytes(),
        planned_bytes: trainer.model.acts.planned_bytes,
        unshared_bytes: trainer.model.acts.unshared_bytes,
        trainable: trainer.trainable_parameters(),
        kernels,
        kernel_seconds,
        timestamps: ctx.features().timestamps,
        encode_seconds,
        submitted,
        gpu_step_seconds,
        startup,
    })
}

/// What `build` builds, and its start-up by part (from the context's phase timings).
#[cfg(not(target_arch = "wasm32"))]
fn built<T>(ctx: &Context, build: impl FnOnce() -> crate::train::Result<T>) -> crate::train::Result<(T, Startup)> {
    let (phases, t0) = (ctx.phases(), Instant::now());
    let out = build()?;
    let seconds = t0.elapsed().as_secs_f64();
    let spent = |p: &crate::gpu::Phases, k: &str| p.get(k).copied().unwrap_or((0, 0.0));
    let during = |k: &str| {
        let (now, then) = (spent(&ctx.phases(), k), spent(&phases, k));
        (now.0 - then.0, now.1 - then.1)
    };
    let (upload, plan, (pipelines, compile)) = (during("upload").1, during("plan").1, during("compile"));
    let optimizer = (seconds - upload - plan - compile).max(0.0);
    Ok((out, Startup { upload, plan, compile, pipelines, optimizer, first_submit: 0.0 }))
}

/// GPU bytes allocated now less those allocated at `before`, by kind, every kind present.
#[cfg(not(target_arch = "wasm32"))]
fn bytes_since(
    ctx: &Context,
    before: std::collections::BTreeMap<&'static str, u64>,
) -> std::collections::BTreeMap<&'static str, u64> {
    let mut gpu_bytes = ctx.allocated_bytes();
    for (k, v) in before {
        if let Some(x) = gpu_bytes.get_mut(k) {
            *x = x.saturating_sub(v);
        }
    }
    for k in ["weights", "adapters", "optimizer", "activations", "other"] {
        gpu_bytes.entry(k).or_default();
    }
    gpu_bytes
}

/// One step on `ids` with every dispatch timed: the kernels grouped by label, longest first, and
/// their total seconds.
#[cfg(not(target_arch = "wasm32"))]
fn kernel_times(
    ctx: &Context,
    trainer: &crate::train::Trainer,
    ids: &[Vec<u32>],
) -> std::result::Result<(Vec<KernelTime>, f64), BenchError> {
    trainer.model.write_inputs(ctx, ids)?;
    let times = ctx.time_dispatches(&trainer.recorded_steps())?;
    let mut kernel_seconds = 0.0;
    let mut by: std::collections::BTreeMap<String, (f64, usize)> = Default::default();
    for (label, s) in times {
        kernel_seconds += s;
        let e = by.entry(label).or_default();
        e.0 += s;
        e.1 += 1;
    }
    let mut kernels: Vec<KernelTime> =
        by.into_iter().map(|(label, (seconds, count))| KernelTime { label, seconds, count }).collect();
    kernels.sort_by(|a, b| b.seconds.total_cmp(&a.seconds));
    Ok((kernels, kernel_seconds))
}
