//! Gradient checks: for every op with a backward rule, autodiff's gradient (run on the
//! interpreter) against central finite differences, on random values and odd sizes.
//!
//! Each case builds `y = op(params…)` and checks L = Σ y·r for a fixed random r, so every
//! element of y carries a different weight. The interpreter accumulates in f64, so a step of
//! 1e-3 leaves the truncation and rounding errors far below the tolerance.

mod common;

use aec::autodiff;
use aec::interp::{self, Buf};
use aec::ir::{BinaryFn, Graph, LossFn, NodeId, Op, ParamDef, ParamRole, Type, UnaryFn};
use aec::runtime::State;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

struct Case {
    g: Graph,
    params: Vec<Vec<f32>>,
    inputs: Vec<Buf>,
    rng: ChaCha8Rng,
}

impl Case {
    fn new(seed: u64) -> Case {
        Case {
            g: Graph::new("check.forward"),
            params: Vec::new(),
            inputs: Vec::new(),
            rng: ChaCha8Rng::seed_from_u64(seed),
        }
    }

    /// A parameter with values U(-1, 1), pushed away from 0 by `gap` (kinks of relu and abs).
    fn param_gap(&mut self, shape: &[usize], gap: f32) -> NodeId {
        let n: usize = shape.iter().product();
        let v = (0..n)
            .map(|_| {
                let x: f32 = self.rng.random::<f32>() * 2.0 - 1.0;
                if x.abs() < gap { x.signum() * gap + x } else { x }
            })
            .collect();
        self.params.push(v);
        let def = ParamDef {
            name: format!("p{}", self.params.len()),
            shape: shape.to_vec(),
            role: ParamRole::Weight,
            fan_in: 1,
            fan_out: 1,
        };
        self.g.add_param(def).expect("param")
    }

    fn param(&mut self, shape: &[usize]) -> NodeId {
        self.param_gap(shape, 0.0)
    }

    fn input_f32(&mut self, shape: &[usize], lo: f32, hi: f32) -> NodeId {
        let n: usize = shape.iter().product();
        let v = (0..n).map(|_| lo + (hi - lo) * self.rng.random::<f32>()).collect();
        self.inputs.push(Buf::F32(v));
        let name = format!("in{}", self.inputs.len());
        self.g.add_input(name, Type::f32(shape.to_vec())).expect("input")
    }

    fn input_ids(&mut self, shape: &[usize], vocab: i32) -> NodeId {
        let n: usize = shape.iter().product();
        let v = (0..n).map(|_| self.rng.random_range(0..vocab)).collect();
        self.inputs.push(Buf::I32(v));
        let name = format!("in{}", self.inputs.len());
        self.g.add_input(name, Type::i32(shape.to_vec())).expect("input")
    }

    fn add_ids(&mut self, shape: &[usize], ids: Vec<i32>) -> NodeId {
        self.inputs.push(Buf::I32(ids));
        let name = format!("in{}", self.inputs.len());
        self.g.add_input(name, Type::i32(shape.to_vec())).expect("input")
    }

    fn add(&mut self, op: Op) -> NodeId {
        match self.g.add(op, None) {
            Ok(id) => id,
            Err(e) => panic!("bad test graph: {e}"),
        }
    }

    /// Checks ∂(Σ y·r)/∂p for every parameter p.
    fn check(mut self, y: NodeId, what: &str) {
        let shape = self.g.ty(y).shape.clone();
        let loss = if shape.is_empty() {
            y
        } else {
            let r = self.input_f32(&shape, -1.0, 1.0);
            let m = self.add(Op::Binary { f: BinaryFn::Mul, a: y, b: r });
            self.add(Op::SumAll { x: m })
        };
        self.g.outputs.retain(|o| o.0 != "loss");
        self.g.outputs.push(("loss".into(), loss));
        aec::ir::verify(&self.g).unwrap_or_else(|e| panic!("{what}: {e:?}"));
        let back = autodiff::backward(&self.g, loss).unwrap_or_else(|e| panic!("{what}: {e}"));
        aec::ir::verify(&back.graph).unwrap_or_else(|e| panic!("{what}: backward graph: {e:?}"));
        let opts = interp::Options { check_finite: false, ..interp::Options::default() };
        let mut state = State::new(self.params.clone());
        let values = interp::run(&back.graph, &self.inputs, &mut state, &opts)
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        let eval = |params: &[Vec<f32>]| -> f64 {
            let mut s = State::new(params.to_vec());
            let v = interp::run(&self.g, &self.inputs, &mut s, &opts).expect("forward");
            f64::from(v.get(loss).f32()[0])
        };
        let eps = 1e-3f32;
        let mut largest = 0f64;
        for (p, grad) in back.param_grads.iter().enumerate() {
            let analytic: Vec<f32> = match grad {
                Some(id) => values.get(*id).f32().to_vec(),
                None => vec![0.0; self.params[p].len()],
            };
            let n = self.params[p].len();
            // At most 40 elements per parameter, spread over it.
            let step = n.div_ceil(40).max(1);
            for i in (0..n).step_by(step) {
                let mut plus = self.params.clone();
                plus[p][i] += eps;
                let mut minus = self.params.clone();
                minus[p][i] -= eps;
                let numeric = (eval(&plus) - eval(&minus)) / (2.0 * f64::from(eps));
                let a = f64::from(analytic[i]);
                largest = largest.max(numeric.abs());
                let tol = 2e-3 + 2e-2 * a.abs().max(numeric.abs());
                assert!(
                    (a - numeric).abs() <= tol,
                    "{what}: ∂L/∂p{}[{i}]: autodiff {a:.6}, finite differences {numeric:.6}",
                    p + 1
                );
            }
        }
        // A check of gradients that are all zero would prove nothing.
        assert!(largest > 1e-3, "{what}: every checked gradient is ~0 ({largest})");
    }
}

