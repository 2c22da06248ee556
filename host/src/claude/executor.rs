//! The executor: runs Claude calls as supervised processes with durable records.
//!
//! One call, in order (each step is one transaction that also publishes its event):
//! 1. [`Executor::spawn_with`]: the PENDING row commits (with the repeated-prompt check);
//!    beside the call (once its CLI has started, or once it has to wait for its turn), the
//!    prompt goes to `prompts/queue/<id>.txt`, then its reference commits with
//!    `claude.spawn.request`. Nothing later is recorded before that commit.
//! 2. A task per call: for an agent, it takes the agent's turn lock (one call per agent at a time:
//!    two resumes of one session would fork it), reads the session to resume and the unread inbox.
//! 3. Each attempt passes spend control ([`super::spend`]): loop detector, budgets, spawn rate,
//!    concurrency. A refusal ends the call FAILED (`budget` / `loop_detected`).
//! 4. The CLI is spawned ([`super::supervise::run_attempt`]); on its pid the RUNNING row commits
//!    with `claude.spawn.started` (pid and start ticks, for orphan checks after a crash). Its
//!    stdout streams to a pending log ([`super::responses`]).
//! 5. Success: SUCCESS with the metrics, the response goes to `claude_logs/<session>.jsonl`, then
//!    COMPLETED with the response reference, the agent's new session, the archived prompt and
//!    `claude.spawn.complete`. The session log is fsynced before COMPLETED commits; that commit
//!    waits for the disk only if the RUNNING row has not reached it yet (else a power loss
//!    leaves a RUNNING row whose answer start-up finds in the session log). A new conversation
//!    gets its session id from KSI (`--session-id`), so its log exists before the answer.
//!    Failure: transient → RETRY (backoff + jitter) and again from 3, or DEAD when attempts
//!    are used up; permanent → FAILED at once with the CLI's message; each with
//!    `claude.spawn.failed`.
//!
//! After a daemon crash, [`Executor::reconcile`] settles every row the dead daemon left running,
//! and [`Executor::recover`] hands the workflow engine an answer that was already paid for.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rusqlite::{OptionalExtension, params};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::watch;

use super::accounting::{self, AttemptSpend};
use super::agents::{self, AgentProfile};
use super::classify::{FailureClass, PermanentKind, TransientKind, quota_resets_at};
use super::command::{ClaudeInvocation, SessionMode, default_binary};
use super::orphan::{OrphanCheck, kill_orphaned_group};
use super::responses::{self, FoundResult};
use super::retry::RetryPolicy;
use super::spend::{Admission, Payer, Refusal, SpendLimits};
use super::stream::ResultSummary;
use super::supervise::{AttemptOutcome, CancelToken, Limits, Progress, run_attempt_guarded};
use crate::bus::{self, Bus, BusError, Delivery, NewEvent};
use crate::crash_point::crash_point;
use crate::refs::{FileRef, Refs, sha256_hex};
use crate::store::{ExecCached, Store, now_ms};
use crate::workflow::{BoxFuture, ClaudeAnswer, ClaudeApi, ClaudeFailure, ClaudeRequest};

/// Static settings of the executor. The `config` table overrides them per call (see
/// [`ExecutorConfig::apply_settings`] for the keys).
#[derive(Debug, Clone)]
pub struct ExecutorConfig {
    /// The CLI (`KSI_CLAUDE_BIN`, else `claude` on `PATH`).
    pub binary: PathBuf,
    /// Model when neither the request nor the agent's profile names one.
    pub default_model: String,
    /// Timeouts of one attempt.
    pub limits: Limits,
    /// Retries of transient failures.
    pub retry: RetryPolicy,
    /// Concurrency, spawn rate, budgets, loop detector.
    pub spend: SpendLimits,
    /// Archived prompts older than this are deleted.
    pub archive_retention: Duration,
    /// Variables given to every CLI process on top of the clean environment.
    pub extra_env: Vec<(String, String)>,
    /// A call is not started when the data directory's disk has less free space than this:
    /// its answer could not be kept (`claude.min_free_mb`).
    pub min_free_bytes: u64,
    /// Whether the CLI inherits the daemon's PATH, HOME, LANG, `ANTHROPIC_*`, ... (see
    /// [`ClaudeInvocation::env`]); false gives it only `extra_env`.
    pub inherit_env: bool,
    /// How many steps below the daemon's CPU priority the CLIs run (`claude.nice`, 0-19): the
    /// daemon stays responsive while many CLIs start (see [`super::spawner`]).
    pub nice: i32,
    /// What a subscription limit does to a call (`claude.quota.on_limit`): `true` (`park`, the
    /// default) parks it until the limit resets, then runs it again by itself; `false`
    /// (`fail`) ends it DEAD with the CLI's message.
    pub quota_park: bool,
    /// How long a parked call waits when the CLI did not say when its limit resets
    /// (`claude.quota.fallback_wait_secs`); it then tries again (and parks again if need be).
    pub quota_fallback_wait: Duration,
}

/// A parked call runs this long after its limit's reset time (clocks differ).
const QUOTA_MARGIN: Duration = Duration::from_secs(5);

impl Default for ExecutorConfig {
    fn default() -> Self {
        ExecutorConfig {
            binary: default_binary(),
            default_model: "sonnet".into(),
            limits: Limits::default(),
            retry: RetryPolicy::default(),
            spend: SpendLimits::default(),
            archive_retention: Duration::from_secs(7 * 24 * 3600),
            extra_env: Vec::new(),
            inherit_env: true,
            min_free_bytes: 64 << 20,
            nice: 10,
            quota_park: true,
            quota_fallback_wait: Duration::from_secs(30 * 60),
        }
    }
}

impl ExecutorConfig {
    /// Applies the dynamic settings (all `claude.*` keys of the `config` table):
    /// `claude.model`, `claude.timeout.overall_secs`, `claude.timeout.no_output_secs`,
    /// `claude.timeout.kill_grace_ms`, `claude.retry.max_attempts`, `claude.retry.base_delay_ms`,
    /// `claude.retry.max_delay_ms`, `claude.prompts.archive_retention_secs`, `claude.min_free_mb`,
    /// `claude.nice`, and the spend keys of
    /// [`SpendLimits::apply_settings`] (`claude.max_concurrency`, `claude.model_concurrency`,
    /// `claude.spawn_rate_per_min`, `claude.budget.{global,agent,workflow}_{usd,tokens,calls}`,
    /// `claude.budget.window_secs`, `claude.budget.reserve_usd`, `claude.loop.max_repeats`,
    /// `claude.loop.window_secs`).
    pub fn apply_settings(&mut self, settings: &BTreeMap<String, Value>) {
        for (key, value) in settings {
            let ms = |v: &Value| v.as_f64().filter(|x| *x >= 0.0).map(|x| x as u64);
            match key.as_str() {
                "claude.model" => {
                    if let Some(m) = value.as_str() {
                        self.default_model = m.to_string();
                    }
                }
                "claude.timeout.overall_secs" => {
                    if let Some(v) = value.as_f64().filter(|x| *x > 0.0) {
                        self.limits.overall_timeout = Duration::from_secs_f64(v);
                    }
                }
                "claude.timeout.no_output_secs" => {
                    if let Some(v) = value.as_f64().filter(|x| *x > 0.0) {
                        self.limits.no_output_timeout = Duration::from_secs_f64(v);
                    }
                }
                "claude.quota.on_limit" => match value.as_str() {
                    Some("park") => self.quota_park = true,
                    Some("fail") => self.quota_park = false,
                    _ => {
                        tracing::warn!(%value, "claude.quota.on_limit is \"park\" or \"fail\"; keeping the current choice")
                    }
                },
                "claude.quota.fallback_wait_secs" => {
                    if let Some(v) = value.as_f64().filter(|x| *x > 0.0) {
                        self.quota_fallback_wait = Duration::from_secs_f64(v);
                    }
                }
                "claude.timeout.connect_secs" => {
                    if let Some(v) = value.as_f64().filter(|x| *x > 0.0) {
                        self.limits.connect_timeout = Duration::from_secs_f64(v);
                    }
                }
                "claude.timeout.kill_grace_ms" => {
                    if let Some(v) = ms(value) {
                        self.limits.kill_grace = Duration::from_millis(v);
                    }
                }
                "claude.retry.max_attempts" => {
                    if let Some(v) = ms(value) {
                        self.retry.max_attempts = (v as u32).max(1);
                    }
                }
                "claude.retry.base_delay_ms" => {
                    if let Some(v) = ms(value) {
                        self.retry.base_delay = Duration::from_millis(v);
                    }
                }
                "claude.retry.max_delay_ms" => {
                    if let Some(v) = ms(value) {
                        self.retry.max_delay = Duration::from_millis(v);
                    }
                }
                "claude.min_free_mb" => {
                    if let Some(v) = ms(value) {
                        self.min_free_bytes = v << 20;
                    }
                }
                "claude.nice" => {
                    if let Some(v) = value.as_i64().filter(|v| (0..=19).contains(v)) {
                        self.nice = v as i32;
                    }
                }
                "claude.prompts.archive_retention_secs" => {
                    if let Some(v) = ms(value) {
                        self.archive_retention = Duration::from_secs(v);
                    }
                }
                _ => {}
            }
        }
        self.spend.apply_settings(settings);
    }
}

/// Reads all `claude.*` settings.
fn claude_settings(store: &Store) -> BTreeMap<String, Value> {
    store
        .read(|c| {
            let mut st =
                c.prepare_cached("SELECT key, value FROM config WHERE key LIKE 'claude.%'")?;
            let rows = st.query_map([], |r| {
                let v: String = r.get(1)?;
                Ok((
                    r.get::<_, String>(0)?,
                    serde_json::from_str(&v).unwrap_or(Value::String(v)),
                ))
            })?;
            rows.collect::<rusqlite::Result<BTreeMap<_, _>>>()
                .map_err(crate::store::StoreError::from)
        })
        .unwrap_or_else(|e| {
            tracing::warn!(error = %e, "cannot read the claude.* settings; using the static ones");
            BTreeMap::new()
        })
}

/// Process statuses (the `processes.status` column).
pub mod status {
    /// Recorded, not started.
    pub const PENDING: &str = "PENDING";
    /// A CLI process runs.
    pub const RUNNING: &str = "RUNNING";
    /// The CLI reported a result; the response is being filed.
    pub const SUCCESS: &str = "SUCCESS";
    /// Done; the response is on file.
    pub const COMPLETED: &str = "COMPLETED";
    /// Failed for good (permanent failure, refusal, cancel).
    pub const FAILED: &str = "FAILED";
    /// A transient failure; another attempt follows.
    pub const RETRY: &str = "RETRY";
    /// Transient failures used up every attempt.
    pub const DEAD: &str = "DEAD";
}

/// A call as [`Executor::spawn`] takes it.
pub type SpawnRequest = ClaudeRequest;

/// Removes, when dropped, the session log pre-created for an attempt (`created`) if the
/// attempt did not log to it (its CLI printed no session id, or another one) and it is empty.
struct UnusedSessionLog<'a> {
    refs: &'a Refs,
    created: Option<&'a str>,
    used: Option<String>,
}

impl Drop for UnusedSessionLog<'_> {
    fn drop(&mut self) {
        let Some(created) = self.created.filter(|c| self.used.as_deref() != Some(*c)) else {
            return;
        };
        let path = self.refs.root().join(responses::session_path(created));
        if std::fs::metadata(&path).is_ok_and(|m| m.len() == 0) {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// The attempt whose answer a COMPLETED commit records, for its spend (counted once).
struct Counted {
    attempt: u32,
    spend: AttemptSpend,
    /// Completed by start-up recovery from a log, not by the attempt's own task.
    recovered: bool,
}

/// When a COMPLETED commit reaches the disk, relative to the answer going back to the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Durability {
    /// Before: the caller is answered once the commit is durable.
    BeforeAnswer,
    /// With the WAL's next sync, just after the answer (see [`Executor::complete`]).
    AfterAnswer,
}

impl Durability {
    /// As recorded in the row's metrics (`completed_commit`).
    fn as_str(self) -> &'static str {
        match self {
            Durability::BeforeAnswer => "durable_before_answer",
            Durability::AfterAnswer => "durable_after_answer",
        }
    }
}

