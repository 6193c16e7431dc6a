//! Data: loaders (npy, csv, idx, synthetic sources), binding data to the model's inputs with a
//! shape check, batching, shuffling and input noise. It knows the model's declared types, not
//! its layers.

pub mod images;
pub mod npy;
pub mod stored;
pub mod text;

use crate::sema::{Ty, Var};
use crate::syntax::ast::{DataSource, Noise, SeqTask};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::path::{Path, PathBuf};

/// Numbers of one array, row-major.
#[derive(Clone, Debug, PartialEq)]
pub enum Values {
    F32(Vec<f32>),
    I32(Vec<i32>),
}

/// An n-dimensional array; the first axis counts samples.
#[derive(Clone, Debug, PartialEq)]
pub struct Array {
    pub shape: Vec<usize>,
    pub values: Values,
}

impl Array {
    pub fn len(&self) -> usize {
        match &self.values {
            Values::F32(v) => v.len(),
            Values::I32(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn samples(&self) -> usize {
        self.shape.first().copied().unwrap_or(0)
    }

    /// Values per sample.
    pub fn sample_len(&self) -> usize {
        self.shape.iter().skip(1).product()
    }
}

/// A data problem, with the file or source it concerns.
#[derive(Debug, thiserror::Error)]
#[error("{what}")]
pub struct DataError {
    pub what: String,
}

pub(crate) fn err(what: impl Into<String>) -> DataError {
    DataError { what: what.into() }
}

/// The bytes of a data file. Only regular files (or links to one) are data: a device, a FIFO
/// or a folder is refused before anything is read, so `/dev/zero` cannot be read without end.
fn read_file(path: &Path) -> Result<Vec<u8>, DataError> {
    let meta = std::fs::metadata(path).map_err(|e| err(format!("cannot read {}: {e}", path.display())))?;
    if !meta.is_file() {
        let kind = if meta.is_dir() { "a folder" } else { "not a regular file (a device, FIFO or socket)" };
        return Err(err(format!("{} is {kind}; data must be a regular file", path.display())));
    }
    crate::memory::check(&format!("reading {}", path.display()), Some(meta.len()), "use a smaller file")
        .map_err(err)?;
    std::fs::read(path).map_err(|e| err(format!("cannot read {}: {e}", path.display())))
}

/// Reads a `.npy` file.
pub fn read_npy(path: &Path) -> Result<Array, DataError> {
    let bytes = read_file(path)?;
    npy::parse(&bytes).map_err(|e| err(format!("{}: {e}", path.display())))
}

/// Writes a `.npy` file atomically (temporary file, then rename).
pub fn write_npy(path: &Path, a: &Array) -> Result<(), DataError> {
    crate::files::write_atomic(path, &npy::to_bytes(a))
        .map_err(|e| err(format!("cannot write {}: {e}", path.display())))
}

/// Loads a source. Paths are relative to `base` (the spec's folder); `sample` is the declared
/// per-sample type, which sizes the synthetic sources. `part` picks the array of a source that
/// gives several: the sequence tasks give the input sentences (0) and their targets (1).
pub fn load(src: &DataSource, base: &Path, sample: &Ty, seed: u64, part: usize) -> Result<Array, DataError> {
    let path = |p: &str| -> PathBuf { base.join(p) };
    let scaled = |mut a: Array, scale: f64| {
        if let Values::F32(v) = &mut a.values
            && scale != 1.0
        {
            v.iter_mut().for_each(|x| *x = (f64::from(*x) * scale) as f32);
        }
        a
    };
    // Generated data is sized before it is made: `count` and `n` come from the spec.
    let generated = |what: &str, floats: Option<u64>| {
        crate::memory::check(what, floats.and_then(|f| f.checked_mul(4)), "generate fewer samples")
            .map_err(err)
    };
    match src {
        DataSource::OneHot { n } => generated(&format!("onehot({n})"), n.checked_mul(*n))?,
        DataSource::Random { count } => {
            generated(&format!("random(count: {count})"), count.checked_mul(sample.numel()))?
        }
        DataSource::SeqTask { len, count, .. } => {
            generated("the sequence task's data", count.checked_mul(*len))?
        }
        DataSource::Translation { count } => {
            generated("translation's data", count.checked_mul(TRANSLATION_SRC_LEN as u64 + 1))?
        }
        _ => {}
    }
    Ok(match src {
        DataSource::OneHot { n } => {
            let n = *n as usize;
            let mut v = vec![0.0; n * n];
            (0..n).for_each(|i| v[i * n + i] = 1.0);
            Array { shape: vec![n, n], values: Values::F32(v) }
        }
        DataSource::Npy { path: p, scale } => scaled(read_npy(&path(p))?, *scale),
        DataSource::Csv { path: p, scale } => scaled(read_csv(&path(p))?, *scale),
        DataSource::Idx { path: p, scale } => scaled(read_idx(&path(p))?, *scale),
        DataSource::Patches { source, size, stride } => {
            patches(&load(source, base, sample, seed, part)?, *size as usize, *stride as usize)?
        }
        DataSource::Random { count } => {
            let per = sample.numel() as usize;
            let n = *count as usize;
            let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5EED_DA7A);
            let v: Vec<f32> = (0..n * per).map(|_| rng.random::<f32>()).collect();
            let mut shape = vec![n];
            if let Ty::Tensor(d) = sample {
                shape.extend(d.iter().map(|&x| x as usize));
            }
            Array { shape, values: Values::F32(v) }
        }
        DataSource::SeqTask { task, len, vocab, count } => {
            let (n, len, vocab) = (*count as usize, *len as usize, *vocab as i32);
            let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x0005_E0DA_7A00);
            let src: Vec<i32> = (0..n * len).map(|_| rng.random_range(0..vocab)).collect();
            let ids = match (part, task) {
                (0, _) | (_, SeqTask::Copy) => src,
                (_, SeqTask::Reverse) => src.chunks(len).flat_map(|s| s.iter().rev().copied()).collect(),
            };
            Array { shape: vec![n, len], values: Values::I32(ids) }
        }
        // Decoded into a cache and read a batch at a time: `load_column`.
        DataSource::Images { .. } => {
            return Err(err("an image folder is read with its variable's size (data::load_column)"));
        }
        // Its vocabularies come from the training split: `text::load`, given the split.
        DataSource::Text { .. } => {
            return Err(err("a text source is read with its split (data::text::load)"));
        }
        DataSource::Translation { count } => {
            let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x7A57_DA7A);
            let n = *count as usize;
            let src: Vec<i32> = (0..n * TRANSLATION_SRC_LEN).map(|_| rng.random_range(0..12)).collect();
            let (len, ids) = if part == 0 {
                (TRANSLATION_SRC_LEN, src)
            } else {
                (TRANSLATION_SRC_LEN + 1, src.chunks(TRANSLATION_SRC_LEN).flat_map(translate).collect())
            };
            Array { shape: vec![n, len], values: Values::I32(ids) }
        }
    })
}

