//! The portalora command line.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use portalora::bench::{bench_matmul, MatmulShape, MATMUL_SHAPES};
use portalora::gpu::Context;
use portalora::ops::matmul::MatmulPath;

mod train;

#[derive(Parser)]
#[command(
    name = "portalora",
    version,
    about = "Fine-tune language models with LoRA-family adapters on any GPU through WebGPU"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Show the GPU adapter, backend, features and the limits that matter.
    Info {
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Load a model (a .gguf file or a Hugging Face folder) and describe it.
    Inspect {
        /// A .gguf file or a folder with config.json and model.safetensors.
        #[arg(long)]
        model: PathBuf,
    },
    /// Mean next-token cross-entropy of a model on token ids or text, computed on the GPU.
    /// With --json the last line is {"loss": <float>, "tokens": <int>}.
    Eval {
        /// A .gguf file or a Hugging Face folder.
        #[arg(long)]
        model: PathBuf,
        /// A JSON file {"input_ids": [[...], ...]} with rows of equal length.
        #[arg(long, conflicts_with = "data", required_unless_present = "data")]
        ids: Option<PathBuf>,
        /// A text file, tokenized with the model's tokenizer and cut into rows of --seq tokens.
        #[arg(long)]
        data: Option<PathBuf>,
        /// Tokens per row with --data (the tail shorter than a row is dropped).
        #[arg(long, default_value_t = 128)]
        seq: usize,
        /// Rows per forward pass (memory grows with batch × seq).
        #[arg(long, default_value_t = 4)]
        batch: usize,
        /// A PEFT adapter folder (LoRA or VeRA; written by portalora or by PEFT) to evaluate with.
        #[arg(long)]
        adapter: Option<PathBuf>,
        /// Print the result as one JSON object on the last line.
        #[arg(long)]
        json: bool,
    },
    /// Continue a prompt with the model, on the GPU with a KV cache.
    Generate {
        /// A .gguf file or a Hugging Face folder.
        #[arg(long)]
        model: PathBuf,
        #[arg(long)]
        prompt: String,
        /// New tokens at most (generation also stops at the end-of-sequence token).
        #[arg(long, default_value_t = 32)]
        max_tokens: usize,
        /// 0 picks the most likely token every time (greedy); higher values sample more freely.
        #[arg(long, default_value_t = 0.0)]
        temperature: f32,
        /// Sample only among the k most likely tokens (0: no limit).
        #[arg(long, default_value_t = 0)]
        top_k: usize,
        /// Sample only among the most likely tokens whose probabilities add up to p (1: no limit).
        #[arg(long, default_value_t = 1.0)]
        top_p: f32,
        /// Seed of the sampler.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// A PEFT adapter folder, merged into the weights on the GPU before generating.
        #[arg(long)]
        adapter: Option<PathBuf>,
    },
    /// Fine-tune an adapter (LoRA, LoRA-FA, VeRA, Delta-LoRA or LoRA+) and write it in PEFT's format.
    #[command(args_override_self = true)]
    Train(Box<TrainArgs>),
    /// Merge an adapter into its base model and write a Hugging Face folder with the base's key
    /// names and layouts.
    Merge {
        /// The base model: a .gguf file or a Hugging Face folder.
        #[arg(long)]
        model: PathBuf,
        /// A PEFT adapter folder (LoRA or VeRA).
        #[arg(long)]
        adapter: PathBuf,
        /// The output folder (config.json, model.safetensors, tokenizer files).
        #[arg(long)]
        out: PathBuf,
    },
    /// Measure speed.
    Bench {
        #[command(subcommand)]
        what: BenchWhat,
    },
}

