//! What a running step can ask of the host, with every call journaled.
//!
//! Each host call gets the next call number of the step's (instance, seq, attempt). Before a
//! Claude call runs, a `started` row with its request hash and process id commits; after it
//! returns, the row becomes `completed` with the answer. On a re-run of the same step attempt
//! (after a crash), a completed call returns its recorded answer, a started one asks the
//! executor whether that process finished (its output is on disk), and only otherwise runs
//! again. A different request at the same position is a journal mismatch: the plugin changed,
//! and the step fails until an operator uses retry-from.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};

use rusqlite::{OptionalExtension, params};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use super::{ClaudeAnswer, ClaudeApi, ClaudeFailure, ClaudeRequest, StepError};
use crate::bus::{BusError, NewEvent};
use crate::refs::{FileRef, Refs};
use crate::store::{Store, now_ms};

/// Totals of the Claude calls a step made.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CallTotals {
    pub cost_usd: f64,
    pub tokens_in: u64,
    pub tokens_out: u64,
    pub claude_calls: u64,
    /// The part of `cost_usd` that is simulated (`fake-claude`).
    pub simulated_usd: f64,
}

/// The host side of one running step.
pub struct StepContext {
    pub(crate) store: Store,
    pub(crate) refs: Refs,
    pub(crate) claude: Arc<dyn ClaudeApi>,
    pub workflow_id: String,
    pub workflow_type: String,
    pub seq: u64,
    pub attempt: u32,
    next_call: AtomicU32,
    state: Mutex<Value>,
    patch: Mutex<Map<String, Value>>,
    events: Mutex<Vec<NewEvent>>,
    totals: Mutex<CallTotals>,
    /// Turns true when the workflow is cancelled or the step timed out: running Claude calls
    /// are stopped.
    cancelled: tokio::sync::watch::Sender<bool>,
    /// Claude calls of this step that have not settled yet (running, or recording their
    /// outcome): the step commits its totals only once this is 0 (see [`Self::settle_calls`]).
    in_flight: tokio::sync::watch::Sender<usize>,
    /// Process ids of the step's Claude calls that are running.
    running: Mutex<std::collections::HashSet<String>>,
    templates_dir: std::path::PathBuf,
    /// The step's params (see [`Self::with_params`]).
    params: Value,
    asked_at_ms: i64,
}

/// Whether `v` holds the reference `r` (an object with its path, line and sha256) anywhere.
fn mentions_ref(v: &Value, r: &FileRef) -> bool {
    match v {
        Value::Object(m) => {
            let same = m.get("path").and_then(Value::as_str) == Some(r.path.as_str())
                && m.get("sha256").and_then(Value::as_str) == Some(r.sha256.as_str())
                && m.get("line").and_then(Value::as_u64) == r.line;
            same || m.values().any(|v| mentions_ref(v, r))
        }
        Value::Array(a) => a.iter().any(|v| mentions_ref(v, r)),
        _ => false,
    }
}

#[derive(Debug)]
enum Recorded {
    Completed(Value),
    Started(Option<String>),
    None,
}

fn sha(v: &impl Serialize) -> String {
    crate::refs::sha256_hex(serde_json::to_string(v).unwrap_or_default().as_bytes())
}

