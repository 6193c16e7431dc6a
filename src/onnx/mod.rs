//! `aec export`: a checked model and its trained parameters as an ONNX model — the inference
//! graph (no loss; no dropout; a Gaussian code is its mean), the parameters as initializers
//! named and shaped as in the checkpoint, a dynamic batch dimension (`batch`).
//!
//! Each layer becomes standard ONNX operators (opset 14 or later): `Gemm` (or `MatMul` + `Add`
//! on sequences), `Conv`, `ConvTranspose`, `MaxPool` with its indices and `MaxUnpool` (ONNX
//! indexes the whole N×C×H×W tensor where PyTorch indexes each plane; the exported pool feeds
//! its own indices to the unpool, with the pool input's runtime shape, so odd sizes come back
//! whole), `AveragePool`, `Flatten`, `Reshape`, `Gather` for embeddings, and `RNN`, `GRU`
//! (`linear_before_reset = 1`, as PyTorch's) and `LSTM`. The
//! recurrent weights stay the checkpoint's tensors: the graph reorders their gates from
//! PyTorch's (r, z, n / i, f, g, o) to ONNX's (z, r, h / i, o, f, c) with `Split` and `Concat`.
//! The recurrent ops run time first (`layout = 0`; onnxruntime's CPU kernels refuse batch
//! first), between two `Transpose`s.

pub mod proto;

use crate::sema::{LayerInfo, Model, Part, Ty};
use crate::syntax::ast::{ActKind, Cell, LayerKind, Score};
use proto::{AttributeProto, GraphProto, ModelProto, NodeProto, TensorProto, TypeProto, ValueInfoProto};
use std::collections::BTreeSet;

/// The opsets aec writes: 14 (Softmax on the last axis, Squeeze's axes as an input, the
/// recurrent ops as of 14) to 21, the newest checked with onnxruntime.
pub const OPSETS: std::ops::RangeInclusive<i64> = 14..=21;
pub const DEFAULT_OPSET: i64 = 17;

/// Which part of the network.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Export {
    /// Input to reconstruction, with the code as a second output.
    Model,
    /// Input to code.
    Encoder,
    /// Code to reconstruction.
    Decoder,
    /// One step of a teacher-forced decoder's greedy decoding: the previous token `prev`
    /// (`[batch, 1]`, the start token is the vocabulary size) and the state `state` to the
    /// step's output `recon` (`[batch, 1, vocab]`) and the state after it (`state_after`).
    Step,
}

