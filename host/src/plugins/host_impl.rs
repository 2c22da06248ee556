//! The host services a plugin imports, behind small traits the rest of KSI implements.
//!
//! [`HostServices`] is what `claude`, `bus`, `files`, `logging`, `config`, `state` and
//! `templates` call; [`EventSink`] receives the runtime's own `plugin.*` events. The real
//! implementations (executor, bus, refs, journal) live elsewhere; [`MemoryHost`] and
//! [`RecordingEvents`] are in-memory ones for tests, `ksi-host plugin run` and benchmarks.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;
use wasmtime_wasi::{ResourceTable, WasiCtx, WasiCtxView, WasiView};

use super::bindings::TokenUsage;
use super::bindings::ksi::plugin::{bus, claude, config, files, logging, state, templates, types};
use super::bindings::{ClaudeError, ClaudeErrorKind, ClaudeRequest, ClaudeResponse, FileRef};
use super::limits::{StepLimiter, StepLimits};
use super::step::StepFailure;

/// Which step a host call comes from: enough to scope state and files, tag logs and journal
/// the call.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepScope {
    /// The plugin name.
    pub plugin: String,
    /// The plugin version that runs the step.
    pub plugin_version: String,
    /// The workflow instance (empty outside workflows, e.g. `describe`).
    pub workflow_id: String,
    /// The workflow type (`debate`).
    pub workflow_type: String,
    /// The step name.
    pub step: String,
    /// The step's position in the run.
    pub step_index: u32,
    /// 1 on the first try.
    pub attempt: u32,
    /// Sequence number of the current host call within the step (0-based). A guest is
    /// deterministic, so (workflow, step index, attempt-independent call number) identifies a
    /// call across re-runs: the journal's replay key.
    pub call: u32,
}

/// Log levels a plugin can use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    /// Very verbose.
    Trace,
    /// Verbose.
    Debug,
    /// Normal.
    Info,
    /// Something looks wrong.
    Warn,
    /// Something failed.
    Error,
}

/// The services a plugin reaches through its imports. Calls block the step's thread (steps run
/// on blocking threads: `spawn_blocking` or their own), so implementations may block on async
/// work with `tokio::runtime::Handle::block_on`.
///
/// Each method receives the [`StepScope`] of the calling step: state and files are scoped to its
/// workflow, and the journal keys calls by it.
pub trait HostServices: Send + Sync {
    /// `claude.complete`.
    ///
    /// # Errors
    ///
    /// A [`ClaudeError`] the guest sees (transient, permanent, budget exhausted, cancelled).
    fn claude_complete(
        &self,
        scope: &StepScope,
        request: ClaudeRequest,
    ) -> Result<ClaudeResponse, ClaudeError>;

    /// `claude.complete-all`: the real executor runs the calls concurrently; this default runs
    /// them one after another.
    fn claude_complete_all(
        &self,
        scope: &StepScope,
        requests: Vec<ClaudeRequest>,
    ) -> Vec<Result<ClaudeResponse, ClaudeError>> {
        requests
            .into_iter()
            .map(|r| self.claude_complete(scope, r))
            .collect()
    }

    /// `bus.publish`: returns the event id.
    ///
    /// # Errors
    ///
    /// A message for the guest.
    fn publish(
        &self,
        scope: &StepScope,
        topic: &str,
        data: serde_json::Value,
    ) -> Result<u64, String>;

    /// `files.read`.
    ///
    /// # Errors
    ///
    /// A message for the guest (missing, hash mismatch, outside the data directory).
    fn read_file(&self, scope: &StepScope, file: &FileRef) -> Result<Vec<u8>, String>;

    /// `files.write`.
    ///
    /// # Errors
    ///
    /// A message for the guest.
    fn write_file(&self, scope: &StepScope, name: &str, contents: &[u8])
    -> Result<FileRef, String>;

    /// `config.get`.
    fn config_get(&self, scope: &StepScope, key: &str) -> Option<String>;

    /// `state.get` (workflow-scoped; the value is JSON).
    fn state_get(&self, scope: &StepScope, key: &str) -> Option<String>;

    /// `state.set` (workflow-scoped).
    ///
    /// # Errors
    ///
    /// A message for the guest.
    fn state_set(
        &self,
        scope: &StepScope,
        key: &str,
        value: serde_json::Value,
    ) -> Result<(), String>;

