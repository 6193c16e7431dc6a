//! Names, `decoder mirror`, shapes and parameters: the checks between the AST and the IR.
//!
//! The encoder is checked layer by layer from the input type; each layer's output type comes
//! from the fixed formulas (PyTorch's, as the README's language section gives them). A shape error stops its block (later layers have no
//! input type) but not the other checks, so all independent errors come out in one run. Every
//! size is computed with checked arithmetic against [`MAX_ACTIVATION`] and [`MAX_PARAMS`]:
//! a huge layer is an error, never an overflow.

use super::{LayerInfo, MAX_ACTIVATION, MAX_PARAMS, Model, ParamInfo, Part, Ty, Var};
use crate::diag::{Diagnostic, Span};
use crate::ir::ParamRole;
use crate::syntax::ast::{self, ActKind, Cell, LayerKind, Score, ShowHw};

/// Checks the model, writes out a mirrored decoder into `file`, and returns the model if its
/// shapes could be resolved (diagnostics may still hold errors).
pub(super) fn check(file: &mut ast::File, diags: &mut Vec<Diagnostic>) -> Option<Model> {
    let m = &file.model;
    let mut c = Checker {
        diags,
        layers: Vec::new(),
        params: Vec::new(),
        pools: Vec::new(),
        trace: Vec::new(),
        declared_pools: declared_pools(m),
        named: Vec::new(),
        conditions: m.conditions.iter().map(|d| d.name.name.clone()).collect(),
        declared_names: declared_names(m),
    };
    let vars = c.declarations(m);
    c.conditions_used(m);
    let input = vars.0.first().cloned();
    let Some(input) = input else {
        c.diags.push(
            Diagnostic::error(format!("model `{}` has no input", m.name.name))
                .label(m.name.span, "declared here")
                .help("declare one, e.g. `input x: [8]`"),
        );
        return None;
    };
    if vars.0.len() > 1 {
        c.diags.push(
            Diagnostic::error("a model reads one input")
                .label(vars.0[1].span, "second input")
                .help("declare further data as `target NAME: …`"),
        );
    }
    let Some(encoder) = &m.encoder else {
        c.diags.push(
            Diagnostic::error("the model has no encoder")
                .label(m.name.span, "in this model")
                .help("add `encoder { dense 32 -> relu }` or similar"),
        );
        return None;
    };
    if encoder.incomplete || m.inputs.iter().chain(&m.targets).chain(&m.conditions).any(|d| d.broken) {
        // The builder reported why; a shape check now would only report consequences.
        c.loss_names(m, &vars);
        return None;
    }
    if encoder.layers.is_empty() {
        c.diags.push(
            Diagnostic::error("the encoder is empty")
                .label(encoder.span, "no layers")
                .help("an encoder needs at least one layer, e.g. `dense 32 -> relu`"),
        );
    }
    let loss_ok = c.loss_names(m, &vars);
    c.trace.push(format!("{} {}", input.name, input.ty));
    let code = c.block(Part::Encoder, &encoder.layers, input.ty.clone(), None);

    // The decoder: written, or mirrored from the encoder's layers and their input types.
    let mut skip_names = Vec::new();
    let decoder_layers = match &m.decoder {
        None => {
            c.diags.push(
                Diagnostic::error("the model has no decoder")
                    .label(m.name.span, "in this model")
                    .help("add `decoder { … }` or `decoder mirror`"),
            );
            return None;
        }
        Some(ast::Decoder::Layers(b)) if b.incomplete => return None,
        Some(ast::Decoder::Layers(b)) => b.layers.clone(),
        Some(ast::Decoder::Mirror { tied, skip, output, span }) => {
            code.as_ref()?;
            let (layers, names) = c.mirror(*tied, *skip, output.clone(), *span)?;
            skip_names = names;
            layers
        }
    };
    let target = c.loss_target_ty(m, &vars);
    let code = code?;
    let output = c.block(Part::Decoder, &decoder_layers, code.clone(), target.as_ref());
    if let Some(ast::Decoder::Mirror { .. }) = &m.decoder {
        let span = m.decoder.as_ref().map_or(Span::default(), decoder_span);
        let block = ast::Block { layers: decoder_layers, span, incomplete: false };
        file.model.decoder = Some(ast::Decoder::Layers(block));
        // Name the encoder layers the skip links read (shown by `--emit ast`).
        if let Some(e) = file.model.encoder.as_mut() {
            for (index, name) in skip_names {
                if let Some(l) = e.layers.get_mut(index) {
                    l.name = Some(name);
                }
            }
        }
    }
    let output = output?;
    let m = &file.model;
    let loss = m.loss.clone()?;
    if loss_ok {
        let padded = m.inputs.iter().chain(&m.targets).any(|d| {
            d.name.name == loss.main.arg.name && matches!(d.ty, ast::TypeExpr::SeqTokens { padded: true, .. })
        });
        c.check_loss(&loss, &output, (target.as_ref(), padded));
    }
    let total: u64 = c.params.iter().map(ParamInfo::numel).sum();
    if total > MAX_PARAMS {
        c.diags.push(
            Diagnostic::error(format!(
                "the model has {total} parameters, over aec's budget of {MAX_PARAMS} (1 GiB as f32)"
            ))
            .label(m.name.span, "in this model")
            .help("make the layers smaller"),
        );
        return None;
    }
    Some(Model {
        name: m.name.name.clone(),
        inputs: vars.0,
        targets: vars.1,
        conditions: vars.2,
        layers: c.layers,
        params: c.params,
        loss,
        code,
        output,
    })
}

fn decoder_span(d: &ast::Decoder) -> Span {
    match d {
        ast::Decoder::Layers(b) => b.span,
        ast::Decoder::Mirror { span, .. } => *span,
    }
}

struct Checker<'d> {
    diags: &'d mut Vec<Diagnostic>,
    layers: Vec<LayerInfo>,
    params: Vec<ParamInfo>,
    pools: Vec<Pool>,
    /// The shape trace so far: "x [1, 28, 28]", "conv 16 k3 (line 5) → [16, 28, 28]", ….
    trace: Vec<String>,
    /// Every pool name written anywhere in the model, to tell "unknown" from "too early".
    declared_pools: Vec<ast::Ident>,
    /// Named layer outputs so far (`as NAME`, and named pools), for `concat`/`add` links.
    named: Vec<Named>,
    /// The conditions' names (`condition y: …`), which `concat` joins to vectors.
    conditions: Vec<String>,
    /// Every layer name written anywhere in the model, to tell "unknown" from "too early".
    declared_names: Vec<ast::Ident>,
}

/// Names `decoder mirror skip` gives encoder layers, by index in the encoder.
type SkipNames = Vec<(usize, ast::Ident)>;

/// A named layer output: its type (`None` after a shape error before it).
#[derive(Clone, Debug)]
struct Named {
    name: String,
    span: Span,
    ty: Option<Ty>,
}

fn declared_names(m: &ast::Model) -> Vec<ast::Ident> {
    let encoder = m.encoder.iter().flat_map(|b| &b.layers);
    let decoder = match &m.decoder {
        Some(ast::Decoder::Layers(b)) => b.layers.as_slice(),
        _ => &[],
    };
    encoder.chain(decoder).filter_map(|l| l.output_name().cloned()).collect()
}

fn declared_pools(m: &ast::Model) -> Vec<ast::Ident> {
    let encoder = m.encoder.iter().flat_map(|b| &b.layers);
    let decoder = match &m.decoder {
        Some(ast::Decoder::Layers(b)) => b.layers.as_slice(),
        _ => &[],
    };
    encoder
        .chain(decoder)
        .filter_map(|l| match &l.kind {
            LayerKind::MaxPool(ast::PoolSpec { name: Some(n), .. }) => Some(n.clone()),
            _ => None,
        })
        .collect()
}

/// A named max pool: what unpool needs to restore its input.
#[derive(Clone, Debug)]
struct Pool {
    name: String,
    span: Span,
    input: Ty,
    output: Ty,
}

/// What a block's layer needs to know about its surroundings.
struct Ctx<'a> {
    part: Part,
    /// The loss target's type, for decoder recurrent layers (sequence length, vocabulary).
    target: Option<&'a Ty>,
}

