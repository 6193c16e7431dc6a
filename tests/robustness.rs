//! Nothing a user types makes aec panic: random bytes, shuffled tokens, mutated tokens and
//! every truncation of every shipped spec all come back as a result or diagnostics.

use proptest::prelude::*;
use std::path::PathBuf;

fn specs() -> Vec<String> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("specs");
    let mut paths: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("specs/")
        .chain(std::fs::read_dir(dir.join("errors")).expect("specs/errors/"))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "ae"))
        .collect();
    paths.sort();
    paths.iter().map(|p| std::fs::read_to_string(p).expect("readable spec")).collect()
}

/// Compiles at a small batch and, when it succeeds, checks the graph the way later stages will.
fn compile_does_not_panic(src: &str) {
    let config = aec::Config { batch: Some(2) };
    if let Ok(c) = aec::compile(src, &config) {
        assert!(aec::ir::verify(&c.forward).is_ok(), "verifier rejects a compiled graph:\n{src}");
        let _ = aec::ir::print(&c.forward, Some(src));
        let _ = c.model.table(src);
    }
}

#[test]
fn every_truncation_of_every_spec() {
    let mut cases = 0;
    for src in specs() {
        for (i, _) in src.char_indices() {
            compile_does_not_panic(&src[..i]);
            cases += 1;
        }
    }
    assert!(cases > 10_000, "only {cases} truncations");
}

fn tokens(src: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    for c in src.chars() {
        if c.is_alphanumeric() || c == '_' || c == '.' {
            cur.push(c);
        } else {
            if !cur.is_empty() {
                out.push(std::mem::take(&mut cur));
            }
            out.push(c.to_string());
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        compile_does_not_panic(&String::from_utf8_lossy(&bytes));
    }

    #[test]
    fn random_text_from_the_language_alphabet(s in "[a-z0-9 \\[\\]{}():;,>\\-\\n/*.\"]{0,300}") {
        compile_does_not_panic(&s);
    }

    #[test]
    fn shuffled_tokens(spec in 0usize..64, swaps in proptest::collection::vec((0usize..4096, 0usize..4096), 1..12)) {
        let all = specs();
        let mut toks = tokens(&all[spec % all.len()]);
        let n = toks.len();
        prop_assume!(n > 0);
        for (a, b) in swaps {
            toks.swap(a % n, b % n);
        }
        compile_does_not_panic(&toks.concat());
    }

    #[test]
    fn mutated_tokens(spec in 0usize..64, edits in proptest::collection::vec((0usize..4096, 0usize..4096), 1..6)) {
        // Replace tokens by other tokens of any spec: numbers, names and keywords in odd places.
        let all = specs();
        let pool: Vec<String> = all.iter().flat_map(|s| tokens(s)).collect();
        let mut toks = tokens(&all[spec % all.len()]);
        let n = toks.len();
        prop_assume!(n > 0);
        for (at, with) in edits {
            toks[at % n] = pool[with % pool.len()].clone();
        }
        compile_does_not_panic(&toks.concat());
    }

    #[test]
    fn extreme_numbers(n in prop_oneof![Just(0u64), Just(1), Just(u32::MAX as u64), Just(u64::MAX), 0u64..100_000]) {
        let src = format!(
            "model m {{ input x: [1, {n}, {n}]\n encoder {{ conv {n} k{n} s{n} p{n} -> relu; maxpool {n} as p\n flatten; dense {n} }}\n decoder mirror tied -> sigmoid\n loss mse(x) + {n} * l2(weights) }}"
        );
        compile_does_not_panic(&src);
    }
}

/// A spec whose `data` line nests `depth` copies of `open … close` around a file name.
fn nested(open: &str, close: &str, depth: usize) -> String {
    let inner = format!("{}\"x.npy\"{}", open.repeat(depth), close.repeat(depth));
    format!(
        "model m {{\n input x: [4]\n encoder {{ dense 2 }}\n decoder {{ dense 4 }}\n loss mse(x)\n}}\ntrain {{\n data {inner}\n}}\n"
    )
}

#[test]
fn deep_nesting_of_every_bracket_kind_is_a_located_error() {
    for (open, close) in [("npy(", ")"), ("(", ")"), ("[", "]"), ("{", "}")] {
        for depth in [65, 7_000, 100_000] {
            let src = nested(open, close, depth);
            let Err(diags) = aec::compile(&src, &aec::Config::default()) else {
                panic!("{open}…{close} nested {depth} deep compiles");
            };
            assert!(diags[0].message.contains("nested more than"), "{open}: {:?}", diags[0]);
            let (line, _) = diags[0].span().expect("located").line_col(&src);
            assert_eq!(line, 8, "{open}");
            // A long line renders, shortened.
            let text = aec::diag::render(&diags, "m.ae", &src, false);
            assert_eq!(text.contains("is shown around column"), src.lines().any(|l| l.len() > 240), "{text}");
        }
    }
    // Within the limit the nesting is no problem of its own.
    let (_, diags) = aec::syntax::parse(&nested("npy(", ")", 60));
    assert!(diags.iter().all(|d| !d.message.contains("nested")), "{diags:?}");
}

#[test]
fn a_label_past_column_65535_renders() {
    let src = format!(
        "model m {{\n input x: [4]{}zz\n encoder {{ dense 2 }}\n decoder {{ dense 4 }}\n loss mse(x)\n}}\n",
        " ".repeat(65_600)
    );
    let Err(diags) = aec::compile(&src, &aec::Config::default()) else { panic!("compiles") };
    let text = aec::diag::render(&diags, "m.ae", &src, false);
    assert!(text.contains("line 2 is 65615 characters long; it is shown around column 65614"), "{text}");
    assert!(text.lines().all(|l| l.chars().count() < 400), "{text}");
    assert!(aec::diag::render_short(&diags[0], "m.ae", &src).starts_with("m.ae:2:65614:"));
}

#[test]
fn the_printed_ast_parses_back_to_itself() {
    // parse → print → parse is the identity (printed the same, no diagnostics) for every spec
    // that parses, and for an activation with an argument on a line of its own.
    let mut sources = specs();
    sources.push("model m {\n input x: [4]\n encoder { dense 2; leaky_relu(0.2) }\n decoder { dense 4 -> leaky_relu(0.1) }\n loss mse(x)\n}\n".into());
    let mut checked = 0;
    for src in &sources {
        let (Some(ast), diags) = aec::syntax::parse(src) else { continue };
        if !diags.is_empty() {
            continue;
        }
        let first = ast.to_string();
        let (again, diags) = aec::syntax::parse(&first);
        assert!(diags.is_empty(), "{first}\n{diags:?}");
        assert_eq!(first, again.expect("an AST").to_string(), "printing and parsing again changed the spec");
        checked += 1;
    }
    assert!(checked > 20, "{checked} specs");
    // `--emit ast` writes a mirrored decoder out; that text is a spec of its own that compiles
    // to the same layers (a tied mirror excepted: the language ties only a whole mirror, so its
    // written-out layers carry the tie as a comment).
    for src in sources.iter().filter(|s| !s.contains("tied")) {
        let Ok(c) = aec::compile(src, &aec::Config::default()) else { continue };
        let first = c.ast.to_string();
        let again = aec::compile(&first, &aec::Config::default()).expect("the printed spec compiles");
        assert_eq!(first, again.ast.to_string());
        assert_eq!(c.model.params_listing(), again.model.params_listing(), "{first}");
    }
}
