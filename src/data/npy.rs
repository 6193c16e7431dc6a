//! NumPy `.npy` files (format versions 1–3, C order, little-endian): read u8/i8/u16/i32/i64/f16/f32/f64,
//! write f32 and i32. Every malformed file gets a message saying what is wrong with it.

use super::{Array, Values};

/// What a `.npy` header says: the dtype's descr, the shape, and where the values start.
#[derive(Clone, Debug, PartialEq)]
pub struct Header {
    pub descr: String,
    pub shape: Vec<usize>,
    pub data_start: usize,
}

/// Parses the header at the start of `bytes` (which may hold only the header's part).
pub fn header(bytes: &[u8]) -> Result<Header, String> {
    const MAGIC: &[u8] = b"\x93NUMPY";
    if bytes.len() < 10 || &bytes[..6] != MAGIC {
        return Err("not a .npy file (it does not start with \\x93NUMPY)".into());
    }
    let major = bytes[6];
    let (header_len, start) = match major {
        1 => (usize::from(u16::from_le_bytes([bytes[8], bytes[9]])), 10),
        2 | 3 if bytes.len() >= 12 => {
            (u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize, 12)
        }
        v => return Err(format!("unsupported .npy format version {v}")),
    };
    let header = bytes.get(start..start + header_len).ok_or("the .npy header is cut short")?;
    let header = std::str::from_utf8(header).map_err(|_| "the .npy header is not text")?;
    let descr = dict_value(header, "descr").ok_or("the .npy header has no 'descr'")?;
    let fortran = dict_value(header, "fortran_order").ok_or("the .npy header has no 'fortran_order'")?;
    let shape = dict_value(header, "shape").ok_or("the .npy header has no 'shape'")?;
    if fortran.trim() == "True" {
        return Err("Fortran-ordered arrays are not supported; save with np.ascontiguousarray".into());
    }
    let shape = parse_shape(shape)?;
    let descr = descr.trim().trim_matches(|c| c == '\'' || c == '"').to_owned();
    Ok(Header { descr, shape, data_start: start + header_len })
}

