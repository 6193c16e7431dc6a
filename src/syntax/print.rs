//! Prints the AST back as `.ae` text (`aec compile --emit ast`). Printing then parsing gives
//! the same AST up to spans; the round trip is a test.

use super::ast::*;
use std::fmt::{self, Display, Formatter, Write};

impl Display for File {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.model)?;
        if let Some(t) = &self.train {
            write!(f, "\n{t}")?;
        }
        Ok(())
    }
}

impl Display for Model {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        writeln!(f, "model {} {{", self.name.name)?;
        for d in &self.inputs {
            writeln!(f, "    input {}: {}", d.name.name, d.ty)?;
        }
        for d in &self.targets {
            writeln!(f, "    target {}: {}", d.name.name, d.ty)?;
        }
        for d in &self.conditions {
            writeln!(f, "    condition {}: {}", d.name.name, d.ty)?;
        }
        if let Some(e) = &self.encoder {
            write_block(f, "encoder", e)?;
        }
        match &self.decoder {
            Some(Decoder::Layers(b)) => write_block(f, "decoder", b)?,
            Some(Decoder::Mirror { tied, skip, output, .. }) => {
                write!(f, "    decoder mirror{}", if *tied { " tied" } else { "" })?;
                if let Some(l) = skip {
                    write!(f, " skip {}", l.keyword())?;
                }
                if let Some(a) = output {
                    write!(f, " -> {}", a.kind)?;
                }
                writeln!(f)?;
            }
            None => {}
        }
        if let Some(l) = &self.loss {
            writeln!(f, "    loss {l}")?;
        }
        writeln!(f, "}}")
    }
}

fn write_block(f: &mut Formatter<'_>, name: &str, b: &Block) -> fmt::Result {
    writeln!(f, "    {name} {{")?;
    for l in &b.layers {
        writeln!(f, "        {l}")?;
    }
    writeln!(f, "    }}")
}

impl Display for TypeExpr {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        match self {
            TypeExpr::Tensor(dims) => write!(f, "{}", Dims(dims)),
            TypeExpr::Token { vocab } => write!(f, "token[{vocab}]"),
            TypeExpr::SeqTokens { len, vocab, padded } => {
                write!(f, "seq[{}{len}] of token[{vocab}]", if *padded { "<= " } else { "" })
            }
            TypeExpr::SeqTensor { len, dims } => write!(f, "seq[{len}] of {}", Dims(dims)),
        }
    }
}

/// `[1, 28, 28]`.
pub struct Dims<'a>(pub &'a [u64]);

impl Display for Dims<'_> {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        f.write_char('[')?;
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{d}")?;
        }
        f.write_char(']')
    }
}

impl Display for Layer {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.kind)?;
        for a in &self.activations {
            write!(f, " -> {}", a.kind)?;
        }
        if let Some(n) = &self.name {
            write!(f, " as {}", n.name)?;
        }
        Ok(())
    }
}

impl Display for LayerKind {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        let nobias = |b: bool| if b { "" } else { " nobias" };
        match self {
            LayerKind::Dense { units, bias, tied_to } => {
                write!(f, "dense {units}{}", nobias(*bias))?;
                tied(f, *tied_to)
            }
            LayerKind::Conv(c) => {
                let (k, s, p) = (ShowHw(c.kernel), ShowHw(c.stride), ShowHw(c.pad));
                write!(f, "conv {} k{k} s{s} p{p}{}", c.channels, nobias(c.bias))
            }
            LayerKind::Deconv(c) => {
                let (k, s, p) = (ShowHw(c.kernel), ShowHw(c.stride), ShowHw(c.pad));
                write!(f, "deconv {} k{k} s{s} p{p}", c.channels)?;
                if c.out_pad != [0, 0] {
                    write!(f, " op{}", ShowHw(c.out_pad))?;
                }
                write!(f, "{}", nobias(c.bias))?;
                tied(f, c.tied_to)
            }
            LayerKind::MaxPool(p) | LayerKind::AvgPool(p) => {
                let kw = if matches!(self, LayerKind::MaxPool(_)) { "maxpool" } else { "avgpool" };
                write!(f, "{kw} {} s{}", ShowHw(p.kernel), ShowHw(p.stride))?;
                if let Some(n) = &p.name {
                    write!(f, " as {}", n.name)?;
                }
                Ok(())
            }
            LayerKind::Unpool { pool } => write!(f, "unpool {}", pool.name),
            LayerKind::Flatten => f.write_str("flatten"),
            LayerKind::Reshape { dims } => write!(f, "reshape {}", Dims(dims)),
            LayerKind::Recurrent(r) => {
                write!(f, "{} {}", r.cell.keyword(), r.hidden)?;
                if r.return_seq {
                    f.write_str(" seq")?;
                }
                if r.teacher_forcing {
                    f.write_str(" teacher_forcing")?;
                }
                f.write_str(nobias(r.bias))
            }
            LayerKind::Embed { dim } => write!(f, "embed {dim}"),
            LayerKind::Dropout { p } => write!(f, "dropout {p}"),
            LayerKind::Gaussian { units } => write!(f, "gaussian {units}"),
            LayerKind::Quantize { size, ema: None } => write!(f, "quantize {size}"),
            LayerKind::Quantize { size, ema: Some(g) } => write!(f, "quantize(ema: {g}) {size}"),
            LayerKind::Activation(a) => write!(f, "{}", a.kind),
            LayerKind::Link { link, from } => write!(f, "{} {}", link.keyword(), from.name),
            LayerKind::BatchNorm { momentum, eps } => {
                f.write_str("batchnorm")?;
                if (*momentum, *eps) != (0.1, 1e-5) {
                    write!(f, "(momentum: {}, eps: {})", Num(*momentum), Num(*eps))?;
                }
                Ok(())
            }
            LayerKind::Attention { score } => write!(f, "attention {}", score.keyword()),
            LayerKind::Upsample { scale, bilinear } => {
                write!(f, "upsample {} {}", ShowHw(*scale), if *bilinear { "bilinear" } else { "nearest" })
            }
        }
    }
}

