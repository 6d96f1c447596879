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
//! Files under `out`: `run.json` (this run's configuration, with its current target; `--resume`
//! reads it), `checkpoint/` (the last good checkpoint, see [`checkpoint`]), `log.jsonl` (one line
//! per step and per evaluation), `loss.svg`, `summary.json`, and the adapter
//! (`adapter_config.json` + `adapter_model.safetensors`; for Delta-LoRA a merged Hugging Face
//! folder with the adapter in `out/adapter`).
//!
//! Work is never lost or clobbered: a folder that holds anything is refused unless
//! [`RunOptions::overwrite`] (then it is replaced whole), an input is never the output, a lock
//! keeps a second process out (see [`crate::outdir`]); checkpoints come every
//! [`RunConfig::save_every`] steps and always at the last step; [`RunOptions::stop`] ends a run
//! after its current step with a checkpoint and the adapter so far; a resumed run only moves
//! forward (its target is recorded in `run.json`, and an adapter is never replaced by an older
//! one).
//!
//! Reproducibility: the data order is a seeded shuffle per epoch, the dropout masks a hash of the
//! seed and the step, and the GPU kernels are deterministic, so a resumed run reproduces the
//! uninterrupted one's losses and adapter bit for bit on the same device.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::adapter::peft::{write_atomic, PeftFile};
use crate::adapter::{AdapterConfig, Method};
use crate::data::DataSummary;
use crate::gpu::Context;
use crate::io::tokenizer::Tokenizer;
use crate::model::export::{read_back_site_weights, write_hf_folder};
use crate::model::weights::Weights;
use crate::outdir;
use crate::run::{fit_length, Plan, RunState, DEFAULTS};
use crate::train::{Batch, StepStats, TrainConfig, Trainer};

pub mod checkpoint;
mod checks;
mod error;
mod inputs;

pub use checkpoint::checkpoint_step;
use checkpoint::{Loaded, Log, State};
pub use checks::check;
use checks::check_resume;
pub use error::FinetuneError;
use error::{config_err, file_err, io_err};
pub use inputs::read_ids;
use inputs::{load_data, samples};

pub type Result<T> = std::result::Result<T, FinetuneError>;

/// Checkpoints every this many steps unless told otherwise (HF Trainer checkpoints every 500 of
/// its usually faster steps; a checkpoint of SmolLM2's LoRA takes well under a second).
pub const DEFAULT_SAVE_EVERY: u64 = DEFAULTS.save_every;

/// Everything a run needs; saved as `out/run.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunConfig {
    /// The base model: a .gguf file or a Hugging Face folder.
    pub model: PathBuf,
    /// `{"input_ids": [[...], ...]}`: every step trains on all these rows, in order.
    pub ids: Option<PathBuf>,
    /// A text file, a folder of text files, or JSONL.
    pub data: Option<PathBuf>,
    /// A chat template (Jinja) for conversations in `data`, replacing the model's.
    #[serde(default)]
    pub chat_template: Option<PathBuf>,
    /// Which tokens of a conversation are targets (`None`: the default, the assistant's).
    #[serde(default)]
    pub train_on: Option<crate::data::TrainOn>,
    /// One document per row, padded, instead of packing documents into rows.
    #[serde(default)]
    pub no_packing: bool,
    pub adapter: AdapterConfig,
    pub train: TrainConfig,
    /// Rows per micro-batch (with `ids`: the file's rows / grad_accum).
    pub batch: usize,
    /// Tokens per row (with `ids`: the file's row length).
    pub seq: usize,
    /// Optimizer steps (or `epochs`).
    pub steps: Option<u64>,
    /// Passes over the training rows, instead of `steps`.
    pub epochs: Option<f64>,
    /// Fraction of the data's rows kept for validation.
    pub val_fraction: f64,
    /// At most this many validation rows are evaluated (0: all).
    pub val_rows: usize,
    /// Evaluate every N steps (0: only before and after).
    pub eval_every: u64,
    /// Write a checkpoint every N steps (0: only at the last step, which always writes one).
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
    /// The defaults of [`crate::run::DEFAULTS`], shared with the page: LoRA (r = 8, alpha = 8)
    /// with AdamW at 2e-4, batch 4 × seq 128, 10% validation, a checkpoint every
    /// [`DEFAULT_SAVE_EVERY`] steps.
    pub fn new(model: impl Into<PathBuf>, out: impl Into<PathBuf>) -> Self {
        RunConfig {
            model: model.into(),
            ids: None,
            data: None,
            chat_template: None,
            train_on: None,
            no_packing: false,
            adapter: AdapterConfig::new(Method::Lora),
            train: TrainConfig::default(),
            batch: DEFAULTS.batch,
            seq: DEFAULTS.seq,
            steps: None,
            epochs: None,
            val_fraction: DEFAULTS.val_fraction,
            val_rows: DEFAULTS.val_rows,
            eval_every: DEFAULTS.eval_every,
            save_every: DEFAULT_SAVE_EVERY,
            shuffle: true,
            init_adapter: None,
            out: out.into(),
            log_json: None,
            prompts: Vec::new(),
            sample_tokens: DEFAULTS.sample_tokens,
        }
    }

    /// The configuration of an earlier run from its `out` folder.
    pub fn load(out: &Path) -> Result<Self> {
        let path = out.join("run.json");
        let text = std::fs::read_to_string(&path).map_err(|source| FinetuneError::NoRun {
            path: path.clone(),
            out: out.to_path_buf(),
            source,
        })?;
        serde_json::from_str(&text).map_err(|source| FinetuneError::Json {
            path,
            what: "not a run configuration: ",
            source,
        })
    }

    /// How the run walks its rows.
    pub fn plan(&self) -> Plan {
        Plan {
            batch: self.batch,
            grad_accum: self.train.grad_accum,
            steps: self.steps,
            epochs: self.epochs,
            eval_every: self.eval_every,
            val_rows: self.val_rows,
            seed: self.adapter.seed,
            shuffle: self.shuffle,
        }
    }

    fn log_path(&self) -> PathBuf {
        self.log_json.clone().unwrap_or_else(|| self.out.join("log.jsonl"))
    }
}

