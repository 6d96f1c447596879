//! One run's state and defaults, free of files: the training and validation rows, the seeded
//! order the rows are read in, the step, the run's length, and when it evaluates. `portalora
//! train` ([`crate::finetune`], which adds the files: checkpoints, log, outputs) and the browser's
//! `Engine` (`crate::web`, driven step by step from a Web Worker) both drive a [`RunState`], made
//! from the same [`RunData`] and [`Plan`] with the same [`DEFAULTS`].
//!
//! ```
//! use portalora::data::Row;
//! use portalora::run::{Plan, RunData, RunState, DEFAULTS};
//! let row = |t: u32| Row { ids: vec![t; 8], predict: vec![true; 8], pos: (0..8).collect() };
//! let data = RunData { train: (0..10).map(row).collect(), val: vec![row(99)], ..RunData::default() };
//! let plan = Plan { steps: Some(3), batch: 2, ..Plan::default() };
//! let mut run = RunState::new(data, &plan).unwrap();
//! assert!(run.evaluates(0) && !run.evaluates(1) && run.evaluates(3)); // before and after
//! while !run.done() {
//!     let micro = run.next_step(); // one micro-batch per --grad-accum
//!     assert_eq!(micro[0].ids.len(), 2);
//! }
//! assert_eq!((run.step(), run.rows_read()), (3, 6));
//! assert_eq!(DEFAULTS.lr, 2e-4);
//! ```

use serde::Serialize;

use crate::adapter::Method;
use crate::data::{DataSummary, Order, Row};
use crate::io::chat::ChatTemplate;
use crate::model::ModelConfig;
use crate::train::Batch;

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("{0}")]
    Config(String),
}

type Result<T> = std::result::Result<T, RunError>;

fn config_err(message: impl Into<String>) -> RunError {
    RunError::Config(message.into())
}

/// The defaults of a run, the same for `portalora train`, [`crate::finetune::RunConfig::new`]
/// and the page (which shows them in its fields, from `Engine.defaults()`). They follow PEFT's
/// and the usual LoRA recipes: r = 8 with alpha = 8 (PEFT's `LoraConfig`), AdamW at 2e-4 with a
/// constant rate and gradients clipped at norm 1, rows of 128 tokens (fewer for a model with a
/// shorter context: [`RunDefaults::for_model`]).
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct RunDefaults {
    pub method: &'static str,
    /// The rank of every method but VeRA.
    pub rank: usize,
    /// VeRA's rank (its shared pair is large and frozen; PEFT's default).
    pub vera_rank: usize,
    pub alpha: f64,
    pub dropout: f32,
    pub lr: f64,
    pub schedule: &'static str,
    pub warmup_steps: u64,
    pub max_grad_norm: f64,
    /// LoRA+'s ratio of B's learning rate to A's.
    pub lr_ratio: f64,
    pub delta_lambda: f64,
    /// Delta-LoRA's warm-up: W0 moves from step `delta_warmup + 1` on.
    pub delta_warmup: u64,
    pub batch: usize,
    pub grad_accum: usize,
    pub seq: usize,
    pub val_fraction: f64,
    /// At most this many validation rows are evaluated (0: all).
    pub val_rows: usize,
    /// Evaluate every N steps (0: only before and after training).
    pub eval_every: u64,
    /// Checkpoint every N steps (the command line; the page keeps none).
    pub save_every: u64,
    pub sample_tokens: usize,
    pub seed: u64,
    /// Which tokens of a conversation are targets.
    pub train_on: &'static str,
}

/// The one set of defaults.
pub const DEFAULTS: RunDefaults = RunDefaults {
    method: "lora",
    rank: 8,
    vera_rank: 256,
    alpha: 8.0,
    dropout: 0.0,
    lr: 2e-4,
    schedule: "constant",
    warmup_steps: 0,
    max_grad_norm: 1.0,
    lr_ratio: 16.0,
    delta_lambda: 2.0,
    delta_warmup: 500,
    batch: 4,
    grad_accum: 1,
    seq: 128,
    val_fraction: 0.1,
    val_rows: 0,
    eval_every: 0,
    save_every: 100,
    sample_tokens: 32,
    seed: 0,
    train_on: "assistant",
};

impl RunDefaults {
    /// The defaults for `model`: rows no longer than its context.
    pub fn for_model(model: &ModelConfig) -> RunDefaults {
        RunDefaults { seq: DEFAULTS.seq.min(model.usable_positions()), ..DEFAULTS }
    }

    /// The default rank of `method`.
    pub fn rank_of(&self, method: Method) -> usize {
        if method == Method::Vera {
            self.vera_rank
        } else {
            self.rank
        }
    }
}

