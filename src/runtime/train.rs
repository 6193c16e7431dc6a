//! The training loop: batches, steps, validation, metrics, checkpoints, resume.
//!
//! Reproducibility: every random choice is a function of the run's seed and a counter — the
//! initial parameters of (seed), the validation split of (seed), the order of epoch e of
//! (seed, e), input noise and dropout masks of (seed, step). Checkpoints are taken at epoch
//! boundaries, so resuming from one replays exactly what an uninterrupted run would have done:
//! the final parameters are bit-identical.
//!
//! Step graphs are compiled per batch size: the full batch, and the smaller last batch of an
//! epoch (which is trained on, not dropped).

use super::State;
use super::checkpoint::{self, Progress};
use crate::autodiff;
use crate::data::{self, Dataset, Values};
use crate::diag::Span;
use crate::interp::{self, Buf};
use crate::ir::{Graph, OptimizerFn};
use crate::passes;
use crate::sema::{Compiled, Lowering, Mode, lower};
use crate::syntax::ast::{Init, Noise};
use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Settings of one training run (the spec's `train` block with command-line overrides).
#[derive(Clone, Debug)]
pub struct TrainConfig {
    pub epochs: u64,
    pub batch: usize,
    pub optimizer: OptimizerFn,
    pub seed: u64,
    pub validation: f64,
    pub noise: Option<Noise>,
    pub init: Init,
    pub threads: usize,
    /// The run folder: checkpoints and metrics go here.
    pub out: PathBuf,
    /// Continue from the checkpoint in `out`.
    pub resume: bool,
}

/// One epoch's numbers, as written to `metrics.jsonl`.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct EpochMetrics {
    pub epoch: u64,
    pub step: u64,
    pub train_loss: f64,
    pub val_loss: Option<f64>,
    pub samples_per_s: f64,
    pub seconds: f64,
}

/// What the loop reports as it goes; the CLI turns it into a progress bar.
pub enum Event<'a> {
    Start { first_epoch: u64, epochs: u64, steps_per_epoch: u64, train: usize, validation: usize },
    Step { epoch: u64, step_in_epoch: u64, loss: f64 },
    Epoch(&'a EpochMetrics),
}

pub struct Summary {
    pub metrics: Vec<EpochMetrics>,
    pub state: State,
    pub seconds: f64,
    pub samples_per_s: f64,
}

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("{0}")]
    Data(String),
    #[error("{0}")]
    Io(String),
    #[error("internal compiler error: {0}")]
    Compile(String),
    #[error("{what} at step {step} (epoch {epoch}); {kept}")]
    NonFinite { epoch: u64, step: u64, what: String, span: Option<Span>, kept: String },
}

/// Compiled graphs by batch size.
struct Programs<'c> {
    compiled: &'c Compiled,
    optimizer: OptimizerFn,
    denoise: bool,
    train: HashMap<usize, Graph>,
    eval: HashMap<usize, Graph>,
}

impl Programs<'_> {
    fn lowering(&self, batch: usize, mode: Mode) -> Lowering {
        Lowering { batch: batch as u64, mode, denoise: self.denoise }
    }

    fn train(&mut self, batch: usize) -> Result<&Graph, TrainError> {
        if !self.train.contains_key(&batch) {
            let fwd = lower::lower(&self.compiled.model, &self.lowering(batch, Mode::Train))
                .map_err(TrainError::Compile)?;
            let step = autodiff::training_step(&fwd, self.optimizer, &[]).map_err(TrainError::Compile)?;
            self.train.insert(batch, step);
        }
        self.train.get(&batch).ok_or_else(|| TrainError::Compile("missing step graph".into()))
    }

    fn eval(&mut self, batch: usize) -> Result<&Graph, TrainError> {
        if !self.eval.contains_key(&batch) {
            let fwd = lower::lower(&self.compiled.model, &self.lowering(batch, Mode::Infer))
                .map_err(TrainError::Compile)?;
            let g = passes::dce::keep_outputs(&fwd, &["loss"]).map_err(TrainError::Compile)?;
            self.eval.insert(batch, g);
        }
        self.eval.get(&batch).ok_or_else(|| TrainError::Compile("missing eval graph".into()))
    }
}

