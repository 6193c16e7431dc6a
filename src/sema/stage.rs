//! Greedy layer-wise pretraining (the seed's §4): the shallow autoencoders a stack is built
//! from, one per parameterised encoder layer.
//!
//! Stage k keeps the encoder up to and including its k-th dense/conv layer (with the pools,
//! flattens and activations between) and adds that layer's mirror as a fresh decoder — a dense
//! back to the layer's input width, or a deconv back to its input channels with the output
//! padding that restores its size. Its loss is the mean squared error between the mirror's
//! output and the value that entered layer k; that value is a loss target, so no gradient flows
//! into it. The mirror's parameters are named `pretrain.<k>.weight` / `pretrain.<k>.bias`.

use super::{LayerInfo, Model, ParamInfo, Part, Ty};
use crate::ir::ParamRole;
use crate::syntax::ast::{self, Activation, LayerKind, LossKind};

/// Positions (in `Model::layers`) of the encoder layers that have parameters.
pub fn param_layers(m: &Model) -> Vec<usize> {
    m.layers
        .iter()
        .enumerate()
        .filter(|(_, l)| {
            l.part == Part::Encoder && matches!(l.layer.kind, LayerKind::Dense { .. } | LayerKind::Conv(_))
        })
        .map(|(i, _)| i)
        .collect()
}

/// How many stages greedy pretraining has for this model.
pub fn stages(m: &Model) -> usize {
    param_layers(m).len()
}

/// The model of stage `k` (1-based), and the position of the layer whose input it
/// reconstructs.
pub fn stage_model(m: &Model, k: usize) -> Result<(Model, usize), String> {
    let layers = param_layers(m);
    let &pos = layers
        .get(k.wrapping_sub(1))
        .ok_or_else(|| format!("stage {k} does not exist: the encoder has {} stages", layers.len()))?;
    let target = &m.layers[pos];
    // The activation that produced the layer's input: the previous dense/conv's, or for the
    // first stage the one on the decoder's last layer with parameters (the output's).
    let act = match k {
        1 => m
            .layers
            .iter()
            .rev()
            .find(|l| l.part == Part::Decoder && !l.params.is_empty())
            .and_then(|l| l.layer.activations.last().cloned()),
        _ => m.layers[layers[k - 2]].layer.activations.last().cloned(),
    };
    let span = target.layer.span;
    let activations: Vec<Activation> = act.map(|a| Activation { kind: a.kind, span }).into_iter().collect();

    // Keep the encoder prefix and the parameters it uses, re-indexed.
    let mut params: Vec<ParamInfo> = Vec::new();
    let mut out_layers: Vec<LayerInfo> = Vec::new();
    for l in &m.layers[..=pos] {
        let mut l = l.clone();
        l.params = l
            .params
            .iter()
            .map(|&p| {
                params.push(m.params[p].clone());
                params.len() - 1
            })
            .collect();
        out_layers.push(l);
    }
    let prefix = format!("pretrain.{k}");
    let (kind, shapes) = match (&target.layer.kind, &target.input, &target.output) {
        (LayerKind::Dense { bias, .. }, Ty::Tensor(i), Ty::Tensor(o)) if i.len() == 1 => (
            LayerKind::Dense { units: i[0], bias: *bias, tied_to: None },
            vec![
                (vec![i[0], o[0]], ParamRole::Weight, o[0], i[0]),
                (vec![i[0]], ParamRole::Bias, o[0], i[0]),
            ],
        ),
        (LayerKind::Conv(c), Ty::Tensor(i), Ty::Tensor(o)) if i.len() == 3 => {
            let k2 = c.kernel[0] * c.kernel[1];
            (
                LayerKind::Deconv(c.mirror(i)),
                vec![
                    (vec![o[0], i[0], c.kernel[0], c.kernel[1]], ParamRole::Weight, i[0] * k2, o[0] * k2),
                    (vec![i[0]], ParamRole::Bias, i[0] * k2, o[0] * k2),
                ],
            )
        }
        _ => return Err(format!("stage {k}: only dense and conv layers are pretrained")),
    };
    let bias = match &kind {
        LayerKind::Dense { bias, .. } => *bias,
        LayerKind::Deconv(c) => c.bias,
        _ => false,
    };
    let mut own = Vec::new();
    for (suffix, (shape, role, fan_in, fan_out)) in ["weight", "bias"].iter().zip(shapes) {
        if *suffix == "bias" && !bias {
            continue;
        }
        params.push(ParamInfo { name: format!("{prefix}.{suffix}"), shape, role, fan_in, fan_out });
        own.push(params.len() - 1);
    }
    let flops = target.flops;
    out_layers.push(LayerInfo {
        part: Part::Decoder,
        index: 0,
        layer: ast::Layer::new(kind, activations, span),
        input: target.output.clone(),
        output: target.input.clone(),
        params: own,
        tied_weight: None,
        flops,
    });
    let loss = ast::Loss {
        main: ast::LossTerm {
            weight: 1.0,
            kind: LossKind::Mse,
            arg: ast::Ident { name: String::new(), span },
            reduction: None,
            schedule: None,
            rho: None,
            beta: None,
            span,
        },
        extra: Vec::new(),
        span,
    };
    let model = Model {
        name: format!("{}.stage{k}", m.name),
        inputs: m.inputs.clone(),
        targets: Vec::new(),
        conditions: Vec::new(),
        layers: out_layers,
        params,
        loss,
        code: target.output.clone(),
        output: target.input.clone(),
    };
    Ok((model, pos))
}
