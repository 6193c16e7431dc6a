//! Index bounds: the proof, before any code is generated, that every i32 index stays inside
//! what it indexes.
//!
//! Native kernels address tables, planes and rows with i32 values (token ids, max-pool switches)
//! and do not re-check them. [`check`] follows every index operand back to where its values come
//! from and proves it in range:
//!
//! - a max pool's switches (`PoolArgmax`) are below `H·W` of the plane it pooled — a static fact,
//!   which must not exceed the size of the plane an op indexes by them;
//! - a graph input is bounded by a run-time check: [`Facts::input_bound`] is the smallest size
//!   any op indexes by it, and the executor refuses an input holding an id outside it before any
//!   kernel runs;
//! - a quantizer's ids (`nearest`) are below its codebook's size, a static fact too;
//! - `reshape` keeps values, and `shift_right` adds its start id, which must be in range too.
//!
//! Any other source of an index is refused: a graph whose bounds cannot be proved gets no code.
//! [`Facts`] can only be made here, so a back end that takes it has had the graph checked.

use super::{DType, Graph, NodeId, Op, verify};

/// What [`check`] proved about a graph; the executor's run-time checks rest on it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Facts {
    /// Per graph input, ids must lie in `0..bound` (`usize::MAX`: nothing indexes by it).
    input_bounds: Vec<usize>,
}

impl Facts {
    /// The ids input `i` may hold: `0..bound`.
    pub fn input_bound(&self, i: usize) -> usize {
        self.input_bounds.get(i).copied().unwrap_or(usize::MAX)
    }
}

/// Where the values of an index come from.
enum Source {
    Input(usize),
    /// Below this, by construction.
    Static(usize),
}

/// Verifies `g` and proves every index in range; every violation is listed.
pub fn check(g: &Graph) -> Result<Facts, Vec<String>> {
    verify(g)?;
    let mut bounds = vec![usize::MAX; g.inputs.len()];
    let mut errors = Vec::new();
    for id in g.ids() {
        for (idx, size) in indexed(g, id) {
            let mut at = idx;
            let source = loop {
                match &g.node(at).op {
                    Op::Input(i) => break Some(Source::Input(i.index())),
                    Op::PoolArgmax { x, .. } => {
                        let s = &g.ty(*x).shape;
                        break Some(Source::Static(s[2] * s[3]));
                    }
                    Op::Reshape { x, .. } => at = *x,
                    // The nearest codebook row: below the codebook's size.
                    Op::Nearest { codebook, .. } => break Some(Source::Static(g.ty(*codebook).shape[0])),
                    Op::ShiftRight { ids, start } => {
                        if usize::try_from(*start).map_or(true, |s| s >= size) {
                            errors.push(format!(
                                "%{}: {} indexes 0..{size} by %{}, whose start id {start} is outside it",
                                id.0,
                                g.node(id).op.mnemonic(),
                                at.0
                            ));
                        }
                        at = *ids;
                    }
                    _ => break None,
                }
            };
            match source {
                Some(Source::Input(i)) => bounds[i] = bounds[i].min(size),
                Some(Source::Static(n)) if n <= size => {}
                Some(Source::Static(n)) => errors.push(format!(
                    "%{}: {} indexes 0..{size} by %{}, whose values reach {}",
                    id.0,
                    g.node(id).op.mnemonic(),
                    idx.0,
                    n - 1
                )),
                None => errors.push(format!(
                    "%{}: {} indexes by %{}, whose range cannot be proved (it is computed by {})",
                    id.0,
                    g.node(id).op.mnemonic(),
                    idx.0,
                    g.node(at).op.mnemonic()
                )),
            }
        }
    }
    if errors.is_empty() { Ok(Facts { input_bounds: bounds }) } else { Err(errors) }
}

/// The index operands of node `id`, each with the size it indexes (`0..size`).
fn indexed(g: &Graph, id: NodeId) -> Vec<(NodeId, usize)> {
    let plane = |x: NodeId| {
        let s = &g.ty(x).shape;
        s[2] * s[3]
    };
    match g.node(id).op {
        Op::Embed { table, ids } => vec![(ids, g.ty(table).shape[0])],
        Op::EmbedGrad { ids, vocab, .. } => vec![(ids, vocab)],
        Op::GatherColumns { w, ids } => vec![(ids, g.ty(w).shape[1])],
        // Read as values (0 or not), never as an index.
        Op::MaskFill { .. } | Op::LastReal { .. } | Op::LastRealGrad { .. } => vec![],
        Op::ScatterColumns { ids, depth, .. } => vec![(ids, depth)],
        Op::OneHot { ids, depth } => vec![(ids, depth)],
        Op::Loss { pred, target, .. } | Op::LossGrad { pred, target, .. }
            if g.ty(target).dtype == DType::I32 =>
        {
            vec![(target, g.ty(pred).shape.last().copied().unwrap_or(0))]
        }
        Op::Gather { x, idx } => vec![(idx, plane(x))],
        Op::Scatter { idx, height, width, .. }
        | Op::SparseConvT { idx, height, width, .. }
        | Op::SparseWeightGrad { idx, height, width, .. } => vec![(idx, height * width)],
        // The switches lie in the plane of the convolution's output: `x` padded, less the
        // kernel.
        Op::GatherConv { x, w, idx, pad, .. } => {
            let (s, k) = (&g.ty(x).shape, g.ty(w).shape[2]);
            let side = |n: usize| (n + 2 * pad + 1).saturating_sub(k);
            vec![(idx, side(s[2]) * side(s[3]))]
        }
        _ => Vec::new(),
    }
}
