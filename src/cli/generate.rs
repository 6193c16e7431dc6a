//! `aec sample` and `aec interpolate`: what the decoder makes of codes — codes drawn from the
//! prior N(0, I) of a Gaussian code, or the straight line between the codes of given inputs.
//! Both run the decoder alone (`Mode::Generate`), natively unless `--backend interp`.

use super::Failure;
use super::picture;
use super::run::{self, Backend, Spec};
use aec::data::{self, Array, Values};
use aec::runtime::infer::{self, Output};
use aec::sema::Ty;
use aec::syntax::ast::LayerKind;
use std::path::{Path, PathBuf};

#[derive(clap::Args)]
pub struct SampleArgs {
    /// The `.ae` spec (its encoder ends in `gaussian N`).
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
    #[arg(long)]
    grid: bool,
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
    let gaussian = spec.compiled.model.encoder().any(|l| matches!(l.layer.kind, LayerKind::Gaussian { .. }));
    if !gaussian {
        return Err(Failure::Data(format!(
            "{}: `aec sample` decodes codes drawn from N(0, I), the prior of a Gaussian code, and this \
             encoder does not end in `gaussian N`; a plain autoencoder's codes follow no known law \
             (`aec interpolate` works for it)",
            spec.path.display()
        )));
    }
    let dims = code_dims(&spec)?;
    let size: usize = dims.iter().product();
    let count = args.count as usize;
    let (codes, n, cols) = if args.grid {
        if size != 2 {
            return Err(Failure::Data(format!(
                "--grid draws the plane of a 2-D code; this code has {size} dimensions"
            )));
        }
        // Row r from the top holds the largest second coordinate, as a plot's y axis.
        let q: Vec<f32> =
            (0..count).map(|i| normal_quantile((i as f64 + 0.5) / count as f64) as f32).collect();
        let codes =
            (0..count).flat_map(|r| (0..count).flat_map(|c| [q[c], q[count - 1 - r]]).collect::<Vec<_>>());
        (codes.collect::<Vec<f32>>(), count * count, count)
    } else {
        let codes = (0..count * size).map(|i| aec::interp::normal(args.seed, 0, u32::MAX, i)).collect();
        (codes, count, (count as f64).sqrt().ceil() as usize)
    };
    let codes = Array { shape: [vec![n], dims].concat(), values: Values::F32(codes) };
    let params = run::load_weights(&spec, &args.weights)?;
    let threads = run::threads(args.threads);
    let y = decode(&spec, &params, &codes, threads, args.backend)?;
    finish(&spec, &y, cols, args.output.as_deref(), args.png.as_deref())
}

pub fn interpolate(args: &InterpolateArgs) -> Result<(), Failure> {
    check_outputs(args.output.as_deref(), args.png.as_deref())?;
    let spec = run::load_spec(&args.spec, None)?;
    let dims = code_dims(&spec)?;
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
    let codes = infer::infer(&spec.compiled, &params, &x, Output::Code, 256, threads, args.backend.runtime())
        .map_err(Failure::Data)?;
    let Values::F32(z) = &codes.values else {
        return Err(Failure::Data("the codes are not real numbers".into()));
    };
    let size: usize = dims.iter().product();
    let steps = args.steps as usize;
    let mut line = Vec::with_capacity((x.samples() - 1) * steps * size);
    for pair in z.chunks(size).collect::<Vec<_>>().windows(2) {
        for t in 0..steps {
            let a = t as f32 / (steps - 1) as f32;
            line.extend(pair[0].iter().zip(pair[1]).map(|(&p, &q)| (1.0 - a) * p + a * q));
        }
    }
    let n = line.len() / size;
    let codes = Array { shape: [vec![n], dims].concat(), values: Values::F32(line) };
    let y = decode(&spec, &params, &codes, threads, args.backend)?;
    finish(&spec, &y, steps, args.output.as_deref(), args.png.as_deref())
}

/// The decoder's outputs for `codes`.
fn decode(
    spec: &Spec,
    params: &[Vec<f32>],
    codes: &Array,
    threads: usize,
    backend: Backend,
) -> Result<Array, Failure> {
    infer::infer(&spec.compiled, params, codes, Output::Generated, 256, threads, backend.runtime())
        .map_err(|e| Failure::Data(format!("{}: {e}", spec.path.display())))
}

/// The code's shape (a tensor: the decoder starts from it).
fn code_dims(spec: &Spec) -> Result<Vec<usize>, Failure> {
    match &spec.compiled.model.code {
        Ty::Tensor(d) => Ok(d.iter().map(|&x| x as usize).collect()),
        other => Err(Failure::Data(format!(
            "{}: the code is {other}, not a tensor: there is nothing to decode from",
            spec.path.display()
        ))),
    }
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

/// Φ⁻¹(p), the quantile of N(0, 1) (Acklam's rational approximation, relative error < 1.2e-9),
/// for p in (0, 1).
fn normal_quantile(p: f64) -> f64 {
    const A: [f64; 6] = [
        -3.969_683_028_665_376e1,
        2.209_460_984_245_205e2,
        -2.759_285_104_469_687e2,
        1.383_577_518_672_69e2,
        -3.066_479_806_614_716e1,
        2.506_628_277_459_239,
    ];
    const B: [f64; 5] = [
        -5.447_609_879_822_406e1,
        1.615_858_368_580_409e2,
        -1.556_989_798_598_866e2,
        6.680_131_188_771_972e1,
        -1.328_068_155_288_572e1,
    ];
    const C: [f64; 6] = [
        -7.784_894_002_430_293e-3,
        -3.223_964_580_411_365e-1,
        -2.400_758_277_161_838,
        -2.549_732_539_343_734,
        4.374_664_141_464_968,
        2.938_163_982_698_783,
    ];
    const D: [f64; 4] =
        [7.784_695_709_041_462e-3, 3.224_671_290_700_398e-1, 2.445_134_137_142_996, 3.754_408_661_907_416];
    let tail = |q: f64| {
        (((((C[0] * q + C[1]) * q + C[2]) * q + C[3]) * q + C[4]) * q + C[5])
            / ((((D[0] * q + D[1]) * q + D[2]) * q + D[3]) * q + 1.0)
    };
    if p < 0.02425 {
        tail((-2.0 * p.ln()).sqrt())
    } else if p > 1.0 - 0.02425 {
        -tail((-2.0 * (1.0 - p).ln()).sqrt())
    } else {
        let q = p - 0.5;
        let r = q * q;
        (((((A[0] * r + A[1]) * r + A[2]) * r + A[3]) * r + A[4]) * r + A[5]) * q
            / (((((B[0] * r + B[1]) * r + B[2]) * r + B[3]) * r + B[4]) * r + 1.0)
    }
}

#[cfg(test)]
mod tests {
    use super::normal_quantile;

    #[test]
    fn quantiles_of_the_standard_normal() {
        // Φ⁻¹ at known points (to the printed digits of the tables).
        for (p, z) in
            [(0.5, 0.0), (0.975, 1.959_963_984_540_054), (0.01, -2.326_347_874_040_841), (0.841_344_746, 1.0)]
        {
            assert!((normal_quantile(p) - z).abs() < 1e-7, "Φ⁻¹({p}) = {} not {z}", normal_quantile(p));
        }
    }
}