impl Checker<'_> {
    fn declarations(&mut self, m: &ast::Model) -> (Vec<Var>, Vec<Var>, Vec<Var>) {
        let mut seen: Vec<(String, Span)> = Vec::new();
        let mut var = |c: &mut Self, d: &ast::Decl| {
            if let Some((_, first)) = seen.iter().find(|(n, _)| *n == d.name.name) {
                c.diags.push(
                    Diagnostic::error(format!("`{}` is declared twice", d.name.name))
                        .label(d.name.span, "second declaration")
                        .label(*first, "first declaration")
                        .help("give each input, target and condition its own name"),
                );
            }
            seen.push((d.name.name.clone(), d.name.span));
            let ty = Ty::from_ast(&d.ty);
            if let ast::TypeExpr::SeqTensor { dims, .. } = &d.ty
                && dims.len() != 1
            {
                c.diags.push(
                    Diagnostic::error("the steps of a sequence are vectors")
                        .label(d.span, "write `seq[N] of [F]`"),
                );
            }
            c.budget(&ty, d.span);
            let padded = matches!(d.ty, ast::TypeExpr::SeqTokens { padded: true, .. });
            Var { name: d.name.name.clone(), ty, span: d.name.span, padded }
        };
        let inputs = m.inputs.iter().map(|d| var(self, d)).collect();
        let targets = m.targets.iter().map(|d| var(self, d)).collect();
        let conditions: Vec<Var> = m.conditions.iter().map(|d| var(self, d)).collect();
        // A condition is joined to vectors: a class as its one-hot vector, or a vector itself.
        for (v, d) in conditions.iter().zip(&m.conditions) {
            let joined = match &v.ty {
                Ty::Token { vocab } => Some(Ty::Tensor(vec![*vocab])),
                Ty::Tensor(dims) if dims.len() == 1 => Some(v.ty.clone()),
                _ => None,
            };
            match joined {
                Some(ty) => self.named.push(Named { name: v.name.clone(), span: v.span, ty: Some(ty) }),
                None => self.diags.push(
                    Diagnostic::error(format!("a condition is a class or a vector, and `{}` is {}", v.name, v.ty))
                        .label(d.span, "not `token[N]` or `[F]`")
                        .help("declare a class as `condition y: token[10]` (joined one-hot) or a vector as `condition c: [4]`"),
                ),
            }
        }
        (inputs, targets, conditions)
    }

    /// Every condition must be joined somewhere (`concat NAME`), or it would change nothing.
    fn conditions_used(&mut self, m: &ast::Model) {
        let encoder = m.encoder.iter().flat_map(|b| &b.layers);
        let decoder: &[ast::Layer] = match &m.decoder {
            Some(ast::Decoder::Layers(b)) => &b.layers,
            _ => &[],
        };
        let layers: Vec<&ast::Layer> = encoder.chain(decoder).collect();
        // (A condition of another type has its error already.)
        let joinable = |d: &&ast::Decl| match &d.ty {
            ast::TypeExpr::Token { .. } => true,
            ast::TypeExpr::Tensor(dims) => dims.len() == 1,
            _ => false,
        };
        for d in m.conditions.iter().filter(joinable) {
            let used = layers
                .iter()
                .any(|l| matches!(&l.kind, LayerKind::Link { from, .. } if from.name == d.name.name));
            if !used {
                self.diags.push(
                    Diagnostic::error(format!("the condition `{}` is never joined to the network", d.name.name))
                        .label(d.name.span, "declared here")
                        .help(format!(
                            "add `concat {}` where it joins: for a conditional VAE, before the encoder's first dense layer and at the start of the decoder",
                            d.name.name
                        )),
                );
            }
        }
    }

    /// Checks that a per-sample size fits the activation budget (with checked arithmetic).
    fn budget(&mut self, ty: &Ty, span: Span) -> bool {
        let n = match ty {
            Ty::Tensor(d) => d.iter().try_fold(1u64, |a, &b| a.checked_mul(b)),
            Ty::Seq { len, dim } => len.checked_mul(*dim),
            Ty::Tokens { len, .. } => Some(*len),
            Ty::Token { .. } => Some(1),
        };
        match n {
            Some(n) if n <= MAX_ACTIVATION => true,
            _ => {
                self.diags.push(
                    Diagnostic::error(format!(
                        "{ty} is too large: over aec's budget of {MAX_ACTIVATION} values per sample (1 GiB)"
                    ))
                    .label(span, "this size")
                    .help("make it smaller"),
                );
                false
            }
        }
    }

    /// Checks the names the loss uses; true when they resolve.
    fn loss_names(&mut self, m: &ast::Model, vars: &(Vec<Var>, Vec<Var>, Vec<Var>)) -> bool {
        let Some(loss) = &m.loss else {
            self.diags.push(
                Diagnostic::error(format!("model `{}` has no loss", m.name.name))
                    .label(m.name.span, "in this model")
                    .help(format!(
                        "add e.g. `loss mse({})`",
                        vars.0.first().map_or("x", |v| v.name.as_str())
                    )),
            );
            return false;
        };
        let mut ok = true;
        let known: Vec<&str> = vars.0.iter().chain(&vars.1).map(|v| v.name.as_str()).collect();
        let main = &loss.main;
        if matches!(
            main.kind,
            ast::LossKind::L2
                | ast::LossKind::Kl
                | ast::LossKind::Sparsity
                | ast::LossKind::Contractive
                | ast::LossKind::Vq
        ) || main.arg.name == "weights"
            || main.arg.name == "code"
        {
            self.diags.push(
                Diagnostic::error("the first loss term compares the output with an input or target")
                    .label(main.span, "not a reconstruction loss")
                    .help("write e.g. `loss mse(x) + 1e-4 * l2(weights)`"),
            );
            ok = false;
        } else if !known.contains(&main.arg.name.as_str()) {
            let mut d = Diagnostic::error(format!("unknown name `{}` in the loss", main.arg.name))
                .label(main.arg.span, "not an input or target");
            d = match crate::syntax::closest(&main.arg.name, known.iter()) {
                Some(s) => d.help(format!("did you mean `{s}`?")),
                None => d.help(format!("the model declares {}", known.join(", "))),
            };
            self.diags.push(d);
            ok = false;
        }
        let encoder_has =
            |f: fn(&LayerKind) -> bool| m.encoder.as_ref().and_then(|b| b.layers.iter().find(|l| f(&l.kind)));
        let gaussian = encoder_has(|k| matches!(k, LayerKind::Gaussian { .. })).is_some();
        let quantizer = encoder_has(|k| matches!(k, LayerKind::Quantize { .. }));
        if let Some(q) = quantizer
            && !loss.extra.iter().any(|t| t.kind == ast::LossKind::Vq)
        {
            let why = match q.kind {
                LayerKind::Quantize { ema: Some(_), .. } => {
                    "nothing would keep the encoder near its codebook"
                }
                _ => "its codebook would never move",
            };
            self.diags.push(
                Diagnostic::error("a quantized code needs `vq(code)` in the loss").label(q.span, why).help(
                    "add `+ vq(code)` (the codebook and commitment losses, β = 0.25 unless `beta:` says)",
                ),
            );
            ok = false;
        }
        for t in &loss.extra {
            let penalty = matches!(t.kind, ast::LossKind::L1 | ast::LossKind::L2);
            let target = t.arg.name == "weights" || t.arg.name == "code";
            if t.kind == ast::LossKind::Kl {
                if t.arg.name != "code" {
                    self.diags.push(
                        Diagnostic::error(format!("`kl` is taken of the code, not of `{}`", t.arg.name))
                            .label(t.arg.span, "not `code`")
                            .help("write `kl(code)`"),
                    );
                    ok = false;
                } else if !gaussian {
                    self.diags.push(
                        Diagnostic::error("`kl(code)` needs a Gaussian code, and this encoder has none")
                            .label(t.span, "KL divergence of what?")
                            .help("end the encoder with `gaussian N` (N the code size), as a VAE does"),
                    );
                    ok = false;
                }
            } else if t.kind == ast::LossKind::Vq {
                if t.arg.name != "code" {
                    self.diags.push(
                        Diagnostic::error(format!("`vq` is taken of the code, not of `{}`", t.arg.name))
                            .label(t.arg.span, "not `code`")
                            .help("write `vq(code)`"),
                    );
                    ok = false;
                } else if quantizer.is_none() {
                    self.diags.push(
                        Diagnostic::error("`vq(code)` needs a quantized code, and this encoder has none")
                            .label(t.span, "quantized by what?")
                            .help(
                                "end the encoder with `quantize K` (K the codebook's size), as a VQ-VAE does",
                            ),
                    );
                    ok = false;
                } else if let Some((_, at)) = t.reduction {
                    self.diags.push(
                        Diagnostic::error("`vq(code)` takes no reduction")
                            .label(at, "its two losses are means over the code, as van den Oord et al.'s")
                            .help("remove it; scale the term with its weight instead (`0.5 * vq(code)`)"),
                    );
                    ok = false;
                }
            } else if matches!(t.kind, ast::LossKind::Sparsity | ast::LossKind::Contractive) {
                ok &= self.check_code_penalty(m, t);
            } else if !(penalty && target) {
                self.diags.push(
                    Diagnostic::error(
                        "an extra loss term is a penalty (`l1` or `l2` of `weights` or `code`, `sparsity(code)`, \
                         `contractive(code)`) or `kl(code)`",
                    )
                    .label(t.span, "not a penalty")
                    .help("write e.g. `+ 1e-4 * l2(weights)`, `+ 1e-3 * l1(code)` or `+ kl(code)`"),
                );
                ok = false;
            } else if let (Some((_, at)), "weights") = (t.reduction, t.arg.name.as_str()) {
                self.diags.push(
                    Diagnostic::error(format!("`{}(weights)` takes no reduction", t.kind.keyword()))
                        .label(at, "a penalty on the weights is a sum over them")
                        .help("remove it; scale the term with its weight instead (`1e-4 * l2(weights)`)"),
                );
                ok = false;
            }
        }
        ok
    }

    /// `sparsity(code)` needs a code in (0, 1) (a sigmoid ends the encoder); `contractive(code)`
    /// an encoder of one dense sigmoid or tanh layer, whose Jacobian has a closed form.
    fn check_code_penalty(&mut self, m: &ast::Model, t: &ast::LossTerm) -> bool {
        let name = t.kind.keyword();
        if t.arg.name != "code" {
            self.diags.push(
                Diagnostic::error(format!("`{name}` is taken of the code, not of `{}`", t.arg.name))
                    .label(t.arg.span, "not `code`")
                    .help(format!("write `{name}(code)`")),
            );
            return false;
        }
        let layers = m.encoder.as_ref().map(|b| b.layers.as_slice()).unwrap_or(&[]);
        let last_act = |l: &ast::Layer| l.activations.last().map(|a| a.kind);
        if t.kind == ast::LossKind::Sparsity {
            if let Some((_, at)) = t.reduction {
                self.diags.push(
                    Diagnostic::error("`sparsity(code)` takes no reduction")
                        .label(at, "it is a sum over the code's units of each one's divergence")
                        .help("remove it; scale the term with its weight instead (`0.1 * sparsity(code)`)"),
                );
                return false;
            }
            let Some(last) = layers.last() else { return true };
            if last_act(last) != Some(ActKind::Sigmoid) {
                self.diags.push(
                    Diagnostic::error("`sparsity(code)` compares mean activations with a rate in (0, 1), and this code is not a sigmoid's")
                        .label(last.span, "the code comes from here")
                        .label(t.span, "needs activations in (0, 1)")
                        .help("end the encoder with `-> sigmoid`, as Ng's sparse autoencoder does"),
                );
                return false;
            }
            return true;
        }
        // Contractive: one dense layer (a flatten or reshape before it changes nothing).
        let shaping = |l: &&ast::Layer| matches!(l.kind, LayerKind::Flatten | LayerKind::Reshape { .. });
        let real: Vec<&ast::Layer> = layers.iter().filter(|l| !shaping(l)).collect();
        let fits = match real.as_slice() {
            [l] => {
                matches!(l.kind, LayerKind::Dense { .. })
                    && matches!(last_act(l), Some(ActKind::Sigmoid | ActKind::Tanh))
                    && l.activations.len() == 1
            }
            _ => false,
        };
        if !fits {
            let at = real.last().map_or(t.span, |l| l.span);
            self.diags.push(
                Diagnostic::error(
                    "`contractive(code)` is the encoder's Jacobian in closed form, which aec knows for an \
                     encoder of one dense layer with a sigmoid or tanh",
                )
                .label(at, "this encoder is not one")
                .label(t.span, "the penalty")
                .help("write the encoder as `dense N -> sigmoid` (Rifai et al. 2011), or use `l1(code)` or `sparsity(code)`"),
            );
            return false;
        }
        true
    }

    fn loss_target_ty(&self, m: &ast::Model, vars: &(Vec<Var>, Vec<Var>, Vec<Var>)) -> Option<Ty> {
        let name = &m.loss.as_ref()?.main.arg.name;
        vars.0.iter().chain(&vars.1).find(|v| &v.name == name).map(|v| v.ty.clone())
    }

    fn check_loss(&mut self, loss: &ast::Loss, output: &Ty, (target, padded): (Option<&Ty>, bool)) {
        let Some(target) = target else { return };
        let main = &loss.main;
        let name = &main.arg.name;
        // A padded target's cross-entropy is a mean over its real tokens, which vary per batch.
        if let (true, Some((r, at))) = (padded, main.reduction)
            && r != ast::Reduction::Mean
        {
            self.diags.push(
                Diagnostic::error(format!(
                    "`{name}` is padded (`seq[<= N]`): its cross-entropy is the mean over its real tokens"
                ))
                .label(at, "not `mean`")
                .help("drop the reduction (PyTorch's CrossEntropyLoss(ignore_index=0) is a mean too)"),
            );
        }
        let expected = match (main.kind, target) {
            (ast::LossKind::CrossEntropy, Ty::Tokens { len, vocab }) => Ty::Seq { len: *len, dim: *vocab },
            (ast::LossKind::CrossEntropy, Ty::Token { vocab }) => Ty::Tensor(vec![*vocab]),
            (ast::LossKind::CrossEntropy, _) => {
                self.diags.push(
                    Diagnostic::error(format!("`cross_entropy` needs token ids, but `{name}` is {target}"))
                        .label(main.span, "cross-entropy of non-tokens")
                        .help("use `mse` or `bce` for real-valued targets"),
                );
                return;
            }
            (_, Ty::Tokens { .. } | Ty::Token { .. }) => {
                self.diags.push(
                    Diagnostic::error(format!("`{name}` holds token ids; compare them with `cross_entropy`"))
                        .label(main.span, "not a loss for tokens")
                        .help(format!("write `loss cross_entropy({name})`")),
                );
                return;
            }
            (_, t) => t.clone(),
        };
        if *output != expected {
            let last = self.layers.last().map(|l| (l.layer.span, l.input.clone()));
            let mut d = Diagnostic::error(format!(
                "decoder output {output} does not match {} {name} {target}",
                "loss target"
            ));
            if let Some((span, input)) = &last {
                d = d.label(*span, format!("gives {output} from {input}"));
            }
            d = d.label(main.arg.span, format!("compared with {expected} here"));
            if let Some(help) = self.output_fix(output, &expected) {
                d = d.help(help);
            }
            d = d.note(format!("shape trace: {}", self.trace.join(" → ")));
            self.diags.push(d);
        }
        // The activations in the order they apply, and the layers that change values (`None`
        // between them); layers that only move values (reshape, flatten, pools, unpool) are
        // looked through.
        let mut applied: Vec<Option<(ActKind, Span)>> = Vec::new();
        for l in &self.layers {
            match &l.layer.kind {
                LayerKind::Flatten
                | LayerKind::Reshape { .. }
                | LayerKind::MaxPool(_)
                | LayerKind::AvgPool(_)
                | LayerKind::Unpool { .. } => {}
                LayerKind::Activation(a) => applied.push(Some((a.kind, a.span))),
                _ => applied.push(None),
            }
            applied.extend(l.layer.activations.iter().map(|a| Some((a.kind, a.span))));
        }
        for pair in applied.windows(2) {
            if let [Some((ActKind::Sigmoid, first)), Some((ActKind::Sigmoid, second))] = pair {
                self.diags.push(
                    Diagnostic::warning("sigmoid is applied to a sigmoid's output")
                        .label(*second, "the second sigmoid: its values stay within [0.5, 0.73]")
                        .label(*first, "the first")
                        .help("remove one of them"),
                );
            }
        }
        let last = applied.last().copied().flatten();
        if main.kind == ast::LossKind::Bce && !matches!(last, Some((ActKind::Sigmoid, _))) {
            // The last layer that changes values, where `-> sigmoid` belongs.
            let owner = self.layers.iter().rev().find(|l| {
                !matches!(
                    l.layer.kind,
                    LayerKind::Flatten
                        | LayerKind::Reshape { .. }
                        | LayerKind::MaxPool(_)
                        | LayerKind::AvgPool(_)
                        | LayerKind::Unpool { .. }
                )
            });
            let span = owner.or(self.layers.last()).map_or(main.span, |l| l.layer.span);
            self.diags.push(
                Diagnostic::warning("`bce` expects probabilities, but the decoder does not end in sigmoid")
                    .label(span, "the last layer that computes values")
                    .help("add `-> sigmoid` to this layer"),
            );
        }
    }

    /// A fix for a decoder output off by a little: the output padding a last deconv needs.
    fn output_fix(&self, output: &Ty, expected: &Ty) -> Option<String> {
        let (Ty::Tensor(o), Ty::Tensor(e)) = (output, expected) else {
            return None;
        };
        let last = self.layers.last()?;
        if let (LayerKind::Deconv(c), [oc, oh, ow], [ec, eh, ew]) =
            (&last.layer.kind, o.as_slice(), e.as_slice())
            && oc == ec
            && eh >= oh
            && ew >= ow
        {
            let need = [c.out_pad[0] + (eh - oh), c.out_pad[1] + (ew - ow)];
            if need[0] < c.stride[0] && need[1] < c.stride[1] {
                let op = ShowHw(need);
                return Some(format!("add `op{op}` (output padding {op}) to get {eh}×{ew}"));
            }
        }
        if o.iter().product::<u64>() == e.iter().product::<u64>() {
            return Some(format!("add `reshape {}` at the end of the decoder", crate::syntax::ast_dims(e)));
        }
        None
    }

    // ---- blocks and layers ---------------------------------------------------------------------

    /// Checks a block's layers from `input`; the output type, or `None` after a shape error.
    fn block(&mut self, part: Part, layers: &[ast::Layer], input: Ty, target: Option<&Ty>) -> Option<Ty> {
        let ctx = Ctx { part, target };
        let mut ty = input;
        for (index, layer) in layers.iter().enumerate() {
            if matches!(layer.kind, LayerKind::Gaussian { .. } | LayerKind::Quantize { .. })
                && part == Part::Encoder
                && index + 1 < layers.len()
            {
                self.diags.push(
                    Diagnostic::error(format!("a `{}` code ends the encoder", layer.layer_keyword()))
                        .label(layer.span, "more encoder layers follow it")
                        .help(format!(
                            "move `{}` to the end of the encoder: the decoder starts from the code",
                            layer.kind
                        )),
                );
            }
            if let Some(n) = layer.output_name()
                && !matches!(layer.kind, LayerKind::MaxPool(_))
                && let Some(first) = self.named.iter().find(|x| x.name == n.name)
            {
                self.diags.push(
                    Diagnostic::error(format!("the name `{}` is used twice", n.name))
                        .label(n.span, "second layer with this name")
                        .label(first.span, "first use")
                        .help("give each named layer its own name"),
                );
            }
            if let (LayerKind::BatchNorm { .. }, Some(prev)) =
                (&layer.kind, index.checked_sub(1).map(|i| &layers[i]))
                && prev.activations.is_empty()
                && matches!(
                    prev.kind,
                    LayerKind::Conv(ast::ConvSpec { bias: true, .. })
                        | LayerKind::Deconv(ast::ConvSpec { bias: true, .. })
                        | LayerKind::Dense { bias: true, .. }
                )
            {
                self.diags.push(
                    Diagnostic::warning(
                        "the bias of the layer before `batchnorm` is removed by the normalization",
                    )
                    .label(prev.span, "its bias only shifts the batch mean")
                    .label(layer.span, "which this subtracts")
                    .help(format!(
                        "add `nobias` to `{}`: the bias learns nothing and Adam moves it by noise",
                        prev.kind
                    )),
                );
            }
            let first_param = self.params.len();
            let (out, flops) = match self.layer(&ctx, index, layer, &ty) {
                Ok(r) => r,
                Err(d) => {
                    let d = d.note(format!("shape trace: {}", self.trace.join(" → ")));
                    self.diags.push(d);
                    self.check_names_only(&layers[index + 1..]);
                    return None;
                }
            };
            let mut out = out;
            for a in &layer.activations {
                if let Err(d) = activation_fits(a, &out) {
                    self.diags.push(d);
                }
            }
            if !self.budget(&out, layer.span) {
                return None;
            }
            if let LayerKind::Activation(_) = layer.kind {
                out = ty.clone();
            }
            self.trace.push(format!("{} → {out}", layer));
            if let Some(n) = layer.output_name()
                && !self.named.iter().any(|x| x.name == n.name)
            {
                self.named.push(Named { name: n.name.clone(), span: n.span, ty: Some(out.clone()) });
            }
            let tied_weight = match &layer.kind {
                LayerKind::Deconv(ast::ConvSpec { tied_to: Some(i), .. })
                | LayerKind::Dense { tied_to: Some(i), .. } => self.encoder_weight(*i),
                _ => None,
            };
            self.layers.push(LayerInfo {
                part,
                index,
                layer: layer.clone(),
                input: ty,
                output: out.clone(),
                params: (first_param..self.params.len()).collect(),
                tied_weight,
                flops,
            });
            ty = out;
        }
        Some(ty)
    }

    /// After a shape error: the rest of the block still gets its name checks.
    fn check_names_only(&mut self, layers: &[ast::Layer]) {
        for l in layers {
            if let LayerKind::Link { from, .. } = &l.kind
                && let Err(d) = self.find_named(from, l)
            {
                self.diags.push(d);
            }
            if let Some(n) = l.output_name()
                && !self.named.iter().any(|x| x.name == n.name)
            {
                self.named.push(Named { name: n.name.clone(), span: n.span, ty: None });
            }
            match &l.kind {
                // Record with unknown shapes so later `unpool` lines resolve.
                LayerKind::MaxPool(ast::PoolSpec { name: Some(n), .. }) if self.pool_named(n).is_none() => {
                    self.pools.push(Pool {
                        name: n.name.clone(),
                        span: n.span,
                        input: Ty::Tensor(vec![]),
                        output: Ty::Tensor(vec![]),
                    });
                }
                LayerKind::Unpool { pool } => {
                    if let Err(d) = self.find_pool(pool) {
                        self.diags.push(d);
                    }
                }
                _ => {}
            }
        }
    }

    /// The named output `from` that layer `l` links to, or why there is none.
    fn find_named(&self, from: &ast::Ident, l: &ast::Layer) -> Result<Named, Diagnostic> {
        let what = match &l.kind {
            LayerKind::Link { link, .. } => format!("{} {}", link.keyword(), from.name),
            _ => from.name.clone(),
        };
        if l.output_name().is_some_and(|n| n.name == from.name) {
            return Err(Diagnostic::error(format!("`{what}` links the layer to itself"))
                .label(from.span, "this layer's own name")
                .help("link to an earlier layer's output, e.g. an encoder stage's `as e1`"));
        }
        if let Some(n) = self.named.iter().find(|n| n.name == from.name) {
            return Ok(n.clone());
        }
        if let Some(later) = self.declared_names.iter().find(|p| p.name == from.name) {
            return Err(Diagnostic::error(format!("`{what}` comes before the layer it names"))
                .label(from.span, "used here")
                .label(later.span, "named only here, later")
                .help("a link reads a layer that has already run: name an earlier layer"));
        }
        let names: Vec<&str> = self.named.iter().map(|p| p.name.as_str()).collect();
        let mut d =
            Diagnostic::error(format!("`{what}` names no earlier layer")).label(from.span, "unknown name");
        d = match crate::syntax::closest(&from.name, names.iter()) {
            Some(s) => d.help(format!("did you mean `{s}`?")),
            None if names.is_empty() => {
                d.help("name a layer's output with `as NAME` at the end of its line, e.g. `conv 16 k3 p1 -> relu as e1`")
            }
            None => d.help(format!("the named layers so far are {}", names.join(", "))),
        };
        Err(d)
    }

    /// `concat NAME` / `add NAME`: the joined type, or a located error naming both shapes.
    fn link(&self, l: &ast::Layer, link: ast::Link, from: &ast::Ident, input: &Ty) -> Result<Ty, Diagnostic> {
        let named = self.find_named(from, l)?;
        let Some(other) = named.ty.clone() else {
            return Err(shape_err(
                l,
                format!("the shape of `{}` is unknown after an earlier error", from.name),
            ));
        };
        let kw = link.keyword();
        let condition = self.conditions.contains(&from.name);
        if let (true, Ty::Tensor(a)) = (condition, input)
            && a.len() != 1
        {
            return Err(shape_err(
                l,
                format!(
                    "`{kw} {}` joins a condition to a vector, and the current tensor is {input}",
                    from.name
                ),
            )
            .label(named.span, format!("`{}` is {other}", from.name))
            .help(format!(
                "join it after `flatten` (or a dense layer): `flatten` then `{kw} {}`",
                from.name
            )));
        }
        let (Ty::Tensor(a), Ty::Tensor(b)) = (input, &other) else {
            return Err(shape_err(l, format!("`{kw}` joins tensors, got {input} and {other}"))
                .label(named.span, format!("`{}` is {other}", from.name)));
        };
        let joined = match link {
            ast::Link::Concat if !a.is_empty() && a.len() == b.len() && a[1..] == b[1..] => {
                let mut d = a.clone();
                d[0] += b[0];
                return Ok(Ty::Tensor(d));
            }
            ast::Link::Add if a == b => return Ok(input.clone()),
            ast::Link::Concat => "its sizes after the channels must equal the current tensor's",
            ast::Link::Add => "an `add` needs equal shapes",
        };
        let mut d = Diagnostic::error(format!(
            "`{kw} {}` cannot join {other} to the current {input}: {joined}",
            from.name
        ))
        .label(l.span, format!("the current tensor is {input}"))
        .label(named.span, format!("`{}` is {other}", from.name));
        if let Some(fix) = self.link_fix(a, b, link) {
            d = d.help(fix);
        }
        Err(d)
    }

    /// A fix for a link whose sizes differ: an output padding on the deconv before it, or the
    /// channels a residual `add` needs.
    fn link_fix(&self, cur: &[u64], named: &[u64], link: ast::Link) -> Option<String> {
        if cur.len() != named.len() || cur.is_empty() {
            return None;
        }
        if link == ast::Link::Add && cur[1..] == named[1..] {
            return Some(format!(
                "make the layer before it give {} channels, or use `concat` to stack them",
                named[0]
            ));
        }
        let last = self.layers.last()?;
        let (Some([oh, ow]), Some([nh, nw])) = (cur.get(1..3), named.get(1..3)) else { return None };
        match &last.layer.kind {
            LayerKind::Deconv(c) if nh >= oh && nw >= ow => {
                let need = [c.out_pad[0] + (nh - oh), c.out_pad[1] + (nw - ow)];
                (need[0] < c.stride[0] && need[1] < c.stride[1]).then(|| {
                    format!(
                        "add `op{}` (output padding) to the deconv before it to get {nh}×{nw}",
                        ShowHw(need)
                    )
                })
            }
            LayerKind::Upsample { .. } => Some(format!(
                "upsampling gives {oh}×{ow}, not {nh}×{nw}: unpool through the pool's switches \
                 (`maxpool 2 as p1` … `unpool p1`) to restore odd sizes exactly, or use an input \
                 whose sizes the pools divide"
            )),
            _ => None,
        }
    }

    fn pool_named(&self, n: &ast::Ident) -> Option<&Pool> {
        self.pools.iter().find(|p| p.name == n.name)
    }

    fn find_pool(&self, name: &ast::Ident) -> Result<Pool, Diagnostic> {
        if let Some(p) = self.pool_named(name) {
            return Ok(p.clone());
        }
        if let Some(later) = self.declared_pools.iter().find(|p| p.name == name.name) {
            return Err(Diagnostic::error(format!("`unpool {}` comes before its maxpool", name.name))
                .label(name.span, "used here")
                .label(later.span, "the pool is only defined here, later")
                .help("unpool through a pool's switches after the pool has run"));
        }
        let names: Vec<&str> = self.pools.iter().map(|p| p.name.as_str()).collect();
        let mut d = Diagnostic::error(format!("`unpool {}` names no earlier maxpool", name.name))
            .label(name.span, "unknown pool");
        d = match crate::syntax::closest(&name.name, names.iter()) {
            Some(s) => d.help(format!("did you mean `{s}`?")),
            None if names.is_empty() => {
                d.help("name a max pool's switches with `maxpool 2 as p1`, then `unpool p1` after it")
            }
            None => d.help(format!("the pools so far are {}", names.join(", "))),
        };
        Err(d)
    }

    /// One layer's output type and FLOPs, adding its parameters.
    fn layer(
        &mut self,
        ctx: &Ctx,
        index: usize,
        l: &ast::Layer,
        input: &Ty,
    ) -> Result<(Ty, u64), Diagnostic> {
        let pname = |suffix: &str| format!("{}.{index}.{suffix}", ctx.part.prefix());
        match &l.kind {
            LayerKind::Dense { units, bias, tied_to } => {
                let (seq_len, width) = match input {
                    Ty::Tensor(d) if d.len() == 1 => (None, d[0]),
                    Ty::Seq { len, dim } => (Some(*len), *dim),
                    Ty::Tensor(d) => {
                        return Err(shape_err(l, format!("`dense` needs a vector, got {input}")).help(
                            format!(
                                "add `flatten` before it to make {} a vector of {}",
                                crate::syntax::ast_dims(d),
                                input.numel()
                            ),
                        ));
                    }
                    Ty::Token { .. } | Ty::Tokens { .. } => {
                        return Err(shape_err(l, format!("`dense` needs vectors, got token ids {input}"))
                            .help("add `embed N` first to turn ids into vectors"));
                    }
                };
                if tied_to.is_none() {
                    self.param(l, pname("weight"), vec![*units, width], ParamRole::Weight, width, *units)?;
                }
                if *bias {
                    self.param(l, pname("bias"), vec![*units], ParamRole::Bias, width, *units)?;
                }
                let flops = mul3(2, width, *units).saturating_mul(seq_len.unwrap_or(1));
                let out = match seq_len {
                    Some(len) => Ty::Seq { len, dim: *units },
                    None => Ty::Tensor(vec![*units]),
                };
                Ok((out, flops))
            }
            LayerKind::Conv(c) | LayerKind::Deconv(c) => {
                let deconv = matches!(l.kind, LayerKind::Deconv(_));
                let [cin, h, w] = image(l, input)?;
                let (oh, ow) = if deconv {
                    if c.out_pad[0] >= c.stride[0] || c.out_pad[1] >= c.stride[1] {
                        let most = ShowHw([c.stride[0] - 1, c.stride[1] - 1]);
                        return Err(Diagnostic::error(format!(
                            "output padding {} must be smaller than the stride {} (on each axis)",
                            ShowHw(c.out_pad),
                            ShowHw(c.stride)
                        ))
                        .label(l.span, "output padding too large")
                        .help(format!("use `op{most}` at most, or a larger stride")));
                    }
                    let f = |n: u64, a: usize| -> Result<u64, Diagnostic> {
                        let full = (n - 1) * c.stride[a] + c.kernel[a] + c.out_pad[a];
                        if full <= 2 * c.pad[a] {
                            return Err(shape_err(
                                l,
                                format!(
                                    "padding {} removes the whole {n}-pixel {} of this deconv's output",
                                    c.pad[a],
                                    ["height", "width"][a]
                                ),
                            )
                            .help("use less padding"));
                        }
                        Ok(full - 2 * c.pad[a])
                    };
                    (f(h, 0)?, f(w, 1)?)
                } else {
                    let (ph, pw) = (h + 2 * c.pad[0], w + 2 * c.pad[1]);
                    if c.kernel[0] > ph || c.kernel[1] > pw {
                        let [kh, kw] = c.kernel;
                        return Err(Diagnostic::error(format!(
                            "kernel {kh}×{kw} is larger than the {h}×{w} input{}",
                            if c.pad != [0, 0] {
                                format!(" padded by {}", ShowHw(c.pad))
                            } else {
                                String::new()
                            },
                        ))
                        .label(l.span, format!("input is {input}"))
                        .help(format!("use a kernel of at most {ph}×{pw} or add padding")));
                    }
                    ((ph - c.kernel[0]) / c.stride[0] + 1, (pw - c.kernel[1]) / c.stride[1] + 1)
                };
                let k2 = c.kernel[0] * c.kernel[1];
                if deconv {
                    // PyTorch: ConvTranspose2d weight [in, out, K, K], fan_in from dim 1.
                    if c.tied_to.is_none() {
                        let shape = vec![cin, c.channels, c.kernel[0], c.kernel[1]];
                        self.param(l, pname("weight"), shape, ParamRole::Weight, c.channels * k2, cin * k2)?;
                    }
                    if c.bias {
                        self.param(
                            l,
                            pname("bias"),
                            vec![c.channels],
                            ParamRole::Bias,
                            c.channels * k2,
                            cin * k2,
                        )?;
                    }
                } else {
                    let shape = vec![c.channels, cin, c.kernel[0], c.kernel[1]];
                    self.param(l, pname("weight"), shape, ParamRole::Weight, cin * k2, c.channels * k2)?;
                    if c.bias {
                        self.param(
                            l,
                            pname("bias"),
                            vec![c.channels],
                            ParamRole::Bias,
                            cin * k2,
                            c.channels * k2,
                        )?;
                    }
                }
                let spatial = if deconv { h * w } else { oh * ow };
                let flops = mul3(2 * cin, k2, c.channels).saturating_mul(spatial);
                Ok((Ty::Tensor(vec![c.channels, oh, ow]), flops))
            }
            LayerKind::MaxPool(p) | LayerKind::AvgPool(p) => {
                let [ch, h, w] = image(l, input)?;
                let [kh, kw] = p.kernel;
                if kh > h || kw > w {
                    return Err(Diagnostic::error(format!(
                        "pool window {kh}×{kw} is larger than the {h}×{w} input"
                    ))
                    .label(l.span, format!("input is {input}"))
                    .help(format!("use a window of at most {h}×{w}")));
                }
                let out = Ty::Tensor(vec![ch, (h - kh) / p.stride[0] + 1, (w - kw) / p.stride[1] + 1]);
                if let Some(n) = &p.name {
                    if let Some(first) = self.pool_named(n) {
                        return Err(Diagnostic::error(format!("pool name `{}` is used twice", n.name))
                            .label(n.span, "second pool with this name")
                            .label(first.span, "first pool")
                            .help("give each pool its own name"));
                    }
                    self.pools.push(Pool {
                        name: n.name.clone(),
                        span: n.span,
                        input: input.clone(),
                        output: out.clone(),
                    });
                }
                Ok((out, 0))
            }
            LayerKind::Unpool { pool } => {
                let p = self.find_pool(pool)?;
                if *input != p.output {
                    return Err(shape_err(l, format!(
                        "`unpool {}` needs {} (the output of its maxpool), got {input}",
                        pool.name, p.output
                    ))
                    .label(p.span, format!("pool `{}` gives {}", p.name, p.output))
                    .help("unpool where the shape equals the pool's output, e.g. mirror the layers between them"));
                }
                Ok((p.input.clone(), 0))
            }
            LayerKind::Flatten => match input {
                Ty::Tensor(_) => Ok((Ty::Tensor(vec![input.numel()]), 0)),
                _ => Err(shape_err(l, format!("`flatten` needs a tensor, got {input}"))),
            },
            LayerKind::Reshape { dims } => {
                let target = dims.iter().try_fold(1u64, |a, &b| a.checked_mul(b)).unwrap_or(u64::MAX);
                match input {
                    Ty::Tensor(_) if target == input.numel() => Ok((Ty::Tensor(dims.clone()), 0)),
                    Ty::Tensor(_) => Err(shape_err(
                        l,
                        format!(
                            "cannot reshape {input} ({} values) to {} ({target} values)",
                            input.numel(),
                            crate::syntax::ast_dims(dims)
                        ),
                    )),
                    _ => Err(shape_err(l, format!("`reshape` needs a tensor, got {input}"))),
                }
            }
            LayerKind::Embed { dim } => match input {
                Ty::Tokens { len, vocab } => {
                    self.param(l, pname("weight"), vec![*vocab, *dim], ParamRole::Embedding, *vocab, *dim)?;
                    Ok((Ty::Seq { len: *len, dim: *dim }, 0))
                }
                _ => Err(shape_err(l, format!("`embed` needs token ids, got {input}"))
                    .help("embed reads an input declared as `seq[N] of token[V]`")),
            },
            LayerKind::Dropout { .. } => Ok((input.clone(), 0)),
            LayerKind::Gaussian { units } => {
                let width = match input {
                    Ty::Tensor(d) if d.len() == 1 => d[0],
                    Ty::Tensor(d) => {
                        return Err(shape_err(l, format!("`gaussian` needs a vector, got {input}")).help(
                            format!(
                                "add `flatten` before it to make {} a vector",
                                crate::syntax::ast_dims(d)
                            ),
                        ));
                    }
                    _ => {
                        return Err(shape_err(l, format!("`gaussian` needs a vector, got {input}"))
                            .help("a Gaussian code follows a layer that gives one vector per sample"));
                    }
                };
                let fix = "remove it: the code is mu + exp(logvar / 2)·ε, unbounded by design";
                code_layer(ctx, l, ("gaussian N", "applied to the sampled code", fix))?;
                for head in ["mu", "logvar"] {
                    let (w, b) = (pname(&format!("{head}.weight")), pname(&format!("{head}.bias")));
                    self.param(l, w, vec![*units, width], ParamRole::Weight, width, *units)?;
                    self.param(l, b, vec![*units], ParamRole::Bias, width, *units)?;
                }
                Ok((Ty::Tensor(vec![*units]), mul3(4, width, *units)))
            }
            LayerKind::Quantize { size, ema } => {
                // One codebook vector per position: the channels of an image, a vector whole.
                let d = match input {
                    Ty::Tensor(d) if d.len() == 1 || d.len() == 3 => d.clone(),
                    _ => {
                        return Err(shape_err(
                            l,
                            format!("`quantize` needs a vector [D] or an image [C, H, W], got {input}"),
                        )
                        .help("a quantized code follows a dense or conv layer"));
                    }
                };
                let fix = "put the activation on the layer before it, or remove it";
                code_layer(ctx, l, ("quantize K", "applied to codebook vectors", fix))?;
                let width = d[0];
                let role = ParamRole::Codebook { ema: ema.is_some() };
                self.param(l, pname("codebook"), vec![*size, width], role, *size, width)?;
                if ema.is_some() {
                    // The moving averages: how often each entry is picked, and the sum of the
                    // vectors it is picked for.
                    let buffer = ParamRole::Buffer { ones: false };
                    self.param(l, pname("ema_count"), vec![*size], buffer, *size, width)?;
                    self.param(l, pname("ema_sum"), vec![*size, width], buffer, *size, width)?;
                }
                Ok((input.clone(), mul3(3, *size, input.numel())))
            }
            LayerKind::Activation(_) => Ok((input.clone(), 0)),
            LayerKind::Recurrent(r) => self.recurrent(ctx, l, r, input, &pname),
            LayerKind::Link { link, from } => Ok((self.link(l, *link, from, input)?, input.numel())),
            LayerKind::BatchNorm { .. } => {
                let c = match input {
                    Ty::Tensor(d) if d.len() == 1 || d.len() == 3 => d[0],
                    _ => {
                        return Err(shape_err(
                            l,
                            format!("`batchnorm` normalizes an image [C, H, W] or a vector [F], got {input}"),
                        )
                        .help("put it after a conv (BatchNorm2d) or a dense layer (BatchNorm1d)"));
                    }
                };
                self.param(l, pname("weight"), vec![c], ParamRole::NormScale, c, c)?;
                self.param(l, pname("bias"), vec![c], ParamRole::NormShift, c, c)?;
                self.param(l, pname("running_mean"), vec![c], ParamRole::Buffer { ones: false }, c, c)?;
                self.param(l, pname("running_var"), vec![c], ParamRole::Buffer { ones: true }, c, c)?;
                self.param(l, pname("num_batches_tracked"), vec![], ParamRole::Buffer { ones: false }, 1, 1)?;
                Ok((input.clone(), input.numel().saturating_mul(4)))
            }
            LayerKind::Attention { score } => {
                let (Ty::Seq { len, dim: h }, Part::Decoder, Some(_)) =
                    (input, ctx.part, self.teacher_forced_layer())
                else {
                    return Err(shape_err(
                        l,
                        format!("`attention` reads a teacher-forced decoder's states, got {input}"),
                    )
                    .help("put it right after the decoder's `gru H teacher_forcing` (or lstm, rnn)"));
                };
                let enc = self
                    .layers
                    .iter()
                    .rev()
                    .find(|x| x.part == Part::Encoder && matches!(x.layer.kind, LayerKind::Recurrent(_)));
                let (Some(enc), Some(enc_len)) =
                    (enc, enc.and_then(|e| if let Ty::Seq { len, .. } = e.input { Some(len) } else { None }))
                else {
                    return Err(shape_err(l, "`attention` reads the encoder's states, and the encoder has no recurrent layer".into())
                        .help("end the encoder in `gru H` (or lstm, rnn): attention looks at its state after every source token"));
                };
                let LayerKind::Recurrent(er) = &enc.layer.kind else { unreachable!("found as recurrent") };
                let he = er.hidden;
                if *score == Score::Dot && he != *h {
                    return Err(shape_err(
                        l,
                        format!("`attention dot` scores the decoder's {h}-wide states against the encoder's {he}-wide ones"),
                    )
                    .label(enc.layer.span, format!("{he} wide"))
                    .help("make them the same width, or write `attention general` (a learnt map between them)"));
                }
                let role = ParamRole::Weight;
                let mut flops = mul3(2 * len, enc_len, 2 * he) + mul3(2 * len, he + h, *h);
                match score {
                    Score::Dot => {}
                    Score::General => {
                        self.param(l, pname("attn.weight"), vec![*h, he], role, he, *h)?;
                        flops += mul3(2 * enc_len, he, *h);
                    }
                    Score::Additive => {
                        self.param(l, pname("query.weight"), vec![*h, *h], role, *h, *h)?;
                        self.param(l, pname("key.weight"), vec![*h, he], role, he, *h)?;
                        self.param(l, pname("v.weight"), vec![1, *h], role, *h, 1)?;
                        flops +=
                            mul3(2 * len, *h, *h) + mul3(2 * enc_len, he, *h) + mul3(4 * len, enc_len, *h);
                    }
                }
                self.param(l, pname("concat.weight"), vec![*h, he + h], role, he + h, *h)?;
                self.param(l, pname("concat.bias"), vec![*h], ParamRole::Bias, he + h, *h)?;
                Ok((Ty::Seq { len: *len, dim: *h }, flops))
            }
            LayerKind::Upsample { scale, bilinear } => {
                let [c, h, w] = image(l, input)?;
                let out = Ty::Tensor(vec![c, h.saturating_mul(scale[0]), w.saturating_mul(scale[1])]);
                let per = if *bilinear { 8 } else { 1 };
                Ok((out.clone(), out.numel().saturating_mul(per)))
            }
        }
    }

    fn recurrent(
        &mut self,
        ctx: &Ctx,
        l: &ast::Layer,
        r: &ast::RecurrentSpec,
        input: &Ty,
        pname: &dyn Fn(&str) -> String,
    ) -> Result<(Ty, u64), Diagnostic> {
        let kw = r.cell.keyword();
        let h = r.hidden;
        let g = r.cell.gates();
        // (steps, features per step) of the recurrent layer's input.
        let (len, feat) = match (input, ctx.part, r.teacher_forcing) {
            (_, Part::Encoder, true) => {
                return Err(shape_err(l, "`teacher_forcing` belongs to a decoder's recurrent layer".into())
                    .help("remove it here; the decoder's recurrent layer reads the previous target token"));
            }
            (Ty::Seq { .. }, Part::Decoder, false) if let Some(first) = self.teacher_forced_layer() => {
                return Err(shape_err(
                    l,
                    format!(
                        "greedy decoding runs one recurrent layer step by step: this `{kw}` comes \
                         after the decoder's teacher-forced one"
                    ),
                )
                .label(first.layer.span, "the teacher-forced layer")
                .help(
                    "use one recurrent layer in the decoder (wider if needed), or drop \
                     `teacher_forcing` so that the decoder reads the code at every step; `dense` \
                     layers may follow it",
                ));
            }
            (Ty::Seq { len, dim }, _, false) => (*len, *dim),
            (Ty::Tokens { .. }, _, _) => {
                return Err(shape_err(l, format!("`{kw}` needs vectors at each step, got token ids"))
                    .help(format!("add `embed 32` before `{kw}`")));
            }
            (Ty::Tensor(d), Part::Decoder, tf) if d.len() == 1 => {
                let Some(target) = ctx.target else {
                    return Err(shape_err(
                        l,
                        format!("a decoder `{kw}` takes its length from the loss target, and there is none"),
                    ));
                };
                let (len, vocab) = match target {
                    Ty::Tokens { len, vocab } => (*len, Some(*vocab)),
                    Ty::Seq { len, .. } => (*len, None),
                    _ => {
                        return Err(shape_err(
                            l,
                            format!("a decoder `{kw}` writes a sequence, but the loss target is {target}"),
                        ));
                    }
                };
                if tf {
                    let Some(vocab) = vocab else {
                        return Err(shape_err(
                            l,
                            "teacher forcing reads target tokens, but the target is not token ids".into(),
                        ));
                    };
                    if d[0] != h {
                        return Err(shape_err(
                            l,
                            format!(
                                "`{kw} {h} teacher_forcing` starts from the code, which has {} units",
                                d[0]
                            ),
                        )
                        .help(format!("make the encoder's code {h} wide, or write `{kw} {}`", d[0])));
                    }
                    if r.cell == Cell::Lstm && !self.code_is_lstm() {
                        return Err(shape_err(
                            l,
                            "an lstm decoder starts from an lstm encoder's state (h and c)".into(),
                        )
                        .help("use `lstm` in the encoder too, or `gru` here"));
                    }
                    // Inputs: one-hot previous tokens; index `vocab` is the start token.
                    (len, vocab + 1)
                } else {
                    // The code repeated at every step, from a zero state.
                    (len, d[0])
                }
            }
            (Ty::Tensor(_) | Ty::Token { .. }, _, _) => {
                return Err(shape_err(l, format!("`{kw}` needs a sequence, got {input}"))
                    .help("recurrent layers read `seq[N] of …` inputs; use `dense` for vectors"));
            }
            (Ty::Seq { .. }, Part::Decoder, true) => {
                return Err(shape_err(
                    l,
                    "a teacher-forced recurrent layer starts from a code vector, not a sequence".into(),
                )
                .help("put it first in the decoder, after an encoder that ends in a recurrent layer"));
            }
        };
        let gh = g * h;
        let role = ParamRole::Weight;
        self.param(l, pname("weight_ih_l0"), vec![gh, feat], role, h, gh)?;
        self.param(l, pname("weight_hh_l0"), vec![gh, h], role, h, gh)?;
        if r.bias {
            self.param(l, pname("bias_ih_l0"), vec![gh], ParamRole::Bias, h, gh)?;
            self.param(l, pname("bias_hh_l0"), vec![gh], ParamRole::Bias, h, gh)?;
        }
        let flops = mul3(2 * gh, feat + h, len);
        let out = if r.return_seq || ctx.part == Part::Decoder {
            Ty::Seq { len, dim: h }
        } else {
            Ty::Tensor(vec![h])
        };
        Ok((out, flops))
    }

    /// The weight parameter of encoder layer `index`.
    fn encoder_weight(&self, index: usize) -> Option<usize> {
        let layer = self.layers.iter().find(|l| l.part == Part::Encoder && l.index == index)?;
        layer.params.first().copied()
    }

    /// Writes the decoder of `decoder mirror`: the encoder's layers in reverse, each undone.
    /// A dense or deconv layer takes the activation that produced its encoder twin's input (the
    /// nearest earlier dense/conv's), and its batch normalization if that layer had one; the
    /// first encoder layer's twin takes the mirror's `-> act`. With `skip`, each encoder layer
    /// that lowers the resolution (a pool, a strided conv) has the tensor it read linked into
    /// the decoder right after its twin restores that resolution. Returns the layers and the
    /// names given to encoder layers that a link reads (by index in the encoder).
    fn mirror(
        &mut self,
        tied: bool,
        skip: Option<ast::Link>,
        output: Option<ast::Activation>,
        span: Span,
    ) -> Option<(Vec<ast::Layer>, SkipNames)> {
        let encoder: Vec<LayerInfo> =
            self.layers.iter().filter(|l| l.part == Part::Encoder).cloned().collect();
        if tied && skip == Some(ast::Link::Concat) {
            self.diags.push(
                Diagnostic::error(
                    "`mirror tied skip concat`: a tied deconv cannot read the concatenated channels",
                )
                .label(span, "tied and concatenated")
                .help("drop `tied`, or link with `skip add`"),
            );
            return None;
        }
        let mut out = Vec::new();
        let mut names = Vec::new();
        let mut ok = true;
        let is_param = |k: &LayerKind| {
            matches!(k, LayerKind::Dense { .. } | LayerKind::Conv(_) | LayerKind::Gaussian { .. })
        };
        for (pos, info) in encoder.iter().enumerate().rev() {
            // The nearest earlier layer with parameters: the activation and normalization that
            // followed it apply to this layer's input, so the twin ends in them.
            let earlier = encoder[..pos].iter().rposition(|e| is_param(&e.layer.kind));
            let acts = || -> Vec<ast::Activation> {
                // The last activation applied between that layer and this one (on a line of
                // its own, or after `->` on any line).
                let act = match earlier {
                    Some(i) => encoder[i..pos]
                        .iter()
                        .flat_map(|n| {
                            let own = match &n.layer.kind {
                                LayerKind::Activation(a) => Some(a),
                                _ => None,
                            };
                            own.into_iter().chain(&n.layer.activations)
                        })
                        .last()
                        .cloned(),
                    None => output.clone(),
                };
                act.map(|a| ast::Activation { kind: a.kind, span }).into_iter().collect()
            };
            let norm = earlier.and_then(|i| {
                encoder[i + 1..pos].iter().find_map(|n| match n.layer.kind {
                    LayerKind::BatchNorm { momentum, eps } => Some(LayerKind::BatchNorm { momentum, eps }),
                    _ => None,
                })
            });
            let tie = tied.then_some(info.index);
            let resize = |k: ast::Hw, s: ast::Hw| {
                (k == s).then_some(LayerKind::Upsample { scale: k, bilinear: false })
            };
            let kind = match (&info.layer.kind, &info.input) {
                (LayerKind::Dense { bias, .. }, Ty::Tensor(d)) if d.len() == 1 => {
                    LayerKind::Dense { units: d[0], bias: *bias, tied_to: tie }
                }
                // A Gaussian code has two weights (mu's and logvar's): its twin is an untied
                // dense layer even under `mirror tied`.
                (LayerKind::Gaussian { .. }, Ty::Tensor(d)) if d.len() == 1 => {
                    LayerKind::Dense { units: d[0], bias: true, tied_to: None }
                }
                (LayerKind::Conv(c), Ty::Tensor(d)) if d.len() == 3 => {
                    LayerKind::Deconv(ast::ConvSpec { tied_to: tie, ..c.mirror(d) })
                }
                (LayerKind::MaxPool(ast::PoolSpec { name: Some(n), .. }), _) => {
                    LayerKind::Unpool { pool: n.clone() }
                }
                // With skip links, a pool without switches is undone by upsampling.
                (LayerKind::MaxPool(p) | LayerKind::AvgPool(p), _)
                    if skip.is_some() && resize(p.kernel, p.stride).is_some() =>
                {
                    resize(p.kernel, p.stride)?
                }
                (LayerKind::MaxPool(_), _) => {
                    self.diags.push(
                        Diagnostic::error("a mirrored maxpool needs a name to unpool through")
                            .label(info.layer.span, "unnamed pool")
                            .label(span, "mirrored here")
                            .help("name its switches: `maxpool 2 as p1`"),
                    );
                    ok = false;
                    continue;
                }
                (LayerKind::Flatten | LayerKind::Reshape { .. }, Ty::Tensor(d)) => {
                    LayerKind::Reshape { dims: d.clone() }
                }
                // A residual `add` and a quantizer keep the shape: nothing to undo.
                (
                    LayerKind::Dropout { .. }
                    | LayerKind::Quantize { .. }
                    | LayerKind::Activation(_)
                    | LayerKind::BatchNorm { .. }
                    | LayerKind::Link { link: ast::Link::Add, .. },
                    _,
                ) => continue,
                (kind, _) => {
                    let what = match kind {
                        LayerKind::AvgPool(_) => "an avgpool (it keeps no switches; use `maxpool … as NAME`)",
                        LayerKind::Embed { .. } | LayerKind::Recurrent(_) => {
                            "a sequence layer (write the decoder of a sequence model by hand)"
                        }
                        LayerKind::Link { .. } => {
                            "a concatenation (write the decoder of such an encoder by hand)"
                        }
                        _ => "this layer",
                    };
                    self.diags.push(
                        Diagnostic::error(format!("`decoder mirror` cannot undo {what}"))
                            .label(info.layer.span, "cannot be mirrored")
                            .label(span, "mirrored here"),
                    );
                    ok = false;
                    continue;
                }
            };
            let param_layer = matches!(kind, LayerKind::Dense { .. } | LayerKind::Deconv(_));
            let activations = if param_layer { acts() } else { Vec::new() };
            // An encoder layer left without a bias because a normalization follows it: its
            // twin has one unless a normalization follows the twin too (below).
            let normalized = encoder[pos + 1..]
                .iter()
                .take_while(|n| !is_param(&n.layer.kind))
                .any(|n| matches!(n.layer.kind, LayerKind::BatchNorm { .. }));
            let kind = match kind {
                LayerKind::Deconv(c) if normalized => LayerKind::Deconv(ast::ConvSpec { bias: true, ..c }),
                LayerKind::Dense { units, tied_to, .. } if normalized => {
                    LayerKind::Dense { units, bias: true, tied_to }
                }
                other => other,
            };
            match norm.filter(|_| param_layer) {
                Some(bn) => {
                    // The normalization removes any bias before it (as `nobias` in the encoder).
                    let kind = match kind {
                        LayerKind::Deconv(c) => LayerKind::Deconv(ast::ConvSpec { bias: false, ..c }),
                        LayerKind::Dense { units, tied_to, .. } => {
                            LayerKind::Dense { units, bias: false, tied_to }
                        }
                        other => other,
                    };
                    out.push(ast::Layer::new(kind, Vec::new(), span));
                    out.push(ast::Layer::new(bn, activations, span));
                }
                None => out.push(ast::Layer::new(kind, activations, span)),
            }
            // The skip link: the tensor this layer read, if it lowered the resolution and an
            // encoder layer (not the model's input) made that tensor.
            let lowers = |l: &LayerInfo| match &l.layer.kind {
                LayerKind::MaxPool(_) | LayerKind::AvgPool(_) => true,
                LayerKind::Conv(c) => c.stride != [1, 1],
                _ => false,
            };
            let downsamples = lowers(info);
            // Stages are numbered from the input: the first pool's input is `skip1`.
            let stage = encoder[..=pos].iter().filter(|l| lowers(l)).count();
            if let (Some(link), true, Some(src)) =
                (skip, downsamples, pos.checked_sub(1).map(|p| &encoder[p]))
            {
                let name = match src.layer.output_name() {
                    Some(n) => n.clone(),
                    None => {
                        let taken = |n: &str| {
                            self.named.iter().any(|x| x.name == n)
                                || names.iter().any(|(_, x): &(usize, ast::Ident)| x.name == n)
                        };
                        let name =
                            (stage..).map(|k| format!("skip{k}")).find(|n| !taken(n)).unwrap_or_default();
                        let id = ast::Ident { name, span: src.layer.span };
                        names.push((src.index, id.clone()));
                        id
                    }
                };
                if !self.named.iter().any(|x| x.name == name.name) {
                    self.named.push(Named {
                        name: name.name.clone(),
                        span: name.span,
                        ty: Some(src.output.clone()),
                    });
                }
                out.push(ast::Layer::new(LayerKind::Link { link, from: name }, Vec::new(), span));
            }
        }
        // The layer infos of the encoder carry the names too (lowering reads them).
        for (index, name) in &names {
            if let Some(l) = self.layers.iter_mut().find(|l| l.part == Part::Encoder && l.index == *index) {
                l.layer.name = Some(name.clone());
            }
        }
        ok.then_some((out, names))
    }

    /// The decoder's teacher-forced recurrent layer, if one was checked already.
    fn teacher_forced_layer(&self) -> Option<&LayerInfo> {
        self.layers.iter().find(|l| {
            l.part == Part::Decoder && matches!(&l.layer.kind, LayerKind::Recurrent(r) if r.teacher_forcing)
        })
    }

    fn code_is_lstm(&self) -> bool {
        matches!(
            self.layers.iter().rev().find(|l| l.part == Part::Encoder).map(|l| &l.layer.kind),
            Some(LayerKind::Recurrent(ast::RecurrentSpec { cell: Cell::Lstm, .. }))
        )
    }

    fn param(
        &mut self,
        l: &ast::Layer,
        name: String,
        shape: Vec<u64>,
        role: ParamRole,
        fan_in: u64,
        fan_out: u64,
    ) -> Result<(), Diagnostic> {
        let n = shape.iter().try_fold(1u64, |a, &b| a.checked_mul(b));
        match n {
            Some(n) if n <= MAX_PARAMS => {}
            _ => {
                return Err(Diagnostic::error(format!(
                    "`{name}` would have {} parameters, over aec's budget of {MAX_PARAMS} (1 GiB as f32)",
                    n.map_or("more than 2⁶⁴".to_owned(), |n| n.to_string())
                ))
                .label(l.span, "this layer is too large")
                .help("make the layer smaller"));
            }
        }
        self.params.push(ParamInfo { name, shape, role, fan_in, fan_out });
        Ok(())
    }
}

