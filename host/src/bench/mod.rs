//! Benchmarks runnable by anyone: `ksi-host bench <part> [--json]`. They print numbers; they
//! never assert on time (machines are shared and noisy).

pub mod api;
pub mod bus;
pub mod executor;
pub mod workflow;

pub use executor::bench_executor;
