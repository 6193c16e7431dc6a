//! Builds the typed AST from pest's parse tree: one small function per grammar rule, one per
//! layer kind and one per train field. Vocabulary mistakes become diagnostics and building
//! goes on, so one run reports all of them.

use super::Rule;
use super::ast::*;
use crate::diag::{Diagnostic, Span};
use pest::iterators::Pair;

type P<'i> = Pair<'i, Rule>;

#[derive(Default)]
pub(super) struct Builder {
    pub diags: Vec<Diagnostic>,
}

const LAYER_KINDS: &[&str] = &[
    "dense",
    "conv",
    "maxpool",
    "avgpool",
    "unpool",
    "deconv",
    "flatten",
    "reshape",
    "rnn",
    "gru",
    "lstm",
    "embed",
    "dropout",
    "gaussian",
    "quantize",
    "concat",
    "add",
    "batchnorm",
    "upsample",
    "attention",
];
/// The largest size a spec may write anywhere (2²⁸, aec's per-sample activation budget). With
/// every size below it, all shape arithmetic fits in `u64` without overflow.
pub const MAX_SIZE: u64 = 1 << 28;

/// The largest batch (2²⁴ samples).
pub const MAX_BATCH: u64 = 1 << 24;

const ACTIVATIONS: &[&str] = &["relu", "sigmoid", "tanh", "softmax", "leaky_relu", "identity"];

pub(super) fn is_layer_keyword(word: &str) -> bool {
    LAYER_KINDS.contains(&word)
}

fn span_of(p: &P) -> Span {
    let s = p.as_span();
    Span::new(s.start(), s.end())
}

fn ident(p: &P) -> Ident {
    Ident { name: p.as_str().to_owned(), span: span_of(p) }
}

/// One argument of a layer line.
#[derive(Clone, Debug)]
enum Arg {
    Num(f64, String),
    Word(String),
    Shape(Vec<u64>),
}

impl Arg {
    fn text(&self) -> String {
        match self {
            Arg::Num(_, t) | Arg::Word(t) => t.clone(),
            Arg::Shape(_) => "[…]".to_owned(),
        }
    }
}

/// A value in a train field or a call argument.
#[derive(Clone, Debug)]
enum Value {
    Call(Call),
    Str(String),
    Num(f64),
    Word(String),
    /// `[a, b, …]`, each item with its span.
    List(Vec<(Value, Span)>),
}

#[derive(Clone, Debug)]
struct Call {
    name: String,
    name_span: Span,
    args: Vec<CallArg>,
    span: Span,
}

#[derive(Clone, Debug)]
struct CallArg {
    name: Option<Ident>,
    value: Value,
    span: Span,
}

impl Builder {
    fn err(&mut self, d: Diagnostic) {
        self.diags.push(d);
    }

    pub(super) fn file(&mut self, p: P) -> File {
        let mut model = None;
        let mut train = None;
        for item in p.into_inner() {
            match item.as_rule() {
                Rule::model => model = Some(self.model(item)),
                Rule::train => train = Some(self.train(item)),
                _ => {}
            }
        }
        let model = model.unwrap_or_else(|| Model {
            name: Ident { name: String::new(), span: Span::default() },
            inputs: Vec::new(),
            targets: Vec::new(),
            conditions: Vec::new(),
            encoder: None,
            decoder: None,
            loss: None,
            span: Span::default(),
        });
        File { model, train }
    }

    fn model(&mut self, p: P) -> Model {
        let span = span_of(&p);
        let inner = p.into_inner();
        let name = inner
            .clone()
            .find(|n| n.as_rule() == Rule::name)
            .map(|n| ident(&n))
            .unwrap_or(Ident { name: String::new(), span });
        let mut m = Model {
            name,
            inputs: Vec::new(),
            targets: Vec::new(),
            conditions: Vec::new(),
            encoder: None,
            decoder: None,
            loss: None,
            span,
        };
        for item in inner {
            let item_span = span_of(&item);
            match item.as_rule() {
                Rule::input_decl => m.inputs.push(self.decl(item)),
                Rule::target_decl => m.targets.push(self.decl(item)),
                Rule::condition_decl => m.conditions.push(self.decl(item)),
                Rule::encoder => {
                    let block = self.encoder(item);
                    if let Some(first) = &m.encoder {
                        self.duplicate("encoder", first.span, item_span);
                    } else {
                        m.encoder = Some(block);
                    }
                }
                Rule::decoder => {
                    let dec = self.decoder(item);
                    if let Some(first) = &m.decoder {
                        let first_span = match first {
                            Decoder::Layers(b) => b.span,
                            Decoder::Mirror { span, .. } => *span,
                        };
                        self.duplicate("decoder", first_span, item_span);
                    } else {
                        m.decoder = Some(dec);
                    }
                }
                Rule::loss_decl => {
                    let loss = self.loss(item);
                    match (&m.loss, loss) {
                        (Some(first), _) => self.duplicate("loss", first.span, item_span),
                        (None, l) => m.loss = l,
                    }
                }
                _ => {}
            }
        }
        m
    }

    fn duplicate(&mut self, what: &str, first: Span, second: Span) {
        self.err(
            Diagnostic::error(format!("the model has a second `{what}`"))
                .label(second, "second one here")
                .label(first, "first one here")
                .help(format!("a model has one `{what}`; merge the two or remove one")),
        );
    }

    fn decl(&mut self, p: P) -> Decl {
        let span = span_of(&p);
        let errors = self.diags.len();
        let mut name = Ident { name: String::new(), span };
        let mut ty = TypeExpr::Tensor(vec![]);
        for part in p.into_inner() {
            match part.as_rule() {
                Rule::name => name = ident(&part),
                Rule::type_expr => ty = self.type_expr(part),
                _ => {}
            }
        }
        Decl { name, ty, span, broken: self.diags.len() > errors }
    }

    fn type_expr(&mut self, p: P) -> TypeExpr {
        let Some(t) = p.into_inner().next() else {
            return TypeExpr::Tensor(vec![]);
        };
        match t.as_rule() {
            Rule::shape => TypeExpr::Tensor(self.shape(t)),
            Rule::token_type => TypeExpr::Token { vocab: self.token_vocab(t) },
            Rule::seq_type => {
                let padded = t.clone().into_inner().any(|e| e.as_rule() == Rule::at_most);
                let mut inner = t.into_inner().skip(1).filter(|e| e.as_rule() != Rule::at_most);
                let len = inner.next().map(|n| self.int(&n, "a sequence length")).unwrap_or(1);
                let elem = inner.find(|e| e.as_rule() != Rule::kw_of);
                match elem {
                    Some(e) if e.as_rule() == Rule::token_type => {
                        TypeExpr::SeqTokens { len, vocab: self.token_vocab(e), padded }
                    }
                    Some(e) => TypeExpr::SeqTensor { len, dims: self.shape(e) },
                    None => TypeExpr::SeqTensor { len, dims: vec![] },
                }
            }
            _ => TypeExpr::Tensor(vec![]),
        }
    }

    fn token_vocab(&mut self, p: P) -> u64 {
        p.into_inner()
            .find(|n| n.as_rule() == Rule::int)
            .map(|n| self.int(&n, "a vocabulary size"))
            .unwrap_or(1)
    }

    fn shape(&mut self, p: P) -> Vec<u64> {
        p.into_inner().filter(|n| n.as_rule() == Rule::int).map(|n| self.int(&n, "a dimension")).collect()
    }

    /// A positive whole number from an `int` token; 1 (after a diagnostic) if it is not.
    fn int(&mut self, p: &P, what: &str) -> u64 {
        let span = span_of(p);
        match p.as_str().parse::<u64>() {
            Ok(n) if n > MAX_SIZE => {
                self.err(too_large(what, p.as_str(), span));
                1
            }
            Ok(0) => {
                self.err(Diagnostic::error(format!("{what} must be at least 1")).label(span, "this is 0"));
                1
            }
            Ok(n) => n,
            Err(_) => {
                self.err(too_large(what, p.as_str(), span));
                1
            }
        }
    }

    // ---- layers ------------------------------------------------------------------------------

    fn encoder(&mut self, p: P) -> Block {
        let span = span_of(&p);
        self.block(p.into_inner(), span)
    }

