//! Lowering: every checked layer broken into primitive IR ops, at a fixed batch size.
//!
//! The graph's parameters are the model's, in the same order (`ParamId(i)` is
//! `Model::params[i]`), so checkpoints, optimizers and the IR agree on numbering. Outputs:
//! `recon` (the decoder's output), `code` (the encoder's output) and `loss` (the total loss).
//!
//! A recurrent layer lowers to the input projection of every step at once (one matmul over
//! `[B·T, I]`, the big parallel part) and one `recurrent` op that keeps the time loop (with its
//! own backward rule, backpropagation through time), not an unrolled loop: the IR stays a few
//! lines long for any length, and the JIT keeps each step's `h·W_hhᵀ` and gates in one kernel.

use super::{LayerInfo, Model, Part, Ty};
use crate::diag::Span;
use crate::ir::{
    BinaryFn, Clip, Graph, LossFn, NodeId, Op, OptimizerFn, ParamDef, ParamId, ParamRole, Type, UnaryFn,
};
use crate::syntax::ast::{self, ActKind, Cell, LayerKind, LossKind, Reduction, Score};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Dropout active; decoders teacher-forced.
    Train,
    /// Dropout off; decoders still teacher-forced (the validation loss). A model with a
    /// teacher-forced decoder also outputs `state0`, the state the decoder starts from.
    Infer,
    /// One step of greedy decoding (models with a teacher-forced decoder): inputs `prev`, the
    /// previous token `[B, 1]`, and `state`, the decoder's state `[B, S]`; outputs `recon`,
    /// the step's output `[B, 1, V]`, and `state`, the state after it. No encoder, no loss.
    Decode,
    /// The decoder alone, from an input `code` (the encoder's output type): generation and
    /// interpolation. Output `recon`. No encoder, no loss.
    Generate,
}

/// Whether `m`'s decoder attends to the encoder's states (an `attention` layer).
pub fn attends(m: &Model) -> bool {
    m.layers.iter().any(|l| matches!(l.layer.kind, LayerKind::Attention { .. }))
}

/// Whether `m`'s code is quantized (its encoder ends in `quantize K`).
pub fn quantizes(m: &Model) -> bool {
    m.encoder().any(|l| matches!(l.layer.kind, LayerKind::Quantize { .. }))
}

/// The teacher-forced recurrent layer of `m`'s decoder, if any: greedy decoding runs from it.
pub fn teacher_forced(m: &Model) -> Option<&ast::RecurrentSpec> {
    m.decoder().find_map(|l| match &l.layer.kind {
        LayerKind::Recurrent(r) if r.teacher_forcing => Some(r),
        _ => None,
    })
}

#[derive(Clone, Debug)]
pub struct Lowering {
    pub batch: u64,
    pub mode: Mode,
    /// The input is corrupted by the runtime: the loss reads a separate clean copy,
    /// `<input>.clean`.
    pub denoise: bool,
    /// Data-parallel training: the global batch this batch is one process's shard of. The
    /// processes' losses are averaged weighted by shard size, so a term that sums over the
    /// batch (`reduction: sum`) is scaled here by global ÷ shard to sum to the global batch's.
    pub shard_of: Option<u64>,
}

/// Builds the forward graph of `m`.
pub fn lower(m: &Model, cfg: &Lowering) -> Result<Graph, String> {
    lower_with(m, cfg, None)
}

/// Builds the forward graph of greedy pretraining's stage `k` (1-based; see `sema::stage`).
pub fn lower_stage(m: &Model, k: usize, cfg: &Lowering) -> Result<Graph, String> {
    let (stage, pos) = super::stage::stage_model(m, k)?;
    lower_with(&stage, cfg, Some(pos))
}

/// `stage_target`: the layer whose input the loss reconstructs, instead of the declared loss.
fn lower_with(m: &Model, cfg: &Lowering, stage_target: Option<usize>) -> Result<Graph, String> {
    let b = usize::try_from(cfg.batch).map_err(|_| "batch too large")?;
    if b == 0 || b > 1 << 24 {
        return Err(format!("batch {b} is out of range (1 to 16777216)"));
    }
    let mut l = Lower {
        g: Graph::new(format!("{}.forward", m.name)),
        b,
        sum_scale: cfg.shard_of.map_or(1.0, |n| n as f64 / b as f64),
        params: Vec::new(),
        pools: Vec::new(),
        salt: 0,
        decode_state: None,
        terms: Vec::new(),
        gaussian: None,
        quantized: None,
        named: Vec::new(),
        memory: None,
        source_ids: None,
        attention: None,
    };
    for p in &m.params {
        let def = ParamDef {
            name: p.name.clone(),
            shape: p.shape.iter().map(|&d| d as usize).collect(),
            role: p.role,
            fan_in: p.fan_in as usize,
            fan_out: p.fan_out as usize,
        };
        l.params.push(l.g.add_param(def)?);
    }
    if cfg.mode == Mode::Decode {
        return l.decode_step(m, cfg);
    }
    if cfg.mode == Mode::Generate {
        return l.generate(m, cfg);
    }
    let mut vars = Vec::new();
    for v in m.inputs.iter().chain(&m.targets) {
        vars.push((v.name.clone(), l.g.add_input(v.name.clone(), l.batched(&v.ty))?));
    }
    l.conditions(m)?;
    let input = vars.first().map(|v| v.1).ok_or("model without input")?;
    if m.inputs.first().is_some_and(|v| v.padded) {
        l.source_ids = Some(input);
    }

    let mut cur = Value { node: input, state: None, logits: None };
    let mut target = None;
    for (pos, info) in m.layers.iter().enumerate().filter(|(_, l)| l.part == Part::Encoder) {
        if Some(pos) == stage_target {
            target = Some(cur.node);
        }
        cur = l.layer(m, info, cur, cfg, &vars)?;
        l.name(info, cur.node);
    }
    let code = cur.node;
    let state0 = cur.state.unwrap_or(cur.node);
    for info in m.decoder() {
        cur = l.layer(m, info, cur, cfg, &vars)?;
        l.name(info, cur.node);
    }
    let recon = cur.node;

    let loss = match target {
        Some(t) => {
            // Pretraining: reconstruct the stage layer's input (the clean input for the first
            // layer of a denoising model).
            let t = if t == input && cfg.denoise {
                let name = format!("{}.clean", l.g.inputs[0].name);
                let ty = l.g.ty(input).clone();
                l.g.add_input(name, ty)?
            } else {
                t
            };
            let span = m.loss.span;
            l.add(Op::Loss { f: LossFn::Mse, pred: cur.node, target: t }, span)?
        }
        None => l.loss(m, &cur, code, cfg, &mut vars)?,
    };
    l.g.outputs = vec![("recon".into(), recon), ("code".into(), code), ("loss".into(), loss)];
    // A quantized code's ids, for `aec encode` and the codebook's usage.
    if let Some(q) = l.quantized {
        l.g.outputs.push((CODE_IDS.into(), q.ids));
    }
    // Every term of the loss as an output of its own (`term.mse`, `term.l2(weights)`, …), for
    // the metrics.
    if target.is_none() {
        l.g.outputs.extend(l.terms.drain(..).map(|(name, id)| (format!("{TERM_PREFIX}{name}"), id)));
    }
    if cfg.mode == Mode::Infer && teacher_forced(m).is_some() {
        l.g.outputs.push(("state0".into(), state0));
        if let (true, Some(memory)) = (attends(m), l.memory) {
            l.g.outputs.push(("memory".into(), memory));
        }
    }
    // A layer's node may be left unread: an embedding whose table the recurrent layer after
    // it projects and gathers from instead (`recurrent`).
    crate::passes::dce::drop_unread(&l.g)
}

