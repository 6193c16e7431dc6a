//! The memory plan: every value of a graph at a constant byte offset in one arena.
//!
//! Layout: parameters, their optimizer buffers, graph inputs, per-step scalars (dropout's seed
//! and step; each update's step size, bias correction and momentum), then the temporaries.
//! Temporaries are reused by liveness: a value's space is free after its last use, freed
//! neighbours merge, and a later value takes the smallest free block it fits in (best fit) or
//! grows the free block at the arena's end. A `reshape` is the same bytes as its input,
//! a `part` a range of them.
//! Every buffer starts on a 64-byte boundary.

use super::fuse::Group;
use crate::ir::{Graph, NodeId, Op};
use std::cmp::Reverse;
use std::collections::BinaryHeap;

const ALIGN: usize = 64;

fn round(n: usize) -> usize {
    n.div_ceil(ALIGN) * ALIGN
}

#[derive(Clone, Debug, Default)]
pub struct Plan {
    /// Byte offset of each node's value.
    pub node: Vec<usize>,
    /// Byte offset of each parameter.
    pub param: Vec<usize>,
    /// Byte offsets of each parameter's optimizer buffers (0, 1 or 2).
    pub slots: Vec<Vec<usize>>,
    pub input: Vec<usize>,
    /// Dropout's seed and step (two u64).
    pub rng: usize,
    /// Per `update` node: 8 f32 the runtime sets before each step (`kernels::update`).
    pub update_scalars: Vec<(NodeId, usize)>,
    /// With `clip norm`: one f32 per chunk of the clipped gradients, where the norm kernel
    /// writes each chunk's sum of squares (`clip`): offset and count.
    pub norm_partials: Option<(usize, usize)>,
    /// Per node with scratch (packed operands, im2col, a recurrent state): offset and bytes.
    pub scratch: Vec<(NodeId, usize, usize)>,
    /// Bytes of the persistent part (everything before the temporaries) and in all.
    pub persistent: usize,
    pub size: usize,
    /// (node, offset, bytes, first, last use) of each temporary, for `--emit fused`.
    pub temporaries: Vec<(NodeId, usize, usize, usize, usize)>,
}

impl Plan {
    /// The offset of node `id`'s scratch.
    pub fn scratch_of(&self, id: NodeId) -> Result<usize, String> {
        self.scratch
            .iter()
            .find(|s| s.0 == id)
            .map(|s| s.1)
            .ok_or_else(|| format!("%{} has no scratch", id.0))
    }
}

