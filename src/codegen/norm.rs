//! Batch normalization's kernels: the statistics per channel, the normalization in training
//! and with fixed coefficients (evaluation, and folding into a convolution's weight and bias),
//! and the backward pass's sums and input gradient. Semantics are the interpreter's
//! (`interp::bn_*`), which follow PyTorch's CPU kernels: two-pass statistics, `y = x·scale +
//! shift` with `scale = γ/√(var + eps)` and `shift = β − mean·scale`.
//!
//! Axis 1 is the channel axis: a value `[B, C, inner…]` is, per channel, `B` runs of `inner`
//! contiguous elements. Each run is summed in f32 vectors and the runs are added in f64, so a
//! channel of many elements keeps its precision.

use super::emit::{Emit, EpOp, apply_ops};
use super::kernels::sum;
use super::plan::Plan;
use crate::ir::{Graph, NodeId, Op};
use cranelift_codegen::ir::types::{F32, F32X4, F64};
use cranelift_codegen::ir::{InstBuilder, Type, Value};

/// The channels a node's kernel loops over: its work units (each thread takes some channels).
fn channels(g: &Graph, id: NodeId) -> usize {
    match g.node(id).op {
        Op::BnCoeffs { mean, .. } => g.ty(mean).shape[0],
        Op::ChannelAffine { x, axis, .. } => g.ty(x).shape[axis],
        Op::BnStats { x } | Op::BatchNorm { x, .. } | Op::BnSums { x, .. } | Op::BnGrad { x, .. } => {
            g.ty(x).shape[1]
        }
        _ => 1,
    }
}

/// Work units (channels) and the rough work of a node's kernel.
pub fn units(g: &Graph, id: NodeId) -> (usize, usize) {
    let reads = g.node(id).op.operands().iter().map(|&o| g.ty(o).numel()).sum::<usize>();
    (channels(g, id), 2 * reads)
}

/// Emits the kernel of a batch-normalization node, over the channels of `range`.
pub fn emit(e: &mut Emit, g: &Graph, plan: &Plan, id: NodeId, range: (Value, Value)) -> Result<(), String> {
    emit_chain(e, g, plan, (id, plan.node[id.index()], &[]), range)
}

