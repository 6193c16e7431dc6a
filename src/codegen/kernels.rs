//! One kernel per IR node: the op's loops with every shape, stride and offset a constant.
//! Semantics are the interpreter's (and so PyTorch's); `tests/jit.rs` holds every kernel to
//! them.

use super::emit::{Emit, EpOp, act_grad, apply_ops, sign, unary};
use super::plan::Plan;
use crate::ir::{BinaryFn, Clip, Graph, LossFn, NodeId, Op, OptimizerFn, UnaryFn};
use cranelift_codegen::ir::condcodes::{FloatCC, IntCC};
use cranelift_codegen::ir::types::{F32, F32X4, I8X16, I32, I32X4, I64};
use cranelift_codegen::ir::{ConstantData, FuncRef, InstBuilder, Type, Value};
use cranelift_frontend::Variable;

/// Emits node `id`'s kernel body; `range` is the (lo, hi) work range of kernels that split
/// across threads. Errors name ops without a kernel (nothing falls back).
pub fn emit(e: &mut Emit, g: &Graph, plan: &Plan, id: NodeId, range: (Value, Value)) -> Result<(), String> {
    let node = g.node(id);
    let out = plan.node[id.index()];
    let at = |n: NodeId| plan.node[n.index()];
    let shape = |n: NodeId| g.ty(n).shape.clone();
    let numel = node.ty.numel();
    match &node.op {
        Op::Input(_) | Op::Param(_) | Op::Reshape { .. } | Op::StopGrad { .. } => {}
        Op::Fill { value, .. } => {
            let v = *value;
            e.elementwise(numel, |e, ty, i| {
                let c = e.fconst(ty, v);
                e.store(out, i, c);
            });
        }
        Op::Normal { salt, .. } => {
            // The rng slot holds the seed and the step as two u64 (element offsets 0 and 2).
            let zero = e.i64(0);
            let two = e.i64(2);
            let seed = e.load(I64, plan.rng, zero);
            let step = e.load(I64, plan.rng, two);
            let salt = e.i64(i64::from(*salt));
            let f = e.normal.ok_or("no ε generator")?;
            e.for_range(0, numel as i64, 1, |e, i| {
                let call = e.b.ins().call(f, &[seed, step, salt, i]);
                let v = e.b.inst_results(call)[0];
                e.store(out, i, v);
            });
        }
        Op::BroadcastScalar { x, .. } => {
            let zero = e.i64(0);
            let s = e.load(F32, at(*x), zero);
            let v = e.b.ins().splat(F32X4, s);
            e.elementwise(numel, |e, ty, i| e.store(out, i, if ty == F32X4 { v } else { s }));
        }
        Op::Unary { .. } | Op::ActGrad { .. } | Op::Binary { .. } | Op::Scale { .. } | Op::BiasAdd { .. } => {
            chain(e, g, plan, &[id], range)?
        }
        Op::Softmax { x } => {
            let n = *node.ty.shape.last().unwrap_or(&1);
            let src = at(*x);
            for_rows(e, numel / n, n, range, |e, r0| softmax_row(e, src, out, r0, n));
        }
        Op::SoftmaxGrad { y, dy } => {
            let n = *node.ty.shape.last().unwrap_or(&1);
            let (ys, ds) = (at(*y), at(*dy));
            for_rows(e, numel / n, n, range, |e, r0| {
                let acc = sum(e, n, |e, ty, j| {
                    let idx = e.iadd(r0, j);
                    let y = e.load(ty, ys, idx);
                    let d = e.load(ty, ds, idx);
                    e.b.ins().fmul(y, d)
                });
                let dotv = e.b.ins().splat(F32X4, acc);
                e.elementwise(n, |e, ty, j| {
                    let idx = e.iadd(r0, j);
                    let y = e.load(ty, ys, idx);
                    let d = e.load(ty, ds, idx);
                    let t = e.b.ins().fsub(d, if ty == F32X4 { dotv } else { acc });
                    let r = e.b.ins().fmul(y, t);
                    e.store(out, idx, r);
                });
            });
        }
        Op::SumAll { x } => {
            let (src, n) = (at(*x), g.ty(*x).numel());
            let s = sum(e, n, |e, ty, i| e.load(ty, src, i));
            let zero = e.i64(0);
            e.store(out, zero, s);
        }
        Op::SumToAxis1 { x } => {
            let s = shape(*x);
            let (b, c, inner) = (s[0], s[1], s[2..].iter().product::<usize>());
            let src = at(*x);
            if inner == 1 {
                // [B, C]: blocks of columns (the work units), each summed down the rows in
                // registers and stored once.
                let (full, rest) = (c / COLUMN_BLOCK, c % COLUMN_BLOCK);
                let mut whole = |e: &mut Emit, u: Value| {
                    let col = e.imul_imm(u, COLUMN_BLOCK as i64);
                    column_sums(e, (src, out), (b, c), col, COLUMN_BLOCK);
                };
                let mut tail = |e: &mut Emit| {
                    let col = e.i64((full * COLUMN_BLOCK) as i64);
                    column_sums(e, (src, out), (b, c), col, rest);
                };
                e.units(range, full, rest > 0, &mut whole, &mut tail);
            } else {
                e.for_range(0, c as i64, 1, |e, ch| {
                    let acc = e.b.declare_var(F32);
                    let z = e.fconst(F32, 0.0);
                    e.b.def_var(acc, z);
                    e.for_range(0, b as i64, 1, |e, n| {
                        let row = e.imul_imm(n, c as i64);
                        let row = e.iadd(row, ch);
                        let start = e.imul_imm(row, inner as i64);
                        let part = sum(e, inner, |e, ty, j| {
                            let idx = e.iadd(start, j);
                            e.load(ty, src, idx)
                        });
                        let a = e.b.use_var(acc);
                        let a = e.b.ins().fadd(a, part);
                        e.b.def_var(acc, a);
                    });
                    let a = e.b.use_var(acc);
                    e.store(out, ch, a);
                });
            }
        }
        Op::MatMul { .. } => return Err("a matmul is emitted with its fused group".into()),
        Op::Conv2d { .. }
        | Op::ConvTranspose2d { .. }
        | Op::Conv2dWeightGrad { .. }
        | Op::ConvTranspose2dWeightGrad { .. }
        | Op::SparseConvT { .. }
        | Op::GatherConv { .. }
        | Op::SparseWeightGrad { .. } => {
            return Err("a convolution is emitted by `codegen::conv`".into());
        }
        Op::PoolArgmax { x, kernel, stride } => {
            pool_argmax(e, &shape(*x), &node.ty.shape, (at(*x), out), (*kernel, *stride), range)
        }
        // Gather and scatter run over the planes of the images `lo..hi`.
        Op::Gather { x, idx } => {
            let xs = shape(*x);
            let (plane_in, plane_out) = (xs[2] * xs[3], node.ty.shape[2] * node.ty.shape[3]);
            let (src, is) = (at(*x), at(*idx));
            let (first, end) = image_planes(e, xs[0], xs[1], range);
            e.for_dynamic(first, end, |e, pl| {
                e.for_range(0, plane_out as i64, 1, |e, i| {
                    let o = e.imul_imm(pl, plane_out as i64);
                    let o = e.iadd(o, i);
                    let sw = load_index(e, is, o);
                    let base = e.imul_imm(pl, plane_in as i64);
                    let s = e.iadd(base, sw);
                    let v = e.load(F32, src, s);
                    e.store(out, o, v);
                });
            });
        }
        Op::Scatter { v, idx, height, width, accumulate } => {
            let vs = shape(*v);
            let (plane_in, plane_out) = (vs[2] * vs[3], height * width);
            let (src, is, acc) = (at(*v), at(*idx), *accumulate);
            let (first, end) = image_planes(e, vs[0], vs[1], range);
            e.for_dynamic(first, end, |e, pl| {
                let base = e.imul_imm(pl, plane_out as i64);
                e.elementwise(plane_out, |e, ty, i| {
                    let at = e.iadd(base, i);
                    let z = e.fconst(ty, 0.0);
                    e.store(out, at, z);
                });
            });
            e.for_dynamic(first, end, |e, pl| {
                e.for_range(0, plane_in as i64, 1, |e, i| {
                    let o = e.imul_imm(pl, plane_in as i64);
                    let o = e.iadd(o, i);
                    let sw = load_index(e, is, o);
                    let base = e.imul_imm(pl, plane_out as i64);
                    let t = e.iadd(base, sw);
                    let val = e.load(F32, src, o);
                    let val = if acc {
                        let old = e.load(F32, out, t);
                        e.b.ins().fadd(old, val)
                    } else {
                        val
                    };
                    e.store(out, t, val);
                });
            });
        }
        Op::AvgPool { x, kernel, stride } => {
            avgpool(e, &shape(*x), &node.ty.shape, at(*x), out, *kernel, *stride)
        }
        Op::AvgPoolGrad { dy, kernel, stride, .. } => {
            avgpool_grad(e, &shape(*dy), &node.ty.shape, at(*dy), out, *kernel, *stride)
        }
        Op::Embed { table, ids } => {
            let dim = shape(*table)[1];
            let (ts, is) = (at(*table), at(*ids));
            e.for_range(0, g.ty(*ids).numel() as i64, 1, |e, t| {
                let id = load_index(e, is, t);
                let src = e.imul_imm(id, dim as i64);
                let dst = e.imul_imm(t, dim as i64);
                copy(e, ts, src, out, dst, dim);
            });
        }
        // Each row's squared distance to every codebook row, summed in order of the
        // coordinates as the interpreter does; the first of equal minima wins.
        Op::Nearest { x, codebook } => {
            let [k, d] = [shape(*codebook)[0], shape(*codebook)[1]];
            let (xs, cs) = (at(*x), at(*codebook));
            for_rows(e, numel, 1, range, |e, r| {
                let best = e.b.declare_var(I64);
                let best_d = e.b.declare_var(F32);
                let zero = e.i64(0);
                let inf = e.fconst(F32, f32::INFINITY);
                e.b.def_var(best, zero);
                e.b.def_var(best_d, inf);
                let row = e.imul_imm(r, d as i64);
                e.for_range(0, k as i64, 1, |e, c| {
                    let acc = e.b.declare_var(F32);
                    let z = e.fconst(F32, 0.0);
                    e.b.def_var(acc, z);
                    let crow = e.imul_imm(c, d as i64);
                    e.for_range(0, d as i64, 1, |e, j| {
                        let xi = e.iadd(row, j);
                        let ci = e.iadd(crow, j);
                        let (a, b) = (e.load(F32, xs, xi), e.load(F32, cs, ci));
                        let diff = e.b.ins().fsub(a, b);
                        let sq = e.b.ins().fmul(diff, diff);
                        let old = e.b.use_var(acc);
                        let new = e.b.ins().fadd(old, sq);
                        e.b.def_var(acc, new);
                    });
                    let dist = e.b.use_var(acc);
                    let bd = e.b.use_var(best_d);
                    let closer = e.b.ins().fcmp(FloatCC::LessThan, dist, bd);
                    let bi = e.b.use_var(best);
                    let nb = e.b.ins().select(closer, c, bi);
                    let nd = e.b.ins().select(closer, dist, bd);
                    e.b.def_var(best, nb);
                    e.b.def_var(best_d, nd);
                });
                let bi = e.b.use_var(best);
                let b32 = e.b.ins().ireduce(I32, bi);
                e.store(out, r, b32);
            });
        }
        // Batch elements `lo..hi`, each matrix written column by column.
        Op::Transpose { x } => {
            let [b, m, n] = [shape(*x)[0], shape(*x)[1], shape(*x)[2]];
            let src = at(*x);
            for_rows(e, b, m * n, range, |e, base| transpose(e, (src, m, n), out, base));
        }
        Op::BatchMatMul { a, b, ta, tb } => {
            let (sa, sb) = (shape(*a), shape(*b));
            let (m, n) = (node.ty.shape[1], node.ty.shape[2]);
            let k = if *ta { sa[1] } else { sa[2] };
            let (a_s, b_s) = (at(*a), at(*b));
            let (pa, pb) = (sa[1] * sa[2], sb[1] * sb[2]);
            let (ra, rb) = (sa[2] as i64, sb[2] as i64);
            let (ta, tb) = (*ta, *tb);
            if !tb {
                // out[i, :] = Σ_q a[i, q] · b[q, :]: rows of b (contiguous) scaled and added,
                // four lanes at a time.
                e.for_range(0, node.ty.shape[0] as i64, 1, |e, bi| {
                    let ao = e.imul_imm(bi, pa as i64);
                    let bo = e.imul_imm(bi, pb as i64);
                    let oo = e.imul_imm(bi, (m * n) as i64);
                    e.for_range(0, m as i64, 1, |e, i| {
                        let row = e.imul_imm(i, n as i64);
                        let row = e.iadd(row, oo);
                        e.elementwise(n, |e, ty, j| {
                            let z = e.fconst(ty, 0.0);
                            let o = e.iadd(row, j);
                            e.store(out, o, z);
                        });
                        e.for_range(0, k as i64, 1, |e, q| {
                            let (r, c) = if ta { (q, i) } else { (i, q) };
                            let x = e.imul_imm(r, ra);
                            let x = e.iadd(x, c);
                            let x = e.iadd(x, ao);
                            let xs = e.load(F32, a_s, x);
                            let xv = e.b.ins().splat(F32X4, xs);
                            let brow = e.imul_imm(q, rb);
                            let brow = e.iadd(brow, bo);
                            e.elementwise(n, |e, ty, j| {
                                let y = e.iadd(brow, j);
                                let yv = e.load(ty, b_s, y);
                                let o = e.iadd(row, j);
                                let acc = e.load(ty, out, o);
                                let x = if ty == F32X4 { xv } else { xs };
                                let acc = e.b.ins().fma(x, yv, acc);
                                e.store(out, o, acc);
                            });
                        });
                    });
                });
            } else if !ta {
                // out[i, j] = a[i, :] · b[j, :]: both rows contiguous, a four-lane dot product.
                e.for_range(0, node.ty.shape[0] as i64, 1, |e, bi| {
                    let ao = e.imul_imm(bi, pa as i64);
                    let bo = e.imul_imm(bi, pb as i64);
                    let oo = e.imul_imm(bi, (m * n) as i64);
                    e.for_range(0, m as i64, 1, |e, i| {
                        let arow = e.imul_imm(i, ra);
                        let arow = e.iadd(arow, ao);
                        e.for_range(0, n as i64, 1, |e, j| {
                            let brow = e.imul_imm(j, rb);
                            let brow = e.iadd(brow, bo);
                            let v = sum(e, k, |e, ty, q| {
                                let x = e.iadd(arow, q);
                                let y = e.iadd(brow, q);
                                let xv = e.load(ty, a_s, x);
                                let yv = e.load(ty, b_s, y);
                                e.b.ins().fmul(xv, yv)
                            });
                            let o = e.imul_imm(i, n as i64);
                            let o = e.iadd(o, j);
                            let o = e.iadd(o, oo);
                            e.store(out, o, v);
                        });
                    });
                });
            } else {
                e.for_range(0, node.ty.shape[0] as i64, 1, |e, bi| {
                    let ao = e.imul_imm(bi, pa as i64);
                    let bo = e.imul_imm(bi, pb as i64);
                    let oo = e.imul_imm(bi, (m * n) as i64);
                    e.for_range(0, m as i64, 1, |e, i| {
                        e.for_range(0, n as i64, 1, |e, j| {
                            let acc = e.b.declare_var(F32);
                            let z = e.fconst(F32, 0.0);
                            e.b.def_var(acc, z);
                            e.for_range(0, k as i64, 1, |e, q| {
                                // a[i, q] (or a[q, i]) and b[q, j] (or b[j, q]).
                                let (r, c) = if ta { (q, i) } else { (i, q) };
                                let x = e.imul_imm(r, ra);
                                let x = e.iadd(x, c);
                                let x = e.iadd(x, ao);
                                let (r, c) = if tb { (j, q) } else { (q, j) };
                                let y = e.imul_imm(r, rb);
                                let y = e.iadd(y, c);
                                let y = e.iadd(y, bo);
                                let xv = e.load(F32, a_s, x);
                                let yv = e.load(F32, b_s, y);
                                let cur = e.b.use_var(acc);
                                let cur = e.b.ins().fma(xv, yv, cur);
                                e.b.def_var(acc, cur);
                            });
                            let o = e.imul_imm(i, n as i64);
                            let o = e.iadd(o, j);
                            let o = e.iadd(o, oo);
                            let v = e.b.use_var(acc);
                            e.store(out, o, v);
                        });
                    });
                });
            }
        }
        Op::AddPairs { q, k } => {
            let [t, s, a] = [node.ty.shape[1], node.ty.shape[2], node.ty.shape[3]];
            let (qs, ks) = (at(*q), at(*k));
            // Rows (b, t) of q, each added to every row (b, s) of k.
            e.for_range(0, (node.ty.shape[0] * t) as i64, 1, |e, bt| {
                let q0 = e.imul_imm(bt, a as i64);
                let bi = e.with_imm(bt, t as i64, |ins, x, c| ins.sdiv(x, c));
                let k_base = e.imul_imm(bi, (s * a) as i64);
                let o_base = e.imul_imm(bt, (s * a) as i64);
                e.for_range(0, s as i64, 1, |e, si| {
                    let off = e.imul_imm(si, a as i64);
                    let k0 = e.iadd(k_base, off);
                    let o0 = e.iadd(o_base, off);
                    e.elementwise(a, |e, ty, c| {
                        let qi = e.iadd(q0, c);
                        let ki = e.iadd(k0, c);
                        let oi = e.iadd(o0, c);
                        let (qv, kv) = (e.load(ty, qs, qi), e.load(ty, ks, ki));
                        let v = e.b.ins().fadd(qv, kv);
                        e.store(out, oi, v);
                    });
                });
            });
        }
        Op::SumAxis { x, axis } => {
            let xs = shape(*x);
            let (outer, n) = (xs[..*axis].iter().product::<usize>(), xs[*axis]);
            let inner = xs[axis + 1..].iter().product::<usize>();
            let src = at(*x);
            // Each output row is the sum of the n rows of its block, added in order.
            e.for_range(0, outer as i64, 1, |e, o| {
                let o0 = e.imul_imm(o, inner as i64);
                e.elementwise(inner, |e, ty, c| {
                    let i = e.iadd(o0, c);
                    let z = e.fconst(ty, 0.0);
                    e.store(out, i, z);
                });
                e.for_range(0, n as i64, 1, |e, j| {
                    let row = e.imul_imm(o, n as i64);
                    let row = e.iadd(row, j);
                    let x0 = e.imul_imm(row, inner as i64);
                    e.elementwise(inner, |e, ty, c| {
                        let xi = e.iadd(x0, c);
                        let oi = e.iadd(o0, c);
                        let (xv, acc) = (e.load(ty, src, xi), e.load(ty, out, oi));
                        let v = e.b.ins().fadd(acc, xv);
                        e.store(out, oi, v);
                    });
                });
            });
        }
        Op::MaskFill { x, ids, value } => {
            let (t, s) = (node.ty.shape[1], node.ty.shape[2]);
            let (xs, is) = (at(*x), at(*ids));
            let fill = *value;
            e.for_range(0, node.ty.shape[0] as i64, 1, |e, bi| {
                e.for_range(0, s as i64, 1, |e, j| {
                    let at_id = e.imul_imm(bi, s as i64);
                    let at_id = e.iadd(at_id, j);
                    let id = load_index(e, is, at_id);
                    let pad = e.icmp_imm(IntCC::Equal, id, 0);
                    let v = e.fconst(F32, fill);
                    e.for_range(0, t as i64, 1, |e, r| {
                        let o = e.imul_imm(bi, (t * s) as i64);
                        let row = e.imul_imm(r, s as i64);
                        let o = e.iadd(o, row);
                        let o = e.iadd(o, j);
                        let xv = e.load(F32, xs, o);
                        let y = e.b.ins().select(pad, v, xv);
                        e.store(out, o, y);
                    });
                });
            });
        }
        Op::EmbedGrad { ids, dy, .. } => {
            let dim = node.ty.shape[1];
            let (is, ds) = (at(*ids), at(*dy));
            e.elementwise(numel, |e, ty, i| {
                let z = e.fconst(ty, 0.0);
                e.store(out, i, z);
            });
            e.for_range(0, g.ty(*ids).numel() as i64, 1, |e, t| {
                let id = load_index(e, is, t);
                let dst = e.imul_imm(id, dim as i64);
                let src = e.imul_imm(t, dim as i64);
                e.elementwise(dim, |e, ty, j| {
                    let d = e.iadd(dst, j);
                    let s = e.iadd(src, j);
                    let old = e.load(ty, out, d);
                    let g = e.load(ty, ds, s);
                    let r = e.b.ins().fadd(old, g);
                    e.store(out, d, r);
                });
            });
        }
        Op::OneHot { ids, depth } => {
            let (is, depth) = (at(*ids), *depth);
            e.elementwise(numel, |e, ty, i| {
                let z = e.fconst(ty, 0.0);
                e.store(out, i, z);
            });
            e.for_range(0, g.ty(*ids).numel() as i64, 1, |e, t| {
                let id = load_index(e, is, t);
                let row = e.imul_imm(t, depth as i64);
                let at = e.iadd(row, id);
                let one = e.fconst(F32, 1.0);
                e.store(out, at, one);
            });
        }
        Op::ShiftRight { ids, start } => {
            let (is, t, start) = (at(*ids), node.ty.shape[1], *start);
            e.for_range(0, numel as i64, 1, |e, i| {
                let pos = e.with_imm(i, t as i64, |ins, x, c| ins.urem(x, c));
                let first = e.icmp_imm(IntCC::Equal, pos, 0);
                let prev = e.iadd_imm(i, -1);
                let prev = e.b.ins().select(first, i, prev);
                let v = e.load(I32, is, prev);
                let s = e.b.ins().iconst(I32, i64::from(start));
                let v = e.b.ins().select(first, s, v);
                e.store(out, i, v);
            });
        }
        Op::LastReal { x, ids } => {
            let s = shape(*x);
            let (t, f, src, is) = (s[1], s[2], at(*x), at(*ids));
            e.for_range(0, s[0] as i64, 1, |e, b| {
                let step = last_real_step(e, is, b, t);
                let from = e.imul_imm(b, t as i64);
                let from = e.iadd(from, step);
                let from = e.imul_imm(from, f as i64);
                let to = e.imul_imm(b, f as i64);
                copy(e, src, from, out, to, f);
            });
        }
        Op::LastRealGrad { dy, ids } => {
            let (t, f) = (node.ty.shape[1], node.ty.shape[2]);
            let (ds, is) = (at(*dy), at(*ids));
            e.elementwise(numel, |e, ty, i| {
                let z = e.fconst(ty, 0.0);
                e.store(out, i, z);
            });
            e.for_range(0, node.ty.shape[0] as i64, 1, |e, b| {
                let step = last_real_step(e, is, b, t);
                let to = e.imul_imm(b, t as i64);
                let to = e.iadd(to, step);
                let to = e.imul_imm(to, f as i64);
                let from = e.imul_imm(b, f as i64);
                copy(e, ds, from, out, to, f);
            });
        }
        Op::LastStep { x } => {
            let s = shape(*x);
            let (t, f, src) = (s[1], s[2], at(*x));
            e.for_range(0, s[0] as i64, 1, |e, b| {
                let from = e.imul_imm(b, (t * f) as i64);
                let from = e.iadd_imm(from, ((t - 1) * f) as i64);
                let to = e.imul_imm(b, f as i64);
                copy(e, src, from, out, to, f);
            });
        }
        Op::Repeat { x, times } => {
            let f = shape(*x)[1];
            let (src, times) = (at(*x), *times);
            e.for_range(0, shape(*x)[0] as i64, 1, |e, b| {
                let from = e.imul_imm(b, f as i64);
                e.for_range(0, times as i64, 1, |e, t| {
                    let to = e.imul_imm(b, (times * f) as i64);
                    let tt = e.imul_imm(t, f as i64);
                    let to = e.iadd(to, tt);
                    copy(e, src, from, out, to, f);
                });
            });
        }
        Op::SliceLast { x, start, len } => {
            let n = *shape(*x).last().unwrap_or(&1);
            let (src, start, len) = (at(*x), *start, *len);
            e.for_range(0, (numel / len) as i64, 1, |e, r| {
                let from = e.imul_imm(r, n as i64);
                let from = e.iadd_imm(from, start as i64);
                let to = e.imul_imm(r, len as i64);
                copy(e, src, from, out, to, len);
            });
        }
        Op::Dropout { x, p, salt } | Op::DropoutGrad { dy: x, p, salt } => {
            let (src, p, salt) = (at(*x), *p, *salt);
            // The rng slot holds the seed and the step as two u64 (element offsets 0 and 2).
            let zero = e.i64(0);
            let two = e.i64(2);
            let seed = e.load(I64, plan.rng, zero);
            let step = e.load(I64, plan.rng, two);
            let scale = 1.0 / (1.0 - p);
            e.for_range(0, numel as i64, 1, |e, i| {
                let u = uniform(e, seed, step, salt, i);
                let pv = e.fconst(F32, p);
                let keep = e.b.ins().fcmp(FloatCC::GreaterThanOrEqual, u, pv);
                let v = e.load(F32, src, i);
                let k = e.fconst(F32, scale);
                let s = e.b.ins().fmul(v, k);
                let z = e.fconst(F32, 0.0);
                let r = e.b.ins().select(keep, s, z);
                e.store(out, i, r);
            });
        }
        Op::Loss { f, pred, target } => {
            loss_kernel(e, *f, &shape(*pred), (at(*pred), at(*target)), Some(out), None)
        }
        Op::LossGrad { f, pred, target, dy } => {
            let zero = e.i64(0);
            let k = e.load(F32, at(*dy), zero);
            loss_kernel(e, *f, &shape(*pred), (at(*pred), at(*target)), None, Some((k, out, &[])))
        }
        Op::PrevStates { x, first } => {
            let s = shape(*x);
            let (t, f, src, first) = (s[1], s[2], at(*x), at(*first));
            e.for_range(0, s[0] as i64, 1, |e, b| {
                let row = e.imul_imm(b, (t * f) as i64);
                let from = e.imul_imm(b, f as i64);
                copy(e, first, from, out, row, f);
                let to = e.iadd_imm(row, f as i64);
                copy(e, src, row, out, to, (t - 1) * f);
            });
        }
        Op::PadLast { x, start, total } => {
            let n = *shape(*x).last().unwrap_or(&1);
            let (src, start, total) = (at(*x), *start, *total);
            e.elementwise(numel, |e, ty, i| {
                let z = e.fconst(ty, 0.0);
                e.store(out, i, z);
            });
            e.for_range(0, (numel / total) as i64, 1, |e, r| {
                let from = e.imul_imm(r, n as i64);
                let to = e.imul_imm(r, total as i64);
                let to = e.iadd_imm(to, start as i64);
                copy(e, src, from, out, to, n);
            });
        }
        Op::SumSteps { x } => {
            let s = shape(*x);
            let (t, f, src) = (s[1], s[2], at(*x));
            e.for_range(0, s[0] as i64, 1, |e, b| {
                let row = e.imul_imm(b, f as i64);
                let first = e.imul_imm(b, (t * f) as i64);
                copy(e, src, first, out, row, f);
                e.for_range(1, t as i64, 1, |e, k| {
                    let step = e.imul_imm(k, f as i64);
                    let from = e.iadd(first, step);
                    e.elementwise(f, |e, ty, j| {
                        let si = e.iadd(from, j);
                        let v = e.load(ty, src, si);
                        let di = e.iadd(row, j);
                        let acc = e.load(ty, out, di);
                        let r = e.b.ins().fadd(acc, v);
                        e.store(out, di, r);
                    });
                });
            });
        }
        Op::Update { .. } => return Err("updates are emitted together".into()),
        Op::Part { .. } | Op::GateSaves { .. } => {}
        Op::BnStats { .. }
        | Op::BatchNorm { .. }
        | Op::BnSums { .. }
        | Op::BnGrad { .. }
        | Op::BnCoeffs { .. }
        | Op::ChannelAffine { .. } => super::norm::emit(e, g, plan, id, range)?,
        Op::Concat { .. } | Op::SliceChannels { .. } | Op::Upsample { .. } | Op::UpsampleGrad { .. } => {
            super::resample::emit(e, g, plan, id, range)?
        }
        Op::FlipKernel { w } => {
            let [a, b, kh, kw] = [0, 1, 2, 3].map(|i| shape(*w)[i]);
            let (src, kk) = (at(*w), kh * kw);
            e.for_range(0, (a * b) as i64, 1, |e, ij| {
                // Kernel (i, j) to (j, i), its taps reversed.
                let i = e.with_imm(ij, b as i64, |ins, x, c| ins.udiv(x, c));
                let j = e.with_imm(ij, b as i64, |ins, x, c| ins.urem(x, c));
                let to = e.imul_imm(j, a as i64);
                let to = e.iadd(to, i);
                let to = e.imul_imm(to, kk as i64);
                let from = e.imul_imm(ij, kk as i64);
                for t in 0..kk {
                    let s = e.iadd_imm(from, t as i64);
                    let v = e.load(F32, src, s);
                    let d = e.iadd_imm(to, (kk - 1 - t) as i64);
                    e.store(out, d, v);
                }
            });
        }
        Op::Recurrent { .. } | Op::RecurrentGrad { .. } => {
            return Err("recurrent ops are emitted by `codegen::recurrent`".into());
        }
        Op::GatherColumns { .. } | Op::ScatterColumns { .. } => {
            return Err("one-hot products are emitted by `codegen::columns`".into());
        }
    }
    Ok(())
}

