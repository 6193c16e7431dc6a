//! The time loops of recurrent layers (`recurrent`, `recurrent_grad`), each in two kernels:
//! *pack* puts `W_hh` in the matmul's panels once, then *loop* runs every step for a range of
//! batch rows — rows are independent sequences, so threads split the batch evenly and each runs
//! the whole loop for its rows. Per step the state's projection is one small matmul on the
//! shared micro-kernel (`matmul::emit_rows`), and the cell's gates one vector pass over the
//! hidden units.
//!
//! Scratch (after the packed panels): the forward keeps the running `h [B, H]` (and `c` for an
//! LSTM) contiguous, so it can be the matmul's left operand, and `gh [B, G·H]`. The backward
//! keeps the carried gradients `dh [B, H]` (and `dc`), this step's `dgh [B, G·H]` and the part
//! of `dh` that skips `W_hh` (a GRU's `dh·z`), added in the matmul's store.

use super::emit::{Emit, EpOp};
use super::family::{Family, Parts};
use super::gates::{Gates, Pass};
use super::matmul::{self, Mm};
use super::plan::Plan;
use super::wide::{self, Call};
use crate::ir::Cell;
use crate::ir::{BinaryFn, Graph, NodeId, Op, recurrent_grad_layout};
use cranelift_codegen::ir::{InstBuilder, Type, Value};

/// The recurrent family: a layer's time loop and its backpropagation through time (pack:
/// `W_hh` into panels, or transposed for the wide core; loop: every step's projection — on the
/// wide core when it is worth it — and gates, rows of the batch split across threads).
pub const FAMILY: Family = Family {
    parts: family_parts,
    scratch_bytes,
    wide_call: family_wide_call,
    units: family_units,
    emit,
    describe: |_, id, _, _| format!("pack w_hh of %{} into panels", id.0),
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    Pack,
    Loop,
}

/// Parts by their index in [`FAMILY`]'s lists.
const PARTS: [Part; 2] = [Part::Pack, Part::Loop];

fn family_parts(g: &Graph, id: NodeId) -> Option<Parts> {
    parts(g, id).map(|_| Parts { names: &["pack", "loop"], main: 1 })
}

fn family_wide_call(
    g: &Graph,
    plan: &Plan,
    id: NodeId,
    scratch: usize,
    extras: wide::Extras,
) -> Option<Call> {
    let mut call = if wide_worth(g, id) { wide_call(g, plan, id, scratch)? } else { return None };
    // With the full-width primitives, the core computes the gates too (`gates`), and the
    // projection's epilogue before them (the backward's; the forward's bias goes into the
    // gates).
    if extras.full_width && cfg!(target_arch = "x86_64") {
        let (gates, epilogue) = full_width_gates(g, plan, id, scratch)?;
        call.gates = Some(gates);
        call.epilogue = epilogue;
    }
    // The product on aec's register tiles, over W_hh packed once per loop in the 128-bit
    // path's panels (which the pack part then writes).
    if extras.tiles {
        let d = dims(g, id)?;
        call = Call { b: layout(d, scratch)[0], tiles: Some(wide::TileB::Panels), ..call };
    }
    Some(call)
}

fn family_units(g: &Graph, id: NodeId, k: usize, call: Option<&Call>) -> (usize, usize) {
    match PARTS[k] {
        Part::Pack => pack_units(g, id),
        Part::Loop => {
            let (units, work) = parts(g, id).map_or((1, 0), |(_, units, work)| (units, work));
            // With the wide core, units are groups of batch rows.
            (call.map_or(units, Call::unit_count), work)
        }
    }
}

/// Sizes of a recurrent op: batch, steps, hidden, gates.
#[derive(Clone, Copy)]
struct Dims {
    b: usize,
    t: usize,
    h: usize,
    g: usize,
    cell: Cell,
}

impl Dims {
    fn gh(&self) -> usize {
        self.g * self.h
    }
    fn s(&self) -> usize {
        self.cell.state(self.h)
    }
    /// The floats a step saves of its gates (`Cell::saves`).
    fn sv(&self) -> usize {
        self.cell.saves() * self.h
    }
}

