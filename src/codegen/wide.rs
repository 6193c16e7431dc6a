//! The wide matmul core: `C = op(A)·op(B)` at the machine's widest vectors.
//!
//! Cranelift 0.135 has only 128-bit vectors, so its micro-kernel ([`super::matmul`]) tops out at
//! the 128-bit FMA peak. Large matmuls instead call [`aec_gemm`] from the generated kernel: the
//! `gemm-f32` crate's AVX-512 or AVX2+FMA kernels, picked by run-time CPU detection (built with
//! its `x86-v4` feature, no rayon). The generated kernel keeps everything else: it calls the core on
//! one work unit (a fixed group of C's columns, or of its rows), then applies the fused epilogue
//! (bias, activation, activation derivative, …) to that unit while it is in cache. Units are
//! fixed by the shapes, never by the thread count, so results are the same for any `--threads`.
//!
//! The one narrow interface is [`Call`] (sizes, arena offsets, strides), which the program owns
//! at a stable address for as long as its code can run, and [`aec_gemm`].

use super::emit::{Emit, EpOp, apply_ops};
use super::patches::{Patches, Role};
use cranelift_codegen::ir::types::{F32, F32X4};
use cranelift_codegen::ir::{FuncRef, InstBuilder, Type, Value};
use gemm_common::Parallelism;

/// The wide core as a kernel sees it: the imported [`aec_gemm`], a call and the call's address.
pub type Core<'a> = (FuncRef, &'a Call, i64);

/// Which kernels a program's matmuls run on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum MatmulPath {
    /// The wide core for every matmul large enough to pay, when the CPU has AVX2+FMA or
    /// AVX-512; Cranelift's 128-bit kernel otherwise.
    #[default]
    Auto,
    /// The gemm crate's kernels for every matmul the wide core takes: not aec's register
    /// tiles for small products ([`super::tiles`]), for comparing the two.
    Gemm,
    /// Cranelift's 128-bit kernel for every matmul.
    Cranelift,
}

impl MatmulPath {
    /// The path `AEC_MATMUL` asks for: `auto` (or unset), `gemm` or `cranelift`.
    pub fn from_env() -> Result<MatmulPath, String> {
        match std::env::var("AEC_MATMUL").as_deref() {
            Err(_) | Ok("auto") | Ok("") => Ok(MatmulPath::Auto),
            Ok("gemm") => Ok(MatmulPath::Gemm),
            Ok("cranelift") => Ok(MatmulPath::Cranelift),
            Ok(other) => Err(format!("AEC_MATMUL={other}: expected `auto`, `gemm` or `cranelift`")),
        }
    }
}

/// What a kernel family's call into the wide core may use besides the gemm crate's kernels.
#[derive(Clone, Copy, Debug, Default)]
pub struct Extras {
    /// The full-width elementwise primitives ([`super::elementwise`]): epilogues and gates.
    pub full_width: bool,
    /// aec's register tiles for small products ([`super::tiles`]): a recurrent step's,
    /// attention's.
    pub tiles: bool,
}

/// The instruction set the wide core runs with on this machine, or `None` when it would not
/// beat Cranelift's 128-bit kernel (no AVX2+FMA).
pub fn isa() -> Option<&'static str> {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            return Some("AVX-512");
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            return Some("AVX2+FMA");
        }
    }
    None
}

/// Multiply-adds from which a matmul runs on the wide core. Measured with `aec bench` on one
/// thread (see the README): digits_mlp trained equally fast with the threshold anywhere from
/// 2¹⁰ to 2¹³ and slower above; 2¹² keeps the smallest matmuls (8-3-8's) on the 128-bit kernel,
/// which fuses its epilogue into its stores and has no call to make.
pub const MIN_WORK: usize = 1 << 12;

/// Whether a matmul of these sizes runs on the wide core.
pub fn worth(m: usize, n: usize, k: usize) -> bool {
    m * n * k >= MIN_WORK && n >= 8 && k >= 8
}

/// C's columns (or rows) per work unit: at most about this many, a multiple of 8, in an even
/// number of units. Every unit reads the whole shared operand again, so that overhead falls
/// as one over the unit: steps alternated in one process on Zen 3 (one and two threads) ran
/// 3–5% faster at 512 than at 128 for bench_mlp784 and bench_unet, and no spec slower; larger
/// units still would leave a machine of many cores too few of them.
const UNIT: usize = 512;

