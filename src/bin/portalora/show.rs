//! `portalora info`, `inspect` and `bench`: what the machine, a model and the kernels are.

use portalora::bench::{MatmulShape, StepResult, MATMUL_SHAPES};
use portalora::gpu::Context;
use portalora::ops::matmul::MatmulPath;

use super::{BenchStepArgs, PathArg};

type Res = Result<(), Box<dyn std::error::Error>>;

/// `bench matmul`: GFLOP/s per shape, as a table or one JSON object per line.
pub(crate) fn bench_matmul(
    ctx: &Context,
    json: bool,
    path: PathArg,
    repeats: usize,
    seconds: f64,
    shapes: &[String],
) -> Res {
    let shapes = if shapes.is_empty() {
        MATMUL_SHAPES.to_vec()
    } else {
        shapes.iter().map(|s| MatmulShape::parse(s)).collect::<Result<Vec<_>, _>>()?
    };
    let path = match path {
        PathArg::Auto => MatmulPath::Auto,
        PathArg::Portable => MatmulPath::Portable,
        PathArg::Subgroup => MatmulPath::Subgroup,
    };
    if !json {
        let i = ctx.info();
        outln!("adapter: {} ({}, {})", i.name, i.backend, i.device_type);
        if let Some(s) = ctx.subgroup_size() {
            let t = portalora::ops::matmul::tuned_tile(ctx, s);
            outln!("subgroup kernel tile (autotuned): {} rows × {} vec4 columns per lane", t.tm, t.tnv);
        }
        outln!(
            "{:>6} {:>6} {:>6}  {:<3} {:<9} {:>10} {:>10} {:>10}",
            "M",
            "K",
            "N",
            "op",
            "path",
            "GFLOP/s",
            "min",
            "max"
        );
    }
    for shape in shapes {
        let r = portalora::bench::bench_matmul(ctx, shape, path, repeats, seconds)?;
        let path = format!("{:?}", r.path).to_lowercase();
        let (m, k, n, op) = (shape.m, shape.k, shape.n, shape.op());
        if json {
            outln!(
                "{{\"m\": {m}, \"k\": {k}, \"n\": {n}, \"op\": \"{op}\", \"path\": \"{path}\", \"gflops\": {:.3}, \"min\": {:.3}, \"max\": {:.3}}}",
                r.median(), r.min(), r.max()
            );
        } else {
            outln!("{m:>6} {k:>6} {n:>6}  {op:<3} {path:<9} {:>10.2} {:>10.2} {:>10.2}", r.median(), r.min(), r.max());
        }
    }
    Ok(())
}

pub(crate) fn bench_step(ctx: &Context, a: BenchStepArgs) -> Res {
    use portalora::adapter::{AdapterConfig, Method};
    use portalora::bench::StepOptions;
    let method: Method = a.method.parse()?;
    let base_dtype: portalora::model::BaseDType = a.base_dtype.parse()?;
    let t = std::time::Instant::now();
    let weights = crate::load_model(&a.model)?;
    let load = t.elapsed().as_secs_f64();
    let mut cfg = AdapterConfig::new(method);
    cfg.rank = a.rank;
    cfg.alpha = 2.0 * a.rank as f64;
    cfg.targets =
        if a.targets.is_empty() { portalora::adapter::all_targets(weights.config.arch) } else { a.targets.clone() };
    let train = portalora::train::TrainConfig {
        base_dtype,
        recompute_mlp: a.recompute_mlp,
        activations_f16: a.activations == "f16",
        logit_chunk_rows: a.logit_chunk_rows,
        ..Default::default()
    };
    let opts = StepOptions { batch: a.batch, seq: a.seq, steps: a.steps, warmup: a.warmup, kernels: !a.no_kernels };
    let i = ctx.info();
    let model_name = a.model.display().to_string();
    errln!("adapter: {} ({}, {})", i.name, i.backend, i.device_type);
    errln!(
        "model: {model_name}; {method} r = {} on {}; batch {} × {} tokens; base {base_dtype}{}{}",
        cfg.rank,
        cfg.targets.join(","),
        a.batch,
        a.seq,
        if a.recompute_mlp { "; MLP recomputed in backward" } else { "" },
        if a.activations == "f16" { "; activations kept as f16" } else { "" }
    );
    let total = a.warmup + a.steps;
    let before = crate::STARTED.get().map_or(0.0, |s| s.elapsed().as_secs_f64());
    let r = portalora::bench::bench_step(ctx, &weights, &cfg, &train, &opts, |k, s| {
        let what = if k < a.warmup { " (warm-up)" } else { "" };
        errln!("step {}/{total}: {s:.3} s{what}", k + 1);
    })?;
    let context = crate::CONTEXT_READY.get().copied().unwrap_or(0.0);
    // The library's parts, and what came before them in this process.
    let mut startup = serde_json::to_value(&r.startup)?;
    startup["process"] = (before - context - load).max(0.0).into();
    (startup["context"], startup["load"]) = (context.into(), load.into());
    let startup_seconds = before + r.startup.total();
    print_step(&r, a.steps, a.top);
    print_startup(&startup, startup_seconds);
    if a.json {
        let mut j = step_json(&r, &a, &cfg, base_dtype, &model_name, &i.name);
        j["startup_seconds"] = startup_seconds.into();
        j["startup"] = startup;
        outln!("{j}");
    }
    Ok(())
}

