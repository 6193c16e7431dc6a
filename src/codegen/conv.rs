//! Convolutions on the matmul core (`matmul::emit_mm`), each op in up to three kernels: a *prep*
//! kernel that lays out the matmul's operands, the *compute* kernel that splits across threads
//! by rows, and a *finish* kernel that puts the result in its layout.
//!
//! With `N = B·OH·OW` output positions and `CKK = Cin·K·K`:
//! - conv2d: `T[Cout, N] = W[Cout, CKK] · im2col(x)[CKK, N]`, then `T` permuted to NCHW;
//!   im2col is written straight into the packed panels.
//! - conv_transpose2d (also the input gradient of conv2d): `T[Cout·K·K, B·H·W] = Wᵀ · x'`, with
//!   `x'` the input as `[Cin, B·H·W]` and `W` stored `[Cin, Cout·K·K]`; then col2im adds every
//!   column of `T` into the output window it came from.
//! - conv2d's weight gradient: `dWᵀ[CKK, Cout] = im2col(x)[CKK, N] · dy'ᵀ[N, Cout]`, im2col
//!   row-major (contiguous copies) and `dy'ᵀ` packed by channels, `dWᵀ` stored transposed
//!   (two kernels, no finish); the transposed convolution's weight gradient is the same with
//!   input and output gradient swapped.
//!
//! The large preps and finishes split across threads (by input channel, panel or image).

use super::emit::Emit;
use super::family::{Family, Parts};
use super::matmul::{self, Mm};
use super::patches::{Patches, Role};
use super::plan::Plan;
use super::sparse;
use super::wide::{self, Call};
use crate::ir::{Graph, NodeId, Op};
use cranelift_codegen::ir::condcodes::IntCC;
use cranelift_codegen::ir::types::{F32, F32X4};
use cranelift_codegen::ir::{InstBuilder, Type, Value};

/// The convolution family: dense convolutions and their gradients (prep: im2col or packing;
/// compute: the matmul, on the wide core for a large conv2d; finish: col2im, or the permute
/// into NCHW) and the switch-map convolutions of [`sparse`] (prep, compute).
pub const FAMILY: Family = Family {
    parts: family_parts,
    scratch_bytes,
    wide_call,
    units: family_units,
    emit,
    describe: family_describe,
};

/// The kernels of one op, in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    Prep,
    Compute,
    Finish,
}

/// Parts by their index in [`FAMILY`]'s lists.
const PARTS: [Part; 3] = [Part::Prep, Part::Compute, Part::Finish];

fn family_parts(g: &Graph, id: NodeId) -> Option<Parts> {
    let (parts, _, _) = parts(g, id)?;
    let names: &'static [&'static str] =
        if parts.len() == 3 { &["prep", "compute", "finish"] } else { &["prep", "compute"] };
    Some(Parts { names, main: 1 })
}

fn family_units(g: &Graph, id: NodeId, k: usize, call: Option<&Call>) -> (usize, usize) {
    match PARTS[k] {
        Part::Prep => prep_units(g, id, call),
        Part::Compute => {
            let (units, work) = parts(g, id).map_or((1, 0), |(_, units, work)| (units, work));
            (call.map_or(units, Call::unit_count), work)
        }
        Part::Finish => finish_units(g, id),
    }
}

fn family_describe(g: &Graph, id: NodeId, k: usize, wide: bool) -> String {
    let op = &g.node(id).op;
    match PARTS[k] {
        Part::Finish => format!("finish %{} (into NCHW)", id.0),
        _ => {
            let patched = on_patches(g, id);
            let what = match (wide, patched) {
                (true, true) => {
                    "the output gradient row-major, for the wide core, which writes im2col per unit"
                }
                (true, false) => "im2col row-major, for the wide core",
                (false, _) => prep_text(op),
            };
            format!("prepare %{} {} ({what})", id.0, op.mnemonic())
        }
    }
}

/// A convolution's geometry, seen as conv2d: input `[b, ci, h, w]`, kernel, stride and padding
/// per axis (`[height, width]`), output `[b, co, oh, ow]`.
#[derive(Clone, Copy, Debug)]
struct Geom {
    b: usize,
    ci: usize,
    h: usize,
    w: usize,
    co: usize,
    k: [usize; 2],
    s: [usize; 2],
    p: [usize; 2],
    oh: usize,
    ow: usize,
}

impl Geom {
    fn of(input: &[usize], output: &[usize], k: [usize; 2], s: [usize; 2], p: [usize; 2]) -> Geom {
        Geom {
            b: input[0],
            ci: input[1],
            h: input[2],
            w: input[3],
            co: output[1],
            k,
            s,
            p,
            oh: output[2],
            ow: output[3],
        }
    }
    fn n(&self) -> usize {
        self.b * self.oh * self.ow
    }
    /// The patches of this convolution (seen as conv2d) whose input is at byte offset `x`.
    fn patches(&self, x: usize) -> Patches {
        let ge = *self;
        Patches { x, b: ge.b, ci: ge.ci, h: ge.h, w: ge.w, k: ge.k, s: ge.s, p: ge.p, oh: ge.oh, ow: ge.ow }
    }
    fn kk(&self) -> usize {
        self.k[0] * self.k[1]
    }
    fn ckk(&self) -> usize {
        self.ci * self.kk()
    }
}