impl StepContext {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        store: Store,
        refs: Refs,
        claude: Arc<dyn ClaudeApi>,
        workflow_id: String,
        workflow_type: String,
        seq: u64,
        attempt: u32,
        state: Value,
    ) -> Self {
        let templates_dir = refs.root().join("prompts/templates");
        StepContext {
            store,
            refs,
            claude,
            workflow_id,
            workflow_type,
            seq,
            attempt,
            next_call: AtomicU32::new(0),
            state: Mutex::new(state),
            patch: Mutex::new(Map::new()),
            events: Mutex::new(Vec::new()),
            totals: Mutex::new(CallTotals::default()),
            cancelled: tokio::sync::watch::channel(false).0,
            in_flight: tokio::sync::watch::channel(0).0,
            running: Mutex::default(),
            templates_dir,
            params: Value::Null,
            asked_at_ms: 0,
        }
    }

    fn lookup(&self, call_seq: u32, kind: &str, hash: &str) -> Result<Recorded, StepError> {
        let (wf, seq, attempt) = (self.workflow_id.clone(), self.seq as i64, self.attempt);
        type CallRow = (String, String, String, Option<String>, Option<String>);
        let row: Option<CallRow> = self
            .store
            .read(|c| {
                c.query_row(
                    "SELECT kind, request_sha256, status, process_id, response FROM step_calls
                     WHERE workflow_id = ?1 AND seq = ?2 AND attempt = ?3 AND call_seq = ?4",
                    params![wf, seq, attempt, call_seq],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
                )
                .optional()
                .map_err(BusError::from)
            })
            .map_err(|e| StepError::retryable(format!("reading the step journal: {e}")))?;
        let Some((rkind, rhash, status, process, response)) = row else {
            return Ok(Recorded::None);
        };
        if rkind != kind || rhash != hash {
            return Err(StepError::fatal(format!(
                "journal mismatch in workflow {} step seq {} attempt {}: host call #{call_seq} was {rkind} with request {} when this step first ran, but the re-run made {kind} with request {}. The plugin changed since; use `ksi workflow retry-from` to run the step again with the new code",
                self.workflow_id,
                self.seq,
                self.attempt,
                &rhash[..12],
                &hash[..12]
            )));
        }
        Ok(match (status.as_str(), response) {
            ("completed", Some(r)) => {
                Recorded::Completed(serde_json::from_str(&r).unwrap_or(Value::Null))
            }
            _ => Recorded::Started(process),
        })
    }

    #[allow(clippy::too_many_arguments)]
    async fn record(
        &self,
        call_seq: u32,
        kind: &str,
        hash: &str,
        status: &'static str,
        process_id: Option<String>,
        response: Option<Value>,
        cost: f64,
        request: Option<Value>,
    ) -> Result<(), StepError> {
        let (wf, seq, attempt, kind, hash) = (
            self.workflow_id.clone(),
            self.seq as i64,
            self.attempt,
            kind.to_string(),
            hash.to_string(),
        );
        self.store
            .write(move |tx| {
                let now = now_ms();
                tx.prepare_cached(
                    "INSERT INTO step_calls(workflow_id, seq, attempt, call_seq, kind, request_sha256,
                        status, process_id, response, cost_usd, created_at, completed_at, request)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, CASE WHEN ?7 = 'started' THEN NULL ELSE ?11 END, ?12)
                     ON CONFLICT(workflow_id, seq, attempt, call_seq) DO UPDATE SET status = excluded.status,
                        process_id = COALESCE(excluded.process_id, step_calls.process_id),
                        response = excluded.response, cost_usd = excluded.cost_usd,
                        completed_at = excluded.completed_at,
                        request = COALESCE(excluded.request, step_calls.request)",
                )?
                .execute(params![
                    wf,
                    seq,
                    attempt,
                    call_seq,
                    kind,
                    hash,
                    status,
                    process_id,
                    response.map(|r| r.to_string()),
                    cost,
                    now,
                    request.map(|r| r.to_string())
                ])?;
                Ok::<_, BusError>(())
            })
            .await
            .map_err(|e| StepError::retryable(format!("writing the step journal: {e}")))
    }

    /// A journaled call whose result is plain data (config, templates).
    async fn journaled<T, F>(&self, kind: &str, request: &Value, run: F) -> Result<T, StepError>
    where
        T: Serialize + DeserializeOwned,
        F: FnOnce() -> Result<T, StepError>,
    {
        let call_seq = self.next_call.fetch_add(1, Ordering::SeqCst);
        let hash = sha(request);
        if let Recorded::Completed(v) = self.lookup(call_seq, kind, &hash)? {
            return serde_json::from_value(v).map_err(|e| {
                StepError::fatal(format!("recorded {kind} result is unreadable: {e}"))
            });
        }
        let out = run()?;
        let value = serde_json::to_value(&out).unwrap_or(Value::Null);
        self.record(
            call_seq,
            kind,
            &hash,
            "completed",
            None,
            Some(value),
            0.0,
            None,
        )
        .await?;
        Ok(out)
    }

    fn add_totals(&self, a: &ClaudeAnswer) {
        let mut t = self.totals.lock().unwrap();
        t.cost_usd += a.cost_usd;
        if a.simulated {
            t.simulated_usd += a.cost_usd;
        }
        t.tokens_in += a.tokens_in;
        t.tokens_out += a.tokens_out;
        t.claude_calls += 1;
    }

    /// Runs (or replays) one Claude call.
    pub async fn claude_complete(
        &self,
        request: ClaudeRequest,
    ) -> Result<ClaudeAnswer, ClaudeFailure> {
        let call_seq = self.next_call.fetch_add(1, Ordering::SeqCst);
        self.claude_at(call_seq, request).await
    }

    async fn claude_at(
        &self,
        call_seq: u32,
        request: ClaudeRequest,
    ) -> Result<ClaudeAnswer, ClaudeFailure> {
        self.in_flight.send_modify(|n| *n += 1);
        let _settled = InFlightCall(&self.in_flight);
        let kind = "claude.complete";
        let hash = sha(&request);
        let internal = |e: StepError| ClaudeFailure {
            transient: e.retryable,
            class: if e.retryable {
                "journal".into()
            } else {
                "journal_mismatch".into()
            },
            message: e.message,
        };
        let previous = match self.lookup(call_seq, kind, &hash).map_err(internal)? {
            Recorded::Completed(v) => {
                let answer: ClaudeAnswer =
                    serde_json::from_value(v).map_err(|e| ClaudeFailure {
                        transient: false,
                        class: "journal".into(),
                        message: format!("recorded Claude answer is unreadable: {e}"),
                    })?;
                self.add_totals(&answer);
                return Ok(answer);
            }
            Recorded::Started(process) => process,
            Recorded::None => None,
        };
        // Started before a crash: if that process finished, its answer is on disk.
        if let Some(pid) = previous.clone()
            && let Some(answer) = self.claude.recover(pid).await
        {
            self.record(
                call_seq,
                kind,
                &hash,
                "completed",
                Some(answer.process_id.clone()),
                serde_json::to_value(&answer).ok(),
                answer.cost_usd,
                None,
            )
            .await
            .map_err(internal)?;
            self.add_totals(&answer);
            return Ok(answer);
        }
        let process_id = format!(
            "proc_{}_{}_{}_{}{}",
            self.workflow_id,
            self.seq,
            self.attempt,
            call_seq,
            if previous.is_some() {
                format!("_r{}", rand::random::<u16>())
            } else {
                String::new()
            }
        );
        self.record(
            call_seq,
            kind,
            &hash,
            "started",
            Some(process_id.clone()),
            None,
            0.0,
            serde_json::to_value(&request).ok(),
        )
        .await
        .map_err(internal)?;
        let mut cancelled = self.cancelled.subscribe();
        if *cancelled.borrow_and_update() {
            return Err(ClaudeFailure {
                transient: false,
                class: "cancelled".into(),
                message: format!("workflow {} was cancelled", self.workflow_id),
            });
        }
        self.running.lock().unwrap().insert(process_id.clone());
        let _running = RunningCall(&self.running, process_id.clone());
        let call =
            self.claude
                .complete(process_id.clone(), Some(self.workflow_id.clone()), request);
        tokio::pin!(call);
        let result = tokio::select! {
            r = &mut call => r,
            _ = async { cancelled.wait_for(|c| *c).await.map(|_| ()) } => loop {
                // Cancelled: stop the call (asking again until the executor has it running),
                // then take its outcome.
                self.claude.cancel(&process_id);
                tokio::select! {
                    r = &mut call => break r,
                    _ = tokio::time::sleep(std::time::Duration::from_millis(50)) => {}
                }
            },
        };
        match &result {
            Ok(answer) => {
                self.record(
                    call_seq,
                    kind,
                    &hash,
                    "completed",
                    Some(process_id),
                    serde_json::to_value(answer).ok(),
                    answer.cost_usd,
                    None,
                )
                .await
                .map_err(internal)?;
                self.add_totals(answer);
            }
            Err(f) => {
                // A failed call is not replayed: the re-run (or the next attempt) tries again.
                let _ = self
                    .record(
                        call_seq,
                        kind,
                        &hash,
                        "failed",
                        Some(process_id),
                        serde_json::to_value(f).ok(),
                        0.0,
                        None,
                    )
                    .await;
            }
        }
        result
    }

    /// Runs (or replays) several Claude calls concurrently; answers come back in order.
    pub async fn claude_complete_all(
        &self,
        requests: Vec<ClaudeRequest>,
    ) -> Vec<Result<ClaudeAnswer, ClaudeFailure>> {
        let first = self
            .next_call
            .fetch_add(requests.len() as u32, Ordering::SeqCst);
        let calls = requests
            .into_iter()
            .enumerate()
            .map(|(i, r)| self.claude_at(first + i as u32, r));
        futures_join_all(calls).await
    }

    /// Buffers an event; it is published when the step commits (never if it fails).
    /// Returns its position among this step's events (the bus id is assigned at commit).
    pub fn publish(&self, topic: &str, data: Value) -> Result<u64, String> {
        crate::bus::validate_topic(topic).map_err(|e| e.to_string())?;
        let mut events = self.events.lock().unwrap();
        events.push(NewEvent::new(topic, data).correlated(self.workflow_id.clone()));
        Ok(events.len() as u64)
    }

    /// Reads a state key (as of the step's start plus its own `state_set`s).
    pub fn state_get(&self, key: &str) -> Option<Value> {
        if let Some(v) = self.patch.lock().unwrap().get(key) {
            return (!v.is_null()).then(|| v.clone());
        }
        self.state.lock().unwrap().get(key).cloned()
    }

    /// Sets a state key; committed with the step (null removes it).
    pub fn state_set(&self, key: &str, value: Value) {
        self.patch.lock().unwrap().insert(key.to_string(), value);
    }

    /// Reads a dynamic setting (journaled: a re-run sees the value the first run saw).
    pub async fn config_get(&self, key: &str) -> Result<Option<Value>, StepError> {
        let store = self.store.clone();
        let k = key.to_string();
        self.journaled(
            "config.get",
            &serde_json::json!({ "key": key }),
            move || {
                crate::settings::get(&store, &k).map_err(|e| StepError::retryable(e.to_string()))
            },
        )
        .await
    }

    /// Renders `prompts/templates/<name>.md` (or `.txt`) with `{{placeholder}}`s filled from
    /// `vars` (journaled, so a template edited mid-run does not change a re-run).
    pub async fn render_template(&self, name: &str, vars: &Value) -> Result<String, StepError> {
        let dir = self.templates_dir.clone();
        let (n, v) = (name.to_string(), vars.clone());
        self.journaled(
            "templates.render",
            &serde_json::json!({ "name": name, "vars": vars }),
            move || render_template_file(&dir, &n, &v).map_err(StepError::fatal),
        )
        .await
    }

    /// Writes a file under `state/workflows/<id>/files/` and returns its reference.
    pub fn files_write(&self, name: &str, bytes: &[u8]) -> Result<FileRef, String> {
        if name.contains('/') || name.starts_with('.') || name.is_empty() {
            return Err(format!(
                "file name {name:?} must be a plain name (no '/', not hidden)"
            ));
        }
        self.refs
            .write(
                &format!("state/workflows/{}/files/{name}", self.workflow_id),
                bytes,
            )
            .map_err(|e| e.to_string())
    }

    /// When the step was asked for (its bus event's time, the same on every redelivery): a
    /// plugin's clocks start there (see [`crate::plugins::GuestDeterminism`]).
    pub(crate) fn with_asked_at(mut self, ms: i64) -> Self {
        self.asked_at_ms = ms;
        self
    }

    /// See [`Self::with_asked_at`].
    pub fn asked_at_ms(&self) -> i64 {
        self.asked_at_ms
    }

    /// The step's params: references in them may be read with [`Self::files_read`].
    pub(crate) fn with_params(mut self, params: Value) -> Self {
        self.params = params;
        self
    }

    /// Reads a file by reference (hash-checked, inside the data dir only), if the step may:
    /// files its workflow wrote (`state/workflows/<id>/`), prompt templates, and the exact
    /// references it was given — in its params, its workflow's state, or the answers of its
    /// workflow's Claude calls. Nothing else (the database, the token, other workflows'
    /// files), and the refusal is the same whether the file exists or not. No error shows a
    /// hash or content the step may not read.
    pub fn files_read(&self, r: &FileRef) -> Result<Vec<u8>, String> {
        if !self.may_read(r)? {
            return Err(format!(
                "file reference {:?} is not readable by this step: a step reads the files its \
                 workflow wrote, prompt templates, and the references it was given (in its \
                 params, its workflow's state and its workflow's Claude answers)",
                r.path
            ));
        }
        self.refs.read(r).map_err(|e| e.to_string())
    }

    fn may_read(&self, r: &FileRef) -> Result<bool, String> {
        let plain = !r.path.is_empty()
            && !r.path.starts_with('/')
            && r.path
                .split('/')
                .all(|c| !c.is_empty() && c != "." && c != "..");
        if !plain {
            return Ok(false);
        }
        let own = format!("state/workflows/{}/", self.workflow_id);
        if r.path.starts_with(&own) || r.path.starts_with("prompts/templates/") {
            return Ok(true);
        }
        if mentions_ref(&self.params, r)
            || mentions_ref(&self.state.lock().unwrap(), r)
            || self
                .patch
                .lock()
                .unwrap()
                .values()
                .any(|v| mentions_ref(v, r))
        {
            return Ok(true);
        }
        let wf = self.workflow_id.clone();
        let answers: Vec<String> = self
            .store
            .read(|c| {
                let mut q = c.prepare_cached(
                    "SELECT response FROM step_calls
                     WHERE workflow_id = ?1 AND kind LIKE 'claude%' AND status = 'completed'
                       AND response IS NOT NULL",
                )?;
                let rows = q.query_map(params![wf], |row| row.get::<_, String>(0))?;
                rows.collect::<Result<Vec<_>, _>>().map_err(BusError::from)
            })
            .map_err(|e| format!("reading the step journal: {e}"))?;
        Ok(answers
            .iter()
            .any(|a| serde_json::from_str::<Value>(a).is_ok_and(|v| mentions_ref(&v, r))))
    }

    /// Logs a line attributed to the step.
    pub fn log(&self, level: &str, message: &str) {
        let (wf, seq) = (&self.workflow_id, self.seq);
        match level {
            "error" => tracing::error!(workflow = %wf, seq, "{message}"),
            "warn" => tracing::warn!(workflow = %wf, seq, "{message}"),
            "debug" => tracing::debug!(workflow = %wf, seq, "{message}"),
            "trace" => tracing::trace!(workflow = %wf, seq, "{message}"),
            _ => tracing::info!(workflow = %wf, seq, "{message}"),
        }
    }

    /// Stops the step's running Claude calls (their process groups are killed) and refuses
    /// new ones: the workflow was cancelled.
    pub fn cancel_calls(&self) {
        self.cancelled.send_replace(true);
    }

    /// Why the step must stop, once its workflow was cancelled or its timeout passed: a
    /// plugin still running is interrupted at its next host call or epoch check.
    pub fn stop_reason(&self) -> Option<String> {
        self.cancelled.borrow().then(|| {
            "its workflow was cancelled or its timeout passed, and its Claude calls were stopped"
                .to_string()
        })
    }

    /// Until when (epoch ms) the latest of the step's running Claude calls is parked by a
    /// subscription limit, if one is: the step's timeout does not count that wait.
    pub fn quota_parked_until(&self) -> Option<i64> {
        let running: Vec<String> = self.running.lock().unwrap().iter().cloned().collect();
        running
            .iter()
            .filter_map(|p| self.claude.parked_until(p))
            .max()
    }

    /// Waits until every Claude call of the step has settled (answered and journaled, or
    /// stopped), at most `within`. After a timeout or a cancel (calls stopped first), this is
    /// what lets the step's totals include every call that was paid. Returns whether all did.
    pub async fn settle_calls(&self, within: std::time::Duration) -> bool {
        let mut rx = self.in_flight.subscribe();
        tokio::time::timeout(within, rx.wait_for(|n| *n == 0))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    pub(crate) fn take_patch(&self) -> Map<String, Value> {
        std::mem::take(&mut self.patch.lock().unwrap())
    }

    pub(crate) fn take_events(&self) -> Vec<NewEvent> {
        std::mem::take(&mut self.events.lock().unwrap())
    }

    pub(crate) fn totals(&self) -> CallTotals {
        self.totals.lock().unwrap().clone()
    }
}