fn dims(g: &Graph, id: NodeId) -> Option<Dims> {
    // The batch and steps from the projections `[B, T, G·H]` or the states' gradient
    // `[B, T, S]`, G·H from either's `W_hh [G·H, H]`.
    let (cell, bt, w_hh) = match g.node(id).op {
        Op::Recurrent { cell, xp, w_hh, .. } => (cell, xp, w_hh),
        Op::RecurrentGrad { cell, dhs, w_hh, .. } => (cell, dhs, w_hh),
        _ => return None,
    };
    let (s, gh) = (&g.ty(bt).shape, g.ty(w_hh).shape[0]);
    let gates = cell.gates() as usize;
    Some(Dims { b: s[0], t: s[1], h: gh / gates, g: gates, cell })
}

/// Element offsets of batch row `r` at step `t`: its projections (`[B, T, G·H]`), states
/// (`[B, T, S]`) and gate saves (`[B, T, V·H]`), and its rows of the `[B, G·H]` and `[B, H]`
/// scratch buffers.
struct Rows {
    xrow: Value,
    srow: Value,
    vrow: Value,
    grow: Value,
    hrow: Value,
}

fn rows(e: &mut Emit, d: Dims, r: Value, t: Value) -> Rows {
    let bt = e.imul_imm(r, d.t as i64);
    let bt = e.iadd(bt, t);
    Rows {
        xrow: e.imul_imm(bt, d.gh() as i64),
        srow: e.imul_imm(bt, d.s() as i64),
        vrow: e.imul_imm(bt, d.sv() as i64),
        grow: e.imul_imm(r, d.gh() as i64),
        hrow: e.imul_imm(r, d.h as i64),
    }
}

/// The node that reads what recurrent node `rec` saves of its gates (`gate_saves`), if any:
/// the loop then stores there each step's independent gates after activation, the other
/// gates' `h·W_hhᵀ + b_hh` and a GRU's n.
pub fn saved_gates(g: &Graph, rec: NodeId) -> Option<NodeId> {
    g.ids().find(|&id| g.node(id).op == Op::GateSaves { rec })
}

/// `dst[k·rows + i] = src[i·cols + k]`: the `[rows, cols]` matrix at `src` transposed, for the
/// columns of `dst` in panels `lo..hi` of 8 (the pack part's work units).
fn transpose_panels(
    e: &mut Emit,
    src: usize,
    (rows, cols): (usize, usize),
    dst: usize,
    (lo, hi): (Value, Value),
) {
    let i0 = e.imul_imm(lo, 8);
    let i1 = e.imul_imm(hi, 8);
    let top = e.i64(rows as i64);
    let i1 = e.b.ins().smin(i1, top);
    e.for_dynamic(i0, i1, |e, i| {
        let from = e.imul_imm(i, cols as i64);
        e.for_range(0, cols as i64, 1, |e, k| {
            let s = e.iadd(from, k);
            let v = e.load_ro(cranelift_codegen::ir::types::F32, src, s);
            let t = e.imul_imm(k, rows as i64);
            let t = e.iadd(t, i);
            e.store(dst, t, v);
        });
    });
}

fn round(bytes: usize) -> usize {
    bytes.div_ceil(64) * 64
}

/// Offsets of the scratch buffers: packed panels, then `h`/`dh` and `c`/`dc` (`[B, H]`), then
/// the forward's `gh [B, G·H]` or the backward's `direct [B, H]`, then the backward's `dgh`.
fn layout(d: Dims, scratch: usize) -> [usize; 5] {
    let packed = round(matmul::packed_bytes(d.h, d.gh()).max(matmul::packed_bytes(d.gh(), d.h)));
    let bh = round(d.b * d.h * 4);
    let bg = round(d.b * d.gh() * 4);
    let s1 = scratch + packed;
    [scratch, s1, s1 + bh, s1 + 2 * bh, s1 + 2 * bh + bg]
}

fn scratch_bytes(g: &Graph, id: NodeId, _wide: bool) -> usize {
    let Some(d) = dims(g, id) else { return 0 };
    layout(d, 0)[4] + round(d.b * d.gh() * 4)
}