/// What the op computes as a matmul, and its scratch: (M, N, K, packed bytes, temp floats).
fn shape(g: &Graph, id: NodeId) -> Option<(Geom, usize, usize, usize, usize)> {
    let sh = |n: NodeId| g.ty(n).shape.clone();
    let out = &g.ty(id).shape;
    match g.node(id).op {
        Op::Conv2d { x, w, stride, pad } => {
            let ge = Geom::of(&sh(x), out, [sh(w)[2], sh(w)[3]], stride, pad);
            Some((ge, ge.co, ge.n(), ge.ckk(), ge.co * ge.n()))
        }
        Op::ConvTranspose2d { x, w, stride, pad, .. } => {
            // Seen as the conv2d whose input gradient it is: conv input = this output.
            let ge = Geom::of(out, &sh(x), [sh(w)[2], sh(w)[3]], stride, pad);
            let kk = ge.kk();
            Some((ge, ge.ci * kk, ge.n(), ge.co, ge.ci * kk * ge.n()))
        }
        // dWᵀ [CKK, Cout] = im2col(x) [CKK, N] · dy'ᵀ [N, Cout]; temp holds im2col row-major (at
        // `row_stride` on the wide core).
        Op::Conv2dWeightGrad { x, dy, kernel, stride, pad } => {
            let ge = Geom::of(&sh(x), &sh(dy), kernel, stride, pad);
            Some((ge, ge.ckk(), ge.co, ge.n(), ge.ckk() * row_stride(ge.n())))
        }
        Op::ConvTranspose2dWeightGrad { x, dy, kernel, stride, pad } => {
            // conv2d's weight gradient with dy as the input and x as the output gradient.
            let ge = Geom::of(&sh(dy), &sh(x), kernel, stride, pad);
            Some((ge, ge.ckk(), ge.co, ge.n(), ge.ckk() * row_stride(ge.n())))
        }
        _ => None,
    }
}

/// Bytes of scratch a conv-family node needs (packed panels, then a temporary), `wide` when the
/// wide core is there to take its matmul.
fn scratch_bytes(g: &Graph, id: NodeId, wide: bool) -> usize {
    match regions(g, id, wide && on_patches(g, id)) {
        Some((packed, temp)) => packed + temp,
        None => sparse::scratch_bytes(g, id),
    }
}

fn packed_round(k: usize, n: usize) -> usize {
    matmul::packed_bytes(k, n).div_ceil(64) * 64
}

/// Bytes of node `id`'s two scratch regions, the temporary right after the first: the packed
/// panels, or for a conv2d on the wide core im2col row-major `[K, N]` at [`row_stride`],
/// whichever is larger (a weight gradient's output gradient as `[Cout, N]` fits the panels),
/// then the temporary. When the core writes the patches per unit (`patches`), im2col is never
/// stored: a conv2d's first region is empty, a weight gradient's temporary is.
fn regions(g: &Graph, id: NodeId, patches: bool) -> Option<(usize, usize)> {
    let (ge, _, n, k, temp) = shape(g, id)?;
    let packed = packed_round(k, n);
    Some(match g.node(id).op {
        Op::Conv2d { .. } if patches => (0, 4 * temp),
        Op::Conv2d { .. } => (packed.max((4 * k * row_stride(n)).next_multiple_of(64)), 4 * temp),
        Op::Conv2dWeightGrad { .. } | Op::ConvTranspose2dWeightGrad { .. } if patches => {
            ((4 * ge.co * ge.n()).next_multiple_of(64), 0)
        }
        _ => (packed, 4 * temp),
    })
}

/// The row stride, in floats, of im2col written row-major for the wide core: `n` rounded up to
/// 16 and then to an odd multiple of 16, so that rows start in different sets of the L1 cache.
/// With a stride of a whole number of 4 KiB, as `[_, 64·28·28]` is, every row the core reads
/// at once lands in the same set and a weight gradient ran at half its speed.
fn row_stride(n: usize) -> usize {
    let s = n.next_multiple_of(16);
    if (s / 16).is_multiple_of(2) { s + 16 } else { s }
}

/// Bytes of im2col from which the wide core writes a convolution's patches per unit
/// ([`super::patches`]) instead of a prep kernel writing it whole: below, it stays in the
/// caches between the two kernels, and the prep's loops are faster than the patches' runs
/// (bench_conv28's first convolution, 1.8 MB of im2col: 483 µs a step against 540–640 with
/// patches; its second, 7.2 MB, the same either way; bench_unet's, 43–87 MB, a third faster).
const PATCHES_MIN_BYTES: usize = 4 << 20;

/// Whether the wide core writes this convolution's patches per unit.
fn patched(ge: Geom) -> bool {
    4 * ge.ckk() * ge.n() >= PATCHES_MIN_BYTES
}

/// Whether node `id`, on the wide core, has it write the patches per unit ([`wide_call`]'s
/// choice, which the scratch's size follows).
fn on_patches(g: &Graph, id: NodeId) -> bool {
    let Some((ge, m, n, k, _)) = shape(g, id) else { return false };
    patched(ge)
        && sparse::parts(g, id).is_none()
        && match g.node(id).op {
            Op::Conv2d { .. } => wide::worth(m, n, k),
            Op::Conv2dWeightGrad { .. } | Op::ConvTranspose2dWeightGrad { .. } => {
                wide::worth(ge.co, ge.ckk(), ge.n())
            }
            _ => false,
        }
}

