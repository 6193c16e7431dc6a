//! Greedy decoding: how a model with a teacher-forced decoder writes a sequence on its own.
//!
//! Two graphs per batch size: the encoder (the `Mode::Infer` graph pruned to `state0`, the
//! state the decoder starts from) and one decoder step (`Mode::Decode`: previous token and
//! state in, the step's output and the next state out). The loop runs here: start token, then
//! each step's argmax fed back, for the target's length (the language has no end token, so
//! decoding always runs to the declared length). Both graphs run on the chosen backend —
//! natively, each compiled once.

use super::{Backend, State};
use crate::codegen;
use crate::data::text::{END, PAD, UNK};
use crate::interp::{self, Buf};
use crate::ir::Graph;
use crate::passes;
use crate::sema::{Compiled, Lowering, Mode, Ty, lower};
use std::collections::HashMap;

/// A graph and, on the JIT backend, its compiled program.
struct Runner {
    graph: Graph,
    program: Option<codegen::Program>,
}

impl Runner {
    fn new(graph: Graph, backend: Backend, threads: usize) -> Result<Runner, String> {
        let program = match backend {
            Backend::Jit => {
                let mut p = codegen::Program::compile(&graph, codegen::Options::default())?;
                p.set_threads(threads);
                Some(p)
            }
            Backend::Interp => None,
        };
        Ok(Runner { graph, program })
    }

    /// Runs on `inputs` and returns the named outputs.
    fn run(
        &mut self,
        state: &State,
        inputs: &[Buf],
        names: &[&str],
        threads: usize,
    ) -> Result<Vec<Buf>, String> {
        match &mut self.program {
            Some(p) => {
                p.set_state(state)?;
                p.run(inputs, 0, 1).map_err(|e| format!("the inputs do not fit the network: {e}"))?;
                names.iter().map(|n| p.output(n).ok_or_else(|| format!("no `{n}` output"))).collect()
            }
            None => {
                let opts = interp::Options { threads, check_finite: false, ..interp::Options::default() };
                let mut s = state.clone();
                let values = interp::run(&self.graph, inputs, &mut s, &opts).map_err(|e| e.to_string())?;
                names
                    .iter()
                    .map(|n| values.output(&self.graph, n).cloned().ok_or_else(|| format!("no `{n}` output")))
                    .collect()
            }
        }
    }
}

/// Greedy decoding of a model, with its graphs compiled per batch size.
pub struct Decoder<'c> {
    compiled: &'c Compiled,
    backend: Backend,
    threads: usize,
    /// The sequence decoded: its length and vocabulary (the loss target's).
    pub len: usize,
    pub vocab: usize,
    /// The target is padded (`seq[<= N]`): a sentence ends at its end token, and decoding
    /// stops when every sentence of the batch has written one.
    pub padded: bool,
    /// With `attention`: set to record the weights of the last `decode`, `[B, len, S]`.
    pub weights: Option<Vec<f32>>,
    /// The decoder's output is logits (no final softmax): beam search takes their log-softmax.
    logits: bool,
    graphs: HashMap<usize, (Runner, Runner)>,
}

