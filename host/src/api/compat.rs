//! The original KSI's Unix-socket protocol, so its clients and scripts keep working while their
//! users move over (`<data dir>/ksi-compat.sock` by default; see `docs/migrating-from-ksi.md`).
//!
//! One JSON object per line each way. A request is `{"event": NAME, "data": {...},
//! "correlation_id": ID}` (the older `{"command": "EVENT", "parameters": {...}}` wrapper is
//! unwrapped); its reply is `{"event", "data", "count", "correlation_id", "timestamp"}` or
//! `{"event", "error", "correlation_id", "timestamp"}`. Pushed events (a completion's result,
//! monitored bus events) carry no correlation id. Each connection has its own reader, writer and
//! monitor task, so a client that stops reading only stalls itself.
//!
//! The requests run through KSI's own parts: `completion:async` through the executor
//! ([`Executor::spawn`]: sessions, agents, budgets), `monitor:subscribe` over the bus's live
//! commit notification, `agent:*` over the agents table.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::future::BoxFuture;
use serde_json::{Map, Value, json};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, watch};

use crate::bus::{Bus, Event};
use crate::claude::{Executor, agents};
use crate::config::Config;
use crate::refs::Refs;
use crate::store::Store;
use crate::workflow::{ClaudeAnswer, ClaudeFailure, ClaudeRequest};

/// Default file name of the compatibility socket in the data dir.
pub const SOCKET_NAME: &str = "ksi-compat.sock";

/// Longest request line accepted; a longer one gets an error reply and is skipped.
pub const MAX_LINE_BYTES: usize = 1024 * 1024;

/// Messages queued for one connection before its producers wait for it to read.
const OUTBOX: usize = 256;

/// What the listener needs from the daemon.
#[derive(Clone)]
pub struct CompatState {
    pub store: Store,
    pub bus: Bus,
    pub refs: Refs,
    pub executor: Executor,
    pub data_dir: PathBuf,
    pub started: Instant,
    connections: Arc<AtomicUsize>,
    next_conn: Arc<AtomicU64>,
}

impl CompatState {
    /// The state of a listener over the daemon's parts.
    pub fn new(
        store: Store,
        bus: Bus,
        refs: Refs,
        executor: Executor,
        data_dir: PathBuf,
    ) -> CompatState {
        CompatState {
            store,
            bus,
            refs,
            executor,
            data_dir,
            started: Instant::now(),
            connections: Arc::default(),
            next_conn: Arc::default(),
        }
    }
}

/// Path of the compatibility socket, or `None` when it is off (`off` is `--no-compat`; the
/// `compat = false` setting is overridden by an explicit `flag` path): the flag, else the
/// `compat_socket` setting (relative to the data dir), else `<data dir>/ksi-compat.sock`.
pub fn socket_path(config: &Config, flag: Option<&Path>, off: bool) -> Option<PathBuf> {
    if off || (!config.compat && flag.is_none()) {
        return None;
    }
    Some(match (flag, &config.compat_socket) {
        (Some(p), _) => p.to_path_buf(),
        (None, Some(p)) => config.data_dir.join(p),
        (None, None) => config.data_dir.join(SOCKET_NAME),
    })
}

/// Binds the compatibility socket (mode 0600: whoever can connect can spend on Claude), replacing
/// a stale socket file of a dead daemon.
///
/// # Errors
/// The socket cannot be bound (the message names the path).
pub fn bind(path: &Path) -> anyhow::Result<UnixListener> {
    use anyhow::Context;
    use std::os::unix::fs::PermissionsExt;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating the directory of {}", path.display()))?;
    }
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path).with_context(|| {
        format!(
            "binding the original-KSI compatibility socket {} (choose another with --compat-socket, or --no-compat)",
            path.display()
        )
    })?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("restricting {} to its owner", path.display()))?;
    Ok(listener)
}

