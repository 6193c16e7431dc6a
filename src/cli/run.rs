//! `aec run` (train, or run a trained network) and `aec encode`.

use super::picture::{self, Column};
use super::plot;
use super::{Failure, read_spec, report};
use aec::data::{self, Array, Dataset, Values};
use aec::diag::Diagnostic;
use aec::interp::Buf;
use aec::runtime::checkpoint;
use aec::runtime::config::Overrides;
use aec::runtime::infer::{self, Output};
use aec::runtime::train::{self, Event, TrainConfig, TrainError};
use aec::syntax::ast::{DataSource, Init, Optimizer};
use aec::{Compiled, Config};
use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};

#[derive(clap::Args, Clone)]
pub struct RunArgs {
    /// The `.ae` spec.
    spec: PathBuf,
    /// Train the network (with the spec's `train` block and these overrides).
    #[arg(long)]
    train: bool,
    /// Epochs of training (replaces the train block's `epochs`; default 10).
    #[arg(long, allow_negative_numbers = true, value_parser = clap::value_parser!(u64).range(1..))]
    epochs: Option<u64>,
    #[command(flatten)]
    search: super::translate::SearchArgs,
    /// With --weights and an `attention` layer: write its weights of greedy decoding,
    /// `[samples, target length, source length]` f32, to this .npy file.
    #[arg(long)]
    attention: Option<PathBuf>,
    /// Samples per step (replaces the train block's `batch`; default 1).
    #[arg(long, allow_negative_numbers = true, value_parser = clap::value_parser!(u64).range(1..=1 << 24))]
    batch: Option<u64>,
    /// Learning rate (replaces the optimizer's `lr`).
    #[arg(long, allow_negative_numbers = true)]
    lr: Option<f64>,
    /// The seed of every random choice: initialisation, validation split, order, noise
    /// (replaces the train block's `seed`; default 0).
    #[arg(long, allow_negative_numbers = true)]
    seed: Option<u64>,
    /// Worker threads (default: all cores).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=256))]
    threads: Option<u64>,
    /// Run folder for checkpoints and metrics (default: runs/<spec name>).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Continue training from the last checkpoint in this run folder.
    #[arg(long)]
    resume: Option<PathBuf>,
    /// Start training from these weights (an aec checkpoint, or a PyTorch `state_dict` saved
    /// as safetensors: names and shapes must match the spec's), with a fresh optimizer.
    #[arg(long, conflicts_with = "resume")]
    init: Option<PathBuf>,
    /// Stop after this epoch (counting pretraining's) with a checkpoint; continue later with
    /// --resume.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    stop_at: Option<u64>,
    /// The executor: native code (`jit`) or the reference interpreter (`interp`).
    #[arg(long, value_enum, default_value_t = Backend::Jit)]
    backend: Backend,
    /// Trained parameters (a checkpoint.safetensors), to run the network without training.
    #[arg(long)]
    weights: Option<PathBuf>,
    /// Input samples (.npy), to run the network on — scaled as the spec's `data` line scales its
    /// data (see --raw-input).
    #[arg(long)]
    input: Option<PathBuf>,
    /// Where to write the outputs (.npy, f32).
    #[arg(long)]
    output: Option<PathBuf>,
    /// Write a picture (PNG): inputs, (noisy inputs,) outputs and target masks side by side —
    /// of the held-out samples after training, or of the first inputs with --weights.
    #[arg(long)]
    png: Option<PathBuf>,
    /// While training, write such a picture every N epochs into the run folder
    /// (`epoch-0005.png`, …).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    png_every: Option<u64>,
    /// With --input: feed it as it is, without the `scale` of the spec's data.
    #[arg(long)]
    raw_input: bool,
    /// A conditioned model (`condition y: …`): each condition's values for the inputs (.npy,
    /// one per sample: class ids as integers, or vectors), in the order the spec declares them.
    #[arg(long = "condition")]
    conditions: Vec<PathBuf>,
}

#[derive(clap::Args)]
pub struct EncodeArgs {
    /// The `.ae` spec.
    spec: PathBuf,
    /// The executor: native code (`jit`) or the reference interpreter (`interp`).
    #[arg(long, value_enum, default_value_t = Backend::Jit)]
    backend: Backend,
    /// Trained parameters (a checkpoint.safetensors).
    #[arg(long)]
    weights: PathBuf,
    /// Input samples (.npy), scaled as the spec's `data` line scales its data.
    #[arg(long)]
    input: PathBuf,
    /// Where to write the codes (.npy, f32; a quantized code's ids as i32: `[N]`, or
    /// `[N, H, W]` for one id per position of an image code).
    #[arg(long)]
    output: PathBuf,
    /// Worker threads (default: all cores).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=256))]
    threads: Option<u64>,
    /// Feed --input as it is, without the `scale` of the spec's data.
    #[arg(long)]
    raw_input: bool,
    /// A quantized code: write its codebook vectors (f32, the code's shape) instead of their
    /// ids.
    #[arg(long)]
    vectors: bool,
    /// A conditioned model (`condition y: …`): each condition's values for the inputs (.npy,
    /// one per sample: class ids as integers, or vectors), in the order the spec declares them.
    #[arg(long = "condition")]
    conditions: Vec<PathBuf>,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Backend {
    /// Native code generated with Cranelift.
    Jit,
    /// The reference interpreter.
    Interp,
}

impl Backend {
    pub(super) fn runtime(self) -> aec::runtime::Backend {
        match self {
            Backend::Jit => aec::runtime::Backend::Jit,
            Backend::Interp => aec::runtime::Backend::Interp,
        }
    }
}

/// A spec that compiled, with its text for diagnostics.
pub(super) struct Spec {
    pub(super) path: PathBuf,
    pub(super) src: String,
    pub(super) compiled: Compiled,
}

pub(super) fn load_spec(path: &Path, batch: Option<u64>) -> Result<Spec, Failure> {
    let src = read_spec(path)?;
    match aec::compile(&src, &Config { batch }) {
        Ok(compiled) => {
            report(&compiled.warnings, path, &src);
            Ok(Spec { path: path.to_owned(), src, compiled })
        }
        Err(diags) => {
            report(&diags, path, &src);
            Err(Failure::Spec)
        }
    }
}

impl Spec {
    fn dir(&self) -> PathBuf {
        self.path.parent().map(Path::to_path_buf).unwrap_or_default()
    }

