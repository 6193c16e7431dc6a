//! Native code for IR graphs, through Cranelift (and the wide matmul core, [`wide`]).
//!
//! [`Program::compile`] verifies the graph and proves its indices in range
//! ([`crate::ir::bounds`]), rewrites switch-map convolutions ([`crate::passes::sparse`]) and
//! stride-1 transposed convolutions that widen ([`crate::passes::flip`]),
//! groups ops that fuse ([`fuse`]) and plans memory ([`plan`]): every value of the graph —
//! parameters, optimizer buffers, inputs, per-step scalars, temporaries — at a constant offset
//! in one arena the program owns (allocated when first used). Each group then becomes one or a
//! few generated functions `fn(base, lo, hi)` whose loops, strides and offsets are constants
//! (`kernels`, `matmul`, `conv`, `sparse`, `recurrent`); `lo..hi` is the share of work units
//! a thread takes. A step is the kernels called in order; the code is freed with the program.
//!
//! **Safety.** This is the only module with `unsafe`, and [`Program::call`] is the only place
//! generated code is called. Before the first call, [`Program::compile`] checks every buffer of
//! the plan against the arena's length; generated code only touches the arena through those
//! offsets, with loop bounds from the same shapes, so a wrong plan is an error, never memory
//! corruption.
//!
//! Nothing falls back to the interpreter: an op without a kernel is a compile error.

mod batched;
mod clip;
mod columns;
mod conv;
pub mod elementwise;
mod emit;
mod family;
pub mod fuse;
mod gates;
mod kernels;
mod matmul;
mod norm;
mod patches;
pub mod plan;
mod recurrent;
mod resample;
mod sparse;
mod tiles;
pub mod wide;

use crate::ir::{DType, Graph, NodeId, Op, OptimizerFn};
use crate::state::State;
use crate::value::Buf;
use cranelift_codegen::Context;
use cranelift_codegen::ir::types::{F32, I64};
use cranelift_codegen::ir::{AbiParam, Function, InstBuilder, UserFuncName};
use cranelift_codegen::isa::TargetIsa;
use cranelift_codegen::settings::{self, Configurable};
use cranelift_frontend::{FunctionBuilder, FunctionBuilderContext};
use cranelift_jit::{JITBuilder, JITModule};
use cranelift_module::{FuncId, Linkage, Module, ModuleReloc, default_libcall_names};
use std::time::{Duration, Instant};

/// A kernel: `fn(arena base, lo, hi)`; `lo..hi` is the range of work units (a matmul's row
/// blocks) for kernels that split across threads, ignored by the others.
type KernelFn = unsafe extern "C" fn(*mut u8, i64, i64);

struct Kernel {
    /// Index into `Program::groups`.
    group: usize,
    /// Which kernel of its group this is.
    piece: Piece,
    f: KernelFn,
    /// Work units `lo..hi` ranges over (1 for kernels that do not split).
    units: usize,
    /// Multiply-adds, to decide whether splitting pays.
    work: usize,
    /// A matmul computed on the wide core ([`wide`]).
    wide: bool,
    /// The vector width its main work runs at (`aec bench --profile` shows it).
    width: &'static str,
    /// The generated function's name (as in `--emit clif`).
    name: String,
}

/// The kernels a group becomes: a fused matmul packs then computes; a node of a kernel
/// family ([`family`]) becomes that family's parts; everything else is one kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Piece {
    Pack,
    Main,
    /// Part `k` of the node's family (`family`, an index into [`family::FAMILIES`]), by its
    /// `name`; `main` for the part that computes.
    Part {
        family: usize,
        k: usize,
        main: bool,
        name: &'static str,
    },
}

/// Cranelift IR instructions a kernel, and a whole program, may have: about half a second of
/// compilation for such a kernel (a 61×61 convolution's prep of 70,352 instructions took about
/// a second on a Zen 3 core; the largest kernel of a shipped spec has under 1,500).
const MAX_KERNEL_INSTS: usize = 50_000;
const MAX_PROGRAM_INSTS: usize = 500_000;
/// Kernels a program may have (a shipped spec has under a hundred).
const MAX_KERNELS: usize = 10_000;

/// Below this many multiply-adds a kernel runs on one thread: starting threads costs more.
const SPLIT_WORK: usize = 1 << 20;

/// One piece of a split kernel call, sent to a worker.
struct Job {
    f: KernelFn,
    base: Base,
    lo: i64,
    hi: i64,
}

/// Threads that stay alive between kernel calls. A worker waits for its next job spinning for a
/// short while (the next kernel of a step usually follows within microseconds) and then parks,
/// so a split call costs a few atomic operations rather than waking a sleeping thread.
struct Pool {
    workers: Vec<(std::sync::Arc<Slot>, std::thread::JoinHandle<()>)>,
}

/// One worker's mailbox: `state` moves IDLE → READY (a job is in `job`) → DONE → IDLE.
struct Slot {
    state: std::sync::atomic::AtomicU32,
    job: std::sync::Mutex<Option<Job>>,
    stop: std::sync::atomic::AtomicBool,
}

const IDLE: u32 = 0;
const READY: u32 = 1;
const DONE: u32 = 2;

/// How long a waiting thread spins before it parks or yields.
const SPIN: Duration = Duration::from_micros(200);

/// Spins until `ready()`, checking the clock every 64 rounds; after `SPIN`, calls `rest()` (park
/// or yield) between checks.
fn wait_until(mut ready: impl FnMut() -> bool, rest: impl Fn()) {
    let start = Instant::now();
    let mut rounds = 0u32;
    while !ready() {
        rounds = rounds.wrapping_add(1);
        if rounds.is_multiple_of(64) && start.elapsed() > SPIN {
            rest();
        } else {
            std::hint::spin_loop();
        }
    }
}

impl Pool {
    fn new(workers: usize) -> Pool {
        use std::sync::atomic::Ordering;
        let workers = (0..workers)
            .map(|_| {
                let slot = std::sync::Arc::new(Slot {
                    state: std::sync::atomic::AtomicU32::new(IDLE),
                    job: std::sync::Mutex::new(None),
                    stop: std::sync::atomic::AtomicBool::new(false),
                });
                let mine = slot.clone();
                let handle = std::thread::spawn(move || {
                    loop {
                        wait_until(
                            || {
                                mine.state.load(Ordering::Acquire) == READY
                                    || mine.stop.load(Ordering::Acquire)
                            },
                            std::thread::park,
                        );
                        if mine.stop.load(Ordering::Acquire) {
                            break;
                        }
                        let job = mine.job.lock().ok().and_then(|mut j| j.take());
                        if let Some(job) = job {
                            // SAFETY: the sender (`Program::call_split`) waits until this job is
                            // DONE, so the arena behind `base` outlives the call; the job's range
                            // is disjoint from every other part of the same kernel call.
                            unsafe { (job.f)(job.base.0, job.lo, job.hi) };
                        }
                        mine.state.store(DONE, Ordering::Release);
                    }
                });
                (slot, handle)
            })
            .collect();
        Pool { workers }
    }

    /// Gives worker `w` a job; false if the worker is gone.
    fn send(&self, w: usize, job: Job) -> bool {
        use std::sync::atomic::Ordering;
        let Some((slot, handle)) = self.workers.get(w) else { return false };
        if handle.is_finished() {
            return false;
        }
        match slot.job.lock() {
            Ok(mut j) => *j = Some(job),
            Err(_) => return false,
        }
        slot.state.store(READY, Ordering::Release);
        handle.thread().unpark();
        true
    }

    /// Waits for worker `w`'s job to finish.
    fn wait(&self, w: usize) {
        use std::sync::atomic::Ordering;
        let Some((slot, handle)) = self.workers.get(w) else { return };
        wait_until(
            || slot.state.load(Ordering::Acquire) == DONE || handle.is_finished(),
            std::thread::yield_now,
        );
        slot.state.store(IDLE, Ordering::Release);
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        for (slot, handle) in self.workers.drain(..) {
            slot.stop.store(true, std::sync::atomic::Ordering::Release);
            handle.thread().unpark();
            let _ = handle.join();
        }
    }
}

