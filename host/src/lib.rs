//! KSI host.

pub mod claude;
