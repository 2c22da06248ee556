//! Response logs: the CLI's raw stdout, kept so no paid answer is ever lost.
//!
//! While an attempt runs, the CLI writes its stdout straight into
//! `claude_logs/pending/<process_id>.<attempt>.jsonl` (see [`create_pending`]), which the
//! supervisor tails: a line the CLI printed is in that file even if the daemon dies at once
//! (the page cache survives a daemon crash). When the attempt ends, its lines plus one KSI
//! envelope line (process id, agent, attempt, timings, exit, class) are appended to
//! `claude_logs/<session>.jsonl` with one write and one fsync; `claude_logs/latest.jsonl` is
//! re-pointed at that file (by [`LatestLink`], just after); the row commits with a reference to
//! the result line; then the pending file is removed. An attempt that never learned its session id keeps its pending file
//! as its log (with the envelope appended and fsynced).
//!
//! Crash windows, and what we chose:
//! - The daemon dies after the result line reached the pending file: `recover`/reconciliation
//!   finds it there and completes the call without running it again.
//! - The daemon dies after the session log append but before the row commit: the pending file is
//!   still there, so the call is completed from it, referencing the copy already in the
//!   session log (found by its envelope, [`logged_result_in`]): the log holds it once.
//! - The machine loses power just after the answer: its COMPLETED commit may not have reached
//!   the disk (it does not hold the answer back once the RUNNING row is durable, see
//!   `Executor::complete`), and the pending file is gone. The answer's lines are durable in the
//!   session log, so start-up finds them there by the envelope ([`find_logged_result`]) and
//!   completes the row: not lost, not paid twice.
//! - The machine loses power between the result line and the session log's fsync (about a
//!   millisecond): the call is run again, as it is after a power loss while the CLI waits for
//!   the API (seconds). The pending file is not fsynced for that window.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader};
use std::path::Path;

use serde_json::Value;

use super::stream::{ParsedRun, ResultSummary, StreamEvent, StreamParser};
use crate::refs::{FileRef, Refs};

/// Directory of the streaming logs of running attempts.
pub const PENDING_DIR: &str = "claude_logs/pending";

/// The streaming log of one attempt.
pub fn pending_path(process_id: &str, attempt: u32) -> String {
    format!("{PENDING_DIR}/{process_id}.{attempt}.jsonl")
}

/// The conversation log of a session.
pub fn session_path(session_id: &str) -> String {
    format!("claude_logs/{session_id}.jsonl")
}

/// Whether a session id is safe as a file name (the CLI's are UUIDs).
pub fn safe_session_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// Creates (or empties) the pending log at `rel` under `refs`, which the CLI writes its stdout
/// into, and returns its path.
///
/// It is not fsynced when the result line arrives: it keeps an answer across a crash of the
/// daemon, and the page cache survives that. Across a crash of the machine the answer is kept
/// by its copy in the session log, fsynced before the COMPLETED row that references it; a
/// power loss in the millisecond between the two costs the call once more, as one during the
/// seconds the CLI waits for the API does anyway.
pub fn create_pending(refs: &Refs, rel: &str) -> std::io::Result<std::path::PathBuf> {
    let full = refs
        .resolve(rel)
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    if let Some(dir) = full.parent() {
        std::fs::create_dir_all(dir)?;
    }
    OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .open(&full)?;
    Ok(full)
}

/// A result found in a log file: the parsed run and the reference of the result line.
#[derive(Debug, Clone)]
pub struct FoundResult {
    /// Everything parsed from the lines up to the result.
    pub run: ParsedRun,
    /// The result summary (not an error).
    pub result: ResultSummary,
    /// The raw lines, in order, up to and including the result line.
    pub lines: Vec<String>,
    /// Where the result line already is in a session log (its attempt's envelope follows it
    /// there), when it was found in one: nothing has to be appended again.
    pub logged: Option<FileRef>,
    /// The attempt that printed it (from the pending log's name or the envelope), when known.
    pub attempt: Option<u32>,
    /// The pending log it was found in (data-dir relative), removed once the row is completed.
    pub pending: Option<String>,
}

/// The attempt number in a pending log's name (`claude_logs/pending/<id>.<attempt>.jsonl`).
pub fn attempt_of_pending(rel: &str) -> Option<u32> {
    let stem = rel.rsplit('/').next()?.strip_suffix(".jsonl")?;
    stem.rsplit('.').next()?.parse().ok()
}

