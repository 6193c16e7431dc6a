//! The reference interpreter: evaluates any [`ir::Graph`] on plain buffers, one op at a time.
//!
//! It is written to be obviously correct, not fast: direct loops, sums in `f64` where an op
//! reduces, no fusion. It is the oracle every other executor is tested against. The only
//! concession to speed is splitting a matmul's output rows across threads, which does not change
//! any result (each element is computed by the same loop).
//!
//! Semantics are PyTorch's: see the op docs in `ir::op` and the losses and optimizers below.

use crate::diag::Span;
use crate::ir::{
    BinaryFn, Cell, Clip, DType, Graph, LossFn, NodeId, Op, OptimizerFn, UnaryFn, switch_weight,
};
use crate::state::State;
use std::fmt;

pub use crate::rng::{normal, uniform};
pub use crate::value::Buf;

/// Options of one evaluation.
#[derive(Clone, Copy, Debug)]
pub struct Options {
    /// The run's seed and the 1-based step: dropout masks are drawn from them.
    pub seed: u64,
    pub step: u64,
    pub threads: usize,
    /// Stop at the first op that produces NaN or ±inf.
    pub check_finite: bool,
    /// The learning rate of this step (a schedule's), instead of the optimizer's own.
    pub lr: Option<f64>,
}

impl Default for Options {
    fn default() -> Self {
        Options { seed: 0, step: 1, threads: 1, check_finite: true, lr: None }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum Error {
    /// An input's length does not match its declared type.
    BadInput {
        name: String,
        expected: usize,
        got: usize,
    },
    /// An op produced NaN or ±inf.
    NonFinite {
        node: NodeId,
        op: &'static str,
        span: Option<Span>,
    },
    /// A token id outside its vocabulary.
    BadId {
        id: i32,
        vocab: usize,
    },
    Unsupported(&'static str),
    /// The graph's values would not fit in the memory budget.
    Memory(String),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::BadInput { name, expected, got } => {
                write!(f, "input {name} has {got} values, the graph expects {expected}")
            }
            Error::NonFinite { node, op, .. } => {
                write!(f, "`{op}` (node %{}) produced NaN or infinity", node.0)
            }
            Error::BadId { id, vocab } => {
                write!(f, "token id {id} is outside the vocabulary 0..{vocab}")
            }
            Error::Unsupported(op) => write!(f, "the interpreter does not run `{op}` yet"),
            Error::Memory(what) => f.write_str(what),
        }
    }
}

/// Every node's value after an evaluation.
pub struct Values {
    bufs: Vec<Buf>,
}

impl Values {
    pub fn get(&self, id: NodeId) -> &Buf {
        &self.bufs[id.index()]
    }

    pub fn output<'a>(&'a self, g: &Graph, name: &str) -> Option<&'a Buf> {
        g.output(name).map(|id| self.get(id))
    }
}

/// Evaluates `g`. `inputs` are in `g.inputs` order; parameters and optimizer state are read
/// from, and `Update` ops write into, `state`.
pub fn run(g: &Graph, inputs: &[Buf], state: &mut State, opts: &Options) -> Result<Values, Error> {
    run_frozen(g, inputs, state, opts, None)
}

/// [`run`] with what the gradient does not see held at `frozen`'s values: the detached values
/// (`stop_grad`) and a quantizer's ids. The loss is then the surrogate whose exact gradient
/// the straight-through estimator is, so finite differences can check it (`aec check`).
pub fn run_frozen(
    g: &Graph,
    inputs: &[Buf],
    state: &mut State,
    opts: &Options,
    frozen: Option<&Values>,
) -> Result<Values, Error> {
    // The interpreter keeps every value of the step: estimated before the first is made.
    let bytes = g.nodes().iter().try_fold(0u64, |a, n| a.checked_add(4 * n.ty.numel() as u64));
    crate::memory::check(&format!("interpreting `{}`", g.name), bytes, "use a smaller --batch")
        .map_err(Error::Memory)?;
    let mut bufs: Vec<Buf> = Vec::with_capacity(g.len());
    // `clip norm`'s scale, found once every gradient exists (at the first clipped update).
    let mut scale = None;
    for id in g.ids() {
        let node = g.node(id);
        if let Op::Update { clip: Clip::Norm(_), .. } = node.op
            && scale.is_none()
        {
            scale = Some(clip_scale(g, &bufs));
        }
        let out = match (frozen, &node.op) {
            (Some(f), Op::StopGrad { .. } | Op::Nearest { .. }) => f.get(id).clone(),
            _ => eval(g, id, &bufs, inputs, state, (opts, scale.unwrap_or(1.0)))?,
        };
        if opts.check_finite
            && let Buf::F32(v) = &out
            && v.iter().any(|x| !x.is_finite())
        {
            return Err(Error::NonFinite { node: id, op: node.op.mnemonic(), span: g.span(id) });
        }
        bufs.push(out);
    }
    Ok(Values { bufs })
}

