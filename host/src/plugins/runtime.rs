//! [`PluginRuntime`]: the engine, the cache, the registry and the event sink together; where a
//! file becomes a serving plugin version (or a `plugin.load_failed` event).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use sha2::{Digest, Sha256};

use super::bindings::StepInput;
use super::cache::CompiledCache;
use super::engine::{EngineConfig, PluginEngine};
use super::host_impl::{EventSink, HostServices};
use super::loader::{self, LoadOptions, LoadedPlugin, PluginSummary};
use super::registry::PluginRegistry;
use super::step::{StepFailure, StepResult};
use super::watch::PluginWatcher;
use super::{PluginError, Result};

/// Where plugins come from and how they are loaded.
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// The watched directory of `.wasm` files (`<data>/plugins`).
    pub plugins_dir: PathBuf,
    /// Compiled-code cache (`<data>/cache`); `None` compiles every time.
    pub cache_dir: Option<PathBuf>,
    /// Engine-wide settings.
    pub engine: EngineConfig,
    /// Compile time limit, step limits, grants.
    pub load: LoadOptions,
    /// Quiet time after the last change to a file before it is (re)loaded.
    pub debounce: Duration,
}

impl RuntimeConfig {
    /// The layout of a data directory: `plugins/` and `cache/`.
    pub fn for_data_dir(data_dir: &Path) -> RuntimeConfig {
        RuntimeConfig {
            plugins_dir: data_dir.join("plugins"),
            cache_dir: Some(data_dir.join("cache")),
            engine: EngineConfig::default(),
            load: LoadOptions::default(),
            debounce: Duration::from_millis(100),
        }
    }
}

/// The plugin runtime of one daemon.
pub struct PluginRuntime {
    engine: Arc<PluginEngine>,
    cache: Option<CompiledCache>,
    registry: PluginRegistry,
    services: Arc<dyn HostServices>,
    events: Arc<dyn EventSink>,
    config: RuntimeConfig,
    /// Serialises loads so that two events for one file cannot race their swaps.
    load_lock: std::sync::Mutex<()>,
}

impl PluginRuntime {
    /// Create the engine and the cache (nothing is loaded yet: see [`PluginRuntime::load_dir`]).
    ///
    /// # Errors
    ///
    /// [`PluginError::Engine`] when the engine cannot be created; [`PluginError::Io`] when the
    /// plugins or cache directory cannot be created.
    pub fn new(
        config: RuntimeConfig,
        services: Arc<dyn HostServices>,
        events: Arc<dyn EventSink>,
    ) -> Result<Arc<PluginRuntime>> {
        let engine = PluginEngine::new(config.engine.clone())?;
        std::fs::create_dir_all(&config.plugins_dir).map_err(|source| PluginError::Io {
            path: config.plugins_dir.clone(),
            source,
        })?;
        let cache = match &config.cache_dir {
            Some(dir) => Some(CompiledCache::new(dir, engine.engine()).map_err(|source| {
                PluginError::Io {
                    path: dir.clone(),
                    source,
                }
            })?),
            None => None,
        };
        Ok(Arc::new(PluginRuntime {
            engine,
            cache,
            registry: PluginRegistry::new(),
            services,
            events,
            config,
            load_lock: std::sync::Mutex::new(()),
        }))
    }

    /// The engine.
    pub fn engine(&self) -> &Arc<PluginEngine> {
        &self.engine
    }

    /// The loaded plugins.
    pub fn registry(&self) -> &PluginRegistry {
        &self.registry
    }

    /// The configuration.
    pub fn config(&self) -> &RuntimeConfig {
        &self.config
    }

    /// The host services steps get by default.
    pub fn services(&self) -> &Arc<dyn HostServices> {
        &self.services
    }