/// Parses a pending log and returns its successful result, if it has one.
pub fn successful_result_in(path: &Path) -> Option<FoundResult> {
    let f = File::open(path).ok()?;
    let mut parser = StreamParser::new();
    let mut run = ParsedRun::default();
    let mut lines = Vec::new();
    for line in BufReader::new(f).lines() {
        let Ok(line) = line else { break };
        for ev in parser.feed_line(&line) {
            let is_result = matches!(ev, StreamEvent::Result(_));
            run.apply(ev);
            if is_result {
                lines.push(line.clone());
                let result = run.result.clone()?;
                if result.is_error {
                    return None;
                }
                return Some(FoundResult {
                    run,
                    result,
                    lines,
                    logged: None,
                    attempt: None,
                    pending: None,
                });
            }
        }
        lines.push(line);
    }
    None
}

/// The successful answer of `process_id` already appended to the session log `rel`
/// (`claude_logs/<session>.jsonl`): the lines of the attempt that its success envelope (one
/// without an error `class`) closes, with `logged` pointing at the result line. The last such
/// envelope wins.
pub fn logged_result_in(refs: &Refs, rel: &str, process_id: &str) -> Option<FoundResult> {
    let bytes = std::fs::read(refs.resolve(rel).ok()?).ok()?;
    // (line number, offset, text) of the lines since the previous envelope.
    let mut window: Vec<(u64, u64, &str)> = Vec::new();
    let mut found: Option<Vec<(u64, u64, &str)>> = None;
    let mut attempt = None;
    let mut offset = 0u64;
    for (i, raw) in bytes.split(|b| *b == b'\n').enumerate() {
        let start = offset;
        offset += raw.len() as u64 + 1;
        let Ok(line) = std::str::from_utf8(raw) else {
            continue;
        };
        if line.contains("\"ksi_envelope\"")
            && let Ok(v) = serde_json::from_str::<Value>(line)
            && v.get("type").and_then(Value::as_str) == Some("ksi_envelope")
        {
            let ours = v.get("process_id").and_then(Value::as_str) == Some(process_id)
                && v.get("class").is_none_or(Value::is_null);
            let lines = std::mem::take(&mut window);
            if ours {
                attempt = v.get("attempt").and_then(Value::as_u64).map(|a| a as u32);
                found = Some(lines);
            }
            continue;
        }
        window.push((i as u64 + 1, start, line));
    }
    let lines = found?;
    let texts: Vec<String> = lines.iter().map(|l| l.2.to_string()).collect();
    let at = last_result_line(&texts)?;
    let mut parser = StreamParser::new();
    let mut run = ParsedRun::default();
    for line in &texts[..=at] {
        for ev in parser.feed_line(line) {
            run.apply(ev);
        }
    }
    let result = run.result.clone().filter(|r| !r.is_error)?;
    let (line, offset, text) = lines[at];
    Some(FoundResult {
        run,
        result,
        lines: texts[..=at].to_vec(),
        logged: Some(FileRef {
            path: rel.to_string(),
            line: Some(line),
            offset: Some(offset),
            sha256: crate::refs::sha256_hex(text.as_bytes()),
            bytes: text.len() as u64,
        }),
        attempt,
        pending: None,
    })
}

/// Looks for the successful answer of `process_id` in the session logs written since
/// `since_ms` (epoch ms), newest first. After a power loss its row may not say where the
/// answer went (see the module docs). `None` if no session log has it.
pub fn find_logged_result(refs: &Refs, process_id: &str, since_ms: i64) -> Option<FoundResult> {
    let dir = refs.root().join("claude_logs");
    // Some filesystems keep mtime coarsely: a little slack.
    let since = std::time::UNIX_EPOCH
        + std::time::Duration::from_millis(since_ms.saturating_sub(5_000).max(0) as u64);
    let mut logs: Vec<(std::time::SystemTime, String)> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| {
            let e = e.ok()?;
            let name = e.file_name().into_string().ok()?;
            // `latest.jsonl` is a symlink to one of the others (`DirEntry::metadata` does not
            // follow it).
            let meta = e.metadata().ok().filter(std::fs::Metadata::is_file)?;
            let modified = meta.modified().ok().filter(|m| *m >= since)?;
            name.ends_with(".jsonl").then_some((modified, name))
        })
        .collect();
    logs.sort_by_key(|l| std::cmp::Reverse(l.0));
    logs.into_iter()
        .find_map(|(_, name)| logged_result_in(refs, &format!("claude_logs/{name}"), process_id))
}