/// Work units (panels) of the pack kernel and its work: `W_hhᵀ [H, G·H]` forward, `W_hh
/// [G·H, H]` backward.
fn pack_units(g: &Graph, id: NodeId) -> (usize, usize) {
    match (dims(g, id), &g.node(id).op) {
        (Some(d), Op::Recurrent { .. }) => matmul::pack_units(d.h, d.gh()),
        (Some(d), _) => matmul::pack_units(d.gh(), d.h),
        (None, _) => (1, 0),
    }
}

/// The parts of a recurrent node, its loop's work units (batch rows) and work.
fn parts(g: &Graph, id: NodeId) -> Option<(Vec<Part>, usize, usize)> {
    let d = dims(g, id)?;
    let work =
        d.b * d.t * d.gh() * d.h * if matches!(g.node(id).op, Op::RecurrentGrad { .. }) { 2 } else { 1 };
    Some((vec![Part::Pack, Part::Loop], d.b, work))
}

/// Whether the per-step projection of recurrent node `id` is worth the wide core.
fn wide_worth(g: &Graph, id: NodeId) -> bool {
    dims(g, id).is_some_and(|d| wide::worth(d.b.min(wide::row_unit(d.b)), d.gh(), d.h))
}

/// The per-step projection of recurrent node `id` as a call into the wide core, its units
/// [`wide::row_unit`] batch rows each: forward `gh = h·W_hhᵀ` with `W_hhᵀ` copied row-major
/// into the scratch by the pack part, backward `dh = dgh·W_hh` straight from the parameter.
fn wide_call(g: &Graph, plan: &Plan, id: NodeId, scratch: usize) -> Option<Call> {
    let d = dims(g, id)?;
    let [packed, s1, _, s3, s4] = layout(d, scratch);
    match g.node(id).op {
        Op::Recurrent { .. } => Some(Call::rows((d.b, d.gh(), d.h), (s1, false), (packed, false), s3)),
        Op::RecurrentGrad { w_hh, .. } => {
            Some(Call::rows((d.b, d.h, d.gh()), (s4, false), (plan.node[w_hh.index()], false), s1))
        }
        _ => None,
    }
}

/// The gates of recurrent node `id` for the wide core to compute, and the epilogue of its
/// projection (`b_hh` forward, the GRU's `dh·z` backward).
fn full_width_gates(g: &Graph, plan: &Plan, id: NodeId, scratch: usize) -> Option<(Gates, Vec<EpOp>)> {
    let d = dims(g, id)?;
    let at = |x: NodeId| plan.node[x.index()];
    let [_, s1, s2, s3, s4] = layout(d, scratch);
    let (pass, epilogue) = match g.node(id).op {
        Op::Recurrent { xp, b_hh, .. } => {
            let saved = saved_gates(g, id).map(at);
            (Pass::Forward { xp: at(xp), gh: s3, bias: b_hh.map(at), h: s1, c: s2, saved }, Vec::new())
        }
        Op::RecurrentGrad { gh, hprev, dhs, .. } => {
            let lay = recurrent_grad_layout(d.cell, d.b, d.t, d.h);
            let pass = Pass::Backward {
                gh: at(gh),
                hprev: at(hprev),
                dhs: at(dhs),
                dh: s1,
                dc: s2,
                direct: s3,
                dgh: s4,
                dxp_at: lay.dxp,
                dgh_at: lay.dgh,
                total: lay.total,
            };
            let direct = [EpOp::Binary(BinaryFn::Add, s3, true)];
            (pass, if d.cell == Cell::Gru { direct.to_vec() } else { Vec::new() })
        }
        _ => return None,
    };
    let gates = Gates { cell: d.cell, b: d.b, t: d.t, h: d.h, out: at(id), pass };
    Some((gates, epilogue))
}