/// The graph inputs of a batch: model variables by name, `<input>.clean` for denoising.
fn batch_inputs(
    g: &Graph,
    data: &Dataset,
    idx: &[usize],
    noise: Option<Noise>,
    seed: u64,
    step: u64,
) -> Vec<Buf> {
    g.inputs
        .iter()
        .map(|input| {
            let clean = input.name.ends_with(".clean");
            let name = input.name.trim_end_matches(".clean");
            let Some(k) = data.names.iter().position(|n| n == name) else {
                return Buf::F32(Vec::new());
            };
            match data.gather(k, idx) {
                Values::F32(mut v) => {
                    if let (Some(noise), false, 0) = (noise, clean, k) {
                        data::corrupt(&mut v, noise, seed, step);
                    }
                    Buf::F32(v)
                }
                Values::I32(v) => Buf::I32(v),
            }
        })
        .collect()
}

/// Trains `compiled` on `data`.
pub fn train(
    compiled: &Compiled,
    data: &Dataset,
    cfg: &TrainConfig,
    on: &mut dyn FnMut(Event),
) -> Result<Summary, TrainError> {
    let mut programs = Programs {
        compiled,
        optimizer: cfg.optimizer,
        denoise: cfg.noise.is_some(),
        train: HashMap::new(),
        eval: HashMap::new(),
    };
    let (train_idx, val_idx) = data.split(cfg.validation, cfg.seed);
    if train_idx.is_empty() {
        return Err(TrainError::Data("no training samples are left after the validation split".into()));
    }
    let batch = cfg.batch.min(train_idx.len()).max(1);
    let metrics_path = cfg.out.join("metrics.jsonl");

    // A fresh start or the state of the last checkpoint.
    let reference = programs.train(batch)?.clone();
    let (mut state, mut metrics, first_epoch) = if cfg.resume {
        let (state, progress) = checkpoint::load(&cfg.out, &reference).map_err(TrainError::Io)?;
        if progress.seed != cfg.seed {
            return Err(TrainError::Data(format!(
                "the checkpoint in {} was trained with seed {}, this run has seed {}: pass --seed {}",
                cfg.out.display(),
                progress.seed,
                cfg.seed,
                progress.seed
            )));
        }
        let metrics = read_metrics(&metrics_path, progress.epoch);
        (state, metrics, progress.epoch)
    } else {
        (State::new(super::init::init_params(&reference, cfg.init, cfg.seed)), Vec::new(), 0)
    };

    let steps_per_epoch = train_idx.len().div_ceil(batch) as u64;
    on(Event::Start {
        first_epoch,
        epochs: cfg.epochs,
        steps_per_epoch,
        train: train_idx.len(),
        validation: val_idx.len(),
    });
    let started = Instant::now();
    let mut train_time = Duration::ZERO;
    let mut trained_samples = 0usize;
    let mut last_save = Instant::now();
    for epoch in first_epoch + 1..=cfg.epochs {
        let epoch_start = Instant::now();
        let perm = data::permutation(train_idx.len(), cfg.seed ^ epoch.wrapping_mul(0xA24B_AED4_963E_E407));
        let order: Vec<usize> = perm.iter().map(|&i| train_idx[i]).collect();
        let mut loss_sum = 0f64;
        for (s, idx) in order.chunks(batch).enumerate() {
            state.step += 1;
            let g = programs.train(idx.len())?;
            let inputs = batch_inputs(g, data, idx, cfg.noise, cfg.seed, state.step);
            let opts = interp::Options {
                seed: cfg.seed,
                step: state.step,
                threads: cfg.threads,
                check_finite: true,
            };
            let values = interp::run(g, &inputs, &mut state, &opts)
                .map_err(|e| stop(e, epoch, state.step, cfg, epoch - 1))?;
            let loss = values.output(g, "loss").map_or(f64::NAN, |b| f64::from(b.f32()[0]));
            loss_sum += loss * idx.len() as f64;
            on(Event::Step { epoch, step_in_epoch: s as u64 + 1, loss });
        }
        let epoch_train = epoch_start.elapsed();
        train_time += epoch_train;
        trained_samples += order.len();
        let val_loss = evaluate(&mut programs, data, &val_idx, batch, cfg, &mut state)?;
        let m = EpochMetrics {
            epoch,
            step: state.step,
            train_loss: loss_sum / order.len() as f64,
            val_loss,
            samples_per_s: order.len() as f64 / epoch_train.as_secs_f64().max(1e-9),
            seconds: started.elapsed().as_secs_f64(),
        };
        metrics.push(m);
        if let Some(m) = metrics.last() {
            on(Event::Epoch(m));
        }
        if epoch == cfg.epochs || last_save.elapsed() >= Duration::from_secs(2) {
            save(&cfg.out, &reference, &state, epoch, cfg.seed, &metrics)?;
            last_save = Instant::now();
        }
    }
    if first_epoch >= cfg.epochs {
        save(&cfg.out, &reference, &state, cfg.epochs, cfg.seed, &metrics)?;
    }
    Ok(Summary {
        metrics,
        state,
        seconds: started.elapsed().as_secs_f64(),
        samples_per_s: trained_samples as f64 / train_time.as_secs_f64().max(1e-9),
    })
}