    /// `templates.render`.
    ///
    /// # Errors
    ///
    /// A message for the guest (unknown template, missing variable).
    fn render_template(
        &self,
        scope: &StepScope,
        name: &str,
        vars: serde_json::Value,
    ) -> Result<String, String>;

    /// Why the calling step must stop now (its workflow was cancelled, its wall-clock timeout
    /// passed), if it must. Checked at every host-call entry and every epoch check: a guest
    /// that loops on host calls stops at its next call.
    fn stop_reason(&self) -> Option<String> {
        None
    }

    /// What the guest's WASI clocks and random numbers derive from, so that a re-run of the
    /// step after a crash sees the values the first run saw: the time the step was asked for
    /// (its clocks start there and advance 1 µs per reading) and a 32-byte seed. `None`
    /// gives real clocks and OS randomness (one-off runs, tests).
    fn guest_determinism(&self, scope: &StepScope) -> Option<GuestDeterminism> {
        let _ = scope;
        None
    }

    /// `logging.log`.
    fn log(&self, scope: &StepScope, level: LogLevel, message: &str) {
        let (plugin, step, workflow) = (&scope.plugin, &scope.step, &scope.workflow_id);
        match level {
            LogLevel::Trace => tracing::trace!(plugin, step, workflow, "{message}"),
            LogLevel::Debug => tracing::debug!(plugin, step, workflow, "{message}"),
            LogLevel::Info => tracing::info!(plugin, step, workflow, "{message}"),
            LogLevel::Warn => tracing::warn!(plugin, step, workflow, "{message}"),
            LogLevel::Error => tracing::error!(plugin, step, workflow, "{message}"),
        }
    }
}

/// See [`HostServices::guest_determinism`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestDeterminism {
    /// Where the guest's wall clock starts.
    pub clock_origin: std::time::SystemTime,
    /// The seed of its `wasi:random` generators.
    pub seed: [u8; 32],
}

impl GuestDeterminism {
    /// Derived from what identifies a step attempt (the journal's replay key) and the time
    /// its step was asked for: the same on every re-run of that attempt, different for every
    /// other. Not a secret: guests must not make keys from `wasi:random`.
    pub fn for_attempt(workflow_id: &str, step_index: u64, attempt: u32, asked_at_ms: i64) -> Self {
        let seed = Sha256::digest(format!(
            "ksi guest random\n{workflow_id}\n{step_index}\n{attempt}\n{asked_at_ms}"
        ));
        GuestDeterminism {
            clock_origin: std::time::UNIX_EPOCH
                + Duration::from_millis(u64::try_from(asked_at_ms).unwrap_or(0)),
            seed: seed.into(),
        }
    }
}

/// The guest's wall and monotonic clocks when they are deterministic: they start at an origin
/// and advance one microsecond per reading, whatever the real time.
#[derive(Clone)]
pub(crate) struct StepClock {
    origin: Duration,
    readings: Arc<std::sync::atomic::AtomicU64>,
}

impl StepClock {
    pub fn new(origin: std::time::SystemTime) -> Self {
        StepClock {
            origin: origin
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default(),
            readings: Arc::default(),
        }
    }

    fn tick(&self) -> Duration {
        Duration::from_micros(self.readings.fetch_add(1, Ordering::Relaxed) + 1)
    }
}

impl wasmtime_wasi::HostWallClock for StepClock {
    fn resolution(&self) -> Duration {
        Duration::from_micros(1)
    }

    fn now(&self) -> Duration {
        self.origin + self.tick()
    }
}

impl wasmtime_wasi::HostMonotonicClock for StepClock {
    fn resolution(&self) -> u64 {
        1_000
    }

    fn now(&self) -> u64 {
        self.tick().as_nanos() as u64
    }
}

/// Receives the runtime's events: `plugin.loaded`, `plugin.unloaded`, `plugin.load_failed`.
pub trait EventSink: Send + Sync {
    /// Emit one event.
    fn emit(&self, topic: &str, data: serde_json::Value);
}

/// An [`EventSink`] that logs every event and keeps it in memory.
#[derive(Debug, Default)]
pub struct RecordingEvents {
    events: Mutex<Vec<(String, serde_json::Value)>>,
}