/// The arena's base address, sent to the worker threads of one kernel call.
#[derive(Clone, Copy)]
struct Base(*mut u8);
// SAFETY: the pointer is only used by the parts of one kernel call (`Program::call_split`, which
// waits for all of them before it returns), each on a disjoint range of output rows, while the
// `&mut Program` borrow keeps every other access to the arena out.
unsafe impl Send for Base {}
unsafe impl Sync for Base {}

/// Options of a compilation. The default takes the matmul path from `AEC_MATMUL` (`auto` when
/// unset; the CLI refuses any other value before compiling).
#[derive(Clone, Copy, Debug)]
pub struct Options {
    /// Keep each kernel's Cranelift IR as text (`--emit clif`).
    pub keep_clif: bool,
    /// Compute convolutions of max-pool switch maps densely, as written (`passes::sparse` is
    /// skipped): for comparing the two.
    pub dense: bool,
    /// Which kernels the matmuls run on.
    pub matmul: wide::MatmulPath,
    /// Whether elementwise work may run on the full-width primitives (`elementwise`).
    pub elementwise: elementwise::ElementwisePath,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            keep_clif: false,
            dense: false,
            matmul: wide::MatmulPath::from_env().unwrap_or_default(),
            elementwise: elementwise::ElementwisePath::from_env().unwrap_or_default(),
        }
    }
}

/// Why [`Program::run`] stopped.
#[derive(Clone, Debug, PartialEq)]
pub enum RunError {
    /// The loss came out NaN or infinite: the step stopped before its updates.
    NonFinite(f32),
    /// An input does not fit the graph: its length or type, or a token id out of range.
    Inputs(String),
}

impl std::fmt::Display for RunError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RunError::NonFinite(l) => write!(f, "the loss is {l}"),
            RunError::Inputs(what) => f.write_str(what),
        }
    }
}

/// A compiled graph with its arena: parameters and optimizer state live here between steps.
pub struct Program {
    graph: Graph,
    groups: Vec<fuse::Group>,
    plan: plan::Plan,
    kernels: Vec<Kernel>,
    /// The arena, 8-byte aligned; `base` is its first 64-byte boundary. Allocated (zeroed) when
    /// first written: a program compiled only to be described (`aec compile`) never holds it.
    arena: Vec<u64>,
    base: usize,
    param_steps: Vec<u64>,
    /// The learning rate of the next steps (a schedule's), instead of the optimizer's own.
    lr: Option<f64>,
    /// `clip norm`'s last scale (1 when nothing was clipped), for the tests and `aec check`.
    clip_scale: f32,
    /// What the graph was proved to be before its code was generated: the ids each input may
    /// hold ([`crate::ir::bounds`]).
    facts: crate::ir::bounds::Facts,
    threads: usize,
    pool: Option<Pool>,
    compile_time: Duration,
    /// Cranelift instructions in all the kernels (compile time grows with them).
    insts: usize,
    clif: Vec<(String, String)>,
    /// The wide core's calls: the generated code holds their addresses, so they stay boxed
    /// and alive as long as the code.
    /// (Per group; boxed, so moving the vector moves no call.)
    calls: Vec<Option<Box<wide::Call>>>,
    /// The full-width Adam updates' calls (by update node), held at stable addresses as `calls`.
    _adam_calls: Vec<(NodeId, Box<elementwise::AdamCall>)>,
    /// The other full-width primitives' calls the kernels point at (`Emit::held`).
    #[allow(clippy::vec_box)] // Boxed: the code holds their addresses.
    _held: Vec<Box<elementwise::ChainCall>>,
    /// The instruction set of the wide core, when any matmul uses it.
    wide_isa: Option<&'static str>,
    /// Time spent in each kernel since profiling was switched on (`aec bench --profile`).
    profile: Option<Vec<Duration>>,
    // The generated code; declared last, so the worker threads have stopped when it is freed.
    _code: Code,
}

/// The module holding a program's machine code, freed when the program drops (Cranelift's JIT
/// keeps code mapped until asked): programs compiled in a loop take bounded memory.
struct Code(Option<JITModule>);

impl Drop for Code {
    fn drop(&mut self) {
        if let Some(module) = self.0.take() {
            // SAFETY: the module's functions are called only through `Program`, which owns this
            // `Code`: when it drops, no kernel runs (the worker pool, an earlier field, has
            // joined its threads) and no kernel pointer outlives it. A compilation that failed
            // never handed its pointers out.
            unsafe { module.free_memory() };
        }
    }
}

extern "C" fn aec_logf(x: f32) -> f32 {
    x.ln()
}

/// ε of a Gaussian code: `rng::normal` itself, as the interpreter draws it, so both backends
/// use the same numbers (a few per sample and step; the generated kernel loops and stores).
extern "C" fn aec_normal(seed: u64, step: u64, salt: u64, i: u64) -> f32 {
    crate::rng::normal(seed, step, salt as u32, i as usize)
}

/// What `Program::run_reduced` calls between the gradients and the updates.
pub type Reduce<'a> = &'a mut dyn FnMut(&mut [f32]);

/// A kernel's machine code, before it is placed in the module.
struct Compiled {
    fid: FuncId,
    alignment: u64,
    bytes: Vec<u8>,
    relocs: Vec<ModuleReloc>,
}

/// A kernel's function as it waits to be compiled: its place in the program, id and name.
type Built = (usize, FuncId, String, Function);

/// A kernel's machine code (or why Cranelift refused it), with its place in the program.
type Done = (usize, Result<Compiled, String>);

/// The kernels' functions waiting for Cranelift: the program pushes each as soon as it is built,
/// and threads compile them meanwhile (Cranelift compiles each function on its own; only placing
/// the code in the module is serial), so building the IR, which is serial, overlaps compiling.
#[derive(Default)]
struct Queue {
    /// The functions not yet taken, and whether the last has been pushed.
    waiting: std::sync::Mutex<(Vec<Built>, bool)>,
    more: std::sync::Condvar,
}

impl Queue {
    fn push(&self, f: Built) {
        if let Ok(mut w) = self.waiting.lock() {
            w.0.push(f);
        }
        self.more.notify_one();
    }

    /// No more functions: the threads finish what is left and return.
    fn close(&self) {
        if let Ok(mut w) = self.waiting.lock() {
            w.1 = true;
        }
        self.more.notify_all();
    }

    /// The largest function waiting (so that no thread is left with a big one at the end), or
    /// `None` once the queue is closed and empty.
    fn take(&self) -> Option<Built> {
        let mut w = self.waiting.lock().ok()?;
        loop {
            let largest = w.0.iter().enumerate().max_by_key(|(_, f)| f.3.dfg.num_insts()).map(|(i, _)| i);
            if let Some(i) = largest {
                return Some(w.0.swap_remove(i));
            }
            if w.1 {
                return None;
            }
            w = self.more.wait(w).ok()?;
        }
    }

    /// Compiles functions until the queue is closed and empty; one context for all of them,
    /// which keeps its allocations between them.
    fn drain(&self, isa: &dyn TargetIsa) -> Vec<Done> {
        let mut ctx = Context::new();
        let mut out = Vec::new();
        while let Some((i, fid, name, func)) = self.take() {
            out.push((i, compile_one(&mut ctx, isa, fid, &name, func)));
        }
        out
    }
}

/// A guard that closes the queue when the program stops building, by error or not, so that
/// the compiling threads never wait for a function that will not come.
struct Closing<'a>(&'a Queue);

impl Drop for Closing<'_> {
    fn drop(&mut self) {
        self.0.close();
    }
}

