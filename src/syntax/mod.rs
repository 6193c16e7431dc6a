//! Text to AST: the pest parser, the AST builder and readable syntax errors.
//!
//! **Invariant:** parsing never panics. Any text gives an AST, diagnostics, or both. No other
//! module names pest's `Rule` or `Pair`.

pub mod ast;
mod build;
mod error;
mod print;

pub use build::{closest, f32_problem};
pub use print::Dims;

use crate::diag::{Diagnostic, Span};
use pest::Parser;

#[derive(pest_derive::Parser)]
#[grammar = "../grammar/aec.pest"]
struct AeParser;

/// Parses a spec. Returns the AST when the text has the language's structure (possibly with
/// vocabulary errors, which are in the diagnostics), and every diagnostic found.
pub fn parse(src: &str) -> (Option<ast::File>, Vec<Diagnostic>) {
    if let Some(d) = too_deep(src) {
        return (None, vec![d]);
    }
    match AeParser::parse(Rule::file, src) {
        Ok(mut pairs) => match pairs.next() {
            Some(file) => {
                let mut builder = build::Builder::default();
                let ast = builder.file(file);
                (Some(ast), builder.diags)
            }
            None => (None, vec![Diagnostic::error("the spec is empty")]),
        },
        Err(e) => (None, vec![error::from_pest(&e, src)]),
    }
}

/// Brackets nested deeper than this are refused before parsing: the parser and the AST builder
/// recurse once per level, and no spec needs more than a handful.
pub const MAX_NESTING: usize = 64;

/// The first bracket (`(`, `[` or `{`, outside strings and comments) nested deeper than
/// [`MAX_NESTING`], as a diagnostic. A scan without recursion, so any text gets an answer.
fn too_deep(src: &str) -> Option<Diagnostic> {
    let bytes = src.as_bytes();
    let mut depth = 0usize;
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'/' if bytes.get(i + 1) == Some(&b'/') => {
                while i < bytes.len() && bytes[i] != b'\n' {
                    i += 1;
                }
            }
            b'/' if bytes.get(i + 1) == Some(&b'*') => {
                i += 2;
                while i < bytes.len() && !(bytes[i] == b'*' && bytes.get(i + 1) == Some(&b'/')) {
                    i += 1;
                }
                i += 1;
            }
            b'"' => {
                i += 1;
                while i < bytes.len() && bytes[i] != b'"' && bytes[i] != b'\n' {
                    i += 1;
                }
            }
            b'(' | b'[' | b'{' => {
                depth += 1;
                if depth > MAX_NESTING {
                    return Some(
                        Diagnostic::error(format!("brackets are nested more than {MAX_NESTING} deep"))
                            .label(Span::new(i, i + 1), format!("bracket {depth} levels deep"))
                            .help(
                                "a spec needs only a few levels: close the brackets opened before this one",
                            ),
                    );
                }
            }
            b')' | b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
        i += 1;
    }
    None
}

/// Prints dimensions as the language writes them: `[1, 28, 28]`.
pub fn ast_dims(d: &[u64]) -> Dims<'_> {
    Dims(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_language_sketch() {
        let src = "// 8-3-8\nmodel onehot838 {\n    input x: [8]\n    encoder {\n        dense 3 -> sigmoid\n    }\n    decoder { dense 8 -> sigmoid }\n    loss mse(x)\n}\n\ntrain {\n    data onehot(8)\n    batch 8\n    optimizer sgd(lr: 1.0, momentum: 0.9)\n    epochs 3000; seed 7\n}\n";
        let (ast, diags) = parse(src);
        assert!(diags.is_empty(), "{diags:?}");
        let ast = ast.expect("ast");
        assert_eq!(ast.model.name.name, "onehot838");
        let train = ast.train.expect("train block");
        assert_eq!(train.epochs, Some(3000));
        assert_eq!(train.seed, Some(7));
    }

    #[test]
    fn layer_errors_are_all_reported() {
        let src = "model m {\n input x: [4]\n encoder { dens 3; conv 2 }\n decoder { dense 4 -> sigmoidd }\n loss mse(x)\n}";
        let (_, diags) = parse(src);
        assert_eq!(diags.len(), 3, "{diags:#?}");
    }
}
