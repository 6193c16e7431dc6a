//! Convolutions of switch maps (`passes::sparse`): work per switch instead of per position.
//!
//! The dense side is copied channel-last into a padded plane, `[B][HP·WP][E']` with `E'` the
//! dense channels rounded up to 4 (zeros in the padding lanes and around the plane), so that a
//! switch's taps are `K·K` runs of `E'` floats at constant distances from one address: each
//! tap and group of four channels is one vector load (or load and store). Switch `s` of a
//! plane `W` wide sits at row `s / W` (a multiply by a 32-bit reciprocal) and its tap `(i, j)`
//! at padded row `s / W + i`, column `s % W + j`.
//!
//! - `SparseConvT`: per image, zero the plane, add `v · w[c]` around every switch (weights held
//!   in registers, twelve vectors at a time), then copy the plane's inside out as NCHW.
//! - `GatherConv`: per image, copy `x` in, then one dot product of `w[c]` with the taps per
//!   switch.
//! - `SparseWeightGrad`: copy `d` in (per image), then per channel `c` accumulate `v · taps`
//!   over all switches of the channel in registers, twelve vectors at a time.
//!
//! Preps pack the weights `[C][K·K][E']` (one unit) or copy images (units: images); the
//! compute kernels split by images, the weight gradient by channels.

use super::emit::{Emit, vmem};
use super::plan::Plan;
use crate::ir::{Graph, NodeId, Op};
use cranelift_codegen::ir::condcodes::IntCC;
use cranelift_codegen::ir::types::{F32, F32X4, I32, I64};
use cranelift_codegen::ir::{InstBuilder, MemFlagsData, Value};

/// Vectors held in registers across a loop over switches.
const HELD: usize = 12;

/// Independent sums in a dot product: enough to hide the `fma` latency.
const CHAINS: usize = 8;

/// A switch-map convolution's sizes.
#[derive(Clone, Copy, Debug)]
struct Geo {
    /// The switch map `[B, C, Q]`.
    b: usize,
    c: usize,
    q: usize,
    /// The switches' plane width.
    ws: usize,
    /// Dense channels, and the floats per place in the padded plane (rounded up to 4, or 1 for
    /// tap rows).
    e: usize,
    ep: usize,
    /// One dense channel read (not written): each vector holds four taps of a kernel row
    /// instead of four channels of one tap — a third of the vectors for K = 3.
    rows: bool,
    /// The weight is a conv2d weight read flipped (see `Op::SparseConvT`).
    flip: bool,
    k: usize,
    pad: usize,
    /// The dense plane and the padded one.
    hd: usize,
    wd: usize,
    hp: usize,
    wp: usize,
}

impl Geo {
    fn of(g: &Graph, id: NodeId) -> Option<Geo> {
        let sh = |n: NodeId| g.ty(n).shape.clone();
        let (map, dense, k, pad, (hs, ws), flip) = match g.node(id).op {
            Op::SparseConvT { v, w, height, width, pad, flip, .. } => {
                (sh(v), g.ty(id).shape.clone(), sh(w)[2], pad, (height, width), flip)
            }
            Op::GatherConv { x, w, idx, pad, flip } => {
                let (xs, k) = (sh(x), sh(w)[2]);
                let sparse = ((xs[2] + 2 * pad + 1).checked_sub(k)?, (xs[3] + 2 * pad + 1).checked_sub(k)?);
                (sh(idx), xs, k, pad, sparse, flip)
            }
            Op::SparseWeightGrad { v, d, kernel, pad, height, width, flip, .. } => {
                (sh(v), sh(d), kernel, pad, (height, width), flip)
            }
            _ => return None,
        };
        let (hd, wd) = (dense[2], dense[3]);
        let rows = dense[1] == 1 && !matches!(g.node(id).op, Op::SparseConvT { .. });
        // A tap row's last vector reads up to three columns past the kernel.
        let reach = if rows { k.div_ceil(4) * 4 } else { k };
        Some(Geo {
            b: map[0],
            c: map[1],
            q: map[2] * map[3],
            ws,
            e: dense[1],
            ep: if rows { 1 } else { dense[1].div_ceil(4) * 4 },
            rows,
            flip,
            k,
            pad,
            hd,
            wd,
            hp: (hd + pad).max(hs + k - 1),
            wp: (wd + pad).max(ws + reach - 1),
        })
    }

