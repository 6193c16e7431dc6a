//! The matmul kernel: `C[M,N] = op(A)·op(B)`.
//!
//! B is packed into panels of 8 columns (`[N/8][K][8]`, zero-padded), so every panel row is two
//! `F32X4` loads whatever B's layout. C is computed in blocks of 6 rows × 8 columns held in 12
//! vector accumulators: per k, two loads of B, six broadcasts of A and twelve `fma`s. A and the
//! packed panel are loaded as read-only and movable, which lets Cranelift keep the accumulators
//! in registers (measured: ~28 GFLOP/s without the flag, ~37 with it, one core). Rows past the last full block and columns
//! past the last full panel get their own code, sized at compile time. Threads split the blocks
//! of rows — or, when B is large and A small (a convolution's im2col and its weights), groups of
//! eight column panels, which balances a few rows over many columns and keeps each group's
//! panels in cache while every block of rows passes over them.

use super::emit::{Emit, EpOp, apply_ops};
use super::plan::Plan;
use crate::ir::{Graph, NodeId};
use cranelift_codegen::ir::condcodes::IntCC;
use cranelift_codegen::ir::types::{F32, F32X4};
use cranelift_codegen::ir::{InstBuilder, Value};
use cranelift_frontend::Variable;

const MR: usize = 6;
const NR: usize = 8;

/// One matmul `C[M,N] = op(A)·B` with B already packed: sizes and arena offsets.
pub struct Mm<'a> {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    /// A: row-major [M, K], or [K, M] when `ta`.
    pub a: usize,
    pub ta: bool,
    pub packed: usize,
    /// C: row-major [M, N], or [N, M] when `tc` (stored lane by lane; no epilogue).
    pub c: usize,
    pub tc: bool,
    pub epilogue: &'a [EpOp],
    /// Whether the epilogue's operands stay unchanged for the whole kernel, so their loads may
    /// move (out of loops). False inside a recurrent time loop, which rewrites them every step.
    pub stable: bool,
}

/// Bytes of B packed in panels of 8 columns.
pub fn packed_bytes(k: usize, n: usize) -> usize {
    k * n.div_ceil(NR) * NR * 4
}

/// The epilogue of matmul `mm` fused with `chain`.
pub fn epilogue(g: &Graph, plan: &Plan, mm: NodeId, chain: &[NodeId]) -> Vec<EpOp> {
    let at = |n: NodeId| plan.node[n.index()];
    // The chain operand of each op is the node before it in the chain (or the matmul).
    let mut cur = mm;
    let mut out = Vec::new();
    for &u in chain {
        out.push(match g.node(u).op {
            crate::ir::Op::BiasAdd { bias, .. } => EpOp::Bias(at(bias)),
            crate::ir::Op::Unary { f, .. } => EpOp::Unary(f),
            crate::ir::Op::Scale { c, .. } => EpOp::Scale(c),
            crate::ir::Op::ActGrad { f, y, .. } => EpOp::ActGrad(f, at(y)),
            crate::ir::Op::Binary { f, a, b } => {
                let c_left = a == cur;
                EpOp::Binary(f, at(if c_left { b } else { a }), c_left)
            }
            _ => break,
        });
        cur = u;
    }
    out
}

/// Applies the epilogue to four columns of C at flat index `idx`, column `col`.
fn apply(e: &mut Emit, mm: &Mm, v: Value, idx: Value, col: Value) -> Value {
    apply_ops(e, F32X4, mm.epilogue, v, idx, Some(col), mm.stable)
}

/// The sizes of a matmul node: (M, N, K).
pub fn dims(g: &Graph, id: NodeId) -> Option<(usize, usize, usize)> {
    let crate::ir::Op::MatMul { a, b, ta, tb } = g.node(id).op else { return None };
    let sa = &g.ty(a).shape;
    let sb = &g.ty(b).shape;
    let (m, k) = if ta { (sa[1], sa[0]) } else { (sa[0], sa[1]) };
    let n = if tb { sb[0] } else { sb[1] };
    Some((m, n, k))
}

/// Blocks of rows a matmul's compute kernel splits into: the unit of work per thread.
pub fn row_blocks(m: usize) -> usize {
    m.div_ceil(MR)
}

/// Column panels per work unit when a matmul splits by columns.
const PANELS_PER_UNIT: usize = 8;

