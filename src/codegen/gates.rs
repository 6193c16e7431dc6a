//! A recurrent cell's gate math at full width (AVX2), fused with the wide core's per-step
//! projection.
//!
//! A recurrent loop on the wide core calls it once per step and unit of batch rows
//! (`wide::Call::gates`): the forward computes the unit's `h·W_hhᵀ` and then its gates (adding
//! `b_hh` as they read it) and new state, the backward the gates' gradients and then the
//! unit's `dgh·W_hh`. The operations are the Cranelift loop's (`recurrent::forward_loop`,
//! `backward_loop`) in the same order — the same fused multiply-adds, IEEE divisions,
//! compares and selects, through [`super::elementwise::wide_math`] — so each element gets the
//! same bits at either width (tested). `AEC_ELEMENTWISE=cranelift` keeps the gates in the
//! generated 128-bit code.

use crate::ir::Cell;

/// A recurrent loop's gates as the wide core sees them: the cell, its sizes and the arena byte
/// offsets of the buffers the step reads and writes.
#[derive(Clone, Debug, PartialEq)]
pub struct Gates {
    pub cell: Cell,
    /// Batch, steps and hidden size.
    pub b: usize,
    pub t: usize,
    pub h: usize,
    /// The output: the states `[B, T, S]` forward, the gradients' layout backward.
    pub out: usize,
    pub pass: Pass,
}

/// What only one direction reads or writes.
#[derive(Clone, Debug, PartialEq)]
pub enum Pass {
    Forward {
        /// The input projections `x·W_ihᵀ + b_ih`, `[B, T, G·H]`.
        xp: usize,
        /// This step's `h·W_hhᵀ` `[B, G·H]` (the core's result), then the gates over them.
        gh: usize,
        /// `b_hh` `[G·H]`, added as the gates read the projections (not in a pass of its own
        /// after the product), if the layer has it.
        bias: Option<usize>,
        /// The running `h` and (LSTM) `c`, `[B, H]` each.
        h: usize,
        c: usize,
        /// Where the gates are saved for the backward pass, `[B, T, V·H]` (`Cell::saves`),
        /// if anywhere.
        saved: Option<usize>,
    },
    Backward {
        /// What the forward saved of its gates `[B, T, V·H]` (`Op::GateSaves`), the states
        /// before each step and the states' gradients `[B, T, S]`.
        gh: usize,
        hprev: usize,
        dhs: usize,
        /// The carried `dh`, `dc` and the GRU's `dh·z`, `[B, H]` each, and this step's `dgh`
        /// `[B, G·H]` (the core's left operand).
        dh: usize,
        dc: usize,
        direct: usize,
        dgh: usize,
        /// Element offsets of `dxp` and `dgh` in the output.
        dxp_at: usize,
        dgh_at: usize,
        /// The output's elements.
        total: usize,
    },
}

impl Gates {
    fn gh(&self) -> usize {
        self.cell.gates() as usize * self.h
    }

    fn s(&self) -> usize {
        self.cell.state(self.h)
    }

    fn sv(&self) -> usize {
        self.cell.saves() * self.h
    }

    /// One past the last byte of the arena the gates read or write.
    pub fn extent(&self) -> usize {
        let (b, t, h, gh, s, sv) = (self.b, self.t, self.h, self.gh(), self.s(), self.sv());
        let ends: Vec<(usize, usize)> = match self.pass {
            Pass::Forward { xp, gh: g, bias, h: hh, c, saved } => {
                let mut v =
                    vec![(self.out, b * t * s), (xp, b * t * gh), (g, b * gh), (hh, b * h), (c, b * h)];
                v.extend(saved.map(|o| (o, b * t * sv)));
                v.extend(bias.map(|o| (o, gh)));
                v
            }
            Pass::Backward { gh: g, hprev, dhs, dh, dc, direct, dgh, total, .. } => vec![
                (self.out, total),
                (g, b * t * sv),
                (hprev, b * t * s),
                (dhs, b * t * s),
                (dh, b * h),
                (dc, b * h),
                (direct, b * h),
                (dgh, b * gh),
            ],
        };
        ends.into_iter().map(|(o, n)| o + 4 * n).fold(0, usize::max)
    }

    /// Whether the gates run before the unit's projection (backward) or after it.
    pub fn before_projection(&self) -> bool {
        matches!(self.pass, Pass::Backward { .. })
    }
}

