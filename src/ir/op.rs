//! The closed set of primitive ops and their typing rules.
//!
//! Shapes are written batch first. `[B, C, H, W]` for images, `[B, F]` for vectors,
//! `[B, T, F]` for sequences. Convolution weights follow PyTorch: conv `[Cout, Cin, K, K]`,
//! transposed conv `[Cin, Cout, K, K]`.

use super::Cell;
use super::{DType, Graph, InputId, NodeId, ParamId, Type};

/// Elementwise functions of one argument. `LeakyRelu` holds its negative slope.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum UnaryFn {
    Relu,
    LeakyRelu(f32),
    Sigmoid,
    Tanh,
    Abs,
    Square,
    Neg,
    Exp,
    /// sign(x) ∈ {-1, 0, 1}.
    Sign,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BinaryFn {
    Add,
    Sub,
    Mul,
    Div,
}

/// Reconstruction losses, each the mean over all elements (PyTorch's `reduction='mean'`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LossFn {
    /// mean((p - t)²)
    Mse,
    /// mean(|p - t|)
    L1,
    /// -mean(t·log p + (1-t)·log(1-p)), each log clamped at -100 as PyTorch's `BCELoss`.
    Bce,
    /// Cross-entropy of logits `[N, V]` (or `[B, T, V]`) against i32 class ids, mean over ids:
    /// PyTorch's `CrossEntropyLoss` on the pre-softmax values. With `pad`, ids 0 are padding:
    /// left out, the mean taken over the others (`ignore_index=0`; over at least one).
    CrossEntropyLogits { pad: bool },
}

/// In-place optimizer updates of one parameter. Hyper-parameters are constants of the step,
/// except the learning rate, which the runtime sets before each step (a schedule moves it).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum OptimizerFn {
    /// PyTorch's SGD: g += wd·p; v = μ·v + g (v = g on the first step); p -= lr·(g + μ·v if
    /// nesterov else v). State: the velocity.
    Sgd { lr: f32, momentum: f32, nesterov: bool, weight_decay: f32 },
    /// PyTorch's Adam (L2 weight decay added to the gradient), or with `decoupled` AdamW (the
    /// parameter first scaled by `1 − lr·wd`, the gradient left as it is). State: m, v; `step`
    /// is the 1-based step count read from the runtime.
    Adam { lr: f32, b1: f32, b2: f32, eps: f32, weight_decay: f32, decoupled: bool },
    /// PyTorch's RMSprop: g += wd·p; s = α·s + (1−α)·g²; with `centered` a = lerp(a, g, 1−α)
    /// and d = √(s − a²) + ε, else d = √s + ε; with momentum b = μ·b + g/d, p -= lr·b, else
    /// p -= lr·g/d. State: s, then b (with momentum), then a (centered).
    RmsProp { lr: f32, alpha: f32, eps: f32, weight_decay: f32, momentum: f32, centered: bool },
    /// Moves a buffer toward a value: p -= rate·g (batch normalization's running estimates and
    /// its batch count). Not an optimizer: no schedule or clipping touches it, and it keeps no
    /// state.
    Running { rate: f32 },
}

impl OptimizerFn {
    /// The learning rate as written (a `Running` update's rate).
    pub fn lr(self) -> f32 {
        match self {
            OptimizerFn::Sgd { lr, .. } | OptimizerFn::Adam { lr, .. } | OptimizerFn::RmsProp { lr, .. } => {
                lr
            }
            OptimizerFn::Running { rate } => rate,
        }
    }

    /// How many buffers of a parameter's size the rule keeps.
    pub fn slot_count(self) -> usize {
        match self {
            OptimizerFn::Sgd { momentum, .. } => usize::from(momentum != 0.0),
            OptimizerFn::Adam { .. } => 2,
            OptimizerFn::RmsProp { momentum, centered, .. } => {
                1 + usize::from(momentum != 0.0) + usize::from(centered)
            }
            OptimizerFn::Running { .. } => 0,
        }
    }

    /// Whether the run's learning-rate schedule and gradient clipping apply (not to `Running`).
    pub fn is_optimizer(self) -> bool {
        !matches!(self, OptimizerFn::Running { .. })
    }
}

/// Gradient clipping before an update (PyTorch's `clip_grad_value_` and `clip_grad_norm_`).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub enum Clip {
    #[default]
    None,
    /// Each gradient element clamped to [−c, c].
    Value(f32),
    /// Every gradient scaled by min(1, c / (‖g‖ + 1e-6)), ‖g‖ the 2-norm over all the clipped
    /// updates' gradients together.
    Norm(f32),
}

#[derive(Clone, Debug, PartialEq)]
pub enum Op {
    Input(InputId),
    Param(ParamId),

    /// `a[M,K] · b[K,N]`, either side transposed first (`ta`, `tb`).
    MatMul {
        a: NodeId,
        b: NodeId,
        ta: bool,
        tb: bool,
    },
    /// A matmul per batch element: `a[B, M, K] · b[B, K, N]`, either side transposed first
    /// (attention's scores and context).
    BatchMatMul {
        a: NodeId,
        b: NodeId,
        ta: bool,
        tb: bool,
    },
    /// `x [B, T, S]` with `value` where the ids `[B, S]` are padding (0): attention's mask
    /// (`value` −∞) and its gradient (`value` 0).
    MaskFill {
        x: NodeId,
        ids: NodeId,
        value: f32,
    },
    /// `q [B, T, A] + k [B, S, A]` for every pair `(t, s)`: `[B, T, S, A]`, additive
    /// attention's scores before their tanh.
    AddPairs {
        q: NodeId,
        k: NodeId,
    },
    /// The sum of `x` over one of its axes, which disappears (`AddPairs`' gradients).
    SumAxis {
        x: NodeId,
        axis: usize,
    },
    /// `x + bias` along axis 1 (features or channels).
    BiasAdd {
        x: NodeId,
        bias: NodeId,
    },
    Unary {
        f: UnaryFn,
        x: NodeId,
    },
    /// The derivative of activation `f` times `dy`, written in terms of its output `y`.
    ActGrad {
        f: UnaryFn,
        y: NodeId,
        dy: NodeId,
    },
    /// Elementwise on two values of the same type.
    Binary {
        f: BinaryFn,
        a: NodeId,
        b: NodeId,
    },
    /// `c · x`.
    Scale {
        x: NodeId,
        c: f32,
    },
    /// Softmax along the last axis.
    Softmax {
        x: NodeId,
    },
    /// `y · (dy - Σ dy·y)` along the last axis.
    SoftmaxGrad {
        y: NodeId,
        dy: NodeId,
    },
    /// The same data with another shape (same element count).
    Reshape {
        x: NodeId,
        shape: Vec<usize>,
    },
    /// `x` itself, through which no gradient flows (PyTorch's `detach`): the straight-through
    /// estimator's `z + sg(z_q − z)`.
    StopGrad {
        x: NodeId,
    },
    /// `[B, M, N] → [B, N, M]`: each batch element's matrix transposed (a conv code's
    /// channels to the last axis and back, for its quantizer).
    Transpose {
        x: NodeId,
    },
    /// The nearest codebook row to each vector of `x [.., D]`: i32 ids `[..]` into
    /// `codebook [K, D]` by squared Euclidean distance Σ_d (x_d − e_d)², summed in order of d,
    /// the first on ties (`argmin`) — a VQ-VAE's quantizer.
    Nearest {
        x: NodeId,
        codebook: NodeId,
    },
    /// Σ of all elements: a scalar.
    SumAll {
        x: NodeId,
    },
    /// Σ over every axis but axis 1: the gradient of a bias.
    SumToAxis1 {
        x: NodeId,
    },

