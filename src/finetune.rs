//! A whole fine-tuning run, as `portalora train` does it and as an app embeds it: read the data,
//! train for some steps or epochs (with gradient accumulation), evaluate on the validation rows
//! every N steps, write checkpoints every N steps, resume from one exactly, and at the end write
//! the adapter, the JSONL log, a loss-curve image and samples before and after.
//!
//! ```no_run
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use portalora::adapter::{AdapterConfig, Method};
//! use portalora::finetune::{run, Event, RunConfig};
//! let ctx = pollster::block_on(portalora::gpu::Context::new())?;
//! let mut cfg = RunConfig::new("SmolLM2-135M-Instruct.Q4_1.gguf", "out");
//! cfg.data = Some("hamlet.txt".into());
//! cfg.adapter = AdapterConfig { rank: 8, alpha: 16.0, targets: vec!["q_proj".into(), "v_proj".into()], ..AdapterConfig::new(Method::Lora) };
//! cfg.steps = Some(100);
//! let summary = run(&ctx, &cfg, false, &mut |e: &Event| {
//!     if let Event::Step { stats, .. } = e {
//!         println!("step {} loss {:.4}", stats.step, stats.loss);
//!     }
//! })?;
//! println!("adapter in {}", summary.adapter_dir.display());
//! # Ok(()) }
//! ```
//!
//! Files under `out`: `run.json` (this run's configuration; `--resume` reads it),
//! `checkpoint/` (the last good checkpoint: the adapter in PEFT's format, `optimizer.safetensors`
//! with the optimizer's moments — and Delta-LoRA's moved weights — and `state.json` with the step,
//! the rows read and the history), `log.jsonl` (one line per step and per evaluation),
//! `loss.svg`, and the final adapter (`adapter_config.json` + `adapter_model.safetensors`; for
//! Delta-LoRA a merged Hugging Face folder with the adapter in `out/adapter`). Checkpoints are
//! written to `checkpoint.tmp/`, synced and renamed over the previous one, so a crash at any
//! moment leaves the last good checkpoint intact.
//!
//! Reproducibility: the data order is a seeded shuffle per epoch, the dropout masks a hash of the
//! seed and the step, and the GPU kernels are deterministic, so a resumed run reproduces the
//! uninterrupted one's losses and adapter bit for bit on the same device.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::adapter::peft::{safetensors_bytes, write_atomic, PeftFile};
use crate::adapter::{AdapterConfig, AdapterError, Method};
use crate::data::{self, DataError, DataSummary, Order, Row};
use crate::gpu::Context;
use crate::io::tokenizer::Tokenizer;
use crate::model::export::{read_back_site_weights, write_hf_folder};
use crate::model::generate::{Generator, Sampling};
use crate::model::weights::{read_safetensors, Weights};
use crate::train::{Batch, StepStats, TrainConfig, TrainError, Trainer};

