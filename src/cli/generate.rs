//! `aec sample` and `aec interpolate`: what the decoder makes of codes — codes drawn from the
//! prior N(0, I) of a Gaussian code, or the straight line between the codes of given inputs.
//! Both run the decoder alone (`Mode::Generate`), natively unless `--backend interp`.

use super::Failure;
use super::picture;
use super::run::{self, Backend, Spec};
use aec::data::{self, Array, Values};
use aec::runtime::generate;
use aec::runtime::infer::{self, Output};
use std::path::{Path, PathBuf};

#[derive(clap::Args)]
pub struct SampleArgs {
    /// The `.ae` spec (its encoder ends in `gaussian N`, unless --gmm).
    spec: PathBuf,
    /// Trained parameters (a checkpoint.safetensors).
    #[arg(long)]
    weights: PathBuf,
    /// Codes to draw and decode; with --grid, the grid's side (count × count codes).
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..=4096))]
    count: u64,
    /// Seed of the draws (the same seed, the same codes).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// A 2-D code only: decode a grid over the code plane instead of random draws, at the
    /// quantiles (i + ½) / count of N(0, 1) on each axis — the decoded manifold.
    #[arg(long, conflicts_with = "gmm")]
    grid: bool,
    /// Any autoencoder: fit a mixture of K Gaussians (full covariances, by EM) to the codes of
    /// the spec's training data and decode draws from it (Ghosh et al. 2020), instead of the
    /// prior of a Gaussian code.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=1024))]
    gmm: Option<u64>,
    /// A model conditioned on a class (`condition y: token[N]`): the class to generate, several
    /// (`0,3,7`) or `all` — the same codes decoded under each class, one row per class.
    #[arg(long)]
    condition: Option<String>,
    /// Where to write the decoded samples (.npy, f32).
    #[arg(long)]
    output: Option<PathBuf>,
    /// Where to draw them (a PNG of tiles).
    #[arg(long)]
    png: Option<PathBuf>,
    /// The executor: native code (`jit`) or the reference interpreter (`interp`).
    #[arg(long, value_enum, default_value_t = Backend::Jit)]
    backend: Backend,
    /// Worker threads (default: all cores).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=256))]
    threads: Option<u64>,
}

#[derive(clap::Args)]
pub struct InterpolateArgs {
    /// The `.ae` spec.
    spec: PathBuf,
    /// Trained parameters (a checkpoint.safetensors).
    #[arg(long)]
    weights: PathBuf,
    /// Two or more samples (.npy): each consecutive pair is one line of the interpolation.
    #[arg(long)]
    input: PathBuf,
    /// Decoded points per line, its two ends included.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(2..=256))]
    steps: u64,
    /// Where to write the decoded points (.npy, f32; lines one after another).
    #[arg(long)]
    output: Option<PathBuf>,
    /// Where to draw them (a PNG: one row per line).
    #[arg(long)]
    png: Option<PathBuf>,
    /// Feed --input as it is, without the `scale` of the spec's data.
    #[arg(long)]
    raw_input: bool,
    /// The executor: native code (`jit`) or the reference interpreter (`interp`).
    #[arg(long, value_enum, default_value_t = Backend::Jit)]
    backend: Backend,
    /// Worker threads (default: all cores).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=256))]
    threads: Option<u64>,
}

