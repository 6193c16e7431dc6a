//! Semantic analysis: from the AST to a checked [`Model`] and its forward [`ir::Graph`].
//!
//! - [`check`]: names (pools, inputs, targets), `decoder mirror`, shape inference with the
//!   fixed formulas (PyTorch's; the README's language section), kinds and ranges, the size
//!   limits, PyTorch parameter names. It returns the model *and* every diagnostic, so a file's
//!   errors come in one run; `check_data` adds the train block's data lines.
//! - [`lower`]: every layer broken into primitive IR ops for a given batch size.
//! - [`report`]: the per-layer table `aec compile` prints.
//!
//! Nothing here imports Cranelift or prints.

mod check;
pub mod lower;
mod report;
pub mod stage;
pub mod torch;

pub use lower::{Lowering, Mode};

use crate::diag::{Diagnostic, Span};
use crate::ir;
use crate::syntax::{self, ast};
use std::fmt;

/// Largest number of parameters a model may have: 2²⁸ (1 GiB as f32; training keeps about four
/// times that with gradients and Adam's moments).
pub const MAX_PARAMS: u64 = 1 << 28;
/// Largest number of elements one layer's output may have per sample: 2²⁸ (1 GiB as f32).
pub const MAX_ACTIVATION: u64 = 1 << 28;

/// The type of one sample at some point in the network (no batch dimension).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ty {
    /// A tensor: `[N]` vector, `[C, H, W]` image, ….
    Tensor(Vec<u64>),
    /// One token id in `0..vocab`.
    Token { vocab: u64 },
    /// A sequence of token ids.
    Tokens { len: u64, vocab: u64 },
    /// A sequence of feature vectors.
    Seq { len: u64, dim: u64 },
}

impl Ty {
    pub fn numel(&self) -> u64 {
        match self {
            Ty::Tensor(d) => d.iter().product(),
            Ty::Token { .. } => 1,
            Ty::Tokens { len, .. } => *len,
            Ty::Seq { len, dim } => len * dim,
        }
    }

    pub fn from_ast(t: &ast::TypeExpr) -> Ty {
        match t {
            ast::TypeExpr::Tensor(d) => Ty::Tensor(d.clone()),
            ast::TypeExpr::Token { vocab } => Ty::Token { vocab: *vocab },
            ast::TypeExpr::SeqTokens { len, vocab, .. } => Ty::Tokens { len: *len, vocab: *vocab },
            ast::TypeExpr::SeqTensor { len, dims } => Ty::Seq { len: *len, dim: dims.iter().product() },
        }
    }
}

impl fmt::Display for Ty {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Ty::Tensor(d) => write!(f, "{}", syntax::ast_dims(d)),
            Ty::Token { vocab } => write!(f, "token[{vocab}]"),
            Ty::Tokens { len, vocab } => write!(f, "seq[{len}] of token[{vocab}]"),
            Ty::Seq { len, dim } => write!(f, "seq[{len}] of [{dim}]"),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    Encoder,
    Decoder,
}

impl Part {
    pub fn prefix(self) -> &'static str {
        match self {
            Part::Encoder => "encoder",
            Part::Decoder => "decoder",
        }
    }
}

/// A checked layer: where it sits, what goes in and out, its parameters and its cost.
#[derive(Clone, Debug, PartialEq)]
pub struct LayerInfo {
    pub part: Part,
    /// The layer's index in its block, as in the parameter names.
    pub index: usize,
    pub layer: ast::Layer,
    pub input: Ty,
    pub output: Ty,
    /// Indices into `Model::params` of the parameters this layer owns.
    pub params: Vec<usize>,
    /// For a tied decoder layer: the encoder parameter whose weight it shares.
    pub tied_weight: Option<usize>,
    /// 2 × multiply-adds per sample.
    pub flops: u64,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ParamInfo {
    pub name: String,
    pub shape: Vec<u64>,
    pub role: ir::ParamRole,
    pub fan_in: u64,
    pub fan_out: u64,
}

impl ParamInfo {
    pub fn numel(&self) -> u64 {
        self.shape.iter().product()
    }
}

/// A declared input or target.
#[derive(Clone, Debug, PartialEq)]
pub struct Var {
    pub name: String,
    pub ty: Ty,
    pub span: Span,
    /// `seq[<= N]`: padded with id 0 after the end token (`data::text`).
    pub padded: bool,
}

/// The checked model: everything later stages need, nothing they would have to re-check.
#[derive(Clone, Debug, PartialEq)]
pub struct Model {
    pub name: String,
    pub inputs: Vec<Var>,
    pub targets: Vec<Var>,
    /// Conditions: a token (joined one-hot) or a vector, given with every sample.
    pub conditions: Vec<Var>,
    pub layers: Vec<LayerInfo>,
    pub params: Vec<ParamInfo>,
    pub loss: ast::Loss,
    /// The type of the encoder's output.
    pub code: Ty,
    /// The type of the decoder's output.
    pub output: Ty,
}

impl Model {
    pub fn encoder(&self) -> impl Iterator<Item = &LayerInfo> {
        self.layers.iter().filter(|l| l.part == Part::Encoder)
    }

