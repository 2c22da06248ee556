//! KSI's integration tests: one test binary with a module per area (faster to link than many).
//!
//! Tests here may start the workspace's binaries; Cargo builds them first and hands their paths
//! over as `CARGO_BIN_EXE_<name>` (e.g. `fake-claude`).

mod claude;