#[derive(Subcommand)]
enum BenchWhat {
    /// GFLOP/s of the f32 matmul kernels on a fixed list of shapes.
    Matmul {
        /// One JSON object per shape and line: {"m","k","n","op","path","gflops","min","max"}.
        #[arg(long)]
        json: bool,
        /// Kernel path: auto (subgroup where available), portable or subgroup.
        #[arg(long, value_enum, default_value_t = PathArg::Auto)]
        path: PathArg,
        /// Timed repeats per shape (median, min and max are reported).
        #[arg(long, default_value_t = 5)]
        repeats: usize,
        /// Seconds each repeat should last (more copies of the kernel per submission).
        #[arg(long, default_value_t = 0.3)]
        seconds: f64,
        /// Only these shapes, as MxKxN with an optional op suffix: 2048x768x768,768x2048x768tn
        #[arg(long, value_delimiter = ',')]
        shapes: Vec<String>,
    },
    /// Training-step speed and GPU memory: tokens/s (median over steps after warm-up), bytes
    /// allocated by kind, and a per-kernel GPU time breakdown from timestamp queries.
    Step(Box<BenchStepArgs>),
}

#[derive(clap::Args)]
struct BenchStepArgs {
    /// A GGUF file or a Hugging Face folder.
    #[arg(long)]
    model: PathBuf,
    /// lora, lora-fa, vera, delta-lora or lora-plus.
    #[arg(long, default_value = "lora")]
    method: String,
    /// Adapter rank (VeRA: the shared matrices' rank).
    #[arg(long, default_value_t = 8)]
    rank: usize,
    #[arg(long, default_value_t = 4)]
    batch: usize,
    #[arg(long, default_value_t = 128)]
    seq: usize,
    /// Projections to adapt; default: every projection of the model.
    #[arg(long, value_delimiter = ',')]
    targets: Vec<String>,
    /// How the frozen base is stored on the GPU: f32, f16, q8_0, q4_0, q4_1, or auto (as in
    /// the file: a GGUF's quantized tensors stay quantized).
    #[arg(long, default_value = "auto")]
    base_dtype: String,
    /// Recompute the MLP's gate/up projections in backward instead of keeping them.
    #[arg(long)]
    recompute_mlp: bool,
    /// Timed steps after the warm-up.
    #[arg(long, default_value_t = 5)]
    steps: usize,
    /// Untimed steps first (pipeline compilation, first touches of memory).
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// Skip the per-kernel breakdown (it runs one more step, each dispatch in its own pass).
    #[arg(long)]
    no_kernels: bool,
    /// Kernel rows to print (the JSON has all).
    #[arg(long, default_value_t = 20)]
    top: usize,
    /// Print the result as one JSON object on the last line.
    #[arg(long)]
    json: bool,
}