/// The gates of batch rows `r0..r0 + rows` at step `step` (the forward's `t`, the backward's
/// too: it counts down in the caller).
///
/// # Safety
/// Every buffer of `g` lies inside the arena at `base` (`Gates::extent`), `r0 + rows <= g.b`,
/// `step < g.t`, no other thread touches these rows meanwhile, and the CPU has AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn step_avx2(base: *mut u8, g: &Gates, (r0, rows): (usize, usize), step: usize) {
    for r in r0..r0 + rows {
        // SAFETY: as the caller promises, row by row.
        unsafe {
            match g.pass {
                Pass::Forward { .. } => forward_row(base, g, r, step),
                Pass::Backward { .. } => backward_row(base, g, r, step),
            }
        }
    }
}

/// Element offsets of row `r` at step `t`: its projections (`[B, T, G·H]`), its states
/// (`[B, T, S]`), its gate saves (`[B, T, V·H]`), its rows of `[B, G·H]` and `[B, H]`
/// buffers (as `recurrent::rows`).
fn rows(g: &Gates, r: usize, t: usize) -> (usize, usize, usize, usize, usize) {
    let bt = r * g.t + t;
    (bt * g.gh(), bt * g.s(), bt * g.sv(), r * g.gh(), r * g.h)
}

#[cfg(target_arch = "x86_64")]
use super::elementwise::{load_n, load8, store_n, store8, wide_math::V};
#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::{
    __m256, _mm256_add_ps, _mm256_fmadd_ps, _mm256_mul_ps, _mm256_set1_ps, _mm256_sub_ps,
};

/// `f(j, n)` for each run of eight lanes of `0..len` (`n` of them real, the last run's rest
/// padded).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn runs(len: usize, mut f: impl FnMut(usize, usize)) {
    let mut j = 0;
    while j < len {
        f(j, (len - j).min(8));
        j += 8;
    }
}

/// `1 - v²`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn one_minus_sq(v: __m256) -> __m256 {
    _mm256_sub_ps(_mm256_set1_ps(1.0), _mm256_mul_ps(v, v))
}

/// `v·(1 - v)`, a sigmoid's derivative from its output.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn sig_d(v: __m256) -> __m256 {
    _mm256_mul_ps(v, _mm256_sub_ps(_mm256_set1_ps(1.0), v))
}