/// An elementwise op (or bias add) `ids[0]` and the elementwise ops after it (`fuse`'s
/// chains): one loop computes them all per element and stores the last one's value.
pub fn chain(
    e: &mut Emit,
    g: &Graph,
    plan: &Plan,
    ids: &[NodeId],
    range: (Value, Value),
) -> Result<(), String> {
    let head = *ids.first().ok_or("an empty chain")?;
    let last = *ids.last().unwrap_or(&head);
    let at = |n: NodeId| plan.node[n.index()];
    let out = at(last);
    let ops = super::matmul::epilogue(g, plan, head, &ids[1..]);
    if ops.len() + 1 != ids.len() {
        return Err(format!("%{}: a chain with an op that is not elementwise", head.0));
    }
    if matches!(g.node(head).op, Op::BatchNorm { .. } | Op::ChannelAffine { .. }) {
        return super::norm::emit_chain(e, g, plan, (head, out, &ops), range);
    }
    if !matches!(
        g.node(head).op,
        Op::Unary { .. } | Op::ActGrad { .. } | Op::Binary { .. } | Op::Scale { .. } | Op::BiasAdd { .. }
    ) {
        return Err(format!("%{}: a chain must start with an elementwise op", head.0));
    }
    let numel = g.ty(head).numel();
    if let Some(w) = e.wide
        && let Some(call) = full_width_chain(g, plan, ids, &ops, out)
    {
        // Each unit at full width, with the loop's bits.
        let units = e.i64(call.units() as i64);
        let addr = e.hold(call);
        let hi = e.b.ins().smin(range.1, units);
        e.for_dynamic(range.0, hi, |e, u| {
            e.b.ins().call(w.chain, &[e.base, addr, u]);
        });
        return Ok(());
    }
    let finish = |e: &mut Emit, ty: Type, v: Value, i: Value| {
        let v = apply_ops(e, ty, &ops, v, i, None, true);
        e.store(out, i, v);
    };
    match g.node(head).op {
        Op::BiasAdd { x, bias } => {
            let s = g.ty(x).shape.clone();
            let (rows, c, inner) = (s[0], s[1], s[2..].iter().product::<usize>());
            let (xs, bs) = (at(x), at(bias));
            // Rows `lo..hi` (the batch rows a thread takes), each `c` channels of `inner`.
            let top = e.i64(rows as i64);
            let hi = e.b.ins().smin(range.1, top);
            e.for_dynamic(range.0, hi, |e, r| {
                if inner == 1 {
                    let row0 = e.imul_imm(r, c as i64);
                    e.elementwise(c, |e, ty, j| {
                        let idx = e.iadd(row0, j);
                        let v = e.load(ty, xs, idx);
                        let b = e.load(ty, bs, j);
                        let r = e.b.ins().fadd(v, b);
                        finish(e, ty, r, idx);
                    });
                } else {
                    e.for_range(0, c as i64, 1, |e, ch| {
                        let b = e.load(F32, bs, ch);
                        let bv = e.b.ins().splat(F32X4, b);
                        let rc = e.imul_imm(r, c as i64);
                        let rc = e.iadd(rc, ch);
                        let start = e.imul_imm(rc, inner as i64);
                        e.elementwise(inner, |e, ty, j| {
                            let idx = e.iadd(start, j);
                            let v = e.load(ty, xs, idx);
                            let r = e.b.ins().fadd(v, if ty == F32X4 { bv } else { b });
                            finish(e, ty, r, idx);
                        });
                    });
                }
            });
        }
        ref op => {
            let op = op.clone();
            e.elementwise_chunks(numel, CHUNK, range.0, range.1, |e, ty, i| {
                let v = match op {
                    Op::Unary { f, x } => {
                        let v = e.load(ty, at(x), i);
                        unary(e, ty, f, v)
                    }
                    Op::ActGrad { f, y, dy } => {
                        let y = e.load(ty, at(y), i);
                        let d = e.load(ty, at(dy), i);
                        act_grad(e, ty, f, y, d)
                    }
                    Op::Binary { f, a, b } => {
                        let a = e.load(ty, at(a), i);
                        let b = e.load(ty, at(b), i);
                        match f {
                            BinaryFn::Add => e.b.ins().fadd(a, b),
                            BinaryFn::Sub => e.b.ins().fsub(a, b),
                            BinaryFn::Mul => e.b.ins().fmul(a, b),
                            BinaryFn::Div => e.b.ins().fdiv(a, b),
                        }
                    }
                    Op::Scale { x, c } => {
                        let v = e.load(ty, at(x), i);
                        let k = e.fconst(ty, c);
                        e.b.ins().fmul(v, k)
                    }
                    // Not reached: checked above.
                    _ => e.fconst(ty, 0.0),
                };
                finish(e, ty, v, i);
            });
        }
    }
    Ok(())
}

