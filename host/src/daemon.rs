//! Assembling a running KSI: the data-dir lock, the store, the bundled assets, the plugin
//! runtime with hot reload, the executor and the workflow engine — used by `ksi-host serve`
//! and by `ksi run` when no daemon is running.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use serde_json::Value;
use tokio::sync::{mpsc, watch};

use crate::bus::{Bus, NewEvent};
use crate::claude::{Executor, ExecutorConfig};
use crate::config::Config;
use crate::plugins::{EventSink, HostServices, PluginRuntime, RuntimeConfig, StepScope};
use crate::refs::Refs;
use crate::store::Store;
use crate::workflow::{ClaudeApi, Engine, EngineOptions, PluginRunner};

/// Warns, naming them, about files and directories of the data dir that other local users may
/// read or write: everything in it is private (prompts, answers, the token, the socket).
fn warn_about_wide_permissions(data_dir: &Path) {
    let (wide, _) = crate::store::wider_than_private(data_dir, 20);
    if wide.is_empty() {
        return;
    }
    let list: Vec<String> = wide
        .iter()
        .map(|(p, mode)| format!("{} ({mode:o})", p.display()))
        .collect();
    tracing::warn!(
        "{} entr{} of the data dir can be read or written by other users: {}. Everything in it is private (prompts, answers, the API token); fix with `chmod -R go-rwx {}`",
        wide.len(),
        if wide.len() == 1 { "y" } else { "ies" },
        list.join(", "),
        data_dir.display()
    );
}

/// Holds the data directory exclusively (an `flock` on `ksi.lock`) for the life of the
/// process, so a second daemon (or a `ksi run` beside a daemon) on the same data is refused.
pub struct DataDirLock {
    _file: File,
    pub path: PathBuf,
}

impl DataDirLock {
    /// Takes the lock.
    ///
    /// # Errors
    /// Another process holds it (the message names its pid).
    pub fn acquire(data_dir: &Path) -> anyhow::Result<DataDirLock> {
        let path = data_dir.join("ksi.lock");
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("opening the lock file {}", path.display()))?;
        // SAFETY: flock on a file descriptor we own.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            let holder = std::fs::read_to_string(&path).unwrap_or_default();
            anyhow::bail!(
                "another KSI process (pid {}) is using the data directory {}. Stop it, talk to it with `ksi`, or choose another --data-dir",
                holder.trim(),
                data_dir.display()
            );
        }
        let _ = file.set_len(0);
        let _ = std::fs::write(&path, format!("{}\n", std::process::id()));
        Ok(DataDirLock { _file: file, path })
    }

    /// The pid of the process holding the data directory's lock (a daemon, running or still
    /// starting, or an in-process `ksi run`), or `None` when nobody holds it.
    pub fn holder(data_dir: &Path) -> Option<u32> {
        let path = data_dir.join("ksi.lock");
        let file = std::fs::OpenOptions::new().read(true).open(&path).ok()?;
        // SAFETY: flock on a file descriptor we own; a lock we get is released when `file`
        // closes at the end of this function.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_SH | libc::LOCK_NB) };
        if rc == 0 {
            return None;
        }
        Some(
            std::fs::read_to_string(&path)
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .unwrap_or(0),
        )
    }
}

/// Workflow definitions and prompt templates that ship with KSI.
pub const BUNDLED_DEFINITIONS: &[(&str, &str)] = &[
    (
        "analysis.toml",
        include_str!("../assets/definitions/analysis.toml"),
    ),
    (
        "collaboration.toml",
        include_str!("../assets/definitions/collaboration.toml"),
    ),
    (
        "debate.toml",
        include_str!("../assets/definitions/debate.toml"),
    ),
    (
        "teaching.toml",
        include_str!("../assets/definitions/teaching.toml"),
    ),
];