fn eval(
    g: &Graph,
    id: NodeId,
    bufs: &[Buf],
    inputs: &[Buf],
    state: &mut State,
    (opts, clip_scale): (&Options, f32),
) -> Result<Buf, Error> {
    let node = g.node(id);
    let shape = &node.ty.shape;
    let f = |n: NodeId| bufs[n.index()].f32();
    let ints = |n: NodeId| bufs[n.index()].i32();
    let sh = |n: NodeId| g.ty(n).shape.as_slice();
    let out = match &node.op {
        Op::Input(i) => {
            let b = inputs.get(i.index()).ok_or(Error::Unsupported("missing input"))?;
            let expected = node.ty.numel();
            let ok_dtype =
                matches!((b, node.ty.dtype), (Buf::F32(_), DType::F32) | (Buf::I32(_), DType::I32));
            if b.len() != expected || !ok_dtype {
                let name = g.inputs[i.index()].name.clone();
                return Err(Error::BadInput { name, expected, got: b.len() });
            }
            b.clone()
        }
        Op::Param(p) => Buf::F32(state.params[p.index()].clone()),
        Op::MatMul { a, b, ta, tb } => Buf::F32(matmul(f(*a), sh(*a), *ta, f(*b), sh(*b), *tb, opts.threads)),
        Op::BiasAdd { x, bias } => {
            let (xs, b) = (sh(*x), f(*bias));
            let inner: usize = xs[2..].iter().product();
            let c = xs[1];
            Buf::F32(f(*x).iter().enumerate().map(|(i, v)| v + b[(i / inner) % c]).collect())
        }
        Op::Unary { f: func, x } => Buf::F32(f(*x).iter().map(|&v| unary(*func, v)).collect()),
        Op::ActGrad { f: func, y, dy } => {
            Buf::F32(f(*y).iter().zip(f(*dy)).map(|(&y, &d)| d * act_derivative(*func, y)).collect())
        }
        Op::Binary { f: func, a, b } => Buf::F32(
            f(*a)
                .iter()
                .zip(f(*b))
                .map(|(&a, &b)| match func {
                    BinaryFn::Add => a + b,
                    BinaryFn::Sub => a - b,
                    BinaryFn::Mul => a * b,
                    BinaryFn::Div => a / b,
                })
                .collect(),
        ),
        Op::Scale { x, c } => Buf::F32(f(*x).iter().map(|v| v * c).collect()),
        Op::Softmax { x } => Buf::F32(softmax(f(*x), *sh(*x).last().unwrap_or(&1))),
        Op::SoftmaxGrad { y, dy } => {
            let n = *shape.last().unwrap_or(&1);
            let mut out = vec![0.0; node.ty.numel()];
            for ((o, y), d) in out.chunks_mut(n).zip(f(*y).chunks(n)).zip(f(*dy).chunks(n)) {
                let dot: f64 = y.iter().zip(d).map(|(&y, &d)| f64::from(y * d)).sum();
                for i in 0..n {
                    o[i] = y[i] * (d[i] - dot as f32);
                }
            }
            Buf::F32(out)
        }
        Op::Reshape { x, .. } | Op::StopGrad { x } => bufs[x.index()].clone(),
        Op::Transpose { x } => {
            let [b, m, n] = [sh(*x)[0], sh(*x)[1], sh(*x)[2]];
            let xs = f(*x);
            let mut out = vec![0.0; b * m * n];
            for (bi, o) in out.chunks_mut(m * n).enumerate() {
                for i in 0..m {
                    for j in 0..n {
                        o[j * m + i] = xs[bi * m * n + i * n + j];
                    }
                }
            }
            Buf::F32(out)
        }
        Op::Nearest { x, codebook } => Buf::I32(nearest(f(*x), f(*codebook), sh(*codebook)[1])),
        Op::SumAll { x } => Buf::F32(vec![f(*x).iter().map(|&v| f64::from(v)).sum::<f64>() as f32]),
        Op::SumToAxis1 { x } => {
            let xs = sh(*x);
            let (c, inner) = (xs[1], xs[2..].iter().product::<usize>());
            let mut acc = vec![0f64; c];
            for (i, &v) in f(*x).iter().enumerate() {
                acc[(i / inner) % c] += f64::from(v);
            }
            Buf::F32(acc.into_iter().map(|v| v as f32).collect())
        }
        Op::SumAxis { x, axis } => {
            let xs = sh(*x);
            let (n, inner) = (xs[*axis], xs[axis + 1..].iter().product::<usize>());
            let mut acc = vec![0f64; node.ty.numel()];
            for (i, &v) in f(*x).iter().enumerate() {
                acc[i / (n * inner) * inner + i % inner] += f64::from(v);
            }
            Buf::F32(acc.into_iter().map(|v| v as f32).collect())
        }
        Op::AddPairs { q, k } => {
            let [t, s, a] = [shape[1], shape[2], shape[3]];
            let (q, k) = (f(*q), f(*k));
            let out = (0..node.ty.numel())
                .map(|i| {
                    let (row, c) = (i / a, i % a);
                    let (bt, si) = (row / s, row % s);
                    q[bt * a + c] + k[(bt / t * s + si) * a + c]
                })
                .collect();
            Buf::F32(out)
        }
        Op::Fill { value, .. } => Buf::F32(vec![*value; node.ty.numel()]),
        Op::Normal { salt, .. } => {
            Buf::F32((0..node.ty.numel()).map(|i| normal(opts.seed, opts.step, *salt, i)).collect())
        }
        Op::BroadcastScalar { x, .. } => Buf::F32(vec![f(*x)[0]; node.ty.numel()]),
        Op::Conv2d { x, w, stride, pad } => {
            Buf::F32(conv2d(f(*x), sh(*x), f(*w), sh(*w), shape, *stride, *pad))
        }
        Op::ConvTranspose2d { x, w, stride, pad, .. } => {
            Buf::F32(conv_transpose2d(f(*x), sh(*x), f(*w), sh(*w), shape, *stride, *pad))
        }
        Op::Conv2dWeightGrad { x, dy, stride, pad, .. } => {
            Buf::F32(conv2d_weight_grad(f(*x), sh(*x), f(*dy), sh(*dy), shape, *stride, *pad))
        }
        // For y = x ⋆ᵀ w, dw[ci,co,kh,kw] = Σ x[ci,ih,iw]·dy[co,ih·s-p+kh,iw·s-p+kw]: the weight
        // gradient of a convolution of dy, with x in the role of its output gradient.
        Op::ConvTranspose2dWeightGrad { x, dy, stride, pad, .. } => {
            Buf::F32(conv2d_weight_grad(f(*dy), sh(*dy), f(*x), sh(*x), shape, *stride, *pad))
        }
        Op::PoolArgmax { x, kernel, stride } => Buf::I32(pool_argmax(f(*x), sh(*x), shape, *kernel, *stride)),
        Op::Gather { x, idx } => {
            let xs = sh(*x);
            let plane_in = xs[2] * xs[3];
            let plane_out = shape[2] * shape[3];
            let (xv, iv) = (f(*x), ints(*idx));
            Buf::F32((0..iv.len()).map(|i| xv[(i / plane_out) * plane_in + iv[i] as usize]).collect())
        }
        Op::Scatter { v, idx, height, width, accumulate } => {
            let plane_out = height * width;
            let vs = sh(*v);
            let plane_in = vs[2] * vs[3];
            let mut out = vec![0.0; node.ty.numel()];
            for (i, (&val, &at)) in f(*v).iter().zip(ints(*idx)).enumerate() {
                let o = (i / plane_in) * plane_out + at as usize;
                if *accumulate { out[o] += val } else { out[o] = val }
            }
            Buf::F32(out)
        }
        Op::SparseConvT { v, idx, w, width, pad, flip, .. } => {
            let (ws, vs) = (sh(*w), sh(*v));
            let (c_n, e_n, k, plane) = (vs[1], shape[1], ws[2], shape[2] * shape[3]);
            let (vv, wv) = (f(*v), f(*w));
            let mut out = vec![0f64; node.ty.numel()];
            for_switch_taps(vs, ints(*idx), *width, (shape[2], shape[3]), (k, *pad), |n, b, c, t, at| {
                for e in 0..e_n {
                    let wi = switch_weight(*flip, (c, e), (c_n, e_n), k * k, t);
                    out[(b * e_n + e) * plane + at] += f64::from(vv[n]) * f64::from(wv[wi]);
                }
            });
            Buf::F32(out.into_iter().map(|a| a as f32).collect())
        }
        Op::GatherConv { x, w, idx, pad, flip } => {
            let (xs, ws) = (sh(*x), sh(*w));
            let (c_n, e_n, k, plane) = (shape[1], xs[1], ws[2], xs[2] * xs[3]);
            let width = xs[3] + 2 * pad + 1 - k;
            let (xv, wv) = (f(*x), f(*w));
            let mut out = vec![0f64; node.ty.numel()];
            for_switch_taps(shape, ints(*idx), width, (xs[2], xs[3]), (k, *pad), |n, b, c, t, at| {
                for e in 0..e_n {
                    let wi = switch_weight(*flip, (c, e), (c_n, e_n), k * k, t);
                    out[n] += f64::from(wv[wi]) * f64::from(xv[(b * e_n + e) * plane + at]);
                }
            });
            Buf::F32(out.into_iter().map(|a| a as f32).collect())
        }
        Op::SparseWeightGrad { v, idx, d, kernel, pad, width, flip, .. } => {
            let (ds, vs, k) = (sh(*d), sh(*v), *kernel);
            let (c_n, e_n, plane) = (vs[1], ds[1], ds[2] * ds[3]);
            let (vv, dv) = (f(*v), f(*d));
            let mut out = vec![0f64; node.ty.numel()];
            for_switch_taps(vs, ints(*idx), *width, (ds[2], ds[3]), (k, *pad), |n, b, c, t, at| {
                for e in 0..e_n {
                    let wi = switch_weight(*flip, (c, e), (c_n, e_n), k * k, t);
                    out[wi] += f64::from(vv[n]) * f64::from(dv[(b * e_n + e) * plane + at]);
                }
            });
            Buf::F32(out.into_iter().map(|a| a as f32).collect())
        }
        Op::AvgPool { x, kernel, stride } => Buf::F32(avgpool(f(*x), sh(*x), shape, *kernel, *stride)),
        Op::AvgPoolGrad { dy, kernel, stride, .. } => {
            Buf::F32(avgpool_grad(f(*dy), sh(*dy), shape, *kernel, *stride))
        }
        Op::Embed { table, ids } => {
            let (vocab, dim) = (sh(*table)[0], sh(*table)[1]);
            let t = f(*table);
            let mut out = Vec::with_capacity(node.ty.numel());
            for &id in ints(*ids) {
                let row = check_id(id, vocab)?;
                out.extend_from_slice(&t[row * dim..(row + 1) * dim]);
            }
            Buf::F32(out)
        }
        Op::EmbedGrad { ids, dy, vocab } => {
            let dim = shape[1];
            let mut out = vec![0.0; vocab * dim];
            for (i, &id) in ints(*ids).iter().enumerate() {
                let row = check_id(id, *vocab)?;
                for k in 0..dim {
                    out[row * dim + k] += f(*dy)[i * dim + k];
                }
            }
            Buf::F32(out)
        }
        Op::BatchMatMul { a, b, ta, tb } => {
            let (sa, sb) = (sh(*a), sh(*b));
            let (m, n) = (shape[1], shape[2]);
            let k = if *ta { sa[1] } else { sa[2] };
            let (av, bv) = (f(*a), f(*b));
            let mut out = vec![0f32; node.ty.numel()];
            for bi in 0..shape[0] {
                let (ao, bo) = (bi * sa[1] * sa[2], bi * sb[1] * sb[2]);
                for i in 0..m {
                    for j in 0..n {
                        let mut acc = 0f32;
                        for q in 0..k {
                            let x = if *ta { av[ao + q * sa[2] + i] } else { av[ao + i * sa[2] + q] };
                            let y = if *tb { bv[bo + j * sb[2] + q] } else { bv[bo + q * sb[2] + j] };
                            acc += x * y;
                        }
                        out[(bi * m + i) * n + j] = acc;
                    }
                }
            }
            Buf::F32(out)
        }
        Op::MaskFill { x, ids, value } => {
            let (t, s) = (shape[1], shape[2]);
            let ids = ints(*ids);
            let out = f(*x)
                .iter()
                .enumerate()
                .map(|(i, &v)| if ids[i / (t * s) * s + i % s] == 0 { *value } else { v })
                .collect();
            Buf::F32(out)
        }
        Op::GatherColumns { w, ids } => {
            let (n, d) = (sh(*w)[0], sh(*w)[1]);
            let w = f(*w);
            let mut out = Vec::with_capacity(node.ty.numel());
            for &id in ints(*ids) {
                let col = check_id(id, d)?;
                out.extend((0..n).map(|k| w[k * d + col]));
            }
            Buf::F32(out)
        }
        Op::ScatterColumns { dy, ids, depth } => {
            let n = shape[0];
            let mut out = vec![0.0; n * depth];
            for (r, &id) in ints(*ids).iter().enumerate() {
                let col = check_id(id, *depth)?;
                for k in 0..n {
                    out[k * depth + col] += f(*dy)[r * n + k];
                }
            }
            Buf::F32(out)
        }
        Op::OneHot { ids, depth } => {
            let mut out = vec![0.0; node.ty.numel()];
            for (i, &id) in ints(*ids).iter().enumerate() {
                out[i * depth + check_id(id, *depth)?] = 1.0;
            }
            Buf::F32(out)
        }
        Op::ShiftRight { ids, start } => {
            let t = shape[1];
            let src = ints(*ids);
            Buf::I32((0..src.len()).map(|i| if i % t == 0 { *start } else { src[i - 1] }).collect())
        }
        Op::Recurrent { cell, xp, h0, w_hh, b_hh } => {
            let bias = b_hh.map(f);
            Buf::F32(recurrent(*cell, f(*xp), sh(*xp), f(*h0), f(*w_hh), bias))
        }
        Op::RecurrentGrad { cell, gh, hprev, dhs, w_hh } => {
            let xs = [sh(*dhs)[0], sh(*dhs)[1], sh(*w_hh)[0]];
            Buf::F32(recurrent_grad(*cell, &xs, [f(*gh), f(*hprev), f(*dhs), f(*w_hh)]))
        }
        Op::PrevStates { x, first } => {
            let [_, t, s] = [sh(*x)[0], sh(*x)[1], sh(*x)[2]];
            let (xv, fv) = (f(*x), f(*first));
            let mut out = xv.to_vec();
            for (b, row) in out.chunks_mut(t * s).enumerate() {
                row.copy_within(0..(t - 1) * s, s);
                row[..s].copy_from_slice(&fv[b * s..(b + 1) * s]);
            }
            Buf::F32(out)
        }
        Op::GateSaves { rec } => {
            let Op::Recurrent { cell, xp, h0, w_hh, b_hh } = g.node(*rec).op else {
                return Err(Error::Unsupported("gate_saves of a node that is not recurrent"));
            };
            let [b, t, gs] = [sh(xp)[0], sh(xp)[1], sh(xp)[2]];
            let (states, h0, s) = (f(*rec), f(h0), sh(h0)[1]);
            let h = sh(w_hh)[1];
            let mut out = Vec::with_capacity(node.ty.numel());
            for bi in 0..b {
                for ti in 0..t {
                    let prev = if ti == 0 { &h0[bi * s..] } else { &states[(bi * t + ti - 1) * s..] };
                    let gh = hidden_projection(&prev[..h], f(w_hh), b_hh.map(f));
                    out.extend(gate_saves(cell, &f(xp)[(bi * t + ti) * gs..][..gs], &gh, &prev[..s]));
                }
            }
            Buf::F32(out)
        }
        Op::Part { x, offset, .. } => Buf::F32(f(*x)[*offset..offset + node.ty.numel()].to_vec()),
        Op::PadLast { x, start, total } => {
            let n = *sh(*x).last().unwrap_or(&1);
            let mut out = vec![0.0; node.ty.numel()];
            for (o, row) in out.chunks_mut(*total).zip(f(*x).chunks(n)) {
                o[*start..start + n].copy_from_slice(row);
            }
            Buf::F32(out)
        }
        Op::SumSteps { x } => {
            let (t, n) = (sh(*x)[1], sh(*x)[2]);
            let xv = f(*x);
            let mut out = Vec::with_capacity(node.ty.numel());
            for b in 0..shape[0] {
                for j in 0..n {
                    out.push((0..t).map(|k| f64::from(xv[(b * t + k) * n + j])).sum::<f64>() as f32);
                }
            }
            Buf::F32(out)
        }
        Op::LastStep { x } => {
            let (t, feat) = (sh(*x)[1], sh(*x)[2]);
            let xv = f(*x);
            Buf::F32(
                (0..shape[0]).flat_map(|b| xv[(b * t + t - 1) * feat..(b * t + t) * feat].to_vec()).collect(),
            )
        }
        Op::LastReal { x, ids } => {
            let (t, feat) = (sh(*x)[1], sh(*x)[2]);
            let xv = f(*x);
            let last = last_real(ints(*ids), t);
            Buf::F32(
                last.iter()
                    .enumerate()
                    .flat_map(|(b, &s)| xv[(b * t + s) * feat..][..feat].to_vec())
                    .collect(),
            )
        }
        Op::LastRealGrad { dy, ids } => {
            let (t, feat) = (shape[1], shape[2]);
            let mut out = vec![0.0; node.ty.numel()];
            for (b, &s) in last_real(ints(*ids), t).iter().enumerate() {
                out[(b * t + s) * feat..][..feat].copy_from_slice(&f(*dy)[b * feat..][..feat]);
            }
            Buf::F32(out)
        }
        Op::Repeat { x, times } => {
            let feat = sh(*x)[1];
            Buf::F32(f(*x).chunks(feat).flat_map(|row| row.repeat(*times)).collect())
        }
        Op::SliceLast { x, start, len } => {
            let n = *sh(*x).last().unwrap_or(&1);
            Buf::F32(f(*x).chunks(n).flat_map(|row| row[*start..start + len].to_vec()).collect())
        }
        Op::Dropout { x, p, salt } => {
            let scale = 1.0 / (1.0 - p);
            Buf::F32(
                f(*x)
                    .iter()
                    .enumerate()
                    .map(|(i, &v)| if keep(opts, *salt, i, *p) { v * scale } else { 0.0 })
                    .collect(),
            )
        }
        Op::DropoutGrad { dy, p, salt } => {
            let scale = 1.0 / (1.0 - p);
            Buf::F32(
                f(*dy)
                    .iter()
                    .enumerate()
                    .map(|(i, &v)| if keep(opts, *salt, i, *p) { v * scale } else { 0.0 })
                    .collect(),
            )
        }
        Op::Loss { f: func, pred, target } => {
            Buf::F32(vec![loss(*func, f(*pred), sh(*pred), &bufs[target.index()])? as f32])
        }
        Op::LossGrad { f: func, pred, target, dy } => {
            Buf::F32(loss_grad(*func, f(*pred), sh(*pred), &bufs[target.index()], f(*dy)[0])?)
        }
        Op::Update { f: func, clip, param, grad } => {
            let lr = if func.is_optimizer() { opts.lr } else { None };
            let lr = lr.unwrap_or(f64::from(func.lr()));
            update(*func, *clip, state, param.index(), f(*grad), lr, clip_scale);
            Buf::F32(Vec::new())
        }
        Op::Concat { a, b } => Buf::F32(concat(f(*a), sh(*a), f(*b), sh(*b))),
        Op::SliceChannels { x, start, len } => {
            let s = sh(*x);
            let inner: usize = s[2..].iter().product();
            let src = f(*x);
            let mut out = Vec::with_capacity(node.ty.numel());
            for n in 0..s[0] {
                let row = (n * s[1] + start) * inner;
                out.extend_from_slice(&src[row..row + len * inner]);
            }
            Buf::F32(out)
        }
        Op::BnStats { x } => Buf::F32(bn_stats(f(*x), sh(*x))),
        Op::BatchNorm { x, stats, gamma, beta, eps } => {
            let (s, c) = (sh(*x), sh(*x)[1]);
            let st = f(*stats);
            let coeffs = bn_coeffs(&st[..c], &st[c..], f(*gamma), f(*beta), *eps);
            Buf::F32(channel_affine(f(*x), s, &coeffs, 1, true))
        }
        Op::BnSums { x, stats, dy, eps } => Buf::F32(bn_sums(f(*x), sh(*x), f(*stats), f(*dy), *eps)),
        Op::BnGrad { x, stats, gamma, dy, sums, eps } => {
            Buf::F32(bn_grad(f(*x), sh(*x), [f(*stats), f(*gamma), f(*dy), f(*sums)], *eps))
        }
        Op::BnCoeffs { mean, var, gamma, beta, eps } => {
            Buf::F32(bn_coeffs(f(*mean), f(*var), f(*gamma), f(*beta), *eps))
        }
        Op::ChannelAffine { x, coeffs, axis, shift } => {
            Buf::F32(channel_affine(f(*x), sh(*x), f(*coeffs), *axis, *shift))
        }
        Op::FlipKernel { w } => {
            let [a, b, kh, kw] = [0, 1, 2, 3].map(|i| sh(*w)[i]);
            let src = f(*w);
            let mut out = vec![0f32; src.len()];
            for i in 0..a {
                for j in 0..b {
                    for y in 0..kh {
                        for x in 0..kw {
                            out[((j * a + i) * kh + kh - 1 - y) * kw + kw - 1 - x] =
                                src[((i * b + j) * kh + y) * kw + x];
                        }
                    }
                }
            }
            Buf::F32(out)
        }
        Op::Upsample { x, scale, bilinear } => Buf::F32(upsample(f(*x), sh(*x), *scale, *bilinear, false)),
        Op::UpsampleGrad { dy, scale, bilinear } => {
            Buf::F32(upsample(f(*dy), shape, *scale, *bilinear, true))
        }
    };
    Ok(out)
}