/// Parses an `.npy` file's bytes.
pub fn parse(bytes: &[u8]) -> Result<Array, String> {
    let Header { descr, shape, data_start } = header(bytes)?;
    let descr = descr.as_str();
    let count =
        shape.iter().try_fold(1usize, |a, &b| a.checked_mul(b)).ok_or("the .npy shape is too large")?;
    let data = &bytes[data_start..];
    let (size, values): (usize, fn(&[u8]) -> Values) = match descr {
        "|u1" | "u1" => (1, |d| Values::F32(d.iter().map(|&b| f32::from(b)).collect())),
        "|i1" | "i1" => (1, |d| Values::F32(d.iter().map(|&b| f32::from(b as i8)).collect())),
        "<u2" => (2, |d| {
            Values::F32(d.chunks_exact(2).map(|c| f32::from(u16::from_le_bytes([c[0], c[1]]))).collect())
        }),
        "<f2" => (2, |d| {
            Values::F32(d.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect())
        }),
        "<f4" => (4, |d| {
            Values::F32(d.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
        }),
        "<f8" => (8, |d| {
            Values::F32(
                d.chunks_exact(8)
                    .map(|c| f64::from_le_bytes(c.try_into().unwrap_or([0; 8])) as f32)
                    .collect(),
            )
        }),
        "<i4" => (4, |d| {
            Values::I32(d.chunks_exact(4).map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
        }),
        "<i8" => (8, |d| {
            Values::I32(
                d.chunks_exact(8)
                    .map(|c| {
                        i64::from_le_bytes(c.try_into().unwrap_or([0; 8]))
                            .clamp(i64::from(i32::MIN), i64::from(i32::MAX)) as i32
                    })
                    .collect(),
            )
        }),
        other => {
            return Err(format!(
                "unsupported dtype '{other}': aec reads uint8, int8, uint16, int32, int64, float16, float32 and float64 (little-endian)"
            ));
        }
    };
    let need = count.checked_mul(size).ok_or("the .npy shape is too large")?;
    crate::memory::check("its values", (count as u64).checked_mul(4), "use a smaller file")?;
    if data.len() != need {
        let what = if data.len() < need { "truncated" } else { "longer than its header says" };
        return Err(format!(
            "the file is {what}: shape {shape:?} needs {need} bytes of data, it has {}",
            data.len()
        ));
    }
    Ok(Array { shape, values: values(&data[..need]) })
}

/// Serialises an array as `.npy` version 1.0.
pub fn to_bytes(a: &Array) -> Vec<u8> {
    let descr = match a.values {
        Values::F32(_) => "<f4",
        Values::I32(_) => "<i4",
    };
    let mut out = header_bytes(descr, &a.shape, 0);
    out.reserve(a.len() * 4);
    match &a.values {
        Values::F32(v) => v.iter().for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
        Values::I32(v) => v.iter().for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
    }
    out
}

/// The bytes before a `.npy` version 1.0 file's values: at least `min_len` of them, padded so
/// that the values start on a 64-byte boundary (a header written again with another shape
/// keeps its length when `min_len` leaves room).
pub fn header_bytes(descr: &str, shape: &[usize], min_len: usize) -> Vec<u8> {
    let dims: Vec<String> = shape.iter().map(usize::to_string).collect();
    let shape = if dims.len() == 1 { format!("({},)", dims[0]) } else { format!("({})", dims.join(", ")) };
    let mut header = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
    // The header ends in a newline.
    while !(10 + header.len() + 1).is_multiple_of(64) || 10 + header.len() + 1 < min_len {
        header.push(' ');
    }
    header.push('\n');
    let mut out = Vec::with_capacity(10 + header.len());
    out.extend_from_slice(b"\x93NUMPY\x01\x00");
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    out
}

/// The text of `'key': value` in a Python dict literal (value up to the next top-level comma).
fn dict_value<'a>(header: &'a str, key: &str) -> Option<&'a str> {
    let at = header.find(&format!("'{key}'")).or_else(|| header.find(&format!("\"{key}\"")))?;
    let rest = &header[at + key.len() + 2..];
    let rest = rest.trim_start().strip_prefix(':')?.trim_start();
    let mut depth = 0;
    for (i, c) in rest.char_indices() {
        match c {
            '(' | '[' => depth += 1,
            ')' | ']' => depth -= 1,
            ',' | '}' if depth == 0 => return Some(&rest[..i]),
            _ => {}
        }
    }
    None
}

fn parse_shape(s: &str) -> Result<Vec<usize>, String> {
    let inner =
        s.trim().strip_prefix('(').and_then(|s| s.strip_suffix(')')).ok_or("bad shape in the .npy header")?;
    inner
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| {
            p.trim_end_matches('L')
                .parse::<usize>()
                .map_err(|_| format!("bad dimension '{p}' in the .npy header"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_f32_and_i32() {
        for a in [
            Array { shape: vec![2, 3], values: Values::F32(vec![0.5, -1.0, 2.0, 3.0, 4.0, 1e-8]) },
            Array { shape: vec![4], values: Values::I32(vec![0, 7, -3, 9]) },
        ] {
            let bytes = to_bytes(&a);
            assert_eq!(parse(&bytes).expect("parses"), a);
        }
    }

    #[test]
    fn malformed_files_are_explained() {
        assert!(parse(b"hello").unwrap_err().contains("not a .npy"));
        let mut bytes = to_bytes(&Array { shape: vec![8], values: Values::F32(vec![1.0; 8]) });
        bytes.truncate(bytes.len() - 3);
        assert!(parse(&bytes).unwrap_err().contains("truncated"));
        let header = "{'descr': '<c8', 'fortran_order': False, 'shape': (1,), }\n";
        let mut complex = b"\x93NUMPY\x01\x00".to_vec();
        complex.extend_from_slice(&(header.len() as u16).to_le_bytes());
        complex.extend_from_slice(header.as_bytes());
        complex.extend_from_slice(&[0; 8]);
        assert!(parse(&complex).unwrap_err().contains("unsupported dtype"));
    }
}
