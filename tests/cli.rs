//! The `aec` binary: exit codes and where its output goes.

use std::process::Command;

fn aec(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_aec"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run aec");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn compile_prints_the_table_and_exits_0() {
    let (code, out, err) = aec(&["compile", "specs/onehot838.ae"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("encoder.0 dense 3 -> sigmoid"), "{out}");
    assert!(out.contains("59 parameters"), "{out}");
}

#[test]
fn every_emit_form_works() {
    // Each of the seven forms, with a line that only that form prints.
    let forms = [
        ("ast", "decoder {"),
        ("ir", "graph mirror.forward"),
        ("grad", "graph mirror.train"),
        ("params", "encoder.0.weight  [8, 1, 3, 3]"),
        ("torch", "class Mirror(nn.Module):"),
        ("fused", "program mirror.train:"),
        ("clif", "; kernel k"),
        ("fused-eval", "program mirror.forward:"),
    ];
    for (form, line) in forms {
        let (code, out, err) = aec(&["compile", "specs/mirror.ae", "--emit", form]);
        assert_eq!(code, 0, "--emit {form}: {err}");
        assert!(out.contains(line), "--emit {form} lacks `{line}`:\n{out}");
        // No form prints another's mark.
        for (other, mark) in forms.iter().filter(|f| f.0 != form) {
            if ["ast", "fused", "clif", "torch", "fused-eval"].contains(other) {
                assert!(!out.contains(mark), "--emit {form} prints {other}'s `{mark}`");
            }
        }
    }
}

#[test]
fn spec_errors_exit_1_with_the_location_on_stderr() {
    let (code, out, err) = aec(&["compile", "specs/errors/needs_output_padding.ae"]);
    assert_eq!(code, 1);
    assert!(out.is_empty(), "diagnostics go to stderr: {out}");
    assert!(err.contains("specs/errors/needs_output_padding.ae:8:9"), "{err}");
    assert!(err.contains("add `op1`"), "{err}");
}

#[test]
fn io_and_usage_errors_exit_2() {
    let (code, _, err) = aec(&["compile", "specs/no_such_file.ae"]);
    assert_eq!(code, 2);
    assert!(err.contains("cannot read specs/no_such_file.ae"), "{err}");
    let (code, _, _) = aec(&["compile", "specs/onehot838.ae", "--emit", "nonsense"]);
    assert_eq!(code, 2);
    let (code, _, _) = aec(&["frobnicate"]);
    assert_eq!(code, 2);
}

#[test]
fn the_bce_check_looks_through_shape_only_layers_and_flags_a_double_sigmoid() {
    let spec = |tail: &str| {
        format!(
            "model m {{\n input x: [8, 8]\n encoder {{ flatten; dense 16 -> relu }}\n decoder {{ dense 64 -> sigmoid; {tail} }}\n loss bce(x)\n}}"
        )
    };
    let warnings = |src: &str| -> Vec<String> {
        let c = aec::compile(src, &aec::Config::default()).expect("compiles");
        c.warnings.iter().map(|d| d.message.clone()).collect()
    };
    // A reshape after the sigmoid keeps probabilities: no warning.
    assert_eq!(warnings(&spec("reshape [8, 8]")), Vec::<String>::new());
    // The fix the old warning suggested applies sigmoid twice.
    assert_eq!(warnings(&spec("reshape [8, 8] -> sigmoid")), ["sigmoid is applied to a sigmoid's output"]);
    // No sigmoid at all: the warning points at the dense layer, not the reshape.
    let src = "model m {\n input x: [8, 8]\n encoder { flatten; dense 16 -> relu }\n decoder { dense 64; reshape [8, 8] }\n loss bce(x)\n}";
    let c = aec::compile(src, &aec::Config::default()).expect("compiles");
    assert_eq!(c.warnings.len(), 1);
    let (line, col) = c.warnings[0].span().expect("located").line_col(src);
    assert_eq!((line, col), (4, 12), "{:?}", c.warnings[0]);
}

#[test]
fn check_compares_every_gradient_and_the_native_code() {
    let (code, out, err) = aec(&["check", "specs/digits_conv.ae", "--batch", "3"]);
    assert_eq!(code, 0, "{out}{err}");
    for name in ["encoder.0.weight", "encoder.2.bias", "decoder.3.weight"] {
        let line = out.lines().find(|l| l.starts_with(name)).unwrap_or_else(|| panic!("{name}:\n{out}"));
        assert!(line.ends_with("ok"), "{line}");
    }
    assert!(out.contains("every gradient agrees"), "{out}");
    // A sequence model: token ids, recurrent loops natively and on the interpreter.
    let (code, out, err) = aec(&["check", "specs/bench_gru.ae", "--samples", "2"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("decoder.0.weight_hh_l0"), "{out}");
}

#[test]
fn several_mpi_processes_are_refused_rather_than_training_copies() {
    for var in ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE"] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_aec"))
            .args(["compile", "specs/onehot838.ae"])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .env(var, "2")
            .output()
            .expect("run aec");
        assert_eq!(out.status.code(), Some(2), "{var}");
        assert!(String::from_utf8_lossy(&out.stderr).contains("2 MPI processes"), "{var}");
    }
    // One process under mpirun is fine.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_aec"))
        .args(["compile", "specs/onehot838.ae"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("OMPI_COMM_WORLD_SIZE", "1")
        .output()
        .expect("run aec");
    assert_eq!(out.status.code(), Some(0));
}

#[test]
fn bench_reports_rates_the_matmul_path_and_where_the_time_goes() {
    // JSON: every field a script reads, with rates that are numbers above zero.
    let (code, out, err) = aec(&["bench", "specs/digits_mlp.ae", "--steps", "2", "--threads", "1", "--json"]);
    assert_eq!(code, 0, "{err}");
    for field in [
        "\"train_samples_per_s\":",
        "\"infer_samples_per_s\":",
        "\"peak_gflops_per_core\":",
        "\"wide_core\":",
    ] {
        assert!(out.contains(field), "{field}: {out}");
    }
    let field = |name: &str| {
        let v = out.split(&format!("\"{name}\":")).nth(1).and_then(|r| r.split([',', '}']).next());
        v.and_then(|r| r.parse::<f64>().ok())
    };
    assert!(field("train_samples_per_s").is_some_and(|r| r > 0.0), "{out}");
    // A core's FMA peak is tens to hundreds of GFLOP/s: a loop hoisted out of its timing once
    // gave millions.
    assert!(field("peak_gflops_per_core").is_some_and(|p| p > 0.1 && p < 5_000.0), "{out}");
    // Text with --profile: the rounds' length, the path, and the step's kernels by time.
    let (code, out, err) =
        aec(&["bench", "specs/digits_mlp.ae", "--steps", "2", "--threads", "1", "--profile"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("median of 5 rounds of 2 steps"), "{out}");
    assert!(out.contains("matmuls "), "{out}");
    assert!(out.contains("training step, per kernel (2 steps;"), "{out}");
    assert!(out.contains("k_updates"), "{out}");
}

#[test]
fn evaluation_folds_each_batch_norm_into_its_convolution() {
    let (code, out, err) = aec(&["compile", "specs/segnet_coins.ae", "--emit", "fused-eval", "--batch", "2"]);
    assert_eq!(code, 0, "{err}");
    // Each normalization is a scale of the weights before the convolution, not a pass over
    // the activations: no `batch_norm` kernel, and the normalized convolutions' bias adds
    // take the folded shift.
    assert!(!out.contains("batch_norm") && !out.contains("bn_stats"), "{out}");
    // Four normalizations in the encoder, three in the mirrored decoder (none on its output).
    let weights = out.lines().filter(|l| l.contains("channel_affine -> f32[") && l.contains(",3,3]")).count();
    assert_eq!(weights, 7, "{out}");
}

#[test]
fn a_single_sample_batch_for_a_feature_batch_norm_is_a_located_error() {
    let dir = std::env::temp_dir().join(format!("aec-bn1-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let spec = dir.join("bn.ae");
    let src = "model t {\n input x: [6]\n encoder { dense 4 nobias; batchnorm -> relu }\n decoder { dense 6 -> sigmoid }\n loss mse(x)\n}\ntrain { data random(count: 9)\n batch 4\n epochs 1 }\n";
    std::fs::write(&spec, src).expect("spec");
    let spec = spec.to_str().expect("path");
    // Nine samples in batches of four leave one: refused before any step, with a batch that works.
    let out_dir = dir.join("run");
    let (code, _, err) = aec(&["run", spec, "--train", "--out", out_dir.to_str().expect("path")]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("bn.ae:3:28") && err.contains("use `batch 5`"), "{err}");
    assert!(!out_dir.join("checkpoint.safetensors").exists());
    let (code, _, err) = aec(&["compile", spec, "--batch", "1"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("bn.ae:3:28") && err.contains("batches of at least 2"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}
