//! Hot reload: a debounced watcher on the plugins directory.
//!
//! A new or changed `.wasm` is loaded and swapped in once its file has been quiet for the
//! debounce time (so a file being copied is loaded once, complete); a deleted one is unloaded.
//! Only content changes count ([`is_content_change`]), and a file whose bytes did not change
//! is not loaded again (see [`super::PluginRuntime::load_file`]).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use notify::{RecursiveMode, Watcher};

use super::runtime::{PluginRuntime, is_plugin_file};
use super::{PluginError, Result};

/// Watches the plugins directory until dropped.
pub struct PluginWatcher {
    watcher: Option<notify::RecommendedWatcher>,
    thread: Option<JoinHandle<()>>,
}

impl PluginWatcher {
    /// Watch `runtime`'s plugins directory.
    ///
    /// # Errors
    ///
    /// [`PluginError::Io`] when the directory cannot be watched.
    pub fn start(runtime: Arc<PluginRuntime>) -> Result<PluginWatcher> {
        let dir = runtime.config().plugins_dir.clone();
        let io_error = |e: notify::Error| PluginError::Io {
            path: dir.clone(),
            source: std::io::Error::other(e.to_string()),
        };
        let (tx, rx) = channel::<PathBuf>();
        let mut watcher =
            notify::recommended_watcher(move |event: notify::Result<notify::Event>| match event {
                Ok(event) if is_content_change(&event.kind) => {
                    for path in event.paths {
                        let _ = tx.send(path);
                    }
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "plugin directory watch error"),
            })
            .map_err(io_error)?;
        watcher
            .watch(&dir, RecursiveMode::NonRecursive)
            .map_err(io_error)?;
        let debounce = runtime.config().debounce;
        let thread = std::thread::Builder::new()
            .name("ksi-plugin-watch".into())
            .spawn(move || debounce_loop(runtime, rx, debounce))
            .map_err(|e| PluginError::Io {
                path: dir.clone(),
                source: e,
            })?;
        tracing::info!(dir = %dir.display(), "watching plugins");
        Ok(PluginWatcher {
            watcher: Some(watcher),
            thread: Some(thread),
        })
    }
}

impl Drop for PluginWatcher {
    fn drop(&mut self) {
        // Dropping the watcher drops the channel's sender, which ends the debounce thread.
        self.watcher.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Whether a notify event can mean that a file's content changed: created, written (and
/// closed after writing), renamed or removed. Opening, reading or closing a file that was only
/// read — as loading it does — and metadata changes (`touch`, `chmod`) are not: reacting to
/// them made every load queue the next one.
pub fn is_content_change(kind: &notify::EventKind) -> bool {
    use notify::EventKind;
    use notify::event::{AccessKind, AccessMode, ModifyKind};
    match kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) => false,
        EventKind::Modify(ModifyKind::Metadata(_)) => false,
        EventKind::Create(_) | EventKind::Modify(_) | EventKind::Remove(_) => true,
        EventKind::Any | EventKind::Other => true,
    }
}

fn debounce_loop(runtime: Arc<PluginRuntime>, rx: Receiver<PathBuf>, debounce: Duration) {
    let mut pending: HashMap<PathBuf, Instant> = HashMap::new();
    loop {
        let wait = pending
            .values()
            .map(|seen| (*seen + debounce).saturating_duration_since(Instant::now()))
            .min()
            .unwrap_or(Duration::from_secs(3600));
        match rx.recv_timeout(wait) {
            Ok(path) => {
                if is_plugin_file(&path) {
                    pending.insert(path, Instant::now());
                }
                continue;
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
        let now = Instant::now();
        let due: Vec<PathBuf> = pending
            .iter()
            .filter(|(_, seen)| now.duration_since(**seen) >= debounce)
            .map(|(p, _)| p.clone())
            .collect();
        for path in &due {
            pending.remove(path);
        }
        // Loads before unloads: a plugin renamed in the directory keeps serving throughout.
        let (present, gone): (Vec<_>, Vec<_>) = due.into_iter().partition(|p| p.is_file());
        for path in present {
            // Failures are reported by the runtime (log + plugin.load_failed).
            let _ = runtime.load_file(&path);
        }
        for path in gone {
            runtime.unload_file(&path);
        }
    }
}