/// One row of the `processes` table.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ProcessRow {
    /// Process (request) id.
    pub id: String,
    /// Workflow that made the call.
    pub workflow_id: Option<String>,
    /// Agent that made the call.
    pub agent_id: Option<String>,
    /// See [`status`].
    pub status: String,
    /// Model requested.
    pub model: Option<String>,
    /// Session the call ran in.
    pub session_id: Option<String>,
    /// Pid of the latest attempt.
    pub pid: Option<i64>,
    /// Start ticks of that pid.
    pub pid_start_ticks: Option<i64>,
    /// Attempts made.
    pub attempts: u32,
    /// Attempts allowed.
    pub max_attempts: u32,
    /// The prompt (JSON FileRef).
    pub prompt_file: Option<FileRef>,
    /// Response log path.
    pub response_file: Option<String>,
    /// Line of the result (or, for failures, of the envelope).
    pub response_line: Option<i64>,
    /// sha256 of that line.
    pub response_sha256: Option<String>,
    /// The failure, in the CLI's words where it had any.
    pub error: Option<String>,
    /// `transient.*`, `permanent.*`, `budget`, `loop_detected`.
    pub error_class: Option<String>,
    /// Next attempt time for RETRY (epoch ms).
    pub next_attempt_at: Option<i64>,
    /// Cost of all attempts (USD).
    pub cost_usd: Option<f64>,
    /// Input tokens of all attempts.
    pub tokens_in: Option<i64>,
    /// Output tokens.
    pub tokens_out: Option<i64>,
    /// Cache reads.
    pub tokens_cache_read: Option<i64>,
    /// Cache writes.
    pub tokens_cache_write: Option<i64>,
    /// Turns of the last attempt.
    pub num_turns: Option<i64>,
    /// CLI-reported duration of the last attempt.
    pub duration_ms: Option<i64>,
    /// CLI-reported API time of the last attempt.
    pub duration_api_ms: Option<i64>,
    /// Other measures (exit code, spawn-to-exit, ...).
    pub metrics: Option<Value>,
    /// Pending log of the current attempt.
    pub stream_file: Option<String>,
    /// Creation time (epoch ms).
    pub created_at: i64,
    /// First start (epoch ms).
    pub started_at: Option<i64>,
    /// End (epoch ms).
    pub completed_at: Option<i64>,
    /// Last change (epoch ms).
    pub updated_at: i64,
    /// The model that answered, as the CLI reported it (`model` is the alias asked for).
    #[serde(default)]
    pub resolved_model: Option<String>,
    /// Tokens and cost per model the CLI reported (subagents and side models included).
    #[serde(default)]
    pub model_usage: Option<Value>,
    /// The executable that ran the call.
    #[serde(default)]
    pub executable: Option<String>,
    /// The version its `init` line reported.
    #[serde(default)]
    pub cli_version: Option<String>,
    /// Whether its money is simulated (`fake-claude`): never counted against a budget.
    #[serde(default)]
    pub simulated: bool,
    /// A call parked by a subscription limit waits until this time (epoch ms).
    #[serde(default)]
    pub quota_until: Option<i64>,
    /// The highest attempt whose spend is in the totals (see [`super::accounting`]).
    #[serde(default)]
    pub counted_attempt: u32,
}

const PROCESS_COLUMNS: &str = "id, workflow_id, agent_id, status, model, session_id, pid, pid_start_ticks, attempts, max_attempts, prompt_file, response_file, response_line, response_sha256, error, error_class, next_attempt_at, cost_usd, tokens_in, tokens_out, tokens_cache_read, tokens_cache_write, num_turns, duration_ms, duration_api_ms, metrics, stream_file, created_at, started_at, completed_at, updated_at, resolved_model, model_usage, executable, cli_version, simulated, quota_until, counted_attempt";

fn read_process(r: &rusqlite::Row<'_>) -> rusqlite::Result<ProcessRow> {
    let json_col = |i: usize| -> rusqlite::Result<Option<String>> { r.get(i) };
    Ok(ProcessRow {
        id: r.get(0)?,
        workflow_id: r.get(1)?,
        agent_id: r.get(2)?,
        status: r.get(3)?,
        model: r.get(4)?,
        session_id: r.get(5)?,
        pid: r.get(6)?,
        pid_start_ticks: r.get(7)?,
        attempts: r.get(8)?,
        max_attempts: r.get(9)?,
        prompt_file: json_col(10)?.and_then(|s| serde_json::from_str(&s).ok()),
        response_file: r.get(11)?,
        response_line: r.get(12)?,
        response_sha256: r.get(13)?,
        error: r.get(14)?,
        error_class: r.get(15)?,
        next_attempt_at: r.get(16)?,
        cost_usd: r.get(17)?,
        tokens_in: r.get(18)?,
        tokens_out: r.get(19)?,
        tokens_cache_read: r.get(20)?,
        tokens_cache_write: r.get(21)?,
        num_turns: r.get(22)?,
        duration_ms: r.get(23)?,
        duration_api_ms: r.get(24)?,
        metrics: json_col(25)?.and_then(|s| serde_json::from_str(&s).ok()),
        stream_file: r.get(26)?,
        created_at: r.get(27)?,
        started_at: r.get(28)?,
        completed_at: r.get(29)?,
        updated_at: r.get(30)?,
        resolved_model: r.get(31)?,
        model_usage: json_col(32)?.and_then(|s| serde_json::from_str(&s).ok()),
        executable: r.get(33)?,
        cli_version: r.get(34)?,
        simulated: r.get(35)?,
        quota_until: r.get(36)?,
        counted_attempt: r.get(37)?,
    })
}

/// Reads one process row.
///
/// # Errors
/// A database error.
pub fn get_process(store: &Store, id: &str) -> Result<Option<ProcessRow>, BusError> {
    let id = id.to_string();
    store.read(move |c| {
        Ok(c.prepare_cached(&format!(
            "SELECT {PROCESS_COLUMNS} FROM processes WHERE id = ?1"
        ))?
        .query_row([id], read_process)
        .optional()?)
    })
}

/// Lists process rows, newest first.
///
/// # Errors
/// A database error.
pub fn list_processes(
    store: &Store,
    status: Option<&str>,
    limit: usize,
) -> Result<Vec<ProcessRow>, BusError> {
    let status = status.map(str::to_string);
    store.read(move |c| {
        let mut st = c.prepare(&format!(
            "SELECT {PROCESS_COLUMNS} FROM processes WHERE (?1 IS NULL OR status = ?1)
             ORDER BY created_at DESC, rowid DESC LIMIT ?2"
        ))?;
        let rows = st.query_map(params![status, limit as i64], read_process)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    })
}

/// What [`Executor::reconcile`] did.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ReconcileReport {
    /// Rows completed from a result line found on disk.
    pub completed: Vec<String>,
    /// Rows set to RETRY.
    pub retry: Vec<String>,
    /// Rows set to DEAD.
    pub dead: Vec<String>,
    /// Pids of orphaned process groups that were killed.
    pub killed_pids: Vec<u32>,
    /// Archived prompts deleted by retention.
    pub pruned_prompts: usize,
}

type Outcome = Result<ClaudeAnswer, ClaudeFailure>;

/// Where an attempt's log went: the result line (if any) and the envelope line.
type AttemptLog = (Option<FileRef>, FileRef);

struct InFlight {
    done: watch::Receiver<Option<Outcome>>,
    cancel: CancelToken,
    /// The task driving the call, for [`Executor::shutdown`].
    task: Option<tokio::task::AbortHandle>,
    /// A fresh call's prompt being saved while its CLI starts (see [`Executor::spawn_with`]);
    /// `None` when it was saved before the call started.
    prompt_saved: Option<PromptSaved>,
    /// Lets the prompt of a fresh call be saved (see [`Executor::start_prompt_save`]).
    save_prompt_now: Option<Arc<tokio::sync::Notify>>,
    /// While the call is parked by a subscription limit: until when (epoch ms), else 0.
    parked_until: Arc<std::sync::atomic::AtomicI64>,
}

/// Whether a fresh call's prompt file, its reference in the row and `claude.spawn.request` are
/// recorded (see [`Executor::save_prompt`]): `None` while they are being written.
type PromptSaved = watch::Receiver<Option<Result<(), ClaudeFailure>>>;

struct Inner {
    store: Store,
    bus: Bus,
    refs: Refs,
    /// Keeps `claude_logs/latest.jsonl` pointing at the log written last.
    latest: responses::LatestLink,
    config: ExecutorConfig,
    admission: Admission,
    calls: Mutex<HashMap<String, InFlight>>,
    agent_turns: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Kills the CLIs if this process dies; started at the first spawn (`None`: it could not
    /// be, and the CLIs get `PR_SET_PDEATHSIG` instead).
    guardian: std::sync::OnceLock<Option<super::guardian::Guardian>>,
}

/// Who pays for a call: its agent (with the profile's own budget) and its workflow.
fn payer_of(
    request: &SpawnRequest,
    workflow_id: &Option<String>,
    profile: &Option<AgentProfile>,
) -> Payer {
    Payer {
        agent: request.agent.clone(),
        workflow: workflow_id.clone(),
        agent_budget: profile.as_ref().and_then(AgentProfile::budget),
    }
}

/// A relative path with a directory in it (`./bin/claude`) made absolute: the CLI runs in its
/// agent's sandbox directory, where the relative path would name nothing. A bare name
/// (`claude`) is looked up on `PATH` and stays as it is.
fn absolute_binary(binary: PathBuf) -> PathBuf {
    if binary.is_relative() && binary.components().count() > 1 {
        std::path::absolute(&binary).unwrap_or(binary)
    } else {
        binary
    }
}

/// What the spawn path already knows of a row it just inserted (read back otherwise).
#[derive(Debug, Clone)]
struct KnownRow {
    rowid: i64,
    prompt_sha: String,
    attempts: u32,
    max_attempts: u32,
    /// The repeated-prompt check ran in the inserting transaction (with this outcome).
    loop_checked: bool,
    loop_refusal: Option<Refusal>,
    /// When the call was asked for, for the `before_spawn_us` metric.
    asked_at: Option<Instant>,
    /// The settings read when the call was asked for, for its first attempt when nothing
    /// stands between the two (a call of an agent may first wait for the agent's turn).
    config: Option<ExecutorConfig>,
}

/// Runs Claude calls; cheap to clone (all clones share limits, budgets and calls in flight).
#[derive(Clone)]
pub struct Executor {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Executor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Executor")
            .field("binary", &self.inner.config.binary)
            .finish()
    }
}

fn internal(e: impl std::fmt::Display) -> ClaudeFailure {
    let message = format!("KSI could not record the Claude call: {e}");
    ClaudeFailure {
        transient: true,
        class: if crate::store::message_is_disk_full(&message) {
            FailureClass::Transient(TransientKind::DiskFull).as_str()
        } else {
            "internal"
        }
        .into(),
        message,
    }
}

fn failure_of(class: &str, message: impl Into<String>, transient: bool) -> ClaudeFailure {
    ClaudeFailure {
        transient,
        class: class.to_string(),
        message: message.into(),
    }
}

/// A fresh process id: time-ordered, unique, safe in file names.
pub fn new_process_id() -> String {
    format!("p{}-{:08x}", now_ms(), rand::random::<u32>())
}

fn valid_process_id(id: &str) -> bool {
    responses::safe_session_id(id) && id.len() <= 100
}

/// The stored request (enough to run the call again after a restart).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredRequest {
    model: String,
    system_prompt: Option<String>,
    max_turns: Option<u32>,
    session: Option<String>,
}

impl Executor {
    /// An executor over an open data dir.
    pub fn new(store: Store, bus: Bus, refs: Refs, mut config: ExecutorConfig) -> Executor {
        config.binary = absolute_binary(config.binary);
        Executor {
            inner: Arc::new(Inner {
                store,
                bus,
                latest: responses::LatestLink::start(&refs),
                refs,
                config,
                admission: Admission::default(),
                calls: Mutex::default(),
                agent_turns: Mutex::default(),
                guardian: std::sync::OnceLock::new(),
            }),
        }
    }

    /// The static configuration.
    pub fn config(&self) -> &ExecutorConfig {
        &self.inner.config
    }