/// Whether a matmul splits into groups of column panels, every block of rows passing over a
/// group while it stays in cache, rather than into blocks of rows, each streaming all of B:
/// when B is large (a convolution's im2col) and A small enough to stay in the core's cache
/// (its weights).
fn columns_first(m: usize, n: usize, k: usize) -> bool {
    m * k * 4 <= 256 << 10 && k * n * 4 >= 1 << 20
}

/// The work units of the compute kernel: blocks of rows, or groups of column panels.
pub fn units(m: usize, n: usize, k: usize) -> usize {
    if columns_first(m, n, k) { n.div_ceil(NR).div_ceil(PANELS_PER_UNIT) } else { row_blocks(m) }
}

/// The packing kernel: B into panels (run once, before the compute kernel).
pub fn emit_pack(
    e: &mut Emit,
    g: &Graph,
    plan: &Plan,
    id: NodeId,
    (b, tb): (NodeId, bool),
    scratch: usize,
    range: (Value, Value),
) {
    let Some((_, n, k)) = dims(g, id) else { return };
    pack_b(e, plan.node[b.index()], tb, k, n, scratch, range);
}

/// The compute kernel over row blocks `lo..hi` (I64 block indices).
#[allow(clippy::too_many_arguments)]
pub fn emit(
    e: &mut Emit,
    g: &Graph,
    plan: &Plan,
    id: NodeId,
    (a, ta): (NodeId, bool),
    scratch: usize,
    (lo, hi): (Value, Value),
    (out, epilogue): (usize, &[EpOp]),
) {
    let Some((m, n, k)) = dims(g, id) else { return };
    let mm = Mm {
        m,
        n,
        k,
        a: plan.node[a.index()],
        ta,
        packed: scratch,
        c: out,
        tc: false,
        epilogue,
        stable: true,
    };
    emit_mm(e, &mm, (lo, hi));
}

/// The compute kernel of `mm` over its row blocks `lo..hi`.
pub fn emit_mm(e: &mut Emit, mm: &Mm, (lo, hi): (Value, Value)) {
    let (m, n) = (mm.m, mm.n);
    let full_rows = m / MR;
    let full_panels = n / NR;
    if columns_first(m, n, mm.k) {
        // Unit u: panels 8u..8u + 8 under every block of rows; the last unit also takes the
        // partial panel.
        let count = units(m, n, mm.k) as i64;
        let top = e.i64(count);
        let end = e.b.ins().smin(hi, top);
        e.for_dynamic(lo, end, |e, u| {
            let p0 = e.imul_imm(u, PANELS_PER_UNIT as i64);
            let p1 = e.iadd_imm(p0, PANELS_PER_UNIT as i64);
            let last = e.i64(full_panels as i64);
            let p1 = e.b.ins().smin(p1, last);
            rows_over_panels(e, mm, (p0, p1), NR);
        });
        if !n.is_multiple_of(NR) {
            let reaches = e.icmp_imm(IntCC::SignedGreaterThanOrEqual, hi, count);
            let starts = e.icmp_imm(IntCC::SignedLessThan, lo, count);
            let holds = e.b.ins().band(reaches, starts);
            e.when(holds, |e| {
                let jp = e.i64(full_panels as i64);
                let after = e.i64(full_panels as i64 + 1);
                rows_over_panels(e, mm, (jp, after), n % NR);
            });
        }
        return;
    }
    // Blocks of MR rows; the partial last block is a unit of its own.
    let mut whole = |e: &mut Emit, ib: Value| {
        let i0 = e.imul_imm(ib, MR as i64);
        panels(e, mm, i0, MR, full_panels);
    };
    let mut partial = |e: &mut Emit| {
        let i0 = e.i64((full_rows * MR) as i64);
        panels(e, mm, i0, m % MR, full_panels);
    };
    e.units((lo, hi), full_rows, !m.is_multiple_of(MR), &mut whole, &mut partial);
}

/// Rows `r0..r1` of `mm`, bounds known only at run time (a recurrent loop's share of the
/// batch): blocks of MR rows, then the 1 to MR−1 rows left, each count with its own code.
pub fn emit_rows(e: &mut Emit, mm: &Mm, (r0, r1): (Value, Value)) {
    let full_panels = mm.n / NR;
    let count = e.b.ins().isub(r1, r0);
    let zero = e.i64(0);
    let count = e.b.ins().smax(count, zero);
    let blocks = e.with_imm(count, MR as i64, |ins, x, c| ins.udiv(x, c));
    e.for_dynamic(zero, blocks, |e, ib| {
        let t = e.imul_imm(ib, MR as i64);
        let i0 = e.iadd(r0, t);
        panels(e, mm, i0, MR, full_panels);
    });
    let t = e.imul_imm(blocks, MR as i64);
    let rest = e.iadd(r0, t);
    let left = e.with_imm(count, MR as i64, |ins, x, c| ins.urem(x, c));
    for rows in 1..MR {
        let is = e.icmp_imm(IntCC::Equal, left, rows as i64);
        e.when(is, |e| panels(e, mm, rest, rows, full_panels));
    }
}