/// Emits part `index` (of [`PARTS`]) of recurrent node `id`; the loop covers batch rows
/// `lo..hi` (units of [`wide::row_unit`] rows with the wide `core`).
#[allow(clippy::too_many_arguments)]
fn emit(
    e: &mut Emit,
    g: &Graph,
    plan: &Plan,
    id: NodeId,
    index: usize,
    scratch: usize,
    (lo, hi): (Value, Value),
    core: Option<wide::Core>,
) -> Result<(), String> {
    let part = PARTS[index];
    let d = dims(g, id).ok_or("not a recurrent op")?;
    let at = |x: NodeId| plan.node[x.index()];
    let out = plan.node[id.index()];
    let [packed, s1, s2, s3, s4] = layout(d, scratch);
    // The loop's work units are batch rows (sequences), or groups of them for the wide core,
    // split evenly between threads.
    let per = match core {
        Some((_, call, _)) if part == Part::Loop => call.unit as i64,
        _ => 1,
    };
    let r0 = e.imul_imm(lo, per);
    let r1 = e.imul_imm(hi, per);
    let bmax = e.i64(d.b as i64);
    let r1 = e.b.ins().smin(r1, bmax);
    let lp =
        Loop { g, plan, id, d, out, slots: [packed, s1, s2, s3, s4], rows: (r0, r1), units: (lo, hi), core };
    // The gemm crate reads W_hh as it is backward, and W_hhᵀ row-major forward; the register
    // tiles, like Cranelift's kernel, read the panels.
    let gemm = core.is_some_and(|(_, call, _)| call.tiles.is_none());
    match (g.node(id).op.clone(), part) {
        // The wide core reads W_hhᵀ row-major [H, G·H]: a transposed copy.
        (Op::Recurrent { w_hh, .. }, Part::Pack) if gemm => {
            transpose_panels(e, at(w_hh), (d.gh(), d.h), packed, (lo, hi))
        }
        (Op::RecurrentGrad { .. }, Part::Pack) if gemm => {}
        // gh = h·W_hhᵀ: B = W_hhᵀ [H, G·H], W_hh stored [G·H, H].
        (Op::Recurrent { w_hh, .. }, Part::Pack) => {
            matmul::pack_b(e, at(w_hh), true, d.h, d.gh(), packed, (lo, hi))
        }
        // dh = dgh·W_hh: B = W_hh [G·H, H].
        (Op::RecurrentGrad { w_hh, .. }, Part::Pack) => {
            matmul::pack_b(e, at(w_hh), false, d.gh(), d.h, packed, (lo, hi))
        }
        (Op::Recurrent { xp, h0, b_hh, .. }, Part::Loop) => forward_loop(e, &lp, (xp, h0, b_hh)),
        (Op::RecurrentGrad { gh, hprev, dhs, .. }, Part::Loop) => backward_loop(e, &lp, (gh, hprev, dhs)),
        _ => return Err("not a recurrent op".into()),
    }
    Ok(())
}

/// What both time loops share: the node, its sizes and scratch slots (`layout`), the batch rows
/// `r0..r1` this call covers (`rows`) and its work units (`units`), the wide core.
struct Loop<'a> {
    g: &'a Graph,
    plan: &'a Plan,
    id: NodeId,
    d: Dims,
    out: usize,
    slots: [usize; 5],
    rows: (Value, Value),
    units: (Value, Value),
    core: Option<wide::Core<'a>>,
}

impl Loop<'_> {
    fn at(&self, x: NodeId) -> usize {
        self.plan.node[x.index()]
    }

    /// Whether the wide core computes the gates with each step's projection.
    fn fused_gates(&self) -> bool {
        self.core.is_some_and(|(_, call, _)| call.gates.is_some())
    }

    /// Step `t` of the units, gates and projection, on the wide core (`fused_gates`): one
    /// call per unit, its argument `t · units + unit`.
    fn fused_step(&self, e: &mut Emit, t: Value) {
        let Some((f, call, addr)) = self.core else { return };
        let count = call.unit_count() as i64;
        let (lo, hi) = self.units;
        let units = e.i64(count);
        let end = e.b.ins().smin(hi, units);
        let first = e.imul_imm(t, count);
        e.for_dynamic(lo, end, |e, u| {
            let arg = e.iadd(first, u);
            let addr = e.i64(addr);
            e.b.ins().call(f, &[e.base, addr, arg]);
        });
    }

    /// The per-step projection of the rows, with the fused epilogue.
    fn project(&self, e: &mut Emit, mm: &Mm) {
        match self.core {
            Some((f, call, addr)) => wide::emit_row_units(e, f, (call, addr), self.units, mm.epilogue, false),
            None => matmul::emit_rows(e, mm, self.rows),
        }
    }
}

