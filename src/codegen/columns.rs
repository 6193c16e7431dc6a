//! The one-hot products without the one-hot (`passes::onehot`): `gather_columns` picks column
//! `ids[r]` of `w [N, D]` for each id, `scatter_columns` adds each row of `dy [R, N]` into
//! column `ids[r]` of `[N, D]`. A column is `N` floats `D` apart, so both go through a
//! transposed copy `[D, N]` in scratch, where it is a row: the gather copies rows of it with
//! vector loads, the scatter adds rows into it and transposes once at the end. Each element is
//! still the sum of the same rows in the same order (the interpreter's, from 0), so the bits
//! do not change.

use super::emit::Emit;
use super::family::{Family, Parts};
use super::kernels::load_index;
use super::plan::Plan;
use super::wide;
use crate::ir::{Graph, NodeId, Op};
use cranelift_codegen::ir::types::{F32, F32X4};
use cranelift_codegen::ir::{InstBuilder, Value};

pub const FAMILY: Family = Family {
    parts: |g, id| match g.node(id).op {
        Op::GatherColumns { .. } => Some(Parts { names: &["transpose", "gather"], main: 1 }),
        Op::ScatterColumns { .. } => Some(Parts { names: &["scatter", "transpose"], main: 0 }),
        _ => None,
    },
    scratch_bytes: |g, id| dims(g, id).map_or(0, |d| 4 * d.n * d.depth),
    wide_call: |_, _, _, _, _| None,
    units,
    emit,
    describe: |g, id, _, _| match g.node(id).op {
        Op::GatherColumns { .. } => format!("transpose the weight of %{} gather_columns into [D, N]", id.0),
        _ => format!("transpose %{} scatter_columns from [D, N]", id.0),
    },
};

/// Columns of `[N, D]` a scatter unit takes: eight vectors of four.
const BLOCK: usize = 32;

/// The sizes both ops share: `rows` ids, columns of `n` floats, `depth` columns.
struct Dims {
    rows: usize,
    n: usize,
    depth: usize,
    ids: NodeId,
}

fn dims(g: &Graph, id: NodeId) -> Option<Dims> {
    match g.node(id).op {
        Op::GatherColumns { w, ids } => {
            let s = &g.ty(w).shape;
            Some(Dims { rows: g.ty(ids).numel(), n: s[0], depth: s[1], ids })
        }
        Op::ScatterColumns { ids, depth, .. } => {
            Some(Dims { rows: g.ty(ids).numel(), n: g.ty(id).shape[0], depth, ids })
        }
        _ => None,
    }
}

/// The gather splits by ids, the scatter by blocks of [`BLOCK`] columns; the transposes run
/// whole.
fn units(g: &Graph, id: NodeId, part: usize, _: Option<&wide::Call>) -> (usize, usize) {
    let Some(d) = dims(g, id) else { return (1, 0) };
    match (&g.node(id).op, part) {
        (Op::GatherColumns { .. }, 1) => (d.rows, 2 * d.rows * d.n),
        (Op::ScatterColumns { .. }, 0) => (d.n.div_ceil(BLOCK), 3 * d.rows * d.n),
        _ => (1, 2 * d.n * d.depth),
    }
}

#[allow(clippy::too_many_arguments)]
fn emit(
    e: &mut Emit,
    g: &Graph,
    plan: &Plan,
    id: NodeId,
    part: usize,
    scratch: usize,
    (lo, hi): (Value, Value),
    _: Option<wide::Core>,
) -> Result<(), String> {
    let d = dims(g, id).ok_or_else(|| format!("%{} is not a one-hot product", id.0))?;
    let at = |x: NodeId| plan.node[x.index()];
    let (out, ids, t) = (at(id), at(d.ids), scratch);
    match (g.node(id).op.clone(), part) {
        // wᵀ: t[c, k] = w[k, c].
        (Op::GatherColumns { w, .. }, 0) => transpose(e, (at(w), d.n, d.depth), t),
        // out[r, :] = t[ids[r], :].
        (Op::GatherColumns { .. }, _) => {
            let top = e.i64(d.rows as i64);
            let hi = e.b.ins().smin(hi, top);
            e.for_dynamic(lo, hi, |e, r| {
                let id = load_index(e, ids, r);
                let src = e.b.ins().imul_imm_s(id, d.n as i64);
                let dst = e.b.ins().imul_imm_s(r, d.n as i64);
                e.elementwise(d.n, |e, ty, k| {
                    let from = e.b.ins().iadd(src, k);
                    let v = e.load(ty, t, from);
                    let to = e.b.ins().iadd(dst, k);
                    e.store(out, to, v);
                });
            });
        }
        // t[:, block] = Σ_r dy[r, block] into row ids[r], from 0.
        (Op::ScatterColumns { dy, .. }, 0) => {
            let dy = at(dy);
            let block = |e: &mut Emit, k0: Value, width: usize| {
                let vectors = width / 4;
                let (zero4, zero1) = (e.fconst(F32X4, 0.0), e.fconst(F32, 0.0));
                for c in 0..d.depth {
                    let row = e.b.ins().iadd_imm_s(k0, (c * d.n) as i64);
                    for j in (0..vectors * 4).step_by(4).chain(vectors * 4..width) {
                        let at = e.b.ins().iadd_imm_s(row, j as i64);
                        e.store(t, at, if j < vectors * 4 { zero4 } else { zero1 });
                    }
                }
                e.for_range(0, d.rows as i64, 1, |e, r| {
                    let id = load_index(e, ids, r);
                    let dst = e.b.ins().imul_imm_s(id, d.n as i64);
                    let dst = e.b.ins().iadd(dst, k0);
                    let src = e.b.ins().imul_imm_s(r, d.n as i64);
                    let src = e.b.ins().iadd(src, k0);
                    for j in (0..vectors * 4).step_by(4).chain(vectors * 4..width) {
                        let ty = if j < vectors * 4 { F32X4 } else { F32 };
                        let (s, o) =
                            (e.b.ins().iadd_imm_s(src, j as i64), e.b.ins().iadd_imm_s(dst, j as i64));
                        let v = e.load(ty, dy, s);
                        let acc = e.load(ty, t, o);
                        let sum = e.b.ins().fadd(acc, v);
                        e.store(t, o, sum);
                    }
                });
            };
            let full = d.n / BLOCK;
            let mut whole = |e: &mut Emit, u: Value| {
                let k0 = e.b.ins().imul_imm_s(u, BLOCK as i64);
                block(e, k0, BLOCK);
            };
            let mut tail = |e: &mut Emit| {
                let k0 = e.i64((full * BLOCK) as i64);
                block(e, k0, d.n % BLOCK);
            };
            e.units((lo, hi), full, !d.n.is_multiple_of(BLOCK), &mut whole, &mut tail);
        }
        // out[k, c] = t[c, k].
        _ => transpose(e, (t, d.depth, d.n), out),
    }
    Ok(())
}

/// `dst[c, r] = src[r, c]` for the row-major `[rows, cols]` matrix at `src`.
fn transpose(e: &mut Emit, (src, rows, cols): (usize, usize, usize), dst: usize) {
    e.for_range(0, rows as i64, 1, |e, r| {
        let row = e.b.ins().imul_imm_s(r, cols as i64);
        e.for_range(0, cols as i64, 1, |e, c| {
            let from = e.b.ins().iadd(row, c);
            let v = e.load(F32, src, from);
            let to = e.b.ins().imul_imm_s(c, rows as i64);
            let to = e.b.ins().iadd(to, r);
            e.store(dst, to, v);
        });
    });
}