    // Convolutions: sizes per axis, `[height, width]`, as PyTorch's.
    /// 2-D convolution, NCHW, the kernel's size taken from `w`.
    Conv2d {
        x: NodeId,
        w: NodeId,
        stride: [usize; 2],
        pad: [usize; 2],
    },
    /// Transposed convolution: every input pixel scatters `pixel · kernel` (no flip).
    ConvTranspose2d {
        x: NodeId,
        w: NodeId,
        stride: [usize; 2],
        pad: [usize; 2],
        out_pad: [usize; 2],
    },
    /// ∂loss/∂w of `Conv2d` from its input `x` and output gradient `dy`.
    Conv2dWeightGrad {
        x: NodeId,
        dy: NodeId,
        kernel: [usize; 2],
        stride: [usize; 2],
        pad: [usize; 2],
    },
    /// ∂loss/∂w of `ConvTranspose2d` from its input `x` and output gradient `dy`.
    ConvTranspose2dWeightGrad {
        x: NodeId,
        dy: NodeId,
        kernel: [usize; 2],
        stride: [usize; 2],
        pad: [usize; 2],
    },
    /// The switches of a max pool: for each window the flat index `h·W + w` of its maximum in
    /// the input plane (first maximum on ties).
    PoolArgmax {
        x: NodeId,
        /// `[height, width]`, as the pools' sizes below.
        kernel: [usize; 2],
        stride: [usize; 2],
    },
    /// `out[b,c,i] = x[b,c, idx[b,c,i]]`: the pooled values through their switches.
    Gather {
        x: NodeId,
        idx: NodeId,
    },
    /// Zeros of `[B, C, H, W]` with `v[b,c,i]` written at `idx[b,c,i]` (unpool), or added there
    /// when `accumulate` (the gradient of `Gather`). When overlapping pool windows give two
    /// values one switch, the write keeps the last (PyTorch's CPU order) and the gradient
    /// gathers for both (PyTorch's `max_unpool2d` backward).
    Scatter {
        v: NodeId,
        idx: NodeId,
        height: usize,
        width: usize,
        accumulate: bool,
    },
    AvgPool {
        x: NodeId,
        kernel: [usize; 2],
        stride: [usize; 2],
    },

    // Convolutions of a switch map: `Scatter` of `v` at switches `idx` that never repeat
    // (pools with stride ≥ kernel), a plane that is zero but at one place per window. Made by
    // `passes::sparse` from the dense ops, they skip the zeros; stride 1. With `c` the map's
    // channel and `e` the dense side's, the kernel `K[c][e][i][j]` is the weight `w[c][e][i][j]`
    // — or, with `flip`, `w[e][c][K-1-i][K-1-j]` (`switch_weight`): a conv2d weight, for the
    // same ops with conv2d and conv_transpose2d exchanged. A tap `(i, j)` of switch
    // `s = (r, c)` is the dense position `(r + i - pad, c + j - pad)`; those outside the dense
    // plane are zero (or dropped, when written).
    /// `out[b, e, tap (i, j) of s] += v · K[c][e][i][j]` for every switch: `conv_transpose2d`
    /// of the map (`pad` its padding), or with `flip` `conv2d` (padding `K - 1 - pad`).
    SparseConvT {
        v: NodeId,
        idx: NodeId,
        w: NodeId,
        height: usize,
        width: usize,
        pad: usize,
        flip: bool,
    },
    /// `out[b,c,q] = Σ K[c][e][i][j] · x[b, e, tap (i, j) of idx[b,c,q]]`: `conv2d(x, w, pad)`
    /// — or with `flip` `conv_transpose2d(x, w, K - 1 - pad)` — gathered at the switches.
    GatherConv {
        x: NodeId,
        w: NodeId,
        idx: NodeId,
        pad: usize,
        flip: bool,
    },
    /// `K[c, e, i, j] = Σ v[b,c,q] · d[b, e, tap (i, j) of idx[b,c,q]]`, the switches in a
    /// `height × width` plane, stored as the weight: conv2d's weight gradient with a switch-map
    /// output gradient (`d` the input), the transposed convolution's with a switch-map input
    /// (`d` the output gradient), or with `flip` conv2d's with a switch-map input.
    SparseWeightGrad {
        v: NodeId,
        idx: NodeId,
        d: NodeId,
        kernel: usize,
        pad: usize,
        height: usize,
        width: usize,
        flip: bool,
    },
    /// The gradient of `AvgPool` back onto an input of `height × width`.
    AvgPoolGrad {
        dy: NodeId,
        kernel: [usize; 2],
        stride: [usize; 2],
        height: usize,
        width: usize,
    },

    /// Rows of `table[V, N]` picked by i32 ids `[B, T]`: `[B, T, N]`.
    Embed {
        table: NodeId,
        ids: NodeId,
    },
    /// The gradient of `Embed` on the table: `[V, N]` with each `dy` row added at its id.
    EmbedGrad {
        ids: NodeId,
        dy: NodeId,
        vocab: usize,
    },
    /// `one_hot(ids, D) · wᵀ` without the one-hot (`passes::onehot`): column `ids[r]` of
    /// `w [N, D]` for each of the R ids, `[R, N]`.
    GatherColumns {
        w: NodeId,
        ids: NodeId,
    },
    /// `dyᵀ · one_hot(ids, depth)` without the one-hot: `[N, depth]`, each row `r` of
    /// `dy [R, N]` added into column `ids[r]`.
    ScatterColumns {
        dy: NodeId,
        ids: NodeId,
        depth: usize,
    },
    /// One-hot f32 vectors of i32 ids: `[B, T] → [B, T, depth]`.
    OneHot {
        ids: NodeId,
        depth: usize,
    },
    /// Teacher forcing's decoder input: `[B, T]` ids shifted right one step, `start` first.
    ShiftRight {
        ids: NodeId,
        start: i32,
    },
    /// A recurrent layer's time loop: `xp [B, T, G·H]`, the input projection `x·W_ihᵀ + b_ih`
    /// of every step (a matmul before the loop), initial state `h0 [B, S]` → every step's
    /// state `[B, T, S]`, where S = H (rnn, gru) or 2H (lstm: h then c). Per step the loop
    /// adds `h·W_hhᵀ + b_hh` and applies the cell (PyTorch's gate order: gru r,z,n; lstm
    /// i,f,g,o). `w_hh [G·H, H]`, `b_hh [G·H]` as PyTorch.
    Recurrent {
        cell: Cell,
        xp: NodeId,
        h0: NodeId,
        w_hh: NodeId,
        b_hh: Option<NodeId>,
    },
    /// Backpropagation through time of `Recurrent`: from what each step saved of its gates
    /// (`gh`, from `GateSaves`: every activation the gradient reads, so not the projections
    /// `xp`, which the planner can free after the forward), the previous states `hprev`
    /// `[B, T, S]` and the states' gradient `dhs [B, T, S]`, a flat buffer holding the
    /// gradient of `xp`, then (gru only: r and z share it, n does not) of `gh`, then of the
    /// initial state — see [`recurrent_grad_layout`]; `Part` views pick them out.
    RecurrentGrad {
        cell: Cell,
        gh: NodeId,
        hprev: NodeId,
        dhs: NodeId,
        w_hh: NodeId,
    },
    /// What each step of recurrent node `rec` keeps for the backward, `[B, T, V·H]` with V
    /// [`Cell::saves`]: an RNN's tanh; a GRU's r and z, n's hidden projection `h_{t-1}·W_hhᵀ
    /// + b_hh` and n; an LSTM's i, f, g, o and tanh c. The native forward loop saves them as
    /// it runs, so the backward computes no activation again; the interpreter recomputes
    /// them from `rec`'s states.
    GateSaves {
        rec: NodeId,
    },
    /// The state before each step: `first [B, S]` at step 0, then `x [B, T, S]` shifted one
    /// step later.
    PrevStates {
        x: NodeId,
        first: NodeId,
    },
    /// Elements `offset..offset + Π shape` of `x`, seen as `shape` (no copy natively).
    Part {
        x: NodeId,
        offset: usize,
        shape: Vec<usize>,
    },
    /// `[B, T, F] → [B, F]`: the last step.
    LastStep {
        x: NodeId,
    },
    /// `[B, T, F] → [B, F]`: each sample's last real step, the one before its padding (ids
    /// `[B, T]` equal to 0) — the final state of PyTorch's packed sequences.
    LastReal {
        x: NodeId,
        ids: NodeId,
    },
    /// The gradient of `LastReal`: `dy [B, F]` at each sample's last real step of `[B, T, F]`,
    /// zeros elsewhere.
    LastRealGrad {
        dy: NodeId,
        ids: NodeId,
    },
    /// `[B, F] → [B, T, F]`: the same vector at every step.
    Repeat {
        x: NodeId,
        times: usize,
    },
    /// Features `start..start+len` of the last axis.
    SliceLast {
        x: NodeId,
        start: usize,
        len: usize,
    },
    /// The gradient of `SliceLast`: `x` at features `start..` of a last axis of `total`,
    /// zeros elsewhere.
    PadLast {
        x: NodeId,
        start: usize,
        total: usize,
    },
    /// `[B, T, F] → [B, F]`: the sum over steps (the gradient of `Repeat`).
    SumSteps {
        x: NodeId,
    },
    /// A constant: every element `value` (zeros for an initial state, 1 to seed a gradient).
    Fill {
        value: f32,
        shape: Vec<usize>,
    },
    /// Draws from N(0, 1), one per element: Box–Muller over two draws of the counter-based
    /// generator of (run seed, step, `salt`, element index) — `interp::normal`, the same
    /// numbers on every backend (a VAE's ε).
    Normal {
        shape: Vec<usize>,
        salt: u32,
    },
    /// A scalar copied to every element of `shape` (the gradient of `SumAll`).
    BroadcastScalar {
        x: NodeId,
        shape: Vec<usize>,
    },

