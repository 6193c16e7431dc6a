//! Inputs that crashed aec or silently lost or corrupted a run: each now gets a message saying
//! what and where, and leaves saved state as it was.

mod common;

use common::{aec, s};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A spec of `[dim]` vectors, an autoencoder through one unit, with `train` lines.
fn spec(dir: &Path, name: &str, dim: usize, train: &str) -> PathBuf {
    let path = dir.join(name);
    let text = format!(
        "model m {{\n input x: [{dim}]\n encoder {{ dense 1 }}\n decoder {{ dense {dim} }}\n loss mse(x)\n}}\ntrain {{\n{train}\n}}\n"
    );
    std::fs::write(&path, text).expect("spec");
    path
}

/// Trains `spec` into `dir/run`: (exit code, stderr).
fn train(spec: &Path, dir: &Path, extra: &[&str]) -> (i32, String) {
    let out = dir.join("run");
    let mut args = vec!["run", "--train", s(spec), "--out", s(&out)];
    args.extend(extra);
    let (code, _, err) = aec(&args);
    (code, err)
}

#[test]
fn a_validation_split_of_one_sample_is_located() {
    let dir = scratch("split");
    let spec = spec(&dir, "one.ae", 1, " data onehot(1)\n validation 0.5");
    let (code, err) = train(&spec, &dir, &[]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("one.ae:9:2"), "{err}");
    assert!(err.contains("a validation split needs at least 2 samples, and the data has 1"), "{err}");
}

#[test]
fn an_idx_header_whose_size_overflows_is_refused() {
    let dir = scratch("idx");
    let idx = dir.join("huge.idx");
    std::fs::write(&idx, [0, 0, 8, 3, 0, 0x40, 0, 0, 0, 0x20, 0, 0, 0, 0x20, 0, 0]).expect("idx");
    let spec = spec(&dir, "idx.ae", 4, &format!(" data patches(idx({:?}), size: 2)", s(&idx)));
    let (code, err) = train(&spec, &dir, &[]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("the IDX shape [4194304, 2097152, 2097152]"), "{err}");
    assert!(err.contains("idx.ae:8:2"), "{err}");
}

#[test]
fn data_files_must_be_regular_and_exactly_as_long_as_their_header_says() {
    let dir = scratch("regular");
    let zero = spec(&dir, "zero.ae", 4, " data npy(\"/dev/zero\")");
    let (code, err) = train(&zero, &dir, &[]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("/dev/zero is not a regular file"), "{err}");

    // Four samples of [4] and one float more.
    let npy = dir.join("long.npy");
    let a = aec::data::Array { shape: vec![4, 4], values: aec::data::Values::F32(vec![0.5; 16]) };
    aec::data::write_npy(&npy, &a).expect("npy");
    let mut bytes = std::fs::read(&npy).expect("npy");
    bytes.extend(1f32.to_le_bytes());
    std::fs::write(&npy, bytes).expect("npy");
    let long = spec(&dir, "long.ae", 4, &format!(" data npy({:?})", s(&npy)));
    let (code, err) = train(&long, &dir, &[]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("longer than its header says"), "{err}");
}

#[test]
fn a_csv_keeps_a_first_row_with_a_typo_and_drops_a_byte_order_mark() {
    let dir = scratch("csv");
    let bom = dir.join("bom.csv");
    std::fs::write(&bom, "\u{feff}1,2\n3,4\n").expect("csv");
    let a = aec::data::read_csv(&bom).expect("a BOM is not data");
    assert_eq!(a.shape, vec![2, 2]);
    let header = dir.join("header.csv");
    std::fs::write(&header, "a,b\n3,4\n").expect("csv");
    assert_eq!(aec::data::read_csv(&header).expect("a header").shape, vec![1, 2]);
    let typo = dir.join("typo.csv");
    std::fs::write(&typo, "1,2x\n3,4\n").expect("csv");
    let e = aec::data::read_csv(&typo).expect_err("a typo is not a header");
    assert!(e.to_string().contains("typo.csv:1: not a row of numbers"), "{e}");
    // A run says when it skipped a header.
    let rows = dir.join("rows.csv");
    std::fs::write(&rows, "a,b,c,d\n1,2,3,4\n0,1,0,1\n").expect("csv");
    let spec = spec(&dir, "csv.ae", 4, &format!(" data csv({:?})\n epochs 1", s(&rows)));
    let (code, err) = train(&spec, &dir, &[]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("skipped the header line of") && err.contains(": a,b,c,d"), "{err}");
}

