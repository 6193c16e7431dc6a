//! The training loop: phases, batches, steps, validation, metrics, checkpoints, resume.
//!
//! A run is a list of phases over one epoch and step count: with `pretrain greedy(epochs: E)`,
//! a phase per stage of greedy layer-wise pretraining (`sema::stage`), then the whole network;
//! otherwise just the whole network. Parameters live in a store by name, so weights carry over
//! from phase to phase; each phase has its own compiled step graphs and a fresh optimizer. When
//! the fine-tuning phase starts, each stage's trained decoder initialises the decoder layer that
//! mirrors the same encoder layer (when the shapes agree, as with `decoder mirror`).
//!
//! Reproducibility: every random choice is a function of the run's seed and a counter — the
//! initial parameters of (seed) and of (seed, stage), the validation split of (seed), the order
//! of epoch e of (seed, e), input noise and dropout masks of (seed, step). Checkpoints are taken
//! at epoch boundaries, so resuming from one — in any phase — replays exactly what an
//! uninterrupted run would have done: the final parameters are bit-identical.
//!
//! Step graphs are compiled per batch size: the full batch, and the smaller last batch of an
//! epoch (which is trained on, not dropped).

use super::checkpoint::{self, Progress};
use super::dist::{self, Collective};
use super::schedule::{self as lr_schedule, PlateauState};
use super::{Backend, State};
use crate::autodiff;
use crate::codegen;
use crate::data::{self, Dataset, Values};
use crate::diag::Span;
use crate::interp::{self, Buf};
use crate::ir::{Clip, Graph, OptimizerFn};
use crate::passes;
use crate::sema::lower::{CODE_IDS, TERM_PREFIX, WEIGHT_PREFIX};
use crate::sema::{Compiled, Lowering, Mode, Part, lower, stage};
use crate::syntax::ast::{Init, Noise, Pretrain, Schedule, TermSchedule};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Settings of one training run (the spec's `train` block with command-line overrides).
#[derive(Clone, Debug)]
pub struct TrainConfig {
    /// Epochs of the whole network (after pretraining, if any).
    pub epochs: u64,
    pub batch: usize,
    pub optimizer: OptimizerFn,
    pub seed: u64,
    pub validation: f64,
    pub noise: Option<Noise>,
    pub init: Init,
    pub pretrain: Option<Pretrain>,
    pub threads: usize,
    pub backend: Backend,
    /// The run folder: checkpoints and metrics go here.
    pub out: PathBuf,
    /// Continue from the checkpoint in `out`.
    pub resume: bool,
    /// Weights to start from instead of the initialisation (`--init`), with a fresh optimizer.
    pub init_from: Option<PathBuf>,
    /// Or the values themselves, in `Compiled::forward`'s order (a Python model's weights when
    /// it trains again: Keras's `fit` goes on from where the model stands).
    pub init_values: Option<std::sync::Arc<Vec<Vec<f32>>>>,
    /// Stop when the validation loss stops improving; keep the best epoch's weights.
    pub early_stop: Option<crate::syntax::ast::EarlyStop>,
    /// How the learning rate moves over the whole network's epochs, from `base_lr` (the
    /// optimizer's rate before it is rounded to f32, as PyTorch's schedulers compute in f64).
    pub schedule: Option<Schedule>,
    pub base_lr: f64,
    /// Gradient clipping before each update.
    pub clip: Clip,
    /// Validation decodes sequences with beam search of this width (1: greedy) and GNMT's
    /// length-penalty exponent.
    pub beam: (usize, f64),
    /// Stop after this epoch (counted over all phases), with a checkpoint to resume from.
    pub stop_at: Option<u64>,
    /// The run's resolved configuration, saved as `config.json` with every save.
    pub config_json: Option<String>,
    /// Data-parallel training: the processes this one trains with (`runtime::dist`).
    pub dist: Option<Dist>,
    /// Set from elsewhere (a Ctrl-C), it ends the run after the step under way: the epoch it
    /// cut short is dropped, and the run folder keeps its last committed save.
    pub interrupt: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
}

impl TrainConfig {
    fn interrupted(&self) -> bool {
        self.interrupt.as_ref().is_some_and(|f| f.load(std::sync::atomic::Ordering::Relaxed))
    }
}

/// The processes of a data-parallel run (see `runtime::dist`).
#[derive(Clone)]
pub struct Dist(pub std::rc::Rc<dyn Collective>);

impl std::fmt::Debug for Dist {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "process {} of {}", self.0.rank(), self.0.size())
    }
}

/// One epoch's numbers, as written to `metrics.jsonl`.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct EpochMetrics {
    pub epoch: u64,
    /// The phase: `pretrain k/K` or `fine-tune` (absent without pretraining).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stage: Option<String>,
    pub step: u64,
    pub train_loss: f64,
    pub val_loss: Option<f64>,
    /// Sequence models: greedy decoding of the validation set, the fraction of tokens and of
    /// whole sequences right.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_accuracy: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sequence_accuracy: Option<f64>,
    /// Text targets: corpus BLEU-4 (×100) of greedy decoding against the validation sentences.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bleu: Option<f64>,
    /// A quantized code: the perplexity of the codebook vectors the epoch's training batches
    /// picked (exp of their entropy: K when all K are picked equally, 1 when one is), and the
    /// share of the codebook they picked at all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub codebook_perplexity: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub codebook_usage: Option<f64>,
    /// `None` when the epoch's training took under a millisecond: too short to time.
    pub samples_per_s: Option<f64>,
    /// Each term of the loss (the reconstruction loss and each weighted penalty), averaged over
    /// the epoch's samples like `train_loss`, which is their sum.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub terms: std::collections::BTreeMap<String, f64>,
    /// Data-parallel training: the mean time per step in the sum over the processes
    /// (gradients, loss and terms), in seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allreduce_s: Option<f64>,
    /// The terms of the validation loss (inference mode: a Gaussian code is its mean).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub val_terms: std::collections::BTreeMap<String, f64>,
    /// The learning rate of the epoch's last step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lr: Option<f64>,
    /// Scheduled loss weights at the epoch's last step, by term (`kl`, …).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub weights: std::collections::BTreeMap<String, f64>,
    pub seconds: f64,
    /// The time the training steps waited for their batches (gathered by a second thread
    /// while the step before ran), in seconds over the epoch.
    #[serde(default)]
    pub data_wait_s: f64,
    /// When the epoch ended (seconds since 1970): the wall time TensorBoard's events show.
    #[serde(default)]
    pub wall_time: f64,
}

