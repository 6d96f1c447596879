//! `portalora train` and `portalora merge`.

use std::io::Write;
use std::path::Path;
use std::time::Instant;

use portalora::adapter::peft::PeftFile;
use portalora::adapter::{AdapterConfig, Method};
use portalora::gpu::Context;
use portalora::model::export::{read_back_site_weights, write_hf_folder};
use portalora::train::{model_with_adapter, OptimizerKind, TrainConfig, Trainer};

use super::{read_rows, TrainArgs};

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
        total_steps: a.steps as u64,
        lr_ratio: a.lr_ratio,
    })
}

pub fn train(ctx: &Context, a: TrainArgs) -> Res<()> {
    let method: Method = a.method.parse()?;
    if a.steps == 0 {
        return Err("--steps must be at least 1".into());
    }
    let init = a.init_adapter.as_deref().map(PeftFile::read).transpose()?;
    let cfg = adapter_config(&a, method, init.as_ref())?;
    let tc = train_config(&a, method)?;
    let rows = read_rows(&a.model, a.ids.as_deref(), a.data.as_deref(), a.seq)?;
    let batch = match (&a.ids, a.batch) {
        (Some(_), Some(b)) if b != rows.len() => {
            return Err(format!("--batch {b}: with --ids every step uses the file's {} rows", rows.len()).into())
        }
        (Some(_), _) => rows.len(),
        (None, b) => b.unwrap_or(4).min(rows.len()).max(1),
    };
    let seq = rows[0].len();
    let weights = portalora::model::load_model(&a.model)?;
    let mut trainer = Trainer::new(ctx, &weights, batch, seq, &cfg, &tc, init.as_ref())?;
    let c = &weights.config;
    println!(
        "model {} ({:?}, {} layers), {} on {} projections ({}), r = {}{}",
        a.model.display(),
        c.arch,
        c.num_layers,
        method,
        trainer.adapter().sites().len(),
        cfg.targets.join(","),
        cfg.rank,
        if method == Method::Vera {
            String::new()
        } else {
            format!(", alpha = {}, scale = {:.4}", cfg.alpha, cfg.scale())
        }
    );
    println!(
        "trainable parameters {}, kept for backward {} (model {} + adapter {}), batch {batch} × seq {seq}",
        trainer.trainable_parameters(),
        mib(trainer.kept_bytes()),
        mib(trainer.model.acts.kept_bytes),
        mib(trainer.adapter().kept_bytes())
    );
    let mut log = match &a.log_json {
        Some(p) => Some(std::fs::File::create(p).map_err(|e| format!("{}: {e}", p.display()))?),
        None => None,
    };
    let start = Instant::now();
    let mut tokens = 0usize;
    for s in 0..a.steps {
        let batch_rows: Vec<Vec<u32>> = if a.ids.is_some() {
            rows.clone()
        } else {
            (0..batch).map(|i| rows[(s * batch + i) % rows.len()].clone()).collect()
        };
        let t0 = Instant::now();
        let st = trainer.train_step(ctx, &batch_rows)?;
        let dt = t0.elapsed().as_secs_f64();
        if !st.loss.is_finite() {
            return Err(
                format!("step {}: the loss is {}; lower --lr or enable --max-grad-norm", st.step, st.loss).into()
            );
        }
        tokens += st.tokens;
        let secs = start.elapsed().as_secs_f64();
        let eta = secs / (s + 1) as f64 * (a.steps - s - 1) as f64;
        println!(
            "step {:>5}/{}  loss {:.5}  lr {:.3e}  {:.0} tok/s  ETA {:.0}s",
            st.step,
            a.steps,
            st.loss,
            st.lr,
            tokens as f64 / secs.max(1e-9),
            eta
        );
        if let Some(f) = log.as_mut() {
            writeln!(
                f,
                "{{\"step\": {}, \"loss\": {}, \"lr\": {}, \"tokens\": {}, \"seconds\": {dt:.6}}}",
                st.step, st.loss, st.lr, st.tokens
            )?;
        }
    }
    let base_name = a.model.display().to_string();
    if method == Method::DeltaLora {
        // W0 moved: the result is a merged model; the final adapter goes beside it.
        let adapter_dir = a.out.join("adapter");
        trainer.save_adapter(ctx, &base_name, &adapter_dir)?;
        trainer.model.merge(ctx)?;
        let mut merged = weights;
        read_back_site_weights(ctx, &trainer.model, &mut merged)?;
        write_hf_folder(&merged, &a.out)?;
        println!("wrote the merged model to {} and the final adapter to {}", a.out.display(), adapter_dir.display());
    } else {
        trainer.save_adapter(ctx, &base_name, &a.out)?;
        println!("wrote the adapter to {} (PEFT format)", a.out.display());
    }
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