/// Rows per work unit of a recurrent loop's projection over `rows` batch rows: each step's
/// call into the core covers one unit, so the rows a call sees never depend on how threads
/// split the batch. Of 16, 12 and 8, the unit that gives the larger of two threads' shares the
/// fewest rows, the largest unit on a tie: the core's register tiles are six rows, and a
/// product of 12 or 16 rows runs about a fifth faster than one of 8 (bench_gru's shapes,
/// measured on Zen 3).
pub fn row_unit(rows: usize) -> usize {
    let share = |unit: usize| (rows.div_ceil(unit).div_ceil(2) * unit).min(rows);
    [16, 12, 8].into_iter().min_by_key(|&u| (share(u), usize::MAX - u)).unwrap_or(8)
}

/// One matmul on the wide core: `C[M, N] = op(A)·op(B)`, C row-major. Offsets are bytes into
/// the arena; strides are in elements.
#[repr(C)]
#[derive(Clone, Debug, PartialEq)]
pub struct Call {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub a: usize,
    pub a_rs: isize,
    pub a_cs: isize,
    pub b: usize,
    pub b_rs: isize,
    pub b_cs: isize,
    pub c: usize,
    /// Units are groups of C's columns (else of its rows), `unit` of them each but the last.
    pub by_cols: bool,
    pub unit: usize,
    /// A batch of `batch` such products (`batch_matmul`), A, B and C of each this many bytes
    /// after the one before: then each unit is one whole product.
    pub batch: usize,
    pub batch_bytes: [usize; 3],
    /// The fused epilogue when the core applies it itself, at full width
    /// (`elementwise::epilogue_avx2`) right after each unit; empty when the generated kernel
    /// applies it at 128 bits (or there is none).
    pub epilogue: Vec<EpOp>,
    /// A recurrent loop's gates, computed at full width with each unit's projection
    /// ([`super::gates`]): the call's unit argument is then `step · units + unit`.
    pub gates: Option<super::gates::Gates>,
    /// Whether the product runs on aec's 256-bit register tiles ([`super::tiles`]) instead of
    /// the gemm crate, and where they read B.
    pub tiles: Option<TileB>,
    /// A convolution's patches ([`super::patches`]), when B (or Bᵀ, as the role says) is
    /// im2col of its input computed per unit instead of read from the arena.
    pub patches: Option<(Patches, Role)>,
}

/// Where the register tiles read a call's B.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TileB {
    /// Packed in panels of 8 columns by the kernel before (`matmul::pack_b`): a recurrent
    /// loop's `W_hh`, packed once per loop.
    Panels,
    /// As its strides say; packed per call when stored transposed.
    AsStored,
}

impl Call {
    /// A: `[M, K]` at byte offset `a`, or `[K, M]` when `ta`; B: `[K, N]`, or `[N, K]` when
    /// `tb`; C: `[M, N]`.
    pub fn new(
        (m, n, k): (usize, usize, usize),
        (a, ta): (usize, bool),
        (b, tb): (usize, bool),
        c: usize,
    ) -> Call {
        let (a_rs, a_cs) = if ta { (1, m as isize) } else { (k as isize, 1) };
        let (b_rs, b_cs) = if tb { (1, k as isize) } else { (n as isize, 1) };
        // Split the longer side of C: each unit then shares the other operand, which is the
        // smaller one to pack again per unit.
        let by_cols = n >= m;
        let side = if by_cols { n } else { m };
        // An even number of units, so that two threads get the same share.
        let units = side.div_ceil(UNIT).next_multiple_of(2);
        let unit = side.div_ceil(units).next_multiple_of(8).min(side);
        Call {
            m,
            n,
            k,
            a,
            a_rs,
            a_cs,
            b,
            b_rs,
            b_cs,
            c,
            by_cols,
            unit,
            batch: 1,
            batch_bytes: [0; 3],
            epilogue: Vec::new(),
            gates: None,
            tiles: None,
            patches: None,
        }
    }

    /// `batch` products of the sizes `Call::new` takes, the operands of each stored after the
    /// one before; one unit per product.
    pub fn batched(
        batch: usize,
        (m, n, k): (usize, usize, usize),
        (a, ta): (usize, bool),
        (b, tb): (usize, bool),
        c: usize,
    ) -> Call {
        let one = Call::new((m, n, k), (a, ta), (b, tb), c);
        let side = one.side();
        Call { batch, batch_bytes: [4 * m * k, 4 * k * n, 4 * m * n], unit: side, ..one }
    }