/// What happened, as it happens (for progress displays).
#[derive(Debug)]
pub enum Event<'a> {
    /// The base model was loaded without part of its checkpoint (said, never silent).
    LeftOut(&'a crate::model::LeftOut),
    /// The run changed something from its configuration to fit the data (said, never silent).
    Note(&'a str),
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
    /// The run ended early at `steps` because it was asked to stop ([`RunOptions::stop`]).
    #[serde(default)]
    pub interrupted: bool,
    /// Steps trained by this call (0 when a resumed run was already at its target).
    #[serde(default)]
    pub trained_steps: u64,
}

/// How a run starts and ends, beyond its configuration.
#[derive(Clone, Copy, Debug, Default)]
pub struct RunOptions<'a> {
    /// Continue from `cfg.out`'s last checkpoint (`cfg` is then the saved `run.json`, possibly with
    /// a new target or learning rate).
    pub resume: bool,
    /// Replace a `cfg.out` that holds something, whole (a new run only).
    pub overwrite: bool,
    /// Set elsewhere (a Ctrl-C handler) to end the run after its current step, with a checkpoint
    /// and the adapter so far written as usual.
    pub stop: Option<&'a AtomicBool>,
}

/// What `base_model_name_or_path` records for `model`: a Hugging Face folder as an absolute path
/// (PEFT loads it from there); nothing for a GGUF file, which PEFT cannot load by name.
pub fn base_model_ref(model: &Path) -> Option<String> {
    model.is_dir().then(|| outdir::absolute(model).display().to_string())
}

/// Runs (or, with `resume`, continues from `cfg.out`'s last checkpoint) a fine-tuning run.
pub fn run(ctx: &Context, cfg: &RunConfig, resume: bool, on: &mut dyn FnMut(&Event)) -> Result<Summary> {
    run_with(ctx, cfg, RunOptions { resume, ..RunOptions::default() }, on)
}