/// A dense conv2d's matmul on the wide core: `T[Cout, N] = W[Cout, CKK] · im2col(x)[CKK, N]`,
/// `T` in the temporary; im2col written row-major by the prep kernel into the packed region
/// (which is at least as large), or when large per unit of output positions by the core
/// itself.
///
/// A weight gradient's: `dW[Cout, CKK] = dy'[Cout, N] · im2col(x)ᵀ`, the output gradient
/// row-major `[Cout, N]` in the packed region; im2col `[CKK, N]` in the temporary, read
/// transposed, or when large written by the core for each unit of CKK a chunk of positions at
/// a time.
fn wide_call(g: &Graph, plan: &Plan, id: NodeId, scratch: usize, _: wide::Extras) -> Option<Call> {
    if sparse::parts(g, id).is_some() {
        return None;
    }
    let (ge, m, n, k, _) = shape(g, id)?;
    let patched = on_patches(g, id);
    let temp = scratch + regions(g, id, patched)?.0;
    let at = |x: NodeId| plan.node[x.index()];
    let stride = row_stride(ge.n()) as isize;
    match g.node(id).op {
        // The patches per unit where `on_patches` says so (the scratch is sized for them).
        Op::Conv2d { x, w, .. } if patched => {
            let patches = ge.patches(at(x));
            let call = Call::new((m, n, k), (at(w), false), (at(x), false), temp);
            let unit = patches.unit();
            Some(Call {
                b_rs: 0,
                b_cs: 0,
                by_cols: true,
                unit,
                patches: Some((patches, Role::Columns)),
                ..call
            })
        }
        Op::Conv2d { w, .. } if wide::worth(m, n, k) => {
            let call = Call::new((m, n, k), (at(w), false), (scratch, false), temp);
            Some(Call { b_rs: stride, ..call })
        }
        Op::Conv2dWeightGrad { x: input, .. } | Op::ConvTranspose2dWeightGrad { dy: input, .. }
            if patched =>
        {
            let patches = ge.patches(at(input));
            let call = Call::new((ge.co, ge.ckk(), ge.n()), (scratch, false), (at(input), true), at(id));
            Some(Call { b_rs: 0, b_cs: 0, patches: Some((patches, Role::Depth)), ..call })
        }
        Op::Conv2dWeightGrad { .. } | Op::ConvTranspose2dWeightGrad { .. }
            if wide::worth(ge.co, ge.ckk(), ge.n()) =>
        {
            let call = Call::new((ge.co, ge.ckk(), ge.n()), (scratch, false), (temp, true), at(id));
            Some(Call { b_cs: stride, ..call })
        }
        _ => None,
    }
}

/// Work units of the prep kernel (input channels of im2col, or images when it writes im2col
/// row-major for the wide core; 1 when it does not split) and its rough work, given the wide
/// core's call if there is one.
fn prep_units(g: &Graph, id: NodeId, call: Option<&Call>) -> (usize, usize) {
    match (shape(g, id), &g.node(id).op) {
        // The core writes each unit's patches itself: no prep.
        (Some(_), Op::Conv2d { .. }) if call.is_some_and(|c| c.patches.is_some()) => (0, 0),
        (Some((ge, ..)), Op::Conv2d { .. }) if call.is_some() => (ge.b, 4 * ge.ckk() * ge.n()),
        (Some((ge, ..)), Op::Conv2d { .. }) => (ge.ci, 4 * ge.ckk() * ge.n()),
        // Images: their im2col columns (unless the core writes the patches) and their rows of
        // the packed output gradient.
        (Some((ge, ..)), Op::Conv2dWeightGrad { .. } | Op::ConvTranspose2dWeightGrad { .. }) => {
            let rows = if call.is_some_and(|c| c.patches.is_some()) { ge.co } else { ge.ckk() + ge.co };
            (ge.b, 4 * rows * ge.n())
        }
        // Panels of the transposed convolution's input.
        (Some((ge, ..)), Op::ConvTranspose2d { .. }) => (ge.n().div_ceil(8), 4 * ge.co * ge.n()),
        _ => sparse::prep_units(g, id),
    }
}

/// Work units of the finish kernel (images: a transposed convolution's col2im, conv2d's
/// permute into NCHW) and its rough work.
fn finish_units(g: &Graph, id: NodeId) -> (usize, usize) {
    match (shape(g, id), &g.node(id).op) {
        (Some((ge, ..)), Op::ConvTranspose2d { .. }) => (ge.b, 4 * ge.ci * ge.kk() * ge.n()),
        (Some((ge, ..)), Op::Conv2d { .. }) => (ge.b, 8 * ge.co * ge.n()),
        _ => (1, 0),
    }
}

/// The parts this op has, and the work units of its compute kernel.
fn parts(g: &Graph, id: NodeId) -> Option<(Vec<Part>, usize, usize)> {
    if let Some((units, work)) = sparse::parts(g, id) {
        return Some((vec![Part::Prep, Part::Compute], units, work));
    }
    let (_, m, n, k, _) = shape(g, id)?;
    let finish = matches!(g.node(id).op, Op::Conv2d { .. } | Op::ConvTranspose2d { .. });
    let mut parts = vec![Part::Prep, Part::Compute];
    if finish {
        parts.push(Part::Finish);
    }
    Some((parts, matmul::units(m, n, k), m * n * k))
}

/// What the prep kernel of `op` does, for `--emit fused`.
fn prep_text(op: &Op) -> &'static str {
    match op {
        Op::SparseConvT { .. } | Op::GatherConv { .. } | Op::SparseWeightGrad { .. } => sparse::prep_text(op),
        _ => "im2col into packed panels",
    }
}