/// Plans `g` to run as `groups`: a fused group's result is allocated where the group runs (its
/// first node), and the values inside a fused chain get no memory at all. `scratch(id)` is the
/// scratch a node's kernels need while it runs (each op family says how much: the planner
/// knows none of them).
pub fn plan(g: &Graph, groups: &[Group], scratch: &dyn Fn(NodeId) -> usize) -> Plan {
    // For each node: the node whose buffer it stands for (itself unless fused away), and, at a
    // group's head, the result to allocate there.
    let mut at_head: Vec<Option<NodeId>> = vec![None; g.len()];
    let mut fused_away = vec![false; g.len()];
    // A recurrent loop writes what it saves of its gates as it runs.
    for id in g.ids() {
        if let Op::GateSaves { rec } = g.node(id).op {
            at_head[rec.index()] = Some(id);
        }
    }
    for grp in groups {
        let nodes = grp.nodes();
        if let Group::LossPair { loss, .. } = grp {
            // The gradient (after its chain) is written when the loss runs; the loss keeps its
            // own buffer, the values between it and the result (`nodes` = loss, gradient,
            // chain) have none.
            at_head[loss.index()] = Some(grp.result());
            for c in &nodes[1..nodes.len() - 1] {
                fused_away[c.index()] = true;
            }
        } else if matches!(grp, Group::MatMul { .. } | Group::Chain(_)) && nodes.len() > 1 {
            at_head[nodes[0].index()] = Some(grp.result());
            for c in &nodes[..nodes.len() - 1] {
                fused_away[c.index()] = true;
            }
        }
    }
    let mut p = Plan { node: vec![0; g.len()], ..Plan::default() };
    let mut at = 0usize;
    let mut take = |bytes: usize| {
        let o = at;
        at += round(bytes.max(4));
        o
    };
    for def in &g.params {
        p.param.push(take(def.shape.iter().product::<usize>() * 4));
    }
    for (def, count) in g.params.iter().zip(g.optimizer_slots()) {
        let n = def.shape.iter().product::<usize>() * 4;
        let slots = (0..count.unwrap_or(0)).map(|_| take(n)).collect();
        p.slots.push(slots);
    }
    for i in &g.inputs {
        p.input.push(take(i.ty.numel() * 4));
    }
    p.rng = take(16);
    for id in g.ids() {
        if matches!(g.node(id).op, Op::Update { .. }) {
            p.update_scalars.push((id, take(32)));
        }
    }
    let chunks = super::clip::chunks(g);
    if chunks > 0 {
        p.norm_partials = Some((take(chunks * 4), chunks));
    }
    p.persistent = at;

    // Last use of every node (outputs live to the end).
    let n = g.len();
    let mut last = vec![0usize; n];
    for id in g.ids() {
        last[id.index()] = id.index();
        for o in g.node(id).op.operands() {
            last[o.index()] = last[o.index()].max(id.index());
        }
    }
    for (_, id) in &g.outputs {
        last[id.index()] = n;
    }
    // The updates run together after every other kernel (`fuse::Group::Updates`), whatever
    // their place in the graph: a batch norm's running statistics are updated from values of
    // the forward pass, which must live until then.
    for id in g.ids() {
        if let Op::Update { grad, .. } = g.node(id).op {
            last[grad.index()] = n;
        }
    }
    // A reshape's bytes are its input's: the input lives as long as the reshape.
    for id in g.ids().rev() {
        if let Op::Reshape { x, .. } | Op::StopGrad { x } | Op::Part { x, .. } = g.node(id).op {
            last[x.index()] = last[x.index()].max(last[id.index()]);
        }
    }

    // Best-fit reuse of freed blocks among the temporaries: free blocks next to each other are
    // one block, and a free block at the end of the arena grows into a larger request. (First
    // fit without merging left the arena fragmented: a few bytes more scratch in one
    // convolution grew segnet_coins' arena by a third.)
    let mut free: Vec<(usize, usize)> = Vec::new(); // (offset, bytes), by offset, none adjacent
    // Live blocks by last use, then by when they were placed: (last use, order, offset, bytes).
    let mut live: BinaryHeap<Reverse<(usize, usize, usize, usize)>> = BinaryHeap::new();
    let mut placed = 0usize;
    let mut place = |live: &mut BinaryHeap<_>, last: usize, o: usize, bytes: usize| {
        live.push(Reverse((last, placed, o, bytes)));
        placed += 1;
    };
    let mut end = at;
    let alloc = |bytes: usize, free: &mut Vec<(usize, usize)>, end: &mut usize| -> usize {
        let bytes = round(bytes.max(4));
        let best = free.iter().enumerate().filter(|(_, f)| f.1 >= bytes).min_by_key(|(_, f)| (f.1, f.0));
        if let Some((i, &(o, b))) = best {
            if b > bytes {
                free[i] = (o + bytes, b - bytes);
            } else {
                free.remove(i);
            }
            return o;
        }
        if let Some(&(o, b)) = free.last()
            && o + b == *end
        {
            free.pop();
            *end = o + bytes;
            return o;
        }
        let o = *end;
        *end += bytes;
        o
    };
    // Results of fused groups, placed when their group's head is.
    let mut placed_at_head = vec![false; n];
    for id in g.ids() {
        // Free what died before this node.
        // (Freed in the order they were placed, so the plan does not depend on the heap.)
        let mut dead = Vec::new();
        while let Some(&Reverse((l, order, o, b))) = live.peek()
            && l < id.index()
        {
            live.pop();
            dead.push((order, o, b));
        }
        free.extend(dead.into_iter().map(|(_, o, b)| (o, b)));
        free.sort_unstable();
        free.dedup_by(|next, prev| {
            // Adjacent blocks merge into the first.
            let joins = prev.0 + prev.1 == next.0;
            if joins {
                prev.1 += next.1;
            }
            joins
        });
        let node = g.node(id);
        if let Some(result) = at_head[id.index()] {
            // A fused group: its result lives from here.
            let bytes = round(g.ty(result).numel().max(1) * 4);
            let o = alloc(bytes, &mut free, &mut end);
            place(&mut live, last[result.index()], o, bytes);
            p.temporaries.push((result, o, bytes, id.index(), last[result.index()]));
            p.node[result.index()] = o;
            placed_at_head[result.index()] = true;
        }
        let allocated_at_head = placed_at_head[id.index()];
        p.node[id.index()] = match &node.op {
            Op::Param(q) => p.param[q.index()],
            Op::Input(i) => p.input[i.index()],
            Op::Reshape { x, .. } | Op::StopGrad { x } => p.node[x.index()],
            Op::Part { x, offset, .. } => p.node[x.index()] + offset * 4,
            Op::Update { .. } => 0,
            _ if fused_away[id.index()] || allocated_at_head => p.node[id.index()],
            _ => {
                let bytes = round(node.ty.numel().max(1) * 4);
                let o = alloc(bytes, &mut free, &mut end);
                place(&mut live, last[id.index()], o, bytes);
                p.temporaries.push((id, o, bytes, id.index(), last[id.index()]));
                o
            }
        };
        let scratch = scratch(id);
        if scratch > 0 {
            // Scratch is only needed while the node runs.
            let o = alloc(scratch, &mut free, &mut end);
            place(&mut live, id.index(), o, round(scratch));
            p.scratch.push((id, o, scratch));
        }
    }
    p.size = end;
    p
}
