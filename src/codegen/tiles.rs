//! Register tiles for small products, at 256 bits (AVX2 + FMA): a recurrent step's
//! projection and attention's `batch_matmul`s.
//!
//! These products are small (`[16, 64]·[64, 192]` for a GRU of 64 units over a unit of 16
//! rows, `[20, 64]·[64, 20]` for an attention's scores over 20 positions) and run once per step
//! and unit, so what the gemm crate spends around its micro-kernel — the cache plan, packing
//! both operands at every call — is a large share of them. Here a recurrent loop's weights are
//! packed once per loop, by the Cranelift kernel that packs them for the 128-bit path
//! (`matmul::pack_b`: panels of 8 columns, `[⌈N/8⌉][K][8]`, zero past column N); an attention
//! product reads B as stored when its rows are contiguous (the last panel through masked
//! loads) and packs it per call otherwise. Each call runs tiles of 4 rows × 16 columns: 8
//! accumulators, per k two loads of B, four broadcasts of A and eight `fma`s.
//!
//! Every element of C is one chain of `fma`s over k in order, from zero (tested bit for bit
//! against that chain, below), as the gemm crate's micro-kernels compute most products below
//! its depth blocking, so a recurrent loop gets the crate's bits (tested). Used where the wide
//! core is AVX2 (on AVX-512 the crate's wider kernels stay) and `AEC_MATMUL` is `auto`;
//! `AEC_MATMUL=gemm` keeps the crate for these products too.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// Lanes per panel (and per vector).
const NR: usize = 8;

/// Whether small products run on these tiles on this machine: when the wide core's widest
/// vectors are theirs (AVX2 and FMA, no AVX-512).
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

/// How a tile reads B: packed in panels of 8 columns (`[⌈n/8⌉][k][8]`, zero past column n),
/// or row-major as stored (`B(kk, j)` at `kk·ldb + j`).
#[derive(Clone, Copy, Debug)]
pub(super) enum BRows {
    Panels(*const f32),
    RowMajor(*const f32, usize),
}

impl BRows {
    /// The same matrix from panel `p` (column `8p`) on.
    fn at_panel(self, p: usize, k: usize) -> BRows {
        match self {
            BRows::Panels(b) => BRows::Panels(b.wrapping_add(p * k * NR)),
            BRows::RowMajor(b, ldb) => BRows::RowMajor(b.wrapping_add(p * NR), ldb),
        }
    }
}

/// `C[rows, n] = A[rows, k]·B`: A's element (i, kk) at `i·a_rs + kk·a_cs`, B as `b` says, C
/// row-major with row stride `ldc`.
///
/// # Safety
/// The CPU has AVX2 and FMA; A's `rows × k` elements, B's `k × n` (and a packing's padding)
/// and C's `rows` rows of `n` elements are valid, and nothing else writes C meanwhile.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn product_avx2(
    (rows, n, k): (usize, usize, usize),
    a: (*const f32, isize, isize),
    b: BRows,
    (c, ldc): (*mut f32, usize),
) {
    let panels = n.div_ceil(NR);
    let mut p = 0;
    // SAFETY (every call below): panels `p..p + P` are inside B and their columns (those
    // below n) inside C's rows, as this function's caller promises.
    while p + 2 <= panels {
        unsafe { column_tiles::<2>((rows, n - p * NR, k), a, b.at_panel(p, k), (c.add(p * NR), ldc)) };
        p += 2;
    }
    if p < panels {
        unsafe { column_tiles::<1>((rows, n - p * NR, k), a, b.at_panel(p, k), (c.add(p * NR), ldc)) };
    }
}

/// The tiles over `P` panels, every 4 rows and then the last 1 to 3; `cols` of C's columns
/// from the first panel's on exist (the rest of the last panel is padding).
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn column_tiles<const P: usize>(
    (rows, cols, k): (usize, usize, usize),
    (a, a_rs, a_cs): (*const f32, isize, isize),
    b: BRows,
    (c, ldc): (*mut f32, usize),
) {
    let mut r = 0;
    let row = |r: usize| (a.wrapping_offset(r as isize * a_rs), a_rs, a_cs);
    // SAFETY (every tile): rows `r..` of A and C, as the caller promises.
    while r + 4 <= rows {
        unsafe { tile::<4, P>((cols, k), row(r), b, (c.add(r * ldc), ldc)) };
        r += 4;
    }
    unsafe {
        match rows - r {
            3 => tile::<3, P>((cols, k), row(r), b, (c.add(r * ldc), ldc)),
            2 => tile::<2, P>((cols, k), row(r), b, (c.add(r * ldc), ldc)),
            1 => tile::<1, P>((cols, k), row(r), b, (c.add(r * ldc), ldc)),
            _ => {}
        }
    }
}

/// Lane l of `MASK[8 - valid..]` is set when l < valid.
const MASK: [i32; 16] = [-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0];

/// The mask of the first `valid` lanes (at most 8).
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,fma")]
fn lanes(valid: usize) -> __m256i {
    // SAFETY: `8 - valid.min(8)` leaves 8 elements of `MASK` to read.
    unsafe { _mm256_loadu_si256(MASK.as_ptr().add(NR - valid.min(NR)).cast()) }
}