    pub fn decoder(&self) -> impl Iterator<Item = &LayerInfo> {
        self.layers.iter().filter(|l| l.part == Part::Decoder)
    }

    pub fn param_count(&self) -> u64 {
        self.params.iter().map(ParamInfo::numel).sum()
    }

    /// Every declared variable: inputs, targets, then conditions (the graph's input order).
    pub fn variables(&self) -> impl Iterator<Item = &Var> {
        self.inputs.iter().chain(&self.targets).chain(&self.conditions)
    }

    /// The variable the main loss compares the output with.
    pub fn loss_target(&self) -> Option<&Var> {
        let name = &self.loss.main.arg.name;
        self.inputs.iter().chain(&self.targets).find(|v| &v.name == name)
    }

    /// The per-layer table printed by `aec compile`.
    pub fn table(&self, src: &str) -> String {
        report::table(self, src)
    }

    pub fn params_listing(&self) -> String {
        report::params(self)
    }
}

/// Options of a compilation.
#[derive(Clone, Debug, Default)]
pub struct Config {
    /// Batch size of the lowered graph; default: the train block's, else 1 (2 for a model that
    /// normalizes over features, which a batch of 1 cannot train).
    pub batch: Option<u64>,
}

/// A spec that passed every check.
#[derive(Clone, Debug)]
pub struct Compiled {
    /// The AST with `decoder mirror` written out.
    pub ast: ast::File,
    pub model: Model,
    /// The forward graph (training mode) at the configured batch size.
    pub forward: ir::Graph,
    pub batch: u64,
    /// Warnings (errors stop compilation).
    pub warnings: Vec<Diagnostic>,
}

/// The train block's `data` lines against the model: every bound name is an input or a target,
/// and a task whose target differs from its input (`reverse`, `translation`) has a target to
/// train on — without one the loss would compare the input with itself, a copy task.
fn check_data(m: &Model, t: &ast::Train, diags: &mut Vec<Diagnostic>) {
    if let (Some(_), Some(c)) = (t.pretrain, m.conditions.first()) {
        diags.push(
            Diagnostic::error(format!(
                "greedy pretraining trains each layer as an autoencoder of its input alone, and this \
                 model's layers also read the condition `{}`",
                c.name
            ))
            .label(t.span, "`pretrain` in this train block")
            .label(c.span, "the condition")
            .help("drop `pretrain`: a conditioned model trains end to end"),
        );
    }
    if let Some((_, span)) = t.early_stop
        && t.validation.unwrap_or(0.0) == 0.0
    {
        diags.push(
            Diagnostic::error("`early_stop` watches the validation loss, and this run holds out no samples")
                .label(span, "needs a validation split")
                .help("add e.g. `validation 0.1` to the train block"),
        );
    }
    if let Some((ast::Schedule::Plateau { .. }, span)) = &t.schedule
        && t.validation.unwrap_or(0.0) == 0.0
    {
        diags.push(
            Diagnostic::error("`plateau` follows the validation loss, and this run holds out no samples")
                .label(*span, "needs a validation split")
                .help("add e.g. `validation 0.1` to the train block"),
        );
    }
    if let (Some((ast::Schedule::OneCycle { .. }, span)), Some(o)) = (&t.schedule, &t.optimizer) {
        diags.push(
            Diagnostic::warning(format!(
                "`onecycle` sets every step's learning rate from its `max_lr`: the optimizer's lr ({}) is not used",
                o.lr()
            ))
            .label(*span, "sets the learning rate"),
        );
    }
    for b in &t.data {
        if let Some(name) = &b.binding
            && !m.variables().any(|v| v.name == name.name)
        {
            let names: Vec<&str> = m.variables().map(|v| v.name.as_str()).collect();
            diags.push(
                Diagnostic::error(format!(
                    "`{}` is not an input, target or condition of the model",
                    name.name
                ))
                .label(name.span, "unknown name")
                .help(format!("the model declares {}", names.join(", "))),
            );
        }
        if let ast::DataSource::Images { .. } = b.source {
            let var = match &b.binding {
                Some(name) => m.variables().find(|v| v.name == name.name),
                None => m.inputs.first(),
            };
            if let Some(v) = var
                && !matches!(&v.ty, Ty::Tensor(d) if d.len() == 3 && (d[0] == 1 || d[0] == 3))
            {
                diags.push(
                    Diagnostic::error(format!(
                        "`images` gives pictures of [channels, height, width], and `{}` is {}",
                        v.name, v.ty
                    ))
                    .label(b.span, "pictures")
                    .label(v.span, "declared here")
                    .help(format!("declare `{}: [3, 64, 64]` (RGB) or `[1, 64, 64]` (grey)", v.name)),
                );
            }
        }
        let distinct_target = matches!(
            b.source,
            ast::DataSource::SeqTask { task: ast::SeqTask::Reverse, .. }
                | ast::DataSource::Translation { .. }
        );
        if distinct_target && m.targets.is_empty() {
            let input = m.inputs.first().map_or("s".to_owned(), |v| v.name.clone());
            let ty = match b.source {
                ast::DataSource::SeqTask { len, vocab, .. } => format!("seq[{len}] of token[{vocab}]"),
                _ => "…".to_owned(),
            };
            diags.push(
                Diagnostic::error(format!(
                    "`{}` gives each sentence a target, but the model declares no `target`: the loss \
                     would compare `{input}` with itself and train a copy",
                    b.source
                ))
                .label(b.span, "its targets would be unused")
                .help(format!(
                    "declare `target t: {ty}` beside `input {input}` and write `loss cross_entropy(t)`"
                )),
            );
        }
    }
}

/// Parses, checks and lowers a spec. On failure, every diagnostic found.
pub fn compile(src: &str, config: &Config) -> Result<Compiled, Vec<Diagnostic>> {
    let (ast, mut diags) = syntax::parse(src);
    let Some(mut ast) = ast else {
        return Err(diags);
    };
    let model = check::check(&mut ast, &mut diags);
    if let (Some(m), Some(t)) = (&model, &ast.train) {
        check_data(m, t, &mut diags);
    }
    let errors = diags.iter().any(Diagnostic::is_error);
    let model = match model {
        Some(m) if !errors => m,
        _ => return Err(diags),
    };
    // Batch normalization over features in training needs two samples (PyTorch's rule): a
    // batch of 1 written is an error, and the batch left unsaid is 2 for such a model.
    let per_feature = model.layers.iter().find(|l| {
        matches!(l.layer.kind, ast::LayerKind::BatchNorm { .. })
            && matches!(&l.input, Ty::Tensor(d) if d.iter().skip(1).product::<u64>() == 1)
    });
    let batch = config
        .batch
        .or(ast.train.as_ref().and_then(|t| t.batch))
        .unwrap_or(if per_feature.is_some() { 2 } else { 1 });
    if let (1, Some(l)) = (batch, per_feature) {
        diags.push(
            Diagnostic::error(format!(
                "`{}` needs more than one value per feature in training, and a batch of 1 has one \
                 (PyTorch refuses it too)",
                l.layer
            ))
            .label(l.layer.span, "normalizes over the batch")
            .help("train with batches of at least 2 (`batch 2` or `--batch 2`)"),
        );
        return Err(diags);
    }
    let lowering = Lowering {
        batch,
        mode: Mode::Train,
        denoise: ast.train.as_ref().is_some_and(|t| t.noise.is_some()),
        shard_of: None,
    };
    match lower::lower(&model, &lowering) {
        Ok(forward) => Ok(Compiled { ast, model, forward, batch, warnings: diags }),
        Err(e) => {
            diags.push(Diagnostic::error(format!("internal compiler error while lowering: {e}")));
            Err(diags)
        }
    }
}
