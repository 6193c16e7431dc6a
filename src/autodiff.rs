//! Reverse-mode automatic differentiation of an IR graph.
//!
//! [`backward`] appends to a copy of the forward graph the nodes that compute ∂loss/∂p for every
//! parameter p; [`training_step`] adds the optimizer's in-place update of each parameter, so a
//! whole training step — forward, loss, backward, update — is one graph that later passes can
//! fuse and compile.
//!
//! Only nodes that both depend on a parameter and reach the loss get a gradient. Nodes are
//! visited in reverse id order, which is a reverse topological order by the IR's invariant.
//! Each op's rule is one arm of [`Ad::rule`], its math in the comment above it. `d` is the
//! gradient arriving at the node's output, `y` the node's own value.

use crate::ir::{BinaryFn, Clip, Graph, NodeId, Op, OptimizerFn, ParamId, UnaryFn};

/// A forward graph with its gradient nodes.
pub struct Backward {
    pub graph: Graph,
    /// `param_grads[p]`: the node holding ∂loss/∂p, or `None` if p does not affect the loss.
    pub param_grads: Vec<Option<NodeId>>,
}

/// Differentiates `loss` (a scalar node of `forward`) with respect to every parameter.
pub fn backward(forward: &Graph, loss: NodeId) -> Result<Backward, String> {
    if !forward.ty(loss).shape.is_empty() {
        return Err(format!("the loss %{} is not a scalar", loss.0));
    }
    let n = forward.len();
    let mut from_param = vec![false; n];
    for id in forward.ids() {
        let node = forward.node(id);
        from_param[id.index()] =
            matches!(node.op, Op::Param(_)) || node.op.operands().iter().any(|o| from_param[o.index()]);
    }
    let mut to_loss = vec![false; n];
    to_loss[loss.index()] = true;
    for id in forward.ids().rev() {
        if to_loss[id.index()] {
            for o in forward.node(id).op.operands() {
                to_loss[o.index()] = true;
            }
        }
    }
    let needs: Vec<bool> = (0..n).map(|i| from_param[i] && to_loss[i]).collect();

    let mut graph = forward.clone();
    graph.name = forward.name.replace(".forward", ".train");
    let seed = graph.add(Op::Fill { value: 1.0, shape: vec![] }, None)?;
    let mut ad = Ad { g: graph, grads: vec![None; n], needs };
    ad.grads[loss.index()] = Some(seed);
    for id in forward.ids().rev() {
        if let (true, Some(d)) = (ad.needs[id.index()], ad.grads[id.index()]) {
            ad.rule(id, d)?;
        }
    }
    let param_grads =
        forward.param_nodes().into_iter().map(|node| node.and_then(|id| ad.grads[id.index()])).collect();
    Ok(Backward { graph: ad.g, param_grads })
}

/// The whole training step: forward, loss, backward, and `opt`'s update (after `clip`) of
/// every parameter not `frozen`. Outputs: the forward graph's outputs.
pub fn training_step(
    forward: &Graph,
    opt: OptimizerFn,
    clip: Clip,
    frozen: &[bool],
) -> Result<Graph, String> {
    let loss = forward.output("loss").ok_or("the graph has no `loss` output")?;
    let Backward { mut graph, param_grads } = backward(forward, loss)?;
    for (p, grad) in param_grads.into_iter().enumerate() {
        if let Some(grad) = grad
            && !frozen.get(p).copied().unwrap_or(false)
        {
            graph.add(Op::Update { f: opt, clip, param: ParamId(p as u32), grad }, None)?;
        }
    }
    Ok(graph)
}

struct Ad {
    g: Graph,
    grads: Vec<Option<NodeId>>,
    needs: Vec<bool>,
}

impl Ad {
    fn add(&mut self, op: Op, at: NodeId) -> Result<NodeId, String> {
        let span = self.g.span(at);
        self.g.add(op, span)
    }