struct Lower {
    g: Graph,
    b: usize,
    /// What a summed term is scaled by (see `Lowering::shard_of`).
    sum_scale: f64,
    params: Vec<NodeId>,
    /// Named pools: switches, and the input plane size unpool restores.
    pools: Vec<(String, NodeId, usize, usize)>,
    /// Distinguishes the random streams of dropout layers.
    salt: u32,
    /// In a decode step: the teacher-forced layer's state after the step.
    decode_state: Option<NodeId>,
    /// The loss's terms, by name: the reconstruction loss and each weighted penalty.
    terms: Vec<(String, NodeId)>,
    /// A Gaussian code's `mu` and `logvar`, for `kl(code)`.
    gaussian: Option<(NodeId, NodeId)>,
    /// A quantized code, for `vq(code)`.
    quantized: Option<Quantized>,
    /// Named layer outputs so far, for `concat NAME` and `add NAME`.
    named: Vec<(String, NodeId)>,
    /// The encoder's last recurrent layer's state after every step, `[B, S, H]` (h of an
    /// LSTM), and the source ids whose padding attention masks out: what `attention` reads.
    memory: Option<NodeId>,
    source_ids: Option<NodeId>,
    /// Attention's weights `[B, T, S]`, an output of the decode step.
    attention: Option<NodeId>,
}

/// A quantized code: the encoder's output `z`, its nearest codebook vectors `z_q` (the same
/// shape) and their ids.
#[derive(Clone, Copy)]
struct Quantized {
    z: NodeId,
    zq: NodeId,
    ids: NodeId,
    /// The codebook follows moving averages (no codebook loss).
    ema: bool,
}

/// The graph output holding a quantized code's ids: `[B]` for a vector code, `[B, H·W]` for
/// an image's positions.
pub const CODE_IDS: &str = "code_ids";

/// Graph outputs that hold one term of the loss are named `term.<the term>`.
pub const TERM_PREFIX: &str = "term.";

/// The graph input holding a scheduled term's weight is named `weight.<the term>`.
pub const WEIGHT_PREFIX: &str = "weight.";

/// The value flowing between layers.
#[derive(Clone, Copy)]
struct Value {
    node: NodeId,
    /// After a recurrent layer: its last state `[B, S]` (h, or h and c for an LSTM).
    state: Option<NodeId>,
    /// When `node` is a softmax: its input, for a fused cross-entropy.
    logits: Option<NodeId>,
}

impl Lower {
    /// The graph of one greedy decoding step (`Mode::Decode`): the decoder from its
    /// teacher-forced recurrent layer on, over one step.
    fn decode_step(mut self, m: &Model, cfg: &Lowering) -> Result<Graph, String> {
        let r = teacher_forced(m).ok_or("greedy decoding needs a teacher-forced decoder")?;
        let mut layers = m
            .decoder()
            .skip_while(|l| !matches!(&l.layer.kind, LayerKind::Recurrent(x) if x.teacher_forcing));
        let s = r.cell.state(r.hidden as usize);
        let prev = self.g.add_input("prev", Type::i32(vec![self.b, 1]))?;
        let state = self.g.add_input("state", Type::f32(vec![self.b, s]))?;
        // Attention reads the encoder's states (and the source, for its padding): inputs here.
        if attends(m) {
            let enc = m
                .layers
                .iter()
                .rev()
                .find(|l| l.part == Part::Encoder && matches!(l.layer.kind, LayerKind::Recurrent(_)))
                .ok_or("attention without an encoder recurrent layer")?;
            let (Ty::Seq { len, .. }, LayerKind::Recurrent(er)) = (&enc.input, &enc.layer.kind) else {
                return Err("attention's encoder layer reads no sequence".into());
            };
            let shape = vec![self.b, *len as usize, er.hidden as usize];
            self.memory = Some(self.g.add_input("memory", Type::f32(shape))?);
            if m.inputs.first().is_some_and(|v| v.padded) {
                self.source_ids = Some(self.g.add_input("source", Type::i32(vec![self.b, *len as usize]))?);
            }
        }
        let vars = vec![("prev".to_owned(), prev)];
        let mut cur = Value { node: state, state: Some(state), logits: None };
        if let Some(first) = layers.next() {
            cur = self.layer(m, first, cur, cfg, &vars)?;
        }
        for info in layers {
            if matches!(info.layer.kind, LayerKind::Recurrent(_)) {
                return Err("greedy decoding supports one recurrent layer in the decoder (the \
                            teacher-forced one)"
                    .into());
            }
            cur = self.layer(m, info, cur, cfg, &vars)?;
        }
        let next = self.decode_state.ok_or("the decode step has no state")?;
        self.g.outputs = vec![("recon".into(), cur.node), ("state".into(), next)];
        if let Some(alpha) = self.attention {
            self.g.outputs.push(("attention".into(), alpha));
        }
        Ok(self.g)
    }

    /// The decoder on its own (`Mode::Generate`): from an input `code` to `recon`.
    fn generate(mut self, m: &Model, cfg: &Lowering) -> Result<Graph, String> {
        if let Some(l) = m.decoder().find(|l| matches!(l.layer.kind, LayerKind::Unpool { .. })) {
            return Err(format!(
                "the decoder's `{}` puts values back through the encoder's pool switches: it cannot \
                 decode a code on its own (a decoder of deconvs or dense layers can)",
                l.layer
            ));
        }
        if teacher_forced(m).is_some() {
            return Err("the decoder is teacher-forced (it reads the target's tokens): it cannot decode \
                        a code on its own"
                .into());
        }
        let Ty::Tensor(_) = m.code else {
            return Err(format!("the code is {}, not a tensor: nothing to decode from", m.code));
        };
        let code = self.g.add_input("code", self.batched(&m.code))?;
        self.conditions(m)?;
        let vars = vec![("code".to_owned(), code)];
        let mut cur = Value { node: code, state: None, logits: None };
        for info in m.decoder() {
            if let LayerKind::Link { from, .. } = &info.layer.kind
                && !self.named.iter().any(|(n, _)| *n == from.name)
            {
                return Err(format!(
                    "the decoder's `{}` reads the encoder's `{}`: it cannot decode a code on its own \
                     (a decoder without links across the hourglass can)",
                    info.layer, from.name
                ));
            }
            cur = self.layer(m, info, cur, cfg, &vars)?;
            self.name(info, cur.node);
        }
        self.g.outputs = vec![("recon".into(), cur.node)];
        Ok(self.g)
    }