/// What the loop reports as it goes; the CLI turns it into a progress bar.
pub enum Event<'a> {
    Start {
        first_epoch: u64,
        epochs: u64,
        steps_per_epoch: u64,
        train: usize,
        validation: usize,
    },
    Phase {
        label: &'a str,
        first_epoch: u64,
        last_epoch: u64,
    },
    /// Native code was generated for a graph.
    Compiled {
        graph: &'a str,
        kernels: usize,
        seconds: f64,
    },
    Step {
        epoch: u64,
        step_in_epoch: u64,
        loss: f64,
    },
    /// The model's parameters at the end of an epoch (not sent during pretraining stages).
    Params {
        epoch: u64,
        params: &'a [Vec<f32>],
    },
    Epoch(&'a EpochMetrics),
}

pub struct Summary {
    /// A resumed run found already at its last epoch: nothing was trained or written.
    pub nothing_to_do: bool,
    pub metrics: Vec<EpochMetrics>,
    /// Epochs in the whole run, and whether it stopped early (`stop_at`).
    pub total_epochs: u64,
    pub stopped_early: bool,
    /// The model's parameters, in `Compiled::forward` order.
    pub params: Vec<Vec<f32>>,
    pub seconds: f64,
    pub samples_per_s: Option<f64>,
    /// Time spent generating native code, in all.
    pub jit_seconds: f64,
    /// With early stopping: the best epoch so far, and the epoch it stopped after, if it did.
    pub early: Option<(checkpoint::EarlyState, Option<u64>)>,
    /// The run was interrupted (`TrainConfig::interrupt`): `params` are the last finished
    /// epoch's, and `saved_epoch` says where `--resume` continues from.
    pub interrupted: bool,
    /// The epoch of the run folder's last committed save (this run's or the one it resumed).
    pub saved_epoch: Option<u64>,
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
    /// A problem of the spec with this data, at a line of the spec.
    #[error("{message}")]
    Located { message: String, span: Span, label: String, help: String },
}

/// A batch normalization over features (one value per sample and channel) cannot train on a
/// batch of one sample, and PyTorch refuses it too: the error, before any step, when the
/// data's last batch (or a process's shard of one) would hold a single sample.
fn single_sample_batches(
    compiled: &Compiled,
    train: usize,
    batch: usize,
    processes: usize,
) -> Result<(), TrainError> {
    let per_feature = compiled.model.layers.iter().find(|l| {
        matches!(l.layer.kind, crate::syntax::ast::LayerKind::BatchNorm { .. })
            && matches!(&l.input, crate::sema::Ty::Tensor(d) if d.iter().skip(1).product::<u64>() == 1)
    });
    let Some(layer) = per_feature else { return Ok(()) };
    let shards = |n: usize| (0..processes).map(move |r| dist::shard(n, r, processes).len());
    let sizes = |b: usize| {
        let mut v = vec![b.min(train)];
        if !train.is_multiple_of(b) {
            v.push(train % b);
        }
        v.into_iter().flat_map(shards).collect::<Vec<_>>()
    };
    if !sizes(batch).contains(&1) {
        return Ok(());
    }
    let fix = (1..batch)
        .flat_map(|d| [batch + d, batch.saturating_sub(d)])
        .find(|&b| b >= 2 && !sizes(b).contains(&1));
    let split = if processes > 1 { format!(" over {processes} processes") } else { String::new() };
    Err(TrainError::Located {
        message: format!(
            "{train} training samples in batches of {batch}{split} leave a batch of one sample, and \
             `{}` needs more than one value per feature in training (PyTorch refuses it too)",
            layer.layer
        ),
        span: layer.layer.span,
        label: "normalizes over the batch".into(),
        help: match fix {
            Some(b) => format!(
                "use `batch {b}`, which leaves no single-sample batch, or change the validation split"
            ),
            None => "use more training samples".into(),
        },
    })
}

/// What a step of the whole network's phase is told besides its batch: the learning rate
/// (`None`: the optimizer's own) and the scheduled loss weights.
#[derive(Clone, Default)]
struct Controls {
    lr: Option<f64>,
    weights: Vec<(String, f64)>,
}

impl Controls {
    /// At epoch `epoch` and step `t` of the phase (both from 0), `steps` steps per epoch and
    /// `epochs` in the phase.
    fn at(
        cfg: &TrainConfig,
        terms: &[(String, TermSchedule)],
        (epoch, (t, steps)): (u64, (u64, u64)),
        epochs: u64,
        plateau: Option<&PlateauState>,
    ) -> Controls {
        let lr = cfg
            .schedule
            .as_ref()
            .map(|s| lr_schedule::lr(s, cfg.base_lr, (epoch, t, epochs * steps), plateau));
        let weights = terms.iter().map(|(name, s)| (name.clone(), s.at(t, steps))).collect();
        Controls { lr, weights }
    }
}

/// One training step, planned before its epoch starts: the batch's samples (`rows` of them
/// on this process), the weight of this process's share, the program's batch key, the step
/// number, its controls and the graph inputs its batch fills.
struct StepPlan<'a> {
    idx: &'a [usize],
    rows: &'a [usize],
    weight: f32,
    key: (usize, usize),
    step: u64,
    controls: Controls,
    inputs: Vec<crate::ir::InputDef>,
}

/// Why a step failed.
enum StepFail {
    /// The step ran and went wrong (NaN, a bad token id): said by the interpreter.
    Run(interp::Error),
    /// The native step diverged where the interpreter does not.
    Native(String),
    Train(TrainError),
}

impl From<TrainError> for StepFail {
    fn from(e: TrainError) -> Self {
        StepFail::Train(e)
    }
}

/// One phase of a run.
struct Phase {
    /// `pretrain k/K`, `fine-tune`, or `None` for a run without pretraining.
    label: Option<String>,
    stage: Option<usize>,
    epochs: u64,
    /// Freeze the encoder layers below the stage's.
    freeze: bool,
}

fn phases(c: &Compiled, cfg: &TrainConfig) -> Vec<Phase> {
    let mut out = Vec::new();
    if let Some(p) = cfg.pretrain {
        let k = stage::stages(&c.model);
        for s in 1..=k {
            out.push(Phase {
                label: Some(format!("pretrain {s}/{k}")),
                stage: Some(s),
                epochs: p.epochs,
                freeze: p.freeze,
            });
        }
    }
    let label = cfg.pretrain.map(|_| "fine-tune".to_owned());
    out.push(Phase { label, stage: None, epochs: cfg.epochs, freeze: false });
    out
}

/// Named parameters: the model's and, while pretraining, the stage decoders'.
#[derive(Clone, Debug, Default)]
struct Store {
    entries: Vec<checkpoint::Named>,
}

impl Store {
    fn get(&self, name: &str) -> Option<&Vec<f32>> {
        self.entries.iter().find(|e| e.0 == name).map(|e| &e.2)
    }

    fn set(&mut self, name: &str, shape: &[usize], v: Vec<f32>) {
        match self.entries.iter_mut().find(|e| e.0 == name) {
            Some(e) => e.2 = v,
            None => self.entries.push((name.to_owned(), shape.to_vec(), v)),
        }
    }