/// The same, for a normalization that heads a fused chain: `ops` (the chain's elementwise
/// ops, `fuse`'s) are applied to each value before it is stored at `out`.
pub fn emit_chain(
    e: &mut Emit,
    g: &Graph,
    plan: &Plan,
    (id, out, ops): (NodeId, usize, &[EpOp]),
    range: (Value, Value),
) -> Result<(), String> {
    let at = |n: NodeId| plan.node[n.index()];
    let top = e.i64(channels(g, id) as i64);
    let (lo, hi) = (range.0, e.b.ins().smin(range.1, top));
    let layout = |n: NodeId| {
        let s = &g.ty(n).shape;
        (s[0], s[1], s[2..].iter().product::<usize>())
    };
    match g.node(id).op {
        Op::BnStats { x } => {
            let (b, c, inner) = layout(x);
            let count = (b * inner) as f64;
            let src = at(x);
            e.for_dynamic(lo, hi, |e, ch| {
                let total = channel_sum(e, (b, c, inner), ch, |e, ty, i| e.load(ty, src, i));
                let mean = mean_of(e, total, count);
                e.store(out, ch, mean);
                let mv = e.b.ins().splat(F32X4, mean);
                let sq = channel_sum(e, (b, c, inner), ch, |e, ty, i| {
                    let v = e.load(ty, src, i);
                    let d = e.b.ins().fsub(v, if ty == F32X4 { mv } else { mean });
                    e.b.ins().fmul(d, d)
                });
                let var = mean_of(e, sq, count);
                let at = e.iadd_imm(ch, c as i64);
                e.store(out, at, var);
            });
        }
        Op::BatchNorm { x, stats, gamma, beta, eps } => {
            let (b, c, inner) = layout(x);
            let (src, st, gm, bt) = (at(x), at(stats), at(gamma), at(beta));
            e.for_dynamic(lo, hi, |e, ch| {
                let mean = e.load(F32, st, ch);
                let vi = e.iadd_imm(ch, c as i64);
                let var = e.load(F32, st, vi);
                let gamma = e.load(F32, gm, ch);
                let beta = e.load(F32, bt, ch);
                let (scale, shift) = coefficients(e, (mean, var, gamma, beta), eps);
                affine_runs(e, (b, c, inner), ch, (src, out), (scale, Some(shift)), ops);
            });
        }
        Op::BnCoeffs { mean, var, gamma, beta, eps } => {
            let c = g.ty(mean).shape[0];
            let (m, v, gm, bt) = (at(mean), at(var), at(gamma), at(beta));
            e.for_dynamic(lo, hi, |e, ch| {
                let vals = [m, v, gm, bt].map(|o| e.load(F32, o, ch));
                let (scale, shift) = coefficients(e, (vals[0], vals[1], vals[2], vals[3]), eps);
                e.store(out, ch, scale);
                let at = e.iadd_imm(ch, c as i64);
                e.store(out, at, shift);
            });
        }
        Op::ChannelAffine { x, coeffs, axis, shift } => {
            let s = &g.ty(x).shape;
            let outer: usize = s[..axis].iter().product();
            let c = s[axis];
            let inner: usize = s[axis + 1..].iter().product();
            let (src, co) = (at(x), at(coeffs));
            e.for_dynamic(lo, hi, |e, ch| {
                let scale = e.load(F32, co, ch);
                let sh = if shift {
                    let at = e.iadd_imm(ch, c as i64);
                    Some(e.load(F32, co, at))
                } else {
                    None
                };
                affine_runs(e, (outer, c, inner), ch, (src, out), (scale, sh), ops);
            });
        }
        Op::BnSums { x, stats, dy, eps } => {
            let (b, c, inner) = layout(x);
            let (src, st, ds) = (at(x), at(stats), at(dy));
            e.for_dynamic(lo, hi, |e, ch| {
                let mean = e.load(F32, st, ch);
                let mv = e.b.ins().splat(F32X4, mean);
                let dot = channel_sum(e, (b, c, inner), ch, |e, ty, i| {
                    let v = e.load(ty, src, i);
                    let d = e.load(ty, ds, i);
                    let centred = e.b.ins().fsub(v, if ty == F32X4 { mv } else { mean });
                    e.b.ins().fmul(d, centred)
                });
                let total = channel_sum(e, (b, c, inner), ch, |e, ty, i| e.load(ty, ds, i));
                let vi = e.iadd_imm(ch, c as i64);
                let var = e.load(F32, st, vi);
                let r = invstd(e, var, eps);
                let r = e.b.ins().fpromote(F64, r);
                let dot = e.b.ins().fmul(dot, r);
                let dot = e.b.ins().fdemote(F32, dot);
                e.store(out, ch, dot);
                let total = e.b.ins().fdemote(F32, total);
                e.store(out, vi, total);
            });
        }
        Op::BnGrad { x, stats, gamma, dy, sums, eps } => {
            let (b, c, inner) = layout(x);
            let n = (b * inner) as f32;
            let (src, st, gm, ds, sm) = (at(x), at(stats), at(gamma), at(dy), at(sums));
            e.for_dynamic(lo, hi, |e, ch| {
                let vi = e.iadd_imm(ch, c as i64);
                let mean = e.load(F32, st, ch);
                let var = e.load(F32, st, vi);
                let r = invstd(e, var, eps);
                let gamma = e.load(F32, gm, ch);
                let nv = e.fconst(F32, n);
                let s0 = e.load(F32, sm, ch);
                let s1 = e.load(F32, sm, vi);
                let per_dot = e.b.ins().fdiv(s0, nv);
                let per_sum = e.b.ins().fdiv(s1, nv);
                let scalars = [mean, r, gamma, per_dot, per_sum];
                let vectors = scalars.map(|v| e.b.ins().splat(F32X4, v));
                runs(e, (b, c, inner), ch, |e, ty, i| {
                    let [mean, r, gamma, per_dot, per_sum] = if ty == F32X4 { vectors } else { scalars };
                    let v = e.load(ty, src, i);
                    let d = e.load(ty, ds, i);
                    let centred = e.b.ins().fsub(v, mean);
                    let xhat = e.b.ins().fmul(centred, r);
                    let t = e.b.ins().fsub(d, per_sum);
                    let u = e.b.ins().fmul(xhat, per_dot);
                    let t = e.b.ins().fsub(t, u);
                    let t = e.b.ins().fmul(t, r);
                    let t = e.b.ins().fmul(t, gamma);
                    e.store(out, i, t);
                });
            });
        }
        ref op => return Err(format!("`{}` is not a batch-normalization op", op.mnemonic())),
    }
    Ok(())
}

