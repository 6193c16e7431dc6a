//! Inputs that crashed aec or silently lost or corrupted a run: each now gets a message saying
//! what and where, and leaves saved state as it was.

use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// A fresh folder for one test's files.
fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("hostile").join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

fn aec(args: &[&str]) -> (i32, String, String) {
    let out =
        Command::new(env!("CARGO_BIN_EXE_aec")).args(args).current_dir(root()).output().expect("run aec");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

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