/// The forward time loop: per step, the state's projection (`h·W_hhᵀ + b_hh`, saved for the
/// backward pass when it reads it) and the cell's gates, from `h0`.
fn forward_loop(e: &mut Emit, lp: &Loop, (xp, h0, b_hh): (NodeId, NodeId, Option<NodeId>)) {
    let (g, id, d, out) = (lp.g, lp.id, lp.d, lp.out);
    let at = |x: NodeId| lp.at(x);
    let project = |e: &mut Emit, mm: &Mm| lp.project(e, mm);
    let [packed, s1, s2, s3, _] = lp.slots;
    let (r0, r1) = lp.rows;
    let (h, c, gh) = (s1, s2, s3);
    let saved = saved_gates(g, id).map(at);
    let s = d.s();
    // The running state starts at h0.
    e.for_dynamic(r0, r1, |e, r| {
        let from = e.imul_imm(r, s as i64);
        let to = e.imul_imm(r, d.h as i64);
        super::kernels::copy(e, at(h0), from, h, to, d.h);
        if d.cell == Cell::Lstm {
            let from = e.iadd_imm(from, d.h as i64);
            super::kernels::copy(e, at(h0), from, c, to, d.h);
        }
    });
    let ep: Vec<EpOp> = b_hh.map(|b| EpOp::Bias(at(b))).into_iter().collect();
    let mm = Mm {
        m: d.b,
        n: d.gh(),
        k: d.h,
        a: h,
        ta: false,
        packed,
        c: gh,
        tc: false,
        epilogue: &ep,
        stable: false,
    };
    if lp.fused_gates() {
        e.for_range(0, d.t as i64, 1, |e, t| lp.fused_step(e, t));
        return;
    }
    e.for_range(0, d.t as i64, 1, |e, t| {
        project(e, &mm);
        e.for_dynamic(r0, r1, |e, r| {
            let Rows { xrow, srow: orow, vrow, grow, hrow } = rows(e, d, r, t);
            // `keep(j, k, v)` saves v for the backward (when it reads the saves) in slot k.
            let keep = |e: &mut Emit, j: Value, k: usize, v: Value| {
                if let Some(saved) = saved {
                    let i = gate_index(e, d, vrow, j, k);
                    e.store(saved, i, v);
                }
            };
            // Gate k's projections at element j: x·W_ihᵀ + b_ih and h·W_hhᵀ + b_hh, and its
            // `keep`.
            let gate = |e: &mut Emit, ty: Type, j: Value, k: usize| {
                let i = gate_index(e, d, xrow, j, k);
                let x = e.load(ty, at(xp), i);
                let gi = gate_index(e, d, grow, j, k);
                let y = e.load(ty, gh, gi);
                (x, y, gi, move |e: &mut Emit, v: Value| keep(e, j, k, v))
            };
            // The first pass: the gates that need only their own projections, each
            // written over its projection in `gh` and saved.
            independent_gates(e, d, |e, ty, j, k| {
                let (x, y, gi, keep) = gate(e, ty, j, k);
                let a = gate_activation(e, ty, d.cell, k, x, y);
                e.store(gh, gi, a);
                keep(e, a);
            });
            e.elementwise(d.h, |e, ty, j| {
                let hi_ = e.iadd(hrow, j);
                let oi = e.iadd(orow, j);
                let a = activations(
                    e,
                    ty,
                    d.cell,
                    |e, k| {
                        // A GRU's n: its hidden projection is saved (an RNN saves its tanh).
                        let (x, y, _, keep) = gate(e, ty, j, k);
                        if d.cell == Cell::Gru {
                            keep(e, y);
                        }
                        (x, y)
                    },
                    |e, k| {
                        let gi = gate_index(e, d, grow, j, k);
                        e.load(ty, gh, gi)
                    },
                );
                match d.cell {
                    Cell::Rnn => {
                        keep(e, j, 0, a[0]);
                        e.store(h, hi_, a[0]);
                        e.store(out, oi, a[0]);
                    }
                    Cell::Gru => {
                        let (z, n) = (a[1], a[2]);
                        keep(e, j, Cell::GRU_N_SLOT, n);
                        let hp = e.load(ty, h, hi_);
                        // h = (1-z)·n + z·h_prev = n + z·(h_prev - n).
                        let diff = e.b.ins().fsub(hp, n);
                        let hn = e.b.ins().fma(z, diff, n);
                        e.store(h, hi_, hn);
                        e.store(out, oi, hn);
                    }
                    Cell::Lstm => {
                        let cp = e.load(ty, c, hi_);
                        let (cn, tc) = lstm_cell(e, ty, &a, cp);
                        keep(e, j, Cell::LSTM_TANH_C_SLOT, tc);
                        let hn = e.b.ins().fmul(a[3], tc);
                        e.store(h, hi_, hn);
                        e.store(c, hi_, cn);
                        e.store(out, oi, hn);
                        let oc = e.iadd_imm(oi, d.h as i64);
                        e.store(out, oc, cn);
                    }
                }
            });
        });
    });
}