/// The fused chain `chain` (its ops after the first as `ops`, storing at `out`) as the
/// full-width primitive takes it, when it pays (below) and its first op is one the primitive
/// takes: any elementwise op, or a bias add over rows (not over channels of planes). Its units
/// are the loop kernel's: chunks of [`CHUNK`] elements, or rows.
fn full_width_chain(
    g: &Graph,
    plan: &Plan,
    chain: &[NodeId],
    ops: &[EpOp],
    out: usize,
) -> Option<super::elementwise::ChainCall> {
    let head = *chain.first()?;
    let at = |n: NodeId| plan.node[n.index()];
    let n = g.ty(head).numel();
    // It pays where the divider or a polynomial bounds the loop: an exponential, a sigmoid, a
    // tanh or a division. A chain of adds and multiplies is bound by memory, and the straight
    // 128-bit loop runs it faster than the primitive's op-by-op passes (measured: a bias add
    // over [640, 192], 24 µs against 66). A few floats are done before a call would return.
    let pays = |op: &Op| {
        matches!(op, Op::Unary { f: UnaryFn::Exp | UnaryFn::Sigmoid | UnaryFn::Tanh, .. })
            || matches!(op, Op::Binary { f: BinaryFn::Div, .. })
    };
    if n < 64 || !chain.iter().any(|&id| pays(&g.node(id).op)) {
        return None;
    }
    let (src, first, len) = match g.node(head).op {
        Op::Unary { f, x } => (at(x), EpOp::Unary(f), CHUNK),
        Op::ActGrad { f, y, dy } => (at(dy), EpOp::ActGrad(f, at(y)), CHUNK),
        Op::Binary { f, a, b } => (at(a), EpOp::Binary(f, at(b), true), CHUNK),
        Op::Scale { x, c } => (at(x), EpOp::Scale(c), CHUNK),
        Op::BiasAdd { x, bias } if g.ty(x).shape.len() == 2 => {
            (at(x), EpOp::Bias(at(bias)), g.ty(x).shape[1])
        }
        _ => return None,
    };
    // A bias is indexed by the column: in a unit that is a row only.
    if len == CHUNK && ops.iter().any(|op| matches!(op, EpOp::Bias(_))) {
        return None;
    }
    let ops = std::iter::once(first).chain(ops.iter().copied()).collect();
    Some(super::elementwise::ChainCall { n, len, src, ops, out })
}