/// `portalora train`'s options.
#[derive(clap::Args)]
pub(crate) struct TrainArgs {
    /// The base model: a .gguf file or a Hugging Face folder.
    #[arg(long)]
    model: Option<PathBuf>,
    /// A JSON file {"input_ids": [[...], ...]}: every step trains on all its rows, in order.
    #[arg(long, conflicts_with = "data")]
    ids: Option<PathBuf>,
    /// Training text: a text file, a folder of text files, or JSONL ({"text": ...} or
    /// {"prompt": ..., "completion": ...}, the loss then masked to the completion). Tokenized with
    /// the model's tokenizer, packed into rows of --seq tokens, split into training and validation
    /// rows, shuffled each epoch with --seed.
    #[arg(long)]
    data: Option<PathBuf>,
    /// lora, lora-fa, vera, delta-lora or lora-plus.
    #[arg(long, default_value = "lora")]
    method: String,
    /// Adapter rank r [default: 8; VeRA 256; or the --init-adapter's].
    #[arg(long, value_parser = parse_count)]
    rank: Option<usize>,
    /// LoRA's alpha: the branch is scaled by alpha / r [default: 8, or the --init-adapter's]. VeRA ignores it.
    #[arg(long, value_parser = parse_number)]
    alpha: Option<f64>,
    /// rsLoRA: scale by alpha / sqrt(r).
    #[arg(long)]
    rslora: bool,
    /// Dropout on the adapter branch's input (Delta-LoRA has none).
    #[arg(long, default_value = "0", value_parser = parse_number)]
    dropout: f64,
    /// Target modules, comma-separated, matched as module-name suffixes as in PEFT
    /// (GPT-2: c_attn, c_proj, c_fc; LLaMA: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj)
    /// [default: the --init-adapter's].
    #[arg(long, value_delimiter = ',')]
    targets: Vec<String>,
    /// A's initialisation: kaiming (PEFT's default) or gaussian.
    #[arg(long, default_value = "kaiming")]
    init: String,
    /// adamw or sgd.
    #[arg(long, default_value = "adamw")]
    optimizer: String,
    /// Learning rate.
    #[arg(long, default_value = "2e-4", value_parser = parse_number)]
    lr: f64,
    /// AdamW's betas, as B1,B2.
    #[arg(long, default_value = "0.9,0.999")]
    betas: String,
    /// AdamW's epsilon [default: 1e-8; 1e-6 with --lorafa-projected].
    #[arg(long, value_parser = parse_number)]
    eps: Option<f64>,
    /// Decoupled weight decay (AdamW) or L2 penalty (SGD).
    #[arg(long, default_value = "0", value_parser = parse_number)]
    weight_decay: f64,
    /// SGD's momentum.
    #[arg(long, default_value = "0.9", value_parser = parse_number)]
    momentum: f64,
    /// Clip the global gradient norm to this (0: no clipping).
    #[arg(long, default_value = "1.0", value_parser = parse_number)]
    max_grad_norm: f64,
    /// Learning-rate schedule: constant, linear or cosine (after --warmup-steps of linear warm-up).
    #[arg(long, default_value = "constant")]
    schedule: String,
    /// Steps of linear learning-rate warm-up.
    #[arg(long, default_value = "0", value_parser = parse_count)]
    warmup_steps: usize,
    /// LoRA+: B (and 1-D parameters) train at lr × this ratio.
    #[arg(long, default_value = "16", value_parser = parse_number)]
    lr_ratio: f64,
    /// Delta-LoRA's λ: W0 += λ·s·(B'A' − BA) after each step past the warm-up.
    #[arg(long, default_value = "2", value_parser = parse_number)]
    delta_lambda: f64,
    /// Delta-LoRA's warm-up K: W0 is updated after steps K+1, K+2, ...
    #[arg(long, default_value = "500", value_parser = parse_count)]
    delta_warmup: usize,
    /// VeRA's initial λ_d.
    #[arg(long, default_value = "0.1", value_parser = parse_number)]
    vera_d_initial: f64,
    /// VeRA's shared-pair seed (PEFT's projection_prng_key).
    #[arg(long, default_value = "0", value_parser = parse_count)]
    vera_seed: usize,
    /// LoRA-FA: PEFT's projected optimizer (dB·(AAᵀ)⁻¹/s², transformers' AdamW) instead of plain AdamW on B.
    #[arg(long)]
    lorafa_projected: bool,
    /// Optimizer steps (or give --epochs).
    #[arg(long, value_parser = parse_count)]
    steps: Option<usize>,
    /// Passes over the training rows (instead of --steps).
    #[arg(long, value_parser = parse_number)]
    epochs: Option<f64>,
    /// Rows per micro-batch with --data (with --ids, the file's rows / --grad-accum).
    #[arg(long, default_value = "4", value_parser = parse_count)]
    batch: usize,
    /// Micro-batches whose gradients are summed into each optimizer step.
    #[arg(long, default_value = "1", value_parser = parse_count)]
    grad_accum: usize,
    /// How the frozen base is stored on the GPU: auto (a GGUF's Q8_0/Q4_0/Q4_1/f16 tensors
    /// stay as they are, dequantized inside the matmul), f32, f16, q8_0, q4_0 or q4_1.
    #[arg(long, default_value = "auto")]
    base_dtype: String,
    /// Read the loss back every N steps (the only CPU–GPU sync of training); log lines for
    /// those steps arrive together. Evaluations and checkpoints read it too.
    #[arg(long, default_value = "1", value_parser = parse_count)]
    loss_every: usize,
    /// Recompute the MLP's gate/up projections in the backward pass instead of keeping them
    /// (activation checkpointing): less GPU memory for two more projections per layer.
    #[arg(long)]
    recompute_mlp: bool,
    /// Tokens per row with --data.
    #[arg(long, default_value = "128", value_parser = parse_count)]
    seq: usize,
    /// Fraction of the --data rows held out for validation.
    #[arg(long, default_value = "0.1", value_parser = parse_number)]
    val_fraction: f64,
    /// Evaluate at most this many validation rows (0: all).
    #[arg(long, default_value = "0", value_parser = parse_count)]
    val_rows: usize,
    /// Evaluate on the validation rows every N steps (0: only before and after training).
    #[arg(long, default_value = "0", value_parser = parse_count)]
    eval_every: usize,
    /// Write a checkpoint (adapter, optimizer state, step, data position) under --out every N steps (0: never).
    #[arg(long, default_value = "0", value_parser = parse_count)]
    save_every: usize,
    /// Continue the run whose --out is DIR from its last checkpoint, with its settings (--steps may extend it).
    #[arg(long)]
    resume: Option<PathBuf>,
    /// Read options from a TOML file (keys as the flags without dashes, e.g. lr = 1e-3,
    /// targets = ["q_proj", "v_proj"]); flags on the command line override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Keep the training rows in order instead of shuffling them each epoch.
    #[arg(long)]
    no_shuffle: bool,
    /// A prompt to continue (greedy) before and after training; repeat for more.
    #[arg(long)]
    prompt: Vec<String>,
    /// Tokens generated per prompt.
    #[arg(long, default_value = "32", value_parser = parse_count)]
    sample_tokens: usize,
    /// Seed of the adapter's init, the data split and order, and the dropout masks.
    #[arg(long, default_value = "0", value_parser = parse_count)]
    seed: usize,
    /// Start from the tensors of this PEFT adapter folder instead of a random init.
    #[arg(long)]
    init_adapter: Option<PathBuf>,
    /// Output folder: the adapter in PEFT's format (Delta-LoRA: a merged Hugging Face folder,
    /// with the final adapter in OUT/adapter), run.json, checkpoint/, log.jsonl, loss.svg.
    #[arg(long)]
    out: Option<PathBuf>,
    /// The JSONL log [default: OUT/log.jsonl]: per step {"step": s, "loss": x, "lr": lr, "tokens": n,
    /// "seconds": t} (x is the step's forward loss before its update), per evaluation
    /// {"step": s, "val_loss": v}.
    #[arg(long)]
    log_json: Option<PathBuf>,
}

