//! `portalora train`.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use portalora::adapter::peft::PeftFile;
use portalora::adapter::{AdapterConfig, Method};
use portalora::finetune::{self, RunConfig, RunOptions};
use portalora::gpu::Context;
use portalora::run::DEFAULTS;
use portalora::train::{OptimizerKind, TrainConfig};

use super::progress::{clock, Progress};
use super::{flag, parse_count, parse_number, Given};

type Res<T> = Result<T, Box<dyn std::error::Error>>;

/// `portalora train`'s options. PEFT's and HF Trainer's spellings work as aliases (`--lora-r`,
/// `--lora-alpha`, `--lora-dropout`, `--max-steps`).
#[derive(clap::Args)]
pub(crate) struct TrainArgs {
    /// The base model: a .gguf file or a Hugging Face folder.
    #[arg(long)]
    model: Option<PathBuf>,
    /// A JSON file {"input_ids": [[...], ...]}: every step trains on all its rows, in order.
    #[arg(long, conflicts_with = "data")]
    ids: Option<PathBuf>,
    /// Training text: a text file, a folder of text files, or JSONL: {"text"}, {"prompt",
    /// "completion"} (the loss then masked to the completion), {"messages": [{"role", "content"}]},
    /// {"conversations": [{"from", "value"}]} (ShareGPT) or {"instruction", "input", "output"}
    /// (Alpaca); conversations are rendered with the model's chat template. Tokenized with the
    /// model's tokenizer, packed into rows of --seq tokens, split into training and validation
    /// rows, shuffled each epoch with --seed.
    #[arg(long)]
    data: Option<PathBuf>,
    /// A chat template (Jinja, as in a model's chat_template.jinja) for conversations in --data,
    /// replacing the model's own.
    #[arg(long)]
    chat_template: Option<PathBuf>,
    /// Which tokens of a conversation the loss is on: assistant (each assistant message and the
    /// end-of-turn text closing it) or all [default: assistant].
    #[arg(long, value_parser = parse_train_on)]
    train_on: Option<portalora::data::TrainOn>,
    /// One document per row (a longer one cut into pieces of --seq), padded with tokens that are
    /// never targets, instead of packing documents into rows.
    #[arg(long)]
    no_packing: bool,
    /// lora, lora-fa, vera, delta-lora, lora-plus or dora.
    #[arg(long, default_value = DEFAULTS.method)]
    method: String,
    /// Adapter rank r [default: 8; VeRA 256; or the --init-adapter's].
    #[arg(long, visible_alias = "lora-r", value_parser = parse_count)]
    rank: Option<usize>,
    /// LoRA's alpha: the branch is scaled by alpha / r [default: 8, or the --init-adapter's]. Not for VeRA.
    #[arg(long, visible_alias = "lora-alpha", value_parser = parse_number)]
    alpha: Option<f64>,
    /// rsLoRA: scale by alpha / sqrt(r).
    #[arg(long)]
    rslora: bool,
    /// Dropout on the adapter branch's input (Delta-LoRA has none) [default: 0, or the
    /// --init-adapter's lora_dropout].
    #[arg(long, visible_alias = "lora-dropout", default_value_t = DEFAULTS.dropout as f64, hide_default_value = true, value_parser = parse_number)]
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
    #[arg(long, default_value_t = DEFAULTS.lr, value_parser = parse_number)]
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
    #[arg(long, default_value_t = DEFAULTS.max_grad_norm, value_parser = parse_number)]
    max_grad_norm: f64,
    /// Learning-rate schedule: constant, linear or cosine (after --warmup-steps of linear warm-up).
    #[arg(long, default_value = DEFAULTS.schedule)]
    schedule: String,
    /// Steps of linear learning-rate warm-up.
    #[arg(long, default_value_t = DEFAULTS.warmup_steps as usize, value_parser = parse_count)]
    warmup_steps: usize,
    /// LoRA+: B (and 1-D parameters) train at lr × this ratio. With --method dora, given: LoRA+'s
    /// groups for DoRA (B and the magnitudes at lr × ratio).
    #[arg(long, default_value_t = DEFAULTS.lr_ratio, value_parser = parse_number)]
    lr_ratio: f64,
    /// Delta-LoRA's λ: W0 += λ·s·(B'A' − BA) after each step past the warm-up.
    #[arg(long, default_value_t = DEFAULTS.delta_lambda, value_parser = parse_number)]
    delta_lambda: f64,
    /// Delta-LoRA's warm-up K: W0 is updated after steps K+1, K+2, ...
    #[arg(long, default_value_t = DEFAULTS.delta_warmup as usize, value_parser = parse_count)]
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
    /// Optimizer steps (or give --epochs). With --resume: the new target (the run continues to it).
    #[arg(long, visible_alias = "max-steps", value_parser = parse_count)]
    steps: Option<usize>,
    /// Passes over the training rows (instead of --steps).
    #[arg(long, value_parser = parse_number)]
    epochs: Option<f64>,
    /// Rows per micro-batch with --data (with --ids, the file's rows / --grad-accum).
    #[arg(long, default_value_t = DEFAULTS.batch, value_parser = parse_count)]
    batch: usize,
    /// Micro-batches whose gradients are summed into each optimizer step.
    #[arg(long, default_value_t = DEFAULTS.grad_accum, value_parser = parse_count)]
    grad_accum: usize,
    /// How the frozen base is stored on the GPU: auto (a GGUF's quantized and f16 tensors stay
    /// as they are, dequantized inside the matmul), f32, f16, q8_0, q4_0, q4_1, q5_0, q5_1,
    /// q2_k, q3_k, q4_k, q5_k or q6_k.
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
    /// How the activations a layer's backward pass reads are kept after its forward pass: f32,
    /// or f16 (about half the kept bytes, rounded to f16; a value past ±65504 stops the run as a
    /// non-finite gradient).
    #[arg(long, default_value = "f32", value_parser = ["f32", "f16"])]
    activations: String,
    /// Tokens per row with --data.
    #[arg(long, default_value_t = DEFAULTS.seq, value_parser = parse_count)]
    seq: usize,
    /// Fraction of the --data rows held out for validation.
    #[arg(long, default_value_t = DEFAULTS.val_fraction, value_parser = parse_number)]
    val_fraction: f64,
    /// Evaluate at most this many validation rows (0: all).
    #[arg(long, default_value_t = DEFAULTS.val_rows, value_parser = parse_count)]
    val_rows: usize,
    /// Evaluate on the validation rows every N steps (0: only before and after training).
    #[arg(long, default_value_t = DEFAULTS.eval_every as usize, value_parser = parse_count)]
    eval_every: usize,
    /// Write a checkpoint (adapter, optimizer state, step, data position) under --out every N steps
    /// (0: only at the last step, which always writes one; so does a Ctrl-C).
    #[arg(long, default_value_t = DEFAULTS.save_every as usize, value_parser = parse_count)]
    save_every: usize,
    /// Continue the run whose --out is DIR from its last checkpoint, with its settings. Only --steps
    /// (a new target), --lr, --save-every, --eval-every and --loss-every may change.
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
    #[arg(long, default_value_t = DEFAULTS.sample_tokens, value_parser = parse_count)]
    sample_tokens: usize,
    /// Seed of the adapter's init, the data split and order, and the dropout masks.
    #[arg(long, default_value_t = DEFAULTS.seed as usize, value_parser = parse_count)]
    seed: usize,
    /// Start from the tensors of this PEFT adapter folder (or GGUF LoRA file) instead of a random
    /// init.
    #[arg(long)]
    init_adapter: Option<PathBuf>,
    /// Output folder: the adapter in PEFT's format (Delta-LoRA: a merged Hugging Face folder,
    /// with the final adapter in OUT/adapter), run.json, checkpoint/, log.jsonl, loss.svg. It must
    /// be new or empty unless --overwrite.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Replace --out whole if it already holds something (an earlier run, say).
    #[arg(long)]
    overwrite: bool,
    /// The JSONL log [default: OUT/log.jsonl]: per step {"step": s, "loss": x, "lr": lr, "tokens": n,
    /// "seconds": t, "grad_norm": g} (x is the step's forward loss before its update, g the global
    /// gradient norm before clipping), per evaluation {"step": s, "val_loss": v}.
    #[arg(long)]
    log_json: Option<PathBuf>,
}