/// Takes a call out of [`StepContext::running`] when it ends (or is dropped).
struct RunningCall<'a>(&'a Mutex<std::collections::HashSet<String>>, String);

impl Drop for RunningCall<'_> {
    fn drop(&mut self) {
        self.0.lock().unwrap().remove(&self.1);
    }
}

/// Counts a Claude call out of [`StepContext::in_flight`] when it settles (or is dropped).
struct InFlightCall<'a>(&'a tokio::sync::watch::Sender<usize>);

impl Drop for InFlightCall<'_> {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n = n.saturating_sub(1));
    }
}

/// Joins futures, keeping order (a tiny `join_all`, so the host needs no futures crate).
async fn futures_join_all<F: std::future::Future>(
    futs: impl IntoIterator<Item = F>,
) -> Vec<F::Output> {
    let mut pinned: Vec<std::pin::Pin<Box<F>>> = futs.into_iter().map(Box::pin).collect();
    let mut out: Vec<Option<F::Output>> = pinned.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (i, f) in pinned.iter_mut().enumerate() {
            if out[i].is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => out[i] = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    out.into_iter().map(|o| o.expect("all ready")).collect()
}

/// Fills `{{name}}` and `{{a.b}}` placeholders of a template file from `vars`.
pub fn render_template_file(
    dir: &std::path::Path,
    name: &str,
    vars: &Value,
) -> Result<String, String> {
    if name.is_empty()
        || name.starts_with('/')
        || name.split('/').any(|c| c.is_empty() || c.starts_with('.'))
    {
        return Err(format!(
            "template name {name:?} must be a relative name like debate/opening"
        ));
    }
    let path = ["md", "txt", ""]
        .iter()
        .map(|ext| {
            if ext.is_empty() {
                dir.join(name)
            } else {
                dir.join(format!("{name}.{ext}"))
            }
        })
        .find(|p| p.is_file())
        .ok_or_else(|| {
            format!(
                "no prompt template {name:?} in {} (expected {name}.md)",
                dir.display()
            )
        })?;
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    render(&text, vars).map_err(|e| format!("{}: {e}", path.display()))
}

/// Fills `{{path}}` placeholders; a missing value is an error naming it.
pub fn render(text: &str, vars: &Value) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after.find("}}").ok_or("a '{{' has no closing '}}'")?;
        let key = after[..end].trim();
        let mut cur = vars;
        for part in key.split('.') {
            cur = cur
                .get(part)
                .ok_or_else(|| format!("placeholder {{{{{key}}}}} has no value"))?;
        }
        match cur {
            Value::String(s) => out.push_str(s),
            v => out.push_str(&v.to_string()),
        }
        rest = &after[end + 2..];
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_fill_placeholders_and_name_missing_ones() {
        let v = serde_json::json!({"topic": "tabs vs spaces", "side": {"name": "pro"}, "round": 2});
        assert_eq!(
            render("Argue {{ side.name }} on {{topic}} (round {{round}}).", &v).unwrap(),
            "Argue pro on tabs vs spaces (round 2)."
        );
        let e = render("{{nope}}", &v).unwrap_err();
        assert!(e.contains("{{nope}}"), "{e}");
    }
}