/// A number in any usual form: 1e-08, 16.0, 0.5.
fn parse_number(s: &str) -> Result<f64, String> {
    let v: f64 = s.trim().parse().map_err(|_| format!("{s:?} is not a number"))?;
    if !v.is_finite() {
        return Err(format!("{s:?} is not a finite number"));
    }
    Ok(v)
}

/// A non-negative whole number, also written as 8.0 or 1e3.
fn parse_count(s: &str) -> Result<usize, String> {
    let v = parse_number(s)?;
    if v < 0.0 || v.fract() != 0.0 || v > usize::MAX as f64 {
        return Err(format!("{s:?} is not a non-negative whole number"));
    }
    Ok(v as usize)
}

#[derive(Clone, Copy, ValueEnum)]
enum PathArg {
    Auto,
    Portable,
    Subgroup,
}

fn main() -> ExitCode {
    let cli = match with_config_file(Cli::parse()) {
        Ok(cli) => cli,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            let mut src = std::error::Error::source(&*e);
            while let Some(s) = src {
                eprintln!("  caused by: {s}");
                src = s.source();
            }
            ExitCode::FAILURE
        }
    }
}

/// `train --config FILE`: the TOML file's keys become flags placed before the command line's,
/// which therefore override them (the train command lets a later flag override an earlier one).
fn with_config_file(cli: Cli) -> Result<Cli, Box<dyn std::error::Error>> {
    let Command::Train(args) = &cli.command else { return Ok(cli) };
    let Some(path) = &args.config else { return Ok(cli) };
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let table: toml::Table = text.parse().map_err(|e| format!("{}: not TOML: {e}", path.display()))?;
    let mut argv: Vec<String> = std::env::args().take(1).collect();
    argv.push("train".into());
    for (key, value) in &table {
        let flag = format!("--{}", key.replace('_', "-"));
        let text = |v: &toml::Value| -> Result<String, String> {
            match v {
                toml::Value::String(s) => Ok(s.clone()),
                toml::Value::Integer(i) => Ok(i.to_string()),
                toml::Value::Float(f) => Ok(f.to_string()),
                other => Err(format!("{}: {key} = {other:?} is not a string or number", path.display())),
            }
        };
        match value {
            toml::Value::Boolean(true) => argv.push(flag),
            toml::Value::Boolean(false) => {}
            toml::Value::Array(items) if key == "prompt" => {
                for it in items {
                    argv.extend([flag.clone(), text(it)?]);
                }
            }
            toml::Value::Array(items) => {
                let parts = items.iter().map(text).collect::<Result<Vec<_>, _>>()?;
                argv.extend([flag, parts.join(",")]);
            }
            v => argv.extend([flag, text(v)?]),
        }
    }
    let given: Vec<String> = std::env::args().skip_while(|a| a != "train").skip(1).collect();
    argv.extend(given);
    Cli::try_parse_from(argv).map_err(|e| format!("{}: {e}", path.display()).into())
}

