//! Running one step: a fresh `Store` from the pre-instantiated component, under limits, and
//! every way that can fail.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use wasmtime::{Store, Trap, UpdateDeadline};
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;
use wasmtime_wasi::{FsPerms, ResourceTable, WasiCtxBuilder};

use super::bindings::{
    ClaudeError, ClaudeErrorKind, ClaudeRequest, ClaudeResponse, ErrorKind, FileRef, PluginInfo,
    StepHandler, StepHandlerPre, StepInput, StepOutput,
};
use super::engine::PluginEngine;
use super::host_impl::{
    GuestDeterminism, HostServices, HostUsage, StepClock, StepScope, StepState,
};
use super::limits::{StepLimiter, StepLimits};

/// Longest a guest runs in wasm between two checks of whether it must stop.
const STOP_CHECK: Duration = Duration::from_millis(100);

/// Bytes of guest stdout/stderr kept for error messages.
const GUEST_OUTPUT_BYTES: usize = 16 << 10;

/// What a step produced, with its JSON parsed and checked.
#[derive(Debug, Clone, Serialize)]
pub struct StepResult {
    /// JSON merge patch for the workflow state.
    pub state_patch: serde_json::Value,
    /// The step's result.
    pub result: serde_json::Value,
    /// The step chosen to run next, if the plugin chose one.
    pub next_step: Option<String>,
    /// Events to publish with the step (topic, data).
    pub events: Vec<(String, serde_json::Value)>,
    /// The plugin that ran the step.
    pub plugin: String,
    /// Its version.
    pub plugin_version: String,
    /// Guest time the step used (host calls excluded).
    pub guest_time: Duration,
}

/// Why a step did not produce a result.
#[derive(Debug, thiserror::Error)]
pub enum StepFailure {
    /// The guest used up its CPU-time limit and was interrupted (an epoch deadline trap).
    #[error("timed out: the step used its CPU time limit of {limit:?} and was interrupted")]
    Timeout {
        /// The limit.
        limit: Duration,
    },
    /// The guest tried to grow its memory beyond the limit.
    #[error(
        "out of memory: the step asked for {requested} bytes of linear memory; its limit is {limit}"
    )]
    OutOfMemory {
        /// The memory limit in bytes.
        limit: usize,
        /// The size it tried to grow to.
        requested: usize,
    },
    /// The guest trapped: a panic (`unreachable`), stack overflow, out-of-bounds access, ...
    #[error("trapped ({trap}){detail}")]
    Trap {
        /// The trap code.
        trap: Trap,
        /// The guest's last output (a panic message) and the wasm backtrace.
        detail: String,
    },
    /// The plugin returned a step error.
    #[error("{} step error: {message}", if *.retryable { "retryable" } else { "fatal" })]
    Failed {
        /// Whether running the step again may succeed.
        retryable: bool,
        /// The plugin's message.
        message: String,
    },
    /// The output is larger than the output limit.
    #[error("the step output is {bytes} bytes, over the limit of {limit} bytes")]
    OutputTooLarge {
        /// Size of result + state patch + events.
        bytes: usize,
        /// The limit.
        limit: usize,
    },
    /// The output is not what the contract promises (e.g. not JSON).
    #[error("the step output is invalid: {0}")]
    InvalidOutput(String),
    /// The plugin does not handle this step.
    #[error("plugin {plugin}@{version} has no step {step:?} (it handles: {known})")]
    UnknownStep {
        /// Plugin name.
        plugin: String,
        /// Plugin version.
        version: String,
        /// The step asked for.
        step: String,
        /// The steps it handles, comma separated.
        known: String,
    },
    /// The step went over one of its host-call limits ([`StepLimits::host_calls`],
    /// `call_bytes`, `file_bytes`, `journal_bytes`, or its output through `bus.publish` and
    /// `state.set`).
    #[error("the step went over a limit: {what}")]
    LimitExceeded {
        /// Which limit, by how much, and the setting that raises it.
        what: String,
    },
    /// The step was stopped from outside while it ran: its workflow was cancelled, its
    /// timeout passed, or the daemon is shutting down.
    #[error("the step was stopped: {reason}")]
    Stopped {
        /// Why.
        reason: String,
    },
    /// The host could not run the step (instance pool exhausted, grant missing, ...).
    #[error("the host could not run the step: {0}")]
    Host(String),
}