    /// The values of `g`'s parameters.
    fn params_of(&self, g: &Graph) -> Result<Vec<Vec<f32>>, TrainError> {
        g.params
            .iter()
            .map(|p| {
                self.get(&p.name)
                    .cloned()
                    .ok_or_else(|| TrainError::Compile(format!("no value for {}", p.name)))
            })
            .collect()
    }

    fn take_from(&mut self, g: &Graph, state: &State) {
        for (p, v) in g.params.iter().zip(&state.params) {
            self.set(&p.name, &p.shape, v.clone());
        }
    }
}

/// Compiled graphs of one phase, by batch size.
struct Programs<'c> {
    compiled: &'c Compiled,
    optimizer: OptimizerFn,
    clip: Clip,
    denoise: bool,
    stage: Option<usize>,
    freeze: bool,
    /// Training graphs by (rows, the global batch they are a shard of: the rows without
    /// data-parallel training).
    train: HashMap<(usize, usize), Graph>,
    eval: HashMap<usize, Graph>,
    backend: Backend,
    native: HashMap<(usize, usize), codegen::Program>,
    native_eval: HashMap<usize, codegen::Program>,
    /// The native program whose arena holds the current parameters, if any.
    holder: Option<(usize, usize)>,
    jit_seconds: f64,
    threads: usize,
}

impl Programs<'_> {
    fn forward(&self, batch: usize, mode: Mode, shard_of: Option<usize>) -> Result<Graph, TrainError> {
        let shard_of = shard_of.map(|n| n as u64);
        let lowering = Lowering { batch: batch as u64, mode, denoise: self.denoise, shard_of };
        let g = match self.stage {
            Some(k) => lower::lower_stage(&self.compiled.model, k, &lowering),
            None => lower::lower(&self.compiled.model, &lowering),
        };
        g.map_err(TrainError::Compile)
    }

    /// Which parameters of a stage graph are frozen: every encoder layer below the stage's.
    fn frozen(&self, g: &Graph) -> Vec<bool> {
        let (Some(k), true) = (self.stage, self.freeze) else { return vec![false; g.params.len()] };
        let layers = stage::param_layers(&self.compiled.model);
        let own = layers.get(k - 1).map(|&pos| format!("encoder.{}.", self.compiled.model.layers[pos].index));
        g.params
            .iter()
            .map(|p| p.name.starts_with("encoder.") && own.as_ref().is_none_or(|o| !p.name.starts_with(o)))
            .collect()
    }

    /// The training step of `key`: (rows, the global batch they are a shard of).
    fn train(&mut self, key: (usize, usize)) -> Result<&Graph, TrainError> {
        if !self.train.contains_key(&key) {
            let fwd = self.forward(key.0, Mode::Train, Some(key.1))?;
            let frozen = self.frozen(&fwd);
            let step = autodiff::training_step(&fwd, self.optimizer, self.clip, &frozen)
                .map_err(TrainError::Compile)?;
            self.train.insert(key, step);
        }
        self.train.get(&key).ok_or_else(|| TrainError::Compile("missing step graph".into()))
    }

    fn compile(&mut self, g: &Graph, on: &mut dyn FnMut(Event)) -> Result<codegen::Program, TrainError> {
        let mut p = codegen::Program::compile(g, codegen::Options::default()).map_err(TrainError::Compile)?;
        p.set_threads(self.threads);
        let seconds = p.compile_time().as_secs_f64();
        self.jit_seconds += seconds;
        let batch = g.inputs.first().and_then(|i| i.ty.shape.first()).copied().unwrap_or(0);
        let name = format!("{} (batch {batch})", g.name);
        on(Event::Compiled { graph: &name, kernels: p.kernel_count(), seconds });
        Ok(p)
    }

    /// One training step; returns the loss and its terms (see [`loss_and_terms`]). `state` is
    /// current unless a native program holds it (see `sync`). `reduce` (data-parallel
    /// training) combines the processes' gradients and losses before the updates.
    fn step(
        &mut self,
        batch: (usize, usize),
        inputs: &[Buf],
        state: &mut State,
        opts: &interp::Options,
        on: &mut dyn FnMut(Event),
        reduce: Option<codegen::Reduce>,
    ) -> Result<Outcome, StepFail> {
        // (`train` refuses data-parallel training on the interpreter: `reduce` is native only.)
        if self.backend == Backend::Interp {
            let g = self.train(batch)?;
            let values = interp::run(g, inputs, state, opts).map_err(StepFail::Run)?;
            return Ok(outcome(g, |name| values.output(g, name).cloned()));
        }
        if !self.native.contains_key(&batch) {
            let g = self.train(batch)?.clone();
            let p = self.compile(&g, on)?;
            self.native.insert(batch, p);
        }
        if self.holder != Some(batch) {
            self.sync(state);
            if let Some(p) = self.native.get_mut(&batch) {
                p.set_state(state).map_err(TrainError::Compile)?;
            }
            self.holder = Some(batch);
        }
        let p = self.native.get_mut(&batch).ok_or_else(|| TrainError::Compile("no program".into()))?;
        p.set_learning_rate(opts.lr);
        match p.run_reduced(inputs, opts.seed, opts.step, reduce) {
            Ok(()) => Ok(outcome(p.graph(), |name| p.output(name))),
            Err(codegen::RunError::Inputs(what)) => Err(StepFail::Train(TrainError::Data(what))),
            Err(codegen::RunError::NonFinite(loss)) => {
                // The step stopped before its updates: replay it on the interpreter from the same
                // state to name the first op that produced NaN or infinity.
                p.get_state(state);
                let g = self.train(batch)?;
                let mut probe = state.clone();
                interp::run(g, inputs, &mut probe, opts).map_err(StepFail::Run)?;
                Err(StepFail::Native(format!(
                    "the native step's loss was {loss}, but the interpreter computes it finite; \
                     train this run with --backend interp"
                )))
            }
        }
    }

    /// Makes `state` current: copies parameters and optimizer state out of the native program
    /// that holds them.
    fn sync(&mut self, state: &mut State) {
        if let Some(p) = self.holder.and_then(|h| self.native.get(&h)) {
            p.get_state(state);
        }
    }

    /// The mean loss of one batch in inference mode, and its terms.
    fn eval_loss(
        &mut self,
        batch: usize,
        inputs: &[Buf],
        state: &mut State,
        opts: &interp::Options,
        on: &mut dyn FnMut(Event),
    ) -> Result<Outcome, TrainError> {
        if self.backend == Backend::Interp {
            let g = self.eval(batch)?;
            let values =
                interp::run(g, inputs, state, opts).map_err(|e| TrainError::Compile(e.to_string()))?;
            return Ok(outcome(g, |name| values.output(g, name).cloned()));
        }
        if !self.native_eval.contains_key(&batch) {
            let g = self.eval(batch)?.clone();
            let p = self.compile(&g, on)?;
            self.native_eval.insert(batch, p);
        }
        let p = self.native_eval.get_mut(&batch).ok_or_else(|| TrainError::Compile("no program".into()))?;
        p.set_state(state).map_err(TrainError::Compile)?;
        // An eval graph has no updates: `run` only fails on inputs that do not fit.
        p.run(inputs, opts.seed, opts.step).map_err(|e| TrainError::Data(e.to_string()))?;
        Ok(outcome(p.graph(), |name| p.output(name)))
    }

    fn eval(&mut self, batch: usize) -> Result<&Graph, TrainError> {
        if !self.eval.contains_key(&batch) {
            let fwd = self.forward(batch, Mode::Infer, None)?;
            let mut keep = vec!["loss"];
            keep.extend(fwd.outputs.iter().map(|(n, _)| n.as_str()).filter(|n| n.starts_with(TERM_PREFIX)));
            let g = passes::dce::keep_outputs(&fwd, &keep).map_err(TrainError::Compile)?;
            self.eval.insert(batch, g);
        }
        self.eval.get(&batch).ok_or_else(|| TrainError::Compile("missing eval graph".into()))
    }
}

