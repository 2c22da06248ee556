//! [`PluginRuntime`]: the engine, the cache, the registry and the event sink together; where a
//! file becomes a serving plugin version (or a `plugin.load_failed` event).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
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
    /// One lock per file, so that two events for one file cannot race their swaps while
    /// different files load independently.
    load_locks: Mutex<HashMap<PathBuf, Arc<Mutex<()>>>>,
    /// The files that failed to load, with the content they failed with.
    failed: Mutex<HashMap<PathBuf, FailedLoad>>,
    /// Files read to be loaded (see [`PluginRuntime::files_read`]).
    files_read: std::sync::atomic::AtomicU64,
}

/// A file read and loaded, not yet installed.
enum Prepared {
    /// Its bytes are those already serving.
    Current(Arc<LoadedPlugin>),
    /// Compiled, type-checked and described.
    Loaded(Box<LoadedPlugin>),
    /// Refused (with the bytes' hash, when they could be read).
    Failed(PluginError, Option<String>),
}

/// A file's last failed load.
#[derive(Debug, Clone)]
struct FailedLoad {
    sha256: String,
    kind: &'static str,
    message: String,
    /// Whether the failure depends only on the file's bytes (so the same bytes fail again).
    content_only: bool,
    /// The file that holds the name@version this one claimed too.
    duplicate_of: Option<PathBuf>,
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
            load_locks: Mutex::default(),
            failed: Mutex::default(),
            files_read: Default::default(),
        }))
    }

    /// How many times a plugin file was read to be loaded: what the watcher costs.
    pub fn files_read(&self) -> u64 {
        self.files_read.load(std::sync::atomic::Ordering::Relaxed)
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

    /// Load every `.wasm` in the plugins directory, in parallel where the cores allow (a slow
    /// file does not hold up the others). Failures are reported (log line and
    /// `plugin.load_failed`) and returned; they do not stop the others.
    pub fn load_dir(&self) -> Vec<(PathBuf, Result<Arc<LoadedPlugin>>)> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(&self.config.plugins_dir)
            .map(|dir| {
                dir.filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| is_plugin_file(p))
                    .collect()
            })
            .unwrap_or_default();
        // Sorted, so that of two files claiming one name@version the first by name wins.
        files.sort();
        // Compile and describe in parallel; install one by one in name order, so that of two
        // files claiming one name@version the first by name serves, on every start.
        let workers = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .min(files.len());
        let next = std::sync::atomic::AtomicUsize::new(0);
        let prepared: Vec<Mutex<Option<Prepared>>> =
            files.iter().map(|_| Mutex::new(None)).collect();
        std::thread::scope(|threads| {
            for _ in 0..workers {
                threads.spawn(|| {
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        let Some(path) = files.get(i) else { return };
                        *prepared[i].lock().unwrap() = Some(self.prepare(path));
                    }
                });
            }
        });
        files
            .into_iter()
            .zip(prepared)
            .map(|(path, p)| {
                let p = p.into_inner().unwrap().expect("every file was prepared");
                let lock = self.path_lock(&path);
                let _serial = lock.lock().unwrap_or_else(|e| e.into_inner());
                let r = self.finish(&path, p);
                (path, r)
            })
            .collect()
    }

    /// Load (or reload) the plugin file `path` and swap it in. On failure the versions already
    /// serving keep serving, and the failure is logged and emitted as `plugin.load_failed` —
    /// once per distinct content: a file whose bytes did not change is neither loaded nor
    /// reported again (a file that loaded is a no-op; one that failed fails with the same
    /// error). Loads of different files run independently.
    ///
    /// Blocks while compiling: call it from a blocking thread.
    ///
    /// # Errors
    ///
    /// The [`PluginError`] that made the load fail.
    pub fn load_file(&self, path: &Path) -> Result<Arc<LoadedPlugin>> {
        let lock = self.path_lock(path);
        let _serial = lock.lock().unwrap_or_else(|e| e.into_inner());
        let prepared = self.prepare(path);
        self.finish(path, prepared)
    }

    /// Read, compile and describe `path`, unless its bytes are those already serving or
    /// already refused.
    fn prepare(&self, path: &Path) -> Prepared {
        self.files_read
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let bytes = match std::fs::read(path) {
            Ok(bytes) => bytes,
            Err(source) => {
                let error = PluginError::Io {
                    path: path.to_path_buf(),
                    source,
                };
                return Prepared::Failed(error, None);
            }
        };
        let sha256 = hex::encode(Sha256::digest(&bytes));
        if let Some(current) = self.registry.by_path(path)
            && current.sha256 == sha256
        {
            return Prepared::Current(current);
        }
        if let Some(failed) = self.failed.lock().unwrap().get(path)
            && failed.sha256 == sha256
            && failed.content_only
        {
            let error = PluginError::Unchanged {
                path: path.to_path_buf(),
                kind: failed.kind,
                message: failed.message.clone(),
            };
            return Prepared::Failed(error, Some(sha256));
        }
        // A bad file must never take the daemon or a CLI command down: a panic anywhere in
        // loading it is that file's load failure.
        let loaded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            loader::load_bytes(
                &self.engine,
                self.cache.as_ref(),
                path,
                bytes,
                &self.config.load,
            )
        }))
        .unwrap_or_else(|panic| {
            Err(PluginError::Engine(format!(
                "loading {} failed: {}",
                path.display(),
                super::step::panic_message(&*panic)
            )))
        });
        match loaded {
            Ok(plugin) => Prepared::Loaded(Box::new(plugin)),
            Err(e) => Prepared::Failed(e, Some(sha256)),
        }
    }

    /// Install what [`PluginRuntime::prepare`] loaded, or report why it did not load.
    fn finish(&self, path: &Path, prepared: Prepared) -> Result<Arc<LoadedPlugin>> {
        let (error, sha256) = match prepared {
            Prepared::Current(current) => return Ok(current),
            Prepared::Loaded(plugin) => {
                let sha256 = plugin.sha256.clone();
                match self.install(Arc::new(*plugin)) {
                    Ok(plugin) => {
                        self.failed.lock().unwrap().remove(path);
                        return Ok(plugin);
                    }
                    Err(e) => (e, Some(sha256)),
                }
            }
            Prepared::Failed(e, sha256) => (e, sha256),
        };
        if !matches!(error, PluginError::Unchanged { .. }) {
            self.report_failure(path, sha256.as_deref(), &error);
        }
        Err(error)
    }

    fn path_lock(&self, path: &Path) -> Arc<Mutex<()>> {
        let mut locks = self.load_locks.lock().unwrap();
        if locks.len() > 4096 {
            locks.retain(|_, l| Arc::strong_count(l) > 1);
        }
        locks.entry(path.to_path_buf()).or_default().clone()
    }

    /// Log and emit `plugin.load_failed`, unless this file already failed this way with these
    /// bytes.
    fn report_failure(&self, path: &Path, sha256: Option<&str>, e: &PluginError) {
        let message = e.to_string();
        let record = FailedLoad {
            sha256: sha256.unwrap_or_default().to_string(),
            kind: e.kind(),
            message: message.clone(),
            // A file that cannot be read, or a host-side failure, is tried again on its next
            // change event; one refused for what it contains, only when its content changes.
            content_only: sha256.is_some() && !matches!(e, PluginError::Engine(_)),
            duplicate_of: match e {
                PluginError::Duplicate { other, .. } => Some(other.clone()),
                _ => None,
            },
        };
        let repeated = self
            .failed
            .lock()
            .unwrap()
            .insert(path.to_path_buf(), record.clone())
            .is_some_and(|before| before.sha256 == record.sha256 && before.message == message);
        if repeated {
            tracing::debug!(file = %path.display(), "plugin still fails to load the same way");
            return;
        }
        let serving = self.registry.by_path(path).map(|p| p.id());
        tracing::warn!(file = %path.display(), error = %e, ?serving, "plugin failed to load");
        self.events.emit(
            "plugin.load_failed",
            json!({
                "file": path.display().to_string(),
                "error": message,
                "kind": e.kind(),
                "sha256": sha256,
                "still_serving": serving,
            }),
        );
    }

    fn install(&self, plugin: Arc<LoadedPlugin>) -> Result<Arc<LoadedPlugin>> {
        let removed = self.registry.swap(plugin.clone())?;
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
        Ok(plugin)
    }

    /// Take the version loaded from `path` out of service (its file was deleted). Steps
    /// running on it finish; new steps no longer find it. Emits `plugin.unloaded`.
    /// A file that was refused because it claimed the name@version of this one is loaded
    /// now.
    pub fn unload_file(&self, path: &Path) -> Option<Arc<LoadedPlugin>> {
        let old = {
            let lock = self.path_lock(path);
            let _serial = lock.lock().unwrap_or_else(|e| e.into_inner());
            self.failed.lock().unwrap().remove(path);
            let old = self.registry.unload(path)?;
            self.emit_unloaded(&old, "file removed");
            old
        };
        let waiting: Vec<PathBuf> = self
            .failed
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, f)| f.duplicate_of.as_deref() == Some(path))
            .map(|(p, _)| p.clone())
            .collect();
        for other in waiting {
            self.failed.lock().unwrap().remove(&other);
            let _ = self.load_file(&other);
        }
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
        // A thread of its own, outside the runtime: a guest's host calls block it (never a
        // runtime worker), WASI's synchronous calls can run their own runtime, and a guest
        // that does not stop can never keep the runtime from shutting down.
        let (tx, rx) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name("ksi-step".into())
            .spawn(move || {
                let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    span.in_scope(|| plugin.run_step(&input, services))
                }));
                let _ = tx.send(outcome.unwrap_or_else(|panic| {
                    Err(StepFailure::Host(super::step::panic_message(&*panic)))
                }));
            })
            .map_err(|e| StepFailure::Host(format!("cannot start the step's thread: {e}")))?;
        rx.await
            .map_err(|_| StepFailure::Host("the step's thread ended without an answer".into()))?
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
