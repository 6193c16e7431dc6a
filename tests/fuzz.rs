//! A mutation fuzzer over every shipped spec and every bad spec: byte flips, deleted and
//! duplicated tokens, lines spliced between specs, extreme numbers, very long lines and deep
//! nesting. Each input goes through the library as `aec compile` would take it (the table's
//! diagnostics rendered, `--emit ir`, `grad` and `fused`), and must come back without a panic,
//! an abort or a long stall.
//!
//! It runs for `AEC_FUZZ_SECONDS` (default 15, or 20 under CI) from seed `AEC_FUZZ_SEED`
//! (default 1); `AEC_FUZZ_SECONDS=3600 cargo test --release --test fuzz` runs it for an hour.
//! Every input that ever crashed it is kept in `tests/fuzz/` and runs first, every time: a
//! panic or a stall at once (each input runs under a watchdog thread, and the panic's message
//! is in the failure); an abort by the next run, which finds it where it was left and runs it
//! first.

use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// An input slower than this fails the fuzzer (a debug build compiling the largest specs
/// natively takes well under a second).
const PER_INPUT: Duration = Duration::from_secs(30);

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn specs_in(dir: &Path) -> Vec<(PathBuf, String)> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|d| d.flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|e| e == "ae")).collect())
        .unwrap_or_default();
    paths.sort();
    paths.into_iter().map(|p| (p.clone(), std::fs::read_to_string(&p).unwrap_or_default())).collect()
}

/// What `aec compile` does with a spec, through the library: every emitted form of it.
fn exercise(src: &str) {
    let config = aec::Config { batch: Some(2) };
    match aec::compile(src, &config) {
        Err(diags) => {
            let _ = aec::diag::render(&diags, "fuzz.ae", src, false);
        }
        Ok(c) => {
            let _ = aec::diag::render(&c.warnings, "fuzz.ae", src, false);
            let _ = c.model.table(src);
            let _ = aec::ir::print(&c.forward, Some(src));
            if let Ok(g) = aec::training_step(&c) {
                let _ = aec::ir::print(&g, Some(src));
                if let Ok(p) = aec::codegen::Program::compile(&g, aec::codegen::Options::default()) {
                    let _ = aec::codegen::describe(&p);
                }
            }
        }
    }
}

/// Where the input being run is written first: an abort (a stack overflow) ends the process
/// with it on disk, and the next run keeps it in `tests/fuzz/` ([`keep_last_abort`]).
fn current() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join("fuzz-current.ae")
}

/// The message of the last panic, which the quiet hook records instead of printing.
static LAST_PANIC: std::sync::Mutex<String> = std::sync::Mutex::new(String::new());

/// Keeps `src` in `tests/fuzz/`, where it runs first from now on.
fn keep(src: &str) -> PathBuf {
    let kept = root().join("tests/fuzz").join(format!("crash-{:016x}.ae", hash(src)));
    let _ = std::fs::create_dir_all(kept.parent().unwrap_or(root()));
    let _ = std::fs::write(&kept, src);
    kept
}

/// Runs one input on a thread of its own; a panic or a stall past [`PER_INPUT`] (the watchdog:
/// a hang fails the test, it does not block it) is a failure, and the input is kept.
fn check(src: &str, origin: &str) {
    let _ = std::fs::write(current(), src);
    let (done, finished) = std::sync::mpsc::channel();
    let text = src.to_owned();
    std::thread::spawn(move || {
        let result = std::panic::catch_unwind(|| exercise(&text));
        let _ = done.send(result.is_ok());
    });
    let why = match finished.recv_timeout(PER_INPUT) {
        Ok(true) => return,
        Ok(false) | Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
            format!("panicked: {}", LAST_PANIC.lock().map(|m| m.clone()).unwrap_or_default())
        }
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => format!("ran past {PER_INPUT:?}"),
    };
    let kept = keep(src);
    let _ = std::fs::remove_file(current());
    panic!("a mutation of {origin} {why}; the input is kept in {}", kept.display());
}

/// An input left in [`current`] by a run that did not finish (an abort ends the process
/// without a panic; so does an interrupted run) is kept in `tests/fuzz/`, and so runs first.
fn keep_last_abort() {
    if let Ok(src) = std::fs::read_to_string(current()) {
        let kept = keep(&src);
        let _ = std::fs::remove_file(current());
        eprintln!(
            "the last fuzzing run ended inside an input; it is kept in {} and runs first",
            kept.display()
        );
    }
}