/// `body(ty, i)` over the elements of channel `ch` of a `[b, c, inner]` value.
fn runs(
    e: &mut Emit,
    (b, c, inner): (usize, usize, usize),
    ch: Value,
    mut body: impl FnMut(&mut Emit, Type, Value),
) {
    e.for_range(0, b as i64, 1, |e, n| {
        let row = e.imul_imm(n, c as i64);
        let row = e.iadd(row, ch);
        let start = e.imul_imm(row, inner as i64);
        e.elementwise(inner, |e, ty, j| {
            let i = e.iadd(start, j);
            body(e, ty, i);
        });
    });
}

/// `dst = ops(src·scale (+ shift))` over channel `ch`.
fn affine_runs(
    e: &mut Emit,
    dims: (usize, usize, usize),
    ch: Value,
    (src, dst): (usize, usize),
    (scale, shift): (Value, Option<Value>),
    ops: &[EpOp],
) {
    let sv = e.b.ins().splat(F32X4, scale);
    let hv = shift.map(|h| (h, e.b.ins().splat(F32X4, h)));
    runs(e, dims, ch, |e, ty, i| {
        let v = e.load(ty, src, i);
        let mut y = e.b.ins().fmul(v, if ty == F32X4 { sv } else { scale });
        if let Some((h, hv)) = hv {
            y = e.b.ins().fadd(y, if ty == F32X4 { hv } else { h });
        }
        let y = apply_ops(e, ty, ops, y, i, None, true);
        e.store(dst, i, y);
    });
}

/// Σ of `term(ty, i)` over channel `ch`, as an F64: each run summed in f32, the runs in f64.
fn channel_sum(
    e: &mut Emit,
    (b, c, inner): (usize, usize, usize),
    ch: Value,
    mut term: impl FnMut(&mut Emit, Type, Value) -> Value,
) -> Value {
    let acc = e.b.declare_var(F64);
    let zero = e.b.ins().f64const(0.0);
    e.b.def_var(acc, zero);
    e.for_range(0, b as i64, 1, |e, n| {
        let row = e.imul_imm(n, c as i64);
        let row = e.iadd(row, ch);
        let start = e.imul_imm(row, inner as i64);
        let part = sum(e, inner, |e, ty, j| {
            let i = e.iadd(start, j);
            term(e, ty, i)
        });
        let part = e.b.ins().fpromote(F64, part);
        let a = e.b.use_var(acc);
        let a = e.b.ins().fadd(a, part);
        e.b.def_var(acc, a);
    });
    e.b.use_var(acc)
}

/// `total / count` as an F32.
fn mean_of(e: &mut Emit, total: Value, count: f64) -> Value {
    let n = e.b.ins().f64const(count);
    let m = e.b.ins().fdiv(total, n);
    e.b.ins().fdemote(F32, m)
}

/// `1/√(var + eps)`.
fn invstd(e: &mut Emit, var: Value, eps: f32) -> Value {
    let eps = e.fconst(F32, eps);
    let v = e.b.ins().fadd(var, eps);
    let s = e.b.ins().sqrt(v);
    let one = e.fconst(F32, 1.0);
    e.b.ins().fdiv(one, s)
}

/// `(scale, shift) = (γ/√(var + eps), β − mean·scale)`, as the interpreter computes them.
fn coefficients(
    e: &mut Emit,
    (mean, var, gamma, beta): (Value, Value, Value, Value),
    eps: f32,
) -> (Value, Value) {
    let r = invstd(e, var, eps);
    let scale = e.b.ins().fmul(r, gamma);
    let m = e.b.ins().fmul(mean, scale);
    let shift = e.b.ins().fsub(beta, m);
    (scale, shift)
}