/// Runs a fine-tuning run as `opts` say: fresh into `cfg.out`, or resumed from its checkpoint.
pub fn run_with(ctx: &Context, cfg: &RunConfig, opts: RunOptions, on: &mut dyn FnMut(&Event)) -> Result<Summary> {
    let start = Instant::now();
    check(cfg, &opts)?;
    let checkpoint = opts.resume.then(|| checkpoint::load(&cfg.out)).transpose()?;
    let weights = crate::model::load_model(&cfg.model)?;
    if let Some(l) = &weights.left_out {
        on(&Event::LeftOut(l));
    }
    if cfg.model.is_dir() {
        let config_json = std::fs::read_to_string(cfg.model.join("config.json")).unwrap_or_default();
        if let Some(n) = crate::model::model_dropout_note(&config_json) {
            on(&Event::Note(&n));
        }
    }
    // Text needs the tokenizer (data, prompts): without one the run stops with its reason.
    let tok = match Tokenizer::for_model(&cfg.model) {
        Ok(t) => Some(t),
        Err(source) if cfg.data.is_some() => return Err(FinetuneError::NoTokenizer { source }),
        Err(e) if !cfg.prompts.is_empty() => {
            return Err(file_err(&cfg.model, format!("{e}; so --prompt cannot be sampled: drop --prompt")))
        }
        Err(_) => None,
    };
    let data = load_data(cfg, tok.as_ref(), &weights.config)?;
    if let Some(s) = &data.summary {
        on(&Event::Data(s));
        for n in &s.notes {
            on(&Event::Note(n));
        }
    }
    let run = RunState::new(data, &cfg.plan())?;
    for n in run.notes() {
        on(&Event::Note(n));
    }
    let tc = fit_length(&cfg.adapter, &cfg.train, run.steps())?;
    if let Some(done) = checkpoint.as_ref().map(|c| check_resume(cfg, c, run.steps())).transpose()?.flatten() {
        return Ok(done);
    }
    let mut s = Session::start(ctx, cfg, &tc, opts, weights, tok, run, checkpoint)?;
    if let Some(n) = s.trainer.model.params.kept_f32(cfg.train.base_dtype) {
        on(&Event::Note(&n));
    }
    if let Err(e) = s.train(on) {
        if s.last_checkpoint.is_none() && !opts.resume {
            let n = format!(
                "the run stopped before its first checkpoint, so nothing of it is kept: {} was cleared (the \
                 same command starts it again)",
                cfg.out.display()
            );
            on(&Event::Note(&n));
        }
        return Err(e);
    }
    s.finish(start, on)
}

/// A run under way: the files-free [`RunState`] (shared with the page) and what the command
/// line adds around it.
struct Session<'a> {
    ctx: &'a Context,
    cfg: &'a RunConfig,
    stop: Option<&'a AtomicBool>,
    weights: Weights,
    tok: Option<Tokenizer>,
    run: RunState,
    trainer: Trainer,
    summary: Summary,
    log: Log,
    /// The step of the checkpoint on disk (named when a later step fails).
    last_checkpoint: Option<u64>,
    /// The folder, removed with what it holds if the run ends before its first checkpoint.
    claim: outdir::Claim,
}

impl<'a> Session<'a> {
    fn start(
        ctx: &'a Context,
        cfg: &'a RunConfig,
        tc: &TrainConfig,
        opts: RunOptions<'a>,
        weights: Weights,
        tok: Option<Tokenizer>,
        mut run: RunState,
        checkpoint: Option<Loaded>,
    ) -> Result<Self> {
        let init_file = match (&checkpoint, &cfg.init_adapter) {
            (None, Some(dir)) => {
                crate::adapter::peft::refuse_delta_lora_alone(dir)?;
                Some(PeftFile::read(dir)?)
            }
            _ => None,
        };
        let init = checkpoint.as_ref().map(|c| &c.adapter).or(init_file.as_ref());
        let mut trainer = Trainer::new(ctx, &weights, run.batch(), run.seq(), &cfg.adapter, tc, init)?;
        // The folder is taken only now: a run refused above leaves nothing behind.
        let claim = match &checkpoint {
            Some(_) => outdir::claim_existing(&cfg.out)?,
            None => outdir::claim_new(&cfg.out, opts.overwrite, checkpoint::BEFORE_THE_FIRST)?,
        };
        let json = serde_json::to_string_pretty(cfg)?;
        write_atomic(&cfg.out.join("run.json"), json.as_bytes())?;
        let (summary, lines) = match &checkpoint {
            Some(c) => {
                checkpoint::restore(ctx, &mut trainer, c)?;
                let st = &c.state;
                run.resume_at(st.step, st.rows_read);
                let lines =
                    if st.log.is_empty() { checkpoint::lines_from_history(&st.summary) } else { st.log.clone() };
                (Summary { interrupted: false, trained_steps: 0, ..st.summary.clone() }, lines)
            }
            None => (Summary { data: run.summary.clone(), ..Summary::default() }, Vec::new()),
        };
        let log = Log::create(cfg.log_path(), lines)?;
        let last_checkpoint = checkpoint.as_ref().map(|c| c.state.step);
        Ok(Session { ctx, cfg, stop: opts.stop, weights, tok, run, trainer, summary, log, last_checkpoint, claim })
    }

