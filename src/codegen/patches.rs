//! A conv2d's patches for one work unit of the wide core: im2col of the unit's output
//! positions only, written into the calling thread's own buffer right before the unit's product
//! reads it.
//!
//! Written whole, im2col is the input copied `K·K` times: 87 MB for bench_unet's 48-channel
//! convolutions at 28×28 over a batch of 64, which the prep kernel wrote to memory and the
//! product read back. A unit's patches instead fit in the core's L2 cache: the product reads
//! them where they were just written, and nothing of that size goes to memory. The values and
//! their order are im2col's ([`super::conv`]'s prep kernel, which stays the path of the
//! 128-bit kernel), so the product's arithmetic is the same.

use std::cell::RefCell;

/// Bytes of patches a unit may have: half of a Zen 3 core's L2 (the product also reads the
/// weights and writes its block of C there).
const BUDGET: usize = 256 << 10;

/// The conv2d whose patches a unit computes: its input `[b, ci, h, w]` at byte offset `x`,
/// kernel, stride and padding per axis (`[height, width]`), output `oh × ow` per image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Patches {
    pub x: usize,
    pub b: usize,
    pub ci: usize,
    pub h: usize,
    pub w: usize,
    pub k: [usize; 2],
    pub s: [usize; 2],
    pub p: [usize; 2],
    pub oh: usize,
    pub ow: usize,
}

/// What a unit's patches are to its product.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// B itself (`[CKK, N]`): a conv2d, C's columns its output positions, a unit's patches
    /// those of its columns.
    Columns,
    /// B transposed (`[N, CKK]` stored as `[CKK, N]`): a weight gradient, the product's depth
    /// the output positions, a unit's patches its rows of CKK in chunks of positions
    /// ([`Patches::depth_chunk`]), their products added up in C.
    Depth,
}

