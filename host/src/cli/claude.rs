//! `ksi spawn | ps | agents | agent send | cost | sessions`: the Claude executor's command-line
//! face. Each command is a function returning data (usable by the HTTP API too) plus a renderer;
//! [`run`] glues them for the binaries. The hidden `ksi-host dev spawn-many` and `dev reconcile`
//! serve the daemon-kill test.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};

use anyhow::Context;
use clap::{Args, Subcommand};
use rusqlite::params;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{Opened, clock, ellipsize, table};
use crate::bus::BusError;
use crate::claude::agents::AgentRow;
use crate::claude::executor::{self, Executor, ExecutorConfig, ProcessRow, ReconcileReport};
use crate::claude::responses;
use crate::refs::Refs;
use crate::store::Store;
use crate::workflow::{ClaudeAnswer, ClaudeFailure, ClaudeRequest};

/// The Claude commands, to flatten into a binary's subcommands.
#[derive(Debug, Subcommand)]
pub enum ClaudeCmd {
    /// Run one Claude call and print the answer, its cost and session
    Spawn {
        /// The prompt
        prompt: String,
        /// Model (default: the agent's, else claude.model, else sonnet)
        #[arg(long)]
        model: Option<String>,
        /// Agent whose conversation continues (--resume)
        #[arg(long)]
        agent: Option<String>,
        /// Machine-readable output
        #[arg(long)]
        json: bool,
    },
    /// Claude processes: id, status, model, agent, cost, duration
    Ps {
        /// Only this status (PENDING, RUNNING, COMPLETED, FAILED, RETRY, DEAD, ...)
        #[arg(long)]
        status: Option<String>,
        /// At most this many rows, newest first
        #[arg(long, default_value_t = 50)]
        limit: usize,
        #[arg(long)]
        json: bool,
    },
    /// Agents: status, session, sandbox, totals
    Agents {
        #[arg(long)]
        json: bool,
    },
    /// Talk to one agent
    #[command(subcommand)]
    Agent(AgentCmd),
    /// Spend by model, agent and day
    Cost {
        #[arg(long)]
        json: bool,
    },
    /// Conversations (sessions) with agent, turns and cost; `sessions show ID` for a transcript
    Sessions {
        #[command(subcommand)]
        cmd: Option<SessionsCmd>,
        #[arg(long)]
        json: bool,
    },
}

/// `agent ...`
#[derive(Debug, Subcommand)]
pub enum AgentCmd {
    /// Put a message in an agent's inbox (publishes agent.<id>.message); its next turn reads it
    Send {
        /// The agent
        agent: String,
        /// The message
        text: String,
        #[arg(long)]
        json: bool,
    },
}

/// `sessions ...`
#[derive(Debug, Subcommand)]
pub enum SessionsCmd {
    /// A readable transcript of one session (from claude_logs/<id>.jsonl)
    Show {
        /// Session id
        id: String,
        #[arg(long)]
        json: bool,
    },
}

/// The executor for commands run against an opened data dir (binary from `KSI_CLAUDE_BIN`).
pub fn executor(o: &Opened, config: ExecutorConfig) -> Executor {
    Executor::new(o.store.clone(), o.bus.clone(), o.refs.clone(), config)
}

/// What `spawn` reports.
#[derive(Debug, Clone, Serialize)]
pub struct SpawnReport {
    /// The process id.
    pub process_id: String,
    /// The answer, when the call succeeded.
    pub answer: Option<ClaudeAnswer>,
    /// The failure, when it did not.
    pub failure: Option<ClaudeFailure>,
}

/// Runs one call to its end.
pub async fn spawn(exec: &Executor, request: ClaudeRequest) -> SpawnReport {
    match exec.spawn(request).await {
        Ok(id) => {
            let out = exec.wait(&id).await;
            SpawnReport {
                process_id: id,
                answer: out.clone().ok(),
                failure: out.err(),
            }
        }
        Err(f) => SpawnReport {
            process_id: String::new(),
            answer: None,
            failure: Some(f),
        },
    }
}