impl TrainArgs {
    /// The paths the run reads, before anything else (also those a --resume run ignores: they
    /// are refused later, by name).
    pub(crate) fn check_inputs(&self) -> Result<(), String> {
        fn o(p: &Option<PathBuf>) -> Option<&Path> {
            p.as_deref()
        }
        super::check_inputs(&[
            ("--model", o(&self.model)),
            ("--data", o(&self.data)),
            ("--ids", o(&self.ids)),
            ("--init-adapter", o(&self.init_adapter)),
            ("--chat-template", o(&self.chat_template)),
            ("--resume", o(&self.resume)),
        ])
    }
}

/// The adapter settings from the flags, checked against `--init-adapter`'s when given.
fn adapter_config(a: &TrainArgs, given: &Given, method: Method, init: Option<&PeftFile>) -> Res<AdapterConfig> {
    let mut base = AdapterConfig::new(method);
    base.dropout = a.dropout as f32;
    base.init = a.init.parse()?;
    base.seed = a.seed as u64;
    base.vera_d_initial = a.vera_d_initial;
    base.vera_seed = a.vera_seed as u64;
    base.delta_lambda = a.delta_lambda;
    base.delta_warmup = a.delta_warmup as u64;
    base.lorafa_projected = a.lorafa_projected;
    base.rslora = a.rslora;
    let Some(f) = init else {
        base.rank = a.rank.unwrap_or(base.rank);
        base.alpha = a.alpha.unwrap_or(base.alpha);
        base.targets = a.targets.clone();
        return Ok(base);
    };
    let dir = f.dir.display();
    let mut cfg = f.adapter_config(method, &base)?;
    if let Some(r) = a.rank.filter(|&r| r != cfg.rank) {
        return Err(
            format!("--rank {r} disagrees with {dir}'s r = {}; drop --rank or use {}", cfg.rank, cfg.rank).into()
        );
    }
    if let (Some(al), Some(fa)) = (a.alpha, f.alpha) {
        if (al - fa).abs() > 1e-12 * fa.abs().max(1.0) {
            return Err(
                format!("--alpha {al} disagrees with {dir}'s lora_alpha = {fa}; drop --alpha or use {fa}").into()
            );
        }
    }
    if a.rslora && !cfg.rslora {
        return Err(format!("--rslora disagrees with {dir}'s use_rslora = false").into());
    }
    if !a.targets.is_empty() {
        let (mut want, mut have) = (a.targets.clone(), cfg.targets.clone());
        want.sort();
        have.sort();
        if want != have {
            return Err(format!(
                "--targets {} disagrees with {dir}'s target_modules {}",
                want.join(","),
                have.join(",")
            )
            .into());
        }
    }
    if given.contains("dropout") {
        // Given, even as 0, it replaces the file's lora_dropout.
        cfg.dropout = a.dropout as f32;
    } else if method == Method::DeltaLora && cfg.dropout > 0.0 {
        // The file's lora_dropout is PEFT's default for its own training; Delta-LoRA has none.
        errln!("note: {dir} has lora_dropout = {}; Delta-LoRA trains without dropout", cfg.dropout);
        cfg.dropout = 0.0;
    } else if cfg.dropout > 0.0 {
        errln!("note: dropout {} on the adapter's input, {dir}'s lora_dropout (--dropout sets another)", cfg.dropout);
    }
    Ok(cfg)
}

