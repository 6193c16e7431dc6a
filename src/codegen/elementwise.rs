//! Elementwise work at the machine's full width, where Cranelift 0.135 stops at 128 bits.
//!
//! Adam's update (and AdamW's) is bound by the divider and the square root: at 128 bits each
//! instruction serves 4 lanes, with AVX2 8. The update kernel of such a parameter calls
//! [`aec_adam`] once per chunk instead of running its own 128-bit loop; the primitive is written
//! with `std::arch` intrinsics and does the very operations of the Cranelift kernel in the same
//! order — fused multiply-adds, IEEE square root and division, each correctly rounded at any
//! width — so the two give the same bits (tested). `AEC_ELEMENTWISE=cranelift` turns the
//! primitive off; a CPU without AVX2 and FMA never uses it. Gradients clipped by value keep the
//! Cranelift kernel (its `fmax`/`fmin` treat NaN as the IR defines, not as `maxps` does).

use super::kernels::CHUNK;

/// Which code the elementwise primitives run as.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ElementwisePath {
    /// The full-width primitives where this CPU has AVX2 and FMA.
    #[default]
    Auto,
    /// Cranelift's 128-bit kernels for everything.
    Cranelift,
}

impl ElementwisePath {
    /// The path `AEC_ELEMENTWISE` asks for: `auto` (or unset) or `cranelift`.
    pub fn from_env() -> Result<ElementwisePath, String> {
        match std::env::var("AEC_ELEMENTWISE").as_deref() {
            Err(_) | Ok("auto") | Ok("") => Ok(ElementwisePath::Auto),
            Ok("cranelift") => Ok(ElementwisePath::Cranelift),
            Ok(other) => Err(format!("AEC_ELEMENTWISE={other}: expected `auto` or `cranelift`")),
        }
    }

    /// The width the primitives run at on this machine under this path, if they run.
    pub fn isa(self) -> Option<&'static str> {
        if self == ElementwisePath::Cranelift {
            return None;
        }
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                return Some("AVX2");
            }
        }
        None
    }
}

/// One parameter's Adam update as the primitive sees it: its size, the arena byte offsets of
/// the parameter, its gradient, the two moments and the step's scalars (the update kernels'
/// eight f32: [0] lr/(1−β₁ᵗ), [1] 1/√(1−β₂ᵗ), [3] AdamW's 1 − lr·wd, [4] the clip scale), and
/// the optimizer's constants.
#[repr(C)]
#[derive(Clone, Debug, PartialEq)]
pub struct AdamCall {
    pub n: usize,
    pub param: usize,
    pub grad: usize,
    pub m: usize,
    pub v: usize,
    pub scalars: usize,
    pub b1: f32,
    pub b2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    pub decoupled: bool,
    /// The gradient is scaled by scalar [4] first (`clip norm`).
    pub clip_norm: bool,
}

impl AdamCall {
    /// One past the last byte of the arena the call reads or writes.
    pub fn extent(&self) -> usize {
        [self.param, self.grad, self.m, self.v]
            .iter()
            .map(|o| o + 4 * self.n)
            .chain([self.scalars + 32])
            .fold(0, usize::max)
    }
}