    /// The layers of a block; `incomplete` when a layer could not be built.
    fn block<'i>(&mut self, pairs: impl Iterator<Item = P<'i>>, span: Span) -> Block {
        let errors = self.diags.len();
        let layers = pairs.filter(|l| l.as_rule() == Rule::layer);
        let layers = layers.filter_map(|l| self.layer(l)).collect();
        Block { layers, span, incomplete: self.diags.len() > errors }
    }

    fn decoder(&mut self, p: P) -> Decoder {
        let span = span_of(&p);
        let mut inner = p.into_inner().skip(1).peekable();
        if inner.peek().map(|m| m.as_rule()) == Some(Rule::mirror) {
            let mirror = inner.next().map(|m| m.into_inner());
            let mut tied = false;
            let mut skip = None;
            let mut output = None;
            for part in mirror.into_iter().flatten() {
                match part.as_rule() {
                    Rule::kw_tied => tied = true,
                    Rule::mirror_skip => skip = self.mirror_skip(part),
                    Rule::activation => output = self.activation(part),
                    _ => {}
                }
            }
            return Decoder::Mirror { tied, skip, output, span };
        }
        Decoder::Layers(self.block(inner, span))
    }

    /// `skip concat` or `skip add` after `decoder mirror`.
    fn mirror_skip(&mut self, p: P) -> Option<Link> {
        let word = p.into_inner().find(|w| w.as_rule() == Rule::word)?;
        match word.as_str() {
            "concat" => Some(Link::Concat),
            "add" => Some(Link::Add),
            other => {
                self.err(
                    Diagnostic::error(format!("`skip {other}`: a skip link is `concat` or `add`"))
                        .label(span_of(&word), "not a link")
                        .help("write `decoder mirror skip concat` (U-Net) or `decoder mirror skip add`"),
                );
                None
            }
        }
    }

    fn layer(&mut self, p: P) -> Option<Layer> {
        let span = span_of(&p);
        let mut kind_pair = None;
        let mut call = None;
        let mut args = Vec::new();
        let mut activations = Vec::new();
        let mut name = None;
        for part in p.into_inner() {
            match part.as_rule() {
                Rule::layer_kind => kind_pair = Some(part),
                Rule::call_args => call = Some(part),
                Rule::layer_arg => args.push(layer_arg(part)),
                Rule::activation => activations.extend(self.activation(part)),
                Rule::layer_name => {
                    name = part.into_inner().find(|w| w.as_rule() == Rule::word).map(|w| ident(&w))
                }
                _ => {}
            }
        }
        let kind_pair = kind_pair?;
        let kind_span = span_of(&kind_pair);
        let word = kind_pair.as_str();
        // `as NAME` among the arguments (before any activation) names the layer as well; a max
        // pool keeps its name in its `PoolSpec` (it names the switches).
        let mut a = LayerArgs::new(word, kind_span, &args);
        let arg_name = if word == "maxpool" { None } else { a.as_name() };
        let taken = a.used.clone();
        self.diags.append(&mut a.diags);
        if let (Some(first), Some(second)) = (&arg_name, &name) {
            self.err(
                Diagnostic::error(format!(
                    "the layer is named twice, `{}` and `{}`",
                    first.name, second.name
                ))
                .label(second.span, "second name")
                .help("give a layer one `as NAME`, at the end of its line"),
            );
            return None;
        }
        let name = name.or(arg_name);
        let args: Vec<(Arg, Span)> =
            args.into_iter().zip(taken).filter(|(_, used)| !used).map(|(a, _)| a).collect();
        let kind = match call {
            Some(c) if word == "batchnorm" => {
                let call = self.layer_call(word, kind_span, c);
                let mut r = CallReader::new(self, &call, &["momentum", "eps"]);
                let momentum = r.fraction_01("momentum", 0.1);
                let eps = r.positive("eps", Some(1e-5));
                r.finish()?;
                if let Some((_, s)) = args.first() {
                    self.err(
                        Diagnostic::error("`batchnorm` takes its options in parentheses")
                            .label(*s, "extra")
                            .help("write e.g. `batchnorm(momentum: 0.1, eps: 1e-5)`"),
                    );
                    return None;
                }
                LayerKind::BatchNorm { momentum, eps: eps? }
            }
            // `quantize(ema: 0.99) 64`: the codebook moved by moving averages.
            Some(c) if word == "quantize" => {
                let call = self.layer_call(word, kind_span, c);
                let mut r = CallReader::new(self, &call, &["ema"]);
                let ema = r.fraction_01("ema", 0.99);
                r.finish()?;
                match self.layer_kind(word, kind_span, &args)? {
                    LayerKind::Quantize { size, .. } => LayerKind::Quantize { size, ema: Some(ema) },
                    other => other,
                }
            }
            // An activation with arguments on a line of its own: `leaky_relu(0.2)`.
            Some(c) if ACTIVATIONS.contains(&word) => {
                let call_span = span_of(&c);
                let call_args = self.call_args(c);
                let at = kind_span.to(call_span);
                let kind = self.activation_kind(word, kind_span, &call_args, at)?;
                if let Some((_, s)) = args.first() {
                    self.err(
                        Diagnostic::error(format!("`{word}` takes no more arguments")).label(*s, "extra"),
                    );
                    return None;
                }
                LayerKind::Activation(Activation { kind, span: at })
            }
            Some(c) => {
                self.err(
                    Diagnostic::error(format!("`{word}` takes its arguments without parentheses"))
                        .label(span_of(&c), "not a call")
                        .help(format!("write e.g. `{word} 32`")),
                );
                return None;
            }
            None => self.layer_kind(word, kind_span, &args)?,
        };
        let (kind, name) = match (kind, name) {
            // `maxpool 2 -> relu as p1`: the name after the activations names the switches too.
            (LayerKind::MaxPool(PoolSpec { kernel, stride, name: None }), Some(n)) => {
                (LayerKind::MaxPool(PoolSpec { kernel, stride, name: Some(n) }), None)
            }
            (LayerKind::MaxPool(p), Some(n)) => {
                self.err(
                    Diagnostic::error("the pool is named twice")
                        .label(n.span, "second name")
                        .help("give a layer one `as NAME`"),
                );
                (LayerKind::MaxPool(p), None)
            }
            other => other,
        };
        Some(Layer { kind, activations, name, span, kind_span })
    }

    /// A layer word with options in parentheses (`batchnorm(momentum: 0.1)`) as a call.
    fn layer_call(&mut self, word: &str, kind_span: Span, c: P) -> Call {
        let call_span = span_of(&c);
        let args = self.call_args(c);
        Call { name: word.to_owned(), name_span: kind_span, args, span: kind_span.to(call_span) }
    }

    fn layer_kind(&mut self, word: &str, at: Span, args: &[(Arg, Span)]) -> Option<LayerKind> {
        // A layer keyword among the arguments means two layers were written on one line.
        for (arg, s) in args {
            if let Arg::Word(w) = arg
                && LAYER_KINDS.contains(&w.as_str())
            {
                self.err(
                    Diagnostic::error(format!("`{w}` starts a new layer inside a `{word}` line"))
                        .label(*s, "a second layer on the same line")
                        .help("put each layer on its own line, or separate them with `;`"),
                );
                return None;
            }
        }
        let mut a = LayerArgs::new(word, at, args);
        let kind = match word {
            "dense" => {
                let units = a.count("units", "dense 32");
                LayerKind::Dense { units, bias: a.flag("nobias").is_none(), tied_to: None }
            }
            "conv" | "deconv" => {
                let example = if word == "conv" { "conv 16 k3 s1 p1" } else { "deconv 1 k3 s2 p1" };
                let channels = a.count("output channels", example);
                let kernel = a.option("k", None, example);
                let stride = a.option("s", Some([1, 1]), example);
                let pad = a.option("p", Some([0, 0]), example);
                let out_pad = if word == "deconv" { a.option("op", Some([0, 0]), example) } else { [0, 0] };
                let bias = a.flag("nobias").is_none();
                let spec = ConvSpec { channels, kernel, stride, pad, out_pad, bias, tied_to: None };
                if word == "conv" { LayerKind::Conv(spec) } else { LayerKind::Deconv(spec) }
            }
            "maxpool" | "avgpool" => {
                let example = if word == "maxpool" { "maxpool 2 as p1" } else { "avgpool 2" };
                let kernel = a.pool_size(example);
                let stride = a.option("s", Some(kernel), example);
                let name = if word == "maxpool" { a.as_name() } else { None };
                let spec = PoolSpec { kernel, stride, name };
                if word == "maxpool" { LayerKind::MaxPool(spec) } else { LayerKind::AvgPool(spec) }
            }
            "unpool" => match a.name_arg() {
                Some(pool) => LayerKind::Unpool { pool },
                None => {
                    a.missing("the name of a maxpool", "unpool p1");
                    return self.finish(a, None);
                }
            },
            "flatten" => LayerKind::Flatten,
            "reshape" => match a.shape_arg() {
                Some(dims) => LayerKind::Reshape { dims },
                None => {
                    a.missing("a shape", "reshape [1, 8, 8]");
                    return self.finish(a, None);
                }
            },
            "rnn" | "gru" | "lstm" => {
                let cell = match word {
                    "rnn" => Cell::Rnn,
                    "gru" => Cell::Gru,
                    _ => Cell::Lstm,
                };
                let hidden = a.count("hidden units", &format!("{word} 64"));
                let return_seq = a.flag("seq").is_some();
                let teacher_forcing = a.flag("teacher_forcing").is_some();
                let bias = a.flag("nobias").is_none();
                LayerKind::Recurrent(RecurrentSpec { cell, hidden, return_seq, teacher_forcing, bias })
            }
            "embed" => LayerKind::Embed { dim: a.count("embedding size", "embed 32") },
            "dropout" => LayerKind::Dropout { p: a.probability("dropout 0.2") },
            "gaussian" => LayerKind::Gaussian { units: a.count("code size", "gaussian 20") },
            "quantize" => LayerKind::Quantize { size: a.count("codebook size", "quantize 64"), ema: None },
            "concat" | "add" => match a.name_arg() {
                Some(from) => {
                    let link = if word == "concat" { Link::Concat } else { Link::Add };
                    LayerKind::Link { link, from }
                }
                None => {
                    a.missing("the name of an earlier layer", &format!("{word} e1"));
                    return self.finish(a, None);
                }
            },
            "batchnorm" => LayerKind::BatchNorm { momentum: 0.1, eps: 1e-5 },
            "attention" => {
                let scores = [Score::Dot, Score::General, Score::Additive];
                let given: Vec<_> =
                    scores.iter().filter_map(|s| a.flag(s.keyword()).map(|at| (*s, at))).collect();
                if let Some((_, second)) = given.get(1) {
                    a.diags.push(
                        Diagnostic::error("`attention` takes one score")
                            .label(*second, "second score")
                            .help("write one of `dot`, `general` and `additive`"),
                    );
                }
                LayerKind::Attention { score: given.first().map_or(Score::General, |g| g.0) }
            }
            "upsample" => {
                let scale = a.pool_size("upsample 2 bilinear");
                let bilinear = match (a.flag("nearest"), a.flag("bilinear")) {
                    (Some(_), Some(s)) => {
                        a.diags.push(
                            Diagnostic::error("`upsample` takes one mode")
                                .label(s, "second mode")
                                .help("write `nearest` or `bilinear`"),
                        );
                        false
                    }
                    (_, b) => b.is_some(),
                };
                LayerKind::Upsample { scale, bilinear }
            }
            w if ACTIVATIONS.contains(&w) => {
                let act = match w {
                    "leaky_relu" => ActKind::LeakyRelu(a.opt_number().unwrap_or(0.01)),
                    other => simple_activation(other).unwrap_or(ActKind::Identity),
                };
                LayerKind::Activation(Activation { kind: act, span: at })
            }
            _ => {
                let mut d =
                    Diagnostic::error(format!("unknown layer `{word}`")).label(at, "not a layer kind");
                d = match closest(word, LAYER_KINDS.iter().chain(ACTIVATIONS)) {
                    Some(s) => d.help(format!("did you mean `{s}`?")),
                    None => d.help(format!("layers are {}", LAYER_KINDS.join(", "))),
                };
                self.err(d);
                return None;
            }
        };
        self.finish(a, Some(kind))
    }

    fn finish(&mut self, mut a: LayerArgs, kind: Option<LayerKind>) -> Option<LayerKind> {
        a.report_unused();
        let ok = a.diags.is_empty();
        self.diags.append(&mut a.diags);
        if ok { kind } else { None }
    }

    fn activation(&mut self, p: P) -> Option<Activation> {
        let span = span_of(&p);
        let mut inner = p.into_inner();
        let word = inner.next()?;
        let args = inner.next().map(|c| self.call_args(c)).unwrap_or_default();
        let kind = self.activation_kind(word.as_str(), span_of(&word), &args, span)?;
        Some(Activation { kind, span })
    }

    /// The activation `name(args)`; `name_span` is the name's, `span` the whole call's.
    fn activation_kind(
        &mut self,
        name: &str,
        name_span: Span,
        args: &[CallArg],
        span: Span,
    ) -> Option<ActKind> {
        let kind = match name {
            "leaky_relu" => {
                let slope = match args.first().map(|a| &a.value) {
                    None => 0.01,
                    Some(Value::Num(x)) => *x,
                    Some(_) => {
                        self.err(
                            Diagnostic::error("`leaky_relu` takes a number, the negative slope")
                                .label(span, "write e.g. `leaky_relu(0.01)`"),
                        );
                        0.01
                    }
                };
                ActKind::LeakyRelu(slope)
            }
            other => match simple_activation(other) {
                Some(k) => {
                    if !args.is_empty() {
                        self.err(
                            Diagnostic::error(format!("`{other}` takes no arguments"))
                                .label(span, "remove the parentheses"),
                        );
                    }
                    k
                }
                None => {
                    let mut d = Diagnostic::error(format!("unknown activation `{other}`"))
                        .label(name_span, "not an activation");
                    d = match closest(other, ACTIVATIONS.iter()) {
                        Some(s) => d.help(format!("did you mean `{s}`?")),
                        None => d.help(format!("activations are {}", ACTIVATIONS.join(", "))),
                    };
                    self.err(d);
                    return None;
                }
            },
        };
        Some(kind)
    }

    // ---- loss ----------------------------------------------------------------------------------

    fn loss(&mut self, p: P) -> Option<Loss> {
        let span = span_of(&p);
        let terms: Vec<LossTerm> = p
            .into_inner()
            .filter(|t| t.as_rule() == Rule::loss_term)
            .filter_map(|t| self.loss_term(t))
            .collect();
        let mut terms = terms.into_iter();
        let main = terms.next()?;
        if let Some((_, at)) = main.schedule {
            self.err(
                Diagnostic::error("the reconstruction loss keeps a fixed weight")
                    .label(at, "a schedule on the first term")
                    .help(
                        "schedule a penalty after it, e.g. `+ linear(from: 0, to: 1, epochs: 10) * kl(code)`",
                    ),
            );
        }
        Some(Loss { main, extra: terms.collect(), span })
    }

    fn loss_term(&mut self, p: P) -> Option<LossTerm> {
        let span = span_of(&p);
        let mut weight: f64 = 1.0;
        let mut calls = Vec::new();
        for part in p.into_inner() {
            match part.as_rule() {
                Rule::number => weight = part.as_str().parse().unwrap_or(1.0),
                Rule::call => calls.push(self.call(part)),
                _ => {}
            }
        }
        let call = calls.pop()?;
        let schedule = match calls.pop() {
            Some(c) => Some((self.term_schedule(&c)?, c.span)),
            None => None,
        };
        let kind = match call.name.as_str() {
            "mse" => LossKind::Mse,
            "bce" => LossKind::Bce,
            "cross_entropy" => LossKind::CrossEntropy,
            "l1" => LossKind::L1,
            "l2" => LossKind::L2,
            "kl" => LossKind::Kl,
            "sparsity" => LossKind::Sparsity,
            "contractive" => LossKind::Contractive,
            "vq" => LossKind::Vq,
            other => {
                let names =
                    ["mse", "bce", "cross_entropy", "l1", "l2", "kl", "sparsity", "contractive", "vq"];
                let mut d =
                    Diagnostic::error(format!("unknown loss `{other}`")).label(call.name_span, "not a loss");
                d = match closest(other, names.iter()) {
                    Some(s) => d.help(format!("did you mean `{s}`?")),
                    None => {
                        d.help("losses are mse, bce, cross_entropy, l1, l2, kl, sparsity, contractive and vq")
                    }
                };
                self.err(d);
                return None;
            }
        };
        let mut arg = None;
        let mut reduction = None;
        let mut rho = None;
        let mut beta = None;
        let mut ok = true;
        for a in &call.args {
            match (&a.name, &a.value) {
                (Some(n), Value::Num(r))
                    if n.name == "rho" && kind == LossKind::Sparsity && rho.is_none() =>
                {
                    if !(*r > 0.0 && *r < 1.0) {
                        self.err(
                            Diagnostic::error(format!(
                                "a target activation rate is between 0 and 1, not {r}"
                            ))
                            .label(a.span, "out of (0, 1)")
                            .help("Ng's notes use `rho: 0.05`"),
                        );
                        ok = false;
                        continue;
                    }
                    rho = Some((*r, a.span));
                }
                (Some(n), Value::Num(b)) if n.name == "beta" && kind == LossKind::Vq && beta.is_none() => {
                    if !(b.is_finite() && *b >= 0.0) {
                        self.err(
                            Diagnostic::error(format!("a commitment weight is a finite number ≥ 0, not {b}"))
                                .label(a.span, "not a weight")
                                .help("van den Oord et al. use `beta: 0.25`"),
                        );
                        ok = false;
                        continue;
                    }
                    beta = Some((*b, a.span));
                }
                (None, Value::Word(w)) if arg.is_none() => {
                    arg = Some(Ident { name: w.clone(), span: a.span })
                }
                (Some(n), Value::Word(w)) if n.name == "reduction" && reduction.is_none() => {
                    let r = match w.as_str() {
                        "mean" => Reduction::Mean,
                        "sum" => Reduction::Sum,
                        "batchmean" => Reduction::BatchMean,
                        _ => {
                            self.err(
                                Diagnostic::error(format!("unknown reduction `{w}`"))
                                    .label(a.span, "not a reduction")
                                    .help("write `reduction: mean`, `sum` or `batchmean`"),
                            );
                            ok = false;
                            continue;
                        }
                    };
                    reduction = Some((r, a.span));
                }
                _ => {
                    self.err(
                        Diagnostic::error(format!("`{}` does not take this argument", call.name))
                            .label(a.span, "not understood here")
                            .help(format!(
                                "write e.g. `{}(x)` or `{}(x, reduction: sum)`: one name, then an optional \
                                 reduction (mean, sum or batchmean)",
                                call.name, call.name
                            )),
                    );
                    ok = false;
                }
            }
        }
        let Some(arg) = arg else {
            if ok {
                self.err(
                    Diagnostic::error(format!("`{}` takes one name", call.name))
                        .label(call.span, "write e.g. `mse(x)`")
                        .help("name an input or target, or `weights` / `code` for a penalty"),
                );
            }
            return None;
        };
        // A bad argument is reported; the term stays, so the next one is not taken for the first.
        if !(weight.is_finite() && weight >= 0.0) {
            self.err(
                Diagnostic::error("a loss weight must be a finite number ≥ 0").label(span, "this weight"),
            );
        }
        Some(LossTerm { weight, kind, arg, reduction, schedule, rho, beta, span })
    }

    // ---- train ---------------------------------------------------------------------------------

    fn train(&mut self, p: P) -> Train {
        let mut t = Train { span: span_of(&p), ..Train::default() };
        let mut seen: Vec<(String, Span)> = Vec::new();
        for field in p.into_inner().filter(|f| f.as_rule() == Rule::field) {
            let span = span_of(&field);
            let mut name = None;
            let mut binding = None;
            let mut value = None;
            for part in field.into_inner() {
                match part.as_rule() {
                    Rule::field_name => name = Some(ident(&part)),
                    Rule::binding => binding = Some(ident(&part)),
                    Rule::value => value = Some((self.value(part.clone()), span_of(&part))),
                    // `early_stop(patience: 5)`: the field is its own call.
                    Rule::call_args => {
                        let at = span_of(&part);
                        let args = self.call_args(part);
                        if let Some(n) = &name {
                            let n: &Ident = n;
                            let call =
                                Call { name: n.name.clone(), name_span: n.span, args, span: n.span.to(at) };
                            value = Some((Value::Call(call), n.span.to(at)));
                        }
                    }
                    _ => {}
                }
            }
            let (Some(name), Some((value, vspan))) = (name, value) else {
                continue;
            };
            if name.name != "data" {
                if let Some((_, first)) = seen.iter().find(|(n, _)| *n == name.name) {
                    self.err(
                        Diagnostic::error(format!("`{}` is set twice", name.name))
                            .label(name.span, "second setting")
                            .label(*first, "first setting"),
                    );
                    continue;
                }
                seen.push((name.name.clone(), name.span));
                if let Some(b) = &binding {
                    self.err(
                        Diagnostic::error(format!("`{}` takes no binding", name.name))
                            .label(b.span, "only `data NAME: …` binds a name"),
                    );
                }
            }
            self.field(&mut t, name, binding, value, vspan, span);
        }
        t
    }

    fn field(&mut self, t: &mut Train, name: Ident, binding: Option<Ident>, v: Value, vs: Span, span: Span) {
        match name.name.as_str() {
            "data" => {
                if let Some(source) = self.data_source(&v, vs) {
                    t.data.push(DataBinding { binding, source, span });
                }
            }
            "batch" => {
                t.batch = self.field_count(&v, vs, "batch", "batch 64");
                if t.batch.is_some_and(|b| b > MAX_BATCH) {
                    self.err(
                        Diagnostic::error(format!("a batch above {MAX_BATCH} samples is not supported"))
                            .label(vs, "too large"),
                    );
                    t.batch = None;
                }
            }
            "epochs" => t.epochs = self.field_count(&v, vs, "epochs", "epochs 100"),
            "seed" => t.seed = self.field_int(&v, vs, "seed", "seed 7"),
            "validation" => match v {
                Value::Num(x) if (0.0..1.0).contains(&x) => {
                    t.validation = Some(x);
                    t.validation_span = span;
                }
                _ => self.err(
                    Diagnostic::error("`validation` is the fraction of samples held out, in [0, 1)")
                        .label(vs, "not in [0, 1)")
                        .help("write e.g. `validation 0.1`"),
                ),
            },
            "optimizer" => t.optimizer = self.optimizer(&v, vs),
            "noise" => t.noise = self.noise(&v, vs),
            "pretrain" => t.pretrain = self.pretrain(&v, vs),
            "early_stop" => t.early_stop = self.early_stop(&v, vs).map(|e| (e, span)),
            "schedule" => t.schedule = self.schedule(&v, vs).map(|s| (s, span)),
            "clip" => t.clip = self.clip(&v, vs),
            "init" => {
                t.init = match &v {
                    Value::Word(w) if w == "default" => Some(Init::Default),
                    Value::Word(w) if w == "xavier" => Some(Init::Xavier),
                    Value::Word(w) if w == "he" => Some(Init::He),
                    _ => {
                        self.err(
                            Diagnostic::error("unknown initialisation")
                                .label(vs, "expected `default`, `xavier` or `he`"),
                        );
                        None
                    }
                }
            }
            other => {
                let fields = [
                    "data",
                    "batch",
                    "epochs",
                    "optimizer",
                    "seed",
                    "validation",
                    "noise",
                    "pretrain",
                    "init",
                    "early_stop",
                    "schedule",
                    "clip",
                ];
                let mut d = Diagnostic::error(format!("unknown train field `{other}`"))
                    .label(name.span, "not a train field");
                d = match closest(other, fields.iter()) {
                    Some(s) => d.help(format!("did you mean `{s}`?")),
                    None => d.help(format!("train fields are {}", fields.join(", "))),
                };
                self.err(d);
            }
        }
    }

    fn field_int(&mut self, v: &Value, vs: Span, field: &str, example: &str) -> Option<u64> {
        match v {
            Value::Num(x) if x.fract() == 0.0 && *x >= 0.0 && *x < 9.0e15 => Some(*x as u64),
            _ => {
                self.err(
                    Diagnostic::error(format!("`{field}` takes a whole number"))
                        .label(vs, "not a whole number ≥ 0")
                        .help(format!("write e.g. `{example}`")),
                );
                None
            }
        }
    }

    fn field_count(&mut self, v: &Value, vs: Span, field: &str, example: &str) -> Option<u64> {
        let n = self.field_int(v, vs, field, example)?;
        if n == 0 {
            self.err(Diagnostic::error(format!("`{field}` must be at least 1")).label(vs, "this is 0"));
            return None;
        }
        Some(n)
    }

    fn optimizer(&mut self, v: &Value, vs: Span) -> Option<Optimizer> {
        let Value::Call(c) = v else {
            self.err(
                Diagnostic::error("`optimizer` takes `sgd(…)`, `adam(…)`, `adamw(…)` or `rmsprop(…)`")
                    .label(vs, "not an optimizer call")
                    .help("write e.g. `optimizer adam(lr: 1e-3)`"),
            );
            return None;
        };
        match c.name.as_str() {
            "sgd" => {
                let mut a = CallReader::new(self, c, &["lr", "momentum", "nesterov", "weight_decay"]);
                let lr = a.positive("lr", None);
                let momentum = a.fraction_01("momentum", 0.0);
                let nesterov = a.boolean("nesterov", false);
                let weight_decay = a.non_negative("weight_decay", 0.0);
                a.finish()?;
                if nesterov && momentum == 0.0 {
                    self.err(
                        Diagnostic::error("Nesterov momentum needs a momentum above 0")
                            .label(c.span, "nesterov: true with momentum 0")
                            .help("add e.g. `momentum: 0.9`"),
                    );
                }
                Some(Optimizer::Sgd { lr: lr?, momentum, nesterov, weight_decay })
            }
            "adam" | "adamw" => {
                // PyTorch's defaults: AdamW decays by 1e-2 unless told, Adam not at all.
                let decoupled = c.name == "adamw";
                let mut a = CallReader::new(self, c, &["lr", "b1", "b2", "eps", "weight_decay"]);
                let lr = a.positive("lr", Some(1e-3));
                let b1 = a.fraction_01("b1", 0.9);
                let b2 = a.fraction_01("b2", 0.999);
                let eps = a.positive("eps", Some(1e-8));
                let weight_decay = a.non_negative("weight_decay", if decoupled { 1e-2 } else { 0.0 });
                a.finish()?;
                Some(Optimizer::Adam { lr: lr?, b1, b2, eps: eps?, weight_decay, decoupled })
            }
            "rmsprop" => {
                let mut a =
                    CallReader::new(self, c, &["lr", "alpha", "eps", "weight_decay", "momentum", "centered"]);
                let lr = a.positive("lr", Some(1e-2));
                let alpha = a.fraction_01("alpha", 0.99);
                let eps = a.positive("eps", Some(1e-8));
                let weight_decay = a.non_negative("weight_decay", 0.0);
                let momentum = a.fraction_01("momentum", 0.0);
                let centered = a.boolean("centered", false);
                a.finish()?;
                Some(Optimizer::RmsProp { lr: lr?, alpha, eps: eps?, weight_decay, momentum, centered })
            }
            other => {
                let mut d = Diagnostic::error(format!("unknown optimizer `{other}`"))
                    .label(c.name_span, "not an optimizer");
                d = match closest(other, ["sgd", "adam", "adamw", "rmsprop"].iter()) {
                    Some(s) => d.help(format!("did you mean `{s}`?")),
                    None => d.help("optimizers are `sgd(…)`, `adam(…)`, `adamw(…)` and `rmsprop(…)`"),
                };
                self.err(d);
                None
            }
        }
    }

    /// `linear(from:, to:, epochs:)` (also written `warmup(from, to, epochs)`) or
    /// `cyclical(from:, to:, epochs:, cycles:, ratio:)`.
    fn term_schedule(&mut self, c: &Call) -> Option<TermSchedule> {
        match c.name.as_str() {
            "linear" | "warmup" => {
                let mut a = CallReader::new(self, c, &["from", "to", "epochs"]);
                let from = a.non_negative("from", 0.0);
                let to = a.non_negative("to", 1.0);
                let epochs = a.count("epochs");
                a.finish()?;
                Some(TermSchedule::Linear { from, to, epochs: epochs? })
            }
            "cyclical" => {
                let mut a = CallReader::new(self, c, &["from", "to", "epochs", "cycles", "ratio"]);
                let from = a.non_negative("from", 0.0);
                let to = a.non_negative("to", 1.0);
                let epochs = a.count("epochs");
                let cycles = a.count_or("cycles", 4);
                let ratio = a.positive("ratio", Some(0.5));
                a.finish()?;
                let ratio = ratio?;
                if ratio > 1.0 {
                    self.err(
                        Diagnostic::error("`ratio` is the share of each cycle spent rising, at most 1")
                            .label(c.span, "ratio above 1"),
                    );
                    return None;
                }
                Some(TermSchedule::Cyclical { from, to, epochs: epochs?, cycles, ratio })
            }
            other => {
                let mut d = Diagnostic::error(format!("unknown weight schedule `{other}`"))
                    .label(c.name_span, "not a weight schedule");
                d = match closest(other, ["linear", "warmup", "cyclical"].iter()) {
                    Some(s) => d.help(format!("did you mean `{s}`?")),
                    None => d.help("a weight is a number, `linear(from:, to:, epochs:)` or `cyclical(…)`"),
                };
                self.err(d);
                None
            }
        }
    }

    fn schedule(&mut self, v: &Value, vs: Span) -> Option<Schedule> {
        const KINDS: [&str; 6] = ["step", "multistep", "exponential", "cosine", "onecycle", "plateau"];
        let Value::Call(c) = v else {
            self.err(
                Diagnostic::error("`schedule` takes a schedule call").label(vs, "not a schedule").help(
                    "write e.g. `schedule cosine(t_max: 50)` or `schedule step(every: 10, gamma: 0.5)`",
                ),
            );
            return None;
        };
        let schedule = match c.name.as_str() {
            "step" => {
                let mut a = CallReader::new(self, c, &["every", "gamma"]);
                let every = a.count("every");
                let gamma = a.positive("gamma", Some(0.1));
                a.finish()?;
                Schedule::Step { every: every?, gamma: gamma? }
            }
            "multistep" => {
                let mut a = CallReader::new(self, c, &["at", "gamma"]);
                let at = a.counts("at");
                let gamma = a.positive("gamma", Some(0.1));
                a.finish()?;
                Schedule::MultiStep { at: at?, gamma: gamma? }
            }
            "exponential" => {
                let mut a = CallReader::new(self, c, &["gamma"]);
                let gamma = a.positive("gamma", None);
                a.finish()?;
                Schedule::Exponential { gamma: gamma? }
            }
            "cosine" => {
                let mut a = CallReader::new(self, c, &["t_max", "min_lr", "warmup"]);
                let t_max = a.count("t_max");
                let min_lr = a.non_negative("min_lr", 0.0);
                let warmup = a.whole_or("warmup", 0);
                a.finish()?;
                Schedule::Cosine { t_max: t_max?, min_lr, warmup }
            }
            "onecycle" => {
                let mut a =
                    CallReader::new(self, c, &["max_lr", "pct_start", "div_factor", "final_div_factor"]);
                let max_lr = a.positive("max_lr", None);
                let pct_start = a.fraction_01("pct_start", 0.3);
                let div_factor = a.positive("div_factor", Some(25.0));
                let final_div_factor = a.positive("final_div_factor", Some(1e4));
                a.finish()?;
                Schedule::OneCycle {
                    max_lr: max_lr?,
                    pct_start,
                    div_factor: div_factor?,
                    final_div_factor: final_div_factor?,
                }
            }
            "plateau" => {
                let mut a =
                    CallReader::new(self, c, &["factor", "patience", "min_lr", "threshold", "cooldown"]);
                let factor = a.fraction_01("factor", 0.1);
                let patience = a.whole_or("patience", 10);
                let min_lr = a.non_negative("min_lr", 0.0);
                let threshold = a.non_negative("threshold", 1e-4);
                let cooldown = a.whole_or("cooldown", 0);
                a.finish()?;
                if factor == 0.0 {
                    self.err(
                        Diagnostic::error("`factor` must be above 0: the learning rate is multiplied by it")
                            .label(c.span, "factor 0")
                            .help("write e.g. `plateau(factor: 0.5)`"),
                    );
                    return None;
                }
                Schedule::Plateau { factor, patience, min_lr, threshold, cooldown }
            }
            other => {
                let mut d = Diagnostic::error(format!("unknown schedule `{other}`"))
                    .label(c.name_span, "not a schedule");
                d = match closest(other, KINDS.iter()) {
                    Some(s) => d.help(format!("did you mean `{s}`?")),
                    None => d.help(format!("schedules are {}", KINDS.join(", "))),
                };
                self.err(d);
                return None;
            }
        };
        Some(schedule)
    }

    fn clip(&mut self, v: &Value, vs: Span) -> Option<ClipRule> {
        let (Value::Call(c), true) =
            (v, matches!(v, Value::Call(c) if c.name == "norm" || c.name == "value"))
        else {
            self.err(
                Diagnostic::error("`clip` takes `norm(C)` or `value(C)`")
                    .label(vs, "not a clipping rule")
                    .help("write e.g. `clip norm(1.0)` (as clip_grad_norm_) or `clip value(0.5)`"),
            );
            return None;
        };
        let mut a = CallReader::new(self, c, &["max"]);
        let max = a.positive("max", None);
        a.finish()?;
        Some(if c.name == "norm" { ClipRule::Norm(max?) } else { ClipRule::Value(max?) })
    }

    fn early_stop(&mut self, v: &Value, vs: Span) -> Option<EarlyStop> {
        let Value::Call(c) = v else {
            self.err(
                Diagnostic::error("`early_stop` takes its settings in parentheses")
                    .label(vs, "not `early_stop(…)`")
                    .help("write e.g. `early_stop(patience: 5, min_delta: 1e-4)`"),
            );
            return None;
        };
        let mut a = CallReader::new(self, c, &["patience", "min_delta"]);
        let patience = a.whole_or("patience", 5);
        let min_delta = a.non_negative("min_delta", 0.0);
        a.finish()?;
        Some(EarlyStop { patience, min_delta })
    }

    fn noise(&mut self, v: &Value, vs: Span) -> Option<Noise> {
        let Value::Call(c) = v else {
            self.err(
                Diagnostic::error("`noise` takes `gaussian(σ)`, `mask(p)` or `salt_pepper(p)`")
                    .label(vs, "not a noise call"),
            );
            return None;
        };
        let noise = match c.name.as_str() {
            "gaussian" => {
                let mut a = CallReader::new(self, c, &["sigma"]);
                let sigma = a.positive("sigma", None);
                a.finish()?;
                Noise::Gaussian { sigma: sigma? }
            }
            "mask" | "salt_pepper" => {
                let mut a = CallReader::new(self, c, &["p"]);
                let p = a.fraction_01("p", f64::NAN);
                a.finish()?;
                if p.is_nan() {
                    return None;
                }
                if c.name == "mask" { Noise::Mask { p } } else { Noise::SaltPepper { p } }
            }
            other => {
                self.err(
                    Diagnostic::error(format!("unknown noise `{other}`"))
                        .label(c.name_span, "expected gaussian, mask or salt_pepper"),
                );
                return None;
            }
        };
        Some(noise)
    }

    fn pretrain(&mut self, v: &Value, vs: Span) -> Option<Pretrain> {
        match v {
            Value::Call(c) if c.name == "greedy" => {
                let mut a = CallReader::new(self, c, &["epochs", "freeze"]);
                let epochs = a.count("epochs");
                let freeze = a.boolean("freeze", false);
                a.finish()?;
                Some(Pretrain { epochs: epochs?, freeze })
            }
            _ => {
                self.err(
                    Diagnostic::error("`pretrain` takes `greedy(epochs: E)`")
                        .label(vs, "not a pretraining schedule")
                        .help("write e.g. `pretrain greedy(epochs: 20)`"),
                );
                None
            }
        }
    }

    fn data_source(&mut self, v: &Value, vs: Span) -> Option<DataSource> {
        let Value::Call(c) = v else {
            self.err(
                Diagnostic::error("`data` takes a source such as `npy(\"x.npy\")` or `onehot(8)`")
                    .label(vs, "not a data source"),
            );
            return None;
        };
        let file_source = |b: &mut Builder, kind: &str| -> Option<(String, f64)> {
            let mut a = CallReader::new(b, c, &["path", "scale"]);
            let path = a.string("path");
            let scale = a.positive("scale", Some(1.0));
            a.finish()?;
            let _ = kind;
            Some((path?, scale?))
        };
        match c.name.as_str() {
            "onehot" => {
                let mut a = CallReader::new(self, c, &["n"]);
                let n = a.count("n");
                a.finish()?;
                Some(DataSource::OneHot { n: n? })
            }
            "npy" => file_source(self, "npy").map(|(path, scale)| DataSource::Npy { path, scale }),
            "csv" => file_source(self, "csv").map(|(path, scale)| DataSource::Csv { path, scale }),
            "idx" => file_source(self, "idx").map(|(path, scale)| DataSource::Idx { path, scale }),
            "patches" => {
                let inner = match c.args.first() {
                    Some(CallArg { name: None, value, span }) => self.data_source(value, *span),
                    _ => {
                        self.err(
                            Diagnostic::error("`patches` cuts patches from another source")
                                .label(c.span, "write e.g. `patches(npy(\"camera.npy\"), size: 16)`"),
                        );
                        None
                    }
                };
                let rest = Call { args: c.args.iter().skip(1).cloned().collect(), ..c.clone() };
                let mut a = CallReader::new(self, &rest, &["size", "stride"]);
                let size = a.count("size");
                let stride = a.count_or("stride", size.unwrap_or(1));
                a.finish()?;
                Some(DataSource::Patches { source: Box::new(inner?), size: size?, stride })
            }
            "copy" | "reverse" => {
                let task = if c.name == "copy" { SeqTask::Copy } else { SeqTask::Reverse };
                let mut a = CallReader::new(self, c, &["len", "vocab", "count"]);
                let len = a.count("len");
                let vocab = a.count("vocab");
                let count = a.count_or("count", 4096);
                a.finish()?;
                Some(DataSource::SeqTask { task, len: len?, vocab: vocab?, count })
            }
            "translation" | "random" => {
                let mut a = CallReader::new(self, c, &["count"]);
                let count = a.count_or("count", 4096);
                a.finish()?;
                Some(if c.name == "random" {
                    DataSource::Random { count }
                } else {
                    DataSource::Translation { count }
                })
            }
            "text" => {
                let mut a = CallReader::new(self, c, &["path", "tokens", "min_count"]);
                let path = a.string("path");
                let tokens = a.word("tokens", &["word", "char"]);
                let min_count = a.count_or("min_count", 1);
                a.finish()?;
                let tokens = if tokens.as_deref() == Some("char") { Tokens::Char } else { Tokens::Word };
                Some(DataSource::Text { path: path?, tokens, min_count })
            }
            "images" => {
                let mut a = CallReader::new(self, c, &["path", "fit", "scale"]);
                let path = a.string("path");
                let fit = a.word("fit", &["crop", "stretch"]);
                let scale = a.positive("scale", Some(1.0 / 255.0));
                a.finish()?;
                let fit = if fit.as_deref() == Some("stretch") { ImageFit::Stretch } else { ImageFit::Crop };
                Some(DataSource::Images { path: path?, fit, scale: scale? })
            }
            other => {
                let names = [
                    "onehot",
                    "npy",
                    "csv",
                    "idx",
                    "patches",
                    "copy",
                    "reverse",
                    "translation",
                    "random",
                    "text",
                    "images",
                ];
                let mut d = Diagnostic::error(format!("unknown data source `{other}`"))
                    .label(c.name_span, "not a data source");
                d = match closest(other, names.iter()) {
                    Some(s) => d.help(format!("did you mean `{s}`?")),
                    None => d.help(format!("data sources are {}", names.join(", "))),
                };
                self.err(d);
                None
            }
        }
    }

    // ---- values --------------------------------------------------------------------------------

    fn value(&mut self, p: P) -> Value {
        let Some(v) = p.into_inner().next() else {
            return Value::Word(String::new());
        };
        match v.as_rule() {
            Rule::call => Value::Call(self.call(v)),
            Rule::string => {
                let s = v.as_str();
                Value::Str(s[1..s.len() - 1].to_owned())
            }
            Rule::fraction => {
                let span = span_of(&v);
                let mut nums = v.into_inner().map(|n| n.as_str().parse::<f64>().unwrap_or(f64::NAN));
                let (a, b) = (nums.next().unwrap_or(f64::NAN), nums.next().unwrap_or(f64::NAN));
                if b == 0.0 {
                    self.err(Diagnostic::error("division by zero").label(span, "this fraction"));
                    return Value::Num(f64::NAN);
                }
                Value::Num(a / b)
            }
            Rule::number => Value::Num(v.as_str().parse().unwrap_or(f64::NAN)),
            Rule::list => Value::List(
                v.into_inner()
                    .filter(|i| i.as_rule() == Rule::value)
                    .map(|i| {
                        let span = span_of(&i);
                        (self.value(i), span)
                    })
                    .collect(),
            ),
            _ => Value::Word(v.as_str().to_owned()),
        }
    }

    fn call(&mut self, p: P) -> Call {
        let span = span_of(&p);
        let mut inner = p.into_inner();
        let (name, name_span) = match inner.next() {
            Some(w) => (w.as_str().to_owned(), span_of(&w)),
            None => (String::new(), span),
        };
        let args = inner.next().map(|a| self.call_args(a)).unwrap_or_default();
        Call { name, name_span, args, span }
    }

    fn call_args(&mut self, p: P) -> Vec<CallArg> {
        let mut out = Vec::new();
        for arg in p.into_inner().filter(|a| a.as_rule() == Rule::arg) {
            let span = span_of(&arg);
            let mut name = None;
            let mut value = Value::Word(String::new());
            for part in arg.into_inner() {
                match part.as_rule() {
                    Rule::arg_name => name = Some(ident(&part)),
                    Rule::value => value = self.value(part),
                    _ => {}
                }
            }
            out.push(CallArg { name, value, span });
        }
        out
    }
}

