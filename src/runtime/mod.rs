//! The runtime: initialisation, the training loop, checkpoints and the save transaction,
//! inference, greedy decoding, the gradient check of `aec check`, and data-parallel training.
//! It runs graphs on either executor — the native code of `codegen` (the default) or the
//! reference interpreter — and never sees the AST's text or pest.

pub mod bleu;
pub mod check;
pub mod checkpoint;
pub mod config;
pub mod dataset;
pub mod decode;
pub mod dist;
pub mod generate;
pub mod gmm;
pub mod infer;
pub mod init;
#[cfg(feature = "mpi")]
pub mod mpi;
pub mod schedule;
pub mod tensorboard;
pub mod train;

/// The training state lives below the backends, which read and write it ([`crate::state`]).
pub use crate::state::State;

/// Which executor runs the graphs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Backend {
    /// Native code generated with Cranelift (`codegen`).
    #[default]
    Jit,
    /// The reference interpreter.
    Interp,
}