    /// The conditions as graph inputs (after the others), each named for the layers that join
    /// it: a class as its one-hot vector, a vector as it is.
    fn conditions(&mut self, m: &Model) -> Result<(), String> {
        for v in &m.conditions {
            let input = self.g.add_input(v.name.clone(), self.batched(&v.ty))?;
            let joined = match v.ty {
                Ty::Token { vocab } => {
                    self.g.add(Op::OneHot { ids: input, depth: vocab as usize }, Some(v.span))?
                }
                _ => input,
            };
            self.named.push((v.name.clone(), joined));
        }
        Ok(())
    }

    fn batched(&self, ty: &Ty) -> Type {
        let mut shape = vec![self.b];
        match ty {
            Ty::Tensor(d) => {
                shape.extend(d.iter().map(|&x| x as usize));
                Type::f32(shape)
            }
            Ty::Token { .. } => Type::i32(shape),
            Ty::Tokens { len, .. } => {
                shape.push(*len as usize);
                Type::i32(shape)
            }
            Ty::Seq { len, dim } => {
                shape.extend([*len as usize, *dim as usize]);
                Type::f32(shape)
            }
        }
    }

    fn add(&mut self, op: Op, span: Span) -> Result<NodeId, String> {
        self.g.add(op, Some(span))
    }

    /// Records the output of a named layer.
    fn name(&mut self, info: &LayerInfo, node: NodeId) {
        if let Some(n) = info.layer.output_name() {
            self.named.push((n.name.clone(), node));
        }
    }

    /// Batch normalization: batch statistics and the running estimates' update in training;
    /// the running statistics otherwise, folded into the convolution before it when they can.
    fn batch_norm(
        &mut self,
        info: &LayerInfo,
        x: NodeId,
        (momentum, eps): (f64, f64),
        mode: Mode,
    ) -> Result<NodeId, String> {
        let span = info.layer.span;
        let eps = eps as f32;
        let [gamma, beta, mean, var, count] =
            [0, 1, 2, 3, 4].map(|k| info.params.get(k).copied().ok_or("batchnorm parameter missing"));
        let (gamma, beta) = (self.params[gamma?], self.params[beta?]);
        let (mean, var, count) = (mean?, var?, count?);
        if mode != Mode::Train {
            let (rm, rv) = (self.params[mean], self.params[var]);
            let coeffs = self.add(Op::BnCoeffs { mean: rm, var: rv, gamma, beta, eps }, span)?;
            if let Some(y) = self.fold(x, coeffs, span)? {
                return Ok(y);
            }
            return self.add(Op::ChannelAffine { x, coeffs, axis: 1, shift: true }, span);
        }
        let shape = self.g.ty(x).shape.clone();
        let c = shape[1];
        let n = shape.iter().product::<usize>() / c;
        if n < 2 {
            return Err(format!(
                "`{}` needs more than one value per channel in training, and a batch of {} {} has one \
                 (PyTorch refuses it too): use batches of at least 2",
                info.layer, self.b, info.input
            ));
        }
        let stats = self.add(Op::BnStats { x }, span)?;
        let y = self.add(Op::BatchNorm { x, stats, gamma, beta, eps }, span)?;
        // The running estimates, as PyTorch: r ← (1 − m)·r + m·s with the unbiased variance,
        // written as the running update r ← r − m·(r − s); the batch count by r ← r + 1 (a rate
        // of −1 on a gradient of 1).
        let running = |rate: f64| OptimizerFn::Running { rate: rate as f32 };
        let batch_mean = self.add(Op::Part { x: stats, offset: 0, shape: vec![c] }, span)?;
        let batch_var = self.add(Op::Part { x: stats, offset: c, shape: vec![c] }, span)?;
        let unbiased = self.add(Op::Scale { x: batch_var, c: (n as f64 / (n - 1) as f64) as f32 }, span)?;
        for (p, stat) in [(mean, batch_mean), (var, unbiased)] {
            let grad = self.add(Op::Binary { f: BinaryFn::Sub, a: self.params[p], b: stat }, span)?;
            self.add(
                Op::Update { f: running(momentum), clip: Clip::None, param: ParamId(p as u32), grad },
                span,
            )?;
        }
        let one = self.add(Op::Fill { value: 1.0, shape: vec![] }, span)?;
        self.add(
            Op::Update { f: running(-1.0), clip: Clip::None, param: ParamId(count as u32), grad: one },
            span,
        )?;
        Ok(y)
    }

    /// Folds fixed normalization coefficients into the convolution (and bias) that computed
    /// `x`, as `torch.nn.utils.fusion.fuse_conv_bn_eval`: `w' = w·scale` per output channel,
    /// `b' = b·scale + shift`. `None` when `x` is not a convolution's output used only here.
    fn fold(&mut self, x: NodeId, coeffs: NodeId, span: Span) -> Result<Option<NodeId>, String> {
        let (conv, bias) = match self.g.node(x).op {
            Op::BiasAdd { x: c, bias } => (c, Some(bias)),
            _ => (x, None),
        };
        let (axis, w) = match self.g.node(conv).op {
            Op::Conv2d { w, .. } => (0, w),
            Op::ConvTranspose2d { w, .. } => (1, w),
            _ => return Ok(None),
        };
        let used_elsewhere = self.named.iter().any(|(_, id)| *id == x || *id == conv)
            || self.g.nodes().iter().any(|n| {
                let ops = n.op.operands();
                ops.contains(&x)
                    || (bias.is_some()
                        && ops.contains(&conv)
                        && !matches!(n.op, Op::BiasAdd { x: c, .. } if c == conv))
            });
        if used_elsewhere {
            return Ok(None);
        }
        let w = self.add(Op::ChannelAffine { x: w, coeffs, axis, shift: false }, span)?;
        let mut op = self.g.node(conv).op.clone();
        if let Op::Conv2d { w: ref mut slot, .. } | Op::ConvTranspose2d { w: ref mut slot, .. } = op {
            *slot = w;
        }
        let y = self.add(op, span)?;
        let c = self.g.ty(y).shape[1];
        let bias = match bias {
            Some(b) => self.add(Op::ChannelAffine { x: b, coeffs, axis: 0, shift: true }, span)?,
            None => self.add(Op::Part { x: coeffs, offset: c, shape: vec![c] }, span)?,
        };
        Ok(Some(self.add(Op::BiasAdd { x: y, bias }, span)?))
    }

    fn param(&self, info: &LayerInfo, k: usize) -> Result<NodeId, String> {
        let p = info.params.get(k).ok_or_else(|| format!("{}: parameter {k} missing", info.layer))?;
        Ok(self.params[*p])
    }

