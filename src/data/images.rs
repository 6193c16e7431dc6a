//! Folders of images: every PNG and JPEG file under a folder (recursively, in path order),
//! decoded with the `image` crate, converted to the declared colour (`[3, H, W]` RGB or
//! `[1, H, W]` grey), resized to `H × W` and stored as `u8`. Sub-folder names are the labels
//! (the first folder level under the root; files at the root have the label "").
//!
//! Decoding happens once: the samples are written to a cache (`images-<key>.npy`, `u8`, with
//! `images-<key>.json` beside it listing the files and labels), keyed by the folder's listing —
//! each file's path, size and modification time — and the size, colour and fit. A changed
//! folder is decoded again. Training then reads the cache a batch at a time (`stored`).
//!
//! Resizing (`fit`): `crop` (the default, torchvision's `Resize(min(H, W))` + `CenterCrop`)
//! scales the image so that it covers `H × W` and cuts the centre; `stretch` scales each axis
//! to its size. Both filter with a triangle (bilinear) kernel widened when shrinking, as
//! Pillow's bilinear resize does. Grey from colour is ITU-R 601-2 luma (the weights of Pillow's `convert("L")`); an
//! alpha channel is dropped; 16-bit images are scaled to 8 bits.

use super::{DataError, err};
use serde::{Deserialize, Serialize};
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// How an image is brought to the declared size.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Fit {
    Crop,
    Stretch,
}

/// What the cache's `.json` holds: the files decoded (relative to the folder), each sample's
/// label, the label names, and the files that could not be read with why.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Listing {
    pub files: Vec<String>,
    pub labels: Vec<i32>,
    pub classes: Vec<String>,
    pub skipped: Vec<(String, String)>,
}

/// A decoded folder: its cache file (read a batch at a time) and its listing.
pub struct Decoded {
    pub cache: PathBuf,
    pub listing: Listing,
    /// Whether this call decoded the images (false: the cache was current).
    pub decoded: bool,
}

/// The image files under `root`, sorted, with their size and modification time.
fn walk(root: &Path) -> Result<Vec<(PathBuf, u64, u128)>, DataError> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        let entries = std::fs::read_dir(&dir)
            .map_err(|e| err(format!("cannot read the folder {}: {e}", dir.display())))?;
        for entry in entries {
            let entry = entry.map_err(|e| err(format!("cannot read the folder {}: {e}", dir.display())))?;
            let path = entry.path();
            let meta =
                std::fs::metadata(&path).map_err(|e| err(format!("cannot read {}: {e}", path.display())))?;
            if meta.is_dir() {
                // Hidden folders (a cache, version control) are not data.
                if !entry.file_name().to_string_lossy().starts_with('.') {
                    stack.push(path);
                }
            } else if meta.is_file() && is_image(&path) {
                let mtime = meta
                    .modified()
                    .ok()
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                    .map_or(0, |d| d.as_nanos());
                out.push((path, meta.len(), mtime));
            }
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

fn is_image(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| matches!(e.to_ascii_lowercase().as_str(), "png" | "jpg" | "jpeg"))
}

/// FNV-1a, 64 bits: a cache key stable across builds and platforms.
fn fnv(bytes: &[u8], mut h: u64) -> u64 {
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// Where decoded folders are cached: `AEC_CACHE_DIR`, else `$XDG_CACHE_HOME/aec`, else
/// `~/.cache/aec`, else the system's temporary folder.
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("AEC_CACHE_DIR") {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(d).join("aec");
    }
    if let Some(h) = std::env::var_os("HOME") {
        return PathBuf::from(h).join(".cache").join("aec");
    }
    std::env::temp_dir().join("aec-cache")
}