/// Emits part `index` (of [`PARTS`]) of conv-family node `id`; a dense conv2d's matmul on the
/// wide `core` when there is one ([`wide_call`]).
#[allow(clippy::too_many_arguments)]
fn emit(
    e: &mut Emit,
    g: &Graph,
    plan: &Plan,
    id: NodeId,
    index: usize,
    scratch: usize,
    range: (Value, Value),
    core: Option<wide::Core>,
) -> Result<(), String> {
    let part = PARTS[index];
    if sparse::parts(g, id).is_some() {
        return sparse::emit(e, g, plan, id, part == Part::Compute, scratch, range);
    }
    let (ge, m, n, k, _) = shape(g, id).ok_or("not a convolution")?;
    let patches = core.is_some_and(|(_, call, _)| call.patches.is_some());
    let packed = scratch;
    let temp = scratch + regions(g, id, patches).ok_or("not a convolution")?.0;
    let at = |x: NodeId| plan.node[x.index()];
    let out = plan.node[id.index()];
    match (g.node(id).op.clone(), part) {
        (Op::Conv2d { x, .. }, Part::Prep) if wide_prep(core) == Some(true) => {
            let (lo, hi) = range;
            let top = e.i64(ge.b as i64);
            let hi = e.b.ins().smin(hi, top);
            e.for_dynamic(lo, hi, |e, img| im2col_rows(e, ge, at(x), (packed, row_stride(ge.n())), img));
        }
        // The core writes the patches: no prep kernel (`prep_units`).
        (Op::Conv2d { .. }, Part::Prep) if core.is_some() => {}
        (Op::Conv2d { .. }, Part::Compute) if core.is_some() => {
            if let Some((f, call, addr)) = core {
                wide::emit(e, f, call, addr, range, &[]);
            }
        }
        (Op::Conv2d { x, .. }, Part::Prep) => im2col_pack(e, ge, at(x), packed, range),
        (Op::Conv2d { w, .. }, Part::Compute) => {
            let mm =
                Mm { m, n, k, a: at(w), ta: false, packed, c: temp, tc: false, epilogue: &[], stable: true };
            matmul::emit_mm(e, &mm, range);
        }
        (Op::Conv2d { .. }, Part::Finish) => {
            swap_outer_range(e, temp, out, (ge.co, ge.b, ge.oh * ge.ow), range)
        }
        (Op::ConvTranspose2d { x, .. }, Part::Prep) => {
            // x [B, Cin', H', W'] (the conv's output side) as [Cin', B·H'·W'], packed.
            pack_planes(e, at(x), (ge.b, ge.co, ge.oh * ge.ow), packed, range);
        }
        (Op::ConvTranspose2d { w, .. }, Part::Compute) => {
            let mm =
                Mm { m, n, k, a: at(w), ta: true, packed, c: temp, tc: false, epilogue: &[], stable: true };
            matmul::emit_mm(e, &mm, range);
        }
        (Op::ConvTranspose2d { .. }, Part::Finish) => col2im(e, ge, temp, out, range),
        (Op::Conv2dWeightGrad { .. } | Op::ConvTranspose2dWeightGrad { .. }, Part::Compute)
            if core.is_some() =>
        {
            if let Some((f, call, addr)) = core {
                wide::emit(e, f, call, addr, range, &[]);
            }
        }
        (Op::Conv2dWeightGrad { x, dy, .. }, Part::Prep) => {
            weight_grad_prep(e, ge, (at(x), at(dy)), (packed, temp), range, wide_prep(core));
        }
        (Op::ConvTranspose2dWeightGrad { x, dy, .. }, Part::Prep) => {
            weight_grad_prep(e, ge, (at(dy), at(x)), (packed, temp), range, wide_prep(core));
        }
        (Op::Conv2dWeightGrad { .. } | Op::ConvTranspose2dWeightGrad { .. }, Part::Compute) => {
            // dWᵀ [CKK, Cout], stored transposed: dW [Cout, CKK].
            let mm =
                Mm { m, n, k, a: temp, ta: false, packed, c: out, tc: true, epilogue: &[], stable: true };
            matmul::emit_mm(e, &mm, range);
        }
        _ => {}
    }
    Ok(())
}

