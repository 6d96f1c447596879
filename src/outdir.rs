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
    #[error(
        "{path} is a file, and the output is a folder: name a new or empty folder instead (a file is never \
         replaced, even with --overwrite)"
    )]
    NotAFolder { path: PathBuf },
    #[error(
        "{out}: cannot write in {path} ({source}); pick an output folder you can write to, or change its permissions"
    )]
    NotWritable {
        out: PathBuf,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
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
        // Never replaced, even with --overwrite: a file where a folder should go is a mistake.
        return Err(OutDirError::NotAFolder { path: out.to_path_buf() });
    }
    match contents(out) {
        Some(holds) if !overwrite => Err(OutDirError::NotEmpty { path: out.to_path_buf(), holds, what: what.into() }),
        _ => check_writable(out),
    }
}

/// Fails now, before the long work, where `out` (or the folder it would be made in) cannot be
/// written: a probe file is made in the nearest folder that exists, and removed.
pub fn check_writable(out: &Path) -> Result<()> {
    let abs = absolute(out);
    let Some(dir) = abs.ancestors().find(|a| a.exists()) else { return Ok(()) };
    let not_writable = |source| OutDirError::NotWritable { out: out.to_path_buf(), path: dir.to_path_buf(), source };
    if !dir.is_dir() {
        return Err(not_writable(std::io::Error::from(std::io::ErrorKind::NotADirectory)));
    }
    let probe = dir.join(format!(".portalora-probe-{}", std::process::id()));
    match std::fs::OpenOptions::new().write(true).create_new(true).open(&probe) {
        Ok(_) => {
            let _ = std::fs::remove_file(&probe);
            Ok(())
        }
        // One left by an earlier process of the same id: the folder takes files.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(source) => Err(not_writable(source)),
    }
}

/// An output folder held for the life of this value (the lock goes with it). A folder taken for
/// a new run ([`claim_new`]) holds nothing of value until [`Claim::keep`] says so (a run's first
/// checkpoint): dropped before that — an error, a panic — it removes the files the run writes
/// there (`written`, never anything else) and the folder when it made it and nothing else is
/// left in it, so that the same command can run again instead of finding a folder that is
/// neither empty nor resumable. The lock file goes when the claim ends (on Unix, where an open
/// file's name can be checked against it).
#[derive(Debug)]
pub struct Claim {
    pub dir: PathBuf,
    lock: Option<File>,
    /// For a new run not yet kept: whether the folder was made by this claim, and the names the
    /// run writes in it.
    fresh: Option<(bool, &'static [&'static str])>,
}

impl Claim {
    /// The folder now holds something worth keeping (a checkpoint): it stays.
    pub fn keep(&mut self) {
        self.fresh = None;
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        let lock = self.lock.take();
        let Some((made, written)) = self.fresh else { return remove_lock(&self.dir, lock) };
        // Still holding the lock: no other process can have taken the folder meanwhile.
        for name in written {
            let p = self.dir.join(name);
            let _ = if p.is_dir() { std::fs::remove_dir_all(&p) } else { std::fs::remove_file(&p) };
        }
        remove_lock(&self.dir, lock);
        if made {
            // Only when empty: whatever someone else put there stays, with the folder.
            let _ = std::fs::remove_dir(&self.dir);
        }
    }
}

/// Removes the lock file while it is still held and still the one at its name (so that no other
/// process can have taken it in between), then releases it. Elsewhere than on Unix the file stays
/// (the lock is the open file's, released all the same).
fn remove_lock(dir: &Path, lock: Option<File>) {
    let path = dir.join(LOCK_FILE);
    if cfg!(unix) && lock.as_ref().is_some_and(|f| same_file(f, &path)) {
        let _ = std::fs::remove_file(&path);
    }
    drop(lock);
}

/// Whether `f` is still the file at `path` (a lock file another process removed while this one
/// opened it is not: locking it would lock nothing).
fn same_file(f: &File, path: &Path) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        match (f.metadata(), std::fs::metadata(path)) {
            (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
            _ => false,
        }
    }
    #[cfg(not(unix))]
    {
        // No lock file is removed there (see `remove_lock`): the file at `path` is this one.
        let _ = (f, path);
        true
    }
}