fn layer_arg(p: P) -> (Arg, Span) {
    let span = span_of(&p);
    let Some(inner) = p.into_inner().next() else {
        return (Arg::Word(String::new()), span);
    };
    let arg = match inner.as_rule() {
        Rule::shape => Arg::Shape(
            inner
                .into_inner()
                .filter(|n| n.as_rule() == Rule::int)
                .map(|n| n.as_str().parse::<u64>().unwrap_or(u64::MAX))
                .collect(),
        ),
        Rule::number => {
            let text = inner.as_str().to_owned();
            Arg::Num(text.parse().unwrap_or(f64::NAN), text)
        }
        _ => Arg::Word(inner.as_str().to_owned()),
    };
    (arg, span)
}

fn too_large(what: &str, text: &str, span: Span) -> Diagnostic {
    Diagnostic::error(format!("{text} is beyond aec's size limit of {MAX_SIZE} (2²⁸)"))
        .label(span, format!("{what} too large"))
        .help("sizes above 2²⁸ would not fit in memory; make it smaller")
}

fn simple_activation(name: &str) -> Option<ActKind> {
    Some(match name {
        "relu" => ActKind::Relu,
        "sigmoid" => ActKind::Sigmoid,
        "tanh" => ActKind::Tanh,
        "softmax" => ActKind::Softmax,
        "identity" => ActKind::Identity,
        _ => return None,
    })
}

