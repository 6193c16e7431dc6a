//! The typed AST of a spec. Every node carries the byte span it came from.
//!
//! The AST says what the user wrote, already checked for vocabulary (a `conv` has a kernel
//! size, an optimizer is `sgd` or `adam`); it does not know shapes. `Display` prints it back as
//! `.ae` text, which is what `aec compile --emit ast` shows (with the decoder a `mirror` wrote).

use crate::diag::Span;

#[derive(Clone, Debug, PartialEq)]
pub struct File {
    pub model: Model,
    pub train: Option<Train>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Ident {
    pub name: String,
    pub span: Span,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Model {
    pub name: Ident,
    pub inputs: Vec<Decl>,
    pub targets: Vec<Decl>,
    /// `condition y: token[10]`: data given with every sample (training and generation alike)
    /// that layers join with `concat y` (a conditional VAE's label).
    pub conditions: Vec<Decl>,
    pub encoder: Option<Block>,
    pub decoder: Option<Decoder>,
    pub loss: Option<Loss>,
    pub span: Span,
}

/// `input x: [1, 28, 28]` or `target t: seq[9] of token[12]`.
#[derive(Clone, Debug, PartialEq)]
pub struct Decl {
    pub name: Ident,
    pub ty: TypeExpr,
    pub span: Span,
    /// The declaration had errors; checks that depend on its type are skipped.
    pub broken: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TypeExpr {
    /// A tensor of this shape per sample.
    Tensor(Vec<u64>),
    /// A token id in `0..vocab`.
    Token { vocab: u64 },
    /// `seq[len] of token[vocab]`; with `padded`, `seq[<= len]`: shorter sentences padded with
    /// id 0 after their end token (3), which losses and metrics leave out.
    SeqTokens { len: u64, vocab: u64, padded: bool },
    /// `seq[len] of [dims]`.
    SeqTensor { len: u64, dims: Vec<u64> },
}

#[derive(Clone, Debug, PartialEq)]
pub struct Block {
    pub layers: Vec<Layer>,
    pub span: Span,
    /// A layer could not be built (its error is reported); shape checks of this block and of
    /// what depends on it are skipped, so one slip does not cascade into false errors.
    pub incomplete: bool,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Decoder {
    Layers(Block),
    /// `decoder mirror [tied] [skip concat|add] [-> act]`: the compiler writes the decoder.
    Mirror {
        tied: bool,
        /// `skip concat` / `skip add`: each encoder stage is linked into the mirrored stage of
        /// the same resolution (a U-Net from its encoder).
        skip: Option<Link>,
        output: Option<Activation>,
        span: Span,
    },
}

/// How a link across the hourglass joins a named tensor to the current one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Link {
    /// Along channels (features), the current tensor first: `torch.cat([x, skip], 1)`.
    Concat,
    /// Elementwise sum (a residual link): the shapes must be equal.
    Add,
}

impl Link {
    pub fn keyword(self) -> &'static str {
        match self {
            Link::Concat => "concat",
            Link::Add => "add",
        }
    }
}

/// One layer line. `span` covers the whole line; `kind_span` the layer's name.
#[derive(Clone, Debug, PartialEq)]
pub struct Layer {
    pub kind: LayerKind,
    pub activations: Vec<Activation>,
    /// `as NAME`: the layer's output (after its activations) can be linked to later. A max
    /// pool's name is its `PoolSpec::name` (it names the switches too); see `Layer::output_name`.
    pub name: Option<Ident>,
    pub span: Span,
    pub kind_span: Span,
}

impl Layer {
    /// A layer without a name, as `decoder mirror` and greedy pretraining write them.
    pub fn new(kind: LayerKind, activations: Vec<Activation>, span: Span) -> Layer {
        Layer { kind, activations, name: None, span, kind_span: span }
    }

    /// The name this layer's output is known by, if any (`as NAME`, or a max pool's).
    pub fn output_name(&self) -> Option<&Ident> {
        match &self.kind {
            LayerKind::MaxPool(PoolSpec { name: Some(n), .. }) => Some(n),
            _ => self.name.as_ref(),
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum LayerKind {
    /// `tied_to`: for a mirrored, tied layer, the encoder layer whose weight it uses transposed.
    Dense {
        units: u64,
        bias: bool,
        tied_to: Option<usize>,
    },
    Conv(ConvSpec),
    Deconv(ConvSpec),
    MaxPool(PoolSpec),
    AvgPool(PoolSpec),
    Unpool {
        pool: Ident,
    },
    Flatten,
    Reshape {
        dims: Vec<u64>,
    },
    Recurrent(RecurrentSpec),
    Embed {
        dim: u64,
    },
    Dropout {
        p: f64,
    },
    /// A Gaussian code (a VAE's encoder ends in it): two affine heads, `mu` and `logvar`, and
    /// the code `mu + exp(logvar / 2)·ε` in training, `mu` otherwise.
    Gaussian {
        units: u64,
    },
    /// A quantized code (a VQ-VAE's encoder ends in it): a codebook of `size` vectors of the
    /// code's width (its channels, for a conv code: one vector per position), each vector
    /// replaced by its nearest, the gradient passed straight through to the encoder.
    Quantize {
        size: u64,
        /// `quantize(ema: γ) K`: the codebook follows exponential moving averages of the
        /// vectors each entry is picked for, with decay γ, instead of a loss.
        ema: Option<f64>,
    },
    /// An activation written on a line of its own (it counts as a layer, like `nn.ReLU()`).
    Activation(Activation),
    /// `concat NAME` / `add NAME`: joins the output of the layer named `from` to the current
    /// tensor.
    Link {
        link: Link,
        from: Ident,
    },
    /// Batch normalization over axis 1 (channels of an image, features of a vector), as
    /// PyTorch's `BatchNorm2d`/`BatchNorm1d` with affine weight and bias and running statistics.
    BatchNorm {
        momentum: f64,
        eps: f64,
    },
    /// `upsample S [nearest|bilinear]`: an image `[C, H, W]` to `[C, S·H, S·W]` (a factor per
    /// axis as `2x3`), as `nn.Upsample(scale_factor=S, mode=…)` with `align_corners=False`.
    Upsample {
        scale: Hw,
        bilinear: bool,
    },
    /// `attention [dot|general|additive]` after a teacher-forced decoder layer: global
    /// attention over the encoder's last recurrent layer's states — scores as `Score` says, a
    /// softmax over the source (its padding masked out), the context c = Σ α e, and
    /// tanh(W_c [c; h] + b_c) (Luong et al. 2015).
    Attention {
        score: Score,
    },
}

/// How attention scores a decoder state h against an encoder state e.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Score {
    /// h·e (Luong's `dot`).
    Dot,
    /// h·W e (Luong's `general`).
    General,
    /// vᵀ tanh(W_q h + W_k e) (Bahdanau et al. 2015's additive score, Luong's `concat`).
    Additive,
}

impl Score {
    pub fn keyword(self) -> &'static str {
        match self {
            Score::Dot => "dot",
            Score::General => "general",
            Score::Additive => "additive",
        }
    }

    /// How many of the layer's parameters the score has (they come before W_c and b_c).
    pub fn params(self) -> usize {
        match self {
            Score::Dot => 0,
            Score::General => 1,
            Score::Additive => 3,
        }
    }
}

/// Convolution and transposed convolution. Sizes are per axis, `[height, width]`, as PyTorch
/// allows (`k3x5`; `k3` is `[3, 3]`). `out_pad` is only meaningful for `deconv`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConvSpec {
    pub channels: u64,
    pub kernel: Hw,
    pub stride: Hw,
    pub pad: Hw,
    pub out_pad: Hw,
    pub bias: bool,
    /// For a mirrored, tied `deconv`: the encoder layer (index in its block) whose kernel it
    /// shares.
    pub tied_to: Option<usize>,
}

impl ConvSpec {
    /// The `deconv` that undoes this conv on an input `[channels, height, width]`: same kernel,
    /// stride and padding, back to the input's channels, and per axis the output padding that
    /// gives back its exact size — what the conv's floor dropped, `(in + 2p − k) mod s`, so
    /// always below the stride. Untied.
    pub fn mirror(&self, input: &[u64]) -> ConvSpec {
        let restore =
            |a: usize| (input[a + 1] + 2 * self.pad[a]).saturating_sub(self.kernel[a]) % self.stride[a];
        ConvSpec { channels: input[0], out_pad: [restore(0), restore(1)], tied_to: None, ..self.clone() }
    }
}

/// A size per axis, `[height, width]`.
pub type Hw = [u64; 2];

/// `3` for `[3, 3]`, `3x5` for `[3, 5]`: how a size is written after its letter.
pub struct ShowHw(pub Hw);

impl std::fmt::Display for ShowHw {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let [h, w] = self.0;
        if h == w { write!(f, "{h}") } else { write!(f, "{h}x{w}") }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct PoolSpec {
    /// `[height, width]`, as a convolution's sizes.
    pub kernel: Hw,
    pub stride: Hw,
    pub name: Option<Ident>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cell {
    Rnn,
    Gru,
    Lstm,
}

impl Cell {
    /// Gates per cell: the row blocks of `weight_ih_l0` (PyTorch's layout).
    pub fn gates(self) -> u64 {
        match self {
            Cell::Rnn => 1,
            Cell::Gru => 3,
            Cell::Lstm => 4,
        }
    }

    /// The size of the state one step passes on: h, or h and c for an LSTM.
    pub fn state(self, hidden: usize) -> usize {
        if self == Cell::Lstm { 2 * hidden } else { hidden }
    }

    pub fn keyword(self) -> &'static str {
        match self {
            Cell::Rnn => "rnn",
            Cell::Gru => "gru",
            Cell::Lstm => "lstm",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecurrentSpec {
    pub cell: Cell,
    pub hidden: u64,
    /// `seq`: return every step's hidden state instead of the last one.
    pub return_seq: bool,
    /// `teacher_forcing` (decoder only): start from the code, read the previous target token.
    pub teacher_forcing: bool,
    pub bias: bool,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ActKind {
    Relu,
    Sigmoid,
    Tanh,
    Softmax,
    LeakyRelu(f64),
    Identity,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Activation {
    pub kind: ActKind,
    pub span: Span,
}

/// `loss mse(x) + 1e-4 * l2(weights)`.
#[derive(Clone, Debug, PartialEq)]
pub struct Loss {
    pub main: LossTerm,
    pub extra: Vec<LossTerm>,
    pub span: Span,
}

#[derive(Clone, Debug, PartialEq)]
pub struct LossTerm {
    pub weight: f64,
    pub kind: LossKind,
    /// What the term is taken of: an input/target name, `weights` or `code`.
    pub arg: Ident,
    /// `reduction: …` as written (each kind has its default: `LossTerm::reduction`).
    pub reduction: Option<(Reduction, Span)>,
    /// A weight that moves during training (`linear(…) * kl(code)`); `weight` is then 1.
    pub schedule: Option<(TermSchedule, Span)>,
    /// `sparsity(code, rho: ρ)`: the target activation rate, as written.
    pub rho: Option<(f64, Span)>,
    /// `vq(code, beta: β)`: the commitment loss's weight, as written.
    pub beta: Option<(f64, Span)>,
    pub span: Span,
}

/// A loss term's weight as a function of the training step (KL warm-up and annealing). With
/// T = epochs × steps per epoch and t the steps taken before this one:
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum TermSchedule {
    /// from + (to − from)·min(1, t/T).
    Linear { from: f64, to: f64, epochs: u64 },
    /// Fu et al. 2019's cyclical annealing: T split into `cycles` periods of P steps; in each
    /// the weight rises linearly from `from` to `to` over the first `ratio`·P steps and stays
    /// at `to` for the rest. After T steps it stays at `to`.
    Cyclical { from: f64, to: f64, epochs: u64, cycles: u64, ratio: f64 },
}

impl TermSchedule {
    /// The weight before step `t` (0-based), with `steps` steps per epoch.
    pub fn at(&self, t: u64, steps: u64) -> f64 {
        match *self {
            TermSchedule::Linear { from, to, epochs } => {
                let total = (epochs * steps).max(1) as f64;
                from + (to - from) * (t as f64 / total).min(1.0)
            }
            TermSchedule::Cyclical { from, to, epochs, cycles, ratio } => {
                let total = epochs * steps;
                if t >= total {
                    return to;
                }
                let period = total as f64 / cycles as f64;
                let tau = (t as f64 % period) / period;
                from + (to - from) * (tau / ratio).min(1.0)
            }
        }
    }
}

impl LossTerm {
    /// The term's name in metrics and graph outputs: `kl`, `l2(weights)`, `mse(x)`, ….
    pub fn name(&self) -> String {
        match self.kind {
            LossKind::Kl => "kl".to_owned(),
            LossKind::Sparsity | LossKind::Contractive | LossKind::Vq => self.kind.keyword().to_owned(),
            _ => format!("{}({})", self.kind.keyword(), self.arg.name),
        }
    }

    /// `sparsity`'s target activation rate ρ (0.05 unless written).
    pub fn rho(&self) -> f64 {
        self.rho.map_or(0.05, |r| r.0)
    }

    /// `vq`'s commitment weight β (0.25 unless written, van den Oord et al.'s).
    pub fn beta(&self) -> f64 {
        self.beta.map_or(0.25, |b| b.0)
    }

    /// The reduction in effect: as written, else `batchmean` for `kl` and `contractive` and
    /// `mean` for the rest (`sparsity` is a sum over the code's units, as Ng's notes write it).
    pub fn reduction(&self) -> Reduction {
        match (self.reduction, self.kind) {
            (Some((r, _)), _) => r,
            (None, LossKind::Kl | LossKind::Contractive) => Reduction::BatchMean,
            (None, LossKind::Sparsity) => Reduction::Sum,
            (None, _) => Reduction::Mean,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LossKind {
    Mse,
    Bce,
    CrossEntropy,
    L1,
    L2,
    /// The KL divergence of a Gaussian code from N(0, I).
    Kl,
    /// Σ over the code's units of KL(ρ ‖ ρ̂ⱼ), ρ̂ⱼ the unit's mean activation over the batch
    /// (Ng's sparse autoencoder).
    Sparsity,
    /// The squared Frobenius norm of the encoder's Jacobian (Rifai et al. 2011's contractive
    /// autoencoder), in closed form for one dense sigmoid or tanh layer.
    Contractive,
    /// A quantized code's codebook loss ‖sg(z) − z_q‖² and commitment loss β‖z − sg(z_q)‖²,
    /// each the mean over the code's elements (van den Oord et al. 2017).
    Vq,
}

/// How a loss term reduces over its elements (PyTorch's `reduction`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reduction {
    /// Σ ÷ the number of elements (PyTorch's default; `batchmean` is `kl`'s).
    Mean,
    Sum,
    /// Σ ÷ the batch size.
    BatchMean,
}

impl Reduction {
    pub fn keyword(self) -> &'static str {
        match self {
            Reduction::Mean => "mean",
            Reduction::Sum => "sum",
            Reduction::BatchMean => "batchmean",
        }
    }
}

impl LossKind {
    pub fn keyword(self) -> &'static str {
        match self {
            LossKind::Mse => "mse",
            LossKind::Bce => "bce",
            LossKind::CrossEntropy => "cross_entropy",
            LossKind::L1 => "l1",
            LossKind::L2 => "l2",
            LossKind::Kl => "kl",
            LossKind::Sparsity => "sparsity",
            LossKind::Contractive => "contractive",
            LossKind::Vq => "vq",
        }
    }
}

/// The `train` block. Fields left out are `None`; the runtime supplies defaults.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Train {
    pub data: Vec<DataBinding>,
    pub batch: Option<u64>,
    pub epochs: Option<u64>,
    pub optimizer: Option<Optimizer>,
    pub seed: Option<u64>,
    pub validation: Option<f64>,
    /// Where `validation` is set (the default span when it is not).
    pub validation_span: Span,
    pub noise: Option<Noise>,
    pub pretrain: Option<Pretrain>,
    pub init: Option<Init>,
    /// `early_stop(patience: P, min_delta: D)`, with the field's span.
    pub early_stop: Option<(EarlyStop, Span)>,
    /// `schedule …`: how the learning rate moves, with the field's span.
    pub schedule: Option<(Schedule, Span)>,
    /// `clip norm(c)` or `clip value(c)`.
    pub clip: Option<ClipRule>,
    pub span: Span,
}

/// A learning-rate schedule, each as PyTorch's `torch.optim.lr_scheduler` of the same name.
/// Every one but `onecycle` moves once per epoch (PyTorch's `scheduler.step()` after each
/// epoch); `onecycle` moves every step, as `OneCycleLR` is meant to be stepped.
#[derive(Clone, Debug, PartialEq)]
pub enum Schedule {
    /// `StepLR`: lr·γ^⌊e / every⌋ in epoch e (from 0).
    Step { every: u64, gamma: f64 },
    /// `MultiStepLR`: lr·γ^(milestones ≤ e).
    MultiStep { at: Vec<u64>, gamma: f64 },
    /// `ExponentialLR`: lr·γ^e.
    Exponential { gamma: f64 },
    /// `CosineAnnealingLR` after `warmup` epochs of `LinearLR` rising from lr/(warmup+1) (as
    /// `SequentialLR` joins them): min_lr + (lr − min_lr)·(1 + cos(π·e′/t_max))/2, e′ counted
    /// from the end of the warm-up.
    Cosine { t_max: u64, min_lr: f64, warmup: u64 },
    /// `OneCycleLR` (cosine annealing, two phases, momentum not cycled) over the run's steps.
    OneCycle { max_lr: f64, pct_start: f64, div_factor: f64, final_div_factor: f64 },
    /// `ReduceLROnPlateau(mode="min", threshold_mode="rel")` on the validation loss.
    Plateau { factor: f64, patience: u64, min_lr: f64, threshold: f64, cooldown: u64 },
}

impl Schedule {
    pub fn keyword(&self) -> &'static str {
        match self {
            Schedule::Step { .. } => "step",
            Schedule::MultiStep { .. } => "multistep",
            Schedule::Exponential { .. } => "exponential",
            Schedule::Cosine { .. } => "cosine",
            Schedule::OneCycle { .. } => "onecycle",
            Schedule::Plateau { .. } => "plateau",
        }
    }
}

/// Gradient clipping before each update: PyTorch's `clip_grad_norm_` (the norm over all
/// parameters' gradients together) or `clip_grad_value_`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ClipRule {
    Norm(f64),
    Value(f64),
}

/// Stop when the validation loss has not improved by more than `min_delta` for `patience`
/// epochs in a row (Keras's `EarlyStopping(monitor="val_loss")`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EarlyStop {
    pub patience: u64,
    pub min_delta: f64,
}

/// How the `text` source cuts sentences into tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tokens {
    Word,
    Char,
}

impl Tokens {
    pub fn keyword(self) -> &'static str {
        match self {
            Tokens::Word => "word",
            Tokens::Char => "char",
        }
    }
}

/// `data npy("x.npy")` binds the model's (only) input; `data mask: npy("m.npy")` binds a name.
#[derive(Clone, Debug, PartialEq)]
pub struct DataBinding {
    pub binding: Option<Ident>,
    pub source: DataSource,
    pub span: Span,
}

#[derive(Clone, Debug, PartialEq)]
pub enum DataSource {
    OneHot {
        n: u64,
    },
    Npy {
        path: String,
        scale: f64,
    },
    Csv {
        path: String,
        scale: f64,
    },
    Idx {
        path: String,
        scale: f64,
    },
    /// Square patches cut from a [H, W] or [N, H, W] source with a stride.
    Patches {
        source: Box<DataSource>,
        size: u64,
        stride: u64,
    },
    /// A synthetic sequence task: `copy(len, vocab)`, `reverse(len, vocab)`.
    SeqTask {
        task: SeqTask,
        len: u64,
        vocab: u64,
        count: u64,
    },
    /// A text file of sentences, or of sentence pairs separated by a tab (`data::text`).
    Text {
        path: String,
        tokens: Tokens,
        min_count: u64,
    },
    /// The toy translation task: source and target languages with their own vocabularies.
    Translation {
        count: u64,
    },
    /// Uniform random values in [0, 1) of the input's shape, from the run's seed (benchmarks).
    Random {
        count: u64,
    },
    /// A folder of PNG and JPEG files, decoded to the input's `[C, H, W]` (`data::images`).
    Images {
        path: String,
        fit: ImageFit,
        scale: f64,
    },
}

/// How `images` brings a picture to the declared size: cover it and cut the centre, or scale
/// each axis.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageFit {
    Crop,
    Stretch,
}

impl ImageFit {
    pub fn keyword(self) -> &'static str {
        match self {
            ImageFit::Crop => "crop",
            ImageFit::Stretch => "stretch",
        }
    }
}

