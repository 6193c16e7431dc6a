//! Kernels that move values between layouts: a link's concatenation along channels and its
//! gradient's slice, and `nn.Upsample` (nearest and bilinear, `align_corners=False`) with its
//! gradient. Semantics are the interpreter's (`interp::upsample_taps` gives the source rows
//! and weights; the kernels compute them with the same f32 operations, in the same order).

use super::emit::Emit;
use super::kernels::copy;
use super::plan::Plan;
use crate::ir::{Graph, NodeId, Op};
use cranelift_codegen::ir::condcodes::IntCC;
use cranelift_codegen::ir::types::{F32, I64};
use cranelift_codegen::ir::{InstBuilder, Value};

/// Work units: the images of the batch (every kernel here works image by image).
pub fn units(g: &Graph, id: NodeId) -> (usize, usize) {
    (g.ty(id).shape[0], 2 * g.ty(id).numel())
}

/// Emits the kernel of a concatenation, slice or upsampling node, over the images of `range`.
pub fn emit(e: &mut Emit, g: &Graph, plan: &Plan, id: NodeId, range: (Value, Value)) -> Result<(), String> {
    let at = |n: NodeId| plan.node[n.index()];
    let out = at(id);
    let shape = |n: NodeId| g.ty(n).shape.clone();
    let top = e.i64(g.ty(id).shape[0] as i64);
    let (lo, hi) = (range.0, e.b.ins().smin(range.1, top));
    match g.node(id).op {
        Op::Concat { a, b } => {
            let (sa, sb) = (shape(a), shape(b));
            let inner: usize = sa[2..].iter().product();
            let (ra, rb) = (sa[1] * inner, sb[1] * inner);
            let (src_a, src_b) = (at(a), at(b));
            e.for_dynamic(lo, hi, |e, n| {
                let from_a = e.imul_imm(n, ra as i64);
                let to = e.imul_imm(n, (ra + rb) as i64);
                copy(e, src_a, from_a, out, to, ra);
                let from_b = e.imul_imm(n, rb as i64);
                let to = e.iadd_imm(to, ra as i64);
                copy(e, src_b, from_b, out, to, rb);
            });
        }
        Op::SliceChannels { x, start, len } => {
            let s = shape(x);
            let inner: usize = s[2..].iter().product();
            let src = at(x);
            e.for_dynamic(lo, hi, |e, n| {
                let from = e.imul_imm(n, (s[1] * inner) as i64);
                let from = e.iadd_imm(from, (start * inner) as i64);
                let to = e.imul_imm(n, (len * inner) as i64);
                copy(e, src, from, out, to, len * inner);
            });
        }
        Op::Upsample { x, scale, bilinear } => {
            let s = shape(x);
            let (c, h, w) = (s[1], s[2], s[3]);
            let (oh, ow) = (h * scale[0], w * scale[1]);
            let src = at(x);
            for_planes(e, (lo, hi), c, |e, p| {
                let inp = e.imul_imm(p, (h * w) as i64);
                let outp = e.imul_imm(p, (oh * ow) as i64);
                // Nearest: each input row makes one output row, copied `sh` times.
                let rows = if bilinear { oh } else { h };
                e.for_range(0, rows as i64, 1, |e, r| {
                    let i = if bilinear { r } else { e.imul_imm(r, scale[0] as i64) };
                    let (h0, h1, a0, a1) = taps(e, i, scale[0], h, bilinear);
                    let r0 = row(e, inp, h0, w);
                    let r1 = row(e, inp, h1, w);
                    let orow = row(e, outp, i, ow);
                    e.for_range(0, ow as i64, 1, |e, j| {
                        let (w0, w1, b0, b1) = taps(e, j, scale[1], w, bilinear);
                        let v = if bilinear {
                            let [x00, x01, x10, x11] =
                                [(r0, w0), (r0, w1), (r1, w0), (r1, w1)].map(|(r, c)| {
                                    let i = e.iadd(r, c);
                                    e.load(F32, src, i)
                                });
                            let top = lerp(e, (b0, x00), (b1, x01));
                            let bottom = lerp(e, (b0, x10), (b1, x11));
                            lerp(e, (a0, top), (a1, bottom))
                        } else {
                            let i = e.iadd(r0, w0);
                            e.load(F32, src, i)
                        };
                        let o = e.iadd(orow, j);
                        e.store(out, o, v);
                    });
                    if !bilinear {
                        for k in 1..scale[0] {
                            let to = e.iadd_imm(orow, (k * ow) as i64);
                            copy(e, out, orow, out, to, ow);
                        }
                    }
                });
            });
        }
        // Nearest: each input takes the sum of its sh × sw outputs (a gather, no scatter).
        Op::UpsampleGrad { dy, scale, bilinear: false } => {
            let s = shape(dy);
            let (c, oh, ow) = (s[1], s[2], s[3]);
            let (h, w) = (oh / scale[0], ow / scale[1]);
            let src = at(dy);
            for_planes(e, (lo, hi), c, |e, p| {
                let inp = e.imul_imm(p, (h * w) as i64);
                let outp = e.imul_imm(p, (oh * ow) as i64);
                e.for_range(0, h as i64, 1, |e, r| {
                    let drow = row(e, inp, r, w);
                    let r0 = e.imul_imm(r, scale[0] as i64);
                    e.for_range(0, w as i64, 1, |e, q| {
                        let c0 = e.imul_imm(q, scale[1] as i64);
                        let mut acc = e.fconst(F32, 0.0);
                        for a in 0..scale[0] {
                            let ra = e.iadd_imm(r0, a as i64);
                            let base = row(e, outp, ra, ow);
                            let base = e.iadd(base, c0);
                            for b in 0..scale[1] {
                                let i = e.iadd_imm(base, b as i64);
                                let v = e.load(F32, src, i);
                                acc = e.b.ins().fadd(acc, v);
                            }
                        }
                        let o = e.iadd(drow, q);
                        e.store(out, o, acc);
                    });
                });
            });
        }
        Op::UpsampleGrad { dy, scale, bilinear } => {
            let s = shape(dy);
            let (c, oh, ow) = (s[1], s[2], s[3]);
            let (h, w) = (oh / scale[0], ow / scale[1]);
            let src = at(dy);
            for_planes(e, (lo, hi), c, |e, p| {
                let inp = e.imul_imm(p, (h * w) as i64);
                e.elementwise(h * w, |e, ty, i| {
                    let z = e.fconst(ty, 0.0);
                    let at = e.iadd(inp, i);
                    e.store(out, at, z);
                });
            });
            for_planes(e, (lo, hi), c, |e, p| {
                let inp = e.imul_imm(p, (h * w) as i64);
                let outp = e.imul_imm(p, (oh * ow) as i64);
                e.for_range(0, oh as i64, 1, |e, i| {
                    let (h0, h1, a0, a1) = taps(e, i, scale[0], h, bilinear);
                    let r0 = row(e, inp, h0, w);
                    let r1 = row(e, inp, h1, w);
                    let orow = e.imul_imm(i, ow as i64);
                    let orow = e.iadd(outp, orow);
                    e.for_range(0, ow as i64, 1, |e, j| {
                        let (w0, w1, b0, b1) = taps(e, j, scale[1], w, bilinear);
                        let o = e.iadd(orow, j);
                        let d = e.load(F32, src, o);
                        let targets = if bilinear {
                            vec![(r0, w0, a0, b0), (r0, w1, a0, b1), (r1, w0, a1, b0), (r1, w1, a1, b1)]
                        } else {
                            vec![(r0, w0, a0, b0)]
                        };
                        for (r, c, wa, wb) in targets {
                            let at = e.iadd(r, c);
                            let wt = e.b.ins().fmul(wa, wb);
                            let add = e.b.ins().fmul(wt, d);
                            let old = e.load(F32, out, at);
                            let new = e.b.ins().fadd(old, add);
                            e.store(out, at, new);
                        }
                    });
                });
            });
        }
        ref op => return Err(format!("`{}` is not a resampling op", op.mnemonic())),
    }
    Ok(())
}