/// Updates chunk `chunk` (of [`CHUNK`] elements) of `*call`'s parameter on the arena at `base`.
/// Called by generated code only.
///
/// # Safety
/// `call` points at a live [`AdamCall`] whose [`AdamCall::extent`] fits in the arena at `base`,
/// no other thread touches this chunk meanwhile, and the CPU has AVX2 and FMA.
pub(super) unsafe extern "C" fn aec_adam(base: *mut u8, call: *const AdamCall, chunk: i64) {
    // SAFETY: the program owns `*call`, boxed, for as long as its code exists; kernels only
    // read it.
    let c = unsafe { &*call };
    let start = (chunk.max(0) as usize) * CHUNK;
    let end = (start + CHUNK).min(c.n);
    if start >= end {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `Program::compile` checked `c.extent()` against the arena and imports this
    // primitive only where `ElementwisePath::isa` found AVX2 and FMA; chunks are disjoint, so
    // threads running different chunks never touch the same element.
    unsafe {
        adam_avx2(base, c, start, end)
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn adam_avx2(base: *mut u8, c: &AdamCall, start: usize, end: usize) {
    use std::arch::x86_64::*;
    // SAFETY (the whole body): every pointer is an arena offset checked by `extent`, and
    // every index lies in `start..end ⊂ 0..n`.
    unsafe {
        let at = |off: usize| base.add(off) as *mut f32;
        let (p, g, m, v) = (at(c.param), at(c.grad), at(c.m), at(c.v));
        let s = at(c.scalars);
        let (s0, s1, s3, s4) = (*s, *s.add(1), *s.add(3), *s.add(4));
        let one_b1 = 1.0 - c.b1;
        let one_b2 = 1.0 - c.b2;
        // The Cranelift kernel's operations, lane for lane (`kernels::update`).
        let lane = |p: f32, g: f32, m: f32, v: f32| -> (f32, f32, f32) {
            let g = if c.clip_norm { g * s4 } else { g };
            let (p, g) = if c.decoupled { (p * s3, g) } else { (p, c.weight_decay.mul_add(p, g)) };
            let m = one_b1.mul_add(g - m, m);
            let v = c.b2.mul_add(v, one_b2 * (g * g));
            let den = v.sqrt().mul_add(s1, c.eps);
            (p - s0 * (m / den), m, v)
        };
        let [vs0, vs1, vs3, vs4] = [s0, s1, s3, s4].map(|x| _mm256_set1_ps(x));
        let [vb2, vb1c, vb2c, veps, vwd] =
            [c.b2, one_b1, one_b2, c.eps, c.weight_decay].map(|x| _mm256_set1_ps(x));
        let mut i = start;
        while i + 8 <= end {
            let mut gv = _mm256_loadu_ps(g.add(i));
            let mut pv = _mm256_loadu_ps(p.add(i));
            if c.clip_norm {
                gv = _mm256_mul_ps(gv, vs4);
            }
            if c.decoupled {
                pv = _mm256_mul_ps(pv, vs3);
            } else {
                gv = _mm256_fmadd_ps(vwd, pv, gv);
            }
            let mv = _mm256_loadu_ps(m.add(i));
            let vv = _mm256_loadu_ps(v.add(i));
            let mv = _mm256_fmadd_ps(vb1c, _mm256_sub_ps(gv, mv), mv);
            let vv = _mm256_fmadd_ps(vb2, vv, _mm256_mul_ps(vb2c, _mm256_mul_ps(gv, gv)));
            _mm256_storeu_ps(m.add(i), mv);
            _mm256_storeu_ps(v.add(i), vv);
            let den = _mm256_fmadd_ps(_mm256_sqrt_ps(vv), vs1, veps);
            let step = _mm256_mul_ps(vs0, _mm256_div_ps(mv, den));
            _mm256_storeu_ps(p.add(i), _mm256_sub_ps(pv, step));
            i += 8;
        }
        while i < end {
            let (np, nm, nv) = lane(*p.add(i), *g.add(i), *m.add(i), *v.add(i));
            *m.add(i) = nm;
            *v.add(i) = nv;
            *p.add(i) = np;
            i += 1;
        }
    }
}

/// `Σ exp(x − max)` over the `n` floats at byte offset `src` of the arena at `base`, each
/// exponential also stored at byte offset `dst` unless it is negative (it may be `src`): a
/// softmax row's or cross-entropy's denominator. The sum is `kernels::sum`'s at 128 bits, term
/// for term: four lane sums over the whole vectors of four (each eight-lane exponential added
/// as its two halves, in order), then `(a₀ + a₁) + (a₂ + a₃)` plus the sum of the last `n mod
/// 4` terms. The exponentials are `wide_math::exp`, the 128-bit code's lane for lane, so the
/// total and every stored value have the Cranelift kernel's bits. Called by generated code
/// only.
///
/// # Safety
/// `n` floats at `src` (and at `dst`, when stored) lie inside the arena at `base`, no other
/// thread touches them meanwhile, and the CPU has AVX2 and FMA.
pub(super) unsafe extern "C" fn aec_sum_exp(base: *mut u8, src: i64, dst: i64, n: i64, max: f32) -> f32 {
    let n = n.max(0) as usize;
    #[cfg(target_arch = "x86_64")]
    // SAFETY: as the caller promises; `Program::compile` imports this primitive only where
    // `ElementwisePath::isa` found AVX2 and FMA.
    unsafe {
        let x = base.add(src.max(0) as usize) as *const f32;
        let out = (dst >= 0).then(|| base.add(dst as usize) as *mut f32);
        sum_exp_avx2(x, out, n, max)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (base, src, dst, max);
        0.0
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn sum_exp_avx2(x: *const f32, out: Option<*mut f32>, n: usize, max: f32) -> f32 {
    use std::arch::x86_64::*;
    // SAFETY (the whole body): every index is below `n`; the last, partial vector is read and
    // written through local arrays.
    unsafe {
        let m = _mm256_set1_ps(max);
        let mut sum = Sum128::new(n);
        let mut j = 0;
        // Four vectors at a time, their exponentials interleaved (`wide_math::exp_n`), added
        // in order; then the last one to four (all of a short row's: attention's over 20
        // source positions is three), the last padded.
        while j + 32 <= n {
            sum_exp_block::<4>((x, out), j, j + 32, m, &mut sum);
            j += 32;
        }
        match (n - j).div_ceil(8) {
            4 => sum_exp_block::<4>((x, out), j, n, m, &mut sum),
            3 => sum_exp_block::<3>((x, out), j, n, m, &mut sum),
            2 => sum_exp_block::<2>((x, out), j, n, m, &mut sum),
            1 => sum_exp_block::<1>((x, out), j, n, m, &mut sum),
            _ => {}
        }
        sum.total()
    }
}

/// The exponentials of `x[j..end]` less `m`, `N` vectors (`8·(N − 1) < end − j ≤ 8·N`), added
/// to `sum` (and stored at `out`), the last vector padded.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn sum_exp_block<const N: usize>(
    (x, out): (*const f32, Option<*mut f32>),
    j: usize,
    end: usize,
    m: std::arch::x86_64::__m256,
    sum: &mut Sum128,
) {
    use std::arch::x86_64::_mm256_sub_ps;
    // SAFETY: `j..end` is inside the row, as `sum_exp_avx2`'s caller promises.
    unsafe {
        let left = end - j;
        let t = wide_math::exp_n(load_n::<N>(x.add(j), left).map(|v| _mm256_sub_ps(v, m)));
        if let Some(o) = out {
            store_n(o.add(j), &t, left);
        }
        for (i, t) in t.into_iter().enumerate() {
            sum.add(t, j + 8 * i);
        }
    }
}

/// A sum of `n` terms taken eight at a time, in the order `kernels::sum` takes them four at a
/// time at 128 bits: four lane sums over the whole vectors of four (each eight terms added as
/// their two halves), then `(a₀ + a₁) + (a₂ + a₃)` plus the sum of the last `n mod 4` terms,
/// one by one. So the total has the 128-bit kernel's bits.
#[cfg(target_arch = "x86_64")]
struct Sum128 {
    n: usize,
    lanes: std::arch::x86_64::__m128,
    tail: f32,
}

#[cfg(target_arch = "x86_64")]
impl Sum128 {
    #[target_feature(enable = "avx2,fma")]
    fn new(n: usize) -> Sum128 {
        Sum128 { n, lanes: std::arch::x86_64::_mm_setzero_ps(), tail: 0.0 }
    }

    /// Adds the terms `j..j + 8` (those below `n`), `j` a multiple of eight.
    #[target_feature(enable = "avx2,fma")]
    fn add(&mut self, terms: std::arch::x86_64::__m256, j: usize) {
        use std::arch::x86_64::*;
        if j + 8 <= self.n / 4 * 4 {
            self.lanes = _mm_add_ps(self.lanes, _mm256_castps256_ps128(terms));
            self.lanes = _mm_add_ps(self.lanes, _mm256_extractf128_ps::<1>(terms));
            return;
        }
        let fours = ((self.n / 4 * 4).saturating_sub(j) / 4).min(2);
        if fours > 0 {
            self.lanes = _mm_add_ps(self.lanes, _mm256_castps256_ps128(terms));
        }
        if fours > 1 {
            self.lanes = _mm_add_ps(self.lanes, _mm256_extractf128_ps::<1>(terms));
        }
        let mut each = [0f32; 8];
        // SAFETY: `each` holds eight floats.
        unsafe { _mm256_storeu_ps(each.as_mut_ptr(), terms) };
        for &v in &each[4 * fours..(self.n - j).min(8)] {
            self.tail += v;
        }
    }

    #[target_feature(enable = "avx2,fma")]
    fn total(&self) -> f32 {
        let mut a = [0f32; 4];
        // SAFETY: `a` holds four floats.
        unsafe { std::arch::x86_64::_mm_storeu_ps(a.as_mut_ptr(), self.lanes) };
        ((a[0] + a[1]) + (a[2] + a[3])) + self.tail
    }
}

/// A fused chain of elementwise ops (`fuse::Group::Chain`) as the full-width primitive runs
/// it: each element is loaded from `src`, put through `ops` in order and stored at `out`
/// (arena byte offsets). The chain's first op is the first of `ops`, its first operand `src`
/// (a bias add's `x`, with the bias as an `EpOp::Bias`). Work unit `u` is the elements
/// `u·len .. min((u + 1)·len, n)`; a bias is indexed by the element's place in its unit (so a
/// bias add's unit is one row of `len` columns).
#[derive(Clone, Debug, PartialEq)]
pub struct ChainCall {
    pub n: usize,
    pub len: usize,
    pub src: usize,
    pub ops: Vec<super::emit::EpOp>,
    pub out: usize,
}

impl ChainCall {
    /// One past the last byte of the arena the call reads or writes.
    pub fn extent(&self) -> usize {
        use super::emit::EpOp;
        let buffers = self.ops.iter().map(|op| match *op {
            EpOp::ActGrad(_, o) | EpOp::Binary(_, o, _) => o + 4 * self.n,
            EpOp::Bias(b) => b + 4 * self.len,
            _ => 0,
        });
        [self.src, self.out].into_iter().map(|o| o + 4 * self.n).chain(buffers).fold(0, usize::max)
    }

    /// Its work units.
    pub fn units(&self) -> usize {
        self.n.div_ceil(self.len.max(1))
    }
}

/// Runs unit `unit` of `*call`'s chain, op by op over blocks of its elements, each element
/// through the 128-bit loop's operations in the same order (`op_over`), so with its bits. Called by generated code
/// only.
///
/// # Safety
/// `call` points at a live [`ChainCall`] whose [`ChainCall::extent`] fits in the arena at
/// `base`, no other thread touches this unit's elements meanwhile, and the CPU has AVX2 and
/// FMA.
pub(super) unsafe extern "C" fn aec_chain(base: *mut u8, call: *const ChainCall, unit: i64) {
    // SAFETY: the program owns `*call`, boxed, for as long as its code exists; kernels only
    // read it.
    let c = unsafe { &*call };
    let start = (unit.max(0) as usize) * c.len;
    let end = (start + c.len).min(c.n);
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `Program::compile` checked `c.extent()` against the arena and imports this
    // primitive only where `ElementwisePath::isa` found AVX2 and FMA; units are disjoint.
    unsafe {
        let (src, out) = (base.add(c.src) as *const f32, base.add(c.out) as *mut f32);
        // Block by block through a buffer, so that `out` may be any operand's place.
        let mut buf = [0f32; BLOCK];
        let mut i = start;
        while i < end {
            let len = (end - i).min(BLOCK);
            std::ptr::copy_nonoverlapping(src.add(i), buf.as_mut_ptr(), len);
            for &op in &c.ops {
                op_over(base, op, buf.as_mut_ptr(), len, (i, i - start));
            }
            std::ptr::copy_nonoverlapping(buf.as_ptr(), out.add(i), len);
            i += len;
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (base, start, end);
}

/// Stores the first `left` (when under eight) of the eight floats `v` at `p`.
///
/// # Safety
/// `min(left, 8)` floats at `p` are writable.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn store8(p: *mut f32, v: std::arch::x86_64::__m256, left: usize) {
    use std::arch::x86_64::*;
    // SAFETY: as the caller promises.
    unsafe {
        if left >= 8 {
            _mm256_storeu_ps(p, v);
        } else {
            let mut pad = [0f32; 8];
            _mm256_storeu_ps(pad.as_mut_ptr(), v);
            std::ptr::copy_nonoverlapping(pad.as_ptr(), p, left);
        }
    }
}

/// `f` over `xs` with the full-width epilogue code (eight lanes, the last ones padded), or
/// `None` on a CPU without AVX2 and FMA: for the tests that hold it to the 128-bit kernels.
pub fn unary_full_width(f: crate::ir::UnaryFn, xs: &[f32]) -> Option<Vec<f32>> {
    ElementwisePath::Auto.isa()?;
    let mut out = xs.to_vec();
    #[cfg(target_arch = "x86_64")]
    // SAFETY: the CPU has AVX2 and FMA (`isa` above); the block is `out` itself, one row of
    // its length, and the op reads no other buffer.
    unsafe {
        epilogue_avx2(
            out.as_mut_ptr() as *mut u8,
            (0, out.len()),
            (0, 1, 0, out.len()),
            &[super::emit::EpOp::Unary(f)],
        );
    }
    Some(out)
}

/// Applies a wide matmul's epilogue `ops` in place to rows `r0..r0 + rows`, columns
/// `c0..c0 + cols` of the row-major `[_, n]` result at byte offset `out`: op by op over each
/// row (a row of the block stays in L1 between them), eight lanes at a time, the last columns
/// through the same eight-lane code on a padded copy. The operations are the Cranelift
/// kernels' (`emit::apply_ops`) in the same order — fused multiply-adds, IEEE division,
/// compares and selects — so each element gets the same bits.
///
/// # Safety
/// Every buffer `ops` names, and the block of C, lie inside the arena at `base` (the call's
/// `extent` covers them); no other thread writes this block meanwhile; the CPU has AVX2 and
/// FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn epilogue_avx2(
    base: *mut u8,
    (out, n): (usize, usize),
    (r0, rows, c0, cols): (usize, usize, usize, usize),
    ops: &[super::emit::EpOp],
) {
    // SAFETY (the whole body): offsets and indices stay in the block and the buffers `extent`
    // checked.
    unsafe {
        let dst = base.add(out) as *mut f32;
        for row in r0..r0 + rows {
            let first = row * n + c0;
            for &op in ops {
                op_over(base, op, dst.add(first), cols, (first, c0));
            }
        }
    }
}

/// Epilogue op `op` applied in place to the `len` floats at `dst`, which stand for the
/// elements of flat index `flat..` and columns `col..` (a bias's index): `emit::apply_ops`'s
/// operations for one op, eight lanes at a time, the last ones through a padded copy.
///
/// # Safety
/// `len` floats at `dst` are readable and writable, and the buffer `op` names holds them at
/// `flat` (a bias at `col`) inside the arena at `base`; the CPU has AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn op_over(
    base: *mut u8,
    op: super::emit::EpOp,
    dst: *mut f32,
    len: usize,
    (flat, col): (usize, usize),
) {
    use super::emit::EpOp;
    use crate::ir::BinaryFn;
    use std::arch::x86_64::*;
    use wide_math::{act_grad, unary, unary_n};
    // SAFETY: as the caller promises.
    unsafe {
        let at = |off: usize| base.add(off) as *const f32;
        match op {
            EpOp::Bias(off) => {
                let b = at(off).add(col);
                each8(dst, len, |v, j| _mm256_add_ps(v, load8(b.add(j), len - j)));
            }
            EpOp::Unary(f) => {
                // Four vectors at a time, their activations interleaved (`wide_math::unary_n`).
                let mut j = 0;
                while j + 32 <= len {
                    let p = dst.add(j);
                    store_n(p, &unary_n(f, load_n::<4>(p, 32)), 32);
                    j += 32;
                }
                each8(dst.add(j), len - j, |v, _| unary(f, v))
            }
            EpOp::ActGrad(f, y) => {
                let y = at(y).add(flat);
                each8(dst, len, |v, j| act_grad(f, load8(y.add(j), len - j), v));
            }
            EpOp::Binary(f, other, c_left) => {
                let o = at(other).add(flat);
                each8(dst, len, |v, j| {
                    let w = load8(o.add(j), len - j);
                    let (a, b) = if c_left { (v, w) } else { (w, v) };
                    match f {
                        BinaryFn::Add => _mm256_add_ps(a, b),
                        BinaryFn::Sub => _mm256_sub_ps(a, b),
                        BinaryFn::Mul => _mm256_mul_ps(a, b),
                        BinaryFn::Div => _mm256_div_ps(a, b),
                    }
                });
            }
            EpOp::Scale(c) => {
                let k = _mm256_set1_ps(c);
                each8(dst, len, |v, _| _mm256_mul_ps(v, k));
            }
        }
    }
}

/// Floats a full-width primitive keeps on its stack while it applies ops one by one: a block
/// small enough to stay in L1 between them.
const BLOCK: usize = 512;

/// Eight floats from `p`, of which the first `left` (when under eight) are read, the rest 0.
///
/// # Safety
/// `min(left, 8)` floats at `p` are readable.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn load8(p: *const f32, left: usize) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    // SAFETY: as the caller promises.
    unsafe {
        if left >= 8 {
            _mm256_loadu_ps(p)
        } else {
            let mut pad = [0f32; 8];
            std::ptr::copy_nonoverlapping(p, pad.as_mut_ptr(), left);
            _mm256_loadu_ps(pad.as_ptr())
        }
    }
}

/// `N` vectors from `p`, the last of them padded past `left` floats (`left > 8·(N − 1)`).
///
/// # Safety
/// `min(left, 8·N)` floats at `p` are readable.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn load_n<const N: usize>(p: *const f32, left: usize) -> wide_math::V<N> {
    use std::arch::x86_64::_mm256_loadu_ps;
    let mut v = [std::arch::x86_64::_mm256_setzero_ps(); N];
    // SAFETY: as the caller promises.
    unsafe {
        if left >= 8 * N {
            for (i, v) in v.iter_mut().enumerate() {
                *v = _mm256_loadu_ps(p.add(8 * i));
            }
        } else {
            for (i, v) in v.iter_mut().enumerate() {
                *v = load8(p.add(8 * i), left - 8 * i);
            }
        }
    }
    v
}

/// Stores `N` vectors at `p`, the last of them only up to `left` floats.
///
/// # Safety
/// `min(left, 8·N)` floats at `p` are writable.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn store_n<const N: usize>(p: *mut f32, v: &wide_math::V<N>, left: usize) {
    use std::arch::x86_64::_mm256_storeu_ps;
    // SAFETY: as the caller promises.
    unsafe {
        if left >= 8 * N {
            for (i, &v) in v.iter().enumerate() {
                _mm256_storeu_ps(p.add(8 * i), v);
            }
        } else {
            for (i, &v) in v.iter().enumerate() {
                store8(p.add(8 * i), v, left - 8 * i);
            }
        }
    }
}

