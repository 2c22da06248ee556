//! End-to-end tests: they start the real `ksi-host` / `ksi` / `fake-claude` binaries. One test
//! binary for all areas (one `mod` each) keeps link time down.

mod support;

mod api;
mod claude;
mod cli;
mod client;
mod compat;
mod crash;
mod crosssite;
mod dashboard;
mod disk;
mod executor;
mod money;
mod ops;
mod sandbox;
mod workflows;