/// Column panels `p0..p1` (each `cols` wide), block of rows by block of rows: the panels stay
/// in cache while every block passes over them.
fn rows_over_panels(e: &mut Emit, mm: &Mm, (p0, p1): (Value, Value), cols: usize) {
    e.for_range(0, (mm.m / MR) as i64, 1, |e, ib| {
        let i0 = e.imul_imm(ib, MR as i64);
        e.for_dynamic(p0, p1, |e, jp| block(e, mm, i0, MR, jp, cols));
    });
    if !mm.m.is_multiple_of(MR) {
        let i0 = e.i64((mm.m / MR * MR) as i64);
        e.for_dynamic(p0, p1, |e, jp| block(e, mm, i0, mm.m % MR, jp, cols));
    }
}

/// All column panels of a block of `rows` rows starting at `i0`.
fn panels(e: &mut Emit, mm: &Mm, i0: Value, rows: usize, full_panels: usize) {
    e.for_range(0, full_panels as i64, 1, |e, jp| block(e, mm, i0, rows, jp, NR));
    if !mm.n.is_multiple_of(NR) {
        let jp = e.i64(full_panels as i64);
        block(e, mm, i0, rows, jp, mm.n % NR);
    }
}

/// One `rows × cols` block of C (rows ≤ 4, cols ≤ 8) at rows `i0..`, panel `jp`.
fn block(e: &mut Emit, mm: &Mm, i0: Value, rows: usize, jp: Value, cols: usize) {
    let acc: Vec<[Variable; 2]> = (0..rows)
        .map(|_| {
            let z = e.fconst(F32X4, 0.0);
            let v0 = e.b.declare_var(F32X4);
            let v1 = e.b.declare_var(F32X4);
            e.b.def_var(v0, z);
            e.b.def_var(v1, z);
            [v0, v1]
        })
        .collect();
    let panel = e.imul_imm(jp, (mm.k * NR) as i64);
    // A(i0 + r, k) = a[a0 + k·sk + r·sr]; the row's part is a constant, folded into the
    // load's displacement like the panel's second half.
    let (a0, sk, sr) = if mm.ta { (i0, mm.m, 1) } else { (e.imul_imm(i0, mm.k as i64), 1, mm.k) };
    let step = |e: &mut Emit, kk: Value, pure: bool| {
        let row = e.imul_imm(kk, NR as i64);
        let at = e.iadd(panel, row);
        let b0 = e.load_ro(F32X4, mm.packed, at);
        let b1 = e.load_ro(F32X4, mm.packed + 16, at);
        let t = e.imul_imm(kk, sk as i64);
        let ak = e.iadd(a0, t);
        for (r, acc) in acc.iter().enumerate() {
            // Movable even when A changes between calls (`!mm.stable`) if the address depends
            // on the k loop's counter: the load cannot leave the loop, and nothing inside it
            // stores. As a pure load it is scheduled next to its `fma`s, which keeps the
            // accumulators in registers.
            let off = mm.a + 4 * r * sr;
            let av = if pure { e.load_ro(F32, off, ak) } else { e.load(F32, off, ak) };
            let av = e.b.ins().splat(F32X4, av);
            for (h, bv) in [b0, b1].into_iter().enumerate() {
                let cur = e.b.use_var(acc[h]);
                let nv = e.b.ins().fma(av, bv, cur);
                e.b.def_var(acc[h], nv);
            }
        }
    };
    // Two k per iteration: the accumulators move to their loop registers once per two.
    let pairs = (mm.k / 2 * 2) as i64;
    e.for_range(0, pairs, 2, |e, kk| {
        step(e, kk, true);
        let k1 = e.iadd_imm(kk, 1);
        step(e, k1, true);
    });
    if mm.k % 2 == 1 {
        // A constant k: in a partial block of a time loop the address would be constant too,
        // and a pure load of it could be hoisted out of the time loop that rewrites A.
        let last = e.i64(pairs);
        step(e, last, mm.stable);
    }
    let col0 = e.imul_imm(jp, NR as i64);
    for (r, acc) in acc.iter().enumerate() {
        let i = e.iadd_imm(i0, r as i64);
        let row = e.imul_imm(i, mm.n as i64);
        let at = e.iadd(row, col0);
        let v0 = e.b.use_var(acc[0]);
        let v1 = e.b.use_var(acc[1]);
        let at4 = e.iadd_imm(at, 4);
        let col4 = e.iadd_imm(col0, 4);
        let v0 = apply(e, mm, v0, at, col0);
        let v1 = apply(e, mm, v1, at4, col4);
        if mm.tc {
            // C(i, j) at c[j·M + i].
            for j in 0..cols {
                let v = if j < 4 { v0 } else { v1 };
                let lane = e.b.ins().extractlane(v, (j % 4) as u8);
                let t = e.iadd_imm(col0, j as i64);
                let t = e.imul_imm(t, mm.m as i64);
                let aj = e.iadd(t, i);
                e.store(mm.c, aj, lane);
            }
        } else if cols == NR {
            e.store(mm.c, at, v0);
            e.store(mm.c, at4, v1);
        } else {
            for j in 0..cols {
                let v = if j < 4 { v0 } else { v1 };
                let lane = e.b.ins().extractlane(v, (j % 4) as u8);
                let aj = e.iadd_imm(at, j as i64);
                e.store(mm.c, aj, lane);
            }
        }
    }
}