fn run(cli: Cli) -> Result<(), Box<dyn std::error::Error>> {
    if let Command::Inspect { model } = &cli.command {
        return inspect(model);
    }
    let ctx = pollster::block_on(Context::new())?;
    match cli.command {
        Command::Inspect { .. } => unreachable!("handled above"),
        Command::Generate { model, prompt, max_tokens, temperature, top_k, top_p, seed, adapter } => {
            let sampling = portalora::model::generate::Sampling { temperature, top_k, top_p, seed };
            generate(&ctx, &model, &prompt, max_tokens, sampling, adapter.as_deref())
        }
        Command::Eval { model, ids, data, seq, batch, adapter, json } => {
            eval(&ctx, &model, ids.as_deref(), data.as_deref(), seq, batch, adapter.as_deref(), json)
        }
        Command::Train(args) => train::train(&ctx, *args),
        Command::Merge { model, adapter, out } => train::merge(&ctx, &model, &adapter, &out),
        Command::Info { json } => info(&ctx, json),
        Command::Bench { what: BenchWhat::Step(args) } => bench_step(&ctx, *args),
        Command::Bench { what: BenchWhat::Matmul { json, path, repeats, seconds, shapes } } => {
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
                println!("adapter: {} ({}, {})", i.name, i.backend, i.device_type);
                if let Some(s) = ctx.subgroup_size() {
                    let t = portalora::ops::matmul::tuned_tile(&ctx, s);
                    println!("subgroup kernel tile (autotuned): {} rows × {} vec4 columns per lane", t.tm, t.tnv);
                }
                println!(
                    "{:>6} {:>6} {:>6}  {:<3} {:<9} {:>10} {:>10} {:>10}",
                    "M", "K", "N", "op", "path", "GFLOP/s", "min", "max"
                );
            }
            for shape in shapes {
                let r = bench_matmul(&ctx, shape, path, repeats, seconds)?;
                let path = format!("{:?}", r.path).to_lowercase();
                if json {
                    println!(
                        "{{\"m\": {}, \"k\": {}, \"n\": {}, \"op\": \"{}\", \"path\": \"{}\", \"gflops\": {:.3}, \"min\": {:.3}, \"max\": {:.3}}}",
                        shape.m, shape.k, shape.n, shape.op(), path, r.median(), r.min(), r.max()
                    );
                } else {
                    println!(
                        "{:>6} {:>6} {:>6}  {:<3} {:<9} {:>10.2} {:>10.2} {:>10.2}",
                        shape.m,
                        shape.k,
                        shape.n,
                        shape.op(),
                        path,
                        r.median(),
                        r.min(),
                        r.max()
                    );
                }
            }
            Ok(())
        }
    }
}