/// Elements per work unit of the kernels that split by element ranges.
pub const CHUNK: usize = 8192;

/// Work units of node `id`'s kernel (1 for kernels that do not split), and its rough work.
pub fn units(g: &Graph, id: NodeId) -> (usize, usize) {
    match &g.node(id).op {
        Op::Update { param, .. } => {
            let n: usize = g.params[param.index()].shape.iter().product();
            (n.div_ceil(CHUNK), 8 * n)
        }
        Op::MatMul { .. } => {
            let (m, n, k) = super::matmul::dims(g, id).unwrap_or((1, 1, 1));
            (super::matmul::units(m, n, k), m * n * k)
        }
        Op::Unary { .. } | Op::ActGrad { .. } | Op::Binary { .. } | Op::Scale { .. } => {
            let n = g.ty(id).numel();
            (n.div_ceil(CHUNK), 4 * n)
        }
        Op::BiasAdd { .. } => {
            let s = &g.ty(id).shape;
            (s[0], 4 * g.ty(id).numel())
        }
        // Rows of the last axis, each a softmax (and its gradient) of its own.
        Op::Softmax { .. } | Op::SoftmaxGrad { .. } => {
            let numel = g.ty(id).numel();
            (numel / g.ty(id).shape.last().copied().unwrap_or(1).max(1), 16 * numel)
        }
        // Images (of the input: the gathered or scattered values' planes follow them).
        Op::Gather { x, .. } => (g.ty(*x).shape[0], 8 * g.ty(id).numel()),
        Op::Scatter { v, .. } => (g.ty(*v).shape[0], 8 * g.ty(id).numel()),
        // Rows, each compared with every codebook row; batch elements.
        Op::Nearest { codebook, .. } => {
            let rows = g.ty(id).numel();
            (rows, 3 * rows * g.ty(*codebook).numel())
        }
        Op::Transpose { .. } => (g.ty(id).shape[0], 2 * g.ty(id).numel()),
        // Blocks of columns of a [B, C] sum (`[B, C, 1, …]` too).
        Op::SumToAxis1 { x } if g.ty(*x).shape[2..].iter().product::<usize>() == 1 => {
            (g.ty(id).numel().div_ceil(COLUMN_BLOCK), g.ty(*x).numel())
        }
        // Images; each output compares k² inputs.
        Op::PoolArgmax { x, kernel, .. } => (g.ty(*x).shape[0], 4 * kernel[0] * kernel[1] * g.ty(id).numel()),
        Op::BnStats { .. }
        | Op::BatchNorm { .. }
        | Op::BnSums { .. }
        | Op::BnGrad { .. }
        | Op::BnCoeffs { .. }
        | Op::ChannelAffine { .. } => super::norm::units(g, id),
        Op::Concat { .. } | Op::SliceChannels { .. } | Op::Upsample { .. } | Op::UpsampleGrad { .. } => {
            super::resample::units(g, id)
        }
        _ => (1, 0),
    }
}

