//! IR-to-IR rewrites, one file each.

pub mod dce;
pub mod flip;
pub mod onehot;
pub mod sparse;