/// The closest candidate within edit distance 2, for "did you mean".
pub fn closest<'a, I, S>(word: &str, candidates: I) -> Option<&'a str>
where
    I: IntoIterator<Item = &'a S>,
    S: AsRef<str> + 'a + ?Sized,
{
    candidates
        .into_iter()
        .map(|c| c.as_ref())
        .map(|c| (edit_distance(word, c), c))
        .filter(|(d, c)| *d <= 2 && *d < c.len())
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur[j + 1] = sub.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

/// The arguments of one layer line, consumed by the layer's builder; whatever is left over is
/// reported as not understood.
struct LayerArgs<'a> {
    layer: &'a str,
    at: Span,
    args: &'a [(Arg, Span)],
    used: Vec<bool>,
    diags: Vec<Diagnostic>,
}

impl<'a> LayerArgs<'a> {
    fn new(layer: &'a str, at: Span, args: &'a [(Arg, Span)]) -> Self {
        LayerArgs { layer, at, args, used: vec![false; args.len()], diags: Vec::new() }
    }

    fn line_span(&self) -> Span {
        self.args.iter().fold(self.at, |s, (_, a)| s.to(*a))
    }

    fn missing(&mut self, what: &str, example: &str) {
        let d = Diagnostic::error(format!("`{}` needs {what}", self.layer))
            .label(self.line_span(), format!("{what} missing"))
            .help(format!("write e.g. `{example}`"));
        self.diags.push(d);
    }