#[derive(Debug, thiserror::Error)]
pub enum FinetuneError {
    #[error(transparent)]
    Train(#[from] TrainError),
    #[error(transparent)]
    Data(#[from] DataError),
    #[error(transparent)]
    Adapter(#[from] AdapterError),
    #[error(transparent)]
    Model(#[from] crate::model::ModelError),
    #[error(transparent)]
    GpuModel(#[from] crate::model::gpu::GpuModelError),
    #[error(transparent)]
    Gpu(#[from] crate::gpu::GpuError),
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("{0}")]
    Config(String),
    #[error(
        "step {step}: {what} is not finite (NaN or Inf); the run stopped before saving anything from it{kept}. \
         Lower the learning rate or clip gradients (--max-grad-norm), check the data, then --resume"
    )]
    NonFinite { step: u64, what: String, kept: String },
}

pub type Result<T> = std::result::Result<T, FinetuneError>;

/// A micro-batch's rows: token ids and loss masks.
type Micro = (Vec<Vec<u32>>, Vec<Vec<bool>>);

fn file_err(path: &Path, message: impl std::fmt::Display) -> FinetuneError {
    FinetuneError::File { path: path.to_path_buf(), message: message.to_string() }
}

/// Everything a run needs; saved as `out/run.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunConfig {
    /// The base model: a .gguf file or a Hugging Face folder.
    pub model: PathBuf,
    /// `{"input_ids": [[...], ...]}`: every step trains on all these rows, in order.
    pub ids: Option<PathBuf>,
    /// A text file, a folder of text files, or JSONL.
    pub data: Option<PathBuf>,
    pub adapter: AdapterConfig,
    pub train: TrainConfig,
    /// Rows per micro-batch (with `ids`: the file's rows / grad_accum).
    pub batch: usize,
    /// Tokens per row (with `ids`: the file's row length).
    pub seq: usize,
    /// Optimizer steps; or `epochs` over the training rows.
    pub steps: Option<u64>,
    pub epochs: Option<f64>,
    /// Fraction of the data's rows kept for validation.
    pub val_fraction: f64,
    /// At most this many validation rows are evaluated (0: all).
    pub val_rows: usize,
    /// Evaluate every N steps (0: only before and after).
    pub eval_every: u64,
    /// Write a checkpoint every N steps (0: never).
    pub save_every: u64,
    /// Shuffle the training rows each epoch.
    pub shuffle: bool,
    pub init_adapter: Option<PathBuf>,
    pub out: PathBuf,
    /// The JSONL log (default `out/log.jsonl`).
    pub log_json: Option<PathBuf>,
    /// Prompts sampled before and after training (greedy).
    pub prompts: Vec<String>,
    pub sample_tokens: usize,
}

impl RunConfig {
    /// Defaults: LoRA (r = 8, alpha = 8) with AdamW at 2e-4, batch 4 × seq 128, 10% validation.
    pub fn new(model: impl Into<PathBuf>, out: impl Into<PathBuf>) -> Self {
        RunConfig {
            model: model.into(),
            ids: None,
            data: None,
            adapter: AdapterConfig::new(Method::Lora),
            train: TrainConfig::default(),
            batch: 4,
            seq: 128,
            steps: None,
            epochs: None,
            val_fraction: 0.1,
            val_rows: 0,
            eval_every: 0,
            save_every: 0,
            shuffle: true,
            init_adapter: None,
            out: out.into(),
            log_json: None,
            prompts: Vec::new(),
            sample_tokens: 32,
        }
    }

    /// The configuration of an earlier run from its `out` folder.
    pub fn load(out: &Path) -> Result<Self> {
        let path = out.join("run.json");
        let text = std::fs::read_to_string(&path)
            .map_err(|e| file_err(&path, format!("{e}; is {} the --out of an earlier run?", out.display())))?;
        serde_json::from_str(&text).map_err(|e| file_err(&path, format!("not a run configuration: {e}")))
    }

    fn log_path(&self) -> PathBuf {
        self.log_json.clone().unwrap_or_else(|| self.out.join("log.jsonl"))
    }
}

/// What happened, as it happens (for progress displays).
#[derive(Debug)]
pub enum Event<'a> {
    /// The data was read.
    Data(&'a DataSummary),
    /// The model and adapter are ready.
    Started {
        trainable: usize,
        kept_bytes: u64,
        model_kept_bytes: u64,
        steps: u64,
        first_step: u64,
    },
    /// Greedy continuations of the prompts: before training (the base model) or after.
    Samples {
        after: bool,
        samples: &'a [(String, String)],
    },
    Step {
        stats: &'a StepStats,
        steps: u64,
        elapsed_s: f64,
        eta_s: f64,
        tokens_per_s: f64,
    },
    Eval {
        step: u64,
        val_loss: f64,
    },
    Checkpoint {
        step: u64,
        dir: &'a Path,
    },
}

/// The outcome of a run.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Summary {
    pub steps: u64,
    pub val_before: Option<f64>,
    pub val_after: Option<f64>,
    pub train_loss: Vec<(u64, f64)>,
    pub val_loss: Vec<(u64, f64)>,
    pub samples_before: Vec<(String, String)>,
    pub samples_after: Vec<(String, String)>,
    pub adapter_dir: PathBuf,
    pub plot: PathBuf,
    pub log: PathBuf,
    pub seconds: f64,
    pub data: Option<DataSummary>,
}

/// What a checkpoint's `state.json` holds.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct State {
    step: u64,
    /// Training rows read so far (the data order's whole state).
    rows_read: u64,
    summary: Summary,
}

/// Rows for training and validation, each with its loss mask (None: all predicted).
struct Data {
    train: Vec<Row>,
    val: Vec<Row>,
    masked: bool,
    summary: Option<DataSummary>,
}