    fn layer(
        &mut self,
        m: &Model,
        info: &LayerInfo,
        v: Value,
        cfg: &Lowering,
        vars: &[(String, NodeId)],
    ) -> Result<Value, String> {
        let span = info.layer.span;
        let x = v.node;
        let mut state = None;
        let node = match &info.layer.kind {
            LayerKind::Dense { bias, .. } => {
                let (w, k) = match info.tied_weight {
                    Some(p) => (self.params[p], 0),
                    None => (self.param(info, 0)?, 1),
                };
                let tb = info.tied_weight.is_none();
                let shape = self.g.ty(x).shape.clone();
                let flat = if shape.len() == 3 {
                    self.add(Op::Reshape { x, shape: vec![shape[0] * shape[1], shape[2]] }, span)?
                } else {
                    x
                };
                let mut y = self.add(Op::MatMul { a: flat, b: w, ta: false, tb }, span)?;
                if *bias {
                    let bias = self.param(info, k)?;
                    y = self.add(Op::BiasAdd { x: y, bias }, span)?;
                }
                if shape.len() == 3 {
                    let n = self.g.ty(y).shape[1];
                    y = self.add(Op::Reshape { x: y, shape: vec![shape[0], shape[1], n] }, span)?;
                }
                y
            }
            LayerKind::Conv(c) | LayerKind::Deconv(c) => {
                let (w, k) = match info.tied_weight {
                    Some(p) => (self.params[p], 0),
                    None => (self.param(info, 0)?, 1),
                };
                let [stride, pad, out_pad] = [c.stride, c.pad, c.out_pad].map(|a| a.map(|n| n as usize));
                let op = if matches!(info.layer.kind, LayerKind::Conv(_)) {
                    Op::Conv2d { x, w, stride, pad }
                } else {
                    Op::ConvTranspose2d { x, w, stride, pad, out_pad }
                };
                let mut y = self.add(op, span)?;
                if c.bias {
                    let bias = self.param(info, k)?;
                    y = self.add(Op::BiasAdd { x: y, bias }, span)?;
                }
                y
            }
            LayerKind::MaxPool(p) => {
                let [kernel, stride] = [p.kernel, p.stride].map(|a| a.map(|n| n as usize));
                let idx = self.add(Op::PoolArgmax { x, kernel, stride }, span)?;
                if let Some(n) = &p.name {
                    let s = &self.g.ty(x).shape;
                    self.pools.push((n.name.clone(), idx, s[2], s[3]));
                }
                self.add(Op::Gather { x, idx }, span)?
            }
            LayerKind::AvgPool(p) => {
                let [kernel, stride] = [p.kernel, p.stride].map(|a| a.map(|n| n as usize));
                self.add(Op::AvgPool { x, kernel, stride }, span)?
            }
            LayerKind::Unpool { pool } => {
                let &(_, idx, height, width) = self
                    .pools
                    .iter()
                    .find(|p| p.0 == pool.name)
                    .ok_or_else(|| format!("pool {} not lowered", pool.name))?;
                self.add(Op::Scatter { v: x, idx, height, width, accumulate: false }, span)?
            }
            LayerKind::Flatten | LayerKind::Reshape { .. } => {
                let shape = self.batched(&info.output).shape;
                self.add(Op::Reshape { x, shape }, span)?
            }
            LayerKind::Embed { .. } => {
                let table = self.param(info, 0)?;
                self.add(Op::Embed { table, ids: x }, span)?
            }
            LayerKind::Dropout { p } => match cfg.mode {
                Mode::Train if *p > 0.0 => {
                    self.salt += 1;
                    self.add(Op::Dropout { x, p: *p as f32, salt: self.salt }, span)?
                }
                _ => x,
            },
            LayerKind::Activation(a) => return self.activation(a, Value { state: None, ..v }),
            LayerKind::Gaussian { .. } => {
                // Two affine heads; the code is mu + exp(logvar / 2)·ε in training, else mu.
                let mut heads = [x; 2];
                for (k, head) in heads.iter_mut().enumerate() {
                    let (w, bias) = (self.param(info, 2 * k)?, self.param(info, 2 * k + 1)?);
                    let y = self.add(Op::MatMul { a: x, b: w, ta: false, tb: true }, span)?;
                    *head = self.add(Op::BiasAdd { x: y, bias }, span)?;
                }
                let [mu, logvar] = heads;
                self.gaussian = Some((mu, logvar));
                match cfg.mode {
                    Mode::Train => {
                        self.salt += 1;
                        let shape = self.g.ty(mu).shape.clone();
                        let eps = self.add(Op::Normal { shape, salt: self.salt }, span)?;
                        let half = self.add(Op::Scale { x: logvar, c: 0.5 }, span)?;
                        let sd = self.add(Op::Unary { f: UnaryFn::Exp, x: half }, span)?;
                        let noise = self.add(Op::Binary { f: BinaryFn::Mul, a: sd, b: eps }, span)?;
                        self.add(Op::Binary { f: BinaryFn::Add, a: mu, b: noise }, span)?
                    }
                    _ => mu,
                }
            }
            LayerKind::Quantize { ema, .. } => self.quantize(info, x, *ema, cfg.mode)?,
            LayerKind::Recurrent(r) => {
                let (node, last) = self.recurrent(m, info, r, v, cfg, vars)?;
                state = Some(last);
                node
            }
            LayerKind::Attention { score } => {
                state = v.state;
                self.attention(info, *score, x)?
            }
            LayerKind::Link { link, from } => {
                let other = self
                    .named
                    .iter()
                    .rev()
                    .find(|(n, _)| *n == from.name)
                    .map(|(_, id)| *id)
                    .ok_or_else(|| format!("`{}` not lowered", from.name))?;
                match link {
                    ast::Link::Concat => self.add(Op::Concat { a: x, b: other }, span)?,
                    ast::Link::Add => self.add(Op::Binary { f: BinaryFn::Add, a: x, b: other }, span)?,
                }
            }
            LayerKind::BatchNorm { momentum, eps } => {
                self.batch_norm(info, x, (*momentum, *eps), cfg.mode)?
            }
            LayerKind::Upsample { scale, bilinear } => {
                let scale = scale.map(|s| s as usize);
                self.add(Op::Upsample { x, scale, bilinear: *bilinear }, span)?
            }
        };
        let mut out = Value { node, state, logits: None };
        for a in &info.layer.activations {
            out = self.activation(a, out)?;
        }
        Ok(out)
    }

    fn activation(&mut self, a: &ast::Activation, v: Value) -> Result<Value, String> {
        let x = v.node;
        let f = match a.kind {
            ActKind::Identity => return Ok(v),
            ActKind::Softmax => {
                let node = self.add(Op::Softmax { x }, a.span)?;
                return Ok(Value { node, state: v.state, logits: Some(x) });
            }
            ActKind::Relu => UnaryFn::Relu,
            ActKind::Sigmoid => UnaryFn::Sigmoid,
            ActKind::Tanh => UnaryFn::Tanh,
            ActKind::LeakyRelu(s) => UnaryFn::LeakyRelu(s as f32),
        };
        let node = self.add(Op::Unary { f, x }, a.span)?;
        Ok(Value { node, state: v.state, logits: None })
    }