/// Accepts connections until `stop` turns true.
pub async fn serve(listener: UnixListener, state: CompatState, mut stop: watch::Receiver<bool>) {
    let stopped = async move {
        let _ = stop.wait_for(|s| *s).await;
    };
    tokio::pin!(stopped);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = &mut stopped => return,
        };
        match accepted {
            Ok((stream, _)) => {
                tokio::spawn(connection(state.clone(), stream));
            }
            Err(e) => {
                // Out of file descriptors, typically: back off instead of spinning.
                tracing::warn!(error = %e, "compat socket: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// One client: a writer task drains the outbox; the reader answers requests in order.
async fn connection(state: CompatState, stream: UnixStream) {
    let id = state.next_conn.fetch_add(1, Ordering::Relaxed) + 1;
    state.connections.fetch_add(1, Ordering::Relaxed);
    let (rd, mut wr) = stream.into_split();
    let (tx, mut rx) = mpsc::channel::<Value>(OUTBOX);
    let writer = tokio::spawn(async move {
        while let Some(msg) = rx.recv().await {
            let mut line = serde_json::to_vec(&msg).unwrap_or_default();
            line.push(b'\n');
            if wr.write_all(&line).await.is_err() {
                return;
            }
        }
    });
    let mut conn = Conn {
        id,
        tx,
        monitor: None,
        own_processes: Arc::default(),
    };
    let mut reader = BufReader::new(rd);
    let mut buf = Vec::new();
    loop {
        let reply = match read_line(&mut reader, &mut buf).await {
            Ok(Line::Eof) | Err(_) => break,
            Ok(Line::TooLong(n)) => error_reply(
                Value::Null,
                Value::Null,
                format!(
                    "request line of {n} bytes is longer than the {MAX_LINE_BYTES} bytes accepted; send smaller requests"
                ),
            ),
            Ok(Line::Text) if buf.iter().all(u8::is_ascii_whitespace) => continue,
            Ok(Line::Text) => {
                let (reply, then) = handle(&state, &mut conn, &buf).await;
                if conn.tx.send(reply).await.is_err() {
                    break;
                }
                if let Some(then) = then {
                    tokio::spawn(then);
                }
                continue;
            }
        };
        if conn.tx.send(reply).await.is_err() {
            break;
        }
    }
    if let Some((_, task)) = conn.monitor.take() {
        task.abort();
    }
    state.connections.fetch_sub(1, Ordering::Relaxed);
    // Pushes still owed (a running completion) hold the outbox open: the writer ends after them,
    // or at its first failed write to a client that is gone.
    drop(conn);
    drop(writer);
}

/// The state of one connection.
struct Conn {
    id: u64,
    tx: mpsc::Sender<Value>,
    /// The subscription patterns and the task that pushes matching bus events.
    monitor: Option<(watch::Sender<Vec<String>>, tokio::task::JoinHandle<()>)>,
    /// Processes this connection started: their results are pushed directly, so the monitor
    /// does not push them a second time.
    own_processes: Arc<Mutex<HashSet<String>>>,
}

enum Line {
    Text,
    TooLong(usize),
    Eof,
}

/// Reads one line into `buf` (without its newline), refusing lines over [`MAX_LINE_BYTES`]
/// without holding them in memory.
async fn read_line<R: AsyncBufRead + Unpin>(r: &mut R, buf: &mut Vec<u8>) -> std::io::Result<Line> {
    buf.clear();
    let mut dropped = 0usize;
    loop {
        let avail = r.fill_buf().await?;
        if avail.is_empty() {
            return Ok(match (buf.is_empty(), dropped) {
                (true, 0) => Line::Eof,
                (_, 0) => Line::Text,
                (_, n) => Line::TooLong(n),
            });
        }
        let (chunk, done) = match avail.iter().position(|&b| b == b'\n') {
            Some(i) => (&avail[..i], Some(i + 1)),
            None => (avail, None),
        };
        if dropped > 0 {
            dropped += chunk.len();
        } else if buf.len() + chunk.len() > MAX_LINE_BYTES {
            dropped = buf.len() + chunk.len();
            buf.clear();
        } else {
            buf.extend_from_slice(chunk);
        }
        let used = done.unwrap_or(avail.len());
        r.consume(used);
        if done.is_some() {
            return Ok(if dropped > 0 {
                Line::TooLong(dropped)
            } else {
                Line::Text
            });
        }
    }
}

fn now_secs() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or_default()
}

fn reply(event: &str, correlation_id: Value, data: Value) -> Value {
    json!({
        "event": event, "data": data, "count": 1,
        "correlation_id": correlation_id, "timestamp": now_secs(),
    })
}

fn error_reply(event: Value, correlation_id: Value, error: String) -> Value {
    json!({
        "event": event, "error": error,
        "correlation_id": correlation_id, "timestamp": now_secs(),
    })
}

/// An event pushed without a request (no correlation id). `event_name` repeats the name for
/// clients of the original's monitor broadcasts, which used that key.
fn push(event: &str, data: Value) -> Value {
    json!({
        "event": event, "event_name": event, "data": data, "count": 1,
        "correlation_id": null, "timestamp": now_secs(),
    })
}

/// Work to start once the reply is on its way (so a pushed result never overtakes it).
type Then = Option<BoxFuture<'static, ()>>;

/// Parses one request line and answers it.
async fn handle(state: &CompatState, conn: &mut Conn, line: &[u8]) -> (Value, Then) {
    let msg: Value = match serde_json::from_slice(line) {
        Ok(v) => v,
        Err(e) => {
            return (
                error_reply(
                    Value::Null,
                    Value::Null,
                    format!(
                        "invalid JSON: {e}. Send one JSON object per line: {{\"event\": \"system:health\", \"data\": {{}}, \"correlation_id\": \"1\"}}"
                    ),
                ),
                None,
            );
        }
    };
    // The first event clients wrapped events in a legacy command.
    let msg = match msg {
        Value::Object(mut o) if o.get("command").and_then(Value::as_str) == Some("EVENT") => {
            o.remove("parameters").unwrap_or(Value::Null)
        }
        other => other,
    };
    let Value::Object(msg) = msg else {
        return (
            error_reply(
                Value::Null,
                Value::Null,
                "a request must be a JSON object: {\"event\": NAME, \"data\": {...}, \"correlation_id\": ID}".into(),
            ),
            None,
        );
    };
    let corr = msg.get("correlation_id").cloned().unwrap_or(Value::Null);
    let Some(event) = msg.get("event").and_then(Value::as_str).map(str::to_string) else {
        return (
            error_reply(
                msg.get("event").cloned().unwrap_or(Value::Null),
                corr,
                "the request has no \"event\" name (a string such as \"system:health\")".into(),
            ),
            None,
        );
    };
    let data = match msg.get("data") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(o)) => o.clone(),
        Some(other) => {
            return (
                error_reply(
                    Value::String(event),
                    corr,
                    format!("\"data\" must be a JSON object, not {other}"),
                ),
                None,
            );
        }
    };
    let client_id = msg.get("_client_id").and_then(Value::as_str);
    let result = match event.as_str() {
        "completion:async" => completion_async(state, conn, &data).await,
        "monitor:subscribe" => monitor_subscribe(state, conn, &data, client_id),
        "monitor:unsubscribe" => Ok((monitor_unsubscribe(conn), None)),
        "agent:spawn" => agent_spawn(state, conn, &data).await,
        "agent:list" => agent_list(state).map(|d| (d, None)),
        "system:health" => Ok((system_health(state, conn), None)),
        "system:discover" => Ok((system_discover(&data), None)),
        "system:help" => system_help(&data).map(|d| (d, None)),
        _ => Err(format!(
            "unknown event {event:?}: this KSI compatibility listener handles {}. Send system:discover for their parameters, or use KSI's HTTP API for the rest",
            EVENTS.iter().map(|e| e.name).collect::<Vec<_>>().join(", ")
        )),
    };
    match result {
        Ok((data, then)) => (reply(&event, corr, data), then),
        Err(e) => (error_reply(Value::String(event), corr, e), None),
    }
}