/// Reads `{"input_ids": [[...], ...]}`: rows of equal length, at least 2 tokens each.
pub fn read_ids(path: &Path) -> Result<Vec<Vec<u32>>> {
    let text = std::fs::read_to_string(path).map_err(|e| file_err(path, e))?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| file_err(path, format!("not JSON: {e}")))?;
    let rows = v["input_ids"].as_array().ok_or_else(|| file_err(path, "expected {\"input_ids\": [[...], ...]}"))?;
    let mut out = Vec::with_capacity(rows.len());
    for (r, row) in rows.iter().enumerate() {
        let row = row.as_array().ok_or_else(|| file_err(path, format!("input_ids[{r}] is not a list")))?;
        let ids = row
            .iter()
            .enumerate()
            .map(|(i, x)| {
                x.as_u64()
                    .filter(|&x| x <= u32::MAX as u64)
                    .map(|x| x as u32)
                    .ok_or_else(|| file_err(path, format!("input_ids[{r}][{i}] = {x} is not a token id")))
            })
            .collect::<Result<Vec<u32>>>()?;
        out.push(ids);
    }
    let len = out.first().map(Vec::len).unwrap_or(0);
    if len < 2 {
        return Err(file_err(path, "rows need at least 2 tokens to predict one"));
    }
    if let Some(r) = out.iter().position(|row| row.len() != len) {
        return Err(file_err(
            path,
            format!(
                "input_ids[{r}] has {} tokens but input_ids[0] has {len}; rows must be of equal length",
                out[r].len()
            ),
        ));
    }
    Ok(out)
}

fn load_data(cfg: &RunConfig, tok: Option<&Tokenizer>, model: &crate::model::ModelConfig) -> Result<Data> {
    match (&cfg.ids, &cfg.data) {
        (Some(p), _) => {
            let rows = read_ids(p)?;
            for (r, row) in rows.iter().enumerate() {
                if let Some((i, id)) = row.iter().enumerate().find(|(_, &id)| id as usize >= model.vocab_size) {
                    return Err(file_err(
                        p,
                        format!(
                            "input_ids[{r}][{i}] = {id} is outside the model's vocabulary of {} tokens",
                            model.vocab_size
                        ),
                    ));
                }
            }
            if rows[0].len() > model.max_positions {
                return Err(file_err(
                    p,
                    format!(
                        "rows of {} tokens exceed the model's context of {} positions",
                        rows[0].len(),
                        model.max_positions
                    ),
                ));
            }
            let train = rows.into_iter().map(|ids| Row { predict: vec![true; ids.len()], ids }).collect();
            Ok(Data { train, val: Vec::new(), masked: false, summary: None })
        }
        (None, Some(p)) => {
            if cfg.seq > model.max_positions {
                return Err(FinetuneError::Config(format!(
                    "--seq {} exceeds the model's context of {} positions; use --seq {} or less",
                    cfg.seq, model.max_positions, model.max_positions
                )));
            }
            let tok = tok.ok_or_else(|| {
                file_err(&cfg.model, "has no tokenizer (tokenizer.json or vocab.json + merges.txt); use --ids")
            })?;
            let ds = data::load(p, tok, cfg.seq, cfg.val_fraction, cfg.adapter.seed)?;
            let masked = ds.summary.target_tokens < ds.summary.tokens;
            Ok(Data { train: ds.train, val: ds.val, masked, summary: Some(ds.summary) })
        }
        (None, None) => {
            Err(FinetuneError::Config("give --ids FILE.json or --data FILE (text, folder or JSONL)".into()))
        }
    }
}

/// Greedy continuations of `prompts` by the model's current weights (`params`).
fn samples(
    ctx: &Context,
    w: &Weights,
    params: &crate::model::gpu::ParameterTensors,
    tok: &Tokenizer,
    prompts: &[String],
    n: usize,
) -> Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    for p in prompts {
        let ids = tok.encode(p).map_err(|e| FinetuneError::Config(format!("prompt {p:?}: {e}")))?;
        if ids.is_empty() {
            continue;
        }
        let max_len = (ids.len() + n).min(w.config.max_positions);
        let mut g = Generator::new(ctx, &w.config, params, max_len)?;
        let mut new = Vec::new();
        g.generate(ctx, &ids, n, Sampling { temperature: 0.0, top_k: 0, top_p: 1.0, seed: 0 }, tok.eos_id, |t| {
            new.push(t)
        })?;
        let text = tok.decode(&new).map_err(|e| FinetuneError::Config(e.to_string()))?;
        out.push((p.clone(), text));
    }
    Ok(out)
}

