//! Checkpoints and the run's log.
//!
//! A checkpoint is `out/checkpoint/`: the adapter in PEFT's format, `optimizer.safetensors` (the
//! optimizer's moments, and Delta-LoRA's moved weights) and `state.json` (the step, the rows read,
//! the history and the log's lines up to that step). It is written to `checkpoint.tmp/`, synced
//! and renamed over the previous one, so a crash at any moment leaves the last good checkpoint.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{file_err, io_err, FinetuneError, Result, RunConfig, Summary};
use crate::adapter::peft::{safetensors_bytes, write_atomic, PeftFile};
use crate::gpu::Context;
use crate::model::weights::read_safetensors;
use crate::outdir::write_dir_atomic;
use crate::train::Trainer;

/// What a checkpoint's `state.json` holds.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(super) struct State {
    pub step: u64,
    /// Training rows read so far (the data order's whole state).
    pub rows_read: u64,
    pub summary: Summary,
    /// The log's lines up to `step`, exactly as written (a resumed run rewrites them first).
    #[serde(default)]
    pub log: Vec<String>,
}

pub(super) fn save(ctx: &Context, cfg: &RunConfig, trainer: &Trainer, state: &State) -> Result<PathBuf> {
    let dir = cfg.out.join("checkpoint");
    write_dir_atomic(&dir, |tmp| -> Result<()> {
        trainer.save_adapter(ctx, super::base_model_ref(&cfg.model).as_deref(), tmp)?;
        let opt = trainer.optimizer_state(ctx)?;
        write_atomic(&tmp.join("optimizer.safetensors"), &safetensors_bytes(&opt)?)?;
        let json = serde_json::to_string_pretty(state)?;
        write_atomic(&tmp.join("state.json"), json.as_bytes())?;
        Ok(())
    })?;
    Ok(dir)
}

/// The checkpoint folder of `out` (or its `.old` twin when a crash came between the renames).
pub(super) fn find(out: &Path) -> Option<PathBuf> {
    let dir = out.join("checkpoint");
    let old = dir.with_extension("old");
    [dir, old].into_iter().find(|d| d.join("state.json").exists())
}

/// The step of `out`'s checkpoint, if it has one.
pub fn checkpoint_step(out: &Path) -> Option<u64> {
    let dir = find(out)?;
    let text = std::fs::read_to_string(dir.join("state.json")).ok()?;
    serde_json::from_str::<State>(&text).ok().map(|s| s.step)
}

/// A checkpoint read back: its state, adapter and optimizer state.
pub(super) struct Loaded {
    pub dir: PathBuf,
    pub state: State,
    pub adapter: PeftFile,
}

/// What a run writes in its folder before its first checkpoint is whole (and removes when it
/// ends before then): its configuration, its log, the checkpoint under way.
pub(super) const BEFORE_THE_FIRST: &[&str] = &["run.json", "log.jsonl", "checkpoint.tmp", "checkpoint.old"];

pub(super) fn load(out: &Path) -> Result<Loaded> {
    let dir = find(out).ok_or_else(|| {
        file_err(
            out,
            "has no checkpoint to resume from (checkpoint/state.json; a run killed before its first \
             checkpoint leaves none): start the run again, with --overwrite to replace what it left",
        )
    })?;
    let path = dir.join("state.json");
    let text = std::fs::read_to_string(&path).map_err(io_err(&path))?;
    let state: State =
        serde_json::from_str(&text).map_err(|source| FinetuneError::Json { path: path.clone(), what: "", source })?;
    Ok(Loaded { adapter: PeftFile::read(&dir)?, dir, state })
}

/// Writes the optimizer state of a loaded checkpoint into `trainer`.
pub(super) fn restore(ctx: &Context, trainer: &mut Trainer, c: &Loaded) -> Result<()> {
    let mut opt = BTreeMap::new();
    read_safetensors(&c.dir.join("optimizer.safetensors"), &mut opt)?;
    trainer.load_optimizer_state(ctx, &opt, c.state.step)?;
    Ok(())
}

/// The JSONL log: one line per step and per evaluation, kept in memory too so that a checkpoint
/// records exactly the lines up to its step.
pub(super) struct Log {
    pub path: PathBuf,
    file: std::fs::File,
    pub lines: Vec<String>,
}

impl Log {
    /// A new log holding `lines` (a resumed run's history), written through a temporary file.
    pub fn create(path: PathBuf, lines: Vec<String>) -> Result<Log> {
        let mut text = lines.join("\n");
        if !text.is_empty() {
            text.push('\n');
        }
        write_atomic(&path, text.as_bytes())?;
        let file = std::fs::OpenOptions::new().append(true).open(&path).map_err(io_err(&path))?;
        Ok(Log { path, file, lines })
    }

    pub fn line(&mut self, v: serde_json::Value) -> Result<()> {
        let line = v.to_string();
        writeln!(self.file, "{line}").map_err(|source| FinetuneError::Io {
            path: self.path.clone(),
            what: "writing the log: ",
            source,
        })?;
        self.lines.push(line);
        Ok(())
    }

    pub fn sync(&self) -> Result<()> {
        self.file.sync_all().map_err(io_err(&self.path))
    }
}

/// The log lines of a checkpoint written before checkpoints kept them: rebuilt from the history
/// (losses only; the other fields of those steps are lost).
pub(super) fn lines_from_history(summary: &Summary) -> Vec<String> {
    let mut lines: Vec<String> =
        summary.train_loss.iter().map(|&(s, l)| serde_json::json!({"step": s, "loss": l}).to_string()).collect();
    lines.extend(summary.val_loss.iter().map(|&(s, v)| serde_json::json!({"step": s, "val_loss": v}).to_string()));
    lines
}