/// Backpropagation through time, last step first: the gates' gradients per step, the state's
/// gradient through `W_hh` (the projection), and the initial state's gradient at the end.
fn backward_loop(e: &mut Emit, lp: &Loop, (gh, hprev, dhs): (NodeId, NodeId, NodeId)) {
    let (d, out) = (lp.d, lp.out);
    let at = |x: NodeId| lp.at(x);
    let project = |e: &mut Emit, mm: &Mm| lp.project(e, mm);
    let [packed, s1, s2, s3, s4] = lp.slots;
    let (r0, r1) = lp.rows;
    let (dh, dc, direct, dgh) = (s1, s2, s3, s4);
    let lay = recurrent_grad_layout(d.cell, d.b, d.t, d.h);
    let s = d.s();
    e.for_dynamic(r0, r1, |e, r| {
        let row = e.imul_imm(r, d.h as i64);
        e.elementwise(d.h, |e, ty, j| {
            let i = e.iadd(row, j);
            let z = e.fconst(ty, 0.0);
            e.store(dh, i, z);
            e.store(dc, i, z);
            e.store(direct, i, z);
        });
    });
    let ep = [EpOp::Binary(BinaryFn::Add, direct, true)];
    let ep: &[EpOp] = if d.cell == Cell::Gru { &ep } else { &[] };
    let mm = Mm {
        m: d.b,
        n: d.h,
        k: d.gh(),
        a: dgh,
        ta: false,
        packed,
        c: dh,
        tc: false,
        epilogue: ep,
        stable: false,
    };
    e.for_range(0, d.t as i64, 1, |e, back| {
        let last = e.i64(d.t as i64 - 1);
        let t = e.b.ins().isub(last, back);
        if lp.fused_gates() {
            lp.fused_step(e, t);
            return;
        }
        e.for_dynamic(r0, r1, |e, r| {
            let Rows { xrow, srow, vrow, grow, hrow } = rows(e, d, r, t);
            e.elementwise(d.h, |e, ty, j| {
                let idx = |e: &mut Emit, row: Value, k: usize| gate_index(e, d, row, j, k);
                let xi: Vec<Value> = (0..d.g).map(|k| idx(e, xrow, k)).collect();
                let vi: Vec<Value> = (0..d.cell.saves()).map(|k| idx(e, vrow, k)).collect();
                let gi: Vec<Value> = (0..d.g).map(|k| idx(e, grow, k)).collect();
                let hi_ = idx(e, hrow, 0);
                let si = idx(e, srow, 0);
                let dsh = {
                    let a = e.load(ty, at(dhs), si);
                    let b = e.load(ty, dh, hi_);
                    e.b.ins().fadd(a, b)
                };
                let one = e.fconst(ty, 1.0);
                // Stores dgi (into the output) and dgh (into the output and the
                // step's contiguous `dgh` scratch, the matmul's left operand).
                let put = |e: &mut Emit, k: usize, dgi: Value, dghv: Value| {
                    let o = e.iadd_imm(xi[k], lay.dxp as i64);
                    e.store(out, o, dgi);
                    let o = e.iadd_imm(xi[k], lay.dgh as i64);
                    e.store(out, o, dghv);
                    e.store(dgh, gi[k], dghv);
                };
                // The activations the forward saved (`Cell::saves`), as `activations` gives
                // them: rnn [h]; gru [r, z, n, gh_n]; lstm [i, f, g, o].
                let saved = |e: &mut Emit, k: usize| e.load(ty, at(gh), vi[k]);
                let a: Vec<Value> = match d.cell {
                    Cell::Rnn => vec![saved(e, 0)],
                    Cell::Gru => [0, 1, Cell::GRU_N_SLOT, 2].map(|k| saved(e, k)).to_vec(),
                    Cell::Lstm => (0..4).map(|k| saved(e, k)).collect(),
                };
                match d.cell {
                    Cell::Rnn => {
                        let d1 = one_minus_sq(e, ty, a[0]);
                        let da = e.b.ins().fmul(dsh, d1);
                        put(e, 0, da, da);
                    }
                    Cell::Gru => {
                        let (rr, z, n, yn) = (a[0], a[1], a[2], a[3]);
                        let hp = e.load(ty, at(hprev), si);
                        // dn = ds·(1-z)·(1-n²); dz = ds·(h_prev-n)·z(1-z);
                        // dr = dn·gh_n·r(1-r); direct = ds·z.
                        let omz = e.b.ins().fsub(one, z);
                        let dn = e.b.ins().fmul(dsh, omz);
                        let t1 = one_minus_sq(e, ty, n);
                        let dn = e.b.ins().fmul(dn, t1);
                        let diff = e.b.ins().fsub(hp, n);
                        let dz = e.b.ins().fmul(dsh, diff);
                        let zz = e.b.ins().fmul(z, omz);
                        let dz = e.b.ins().fmul(dz, zz);
                        let omr = e.b.ins().fsub(one, rr);
                        let rr1 = e.b.ins().fmul(rr, omr);
                        let dr = e.b.ins().fmul(dn, yn);
                        let dr = e.b.ins().fmul(dr, rr1);
                        put(e, 0, dr, dr);
                        put(e, 1, dz, dz);
                        let dnr = e.b.ins().fmul(dn, rr);
                        put(e, 2, dn, dnr);
                        let dir = e.b.ins().fmul(dsh, z);
                        e.store(direct, hi_, dir);
                    }
                    Cell::Lstm => {
                        let (i, f, gg, o) = (a[0], a[1], a[2], a[3]);
                        let ci = e.iadd_imm(si, d.h as i64);
                        let cp = e.load(ty, at(hprev), ci);
                        let tc = saved(e, Cell::LSTM_TANH_C_SLOT);
                        // dc = ds_c + ds_h·o·(1-tanh²c).
                        let dsc = {
                            let a = e.load(ty, at(dhs), ci);
                            let b = e.load(ty, dc, hi_);
                            e.b.ins().fadd(a, b)
                        };
                        let t1 = one_minus_sq(e, ty, tc);
                        let t2 = e.b.ins().fmul(dsh, o);
                        let dcv = e.b.ins().fma(t2, t1, dsc);
                        let sig_d = |e: &mut Emit, v: Value| {
                            let om = e.b.ins().fsub(one, v);
                            e.b.ins().fmul(v, om)
                        };
                        let di = e.b.ins().fmul(dcv, gg);
                        let si_ = sig_d(e, i);
                        let di = e.b.ins().fmul(di, si_);
                        let df = e.b.ins().fmul(dcv, cp);
                        let sf = sig_d(e, f);
                        let df = e.b.ins().fmul(df, sf);
                        let dg = e.b.ins().fmul(dcv, i);
                        let tg = one_minus_sq(e, ty, gg);
                        let dg = e.b.ins().fmul(dg, tg);
                        let dov = e.b.ins().fmul(dsh, tc);
                        let so = sig_d(e, o);
                        let dov = e.b.ins().fmul(dov, so);
                        for (k, v) in [di, df, dg, dov].into_iter().enumerate() {
                            put(e, k, v, v);
                        }
                        let dcp = e.b.ins().fmul(dcv, f);
                        e.store(dc, hi_, dcp);
                    }
                }
            });
        });
        // dh (carried to the step before) = dgh·W_hh (+ the GRU's direct part).
        project(e, &mm);
    });
    // The initial state's gradient.
    e.for_dynamic(r0, r1, |e, r| {
        let from = e.imul_imm(r, d.h as i64);
        let to = e.imul_imm(r, s as i64);
        let to = e.iadd_imm(to, lay.dh0 as i64);
        super::kernels::copy(e, dh, from, out, to, d.h);
        if d.cell == Cell::Lstm {
            let to = e.iadd_imm(to, d.h as i64);
            super::kernels::copy(e, dc, from, out, to, d.h);
        }
    });
}