/// Writes a folder's files through `dir.tmp` and renames it over `dir` (the old one is removed
/// only after the new one is in place).
fn write_dir_atomic(dir: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let tmp = dir.with_extension("tmp");
    let old = dir.with_extension("old");
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| file_err(&tmp, e))?;
    write(&tmp)?;
    if dir.exists() {
        let _ = std::fs::remove_dir_all(&old);
        std::fs::rename(dir, &old).map_err(|e| file_err(dir, e))?;
    }
    std::fs::rename(&tmp, dir).map_err(|e| file_err(dir, e))?;
    let _ = std::fs::remove_dir_all(&old);
    Ok(())
}

fn save_checkpoint(ctx: &Context, cfg: &RunConfig, trainer: &Trainer, state: &State) -> Result<PathBuf> {
    let dir = cfg.out.join("checkpoint");
    write_dir_atomic(&dir, |tmp| {
        trainer.save_adapter(ctx, &cfg.model.display().to_string(), tmp)?;
        let opt = trainer.optimizer_state(ctx)?;
        write_atomic(&tmp.join("optimizer.safetensors"), &safetensors_bytes(&opt)?)?;
        let json = serde_json::to_string_pretty(state).map_err(|e| FinetuneError::Config(e.to_string()))?;
        write_atomic(&tmp.join("state.json"), json.as_bytes())?;
        Ok(())
    })?;
    Ok(dir)
}

/// The checkpoint folder of `out` (or its `.old` twin when a crash came between the renames).
fn checkpoint_dir(out: &Path) -> Option<PathBuf> {
    let dir = out.join("checkpoint");
    let old = dir.with_extension("old");
    [dir, old].into_iter().find(|d| d.join("state.json").exists())
}

/// Writes one JSON line.
fn log_line(log: &mut std::fs::File, v: serde_json::Value) -> Result<()> {
    writeln!(log, "{v}").map_err(|e| FinetuneError::Config(format!("writing the log: {e}")))
}