    /// Load every `.wasm` in the plugins directory. Failures are reported (log line and
    /// `plugin.load_failed`) and returned; they do not stop the others.
    pub fn load_dir(&self) -> Vec<(PathBuf, Result<Arc<LoadedPlugin>>)> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(&self.config.plugins_dir)
            .map(|dir| {
                dir.filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| is_plugin_file(p))
                    .collect()
            })
            .unwrap_or_default();
        files.sort();
        files
            .into_iter()
            .map(|path| {
                let loaded = self.load_file(&path);
                (path, loaded)
            })
            .collect()
    }

    /// Load (or reload) the plugin file `path` and swap it in. On failure the versions already
    /// serving keep serving, and the failure is logged and emitted as `plugin.load_failed`.
    /// Loading a file whose bytes did not change is a no-op.
    ///
    /// Blocks while compiling: call it from a blocking thread.
    ///
    /// # Errors
    ///
    /// The [`PluginError`] that made the load fail.
    pub fn load_file(&self, path: &Path) -> Result<Arc<LoadedPlugin>> {
        let _serial = self.load_lock.lock().unwrap_or_else(|e| e.into_inner());
        let outcome = std::fs::read(path)
            .map_err(|source| PluginError::Io {
                path: path.to_path_buf(),
                source,
            })
            .and_then(|bytes| {
                let sha256 = hex::encode(Sha256::digest(&bytes));
                match self.registry.by_path(path) {
                    Some(current) if current.sha256 == sha256 => Ok(current),
                    _ => loader::load_bytes(
                        &self.engine,
                        self.cache.as_ref(),
                        path,
                        bytes,
                        &self.config.load,
                    )
                    .map(|plugin| self.install(Arc::new(plugin))),
                }
            });
        if let Err(e) = &outcome {
            let serving = self.registry.by_path(path).map(|p| p.id());
            tracing::warn!(file = %path.display(), error = %e, ?serving, "plugin failed to load");
            self.events.emit(
                "plugin.load_failed",
                json!({
                    "file": path.display().to_string(),
                    "error": e.to_string(),
                    "kind": e.kind(),
                    "still_serving": serving,
                }),
            );
        }
        outcome
    }

    fn install(&self, plugin: Arc<LoadedPlugin>) -> Arc<LoadedPlugin> {
        let removed = self.registry.swap(plugin.clone());
        tracing::info!(
            plugin = %plugin.id(),
            file = %plugin.path.display(),
            from_cache = plugin.from_cache,
            compile_ms = plugin.compile_time.as_millis() as u64,
            "plugin loaded"
        );
        self.events.emit(
            "plugin.loaded",
            json!({
                "name": plugin.info.name,
                "version": plugin.version.to_string(),
                "file": plugin.path.display().to_string(),
                "sha256": plugin.sha256,
                "steps": plugin.info.steps.iter().map(|s| &s.name).collect::<Vec<_>>(),
                "wit_version": plugin.wit_version,
                "from_cache": plugin.from_cache,
                "compile_ms": plugin.compile_time.as_millis() as u64,
                "replaces": removed.iter().map(|p| p.id()).collect::<Vec<_>>(),
            }),
        );
        for old in removed {
            self.emit_unloaded(&old, &format!("replaced by {}", plugin.id()));
        }
        plugin
    }

    /// Take the version loaded from `path` out of service (its file was deleted). Steps
    /// running on it finish; new steps no longer find it. Emits `plugin.unloaded`.
    pub fn unload_file(&self, path: &Path) -> Option<Arc<LoadedPlugin>> {
        let _serial = self.load_lock.lock().unwrap_or_else(|e| e.into_inner());
        let old = self.registry.unload(path)?;
        self.emit_unloaded(&old, "file removed");
        Some(old)
    }

    fn emit_unloaded(&self, plugin: &LoadedPlugin, reason: &str) {
        tracing::info!(plugin = %plugin.id(), file = %plugin.path.display(), reason, "plugin unloaded");
        self.events.emit(
            "plugin.unloaded",
            json!({
                "name": plugin.info.name,
                "version": plugin.version.to_string(),
                "file": plugin.path.display().to_string(),
                "reason": reason,
            }),
        );
    }

    /// The highest loaded version matching `reference` (`debate`, `debate@^0.1`).
    ///
    /// # Errors
    ///
    /// See [`PluginRegistry::resolve`].
    pub fn resolve(&self, reference: &str) -> Result<Arc<LoadedPlugin>> {
        self.registry.resolve_str(reference)
    }

    /// Run one step on `plugin` with the runtime's host services, blocking this thread.
    ///
    /// # Errors
    ///
    /// Every way a step can fail: [`StepFailure`].
    pub fn run_step_blocking(
        &self,
        plugin: &LoadedPlugin,
        input: &StepInput,
    ) -> std::result::Result<StepResult, StepFailure> {
        plugin.run_step(input, self.services.clone())
    }

    /// Run one step on a blocking thread of the tokio runtime.
    ///
    /// # Errors
    ///
    /// Every way a step can fail: [`StepFailure`].
    pub async fn run_step(
        &self,
        plugin: Arc<LoadedPlugin>,
        input: StepInput,
        services: Option<Arc<dyn HostServices>>,
    ) -> std::result::Result<StepResult, StepFailure> {
        let services = services.unwrap_or_else(|| self.services.clone());
        // The step's log lines (and the Claude calls it starts) stay in the caller's span.
        let span = tracing::Span::current();
        tokio::task::spawn_blocking(move || span.in_scope(|| plugin.run_step(&input, services)))
            .await
            .map_err(|e| StepFailure::Host(format!("the step's thread failed: {e}")))?
    }

    /// Every loaded version.
    pub fn list(&self) -> Vec<PluginSummary> {
        self.registry.list().iter().map(|p| p.summary()).collect()
    }

    /// Start hot reload of the plugins directory.
    ///
    /// # Errors
    ///
    /// When the directory cannot be watched.
    pub fn watch(self: &Arc<Self>) -> Result<PluginWatcher> {
        PluginWatcher::start(self.clone())
    }
}

/// Whether `path` looks like a plugin (`*.wasm`, not hidden).
pub(crate) fn is_plugin_file(path: &Path) -> bool {
    path.extension().is_some_and(|e| e == "wasm")
        && !path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with('.'))
}
