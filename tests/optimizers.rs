//! The interpreter's `update` op against PyTorch's documented update rules, coded here
//! independently in f64 (torch.optim.SGD, Adam, AdamW and RMSprop, "Algorithm" sections; the
//! clipping of `clip_grad_value_` and `clip_grad_norm_`), and at a learning rate set per step.

use aec::interp::{self, Buf};
use aec::ir::{Clip, Graph, Op, OptimizerFn, ParamDef, ParamId, ParamRole, Type};
use aec::runtime::State;

const GRADS: [[f64; 4]; 3] = [[0.5, -1.0, 2.0, 0.0], [0.25, 0.5, -3.0, 1.0], [-0.5, 0.0, 1.0, 2.0]];
const START: [f64; 4] = [1.0, -2.0, 0.5, 3.0];

/// Runs three updates of a 4-element parameter with the gradients above.
fn run(f: OptimizerFn) -> Vec<f32> {
    run_with(f, Clip::None, &[None; 3])
}

/// `run` with clipping, and the learning rate of each step (`None`: the optimizer's).
fn run_with(f: OptimizerFn, clip: Clip, lrs: &[Option<f64>; 3]) -> Vec<f32> {
    let mut g = Graph::new("opt");
    g.add_param(ParamDef {
        name: "p".into(),
        shape: vec![4],
        role: ParamRole::Weight,
        fan_in: 1,
        fan_out: 1,
    })
    .expect("param");
    let grad = g.add_input("g", Type::f32([4])).expect("input");
    g.add(Op::Update { f, clip, param: ParamId(0), grad }, None).expect("update");
    let mut state = State::new(vec![START.iter().map(|&x| x as f32).collect()]);
    for (grads, lr) in GRADS.iter().zip(lrs) {
        let input = Buf::F32(grads.iter().map(|&x| x as f32).collect());
        let opts = interp::Options { lr: *lr, ..interp::Options::default() };
        interp::run(&g, &[input], &mut state, &opts).expect("runs");
    }
    state.params[0].clone()
}

fn close(got: &[f32], want: &[f64]) {
    for (g, w) in got.iter().zip(want) {
        assert!(
            (f64::from(*g) - w).abs() <= 1e-5 * w.abs().max(1.0),
            "got {got:?}, PyTorch's rule gives {want:?}"
        );
    }
}

#[test]
fn sgd_with_momentum_nesterov_and_weight_decay() {
    for (momentum, nesterov, wd) in
        [(0.0, false, 0.0), (0.9, false, 0.0), (0.9, true, 0.01), (0.5, false, 0.1)]
    {
        let (lr, mut theta, mut buf) = (0.1, START, [0.0; 4]);
        for (t, grads) in GRADS.iter().enumerate() {
            for i in 0..4 {
                let mut g = grads[i] + wd * theta[i];
                if momentum != 0.0 {
                    buf[i] = if t == 0 { g } else { momentum * buf[i] + g };
                    g = if nesterov { g + momentum * buf[i] } else { buf[i] };
                }
                theta[i] -= lr * g;
            }
        }
        let f =
            OptimizerFn::Sgd { lr: lr as f32, momentum: momentum as f32, nesterov, weight_decay: wd as f32 };
        close(&run(f), &theta);
    }
}

/// PyTorch's Adam (or with `decoupled` AdamW) over the three gradients, in f64: lr 0.01,
/// β 0.9 and 0.999, ε 1e-8, weight decay `wd`.
fn adam_reference(wd: f64, decoupled: bool) -> [f64; 4] {
    let (lr, b1, b2, eps) = (0.01, 0.9, 0.999, 1e-8);
    let (mut theta, mut m, mut v) = (START, [0.0; 4], [0.0; 4]);
    for (t, grads) in GRADS.iter().enumerate() {
        let t = t as i32 + 1;
        for i in 0..4 {
            let g = if decoupled {
                // AdamW: θ ← θ·(1 − lr·λ), then Adam's step on the gradient as it is.
                theta[i] *= 1.0 - lr * wd;
                grads[i]
            } else {
                grads[i] + wd * theta[i]
            };
            m[i] = b1 * m[i] + (1.0 - b1) * g;
            v[i] = b2 * v[i] + (1.0 - b2) * g * g;
            let m_hat = m[i] / (1.0 - f64::powi(b1, t));
            let v_hat = v[i] / (1.0 - f64::powi(b2, t));
            theta[i] -= lr * m_hat / (v_hat.sqrt() + eps);
        }
    }
    theta
}

fn adam(wd: f64, decoupled: bool) -> OptimizerFn {
    OptimizerFn::Adam { lr: 0.01, b1: 0.9, b2: 0.999, eps: 1e-8, weight_decay: wd as f32, decoupled }
}