/// Renders a [`SpawnReport`] for people.
pub fn render_spawn(r: &SpawnReport) -> String {
    match (&r.answer, &r.failure) {
        (Some(a), _) => format!(
            "{}\n\n— process {} · session {} · {} · ${:.6} · {} in / {} out tokens · {} ms",
            a.text,
            a.process_id,
            a.session_id,
            a.model,
            a.cost_usd,
            a.tokens_in,
            a.tokens_out,
            a.duration_ms
        ),
        (None, Some(f)) => format!(
            "the Claude call {} failed ({}{}): {}",
            r.process_id,
            f.class,
            if f.transient { ", transient" } else { "" },
            f.message
        ),
        (None, None) => "no outcome".into(),
    }
}

/// Renders processes as a table.
pub fn render_ps(rows: &[ProcessRow]) -> String {
    let mut t = table(&[
        "id", "status", "model", "agent", "tries", "cost $", "duration", "class",
    ]);
    for r in rows {
        let dur = match (r.started_at, r.completed_at) {
            (Some(s), Some(e)) => format!("{:.1}s", (e - s) as f64 / 1000.0),
            _ => "-".into(),
        };
        let model = match (&r.resolved_model, &r.model) {
            (Some(resolved), Some(asked)) if resolved != asked => format!("{resolved} ({asked})"),
            (Some(m), _) | (None, Some(m)) => m.clone(),
            (None, None) => String::new(),
        };
        t.add_row(vec![
            r.id.clone(),
            process_status(r),
            model,
            r.agent_id.clone().unwrap_or_default(),
            format!("{}/{}", r.attempts, r.max_attempts),
            r.cost_usd
                .map(|c| {
                    if r.simulated {
                        format!("{c:.4} simulated")
                    } else {
                        format!("{c:.4}")
                    }
                })
                .unwrap_or_default(),
            dur,
            r.error_class.clone().unwrap_or_default(),
        ]);
    }
    t.to_string()
}

/// A row's status as a person reads it: a call parked by a subscription limit says until when
/// ("waiting for quota until 14:00 UTC").
pub fn process_status(r: &ProcessRow) -> String {
    match r.quota_until {
        Some(until) if r.status == "RETRY" => {
            format!("waiting for quota until {}", hour_minute_utc(until))
        }
        _ => r.status.clone(),
    }
}

/// `14:00 UTC` (with the date when it is not today) for an epoch-ms time.
pub fn hour_minute_utc(ms: i64) -> String {
    let Some(t) = chrono::DateTime::from_timestamp_millis(ms) else {
        return ms.to_string();
    };
    if t.date_naive() == chrono::Utc::now().date_naive() {
        t.format("%H:%M UTC").to_string()
    } else {
        t.format("%Y-%m-%d %H:%M UTC").to_string()
    }
}

/// Renders agents as a table.
pub fn render_agents(rows: &[AgentRow]) -> String {
    let mut t = table(&["agent", "status", "session", "workdir", "calls", "cost $"]);
    for a in rows {
        t.add_row(vec![
            a.id.clone(),
            a.status.clone(),
            a.current_session_id.clone().unwrap_or_default(),
            a.workdir.clone().unwrap_or_default(),
            a.metrics
                .get("calls")
                .map(|v| v.to_string())
                .unwrap_or_default(),
            a.metrics
                .get("cost_usd")
                .and_then(Value::as_f64)
                .map(|c| format!("{c:.4}"))
                .unwrap_or_default(),
        ]);
    }
    t.to_string()
}

/// Spend totals of one group.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CostLine {
    /// Model that answered, agent or day (`YYYY-MM-DD`, UTC).
    pub key: String,
    /// Paid calls: calls that got a result from the CLI (with its cost), whatever became of
    /// them afterwards. Each is counted once.
    pub calls: i64,
    /// CLI invocations (attempts), paid or not.
    pub attempts: i64,
    /// Calls cut off by a stop of the daemon before they had a result (their work was asked
    /// for again under a new id): not paid calls, shown apart.
    #[serde(default)]
    pub cut_off: i64,
    /// Real money, USD (simulated cost excluded).
    pub cost_usd: f64,
    /// Input tokens (simulated calls excluded).
    pub tokens_in: i64,
    /// Output tokens (simulated calls excluded).
    pub tokens_out: i64,
    /// Calls answered by a simulator (`fake-claude`), apart from the paid ones.
    #[serde(default)]
    pub simulated_calls: i64,
    /// What the simulator reported as cost: no money was spent.
    #[serde(default)]
    pub simulated_usd: f64,
}