/// Runs `build`, which pushes the kernels' functions to the queue it is given, while the other
/// threads compile them; this thread compiles what is left once `build` returns. The compiled
/// functions come back with their indices, in no particular order.
fn build_while_compiling(
    isa: &dyn TargetIsa,
    threads: usize,
    build: impl FnOnce(&Queue) -> Result<(), String>,
) -> Result<Vec<Done>, String> {
    let queue = Queue::default();
    std::thread::scope(|scope| {
        let helpers: Vec<_> = (1..threads).map(|_| scope.spawn(|| queue.drain(isa))).collect();
        let closing = Closing(&queue);
        let built = build(&queue);
        drop(closing);
        let mut done = queue.drain(isa);
        for h in helpers {
            done.extend(h.join().unwrap_or_default());
        }
        built.map(|()| done)
    })
}

fn compile_one(
    ctx: &mut Context,
    isa: &dyn TargetIsa,
    fid: FuncId,
    name: &str,
    func: Function,
) -> Result<Compiled, String> {
    ctx.clear();
    ctx.func = func;
    ctx.compile(isa, &mut Default::default()).map_err(|e| format!("{name}: {:?}", e.inner))?;
    let code = ctx.compiled_code().ok_or_else(|| format!("{name}: no code"))?;
    let alignment = code.buffer.alignment as u64;
    let bytes = code.code_buffer().to_vec();
    let relocs =
        code.buffer.relocs().iter().map(|r| ModuleReloc::from_mach_reloc(r, &ctx.func, fid)).collect();
    Ok(Compiled { fid, alignment, bytes, relocs })
}