#[test]
fn adam_with_bias_correction_and_weight_decay() {
    for wd in [0.0, 0.01] {
        close(&run(adam(wd, false)), &adam_reference(wd, false));
    }
}

#[test]
fn adamw_decays_the_parameter_not_the_gradient() {
    // A large λ makes the difference from Adam's L2 decay (the gradient's) show.
    for wd in [0.0, 0.01, 0.5] {
        close(&run(adam(wd, true)), &adam_reference(wd, true));
    }
}

/// PyTorch's RMSprop over the three gradients, in f64: lr 0.01, α 0.9, ε 1e-8.
fn rmsprop_reference(wd: f64, momentum: f64, centered: bool) -> [f64; 4] {
    let (lr, alpha, eps) = (0.01, 0.9, 1e-8);
    let (mut theta, mut sq, mut buf, mut avg) = (START, [0.0; 4], [0.0; 4], [0.0; 4]);
    for grads in GRADS {
        for i in 0..4 {
            let g = grads[i] + wd * theta[i];
            sq[i] = alpha * sq[i] + (1.0 - alpha) * g * g;
            let mut d = if centered {
                avg[i] = alpha * avg[i] + (1.0 - alpha) * g;
                (sq[i] - avg[i] * avg[i]).sqrt()
            } else {
                sq[i].sqrt()
            };
            d += eps;
            if momentum > 0.0 {
                buf[i] = momentum * buf[i] + g / d;
                theta[i] -= lr * buf[i];
            } else {
                theta[i] -= lr * g / d;
            }
        }
    }
    theta
}

#[test]
fn rmsprop_plain_centered_and_with_momentum() {
    for (wd, momentum, centered) in
        [(0.0, 0.0, false), (0.1, 0.0, false), (0.0, 0.9, false), (0.01, 0.5, true)]
    {
        let f = OptimizerFn::RmsProp {
            lr: 0.01,
            alpha: 0.9,
            eps: 1e-8,
            weight_decay: wd as f32,
            momentum: momentum as f32,
            centered,
        };
        close(&run(f), &rmsprop_reference(wd, momentum, centered));
    }
}

/// Plain SGD at lr 1 over the three gradients after `clip`, in f64.
fn clipped_sgd(clip: impl Fn(&[f64; 4]) -> [f64; 4]) -> [f64; 4] {
    let mut theta = START;
    for grads in GRADS {
        let g = clip(&grads);
        for i in 0..4 {
            theta[i] -= g[i];
        }
    }
    theta
}

#[test]
fn clipping_by_value_and_by_norm() {
    let sgd = OptimizerFn::Sgd { lr: 1.0, momentum: 0.0, nesterov: false, weight_decay: 0.0 };
    let by_value = clipped_sgd(|g| g.map(|x| x.clamp(-0.75, 0.75)));
    close(&run_with(sgd, Clip::Value(0.75), &[None; 3]), &by_value);
    // clip_grad_norm_: g·min(1, c/(‖g‖ + 1e-6)). The gradients' norms are 2.29, 3.21 and
    // 2.29: 1 and 2 scale each of them, 10 none.
    for c in [1.0, 2.0, 10.0] {
        let by_norm = clipped_sgd(|g| {
            let norm = g.iter().map(|x| x * x).sum::<f64>().sqrt();
            let k = (c / (norm + 1e-6)).min(1.0);
            g.map(|x| x * k)
        });
        close(&run_with(sgd, Clip::Norm(c as f32), &[None; 3]), &by_norm);
    }
}

#[test]
fn a_learning_rate_set_per_step_replaces_the_optimizers() {
    let lrs = [Some(0.5), Some(0.25), Some(0.125)];
    let sgd = OptimizerFn::Sgd { lr: 1.0, momentum: 0.0, nesterov: false, weight_decay: 0.0 };
    let mut theta = START;
    for (grads, lr) in GRADS.iter().zip([0.5, 0.25, 0.125]) {
        for i in 0..4 {
            theta[i] -= lr * grads[i];
        }
    }
    close(&run_with(sgd, Clip::None, &lrs), &theta);
    // Adam's step size is the step's rate over its bias correction.
    let (b1, b2, eps) = (0.9f64, 0.999f64, 1e-8);
    let (mut theta, mut m, mut v) = (START, [0.0; 4], [0.0; 4]);
    for (t, (grads, lr)) in GRADS.iter().zip([0.5, 0.25, 0.125]).enumerate() {
        let t = t as i32 + 1;
        for i in 0..4 {
            m[i] = b1 * m[i] + (1.0 - b1) * grads[i];
            v[i] = b2 * v[i] + (1.0 - b2) * grads[i] * grads[i];
            theta[i] -= lr * (m[i] / (1.0 - b1.powi(t))) / ((v[i] / (1.0 - b2.powi(t))).sqrt() + eps);
        }
    }
    close(&run_with(adam(0.0, false), Clip::None, &lrs), &theta);
}