    /// Floats of one image's padded channel-last plane (a multiple of 4).
    fn img(&self) -> usize {
        (self.hp * self.wp * self.ep).div_ceil(4) * 4
    }

    /// Floats of one channel's packed weights: `[K·K][E']`, or `[K][K rounded up to 4]` for
    /// tap rows.
    fn per_channel(&self) -> usize {
        if self.rows { self.k * self.k.div_ceil(4) * 4 } else { self.k * self.k * self.ep }
    }

    fn packed(&self) -> usize {
        self.c * self.per_channel()
    }

    /// Where dense channel `ch` of tap `(i, j)` sits in a channel's packed weights (and its
    /// sums): vector `slot / 4`, lane `slot % 4`.
    fn slot(&self, ch: usize, i: usize, j: usize) -> usize {
        if self.rows { i * self.k.div_ceil(4) * 4 + j } else { (i * self.k + j) * self.ep + ch }
    }

    /// Every vector of a switch's taps: (floats from the switch's own place in the padded
    /// plane, floats from its channel's packed weights).
    fn taps(&self) -> Vec<(i32, i32)> {
        let mut v = Vec::new();
        for i in 0..self.k {
            for j in 0..self.k {
                for lanes in (0..self.ep).step_by(4) {
                    if self.rows && j % 4 != 0 {
                        continue;
                    }
                    let plane = (i * self.wp + j) * self.ep + lanes;
                    v.push((plane as i32, self.slot(lanes, i, j) as i32));
                }
            }
        }
        v
    }

    /// Where `K[c][ch][0]` sits in the weight (or weight gradient): `[C][E][K·K]`, or flipped
    /// `[E][C][K·K]` (see `ir::switch_weight`); `tap_at(t)` is tap `t`'s distance from there.
    fn weight_at(&self, e: &mut Emit, c: Value, ch: Value) -> Value {
        let (outer, inner, n) = if self.flip { (ch, c, self.c) } else { (c, ch, self.e) };
        let at = e.imul_imm(outer, n as i64);
        let at = e.iadd(at, inner);
        e.imul_imm(at, (self.k * self.k) as i64)
    }

    fn tap_at(&self, t: usize) -> i64 {
        (if self.flip { self.k * self.k - 1 - t } else { t }) as i64
    }

    /// Multiply-adds.
    fn work(&self) -> usize {
        self.b * self.c * self.q * self.k * self.k * self.e
    }
}

/// Bytes of scratch: the padded planes of every image, then the packed weights.
pub fn scratch_bytes(g: &Graph, id: NodeId) -> usize {
    Geo::of(g, id).map_or(0, |ge| (ge.b * ge.img() + ge.packed()) * 4)
}

/// The kernels of `id` (prep, compute) and the compute kernel's work units and work.
pub fn parts(g: &Graph, id: NodeId) -> Option<(usize, usize)> {
    let ge = Geo::of(g, id)?;
    let units = if matches!(g.node(id).op, Op::SparseWeightGrad { .. }) { ge.c } else { ge.b };
    Some((units, ge.work()))
}

/// The prep kernel's work units (images for the weight gradient's copy, else one) and work.
pub fn prep_units(g: &Graph, id: NodeId) -> (usize, usize) {
    match (Geo::of(g, id), &g.node(id).op) {
        (Some(ge), Op::SparseWeightGrad { .. } | Op::GatherConv { .. }) => (ge.b, 4 * ge.b * ge.img()),
        _ => (1, 0),
    }
}

/// What the prep kernel of `id` does, for `--emit fused`.
pub fn prep_text(op: &Op) -> &'static str {
    match op {
        Op::SparseWeightGrad { .. } => "copy into padded channel-last planes",
        Op::GatherConv { .. } => "copy into padded channel-last planes, pack the weights by tap",
        _ => "pack the weights by tap",
    }
}