    /// A recurrent layer: the value it passes on and its last state.
    fn recurrent(
        &mut self,
        m: &Model,
        info: &LayerInfo,
        r: &ast::RecurrentSpec,
        v: Value,
        cfg: &Lowering,
        vars: &[(String, NodeId)],
    ) -> Result<(NodeId, NodeId), String> {
        let span = info.layer.span;
        let h = r.hidden as usize;
        let s = if r.cell == Cell::Lstm { 2 * h } else { h };
        let (xs, h0) = match (info.part, r.teacher_forcing) {
            (Part::Decoder, true) if cfg.mode == Mode::Decode => {
                let prev = vars.first().map(|v| v.1).ok_or("decode step without `prev`")?;
                let vocab = m.loss_target().map_or(Ok(0), |t| match t.ty {
                    Ty::Tokens { vocab, .. } => Ok(vocab),
                    _ => Err("teacher forcing needs token targets"),
                })?;
                let xs = self.add(Op::OneHot { ids: prev, depth: vocab as usize + 1 }, span)?;
                (xs, v.state.unwrap_or(v.node))
            }
            (Part::Decoder, true) => {
                let target = m.loss_target().ok_or("teacher forcing without a target")?;
                let Ty::Tokens { vocab, .. } = target.ty else {
                    return Err("teacher forcing needs token targets".into());
                };
                let ids =
                    vars.iter().find(|(n, _)| *n == target.name).map(|v| v.1).ok_or("target missing")?;
                let shifted = self.add(Op::ShiftRight { ids, start: vocab as i32 }, span)?;
                let xs = self.add(Op::OneHot { ids: shifted, depth: vocab as usize + 1 }, span)?;
                (xs, v.state.unwrap_or(v.node))
            }
            (Part::Decoder, false) if self.g.ty(v.node).shape.len() == 2 => {
                let Ty::Seq { len, .. } = info.output else {
                    return Err("decoder recurrent output".into());
                };
                let xs = self.add(Op::Repeat { x: v.node, times: len as usize }, span)?;
                let h0 = self.add(Op::Fill { value: 0.0, shape: vec![self.b, s] }, span)?;
                (xs, h0)
            }
            _ => {
                let h0 = self.add(Op::Fill { value: 0.0, shape: vec![self.b, s] }, span)?;
                (v.node, h0)
            }
        };
        let (w_ih, w_hh) = (self.param(info, 0)?, self.param(info, 1)?);
        let (b_ih, b_hh) =
            if r.bias { (Some(self.param(info, 2)?), Some(self.param(info, 3)?)) } else { (None, None) };
        // The input projection of every step at once (one matmul), then the time loop.
        let [b, t, i] = <[usize; 3]>::try_from(self.g.ty(xs).shape.as_slice())
            .map_err(|_| "recurrent input must be [B, T, I]".to_string())?;
        // The projections before the bias, and the ids they are gathered by when they are a
        // table's rows (else they are every token's, in order).
        let (proj, ids) = match self.g.node(xs).op {
            // Tokens through an embedding whose table has at most half as many rows as the
            // batch has tokens: each table row is projected once (`table·W_ihᵀ + b_ih`) and the
            // projections are gathered by id — the same sums for every element, V·I·G·H
            // multiply-adds instead of B·T·I·G·H, and the gradients through the table alike.
            Op::Embed { table, ids } if 2 * self.g.ty(table).shape[0] <= b * t => {
                (self.add(Op::MatMul { a: table, b: w_ih, ta: false, tb: true }, span)?, Some(ids))
            }
            // A teacher-forced decoder's previous tokens, one-hot: the product picks column
            // `id` of W_ih, so the table is W_ihᵀ (+ b_ih) and the projections are gathered
            // by id alike (the same sums: every product by a one-hot is a single term).
            Op::OneHot { ids, depth } if 2 * depth <= b * t => {
                let gh = self.g.ty(w_ih).shape[0];
                let w = self.add(Op::Reshape { x: w_ih, shape: vec![1, gh, depth] }, span)?;
                let w = self.add(Op::Transpose { x: w }, span)?;
                (self.add(Op::Reshape { x: w, shape: vec![depth, gh] }, span)?, Some(ids))
            }
            _ => {
                let flat = self.add(Op::Reshape { x: xs, shape: vec![b * t, i] }, span)?;
                (self.add(Op::MatMul { a: flat, b: w_ih, ta: false, tb: true }, span)?, None)
            }
        };
        let proj = match b_ih {
            Some(bias) => self.add(Op::BiasAdd { x: proj, bias }, span)?,
            None => proj,
        };
        let xp = match ids {
            Some(ids) => self.add(Op::Embed { table: proj, ids }, span)?,
            None => {
                let gh = self.g.ty(proj).shape[1];
                self.add(Op::Reshape { x: proj, shape: vec![b, t, gh] }, span)?
            }
        };
        let hs = self.add(Op::Recurrent { cell: ir_cell(r.cell), xp, h0, w_hh, b_hh }, span)?;
        // A padded source's sentences end before their padding: the state there, as PyTorch's
        // packed sequences give it (the steps before it never see the padding).
        let padded =
            self.source_ids.filter(|&ids| info.part == Part::Encoder && self.g.ty(ids).shape == [b, t]);
        let last = match padded {
            Some(ids) => self.add(Op::LastReal { x: hs, ids }, span)?,
            None => self.add(Op::LastStep { x: hs }, span)?,
        };
        if r.teacher_forcing {
            self.decode_state = Some(last);
        }
        if info.part == Part::Encoder {
            self.memory = Some(match r.cell {
                Cell::Lstm => self.add(Op::SliceLast { x: hs, start: 0, len: h }, span)?,
                _ => hs,
            });
        }
        let seq_out = matches!(info.output, Ty::Seq { .. });
        let out = match (seq_out, r.cell) {
            (true, Cell::Lstm) => self.add(Op::SliceLast { x: hs, start: 0, len: h }, span)?,
            (true, _) => hs,
            (false, Cell::Lstm) => self.add(Op::SliceLast { x: last, start: 0, len: h }, span)?,
            (false, _) => last,
        };
        Ok((out, last))
    }

