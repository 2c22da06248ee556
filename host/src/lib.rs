//! KSI host: the daemon that runs Claude agents and durable multi-step workflows.
//!
//! One module per part (see the README's table): [`store`] owns the SQLite database,
//! [`bus`] the durable event bus, [`refs`] the files that rows point to, [`settings`] the
//! dynamic configuration, [`claude`] runs the Claude CLI, [`workflow`] the durable workflow
//! engine, [`plugins`] the WebAssembly step handlers, [`api`] the HTTP face (with its
//! token, rate limit and [`audit`] log), [`cli`] the command-line faces.

pub mod api;
pub mod audit;
pub mod bench;
pub mod bus;
pub mod claude;
pub mod cli;
pub mod config;
pub mod crash_point;
pub mod daemon;
pub mod plugins;
pub mod refs;
pub mod settings;
pub mod store;
pub mod workflow;