    /// The first positional number: a whole number ≥ 1.
    fn count(&mut self, what: &str, example: &str) -> u64 {
        let found =
            self.args.iter().enumerate().find(|(i, (a, _))| !self.used[*i] && matches!(a, Arg::Num(..)));
        let Some((i, (Arg::Num(x, text), span))) = found else {
            self.missing(&format!("a number of {what}"), example);
            return 1;
        };
        self.used[i] = true;
        if x.is_finite() && x.fract() == 0.0 && *x > MAX_SIZE as f64 {
            self.diags.push(too_large(&format!("`{}`: {what}", self.layer), text, *span));
            return 1;
        }
        if x.fract() != 0.0 || *x < 1.0 || !x.is_finite() {
            let d = Diagnostic::error(format!(
                "`{}` needs a whole number of {what} ≥ 1, found `{text}`",
                self.layer
            ))
            .label(*span, "not a whole number ≥ 1")
            .help(format!("write e.g. `{example}`"));
            self.diags.push(d);
            return 1;
        }
        *x as u64
    }

    fn opt_number(&mut self) -> Option<f64> {
        let i = self.args.iter().position(|(a, _)| matches!(a, Arg::Num(..)))?;
        self.used[i] = true;
        match &self.args[i].0 {
            Arg::Num(x, _) => Some(*x),
            _ => None,
        }
    }