impl Program {
    pub fn compile(g: &Graph, opts: Options) -> Result<Program, String> {
        let started = Instant::now();
        crate::ir::verify(g)
            .map_err(|e| format!("the graph `{}` cannot be compiled: {}", g.name, e.join("; ")))?;
        let sparse = if opts.dense { g.clone() } else { crate::passes::sparse::rewrite(g)? };
        let flipped = crate::passes::flip::rewrite(&sparse)?;
        let rewritten = if opts.dense { flipped } else { crate::passes::onehot::rewrite(&flipped)? };
        let g = &rewritten;
        // No code for a graph that does not verify or whose indices are not proved in range:
        // the kernels trust both.
        let facts = crate::ir::bounds::check(g)
            .map_err(|e| format!("the graph `{}` cannot be compiled: {}", g.name, e.join("; ")))?;
        let groups = fuse::groups(g);
        let wide_isa = match opts.matmul {
            wide::MatmulPath::Auto | wide::MatmulPath::Gemm => wide::isa(),
            wide::MatmulPath::Cranelift => None,
        };
        let mut fused_matmul = vec![false; g.len()];
        for grp in &groups {
            if let fuse::Group::MatMul { mm, .. } = grp {
                fused_matmul[mm.index()] = true;
            }
        }
        let is_wide = |id: NodeId| {
            wide_isa.is_some()
                && fused_matmul[id.index()]
                && matmul::dims(g, id).is_some_and(|(m, n, k)| wide::worth(m, n, k))
        };
        let plan = plan::plan(g, &groups, &|id| scratch_bytes(g, id, (is_wide(id), wide_isa.is_some())));
        check_plan(g, &plan)?;
        crate::memory::check(
            &format!("the native code of `{}` (its arena of values, parameters and optimizer state)", g.name),
            Some(plan.size as u64 + 1024),
            "use a smaller --batch",
        )?;

        let mut flags = settings::builder();
        flags.set("opt_level", "speed").map_err(|e| e.to_string())?;
        flags.set("use_colocated_libcalls", "false").map_err(|e| e.to_string())?;
        flags.set("is_pic", "false").map_err(|e| e.to_string())?;
        // Cranelift's IR verifier runs in debug builds (every test); release builds skip it.
        let verify = if cfg!(debug_assertions) { "true" } else { "false" };
        flags.set("enable_verifier", verify).map_err(|e| e.to_string())?;
        let isa = cranelift_native::builder()
            .map_err(|e| format!("this machine is not supported by Cranelift: {e}"))?
            .finish(settings::Flags::new(flags))
            .map_err(|e| e.to_string())?;
        // The threads that compile the kernels share the module's ISA.
        let compile_isa = isa.clone();
        let mut builder = JITBuilder::with_isa(isa, default_libcall_names());
        builder.symbol("aec_logf", aec_logf as *const u8);
        builder.symbol("aec_normal", aec_normal as *const u8);
        builder.symbol("aec_gemm", wide::aec_gemm as *const u8);
        builder.symbol("aec_adam", elementwise::aec_adam as *const u8);
        builder.symbol("aec_sum_exp", elementwise::aec_sum_exp as *const u8);
        builder.symbol("aec_chain", elementwise::aec_chain as *const u8);
        let mut code = Code(Some(JITModule::new(builder)));
        let Some(module) = code.0.as_mut() else { return Err("no JIT module".into()) };

        let mut logf_sig = module.make_signature();
        logf_sig.params.push(AbiParam::new(F32));
        logf_sig.returns.push(AbiParam::new(F32));
        let logf =
            module.declare_function("aec_logf", Linkage::Import, &logf_sig).map_err(|e| e.to_string())?;

        let mut normal_sig = module.make_signature();
        normal_sig.params.extend([AbiParam::new(I64); 4]);
        normal_sig.returns.push(AbiParam::new(F32));
        let normal =
            module.declare_function("aec_normal", Linkage::Import, &normal_sig).map_err(|e| e.to_string())?;

        // `aec_sum_exp(base, src, dst, n, max) -> total`.
        let mut sum_exp_sig = module.make_signature();
        sum_exp_sig.params.extend([
            AbiParam::new(I64),
            AbiParam::new(I64),
            AbiParam::new(I64),
            AbiParam::new(I64),
        ]);
        sum_exp_sig.params.push(AbiParam::new(F32));
        sum_exp_sig.returns.push(AbiParam::new(F32));
        let sum_exp = module
            .declare_function("aec_sum_exp", Linkage::Import, &sum_exp_sig)
            .map_err(|e| e.to_string())?;

        let mut sig = module.make_signature();
        sig.params.extend([AbiParam::new(I64), AbiParam::new(I64), AbiParam::new(I64)]);
        // `aec_gemm(base, call, unit)` has the kernels' signature.
        let gemm = module.declare_function("aec_gemm", Linkage::Import, &sig).map_err(|e| e.to_string())?;
        // `aec_chain(base, call, unit)` and `aec_adam(base, call, chunk)` too.
        let chain = module.declare_function("aec_chain", Linkage::Import, &sig).map_err(|e| e.to_string())?;
        let adam = module.declare_function("aec_adam", Linkage::Import, &sig).map_err(|e| e.to_string())?;
        let ew_isa = opts.elementwise.isa();
        let adam_calls = if ew_isa.is_some() { adam_calls(g, &plan)? } else { Vec::new() };
        // The matmuls that run on the wide core, each with its call (index by group).
        let extras = wide::Extras {
            full_width: ew_isa.is_some(),
            tiles: opts.matmul == wide::MatmulPath::Auto && tiles::fit(),
        };
        let calls = wide_calls(g, &groups, &plan, (wide_isa.is_some(), extras), &is_wide)?;
        let mut fctx = FunctionBuilderContext::new();
        let mut ids = Vec::new();
        let mut clif = Vec::new();
        let work = work_list(g, &groups, &calls);
        // A program of very many kernels is refused before any is emitted, in milliseconds:
        // each costs a fraction of a millisecond to build and compile, whatever its size.
        if work.len() > MAX_KERNELS {
            return Err(format!(
                "the native code of `{}` would be {} kernels, over the {MAX_KERNELS} that compile in \
                 seconds: the network has too many layers for native code. Use fewer layers, or \
                 --backend interp",
                g.name,
                work.len()
            ));
        }
        let mut total_insts = 0usize;
        let mut held = Vec::new();
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(work.len()).max(1);
        let mut done = build_while_compiling(&*compile_isa, threads, |queue| {
            // The updates kernel first: one loop per parameter, it is often the largest, and
            // built last it would be compiled alone after every other.
            let updates_first =
                |&(_, &(gi, _)): &(usize, &(usize, Piece))| !matches!(groups[gi], fuse::Group::Updates(_));
            let mut order: Vec<_> = work.iter().enumerate().collect();
            order.sort_by_key(updates_first);
            for (index, &(gi, piece)) in order {
                let grp = &groups[gi];
                let name = kernel_name(g, grp, piece);
                let fid = module.declare_function(&name, Linkage::Local, &sig).map_err(|e| e.to_string())?;
                let full_width;
                let mut func =
                    Function::with_name_signature(UserFuncName::user(0, fid.as_u32()), sig.clone());
                let frontend = module.target_config();
                {
                    let mut b = FunctionBuilder::new(&mut func, &mut fctx);
                    let entry = b.create_block();
                    b.append_block_params_for_function_params(entry);
                    b.switch_to_block(entry);
                    let params = b.block_params(entry).to_vec();
                    let (base, lo, hi) = (params[0], params[1], params[2]);
                    let logf_ref = module.declare_func_in_func(logf, b.func);
                    let normal_ref = module.declare_func_in_func(normal, b.func);
                    let primitives = ew_isa.map(|_| emit::Primitives {
                        sum_exp: module.declare_func_in_func(sum_exp, b.func),
                        chain: module.declare_func_in_func(chain, b.func),
                    });
                    let mut e = emit::Emit {
                        b: &mut b,
                        base,
                        logf: Some(logf_ref),
                        normal: Some(normal_ref),
                        wide: primitives,
                        full_width: false,
                        held: Vec::new(),
                        consts: Default::default(),
                    };
                    // The wide core, imported into the kernels of a group that calls it.
                    let core = calls[gi].as_deref().map(|call| {
                        let f = module.declare_func_in_func(gemm, e.b.func);
                        (f, call, call as *const wide::Call as i64)
                    });
                    // The full-width Adam update, imported into the updates kernel when it calls it.
                    let adam_ref = match grp {
                        fuse::Group::Updates(ids)
                            if ids.iter().any(|id| adam_calls.iter().any(|c| c.0 == *id)) =>
                        {
                            Some((module.declare_func_in_func(adam, e.b.func), adam_calls.as_slice()))
                        }
                        _ => None,
                    };
                    emit_kernel(&mut e, g, &plan, grp, piece, (core, adam_ref), (lo, hi))?;
                    full_width = e.full_width;
                    for call in e.held.drain(..) {
                        if call.extent() > plan.size {
                            return Err(format!("{name}: a full-width call reaches past the arena"));
                        }
                        held.push(call);
                    }
                    b.ins().return_(&[]);
                    b.seal_all_blocks();
                    b.finalize(frontend);
                }
                if opts.keep_clif {
                    clif.push((index, name.clone(), func.display().to_string()));
                }
                // Compile time grows with the code: a kernel whose loops were unrolled over a huge
                // dimension is refused here, in milliseconds, rather than compiled for minutes.
                let insts = func.dfg.num_insts();
                total_insts += insts;
                if insts > MAX_KERNEL_INSTS || total_insts > MAX_PROGRAM_INSTS {
                    return Err(format!(
                        "the native code of `{}` would be too large to compile in seconds: kernel {name} \
                     has {insts} instructions ({total_insts} so far; at most {MAX_KERNEL_INSTS} per \
                     kernel and {MAX_PROGRAM_INSTS} in all). Its loops unroll over a kernel's taps \
                     or a layer's channels: use smaller kernels or fewer channels, or --backend interp",
                        g.name
                    ));
                }
                queue.push((index, fid, name.clone(), func));
                let (units, work) = kernel_units(g, grp, piece, calls[gi].as_deref());
                ids.push((index, (gi, piece, fid, units, work, name, full_width)));
            }
            Ok(())
        })?;
        if done.len() != ids.len() {
            return Err("a thread compiling the kernels stopped".into());
        }
        // Back in the program's order.
        ids.sort_by_key(|(i, _)| *i);
        clif.sort_by_key(|(i, _, _)| *i);
        let clif = clif.into_iter().map(|(_, name, text)| (name, text)).collect();
        done.sort_by_key(|(i, _)| *i);
        for (_, compiled) in done {
            let Compiled { fid, alignment, bytes, relocs } = compiled?;
            module.define_function_bytes(fid, alignment, &bytes, &relocs).map_err(|e| e.to_string())?;
        }
        module.finalize_definitions().map_err(|e| e.to_string())?;
        let kernels = ids
            .into_iter()
            .map(|(_, (group, piece, fid, units, work, name, full_width))| {
                let ptr = module.get_finalized_function(fid);
                // SAFETY: `ptr` is the finalized code of a function declared with the signature
                // `fn(i64, i64, i64)` (arena base, lo, hi) and no results: `KernelFn`'s ABI.
                let f = unsafe { std::mem::transmute::<*const u8, KernelFn>(ptr) };
                let wide =
                    calls[group].is_some() && matches!(piece, Piece::Main | Piece::Part { main: true, .. });
                // The wide core runs at its ISA's width; the elementwise primitives at AVX2's.
                let width = match &groups[group] {
                    fuse::Group::Updates(ids)
                        if ids.iter().any(|id| adam_calls.iter().any(|c| c.0 == *id)) =>
                    {
                        "256-bit"
                    }
                    _ if wide && wide_isa == Some("AVX-512") => "512-bit",
                    _ if wide || full_width => "256-bit",
                    _ => "128-bit",
                };
                Kernel { group, piece, f, units, work, wide, width, name }
            })
            .collect();
        Ok(Program {
            graph: g.clone(),
            groups,
            param_steps: vec![0; g.params.len()],
            lr: None,
            clip_scale: 1.0,
            facts,
            threads: 1,
            pool: None,
            plan,
            kernels,
            arena: Vec::new(),
            base: 0,
            compile_time: started.elapsed(),
            insts: total_insts,
            clif,
            wide_isa: wide_isa.filter(|_| calls.iter().any(Option::is_some)),
            calls,
            _adam_calls: adam_calls,
            _held: held,
            profile: None,
            _code: code,
        })
    }