/// The graph inputs of a batch: model variables by name, `<input>.clean` for denoising,
/// `weight.<term>` from `weights` (scheduled loss weights).
pub fn batch_inputs(
    inputs: &[crate::ir::InputDef],
    data: &Dataset,
    idx: &[usize],
    (noise, seed, step): (Option<Noise>, u64, u64),
    weights: &[(String, f64)],
) -> Result<Vec<Buf>, data::DataError> {
    inputs
        .iter()
        .map(|input| {
            if let Some(term) = input.name.strip_prefix(WEIGHT_PREFIX) {
                let w = weights.iter().find(|(n, _)| n == term).map_or(1.0, |w| w.1);
                return Ok(Buf::F32(vec![w as f32]));
            }
            let clean = input.name.ends_with(".clean");
            let name = input.name.trim_end_matches(".clean");
            let Some(k) = data.names.iter().position(|n| n == name) else { return Ok(Buf::F32(Vec::new())) };
            Ok(match data.gather(k, idx)? {
                Values::F32(mut v) => {
                    if let (Some(noise), false, 0) = (noise, clean, k) {
                        data::corrupt(&mut v, noise, seed, step);
                    }
                    Buf::F32(v)
                }
                Values::I32(v) => Buf::I32(v),
            })
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
    let (train_idx, val_idx) = data.split(cfg.validation, cfg.seed);
    if train_idx.is_empty() {
        return Err(TrainError::Data("no training samples are left after the validation split".into()));
    }
    let batch = cfg.batch.min(train_idx.len()).max(1);
    let processes = cfg.dist.as_ref().map_or(1, |Dist(d)| d.size());
    single_sample_batches(compiled, train_idx.len(), batch, processes)?;
    let phases = phases(compiled, cfg);
    let total: u64 = phases.iter().map(|p| p.epochs).sum();
    let model_graph = &compiled.forward;
    let vocab_json = data.vocab.as_ref().map(crate::data::text::TextVocab::to_json);
    let term_schedules: Vec<(String, TermSchedule)> =
        compiled.model.loss.extra.iter().filter_map(|t| Some((t.name(), t.schedule?.0))).collect();

    // A fresh start, or the state of the last checkpoint.
    let mut store = Store::default();
    for (p, v) in model_graph.params.iter().zip(super::init::init_params(model_graph, cfg.init, cfg.seed)) {
        store.set(&p.name, &p.shape, v);
    }
    if let Some(path) = cfg.init_from.as_ref().filter(|_| !cfg.resume) {
        let values = checkpoint::load_params(path, model_graph).map_err(TrainError::Data)?;
        for (p, v) in model_graph.params.iter().zip(values) {
            store.set(&p.name, &p.shape, v);
        }
    }
    if let Some(values) = cfg.init_values.as_ref().filter(|_| !cfg.resume) {
        let fits = values.len() == model_graph.params.len()
            && values
                .iter()
                .zip(&model_graph.params)
                .all(|(v, p)| v.len() == p.shape.iter().product::<usize>());
        if !fits {
            return Err(TrainError::Data("the starting weights do not match the model's parameters".into()));
        }
        for (p, v) in model_graph.params.iter().zip(values.iter()) {
            store.set(&p.name, &p.shape, v.clone());
        }
    }
    let lead = cfg.dist.as_ref().is_none_or(|Dist(d)| d.rank() == 0);
    if cfg.dist.is_some() && cfg.backend == Backend::Interp {
        return Err(TrainError::Data(
            "data-parallel training runs native code: drop --backend interp".into(),
        ));
    }
    // Each process would move its moving-average codebook by its own shard, and the codebooks
    // the processes quantize with would drift apart: the sums are not shared (yet).
    if cfg.dist.is_some()
        && compiled.forward.params.iter().any(|p| p.role == crate::ir::ParamRole::Codebook { ema: true })
    {
        return Err(TrainError::Data(
            "a moving-average codebook (`quantize(ema: …)`) trains on one process: each would move \
             its own codebook by its own shard; train with `quantize K` (a codebook loss, whose \
             gradients are summed) or on one process"
                .into(),
        ));
    }
    // The seed of this process's draws (noise, dropout, ε): see `dist::process_seed`.
    let seed = cfg.dist.as_ref().map_or(cfg.seed, |Dist(d)| dist::process_seed(cfg.seed, d.rank()));
    // Process 0 alone reads the run folder; the others get what it read.
    let fresh_plateau = match &cfg.schedule {
        Some(Schedule::Plateau { .. }) => Some(PlateauState::new(cfg.base_lr)),
        _ => None,
    };
    let (mut metrics, mut first_epoch, mut step, mut early, mut plateau) = if cfg.resume && lead {
        resume(&mut store, model_graph, cfg)?
    } else {
        (Vec::new(), 0, 0, None, None)
    };
    if let Some(Dist(d)) = &cfg.dist {
        let mut start = (std::mem::take(&mut store.entries), metrics, first_epoch, step, (early, plateau));
        dist::share(d.as_ref(), &mut start).map_err(TrainError::Data)?;
        (store.entries, metrics, first_epoch, step, (early, plateau)) = start;
    }
    // A plateau schedule starts at the optimizer's rate (or where the checkpoint left it).
    plateau = plateau.or(fresh_plateau).filter(|_| fresh_plateau.is_some());
    // The best epoch's weights, saved as `best.safetensors` with every save after it.
    let mut best: Option<Store> = match (&early, cfg.resume && lead) {
        (Some(_), true) => {
            let path = cfg.out.join("best.safetensors");
            let saved = checkpoint::read_all(&path).map_err(TrainError::Io)?;
            let mut s = Store::default();
            for (name, shape, v) in saved {
                s.set(&name, &shape, v);
            }
            Some(s)
        }
        _ => None,
    };
    let stopped = |e: &Option<checkpoint::EarlyState>| match (e, cfg.early_stop) {
        (Some(e), Some(rule)) => e.wait >= rule.patience,
        _ => false,
    };

    let last = cfg.stop_at.unwrap_or(total).min(total);
    if first_epoch >= last || stopped(&early) {
        // A resumed run that already stands at its last epoch: nothing is trained and nothing
        // written, so its saved state stays exactly as it was.
        return Ok(Summary {
            nothing_to_do: true,
            total_epochs: total,
            stopped_early: last < total,
            params: store.params_of(model_graph)?,
            metrics,
            seconds: 0.0,
            samples_per_s: None,
            jit_seconds: 0.0,
            early: early.map(|e| (e, stopped(&Some(e)).then_some(e.best_epoch + e.wait))),
            interrupted: false,
            saved_epoch: Some(first_epoch),
        });
    }
    let steps_per_epoch = train_idx.len().div_ceil(batch) as u64;
    on(Event::Start {
        first_epoch,
        epochs: total,
        steps_per_epoch,
        train: train_idx.len(),
        validation: val_idx.len(),
    });
    let started = Instant::now();
    let mut train_time = Duration::ZERO;
    let mut trained_samples = 0usize;
    let mut last_save = Instant::now();
    let mut jit_seconds = 0.0;
    let mut phase_start = 0u64;
    let mut decoder = super::decode::Decoder::new(compiled, cfg.backend, cfg.threads);
    let mut stopped_after = None;
    let mut saved_epoch = (first_epoch > 0).then_some(first_epoch);
    let mut interrupted = false;
    for phase in &phases {
        if phase_start >= last {
            break;
        }
        let phase_end = phase_start + phase.epochs;
        if phase_end <= first_epoch {
            phase_start = phase_end;
            continue;
        }
        let mut programs = Programs {
            compiled,
            optimizer: cfg.optimizer,
            clip: cfg.clip,
            denoise: cfg.noise.is_some(),
            stage: phase.stage,
            freeze: phase.freeze,
            train: HashMap::new(),
            eval: HashMap::new(),
            backend: cfg.backend,
            native: HashMap::new(),
            native_eval: HashMap::new(),
            holder: None,
            jit_seconds: 0.0,
            threads: cfg.threads,
        };
        let reference = programs.train((batch, batch))?.clone();
        let mut state = if first_epoch > phase_start && lead {
            // Resuming inside this phase: its optimizer state is in the run folder.
            let (mut state, _) = checkpoint::load_optimizer(&cfg.out, &reference).map_err(TrainError::Io)?;
            state.params = store.params_of(&reference)?;
            state
        } else if first_epoch > phase_start {
            State::new(store.params_of(&reference)?)
        } else {
            begin_phase(&mut store, compiled, phase, &reference, cfg)?;
            let mut s = State::new(store.params_of(&reference)?);
            s.step = step;
            s
        };
        if let Some(Dist(d)) = &cfg.dist {
            // Every process starts the phase from process 0's state.
            dist::share(d.as_ref(), &mut state).map_err(TrainError::Data)?;
        }
        if let Some(label) = &phase.label {
            on(Event::Phase { label, first_epoch: phase_start + 1, last_epoch: phase_end });
        }
        let mut jit_before = programs.jit_seconds;
        for epoch in first_epoch.max(phase_start) + 1..=phase_end.min(last) {
            let epoch_start = Instant::now();
            let perm =
                data::permutation(train_idx.len(), cfg.seed ^ epoch.wrapping_mul(0xA24B_AED4_963E_E407));
            let order: Vec<usize> = perm.iter().map(|&i| train_idx[i]).collect();
            let mut loss_sum = 0f64;
            let mut term_sums: Vec<f64> = Vec::new();
            // How often each codebook vector was picked over the epoch (a quantized code).
            let mut codebook = codebook_size(&reference).map(|k| vec![0u64; k]);
            let mut allreduce = Duration::ZERO;
            // Every step's plan is known before the epoch starts: its rows, learning rate and
            // loss weights. A second thread gathers each step's batch (and corrupts it) while
            // the step before runs; the step waits only if the data is slower.
            let mut plans = Vec::with_capacity(order.len().div_ceil(batch));
            for (s, idx) in order.chunks(batch).enumerate() {
                let step = state.step + s as u64 + 1;
                // The learning rate and loss weights of this step (the whole network's phase).
                let controls = if phase.stage.is_none() {
                    let at = ((epoch - phase_start - 1) * steps_per_epoch + s as u64, steps_per_epoch);
                    Controls::at(
                        cfg,
                        &term_schedules,
                        (epoch - phase_start - 1, at),
                        phase.epochs,
                        plateau.as_ref(),
                    )
                } else {
                    Controls::default()
                };
                // Data-parallel: this process's shard, weighted by its share of the batch (a
                // process left without rows runs one with weight 0, to take the same update).
                let (rows, weight) = match &cfg.dist {
                    Some(Dist(d)) => {
                        let r = dist::shard(idx.len(), d.rank(), d.size());
                        let w = r.len() as f32 / idx.len() as f32;
                        if r.is_empty() { (&idx[..1], 0.0) } else { (&idx[r], w) }
                    }
                    None => (idx, 1.0),
                };
                let key = (rows.len(), if cfg.dist.is_some() { idx.len() } else { rows.len() });
                let inputs = programs.train(key)?.inputs.clone();
                plans.push(StepPlan { idx, rows, weight, key, step, controls, inputs });
            }
            let mut data_wait = Duration::ZERO;
            std::thread::scope(|scope| -> Result<(), TrainError> {
                let (tx, rx) = std::sync::mpsc::sync_channel(1);
                let (plans, noise) = (&plans, cfg.noise);
                scope.spawn(move || {
                    for p in plans {
                        let batch =
                            batch_inputs(&p.inputs, data, p.rows, (noise, seed, p.step), &p.controls.weights);
                        if tx.send(batch).is_err() {
                            break;
                        }
                    }
                });
                for (s, p) in plans.iter().enumerate() {
                    let waited = Instant::now();
                    let inputs = rx
                        .recv()
                        .map_err(|_| TrainError::Data("the data thread stopped".into()))?
                        .map_err(|e| TrainError::Data(e.to_string()))?;
                    data_wait += waited.elapsed();
                    state.step = p.step;
                    let opts = interp::Options {
                        seed,
                        step: state.step,
                        threads: cfg.threads,
                        check_finite: true,
                        lr: p.controls.lr,
                    };
                    let weight = p.weight;
                    let mut sum = |flat: &mut [f32]| {
                        if let Some(Dist(d)) = &cfg.dist {
                            flat.iter_mut().for_each(|v| *v *= weight);
                            let t = Instant::now();
                            d.sum_f32(flat);
                            allreduce += t.elapsed();
                        }
                    };
                    let reduce: Option<codegen::Reduce> =
                        if cfg.dist.is_some() { Some(&mut sum) } else { None };
                    let Outcome { loss, terms, code_ids } = programs
                        .step(p.key, &inputs, &mut state, &opts, on, reduce)
                        .map_err(|e| stop(e, epoch, state.step, cfg, epoch - 1))?;
                    if let (Some(ids), Some(counts)) = (code_ids, codebook.as_mut()) {
                        for &i in ids.i32() {
                            if let Some(c) = usize::try_from(i).ok().and_then(|i| counts.get_mut(i)) {
                                *c += 1;
                            }
                        }
                    }
                    loss_sum += loss * p.idx.len() as f64;
                    term_sums.resize(terms.len(), 0.0);
                    for (sum, t) in term_sums.iter_mut().zip(terms) {
                        *sum += t * p.idx.len() as f64;
                    }
                    on(Event::Step { epoch, step_in_epoch: s as u64 + 1, loss });
                    if cfg.interrupted() {
                        interrupted = true;
                        break;
                    }
                }
                Ok(())
            })?;
            if interrupted {
                break;
            }
            let controls = plans.last().map(|p| p.controls.clone()).unwrap_or_default();
            // Code generation happens inside the first steps; it is reported apart.
            let compiled_now = programs.jit_seconds - jit_before;
            let epoch_train = epoch_start.elapsed().saturating_sub(Duration::from_secs_f64(compiled_now));
            jit_before = programs.jit_seconds;
            train_time += epoch_train;
            trained_samples += order.len();
            programs.sync(&mut state);
            // The loss of each step was finite; an update can still overflow a parameter or an
            // optimizer buffer (Adam's second moment at a huge learning rate). Neither is saved.
            if let Some(what) = non_finite_state(&reference, &state) {
                let kept = kept_message(cfg, epoch - 1);
                return Err(TrainError::NonFinite { epoch, step: state.step, what, span: None, kept });
            }
            // Validation and decoding: process 0, which writes the metrics.
            let val_idx: &[usize] = if lead { &val_idx } else { &[] };
            let val =
                evaluate(&mut programs, data, val_idx, (batch, &controls.weights), cfg, &mut state, on)?;
            let val_loss = val.as_ref().map(|v| v.0);
            let (token_accuracy, sequence_accuracy, bleu) = match decoder.as_mut() {
                Some(d) if phase.stage.is_none() && !val_idx.is_empty() => {
                    let (t, s, b) =
                        decode_accuracy(d, (compiled, cfg.beam), data, val_idx, batch, &state.params)?;
                    (Some(t), Some(s), b)
                }
                _ => (None, None, None),
            };
            let usage = codebook.as_deref().map(codebook_usage);
            metrics.push(EpochMetrics {
                epoch,
                stage: phase.label.clone(),
                step: state.step,
                train_loss: loss_sum / order.len() as f64,
                terms: term_names(&reference)
                    .into_iter()
                    .zip(&term_sums)
                    .map(|(name, sum)| (name, sum / order.len() as f64))
                    .collect(),
                val_terms: match &val {
                    Some((_, terms)) => {
                        term_names(&reference).into_iter().zip(terms.iter().copied()).collect()
                    }
                    None => Default::default(),
                },
                val_loss,
                token_accuracy,
                sequence_accuracy,
                bleu,
                codebook_perplexity: usage.map(|u| u.0),
                codebook_usage: usage.map(|u| u.1),
                samples_per_s: rate(order.len(), epoch_train),
                allreduce_s: cfg
                    .dist
                    .is_some()
                    .then(|| allreduce.as_secs_f64() / order.len().div_ceil(batch).max(1) as f64),
                lr: Some(controls.lr.unwrap_or(match phase.stage {
                    None => cfg.base_lr,
                    Some(_) => f64::from(cfg.optimizer.lr()),
                })),
                weights: controls.weights.iter().cloned().collect(),
                seconds: started.elapsed().as_secs_f64(),
                data_wait_s: data_wait.as_secs_f64(),
                wall_time: std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0.0, |d| d.as_secs_f64()),
            });
            if let Some(m) = metrics.last() {
                on(Event::Epoch(m));
            }
            store.take_from(&reference, &state);
            if phase.stage.is_none() {
                on(Event::Params { epoch, params: &state.params });
            }
            // Early stopping, on the whole network's validation loss (not during pretraining):
            // decided by process 0, which alone validates, and shared.
            let mut stop = false;
            if let (Some(rule), None) = (cfg.early_stop, phase.stage) {
                if let Some(v) = val_loss {
                    let improved = early.is_none_or(|e| v < e.best - rule.min_delta);
                    early = Some(match early {
                        Some(e) if !improved => checkpoint::EarlyState { wait: e.wait + 1, ..e },
                        _ => checkpoint::EarlyState { best: v, best_epoch: epoch, wait: 0 },
                    });
                    if improved {
                        best = Some(model_only(&store, model_graph));
                    }
                }
                stop = stopped(&early);
                if let Some(Dist(d)) = &cfg.dist {
                    let mut shared = (stop, early);
                    dist::share(d.as_ref(), &mut shared).map_err(TrainError::Data)?;
                    (stop, early) = shared;
                }
            }
            // The plateau schedule moves on the whole network's validation loss, decided by
            // process 0 and shared like early stopping.
            if let (Some(rule @ Schedule::Plateau { .. }), None, Some(p)) =
                (&cfg.schedule, phase.stage, plateau.as_mut())
            {
                if let Some(v) = val_loss {
                    p.observe(v, rule);
                }
                if let Some(Dist(d)) = &cfg.dist {
                    dist::share(d.as_ref(), p).map_err(TrainError::Data)?;
                }
            }
            if lead
                && (stop
                    || epoch == last
                    || epoch == phase_end
                    || last_save.elapsed() >= Duration::from_secs(2))
            {
                let kept =
                    if epoch == total || stop { model_only(&store, model_graph) } else { store.clone() };
                let at = Saved { epoch, vocab: vocab_json.as_deref(), early, plateau, best: best.as_ref() };
                save(&cfg.out, &kept, &reference, &state, (at, cfg), &metrics)?;
                last_save = Instant::now();
                saved_epoch = Some(epoch);
            }
            if stop {
                stopped_after = Some(epoch);
                break;
            }
        }
        step = state.step;
        jit_seconds += programs.jit_seconds;
        phase_start = phase_end;
        if stopped_after.is_some() || interrupted {
            break;
        }
    }
    let params = store.params_of(model_graph)?;
    Ok(Summary {
        nothing_to_do: false,
        metrics,
        total_epochs: total,
        stopped_early: last < total,
        params,
        seconds: started.elapsed().as_secs_f64(),
        samples_per_s: rate(trained_samples, train_time),
        jit_seconds,
        early: early.map(|e| (e, stopped_after)),
        interrupted,
        saved_epoch,
    })
}

/// Prepares the store for a phase: a stage's fresh decoder; or, when fine-tuning after
/// pretraining, the stage decoders moved into the decoder layers that mirror their stages.
fn begin_phase(
    store: &mut Store,
    c: &Compiled,
    phase: &Phase,
    g: &Graph,
    cfg: &TrainConfig,
) -> Result<(), TrainError> {
    match phase.stage {
        Some(k) => {
            let seed = cfg.seed ^ (k as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            let values = super::init::init_params(g, cfg.init, seed);
            let prefix = format!("pretrain.{k}.");
            for (p, v) in g.params.iter().zip(values) {
                if p.name.starts_with(&prefix) {
                    store.set(&p.name, &p.shape, v);
                }
            }
        }
        None if cfg.pretrain.is_some() => {
            // Decoder layers with parameters, last stage first (the mirror's order).
            let decoder: Vec<usize> = c
                .model
                .layers
                .iter()
                .filter(|l| l.part == Part::Decoder && !l.params.is_empty())
                .map(|l| l.index)
                .collect();
            let k = stage::stages(&c.model);
            for (i, index) in decoder.iter().enumerate().take(k) {
                let s = k - i;
                for suffix in ["weight", "bias"] {
                    let from = format!("pretrain.{s}.{suffix}");
                    let to = format!("decoder.{index}.{suffix}");
                    let shape = c.forward.params.iter().find(|p| p.name == to).map(|p| p.shape.clone());
                    let src = store.entries.iter().find(|e| e.0 == from).cloned();
                    if let (Some(shape), Some((_, from_shape, v))) = (shape, src)
                        && shape == from_shape
                    {
                        store.set(&to, &shape, v);
                    }
                }
            }
            store.entries.retain(|e| !e.0.starts_with("pretrain."));
        }
        None => {}
    }
    Ok(())
}

/// The store reduced to the model's own parameters (what a finished run's checkpoint holds).
fn model_only(store: &Store, g: &Graph) -> Store {
    let entries = store.entries.iter().filter(|e| g.params.iter().any(|p| p.name == e.0)).cloned().collect();
    Store { entries }
}

/// Where a resumed run stands: its metrics, epoch and step, early stopping's and the plateau
/// schedule's state.
type Resumed = (Vec<EpochMetrics>, u64, u64, Option<checkpoint::EarlyState>, Option<PlateauState>);

/// Loads the run folder into the store: where the run stands and its metrics so far.
fn resume(store: &mut Store, model: &Graph, cfg: &TrainConfig) -> Result<Resumed, TrainError> {
    // The last committed save, with any interrupted one finished or cleared away.
    checkpoint::recover(&cfg.out).map_err(TrainError::Io)?;
    let path = cfg.out.join("checkpoint.safetensors");
    let saved = checkpoint::read_all(&path).map_err(TrainError::Io)?;
    for p in &model.params {
        match saved.iter().find(|s| s.0 == p.name) {
            Some((_, shape, _)) if *shape != p.shape => {
                return Err(TrainError::Data(format!(
                    "{}: `{}` has shape {shape:?}, the spec needs {:?}",
                    path.display(),
                    p.name,
                    p.shape
                )));
            }
            Some(_) => {}
            None => {
                return Err(TrainError::Data(format!(
                    "{} has no `{}`, which the spec needs",
                    path.display(),
                    p.name
                )));
            }
        }
    }
    for (name, shape, v) in saved {
        store.set(&name, &shape, v);
    }
    let (state, progress) = checkpoint::load_optimizer(&cfg.out, model).map_err(TrainError::Io)?;
    if progress.seed != cfg.seed {
        return Err(TrainError::Data(format!(
            "the checkpoint in {} was trained with seed {}, this run has seed {}: pass --seed {}",
            cfg.out.display(),
            progress.seed,
            cfg.seed,
            progress.seed
        )));
    }
    let metrics = read_metrics(&cfg.out.join("metrics.jsonl"), progress.epoch);
    let early = progress.early.filter(|_| cfg.early_stop.is_some());
    Ok((metrics, progress.epoch, state.step, early, progress.plateau))
}

/// Greedy decoding of the samples `idx`: token and whole-sequence accuracy against the loss
/// target, and for padded sentences (text) their corpus BLEU.
pub fn decode_accuracy(
    d: &mut super::decode::Decoder,
    (compiled, beam): (&Compiled, (usize, f64)),
    data: &Dataset,
    idx: &[usize],
    batch: usize,
    params: &[Vec<f32>],
) -> Result<(f64, f64, Option<f64>), TrainError> {
    let target = compiled.model.loss_target().map(|v| v.name.as_str()).unwrap_or_default();
    let k = data
        .names
        .iter()
        .position(|n| n == target)
        .ok_or_else(|| TrainError::Data("no target data".into()))?;
    let (mut got, mut want) = (Vec::new(), Vec::new());
    for chunk in idx.chunks(batch) {
        let inputs: Vec<Buf> = (0..data.arrays.len())
            .map(|a| {
                Ok(match data.gather(a, chunk)? {
                    Values::F32(v) => Buf::F32(v),
                    Values::I32(v) => Buf::I32(v),
                })
            })
            .collect::<Result<_, data::DataError>>()
            .map_err(|e| TrainError::Data(e.to_string()))?;
        got.extend(d.decode_beam(params, &inputs, chunk.len(), beam).map_err(TrainError::Compile)?);
        if let Values::I32(v) = data.gather(k, chunk).map_err(|e| TrainError::Data(e.to_string()))? {
            want.extend(v);
        }
    }
    let (tokens, sequences) = super::decode::accuracy(&got, &want, d.len, d.padded);
    let bleu = d.padded.then(|| super::decode::bleu(&got, &want, d.len));
    Ok((tokens, sequences, bleu))
}

/// The mean validation loss and its terms (inference mode: no dropout, no noise), weighted
/// by batch size like the training loss.
fn evaluate(
    programs: &mut Programs,
    data: &Dataset,
    idx: &[usize],
    (batch, weights): (usize, &[(String, f64)]),
    cfg: &TrainConfig,
    state: &mut State,
    on: &mut dyn FnMut(Event),
) -> Result<Option<(f64, Vec<f64>)>, TrainError> {
    if idx.is_empty() {
        return Ok(None);
    }
    let mut sum = 0f64;
    let mut term_sums: Vec<f64> = Vec::new();
    for chunk in idx.chunks(batch) {
        let g = programs.eval(chunk.len())?;
        let inputs = batch_inputs(&g.inputs, data, chunk, (None, cfg.seed, state.step), weights)
            .map_err(|e| TrainError::Data(e.to_string()))?;
        let opts = interp::Options {
            seed: cfg.seed,
            step: state.step,
            threads: cfg.threads,
            check_finite: false,
            lr: None,
        };
        let Outcome { loss, terms, .. } = programs.eval_loss(chunk.len(), &inputs, state, &opts, on)?;
        sum += loss * chunk.len() as f64;
        term_sums.resize(terms.len(), 0.0);
        for (s, t) in term_sums.iter_mut().zip(terms) {
            *s += t * chunk.len() as f64;
        }
    }
    let n = idx.len() as f64;
    Ok(Some((sum / n, term_sums.into_iter().map(|s| s / n).collect())))
}

fn stop(e: StepFail, epoch: u64, step: u64, cfg: &TrainConfig, last_good: u64) -> TrainError {
    let e = match e {
        StepFail::Run(e) => e,
        StepFail::Train(e) => return e,
        StepFail::Native(what) => return TrainError::Data(format!("{what} (step {step}, epoch {epoch})")),
    };
    let kept = kept_message(cfg, last_good);
    match e {
        interp::Error::NonFinite { span, .. } => {
            TrainError::NonFinite { epoch, step, what: e.to_string(), span, kept }
        }
        other => TrainError::Data(other.to_string()),
    }
}

/// What a step gives back: its loss, each of its terms and, with a quantized code, the ids
/// its quantizer picked.
struct Outcome {
    loss: f64,
    terms: Vec<f64>,
    code_ids: Option<Buf>,
}

/// The loss of a step and each of its terms (the `term.*` outputs, in order), read by name.
fn outcome(g: &Graph, read: impl Fn(&str) -> Option<Buf>) -> Outcome {
    let scalar =
        |name: &str| read(name).map_or(f64::NAN, |b| f64::from(b.f32().first().copied().unwrap_or(f32::NAN)));
    let terms =
        g.outputs.iter().filter(|(n, _)| n.starts_with(TERM_PREFIX)).map(|(n, _)| scalar(n)).collect();
    Outcome { loss: scalar("loss"), terms, code_ids: read(CODE_IDS) }
}

/// The size of a quantized code's codebook, if the model has one.
fn codebook_size(g: &Graph) -> Option<usize> {
    g.params.iter().find(|p| matches!(p.role, crate::ir::ParamRole::Codebook { .. })).map(|p| p.shape[0])
}

/// A codebook's perplexity exp(−Σ p log p) over how often each vector was picked, and the
/// share of its vectors picked at all.
pub fn codebook_usage(counts: &[u64]) -> (f64, f64) {
    let total = counts.iter().sum::<u64>().max(1) as f64;
    let entropy: f64 = counts
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = c as f64 / total;
            -p * p.ln()
        })
        .sum();
    let used = counts.iter().filter(|&&c| c > 0).count() as f64 / counts.len().max(1) as f64;
    (entropy.exp(), used)
}