fn bench_step(ctx: &Context, a: BenchStepArgs) -> Result<(), Box<dyn std::error::Error>> {
    use portalora::adapter::{AdapterConfig, Method};
    use portalora::bench::StepOptions;
    let method: Method = a.method.parse()?;
    let base_dtype: portalora::model::BaseDType = a.base_dtype.parse()?;
    let weights = portalora::model::load_model(&a.model)?;
    let mut cfg = AdapterConfig::new(method);
    cfg.rank = a.rank;
    cfg.alpha = 2.0 * a.rank as f64;
    cfg.targets = if a.targets.is_empty() { portalora::adapter::all_targets(weights.config.arch) } else { a.targets };
    let train = portalora::train::TrainConfig { base_dtype, recompute_mlp: a.recompute_mlp, ..Default::default() };
    let opts = StepOptions { batch: a.batch, seq: a.seq, steps: a.steps, warmup: a.warmup, kernels: !a.no_kernels };
    let i = ctx.info();
    let model_name = a.model.display().to_string();
    eprintln!("adapter: {} ({}, {})", i.name, i.backend, i.device_type);
    eprintln!(
        "model: {model_name}; {method} r = {} on {}; batch {} × {} tokens; base {base_dtype}{}",
        cfg.rank,
        cfg.targets.join(","),
        a.batch,
        a.seq,
        if a.recompute_mlp { "; MLP recomputed in backward" } else { "" }
    );
    let total = a.warmup + a.steps;
    let r = portalora::bench::bench_step(ctx, &weights, &cfg, &train, &opts, |k, s| {
        let what = if k < a.warmup { " (warm-up)" } else { "" };
        eprintln!("step {}/{total}: {s:.3} s{what}", k + 1);
    })?;
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    let kinds = ["weights", "adapters", "optimizer", "activations", "other"];
    let b = |k: &str| r.gpu_bytes.get(k).copied().unwrap_or(0);
    println!("tokens/s: {:.2} (median step {:.3} s over {} steps)", r.tokens_per_s(), r.median_seconds(), a.steps);
    println!("trainable parameters: {}", r.trainable);
    println!("GPU memory allocated:");
    for k in kinds {
        println!("  {k:<12} {:>10.2} MiB", mib(b(k)));
    }
    println!("  {:<12} {:>10.2} MiB", "total", mib(kinds.iter().map(|k| b(k)).sum()));
    println!("  kept for backward (part of activations): {:.2} MiB", mib(r.kept_bytes));
    println!(
        "  model activations + gradients, buffers shared by lifetime: {:.2} MiB (one buffer per tensor: {:.2} MiB)",
        mib(r.planned_bytes),
        mib(r.unshared_bytes)
    );
    if !r.kernels.is_empty() {
        let how = if r.timestamps { "GPU timestamps" } else { "wall clock per dispatch" };
        println!("one step's kernels ({how}; {:.3} s in all):", r.kernel_seconds);
        println!("{:>9} {:>6} {:>6}  kernel [workgroups]", "seconds", "%", "count");
        for k in r.kernels.iter().take(a.top) {
            println!("{:>9.4} {:>5.1}% {:>6}  {}", k.seconds, 100.0 * k.seconds / r.kernel_seconds, k.count, k.label);
        }
    }
    if a.json {
        let kernels: Vec<serde_json::Value> = r
            .kernels
            .iter()
            .map(|k| serde_json::json!({"kernel": k.label, "seconds": k.seconds, "count": k.count}))
            .collect();
        let j = serde_json::json!({
            "tokens_per_s": r.tokens_per_s(),
            "step_seconds": r.median_seconds(),
            "steps": r.step_seconds,
            "gpu_bytes": serde_json::Value::Object(kinds.iter().map(|k| (k.to_string(), b(k).into())).collect()),
            "kept_bytes": r.kept_bytes,
            "planned_bytes": r.planned_bytes,
            "unshared_bytes": r.unshared_bytes,
            "trainable": r.trainable,
            "model": model_name,
            "method": method.name(),
            "rank": cfg.rank,
            "batch": a.batch,
            "seq": a.seq,
            "base_dtype": base_dtype.to_string(),
            "recompute_mlp": a.recompute_mlp,
            "adapter": i.name,
            "kernel_seconds": r.kernel_seconds,
            "kernels": kernels,
        });
        println!("{j}");
    }
    Ok(())
}