/// The ONNX model of `part` of `m` with `params` (in `m.params`' order).
pub fn export(m: &Model, params: &[Vec<f32>], part: Export, opset: i64) -> Result<ModelProto, String> {
    if !OPSETS.contains(&opset) {
        return Err(format!("opset {opset} is not one aec writes ({} to {})", OPSETS.start(), OPSETS.end()));
    }
    if params.len() != m.params.len() {
        return Err(format!("{} parameter tensors for a model of {}", params.len(), m.params.len()));
    }
    let forced = m.decoder().find(|l| matches!(&l.layer.kind, LayerKind::Recurrent(r) if r.teacher_forcing));
    match (forced, part) {
        (Some(l), Export::Model | Export::Decoder) => {
            return Err(format!(
                "the decoder's `{}` is teacher-forced: it reads the previous token, so greedy \
                 decoding is a loop around one decoder step; export `--part encoder` (the code and \
                 the state) and `--part step`, and loop over the step",
                l.layer
            ));
        }
        (None, Export::Step) => {
            return Err("`--part step` is a teacher-forced decoder's step, and this decoder has none".into());
        }
        _ => {}
    }
    let mut b = Builder {
        m,
        params,
        nodes: Vec::new(),
        used: BTreeSet::new(),
        pools: Vec::new(),
        named: Vec::new(),
        count: 0,
        state: None,
        step: None,
        source: None,
        memory: None,
        mask_ids: None,
        code_ids: None,
    };
    let mut inputs = Vec::new();
    let mut outputs = Vec::new();
    let mut logvar = None;
    let mut x = match part {
        Export::Model | Export::Encoder => {
            let var = m.inputs.first().ok_or("the model has no input")?;
            inputs.push(value_info(&var.name, &var.ty));
            if let (true, Ty::Tokens { len, .. }) = (var.padded, &var.ty) {
                b.source = Some((var.name.clone(), *len));
            }
            var.name.clone()
        }
        Export::Step => {
            let vocab = match m.loss_target().map(|t| &t.ty) {
                Some(Ty::Tokens { vocab, .. }) => *vocab,
                _ => return Err("a teacher-forced decoder needs token targets".into()),
            };
            inputs.push(value_info("prev", &Ty::Tokens { len: 1, vocab }));
            inputs.push(value_info("state", &Ty::Tensor(vec![state_size(forced)])));
            b.step = Some(("prev".to_owned(), "state".to_owned(), vocab));
            // Attention reads the encoder's states (`--part encoder`'s `memory`) and the source.
            if crate::sema::lower::attends(m) {
                let (len, width) = memory_shape(m).ok_or("attention without an encoder recurrent layer")?;
                inputs.push(value_info("memory", &Ty::Seq { len, dim: width }));
                b.memory = Some("memory".to_owned());
                if let Some(var) = m.inputs.first().filter(|v| v.padded) {
                    inputs.push(value_info("source", &var.ty));
                    b.mask_ids = Some("source".to_owned());
                }
            }
            "state".to_owned()
        }
        Export::Decoder => {
            if let Some(l) = m.decoder().find(|l| matches!(l.layer.kind, LayerKind::Unpool { .. })) {
                return Err(format!(
                    "the decoder's `{}` puts values back through the encoder's pool switches: it \
                     cannot run on a code alone; export the whole model",
                    l.layer
                ));
            }
            let encoder_names: Vec<&str> =
                m.encoder().filter_map(|l| l.layer.output_name()).map(|n| n.name.as_str()).collect();
            if let Some(l) = m.decoder().find(
                |l| matches!(&l.layer.kind, LayerKind::Link { from, .. } if encoder_names.contains(&from.name.as_str())),
            ) {
                return Err(format!(
                    "the decoder's `{}` reads an encoder layer's output: it cannot run on a code \
                     alone; export the whole model",
                    l.layer
                ));
            }
            inputs.push(value_info("code", &m.code));
            "code".to_owned()
        }
    };
    // A conditioned model's conditions: inputs after the first (a class as int64 ids, joined
    // one-hot), each named for the `concat` that reads it.
    if part != Export::Step {
        for v in &m.conditions {
            inputs.push(value_info(&v.name, &v.ty));
            let joined = match v.ty {
                Ty::Token { vocab } => {
                    let depth = b.ints_const(&[vocab as i64], &v.name);
                    let values = b.floats_const(&[0.0, 1.0], &v.name);
                    b.node("OneHot", &[&v.name, &depth, &values], vec![int("axis", -1)], &v.name)
                }
                _ => v.name.clone(),
            };
            b.named.push((v.name.clone(), joined));
        }
    }
    if matches!(part, Export::Model | Export::Encoder) {
        for l in m.encoder() {
            x = b.layer(l, &x, &mut logvar)?;
        }
        let code = b.node("Identity", &[&x], vec![], "code");
        outputs.push(value_info(&code, &m.code));
        if let Some(lv) = &logvar {
            let lv = b.node("Identity", &[lv], vec![], "logvar");
            outputs.push(value_info(&lv, &m.code));
        }
        if let Some((ids, dims)) = b.code_ids.clone() {
            let ids = b.node("Identity", &[&ids], vec![], "code_ids");
            outputs.push(ids_info(&ids, &dims));
        }
        // The state a teacher-forced decoder starts from: the encoder's last (h, or h and c).
        if let (Some(_), Some(state)) = (forced, b.state.clone()) {
            let s = b.node("Identity", &[&state], vec![], "state");
            outputs.push(value_info(&s, &Ty::Tensor(vec![state_size(forced)])));
        }
        // And what its attention reads.
        if let (true, Some(memory), Some((len, width))) =
            (crate::sema::lower::attends(m), b.memory.clone(), memory_shape(m))
        {
            let y = b.node("Identity", &[&memory], vec![], "memory");
            outputs.push(value_info(&y, &Ty::Seq { len, dim: width }));
        }
        x = code;
    }
    if matches!(part, Export::Model | Export::Decoder) {
        for l in m.decoder() {
            x = b.layer(l, &x, &mut logvar)?;
        }
        let recon = b.node("Identity", &[&x], vec![], "recon");
        outputs.insert(0, value_info(&recon, &m.output));
    }
    if part == Export::Step {
        // From the teacher-forced layer on; that layer reads `prev` and `state` itself.
        let layers = m
            .decoder()
            .skip_while(|l| !matches!(&l.layer.kind, LayerKind::Recurrent(r) if r.teacher_forcing));
        for l in layers {
            x = b.layer(l, &x, &mut logvar)?;
        }
        let vocab = b.step.as_ref().map_or(0, |s| s.2);
        let recon = b.node("Identity", &[&x], vec![], "recon");
        outputs.push(value_info(&recon, &Ty::Seq { len: 1, dim: vocab }));
        let after = b.state.clone().ok_or("the step has no state")?;
        let s = b.node("Identity", &[&after], vec![], "state_after");
        outputs.push(value_info(&s, &Ty::Tensor(vec![state_size(forced)])));
    }
    let initializer = b
        .used
        .iter()
        .map(|&p| {
            let info = &m.params[p];
            TensorProto {
                dims: info.shape.iter().map(|&d| d as i64).collect(),
                data_type: Some(proto::FLOAT),
                name: Some(info.name.clone()),
                raw_data: Some(params[p].iter().flat_map(|v| v.to_le_bytes()).collect()),
            }
        })
        .collect();
    let part_name = match part {
        Export::Model => "model",
        Export::Encoder => "encoder",
        Export::Decoder => "decoder",
        Export::Step => "decoder step",
    };
    let graph = GraphProto {
        node: b.nodes,
        name: Some(format!("{}.{part_name}", m.name)),
        initializer,
        doc_string: Some(format!("the {part_name} of aec model `{}`", m.name)),
        input: inputs,
        output: outputs,
    };
    Ok(ModelProto {
        ir_version: Some(ir_version(opset)),
        opset_import: vec![proto::OperatorSetIdProto { domain: Some(String::new()), version: Some(opset) }],
        producer_name: Some("aec".into()),
        producer_version: Some(env!("CARGO_PKG_VERSION").into()),
        doc_string: None,
        graph: Some(graph),
    })
}