    fn side(&self) -> usize {
        if self.by_cols { self.n } else { self.m }
    }

    /// A call split into units of [`row_unit`] rows: a recurrent loop's per-step projection,
    /// whose threads take whole units of batch rows.
    pub fn rows(
        (m, n, k): (usize, usize, usize),
        (a, ta): (usize, bool),
        (b, tb): (usize, bool),
        c: usize,
    ) -> Call {
        Call { by_cols: false, unit: row_unit(m), ..Call::new((m, n, k), (a, ta), (b, tb), c) }
    }

    /// Whole units, and the size of the partial last one (0 when there is none).
    pub fn units(&self) -> (usize, usize) {
        if self.batch > 1 {
            return (self.batch, 0);
        }
        (self.side() / self.unit, self.side() % self.unit)
    }

    /// Work units in all.
    pub fn unit_count(&self) -> usize {
        if self.batch > 1 {
            return self.batch;
        }
        self.side().div_ceil(self.unit)
    }

    /// One past the last byte of the arena the call reads or writes.
    pub fn extent(&self) -> usize {
        let last = |off: usize, rows: usize, rs: isize, cols: usize, cs: isize| {
            off + 4 * ((rows - 1) * rs.unsigned_abs() + (cols - 1) * cs.unsigned_abs() + 1)
        };
        let later = |i: usize| self.batch.saturating_sub(1) * self.batch_bytes[i];
        let a = last(self.a, self.m, self.a_rs, self.k, self.a_cs) + later(0);
        let b = if let Some((p, _)) = &self.patches {
            p.extent()
        } else if self.tiles == Some(TileB::Panels) {
            self.b + super::matmul::packed_bytes(self.k, self.n)
        } else {
            last(self.b, self.k, self.b_rs, self.n, self.b_cs) + later(1)
        };
        let c = last(self.c, self.m, self.n as isize, self.n, 1) + later(2);
        // The epilogue's operands: a bias along C's columns, other buffers of C's shape.
        let ep = self.epilogue.iter().map(|op| match *op {
            EpOp::Bias(off) => off + 4 * self.n,
            EpOp::ActGrad(_, off) | EpOp::Binary(_, off, _) => off + 4 * self.m * self.n,
            EpOp::Unary(_) | EpOp::Scale(_) => 0,
        });
        let gates = self.gates.as_ref().map_or(0, super::gates::Gates::extent);
        ep.fold(a.max(b).max(c).max(gates), usize::max)
    }

    /// Rows `r0..r0 + rows` and columns `c0..c0 + cols` of C that unit `u` computes (the whole
    /// product of a batch's unit).
    fn block(&self, u: usize) -> (usize, usize, usize, usize) {
        if self.batch > 1 {
            return if u < self.batch { (0, self.m, 0, self.n) } else { (0, 0, 0, 0) };
        }
        let start = u * self.unit;
        let len = self.unit.min(self.side().saturating_sub(start));
        if self.by_cols { (0, self.m, start, len) } else { (start, len, 0, self.n) }
    }
}