    /// Inverted dropout: `x · mask / (1-p)`, the mask drawn from a counter-based generator of
    /// (run seed, step, `salt`, element index), so every backend draws the same mask.
    Dropout {
        x: NodeId,
        p: f32,
        salt: u32,
    },
    /// The gradient of `Dropout`: the same mask applied to `dy`.
    DropoutGrad {
        dy: NodeId,
        p: f32,
        salt: u32,
    },

    /// A scalar loss between a prediction and its target.
    Loss {
        f: LossFn,
        pred: NodeId,
        target: NodeId,
    },
    /// `dy · ∂(mean loss)/∂pred`, `dy` the scalar gradient arriving at the loss.
    LossGrad {
        f: LossFn,
        pred: NodeId,
        target: NodeId,
        dy: NodeId,
    },

    // Links across the hourglass, batch normalization and upsampling. Axis 1 is the channel
    // axis of an image `[B, C, H, W]` and the feature axis of a vector `[B, F]`.
    /// `a` and `b` joined along axis 1 (`torch.cat([a, b], 1)`).
    Concat {
        a: NodeId,
        b: NodeId,
    },
    /// Channels `start..start + len` of axis 1 (the gradient of `Concat`).
    SliceChannels {
        x: NodeId,
        start: usize,
        len: usize,
    },
    /// Per channel of axis 1, over every other axis: `[2, C]`, the mean then the biased
    /// variance (`Σ (x − mean)² / n`), computed in two passes as PyTorch's CPU kernel.
    BnStats {
        x: NodeId,
    },
    /// Batch normalization in training: `(x − mean)/√(var + eps)·γ + β`, per channel of axis 1,
    /// with `stats` the batch's `BnStats`.
    BatchNorm {
        x: NodeId,
        stats: NodeId,
        gamma: NodeId,
        beta: NodeId,
        eps: f32,
    },
    /// `[2, C]`: per channel `(Σ dy·x̂, Σ dy)` with `x̂ = (x − mean)/√(var + eps)`: the
    /// gradients of `BatchNorm`'s γ and β, and what its input gradient needs.
    BnSums {
        x: NodeId,
        stats: NodeId,
        dy: NodeId,
        eps: f32,
    },
    /// The input gradient of `BatchNorm`: `γ/√(var + eps)·(dy − Σdy/n − x̂·Σ(dy·x̂)/n)`, `sums`
    /// the `BnSums` and `n` the elements per channel.
    BnGrad {
        x: NodeId,
        stats: NodeId,
        gamma: NodeId,
        dy: NodeId,
        sums: NodeId,
        eps: f32,
    },
    /// `[2, C]`: the scale `γ/√(var + eps)` and shift `β − mean·scale` that batch
    /// normalization with fixed statistics (the running ones, in evaluation) applies.
    BnCoeffs {
        mean: NodeId,
        var: NodeId,
        gamma: NodeId,
        beta: NodeId,
        eps: f32,
    },
    /// `x · scale[c] (+ shift[c])` with `c` the index along `axis` and `coeffs [2, C]` (scale,
    /// shift): batch normalization in evaluation (axis 1), and its folding into a
    /// convolution's weight (axis 0, or 1 for a transposed one; no shift) and bias (axis 0).
    ChannelAffine {
        x: NodeId,
        coeffs: NodeId,
        axis: usize,
        shift: bool,
    },
    /// A transposed convolution's weight `[A, B, KH, KW]` as the convolution weight that computes
    /// the same stride-1 map: `[B, A, KH, KW]`, each kernel turned 180°.
    FlipKernel {
        w: NodeId,
    },
    /// `[B, C, H, W] → [B, C, sh·H, sw·W]`, `nn.Upsample(scale_factor=(sh, sw))` in `nearest`
    /// or `bilinear` mode with `align_corners=False`.
    Upsample {
        x: NodeId,
        scale: [usize; 2],
        bilinear: bool,
    },
    /// The gradient of `Upsample` back onto its `height × width` input.
    UpsampleGrad {
        dy: NodeId,
        scale: [usize; 2],
        bilinear: bool,
    },

    /// Updates parameter `param` in place from its gradient (and the optimizer state the
    /// runtime keeps for it). Produces nothing: its type is an empty f32 scalar marker.
    Update {
        f: OptimizerFn,
        clip: Clip,
        param: ParamId,
        grad: NodeId,
    },
}

