//! Codes for the decoder alone (`Mode::Generate`): draws from the prior N(0, I) of a Gaussian
//! code, a grid over a 2-D code plane, and straight lines between codes.

use super::Backend;
use super::infer::{self, Output};
use crate::data::{Array, Dataset, Values};
use crate::interp;
use crate::sema::{Compiled, Ty};
use crate::syntax::ast::LayerKind;

/// The code's shape, when it is a tensor the decoder can start from.
pub fn code_dims(c: &Compiled) -> Result<Vec<usize>, String> {
    match &c.model.code {
        Ty::Tensor(d) => Ok(d.iter().map(|&x| x as usize).collect()),
        other => Err(format!("the code is {other}, not a tensor: there is nothing to decode from")),
    }
}

/// Whether the codes can be drawn from a prior: the encoder ends in a Gaussian code, whose
/// prior N(0, I) is (`aec sample` and its `--grid`).
pub fn has_prior(c: &Compiled) -> Result<(), String> {
    if c.model.encoder().any(|l| matches!(l.layer.kind, LayerKind::Gaussian { .. })) {
        return Ok(());
    }
    Err("sampling decodes codes drawn from N(0, I), the prior of a Gaussian code, and this \
         encoder does not end in `gaussian N`; a plain autoencoder's codes follow no known law, \
         but a mixture fitted to its training codes can be sampled (`--gmm K`)"
        .into())
}

/// `count` codes of `size` values drawn from N(0, I) with `seed` (the same seed, the same
/// codes); refused unless the encoder ends in a Gaussian code, whose prior that is.
pub fn prior_codes(c: &Compiled, count: usize, seed: u64) -> Result<Vec<f32>, String> {
    has_prior(c)?;
    let size: usize = code_dims(c)?.iter().product();
    Ok((0..count * size).map(|i| interp::normal(seed, 0, u32::MAX, i)).collect())
}

/// The codebook vectors a quantized code's ids pick, as the decoder reads them: ids `[n]`
/// give `[n, D]`, ids `[n, H, W]` (one per position) give `[n, D, H, W]`. Each id must be in
/// the codebook.
pub fn codebook_vectors(c: &Compiled, params: &[Vec<f32>], ids: &Array) -> Result<Array, String> {
    let dims = code_dims(c)?;
    let index = c
        .model
        .params
        .iter()
        .position(|p| matches!(p.role, crate::ir::ParamRole::Codebook { .. }))
        .ok_or("the code is not quantized: its codes are vectors, not ids")?;
    let book = params.get(index).ok_or("the codebook is missing")?;
    let (width, positions) = (dims[0], dims[1..].iter().product::<usize>());
    let size = book.len() / width.max(1);
    let Values::I32(v) = &ids.values else { return Err("codebook ids are integers".into()) };
    if ids.shape.len() != dims.len() || ids.shape[1..] != dims[1..] {
        let want: Vec<String> = dims[1..].iter().map(ToString::to_string).collect();
        return Err(format!(
            "this code's ids are [n{}] arrays, got shape {:?}",
            want.iter().map(|d| format!(", {d}")).collect::<String>(),
            ids.shape
        ));
    }
    let n = ids.shape[0];
    let mut out = vec![0f32; n * width * positions];
    for (i, &id) in v.iter().enumerate() {
        let k = usize::try_from(id)
            .ok()
            .filter(|&k| k < size)
            .ok_or_else(|| format!("id {id} at position {i} is outside the codebook of {size}"))?;
        let (sample, pos) = (i / positions, i % positions);
        for d in 0..width {
            out[(sample * width + d) * positions + pos] = book[k * width + d];
        }
    }
    Ok(Array { shape: [vec![n], dims].concat(), values: Values::F32(out) })
}

/// The spec's validation fraction and seed: the split training made, and the seed its data
/// was loaded with.
pub fn spec_split(c: &Compiled) -> (f64, u64) {
    let t = c.ast.train.as_ref();
    (t.and_then(|t| t.validation).unwrap_or(0.0), t.and_then(|t| t.seed).unwrap_or(0))
}

/// The codes of the samples `x`, `[n, size]` flat, and `size`.
pub fn codes_of(
    c: &Compiled,
    params: &[Vec<f32>],
    x: &Array,
    (threads, backend): (usize, Backend),
) -> Result<(Vec<f32>, usize), String> {
    let z = infer::infer(c, params, x, Output::Code, 256, threads, backend)?;
    let size = code_dims(c)?.iter().product();
    match z.values {
        Values::F32(v) => Ok((v, size)),
        Values::I32(_) => Err("the codes are not real numbers".into()),
    }
}

