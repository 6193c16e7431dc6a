//! The README's examples are the binary's real output: each block it shows is checked against
//! the spec or the command it comes from, so they cannot drift.

use std::process::Command;

fn readme() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).expect("README.md")
}

/// The fenced blocks of the README.
fn blocks(text: &str) -> Vec<String> {
    text.split("```")
        .skip(1)
        .step_by(2)
        .map(|b| b.split_once('\n').map_or(b, |(_, rest)| rest).to_owned())
        .collect()
}

fn aec(args: &[&str]) -> (String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_aec"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run aec");
    (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn the_language_section_shows_the_spec_that_ships() {
    let spec =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/specs/onehot838.ae")).expect("spec");
    let body = &spec[spec.find("model onehot838").expect("model")..];
    assert!(
        blocks(&readme()).iter().any(|b| b == body),
        "the README does not show specs/onehot838.ae as it ships"
    );
}

#[test]
fn the_first_commands_output_is_what_the_binary_prints() {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("readme-onehot838");
    let (out, err) = aec(&["run", "--train", "specs/onehot838.ae", "--out", dir.to_str().expect("path")]);
    let shown = blocks(&readme())
        .into_iter()
        .find(|b| b.starts_with("trained ") && b.contains("onehot838"))
        .expect("the first command's output");
    // Everything but the timings and the run folder: the code table, line for line.
    let table = |t: &str| -> Vec<String> {
        t.lines()
            .filter(|l| !["trained ", "checkpoint:", "loss curves:"].iter().any(|p| l.starts_with(p)))
            .map(str::to_owned)
            .collect()
    };
    assert_eq!(table(&shown), table(&out), "{err}");
    let first = |t: &str| t.lines().next().map(|l| l.split(" in ").next().unwrap_or("").to_owned());
    assert_eq!(first(&shown), first(&out));
}

#[test]
fn the_error_example_is_the_binarys_diagnostic() {
    let (_, err) = aec(&["compile", "specs/errors/needs_output_padding.ae"]);
    let shown = blocks(&readme())
        .into_iter()
        .find(|b| b.starts_with("$ aec compile specs/errors/needs_output_padding.ae"))
        .expect("the error example");
    let shown = shown.split_once('\n').map_or("", |(_, rest)| rest);
    assert!(err.contains(shown.trim_end()), "README:\n{shown}\nbinary:\n{err}");
}