/// `dst[j..j + 8] = f(dst[j..j + 8], j)` for `j` in steps of 8 below `len`, the last, partial
/// one on a padded copy.
///
/// # Safety
/// `len` floats at `dst` are readable and writable, and whatever `f` reads at `j` is too.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn each8(
    dst: *mut f32,
    len: usize,
    mut f: impl FnMut(std::arch::x86_64::__m256, usize) -> std::arch::x86_64::__m256,
) {
    use std::arch::x86_64::*;
    // SAFETY: as the caller promises; the tail goes through a local array of eight.
    unsafe {
        let mut j = 0;
        while j + 8 <= len {
            let v = _mm256_loadu_ps(dst.add(j));
            _mm256_storeu_ps(dst.add(j), f(v, j));
            j += 8;
        }
        if j < len {
            let mut pad = [0f32; 8];
            std::ptr::copy_nonoverlapping(dst.add(j), pad.as_mut_ptr(), len - j);
            let v = f(_mm256_loadu_ps(pad.as_ptr()), j);
            _mm256_storeu_ps(pad.as_mut_ptr(), v);
            std::ptr::copy_nonoverlapping(pad.as_ptr(), dst.add(j), len - j);
        }
    }
}

/// The activations and their derivatives on eight lanes, operation for operation as
/// `emit::unary`, `emit::act_grad` and `Emit::{exp, sigmoid, tanh}` write them at 128 bits.
///
/// The transcendentals also come `N` vectors at a time (`exp_n`, `sigmoid_n`, `tanh_n`): each
/// step is applied to all `N` before the next, so their dependency chains (a sigmoid's is some
/// sixty cycles long, its divide in the middle) interleave in program order and an
/// out-of-order core overlaps them; one after another, a few such chains fill its scheduler
/// and the rest waits. Each lane gets the same operations either way, so the same bits.
#[cfg(target_arch = "x86_64")]
pub(super) mod wide_math {
    use crate::ir::UnaryFn;
    use std::arch::x86_64::*;

