//! One-hot products as gathers: a teacher-forced decoder reads each previous token as a
//! one-hot vector over the target vocabulary (`one_hot(ids, D)`, PyTorch's `F.one_hot`) and
//! multiplies it by its input weights `w [N, D]` — a matmul of `R × D × N` multiply-adds, nearly
//! all by zero, and its weight gradient `dyᵀ · one_hot` another. Both are rewritten: the product
//! picks column `ids[r]` of `w` for each row (`Op::GatherColumns`), the gradient adds each row
//! of `dy` into its id's column (`Op::ScatterColumns`), and the one-hot itself, read by nothing
//! else, is dropped. The sums are the dense ones' without the products by zero (exact: every
//! product is a single term). The interpreter runs the graph as written (the reference); the
//! native code runs it rewritten.

use crate::ir::{Graph, NodeId, Op};

/// The graph with one-hot products rewritten (and the one-hots no longer read removed).
pub fn rewrite(g: &Graph) -> Result<Graph, String> {
    // The one-hot behind a node, through reshapes: its ids and depth.
    let one_hot = |mut at: NodeId| loop {
        match g.node(at).op {
            Op::Reshape { x, .. } => at = x,
            Op::OneHot { ids, depth } => break Some((ids, depth)),
            _ => break None,
        }
    };
    let mut out = g.empty_like();
    let mut map: Vec<NodeId> = Vec::with_capacity(g.len());
    let mut changed = false;
    for id in g.ids() {
        let span = g.span(id);
        let rows = |n: NodeId| g.ty(n).shape.len() == 2;
        let new = match g.node(id).op {
            // rows(one_hot) · wᵀ
            Op::MatMul { a, b: w, ta: false, tb: true } if rows(a) => match one_hot(a) {
                Some((ids, _)) => {
                    changed = true;
                    out.add(Op::GatherColumns { w: map[w.index()], ids: map[ids.index()] }, span)?
                }
                None => copy(g, id, &mut out, &map)?,
            },
            // dyᵀ · rows(one_hot)
            Op::MatMul { a: dy, b, ta: true, tb: false } if rows(b) => match one_hot(b) {
                Some((ids, depth)) => {
                    changed = true;
                    out.add(Op::ScatterColumns { dy: map[dy.index()], ids: map[ids.index()], depth }, span)?
                }
                None => copy(g, id, &mut out, &map)?,
            },
            _ => copy(g, id, &mut out, &map)?,
        };
        map.push(new);
    }
    for (name, id) in &g.outputs {
        out.outputs.push((name.clone(), map[id.index()]));
    }
    if !changed {
        return Ok(out);
    }
    super::dce::drop_unread(&out)
}

fn copy(g: &Graph, id: NodeId, out: &mut Graph, map: &[NodeId]) -> Result<NodeId, String> {
    let mut op = g.node(id).op.clone();
    op.map_operands(|o| map[o.index()]);
    out.add(op, g.span(id))
}