thread_local! {
    /// Each thread's patches, reused from unit to unit.
    static BUFFER: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

impl Patches {
    /// Rows of the patches matrix: `ci·kh·kw`.
    pub fn rows(&self) -> usize {
        self.ci * self.k[0] * self.k[1]
    }

    /// Output positions (`b·oh·ow`): the patches matrix's columns, and C's.
    pub fn positions(&self) -> usize {
        self.b * self.oh * self.ow
    }

    /// One past the last byte of the input.
    pub fn extent(&self) -> usize {
        self.x + 4 * self.b * self.ci * self.h * self.w
    }

    /// Output positions per work unit: at most as many as keep a unit's patches within
    /// [`BUDGET`] (and 4,096), a multiple of 16 (the micro-kernel's rows), in an even number of
    /// units so that two threads get the same share.
    pub fn unit(&self) -> usize {
        let n = self.positions();
        let most = ((BUDGET / 4 / self.rows().max(1)) / 16 * 16).clamp(16, 512);
        let unit = |units: usize| n.div_ceil(units).next_multiple_of(16).min(n);
        // Rounding to 16 may make the count odd: more units until it is even (or so many that
        // one more is nothing).
        let mut units = n.div_ceil(most).next_multiple_of(2);
        while n.div_ceil(unit(units)) % 2 == 1 && units < 64 && unit(units) > 16 {
            units += 2;
        }
        unit(units)
    }

    /// Output positions per chunk of a weight gradient's unit of `rows` rows of patches: as
    /// many as keep the chunk within [`BUDGET`], a multiple of 16, at least 16.
    pub fn depth_chunk(rows: usize) -> usize {
        ((BUDGET / 4 / rows.max(1)) / 16 * 16).clamp(16, 4096)
    }

    /// The row stride of a unit's patches of `cols` columns: `cols + 8` (a vector's overrun)
    /// rounded up to an odd multiple of 16 floats, so that the rows the micro-kernel reads at
    /// once do not all fall in one set of the L1 cache (as `conv::row_stride` does for the
    /// whole matrix).
    pub fn stride(cols: usize) -> usize {
        let s = (cols + 8).next_multiple_of(16);
        if (s / 16).is_multiple_of(2) { s + 16 } else { s }
    }

    /// Calls `f` with rows `r0..r1` of the patches of output positions `c0..c0 + cols`,
    /// row-major `[r1 − r0, cols]` at [`Patches::stride`], in this thread's buffer.
    pub fn with<R>(
        &self,
        input: &[f32],
        (r0, r1): (usize, usize),
        (c0, cols): (usize, usize),
        f: impl FnOnce(&[f32], usize) -> R,
    ) -> R {
        let stride = Patches::stride(cols);
        let fill = |buf: &mut Vec<f32>| {
            buf.resize((r1 - r0) * stride, 0.0);
            self.fill(input, (r0, r1), (c0, cols), buf, stride);
            f(buf, stride)
        };
        BUFFER.with(|cell| match cell.try_borrow_mut() {
            Ok(mut buf) => fill(&mut buf),
            // Never nested; a fresh buffer if it ever were.
            Err(_) => fill(&mut Vec::new()),
        })
    }

    /// Writes rows `r0..r1` of the patches of positions `c0..c0 + cols` into `out` (rows
    /// `stride` apart, at least `cols + 8`): row `(c, i, j)` holds
    /// `x[img, c, oy·s + i − p, ox·s + j − p]` for each position `(img, oy, ox)`, zero in the
    /// padding. The floats of a row past `cols` are left undefined.
    pub fn fill(
        &self,
        input: &[f32],
        rows: (usize, usize),
        unit: (usize, usize),
        out: &mut [f32],
        stride: usize,
    ) {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: AVX2 was just detected.
            unsafe { self.fill_avx2(input, rows, unit, out, stride) };
            return;
        }
        self.fill_with(input, rows, unit, out, stride);
    }

    /// [`Patches::fill`] compiled for AVX2: its copies of eight floats are one load and one
    /// store each.
    ///
    /// # Safety
    /// The CPU has AVX2.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn fill_avx2(
        &self,
        input: &[f32],
        rows: (usize, usize),
        unit: (usize, usize),
        out: &mut [f32],
        stride: usize,
    ) {
        self.fill_with(input, rows, unit, out, stride);
    }

    #[inline(always)]
    fn fill_with(
        &self,
        input: &[f32],
        (r0, r1): (usize, usize),
        (c0, cols): (usize, usize),
        out: &mut [f32],
        stride: usize,
    ) {
        let plane = self.oh * self.ow;
        // The unit's positions as runs along one output row: (column in the unit, image, oy,
        // first ox, length).
        let mut runs = Vec::new();
        let mut q = 0;
        while q < cols {
            let pos = c0 + q;
            let (img, rest) = (pos / plane, pos % plane);
            let (oy, ox) = (rest / self.ow, rest % self.ow);
            let len = (self.ow - ox).min(cols - q);
            runs.push((q, img, oy, ox, len));
            q += len;
        }
        let ([kh, kw], [sy, sx], [py, px]) = (self.k, self.s, self.p);
        // An input row with `px` zeros before it and enough after it for the last window and
        // a vector's overrun: padded[t] = x[t − px], so a patches row's run is a plain
        // (strided) copy of it.
        let mut padded = vec![0.0f32; ((self.ow - 1) * sx + kw).max(px + self.w) + 8];
        let zeros = [0.0f32; 8];
        for c in 0..self.ci {
            for i in 0..kh {
                // Rows (c, i, j) for the kernel columns `js` that lie in `r0..r1`, at row
                // `first + j − r0` of `out` (never negative: `j ≥ r0 − first`).
                let first = (c * kh + i) * kw;
                if first + kw <= r0 || first >= r1 {
                    continue;
                }
                let js = r0.saturating_sub(first)..(r1 - first).min(kw);
                let at = |j: usize| (first + j - r0) * stride;
                // Runs left to right within each row, so a run's overrun past its end (at most
                // seven floats) is overwritten by the next run or falls in the row's slack.
                for &(q, img, oy, ox, len) in &runs {
                    let y = (oy * sy + i).checked_sub(py).filter(|&y| y < self.h);
                    let Some(y) = y else {
                        for j in js.clone() {
                            let run = &mut out[at(j) + q..];
                            for t in (0..len).step_by(8) {
                                run[t..t + 8].copy_from_slice(&zeros);
                            }
                        }
                        continue;
                    };
                    let src = &input[((img * self.ci + c) * self.h + y) * self.w..][..self.w];
                    // Eight at a time: a call to `memcpy` per row costs more than the copy.
                    let row = &mut padded[px..px + self.w];
                    let mut to = row.chunks_exact_mut(8);
                    let mut from = src.chunks_exact(8);
                    for (d, s) in (&mut to).zip(&mut from) {
                        d.copy_from_slice(s);
                    }
                    for (d, s) in to.into_remainder().iter_mut().zip(from.remainder()) {
                        *d = *s;
                    }
                    for j in js.clone() {
                        let run = &mut out[at(j) + q..];
                        let from = &padded[ox * sx + j..];
                        if sx == 1 {
                            for t in (0..len).step_by(8) {
                                run[t..t + 8].copy_from_slice(&from[t..t + 8]);
                            }
                        } else {
                            for (t, v) in run[..len].iter_mut().enumerate() {
                                *v = from[t * sx];
                            }
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Patches;

    /// im2col by its definition, element by element.
    fn naive(p: &Patches, x: &[f32]) -> Vec<f32> {
        let n = p.positions();
        let mut out = vec![f32::NAN; p.rows() * n];
        for c in 0..p.ci {
            for i in 0..p.k[0] {
                for j in 0..p.k[1] {
                    let row = (c * p.k[0] + i) * p.k[1] + j;
                    for pos in 0..n {
                        let (img, oy, ox) = (pos / (p.oh * p.ow), pos / p.ow % p.oh, pos % p.ow);
                        let y = (oy * p.s[0] + i) as isize - p.p[0] as isize;
                        let xx = (ox * p.s[1] + j) as isize - p.p[1] as isize;
                        let inside = (0..p.h as isize).contains(&y) && (0..p.w as isize).contains(&xx);
                        out[row * n + pos] = if inside {
                            x[((img * p.ci + c) * p.h + y as usize) * p.w + xx as usize]
                        } else {
                            0.0
                        };
                    }
                }
            }
        }
        out
    }

    #[test]
    fn every_unit_holds_im2cols_columns() {
        // Odd sizes, strides 1–3, padding wider than the kernel's reach, units crossing rows and
        // images.
        for (b, ci, h, w, k, s, p) in [
            (2, 3, 7, 5, [3, 3], [1, 1], [1, 1]),
            (3, 2, 9, 11, [3, 2], [2, 3], [1, 2]),
            (1, 1, 5, 5, [5, 5], [1, 1], [4, 4]),
            (2, 4, 6, 13, [1, 3], [3, 1], [0, 1]),
        ] {
            let oh = (h + 2 * p[0] - k[0]) / s[0] + 1;
            let ow = (w + 2 * p[1] - k[1]) / s[1] + 1;
            let pt = Patches { x: 0, b, ci, h, w, k, s, p, oh, ow };
            let x: Vec<f32> = (0..b * ci * h * w).map(|v| v as f32 + 1.0).collect();
            let want = naive(&pt, &x);
            let n = pt.positions();
            for cols in [1, 3, 7, 16, n] {
                for c0 in (0..n).step_by(cols) {
                    let cols = cols.min(n - c0);
                    let check = |got: &[f32], stride: usize, path: &str| {
                        for r in 0..pt.rows() {
                            assert_eq!(
                                &got[r * stride..r * stride + cols],
                                &want[r * n + c0..r * n + c0 + cols],
                                "{pt:?} row {r} columns {c0}..+{cols} ({path})"
                            );
                        }
                    };
                    pt.with(&x, (0, pt.rows()), (c0, cols), |got, stride| check(got, stride, "fill"));
                    // The path without AVX2 too, into a buffer dirty from before.
                    let stride = Patches::stride(cols);
                    let mut out = vec![f32::NAN; pt.rows() * stride];
                    pt.fill_with(&x, (0, pt.rows()), (c0, cols), &mut out, stride);
                    check(&out, stride, "portable");
                    // Ranges of rows that start and end inside a tap's kernel row.
                    for (r0, r1) in [(1, pt.rows()), (0, pt.rows() - 1), (2, 3), (pt.rows() / 2, pt.rows())] {
                        pt.with(&x, (r0, r1), (c0, cols), |got, stride| {
                            for r in r0..r1 {
                                assert_eq!(
                                    &got[(r - r0) * stride..(r - r0) * stride + cols],
                                    &want[r * n + c0..r * n + c0 + cols],
                                    "{pt:?} rows {r0}..{r1}, row {r}, columns {c0}..+{cols}"
                                );
                            }
                        });
                    }
                }
            }
        }
    }
}