#[test]
fn hyper_parameters_must_survive_the_conversion_to_f32() {
    let dir = scratch("f32");
    for (lr, why) in [("1e39", "is infinite as a 32-bit float"), ("1e-320", "rounds to 0 as a 32-bit float")]
    {
        let spec = spec(&dir, "lr.ae", 8, &format!(" data onehot(8)\n optimizer sgd(lr: {lr})"));
        let (code, err) = train(&spec, &dir, &[]);
        assert_eq!(code, 1, "{err}");
        assert!(err.contains(why), "{lr}: {err}");
        assert!(err.contains("lr.ae:9:"), "{err}");
        let ok = self::spec(&dir, "ok.ae", 8, " data onehot(8)\n epochs 1");
        let (code, err) = train(&ok, &dir, &["--lr", lr]);
        assert_eq!(code, 2, "{err}");
        assert!(err.contains(why), "--lr {lr}: {err}");
    }
    let b2 = spec(&dir, "b2.ae", 8, " data onehot(8)\n optimizer adam(lr: 0.1, b2: 0.999999999999)");
    let (code, err) = train(&b2, &dir, &[]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("rounds to 1"), "{err}");
}

#[test]
fn non_finite_weights_are_refused_by_name() {
    let dir = scratch("nan_weights");
    let spec = spec(&dir, "w.ae", 8, " data onehot(8)\n epochs 2");
    let (code, err) = train(&spec, &dir, &[]);
    assert_eq!(code, 0, "{err}");
    // Poison one weight of the checkpoint.
    let ckpt = dir.join("run/checkpoint.safetensors");
    let saved = aec::runtime::checkpoint::read_all(&ckpt).expect("checkpoint");
    let mut bytes: Vec<(String, Vec<usize>, Vec<u8>)> = saved
        .iter()
        .map(|(n, shape, v)| (n.clone(), shape.clone(), v.iter().flat_map(|x| x.to_le_bytes()).collect()))
        .collect();
    let w = bytes.iter_mut().find(|t| t.0 == "decoder.0.weight").expect("decoder weight");
    w.2[8..12].copy_from_slice(&f32::NAN.to_le_bytes());
    let views: Vec<(String, safetensors::tensor::TensorView)> = bytes
        .iter()
        .map(|(n, shape, b)| {
            let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), b);
            (n.clone(), view.expect("view"))
        })
        .collect();
    let poisoned = dir.join("nan.safetensors");
    std::fs::write(&poisoned, safetensors::serialize(views, None).expect("serialize")).expect("write");
    let x = dir.join("x.npy");
    let a = aec::data::Array { shape: vec![1, 8], values: aec::data::Values::F32(vec![1.0; 8]) };
    aec::data::write_npy(&x, &a).expect("npy");
    let y = dir.join("y.npy");
    let (code, _, err) =
        aec(&["run", s(&spec), "--weights", s(&poisoned), "--input", s(&x), "--output", s(&y)]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("`decoder.0.weight` holds NaN at element 2"), "{err}");
    assert!(!y.exists());
}

#[test]
fn resuming_a_finished_run_changes_nothing() {
    let dir = scratch("finished");
    let spec = spec(&dir, "f.ae", 8, " data onehot(8)\n epochs 3\n optimizer adam(lr: 0.01)");
    let (code, err) = train(&spec, &dir, &[]);
    assert_eq!(code, 0, "{err}");
    let run = dir.join("run");
    let files = ["checkpoint.safetensors", "optimizer.safetensors", "metrics.jsonl"];
    let before: Vec<Vec<u8>> = files.iter().map(|f| std::fs::read(run.join(f)).expect("saved")).collect();
    let (code, out, err) = aec(&["run", "--train", s(&spec), "--resume", s(&run)]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("nothing to train"), "{out}");
    for (f, b) in files.iter().zip(&before) {
        assert_eq!(&std::fs::read(run.join(f)).expect("saved"), b, "{f} changed");
    }
}

