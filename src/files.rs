//! Files written whole or not at all: a write goes to a temporary file beside the target, is
//! synced, and renamed over it. The save transaction of `runtime::checkpoint` is built from
//! these steps, and every other output (data written back, pictures, ONNX files) uses
//! [`write_atomic`].

use std::io::Write;
use std::path::{Path, PathBuf};

/// Writes `bytes` to `path` through a temporary file and a rename. A symbolic link is followed
/// (its target is replaced, beside the target); a device, FIFO or folder is refused, never
/// replaced by a file.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let target = regular_target(path)?;
    let path = target.as_path();
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
    let result = (|| {
        write_synced(&tmp, bytes)?;
        fault()?;
        std::fs::rename(&tmp, path)?;
        sync_dir(path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// The file a write to `path` replaces: `path` itself, or the end of its chain of symbolic
/// links; an error when that is something other than a regular file.
fn regular_target(path: &Path) -> std::io::Result<PathBuf> {
    let mut at = path.to_path_buf();
    for _ in 0..40 {
        match std::fs::symlink_metadata(&at) {
            Ok(m) if m.file_type().is_symlink() => {
                let link = std::fs::read_link(&at)?;
                at = at.parent().map_or(link.clone(), |dir| dir.join(&link));
            }
            Ok(m) if !m.is_file() => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "it is not a regular file (a device, FIFO, socket or folder); aec only writes files",
                ));
            }
            _ => return Ok(at),
        }
    }
    Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "too many levels of symbolic links"))
}

/// Creates `path` with `bytes` and syncs it to disk.
pub fn write_synced(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    fault()?;
    let mut f = std::fs::File::create(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

/// Syncs the folder holding `path`, so a rename in it is on disk.
pub fn sync_dir(path: &Path) -> std::io::Result<()> {
    match path.parent().filter(|p| !p.as_os_str().is_empty()) {
        Some(dir) => std::fs::File::open(dir)?.sync_all(),
        None => Ok(()),
    }
}

/// A test-only switch: `AEC_FAULT_SAVE=K` makes the K-th write or rename of this process kill
/// it on the spot (as `kill -9` would), and `AEC_FAULT_SAVE=K:enospc` makes it fail as a full
/// disk does. The tests of [`commit`] go through every K.
pub fn fault() -> std::io::Result<()> {
    use std::sync::atomic::{AtomicU64, Ordering};
    static DONE: AtomicU64 = AtomicU64::new(0);
    let Ok(spec) = std::env::var("AEC_FAULT_SAVE") else { return Ok(()) };
    let (k, kind) = spec.split_once(':').unwrap_or((&spec, "kill"));
    let n = DONE.fetch_add(1, Ordering::SeqCst) + 1;
    if k.parse::<u64>().ok() != Some(n) {
        return Ok(());
    }
    if kind == "enospc" {
        return Err(std::io::Error::from_raw_os_error(28));
    }
    std::process::abort()
}