impl RecordingEvents {
    /// Every event emitted so far.
    pub fn events(&self) -> Vec<(String, serde_json::Value)> {
        self.events.lock().unwrap().clone()
    }

    /// The events emitted so far on `topic`.
    pub fn on(&self, topic: &str) -> Vec<serde_json::Value> {
        self.events
            .lock()
            .unwrap()
            .iter()
            .filter(|(t, _)| t == topic)
            .map(|(_, d)| d.clone())
            .collect()
    }
}

impl EventSink for RecordingEvents {
    fn emit(&self, topic: &str, data: serde_json::Value) {
        tracing::info!(topic, %data, "plugin event");
        self.events.lock().unwrap().push((topic.to_string(), data));
    }
}

/// In-memory [`HostServices`]: a deterministic simulated Claude, maps for config, state, files
/// and templates, and a log of everything published. Every Claude answer says it is simulated.
#[derive(Debug, Default)]
pub struct MemoryHost {
    /// `config.get` answers.
    pub config: Mutex<HashMap<String, String>>,
    /// Templates by name; `{{var}}` is replaced by the variable's value.
    pub templates: Mutex<HashMap<String, String>>,
    state: Mutex<HashMap<(String, String), String>>,
    files: Mutex<HashMap<String, Vec<u8>>>,
    published: Mutex<Vec<(String, serde_json::Value)>>,
    logs: Mutex<Vec<(LogLevel, String)>>,
    claude_requests: Mutex<Vec<ClaudeRequest>>,
}

impl MemoryHost {
    /// An empty host.
    pub fn new() -> Arc<MemoryHost> {
        Arc::new(MemoryHost::default())
    }

    /// Events the plugins published.
    pub fn published(&self) -> Vec<(String, serde_json::Value)> {
        self.published.lock().unwrap().clone()
    }

    /// Lines the plugins logged.
    pub fn logs(&self) -> Vec<(LogLevel, String)> {
        self.logs.lock().unwrap().clone()
    }

    /// Every Claude request the plugins made, in order.
    pub fn claude_requests(&self) -> Vec<ClaudeRequest> {
        self.claude_requests.lock().unwrap().clone()
    }

    /// Store a file and return its reference (as the refs store would).
    pub fn put_file(&self, path: &str, contents: &[u8]) -> FileRef {
        self.files
            .lock()
            .unwrap()
            .insert(path.to_string(), contents.to_vec());
        FileRef {
            path: path.to_string(),
            line: None,
            sha256: hex::encode(Sha256::digest(contents)),
            bytes: contents.len() as u64,
        }
    }
}

impl HostServices for MemoryHost {
    fn claude_complete(
        &self,
        _scope: &StepScope,
        request: ClaudeRequest,
    ) -> Result<ClaudeResponse, ClaudeError> {
        if request.prompt.trim().is_empty() {
            return Err(ClaudeError {
                kind: ClaudeErrorKind::Permanent,
                message: "the prompt is empty".into(),
            });
        }
        let n = {
            let mut requests = self.claude_requests.lock().unwrap();
            requests.push(request.clone());
            requests.len()
        };
        let agent = request.agent.clone().unwrap_or_else(|| "claude".into());
        let session = request.session.clone().unwrap_or_else(|| {
            let h = hex::encode(Sha256::digest(format!("{agent}\n{}", request.prompt)));
            format!("sim-{}", &h[..12])
        });
        let excerpt: String = request.prompt.chars().take(80).collect();
        let text = format!("[simulated answer #{n} from {agent}] {excerpt}");
        let line = serde_json::json!({"type": "result", "simulated": true, "result": text});
        let line = line.to_string();
        Ok(ClaudeResponse {
            response_ref: FileRef {
                path: format!("claude_logs/{session}.jsonl"),
                line: Some(n as u64),
                sha256: hex::encode(Sha256::digest(line.as_bytes())),
                bytes: line.len() as u64,
            },
            session_id: session,
            tokens: TokenUsage {
                input: request.prompt.len() as u64 / 4,
                output: text.len() as u64 / 4,
                cache_read: 0,
                cache_write: 0,
            },
            text,
            cost_usd: 0.0,
            duration_ms: 0,
            model: request.model.unwrap_or_else(|| "simulated".into()),
        })
    }