    /// The instruction set of the wide matmul core, when any of this program's matmuls runs on
    /// it (`None`: every matmul is Cranelift's 128-bit kernel).
    pub fn wide_isa(&self) -> Option<&'static str> {
        self.wide_isa
    }

    /// Sets the learning rate of the steps to come (`None`: the optimizer's own).
    pub fn set_learning_rate(&mut self, lr: Option<f64>) {
        self.lr = lr;
    }

    /// The gradient scale `clip norm` applied in the last step (1 without clipping).
    pub fn clip_scale(&self) -> f32 {
        self.clip_scale
    }

    pub fn compile_time(&self) -> Duration {
        self.compile_time
    }

    pub fn graph(&self) -> &Graph {
        &self.graph
    }

    pub fn plan(&self) -> &plan::Plan {
        &self.plan
    }

    /// Each kernel's Cranelift IR (with `Options::keep_clif`).
    pub fn clif(&self) -> &[(String, String)] {
        &self.clif
    }

    /// Threads the large kernels split across (1 by default).
    pub fn set_threads(&mut self, threads: usize) {
        self.threads = threads.max(1);
        let splits = self.kernels.iter().any(|k| k.units > 1 && k.work >= SPLIT_WORK);
        self.pool = (self.threads > 1 && splits).then(|| Pool::new(self.threads - 1));
    }

    /// Starts timing every kernel call (from zero).
    pub fn start_profile(&mut self) {
        self.profile = Some(vec![Duration::ZERO; self.kernels.len()]);
    }

    /// Each kernel's name and the time spent in it since `start_profile`, in step order.
    /// Each kernel's name, the vector width its main work ran at, and its time.
    pub fn profile(&self) -> Vec<(&str, &'static str, Duration)> {
        let times = self.profile.as_deref().unwrap_or_default();
        self.kernels.iter().zip(times).map(|(k, t)| (k.name.as_str(), k.width, *t)).collect()
    }

    pub fn kernel_count(&self) -> usize {
        self.kernels.len()
    }

    /// Multiply-adds one run executes in its matmuls, convolutions and recurrent loops (what
    /// the code does: a switch-map convolution counts only its switches).
    pub fn multiply_adds(&self) -> u64 {
        self.kernels
            .iter()
            .filter(|k| {
                matches!(
                    (&self.groups[k.group], k.piece),
                    (fuse::Group::MatMul { .. }, Piece::Main) | (_, Piece::Part { main: true, .. })
                )
            })
            .map(|k| k.work as u64)
            .sum()
    }

    fn bytes(&mut self) -> &mut [u8] {
        if self.arena.is_empty() {
            self.arena = vec![0u64; self.plan.size / 8 + 16];
            let addr = self.arena.as_ptr() as usize;
            self.base = addr.next_multiple_of(64) - addr;
        }
        let all: &mut [u8] = bytemuck_bytes(&mut self.arena);
        &mut all[self.base..]
    }

    fn write_f32(&mut self, off: usize, v: &[f32]) {
        let dst = &mut self.bytes()[off..off + v.len() * 4];
        for (d, x) in dst.chunks_exact_mut(4).zip(v) {
            d.copy_from_slice(&x.to_le_bytes());
        }
    }

    fn read_f32(&self, off: usize, n: usize) -> Vec<f32> {
        if self.arena.is_empty() {
            // Nothing was written or run yet: the arena would be all zeros.
            return vec![0.0; n];
        }
        let all: &[u8] = bytemuck_bytes_ref(&self.arena);
        all[self.base + off..self.base + off + n * 4]
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    }

    /// Loads parameters and optimizer state.
    pub fn set_state(&mut self, state: &State) -> Result<(), String> {
        for (i, def) in self.graph.params.clone().iter().enumerate() {
            let n: usize = def.shape.iter().product();
            let v = state.params.get(i).ok_or("state has too few parameters")?;
            if v.len() != n {
                return Err(format!("{}: {} values for {n}", def.name, v.len()));
            }
            self.write_f32(self.plan.param[i], v);
            let slots = self.plan.slots[i].clone();
            for (k, off) in slots.iter().enumerate() {
                match state.slots.get(i).and_then(|s| s.get(k)) {
                    Some(s) if s.len() == n => self.write_f32(*off, s),
                    _ => self.write_f32(*off, &vec![0.0; n]),
                }
            }
        }
        self.param_steps = state.param_steps.clone();
        self.param_steps.resize(self.graph.params.len(), 0);
        Ok(())
    }

    /// Copies parameters and optimizer state out.
    pub fn get_state(&self, state: &mut State) {
        let n_params = self.graph.params.len();
        state.params.resize(n_params, Vec::new());
        state.slots.resize(n_params, Vec::new());
        for (i, def) in self.graph.params.iter().enumerate() {
            let n: usize = def.shape.iter().product();
            state.params[i] = self.read_f32(self.plan.param[i], n);
            if !self.plan.slots[i].is_empty() && self.param_steps.get(i).copied().unwrap_or(0) > 0 {
                state.slots[i] = self.plan.slots[i].iter().map(|&o| self.read_f32(o, n)).collect();
            }
        }
        state.param_steps = self.param_steps.clone();
    }

    /// Runs the graph on `inputs` (in `graph.inputs` order). The updates run only after the
    /// loss (if the graph has one) is checked to be finite: on NaN or infinity the step stops
    /// with parameters and optimizer state as they were before it, and `Err(loss)` returns.
    pub fn run(&mut self, inputs: &[Buf], seed: u64, step: u64) -> Result<(), RunError> {
        self.run_reduced(inputs, seed, step, None)
    }

    /// `run`, with `reduce` called between the gradients and the updates (data-parallel
    /// training): it gets one flat buffer — every gradient an update reads, in the updates'
    /// order, then every scalar output (the loss and its terms) — and leaves in it what this
    /// process should continue with (every process's, averaged). The loss is checked after it,
    /// so every process stops on the same non-finite total.
    pub fn run_reduced(
        &mut self,
        inputs: &[Buf],
        seed: u64,
        step: u64,
        reduce: Option<Reduce>,
    ) -> Result<(), RunError> {
        // Every input, in the graph's order: a missing one would leave the previous step's
        // values in its slot.
        if inputs.len() != self.graph.inputs.len() {
            let names: Vec<String> = self.graph.inputs.iter().map(|d| format!("`{}`", d.name)).collect();
            let missing = self
                .graph
                .inputs
                .get(inputs.len())
                .map_or(String::new(), |d| format!(" (`{}` is missing)", d.name));
            return Err(RunError::Inputs(format!(
                "`{}` takes {} inputs ({}), got {}{missing}",
                self.graph.name,
                names.len(),
                names.join(", "),
                inputs.len()
            )));
        }
        for (i, (def, buf)) in self.graph.inputs.clone().iter().zip(inputs).enumerate() {
            let off = self.plan.input[i];
            let n = def.ty.numel();
            match buf {
                Buf::F32(v) if v.len() == n && def.ty.dtype == DType::F32 => self.write_f32(off, v),
                Buf::I32(v) if v.len() == n && def.ty.dtype == DType::I32 => {
                    // Kernels index tables and rows by these ids: an id out of range would read
                    // or write outside its buffer, so it stops the step before any kernel runs.
                    // (An input no table reads is unbounded: `usize::MAX`.)
                    let bound = self.facts.input_bound(i);
                    if let Some(&bad) =
                        v.iter().find(|&&x| usize::try_from(x).is_ok_and(|x| x >= bound) || x < 0)
                    {
                        return Err(RunError::Inputs(format!(
                            "`{}` holds the id {bad}, outside 0..{bound}",
                            def.name
                        )));
                    }
                    let dst = &mut self.bytes()[off..off + n * 4];
                    for (d, x) in dst.chunks_exact_mut(4).zip(v) {
                        d.copy_from_slice(&x.to_le_bytes());
                    }
                }
                // An input the graph does not read (pruned) may be empty.
                _ if self.graph.input_node(crate::ir::InputId(i as u32)).is_none() => {}
                _ => {
                    return Err(RunError::Inputs(format!(
                        "`{}` needs {} {} values, got {}",
                        def.name,
                        n,
                        if def.ty.dtype == DType::I32 { "i32" } else { "f32" },
                        buf.len()
                    )));
                }
            }
        }
        let rng = self.plan.rng;
        let bytes = self.bytes();
        bytes[rng..rng + 8].copy_from_slice(&seed.to_le_bytes());
        bytes[rng + 8..rng + 16].copy_from_slice(&step.to_le_bytes());
        let first_update = self
            .kernels
            .iter()
            .position(|k| matches!(self.groups[k.group], fuse::Group::Updates(_) | fuse::Group::GradNorm(_)))
            .unwrap_or(self.kernels.len());
        for k in 0..first_update {
            self.call(k);
        }
        if first_update < self.kernels.len() {
            if let Some(reduce) = reduce {
                let slots = self.reduced_slots();
                let mut flat = Vec::with_capacity(slots.iter().map(|s| s.1).sum());
                for &(off, n) in &slots {
                    flat.extend(self.read_f32(off, n));
                }
                reduce(&mut flat);
                let mut at = 0;
                for (off, n) in slots {
                    self.write_f32(off, &flat[at..at + n]);
                    at += n;
                }
            }
            if let Some(loss) = self.graph.output("loss") {
                let l = self.read_f32(self.plan.node[loss.index()], 1)[0];
                if !l.is_finite() {
                    return Err(RunError::NonFinite(l));
                }
            }
            let mut k = first_update;
            // `clip norm`: the sum of squares of the clipped gradients, then their scale.
            if matches!(self.groups[self.kernels[k].group], fuse::Group::GradNorm(_)) {
                self.call(k);
                k += 1;
                self.clip_scale = self.norm_scale();
            }
            self.set_update_scalars();
            for k in k..self.kernels.len() {
                self.call(k);
            }
        }
        Ok(())
    }

    /// `clip norm`'s scale from the norm kernel's partial sums (added in f64).
    fn norm_scale(&self) -> f32 {
        let Some((off, n)) = self.plan.norm_partials else { return 1.0 };
        let limit = self.graph.nodes().iter().find_map(|n| match n.op {
            Op::Update { clip: crate::ir::Clip::Norm(c), .. } => Some(c),
            _ => None,
        });
        let sum: f64 = self.read_f32(off, n).iter().map(|&x| f64::from(x)).sum();
        limit.map_or(1.0, |c| crate::interp::norm_scale(f64::from(c), sum.sqrt()))
    }

    /// Arena (offset, length) of what `run_reduced` hands its `reduce`.
    fn reduced_slots(&self) -> Vec<(usize, usize)> {
        let grads = self.graph.ids().filter_map(|id| match self.graph.node(id).op {
            Op::Update { grad, .. } => Some((self.plan.node[grad.index()], self.graph.ty(grad).numel())),
            _ => None,
        });
        let scalars = self
            .graph
            .outputs
            .iter()
            .filter(|(_, id)| self.graph.ty(*id).numel() == 1 && self.graph.ty(*id).dtype == DType::F32)
            .map(|(_, id)| (self.plan.node[id.index()], 1));
        grads.chain(scalars).collect()
    }

    /// The scalars each update reads this step (see `kernels::update`).
    fn set_update_scalars(&mut self) {
        for (node, off) in self.plan.update_scalars.clone() {
            let Op::Update { f, param, .. } = self.graph.node(node).op else { continue };
            let p = param.index();
            self.param_steps[p] += 1;
            let t = self.param_steps[p];
            let lr = self.lr.filter(|_| f.is_optimizer()).unwrap_or(f64::from(f.lr()));
            let (s0, s1, shrink) = match f {
                OptimizerFn::Sgd { momentum, .. } => (if t == 1 { 0.0 } else { momentum }, 0.0, 1.0),
                OptimizerFn::Adam { b1, b2, weight_decay, .. } => {
                    let t = t as i32;
                    let bc1 = 1.0 - f64::from(b1).powi(t);
                    let bc2 = (1.0 - f64::from(b2).powi(t)).sqrt();
                    ((lr / bc1) as f32, (1.0 / bc2) as f32, (1.0 - lr * f64::from(weight_decay)) as f32)
                }
                OptimizerFn::RmsProp { .. } | OptimizerFn::Running { .. } => (0.0, 0.0, 1.0),
            };
            self.write_f32(off, &[s0, s1, lr as f32, shrink, self.clip_scale, 0.0, 0.0, 0.0]);
        }
    }

    /// Calls kernel `k`, timing it when profiling.
    fn call(&mut self, k: usize) {
        if self.profile.is_none() {
            return self.call_split(k);
        }
        let t = Instant::now();
        self.call_split(k);
        let spent = t.elapsed();
        if let Some(p) = self.profile.as_mut() {
            p[k] += spent;
        }
    }

    /// Calls kernel `k` on the arena, split across threads when it is large enough.
    fn call_split(&mut self, k: usize) {
        let (f, units, work) = (self.kernels[k].f, self.kernels[k].units, self.kernels[k].work);
        let base = Base(self.bytes().as_mut_ptr());
        let threads = self.threads.min(units);
        if threads <= 1 || work < SPLIT_WORK {
            // SAFETY: `f` was generated for this program's plan, which `check_plan` verified
            // fits in the arena; `base` points at the arena's 64-byte-aligned start with
            // `plan.size` bytes behind it. `0..units` is the kernel's whole range.
            unsafe { f(base.0, 0, units as i64) };
            return;
        }
        let per = units.div_ceil(threads);
        let Some(pool) = &self.pool else {
            // SAFETY: as above, the whole range on this thread.
            unsafe { f(base.0, 0, units as i64) };
            return;
        };
        let mut sent = Vec::new();
        for t in 1..threads {
            let (lo, hi) = (t * per, ((t + 1) * per).min(units));
            if lo >= hi {
                continue;
            }
            if pool.send(t - 1, Job { f, base, lo: lo as i64, hi: hi as i64 }) {
                sent.push(t - 1);
            } else {
                // A worker that is gone: run its part here.
                // SAFETY: as above, a range disjoint from the others.
                unsafe { f(base.0, lo as i64, hi as i64) };
            }
        }
        // SAFETY: as above: the first range, on this thread, while the workers run theirs. A
        // split kernel (matmul compute, elementwise, updates) writes only its own rows or
        // elements and reads buffers no part of this call writes.
        unsafe { f(base.0, 0, per.min(units) as i64) };
        for w in sent {
            // Wait for every part before the arena can be touched again.
            pool.wait(w);
        }
    }

    /// The value of node `id` of the compiled graph (`graph()`, rewritten by `passes::sparse`)
    /// after `run`: valid for outputs (temporaries may be reused); `output` finds one by name.
    pub fn value(&self, id: NodeId) -> Buf {
        let ty = self.graph.ty(id).clone();
        let off = self.plan.node[id.index()];
        match ty.dtype {
            DType::F32 => Buf::F32(self.read_f32(off, ty.numel())),
            DType::I32 => {
                Buf::I32(self.read_f32(off, ty.numel()).into_iter().map(|f| f.to_bits() as i32).collect())
            }
        }
    }

    pub fn output(&self, name: &str) -> Option<Buf> {
        self.graph.output(name).map(|id| self.value(id))
    }
}

