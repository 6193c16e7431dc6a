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
//!
//! `unsafe` is denied everywhere but [`codegen`], which calls the code it generates.

#![deny(unsafe_code)]

pub mod diag;
pub mod files;
pub mod ir;
pub mod memory;
pub mod onnx;
pub mod sema;
pub mod syntax;

pub use sema::{Compiled, Config, compile};

/// The training-step graph of a compiled spec with its `train` block's optimizer (Adam with
/// PyTorch's defaults if it names none) and gradient clipping.
pub fn training_step(c: &Compiled) -> Result<ir::Graph, String> {
    let train = c.ast.train.as_ref();
    let opt = train.and_then(|t| t.optimizer.as_ref());
    autodiff::training_step(&c.forward, optimizer_fn(opt), clip_of(train), &[])
}

/// The IR form of a `train` block's `clip`.
pub fn clip_of(t: Option<&syntax::ast::Train>) -> ir::Clip {
    match t.and_then(|t| t.clip) {
        Some(syntax::ast::ClipRule::Norm(c)) => ir::Clip::Norm(c as f32),
        Some(syntax::ast::ClipRule::Value(c)) => ir::Clip::Value(c as f32),
        None => ir::Clip::None,
    }
}

/// The IR form of an optimizer setting.
pub fn optimizer_fn(o: Option<&syntax::ast::Optimizer>) -> ir::OptimizerFn {
    use syntax::ast::Optimizer;
    match o {
        Some(Optimizer::Sgd { lr, momentum, nesterov, weight_decay }) => ir::OptimizerFn::Sgd {
            lr: *lr as f32,
            momentum: *momentum as f32,
            nesterov: *nesterov,
            weight_decay: *weight_decay as f32,
        },
        Some(Optimizer::Adam { lr, b1, b2, eps, weight_decay, decoupled }) => ir::OptimizerFn::Adam {
            lr: *lr as f32,
            b1: *b1 as f32,
            b2: *b2 as f32,
            eps: *eps as f32,
            weight_decay: *weight_decay as f32,
            decoupled: *decoupled,
        },
        Some(Optimizer::RmsProp { lr, alpha, eps, weight_decay, momentum, centered }) => {
            ir::OptimizerFn::RmsProp {
                lr: *lr as f32,
                alpha: *alpha as f32,
                eps: *eps as f32,
                weight_decay: *weight_decay as f32,
                momentum: *momentum as f32,
                centered: *centered,
            }
        }
        None => ir::OptimizerFn::Adam {
            lr: 1e-3,
            b1: 0.9,
            b2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            decoupled: false,
        },
    }
}
pub mod autodiff;
#[allow(unsafe_code)]
pub mod codegen;
pub mod data;
pub mod interp;
pub mod passes;
pub mod rng;
pub mod runtime;
pub mod state;
pub mod value;
