//! The text `aec compile` prints: the per-layer table and the parameter listing.

use super::{Model, Part};
use std::fmt::Write;

/// One row per layer: layer, source line, output shape, parameters, FLOPs per sample.
pub(super) fn table(m: &Model, src: &str) -> String {
    let mut rows: Vec<[String; 5]> = Vec::new();
    rows.push(["layer".into(), "line".into(), "output".into(), "params".into(), "FLOPs".into()]);
    let lines = crate::diag::Lines::new(src);
    let vars = m.inputs.iter().map(|v| ("input", v)).chain(m.targets.iter().map(|v| ("target", v)));
    let vars = vars.chain(m.conditions.iter().map(|v| ("condition", v)));
    for (kind, v) in vars {
        let line = lines.line(v.span);
        rows.push([format!("{kind} {}", v.name), line.to_string(), v.ty.to_string(), "-".into(), "-".into()]);
    }
    for l in &m.layers {
        let line = lines.line(l.layer.span);
        let params: u64 = l.params.iter().map(|&p| m.params[p].numel()).sum();
        let mut name = format!("{}.{} {}", l.part.prefix(), l.index, l.layer);
        if let Some(t) = l.tied_weight {
            // The printed layer already says it is tied; keep the column short.
            name = format!("{}.{} {} (tied {})", l.part.prefix(), l.index, short(&l.layer), m.params[t].name);
        }
        rows.push([name, line.to_string(), l.output.to_string(), params.to_string(), thousands(l.flops)]);
    }
    let total_flops: u64 = m.layers.iter().map(|l| l.flops).fold(0, u64::saturating_add);
    rows.push([
        "total".into(),
        String::new(),
        String::new(),
        m.param_count().to_string(),
        thousands(total_flops),
    ]);

    let widths: Vec<usize> =
        (0..5).map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0)).collect();
    let mut out = String::new();
    let sep = |out: &mut String| {
        let line: Vec<String> = widths.iter().map(|w| "─".repeat(*w)).collect();
        let _ = writeln!(out, "{}", line.join("──"));
    };
    for (i, r) in rows.iter().enumerate() {
        if i == 1 || i == rows.len() - 1 {
            sep(&mut out);
        }
        let mut line = String::new();
        for (c, cell) in r.iter().enumerate() {
            let pad = widths[c] - cell.chars().count();
            // Text left, numbers right.
            if c >= 3 || c == 1 {
                let _ = write!(line, "{}{cell}", " ".repeat(pad));
            } else {
                let _ = write!(line, "{cell}{}", " ".repeat(pad));
            }
            if c < 4 {
                line.push_str("  ");
            }
        }
        let _ = writeln!(out, "{}", line.trim_end());
    }
    let _ = writeln!(
        out,
        "model {}: code {}, output {}, {} parameters ({}), {} FLOPs per sample forward",
        m.name,
        m.code,
        m.output,
        m.param_count(),
        bytes(m.param_count() * 4),
        thousands(total_flops)
    );
    out
}

/// The layer without its tied-weight comment.
fn short(l: &crate::syntax::ast::Layer) -> String {
    let s = l.to_string();
    match s.find(" /*") {
        Some(i) => {
            let rest = s[i..].find("*/").map_or("", |j| &s[i + j + 2..]);
            format!("{}{}", &s[..i], rest)
        }
        None => s,
    }
}

/// `--emit params`: each parameter with its shape, PyTorch layout.
pub(super) fn params(m: &Model) -> String {
    let mut out = String::new();
    let shapes: Vec<String> = m
        .params
        .iter()
        .map(|p| format!("[{}]", p.shape.iter().map(u64::to_string).collect::<Vec<_>>().join(", ")))
        .collect();
    let width = m.params.iter().map(|p| p.name.len()).max().unwrap_or(0);
    let swidth = shapes.iter().map(String::len).max().unwrap_or(0);
    for (p, s) in m.params.iter().zip(&shapes) {
        let _ = writeln!(out, "{:width$}  {s:swidth$}  {:>9}", p.name, p.numel());
    }
    for l in m.layers.iter().filter(|l| l.part == Part::Decoder) {
        if let Some(t) = l.tied_weight {
            let _ = writeln!(
                out,
                "# {}.{}.weight is tied: it uses {}",
                l.part.prefix(),
                l.index,
                m.params[t].name
            );
        }
    }
    let _ = writeln!(out, "# {} parameters, {} as f32", m.param_count(), bytes(m.param_count() * 4));
    out
}

fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut x = n as f64;
    let mut u = 0;
    while x >= 1024.0 && u < 3 {
        x /= 1024.0;
        u += 1;
    }
    if u == 0 { format!("{n} B") } else { format!("{x:.1} {}", UNITS[u]) }
}
