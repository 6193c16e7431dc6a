//! The graph IR: what every layer is broken into before autodiff, fusion and code generation.
//!
//! A [`Graph`] is a list of [`Node`]s in a `Vec` arena, addressed by [`NodeId`]. Each node is one
//! primitive [`Op`] (a closed enum) producing one value of a static [`Type`] — dtype and shape,
//! batch dimension included. Graph inputs and parameters are nodes too (`Op::Input`,
//! `Op::Param`), so every operand is a `NodeId`.
//!
//! **Invariants** (checked by [`verify`]):
//! - Topological order: a node's operands have smaller ids. Nodes are only ever appended, so a
//!   backward pass walks them in reverse; nothing sorts.
//! - Every value has a resolved static type, and it is the type [`Op::infer`] computes from the
//!   operands. [`Graph::add`] is the only way to add a node and it infers the type, so a graph
//!   built through it is well typed by construction; `verify` re-checks after every pass.
//! - Source spans live in a side table (`Graph::span`), not in the ops.
//! - The printer is deterministic: nodes are numbered in order, no hash maps are iterated.
//!
//! The IR depends on nothing but `diag::Span`: it has its own kinds (e.g. [`Cell`]), onto which
//! `sema` maps the spec's.

pub mod bounds;
mod op;
mod print;
mod verify;

pub use op::{
    BinaryFn, Clip, LossFn, Op, OptimizerFn, RecurrentGradLayout, UnaryFn, recurrent_grad_layout,
    switch_weight,
};
pub use print::print;
pub use verify::verify;

use crate::diag::Span;
use std::fmt;

/// Index of a node in its graph.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(pub u32);

/// Index of a parameter in `Graph::params`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ParamId(pub u32);

/// Index of a graph input in `Graph::inputs`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct InputId(pub u32);

impl NodeId {
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

impl ParamId {
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

impl InputId {
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    /// Switches of a max pool and token ids.
    I32,
}

/// The static type of a value: dtype and shape (batch first for activations).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Type {
    pub dtype: DType,
    pub shape: Vec<usize>,
}

impl Type {
    pub fn f32(shape: impl Into<Vec<usize>>) -> Type {
        Type { dtype: DType::F32, shape: shape.into() }
    }

    pub fn i32(shape: impl Into<Vec<usize>>) -> Type {
        Type { dtype: DType::I32, shape: shape.into() }
    }

    pub fn scalar() -> Type {
        Type::f32(Vec::new())
    }

    /// Number of elements (1 for a scalar).
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

impl fmt::Display for Type {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let dt = match self.dtype {
            DType::F32 => "f32",
            DType::I32 => "i32",
        };
        write!(f, "{dt}[")?;
        for (i, d) in self.shape.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{d}")?;
        }
        f.write_str("]")
    }
}

/// A recurrent cell, as PyTorch's `nn.RNN` (tanh), `nn.GRU` and `nn.LSTM`: the IR's own kind,
/// onto which `sema` maps the spec's.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Cell {
    Rnn,
    Gru,
    Lstm,
}

impl Cell {
    /// Gates per cell: the row blocks of `weight_ih_l0` (PyTorch's layout).
    pub fn gates(self) -> u64 {
        match self {
            Cell::Rnn => 1,
            Cell::Gru => 3,
            Cell::Lstm => 4,
        }
    }

    /// How many gates need only their own projections: a GRU's r and z, an LSTM's four (PyTorch's
    /// order puts them first). Each step computes them before the rest, and saves them after
    /// their activation for the backward (`Op::GateSaves`).
    pub fn independent_gates(self) -> usize {
        match self {
            Cell::Rnn => 0,
            Cell::Gru => 2,
            Cell::Lstm => 4,
        }
    }

    /// How many `H`-wide slots a step keeps for the backward (`Op::GateSaves`): everything
    /// the gradient reads that an activation computed — an RNN's new state, a GRU's r, z,
    /// n's hidden projection and n, an LSTM's i, f, g, o and tanh c.
    pub fn saves(self) -> usize {
        match self {
            Cell::Rnn => 1,
            Cell::Gru => 4,
            Cell::Lstm => 5,
        }
    }