fn train_config(a: &TrainArgs, method: Method) -> Res<TrainConfig> {
    let betas: Vec<f64> = a
        .betas
        .split(',')
        .map(|b| b.trim().parse::<f64>().map_err(|_| format!("--betas {:?}: expected two numbers B1,B2", a.betas)))
        .collect::<Result<_, _>>()?;
    let [b1, b2] = betas[..] else {
        return Err(format!("--betas {:?}: expected two numbers B1,B2", a.betas).into());
    };
    let projected = method == Method::LoraFa && a.lorafa_projected;
    Ok(TrainConfig {
        optimizer: optimizer(a)?,
        lr: a.lr,
        betas: (b1, b2),
        eps: a.eps.unwrap_or(if projected { 1e-6 } else { 1e-8 }),
        weight_decay: a.weight_decay,
        momentum: a.momentum,
        max_grad_norm: a.max_grad_norm,
        schedule: a.schedule.parse()?,
        warmup_steps: a.warmup_steps as u64,
        // The run's length, --steps or what --epochs makes of the data (finetune::run).
        total_steps: None,
        lr_ratio: a.lr_ratio,
        grad_accum: a.grad_accum,
        base_dtype: a.base_dtype.parse()?,
        loss_every: a.loss_every,
        recompute_mlp: a.recompute_mlp,
        lora_plus: false, // see run_config
        activations_f16: a.activations == "f16",
        logit_chunk_rows: None,
    })
}

