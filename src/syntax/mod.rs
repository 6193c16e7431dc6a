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
        Err(e) => (None, syntax_errors(src, error::from_pest(&e, src))),
    }
}

/// The brackets open at the end of `text` (outside comments and strings), innermost last.
fn open_brackets(text: &str) -> Vec<char> {
    let mut stack = Vec::new();
    for (_, c) in brackets(text) {
        let c = c as char;
        if matches!(c, '{' | '(' | '[') {
            stack.push(c);
        } else if stack.last().is_some_and(|&o| pair(o, c)) {
            stack.pop();
        }
    }
    stack
}

fn pair(open: char, close: char) -> bool {
    matches!((open, close), ('{', '}') | ('(', ')') | ('[', ']'))
}

/// Line `line` blanked for recovery, `outer` the brackets open before it: spaces (of the same
/// byte length, so every offset in the file stays) for everything but the brackets that matter
/// to the lines around it — those it opens, and those that close an outer one. A pair opened
/// and closed within the line, or a stray closer, goes with the rest.
fn blank_line(line: &str, outer: &[char]) -> String {
    let chars: Vec<char> = line.chars().collect();
    let mut keep = vec![false; chars.len()];
    let mut open: Vec<usize> = Vec::new();
    let mut outer = outer.to_vec();
    for (i, &c) in chars.iter().enumerate() {
        match c {
            '{' | '(' | '[' => {
                keep[i] = true;
                open.push(i);
            }
            '}' | ')' | ']' => {
                if let Some(&j) = open.last() {
                    if pair(chars[j], c) {
                        keep[j] = false;
                        open.pop();
                    }
                } else if outer.last().is_some_and(|&o| pair(o, c)) {
                    keep[i] = true;
                    outer.pop();
                }
            }
            _ => {}
        }
    }
    chars.iter().zip(keep).map(|(&c, k)| if k { c.to_string() } else { " ".repeat(c.len_utf8()) }).collect()
}

/// At most this many syntax errors are reported from one file.
const MAX_SYNTAX_ERRORS: usize = 10;

/// Every syntax error of `src` that recovery can reach, starting with `first`: the line of each
/// error is blanked (its brackets kept, so the blocks stay balanced) and the text parsed again,
/// until it parses or an error repeats a line, or comes at the end of the file (the cascade of
/// an earlier one).
fn syntax_errors(src: &str, first: Diagnostic) -> Vec<Diagnostic> {
    let mut text = src.to_owned();
    let mut lines_seen = Vec::new();
    let mut out = vec![first];
    while out.len() < MAX_SYNTAX_ERRORS {
        let Some(at) = out.last().and_then(Diagnostic::span).map(|s| s.start as usize) else { break };
        if at >= text.trim_end().len() {
            break;
        }
        let start = text[..at.min(text.len())].rfind('\n').map_or(0, |i| i + 1);
        let end = text[start..].find('\n').map_or(text.len(), |i| start + i);
        if lines_seen.contains(&start) {
            break;
        }
        lines_seen.push(start);
        let blank = blank_line(&text[start..end], &open_brackets(&text[..start]));
        text.replace_range(start..end, &blank);
        match AeParser::parse(Rule::file, &text) {
            Ok(_) => break,
            Err(e) => {
                let d = error::from_pest(&e, &text);
                let pos = d.span().map_or(0, |s| s.start as usize);
                if pos >= text.trim_end().len()
                    || lines_seen.contains(&text[..pos].rfind('\n').map_or(0, |i| i + 1))
                {
                    break;
                }
                out.push(d);
            }
        }
    }
    out
}

/// Brackets nested deeper than this are refused before parsing: the parser and the AST builder
/// recurse once per level, and no spec needs more than a handful.
pub const MAX_NESTING: usize = 64;

/// The brackets of `text` outside comments and strings, with their byte offsets: the one scan
/// both the nesting limit and syntax-error recovery need, without recursion.
fn brackets(text: &str) -> impl Iterator<Item = (usize, u8)> + '_ {
    let bytes = text.as_bytes();
    let mut i = 0;
    std::iter::from_fn(move || {
        while i < bytes.len() {
            let at = i;
            i += 1;
            match bytes[at] {
                b'/' if bytes.get(at + 1) == Some(&b'/') => {
                    while i < bytes.len() && bytes[i] != b'\n' {
                        i += 1;
                    }
                }
                b'/' if bytes.get(at + 1) == Some(&b'*') => {
                    i += 1;
                    while i < bytes.len() && !(bytes[i] == b'*' && bytes.get(i + 1) == Some(&b'/')) {
                        i += 1;
                    }
                    i += 2;
                }
                b'"' => {
                    while i < bytes.len() && bytes[i] != b'"' && bytes[i] != b'\n' {
                        i += 1;
                    }
                    i += 1;
                }
                c @ (b'(' | b'[' | b'{' | b')' | b']' | b'}') => return Some((at, c)),
                _ => {}
            }
        }
        None
    })
}

/// The first bracket (`(`, `[` or `{`, outside strings and comments) nested deeper than
/// [`MAX_NESTING`], as a diagnostic.
fn too_deep(src: &str) -> Option<Diagnostic> {
    let mut depth = 0usize;
    for (at, c) in brackets(src) {
        if matches!(c, b'(' | b'[' | b'{') {
            depth += 1;
            if depth > MAX_NESTING {
                return Some(
                    Diagnostic::error(format!("brackets are nested more than {MAX_NESTING} deep"))
                        .label(Span::new(at, at + 1), format!("bracket {depth} levels deep"))
                        .help("a spec needs only a few levels: close the brackets opened before this one"),
                );
            }
        } else {
            depth = depth.saturating_sub(1);
        }
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
