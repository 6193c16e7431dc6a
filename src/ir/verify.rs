//! The IR verifier. It checks every invariant below and reports every violation it finds, not
//! only the first:
//!
//! 1. Operands come before their user (topological order).
//! 2. Each node's stored type is the type its op infers from its operands.
//! 3. `Input` and `Param` nodes refer to existing definitions, each at most once.
//! 4. Outputs name existing nodes, and names are unique.
//! 5. Every stored shape is free of zero-sized dimensions (except the `Update` marker).

use super::{Graph, Op};

pub fn verify(g: &Graph) -> Result<(), Vec<String>> {
    let mut errors = Vec::new();
    let mut seen_inputs = vec![false; g.inputs.len()];
    let mut seen_params = vec![false; g.params.len()];
    for id in g.ids() {
        let node = g.node(id);
        for o in node.op.operands() {
            if o >= id {
                errors.push(format!("%{}: operand %{} does not come before it", id.0, o.0));
            }
        }
        match &node.op {
            Op::Input(i) => match seen_inputs.get_mut(i.index()) {
                Some(seen) if *seen => errors.push(format!("%{}: input {} read twice", id.0, i.0)),
                Some(seen) => *seen = true,
                None => errors.push(format!("%{}: input {} is not defined", id.0, i.0)),
            },
            Op::Param(p) => match seen_params.get_mut(p.index()) {
                Some(seen) if *seen => errors.push(format!("%{}: param {} read twice", id.0, p.0)),
                Some(seen) => *seen = true,
                None => errors.push(format!("%{}: param {} is not defined", id.0, p.0)),
            },
            _ => {}
        }
        // Only re-infer when operands are in order: `infer` then reads only earlier nodes.
        if node.op.operands().iter().all(|o| *o < id) {
            match node.op.infer(g) {
                Ok(ty) if ty != node.ty => errors.push(format!(
                    "%{}: {} has type {} but its operands give {ty}",
                    id.0,
                    node.op.mnemonic(),
                    node.ty
                )),
                Ok(_) => {}
                Err(e) => errors.push(format!("%{}: {}: {e}", id.0, node.op.mnemonic())),
            }
        }
        if !matches!(node.op, Op::Update { .. }) && node.ty.shape.contains(&0) {
            errors.push(format!("%{}: zero-sized dimension in {}", id.0, node.ty));
        }
    }
    let mut names: Vec<&str> = Vec::new();
    for (name, id) in &g.outputs {
        if id.index() >= g.len() {
            errors.push(format!("output {name} names missing node %{}", id.0));
        }
        if names.contains(&name.as_str()) {
            errors.push(format!("output {name} appears twice"));
        }
        names.push(name);
    }
    if errors.is_empty() { Ok(()) } else { Err(errors) }
}