    /// The save slot of a GRU's n (`saves`): its slots 0–2 are r, z and n's hidden
    /// projection, each in its own gate's slot.
    pub const GRU_N_SLOT: usize = 3;
    /// The save slot of an LSTM's tanh c (`saves`), after i, f, g and o in their gates' slots.
    pub const LSTM_TANH_C_SLOT: usize = 4;

    /// The size of the state one step passes on: h, or h and c for an LSTM.
    pub fn state(self, hidden: usize) -> usize {
        if self == Cell::Lstm { 2 * hidden } else { hidden }
    }

    pub fn keyword(self) -> &'static str {
        match self {
            Cell::Rnn => "rnn",
            Cell::Gru => "gru",
            Cell::Lstm => "lstm",
        }
    }
}

/// What a parameter is, for initialisation and for penalties such as `l2(weights)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParamRole {
    Weight,
    Bias,
    /// An embedding table (initialised N(0, 1), as `nn.Embedding`).
    Embedding,
    /// A normalization's scale (`BatchNorm2d.weight`): initialised to ones, trained, and not
    /// one of the `weights` a penalty sums over.
    NormScale,
    /// A normalization's shift (`BatchNorm2d.bias`): initialised to zeros, trained.
    NormShift,
    /// A quantizer's codebook `[K, D]`: initialised U(±1/K) as the common PyTorch VQ-VAEs do
    /// (`fan_in` holds K), and not one of the `weights` a penalty sums over. Trained by the
    /// optimizer, or with `ema` moved by the training step itself toward the means of the
    /// vectors it is picked for (no gradient).
    Codebook {
        ema: bool,
    },
    /// A running statistic (`running_mean`, `running_var`, `num_batches_tracked`): no
    /// gradient, updated by the training step itself; zeros or ones at the start.
    Buffer {
        ones: bool,
    },
}

impl ParamRole {
    /// Whether the optimizer trains it from a gradient (else the training step updates it
    /// itself, or nothing does).
    pub fn trained(self) -> bool {
        !matches!(self, ParamRole::Buffer { .. } | ParamRole::Codebook { ema: true })
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct ParamDef {
    /// PyTorch's state-dict name, e.g. `encoder.0.weight`.
    pub name: String,
    pub shape: Vec<usize>,
    pub role: ParamRole,
    /// Fan-in used by PyTorch's default initialisation of this parameter's layer.
    pub fan_in: usize,
    /// Fan-out, for Xavier initialisation.
    pub fan_out: usize,
}

#[derive(Clone, Debug, PartialEq)]
pub struct InputDef {
    pub name: String,
    pub ty: Type,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    pub op: Op,
    pub ty: Type,
}

/// A graph of primitive ops; see the module docs for its invariants.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Graph {
    pub name: String,
    pub inputs: Vec<InputDef>,
    pub params: Vec<ParamDef>,
    nodes: Vec<Node>,
    spans: Vec<Option<Span>>,
    /// Named results, in order: e.g. `recon`, `code`, `loss`.
    pub outputs: Vec<(String, NodeId)>,
}

impl Graph {
    pub fn new(name: impl Into<String>) -> Graph {
        Graph { name: name.into(), ..Graph::default() }
    }

    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    pub fn node(&self, id: NodeId) -> &Node {
        &self.nodes[id.index()]
    }

    pub fn ty(&self, id: NodeId) -> &Type {
        &self.nodes[id.index()].ty
    }