/// Decodes the images under `root` to `[N, C, H, W]` `u8` (C 1 or 3), or finds them cached in
/// the folder `dir`. Unreadable files are skipped and listed; none readable is an error.
pub fn load(
    root: &Path,
    [c, h, w]: [usize; 3],
    fit: Fit,
    (dir, threads): (&Path, usize),
) -> Result<Decoded, DataError> {
    let meta = std::fs::metadata(root)
        .map_err(|e| err(format!("cannot read the folder {}: {e}", root.display())))?;
    if !meta.is_dir() {
        return Err(err(format!(
            "{} is not a folder; `images` reads a folder of PNG and JPEG files",
            root.display()
        )));
    }
    if c != 1 && c != 3 {
        return Err(err(format!("images have 1 (grey) or 3 (RGB) channels, and the input declares {c}")));
    }
    let files = walk(root)?;
    if files.is_empty() {
        return Err(err(format!("{} holds no PNG or JPEG files", root.display())));
    }
    let canonical = root.canonicalize().unwrap_or_else(|_| root.to_owned());
    let mut key = fnv(b"aec images v1", 0xcbf2_9ce4_8422_2325);
    key = fnv(canonical.to_string_lossy().as_bytes(), key);
    key = fnv(format!("{c}x{h}x{w} {fit:?}").as_bytes(), key);
    for (p, size, mtime) in &files {
        key = fnv(p.to_string_lossy().as_bytes(), key);
        key = fnv(&size.to_le_bytes(), key);
        key = fnv(&mtime.to_le_bytes(), key);
    }
    let cache = dir.join(format!("images-{key:016x}.npy"));
    let index = dir.join(format!("images-{key:016x}.json"));
    if let Some(listing) = cached(&cache, &index, [c, h, w]) {
        return Ok(Decoded { cache, listing, decoded: false });
    }
    std::fs::create_dir_all(dir)
        .map_err(|e| err(format!("cannot create the cache folder {}: {e}", dir.display())))?;
    let listing = decode_all(root, &files, [c, h, w], fit, threads, &cache)?;
    let json = serde_json::to_string(&listing).map_err(|e| err(e.to_string()))?;
    crate::files::write_atomic(&index, json.as_bytes())
        .map_err(|e| err(format!("cannot write {}: {e}", index.display())))?;
    Ok(Decoded { cache, listing, decoded: true })
}

/// The listing of a current cache, if both its files are there and agree.
fn cached(cache: &Path, index: &Path, [c, h, w]: [usize; 3]) -> Option<Listing> {
    let listing: Listing = serde_json::from_str(&std::fs::read_to_string(index).ok()?).ok()?;
    let stored = super::stored::Stored::open(cache, 1.0).ok()??;
    (stored.shape == [listing.files.len(), c, h, w] && listing.labels.len() == listing.files.len())
        .then_some(listing)
}

/// Decodes every file in order, `threads` at a time, streaming the samples into the cache
/// (written under a temporary name, renamed when complete).
fn decode_all(
    root: &Path,
    files: &[(PathBuf, u64, u128)],
    [c, h, w]: [usize; 3],
    fit: Fit,
    threads: usize,
    cache: &Path,
) -> Result<Listing, DataError> {
    let per = c * h * w;
    let tmp = cache.with_extension(format!("npy.tmp{}", std::process::id()));
    let write_err = |e: std::io::Error| err(format!("cannot write the image cache {}: {e}", tmp.display()));
    let mut out = std::fs::File::create(&tmp).map_err(write_err)?;
    // Room for the header of any count up to the number of files; written again at the end.
    let reserve = super::npy::header_bytes("|u1", &[files.len(), c, h, w], 0).len() + 64;
    out.write_all(&vec![b' '; reserve]).map_err(write_err)?;
    let mut listing = Listing::default();
    let mut classes = std::collections::BTreeMap::new();
    let label_of = |p: &Path| -> String {
        let rel = p.strip_prefix(root).unwrap_or(p);
        let mut parts = rel.components();
        match (parts.next(), parts.next()) {
            (Some(first), Some(_)) => first.as_os_str().to_string_lossy().into_owned(),
            _ => String::new(),
        }
    };
    for f in files {
        let n = classes.len();
        classes.entry(label_of(&f.0)).or_insert(n);
    }
    // Class ids in name order.
    let names: Vec<String> = classes.keys().cloned().collect();
    let threads = threads.max(1);
    for group in files.chunks(16 * threads) {
        let size = group.len().div_ceil(threads);
        let parts: Vec<Vec<(usize, Pixels)>> = std::thread::scope(|s| {
            let handles: Vec<_> = group
                .chunks(size)
                .enumerate()
                .map(|(t, chunk)| {
                    let work = move || {
                        chunk
                            .iter()
                            .enumerate()
                            .map(|(i, f)| (t * size + i, decode(&f.0, [c, h, w], fit)))
                            .collect()
                    };
                    (t, chunk.len(), s.spawn(work))
                })
                .collect();
            // A decoder that panicked on a malformed file loses its part: each of its files is
            // reported, not dropped.
            handles
                .into_iter()
                .map(|(t, n, h)| {
                    h.join().unwrap_or_else(|_| {
                        (t * size..t * size + n)
                            .map(|i| (i, Err("the decoder failed on it".to_owned())))
                            .collect()
                    })
                })
                .collect()
        });
        for (i, result) in parts.into_iter().flatten() {
            let path = &group[i].0;
            let rel = path.strip_prefix(root).unwrap_or(path).to_string_lossy().into_owned();
            match result {
                Ok(pixels) if pixels.len() == per => {
                    out.write_all(&pixels).map_err(write_err)?;
                    let label = names.binary_search(&label_of(path)).unwrap_or(0);
                    listing.files.push(rel);
                    listing.labels.push(label as i32);
                }
                Ok(_) => listing.skipped.push((rel, "decoded to an unexpected size".into())),
                Err(why) => listing.skipped.push((rel, why)),
            }
        }
    }
    if listing.files.is_empty() {
        let _ = std::fs::remove_file(&tmp);
        let first = listing.skipped.first().map(|(f, why)| format!(" ({f}: {why})")).unwrap_or_default();
        return Err(err(format!("no image under {} could be read{first}", root.display())));
    }
    let header = super::npy::header_bytes("|u1", &[listing.files.len(), c, h, w], reserve);
    if header.len() != reserve {
        return Err(err("the image cache's header changed length".to_owned()));
    }
    out.seek(SeekFrom::Start(0)).map_err(write_err)?;
    out.write_all(&header).map_err(write_err)?;
    out.sync_all().map_err(write_err)?;
    drop(out);
    std::fs::rename(&tmp, cache)
        .map_err(|e| err(format!("cannot write the image cache {}: {e}", cache.display())))?;
    listing.classes = names;
    Ok(listing)
}

