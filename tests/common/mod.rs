//! Helpers the end-to-end tests share: the repository root, a fresh folder per test, and the
//! `aec` binary run from the root.
#![allow(dead_code)] // Each test file uses its own subset.

use std::path::{Path, PathBuf};
use std::process::Command;

pub fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// A fresh folder for one test's files, under the target's scratch space.
pub fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

/// Runs `aec` from the repository root: (exit code, stdout, stderr); −1 when a signal ended it.
pub fn aec(args: &[&str]) -> (i32, String, String) {
    let out =
        Command::new(env!("CARGO_BIN_EXE_aec")).args(args).current_dir(root()).output().expect("run aec");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `aec` as `aec` runs it, with environment variables set for it.
pub fn aec_env(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_aec"));
    cmd.args(args).current_dir(root());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run aec");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The training loss of each epoch in a run folder's `metrics.jsonl`.
pub fn losses(dir: &Path) -> Vec<f64> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .expect("metrics")
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).expect("json")["train_loss"].as_f64().expect("loss")
        })
        .collect()
}

pub fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// The names of the shipped specs (`specs/*.ae`), sorted: tests that cover "every spec" list
/// them, so a new spec is covered with no Rust to write.
pub fn shipped_specs() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(root().join("specs"))
        .expect("specs/")
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.strip_suffix(".ae")).map(str::to_owned))
        .collect();
    names.sort();
    names
}

/// Calls `f` on every item, on as many threads as the machine has cores. The long data-driven
/// tests (every shipped spec, every seed) would otherwise keep one core busy for a minute after
/// the short tests beside them are done. A panic in any call fails the test with its message.
pub fn each_in_parallel<T: Sync>(items: &[T], f: impl Fn(&T) + Sync) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let next = AtomicUsize::new(0);
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get()).clamp(1, items.len().max(1));
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| {
                while let Some(item) = items.get(next.fetch_add(1, Ordering::Relaxed)) {
                    f(item);
                }
            });
        }
    });
}