fn hash(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

/// Tokens as the mutations see them: runs of word characters, of spaces, or single symbols.
fn tokens(src: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let kind = |c: char| {
        if c.is_alphanumeric() || c == '_' || c == '.' {
            0
        } else if c.is_whitespace() {
            1
        } else {
            2
        }
    };
    for c in src.chars() {
        match out.last_mut() {
            Some(t) if kind(c) != 2 && t.chars().last().is_some_and(|l| kind(l) == kind(c)) => t.push(c),
            _ => out.push(c.to_string()),
        }
    }
    out
}

const EXTREMES: [&str; 12] = [
    "0",
    "1",
    "65535",
    "65536",
    "2147483648",
    "4294967297",
    "18446744073709551616",
    "1e308",
    "1e-320",
    "-1",
    "0.5",
    "268435457",
];

fn mutate(rng: &mut ChaCha8Rng, src: &str, corpus: &[(PathBuf, String)]) -> String {
    let mut toks = tokens(src);
    if toks.is_empty() {
        toks.push(String::new());
    }
    let at = rng.random_range(0..toks.len());
    match rng.random_range(0..8) {
        // A byte flipped (the result read as UTF-8, replacing what is not).
        0 => {
            let mut bytes = src.as_bytes().to_vec();
            if !bytes.is_empty() {
                let i = rng.random_range(0..bytes.len());
                bytes[i] ^= 1 << rng.random_range(0..8);
            }
            return String::from_utf8_lossy(&bytes).into_owned();
        }
        1 => {
            toks.remove(at);
        }
        2 => {
            let t = toks[at].clone();
            toks.insert(at, t);
        }
        // A line of another spec spliced in.
        3 => {
            let other = &corpus[rng.random_range(0..corpus.len())].1;
            let lines: Vec<&str> = other.lines().collect();
            if !lines.is_empty() {
                let line = lines[rng.random_range(0..lines.len())];
                toks.insert(at, format!("\n{line}\n"));
            }
        }
        // An extreme number in place of a number.
        4 => {
            let numbers: Vec<usize> =
                (0..toks.len()).filter(|&i| toks[i].starts_with(|c: char| c.is_ascii_digit())).collect();
            if !numbers.is_empty() {
                let i = numbers[rng.random_range(0..numbers.len())];
                toks[i] = EXTREMES[rng.random_range(0..EXTREMES.len())].to_owned();
            }
        }
        // A very long line: spaces, or a very long word.
        5 => {
            let n = rng.random_range(60_000..70_000);
            toks.insert(at, if rng.random::<bool>() { " ".repeat(n) } else { "w".repeat(n) });
        }
        // Deep nesting of one bracket kind around a token.
        6 => {
            let (open, close) = [("(", ")"), ("[", "]"), ("{", "}"), ("npy(", ")")][rng.random_range(0..4)];
            let depth = [3, 70, 10_000][rng.random_range(0..3)];
            let t = toks[at].clone();
            toks[at] = format!("{}{t}{}", open.repeat(depth), close.repeat(depth));
        }
        // A token moved elsewhere.
        _ => {
            let t = toks.remove(at);
            let to = rng.random_range(0..=toks.len());
            toks.insert(to, t);
        }
    }
    toks.concat()
}

#[test]
fn mutated_specs_never_panic_abort_or_stall() {
    keep_last_abort();
    let quiet = std::panic::take_hook();
    std::panic::set_hook(Box::new(|info| {
        if let Ok(mut last) = LAST_PANIC.lock() {
            *last = info.to_string();
        }
    }));
    // Every input that ever failed, first.
    for (path, src) in specs_in(&root().join("tests/fuzz")) {
        check(&src, &path.display().to_string());
    }
    let mut corpus = specs_in(&root().join("specs"));
    corpus.extend(specs_in(&root().join("specs/errors")));
    assert!(corpus.len() > 40, "the corpus is the shipped specs");
    let default = if std::env::var_os("CI").is_some() { 20 } else { 15 };
    let seconds = std::env::var("AEC_FUZZ_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(default);
    let seed = std::env::var("AEC_FUZZ_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(1);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut inputs = 0u64;
    while Instant::now() < deadline {
        let (path, src) = &corpus[rng.random_range(0..corpus.len())];
        let mut text = src.clone();
        for _ in 0..rng.random_range(1..4) {
            text = mutate(&mut rng, &text, &corpus);
        }
        check(&text, &path.display().to_string());
        inputs += 1;
    }
    std::panic::set_hook(quiet);
    let _ = std::fs::remove_file(current());
    eprintln!("fuzzed {inputs} inputs in {seconds} s from seed {seed}");
    assert!(inputs > 0);
}