/// Writes an attempt's lines and its envelope to the session log (one write, one fsync).
/// Returns the reference of the result line (if any) and of the envelope.
///
/// # Errors
/// The log cannot be written.
pub fn append_to_session(
    refs: &Refs,
    session: &str,
    lines: &[String],
    envelope: &Value,
) -> crate::refs::Result<(Option<FileRef>, FileRef)> {
    let rel = session_path(session);
    let env = envelope.to_string();
    // One JSON value per line, so a result spread over several lines still has one line a
    // reference can point at.
    let cleaned: Vec<String> = one_value_per_line(lines)
        .into_iter()
        .map(|l| l.replace('\n', " "))
        .collect();
    let mut all: Vec<&[u8]> = cleaned.iter().map(|l| l.as_bytes()).collect();
    all.push(env.as_bytes());
    let mut refs_out = refs.append_lines(&rel, &all)?;
    let envelope_ref = refs_out.pop().expect("the envelope line");
    let result_ref = last_result_line(&cleaned).map(|i| refs_out[i].clone());
    Ok((result_ref, envelope_ref))
}

/// Appends the envelope to a pending log that stays as the attempt's log (no session id).
///
/// # Errors
/// The log cannot be written.
pub fn close_pending(refs: &Refs, rel: &str, envelope: &Value) -> crate::refs::Result<FileRef> {
    let r = refs.append_line(rel, envelope.to_string().as_bytes())?;
    // The file stays as the attempt's log, referenced by its row: its name must be durable.
    let dir = refs.root().join(PENDING_DIR);
    refs.sync_dir_entry(&dir)
        .map_err(|source| crate::refs::RefError::Io {
            path: PENDING_DIR.to_string(),
            source,
        })?;
    Ok(r)
}

/// Index of the last line holding a `result`: a result object, or a JSON array of messages
/// with one in it (`--output-format json --verbose` prints the whole run so).
pub fn last_result_line(lines: &[String]) -> Option<usize> {
    let is_result = |v: &Value| v.get("type").and_then(Value::as_str) == Some("result");
    lines.iter().rposition(|l| {
        serde_json::from_str::<Value>(l)
            .ok()
            .is_some_and(|v| match &v {
                Value::Array(items) => items.iter().any(is_result),
                other => is_result(other),
            })
    })
}

/// The lines of an attempt with every JSON value on one line: a value the CLI (or a wrapper)
/// pretty-printed over several lines is joined into one compact line; everything else is kept
/// as printed. Lines that are already one value each are returned unchanged (the usual case,
/// checked without parsing).
pub fn one_value_per_line(lines: &[String]) -> Vec<String> {
    let opens_unclosed = |l: &String| {
        let t = l.trim();
        (t.starts_with('{') && !t.ends_with('}')) || (t.starts_with('[') && !t.ends_with(']'))
    };
    if !lines.iter().any(opens_unclosed) {
        return lines.to_vec();
    }
    let mut parser = StreamParser::new();
    let mut out = Vec::with_capacity(lines.len());
    let mut block: Vec<String> = Vec::new();
    for line in lines {
        let was_pending = parser.is_pending();
        let events = parser.feed_line(line);
        if let Some(value) = parser.take_joined() {
            out.push(value.to_string());
            block.clear();
            continue;
        }
        let abandoned = was_pending
            && events
                .iter()
                .any(|e| matches!(e, StreamEvent::Skipped { .. }));
        if abandoned || !was_pending {
            // A block that did not become JSON stays as it was printed.
            out.append(&mut block);
        }
        if parser.is_pending() {
            block.push(line.clone());
        } else {
            out.push(line.clone());
        }
    }
    parser.finish();
    out.append(&mut block);
    out
}

/// Keeps `claude_logs/latest.jsonl`, a relative symlink, pointing at the log written last, off
/// the calls' path: a thread of its own re-points it a moment (at most [`LatestLink::SETTLE`])
/// after a log is written, once for a burst of calls that end together.
#[derive(Debug, Clone)]
pub struct LatestLink {
    /// To the thread; `None` if it could not start (then each call re-points it itself).
    tx: Option<std::sync::mpsc::Sender<String>>,
    dir: std::path::PathBuf,
}