#[test]
fn matmul_in_every_transposition() {
    for (m, k, n) in [(3, 5, 7), (1, 13, 1), (13, 1, 3)] {
        for ta in [false, true] {
            for tb in [false, true] {
                let mut c = Case::new(1);
                let a = c.param(&if ta { [k, m] } else { [m, k] });
                let b = c.param(&if tb { [n, k] } else { [k, n] });
                let y = c.add(Op::MatMul { a, b, ta, tb });
                c.check(y, &format!("matmul {m}x{k}x{n} ta={ta} tb={tb}"));
            }
        }
    }
}

#[test]
fn batch_matmul_in_every_transposition_and_the_attention_mask() {
    for (bs, m, k, n) in [(2, 3, 5, 4), (1, 1, 7, 1), (3, 4, 1, 2)] {
        for ta in [false, true] {
            for tb in [false, true] {
                let mut c = Case::new(2);
                let a = c.param(&if ta { [bs, k, m] } else { [bs, m, k] });
                let b = c.param(&if tb { [bs, n, k] } else { [bs, k, n] });
                let y = c.add(Op::BatchMatMul { a, b, ta, tb });
                c.check(y, &format!("batch_matmul {bs}x{m}x{k}x{n} ta={ta} tb={tb}"));
            }
        }
    }
    // Masked scores then a softmax: padding (id 0, about one source position in three) gets no
    // weight and no gradient.
    for (b, t, s) in [(2, 3, 5), (1, 2, 6), (3, 2, 4)] {
        let mut c = Case::new(3);
        let x = c.param(&[b, t, s]);
        let ids = c.input_ids(&[b, s], 3);
        let m = c.add(Op::MaskFill { x, ids, value: f32::MIN });
        let y = c.add(Op::Softmax { x: m });
        c.check(y, &format!("mask_fill + softmax {b}x{t}x{s}"));
    }
    // Additive attention's pairs: every q row plus every k row, through a tanh (its gradients
    // are sums over the other side's axis).
    for (b, t, s, a) in [(2, 3, 5, 4), (1, 1, 1, 7), (3, 2, 4, 5)] {
        let mut c = Case::new(5);
        let q = c.param(&[b, t, a]);
        let k = c.param(&[b, s, a]);
        let p = c.add(Op::AddPairs { q, k });
        let y = c.add(Op::Unary { f: UnaryFn::Tanh, x: p });
        c.check(y, &format!("add_pairs + tanh {b}x{t}x{s}x{a}"));
    }
    // A padded sequence's last real state (ids of sentences then padding, one of padding only).
    let mut c = Case::new(4);
    let x = c.param(&[3, 4, 5]);
    let ids = c.add_ids(&[3, 4], vec![5, 2, 0, 0, 7, 1, 3, 9, 0, 0, 0, 0]);
    let y = c.add(Op::LastReal { x, ids });
    c.check(y, "last_real");
}

#[test]
fn a_weight_used_twice_sums_both_gradients() {
    // Tied weights: y = (x·Wᵀ)·W.
    let mut c = Case::new(2);
    let x = c.param(&[3, 5]);
    let w = c.param(&[7, 5]);
    let h = c.add(Op::MatMul { a: x, b: w, ta: false, tb: true });
    let y = c.add(Op::MatMul { a: h, b: w, ta: false, tb: false });
    c.check(y, "tied matmul");
}

#[test]
fn bias_add() {
    for shape in [vec![3, 5], vec![2, 3, 5, 7], vec![1, 1]] {
        let mut c = Case::new(3);
        let x = c.param(&shape);
        let b = c.param(&[shape[1]]);
        let y = c.add(Op::BiasAdd { x, bias: b });
        c.check(y, &format!("bias_add {shape:?}"));
    }
}

