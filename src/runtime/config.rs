//! A training run's configuration: the spec's `train` block with the overrides of a command
//! line or a Python call, and its description (the terminal's line, `config.json`).

use super::Backend;
use super::train::{Dist, TrainConfig};
use crate::ir::OptimizerFn;
use crate::sema::Compiled;
use crate::syntax::ast::{Init, Optimizer};
use std::path::PathBuf;

/// What a command line (or a Python call) changes of a spec's `train` block; `None` keeps the
/// spec's setting (or its default).
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    pub epochs: Option<u64>,
    pub lr: Option<f64>,
    pub seed: Option<u64>,
    /// The fraction of the data held out (replaces the train block's `validation`).
    pub validation: Option<f64>,
    pub threads: usize,
    pub backend: Backend,
    /// The run folder; with `resume`, the run to continue.
    pub out: PathBuf,
    pub resume: bool,
    pub init_from: Option<PathBuf>,
    pub stop_at: Option<u64>,
    /// Validation's beam width and length-penalty exponent.
    pub beam: (usize, f64),
    pub dist: Option<Dist>,
}

impl TrainConfig {
    /// The configuration of a run of `c` (compiled at its batch size) with `o` applied; a
    /// learning rate or validation fraction out of range is refused, naming the setting.
    pub fn of(c: &Compiled, o: Overrides) -> Result<TrainConfig, String> {
        let t = c.ast.train.clone().unwrap_or_default();
        if let Some(lr) = o.lr {
            if !(lr.is_finite() && lr > 0.0) {
                return Err(format!("the learning rate must be a positive number, got {lr}"));
            }
            if let Some(why) = crate::syntax::f32_problem(lr) {
                return Err(format!("the learning rate {lr} {why}; aec trains in 32-bit floats"));
            }
        }
        if let Some(v) = o.validation
            && !(0.0..1.0).contains(&v)
        {
            return Err(format!("the validation fraction must be at least 0 and below 1, got {v}"));
        }
        Ok(TrainConfig {
            epochs: o.epochs.or(t.epochs).unwrap_or(10),
            batch: c.batch as usize,
            optimizer: optimizer(t.optimizer.as_ref(), o.lr),
            seed: o.seed.or(t.seed).unwrap_or(0),
            validation: o.validation.or(t.validation).unwrap_or(0.0),
            noise: t.noise,
            init: t.init.unwrap_or(Init::Default),
            pretrain: t.pretrain,
            stop_at: o.stop_at,
            config_json: None,
            threads: o.threads.max(1),
            backend: o.backend,
            out: o.out,
            resume: o.resume,
            init_from: o.init_from,
            init_values: None,
            early_stop: t.early_stop.map(|(e, _)| e),
            schedule: t.schedule.as_ref().map(|(s, _)| s.clone()),
            beam: o.beam,
            clip: crate::clip_of(Some(&t)),
            base_lr: o.lr.or(t.optimizer.as_ref().map(Optimizer::lr)).unwrap_or(1e-3),
            dist: o.dist,
            interrupt: None,
        })
    }
}

/// The run's whole configuration, defaults included: one line for the terminal, and the JSON
/// of `config.json` in the run folder.
pub fn describe(cfg: &TrainConfig) -> (String, String) {
    let optimizer = match cfg.optimizer {
        OptimizerFn::Sgd { lr, momentum, nesterov, weight_decay } => {
            format!("sgd(lr: {lr}, momentum: {momentum}, nesterov: {nesterov}, weight_decay: {weight_decay})")
        }
        OptimizerFn::Adam { lr, b1, b2, eps, weight_decay, decoupled } => {
            let name = if decoupled { "adamw" } else { "adam" };
            format!("{name}(lr: {lr}, b1: {b1}, b2: {b2}, eps: {eps}, weight_decay: {weight_decay})")
        }
        OptimizerFn::RmsProp { lr, alpha, eps, weight_decay, momentum, centered } => format!(
            "rmsprop(lr: {lr}, alpha: {alpha}, eps: {eps}, weight_decay: {weight_decay}, momentum: {momentum}, centered: {centered})"
        ),
        OptimizerFn::Running { rate } => format!("running({rate})"),
    };
    let schedule = cfg.schedule.as_ref().map(ToString::to_string);
    let clip = match cfg.clip {
        crate::ir::Clip::None => None,
        crate::ir::Clip::Norm(c) => Some(format!("norm({c})")),
        crate::ir::Clip::Value(c) => Some(format!("value({c})")),
    };
    let noise = cfg.noise.map(|n| format!("{n:?}"));
    let init = match &cfg.init_from {
        Some(path) => format!("from {}", path.display()),
        None => format!("{:?}", cfg.init),
    };
    let pretrain = cfg.pretrain.map(|p| format!("greedy(epochs: {}, freeze: {})", p.epochs, p.freeze));
    let backend = match cfg.backend {
        Backend::Jit => "jit",
        Backend::Interp => "interp",
    };
    let line = format!(
        "config: batch {}, epochs {}, optimizer {optimizer}, seed {}, validation {}, init {}{}{}{}, {} thread{}, backend {backend}",
        cfg.batch,
        cfg.epochs,
        cfg.seed,
        cfg.validation,
        init,
        noise.as_ref().map_or(String::new(), |n| format!(", noise {n}")),
        pretrain.as_ref().map_or(String::new(), |p| format!(", pretrain {p}")),
        schedule.as_ref().map_or(String::new(), |s| format!(", schedule {s}"))
            + &clip.as_ref().map_or(String::new(), |c| format!(", clip {c}")),
        cfg.threads,
        if cfg.threads == 1 { "" } else { "s" },
    );
    let processes = cfg.dist.as_ref().map_or(1, |Dist(d)| d.size());
    let line = if processes > 1 {
        format!("{line} per process, {processes} processes (MPI; the batch is split between them)")
    } else {
        line
    };
    let json = serde_json::json!({
        "processes": processes,
        "batch": cfg.batch,
        "epochs": cfg.epochs,
        "optimizer": optimizer,
        "seed": cfg.seed,
        "validation": cfg.validation,
        "init": init,
        "noise": noise,
        "pretrain": pretrain,
        "schedule": schedule,
        "clip": clip,
        "threads": cfg.threads,
        "backend": backend,
        "stop_at": cfg.stop_at,
    });
    (line, serde_json::to_string_pretty(&json).unwrap_or_default() + "\n")
}

/// The spec's optimizer with `--lr` applied.
fn optimizer(o: Option<&Optimizer>, lr: Option<f64>) -> OptimizerFn {
    let mut f = crate::optimizer_fn(o);
    if let Some(lr) = lr {
        match &mut f {
            OptimizerFn::Sgd { lr: l, .. }
            | OptimizerFn::Adam { lr: l, .. }
            | OptimizerFn::RmsProp { lr: l, .. }
            | OptimizerFn::Running { rate: l } => *l = lr as f32,
        }
    }
    f
}