    fn probability(&mut self, example: &str) -> f64 {
        let Some(i) = self.args.iter().position(|(a, _)| matches!(a, Arg::Num(..))) else {
            self.missing("a probability", example);
            return 0.0;
        };
        self.used[i] = true;
        let (Arg::Num(p, text), span) = &self.args[i] else {
            return 0.0;
        };
        if !(0.0..1.0).contains(p) {
            let d = Diagnostic::error(format!("a probability must be in [0, 1), found `{text}`"))
                .label(*span, "not in [0, 1)")
                .help(format!("write e.g. `{example}`"));
            self.diags.push(d);
            return 0.0;
        }
        *p
    }

    /// An option written as a prefix and a size: `k3`, `s2`, `p1`, `op1`, or per axis
    /// (height × width) `k3x5`, `op1x0`.
    fn option(&mut self, prefix: &str, default: Option<Hw>, example: &str) -> Hw {
        let found = self.args.iter().enumerate().find_map(|(i, (a, span))| match a {
            Arg::Word(w) if !self.used[i] => {
                let size = w.strip_prefix(prefix)?;
                let (h, w) = size.split_once('x').unwrap_or((size, size));
                let digits = |t: &str| !t.is_empty() && t.chars().all(|c| c.is_ascii_digit());
                (digits(h) && digits(w))
                    .then(|| (i, h.parse::<u64>().and_then(|h| Ok([h, w.parse()?])), *span))
            }
            _ => None,
        });
        match found {
            Some((i, Ok(n), span)) if n.iter().any(|&n| n > MAX_SIZE) => {
                self.used[i] = true;
                self.diags.push(too_large(&format!("`{prefix}`"), &ShowHw(n).to_string(), span));
                [1, 1]
            }
            Some((i, Ok(n), span)) => {
                self.used[i] = true;
                if n.contains(&0) && prefix != "p" && prefix != "op" {
                    let what = if prefix == "k" { "kernel size" } else { "stride" };
                    let d = Diagnostic::error(format!("a {what} of 0 is not allowed"))
                        .label(span, format!("{what} must be at least 1"))
                        .help(format!("write e.g. `{example}`"));
                    self.diags.push(d);
                    return [1, 1];
                }
                n
            }
            Some((i, Err(_), span)) => {
                self.used[i] = true;
                let text = self.args[i].0.text();
                self.diags.push(too_large(&format!("`{prefix}`"), &text, span));
                [1, 1]
            }
            None => match default {
                Some(d) => d,
                None => {
                    let what = match prefix {
                        "k" => "a kernel size `kK`",
                        "s" => "a stride `sS`",
                        "p" => "a padding `pP`",
                        _ => "an output padding `opO`",
                    };
                    self.missing(what, example);
                    [1, 1]
                }
            },
        }
    }