/// Words per sentence of the toy translation task's source language (vocabulary 12); its
/// target sentences have one more word (vocabulary 14).
pub const TRANSLATION_SRC_LEN: usize = 6;

/// The toy translation: each source word `w` becomes the target word `2 + (5w + 3) mod 12`
/// (a dictionary), each adjacent pair of words is swapped (adjectives follow their nouns in
/// the target language), and a final particle, 0 or 1, agrees with the first source word
/// (below 6 or not) — so the decoder needs the whole sentence, not one word at a time.
pub fn translate(src: &[i32]) -> Vec<i32> {
    let word = |w: i32| 2 + (5 * w + 3) % 12;
    let mut out: Vec<i32> = src.chunks(2).flat_map(|p| p.iter().rev().map(|&w| word(w))).collect();
    out.push(i32::from(src.first().is_some_and(|&w| w >= 6)));
    out
}

/// A CSV file of numbers, one sample per row; a first row that is not numeric is a header.
pub fn read_csv(path: &Path) -> Result<Array, DataError> {
    let text = String::from_utf8(read_file(path)?)
        .map_err(|_| err(format!("{}: not a text file (it is not UTF-8)", path.display())))?;
    // A byte-order mark is not part of the first cell.
    let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
    let mut rows: Vec<Vec<f32>> = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let cells: Vec<&str> = line.split(',').map(str::trim).collect();
        let parsed: Result<Vec<f32>, _> = cells.iter().map(|c| c.parse::<f32>()).collect();
        match parsed {
            Ok(r) => rows.push(r),
            // A header is a first line with no number in it; a first row with a typo is an error.
            Err(_) if i == 0 && cells.iter().all(|c| c.parse::<f64>().is_err()) => continue,
            Err(_) => {
                return Err(err(format!("{}:{}: not a row of numbers: {line:?}", path.display(), i + 1)));
            }
        }
        if let (Some(first), Some(last)) = (rows.first(), rows.last())
            && first.len() != last.len()
        {
            return Err(err(format!(
                "{}:{}: {} columns, but the first row has {}",
                path.display(),
                i + 1,
                last.len(),
                first.len()
            )));
        }
    }
    let cols = rows.first().map_or(0, Vec::len);
    if rows.is_empty() {
        return Err(err(format!("{}: no rows of numbers", path.display())));
    }
    Ok(Array { shape: vec![rows.len(), cols], values: Values::F32(rows.concat()) })
}

