//! What a run checks before it trains: settings that contradict each other or would be ignored,
//! its shape once the data is known, and that a resumed run only moves forward.

use super::checkpoint::Loaded;
use super::inputs::Data;
use super::{config_err, Result, RunConfig, Summary};
use crate::adapter::Method;

/// The run's shape, once the data is known.
#[derive(Clone, Copy)]
pub(super) struct Shape {
    pub batch: usize,
    pub seq: usize,
    /// Micro-batches per step.
    pub k: usize,
    pub steps: u64,
}

/// Settings that contradict each other or would be silently ignored, checked before any work.
pub(super) fn check_config(cfg: &RunConfig) -> Result<()> {
    if cfg.batch == 0 {
        return Err(config_err("--batch 0: a micro-batch needs 1 row or more"));
    }
    match (cfg.steps, cfg.epochs) {
        (Some(_), Some(_)) => Err(config_err("give --steps N or --epochs E, not both")),
        (None, None) => Err(config_err("give --steps N or --epochs E")),
        (Some(0), _) => Err(config_err("--steps 0: give 1 or more")),
        (_, Some(e)) if !(e > 0.0 && e.is_finite()) => Err(config_err(format!("--epochs {e} must be positive"))),
        _ if cfg.eval_every > 0 && (cfg.ids.is_some() || cfg.val_fraction == 0.0) => Err(config_err(format!(
            "--eval-every {}: there are no validation rows to evaluate (--ids has none; --val-fraction is 0)",
            cfg.eval_every
        ))),
        _ => Ok(()),
    }
}

/// Checks what depends on the run's length (known once the data is read, with --epochs).
pub(super) fn check_length(cfg: &RunConfig, steps: u64) -> Result<()> {
    if cfg.train.warmup_steps > steps {
        return Err(config_err(format!(
            "--warmup-steps {} is beyond the run's {}: the learning rate would never reach --lr; \
             use --warmup-steps {steps} or less",
            cfg.train.warmup_steps,
            plural(steps, "step")
        )));
    }
    if cfg.adapter.method == Method::DeltaLora && cfg.adapter.delta_warmup >= steps {
        return Err(config_err(format!(
            "--delta-warmup {}: Delta-LoRA moves W0 only after step {}, and the run has {}, so W0 would \
             never move; use a warm-up below {steps}",
            cfg.adapter.delta_warmup,
            cfg.adapter.delta_warmup,
            plural(steps, "step")
        )));
    }
    Ok(())
}

pub(super) fn shape_of(cfg: &RunConfig, data: &Data) -> Result<Shape> {
    let k = cfg.train.grad_accum.max(1);
    let (batch, seq) = if cfg.ids.is_some() {
        let n = data.train.len();
        if !n.is_multiple_of(k) {
            return Err(config_err(format!(
                "{n} rows in the --ids file do not split into {k} equal micro-batches (--grad-accum)"
            )));
        }
        (n / k, data.train[0].ids.len())
    } else {
        (cfg.batch.min(data.train.len()).max(1), cfg.seq)
    };
    let steps = match (cfg.steps, cfg.epochs) {
        (Some(s), _) => s,
        (None, Some(e)) => ((e * data.train.len() as f64) / (batch * k) as f64).ceil().max(1.0) as u64,
        (None, None) => unreachable!("check_config requires one"),
    };
    Ok(Shape { batch, seq, k, steps })
}

/// A resumed run only moves forward: its target is not behind its checkpoint, and its final
/// adapter is never replaced by an older one. Returns the summary when there is nothing to do.
pub(super) fn check_resume(cfg: &RunConfig, c: &Loaded, steps: u64) -> Result<Option<Summary>> {
    let at = c.state.step;
    let out = cfg.out.display();
    if steps < at {
        return Err(config_err(format!(
            "--steps {steps} is behind the checkpoint of step {at} in {out}; give --steps {} or more",
            at + 1
        )));
    }
    let done: Option<Summary> =
        std::fs::read_to_string(cfg.out.join("summary.json")).ok().and_then(|t| serde_json::from_str(&t).ok());
    if let Some(d) = done.as_ref().filter(|d| d.steps > at) {
        return Err(config_err(format!(
            "{out} holds the adapter of step {}, newer than its checkpoint (step {at}): resuming would replace \
             it with an older one. Start a new run from it instead: --init-adapter {out}",
            d.steps
        )));
    }
    if steps == at {
        let mut s = done.unwrap_or_else(|| c.state.summary.clone());
        s.trained_steps = 0;
        return Ok(Some(s));
    }
    Ok(None)
}

/// "1 step", "2 steps".
fn plural(n: u64, word: &str) -> String {
    format!("{n} {word}{}", if n == 1 { "" } else { "s" })
}