    pub fn span(&self, id: NodeId) -> Option<Span> {
        self.spans.get(id.index()).copied().flatten()
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    pub fn ids(&self) -> impl DoubleEndedIterator<Item = NodeId> + use<> {
        (0..self.nodes.len() as u32).map(NodeId)
    }

    /// Appends a node, inferring its type. Errors (a wrong operand type) are compiler bugs in
    /// the caller; they are returned, not panicked, so a user never sees a crash.
    pub fn add(&mut self, op: Op, span: Option<Span>) -> Result<NodeId, String> {
        let ty = op.infer(self)?;
        let id = NodeId(u32::try_from(self.nodes.len()).map_err(|_| "graph too large")?);
        self.nodes.push(Node { op, ty });
        self.spans.push(span);
        Ok(id)
    }

    pub fn add_input(&mut self, name: impl Into<String>, ty: Type) -> Result<NodeId, String> {
        let id = InputId(self.inputs.len() as u32);
        self.inputs.push(InputDef { name: name.into(), ty });
        self.add(Op::Input(id), None)
    }

    pub fn add_param(&mut self, def: ParamDef) -> Result<NodeId, String> {
        let id = ParamId(self.params.len() as u32);
        self.params.push(def);
        self.add(Op::Param(id), None)
    }

    /// The node that reads parameter `p`, if any.
    pub fn param_node(&self, p: ParamId) -> Option<NodeId> {
        self.ids().find(|&id| self.node(id).op == Op::Param(p))
    }

    /// For every parameter, the node that reads it, if any (one pass over the graph).
    pub fn param_nodes(&self) -> Vec<Option<NodeId>> {
        let mut at = vec![None; self.params.len()];
        for id in self.ids() {
            if let Op::Param(p) = self.node(id).op
                && let Some(slot) = at.get_mut(p.index())
            {
                *slot = Some(id);
            }
        }
        at
    }

    /// The node that reads input `i`, if any.
    pub fn input_node(&self, i: InputId) -> Option<NodeId> {
        self.ids().find(|&id| self.node(id).op == Op::Input(i))
    }

    /// For every parameter, how many buffers its update keeps (`OptimizerFn::slot_count`);
    /// `None` when no `update` node updates it (one pass).
    pub fn optimizer_slots(&self) -> Vec<Option<usize>> {
        let mut slots = vec![None; self.params.len()];
        for n in &self.nodes {
            let Op::Update { f, param, .. } = n.op else { continue };
            let count = f.slot_count();
            if let Some(s) = slots.get_mut(param.index())
                && s.is_none()
            {
                *s = Some(count);
            }
        }
        slots
    }

    pub fn output(&self, name: &str) -> Option<NodeId> {
        self.outputs.iter().find(|(n, _)| n == name).map(|(_, id)| *id)
    }

    pub fn input_index(&self, name: &str) -> Option<InputId> {
        self.inputs.iter().position(|i| i.name == name).map(|i| InputId(i as u32))
    }

    /// A graph with this one's name, inputs and parameters and no nodes: the start of a
    /// rewrite.
    pub fn empty_like(&self) -> Graph {
        Graph {
            name: self.name.clone(),
            inputs: self.inputs.clone(),
            params: self.params.clone(),
            ..Graph::default()
        }
    }

    /// Rebuilds the graph keeping only `keep[i]` nodes, remapping operands and outputs. Used by
    /// dead-code elimination; `keep` must be closed under operands.
    pub fn retain(&self, keep: &[bool]) -> Result<Graph, String> {
        let mut map: Vec<Option<NodeId>> = vec![None; self.nodes.len()];
        let mut out = self.empty_like();
        for id in self.ids() {
            if !keep.get(id.index()).copied().unwrap_or(false) {
                continue;
            }
            let mut op = self.node(id).op.clone();
            let mut missing = false;
            op.map_operands(|o| match map[o.index()] {
                Some(n) => n,
                None => {
                    missing = true;
                    o
                }
            });
            if missing {
                return Err(format!("retain: node %{} uses a removed node", id.0));
            }
            map[id.index()] = Some(out.add(op, self.span(id))?);
        }
        for (name, id) in &self.outputs {
            let new = map[id.index()].ok_or_else(|| format!("retain: output {name} removed"))?;
            out.outputs.push((name.clone(), new));
        }
        Ok(out)
    }
}
