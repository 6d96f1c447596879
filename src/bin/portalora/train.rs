//! `portalora train` and `portalora merge`.

use std::io::{IsTerminal, Write};
use std::path::Path;

use portalora::adapter::peft::PeftFile;
use portalora::adapter::{AdapterConfig, Method};
use portalora::finetune::{self, Event, RunConfig};
use portalora::gpu::Context;
use portalora::model::export::{read_back_site_weights, write_hf_folder};
use portalora::train::{model_with_adapter, OptimizerKind, TrainConfig};

use super::TrainArgs;

type Res<T> = Result<T, Box<dyn std::error::Error>>;

fn mib(b: u64) -> String {
    format!("{:.2} MiB", b as f64 / (1024.0 * 1024.0))
}

/// The adapter settings from the flags, checked against `--init-adapter`'s when given.
fn adapter_config(a: &TrainArgs, method: Method, init: Option<&PeftFile>) -> Res<AdapterConfig> {
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
        if a.targets.is_empty() {
            return Err("give --targets (e.g. --targets q_proj,v_proj), or --init-adapter DIR".into());
        }
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
        if method != Method::Vera && (al - fa).abs() > 1e-12 * fa.abs().max(1.0) {
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
    if method == Method::DeltaLora {
        cfg.dropout = 0.0;
    } else if a.dropout > 0.0 {
        cfg.dropout = a.dropout as f32;
    }
    Ok(cfg)
}

fn train_config(a: &TrainArgs, method: Method, steps: u64) -> Res<TrainConfig> {
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
        optimizer: match a.optimizer.as_str() {
            "adamw" => OptimizerKind::AdamW,
            "sgd" => OptimizerKind::Sgd,
            o => return Err(format!("--optimizer {o:?}: use adamw or sgd").into()),
        },
        lr: a.lr,
        betas: (b1, b2),
        eps: a.eps.unwrap_or(if projected { 1e-6 } else { 1e-8 }),
        weight_decay: a.weight_decay,
        momentum: a.momentum,
        max_grad_norm: a.max_grad_norm,
        schedule: a.schedule.parse()?,
        warmup_steps: a.warmup_steps as u64,
        total_steps: steps,
        lr_ratio: a.lr_ratio,
        grad_accum: a.grad_accum,
        base_dtype: a.base_dtype.parse()?,
        loss_every: a.loss_every,
        recompute_mlp: a.recompute_mlp,
    })
}

/// The run's configuration from the flags.
fn run_config(a: &TrainArgs) -> Res<RunConfig> {
    let method: Method = a.method.parse()?;
    let model = a.model.clone().ok_or("give --model MODEL (a .gguf file or a Hugging Face folder)")?;
    let out = a.out.clone().ok_or("give --out DIR (where the adapter, log and checkpoints go)")?;
    if a.ids.is_none() && a.data.is_none() {
        return Err("give --ids FILE.json or --data FILE (text, a folder of texts, or JSONL)".into());
    }
    let init = a.init_adapter.as_deref().map(PeftFile::read).transpose()?;
    let adapter = adapter_config(a, method, init.as_ref())?;
    let steps = match (a.steps, a.epochs) {
        (Some(0), _) => return Err("--steps must be at least 1".into()),
        (Some(s), _) => Some(s as u64),
        (None, Some(e)) if e > 0.0 => None,
        (None, Some(e)) => return Err(format!("--epochs {e} must be positive").into()),
        (None, None) => return Err("give --steps N or --epochs E".into()),
    };
    let mut cfg = RunConfig::new(model, out);
    cfg.ids = a.ids.clone();
    cfg.data = a.data.clone();
    // The schedule's length is fixed once the data is known (epochs): see finetune::run.
    cfg.train = train_config(a, method, steps.unwrap_or(0))?;
    cfg.adapter = adapter;
    cfg.batch = a.batch.max(1);
    cfg.seq = a.seq;
    cfg.steps = steps;
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

fn clock(s: f64) -> String {
    let s = s.max(0.0).round() as u64;
    if s >= 3600 {
        format!("{}h{:02}m", s / 3600, s / 60 % 60)
    } else if s >= 60 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{s}s")
    }
}

/// Progress on the terminal: a bar redrawn in place when stdout is a terminal; otherwise a line
/// every 5% of the run (and for every evaluation and checkpoint).
struct Progress {
    tty: bool,
    val: Option<f64>,
    bar_open: bool,
}

