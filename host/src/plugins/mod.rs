//! plugins: the WebAssembly runtime that runs workflow steps.
//!
//! Each workflow step is handled by a plugin, a WebAssembly component implementing the
//! `step-handler` world of `wit/plugin.wit` (package `ksi:plugin`). This module loads plugins
//! (validate → compile, cached → type-check → `describe()`), keeps every loaded version in a
//! [`PluginRegistry`], runs each step in a fresh, limited `Store`, and hot-reloads the plugins
//! directory. Where to look:
//!
//! - [`engine`]: the one process-wide `wasmtime::Engine`, its epoch ticker and the linker.
//! - [`loader`]: bytes → [`LoadedPlugin`]; every reason a file is refused.
//! - [`cache`]: compiled code on disk, keyed by content hash and engine compatibility.
//! - [`registry`]: versions per plugin name, `name@req` lookup, `swap` and `unload`.
//! - [`step`]: running one step; every way a step can fail ([`StepFailure`]).
//! - [`limits`]: CPU, memory and output limits with per-plugin overrides.
//! - [`host_impl`]: the host services a plugin imports ([`HostServices`]) and the events the
//!   runtime emits ([`EventSink`]).
//! - [`runtime`]: [`PluginRuntime`], which ties the above together.
//! - [`watch`]: the debounced watcher that hot-reloads the plugins directory.
//! - [`cli`]: `plugin check`, `plugin run`, `plugins list`, `plugin new`, as library functions.
//! - [`bench`]: `bench plugins`.

pub mod bench;
pub mod bindings;
pub mod bundled;
pub mod cache;
pub mod cli;
pub mod engine;
pub mod host_impl;
pub mod limits;
pub mod loader;
pub mod registry;
pub mod runtime;
pub mod step;
pub mod watch;

#[cfg(test)]
mod tests;

use std::path::PathBuf;
use std::time::Duration;

pub use bindings::{ClaudeError, ClaudeErrorKind, ClaudeRequest, ClaudeResponse, FileRef};
pub use bindings::{PluginInfo, StepInfo, StepInput, TokenUsage};
pub use engine::{AllocatorKind, EngineConfig, PluginEngine};
pub use host_impl::{
    EventSink, GuestDeterminism, HostServices, LogLevel, MemoryHost, RecordingEvents, StepScope,
};
pub use limits::{LimitOverrides, StepLimits};
pub use loader::LoadedPlugin;
pub use registry::{PluginRegistry, PluginRequest};
pub use runtime::{PluginRuntime, RuntimeConfig};
pub use step::{StepFailure, StepResult};
pub use watch::PluginWatcher;

/// The version of the `ksi:plugin` WIT package this host implements.
pub const WIT_VERSION: &str = "0.1.0";

