//! Pictures where people would rather look than read: a PNG grid with one row per sample and
//! one column per kind of image (input, noisy input, output, target mask), side by side.

use aec::data::{Array, Values};
use aec::sema::Ty;
use std::path::Path;

/// One column of the grid: a title (for the message) and `[N, …]` images.
pub struct Column<'a> {
    pub title: &'static str,
    pub images: &'a Array,
}

/// The `(channels, height, width)` of a sample type, if it can be drawn: `[C, H, W]` images,
/// `[H, W]` planes, and vectors of a square length (8×8 digits flattened to 64).
pub fn image_dims(ty: &Ty) -> Option<(usize, usize, usize)> {
    let Ty::Tensor(d) = ty else { return None };
    let d: Vec<usize> = d.iter().map(|&x| x as usize).collect();
    match d.as_slice() {
        [c, h, w] => Some((*c, *h, *w)),
        [h, w] => Some((1, *h, *w)),
        [n] => {
            let side = (*n as f64).sqrt().round() as usize;
            (side * side == *n && side > 1).then_some((1, side, side))
        }
        _ => None,
    }
}

const GAP: usize = 2;
const BACKGROUND: u8 = 96;

/// Writes the grid of the first `rows` samples of each column (grayscale; a 3-channel image
/// in colour; other channel counts show their first channel). Values are clamped to [0, 1].
pub fn write_grid(
    path: &Path,
    columns: &[Column],
    (c, h, w): (usize, usize, usize),
    rows: usize,
) -> Result<String, String> {
    let rows = columns.iter().map(|col| col.images.samples()).min().unwrap_or(0).min(rows);
    if rows == 0 || columns.is_empty() {
        return Err("no samples to draw".into());
    }
    // Small images are scaled up so a digit is visible: about 96 pixels a side.
    let scale = (96 / h.max(w)).max(1);
    let (cw, ch) = (w * scale, h * scale);
    let width = columns.len() * (cw + GAP) + GAP;
    let height = rows * (ch + GAP) + GAP;
    let mut rgb = vec![BACKGROUND; width * height * 3];
    for (k, col) in columns.iter().enumerate() {
        let Values::F32(v) = &col.images.values else {
            return Err(format!("the {} are not images", col.title));
        };
        let per = col.images.sample_len();
        if per != c * h * w {
            return Err(format!("the {} have {per} values per sample, not {c}×{h}×{w}", col.title));
        }
        for r in 0..rows {
            let img = &v[r * per..(r + 1) * per];
            let (x0, y0) = (GAP + k * (cw + GAP), GAP + r * (ch + GAP));
            for y in 0..ch {
                for x in 0..cw {
                    let (sy, sx) = (y / scale, x / scale);
                    let px = |ch_: usize| {
                        let v = img[(ch_ * h + sy) * w + sx];
                        (v.clamp(0.0, 1.0) * 255.0).round() as u8
                    };
                    let (r_, g_, b_) = if c == 3 { (px(0), px(1), px(2)) } else { (px(0), px(0), px(0)) };
                    let at = ((y0 + y) * width + x0 + x) * 3;
                    rgb[at..at + 3].copy_from_slice(&[r_, g_, b_]);
                }
            }
        }
    }
    write_rgb_png(path, &rgb, (width, height))?;
    let titles: Vec<&str> = columns.iter().map(|c| c.title).collect();
    Ok(format!("{} ({rows} samples: {})", path.display(), titles.join(" | ")))
}

/// Writes `images` (`[N, …]`) as tiles, `cols` to a row, in order (generated samples, an
/// interpolation's lines). Values are clamped to [0, 1].
pub fn write_tiles(
    path: &Path,
    images: &Array,
    (c, h, w): (usize, usize, usize),
    cols: usize,
) -> Result<String, String> {
    let Values::F32(v) = &images.values else {
        return Err("the samples are not images".into());
    };
    let (n, per) = (images.samples(), images.sample_len());
    if n == 0 || cols == 0 {
        return Err("no samples to draw".into());
    }
    if per != c * h * w {
        return Err(format!("the samples have {per} values each, not {c}×{h}×{w}"));
    }
    let rows = n.div_ceil(cols);
    let scale = (96 / h.max(w)).max(1);
    let (cw, ch) = (w * scale, h * scale);
    let (width, height) = (cols * (cw + GAP) + GAP, rows * (ch + GAP) + GAP);
    let mut rgb = vec![BACKGROUND; width * height * 3];
    for (k, img) in v.chunks(per).enumerate() {
        let (x0, y0) = (GAP + (k % cols) * (cw + GAP), GAP + (k / cols) * (ch + GAP));
        for y in 0..ch {
            for x in 0..cw {
                let px = |plane: usize| {
                    (img[(plane * h + y / scale) * w + x / scale].clamp(0.0, 1.0) * 255.0).round() as u8
                };
                let at = ((y0 + y) * width + x0 + x) * 3;
                let pixel = if c == 3 { [px(0), px(1), px(2)] } else { [px(0); 3] };
                rgb[at..at + 3].copy_from_slice(&pixel);
            }
        }
    }
    write_rgb_png(path, &rgb, (width, height))?;
    Ok(format!("{} ({n} samples, {cols} to a row)", path.display()))
}

/// Writes 8-bit RGB pixels as a PNG file, atomically.
pub fn write_rgb_png(path: &Path, rgb: &[u8], (width, height): (usize, usize)) -> Result<(), String> {
    let mut bytes = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut bytes, width as u32, height as u32);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let mut writer = enc.write_header().map_err(|e| e.to_string())?;
        writer.write_image_data(rgb).map_err(|e| e.to_string())?;
    }
    aec::files::write_atomic(path, &bytes).map_err(|e| format!("cannot write {}: {e}", path.display()))
}