/// The codes of the samples training learned from (the split `validation` and `seed` make):
/// what a mixture is fitted to.
pub fn training_codes(
    c: &Compiled,
    params: &[Vec<f32>],
    data: &Dataset,
    (validation, seed): (f64, u64),
    how: (usize, Backend),
) -> Result<(Vec<f32>, usize), String> {
    let (idx, _) = data.split(validation, seed);
    let shape: Vec<usize> =
        std::iter::once(idx.len()).chain(data.arrays[0].shape()[1..].iter().copied()).collect();
    let bytes = idx.len().checked_mul(data.arrays[0].sample_len()).and_then(|v| v.checked_mul(4));
    crate::memory::check("the training samples", bytes.map(|b| b as u64), "use a smaller data set")?;
    let values = data.gather(0, &idx).map_err(|e| e.to_string())?;
    codes_of(c, params, &Array { shape, values }, how)
}

/// A `count` × `count` grid over the plane of a 2-D code, at the quantiles (i + ½) / count of
/// N(0, 1) on each axis; row r from the top holds the largest second coordinate, as a plot's
/// y axis.
pub fn grid_codes(count: usize) -> Vec<f32> {
    let q: Vec<f32> = (0..count).map(|i| normal_quantile((i as f64 + 0.5) / count as f64) as f32).collect();
    (0..count).flat_map(|r| (0..count).flat_map(|c| [q[c], q[count - 1 - r]]).collect::<Vec<_>>()).collect()
}

/// The straight line of `steps` points (both ends included) between each consecutive pair of
/// the codes `z` (`size` values each), one line after another.
pub fn lines(z: &[f32], size: usize, steps: usize) -> Vec<f32> {
    let codes: Vec<&[f32]> = z.chunks(size.max(1)).collect();
    let mut line = Vec::with_capacity(codes.len().saturating_sub(1) * steps * size);
    for pair in codes.windows(2) {
        for t in 0..steps {
            let a = t as f32 / (steps.max(2) - 1) as f32;
            line.extend(pair[0].iter().zip(pair[1]).map(|(&p, &q)| (1.0 - a) * p + a * q));
        }
    }
    line
}

/// Φ⁻¹(p), the quantile of N(0, 1) (Acklam's rational approximation, relative error < 1.2e-9),
/// for p in (0, 1).
pub fn normal_quantile(p: f64) -> f64 {
    const A: [f64; 6] = [
        -3.969_683_028_665_376e1,
        2.209_460_984_245_205e2,
        -2.759_285_104_469_687e2,
        1.383_577_518_672_69e2,
        -3.066_479_806_614_716e1,
        2.506_628_277_459_239,
    ];
    const B: [f64; 5] = [
        -5.447_609_879_822_406e1,
        1.615_858_368_580_409e2,
        -1.556_989_798_598_866e2,
        6.680_131_188_771_972e1,
        -1.328_068_155_288_572e1,
    ];
    const C: [f64; 6] = [
        -7.784_894_002_430_293e-3,
        -3.223_964_580_411_365e-1,
        -2.400_758_277_161_838,
        -2.549_732_539_343_734,
        4.374_664_141_464_968,
        2.938_163_982_698_783,
    ];
    const D: [f64; 4] =
        [7.784_695_709_041_462e-3, 3.224_671_290_700_398e-1, 2.445_134_137_142_996, 3.754_408_661_907_416];
    let tail = |q: f64| {
        (((((C[0] * q + C[1]) * q + C[2]) * q + C[3]) * q + C[4]) * q + C[5])
            / ((((D[0] * q + D[1]) * q + D[2]) * q + D[3]) * q + 1.0)
    };
    if p < 0.02425 {
        tail((-2.0 * p.ln()).sqrt())
    } else if p > 1.0 - 0.02425 {
        -tail((-2.0 * (1.0 - p).ln()).sqrt())
    } else {
        let q = p - 0.5;
        let r = q * q;
        (((((A[0] * r + A[1]) * r + A[2]) * r + A[3]) * r + A[4]) * r + A[5]) * q
            / (((((B[0] * r + B[1]) * r + B[2]) * r + B[3]) * r + B[4]) * r + 1.0)
    }
}

#[cfg(test)]
mod tests {
    use super::normal_quantile;

    #[test]
    fn quantiles_of_the_standard_normal() {
        // Φ⁻¹ at known points (to the printed digits of the tables).
        for (p, z) in
            [(0.5, 0.0), (0.975, 1.959_963_984_540_054), (0.01, -2.326_347_874_040_841), (0.841_344_746, 1.0)]
        {
            assert!((normal_quantile(p) - z).abs() < 1e-7, "Φ⁻¹({p}) = {} not {z}", normal_quantile(p));
        }
    }
}