fn shape_err(l: &ast::Layer, message: String) -> Diagnostic {
    Diagnostic::error(message).label(l.span, "here")
}

/// What a code layer (`gaussian N`, `quantize K`: written as `form`) needs: to be in the
/// encoder, and no activation (`applied` says what one would apply to, `fix` what to do).
fn code_layer(ctx: &Ctx, l: &ast::Layer, (form, applied, fix): (&str, &str, &str)) -> Result<(), Diagnostic> {
    let kw = l.layer_keyword();
    if ctx.part != Part::Encoder {
        return Err(Diagnostic::error(format!("a `{kw}` code belongs at the end of the encoder"))
            .label(l.span, "in the decoder")
            .help(format!("end the encoder with `{form}`; the decoder starts from the code")));
    }
    match l.activations.first() {
        Some(a) => Err(Diagnostic::error(format!("a `{kw}` code takes no activation"))
            .label(a.span, applied)
            .help(fix)),
        None => Ok(()),
    }
}

fn mul3(a: u64, b: u64, c: u64) -> u64 {
    a.saturating_mul(b).saturating_mul(c)
}

/// `[C, H, W]`, or an error that says how to get there.
fn image(l: &ast::Layer, input: &Ty) -> Result<[u64; 3], Diagnostic> {
    let kind = l.layer_keyword();
    match input {
        Ty::Tensor(d) if d.len() == 3 => Ok([d[0], d[1], d[2]]),
        Ty::Tensor(d) if d.len() == 2 => {
            Err(shape_err(l, format!("`{kind}` needs an image [C, H, W], got {input}"))
                .help(format!("declare the input with a channel axis, `[1, {}, {}]`", d[0], d[1])))
        }
        Ty::Tensor(d) if d.len() == 1 => {
            let n = d[0];
            let side = (n as f64).sqrt().round() as u64;
            let mut e = shape_err(l, format!("`{kind}` needs an image [C, H, W], got a vector {input}"));
            if side * side == n {
                e = e.help(format!("add `reshape [1, {side}, {side}]` before it"));
            } else {
                e = e.help("add `reshape [C, H, W]` before it");
            }
            Err(e)
        }
        _ => Err(shape_err(l, format!("`{kind}` needs an image [C, H, W], got {input}"))),
    }
}

