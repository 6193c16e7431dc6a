//! Inference: the network's output (`recon`) or the encoder's (`code`) for a whole array of
//! samples, in batches, with dropout off, or the decoder's output for an array of codes
//! (`Generated`: sampling and interpolation). A teacher-forced decoder's output is the token
//! ids of greedy decoding (`decode`).

use super::{Backend, State};
use crate::codegen;
use crate::data::{Array, Values};
use crate::interp::{self, Buf};
use crate::passes;
use crate::sema::{Compiled, Lowering, Mode, Ty, lower};

/// Which result of the network.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Output {
    Recon,
    Code,
    /// A quantized code's ids: `[N]`, or `[N, H, W]` for an image code (i32).
    CodeIds,
    /// The decoder alone, run on codes (`Mode::Generate`).
    Generated,
}

/// Runs the model on `input` (samples of the model's input type) with `params`.
pub fn infer(
    c: &Compiled,
    params: &[Vec<f32>],
    input: &Array,
    output: Output,
    batch: usize,
    threads: usize,
    backend: Backend,
) -> Result<Array, String> {
    infer_with(c, params, (input, &[]), output, batch, threads, backend)
}

/// [`infer`] of a conditioned model: `conditions` holds one array per condition, in the
/// model's order, with a value for every sample of `input` (already checked against the
/// conditions' types).
pub fn infer_with(
    c: &Compiled,
    params: &[Vec<f32>],
    (input, conditions): (&Array, &[Array]),
    output: Output,
    batch: usize,
    threads: usize,
    backend: Backend,
) -> Result<Array, String> {
    if let Some(v) = c.model.conditions.get(conditions.len()) {
        return Err(format!(
            "`{}` is a condition of this model ({}): give its value for every sample",
            v.name, v.ty
        ));
    }
    if let Some(a) = conditions.iter().find(|a| a.samples() != input.samples()) {
        return Err(format!("{} samples but {} condition values", input.samples(), a.samples()));
    }
    let name = match output {
        Output::Recon | Output::Generated => "recon",
        Output::Code => "code",
        Output::CodeIds => lower::CODE_IDS,
    };
    let mode = if output == Output::Generated { Mode::Generate } else { Mode::Infer };
    let n = input.samples();
    if output == Output::Recon
        && let Some(mut d) = super::decode::Decoder::new(c, backend, threads)
    {
        // A teacher-forced decoder writes its sequence by greedy decoding: token ids out.
        return Ok(decode(&mut d, params, input, batch, Search::GREEDY)?.0);
    }
    let mut state = State::new(params.to_vec());
    let mut out: Vec<f32> = Vec::new();
    let mut ids: Vec<i32> = Vec::new();
    let mut graphs = std::collections::HashMap::new();
    let mut native: std::collections::HashMap<usize, codegen::Program> = std::collections::HashMap::new();
    for start in (0..n).step_by(batch.max(1)) {
        let b = batch.min(n - start);
        let g = match graphs.entry(b) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => {
                let lowering = Lowering { batch: b as u64, mode, denoise: false, shard_of: None };
                let fwd = lower::lower(&c.model, &lowering)?;
                e.insert(passes::dce::keep_outputs(&fwd, &[name])?)
            }
        };
        let g: &crate::ir::Graph = g;
        let slice = |a: &Array| {
            let per = a.sample_len();
            match &a.values {
                Values::F32(v) => Buf::F32(v[start * per..(start + b) * per].to_vec()),
                Values::I32(v) => Buf::I32(v[start * per..(start + b) * per].to_vec()),
            }
        };
        let inputs: Vec<Buf> = g
            .inputs
            .iter()
            .enumerate()
            .map(|(k, i)| {
                let condition = c.model.conditions.iter().position(|v| v.name == i.name);
                match (k, condition) {
                    (0, _) => slice(input),
                    (_, Some(j)) => slice(&conditions[j]),
                    _ => Buf::F32(Vec::new()),
                }
            })
            .collect();
        match backend {
            Backend::Interp => {
                let opts = interp::Options { threads, check_finite: false, ..interp::Options::default() };
                let values = interp::run(g, &inputs, &mut state, &opts).map_err(|e| e.to_string())?;
                match values.output(g, name) {
                    Some(Buf::I32(v)) => ids.extend_from_slice(v),
                    Some(Buf::F32(v)) => out.extend_from_slice(v),
                    None => return Err(format!("no `{name}` output")),
                }
            }
            Backend::Jit => {
                let p = match native.entry(b) {
                    std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                    std::collections::hash_map::Entry::Vacant(e) => {
                        let mut p = codegen::Program::compile(g, codegen::Options::default())?;
                        p.set_threads(threads);
                        e.insert(p)
                    }
                };
                p.set_state(&state)?;
                p.run(&inputs, 0, 1).map_err(|e| format!("the inputs do not fit the network: {e}"))?;
                match p.output(name) {
                    Some(Buf::F32(v)) => out.extend_from_slice(&v),
                    Some(Buf::I32(v)) => ids.extend_from_slice(&v),
                    None => return Err(format!("no `{name}` output")),
                }
            }
        }
    }
    let ty = match output {
        Output::Recon | Output::Generated => &c.model.output,
        Output::Code => &c.model.code,
        Output::CodeIds => {
            // One id per position: the code's shape without its channels.
            let mut shape = vec![n];
            if let Ty::Tensor(d) = &c.model.code {
                shape.extend(d.iter().skip(1).map(|&x| x as usize));
            }
            return Ok(Array { shape, values: Values::I32(ids) });
        }
    };
    let mut shape = vec![n];
    match ty {
        Ty::Tensor(d) => shape.extend(d.iter().map(|&x| x as usize)),
        Ty::Seq { len, dim } => shape.extend([*len as usize, *dim as usize]),
        Ty::Tokens { len, .. } => shape.push(*len as usize),
        Ty::Token { .. } => {}
    }
    Ok(Array { shape, values: Values::F32(out) })
}

