//! Output folders that never clobber work: a folder that holds something is refused unless the
//! caller asked to replace it (`--overwrite`, then it is replaced whole), an output is never one
//! of the inputs nor a folder holding one, a lock file keeps two runs out of one folder, and a
//! folder is written beside its final name and renamed into place.
//!
//! The lock is an advisory lock on `OUT/.portalora.lock` (`File::try_lock`): the operating
//! system releases it when the process ends, however it ends, so a run killed with SIGKILL
//! leaves no stale lock behind and `--resume` takes the folder again at once.

use std::fs::File;
use std::path::{Path, PathBuf};

/// The lock file's name inside an output folder.
pub const LOCK_FILE: &str = ".portalora.lock";

#[derive(Debug, thiserror::Error)]
pub enum OutDirError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not empty (it holds {holds}); {what}")]
    NotEmpty { path: PathBuf, holds: String, what: String },
    #[error("{out} would overwrite the input {input}; write the output somewhere else")]
    IsInput { out: PathBuf, input: PathBuf },
    #[error("{path} is in use by another portalora process ({lock} is locked); wait for it to finish or pick another output")]
    Locked { path: PathBuf, lock: PathBuf },
}

type Result<T> = std::result::Result<T, OutDirError>;

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> OutDirError + '_ {
    move |source| OutDirError::Io { path: path.to_path_buf(), source }
}

/// `p` as an absolute path with symbolic links resolved as far as it exists (an output that does
/// not exist yet is its resolved parent plus its name).
pub fn absolute(p: &Path) -> PathBuf {
    if let Ok(c) = p.canonicalize() {
        return c;
    }
    match (p.parent(), p.file_name()) {
        (Some(parent), Some(name)) if !parent.as_os_str().is_empty() => absolute(parent).join(name),
        _ => std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf()),
    }
}

/// Refuses an output `out` that is one of `inputs` or a folder holding one (replacing it would
/// destroy the input).
pub fn check_not_input(out: &Path, inputs: &[&Path]) -> Result<()> {
    let o = absolute(out);
    for input in inputs {
        if absolute(input).starts_with(&o) {
            return Err(OutDirError::IsInput { out: out.to_path_buf(), input: input.to_path_buf() });
        }
    }
    Ok(())
}

/// The names a folder holds besides its lock file (up to four, for messages), or None when it
/// is missing or holds nothing else.
fn contents(dir: &Path) -> Option<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name() != LOCK_FILE)
        .map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            if e.path().is_dir() {
                format!("{name}/")
            } else {
                name
            }
        })
        .collect();
    if names.is_empty() {
        return None;
    }
    names.sort();
    let more = names.len().saturating_sub(4);
    names.truncate(4);
    Some(if more > 0 { format!("{}, … {more} more", names.join(", ")) } else { names.join(", ") })
}

/// Checks, before any work, that `out` may be written: it is not an input, and it is missing or
/// empty unless `overwrite`. `what` says what to do instead (it ends the message).
pub fn check(out: &Path, inputs: &[&Path], overwrite: bool, what: &str) -> Result<()> {
    check_not_input(out, inputs)?;
    if out.exists() && !out.is_dir() {
        return Err(OutDirError::NotEmpty { path: out.to_path_buf(), holds: "a file".into(), what: what.into() });
    }
    match contents(out) {
        Some(holds) if !overwrite => Err(OutDirError::NotEmpty { path: out.to_path_buf(), holds, what: what.into() }),
        _ => Ok(()),
    }
}

/// An output folder held for the life of this value (the lock goes with it).
#[derive(Debug)]
pub struct Claim {
    pub dir: PathBuf,
    _lock: File,
}

fn lock(dir: &Path) -> Result<File> {
    let path = dir.join(LOCK_FILE);
    let f = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(&path).map_err(io(&path))?;
    match f.try_lock() {
        Ok(()) => Ok(f),
        Err(std::fs::TryLockError::WouldBlock) => Err(OutDirError::Locked { path: dir.to_path_buf(), lock: path }),
        Err(std::fs::TryLockError::Error(e)) => Err(io(&path)(e)),
    }
}

