//! Learning-rate schedules: the learning rate of every step, as PyTorch's `lr_scheduler` of
//! the same name gives it on the same settings (`tests/torch/check_schedules.py` compares
//! them step by step).
//!
//! Epoch-stepped schedules (all but `onecycle`) are closed forms of the epoch, counted from 0
//! at the start of the whole network's training; `onecycle` is a closed form of the step;
//! `plateau` keeps a state that the validation loss moves once per epoch, saved with every
//! checkpoint. Pretraining stages (`pretrain greedy`) train at the optimizer's own rate.

use crate::syntax::ast::Schedule;

/// `ReduceLROnPlateau`'s state: the rate now, the best loss so far (`None` before the first
/// epoch, PyTorch's +∞), the epochs without improvement, and those left to cool down.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PlateauState {
    pub lr: f64,
    pub best: Option<f64>,
    pub bad_epochs: u64,
    pub cooldown: u64,
}

impl PlateauState {
    pub fn new(lr: f64) -> PlateauState {
        PlateauState { lr, best: None, bad_epochs: 0, cooldown: 0 }
    }

    /// `scheduler.step(val_loss)` at the end of an epoch: whether the rate was reduced.
    pub fn observe(&mut self, loss: f64, rule: &Schedule) -> bool {
        let Schedule::Plateau { factor, patience, min_lr, threshold, cooldown } = *rule else {
            return false;
        };
        // mode "min", threshold_mode "rel": better when below best·(1 − threshold).
        if self.best.is_none_or(|b| loss < b * (1.0 - threshold)) {
            self.best = Some(loss);
            self.bad_epochs = 0;
        } else {
            self.bad_epochs += 1;
        }
        if self.cooldown > 0 {
            self.cooldown -= 1;
            self.bad_epochs = 0;
        }
        if self.bad_epochs > patience {
            self.bad_epochs = 0;
            self.cooldown = cooldown;
            let new = (self.lr * factor).max(min_lr);
            // PyTorch's `eps`: changes smaller than 1e-8 are ignored.
            if self.lr - new > 1e-8 {
                self.lr = new;
                return true;
            }
        }
        false
    }
}

/// The learning rate of a step: `base` the optimizer's, `epoch` the epoch it belongs to and
/// `step` its number (both from 0, counted over the whole network's training), `total` the
/// steps of that training (for `onecycle`), `plateau` that schedule's state.
pub fn lr(
    s: &Schedule,
    base: f64,
    (epoch, step, total): (u64, u64, u64),
    plateau: Option<&PlateauState>,
) -> f64 {
    match s {
        Schedule::Step { every, gamma } => base * gamma.powi((epoch / every) as i32),
        Schedule::MultiStep { at, gamma } => {
            base * gamma.powi(at.iter().filter(|&&m| m <= epoch).count() as i32)
        }
        Schedule::Exponential { gamma } => base * gamma.powi(epoch as i32),
        Schedule::Cosine { t_max, min_lr, warmup } => {
            if epoch < *warmup {
                // LinearLR(start_factor = 1/(N+1), total_iters = N): lr·(e+1)/(N+1).
                return base * (epoch + 1) as f64 / (warmup + 1) as f64;
            }
            let e = (epoch - warmup) as f64;
            min_lr + (base - min_lr) * (1.0 + (std::f64::consts::PI * e / *t_max as f64).cos()) / 2.0
        }
        Schedule::OneCycle { max_lr, pct_start, div_factor, final_div_factor } => {
            let initial = max_lr / div_factor;
            let min = initial / final_div_factor;
            // Two phases ending at these steps, cosine annealing within each.
            let end1 = pct_start * total as f64 - 1.0;
            let end2 = total as f64 - 1.0;
            let t = step as f64;
            let anneal = |from: f64, to: f64, pct: f64| {
                to + (from - to) / 2.0 * ((std::f64::consts::PI * pct).cos() + 1.0)
            };
            if t <= end1 {
                anneal(initial, *max_lr, t / end1)
            } else {
                anneal(*max_lr, min, (t - end1) / (end2 - end1))
            }
        }
        Schedule::Plateau { .. } => plateau.map_or(base, |p| p.lr),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) {
        assert!((a - b).abs() <= 1e-12 * b.abs().max(1e-30), "{a} ≠ {b}");
    }

    #[test]
    fn step_multistep_exponential() {
        let s = Schedule::Step { every: 3, gamma: 0.5 };
        let got: Vec<f64> = (0..7).map(|e| lr(&s, 0.1, (e, 0, 1), None)).collect();
        for (g, w) in got.iter().zip([0.1, 0.1, 0.1, 0.05, 0.05, 0.05, 0.025]) {
            close(*g, w);
        }
        let s = Schedule::MultiStep { at: vec![2, 5], gamma: 0.1 };
        for (e, w) in [(0, 1.0), (1, 1.0), (2, 0.1), (4, 0.1), (5, 0.01), (9, 0.01)] {
            close(lr(&s, 1.0, (e, 0, 1), None), w);
        }
        let s = Schedule::Exponential { gamma: 0.9 };
        close(lr(&s, 2.0, (3, 0, 1), None), 2.0 * 0.729);
    }

    #[test]
    fn cosine_with_warmup() {
        let s = Schedule::Cosine { t_max: 4, min_lr: 0.0, warmup: 0 };
        for (e, w) in [(0, 1.0), (1, 0.853_553_390_593_273_8), (2, 0.5), (4, 0.0), (6, 0.5)] {
            close(lr(&s, 1.0, (e, 0, 1), None) + 1e-300, w + 1e-300);
        }
        let s = Schedule::Cosine { t_max: 2, min_lr: 0.1, warmup: 3 };
        let got: Vec<f64> = (0..6).map(|e| lr(&s, 1.0, (e, 0, 1), None)).collect();
        for (g, w) in got.iter().zip([0.25, 0.5, 0.75, 1.0, 0.55, 0.1]) {
            close(*g, w);
        }
    }

    #[test]
    fn onecycle_rises_then_falls() {
        let s =
            Schedule::OneCycle { max_lr: 1.0, pct_start: 0.25, div_factor: 10.0, final_div_factor: 100.0 };
        let at = |t| lr(&s, 0.0, (0, t, 101), None);
        close(at(0), 0.1);
        // Phase one ends at step 0.25·101 − 1 = 24.25: the peak is between 24 and 25.
        assert!(at(24) > 0.99 && at(25) > 0.99);
        close(at(100), 0.001);
        assert!((1..101).all(|t| (t <= 24) == (at(t) > at(t - 1))));
    }

    #[test]
    fn plateau_waits_patience_epochs_then_cools_down() {
        let rule = Schedule::Plateau { factor: 0.5, patience: 1, min_lr: 0.3, threshold: 1e-4, cooldown: 1 };
        let mut p = PlateauState::new(1.0);
        let mut lrs = Vec::new();
        for loss in [1.0, 0.99999, 1.0, 1.0, 1.0, 1.0, 0.5, 0.6, 0.6, 0.6] {
            p.observe(loss, &rule);
            lrs.push(p.lr);
        }
        // 0.99999 is not 1e-4 better; the second bad epoch halves; the cool-down epoch after it
        // counts nothing, so the next halving comes two bad epochs later and stops at min_lr.
        assert_eq!(lrs, [1.0, 1.0, 0.5, 0.5, 0.5, 0.3, 0.3, 0.3, 0.3, 0.3]);
    }
}
