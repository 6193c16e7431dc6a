//! The interpreter's `update` op against PyTorch's documented update rules, coded here
//! independently in f64 (torch.optim.SGD, torch.optim.Adam and torch.optim.AdamW, "Algorithm"
//! sections).

use aec::interp::{self, Buf};
use aec::ir::{Graph, Op, OptimizerFn, ParamDef, ParamId, ParamRole, Type};
use aec::runtime::State;

const GRADS: [[f64; 4]; 3] = [[0.5, -1.0, 2.0, 0.0], [0.25, 0.5, -3.0, 1.0], [-0.5, 0.0, 1.0, 2.0]];
const START: [f64; 4] = [1.0, -2.0, 0.5, 3.0];

/// Runs three updates of a 4-element parameter with the gradients above.
fn run(f: OptimizerFn) -> Vec<f32> {
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
    g.add(Op::Update { f, param: ParamId(0), grad }, None).expect("update");
    let mut state = State::new(vec![START.iter().map(|&x| x as f32).collect()]);
    for grads in GRADS {
        let input = Buf::F32(grads.iter().map(|&x| x as f32).collect());
        interp::run(&g, &[input], &mut state, &interp::Options::default()).expect("runs");
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
