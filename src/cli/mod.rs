//! Command-line interface: parses arguments (clap), reads files, renders diagnostics and
//! progress, and maps outcomes to exit codes. It is the only layer that prints.
//!
//! Exit codes: 0 success; 1 the spec (or the data it names) is wrong; 2 usage or I/O errors.

/// `print!` that never panics: output to a closed pipe (`aec … | head`) is dropped.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = write!(std::io::stdout().lock(), $($arg)*);
    }};
}

/// `println!` that never panics.
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout().lock(), $($arg)*);
    }};
}

mod bench;
mod export;
mod generate;
mod picture;
mod plot;
mod run;
mod translate;

use aec::diag::{self, Diagnostic};
use clap::{Parser, Subcommand, ValueEnum};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "aec", version, about = "A compiler for autoencoders", long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// The memory aec may use (e.g. 4G, 512M; default: this machine's memory less a margin).
    /// Every allocation that grows with the spec, batch or data is checked against it first.
    #[arg(long, global = true, value_parser = aec::memory::parse_size)]
    memory_limit: Option<u64>,
}

#[derive(Subcommand)]
enum Command {
    /// Check a spec and show what it compiles to.
    Compile(CompileArgs),
    /// Train a spec (`--train`), or run a trained network on inputs.
    Run(run::RunArgs),
    /// Run the encoder of a trained network: the codes of the inputs.
    Encode(run::EncodeArgs),
    /// Check a spec's gradients: autodiff against finite differences, native code against the
    /// interpreter, one line per parameter.
    Check(run::CheckArgs),
    /// Measure native compile time, training and inference speed.
    Bench(bench::BenchArgs),
    /// Decode codes drawn from N(0, I) (a trained VAE's prior): new samples, or with --grid the
    /// decoded plane of a 2-D code.
    Sample(generate::SampleArgs),
    /// Encode two or more inputs and decode the straight lines between their codes.
    Interpolate(generate::InterpolateArgs),
    /// Write a trained network, its encoder or its decoder as an ONNX model.
    Export(export::ExportArgs),
    /// Translate sentences with a trained text model (`seq[<= N]` input and target) and the
    /// vocabularies saved with its run.
    Translate(translate::TranslateArgs),
}

#[derive(clap::Args)]
struct CompileArgs {
    /// The `.ae` spec.
    spec: PathBuf,
    /// Print an intermediate form instead of the layer table.
    #[arg(long, value_enum)]
    emit: Option<Emit>,
    /// Batch size of the lowered graph (default: the spec's `batch`, else 1).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=1 << 24))]
    batch: Option<u64>,
    /// With `--emit ir` or `grad`: the graph of greedy pretraining's stage K (1 = first layer).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=1 << 20))]
    stage: Option<u64>,
    /// With `--emit schedule`: steps per epoch (default: from the spec's data and batch).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=1 << 30))]
    steps_per_epoch: Option<u64>,
}

#[derive(Clone, Copy, ValueEnum)]
enum Emit {
    /// The AST printed back as `.ae` text, with a mirrored decoder written out.
    Ast,
    /// The forward graph IR.
    Ir,
    /// Parameter names (PyTorch's) and shapes.
    Params,
    /// The training step: forward, loss, backward and the optimizer's updates.
    Grad,
    /// A PyTorch module with the same parameter names and forward pass.
    Torch,
    /// The native kernels of the training step and its memory plan.
    Fused,
    /// The native kernels of the evaluation graph (`aec run`, `encode`, validation): batch
    /// normalization folded into the convolution before it.
    FusedEval,
    /// The Cranelift IR of every kernel of the training step.
    Clif,
    /// The learning rate (and every scheduled loss weight) of every training step.
    Schedule,
}

/// An error the CLI reports and turns into an exit code.
pub enum Failure {
    /// The spec is wrong (its diagnostics are already printed): exit 1.
    Spec,
    /// Data, weights or a numerical problem, said in the message: exit 1.
    Data(String),
    /// Usage or I/O: exit 2.
    Io(String),
}

/// How many processes an MPI launcher started, when it started more than one.
pub fn mpi_processes() -> Option<u64> {
    ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE"]
        .iter()
        .find_map(|v| std::env::var(v).ok()?.parse::<u64>().ok().filter(|&n| n > 1))
}