#[test]
fn unary_functions() {
    let fs = [
        UnaryFn::Relu,
        UnaryFn::LeakyRelu(0.1),
        UnaryFn::Sigmoid,
        UnaryFn::Tanh,
        UnaryFn::Abs,
        UnaryFn::Square,
        UnaryFn::Neg,
        UnaryFn::Exp,
    ];
    for f in fs {
        for shape in [[3, 7], [1, 13], [5, 1]] {
            let mut c = Case::new(4);
            let x = c.param_gap(&shape, 0.05);
            let y = c.add(Op::Unary { f, x });
            c.check(y, &format!("{} {shape:?}", f.name()));
        }
    }
}

#[test]
fn binary_and_scale() {
    for f in [BinaryFn::Add, BinaryFn::Sub, BinaryFn::Mul] {
        let mut c = Case::new(5);
        let a = c.param(&[3, 5]);
        let b = c.param(&[3, 5]);
        let y = c.add(Op::Binary { f, a, b });
        c.check(y, &format!("{f:?}"));
    }
    let mut c = Case::new(6);
    let x = c.param(&[7, 3]);
    let y = c.add(Op::Scale { x, c: -2.5 });
    c.check(y, "scale");
}

#[test]
fn softmax_reshape_and_sums() {
    for shape in [vec![3, 5], vec![2, 3, 7], vec![1, 2]] {
        let mut c = Case::new(7);
        let x = c.param(&shape);
        let y = c.add(Op::Softmax { x });
        c.check(y, &format!("softmax {shape:?}"));
    }
    let mut c = Case::new(8);
    let x = c.param(&[2, 3, 5]);
    let y = c.add(Op::Reshape { x, shape: vec![6, 5] });
    c.check(y, "reshape");
    for shape in [[1, 1, 1], [2, 3, 5], [3, 7, 1]] {
        let mut c = Case::new(10);
        let x = c.param(&shape);
        let y = c.add(Op::Transpose { x });
        c.check(y, &format!("transpose {shape:?}"));
    }
    let mut c = Case::new(9);
    let x = c.param(&[3, 5]);
    let s = c.add(Op::Unary { f: UnaryFn::Square, x });
    let y = c.add(Op::SumAll { x: s });
    c.check(y, "sum_all of squares (an l2 penalty)");
}

#[test]
fn conv2d_on_awkward_sizes() {
    // (batch, cin, h, w, cout, kernel, stride, pad), sizes per axis [height, width].
    let cases = [
        (2, 3, 5, 7, 4, [3, 3], [1, 1], [1, 1]),
        (1, 3, 5, 7, 2, [3, 3], [2, 2], [1, 1]),
        (2, 1, 7, 5, 3, [3, 3], [2, 2], [0, 0]),
        (1, 2, 4, 4, 1, [1, 1], [1, 1], [0, 0]),
        (3, 1, 6, 6, 2, [2, 2], [2, 2], [0, 0]),
        (2, 2, 5, 9, 3, [3, 5], [1, 2], [1, 2]),
        (1, 3, 8, 4, 2, [4, 1], [3, 1], [0, 1]),
    ];
    for (b, ci, h, w, co, k, s, p) in cases {
        let mut c = Case::new(10);
        let x = c.param(&[b, ci, h, w]);
        let wt = c.param(&[co, ci, k[0], k[1]]);
        let y = c.add(Op::Conv2d { x, w: wt, stride: s, pad: p });
        c.check(y, &format!("conv2d x[{b},{ci},{h},{w}] k{k:?} s{s:?} p{p:?}"));
    }
}

#[test]
fn conv_transpose2d_on_awkward_sizes() {
    // (batch, cin, h, w, cout, kernel, stride, pad, out_pad), sizes per axis [height, width].
    let cases = [
        (2, 3, 3, 4, 2, [3, 3], [2, 2], [1, 1], [1, 1]),
        (1, 2, 5, 3, 3, [3, 3], [1, 1], [1, 1], [0, 0]),
        (2, 1, 2, 2, 1, [2, 2], [2, 2], [0, 0], [0, 0]),
        (1, 3, 3, 5, 2, [3, 3], [2, 2], [0, 0], [1, 1]),
        (2, 2, 3, 4, 3, [3, 5], [3, 2], [2, 1], [1, 0]),
        (1, 1, 4, 2, 2, [1, 4], [2, 1], [0, 2], [0, 0]),
    ];
    for (b, ci, h, w, co, k, s, p, op) in cases {
        let mut c = Case::new(11);
        let x = c.param(&[b, ci, h, w]);
        let wt = c.param(&[ci, co, k[0], k[1]]);
        let y = c.add(Op::ConvTranspose2d { x, w: wt, stride: s, pad: p, out_pad: op });
        c.check(y, &format!("conv_transpose2d x[{b},{ci},{h},{w}] k{k:?} s{s:?} p{p:?} op{op:?}"));
    }
}

