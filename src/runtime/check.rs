//! `aec check`: a gradient check of a user's own spec. Every parameter's gradient, as autodiff
//! computes it on the interpreter, against central finite differences of the loss; and the
//! native code's loss and gradients against the interpreter's.
//!
//! Finite differences sample a spread of each parameter's elements, each at three step sizes:
//! a ReLU kink or a max-pool switch crossed between the two evaluations of a difference spoils
//! that step (for unpooling, a switch that flips is a jump), not all three, while a wrong
//! gradient is wrong at every step.

use super::State;
use crate::autodiff;
use crate::codegen::{Options, Program};
use crate::interp::{self, Buf};
use crate::ir::Graph;

/// The check of one parameter.
#[derive(Clone, Debug, PartialEq)]
pub struct ParamCheck {
    pub name: String,
    pub elements: usize,
    /// Elements compared with finite differences.
    pub sampled: usize,
    /// The largest relative difference between autodiff and finite differences (at the best
    /// of the three steps), over the sampled elements.
    pub fd_error: f64,
    /// Sampled elements that no step agreed on.
    pub fd_missed: usize,
    /// The largest relative difference between the native gradient and the interpreter's
    /// (`None` when the native step was not run).
    pub native_error: Option<f64>,
}

/// Tolerances: a difference within `ABS + REL · max(|a|, |b|)` agrees.
const ABS: f64 = 2e-3;
const REL: f64 = 3e-2;
/// Native code against the interpreter (both f32; they sum in different orders).
const NATIVE_REL: f64 = 1e-3;

impl ParamCheck {
    /// Whether the parameter passes: every sampled element agreed at some step — or one in 25
    /// missed, as a kink crossed at all three steps can — and the native gradient agrees.
    pub fn passes(&self) -> bool {
        self.fd_missed * 25 <= self.sampled && self.native_error.is_none_or(|e| e <= NATIVE_REL)
    }
}

/// The whole report.
#[derive(Clone, Debug, PartialEq)]
pub struct Report {
    pub params: Vec<ParamCheck>,
    /// The loss on the interpreter, and natively.
    pub loss: f64,
    pub native_loss: Option<f64>,
}

impl Report {
    pub fn passes(&self) -> bool {
        self.params.iter().all(ParamCheck::passes)
            && self.native_loss.is_none_or(|n| (n - self.loss).abs() <= 1e-5 + NATIVE_REL * self.loss.abs())
    }
}

/// Relative difference of `a` and `b`, measured against the tolerance's scale.
fn relative(a: f64, b: f64) -> f64 {
    relative_above(a, b, 0.0)
}

/// `relative` with `floor` added to the absolute tolerance: what a difference cannot resolve.
fn relative_above(a: f64, b: f64, floor: f64) -> f64 {
    (a - b).abs() / ((ABS + floor) / REL + a.abs().max(b.abs()))
}

/// What a central difference at step `eps` of an f32 loss of size `loss` cannot resolve: two
/// roundings of the loss (an ulp each, 2⁻²³ of it at most) over the step `2·eps`.
fn resolution(loss: f64, eps: f32) -> f64 {
    loss.abs() * f64::powi(2.0, -23) / f64::from(eps)
}

