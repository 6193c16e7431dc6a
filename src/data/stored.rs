//! Arrays read from their file a batch at a time: a `.npy` file of `u8`, `u16`, `f16` or `f32`
//! samples stays on disk in its stored dtype, and each batch reads the samples it needs (by the
//! shuffled index) and converts them to `f32` with the source's `scale`. Only the batch is
//! resident, so a data set larger than the memory budget trains; the operating system's page
//! cache keeps what fits.
//!
//! The samples are read with positional reads (`pread`), not through a memory map: the page
//! cache serves both the same way, and a read of a file truncated under a running training
//! is an error that names the file, where a mapped page past the new end would kill the
//! process (`SIGBUS`).

use super::{DataError, Values, err};
use std::fs::File;
use std::path::{Path, PathBuf};

/// How the values are stored in the file (little-endian).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dtype {
    U8,
    U16,
    F16,
    F32,
}

impl Dtype {
    /// The dtype of a `.npy` descr, if it is one read a batch at a time.
    pub fn of_descr(descr: &str) -> Option<Dtype> {
        match descr {
            "|u1" | "u1" => Some(Dtype::U8),
            "<u2" => Some(Dtype::U16),
            "<f2" => Some(Dtype::F16),
            "<f4" => Some(Dtype::F32),
            _ => None,
        }
    }

    pub fn size(self) -> usize {
        match self {
            Dtype::U8 => 1,
            Dtype::U16 | Dtype::F16 => 2,
            Dtype::F32 => 4,
        }
    }

    fn is_float(self) -> bool {
        matches!(self, Dtype::F16 | Dtype::F32)
    }

    /// `bytes` (whole values) as f32.
    fn convert(self, bytes: &[u8], scale: f64, out: &mut Vec<f32>) {
        let scaled = |x: f32| if scale == 1.0 { x } else { (f64::from(x) * scale) as f32 };
        match self {
            Dtype::U8 => out.extend(bytes.iter().map(|&b| scaled(f32::from(b)))),
            Dtype::U16 => {
                out.extend(bytes.chunks_exact(2).map(|c| scaled(f32::from(u16::from_le_bytes([c[0], c[1]])))))
            }
            Dtype::F16 => out.extend(
                bytes.chunks_exact(2).map(|c| scaled(half::f16::from_le_bytes([c[0], c[1]]).to_f32())),
            ),
            Dtype::F32 => out
                .extend(bytes.chunks_exact(4).map(|c| scaled(f32::from_le_bytes([c[0], c[1], c[2], c[3]])))),
        }
    }
}

/// A `.npy` file's samples, read when a batch needs them.
#[derive(Debug)]
pub struct Stored {
    path: PathBuf,
    file: File,
    /// Where the values start, and the file's length when it was opened.
    offset: u64,
    len: u64,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub scale: f64,
}

impl Stored {
    /// Opens `path` if it is a `.npy` file whose dtype is read a batch at a time (else
    /// `None`: the caller reads it whole). Its header and length are checked here.
    pub fn open(path: &Path, scale: f64) -> Result<Option<Stored>, DataError> {
        let at = |e: String| err(format!("{}: {e}", path.display()));
        // A device, FIFO or folder is left to the whole-file reader, which refuses it before
        // opening it (a FIFO would block here).
        let meta =
            std::fs::metadata(path).map_err(|e| err(format!("cannot read {}: {e}", path.display())))?;
        if !meta.is_file() {
            return Ok(None);
        }
        let file = File::open(path).map_err(|e| err(format!("cannot read {}: {e}", path.display())))?;
        let mut head = vec![0u8; 4096.min(meta.len() as usize)];
        read_at(&file, &mut head, 0).map_err(|e| err(format!("cannot read {}: {e}", path.display())))?;
        let header = super::npy::header(&head).map_err(at)?;
        let Some(dtype) = Dtype::of_descr(&header.descr) else { return Ok(None) };
        let count = header
            .shape
            .iter()
            .try_fold(1usize, |a, &b| a.checked_mul(b))
            .ok_or_else(|| at("the .npy shape is too large".into()))?;
        let need = (count as u64)
            .checked_mul(dtype.size() as u64)
            .ok_or_else(|| at("the .npy shape is too large".into()))?;
        let have = meta.len().saturating_sub(header.data_start as u64);
        if have != need {
            let what = if have < need { "truncated" } else { "longer than its header says" };
            return Err(at(format!(
                "the file is {what}: shape {:?} needs {need} bytes of data, it has {have}",
                header.shape
            )));
        }
        Ok(Some(Stored {
            path: path.to_owned(),
            file,
            offset: header.data_start as u64,
            len: meta.len(),
            dtype,
            shape: header.shape,
            scale,
        }))
    }

