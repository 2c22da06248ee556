//! `ksi-host import-logs DIR`: brings the conversations of the original KSI into KSI's tables, so
//! `ksi sessions`, `ksi sessions show ID` and `ksi cost` see them.
//!
//! The original wrote two kinds of JSONL logs, one file per session:
//! - `claude_logs/<session>.jsonl`: a `{"type": "human", "content": PROMPT}` line, then the CLI's
//!   result JSON with `"type": "claude"` and a `timestamp` added (older CLIs: `cost_usd`,
//!   `sessionId`);
//! - `var/logs/responses/<session>.jsonl`: `{"ksi": {provider, request_id, timestamp,
//!   duration_ms, ...}, "response": CLI_RESULT}` envelopes, with `{"type": "user", "content"}`
//!   lines before them for providers that needed the history.
//!
//! Each result becomes one COMPLETED (or, for an error result, FAILED) `processes` row whose id is
//! derived from the result itself (the CLI's `uuid`, else a hash of the result without the
//! fields the original added), so importing twice, or finding the same answer in both logs,
//! adds nothing. The answer (as an `assistant` line), the result line and a `ksi_envelope` line
//! (the prompt's file, where it came from) are COPIED into `claude_logs/<session>.jsonl` of the
//! data dir: that is the file `ksi sessions show` reads, references must stay inside the data
//! dir, and the original checkout may be moved or deleted after the move. The prompt goes to `prompts/imported/<id>.txt`.
//! Files are written before the row that points at them. Lines that are not JSON, or results
//! without a usable session id, are counted and reported, never fatal.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use anyhow::Context;
use rusqlite::{OptionalExtension, params};
use serde::Serialize;
use serde_json::{Value, json};

use super::responses::{safe_session_id, session_path};
use crate::bus::BusError;
use crate::refs::{Refs, sha256_hex};
use crate::store::{Store, now_ms};

/// Problems reported in detail (the rest are only counted).
const MAX_PROBLEMS: usize = 20;

/// What an import did.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ImportReport {
    /// Log files read.
    pub files: usize,
    /// Sessions that got at least one new turn.
    pub conversations: usize,
    /// Results imported now (one `processes` row each).
    pub turns: usize,
    /// Results already imported by an earlier run (or seen twice in this one).
    pub already_imported: usize,
    /// Cost of the results imported now (USD).
    pub cost_usd: f64,
    /// Lines that could not be used (not JSON, or a result without a session id).
    pub skipped: usize,
    /// Lines of other kinds (stream-json progress lines, summaries), left alone.
    pub ignored: usize,
    /// The first problems, as `file:line: why`.
    pub problems: Vec<String>,
}

impl ImportReport {
    fn problem(&mut self, file: &Path, line: usize, why: impl std::fmt::Display) {
        self.skipped += 1;
        if self.problems.len() < MAX_PROBLEMS {
            self.problems
                .push(format!("{}:{line}: {why}", file.display()));
        }
    }
}

/// The log files of an original KSI checkout, in a stable order.
///
/// # Errors
/// `dir` is not a directory, or holds neither log directory.
pub fn log_files(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    anyhow::ensure!(
        dir.is_dir(),
        "{} is not a directory: give the root of an original KSI checkout (the folder holding claude_logs/ or var/logs/responses/)",
        dir.display()
    );
    let subdirs = [dir.join("claude_logs"), dir.join("var/logs/responses")];
    anyhow::ensure!(
        subdirs.iter().any(|d| d.is_dir()),
        "{} holds neither claude_logs/ nor var/logs/responses/: give the root of an original KSI checkout",
        dir.display()
    );
    let mut files = Vec::new();
    for sub in subdirs.iter().filter(|d| d.is_dir()) {
        let mut here: Vec<PathBuf> = std::fs::read_dir(sub)
            .with_context(|| format!("listing {}", sub.display()))?
            .filter_map(Result::ok)
            // `latest.jsonl` is a symlink to one of the others.
            .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "jsonl"))
            .collect();
        here.sort();
        files.extend(here);
    }
    Ok(files)
}