    /// The gradients of `op(a)·op(b)` (made by `mm`) for the operands that want one.
    fn matmul_grads(
        &mut self,
        (a, b, ta, tb): (NodeId, NodeId, bool, bool),
        d: NodeId,
        y: NodeId,
        mm: impl Fn(NodeId, NodeId, bool, bool) -> Op,
    ) -> Result<(), String> {
        if self.wants(a) {
            let op = if ta { mm(b, d, tb, true) } else { mm(d, b, false, !tb) };
            let da = self.add(op, y)?;
            self.acc(a, da, y)?;
        }
        if self.wants(b) {
            let op = if tb { mm(d, a, true, ta) } else { mm(a, d, !ta, false) };
            let db = self.add(op, y)?;
            self.acc(b, db, y)?;
        }
        Ok(())
    }

    /// Adds `g` to the gradient of `o`, if `o` needs one.
    fn acc(&mut self, o: NodeId, g: NodeId, at: NodeId) -> Result<(), String> {
        if !self.needs[o.index()] {
            return Ok(());
        }
        let sum = match self.grads[o.index()] {
            Some(prev) => self.add(Op::Binary { f: BinaryFn::Add, a: prev, b: g }, at)?,
            None => g,
        };
        self.grads[o.index()] = Some(sum);
        Ok(())
    }

    fn wants(&self, o: NodeId) -> bool {
        self.needs[o.index()]
    }

