//! Register tiles for the recurrent steps' small products, at 256 bits (AVX2 + FMA).
//!
//! A recurrent step's projection is small (`[16, 64]·[64, 192]` for a GRU of 64 units over a
//! unit of 16 rows) and runs once per step and unit, so what the gemm crate spends around its
//! micro-kernel — the cache plan, packing the weights again at every call — is a large share of
//! it. Here the weights are packed once per loop, by the Cranelift kernel that packs them for
//! the 128-bit path (`matmul::pack_b`: panels of 8 columns, `[⌈N/8⌉][K][8]`, zero past column
//! N), and each call runs tiles of 4 rows × 16 columns straight over them: 8 accumulators,
//! per k two loads of B, four broadcasts of A and eight `fma`s.
//!
//! Every element of C is one chain of `fma`s over k in order, from zero, like the gemm crate's
//! micro-kernels below its depth blocking and Cranelift's kernel, so the bits are theirs
//! (`full_width_recurrent_gates_give_the_cranelift_kernels_bits` compares them). Used where the
//! full-width primitives run and the wide core is AVX2 (on AVX-512 the gemm crate's wider
//! kernels stay); `AEC_ELEMENTWISE=cranelift` turns both off.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// Lanes per panel (and per vector).
const NR: usize = 8;

/// Whether a recurrent step's product runs on these tiles on this machine (given the
/// full-width primitives run): when the wide core's widest vectors are these.
pub fn fit() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        !std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// `C[rows, n] = A[rows, k]·B`: A row-major with row stride `lda`, B packed in panels of 8
/// columns (`[⌈n/8⌉][k][8]`, zero past column n), C row-major with row stride `ldc`.
///
/// # Safety
/// The CPU has AVX2 and FMA; A's `rows` rows of `k` elements, the `packed_bytes(k, n)` bytes
/// at `b` and C's `rows` rows of `n` elements are valid, and nothing else writes C meanwhile.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn product_avx2(
    (rows, n, k): (usize, usize, usize),
    (a, lda): (*const f32, usize),
    b: *const f32,
    (c, ldc): (*mut f32, usize),
) {
    let panels = n.div_ceil(NR);
    let mut p = 0;
    // SAFETY (every call below): panels `p..p + P` are inside B's packing and their columns
    // (those below n) inside C's rows, as this function's caller promises.
    while p + 2 <= panels {
        unsafe {
            column_tiles::<2>((rows, n - p * NR, k), (a, lda), b.add(p * k * NR), (c.add(p * NR), ldc))
        };
        p += 2;
    }
    if p < panels {
        unsafe {
            column_tiles::<1>((rows, n - p * NR, k), (a, lda), b.add(p * k * NR), (c.add(p * NR), ldc))
        };
    }
}

/// The tiles over `P` panels, every 4 rows and then the last 1 to 3; `cols` of C's columns
/// from the first panel's on exist (the rest of the last panel is padding).
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn column_tiles<const P: usize>(
    (rows, cols, k): (usize, usize, usize),
    (a, lda): (*const f32, usize),
    b: *const f32,
    (c, ldc): (*mut f32, usize),
) {
    let mut r = 0;
    // SAFETY (every tile): rows `r..` of A and C, as the caller promises.
    while r + 4 <= rows {
        unsafe { tile::<4, P>((cols, k), a.add(r * lda), lda, b, c.add(r * ldc), ldc) };
        r += 4;
    }
    unsafe {
        match rows - r {
            3 => tile::<3, P>((cols, k), a.add(r * lda), lda, b, c.add(r * ldc), ldc),
            2 => tile::<2, P>((cols, k), a.add(r * lda), lda, b, c.add(r * ldc), ldc),
            1 => tile::<1, P>((cols, k), a.add(r * lda), lda, b, c.add(r * ldc), ldc),
            _ => {}
        }
    }
}

/// One tile: `R` rows of C over `P` panels, accumulated in registers over all of k.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn tile<const R: usize, const P: usize>(
    (cols, k): (usize, usize),
    a: *const f32,
    lda: usize,
    b: *const f32,
    c: *mut f32,
    ldc: usize,
) {
    let mut acc = [[_mm256_setzero_ps(); P]; R];
    // SAFETY: `kk < k` stays inside each of the R rows of A and each panel's `k` rows of 8.
    unsafe {
        for kk in 0..k {
            let bv: [__m256; P] = std::array::from_fn(|j| _mm256_loadu_ps(b.add((j * k + kk) * NR)));
            for (i, row) in acc.iter_mut().enumerate() {
                let av = _mm256_broadcast_ss(&*a.add(i * lda + kk));
                for (x, bj) in row.iter_mut().zip(&bv) {
                    *x = _mm256_fmadd_ps(av, *bj, *x);
                }
            }
        }
    }
    // Lane l of the mask is set when l < valid: `MASK[8 - valid..]`.
    const MASK: [i32; 16] = [-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0];
    for (i, row) in acc.iter().enumerate() {
        for (j, x) in row.iter().enumerate() {
            let valid = cols.saturating_sub(j * NR).min(NR);
            // SAFETY: row i of C and its columns below `cols` (the rest are never written).
            unsafe {
                let dst = c.add(i * ldc + j * NR);
                if valid == NR {
                    _mm256_storeu_ps(dst, *x);
                } else if valid > 0 {
                    let mask = _mm256_loadu_si256(MASK.as_ptr().add(NR - valid).cast());
                    _mm256_maskstore_ps(dst, mask, *x);
                }
            }
        }
    }
}