/// Packs im2col(x) as the matmul's right operand `[CKK, N]` (panels over the output
/// positions), for the input channels `lo..hi` — the work one thread takes. Every element of
/// those channels' rows is written once (a zero in the padding), so threads never touch the
/// same element; the padding lanes of the last panel belong to the range that starts at 0.
/// Nested loops keep every index a running product — no division.
fn im2col_pack(e: &mut Emit, ge: Geom, x: usize, packed: usize, (lo, hi): (Value, Value)) {
    // The packed matrix is [K][N] in panels of 8 along N.
    let (pk, pn) = (ge.ckk(), ge.n());
    if !pn.is_multiple_of(8) {
        let first = e.icmp_imm(IntCC::Equal, lo, 0);
        e.when(first, |e| {
            let last = (pn / 8 * pk * 8) as i64;
            let lanes = (pn % 8) as i64;
            e.for_range(0, pk as i64, 1, |e, kr| {
                let base = e.ishl_imm(kr, 3);
                let base = e.iadd_imm(base, last);
                e.for_range(lanes, 8, 1, |e, l| {
                    let at = e.iadd(base, l);
                    let z = e.fconst(F32, 0.0);
                    e.store(packed, at, z);
                });
            });
        });
    }
    let hi = {
        let top = e.i64(ge.ci as i64);
        e.b.ins().smin(hi, top)
    };
    e.for_dynamic(lo, hi, |e, c| {
        // The kernel's rows are a loop (over every image's rows: unrolled only when they are
        // few), its columns unrolled: the output columns whose input pixel is inside the image
        // are constant ranges, the rows computed once per kernel row; the rest of each row is
        // padding (zeros).
        for_kernel_rows(e, ge, ge.b * ge.oh * ge.ow, |e, kh, (oy0, oy1)| {
            let kh_p = e.iadd_imm(kh, -(ge.p[0] as i64));
            for kw in 0..ge.k[1] {
                let (ox0, ox1) = inside(kw, ge.s[1], ge.p[1], ge.w, ge.ow);
                let r = tap_row(e, ge, c, kh, kw);
                // packed[q/8][r][q%8].
                let rbase = e.ishl_imm(r, 3);
                let put = |e: &mut Emit, q: Value, v: Value| {
                    let jp = e.with_imm(q, 3, |ins, x, c| ins.ushr(x, c));
                    let jl = e.with_imm(q, 7, |ins, x, c| ins.band(x, c));
                    let t = e.imul_imm(jp, (pk * 8) as i64);
                    let t = e.iadd(t, jl);
                    let dst = e.iadd(t, rbase);
                    e.store(packed, dst, v);
                };
                let zeros = |e: &mut Emit, q0: Value, from: usize, to: usize| {
                    e.for_range(from as i64, to as i64, 1, |e, ox| {
                        let q = e.iadd(q0, ox);
                        let z = e.fconst(F32, 0.0);
                        put(e, q, z);
                    });
                };
                e.for_range(0, ge.b as i64, 1, |e, img| {
                    let plane = e.imul_imm(img, ge.ci as i64);
                    let plane = e.iadd(plane, c);
                    let plane = e.imul_imm(plane, (ge.h * ge.w) as i64);
                    let qimg = e.imul_imm(img, (ge.oh * ge.ow) as i64);
                    let outside = |e: &mut Emit, q0: Value| zeros(e, q0, 0, ge.ow);
                    for_tap_rows(e, ge, qimg, (oy0, oy1), outside, |e, oy, q0| {
                        zeros(e, q0, 0, ox0);
                        // x[img, c, oy·s + kh − p, ox·s + kw − p].
                        let src = input_row(e, ge, plane, oy, kh_p, kw);
                        let one = |e: &mut Emit, ox: Value| {
                            let t = e.imul_imm(ox, ge.s[1] as i64);
                            let si = e.iadd(src, t);
                            let v = e.load_ro(F32, x, si);
                            let q = e.iadd(q0, ox);
                            put(e, q, v);
                        };
                        if ge.s[1] != 1 || ox1 - ox0 < 4 {
                            e.for_range(ox0 as i64, ox1 as i64, 1, one);
                        } else {
                            // Four columns q..q+4 with q a multiple of 4 are four lanes of
                            // one panel row: one vector load and store. Single columns
                            // before the first such q and after the last.
                            let start = e.i64(ox0 as i64);
                            let qs = e.iadd_imm(q0, ox0 as i64);
                            let neg = e.b.ins().ineg(qs);
                            let head = e.with_imm(neg, 3, |ins, x, c| ins.band(x, c));
                            let mid = e.iadd(start, head);
                            e.for_dynamic(start, mid, one);
                            let end = e.i64(ox1 as i64);
                            let left = e.b.ins().isub(end, mid);
                            let quads = e.with_imm(left, 2, |ins, x, c| ins.ushr(x, c));
                            let zero = e.i64(0);
                            e.for_dynamic(zero, quads, |e, v| {
                                let t = e.ishl_imm(v, 2);
                                let ox = e.iadd(mid, t);
                                let si = e.iadd(src, ox);
                                let v = e.load_ro(F32X4, x, si);
                                let q = e.iadd(q0, ox);
                                put(e, q, v);
                            });
                            let t = e.ishl_imm(quads, 2);
                            let tail = e.iadd(mid, t);
                            e.for_dynamic(tail, end, one);
                        }
                        zeros(e, q0, ox1, ge.ow);
                    });
                });
            }
        });
    });
}

/// How a convolution's prep kernel serves the wide core: not at all (`None`: Cranelift's
/// kernel), with im2col (`Some(true)`), or without it (`Some(false)`: the core writes the
/// patches; a weight gradient's prep still lays out the output gradient).
fn wide_prep(core: Option<wide::Core>) -> Option<bool> {
    core.map(|(_, call, _)| call.patches.is_none())
}

/// The weight gradient's operands for the images `lo..hi` (the work one thread takes): their
/// rows of the output gradient `dy [B, Cout, HW]` into `packed` — as the right operand `[N,
/// Cout]` in panels for Cranelift's kernel, or for the wide core as `[Cout, N]` row-major (a
/// plane a copy) — and their columns of im2col of `input`, row-major `[CKK, N]`, into `acol`
/// (for the wide core with its rows [`row_stride`] apart, and only when `wide` is
/// `Some(true)`: see [`wide_prep`]).
fn weight_grad_prep(
    e: &mut Emit,
    ge: Geom,
    (input, dy): (usize, usize),
    (packed, acol): (usize, usize),
    (lo, hi): (Value, Value),
    wide: Option<bool>,
) {
    let (hw, n) = (ge.oh * ge.ow, ge.n());
    let top = e.i64(ge.b as i64);
    let hi = e.b.ins().smin(hi, top);
    e.for_dynamic(lo, hi, |e, img| {
        let Some(im2col) = wide else {
            pack_channels(e, dy, (ge.b, ge.co, hw), packed, img);
            im2col_rows(e, ge, input, (acol, n), img);
            return;
        };
        let from = e.imul_imm(img, (ge.co * hw) as i64);
        let to = e.imul_imm(img, hw as i64);
        e.for_range(0, ge.co as i64, 1, |e, c| {
            let src = e.imul_imm(c, hw as i64);
            let src = e.iadd(from, src);
            let dst = e.imul_imm(c, n as i64);
            let dst = e.iadd(to, dst);
            super::kernels::copy(e, dy, src, packed, dst, hw);
        });
        if im2col {
            im2col_rows(e, ge, input, (acol, row_stride(n)), img);
        }
    });
}

