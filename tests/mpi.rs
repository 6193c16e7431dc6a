//! Data-parallel training under `mpirun` (built with `--features mpi`; `.ci/run` installs Open
//! MPI and runs these): the same curves and parameters as one process, bit-identical repeats,
//! one writer, and a run whose process was killed resumes to the same end.
#![cfg(feature = "mpi")]

mod common;
use common::{losses, root, s, scratch};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The runs share two cores: one at a time.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn mpirun_command(n: usize, args: &[&str]) -> Command {
    let mut c = Command::new("mpirun");
    c.args(["--allow-run-as-root", "--oversubscribe", "-n", &n.to_string(), "--mca", "btl", "self,vader"])
        .arg(env!("CARGO_BIN_EXE_aec"))
        .args(args)
        .current_dir(root());
    c
}

fn run(n: usize, args: &[&str]) -> Output {
    let out = if n == 1 {
        Command::new(env!("CARGO_BIN_EXE_aec")).args(args).current_dir(root()).output()
    } else {
        mpirun_command(n, args).output()
    };
    out.expect("run aec")
}

/// A small dense autoencoder on 96 digits; `batch` 40 splits unevenly over 2 and 3 processes.
fn spec(dir: &Path, epochs: u64) -> PathBuf {
    let digits = aec::data::read_npy(&root().join("specs/data/digits-images.npy")).expect("digits");
    let aec::data::Values::F32(v) = &digits.values else { panic!("f32") };
    let first = aec::data::Array {
        shape: vec![96, 8, 8],
        values: aec::data::Values::F32(v[..96 * 64].iter().map(|x| x / 16.0).collect()),
    };
    aec::data::write_npy(&dir.join("d.npy"), &first).expect("data");
    let path = dir.join("m.ae");
    std::fs::write(
        &path,
        format!(
            "model m {{\n input x: [8, 8]\n encoder {{ flatten; dense 32 -> relu; dense 8 -> relu }}\n \
             decoder {{ dense 32 -> relu; dense 64 -> sigmoid; reshape [8, 8] }}\n loss bce(x) + 1e-4 * l2(weights)\n}}\n\
             train {{\n data npy(\"d.npy\")\n batch 40\n epochs {epochs}\n optimizer sgd(lr: 0.5, momentum: 0.9)\n seed 3\n}}\n"
        ),
    )
    .expect("spec");
    path
}

fn params(dir: &Path) -> Vec<(String, Vec<f32>)> {
    let mut p: Vec<_> = aec::runtime::checkpoint::read_all(&dir.join("checkpoint.safetensors"))
        .expect("checkpoint")
        .into_iter()
        .map(|(n, _, v)| (n, v))
        .collect();
    p.sort_by(|a, b| a.0.cmp(&b.0));
    p
}

#[test]
fn two_and_three_processes_train_as_one_does() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let dir = scratch("mpi-agree");
    let spec = spec(&dir, 20);
    let mut runs = Vec::new();
    for n in [1, 2, 3] {
        let out = dir.join(format!("n{n}"));
        let o = run(n, &["run", "--train", s(&spec), "--threads", "1", "--out", s(&out)]);
        assert!(o.status.success(), "-n {n}: {}", String::from_utf8_lossy(&o.stderr));
        let stdout = String::from_utf8_lossy(&o.stdout);
        assert_eq!(stdout.matches("trained 20 epochs").count(), 1, "one process reports:\n{stdout}");
        runs.push(out);
    }
    let (one, one_params) = (losses(&runs[0]), params(&runs[0]));
    assert_eq!(one.len(), 20, "60 steps in 20 epochs");
    for (n, out) in [(2, &runs[1]), (3, &runs[2])] {
        let many = losses(out);
        assert_eq!(many.len(), one.len(), "-n {n}: epochs in metrics.jsonl");
        for (e, (a, b)) in one.iter().zip(&many).enumerate() {
            assert!((a - b).abs() <= 1e-5 * a.abs(), "-n {n} epoch {}: {a} vs {b}", e + 1);
        }
        let many_params = params(out);
        let names = |p: &[(String, Vec<f32>)]| p.iter().map(|t| t.0.clone()).collect::<Vec<_>>();
        assert_eq!(names(&many_params), names(&one_params), "-n {n}: the checkpoint's tensors");
        for ((name, a), (_, b)) in one_params.iter().zip(&many_params) {
            assert_eq!(a.len(), b.len(), "-n {n}: {name}'s size");
            let d = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
            assert!(d <= 1e-5, "-n {n}: {name} differs by {d}");
        }
    }
}