pub fn sample(args: &SampleArgs) -> Result<(), Failure> {
    check_outputs(args.output.as_deref(), args.png.as_deref())?;
    let spec = run::load_spec(&args.spec, None)?;
    let located = |e: String| Failure::Data(format!("{}: {e}", spec.path.display()));
    let dims = generate::code_dims(&spec.compiled).map_err(located)?;
    let size: usize = dims.iter().product();
    let count = args.count as usize;
    let (codes, n, cols) = if let Some(k) = args.gmm {
        (mixture_codes(&spec, args, k as usize)?, count, (count as f64).sqrt().ceil() as usize)
    } else if args.grid {
        generate::has_prior(&spec.compiled).map_err(located)?;
        if size != 2 {
            return Err(Failure::Data(format!(
                "--grid draws the plane of a 2-D code; this code has {size} dimensions"
            )));
        }
        (generate::grid_codes(count), count * count, count)
    } else {
        let codes = generate::prior_codes(&spec.compiled, count, args.seed).map_err(located)?;
        (codes, count, (count as f64).sqrt().ceil() as usize)
    };
    // Under each class asked for, the same codes: one row per class.
    let classes = classes(&spec, args.condition.as_deref())?;
    let (codes, conditions, n, cols) = match &classes {
        None => (codes, Vec::new(), n, cols),
        Some(list) => {
            let all: Vec<f32> = list.iter().flat_map(|_| codes.iter().copied()).collect();
            let ids: Vec<i32> = list.iter().flat_map(|&c| std::iter::repeat_n(c, n)).collect();
            let cols = if list.len() > 1 { n } else { cols };
            (all, vec![Array { shape: vec![ids.len()], values: Values::I32(ids) }], n * list.len(), cols)
        }
    };
    let codes = Array { shape: [vec![n], dims].concat(), values: Values::F32(codes) };
    let params = run::load_weights(&spec, &args.weights)?;
    let threads = run::threads(args.threads);
    let y = decode(&spec, &params, (&codes, &conditions), threads, args.backend)?;
    finish(&spec, &y, cols, args.output.as_deref(), args.png.as_deref())
}

/// `--condition`'s classes (`3`, `0,3,7` or `all`) for a model conditioned on one class;
/// `None` for a model without conditions.
fn classes(spec: &Spec, given: Option<&str>) -> Result<Option<Vec<i32>>, Failure> {
    let vars = &spec.compiled.model.conditions;
    let path = spec.path.display();
    let vocab = match (vars.as_slice(), given) {
        ([], None) => return Ok(None),
        ([], Some(_)) => {
            return Err(Failure::Io(format!(
                "--condition picks a conditioned model's class, and {path} has no condition"
            )));
        }
        ([v], _) if !matches!(v.ty, aec::sema::Ty::Token { .. }) => {
            return Err(Failure::Io(format!(
                "{path} is conditioned on `{}` ({}), and `aec sample` draws for a class (`token[N]`); \
                 decode codes with a vector condition from Python (`m.decode(z, condition=c)`)",
                v.name, v.ty
            )));
        }
        ([v], None) => {
            return Err(Failure::Io(format!(
                "{path} is conditioned on `{}` ({}): give the class to generate, e.g. --condition 3 (or 0,3,7, or all)",
                v.name, v.ty
            )));
        }
        ([v], Some(_)) => match v.ty {
            aec::sema::Ty::Token { vocab } => vocab,
            _ => 0,
        },
        _ => {
            return Err(Failure::Io(format!(
                "{path} has {} conditions; `aec sample` draws for a model conditioned on one class",
                vars.len()
            )));
        }
    };
    let text = given.unwrap_or_default().trim();
    if text == "all" {
        return Ok(Some((0..vocab as i32).collect()));
    }
    text.split(',')
        .map(|c| {
            c.trim().parse::<i32>().ok().filter(|&k| k >= 0 && (k as u64) < vocab).ok_or_else(|| {
                Failure::Io(format!(
                    "--condition {text}: `{}` is not a class of {}: classes are 0 to {}",
                    c.trim(),
                    spec.compiled.model.conditions[0].ty,
                    vocab - 1
                ))
            })
        })
        .collect::<Result<Vec<i32>, Failure>>()
        .map(Some)
}