    fn eval(&self) -> Result<Option<f64>> {
        match self.run.val() {
            Some(rows) => Ok(Some(self.trainer.eval_rows(self.ctx, &rows.batch())?)),
            None => Ok(None),
        }
    }

    fn record_eval(&mut self, step: u64, on: &mut dyn FnMut(&Event)) -> Result<()> {
        if let Some(v) = self.eval()? {
            if step == 0 {
                self.summary.val_before = Some(v);
            }
            self.summary.val_loss.push((step, v));
            self.log.line(serde_json::json!({"step": step, "val_loss": v}))?;
            on(&Event::Eval { step, val_loss: v });
        }
        Ok(())
    }

    /// The training loop, from the step after the checkpoint (or 1) to the target, or to the
    /// step during which a stop was asked for.
    fn train(&mut self, on: &mut dyn FnMut(&Event)) -> Result<()> {
        let (first, steps) = (self.trainer.step + 1, self.run.steps());
        on(&Event::Started {
            trainable: self.trainer.trainable_parameters(),
            kept_bytes: self.trainer.kept_bytes(),
            model_kept_bytes: self.trainer.model.acts.kept_bytes,
            steps,
            first_step: first,
        });
        if self.last_checkpoint.is_none() {
            if let (Some(t), false) = (&self.tok, self.cfg.prompts.is_empty()) {
                let (c, w) = (self.cfg, &self.weights);
                self.summary.samples_before = samples(
                    self.ctx,
                    w,
                    &self.trainer.model.params,
                    None,
                    t,
                    &c.prompts,
                    self.run.chat.as_ref(),
                    c.sample_tokens,
                )?;
                on(&Event::Samples { after: false, samples: &self.summary.samples_before });
            }
            self.record_eval(0, on)?;
        }
        let mut clock = Clock { start: Instant::now(), last_read: Instant::now(), tokens: 0, first };
        while !self.run.done() {
            let micro = self.run.next_step();
            let t = self.run.step();
            let batches: Vec<Batch> = micro.iter().map(|m| m.batch()).collect();
            self.trainer.submit_step(self.ctx, &batches)?;
            let evaluates = self.run.evaluates(t);
            let due = t.is_multiple_of(self.cfg.save_every) || t == steps;
            // Losses come back every `loss_every` steps (and before evaluations and checkpoints,
            // which record the history): the only time the CPU waits for the GPU.
            if self.trainer.losses_due() || evaluates || due {
                self.collect(&mut clock, steps, on)?;
            }
            if evaluates {
                self.record_eval(t, on)?;
            }
            // Read after this step was submitted and, when due, its loss read and evaluated: a
            // stop asked for at any moment of step t (a Ctrl-C while it ran; an app's callback
            // on its Step event) ends the run after t, never after t + 1.
            let stopping = self.stop.is_some_and(|f| f.load(Ordering::SeqCst)) && t < steps;
            if due || stopping {
                self.collect(&mut clock, steps, on)?;
                self.log.sync()?;
                let st = State {
                    step: t,
                    rows_read: self.run.rows_read(),
                    summary: self.summary.clone(),
                    log: self.log.lines.clone(),
                };
                let dir = checkpoint::save(self.ctx, self.cfg, &self.trainer, &st)?;
                self.last_checkpoint = Some(t);
                self.claim.keep();
                on(&Event::Checkpoint { step: t, dir: &dir });
            }
            self.summary.steps = t;
            self.summary.trained_steps += 1;
            if stopping {
                self.summary.interrupted = true;
                break;
            }
        }
        Ok(())
    }