// ---- links, batch normalization, upsampling ----------------------------------------------------

/// `[a, b]` along axis 1.
fn concat(a: &[f32], sa: &[usize], b: &[f32], sb: &[usize]) -> Vec<f32> {
    let inner: usize = sa[2..].iter().product();
    let (ra, rb) = (sa[1] * inner, sb[1] * inner);
    let mut out = Vec::with_capacity(a.len() + b.len());
    for n in 0..sa[0] {
        out.extend_from_slice(&a[n * ra..(n + 1) * ra]);
        out.extend_from_slice(&b[n * rb..(n + 1) * rb]);
    }
    out
}

/// Calls `f(channel, flat index)` for every element of a `[B, C, …]` value.
fn per_channel(s: &[usize], mut f: impl FnMut(usize, usize)) {
    let inner: usize = s[2..].iter().product();
    for n in 0..s[0] {
        for c in 0..s[1] {
            let row = (n * s[1] + c) * inner;
            for i in row..row + inner {
                f(c, i);
            }
        }
    }
}

/// Mean and biased variance per channel, `[2, C]` (two passes, f64 sums).
fn bn_stats(x: &[f32], s: &[usize]) -> Vec<f32> {
    let c = s[1];
    let count = (x.len() / c) as f64;
    let mut sum = vec![0f64; c];
    per_channel(s, |ch, i| sum[ch] += f64::from(x[i]));
    let mean: Vec<f32> = sum.iter().map(|v| (v / count) as f32).collect();
    let mut sq = vec![0f64; c];
    per_channel(s, |ch, i| sq[ch] += (f64::from(x[i]) - f64::from(mean[ch])).powi(2));
    mean.iter().copied().chain(sq.iter().map(|v| (v / count) as f32)).collect()
}