/// The seconds from process start to the first step's submission, by part.
fn print_startup(s: &serde_json::Value, total: f64) {
    let f = |k: &str| s[k].as_f64().unwrap_or(0.0);
    outln!(
        "start-up: {total:.2} s to the first step's submission: GPU context {:.2}, loading the file {:.2}, \
         weights to the GPU {:.2}, planning and recording {:.2}, compiling {:.2} ({} pipelines), optimizer {:.2}, \
         the first submission {:.2}, the rest {:.2}",
        f("context"),
        f("load"),
        f("upload"),
        f("plan"),
        f("compile"),
        s["pipelines"],
        f("optimizer"),
        f("first_submit"),
        f("process")
    );
}

/// The kinds of GPU memory `bench step` reports, in the order shown.
const MEMORY_KINDS: [&str; 5] = ["weights", "adapters", "optimizer", "activations", "other"];

/// Bytes of GPU memory of kind `k` in a step benchmark's result (0 if none).
fn kind_bytes(r: &StepResult, k: &str) -> u64 {
    r.gpu_bytes.get(k).copied().unwrap_or(0)
}

/// Prints `bench step`'s table: throughput, CPU/GPU time per step, memory by kind, the top kernels.
fn print_step(r: &StepResult, steps: usize, top: usize) {
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    outln!("tokens/s: {:.2} (median step {:.3} s over {} steps)", r.tokens_per_s(), r.median_seconds(), steps);
    let ms = |s: f64| s * 1e3;
    outln!(
        "per step: {:.2} ms of CPU to encode and submit ({} dispatches in {} compute pass(es), one submission each){}",
        ms(r.median_encode_seconds()),
        r.submitted.dispatches,
        r.submitted.passes,
        match (r.gpu_step_seconds, r.gpu_idle_seconds()) {
            (Some(g), Some(idle)) =>
                format!("; GPU busy {:.2} ms, idle {:.2} ms of the step's wall time", ms(g), ms(idle)),
            _ => "; no GPU timestamps here, so no busy/idle split".into(),
        }
    );
    outln!("trainable parameters: {}", r.trainable);
    outln!("GPU memory allocated:");
    for k in MEMORY_KINDS {
        outln!("  {k:<12} {:>10.2} MiB", mib(kind_bytes(r, k)));
    }
    outln!("  {:<12} {:>10.2} MiB", "total", mib(MEMORY_KINDS.iter().map(|k| kind_bytes(r, k)).sum()));
    outln!("  kept for backward (part of activations): {:.2} MiB", mib(r.kept_bytes));
    outln!(
        "  model activations + gradients, buffers shared by lifetime: {:.2} MiB (one buffer per tensor: {:.2} MiB)",
        mib(r.planned_bytes),
        mib(r.unshared_bytes)
    );
    if !r.kernels.is_empty() {
        let how = if r.timestamps { "GPU timestamps" } else { "wall clock per dispatch" };
        outln!("one step's kernels ({how}; {:.3} s in all):", r.kernel_seconds);
        outln!("{:>9} {:>6} {:>6}  kernel [workgroups]", "seconds", "%", "count");
        for k in r.kernels.iter().take(top) {
            outln!("{:>9.4} {:>5.1}% {:>6}  {}", k.seconds, 100.0 * k.seconds / r.kernel_seconds, k.count, k.label);
        }
    }
}