#[test]
fn maxpool_unpool_and_avgpool() {
    let cases = [
        (5, 7, [2, 2], [2, 2]),
        (7, 7, [3, 3], [2, 2]),
        (4, 4, [2, 2], [2, 2]),
        (3, 5, [3, 3], [1, 1]),
        (6, 7, [2, 3], [2, 3]),
        (7, 5, [3, 1], [2, 1]),
    ];
    for (h, w, k, s) in cases {
        let mut c = Case::new(12);
        let x = c.param(&[2, 3, h, w]);
        let idx = c.add(Op::PoolArgmax { x, kernel: k, stride: s });
        let y = c.add(Op::Gather { x, idx });
        c.check(y, &format!("maxpool {h}x{w} k{k:?} s{s:?}"));

        // Unpooling through overlapping windows (k > s) can write two values to one switch;
        // the forward keeps the last and the backward gathers for both, as PyTorch's
        // max_unpool2d does, so finite differences only agree where windows do not overlap.
        if k[0] <= s[0] && k[1] <= s[1] {
            let mut c = Case::new(13);
            let x = c.input_f32(&[2, 3, h, w], -1.0, 1.0);
            let idx = c.add(Op::PoolArgmax { x, kernel: k, stride: s });
            let shape = c.g.ty(idx).shape.clone();
            let v = c.param(&shape);
            let y = c.add(Op::Scatter { v, idx, height: h, width: w, accumulate: false });
            c.check(y, &format!("unpool {h}x{w} k{k:?} s{s:?}"));
        }

        let mut c = Case::new(14);
        let x = c.param(&[2, 3, h, w]);
        let y = c.add(Op::AvgPool { x, kernel: k, stride: s });
        c.check(y, &format!("avgpool {h}x{w} k{k:?} s{s:?}"));
    }
}

#[test]
fn embed_and_dropout() {
    let mut c = Case::new(15);
    let table = c.param(&[7, 5]);
    let ids = c.input_ids(&[3, 4], 7);
    let y = c.add(Op::Embed { table, ids });
    c.check(y, "embed");

    let mut c = Case::new(16);
    let x = c.param(&[3, 13]);
    let y = c.add(Op::Dropout { x, p: 0.3, salt: 1 });
    c.check(y, "dropout");
}

#[test]
fn losses() {
    for f in [LossFn::Mse, LossFn::L1] {
        let mut c = Case::new(17);
        let p = c.param(&[3, 7]);
        let t = c.input_f32(&[3, 7], -1.0, 1.0);
        let y = c.add(Op::Loss { f, pred: p, target: t });
        c.check(y, f.name());
    }
    let mut c = Case::new(18);
    let z = c.param(&[3, 7]);
    let p = c.add(Op::Unary { f: UnaryFn::Sigmoid, x: z });
    let t = c.input_f32(&[3, 7], 0.0, 1.0);
    let y = c.add(Op::Loss { f: LossFn::Bce, pred: p, target: t });
    c.check(y, "bce");

    // With `pad`, ids 0 are padding (about one row in seven here, one in two for `[1, 2]`).
    for pad in [false, true] {
        for shape in [vec![5, 7], vec![3, 4, 7], vec![1, 2], vec![2, 9, 3]] {
            let mut c = Case::new(19);
            let z = c.param(&shape);
            let ids = c.input_ids(&shape[..shape.len() - 1], shape[shape.len() - 1] as i32);
            let y = c.add(Op::Loss { f: LossFn::CrossEntropyLogits { pad }, pred: z, target: ids });
            c.check(y, &format!("cross_entropy pad {pad} {shape:?}"));
        }
    }
}

#[test]
fn a_tied_weight_through_a_whole_mirrored_network() {
    // `decoder mirror tied`: encoder.0.weight is used by the conv and by the deconv, and
    // encoder.3.weight by two dense layers; their gradients are the sums of both uses.
    let src =
        std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("specs/mirror.ae"))
            .expect("spec");
    let compiled = aec::compile(&src, &aec::Config { batch: Some(2) }).expect("compiles");
    let g = compiled.forward;
    let mut c = Case::new(21);
    c.params = g
        .params
        .iter()
        .map(|p| (0..p.shape.iter().product::<usize>()).map(|_| c.rng.random::<f32>() - 0.5).collect())
        .collect();
    let n = g.inputs[0].ty.numel();
    c.inputs = vec![Buf::F32((0..n).map(|_| c.rng.random::<f32>()).collect())];
    let loss = g.output("loss").expect("loss");
    c.g = g;
    c.check(loss, "mirror tied");
}

