//! The engine: starts instances, claims step events, runs steps, commits their outcome.
//!
//! Where things happen: [`Engine::start`] inserts the instance and publishes its first step
//! event in one transaction; [`Engine::run_workers`] claims step events; `execute` runs one
//! step; `commit_success` / `commit_failure` write the outcome, the next step's event and the
//! ack of the claimed one in ONE transaction. [`Engine::recover`] runs at start-up.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use rusqlite::{OptionalExtension, params};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use tokio::sync::watch;

use super::context::StepContext;
use super::definition::{Definition, DefinitionError, END, HandlerRef, Step};
use super::{ClaudeApi, StepError, StepInput, StepOutput, StepRunner};
use crate::bus::{self, Bus, BusError, Delivery, NewEvent, Subscription, SubscriptionOptions};
use crate::refs::{FileRef, Refs};
use crate::store::{ExecCached, Store, Tx, now_ms};

/// State larger than this (serialized) goes to a checkpoint file instead of the row.
pub const INLINE_STATE_MAX: usize = 10 * 1024;
/// Step outputs larger than this go to a file.
const INLINE_OUTPUT_MAX: usize = 16 * 1024;
/// How long a step runs before it gets a `running` row.
const RUNNING_MARKER_AFTER: Duration = Duration::from_millis(50);
/// Step latencies kept for metrics and benchmarks.
const LATENCY_WINDOW: usize = 10_000;
/// The engine's bus subscription.
pub const SUBSCRIPTION: &str = "engine.steps";

/// Errors of the engine's API.
#[derive(Debug, thiserror::Error)]
pub enum WorkflowError {
    #[error(
        "no workflow type {name:?} is defined (known: {known}). Add a definition to the definitions directory"
    )]
    UnknownType { name: String, known: String },
    #[error("no workflow instance {0:?}; `ksi workflows` lists them")]
    UnknownInstance(String),
    #[error("workflow {id} is {status}; {action} needs it {wanted}")]
    WrongStatus {
        id: String,
        status: String,
        action: &'static str,
        wanted: &'static str,
    },
    #[error("workflow type {workflow} has no step {step:?} (steps: {steps})")]
    UnknownStep {
        workflow: String,
        step: String,
        steps: String,
    },
    #[error("params must be a JSON object, got {0}")]
    BadParams(String),
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error(transparent)]
    Definition(#[from] DefinitionError),
}

impl From<crate::store::StoreError> for WorkflowError {
    fn from(e: crate::store::StoreError) -> Self {
        WorkflowError::Bus(e.into())
    }
}

impl From<rusqlite::Error> for WorkflowError {
    fn from(e: rusqlite::Error) -> Self {
        WorkflowError::Bus(e.into())
    }
}

/// Engine settings.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// Steps run concurrently.
    pub workers: usize,
    /// Lease of a claimed step event; renewed while the step runs.
    pub lease: Duration,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            workers: 16,
            lease: Duration::from_secs(30),
        }
    }
}

/// The payload of a step event.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct StepEvent {
    workflow_id: String,
    seq: u64,
    attempt: u32,
    step: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    group: Option<u64>,
}

/// One row of an instance's history.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StepRecord {
    pub seq: u64,
    pub attempt: u32,
    pub step: String,
    pub group_seq: Option<u64>,
    pub status: String,
    pub plugin: Option<String>,
    pub plugin_sha256: Option<String>,
    pub input_sha256: Option<String>,
    pub output: Option<Value>,
    pub output_ref: Option<FileRef>,
    pub error: Option<String>,
    pub cost_usd: f64,
    pub tokens_in: u64,
    pub tokens_out: u64,
    pub claude_calls: u64,
    pub started_at: i64,
    pub finished_at: Option<i64>,
}

/// An instance as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InstanceView {
    pub id: String,
    #[serde(rename = "type")]
    pub workflow_type: String,
    pub definition_version: Option<String>,
    pub status: String,
    pub current_step: Option<String>,
    pub params: Value,
    pub state: Value,
    pub checkpoint_file: Option<FileRef>,
    pub error: Option<String>,
    pub cost_usd: f64,
    pub tokens_in: u64,
    pub tokens_out: u64,
    pub claude_calls: u64,
    pub created_at: i64,
    pub updated_at: i64,
    pub completed_at: Option<i64>,
    /// Total top-level steps of the definition (for progress).
    pub total_steps: Option<u64>,
    /// The part of `cost_usd` that is simulated (answered by `fake-claude`): no money.
    #[serde(default)]
    pub simulated_usd: f64,
    /// Whether any of its cost is simulated.
    #[serde(default)]
    pub simulated: bool,
}

struct Inner {
    store: Store,
    bus: Bus,
    refs: Refs,
    runner: Arc<dyn StepRunner>,
    claude: Arc<dyn ClaudeApi>,
    defs: RwLock<HashMap<String, Arc<Definition>>>,
    sub: Subscription,
    /// Cancel switches of running steps, by (workflow id, seq).
    cancels: Mutex<HashMap<(String, u64), watch::Sender<bool>>>,
    /// Claim-to-commit time of recent steps, in µs.
    latencies: Mutex<std::collections::VecDeque<u32>>,
    opts: EngineOptions,
}

/// The workflow engine. Cheap to clone.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

/// Runs a step's future with its timeout, which does not count the time its Claude calls
/// spend parked by a subscription limit (the deadline moves past the reset). `Err` on timeout.
async fn run_within<T>(
    timeout: Duration,
    run: impl std::future::Future<Output = T>,
    ctx: &super::StepContext,
) -> Result<T, ()> {
    tokio::pin!(run);
    let mut deadline = tokio::time::Instant::now() + timeout;
    loop {
        tokio::select! {
            r = &mut run => return Ok(r),
            _ = tokio::time::sleep_until(deadline) => {
                match ctx.quota_parked_until() {
                    Some(until) => {
                        let wait = Duration::from_millis((until - now_ms()).max(0) as u64);
                        deadline = tokio::time::Instant::now() + wait + timeout;
                    }
                    None => return Err(()),
                }
            }
        }
    }
}

/// How long a step that timed out or was cancelled waits for its stopped Claude calls to
/// settle before it commits (a kill takes milliseconds; SIGTERM escalates to SIGKILL).
const CALLS_SETTLE: Duration = Duration::from_secs(15);

fn terminal(status: &str) -> bool {
    matches!(status, "completed" | "failed" | "cancelled")
}

/// JSON merge patch (RFC 7386): objects merge, null deletes, anything else replaces.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(p) => {
            if !target.is_object() {
                *target = Value::Object(Map::new());
            }
            let t = target.as_object_mut().unwrap();
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        other => *target = other.clone(),
    }
}