    /// A pool's kernel size: `2`, or per axis `2x3` (read as the number 2 and, right after
    /// it, the word `x3`).
    fn pool_size(&mut self, example: &str) -> Hw {
        let before = self.used.clone();
        let h = self.count("kernel size", example);
        let Some(i) = self.used.iter().zip(&before).position(|(now, was)| *now && !was) else {
            return [h, h];
        };
        let end = self.args[i].1.end;
        let next = self.args.get(i + 1).filter(|(a, span)| span.start == end && matches!(a, Arg::Word(_)));
        let Some((Arg::Word(w), span)) = next else {
            return [h, h];
        };
        let span = *span;
        let Some(digits) =
            w.strip_prefix('x').filter(|d| !d.is_empty() && d.chars().all(|c| c.is_ascii_digit()))
        else {
            return [h, h];
        };
        self.used[i + 1] = true;
        match digits.parse::<u64>() {
            Ok(0) => {
                let d = Diagnostic::error("a kernel size of 0 is not allowed")
                    .label(span, "kernel size must be at least 1")
                    .help(format!("write e.g. `{example}`"));
                self.diags.push(d);
                [h, 1]
            }
            Ok(w) if w <= MAX_SIZE => [h, w],
            _ => {
                self.diags.push(too_large("a kernel size", digits, span));
                [h, 1]
            }
        }
    }

    fn flag(&mut self, flag: &str) -> Option<Span> {
        let i = self
            .args
            .iter()
            .enumerate()
            .position(|(i, (a, _))| !self.used[i] && matches!(a, Arg::Word(w) if w == flag))?;
        self.used[i] = true;
        Some(self.args[i].1)
    }

    /// `as NAME`.
    fn as_name(&mut self) -> Option<Ident> {
        let i = self.flag("as")?;
        let pos = self.args.iter().position(|(_, s)| *s == i)?;
        match self.args.get(pos + 1) {
            Some((Arg::Word(w), span)) => {
                self.used[pos + 1] = true;
                Some(Ident { name: w.clone(), span: *span })
            }
            _ => {
                let example =
                    if self.layer == "maxpool" { "maxpool 2 as p1" } else { "conv 16 k3 p1 -> relu as e1" };
                let d = Diagnostic::error("`as` must be followed by a name")
                    .label(i, "name missing")
                    .help(format!("write e.g. `{example}`"));
                self.diags.push(d);
                None
            }
        }
    }

    /// The first unused word: a reference to a name.
    fn name_arg(&mut self) -> Option<Ident> {
        let i = self
            .args
            .iter()
            .enumerate()
            .position(|(i, (a, _))| !self.used[i] && matches!(a, Arg::Word(_)))?;
        self.used[i] = true;
        match &self.args[i] {
            (Arg::Word(w), span) => Some(Ident { name: w.clone(), span: *span }),
            _ => None,
        }
    }

    fn shape_arg(&mut self) -> Option<Vec<u64>> {
        let i = self.args.iter().position(|(a, _)| matches!(a, Arg::Shape(_)))?;
        self.used[i] = true;
        match &self.args[i].0 {
            Arg::Shape(dims) if dims.iter().any(|&d| d > MAX_SIZE) => {
                let d = too_large("a reshape dimension", "this size", self.args[i].1);
                self.diags.push(d);
                None
            }
            Arg::Shape(dims) if dims.contains(&0) => {
                let d = Diagnostic::error("a reshape dimension must be at least 1")
                    .label(self.args[i].1, "contains 0");
                self.diags.push(d);
                None
            }
            Arg::Shape(dims) => Some(dims.clone()),
            _ => None,
        }
    }

    fn report_unused(&mut self) {
        let layer = self.layer;
        let accepted = match layer {
            "dense" => "`dense N [nobias]`",
            "conv" => "`conv C kK [sS] [pP] [nobias]` (a size per axis as `k3x5`)",
            "deconv" => "`deconv C kK [sS] [pP] [opO] [nobias]` (a size per axis as `k3x5`)",
            "maxpool" => "`maxpool K [sS] [as NAME]` (a size per axis as `2x3`, `s2x3`)",
            "avgpool" => "`avgpool K [sS]` (a size per axis as `2x3`, `s2x3`)",
            "unpool" => "`unpool NAME`",
            "flatten" => "`flatten`",
            "reshape" => "`reshape [dims]`",
            "rnn" | "gru" | "lstm" => "`gru H [seq] [teacher_forcing] [nobias]`",
            "embed" => "`embed N`",
            "dropout" => "`dropout P`",
            "gaussian" => "`gaussian N`",
            "quantize" => "`quantize K` (K codebook vectors) or `quantize(ema: 0.99) K`",
            "concat" | "add" => "the name of an earlier layer, e.g. `concat e1`",
            "batchnorm" => "`batchnorm` or `batchnorm(momentum: 0.1, eps: 1e-5)`",
            "upsample" => "`upsample S [nearest|bilinear]` (a factor per axis as `2x3`)",
            "attention" => "`attention [dot|general|additive]`",
            _ => "no arguments",
        };
        for (i, (arg, span)) in self.args.iter().enumerate() {
            if self.used[i] {
                continue;
            }
            let text = match arg {
                Arg::Num(_, t) => t.clone(),
                Arg::Word(w) => w.clone(),
                Arg::Shape(_) => "[…]".to_owned(),
            };
            let mut d = Diagnostic::error(format!("`{layer}` does not take `{text}`"))
                .label(*span, "not understood here");
            d = match (arg, layer) {
                (Arg::Num(..), "conv" | "deconv" | "maxpool" | "avgpool") => d.help(format!(
                    "options carry their letter: kernel `k{text}`, stride `s{text}`, padding \
                     `p{text}`; the layer takes {accepted}"
                )),
                (Arg::Word(w), _) if ACTIVATIONS.contains(&w.as_str()) => {
                    d.help(format!("write the activation after an arrow: `-> {w}`"))
                }
                _ => d.help(format!("the layer takes {accepted}")),
            };
            self.diags.push(d);
        }
    }
}

/// Reads the arguments of a call such as `sgd(lr: 0.1, momentum: 0.9)`: by name, or in the
/// order of `names` when written without one.
struct CallReader<'b, 'c> {
    b: &'b mut Builder,
    call: &'c Call,
    names: &'static [&'static str],
    used: Vec<bool>,
    errors: usize,
}

