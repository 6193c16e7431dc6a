//! `aec bench`: how fast a spec trains and runs natively, on synthetic inputs.

use super::{Failure, read_spec, report};
use aec::codegen::{Options, Program};
use aec::interp::Buf;
use aec::ir::{DType, Graph};
use aec::runtime::{State, init};
use aec::sema::{Lowering, Mode, lower};
use std::path::PathBuf;
use std::time::Instant;

#[derive(clap::Args)]
pub struct BenchArgs {
    spec: PathBuf,
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=1 << 24))]
    batch: Option<u64>,
    /// Threads large kernels split across (default: all cores).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=256))]
    threads: Option<u64>,
    /// Training steps per measurement round (5 rounds; the median is reported). Default: as
    /// many as take about 0.3 s.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    steps: Option<u64>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
    /// After the measurement, time every kernel of the training step and list where the time
    /// goes (the kernels that take the most first).
    #[arg(long)]
    profile: bool,
    /// Compute the convolutions of pool switch maps densely (im2col and matmul), as the graph
    /// is written: for comparing with the per-switch kernels, which are the default.
    #[arg(long)]
    dense: bool,
}

fn inputs(g: &Graph) -> Vec<Buf> {
    g.inputs
        .iter()
        .map(|i| match i.ty.dtype {
            DType::F32 => Buf::F32((0..i.ty.numel()).map(|k| (k % 97) as f32 / 97.0).collect()),
            DType::I32 => Buf::I32(vec![0; i.ty.numel()]),
        })
        .collect()
}

/// How long a measurement round takes when `--steps` does not fix it: about as long as
/// `benches/torch_compare.py` times each round of PyTorch and JAX.
const ROUND: f64 = 0.3;

/// Median samples/s over 5 rounds of `steps` runs of `p` (by default as many as take about
/// [`ROUND`] seconds, from the warm-up's pace, and at least 10), and the steps per round.
fn measure(p: &mut Program, batch: u64, steps: Option<u64>) -> Result<(f64, u64), Failure> {
    let x = inputs(p.graph());
    let warm = Instant::now();
    for s in 0..3 {
        p.run(&x, 1, s + 1).map_err(|l| Failure::Data(format!("the benchmark diverged (loss {l})")))?;
    }
    let pace = warm.elapsed().as_secs_f64() / 3.0;
    let steps = steps.unwrap_or_else(|| (ROUND / pace.max(1e-7)).clamp(10.0, 1e6) as u64);
    let mut rates = Vec::new();
    for round in 0..5 {
        let t = Instant::now();
        for s in 0..steps {
            p.run(&x, 1, 4 + round * steps + s)
                .map_err(|l| Failure::Data(format!("the benchmark diverged (loss {l})")))?;
        }
        rates.push((steps * batch) as f64 / t.elapsed().as_secs_f64());
    }
    rates.sort_by(f64::total_cmp);
    Ok((rates[2], steps))
}