/// The header line `read_csv` skips in `path` (a first line with no number in it), if any.
pub fn csv_header(path: &Path) -> Option<String> {
    let text = String::from_utf8(read_file(path).ok()?).ok()?;
    let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
    let first = text.lines().next()?;
    let cells: Vec<&str> = first.split(',').map(str::trim).collect();
    (!first.trim().is_empty() && cells.iter().all(|c| c.parse::<f64>().is_err())).then(|| first.to_owned())
}

/// An IDX file (MNIST's format): magic `00 00 type ndim`, big-endian u32 sizes, then data.
pub fn read_idx(path: &Path) -> Result<Array, DataError> {
    let bytes = read_file(path)?;
    let bad = |m: &str| err(format!("{}: {m}", path.display()));
    if bytes.len() < 4 || bytes[0] != 0 || bytes[1] != 0 {
        return Err(bad("not an IDX file (it does not start with two zero bytes)"));
    }
    let (kind, ndim) = (bytes[2], usize::from(bytes[3]));
    let head = 4 + 4 * ndim;
    if bytes.len() < head {
        return Err(bad("the IDX header is cut short"));
    }
    let shape: Vec<usize> = (0..ndim)
        .map(|i| {
            u32::from_be_bytes([bytes[4 + 4 * i], bytes[5 + 4 * i], bytes[6 + 4 * i], bytes[7 + 4 * i]])
                as usize
        })
        .collect();
    let count = shape
        .iter()
        .try_fold(1usize, |a, &b| a.checked_mul(b))
        .ok_or_else(|| bad(&format!("the IDX shape {shape:?} is too large")))?;
    let data = &bytes[head..];
    let size = match kind {
        0x08 | 0x09 => 1,
        0x0B => 2,
        0x0C | 0x0D => 4,
        0x0E => 8,
        k => return Err(bad(&format!("unknown IDX data type 0x{k:02x}"))),
    };
    let need =
        count.checked_mul(size).ok_or_else(|| bad(&format!("the IDX shape {shape:?} is too large")))?;
    crate::memory::check(
        &format!("{}'s values", path.display()),
        (count as u64).checked_mul(4),
        "use a smaller file",
    )
    .map_err(err)?;
    if data.len() != need {
        let what = if data.len() < need { "truncated" } else { "longer than its header says" };
        return Err(bad(&format!(
            "{what}: shape {shape:?} needs {need} bytes of data, it has {}",
            data.len()
        )));
    }
    let v: Vec<f32> = match kind {
        0x08 => data[..count].iter().map(|&b| f32::from(b)).collect(),
        0x09 => data[..count].iter().map(|&b| f32::from(b as i8)).collect(),
        0x0B => {
            data.chunks_exact(2).take(count).map(|c| f32::from(i16::from_be_bytes([c[0], c[1]]))).collect()
        }
        0x0C => data
            .chunks_exact(4)
            .take(count)
            .map(|c| i32::from_be_bytes([c[0], c[1], c[2], c[3]]) as f32)
            .collect(),
        0x0D => {
            data.chunks_exact(4).take(count).map(|c| f32::from_be_bytes([c[0], c[1], c[2], c[3]])).collect()
        }
        _ => data
            .chunks_exact(8)
            .take(count)
            .map(|c| f64::from_be_bytes(c.try_into().unwrap_or([0; 8])) as f32)
            .collect(),
    };
    Ok(Array { shape, values: Values::F32(v) })
}