    /// The static configuration with the current dynamic settings applied.
    pub fn effective_config(&self) -> ExecutorConfig {
        let mut c = self.inner.config.clone();
        c.apply_settings(&claude_settings(&self.inner.store));
        c
    }

    /// Claude processes running now in this daemon.
    pub fn running(&self) -> usize {
        self.inner.admission.running()
    }

    /// Starts a call with a fresh process id; see [`Executor::spawn_with`].
    ///
    /// # Errors
    /// See [`Executor::spawn_with`].
    pub async fn spawn(&self, request: SpawnRequest) -> Result<String, ClaudeFailure> {
        self.spawn_with(new_process_id(), None, request).await
    }

    /// Records the call as a PENDING row and starts it in the background; [`Executor::wait`]
    /// gives the answer. A process id that already exists is not started again (its outcome is
    /// what `wait` gives).
    ///
    /// The CLI does not wait for the disk: the prompt goes to it on stdin while the prompt file
    /// (fsynced) and then its reference in the row with `claude.spawn.request` (one commit)
    /// are written beside it, so a burst of calls does not queue behind one fsync per prompt.
    /// The prompt write starts once the CLI has started (or once the call has to wait for its
    /// turn, or a caller needs it recorded), so the writes of the first calls of a burst do not
    /// take the CPU from the spawns of the others.
    /// Nothing of the call is reported before that commit (`claude.spawn.started` and every
    /// outcome wait for it), and a daemon that dies before it leaves at most a PENDING row
    /// without a prompt, which start-up reconciliation ends DEAD (its CLI is killed by the
    /// guardian within milliseconds, long before it could have been paid for).
    ///
    /// `durable`: return only once the prompt and the row are durable (for a caller that hands
    /// the id on, as `POST /spawn` does); otherwise at once.
    ///
    /// # Errors
    /// An invalid process or agent id, an unreadable agent profile, or a store failure.
    pub async fn spawn_with(
        &self,
        process_id: String,
        workflow_id: Option<String>,
        request: SpawnRequest,
    ) -> Result<String, ClaudeFailure> {
        self.start_call(process_id, workflow_id, request, true)
            .await
    }

    async fn start_call(
        &self,
        process_id: String,
        workflow_id: Option<String>,
        request: SpawnRequest,
        durable: bool,
    ) -> Result<String, ClaudeFailure> {
        let inner = &self.inner;
        if !valid_process_id(&process_id) {
            return Err(failure_of(
                "invalid_request",
                format!(
                    "{process_id:?} is not a valid process id: use letters, digits, '-' or '_'"
                ),
                false,
            ));
        }
        // The session id names a log file and goes to `--resume`: only the shape session ids
        // have (a client's `../../etc/passwd` is refused here, before anything runs).
        if let Some(s) = request.session.as_deref()
            && !responses::safe_session_id(s)
        {
            return Err(failure_of(
                "invalid_request",
                format!(
                    "{s:?} is not a session id: a session id is at most 128 letters, digits, '-' or '_' (the CLI's are UUIDs); `ksi sessions` lists them"
                ),
                false,
            ));
        }
        let asked_at = Instant::now();
        // Claim the id in memory first, so two concurrent spawns of one id cannot both run it.
        let (done_tx, done_rx) = watch::channel(None);
        let (saved_tx, saved_rx) = watch::channel(None);
        let save_now = Arc::new(tokio::sync::Notify::new());
        let cancel = CancelToken::new();
        {
            let mut calls = inner.calls.lock().unwrap();
            if calls.contains_key(&process_id) {
                return Ok(process_id);
            }
            calls.insert(
                process_id.clone(),
                InFlight {
                    done: done_rx,
                    cancel: cancel.clone(),
                    task: None,
                    prompt_saved: Some(saved_rx),
                    save_prompt_now: Some(save_now.clone()),
                    parked_until: Arc::default(),
                },
            );
        }
        let release = |id: &str| {
            inner.calls.lock().unwrap().remove(id);
        };
        let eff = self.effective_config();
        let profile = match &request.agent {
            Some(agent) => {
                match agents::ensure(&inner.store, &inner.bus, inner.refs.root(), agent).await {
                    Ok((_, p)) => Some(p),
                    Err(m) => {
                        release(&process_id);
                        return Err(failure_of("invalid_request", m, false));
                    }
                }
            }
            None => None,
        };
        let model = request
            .model
            .clone()
            .or_else(|| profile.as_ref().and_then(|p| p.model.clone()))
            .unwrap_or(eff.default_model.clone());
        let stored = StoredRequest {
            model: model.clone(),
            system_prompt: request.system_prompt.clone(),
            max_turns: request.max_turns,
            session: request.session.clone(),
        };
        let prompt_sha = sha256_hex(request.prompt.as_bytes());
        // Relaxed: a durable commit of the call comes later in the same WAL (its prompt's for
        // `durable`, else its outcome's); a row lost with the machine before that is a call
        // whose CLI died with the machine.
        let insert = {
            let (id, wf, agent) = (
                process_id.clone(),
                workflow_id.clone(),
                request.agent.clone(),
            );
            let max_attempts = eff.retry.max_attempts;
            let model = model.clone();
            let req_json = serde_json::to_string(&stored).unwrap_or_default();
            let prompt_sha = prompt_sha.clone();
            let (admission, spend) = (inner.admission.clone(), eff.spend.clone());
            let payer = payer_of(&request, &workflow_id, &profile);
            inner
                .store
                .write_relaxed(move |tx| {
                    let now = now_ms();
                    let inserted = tx.exec(
                        "INSERT INTO processes(id, workflow_id, agent_id, status, model, attempts, max_attempts,
                            prompt_sha256, request, created_at, updated_at)
                         VALUES (?1, ?2, ?3, 'PENDING', ?4, 0, ?5, ?6, ?7, ?8, ?8)
                         ON CONFLICT(id) DO NOTHING",
                        params![id, wf, agent, model, max_attempts, prompt_sha, req_json, now],
                    )?;
                    if inserted == 0 {
                        return Ok(None);
                    }
                    let rowid = tx.last_insert_rowid();
                    // In the same transaction: calls of the same prompt committed before this
                    // one, concurrent ones included, are all seen.
                    let looping = admission.check_loop(tx, &spend, &payer, &prompt_sha, rowid)?;
                    Ok::<_, BusError>(Some((rowid, looping)))
                })
                .await
        };
        let (rowid, loop_refusal) = match insert {
            Ok(Some(inserted)) => inserted,
            Ok(None) => {
                release(&process_id);
                return Ok(process_id);
            }
            Err(e) => {
                release(&process_id);
                return Err(internal(e));
            }
        };
        tokio::spawn(self.clone().save_prompt(
            process_id.clone(),
            workflow_id.clone(),
            request.agent.clone(),
            model.clone(),
            request.prompt.clone(),
            durable,
            saved_tx,
            save_now.clone(),
        ));