impl<'b, 'c> CallReader<'b, 'c> {
    fn new(b: &'b mut Builder, call: &'c Call, names: &'static [&'static str]) -> Self {
        let used = vec![false; call.args.len()];
        let mut r = CallReader { b, call, names, used, errors: 0 };
        r.check_names();
        r
    }

    fn check_names(&mut self) {
        let mut positional_ok = true;
        for (i, a) in self.call.args.iter().enumerate() {
            match &a.name {
                Some(n) if !self.names.contains(&n.name.as_str()) => {
                    self.used[i] = true;
                    let mut d =
                        Diagnostic::error(format!("`{}` has no argument `{}`", self.call.name, n.name))
                            .label(n.span, "unknown argument");
                    d = match closest(&n.name, self.names.iter()) {
                        Some(s) => d.help(format!("did you mean `{s}`?")),
                        None => d.help(format!("its arguments are {}", self.names.join(", "))),
                    };
                    self.error(d);
                }
                Some(_) => positional_ok = false,
                None if !positional_ok || i >= self.names.len() => {
                    self.used[i] = true;
                    let d = Diagnostic::error(format!("too many unnamed arguments to `{}`", self.call.name))
                        .label(a.span, "name this argument")
                        .help(format!("its arguments are {}", self.names.join(", ")));
                    self.error(d);
                }
                None => {}
            }
        }
    }

    fn error(&mut self, d: Diagnostic) {
        self.errors += 1;
        self.b.err(d);
    }

    fn find(&mut self, name: &str) -> Option<(Value, Span)> {
        let pos = self.names.iter().position(|n| *n == name)?;
        let i = self.call.args.iter().enumerate().position(|(i, a)| match &a.name {
            Some(n) => n.name == name,
            None => i == pos,
        })?;
        if self.used[i] {
            return None;
        }
        self.used[i] = true;
        let a = &self.call.args[i];
        Some((a.value.clone(), a.span))
    }

    fn number(&mut self, name: &str) -> Option<(f64, Span)> {
        let (v, span) = self.find(name)?;
        match v {
            Value::Num(x) if x.is_finite() => Some((x, span)),
            _ => {
                let d = Diagnostic::error(format!("`{name}` must be a number")).label(span, "not a number");
                self.error(d);
                None
            }
        }
    }

    fn positive(&mut self, name: &str, default: Option<f64>) -> Option<f64> {
        match self.number(name) {
            Some((x, _)) if x > 0.0 && (x as f32).is_finite() && x as f32 > 0.0 => Some(x),
            Some((x, span)) if x > 0.0 => {
                self.error(not_f32(name, x, span));
                None
            }
            Some((_, span)) => {
                let d = Diagnostic::error(format!("`{name}` must be above 0")).label(span, "not above 0");
                self.error(d);
                None
            }
            None if default.is_some() => default,
            None => {
                let d = Diagnostic::error(format!("`{}` needs `{name}`", self.call.name))
                    .label(self.call.span, format!("`{name}` missing"))
                    .help(format!("write e.g. `{}({name}: 0.1)`", self.call.name));
                self.error(d);
                None
            }
        }
    }

    fn non_negative(&mut self, name: &str, default: f64) -> f64 {
        match self.number(name) {
            Some((x, _)) if x >= 0.0 && (x as f32).is_finite() => x,
            Some((x, span)) if x >= 0.0 => {
                self.error(not_f32(name, x, span));
                default
            }
            Some((_, span)) => {
                let d = Diagnostic::error(format!("`{name}` must be ≥ 0")).label(span, "below 0");
                self.error(d);
                default
            }
            None => default,
        }
    }

    fn fraction_01(&mut self, name: &str, default: f64) -> f64 {
        match self.number(name) {
            Some((x, _)) if (0.0..1.0).contains(&x) && (x as f32) < 1.0 => x,
            Some((x, span)) if (0.0..1.0).contains(&x) => {
                self.error(not_f32(name, x, span));
                default
            }
            Some((_, span)) => {
                let d = Diagnostic::error(format!("`{name}` must be in [0, 1)")).label(span, "not in [0, 1)");
                self.error(d);
                default
            }
            None => {
                if default.is_nan() {
                    let d = Diagnostic::error(format!("`{}` needs `{name}`", self.call.name))
                        .label(self.call.span, format!("`{name}` missing"));
                    self.error(d);
                }
                default
            }
        }
    }

    fn count(&mut self, name: &str) -> Option<u64> {
        match self.number(name) {
            Some((x, _)) if x >= 1.0 && x.fract() == 0.0 && x <= MAX_SIZE as f64 => Some(x as u64),
            Some((x, span)) if x > MAX_SIZE as f64 => {
                let d =
                    Diagnostic::error(format!("`{name}` may be at most {MAX_SIZE}")).label(span, "too large");
                self.error(d);
                None
            }
            Some((_, span)) => {
                let d = Diagnostic::error(format!("`{name}` must be a whole number ≥ 1"))
                    .label(span, "not a whole number ≥ 1");
                self.error(d);
                None
            }
            None => {
                let d = Diagnostic::error(format!("`{}` needs `{name}`", self.call.name))
                    .label(self.call.span, format!("`{name}` missing"));
                self.error(d);
                None
            }
        }
    }

    /// A whole number ≥ 0 (a patience, a warm-up), `default` when not given.
    fn whole_or(&mut self, name: &str, default: u64) -> u64 {
        match self.number(name) {
            Some((x, _)) if x >= 0.0 && x.fract() == 0.0 && x <= MAX_SIZE as f64 => x as u64,
            Some((_, span)) => {
                let d = Diagnostic::error(format!("`{name}` must be a whole number ≥ 0"))
                    .label(span, "not a whole number ≥ 0");
                self.error(d);
                default
            }
            None => default,
        }
    }

    /// A list of whole numbers ≥ 1 in increasing order (`at: [30, 60]`).
    fn counts(&mut self, name: &str) -> Option<Vec<u64>> {
        let Some((v, span)) = self.find(name) else {
            let d = Diagnostic::error(format!("`{}` needs `{name}`", self.call.name))
                .label(self.call.span, format!("`{name}` missing"))
                .help(format!("write e.g. `{}({name}: [30, 60])`", self.call.name));
            self.error(d);
            return None;
        };
        let Value::List(items) = v else {
            let d = Diagnostic::error(format!("`{name}` is a list of epochs"))
                .label(span, "not a list")
                .help(format!("write e.g. `{name}: [30, 60]`"));
            self.error(d);
            return None;
        };
        let mut out = Vec::new();
        for (item, at) in items {
            match item {
                Value::Num(x) if x >= 1.0 && x.fract() == 0.0 && x <= MAX_SIZE as f64 => {
                    if out.last().is_some_and(|&l| l >= x as u64) {
                        let d = Diagnostic::error(format!("`{name}` must increase"))
                            .label(at, "not after the one before");
                        self.error(d);
                        return None;
                    }
                    out.push(x as u64);
                }
                _ => {
                    let d = Diagnostic::error(format!("each of `{name}` is a whole number ≥ 1"))
                        .label(at, "not a whole number ≥ 1");
                    self.error(d);
                    return None;
                }
            }
        }
        if out.is_empty() {
            let d = Diagnostic::error(format!("`{name}` is empty")).label(span, "no epochs");
            self.error(d);
            return None;
        }
        Some(out)
    }

    fn count_or(&mut self, name: &str, default: u64) -> u64 {
        if self.names.contains(&name)
            && self.call.args.iter().enumerate().any(|(i, a)| {
                a.name.as_ref().is_some_and(|n| n.name == name)
                    || (a.name.is_none() && self.names.get(i) == Some(&name))
            })
        {
            self.count(name).unwrap_or(default)
        } else {
            default
        }
    }

    fn boolean(&mut self, name: &str, default: bool) -> bool {
        match self.find(name) {
            Some((Value::Word(w), _)) if w == "true" => true,
            Some((Value::Word(w), _)) if w == "false" => false,
            Some((_, span)) => {
                let d = Diagnostic::error(format!("`{name}` must be `true` or `false`"))
                    .label(span, "not a boolean");
                self.error(d);
                default
            }
            None => default,
        }
    }

    /// One of `choices` written as a bare word; `None` (the first choice) when not given.
    fn word(&mut self, name: &str, choices: &[&str]) -> Option<String> {
        match self.find(name) {
            Some((Value::Word(w), _)) if choices.contains(&w.as_str()) => Some(w),
            Some((_, span)) => {
                let d = Diagnostic::error(format!("`{name}` is one of {}", choices.join(", ")))
                    .label(span, "not one of them");
                self.error(d);
                None
            }
            None => None,
        }
    }

    fn string(&mut self, name: &str) -> Option<String> {
        match self.find(name) {
            Some((Value::Str(s), _)) => Some(s),
            Some((_, span)) => {
                let d = Diagnostic::error(format!("`{name}` must be a quoted string"))
                    .label(span, "write it in double quotes");
                self.error(d);
                None
            }
            None => {
                let d = Diagnostic::error(format!("`{}` needs a file path", self.call.name))
                    .label(self.call.span, "path missing")
                    .help(format!("write e.g. `{}(\"data/x.{}\")`", self.call.name, self.call.name));
                self.error(d);
                None
            }
        }
    }

    /// Ends reading; `None` if any argument was wrong or left over.
    fn finish(mut self) -> Option<()> {
        for i in 0..self.call.args.len() {
            if !self.used[i] {
                let a = &self.call.args[i];
                let d = Diagnostic::error(format!("argument not used by `{}`", self.call.name))
                    .label(a.span, "not understood here")
                    .help(format!("its arguments are {}", self.names.join(", ")));
                self.error(d);
            }
        }
        (self.errors == 0).then_some(())
    }
}

/// A hyper-parameter that changes meaning when aec rounds it to the 32-bit float it computes
/// with: it overflows to infinity, rounds to 0, or (a fraction below 1) rounds to 1.
pub fn f32_problem(x: f64) -> Option<&'static str> {
    let y = x as f32;
    if !y.is_finite() {
        Some("is infinite as a 32-bit float (the largest is about 3.4e38)")
    } else if x != 0.0 && y == 0.0 {
        Some("rounds to 0 as a 32-bit float (the smallest is about 1.4e-45)")
    } else if x < 1.0 && y == 1.0 {
        Some("rounds to 1 as a 32-bit float")
    } else {
        None
    }
}

fn not_f32(name: &str, x: f64, span: Span) -> Diagnostic {
    let why = f32_problem(x).unwrap_or("is not a 32-bit float");
    Diagnostic::error(format!("`{name}` = {x} {why}"))
        .label(span, "out of f32's range")
        .help("aec trains in 32-bit floats: give a value they can hold")
}