impl Progress {
    fn line(&mut self, text: &str) {
        if self.bar_open {
            println!();
            self.bar_open = false;
        }
        println!("{text}");
    }

    fn event(&mut self, e: &Event) {
        match e {
            Event::Data(s) => self.line(&format!("data: {s}")),
            Event::Started { trainable, kept_bytes, model_kept_bytes, steps, first_step } => {
                self.line(&format!(
                    "trainable parameters {trainable}, kept for backward {} (model {} + adapter {}), steps {first_step}..={steps}",
                    mib(*kept_bytes),
                    mib(*model_kept_bytes),
                    mib(kept_bytes - model_kept_bytes)
                ));
            }
            Event::Samples { after, samples } => {
                let when = if *after { "after training" } else { "before training (the base model)" };
                self.line(&format!("samples {when}:"));
                for (p, t) in samples.iter() {
                    self.line(&format!("  {p}▌{}", t.replace('\n', "\n  ")));
                }
            }
            Event::Step { stats, steps, eta_s, tokens_per_s, .. } => {
                let val = self.val.map(|v| format!("  val {v:.4}")).unwrap_or_default();
                let text = format!(
                    "step {}/{steps}  loss {:.4}{val}  lr {:.2e}  {:.0} tok/s  ETA {}",
                    stats.step,
                    stats.loss,
                    stats.lr,
                    tokens_per_s,
                    clock(*eta_s)
                );
                if self.tty {
                    let width = 24;
                    let done = (stats.step as usize * width / (*steps).max(1) as usize).min(width);
                    print!("\r[{}{}] {text}\x1b[K", "#".repeat(done), "-".repeat(width - done));
                    let _ = std::io::stdout().flush();
                    self.bar_open = true;
                } else if stats.step == *steps || stats.step % (steps / 20).max(1) == 0 {
                    self.line(&text);
                }
            }
            Event::Eval { step, val_loss } => {
                self.val = Some(*val_loss);
                if !self.tty || *step == 0 {
                    self.line(&format!("step {step}: validation loss {val_loss:.4}"));
                }
            }
            Event::Checkpoint { step, dir } => {
                if !self.tty {
                    self.line(&format!("step {step}: checkpoint in {}", dir.display()));
                }
            }
        }
    }
}

pub fn train(ctx: &Context, a: TrainArgs) -> Res<()> {
    let (cfg, resume) = match &a.resume {
        Some(dir) => {
            let mut cfg = RunConfig::load(dir)?;
            cfg.out = dir.clone();
            if let Some(s) = a.steps {
                cfg.steps = Some(s as u64);
                cfg.train.total_steps = s as u64;
            }
            (cfg, true)
        }
        None => (run_config(&a)?, false),
    };
    let c = &cfg.adapter;
    println!(
        "{} {} on {} ({}), r = {}{}{}",
        if resume { "resuming" } else { "training" },
        c.method,
        cfg.model.display(),
        c.targets.join(","),
        c.rank,
        if c.method == Method::Vera {
            String::new()
        } else {
            format!(", alpha = {}, scale = {:.4}", c.alpha, c.scale())
        },
        if resume { format!(" from {}", cfg.out.display()) } else { String::new() },
    );
    let mut progress = Progress { tty: std::io::stdout().is_terminal(), val: None, bar_open: false };
    let summary = finetune::run(ctx, &cfg, resume, &mut |e| progress.event(e))?;
    progress.line(&format!("done: {} steps in {}", summary.steps, clock(summary.seconds)));
    if let (Some(b), Some(a)) = (summary.val_before, summary.val_after) {
        println!("validation loss: {b:.4} before → {a:.4} after");
    }
    if cfg.adapter.method == Method::DeltaLora {
        println!("merged model:  {} (Hugging Face folder)", cfg.out.display());
    }
    println!("adapter:       {} (PEFT format)", summary.adapter_dir.display());
    println!("log:           {}", summary.log.display());
    println!("loss curve:    {}", summary.plot.display());
    Ok(())
}

pub fn merge(ctx: &Context, model: &Path, adapter: &Path, out: &Path) -> Res<()> {
    let mut weights = portalora::model::load_model(model)?;
    let mut m = model_with_adapter(ctx, &weights, 1, 2, adapter)?;
    m.merge(ctx)?;
    read_back_site_weights(ctx, &m, &mut weights)?;
    write_hf_folder(&weights, out)?;
    println!("merged {} into {} and wrote {}", adapter.display(), model.display(), out.display());
    Ok(())
}
