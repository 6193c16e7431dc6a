//! The one-hot products without the one-hot (`passes::onehot`): `gather_columns` picks column
//! `ids[r]` of `w [N, D]` for each id, `scatter_columns` adds each row of `dy [R, N]` into
//! column `ids[r]` of `[N, D]`. A column is `N` floats `D` apart, so both go through a
//! transposed copy `[D, N]` in scratch, where it is a row: the gather copies rows of it with
//! vector loads, the scatter adds rows into it and transposes once at the end. Each element is
//! still the sum of the same rows in the same order (the interpreter's, from 0), so the bits
//! do not change.

use super::emit::Emit;
use super::family::{Family, Parts};
use super::kernels::{load_index, transpose};
use super::plan::Plan;
use super::wide;
use crate::ir::{Graph, NodeId, Op};
use cranelift_codegen::ir::types::{F32, F32X4};
use cranelift_codegen::ir::{InstBuilder, Type, Value};

pub const FAMILY: Family = Family {
    parts: |g, id| match g.node(id).op {
        Op::GatherColumns { .. } => Some(Parts { names: &["transpose", "gather"], main: 1 }),
        Op::ScatterColumns { .. } => Some(Parts { names: &["scatter", "transpose"], main: 0 }),
        _ => None,
    },
    scratch_bytes: |g, id, _| dims(g, id).map_or(0, |d| 4 * d.n * d.depth),
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
        (Op::GatherColumns { w, .. }, 0) => {
            let zero = e.i64(0);
            transpose(e, (at(w), d.n, d.depth), t, zero);
        }
        // out[r, :] = t[ids[r], :].
        (Op::GatherColumns { .. }, _) => {
            let top = e.i64(d.rows as i64);
            let hi = e.b.ins().smin(hi, top);
            e.for_dynamic(lo, hi, |e, r| {
                let id = load_index(e, ids, r);
                let src = e.imul_imm(id, d.n as i64);
                let dst = e.imul_imm(r, d.n as i64);
                e.elementwise(d.n, |e, ty, k| {
                    let from = e.iadd(src, k);
                    let v = e.load(ty, t, from);
                    let to = e.iadd(dst, k);
                    e.store(out, to, v);
                });
            });
        }
        // t[:, block] = Σ_r dy[r, block] into row ids[r], from 0.
        (Op::ScatterColumns { dy, .. }, 0) => {
            let dy = at(dy);
            let block = |e: &mut Emit, k0: Value, width: usize| {
                // The block's columns: vectors of four, then single floats.
                let whole = width / 4 * 4;
                let places: Vec<(i64, Type)> = (0..whole)
                    .step_by(4)
                    .map(|j| (j as i64, F32X4))
                    .chain((whole..width).map(|j| (j as i64, F32)))
                    .collect();
                // A loop over the rows of t, not unrolled: a vocabulary may have thousands.
                e.for_range(0, d.depth as i64, 1, |e, c| {
                    let row = e.imul_imm(c, d.n as i64);
                    let row = e.iadd(row, k0);
                    for &(j, ty) in &places {
                        let at = e.iadd_imm(row, j);
                        let zero = e.fconst(ty, 0.0);
                        e.store(t, at, zero);
                    }
                });
                e.for_range(0, d.rows as i64, 1, |e, r| {
                    let id = load_index(e, ids, r);
                    let dst = e.imul_imm(id, d.n as i64);
                    let dst = e.iadd(dst, k0);
                    let src = e.imul_imm(r, d.n as i64);
                    let src = e.iadd(src, k0);
                    for &(j, ty) in &places {
                        let (s, o) = (e.iadd_imm(src, j), e.iadd_imm(dst, j));
                        let v = e.load(ty, dy, s);
                        let acc = e.load(ty, t, o);
                        let sum = e.b.ins().fadd(acc, v);
                        e.store(t, o, sum);
                    }
                });
            };
            let full = d.n / BLOCK;
            let mut whole = |e: &mut Emit, u: Value| {
                let k0 = e.imul_imm(u, BLOCK as i64);
                block(e, k0, BLOCK);
            };
            let mut tail = |e: &mut Emit| {
                let k0 = e.i64((full * BLOCK) as i64);
                block(e, k0, d.n % BLOCK);
            };
            e.units((lo, hi), full, !d.n.is_multiple_of(BLOCK), &mut whole, &mut tail);
        }
        // out[k, c] = t[c, k].
        _ => {
            let zero = e.i64(0);
            transpose(e, (t, d.depth, d.n), out, zero);
        }
    }
    Ok(())
}