/// Columns per work unit of a `[B, C]` sum over rows: eight 4-lane sums kept in registers.
const COLUMN_BLOCK: usize = 32;

/// `out[j] = Σ_r src[r·c + j]` for the `width` columns from `col` of a `[rows, c]` matrix,
/// added down the rows in order from 0 (each column's sum in a register: 4-lane vectors, the
/// last `width mod 4` columns one by one).
fn column_sums(
    e: &mut Emit,
    (src, out): (usize, usize),
    (rows, c): (usize, usize),
    col: Value,
    width: usize,
) {
    let lanes: Vec<(Type, usize)> =
        (0..width / 4).map(|v| (F32X4, 4 * v)).chain((width / 4 * 4..width).map(|j| (F32, j))).collect();
    let accs: Vec<Variable> = lanes
        .iter()
        .map(|&(ty, _)| {
            let var = e.b.declare_var(ty);
            let z = e.fconst(ty, 0.0);
            e.b.def_var(var, z);
            var
        })
        .collect();
    e.for_range(0, rows as i64, 1, |e, r| {
        let row = e.imul_imm(r, c as i64);
        let first = e.iadd(row, col);
        for (&(ty, j), &var) in lanes.iter().zip(&accs) {
            let idx = e.iadd_imm(first, j as i64);
            let v = e.load(ty, src, idx);
            let a = e.b.use_var(var);
            let a = e.b.ins().fadd(a, v);
            e.b.def_var(var, a);
        }
    });
    for (&(_, j), &var) in lanes.iter().zip(&accs) {
        let idx = e.iadd_imm(col, j as i64);
        let a = e.b.use_var(var);
        e.store(out, idx, a);
    }
}

/// The planes `lo·C..hi·C` of images `lo..hi` (of `b` images of `c` planes each).
fn image_planes(e: &mut Emit, b: usize, c: usize, (lo, hi): (Value, Value)) -> (Value, Value) {
    let top = e.i64(b as i64);
    let hi = e.b.ins().smin(hi, top);
    let first = e.imul_imm(lo, c as i64);
    let end = e.imul_imm(hi, c as i64);
    (first, end)
}

/// `for r in 0..rows { body(r·n) }`.
/// `body(first element)` of each row `lo..hi` (the rows one thread takes) of `rows` rows of `n`.
fn for_rows(
    e: &mut Emit,
    rows: usize,
    n: usize,
    (lo, hi): (Value, Value),
    mut body: impl FnMut(&mut Emit, Value),
) {
    let top = e.i64(rows as i64);
    let hi = e.b.ins().smin(hi, top);
    e.for_dynamic(lo, hi, |e, r| {
        let r0 = e.imul_imm(r, n as i64);
        body(e, r0);
    });
}

/// Σ of `term(ty, i)` over `i < n`, vector lanes then tail, as an F32.
pub(super) fn sum(e: &mut Emit, n: usize, mut term: impl FnMut(&mut Emit, Type, Value) -> Value) -> Value {
    let vacc = e.b.declare_var(F32X4);
    let sacc = e.b.declare_var(F32);
    let zv = e.fconst(F32X4, 0.0);
    let zs = e.fconst(F32, 0.0);
    e.b.def_var(vacc, zv);
    e.b.def_var(sacc, zs);
    e.elementwise(n, |e, ty, i| {
        let t = term(e, ty, i);
        let var = if ty == F32X4 { vacc } else { sacc };
        let a = e.b.use_var(var);
        let a = e.b.ins().fadd(a, t);
        e.b.def_var(var, a);
    });
    let v = e.b.use_var(vacc);
    let h = e.hsum(v);
    let s = e.b.use_var(sacc);
    e.b.ins().fadd(h, s)
}

/// Sample `b`'s last real step of the ids `[B, t]` at `is`: its count of nonzero ids less one
/// (0 for a sample of padding only), as an I64.
fn last_real_step(e: &mut Emit, is: usize, b: Value, t: usize) -> Value {
    let count = e.b.declare_var(I64);
    let zero = e.i64(0);
    e.b.def_var(count, zero);
    let row = e.imul_imm(b, t as i64);
    e.for_range(0, t as i64, 1, |e, j| {
        let at = e.iadd(row, j);
        let id = load_index(e, is, at);
        let real = e.icmp_imm(IntCC::NotEqual, id, 0);
        let one = e.i64(1);
        let zero = e.i64(0);
        let add = e.b.ins().select(real, one, zero);
        let c = e.b.use_var(count);
        let c = e.iadd(c, add);
        e.b.def_var(count, c);
    });
    let c = e.b.use_var(count);
    let one = e.i64(1);
    let c = e.b.ins().smax(c, one);
    e.iadd_imm(c, -1)
}

/// Copies `n` elements from `src[from..]` to `dst[to..]`.
pub(super) fn copy(e: &mut Emit, src: usize, from: Value, dst: usize, to: Value, n: usize) {
    e.elementwise(n, |e, ty, j| {
        let s = e.iadd(from, j);
        let v = e.load(ty, src, s);
        let d = e.iadd(to, j);
        e.store(dst, d, v);
    });
}

/// The row-major `[rows, cols]` matrix at element `base` of buffer `src`, transposed into
/// `[cols, rows]` at element `base` of `dst`.
pub(super) fn transpose(e: &mut Emit, (src, rows, cols): (usize, usize, usize), dst: usize, base: Value) {
    e.for_range(0, rows as i64, 1, |e, i| {
        let row = e.imul_imm(i, cols as i64);
        let row = e.iadd(base, row);
        e.for_range(0, cols as i64, 1, |e, j| {
            let si = e.iadd(row, j);
            let v = e.load(F32, src, si);
            let oi = e.imul_imm(j, rows as i64);
            let oi = e.iadd(oi, i);
            let oi = e.iadd(oi, base);
            e.store(dst, oi, v);
        });
    });
}

/// An i32 index at element `i` of buffer `off`, as an I64.
pub(super) fn load_index(e: &mut Emit, off: usize, i: Value) -> Value {
    let v = e.load(I32, off, i);
    e.b.ins().sextend(I64, v)
}

fn softmax_row(e: &mut Emit, src: usize, out: usize, r0: Value, n: usize) {
    // The exponentials are stored as they are summed, then scaled.
    let (_, total) = row_max_sumexp(e, src, r0, n, Some(out));
    let one = e.fconst(F32, 1.0);
    let inv = e.b.ins().fdiv(one, total);
    let invv = e.b.ins().splat(F32X4, inv);
    e.elementwise(n, |e, ty, j| {
        let idx = e.iadd(r0, j);
        let v = e.load(ty, out, idx);
        let r = e.b.ins().fmul(v, if ty == F32X4 { invv } else { inv });
        e.store(out, idx, r);
    });
}

/// Max-pooling with switches over the images `lo..hi` (the work one thread takes).
fn pool_argmax(
    e: &mut Emit,
    xs: &[usize],
    os: &[usize],
    (x, out): (usize, usize),
    (k, s): ([usize; 2], [usize; 2]),
    (lo, hi): (Value, Value),
) {
    let (c, h, w) = (xs[1], xs[2], xs[3]);
    let (oh, ow) = (os[2], os[3]);
    let (first_plane, end_plane) = image_planes(e, xs[0], c, (lo, hi));
    // 2×2 windows at stride 2 take four outputs of a row at a time.
    let quads = if (k, s) == ([2, 2], [2, 2]) { ow / 4 } else { 0 };
    e.for_dynamic(first_plane, end_plane, |e, pl| {
        e.for_range(0, oh as i64, 1, |e, y| {
            e.for_range(0, quads as i64, 1, |e, quad| {
                pool_argmax_quad(e, (x, out), (h, w, oh, ow), pl, y, quad)
            });
            e.for_range(4 * quads as i64, ow as i64, 1, |e, xx| {
                let best = e.b.declare_var(I64);
                let bestv = e.b.declare_var(F32);
                let ys = e.imul_imm(y, (s[0] * w) as i64);
                let xs_ = e.imul_imm(xx, s[1] as i64);
                let first = e.iadd(ys, xs_);
                let pbase = e.imul_imm(pl, (h * w) as i64);
                let fi = e.iadd(pbase, first);
                let fv = e.load(F32, x, fi);
                e.b.def_var(best, first);
                e.b.def_var(bestv, fv);
                for kh in 0..k[0] {
                    for kw in 0..k[1] {
                        let i = e.iadd_imm(first, (kh * w + kw) as i64);
                        let gi = e.iadd(pbase, i);
                        let v = e.load(F32, x, gi);
                        let bv = e.b.use_var(bestv);
                        let take = pool_takes(e, v, bv);
                        let bi = e.b.use_var(best);
                        let nb = e.b.ins().select(take, i, bi);
                        let nv = e.b.ins().select(take, v, bv);
                        e.b.def_var(best, nb);
                        e.b.def_var(bestv, nv);
                    }
                }
                let o = e.imul_imm(pl, (oh * ow) as i64);
                let r = e.imul_imm(y, ow as i64);
                let o = e.iadd(o, r);
                let o = e.iadd(o, xx);
                let bi = e.b.use_var(best);
                let b32 = e.b.ins().ireduce(I32, bi);
                e.store(out, o, b32);
            });
        });
    });
}