/// Square patches of `size` every `stride` pixels, from `[H, W]` or `[N, H, W]` (or
/// `[N, 1, H, W]`) images: `[P, size, size]`.
fn patches(a: &Array, size: usize, stride: usize) -> Result<Array, DataError> {
    let Values::F32(v) = &a.values else {
        return Err(err("patches need real-valued images"));
    };
    let (n, h, w) = match a.shape.as_slice() {
        [h, w] => (1, *h, *w),
        [n, h, w] | [n, 1, h, w] => (*n, *h, *w),
        s => {
            return Err(err(format!("patches need [H, W] or [N, H, W] images, got {s:?}")));
        }
    };
    if size > h || size > w {
        return Err(err(format!("patches of {size}×{size} do not fit images of {h}×{w}")));
    }
    let mut out = Vec::new();
    let mut count = 0;
    for img in 0..n {
        for y in (0..=h - size).step_by(stride) {
            for x in (0..=w - size).step_by(stride) {
                for r in 0..size {
                    let row = img * h * w + (y + r) * w + x;
                    out.extend_from_slice(&v[row..row + size]);
                }
                count += 1;
            }
        }
    }
    Ok(Array { shape: vec![count, size, size], values: Values::F32(out) })
}

/// One variable's samples: in memory, or read from their file a batch at a time (`stored`):
/// whole samples, or the patches of its images.
#[derive(Clone, Debug)]
pub enum Column {
    Memory(Array),
    Stored(std::sync::Arc<stored::Stored>),
    Patches(std::sync::Arc<StoredPatches>),
}

/// `patches(npy(…))` of a stored file: patch `i` is read (a row at a time) when a batch needs it.
#[derive(Debug)]
pub struct StoredPatches {
    source: stored::Stored,
    /// Patch side, stride, image height and width, patches per image row and per image.
    size: usize,
    stride: usize,
    hw: (usize, usize),
    across: usize,
    per_image: usize,
    shape: Vec<usize>,
}

impl StoredPatches {
    fn new(source: stored::Stored, size: usize, stride: usize) -> Result<StoredPatches, DataError> {
        let (n, h, w) = match source.shape.as_slice() {
            [h, w] => (1, *h, *w),
            [n, h, w] | [n, 1, h, w] => (*n, *h, *w),
            s => return Err(err(format!("patches need [H, W] or [N, H, W] images, got {s:?}"))),
        };
        if size > h || size > w || size == 0 || stride == 0 {
            return Err(err(format!("patches of {size}×{size} do not fit images of {h}×{w}")));
        }
        let (down, across) = ((h - size) / stride + 1, (w - size) / stride + 1);
        let shape = vec![n * down * across, size, size];
        Ok(StoredPatches { source, size, stride, hw: (h, w), across, per_image: down * across, shape })
    }