/// Prompt templates that ship with KSI (`prompts/templates/<path>`).
pub const BUNDLED_TEMPLATES: &[(&str, &str)] = &[
    (
        "analysis/analyze.md",
        include_str!("../assets/templates/analysis/analyze.md"),
    ),
    (
        "analysis/decompose.md",
        include_str!("../assets/templates/analysis/decompose.md"),
    ),
    (
        "analysis/synthesize.md",
        include_str!("../assets/templates/analysis/synthesize.md"),
    ),
    (
        "collaboration/critique.md",
        include_str!("../assets/templates/collaboration/critique.md"),
    ),
    (
        "collaboration/draft.md",
        include_str!("../assets/templates/collaboration/draft.md"),
    ),
    (
        "collaboration/revise.md",
        include_str!("../assets/templates/collaboration/revise.md"),
    ),
    (
        "debate/closing.md",
        include_str!("../assets/templates/debate/closing.md"),
    ),
    (
        "debate/judge.md",
        include_str!("../assets/templates/debate/judge.md"),
    ),
    (
        "debate/opening.md",
        include_str!("../assets/templates/debate/opening.md"),
    ),
    (
        "debate/rebuttal.md",
        include_str!("../assets/templates/debate/rebuttal.md"),
    ),
    (
        "summarize.md",
        include_str!("../assets/templates/summarize.md"),
    ),
    (
        "teaching/answer.md",
        include_str!("../assets/templates/teaching/answer.md"),
    ),
    (
        "teaching/ask.md",
        include_str!("../assets/templates/teaching/ask.md"),
    ),
    (
        "teaching/check_answer.md",
        include_str!("../assets/templates/teaching/check_answer.md"),
    ),
    (
        "teaching/check_question.md",
        include_str!("../assets/templates/teaching/check_question.md"),
    ),
    (
        "teaching/explain.md",
        include_str!("../assets/templates/teaching/explain.md"),
    ),
    (
        "teaching/summary.md",
        include_str!("../assets/templates/teaching/summary.md"),
    ),
];

/// Installs the bundled plugins, definitions and templates into a data dir. Definitions and
/// templates are written only when missing, so a user's edits are kept.
pub fn install_bundled(refs: &Refs) -> anyhow::Result<()> {
    let root = refs.root();
    crate::plugins::bundled::install_bundled(&root.join("plugins"))
        .context("installing the bundled plugins")?;
    for (dir, files) in [
        ("definitions", BUNDLED_DEFINITIONS),
        ("prompts/templates", BUNDLED_TEMPLATES),
    ] {
        for (name, text) in files {
            let rel = format!("{dir}/{name}");
            if !root.join(&rel).exists() {
                refs.write(&rel, text.as_bytes())
                    .with_context(|| format!("installing {rel}"))?;
            }
        }
    }
    Ok(())
}

/// Variables for the Claude CLI given as `KSI_CLAUDE_ENV_<NAME>=value` (the CLI's environment
/// is otherwise clean: PATH, HOME, locale, `ANTHROPIC_*`/`CLAUDE_*`).
pub fn claude_env_from(vars: impl IntoIterator<Item = (String, String)>) -> Vec<(String, String)> {
    vars.into_iter()
        .filter_map(|(k, v)| {
            k.strip_prefix("KSI_CLAUDE_ENV_")
                .filter(|n| !n.is_empty())
                .map(|n| (n.to_string(), v))
        })
        .collect()
}

/// Host services outside a step (a plugin's `describe()`): nothing is available.
pub struct NoStep;

impl HostServices for NoStep {
    fn claude_complete(
        &self,
        _: &StepScope,
        _: crate::plugins::ClaudeRequest,
    ) -> Result<crate::plugins::ClaudeResponse, crate::plugins::ClaudeError> {
        Err(crate::plugins::ClaudeError {
            kind: crate::plugins::ClaudeErrorKind::Permanent,
            message: "host calls are only available inside a step".into(),
        })
    }
    fn publish(&self, _: &StepScope, _: &str, _: Value) -> Result<u64, String> {
        Err("host calls are only available inside a step".into())
    }
    fn read_file(&self, _: &StepScope, _: &crate::plugins::FileRef) -> Result<Vec<u8>, String> {
        Err("host calls are only available inside a step".into())
    }
    fn write_file(
        &self,
        _: &StepScope,
        _: &str,
        _: &[u8],
    ) -> Result<crate::plugins::FileRef, String> {
        Err("host calls are only available inside a step".into())
    }
    fn config_get(&self, _: &StepScope, _: &str) -> Option<String> {
        None
    }
    fn state_get(&self, _: &StepScope, _: &str) -> Option<String> {
        None
    }
    fn state_set(&self, _: &StepScope, _: &str, _: Value) -> Result<(), String> {
        Err("host calls are only available inside a step".into())
    }
    fn render_template(&self, _: &StepScope, _: &str, _: Value) -> Result<String, String> {
        Err("host calls are only available inside a step".into())
    }
}

/// Publishes the plugin runtime's events (`plugin.loaded`, ...) on the bus.
struct BusSink {
    tx: mpsc::UnboundedSender<(String, Value)>,
}

impl EventSink for BusSink {
    fn emit(&self, topic: &str, data: Value) {
        let _ = self.tx.send((topic.to_string(), data));
    }
}