/// `1/√(var + eps)`, as PyTorch computes it.
fn invstd(var: f32, eps: f32) -> f32 {
    1.0 / (var + eps).sqrt()
}

/// Scale `γ/√(var + eps)` and shift `β − mean·scale`, `[2, C]`.
fn bn_coeffs(mean: &[f32], var: &[f32], gamma: &[f32], beta: &[f32], eps: f32) -> Vec<f32> {
    let scale: Vec<f32> = (0..mean.len()).map(|c| invstd(var[c], eps) * gamma[c]).collect();
    let shift = (0..mean.len()).map(|c| beta[c] - mean[c] * scale[c]);
    scale.clone().into_iter().chain(shift).collect()
}

/// `x · scale[c] (+ shift[c])`, `c` the index along `axis`.
fn channel_affine(x: &[f32], s: &[usize], coeffs: &[f32], axis: usize, shift: bool) -> Vec<f32> {
    let c = s[axis];
    let inner: usize = s[axis + 1..].iter().product();
    x.iter()
        .enumerate()
        .map(|(i, &v)| {
            let ch = (i / inner) % c;
            if shift { v * coeffs[ch] + coeffs[c + ch] } else { v * coeffs[ch] }
        })
        .collect()
}

/// `(Σ dy·x̂, Σ dy)` per channel, `[2, C]`.
fn bn_sums(x: &[f32], s: &[usize], stats: &[f32], dy: &[f32], eps: f32) -> Vec<f32> {
    let c = s[1];
    let (mut dot, mut sum) = (vec![0f64; c], vec![0f64; c]);
    per_channel(s, |ch, i| {
        dot[ch] += f64::from(dy[i]) * (f64::from(x[i]) - f64::from(stats[ch]));
        sum[ch] += f64::from(dy[i]);
    });
    let dot = (0..c).map(|ch| (dot[ch] * f64::from(invstd(stats[c + ch], eps))) as f32);
    dot.chain(sum.iter().map(|&v| v as f32)).collect()
}

/// `γ/√(var + eps)·(dy − Σdy/n − x̂·Σ(dy·x̂)/n)`.
fn bn_grad(x: &[f32], s: &[usize], [stats, gamma, dy, sums]: [&[f32]; 4], eps: f32) -> Vec<f32> {
    let c = s[1];
    let n = (x.len() / c) as f32;
    let mut out = vec![0f32; x.len()];
    per_channel(s, |ch, i| {
        let r = invstd(stats[c + ch], eps);
        let xhat = (x[i] - stats[ch]) * r;
        out[i] = (dy[i] - sums[c + ch] / n - xhat * sums[ch] / n) * r * gamma[ch];
    });
    out
}