pub fn bench(args: &BenchArgs) -> Result<(), Failure> {
    let src = read_spec(&args.spec)?;
    let c = match aec::compile(&src, &aec::Config { batch: args.batch }) {
        Ok(c) => c,
        Err(d) => {
            report(&d, &args.spec, &src);
            return Err(Failure::Spec);
        }
    };
    let step =
        aec::training_step(&c).map_err(|e| Failure::Data(format!("cannot train this spec natively: {e}")))?;
    let threads = args
        .threads
        .map_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()), |t| t as usize);
    let opts = Options { dense: args.dense, ..Options::default() };
    let mut train = Program::compile(&step, opts).map_err(Failure::Data)?;
    train.set_threads(threads);
    let state = State::new(init::init_params(&c.forward, aec::syntax::ast::Init::Default, 1));
    train.set_state(&state).map_err(Failure::Data)?;
    let fwd = lower::lower(
        &c.model,
        &Lowering { batch: c.batch, mode: Mode::Infer, denoise: false, shard_of: None },
    )
    .map_err(Failure::Data)?;
    let fwd = aec::passes::dce::keep_outputs(&fwd, &["recon"]).map_err(Failure::Data)?;
    let mut infer = Program::compile(&fwd, opts).map_err(Failure::Data)?;
    infer.set_threads(threads);
    infer.set_state(&state).map_err(Failure::Data)?;

    let flops_fwd: u64 = c.model.layers.iter().map(|l| l.flops).sum();
    // A training step: the forward pass and about twice its work backward.
    let flops_train = 3.0 * flops_fwd as f64;
    // What the native code executes (fewer where convolutions of switch maps skip zeros).
    let executed = 2.0 * train.multiply_adds() as f64 / c.batch as f64;
    let (train_rate, steps) = measure(&mut train, c.batch, args.steps)?;
    let (infer_rate, _) = measure(&mut infer, c.batch, args.steps)?;
    let gflops = flops_train * train_rate / 1e9;
    let executed_gflops = executed * train_rate / 1e9;
    // The share of peak is of the widest FMA the program's kernels run: the wide core's if any
    // matmul uses it, else Cranelift's 128 bits; the peak is measured now, on this machine.
    let peaks = aec::codegen::wide::fma_peaks();
    let width =
        if train.wide_isa().is_some() { peaks.first() } else { peaks.iter().find(|p| p.0 == "128-bit") };
    let (width, per_core) = width.copied().unwrap_or(("unmeasured", f64::NAN));
    let peak = 100.0 * executed_gflops / (per_core * threads as f64);
    let matmuls = match train.wide_isa() {
        Some(isa) => {
            format!("the wide core ({isa}) for large matmuls, Cranelift's 128-bit kernel for the rest")
        }
        None => "Cranelift's 128-bit kernel".to_owned(),
    };
    let compile_ms = (train.compile_time() + infer.compile_time()).as_secs_f64() * 1e3;
    let name = &c.model.name;
    if args.json {
        // Figures rounded as the text shows them; one that could not be measured (no FMA peak
        // on this machine) is null, never a bare NaN.
        let num = |x: f64, places: i32| {
            let scale = 10f64.powi(places);
            serde_json::Number::from_f64((x * scale).round() / scale)
                .map_or(serde_json::Value::Null, Into::into)
        };
        let report = serde_json::json!({
            "spec": name,
            "batch": c.batch,
            "threads": threads,
            "jit_compile_ms": num(compile_ms, 3),
            "train_samples_per_s": num(train_rate, 1),
            "infer_samples_per_s": num(infer_rate, 1),
            "train_gflops": num(gflops, 3),
            "executed_gflops": num(executed_gflops, 3),
            "peak_percent": num(peak, 2),
            "peak_width": width,
            "peak_gflops_per_core": num(per_core, 1),
            "wide_core": train.wide_isa(),
        });
        outln!("{report}");
    } else {
        let s = if threads == 1 { "" } else { "s" };
        outln!("{name} (batch {}, {threads} thread{s}, median of 5 rounds of {steps} steps)", c.batch);
        outln!(
            "  native compile  {compile_ms:.1} ms ({} + {} kernels)",
            train.kernel_count(),
            infer.kernel_count()
        );
        outln!("  training        {train_rate:.0} samples/s");
        outln!("  inference       {infer_rate:.0} samples/s");
        outln!("  training        {gflops:.2} GFLOP/s as the layers count their FLOPs");
        outln!(
            "                  {executed_gflops:.2} GFLOP/s executed, {peak:.1}% of the {width} FMA peak ({per_core:.1} GFLOP/s per core, measured now)"
        );
        outln!("  matmuls         {matmuls}");
    }
    if args.profile {
        train.start_profile();
        let x = inputs(train.graph());
        for s in 0..steps {
            train
                .run(&x, 1, 1000 + s)
                .map_err(|l| Failure::Data(format!("the benchmark diverged (loss {l})")))?;
        }
        print_profile(&train.profile(), steps);
    }
    Ok(())
}

/// The kernels of a step by the time they took, most first, with their share of the step.
fn print_profile(times: &[(&str, &str, std::time::Duration)], steps: u64) {
    let total: f64 = times.iter().map(|t| t.2.as_secs_f64()).sum();
    let mut by_time: Vec<_> = times.iter().enumerate().collect();
    by_time.sort_by_key(|t| std::cmp::Reverse(t.1.2));
    outln!(
        "\ntraining step, per kernel ({steps} steps; {:.3} ms per step in kernels):",
        1e3 * total / steps as f64
    );
    let mut cumulative = 0.0;
    for (i, (name, width, t)) in by_time {
        let share = 100.0 * t.as_secs_f64() / total.max(f64::MIN_POSITIVE);
        cumulative += share;
        outln!(
            "  {:>6.1}%  {:>6.1}%  {:>9.1} µs  {width:>7}  #{i:<3} {name}",
            share,
            cumulative,
            1e6 * t.as_secs_f64() / steps as f64
        );
        if cumulative > 99.5 {
            break;
        }
    }
}