/// The wide core's call of each group that uses it (by group): a large fused matmul, or a
/// kernel family's (`wide_available`: this machine has the core and the path is not off).
fn wide_calls(
    g: &Graph,
    groups: &[fuse::Group],
    plan: &plan::Plan,
    (wide_available, extras): (bool, wide::Extras),
    is_wide: &dyn Fn(NodeId) -> bool,
) -> Result<Vec<Option<Box<wide::Call>>>, String> {
    let mut calls: Vec<Option<Box<wide::Call>>> = vec![None; groups.len()];
    for (gi, grp) in groups.iter().enumerate() {
        if let fuse::Group::Single(id) = grp
            && wide_available
            && family::of(g, *id).is_some()
        {
            // A family's call into the core (a recurrent loop's per-step projection, a
            // dense conv2d's matmul, a batch of products).
            let scratch = family_scratch(g, plan, *id)?;
            let call = family::of(g, *id)
                .and_then(|(f, _)| (family::FAMILIES[f].wide_call)(g, plan, *id, scratch, extras));
            if let Some(call) = call {
                if call.extent() > plan.size {
                    return Err(format!("the wide matmul of %{} reaches past the arena", id.0));
                }
                calls[gi] = Some(Box::new(call));
            }
            continue;
        }
        let fuse::Group::MatMul { mm, chain } = grp else { continue };
        let Op::MatMul { a, b: rhs, ta, tb } = g.node(*mm).op else { continue };
        let Some((m, n, k)) = matmul::dims(g, *mm) else { continue };
        if is_wide(*mm) {
            let out = plan.node[grp.result().index()];
            let mut call =
                wide::Call::new((m, n, k), (plan.node[a.index()], ta), (plan.node[rhs.index()], tb), out);
            // With the full-width primitives, the core applies the epilogue itself.
            if extras.full_width {
                call.epilogue = matmul::epilogue(g, plan, *mm, chain);
            }
            if call.extent() > plan.size {
                return Err(format!("the wide matmul of %{} reaches past the arena", mm.0));
            }
            calls[gi] = Some(Box::new(call));
        }
    }
    Ok(calls)
}