#[test]
fn two_runs_of_two_processes_are_bit_identical() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let dir = scratch("mpi-repeat");
    let spec = spec(&dir, 10);
    for k in ["a", "b"] {
        let o = run(2, &["run", "--train", s(&spec), "--out", s(&dir.join(k))]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    assert_eq!(params(&dir.join("a")), params(&dir.join("b")));
    assert_eq!(losses(&dir.join("a")), losses(&dir.join("b")));
}

#[test]
fn a_killed_process_leaves_a_checkpoint_that_resumes_to_the_same_end() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let dir = scratch("mpi-kill");
    let spec = spec(&dir, 20000);
    let (cut, whole) = (dir.join("cut"), dir.join("whole"));
    let mut job = mpirun_command(2, &["run", "--train", s(&spec), "--threads", "1", "--out", s(&cut)])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("mpirun");
    // Wait for a save (every 2 s), then kill the process of rank 1 (not the writer), found
    // among mpirun's children by the rank Open MPI gives it in its environment.
    let started = Instant::now();
    while !cut.join("checkpoint.safetensors").exists() {
        assert!(started.elapsed() < Duration::from_secs(60), "no checkpoint within a minute");
        std::thread::sleep(Duration::from_millis(50));
    }
    let children: Vec<(String, Option<String>)> = std::fs::read_dir("/proc")
        .expect("/proc")
        .flatten()
        .filter_map(|e| {
            let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
            let ppid = stat.rsplit(')').next()?.split_whitespace().nth(1)?.parse::<u32>().ok()?;
            if ppid != job.id() {
                return None;
            }
            let env = std::fs::read(e.path().join("environ")).unwrap_or_default();
            let rank = env
                .split(|&b| b == 0)
                .find_map(|v| v.strip_prefix(b"OMPI_COMM_WORLD_RANK="))
                .map(|r| String::from_utf8_lossy(r).into_owned());
            Some((e.file_name().to_string_lossy().into_owned(), rank))
        })
        .collect();
    assert_eq!(children.len(), 2, "mpirun's processes: {children:?}");
    let second = children.iter().find(|c| c.1.as_deref() == Some("1")).expect("the process of rank 1");
    let killed = Command::new("kill").args(["-9", &second.0]).status().expect("kill");
    assert!(killed.success());
    let status = job.wait().expect("mpirun ends");
    assert!(!status.success(), "the job must end when a process dies");
    let saved = losses(&cut).len();
    assert!(saved > 0 && saved < 20000, "{saved} epochs saved");

    let o = run(2, &["run", "--train", s(&spec), "--threads", "1", "--resume", s(&cut)]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = run(2, &["run", "--train", s(&spec), "--threads", "1", "--out", s(&whole)]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(params(&cut), params(&whole), "resumed after epoch {saved}: parameters differ");
    assert_eq!(losses(&cut), losses(&whole));
}

#[test]
fn a_spec_error_is_printed_once() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let dir = scratch("mpi-spec-error");
    let bad = dir.join("bad.ae");
    std::fs::write(
        &bad,
        "model m {\n input x: [8]\n encoder { dense 3 -> sigmoidd }\n decoder { dense 8 }\n loss mse(x)\n}\n",
    )
    .expect("spec");
    let o = run(2, &["run", "--train", s(&bad), "--out", s(&dir.join("run"))]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(err.matches("bad.ae:3:").count(), 1, "the diagnostic once, not per process:\n{err}");
}

#[test]
fn batch_norm_normalizes_each_process_shard_by_itself() {
    // As DistributedDataParallel without SyncBatchNorm: each process normalizes its shard by the
    // shard's statistics. With the parameters held still (SGD at lr 1e-30), two processes at
    // batch 40 see the shards of 20 that one process at batch 20 sees as whole batches, so the
    // epoch's loss is the same; each process counts its own batches.
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let dir = scratch("mpi-bn");
    let digits = aec::data::read_npy(&root().join("specs/data/digits-images.npy")).expect("digits");
    let aec::data::Values::F32(v) = &digits.values else { panic!("f32") };
    let first = aec::data::Array {
        shape: vec![80, 8, 8],
        values: aec::data::Values::F32(v[..80 * 64].iter().map(|x| x / 16.0).collect()),
    };
    aec::data::write_npy(&dir.join("d.npy"), &first).expect("data");
    let spec = |batch: u64| {
        let path = dir.join(format!("bn{batch}.ae"));
        std::fs::write(
            &path,
            format!(
                "model m {{\n input x: [1, 8, 8]\n encoder {{ conv 4 k3 p1 nobias; batchnorm -> relu; flatten; dense 8 nobias; batchnorm -> relu }}\n \
                 decoder {{ dense 64 -> sigmoid; reshape [1, 8, 8] }}\n loss mse(x)\n}}\n\
                 train {{\n data npy(\"d.npy\")\n batch {batch}\n epochs 1\n optimizer sgd(lr: 1e-30)\n seed 3\n}}\n"
            ),
        )
        .expect("spec");
        path
    };
    let (one, two) = (dir.join("one"), dir.join("two"));
    let out = run(1, &["run", "--train", s(&spec(20)), "--out", s(&one)]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = run(2, &["run", "--train", s(&spec(40)), "--out", s(&two)]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (a, b) = (losses(&one)[0], losses(&two)[0]);
    assert!((a - b).abs() <= 1e-6 * a.abs(), "one process at batch 20: {a}; two at batch 40: {b}");
    let count = |dir: &Path| {
        params(dir).into_iter().find(|(n, _)| n == "encoder.1.num_batches_tracked").expect("count").1[0]
    };
    assert_eq!(count(&one), 4.0);
    assert_eq!(count(&two), 2.0, "process 0 counts its own two batches");
}

#[test]
fn early_stopping_is_decided_once_for_every_process() {
    // Process 0 alone validates; it decides to stop and the others stop with it, at the epoch
    // one process stops at (the curves are the same).
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let dir = scratch("mpi-early");
    let path = spec(&dir, 400);
    let text = std::fs::read_to_string(&path)
        .expect("spec")
        .replace(" seed 3\n", " seed 3\n validation 0.2\n early_stop(patience: 2, min_delta: 1e-3)\n");
    std::fs::write(&path, text).expect("spec");
    let (one, two) = (dir.join("one"), dir.join("two"));
    let out = run(1, &["run", "--train", s(&path), "--out", s(&one)]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = run(2, &["run", "--train", s(&path), "--out", s(&two)]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let (a, b) = (losses(&one).len(), losses(&two).len());
    assert!(a < 400, "one process stops early ({a} epochs)");
    assert_eq!(a, b, "{stdout}");
    assert!(stdout.contains(&format!("stopped early after epoch {b}")), "{stdout}");
    assert!(two.join("best.safetensors").exists());
}

#[test]
fn clipping_and_a_plateau_schedule_see_the_whole_batch() {
    // `clip norm` scales by the norm of the gradient summed over the processes, and the plateau
    // schedule moves on process 0's validation loss for all: two processes train as one does.
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let dir = scratch("mpi-controls");
    let path = spec(&dir, 30);
    let text = std::fs::read_to_string(&path).expect("spec").replace(
        " seed 3\n",
        " seed 3\n validation 0.2\n clip norm(0.05)\n schedule plateau(factor: 0.5, patience: 1)\n",
    );
    std::fs::write(&path, text).expect("spec");
    let (one, two) = (dir.join("one"), dir.join("two"));
    for (n, out) in [(1, &one), (2, &two)] {
        let o = run(n, &["run", "--train", s(&path), "--threads", "1", "--out", s(out)]);
        assert!(o.status.success(), "-n {n}: {}", String::from_utf8_lossy(&o.stderr));
    }
    let lrs = |d: &Path| -> Vec<f64> {
        std::fs::read_to_string(d.join("metrics.jsonl"))
            .expect("metrics")
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("json")["lr"].as_f64().expect("lr"))
            .collect()
    };
    assert_eq!(lrs(&one), lrs(&two));
    assert!(lrs(&one).windows(2).any(|w| w[1] < w[0]), "the rate is reduced: {:?}", lrs(&one));
    for ((name, a), (_, b)) in params(&one).iter().zip(&params(&two)) {
        let d = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
        assert!(d <= 1e-5, "{name} differs by {d}");
    }
}
