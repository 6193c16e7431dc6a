//! Dead-code elimination: keeps the nodes the chosen outputs need (and every in-place update),
//! drops the rest. Inputs that are no longer read stay declared; nothing reads them.

use crate::ir::{Graph, Op};

/// The graph without the nodes none of its outputs (nor any `Update`) depends on.
pub fn drop_unread(g: &Graph) -> Result<Graph, String> {
    let names: Vec<&str> = g.outputs.iter().map(|(n, _)| n.as_str()).collect();
    keep_outputs(g, &names)
}

/// The graph reduced to what `outputs` (and any `Update`) depend on; other outputs removed.
pub fn keep_outputs(g: &Graph, outputs: &[&str]) -> Result<Graph, String> {
    let mut live = vec![false; g.len()];
    let mut roots = Vec::new();
    for name in outputs {
        roots.push(g.output(name).ok_or_else(|| format!("the graph has no output `{name}`"))?);
    }
    for id in g.ids() {
        if matches!(g.node(id).op, Op::Update { .. }) {
            roots.push(id);
        }
    }
    for r in roots {
        live[r.index()] = true;
    }
    for id in g.ids().rev() {
        if live[id.index()] {
            for o in g.node(id).op.operands() {
                live[o.index()] = true;
            }
        }
    }
    let mut pruned = g.clone();
    pruned.outputs.retain(|(n, _)| outputs.contains(&n.as_str()));
    let out = pruned.retain(&live)?;
    debug_assert!(crate::ir::verify(&out).is_ok());
    Ok(out)
}