fn bus_sink(bus: Bus) -> Arc<BusSink> {
    let (tx, mut rx) = mpsc::unbounded_channel::<(String, Value)>();
    tokio::spawn(async move {
        while let Some((topic, data)) = rx.recv().await {
            if let Err(e) = bus.publish(NewEvent::new(topic.clone(), data)).await {
                tracing::warn!(%topic, error = %e, "could not publish a plugin event");
            }
        }
    });
    Arc::new(BusSink { tx })
}

/// A running KSI in this process.
pub struct Host {
    pub config: Config,
    pub store: Store,
    pub bus: Bus,
    pub refs: Refs,
    pub plugins: Arc<PluginRuntime>,
    pub engine: Engine,
    pub executor: Executor,
    _watcher: Option<crate::plugins::PluginWatcher>,
    _lock: DataDirLock,
}

impl Host {
    /// Opens everything on `config.data_dir`, running Claude calls with `claude_bin`.
    /// Start-up recovery runs here: Claude processes left by a dead daemon are reconciled
    /// (killed, completed from their log, or retried), then steps resume.
    pub async fn open(
        config: Config,
        claude_bin: PathBuf,
        watch_plugins: bool,
    ) -> anyhow::Result<Host> {
        crate::store::prepare_data_dir(&config.data_dir)?;
        let lock = DataDirLock::acquire(&config.data_dir)?;
        warn_about_wide_permissions(&config.data_dir);
        let store = Store::open(&config)?;
        let bus = Bus::new(store.clone());
        let refs = Refs::open(&config.data_dir)?;
        install_bundled(&refs)?;
        let plugins = PluginRuntime::new(
            RuntimeConfig {
                load: config.plugin_load_options(),
                ..RuntimeConfig::for_data_dir(refs.root())
            },
            Arc::new(NoStep),
            bus_sink(bus.clone()),
        )
        .context("starting the plugin runtime")?;
        // Off the async runtime: loading compiles and runs guests' describe().
        let loading = plugins.clone();
        let loaded = tokio::task::spawn_blocking(move || loading.load_dir())
            .await
            .context("loading the plugins directory")?;
        for (path, result) in loaded {
            if let Err(e) = result {
                tracing::error!(file = %path.display(), error = %e, "plugin not loaded");
            }
        }
        let watcher = if watch_plugins {
            Some(plugins.watch().context("watching the plugins directory")?)
        } else {
            None
        };
        let executor = Executor::new(
            store.clone(),
            bus.clone(),
            refs.clone(),
            ExecutorConfig {
                binary: claude_bin,
                extra_env: claude_env_from(std::env::vars()),
                ..ExecutorConfig::default()
            },
        );
        let report = executor.reconcile().await?;
        tracing::info!(?report, "Claude processes reconciled");
        executor.resume_retries().await?;
        let claude: Arc<dyn ClaudeApi> = Arc::new(executor.clone());
        let engine = Engine::new(
            store.clone(),
            refs.clone(),
            Arc::new(PluginRunner::new(plugins.clone())),
            claude,
            EngineOptions::default(),
        )
        .await?;
        for e in engine
            .load_definitions(&refs.root().join("definitions"))
            .await
        {
            tracing::error!(error = %e, "workflow definition not loaded");
        }
        engine.recover().await?;
        Ok(Host {
            config,
            store,
            bus,
            refs,
            plugins,
            engine,
            executor,
            _watcher: watcher,
            _lock: lock,
        })
    }

    /// Runs the engine's workers until `shutdown` turns true.
    pub fn spawn_workers(&self, shutdown: watch::Receiver<bool>) -> tokio::task::JoinHandle<()> {
        let engine = self.engine.clone();
        tokio::spawn(async move { engine.run_workers(shutdown).await })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files_under(dir: &Path, base: &Path, out: &mut Vec<String>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                files_under(&p, base, out);
            } else {
                out.push(p.strip_prefix(base).unwrap().display().to_string());
            }
        }
    }

    #[test]
    fn every_asset_file_is_bundled() {
        let assets = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets");
        for (sub, list) in [
            ("definitions", BUNDLED_DEFINITIONS),
            ("templates", BUNDLED_TEMPLATES),
        ] {
            let mut files = Vec::new();
            files_under(&assets.join(sub), &assets.join(sub), &mut files);
            files.sort();
            let mut listed: Vec<String> = list.iter().map(|(n, _)| n.to_string()).collect();
            listed.sort();
            assert_eq!(files, listed, "assets/{sub} and the bundled list differ");
        }
    }
}