/// Runs (or, with `resume`, continues from `cfg.out`'s last checkpoint) a fine-tuning run.
pub fn run(ctx: &Context, cfg: &RunConfig, resume: bool, on: &mut dyn FnMut(&Event)) -> Result<Summary> {
    let start = Instant::now();
    let weights = crate::model::load_model(&cfg.model)?;
    let tok = Tokenizer::for_model(&cfg.model).ok();
    let data = load_data(cfg, tok.as_ref(), &weights.config)?;
    if let Some(s) = &data.summary {
        on(&Event::Data(s));
    }
    let k = cfg.train.grad_accum.max(1);
    let (batch, seq) = if cfg.ids.is_some() {
        let n = data.train.len();
        if n % k != 0 {
            return Err(FinetuneError::Config(format!(
                "{n} rows in the --ids file do not split into {k} equal micro-batches (--grad-accum)"
            )));
        }
        (n / k, data.train[0].ids.len())
    } else {
        (cfg.batch.min(data.train.len()).max(1), cfg.seq)
    };
    let rows_per_step = (batch * k) as u64;
    let steps = match (cfg.steps, cfg.epochs) {
        (Some(s), _) if s > 0 => s,
        (None, Some(e)) if e > 0.0 => ((e * data.train.len() as f64) / rows_per_step as f64).ceil().max(1.0) as u64,
        _ => return Err(FinetuneError::Config("give --steps N (1 or more) or --epochs E".into())),
    };

    // Where we start: fresh, or from the last checkpoint.
    let (init, state) = if resume {
        let dir = checkpoint_dir(&cfg.out).ok_or_else(|| {
            file_err(
                &cfg.out,
                "has no checkpoint to resume from (checkpoint/state.json); was it run with --save-every?",
            )
        })?;
        let text = std::fs::read_to_string(dir.join("state.json")).map_err(|e| file_err(&dir, e))?;
        let state: State = serde_json::from_str(&text).map_err(|e| file_err(&dir.join("state.json"), e))?;
        (Some(PeftFile::read(&dir)?), Some((dir, state)))
    } else {
        (cfg.init_adapter.as_deref().map(PeftFile::read).transpose()?, None)
    };
    let mut tc = cfg.train.clone();
    if tc.total_steps == 0 {
        tc.total_steps = steps; // the schedule's length, once the data fixed it (--epochs)
    }
    let mut trainer = Trainer::new(ctx, &weights, batch, seq, &cfg.adapter, &tc, init.as_ref())?;
    let mut summary = Summary { data: data.summary.clone(), ..Summary::default() };
    let mut rows_read = 0u64;
    if let Some((dir, st)) = &state {
        let mut opt = BTreeMap::new();
        read_safetensors(&dir.join("optimizer.safetensors"), &mut opt)?;
        trainer.load_optimizer_state(ctx, &opt, st.step)?;
        rows_read = st.rows_read;
        summary = st.summary.clone();
    } else {
        std::fs::create_dir_all(&cfg.out).map_err(|e| file_err(&cfg.out, e))?;
        let json = serde_json::to_string_pretty(cfg).map_err(|e| FinetuneError::Config(e.to_string()))?;
        write_atomic(&cfg.out.join("run.json"), json.as_bytes())?;
    }
    let first = trainer.step + 1;
    // The step of the checkpoint on disk (named when a later step fails).
    let mut last_checkpoint: Option<u64> = if resume { Some(trainer.step) } else { None };
    on(&Event::Started {
        trainable: trainer.trainable_parameters(),
        kept_bytes: trainer.kept_bytes(),
        model_kept_bytes: trainer.model.acts.kept_bytes,
        steps,
        first_step: first,
    });

    // The log: rewritten from the history on resume (lines after the checkpoint are dropped).
    let log_path = cfg.log_path();
    let mut log = std::fs::File::create(&log_path).map_err(|e| file_err(&log_path, e))?;
    for &(s, l) in &summary.train_loss {
        log_line(&mut log, serde_json::json!({"step": s, "loss": l}))?;
    }
    for &(s, l) in &summary.val_loss {
        log_line(&mut log, serde_json::json!({"step": s, "val_loss": l}))?;
    }

    let val: Vec<Row> = match cfg.val_rows {
        0 => data.val.clone(),
        n => data.val.iter().take(n).cloned().collect(),
    };
    let val_rows: Vec<Vec<u32>> = val.iter().map(|r| r.ids.clone()).collect();
    let val_mask: Vec<Vec<bool>> = val.iter().map(|r| r.predict.clone()).collect();
    let eval = |trainer: &Trainer| -> Result<Option<f64>> {
        if val_rows.is_empty() {
            return Ok(None);
        }
        Ok(Some(trainer.eval_loss_masked(ctx, &val_rows, data.masked.then_some(&val_mask[..]))?))
    };
    if state.is_none() {
        if let (Some(t), false) = (&tok, cfg.prompts.is_empty()) {
            summary.samples_before = samples(ctx, &weights, &trainer.model.params, t, &cfg.prompts, cfg.sample_tokens)?;
            on(&Event::Samples { after: false, samples: &summary.samples_before });
        }
        if let Some(v) = eval(&trainer)? {
            summary.val_before = Some(v);
            summary.val_loss.push((0, v));
            log_line(&mut log, serde_json::json!({"step": 0, "val_loss": v}))?;
            on(&Event::Eval { step: 0, val_loss: v });
        }
    }

    let mut order = Order::new(data.train.len(), cfg.adapter.seed, cfg.shuffle && cfg.ids.is_none());
    let loop_start = Instant::now();
    let mut last_read = loop_start;
    let mut tokens = 0usize;
    for t in first..=steps {
        // Micro-batches: with --ids the file's rows in order, else the next rows of the order.
        let mut micro: Vec<Micro> = Vec::with_capacity(k);
        for m in 0..k {
            let rows: Vec<&Row> = if cfg.ids.is_some() {
                data.train[m * batch..(m + 1) * batch].iter().collect()
            } else {
                (0..batch)
                    .map(|_| {
                        let (i, _) = order.at(rows_read);
                        rows_read += 1;
                        &data.train[i]
                    })
                    .collect()
            };
            micro
                .push((rows.iter().map(|r| r.ids.clone()).collect(), rows.iter().map(|r| r.predict.clone()).collect()));
        }
        let batches: Vec<Batch> =
            micro.iter().map(|(ids, p)| Batch { ids, predict: if data.masked { Some(p) } else { None } }).collect();
        trainer.submit_step(ctx, &batches)?;
        let evaluates = (cfg.eval_every > 0 && t % cfg.eval_every == 0) || t == steps;
        let saves = cfg.save_every > 0 && t % cfg.save_every == 0 && t < steps;
        // Losses come back every `loss_every` steps (and before evaluations and checkpoints,
        // which record the history): the only time the CPU waits for the GPU.
        if trainer.losses_due() || evaluates || saves {
            let collected = trainer.collect_losses(ctx)?;
            let seconds = last_read.elapsed().as_secs_f64() / collected.len().max(1) as f64;
            last_read = Instant::now();
            for stats in collected {
                let what = if !stats.loss.is_finite() {
                    Some(format!("the loss ({})", stats.loss))
                } else {
                    stats.nonfinite_grad.map(|i| format!("the gradient of {}", trainer.params[i].name))
                };
                if let Some(what) = what {
                    let kept = match last_checkpoint {
                        Some(s) => format!(
                            "; the checkpoint of step {s} in {} is intact",
                            cfg.out.join("checkpoint").display()
                        ),
                        None => String::new(),
                    };
                    return Err(FinetuneError::NonFinite { step: stats.step, what, kept });
                }
                let s = stats.step;
                tokens += stats.tokens;
                summary.train_loss.push((s, stats.loss));
                log_line(
                    &mut log,
                    serde_json::json!({"step": s, "loss": stats.loss, "lr": stats.lr, "tokens": stats.tokens, "seconds": seconds, "grad_norm": stats.grad_norm}),
                )?;
                let elapsed = loop_start.elapsed().as_secs_f64();
                let done = (s - first + 1) as f64;
                on(&Event::Step {
                    stats: &stats,
                    steps,
                    elapsed_s: elapsed,
                    eta_s: elapsed / done * (steps - s) as f64,
                    tokens_per_s: tokens as f64 / elapsed.max(1e-9),
                });
            }
        }
        if evaluates {
            if let Some(v) = eval(&trainer)? {
                summary.val_loss.push((t, v));
                log_line(&mut log, serde_json::json!({"step": t, "val_loss": v}))?;
                on(&Event::Eval { step: t, val_loss: v });
            }
        }
        if saves {
            log.sync_all().map_err(|e| file_err(&log_path, e))?;
            let st = State { step: t, rows_read, summary: summary.clone() };
            let dir = save_checkpoint(ctx, cfg, &trainer, &st)?;
            last_checkpoint = Some(t);
            on(&Event::Checkpoint { step: t, dir: &dir });
        }
    }
    summary.steps = steps;
    summary.val_after = summary.val_loss.last().filter(|(s, _)| *s == steps).map(|&(_, v)| v);

    // The final adapter (Delta-LoRA: a merged model with the adapter beside it).
    let base_name = cfg.model.display().to_string();
    summary.adapter_dir = cfg.out.clone();
    if cfg.adapter.method == Method::DeltaLora {
        summary.adapter_dir = cfg.out.join("adapter");
        trainer.save_adapter(ctx, &base_name, &summary.adapter_dir)?;
        trainer.model.merge(ctx)?;
        let mut merged = crate::model::load_model(&cfg.model)?;
        read_back_site_weights(ctx, &trainer.model, &mut merged)?;
        write_hf_folder(&merged, &cfg.out)?;
    } else {
        trainer.save_adapter(ctx, &base_name, &cfg.out)?;
    }
    if let (Some(t), false) = (&tok, cfg.prompts.is_empty()) {
        summary.samples_after = if trainer.model.base_is_packed() {
            // A quantized base cannot take ΔW: sample from an f32 copy with the saved adapter merged.
            drop(trainer);
            let dir = &summary.adapter_dir;
            let mut m = crate::train::model_with_adapter(ctx, &weights, 1, 2, dir)?;
            m.merge(ctx)?;
            samples(ctx, &weights, &m.params, t, &cfg.prompts, cfg.sample_tokens)?
        } else {
            if cfg.adapter.method != Method::DeltaLora {
                trainer.model.merge(ctx)?;
            }
            samples(ctx, &weights, &trainer.model.params, t, &cfg.prompts, cfg.sample_tokens)?
        };
        on(&Event::Samples { after: true, samples: &summary.samples_after });
    }
    summary.plot = cfg.out.join("loss.svg");
    let title =
        format!("{} on {}", cfg.adapter.method, cfg.model.file_name().and_then(|n| n.to_str()).unwrap_or("model"));
    write_atomic(&summary.plot, crate::plot::loss_svg(&summary.train_loss, &summary.val_loss, &title).as_bytes())?;
    summary.log = log_path;
    summary.seconds = start.elapsed().as_secs_f64();
    let json = serde_json::to_string_pretty(&summary).map_err(|e| FinetuneError::Config(e.to_string()))?;
    write_atomic(&cfg.out.join("summary.json"), json.as_bytes())?;
    Ok(summary)
}