#[test]
fn the_reparameterised_code_and_its_kl_term() {
    // z = mu + exp(logvar / 2)·ε with ε fixed (a function of seed and step), and the KL term
    // −½ Σ (1 + logvar − mu² − e^logvar), built from the ops the lowering uses.
    for shape in [vec![1, 1], vec![3, 5], vec![2, 7]] {
        let mut c = Case::new(21);
        let mu = c.param(&shape);
        let logvar = c.param(&shape);
        let eps = c.add(Op::Normal { shape: shape.clone(), salt: 3 });
        let half = c.add(Op::Scale { x: logvar, c: 0.5 });
        let sd = c.add(Op::Unary { f: UnaryFn::Exp, x: half });
        let noise = c.add(Op::Binary { f: BinaryFn::Mul, a: sd, b: eps });
        let z = c.add(Op::Binary { f: BinaryFn::Add, a: mu, b: noise });
        c.check(z, &format!("reparameterised code {shape:?}"));

        let mut c = Case::new(22);
        let mu = c.param(&shape);
        let logvar = c.param(&shape);
        let sq = c.add(Op::Unary { f: UnaryFn::Square, x: mu });
        let d = c.add(Op::Binary { f: BinaryFn::Sub, a: logvar, b: sq });
        let e = c.add(Op::Unary { f: UnaryFn::Exp, x: logvar });
        let d = c.add(Op::Binary { f: BinaryFn::Sub, a: d, b: e });
        let s = c.add(Op::SumAll { x: d });
        let kl = c.add(Op::Scale { x: s, c: -0.5 });
        c.check(kl, &format!("kl {shape:?}"));
    }
}

#[test]
fn a_vae_loss_with_every_reduction_against_finite_differences() {
    // A small VAE lowered as it trains (ε drawn), its loss in f64-friendly sizes: every
    // reduction of the reconstruction and of the KL term, against central differences.
    for (rec, kl) in [("sum", "sum"), ("mean", "batchmean"), ("batchmean", "mean")] {
        let src = format!(
            "model v {{ input x: [6]\n encoder {{ dense 4 -> tanh; gaussian 3 }}\n decoder {{ dense 6 -> sigmoid }}\n \
             loss bce(x, reduction: {rec}) + 0.5 * kl(code, reduction: {kl}) }}"
        );
        let compiled = aec::compile(&src, &aec::Config { batch: Some(2) }).expect("compiles");
        let mut c = Case::new(23);
        c.g = compiled.forward.clone();
        c.params = aec::runtime::init::init_params(&c.g, aec::syntax::ast::Init::Default, 3);
        c.inputs = vec![Buf::F32((0..12).map(|i| (i as f32 * 0.37).fract()).collect())];
        let loss = c.g.output("loss").expect("loss");
        c.check(loss, &format!("vae bce({rec}) + kl({kl})"));
    }
}

#[test]
fn sparsity_and_contractive_penalties_against_finite_differences() {
    // Each penalty alone would do; with the reconstruction loss, as it trains: sparsity at two
    // rates (one the units are far from), contractive with a sigmoid and a tanh code, at odd
    // sizes and a batch of 3.
    for (code, act, term) in [
        (5, "sigmoid", "0.3 * sparsity(code, rho: 0.05)"),
        (3, "sigmoid", "2 * sparsity(code, rho: 0.7)"),
        (5, "sigmoid", "0.5 * contractive(code)"),
        (7, "tanh", "0.5 * contractive(code, reduction: sum)"),
    ] {
        let src = format!(
            "model p {{ input x: [6]\n encoder {{ dense {code} -> {act} }}\n decoder {{ dense 6 -> sigmoid }}\n \
             loss mse(x) + {term} }}"
        );
        let compiled = aec::compile(&src, &aec::Config { batch: Some(3) }).expect("compiles");
        let mut c = Case::new(29);
        c.g = compiled.forward.clone();
        c.params = aec::runtime::init::init_params(&c.g, aec::syntax::ast::Init::Default, 5);
        c.inputs = vec![Buf::F32((0..18).map(|i| (i as f32 * 0.61).fract()).collect())];
        let loss = c.g.output("loss").expect("loss");
        c.check(loss, &format!("{act} code of {code}: {term}"));
    }
}

/// A shipped spec lowered at a batch of 2, as it trains, with random inputs (ids within their
/// vocabulary), its initial parameters, and its gradients as autodiff computes them.
struct SpecCase {
    g: Graph,
    params: Vec<Vec<f32>>,
    inputs: Vec<Buf>,
    grads: Vec<Vec<f32>>,
}