        let known = KnownRow {
            rowid,
            prompt_sha,
            attempts: 0,
            max_attempts: eff.retry.max_attempts,
            loop_checked: true,
            loop_refusal,
            asked_at: Some(asked_at),
            config: request.agent.is_none().then_some(eff),
        };
        let this = self.clone();
        let id = process_id.clone();
        let task = async move {
            let out = this
                .clone()
                .drive(
                    id.clone(),
                    workflow_id,
                    request,
                    profile,
                    model,
                    cancel,
                    Some(known),
                )
                .await;
            // However the call ended, its prompt is saved.
            save_now.notify_one();
            let _ = done_tx.send(Some(out));
            this.inner.calls.lock().unwrap().remove(&id);
        };
        self.start(&process_id, task);
        if durable {
            self.prompt_recorded(&process_id).await?;
        }
        Ok(process_id)
    }

    /// Writes a fresh call's prompt to `prompts/queue/<id>.txt` (fsynced), then its reference
    /// and `claude.spawn.request` in one commit, and says how that went on `saved`.
    ///
    /// `durable`: the commit waits for the disk. Otherwise it is relaxed: the caller waits for
    /// the answer, whose durable COMPLETED commit comes later in the same WAL and so makes
    /// this one durable too.
    #[allow(clippy::too_many_arguments)]
    async fn save_prompt(
        self,
        id: String,
        workflow_id: Option<String>,
        agent: Option<String>,
        model: String,
        prompt: String,
        durable: bool,
        saved: watch::Sender<Option<Result<(), ClaudeFailure>>>,
        save_now: Arc<tokio::sync::Notify>,
    ) {
        save_now.notified().await;
        let refs = self.inner.refs.clone();
        let rel = format!("prompts/queue/{id}.txt");
        let written = tokio::task::spawn_blocking(move || refs.write(&rel, prompt.as_bytes()))
            .await
            .map_err(internal)
            .and_then(|w| w.map_err(internal));
        let recorded = match written {
            Ok(prompt_ref) => {
                let record = move |tx: &crate::store::Tx<'_>| {
                    tx.exec(
                        "UPDATE processes SET prompt_file = ?2, updated_at = ?3 WHERE id = ?1",
                        params![
                            id,
                            serde_json::to_string(&prompt_ref).unwrap_or_default(),
                            now_ms()
                        ],
                    )?;
                    bus::publish_in(
                        tx,
                        &NewEvent::new(
                            "claude.spawn.request",
                            json!({
                                "process_id": id, "workflow_id": workflow_id, "agent_id": agent,
                                "model": model, "prompt": prompt_ref,
                            }),
                        )
                        .correlated(id.clone()),
                    )?;
                    Ok::<_, BusError>(())
                };
                let store = &self.inner.store;
                if durable {
                    store.write(record).await
                } else {
                    store.write_relaxed(record).await
                }
                .map_err(internal)
            }
            Err(e) => Err(e),
        };
        let _ = saved.send(Some(recorded));
    }

    /// Lets a fresh call's prompt be saved now. It is saved once the CLI has started, or
    /// once the call has to wait (its turn, a slot), or when something needs it recorded:
    /// in a burst of calls, the prompt writes of the first ones do not hold up the spawns of
    /// the others.
    fn start_prompt_save(&self, id: &str) {
        let save_now = (self.inner.calls.lock().unwrap())
            .get(id)
            .and_then(|c| c.save_prompt_now.clone());
        if let Some(save_now) = save_now {
            save_now.notify_one();
        }
    }

    /// Awaits `fut`; if it cannot complete at once (the call waits for its turn), first lets
    /// the call's prompt be saved, so a call that waits is recorded whole while it does.
    async fn saving_prompt_if_waiting<F: std::future::Future>(
        &self,
        id: &str,
        fut: F,
    ) -> F::Output {
        let mut fut = std::pin::pin!(fut);
        let mut waited = false;
        std::future::poll_fn(|cx| {
            let r = fut.as_mut().poll(cx);
            if r.is_pending() && !waited {
                waited = true;
                self.start_prompt_save(id);
            }
            r
        })
        .await
    }

    /// Waits until a fresh call's prompt is recorded (see [`Executor::spawn_with`]); at once
    /// for a call whose prompt was recorded before it started. The error says why it could not
    /// be.
    async fn prompt_recorded(&self, id: &str) -> Result<(), ClaudeFailure> {
        self.start_prompt_save(id);
        let rx = self
            .inner
            .calls
            .lock()
            .unwrap()
            .get(id)
            .and_then(|c| c.prompt_saved.clone());
        let Some(mut rx) = rx else {
            return Ok(());
        };
        match rx.wait_for(Option::is_some).await {
            Ok(v) => v.clone().expect("checked by wait_for"),
            Err(_) => Err(internal(
                "the task saving the prompt ended without an answer",
            )),
        }
    }

    /// Spawns the task that drives call `id`, in a tracing span carrying the process id.
    fn start(&self, id: &str, task: impl std::future::Future<Output = ()> + Send + 'static) {
        use tracing::Instrument;
        let span = tracing::info_span!("claude_call", process_id = %id);
        let task = async move {
            tracing::info!("Claude call started");
            task.await;
            tracing::info!("Claude call finished");
        };
        let handle = tokio::spawn(task.instrument(span));
        if let Some(c) = self.inner.calls.lock().unwrap().get_mut(id) {
            c.task = Some(handle.abort_handle());
        }
    }

    /// Stops every call in flight, for a daemon that exits: their tasks are dropped, which kills
    /// each CLI's process group (see [`super::supervise::run_attempt`]). Their rows stay as they are (PENDING,
    /// RUNNING, RETRY) for [`Executor::reconcile`] at the next start, which completes those whose
    /// result reached the disk and retries the others. Returns how many calls were stopped.
    pub async fn shutdown(&self) -> usize {
        let handles: Vec<tokio::task::AbortHandle> = self
            .inner
            .calls
            .lock()
            .unwrap()
            .drain()
            .filter_map(|(_, c)| c.task)
            .collect();
        for h in &handles {
            h.abort();
        }
        for _ in 0..200 {
            if handles.iter().all(tokio::task::AbortHandle::is_finished) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        handles.len()
    }

    /// Waits for a call's outcome: from the task running it, or from its row when it ended.
    ///
    /// # Errors
    /// The call failed (the failure says how), or no such call exists, or its row was left
    /// unfinished by a previous daemon (run [`Executor::reconcile`]).
    pub async fn wait(&self, process_id: &str) -> Outcome {
        let rx = self
            .inner
            .calls
            .lock()
            .unwrap()
            .get(process_id)
            .map(|c| c.done.clone());
        if let Some(mut rx) = rx
            && let Ok(v) = rx.wait_for(Option::is_some).await
        {
            return v.clone().expect("checked by wait_for");
        }
        let row = get_process(&self.inner.store, process_id)
            .map_err(internal)?
            .ok_or_else(|| {
                failure_of(
                    "not_found",
                    format!("no Claude process {process_id:?}"),
                    false,
                )
            })?;
        self.outcome_of_row(&row).unwrap_or_else(|| {
            Err(failure_of(
                "unfinished",
                format!(
                    "Claude process {process_id} is {} but not running in this daemon; start-up reconciliation settles it",
                    row.status
                ),
                true,
            ))
        })
    }

    /// Cancels a call: kills its process group (if running) and ends it FAILED
    /// (`permanent.cancelled`). Returns whether the call was in flight here.
    pub fn cancel(&self, process_id: &str) -> bool {
        match self.inner.calls.lock().unwrap().get(process_id) {
            Some(c) => {
                c.cancel.cancel();
                true
            }
            None => false,
        }
    }

    /// The outcome recorded in a terminal row.
    fn outcome_of_row(&self, row: &ProcessRow) -> Option<Outcome> {
        match row.status.as_str() {
            status::COMPLETED => Some(
                self.answer_from_row(row)
                    .ok_or_else(|| internal("the response of a completed process cannot be read")),
            ),
            status::FAILED | status::DEAD => Some(Err(ClaudeFailure {
                transient: row.status == status::DEAD,
                class: row.error_class.clone().unwrap_or_default(),
                message: row.error.clone().unwrap_or_default(),
            })),
            _ => None,
        }
    }

    fn answer_from_row(&self, row: &ProcessRow) -> Option<ClaudeAnswer> {
        let r = FileRef {
            path: row.response_file.clone()?,
            line: row.response_line.map(|l| l as u64),
            offset: row
                .metrics
                .as_ref()
                .and_then(|m| m.get("response_offset"))
                .and_then(Value::as_u64),
            sha256: row.response_sha256.clone()?,
            bytes: row
                .metrics
                .as_ref()
                .and_then(|m| m.get("response_bytes"))
                .and_then(Value::as_u64)
                .unwrap_or(0),
        };
        let mut result = responses::read_result(&self.inner.refs, &r)?;
        if result.text.as_deref().is_none_or(|t| t.trim().is_empty()) {
            // The CLI printed an empty `result`: the answer is in the attempt's stream, which
            // its session log holds before the result line.
            if let Some(found) = responses::logged_result_in(&self.inner.refs, &r.path, &row.id) {
                result = found.result;
            }
        }
        Some(ClaudeAnswer {
            text: result.text.clone().unwrap_or_default(),
            session_id: result.session_id.clone().unwrap_or_default(),
            response_ref: Some(r),
            model: row
                .resolved_model
                .clone()
                .or_else(|| row.model.clone())
                .unwrap_or_default(),
            requested_model: row.model.clone().unwrap_or_default(),
            simulated: row.simulated,
            tokens_in: row.tokens_in.unwrap_or(0) as u64,
            tokens_out: row.tokens_out.unwrap_or(0) as u64,
            tokens_cache_read: row.tokens_cache_read.unwrap_or(0) as u64,
            tokens_cache_write: row.tokens_cache_write.unwrap_or(0) as u64,
            cost_usd: row.cost_usd.unwrap_or(0.0),
            duration_ms: row.duration_ms.unwrap_or(0) as u64,
            process_id: row.id.clone(),
        })
    }

    /// Notes that call `id` is parked by a subscription limit until `until` (epoch ms; 0: no
    /// longer), for [`ClaudeApi::parked_until`].
    fn set_parked(&self, id: &str, until: i64) {
        if let Some(c) = self.inner.calls.lock().unwrap().get(id) {
            c.parked_until
                .store(until, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Until when (epoch ms) a running call is parked by a subscription limit.
    pub fn parked_until(&self, process_id: &str) -> Option<i64> {
        let calls = self.inner.calls.lock().unwrap();
        let until = calls
            .get(process_id)?
            .parked_until
            .load(std::sync::atomic::Ordering::Relaxed);
        (until > 0).then_some(until)
    }

    /// The calls of `workflow_id` parked by a subscription limit: until when the first of them
    /// waits (epoch ms), for `ksi workflows`.
    ///
    /// # Errors
    /// A database error.
    pub fn workflow_quota_wait(store: &Store, workflow_id: &str) -> Result<Option<i64>, BusError> {
        let id = workflow_id.to_string();
        store.read(move |c| {
            Ok(c.prepare_cached(
                "SELECT MAX(quota_until) FROM processes
                 WHERE workflow_id = ?1 AND status = 'RETRY' AND quota_until IS NOT NULL",
            )?
            .query_row([id], |r| r.get::<_, Option<i64>>(0))?)
        })
    }

    fn agent_turn(&self, agent: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.inner
            .agent_turns
            .lock()
            .unwrap()
            .entry(agent.to_string())
            .or_default()
            .clone()
    }

    /// Runs a recorded call to its end (all attempts). Called on the call's own task.
    #[allow(clippy::too_many_arguments)]
    async fn drive(
        self,
        id: String,
        workflow_id: Option<String>,
        request: SpawnRequest,
        profile: Option<AgentProfile>,
        model: String,
        cancel: CancelToken,
        known: Option<KnownRow>,
    ) -> Outcome {
        let inner = &self.inner;
        let turn = request.agent.as_deref().map(|a| self.agent_turn(a));
        let _turn = match &turn {
            Some(t) => Some(self.saving_prompt_if_waiting(&id, t.lock()).await),
            None => None,
        };
        // The session to continue: an explicit one, else the agent's current one.
        let mut session = request.session.clone();
        let mut inbox: Vec<Delivery> = Vec::new();
        let mut prompt = request.prompt.clone();
        if let Some(agent) = &request.agent {
            let row = inner
                .store
                .read_async({
                    let a = agent.clone();
                    move |c| agents::get(c, &a).map_err(BusError::from)
                })
                .await
                .map_err(internal)?;
            if session.is_none() {
                session = row.and_then(|r| r.current_session_id);
            }
            match agents::claim_inbox(&inner.bus, agent).await {
                Ok(d) => inbox = d,
                Err(e) => tracing::warn!(agent, error = %e, "cannot read the agent's inbox"),
            }
            if let Some(text) = agents::render_inbox(&inbox) {
                // The queued prompt is replaced below: after it has been written.
                if let Err(f) = self.prompt_recorded(&id).await {
                    return self.unrecorded(&id, &request.agent, 0, f).await;
                }
                prompt = format!("{text}{prompt}");
                // The prompt as sent replaces the queued one; the inbox is acked with it.
                let pref = inner
                    .refs
                    .write(&format!("prompts/queue/{id}.txt"), prompt.as_bytes())
                    .map_err(internal)?;
                let (idc, inbox2) = (id.clone(), inbox.clone());
                inner
                    .store
                    .write(move |tx| {
                        tx.exec(
                            "UPDATE processes SET prompt_file = ?2, updated_at = ?3 WHERE id = ?1",
                            params![
                                idc,
                                serde_json::to_string(&pref).unwrap_or_default(),
                                now_ms()
                            ],
                        )?;
                        agents::ack_inbox_in(tx, &inbox2)
                    })
                    .await
                    .map_err(internal)?;
            }
        }
        let payer = payer_of(&request, &workflow_id, &profile);
        let row = match known {
            Some(k) => k,
            None => inner
                .store
                .read_async({
                    let id = id.clone();
                    move |c| {
                        Ok::<_, BusError>(c.query_row(
                            "SELECT rowid, prompt_sha256, attempts, max_attempts FROM processes WHERE id = ?1",
                            [id],
                            |r| {
                                Ok(KnownRow {
                                    rowid: r.get(0)?,
                                    prompt_sha: r.get(1)?,
                                    attempts: r.get(2)?,
                                    max_attempts: r.get(3)?,
                                    loop_checked: false,
                                    loop_refusal: None,
                                    asked_at: None,
                                    config: None,
                                })
                            },
                        )?)
                    }
                })
                .await
                .map_err(internal)?,
        };
        let KnownRow {
            rowid,
            prompt_sha,
            attempts: mut attempt,
            max_attempts,
            loop_checked,
            mut loop_refusal,
            asked_at,
            config: mut first_config,
        } = row;

        loop {
            let eff = first_config
                .take()
                .unwrap_or_else(|| self.effective_config());
            let retry = RetryPolicy {
                max_attempts,
                ..eff.retry
            };
            // Spend control, before every spawn. The loop check of a fresh call ran in the
            // transaction that inserted it; a ledger is read only for limited budgets.
            let first = attempt == 0;
            let refusal = if let Some(r) = loop_refusal.take().filter(|_| first) {
                Err(r)
            } else if !eff.spend.needs_ledger(&payer) && (!first || loop_checked) {
                Ok(inner.admission.reserve_unmetered(&eff.spend, &payer))
            } else {
                let store = inner.store.clone();
                let (adm, spend, payer2, sha) = (
                    inner.admission.clone(),
                    eff.spend.clone(),
                    payer.clone(),
                    prompt_sha.clone(),
                );
                tokio::task::spawn_blocking(move || {
                    store.read(|c| {
                        if first
                            && !loop_checked
                            && let Some(r) = adm.check_loop(c, &spend, &payer2, &sha, rowid)?
                        {
                            return Ok::<_, BusError>(Err(r));
                        }
                        Ok(adm.reserve(c, &spend, &payer2)?)
                    })
                })
                .await
                .map_err(internal)?
                .map_err(internal)?
            };
            let ticket = match refusal {
                Ok(t) => Arc::new(t),
                Err(refusal) => return self.refuse(&id, &request, &workflow_id, refusal).await,
            };
            tokio::select! {
                _ = self.saving_prompt_if_waiting(&id, inner.admission.rate_limit(eff.spend.spawn_rate_per_min)) => {}
                _ = cancel.cancelled() => return self.cancelled(&id, &request.agent, attempt).await,
            }
            let slot = tokio::select! {
                s = self.saving_prompt_if_waiting(&id, inner.admission.slot(&eff.spend, &model)) => s,
                _ = cancel.cancelled() => return self.cancelled(&id, &request.agent, attempt).await,
            };

            // A full disk would lose the answer (the CLI writes it to a file in the data dir):
            // the call is not made. Transient: it can run once space is freed.
            if let Some(free) = crate::store::fs_free_bytes(inner.refs.root())
                && free < eff.min_free_bytes
            {
                let msg = format!(
                    "the Claude call was not started: the disk of the data directory {} has {} MiB free, less than the {} MiB (claude.min_free_mb) needed to keep its answer. Free space on that disk and run it again",
                    inner.refs.root().display(),
                    free >> 20,
                    eff.min_free_bytes >> 20
                );
                tracing::error!(free_bytes = free, "{msg}");
                return self
                    .finish_failed(
                        &id,
                        &request.agent,
                        attempt,
                        &FailureClass::Transient(TransientKind::DiskFull),
                        &msg,
                        None,
                    )
                    .await;
            }
            attempt += 1;
            let mut inv = self.invocation(&eff, &request, &profile, &model, &prompt, &session);
            // A new conversation gets its id from KSI (`--session-id`; one per attempt, as the
            // CLI would pick), so its session log is created, its name made durable, while the
            // CLI runs rather than after it answered.
            let fresh_session = session.is_none().then(|| uuid::Uuid::new_v4().to_string());
            if let Some(s) = &fresh_session {
                inv.session = SessionMode::WithId(s.clone());
            }
            let mut session_log: Option<tokio::task::JoinHandle<()>> = None;
            let stream_rel = responses::pending_path(&id, attempt);
            // The CLI writes its stdout straight into the pending log: an answer it printed is
            // in a file even if the daemon dies before reading it, so it is never paid twice.
            inv.stdout_file = responses::create_pending(&inner.refs, &stream_rel).ok();
            let mut running_write: Option<tokio::task::JoinHandle<Option<i64>>> = None;

            let t_spawn = Instant::now();
            let before_spawn = asked_at.map(|a| t_spawn - a);
            let guardian = inner
                .guardian
                .get_or_init(|| match super::guardian::Guardian::start() {
                    Ok(g) => Some(g),
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot start the Claude process guardian; the CLIs get PR_SET_PDEATHSIG instead");
                        None
                    }
                })
                .as_ref();
            let result = run_attempt_guarded(&inv, &eff.limits, &cancel, guardian, |p| match p {
                Progress::Spawned { pid, start_ticks } => {
                    self.start_prompt_save(&id);
                    if let Some(s) = &fresh_session {
                        let (refs, rel) = (inner.refs.clone(), responses::session_path(s));
                        session_log = Some(tokio::task::spawn_blocking(move || {
                            if let Err(e) = refs.create_durable(&rel) {
                                tracing::warn!(error = %e, "cannot create the session log ahead of the answer; it is created with it");
                            }
                        }));
                    }
                    running_write = Some(tokio::spawn(self.clone().record_running(
                        id.clone(),
                        attempt,
                        pid,
                        start_ticks,
                        stream_rel.clone(),
                        fresh_session.clone().or_else(|| session.clone()),
                        request.agent.clone(),
                        ticket.clone(),
                        inv.binary.display().to_string(),
                    )));
                }
                Progress::Line(_) | Progress::Event(_) => {}
            })
            .await;
            // The slot is held until the attempt's outcome is recorded, so a RUNNING row never
            // outnumbers the limit.
            let running_event = match running_write {
                Some(h) => h.await.ok().flatten(),
                None => None,
            };
            // The attempt's lines go to that log only once its name is durable.
            if let Some(h) = session_log {
                let _ = h.await;
            }
            // Whatever the attempt logs below, a pre-created session log it did not use goes.
            let _unused_log = UnusedSessionLog {
                refs: &inner.refs,
                created: fresh_session.as_deref(),
                used: result
                    .as_ref()
                    .ok()
                    .and_then(|o| o.run.session_id().map(str::to_string)),
            };
            // A prompt that could not be saved stopped the attempt (see `record_running`);
            // an answer that came anyway is kept, it was paid for.
            if let Err(f) = self.prompt_recorded(&id).await
                && !result
                    .as_ref()
                    .is_ok_and(|o| o.failure.is_none() && o.result().is_some())
            {
                let _ = std::fs::remove_file(inner.refs.root().join(&stream_rel));
                return self.unrecorded(&id, &request.agent, attempt, f).await;
            }
            let outcome = match result {
                Ok(o) => o,
                Err(spawn_err) => {
                    let class = spawn_err.failure_class();
                    let msg = spawn_err.to_string();
                    let _ = std::fs::remove_file(inner.refs.root().join(&stream_rel));
                    // Not spawned: no call was made, so it does not count.
                    return self
                        .finish_failed(&id, &request.agent, attempt - 1, &class, &msg, None)
                        .await;
                }
            };
            let wall = t_spawn.elapsed();
            match outcome.failure.clone() {
                None if outcome.result().is_some() => {
                    let out = self
                        .complete(
                            &id,
                            &request,
                            &workflow_id,
                            &model,
                            attempt,
                            &outcome,
                            &stream_rel,
                            wall,
                            before_spawn,
                            running_event,
                        )
                        .await;
                    drop(ticket);
                    return out;
                }
                failure => {
                    let (class, message) = match failure {
                        Some(f) => (f.class, f.message),
                        None => (
                            FailureClass::Transient(TransientKind::NoResult),
                            "the Claude CLI ended without a result line".to_string(),
                        ),
                    };
                    let log = self.log_attempt(
                        &id,
                        &request,
                        attempt,
                        &outcome,
                        &stream_rel,
                        Some(&class),
                        Some(&message),
                    );
                    let moved = log.as_ref().is_some_and(|(_, e)| e.path != stream_rel);
                    // A subscription limit is not a failed attempt: the call is parked until
                    // the limit resets, however many attempts it has used.
                    let (delay, message) = match class {
                        FailureClass::Quota(_) if eff.quota_park => {
                            let now = now_ms();
                            let until = quota_resets_at(&outcome.run, &message, now)
                                .unwrap_or(now + eff.quota_fallback_wait.as_millis() as i64);
                            let wait =
                                Duration::from_millis((until - now).max(0) as u64) + QUOTA_MARGIN;
                            self.set_parked(&id, now + wait.as_millis() as i64);
                            let text = format!(
                                "{message} — parked until {}; it runs again by itself (claude.quota.on_limit = park)",
                                crate::cli::claude::hour_minute_utc(now + wait.as_millis() as i64)
                            );
                            (Some(wait), text)
                        }
                        FailureClass::Quota(_) => (None, message),
                        _ => (retry.next_delay(attempt, &class), message),
                    };
                    if let Some(delay) = delay.filter(|_| !cancel.is_cancelled()) {
                        self.record_retry(
                            &id,
                            &request.agent,
                            attempt,
                            &class,
                            &message,
                            &outcome,
                            delay,
                            log,
                        )
                        .await;
                        self.drop_stream(&stream_rel, moved);
                        drop(slot);
                        drop(ticket);
                        tokio::select! {
                            _ = tokio::time::sleep(delay) => {}
                            _ = cancel.cancelled() => return self.cancelled(&id, &request.agent, attempt).await,
                        }
                        self.set_parked(&id, 0);
                        continue;
                    }
                    let out = self
                        .finish_failed(
                            &id,
                            &request.agent,
                            attempt,
                            &class,
                            &message,
                            Some((&outcome, log)),
                        )
                        .await;
                    self.drop_stream(&stream_rel, moved);
                    drop(ticket);
                    return out;
                }
            }
        }
    }

    fn invocation(
        &self,
        eff: &ExecutorConfig,
        request: &SpawnRequest,
        profile: &Option<AgentProfile>,
        model: &str,
        prompt: &str,
        session: &Option<String>,
    ) -> ClaudeInvocation {
        let mut inv = ClaudeInvocation::new(model, prompt);
        inv.binary = eff.binary.clone();
        inv.extra_env = eff.extra_env.clone();
        inv.inherit_env = eff.inherit_env;
        inv.nice = eff.nice;
        if let Some(s) = session {
            inv.session = SessionMode::Resume(s.clone());
        }
        inv.append_system_prompt = request
            .system_prompt
            .clone()
            .or_else(|| profile.as_ref().and_then(|p| p.system_prompt.clone()));
        inv.max_turns = request
            .max_turns
            .or_else(|| profile.as_ref().and_then(|p| p.max_turns));
        if let Some(p) = profile {
            inv.allowed_tools = p.allowed_tools.clone();
            inv.disallowed_tools = p.disallowed_tools.clone();
            inv.permission_mode = p.permission_mode.clone();
        }
        if let Some(agent) = &request.agent {
            inv.working_dir = Some(self.inner.refs.root().join(agents::AGENTS_DIR).join(agent));
        }
        inv
    }

    #[allow(clippy::too_many_arguments)]
    async fn record_running(
        self,
        id: String,
        attempt: u32,
        pid: u32,
        start_ticks: Option<u64>,
        stream_rel: String,
        session: Option<String>,
        agent: Option<String>,
        ticket: Arc<super::spend::Ticket>,
        executable: String,
    ) -> Option<i64> {
        // `claude.spawn.started` after `claude.spawn.request`. A prompt that cannot be saved
        // stops the call: it could not be retried or audited.
        if let Err(f) = self.prompt_recorded(&id).await {
            tracing::error!(error = %f, "cannot save the prompt of a running Claude call; stopping it");
            self.cancel(&id);
            return None;
        }
        // Relaxed: a pid means something only while the machine that ran it is up. A crash of
        // the daemon keeps the commit (it is in the WAL); after a power loss the row is still
        // PENDING, which start-up reconciliation retries like a RUNNING row whose CLI is gone.
        let r = self
            .inner
            .store
            .write_relaxed(move |tx| {
                let now = now_ms();
                tx.exec(
                    "UPDATE processes SET status = 'RUNNING', pid = ?2, pid_start_ticks = ?3, attempts = ?4,
                        stream_file = ?5, started_at = COALESCE(started_at, ?6), next_attempt_at = NULL,
                        session_id = COALESCE(?7, session_id), executable = ?8, quota_until = NULL,
                        updated_at = ?6 WHERE id = ?1",
                    params![id, pid, start_ticks.map(|t| t as i64), attempt, stream_rel, now, session, executable],
                )?;
                // The spawn-rate limit's memory across restarts (see `Executor::reconcile`).
                tx.exec("INSERT INTO spawn_times(at) VALUES (?1)", [now])?;
                tx.exec("DELETE FROM spawn_times WHERE at < ?1", [now - 3_600_000])?;
                if let Some(a) = &agent {
                    tx.exec(
                        "UPDATE agents SET status = 'busy', current_process_id = ?2, last_active_at = ?3 WHERE id = ?1",
                        params![a, id, now],
                    )?;
                }
                bus::publish_in(
                    tx,
                    &NewEvent::new(
                        "claude.spawn.started",
                        json!({ "process_id": id, "attempt": attempt, "pid": pid, "agent_id": agent }),
                    )
                    .correlated(id.clone()),
                )
            })
            .await;
        match r {
            Ok(event) => {
                ticket.call_recorded();
                Some(event)
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot record a running Claude process");
                None
            }
        }
    }

    /// Writes an attempt's lines + envelope to the session log (or closes its pending log).
    /// Returns the reference of the result line (if any) and of the envelope.
    #[allow(clippy::too_many_arguments)]
    fn log_attempt(
        &self,
        id: &str,
        request: &SpawnRequest,
        attempt: u32,
        o: &AttemptOutcome,
        stream_rel: &str,
        class: Option<&FailureClass>,
        error: Option<&str>,
    ) -> Option<AttemptLog> {
        let envelope = json!({
            "type": "ksi_envelope",
            "process_id": id,
            "request_id": id,
            "agent_id": request.agent,
            "attempt": attempt,
            "pid": o.pid,
            "started_at": o.started_at.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0),
            "ended_at": now_ms(),
            "spawn_to_exit_ms": o.timings.spawn_to_exit.as_secs_f64() * 1000.0,
            "first_output_ms": o.timings.first_output.map(|d| d.as_secs_f64() * 1000.0),
            "exit_code": o.exit_code,
            "signal": o.signal,
            "termination": format!("{:?}", o.termination),
            "class": class.map(|c| c.as_str()),
            "error": error,
            "prompt_file": format!("prompts/archive/{id}.txt"),
        });
        let refs = &self.inner.refs;
        let logged = match o.run.session_id().filter(|s| responses::safe_session_id(s)) {
            Some(session) => {
                match responses::append_to_session(refs, session, &o.raw_stdout, &envelope) {
                    // The pending log stays until the row that references the session log
                    // has committed (see `drop_stream`): a crash in between still finds it.
                    Ok(r) => Some(r),
                    Err(e) => {
                        tracing::error!(error = %e, "cannot write the Claude response log");
                        None
                    }
                }
            }
            None => responses::close_pending(refs, stream_rel, &envelope)
                .map(|r| (None, r))
                .ok(),
        };
        if let Some((_, envelope_ref)) = &logged {
            self.inner
                .latest
                .point(envelope_ref.path.trim_start_matches("claude_logs/"));
        }
        logged
    }

    #[allow(clippy::too_many_arguments)]
    async fn complete(
        &self,
        id: &str,
        request: &SpawnRequest,
        workflow_id: &Option<String>,
        model: &str,
        attempt: u32,
        o: &AttemptOutcome,
        stream_rel: &str,
        wall: Duration,
        before_spawn: Option<Duration>,
        running_event: Option<i64>,
    ) -> Outcome {
        let result = o.result().cloned().expect("checked by the caller");
        let metrics = json!({
            "before_spawn_us": before_spawn.map(|d| d.as_micros() as u64),
            "exit_code": o.exit_code,
            "spawn_to_exit_us": o.timings.spawn_to_exit.as_micros() as u64,
            "spawn_us": o.timings.spawn.as_micros() as u64,
            "first_output_ms": o.timings.first_output.map(|d| d.as_millis() as u64),
            "wall_us": wall.as_micros() as u64,
            "api_retries": o.run.api_retries.len(),
            "stop_reason": result.stop_reason,
            // The CLI's `result` was empty; the answer is the main agent's last text.
            "answer_from": if result.text_fallback { "assistant_text" } else { "result" },
        });
        // SUCCESS: the result is known and its line is in the pending log. Meanwhile, off the
        // runtime's threads, the response goes to the session log and the prompt to the
        // archive (both fsynced before the COMPLETED row that references them).

        // The prompt file is archived below.
        if let Err(f) = self.prompt_recorded(id).await {
            tracing::warn!(error = %f, "a Claude call completes without its prompt file");
        }
        let files = {
            let (this, idc, req, o, rel) = (
                self.clone(),
                id.to_string(),
                request.clone(),
                o.clone(),
                stream_rel.to_string(),
            );
            // Two threads: the session log's fsync and the archive directory's overlap.
            let archive = {
                let (this, idc) = (this.clone(), idc.clone());
                tokio::task::spawn_blocking(move || this.archive_prompt(&idc))
            };
            let log = tokio::task::spawn_blocking(move || {
                this.log_attempt(&idc, &req, attempt, &o, &rel, None, None)
                    .and_then(|(r, _)| r)
            });
            async move { (log.await.ok().flatten(), archive.await.ok().flatten()) }
        };
        self.record_success(id, attempt, &result, AttemptSpend::of_run(&o.run), &metrics)
            .await;

        let (response, archived) = files.await;
        let moved = response.is_some();
        // The answer is durable in its session log now. Its COMPLETED commit need not wait for
        // the disk when the RUNNING row (its prompt, its pending log) already reached it: after
        // a power loss that undid COMPLETED, start-up finds that row and completes it from the
        // session log (`result_on_disk`), so it is neither lost nor paid twice. The commit is
        // durable a WAL sync later (it publishes an event, which the store syncs at once), and
        // at the latest with the caller's own next durable commit, which follows it in the WAL.
        let durability = match (&response, running_event) {
            (Some(_), Some(event)) if self.inner.store.published_id() >= event => {
                Durability::AfterAnswer
            }
            _ => Durability::BeforeAnswer,
        };

        let out = self
            .commit_completed(
                id,
                request.agent.clone(),
                workflow_id.clone(),
                model,
                &result,
                response,
                archived,
                metrics,
                Counted {
                    attempt,
                    spend: AttemptSpend::of_run(&o.run),
                    recovered: false,
                },
                durability,
            )
            .await;
        if out.is_ok() {
            // An unlink (no fsync) is quick enough for the runtime's thread.
            self.drop_stream(stream_rel, moved);
        }

        out
    }

    /// Removes an attempt's pending log once a committed row references its copy in the
    /// session log (`moved`); without a session it is the attempt's log and stays.
    fn drop_stream(&self, stream_rel: &str, moved: bool) {
        if moved {
            let _ = std::fs::remove_file(self.inner.refs.root().join(stream_rel));
        }
    }

    async fn record_success(
        &self,
        id: &str,
        attempt: u32,
        result: &ResultSummary,
        spend: AttemptSpend,
        metrics: &Value,
    ) {
        let (id, r, m) = (id.to_string(), result.clone(), metrics.to_string());
        let w = self
            .inner
            .store
            .write_relaxed(move |tx| {
                tx.exec(
                    "UPDATE processes SET status = 'SUCCESS', session_id = COALESCE(?2, session_id),
                        metrics = ?3, updated_at = ?4 WHERE id = ?1",
                    params![id, r.session_id, m, now_ms()],
                )?;
                accounting::count_attempt(tx, &id, attempt, &r, &spend)?;
                Ok::<_, BusError>(())
            })
            .await;
        // Tests stop the daemon here: SUCCESS (with the spend) committed, COMPLETED not yet.
        crash_point("after_success");
        if let Err(e) = w {
            tracing::error!(error = %e, "cannot record a successful Claude result");
        }
    }

    /// COMPLETED + agent session + archived prompt + `claude.spawn.complete`, in one transaction.
    #[allow(clippy::too_many_arguments)]
    async fn commit_completed(
        &self,
        id: &str,
        agent: Option<String>,
        workflow_id: Option<String>,
        model: &str,
        result: &ResultSummary,
        response: Option<FileRef>,
        archived: Option<FileRef>,
        mut metrics: Value,
        counted: Counted,
        durability: Durability,
    ) -> Outcome {
        let inner = &self.inner;
        if let Some(m) = metrics.as_object_mut() {
            if let Some(r) = &response {
                m.insert("response_offset".into(), json!(r.offset));
                m.insert("response_bytes".into(), json!(r.bytes));
            }
            m.insert("completed_commit".into(), json!(durability.as_str()));
        }
        let was_archived = archived.is_some();
        let (idc, r, resp, model) = (
            id.to_string(),
            result.clone(),
            response.clone(),
            model.to_string(),
        );
        let metrics_s = metrics.to_string();
        let is_recovered = counted.recovered;
        let job = move |tx: &crate::store::Tx<'_>| {
            let now = now_ms();
            // The answer's spend is usually counted already (with SUCCESS, or before a crash);
            // `count_attempt` adds it only if not, so a lost SUCCESS commit loses no money.
            if counted.recovered {
                tx.exec(
                    "UPDATE processes SET attempts = MAX(attempts, ?2) WHERE id = ?1",
                    params![idc, counted.attempt],
                )?;
            }
            accounting::count_attempt(tx, &idc, counted.attempt, &r, &counted.spend)?;
            tx.exec(
                "UPDATE processes SET status = 'COMPLETED', error = NULL, error_class = NULL,
                        session_id = COALESCE(?2, session_id),
                        response_file = ?3, response_line = ?4, response_sha256 = ?5, metrics = ?6,
                        prompt_file = COALESCE(?7, prompt_file), completed_at = ?8, updated_at = ?8
                     WHERE id = ?1",
                params![
                    idc,
                    r.session_id,
                    resp.as_ref().map(|f| f.path.clone()),
                    resp.as_ref().and_then(|f| f.line).map(|l| l as i64),
                    resp.as_ref().map(|f| f.sha256.clone()),
                    metrics_s,
                    archived
                        .as_ref()
                        .map(|a| serde_json::to_string(a).unwrap_or_default()),
                    now
                ],
            )?;
            if let Some(a) = &agent {
                let tokens = r.usage.input + r.usage.output;
                tx.exec(
                        "UPDATE agents SET status = 'active', current_session_id = COALESCE(?2, current_session_id),
                            current_process_id = ?3, last_active_at = ?4,
                            metrics = json_set(metrics,
                                '$.calls', COALESCE(json_extract(metrics, '$.calls'), 0) + 1,
                                '$.cost_usd', COALESCE(json_extract(metrics, '$.cost_usd'), 0) + ?5,
                                '$.tokens', COALESCE(json_extract(metrics, '$.tokens'), 0) + ?6)
                         WHERE id = ?1",
                        params![a, r.session_id, idc, now, r.total_cost_usd.unwrap_or(0.0), tokens as i64],
                    )?;
            }
            bus::publish_in(
                tx,
                &NewEvent::new(
                    "claude.spawn.complete",
                    json!({
                        "process_id": idc, "workflow_id": workflow_id, "agent_id": agent,
                        "session_id": r.session_id, "response": resp, "model": model,
                        "cost_usd": r.total_cost_usd, "tokens_in": r.usage.input,
                        "tokens_out": r.usage.output, "num_turns": r.num_turns,
                        "duration_ms": r.duration_ms, "recovered": is_recovered,
                    }),
                )
                .correlated(idc.clone()),
            )?;
            // The call's totals over all its attempts, as the answer reports them.
            let totals = tx
                .prepare_cached(
                    "SELECT COALESCE(resolved_model, model), tokens_in, tokens_out, tokens_cache_read,
                            tokens_cache_write, cost_usd, duration_ms, model, simulated
                     FROM processes WHERE id = ?1",
                )?
                .query_row([&idc], |r| {
                    Ok(ClaudeAnswer {
                        model: r.get::<_, Option<String>>(0)?.unwrap_or_default(),
                        requested_model: r.get::<_, Option<String>>(7)?.unwrap_or_default(),
                        simulated: r.get(8)?,
                        tokens_in: r.get::<_, Option<i64>>(1)?.unwrap_or(0) as u64,
                        tokens_out: r.get::<_, Option<i64>>(2)?.unwrap_or(0) as u64,
                        tokens_cache_read: r.get::<_, Option<i64>>(3)?.unwrap_or(0) as u64,
                        tokens_cache_write: r.get::<_, Option<i64>>(4)?.unwrap_or(0) as u64,
                        cost_usd: r.get::<_, Option<f64>>(5)?.unwrap_or(0.0),
                        duration_ms: r.get::<_, Option<i64>>(6)?.unwrap_or(0) as u64,
                        process_id: idc.clone(),
                        ..ClaudeAnswer::default()
                    })
                })?;
            Ok::<_, BusError>(totals)
        };
        let wrote = match durability {
            Durability::BeforeAnswer => inner.store.write(job).await,
            Durability::AfterAnswer => inner.store.write_relaxed(job).await,
        };

        let mut answer = wrote.map_err(internal)?;
        if was_archived {
            self.drop_queued_prompt(id);
        }
        answer.text = result.text.clone().unwrap_or_default();
        answer.session_id = result.session_id.clone().unwrap_or_default();
        answer.response_ref = response;
        Ok(answer)
    }

    #[allow(clippy::too_many_arguments)]
    async fn record_retry(
        &self,
        id: &str,
        agent: &Option<String>,
        attempt: u32,
        class: &FailureClass,
        message: &str,
        o: &AttemptOutcome,
        delay: Duration,
        log: Option<AttemptLog>,
    ) {
        let next = now_ms() + delay.as_millis() as i64;
        let w = self
            .settle_failure(
                id,
                agent,
                status::RETRY,
                attempt,
                class.as_str(),
                message,
                Some(o),
                log,
                Some(next),
                true,
            )
            .await;
        if let Err(e) = w {
            tracing::error!(error = %e, "cannot record a Claude retry");
        }
    }

    /// Ends a call FAILED (permanent) or DEAD (transient, attempts used up).
    #[allow(clippy::too_many_arguments)]
    async fn finish_failed(
        &self,
        id: &str,
        agent: &Option<String>,
        attempt: u32,
        class: &FailureClass,
        message: &str,
        attempt_info: Option<(&AttemptOutcome, Option<AttemptLog>)>,
    ) -> Outcome {
        let st = if class.is_retryable() {
            status::DEAD
        } else {
            status::FAILED
        };
        let (o, log) = match attempt_info {
            Some((o, log)) => (Some(o), log),
            None => (None, None),
        };
        self.settle_failure(
            id,
            agent,
            st,
            attempt,
            class.as_str(),
            message,
            o,
            log,
            None,
            class.is_retryable(),
        )
        .await
        .map_err(internal)?;
        Err(failure_of(class.as_str(), message, class.is_retryable()))
    }

    /// Records a failed attempt (metrics, error, log reference) with its status and event.
    #[allow(clippy::too_many_arguments)]
    async fn settle_failure(
        &self,
        id: &str,
        agent: &Option<String>,
        st: &'static str,
        attempt: u32,
        class: &str,
        message: &str,
        o: Option<&AttemptOutcome>,
        log: Option<AttemptLog>,
        next_attempt_at: Option<i64>,
        transient: bool,
    ) -> Result<(), BusError> {
        // After `claude.spawn.request`, and with the prompt file to archive or retry from.
        let _ = self.prompt_recorded(id).await;
        let terminal = st != status::RETRY;
        let archived = if terminal {
            self.archive_prompt(id)
        } else {
            None
        };
        let result = o.and_then(|o| o.result().cloned());
        let spend = o.map(|o| AttemptSpend::of_run(&o.run)).unwrap_or_default();
        // A call parked by a subscription limit says until when (`ksi ps`).
        let quota_until = next_attempt_at.filter(|_| class.starts_with("quota."));
        let metrics = o.map(|o| {
            json!({
                "exit_code": o.exit_code, "signal": o.signal,
                "termination": format!("{:?}", o.termination),
                "spawn_to_exit_us": o.timings.spawn_to_exit.as_micros() as u64,
                "stderr_tail": o.stderr_tail.chars().rev().take(500).collect::<String>().chars().rev().collect::<String>(),
            })
            .to_string()
        });
        let session = o.and_then(|o| o.run.session_id().map(str::to_string));
        let envelope = log.map(|(_, e)| e);
        let (idc, agent, class, message) = (
            id.to_string(),
            agent.clone(),
            class.to_string(),
            message.to_string(),
        );
        self.inner
            .store
            .write(move |tx| {
                let now = now_ms();
                tx.exec(
                    "UPDATE processes SET status = ?2, attempts = MAX(attempts, ?3), error = ?4, error_class = ?5,
                        next_attempt_at = ?6, session_id = COALESCE(session_id, ?7),
                        metrics = COALESCE(?8, metrics),
                        response_file = COALESCE(?9, response_file), response_line = COALESCE(?10, response_line),
                        response_sha256 = COALESCE(?11, response_sha256),
                        prompt_file = COALESCE(?12, prompt_file),
                        completed_at = CASE WHEN ?13 THEN ?14 ELSE completed_at END, updated_at = ?14,
                        quota_until = ?15
                     WHERE id = ?1",
                    params![
                        idc, st, attempt, message, class, next_attempt_at, session, metrics,
                        envelope.as_ref().map(|e| e.path.clone()),
                        envelope.as_ref().and_then(|e| e.line).map(|l| l as i64),
                        envelope.as_ref().map(|e| e.sha256.clone()),
                        archived.as_ref().map(|a| serde_json::to_string(a).unwrap_or_default()),
                        terminal, now,
                        quota_until
                    ],
                )?;
                // A failed attempt can have cost money (turns before the credit ran out): it is
                // counted like any other, once.
                if let Some(r) = &result {
                    accounting::count_attempt(tx, &idc, attempt, r, &spend)?;
                }
                if let Some(a) = &agent {
                    tx.exec(
                        "UPDATE agents SET status = CASE WHEN ?2 THEN 'active' ELSE status END,
                            current_process_id = ?3, last_active_at = ?4 WHERE id = ?1",
                        params![a, terminal, idc, now],
                    )?;
                    // The CLI no longer knows the agent's session: its next call starts a new one
                    // instead of failing the same way forever.
                    if class == FailureClass::Permanent(PermanentKind::UnknownSession).as_str() {
                        tx.exec(
                            "UPDATE agents SET current_session_id = NULL WHERE id = ?1",
                            [a],
                        )?;
                    }
                }
                bus::publish_in(
                    tx,
                    &NewEvent::new(
                        "claude.spawn.failed",
                        json!({
                            "process_id": idc, "agent_id": agent, "status": st, "attempt": attempt,
                            "class": class, "transient": transient,
                            "error": message.chars().take(500).collect::<String>(),
                            "next_attempt_at": next_attempt_at, "log": envelope,
                        }),
                    )
                    .correlated(idc.clone()),
                )?;
                Ok::<_, BusError>(())
            })
            .await?;
        if terminal {
            self.drop_queued_prompt(id);
        }
        Ok(())
    }

    async fn refuse(
        &self,
        id: &str,
        request: &SpawnRequest,
        workflow_id: &Option<String>,
        refusal: Refusal,
    ) -> Outcome {
        let message = refusal.message();
        let class = refusal.class();
        tracing::warn!(process_id = id, %message, "refused a Claude call");
        let _ = self.prompt_recorded(id).await;
        let archived = self.archive_prompt(id);
        let (idc, agent, wf, r2, msg) = (
            id.to_string(),
            request.agent.clone(),
            workflow_id.clone(),
            refusal.clone(),
            message.clone(),
        );
        let w = self
            .inner
            .store
            .write(move |tx| {
                let now = now_ms();
                tx.exec(
                    "UPDATE processes SET status = 'FAILED', error = ?2, error_class = ?3,
                        prompt_file = COALESCE(?4, prompt_file), completed_at = ?5, updated_at = ?5 WHERE id = ?1",
                    params![
                        idc,
                        msg,
                        class,
                        archived.as_ref().map(|a| serde_json::to_string(a).unwrap_or_default()),
                        now
                    ],
                )?;
                if let Refusal::Budget { scope, unit, spent, limit } = &r2 {
                    bus::publish_in(
                        tx,
                        &NewEvent::new(
                            "claude.budget.exhausted",
                            json!({
                                "process_id": idc, "agent_id": agent, "workflow_id": wf,
                                "scope": scope, "unit": unit, "spent": spent, "limit": limit,
                            }),
                        )
                        .correlated(idc.clone()),
                    )?;
                }
                bus::publish_in(
                    tx,
                    &NewEvent::new(
                        "claude.spawn.failed",
                        json!({
                            "process_id": idc, "agent_id": agent, "workflow_id": wf,
                            "status": "FAILED", "attempt": 0, "class": class, "transient": false,
                            "error": msg,
                        }),
                    )
                    .correlated(idc.clone()),
                )?;
                Ok::<_, BusError>(())
            })
            .await;
        w.map_err(internal)?;
        self.drop_queued_prompt(id);
        Err(failure_of(class, message, false))
    }

    /// Ends a call whose prompt could not be saved, with that failure (DEAD when it is worth
    /// running again, a full disk for one; FAILED otherwise).
    async fn unrecorded(
        &self,
        id: &str,
        agent: &Option<String>,
        attempt: u32,
        f: ClaudeFailure,
    ) -> Outcome {
        let st = if f.transient {
            status::DEAD
        } else {
            status::FAILED
        };
        if let Err(e) = self
            .settle_failure(
                id,
                agent,
                st,
                attempt,
                &f.class,
                &f.message,
                None,
                None,
                None,
                f.transient,
            )
            .await
        {
            tracing::error!(error = %e, "cannot record a Claude call whose prompt was not saved");
        }
        Err(f)
    }

    async fn cancelled(&self, id: &str, agent: &Option<String>, attempt: u32) -> Outcome {
        let class = FailureClass::Permanent(PermanentKind::Cancelled);
        self.finish_failed(id, agent, attempt, &class, "the call was cancelled", None)
            .await
    }

    /// Hard-links the queued prompt into `prompts/archive/` (the queue file is removed after the
    /// row points at the archive). Returns the archive reference.
    fn archive_prompt(&self, id: &str) -> Option<FileRef> {
        let root = self.inner.refs.root();
        let queued = root.join(format!("prompts/queue/{id}.txt"));
        let rel = format!("prompts/archive/{id}.txt");
        let archived = root.join(&rel);
        if !archived.exists() {
            std::fs::hard_link(&queued, &archived).ok()?;
            // The COMPLETED row will name the link, and the queued name goes after it commits.
            self.inner.refs.sync_dir_entry(archived.parent()?).ok()?;
        }
        let bytes = std::fs::read(&archived).ok()?;
        Some(FileRef {
            path: rel,
            line: None,
            offset: None,
            sha256: sha256_hex(&bytes),
            bytes: bytes.len() as u64,
        })
    }

    fn drop_queued_prompt(&self, id: &str) {
        let root = self.inner.refs.root();
        if root.join(format!("prompts/archive/{id}.txt")).exists() {
            let _ = std::fs::remove_file(root.join(format!("prompts/queue/{id}.txt")));
        }
    }

    /// Deletes archived prompts older than the retention setting. Returns how many.
    pub fn prune_archive(&self) -> usize {
        let retention = self.effective_config().archive_retention;
        let dir = self.inner.refs.root().join("prompts/archive");
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return 0;
        };
        let cutoff = std::time::SystemTime::now()
            .checked_sub(retention)
            .unwrap_or(std::time::UNIX_EPOCH);
        let mut n = 0;
        for e in entries.flatten() {
            let old = e
                .metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|t| t < cutoff);
            if old && std::fs::remove_file(e.path()).is_ok() {
                n += 1;
            }
        }
        n
    }

    /// Completes a row from a result line found in its pending log (after a crash).
    async fn complete_from_log(&self, row: &ProcessRow, found: FoundResult) -> Outcome {
        let session = found
            .result
            .session_id
            .clone()
            .filter(|s| responses::safe_session_id(s));
        // The attempt that printed the answer: its log says (the row may not have recorded
        // its RUNNING yet when the daemon died).
        let attempt = found.attempt.unwrap_or(row.attempts).max(1);
        let envelope = json!({
            "type": "ksi_envelope", "process_id": row.id, "request_id": row.id,
            "agent_id": row.agent_id, "attempt": attempt, "pid": row.pid,
            "ended_at": now_ms(), "recovered": true,
            "note": "completed from the pending log after the daemon stopped",
        });
        let response = match (&found.logged, &session) {
            (Some(logged), _) => Some(logged.clone()),
            (None, Some(s)) => {
                responses::append_to_session(&self.inner.refs, s, &found.lines, &envelope)
                    .ok()
                    .and_then(|(r, _)| {
                        self.inner.latest.point(&format!("{s}.jsonl"));
                        r
                    })
            }
            (None, None) => None,
        };
        let metrics = json!({ "recovered": true });
        let spend = AttemptSpend::of_run(&found.run);
        let pending = found.pending.clone();
        let out = self
            .commit_completed(
                &row.id,
                row.agent_id.clone(),
                row.workflow_id.clone(),
                row.model.as_deref().unwrap_or_default(),
                &found.result,
                response,
                self.archive_prompt(&row.id),
                metrics,
                Counted {
                    attempt,
                    spend,
                    recovered: true,
                },
                Durability::BeforeAnswer,
            )
            .await;
        if out.is_ok() {
            for rel in row.stream_file.iter().chain(pending.iter()) {
                let _ = std::fs::remove_file(self.inner.refs.root().join(rel));
            }
        }
        out
    }

    fn result_on_disk(&self, row: &ProcessRow) -> Option<FoundResult> {
        // The row names its stream file once RUNNING is recorded; a daemon that died before
        // that commit left the file at its deterministic path.
        let named = row.stream_file.iter().cloned();
        let by_attempt = (1..=row.attempts + 1)
            .rev()
            .map(|a| responses::pending_path(&row.id, a));
        let refs = &self.inner.refs;
        let pending = named.chain(by_attempt).find_map(|rel| {
            let path = refs.resolve(&rel).ok()?;
            let mut found = responses::successful_result_in(&path)?;
            found.attempt = responses::attempt_of_pending(&rel);
            found.pending = Some(rel);
            Some(found)
        });
        match pending {
            // Already in its session log too (the daemon died after the append): that copy is
            // the one to reference, so the log does not get the answer twice.
            Some(mut found) => {
                if let Some(s) = found.result.session_id.as_deref()
                    && responses::safe_session_id(s)
                {
                    found.logged =
                        responses::logged_result_in(refs, &responses::session_path(s), &row.id)
                            .and_then(|f| f.logged);
                }
                Some(found)
            }
            // No pending log (removed once the answer was in the session log, whose row a
            // power loss may have undone): the log of the session its RUNNING row names, else
            // the session logs written since the call started.
            None => row
                .session_id
                .as_deref()
                .filter(|s| responses::safe_session_id(s))
                .and_then(|s| {
                    responses::logged_result_in(refs, &responses::session_path(s), &row.id)
                })
                .or_else(|| {
                    responses::find_logged_result(
                        refs,
                        &row.id,
                        row.started_at.unwrap_or(row.created_at),
                    )
                }),
        }
    }

    /// After a crash: the answer of `process_id` if it completed (its row, or a result line in
    /// its pending log — then the row is completed from it), so the call is not paid twice.
    /// `None` when it did not complete; a row the dead daemon left unfinished is then ended
    /// DEAD (the caller re-runs the call under a new id).
    pub async fn recover_answer(&self, process_id: &str) -> Option<ClaudeAnswer> {
        let in_flight = self.inner.calls.lock().unwrap().contains_key(process_id);
        if in_flight {
            return self.wait(process_id).await.ok();
        }
        let row = get_process(&self.inner.store, process_id).ok()??;
        match row.status.as_str() {
            status::COMPLETED => self.answer_from_row(&row),
            status::FAILED | status::DEAD => None,
            // Parked by a subscription limit before the restart: it stays parked until the
            // reset, runs then, and its step takes that answer (it is not run twice).
            status::RETRY if row.quota_until.is_some() => {
                if let Err(e) = self.resume_row(process_id, true).await {
                    tracing::warn!(process_id, error = %e, "cannot resume a call parked by a subscription limit");
                    return None;
                }
                self.set_parked(process_id, row.quota_until.unwrap_or(0));
                self.wait(process_id).await.ok()
            }
            _ => {
                if let Some(pid) = row.pid.filter(|_| row.status == status::RUNNING) {
                    kill_orphaned_group(pid as u32, row.pid_start_ticks.map(|t| t as u64));
                }
                if let Some(found) = self.result_on_disk(&row) {
                    return self.complete_from_log(&row, found).await.ok();
                }
                let class = FailureClass::Transient(TransientKind::Crash);
                let _ = self
                    .settle_failure(
                        &row.id,
                        &row.agent_id,
                        status::DEAD,
                        row.attempts,
                        class.as_str(),
                        "the daemon stopped while this call ran and it left no result; the caller runs it again under a new id",
                        None,
                        None,
                        None,
                        true,
                    )
                    .await;
                None
            }
        }
    }

    /// Runs a RETRY row again (from its stored request and queued prompt), after its
    /// `next_attempt_at`. For calls nobody else re-runs: `spawn` requests after a restart. The
    /// workflow engine re-runs its own calls under new ids, so rows with a workflow are refused.
    ///
    /// # Errors
    /// No such row, not in RETRY, attempts used up, already running, or its prompt is gone.
    pub async fn resume(&self, process_id: &str) -> Result<(), ClaudeFailure> {
        self.resume_row(process_id, false).await
    }

    /// [`Executor::resume`]; `for_workflow` also takes a workflow's call (a call parked by a
    /// subscription limit, which its step waits for instead of re-running).
    async fn resume_row(&self, process_id: &str, for_workflow: bool) -> Result<(), ClaudeFailure> {
        let inner = &self.inner;
        let row = get_process(&inner.store, process_id)
            .map_err(internal)?
            .ok_or_else(|| {
                failure_of(
                    "not_found",
                    format!("no Claude process {process_id:?}"),
                    false,
                )
            })?;
        let refuse = |why: &str| {
            Err(failure_of(
                "invalid_request",
                format!("Claude process {process_id} cannot be resumed: {why}"),
                false,
            ))
        };
        if row.status != status::RETRY {
            return refuse(&format!("it is {}, not RETRY", row.status));
        }
        if row.workflow_id.is_some() && !for_workflow {
            return refuse("it belongs to a workflow, whose engine re-runs its calls itself");
        }
        // A call parked by a subscription limit has used no attempt it could fail.
        if row.attempts >= row.max_attempts && row.quota_until.is_none() {
            return refuse("its attempts are used up");
        }
        if inner.calls.lock().unwrap().contains_key(process_id) {
            return refuse("it is already running");
        }
        let stored: StoredRequest = inner
            .store
            .read({
                let id = process_id.to_string();
                move |c| {
                    let s: Option<String> =
                        c.query_row("SELECT request FROM processes WHERE id = ?1", [id], |r| {
                            r.get(0)
                        })?;
                    Ok::<_, BusError>(s)
                }
            })
            .map_err(internal)?
            .and_then(|s| serde_json::from_str(&s).ok())
            .ok_or_else(|| internal("the stored request is missing"))?;
        // The queued prompt, or its archived link: a COMPLETED commit that a power loss undid
        // may have left the row naming the queue after the queued name was removed.
        let prompt = row
            .prompt_file
            .as_ref()
            .and_then(|r| {
                inner.refs.read(r).ok().or_else(|| {
                    let archived = FileRef {
                        path: format!("prompts/archive/{process_id}.txt"),
                        ..r.clone()
                    };
                    inner.refs.read(&archived).ok()
                })
            })
            .map(|b| String::from_utf8_lossy(&b).into_owned());
        let Some(prompt) = prompt else {
            return refuse("its prompt file is gone");
        };
        let request = SpawnRequest {
            prompt,
            model: Some(stored.model.clone()),
            system_prompt: stored.system_prompt,
            agent: row.agent_id.clone(),
            session: stored.session,
            max_turns: stored.max_turns,
        };
        let profile = match &request.agent {
            Some(agent) => Some(
                agents::ensure(&inner.store, &inner.bus, inner.refs.root(), agent)
                    .await
                    .map_err(|m| failure_of("invalid_request", m, false))?
                    .1,
            ),
            None => None,
        };
        let (done_tx, done_rx) = watch::channel(None);
        let cancel = CancelToken::new();
        inner.calls.lock().unwrap().insert(
            process_id.to_string(),
            InFlight {
                done: done_rx,
                cancel: cancel.clone(),
                task: None,
                prompt_saved: None,
                save_prompt_now: None,
                parked_until: Arc::default(),
            },
        );
        let delay = row
            .next_attempt_at
            .map_or(0, |at| (at - now_ms()).max(0) as u64);
        let (this, id) = (self.clone(), process_id.to_string());
        let task = async move {
            tokio::time::sleep(Duration::from_millis(delay)).await;
            let out = this
                .clone()
                .drive(
                    id.clone(),
                    None,
                    request,
                    profile,
                    stored.model,
                    cancel,
                    None,
                )
                .await;
            let _ = done_tx.send(Some(out));
            this.inner.calls.lock().unwrap().remove(&id);
        };
        self.start(process_id, task);
        Ok(())
    }

    /// Resumes every RETRY row without a workflow that has attempts left (after
    /// [`Executor::reconcile`] at start-up). Returns their ids.
    ///
    /// # Errors
    /// A database error.
    pub async fn resume_retries(&self) -> Result<Vec<String>, BusError> {
        let ids: Vec<String> = self.inner.store.read(|c| {
            let mut st = c.prepare(
                "SELECT id FROM processes WHERE status = 'RETRY' AND workflow_id IS NULL
                 AND (attempts < max_attempts OR quota_until IS NOT NULL) ORDER BY created_at",
            )?;
            let rows = st.query_map([], |r| r.get(0))?;
            Ok::<_, BusError>(rows.collect::<rusqlite::Result<_>>()?)
        })?;
        let mut resumed = Vec::new();
        for id in ids {
            match self.resume(&id).await {
                Ok(()) => resumed.push(id),
                Err(e) => {
                    tracing::warn!(process_id = %id, error = %e, "not resuming a Claude call")
                }
            }
        }
        Ok(resumed)
    }

    /// Start-up reconciliation: settles every row a previous daemon left PENDING, RUNNING or
    /// SUCCESS. Orphaned process groups are killed first; a result line on disk completes the
    /// row; otherwise it goes to RETRY (attempts left) or DEAD. Nothing is left RUNNING. Also
    /// prunes the prompt archive. Call it before serving, while no call runs.
    ///
    /// # Errors
    /// A database error.
    pub async fn reconcile(&self) -> Result<ReconcileReport, BusError> {
        let mut report = ReconcileReport::default();
        let rows: Vec<ProcessRow> = self.inner.store.read(|c| {
            let mut st = c.prepare(&format!(
                "SELECT {PROCESS_COLUMNS} FROM processes WHERE status IN ('PENDING', 'RUNNING', 'SUCCESS')"
            ))?;
            let rows = st.query_map([], read_process)?;
            Ok::<_, BusError>(rows.collect::<rusqlite::Result<_>>()?)
        })?;
        for row in rows {
            if self.inner.calls.lock().unwrap().contains_key(&row.id) {
                continue;
            }
            if let Some(pid) = row.pid.filter(|p| *p > 1)
                && row.status != status::PENDING
                && kill_orphaned_group(pid as u32, row.pid_start_ticks.map(|t| t as u64))
                    == OrphanCheck::Killed
            {
                report.killed_pids.push(pid as u32);
            }
            if let Some(found) = self.result_on_disk(&row)
                && self.complete_from_log(&row, found).await.is_ok()
            {
                report.completed.push(row.id.clone());
                continue;
            }
            let class = FailureClass::Transient(TransientKind::Crash);
            let (st, msg) = if row.prompt_file.is_none() {
                (
                    status::DEAD,
                    "the daemon stopped before this call's prompt was saved, so it cannot be run again; ask for it again",
                )
            } else if row.attempts >= row.max_attempts {
                (
                    status::DEAD,
                    "the daemon stopped while this call ran, and no attempts are left",
                )
            } else {
                (
                    status::RETRY,
                    "the daemon stopped while this call was queued or running; it can be run again",
                )
            };
            self.settle_failure(
                &row.id,
                &row.agent_id,
                st,
                row.attempts,
                class.as_str(),
                msg,
                None,
                None,
                (st == status::RETRY).then(now_ms),
                true,
            )
            .await?;
            if let Some(a) = &row.agent_id {
                let a = a.clone();
                self.inner
                    .store
                    .write(move |tx| {
                        tx.exec(
                            "UPDATE agents SET status = 'active' WHERE id = ?1 AND status = 'busy'",
                            [a],
                        )?;
                        Ok::<_, BusError>(())
                    })
                    .await?;
            }
            if st == status::DEAD {
                report.dead.push(row.id.clone());
            } else {
                report.retry.push(row.id.clone());
            }
        }
        report.pruned_prompts = self.prune_archive();
        // The spawn-rate bucket starts from the spawns of the last minute, whichever daemon
        // made them: a restart does not refill it.
        let recent: i64 = self.inner.store.read(|c| {
            Ok::<_, BusError>(c.query_row(
                "SELECT COUNT(*) FROM spawn_times WHERE at >= ?1",
                [now_ms() - 60_000],
                |r| r.get(0),
            )?)
        })?;
        self.inner
            .admission
            .seed_recent_spawns(recent.max(0) as u64);
        Ok(report)
    }

    /// The store this executor records to.
    pub fn store(&self) -> &Store {
        &self.inner.store
    }
}

