//! Fusion: which nodes one kernel computes together.
//!
//! - A matmul takes the elementwise ops that follow it into its store (its *epilogue*): a bias,
//!   an activation, an activation's derivative, a scale or a binary op with another value. Each
//!   must be the single user of the value before it, so the intermediate values are never
//!   written; the other operands (bias, the activation's output, …) must exist before the
//!   matmul runs. Forward: `x·Wᵀ + b → relu` is one pass; backward: `dY·W → relu'(y)` is one.
//! - Any other elementwise op (and a bias add, a batch normalization) takes the elementwise ops
//!   after it the same way (`batch_norm → relu` is one pass):
//!   one loop computes the whole chain per element and stores only the last value
//!   (`relu' ∘ (dy · mask)`, `bias → relu`, a loss gradient's scale, …).
//! - A loss and its gradient (from the backward pass's constant seed) are one pass over the
//!   predictions: the gradient is written where the loss runs, with the elementwise ops that
//!   follow it (an output activation's derivative: `sigmoid' ∘ mse'`) applied as it stores.
//! - Every optimizer update is one kernel, its work the concatenated chunks of all parameters;
//!   with `clip norm`, a kernel before it sums the squares of the clipped gradients.
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
    /// An elementwise op (or bias add) and the elementwise ops computed with it, in order.
    Chain(Vec<NodeId>),
    /// A loss and its gradient, computed together, and the chain of elementwise ops fused
    /// into the gradient's store.
    LossPair {
        loss: NodeId,
        grad: NodeId,
        chain: Vec<NodeId>,
    },
    /// The sum of squares of the gradients of these updates (`clip norm`), run after the
    /// gradients are complete (and summed over the processes) and before the updates.
    GradNorm(Vec<NodeId>),
    /// All optimizer updates.
    Updates(Vec<NodeId>),
}

impl Group {
    pub fn head(&self) -> NodeId {
        match self {
            Group::Single(n) | Group::MatMul { mm: n, .. } | Group::LossPair { loss: n, .. } => *n,
            Group::Chain(v) | Group::Updates(v) | Group::GradNorm(v) => v[0],
        }
    }

    /// The node whose value the group stores (the last of a fused chain).
    pub fn result(&self) -> NodeId {
        match self {
            Group::MatMul { mm, chain } => *chain.last().unwrap_or(mm),
            Group::Chain(v) => *v.last().unwrap_or(&v[0]),
            Group::LossPair { grad, chain, .. } => *chain.last().unwrap_or(grad),
            _ => self.head(),
        }
    }

    pub fn nodes(&self) -> Vec<NodeId> {
        match self {
            Group::Single(n) => vec![*n],
            Group::MatMul { mm, chain } => std::iter::once(*mm).chain(chain.iter().copied()).collect(),
            Group::Chain(v) | Group::Updates(v) | Group::GradNorm(v) => v.clone(),
            Group::LossPair { loss, grad, chain } => {
                [*loss, *grad].into_iter().chain(chain.iter().copied()).collect()
            }
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
            Op::Input(_)
            | Op::Param(_)
            | Op::Reshape { .. }
            | Op::StopGrad { .. }
            | Op::Part { .. }
            | Op::GateSaves { .. } => {}
            Op::Update { .. } => updates.push(id),
            Op::MatMul { .. } => {
                let chain = follow(g, (id, id), &uses, &user, &mut taken, true);
                out.push(Group::MatMul { mm: id, chain });
            }
            Op::Unary { .. }
            | Op::ActGrad { .. }
            | Op::Binary { .. }
            | Op::Scale { .. }
            | Op::BiasAdd { .. }
            | Op::BatchNorm { .. }
            | Op::ChannelAffine { axis: 1, .. } => {
                let chain = follow(g, (id, id), &uses, &user, &mut taken, false);
                if chain.is_empty() {
                    out.push(Group::Single(id));
                } else {
                    out.push(Group::Chain(std::iter::once(id).chain(chain).collect()));
                }
            }
            Op::Loss { .. } => match loss_grad_of(g, id) {
                Some(grad) => {
                    taken[grad.index()] = true;
                    // Cross-entropy's gradient is stored row by row, not elementwise: no chain.
                    let chain = match g.node(id).op {
                        Op::Loss { f: crate::ir::LossFn::CrossEntropyLogits { .. }, .. } => Vec::new(),
                        _ => follow(g, (grad, id), &uses, &user, &mut taken, false),
                    };
                    out.push(Group::LossPair { loss: id, grad, chain });
                }
                None => out.push(Group::Single(id)),
            },
            _ => out.push(Group::Single(id)),
        }
    }
    let clipped: Vec<NodeId> = updates
        .iter()
        .copied()
        .filter(|&u| matches!(g.node(u).op, Op::Update { clip: crate::ir::Clip::Norm(_), .. }))
        .collect();
    if !clipped.is_empty() {
        out.push(Group::GradNorm(clipped));
    }
    if !updates.is_empty() {
        out.push(Group::Updates(updates));
    }
    out
}

/// The gradient of loss node `loss` that can be computed with it: same loss, prediction and
/// target, and an incoming gradient that is a constant (the backward pass's seed), so it is
/// known when the loss runs. Not for binary cross-entropy, whose loss is a scalar loop.
fn loss_grad_of(g: &Graph, loss: NodeId) -> Option<NodeId> {
    let Op::Loss { f, pred, target } = g.node(loss).op else { return None };
    if f == crate::ir::LossFn::Bce {
        return None;
    }
    g.ids().find(|&id| match g.node(id).op {
        Op::LossGrad { f: f2, pred: p2, target: t2, dy } => {
            (f2, p2, t2) == (f, pred, target)
                && matches!(g.node(dy).op, Op::Fill { .. })
                && g.ty(dy).numel() == 1
        }
        _ => false,
    })
}

/// The elementwise ops that can follow `start` in the kernel that runs at node `at` (`start`
/// itself, or the loss whose gradient `start` is): each the single user of the value before
/// it, of the same shape, and marked `taken`. A bias add only follows a matmul.
fn follow(
    g: &Graph,
    (start, at): (NodeId, NodeId),
    uses: &[usize],
    user: &[Option<NodeId>],
    taken: &mut [bool],
    bias: bool,
) -> Vec<NodeId> {
    let shape = &g.ty(start).shape;
    let mut chain = Vec::new();
    let mut cur = start;
    while uses[cur.index()] == 1 {
        let Some(u) = user[cur.index()] else { break };
        let is_bias = matches!(g.node(u).op, Op::BiasAdd { .. });
        if g.ty(u).shape != *shape || (is_bias && !bias) || !fits_epilogue(g, u, cur, at) {
            break;
        }
        chain.push(u);
        taken[u.index()] = true;
        cur = u;
    }
    chain
}

/// Whether `u` can be computed in the store of `head`'s kernel from `cur` (its chain operand):
/// an elementwise op whose other operands exist before `head` runs. (An operand inside
/// another chain has that chain's next op as its one user, so it is never `u`'s operand.)
fn fits_epilogue(g: &Graph, u: NodeId, cur: NodeId, head: NodeId) -> bool {
    let before = |o: NodeId| o < head;
    match g.node(u).op {
        Op::BiasAdd { x, bias } => x == cur && before(bias) && g.ty(u).shape.len() == 2,
        Op::Unary { x, .. } | Op::Scale { x, .. } => x == cur,
        Op::ActGrad { y, dy, .. } => dy == cur && y != cur && before(y),
        Op::Binary { a, b, .. } => (a == cur && b != cur && before(b)) || (b == cur && a != cur && before(a)),
        _ => false,
    }
}