/// The mean validation loss (inference mode: no dropout, no noise).
fn evaluate(
    programs: &mut Programs,
    data: &Dataset,
    idx: &[usize],
    batch: usize,
    cfg: &TrainConfig,
    state: &mut State,
) -> Result<Option<f64>, TrainError> {
    if idx.is_empty() {
        return Ok(None);
    }
    let mut sum = 0f64;
    for chunk in idx.chunks(batch) {
        let g = programs.eval(chunk.len())?;
        let inputs = batch_inputs(g, data, chunk, None, cfg.seed, state.step);
        let opts =
            interp::Options { seed: cfg.seed, step: state.step, threads: cfg.threads, check_finite: false };
        let values = interp::run(g, &inputs, state, &opts).map_err(|e| TrainError::Compile(e.to_string()))?;
        sum += values.output(g, "loss").map_or(f64::NAN, |b| f64::from(b.f32()[0])) * chunk.len() as f64;
    }
    Ok(Some(sum / idx.len() as f64))
}

fn stop(e: interp::Error, epoch: u64, step: u64, cfg: &TrainConfig, last_good: u64) -> TrainError {
    let kept = if last_good > 0 && cfg.out.join("checkpoint.safetensors").exists() {
        format!("training stopped; the last good checkpoint stays in {}", cfg.out.display())
    } else {
        "training stopped before any checkpoint was written".to_owned()
    };
    match e {
        interp::Error::NonFinite { span, .. } => {
            TrainError::NonFinite { epoch, step, what: e.to_string(), span, kept }
        }
        other => TrainError::Data(other.to_string()),
    }
}

fn save(
    dir: &std::path::Path,
    g: &Graph,
    state: &State,
    epoch: u64,
    seed: u64,
    metrics: &[EpochMetrics],
) -> Result<(), TrainError> {
    checkpoint::save(dir, g, state, &Progress { epoch, seed }).map_err(TrainError::Io)?;
    let mut text = String::new();
    for m in metrics {
        text.push_str(&serde_json::to_string(m).map_err(|e| TrainError::Io(e.to_string()))?);
        text.push('\n');
    }
    let path = dir.join("metrics.jsonl");
    checkpoint::write_atomic(&path, text.as_bytes())
        .map_err(|e| TrainError::Io(format!("cannot write {}: {e}", path.display())))
}

/// The metrics of epochs up to `upto` from an earlier run's file.
fn read_metrics(path: &std::path::Path, upto: u64) -> Vec<EpochMetrics> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .filter_map(|l| serde_json::from_str::<EpochMetrics>(l).ok())
        .filter(|m| m.epoch <= upto)
        .collect()
}