impl StepFailure {
    /// Whether running the step again may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            StepFailure::Failed { retryable, .. } => *retryable,
            StepFailure::Host(_) | StepFailure::Stopped { .. } => true,
            _ => false,
        }
    }

    /// A short machine-readable kind: `timeout`, `out_of_memory`, `trap`, `failed`, ...
    pub fn kind(&self) -> &'static str {
        match self {
            StepFailure::Timeout { .. } => "timeout",
            StepFailure::OutOfMemory { .. } => "out_of_memory",
            StepFailure::Trap { .. } => "trap",
            StepFailure::Failed { .. } => "failed",
            StepFailure::OutputTooLarge { .. } => "output_too_large",
            StepFailure::InvalidOutput(_) => "invalid_output",
            StepFailure::UnknownStep { .. } => "unknown_step",
            StepFailure::LimitExceeded { .. } => "limit_exceeded",
            StepFailure::Stopped { .. } => "stopped",
            StepFailure::Host(_) => "host",
        }
    }
}

/// A directory the host grants a plugin (read-only), visible to the guest at `guest_path`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct DirGrant {
    /// The directory on the host.
    pub host_path: PathBuf,
    /// Where the guest sees it.
    pub guest_path: String,
}

/// Everything needed to instantiate one plugin version.
pub(crate) struct Instantiator<'a> {
    pub engine: &'a PluginEngine,
    pub pre: &'a StepHandlerPre<StepState>,
    pub limits: StepLimits,
    pub grants: &'a [DirGrant],
}

impl Instantiator<'_> {
    /// Instantiate in a fresh store and run `f`; classify whatever goes wrong.
    ///
    /// On a thread that is inside a tokio runtime (a daemon loading plugins at start-up, a CLI
    /// command) the guest runs on a thread of its own: WASI's synchronous host calls (a guest
    /// writing to stdout, as every panic does) block on a runtime of their own, which tokio
    /// refuses inside another ("Cannot start a runtime from within a runtime").
    pub fn call<R: Send>(
        &self,
        scope: StepScope,
        services: Arc<dyn HostServices>,
        f: impl FnOnce(&mut Store<StepState>, &StepHandler) -> wasmtime::Result<R> + Send,
    ) -> Result<(R, Duration, HostUsage), StepFailure> {
        if tokio::runtime::Handle::try_current().is_err() {
            return self.call_here(scope, services, f);
        }
        std::thread::scope(|threads| {
            std::thread::Builder::new()
                .name("ksi-plugin-guest".into())
                .spawn_scoped(threads, || self.call_here(scope, services, f))
                .map_err(|e| StepFailure::Host(format!("cannot start the guest's thread: {e}")))?
                .join()
                .unwrap_or_else(|panic| Err(StepFailure::Host(panic_message(&*panic))))
        })
    }

    fn call_here<R>(
        &self,
        scope: StepScope,
        services: Arc<dyn HostServices>,
        f: impl FnOnce(&mut Store<StepState>, &StepHandler) -> wasmtime::Result<R>,
    ) -> Result<(R, Duration, HostUsage), StepFailure> {
        if self.engine.shutting_down() {
            return Err(StepFailure::Stopped {
                reason: "the daemon is shutting down".into(),
            });
        }
        let output = MemoryOutputPipe::new(GUEST_OUTPUT_BYTES);
        let mut wasi = WasiCtxBuilder::new();
        wasi.stdout(output.clone())
            .stderr(output.clone())
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false);
        for grant in self.grants {
            wasi.preopened_dir(&grant.host_path, &grant.guest_path, FsPerms::ReadOnly)
                .map_err(|e| {
                    StepFailure::Host(format!(
                        "cannot grant {} to the plugin: {e}",
                        grant.host_path.display()
                    ))
                })?;
        }
        if let Some(d) = services.guest_determinism(&scope) {
            use rand_guest::SeedableRng;
            let clock = StepClock::new(d.clock_origin);
            let mut insecure = d.seed;
            insecure[0] ^= 0xff;
            wasi.wall_clock(clock.clone())
                .monotonic_clock(clock)
                .secure_random(rand_guest::rngs::StdRng::from_seed(d.seed))
                .insecure_random(rand_guest::rngs::StdRng::from_seed(insecure))
                .insecure_random_seed(u128::from_le_bytes(d.seed[..16].try_into().unwrap()));
        }
        let state = StepState {
            wasi: wasi.build(),
            table: ResourceTable::new(),
            limiter: StepLimiter::new(&self.limits),
            services,
            scope,
            started: Instant::now(),
            host_time: Duration::ZERO,
            limits: self.limits,
            usage: HostUsage::default(),
            shutdown: self.engine.shutdown_flag(),
            stopped: None,
            output,
        };
        let mut store = Store::new(self.engine.engine(), state);
        store.limiter(|s| &mut s.limiter);
        let tick = self.engine.config().epoch_tick;
        // Wall time passes during host calls (a Claude call takes seconds): when the deadline
        // arrives, charge only guest time and extend the deadline by what is left, but by no
        // more than STOP_CHECK, so that a cancel, timeout or shutdown stops a guest spinning
        // in wasm within that time.
        let check_every = self.engine.ticks(STOP_CHECK);
        store.set_epoch_deadline(self.engine.ticks(self.limits.cpu_time).min(check_every));
        store.epoch_deadline_callback(move |mut cx| {
            let state = cx.data_mut();
            if state.must_stop().is_some() || state.guest_time() >= state.limits.cpu_time {
                return Ok(UpdateDeadline::Interrupt);
            }
            let left = state.limits.cpu_time - state.guest_time();
            let tick = tick.as_nanos().max(1);
            Ok(UpdateDeadline::Continue(
                (left.as_nanos().div_ceil(tick) as u64).clamp(1, check_every),
            ))
        });

        let _running = self.engine.running();
        store.data_mut().started = Instant::now();
        let outcome = self
            .pre
            .instantiate(&mut store)
            .and_then(|handler| f(&mut store, &handler));
        let guest_time = store.data().guest_time();
        match outcome {
            Ok(r) => Ok((r, guest_time, store.data().usage)),
            Err(e) => Err(classify(e, store.data(), &self.limits)),
        }
    }
}