/// Whether a max pool's window candidate `v` replaces the best so far (F32 or F32X4): strictly
/// greater keeps the first maximum, and NaN counts as a maximum — `(v > best or v is NaN) and
/// best is not NaN`.
fn pool_takes(e: &mut Emit, v: Value, best: Value) -> Value {
    let gt = e.b.ins().fcmp(FloatCC::UnorderedOrGreaterThan, v, best);
    let ok = e.b.ins().fcmp(FloatCC::Ordered, best, best);
    e.b.ins().band(gt, ok)
}

/// Four outputs `4·quad..4·quad + 4` of row `y` of a 2×2, stride-2 max pool: each candidate of
/// the window is one vector (the row's even or odd columns, split by `shufps`), compared in the
/// scalar loop's order with its rule.
fn pool_argmax_quad(
    e: &mut Emit,
    (x, out): (usize, usize),
    (h, w, oh, ow): (usize, usize, usize, usize),
    pl: Value,
    y: Value,
    quad: Value,
) {
    // Lanes 0, 2 of the first vector, then of the second: the even columns; 1, 3: the odd ones.
    let evens: Vec<u8> = [0u8, 2, 4, 6].iter().flat_map(|&l| (0..4).map(move |b| l * 4 + b)).collect();
    let odds: Vec<u8> = evens.iter().map(|b| b + 4).collect();
    let plane = e.imul_imm(pl, (h * w) as i64);
    let row = e.imul_imm(y, (2 * w) as i64);
    let col = e.imul_imm(quad, 8);
    let first = e.iadd(row, col);
    let at = e.iadd(plane, first);
    let mut candidates = Vec::new();
    for r in 0..2 {
        let i = e.iadd_imm(at, (r * w) as i64);
        let lo = e.load(F32X4, x, i);
        let i = e.iadd_imm(i, 4);
        let hi = e.load(F32X4, x, i);
        let lo = e.bitcast(I8X16, lo);
        let hi = e.bitcast(I8X16, hi);
        for mask in [&evens, &odds] {
            let imm = e.b.func.dfg.immediates.push(ConstantData::from(mask.as_slice()));
            let v = e.b.ins().shuffle(lo, hi, imm);
            candidates.push(e.bitcast(F32X4, v));
        }
    }
    // Flat indices of the first candidate: first + 2·lane.
    let lanes = e.b.func.dfg.constants.insert(ConstantData::from(
        [0i32, 2, 4, 6].iter().flat_map(|l| l.to_le_bytes()).collect::<Vec<u8>>(),
    ));
    let lanes = e.b.ins().vconst(I32X4, lanes);
    let first32 = e.b.ins().ireduce(I32, first);
    let base = e.b.ins().splat(I32X4, first32);
    let base = e.iadd(base, lanes);
    let (mut best, mut best_at) = (candidates[0], base);
    for (n, &v) in candidates.iter().enumerate().skip(1) {
        let offset = e.b.ins().iconst(I32, ((n / 2) * w + n % 2) as i64);
        let offset = e.b.ins().splat(I32X4, offset);
        let at = e.iadd(base, offset);
        let take = pool_takes(e, v, best);
        best = e.select(F32X4, take, v, best);
        best_at = e.b.ins().bitselect(take, at, best_at);
    }
    let o = e.imul_imm(pl, (oh * ow) as i64);
    let r = e.imul_imm(y, ow as i64);
    let o = e.iadd(o, r);
    let q = e.imul_imm(quad, 4);
    let o = e.iadd(o, q);
    let best_at = e.bitcast(F32X4, best_at);
    e.store(out, o, best_at);
}

fn avgpool(e: &mut Emit, xs: &[usize], os: &[usize], x: usize, out: usize, k: [usize; 2], s: [usize; 2]) {
    let (planes, h, w) = (xs[0] * xs[1], xs[2], xs[3]);
    let (oh, ow) = (os[2], os[3]);
    let share = 1.0 / (k[0] * k[1]) as f32;
    e.for_range(0, planes as i64, 1, |e, pl| {
        e.for_range(0, oh as i64, 1, |e, y| {
            e.for_range(0, ow as i64, 1, |e, xx| {
                let pbase = e.imul_imm(pl, (h * w) as i64);
                let ys = e.imul_imm(y, (s[0] * w) as i64);
                let xs_ = e.imul_imm(xx, s[1] as i64);
                let first = e.iadd(ys, xs_);
                let first = e.iadd(pbase, first);
                let mut acc = e.fconst(F32, 0.0);
                for kh in 0..k[0] {
                    for kw in 0..k[1] {
                        let i = e.iadd_imm(first, (kh * w + kw) as i64);
                        let v = e.load(F32, x, i);
                        acc = e.b.ins().fadd(acc, v);
                    }
                }
                let c = e.fconst(F32, share);
                let r = e.b.ins().fmul(acc, c);
                let o = e.imul_imm(pl, (oh * ow) as i64);
                let rr = e.imul_imm(y, ow as i64);
                let o = e.iadd(o, rr);
                let o = e.iadd(o, xx);
                e.store(out, o, r);
            });
        });
    });
}

fn avgpool_grad(
    e: &mut Emit,
    ds: &[usize],
    xs: &[usize],
    dy: usize,
    out: usize,
    k: [usize; 2],
    s: [usize; 2],
) {
    let (planes, oh, ow) = (ds[0] * ds[1], ds[2], ds[3]);
    let (h, w) = (xs[2], xs[3]);
    let share = 1.0 / (k[0] * k[1]) as f32;
    e.elementwise(planes * h * w, |e, ty, i| {
        let z = e.fconst(ty, 0.0);
        e.store(out, i, z);
    });
    e.for_range(0, planes as i64, 1, |e, pl| {
        e.for_range(0, oh as i64, 1, |e, y| {
            e.for_range(0, ow as i64, 1, |e, xx| {
                let o = e.imul_imm(pl, (oh * ow) as i64);
                let rr = e.imul_imm(y, ow as i64);
                let o = e.iadd(o, rr);
                let o = e.iadd(o, xx);
                let gv = e.load(F32, dy, o);
                let c = e.fconst(F32, share);
                let gv = e.b.ins().fmul(gv, c);
                let pbase = e.imul_imm(pl, (h * w) as i64);
                let ys = e.imul_imm(y, (s[0] * w) as i64);
                let xs_ = e.imul_imm(xx, s[1] as i64);
                let first = e.iadd(ys, xs_);
                let first = e.iadd(pbase, first);
                for kh in 0..k[0] {
                    for kw in 0..k[1] {
                        let i = e.iadd_imm(first, (kh * w + kw) as i64);
                        let old = e.load(F32, out, i);
                        let r = e.b.ins().fadd(old, gv);
                        e.store(out, i, r);
                    }
                }
            });
        });
    });
}

/// The counter-based uniform draw of `rng::uniform`, in 64-bit integer ops.
fn uniform(e: &mut Emit, seed: Value, step: Value, salt: u32, i: Value) -> Value {
    let s = e.imul_imm(step, 0x9E37_79B9_7F4A_7C15u64 as i64);
    let z = e.b.ins().bxor(seed, s);
    let z = e.with_imm(z, (u64::from(salt) << 48) as i64, |ins, x, c| ins.bxor(x, c));
    let t = e.imul_imm(i, 0xD1B5_4A32_D192_ED03u64 as i64);
    let mut z = e.b.ins().bxor(z, t);
    for (shift, mul) in [(30, 0xBF58_476D_1CE4_E5B9u64), (27, 0x94D0_49BB_1331_11EBu64)] {
        let sh = e.with_imm(z, shift, |ins, x, c| ins.ushr(x, c));
        let x = e.b.ins().bxor(z, sh);
        z = e.imul_imm(x, mul as i64);
    }
    let sh = e.with_imm(z, 31, |ins, x, c| ins.ushr(x, c));
    let z = e.b.ins().bxor(z, sh);
    let top = e.with_imm(z, 40, |ins, x, c| ins.ushr(x, c));
    let f = e.b.ins().fcvt_from_uint(F32, top);
    let c = e.fconst(F32, 1.0 / (1u64 << 24) as f32);
    e.b.ins().fmul(f, c)
}

