//! Autotune results kept on disk: a process that starts on an adapter it has seen reuses them
//! instead of timing again, and so picks the same kernels every time.
//!
//! One JSON object per file, `{"<adapter>|<driver>|<driver info>|<key>": value}`, in
//! `$PORTALORA_CACHE/autotune.json` (default `~/.cache/portalora`; `$XDG_CACHE_HOME/portalora`
//! where that is set). Callers put a version of what they tuned into the key, so a changed
//! kernel is tuned afresh. Best effort throughout: a missing, unreadable or corrupt file reads
//! as empty and a failed write is ignored (tuning changes speed, never results); writes go to a
//! temporary file renamed into place, so concurrent processes never see half a file.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The cache file, when a cache folder can be named.
pub(super) fn path() -> Option<PathBuf> {
    let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    let dir = var("PORTALORA_CACHE")
        .or_else(|| var("XDG_CACHE_HOME").map(|d| d.join("portalora")))
        .or_else(|| var("HOME").map(|h| h.join(".cache").join("portalora")))?;
    Some(dir.join("autotune.json"))
}

fn read(path: &Path) -> BTreeMap<String, u32> {
    std::fs::read(path).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default()
}

/// The value stored under `key`, if any.
pub(super) fn load(path: &Path, key: &str) -> Option<u32> {
    read(path).get(key).copied()
}

/// Stores `value` under `key`, keeping the file's other entries.
pub(super) fn store(path: &Path, key: &str, value: u32) {
    let mut all = read(path);
    all.insert(key.to_string(), value);
    let Some(dir) = path.parent() else { return };
    // Unique per process and call: threads of one process may store at the same time.
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = dir.join(format!(".autotune.json.{}.{n}.tmp", std::process::id()));
    let ok = std::fs::create_dir_all(dir).is_ok()
        && serde_json::to_vec_pretty(&all).is_ok_and(|bytes| std::fs::write(&tmp, bytes).is_ok())
        && std::fs::rename(&tmp, path).is_ok();
    if !ok {
        let _ = std::fs::remove_file(&tmp);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stores_merge_and_bad_files_read_as_empty() {
        let dir = std::env::temp_dir().join(format!("portalora-tuned-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let p = dir.join("sub").join("autotune.json");
        assert_eq!(load(&p, "a"), None, "no file yet");
        store(&p, "a", 32002);
        store(&p, "b", 64001);
        assert_eq!((load(&p, "a"), load(&p, "b")), (Some(32002), Some(64001)));
        store(&p, "a", 16001);
        assert_eq!(load(&p, "a"), Some(16001), "a new value replaces the old");
        std::fs::write(&p, b"{ not json").unwrap();
        assert_eq!(load(&p, "b"), None, "a corrupt file reads as empty");
        store(&p, "c", 1);
        assert_eq!(load(&p, "c"), Some(1), "and is replaced by a good one");
        let leftovers: Vec<_> = std::fs::read_dir(p.parent().unwrap()).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "no temporary file left behind");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