/// Emits the prep (`compute` false) or compute kernel of switch-map convolution `id`.
pub fn emit(
    e: &mut Emit,
    g: &Graph,
    plan: &Plan,
    id: NodeId,
    compute: bool,
    scratch: usize,
    (lo, hi): (Value, Value),
) -> Result<(), String> {
    let ge = Geo::of(g, id).ok_or("not a switch-map convolution")?;
    let at = |n: NodeId| plan.node[n.index()];
    let out = plan.node[id.index()];
    let planes = scratch;
    let packed = scratch + ge.b * ge.img() * 4;
    let images = |e: &mut Emit, body: &mut dyn FnMut(&mut Emit, Value)| {
        let top = e.i64(ge.b as i64);
        let hi = e.b.ins().smin(hi, top);
        e.for_dynamic(lo, hi, |e, b| body(e, b));
    };
    match (g.node(id).op.clone(), compute) {
        (Op::SparseConvT { w, .. }, false) => pack_weights(e, ge, at(w), packed),
        (Op::GatherConv { x, w, .. }, false) => {
            images(e, &mut |e, b| channels_last(e, ge, at(x), planes, b));
            let first = e.icmp_imm(IntCC::Equal, lo, 0);
            e.when(first, |e| pack_weights(e, ge, at(w), packed));
        }
        (Op::SparseConvT { v, idx, .. }, true) => images(e, &mut |e, b| {
            let img = e.imul_imm(b, ge.img() as i64);
            zero(e, planes, img, ge.img());
            scatter(e, ge, (at(v), at(idx)), (planes, packed), b);
            channels_first(e, ge, planes, out, b);
        }),
        (Op::GatherConv { idx, .. }, true) => {
            images(e, &mut |e, b| gather(e, ge, at(idx), (planes, packed), out, b))
        }
        (Op::SparseWeightGrad { d, .. }, false) => {
            images(e, &mut |e, b| channels_last(e, ge, at(d), planes, b))
        }
        (Op::SparseWeightGrad { v, idx, .. }, true) => {
            let top = e.i64(ge.c as i64);
            let hi = e.b.ins().smin(hi, top);
            weight_grad(e, ge, (at(v), at(idx)), (planes, packed), out, (lo, hi));
        }
        _ => return Err("not a switch-map convolution".into()),
    }
    Ok(())
}

/// `packed[c][t][e] = w[c][e][t]`, zeros in the padding lanes.
fn pack_weights(e: &mut Emit, ge: Geo, w: usize, packed: usize) {
    let zero_at = e.i64(0);
    zero(e, packed, zero_at, ge.packed());
    let kk = ge.k * ge.k;
    e.for_range(0, ge.c as i64, 1, |e, c| {
        e.for_range(0, ge.e as i64, 1, |e, ch| {
            let src = ge.weight_at(e, c, ch);
            let dst = e.imul_imm(c, ge.per_channel() as i64);
            let dst = e.iadd(dst, ch);
            for t in 0..kk {
                let s = e.iadd_imm(src, ge.tap_at(t));
                let val = e.load(F32, w, s);
                let d = e.iadd_imm(dst, ge.slot(0, t / ge.k, t % ge.k) as i64);
                e.store(packed, d, val);
            }
        });
    });
}

/// Zeros `n` floats (a multiple of 4) of buffer `buf` from element `from`.
fn zero(e: &mut Emit, buf: usize, from: Value, n: usize) {
    let z = e.fconst(F32X4, 0.0);
    e.for_range(0, n as i64, 4, |e, i| {
        let at = e.iadd(from, i);
        e.store(buf, at, z);
    });
}

/// Image `b` of `src` (NCHW) into its padded channel-last plane (zeros around it).
fn channels_last(e: &mut Emit, ge: Geo, src: usize, planes: usize, b: Value) {
    let img = e.imul_imm(b, ge.img() as i64);
    zero(e, planes, img, ge.img());
    for_dense(e, ge, b, img, |e, from, to| {
        let v = e.load(F32, src, from);
        e.store(planes, to, v);
    });
}

/// The inside of image `b`'s padded plane out to `dst` (NCHW).
fn channels_first(e: &mut Emit, ge: Geo, planes: usize, dst: usize, b: Value) {
    let img = e.imul_imm(b, ge.img() as i64);
    for_dense(e, ge, b, img, |e, to, from| {
        let v = e.load(F32, planes, from);
        e.store(dst, to, v);
    });
}

