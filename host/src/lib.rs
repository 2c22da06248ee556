//! KSI host.

pub mod plugins;