/// A decoded file's samples, or why it could not be read.
type Pixels = Result<Vec<u8>, String>;

/// One file as `C × H × W` bytes, channel-major.
fn decode(path: &Path, [c, h, w]: [usize; 3], fit: Fit) -> Pixels {
    let reader = image::ImageReader::open(path).map_err(|e| e.to_string())?;
    let reader = reader.with_guessed_format().map_err(|e| e.to_string())?;
    let img = reader.decode().map_err(|e| e.to_string())?;
    let (tw, th) = (w as u32, h as u32);
    let resized = |img: image::DynamicImage| -> image::DynamicImage {
        let (iw, ih) = (img.width().max(1), img.height().max(1));
        match fit {
            Fit::Stretch => img.resize_exact(tw, th, image::imageops::FilterType::Triangle),
            Fit::Crop => {
                // Scale so the image covers tw × th, then cut the centre.
                let s = f64::max(f64::from(tw) / f64::from(iw), f64::from(th) / f64::from(ih));
                let (sw, sh) = (
                    ((f64::from(iw) * s).round() as u32).max(tw),
                    ((f64::from(ih) * s).round() as u32).max(th),
                );
                let scaled = img.resize_exact(sw, sh, image::imageops::FilterType::Triangle);
                scaled.crop_imm((sw - tw) / 2, (sh - th) / 2, tw, th)
            }
        }
    };
    let mut out = Vec::with_capacity(c * h * w);
    if c == 1 {
        let grey = luma(&img.to_rgb8());
        let img = resized(image::DynamicImage::ImageLuma8(grey));
        out.extend_from_slice(img.to_luma8().as_raw());
    } else {
        let img = resized(image::DynamicImage::ImageRgb8(img.to_rgb8()));
        let rgb = img.to_rgb8();
        for ch in 0..3 {
            out.extend(rgb.as_raw().chunks_exact(3).map(|p| p[ch]));
        }
    }
    Ok(out)
}

/// ITU-R 601-2 luma: (299 R + 587 G + 114 B) / 1000, rounded.
fn luma(rgb: &image::RgbImage) -> image::GrayImage {
    let (w, h) = rgb.dimensions();
    let raw = rgb
        .as_raw()
        .chunks_exact(3)
        .map(|p| ((299 * u32::from(p[0]) + 587 * u32::from(p[1]) + 114 * u32::from(p[2]) + 500) / 1000) as u8)
        .collect();
    image::GrayImage::from_raw(w, h, raw).unwrap_or_default()
}