fn opt_str<'a>(data: &'a Map<String, Value>, key: &str) -> Result<Option<&'a str>, String> {
    match data.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.is_empty() => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(format!("{key:?} must be a string, not {other}")),
    }
}

/// The text of a message's `content` (a string, or a list of `{"type": "text", "text"}` blocks).
fn content_text(content: &Value) -> Option<String> {
    match content {
        Value::String(s) => Some(s.clone()),
        Value::Array(blocks) => {
            let texts: Vec<&str> = blocks
                .iter()
                .filter_map(|b| b.get("text").and_then(Value::as_str))
                .collect();
            (!texts.is_empty()).then(|| texts.join("\n"))
        }
        _ => None,
    }
}

/// The request the executor runs for a `completion:async` (or `agent:spawn` with a prompt).
fn claude_request(data: &Map<String, Value>, agent: Option<&str>) -> Result<ClaudeRequest, String> {
    let prompt = match opt_str(data, "prompt")? {
        Some(p) => p.to_string(),
        None => data
            .get("messages")
            .and_then(Value::as_array)
            .and_then(|m| {
                m.iter()
                    .rev()
                    .find(|m| m.get("role").and_then(Value::as_str) != Some("assistant"))
            })
            .and_then(|m| m.get("content"))
            .and_then(content_text)
            .unwrap_or_default(),
    };
    if prompt.trim().is_empty() {
        return Err(
            "there is nothing to send: give \"prompt\" (a string) or \"messages\" ending with a user message"
                .into(),
        );
    }
    // The original named models by provider ("claude-cli/sonnet"); KSI always uses the CLI.
    let model = opt_str(data, "model")?.map(|m| m.trim_start_matches("claude-cli/").to_string());
    let max_turns = match data.get("max_turns") {
        None | Some(Value::Null) => None,
        Some(v) => Some(
            v.as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(|| format!("\"max_turns\" must be a positive integer, not {v}"))?,
        ),
    };
    Ok(ClaudeRequest {
        prompt,
        model,
        system_prompt: opt_str(data, "system_prompt")?.map(str::to_string),
        agent: agent.map(str::to_string),
        session: opt_str(data, "session_id")?.map(str::to_string),
        max_turns,
    })
}