impl Op {
    /// Operands in order.
    pub fn operands(&self) -> Vec<NodeId> {
        use Op::*;
        match self {
            Input(_) | Param(_) | Fill { .. } | Normal { .. } => vec![],
            MatMul { a, b, .. } | Binary { a, b, .. } => vec![*a, *b],
            BiasAdd { x, bias } => vec![*x, *bias],
            ActGrad { y, dy, .. } | SoftmaxGrad { y, dy } => vec![*y, *dy],
            Unary { x, .. }
            | Scale { x, .. }
            | Softmax { x }
            | Reshape { x, .. }
            | StopGrad { x }
            | Transpose { x }
            | SumAll { x }
            | SumToAxis1 { x }
            | PoolArgmax { x, .. }
            | AvgPool { x, .. }
            | LastStep { x }
            | Repeat { x, .. }
            | SliceLast { x, .. }
            | PadLast { x, .. }
            | SumSteps { x }
            | Part { x, .. }
            | BroadcastScalar { x, .. }
            | Dropout { x, .. } => vec![*x],
            Nearest { x, codebook } => vec![*x, *codebook],
            Conv2d { x, w, .. } | ConvTranspose2d { x, w, .. } => vec![*x, *w],
            Conv2dWeightGrad { x, dy, .. } | ConvTranspose2dWeightGrad { x, dy, .. } => {
                vec![*x, *dy]
            }
            Gather { x, idx } => vec![*x, *idx],
            Scatter { v, idx, .. } => vec![*v, *idx],
            SparseConvT { v, idx, w, .. } => vec![*v, *idx, *w],
            GatherConv { x, w, idx, .. } => vec![*x, *w, *idx],
            SparseWeightGrad { v, idx, d, .. } => vec![*v, *idx, *d],
            AvgPoolGrad { dy, .. } | DropoutGrad { dy, .. } => vec![*dy],
            Embed { table, ids } => vec![*table, *ids],
            EmbedGrad { ids, dy, .. } => vec![*ids, *dy],
            GatherColumns { w, ids } => vec![*w, *ids],
            ScatterColumns { dy, ids, .. } => vec![*dy, *ids],
            OneHot { ids, .. } | ShiftRight { ids, .. } => vec![*ids],
            Recurrent { xp, h0, w_hh, b_hh, .. } => {
                let mut v = vec![*xp, *h0, *w_hh];
                v.extend(b_hh.iter().copied());
                v
            }
            RecurrentGrad { gh, hprev, dhs, w_hh, .. } => vec![*gh, *hprev, *dhs, *w_hh],
            PrevStates { x, first } => vec![*x, *first],
            GateSaves { rec } => vec![*rec],
            Loss { pred, target, .. } => vec![*pred, *target],
            LossGrad { pred, target, dy, .. } => vec![*pred, *target, *dy],
            Update { grad, .. } => vec![*grad],
            Concat { a, b } => vec![*a, *b],
            BatchMatMul { a, b, .. } => vec![*a, *b],
            AddPairs { q, k } => vec![*q, *k],
            SumAxis { x, .. } => vec![*x],
            MaskFill { x, ids, .. } | LastReal { x, ids } => vec![*x, *ids],
            LastRealGrad { dy, ids } => vec![*dy, *ids],
            SliceChannels { x, .. } | BnStats { x } | Upsample { x, .. } => vec![*x],
            FlipKernel { w } => vec![*w],
            UpsampleGrad { dy, .. } => vec![*dy],
            BatchNorm { x, stats, gamma, beta, .. } => vec![*x, *stats, *gamma, *beta],
            BnSums { x, stats, dy, .. } => vec![*x, *stats, *dy],
            BnGrad { x, stats, gamma, dy, sums, .. } => vec![*x, *stats, *gamma, *dy, *sums],
            BnCoeffs { mean, var, gamma, beta, .. } => vec![*mean, *var, *gamma, *beta],
            ChannelAffine { x, coeffs, .. } => vec![*x, *coeffs],
        }
    }

    /// Rewrites every operand through `f`.
    pub fn map_operands(&mut self, mut f: impl FnMut(NodeId) -> NodeId) {
        use Op::*;
        match self {
            Input(_) | Param(_) | Fill { .. } | Normal { .. } => {}
            MatMul { a, b, .. } | Binary { a, b, .. } => {
                *a = f(*a);
                *b = f(*b);
            }
            BiasAdd { x, bias } => {
                *x = f(*x);
                *bias = f(*bias);
            }
            ActGrad { y, dy, .. } | SoftmaxGrad { y, dy } => {
                *y = f(*y);
                *dy = f(*dy);
            }
            Unary { x, .. }
            | Scale { x, .. }
            | Softmax { x }
            | Reshape { x, .. }
            | StopGrad { x }
            | Transpose { x }
            | SumAll { x }
            | SumToAxis1 { x }
            | PoolArgmax { x, .. }
            | AvgPool { x, .. }
            | LastStep { x }
            | Repeat { x, .. }
            | SliceLast { x, .. }
            | PadLast { x, .. }
            | SumSteps { x }
            | Part { x, .. }
            | BroadcastScalar { x, .. }
            | Dropout { x, .. } => *x = f(*x),
            Nearest { x, codebook } => {
                *x = f(*x);
                *codebook = f(*codebook);
            }
            Conv2d { x, w, .. } | ConvTranspose2d { x, w, .. } => {
                *x = f(*x);
                *w = f(*w);
            }
            Conv2dWeightGrad { x, dy, .. } | ConvTranspose2dWeightGrad { x, dy, .. } => {
                *x = f(*x);
                *dy = f(*dy);
            }
            Gather { x, idx } => {
                *x = f(*x);
                *idx = f(*idx);
            }
            Scatter { v, idx, .. } => {
                *v = f(*v);
                *idx = f(*idx);
            }
            SparseConvT { v, idx, w, .. } => {
                for o in [v, idx, w] {
                    *o = f(*o);
                }
            }
            GatherConv { x, w, idx, .. } => {
                for o in [x, w, idx] {
                    *o = f(*o);
                }
            }
            SparseWeightGrad { v, idx, d, .. } => {
                for o in [v, idx, d] {
                    *o = f(*o);
                }
            }
            AvgPoolGrad { dy, .. } | DropoutGrad { dy, .. } => *dy = f(*dy),
            Embed { table, ids } => {
                *table = f(*table);
                *ids = f(*ids);
            }
            EmbedGrad { ids, dy, .. } | ScatterColumns { ids, dy, .. } => {
                *ids = f(*ids);
                *dy = f(*dy);
            }
            GatherColumns { w, ids } => {
                *w = f(*w);
                *ids = f(*ids);
            }
            BatchMatMul { a, b, .. } => {
                *a = f(*a);
                *b = f(*b);
            }
            AddPairs { q, k } => {
                *q = f(*q);
                *k = f(*k);
            }
            SumAxis { x, .. } => *x = f(*x),
            MaskFill { x, ids, .. } | LastReal { x, ids } => {
                *x = f(*x);
                *ids = f(*ids);
            }
            LastRealGrad { dy, ids } => {
                *dy = f(*dy);
                *ids = f(*ids);
            }
            OneHot { ids, .. } | ShiftRight { ids, .. } => *ids = f(*ids),
            Recurrent { xp, h0, w_hh, b_hh, .. } => {
                *xp = f(*xp);
                *h0 = f(*h0);
                *w_hh = f(*w_hh);
                if let Some(b) = b_hh {
                    *b = f(*b);
                }
            }
            RecurrentGrad { gh, hprev, dhs, w_hh, .. } => {
                for v in [gh, hprev, dhs, w_hh] {
                    *v = f(*v);
                }
            }
            PrevStates { x, first } => {
                *x = f(*x);
                *first = f(*first);
            }
            GateSaves { rec } => *rec = f(*rec),
            Loss { pred, target, .. } => {
                *pred = f(*pred);
                *target = f(*target);
            }
            LossGrad { pred, target, dy, .. } => {
                *pred = f(*pred);
                *target = f(*target);
                *dy = f(*dy);
            }
            Update { grad, .. } => *grad = f(*grad),
            Concat { a, b } => {
                *a = f(*a);
                *b = f(*b);
            }
            SliceChannels { x, .. } | BnStats { x } | Upsample { x, .. } => *x = f(*x),
            FlipKernel { w } => *w = f(*w),
            UpsampleGrad { dy, .. } => *dy = f(*dy),
            BatchNorm { x, stats, gamma, beta, .. } => {
                for o in [x, stats, gamma, beta] {
                    *o = f(*o);
                }
            }
            BnSums { x, stats, dy, .. } => {
                for o in [x, stats, dy] {
                    *o = f(*o);
                }
            }
            BnGrad { x, stats, gamma, dy, sums, .. } => {
                for o in [x, stats, gamma, dy, sums] {
                    *o = f(*o);
                }
            }
            BnCoeffs { mean, var, gamma, beta, .. } => {
                for o in [mean, var, gamma, beta] {
                    *o = f(*o);
                }
            }
            ChannelAffine { x, coeffs, .. } => {
                *x = f(*x);
                *coeffs = f(*coeffs);
            }
        }
    }