impl<'c> Decoder<'c> {
    /// A decoder for `c`, or `None` if its decoder is not teacher-forced (it then writes its
    /// output in one pass, like any other network).
    pub fn new(c: &'c Compiled, backend: Backend, threads: usize) -> Option<Decoder<'c>> {
        lower::teacher_forced(&c.model)?;
        let target = c.model.loss_target()?;
        let Ty::Tokens { len, vocab } = target.ty else { return None };
        Some(Decoder {
            compiled: c,
            backend,
            threads,
            len: len as usize,
            vocab: vocab as usize,
            padded: target.padded,
            weights: None,
            logits: !c.model.layers.iter().rev().find(|l| l.part == crate::sema::Part::Decoder).is_some_and(
                |l| {
                    l.layer.activations.last().is_some_and(|a| a.kind == crate::syntax::ast::ActKind::Softmax)
                },
            ),
            graphs: HashMap::new(),
        })
    }

    /// The encoder and step graphs of batch `b`, compiled once.
    fn ensure(&mut self, b: usize) -> Result<(), String> {
        if !self.graphs.contains_key(&b) {
            let model = &self.compiled.model;
            let infer = Lowering { batch: b as u64, mode: Mode::Infer, denoise: false, shard_of: None };
            let outputs: &[&str] = if lower::attends(model) { &["state0", "memory"] } else { &["state0"] };
            let enc = passes::dce::keep_outputs(&lower::lower(model, &infer)?, outputs)?;
            let step = lower::lower(model, &Lowering { mode: Mode::Decode, ..infer })?;
            let runners = (
                Runner::new(enc, self.backend, self.threads)?,
                Runner::new(step, self.backend, self.threads)?,
            );
            self.graphs.insert(b, runners);
        }
        Ok(())
    }

    /// The encoder of batch `b` on `inputs`: the state the decoder starts from and, with
    /// attention, the encoder's states.
    fn encode(&mut self, state: &State, inputs: &[Buf], b: usize) -> Result<(Buf, Option<Buf>), String> {
        self.ensure(b)?;
        let attends = lower::attends(&self.compiled.model);
        let names: &[&str] = if attends { &["state0", "memory"] } else { &["state0"] };
        let (enc, _) = self.graphs.get_mut(&b).ok_or("no decoder graphs")?;
        let mut encoded = enc.run(state, &all_inputs(&enc.graph, inputs), names, self.threads)?;
        let memory = if attends { encoded.pop() } else { None };
        Ok((encoded.remove(0), memory))
    }

    /// Decodes a batch: `inputs` are the model's inputs (`[B, …]` each); returns `[B, len]`
    /// token ids.
    pub fn decode(&mut self, params: &[Vec<f32>], inputs: &[Buf], b: usize) -> Result<Vec<i32>, String> {
        let width = self.memory_width();
        let attends = lower::attends(&self.compiled.model);
        let state = State::new(params.to_vec());
        let (mut h, memory) = self.encode(&state, inputs, b)?;
        let (_, step) = self.graphs.get_mut(&b).ok_or("no decoder graphs")?;
        let extra = step_extra(&step.graph, memory.clone(), inputs.first().cloned());
        let mut prev = vec![self.vocab as i32; b];
        let mut out = vec![0i32; b * self.len];
        let mut ended = vec![false; b];
        let source = memory.as_ref().map_or(0, |m| m.len() / b.max(1) / width.max(1));
        let record = attends && self.weights.is_some();
        let mut weights = vec![0f32; if record { b * self.len * source } else { 0 }];
        for t in 0..self.len {
            if self.padded && ended.iter().all(|&e| e) {
                break;
            }
            let mut step_inputs = vec![Buf::I32(prev.clone()), h];
            step_inputs.extend(extra.iter().cloned());
            let names: &[&str] = if record { &["recon", "state", "attention"] } else { &["recon", "state"] };
            let mut outs = step.run(&state, &step_inputs, names, self.threads)?;
            if record {
                let alpha = outs.pop().ok_or("no attention weights")?;
                for (i, row) in alpha.f32().chunks(source).enumerate().take(b) {
                    if !ended[i] {
                        weights[(i * self.len + t) * source..][..source].copy_from_slice(row);
                    }
                }
            }
            h = outs.pop().ok_or("no state")?;
            let probs = outs.pop().ok_or("no output")?;
            for (i, row) in probs.f32().chunks(self.vocab).enumerate().take(b) {
                let best = argmax(row) as i32;
                prev[i] = best;
                // After its end token a padded sentence is padding.
                out[i * self.len + t] = if ended[i] { PAD } else { best };
                ended[i] |= self.padded && best == END;
            }
        }
        if record {
            self.weights = Some(weights);
        }
        Ok(out)
    }

    /// Beam search with `k` hypotheses per sentence (`k` = 1 is `decode`, token for token):
    /// each step extends every live hypothesis by every token, keeps the `k` best by their
    /// sum of log-probabilities, and moves a hypothesis that writes the end token (padded
    /// targets) to the finished ones; a sentence is done when it has `k` finished. The answer
    /// is the finished (or, at the length limit, live) hypothesis of the best score divided by
    /// GNMT's length penalty ((5 + |Y|) / 6)^α.
    pub fn decode_beam(
        &mut self,
        params: &[Vec<f32>],
        inputs: &[Buf],
        b: usize,
        (k, alpha): (usize, f64),
    ) -> Result<Vec<i32>, String> {
        if k <= 1 {
            return self.decode(params, inputs, b);
        }
        let bk = b * k;
        self.ensure(bk)?;
        let state = State::new(params.to_vec());
        let (h0, memory) = self.encode(&state, inputs, b)?;
        // Every sentence's values repeated for its k hypotheses.
        let repeat_f = |v: &[f32]| -> Vec<f32> {
            let per = v.len() / b.max(1);
            (0..bk).flat_map(|r| v[(r / k) * per..][..per].to_vec()).collect()
        };
        let repeat_i = |v: &[i32]| -> Vec<i32> {
            let per = v.len() / b.max(1);
            (0..bk).flat_map(|r| v[(r / k) * per..][..per].to_vec()).collect()
        };
        let (_, step) = self.graphs.get_mut(&bk).ok_or("no decoder graphs")?;
        let extra = step_extra(
            &step.graph,
            memory.as_ref().map(|m| Buf::F32(repeat_f(m.f32()))),
            inputs.first().map(|s| Buf::I32(repeat_i(s.i32()))),
        );
        let mut h = Buf::F32(repeat_f(h0.f32()));
        let s = h.len() / bk.max(1);
        let (len, vocab) = (self.len, self.vocab);
        let lp = |n: usize| ((5.0 + n as f64) / 6.0).powf(alpha);
        // Per sentence: live hypotheses (score, tokens), at first one (the others start at −∞
        // so that the first step's k best come from one distribution), and finished ones.
        let mut live: Vec<Vec<(f64, Vec<i32>)>> = (0..b)
            .map(|_| (0..k).map(|j| (if j == 0 { 0.0 } else { f64::NEG_INFINITY }, Vec::new())).collect())
            .collect();
        let mut finished: Vec<Vec<(f64, Vec<i32>)>> = vec![Vec::new(); b];
        let mut prev = vec![vocab as i32; bk];
        for t in 0..len {
            if (0..b).all(|i| finished[i].len() >= k) {
                break;
            }
            let mut step_inputs = vec![Buf::I32(prev.clone()), h];
            step_inputs.extend(extra.iter().cloned());
            let mut outs = step.run(&state, &step_inputs, &["recon", "state"], self.threads)?;
            let next = outs.pop().ok_or("no state")?;
            let probs = outs.pop().ok_or("no output")?;
            let probs = probs.f32();
            let mut new_h = vec![0f32; bk * s];
            for i in 0..b {
                if finished[i].len() >= k {
                    continue;
                }
                // The best 2k extensions of the live hypotheses (ties: the lower beam, then
                // the lower token, as argmax takes the first).
                let mut cands: Vec<(f64, usize, usize)> = Vec::with_capacity(k * vocab);
                for j in 0..k {
                    let (score, _) = &live[i][j];
                    if !score.is_finite() {
                        continue;
                    }
                    let row = log_probs(&probs[(i * k + j) * vocab..][..vocab], self.logits);
                    for (v, lp) in row.into_iter().enumerate() {
                        cands.push((score + lp, j, v));
                    }
                }
                cands.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
                let mut kept = Vec::with_capacity(k);
                for (score, j, v) in cands {
                    if kept.len() >= k || finished[i].len() >= k {
                        break;
                    }
                    let mut tokens = live[i][j].1.clone();
                    tokens.push(v as i32);
                    if self.padded && v as i32 == END {
                        finished[i].push((score / lp(tokens.len()), tokens));
                    } else {
                        kept.push((score, tokens, j));
                    }
                }
                while kept.len() < k {
                    kept.push((f64::NEG_INFINITY, Vec::new(), 0));
                }
                for (slot, (score, tokens, parent)) in kept.into_iter().enumerate() {
                    let r = i * k + slot;
                    new_h[r * s..][..s].copy_from_slice(&next.f32()[(i * k + parent) * s..][..s]);
                    prev[r] = tokens.last().copied().unwrap_or(vocab as i32);
                    live[i][slot] = (score, tokens);
                }
            }
            h = Buf::F32(new_h);
            let _ = t;
        }
        let mut out = vec![PAD; b * len];
        for i in 0..b {
            let mut all = std::mem::take(&mut finished[i]);
            if all.len() < k {
                all.extend(
                    live[i]
                        .iter()
                        .filter(|l| l.0.is_finite())
                        .map(|(sc, tk)| (sc / lp(tk.len()), tk.clone())),
                );
            }
            let best = all.iter().fold(None::<&(f64, Vec<i32>)>, |best, c| match best {
                Some(b) if b.0 >= c.0 => Some(b),
                _ => Some(c),
            });
            if let Some((_, tokens)) = best {
                for (t, &v) in tokens.iter().take(len).enumerate() {
                    out[i * len + t] = v;
                }
            }
        }
        Ok(out)
    }

    /// The log-probability the model gives each of `sequences` (`[B, len]`, each up to and
    /// including its end token when the target is padded) of the inputs: what beam search
    /// maximizes, before the length penalty.
    pub fn score(
        &mut self,
        params: &[Vec<f32>],
        inputs: &[Buf],
        b: usize,
        sequences: &[i32],
    ) -> Result<Vec<f64>, String> {
        let state = State::new(params.to_vec());
        let (mut h, memory) = self.encode(&state, inputs, b)?;
        let (_, step) = self.graphs.get_mut(&b).ok_or("no decoder graphs")?;
        let extra = step_extra(&step.graph, memory, inputs.first().cloned());
        let mut prev = vec![self.vocab as i32; b];
        let mut total = vec![0f64; b];
        let mut ended = vec![false; b];
        for t in 0..self.len {
            let mut step_inputs = vec![Buf::I32(prev.clone()), h];
            step_inputs.extend(extra.iter().cloned());
            let mut outs = step.run(&state, &step_inputs, &["recon", "state"], self.threads)?;
            h = outs.pop().ok_or("no state")?;
            let probs = outs.pop().ok_or("no output")?;
            for i in 0..b {
                let v = sequences[i * self.len + t];
                if !ended[i] {
                    let row = log_probs(&probs.f32()[i * self.vocab..][..self.vocab], self.logits);
                    total[i] += row.get(v as usize).copied().unwrap_or(f64::NEG_INFINITY);
                }
                ended[i] |= self.padded && v == END;
                prev[i] = v;
            }
        }
        Ok(total)
    }

    /// The width of the encoder's states that attention reads.
    fn memory_width(&self) -> usize {
        self.compiled
            .model
            .layers
            .iter()
            .rev()
            .find_map(|l| match (&l.part, &l.layer.kind) {
                (crate::sema::Part::Encoder, crate::syntax::ast::LayerKind::Recurrent(r)) => {
                    Some(r.hidden as usize)
                }
                _ => None,
            })
            .unwrap_or(1)
    }
}

/// A decoder step's inputs besides `prev` and `state`, in its order: the encoder's states and
/// the source (attention's).
fn step_extra(step: &Graph, memory: Option<Buf>, source: Option<Buf>) -> Vec<Buf> {
    step.inputs
        .iter()
        .skip(2)
        .filter_map(|i| match i.name.as_str() {
            "memory" => memory.clone(),
            "source" => source.clone(),
            _ => None,
        })
        .collect()
}

/// `inputs` and, for each graph input after them (a target the encoder does not read), an
/// empty buffer.
fn all_inputs(g: &Graph, inputs: &[Buf]) -> Vec<Buf> {
    let mut all = inputs.to_vec();
    all.extend(g.inputs.iter().skip(inputs.len()).map(|i| match i.ty.dtype {
        crate::ir::DType::I32 => Buf::I32(Vec::new()),
        crate::ir::DType::F32 => Buf::F32(Vec::new()),
    }));
    all
}

/// The log-probabilities of a row of probabilities (or, with `logits`, of logits).
fn log_probs(row: &[f32], logits: bool) -> Vec<f64> {
    if logits {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let lse = f64::from(max) + row.iter().map(|&z| f64::from(z - max).exp()).sum::<f64>().ln();
        row.iter().map(|&z| f64::from(z) - lse).collect()
    } else {
        row.iter().map(|&p| f64::from(p.max(f32::MIN_POSITIVE)).ln()).collect()
    }
}

/// The index of the largest value (the first on ties).
pub fn argmax(row: &[f32]) -> usize {
    row.iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |best, (i, &v)| if v > best.1 { (i, v) } else { best })
        .0
}

