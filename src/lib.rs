//! aec — a compiler for autoencoders.
//!
//! The pipeline, one module per stage:
//!
//! 1. [`syntax`]: `.ae` text → typed AST (pest grammar in `grammar/aec.pest`). Never panics;
//!    vocabulary mistakes become diagnostics and parsing goes on.
//! 2. [`sema`]: names, `decoder mirror`, shape inference with a trace for every layer, parameter
//!    names (PyTorch's), then lowering of every layer to primitive [`ir`] ops (the forward
//!    graph). All semantic diagnostics of a file come out of one run.
//! 3. [`ir`]: the graph — typed ids over arenas, a closed `Op` enum, a verifier and a
//!    deterministic printer.
//!
//! Later stages (autodiff, passes, the interpreter, Cranelift code generation, the runtime)
//! consume `ir::Graph`. Nothing in the library prints; [`diag`] renders diagnostics for the CLI.

pub mod diag;
pub mod ir;
pub mod sema;
pub mod syntax;

pub use sema::{Compiled, Config, compile};
pub mod autodiff;
pub mod data;
pub mod interp;
pub mod passes;
pub mod runtime;