impl ClaudeApi for Executor {
    fn complete(
        &self,
        process_id: String,
        workflow_id: Option<String>,
        request: ClaudeRequest,
    ) -> BoxFuture<'static, Result<ClaudeAnswer, ClaudeFailure>> {
        let this = self.clone();
        Box::pin(async move {
            // The answer comes after its durable COMPLETED commit: no need to wait for the
            // PENDING row to be durable first.
            let id = this
                .start_call(process_id, workflow_id, request, false)
                .await?;
            this.wait(&id).await
        })
    }

    fn recover(&self, process_id: String) -> BoxFuture<'static, Option<ClaudeAnswer>> {
        let this = self.clone();
        Box::pin(async move { this.recover_answer(&process_id).await })
    }

    fn parked_until(&self, process_id: &str) -> Option<i64> {
        Executor::parked_until(self, process_id)
    }

    fn cancel(&self, process_id: &str) -> bool {
        Executor::cancel(self, process_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_relative_cli_path_is_made_absolute_and_a_bare_name_is_left_to_path() {
        let cwd = std::env::current_dir().unwrap();
        assert_eq!(
            absolute_binary(PathBuf::from("./bin/claude")),
            cwd.join("bin/claude")
        );
        assert_eq!(
            absolute_binary(PathBuf::from("bin/claude")),
            cwd.join("bin/claude")
        );
        assert_eq!(
            absolute_binary(PathBuf::from("claude")),
            PathBuf::from("claude")
        );
        assert_eq!(
            absolute_binary(PathBuf::from("/usr/bin/claude")),
            PathBuf::from("/usr/bin/claude")
        );
    }
}