    fn gather(&self, idx: &[usize]) -> Result<Values, DataError> {
        self.source.check_length()?;
        let (h, w) = self.hw;
        let mut out = Vec::with_capacity(idx.len() * self.size * self.size);
        for &p in idx {
            let (img, at) = (p / self.per_image, p % self.per_image);
            let (y, x) = (at / self.across * self.stride, at % self.across * self.stride);
            for r in 0..self.size {
                self.source.read_run(img * h * w + (y + r) * w + x, self.size, &mut out)?;
            }
        }
        Ok(Values::F32(out))
    }
}

impl Column {
    pub fn shape(&self) -> &[usize] {
        match self {
            Column::Memory(a) => &a.shape,
            Column::Stored(s) => &s.shape,
            Column::Patches(p) => &p.shape,
        }
    }

    pub fn samples(&self) -> usize {
        self.shape().first().copied().unwrap_or(0)
    }

    /// Values per sample.
    pub fn sample_len(&self) -> usize {
        self.shape().iter().skip(1).product()
    }

    /// The samples `idx`, as one batch.
    pub fn gather(&self, idx: &[usize]) -> Result<Values, DataError> {
        match self {
            Column::Memory(a) => {
                let per = a.sample_len();
                Ok(match &a.values {
                    Values::F32(v) => Values::F32(
                        idx.iter().flat_map(|&i| v[i * per..(i + 1) * per].iter().copied()).collect(),
                    ),
                    Values::I32(v) => Values::I32(
                        idx.iter().flat_map(|&i| v[i * per..(i + 1) * per].iter().copied()).collect(),
                    ),
                })
            }
            Column::Stored(s) => s.gather(idx),
            Column::Patches(p) => p.gather(idx),
        }
    }
}

/// Loads a source for the variable `var`: a `.npy` file of `u8`, `u16`, `f16` or `f32` (and a
/// decoded image folder) as a `Stored` column read a batch at a time — unless
/// `AEC_DATA=memory` asks for every source in memory —, any other source in memory, checked
/// against `var` (`conform`). `threads` decode images.
pub fn load_column(
    src: &DataSource,
    base: &Path,
    var: &Var,
    (seed, part, threads): (u64, usize, usize),
) -> Result<Column, DataError> {
    let origin = src.to_string();
    let in_memory = std::env::var("AEC_DATA").is_ok_and(|v| v == "memory");
    let stored = match src {
        DataSource::Npy { path, scale } if matches!(var.ty, Ty::Tensor(_)) && !in_memory => {
            stored::Stored::open(&base.join(path), *scale)?
        }
        DataSource::Images { path, fit, scale } => {
            let (s, _) = open_images(&base.join(path), var, (*fit, *scale), threads)?;
            if in_memory {
                return conform(
                    Array {
                        shape: s.shape.clone(),
                        values: s.gather(&(0..s.samples()).collect::<Vec<_>>())?,
                    },
                    var,
                    &origin,
                )
                .map(Column::Memory);
            }
            Some(s)
        }
        DataSource::Patches { source, size, stride } if !in_memory && matches!(var.ty, Ty::Tensor(_)) => {
            let DataSource::Npy { path, scale } = source.as_ref() else {
                return conform(load(src, base, &var.ty, seed, part)?, var, &origin).map(Column::Memory);
            };
            let Some(file) = stored::Stored::open(&base.join(path), *scale)? else {
                return conform(load(src, base, &var.ty, seed, part)?, var, &origin).map(Column::Memory);
            };
            file.check_finite()?;
            let p = StoredPatches::new(file, *size as usize, *stride as usize)?;
            check_shape(&p.shape, var, &origin)?;
            return Ok(Column::Patches(std::sync::Arc::new(p)));
        }
        _ => None,
    };
    match stored {
        Some(s) => {
            check_shape(&s.shape, var, &origin)?;
            if s.samples() == 0 {
                return Err(err(format!("{origin} has no samples")));
            }
            s.check_finite()?;
            Ok(Column::Stored(std::sync::Arc::new(s)))
        }
        None => conform(load(src, base, &var.ty, seed, part)?, var, &origin).map(Column::Memory),
    }
}