/// The size of the state a teacher-forced layer carries (h, or h and c).
fn state_size(forced: Option<&LayerInfo>) -> u64 {
    match forced.map(|l| &l.layer.kind) {
        Some(LayerKind::Recurrent(r)) => r.cell.state(r.hidden as usize) as u64,
        _ => 0,
    }
}

/// The IR version of the ONNX release that introduced `opset`.
fn ir_version(opset: i64) -> i64 {
    match opset {
        ..=18 => 8,
        19 | 20 => 9,
        _ => 10,
    }
}

/// A graph input or output: `[batch, …]` of the type's element.
fn value_info(name: &str, ty: &Ty) -> ValueInfoProto {
    use proto::tensor_shape_proto::{Dimension, dimension::Value};
    let (elem, dims): (i32, Vec<u64>) = match ty {
        Ty::Tensor(d) => (proto::FLOAT, d.clone()),
        Ty::Seq { len, dim } => (proto::FLOAT, vec![*len, *dim]),
        Ty::Tokens { len, .. } => (proto::INT64, vec![*len]),
        Ty::Token { .. } => (proto::INT64, vec![]),
    };
    let mut dim = vec![Dimension { value: Some(Value::DimParam("batch".into())) }];
    dim.extend(dims.iter().map(|&d| Dimension { value: Some(Value::DimValue(d as i64)) }));
    let tensor =
        proto::type_proto::Tensor { elem_type: Some(elem), shape: Some(proto::TensorShapeProto { dim }) };
    ValueInfoProto {
        name: Some(name.to_owned()),
        r#type: Some(TypeProto { value: Some(proto::type_proto::Value::TensorType(tensor)) }),
    }
}

/// An int64 graph output `[batch, …dims]` (a quantized code's ids).
fn ids_info(name: &str, dims: &[u64]) -> ValueInfoProto {
    let mut v = value_info(name, &Ty::Tensor(dims.to_vec()));
    if let Some(proto::type_proto::Value::TensorType(t)) = v.r#type.as_mut().and_then(|t| t.value.as_mut()) {
        t.elem_type = Some(proto::INT64);
    }
    v
}

/// A size per axis as ONNX's attributes take it.
fn hw(a: [u64; 2]) -> Vec<i64> {
    a.iter().map(|&v| v as i64).collect()
}

fn ints(name: &str, v: &[i64]) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(proto::ATTR_INTS),
        ints: v.to_vec(),
        ..Default::default()
    }
}

fn int(name: &str, v: i64) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(proto::ATTR_INT),
        i: Some(v),
        ..Default::default()
    }
}

fn string(name: &str, v: &str) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(proto::ATTR_STRING),
        s: Some(v.as_bytes().to_vec()),
        ..Default::default()
    }
}

fn float(name: &str, v: f32) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(proto::ATTR_FLOAT),
        f: Some(v),
        ..Default::default()
    }
}

/// A named max pool as its unpool needs it: the values of its indices and of its input's
/// shape, and its window.
#[derive(Clone)]
struct Pooled {
    name: String,
    indices: String,
    shape: String,
    kernel: Vec<i64>,
    stride: Vec<i64>,
}

struct Builder<'a> {
    m: &'a Model,
    params: &'a [Vec<f32>],
    nodes: Vec<NodeProto>,
    /// The parameters the graph reads: its initializers.
    used: BTreeSet<usize>,
    /// Named max pools, for their unpools.
    pools: Vec<Pooled>,
    /// Named layer outputs, for the links that read them.
    named: Vec<(String, String)>,
    count: usize,
    /// The last recurrent layer's state after it (h, or h and c side by side).
    state: Option<String>,
    /// Exporting a decoder step: the inputs `prev` and `state`, and the vocabulary.
    step: Option<(String, String, u64)>,
    /// A padded source (`seq[<= N]`): its input's name and length, whose sentences' lengths
    /// the encoder's recurrent layers take as `sequence_lens` (PyTorch's packed sequences).
    source: Option<(String, u64)>,
    /// Attention: the encoder's states after every source token (`[B, S, H]`) and, for a
    /// padded source, the source ids whose padding it masks.
    memory: Option<String>,
    mask_ids: Option<String>,
    /// A quantized code's ids (int64 `[batch]`, or `[batch, H, W]` for an image) and their
    /// shape after the batch.
    code_ids: Option<(String, Vec<u64>)>,
}