impl LatestLink {
    /// How long the thread waits for more logs before it re-points the link.
    pub const SETTLE: std::time::Duration = std::time::Duration::from_millis(10);

    /// Starts the thread for the `claude_logs` directory of `refs`; it ends when the last clone
    /// of this is dropped.
    pub fn start(refs: &Refs) -> LatestLink {
        let dir = refs.root().join("claude_logs");
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        let thread_dir = dir.clone();
        let started = std::thread::Builder::new()
            .name("ksi-latest-log".into())
            .spawn(move || {
                let mut current: Option<String> = None;
                while let Ok(mut target) = rx.recv() {
                    std::thread::sleep(Self::SETTLE);
                    while let Ok(later) = rx.try_recv() {
                        target = later;
                    }
                    if current.as_deref() != Some(target.as_str()) {
                        relink_latest(&thread_dir, &target);
                        current = Some(target);
                    }
                }
            });
        if let Err(e) = &started {
            tracing::warn!(error = %e, "cannot start the thread that keeps claude_logs/latest.jsonl; calls update it themselves");
        }
        LatestLink {
            tx: started.ok().map(|_| tx),
            dir,
        }
    }

    /// Re-points the link at `target` (a file name in `claude_logs/`) soon.
    pub fn point(&self, target: &str) {
        let sent = self
            .tx
            .as_ref()
            .is_some_and(|tx| tx.send(target.to_string()).is_ok());
        if !sent {
            relink_latest(&self.dir, target);
        }
    }
}

/// Makes `dir/latest.jsonl` a relative symlink to `target`, replacing it atomically.
fn relink_latest(dir: &Path, target: &str) {
    let tmp = dir.join(format!(".latest.{}.tmp", rand::random::<u64>()));
    let ok = std::os::unix::fs::symlink(target, &tmp)
        .and_then(|()| std::fs::rename(&tmp, dir.join("latest.jsonl")));
    if let Err(e) = ok {
        let _ = std::fs::remove_file(&tmp);
        tracing::debug!(error = %e, "cannot update claude_logs/latest.jsonl");
    }
}

/// Reads a result line by reference and parses it.
pub fn read_result(refs: &Refs, r: &FileRef) -> Option<ResultSummary> {
    let bytes = refs.read(r).ok()?;
    let run = ParsedRun::from_stdout(&String::from_utf8_lossy(&bytes));
    run.result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latest_points_at_the_last_of_a_burst_of_logs() {
        let dir = tempfile::tempdir().unwrap();
        let refs = Refs::open(dir.path()).unwrap();
        let latest = LatestLink::start(&refs);
        for s in ["a.jsonl", "b.jsonl", "c.jsonl"] {
            latest.point(s);
        }
        let link = dir.path().join("claude_logs/latest.jsonl");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while std::fs::read_link(&link).ok() != Some("c.jsonl".into())
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(LatestLink::SETTLE);
        }
        assert_eq!(std::fs::read_link(&link).unwrap(), Path::new("c.jsonl"));
        let leftovers: Vec<_> = std::fs::read_dir(dir.path().join("claude_logs"))
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }

    #[test]
    fn only_a_successful_result_line_in_a_pending_log_counts() {
        let dir = tempfile::tempdir().unwrap();
        let ok = dir.path().join("ok.jsonl");
        std::fs::write(
            &ok,
            "{\"type\":\"system\",\"subtype\":\"init\",\"session_id\":\"s1\"}\nnot json\n\
             {\"type\":\"result\",\"subtype\":\"success\",\"is_error\":false,\"result\":\"hi\",\"session_id\":\"s1\",\"total_cost_usd\":0.5}\n",
        )
        .unwrap();
        let found = successful_result_in(&ok).unwrap();
        assert_eq!(found.result.text.as_deref(), Some("hi"));
        assert_eq!(found.lines.len(), 3);
        assert_eq!(last_result_line(&found.lines), Some(2));
        let err = dir.path().join("err.jsonl");
        std::fs::write(
            &err,
            "{\"type\":\"result\",\"subtype\":\"success\",\"is_error\":true,\"result\":\"Invalid API key\"}\n",
        )
        .unwrap();
        assert!(successful_result_in(&err).is_none());
        let torn = dir.path().join("torn.jsonl");
        std::fs::write(&torn, "{\"type\":\"result\",\"subtype\":\"succ").unwrap();
        assert!(successful_result_in(&torn).is_none());
    }
}