    /// The op's name in the IR text.
    pub fn mnemonic(&self) -> &'static str {
        use Op::*;
        match self {
            Input(_) => "input",
            Param(_) => "param",
            MatMul { .. } => "matmul",
            BiasAdd { .. } => "bias_add",
            Unary { f, .. } => f.name(),
            ActGrad { .. } => "act_grad",
            Binary { f: BinaryFn::Add, .. } => "add",
            Binary { f: BinaryFn::Sub, .. } => "sub",
            Binary { f: BinaryFn::Mul, .. } => "mul",
            Binary { f: BinaryFn::Div, .. } => "div",
            Scale { .. } => "scale",
            Softmax { .. } => "softmax",
            SoftmaxGrad { .. } => "softmax_grad",
            Reshape { .. } => "reshape",
            StopGrad { .. } => "stop_grad",
            Transpose { .. } => "transpose",
            Nearest { .. } => "nearest",
            SumAll { .. } => "sum_all",
            SumToAxis1 { .. } => "sum_to_axis1",
            Conv2d { .. } => "conv2d",
            ConvTranspose2d { .. } => "conv_transpose2d",
            Conv2dWeightGrad { .. } => "conv2d_weight_grad",
            ConvTranspose2dWeightGrad { .. } => "conv_transpose2d_weight_grad",
            PoolArgmax { .. } => "pool_argmax",
            Gather { .. } => "gather",
            Scatter { accumulate: false, .. } => "scatter",
            Scatter { accumulate: true, .. } => "scatter_add",
            AvgPool { .. } => "avgpool",
            SparseConvT { .. } => "sparse_conv_transpose2d",
            GatherConv { .. } => "gather_conv2d",
            SparseWeightGrad { .. } => "sparse_weight_grad",
            AvgPoolGrad { .. } => "avgpool_grad",
            Embed { .. } => "embed",
            EmbedGrad { .. } => "embed_grad",
            GatherColumns { .. } => "gather_columns",
            BatchMatMul { .. } => "batch_matmul",
            AddPairs { .. } => "add_pairs",
            SumAxis { .. } => "sum_axis",
            MaskFill { .. } => "mask_fill",
            LastReal { .. } => "last_real",
            LastRealGrad { .. } => "last_real_grad",
            ScatterColumns { .. } => "scatter_columns",
            OneHot { .. } => "one_hot",
            ShiftRight { .. } => "shift_right",
            Recurrent { .. } => "recurrent",
            LastStep { .. } => "last_step",
            Repeat { .. } => "repeat",
            SliceLast { .. } => "slice_last",
            RecurrentGrad { .. } => "recurrent_grad",
            PrevStates { .. } => "prev_states",
            GateSaves { .. } => "gate_saves",
            Part { .. } => "part",
            PadLast { .. } => "pad_last",
            SumSteps { .. } => "sum_steps",
            Fill { .. } => "fill",
            Normal { .. } => "normal",
            BroadcastScalar { .. } => "broadcast",
            Dropout { .. } => "dropout",
            DropoutGrad { .. } => "dropout_grad",
            Loss { .. } => "loss",
            LossGrad { .. } => "loss_grad",
            Update { .. } => "update",
            Concat { .. } => "concat",
            SliceChannels { .. } => "slice_channels",
            BnStats { .. } => "bn_stats",
            BatchNorm { .. } => "batch_norm",
            BnSums { .. } => "bn_sums",
            BnGrad { .. } => "bn_grad",
            BnCoeffs { .. } => "bn_coeffs",
            ChannelAffine { .. } => "channel_affine",
            FlipKernel { .. } => "flip_kernel",
            Upsample { bilinear: false, .. } => "upsample_nearest",
            Upsample { bilinear: true, .. } => "upsample_bilinear",
            UpsampleGrad { bilinear: false, .. } => "upsample_nearest_grad",
            UpsampleGrad { bilinear: true, .. } => "upsample_bilinear_grad",
        }
    }

    /// The type this op produces from its operands' types, or why it is ill-typed.
    pub fn infer(&self, g: &Graph) -> Result<Type, String> {
        use Op::*;
        let n = g.len();
        for o in self.operands() {
            if o.index() >= n {
                return Err(format!("operand %{} is not defined before this node", o.0));
            }
        }
        let ty = |id: NodeId| g.ty(id);
        let f32s = |id: NodeId| -> Result<&Vec<usize>, String> {
            let t = ty(id);
            if t.dtype != DType::F32 {
                return Err(format!("operand %{} must be f32, is {t}", id.0));
            }
            Ok(&t.shape)
        };
        let i32s = |id: NodeId| -> Result<&Vec<usize>, String> {
            let t = ty(id);
            if t.dtype != DType::I32 {
                return Err(format!("operand %{} must be i32, is {t}", id.0));
            }
            Ok(&t.shape)
        };
        let same = |a: NodeId, b: NodeId| -> Result<Type, String> {
            let (ta, tb) = (ty(a), ty(b));
            if ta != tb {
                return Err(format!("operands differ: {ta} and {tb}"));
            }
            Ok(ta.clone())
        };
        Ok(match self {
            Input(i) => g
                .inputs
                .get(i.index())
                .map(|d| d.ty.clone())
                .ok_or_else(|| format!("input {} does not exist", i.0))?,
            Param(p) => g
                .params
                .get(p.index())
                .map(|d| Type::f32(d.shape.clone()))
                .ok_or_else(|| format!("parameter {} does not exist", p.0))?,
            MatMul { a, b, ta, tb } => {
                let (sa, sb) = (f32s(*a)?, f32s(*b)?);
                let [m0, k0] = two(sa)?;
                let [k1, n1] = two(sb)?;
                let (m, ka) = if *ta { (k0, m0) } else { (m0, k0) };
                let (kb, nn) = if *tb { (n1, k1) } else { (k1, n1) };
                if ka != kb {
                    return Err(format!("matmul inner sizes differ: {ka} and {kb}"));
                }
                Type::f32([m, nn])
            }
            BiasAdd { x, bias } => {
                let (sx, sb) = (f32s(*x)?, f32s(*bias)?);
                if sx.len() < 2 || sb.as_slice() != [sx[1]] {
                    return Err(format!("bias {sb:?} does not match axis 1 of {sx:?}"));
                }
                Type::f32(sx.clone())
            }
            Unary { x, .. } | Scale { x, .. } | Softmax { x } => Type::f32(f32s(*x)?.clone()),
            ActGrad { y, dy, .. } | SoftmaxGrad { y, dy } => {
                f32s(*y)?;
                same(*y, *dy)?
            }
            Binary { a, b, .. } => {
                f32s(*a)?;
                same(*a, *b)?
            }
            Reshape { x, shape } => {
                let t = ty(*x);
                if t.numel() != shape.iter().product::<usize>() {
                    return Err(format!("cannot reshape {t} to {shape:?}"));
                }
                Type { dtype: t.dtype, shape: shape.clone() }
            }
            StopGrad { x } => Type::f32(f32s(*x)?.clone()),
            Transpose { x } => {
                let [b, m, n] = three(f32s(*x)?)?;
                Type::f32([b, n, m])
            }
            Nearest { x, codebook } => {
                let (sx, sc) = (f32s(*x)?, f32s(*codebook)?);
                let [k, d] = two(sc)?;
                if k == 0 || sx.last() != Some(&d) {
                    return Err(format!("nearest: vectors {sx:?} do not match codebook [{k}, {d}]"));
                }
                Type::i32(sx[..sx.len() - 1].to_vec())
            }
            SumAll { x } => {
                f32s(*x)?;
                Type::scalar()
            }
            SumToAxis1 { x } => {
                let s = f32s(*x)?;
                if s.len() < 2 {
                    return Err("sum_to_axis1 needs rank ≥ 2".into());
                }
                Type::f32([s[1]])
            }
            Conv2d { x, w, stride, pad } => {
                let [b, c, h, wd] = four(f32s(*x)?)?;
                let [co, ci, kh, kw] = four(f32s(*w)?)?;
                if ci != c {
                    return Err(format!("conv2d weight [{co},{ci},{kh},{kw}] vs {c} channels"));
                }
                let oh = conv_out(h, kh, stride[0], pad[0])?;
                let ow = conv_out(wd, kw, stride[1], pad[1])?;
                Type::f32([b, co, oh, ow])
            }
            ConvTranspose2d { x, w, stride, pad, out_pad } => {
                let [b, c, h, wd] = four(f32s(*x)?)?;
                let [ci, co, kh, kw] = four(f32s(*w)?)?;
                if ci != c {
                    return Err(format!("conv_transpose2d weight [{ci},{co},{kh},{kw}] vs {c}"));
                }
                let oh = deconv_out(h, kh, stride[0], pad[0], out_pad[0])?;
                let ow = deconv_out(wd, kw, stride[1], pad[1], out_pad[1])?;
                Type::f32([b, co, oh, ow])
            }
            Conv2dWeightGrad { x, dy, kernel, stride, pad } => {
                let [_, ci, h, w] = four(f32s(*x)?)?;
                let [_, co, oh, ow] = four(f32s(*dy)?)?;
                if conv_out(h, kernel[0], stride[0], pad[0])? != oh
                    || conv_out(w, kernel[1], stride[1], pad[1])? != ow
                {
                    return Err("conv2d_weight_grad: dy does not match x".into());
                }
                Type::f32([co, ci, kernel[0], kernel[1]])
            }
            ConvTranspose2dWeightGrad { x, dy, kernel, .. } => {
                let [_, ci, _, _] = four(f32s(*x)?)?;
                let [_, co, _, _] = four(f32s(*dy)?)?;
                Type::f32([ci, co, kernel[0], kernel[1]])
            }
            PoolArgmax { x, kernel, stride } | AvgPool { x, kernel, stride } => {
                let [b, c, h, w] = four(f32s(*x)?)?;
                let oh = conv_out(h, kernel[0], stride[0], 0)?;
                let ow = conv_out(w, kernel[1], stride[1], 0)?;
                let shape = [b, c, oh, ow];
                if matches!(self, PoolArgmax { .. }) { Type::i32(shape) } else { Type::f32(shape) }
            }
            Gather { x, idx } => {
                let [b, c, _, _] = four(f32s(*x)?)?;
                let [ib, ic, oh, ow] = four(i32s(*idx)?)?;
                if (ib, ic) != (b, c) {
                    return Err("gather: switches do not match the input's batch and channels".into());
                }
                Type::f32([b, c, oh, ow])
            }
            Scatter { v, idx, height, width, .. } => {
                let sv = f32s(*v)?;
                let si = i32s(*idx)?;
                if sv != si {
                    return Err(format!("scatter: values {sv:?} and switches {si:?} differ"));
                }
                let [b, c, _, _] = four(sv)?;
                Type::f32([b, c, *height, *width])
            }
            SparseConvT { v, idx, w, height, width, pad, flip } => {
                let sv = f32s(*v)?;
                if sv != i32s(*idx)? {
                    return Err("sparse_conv_transpose2d: values and switches differ".into());
                }
                let [b, c, _, _] = four(sv)?;
                let ws = four(f32s(*w)?)?;
                let (ci, co) = if *flip { (ws[1], ws[0]) } else { (ws[0], ws[1]) };
                let k = ws[2];
                if ci != c || k != ws[3] {
                    return Err(format!("sparse_conv_transpose2d weight {ws:?} vs {c} channels"));
                }
                Type::f32([b, co, deconv_out(*height, k, 1, *pad, 0)?, deconv_out(*width, k, 1, *pad, 0)?])
            }
            GatherConv { x, w, idx, flip, .. } => {
                let [b, e, _, _] = four(f32s(*x)?)?;
                let ws = four(f32s(*w)?)?;
                let (co, ci) = if *flip { (ws[1], ws[0]) } else { (ws[0], ws[1]) };
                let si = four(i32s(*idx)?)?;
                if ci != e || ws[2] != ws[3] || si[0] != b || si[1] != co {
                    return Err(format!("gather_conv2d: weight {ws:?} vs {e} channels"));
                }
                Type::f32(si)
            }
            SparseWeightGrad { v, idx, d, kernel, flip, .. } => {
                let sv = f32s(*v)?;
                if sv != i32s(*idx)? {
                    return Err("sparse_weight_grad: values and switches differ".into());
                }
                let [b, c, _, _] = four(sv)?;
                let [bd, e, _, _] = four(f32s(*d)?)?;
                if bd != b {
                    return Err("sparse_weight_grad: batch sizes differ".into());
                }
                if *flip { Type::f32([e, c, *kernel, *kernel]) } else { Type::f32([c, e, *kernel, *kernel]) }
            }
            AvgPoolGrad { dy, kernel, stride, height, width } => {
                let [b, c, oh, ow] = four(f32s(*dy)?)?;
                if conv_out(*height, kernel[0], stride[0], 0)? != oh
                    || conv_out(*width, kernel[1], stride[1], 0)? != ow
                {
                    return Err("avgpool_grad: sizes do not match".into());
                }
                Type::f32([b, c, *height, *width])
            }
            Embed { table, ids } => {
                let [_, d] = two(f32s(*table)?)?;
                let mut s = i32s(*ids)?.clone();
                s.push(d);
                Type::f32(s)
            }
            EmbedGrad { ids, dy, vocab } => {
                let si = i32s(*ids)?;
                let sd = f32s(*dy)?;
                if sd.len() != si.len() + 1 || sd[..si.len()] != si[..] {
                    return Err("embed_grad: dy does not match ids".into());
                }
                Type::f32([*vocab, sd[si.len()]])
            }
            OneHot { ids, depth } => {
                let mut s = i32s(*ids)?.clone();
                s.push(*depth);
                Type::f32(s)
            }
            BatchMatMul { a, b, ta, tb } => {
                let [ba, r0, c0] = three(f32s(*a)?)?;
                let [bb, r1, c1] = three(f32s(*b)?)?;
                let (m, k) = if *ta { (c0, r0) } else { (r0, c0) };
                let (k2, n) = if *tb { (c1, r1) } else { (r1, c1) };
                if ba != bb || k != k2 {
                    return Err(format!("batch_matmul: {:?} by {:?}", f32s(*a)?, f32s(*b)?));
                }
                Type::f32([ba, m, n])
            }
            AddPairs { q, k } => {
                let [b, t, a] = three(f32s(*q)?)?;
                let [b2, s, a2] = three(f32s(*k)?)?;
                if b != b2 || a != a2 {
                    return Err(format!("add_pairs: {:?} and {:?}", f32s(*q)?, f32s(*k)?));
                }
                Type::f32([b, t, s, a])
            }
            SumAxis { x, axis } => {
                let mut s = f32s(*x)?.clone();
                if *axis >= s.len() {
                    return Err(format!("sum_axis: no axis {axis} in {s:?}"));
                }
                s.remove(*axis);
                Type::f32(s)
            }
            MaskFill { x, ids, .. } => {
                let [b, _, s] = three(f32s(*x)?)?;
                if i32s(*ids)?.as_slice() != [b, s] {
                    return Err("mask_fill: the ids are not [B, S] of the scores".into());
                }
                Type::f32(f32s(*x)?.clone())
            }
            GatherColumns { w, ids } => {
                let [n, _] = two(f32s(*w)?)?;
                Type::f32([i32s(*ids)?.iter().product::<usize>(), n])
            }
            ScatterColumns { dy, ids, depth } => {
                let [r, n] = two(f32s(*dy)?)?;
                if i32s(*ids)?.iter().product::<usize>() != r {
                    return Err("scatter_columns: dy's rows differ from the ids".into());
                }
                Type::f32([n, *depth])
            }
            ShiftRight { ids, .. } => {
                let s = i32s(*ids)?;
                if s.len() != 2 {
                    return Err("shift_right needs [B, T] ids".into());
                }
                Type::i32(s.clone())
            }
            Recurrent { cell, xp, h0, w_hh, b_hh } => {
                let [b, t, gh] = three(f32s(*xp)?)?;
                let [gh2, h] = two(f32s(*w_hh)?)?;
                if gh != cell.gates() as usize * h || gh2 != gh {
                    return Err(format!("recurrent: projections of {gh} do not fit hidden size {h}"));
                }
                if let Some(bias) = b_hh
                    && f32s(*bias)?.as_slice() != [gh]
                {
                    return Err("recurrent bias has the wrong size".into());
                }
                let s = cell.state(h);
                if f32s(*h0)?.as_slice() != [b, s] {
                    return Err(format!("initial state must be [{b},{s}]"));
                }
                Type::f32([b, t, s])
            }
            RecurrentGrad { cell, gh, hprev, dhs, w_hh } => {
                let [g_, h] = two(f32s(*w_hh)?)?;
                let [b, t, _] = three(f32s(*dhs)?)?;
                let s = cell.state(h);
                if g_ != cell.gates() as usize * h {
                    return Err("recurrent_grad: w_hh must be [G·H, H]".into());
                }
                if f32s(*gh)?.as_slice() != [b, t, cell.saves() * h] {
                    return Err("recurrent_grad: gh is not the gate saves of the states".into());
                }
                for x in [hprev, dhs] {
                    if f32s(*x)?.as_slice() != [b, t, s] {
                        return Err(format!("recurrent_grad: states must be [{b},{t},{s}]"));
                    }
                }
                Type::f32([recurrent_grad_layout(*cell, b, t, h).total])
            }
            PrevStates { x, first } => {
                let [b, _, s] = three(f32s(*x)?)?;
                if f32s(*first)?.as_slice() != [b, s] {
                    return Err(format!("prev_states: the first state must be [{b},{s}]"));
                }
                Type::f32(f32s(*x)?.clone())
            }
            GateSaves { rec } => match g.node(*rec).op {
                Recurrent { cell, xp, .. } => {
                    let [b, t, gh] = three(f32s(xp)?)?;
                    Type::f32(vec![b, t, gh / cell.gates() as usize * cell.saves()])
                }
                _ => return Err("gate_saves of a node that is not recurrent".into()),
            },
            Part { x, offset, shape } => {
                let n = f32s(*x)?.iter().product::<usize>();
                if offset + shape.iter().product::<usize>() > n {
                    return Err("part out of range".into());
                }
                Type::f32(shape.clone())
            }
            PadLast { x, start, total } => {
                let mut s = f32s(*x)?.clone();
                let last = s.last_mut().ok_or("pad_last of a scalar")?;
                if *start + *last > *total {
                    return Err("pad_last out of range".into());
                }
                *last = *total;
                Type::f32(s)
            }
            SumSteps { x } => {
                let [b, _, f] = three(f32s(*x)?)?;
                Type::f32([b, f])
            }
            LastStep { x } => {
                let [b, _, f] = three(f32s(*x)?)?;
                Type::f32([b, f])
            }
            LastReal { x, ids } => {
                let [b, t, f] = three(f32s(*x)?)?;
                if i32s(*ids)?.as_slice() != [b, t] {
                    return Err("last_real: the ids are not [B, T] of the steps".into());
                }
                Type::f32([b, f])
            }
            LastRealGrad { dy, ids } => {
                let [b, f] = two(f32s(*dy)?)?;
                let [bi, t] = two(i32s(*ids)?)?;
                if bi != b {
                    return Err("last_real_grad: batch sizes differ".into());
                }
                Type::f32([b, t, f])
            }
            Repeat { x, times } => {
                let [b, f] = two(f32s(*x)?)?;
                Type::f32([b, *times, f])
            }
            SliceLast { x, start, len } => {
                let mut s = f32s(*x)?.clone();
                let last = s.last_mut().ok_or("slice_last of a scalar")?;
                if start + len > *last {
                    return Err("slice_last out of range".into());
                }
                *last = *len;
                Type::f32(s)
            }
            Fill { shape, .. } | Normal { shape, .. } => Type::f32(shape.clone()),
            BroadcastScalar { x, shape } => {
                if !f32s(*x)?.is_empty() {
                    return Err("broadcast of a non-scalar".into());
                }
                Type::f32(shape.clone())
            }
            Dropout { x, .. } => Type::f32(f32s(*x)?.clone()),
            DropoutGrad { dy, .. } => Type::f32(f32s(*dy)?.clone()),
            Loss { f, pred, target } | LossGrad { f, pred, target, .. } => {
                if let LossGrad { dy, .. } = self
                    && !f32s(*dy)?.is_empty()
                {
                    return Err("loss_grad: dy must be a scalar".into());
                }
                let sp = f32s(*pred)?;
                if let LossFn::CrossEntropyLogits { .. } = f {
                    let st = i32s(*target)?;
                    if sp.len() != st.len() + 1 || sp[..st.len()] != st[..] {
                        return Err(format!("cross-entropy: logits {sp:?} vs ids {st:?}"));
                    }
                } else {
                    same(*pred, *target)?;
                }
                if matches!(self, Loss { .. }) { Type::scalar() } else { Type::f32(sp.clone()) }
            }
            Concat { a, b } => {
                let (sa, sb) = (f32s(*a)?, f32s(*b)?);
                if sa.len() < 2 || sa.len() != sb.len() || sa[0] != sb[0] || sa[2..] != sb[2..] {
                    return Err(format!("concat: {sa:?} and {sb:?} differ beyond axis 1"));
                }
                let mut s = sa.clone();
                s[1] += sb[1];
                Type::f32(s)
            }
            SliceChannels { x, start, len } => {
                let mut s = f32s(*x)?.clone();
                if s.len() < 2 || start + len > s[1] || *len == 0 {
                    return Err("slice_channels out of range".into());
                }
                s[1] = *len;
                Type::f32(s)
            }
            BnStats { x } => {
                let s = f32s(*x)?;
                if s.len() < 2 {
                    return Err("bn_stats needs rank ≥ 2".into());
                }
                Type::f32([2, s[1]])
            }
            BatchNorm { x, stats, gamma, beta, .. } => {
                let c = channels(f32s(*x)?)?;
                for (what, v, want) in
                    [("stats", stats, vec![2, c]), ("γ", gamma, vec![c]), ("β", beta, vec![c])]
                {
                    if *f32s(*v)? != want {
                        return Err(format!("batch_norm: {what} must be {want:?}"));
                    }
                }
                Type::f32(f32s(*x)?.clone())
            }
            BnSums { x, stats, dy, .. } => {
                let c = channels(f32s(*x)?)?;
                if f32s(*dy)? != f32s(*x)? || *f32s(*stats)? != [2, c] {
                    return Err("bn_sums: operands do not match".into());
                }
                Type::f32([2, c])
            }
            BnGrad { x, stats, gamma, dy, sums, .. } => {
                let c = channels(f32s(*x)?)?;
                if f32s(*dy)? != f32s(*x)?
                    || *f32s(*stats)? != [2, c]
                    || *f32s(*sums)? != [2, c]
                    || *f32s(*gamma)? != [c]
                {
                    return Err("bn_grad: operands do not match".into());
                }
                Type::f32(f32s(*x)?.clone())
            }
            BnCoeffs { mean, var, gamma, beta, .. } => {
                let s = f32s(*mean)?;
                if s.len() != 1 || [var, gamma, beta].into_iter().any(|o| f32s(*o).ok() != Some(s)) {
                    return Err("bn_coeffs: operands must be equal vectors".into());
                }
                Type::f32([2, s[0]])
            }
            ChannelAffine { x, coeffs, axis, .. } => {
                let s = f32s(*x)?;
                let c = *s.get(*axis).ok_or("channel_affine: axis out of range")?;
                if *f32s(*coeffs)? != [2, c] {
                    return Err(format!("channel_affine: coefficients must be [2, {c}]"));
                }
                Type::f32(s.clone())
            }
            FlipKernel { w } => {
                let [a, b, kh, kw] = four(f32s(*w)?)?;
                Type::f32([b, a, kh, kw])
            }
            Upsample { x, scale, .. } => {
                let [b, c, h, w] = four(f32s(*x)?)?;
                if scale.contains(&0) {
                    return Err("upsample by 0".into());
                }
                Type::f32([b, c, h * scale[0], w * scale[1]])
            }
            UpsampleGrad { dy, scale, .. } => {
                let [b, c, h, w] = four(f32s(*dy)?)?;
                if scale.contains(&0) || h % scale[0] != 0 || w % scale[1] != 0 {
                    return Err("upsample_grad: sizes are not multiples of the scale".into());
                }
                Type::f32([b, c, h / scale[0], w / scale[1]])
            }
            Update { param, grad, .. } => {
                let p = g.params.get(param.index()).ok_or("update of a missing parameter")?;
                if f32s(*grad)? != &p.shape {
                    return Err(format!("update: gradient shape differs from {}", p.name));
                }
                Type::f32([0])
            }
        })
    }
}