/// The source rows of output row `o` of an upsampling by `s` of `n` rows and their weights:
/// nearest `(⌊o/s⌋, same, 1, 0)`; bilinear with `align_corners=False` as PyTorch's
/// `area_pixel_compute_source_index`.
pub fn upsample_taps(o: usize, s: usize, n: usize, bilinear: bool) -> (usize, usize, f32, f32) {
    if !bilinear {
        let i = (o / s).min(n - 1);
        return (i, i, 1.0, 0.0);
    }
    let scale = 1.0 / s as f32;
    let src = (scale * (o as f32 + 0.5) - 0.5).max(0.0);
    let i0 = (src as usize).min(n - 1);
    let i1 = if i0 < n - 1 { i0 + 1 } else { i0 };
    let l1 = src - i0 as f32;
    (i0, i1, 1.0 - l1, l1)
}

/// `nn.Upsample` of `[B, C, H, W]` (`x` and `s` the input's), or with `grad` its gradient
/// from `x` the output's gradient onto an input of shape `s`.
fn upsample(x: &[f32], s: &[usize], [sh, sw]: [usize; 2], bilinear: bool, grad: bool) -> Vec<f32> {
    let (planes, h, w) = (s[0] * s[1], s[2], s[3]);
    let (oh, ow) = (h * sh, w * sw);
    let mut out = vec![0f32; if grad { planes * h * w } else { planes * oh * ow }];
    let rows: Vec<_> = (0..oh).map(|o| upsample_taps(o, sh, h, bilinear)).collect();
    let cols: Vec<_> = (0..ow).map(|o| upsample_taps(o, sw, w, bilinear)).collect();
    for p in 0..planes {
        let (inp, outp) = (p * h * w, p * oh * ow);
        for (i, &(h0, h1, a0, a1)) in rows.iter().enumerate() {
            for (j, &(w0, w1, b0, b1)) in cols.iter().enumerate() {
                let taps = [(h0, w0, a0 * b0), (h0, w1, a0 * b1), (h1, w0, a1 * b0), (h1, w1, a1 * b1)];
                if grad {
                    let d = x[outp + i * ow + j];
                    for &(r, c, wt) in &taps[..if bilinear { 4 } else { 1 }] {
                        out[inp + r * w + c] += wt * d;
                    }
                } else {
                    let v = if bilinear {
                        a0 * (b0 * x[inp + h0 * w + w0] + b1 * x[inp + h0 * w + w1])
                            + a1 * (b0 * x[inp + h1 * w + w0] + b1 * x[inp + h1 * w + w1])
                    } else {
                        x[inp + h0 * w + w0]
                    };
                    out[outp + i * ow + j] = v;
                }
            }
        }
    }
    out
}

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// `gh = h·W_hhᵀ (+ b_hh)` for one state row `h` (f64 sums).
fn hidden_projection(h: &[f32], w_hh: &[f32], bias: Option<&[f32]>) -> Vec<f32> {
    w_hh.chunks(h.len())
        .enumerate()
        .map(|(j, w)| {
            let dot: f64 = w.iter().zip(h).map(|(&w, &h)| f64::from(w) * f64::from(h)).sum();
            dot as f32 + bias.map_or(0.0, |b| b[j])
        })
        .collect()
}

/// The activations of hidden unit `j` from the projections `gi` (input) and `gh` (state),
/// PyTorch's equations: rnn `[h]`; gru `[r, z, n]` with n = tanh(gi_n + r·gh_n); lstm
/// `[i, f, g, o]`.
fn activations(cell: Cell, gi: &[f32], gh: &[f32], j: usize) -> [f32; 4] {
    let h = gh.len() / cell.gates() as usize;
    let a = |k: usize| gi[k * h + j] + gh[k * h + j];
    match cell {
        Cell::Rnn => [a(0).tanh(), 0.0, 0.0, 0.0],
        Cell::Gru => {
            let r = sigmoid(a(0));
            [r, sigmoid(a(1)), (gi[2 * h + j] + r * gh[2 * h + j]).tanh(), 0.0]
        }
        Cell::Lstm => [sigmoid(a(0)), sigmoid(a(1)), a(2).tanh(), sigmoid(a(3))],
    }
}

/// What a step saves for the backward (`Op::GateSaves`, in its slots), from its projections
/// and the state before it: an RNN's tanh; a GRU's r, z, n's hidden projection and n; an
/// LSTM's i, f, g, o and tanh c.
fn gate_saves(cell: Cell, gi: &[f32], gh: &[f32], prev: &[f32]) -> Vec<f32> {
    let h = gh.len() / cell.gates() as usize;
    let mut out = vec![0.0; cell.saves() * h];
    for j in 0..h {
        let a = activations(cell, gi, gh, j);
        let slots = match cell {
            Cell::Rnn => vec![a[0]],
            Cell::Gru => vec![a[0], a[1], gh[2 * h + j], a[2]],
            Cell::Lstm => vec![a[0], a[1], a[2], a[3], (a[1] * prev[h + j] + a[0] * a[2]).tanh()],
        };
        for (k, v) in slots.into_iter().enumerate() {
            out[k * h + j] = v;
        }
    }
    out
}

/// The activations of hidden unit `j` as [`activations`] gives them, from what the step
/// saved (`saved`, [`gate_saves`]).
fn saved_activations(cell: Cell, saved: &[f32], j: usize) -> [f32; 4] {
    let h = saved.len() / cell.saves();
    let sv = |k: usize| saved[k * h + j];
    match cell {
        Cell::Rnn => [sv(0), 0.0, 0.0, 0.0],
        Cell::Gru => [sv(0), sv(1), sv(Cell::GRU_N_SLOT), 0.0],
        Cell::Lstm => [sv(0), sv(1), sv(2), sv(3)],
    }
}

/// One step of a cell: from the projections and the previous state, the new state (h, then c
/// for an LSTM).
fn cell_step(cell: Cell, gi: &[f32], gh: &[f32], prev: &[f32], out: &mut [f32]) {
    let h = gh.len() / cell.gates() as usize;
    for j in 0..h {
        match (cell, activations(cell, gi, gh, j)) {
            (Cell::Rnn, [y, ..]) => out[j] = y,
            (Cell::Gru, [_, z, n, _]) => out[j] = (1.0 - z) * n + z * prev[j],
            (Cell::Lstm, [i, fg, g, o]) => {
                let c = fg * prev[h + j] + i * g;
                out[j] = o * c.tanh();
                out[h + j] = c;
            }
        }
    }
}

/// The gradient of one step: given the new state's gradient `ds`, writes the gradients of
/// the projections (`dgi`, `dgh`) and the direct part of the previous state's gradient (the
/// part that does not go through `W_hh`), from what the step saved of its gates (`saved`).
fn cell_step_grad(
    cell: Cell,
    [saved, prev, ds]: [&[f32]; 3],
    dgi: &mut [f32],
    dgh: &mut [f32],
    dprev: &mut [f32],
) {
    let h = saved.len() / cell.saves();
    for j in 0..h {
        match (cell, saved_activations(cell, saved, j)) {
            (Cell::Rnn, [y, ..]) => {
                dgi[j] = ds[j] * (1.0 - y * y);
                dgh[j] = dgi[j];
                dprev[j] = 0.0;
            }
            (Cell::Gru, [r, z, n, _]) => {
                let dn = ds[j] * (1.0 - z) * (1.0 - n * n);
                let dz = ds[j] * (prev[j] - n) * z * (1.0 - z);
                let dr = dn * saved[2 * h + j] * r * (1.0 - r);
                dgi[j] = dr;
                dgh[j] = dr;
                dgi[h + j] = dz;
                dgh[h + j] = dz;
                dgi[2 * h + j] = dn;
                dgh[2 * h + j] = dn * r;
                dprev[j] = ds[j] * z;
            }
            (Cell::Lstm, [i, fg, g, o]) => {
                let tc = saved[Cell::LSTM_TANH_C_SLOT * h + j];
                let dc = ds[h + j] + ds[j] * o * (1.0 - tc * tc);
                let d = [
                    dc * g * i * (1.0 - i),
                    dc * prev[h + j] * fg * (1.0 - fg),
                    dc * i * (1.0 - g * g),
                    ds[j] * tc * o * (1.0 - o),
                ];
                for (k, v) in d.into_iter().enumerate() {
                    dgi[k * h + j] = v;
                    dgh[k * h + j] = v;
                }
                dprev[j] = 0.0;
                dprev[h + j] = dc * fg;
            }
        }
    }
}

