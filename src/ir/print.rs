//! The stable text form of a graph (`aec compile --emit ir`).
//!
//! Inputs and parameters are printed by name in the header and referred to by name; every
//! other node gets `%n`, numbered in order of appearance. With the source text at hand, each
//! line ends with the spec line it came from.

use super::{Clip, Graph, NodeId, Op, OptimizerFn, UnaryFn};
use std::fmt::Write;

pub fn print(g: &Graph, src: Option<&str>) -> String {
    let mut names: Vec<String> = Vec::with_capacity(g.len());
    let mut next = 0;
    for id in g.ids() {
        names.push(match &g.node(id).op {
            Op::Input(i) => g.inputs[i.index()].name.clone(),
            Op::Param(p) => g.params[p.index()].name.clone(),
            _ => {
                next += 1;
                format!("%{}", next - 1)
            }
        });
    }
    let name = |id: NodeId| names[id.index()].as_str();

    let mut out = String::new();
    let _ = writeln!(out, "graph {}", g.name);
    for i in &g.inputs {
        let _ = writeln!(out, "  input {}: {}", i.name, i.ty);
    }
    for p in &g.params {
        let _ = writeln!(out, "  param {}: {}", p.name, super::Type::f32(p.shape.clone()));
    }
    out.push_str("{\n");
    let mut lines = Vec::new();
    let starts = src.map(crate::diag::Lines::new);
    for id in g.ids() {
        let node = g.node(id);
        if matches!(node.op, Op::Input(_) | Op::Param(_)) {
            continue;
        }
        let text = format!("  {} = {}", name(id), op_text(g, &node.op, &name));
        let text = if matches!(node.op, Op::Update { .. }) {
            format!("  {}", op_text(g, &node.op, &name))
        } else {
            format!("{text} : {}", node.ty)
        };
        let line = match (&starts, g.span(id)) {
            (Some(starts), Some(span)) => Some(starts.line(span)),
            _ => None,
        };
        lines.push((text, line));
    }
    // Align the line comments, but let a very long line run past the column.
    let width = lines.iter().map(|(t, _)| t.chars().count()).filter(|&w| w <= 72).max().unwrap_or(0);
    for (text, line) in lines {
        match line {
            Some(l) => {
                let pad = width.saturating_sub(text.chars().count());
                let _ = writeln!(out, "{text}{:pad$}  ; line {l}", "");
            }
            None => {
                let _ = writeln!(out, "{text}");
            }
        }
    }
    let outs: Vec<String> = g.outputs.iter().map(|(n, id)| format!("{n} = {}", name(*id))).collect();
    let _ = writeln!(out, "  return {}", outs.join(", "));
    out.push_str("}\n");
    out
}

