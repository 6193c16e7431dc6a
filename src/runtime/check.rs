//! `aec check`: a gradient check of a user's own spec. Every parameter's gradient, as autodiff
//! computes it on the interpreter, against central finite differences of the loss; and the
//! native code's loss and gradients against the interpreter's.
//!
//! Two comparisons with central differences, each at three step sizes (a ReLU kink or a
//! max-pool switch crossed between the two evaluations of a difference spoils that step — for
//! unpooling, a switch that flips is a jump — not all three, while a wrong gradient is wrong at
//! every step):
//! - per element, on a spread of each parameter's elements and the one with the largest
//!   gradient, within a tolerance that scales with the tensor's largest gradient (a wrong
//!   element of a wide layer under a mean loss, whose gradients are all small, still stands
//!   out);
//! - along the gradient's own direction `v = g/|g|`, where the loss changes by `|g|` per unit
//!   step: the whole tensor at once, so a gradient off by a factor everywhere is seen even where
//!   every element is too small for its own difference.
//!
//! A difference whose two evaluations see other max-pool switches than the parameters do is
//! skipped: the loss jumps there (unpooling moves values with their switches).
//!
//! Detached values (`stop_grad`: a quantized code's straight-through estimator and its losses'
//! targets) and a quantizer's ids are held at their values at the parameters while the
//! differences are taken: the check is then of the surrogate loss the estimator defines, whose
//! exact gradient autodiff must give.

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
    /// Elements compared with finite differences (an element whose every step crossed a
    /// max-pool switch is not).
    pub sampled: usize,
    /// The largest relative difference between autodiff and finite differences (at the best
    /// of the three steps), over the sampled elements.
    pub fd_error: f64,
    /// Sampled elements that no step agreed on.
    pub fd_missed: usize,
    /// The relative difference between `|g|` and the loss's rate of change along `g/|g|` (the
    /// best of the steps; 0 for a zero gradient; `None` when every step crossed a max-pool
    /// switch, or the gradient is too small for the f32 loss to resolve its rate).
    pub dir_error: Option<f64>,
    /// The largest relative difference between the native gradient and the interpreter's
    /// (`None` when the native step was not run).
    pub native_error: Option<f64>,
}

/// Per element, a difference within `ABS · (the tensor's largest gradient) + REL · max(|a|,
/// |b|)` (plus what the f32 loss cannot resolve) agrees.
const ABS: f64 = 1e-2;
const REL: f64 = 3e-2;
/// Along the gradient, the rate of change agrees with `|g|` within this. Differences of an f32
/// loss resolve that rate only to a few percent on real data (measured: up to 13% on the
/// shipped specs at the smallest steps their rounding allows), so this gates a gradient off by
/// a factor — a lost ½ or a sum taken for a mean — not by 1%.
const DIR_REL: f64 = 0.25;
/// The steps along the gradient, smallest first (a unit direction: each element moves by
/// less).
const DIR_STEPS: [f32; 7] = [1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2];
/// Native code against the interpreter (both f32; they sum in different orders): within
/// `NATIVE_REL` relative, above a floor of `NATIVE_FLOOR` of the tensor's largest gradient.
const NATIVE_REL: f64 = 1e-3;
const NATIVE_FLOOR: f64 = 2e-3;
/// The step sizes of the differences.
const STEPS: [f32; 3] = [1e-3, 3e-4, 1e-4];

impl ParamCheck {
    /// Whether the parameter passes: every sampled element agreed at some step — or one in 25
    /// missed, as a kink crossed at all three steps can — the rate along the gradient is its
    /// norm, and the native gradient agrees.
    pub fn passes(&self) -> bool {
        self.fd_missed * 25 <= self.sampled
            && self.dir_error.is_none_or(|e| e <= DIR_REL)
            && self.native_error.is_none_or(|e| e <= NATIVE_REL)
    }
}