/// Token accuracy and whole-sequence accuracy of `got` against `want` (`[N, len]` each); with
/// `padded`, over the real tokens of `want` (its padding left out).
pub fn accuracy(got: &[i32], want: &[i32], len: usize, padded: bool) -> (f64, f64) {
    let n = want.len() / len.max(1);
    if n == 0 {
        return (0.0, 0.0);
    }
    let real = |w: &i32| !padded || *w != PAD;
    let tokens = got.iter().zip(want).filter(|(a, b)| real(b) && a == b).count();
    let count = want.iter().filter(|w| real(w)).count().max(1);
    let seqs = got
        .chunks(len)
        .zip(want.chunks(len))
        .filter(|(a, b)| a.iter().zip(*b).all(|(x, y)| !real(y) || x == y))
        .count();
    (tokens as f64 / count as f64, seqs as f64 / n as f64)
}

/// Corpus BLEU-4 of padded sentences: each up to its end token; an unknown word of a
/// reference (`<unk>`) matches nothing, as the word it stands for would not match `<unk>`.
pub fn bleu(got: &[i32], want: &[i32], len: usize) -> f64 {
    let cut =
        |s: &[i32]| -> Vec<i64> { s.iter().take_while(|&&id| id != END).map(|&id| i64::from(id)).collect() };
    let hyps: Vec<Vec<i64>> = got.chunks(len).map(cut).collect();
    let refs: Vec<Vec<i64>> = want
        .chunks(len)
        .map(|s| {
            cut(s)
                .into_iter()
                .enumerate()
                .map(|(i, id)| if id == i64::from(UNK) { -1 - i as i64 } else { id })
                .collect()
        })
        .collect();
    super::bleu::corpus_bleu(&hyps, &refs)
}
