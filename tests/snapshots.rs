//! Data-driven snapshot tests: every spec in `specs/` and every bad spec in `specs/errors/`.
//! A new `.ae` file is a new test; its snapshot is reviewed text committed beside it.

use std::path::Path;

/// The path as the user would type it from the repository root, for stable snapshots.
fn display_path(path: &Path) -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    path.strip_prefix(root).unwrap_or(path).display().to_string()
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

#[test]
fn specs_compile() {
    insta::glob!("../specs", "*.ae", |path| {
        let src = read(path);
        let compiled = match aec::compile(&src, &aec::Config::default()) {
            Ok(c) => c,
            Err(diags) => panic!(
                "{} does not compile:\n{}",
                display_path(path),
                aec::diag::render(&diags, &display_path(path), &src, false)
            ),
        };
        if let Err(errors) = aec::ir::verify(&compiled.forward) {
            panic!("{}: IR verifier: {errors:#?}", display_path(path));
        }
        let text = format!(
            "{}\n{}\n{}",
            compiled.model.table(&src),
            compiled.model.params_listing(),
            aec::ir::print(&compiled.forward, Some(&src))
        );
        insta::assert_snapshot!(text);
    });
}

#[test]
fn training_steps() {
    insta::glob!("../specs", "*.ae", |path| {
        let src = read(path);
        let compiled = aec::compile(&src, &aec::Config::default()).expect("compiles");
        let text = match aec::training_step(&compiled) {
            Ok(g) => {
                if let Err(errors) = aec::ir::verify(&g) {
                    panic!("{}: IR verifier: {errors:#?}", display_path(path));
                }
                aec::ir::print(&g, Some(&src))
            }
            Err(e) => format!("not differentiable yet: {e}\n"),
        };
        insta::assert_snapshot!(text);
    });
}

#[test]
fn fused_kernels() {
    // The native training step as `aec compile --emit fused` shows it: which ops each kernel
    // computes together, and the memory plan. (Its first line, the compile time, is left out.)
    // The snapshots show the matmuls on the wide core, as on every machine of this project's
    // kind (x86-64 with AVX2 or AVX-512); a CPU without it plans differently. They are taken
    // with the gemm crate's kernels for every product: aec's register tiles take recurrent
    // steps' products on AVX2 only, which would make the text differ by machine.
    use aec::codegen::wide::{self, MatmulPath};
    if wide::isa().is_none() {
        eprintln!("this CPU has no wide matmul core: the fused snapshots are not compared");
        return;
    }
    let options = aec::codegen::Options { matmul: MatmulPath::Gemm, ..aec::codegen::Options::default() };
    insta::glob!("../specs", "*.ae", |path| {
        let src = read(path);
        let compiled = aec::compile(&src, &aec::Config::default()).expect("compiles");
        let g = aec::training_step(&compiled).expect("differentiates");
        let program = aec::codegen::Program::compile(&g, options)
            .unwrap_or_else(|e| panic!("{}: {e}", display_path(path)));
        let text = aec::codegen::describe(&program);
        let text: String = text.lines().skip(1).map(|l| format!("{l}\n")).collect();
        insta::assert_snapshot!(text);
    });
}

#[test]
fn pretraining_stages() {
    insta::glob!("../specs", "*.ae", |path| {
        let src = read(path);
        if !src.contains("pretrain") {
            return;
        }
        let compiled = aec::compile(&src, &aec::Config::default()).expect("compiles");
        let lowering = aec::sema::Lowering {
            batch: compiled.batch,
            mode: aec::sema::Mode::Train,
            denoise: false,
            shard_of: None,
        };
        let mut text = String::new();
        for k in 1..=aec::sema::stage::stages(&compiled.model) {
            let g = aec::sema::lower::lower_stage(&compiled.model, k, &lowering).expect("stage lowers");
            aec::ir::verify(&g).expect("stage graph verifies");
            text.push_str(&aec::ir::print(&g, Some(&src)));
        }
        insta::assert_snapshot!(text);
    });
}

#[test]
fn ast_round_trips_through_its_printer() {
    insta::glob!("../specs", "*.ae", |path| {
        let src = read(path);
        let (ast, diags) = aec::syntax::parse(&src);
        assert!(diags.is_empty(), "{}: {diags:?}", display_path(path));
        let printed = ast.expect("ast").to_string();
        let (again, diags) = aec::syntax::parse(&printed);
        assert!(
            diags.is_empty(),
            "{}: printed form does not parse: {diags:?}\n{printed}",
            display_path(path)
        );
        assert_eq!(again.expect("ast").to_string(), printed, "{}", display_path(path));
    });
}

#[test]
fn mirrored_decoders_are_written_out() {
    insta::glob!("../specs", "*.ae", |path| {
        let src = read(path);
        if !src.contains("decoder mirror") {
            return;
        }
        let compiled = aec::compile(&src, &aec::Config::default()).expect("compiles");
        insta::assert_snapshot!(compiled.ast.to_string());
    });
}

#[test]
fn bad_specs_fail_with_located_diagnostics() {
    insta::glob!("../specs/errors", "*.ae", |path| {
        let src = read(path);
        let name = display_path(path);
        let diags = match aec::compile(&src, &aec::Config::default()) {
            Ok(_) => panic!("{name} compiled, but every file in specs/errors must fail"),
            Err(d) => d,
        };
        let errors: Vec<_> = diags.iter().filter(|d| d.is_error()).collect();
        assert!(!errors.is_empty(), "{name}: no error diagnostic");
        for d in &errors {
            assert!(d.span().is_some(), "{name}: error without a location: {}", d.message);
            assert!(!d.message.contains("Rule::"), "{name}: grammar rule name shown to a user");
        }
        let short: Vec<String> = diags.iter().map(|d| aec::diag::render_short(d, &name, &src)).collect();
        let text = format!("{}\n\n{}", short.join("\n"), aec::diag::render(&diags, &name, &src, false));
        insta::assert_snapshot!(text);
    });
}