fn spec_case(name: &str) -> SpecCase {
    use aec::sema::Ty;
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("specs/{name}.ae"));
    let src = std::fs::read_to_string(path).expect("spec");
    // A summed loss is in the hundreds even at batch 2: f32 differences of it cannot resolve
    // gradients of 1e-2. Its terms are checked as means (a reduction is one `scale`, and
    // `a_vae_loss_with_every_reduction_against_finite_differences` checks the sums).
    let src = src.replace("reduction: sum", "reduction: mean");
    // The 28×28 and 32×32 image specs are checked on 12×12 and 16×16 images: every layer,
    // link and normalization the same, at a fraction of the interpreter's time.
    let src = src.replace("[1, 28, 28]", "[1, 12, 12]").replace("[1, 32, 32]", "[1, 16, 16]");
    // The text spec's 2500-word vocabularies and 256-wide GRUs, as 40 words and 24 units.
    let src = src
        .replace("token[2500]", "token[40]")
        .replace("dense 2500", "dense 40")
        .replace("gru 256", "gru 24");
    // The character autoencoder's 72 steps and 128-wide GRUs, as 12 and 16.
    let src = src.replace("seq[<= 72]", "seq[<= 12]").replace("gru 128", "gru 16");
    let compiled = aec::compile(&src, &aec::Config { batch: Some(2) }).expect("compiles");
    let g = compiled.forward.clone();
    let loss = g.output("loss").expect("loss");
    let back = autodiff::backward(&g, loss).expect("backward");
    let trained = |p: &aec::ir::ParamDef| p.role.trained();
    assert!(
        back.param_grads.iter().zip(&g.params).all(|(grad, p)| grad.is_some() == trained(p)),
        "{name}: a parameter without gradient (or a running statistic with one)"
    );
    aec::ir::verify(&back.graph).expect("verified");
    let mut rng = ChaCha8Rng::seed_from_u64(17);
    let vars: Vec<_> = compiled.model.variables().collect();
    let inputs: Vec<Buf> = g
        .inputs
        .iter()
        .map(|i| {
            let n = i.ty.numel();
            let vocab = vars.iter().find(|v| v.name == i.name).map_or(2, |v| match v.ty {
                Ty::Tokens { vocab, .. } | Ty::Token { vocab } => vocab as i32,
                _ => 2,
            });
            match i.ty.dtype {
                aec::ir::DType::F32 => Buf::F32((0..n).map(|_| rng.random::<f32>()).collect()),
                aec::ir::DType::I32 => Buf::I32((0..n).map(|_| rng.random_range(0..vocab)).collect()),
            }
        })
        .collect();
    let params = aec::runtime::init::init_params(&g, aec::syntax::ast::Init::Default, 5);
    let opts = interp::Options { check_finite: false, ..interp::Options::default() };
    let values = interp::run(&back.graph, &inputs, &mut State::new(params.clone()), &opts)
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    let grads = back.param_grads.iter().flatten().map(|id| values.get(*id).f32().to_vec()).collect();
    SpecCase { g, params, inputs, grads }
}

#[test]
fn every_shipped_spec_against_finite_differences() {
    // Whole specs: the loss (with its penalties) of every shipped spec differentiated by
    // autodiff and run on the interpreter, through the check `aec check` makes — per element on
    // a spread of every parameter, within a tolerance that scales with the tensor's gradients,
    // and along each gradient — and a spec whose every gradient is ~0 fails.
    let names = common::shipped_specs();
    assert!(names.len() >= 16, "{names:?}");
    common::each_in_parallel(&names, |name| {
        let c = spec_case(name);
        if c.g.params.is_empty() {
            // pool_odd, pool_roundtrip: a pool and its unpooling, nothing to differentiate.
            return;
        }
        let report = aec::runtime::check::check(&c.g, &c.params, &c.inputs, 5, false)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(
            report.passes(),
            "{name}: {:#?}",
            report.params.iter().filter(|p| !p.passes()).collect::<Vec<_>>()
        );
        let largest = c.grads.iter().flatten().fold(0f32, |m, g| m.max(g.abs()));
        assert!(largest > 1e-4, "{name}: every gradient is ~0 ({largest})");
    });
}

/// The check can fail: a gradient off by half everywhere, or with the sign of its largest
/// element flipped, fails it — for every weight of a dense, a convolutional and a GRU spec (the wide
/// layers under a mean loss, whose gradients are all small, included).
#[test]
fn a_wrong_gradient_fails_the_check() {
    use aec::runtime::check::check_mutated;
    for name in ["digits_mlp", "digits_conv", "seq_copy"] {
        let c = spec_case(name);
        let run = |mutate: &dyn Fn(usize, &mut [f32])| {
            check_mutated(&c.g, &c.params, &c.inputs, 5, false, mutate)
                .unwrap_or_else(|e| panic!("{name}: {e}"))
        };
        let clean = run(&|_, _| {});
        assert!(clean.passes(), "{name} fails unmutated");
        let mut tried = 0;
        for (p, def) in c.g.params.iter().enumerate() {
            // A gradient too small for the f32 loss to resolve along it is not checked there.
            if def.role != ParamRole::Weight || clean.params[p].dir_error.is_none() {
                continue;
            }
            tried += 1;
            let off = run(&|q, g| {
                if q == p {
                    g.iter_mut().for_each(|x| *x *= 1.5);
                }
            });
            assert!(!off.params[p].passes(), "{name}: {} off by half passes: {:?}", def.name, off.params[p]);
            // The element with the largest gradient, its sign flipped.
            let at = (0..c.grads[p].len())
                .max_by(|&i, &j| c.grads[p][i].abs().total_cmp(&c.grads[p][j].abs()))
                .expect("an element");
            let flipped = run(&|q, g| {
                if q == p {
                    g[at] = -g[at];
                }
            });
            assert!(
                !flipped.params[p].passes(),
                "{name}: {}[{at}] flipped passes: {:?}",
                def.name,
                flipped.params[p]
            );
        }
        assert!(tried >= 2, "{name}: only {tried} weights resolvable: {:#?}", clean.params);
    }
}