    fn publish(
        &self,
        _scope: &StepScope,
        topic: &str,
        data: serde_json::Value,
    ) -> Result<u64, String> {
        let mut published = self.published.lock().unwrap();
        published.push((topic.to_string(), data));
        Ok(published.len() as u64)
    }

    fn read_file(&self, _scope: &StepScope, file: &FileRef) -> Result<Vec<u8>, String> {
        let files = self.files.lock().unwrap();
        let bytes = files
            .get(&file.path)
            .ok_or_else(|| format!("no file {}", file.path))?;
        if hex::encode(Sha256::digest(bytes)) != file.sha256 {
            return Err(format!("{} does not match its sha256", file.path));
        }
        Ok(bytes.clone())
    }

    fn write_file(
        &self,
        scope: &StepScope,
        name: &str,
        contents: &[u8],
    ) -> Result<FileRef, String> {
        if name.contains("..") || name.starts_with('/') {
            return Err(format!("file name {name:?} escapes the workflow directory"));
        }
        let path = format!("state/workflows/{}/{name}", scope.workflow_id);
        Ok(self.put_file(&path, contents))
    }

    fn config_get(&self, _scope: &StepScope, key: &str) -> Option<String> {
        self.config.lock().unwrap().get(key).cloned()
    }

    fn state_get(&self, scope: &StepScope, key: &str) -> Option<String> {
        let state = self.state.lock().unwrap();
        state
            .get(&(scope.workflow_id.clone(), key.to_string()))
            .cloned()
    }

    fn state_set(
        &self,
        scope: &StepScope,
        key: &str,
        value: serde_json::Value,
    ) -> Result<(), String> {
        let mut state = self.state.lock().unwrap();
        state.insert(
            (scope.workflow_id.clone(), key.to_string()),
            value.to_string(),
        );
        Ok(())
    }

    fn render_template(
        &self,
        _scope: &StepScope,
        name: &str,
        vars: serde_json::Value,
    ) -> Result<String, String> {
        let templates = self.templates.lock().unwrap();
        let mut text = templates
            .get(name)
            .cloned()
            .ok_or_else(|| format!("no template named {name}"))?;
        if let serde_json::Value::Object(vars) = vars {
            for (key, value) in vars {
                let value = match value {
                    serde_json::Value::String(s) => s,
                    other => other.to_string(),
                };
                text = text.replace(&format!("{{{{{key}}}}}"), &value);
            }
        }
        Ok(text)
    }

    fn log(&self, scope: &StepScope, level: LogLevel, message: &str) {
        tracing::debug!(plugin = %scope.plugin, step = %scope.step, ?level, "{message}");
        self.logs.lock().unwrap().push((level, message.to_string()));
    }
}

/// What one step has used of its host-call limits so far.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct HostUsage {
    pub calls: u32,
    /// Events published and state set: part of the step's output.
    pub output_bytes: usize,
    pub file_bytes: usize,
    pub log_bytes: usize,
    pub journal_bytes: usize,
    /// Whether the "log limit reached" warning was written.
    pub log_capped: bool,
}

/// The data of one step's `Store`: WASI (no env, args, network or preopens unless granted),
/// the limiter, the host services, and the CPU-time and host-call accounting.
pub(crate) struct StepState {
    pub wasi: WasiCtx,
    pub table: ResourceTable,
    pub limiter: StepLimiter,
    pub services: Arc<dyn HostServices>,
    pub scope: StepScope,
    /// When the guest started running.
    pub started: Instant,
    /// Time spent inside host calls (not charged to the CPU limit).
    pub host_time: Duration,
    /// The limits of this step.
    pub limits: StepLimits,
    /// Host-call usage against [`StepLimits`].
    pub usage: HostUsage,
    /// Set when the engine shuts down ([`super::PluginEngine::interrupt_all`]).
    pub shutdown: Arc<AtomicBool>,
    /// Why the step was stopped from outside, once it was.
    pub stopped: Option<String>,
    /// The guest's stdout and stderr (a panic message lands here).
    pub output: MemoryOutputPipe,
}

impl StepState {
    /// Guest time used so far: wall time minus time in host calls.
    pub fn guest_time(&self) -> Duration {
        self.started.elapsed().saturating_sub(self.host_time)
    }