/// `body(nchw, padded)` for every element of image `b` of the dense side: its index in NCHW
/// and in the padded channel-last planes (whose image starts at `img`).
fn for_dense(e: &mut Emit, ge: Geo, b: Value, img: Value, mut body: impl FnMut(&mut Emit, Value, Value)) {
    e.for_range(0, ge.e as i64, 1, |e, ch| {
        let plane = e.imul_imm(b, ge.e as i64);
        let plane = e.iadd(plane, ch);
        let nchw = e.imul_imm(plane, (ge.hd * ge.wd) as i64);
        let padded = e.iadd(img, ch);
        e.for_range(0, ge.hd as i64, 1, |e, y| {
            let row = e.imul_imm(y, ge.wd as i64);
            let row = e.iadd(nchw, row);
            let prow = e.imul_imm(y, (ge.wp * ge.ep) as i64);
            let first = ((ge.pad * ge.wp + ge.pad) * ge.ep) as i64;
            let prow = e.iadd_imm(prow, first);
            let prow = e.iadd(padded, prow);
            e.for_range(0, ge.wd as i64, 1, |e, x| {
                let a = e.iadd(row, x);
                let p = e.imul_imm(x, ge.ep as i64);
                let p = e.iadd(prow, p);
                body(e, a, p);
            });
        });
    });
}

/// The map's element index of the first switch of image `b`, channel `c`.
fn first_switch(e: &mut Emit, ge: Geo, b: Value, c: Value) -> Value {
    let plane = e.imul_imm(b, ge.c as i64);
    let plane = e.iadd(plane, c);
    e.imul_imm(plane, ge.q as i64)
}

/// The byte address of switch `n`'s place (`n` an element index of the map) in the padded
/// plane of image `img` (an element index of the planes' buffer).
fn switch(e: &mut Emit, ge: Geo, idx: usize, planes: usize, img: Value, n: Value) -> Value {
    let s = e.load(I32, idx, n);
    let s = e.b.ins().uextend(I64, s);
    // s / W as (s · ⌊2³²/W + 1⌋) >> 32: exact while s · W < 2³² (`passes::sparse`).
    let row = e.imul_imm(s, ((1u64 << 32) / ge.ws as u64 + 1) as i64);
    let row = e.with_imm(row, 32, |ins, x, c| ins.ushr(x, c));
    let skip = e.imul_imm(row, (ge.wp - ge.ws) as i64);
    let place = e.iadd(s, skip);
    let place = e.imul_imm(place, ge.ep as i64);
    let place = e.iadd(img, place);
    e.addr(planes, place)
}

/// `body(addr, v)` for the switches of one image and channel (`first` the index of the first in
/// the map): the byte address of its place in the padded plane of image `img`, its value splat.
fn for_switches(
    e: &mut Emit,
    ge: Geo,
    (v, idx): (usize, usize),
    (planes, img): (usize, Value),
    first: Value,
    mut body: impl FnMut(&mut Emit, Value, Value),
) {
    e.for_range(0, ge.q as i64, 1, |e, q| {
        let n = e.iadd(first, q);
        let addr = switch(e, ge, idx, planes, img, n);
        let val = e.load(F32, v, n);
        let val = e.b.ins().splat(F32X4, val);
        body(e, addr, val);
    });
}

/// Adds `v · w[c]` around every switch of image `b` into its padded plane.
fn scatter(e: &mut Emit, ge: Geo, (v, idx): (usize, usize), (planes, packed): (usize, usize), b: Value) {
    let img = e.imul_imm(b, ge.img() as i64);
    let taps = ge.taps();
    e.for_range(0, ge.c as i64, 1, |e, c| {
        let wbase = e.imul_imm(c, ge.per_channel() as i64);
        let first = first_switch(e, ge, b, c);
        for chunk in taps.chunks(HELD) {
            let held: Vec<Value> = chunk
                .iter()
                .map(|&(_, wo)| {
                    let i = e.iadd_imm(wbase, i64::from(wo));
                    e.load_ro(F32X4, packed, i)
                })
                .collect();
            for_switches(e, ge, (v, idx), (planes, img), first, |e, addr, val| {
                for (&(po, _), &w) in chunk.iter().zip(&held) {
                    let d = e.b.ins().load(F32X4, vmem(), addr, po * 4);
                    let d = e.b.ins().fma(val, w, d);
                    e.b.ins().store(vmem(), d, addr, po * 4);
                }
            });
        }
    });
}

/// Loads of what the kernel only reads (the planes a prep kernel copied, packed weights): pure,
/// so Cranelift places each next to its use (and folds it into the `fma`).
fn read_only() -> MemFlagsData {
    vmem().with_readonly().with_can_move()
}