#[test]
fn recurrent_cells_through_time() {
    // Backpropagation through time for every cell at hidden sizes 1, 3, 5, 17 and lengths
    // 1, 2, 7: gradients of the input projections, the initial state, W_hh and b_hh — and of
    // the last step and a slice of it, as the encoder's code and an LSTM's h are taken.
    use aec::ir::Cell;
    for cell in [Cell::Rnn, Cell::Gru, Cell::Lstm] {
        for h in [1, 3, 5, 17] {
            for t in [1, 2, 7] {
                let what = format!("{} hidden {h} length {t}", cell.keyword());
                let (b, g, s) = (2, cell.gates() as usize * h, cell.state(h));
                let mut c = Case::new(30 + h as u64 * 10 + t as u64);
                let xp = c.param(&[b, t, g]);
                let h0 = c.param(&[b, s]);
                let w_hh = c.param(&[g, h]);
                let b_hh = c.param(&[g]);
                let hs = c.add(Op::Recurrent { cell, xp, h0, w_hh, b_hh: Some(b_hh) });
                c.check(hs, &what);

                let mut c = Case::new(31 + h as u64 * 10 + t as u64);
                let xp = c.param(&[b, t, g]);
                let h0 = c.param(&[b, s]);
                let w_hh = c.param(&[g, h]);
                let hs = c.add(Op::Recurrent { cell, xp, h0, w_hh, b_hh: None });
                let last = c.add(Op::LastStep { x: hs });
                let y = c.add(Op::SliceLast { x: last, start: 0, len: h });
                c.check(y, &format!("{what}, last h, no bias"));
            }
        }
    }
}

#[test]
fn repeat_and_sequence_views() {
    let mut c = Case::new(50);
    let x = c.param(&[3, 5]);
    let r = c.add(Op::Repeat { x, times: 4 });
    let p = c.add(Op::Unary { f: UnaryFn::Square, x: r });
    c.check(p, "repeat");
}

#[test]
fn concat_along_channels_and_features() {
    for (sa, sb) in
        [(vec![2, 3, 5, 7], vec![2, 2, 5, 7]), (vec![3, 5], vec![3, 1]), (vec![1, 1, 3, 1], vec![1, 4, 3, 1])]
    {
        let mut c = Case::new(31);
        let a = c.param(&sa);
        let b = c.param(&sb);
        let y = c.add(Op::Concat { a, b });
        c.check(y, &format!("concat {sa:?} {sb:?}"));
    }
}

#[test]
fn batch_norm_in_training_over_channels_and_features() {
    // Batch statistics: every input's gradient goes through the mean and the variance too.
    for shape in [vec![3, 5, 13, 9], vec![2, 3, 1, 1], vec![5, 7], vec![2, 1], vec![1, 2, 3, 2]] {
        let mut c = Case::new(32);
        let x = c.param(&shape);
        let ch = shape[1];
        let gamma = c.param(&[ch]);
        let beta = c.param(&[ch]);
        let stats = c.add(Op::BnStats { x });
        let y = c.add(Op::BatchNorm { x, stats, gamma, beta, eps: 1e-5 });
        c.check(y, &format!("batch_norm {shape:?}"));
    }
}

#[test]
fn fixed_normalization_and_its_folding() {
    let mut c = Case::new(33);
    let x = c.param(&[2, 3, 4, 5]);
    let m = c.input_f32(&[3], -1.0, 1.0);
    let v = c.input_f32(&[3], 0.5, 2.0);
    let gamma = c.input_f32(&[3], -1.0, 1.0);
    let beta = c.input_f32(&[3], -1.0, 1.0);
    let coeffs = c.add(Op::BnCoeffs { mean: m, var: v, gamma, beta, eps: 1e-5 });
    let y = c.add(Op::ChannelAffine { x, coeffs, axis: 1, shift: true });
    c.check(y, "channel_affine axis 1");
    for axis in [0, 1] {
        let mut c = Case::new(34);
        let w = c.param(&[3, 3, 2, 2]);
        let coeffs = c.input_f32(&[2, 3], -1.0, 1.0);
        let y = c.add(Op::ChannelAffine { x: w, coeffs, axis, shift: false });
        c.check(y, &format!("channel_affine axis {axis}"));
    }
}