    /// Reads the losses of the steps submitted since the last read, logs them, and stops the run
    /// at a non-finite loss or gradient.
    fn collect(&mut self, clock: &mut Clock, steps: u64, on: &mut dyn FnMut(&Event)) -> Result<()> {
        let collected = self.trainer.collect_losses(self.ctx)?;
        let seconds = clock.last_read.elapsed().as_secs_f64() / collected.len().max(1) as f64;
        clock.last_read = Instant::now();
        for stats in collected {
            let what = if !stats.loss.is_finite() {
                Some(format!("the loss ({})", stats.loss))
            } else {
                stats.nonfinite_grad.map(|i| format!("the gradient of {}", self.trainer.params[i].name))
            };
            if let Some(what) = what {
                let kept = match self.last_checkpoint {
                    Some(s) => format!(
                        "; the checkpoint of step {s} in {} is intact",
                        self.cfg.out.join("checkpoint").display()
                    ),
                    None => String::new(),
                };
                // f16 copies of activations turn values past ±65504 into Inf, which only the
                // gradients see (the forward pass is f32).
                let hint = match self.trainer.config.activations_f16 {
                    true => "With --activations f16 an activation past ±65504 becomes Inf: try --activations f32. ",
                    false => "",
                };
                // Without a checkpoint the folder is cleared: the run starts again from scratch.
                let then = if self.last_checkpoint.is_some() { "--resume" } else { "run the same command again" };
                return Err(FinetuneError::NonFinite { step: stats.step, what, kept, hint, then });
            }
            let s = stats.step;
            clock.tokens += stats.tokens;
            self.summary.train_loss.push((s, stats.loss));
            self.log.line(serde_json::json!({"step": s, "loss": stats.loss, "lr": stats.lr, "tokens": stats.tokens, "seconds": seconds, "grad_norm": stats.grad_norm}))?;
            let elapsed = clock.start.elapsed().as_secs_f64();
            let done = (s - clock.first + 1) as f64;
            on(&Event::Step {
                stats: &stats,
                steps,
                elapsed_s: elapsed,
                eta_s: elapsed / done * (steps - s) as f64,
                tokens_per_s: clock.tokens as f64 / elapsed.max(1e-9),
            });
        }
        Ok(())
    }

    /// Writes the adapter, samples after training (not after a stop: that should be quick),
    /// Delta-LoRA's merged model (the adapter beside it), the loss curve and the summary.
    fn finish(self, start: Instant, on: &mut dyn FnMut(&Event)) -> Result<Summary> {
        let Session { ctx, cfg, weights, tok, mut trainer, mut summary, log, run, .. } = self;
        let steps = summary.steps;
        summary.val_after = summary.val_loss.last().filter(|(s, _)| *s == steps).map(|&(_, v)| v);
        let base = base_model_ref(&cfg.model);
        let delta = cfg.adapter.method == Method::DeltaLora;
        summary.adapter_dir = if delta { cfg.out.join("adapter") } else { cfg.out.clone() };
        trainer.save_adapter(ctx, base.as_deref(), &summary.adapter_dir)?;
        // Samples from the frozen weights (as stored, quantized or not) with the adapter's
        // branch beside them: no merge, no f32 copy.
        if let (Some(t), false, false) = (&tok, cfg.prompts.is_empty(), summary.interrupted) {
            let (params, adapter) = (&trainer.model.params, trainer.model.adapter());
            let chat = run.chat.as_ref();
            summary.samples_after = samples(ctx, &weights, params, adapter, t, &cfg.prompts, chat, cfg.sample_tokens)?;
            on(&Event::Samples { after: true, samples: &summary.samples_after });
        }
        if delta {
            // Delta-LoRA moved W0: the model is a merged folder, the adapter beside it.
            trainer.model.merge(ctx)?;
            let mut merged = crate::model::load_model(&cfg.model)?;
            read_back_site_weights(ctx, &trainer.model, &mut merged)?;
            write_hf_folder(&merged, &cfg.out)?;
        }
        summary.plot = cfg.out.join("loss.svg");
        let name = cfg.model.file_name().and_then(|n| n.to_str()).unwrap_or("model");
        let title = format!("{} on {name}", cfg.adapter.method);
        write_atomic(&summary.plot, crate::plot::loss_svg(&summary.train_loss, &summary.val_loss, &title).as_bytes())?;
        summary.log = log.path.clone();
        summary.seconds = start.elapsed().as_secs_f64();
        let json = serde_json::to_string_pretty(&summary)?;
        write_atomic(&cfg.out.join("summary.json"), json.as_bytes())?;
        Ok(summary)
    }
}

/// Timing of the loop, for the progress events.
struct Clock {
    start: Instant,
    last_read: Instant,
    tokens: usize,
    first: u64,
}