    /// Global attention of the decoder's states `d [B, T, H]` over the encoder's (`memory`), as
    /// `kind::Attention` says.
    fn attention(&mut self, info: &LayerInfo, score: Score, d: NodeId) -> Result<NodeId, String> {
        let span = info.layer.span;
        let memory = self.memory.ok_or("attention without the encoder's states")?;
        let [b, s, he] =
            <[usize; 3]>::try_from(self.g.ty(memory).shape.as_slice()).map_err(|_| "memory shape")?;
        let [_, t, h] =
            <[usize; 3]>::try_from(self.g.ty(d).shape.as_slice()).map_err(|_| "attention input shape")?;
        // x [rows, k] · wᵀ, as [B, n, width].
        let project = |lw: &mut Self, x: NodeId, rows: usize, k: usize, w: NodeId| {
            let width = lw.g.ty(w).shape[0];
            let flat = lw.add(Op::Reshape { x, shape: vec![b * rows, k] }, span)?;
            let y = lw.add(Op::MatMul { a: flat, b: w, ta: false, tb: true }, span)?;
            lw.add(Op::Reshape { x: y, shape: vec![b, rows, width] }, span)
        };
        let scores = match score {
            Score::Dot => self.add(Op::BatchMatMul { a: d, b: memory, ta: false, tb: true }, span)?,
            Score::General => {
                let w = self.param(info, 0)?;
                let keys = project(self, memory, s, he, w)?;
                self.add(Op::BatchMatMul { a: d, b: keys, ta: false, tb: true }, span)?
            }
            Score::Additive => {
                let (wq, wk, v) = (self.param(info, 0)?, self.param(info, 1)?, self.param(info, 2)?);
                let q = project(self, d, t, h, wq)?;
                let k = project(self, memory, s, he, wk)?;
                let pairs = self.add(Op::AddPairs { q, k }, span)?;
                let e = self.add(Op::Unary { f: UnaryFn::Tanh, x: pairs }, span)?;
                let e = project(self, e, t * s, h, v)?;
                self.add(Op::Reshape { x: e, shape: vec![b, t, s] }, span)?
            }
        };
        // Padding scores the lowest f32: a weight of exactly 0 after the softmax.
        let scores = match self.source_ids {
            Some(ids) => self.add(Op::MaskFill { x: scores, ids, value: f32::MIN }, span)?,
            None => scores,
        };
        let alpha = self.add(Op::Softmax { x: scores }, span)?;
        self.attention = Some(alpha);
        let context = self.add(Op::BatchMatMul { a: alpha, b: memory, ta: false, tb: false }, span)?;
        let c = self.add(Op::Reshape { x: context, shape: vec![b * t, he] }, span)?;
        let hd = self.add(Op::Reshape { x: d, shape: vec![b * t, h] }, span)?;
        let cat = self.add(Op::Concat { a: c, b: hd }, span)?;
        let k = score.params();
        let (wc, bc) = (self.param(info, k)?, self.param(info, k + 1)?);
        let y = self.add(Op::MatMul { a: cat, b: wc, ta: false, tb: true }, span)?;
        let y = self.add(Op::BiasAdd { x: y, bias: bc }, span)?;
        let y = self.add(Op::Unary { f: UnaryFn::Tanh, x: y }, span)?;
        self.add(Op::Reshape { x: y, shape: vec![b, t, h] }, span)
    }

    fn loss(
        &mut self,
        m: &Model,
        out: &Value,
        code: NodeId,
        cfg: &Lowering,
        vars: &mut Vec<(String, NodeId)>,
    ) -> Result<NodeId, String> {
        let main = &m.loss.main;
        let span = main.span;
        let target_var = m.loss_target().ok_or("loss target missing")?;
        let input_name = m.inputs.first().map(|v| v.name.as_str());
        let target = if cfg.denoise && Some(target_var.name.as_str()) == input_name {
            let name = format!("{}.clean", target_var.name);
            let ty = self.batched(&target_var.ty);
            let id = self.g.add_input(name.clone(), ty)?;
            vars.push((name, id));
            id
        } else {
            vars.iter().find(|(n, _)| *n == target_var.name).map(|v| v.1).ok_or("target missing")?
        };
        let (f, pred) = match main.kind {
            LossKind::Mse => (LossFn::Mse, out.node),
            LossKind::L1 => (LossFn::L1, out.node),
            LossKind::Bce => (LossFn::Bce, out.node),
            LossKind::CrossEntropy => {
                (LossFn::CrossEntropyLogits { pad: target_var.padded }, out.logits.unwrap_or(out.node))
            }
            LossKind::L2 | LossKind::Kl | LossKind::Sparsity | LossKind::Contractive | LossKind::Vq => {
                return Err("the first loss term is a reconstruction loss".into());
            }
        };
        let mean = self.add(Op::Loss { f, pred, target }, span)?;
        // The loss op is the mean over its terms: one per element, or one per token (the
        // class axis is summed) for cross-entropy.
        let ps = &self.g.ty(pred).shape;
        let count = match f {
            LossFn::CrossEntropyLogits { .. } => ps[..ps.len() - 1].iter().product::<usize>(),
            _ => ps.iter().product(),
        } as f64;
        let factor = match main.reduction() {
            Reduction::Mean => 1.0,
            Reduction::Sum => count * self.sum_scale,
            Reduction::BatchMean => count / self.b as f64,
        };
        let mut total = self.scaled(mean, main.weight * factor, span)?;
        self.terms.push((main.kind.keyword().to_owned(), total));
        for t in &m.loss.extra {
            let term = match (t.kind, t.arg.name.as_str()) {
                (LossKind::Kl, _) => self.kl(t)?,
                (LossKind::Sparsity, _) => self.sparsity(t, code)?,
                (LossKind::Contractive, _) => self.contractive(m, t, code)?,
                (LossKind::Vq, _) => self.vq(t)?,
                (_, "weights") => {
                    // λ·Σ over every weight (not biases) of w² (or |w|); an embedding table is
                    // a weight, as in a PyTorch sum over the module's weight tensors.
                    let f = if t.kind == LossKind::L2 { UnaryFn::Square } else { UnaryFn::Abs };
                    let weights: Vec<NodeId> = m
                        .params
                        .iter()
                        .enumerate()
                        .filter(|(_, p)| matches!(p.role, ParamRole::Weight | ParamRole::Embedding))
                        .map(|(i, _)| self.params[i])
                        .collect();
                    let mut acc: Option<NodeId> = None;
                    for w in weights {
                        let e = self.add(Op::Unary { f, x: w }, t.span)?;
                        let s = self.add(Op::SumAll { x: e }, t.span)?;
                        acc = Some(match acc {
                            Some(a) => self.add(Op::Binary { f: BinaryFn::Add, a, b: s }, t.span)?,
                            None => s,
                        });
                    }
                    let Some(acc) = acc else { continue };
                    self.add(Op::Scale { x: acc, c: t.weight as f32 }, t.span)?
                }
                _ => {
                    // λ·(reduced) c² (or |c|) over the code: by default its mean.
                    let f = if t.kind == LossKind::L2 { UnaryFn::Square } else { UnaryFn::Abs };
                    let e = self.add(Op::Unary { f, x: code }, t.span)?;
                    let s = self.add(Op::SumAll { x: e }, t.span)?;
                    let div = self.divisor(t.reduction(), self.g.ty(code).numel());
                    self.add(Op::Scale { x: s, c: (t.weight / div) as f32 }, t.span)?
                }
            };
            let name = t.name();
            // A scheduled weight is an input the runtime sets before each step.
            let term = if t.schedule.is_some() {
                let w = self.g.add_input(format!("{WEIGHT_PREFIX}{name}"), Type::f32(Vec::<usize>::new()))?;
                self.add(Op::Binary { f: BinaryFn::Mul, a: term, b: w }, t.span)?
            } else {
                term
            };
            self.terms.push((name, term));
            total = self.add(Op::Binary { f: BinaryFn::Add, a: total, b: term }, t.span)?;
        }
        Ok(total)
    }

    /// `x · c`, or `x` itself when `c` is 1.
    fn scaled(&mut self, x: NodeId, c: f64, span: Span) -> Result<NodeId, String> {
        if c == 1.0 { Ok(x) } else { self.add(Op::Scale { x, c: c as f32 }, span) }
    }