/// `bench step --json`'s object: the result, the run's settings and the adapter it ran on.
fn step_json(
    r: &StepResult,
    a: &BenchStepArgs,
    cfg: &portalora::adapter::AdapterConfig,
    base_dtype: portalora::model::BaseDType,
    model_name: &str,
    adapter: &str,
) -> serde_json::Value {
    let kernels: Vec<serde_json::Value> = r
        .kernels
        .iter()
        .map(|k| serde_json::json!({"kernel": k.label, "seconds": k.seconds, "count": k.count}))
        .collect();
    let gpu_bytes: serde_json::Map<String, serde_json::Value> =
        MEMORY_KINDS.iter().map(|k| (k.to_string(), kind_bytes(r, k).into())).collect();
    serde_json::json!({
        "tokens_per_s": r.tokens_per_s(),
        "step_seconds": r.median_seconds(),
        "steps": r.step_seconds,
        "warmup_steps": r.warmup_seconds,
        "gpu_bytes": serde_json::Value::Object(gpu_bytes),
        "kept_bytes": r.kept_bytes,
        "planned_bytes": r.planned_bytes,
        "unshared_bytes": r.unshared_bytes,
        "trainable": r.trainable,
        "model": model_name,
        "method": cfg.method.name(),
        "rank": cfg.rank,
        "batch": a.batch,
        "seq": a.seq,
        "base_dtype": base_dtype.to_string(),
        "recompute_mlp": a.recompute_mlp,
        "activations": a.activations,
        "adapter": adapter,
        "kernel_seconds": r.kernel_seconds,
        "encode_seconds": r.median_encode_seconds(),
        "gpu_step_seconds": r.gpu_step_seconds,
        "gpu_idle_seconds": r.gpu_idle_seconds(),
        "dispatches": r.submitted.dispatches,
        "passes": r.submitted.passes,
        "kernels": kernels,
    })
}

pub(crate) fn info(ctx: &Context, json: bool) -> Res {
    let i = ctx.info();
    let f = ctx.features();
    let l = ctx.limits();
    if json {
        outln!(
            "{{\"name\": {:?}, \"backend\": {:?}, \"device_type\": {:?}, \"driver\": {:?}, \"driver_info\": {:?}, \
             \"subgroups\": {}, \"subgroup_min_size\": {}, \"subgroup_max_size\": {}, \"shader_f16\": {}, \"timestamps\": {}, \
             \"max_storage_binding\": {}, \"max_buffer\": {}, \"max_workgroup_storage\": {}, \"max_invocations_per_workgroup\": {}, \
             \"max_workgroups_per_dimension\": {}, \"max_storage_buffers_per_stage\": {}, \"cooperative_matrices\": {}}}",
            i.name, i.backend, i.device_type, i.driver, i.driver_info, f.subgroups, i.subgroup_min_size, i.subgroup_max_size,
            f.shader_f16, f.timestamps, l.max_storage_binding, l.max_buffer, l.max_workgroup_storage,
            l.max_invocations_per_workgroup, l.max_workgroups_per_dimension, l.max_storage_buffers_per_stage,
            serde_json::to_string(&i.cooperative_matrices)?
        );
        return Ok(());
    }
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    outln!("adapter:        {}", i.name);
    outln!("backend:        {}", i.backend);
    outln!("device type:    {}", i.device_type);
    outln!("driver:         {} {}", i.driver, i.driver_info);
    outln!("features:");
    outln!("  subgroups:    {} (sizes {}..={})", f.subgroups, i.subgroup_min_size, i.subgroup_max_size);
    outln!("  shader-f16:   {}", f.shader_f16);
    outln!("  timestamps:   {}", f.timestamps);
    let coop =
        if i.cooperative_matrices.is_empty() { "none offered".into() } else { i.cooperative_matrices.join(", ") };
    let used = match (f.coop_size, f.coop_mode) {
        (_, portalora::gpu::CoopMode::Off) => "not used: PORTALORA_COOP=off".to_string(),
        (None, _) => "not used: the matmul needs a square f16→f32 one".to_string(),
        (Some(t), m) => format!(
            "the matmul's forward products use {t}x{t}x{t} f16→f32 {}; PORTALORA_COOP=off turns them off",
            if m == portalora::gpu::CoopMode::On {
                "wherever they fit (PORTALORA_COOP=on)"
            } else {
                "where the autotune finds them faster"
            }
        ),
    };
    outln!("  cooperative matrices: {coop} ({used})");
    outln!("limits:");
    outln!("  storage binding:        {:.0} MiB", mib(l.max_storage_binding));
    outln!("  buffer size:            {:.0} MiB", mib(l.max_buffer));
    outln!("  workgroup storage:      {} KiB", l.max_workgroup_storage / 1024);
    outln!("  invocations/workgroup:  {}", l.max_invocations_per_workgroup);
    outln!("  workgroups/dimension:   {}", l.max_workgroups_per_dimension);
    outln!("  storage buffers/stage:  {}", l.max_storage_buffers_per_stage);
    Ok(())
}