/// The kernels of a step in order, by group: a fused matmul is two kernels, packing B and then
/// the compute kernel that splits by rows and applies the fused ops as it stores (one on the
/// wide core, which packs its operands itself); a family's node its parts; any other group one.
fn work_list(g: &Graph, groups: &[fuse::Group], calls: &[Option<Box<wide::Call>>]) -> Vec<(usize, Piece)> {
    let mut work: Vec<(usize, Piece)> = Vec::new();
    for (gi, grp) in groups.iter().enumerate() {
        match grp {
            // The wide core packs its operands itself.
            fuse::Group::MatMul { .. } if calls[gi].is_some() => work.push((gi, Piece::Main)),
            fuse::Group::MatMul { .. } => work.extend([(gi, Piece::Pack), (gi, Piece::Main)]),
            // A part with no work units (a conv2d's prep when the core writes its patches) is
            // no kernel.
            fuse::Group::Single(id) => match family::of(g, *id) {
                Some((family, parts)) => work.extend(
                    parts
                        .names
                        .iter()
                        .enumerate()
                        .filter(|&(k, _)| {
                            (family::FAMILIES[family].units)(g, *id, k, calls[gi].as_deref()).0 > 0
                        })
                        .map(|(k, &name)| (gi, Piece::Part { family, k, main: k == parts.main, name })),
                ),
                None => work.push((gi, Piece::Main)),
            },
            fuse::Group::Chain(_)
            | fuse::Group::LossPair { .. }
            | fuse::Group::Updates(_)
            | fuse::Group::GradNorm(_) => work.push((gi, Piece::Main)),
        }
    }
    work
}

/// A kernel's function name (as `--emit clif` and `aec bench --profile` show it).
fn kernel_name(g: &Graph, grp: &fuse::Group, piece: Piece) -> String {
    let head = grp.head();
    match (grp, piece) {
        (_, Piece::Pack) => format!("k{}_pack", head.0),
        (_, Piece::Part { name, .. }) => format!("k{}_{}_{name}", head.0, g.node(head).op.mnemonic()),
        (fuse::Group::Updates(_), _) => "k_updates".to_owned(),
        (fuse::Group::GradNorm(_), _) => "k_grad_norm".to_owned(),
        (fuse::Group::MatMul { .. } | fuse::Group::Chain(_) | fuse::Group::LossPair { .. }, _)
            if grp.nodes().len() > 1 =>
        {
            let ops: Vec<&str> = grp.nodes().iter().map(|n| g.node(*n).op.mnemonic()).collect();
            format!("k{}_{}", head.0, ops.join("_"))
        }
        _ => format!("k{}_{}", head.0, g.node(head).op.mnemonic()),
    }
}

/// Emits the body of one kernel: part `piece` of group `grp`, over work units `range`, with the
/// wide core's call imported when the group has one.
fn emit_kernel(
    e: &mut emit::Emit,
    g: &Graph,
    plan: &plan::Plan,
    grp: &fuse::Group,
    piece: Piece,
    (core, adam): (Option<wide::Core>, Option<kernels::AdamPrimitive>),
    range: (cranelift_codegen::ir::Value, cranelift_codegen::ir::Value),
) -> Result<(), String> {
    match grp {
        fuse::Group::MatMul { mm, chain } => {
            let Op::MatMul { a, b: rhs, ta, tb } = g.node(*mm).op else {
                return Err("a matmul group without a matmul".into());
            };
            if let Some((f, call, addr)) = core {
                // (An epilogue the core applies itself at full width is not emitted again.)
                let ep =
                    if call.epilogue.is_empty() { matmul::epilogue(g, plan, *mm, chain) } else { Vec::new() };
                wide::emit(e, f, call, addr, range, &ep);
            } else if piece == Piece::Pack {
                let scratch = plan.scratch_of(*mm)?;
                matmul::emit_pack(e, g, plan, *mm, (rhs, tb), scratch, range);
            } else {
                let scratch = plan.scratch_of(*mm)?;
                let ep = matmul::epilogue(g, plan, *mm, chain);
                let out = plan.node[grp.result().index()];
                matmul::emit(e, g, plan, *mm, (a, ta), scratch, range, (out, &ep));
            }
        }
        fuse::Group::Updates(ids) => kernels::updates(e, g, plan, ids, range, adam)?,
        fuse::Group::GradNorm(_) => clip::emit(e, g, plan, range)?,
        fuse::Group::Chain(ids) => kernels::chain(e, g, plan, ids, range)?,
        fuse::Group::LossPair { loss, grad, chain } => kernels::loss_pair(e, g, plan, *loss, *grad, chain)?,
        fuse::Group::Single(id) => match piece {
            Piece::Part { family, k, .. } => {
                let scratch = family_scratch(g, plan, *id)?;
                let emit = family::FAMILIES[family].emit;
                emit(e, g, plan, *id, k, scratch, range, core)?;
            }
            _ => kernels::emit(e, g, plan, *id, range)?,
        },
    }
    Ok(())
}

/// The full-width Adam update's call of every update node that can take it: Adam or AdamW,
/// unclipped or clipped by norm.
fn adam_calls(g: &Graph, plan: &plan::Plan) -> Result<Vec<(NodeId, Box<elementwise::AdamCall>)>, String> {
    let mut out = Vec::new();
    for id in g.ids() {
        let Op::Update { f, clip, param, grad } = g.node(id).op else { continue };
        let OptimizerFn::Adam { b1, b2, eps, weight_decay, decoupled, .. } = f else { continue };
        if matches!(clip, crate::ir::Clip::Value(_)) {
            continue;
        }
        let slots = &plan.slots[param.index()];
        let scalars =
            plan.update_scalars.iter().find(|s| s.0 == id).map(|s| s.1).ok_or("update without scalars")?;
        let (Some(&m), Some(&v)) = (slots.first(), slots.get(1)) else { continue };
        let call = elementwise::AdamCall {
            n: g.params[param.index()].shape.iter().product(),
            param: plan.param[param.index()],
            grad: plan.node[grad.index()],
            m,
            v,
            scalars,
            b1,
            b2,
            eps,
            weight_decay,
            decoupled,
            clip_norm: matches!(clip, crate::ir::Clip::Norm(_)),
        };
        // Offsets are bytes; the scalars are f32 at `scalars`, as the kernels read them.
        if call.extent() > plan.size {
            return Err(format!("the Adam update of %{} reaches past the arena", id.0));
        }
        out.push((id, Box::new(call)));
    }
    Ok(out)
}

/// Work units `lo..hi` of a kernel ranges over, and its rough work (multiply-adds where it
/// computes a product), deciding whether splitting it across threads pays.
fn kernel_units(g: &Graph, grp: &fuse::Group, piece: Piece, call: Option<&wide::Call>) -> (usize, usize) {
    let head = grp.head();
    match (grp, piece) {
        (fuse::Group::MatMul { mm, .. }, Piece::Main) if call.is_some() => {
            let units = call.map_or(1, wide::Call::unit_count);
            (units, matmul::dims(g, *mm).map_or(0, |(m, n, k)| m * n * k))
        }
        (fuse::Group::MatMul { mm, .. }, Piece::Pack) => {
            matmul::dims(g, *mm).map_or((1, 0), |(_, n, k)| matmul::pack_units(k, n))
        }
        (_, Piece::Pack) => (1, 0),
        (_, Piece::Part { family, k, .. }) => (family::FAMILIES[family].units)(g, head, k, call),
        (fuse::Group::Updates(ids), _) => {
            ids.iter().map(|&id| kernels::units(g, id)).fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1))
        }
        (fuse::Group::GradNorm(_), _) => (clip::chunks(g), 2 * clip::chunks(g) * kernels::CHUNK),
        _ => kernels::units(g, head),
    }
}

