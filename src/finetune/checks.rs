//! What a run checks before it trains: settings that contradict each other or would be ignored
//! (the rest, which depends on the data, is [`crate::run::RunState::new`]'s), and that a resumed
//! run only moves forward.

use super::checkpoint::Loaded;
use super::{config_err, Result, RunConfig, Summary};

/// Settings that contradict each other or would be silently ignored, checked before any work.
pub(super) fn check_config(cfg: &RunConfig) -> Result<()> {
    cfg.plan().check()?;
    if cfg.eval_every > 0 && (cfg.ids.is_some() || cfg.val_fraction == 0.0) {
        return Err(config_err(format!(
            "--eval-every {}: there are no validation rows to evaluate (--ids has none; --val-fraction is 0)",
            cfg.eval_every
        )));
    }
    if cfg.prompts.iter().any(String::is_empty) {
        return Err(config_err("--prompt \"\": an empty prompt has nothing to continue; give some text"));
    }
    if cfg.val_rows > 0 && (cfg.ids.is_some() || cfg.val_fraction == 0.0) {
        return Err(config_err(format!(
            "--val-rows {}: there are no validation rows to take them from (--ids has none; --val-fraction is 0)",
            cfg.val_rows
        )));
    }
    Ok(())
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