pub(crate) fn inspect(path: &std::path::Path) -> Res {
    use portalora::model::arch::{NormKind, RopeScaling};
    let w = crate::load_model(path)?;
    let c = &w.config;
    let b = c.block;
    outln!("model:          {}", path.display());
    outln!("family:         {:?}", c.family);
    outln!("parameters:     {} ({:.1} M)", c.num_parameters(), c.num_parameters() as f64 / 1e6);
    outln!("vocab:          {}", c.vocab_size);
    outln!("layers:         {}", c.num_layers);
    outln!("hidden:         {}", c.hidden_size);
    outln!("heads:          {} (kv {}, head dim {})", c.num_heads, c.num_kv_heads, c.head_dim);
    outln!("mlp:            {} ({:?})", c.intermediate_size, b.act);
    outln!("context:        {}", c.max_positions);
    let norm = match (b.norm, b.norm_plus_one) {
        (NormKind::Layer, _) => "LayerNorm",
        (NormKind::Rms, true) => "RMSNorm × (1 + w)",
        (NormKind::Rms, false) => "RMSNorm",
    };
    outln!(
        "norm:           {norm}, eps {:e}{}",
        c.norm_eps,
        if b.post_norms { "; also after attention and after the MLP" } else { "" }
    );
    let biases: Vec<&str> = [(b.qkv_bias, "q/k/v"), (b.o_bias, "o"), (b.mlp_bias, "mlp")]
        .iter()
        .filter(|(on, _)| *on)
        .map(|(_, n)| *n)
        .collect();
    outln!("biases:         {}", if biases.is_empty() { "none".to_string() } else { biases.join(", ") });
    outln!("q/k norm:       {}", b.qk_norm);
    if b.rope {
        let mut kinds: Vec<String> = Vec::new();
        for l in &c.layers {
            let scaling = match &l.rope.scaling {
                None => String::new(),
                Some(RopeScaling::Linear { factor }) => format!(", linear × {factor}"),
                Some(RopeScaling::Llama3 { factor, .. }) => format!(", llama3 × {factor}"),
                Some(RopeScaling::Factors(_)) => ", per-frequency factors".to_string(),
            };
            let k = format!("theta {}{scaling}", l.rope.theta);
            if !kinds.contains(&k) {
                kinds.push(k);
            }
        }
        outln!("rope:           {}", kinds.join("; "));
    } else {
        outln!("positions:      learned");
    }
    let windows: Vec<String> =
        c.layers.iter().map(|l| if l.window == 0 { "full".into() } else { l.window.to_string() }).collect();
    if c.layers.iter().any(|l| l.window > 0) {
        outln!("attention:      per layer: {}", windows.join(" "));
    } else {
        outln!("attention:      full causal in every layer");
    }
    if let Some(s) = b.attn_scale {
        outln!("attn scale:     {s:.6}");
    }
    if b.embed_scale {
        outln!("embed scale:    √{} = {:.4}", c.hidden_size, (c.hidden_size as f64).sqrt());
    }
    if let Some(cap) = b.final_softcap {
        outln!("logit softcap:  {cap}");
    }
    outln!("tied head:      {}", c.tie_embeddings);
    outln!("tensors:        {}", w.tensors.len());
    Ok(())
}

/// `bench coop`: one JSON line, {"adapter", "offered", "enabled", "size", "max_rel_error",
/// "max_rel_error_vs_f32", "coop_gflops", "subgroup_gflops", "ratio"} or {"adapter", "offered",
/// "enabled", "error"} (then the exit status is 1).
pub(crate) fn bench_coop(ctx: &Context, size: usize) -> Res {
    let i = ctx.info();
    let mut out = serde_json::json!({"adapter": i.name, "offered": i.cooperative_matrices,
        "enabled": ctx.features().cooperative_matrix});
    match portalora::ops::matmul::coop::race(ctx, size, size, size) {
        Ok(r) => {
            let gflops = |s: f64| 2.0 * (size as f64).powi(3) / s / 1e9;
            out["size"] = size.into();
            out["max_rel_error"] = r.max_rel_error.into();
            out["max_rel_error_vs_f32"] = r.max_rel_error_vs_f32.into();
            out["coop_gflops"] = gflops(r.coop_seconds).into();
            out["subgroup_gflops"] = gflops(r.subgroup_seconds).into();
            out["ratio"] = (r.subgroup_seconds / r.coop_seconds).into();
            outln!("{out}");
            Ok(())
        }
        Err(e) => {
            out["error"] = e.to_string().into();
            outln!("{out}");
            Err(e.into())
        }
    }
}