/// One row's forward step: `recurrent::forward_loop`'s two passes over the hidden units, a
/// block of lanes at a time — 32, then 16, then runs of eight — so that the activations of a
/// block interleave (`wide_math::sigmoid_n`).
///
/// # Safety
/// As [`step_avx2`], for row `r`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn forward_row(base: *mut u8, g: &Gates, r: usize, t: usize) {
    let mut j = 0;
    // SAFETY (each call): lanes `j..j + n` of the row, as the caller promises for the row.
    unsafe {
        while j + 32 <= g.h {
            forward_lanes::<4>(base, g, (r, t), j, 32);
            j += 32;
        }
        if j + 16 <= g.h {
            forward_lanes::<2>(base, g, (r, t), j, 16);
            j += 16;
        }
        while j < g.h {
            forward_lanes::<1>(base, g, (r, t), j, (g.h - j).min(8));
            j += 8;
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,fma")]
fn add_n<const N: usize>((a, b): (V<N>, V<N>)) -> V<N> {
    let mut out = a;
    for i in 0..N {
        out[i] = _mm256_add_ps(a[i], b[i]);
    }
    out
}

/// Lanes `j..j + n` of a row's forward step: where they are in each buffer.
#[cfg(target_arch = "x86_64")]
struct Lanes {
    base: *mut u8,
    /// Element offsets of the row's projections, gate saves and `gh` row at this step.
    xrow: usize,
    vrow: usize,
    grow: usize,
    hs: usize,
    j: usize,
    n: usize,
}

#[cfg(target_arch = "x86_64")]
impl Lanes {
    /// The lanes in the buffer at byte offset `off`, from element `i` on.
    fn at(&self, off: usize, i: usize) -> *mut f32 {
        self.base.wrapping_add(off + 4 * (i + self.j)) as *mut f32
    }

    /// Gate k's two projections: x·W_ihᵀ + b_ih and h·W_hhᵀ + b_hh (b_hh added here).
    ///
    /// Always inlined, and so without a target feature of its own (the two cannot go
    /// together): its intrinsics compile as part of the AVX2 caller. An outlined call would
    /// pass the vectors through memory.
    ///
    /// # Safety
    /// The lanes lie inside the buffers (`Gates::extent`).
    #[inline(always)]
    unsafe fn pre<const N: usize>(
        &self,
        (xp, gh, bias): (usize, usize, Option<usize>),
        k: usize,
    ) -> (V<N>, V<N>) {
        let k0 = k * self.hs;
        // SAFETY: as the caller promises.
        unsafe {
            let mut y = load_n::<N>(self.at(gh, self.grow + k0), self.n);
            if let Some(b) = bias {
                y = add_n((y, load_n::<N>(self.at(b, k0), self.n)));
            }
            (load_n::<N>(self.at(xp, self.xrow + k0), self.n), y)
        }
    }

    /// Saves `v` in slot `k` for the backward, when it reads the saves (inlined as `pre`).
    ///
    /// # Safety
    /// As `pre`.
    #[inline(always)]
    unsafe fn keep<const N: usize>(&self, saved: Option<usize>, k: usize, v: &V<N>) {
        if let Some(s) = saved {
            // SAFETY: as the caller promises.
            unsafe { store_n(self.at(s, self.vrow + k * self.hs), v, self.n) };
        }
    }
}

/// Lanes `j..j + n` of row `r`'s forward step `t` (`n` real lanes in `N` vectors): the gates
/// that need only their own projections, then the rest and the new state, with the 128-bit
/// loop's operations lane for lane. The activations stay in registers between the two
/// passes (the 128-bit loop passes them through `gh`, which nothing reads after the step).
///
/// # Safety
/// As [`step_avx2`], for these lanes of row `r`.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn forward_lanes<const N: usize>(
    base: *mut u8,
    g: &Gates,
    (r, t): (usize, usize),
    j: usize,
    n: usize,
) {
    use super::elementwise::wide_math::{sigmoid_n, tanh_n};
    let Pass::Forward { xp, gh, bias, h, c, saved } = g.pass else { return };
    let (xrow, orow, vrow, grow, hrow) = rows(g, r, t);
    let hs = g.h;
    let l = Lanes { base, xrow, vrow, grow, hs, j, n };
    let p = (xp, gh, bias);
    // SAFETY (the whole body): each index is within its row of a buffer `extent` covers.
    unsafe {
        let (hp, op) = (l.at(h, hrow), l.at(g.out, orow));
        match g.cell {
            Cell::Rnn => {
                let a = tanh_n(add_n(l.pre::<N>(p, 0)));
                l.keep(saved, 0, &a);
                store_n(hp, &a, n);
                store_n(op, &a, n);
            }
            Cell::Gru => {
                let rr = sigmoid_n(add_n(l.pre::<N>(p, 0)));
                l.keep(saved, 0, &rr);
                let z = sigmoid_n(add_n(l.pre::<N>(p, 1)));
                l.keep(saved, 1, &z);
                // n's projections apart: r multiplies the hidden one.
                let (xn, yn) = l.pre::<N>(p, 2);
                l.keep(saved, 2, &yn);
                let mut nn = xn;
                for i in 0..N {
                    nn[i] = _mm256_fmadd_ps(rr[i], yn[i], xn[i]);
                }
                let nn = tanh_n(nn);
                l.keep(saved, Cell::GRU_N_SLOT, &nn);
                let prev = load_n::<N>(hp, n);
                // h = (1-z)·n + z·h_prev = n + z·(h_prev - n).
                let mut hn = nn;
                for i in 0..N {
                    hn[i] = _mm256_fmadd_ps(z[i], _mm256_sub_ps(prev[i], nn[i]), nn[i]);
                }
                store_n(hp, &hn, n);
                store_n(op, &hn, n);
            }
            Cell::Lstm => {
                let i = sigmoid_n(add_n(l.pre::<N>(p, 0)));
                let f = sigmoid_n(add_n(l.pre::<N>(p, 1)));
                let gg = tanh_n(add_n(l.pre::<N>(p, 2)));
                let o = sigmoid_n(add_n(l.pre::<N>(p, 3)));
                for (k, v) in [&i, &f, &gg, &o].into_iter().enumerate() {
                    l.keep(saved, k, v);
                }
                let cpp = l.at(c, hrow);
                let cp = load_n::<N>(cpp, n);
                let mut cn = cp;
                for q in 0..N {
                    cn[q] = _mm256_fmadd_ps(f[q], cp[q], _mm256_mul_ps(i[q], gg[q]));
                }
                let tc = tanh_n(cn);
                l.keep(saved, Cell::LSTM_TANH_C_SLOT, &tc);
                let mut hn = tc;
                for q in 0..N {
                    hn[q] = _mm256_mul_ps(o[q], tc[q]);
                }
                store_n(hp, &hn, n);
                store_n(cpp, &cn, n);
                store_n(op, &hn, n);
                store_n(l.at(g.out, orow + hs), &cn, n);
            }
        }
    }
}

/// One row's backward step: `recurrent::backward_loop`'s two passes over the hidden units.
///
/// # Safety
/// As [`step_avx2`], for row `r`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn backward_row(base: *mut u8, g: &Gates, r: usize, t: usize) {
    let Pass::Backward { gh, hprev, dhs, dh, dc, direct, dgh, dxp_at, dgh_at, .. } = g.pass else {
        return;
    };
    let (xrow, srow, vrow, grow, hrow) = rows(g, r, t);
    let hs = g.h;
    // SAFETY (the whole body): each index is within its row of a buffer `extent` covers.
    unsafe {
        let at = |off: usize, i: usize| (base.add(off) as *mut f32).add(i);
        runs(hs, |j, n| {
            let (hi, si) = (hrow + j, srow + j);
            // What the forward saved in slot k (`Cell::saves`).
            let done = |k: usize| load8(at(gh, vrow + k * hs + j), n);
            // dgi into the output, dgh into the output and the step's `dgh` scratch.
            let put = |k: usize, dgi: __m256, dghv: __m256| {
                let xi = xrow + k * hs + j;
                store8(at(g.out, xi + dxp_at), dgi, n);
                store8(at(g.out, xi + dgh_at), dghv, n);
                store8(at(dgh, grow + k * hs + j), dghv, n);
            };
            let dsh = _mm256_add_ps(load8(at(dhs, si), n), load8(at(dh, hi), n));
            let one = _mm256_set1_ps(1.0);
            match g.cell {
                Cell::Rnn => {
                    let da = _mm256_mul_ps(dsh, one_minus_sq(done(0)));
                    put(0, da, da);
                }
                Cell::Gru => {
                    let (rr, z, yn, nn) = (done(0), done(1), done(2), done(Cell::GRU_N_SLOT));
                    let hp = load8(at(hprev, si), n);
                    // dn = ds·(1-z)·(1-n²); dz = ds·(h_prev-n)·z(1-z);
                    // dr = dn·gh_n·r(1-r); direct = ds·z.
                    let omz = _mm256_sub_ps(one, z);
                    let dn = _mm256_mul_ps(_mm256_mul_ps(dsh, omz), one_minus_sq(nn));
                    let dz = _mm256_mul_ps(dsh, _mm256_sub_ps(hp, nn));
                    let dz = _mm256_mul_ps(dz, _mm256_mul_ps(z, omz));
                    let rr1 = _mm256_mul_ps(rr, _mm256_sub_ps(one, rr));
                    let dr = _mm256_mul_ps(_mm256_mul_ps(dn, yn), rr1);
                    put(0, dr, dr);
                    put(1, dz, dz);
                    put(2, dn, _mm256_mul_ps(dn, rr));
                    store8(at(direct, hi), _mm256_mul_ps(dsh, z), n);
                }
                Cell::Lstm => {
                    let [i, f, gg, o] = [0, 1, 2, 3].map(done);
                    let cp = load8(at(hprev, si + hs), n);
                    let tc = done(Cell::LSTM_TANH_C_SLOT);
                    // dc = ds_c + ds_h·o·(1-tanh²c).
                    let dsc = _mm256_add_ps(load8(at(dhs, si + hs), n), load8(at(dc, hi), n));
                    let dcv = _mm256_fmadd_ps(_mm256_mul_ps(dsh, o), one_minus_sq(tc), dsc);
                    let di = _mm256_mul_ps(_mm256_mul_ps(dcv, gg), sig_d(i));
                    let df = _mm256_mul_ps(_mm256_mul_ps(dcv, cp), sig_d(f));
                    let dg = _mm256_mul_ps(_mm256_mul_ps(dcv, i), one_minus_sq(gg));
                    let dov = _mm256_mul_ps(_mm256_mul_ps(dsh, tc), sig_d(o));
                    for (k, v) in [di, df, dg, dov].into_iter().enumerate() {
                        put(k, v, v);
                    }
                    store8(at(dc, hi), _mm256_mul_ps(dcv, f), n);
                }
            }
        });
    }
}