/// Image `img`'s columns of im2col(input), row-major `[CKK, N]` at `acol` with rows `stride`
/// floats apart: contiguous copies of input rows, zeros in the padding.
fn im2col_rows(e: &mut Emit, ge: Geom, input: usize, (acol, stride): (usize, usize), img: Value) {
    e.for_range(0, ge.ci as i64, 1, |e, c| {
        // Channel c's input plane and this image's first column, the same for every tap.
        let plane = e.imul_imm(img, ge.ci as i64);
        let plane = e.iadd(plane, c);
        let plane = e.imul_imm(plane, (ge.h * ge.w) as i64);
        let q0 = e.imul_imm(img, (ge.oh * ge.ow) as i64);
        // Kernel rows a loop, kernel columns unrolled, as in `im2col_pack`.
        for_kernel_rows(e, ge, ge.oh * ge.ow, |e, kh, (oy0, oy1)| {
            let kh_p = e.iadd_imm(kh, -(ge.p[0] as i64));
            for kw in 0..ge.k[1] {
                let (ox0, ox1) = inside(kw, ge.s[1], ge.p[1], ge.w, ge.ow);
                let r = tap_row(e, ge, c, kh, kw);
                let row = e.imul_imm(r, stride as i64);
                let fill = |e: &mut Emit, at: Value, from: usize, to: usize| {
                    e.elementwise_in(from, to, |e, ty, ox| {
                        let i = e.iadd(at, ox);
                        let z = e.fconst(ty, 0.0);
                        e.store(acol, i, z);
                    });
                };
                let q = e.iadd(row, q0);
                // Each row inside the image is its padding columns (zeros) around a copy.
                let outside = |e: &mut Emit, dst: Value| fill(e, dst, 0, ge.ow);
                for_tap_rows(e, ge, q, (oy0, oy1), outside, |e, oy, dst| {
                    fill(e, dst, 0, ox0);
                    // x[img, c, oy·s + kh − p, ox·s + kw − p] for ox in ox0..ox1.
                    let src = input_row(e, ge, plane, oy, kh_p, kw);
                    let copy = |e: &mut Emit, ty: Type, ox: Value| {
                        let t = e.imul_imm(ox, ge.s[1] as i64);
                        let si = e.iadd(src, t);
                        let v = e.load_ro(ty, input, si);
                        let di = e.iadd(dst, ox);
                        e.store(acol, di, v);
                    };
                    if ge.s[1] == 1 {
                        e.elementwise_in(ox0, ox1, copy);
                    } else {
                        e.for_range(ox0 as i64, ox1 as i64, 1, |e, ox| copy(e, F32, ox));
                    }
                    fill(e, dst, ox1, ge.ow);
                });
            }
        });
    });
}

/// Packs image `img`'s part of `dy [B, C, HW]` into the matmul's right operand `[B·HW, C]`
/// (panels of 8 channels, zero past channel C).
fn pack_channels(e: &mut Emit, dy: usize, (b, c, hw): (usize, usize, usize), packed: usize, img: Value) {
    let n = b * hw;
    let q0 = e.imul_imm(img, hw as i64);
    let src0 = e.imul_imm(img, (c * hw) as i64);
    // A loop over the whole panels (its code does not grow with the channels), then the last,
    // partial one with its zero lanes.
    let lanes = |e: &mut Emit, jp: Value, l: usize, real: bool| {
        // Channel jp·8 + l: its plane starts at src0 + (jp·8 + l)·HW, its lane at jp·N·8 + l.
        let ch = e.imul_imm(jp, 8);
        let src = e.iadd_imm(ch, l as i64);
        let src = e.imul_imm(src, hw as i64);
        let src = e.iadd(src0, src);
        let dst0 = e.imul_imm(jp, (n * 8) as i64);
        let dst0 = e.iadd_imm(dst0, l as i64);
        e.for_range(0, hw as i64, 1, |e, pos| {
            let q = e.iadd(q0, pos);
            let d = e.ishl_imm(q, 3);
            let d = e.iadd(d, dst0);
            let v = if real {
                let s = e.iadd(src, pos);
                e.load_ro(F32, dy, s)
            } else {
                e.fconst(F32, 0.0)
            };
            e.store(packed, d, v);
        });
    };
    e.for_range(0, (c / 8) as i64, 1, |e, jp| {
        for l in 0..8 {
            lanes(e, jp, l, true);
        }
    });
    if !c.is_multiple_of(8) {
        let jp = e.i64((c / 8) as i64);
        for l in 0..8 {
            lanes(e, jp, l, l < c % 8);
        }
    }
}