    fn name(&self) -> String {
        self.path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "run".into())
    }
}

pub(super) fn threads(t: Option<u64>) -> usize {
    t.map(|t| t as usize).unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

impl RunArgs {
    /// `--train`: the one command that runs across MPI processes.
    pub fn trains(&self) -> bool {
        self.train
    }
}

pub fn run(args: &RunArgs) -> Result<(), Failure> {
    if args.train {
        if args.weights.is_some() || args.input.is_some() || args.output.is_some() || args.attention.is_some()
        {
            return Err(Failure::Io(
                "--train takes its data from the spec; drop --weights/--input/--output/--attention".into(),
            ));
        }
        return train_cmd(args);
    }
    let (Some(weights), Some(input), Some(output)) = (&args.weights, &args.input, &args.output) else {
        return Err(Failure::Io(
            "say what to do: `aec run SPEC --train`, or `aec run SPEC --weights W --input X.npy --output Y.npy`".into(),
        ));
    };
    if args.attention.is_some() && args.search.beam > 1 {
        return Err(Failure::Io("--attention writes greedy decoding's weights: drop --beam".into()));
    }
    if let Some(p) = &args.attention {
        check_file_path("--attention", p)?;
    }
    let search = infer::Search {
        beam: args.search.beam as usize,
        alpha: args.search.alpha,
        record: args.attention.is_some(),
    };
    let how = Apply {
        threads: threads(args.threads),
        backend: args.backend,
        raw: args.raw_input,
        search,
        attention_file: args.attention.clone(),
        vectors: false,
        conditions: args.conditions.clone(),
    };
    apply(&args.spec, weights, input, output, Output::Recon, how)?;
    if let Some(path) = &args.attention {
        eprintln!("attention weights: {}", path.display());
    }
    if let Some(png) = &args.png {
        let spec = load_spec(&args.spec, None)?;
        let ty = &spec.compiled.model.inputs.first().ok_or(Failure::Spec)?.ty;
        let dims = picture::image_dims(ty).ok_or_else(|| Failure::Io(not_images(ty)))?;
        let x = data::conform(
            data::read_npy(input).map_err(|e| Failure::Data(e.to_string()))?,
            spec.compiled.model.inputs.first().ok_or(Failure::Spec)?,
            &input.display().to_string(),
        )
        .map_err(|e| Failure::Data(e.to_string()))?;
        let y = data::read_npy(output).map_err(|e| Failure::Data(e.to_string()))?;
        let cols = [Column { title: "inputs", images: &x }, Column { title: "outputs", images: &y }];
        let done = picture::write_grid(png, &cols, dims, 8).map_err(Failure::Io)?;
        eprintln!("wrote {done}");
    }
    Ok(())
}

fn not_images(ty: &aec::sema::Ty) -> String {
    format!("--png draws images, and this model's input is {ty}")
}

/// The picture of a trained model on held-out samples (the first training samples when there
/// is no validation split): inputs, noisy inputs (denoising), outputs, target masks.
fn training_picture(
    c: &Compiled,
    params: &[Vec<f32>],
    data: &Dataset,
    cfg: &TrainConfig,
    path: &Path,
) -> Result<String, Failure> {
    let model = &c.model;
    let var = model.inputs.first().ok_or(Failure::Spec)?;
    let dims = picture::image_dims(&var.ty).ok_or_else(|| Failure::Io(not_images(&var.ty)))?;
    let (train_idx, val) = data.split(cfg.validation, cfg.seed);
    let idx: Vec<usize> = if val.is_empty() { train_idx } else { val }.into_iter().take(8).collect();
    let sample = |k: usize| -> Result<Array, Failure> {
        Ok(Array {
            shape: std::iter::once(idx.len()).chain(data.arrays[k].shape()[1..].iter().copied()).collect(),
            values: data.gather(k, &idx).map_err(|e| Failure::Data(e.to_string()))?,
        })
    };
    let x = sample(0)?;
    let noisy = cfg.noise.map(|noise| {
        let mut a = x.clone();
        if let Values::F32(v) = &mut a.values {
            data::corrupt(v, noise, cfg.seed, 0);
        }
        a
    });
    let fed = noisy.as_ref().unwrap_or(&x);
    // A conditioned model's conditions for the same samples.
    let conditions = model
        .conditions
        .iter()
        .map(|v| data.names.iter().position(|n| *n == v.name).ok_or(Failure::Spec).and_then(sample))
        .collect::<Result<Vec<_>, _>>()?;
    let y =
        infer::infer_with(c, params, (fed, &conditions), Output::Recon, idx.len(), cfg.threads, cfg.backend)
            .map_err(Failure::Data)?;
    let mut cols = vec![Column { title: "inputs", images: &x }];
    if let Some(n) = &noisy {
        cols.push(Column { title: "noisy inputs", images: n });
    }
    cols.push(Column { title: "outputs", images: &y });
    let target = mask_target(c, data).map(sample).transpose()?;
    if let Some(t) = &target {
        cols.push(Column { title: "target masks", images: t });
    }
    picture::write_grid(path, &cols, dims, 8).map_err(Failure::Io)
}

/// The data array of a segmentation target: a declared `target` of the output's shape that
/// the loss compares with (not the input itself).
fn mask_target(c: &Compiled, data: &Dataset) -> Option<usize> {
    let t = c.model.loss_target()?;
    let is_input = c.model.inputs.iter().any(|v| v.name == t.name);
    (!is_input && t.ty == c.model.output).then(|| data.names.iter().position(|n| *n == t.name))?
}

/// Segmentation on held-out samples: pixel accuracy and the foreground's intersection over
/// union, with the output thresholded at 0.5.
fn mask_metrics(
    c: &Compiled,
    params: &[Vec<f32>],
    data: &Dataset,
    cfg: &TrainConfig,
) -> Result<Option<(f64, f64, usize)>, Failure> {
    let Some(k) = mask_target(c, data) else { return Ok(None) };
    let (_, idx) = data.split(cfg.validation, cfg.seed);
    if idx.is_empty() {
        return Ok(None);
    }
    let take = |k: usize| -> Result<Array, Failure> {
        Ok(Array {
            shape: std::iter::once(idx.len()).chain(data.arrays[k].shape()[1..].iter().copied()).collect(),
            values: data.gather(k, &idx).map_err(|e| Failure::Data(e.to_string()))?,
        })
    };
    let y = infer::infer(c, params, &take(0)?, Output::Recon, 64, cfg.threads, cfg.backend)
        .map_err(Failure::Data)?;
    let (Values::F32(p), Values::F32(t)) = (&y.values, &take(k)?.values) else { return Ok(None) };
    let (mut right, mut inter, mut union) = (0usize, 0usize, 0usize);
    for (&p, &t) in p.iter().zip(t) {
        let (p, t) = (p >= 0.5, t >= 0.5);
        right += usize::from(p == t);
        inter += usize::from(p && t);
        union += usize::from(p || t);
    }
    let n = p.len().max(1);
    let iou = if union == 0 { 1.0 } else { inter as f64 / union as f64 };
    Ok(Some((right as f64 / n as f64, iou, idx.len())))
}

#[derive(clap::Args)]
pub struct CheckArgs {
    /// The `.ae` spec.
    spec: PathBuf,
    /// Samples in the checked batch (the first of the spec's data; random ones without data).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..=4096))]
    batch: u64,
    /// The seed of the initial parameters (and of noise and dropout).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Elements of each parameter compared with finite differences.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    samples: u64,
}

/// `aec check`: every parameter's gradient against finite differences, and the native code
/// against the interpreter; exit 1 when one disagrees.
pub fn check(args: &CheckArgs) -> Result<(), Failure> {
    let spec = load_spec(&args.spec, Some(args.batch))?;
    let g = &spec.compiled.forward;
    let has_data = spec.compiled.ast.train.as_ref().is_some_and(|t| !t.data.is_empty());
    let inputs = if has_data {
        let data = dataset(&spec, args.seed)?;
        let idx: Vec<usize> = (0..data.n).cycle().take(args.batch as usize).collect();
        let noise = spec.compiled.ast.train.as_ref().and_then(|t| t.noise);
        // Scheduled loss weights at their final value.
        let weights: Vec<(String, f64)> = spec
            .compiled
            .model
            .loss
            .extra
            .iter()
            .filter_map(|t| Some((t.name(), t.schedule?.0.at(u64::MAX, 1))))
            .collect();
        aec::runtime::train::batch_inputs(&g.inputs, &data, &idx, (noise, args.seed, 1), &weights)
            .map_err(|e| Failure::Data(e.to_string()))?
    } else {
        random_inputs(&spec, args.seed)
    };
    let params = aec::runtime::init::init_params(g, Init::Default, args.seed);
    let r = aec::runtime::check::check(g, &params, &inputs, args.samples as usize, true)
        .map_err(Failure::Data)?;
    outln!(
        "{} at batch {} ({}): loss {:.6} on the interpreter, {} natively",
        spec.compiled.model.name,
        args.batch,
        if has_data { "the first samples of its data" } else { "random inputs" },
        r.loss,
        r.native_loss.map_or("—".to_owned(), |l| format!("{l:.6}"))
    );
    outln!(
        "{:<28} {:>9} {:>7}  {:>14}  {:>14}  {:>16}  verdict",
        "parameter",
        "elements",
        "checked",
        "vs differences",
        "along gradient",
        "native vs interp"
    );
    for p in &r.params {
        outln!(
            "{:<28} {:>9} {:>7}  {:>14}  {:>14}  {:>16}  {}",
            p.name,
            p.elements,
            p.sampled,
            format!("{:.1e}", p.fd_error),
            p.dir_error.map_or("—".to_owned(), |e| format!("{e:.1e}")),
            p.native_error.map_or("—".to_owned(), |e| format!("{e:.1e}")),
            if p.passes() { "ok" } else { "FAIL" }
        );
    }
    outln!(
        "(relative differences; finite differences per element and along each gradient, at steps 1e-3, \
         3e-4 and 1e-4, the best of them)"
    );
    if r.passes() {
        outln!("every gradient agrees");
        Ok(())
    } else {
        Err(Failure::Data("a gradient disagrees (see FAIL above)".into()))
    }
}

/// Random inputs for a spec without data: values in [0, 1), token ids within their vocabulary.
fn random_inputs(spec: &Spec, seed: u64) -> Vec<Buf> {
    use rand::{RngExt, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let model = &spec.compiled.model;
    spec.compiled
        .forward
        .inputs
        .iter()
        .map(|i| {
            let n = i.ty.numel();
            let vocab = model.variables().find(|v| i.name.starts_with(v.name.as_str()));
            match vocab.map(|v| &v.ty) {
                Some(aec::sema::Ty::Tokens { vocab, .. } | aec::sema::Ty::Token { vocab }) => {
                    let v = *vocab as i32;
                    Buf::I32((0..n).map(|_| rng.random_range(0..v)).collect())
                }
                _ => Buf::F32((0..n).map(|_| rng.random::<f32>()).collect()),
            }
        })
        .collect()
}

pub fn encode(args: &EncodeArgs) -> Result<(), Failure> {
    let how = Apply {
        threads: threads(args.threads),
        backend: args.backend,
        raw: args.raw_input,
        search: infer::Search::GREEDY,
        attention_file: None,
        vectors: args.vectors,
        conditions: args.conditions.clone(),
    };
    let what = if args.vectors { Output::Code } else { Output::CodeIds };
    apply(&args.spec, &args.weights, &args.input, &args.output, what, how)
}

/// How `apply` runs: threads, backend, whether `--input` skips the data's `scale`, and how a
/// teacher-forced decoder searches (its attention weights written beside the output).
struct Apply {
    threads: usize,
    backend: Backend,
    raw: bool,
    search: infer::Search,
    attention_file: Option<PathBuf>,
    /// `encode --vectors`: asked for a quantized code's vectors.
    vectors: bool,
    /// `--condition` files, one per condition of the model.
    conditions: Vec<PathBuf>,
}

/// The `scale` the spec's `data` line applies to the first input's data (through `patches`).
fn input_scale(spec: &Spec) -> Option<f64> {
    let bindings = spec.compiled.ast.train.as_ref().map(|t| t.data.as_slice()).unwrap_or(&[]);
    let first = spec.compiled.model.inputs.first()?;
    let binding = bindings.iter().find(|b| b.binding.as_ref().is_none_or(|n| n.name == first.name))?;
    let mut source = &binding.source;
    loop {
        match source {
            DataSource::Patches { source: inner, .. } => source = inner,
            DataSource::Npy { scale, .. } | DataSource::Csv { scale, .. } | DataSource::Idx { scale, .. } => {
                return Some(*scale);
            }
            _ => return None,
        }
    }
}

fn apply(
    spec: &Path,
    weights: &Path,
    input: &Path,
    output: &Path,
    what: Output,
    how: Apply,
) -> Result<(), Failure> {
    let spec = load_spec(spec, None)?;
    // `encode` asks for a quantized code's ids (unless `--vectors`); other codes are vectors.
    let quantized = aec::sema::lower::quantizes(&spec.compiled.model);
    let what = match what {
        Output::CodeIds if !quantized => Output::Code,
        Output::Code if !quantized && how.vectors => {
            return Err(Failure::Io(format!(
                "--vectors writes a quantized code's codebook vectors, and {} has no quantizer \
                 (its codes are vectors already)",
                spec.path.display()
            )));
        }
        other => other,
    };
    let params = load_weights(&spec, weights)?;
    let (x, listing) = read_input_listed(&spec, input, how.raw)?;
    let conditions = read_conditions(&spec, &how.conditions)?;
    let backend = how.backend.runtime();
    let decoder = aec::runtime::decode::Decoder::new(&spec.compiled, backend, how.threads);
    let searched = how.search.beam > 1 || how.search.record;
    if how.search.record && !aec::sema::lower::attends(&spec.compiled.model) {
        return Err(Failure::Io(format!(
            "--attention writes an `attention` layer's weights, and {} has none",
            spec.path.display()
        )));
    }
    let y = match decoder {
        Some(mut d) if what == Output::Recon => {
            let (y, weights) = infer::decode(&mut d, &params, &x, 256, how.search).map_err(Failure::Data)?;
            if let (Some(w), Some(path)) = (weights, &how.attention_file) {
                data::write_npy(path, &w).map_err(|e| Failure::Io(e.to_string()))?;
            }
            y
        }
        _ if searched => {
            return Err(Failure::Io(format!(
                "--beam and --attention decode a teacher-forced decoder's sentences, and {} has none",
                spec.path.display()
            )));
        }
        _ => infer::infer_with(&spec.compiled, &params, (&x, &conditions), what, 256, how.threads, backend)
            .map_err(Failure::Data)?,
    };
    data::write_npy(output, &y).map_err(|e| Failure::Io(e.to_string()))?;
    // Codes of a folder of images: their labels beside them.
    if let (Output::Code | Output::CodeIds, Some(listing)) = (what, &listing) {
        write_labels(listing, output)?;
    }
    let dtype = match (&y.values, what) {
        (Values::I32(_), Output::CodeIds) => "i32 codebook ids",
        (Values::I32(_), _) => "i32 token ids",
        _ => "f32",
    };
    eprintln!("wrote {} ({:?}, {dtype})", output.display(), y.shape);
    Ok(())
}

/// The `--condition` files of a conditioned model, each checked against its condition's type.
pub(super) fn read_conditions(spec: &Spec, files: &[PathBuf]) -> Result<Vec<data::Array>, Failure> {
    let vars = &spec.compiled.model.conditions;
    if files.len() != vars.len() {
        let names: Vec<String> = vars.iter().map(|v| format!("`{}` ({})", v.name, v.ty)).collect();
        return Err(Failure::Io(match vars.len() {
            0 => format!(
                "--condition gives a conditioned model its conditions, and {} has none",
                spec.path.display()
            ),
            _ => format!(
                "{} is conditioned on {}: give --condition FILE.npy for each, in that order ({} given)",
                spec.path.display(),
                names.join(", "),
                files.len()
            ),
        }));
    }
    files
        .iter()
        .zip(vars)
        .map(|(f, var)| {
            if !f.is_file() {
                return Err(Failure::Io(format!("--condition {} does not exist; give a file", f.display())));
            }
            let a = data::read_npy(f).map_err(|e| Failure::Data(e.to_string()))?;
            data::conform(a, var, &format!("--condition {}", f.display()))
                .map_err(|e| Failure::Data(e.to_string()))
        })
        .collect()
}

/// The parameters of `--weights`, checked against the spec's.
pub(super) fn load_weights(spec: &Spec, weights: &Path) -> Result<Vec<Vec<f32>>, Failure> {
    if !weights.is_file() {
        let what = if weights.is_dir() { "is a folder" } else { "does not exist" };
        return Err(Failure::Io(format!("--weights {} {what}; give a file", weights.display())));
    }
    checkpoint::load_params(weights, &spec.compiled.forward).map_err(Failure::Data)
}

/// The samples of `--input` as the network takes them: scaled as the spec's data is (unless
/// `raw`), checked against the input's type.
pub(super) fn read_input(spec: &Spec, input: &Path, raw: bool) -> Result<data::Array, Failure> {
    read_input_listed(spec, input, raw).map(|(x, _)| x)
}

/// `read_input`, and for a folder of images its listing (files, labels).
fn read_input_listed(
    spec: &Spec,
    input: &Path,
    raw: bool,
) -> Result<(data::Array, Option<data::images::Listing>), Failure> {
    let var = spec.compiled.model.inputs.first().ok_or(Failure::Spec)?;
    if input.is_dir() && matches!(&var.ty, aec::sema::Ty::Tensor(d) if d.len() == 3) {
        return read_folder(spec, input, raw).map(|(x, listing)| (x, Some(listing)));
    }
    if !input.is_file() {
        let what = if input.is_dir() {
            "is a folder (of images only for [C, H, W] inputs)"
        } else {
            "does not exist"
        };
        return Err(Failure::Io(format!("--input {} {what}; give a file", input.display())));
    }
    let mut x = data::read_npy(input).map_err(|e| Failure::Data(e.to_string()))?;
    // The network was trained on the data as the spec scales it: so is --input, unless asked.
    match input_scale(spec).filter(|&s| s != 1.0) {
        Some(scale) if !raw => {
            if let Values::F32(v) = &mut x.values {
                v.iter_mut().for_each(|a| *a = (f64::from(*a) * scale) as f32);
            }
            eprintln!(
                "scaled {} by {scale} as the spec's data is (--raw-input feeds it as it is)",
                input.display()
            );
        }
        Some(scale) => eprintln!("fed {} as it is (the spec's data is scaled by {scale})", input.display()),
        None => {}
    }
    let x = data::conform(x, var, &input.display().to_string()).map_err(|e| Failure::Data(e.to_string()))?;
    Ok((x, None))
}

/// A folder of images as `--input`: decoded (or found in the cache) as the spec's `images`
/// source decodes its folder — its fit and scale, or `crop` and 1/255 —, with the listing.
fn read_folder(
    spec: &Spec,
    input: &Path,
    raw: bool,
) -> Result<(data::Array, data::images::Listing), Failure> {
    let var = spec.compiled.model.inputs.first().ok_or(Failure::Spec)?;
    let bindings = spec.compiled.ast.train.as_ref().map(|t| t.data.as_slice()).unwrap_or(&[]);
    let (fit, scale) = bindings
        .iter()
        .find_map(|b| match b.source {
            DataSource::Images { fit, scale, .. } => Some((fit, scale)),
            _ => None,
        })
        .unwrap_or((aec::syntax::ast::ImageFit::Crop, 1.0 / 255.0));
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let fail = |e: data::DataError| Failure::Data(e.to_string());
    let (stored, listing) =
        data::open_images(input, var, (fit, if raw { 1.0 } else { scale }), threads).map_err(fail)?;
    let n = stored.samples();
    let bytes = (n * stored.sample_len()).checked_mul(4).map(|b| b as u64);
    aec::memory::check("the images of --input", bytes, "give a smaller folder").map_err(Failure::Data)?;
    let values = stored.gather(&(0..n).collect::<Vec<_>>()).map_err(fail)?;
    Ok((data::Array { shape: stored.shape.clone(), values }, listing))
}

/// `aec encode --input FOLDER`: the images' files, labels and label names beside the codes
/// (`Z.labels.json`).
fn write_labels(listing: &data::images::Listing, output: &Path) -> Result<(), Failure> {
    let path = output.with_extension("labels.json");
    let json =
        serde_json::json!({ "files": listing.files, "labels": listing.labels, "classes": listing.classes });
    aec::files::write_atomic(&path, format!("{json}\n").as_bytes())
        .map_err(|e| Failure::Io(format!("cannot write {}: {e}", path.display())))?;
    eprintln!("wrote {} (the sub-folder of each image, as labels)", path.display());
    Ok(())
}

/// Every path a training run writes, checked before it trains: the run folder (made now; with
/// `--resume`, one with a checkpoint) and the folder of `--png`. A problem is exit 2.
fn check_paths(cfg: &TrainConfig, png: Option<&Path>) -> Result<(), Failure> {
    let out = &cfg.out;
    if cfg.resume {
        // A committed save whose renames were cut short has its manifest: `--resume` finishes it.
        let manifest = out.join(aec::runtime::checkpoint::MANIFEST);
        if !out.join("checkpoint.safetensors").is_file() && !manifest.is_file() {
            return Err(Failure::Io(format!(
                "nothing to resume in {}: it has no checkpoint.safetensors",
                out.display()
            )));
        }
    } else if out.exists() && !out.is_dir() {
        return Err(Failure::Io(format!("--out {} is a file; give a folder for the run", out.display())));
    }
    std::fs::create_dir_all(out).map_err(|e| Failure::Io(format!("cannot create {}: {e}", out.display())))?;
    if let Some(png) = png {
        check_file_path("--png", png)?;
    }
    Ok(())
}

/// A file `flag` names can be written: its folder exists and it is not a folder (exit 2).
pub(super) fn check_file_path(flag: &str, path: &Path) -> Result<(), Failure> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    if !dir.is_dir() {
        return Err(Failure::Io(format!(
            "{flag} {}: the folder {} does not exist",
            path.display(),
            dir.display()
        )));
    }
    if path.is_dir() {
        return Err(Failure::Io(format!("{flag} {} is a folder; give a file name", path.display())));
    }
    Ok(())
}

/// Loads every model variable's data, each located at its `data` line on failure.
pub(super) fn dataset(spec: &Spec, seed: u64) -> Result<Dataset, Failure> {
    match aec::runtime::dataset::load(&spec.compiled, &spec.dir(), seed) {
        Ok(loaded) => {
            for note in &loaded.notes {
                eprintln!("{note}");
            }
            Ok(loaded.data)
        }
        Err(d) => {
            report(&[d], &spec.path, &spec.src);
            Err(Failure::Spec)
        }
    }
}

/// `aec compile --emit schedule`: the learning rate and scheduled loss weights of every step
/// of the spec's training (the whole network's; pretraining stages keep the optimizer's rate).
pub(super) fn schedule_table(path: &Path, batch: Option<u64>, steps: Option<u64>) -> Result<String, Failure> {
    let spec = load_spec(path, batch)?;
    let t = spec.compiled.ast.train.clone().unwrap_or_default();
    let steps = match steps {
        Some(s) => s,
        None => {
            let data = dataset(&spec, t.seed.unwrap_or(0))?;
            let train = data.split(t.validation.unwrap_or(0.0), t.seed.unwrap_or(0)).0.len();
            train.div_ceil((spec.compiled.batch as usize).max(1)).max(1) as u64
        }
    };
    let epochs = t.epochs.unwrap_or(10);
    let base = t.optimizer.as_ref().map_or(1e-3, Optimizer::lr);
    let terms: Vec<_> =
        spec.compiled.model.loss.extra.iter().filter_map(|l| Some((l.name(), l.schedule?.0))).collect();
    let schedule = t.schedule.as_ref().map(|(s, _)| s);
    let mut out = format!(
        "# {} from lr {base}, {epochs} epochs of {steps} steps{}\nstep\tepoch\tlr",
        schedule.map_or("no schedule".to_owned(), ToString::to_string),
        if matches!(schedule, Some(aec::syntax::ast::Schedule::Plateau { .. })) {
            " (plateau moves with the validation loss: shown where it starts)"
        } else {
            ""
        }
    );
    for (name, _) in &terms {
        out += &format!("\tweight({name})");
    }
    out.push('\n');
    let plateau = aec::runtime::schedule::PlateauState::new(base);
    for t in 0..epochs * steps {
        let lr = schedule.map_or(base, |s| {
            aec::runtime::schedule::lr(s, base, (t / steps, t, epochs * steps), Some(&plateau))
        });
        out += &format!("{}\t{}\t{lr:e}", t + 1, t / steps + 1);
        for (_, s) in &terms {
            out += &format!("\t{}", s.at(t, steps));
        }
        out.push('\n');
    }
    Ok(out)
}

fn train_cmd(args: &RunArgs) -> Result<(), Failure> {
    #[cfg(feature = "mpi")]
    if super::mpi_processes().is_some() {
        // Started by mpirun: train with the other processes; one that fails ends them all.
        let Some(mpi) = aec::runtime::mpi::Mpi::start().map(std::rc::Rc::new) else {
            return train_with(args, None);
        };
        let lead = aec::runtime::dist::Collective::rank(mpi.as_ref()) == 0;
        let dist = train::Dist(mpi.clone());
        let threads = args.threads.map_or_else(|| (threads(None) / mpi.local_size()).max(1), |t| t as usize);
        return match train_with(&RunArgs { threads: Some(threads as u64), ..args.clone() }, Some(dist)) {
            Ok(()) => Ok(()),
            Err(f) => {
                let code = f.code();
                if lead {
                    f.report();
                }
                mpi.abort(i32::from(code))
            }
        };
    }
    train_with(args, None)
}

/// `run --train`; with `dist`, as one process of a data-parallel run (only process 0 prints
/// and writes).
fn train_with(args: &RunArgs, dist: Option<train::Dist>) -> Result<(), Failure> {
    let lead = dist.as_ref().is_none_or(|train::Dist(d)| d.rank() == 0);
    let spec = load_spec(&args.spec, args.batch)?;
    let (out, resume) = match (&args.resume, &args.out) {
        (Some(r), Some(o)) if r != o => {
            return Err(Failure::Io("--resume continues in its own folder; drop --out".into()));
        }
        (Some(r), _) => (r.clone(), true),
        (None, Some(o)) => (o.clone(), false),
        (None, None) => (PathBuf::from("runs").join(spec.name()), false),
    };
    let overrides = Overrides {
        epochs: args.epochs,
        lr: args.lr,
        seed: args.seed,
        validation: None,
        threads: threads(args.threads),
        backend: args.backend.runtime(),
        out,
        resume,
        init_from: args.init.clone(),
        stop_at: args.stop_at,
        beam: (args.search.beam as usize, args.search.alpha),
        dist,
    };
    let cfg = TrainConfig::of(&spec.compiled, overrides)
        .map_err(|e| Failure::Io(e.replace("the learning rate", "--lr")))?;
    let seed = cfg.seed;
    let t = spec.compiled.ast.train.clone().unwrap_or_default();
    if lead {
        check_paths(&cfg, args.png.as_deref())?;
    }
    let data = dataset(&spec, seed)?;
    let (line, json) = aec::runtime::config::describe(&cfg);
    if lead {
        eprintln!("{line}");
    }
    let cfg = TrainConfig { config_json: Some(json), ..cfg };
    if cfg.batch > data.n && lead {
        eprintln!(
            "note: batch {} is larger than the data ({} samples): each step takes the whole training set",
            cfg.batch, data.n
        );
    }
    if let Some(ty) = (args.png.is_some() || args.png_every.is_some())
        .then(|| &spec.compiled.model.inputs[0].ty)
        .filter(|ty| picture::image_dims(ty).is_none())
    {
        return Err(Failure::Io(not_images(ty)));
    }
    let progress = Progress::new(cfg.schedule.is_some());
    let mut pictures = Vec::new();
    // The epochs so far, for the loss curves `--png-every` draws as it goes.
    let mut seen: Vec<train::EpochMetrics> = Vec::new();
    let mut on = |e: Event| match e {
        _ if !lead => {}
        Event::Params { epoch, params } => {
            if let Some(n) = args.png_every
                && epoch % n == 0
            {
                let path = cfg.out.join(format!("epoch-{epoch:04}.png"));
                pictures.push(training_picture(&spec.compiled, params, &data, &cfg, &path));
                let curves = cfg.out.join("loss.png");
                let drawn = plot::loss_png(&curves, &seen).map(|()| curves.display().to_string());
                pictures.push(drawn.map_err(Failure::Io));
            }
        }
        Event::Epoch(m) => {
            seen.push(m.clone());
            progress.event(Event::Epoch(m));
        }
        e => progress.event(e),
    };
    let summary = match train::train(&spec.compiled, &data, &cfg, &mut on) {
        Ok(s) => s,
        Err(e @ TrainError::NonFinite { .. }) => {
            progress.finish();
            let TrainError::NonFinite { span, .. } = &e else {
                return Err(Failure::Spec);
            };
            let d = Diagnostic::error(e.to_string());
            let d = match span {
                Some(s) => d.label(*s, "this layer produced it"),
                None => d,
            };
            let d = d.help("lower the learning rate (`--lr`), or check the data's scale");
            report(&[d], &spec.path, &spec.src);
            return Err(Failure::Spec);
        }
        Err(TrainError::Located { message, span, label, help }) => {
            progress.finish();
            report(&[Diagnostic::error(message).label(span, label).help(help)], &spec.path, &spec.src);
            return Err(Failure::Spec);
        }
        // I/O problems (a full disk, a read-only folder, a damaged save) exit 2, as documented.
        Err(e @ TrainError::Io(_)) => {
            progress.finish();
            return Err(Failure::Io(e.to_string()));
        }
        Err(e) => {
            progress.finish();
            return Err(Failure::Data(e.to_string()));
        }
    };
    progress.finish();
    if !lead {
        return Ok(());
    }
    // Early stopping: why the run ended, and where the best weights are.
    let early = summary.early.map(|(e, stopped)| {
        let best = format!(
            "best epoch {} (validation loss {:.6}): {}",
            e.best_epoch,
            e.best,
            cfg.out.join("best.safetensors").display()
        );
        match (stopped, cfg.early_stop) {
            (Some(at), Some(rule)) => format!(
                "stopped early after epoch {at}: the validation loss has not improved by more than {} for {} \
                 epochs; {best}",
                rule.min_delta, rule.patience
            ),
            _ => best,
        }
    });
    if summary.nothing_to_do {
        outln!(
            "nothing to train: the run in {} already stands at epoch {} of {}; it is left unchanged",
            cfg.out.display(),
            summary.metrics.last().map_or(0, |m| m.epoch),
            summary.total_epochs
        );
        if let Some(e) = &early {
            outln!("{e}");
        }
        return Ok(());
    }
    let used_threads = cfg.threads;
    let last = summary.metrics.last();
    let mut val =
        last.and_then(|m| m.val_loss).map_or(String::new(), |v| format!(", validation loss {v:.6}"));
    if let Some((t, q)) = last.and_then(|m| m.token_accuracy.zip(m.sequence_accuracy)) {
        val += &format!(
            " (greedy decoding of the validation set: {:.2}% of tokens, {:.2}% of sequences right)",
            t * 100.0,
            q * 100.0
        );
    }
    outln!(
        "trained {} epochs of {} in {:.2}s: train loss {:.6}{val}, {} samples/s ({}, {} thread{})",
        last.map_or(0, |m| m.epoch),
        spec.compiled.model.name,
        summary.seconds,
        last.map_or(f64::NAN, |m| m.train_loss),
        summary.samples_per_s.map_or("—".to_owned(), |r| format!("{r:.0}")),
        match args.backend {
            Backend::Jit => format!("native code compiled in {:.1} ms", summary.jit_seconds * 1e3),
            Backend::Interp => "interpreter".to_owned(),
        },
        used_threads,
        if used_threads == 1 { "" } else { "s" }
    );
    if let Some(e) = &early {
        outln!("{e}");
    }
    if let (Some(train::Dist(d)), Some(t)) = (&cfg.dist, last.and_then(|m| m.allreduce_s)) {
        outln!(
            "{} processes (MPI), {} thread{} each; the sum over the processes took {:.3} ms per step",
            d.size(),
            used_threads,
            if used_threads == 1 { "" } else { "s" },
            t * 1e3
        );
    }
    outln!("checkpoint: {}", cfg.out.join("checkpoint.safetensors").display());
    if summary.stopped_early {
        outln!(
            "stopped after epoch {} of {}; continue with --resume {}",
            last.map_or(0, |m| m.epoch),
            summary.total_epochs,
            cfg.out.display()
        );
        return Ok(());
    }
    for p in pictures {
        outln!("picture: {}", p?);
    }
    let curves = cfg.out.join("loss.png");
    plot::loss_png(&curves, &summary.metrics).map_err(Failure::Io)?;
    outln!("loss curves: {}", curves.display());
    if let Some(png) = &args.png {
        outln!("picture: {}", training_picture(&spec.compiled, &summary.params, &data, &cfg, png)?);
    }
    if let Some((acc, iou, n)) = mask_metrics(&spec.compiled, &summary.params, &data, &cfg)? {
        outln!(
            "segmentation of {n} held-out samples (output ≥ 0.5): pixel accuracy {:.2}%, IoU {:.3}",
            acc * 100.0,
            iou
        );
    }
    if t.data.first().is_some_and(|d| d.source.is_sequence_task()) {
        out!("{}", decoded_examples(&spec.compiled, &summary.params, &data, &cfg)?);
    }
    if let Some(DataSource::OneHot { .. }) = t.data.first().map(|d| &d.source) {
        out!("{}", code_table(&spec.compiled, &summary.params, &data, cfg.threads, cfg.backend)?);
    }
    Ok(())
}

/// For sequence tasks: a few held-out sentences, what greedy decoding wrote, and the target.
fn decoded_examples(
    c: &Compiled,
    params: &[Vec<f32>],
    data: &Dataset,
    cfg: &TrainConfig,
) -> Result<String, Failure> {
    let Some(mut d) = aec::runtime::decode::Decoder::new(c, cfg.backend, cfg.threads) else {
        return Ok(String::new());
    };
    let (_, val) = data.split(cfg.validation, cfg.seed);
    let idx: Vec<usize> = val.into_iter().take(6).collect();
    if idx.is_empty() {
        return Ok(String::new());
    }
    let ints = |k: usize| match data.gather(k, &idx) {
        Ok(Values::I32(v)) => v,
        _ => Vec::new(),
    };
    let inputs: Vec<aec::interp::Buf> =
        (0..data.arrays.len()).map(|k| aec::interp::Buf::I32(ints(k))).collect();
    let got = d.decode(params, &inputs, idx.len()).map_err(Failure::Data)?;
    let target = data.arrays.len() - 1;
    let (src, want) = (ints(0), ints(target));
    let (sl, tl) = (data.arrays[0].sample_len(), d.len);
    // Text: sentences through their vocabularies; otherwise the ids.
    let words = |v: &[i32], column: usize| match &data.vocab {
        Some(t) => {
            let tokens = t.tokenizer().unwrap_or(aec::data::text::Tokens::Word);
            let column = if column == 0 { t.columns.first() } else { t.target() };
            column.map_or(String::new(), |c| tokens.join(&c.decode(v)))
        }
        None => v.iter().map(i32::to_string).collect::<Vec<_>>().join(" "),
    };
    let mut s = String::from("held-out examples (input → greedy decoding | target):\n");
    for i in 0..idx.len() {
        let (g, w) = (&got[i * tl..(i + 1) * tl], &want[i * tl..(i + 1) * tl]);
        let mark = if words(g, 1) == words(w, 1) { "✓" } else { "✗" };
        s.push_str(&format!(
            "  {} → {} | {} {mark}\n",
            words(&src[i * sl..(i + 1) * sl], 0),
            words(g, 1),
            words(w, 1)
        ));
    }
    Ok(s)
}

/// For one-hot data: each input's code, its bits, and whether the output's argmax is right.
fn code_table(
    c: &Compiled,
    params: &[Vec<f32>],
    data: &Dataset,
    threads: usize,
    backend: aec::runtime::Backend,
) -> Result<String, Failure> {
    let data::Column::Memory(x) = &data.arrays[0] else { return Ok(String::new()) };
    let codes =
        infer::infer(c, params, x, Output::Code, x.samples(), threads, backend).map_err(Failure::Data)?;
    let recon =
        infer::infer(c, params, x, Output::Recon, x.samples(), threads, backend).map_err(Failure::Data)?;
    let (Values::F32(code), Values::F32(out), Values::F32(inp)) = (&codes.values, &recon.values, &x.values)
    else {
        return Ok(String::new());
    };
    let (k, n) = (codes.sample_len(), x.sample_len());
    let mut s = String::from("input  code");
    s.push_str(&" ".repeat((k * 6).saturating_sub(4)));
    s.push_str("  bits  output\n");
    let mut correct = 0;
    for i in 0..x.samples() {
        let c = &code[i * k..(i + 1) * k];
        let want = argmax(&inp[i * n..(i + 1) * n]);
        let got = argmax(&out[i * n..(i + 1) * n]);
        correct += usize::from(want == got);
        let vals: Vec<String> = c.iter().map(|v| format!("{v:5.2}")).collect();
        let bits: String = c.iter().map(|&v| if v > 0.5 { '1' } else { '0' }).collect();
        s.push_str(&format!(
            "{want:>5}  {}  {bits:>4}  {got} {}\n",
            vals.join(" "),
            if want == got { "✓" } else { "✗" }
        ));
    }
    s.push_str(&format!("{correct}/{} inputs reconstructed (argmax)\n", x.samples()));
    Ok(s)
}

fn argmax(v: &[f32]) -> usize {
    v.iter().enumerate().fold(0, |best, (i, &x)| if x > v[best] { i } else { best })
}

/// The progress display: a bar on a terminal, a line per tenth of the run otherwise.
struct Progress {
    bar: Option<ProgressBar>,
    every: std::cell::Cell<u64>,
    steps: std::cell::Cell<u64>,
    /// Show each epoch's learning rate (the run has a schedule).
    schedule: bool,
}

impl Progress {
    fn new(schedule: bool) -> Progress {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::new(0);
            let style = ProgressStyle::with_template(
                "{spinner} {prefix} epoch {pos}/{len} [{bar:30}] {msg} ETA {eta}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
            bar.set_style(style);
            bar
        });
        Progress { bar, every: std::cell::Cell::new(1), steps: std::cell::Cell::new(1), schedule }
    }

    fn event(&self, e: Event) {
        match e {
            Event::Start { first_epoch, epochs, steps_per_epoch, train, validation } => {
                self.every.set((epochs / 10).max(1));
                self.steps.set(steps_per_epoch);
                if let Some(bar) = &self.bar {
                    bar.set_length(epochs);
                    bar.set_position(first_epoch);
                }
                let resumed = if first_epoch > 0 {
                    format!(", resuming after epoch {first_epoch}")
                } else {
                    String::new()
                };
                eprintln!(
                    "training on {train} samples ({validation} for validation), {steps_per_epoch} steps per epoch{resumed}"
                );
            }
            Event::Phase { label, first_epoch, last_epoch } => {
                let line = format!("{label}: epochs {first_epoch}–{last_epoch}");
                match &self.bar {
                    Some(bar) => bar.set_prefix(label.to_owned()),
                    None => eprintln!("{line}"),
                }
            }
            Event::Compiled { graph, kernels, seconds } => {
                let line = format!("native code for {graph}: {kernels} kernels in {:.1} ms", seconds * 1e3);
                match &self.bar {
                    Some(bar) => bar.println(line),
                    None => eprintln!("{line}"),
                }
            }
            Event::Step { epoch, step_in_epoch, loss } => {
                if let Some(bar) = &self.bar
                    && (step_in_epoch % 16 == 0 || step_in_epoch == self.steps.get())
                {
                    bar.set_message(format!("step {step_in_epoch}/{} loss {loss:.5}", self.steps.get()));
                    let _ = epoch;
                }
            }
            Event::Params { .. } => {}
            Event::Epoch(m) => {
                let mut val = m.val_loss.map_or(String::new(), |v| format!(" val {v:.5}"));
                if let (Some(t), Some(q)) = (m.token_accuracy, m.sequence_accuracy) {
                    val += &format!(" tokens {:.1}% sequences {:.1}%", t * 100.0, q * 100.0);
                }
                if let Some(b) = m.bleu {
                    val += &format!(" BLEU {b:.2}");
                }
                if let (Some(p), Some(u)) = (m.codebook_perplexity, m.codebook_usage) {
                    val += &format!(" · codebook perplexity {p:.1}, {:.0}% used", u * 100.0);
                }
                let rate = m.samples_per_s.map_or(String::new(), |r| format!(" · {r:.0} samples/s"));
                let terms = if m.terms.len() > 1 {
                    let t: Vec<String> = m.terms.iter().map(|(n, v)| format!("{n} {v:.5}")).collect();
                    format!(" ({})", t.join(" + "))
                } else {
                    String::new()
                };
                // A schedule's learning rate and loss weights, as they stood at the epoch's end.
                let mut moved: Vec<String> =
                    m.weights.iter().map(|(n, w)| format!("weight({n}) {w:.3}")).collect();
                if self.schedule {
                    moved.insert(0, format!("lr {:.3e}", m.lr.unwrap_or(f64::NAN)));
                }
                let moved = if moved.is_empty() { String::new() } else { format!(" · {}", moved.join(" ")) };
                let line = format!("loss {:.5}{terms}{val}{moved}{rate}", m.train_loss);
                match &self.bar {
                    Some(bar) => {
                        bar.set_position(m.epoch);
                        bar.set_message(line);
                    }
                    None if m.epoch % self.every.get() == 0 => {
                        eprintln!("epoch {:>5}  {line}", m.epoch)
                    }
                    None => {}
                }
            }
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