/// The names of a graph's loss terms (`mse`, `l2(weights)`, …), in order.
fn term_names(g: &Graph) -> Vec<String> {
    g.outputs.iter().filter_map(|(n, _)| n.strip_prefix(TERM_PREFIX)).map(str::to_owned).collect()
}

/// Samples per second over `spent`, when that is long enough to time (a millisecond).
fn rate(samples: usize, spent: Duration) -> Option<f64> {
    (spent >= Duration::from_millis(1)).then(|| samples as f64 / spent.as_secs_f64())
}

/// What became of the run's checkpoint when it stops on a non-finite number.
fn kept_message(cfg: &TrainConfig, last_good: u64) -> String {
    if last_good > 0 && cfg.out.join("checkpoint.safetensors").exists() {
        format!("training stopped; the last good checkpoint stays in {}", cfg.out.display())
    } else {
        "training stopped before any checkpoint was written".to_owned()
    }
}

/// The first parameter or optimizer buffer of `state` holding NaN or infinity, described.
fn non_finite_state(g: &Graph, state: &State) -> Option<String> {
    for (i, p) in g.params.iter().enumerate() {
        if state.params.get(i).is_some_and(|v| v.iter().any(|x| !x.is_finite())) {
            return Some(format!("the parameter `{}` became NaN or infinite", p.name));
        }
        let slots = state.slots.get(i).map_or(&[][..], Vec::as_slice);
        if let Some(k) = slots.iter().position(|v| v.iter().any(|x| !x.is_finite())) {
            return Some(format!("the optimizer's buffer {k} of `{}` became NaN or infinite", p.name));
        }
    }
    None
}