/// Takes the folder `dir` for a new run: with `overwrite` an existing folder is replaced whole
/// (after taking its lock, so that a run still writing there is never pulled from under it);
/// then it is created and locked. Call [`check`] first, before the long work.
pub fn claim_new(dir: &Path, overwrite: bool) -> Result<Claim> {
    if overwrite && dir.is_dir() && contents(dir).is_some() {
        let held = lock(dir)?;
        std::fs::remove_dir_all(dir).map_err(io(dir))?;
        drop(held);
    }
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    Ok(Claim { dir: dir.to_path_buf(), _lock: lock(dir)? })
}

/// Takes an existing folder (a run to resume): only its lock.
pub fn claim_existing(dir: &Path) -> Result<Claim> {
    Ok(Claim { dir: dir.to_path_buf(), _lock: lock(dir)? })
}

/// `dir` with `suffix` added to its name (`out/` → `out.tmp`).
pub fn sibling(dir: &Path, suffix: &str) -> PathBuf {
    let mut name = dir.components().collect::<PathBuf>().into_os_string();
    name.push(suffix);
    PathBuf::from(name)
}

/// Writes a folder's files through `dir.tmp` and renames it over `dir`, so that `dir` is never
/// half written: the old folder (kept as `dir.old` for the moment between the two renames) is
/// removed only after the new one is in place.
pub fn write_dir_atomic<E: From<OutDirError>>(
    dir: &Path,
    write: impl FnOnce(&Path) -> std::result::Result<(), E>,
) -> std::result::Result<(), E> {
    let (tmp, old) = (sibling(dir, ".tmp"), sibling(dir, ".old"));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(io(&tmp))?;
    write(&tmp)?;
    if dir.exists() {
        let _ = std::fs::remove_dir_all(&old);
        std::fs::rename(dir, &old).map_err(io(dir))?;
    }
    std::fs::rename(&tmp, dir).map_err(io(dir))?;
    let _ = std::fs::remove_dir_all(&old);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("portalora-outdir-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn a_folder_holding_something_is_refused_unless_overwritten() {
        let d = tmp("nonempty");
        let out = d.join("out");
        check(&out, &[], false, "x").unwrap(); // missing: fine
        std::fs::create_dir_all(&out).unwrap();
        check(&out, &[], false, "x").unwrap(); // empty: fine
        std::fs::write(out.join("adapter_model.safetensors"), b"old").unwrap();
        let e = check(&out, &[], false, "pick another").unwrap_err().to_string();
        assert!(e.contains("adapter_model.safetensors") && e.contains("pick another"), "{e}");
        check(&out, &[], true, "x").unwrap();
        let claim = claim_new(&out, true).unwrap();
        assert!(!out.join("adapter_model.safetensors").exists(), "replaced whole");
        // A second claim while the first holds the lock is refused; once released it succeeds.
        let e = claim_existing(&out).unwrap_err().to_string();
        assert!(e.contains("in use"), "{e}");
        drop(claim);
        claim_existing(&out).unwrap();
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn an_output_is_never_an_input_or_a_folder_holding_one() {
        let d = tmp("input");
        let model = d.join("model");
        std::fs::create_dir_all(&model).unwrap();
        std::fs::write(model.join("config.json"), "{}").unwrap();
        for out in [model.clone(), d.clone(), model.join("..").join("model")] {
            let e = check(&out, &[&model], true, "x").unwrap_err().to_string();
            assert!(e.contains("would overwrite the input"), "{out:?}: {e}");
        }
        check(&d.join("merged"), &[&model], false, "x").unwrap();
        check(&model.join("sub"), &[&model.join("config.json")], false, "x").unwrap();
        std::fs::remove_dir_all(&d).unwrap();
    }
}