/// The images under `root` at `var`'s `[C, H, W]`, decoded (or found in the cache, with the
/// run told when it decodes and warned of each file it skips) and opened a batch at a time
/// with `scale`; and the folder's listing (files, labels).
pub fn open_images(
    root: &Path,
    var: &Var,
    (fit, scale): (crate::syntax::ast::ImageFit, f64),
    threads: usize,
) -> Result<(stored::Stored, images::Listing), DataError> {
    let dims = match &var.ty {
        Ty::Tensor(d) => <[u64; 3]>::try_from(d.as_slice()).ok(),
        _ => None,
    };
    let Some([c, h, w]) = dims else {
        return Err(err(format!("`images` gives [C, H, W] pictures, and `{}` is {}", var.name, var.ty)));
    };
    let fit = match fit {
        crate::syntax::ast::ImageFit::Crop => images::Fit::Crop,
        crate::syntax::ast::ImageFit::Stretch => images::Fit::Stretch,
    };
    let t = std::time::Instant::now();
    let cache = images::cache_dir();
    let decoded = images::load(root, [c as usize, h as usize, w as usize], fit, (&cache, threads))?;
    let l = &decoded.listing;
    if decoded.decoded {
        let secs = t.elapsed().as_secs_f64();
        eprintln!(
            "decoded {} images of {} in {secs:.2} s ({:.0} images/s), cached as {}",
            l.files.len(),
            root.display(),
            l.files.len() as f64 / secs.max(1e-9),
            decoded.cache.display()
        );
    }
    for (file, why) in &l.skipped {
        eprintln!("warning: skipped {}: {why}", root.join(file).display());
    }
    if !l.skipped.is_empty() {
        eprintln!(
            "warning: {} of {} image files could not be read",
            l.skipped.len(),
            l.skipped.len() + l.files.len()
        );
    }
    let s = stored::Stored::open(&decoded.cache, scale)?
        .ok_or_else(|| err(format!("the image cache {} is not a u8 array", decoded.cache.display())))?;
    Ok((s, decoded.listing))
}

/// The data of a run: one column per model variable (inputs, then targets), all with the same
/// number of samples.
#[derive(Clone, Debug)]
pub struct Dataset {
    pub arrays: Vec<Column>,
    pub names: Vec<String>,
    pub n: usize,
    /// A text source's vocabularies (saved as `vocab.json` with the run).
    pub vocab: Option<text::TextVocab>,
}

/// Checks that `a` holds samples of type `ty` and converts it to the model's dtype: a sample
/// shape matches when it equals the declared one after dropping axes of size 1 (so
/// `[N, 8, 8]` data feeds an input `[1, 8, 8]`).
pub fn conform(a: Array, var: &Var, origin: &str) -> Result<Array, DataError> {
    let sample: Vec<usize> = a.shape.iter().skip(1).copied().collect();
    let tokens = check_shape(&a.shape, var, origin)?;
    if a.samples() == 0 {
        return Err(err(format!("{origin} has no samples")));
    }
    let shape = a.shape.clone();
    let values = match (a.values, tokens) {
        (Values::F32(v), None) => {
            if let Some(i) = v.iter().position(|x| !x.is_finite()) {
                let per = sample.iter().product::<usize>().max(1);
                return Err(err(format!(
                    "{origin} contains NaN or infinity (sample {}, value {})",
                    i / per,
                    i % per
                )));
            }
            Values::F32(v)
        }
        (Values::I32(v), None) => Values::F32(v.into_iter().map(|x| x as f32).collect()),
        (values, Some(vocab)) => {
            let ids: Vec<i32> = match values {
                Values::I32(v) => v,
                Values::F32(v) => {
                    if let Some(x) = v.iter().find(|x| x.fract() != 0.0 || !x.is_finite()) {
                        return Err(err(format!(
                            "{origin} holds {x}, but `{}` takes whole token ids",
                            var.name
                        )));
                    }
                    v.into_iter().map(|x| x as i32).collect()
                }
            };
            if let Some(at) = ids.iter().position(|&i| i < 0 || i64::from(i) >= vocab as i64) {
                let per = sample.iter().product::<usize>().max(1);
                return Err(err(format!(
                    "{origin} holds token id {} (sample {}), outside `{}`'s vocabulary 0..{vocab}",
                    ids[at],
                    at / per,
                    var.name
                )));
            }
            Values::I32(ids)
        }
    };
    Ok(Array { shape, values })
}