/// Packs `x [B, C, HW]` as the matmul's right operand `[C, B·HW]` (panels of 8 columns), for
/// the panels `lo..hi`. A panel inside one image plane is two vector loads per channel; one
/// that straddles two planes, and the last partial one, go lane by lane.
fn pack_planes(
    e: &mut Emit,
    x: usize,
    (b, c, hw): (usize, usize, usize),
    packed: usize,
    range: (Value, Value),
) {
    let n = b * hw;
    // Lane `l` of the panel starting at column j0: x[img, kk, pos] for every channel kk.
    let lane = |e: &mut Emit, dst0: Value, j0: Value, l: usize| {
        let j = e.iadd_imm(j0, l as i64);
        let img = e.with_imm(j, hw as i64, |ins, x, c| ins.udiv(x, c));
        let t = e.imul_imm(img, (c * hw) as i64);
        let t2 = e.imul_imm(img, hw as i64);
        let pos = e.b.ins().isub(j, t2);
        let base = e.iadd(t, pos);
        e.for_range(0, c as i64, 1, |e, kk| {
            let t = e.imul_imm(kk, hw as i64);
            let src = e.iadd(base, t);
            let v = e.load_ro(F32, x, src);
            let d = e.ishl_imm(kk, 3);
            let d = e.iadd(dst0, d);
            e.store(packed + 4 * l, d, v);
        });
    };
    let mut whole = |e: &mut Emit, jp: Value| {
        let dst0 = e.imul_imm(jp, (c * 8) as i64);
        let j0 = e.imul_imm(jp, 8);
        let img = e.with_imm(j0, hw as i64, |ins, x, c| ins.udiv(x, c));
        let t = e.imul_imm(img, hw as i64);
        let pos = e.b.ins().isub(j0, t);
        let end = e.iadd_imm(pos, 8);
        let fits = e.icmp_imm(IntCC::SignedLessThanOrEqual, end, hw as i64);
        let straddles = e.icmp_imm(IntCC::SignedGreaterThan, end, hw as i64);
        e.when(fits, |e| {
            let t = e.imul_imm(img, (c * hw) as i64);
            let base = e.iadd(t, pos);
            matmul::panel_rows(e, (x, base, hw), c, (packed, dst0));
        });
        e.when(straddles, |e| {
            for l in 0..8 {
                lane(e, dst0, j0, l);
            }
        });
    };
    let full = n / 8;
    let mut partial = |e: &mut Emit| {
        let dst0 = e.i64((full * c * 8) as i64);
        let j0 = e.i64((full * 8) as i64);
        for l in 0..8 {
            if full * 8 + l < n {
                lane(e, dst0, j0, l);
            } else {
                e.for_range(0, c as i64, 1, |e, kk| {
                    let d = e.ishl_imm(kk, 3);
                    let d = e.iadd(dst0, d);
                    let z = e.fconst(F32, 0.0);
                    e.store(packed + 4 * l, d, z);
                });
            }
        }
    };
    e.units(range, full, !n.is_multiple_of(8), &mut whole, &mut partial);
}

/// Swaps the two outer axes, `[A, B, HW]` → `[B, A, HW]` (conv2d's `[Cout, B·HW]` into NCHW),
/// for the outer indices `lo..hi` of the result: the part one thread takes.
fn swap_outer_range(
    e: &mut Emit,
    src: usize,
    dst: usize,
    (a, b, hw): (usize, usize, usize),
    (lo, hi): (Value, Value),
) {
    let top = e.i64(b as i64);
    let hi = e.b.ins().smin(hi, top);
    e.for_dynamic(lo, hi, |e, j| {
        e.for_range(0, a as i64, 1, |e, i| {
            let s = e.imul_imm(i, b as i64);
            let s = e.iadd(s, j);
            let s = e.imul_imm(s, hw as i64);
            let d = e.imul_imm(j, a as i64);
            let d = e.iadd(d, i);
            let d = e.imul_imm(d, hw as i64);
            super::kernels::copy(e, src, s, dst, d, hw);
        });
    });
}

/// Adds every column of `cols[(c, kh, kw), (img, oy, ox)]` into the image pixel under that
/// kernel tap: the output `[B, C, H, W]` of a transposed convolution (`ge` seen as conv2d:
/// its input is this output), for the images `lo..hi` — the work one thread takes. Per image
/// and channel the output plane stays in cache while all taps add into it. The taps are
/// unrolled, so each one's rows and columns inside the image are constant ranges: no test per
/// pixel, and with stride 1 a row is one vector loop over both buffers.
fn col2im(e: &mut Emit, ge: Geom, cols: usize, out: usize, (lo, hi): (Value, Value)) {
    let n = ge.n() as i64;
    let plane = ge.h * ge.w;
    let top = e.i64(ge.b as i64);
    let hi = e.b.ins().smin(hi, top);
    e.for_dynamic(lo, hi, |e, img| {
        let first = e.imul_imm(img, (ge.ci * plane) as i64);
        e.elementwise(ge.ci * plane, |e, ty, j| {
            let i = e.iadd(first, j);
            let z = e.fconst(ty, 0.0);
            e.store(out, i, z);
        });
        let col0 = e.imul_imm(img, (ge.oh * ge.ow) as i64);
        e.for_range(0, ge.ci as i64, 1, |e, c| {
            let t = e.imul_imm(c, plane as i64);
            let obase = e.iadd(first, t);
            // The taps in order (each output sums them in the same order at any size): the
            // kernel's rows a loop, its columns unrolled.
            for_kernel_rows(e, ge, ge.oh * ge.ow, |e, kh, (oy0, oy1)| {
                let kh_p = e.iadd_imm(kh, -(ge.p[0] as i64));
                for kw in 0..ge.k[1] {
                    let (ox0, ox1) = inside(kw, ge.s[1], ge.p[1], ge.w, ge.ow);
                    if ox0 >= ox1 {
                        continue;
                    }
                    // Row r = (c, kh, kw) of cols, at this image's columns.
                    let r = tap_row(e, ge, c, kh, kw);
                    let row = e.imul_imm(r, n);
                    let row = e.iadd(row, col0);
                    e.for_between(oy0, oy1, |e, oy| {
                        // iy = oy·s + kh − p, ix = ox·s + kw − p.
                        let t = e.imul_imm(oy, ge.ow as i64);
                        let src = e.iadd(row, t);
                        let dst = input_row(e, ge, obase, oy, kh_p, kw);
                        let add = |e: &mut Emit, ty: Type, ox: Value| {
                            let si = e.iadd(src, ox);
                            let v = e.load(ty, cols, si);
                            let t = e.imul_imm(ox, ge.s[1] as i64);
                            let di = e.iadd(dst, t);
                            let old = e.load(ty, out, di);
                            let sum = e.b.ins().fadd(old, v);
                            e.store(out, di, sum);
                        };
                        if ge.s[1] == 1 {
                            e.elementwise_in(ox0, ox1, add);
                        } else {
                            e.for_range(ox0 as i64, ox1 as i64, 1, |e, ox| add(e, F32, ox));
                        }
                    });
                }
            });
        });
    });
}