    fn rule(&mut self, y: NodeId, d: NodeId) -> Result<(), String> {
        let op = self.g.node(y).op.clone();
        let shape_of = |g: &Graph, id: NodeId| g.ty(id).shape.clone();
        match op {
            Op::Input(_) | Op::Param(_) | Op::Fill { .. } | Op::Normal { .. } => {}

            // C = op(A)·op(B)  ⇒  d op(A) = dC·op(B)ᵀ,  d op(B) = op(A)ᵀ·dC;
            // a stored-transposed operand takes the transpose of its gradient.
            // (`BatchMatMul`: the same rule per batch element.)
            Op::MatMul { a, b, ta, tb } => {
                let mm = |a, b, ta, tb| Op::MatMul { a, b, ta, tb };
                self.matmul_grads((a, b, ta, tb), d, y, mm)?;
            }
            Op::BatchMatMul { a, b, ta, tb } => {
                let mm = |a, b, ta, tb| Op::BatchMatMul { a, b, ta, tb };
                self.matmul_grads((a, b, ta, tb), d, y, mm)?;
            }

            // y[b, t, s] = q[b, t] + k[b, s]  ⇒  dq = Σ_s d,  dk = Σ_t d.
            Op::AddPairs { q, k } => {
                if self.wants(q) {
                    let dq = self.add(Op::SumAxis { x: d, axis: 2 }, y)?;
                    self.acc(q, dq, y)?;
                }
                if self.wants(k) {
                    let dk = self.add(Op::SumAxis { x: d, axis: 1 }, y)?;
                    self.acc(k, dk, y)?;
                }
            }

            // Masked places are constants: no gradient reaches x there.
            Op::MaskFill { x, ids, .. } => {
                let dx = self.add(Op::MaskFill { x: d, ids, value: 0.0 }, y)?;
                self.acc(x, dx, y)?;
            }

            // y = x + b[axis 1]  ⇒  dx = d,  db = Σ over all axes but 1 of d.
            Op::BiasAdd { x, bias } => {
                self.acc(x, d, y)?;
                if self.wants(bias) {
                    let db = self.add(Op::SumToAxis1 { x: d }, y)?;
                    self.acc(bias, db, y)?;
                }
            }

            Op::Unary { f, x } => {
                let dx = match f {
                    // Activations: written from the output y.
                    // relu: d·[y>0]; leaky: d·(y>0 ? 1 : a); sigmoid: d·y(1-y); tanh: d·(1-y²).
                    UnaryFn::Relu | UnaryFn::LeakyRelu(_) | UnaryFn::Sigmoid | UnaryFn::Tanh => {
                        self.add(Op::ActGrad { f, y, dy: d }, y)?
                    }
                    // y = |x|  ⇒  dx = d·sign(x).
                    UnaryFn::Abs => {
                        let s = self.add(Op::Unary { f: UnaryFn::Sign, x }, y)?;
                        self.add(Op::Binary { f: BinaryFn::Mul, a: d, b: s }, y)?
                    }
                    // y = x²  ⇒  dx = 2·x·d.
                    UnaryFn::Square => {
                        let m = self.add(Op::Binary { f: BinaryFn::Mul, a: d, b: x }, y)?;
                        self.add(Op::Scale { x: m, c: 2.0 }, y)?
                    }
                    // y = -x  ⇒  dx = -d.
                    UnaryFn::Neg => self.add(Op::Scale { x: d, c: -1.0 }, y)?,
                    // y = eˣ  ⇒  dx = d·y.
                    UnaryFn::Exp => self.add(Op::Binary { f: BinaryFn::Mul, a: d, b: y }, y)?,
                    // y = sign(x) is flat almost everywhere: no gradient.
                    UnaryFn::Sign => return Ok(()),
                };
                self.acc(x, dx, y)?;
            }

            // y = a ± b  ⇒  da = d,  db = ±d;   y = a·b  ⇒  da = d·b,  db = d·a;
            // y = a/b  ⇒  da = d/b,  db = −d·y/b.
            Op::Binary { f, a, b } => {
                let (da, db) = match f {
                    BinaryFn::Add => (d, d),
                    BinaryFn::Sub => (d, self.add(Op::Scale { x: d, c: -1.0 }, y)?),
                    BinaryFn::Mul => (
                        self.add(Op::Binary { f: BinaryFn::Mul, a: d, b }, y)?,
                        self.add(Op::Binary { f: BinaryFn::Mul, a: d, b: a }, y)?,
                    ),
                    BinaryFn::Div => {
                        let da = self.add(Op::Binary { f: BinaryFn::Div, a: d, b }, y)?;
                        let dy = self.add(Op::Binary { f: BinaryFn::Mul, a: da, b: y }, y)?;
                        (da, self.add(Op::Scale { x: dy, c: -1.0 }, y)?)
                    }
                };
                self.acc(a, da, y)?;
                self.acc(b, db, y)?;
            }

            // y = c·x  ⇒  dx = c·d.
            Op::Scale { x, c } => {
                let dx = self.add(Op::Scale { x: d, c }, y)?;
                self.acc(x, dx, y)?;
            }

            // y = softmax(x)  ⇒  dx = y·(d - Σ d·y) along the last axis.
            Op::Softmax { x } => {
                let dx = self.add(Op::SoftmaxGrad { y, dy: d }, y)?;
                self.acc(x, dx, y)?;
            }

            // A reshape moves no data: dx is d with x's shape.
            Op::Reshape { x, .. } => {
                let shape = shape_of(&self.g, x);
                let dx = self.add(Op::Reshape { x: d, shape }, y)?;
                self.acc(x, dx, y)?;
            }

            // y[b] = x[b]ᵀ  ⇒  dx[b] = d[b]ᵀ.
            Op::Transpose { x } => {
                let dx = self.add(Op::Transpose { x: d }, y)?;
                self.acc(x, dx, y)?;
            }

            // y = Σ x  ⇒  dx = d everywhere.
            Op::SumAll { x } => {
                let shape = shape_of(&self.g, x);
                let dx = self.add(Op::BroadcastScalar { x: d, shape }, y)?;
                self.acc(x, dx, y)?;
            }

            // y = x ⋆ w (stride s, padding p)  ⇒  dx = d ⋆ᵀ w (the transposed convolution,
            // with the output padding that gives back x's size),  dw = Σ_b x ⊗ d.
            Op::Conv2d { x, w, stride, pad } => {
                let xs = shape_of(&self.g, x);
                let ws = shape_of(&self.g, w);
                if self.wants(x) {
                    let ds = shape_of(&self.g, d);
                    let back = |a: usize| xs[a + 2] + 2 * pad[a] - ((ds[a + 2] - 1) * stride[a] + ws[a + 2]);
                    let out_pad = [back(0), back(1)];
                    let dx = self.add(Op::ConvTranspose2d { x: d, w, stride, pad, out_pad }, y)?;
                    self.acc(x, dx, y)?;
                }
                if self.wants(w) {
                    let op = Op::Conv2dWeightGrad { x, dy: d, kernel: [ws[2], ws[3]], stride, pad };
                    let dw = self.add(op, y)?;
                    self.acc(w, dw, y)?;
                }
            }

            // y = x ⋆ᵀ w  ⇒  dx = d ⋆ w (a plain convolution, same stride and padding),
            // dw = Σ_b x ⊗ d with the roles of input and output swapped.
            Op::ConvTranspose2d { x, w, stride, pad, .. } => {
                let ws = shape_of(&self.g, w);
                let k = [ws[2], ws[3]];
                if self.wants(x) {
                    let dx = self.add(Op::Conv2d { x: d, w, stride, pad }, y)?;
                    self.acc(x, dx, y)?;
                }
                if self.wants(w) {
                    let op = Op::ConvTranspose2dWeightGrad { x, dy: d, kernel: k, stride, pad };
                    let dw = self.add(op, y)?;
                    self.acc(w, dw, y)?;
                }
            }

            // y[i] = x[idx[i]]  ⇒  dx[idx[i]] += d[i]: the gradient goes back through the
            // switches.
            Op::Gather { x, idx } => {
                let xs = shape_of(&self.g, x);
                let op = Op::Scatter { v: d, idx, height: xs[2], width: xs[3], accumulate: true };
                let dx = self.add(op, y)?;
                self.acc(x, dx, y)?;
            }

            // y = zeros with y[idx[i]] = v[i] (unpool)  ⇒  dv[i] = d[idx[i]].
            Op::Scatter { v, idx, .. } => {
                let dv = self.add(Op::Gather { x: d, idx }, y)?;
                self.acc(v, dv, y)?;
            }

            // y = mean of each window  ⇒  each input gets d/K² from every window it is in.
            Op::AvgPool { x, kernel, stride } => {
                let xs = shape_of(&self.g, x);
                let op = Op::AvgPoolGrad { dy: d, kernel, stride, height: xs[2], width: xs[3] };
                let dx = self.add(op, y)?;
                self.acc(x, dx, y)?;
            }

            // y[b,t] = table[ids[b,t]]  ⇒  dtable[ids[b,t]] += d[b,t].
            Op::Embed { table, ids } => {
                let vocab = shape_of(&self.g, table)[0];
                let dt = self.add(Op::EmbedGrad { ids, dy: d, vocab }, y)?;
                self.acc(table, dt, y)?;
            }

            // y = x·mask/(1-p)  ⇒  dx = d·mask/(1-p), the same mask.
            Op::Dropout { x, p, salt } => {
                let dx = self.add(Op::DropoutGrad { dy: d, p, salt }, y)?;
                self.acc(x, dx, y)?;
            }

            // y = mean loss(pred, target)  ⇒  dpred = d·∂loss/∂pred (targets are data).
            Op::Loss { f, pred, target } => {
                let dp = self.add(Op::LossGrad { f, pred, target, dy: d }, y)?;
                self.acc(pred, dp, y)?;
            }

            // Backpropagation through time, from the states before each step and what the
            // forward loop saved of each step (`gate_saves`: every activation the backward
            // reads, and a GRU's hidden projection of n). The loop runs backwards from the
            // last step, giving the gradients of the projections and of the initial state. Then
            // dW_hh = Σ_t dghᵀ·h_prev,  db_hh = Σ dgh, and xp's own rule takes dxp on.
            Op::Recurrent { cell, xp, h0, w_hh, b_hh } => {
                let [b, t, g] = <[usize; 3]>::try_from(shape_of(&self.g, xp))
                    .map_err(|_| "recurrent projections must be [B, T, G·H]".to_string())?;
                let h = shape_of(&self.g, w_hh)[1];
                let hprev = self.add(Op::PrevStates { x: y, first: h0 }, y)?;
                let hp = if cell.state(h) == h {
                    hprev
                } else {
                    self.add(Op::SliceLast { x: hprev, start: 0, len: h }, y)?
                };
                let hp = self.add(Op::Reshape { x: hp, shape: vec![b * t, h] }, y)?;
                let gh = self.add(Op::GateSaves { rec: y }, y)?;
                let grad = self.add(Op::RecurrentGrad { cell, gh, hprev, dhs: d, w_hh }, y)?;
                let layout = crate::ir::recurrent_grad_layout(cell, b, t, h);
                let dxp = self.add(Op::Part { x: grad, offset: layout.dxp, shape: vec![b, t, g] }, y)?;
                self.acc(xp, dxp, y)?;
                if self.wants(h0) {
                    let shape = shape_of(&self.g, h0);
                    let dh0 = self.add(Op::Part { x: grad, offset: layout.dh0, shape }, y)?;
                    self.acc(h0, dh0, y)?;
                }
                let dgh = self.add(Op::Part { x: grad, offset: layout.dgh, shape: vec![b * t, g] }, y)?;
                if self.wants(w_hh) {
                    let dw = self.add(Op::MatMul { a: dgh, b: hp, ta: true, tb: false }, y)?;
                    self.acc(w_hh, dw, y)?;
                }
                if let Some(bias) = b_hh.filter(|&p| self.wants(p)) {
                    let db = self.add(Op::SumToAxis1 { x: dgh }, y)?;
                    self.acc(bias, db, y)?;
                }
            }

            // y = x[:, T-1]  ⇒  dx = d at the last step, zeros before.
            Op::LastStep { x } => {
                let [b, t, f] = <[usize; 3]>::try_from(shape_of(&self.g, x))
                    .map_err(|_| "last_step of a non-sequence".to_string())?;
                let pad = self.add(Op::PadLast { x: d, start: (t - 1) * f, total: t * f }, y)?;
                let dx = self.add(Op::Reshape { x: pad, shape: vec![b, t, f] }, y)?;
                self.acc(x, dx, y)?;
            }

            // y = x[:, last real step]  ⇒  dx = d there, zeros elsewhere.
            Op::LastReal { x, ids } => {
                let dx = self.add(Op::LastRealGrad { dy: d, ids }, y)?;
                self.acc(x, dx, y)?;
            }

            // y[:, t] = x for every t  ⇒  dx = Σ_t d[:, t].
            Op::Repeat { x, .. } => {
                let dx = self.add(Op::SumSteps { x: d }, y)?;
                self.acc(x, dx, y)?;
            }

            // y = x[..., start..start+len]  ⇒  dx = d there, zeros elsewhere.
            Op::SliceLast { x, start, .. } => {
                let total = *shape_of(&self.g, x).last().unwrap_or(&1);
                let dx = self.add(Op::PadLast { x: d, start, total }, y)?;
                self.acc(x, dx, y)?;
            }

            // y = [a, b] along axis 1  ⇒  da, db = d's channels of each.
            Op::Concat { a, b } => {
                let ca = shape_of(&self.g, a)[1];
                let cb = shape_of(&self.g, b)[1];
                if self.wants(a) {
                    let da = self.add(Op::SliceChannels { x: d, start: 0, len: ca }, y)?;
                    self.acc(a, da, y)?;
                }
                if self.wants(b) {
                    let db = self.add(Op::SliceChannels { x: d, start: ca, len: cb }, y)?;
                    self.acc(b, db, y)?;
                }
            }

            // y = x̂·γ + β, x̂ = (x − mean)/√(var + eps) with the batch's mean and variance
            //   ⇒  dγ = Σ d·x̂,  dβ = Σ d  (per channel),
            //      dx = γ/√(var + eps)·(d − Σd/n − x̂·Σ(d·x̂)/n)  (the statistics' own
            //      gradients folded in, as PyTorch's `batch_norm_backward`).
            Op::BatchNorm { x, stats, gamma, beta, eps } => {
                let c = shape_of(&self.g, gamma)[0];
                let sums = self.add(Op::BnSums { x, stats, dy: d, eps }, y)?;
                if self.wants(x) {
                    let dx = self.add(Op::BnGrad { x, stats, gamma, dy: d, sums, eps }, y)?;
                    self.acc(x, dx, y)?;
                }
                if self.wants(gamma) {
                    let dg = self.add(Op::Part { x: sums, offset: 0, shape: vec![c] }, y)?;
                    self.acc(gamma, dg, y)?;
                }
                if self.wants(beta) {
                    let db = self.add(Op::Part { x: sums, offset: c, shape: vec![c] }, y)?;
                    self.acc(beta, db, y)?;
                }
            }

            // y = x·scale[c] + shift[c] with fixed coefficients  ⇒  dx = d·scale[c].
            Op::ChannelAffine { x, coeffs, axis, .. } => {
                if self.wants(coeffs) {
                    return Err(
                        "no gradient rule for the coefficients of `channel_affine` (evaluation only)".into(),
                    );
                }
                let dx = self.add(Op::ChannelAffine { x: d, coeffs, axis, shift: false }, y)?;
                self.acc(x, dx, y)?;
            }

            // y = x repeated (nearest) or interpolated (bilinear)  ⇒  dx = each output's
            // gradient sent back to the inputs it was made of, with the same weights.
            Op::Upsample { x, scale, bilinear } => {
                let dx = self.add(Op::UpsampleGrad { dy: d, scale, bilinear }, y)?;
                self.acc(x, dx, y)?;
            }

            // Integer-valued ops carry no gradient.
            // Ids, and a value detached from the gradient: nothing flows back.
            Op::PoolArgmax { .. }
            | Op::OneHot { .. }
            | Op::ShiftRight { .. }
            | Op::Nearest { .. }
            | Op::StopGrad { .. } => {}

            // Ops that only appear in backward graphs.
            Op::ActGrad { .. }
            | Op::SoftmaxGrad { .. }
            | Op::SumToAxis1 { .. }
            | Op::SumAxis { .. }
            | Op::BroadcastScalar { .. }
            | Op::Conv2dWeightGrad { .. }
            | Op::ConvTranspose2dWeightGrad { .. }
            | Op::SparseConvT { .. }
            | Op::GatherConv { .. }
            | Op::SparseWeightGrad { .. }
            | Op::AvgPoolGrad { .. }
            | Op::EmbedGrad { .. }
            | Op::GatherColumns { .. }
            | Op::LastRealGrad { .. }
            | Op::ScatterColumns { .. }
            | Op::DropoutGrad { .. }
            | Op::LossGrad { .. }
            | Op::Update { .. }
            | Op::RecurrentGrad { .. }
            | Op::PrevStates { .. }
            | Op::GateSaves { .. }
            | Op::Part { .. }
            | Op::PadLast { .. }
            | Op::SumSteps { .. }
            | Op::SliceChannels { .. }
            | Op::BnStats { .. }
            | Op::BnSums { .. }
            | Op::BnGrad { .. }
            | Op::BnCoeffs { .. }
            | Op::UpsampleGrad { .. }
            | Op::FlipKernel { .. } => {
                return Err(format!("no gradient rule for `{}` yet", op.mnemonic()));
            }
        }
        Ok(())
    }
}
