//! What a run checks before it trains: inputs that are missing, an output folder it may not
//! write, targets the model lacks, settings that contradict each other or would be ignored (the
//! rest, which depends on the data, is [`crate::run::RunState::new`]'s), and that a resumed run
//! only moves forward.

use std::path::{Path, PathBuf};

use super::checkpoint::{self, Loaded};
use super::{config_err, Result, RunConfig, RunOptions, Summary};
use crate::outdir;

/// What [`super::run_with`] checks before any long work (reading weights or data): the settings, that
/// every input exists, that the output folder may be written, and that the adapter's targets are
/// projections of the model (from its configuration alone). An app (or the command line) may
/// call it first, to refuse a run before announcing it; [`super::run_with`] calls it again.
pub fn check(cfg: &RunConfig, opts: &RunOptions) -> Result<()> {
    check_config(cfg)?;
    let named = [
        ("--model", Some(&cfg.model)),
        ("--data", cfg.data.as_ref()),
        ("--ids", cfg.ids.as_ref()),
        ("--init-adapter", cfg.init_adapter.as_ref()),
        ("--chat-template", cfg.chat_template.as_ref()),
    ];
    if let Some((flag, path)) = named.iter().find_map(|(f, p)| p.filter(|p| !p.exists()).map(|p| (f, p))) {
        // A resumed run's paths are its run.json's, not flags given now.
        return Err(config_err(match opts.resume {
            false => format!("{flag} {}: no such file or folder", path.display()),
            true => format!(
                "{}'s {} {}: no such file or folder (moved since the run started?); put it back to resume",
                cfg.out.join("run.json").display(),
                flag.trim_start_matches("--").replace('-', "_"),
                path.display()
            ),
        }));
    }
    let inputs: Vec<&Path> = named.iter().filter_map(|(_, p)| p.map(PathBuf::as_path)).collect();
    if opts.resume {
        outdir::check_not_input(&cfg.out, &inputs)?;
    } else {
        let what = match checkpoint::find(&cfg.out) {
            Some(_) => "continue its run with --resume, pick another --out, or replace it whole with --overwrite",
            None => "pick another --out, or replace it whole with --overwrite",
        };
        outdir::check(&cfg.out, &inputs, opts.overwrite, what)?;
        // An --init-adapter's own targets are checked when it is read.
        if cfg.init_adapter.is_none() {
            cfg.adapter.sites(&crate::model::read_config(&cfg.model)?)?;
        }
    }
    Ok(())
}

/// Settings that contradict each other or would be silently ignored, checked before any work.
pub(super) fn check_config(cfg: &RunConfig) -> Result<()> {
    cfg.plan().check()?;
    // Why there are no validation rows, in the terms of what was given.
    let none = match (&cfg.ids, cfg.val_fraction) {
        (Some(_), _) => Some("--ids has none: every row of the file trains"),
        (None, 0.0) => Some("--val-fraction 0 holds none out: give --val-fraction 0.1, say"),
        _ => None,
    };
    if let (true, Some(why)) = (cfg.eval_every > 0, none) {
        return Err(config_err(format!(
            "--eval-every {}: there are no validation rows to evaluate ({why})",
            cfg.eval_every
        )));
    }
    if cfg.prompts.iter().any(String::is_empty) {
        return Err(config_err("--prompt \"\": an empty prompt has nothing to continue; give some text"));
    }
    if let (true, Some(why)) = (cfg.val_rows > 0, none) {
        return Err(config_err(format!(
            "--val-rows {}: there are no validation rows to take them from ({why})",
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