fn optimizer(a: &TrainArgs) -> Res<OptimizerKind> {
    match a.optimizer.as_str() {
        "adamw" => Ok(OptimizerKind::AdamW),
        "sgd" => Ok(OptimizerKind::Sgd),
        o => Err(format!("--optimizer {o:?}: use adamw or sgd").into()),
    }
}

/// The projections a model offers, for the hint of a missing --targets (read from its config
/// alone; None when that fails, the load then reports why).
fn model_targets(model: &Path) -> Option<String> {
    let config = if model.is_dir() {
        portalora::model::ModelConfig::from_hf_json(&model.join("config.json")).ok()?
    } else {
        portalora::model::ModelConfig::from_gguf(&portalora::io::gguf::Gguf::open(model).ok()?).ok()?
    };
    let mut t = portalora::adapter::all_targets(config.arch);
    t.push(portalora::adapter::peft::ALL_LINEAR.into());
    Some(format!("this {:?} model offers {}", config.arch, t.join(", ")))
}

/// Every required option that is missing, in one message.
fn check_required(a: &TrainArgs) -> Res<()> {
    let mut missing = Vec::new();
    if a.model.is_none() {
        missing.push("--model MODEL (a .gguf file or a Hugging Face folder)".to_string());
    }
    if a.ids.is_none() && a.data.is_none() {
        missing.push("--data FILE (text, a folder of texts, or JSONL) or --ids FILE.json".into());
    }
    if a.steps.is_none() && a.epochs.is_none() {
        missing.push("--steps N or --epochs E".into());
    }
    if a.targets.is_empty() && a.init_adapter.is_none() {
        let hint = a.model.as_deref().and_then(model_targets);
        missing.push(format!(
            "--targets LIST (the projections to adapt, e.g. q_proj,v_proj{}) or --init-adapter DIR",
            hint.map(|h| format!("; {h}")).unwrap_or_default()
        ));
    }
    if a.out.is_none() {
        missing.push("--out DIR (where the adapter, log and checkpoints go)".into());
    }
    match missing.len() {
        0 => Ok(()),
        1 => Err(format!("missing {}", missing[0]).into()),
        _ => Err(format!("missing options:\n  {}", missing.join("\n  ")).into()),
    }
}

/// Flags that this run would not use, each with who does use it: an error listing them all. The
/// method's rules are the page's too ([`portalora::run::unused_by_method`]).
fn check_unused(a: &TrainArgs, given: &Given, method: Method) -> Res<()> {
    let sgd = a.optimizer == "sgd";
    let ids = a.ids.is_some();
    let rules: [(&[&str], bool, &str); 7] = [
        (&["momentum"], !sgd, "only SGD (--optimizer sgd) uses it"),
        (&["betas", "eps"], sgd, "only AdamW uses it"),
        (&["batch", "seq", "no_shuffle"], ids, "with --ids every step trains on all the file's rows, in order"),
        (&["val_fraction", "val_rows"], ids, "--ids has no validation rows"),
        (&["chat_template", "train_on", "no_packing"], ids, "--ids holds token rows, not documents"),
        (&["sample_tokens"], a.prompt.is_empty(), "it sets the length of --prompt samples"),
        (
            &["init", "vera_d_initial", "vera_seed"],
            a.init_adapter.is_some(),
            "the adapter starts from --init-adapter's tensors and settings",
        ),
    ];
    let names: Vec<&str> = given.iter().map(String::as_str).collect();
    let by_method = portalora::run::unused_by_method(method, &names);
    // Each given flag with the first rule that finds it unused.
    let unused: Vec<String> = given
        .iter()
        .filter_map(|id| {
            let why = match by_method.iter().find(|(n, _)| n == id) {
                Some((_, why)) => *why,
                None => rules.iter().find(|(ids, unused, _)| *unused && ids.contains(&id.as_str()))?.2,
            };
            Some(format!("{}: {why}", flag(id)))
        })
        .collect();
    match unused.len() {
        0 => Ok(()),
        _ => Err(format!(
            "this run would ignore {}; drop {}",
            unused.join("; "),
            if unused.len() == 1 { "it" } else { "them" }
        )
        .into()),
    }
}