/// The time loop of `Op::Recurrent`, one sequence at a time.
fn recurrent(
    cell: Cell,
    xp: &[f32],
    xs: &[usize],
    h0: &[f32],
    w_hh: &[f32],
    bias: Option<&[f32]>,
) -> Vec<f32> {
    let (b, t, g) = (xs[0], xs[1], xs[2]);
    let h = g / cell.gates() as usize;
    let s = cell.state(h);
    let mut out = vec![0.0; b * t * s];
    for bi in 0..b {
        let mut prev = h0[bi * s..(bi + 1) * s].to_vec();
        for ti in 0..t {
            let gh = hidden_projection(&prev[..h], w_hh, bias);
            let row = (bi * t + ti) * s;
            cell_step(cell, &xp[(bi * t + ti) * g..][..g], &gh, &prev, &mut out[row..row + s]);
            prev.copy_from_slice(&out[row..row + s]);
        }
    }
    out
}

/// Backpropagation through time (`Op::RecurrentGrad`), from the last step to the first.
fn recurrent_grad(cell: Cell, xs: &[usize], [saved, hprev, dhs, w_hh]: [&[f32]; 4]) -> Vec<f32> {
    let (b, t, g) = (xs[0], xs[1], xs[2]);
    let h = g / cell.gates() as usize;
    let s = cell.state(h);
    let layout = crate::ir::recurrent_grad_layout(cell, b, t, h);
    let mut out = vec![0.0; layout.total];
    let (mut dgi, mut dgh, mut direct) = (vec![0.0; g], vec![0.0; g], vec![0.0; s]);
    for bi in 0..b {
        let mut carry = vec![0.0f32; s];
        for ti in (0..t).rev() {
            let at = bi * t + ti;
            let ds: Vec<f32> = dhs[at * s..][..s].iter().zip(&carry).map(|(a, c)| a + c).collect();
            let sv = cell.saves() * h;
            let ins = [&saved[at * sv..][..sv], &hprev[at * s..][..s], &ds[..]];
            cell_step_grad(cell, ins, &mut dgi, &mut dgh, &mut direct);
            out[layout.dxp + at * g..][..g].copy_from_slice(&dgi);
            out[layout.dgh + at * g..][..g].copy_from_slice(&dgh);
            // carry = direct + dgh·W_hh (into the h part).
            carry.copy_from_slice(&direct);
            for (k, c) in carry[..h].iter_mut().enumerate() {
                let dot: f64 = (0..g).map(|j| f64::from(dgh[j]) * f64::from(w_hh[j * h + k])).sum();
                *c += dot as f32;
            }
        }
        out[layout.dh0 + bi * s..][..s].copy_from_slice(&carry);
    }
    out
}

/// For each vector of `x` (rows of `d`), the index of the nearest row of `codebook`: squared
/// distances summed in order, the first on ties.
fn nearest(x: &[f32], codebook: &[f32], d: usize) -> Vec<i32> {
    x.chunks(d)
        .map(|v| {
            let mut best = (f32::INFINITY, 0);
            for (k, e) in codebook.chunks(d).enumerate() {
                let dist = v.iter().zip(e).fold(0.0f32, |acc, (&a, &b)| acc + (a - b) * (a - b));
                if dist < best.0 {
                    best = (dist, k as i32);
                }
            }
            best.1
        })
        .collect()
}

fn check_id(id: i32, vocab: usize) -> Result<usize, Error> {
    usize::try_from(id).ok().filter(|&i| i < vocab).ok_or(Error::BadId { id, vocab })
}

pub fn unary(f: UnaryFn, x: f32) -> f32 {
    match f {
        UnaryFn::Relu => x.max(0.0),
        UnaryFn::LeakyRelu(a) => {
            if x > 0.0 {
                x
            } else {
                a * x
            }
        }
        UnaryFn::Sigmoid => 1.0 / (1.0 + (-x).exp()),
        UnaryFn::Tanh => x.tanh(),
        UnaryFn::Abs => x.abs(),
        UnaryFn::Square => x * x,
        UnaryFn::Neg => -x,
        UnaryFn::Exp => x.exp(),
        UnaryFn::Sign => {
            if x > 0.0 {
                1.0
            } else if x < 0.0 {
                -1.0
            } else {
                0.0
            }
        }
    }
}

/// The derivative of an activation, written from its output `y`.
fn act_derivative(f: UnaryFn, y: f32) -> f32 {
    match f {
        UnaryFn::Relu => {
            if y > 0.0 {
                1.0
            } else {
                0.0
            }
        }
        UnaryFn::LeakyRelu(a) => {
            if y > 0.0 {
                1.0
            } else {
                a
            }
        }
        UnaryFn::Sigmoid => y * (1.0 - y),
        UnaryFn::Tanh => 1.0 - y * y,
        _ => 1.0,
    }
}

fn softmax(x: &[f32], n: usize) -> Vec<f32> {
    let mut out = vec![0.0; x.len()];
    for (o, row) in out.chunks_mut(n).zip(x.chunks(n)) {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let sum: f64 = row.iter().map(|&v| f64::from((v - max).exp())).sum();
        for (o, &v) in o.iter_mut().zip(row) {
            *o = ((v - max).exp() as f64 / sum) as f32;
        }
    }
    out
}

/// `op(a)·op(b)`; output rows are split across `threads`.
fn matmul(a: &[f32], sa: &[usize], ta: bool, b: &[f32], sb: &[usize], tb: bool, threads: usize) -> Vec<f32> {
    let (m, k) = if ta { (sa[1], sa[0]) } else { (sa[0], sa[1]) };
    let n = if tb { sb[0] } else { sb[1] };
    let at = |i: usize, p: usize| {
        if ta { a[p * sa[1] + i] } else { a[i * sa[1] + p] }
    };
    let bt = |p: usize, j: usize| {
        if tb { b[j * sb[1] + p] } else { b[p * sb[1] + j] }
    };
    let mut out = vec![0.0f32; m * n];
    let rows = |chunk: &mut [f32], first: usize| {
        for (r, row) in chunk.chunks_mut(n.max(1)).enumerate() {
            let i = first + r;
            for (j, o) in row.iter_mut().enumerate() {
                let mut acc = 0f64;
                for p in 0..k {
                    acc += f64::from(at(i, p)) * f64::from(bt(p, j));
                }
                *o = acc as f32;
            }
        }
    };
    let threads = threads.clamp(1, m.max(1));
    if threads == 1 || m * n * k < 32_768 {
        rows(&mut out, 0);
    } else {
        let per = m.div_ceil(threads);
        std::thread::scope(|s| {
            for (t, chunk) in out.chunks_mut(per * n).enumerate() {
                let rows = &rows;
                s.spawn(move || rows(chunk, t * per));
            }
        });
    }
    out
}

/// Input pixel `(o·s - p + k)` of an output position, if inside the input.
fn src(o: usize, s: usize, p: usize, k: usize, n: usize) -> Option<usize> {
    (o * s + k).checked_sub(p).filter(|&i| i < n)
}