/// The spread of a parameter's `n` elements the per-element check samples (at most
/// `per_param`; the element with the largest gradient is checked too).
fn sampled(n: usize, per_param: usize) -> impl Iterator<Item = usize> {
    (0..n).step_by(n.div_ceil(per_param.max(1)).max(1))
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

/// Relative difference of `a` and `b` with `floor` as the absolute tolerance.
fn relative_above(a: f64, b: f64, floor: f64) -> f64 {
    (a - b).abs() / (floor / REL + a.abs().max(b.abs()))
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
    check_mutated(forward, params, inputs, per_param, native, &|_, _| {})
}

/// [`check`] of the gradients autodiff gives changed by `mutate(parameter, gradient)`: the
/// tests' way to show that a wrong gradient fails.
pub fn check_mutated(
    forward: &Graph,
    params: &[Vec<f32>],
    inputs: &[Buf],
    per_param: usize,
    native: bool,
    mutate: &dyn Fn(usize, &mut [f32]),
) -> Result<Report, String> {
    let loss = forward.output("loss").ok_or("the graph has no loss")?;
    let mut back = autodiff::backward(forward, loss)?;
    let opts = interp::Options { check_finite: false, ..interp::Options::default() };
    let values = interp::run(&back.graph, inputs, &mut State::new(params.to_vec()), &opts)
        .map_err(|e| e.to_string())?;
    // The loss at `ps`, or `None` when a max-pool switch differs from the one at `params`: the
    // loss jumps there (unpooling moves values with their switches), and a difference across
    // a jump is no derivative.
    let pools: Vec<_> =
        forward.ids().filter(|&id| matches!(forward.node(id).op, crate::ir::Op::PoolArgmax { .. })).collect();
    let switches =
        |v: &interp::Values| -> Vec<i32> { pools.iter().flat_map(|&id| v.get(id).i32()).copied().collect() };
    let base = switches(&values);
    // Detached values and a quantizer's ids stay as they are at `params` (the straight-through
    // estimator's surrogate loss, whose gradient autodiff computes).
    let eval = |ps: &[Vec<f32>]| -> Result<Option<f64>, String> {
        let v = interp::run_frozen(forward, inputs, &mut State::new(ps.to_vec()), &opts, Some(&values))
            .map_err(|e| e.to_string())?;
        Ok((switches(&v) == base).then(|| f64::from(v.get(loss).f32()[0])))
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
        if !forward.params[p].role.trained() {
            // A running statistic or an EMA codebook: no gradient, the training step updates
            // it itself.
            continue;
        }
        let n = params[p].len();
        let computed = grad.map_or(vec![0.0; n], |id| values.get(id).f32().to_vec());
        let mut analytic = computed.clone();
        mutate(p, &mut analytic);
        let scale = analytic.iter().fold(0f64, |m, &g| m.max(f64::from(g).abs()));
        let (mut sampled_n, mut missed, mut worst) = (0, 0, 0f64);
        // The spread, and the element with the largest gradient, where a wrong one shows most.
        let largest = (0..n).max_by(|&i, &j| analytic[i].abs().total_cmp(&analytic[j].abs()));
        let mut elements: Vec<usize> = sampled(n, per_param).collect();
        elements.extend(largest.filter(|i| !elements.contains(i)));
        for i in elements {
            let a = f64::from(analytic[i]);
            let mut best = f64::INFINITY;
            for eps in STEPS {
                let mut plus = params.to_vec();
                plus[p][i] += eps;
                let mut minus = params.to_vec();
                minus[p][i] -= eps;
                let (Some(up), Some(down)) = (eval(&plus)?, eval(&minus)?) else { continue };
                let numeric = (up - down) / (2.0 * f64::from(eps));
                // A summed loss in the hundreds rounds to a few 1e-5: the difference of two
                // such values cannot tell gradients apart below that, over the step.
                best = best.min(relative_above(a, numeric, ABS * scale + resolution(loss_value, eps)));
                if best <= REL {
                    break;
                }
            }
            if best.is_infinite() {
                // Every step crossed a switch: this element cannot be checked here.
                continue;
            }
            sampled_n += 1;
            missed += usize::from(best > REL);
            worst = worst.max(best);
        }
        let dir_error = along_gradient(&eval, params, p, &analytic, loss_value)?;
        let native_error = native_values.as_ref().map(|(_, grads)| match &grads[p] {
            Some(g) => g
                .iter()
                .zip(&computed)
                .map(|(&x, &y)| relative_above(f64::from(x), f64::from(y), NATIVE_FLOOR * scale))
                .fold(0.0, f64::max),
            None => 0.0,
        });
        out.push(ParamCheck {
            name: forward.params[p].name.clone(),
            elements: n,
            sampled: sampled_n,
            fd_error: worst,
            fd_missed: missed,
            dir_error,
            native_error,
        });
    }
    Ok(Report { params: out, loss: loss_value, native_loss: native_values.and_then(|(l, _)| l) })
}

/// The loss at some parameters; `None` when a max-pool switch differs from the parameters'.
type Eval<'a> = dyn Fn(&[Vec<f32>]) -> Result<Option<f64>, String> + 'a;

/// The relative difference between `|g|` and the central difference of the loss along
/// `g/|g|` (every element of parameter `p` moved at once), the better of the two smallest
/// steps whose rounding is well inside the tolerance and that cross no max-pool switch: larger
/// steps cross more ReLU kinks, whose error varies with the step (the best of many would let a
/// wrong gradient match one of them).
fn along_gradient(
    eval: &Eval,
    params: &[Vec<f32>],
    p: usize,
    g: &[f32],
    loss: f64,
) -> Result<Option<f64>, String> {
    let norm = g.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>().sqrt();
    if norm == 0.0 {
        return Ok(Some(0.0));
    }
    let mut rates = Vec::new();
    for eps in DIR_STEPS {
        // The loss's rounding alone would be more than a tenth of the tolerance.
        if resolution(loss, eps) > 0.1 * DIR_REL * norm {
            continue;
        }
        let step = |sign: f64| {
            let mut ps = params.to_vec();
            for (w, &x) in ps[p].iter_mut().zip(g) {
                *w = (f64::from(*w) + sign * f64::from(eps) * f64::from(x) / norm) as f32;
            }
            ps
        };
        let (Some(up), Some(down)) = (eval(&step(1.0))?, eval(&step(-1.0))?) else { continue };
        let rate = (up - down) / (2.0 * f64::from(eps));
        rates.push((rate - norm).abs() / norm);
        if rates.len() == 2 {
            break;
        }
    }
    // None when every step crossed a switch, or the gradient is too small for the loss's
    // rounding: nothing to compare.
    Ok(rates.into_iter().reduce(f64::min))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Relative difference of `a` and `b` for a tensor whose largest gradient is about 0.2.
    fn relative(a: f64, b: f64) -> f64 {
        relative_above(a, b, ABS * 0.2)
    }

    #[test]
    fn a_parameter_passes_only_when_its_gradients_agree() {
        let good = ParamCheck {
            name: "w".into(),
            elements: 50,
            sampled: 25,
            fd_error: 1e-3,
            fd_missed: 1,
            dir_error: Some(1e-4),
            native_error: Some(1e-6),
        };
        assert!(good.passes());
        assert!(!ParamCheck { fd_missed: 2, ..good.clone() }.passes());
        assert!(!ParamCheck { native_error: Some(0.1), ..good.clone() }.passes());
        assert!(!ParamCheck { dir_error: Some(0.5), ..good.clone() }.passes());
        assert!(ParamCheck { dir_error: Some(0.1), ..good.clone() }.passes());
        assert!(ParamCheck { dir_error: None, ..good.clone() }.passes());
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