/// The run's configuration from the flags.
fn run_config(a: &TrainArgs, given: &Given) -> Res<RunConfig> {
    check_required(a)?;
    let method: Method = a.method.parse()?;
    check_unused(a, given, method)?;
    let (model, out) = (a.model.clone().expect("checked"), a.out.clone().expect("checked"));
    // First: the library refuses it too, but only after reading the data.
    if let Some(dir) = &a.init_adapter {
        portalora::adapter::peft::refuse_delta_lora_alone(dir)?;
    }
    let init = a.init_adapter.as_deref().map(PeftFile::read).transpose()?;
    let mut cfg = RunConfig::new(model, out);
    cfg.ids = a.ids.clone();
    cfg.data = a.data.clone();
    cfg.chat_template = a.chat_template.clone();
    cfg.train_on = a.train_on;
    cfg.no_packing = a.no_packing;
    cfg.train = train_config(a, method)?;
    // DoRA given --lr-ratio trains with LoRA+'s groups (the rule above refuses it elsewhere).
    cfg.train.lora_plus = method == Method::Dora && given.contains("lr_ratio");
    cfg.adapter = adapter_config(a, given, method, init.as_ref())?;
    cfg.batch = a.batch;
    cfg.seq = a.seq;
    cfg.steps = a.steps.map(|s| s as u64);
    cfg.epochs = a.epochs;
    cfg.val_fraction = a.val_fraction;
    cfg.val_rows = a.val_rows;
    cfg.eval_every = a.eval_every as u64;
    cfg.save_every = a.save_every as u64;
    cfg.shuffle = !a.no_shuffle;
    cfg.init_adapter = a.init_adapter.clone();
    cfg.log_json = a.log_json.clone();
    cfg.prompts = a.prompt.clone();
    cfg.sample_tokens = a.sample_tokens;
    Ok(cfg)
}

/// What `--resume DIR` may change: a new target and the learning rate, checkpoint, evaluation
/// and read-back intervals. Anything else would be silently ignored (the run continues with its
/// run.json), so it is refused.
const RESUME_FLAGS: [&str; 7] = ["resume", "config", "steps", "lr", "save_every", "eval_every", "loss_every"];

/// The saved configuration of the run in `dir` with the changes the flags ask for, and the
/// changes in words.
fn resume_config(a: &TrainArgs, given: &Given, dir: &Path) -> Res<(RunConfig, Vec<String>)> {
    let refused: Vec<String> =
        given.iter().filter(|id| !RESUME_FLAGS.contains(&id.as_str())).map(|id| flag(id)).collect();
    if !refused.is_empty() {
        return Err(format!(
            "{} cannot change when resuming: the run continues with the settings in {}. With --resume only \
             --steps, --lr, --save-every, --eval-every and --loss-every may be given; to train with other \
             settings, start a new run from the checkpoint: --init-adapter {}",
            refused.join(", "),
            dir.join("run.json").display(),
            dir.join("checkpoint").display()
        )
        .into());
    }
    let mut cfg = RunConfig::load(dir)?;
    cfg.out = dir.to_path_buf();
    let mut changes = Vec::new();
    if let Some(s) = a.steps.filter(|_| given.contains("steps")) {
        let (was, s) =
            (cfg.steps.map_or_else(|| format!("{} epochs", cfg.epochs.unwrap_or(0.0)), |w| w.to_string()), s as u64);
        changes.push(format!("--steps {s} (was {was}; the schedule now ends at step {s})"));
        (cfg.steps, cfg.epochs, cfg.train.total_steps) = (Some(s), None, None);
    }
    if given.contains("lr") {
        changes.push(format!("--lr {} (was {})", a.lr, cfg.train.lr));
        cfg.train.lr = a.lr;
    }
    if given.contains("save_every") {
        changes.push(format!("--save-every {} (was {})", a.save_every, cfg.save_every));
        cfg.save_every = a.save_every as u64;
    }
    if given.contains("eval_every") {
        changes.push(format!("--eval-every {} (was {})", a.eval_every, cfg.eval_every));
        cfg.eval_every = a.eval_every as u64;
    }
    if given.contains("loss_every") {
        changes.push(format!("--loss-every {} (was {})", a.loss_every, cfg.train.loss_every));
        cfg.train.loss_every = a.loss_every;
    }
    Ok((cfg, changes))
}

