//! Tests of the plugin runtime against real components built from `plugins/` by the build
//! script (see `host/build.rs` and [`super::bundled`]).

mod faults;
mod load;
mod reload;
mod sandbox;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::host_impl::{HostServices, RecordingEvents};
use super::limits::{LimitOverrides, LimitPolicy, StepLimits};
use super::{EngineConfig, MemoryHost, PluginRuntime, RuntimeConfig};

/// A runtime on a temporary data directory, with an in-memory host and recorded events.
pub(crate) struct Fixture {
    pub dir: tempfile::TempDir,
    pub runtime: Arc<PluginRuntime>,
    pub host: Arc<MemoryHost>,
    pub events: Arc<RecordingEvents>,
}

impl Fixture {
    pub fn new() -> anyhow::Result<Fixture> {
        Fixture::with(|_| {})
    }

    pub fn with(configure: impl FnOnce(&mut RuntimeConfig)) -> anyhow::Result<Fixture> {
        let dir = tempfile::tempdir()?;
        let mut config = RuntimeConfig::for_data_dir(dir.path());
        config.engine = EngineConfig {
            pool_instances: 16,
            ..EngineConfig::default()
        };
        config.load.limits = LimitPolicy {
            defaults: StepLimits {
                cpu_time: Duration::from_secs(5),
                memory_bytes: 64 << 20,
                ..StepLimits::default()
            },
            plugins: Default::default(),
        };
        config.debounce = Duration::from_millis(50);
        configure(&mut config);
        let host = MemoryHost::new();
        let events = Arc::new(RecordingEvents::default());
        let runtime = PluginRuntime::new(config, host.clone(), events.clone())?;
        Ok(Fixture {
            dir,
            runtime,
            host,
            events,
        })
    }

    /// Copy a built plugin into the plugins directory as `name`.
    pub fn install(&self, built: &str, name: &str) -> anyhow::Result<PathBuf> {
        let path = self.plugins_dir().join(name);
        replace_atomically(&path, &std::fs::read(built)?)?;
        Ok(path)
    }

    pub fn plugins_dir(&self) -> PathBuf {
        self.runtime.config().plugins_dir.clone()
    }

    pub fn services(&self) -> Arc<dyn HostServices> {
        self.host.clone()
    }
}

/// Overrides for one plugin.
pub(crate) fn override_for(config: &mut RuntimeConfig, plugin: &str, overrides: LimitOverrides) {
    config.load.limits.plugins.insert(plugin.into(), overrides);
}

/// Write a file the way a careful deploy does: temp file in the same directory, then rename.
pub(crate) fn replace_atomically(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// Poll `check` until it returns `Some` or `timeout` passes.
pub(crate) fn wait_for<T>(
    timeout: Duration,
    mut check: impl FnMut() -> Option<T>,
) -> anyhow::Result<T> {
    let start = Instant::now();
    loop {
        if let Some(v) = check() {
            return Ok(v);
        }
        if start.elapsed() > timeout {
            anyhow::bail!("condition not met within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}