/// One result found in a log, ready to become a row.
struct Turn {
    id: String,
    session_id: String,
    agent_id: Option<String>,
    model: Option<String>,
    prompt: Option<String>,
    result: Value,
    is_error: bool,
    created_at: i64,
    source: Value,
}

fn parse_time(v: Option<&Value>) -> Option<i64> {
    let s = v?.as_str()?;
    chrono::DateTime::parse_from_rfc3339(s)
        .map(|t| t.timestamp_millis())
        .or_else(|_| {
            // `datetime.isoformat()` without a zone: UTC in the original.
            chrono::NaiveDateTime::parse_from_str(s, "%Y-%m-%dT%H:%M:%S%.f")
                .map(|t| t.and_utc().timestamp_millis())
        })
        .ok()
}

/// The model that cost the most in a result's `modelUsage` (the CLI also lists helper models).
fn main_model(result: &Value) -> Option<String> {
    let usage = result.get("modelUsage")?.as_object()?;
    usage
        .iter()
        .map(|(m, u)| (m, u.get("costUSD").and_then(Value::as_f64).unwrap_or(0.0)))
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .map(|(m, _)| m.clone())
}

fn str_of(v: &Value, key: &str) -> Option<String> {
    v.get(key)
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
}

/// The row id of a result: from the CLI's `uuid`, else from the result without what the
/// original added to it, so both of its logs give the same id.
fn turn_id(session: &str, result: &Value) -> String {
    let key = match result.get("uuid").and_then(Value::as_str) {
        Some(u) => u.to_string(),
        None => {
            let mut r = result.clone();
            if let Some(o) = r.as_object_mut() {
                for k in ["type", "timestamp", "process_id", "agent_id", "stderr"] {
                    o.remove(k);
                }
            }
            r.to_string()
        }
    };
    let h = sha256_hex(format!("{session}\n{key}").as_bytes());
    format!("imp-{}", &h[..24])
}

/// Imports the original KSI's logs under `dir` into the store and data dir of `refs`.
///
/// # Errors
/// `dir` is not an original KSI checkout (or is this data dir), a log cannot be read, or a file
/// or row cannot be written. Malformed lines are not errors: they are counted in the report.
pub async fn import_logs(store: &Store, refs: &Refs, dir: &Path) -> anyhow::Result<ImportReport> {
    if let (Ok(a), Ok(b)) = (dir.canonicalize(), refs.root().canonicalize()) {
        anyhow::ensure!(
            a != b,
            "{} is this KSI's own data dir; give the root of the original KSI checkout instead",
            dir.display()
        );
    }
    let files = log_files(dir)?;
    let mut report = ImportReport {
        files: files.len(),
        ..ImportReport::default()
    };
    let mut sessions = BTreeSet::new();
    let mut seen = BTreeSet::new();
    for file in &files {
        let text = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
        let stem = file
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mtime = std::fs::metadata(file)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_millis() as i64)
            .unwrap_or_else(now_ms);
        let mut prompt: Option<String> = None;
        for (i, raw) in text.split(|&b| b == b'\n').enumerate() {
            let line_no = i + 1;
            if raw.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let v: Value = match serde_json::from_slice(raw) {
                Ok(v @ Value::Object(_)) => v,
                Ok(_) => {
                    report.problem(file, line_no, "not a JSON object");
                    continue;
                }
                Err(e) => {
                    report.problem(file, line_no, format!("not JSON ({e})"));
                    continue;
                }
            };
            let kind = v.get("type").and_then(Value::as_str).unwrap_or_default();
            // What the line is: a prompt, a result (bare or in a KSI envelope), or other.
            let (result, meta) = match (kind, v.get("ksi"), v.get("response")) {
                ("human" | "user", _, _) if v.get("content").is_some() => {
                    prompt = v.get("content").map(|c| match c {
                        Value::String(s) => s.clone(),
                        other => other.to_string(),
                    });
                    continue;
                }
                (_, Some(Value::Object(_)), Some(Value::Object(_))) => {
                    (v["response"].clone(), v["ksi"].clone())
                }
                ("claude" | "result", _, _) => (v.clone(), Value::Null),
                _ => {
                    report.ignored += 1;
                    continue;
                }
            };
            let session = str_of(&result, "session_id")
                .or_else(|| str_of(&result, "sessionId"))
                .unwrap_or_else(|| stem.clone());
            if !safe_session_id(&session) {
                report.problem(
                    file,
                    line_no,
                    format!("session id {session:?} is not usable as a file name"),
                );
                prompt = None;
                continue;
            }
            let id = turn_id(&session, &result);
            let turn = Turn {
                session_id: session,
                agent_id: str_of(&v, "agent_id").or_else(|| str_of(&meta, "agent_id")),
                model: str_of(&result, "model")
                    .or_else(|| main_model(&result))
                    .or_else(|| str_of(&v, "model")),
                prompt: prompt.take(),
                is_error: result.get("is_error").and_then(Value::as_bool) == Some(true)
                    || result.get("subtype").and_then(Value::as_str)
                        == Some("error_during_execution"),
                created_at: parse_time(v.get("timestamp"))
                    .or_else(|| parse_time(meta.get("timestamp")))
                    .unwrap_or(mtime),
                source: json!({
                    "file": file.display().to_string(), "line": line_no,
                    "sha256": sha256_hex(raw),
                    "request_id": meta.get("request_id"),
                    "process_id": v.get("process_id"),
                }),
                id,
                result,
            };
            if !seen.insert(turn.id.clone()) || exists(store, &turn.id)? {
                report.already_imported += 1;
                continue;
            }
            let session = turn.session_id.clone();
            report.cost_usd += import_turn(store, refs, turn).await?;
            report.turns += 1;
            sessions.insert(session);
        }
    }
    report.conversations = sessions.len();
    Ok(report)
}