/// Computes work unit `unit` of `*call` on the arena at `base`. Called by generated code only.
///
/// # Safety
/// `call` points at a live [`Call`] whose [`Call::extent`] fits in the arena at `base`, and no
/// other thread writes C's block of unit `unit` meanwhile.
pub(super) unsafe extern "C" fn aec_gemm(base: *mut u8, call: *const Call, unit: i64) {
    // SAFETY: `call` is the address of a `Call` that the program owns, boxed, for as long as
    // its generated code exists; the kernels only read it.
    let c = unsafe { &*call };
    let unit = unit.max(0) as usize;
    let Some(gates) = &c.gates else {
        // SAFETY: as this function's caller promises.
        unsafe { product(base, c, unit) };
        return;
    };
    // A recurrent step: the unit and the step, the gates before the product or after it.
    let count = c.unit_count();
    let (step, unit) = (unit / count, unit % count);
    let (r0, rows, _, _) = c.block(unit);
    if step >= gates.t || rows == 0 {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `Program::compile` checked `c.extent()`, which covers the gates' buffers, and
    // sets `gates` only where the CPU has AVX2 and FMA; the unit's rows are this call's alone.
    unsafe {
        if gates.before_projection() {
            super::gates::step_avx2(base, gates, (r0, rows), step);
            product(base, c, unit);
        } else {
            product(base, c, unit);
            super::gates::step_avx2(base, gates, (r0, rows), step);
        }
    }
}

/// Work unit `unit` of `*c`'s product, then its full-width epilogue if it has one.
///
/// # Safety
/// As [`aec_gemm`]'s.
unsafe fn product(base: *mut u8, c: &Call, unit: usize) {
    let (r0, rows, c0, cols) = c.block(unit);
    if rows == 0 || cols == 0 {
        return;
    }
    // A batch's unit is its product: the operands one product on per unit.
    let [da, db, dc] = if c.batch > 1 { c.batch_bytes.map(|bytes| bytes * unit) } else { [0; 3] };
    // SAFETY: `Program::compile` checked `c.extent()` against the arena, so every element of
    // A, B and C that these sizes and strides reach lies inside it; units cover disjoint
    // blocks of C, so threads running different units never write the same element, and
    // nothing else runs while a kernel does. The element offsets are within those bounds.
    unsafe {
        let a = (base.add(c.a + da) as *const f32).offset(r0 as isize * c.a_rs);
        let b = (base.add(c.b + db) as *const f32).offset(c0 as isize * c.b_cs);
        let dst = (base.add(c.c + dc) as *mut f32).add(r0 * c.n + c0);
        match (&c.patches, c.tiles) {
            (Some((p, role)), _) => {
                // The convolution's input, inside `c.extent()` as well.
                let input = std::slice::from_raw_parts(base.add(p.x) as *const f32, (p.extent() - p.x) / 4);
                match role {
                    Role::Columns => p.with(input, (0, p.rows()), (c0, cols), |b, stride| {
                        gemm(c, (rows, cols, c.k), a, (b.as_ptr(), stride as isize, 1), dst, false)
                    }),
                    // The unit's rows of patches, a chunk of positions (the depth) at a time,
                    // each chunk's product added to the last.
                    Role::Depth => {
                        let (n, chunk) = (p.positions(), Patches::depth_chunk(cols));
                        for (i, k0) in (0..n).step_by(chunk).enumerate() {
                            let kc = chunk.min(n - k0);
                            let a = a.offset(k0 as isize * c.a_cs);
                            p.with(input, (c0, c0 + cols), (k0, kc), |b, stride| {
                                gemm(c, (rows, cols, kc), a, (b.as_ptr(), 1, stride as isize), dst, i > 0)
                            });
                        }
                    }
                }
            }
            #[cfg(target_arch = "x86_64")]
            (None, Some(layout)) => tiled(c, layout, (rows, cols), a, b, dst),
            _ => gemm(c, (rows, cols, c.k), a, (b, c.b_rs, c.b_cs), dst, false),
        }
        // The fused epilogue on the unit's block while it is in cache, at full width: its
        // operands are inside `c.extent()` too, and `Program::compile` sets it only where the
        // CPU has AVX2 and FMA (`ElementwisePath::isa`).
        #[cfg(target_arch = "x86_64")]
        if !c.epilogue.is_empty() {
            super::elementwise::epilogue_avx2(base, (c.c + dc, c.n), (r0, rows, c0, cols), &c.epilogue);
        }
    }
}

/// aec's register tiles on a `rows × cols` block of C (`dst` its first element), A and B at
/// their first row and column of the block, B read as `layout` says.
///
/// # Safety
/// As [`product`]'s, for the block; `Program::compile` sets `tiles` only where the CPU has
/// AVX2 and FMA (`tiles::fit`), and B packed in the panels `extent` counts where it says so.
#[cfg(target_arch = "x86_64")]
unsafe fn tiled(
    c: &Call,
    layout: TileB,
    (rows, cols): (usize, usize),
    a: *const f32,
    b: *const f32,
    dst: *mut f32,
) {
    use super::tiles::{BRows, pack, product_avx2};
    let (a, sizes) = ((a, c.a_rs, c.a_cs), (rows, cols, c.k));
    // SAFETY: as this function's caller promises.
    unsafe {
        match layout {
            TileB::Panels => product_avx2(sizes, a, BRows::Panels(b), (dst, c.n)),
            TileB::AsStored if c.b_cs == 1 => {
                product_avx2(sizes, a, BRows::RowMajor(b, c.b_rs as usize), (dst, c.n))
            }
            TileB::AsStored => {
                let packed = pack(b, (c.b_rs, c.b_cs), (c.k, cols));
                product_avx2(sizes, a, BRows::Panels(packed.as_ptr()), (dst, c.n))
            }
        }
    }
}

/// The gemm crate's kernel on a `rows × cols` block of C (`dst` its first element) over depth
/// `k`, A at its first row and column of the block, B there with its row and column strides;
/// the product added to C when `accumulate`, else stored.
///
/// # Safety
/// As [`product`]'s, for the block.
unsafe fn gemm(
    c: &Call,
    (rows, cols, k): (usize, usize, usize),
    a: *const f32,
    (b, b_rs, b_cs): (*const f32, isize, isize),
    dst: *mut f32,
    accumulate: bool,
) {
    let alpha = if accumulate { 1.0 } else { 0.0 };
    // SAFETY: as this function's caller promises.
    unsafe {
        let kernel = gemm_f32::gemm::f32::get_gemm_fn();
        // The kernels want a column-major destination: C = A·B with C row-major is computed as
        // Cᵀ = Bᵀ·Aᵀ, column-major (what the `gemm` facade does). The crate packs its left
        // operand, Bᵀ then, one element at a time when B is stored transposed; when B is also
        // at least four times wider than A is tall (a convolution's weight gradient: 16 rows
        // of the output gradient against 432 columns of im2col, both along the 50,176
        // positions), C = A·B is computed as it stands, and only the few rows of A are packed
        // that way, B read as stored.
        if c.n > 1 && !(b_rs == 1 && b_cs != 1 && 4 * rows <= cols) {
            kernel(
                cols,
                rows,
                k,
                dst,
                c.n as isize,
                1,
                accumulate,
                b,
                b_rs,
                b_cs,
                a,
                c.a_rs,
                c.a_cs,
                alpha,
                1.0,
                false,
                false,
                false,
                Parallelism::None,
            );
        } else {
            kernel(
                rows,
                cols,
                k,
                dst,
                1,
                c.n as isize,
                accumulate,
                a,
                c.a_cs,
                c.a_rs,
                b,
                b_cs,
                b_rs,
                alpha,
                1.0,
                false,
                false,
                false,
                Parallelism::None,
            );
        }
    }
}

/// The compute kernel of a wide matmul over its units `lo..hi`: per unit, the call into the
/// core, then the epilogue over the unit's block of C.
pub fn emit(
    e: &mut Emit,
    core: FuncRef,
    call: &Call,
    call_addr: i64,
    (lo, hi): (Value, Value),
    epilogue: &[EpOp],
) {
    let (full, rest) = call.units();
    let one = |e: &mut Emit, u: Value, len: usize| {
        let addr = e.i64(call_addr);
        e.b.ins().call(core, &[e.base, addr, u]);
        if epilogue.is_empty() {
            return;
        }
        let start = e.imul_imm(u, call.unit as i64);
        let zero = e.i64(0);
        if call.by_cols {
            let m = e.i64(call.m as i64);
            block_epilogue(e, (call.c, call.n), (zero, m), (start, len), epilogue, true);
        } else {
            let end = e.iadd_imm(start, len as i64);
            block_epilogue(e, (call.c, call.n), (start, end), (zero, call.n), epilogue, true);
        }
    };
    let mut whole = |e: &mut Emit, u: Value| one(e, u, call.unit);
    let mut partial = |e: &mut Emit| {
        let u = e.i64(full as i64);
        one(e, u, rest);
    };
    e.units((lo, hi), full, rest > 0, &mut whole, &mut partial);
}

/// The row units `lo..hi` of a call split by rows (a recurrent loop's share of the batch, in
/// [`row_unit`]s): per unit the call into the core, then the epilogue over its rows. `stable`:
/// the epilogue's operands do not change while the kernel runs (false in a time loop).
pub fn emit_row_units(
    e: &mut Emit,
    core: FuncRef,
    (call, call_addr): (&Call, i64),
    (lo, hi): (Value, Value),
    epilogue: &[EpOp],
    stable: bool,
) {
    let count = e.i64(call.unit_count() as i64);
    let end = e.b.ins().smin(hi, count);
    e.for_dynamic(lo, end, |e, u| {
        let addr = e.i64(call_addr);
        e.b.ins().call(core, &[e.base, addr, u]);
        if !epilogue.is_empty() {
            let r0 = e.imul_imm(u, call.unit as i64);
            let r1 = e.iadd_imm(r0, call.unit as i64);
            let m = e.i64(call.m as i64);
            let r1 = e.b.ins().smin(r1, m);
            let zero = e.i64(0);
            block_epilogue(e, (call.c, call.n), (r0, r1), (zero, call.n), epilogue, stable);
        }
    });
}

/// Applies `ops` in place to rows `r0..r1` and columns `c0..c0 + cols` of the row-major
/// `[_, n]` result at `out`: four columns at a time, then the tail.
fn block_epilogue(
    e: &mut Emit,
    (out, n): (usize, usize),
    (r0, r1): (Value, Value),
    (c0, cols): (Value, usize),
    ops: &[EpOp],
    stable: bool,
) {
    e.for_dynamic(r0, r1, |e, row| {
        let row = e.imul_imm(row, n as i64);
        let at = e.iadd(row, c0);
        let one = |e: &mut Emit, ty: Type, j: Value| {
            let idx = e.iadd(at, j);
            let col = e.iadd(c0, j);
            let v = e.load(ty, out, idx);
            let v = apply_ops(e, ty, ops, v, idx, Some(col), stable);
            e.store(out, idx, v);
        };
        e.for_range(0, (cols / 4 * 4) as i64, 4, |e, j| one(e, F32X4, j));
        for j in cols / 4 * 4..cols {
            let j = e.i64(j as i64);
            one(e, F32, j);
        }
    });
}

/// The register-only FMA peak of one core, in GFLOP/s, per vector width this CPU runs: twelve
/// independent accumulators, about 20 ms each (measured at run time: a constant from one
/// machine is wrong on the next, and clocks move between hours).
pub fn fma_peaks() -> Vec<(&'static str, f64)> {
    let mut out = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        let rate = |lanes: usize, f: &dyn Fn(u64) -> f32| {
            let n = 2_000_000u64;
            let mut best = f64::MAX;
            for _ in 0..3 {
                let t = std::time::Instant::now();
                // `n` opaque after the clock is read: a pure loop on a constant could otherwise be
                // hoisted out of the timed region (a release build measured 9.6 million GFLOP/s).
                std::hint::black_box(f(std::hint::black_box(n)));
                best = best.min(t.elapsed().as_secs_f64());
            }
            (n * 12 * lanes as u64 * 2) as f64 / best.max(1e-9) / 1e9
        };
        if has!("avx512f") {
            // SAFETY: the CPU has AVX-512F (checked just above).
            out.push(("512-bit", rate(16, &|n| unsafe { peak::avx512(n) })));
        }
        if has!("avx2") && has!("fma") {
            // SAFETY: the CPU has AVX2 and FMA (checked just above).
            out.push(("256-bit", rate(8, &|n| unsafe { peak::avx2(n) })));
            // SAFETY: as above; 128-bit FMA is part of the FMA extension.
            out.push(("128-bit", rate(4, &|n| unsafe { peak::sse_fma(n) })));
        }
    }
    out
}