#[test]
fn an_update_that_overflows_the_optimizer_state_stops_the_run() {
    // After a first Adam step of 1e9, the outputs are about 1e18: the loss (about 1e35) is
    // finite, but the gradients' squares overflow Adam's second moment. The run stops instead
    // of training on (and saving) infinities.
    let dir = scratch("overflow");
    let spec = spec(&dir, "o.ae", 8, " data onehot(8)\n epochs 5\n optimizer adam(lr: 1e9)");
    let (code, err) = train(&spec, &dir, &[]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("the optimizer's buffer 1 of `encoder.0.weight` became NaN or infinite"), "{err}");
    assert!(!dir.join("run/optimizer.safetensors").exists(), "{err}");
}

/// The JSON lines of `metrics.jsonl` without the timing fields (which differ between runs).
fn metrics_without_times(path: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(path).expect("metrics");
    text.lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).expect("a JSON line");
            if let Some(m) = v.as_object_mut() {
                m.remove("seconds");
                m.remove("samples_per_s");
                m.remove("wall_time");
                m.remove("data_wait_s");
            }
            v
        })
        .collect()
}

#[test]
fn a_save_killed_or_out_of_disk_at_any_write_or_rename_resumes_to_the_same_bytes() {
    let dir = scratch("transaction");
    let spec = spec(&dir, "t.ae", 8, " data onehot(8)\n batch 4\n epochs 4\n optimizer adam(lr: 0.05)");
    let full = dir.join("full");
    let (code, _, err) = aec(&["run", "--train", s(&spec), "--out", s(&full)]);
    assert_eq!(code, 0, "{err}");
    let state = ["checkpoint.safetensors", "optimizer.safetensors"];
    let want: Vec<Vec<u8>> = state.iter().map(|f| std::fs::read(full.join(f)).expect("saved")).collect();
    let want_metrics = metrics_without_times(&full.join("metrics.jsonl"));
    let mut faulted = 0;
    for k in 1..=13 {
        for kind in ["kill", "enospc"] {
            let run = dir.join(format!("{kind}-{k}"));
            let (code, _, err) = aec(&["run", "--train", s(&spec), "--out", s(&run), "--stop-at", "2"]);
            assert_eq!(code, 0, "{err}");
            // Resume to the end with the k-th write or rename of the last save failing.
            let out = Command::new(env!("CARGO_BIN_EXE_aec"))
                .args(["run", "--train", s(&spec), "--resume", s(&run)])
                .env("AEC_FAULT_SAVE", format!("{k}:{kind}"))
                .output()
                .expect("run aec");
            if !out.status.success() {
                faulted += 1;
                let err = String::from_utf8_lossy(&out.stderr);
                match kind {
                    "enospc" => {
                        assert_eq!(out.status.code(), Some(2), "{k}: {err}");
                        assert!(err.contains("No space left on device"), "{k}: {err}");
                    }
                    _ => assert_eq!(out.status.code(), None, "killed by a signal at {k}: {err}"),
                }
                let (code, _, err) = aec(&["run", "--train", s(&spec), "--resume", s(&run)]);
                assert_eq!(code, 0, "{kind} at {k}, then resumed: {err}");
            }
            for (f, w) in state.iter().zip(&want) {
                assert!(std::fs::read(run.join(f)).expect("saved") == *w, "{kind} at {k}: {f} differs");
            }
            assert_eq!(metrics_without_times(&run.join("metrics.jsonl")), want_metrics, "{kind} at {k}");
            let leftovers: Vec<_> = std::fs::read_dir(&run)
                .expect("run folder")
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(".new") || n.ends_with(".tmp"))
                .collect();
            assert!(leftovers.is_empty(), "{kind} at {k}: {leftovers:?}");
        }
    }
    // Every write and rename of a save was hit: 5 staged writes (checkpoint, optimizer state,
    // TensorBoard's events, metrics, configuration), the manifest's write and rename, 5 renames
    // into place — twelve places, twice.
    assert!(faulted >= 24, "only {faulted} runs were interrupted");
}