    /// Why the step must stop now, if it must (shutdown, cancel, wall-clock timeout).
    pub fn must_stop(&mut self) -> Option<String> {
        if self.stopped.is_none() {
            self.stopped = if self.shutdown.load(Ordering::Relaxed) {
                Some("the daemon is shutting down".to_string())
            } else {
                self.services.stop_reason()
            };
        }
        self.stopped.clone()
    }

    /// The entry of every host call: stop if the step must stop, count the call, and refuse an
    /// argument over [`StepLimits::call_bytes`]. `Err` traps the guest with a [`StepFailure`].
    fn enter(&mut self, what: &str, arg_bytes: usize) -> wasmtime::Result<()> {
        if let Some(reason) = self.must_stop() {
            return Err(StepFailure::Stopped { reason }.into());
        }
        self.usage.calls += 1;
        if self.usage.calls > self.limits.host_calls {
            return Err(exceeded(format!(
                "it made more than {} host calls (the last one {what}); a step that needs more \
                 raises limits.host_calls",
                self.limits.host_calls
            )));
        }
        if arg_bytes > self.limits.call_bytes {
            return Err(exceeded(format!(
                "{what} was given {arg_bytes} bytes; one host call takes at most {} \
                 (limits.call_bytes) — large data goes through files.write",
                self.limits.call_bytes
            )));
        }
        Ok(())
    }

    /// Count `bytes` against one of the step's totals; `Err` traps the guest.
    fn charge(
        used: &mut usize,
        bytes: usize,
        limit: usize,
        what: &str,
        setting: &str,
    ) -> wasmtime::Result<()> {
        *used = used.saturating_add(bytes);
        if *used > limit {
            return Err(exceeded(format!(
                "{what} reached {used} bytes, over its limit of {limit} bytes ({setting})"
            )));
        }
        Ok(())
    }

    /// Run a host call's service, keeping its duration off the guest's CPU budget (after
    /// [`StepState::enter`] admitted it).
    fn call<R>(&mut self, f: impl FnOnce(&dyn HostServices, &StepScope) -> R) -> R {
        let start = Instant::now();
        let r = f(self.services.as_ref(), &self.scope);
        self.scope.call += 1;
        self.host_time += start.elapsed();
        r
    }

    fn charge_output(&mut self, bytes: usize) -> wasmtime::Result<()> {
        Self::charge(
            &mut self.usage.output_bytes,
            bytes,
            self.limits.output_bytes,
            "the events and state this step produced",
            "limits.output_bytes",
        )
    }

    fn charge_journal(&mut self, bytes: usize) -> wasmtime::Result<()> {
        Self::charge(
            &mut self.usage.journal_bytes,
            bytes,
            self.limits.journal_bytes,
            "what the step journaled",
            "limits.journal_bytes",
        )
    }
}

fn exceeded(what: String) -> wasmtime::Error {
    StepFailure::LimitExceeded { what }.into()
}

impl WasiView for StepState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

fn parse_json(what: &str, s: &str) -> Result<serde_json::Value, String> {
    serde_json::from_str(s).map_err(|e| format!("{what} is not valid JSON: {e}"))
}

fn request_bytes(r: &ClaudeRequest) -> usize {
    r.prompt.len() + r.system_prompt.as_ref().map_or(0, String::len)
}

fn answer_bytes(r: &Result<ClaudeResponse, ClaudeError>) -> usize {
    match r {
        Ok(a) => a.text.len(),
        Err(e) => e.message.len(),
    }
}

impl types::Host for StepState {}

impl claude::Host for StepState {
    fn complete(
        &mut self,
        request: ClaudeRequest,
    ) -> wasmtime::Result<Result<ClaudeResponse, ClaudeError>> {
        let bytes = request_bytes(&request);
        self.enter("claude.complete", bytes)?;
        let r = self.call(|h, s| h.claude_complete(s, request));
        self.charge_journal(bytes + answer_bytes(&r))?;
        Ok(r)
    }