/// Element `j` of gate `k` in the row of gates that starts at `row` (gates `H` apart).
fn gate_index(e: &mut Emit, d: Dims, row: Value, j: Value, k: usize) -> Value {
    let i = e.iadd(row, j);
    e.iadd_imm(i, (k * d.h) as i64)
}

/// The forward's first pass over a row: `body(e, ty, j, k)` for each independent gate k
/// (`Cell::independent_gates`) of element j. The second pass (a GRU's n = tanh(x_n + r·gh_n),
/// the cell update) then starts from finished values: two short dependency chains instead of
/// one long one, which the CPU overlaps across vectors.
fn independent_gates(e: &mut Emit, d: Dims, mut body: impl FnMut(&mut Emit, Type, Value, usize)) {
    let n = d.cell.independent_gates();
    if n > 0 {
        e.elementwise(d.h, |e, ty, j| (0..n).for_each(|k| body(e, ty, j, k)));
    }
}

/// Independent gate k's activation from its projections: tanh for an LSTM's g, else sigmoid.
fn gate_activation(e: &mut Emit, ty: Type, cell: Cell, k: usize, x: Value, y: Value) -> Value {
    let a = e.b.ins().fadd(x, y);
    if cell == Cell::Lstm && k == 2 { e.tanh(ty, a) } else { e.sigmoid(ty, a) }
}