#[test]
fn a_damaged_save_is_refused_on_resume() {
    let dir = scratch("damaged");
    let spec = spec(&dir, "d.ae", 8, " data onehot(8)\n epochs 2\n optimizer adam(lr: 0.05)");
    let (code, err) = train(&spec, &dir, &["--stop-at", "1"]);
    assert_eq!(code, 0, "{err}");
    let run = dir.join("run");
    let mut bytes = std::fs::read(run.join("optimizer.safetensors")).expect("saved");
    let last = bytes.len() - 1;
    bytes[last] ^= 0x40;
    std::fs::write(run.join("optimizer.safetensors"), bytes).expect("write");
    let (code, _, err) = aec(&["run", "--train", s(&spec), "--resume", s(&run)]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("is damaged: optimizer.safetensors"), "{err}");
}

#[test]
fn outputs_go_through_symlinks_and_never_replace_devices_or_fifos() {
    let dir = scratch("outputs");
    let spec = spec(&dir, "o.ae", 8, " data onehot(8)\n epochs 2");
    let (code, err) = train(&spec, &dir, &[]);
    assert_eq!(code, 0, "{err}");
    let weights = dir.join("run/checkpoint.safetensors");
    let x = dir.join("x.npy");
    let a = aec::data::Array { shape: vec![2, 8], values: aec::data::Values::F32(vec![0.5; 16]) };
    aec::data::write_npy(&x, &a).expect("npy");
    let run =
        |out: &Path| aec(&["run", s(&spec), "--weights", s(&weights), "--input", s(&x), "--output", s(out)]);
    // A link: the file it points to gets the output, and the link stays a link.
    let target = dir.join("target.npy");
    std::fs::write(&target, b"old").expect("target");
    let link = dir.join("link.npy");
    std::os::unix::fs::symlink(&target, &link).expect("symlink");
    let (code, _, err) = run(&link);
    assert_eq!(code, 0, "{err}");
    assert!(std::fs::symlink_metadata(&link).expect("link").file_type().is_symlink());
    assert_eq!(aec::data::read_npy(&target).expect("written through the link").shape, vec![2, 8]);
    // A device is not replaced.
    let (code, _, err) = run(Path::new("/dev/null"));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("not a regular file"), "{err}");
    assert!(std::fs::metadata("/dev/null").expect("null").file_type().is_char_device());
}

