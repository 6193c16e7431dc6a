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