fn info(ctx: &Context, json: bool) -> Result<(), Box<dyn std::error::Error>> {
    let i = ctx.info();
    let f = ctx.features();
    let l = ctx.limits();
    if json {
        println!(
            "{{\"name\": {:?}, \"backend\": {:?}, \"device_type\": {:?}, \"driver\": {:?}, \"driver_info\": {:?}, \
             \"subgroups\": {}, \"subgroup_min_size\": {}, \"subgroup_max_size\": {}, \"shader_f16\": {}, \"timestamps\": {}, \
             \"max_storage_binding\": {}, \"max_buffer\": {}, \"max_workgroup_storage\": {}, \"max_invocations_per_workgroup\": {}, \
             \"max_workgroups_per_dimension\": {}, \"max_storage_buffers_per_stage\": {}}}",
            i.name, i.backend, i.device_type, i.driver, i.driver_info, f.subgroups, i.subgroup_min_size, i.subgroup_max_size,
            f.shader_f16, f.timestamps, l.max_storage_binding, l.max_buffer, l.max_workgroup_storage,
            l.max_invocations_per_workgroup, l.max_workgroups_per_dimension, l.max_storage_buffers_per_stage
        );
        return Ok(());
    }
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    println!("adapter:        {}", i.name);
    println!("backend:        {}", i.backend);
    println!("device type:    {}", i.device_type);
    println!("driver:         {} {}", i.driver, i.driver_info);
    println!("features:");
    println!("  subgroups:    {} (sizes {}..={})", f.subgroups, i.subgroup_min_size, i.subgroup_max_size);
    println!("  shader-f16:   {}", f.shader_f16);
    println!("  timestamps:   {}", f.timestamps);
    println!("limits:");
    println!("  storage binding:        {:.0} MiB", mib(l.max_storage_binding));
    println!("  buffer size:            {:.0} MiB", mib(l.max_buffer));
    println!("  workgroup storage:      {} KiB", l.max_workgroup_storage / 1024);
    println!("  invocations/workgroup:  {}", l.max_invocations_per_workgroup);
    println!("  workgroups/dimension:   {}", l.max_workgroups_per_dimension);
    println!("  storage buffers/stage:  {}", l.max_storage_buffers_per_stage);
    Ok(())
}

fn inspect(path: &std::path::Path) -> Result<(), Box<dyn std::error::Error>> {
    let w = portalora::model::load_model(path)?;
    let c = &w.config;
    println!("model:          {}", path.display());
    println!("architecture:   {:?}", c.arch);
    println!("parameters:     {} ({:.1} M)", c.num_parameters(), c.num_parameters() as f64 / 1e6);
    println!("vocab:          {}", c.vocab_size);
    println!("layers:         {}", c.num_layers);
    println!("hidden:         {}", c.hidden_size);
    println!("heads:          {} (kv {}, head dim {})", c.num_heads, c.num_kv_heads, c.head_dim);
    println!("mlp:            {}", c.intermediate_size);
    println!("context:        {}", c.max_positions);
    println!("norm eps:       {:e}", c.norm_eps);
    if c.arch == portalora::model::Arch::Llama {
        println!("rope theta:     {}", c.rope_theta);
    }
    println!("tied head:      {}", c.tie_embeddings);
    println!("tensors:        {}", w.tensors.len());
    Ok(())
}

/// Token rows from `--ids` or from `--data` cut into rows of `seq`.
fn read_rows(
    model: &Path,
    ids: Option<&Path>,
    data: Option<&Path>,
    seq: usize,
) -> Result<Vec<Vec<u32>>, Box<dyn std::error::Error>> {
    Ok(match (ids, data) {
        (Some(p), _) => portalora::finetune::read_ids(p)?,
        (None, Some(p)) => {
            let text = std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()))?;
            let text = String::from_utf8(text).map_err(|e| {
                format!("{}: not UTF-8 text (first bad byte at {})", p.display(), e.utf8_error().valid_up_to())
            })?;
            let tok = portalora::io::tokenizer::Tokenizer::for_model(model)?;
            let all = tok.encode(&text)?;
            if seq < 2 {
                return Err("--seq must be at least 2".into());
            }
            let rows: Vec<Vec<u32>> = all.chunks_exact(seq).map(<[u32]>::to_vec).collect();
            if rows.is_empty() {
                return Err(format!(
                    "{}: {} tokens do not fill one row of --seq {seq}; use a smaller --seq",
                    p.display(),
                    all.len()
                )
                .into());
            }
            eprintln!("{}: {} tokens, {} rows of {seq}", p.display(), all.len(), rows.len());
            rows
        }
        (None, None) => return Err("give --ids FILE.json or --data FILE.txt".into()),
    })
}