/// `packed[j/8][k][j%8] = B(k, j)`, zero past column N, for the panels `lo..hi` (I64 panel
/// indices): the work one thread takes. A row-major B is copied eight floats at a time; a
/// transposed one is read along its rows, one panel column after another.
pub fn pack_b(e: &mut Emit, b: usize, tb: bool, k: usize, n: usize, packed: usize, (lo, hi): (Value, Value)) {
    let full = n / NR;
    let mut whole = |e: &mut Emit, jp: Value| {
        let dst0 = e.imul_imm(jp, (k * NR) as i64);
        let col0 = e.imul_imm(jp, NR as i64);
        if tb {
            for j in 0..NR {
                // B(kk, col0 + j) = b[(col0 + j)·K + kk].
                let src = e.imul_imm(col0, k as i64);
                e.for_range(0, k as i64, 1, |e, kk| {
                    let s = e.iadd(src, kk);
                    let v = e.load_ro(F32, b + 4 * j * k, s);
                    let d = e.ishl_imm(kk, 3);
                    let d = e.iadd(dst0, d);
                    e.store(packed + 4 * j, d, v);
                });
            }
        } else {
            panel_rows(e, (b, col0, n), k, (packed, dst0));
        }
    };
    // The last, partial panel: zero past column N.
    let mut partial = |e: &mut Emit| {
        for j in 0..NR {
            let col = full * NR + j;
            e.for_range(0, k as i64, 1, |e, kk| {
                let v = if col < n {
                    let src = if tb {
                        e.iadd_imm(kk, (col * k) as i64)
                    } else {
                        let t = e.imul_imm(kk, n as i64);
                        e.iadd_imm(t, col as i64)
                    };
                    e.load_ro(F32, b, src)
                } else {
                    e.fconst(F32, 0.0)
                };
                let d = e.ishl_imm(kk, 3);
                e.store(packed + 4 * (full * k * NR + j), d, v);
            });
        }
    };
    e.units((lo, hi), full, !n.is_multiple_of(NR), &mut whole, &mut partial);
}

/// Copies `k` rows of 8 floats into one panel: row `kk` from `src[first + kk·stride..]` to
/// `packed[dst0 + kk·8..]`, two vector loads and stores each.
pub fn panel_rows(
    e: &mut Emit,
    (src, first, stride): (usize, Value, usize),
    k: usize,
    (packed, dst0): (usize, Value),
) {
    e.for_range(0, k as i64, 1, |e, kk| {
        let t = e.imul_imm(kk, stride as i64);
        let s = e.iadd(first, t);
        let d = e.ishl_imm(kk, 3);
        let d = e.iadd(dst0, d);
        for half in 0..2 {
            let v = e.load_ro(F32X4, src + 16 * half, s);
            e.store(packed + 16 * half, d, v);
        }
    });
}

/// Work units of a packing kernel (panels) and its rough work, in the multiply-adds
/// `SPLIT_WORK` is measured in (a packed float costs about as much as 16 of them).
pub fn pack_units(k: usize, n: usize) -> (usize, usize) {
    (n.div_ceil(NR), 16 * k * n)
}