/// What `cost` reports.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CostReport {
    /// Everything.
    pub total: CostLine,
    /// By model.
    pub by_model: Vec<CostLine>,
    /// By agent (`-` for calls without one).
    pub by_agent: Vec<CostLine>,
    /// By UTC day.
    pub by_day: Vec<CostLine>,
}

/// Spend totals from the `processes` table.
///
/// # Errors
/// A database error.
pub fn cost(store: &Store) -> Result<CostReport, BusError> {
    store.read(|c| {
        let group = |expr: &str| -> rusqlite::Result<Vec<CostLine>> {
            // A paid call is one with a counted result (`counted_attempt`); a row that a
            // restart cut off before any result is not one.
            let mut st = c.prepare(&format!(
                "SELECT {expr} AS k,
                        COALESCE(SUM(CASE WHEN counted_attempt > 0 AND simulated = 0 THEN 1 ELSE 0 END), 0),
                        COALESCE(SUM(attempts), 0),
                        COALESCE(SUM(CASE WHEN counted_attempt = 0 AND status = 'DEAD'
                                          AND error_class = 'transient.crash' THEN 1 ELSE 0 END), 0),
                        COALESCE(SUM(CASE WHEN simulated = 0 THEN cost_usd END), 0),
                        COALESCE(SUM(CASE WHEN simulated = 0 THEN tokens_in END), 0),
                        COALESCE(SUM(CASE WHEN simulated = 0 THEN tokens_out END), 0),
                        COALESCE(SUM(CASE WHEN counted_attempt > 0 AND simulated = 1 THEN 1 ELSE 0 END), 0),
                        COALESCE(SUM(CASE WHEN simulated = 1 THEN cost_usd END), 0)
                 FROM processes GROUP BY k ORDER BY k"
            ))?;
            let rows = st.query_map([], |r| {
                Ok(CostLine {
                    key: r.get::<_, Option<String>>(0)?.unwrap_or_else(|| "-".into()),
                    calls: r.get(1)?,
                    attempts: r.get(2)?,
                    cut_off: r.get(3)?,
                    cost_usd: r.get(4)?,
                    tokens_in: r.get(5)?,
                    tokens_out: r.get(6)?,
                    simulated_calls: r.get(7)?,
                    simulated_usd: r.get(8)?,
                })
            })?;
            rows.collect()
        };
        let total = group("'total'")?.pop().unwrap_or_else(|| CostLine {
            key: "total".into(),
            ..CostLine::default()
        });
        Ok(CostReport {
            total,
            by_model: group("COALESCE(resolved_model, model)")?,
            by_agent: group("agent_id")?,
            by_day: group("strftime('%Y-%m-%d', created_at / 1000, 'unixepoch')")?,
        })
    })
}

/// Renders a [`CostReport`].
pub fn render_cost(r: &CostReport) -> String {
    let mut out = String::new();
    for (title, lines) in [
        ("model", &r.by_model),
        ("agent", &r.by_agent),
        ("day", &r.by_day),
        ("", &vec![r.total.clone()]),
    ] {
        let mut t = table(&[
            if title.is_empty() { "total" } else { title },
            "paid calls",
            "attempts",
            "cut off",
            "cost $",
            "tokens in",
            "tokens out",
            "simulated",
        ]);
        for l in lines.iter() {
            t.add_row(vec![
                l.key.clone(),
                l.calls.to_string(),
                l.attempts.to_string(),
                l.cut_off.to_string(),
                format!("{:.4}", l.cost_usd),
                l.tokens_in.to_string(),
                l.tokens_out.to_string(),
                if l.simulated_calls > 0 {
                    format!(
                        "{} calls, ${:.4} (no money)",
                        l.simulated_calls, l.simulated_usd
                    )
                } else {
                    "-".into()
                },
            ]);
        }
        out.push_str(&format!("{t}\n"));
    }
    out
}

/// One conversation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionSummary {
    /// Session id (and log file name).
    pub session_id: String,
    /// Agent, if the session belongs to one.
    pub agent_id: Option<String>,
    /// Completed calls in it.
    pub turns: i64,
    /// USD.
    pub cost_usd: f64,
    /// First call (epoch ms).
    pub first_at: i64,
    /// Last call (epoch ms).
    pub last_at: i64,
}