/// The cell's activations: rnn `[h]`; gru `[r, z, n, gh_n]` (n = tanh(x_n + r·gh_n)); lstm
/// `[i, f, g, o]`. The first-pass gates come from `done(k)`, the others from their
/// projections `pre(k) = (x·W_ihᵀ+b_ih, h·W_hhᵀ+b_hh)`.
fn activations(
    e: &mut Emit,
    ty: Type,
    cell: Cell,
    mut pre: impl FnMut(&mut Emit, usize) -> (Value, Value),
    mut done: impl FnMut(&mut Emit, usize) -> Value,
) -> Vec<Value> {
    match cell {
        Cell::Rnn => {
            let (x, y) = pre(e, 0);
            let a = e.b.ins().fadd(x, y);
            vec![e.tanh(ty, a)]
        }
        Cell::Gru => {
            let r = done(e, 0);
            let z = done(e, 1);
            let (xn, yn) = pre(e, 2);
            let an = e.b.ins().fma(r, yn, xn);
            let n = e.tanh(ty, an);
            vec![r, z, n, yn]
        }
        Cell::Lstm => (0..4).map(|k| done(e, k)).collect(),
    }
}

/// An LSTM's new cell state `c = f·c_prev + i·g` and `tanh c`, from activations `[i, f, g, o]`.
fn lstm_cell(e: &mut Emit, ty: Type, a: &[Value], cp: Value) -> (Value, Value) {
    let ig = e.b.ins().fmul(a[0], a[2]);
    let c = e.b.ins().fma(a[1], cp, ig);
    (c, e.tanh(ty, c))
}

/// `1 - v²` (the derivative of tanh from its output).
fn one_minus_sq(e: &mut Emit, ty: Type, v: Value) -> Value {
    let one = e.fconst(ty, 1.0);
    let sq = e.b.ins().fmul(v, v);
    e.b.ins().fsub(one, sq)
}