/// The settings a method does not use, given by name (the command line's flags without dashes,
/// the page's JSON keys): each with who does use it. A run refuses them rather than ignore them.
pub fn unused_by_method(method: Method, given: &[&str]) -> Vec<(String, &'static str)> {
    let rules: [(&[&str], bool, &str); 6] = [
        (&["alpha", "rslora"], method == Method::Vera, "VeRA has no alpha (its scale is learnt in λ_b and λ_d)"),
        (&["init"], method == Method::Vera, "VeRA's shared pair is always kaiming-uniform"),
        (
            &["lr_ratio"],
            !matches!(method, Method::LoraPlus | Method::Dora),
            "only LoRA+ (method lora-plus) and DoRA (with LoRA+'s groups) use it",
        ),
        (&["delta_lambda", "delta_warmup"], method != Method::DeltaLora, "only Delta-LoRA (method delta-lora) uses it"),
        (&["vera_d_initial", "vera_seed"], method != Method::Vera, "only VeRA (method vera) uses it"),
        (&["lorafa_projected"], method != Method::LoraFa, "only LoRA-FA (method lora-fa) uses it"),
    ];
    given
        .iter()
        .filter_map(|g| {
            let (_, _, why) = rules.iter().find(|(names, unused, _)| *unused && names.contains(g))?;
            Some((g.to_string(), *why))
        })
        .collect()
}

/// A run's rows, before it starts.
#[derive(Default)]
pub struct RunData {
    pub train: Vec<Row>,
    pub val: Vec<Row>,
    /// The chat template, when the data holds conversations (prompts are sampled in it).
    pub chat: Option<ChatTemplate>,
    /// What was read (none for token-id rows).
    pub summary: Option<DataSummary>,
    /// Every step trains on all the training rows, in order (`--ids`): they are one step's
    /// micro-batches.
    pub fixed: bool,
}

/// How a run walks its rows.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    /// Rows per micro-batch (lowered to the number of training rows when there are fewer).
    pub batch: usize,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    /// The run's length: optimizer steps, or passes over the training rows.
    pub steps: Option<u64>,
    pub epochs: Option<f64>,
    pub eval_every: u64,
    pub val_rows: usize,
    /// Seeds the order the rows are read in.
    pub seed: u64,
    /// A fresh seeded shuffle of the training rows each epoch (else in order).
    pub shuffle: bool,
}

impl Default for Plan {
    fn default() -> Plan {
        Plan {
            batch: DEFAULTS.batch,
            grad_accum: DEFAULTS.grad_accum,
            steps: None,
            epochs: None,
            eval_every: DEFAULTS.eval_every,
            val_rows: DEFAULTS.val_rows,
            seed: DEFAULTS.seed,
            shuffle: true,
        }
    }
}

impl Plan {
    /// Settings that contradict each other, found before any data is read.
    pub fn check(&self) -> Result<()> {
        if self.batch == 0 {
            return Err(config_err("--batch 0: a micro-batch needs 1 row or more"));
        }
        match (self.steps, self.epochs) {
            (Some(_), Some(_)) => Err(config_err("give --steps N or --epochs E, not both")),
            (None, None) => Err(config_err("give --steps N or --epochs E")),
            (Some(0), _) => Err(config_err("--steps 0: give 1 or more")),
            (_, Some(e)) if !(e > 0.0 && e.is_finite()) => Err(config_err(format!("--epochs {e} must be positive"))),
            _ => Ok(()),
        }
    }
}

/// Rows of one micro-batch: ids, loss masks and positions in documents, owned.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Rows {
    pub ids: Vec<Vec<u32>>,
    pub predict: Vec<Vec<bool>>,
    pub pos: Vec<Vec<u32>>,
}

impl Rows {
    fn of<'a>(rows: impl IntoIterator<Item = &'a Row>) -> Rows {
        let mut out = Rows::default();
        for r in rows {
            out.ids.push(r.ids.clone());
            out.predict.push(r.predict.clone());
            out.pos.push(r.pos.clone());
        }
        out
    }

    /// The rows as the trainer takes them.
    pub fn batch(&self) -> Batch<'_> {
        Batch { ids: &self.ids, predict: Some(&self.predict), positions: Some(&self.pos) }
    }
}

/// A run under way, without files: which rows come next and what is due at each step.
pub struct RunState {
    train: Vec<Row>,
    /// The validation rows evaluated (at most [`Plan::val_rows`]).
    val: Rows,
    pub chat: Option<ChatTemplate>,
    pub summary: Option<DataSummary>,
    fixed: bool,
    order: Order,
    rows_read: u64,
    step: u64,
    steps: u64,
    batch: usize,
    k: usize,
    eval_every: u64,
    notes: Vec<String>,
}