/// `out[b,c,q]` = the dot product of `w[c]` with the taps of switch `(b, c, q)`.
fn gather(e: &mut Emit, ge: Geo, idx: usize, (planes, packed): (usize, usize), out: usize, b: Value) {
    let img = e.imul_imm(b, ge.img() as i64);
    let taps = ge.taps();
    e.for_range(0, ge.c as i64, 1, |e, c| {
        let wbase = e.imul_imm(c, ge.per_channel() as i64);
        let waddr = e.addr(packed, wbase);
        let first = first_switch(e, ge, b, c);
        e.for_range(0, ge.q as i64, 1, |e, q| {
            let n = e.iadd(first, q);
            let addr = switch(e, ge, idx, planes, img, n);
            let mut acc: Vec<Value> = Vec::new();
            for (j, &(po, wo)) in taps.iter().enumerate() {
                let d = e.b.ins().load(F32X4, read_only(), addr, po * 4);
                let w = e.b.ins().load(F32X4, read_only(), waddr, wo * 4);
                if j < CHAINS {
                    acc.push(e.b.ins().fmul(d, w));
                } else {
                    acc[j % CHAINS] = e.b.ins().fma(d, w, acc[j % CHAINS]);
                }
            }
            // Pairwise: the chains are independent until here.
            while acc.len() > 1 {
                let half = acc.len().div_ceil(2);
                for i in 0..acc.len() - half {
                    acc[i] = e.b.ins().fadd(acc[i], acc[i + half]);
                }
                acc.truncate(half);
            }
            let sum = acc[0];
            let dot = e.hsum(sum);
            e.store(out, n, dot);
        });
    });
}

/// `out[c, e, t] = Σ v · tap t` over every switch of the channels `lo..hi` in all images:
/// image by image (its plane stays in cache while every channel reads it), each channel's sums
/// kept in `sums` (`[C][K·K][E']`) between images, twelve vectors at a time in registers.
fn weight_grad(
    e: &mut Emit,
    ge: Geo,
    (v, idx): (usize, usize),
    (planes, sums): (usize, usize),
    out: usize,
    (lo, hi): (Value, Value),
) {
    let taps = ge.taps();
    let per = ge.per_channel() as i64;
    e.for_dynamic(lo, hi, |e, c| {
        let from = e.imul_imm(c, per);
        zero(e, sums, from, per as usize);
    });
    e.for_range(0, ge.b as i64, 1, |e, b| {
        let img = e.imul_imm(b, ge.img() as i64);
        e.for_dynamic(lo, hi, |e, c| {
            let first = first_switch(e, ge, b, c);
            let row = e.imul_imm(c, per);
            for chunk in taps.chunks(HELD) {
                let vars: Vec<_> = chunk.iter().map(|_| e.b.declare_var(F32X4)).collect();
                for (&(_, wo), &var) in chunk.iter().zip(&vars) {
                    let i = e.iadd_imm(row, i64::from(wo));
                    let a = e.load(F32X4, sums, i);
                    e.b.def_var(var, a);
                }
                for_switches(e, ge, (v, idx), (planes, img), first, |e, addr, val| {
                    for (&(po, _), &var) in chunk.iter().zip(&vars) {
                        let d = e.b.ins().load(F32X4, read_only(), addr, po * 4);
                        let a = e.b.use_var(var);
                        let a = e.b.ins().fma(d, val, a);
                        e.b.def_var(var, a);
                    }
                });
                for (&(_, wo), &var) in chunk.iter().zip(&vars) {
                    let i = e.iadd_imm(row, i64::from(wo));
                    let a = e.b.use_var(var);
                    e.store(sums, i, a);
                }
            }
        });
    });
    // out[c][ch][i][j] from its slot of the sums.
    let kk = ge.k * ge.k;
    // The channels are a loop at run time, the taps unrolled: channel `ch`'s slot is
    // `slot(0, ..) + ch`, or `slot(0, ..)` for tap rows, which hold no channels.
    e.for_dynamic(lo, hi, |e, c| {
        let row = e.imul_imm(c, per);
        e.for_range(0, ge.e as i64, 1, |e, ch| {
            let orow = ge.weight_at(e, c, ch);
            let lanes = if ge.rows { row } else { e.iadd(row, ch) };
            for t in 0..kk {
                let i = e.iadd_imm(lanes, ge.slot(0, t / ge.k, t % ge.k) as i64);
                let x = e.load(F32, sums, i);
                let i = e.iadd_imm(orow, ge.tap_at(t));
                e.store(out, i, x);
            }
        });
    });
}
