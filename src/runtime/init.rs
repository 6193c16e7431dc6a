//! Parameter initialisation, as PyTorch's defaults, from a seeded ChaCha stream.
//!
//! - `default`: every weight kaiming-uniform with a = √5, i.e. U(±1/√fan_in), and every bias
//!   U(±1/√fan_in) — `nn.Linear`, `nn.Conv2d`, `nn.ConvTranspose2d` (whose fan_in PyTorch takes
//!   from weight dim 1, `out·K²`), and `nn.RNN/GRU/LSTM` (U(±1/√hidden) for all, which sema
//!   encodes as fan_in = hidden); embeddings N(0, 1).
//! - `xavier`: weights U(±√(6/(fan_in+fan_out))), biases 0.
//! - `he`: weights U(±√(6/fan_in)) (kaiming-uniform for ReLU), biases 0.
//!
//! Parameters are drawn in order, so a seed fixes every value. The values are not PyTorch's own
//! random numbers (its generator differs); the distributions are.

use crate::ir::{Graph, ParamRole};
use crate::syntax::ast::Init;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

pub fn init_params(g: &Graph, init: Init, seed: u64) -> Vec<Vec<f32>> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    g.params
        .iter()
        .map(|p| {
            let n: usize = p.shape.iter().product();
            let fan_in = p.fan_in.max(1) as f64;
            let fan_out = p.fan_out.max(1) as f64;
            let bound = match (p.role, init) {
                (ParamRole::Embedding, _) => return (0..n).map(|_| normal(&mut rng)).collect(),
                (ParamRole::Weight, Init::Default) | (ParamRole::Bias, Init::Default) => 1.0 / fan_in.sqrt(),
                (ParamRole::Weight, Init::Xavier) => (6.0 / (fan_in + fan_out)).sqrt(),
                (ParamRole::Weight, Init::He) => (6.0 / fan_in).sqrt(),
                (ParamRole::Bias, _) => 0.0,
                (ParamRole::Codebook { .. }, _) => 1.0 / fan_in,
                // PyTorch's `reset_parameters` of a batch norm: γ = 1, β = 0, the running mean
                // 0, variance 1, no batches tracked.
                (ParamRole::NormScale | ParamRole::Buffer { ones: true }, _) => return vec![1.0; n],
                (ParamRole::NormShift | ParamRole::Buffer { ones: false }, _) => return vec![0.0; n],
            };
            (0..n).map(|_| ((rng.random::<f64>() * 2.0 - 1.0) * bound) as f32).collect()
        })
        .collect()
}

fn normal(rng: &mut ChaCha8Rng) -> f32 {
    let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
    let u2: f64 = rng.random();
    ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
}