/// Why a plugin could not be loaded or found.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    /// The file could not be read.
    #[error("cannot read plugin {path}: {source}")]
    Io {
        /// The plugin file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file does not start with the WebAssembly magic bytes.
    #[error("{path} is not a WebAssembly file (it does not start with \\0asm)")]
    NotWasm {
        /// The plugin file.
        path: PathBuf,
    },
    /// The file is a core module, not a component.
    #[error(
        "{path} is a core WebAssembly module, not a component: build the plugin with ksi-sdk \
         for the wasm32-wasip2 target (cargo build --target wasm32-wasip2 --release)"
    )]
    CoreModule {
        /// The plugin file.
        path: PathBuf,
    },
    /// The bytes are not a valid component (truncated, corrupt, unsupported features).
    #[error("{path} is not a valid WebAssembly component: {reason}")]
    Invalid {
        /// The plugin file.
        path: PathBuf,
        /// What the validator said.
        reason: String,
    },
    /// Compiling took longer than the compile time limit.
    #[error("compiling {path} took longer than {limit:?}; the plugin is too large or pathological")]
    CompileTimeout {
        /// The plugin file.
        path: PathBuf,
        /// The limit.
        limit: Duration,
    },
    /// The file defines more functions than a plugin may (refused before compiling).
    #[error(
        "{path} defines {functions} functions; a plugin may define at most {limit} \
         (plugin_max_functions), so it is refused before it is compiled"
    )]
    TooLarge {
        /// The plugin file.
        path: PathBuf,
        /// Functions counted so far (at least).
        functions: u64,
        /// The limit.
        limit: u64,
    },
    /// Compiling needed more memory than the compile memory limit.
    #[error(
        "compiling {path} needed more than {limit} bytes of memory (plugin_compile_memory_mb); \
         the plugin is too large or pathological"
    )]
    CompileMemory {
        /// The plugin file.
        path: PathBuf,
        /// The limit in bytes.
        limit: u64,
    },
    /// The component does not implement the `step-handler` world.
    #[error("{path} is not a KSI step handler (world ksi:plugin/step-handler): {reason}")]
    WrongWorld {
        /// The plugin file.
        path: PathBuf,
        /// What is missing or mismatched.
        reason: String,
    },
    /// The component was built against an incompatible version of the WIT package.
    #[error(
        "plugin {path} was built for ksi:plugin@{found}; this host speaks {host} — rebuild it \
         with ksi-sdk {sdk}"
    )]
    IncompatibleWit {
        /// The plugin file.
        path: PathBuf,
        /// The version the plugin was built for.
        found: String,
        /// The range this host accepts (`0.1.x`).
        host: String,
        /// The SDK version to rebuild with.
        sdk: String,
    },
    /// `describe()` trapped, timed out or ran out of memory.
    #[error("plugin {path} failed in describe(): {failure}")]
    Describe {
        /// The plugin file.
        path: PathBuf,
        /// How it failed.
        failure: Box<step::StepFailure>,
    },
    /// `describe()` returned something unusable.
    #[error("plugin {path} describes itself badly: {reason}")]
    BadInfo {
        /// The plugin file.
        path: PathBuf,
        /// What is wrong with the description.
        reason: String,
    },
    /// Another file already provides this name and version.
    #[error(
        "{path} is {id}, which {other} already provides: two files cannot be one plugin \
         version — give this one a new version in describe(), or remove one of the files"
    )]
    Duplicate {
        /// The refused file.
        path: PathBuf,
        /// `name@version`.
        id: String,
        /// The file that provides it.
        other: PathBuf,
    },
    /// The file failed to load before and its bytes have not changed since.
    #[error("{message} (unchanged since it was refused)")]
    Unchanged {
        /// The plugin file.
        path: PathBuf,
        /// The kind of the original failure.
        kind: &'static str,
        /// The original failure.
        message: String,
    },
    /// No plugin with this name is loaded.
    #[error("no plugin named {name} is loaded")]
    NotFound {
        /// The plugin name asked for.
        name: String,
    },
    /// Plugins with this name are loaded, but none matches the requirement.
    #[error("no loaded version of plugin {name} matches {req} (loaded: {loaded})")]
    NoMatchingVersion {
        /// The plugin name asked for.
        name: String,
        /// The version requirement.
        req: String,
        /// The loaded versions, comma separated.
        loaded: String,
    },
    /// A plugin reference like `debate@^0.1` could not be parsed.
    #[error("invalid plugin reference {reference:?}: {reason}")]
    BadReference {
        /// The reference as written.
        reference: String,
        /// Why it is invalid.
        reason: String,
    },
    /// The engine could not be created or configured.
    #[error("plugin engine: {0}")]
    Engine(String),
}

impl PluginError {
    /// A short machine-readable kind for events and metrics: `not_wasm`, `core_module`,
    /// `invalid`, `compile_timeout`, `wrong_world`, `incompatible_wit`, `describe_failed`, ...
    pub fn kind(&self) -> &'static str {
        match self {
            PluginError::Io { .. } => "io",
            PluginError::NotWasm { .. } => "not_wasm",
            PluginError::CoreModule { .. } => "core_module",
            PluginError::Invalid { .. } => "invalid",
            PluginError::CompileTimeout { .. } => "compile_timeout",
            PluginError::TooLarge { .. } => "too_large",
            PluginError::CompileMemory { .. } => "compile_memory",
            PluginError::WrongWorld { .. } => "wrong_world",
            PluginError::IncompatibleWit { .. } => "incompatible_wit",
            PluginError::Describe { .. } => "describe_failed",
            PluginError::BadInfo { .. } => "bad_info",
            PluginError::Duplicate { .. } => "duplicate",
            PluginError::Unchanged { kind, .. } => kind,
            PluginError::NotFound { .. } => "not_found",
            PluginError::NoMatchingVersion { .. } => "no_matching_version",
            PluginError::BadReference { .. } => "bad_reference",
            PluginError::Engine(_) => "engine",
        }
    }
}

/// Results of this module.
pub type Result<T, E = PluginError> = std::result::Result<T, E>;