fn lock(dir: &Path) -> Result<File> {
    let path = dir.join(LOCK_FILE);
    // A finished run removes its lock file while holding it: one opened just before that is
    // opened afresh.
    for _ in 0..8 {
        let f = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(&path).map_err(io(&path))?;
        match f.try_lock() {
            Ok(()) if same_file(&f, &path) => return Ok(f),
            Ok(()) => continue,
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(OutDirError::Locked { path: dir.to_path_buf(), lock: path })
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(io(&path)(e)),
        }
    }
    Err(OutDirError::Locked { path: dir.to_path_buf(), lock: path })
}

/// Takes the folder `dir` for a new run that writes the files or folders `written` in it: with
/// `overwrite` an existing folder is replaced whole (after taking its lock, so that a run still
/// writing there is never pulled from under it); then it is created and locked. Call [`check`]
/// first, before the long work; a folder that filled since is refused here.
pub fn claim_new(dir: &Path, overwrite: bool, written: &'static [&'static str]) -> Result<Claim> {
    let mut made = !dir.exists();
    if overwrite && dir.is_dir() && contents(dir).is_some() {
        let held = lock(dir)?;
        std::fs::remove_dir_all(dir).map_err(io(dir))?;
        drop(held);
        made = true;
    }
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let mut claim = Claim { dir: dir.to_path_buf(), lock: Some(lock(dir)?), fresh: None };
    if let Some(holds) = contents(dir) {
        return Err(OutDirError::NotEmpty {
            path: dir.to_path_buf(),
            holds,
            what: "something was written there while this run was starting; pick another output".into(),
        });
    }
    claim.fresh = Some((made, written));
    Ok(claim)
}

/// Takes an existing folder (a run to resume): only its lock.
pub fn claim_existing(dir: &Path) -> Result<Claim> {
    Ok(Claim { dir: dir.to_path_buf(), lock: Some(lock(dir)?), fresh: None })
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
        let mut claim = claim_new(&out, true, &[]).unwrap();
        assert!(!out.join("adapter_model.safetensors").exists(), "replaced whole");
        // A second claim while the first holds the lock is refused; once released it succeeds.
        let e = claim_existing(&out).unwrap_err().to_string();
        assert!(e.contains("in use"), "{e}");
        claim.keep(); // what a run does at its first checkpoint
        std::fs::write(out.join("checkpoint"), b"kept").unwrap();
        drop(claim);
        assert!(out.join("checkpoint").exists() && !out.join(LOCK_FILE).exists(), "kept, without its lock file");
        claim_existing(&out).unwrap();
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_claim_not_kept_removes_what_it_wrote() {
        let d = tmp("fresh");
        // A folder the claim made goes whole.
        const RUN: &[&str] = &["run.json", "log.jsonl", "checkpoint.tmp"];
        let made = d.join("made");
        let claim = claim_new(&made, false, RUN).unwrap();
        std::fs::write(made.join("run.json"), b"{}").unwrap();
        drop(claim);
        assert!(!made.exists());
        // One that was there, empty, stays, emptied.
        let was = d.join("was");
        std::fs::create_dir_all(&was).unwrap();
        let claim = claim_new(&was, false, RUN).unwrap();
        std::fs::create_dir_all(was.join("checkpoint.tmp")).unwrap();
        std::fs::write(was.join("log.jsonl"), b"").unwrap();
        drop(claim);
        assert!(was.is_dir() && std::fs::read_dir(&was).unwrap().count() == 0);
        // What someone else put in a folder the run made stays, and so does the folder.
        let claim = claim_new(&made, false, RUN).unwrap();
        std::fs::write(made.join("run.json"), b"{}").unwrap();
        std::fs::write(made.join("notes.txt"), b"mine").unwrap();
        drop(claim);
        assert!(made.join("notes.txt").exists() && !made.join("run.json").exists());
        // A folder that filled after the check is refused, not taken.
        assert!(claim_new(&made, false, RUN).unwrap_err().to_string().contains("notes.txt"));
        // A resumed run's folder is never removed.
        std::fs::write(was.join("run.json"), b"{}").unwrap();
        drop(claim_existing(&was).unwrap());
        assert!(was.join("run.json").exists());
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