/// This process's rank among those an MPI launcher started (0 when started alone).
pub fn mpi_rank() -> u64 {
    ["OMPI_COMM_WORLD_RANK", "PMI_RANK"].iter().find_map(|v| std::env::var(v).ok()?.parse().ok()).unwrap_or(0)
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    // N copies started by mpirun would each train the same model alone, silently.
    if let Some(n) = mpi_processes()
        && !cfg!(feature = "mpi")
    {
        eprintln!(
            "error: aec was started as {n} MPI processes, but this build cannot train across processes: \
             each would train the same model alone. Run it as one process (without mpirun), or \
             build aec with MPI: `.ci/install-mpi && cargo build --release --features mpi`."
        );
        return ExitCode::from(2);
    }
    // With MPI, only training runs across processes; N copies of anything else would race.
    if let (Some(n), true) = (mpi_processes(), cfg!(feature = "mpi"))
        && !matches!(&cli.command, Command::Run(args) if args.trains())
    {
        eprintln!(
            "error: aec was started as {n} MPI processes; only `aec run --train` trains across processes. \
             Run this command as one process (without mpirun)."
        );
        return ExitCode::from(2);
    }
    if let Some(bytes) = cli.memory_limit {
        aec::memory::set_limit(bytes);
    }
    if let Err(e) = aec::codegen::wide::MatmulPath::from_env() {
        eprintln!("error: {e}");
        return ExitCode::from(2);
    }
    let result = match cli.command {
        Command::Compile(args) => compile(&args),
        Command::Run(args) => run::run(&args),
        Command::Encode(args) => run::encode(&args),
        Command::Check(args) => run::check(&args),
        Command::Bench(args) => bench::bench(&args),
        Command::Sample(args) => generate::sample(&args),
        Command::Interpolate(args) => generate::interpolate(&args),
        Command::Export(args) => export::export(&args),
        Command::Translate(args) => translate::translate(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => ExitCode::from(f.report()),
    }
}

impl Failure {
    /// Prints the message (a spec's diagnostics are already printed); the exit code.
    pub fn report(self) -> u8 {
        if let Failure::Data(msg) | Failure::Io(msg) = &self {
            eprintln!("error: {msg}");
        }
        self.code()
    }

    pub fn code(&self) -> u8 {
        match self {
            Failure::Spec | Failure::Data(_) => 1,
            Failure::Io(_) => 2,
        }
    }
}

/// `--stage K`: a stage of greedy pretraining, as IR or as its training step.
fn emit_stage(args: &CompileArgs, c: &aec::Compiled, src: &str, k: usize) -> Result<(), Failure> {
    let lowering =
        aec::sema::Lowering { batch: c.batch, mode: aec::sema::Mode::Train, denoise: false, shard_of: None };
    let fwd = aec::sema::lower::lower_stage(&c.model, k, &lowering)
        .map_err(|e| Failure::Data(format!("{}: {e}", args.spec.display())))?;
    let g = match args.emit {
        Some(Emit::Ir) => fwd,
        Some(Emit::Grad) => {
            let train = c.ast.train.as_ref();
            let opt = train.and_then(|t| t.optimizer.as_ref());
            // With `freeze: true`, the encoder layers below the stage's are not updated.
            let freeze = train.and_then(|t| t.pretrain).is_some_and(|p| p.freeze);
            let layers = aec::sema::stage::param_layers(&c.model);
            let own = layers.get(k - 1).map(|&pos| format!("encoder.{}.", c.model.layers[pos].index));
            let frozen: Vec<bool> = fwd
                .params
                .iter()
                .map(|p| {
                    freeze
                        && p.name.starts_with("encoder.")
                        && own.as_ref().is_none_or(|o| !p.name.starts_with(o))
                })
                .collect();
            aec::autodiff::training_step(&fwd, aec::optimizer_fn(opt), aec::clip_of(train), &frozen)
                .map_err(Failure::Data)?
        }
        _ => return Err(Failure::Io("--stage goes with --emit ir or --emit grad".into())),
    };
    out!("{}", aec::ir::print(&g, Some(src)));
    Ok(())
}

/// Reads a spec file, or says why it cannot.
pub fn read_spec(path: &Path) -> Result<String, Failure> {
    std::fs::read_to_string(path).map_err(|e| Failure::Io(format!("cannot read {}: {e}", path.display())))
}

/// Writes diagnostics to stderr, coloured on a terminal.
pub fn report(diags: &[Diagnostic], path: &Path, src: &str) {
    // Under mpirun every process reads the same spec: the first one speaks for all.
    if diags.is_empty() || mpi_rank() > 0 {
        return;
    }
    let color = std::io::stderr().is_terminal();
    eprint!("{}", diag::render(diags, &path.display().to_string(), src, color));
    let errors = diags.iter().filter(|d| d.is_error()).count();
    if errors > 0 {
        let s = if errors == 1 { "" } else { "s" };
        eprintln!("aec: {errors} error{s} in {}", path.display());
    }
}

fn compile(args: &CompileArgs) -> Result<(), Failure> {
    let src = read_spec(&args.spec)?;
    let config = aec::Config { batch: args.batch };
    let compiled = match aec::compile(&src, &config) {
        Ok(c) => c,
        Err(diags) => {
            report(&diags, &args.spec, &src);
            return Err(Failure::Spec);
        }
    };
    report(&compiled.warnings, &args.spec, &src);
    if let Some(k) = args.stage {
        return emit_stage(args, &compiled, &src, k as usize);
    }
    match args.emit {
        None => {
            out!("{}", compiled.model.table(&src));
            let p = aec::training_step(&compiled)
                .and_then(|g| aec::codegen::Program::compile(&g, Default::default()))
                .map_err(Failure::Data)?;
            outln!(
                "native training step (batch {}): {} kernels, compiled in {:.1} ms",
                compiled.batch,
                p.kernel_count(),
                p.compile_time().as_secs_f64() * 1e3
            );
            outln!(
                "memory: {} for the training step (one arena: values, parameters, optimizer state), \
                 within the budget of {}",
                aec::memory::human(p.plan().size as u64),
                aec::memory::human(aec::memory::limit())
            );
        }
        Some(Emit::Fused) => {
            let g = aec::training_step(&compiled).map_err(Failure::Data)?;
            let p = aec::codegen::Program::compile(&g, Default::default()).map_err(Failure::Data)?;
            out!("{}", aec::codegen::describe(&p));
        }
        Some(Emit::FusedEval) => {
            let lowering = aec::sema::Lowering {
                batch: compiled.batch,
                mode: aec::sema::Mode::Infer,
                denoise: false,
                shard_of: None,
            };
            let g = aec::sema::lower::lower(&compiled.model, &lowering).map_err(Failure::Data)?;
            let g = aec::passes::dce::keep_outputs(&g, &["recon", "code"]).map_err(Failure::Data)?;
            let p = aec::codegen::Program::compile(&g, Default::default()).map_err(Failure::Data)?;
            out!("{}", aec::codegen::describe(&p));
        }
        Some(Emit::Clif) => {
            let g = aec::training_step(&compiled).map_err(Failure::Data)?;
            for (name, text) in aec::codegen::clif_of(&g).map_err(Failure::Data)? {
                outln!("; kernel {name}\n{text}");
            }
        }
        Some(Emit::Schedule) => {
            out!("{}", run::schedule_table(&args.spec, args.batch, args.steps_per_epoch)?)
        }
        Some(Emit::Ast) => out!("{}", compiled.ast),
        Some(Emit::Ir) => out!("{}", aec::ir::print(&compiled.forward, Some(&src))),
        Some(Emit::Params) => out!("{}", compiled.model.params_listing()),
        Some(Emit::Torch) => out!("{}", aec::sema::torch::emit(&compiled.model)),
        Some(Emit::Grad) => match aec::training_step(&compiled) {
            Ok(g) => out!("{}", aec::ir::print(&g, Some(&src))),
            Err(e) => {
                return Err(Failure::Data(format!("cannot differentiate {}: {e}", args.spec.display())));
            }
        },
    }
    Ok(())
}