/// How a teacher-forced decoder searches: beam width (1: greedy) and GNMT's length-penalty
/// exponent; `record` keeps attention's weights (greedy decoding only).
#[derive(Clone, Copy, Debug)]
pub struct Search {
    pub beam: usize,
    pub alpha: f64,
    pub record: bool,
}

impl Search {
    pub const GREEDY: Search = Search { beam: 1, alpha: 0.0, record: false };
}

/// Decodes every sample of `input` in batches: token ids `[N, len]` and, if `search.record`,
/// attention's weights `[N, len, S]`.
pub fn decode(
    d: &mut super::decode::Decoder,
    params: &[Vec<f32>],
    input: &Array,
    batch: usize,
    search: Search,
) -> Result<(Array, Option<Array>), String> {
    let (n, per) = (input.samples(), input.sample_len());
    let mut ids = Vec::with_capacity(n * d.len);
    let mut weights = Vec::new();
    for start in (0..n).step_by(batch.max(1)) {
        let b = batch.min(n - start);
        let x = match &input.values {
            Values::F32(v) => Buf::F32(v[start * per..(start + b) * per].to_vec()),
            Values::I32(v) => Buf::I32(v[start * per..(start + b) * per].to_vec()),
        };
        if search.record {
            d.weights = Some(Vec::new());
        }
        ids.extend(d.decode_beam(params, &[x], b, (search.beam, search.alpha))?);
        weights.extend(d.weights.take().unwrap_or_default());
    }
    let ids = Array { shape: vec![n, d.len], values: Values::I32(ids) };
    let weights = search.record.then(|| {
        let s = weights.len() / (n * d.len).max(1);
        Array { shape: vec![n, d.len, s], values: Values::F32(weights) }
    });
    Ok((ids, weights))
}