/// Tying is written by `decoder mirror tied` only; the printed form says it in a comment.
fn tied(f: &mut Formatter<'_>, to: Option<usize>) -> fmt::Result {
    match to {
        Some(i) => write!(f, " /* weight tied to encoder.{i}.weight */"),
        None => Ok(()),
    }
}

impl Display for ActKind {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        match self {
            ActKind::Relu => f.write_str("relu"),
            ActKind::Sigmoid => f.write_str("sigmoid"),
            ActKind::Tanh => f.write_str("tanh"),
            ActKind::Softmax => f.write_str("softmax"),
            ActKind::LeakyRelu(a) => write!(f, "leaky_relu({a})"),
            ActKind::Identity => f.write_str("identity"),
        }
    }
}

impl Display for Loss {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.main)?;
        for t in &self.extra {
            write!(f, " + {t}")?;
        }
        Ok(())
    }
}

impl Display for LossTerm {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        match &self.schedule {
            Some((s, _)) => write!(f, "{s} * ")?,
            None if self.weight != 1.0 => write!(f, "{} * ", Num(self.weight))?,
            None => {}
        }
        write!(f, "{}({}", self.kind.keyword(), self.arg.name)?;
        if let Some((rho, _)) = self.rho {
            write!(f, ", rho: {}", Num(rho))?;
        }
        if let Some((r, _)) = self.reduction {
            write!(f, ", reduction: {}", r.keyword())?;
        }
        f.write_str(")")
    }
}

impl Display for Train {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        writeln!(f, "train {{")?;
        for d in &self.data {
            match &d.binding {
                Some(b) => writeln!(f, "    data {}: {}", b.name, d.source)?,
                None => writeln!(f, "    data {}", d.source)?,
            }
        }
        if let Some(b) = self.batch {
            writeln!(f, "    batch {b}")?;
        }
        if let Some(e) = self.epochs {
            writeln!(f, "    epochs {e}")?;
        }
        if let Some(o) = &self.optimizer {
            writeln!(f, "    optimizer {o}")?;
        }
        if let Some(s) = self.seed {
            writeln!(f, "    seed {s}")?;
        }
        if let Some(v) = self.validation {
            writeln!(f, "    validation {v}")?;
        }
        if let Some(n) = &self.noise {
            match n {
                Noise::Gaussian { sigma } => writeln!(f, "    noise gaussian({sigma})")?,
                Noise::Mask { p } => writeln!(f, "    noise mask({p})")?,
                Noise::SaltPepper { p } => writeln!(f, "    noise salt_pepper({p})")?,
            }
        }
        if let Some(p) = &self.pretrain {
            writeln!(f, "    pretrain greedy(epochs: {}, freeze: {})", p.epochs, p.freeze)?;
        }
        if let Some((e, _)) = &self.early_stop {
            writeln!(f, "    early_stop(patience: {}, min_delta: {})", e.patience, Num(e.min_delta))?;
        }
        if let Some((s, _)) = &self.schedule {
            writeln!(f, "    schedule {s}")?;
        }
        match self.clip {
            Some(ClipRule::Norm(c)) => writeln!(f, "    clip norm({})", Num(c))?,
            Some(ClipRule::Value(c)) => writeln!(f, "    clip value({})", Num(c))?,
            None => {}
        }
        if let Some(i) = self.init {
            let name = match i {
                Init::Default => "default",
                Init::Xavier => "xavier",
                Init::He => "he",
            };
            writeln!(f, "    init {name}")?;
        }
        writeln!(f, "}}")
    }
}