/// Output positions per kernel row from which the kernel's rows are a loop at run time; under
/// it they are unrolled. The loop computes each row's range of output rows inside the image, a
/// few dozen instructions that count next to the work of a small image (digits_deconv, at 2×2
/// and 4×4, trained at 0.83× with the loop), not next to a large one's — whose code it makes a
/// kernel-height times smaller, and so its compile time.
const LOOP_ROWS_FROM: usize = 100;

/// Runs `body` for every kernel row `kh` with the output rows `oy0..oy1` whose input row lies
/// inside the image: a loop at run time when a kernel row's work (`work` output positions) is
/// at least [`LOOP_ROWS_FROM`], else unrolled (constants).
fn for_kernel_rows(
    e: &mut Emit,
    ge: Geom,
    work: usize,
    mut body: impl FnMut(&mut Emit, Value, (Value, Value)),
) {
    if work >= LOOP_ROWS_FROM {
        e.for_range(0, ge.k[0] as i64, 1, |e, kh| {
            let rows = inside_at(e, kh, ge.s[0], ge.p[0], ge.h, ge.oh);
            body(e, kh, rows);
        });
    } else {
        for kh in 0..ge.k[0] {
            let (oy0, oy1) = inside(kh, ge.s[0], ge.p[0], ge.h, ge.oh);
            let (kh, oy0, oy1) = (e.i64(kh as i64), e.i64(oy0 as i64), e.i64(oy1 as i64));
            body(e, kh, (oy0, oy1));
        }
    }
}

/// One tap's output rows `0..oh`, row `oy` starting at `first + oy·ow`: `outside(start)` for
/// the rows whose input row is outside the image (before `oy0` and from `oy1`: zeros),
/// `inside(oy, start)` for the rows between. Constant ranges when `oy0` and `oy1` are
/// constants, so no row is tested at run time.
fn for_tap_rows(
    e: &mut Emit,
    ge: Geom,
    first: Value,
    (oy0, oy1): (Value, Value),
    outside: impl Fn(&mut Emit, Value),
    mut inside: impl FnMut(&mut Emit, Value, Value),
) {
    let row_at = |e: &mut Emit, oy: Value| {
        let t = e.imul_imm(oy, ge.ow as i64);
        e.iadd(first, t)
    };
    let (zero, oh) = (e.i64(0), e.i64(ge.oh as i64));
    for (from, to) in [(zero, oy0), (oy1, oh)] {
        e.for_between(from, to, |e, oy| {
            let at = row_at(e, oy);
            outside(e, at);
        });
    }
    e.for_between(oy0, oy1, |e, oy| {
        let at = row_at(e, oy);
        inside(e, oy, at);
    });
}

/// Row `(c, kh, kw)` of im2col, with the kernel row `kh` known at run time.
fn tap_row(e: &mut Emit, ge: Geom, c: Value, kh: Value, kw: usize) -> Value {
    let r = e.imul_imm(c, ge.k[0] as i64);
    let r = e.iadd(r, kh);
    let r = e.imul_imm(r, ge.k[1] as i64);
    e.iadd_imm(r, kw as i64)
}

/// Where input row `oy·s + kh − p` of the plane at `plane` starts, shifted by the kernel
/// column's `kw − p` (`kh_p` is `kh − p`).
fn input_row(e: &mut Emit, ge: Geom, plane: Value, oy: Value, kh_p: Value, kw: usize) -> Value {
    let iy = e.imul_imm(oy, ge.s[0] as i64);
    let iy = e.iadd(iy, kh_p);
    let t = e.imul_imm(iy, ge.w as i64);
    let at = e.iadd(plane, t);
    e.iadd_imm(at, kw as i64 - ge.p[1] as i64)
}

/// [`inside`] for a kernel row or column `tap` known only at run time.
fn inside_at(e: &mut Emit, tap: Value, s: usize, p: usize, size: usize, out: usize) -> (Value, Value) {
    let zero = e.i64(0);
    let out_ = e.i64(out as i64);
    // lo = ⌈max(p − tap, 0) / s⌉, at most `out`.
    let p_ = e.i64(p as i64);
    let before = e.b.ins().isub(p_, tap);
    let before = e.b.ins().smax(before, zero);
    let before = e.iadd_imm(before, s as i64 - 1);
    let lo = e.with_imm(before, s as i64, |ins, x, c| ins.udiv(x, c));
    let lo = e.b.ins().smin(lo, out_);
    // hi = ⌊(size + p − tap − 1) / s⌋ + 1 when that top is not negative, at most `out`; else 0.
    let top_ = e.i64((size + p) as i64 - 1);
    let top = e.b.ins().isub(top_, tap);
    let top_pos = e.b.ins().smax(top, zero);
    let hi = e.with_imm(top_pos, s as i64, |ins, x, c| ins.udiv(x, c));
    let hi = e.iadd_imm(hi, 1);
    let hi = e.b.ins().smin(hi, out_);
    let reached = e.icmp_imm(IntCC::SignedGreaterThanOrEqual, top, 0);
    let hi = e.b.ins().select(reached, hi, zero);
    let hi = e.b.ins().smax(hi, lo);
    (lo, hi)
}

/// The output positions `o` in `0..out` whose input position `o·s + tap − p` lies in `0..size`.
fn inside(tap: usize, s: usize, p: usize, size: usize, out: usize) -> (usize, usize) {
    // o·s ≥ p − tap and o·s ≤ size − 1 + p − tap.
    let lo = p.saturating_sub(tap).div_ceil(s);
    let hi = match (size + p).checked_sub(tap + 1) {
        Some(top) => (top / s + 1).min(out),
        None => 0,
    };
    (lo.min(out), hi.max(lo.min(out)))
}