fn activation_fits(a: &ast::Activation, ty: &Ty) -> Result<(), Diagnostic> {
    if a.kind == ActKind::Softmax
        && let Ty::Tensor(d) = ty
        && d.len() > 1
    {
        return Err(Diagnostic::error(format!("softmax of {ty} is ambiguous"))
            .label(a.span, "softmax runs along one axis")
            .help("apply softmax to vectors or to sequences of vectors (`flatten` first)"));
    }
    Ok(())
}

impl ast::Layer {
    pub fn layer_keyword(&self) -> &'static str {
        match &self.kind {
            LayerKind::Dense { .. } => "dense",
            LayerKind::Conv(_) => "conv",
            LayerKind::Deconv(_) => "deconv",
            LayerKind::MaxPool(_) => "maxpool",
            LayerKind::AvgPool(_) => "avgpool",
            LayerKind::Unpool { .. } => "unpool",
            LayerKind::Flatten => "flatten",
            LayerKind::Reshape { .. } => "reshape",
            LayerKind::Recurrent(r) => r.cell.keyword(),
            LayerKind::Embed { .. } => "embed",
            LayerKind::Dropout { .. } => "dropout",
            LayerKind::Gaussian { .. } => "gaussian",
            LayerKind::Quantize { .. } => "quantize",
            LayerKind::Activation(_) => "activation",
            LayerKind::Link { link, .. } => link.keyword(),
            LayerKind::BatchNorm { .. } => "batchnorm",
            LayerKind::Upsample { .. } => "upsample",
            LayerKind::Attention { .. } => "attention",
        }
    }
}
