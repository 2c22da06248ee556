//! KSI host.