fn op_text<'a>(g: &Graph, op: &Op, name: &impl Fn(NodeId) -> &'a str) -> String {
    use Op::*;
    let m = op.mnemonic();
    let args = |ids: &[NodeId]| ids.iter().map(|i| name(*i)).collect::<Vec<_>>().join(", ");
    match op {
        Input(_) | Param(_) => String::new(),
        MatMul { a, b, ta, tb } => {
            let t = |x: bool| if x { "ᵀ" } else { "" };
            format!("{m} {}{}, {}{}", name(*a), t(*ta), name(*b), t(*tb))
        }
        Unary { f: UnaryFn::LeakyRelu(a), x } => format!("{m}({a}) {}", name(*x)),
        ActGrad { f, y, dy } => {
            let f = match f {
                UnaryFn::LeakyRelu(a) => format!("leaky_relu({a})"),
                other => other.name().to_owned(),
            };
            format!("{m}[{f}] {}", args(&[*y, *dy]))
        }
        Scale { x, c } => format!("{m} {}, {c}", name(*x)),
        Reshape { x, .. } | StopGrad { x } | Transpose { x } => format!("{m} {}", name(*x)),
        Conv2d { x, w, stride, pad } => {
            format!("{m} {} stride={} pad={}", args(&[*x, *w]), hw(*stride), hw(*pad))
        }
        ConvTranspose2d { x, w, stride, pad, out_pad } => {
            let (s, p, op) = (hw(*stride), hw(*pad), hw(*out_pad));
            format!("{m} {} stride={s} pad={p} out_pad={op}", args(&[*x, *w]))
        }
        Conv2dWeightGrad { x, dy, kernel, stride, pad }
        | ConvTranspose2dWeightGrad { x, dy, kernel, stride, pad } => {
            let (k, s, p) = (hw(*kernel), hw(*stride), hw(*pad));
            format!("{m} {} kernel={k} stride={s} pad={p}", args(&[*x, *dy]))
        }
        SparseConvT { height, width, pad, flip, .. } => {
            format!("{m} {} size={height}x{width} pad={pad}{}", args(&op.operands()), flipped(*flip))
        }
        GatherConv { pad, flip, .. } => format!("{m} {} pad={pad}{}", args(&op.operands()), flipped(*flip)),
        SparseWeightGrad { kernel, pad, height, width, flip, .. } => {
            let a = args(&op.operands());
            format!("{m} {a} kernel={kernel} pad={pad} size={height}x{width}{}", flipped(*flip))
        }
        PoolArgmax { x, kernel, stride } | AvgPool { x, kernel, stride } => {
            format!("{m} {} kernel={} stride={}", name(*x), hw(*kernel), hw(*stride))
        }
        AvgPoolGrad { dy, kernel, stride, .. } => {
            format!("{m} {} kernel={} stride={}", name(*dy), hw(*kernel), hw(*stride))
        }
        EmbedGrad { ids, dy, vocab } => format!("{m} {} vocab={vocab}", args(&[*ids, *dy])),
        BatchMatMul { a, b, ta, tb } => {
            let t = |x: bool| if x { "ᵀ" } else { "" };
            format!("{m} {}{}, {}{}", name(*a), t(*ta), name(*b), t(*tb))
        }
        SumAxis { x, axis } => format!("{m} {} axis={axis}", name(*x)),
        MaskFill { x, ids, value } => format!("{m} {}, {} value={value}", name(*x), name(*ids)),
        ScatterColumns { dy, ids, depth } => format!("{m} {} depth={depth}", args(&[*dy, *ids])),
        OneHot { ids, depth } => format!("{m} {} depth={depth}", name(*ids)),
        ShiftRight { ids, start } => format!("{m} {} start={start}", name(*ids)),
        Recurrent { cell, .. } | RecurrentGrad { cell, .. } => {
            format!("{m}[{}] {}", cell.keyword(), args(&op.operands()))
        }
        GateSaves { rec } => format!("{m} {}", name(*rec)),
        Part { x, offset, .. } => format!("{m} {} offset={offset}", name(*x)),
        PadLast { x, start, total } => format!("{m} {} start={start} total={total}", name(*x)),
        Repeat { x, times } => format!("{m} {} times={times}", name(*x)),
        SliceLast { x, start, len } => format!("{m} {} start={start} len={len}", name(*x)),
        Fill { value, .. } => format!("{m} {value}"),
        SliceChannels { x, start, len } => format!("{m} {} start={start} len={len}", name(*x)),
        BatchNorm { eps, .. } | BnSums { eps, .. } | BnGrad { eps, .. } | BnCoeffs { eps, .. } => {
            format!("{m} {} eps={}", args(&op.operands()), num(*eps))
        }
        ChannelAffine { x, coeffs, axis, shift } => {
            let what = if *shift { "scale+shift" } else { "scale" };
            format!("{m} {} axis={axis} {what}", args(&[*x, *coeffs]))
        }
        Upsample { x, scale, .. } => format!("{m} {} scale={}", name(*x), hw(*scale)),
        UpsampleGrad { dy, scale, .. } => format!("{m} {} scale={}", name(*dy), hw(*scale)),
        Normal { salt, .. } => format!("{m} salt={salt}"),
        Dropout { x, p, salt } => format!("{m} {} p={p} salt={salt}", name(*x)),
        DropoutGrad { dy, p, salt } => format!("{m} {} p={p} salt={salt}", name(*dy)),
        Loss { f, .. } | LossGrad { f, .. } => {
            format!("{m}[{}] {}", f.name(), args(&op.operands()))
        }
        Update { f, clip, param, grad } => {
            let p = &g.params[param.index()].name;
            let f = match f {
                OptimizerFn::Sgd { lr, momentum, nesterov, weight_decay } => format!(
                    "sgd lr={} momentum={momentum} nesterov={nesterov} weight_decay={}",
                    num(*lr),
                    num(*weight_decay)
                ),
                OptimizerFn::Adam { lr, b1, b2, eps, weight_decay, decoupled } => format!(
                    "{} lr={} b1={b1} b2={b2} eps={} weight_decay={}",
                    if *decoupled { "adamw" } else { "adam" },
                    num(*lr),
                    num(*eps),
                    num(*weight_decay)
                ),
                OptimizerFn::RmsProp { lr, alpha, eps, weight_decay, momentum, centered } => format!(
                    "rmsprop lr={} alpha={alpha} eps={} weight_decay={} momentum={momentum} centered={centered}",
                    num(*lr),
                    num(*eps),
                    num(*weight_decay)
                ),
                OptimizerFn::Running { rate } => format!("running rate={}", num(*rate)),
            };
            let f = match clip {
                Clip::None => f,
                Clip::Value(c) => format!("{f} clip_value={}", num(*c)),
                Clip::Norm(c) => format!("{f} clip_norm={}", num(*c)),
            };
            format!("{m}[{f}] {p}, {}", name(*grad))
        }
        _ => format!("{m} {}", args(&op.operands())),
    }
}

/// A constant as a person writes it: `0.003`, `1e-8`.
fn num(x: f32) -> String {
    if x != 0.0 && x.abs() < 1e-3 { format!("{x:e}") } else { format!("{x}") }
}

fn flipped(flip: bool) -> &'static str {
    if flip { " flip" } else { "" }
}

/// A size per axis: `3`, or `(3,5)` for height 3 and width 5.
fn hw([h, w]: [usize; 2]) -> String {
    if h == w { h.to_string() } else { format!("({h},{w})") }
}