    /// What a sum over `n` elements (a batch of them) is divided by under `r`.
    fn divisor(&self, r: Reduction, n: usize) -> f64 {
        match r {
            Reduction::Mean => n as f64,
            Reduction::Sum => 1.0 / self.sum_scale,
            Reduction::BatchMean => self.b as f64,
        }
    }

    /// The code as `[B, n]` and `ones[1, B]`, whose product with it sums over the batch.
    fn batch_sums(&mut self, code: NodeId, span: Span) -> Result<(NodeId, NodeId), String> {
        let b = self.g.ty(code).shape[0];
        let n = self.g.ty(code).numel() / b.max(1);
        let flat = self.add(Op::Reshape { x: code, shape: vec![b, n] }, span)?;
        let ones = self.add(Op::Fill { value: 1.0, shape: vec![1, b] }, span)?;
        Ok((flat, ones))
    }

    /// `λ·sparsity(code, rho: ρ)`: Σⱼ KL(ρ ‖ ρ̂ⱼ) over the code's n units, ρ̂ⱼ the unit's mean
    /// over the batch. KL(ρ ‖ p) = BCE(p, ρ) − H(ρ), so it is n·(the mean BCE of ρ̂ against ρ,
    /// each log clamped at −100 as PyTorch's) − n·H(ρ).
    fn sparsity(&mut self, t: &ast::LossTerm, code: NodeId) -> Result<NodeId, String> {
        let span = t.span;
        let (flat, ones) = self.batch_sums(code, span)?;
        let [b, n] = [self.g.ty(flat).shape[0], self.g.ty(flat).shape[1]];
        let sums = self.add(Op::MatMul { a: ones, b: flat, ta: false, tb: false }, span)?;
        let rate = self.add(Op::Scale { x: sums, c: 1.0 / b as f32 }, span)?;
        let rho = t.rho();
        let target = self.add(Op::Fill { value: rho as f32, shape: vec![1, n] }, span)?;
        let bce = self.add(Op::Loss { f: LossFn::Bce, pred: rate, target }, span)?;
        let entropy = -(rho * rho.ln() + (1.0 - rho) * (1.0 - rho).ln());
        let scaled = self.add(Op::Scale { x: bce, c: (t.weight * n as f64) as f32 }, span)?;
        let constant =
            self.add(Op::Fill { value: (-t.weight * n as f64 * entropy) as f32, shape: vec![] }, span)?;
        self.add(Op::Binary { f: BinaryFn::Add, a: scaled, b: constant }, span)
    }

    /// `λ·contractive(code)` of an encoder h = f(W x + b), f a sigmoid or tanh: ‖∂h/∂x‖²_F =
    /// Σᵢ f′ᵢ² Σⱼ Wᵢⱼ², with f′ = h(1 − h) or 1 − h²; summed over the batch, reduced (by
    /// default ÷ the batch).
    fn contractive(&mut self, m: &Model, t: &ast::LossTerm, code: NodeId) -> Result<NodeId, String> {
        let span = t.span;
        let layer = m
            .encoder()
            .find(|l| matches!(l.layer.kind, LayerKind::Dense { .. }))
            .ok_or("contractive(code) without a dense encoder layer")?;
        let tanh = layer.layer.activations.last().is_some_and(|a| a.kind == ActKind::Tanh);
        let w = m
            .params
            .iter()
            .position(|p| p.role == ParamRole::Weight && p.name == format!("encoder.{}.weight", layer.index))
            .map(|i| self.params[i])
            .ok_or("contractive(code) without the encoder's weight")?;
        let (flat, ones) = self.batch_sums(code, span)?;
        let sq = self.add(Op::Unary { f: UnaryFn::Square, x: flat }, span)?;
        let slope = if tanh {
            let shape = self.g.ty(flat).shape.clone();
            let one = self.add(Op::Fill { value: 1.0, shape }, span)?;
            self.add(Op::Binary { f: BinaryFn::Sub, a: one, b: sq }, span)?
        } else {
            self.add(Op::Binary { f: BinaryFn::Sub, a: flat, b: sq }, span)?
        };
        let slope2 = self.add(Op::Unary { f: UnaryFn::Square, x: slope }, span)?;
        let per_unit = self.add(Op::MatMul { a: ones, b: slope2, ta: false, tb: false }, span)?;
        let w2 = self.add(Op::Unary { f: UnaryFn::Square, x: w }, span)?;
        let inputs = self.g.ty(w).shape[1];
        let column = self.add(Op::Fill { value: 1.0, shape: vec![inputs, 1] }, span)?;
        let rows = self.add(Op::MatMul { a: w2, b: column, ta: false, tb: false }, span)?;
        let total = self.add(Op::MatMul { a: per_unit, b: rows, ta: false, tb: false }, span)?;
        let total = self.add(Op::SumAll { x: total }, span)?;
        let div = self.divisor(t.reduction(), self.g.ty(code).numel());
        self.add(Op::Scale { x: total, c: (t.weight / div) as f32 }, span)
    }

    /// A VQ-VAE's quantizer: each vector of `z` (an image's channels at each position) replaced
    /// by its nearest codebook row. In training the code is `z + sg(z_q − z)`: `z_q`'s value,
    /// with the decoder's gradient passed straight through to `z` and none to the codebook.
    fn quantize(
        &mut self,
        info: &LayerInfo,
        z: NodeId,
        ema: Option<f64>,
        mode: Mode,
    ) -> Result<NodeId, String> {
        let span = info.layer.span;
        let codebook = self.param(info, 0)?;
        let shape = self.g.ty(z).shape.clone();
        let (b, d) = (shape[0], shape[1]);
        let positions = shape[2..].iter().product::<usize>();
        // Channels last: `[B, P, D]`.
        let rows = if positions == 1 {
            self.add(Op::Reshape { x: z, shape: vec![b, 1, d] }, span)?
        } else {
            let planes = self.add(Op::Reshape { x: z, shape: vec![b, d, positions] }, span)?;
            self.add(Op::Transpose { x: planes }, span)?
        };
        let ids = self.add(Op::Nearest { x: rows, codebook }, span)?;
        let picked = self.add(Op::Embed { table: codebook, ids }, span)?;
        let zq = if positions == 1 {
            self.add(Op::Reshape { x: picked, shape: shape.clone() }, span)?
        } else {
            let planes = self.add(Op::Transpose { x: picked }, span)?;
            self.add(Op::Reshape { x: planes, shape: shape.clone() }, span)?
        };
        let ids_out =
            if positions == 1 { self.add(Op::Reshape { x: ids, shape: vec![b] }, span)? } else { ids };
        self.quantized = Some(Quantized { z, zq, ids: ids_out, ema: ema.is_some() });
        if mode != Mode::Train {
            return Ok(zq);
        }
        if let Some(decay) = ema {
            self.ema_codebook(info, (rows, ids), decay)?;
        }
        let step = self.add(Op::Binary { f: BinaryFn::Sub, a: zq, b: z }, span)?;
        let step = self.add(Op::StopGrad { x: step }, span)?;
        self.add(Op::Binary { f: BinaryFn::Add, a: z, b: step }, span)
    }