pub fn train(ctx: &Context, a: TrainArgs, given: &Given) -> Res<ExitCode> {
    let (cfg, resume) = match &a.resume {
        Some(dir) => {
            let (cfg, changes) = resume_config(&a, given, dir)?;
            if !changes.is_empty() {
                outln!("resuming with {}", changes.join(", "));
            }
            (cfg, true)
        }
        None => (run_config(&a, given)?, false),
    };
    let stop = super::stop::on_ctrl_c();
    let opts = RunOptions { resume, overwrite: a.overwrite, stop: Some(&stop) };
    // Inputs, the output folder and the targets are checked before the run is announced.
    finetune::check(&cfg, &opts)?;
    let c = &cfg.adapter;
    outln!(
        "{} {} on {} ({}), r = {}{}{}{}",
        if resume { "resuming" } else { "training" },
        c.method,
        cfg.model.display(),
        c.target_regex.clone().unwrap_or_else(|| c.targets.join(",")),
        c.rank,
        if c.method == Method::Vera {
            String::new()
        } else {
            format!(", alpha = {}, scale = {:.4}", c.alpha, c.scale())
        },
        if c.rank_pattern.is_empty() && c.alpha_pattern.is_empty() { "" } else { " (other ranks/alphas by pattern)" },
        if resume { format!(" from {}", cfg.out.display()) } else { String::new() },
    );
    super::output::on_closed(stop.clone());
    let mut progress = Progress::new(std::io::stdout().is_terminal());
    let summary = finetune::run_with(ctx, &cfg, opts, &mut |e| progress.event(e));
    progress.finish();
    let summary = summary?;
    let out = cfg.out.display();
    if summary.trained_steps == 0 && !summary.interrupted {
        progress.line(&format!(
            "{out} is already at step {0} of {0}: nothing to do (give --steps N above {0} to train further)",
            summary.steps
        ));
        return Ok(ExitCode::SUCCESS);
    }
    let how = if summary.interrupted { "stopped" } else { "done" };
    progress.line(&format!("{how}: {} steps in {}", summary.trained_steps, clock(summary.seconds)));
    if let (Some(b), Some(a)) = (summary.val_before, summary.val_after) {
        outln!("validation loss: {b:.4} before → {a:.4} after");
    }
    if cfg.adapter.method == Method::DeltaLora {
        outln!("merged model:  {out} (Hugging Face folder)");
    }
    outln!("adapter:       {} (PEFT format)", summary.adapter_dir.display());
    outln!("log:           {}", summary.log.display());
    outln!("loss curve:    {}", summary.plot.display());
    if summary.interrupted {
        let steps = cfg.steps.map_or_else(String::new, |s| format!(" of {s}"));
        outln!(
            "stopped at step {}{steps}: the checkpoint is in {}, the adapter so far in {}. Continue with:\n  \
             portalora train --resume {out}",
            summary.steps,
            cfg.out.join("checkpoint").display(),
            summary.adapter_dir.display()
        );
        return Ok(ExitCode::from(130));
    }
    Ok(ExitCode::SUCCESS)
}

fn parse_train_on(s: &str) -> Result<portalora::data::TrainOn, String> {
    s.parse()
}