/// `body(p)` for the planes `lo·c..hi·c` of images `lo..hi` (of `c` planes each).
fn for_planes(e: &mut Emit, (lo, hi): (Value, Value), c: usize, body: impl FnMut(&mut Emit, Value)) {
    let first = e.imul_imm(lo, c as i64);
    let end = e.imul_imm(hi, c as i64);
    e.for_dynamic(first, end, body);
}

/// The flat index of row `r` of the plane starting at `base`, `w` wide.
fn row(e: &mut Emit, base: Value, r: Value, w: usize) -> Value {
    let off = e.imul_imm(r, w as i64);
    e.iadd(base, off)
}

/// `wa·a + wb·b`.
fn lerp(e: &mut Emit, (wa, a): (Value, Value), (wb, b): (Value, Value)) -> Value {
    let x = e.b.ins().fmul(wa, a);
    let y = e.b.ins().fmul(wb, b);
    e.b.ins().fadd(x, y)
}

/// The source indices and weights of output index `o` (an I64) of an upsampling by `s` of `n`
/// inputs: `interp::upsample_taps`, in Cranelift.
fn taps(e: &mut Emit, o: Value, s: usize, n: usize, bilinear: bool) -> (Value, Value, Value, Value) {
    let one = e.fconst(F32, 1.0);
    if !bilinear {
        let i = e.with_imm(o, s as i64, |ins, x, c| ins.udiv(x, c));
        let last = e.i64(n as i64 - 1);
        let i = e.b.ins().smin(i, last);
        let zero = e.fconst(F32, 0.0);
        return (i, i, one, zero);
    }
    let of = e.b.ins().fcvt_from_sint(F32, o);
    let half = e.fconst(F32, 0.5);
    let t = e.b.ins().fadd(of, half);
    let scale = e.fconst(F32, 1.0 / s as f32);
    let t = e.b.ins().fmul(scale, t);
    let src = e.b.ins().fsub(t, half);
    let zero = e.fconst(F32, 0.0);
    let neg = e.b.ins().fcmp(cranelift_codegen::ir::condcodes::FloatCC::LessThan, src, zero);
    let src = e.b.ins().select(neg, zero, src);
    let i0 = e.b.ins().fcvt_to_uint_sat(I64, src);
    let last = e.i64(n as i64 - 1);
    let i0 = e.b.ins().smin(i0, last);
    let more = e.b.ins().icmp(IntCC::SignedLessThan, i0, last);
    let next = e.iadd_imm(i0, 1);
    let i1 = e.b.ins().select(more, next, i0);
    let i0f = e.b.ins().fcvt_from_sint(F32, i0);
    let l1 = e.b.ins().fsub(src, i0f);
    let l0 = e.b.ins().fsub(one, l1);
    (i0, i1, l0, l1)
}