/// One tile: `R` rows of C over `P` panels, accumulated in registers over all of k.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn tile<const R: usize, const P: usize>(
    (cols, k): (usize, usize),
    (a, a_rs, a_cs): (*const f32, isize, isize),
    b: BRows,
    (c, ldc): (*mut f32, usize),
) {
    let valid: [usize; P] = std::array::from_fn(|j| cols.saturating_sub(j * NR).min(NR));
    let mut acc = [[_mm256_setzero_ps(); P]; R];
    let mut step = |bv: [__m256; P], kk: usize| {
        for (i, row) in acc.iter_mut().enumerate() {
            // SAFETY: element (i, kk) of A, `kk < k`, as `product_avx2`'s caller promises.
            let av = unsafe { _mm256_broadcast_ss(&*a.offset(i as isize * a_rs + kk as isize * a_cs)) };
            for (x, bj) in row.iter_mut().zip(&bv) {
                *x = _mm256_fmadd_ps(av, *bj, *x);
            }
        }
    };
    // SAFETY (the loads): row kk < k of each panel, its lanes below `valid` as stored (a
    // packing's padding is inside it).
    match b {
        BRows::Panels(b) => {
            for kk in 0..k {
                step(std::array::from_fn(|j| unsafe { _mm256_loadu_ps(b.add((j * k + kk) * NR)) }), kk);
            }
        }
        BRows::RowMajor(b, ldb) if valid[P - 1] == NR => {
            for kk in 0..k {
                step(std::array::from_fn(|j| unsafe { _mm256_loadu_ps(b.add(kk * ldb + j * NR)) }), kk);
            }
        }
        BRows::RowMajor(b, ldb) => {
            let masks = valid.map(|v| lanes(v));
            for kk in 0..k {
                step(
                    std::array::from_fn(|j| unsafe {
                        _mm256_maskload_ps(b.add(kk * ldb + j * NR), masks[j])
                    }),
                    kk,
                );
            }
        }
    }
    for (i, row) in acc.iter().enumerate() {
        for (j, x) in row.iter().enumerate() {
            // SAFETY: row i of C and its columns below `cols` (the rest are never written).
            unsafe {
                let dst = c.add(i * ldc + j * NR);
                if valid[j] == NR {
                    _mm256_storeu_ps(dst, *x);
                } else if valid[j] > 0 {
                    _mm256_maskstore_ps(dst, lanes(valid[j]), *x);
                }
            }
        }
    }
}

/// B (`B(kk, j)` at `kk·b_rs + j·b_cs`) packed in panels of 8 columns, zero past column n: for
/// a B stored transposed, whose rows of 8 are not contiguous.
///
/// # Safety
/// B's `k × n` elements are valid.
pub(super) unsafe fn pack(b: *const f32, (b_rs, b_cs): (isize, isize), (k, n): (usize, usize)) -> Vec<f32> {
    let mut out = vec![0.0; k * n.div_ceil(NR) * NR];
    for col in 0..n {
        for kk in 0..k {
            // SAFETY: element (kk, col) of B, as the caller promises.
            out[(col / NR * k + kk) * NR + col % NR] =
                unsafe { *b.offset(kk as isize * b_rs + col as isize * b_cs) };
        }
    }
    out
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::{BRows, pack, product_avx2};

    /// Every element of C must be the chain `fma(a[i,k-1], b[k-1,j], … fma(a[i,0], b[0,j], 0))`
    /// bit for bit: rows leaving 0 to 3 past a tile of 4, columns leaving 0 to 7 past a panel
    /// and an odd count of panels, every transpose, B row-major (masked loads in the last
    /// panel), packed by `pack` and transposed; C wider than its columns (`ldc > n`) left
    /// untouched past them.
    #[test]
    fn tiles_give_the_chain_of_fmas_in_order() {
        if !super::fit() {
            return;
        }
        let value = |i: usize, salt: usize| ((i * 7919 + salt * 104_729) % 1999) as f32 / 997.0 - 1.0;
        for (m, n, k) in
            [(1, 1, 1), (3, 5, 2), (4, 8, 7), (5, 9, 13), (7, 17, 1), (9, 23, 31), (13, 35, 13), (6, 40, 64)]
        {
            for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
                let a: Vec<f32> = (0..m * k).map(|i| value(i, 1)).collect();
                let b: Vec<f32> = (0..k * n).map(|i| value(i, 2)).collect();
                let (a_rs, a_cs) = if ta { (1, m) } else { (k, 1) };
                let (b_rs, b_cs) = if tb { (1, k) } else { (n, 1) };
                let want: Vec<u32> = (0..m * n)
                    .map(|e| {
                        let (i, j) = (e / n, e % n);
                        let chain = (0..k)
                            .fold(0f32, |acc, q| a[i * a_rs + q * a_cs].mul_add(b[q * b_rs + j * b_cs], acc));
                        chain.to_bits()
                    })
                    .collect();
                let ldc = n + 3;
                let mut ways = Vec::new();
                // SAFETY: the sizes are the buffers'.
                let packed = unsafe { pack(b.as_ptr(), (b_rs as isize, b_cs as isize), (k, n)) };
                ways.push(("packed", BRows::Panels(packed.as_ptr())));
                if !tb {
                    ways.push(("row-major", BRows::RowMajor(b.as_ptr(), n)));
                }
                for (how, rows) in ways {
                    let mut c = vec![-7.0f32; m * ldc];
                    // SAFETY: A, B and C hold the elements these sizes and strides reach; the
                    // test returned above where the CPU lacks AVX2 or FMA.
                    unsafe {
                        product_avx2(
                            (m, n, k),
                            (a.as_ptr(), a_rs as isize, a_cs as isize),
                            rows,
                            (c.as_mut_ptr(), ldc),
                        )
                    };
                    let got: Vec<u32> = (0..m * n).map(|e| c[e / n * ldc + e % n].to_bits()).collect();
                    assert!(got == want, "{m}×{n}×{k} ta {ta} tb {tb}, B {how}");
                    let untouched = (0..m).all(|i| c[i * ldc + n..(i + 1) * ldc].iter().all(|&v| v == -7.0));
                    assert!(untouched, "{m}×{n}×{k} ta {ta} tb {tb}, B {how}: wrote past column n");
                }
            }
        }
    }
}