/// Checks that an array of `shape` holds samples of `var`'s type (axes of size 1 aside); the
/// vocabulary, for token ids.
fn check_shape(shape: &[usize], var: &Var, origin: &str) -> Result<Option<u64>, DataError> {
    let sample: Vec<usize> = shape.iter().skip(1).copied().collect();
    let squeeze = |d: &[usize]| d.iter().copied().filter(|&x| x != 1).collect::<Vec<_>>();
    let (declared, tokens) = match &var.ty {
        Ty::Tensor(d) => (d.iter().map(|&x| x as usize).collect::<Vec<_>>(), None),
        Ty::Token { vocab } => (vec![], Some(*vocab)),
        Ty::Tokens { len, vocab } => (vec![*len as usize], Some(*vocab)),
        Ty::Seq { len, dim } => (vec![*len as usize, *dim as usize], None),
    };
    if squeeze(&sample) != squeeze(&declared) {
        return Err(err(format!(
            "{origin} has samples of shape {sample:?}, but `{}` is declared {}",
            var.name, var.ty
        )));
    }
    Ok(tokens)
}

/// A seeded permutation of `0..n`: the order of one epoch.
pub fn permutation(n: usize, seed: u64) -> Vec<usize> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut idx: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = rng.random_range(0..=i);
        idx.swap(i, j);
    }
    idx
}

/// The training and validation samples of `n`: the last `fraction` of a seeded permutation
/// is held out.
pub fn split(n: usize, fraction: f64, seed: u64) -> (Vec<usize>, Vec<usize>) {
    let order = permutation(n, seed ^ 0x0005_EED5_9117);
    let val = ((n as f64) * fraction).round() as usize;
    // At least one sample on each side when there are two; `aec run` refuses a split of
    // fewer (`min_samples_for`).
    let val = if fraction > 0.0 { val.max(1).min(n.saturating_sub(1)) } else { 0 };
    let (train, valid) = order.split_at(n - val);
    (train.to_vec(), valid.to_vec())
}

impl Dataset {
    /// Splits off the last `fraction` of a seeded permutation as validation data.
    pub fn split(&self, fraction: f64, seed: u64) -> (Vec<usize>, Vec<usize>) {
        split(self.n, fraction, seed)
    }

    /// The samples `idx` of column `k`, as one batch.
    pub fn gather(&self, k: usize, idx: &[usize]) -> Result<Values, DataError> {
        self.arrays[k].gather(idx)
    }
}

/// Corrupts a batch for a denoising autoencoder, from a seeded stream for this step.
pub fn corrupt(values: &mut [f32], noise: Noise, seed: u64, step: u64) {
    let mut rng =
        ChaCha8Rng::seed_from_u64(seed ^ step.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0x0000_4015_E000);
    match noise {
        Noise::Gaussian { sigma } => {
            for v in values.iter_mut() {
                // Box–Muller: a standard normal from two uniforms.
                let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
                let u2: f64 = rng.random();
                let z = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
                *v += (sigma * z) as f32;
            }
        }
        Noise::Mask { p } => {
            for v in values.iter_mut() {
                if rng.random::<f64>() < p {
                    *v = 0.0;
                }
            }
        }
        Noise::SaltPepper { p } => {
            for v in values.iter_mut() {
                if rng.random::<f64>() < p {
                    *v = if rng.random::<bool>() { 1.0 } else { 0.0 };
                }
            }
        }
    }
}
