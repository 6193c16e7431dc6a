//! `clip norm`'s reduction: the sum of squares of every clipped gradient, chunk by chunk.
//!
//! The kernel's work units are the chunks of the clipped gradients one after another (as the
//! update kernel's); each writes its chunk's sum of squares, accumulated in four f32 lanes and a tail, to
//! its own slot of `Plan::norm_partials`. The runtime adds the partial sums in f64, takes the
//! root, and hands the update kernels the scale min(1, c / (‖g‖ + 1e-6)) as a scalar, so the
//! gradients are read once for the norm and once by the updates that scale them.

use super::emit::Emit;
use super::kernels::CHUNK;
use super::plan::Plan;
use crate::ir::{Clip, Graph, NodeId, Op};
use cranelift_codegen::ir::{InstBuilder, Value};

/// The clipped updates' gradients, in order: (node, elements).
fn clipped(g: &Graph) -> impl Iterator<Item = (NodeId, usize)> + '_ {
    g.ids().filter_map(|id| match g.node(id).op {
        Op::Update { clip: Clip::Norm(_), grad, .. } => Some((grad, g.ty(grad).numel())),
        _ => None,
    })
}

/// Chunks (work units, partial sums) of the clipped gradients.
pub fn chunks(g: &Graph) -> usize {
    clipped(g).map(|(_, n)| n.div_ceil(CHUNK)).sum()
}

/// The kernel over chunks `lo..hi`.
pub fn emit(e: &mut Emit, g: &Graph, plan: &Plan, (lo, hi): (Value, Value)) -> Result<(), String> {
    let (out, _) = plan.norm_partials.ok_or("clip norm without partial sums")?;
    let mut first = 0usize;
    for (grad, n) in clipped(g).collect::<Vec<_>>() {
        let src = plan.node[grad.index()];
        let count = n.div_ceil(CHUNK);
        let zero = e.i64(0);
        let top = e.i64(count as i64);
        let l = e.iadd_imm(lo, -(first as i64));
        let l = e.b.ins().smax(l, zero);
        let h = e.iadd_imm(hi, -(first as i64));
        let h = e.b.ins().smin(h, top);
        let full = n / CHUNK;
        let at = first;
        let mut whole = |e: &mut Emit, c: Value| {
            let start = e.imul_imm(c, CHUNK as i64);
            let s = sum_squares(e, src, start, CHUNK);
            let slot = e.iadd_imm(c, at as i64);
            e.store(out, slot, s);
        };
        let mut tail = |e: &mut Emit| {
            let start = e.i64((full * CHUNK) as i64);
            let s = sum_squares(e, src, start, n - full * CHUNK);
            let slot = e.i64((at + full) as i64);
            e.store(out, slot, s);
        };
        e.units((l, h), full, !n.is_multiple_of(CHUNK), &mut whole, &mut tail);
        first += count;
    }
    Ok(())
}

/// Σ x² over `n` elements of `src` from `start`.
fn sum_squares(e: &mut Emit, src: usize, start: Value, n: usize) -> Value {
    super::kernels::sum(e, n, |e, ty, j| {
        let i = e.iadd(start, j);
        let x = e.load(ty, src, i);
        e.b.ins().fmul(x, x)
    })
}