/// Conversations, newest first.
///
/// # Errors
/// A database error.
pub fn sessions(store: &Store) -> Result<Vec<SessionSummary>, BusError> {
    store.read(|c| {
        let mut st = c.prepare(
            "SELECT session_id, MAX(agent_id), COUNT(*), COALESCE(SUM(cost_usd), 0), MIN(created_at), MAX(created_at)
             FROM processes WHERE session_id IS NOT NULL AND (status = 'COMPLETED' OR counted_attempt > 0)
             GROUP BY session_id ORDER BY MAX(created_at) DESC",
        )?;
        let rows = st.query_map([], |r| {
            Ok(SessionSummary {
                session_id: r.get(0)?,
                agent_id: r.get(1)?,
                turns: r.get(2)?,
                cost_usd: r.get(3)?,
                first_at: r.get(4)?,
                last_at: r.get(5)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    })
}

/// One entry of a transcript.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TranscriptEntry {
    /// `prompt`, `assistant`, `tool`, `result`, `error`.
    pub kind: String,
    /// The text.
    pub text: String,
    /// The process (request) it belongs to.
    pub process_id: Option<String>,
}

/// Reads `claude_logs/<id>.jsonl` into a transcript: for each call, the prompt (from the
/// archived prompt file the envelope names), the assistant's messages and tool calls, the result.
///
/// # Errors
/// An invalid session id or an unreadable log.
pub fn session_transcript(refs: &Refs, id: &str) -> anyhow::Result<Vec<TranscriptEntry>> {
    anyhow::ensure!(
        responses::safe_session_id(id),
        "{id:?} is not a session id (`ksi sessions` lists them)"
    );
    let rel = responses::session_path(id);
    let path = refs.resolve(&rel)?;
    let f = std::fs::File::open(&path)
        .with_context(|| format!("no log for session {id} ({rel}); `ksi sessions` lists them"))?;
    let mut out = Vec::new();
    let mut turn: Vec<TranscriptEntry> = Vec::new();
    let mut last_msg_id: Option<String> = None;
    for line in BufReader::new(f).lines() {
        let line = line?;
        let Ok(v) = serde_json::from_str::<Value>(&line) else {
            continue;
        };
        match v.get("type").and_then(Value::as_str) {
            Some("ksi_envelope") => {
                let pid = v
                    .get("process_id")
                    .and_then(Value::as_str)
                    .map(str::to_string);
                let prompt = v
                    .get("prompt_file")
                    .and_then(Value::as_str)
                    .and_then(|p| refs.resolve(p).ok())
                    .and_then(|p| std::fs::read_to_string(p).ok());
                if let Some(p) = prompt {
                    out.push(TranscriptEntry {
                        kind: "prompt".into(),
                        text: p,
                        process_id: pid.clone(),
                    });
                }
                for mut e in turn.drain(..) {
                    e.process_id = pid.clone();
                    out.push(e);
                }
                if let Some(err) = v.get("error").and_then(Value::as_str) {
                    out.push(TranscriptEntry {
                        kind: "error".into(),
                        text: err.to_string(),
                        process_id: pid,
                    });
                }
            }
            Some("assistant") => {
                // One message may come as several lines (one per content block, same id).
                let msg_id = v
                    .pointer("/message/id")
                    .and_then(Value::as_str)
                    .map(str::to_string);
                let continues = msg_id.is_some() && msg_id == last_msg_id;
                last_msg_id = msg_id;
                for block in v
                    .pointer("/message/content")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    match block.get("type").and_then(Value::as_str) {
                        Some("text") => {
                            let text = block
                                .get("text")
                                .and_then(Value::as_str)
                                .unwrap_or_default();
                            match turn.last_mut() {
                                Some(last) if continues && last.kind == "assistant" => {
                                    last.text.push_str(text)
                                }
                                _ => turn.push(TranscriptEntry {
                                    kind: "assistant".into(),
                                    text: text.to_string(),
                                    process_id: None,
                                }),
                            }
                        }
                        Some("tool_use") => turn.push(TranscriptEntry {
                            kind: "tool".into(),
                            text: format!(
                                "{} {}",
                                block.get("name").and_then(Value::as_str).unwrap_or("?"),
                                block.get("input").cloned().unwrap_or(Value::Null)
                            ),
                            process_id: None,
                        }),
                        _ => {}
                    }
                }
            }
            Some("result") => turn.push(TranscriptEntry {
                kind: "result".into(),
                text: format!(
                    "{} turns, ${}, {} ms{}",
                    v.get("num_turns").cloned().unwrap_or(Value::Null),
                    v.get("total_cost_usd").cloned().unwrap_or(Value::Null),
                    v.get("duration_ms").cloned().unwrap_or(Value::Null),
                    if v.get("is_error").and_then(Value::as_bool) == Some(true) {
                        " (error)"
                    } else {
                        ""
                    }
                ),
                process_id: None,
            }),
            _ => {}
        }
    }
    out.extend(turn);
    Ok(out)
}

/// Renders a transcript.
pub fn render_transcript(entries: &[TranscriptEntry]) -> String {
    let mut s = String::new();
    for e in entries {
        let who = match e.kind.as_str() {
            "prompt" => "▶ user",
            "assistant" => "◀ claude",
            "tool" => "  tool",
            "result" => "  ·",
            _ => "  !",
        };
        s.push_str(&format!("{who}: {}\n", e.text.trim_end()));
        if e.kind == "result" {
            s.push('\n');
        }
    }
    s
}

fn print_json(v: &impl Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// Whether stderr is a terminal (live progress goes there only then).
pub fn stderr_is_terminal() -> bool {
    use std::io::IsTerminal;
    std::io::stderr().is_terminal()
}

/// The progress line for one `claude.spawn.*` event of a call, `t` seconds after it started.
pub fn spawn_progress_line(t: f64, topic: &str, d: &Value) -> Option<String> {
    let line = match topic {
        "claude.spawn.request" => format!(
            "queued {} (model {})",
            d["process_id"].as_str().unwrap_or("?"),
            d["model"].as_str().unwrap_or("default")
        ),
        "claude.spawn.started" => format!("running: attempt {} (pid {})", d["attempt"], d["pid"]),
        "claude.spawn.failed" => format!(
            "attempt {} failed ({}): {}{}",
            d["attempt"],
            d["class"].as_str().unwrap_or("?"),
            ellipsize(d["error"].as_str().unwrap_or(""), 80),
            if d["status"] == "RETRY" {
                " — retrying"
            } else {
                ""
            }
        ),
        "claude.spawn.complete" => format!(
            "done: ${:.4}, {} tokens in / {} out",
            d["cost_usd"].as_f64().unwrap_or(0.0),
            d["tokens_in"],
            d["tokens_out"]
        ),
        _ => return None,
    };
    Some(format!("[{t:>6.1}s] {line}"))
}

/// `ksi spawn`: starts the call, shows its progress on stderr when that is a terminal (from
/// the live `claude.spawn.*` events), and returns `{process_id, answer}` or
/// `{process_id, error}`.
///
/// # Errors
/// The daemon refused the call (budget, rate, bad input) or cannot be reached.
pub async fn spawn_via(
    client: &super::client::DaemonClient,
    request: serde_json::Value,
    progress: bool,
) -> anyhow::Result<Value> {
    // Subscribe before starting the call (the stream begins at the newest event): nothing is missed.
    let mut events = if progress {
        Some(
            client
                .stream("/events/stream?topic=claude.spawn.%3E")
                .await?,
        )
    } else {
        None
    };
    let mut request = request;
    request["wait"] = Value::Bool(false);
    let started = client.call("POST", "/spawn", Some(request)).await?;
    let id = started["process_id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let result_path = format!("/processes/{}/result", super::client::encode(&id));
    let result = client.get(&result_path);
    let Some(events) = events.as_mut() else {
        return result.await;
    };
    let t0 = std::time::Instant::now();
    tokio::pin!(result);
    loop {
        tokio::select! {
            r = &mut result => return r,
            e = events.next_event() => match e {
                Ok(Some(e)) if e["data"]["process_id"].as_str() == Some(id.as_str()) => {
                    let topic = e["topic"].as_str().unwrap_or("");
                    if let Some(line) = spawn_progress_line(t0.elapsed().as_secs_f64(), topic, &e["data"]) {
                        eprintln!("{line}");
                    }
                }
                Ok(Some(_)) => {}
                // The stream ended or broke: the answer still comes.
                _ => return result.await,
            },
        }
    }
}

async fn get_rows<T: serde::de::DeserializeOwned>(
    client: &super::client::DaemonClient,
    path: &str,
    key: &str,
    json: bool,
) -> anyhow::Result<Option<Vec<T>>> {
    let b = client.get(path).await?;
    if json {
        print_json(&b[key])?;
        return Ok(None);
    }
    Ok(Some(serde_json::from_value(b[key].clone())?))
}

/// Runs one Claude command through the daemon's API (or the data dir's, served in process).
///
/// # Errors
/// The command failed (a failed Claude call is an error, after printing what happened).
pub async fn run(cmd: ClaudeCmd, client: &super::client::DaemonClient) -> anyhow::Result<()> {
    use super::client::encode;
    match cmd {
        ClaudeCmd::Spawn {
            prompt,
            model,
            agent,
            json,
        } => {
            let req = serde_json::json!({ "prompt": prompt, "model": model, "agent": agent });
            let b = spawn_via(client, req, stderr_is_terminal()).await?;
            let report = SpawnReport {
                process_id: b["process_id"].as_str().unwrap_or_default().to_string(),
                answer: serde_json::from_value(b["answer"].clone()).ok(),
                failure: serde_json::from_value(b["error"].clone()).ok(),
            };
            if json {
                print_json(&b)?;
            } else {
                println!("{}", render_spawn(&report));
            }
            if let Some(f) = report.failure {
                anyhow::bail!("the Claude call failed ({}): {}", f.class, f.message);
            }
        }
        ClaudeCmd::Ps {
            status,
            limit,
            json,
        } => {
            let mut path = format!("/processes?limit={limit}");
            if let Some(st) = &status {
                path.push_str(&format!("&status={}", encode(st)));
            }
            if let Some(rows) = get_rows::<ProcessRow>(client, &path, "processes", json).await? {
                println!("{}", render_ps(&rows));
            }
        }
        ClaudeCmd::Agents { json } => {
            if let Some(rows) = get_rows::<AgentRow>(client, "/agents", "agents", json).await? {
                println!("{}", render_agents(&rows));
            }
        }
        ClaudeCmd::Agent(AgentCmd::Send { agent, text, json }) => {
            let b = client
                .call(
                    "POST",
                    &format!("/agents/{}/messages", encode(&agent)),
                    Some(serde_json::json!({ "text": text, "from": "cli" })),
                )
                .await?;
            if json {
                print_json(&b)?;
            } else {
                println!(
                    "sent to {agent} (event {}); its next turn reads it",
                    b["event_id"]
                );
            }
        }
        ClaudeCmd::Cost { json } => {
            let b = client.get("/cost").await?;
            if json {
                print_json(&b)?;
            } else {
                print!("{}", render_cost(&serde_json::from_value(b)?));
            }
        }
        ClaudeCmd::Sessions { cmd: None, json } => {
            if let Some(rows) =
                get_rows::<SessionSummary>(client, "/sessions", "sessions", json).await?
            {
                if rows.is_empty() {
                    println!("no sessions yet; `ksi spawn \"...\"` starts one");
                    return Ok(());
                }
                let mut t = table(&["session", "agent", "turns", "cost $", "last"]);
                for s in rows {
                    t.add_row(vec![
                        s.session_id,
                        s.agent_id.unwrap_or_default(),
                        s.turns.to_string(),
                        format!("{:.4}", s.cost_usd),
                        clock(s.last_at),
                    ]);
                }
                println!("{t}");
            }
        }
        ClaudeCmd::Sessions {
            cmd: Some(SessionsCmd::Show { id, json }),
            ..
        } => {
            let path = format!("/sessions/{}", encode(&id));
            if let Some(t) = get_rows::<TranscriptEntry>(client, &path, "entries", json).await? {
                print!("{}", render_transcript(&t));
            }
        }
    }
    Ok(())
}

/// `ksi-host dev spawn-many`: starts N Claude calls and waits for them, printing
/// `RUNNING <process_id> <pid>` as each starts. The daemon-kill test SIGKILLs it mid-way.
#[derive(Debug, Clone, Args)]
pub struct SpawnManyArgs {
    /// Calls to start at once
    #[arg(long, default_value_t = 5)]
    pub n: usize,
    /// Prompt prefix (each call gets its index appended)
    #[arg(long, default_value = "spawn-many call")]
    pub prompt: String,
}

/// Runs `dev spawn-many`. `FAKE_CLAUDE_*` variables are passed through to the CLI processes.
///
/// # Errors
/// A store failure.
pub async fn spawn_many(args: SpawnManyArgs, o: Opened) -> anyhow::Result<()> {
    let mut config = ExecutorConfig {
        extra_env: std::env::vars()
            .filter(|(k, _)| k.starts_with("FAKE_CLAUDE_"))
            .collect(),
        ..ExecutorConfig::default()
    };
    config.spend.max_concurrency = args.n.max(1);
    config.spend.spawn_rate_per_min = 0.0;
    let exec = executor(&o, config);
    let mut ids = Vec::new();
    for i in 0..args.n {
        let id = exec
            .spawn(ClaudeRequest {
                prompt: format!("{} {i}", args.prompt),
                ..ClaudeRequest::default()
            })
            .await
            .map_err(|f| anyhow::anyhow!("{}: {}", f.class, f.message))?;
        ids.push(id);
    }
    // Report each process once its RUNNING row (with the pid) is committed.
    let mut reported = BTreeMap::new();
    while reported.len() < ids.len() {
        for id in &ids {
            if reported.contains_key(id) {
                continue;
            }
            if let Some(row) = executor::get_process(&o.store, id)?
                && row.status != "PENDING"
            {
                println!("RUNNING {id} {}", row.pid.unwrap_or(0));
                reported.insert(id.clone(), row.pid);
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    for id in &ids {
        let out = exec.wait(id).await;
        println!(
            "DONE {id} {}",
            match out {
                Ok(_) => "ok".to_string(),
                Err(f) => f.class,
            }
        );
    }
    Ok(())
}

/// Runs `dev reconcile`: start-up reconciliation of the executor, as the daemon does it.
///
/// # Errors
/// A store failure.
pub async fn reconcile(o: Opened, json_out: bool) -> anyhow::Result<ReconcileReport> {
    let exec = executor(&o, ExecutorConfig::default());
    let r = exec.reconcile().await?;
    if json_out {
        print_json(&r)?;
    } else {
        println!(
            "reconciled: {} completed from their logs, {} to retry, {} dead, {} orphaned process groups killed",
            r.completed.len(),
            r.retry.len(),
            r.dead.len(),
            r.killed_pids.len()
        );
    }
    Ok(r)
}

/// Short one-line summary of a process for live output.
pub fn process_line(r: &ProcessRow) -> String {
    format!(
        "{} {} {} {}",
        r.id,
        r.status,
        r.model.clone().unwrap_or_default(),
        ellipsize(r.error.as_deref().unwrap_or_default(), 60)
    )
}

/// Counts rows by status (for tests and health).
///
/// # Errors
/// A database error.
pub fn status_counts(store: &Store) -> Result<BTreeMap<String, i64>, BusError> {
    store.read(|c| {
        let mut st = c.prepare("SELECT status, COUNT(*) FROM processes GROUP BY status")?;
        let rows = st.query_map(params![], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(subcommand)]
        cmd: ClaudeCmd,
    }

    #[test]
    fn the_commands_parse_as_documented() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
        let c = Cli::parse_from([
            "ksi", "spawn", "hi there", "--model", "haiku", "--agent", "a1",
        ]);
        assert!(matches!(
            c.cmd,
            ClaudeCmd::Spawn { ref prompt, model: Some(ref m), agent: Some(ref a), json: false }
                if prompt == "hi there" && m == "haiku" && a == "a1"
        ));
        let c = Cli::parse_from(["ksi", "agent", "send", "a1", "hello"]);
        assert!(matches!(c.cmd, ClaudeCmd::Agent(AgentCmd::Send { .. })));
        let c = Cli::parse_from(["ksi", "sessions", "show", "abc"]);
        assert!(matches!(
            c.cmd,
            ClaudeCmd::Sessions {
                cmd: Some(SessionsCmd::Show { .. }),
                ..
            }
        ));
        let c = Cli::parse_from(["ksi", "ps", "--status", "RUNNING", "--json"]);
        assert!(matches!(c.cmd, ClaudeCmd::Ps { json: true, .. }));
    }
}