impl Builder<'_> {
    /// Adds a node with one output, named `hint` (made unique); returns the output's name.
    fn node(&mut self, op: &str, inputs: &[&str], attrs: Vec<AttributeProto>, hint: &str) -> String {
        self.node_n(op, inputs, attrs, hint, 1).remove(0)
    }

    /// Adds a node with `n` outputs.
    fn node_n(
        &mut self,
        op: &str,
        inputs: &[&str],
        attrs: Vec<AttributeProto>,
        hint: &str,
        n: usize,
    ) -> Vec<String> {
        self.count += 1;
        // The graph's outputs keep their names (`code`, `recon`); inner values are numbered.
        let outputs: Vec<String> = (0..n)
            .map(|k| match (hint, k) {
                ("code" | "recon" | "logvar" | "code_ids" | "state" | "state_after" | "memory", 0) => {
                    hint.to_owned()
                }
                _ => format!(
                    "{hint}/{op}_{}{}",
                    self.count,
                    if n > 1 { format!(".{k}") } else { String::new() }
                ),
            })
            .collect();
        self.nodes.push(NodeProto {
            input: inputs.iter().map(|s| (*s).to_owned()).collect(),
            output: outputs.clone(),
            name: Some(format!("{hint}/{op}_{}", self.count)),
            op_type: Some(op.into()),
            attribute: attrs,
        });
        outputs
    }

    /// A quantizer: each vector (an image's channels at each position, moved last) against
    /// every codebook row, `ArgMin` of the squared distances (the first on ties, as aec), and
    /// `Gather` of the rows it picks; the ids become the output `code_ids`.
    fn quantize(&mut self, l: &LayerInfo, x: &str, hint: &str) -> Result<String, String> {
        let codebook = self.own(l, 0)?;
        let Ty::Tensor(dims) = &l.input else { return Err("a quantizer of a sequence".into()) };
        let image = dims.len() == 3;
        let rows = if image {
            self.node("Transpose", &[x], vec![ints("perm", &[0, 2, 3, 1])], hint)
        } else {
            x.to_owned()
        };
        let axis = self.ints_const(&[-2], hint);
        let rows1 = self.node("Unsqueeze", &[&rows, &axis], vec![], hint);
        let diff = self.node("Sub", &[&rows1, &codebook], vec![], hint);
        let sq = self.node("Mul", &[&diff, &diff], vec![], hint);
        let last = self.ints_const(&[-1], hint);
        let dist = self.node("ReduceSum", &[&sq, &last], vec![int("keepdims", 0)], hint);
        let ids = self.node("ArgMin", &[&dist], vec![int("axis", -1), int("keepdims", 0)], hint);
        let picked = self.node("Gather", &[&codebook, &ids], vec![int("axis", 0)], hint);
        self.code_ids = Some((ids, if image { dims[1..].to_vec() } else { Vec::new() }));
        Ok(if image {
            self.node("Transpose", &[&picked], vec![ints("perm", &[0, 3, 1, 2])], hint)
        } else {
            picked
        })
    }

    /// A constant int64 tensor (a `Constant` node: initializers are the parameters alone).
    fn ints_const(&mut self, v: &[i64], hint: &str) -> String {
        let bytes = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        self.constant(proto::INT64, v.len(), bytes, hint)
    }

    /// A constant f32 tensor.
    fn floats_const(&mut self, v: &[f32], hint: &str) -> String {
        let bytes = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        self.constant(proto::FLOAT, v.len(), bytes, hint)
    }

    /// A `Constant` node holding a vector of `len` values of `data_type`, little-endian.
    fn constant(&mut self, data_type: i32, len: usize, bytes: Vec<u8>, hint: &str) -> String {
        let t = TensorProto {
            dims: vec![len as i64],
            data_type: Some(data_type),
            name: None,
            raw_data: Some(bytes),
        };
        let attr = AttributeProto {
            name: Some("value".into()),
            r#type: Some(proto::ATTR_TENSOR),
            t: Some(t),
            ..Default::default()
        };
        self.node("Constant", &[], vec![attr], hint)
    }

    /// The name of parameter `p` (an initializer).
    fn param(&mut self, p: usize) -> Result<String, String> {
        let info = self.m.params.get(p).ok_or("a parameter index out of range")?;
        self.params.get(p).ok_or("a parameter missing")?;
        self.used.insert(p);
        Ok(info.name.clone())
    }

    fn own(&mut self, l: &LayerInfo, k: usize) -> Result<String, String> {
        let p = *l.params.get(k).ok_or_else(|| format!("{}: parameter {k} missing", l.layer))?;
        self.param(p)
    }

    /// The layer `l` applied to the value `x`; the name of its output.
    fn layer(&mut self, l: &LayerInfo, x: &str, logvar: &mut Option<String>) -> Result<String, String> {
        let hint = format!("{}.{}", l.part.prefix(), l.index);
        let hint = hint.as_str();
        let y = match &l.layer.kind {
            LayerKind::Attention { score } => self.attention(l, *score, x, hint)?,
            LayerKind::Dense { bias, .. } => {
                let (w, k) = match l.tied_weight {
                    Some(p) => (self.param(p)?, 0),
                    None => (self.own(l, 0)?, 1),
                };
                let b = if *bias { Some(self.own(l, k)?) } else { None };
                self.affine(
                    x,
                    &w,
                    b.as_deref(),
                    l.tied_weight.is_none(),
                    matches!(l.input, Ty::Seq { .. }),
                    hint,
                )
            }
            LayerKind::Gaussian { .. } => {
                // The code is the mean; the log-variance is an output of its own.
                let (w, b) = (self.own(l, 0)?, self.own(l, 1)?);
                let mu = self.affine(x, &w, Some(&b), true, false, &format!("{hint}.mu"));
                let (w, b) = (self.own(l, 2)?, self.own(l, 3)?);
                *logvar = Some(self.affine(x, &w, Some(&b), true, false, &format!("{hint}.logvar")));
                mu
            }
            LayerKind::Quantize { .. } => self.quantize(l, x, hint)?,
            LayerKind::Conv(c) | LayerKind::Deconv(c) => {
                let (w, k) = match l.tied_weight {
                    Some(p) => (self.param(p)?, 0),
                    None => (self.own(l, 0)?, 1),
                };
                let b = if c.bias { Some(self.own(l, k)?) } else { None };
                let mut inputs = vec![x, w.as_str()];
                if let Some(b) = &b {
                    inputs.push(b);
                }
                let hw = |a: [u64; 2]| a.iter().map(|&v| v as i64).collect::<Vec<_>>();
                let [ph, pw] = c.pad.map(|v| v as i64);
                let mut attrs = vec![
                    ints("kernel_shape", &hw(c.kernel)),
                    ints("strides", &hw(c.stride)),
                    ints("pads", &[ph, pw, ph, pw]),
                ];
                if matches!(l.layer.kind, LayerKind::Conv(_)) {
                    self.node("Conv", &inputs, attrs, hint)
                } else {
                    attrs.push(ints("output_padding", &hw(c.out_pad)));
                    self.node("ConvTranspose", &inputs, attrs, hint)
                }
            }
            LayerKind::MaxPool(p) => {
                let attrs = vec![ints("kernel_shape", &hw(p.kernel)), ints("strides", &hw(p.stride))];
                let out = self.node_n("MaxPool", &[x], attrs, hint, 2);
                if let Some(name) = &p.name {
                    let shape = self.node("Shape", &[x], vec![], hint);
                    self.pools.push(Pooled {
                        name: name.name.clone(),
                        indices: out[1].clone(),
                        shape,
                        kernel: hw(p.kernel),
                        stride: hw(p.stride),
                    });
                }
                out[0].clone()
            }
            LayerKind::AvgPool(p) => {
                let attrs = vec![ints("kernel_shape", &hw(p.kernel)), ints("strides", &hw(p.stride))];
                self.node("AveragePool", &[x], attrs, hint)
            }
            LayerKind::Unpool { pool } => {
                let p = self
                    .pools
                    .iter()
                    .find(|p| p.name == pool.name)
                    .cloned()
                    .ok_or_else(|| format!("unpool {}: its pool is not in this part", pool.name))?;
                let attrs = vec![ints("kernel_shape", &p.kernel), ints("strides", &p.stride)];
                self.node("MaxUnpool", &[x, &p.indices, &p.shape], attrs, hint)
            }
            LayerKind::Flatten => self.node("Flatten", &[x], vec![int("axis", 1)], hint),
            LayerKind::Reshape { dims } => {
                // 0 keeps the batch dimension as it is.
                let shape: Vec<i64> = std::iter::once(0).chain(dims.iter().map(|&d| d as i64)).collect();
                let shape = self.ints_const(&shape, hint);
                self.node("Reshape", &[x, &shape], vec![], hint)
            }
            LayerKind::Embed { .. } => {
                let table = self.own(l, 0)?;
                self.node("Gather", &[&table, x], vec![], hint)
            }
            LayerKind::Dropout { .. } => x.to_owned(),
            LayerKind::Link { link, from } => {
                let other = self
                    .named
                    .iter()
                    .rev()
                    .find(|(n, _)| *n == from.name)
                    .map(|(_, v)| v.clone())
                    .ok_or_else(|| format!("`{}` is not in this part", from.name))?;
                match link {
                    crate::syntax::ast::Link::Concat => {
                        self.node("Concat", &[x, &other], vec![int("axis", 1)], hint)
                    }
                    crate::syntax::ast::Link::Add => self.node("Add", &[x, &other], vec![], hint),
                }
            }
            LayerKind::BatchNorm { momentum, eps } => {
                // Inference: the running statistics (ONNX's `BatchNormalization` in test mode).
                let [w, b, mean, var] = [0, 1, 2, 3].map(|k| self.own(l, k));
                let (w, b, mean, var) = (w?, b?, mean?, var?);
                let attrs = vec![float("epsilon", *eps as f32), float("momentum", 1.0 - *momentum as f32)];
                self.node("BatchNormalization", &[x, &w, &b, &mean, &var], attrs, hint)
            }
            LayerKind::Upsample { scale, bilinear } => {
                let scales = self.floats_const(&[1.0, 1.0, scale[0] as f32, scale[1] as f32], hint);
                let attrs = if *bilinear {
                    vec![
                        string("mode", "linear"),
                        string("coordinate_transformation_mode", "pytorch_half_pixel"),
                    ]
                } else {
                    vec![
                        string("mode", "nearest"),
                        string("coordinate_transformation_mode", "asymmetric"),
                        string("nearest_mode", "floor"),
                    ]
                };
                self.node("Resize", &[x, "", &scales], attrs, hint)
            }
            LayerKind::Activation(a) => {
                let y = self.activation(a.kind, x, hint);
                self.name(l, &y);
                return Ok(y);
            }
            LayerKind::Recurrent(r) => self.recurrent(l, r, x, hint)?,
        };
        let mut y = y;
        for a in &l.layer.activations {
            y = self.activation(a.kind, &y, hint);
        }
        self.name(l, &y);
        Ok(y)
    }

    /// Records the output of a named layer.
    fn name(&mut self, l: &LayerInfo, y: &str) {
        if let Some(n) = l.layer.output_name() {
            self.named.push((n.name.clone(), y.to_owned()));
        }
    }

    /// `x·Wᵀ + b` (`transposed`: W stored `[out, in]`, else `[in, out]`, a tied weight).
    fn affine(
        &mut self,
        x: &str,
        w: &str,
        b: Option<&str>,
        transposed: bool,
        seq: bool,
        hint: &str,
    ) -> String {
        if !seq {
            let mut inputs = vec![x, w];
            if let Some(b) = b {
                inputs.push(b);
            }
            return self.node("Gemm", &inputs, vec![int("transB", i64::from(transposed))], hint);
        }
        // Gemm takes matrices: a sequence `[B, T, F]` multiplies by MatMul, which broadcasts.
        let w = if transposed {
            self.node("Transpose", &[w], vec![ints("perm", &[1, 0])], hint)
        } else {
            w.to_owned()
        };
        let y = self.node("MatMul", &[x, &w], vec![], hint);
        match b {
            Some(b) => self.node("Add", &[&y, b], vec![], hint),
            None => y,
        }
    }

    fn activation(&mut self, a: ActKind, x: &str, hint: &str) -> String {
        match a {
            ActKind::Identity => x.to_owned(),
            ActKind::Relu => self.node("Relu", &[x], vec![], hint),
            ActKind::Sigmoid => self.node("Sigmoid", &[x], vec![], hint),
            ActKind::Tanh => self.node("Tanh", &[x], vec![], hint),
            ActKind::Softmax => self.node("Softmax", &[x], vec![int("axis", -1)], hint),
            ActKind::LeakyRelu(s) => self.node("LeakyRelu", &[x], vec![float("alpha", s as f32)], hint),
        }
    }

    /// A recurrent layer as ONNX's op, batch first; its output (every step's h, or the last).
    fn recurrent(
        &mut self,
        l: &LayerInfo,
        r: &crate::syntax::ast::RecurrentSpec,
        x: &str,
        hint: &str,
    ) -> Result<String, String> {
        let h = r.hidden as i64;
        // From a vector (a decoder reading the code at every step): the code repeated.
        let xs = match (&l.input, &l.output) {
            _ if r.teacher_forcing => {
                // One step: the previous token one-hot over the vocabulary and the start token.
                let (prev, _, vocab) = self.step.clone().ok_or("a teacher-forced layer outside a step")?;
                let depth = self.ints_const(&[vocab as i64 + 1], hint);
                let values = self.floats_const(&[0.0, 1.0], hint);
                self.node("OneHot", &[&prev, &depth, &values], vec![int("axis", -1)], hint)
            }
            (Ty::Tensor(_), Ty::Seq { len, .. }) => {
                let axes = self.ints_const(&[1], hint);
                let one = self.node("Unsqueeze", &[x, &axes], vec![], hint);
                let reps = self.ints_const(&[1, *len as i64, 1], hint);
                self.node("Tile", &[&one, &reps], vec![], hint)
            }
            _ => x.to_owned(),
        };
        // PyTorch's gate blocks, in the order ONNX wants them.
        let (op, order): (&str, &[usize]) = match r.cell {
            Cell::Rnn => ("RNN", &[0]),
            Cell::Gru => ("GRU", &[1, 0, 2]),
            Cell::Lstm => ("LSTM", &[0, 3, 1, 2]),
        };
        let gates = order.len();
        let reorder = |b: &mut Self, t: &str| -> String {
            let t = if gates > 1 {
                let split = b.ints_const(&vec![h; gates], hint);
                let parts = b.node_n("Split", &[t, &split], vec![int("axis", 0)], hint, gates);
                let ordered: Vec<&str> = order.iter().map(|&g| parts[g].as_str()).collect();
                b.node("Concat", &ordered, vec![int("axis", 0)], hint)
            } else {
                t.to_owned()
            };
            let axes = b.ints_const(&[0], hint);
            b.node("Unsqueeze", &[&t, &axes], vec![], hint)
        };
        let (w_ih, w_hh) = (self.own(l, 0)?, self.own(l, 1)?);
        let w = reorder(self, &w_ih);
        let rr = reorder(self, &w_hh);
        let bias = if r.bias {
            let (b_ih, b_hh) = (self.own(l, 2)?, self.own(l, 3)?);
            let (bi, bh) = (reorder(self, &b_ih), reorder(self, &b_hh));
            Some(self.node("Concat", &[&bi, &bh], vec![int("axis", 1)], hint))
        } else {
            None
        };
        let mut attrs = vec![int("hidden_size", h)];
        if r.cell == Cell::Gru {
            attrs.push(int("linear_before_reset", 1));
        }
        // Time first (`layout = 0`: onnxruntime's CPU kernels take no other), so the batch-first
        // sequence is transposed in, and Y [T, 1, B, H] or Y_h [1, B, H] back out.
        let xt = self.node("Transpose", &[&xs], vec![ints("perm", &[1, 0, 2])], hint);
        let mut inputs = vec![xt, w, rr, bias.unwrap_or_default()];
        // Over a padded source, each sentence's length: its ids that are not 0 (at least 1).
        if let (Part::Encoder, Some((src, n)), Ty::Seq { len, .. }) = (l.part, self.source.clone(), &l.input)
            && *len == n
        {
            let ids = self.node("Cast", &[&src], vec![int("to", 7)], hint);
            let zero = self.ints_const(&[0], hint);
            let pad = self.node("Equal", &[&ids, &zero], vec![], hint);
            let real = self.node("Not", &[&pad], vec![], hint);
            let real = self.node("Cast", &[&real], vec![int("to", 6)], hint);
            let axes = self.ints_const(&[1], hint);
            let count = self.node("ReduceSum", &[&real, &axes], vec![int("keepdims", 0)], hint);
            let one = self.ints_const(&[1], hint);
            let one = self.node("Cast", &[&one], vec![int("to", 6)], hint);
            inputs.push(self.node("Max", &[&count, &one], vec![], hint));
        }
        // A step starts from the carried state: h, or h and c side by side for an LSTM.
        if r.teacher_forcing {
            let (_, state, _) = self.step.clone().ok_or("a teacher-forced layer outside a step")?;
            let axes = self.ints_const(&[0], hint);
            inputs.push(String::new()); // sequence_lens
            if r.cell == Cell::Lstm {
                let split = self.ints_const(&[h, h], hint);
                let hc = self.node_n("Split", &[&state, &split], vec![int("axis", 1)], hint, 2);
                for part in hc {
                    inputs.push(self.node("Unsqueeze", &[&part, &axes], vec![], hint));
                }
            } else {
                inputs.push(self.node("Unsqueeze", &[&state, &axes], vec![], hint));
            }
        }
        let refs: Vec<&str> = inputs.iter().map(String::as_str).collect();
        let lstm = r.cell == Cell::Lstm;
        let outs = self.node_n(op, &refs, attrs, hint, if lstm { 3 } else { 2 });
        let axes = self.ints_const(&[0], hint);
        let last_h = self.node("Squeeze", &[&outs[1], &axes], vec![], hint);
        self.state = Some(if lstm {
            let last_c = self.node("Squeeze", &[&outs[2], &axes], vec![], hint);
            self.node("Concat", &[&last_h, &last_c], vec![int("axis", 1)], hint)
        } else {
            last_h.clone()
        });
        let every = |b: &mut Self| {
            let axes = b.ints_const(&[1], hint);
            let y = b.node("Squeeze", &[&outs[0], &axes], vec![], hint);
            b.node("Transpose", &[&y], vec![ints("perm", &[1, 0, 2])], hint)
        };
        // Attention reads the encoder's state after every step.
        if l.part == Part::Encoder && crate::sema::lower::attends(self.m) {
            let y = every(self);
            self.memory = Some(y);
        }
        Ok(if matches!(l.output, Ty::Seq { .. }) { every(self) } else { last_h })
    }

    /// Luong's attention of the step's state `x [B, 1, H]` over `memory`, as the IR has it.
    fn attention(&mut self, l: &LayerInfo, score: Score, x: &str, hint: &str) -> Result<String, String> {
        let memory = self.memory.clone().ok_or("attention without the encoder's states")?;
        let scores = match score {
            Score::Dot | Score::General => {
                let keys = if score == Score::General {
                    let w = self.own(l, 0)?;
                    self.affine(&memory, &w, None, true, true, hint)
                } else {
                    memory.clone()
                };
                let kt = self.node("Transpose", &[&keys], vec![ints("perm", &[0, 2, 1])], hint);
                self.node("MatMul", &[x, &kt], vec![], hint)
            }
            Score::Additive => {
                let (wq, wk, v) = (self.own(l, 0)?, self.own(l, 1)?, self.own(l, 2)?);
                let q = self.affine(x, &wq, None, true, true, hint);
                let k = self.affine(&memory, &wk, None, true, true, hint);
                let (two, one) = (self.ints_const(&[2], hint), self.ints_const(&[1], hint));
                let q = self.node("Unsqueeze", &[&q, &two], vec![], hint);
                let k = self.node("Unsqueeze", &[&k, &one], vec![], hint);
                let pairs = self.node("Add", &[&q, &k], vec![], hint);
                let e = self.node("Tanh", &[&pairs], vec![], hint);
                let e = self.affine(&e, &v, None, true, true, hint);
                let last = self.ints_const(&[3], hint);
                self.node("Squeeze", &[&e, &last], vec![], hint)
            }
        };
        let scores = match self.mask_ids.clone() {
            Some(ids) => {
                let ids = self.node("Cast", &[&ids], vec![int("to", 7)], hint);
                let axes = self.ints_const(&[1], hint);
                let ids = self.node("Unsqueeze", &[&ids, &axes], vec![], hint);
                let zero = self.ints_const(&[0], hint);
                let pad = self.node("Equal", &[&ids, &zero], vec![], hint);
                let low = self.floats_const(&[f32::MIN], hint);
                self.node("Where", &[&pad, &low, &scores], vec![], hint)
            }
            None => scores,
        };
        let alpha = self.node("Softmax", &[&scores], vec![int("axis", -1)], hint);
        let context = self.node("MatMul", &[&alpha, &memory], vec![], hint);
        let cat = self.node("Concat", &[&context, x], vec![int("axis", -1)], hint);
        let k = score.params();
        let (wc, bc) = (self.own(l, k)?, self.own(l, k + 1)?);
        let y = self.affine(&cat, &wc, Some(&bc), true, true, hint);
        Ok(self.node("Tanh", &[&y], vec![], hint))
    }
}