impl UnaryFn {
    pub fn name(self) -> &'static str {
        match self {
            UnaryFn::Relu => "relu",
            UnaryFn::LeakyRelu(_) => "leaky_relu",
            UnaryFn::Sigmoid => "sigmoid",
            UnaryFn::Tanh => "tanh",
            UnaryFn::Abs => "abs",
            UnaryFn::Square => "square",
            UnaryFn::Neg => "neg",
            UnaryFn::Exp => "exp",
            UnaryFn::Sign => "sign",
        }
    }
}

impl LossFn {
    pub fn name(self) -> &'static str {
        match self {
            LossFn::Mse => "mse",
            LossFn::L1 => "l1",
            LossFn::Bce => "bce",
            LossFn::CrossEntropyLogits { pad: false } => "cross_entropy_logits",
            LossFn::CrossEntropyLogits { pad: true } => "cross_entropy_logits_pad0",
        }
    }
}

/// PyTorch's convolution output size, `floor((in + 2p - k) / s) + 1`.
pub fn conv_out(input: usize, k: usize, s: usize, p: usize) -> Result<usize, String> {
    let padded = input + 2 * p;
    if s == 0 || k == 0 || k > padded {
        return Err(format!("kernel {k} does not fit input {input} with padding {p}"));
    }
    Ok((padded - k) / s + 1)
}