#[test]
fn upsampling_nearest_and_bilinear_on_odd_sizes() {
    for (h, w, s) in [(5, 7, [2, 2]), (13, 9, [2, 2]), (3, 4, [3, 2]), (1, 1, [2, 2]), (4, 3, [1, 3])] {
        for bilinear in [false, true] {
            let mut c = Case::new(35);
            let x = c.param(&[2, 3, h, w]);
            let y = c.add(Op::Upsample { x, scale: s, bilinear });
            c.check(y, &format!("upsample {h}x{w} {s:?} bilinear {bilinear}"));
        }
    }
}

#[test]
fn a_quantized_code_against_its_definition() {
    // The straight-through estimator has no derivative to difference: the loss's true gradient
    // through the codebook lookup is zero almost everywhere. `aec check` holds the detached
    // values and the ids at their values at the parameters, so its differences are of the
    // surrogate loss that defines the estimator (van den Oord et al. 2017, eq. 3):
    // mse(dec(z + sg(z_q − z)), x) + λ(mse(z_q, sg(z)) + β·mse(z, sg(z_q))). Every parameter's
    // gradient must match them — the encoder's through the decoder, the codebook's from its
    // loss alone (a moving-average codebook has none) — on both backends; and the ids are the
    // nearest codebook vectors.
    for (code, layers, quantize) in [
        ("[5]", "dense 5", "quantize 6"),
        ("[3, 3, 5]", "conv 3 k3 p1", "quantize 6"),
        ("[5]", "dense 5", "quantize(ema: 0.8) 6"),
    ] {
        let input = if code == "[5]" { "[7]" } else { "[2, 3, 5]" };
        let src = format!(
            "model q {{ input x: {input}\n encoder {{ {} -> tanh\n {layers}\n {quantize} }}\n \
             decoder {{ {} -> sigmoid }}\n loss mse(x) + 0.7 * vq(code, beta: 0.3) }}",
            if code == "[5]" { "dense 9" } else { "conv 4 k3 p1" },
            if code == "[5]" { "dense 7" } else { "conv 2 k1" },
        );
        let compiled = aec::compile(&src, &aec::Config { batch: Some(3) }).expect("compiles");
        let g = compiled.forward.clone();
        let mut params = aec::runtime::init::init_params(&g, aec::syntax::ast::Init::Default, 5);
        // Codebook vectors as far apart as the encoder's outputs, so that several are picked.
        let cb =
            g.params.iter().position(|p| matches!(p.role, ParamRole::Codebook { .. })).expect("codebook");
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        params[cb].iter_mut().for_each(|v| *v = rng.random::<f32>() * 2.0 - 1.0);
        let n = g.inputs[0].ty.numel();
        let inputs = vec![Buf::F32((0..n).map(|_| rng.random::<f32>()).collect())];
        let report = aec::runtime::check::check(&g, &params, &inputs, 8, true).expect("checks");
        assert!(
            report.passes(),
            "{src}: {:#?}",
            report.params.iter().filter(|p| !p.passes()).collect::<Vec<_>>()
        );

        let opts = interp::Options { check_finite: false, ..interp::Options::default() };
        let values = interp::run(&g, &inputs, &mut State::new(params.clone()), &opts).expect("runs");
        let nearest = g.ids().find(|&id| matches!(g.node(id).op, Op::Nearest { .. })).expect("a quantizer");
        let Op::Nearest { x, .. } = g.node(nearest).op else { unreachable!() };
        let d = *g.ty(x).shape.last().expect("rows");
        let ids = values.output(&g, "code_ids").expect("ids").i32().to_vec();
        let rows: Vec<&[f32]> = values.get(x).f32().chunks(d).collect();
        let book: Vec<&[f32]> = params[cb].chunks(d).collect();
        let dist = |r: &[f32], e: &[f32]| r.iter().zip(e).map(|(a, b)| f64::from(a - b).powi(2)).sum::<f64>();
        assert_eq!(ids.len(), rows.len());
        let mut picked = std::collections::BTreeSet::new();
        for (r, &id) in rows.iter().zip(&ids) {
            let best = book.iter().map(|e| dist(r, e)).fold(f64::INFINITY, f64::min);
            assert!(dist(r, book[id as usize]) <= best + 1e-6, "{src}: id {id} is not the nearest");
            picked.insert(id);
        }
        assert!(picked.len() > 1, "{src}: one codebook vector for every row proves little");
    }
}