/// The encoder states attention reads: (source steps, width) of the encoder's last recurrent
/// layer.
fn memory_shape(m: &Model) -> Option<(u64, u64)> {
    let l = m.encoder().filter(|l| matches!(l.layer.kind, LayerKind::Recurrent(_))).last()?;
    match (&l.input, &l.layer.kind) {
        (Ty::Seq { len, .. }, LayerKind::Recurrent(r)) => Some((*len, r.hidden)),
        _ => None,
    }
}

/// Structural checks of an exported model: an opset declared; every node input is a graph
/// input, an initializer or an earlier node's output (or empty, an optional input left out);
/// every graph output is produced; initializer names unique. Returns the problems.
pub fn verify(model: &ModelProto) -> Vec<String> {
    let mut problems = Vec::new();
    if !model.opset_import.iter().any(|o| o.domain.as_deref().unwrap_or("").is_empty() && o.version.is_some())
    {
        problems.push("no default-domain opset declared".to_owned());
    }
    let Some(g) = &model.graph else {
        problems.push("no graph".to_owned());
        return problems;
    };
    let mut defined: BTreeSet<&str> = g.input.iter().filter_map(|i| i.name.as_deref()).collect();
    for t in &g.initializer {
        let name = t.name.as_deref().unwrap_or("");
        if !defined.insert(name) {
            problems.push(format!("`{name}` is defined twice"));
        }
        let numel: i64 = t.dims.iter().product();
        let bytes = t.raw_data.as_ref().map_or(0, Vec::len) as i64;
        if bytes != 4 * numel {
            problems.push(format!("initializer `{name}`: {bytes} bytes for {:?}", t.dims));
        }
    }
    for n in &g.node {
        for i in &n.input {
            if !i.is_empty() && !defined.contains(i.as_str()) {
                problems.push(format!("node {:?} reads `{i}`, defined nowhere before it", n.name));
            }
        }
        for o in &n.output {
            if !defined.insert(o) {
                problems.push(format!("`{o}` is defined twice"));
            }
        }
    }
    for o in &g.output {
        let name = o.name.as_deref().unwrap_or("");
        if !defined.contains(name) {
            problems.push(format!("output `{name}` is never produced"));
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verify_names_what_is_missing() {
        let node = |i: &str, o: &str| NodeProto {
            input: vec![i.into()],
            output: vec![o.into()],
            op_type: Some("Relu".into()),
            ..Default::default()
        };
        let vi = |n: &str| ValueInfoProto { name: Some(n.into()), r#type: None };
        let mut model = ModelProto {
            opset_import: vec![proto::OperatorSetIdProto { domain: Some(String::new()), version: Some(17) }],
            graph: Some(GraphProto {
                node: vec![node("x", "a"), node("a", "y")],
                input: vec![vi("x")],
                output: vec![vi("y")],
                ..Default::default()
            }),
            ..Default::default()
        };
        assert!(verify(&model).is_empty());
        let g = model.graph.as_mut().expect("graph");
        g.node.swap(0, 1);
        g.output.push(vi("z"));
        let problems = verify(&model);
        assert!(problems.iter().any(|p| p.contains("reads `a`")), "{problems:?}");
        assert!(problems.iter().any(|p| p.contains("`z` is never produced")), "{problems:?}");
        model.opset_import.clear();
        assert!(verify(&model).iter().any(|p| p.contains("opset")));
    }
}