/// `--gmm K`: a mixture fitted to the training codes, and `--count` draws from it.
fn mixture_codes(spec: &Spec, args: &SampleArgs, k: usize) -> Result<Vec<f32>, Failure> {
    let split = generate::spec_split(&spec.compiled);
    let data = run::dataset(spec, split.1)?;
    let params = run::load_weights(spec, &args.weights)?;
    let how = (run::threads(args.threads), args.backend.runtime());
    let (z, size) =
        generate::training_codes(&spec.compiled, &params, &data, split, how).map_err(Failure::Data)?;
    let fit = aec::runtime::gmm::fit(&z, size, k, args.seed)
        .map_err(|e| Failure::Data(format!("--gmm {k}: {e}")))?;
    eprintln!(
        "fitted {k} Gaussian{} (full covariances) to {} training codes of {size} values: mean log-likelihood \
         {:.3} after {} EM iterations{}",
        if k == 1 { "" } else { "s" },
        z.len() / size.max(1),
        fit.history.last().copied().unwrap_or(f64::NAN),
        fit.history.len(),
        if fit.converged { "" } else { " (not converged)" }
    );
    Ok(fit.gmm.sample(args.count as usize, args.seed))
}

pub fn interpolate(args: &InterpolateArgs) -> Result<(), Failure> {
    check_outputs(args.output.as_deref(), args.png.as_deref())?;
    let spec = run::load_spec(&args.spec, None)?;
    let dims = generate::code_dims(&spec.compiled)
        .map_err(|e| Failure::Data(format!("{}: {e}", spec.path.display())))?;
    let params = run::load_weights(&spec, &args.weights)?;
    let x = run::read_input(&spec, &args.input, args.raw_input)?;
    if x.samples() < 2 {
        return Err(Failure::Data(format!(
            "--input {} holds {} sample; interpolation needs two or more",
            args.input.display(),
            x.samples()
        )));
    }
    let threads = run::threads(args.threads);
    let (z, size) = generate::codes_of(&spec.compiled, &params, &x, (threads, args.backend.runtime()))
        .map_err(Failure::Data)?;
    let steps = args.steps as usize;
    let line = generate::lines(&z, size, steps);
    let n = line.len() / size;
    let codes = Array { shape: [vec![n], dims].concat(), values: Values::F32(line) };
    let y = decode(&spec, &params, (&codes, &[]), threads, args.backend)?;
    finish(&spec, &y, steps, args.output.as_deref(), args.png.as_deref())
}

/// The decoder's outputs for `codes` (under `conditions`, a conditioned model's).
fn decode(
    spec: &Spec,
    params: &[Vec<f32>],
    codes: (&Array, &[Array]),
    threads: usize,
    backend: Backend,
) -> Result<Array, Failure> {
    infer::infer_with(&spec.compiled, params, codes, Output::Generated, 256, threads, backend.runtime())
        .map_err(|e| Failure::Data(format!("{}: {e}", spec.path.display())))
}

/// `--output` or `--png` is given, and each can be written where it points.
fn check_outputs(output: Option<&Path>, png: Option<&Path>) -> Result<(), Failure> {
    if output.is_none() && png.is_none() {
        return Err(Failure::Io("give --output FILE.npy, --png FILE.png or both".into()));
    }
    for (flag, path) in [("--output", output), ("--png", png)] {
        if let Some(path) = path {
            run::check_file_path(flag, path)?;
        }
    }
    Ok(())
}

/// Writes the decoded samples: `.npy`, and a PNG of tiles, `cols` to a row.
fn finish(
    spec: &Spec,
    y: &Array,
    cols: usize,
    output: Option<&Path>,
    png: Option<&Path>,
) -> Result<(), Failure> {
    if let Some(path) = output {
        data::write_npy(path, y).map_err(|e| Failure::Io(e.to_string()))?;
        eprintln!("wrote {} ({:?}, f32)", path.display(), y.shape);
    }
    if let Some(path) = png {
        let Some(dims) = picture::image_dims(&spec.compiled.model.output) else {
            return Err(Failure::Data(format!(
                "the output {} cannot be drawn (images [C, H, W], planes [H, W] or square vectors can)",
                spec.compiled.model.output
            )));
        };
        let message = picture::write_tiles(path, y, dims, cols).map_err(Failure::Io)?;
        eprintln!("drew {message}");
    }
    Ok(())
}
