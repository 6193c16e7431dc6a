//! Kernel families: the ops that compile to more than one kernel, need scratch, or may call the
//! wide matmul core (convolutions, recurrent loops, attention's batched products). Each
//! family lives in its own file, which says in one [`Family`] value what its nodes compile to:
//! their kernels (parts) and each part's work units, their scratch, their call into the wide
//! core, how each part is emitted and what `--emit fused` says of it. `Program::compile`, the
//! planner and `describe` ask [`FAMILIES`] and name none of them: a new family is one new file
//! and one line in that list.

use super::emit::Emit;
use super::plan::Plan;
use super::wide;
use super::{batched, columns, conv, recurrent};
use crate::ir::{Graph, NodeId};
use cranelift_codegen::ir::Value;

/// Every family, asked in order; the first whose `parts` answers compiles the node.
pub const FAMILIES: &[Family] = &[conv::FAMILY, recurrent::FAMILY, batched::FAMILY, columns::FAMILY];

/// What a family's node compiles to.
pub struct Parts {
    /// The kernels, in order, by name (`k12_conv2d_prep`, …).
    pub names: &'static [&'static str],
    /// The part that computes (multiply-adds, the wide core's call).
    pub main: usize,
}

/// How a family compiles its nodes; see the module docs.
pub struct Family {
    /// The kernels node `id` compiles to; `None` when this family does not compile it.
    pub parts: fn(&Graph, NodeId) -> Option<Parts>,
    /// Bytes of scratch node `id` needs while it runs, the last argument whether the wide
    /// core is there (its call may need less).
    pub scratch_bytes: fn(&Graph, NodeId, bool) -> usize,
    /// The wide core's call for node `id` at `scratch`, when it uses the core; the last
    /// argument says what the core may use besides the gemm crate's kernels.
    pub wide_call: fn(&Graph, &Plan, NodeId, usize, wide::Extras) -> Option<wide::Call>,
    /// Work units `lo..hi` ranges over in part `k`, and its rough work (multiply-adds for the
    /// main part), given the wide core's call if there is one.
    pub units: fn(&Graph, NodeId, usize, Option<&wide::Call>) -> (usize, usize),
    /// Emits part `k` of node `id`: its scratch, its range of work units, the wide core.
    #[allow(clippy::type_complexity)]
    pub emit: fn(
        &mut Emit,
        &Graph,
        &Plan,
        NodeId,
        usize,
        usize,
        (Value, Value),
        Option<wide::Core>,
    ) -> Result<(), String>,
    /// What part `k` (not the main one) does, for `--emit fused`, with the wide core or not.
    pub describe: fn(&Graph, NodeId, usize, bool) -> String,
}

/// The family that compiles node `id` (its index in [`FAMILIES`]) and the parts it compiles it
/// to.
pub fn of(g: &Graph, id: NodeId) -> Option<(usize, Parts)> {
    FAMILIES.iter().enumerate().find_map(|(i, f)| (f.parts)(g, id).map(|p| (i, p)))
}