impl Engine {
    /// An engine over the store, with the given step runner and Claude executor.
    pub async fn new(
        store: Store,
        refs: Refs,
        runner: Arc<dyn StepRunner>,
        claude: Arc<dyn ClaudeApi>,
        opts: EngineOptions,
    ) -> Result<Engine, WorkflowError> {
        let bus = Bus::new(store.clone());
        let sub = bus
            .subscribe(
                SUBSCRIPTION,
                "workflow.*.step.*",
                SubscriptionOptions {
                    // Retries are the engine's (per-step policy); bus redelivery only covers crashes.
                    max_attempts: 1_000,
                    lease_ms: opts.lease.as_millis() as u64,
                    backoff_base_ms: 10,
                    backoff_max_ms: 1_000,
                    agent_id: None,
                },
            )
            .await?;
        Ok(Engine {
            inner: Arc::new(Inner {
                store,
                bus,
                refs,
                runner,
                claude,
                defs: RwLock::default(),
                sub,
                cancels: Mutex::default(),
                latencies: Mutex::default(),
                opts,
            }),
        })
    }

    /// The bus the engine publishes on.
    pub fn bus(&self) -> &Bus {
        &self.inner.bus
    }

    /// Adds or replaces a definition.
    pub fn add_definition(&self, def: Definition) {
        self.inner
            .defs
            .write()
            .unwrap()
            .insert(def.name.clone(), Arc::new(def));
    }

    /// Parses and validates a definition file against the runner's handlers.
    pub fn parse_definition(&self, file: &Path) -> Result<Definition, DefinitionError> {
        let src = std::fs::read_to_string(file).map_err(|e| DefinitionError {
            file: file.display().to_string(),
            line: 1,
            message: e.to_string(),
        })?;
        let runner = self.inner.runner.clone();
        Definition::parse(file, &src, &|h: &HandlerRef| runner.resolve(h).map(|_| ()))
    }