/// Where a family's node has its scratch (0 when it needs none): an error if it needs some and
/// the plan has none. (A node that needs scratch without the wide core needs some with it.)
fn family_scratch(g: &Graph, plan: &plan::Plan, id: NodeId) -> Result<usize, String> {
    if scratch_bytes(g, id, (false, false)) > 0 { plan.scratch_of(id) } else { Ok(0) }
}

/// Bytes of a node's scratch: a fused matmul keeps its right operand packed in panels of 8
/// columns (none on the wide core, which packs its operands itself: `wide`); a node of a kernel
/// family what the family says ([`family`]), which may be less when the machine has the wide
/// core (`core`).
fn scratch_bytes(g: &Graph, id: NodeId, (wide, core): (bool, bool)) -> usize {
    match &g.node(id).op {
        Op::MatMul { .. } if wide => 0,
        Op::MatMul { b, tb, .. } => {
            let s = &g.ty(*b).shape;
            let (k, n) = if *tb { (s[1], s[0]) } else { (s[0], s[1]) };
            k * n.div_ceil(8) * 8 * 4
        }
        _ => family::of(g, id).map_or(0, |(f, _)| (family::FAMILIES[f].scratch_bytes)(g, id, core)),
    }
}

/// Every buffer of the plan lies inside the arena.
fn check_plan(g: &Graph, p: &plan::Plan) -> Result<(), String> {
    let fits = |what: &str, off: usize, bytes: usize| {
        if off + bytes <= p.size { Ok(()) } else { Err(format!("memory plan: {what} ends past the arena")) }
    };
    for id in g.ids() {
        if !matches!(g.node(id).op, Op::Update { .. }) {
            fits(&format!("%{}", id.0), p.node[id.index()], g.ty(id).numel() * 4)?;
        }
    }
    for (i, def) in g.params.iter().enumerate() {
        let n = def.shape.iter().product::<usize>() * 4;
        fits(&def.name, p.param[i], n)?;
        for &s in &p.slots[i] {
            fits(&def.name, s, n)?;
        }
    }
    for &(_, off, bytes) in &p.scratch {
        fits("scratch", off, bytes)?;
    }
    fits("rng", p.rng, 16)
}

fn bytemuck_bytes(v: &mut [u64]) -> &mut [u8] {
    let len = std::mem::size_of_val(v);
    // SAFETY: a `[u64]` is `len` initialised bytes with no padding, and u8 has alignment 1; the
    // returned slice borrows `v` mutably, so nothing else can see it meanwhile.
    unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr().cast::<u8>(), len) }
}

fn bytemuck_bytes_ref(v: &[u64]) -> &[u8] {
    let len = std::mem::size_of_val(v);
    // SAFETY: as above, shared.
    unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), len) }
}

/// A kernel's IR text without compiling a program: for `--emit clif`.
pub fn clif_of(g: &Graph) -> Result<Vec<(String, String)>, String> {
    Program::compile(g, Options { keep_clif: true, ..Options::default() }).map(|p| p.clif)
}

/// The kernels a step runs, in order, and the memory plan (`aec compile --emit fused`).
pub fn describe(p: &Program) -> String {
    use std::fmt::Write;
    let g = &p.graph;
    let plan = &p.plan;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "program {}: {} kernels of {} Cranelift instructions, compiled in {:.2} ms{}",
        g.name,
        p.kernels.len(),
        p.insts,
        p.compile_time.as_secs_f64() * 1e3,
        p.wide_isa.map_or(String::new(), |isa| format!("; the wide matmul core runs {isa}"))
    );
    let _ = writeln!(
        out,
        "arena: {} bytes ({} persistent: parameters, optimizer state, inputs, step scalars)",
        plan.size, plan.persistent
    );
    let _ = writeln!(
        out,
        "\nkernels, in order (a fused group computes its ops in one pass and stores only its result;\n\
         %N are the nodes of the graph as compiled: after dead-code elimination and the rewrite of\n\
         switch-map convolutions, so they may differ from `--emit ir`'s):"
    );
    for k in &p.kernels {
        let grp = &p.groups[k.group];
        // Only kernels large enough to split do (see `call_split`).
        let split = if k.units > 1 && k.work >= SPLIT_WORK {
            format!(", split into {} work units", k.units)
        } else {
            String::new()
        };
        match k.piece {
            Piece::Pack => {
                let _ = writeln!(out, "  pack B of %{} into panels", grp.head().0);
                continue;
            }
            Piece::Part { family, k: part, main: false, .. } => {
                let describe = family::FAMILIES[family].describe;
                let _ = writeln!(out, "  {}", describe(g, grp.head(), part, p.calls[k.group].is_some()));
                continue;
            }
            _ => {}
        }
        match grp {
            fuse::Group::Updates(ids) => {
                let full =
                    if k.width == "128-bit" { String::new() } else { format!(" [Adam at {}]", k.width) };
                let _ = writeln!(out, "  update {} parameters{split}{full}", ids.len());
            }
            fuse::Group::GradNorm(ids) => {
                let at = plan.norm_partials.map_or(0, |p| p.0);
                let _ =
                    writeln!(out, "  sum of squares of {} gradients (clip norm) @ {at}{split}", ids.len());
            }
            _ => {
                let ops: Vec<String> =
                    grp.nodes().iter().map(|n| format!("%{} {}", n.0, g.node(*n).op.mnemonic())).collect();
                let r = grp.result();
                let full = p.calls[k.group].as_ref().is_some_and(|c| !c.epilogue.is_empty());
                let gates = p.calls[k.group].as_ref().is_some_and(|c| c.gates.is_some());
                let tiles = p.calls[k.group].as_ref().is_some_and(|c| c.tiles.is_some());
                let on = if tiles { "256-bit register tiles" } else { "the wide core" };
                let core = match (k.wide, full, gates) {
                    (true, _, true) if !tiles => {
                        " [matmul and gates on the wide core, gates at 256 bits]".into()
                    }
                    (true, _, true) => format!(" [matmul on {on}, gates at 256 bits]"),
                    (true, true, false) => format!(" [matmul on {on}, epilogue at 256 bits]"),
                    (true, false, false) => format!(" [matmul on {on}]"),
                    _ if k.width != "128-bit" => " [elementwise at 256 bits]".into(),
                    _ => String::new(),
                };
                let _ = writeln!(
                    out,
                    "  {} -> {} @ {}{split}{core}",
                    ops.join(" + "),
                    g.ty(r),
                    plan.node[r.index()]
                );
            }
        }
    }
    let _ = writeln!(out, "\nparameters:");
    for (i, d) in g.params.iter().enumerate() {
        let slots: Vec<String> = plan.slots[i].iter().map(usize::to_string).collect();
        let _ =
            writeln!(out, "  {:<24} @ {:<8} optimizer state @ [{}]", d.name, plan.param[i], slots.join(", "));
    }
    let _ = writeln!(out, "\ninputs:");
    for (i, d) in g.inputs.iter().enumerate() {
        let _ = writeln!(out, "  {:<24} @ {}", d.name, plan.input[i]);
    }
    let _ = writeln!(out, "\ntemporaries (offset, bytes, live from node to node):");
    for (id, off, bytes, first, last) in &plan.temporaries {
        let _ = writeln!(out, "  %{:<5} @ {:<8} {:>8} B  live {first}..{last}", id.0, off, bytes);
    }
    let total: usize = plan.temporaries.iter().map(|t| t.2).sum();
    let _ = writeln!(
        out,
        "\n{} B of temporaries share {} B through liveness",
        total,
        plan.size - plan.persistent
    );
    out
}