    fn complete_all(
        &mut self,
        requests: Vec<ClaudeRequest>,
    ) -> wasmtime::Result<Vec<Result<ClaudeResponse, ClaudeError>>> {
        let bytes: usize = requests.iter().map(request_bytes).sum();
        self.enter("claude.complete-all", bytes)?;
        // Each further request counts as a host call of its own.
        for _ in 1..requests.len() {
            self.enter("claude.complete-all", 0)?;
        }
        let r = self.call(|h, s| h.claude_complete_all(s, requests));
        self.charge_journal(bytes + r.iter().map(answer_bytes).sum::<usize>())?;
        Ok(r)
    }
}

impl bus::Host for StepState {
    fn publish(&mut self, topic: String, data: String) -> wasmtime::Result<Result<u64, String>> {
        let bytes = topic.len() + data.len();
        self.enter("bus.publish", bytes)?;
        self.charge_output(bytes)?;
        Ok(match parse_json("the event data", &data) {
            Ok(data) => self.call(|h, s| h.publish(s, &topic, data)),
            Err(e) => Err(e),
        })
    }
}

impl files::Host for StepState {
    fn read(&mut self, file: FileRef) -> wasmtime::Result<Result<Vec<u8>, String>> {
        self.enter("files.read", file.path.len() + file.sha256.len())?;
        Ok(self.call(|h, s| h.read_file(s, &file)))
    }

    fn write(
        &mut self,
        name: String,
        contents: Vec<u8>,
    ) -> wasmtime::Result<Result<FileRef, String>> {
        self.enter("files.write", name.len())?;
        Self::charge(
            &mut self.usage.file_bytes,
            contents.len(),
            self.limits.file_bytes,
            "what this step wrote with files.write",
            "limits.file_bytes",
        )?;
        Ok(self.call(|h, s| h.write_file(s, &name, &contents)))
    }
}

impl logging::Host for StepState {
    fn log(&mut self, level: logging::Level, message: String) -> wasmtime::Result<()> {
        let level = match level {
            logging::Level::Trace => LogLevel::Trace,
            logging::Level::Debug => LogLevel::Debug,
            logging::Level::Info => LogLevel::Info,
            logging::Level::Warn => LogLevel::Warn,
            logging::Level::Error => LogLevel::Error,
        };
        self.enter("logging.log", message.len())?;
        self.usage.log_bytes = self.usage.log_bytes.saturating_add(message.len());
        if self.usage.log_bytes <= self.limits.log_bytes {
            self.call(|h, s| h.log(s, level, &message));
        } else if !std::mem::replace(&mut self.usage.log_capped, true) {
            let warning = format!(
                "this step logged more than {} bytes (limits.log_bytes); its further log lines \
                 are dropped",
                self.limits.log_bytes
            );
            self.call(|h, s| h.log(s, LogLevel::Warn, &warning));
        }
        Ok(())
    }
}

impl config::Host for StepState {
    fn get(&mut self, key: String) -> wasmtime::Result<Option<String>> {
        self.enter("config.get", key.len())?;
        let r = self.call(|h, s| h.config_get(s, &key));
        self.charge_journal(key.len() + r.as_ref().map_or(0, String::len))?;
        Ok(r)
    }
}

impl state::Host for StepState {
    fn get(&mut self, key: String) -> wasmtime::Result<Option<String>> {
        self.enter("state.get", key.len())?;
        Ok(self.call(|h, s| h.state_get(s, &key)))
    }

    fn set(&mut self, key: String, value: String) -> wasmtime::Result<Result<(), String>> {
        let bytes = key.len() + value.len();
        self.enter("state.set", bytes)?;
        self.charge_output(bytes)?;
        Ok(
            match parse_json(&format!("the value of state key {key}"), &value) {
                Ok(value) => self.call(|h, s| h.state_set(s, &key, value)),
                Err(e) => Err(e),
            },
        )
    }
}

impl templates::Host for StepState {
    fn render(&mut self, name: String, vars: String) -> wasmtime::Result<Result<String, String>> {
        let bytes = name.len() + vars.len();
        self.enter("templates.render", bytes)?;
        let r = match parse_json("the template variables", &vars) {
            Ok(vars) => self.call(|h, s| h.render_template(s, &name, vars)),
            Err(e) => return Ok(Err(e)),
        };
        self.charge_journal(bytes + r.as_ref().map_or_else(String::len, String::len))?;
        Ok(r)
    }
}