impl RunState {
    /// A run at step 0 over `data` as `plan` says. Refuses a plan that contradicts itself or
    /// the data.
    pub fn new(data: RunData, plan: &Plan) -> Result<RunState> {
        let k = plan.grad_accum.max(1);
        let n = data.train.len();
        if n == 0 {
            return Err(config_err("there are no training rows"));
        }
        plan.check()?;
        if plan.eval_every > 0 && data.val.is_empty() {
            return Err(config_err(format!(
                "--eval-every {}: there are no validation rows to evaluate (the data makes none: more text, or a \
                 --val-fraction above 0)",
                plan.eval_every
            )));
        }
        let mut notes = Vec::new();
        let batch = if data.fixed {
            if !n.is_multiple_of(k) {
                return Err(config_err(format!(
                    "{n} rows in the --ids file do not split into {k} equal micro-batches (--grad-accum)"
                )));
            }
            n / k
        } else if plan.batch > n {
            notes.push(format!(
                "the data makes {n} training row(s), fewer than the batch of {}: each micro-batch holds {n}",
                plan.batch
            ));
            n
        } else {
            plan.batch
        };
        let steps = match (plan.steps, plan.epochs) {
            (Some(s), _) => s,
            (None, Some(e)) => ((e * n as f64) / (batch * k) as f64).ceil().max(1.0) as u64,
            (None, None) => unreachable!("Plan::check requires one"),
        };
        let take = if plan.val_rows == 0 { usize::MAX } else { plan.val_rows };
        Ok(RunState {
            val: Rows::of(data.val.iter().take(take)),
            order: Order::new(n, plan.seed, plan.shuffle && !data.fixed),
            train: data.train,
            chat: data.chat,
            summary: data.summary,
            fixed: data.fixed,
            rows_read: 0,
            step: 0,
            steps,
            batch,
            k,
            eval_every: plan.eval_every,
            notes,
        })
    }

    /// Continues from a checkpoint: `step` steps done, `rows_read` rows read.
    pub fn resume_at(&mut self, step: u64, rows_read: u64) {
        (self.step, self.rows_read) = (step, rows_read);
    }

    /// The rows of the next step's micro-batches (with fixed rows, all of them in order; else
    /// the next rows of the seeded order), and the step counted as taken.
    pub fn next_step(&mut self) -> Vec<Rows> {
        self.step += 1;
        let batch = self.batch;
        if self.fixed {
            return self.train.chunks(batch).map(Rows::of).collect();
        }
        (0..self.k)
            .map(|_| {
                let picked: Vec<usize> = (0..batch)
                    .map(|_| {
                        let (i, _) = self.order.at(self.rows_read);
                        self.rows_read += 1;
                        i
                    })
                    .collect();
                Rows::of(picked.into_iter().map(|i| &self.train[i]))
            })
            .collect()
    }

    /// Whether the run evaluates after step `t` (0: before training): before, after the last
    /// step, and every [`Plan::eval_every`] steps.
    pub fn evaluates(&self, t: u64) -> bool {
        t == 0 || t == self.steps || t.is_multiple_of(self.eval_every)
    }

    /// The validation rows evaluated, if any.
    pub fn val(&self) -> Option<&Rows> {
        (!self.val.ids.is_empty()).then_some(&self.val)
    }

    pub fn done(&self) -> bool {
        self.step >= self.steps
    }
    /// Steps taken.
    pub fn step(&self) -> u64 {
        self.step
    }
    /// The run's length in optimizer steps.
    pub fn steps(&self) -> u64 {
        self.steps
    }
    pub fn rows_read(&self) -> u64 {
        self.rows_read
    }
    /// Rows per micro-batch.
    pub fn batch(&self) -> usize {
        self.batch
    }
    /// Micro-batches per step.
    pub fn micro_batches(&self) -> usize {
        self.k
    }
    /// Tokens per row.
    pub fn seq(&self) -> usize {
        self.train[0].ids.len()
    }
    /// Training rows.
    pub fn train_rows(&self) -> usize {
        self.train.len()
    }
    /// What the run changed from its plan, to be said (a batch lowered to the rows there are).
    pub fn notes(&self) -> &[String] {
        &self.notes
    }
}

/// The optimizer's settings for a run of `steps` optimizer steps: the schedule's length is the
/// run's ([`TrainConfig::total_steps`](crate::train::TrainConfig::total_steps) filled in, or
/// refused when an app set another), and what depends on it is checked: a learning-rate warm-up
/// past it, or a Delta-LoRA warm-up that would never let W0 move. The command line's runs and
/// the page's both take their optimizer settings from here.
pub fn fit_length(
    adapter: &crate::adapter::AdapterConfig,
    train: &crate::train::TrainConfig,
    steps: u64,
) -> Result<crate::train::TrainConfig> {
    let plural = |n: u64| format!("{n} step{}", if n == 1 { "" } else { "s" });
    if let Some(total) = train.total_steps.filter(|&t| t != steps) {
        return Err(config_err(format!(
            "the schedule's total_steps {total} disagrees with the run's {} (its steps, or what its epochs make \
             of the data): the learning rate would follow another run's schedule; leave total_steps unset \
             (None), and the run's length is used",
            plural(steps)
        )));
    }
    if train.warmup_steps > steps {
        return Err(config_err(format!(
            "--warmup-steps {} is beyond the run's {}: the learning rate would never reach --lr; \
             use --warmup-steps {steps} or less",
            train.warmup_steps,
            plural(steps)
        )));
    }
    if adapter.method == Method::DeltaLora && adapter.delta_warmup >= steps {
        return Err(config_err(format!(
            "--delta-warmup {}: Delta-LoRA moves W0 only after step {}, and the run has {}, so W0 would \
             never move; use a warm-up below {steps}",
            adapter.delta_warmup,
            adapter.delta_warmup,
            plural(steps)
        )));
    }
    Ok(crate::train::TrainConfig { total_steps: Some(steps), ..train.clone() })
}