/// A loss and its gradient: the mean loss into `value`, the gradient times `k` (an F32
/// scalar) into `grad`, or both in one pass over the predictions (`fuse`'s loss pairs).
fn loss_kernel(
    e: &mut Emit,
    f: LossFn,
    ps: &[usize],
    (p, t): (usize, usize),
    value: Option<usize>,
    grad: Option<(Value, usize, &[EpOp])>,
) {
    let n: usize = ps.iter().product();
    let zero = e.i64(0);
    match f {
        LossFn::Mse | LossFn::L1 | LossFn::Bce => {
            let scale = if f == LossFn::Mse { 2.0 / n as f32 } else { 1.0 / n as f32 };
            let c = e.fconst(F32, scale);
            let grad = grad.map(|(k, out, ops)| {
                let k = e.b.ins().fmul(k, c);
                (k, e.b.ins().splat(F32X4, k), out, ops)
            });
            // Stores the gradient at i; returns the loss term (mse, l1; bce's is scalar only).
            let mut body = |e: &mut Emit, ty: Type, i: Value| {
                let a = e.load(ty, p, i);
                let b = e.load(ty, t, i);
                let diff = e.b.ins().fsub(a, b);
                if let Some((k, kv, out, ops)) = grad {
                    let g = match f {
                        LossFn::Mse => diff,
                        LossFn::L1 => sign(e, ty, diff),
                        _ => {
                            let one = e.fconst(ty, 1.0);
                            let q = e.b.ins().fsub(one, a);
                            let pq = e.b.ins().fmul(q, a);
                            let eps = e.fconst(ty, 1e-12);
                            let den = e.b.ins().fmax(pq, eps);
                            e.b.ins().fdiv(diff, den)
                        }
                    };
                    let r = e.b.ins().fmul(g, if ty == F32X4 { kv } else { k });
                    let r = apply_ops(e, ty, ops, r, i, None, true);
                    e.store(out, i, r);
                }
                match f {
                    LossFn::Mse => e.b.ins().fmul(diff, diff),
                    _ => e.b.ins().fabs(diff),
                }
            };
            match value {
                Some(out) if f != LossFn::Bce => {
                    let s = sum(e, n, &mut body);
                    let c = e.fconst(F32, 1.0 / n as f32);
                    let v = e.b.ins().fmul(s, c);
                    e.store(out, zero, v);
                }
                _ => {
                    if grad.is_some() {
                        e.elementwise(n, |e, ty, i| {
                            body(e, ty, i);
                        });
                    }
                    if let Some(out) = value {
                        let v = bce(e, n, p, t);
                        e.store(out, zero, v);
                    }
                }
            }
        }
        LossFn::CrossEntropyLogits { pad } => {
            let v = *ps.last().unwrap_or(&1);
            let rows = n / v;
            let zero_f = e.fconst(F32, 0.0);
            // The mean's divisor: every row, or (padded) the rows whose id is not 0.
            let inv_rows = if pad {
                let count = e.b.declare_var(F32);
                e.b.def_var(count, zero_f);
                e.for_range(0, rows as i64, 1, |e, r| {
                    let id = load_index(e, t, r);
                    let real = e.icmp_imm(IntCC::NotEqual, id, 0);
                    let one = e.fconst(F32, 1.0);
                    let zero = e.fconst(F32, 0.0);
                    let add = e.b.ins().select(real, one, zero);
                    let c = e.b.use_var(count);
                    let c = e.b.ins().fadd(c, add);
                    e.b.def_var(count, c);
                });
                let c = e.b.use_var(count);
                let one = e.fconst(F32, 1.0);
                let c = e.b.ins().fmax(c, one);
                e.b.ins().fdiv(one, c)
            } else {
                e.fconst(F32, 1.0 / rows as f32)
            };
            let k = grad.map(|(k, _, _)| e.b.ins().fmul(k, inv_rows));
            let acc = e.b.declare_var(F32);
            e.b.def_var(acc, zero_f);
            e.for_range(0, rows as i64, 1, |e, r| {
                let r0 = e.imul_imm(r, v as i64);
                let id = load_index(e, t, r);
                let at = e.iadd(r0, id);
                // The target's logit, read before the row's exponentials are stored (the
                // gradient may take the logits' place).
                let zt = e.load(F32, p, at);
                let (max, total) = row_max_sumexp(e, p, r0, v, grad.map(|g| g.1));
                let real = pad.then(|| e.icmp_imm(IntCC::NotEqual, id, 0));
                if value.is_some() {
                    let l = e.ln(total);
                    let lse = e.b.ins().fadd(max, l);
                    let term = e.b.ins().fsub(lse, zt);
                    let term = match real {
                        Some(real) => {
                            let zero = e.fconst(F32, 0.0);
                            e.b.ins().select(real, term, zero)
                        }
                        None => term,
                    };
                    let cur = e.b.use_var(acc);
                    let cur = e.b.ins().fadd(cur, term);
                    e.b.def_var(acc, cur);
                }
                // A padding row's gradient is 0: its scale k is.
                let k = match (k, real) {
                    (Some(k), Some(real)) => {
                        let zero = e.fconst(F32, 0.0);
                        Some(e.b.ins().select(real, k, zero))
                    }
                    (k, _) => k,
                };
                if let (Some(k), Some((_, out, _))) = (k, grad) {
                    // (softmax − one-hot(target)) · k: the stored exponentials scaled, four at a
                    // time, then k taken off the target's.
                    let one = e.fconst(F32, 1.0);
                    let inv = e.b.ins().fdiv(one, total);
                    let scale = e.b.ins().fmul(inv, k);
                    let scale4 = e.b.ins().splat(F32X4, scale);
                    e.elementwise(v, |e, ty, j| {
                        let idx = e.iadd(r0, j);
                        let ex = e.load(ty, out, idx);
                        let pr = e.b.ins().fmul(ex, if ty == F32X4 { scale4 } else { scale });
                        e.store(out, idx, pr);
                    });
                    let pr = e.load(F32, out, at);
                    let minus = e.b.ins().fsub(pr, k);
                    e.store(out, at, minus);
                }
            });
            if let Some(out) = value {
                let s = e.b.use_var(acc);
                let v = e.b.ins().fmul(s, inv_rows);
                e.store(out, zero, v);
            }
        }
    }
}

/// Binary cross-entropy's mean, PyTorch's way: each log clamped at −100 (scalar: `ln` is the
/// host's).
fn bce(e: &mut Emit, n: usize, p: usize, t: usize) -> Value {
    let acc = e.b.declare_var(F32);
    let z = e.fconst(F32, 0.0);
    e.b.def_var(acc, z);
    e.for_range(0, n as i64, 1, |e, i| {
        let pv = e.load(F32, p, i);
        let tv = e.load(F32, t, i);
        let lo = e.fconst(F32, -100.0);
        let lp = e.ln(pv);
        let lp = e.b.ins().fmax(lp, lo);
        let one = e.fconst(F32, 1.0);
        let q = e.b.ins().fsub(one, pv);
        let lq = e.ln(q);
        let lq = e.b.ins().fmax(lq, lo);
        let u = e.b.ins().fsub(one, tv);
        let a = e.b.ins().fmul(tv, lp);
        let b = e.b.ins().fmul(u, lq);
        let term = e.b.ins().fadd(a, b);
        let cur = e.b.use_var(acc);
        let cur = e.b.ins().fsub(cur, term);
        e.b.def_var(acc, cur);
    });
    let s = e.b.use_var(acc);
    let c = e.fconst(F32, 1.0 / n as f32);
    e.b.ins().fmul(s, c)
}

/// A loss and its gradient in one kernel (`fuse::Group::LossPair`): the gradient's incoming
/// scalar is the constant `fill` the backward pass starts from.
pub fn loss_pair(
    e: &mut Emit,
    g: &Graph,
    plan: &Plan,
    loss: NodeId,
    grad: NodeId,
    chain: &[NodeId],
) -> Result<(), String> {
    let (Op::Loss { f, pred, target }, Op::LossGrad { dy, .. }) = (&g.node(loss).op, &g.node(grad).op) else {
        return Err("a loss pair without its loss and gradient".into());
    };
    let Op::Fill { value, .. } = g.node(*dy).op else {
        return Err("a loss pair whose gradient does not start from a constant".into());
    };
    let at = |n: NodeId| plan.node[n.index()];
    let k = e.fconst(F32, value);
    let io = (at(*pred), at(*target));
    let ops = super::matmul::epilogue(g, plan, grad, chain);
    if ops.len() != chain.len() {
        return Err(format!("%{}: a loss gradient's chain with an op that is not elementwise", grad.0));
    }
    // Cross-entropy stores its gradient row by row, where no chain is applied.
    if matches!(f, LossFn::CrossEntropyLogits { .. }) && !ops.is_empty() {
        return Err(format!("%{}: a chain after cross-entropy's gradient", grad.0));
    }
    let out = at(*chain.last().unwrap_or(&grad));
    loss_kernel(e, *f, &g.ty(*pred).shape, io, Some(at(loss)), Some((k, out, &ops)));
    Ok(())
}