/// Every tap inside the dense plane of every switch of a switch map (`passes::sparse`):
/// `visit(n, b, c, tap, at)` for switch `n` = `(b, c, q)` of `shape` `[B, C, Hp, Wp]`, in a
/// plane `width` wide, tap `i·k + j`, at offset `at` of the `height × width` dense plane.
fn for_switch_taps(
    shape: &[usize],
    idx: &[i32],
    width: usize,
    (hd, wd): (usize, usize),
    (k, pad): (usize, usize),
    mut visit: impl FnMut(usize, usize, usize, usize, usize),
) {
    let (c_n, q_n) = (shape[1], shape[2] * shape[3]);
    for (n, &s) in idx.iter().enumerate() {
        let (b, c) = (n / (c_n * q_n), n / q_n % c_n);
        let s = s as usize;
        let (r, col) = (s / width, s % width);
        for i in 0..k {
            let Some(y) = (r + i).checked_sub(pad).filter(|&y| y < hd) else { continue };
            for j in 0..k {
                let Some(x) = (col + j).checked_sub(pad).filter(|&x| x < wd) else { continue };
                visit(n, b, c, i * k + j, y * wd + x);
            }
        }
    }
}

type Hw = [usize; 2];

fn conv2d(x: &[f32], xs: &[usize], w: &[f32], ws: &[usize], os: &[usize], s: Hw, p: Hw) -> Vec<f32> {
    let (b, ci, h, wd) = (xs[0], xs[1], xs[2], xs[3]);
    let (co, k) = (ws[0], [ws[2], ws[3]]);
    let (oh, ow) = (os[2], os[3]);
    let mut out = vec![0.0; b * co * oh * ow];
    for n in 0..b {
        for o in 0..co {
            for y in 0..oh {
                for xx in 0..ow {
                    let mut acc = 0f64;
                    for c in 0..ci {
                        for kh in 0..k[0] {
                            let Some(iy) = src(y, s[0], p[0], kh, h) else {
                                continue;
                            };
                            for kw in 0..k[1] {
                                let Some(ix) = src(xx, s[1], p[1], kw, wd) else {
                                    continue;
                                };
                                acc += f64::from(x[((n * ci + c) * h + iy) * wd + ix])
                                    * f64::from(w[((o * ci + c) * k[0] + kh) * k[1] + kw]);
                            }
                        }
                    }
                    out[((n * co + o) * oh + y) * ow + xx] = acc as f32;
                }
            }
        }
    }
    out
}

/// Every input pixel scatters `pixel · kernel` into the output (no flip), overlaps summed.
fn conv_transpose2d(
    x: &[f32],
    xs: &[usize],
    w: &[f32],
    ws: &[usize],
    os: &[usize],
    s: Hw,
    p: Hw,
) -> Vec<f32> {
    let (b, ci, h, wd) = (xs[0], xs[1], xs[2], xs[3]);
    let (co, k) = (ws[1], [ws[2], ws[3]]);
    let (oh, ow) = (os[2], os[3]);
    let mut out = vec![0f64; b * co * oh * ow];
    for n in 0..b {
        for c in 0..ci {
            for iy in 0..h {
                for ix in 0..wd {
                    let v = f64::from(x[((n * ci + c) * h + iy) * wd + ix]);
                    for o in 0..co {
                        for kh in 0..k[0] {
                            let Some(y) = src(iy, s[0], p[0], kh, oh) else {
                                continue;
                            };
                            for kw in 0..k[1] {
                                let Some(xx) = src(ix, s[1], p[1], kw, ow) else {
                                    continue;
                                };
                                out[((n * co + o) * oh + y) * ow + xx] +=
                                    v * f64::from(w[((c * co + o) * k[0] + kh) * k[1] + kw]);
                            }
                        }
                    }
                }
            }
        }
    }
    out.into_iter().map(|v| v as f32).collect()
}

fn conv2d_weight_grad(
    x: &[f32],
    xs: &[usize],
    dy: &[f32],
    ds: &[usize],
    ws: &[usize],
    s: Hw,
    p: Hw,
) -> Vec<f32> {
    let (b, ci, h, wd) = (xs[0], xs[1], xs[2], xs[3]);
    let (co, oh, ow) = (ds[1], ds[2], ds[3]);
    let k = [ws[2], ws[3]];
    let mut out = vec![0.0; co * ci * k[0] * k[1]];
    for o in 0..co {
        for c in 0..ci {
            for kh in 0..k[0] {
                for kw in 0..k[1] {
                    let mut acc = 0f64;
                    for n in 0..b {
                        for y in 0..oh {
                            let Some(iy) = src(y, s[0], p[0], kh, h) else {
                                continue;
                            };
                            for xx in 0..ow {
                                let Some(ix) = src(xx, s[1], p[1], kw, wd) else {
                                    continue;
                                };
                                acc += f64::from(x[((n * ci + c) * h + iy) * wd + ix])
                                    * f64::from(dy[((n * co + o) * oh + y) * ow + xx]);
                            }
                        }
                    }
                    out[((o * ci + c) * k[0] + kh) * k[1] + kw] = acc as f32;
                }
            }
        }
    }
    out
}

/// The flat index `h·W + w` of each window's first maximum (NaN counts as a maximum, as in
/// PyTorch).
fn pool_argmax(x: &[f32], xs: &[usize], os: &[usize], k: Hw, s: Hw) -> Vec<i32> {
    let (planes, h, w) = (xs[0] * xs[1], xs[2], xs[3]);
    let (oh, ow) = (os[2], os[3]);
    let mut out = Vec::with_capacity(planes * oh * ow);
    for pl in 0..planes {
        let plane = &x[pl * h * w..(pl + 1) * h * w];
        for y in 0..oh {
            for xx in 0..ow {
                let mut best = (y * s[0]) * w + xx * s[1];
                for kh in 0..k[0] {
                    for kw in 0..k[1] {
                        let i = (y * s[0] + kh) * w + xx * s[1] + kw;
                        if plane[i] > plane[best] || (plane[i].is_nan() && !plane[best].is_nan()) {
                            best = i;
                        }
                    }
                }
                out.push(best as i32);
            }
        }
    }
    out
}

fn avgpool(x: &[f32], xs: &[usize], os: &[usize], k: Hw, s: Hw) -> Vec<f32> {
    let (planes, h, w) = (xs[0] * xs[1], xs[2], xs[3]);
    let (oh, ow) = (os[2], os[3]);
    let mut out = Vec::with_capacity(planes * oh * ow);
    for pl in 0..planes {
        for y in 0..oh {
            for xx in 0..ow {
                let mut acc = 0f64;
                for kh in 0..k[0] {
                    for kw in 0..k[1] {
                        acc += f64::from(x[pl * h * w + (y * s[0] + kh) * w + xx * s[1] + kw]);
                    }
                }
                out.push((acc / (k[0] * k[1]) as f64) as f32);
            }
        }
    }
    out
}

fn avgpool_grad(dy: &[f32], ds: &[usize], xs: &[usize], k: Hw, s: Hw) -> Vec<f32> {
    let (planes, oh, ow) = (ds[0] * ds[1], ds[2], ds[3]);
    let (h, w) = (xs[2], xs[3]);
    let mut out = vec![0.0; planes * h * w];
    let share = 1.0 / (k[0] * k[1]) as f32;
    for pl in 0..planes {
        for y in 0..oh {
            for xx in 0..ow {
                let g = dy[(pl * oh + y) * ow + xx] * share;
                for kh in 0..k[0] {
                    for kw in 0..k[1] {
                        out[pl * h * w + (y * s[0] + kh) * w + xx * s[1] + kw] += g;
                    }
                }
            }
        }
    }
    out
}

fn keep(opts: &Options, salt: u32, i: usize, p: f32) -> bool {
    uniform(opts.seed, opts.step, salt, i) >= p
}