fn new_request_id() -> String {
    format!("req_{:016x}", rand::random::<u64>())
}

/// `completion:async`: queue the call on the executor, reply `queued` at once, push
/// `completion:result` with the same `request_id` when it ends.
async fn completion_async(
    state: &CompatState,
    conn: &Conn,
    data: &Map<String, Value>,
) -> Result<(Value, Then), String> {
    let agent = opt_str(data, "agent_id")?;
    let request = claude_request(data, agent)?;
    let request_id = opt_str(data, "request_id")?
        .map(str::to_string)
        .unwrap_or_else(new_request_id);
    let (process_id, then) = start_completion(state, conn, request, request_id.clone()).await?;
    Ok((
        json!({
            "request_id": request_id, "status": "queued", "process_id": process_id,
            "message": "Completion request queued for processing",
        }),
        Some(then),
    ))
}

/// Spawns the call and returns its process id and the task that pushes its result.
async fn start_completion(
    state: &CompatState,
    conn: &Conn,
    request: ClaudeRequest,
    request_id: String,
) -> Result<(String, BoxFuture<'static, ()>), String> {
    let session = request.session.clone();
    let process_id = state
        .executor
        .spawn(request)
        .await
        .map_err(|f| format!("KSI refused the call ({}): {}", f.class, f.message))?;
    conn.own_processes
        .lock()
        .expect("own processes")
        .insert(process_id.clone());
    let (exec, refs, tx, pid) = (
        state.executor.clone(),
        state.refs.clone(),
        conn.tx.clone(),
        process_id.clone(),
    );
    let then = Box::pin(async move {
        let outcome = exec.wait(&pid).await;
        let data = completion_result(&refs, &request_id, &pid, session, outcome);
        let _ = tx.send(push("completion:result", data)).await;
    });
    Ok((process_id, then))
}

/// The data of a `completion:result`: the original's `{request_id, result: {ksi, response}}`
/// (the response being the CLI's own result JSON), plus the summary fields its helpers
/// extracted (`response` text, `session_id`, `model`, `cost`, `usage`). A failed call carries
/// `error` instead, as the original's result parser expected.
fn completion_result(
    refs: &Refs,
    request_id: &str,
    process_id: &str,
    session: Option<String>,
    outcome: Result<ClaudeAnswer, ClaudeFailure>,
) -> Value {
    match outcome {
        Ok(a) => {
            let usage = json!({
                "input_tokens": a.tokens_in, "output_tokens": a.tokens_out,
                "cache_read_input_tokens": a.tokens_cache_read,
                "cache_creation_input_tokens": a.tokens_cache_write,
            });
            let raw = a
                .response_ref
                .as_ref()
                .and_then(|r| refs.read(r).ok())
                .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
                .unwrap_or_else(|| {
                    json!({
                        "type": "result", "subtype": "success", "is_error": false,
                        "result": a.text, "session_id": a.session_id,
                        "total_cost_usd": a.cost_usd, "duration_ms": a.duration_ms, "usage": usage,
                    })
                });
            json!({
                "request_id": request_id,
                "status": "completed",
                "result": {
                    "ksi": {
                        "provider": "claude-cli", "request_id": request_id,
                        "process_id": process_id, "duration_ms": a.duration_ms,
                        "timestamp": chrono::Utc::now().to_rfc3339(),
                    },
                    "response": raw,
                },
                "response": a.text,
                "session_id": a.session_id,
                "model": a.model,
                "cost": a.cost_usd,
                "usage": usage,
                "process_id": process_id,
            })
        }
        Err(f) => json!({
            "request_id": request_id,
            "status": "failed",
            "error": f.message,
            "error_class": f.class,
            "transient": f.transient,
            "session_id": session,
            "process_id": process_id,
        }),
    }
}

/// The original's colon name of a KSI bus topic: the executor's `claude.spawn.*` become the
/// `completion:*` events the original emitted; otherwise the first dot becomes a colon
/// (`workflow.step_complete` → `workflow:step_complete`, `agent.created` → `agent:created`).
pub fn compat_name(topic: &str) -> String {
    match topic {
        "claude.spawn.request" => "completion:async".into(),
        "claude.spawn.started" => "completion:progress".into(),
        "claude.spawn.complete" => "completion:result".into(),
        "claude.spawn.failed" => "completion:error".into(),
        "agent.created" => "agent:spawned".into(),
        _ => match topic.split_once('.') {
            Some(("agent", rest)) if rest.ends_with(".message") => "agent:message".into(),
            Some((ns, rest)) => format!("{ns}:{rest}"),
            None => topic.to_string(),
        },
    }
}

