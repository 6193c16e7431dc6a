//! The runtime: parameters and optimizer state, initialisation, the training loop,
//! checkpoints. It executes graphs through an executor (today the interpreter) and never sees
//! the AST or pest.

pub mod check;
pub mod checkpoint;
pub mod decode;
pub mod dist;
pub mod infer;
pub mod init;
#[cfg(feature = "mpi")]
pub mod mpi;
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