#[allow(clippy::too_many_arguments)] // one argument per command-line flag
fn eval(
    ctx: &Context,
    model: &Path,
    ids: Option<&Path>,
    data: Option<&Path>,
    seq: usize,
    batch: usize,
    adapter: Option<&Path>,
    json: bool,
) -> Result<(), Box<dyn std::error::Error>> {
    let rows = read_rows(model, ids, data, seq)?;
    let weights = portalora::model::load_model(model)?;
    let seq = rows[0].len();
    let batch = batch.clamp(1, rows.len());
    let gpu = match adapter {
        Some(dir) => portalora::train::model_with_adapter(ctx, &weights, batch, seq, dir)?,
        None => portalora::model::gpu::GpuModel::new(ctx, &weights, batch, seq)?,
    };
    let (mut sum, mut count) = (0.0f64, 0usize);
    for chunk in rows.chunks(batch) {
        let (s, n) = gpu.loss_sum(ctx, chunk)?;
        sum += s;
        count += n;
    }
    let loss = sum / count as f64;
    if json {
        println!("{{\"loss\": {loss}, \"tokens\": {count}}}");
    } else {
        println!("loss {loss:.6} over {count} predicted tokens (perplexity {:.3})", loss.exp());
    }
    Ok(())
}

fn generate(
    ctx: &Context,
    model: &Path,
    prompt: &str,
    max_tokens: usize,
    sampling: portalora::model::generate::Sampling,
    adapter: Option<&Path>,
) -> Result<(), Box<dyn std::error::Error>> {
    use std::io::Write;
    if !(sampling.temperature >= 0.0 && sampling.temperature.is_finite()) {
        return Err(format!("--temperature {} must be 0 or positive", sampling.temperature).into());
    }
    if !(sampling.top_p > 0.0 && sampling.top_p <= 1.0) {
        return Err(format!("--top-p {} must be in (0, 1]", sampling.top_p).into());
    }
    let tok = portalora::io::tokenizer::Tokenizer::for_model(model)?;
    let weights = portalora::model::load_model(model)?;
    let ids = tok.encode(prompt)?;
    if ids.is_empty() {
        return Err("the prompt is empty".into());
    }
    // With an adapter, its ΔW is merged into the weights on the GPU: generation then runs the
    // plain model, exactly as PEFT's merged inference.
    let merged = match adapter {
        Some(dir) => {
            let mut m = portalora::train::model_with_adapter(ctx, &weights, 1, 2, dir)?;
            m.merge(ctx)?;
            Some(m)
        }
        None => None,
    };
    let uploaded;
    let params = match &merged {
        Some(m) => &m.params,
        None => {
            uploaded = portalora::model::gpu::ParameterTensors::upload(ctx, &weights)?;
            &uploaded
        }
    };
    let max_len = (ids.len() + max_tokens).min(weights.config.max_positions);
    let mut gen = portalora::model::generate::Generator::new(ctx, &weights.config, params, max_len)?;
    let mut out = std::io::stdout().lock();
    write!(out, "{prompt}")?;
    out.flush()?;
    // Decode the whole continuation each time and print what is new, so that multi-byte
    // characters split across tokens come out whole.
    let mut new_ids = Vec::new();
    let mut printed = 0;
    let mut err = None;
    gen.generate(ctx, &ids, max_tokens, sampling, tok.eos_id, |t| {
        new_ids.push(t);
        match tok.decode(&new_ids) {
            Ok(text) if !text.ends_with('\u{fffd}') => {
                let _ = write!(out, "{}", &text[printed.min(text.len())..]);
                let _ = out.flush();
                printed = text.len();
            }
            Ok(_) => {}
            Err(e) => err = Some(e),
        }
    })?;
    writeln!(out)?;
    if let Some(e) = err {
        return Err(e.into());
    }
    Ok(())
}