/// The optimizer step of one parameter. Scalars set by the runtime before each step
/// (`Program::set_update_scalars`): [0] SGD's momentum for this step (0 on the parameter's
/// first update, so the buffer starts as the gradient) or Adam's step size lr/(1-β₁ᵗ); [1]
/// Adam's 1/√(1-β₂ᵗ); [2] the learning rate of this step; [3] AdamW's factor 1 − lr·wd; [4]
/// the gradient's scale under `clip norm`.
#[allow(clippy::too_many_arguments)]
fn update(
    e: &mut Emit,
    (f, clip): (OptimizerFn, Clip),
    n: usize,
    param: usize,
    slots: &[usize],
    grad: usize,
    scalars: usize,
    (lo, hi): (Value, Value),
) {
    let mut s = [None; 5];
    let mut scalar = |e: &mut Emit, k: usize, ty: Type| {
        let v = *s[k].get_or_insert_with(|| {
            let i = e.i64(k as i64);
            let x = e.load(F32, scalars, i);
            let v = e.b.ins().splat(F32X4, x);
            (x, v)
        });
        if ty == F32X4 { v.1 } else { v.0 }
    };
    // Loaded once, before the loop.
    let used: &[usize] = match f {
        OptimizerFn::Sgd { .. } => &[0, 2],
        OptimizerFn::Adam { decoupled: true, .. } => &[0, 1, 3],
        OptimizerFn::Adam { .. } => &[0, 1],
        OptimizerFn::RmsProp { .. } => &[2],
        OptimizerFn::Running { .. } => &[],
    };
    for &k in used.iter().chain(if matches!(clip, Clip::Norm(_)) { &[4][..] } else { &[] }) {
        scalar(e, k, F32);
    }
    e.elementwise_chunks(n, CHUNK, lo, hi, |e, ty, i| {
        let p = e.load(ty, param, i);
        let g = e.load(ty, grad, i);
        let g = match clip {
            Clip::None => g,
            Clip::Value(c) => {
                let hi = e.fconst(ty, c);
                let lo = e.fconst(ty, -c);
                let g = e.b.ins().fmax(g, lo);
                e.b.ins().fmin(g, hi)
            }
            Clip::Norm(_) => {
                let k = scalar(e, 4, ty);
                e.b.ins().fmul(g, k)
            }
        };
        match f {
            OptimizerFn::Sgd { momentum, nesterov, weight_decay, .. } => {
                let wd = e.fconst(ty, weight_decay);
                let mut d = e.b.ins().fma(wd, p, g);
                if let Some(&buf) = slots.first() {
                    let b = e.load(ty, buf, i);
                    let mu_t = scalar(e, 0, ty);
                    let nb = e.b.ins().fma(mu_t, b, d);
                    e.store(buf, i, nb);
                    d = if nesterov {
                        let mu = e.fconst(ty, momentum);
                        e.b.ins().fma(mu, nb, d)
                    } else {
                        nb
                    };
                }
                let lrv = scalar(e, 2, ty);
                let step = e.b.ins().fmul(lrv, d);
                let np = e.b.ins().fsub(p, step);
                e.store(param, i, np);
            }
            OptimizerFn::Adam { b1, b2, eps, weight_decay, decoupled, .. } => {
                let (p, g) = if decoupled {
                    let k = scalar(e, 3, ty);
                    (e.b.ins().fmul(p, k), g)
                } else {
                    let wd = e.fconst(ty, weight_decay);
                    (p, e.b.ins().fma(wd, p, g))
                };
                let (ms, vs) = (slots[0], slots[1]);
                let m = e.load(ty, ms, i);
                let v = e.load(ty, vs, i);
                let c1 = e.fconst(ty, 1.0 - b1);
                let gm = e.b.ins().fsub(g, m);
                let m = e.b.ins().fma(c1, gm, m);
                let c2 = e.fconst(ty, 1.0 - b2);
                let gg = e.b.ins().fmul(g, g);
                let gg = e.b.ins().fmul(c2, gg);
                let b2v = e.fconst(ty, b2);
                let v = e.b.ins().fma(b2v, v, gg);
                e.store(ms, i, m);
                e.store(vs, i, v);
                // √v·(1/√(1-β₂ᵗ)) + ε in one fma: PyTorch divides by √(1-β₂ᵗ) and adds ε,
                // two roundings this replaces with one (the denominator differs by at most
                // an ulp); the divider, which bounds this loop, then serves one sqrt and one
                // division per vector instead of a sqrt and two divisions.
                let sq = e.b.ins().sqrt(v);
                let epsv = e.fconst(ty, eps);
                let s1 = scalar(e, 1, ty);
                let den = e.b.ins().fma(sq, s1, epsv);
                let q = e.b.ins().fdiv(m, den);
                let s0 = scalar(e, 0, ty);
                let step = e.b.ins().fmul(s0, q);
                let np = e.b.ins().fsub(p, step);
                e.store(param, i, np);
            }
            OptimizerFn::RmsProp { alpha, eps, weight_decay, momentum, centered, .. } => {
                let g = if weight_decay != 0.0 {
                    let wd = e.fconst(ty, weight_decay);
                    e.b.ins().fma(wd, p, g)
                } else {
                    g
                };
                // s = α·s + (1−α)·g·g, rounded as PyTorch's `mul_(α).addcmul_(g, g, value=1−α)`
                // (and the interpreter) round it: the centered variance s − a² can cancel, and
                // then an ulp here is a visible difference.
                let sa = e.load(ty, slots[0], i);
                let a = e.fconst(ty, alpha);
                let sa = e.b.ins().fmul(sa, a);
                let c = e.fconst(ty, 1.0 - alpha);
                let cg = e.b.ins().fmul(c, g);
                let cgg = e.b.ins().fmul(cg, g);
                let sa = e.b.ins().fadd(sa, cgg);
                e.store(slots[0], i, sa);
                let avg = if centered {
                    // a = a + (1−α)·(g − a) (`lerp_`), d = √(s − a·a).
                    let at = slots[1 + usize::from(momentum != 0.0)];
                    let ga = e.load(ty, at, i);
                    let diff = e.b.ins().fsub(g, ga);
                    let step = e.b.ins().fmul(c, diff);
                    let ga = e.b.ins().fadd(ga, step);
                    e.store(at, i, ga);
                    let aa = e.b.ins().fmul(ga, ga);
                    let var = e.b.ins().fsub(sa, aa);
                    e.b.ins().sqrt(var)
                } else {
                    e.b.ins().sqrt(sa)
                };
                let epsv = e.fconst(ty, eps);
                let avg = e.b.ins().fadd(avg, epsv);
                let q = e.b.ins().fdiv(g, avg);
                let d = if momentum != 0.0 {
                    let b = e.load(ty, slots[1], i);
                    let mu = e.fconst(ty, momentum);
                    let mb = e.b.ins().fmul(mu, b);
                    let nb = e.b.ins().fadd(mb, q);
                    e.store(slots[1], i, nb);
                    nb
                } else {
                    q
                };
                let lrv = scalar(e, 2, ty);
                let step = e.b.ins().fmul(lrv, d);
                let np = e.b.ins().fsub(p, step);
                e.store(param, i, np);
            }
            OptimizerFn::Running { rate } => {
                let r = e.fconst(ty, rate);
                let step = e.b.ins().fmul(r, g);
                let np = e.b.ins().fsub(p, step);
                e.store(param, i, np);
            }
        }
    });
}

/// The full-width Adam update (`elementwise::aec_adam`) as the updates kernel imports it, and
/// its calls by update node.
pub type AdamPrimitive<'a> = (FuncRef, &'a [(NodeId, Box<super::elementwise::AdamCall>)]);

/// Every optimizer update in one kernel: its work units are the chunks of all parameters one
/// after another, and `lo..hi` picks some of them.
pub fn updates(
    e: &mut Emit,
    g: &Graph,
    plan: &Plan,
    ids: &[NodeId],
    (lo, hi): (Value, Value),
    adam: Option<AdamPrimitive>,
) -> Result<(), String> {
    let mut first = 0usize;
    for &id in ids {
        let Op::Update { f, clip, param, grad } = g.node(id).op else { return Err("not an update".into()) };
        let scalars =
            plan.update_scalars.iter().find(|s| s.0 == id).map(|s| s.1).ok_or("update without scalars")?;
        let n: usize = g.params[param.index()].shape.iter().product();
        let chunks = n.div_ceil(CHUNK) as i64;
        // This parameter's part of lo..hi, in its own chunk numbers.
        let zero = e.i64(0);
        let top = e.i64(chunks);
        let l = e.iadd_imm(lo, -(first as i64));
        let l = e.b.ins().smax(l, zero);
        let h = e.iadd_imm(hi, -(first as i64));
        let h = e.b.ins().smin(h, top);
        let call = adam.and_then(|(f, calls)| calls.iter().find(|c| c.0 == id).map(|c| (f, c.1.as_ref())));
        if let Some((f, call)) = call {
            // One call per chunk: the primitive updates the chunk at full width.
            let addr = call as *const super::elementwise::AdamCall as i64;
            e.for_dynamic(l, h, |e, c| {
                let a = e.i64(addr);
                e.b.ins().call(f, &[e.base, a, c]);
            });
        } else {
            let slots = plan.slots[param.index()].clone();
            update(
                e,
                (f, clip),
                n,
                plan.param[param.index()],
                &slots,
                plan.node[grad.index()],
                scalars,
                (l, h),
            );
        }
        first += chunks as usize;
    }
    Ok(())
}

/// The maximum of a row and Σ e^(z - max); with `store`, each e^(z - max) is also written there.
fn row_max_sumexp(e: &mut Emit, src: usize, r0: Value, n: usize, store: Option<usize>) -> (Value, Value) {
    // The maximum four lanes at a time, then across the lanes and the tail (a maximum is the
    // same in any order).
    let fold = |e: &mut Emit, var: Variable, x: Value| {
        let cur = e.b.use_var(var);
        let mx = e.b.ins().fmax(cur, x);
        e.b.def_var(var, mx);
    };
    let ninf = e.fconst(F32, f32::NEG_INFINITY);
    let mv = e.b.declare_var(F32X4);
    let ninf4 = e.b.ins().splat(F32X4, ninf);
    e.b.def_var(mv, ninf4);
    let m = e.b.declare_var(F32);
    e.b.def_var(m, ninf);
    let vec_end = (n / 4 * 4) as i64;
    for (ty, var, from, to, step) in [(F32X4, mv, 0, vec_end, 4), (F32, m, vec_end, n as i64, 1)] {
        e.for_range(from, to, step, |e, j| {
            let idx = e.iadd(r0, j);
            let v = e.load(ty, src, idx);
            fold(e, var, v);
        });
    }
    let lanes = e.b.use_var(mv);
    for lane in 0..4u8 {
        let x = e.b.ins().extractlane(lanes, lane);
        fold(e, m, x);
    }
    let max = e.b.use_var(m);
    if let Some(f) = e.wide.map(|w| w.sum_exp).filter(|_| n >= 8) {
        // The exponentials and their sum at full width, with these bits.
        let at = |e: &mut Emit, off: usize| {
            let r = e.imul_imm(r0, 4);
            e.iadd_imm(r, off as i64)
        };
        let s = at(e, src);
        let d = match store {
            Some(out) => at(e, out),
            None => e.i64(-1),
        };
        let count = e.i64(n as i64);
        let call = e.b.ins().call(f, &[e.base, s, d, count, max]);
        e.full_width = true;
        return (max, e.b.inst_results(call)[0]);
    }
    let maxv = e.b.ins().splat(F32X4, max);
    let total = sum(e, n, |e, ty, j| {
        let idx = e.iadd(r0, j);
        let v = e.load(ty, src, idx);
        let t = e.b.ins().fsub(v, if ty == F32X4 { maxv } else { max });
        let x = e.exp(ty, t);
        if let Some(out) = store {
            e.store(out, idx, x);
        }
        x
    });
    (max, total)
}