impl DataSource {
    /// Whether this source gives sentences with their targets (a copy, a reversal, a
    /// translation) rather than one array.
    pub fn is_sequence_task(&self) -> bool {
        matches!(self, DataSource::SeqTask { .. } | DataSource::Translation { .. } | DataSource::Text { .. })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SeqTask {
    Copy,
    Reverse,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Optimizer {
    Sgd {
        lr: f64,
        momentum: f64,
        nesterov: bool,
        weight_decay: f64,
    },
    /// `adam(…)`, or with `decoupled` `adamw(…)`: PyTorch's AdamW, the weight decay applied to
    /// the parameter (`p ← p·(1 − lr·wd)`) instead of added to the gradient.
    Adam {
        lr: f64,
        b1: f64,
        b2: f64,
        eps: f64,
        weight_decay: f64,
        decoupled: bool,
    },
    /// `rmsprop(…)`: PyTorch's RMSprop.
    RmsProp {
        lr: f64,
        alpha: f64,
        eps: f64,
        weight_decay: f64,
        momentum: f64,
        centered: bool,
    },
}

impl Optimizer {
    /// The learning rate as written.
    pub fn lr(&self) -> f64 {
        match self {
            Optimizer::Sgd { lr, .. } | Optimizer::Adam { lr, .. } | Optimizer::RmsProp { lr, .. } => *lr,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Noise {
    Gaussian { sigma: f64 },
    Mask { p: f64 },
    SaltPepper { p: f64 },
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Pretrain {
    pub epochs: u64,
    pub freeze: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Init {
    /// PyTorch's defaults: kaiming-uniform (a = √5) weights, U(±1/√fan_in) biases.
    Default,
    Xavier,
    He,
}
