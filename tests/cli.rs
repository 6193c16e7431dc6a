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
    for form in ["ast", "ir", "params"] {
        let (code, out, err) = aec(&["compile", "specs/mirror.ae", "--emit", form]);
        assert_eq!(code, 0, "--emit {form}: {err}");
        assert!(!out.is_empty());
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