/// What a caught panic said.
pub(crate) fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    let what = panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic".into());
    format!("the host panicked while running the guest: {what}")
}

fn classify(error: wasmtime::Error, state: &StepState, limits: &StepLimits) -> StepFailure {
    // A host call that ended the guest says why.
    let error = match error.downcast::<StepFailure>() {
        Ok(failure) => return failure,
        Err(error) => error,
    };
    if let Some(requested) = state.limiter.memory_denied {
        return StepFailure::OutOfMemory {
            limit: limits.memory_bytes,
            requested,
        };
    }
    match error.downcast_ref::<Trap>() {
        Some(Trap::Interrupt) => match &state.stopped {
            Some(reason) => StepFailure::Stopped {
                reason: reason.clone(),
            },
            None => StepFailure::Timeout {
                limit: limits.cpu_time,
            },
        },
        Some(trap) => {
            let guest_output = String::from_utf8_lossy(&state.output.contents()).into_owned();
            let mut detail = String::new();
            if !guest_output.trim().is_empty() {
                detail.push_str(": ");
                detail.push_str(guest_output.trim());
            }
            let full = format!("{error:?}");
            if let Some(backtrace) = full.split_once("wasm backtrace:") {
                detail.push_str("\nwasm backtrace:");
                detail.push_str(backtrace.1);
            }
            StepFailure::Trap {
                trap: *trap,
                detail,
            }
        }
        None => StepFailure::Host(format!("{error:#}")),
    }
}

/// Call `describe()` in a fresh instance with no host services.
pub(crate) fn describe(inst: &Instantiator<'_>) -> Result<PluginInfo, StepFailure> {
    let scope = StepScope {
        step: "describe".into(),
        ..StepScope::default()
    };
    inst.call(scope, Arc::new(NoServices), |store, handler| {
        handler.ksi_plugin_handler().call_describe(store)
    })
    .map(|(info, ..)| info)
}