impl Display for DataSource {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        let scaled = |f: &mut Formatter<'_>, kind: &str, path: &str, scale: f64| {
            if scale == 1.0 {
                write!(f, "{kind}({path:?})")
            } else {
                write!(f, "{kind}({path:?}, scale: {scale})")
            }
        };
        match self {
            DataSource::OneHot { n } => write!(f, "onehot({n})"),
            DataSource::Npy { path, scale } => scaled(f, "npy", path, *scale),
            DataSource::Csv { path, scale } => scaled(f, "csv", path, *scale),
            DataSource::Idx { path, scale } => scaled(f, "idx", path, *scale),
            DataSource::Patches { source, size, stride } => {
                write!(f, "patches({source}, size: {size}, stride: {stride})")
            }
            DataSource::SeqTask { task, len, vocab, count } => {
                let name = match task {
                    SeqTask::Copy => "copy",
                    SeqTask::Reverse => "reverse",
                };
                write!(f, "{name}(len: {len}, vocab: {vocab}, count: {count})")
            }
            DataSource::Translation { count } => write!(f, "translation(count: {count})"),
            DataSource::Text { path, tokens, min_count } => {
                write!(f, "text({path:?}, tokens: {}, min_count: {min_count})", tokens.keyword())
            }
            DataSource::Random { count } => write!(f, "random(count: {count})"),
            DataSource::Images { path, fit, scale } => {
                write!(f, "images({path:?}, fit: {}, scale: {})", fit.keyword(), Num(*scale))
            }
        }
    }
}

/// A number as a user would write it: `0.003`, `1e-8`.
struct Num(f64);

impl Display for Num {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        let x = self.0;
        if x != 0.0 && x.abs() < 1e-3 { write!(f, "{x:e}") } else { write!(f, "{x}") }
    }
}

impl Display for Optimizer {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        match self {
            Optimizer::Sgd { lr, momentum, nesterov, weight_decay } => write!(
                f,
                "sgd(lr: {}, momentum: {momentum}, nesterov: {nesterov}, weight_decay: {})",
                Num(*lr),
                Num(*weight_decay)
            ),
            Optimizer::Adam { lr, b1, b2, eps, weight_decay, decoupled } => write!(
                f,
                "{}(lr: {}, b1: {b1}, b2: {b2}, eps: {}, weight_decay: {})",
                if *decoupled { "adamw" } else { "adam" },
                Num(*lr),
                Num(*eps),
                Num(*weight_decay)
            ),
            Optimizer::RmsProp { lr, alpha, eps, weight_decay, momentum, centered } => write!(
                f,
                "rmsprop(lr: {}, alpha: {alpha}, eps: {}, weight_decay: {}, momentum: {momentum}, centered: {centered})",
                Num(*lr),
                Num(*eps),
                Num(*weight_decay)
            ),
        }
    }
}

impl Display for Schedule {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        let k = self.keyword();
        match self {
            Schedule::Step { every, gamma } => write!(f, "{k}(every: {every}, gamma: {gamma})"),
            Schedule::MultiStep { at, gamma } => {
                let at: Vec<String> = at.iter().map(u64::to_string).collect();
                write!(f, "{k}(at: [{}], gamma: {gamma})", at.join(", "))
            }
            Schedule::Exponential { gamma } => write!(f, "{k}(gamma: {gamma})"),
            Schedule::Cosine { t_max, min_lr, warmup } => {
                write!(f, "{k}(t_max: {t_max}, min_lr: {}, warmup: {warmup})", Num(*min_lr))
            }
            Schedule::OneCycle { max_lr, pct_start, div_factor, final_div_factor } => write!(
                f,
                "{k}(max_lr: {}, pct_start: {pct_start}, div_factor: {div_factor}, final_div_factor: {})",
                Num(*max_lr),
                Num(*final_div_factor)
            ),
            Schedule::Plateau { factor, patience, min_lr, threshold, cooldown } => write!(
                f,
                "{k}(factor: {factor}, patience: {patience}, min_lr: {}, threshold: {}, cooldown: {cooldown})",
                Num(*min_lr),
                Num(*threshold)
            ),
        }
    }
}

impl Display for TermSchedule {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        match self {
            TermSchedule::Linear { from, to, epochs } => {
                write!(f, "linear(from: {from}, to: {to}, epochs: {epochs})")
            }
            TermSchedule::Cyclical { from, to, epochs, cycles, ratio } => write!(
                f,
                "cyclical(from: {from}, to: {to}, epochs: {epochs}, cycles: {cycles}, ratio: {ratio})"
            ),
        }
    }
}