fn exists(store: &Store, id: &str) -> anyhow::Result<bool> {
    let id = id.to_string();
    Ok(store
        .read(move |c| {
            c.query_row("SELECT 1 FROM processes WHERE id = ?1", [id], |_| Ok(()))
                .optional()
                .map_err(BusError::from)
        })?
        .is_some())
}

fn num(v: &Value, keys: &[&str]) -> Option<f64> {
    keys.iter().find_map(|k| v.get(*k).and_then(Value::as_f64))
}

fn int(v: &Value, ptr: &str) -> Option<i64> {
    v.pointer(ptr).and_then(Value::as_i64)
}

/// Writes the prompt file and the session log lines, then the row. Returns the cost.
async fn import_turn(store: &Store, refs: &Refs, t: Turn) -> anyhow::Result<f64> {
    let session = t.session_id.clone();
    let prompt_ref = match &t.prompt {
        Some(p) => Some(
            refs.write(&format!("prompts/imported/{}.txt", t.id), p.as_bytes())
                .with_context(|| format!("writing the prompt of {}", t.id))?,
        ),
        None => None,
    };
    // The copy in KSI's shapes (the original file is left as it is): the answer as an
    // `assistant` line (the original ran `--output-format json`, which has none, and the
    // transcript shows answers from those), the result typed `result` with today's field names,
    // then the envelope.
    let mut result = t.result.clone();
    if let Some(o) = result.as_object_mut() {
        o.insert("type".into(), json!("result"));
        o.insert("session_id".into(), json!(session));
        if !o.contains_key("total_cost_usd")
            && let Some(c) = o.get("cost_usd").cloned()
        {
            o.insert("total_cost_usd".into(), c);
        }
    }
    let mut lines_out = Vec::new();
    if let Some(text) = str_of(&t.result, "result").filter(|_| !t.is_error) {
        lines_out.push(
            json!({
                "type": "assistant", "session_id": session, "imported": true,
                "message": {"id": format!("{}-answer", t.id), "role": "assistant",
                            "content": [{"type": "text", "text": text}]},
            })
            .to_string(),
        );
    }
    lines_out.push(result.to_string());
    lines_out.push(
        json!({
            "type": "ksi_envelope", "process_id": t.id, "agent_id": t.agent_id, "attempt": 1,
            "prompt_file": prompt_ref.as_ref().map(|r| r.path.clone()),
            "imported_from": t.source,
        })
        .to_string(),
    );
    let rel = session_path(&session);
    let bytes: Vec<&[u8]> = lines_out.iter().map(|l| l.as_bytes()).collect();
    let written = refs
        .append_lines(&rel, &bytes)
        .with_context(|| format!("appending to {rel}"))?;
    let result_ref = written[written.len() - 2].clone();
    let r = &t.result;
    let cost = num(r, &["total_cost_usd", "cost_usd"]).unwrap_or(0.0);
    let (status, error) = if t.is_error {
        let why = str_of(r, "result")
            .or_else(|| str_of(r, "error"))
            .or_else(|| str_of(r, "subtype"))
            .unwrap_or_else(|| "the call ended in an error".into());
        ("FAILED", Some(why))
    } else {
        ("COMPLETED", None)
    };
    let row = (
        t.id.clone(),
        t.agent_id.clone(),
        status,
        t.model.clone(),
        prompt_ref.map(|p| serde_json::to_string(&p).unwrap_or_default()),
        result_ref,
        error,
        json!({ "imported_from": t.source }).to_string(),
    );
    let created = t.created_at;
    let duration = num(r, &["duration_ms"]).map(|d| d as i64);
    let duration_api = num(r, &["duration_api_ms"]).map(|d| d as i64);
    let turns = int(r, "/num_turns");
    // The call's tokens: `modelUsage` when the result has it (subagents and side models
    // included), else `usage`, as for live calls.
    // (The original's logs type the CLI's result line `claude`.)
    let mut as_result = r.clone();
    as_result["type"] = Value::from("result");
    let parsed = super::stream::ParsedRun::from_stdout(&as_result.to_string()).result;
    let (tin, tout, tcr, tcw) = match parsed.filter(|p| !p.model_usage.is_empty()) {
        Some(p) => (
            Some(p.usage.input as i64),
            Some(p.usage.output as i64),
            Some(p.usage.cache_read as i64),
            Some(p.usage.cache_creation as i64),
        ),
        None => (
            int(r, "/usage/input_tokens"),
            int(r, "/usage/output_tokens"),
            int(r, "/usage/cache_read_input_tokens"),
            int(r, "/usage/cache_creation_input_tokens"),
        ),
    };
    let sess = session.clone();
    store
        .write(move |tx| {
            let (id, agent, status, model, prompt_file, line, error, metrics) = row;
            tx.execute(
                "INSERT OR IGNORE INTO processes(id, agent_id, status, model, session_id, attempts,
                    max_attempts, prompt_file, response_file, response_line, response_sha256, error,
                    cost_usd, tokens_in, tokens_out, tokens_cache_read, tokens_cache_write,
                    num_turns, duration_ms, duration_api_ms, metrics, created_at, started_at,
                    completed_at, updated_at, counted_attempt)
                 VALUES (?1, ?2, ?3, ?4, ?5, 1, 1, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15,
                    ?16, ?17, ?18, ?19, ?20, ?20, ?21, ?22, 1)",
                params![
                    id,
                    agent,
                    status,
                    model,
                    sess,
                    prompt_file,
                    line.path,
                    line.line.map(|l| l as i64),
                    line.sha256,
                    error,
                    cost,
                    tin,
                    tout,
                    tcr,
                    tcw,
                    turns,
                    duration,
                    duration_api,
                    metrics,
                    created,
                    created + duration.unwrap_or(0),
                    now_ms()
                ],
            )?;
            Ok::<_, BusError>(())
        })
        .await?;
    Ok(cost)
}

/// Renders a report for the terminal.
pub fn render(r: &ImportReport) -> String {
    let mut s = format!(
        "imported {} turns in {} conversations from {} files (${:.4}); {} already imported, {} lines skipped, {} other lines ignored",
        r.turns, r.conversations, r.files, r.cost_usd, r.already_imported, r.skipped, r.ignored
    );
    for p in &r.problems {
        s.push_str(&format!("\n  skipped {p}"));
    }
    if r.skipped > r.problems.len() {
        s.push_str(&format!(
            "\n  ... and {} more",
            r.skipped - r.problems.len()
        ));
    }
    if r.turns > 0 {
        s.push_str("\n`ksi sessions` lists them; `ksi cost` counts them");
    }
    s
}
