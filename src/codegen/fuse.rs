//! Fusion: which nodes one kernel computes together.
//!
//! - A matmul takes the elementwise ops that follow it into its store (its *epilogue*): a bias,
//!   an activation, an activation's derivative, a scale or a binary op with another value. Each
//!   must be the single user of the value before it, so the intermediate values are never
//!   written; the other operands (bias, the activation's output, …) must exist before the
//!   matmul runs. Forward: `x·Wᵀ + b → relu` is one pass; backward: `dY·W → relu'(y)` is one.
//! - Every optimizer update is one kernel, its work the concatenated chunks of all parameters.
//!
//! A group runs at the position of its first node; the memory plan gives the group's result
//! its buffer there (see `plan`).

use crate::ir::{Graph, NodeId, Op};

#[derive(Clone, Debug, PartialEq)]
pub enum Group {
    Single(NodeId),
    /// A matmul and the chain of elementwise ops fused into its store, in order.
    MatMul {
        mm: NodeId,
        chain: Vec<NodeId>,
    },
    /// All optimizer updates.
    Updates(Vec<NodeId>),
}

impl Group {
    pub fn head(&self) -> NodeId {
        match self {
            Group::Single(n) | Group::MatMul { mm: n, .. } => *n,
            Group::Updates(v) => v[0],
        }
    }

    /// The node whose value the group stores (the last of a fused chain).
    pub fn result(&self) -> NodeId {
        match self {
            Group::MatMul { mm, chain } => *chain.last().unwrap_or(mm),
            _ => self.head(),
        }
    }

    pub fn nodes(&self) -> Vec<NodeId> {
        match self {
            Group::Single(n) => vec![*n],
            Group::MatMul { mm, chain } => std::iter::once(*mm).chain(chain.iter().copied()).collect(),
            Group::Updates(v) => v.clone(),
        }
    }
}

/// The groups of a graph, in execution order. Inputs, parameters, reshapes, parts and saved
/// hidden projections need no kernel and belong to none.
pub fn groups(g: &Graph) -> Vec<Group> {
    let n = g.len();
    let mut uses = vec![0usize; n];
    let mut user: Vec<Option<NodeId>> = vec![None; n];
    for id in g.ids() {
        for o in g.node(id).op.operands() {
            uses[o.index()] += 1;
            user[o.index()] = Some(id);
        }
    }
    for (_, id) in &g.outputs {
        uses[id.index()] += 1;
    }
    let mut taken = vec![false; n];
    let mut out = Vec::new();
    let mut updates = Vec::new();
    for id in g.ids() {
        if taken[id.index()] {
            continue;
        }
        match g.node(id).op {
            // A recurrent loop writes its hidden projections as it runs.
            Op::Input(_) | Op::Param(_) | Op::Reshape { .. } | Op::Part { .. } | Op::HiddenProj { .. } => {}
            Op::Update { .. } => updates.push(id),
            Op::MatMul { .. } => {
                let shape = &g.ty(id).shape;
                let mut chain = Vec::new();
                let mut cur = id;
                while uses[cur.index()] == 1 {
                    let Some(u) = user[cur.index()] else { break };
                    if g.ty(u).shape != *shape || !fits_epilogue(g, u, cur, id) {
                        break;
                    }
                    chain.push(u);
                    taken[u.index()] = true;
                    cur = u;
                }
                out.push(Group::MatMul { mm: id, chain });
            }
            _ => out.push(Group::Single(id)),
        }
    }
    if !updates.is_empty() {
        out.push(Group::Updates(updates));
    }
    out
}

/// Whether `u` can be computed in the store of matmul `mm` from `cur` (its chain operand):
/// an elementwise op whose other operands exist before `mm` runs.
fn fits_epilogue(g: &Graph, u: NodeId, cur: NodeId, mm: NodeId) -> bool {
    let before = |o: NodeId| o < mm;
    match g.node(u).op {
        Op::BiasAdd { x, bias } => x == cur && before(bias) && g.ty(u).shape.len() == 2,
        Op::Unary { x, .. } | Op::Scale { x, .. } => x == cur,
        Op::ActGrad { y, dy, .. } => dy == cur && y != cur && before(y),
        Op::Binary { a, b, .. } => (a == cur && b != cur && before(b)) || (b == cur && a != cur && before(a)),
        _ => false,
    }
}