/// The mean loss, computed in f64.
fn loss(f: LossFn, p: &[f32], ps: &[usize], target: &Buf) -> Result<f64, Error> {
    let n = p.len() as f64;
    Ok(match f {
        LossFn::Mse => p.iter().zip(target.f32()).map(|(&p, &t)| f64::from(p - t).powi(2)).sum::<f64>() / n,
        LossFn::L1 => p.iter().zip(target.f32()).map(|(&p, &t)| f64::from((p - t).abs())).sum::<f64>() / n,
        LossFn::Bce => {
            let term = |p: f32, t: f32| {
                let lp = f64::from(p).ln().max(-100.0);
                let lq = f64::from(1.0 - p).ln().max(-100.0);
                -(f64::from(t) * lp + f64::from(1.0 - t) * lq)
            };
            p.iter().zip(target.f32()).map(|(&p, &t)| term(p, t)).sum::<f64>() / n
        }
        LossFn::CrossEntropyLogits { pad } => {
            let v = *ps.last().unwrap_or(&1);
            let ids = target.i32();
            let mut total = 0f64;
            for (row, &id) in p.chunks(v).zip(ids) {
                let t = check_id(id, v)?;
                if pad && id == 0 {
                    continue;
                }
                let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let lse = f64::from(max) + row.iter().map(|&z| f64::from(z - max).exp()).sum::<f64>().ln();
                total += lse - f64::from(row[t]);
            }
            total / real_rows(ids, pad)
        }
    })
}

/// Each sample's last real step of `ids [B, T]`: the one before its padding (ids 0 at the
/// end), the first step for a sample of padding only.
fn last_real(ids: &[i32], t: usize) -> Vec<usize> {
    ids.chunks(t).map(|row| row.iter().filter(|&&id| id != 0).count().max(1) - 1).collect()
}

/// What cross-entropy's mean divides by: every id, or (padded) those that are not 0.
fn real_rows(ids: &[i32], pad: bool) -> f64 {
    if pad { ids.iter().filter(|&&id| id != 0).count().max(1) as f64 } else { ids.len() as f64 }
}

/// `dy · ∂(mean loss)/∂pred`, as PyTorch's backward of each loss.
fn loss_grad(f: LossFn, p: &[f32], ps: &[usize], target: &Buf, dy: f32) -> Result<Vec<f32>, Error> {
    let n = p.len() as f32;
    let t = target.f32();
    Ok(match f {
        LossFn::Mse => p.iter().zip(t).map(|(&p, &t)| 2.0 * (p - t) / n * dy).collect(),
        LossFn::L1 => p.iter().zip(t).map(|(&p, &t)| unary(UnaryFn::Sign, p - t) / n * dy).collect(),
        LossFn::Bce => {
            p.iter().zip(t).map(|(&p, &t)| (p - t) / ((1.0 - p) * p).max(1e-12) / n * dy).collect()
        }
        LossFn::CrossEntropyLogits { pad } => {
            let v = *ps.last().unwrap_or(&1);
            let ids = target.i32();
            let rows = real_rows(ids, pad) as f32;
            let mut out = softmax(p, v);
            for (row, &id) in out.chunks_mut(v).zip(ids) {
                row[check_id(id, v)?] -= 1.0;
                let k = if pad && id == 0 { 0.0 } else { 1.0 / rows * dy };
                for g in row.iter_mut() {
                    *g *= k;
                }
            }
            out
        }
    })
}

/// PyTorch's update rules (`torch.optim.SGD`, `Adam`, `AdamW` and `RMSprop`, single-tensor
/// form), at the learning rate `lr`, after clipping (`clip_grad_value_`, or the scale
/// `norm_scale` that `clip_grad_norm_` found).
fn update(f: OptimizerFn, clip: Clip, state: &mut State, p: usize, grad: &[f32], lr: f64, norm_scale: f32) {
    let grad: Vec<f32> = match clip {
        Clip::None => grad.to_vec(),
        Clip::Value(c) => grad.iter().map(|g| g.clamp(-c, c)).collect(),
        Clip::Norm(_) => grad.iter().map(|g| g * norm_scale).collect(),
    };
    let (param, slots, step) = state.begin_update(p, f);
    match f {
        OptimizerFn::Sgd { momentum, nesterov, weight_decay, .. } => {
            let lr = lr as f32;
            for i in 0..param.len() {
                let mut d = grad[i] + weight_decay * param[i];
                if momentum != 0.0 {
                    let buf = &mut slots[0][i];
                    *buf = if step <= 1 { d } else { momentum * *buf + d };
                    d = if nesterov { d + momentum * *buf } else { *buf };
                }
                param[i] -= lr * d;
            }
        }
        OptimizerFn::Adam { b1, b2, eps, weight_decay, decoupled, .. } => {
            let t = step.max(1) as i32;
            let bc1 = 1.0 - f64::from(b1).powi(t);
            let bc2_sqrt = (1.0 - f64::from(b2).powi(t)).sqrt();
            let step_size = (lr / bc1) as f32;
            let bc2_sqrt = bc2_sqrt as f32;
            let (m, v) = slots.split_at_mut(1);
            let (m, v) = (&mut m[0], &mut v[0]);
            // AdamW: `param.mul_(1 − lr·wd)` (the factor rounded to f32, as PyTorch's scalar).
            let shrink = (1.0 - lr * f64::from(weight_decay)) as f32;
            for i in 0..param.len() {
                let g = if decoupled {
                    param[i] *= shrink;
                    grad[i]
                } else {
                    grad[i] + weight_decay * param[i]
                };
                m[i] += (1.0 - b1) * (g - m[i]);
                v[i] = b2 * v[i] + (1.0 - b2) * g * g;
                let denom = v[i].sqrt() / bc2_sqrt + eps;
                param[i] -= step_size * m[i] / denom;
            }
        }
        OptimizerFn::RmsProp { alpha, eps, weight_decay, momentum, centered, .. } => {
            let lr = lr as f32;
            let buf = usize::from(momentum != 0.0);
            for i in 0..param.len() {
                let g = grad[i] + weight_decay * param[i];
                slots[0][i] = slots[0][i] * alpha + (1.0 - alpha) * g * g;
                let avg = if centered {
                    let a = &mut slots[1 + buf][i];
                    *a += (1.0 - alpha) * (g - *a);
                    (slots[0][i] - slots[1 + buf][i] * slots[1 + buf][i]).sqrt()
                } else {
                    slots[0][i].sqrt()
                } + eps;
                let d = if buf == 1 {
                    slots[1][i] = momentum * slots[1][i] + g / avg;
                    slots[1][i]
                } else {
                    g / avg
                };
                param[i] -= lr * d;
            }
        }
        OptimizerFn::Running { rate } => {
            for (p, g) in param.iter_mut().zip(&grad) {
                *p -= rate * g;
            }
        }
    }
}

/// `clip_grad_norm_`'s scale: min(1, c / (‖g‖ + 1e-6)) over the gradients of every update
/// clipped by norm; 1 when there are none.
pub fn clip_scale(g: &Graph, bufs: &[Buf]) -> f32 {
    let mut sum = 0f64;
    let mut limit = None;
    for id in g.ids() {
        if let Op::Update { clip: Clip::Norm(c), grad, .. } = g.node(id).op {
            limit = Some(c);
            sum += bufs[grad.index()].f32().iter().map(|&x| f64::from(x) * f64::from(x)).sum::<f64>();
        }
    }
    limit.map_or(1.0, |c| norm_scale(f64::from(c), sum.sqrt()))
}

/// min(1, c / (norm + 1e-6)), rounded to f32 as PyTorch's `clip_coef_clamped`.
pub fn norm_scale(c: f64, norm: f64) -> f32 {
    (c / (norm + 1e-6)).min(1.0) as f32
}