    /// Loads every `*.toml` of `dir`; returns the errors of the files that failed (each is also
    /// published as `workflow.definition_failed`). A failed file keeps its previous version.
    pub async fn load_definitions(&self, dir: &Path) -> Vec<DefinitionError> {
        let mut errors = Vec::new();
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect())
            .unwrap_or_default();
        files.sort();
        for f in files
            .into_iter()
            .filter(|f| f.extension().is_some_and(|e| e == "toml"))
        {
            match self.parse_definition(&f) {
                Ok(def) => {
                    tracing::info!(workflow = %def.name, version = %def.version, file = %f.display(), "workflow definition loaded");
                    self.add_definition(def);
                }
                Err(e) => {
                    tracing::error!(error = %e, "workflow definition rejected");
                    let _ = self
                        .inner
                        .bus
                        .publish(NewEvent::new(
                            "workflow.definition_failed",
                            json!({ "file": e.file, "line": e.line, "error": e.message }),
                        ))
                        .await;
                    errors.push(e);
                }
            }
        }
        errors
    }

    /// The loaded definitions.
    pub fn definitions(&self) -> Vec<Arc<Definition>> {
        let mut v: Vec<_> = self.inner.defs.read().unwrap().values().cloned().collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    fn definition(&self, name: &str) -> Result<Arc<Definition>, WorkflowError> {
        let defs = self.inner.defs.read().unwrap();
        defs.get(name)
            .cloned()
            .ok_or_else(|| WorkflowError::UnknownType {
                name: name.to_string(),
                known: {
                    let mut k: Vec<&str> = defs.keys().map(String::as_str).collect();
                    k.sort();
                    if k.is_empty() {
                        "none".into()
                    } else {
                        k.join(", ")
                    }
                },
            })
    }

    /// Starts an instance of `workflow_type` with `params` (merged over the definition's
    /// defaults). Returns its id once the instance and its first step event are durable.
    pub async fn start(&self, workflow_type: &str, params: Value) -> Result<String, WorkflowError> {
        let def = self.definition(workflow_type)?;
        if !params.is_object() {
            return Err(WorkflowError::BadParams(params.to_string()));
        }
        let id = self.new_instance_id();
        let (engine, wid) = (self.clone(), id.clone());
        self.inner
            .store
            .write(move |tx| engine.start_in(tx, &def, params, &wid))
            .await?;
        Ok(id)
    }

    /// A fresh instance id (time-ordered).
    pub fn new_instance_id(&self) -> String {
        format!(
            "wf_{:011x}{:05x}",
            now_ms(),
            rand::random::<u32>() & 0xfffff
        )
    }

    /// Starts an instance inside the caller's transaction (a schedule's tick and the instance
    /// it starts commit together).
    pub fn start_in(
        &self,
        tx: &Tx<'_>,
        def: &Definition,
        params: Value,
        id: &str,
    ) -> Result<(), WorkflowError> {
        let Value::Object(given) = params else {
            return Err(WorkflowError::BadParams(params.to_string()));
        };
        let mut merged = def.params.clone();
        merge_patch(&mut merged, &Value::Object(given));
        let first = def.first().name.clone();
        let now = now_ms();
        tx.exec(
            "INSERT INTO workflows(id, type, definition_version, definition_sha256, current_step,
                current_step_index, total_steps, params, state, status, created_at, updated_at, next_seq)
             VALUES (?1, ?2, ?3, ?4, ?5, 0, ?6, ?7, '{}', 'running', ?8, ?8, 2)",
            params![id, def.name, def.version.to_string(), def.sha256, first, def.len() as i64, merged.to_string(), now],
        )?;
        bus::publish_in(
            tx,
            &NewEvent::new(
                "workflow.started",
                json!({"workflow_id": id, "type": def.name, "params": merged}),
            )
            .correlated(id),
        )?;
        publish_step(
            tx,
            &def.name,
            &StepEvent {
                workflow_id: id.to_string(),
                seq: 1,
                attempt: 1,
                step: first,
                group: None,
            },
            None,
        )?;
        Ok(())
    }

    /// A loaded definition by name.
    ///
    /// # Errors
    /// [`WorkflowError::UnknownType`] naming the known ones.
    pub fn definition_by_name(&self, name: &str) -> Result<Arc<Definition>, WorkflowError> {
        self.definition(name)
    }

    /// The store the engine writes to.
    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    /// One instance.
    pub fn get(&self, id: &str) -> Result<InstanceView, WorkflowError> {
        let id2 = id.to_string();
        let view = self
            .inner
            .store
            .read(|c| load_view(c, &id2))?
            .ok_or_else(|| WorkflowError::UnknownInstance(id.to_string()))?;
        self.resolve_state(view)
    }

    fn resolve_state(&self, mut view: InstanceView) -> Result<InstanceView, WorkflowError> {
        if let Some(r) = &view.checkpoint_file {
            let bytes = self
                .inner
                .refs
                .read(r)
                .map_err(|e| WorkflowError::Bus(BusError::BadPayload(e.to_string())))?;
            view.state = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        }
        Ok(view)
    }

    /// Instances, newest first, optionally with one status.
    pub fn list(
        &self,
        status: Option<&str>,
        limit: usize,
    ) -> Result<Vec<InstanceView>, WorkflowError> {
        let status = status.map(str::to_string);
        self.inner.store.read(move |c| {
            let mut st = c.prepare(&format!(
                "SELECT {VIEW_COLUMNS} FROM workflows WHERE (?1 IS NULL OR status = ?1)
                 ORDER BY created_at DESC, id DESC LIMIT ?2"
            ))?;
            let rows = st.query_map(params![status, limit as i64], read_view)?;
            Ok::<_, WorkflowError>(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
    }

    /// The step history of an instance, in order.
    pub fn history(&self, id: &str) -> Result<Vec<StepRecord>, WorkflowError> {
        let id = id.to_string();
        self.inner.store.read(move |c| {
            let mut st = c.prepare(
                "SELECT seq, attempt, step, group_seq, status, plugin, plugin_sha256, input_sha256, output,
                    output_ref, error, cost_usd, tokens_in, tokens_out, claude_calls, started_at, finished_at
                 FROM workflow_steps WHERE workflow_id = ?1 ORDER BY seq, attempt",
            )?;
            let rows = st.query_map([&id], |r| {
                let output: Option<String> = r.get(8)?;
                let output_ref: Option<String> = r.get(9)?;
                Ok(StepRecord {
                    seq: r.get::<_, i64>(0)? as u64,
                    attempt: r.get(1)?,
                    step: r.get(2)?,
                    group_seq: r.get::<_, Option<i64>>(3)?.map(|v| v as u64),
                    status: r.get(4)?,
                    plugin: r.get(5)?,
                    plugin_sha256: r.get(6)?,
                    input_sha256: r.get(7)?,
                    output: output.and_then(|s| serde_json::from_str(&s).ok()),
                    output_ref: output_ref.and_then(|s| serde_json::from_str(&s).ok()),
                    error: r.get(10)?,
                    cost_usd: r.get(11)?,
                    tokens_in: r.get::<_, i64>(12)? as u64,
                    tokens_out: r.get::<_, i64>(13)? as u64,
                    claude_calls: r.get::<_, i64>(14)? as u64,
                    started_at: r.get(15)?,
                    finished_at: r.get(16)?,
                })
            })?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
    }

    /// The Claude turns of an instance in order: agent, prompt, answer (read through the
    /// answer's file reference when it has one), session, cost.
    pub fn transcript(&self, id: &str) -> Result<Vec<Value>, WorkflowError> {
        let id = id.to_string();
        type TurnRow = (i64, u32, String, Option<String>, Option<String>);
        let rows: Vec<TurnRow> = self.inner.store.read(move |c| {
            let mut st = c.prepare(
                "SELECT c.seq, c.call_seq, COALESCE(s.step, ''), c.request, c.response FROM step_calls c
                 LEFT JOIN workflow_steps s ON s.workflow_id = c.workflow_id AND s.seq = c.seq AND s.attempt = c.attempt
                 WHERE c.workflow_id = ?1 AND c.kind = 'claude.complete' AND c.status = 'completed'
                 ORDER BY c.seq, c.call_seq",
            )?;
            let rows = st.query_map([&id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)))?;
            Ok::<_, WorkflowError>(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })?;
        Ok(rows
            .into_iter()
            .map(|(seq, call, step, req, resp)| {
                let req: Value = req.and_then(|r| serde_json::from_str(&r).ok()).unwrap_or(Value::Null);
                let ans: super::ClaudeAnswer = resp.and_then(|r| serde_json::from_str(&r).ok()).unwrap_or_default();
                let text = ans
                    .response_ref
                    .as_ref()
                    .and_then(|r| self.inner.refs.read(r).ok())
                    .and_then(|b| text_of_logged_line(&b))
                    // An empty `result` (a CLI bug) was answered from the stream's text,
                    // which the journaled answer holds.
                    .filter(|t| !t.trim().is_empty())
                    .unwrap_or_else(|| ans.text.clone());
                json!({"seq": seq, "call": call, "step": step, "agent": req["agent"], "prompt": req["prompt"],
                       "text": text, "session_id": ans.session_id, "model": ans.model, "cost_usd": ans.cost_usd,
                       "process_id": ans.process_id, "response_ref": ans.response_ref})
            })
            .collect())
    }

    /// Claim-to-commit latencies of the most recent steps (µs, oldest first).
    pub fn step_latencies_us(&self) -> Vec<u32> {
        self.inner
            .latencies
            .lock()
            .unwrap()
            .iter()
            .copied()
            .collect()
    }

    /// Instances by status.
    pub fn counts(&self) -> Result<Vec<(String, i64)>, WorkflowError> {
        self.inner.store.read(|c| {
            let mut st = c.prepare(
                "SELECT status, COUNT(*) FROM workflows GROUP BY status ORDER BY status",
            )?;
            let rows = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
    }

    /// Prometheus histogram lines of recent step latencies (claim to commit).
    pub fn step_latency_histogram(&self) -> Result<String, WorkflowError> {
        let lat = self.step_latencies_us();
        let bounds_ms = [
            1.0, 2.0, 5.0, 10.0, 50.0, 100.0, 500.0, 1000.0, 5000.0, 30000.0, 120000.0,
        ];
        let mut out = String::new();
        for b in bounds_ms {
            let n = lat.iter().filter(|us| (**us as f64) / 1000.0 <= b).count();
            out.push_str(&format!("ksi_step_latency_ms_bucket{{le=\"{b}\"}} {n}\n"));
        }
        out.push_str(&format!(
            "ksi_step_latency_ms_bucket{{le=\"+Inf\"}} {}\n",
            lat.len()
        ));
        out.push_str(&format!(
            "ksi_step_latency_ms_sum {:.3}\n",
            lat.iter().map(|u| *u as f64 / 1000.0).sum::<f64>()
        ));
        out.push_str(&format!("ksi_step_latency_ms_count {}\n", lat.len()));
        Ok(out)
    }

    async fn transition(
        &self,
        id: &str,
        action: &'static str,
        allowed: &'static [&'static str],
        wanted: &'static str,
        apply: impl FnOnce(&Tx<'_>, &str, &str) -> Result<(), WorkflowError> + Send + 'static,
    ) -> Result<(), WorkflowError> {
        let id = id.to_string();
        self.inner
            .store
            .write(move |tx| {
                let row: Option<(String, String)> = tx
                    .query_row(
                        "SELECT status, type FROM workflows WHERE id = ?1",
                        [&id],
                        |r| Ok((r.get(0)?, r.get(1)?)),
                    )
                    .optional()?;
                let Some((status, wtype)) = row else {
                    return Err(WorkflowError::UnknownInstance(id));
                };
                if !allowed.contains(&status.as_str()) {
                    return Err(WorkflowError::WrongStatus {
                        id,
                        status,
                        action,
                        wanted,
                    });
                }
                apply(tx, &id, &wtype)
            })
            .await
    }

    /// Cancels an instance: no further step runs; a step running now is stopped (its Claude
    /// processes are killed) and its result discarded.
    pub async fn cancel(&self, id: &str) -> Result<(), WorkflowError> {
        self.transition(id, "cancel", &["running", "paused", "pending"], "running or paused", |tx, id, _| {
            tx.exec(
                "UPDATE workflows SET status = 'cancelled', parked = '[]', updated_at = ?2, completed_at = ?2 WHERE id = ?1",
                params![id, now_ms()],
            )?;
            bus::publish_in(tx, &NewEvent::new("workflow.cancelled", json!({"workflow_id": id})).correlated(id))?;
            Ok(())
        })
        .await?;
        for ((wid, _), tx) in self.inner.cancels.lock().unwrap().iter() {
            if wid == id {
                let _ = tx.send(true);
            }
        }
        Ok(())
    }

    /// Pauses an instance: the step running now finishes; the next one waits for resume.
    pub async fn pause(&self, id: &str) -> Result<(), WorkflowError> {
        self.transition(id, "pause", &["running"], "running", |tx, id, _| {
            tx.exec(
                "UPDATE workflows SET status = 'paused', updated_at = ?2 WHERE id = ?1",
                params![id, now_ms()],
            )?;
            bus::publish_in(
                tx,
                &NewEvent::new("workflow.paused", json!({"workflow_id": id})).correlated(id),
            )?;
            Ok(())
        })
        .await
    }

    /// Resumes a paused instance from where it stopped.
    pub async fn resume(&self, id: &str) -> Result<(), WorkflowError> {
        self.transition(id, "resume", &["paused"], "paused", |tx, id, wtype| {
            let parked: String = tx.query_row("SELECT parked FROM workflows WHERE id = ?1", [id], |r| r.get(0))?;
            let parked: Vec<StepEvent> = serde_json::from_str(&parked).unwrap_or_default();
            tx.exec("UPDATE workflows SET status = 'running', parked = '[]', updated_at = ?2 WHERE id = ?1", params![id, now_ms()])?;
            for ev in &parked {
                publish_step(tx, wtype, ev, None)?;
            }
            bus::publish_in(tx, &NewEvent::new("workflow.resumed", json!({"workflow_id": id, "steps": parked.len()})).correlated(id))?;
            Ok(())
        })
        .await
    }

    /// Runs an instance again from `step` (after a failure, a cancel, or to redo a step with
    /// changed code), keeping its current state.
    pub async fn retry_from(&self, id: &str, step: &str) -> Result<(), WorkflowError> {
        let wtype: String = {
            let id2 = id.to_string();
            self.inner
                .store
                .read(move |c| {
                    Ok::<_, WorkflowError>(
                        c.query_row("SELECT type FROM workflows WHERE id = ?1", [&id2], |r| {
                            r.get(0)
                        })
                        .optional()?,
                    )
                })?
                .ok_or_else(|| WorkflowError::UnknownInstance(id.to_string()))?
        };
        let def = self.definition(&wtype)?;
        let Some(s) = def.step(step) else {
            return Err(WorkflowError::UnknownStep {
                workflow: wtype,
                step: step.to_string(),
                steps: def
                    .steps
                    .iter()
                    .map(|s| s.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        };
        let (step, group) = match &s.member_of {
            // Re-running one member alone could never join: re-run its group.
            Some(g) => (g.clone(), None),
            None => (s.name.clone(), None),
        };
        self.transition(id, "retry-from", &["failed", "cancelled", "paused", "completed"], "failed, cancelled, paused or completed", move |tx, id, wtype| {
            let seq: i64 = tx.query_row("SELECT next_seq FROM workflows WHERE id = ?1", [id], |r| r.get(0))?;
            tx.exec(
                "UPDATE workflows SET status = 'running', error = NULL, parked = '[]', next_seq = next_seq + 1,
                    current_step = ?2, completed_at = NULL, updated_at = ?3 WHERE id = ?1",
                params![id, step, now_ms()],
            )?;
            publish_step(tx, wtype, &StepEvent { workflow_id: id.to_string(), seq: seq as u64, attempt: 1, step: step.clone(), group }, None)?;
            bus::publish_in(tx, &NewEvent::new("workflow.retry_from", json!({"workflow_id": id, "step": step})).correlated(id))?;
            Ok(())
        })
        .await
    }

    /// Waits until the instance is completed, failed or cancelled, and returns it.
    pub async fn wait(&self, id: &str) -> Result<InstanceView, WorkflowError> {
        let mut published = self.inner.store.published();
        loop {
            published.borrow_and_update();
            let v = self.get(id)?;
            if terminal(&v.status) {
                return Ok(v);
            }
            tokio::select! {
                _ = published.changed() => {}
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
        }
    }

    /// Start-up recovery: step events claimed by a previous incarnation of the daemon become
    /// claimable at once (the data-dir lock proves that incarnation is gone), so every running
    /// instance resumes from its exact step.
    pub async fn recover(&self) -> Result<usize, WorkflowError> {
        let n = self.inner.bus.release_all(&self.inner.sub).await?;
        if n > 0 {
            tracing::info!(
                steps = n,
                "resuming steps that were running when the daemon stopped"
            );
        }
        Ok(n)
    }

    /// Runs the workers until `shutdown` turns true; running steps then finish (drain).
    pub async fn run_workers(&self, shutdown: watch::Receiver<bool>) {
        let mut tasks = Vec::new();
        for w in 0..self.inner.opts.workers.max(1) {
            let (engine, mut shutdown) = (self.clone(), shutdown.clone());
            tasks.push(tokio::spawn(async move {
                let consumer = format!("engine-{}-{w}", std::process::id());
                loop {
                    if *shutdown.borrow() {
                        return;
                    }
                    let batch = tokio::select! {
                        b = engine.inner.bus.next_batch(&engine.inner.sub, &consumer, 1, Duration::from_secs(1)) => b,
                        _ = shutdown.changed() => return,
                    };
                    match batch {
                        Ok(batch) => {
                            for d in batch {
                                engine.process(d).await;
                            }
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "claiming step events failed; retrying");
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                    }
                }
            }));
        }
        for t in tasks {
            let _ = t.await;
        }
    }

    async fn process(&self, d: Delivery) {
        let ev: StepEvent = match serde_json::from_value(d.event.data.clone()) {
            Ok(ev) => ev,
            Err(e) => {
                tracing::error!(event = d.event.id, error = %e, "malformed step event; dead-lettering it");
                let _ = self
                    .inner
                    .bus
                    .nack(&self.inner.sub, &d, &format!("malformed step event: {e}"))
                    .await;
                return;
            }
        };
        let t0 = Instant::now();
        // Every log line of the step (and of the Claude calls it starts) carries its ids.
        let span = tracing::info_span!(
            "workflow_step",
            workflow_id = %ev.workflow_id,
            step = %ev.step,
            event_id = d.event.id
        );
        let result = {
            use tracing::Instrument;
            self.execute(&d, &ev).instrument(span).await
        };
        if result.is_ok() {
            let mut l = self.inner.latencies.lock().unwrap();
            if l.len() == LATENCY_WINDOW {
                l.pop_front();
            }
            l.push_back(t0.elapsed().as_micros().min(u32::MAX as u128) as u32);
        }
        if let Err(e) = result {
            tracing::error!(workflow = %ev.workflow_id, step = %ev.step, error = %e, "step could not be committed; it will be retried");
            let _ = self
                .inner
                .bus
                .nack(&self.inner.sub, &d, &e.to_string())
                .await;
        }
    }

    async fn execute(&self, d: &Delivery, ev: &StepEvent) -> Result<(), WorkflowError> {
        let inner = &self.inner;
        let wid = ev.workflow_id.clone();
        let Some(view) = inner.store.read(|c| load_view(c, &wid))? else {
            tracing::warn!(workflow = %ev.workflow_id, "step event for an unknown instance; dropping it");
            return self.ack(d).await;
        };
        match view.status.as_str() {
            s if terminal(s) => return self.ack(d).await,
            "paused" => return self.park(d, ev).await,
            _ => {}
        }
        let def = match self.definition(&view.workflow_type) {
            Ok(def) => def,
            Err(e) => {
                return self
                    .commit_failure(
                        d,
                        ev,
                        &view.workflow_type,
                        None,
                        StepError::fatal(e.to_string()),
                        None,
                    )
                    .await;
            }
        };
        let Some(step) = def.step(&ev.step).cloned() else {
            let msg = format!(
                "the definition of {} has no step {:?} any more",
                def.name, ev.step
            );
            return self
                .commit_failure(d, ev, &def.name, None, StepError::fatal(msg), None)
                .await;
        };
        let view = self.resolve_state(view)?;
        if let Some(cond) = &step.when
            && !cond.eval(&json!({"params": view.params, "state": view.state}))
        {
            return self.commit_skip(d, ev, def.clone(), step).await;
        }
        if !step.parallel.is_empty() {
            return self.commit_group_start(d, ev, def.clone(), step).await;
        }
        let handler = step
            .handler
            .clone()
            .expect("non-group steps have a handler");
        let resolved = match inner.runner.resolve(&handler) {
            Ok(r) => r,
            Err(e) => {
                let err =
                    StepError::fatal(format!("handler {handler} of step {:?}: {e}", step.name));
                return self
                    .commit_failure(d, ev, &def.name, Some(&step), err, None)
                    .await;
            }
        };
        let mut params = view.params.clone();
        merge_patch(&mut params, &step.params);
        let input = StepInput {
            workflow_id: ev.workflow_id.clone(),
            workflow_type: def.name.clone(),
            step: step.name.clone(),
            seq: ev.seq,
            attempt: ev.attempt,
            params,
            state: view.state.clone(),
        };
        let input_sha =
            crate::refs::sha256_hex(serde_json::to_string(&input).unwrap_or_default().as_bytes());
        let plugin = format!("{}@{}", resolved.plugin, resolved.version);
        let started = now_ms();
        // A step still running after a moment gets a `running` row, so listings show it. Fast
        // steps skip that write entirely. The marker is aborted before the outcome commits; a
        // marker already queued commits first (the writer is FIFO), so it never overwrites it.
        let marker = {
            let (store, ev2, plugin2, sha2, isha) = (
                inner.store.clone(),
                ev.clone(),
                plugin.clone(),
                resolved.sha256.clone(),
                input_sha.clone(),
            );
            tokio::spawn(async move {
                tokio::time::sleep(RUNNING_MARKER_AFTER).await;
                let _ = store
                    .write_relaxed(move |tx| {
                        tx.exec(
                            "INSERT OR REPLACE INTO workflow_steps(workflow_id, seq, attempt, step, group_seq, status,
                                input_sha256, plugin, plugin_sha256, started_at)
                             VALUES (?1, ?2, ?3, ?4, ?5, 'running', ?6, ?7, ?8, ?9)",
                            params![ev2.workflow_id, ev2.seq as i64, ev2.attempt, ev2.step, ev2.group.map(|g| g as i64), isha, plugin2, sha2, started],
                        )?;
                        tx.exec(
                            "UPDATE workflows SET current_step = ?2, current_step_index = ?3, updated_at = ?4 WHERE id = ?1",
                            params![ev2.workflow_id, ev2.step, ev2.seq as i64, started],
                        )?;
                        Ok::<_, WorkflowError>(())
                    })
                    .await;
            })
        };
        let ctx = Arc::new(
            StepContext::new(
                inner.store.clone(),
                inner.refs.clone(),
                inner.claude.clone(),
                ev.workflow_id.clone(),
                def.name.clone(),
                ev.seq,
                ev.attempt,
                view.state.clone(),
            )
            .with_params(input.params.clone())
            .with_asked_at(d.event.created_at),
        );
        let (cancel_tx, mut cancel_rx) = watch::channel(false);
        let cancel_key = (ev.workflow_id.clone(), ev.seq);
        inner
            .cancels
            .lock()
            .unwrap()
            .insert(cancel_key.clone(), cancel_tx);
        let cancelled = async move {
            if cancel_rx.wait_for(|c| *c).await.is_err() {
                std::future::pending::<()>().await;
            }
        };
        let heartbeat = {
            let (bus, d, lease) = (inner.bus.clone(), d.clone(), inner.opts.lease);
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(lease / 3).await;
                    if !matches!(bus.extend(&d, lease).await, Ok(true)) {
                        return;
                    }
                }
            })
        };
        let t0 = Instant::now();
        let run = inner.runner.run(resolved.clone(), input, ctx.clone());
        let timeout = Duration::from_millis(step.timeout_ms);
        let outcome = tokio::select! {
            r = run_within(timeout, run, &ctx) => match r {
                Ok(r) => Some(r),
                Err(()) => {
                    // The step is over: its Claude calls stop now, as on a cancel (their
                    // process groups are killed), and the step commits only once they have
                    // settled, so a call paid before the kill is in its totals and the retry
                    // never runs beside it.
                    ctx.cancel_calls();
                    if !ctx.settle_calls(CALLS_SETTLE).await {
                        tracing::warn!(workflow_id = %ev.workflow_id, step = %step.name, "Claude calls of a timed-out step did not stop in time");
                    }
                    Some(Err(StepError::retryable(format!("step {:?} timed out after {} ms; its Claude calls were stopped", step.name, step.timeout_ms))))
                }
            },
            _ = cancelled => None,
        };
        heartbeat.abort();
        marker.abort();
        inner.cancels.lock().unwrap().remove(&cancel_key);
        let elapsed = t0.elapsed();
        let meta = RunMeta {
            plugin,
            plugin_sha: resolved.sha256.clone(),
            input_sha,
            started,
            elapsed,
        };
        match outcome {
            None => {
                // The step's future is gone, but a plugin blocked in a host call keeps its
                // thread: stop its Claude calls so nothing runs (or is paid) for a cancelled
                // workflow, and count what was paid before they stopped.
                ctx.cancel_calls();
                ctx.settle_calls(CALLS_SETTLE).await;
                self.commit_discard(d, ev, &meta, ctx.totals()).await
            }
            Some(Ok(out)) => {
                self.commit_success(d, ev, def.clone(), step, out, ctx, meta)
                    .await
            }
            Some(Err(e)) => {
                self.commit_failure(d, ev, &def.name, Some(&step), e, Some((ctx, meta)))
                    .await
            }
        }
    }

    async fn ack(&self, d: &Delivery) -> Result<(), WorkflowError> {
        match self.inner.bus.ack(d).await {
            Ok(()) | Err(BusError::StaleClaim { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    async fn park(&self, d: &Delivery, ev: &StepEvent) -> Result<(), WorkflowError> {
        let (d, ev) = (d.clone(), ev.clone());
        self.inner
            .store
            .write(move |tx| {
                park_in(tx, &ev)?;
                bus::ack_in(tx, d.subscription_id, d.event.id, &d.token)?;
                Ok(())
            })
            .await
    }

    async fn commit_discard(
        &self,
        d: &Delivery,
        ev: &StepEvent,
        meta: &RunMeta,
        totals: super::context::CallTotals,
    ) -> Result<(), WorkflowError> {
        let (d, ev, meta) = (d.clone(), ev.clone(), meta.clone());
        self.inner
            .store
            .write(move |tx| {
                // Calls paid before the cancel stopped them still count.
                add_totals(tx, &ev.workflow_id, &totals)?;
                journal(
                    tx,
                    &ev,
                    "discarded",
                    &meta,
                    None,
                    None,
                    Some("the workflow was cancelled while the step ran"),
                    &totals,
                )?;
                bus::ack_in(tx, d.subscription_id, d.event.id, &d.token)?;
                Ok(())
            })
            .await
    }

    async fn commit_skip(
        &self,
        d: &Delivery,
        ev: &StepEvent,
        def: Arc<Definition>,
        step: Step,
    ) -> Result<(), WorkflowError> {
        let (d, ev, refs) = (d.clone(), ev.clone(), self.inner.refs.clone());
        self.inner
            .store
            .write(move |tx| {
                let meta = RunMeta::none();
                journal(
                    tx,
                    &ev,
                    "skipped",
                    &meta,
                    None,
                    None,
                    Some(&format!(
                        "when {:?} was false",
                        step.when_source.as_deref().unwrap_or("")
                    )),
                    &Default::default(),
                )?;
                let row = load_row(tx, &ev.workflow_id)?;
                let state = load_state(tx, &refs, &row)?;
                advance(tx, &def, &row, &ev, &step.next, state, &refs, meta.elapsed)?;
                bus::ack_in(tx, d.subscription_id, d.event.id, &d.token)?;
                Ok(())
            })
            .await
    }

    async fn commit_group_start(
        &self,
        d: &Delivery,
        ev: &StepEvent,
        def: Arc<Definition>,
        step: Step,
    ) -> Result<(), WorkflowError> {
        let (d, ev) = (d.clone(), ev.clone());
        self.inner
            .store
            .write(move |tx| {
                let meta = RunMeta::none();
                journal(
                    tx,
                    &ev,
                    "completed",
                    &meta,
                    Some(&json!({"parallel": step.parallel})),
                    None,
                    None,
                    &Default::default(),
                )?;
                let row = load_row(tx, &ev.workflow_id)?;
                if row.status == "paused" {
                    park_in(tx, &ev)?;
                } else {
                    let first: i64 = tx.query_row(
                        "SELECT next_seq FROM workflows WHERE id = ?1",
                        [&ev.workflow_id],
                        |r| r.get(0),
                    )?;
                    tx.exec(
                        "UPDATE workflows SET next_seq = next_seq + ?2 WHERE id = ?1",
                        params![ev.workflow_id, step.parallel.len() as i64],
                    )?;
                    for (i, m) in step.parallel.iter().enumerate() {
                        let mev = StepEvent {
                            workflow_id: ev.workflow_id.clone(),
                            seq: first as u64 + i as u64,
                            attempt: 1,
                            step: m.clone(),
                            group: Some(ev.seq),
                        };
                        publish_step(tx, &def.name, &mev, None)?;
                    }
                }
                bus::ack_in(tx, d.subscription_id, d.event.id, &d.token)?;
                Ok(())
            })
            .await
    }

    #[allow(clippy::too_many_arguments)]
    async fn commit_success(
        &self,
        d: &Delivery,
        ev: &StepEvent,
        def: Arc<Definition>,
        step: Step,
        out: StepOutput,
        ctx: Arc<StepContext>,
        meta: RunMeta,
    ) -> Result<(), WorkflowError> {
        let mut patch = Value::Object(ctx.take_patch());
        merge_patch(&mut patch, &out.state_patch);
        let mut events = ctx.take_events();
        for (topic, data) in &out.events {
            if let Err(e) = bus::validate_topic(topic) {
                let err = StepError::fatal(format!(
                    "step {:?} emitted an event with a bad topic: {e}",
                    step.name
                ));
                return self
                    .commit_failure(d, ev, &def.name, Some(&step), err, Some((ctx, meta)))
                    .await;
            }
            events.push(
                NewEvent::new(topic.clone(), data.clone()).correlated(ev.workflow_id.clone()),
            );
        }
        let totals = ctx.totals();
        // Where to go next, checked against the definition.
        let target = match &out.next {
            Some(t) if t == END || *t == step.next || step.branches.contains(t) => t.clone(),
            Some(t) => {
                let err = StepError::fatal(format!(
                    "step {:?} chose next step {t:?}, which is not among its branches ({}) nor its next ({:?})",
                    step.name,
                    step.branches.join(", "),
                    step.next
                ));
                return self
                    .commit_failure(d, ev, &def.name, Some(&step), err, Some((ctx, meta)))
                    .await;
            }
            None => step.next.clone(),
        };
        let output = json!({"state_patch": patch, "result": out.result, "next": out.next});
        let output_text = output.to_string();
        let output_ref = if output_text.len() > INLINE_OUTPUT_MAX {
            Some(
                self.inner
                    .refs
                    .write(
                        &format!(
                            "state/workflows/{}/output_{}_{}.json",
                            ev.workflow_id, ev.seq, ev.attempt
                        ),
                        output_text.as_bytes(),
                    )
                    .map_err(|e| WorkflowError::Bus(BusError::BadPayload(e.to_string())))?,
            )
        } else {
            None
        };
        let (d, ev, refs) = (d.clone(), ev.clone(), self.inner.refs.clone());
        self.inner
            .store
            .write(move |tx| {
                let row = load_row(tx, &ev.workflow_id)?;
                if row.status == "cancelled" {
                    journal(tx, &ev, "discarded", &meta, None, None, Some("the workflow was cancelled while the step ran"), &totals)?;
                    bus::ack_in(tx, d.subscription_id, d.event.id, &d.token)?;
                    return Ok(());
                }
                let inline = output_ref.is_none().then_some(&output);
                journal(tx, &ev, "completed", &meta, inline, output_ref.as_ref(), None, &totals)?;
                add_totals(tx, &ev.workflow_id, &totals)?;
                for e in &events {
                    bus::publish_in(tx, e)?;
                }
                let mut state = load_state(tx, &refs, &row)?;
                if let Some(group_seq) = ev.group {
                    // A parallel member: join when it is the last of its group to finish.
                    let group_name = step.member_of.clone().unwrap_or_default();
                    let group = def.step(&group_name).cloned();
                    let Some(group) = group else {
                        return Err(WorkflowError::Bus(BusError::BadPayload(format!("group {group_name} vanished"))));
                    };
                    let done: HashMap<String, Value> = tx
                        .prepare("SELECT step, output, output_ref FROM workflow_steps WHERE workflow_id = ?1 AND group_seq = ?2 AND status = 'completed'")?
                        .query_map(params![ev.workflow_id, group_seq as i64], |r| Ok((r.get::<_, String>(0)?, r.get::<_, Option<String>>(1)?, r.get::<_, Option<String>>(2)?)))?
                        .filter_map(|r| r.ok())
                        .map(|(s, o, oref)| {
                            let v = match (o, oref) {
                                (Some(o), _) => serde_json::from_str(&o).unwrap_or(Value::Null),
                                (None, Some(r)) => serde_json::from_str::<FileRef>(&r).ok().and_then(|r| refs.read(&r).ok()).and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or(Value::Null),
                                _ => Value::Null,
                            };
                            (s, v)
                        })
                        .collect();
                    publish_progress(tx, &def.name, &ev, &meta, &totals, "completed")?;
                    if !group.parallel.iter().all(|m| done.contains_key(m)) {
                        bus::ack_in(tx, d.subscription_id, d.event.id, &d.token)?;
                        return Ok(());
                    }
                    let mut results = Map::new();
                    for m in &group.parallel {
                        let o = &done[m];
                        merge_patch(&mut state, &o["state_patch"]);
                        results.insert(m.clone(), o["result"].clone());
                    }
                    merge_patch(&mut state, &json!({ "results": results }));
                    let gev = StepEvent { workflow_id: ev.workflow_id.clone(), seq: group_seq, attempt: 1, step: group.name.clone(), group: None };
                    advance(tx, &def, &row, &gev, &group.next, state, &refs, meta.elapsed)?;
                } else {
                    merge_patch(&mut state, &patch);
                    publish_progress(tx, &def.name, &ev, &meta, &totals, "completed")?;
                    advance(tx, &def, &row, &ev, &target, state, &refs, meta.elapsed)?;
                }
                bus::ack_in(tx, d.subscription_id, d.event.id, &d.token)?;
                Ok(())
            })
            .await
    }

    async fn commit_failure(
        &self,
        d: &Delivery,
        ev: &StepEvent,
        wtype: &str,
        step: Option<&Step>,
        err: StepError,
        run: Option<(Arc<StepContext>, RunMeta)>,
    ) -> Result<(), WorkflowError> {
        let (totals, meta) = match run {
            Some((ctx, meta)) => (ctx.totals(), meta),
            None => (Default::default(), RunMeta::none()),
        };
        let policy = step.map(|s| s.retry).unwrap_or_default();
        let retry = err.retryable && ev.attempt < policy.max_attempts;
        let (d, ev, wtype) = (d.clone(), ev.clone(), wtype.to_string());
        let backoff = crate::bus::backoff_ms(ev.attempt, policy.backoff_ms, policy.backoff_max_ms);
        self.inner
            .store
            .write(move |tx| {
                let row = load_row(tx, &ev.workflow_id)?;
                add_totals(tx, &ev.workflow_id, &totals)?;
                if row.status == "cancelled" {
                    journal(tx, &ev, "discarded", &meta, None, None, Some(&err.message), &totals)?;
                } else if retry {
                    journal(tx, &ev, "retrying", &meta, None, None, Some(&err.message), &totals)?;
                    let next = StepEvent { attempt: ev.attempt + 1, ..ev.clone() };
                    publish_step(tx, &wtype, &next, Some(now_ms() + backoff))?;
                    publish_progress(tx, &wtype, &ev, &meta, &totals, "retrying")?;
                } else {
                    journal(tx, &ev, "failed", &meta, None, None, Some(&err.message), &totals)?;
                    let message = format!("step {:?} failed on attempt {}: {}", ev.step, ev.attempt, err.message);
                    tx.exec(
                        "UPDATE workflows SET status = 'failed', error = ?2, updated_at = ?3, completed_at = ?3 WHERE id = ?1",
                        params![ev.workflow_id, message, now_ms()],
                    )?;
                    publish_progress(tx, &wtype, &ev, &meta, &totals, "failed")?;
                    bus::publish_in(tx, &NewEvent::new("workflow.failed", json!({"workflow_id": ev.workflow_id, "step": ev.step, "error": message})).correlated(ev.workflow_id.clone()))?;
                }
                bus::ack_in(tx, d.subscription_id, d.event.id, &d.token)?;
                Ok(())
            })
            .await
    }
}

#[derive(Debug, Clone)]
struct RunMeta {
    plugin: String,
    plugin_sha: String,
    input_sha: String,
    started: i64,
    elapsed: Duration,
}

impl RunMeta {
    fn none() -> Self {
        RunMeta {
            plugin: String::new(),
            plugin_sha: String::new(),
            input_sha: String::new(),
            started: now_ms(),
            elapsed: Duration::ZERO,
        }
    }
}

/// The answer text in a logged response line (a CLI `result` line, or a KSI envelope with
/// `text`).
fn text_of_logged_line(bytes: &[u8]) -> Option<String> {
    let v: Value = serde_json::from_slice(bytes).ok()?;
    v.get("result")
        .or_else(|| v.get("text"))
        .and_then(Value::as_str)
        .map(str::to_string)
}

struct Row {
    workflow_type: String,
    status: String,
    state: Option<String>,
    checkpoint: Option<String>,
    next_seq: i64,
    created_at: i64,
}

fn load_row(tx: &Tx<'_>, id: &str) -> Result<Row, WorkflowError> {
    tx.query_row(
        "SELECT type, status, state, checkpoint_file, next_seq, created_at FROM workflows WHERE id = ?1",
        [id],
        |r| {
            Ok(Row {
                workflow_type: r.get(0)?,
                status: r.get(1)?,
                state: r.get(2)?,
                checkpoint: r.get(3)?,
                next_seq: r.get(4)?,
                created_at: r.get(5)?,
            })
        },
    )
    .optional()?
    .ok_or_else(|| WorkflowError::UnknownInstance(id.to_string()))
}

fn load_state(_tx: &Tx<'_>, refs: &Refs, row: &Row) -> Result<Value, WorkflowError> {
    if let Some(r) = &row.checkpoint {
        let r: FileRef =
            serde_json::from_str(r).map_err(|e| BusError::BadPayload(e.to_string()))?;
        let bytes = refs
            .read(&r)
            .map_err(|e| BusError::BadPayload(e.to_string()))?;
        return Ok(serde_json::from_slice(&bytes).map_err(|e| BusError::BadPayload(e.to_string()))?);
    }
    Ok(row
        .state
        .as_deref()
        .and_then(|s| serde_json::from_str(s).ok())
        .unwrap_or_else(|| json!({})))
}

fn park_in(tx: &Tx<'_>, ev: &StepEvent) -> Result<(), WorkflowError> {
    let parked: String = tx.query_row(
        "SELECT parked FROM workflows WHERE id = ?1",
        [&ev.workflow_id],
        |r| r.get(0),
    )?;
    let mut list: Vec<StepEvent> = serde_json::from_str(&parked).unwrap_or_default();
    if !list.contains(ev) {
        list.push(ev.clone());
    }
    tx.exec(
        "UPDATE workflows SET parked = ?2 WHERE id = ?1",
        params![ev.workflow_id, serde_json::to_string(&list).unwrap()],
    )?;
    Ok(())
}

fn publish_step(
    tx: &Tx<'_>,
    wtype: &str,
    ev: &StepEvent,
    not_before: Option<i64>,
) -> Result<i64, WorkflowError> {
    let mut e = NewEvent::new(
        format!("workflow.{wtype}.step.{}", ev.step),
        serde_json::to_value(ev).unwrap(),
    )
    .correlated(ev.workflow_id.clone());
    e.not_before = not_before;
    Ok(bus::publish_in(tx, &e)?)
}

fn publish_progress(
    tx: &Tx<'_>,
    wtype: &str,
    ev: &StepEvent,
    meta: &RunMeta,
    totals: &super::context::CallTotals,
    status: &str,
) -> Result<(), WorkflowError> {
    bus::publish_in(
        tx,
        &NewEvent::new(
            "workflow.step_complete",
            json!({
                "workflow_id": ev.workflow_id, "type": wtype, "step": ev.step, "seq": ev.seq,
                "attempt": ev.attempt, "status": status, "plugin": meta.plugin,
                "duration_ms": meta.elapsed.as_millis() as u64, "cost_usd": totals.cost_usd,
                "claude_calls": totals.claude_calls,
            }),
        )
        .correlated(ev.workflow_id.clone()),
    )?;
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn journal(
    tx: &Tx<'_>,
    ev: &StepEvent,
    status: &str,
    meta: &RunMeta,
    output: Option<&Value>,
    output_ref: Option<&FileRef>,
    error: Option<&str>,
    totals: &super::context::CallTotals,
) -> Result<(), WorkflowError> {
    tx.prepare_cached(
        "INSERT OR REPLACE INTO workflow_steps(workflow_id, seq, attempt, step, group_seq, status, input_sha256,
            output, output_ref, plugin, plugin_sha256, error, cost_usd, tokens_in, tokens_out, claude_calls,
            started_at, finished_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, NULLIF(?7, ''), ?8, ?9, NULLIF(?10, ''), NULLIF(?11, ''), ?12, ?13, ?14, ?15, ?16, ?17, ?18)",
    )?
    .execute(params![
        ev.workflow_id,
        ev.seq as i64,
        ev.attempt,
        ev.step,
        ev.group.map(|g| g as i64),
        status,
        meta.input_sha,
        output.map(|o| o.to_string()),
        output_ref.map(|r| serde_json::to_string(r).unwrap()),
        meta.plugin,
        meta.plugin_sha,
        error,
        totals.cost_usd,
        totals.tokens_in as i64,
        totals.tokens_out as i64,
        totals.claude_calls as i64,
        meta.started,
        now_ms()
    ])?;
    Ok(())
}

fn add_totals(tx: &Tx<'_>, id: &str, t: &super::context::CallTotals) -> Result<(), WorkflowError> {
    if t.claude_calls > 0 || t.cost_usd > 0.0 {
        tx.prepare_cached(
            "UPDATE workflows SET cost_usd = cost_usd + ?2, tokens_in = tokens_in + ?3, tokens_out = tokens_out + ?4,
                claude_calls = claude_calls + ?5, simulated_usd = simulated_usd + ?6 WHERE id = ?1",
        )?
        .execute(params![id, t.cost_usd, t.tokens_in as i64, t.tokens_out as i64, t.claude_calls as i64, t.simulated_usd])?;
    }
    Ok(())
}

/// Stores the new state and moves the instance to `target` (a step, or the end).
#[allow(clippy::too_many_arguments)]
fn advance(
    tx: &Tx<'_>,
    def: &Definition,
    row: &Row,
    ev: &StepEvent,
    target: &str,
    state: Value,
    refs: &Refs,
    _elapsed: Duration,
) -> Result<(), WorkflowError> {
    let now = now_ms();
    let text = state.to_string();
    // Large state goes to a checkpoint file, written (and fsynced) before this row commits.
    let (inline, checkpoint) = if text.len() > INLINE_STATE_MAX {
        let r = refs
            .write(
                &format!("state/workflows/{}/step_{}.json", ev.workflow_id, ev.seq),
                text.as_bytes(),
            )
            .map_err(|e| BusError::BadPayload(e.to_string()))?;
        (None, Some(serde_json::to_string(&r).unwrap()))
    } else {
        (Some(text), None)
    };
    tx.prepare_cached(
        "UPDATE workflows SET state = ?2, checkpoint_file = ?3, updated_at = ?4 WHERE id = ?1",
    )?
    .execute(params![ev.workflow_id, inline, checkpoint, now])?;
    if target == END {
        tx.exec(
            "UPDATE workflows SET status = 'completed', current_step = NULL, completed_at = ?2 WHERE id = ?1",
            params![ev.workflow_id, now],
        )?;
        let totals: (f64, i64, i64, i64) = tx.query_row(
            "SELECT cost_usd, tokens_in, tokens_out, claude_calls FROM workflows WHERE id = ?1",
            [&ev.workflow_id],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
        )?;
        bus::publish_in(
            tx,
            &NewEvent::new(
                "workflow.complete",
                json!({"workflow_id": ev.workflow_id, "type": def.name, "cost_usd": totals.0, "tokens_in": totals.1,
                       "tokens_out": totals.2, "claude_calls": totals.3, "duration_ms": now - row.created_at}),
            )
            .correlated(ev.workflow_id.clone()),
        )?;
        return Ok(());
    }
    let next = StepEvent {
        workflow_id: ev.workflow_id.clone(),
        seq: row.next_seq as u64,
        attempt: 1,
        step: target.to_string(),
        group: None,
    };
    tx.prepare_cached(
        "UPDATE workflows SET next_seq = next_seq + 1, current_step = ?2 WHERE id = ?1",
    )?
    .execute(params![ev.workflow_id, target])?;
    if row.status == "paused" {
        park_in(tx, &next)?;
    } else {
        publish_step(tx, &row.workflow_type, &next, None)?;
    }
    Ok(())
}

const VIEW_COLUMNS: &str = "id, type, definition_version, status, current_step, params, state, checkpoint_file, error,
    cost_usd, tokens_in, tokens_out, claude_calls, created_at, updated_at, completed_at, total_steps, simulated_usd";

fn read_view(r: &rusqlite::Row<'_>) -> rusqlite::Result<InstanceView> {
    let params: String = r.get(5)?;
    let state: Option<String> = r.get(6)?;
    let cp: Option<String> = r.get(7)?;
    Ok(InstanceView {
        id: r.get(0)?,
        workflow_type: r.get(1)?,
        definition_version: r.get(2)?,
        status: r.get(3)?,
        current_step: r.get(4)?,
        params: serde_json::from_str(&params).unwrap_or(Value::Null),
        state: state
            .and_then(|s| serde_json::from_str(&s).ok())
            .unwrap_or(Value::Null),
        checkpoint_file: cp.and_then(|s| serde_json::from_str(&s).ok()),
        error: r.get(8)?,
        cost_usd: r.get(9)?,
        tokens_in: r.get::<_, i64>(10)? as u64,
        tokens_out: r.get::<_, i64>(11)? as u64,
        claude_calls: r.get::<_, i64>(12)? as u64,
        created_at: r.get(13)?,
        updated_at: r.get(14)?,
        completed_at: r.get(15)?,
        total_steps: r.get::<_, Option<i64>>(16)?.map(|v| v as u64),
        simulated_usd: r.get(17)?,
        simulated: r.get::<_, f64>(17)? > 0.0,
    })
}

fn load_view(c: &rusqlite::Connection, id: &str) -> Result<Option<InstanceView>, WorkflowError> {
    Ok(c.query_row(
        &format!("SELECT {VIEW_COLUMNS} FROM workflows WHERE id = ?1"),
        [id],
        read_view,
    )
    .optional()?)
}

#[cfg(test)]
mod tests;