#[cfg(target_arch = "x86_64")]
mod peak {
    use std::arch::x86_64::*;

    /// `$name(n)`: `n` rounds of twelve independent FMAs of `$lanes`-float vectors, enabled by
    /// `$features`; returns their lanes' sum (so the loop is not optimized away).
    macro_rules! fma_loop {
        ($name:ident, $features:literal, $lanes:literal, $set1:ident, $zero:ident, $fma:ident, $store:ident) => {
            #[target_feature(enable = $features)]
            pub unsafe fn $name(n: u64) -> f32 {
                let (a, b) = ($set1(1.000_000_1), $set1(0.999_999_9));
                let mut acc = [$zero(); 12];
                for _ in 0..n {
                    for r in acc.iter_mut() {
                        *r = $fma(a, b, *r);
                    }
                }
                let mut lanes = [0f32; $lanes];
                let mut sum = 0.0;
                for r in acc {
                    // SAFETY: `lanes` holds as many floats as the store writes.
                    unsafe { $store(lanes.as_mut_ptr(), r) };
                    sum += lanes.iter().sum::<f32>();
                }
                sum
            }
        };
    }

    fma_loop!(avx512, "avx512f", 16, _mm512_set1_ps, _mm512_setzero_ps, _mm512_fmadd_ps, _mm512_storeu_ps);
    fma_loop!(avx2, "avx2,fma", 8, _mm256_set1_ps, _mm256_setzero_ps, _mm256_fmadd_ps, _mm256_storeu_ps);
    // 128 bits: the width Cranelift's kernels use.
    fma_loop!(sse_fma, "avx2,fma", 4, _mm_set1_ps, _mm_setzero_ps, _mm_fmadd_ps, _mm_storeu_ps);
}