/// Run one step and check its output.
pub(crate) fn run(
    inst: &Instantiator<'_>,
    info: &PluginInfo,
    input: &StepInput,
    services: Arc<dyn HostServices>,
) -> Result<StepResult, StepFailure> {
    if !info.steps.iter().any(|s| s.name == input.step) {
        return Err(StepFailure::UnknownStep {
            plugin: info.name.clone(),
            version: info.version.clone(),
            step: input.step.clone(),
            known: info
                .steps
                .iter()
                .map(|s| s.name.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        });
    }
    let scope = StepScope {
        plugin: info.name.clone(),
        plugin_version: info.version.clone(),
        workflow_id: input.workflow_id.clone(),
        workflow_type: input.workflow_type.clone(),
        step: input.step.clone(),
        step_index: input.step_index,
        attempt: input.attempt,
        call: 0,
    };
    let (outcome, guest_time, usage) = inst.call(scope, services, |store, handler| {
        handler.ksi_plugin_handler().call_run(store, input)
    })?;
    let output = outcome.map_err(|e| StepFailure::Failed {
        retryable: e.kind == ErrorKind::Retryable,
        message: e.message,
    })?;
    check_output(output, info, inst.limits.output_bytes, guest_time, usage)
}

fn check_output(
    output: StepOutput,
    info: &PluginInfo,
    limit: usize,
    guest_time: Duration,
    usage: HostUsage,
) -> Result<StepResult, StepFailure> {
    // What the step published and set through host calls is part of its output.
    let bytes = usage.output_bytes
        + output.result.len()
        + output.state_patch.len()
        + output
            .events
            .iter()
            .map(|e| e.topic.len() + e.data.len())
            .sum::<usize>();
    if bytes > limit {
        return Err(StepFailure::OutputTooLarge { bytes, limit });
    }
    let json = |what: &str, s: &str| {
        serde_json::from_str::<serde_json::Value>(s)
            .map_err(|e| StepFailure::InvalidOutput(format!("{what} is not JSON: {e}")))
    };
    let state_patch = json("the state patch", &output.state_patch)?;
    if !state_patch.is_object() && !state_patch.is_null() {
        return Err(StepFailure::InvalidOutput(
            "the state patch must be a JSON object (a merge patch)".into(),
        ));
    }
    let events = output
        .events
        .iter()
        .map(|e| {
            Ok((
                e.topic.clone(),
                json(&format!("event {}", e.topic), &e.data)?,
            ))
        })
        .collect::<Result<Vec<_>, StepFailure>>()?;
    Ok(StepResult {
        state_patch,
        result: json("the result", &output.result)?,
        next_step: output.next_step,
        events,
        plugin: info.name.clone(),
        plugin_version: info.version.clone(),
        guest_time,
    })
}

/// Host services for `describe()`: plugins must describe themselves without calling out.
struct NoServices;

const NOT_IN_DESCRIBE: &str = "host services are not available in describe()";

impl HostServices for NoServices {
    fn claude_complete(
        &self,
        _: &StepScope,
        _: ClaudeRequest,
    ) -> Result<ClaudeResponse, ClaudeError> {
        Err(ClaudeError {
            kind: ClaudeErrorKind::Permanent,
            message: NOT_IN_DESCRIBE.into(),
        })
    }

    fn publish(&self, _: &StepScope, _: &str, _: serde_json::Value) -> Result<u64, String> {
        Err(NOT_IN_DESCRIBE.into())
    }

    fn read_file(&self, _: &StepScope, _: &FileRef) -> Result<Vec<u8>, String> {
        Err(NOT_IN_DESCRIBE.into())
    }

    fn write_file(&self, _: &StepScope, _: &str, _: &[u8]) -> Result<FileRef, String> {
        Err(NOT_IN_DESCRIBE.into())
    }

    fn config_get(&self, _: &StepScope, _: &str) -> Option<String> {
        None
    }

    fn state_get(&self, _: &StepScope, _: &str) -> Option<String> {
        None
    }

    fn state_set(&self, _: &StepScope, _: &str, _: serde_json::Value) -> Result<(), String> {
        Err(NOT_IN_DESCRIBE.into())
    }

    /// `describe()` is pure: the same clocks and numbers on every load.
    fn guest_determinism(&self, _: &StepScope) -> Option<GuestDeterminism> {
        Some(GuestDeterminism {
            clock_origin: std::time::UNIX_EPOCH,
            seed: [0; 32],
        })
    }

    fn render_template(
        &self,
        _: &StepScope,
        _: &str,
        _: serde_json::Value,
    ) -> Result<String, String> {
        Err(NOT_IN_DESCRIBE.into())
    }
}

/// Apply a JSON merge patch (RFC 7396) to `target`: objects merge recursively, `null` deletes,
/// anything else replaces.
pub fn merge_patch(target: &mut serde_json::Value, patch: &serde_json::Value) {
    let serde_json::Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = serde_json::Value::Object(Default::default());
    }
    let target = target.as_object_mut().expect("just made an object");
    for (key, value) in patch {
        if value.is_null() {
            target.remove(key);
        } else {
            merge_patch(
                target.entry(key.clone()).or_insert(serde_json::Value::Null),
                value,
            );
        }
    }
}