#[test]
fn memory_is_estimated_before_it_is_allocated() {
    // 53 GiB of arena at batch 100,000: a message, not an abort.
    let (code, out, err) = aec(&["compile", "specs/coins_seg.ae", "--batch", "100000"]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(err.contains("needs 53.0 GiB, over the memory budget"), "{err}");
    assert!(err.contains("use a smaller --batch"), "{err}");
    // The estimate is printed when it fits.
    let (code, out, err) = aec(&["compile", "specs/coins_seg.ae"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("memory: 17.8 MiB for the training step"), "{out}");
    // --memory-limit sets the budget, for compiling, for the interpreter and for data.
    let (code, _, err) = aec(&["--memory-limit", "1M", "compile", "specs/bench_mlp784.ae"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("over the memory budget of 1.0 MiB (set by --memory-limit)"), "{err}");
    let dir = scratch("memory");
    let huge = spec(&dir, "huge.ae", 256, " data random(count: 200000000)");
    let (code, err) = train(&huge, &dir, &[]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("random(count: 200000000) needs 190.7 GiB"), "{err}");
    assert!(err.contains("huge.ae:8:2"), "{err}");
    let small = spec(&dir, "small.ae", 256, " data random(count: 64)\n batch 64\n epochs 1");
    let (code, err) = train(&small, &dir, &["--memory-limit", "200K", "--backend", "interp"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("interpreting `m.train` needs"), "{err}");
    let (code, _, err) = aec(&["--memory-limit", "lots", "compile", "specs/onehot838.ae"]);
    assert_eq!(code, 2, "{err}");
}

/// Under `ulimit -v`, the budget is what the process may still map, not the machine's memory:
/// 5.7 GiB of arena under a 4 GiB limit is the budget's message (it was an abort, "memory
/// allocation of 8908915712 bytes failed" for 8.2 GiB under 8 GiB), and `aec compile`
/// allocates no arena at all.
#[test]
fn the_budget_follows_ulimit_and_compile_allocates_nothing() {
    let run = |limit_kib: u64, args: &str| {
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("ulimit -v {limit_kib} && exec \"$0\" {args}"))
            .arg(env!("CARGO_BIN_EXE_aec"))
            .current_dir(common::root())
            .output()
            .expect("sh");
        (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let (code, err) = run(4 << 20, "compile specs/denoise.ae --batch 100000");
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("needs 5.7 GiB, over the memory budget of"), "{err}");
    assert!(err.contains("(the address-space limit (ulimit -v)"), "{err}");
    // With the budget set past the limit, only not allocating the arena keeps compile alive.
    let (code, err) = run(4 << 20, "--memory-limit 20G compile specs/denoise.ae --batch 100000");
    assert_eq!(code, 0, "{err}");
}

/// 20,000 layers: refused for the number of its kernels before any is emitted (it took 54 s of
/// compiling, and five passes over the graph were quadratic).
#[test]
fn a_spec_of_twenty_thousand_layers_is_refused_before_emitting() {
    let dir = scratch("twenty_thousand");
    let layers = "        dense 8 -> relu\n".repeat(10_000);
    let src = format!(
        "model big {{\n    input x: [8]\n    encoder {{\n{layers}    }}\n    decoder {{\n{layers}    }}\n    loss mse(x)\n}}\n"
    );
    let path = dir.join("big.ae");
    std::fs::write(&path, src).expect("write");
    let (code, out, err) = aec(&["compile", s(&path)]);
    assert_eq!(code, 1, "{err}");
    assert!(out.contains("decoder.9999 dense 8 -> relu  20005"), "{}", &out[out.len().saturating_sub(300)..]);
    assert!(err.contains("would be 140001 kernels, over the 10000"), "{err}");
}

#[test]
fn native_code_does_not_grow_with_the_channels_and_a_huge_kernel_is_refused() {
    // 16,384 channels: the weight gradient's packing was unrolled per 8 channels (476,395
    // instructions, 6 s to compile); now every kernel stays small.
    let src = "model m {\n input x: [1, 8, 8]\n encoder { conv 16384 k3 p1 -> relu; conv 4 k3 p1 }\n decoder { deconv 16384 k3 p1 -> relu; deconv 1 k3 p1 -> sigmoid }\n loss mse(x)\n}\ntrain { batch 2 }\n";
    let compiled = aec::compile(src, &aec::Config::default()).expect("compiles");
    let g = aec::training_step(&compiled).expect("differentiates");
    let clif = aec::codegen::clif_of(&g).expect("native code");
    let largest = clif.iter().map(|(_, text)| text.lines().count()).max().unwrap_or(0);
    assert!(largest < 5_000, "a kernel of {largest} lines");
    // A 61×61 kernel over a 4×4 output unrolls its taps: refused with the reason, before Cranelift compiles it.
    let dir = scratch("huge_kernel");
    let spec = dir.join("k.ae");
    let text = "model m {\n input x: [1, 64, 64]\n encoder { conv 2 k61 p0 -> relu }\n decoder { deconv 1 k61 p0 -> sigmoid }\n loss mse(x)\n}\ntrain { batch 1 }\n";
    std::fs::write(&spec, text).expect("spec");
    let (code, _, err) = aec(&["compile", s(&spec)]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("would be too large to compile in seconds"), "{err}");
}

#[test]
fn paths_are_checked_before_training_and_io_problems_exit_2() {
    let dir = scratch("paths");
    let spec = spec(&dir, "p.ae", 8, " data onehot(8)\n epochs 3");
    // --out naming a file.
    let file = dir.join("a-file");
    std::fs::write(&file, b"x").expect("file");
    let (code, _, err) = aec(&["run", "--train", s(&spec), "--out", s(&file)]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("is a file; give a folder"), "{err}");
    assert!(!err.contains("epoch"), "checked before training: {err}");
    // --png in a folder that does not exist.
    let png = dir.join("no/such/folder/x.png");
    let (code, _, err) = aec(&["run", "--train", s(&spec), "--out", s(&dir.join("r1")), "--png", s(&png)]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("does not exist"), "{err}");
    assert!(!dir.join("r1/checkpoint.safetensors").exists());
    // Nothing to resume.
    let (code, _, err) = aec(&["run", "--train", s(&spec), "--resume", s(&dir.join("never"))]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("nothing to resume"), "{err}");
    // --weights naming a folder.
    let (code, _, err) =
        aec(&["run", s(&spec), "--weights", s(&dir), "--input", s(&spec), "--output", s(&file)]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--weights") && err.contains("is a folder"), "{err}");
    // A negative count is refused as a value, not taken for a flag.
    let (code, _, err) = aec(&["run", "--train", s(&spec), "--epochs", "-1"]);
    assert_eq!(code, 2, "{err}");
    assert!(!err.contains("-- -1"), "{err}");
    assert!(err.contains("-1"), "{err}");
    // A fresh run prints its whole configuration and records it; --png-every writes into the
    // folder made before training.
    let run = dir.join("r2");
    let (code, _, err) = aec(&["run", "--train", s(&spec), "--out", s(&run)]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("config: batch 1, epochs 3, optimizer adam(lr: 0.001, b1: 0.9"), "{err}");
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("config.json")).expect("config.json"))
            .expect("json");
    assert_eq!(config["epochs"], 3);
    // A batch larger than the data says so.
    let big = self::spec(&dir, "big.ae", 8, " data onehot(8)\n batch 64\n epochs 1");
    let (code, _, err) = aec(&["run", "--train", s(&big), "--out", s(&dir.join("r3"))]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("note: batch 64 is larger than the data (8 samples)"), "{err}");
}

#[test]
fn rates_of_epochs_too_short_to_time_are_not_shown() {
    // 8-3-8 epochs take microseconds: a rate from them would read in the billions.
    let dir = scratch("rates");
    let spec = spec(&dir, "r.ae", 8, " data onehot(8)\n batch 8\n epochs 20");
    let (code, err) = train(&spec, &dir, &[]);
    assert_eq!(code, 0, "{err}");
    for line in err.lines().filter(|l| l.contains("samples/s")) {
        let rate: f64 = line.split_whitespace().rev().nth(1).and_then(|r| r.parse().ok()).unwrap_or(0.0);
        assert!(rate < 1e10, "{line}");
    }
    let metrics = std::fs::read_to_string(dir.join("run/metrics.jsonl")).expect("metrics");
    assert!(metrics.contains("\"samples_per_s\":null"), "{metrics}");
}

/// Every file of a folder, by name, with its bytes.
fn folder(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .expect("folder")
        .flatten()
        .map(|e| (e.file_name().to_string_lossy().into_owned(), std::fs::read(e.path()).expect("file")))
        .collect();
    files.sort();
    files
}

#[test]
fn a_divergence_after_a_save_leaves_the_folder_as_it_was() {
    let dir = scratch("diverge_after_save");
    let spec = spec(&dir, "d.ae", 8, " data onehot(8)\n epochs 4\n optimizer sgd(lr: 0.1)");
    let (code, err) = train(&spec, &dir, &["--stop-at", "2"]);
    assert_eq!(code, 0, "{err}");
    let run = dir.join("run");
    let before = folder(&run);
    assert!(
        before.iter().any(|(n, _)| n == "save.json"),
        "{:?}",
        before.iter().map(|f| &f.0).collect::<Vec<_>>()
    );
    // Epoch 3 diverges.
    let (code, _, err) = aec(&["run", "--train", s(&spec), "--resume", s(&run), "--lr", "1e30"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("NaN or infin"), "{err}");
    assert!(err.contains("good checkpoint stays in"), "{err}");
    assert!(folder(&run) == before, "the run folder changed");
    // And its checkpoint still loads and runs.
    let x = dir.join("x.npy");
    let a = aec::data::Array { shape: vec![1, 8], values: aec::data::Values::F32(vec![1.0; 8]) };
    aec::data::write_npy(&x, &a).expect("npy");
    let weights = run.join("checkpoint.safetensors");
    let (code, _, err) = aec(&[
        "run",
        s(&spec),
        "--weights",
        s(&weights),
        "--input",
        s(&x),
        "--output",
        s(&dir.join("y.npy")),
    ]);
    assert_eq!(code, 0, "{err}");
}

/// A fresh folder for one test of this file.
fn scratch(name: &str) -> PathBuf {
    common::scratch(&format!("hostile/{name}"))
}