/// Checks the gradients of `forward`'s output `loss` at `params` on `inputs`, sampling at most
/// `per_param` elements of each parameter; `native` also runs the native code.
pub fn check(
    forward: &Graph,
    params: &[Vec<f32>],
    inputs: &[Buf],
    per_param: usize,
    native: bool,
) -> Result<Report, String> {
    let loss = forward.output("loss").ok_or("the graph has no loss")?;
    let mut back = autodiff::backward(forward, loss)?;
    let opts = interp::Options { check_finite: false, ..interp::Options::default() };
    let values = interp::run(&back.graph, inputs, &mut State::new(params.to_vec()), &opts)
        .map_err(|e| e.to_string())?;
    let eval = |ps: &[Vec<f32>]| -> Result<f64, String> {
        let v =
            interp::run(forward, inputs, &mut State::new(ps.to_vec()), &opts).map_err(|e| e.to_string())?;
        Ok(f64::from(v.get(loss).f32()[0]))
    };
    let loss_value = f64::from(values.get(loss).f32()[0]);
    // The native gradients: the backward graph with every gradient as an output.
    let native_values = if native {
        for (p, grad) in back.param_grads.iter().enumerate() {
            if let Some(id) = grad {
                back.graph.outputs.push((format!("grad.{p}"), *id));
            }
        }
        let mut program = Program::compile(&back.graph, Options::default())?;
        program.set_state(&State::new(params.to_vec()))?;
        program.run(inputs, opts.seed, opts.step).map_err(|e| e.to_string())?;
        let loss = program.output("loss").map(|b| f64::from(b.f32()[0]));
        let grads: Vec<Option<Vec<f32>>> = (0..params.len())
            .map(|p| program.output(&format!("grad.{p}")).map(|b| b.f32().to_vec()))
            .collect();
        Some((loss, grads))
    } else {
        None
    };
    let mut out = Vec::new();
    for (p, grad) in back.param_grads.iter().enumerate() {
        let n = params[p].len();
        let analytic = grad.map_or(vec![0.0; n], |id| values.get(id).f32().to_vec());
        let (mut sampled, mut missed, mut worst) = (0, 0, 0f64);
        for i in (0..n).step_by(n.div_ceil(per_param.max(1)).max(1)) {
            let a = f64::from(analytic[i]);
            let mut best = f64::INFINITY;
            for eps in [1e-3f32, 3e-4, 1e-4] {
                let mut plus = params.to_vec();
                plus[p][i] += eps;
                let mut minus = params.to_vec();
                minus[p][i] -= eps;
                let numeric = (eval(&plus)? - eval(&minus)?) / (2.0 * f64::from(eps));
                // A summed loss in the hundreds rounds to a few 1e-5: the difference of two
                // such values cannot tell gradients apart below that, over the step.
                best = best.min(relative_above(a, numeric, resolution(loss_value, eps)));
                if best <= REL {
                    break;
                }
            }
            sampled += 1;
            missed += usize::from(best > REL);
            worst = worst.max(best);
        }
        let native_error = native_values.as_ref().map(|(_, grads)| match &grads[p] {
            Some(g) => g
                .iter()
                .zip(&analytic)
                .map(|(&x, &y)| relative(f64::from(x), f64::from(y)))
                .fold(0.0, f64::max),
            None => 0.0,
        });
        out.push(ParamCheck {
            name: forward.params[p].name.clone(),
            elements: n,
            sampled,
            fd_error: worst,
            fd_missed: missed,
            native_error,
        });
    }
    Ok(Report { params: out, loss: loss_value, native_loss: native_values.and_then(|(l, _)| l) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_parameter_passes_only_when_its_gradients_agree() {
        let good = ParamCheck {
            name: "w".into(),
            elements: 50,
            sampled: 25,
            fd_error: 1e-3,
            fd_missed: 1,
            native_error: Some(1e-6),
        };
        assert!(good.passes());
        assert!(!ParamCheck { fd_missed: 2, ..good.clone() }.passes());
        assert!(!ParamCheck { native_error: Some(0.1), ..good.clone() }.passes());
        assert!(relative(1.0, 1.01) < REL && relative(1.0, 1.1) > REL);
    }

    #[test]
    fn the_floor_grows_with_the_loss_and_shrinks_with_the_step() {
        // A loss of 100 rounds to about 1e-5: at a step of 1e-3 a difference below 1e-2 is noise.
        let floor = resolution(100.0, 1e-3);
        assert!((0.01..0.02).contains(&floor), "{floor}");
        assert!(resolution(100.0, 1e-4) > floor && resolution(1.0, 1e-3) < floor);
        assert!(relative_above(0.05, 0.06, floor) < REL && relative(0.05, 0.06) > REL);
    }
}