/// Shell-style matching as Python's `fnmatch` does it: `*` any run, `?` one character,
/// `[abc]`, `[a-z]` and `[!abc]` sets; everything else literal.
pub fn fnmatch(pattern: &str, name: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let n: Vec<char> = name.chars().collect();
    // Iterative wildcard matching with backtracking to the last `*`.
    let (mut pi, mut ni) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        let step = if pi < p.len() {
            match p[pi] {
                '*' => {
                    star = Some((pi, ni));
                    pi += 1;
                    continue;
                }
                '?' => Some(pi + 1),
                '[' => match class_match(&p[pi..], n[ni]) {
                    Some((true, len)) => Some(pi + len),
                    Some((false, _)) => None,
                    None => (n[ni] == '[').then_some(pi + 1),
                },
                c => (c == n[ni]).then_some(pi + 1),
            }
        } else {
            None
        };
        match (step, star) {
            (Some(next), _) => {
                pi = next;
                ni += 1;
            }
            (None, Some((sp, sn))) => {
                pi = sp + 1;
                ni = sn + 1;
                star = Some((sp, sn + 1));
            }
            (None, None) => return false,
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

/// Matches `c` against the set starting at `p[0] == '['`: `Some((matched, length of the set))`,
/// or `None` when the set is not closed (then `[` is literal).
fn class_match(p: &[char], c: char) -> Option<(bool, usize)> {
    let mut i = 1;
    let negate = p.get(i) == Some(&'!');
    if negate {
        i += 1;
    }
    let start = i;
    let mut hit = false;
    while i < p.len() {
        if p[i] == ']' && i > start {
            return Some((hit != negate, i + 1));
        }
        if i + 2 < p.len() && p[i + 1] == '-' && p[i + 2] != ']' {
            hit |= p[i] <= c && c <= p[i + 2];
            i += 3;
        } else {
            hit |= p[i] == c;
            i += 1;
        }
    }
    None
}

fn patterns_of(data: &Map<String, Value>) -> Result<Vec<String>, String> {
    let list = match data.get("event_patterns").or_else(|| data.get("patterns")) {
        None | Some(Value::Null) => return Ok(vec!["*".into()]),
        Some(Value::String(s)) => vec![Value::String(s.clone())],
        Some(Value::Array(a)) => a.clone(),
        Some(other) => {
            return Err(format!(
                "\"event_patterns\" must be a list of fnmatch patterns such as [\"completion:*\"], not {other}"
            ));
        }
    };
    let mut out = Vec::with_capacity(list.len());
    for p in list {
        match p {
            Value::String(s) if !s.is_empty() && s.len() <= 256 => out.push(s),
            other => {
                return Err(format!(
                    "event pattern {other} is not a non-empty string of at most 256 characters"
                ));
            }
        }
    }
    if out.is_empty() {
        out.push("*".into());
    }
    Ok(out)
}

/// `monitor:subscribe`: push every bus event committed from now on whose original-style name
/// (or KSI topic) matches one of the patterns. A new subscription replaces the previous one.
fn monitor_subscribe(
    state: &CompatState,
    conn: &mut Conn,
    data: &Map<String, Value>,
    client_id: Option<&str>,
) -> Result<(Value, Then), String> {
    let patterns = patterns_of(data)?;
    let client_id = opt_str(data, "client_id")?
        .or(client_id)
        .map(str::to_string)
        .unwrap_or_else(|| format!("compat-{}", conn.id));
    match &conn.monitor {
        Some((tx, _)) => {
            let _ = tx.send(patterns.clone());
        }
        None => {
            let (ptx, prx) = watch::channel(patterns.clone());
            // Everything committed after this point is pushed: the reply cannot miss an event.
            let start = state.store.published_id();
            let task = tokio::spawn(monitor(
                state.clone(),
                prx,
                conn.tx.clone(),
                conn.own_processes.clone(),
                start,
            ));
            conn.monitor = Some((ptx, task));
        }
    }
    Ok((
        json!({ "status": "subscribed", "client_id": client_id, "patterns": patterns }),
        None,
    ))
}

fn monitor_unsubscribe(conn: &mut Conn) -> Value {
    let was = conn.monitor.take().map(|(_, task)| task.abort()).is_some();
    json!({ "status": if was { "unsubscribed" } else { "not_subscribed" } })
}

/// Waits until events after `last` exist and returns them in order (woken by in-process
/// commits; the timer covers writes by other processes, as the HTTP stream does).
async fn next_events(state: &CompatState, last: i64) -> Vec<Event> {
    let mut published = state.store.published();
    loop {
        published.borrow_and_update();
        if let Ok(evs) = state.bus.events_after(last, None, 500)
            && !evs.is_empty()
        {
            return evs;
        }
        tokio::select! {
            _ = published.changed() => {}
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

async fn monitor(
    state: CompatState,
    patterns: watch::Receiver<Vec<String>>,
    tx: mpsc::Sender<Value>,
    own: Arc<Mutex<HashSet<String>>>,
    mut last: i64,
) {
    loop {
        for e in next_events(&state, last).await {
            last = e.id;
            let name = compat_name(&e.topic);
            let wanted = patterns
                .borrow()
                .iter()
                .any(|p| p == "*" || fnmatch(p, &name) || fnmatch(p, &e.topic));
            if !wanted {
                continue;
            }
            if matches!(
                e.topic.as_str(),
                "claude.spawn.complete" | "claude.spawn.failed"
            ) && let Some(pid) = e.data.get("process_id").and_then(Value::as_str)
                && own.lock().expect("own processes").contains(pid)
            {
                // This connection gets the call's completion:result pushed directly.
                continue;
            }
            let mut msg = push(&name, e.data.clone());
            msg["_event_id"] = json!(e.id);
            msg["_topic"] = json!(e.topic);
            msg["_correlation_id"] = json!(e.correlation_id);
            if tx.send(msg).await.is_err() {
                return;
            }
        }
    }
}

/// `agent:spawn`: create the agent (row, sandbox, inbox); with a `prompt`, also start its first
/// turn and push its `completion:result` like `completion:async`.
async fn agent_spawn(
    state: &CompatState,
    conn: &Conn,
    data: &Map<String, Value>,
) -> Result<(Value, Then), String> {
    let id = opt_str(data, "agent_id")?
        .map(str::to_string)
        .unwrap_or_else(|| format!("agent_{:08x}", rand::random::<u32>()));
    let existed = {
        let id = id.clone();
        state
            .store
            .read_async(move |c| agents::get(c, &id).map_err(crate::bus::BusError::from))
            .await
            .map_err(|e| e.to_string())?
            .is_some()
    };
    let (row, _) = agents::ensure(&state.store, &state.bus, &state.data_dir, &id).await?;
    let mut out = json!({
        "agent_id": row.id, "status": if existed { "exists" } else { "created" },
        "profile": row.profile, "workdir": row.workdir,
        "session_id": row.current_session_id,
    });
    if let Some(asked) = opt_str(data, "profile")?.or(opt_str(data, "component")?)
        && asked != row.profile
    {
        out["note"] = json!(format!(
            "KSI reads the profile agents/profiles/{id}.toml; the requested profile {asked:?} was not applied"
        ));
    }
    let mut then = None;
    if opt_str(data, "prompt")?.is_some() {
        let request = claude_request(data, Some(&id))?;
        let request_id = new_request_id();
        let (pid, t) = start_completion(state, conn, request, request_id.clone()).await?;
        out["request_id"] = json!(request_id);
        out["process_id"] = json!(pid);
        then = Some(t);
    }
    Ok((out, then))
}

fn ms_to_rfc3339(ms: i64) -> Option<String> {
    chrono::DateTime::from_timestamp_millis(ms).map(|t| t.to_rfc3339())
}

/// `agent:list`: the agents table in the original's field names.
fn agent_list(state: &CompatState) -> Result<Value, String> {
    let rows = agents::list(&state.store).map_err(|e| e.to_string())?;
    let list: Vec<Value> = rows
        .iter()
        .map(|a| {
            json!({
                "agent_id": a.id, "profile": a.profile, "status": a.status,
                "session_id": a.current_session_id, "workdir": a.workdir,
                "capabilities": a.capabilities, "metrics": a.metrics,
                "created_at": ms_to_rfc3339(a.created_at),
                "last_active_at": a.last_active_at.and_then(ms_to_rfc3339),
            })
        })
        .collect();
    Ok(json!({ "agents": list, "count": rows.len() }))
}

/// `system:health`: the database answers, uptime, what runs.
fn system_health(state: &CompatState, conn: &Conn) -> Value {
    let db = state.store.read(|c| {
        c.query_row("SELECT 1", [], |r| r.get::<_, i64>(0))
            .map_err(crate::bus::BusError::from)
    });
    json!({
        "status": if db.is_ok() { "healthy" } else { "unhealthy" },
        "uptime": state.started.elapsed().as_secs_f64(),
        "version": env!("CARGO_PKG_VERSION"),
        "daemon": "ksi-host",
        "database": match db { Ok(_) => json!({ "ok": true }), Err(e) => json!({ "ok": false, "error": e.to_string() }) },
        "claude_running": state.executor.running(),
        "connections": state.connections.load(Ordering::Relaxed),
        "subscribed": conn.monitor.is_some(),
        "events_registered": EVENTS.len(),
    })
}

/// One event this listener handles, for `system:discover` and `system:help`.
struct EventSpec {
    name: &'static str,
    summary: &'static str,
    /// (name, type, required, description)
    params: &'static [(&'static str, &'static str, bool, &'static str)],
}

const EVENTS: &[EventSpec] = &[
    EventSpec {
        name: "completion:async",
        summary: "Queue a Claude call; replies {request_id, status: queued}, then pushes completion:result with the same request_id.",
        params: &[
            ("prompt", "str", false, "The prompt (or give messages)"),
            (
                "messages",
                "list",
                false,
                "Chat messages; the last non-assistant message is sent",
            ),
            (
                "model",
                "str",
                false,
                "Model, e.g. sonnet or claude-cli/sonnet",
            ),
            ("session_id", "str", false, "Session to resume"),
            (
                "agent_id",
                "str",
                false,
                "Agent whose session continues (created if new)",
            ),
            (
                "request_id",
                "str",
                false,
                "Your id for the request (generated if absent)",
            ),
            ("system_prompt", "str", false, "System prompt"),
            ("max_turns", "int", false, "Turn limit for the call"),
        ],
    },
    EventSpec {
        name: "monitor:subscribe",
        summary: "Push bus events as they commit whose name matches a pattern (fnmatch, e.g. completion:*); replaces the previous subscription.",
        params: &[
            (
                "event_patterns",
                "list",
                false,
                "fnmatch patterns over event names (default [\"*\"])",
            ),
            ("client_id", "str", false, "Your client id (echoed back)"),
        ],
    },
    EventSpec {
        name: "monitor:unsubscribe",
        summary: "Stop the pushes of monitor:subscribe on this connection.",
        params: &[],
    },
    EventSpec {
        name: "agent:spawn",
        summary: "Create an agent (sandbox, inbox, session continuity); with a prompt, also start its first turn.",
        params: &[
            (
                "agent_id",
                "str",
                false,
                "Agent id: letters, digits, - and _ (generated if absent)",
            ),
            (
                "prompt",
                "str",
                false,
                "First message; its completion:result is pushed",
            ),
            ("model", "str", false, "Model for that first message"),
            (
                "profile",
                "str",
                false,
                "Accepted; KSI reads agents/profiles/<agent_id>.toml",
            ),
        ],
    },
    EventSpec {
        name: "agent:list",
        summary: "List agents with status, current session and totals.",
        params: &[],
    },
    EventSpec {
        name: "system:health",
        summary: "Daemon health: database, uptime, running Claude calls, connections.",
        params: &[],
    },
    EventSpec {
        name: "system:discover",
        summary: "List the events this listener handles, with their parameters.",
        params: &[
            (
                "namespace",
                "str",
                false,
                "Only events of this namespace (e.g. completion)",
            ),
            ("event", "str", false, "Only this event"),
        ],
    },
    EventSpec {
        name: "system:help",
        summary: "Parameters and an example of one event.",
        params: &[("event", "str", true, "The event name")],
    },
];

fn event_info(e: &EventSpec) -> Value {
    let params: Map<String, Value> = e
        .params
        .iter()
        .map(|(n, t, req, d)| {
            (
                n.to_string(),
                json!({ "type": t, "required": req, "description": d }),
            )
        })
        .collect();
    json!({
        "module": "ksi_host::api::compat",
        "summary": e.summary,
        "parameters": params,
    })
}

fn system_discover(data: &Map<String, Value>) -> Value {
    let ns = data.get("namespace").and_then(Value::as_str);
    let only = data.get("event").and_then(Value::as_str);
    let mut events = Map::new();
    let mut namespaces = Vec::new();
    for e in EVENTS {
        let (space, _) = e.name.split_once(':').unwrap_or((e.name, ""));
        if ns.is_some_and(|n| n != space) || only.is_some_and(|o| o != e.name) {
            continue;
        }
        if !namespaces.contains(&space) {
            namespaces.push(space);
        }
        events.insert(e.name.to_string(), event_info(e));
    }
    json!({ "total": events.len(), "namespaces": namespaces, "events": events })
}

fn system_help(data: &Map<String, Value>) -> Result<Value, String> {
    let name = opt_str(data, "event")?
        .ok_or("system:help needs \"event\": the event to describe (system:discover lists them)")?;
    let e = EVENTS
        .iter()
        .find(|e| e.name == name)
        .ok_or_else(|| format!("no event {name:?} here; system:discover lists the events"))?;
    let mut info = event_info(e);
    let example: Map<String, Value> = e
        .params
        .iter()
        .filter(|p| p.2 || p.0 == "prompt")
        .map(|p| (p.0.to_string(), json!(format!("<{}>", p.1))))
        .collect();
    info["usage"] = json!({ "event": e.name, "data": example, "correlation_id": "1" });
    Ok(info)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnmatch_behaves_like_pythons() {
        assert!(fnmatch("completion:*", "completion:result"));
        assert!(fnmatch("*", "anything:at.all"));
        assert!(fnmatch("agent:?pawned", "agent:spawned"));
        assert!(fnmatch("[ac]gent:*", "agent:list"));
        assert!(!fnmatch("[!a]gent:*", "agent:list"));
        assert!(fnmatch("w[a-z]rkflow:*", "workflow:complete"));
        assert!(fnmatch("*:result", "completion:result"));
        assert!(fnmatch("c*n:r*t", "completion:result"));
        assert!(!fnmatch("completion:*", "agent:spawned"));
        assert!(!fnmatch("completion:result", "completion:results"));
        assert!(fnmatch("a[b", "a[b"), "an unclosed set is literal");
        assert!(fnmatch("", ""));
        assert!(!fnmatch("", "x"));
    }

    #[test]
    fn the_socket_path_comes_from_flag_then_setting_then_data_dir() {
        let mut c = Config {
            data_dir: PathBuf::from("/d"),
            ..Config::default()
        };
        assert_eq!(
            socket_path(&c, None, false),
            Some(PathBuf::from("/d/ksi-compat.sock"))
        );
        c.compat_socket = Some(PathBuf::from("run/old.sock"));
        assert_eq!(
            socket_path(&c, None, false),
            Some(PathBuf::from("/d/run/old.sock"))
        );
        let flag = Path::new("/tmp/x.sock");
        assert_eq!(socket_path(&c, Some(flag), false), Some(flag.to_path_buf()));
        assert_eq!(socket_path(&c, None, true), None);
        c.compat = false;
        assert_eq!(socket_path(&c, None, false), None);
        assert_eq!(socket_path(&c, Some(flag), false), Some(flag.to_path_buf()));
    }

    #[test]
    fn bus_topics_get_the_originals_event_names() {
        assert_eq!(compat_name("claude.spawn.complete"), "completion:result");
        assert_eq!(compat_name("claude.spawn.failed"), "completion:error");
        assert_eq!(compat_name("claude.spawn.request"), "completion:async");
        assert_eq!(compat_name("agent.created"), "agent:spawned");
        assert_eq!(compat_name("agent.alice.message"), "agent:message");
        assert_eq!(
            compat_name("workflow.step_complete"),
            "workflow:step_complete"
        );
        assert_eq!(
            compat_name("workflow.debate.step.opening"),
            "workflow:debate.step.opening"
        );
        assert_eq!(compat_name("plain"), "plain");
    }

    #[tokio::test]
    async fn overlong_lines_are_refused_and_the_next_line_still_reads() {
        let mut input = vec![b'x'; MAX_LINE_BYTES + 10];
        input.extend_from_slice(b"\n{\"event\":\"system:health\"}\n");
        let mut r = BufReader::with_capacity(4096, &input[..]);
        let mut buf = Vec::new();
        assert!(matches!(
            read_line(&mut r, &mut buf).await.unwrap(),
            Line::TooLong(n) if n == MAX_LINE_BYTES + 10
        ));
        assert!(matches!(
            read_line(&mut r, &mut buf).await.unwrap(),
            Line::Text
        ));
        assert_eq!(buf, b"{\"event\":\"system:health\"}");
        assert!(matches!(
            read_line(&mut r, &mut buf).await.unwrap(),
            Line::Eof
        ));
    }

    #[test]
    fn a_completion_needs_something_to_send() {
        let data = |v: Value| v.as_object().unwrap().clone();
        let e = claude_request(&data(json!({"model": "sonnet"})), None).unwrap_err();
        assert!(e.contains("\"prompt\""), "{e}");
        let r = claude_request(
            &data(json!({
                "model": "claude-cli/sonnet",
                "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
            })),
            None,
        )
        .unwrap();
        assert_eq!(r.prompt, "hi");
        assert_eq!(r.model.as_deref(), Some("sonnet"));
        let e =
            claude_request(&data(json!({"prompt": "x", "max_turns": "two"})), None).unwrap_err();
        assert!(e.contains("max_turns"), "{e}");
    }
}
