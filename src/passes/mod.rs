//! IR-to-IR rewrites, one file each.

pub mod dce;
pub mod sparse;
