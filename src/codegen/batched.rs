//! `batch_matmul` (attention's scores and context): one product per batch element. Large
//! enough products run on the wide core, one work unit per batch element, so threads take
//! whole products; smaller ones (or `AEC_MATMUL=cranelift`) run the loop kernel of
//! `kernels::emit`, which is the reference the wide path is tested against.

use super::emit::Emit;
use super::family::{Family, Parts};
use super::plan::Plan;
use super::wide::{self, Call};
use crate::ir::{Graph, NodeId, Op};
use cranelift_codegen::ir::{InstBuilder, Value};

pub const FAMILY: Family = Family {
    parts: |g, id| {
        matches!(g.node(id).op, Op::BatchMatMul { .. }).then_some(Parts { names: &["batch"], main: 0 })
    },
    scratch_bytes: |_, _, _| 0,
    wide_call,
    units,
    emit,
    describe: |_, id, _, _| format!("%{} batch_matmul", id.0),
};

/// The batch and each product's sizes `(m, n, k)`.
fn dims(g: &Graph, id: NodeId) -> Option<(usize, (usize, usize, usize))> {
    let Op::BatchMatMul { a, ta, .. } = g.node(id).op else { return None };
    let [b, m, n] = <[usize; 3]>::try_from(g.ty(id).shape.as_slice()).ok()?;
    let s = &g.ty(a).shape;
    let k = if ta { s[1] } else { s[2] };
    Some((b, (m, n, k)))
}

/// Depth up to which a product runs on aec's register tiles rather than the gemm crate (where
/// the tiles may): one of the crate's depth blocks, so the bits are its; an attention's
/// products are small, and the crate's planning and packing at every call was most of their
/// time.
const TILES_MAX_K: usize = 256;

fn wide_call(g: &Graph, plan: &Plan, id: NodeId, _scratch: usize, extras: wide::Extras) -> Option<Call> {
    let Op::BatchMatMul { a, b, ta, tb } = g.node(id).op else { return None };
    let (batch, (m, n, k)) = dims(g, id)?;
    let at = |x: NodeId| plan.node[x.index()];
    let call = Call::batched(batch, (m, n, k), (at(a), ta), (at(b), tb), at(id));
    let tiles = (extras.tiles && k <= TILES_MAX_K).then_some(wide::TileB::AsStored);
    wide::worth(m, n, k).then_some(Call { tiles, ..call })
}

/// One unit per product on the wide core; the loop kernel runs whole.
fn units(g: &Graph, id: NodeId, _part: usize, call: Option<&Call>) -> (usize, usize) {
    let work = dims(g, id).map_or(0, |(b, (m, n, k))| b * m * n * k);
    (call.map_or(1, Call::unit_count), work)
}

#[allow(clippy::too_many_arguments)]
fn emit(
    e: &mut Emit,
    g: &Graph,
    plan: &Plan,
    id: NodeId,
    _part: usize,
    _scratch: usize,
    (lo, hi): (Value, Value),
    core: Option<wide::Core>,
) -> Result<(), String> {
    let Some((f, call, addr)) = core else { return super::kernels::emit(e, g, plan, id, (lo, hi)) };
    let count = e.i64(call.unit_count() as i64);
    let end = e.b.ins().smin(hi, count);
    e.for_dynamic(lo, end, |e, u| {
        let a = e.i64(addr);
        e.b.ins().call(f, &[e.base, a, u]);
    });
    Ok(())
}
