//! The README's examples are the binary's real output: each block it shows is checked against
//! the spec or the command it comes from, so they cannot drift; and every command of its tour
//! runs, in order, on a fresh copy of the examples.

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

/// Copies folder `from` into `to`, recursively.
fn copy_tree(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).expect("folder");
    for entry in std::fs::read_dir(from).expect("read folder").flatten() {
        let target = to.join(entry.file_name());
        if entry.file_type().expect("type").is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).expect("copy");
        }
    }
}

/// The tour's `sh` blocks, command by command: each `aec …` line runs as written (its comment
/// dropped) from the root of a fresh copy of `specs/`, after the ones before it. A command on a
/// spec of `specs/errors/` must fail with exit 1, every other must succeed.
#[test]
fn every_command_of_the_tour_runs_on_a_fresh_clone() {
    let text = readme();
    let start = text.find("## A tour").expect("the tour");
    let tour = &text[start..];
    let tour = &tour[..tour[3..].find("\n## ").map_or(tour.len(), |i| i + 3)];
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("readme-tour");
    let _ = std::fs::remove_dir_all(&dir);
    copy_tree(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("specs"), &dir.join("specs"));
    let commands: Vec<&str> = tour
        .split("```sh\n")
        .skip(1)
        .flat_map(|b| b.split("```").next().unwrap_or("").lines())
        .filter_map(|l| l.strip_prefix("aec "))
        .map(|l| l.split(" #").next().unwrap_or(l).trim())
        .collect();
    assert!(commands.len() >= 10, "the tour has {} commands", commands.len());
    for line in commands {
        let args: Vec<&str> = line.split_whitespace().collect();
        let out =
            Command::new(env!("CARGO_BIN_EXE_aec")).args(&args).current_dir(&dir).output().expect("run aec");
        let want = if line.contains("specs/errors/") { 1 } else { 0 };
        assert_eq!(
            out.status.code(),
            Some(want),
            "aec {line}\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // What the tour says it writes is there.
    for file in ["runs/five-recon.png", "runs/five-codes.npy", "runs/digits_mlp.onnx", "runs/vae-grid.png"] {
        assert!(dir.join(file).is_file(), "{file} was not written");
    }
}