    pub fn samples(&self) -> usize {
        self.shape.first().copied().unwrap_or(0)
    }

    pub fn sample_len(&self) -> usize {
        self.shape.iter().skip(1).product()
    }

    /// The samples `idx` as one batch of f32, scaled.
    pub fn gather(&self, idx: &[usize]) -> Result<Values, DataError> {
        // A file cut short since it was opened is an error, not a short read.
        self.check_length()?;
        let per = self.sample_len() * self.dtype.size();
        let mut bytes = vec![0u8; per];
        let mut out = Vec::with_capacity(idx.len() * self.sample_len());
        for &i in idx {
            read_at(&self.file, &mut bytes, self.offset + (i * per) as u64)
                .map_err(|e| err(format!("cannot read sample {i} of {}: {e}", self.path.display())))?;
            self.dtype.convert(&bytes, self.scale, &mut out);
        }
        Ok(Values::F32(out))
    }

    /// Values `start..start + len` (counting from the first sample's first value), scaled,
    /// appended to `out`.
    pub fn read_run(&self, start: usize, len: usize, out: &mut Vec<f32>) -> Result<(), DataError> {
        let size = self.dtype.size();
        let mut bytes = vec![0u8; len * size];
        read_at(&self.file, &mut bytes, self.offset + (start * size) as u64)
            .map_err(|e| err(format!("cannot read {}: {e}", self.path.display())))?;
        self.dtype.convert(&bytes, self.scale, out);
        Ok(())
    }

    /// Fails if the file is shorter than when it was opened.
    pub fn check_length(&self) -> Result<(), DataError> {
        let now = self.file.metadata().map(|m| m.len()).unwrap_or(0);
        if now < self.len {
            return Err(err(format!(
                "{} was truncated while training read it ({} bytes, {now} now)",
                self.path.display(),
                self.len
            )));
        }
        Ok(())
    }

    /// Checks every value is finite (float files), reading the file in pieces: the first
    /// sample that is not names the file, sample and position.
    pub fn check_finite(&self) -> Result<(), DataError> {
        if !self.dtype.is_float() {
            return Ok(());
        }
        let per = self.sample_len().max(1);
        let chunk = (1 << 20) / (per * self.dtype.size()).max(1) + 1;
        for start in (0..self.samples()).step_by(chunk) {
            let idx: Vec<usize> = (start..(start + chunk).min(self.samples())).collect();
            let Values::F32(v) = self.gather(&idx)? else { continue };
            if let Some(i) = v.iter().position(|x| !x.is_finite()) {
                return Err(err(format!(
                    "{} contains NaN or infinity (sample {}, value {})",
                    self.path.display(),
                    start + i / per,
                    i % per
                )));
            }
        }
        Ok(())
    }
}

#[cfg(unix)]
fn read_at(file: &File, buf: &mut [u8], at: u64) -> std::io::Result<()> {
    std::os::unix::fs::FileExt::read_exact_at(file, buf, at)
}

#[cfg(windows)]
fn read_at(file: &File, mut buf: &mut [u8], mut at: u64) -> std::io::Result<()> {
    while !buf.is_empty() {
        match std::os::windows::fs::FileExt::seek_read(file, buf, at)? {
            0 => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            n => {
                buf = &mut buf[n..];
                at += n as u64;
            }
        }
    }
    Ok(())
}