/// PyTorch's transposed-convolution output size, `(in - 1)·s - 2p + k + op`.
/// The flat index in a switch-map convolution's weight (or weight gradient) of `K[c][e][t]`
/// (tap `t = i·K + j`, of `kk = K·K`), for `cn` map and `en` dense channels (see `SparseConvT`).
pub fn switch_weight(
    flip: bool,
    (c, e): (usize, usize),
    (cn, en): (usize, usize),
    kk: usize,
    t: usize,
) -> usize {
    if flip { (e * cn + c) * kk + (kk - 1 - t) } else { (c * en + e) * kk + t }
}

pub fn deconv_out(input: usize, k: usize, s: usize, p: usize, op: usize) -> Result<usize, String> {
    let full = (input - 1) * s + k + op;
    if input == 0 || full <= 2 * p {
        return Err(format!("transposed convolution of {input} gives no output"));
    }
    Ok(full - 2 * p)
}

fn two(s: &[usize]) -> Result<[usize; 2], String> {
    s.try_into().map_err(|_| format!("expected rank 2, got {s:?}"))
}

fn three(s: &[usize]) -> Result<[usize; 3], String> {
    s.try_into().map_err(|_| format!("expected rank 3, got {s:?}"))
}

/// The size of axis 1 (channels or features) of a batched value.
fn channels(s: &[usize]) -> Result<usize, String> {
    if s.len() < 2 {
        return Err(format!("expected a batched value, got {s:?}"));
    }
    Ok(s[1])
}

fn four(s: &[usize]) -> Result<[usize; 4], String> {
    s.try_into().map_err(|_| format!("expected rank 4, got {s:?}"))
}

/// Where `RecurrentGrad` puts each gradient in its flat output (element offsets, each a
/// multiple of 16 so every part starts on a 64-byte boundary).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecurrentGradLayout {
    /// `d xp [B, T, G·H]` at 0.
    pub dxp: usize,
    /// `d gh [B, T, G·H]`: its own part for a GRU, the same as `dxp` otherwise.
    pub dgh: usize,
    /// `d h0 [B, S]`.
    pub dh0: usize,
    pub total: usize,
}

pub fn recurrent_grad_layout(cell: Cell, b: usize, t: usize, h: usize) -> RecurrentGradLayout {
    let up = |n: usize| n.div_ceil(16) * 16;
    let gates = b * t * cell.gates() as usize * h;
    let dgh = if cell == Cell::Gru { up(gates) } else { 0 };
    let dh0 = if cell == Cell::Gru { dgh + up(gates) } else { up(gates) };
    RecurrentGradLayout { dxp: 0, dgh, dh0, total: dh0 + b * cell.state(h) }
}