/// Saves the run as one transaction: checkpoint, optimizer state, metrics and configuration.
/// What a save records besides the parameters: its epoch, early stopping's state and the best
/// epoch's weights.
struct Saved<'a> {
    epoch: u64,
    /// A text source's vocabularies, as `vocab.json`.
    vocab: Option<&'a str>,
    early: Option<checkpoint::EarlyState>,
    plateau: Option<PlateauState>,
    best: Option<&'a Store>,
}

fn save(
    dir: &Path,
    store: &Store,
    g: &Graph,
    state: &State,
    (at, cfg): (Saved, &TrainConfig),
    metrics: &[EpochMetrics],
) -> Result<(), TrainError> {
    let progress = Progress { epoch: at.epoch, seed: cfg.seed, early: at.early, plateau: at.plateau };
    let mut files = checkpoint::save_files(&store.entries, g, state, &progress).map_err(TrainError::Io)?;
    if let Some(best) = at.best {
        files.push(("best.safetensors", checkpoint::weights_file(&best.entries).map_err(TrainError::Io)?));
    }
    if let Some(config) = &cfg.config_json {
        files.push(("config.json", config.clone().into_bytes()));
    }
    if let Some(vocab) = at.vocab {
        files.push((crate::data::text::VOCAB_FILE, vocab.as_bytes().to_vec()));
    }
    // TensorBoard's events: a function of the metrics and the pictures, so in the transaction.
    let picture = |epoch: u64| std::fs::read(dir.join(format!("epoch-{epoch:04}.png"))).ok();
    files.push((super::tensorboard::FILE, super::tensorboard::events(metrics, &picture)));
    let mut text = String::new();
    for m in metrics {
        text.push_str(&serde_json::to_string(m).map_err(|e| TrainError::Io(e.to_string()))?);
        text.push('\n');
    }
    files.push(("metrics.jsonl", text.into_bytes()));
    checkpoint::commit(dir, &files, state.step).map_err(TrainError::Io)
}

/// The metrics of epochs up to `upto` from an earlier run's file.
fn read_metrics(path: &Path, upto: u64) -> Vec<EpochMetrics> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .filter_map(|l| serde_json::from_str::<EpochMetrics>(l).ok())
        .filter(|m| m.epoch <= upto)
        .collect()
}