    /// The moving-average codebook (van den Oord et al. 2017, appendix A.1), as the training
    /// step's own updates: with n_k the rows that picked entry k and s_k their sum,
    /// count ← count − (1−γ)(count − n), sum ← sum − (1−γ)(sum − s), and each entry the mean
    /// sum_k / count̃_k, with count̃ = (count + ε)/(Σcount + Kε)·Σcount (Laplace smoothing,
    /// ε = 1e-5, so an entry never picked sits at the origin rather than at 0/0).
    fn ema_codebook(
        &mut self,
        info: &LayerInfo,
        (rows, ids): (NodeId, NodeId),
        decay: f64,
    ) -> Result<(), String> {
        const EPS: f32 = 1e-5;
        let span = info.layer.span;
        let ids_of = |k: usize| info.params.get(k).copied().ok_or("quantizer buffer missing");
        let (book, count, sum) = (ids_of(0)?, ids_of(1)?, ids_of(2)?);
        let [k, d] = [self.g.params[book].shape[0], self.g.params[book].shape[1]];
        let rate = (1.0 - decay) as f32;
        let shape = self.g.ty(rows).shape.clone();
        let ones = self.add(Op::Fill { value: 1.0, shape: vec![shape[0], shape[1], 1] }, span)?;
        let picked = self.add(Op::EmbedGrad { ids, dy: ones, vocab: k }, span)?;
        let picked = self.add(Op::Reshape { x: picked, shape: vec![k] }, span)?;
        let sums = self.add(Op::EmbedGrad { ids, dy: rows, vocab: k }, span)?;
        // Each average's update, and its value after it (the same arithmetic as the update's).
        let mut moved = [picked; 2];
        for (slot, (p, batch)) in moved.iter_mut().zip([(count, picked), (sum, sums)]) {
            let old = self.params[p];
            let grad = self.add(Op::Binary { f: BinaryFn::Sub, a: old, b: batch }, span)?;
            let f = OptimizerFn::Running { rate };
            self.add(Op::Update { f, clip: Clip::None, param: ParamId(p as u32), grad }, span)?;
            let step = self.add(Op::Scale { x: grad, c: rate }, span)?;
            *slot = self.add(Op::Binary { f: BinaryFn::Sub, a: old, b: step }, span)?;
        }
        let [count_now, sum_now] = moved;
        let total = self.add(Op::SumAll { x: count_now }, span)?;
        let eps = self.add(Op::Fill { value: EPS, shape: vec![k] }, span)?;
        let num = self.add(Op::Binary { f: BinaryFn::Add, a: count_now, b: eps }, span)?;
        let k_eps = self.add(Op::Fill { value: EPS * k as f32, shape: vec![] }, span)?;
        let den = self.add(Op::Binary { f: BinaryFn::Add, a: total, b: k_eps }, span)?;
        let ratio = self.add(Op::Binary { f: BinaryFn::Div, a: total, b: den }, span)?;
        let ratio = self.add(Op::BroadcastScalar { x: ratio, shape: vec![k] }, span)?;
        let smoothed = self.add(Op::Binary { f: BinaryFn::Mul, a: num, b: ratio }, span)?;
        // Each entry's count along its row: [K, 1]·ones[1, D] (one product per element: exact).
        let column = self.add(Op::Reshape { x: smoothed, shape: vec![k, 1] }, span)?;
        let across = self.add(Op::Fill { value: 1.0, shape: vec![1, d] }, span)?;
        let wide = self.add(Op::MatMul { a: column, b: across, ta: false, tb: false }, span)?;
        let means = self.add(Op::Binary { f: BinaryFn::Div, a: sum_now, b: wide }, span)?;
        let grad = self.add(Op::Binary { f: BinaryFn::Sub, a: self.params[book], b: means }, span)?;
        let f = OptimizerFn::Running { rate: 1.0 };
        self.add(Op::Update { f, clip: Clip::None, param: ParamId(book as u32), grad }, span)?;
        Ok(())
    }

    /// `λ·vq(code, beta: β)`: the codebook loss mean((z_q − sg(z))²), which moves the codebook
    /// toward the encoder's outputs, plus β·mean((z − sg(z_q))²), the commitment loss, which
    /// keeps the encoder near its codebook vectors.
    fn vq(&mut self, t: &ast::LossTerm) -> Result<NodeId, String> {
        let Quantized { z, zq, ema, .. } = self.quantized.ok_or("vq(code) without a quantized code")?;
        let span = t.span;
        let zq_sg = self.add(Op::StopGrad { x: zq }, span)?;
        let commitment = self.add(Op::Loss { f: LossFn::Mse, pred: z, target: zq_sg }, span)?;
        let commitment = self.scaled(commitment, t.beta(), span)?;
        // A moving-average codebook has no loss of its own.
        if ema {
            return self.scaled(commitment, t.weight, span);
        }
        let z_sg = self.add(Op::StopGrad { x: z }, span)?;
        let codebook = self.add(Op::Loss { f: LossFn::Mse, pred: zq, target: z_sg }, span)?;
        let sum = self.add(Op::Binary { f: BinaryFn::Add, a: codebook, b: commitment }, span)?;
        self.scaled(sum, t.weight, span)
    }

    /// `λ·kl(code)`: −½ Σ (1 + logvar − mu² − e^logvar), reduced (by default ÷ the batch).
    fn kl(&mut self, t: &ast::LossTerm) -> Result<NodeId, String> {
        let (mu, logvar) = self.gaussian.ok_or("kl(code) without a Gaussian code")?;
        let span = t.span;
        let sq = self.add(Op::Unary { f: UnaryFn::Square, x: mu }, span)?;
        let d = self.add(Op::Binary { f: BinaryFn::Sub, a: logvar, b: sq }, span)?;
        let e = self.add(Op::Unary { f: UnaryFn::Exp, x: logvar }, span)?;
        let d = self.add(Op::Binary { f: BinaryFn::Sub, a: d, b: e }, span)?;
        let s = self.add(Op::SumAll { x: d }, span)?;
        // The 1 of every element, n of them, is a constant: −½·λ/div·(n + Σ…).
        let n = self.g.ty(mu).numel();
        let c = -0.5 * t.weight / self.divisor(t.reduction(), n);
        let scaled = self.add(Op::Scale { x: s, c: c as f32 }, span)?;
        let ones = self.add(Op::Fill { value: (c * n as f64) as f32, shape: vec![] }, span)?;
        self.add(Op::Binary { f: BinaryFn::Add, a: scaled, b: ones }, span)
    }
}

/// The IR's cell kind of the spec's.
fn ir_cell(c: Cell) -> crate::ir::Cell {
    match c {
        Cell::Rnn => crate::ir::Cell::Rnn,
        Cell::Gru => crate::ir::Cell::Gru,
        Cell::Lstm => crate::ir::Cell::Lstm,
    }
}