    /// `N` independent vectors of eight lanes.
    pub type V<const N: usize> = [__m256; N];

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn map<const N: usize>(a: V<N>, f: impl Fn(__m256) -> __m256) -> V<N> {
        let mut out = a;
        for i in 0..N {
            out[i] = f(a[i]);
        }
        out
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn zip<const N: usize>(a: V<N>, b: V<N>, f: impl Fn(__m256, __m256) -> __m256) -> V<N> {
        let mut out = a;
        for i in 0..N {
            out[i] = f(a[i], b[i]);
        }
        out
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn zip3<const N: usize>(a: V<N>, b: V<N>, c: V<N>, f: impl Fn(__m256, __m256, __m256) -> __m256) -> V<N> {
        let mut out = a;
        for i in 0..N {
            out[i] = f(a[i], b[i], c[i]);
        }
        out
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn splat(x: f32) -> __m256 {
        _mm256_set1_ps(x)
    }

    /// `cond ? a : b` lane by lane (a compare's all-ones or all-zeros mask).
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn select(cond: __m256, a: __m256, b: __m256) -> __m256 {
        _mm256_blendv_ps(b, a, cond)
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn gt(a: __m256, b: __m256) -> __m256 {
        _mm256_cmp_ps::<_CMP_GT_OQ>(a, b)
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn lt(a: __m256, b: __m256) -> __m256 {
        _mm256_cmp_ps::<_CMP_LT_OQ>(a, b)
    }

    /// `Emit::clamp`: x within [lo, hi] by compare and select, and the two compares.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn clamp<const N: usize>(x: V<N>, lo: f32, hi: f32) -> (V<N>, V<N>, V<N>) {
        let above = map(x, |x| gt(x, splat(hi)));
        let x = zip(above, x, |a, x| select(a, splat(hi), x));
        let below = map(x, |x| lt(x, splat(lo)));
        (zip(below, x, |b, x| select(b, splat(lo), x)), above, below)
    }

    /// `Emit::exp_in_range`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn exp_in_range<const N: usize>(x: V<N>, negated: bool) -> V<N> {
        let sign = if negated { -1.0 } else { 1.0 };
        let magic = splat(12_582_912.0);
        let shifted = map(x, |x| _mm256_fmadd_ps(x, splat(sign * std::f32::consts::LOG2_E), magic));
        let fx = map(shifted, |s| _mm256_sub_ps(s, magic));
        let mut r = x;
        for c in [0.693_359_4, -2.121_944_4e-4] {
            let t = map(fx, |f| _mm256_mul_ps(f, splat(c)));
            r = zip(r, t, |r, t| if negated { _mm256_add_ps(r, t) } else { _mm256_sub_ps(r, t) });
        }
        let z = map(r, |r| _mm256_mul_ps(r, r));
        let coefficients =
            [1.987_569_1e-4, 1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 1.666_666_5e-1, 0.5];
        let coefficient = |i: usize, c: f32| if negated && (5 - i) % 2 == 1 { -c } else { c };
        let mut y = [splat(coefficient(0, coefficients[0])); N];
        for (i, &c) in coefficients.iter().enumerate().skip(1) {
            y = zip(y, r, |y, r| _mm256_fmadd_ps(y, r, splat(coefficient(i, c))));
        }
        let one = splat(1.0);
        let rp1 = map(r, |r| if negated { _mm256_sub_ps(one, r) } else { _mm256_add_ps(r, one) });
        let y = zip3(y, z, rp1, |y, z, rp1| _mm256_fmadd_ps(y, z, rp1));
        zip(y, shifted, |y, shifted| {
            let n = _mm256_add_epi32(_mm256_castps_si256(shifted), _mm256_set1_epi32(127));
            _mm256_mul_ps(y, _mm256_castsi256_ps(_mm256_slli_epi32::<23>(n)))
        })
    }

    /// `Emit::exp`, on `N` vectors.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(in crate::codegen) fn exp_n<const N: usize>(x: V<N>) -> V<N> {
        let (x, above, below) = clamp(x, -87.336_55, 88.376_26);
        let y = exp_in_range(x, false);
        let y = zip(above, y, |a, y| select(a, splat(f32::INFINITY), y));
        zip(below, y, |b, y| select(b, splat(0.0), y))
    }

    /// `Emit::sigmoid`, on `N` vectors.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(in crate::codegen) fn sigmoid_n<const N: usize>(x: V<N>) -> V<N> {
        let (x, _, overflows) = clamp(x, -88.376_26, 87.336_55);
        let e = exp_in_range(x, true);
        let one = splat(1.0);
        let s = map(e, |e| _mm256_div_ps(one, _mm256_add_ps(one, e)));
        zip(overflows, s, |o, s| select(o, splat(0.0), s))
    }

    /// `Emit::tanh`, on `N` vectors.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(in crate::codegen) fn tanh_n<const N: usize>(x: V<N>) -> V<N> {
        let two = splat(2.0);
        let (x2, _, _) = clamp(map(x, |x| _mm256_mul_ps(x, two)), -87.336_55, 88.376_26);
        let e = exp_in_range(x2, false);
        let one = splat(1.0);
        let far = map(e, |e| _mm256_sub_ps(one, _mm256_div_ps(two, _mm256_add_ps(e, one))));
        let z = map(x, |x| _mm256_mul_ps(x, x));
        let mut p = [splat(-5.704_988_7e-3); N];
        for c in [2.063_909e-2, -5.373_971_6e-2, 1.333_144_2e-1, -3.333_328e-1] {
            p = zip(p, z, |p, z| _mm256_fmadd_ps(p, z, splat(c)));
        }
        let xz = zip(x, z, |x, z| _mm256_mul_ps(x, z));
        let near = zip3(p, xz, x, |p, xz, x| _mm256_fmadd_ps(p, xz, x));
        let ax = map(x, |x| _mm256_and_ps(x, _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff))));
        let small = map(ax, |ax| lt(ax, splat(0.625)));
        zip3(small, near, far, |s, n, f| select(s, n, f))
    }

    /// `Emit::exp`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(in crate::codegen) fn exp(x: __m256) -> __m256 {
        exp_n([x])[0]
    }

    /// `Emit::sigmoid`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(in crate::codegen) fn sigmoid(x: __m256) -> __m256 {
        sigmoid_n([x])[0]
    }

    /// `Emit::tanh`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(in crate::codegen) fn tanh(x: __m256) -> __m256 {
        tanh_n([x])[0]
    }

    /// `emit::unary`, on `N` vectors.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(in crate::codegen) fn unary_n<const N: usize>(f: UnaryFn, x: V<N>) -> V<N> {
        match f {
            UnaryFn::Sigmoid => sigmoid_n(x),
            UnaryFn::Tanh => tanh_n(x),
            UnaryFn::Exp => exp_n(x),
            _ => map(x, |x| unary(f, x)),
        }
    }

    /// `emit::unary`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(in crate::codegen) fn unary(f: UnaryFn, x: __m256) -> __m256 {
        let zero = splat(0.0);
        match f {
            UnaryFn::Relu => select(gt(x, zero), x, zero),
            UnaryFn::LeakyRelu(a) => select(gt(x, zero), x, _mm256_mul_ps(x, splat(a))),
            UnaryFn::Sigmoid => sigmoid(x),
            UnaryFn::Tanh => tanh(x),
            UnaryFn::Abs => _mm256_and_ps(x, _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff))),
            UnaryFn::Square => _mm256_mul_ps(x, x),
            UnaryFn::Neg => _mm256_xor_ps(x, splat(-0.0)),
            UnaryFn::Exp => exp(x),
            UnaryFn::Sign => {
                let n = select(lt(x, zero), splat(-1.0), zero);
                select(gt(x, zero), splat(1.0), n)
            }
        }
    }

    /// `emit::act_grad`: `d · f′` from the activation's output `y`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(in crate::codegen) fn act_grad(f: UnaryFn, y: __m256, d: __m256) -> __m256 {
        let zero = splat(0.0);
        let one = splat(1.0);
        match f {
            UnaryFn::Relu => select(gt(y, zero), d, zero),
            UnaryFn::LeakyRelu(a) => select(gt(y, zero), d, _mm256_mul_ps(d, splat(a))),
            UnaryFn::Sigmoid => _mm256_mul_ps(d, _mm256_mul_ps(y, _mm256_sub_ps(one, y))),
            UnaryFn::Tanh => _mm256_mul_ps(d, _mm256_sub_ps(one, _mm256_mul_ps(y, y))),
            _ => d,
        }
    }
}
