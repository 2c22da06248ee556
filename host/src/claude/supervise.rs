//! Running one Claude CLI attempt under supervision: spawn, feed, watch, time out, kill, reap.
//!
//! This is where a Claude process is killed. The child runs in its own process group, so the
//! CLI's own children (tools, MCP servers, shells) share its fate: on timeout or cancellation the
//! whole group gets SIGTERM, then SIGKILL after a grace period, and the child is reaped. A
//! straggler left in the group after a normal exit is killed too, and dropping the future mid-run
//! kills the group (SIGKILL) through a guard, so no Claude process outlives its request.
//!
//! The caller learns the pid as soon as the child exists (to record it before anything else can
//! go wrong) and sees every stdout line and parsed event as it arrives.

use std::io;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::sync::{mpsc, watch};
use tokio::time::sleep_until;

use super::classify::{Evidence, Failure, FailureClass, PermanentKind, Termination, classify};
use super::command::ClaudeInvocation;
use super::guardian::Guardian;
use super::stream::{ParsedRun, ResultSummary, StreamEvent, StreamParser};

/// Time limits and buffer sizes for one attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// The attempt is killed after this long, whatever it is doing.
    pub overall_timeout: Duration,
    /// The attempt is killed when stdout stays silent this long (before its result).
    /// The CLI prints an `api_retry` line for each of its own retries, so a CLI that keeps
    /// retrying is still "talking"; a long tool call is not, so keep this above your longest tool.
    pub no_output_timeout: Duration,
    /// The attempt is killed when, this long after its start, the CLI has only retried its
    /// connection to the API (`api_retry` lines without an HTTP status) and nothing answered:
    /// the CLI's own ten retries would otherwise take minutes per attempt without a network.
    pub connect_timeout: Duration,
    /// Time between SIGTERM and SIGKILL.
    pub kill_grace: Duration,
    /// How long a CLI may keep running after printing its result (it sometimes waits on MCP
    /// servers) before it is killed; the result still counts.
    pub linger_after_result: Duration,
    /// How long to keep reading stdout after the CLI exited, in case a grandchild holds the pipe.
    pub drain_after_exit: Duration,
    /// Only the last this-many bytes of stderr are kept.
    pub stderr_tail_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            overall_timeout: Duration::from_secs(30 * 60),
            no_output_timeout: Duration::from_secs(5 * 60),
            connect_timeout: Duration::from_secs(60),
            kill_grace: Duration::from_secs(5),
            linger_after_result: Duration::from_secs(10),
            drain_after_exit: Duration::from_secs(2),
            stderr_tail_bytes: 64 * 1024,
        }
    }
}

/// A cancellation handle shared by the caller and the attempt. Cloning shares it.
#[derive(Debug, Clone)]
pub struct CancelToken(Arc<watch::Sender<bool>>);

impl Default for CancelToken {
    fn default() -> Self {
        Self::new()
    }
}

impl CancelToken {
    /// A token that is not cancelled.
    pub fn new() -> Self {
        Self(Arc::new(watch::Sender::new(false)))
    }

    /// Cancel: every attempt holding this token kills its process group and returns.
    pub fn cancel(&self) {
        self.0.send_replace(true);
    }

    /// Whether [`cancel`](Self::cancel) was called.
    pub fn is_cancelled(&self) -> bool {
        *self.0.borrow()
    }

    /// Resolves once the token is cancelled.
    pub async fn cancelled(&self) {
        let mut rx = self.0.subscribe();
        // The sender lives in `self`, so `wait_for` cannot fail.
        let _ = rx.wait_for(|cancelled| *cancelled).await;
    }
}

/// What an attempt reports while it runs.
#[derive(Debug)]
pub enum Progress<'a> {
    /// The child exists; record its pid (it is also its process-group id).
    Spawned {
        /// Pid and process-group id of the child.
        pid: u32,
        /// The child's start time in clock ticks since boot, to tell it from a later process
        /// with the same pid when reconciling after a daemon crash
        /// ([`kill_orphaned_group`](super::orphan::kill_orphaned_group)).
        start_ticks: Option<u64>,
    },
    /// A raw stdout line, before parsing (for `claude_logs/<session>.jsonl`).
    Line(&'a str),
    /// A parsed event (`ApiRetry` is the CLI retrying; `Init` carries the session id early).
    Event(&'a StreamEvent),
}

/// Durations measured by the supervisor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AttemptTimings {
    /// From spawn to the first stdout line.
    pub first_output: Option<Duration>,
    /// From spawn to the process being reaped (after a kill, if there was one).
    pub spawn_to_exit: Duration,
    /// Time spent starting the process (fork until the CLI's program was executed).
    pub spawn: Duration,
}

/// Everything one attempt produced.
#[derive(Debug, Clone)]
pub struct AttemptOutcome {
    /// Pid (and process-group id) of the child; gone by the time this is returned.
    pub pid: u32,
    /// Wall-clock time of the spawn.
    pub started_at: SystemTime,
    /// How the process ended.
    pub termination: Termination,
    /// Exit code, when it exited by itself.
    pub exit_code: Option<i32>,
    /// The signal that ended it, when one did (including KSI's own kill).
    pub signal: Option<i32>,
    /// Every stdout line, as printed (for the response log).
    pub raw_stdout: Vec<String>,
    /// The last [`Limits::stderr_tail_bytes`] of stderr.
    pub stderr_tail: String,
    /// Whether stderr was longer than the kept tail.
    pub stderr_truncated: bool,
    /// Timings.
    pub timings: AttemptTimings,
    /// What stdout said, folded.
    pub run: ParsedRun,
    /// `None` when the attempt succeeded.
    pub failure: Option<Failure>,
}

impl AttemptOutcome {
    /// Whether the attempt succeeded (a result with `is_error: false`).
    pub fn succeeded(&self) -> bool {
        self.failure.is_none()
    }

    /// The final result, if the CLI printed one: the source of cost, tokens and session id.
    pub fn result(&self) -> Option<&ResultSummary> {
        self.run.result.as_ref()
    }

    /// The failure class, if it failed.
    pub fn failure_class(&self) -> Option<FailureClass> {
        self.failure.as_ref().map(|f| f.class)
    }
}

/// The CLI could not be started at all.
#[derive(Debug, thiserror::Error)]
#[error("could not start the Claude CLI `{}`: {source} (set KSI_CLAUDE_BIN or the configured binary path)", binary.display())]
pub struct SpawnError {
    /// The binary that was tried.
    pub binary: PathBuf,
    /// Why the spawn failed.
    #[source]
    pub source: io::Error,
}

impl SpawnError {
    /// A missing or non-executable binary is permanent; anything else (out of processes or
    /// file descriptors) may pass.
    pub fn failure_class(&self) -> FailureClass {
        match self.source.kind() {
            io::ErrorKind::NotFound | io::ErrorKind::PermissionDenied => {
                FailureClass::Permanent(PermanentKind::ExecutableUnavailable)
            }
            _ => FailureClass::Transient(super::classify::TransientKind::Crash),
        }
    }
}

/// Kills the process group when dropped, unless disarmed: dropping the attempt's future must
/// not leave a process behind.
struct GroupKillGuard<'g> {
    pgid: i32,
    armed: bool,
    /// Watches the group while it runs; told to forget it once it is dead.
    guardian: Option<&'g Guardian>,
}

impl Drop for GroupKillGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            signal_group(self.pgid, libc::SIGKILL);
        }
        if let Some(g) = self.guardian {
            g.release(self.pgid);
        }
    }
}

/// Send `sig` to every process of group `pgid`. Errors (the group is already gone) are ignored.
fn signal_group(pgid: i32, sig: i32) {
    // kill(-1) would signal every process we may signal: never let a bad id get there.
    if pgid <= 1 {
        return;
    }
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe {
        libc::kill(-pgid, sig);
    }
}

/// Whether all the CLI has done so far is retry its connection: `api_retry` lines without an
/// HTTP status (the API never answered) and no model output.
fn only_connection_retries(run: &ParsedRun) -> bool {
    !run.api_retries.is_empty()
        && run.api_retries.iter().all(|r| r.error_status.is_none())
        && run.messages.is_empty()
        && run.tool_calls.is_empty()
        && run.result.is_none()
}

/// Run one attempt of `inv` to the end: success, failure, timeout or cancellation.
///
/// `on_progress` is called with the pid right after the spawn, then with every stdout line and
/// parsed event. It runs on the attempt's task, so keep it quick (send to a channel).
///
/// # Errors
///
/// Only when the child cannot be spawned; every other failure is an [`AttemptOutcome`] with a
/// [`Failure`].
pub async fn run_attempt(
    inv: &ClaudeInvocation,
    limits: &Limits,
    cancel: &CancelToken,
    on_progress: impl FnMut(Progress<'_>) + Send,
) -> Result<AttemptOutcome, SpawnError> {
    run_attempt_guarded(inv, limits, cancel, None, on_progress).await
}

/// [`run_attempt`], with the CLI's process group watched by `guardian` instead of
/// `PR_SET_PDEATHSIG` when one is given and alive (a faster spawn: see [`super::guardian`]).
///
/// # Errors
/// As [`run_attempt`].
pub async fn run_attempt_guarded(
    inv: &ClaudeInvocation,
    limits: &Limits,
    cancel: &CancelToken,
    guardian: Option<&Guardian>,
    mut on_progress: impl FnMut(Progress<'_>) + Send,
) -> Result<AttemptOutcome, SpawnError> {
    let started_at = SystemTime::now();
    let t0 = Instant::now();
    let guardian = guardian.filter(|g| g.alive());
    let mut cmd = inv.command_with(guardian.is_none());
    if let Some(path) = &inv.stdout_file {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|source| SpawnError {
                binary: inv.binary.clone(),
                source,
            })?;
        cmd.stdout(std::process::Stdio::from(file));
    }
    // Without the guardian the command forks and lowers its priority itself (PDEATHSIG follows
    // the spawning thread, so it must be this one).
    let spawned = match guardian {
        Some(_) => super::spawner::spawn_niced(cmd, inv.nice).await,
        None => cmd.spawn(),
    };
    let mut child = spawned.map_err(|source| SpawnError {
        binary: inv.binary.clone(),
        source,
    })?;
    let spawn_time = t0.elapsed();
    let pid = child.id().expect("a freshly spawned child has a pid");
    let guardian = guardian.filter(|g| g.watch(pid as i32));
    let mut guard = GroupKillGuard {
        pgid: pid as i32,
        armed: true,
        guardian,
    };
    tracing::debug!(pid, command = %inv.display(), "spawned the Claude CLI");
    on_progress(Progress::Spawned {
        pid,
        start_ticks: super::orphan::process_start_ticks(pid),
    });

    // The prompt goes on stdin, which is then closed; a CLI that exits early breaks the pipe.
    let mut stdin = child.stdin.take().expect("stdin is piped");
    let prompt = inv.prompt.clone().into_bytes();
    tokio::spawn(async move {
        if let Err(e) = stdin.write_all(&prompt).await {
            tracing::debug!(pid, error = %e, "the Claude CLI did not read its whole prompt");
        }
        drop(stdin);
    });

    let (line_tx, mut lines) = mpsc::channel::<String>(256);
    let (exited_tx, exited_rx) = tokio::sync::watch::channel(false);
    if let Some(path) = inv.stdout_file.clone() {
        tokio::spawn(tail_lines(path, line_tx, exited_rx));
    } else {
        let stdout = child.stdout.take().expect("stdout is piped");
        tokio::spawn(async move {
            let mut reader = BufReader::new(stdout);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match reader.read_until(b'\n', &mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let line = String::from_utf8_lossy(&buf).into_owned();
                        if line_tx.send(line).await.is_err() {
                            break;
                        }
                    }
                }
            }
        });
    }

    let stderr = child.stderr.take().expect("stderr is piped");
    let stderr_limit = limits.stderr_tail_bytes;
    let stderr_task = tokio::spawn(read_tail(stderr, stderr_limit));

    let mut parser = StreamParser::new();
    let mut run = ParsedRun::default();
    let mut raw_stdout = Vec::new();
    let mut first_output = None;
    let mut handle_line =
        |line: String, run: &mut ParsedRun, on_progress: &mut dyn FnMut(Progress<'_>)| -> bool {
            let line = line.strip_suffix('\n').unwrap_or(&line).to_string();
            on_progress(Progress::Line(&line));
            let mut saw_result = false;
            for event in parser.feed_line(&line) {
                saw_result |= matches!(event, StreamEvent::Result(_));
                on_progress(Progress::Event(&event));
                run.apply(event);
            }
            raw_stdout.push(line);
            saw_result
        };

    let overall_deadline = tokio::time::Instant::from_std(t0 + limits.overall_timeout);
    let mut idle_deadline = tokio::time::Instant::now() + limits.no_output_timeout;
    let mut cancel_rx = cancel.0.subscribe();
    let mut exit_status: Option<ExitStatus> = None;
    let mut exited_after = Duration::ZERO;
    let mut drain_deadline = overall_deadline;
    let mut result_deadline: Option<tokio::time::Instant> = None;
    let mut stdout_open = true;
    let mut kill_reason: Option<Termination> = None;
    let connect_deadline = tokio::time::Instant::from_std(t0 + limits.connect_timeout);
    let mut connect_checked = false;

    while exit_status.is_none() || stdout_open {
        tokio::select! {
            biased;
            Ok(_) = cancel_rx.wait_for(|c| *c) => {
                kill_reason = Some(Termination::Cancelled);
                break;
            }
            line = lines.recv(), if stdout_open => match line {
                Some(line) => {
                    first_output.get_or_insert_with(|| t0.elapsed());
                    idle_deadline = tokio::time::Instant::now() + limits.no_output_timeout;
                    if handle_line(line, &mut run, &mut on_progress) && result_deadline.is_none() {
                        result_deadline = Some(tokio::time::Instant::now() + limits.linger_after_result);
                    }
                }
                None => stdout_open = false,
            },
            status = child.wait(), if exit_status.is_none() => {
                match status {
                    Ok(status) => exit_status = Some(status),
                    Err(e) => {
                        tracing::warn!(pid, error = %e, "could not wait for the Claude CLI; killing its process group");
                        kill_reason = Some(Termination::Signaled(libc::SIGKILL));
                        break;
                    }
                }
                exited_after = t0.elapsed();
                drain_deadline = tokio::time::Instant::now() + limits.drain_after_exit;
                let _ = exited_tx.send(true);
            }
            _ = sleep_until(overall_deadline) => {
                kill_reason = Some(Termination::OverallTimeout);
                break;
            }
            _ = sleep_until(connect_deadline), if !connect_checked && exit_status.is_none() && result_deadline.is_none() => {
                connect_checked = true;
                if only_connection_retries(&run) {
                    kill_reason = Some(Termination::ConnectTimeout);
                    break;
                }
            }
            _ = sleep_until(idle_deadline), if exit_status.is_none() && result_deadline.is_none() => {
                kill_reason = Some(Termination::NoOutputTimeout);
                break;
            }
            _ = sleep_until(result_deadline.unwrap_or(overall_deadline)), if exit_status.is_none() && result_deadline.is_some() => {
                kill_reason = Some(Termination::LingeredAfterResult);
                break;
            }
            _ = sleep_until(drain_deadline), if exit_status.is_some() => {
                tracing::debug!(pid, "stdout still open after the Claude CLI exited; a child of it holds the pipe");
                break;
            }
        }
    }

    if let Some(reason) = kill_reason
        && exit_status.is_none()
    {
        tracing::info!(pid, reason = ?reason, "killing the Claude CLI's process group");
        exit_status = terminate_group(pid as i32, &mut child, limits.kill_grace).await;
        exited_after = t0.elapsed();
    }
    // Whatever is left in the group (the CLI's `git`, `rg`, `ps` children) dies with the request.
    kill_rest_of_group(pid as i32, limits.kill_grace).await;
    guard.armed = false;
    // A tailed stdout file: read what the CLI wrote up to its end.
    let _ = exited_tx.send(true);
    if inv.stdout_file.is_some() {
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            while let Some(line) = lines.recv().await {
                handle_line(line, &mut run, &mut on_progress);
            }
        })
        .await;
    }

    // Lines printed before the end are still in the channel.
    while let Ok(line) = lines.try_recv() {
        handle_line(line, &mut run, &mut on_progress);
    }
    for event in parser.finish() {
        on_progress(Progress::Event(&event));
        run.apply(event);
    }
    let (stderr_tail, stderr_truncated) =
        match tokio::time::timeout(Duration::from_secs(1), stderr_task).await {
            Ok(Ok(tail)) => tail,
            _ => (String::new(), false),
        };

    let (exit_code, signal) = exit_status.map_or((None, None), |s| {
        use std::os::unix::process::ExitStatusExt;
        (s.code(), s.signal())
    });
    let termination = kill_reason.unwrap_or(match (exit_code, signal) {
        (Some(code), _) => Termination::Exited(code),
        (None, Some(sig)) => Termination::Signaled(sig),
        (None, None) => Termination::Signaled(0),
    });
    let failure = classify(Evidence {
        run: &run,
        stderr: &stderr_tail,
        termination,
    });
    match &failure {
        None => tracing::debug!(pid, "the Claude CLI run succeeded"),
        Some(f) => {
            tracing::info!(pid, class = %f.class, message = %f.message, "the Claude CLI run failed")
        }
    }
    Ok(AttemptOutcome {
        pid,
        started_at,
        termination,
        exit_code,
        signal,
        raw_stdout,
        stderr_tail,
        stderr_truncated,
        timings: AttemptTimings {
            first_output,
            spawn_to_exit: exited_after,
            spawn: spawn_time,
        },
        run,
        failure,
    })
}

/// Follows a file the CLI writes its stdout into, line by line, until the CLI has exited and
/// everything it wrote was read. The CLI's exit wakes it at once; while the CLI runs it polls
/// (1 ms at first, backing off to 25 ms while the CLI is silent): a regular file has no
/// readiness notification. Reads of a local regular file do not block, so they run right here
/// rather than on the blocking pool.
///
/// Not inotify: closing an inotify instance waits for an SRCU grace period (measured: 15-20 ms
/// of a runtime thread per call), and one instance per call made `ksi-host bench executor`
/// four times slower.
async fn tail_lines(
    path: std::path::PathBuf,
    tx: mpsc::Sender<String>,
    mut exited: tokio::sync::watch::Receiver<bool>,
) {
    use std::io::Read;
    let Ok(mut file) = std::fs::File::open(&path) else {
        tracing::warn!(file = %path.display(), "cannot read the Claude CLI's stdout file");
        return;
    };
    let mut pending: Vec<u8> = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut idle = Duration::from_millis(1);
    loop {
        // Looked at before reading: once the CLI exited, a read that finds nothing means all
        // of its output was read.
        let done = *exited.borrow_and_update();
        let n = file.read(&mut buf).unwrap_or(0);
        if n > 0 {
            idle = Duration::from_millis(1);
            pending.extend_from_slice(&buf[..n]);
            while let Some(i) = pending.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = pending.drain(..=i).collect();
                if tx
                    .send(String::from_utf8_lossy(&line).into_owned())
                    .await
                    .is_err()
                {
                    return;
                }
            }
            continue;
        }
        if done {
            if !pending.is_empty() {
                let _ = tx
                    .send(String::from_utf8_lossy(&pending).into_owned())
                    .await;
            }
            return;
        }
        tokio::select! {
            _ = exited.changed() => {}
            _ = tokio::time::sleep(idle) => {}
        }
        idle = (idle * 2).min(Duration::from_millis(25));
    }
}

/// SIGKILL what is left of group `pgid` after its leader was reaped, and wait up to `grace`
/// until none of it runs: a killed process takes a moment to die on a busy machine (the real
/// CLI leaves `rg` and `ps` children running when it exits early), and the request is not over
/// while one lives. One syscall when the group is already empty, the usual case.
async fn kill_rest_of_group(pgid: i32, grace: Duration) {
    if pgid <= 1 {
        return;
    }
    signal_group(pgid, libc::SIGKILL);
    let deadline = Instant::now() + grace;
    let mut pause = Duration::from_millis(1);
    // SAFETY: kill(2) with signal 0 only checks; ESRCH means not even a zombie is left.
    while unsafe { libc::kill(-pgid, 0) } == 0 {
        // Zombies only: they are dead, and their new parent (init) reaps them.
        let alive = super::orphan::group_members(pgid as u32);
        if alive.is_empty() {
            return;
        }
        if Instant::now() >= deadline {
            tracing::warn!(pgid, pids = ?alive, "processes of a Claude CLI's group are still alive after SIGKILL");
            return;
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(20));
    }
}

/// SIGTERM the group, wait up to `grace` for the leader, then SIGKILL the group and reap.
async fn terminate_group(
    pgid: i32,
    child: &mut tokio::process::Child,
    grace: Duration,
) -> Option<ExitStatus> {
    signal_group(pgid, libc::SIGTERM);
    if let Ok(Ok(status)) = tokio::time::timeout(grace, child.wait()).await {
        return Some(status);
    }
    signal_group(pgid, libc::SIGKILL);
    child.wait().await.ok()
}

/// Read a pipe to its end, keeping only the last `limit` bytes.
async fn read_tail(mut pipe: impl tokio::io::AsyncRead + Unpin, limit: usize) -> (String, bool) {
    let mut kept: Vec<u8> = Vec::new();
    let mut truncated = false;
    let mut chunk = [0u8; 8192];
    loop {
        match pipe.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                kept.extend_from_slice(&chunk[..n]);
                if kept.len() > limit.saturating_mul(2).max(8192) {
                    let excess = kept.len() - limit;
                    kept.drain(..excess);
                    truncated = true;
                }
            }
        }
    }
    if kept.len() > limit {
        let excess = kept.len() - limit;
        kept.drain(..excess);
        truncated = true;
    }
    (String::from_utf8_lossy(&kept).into_owned(), truncated)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The daemon spawns attempts on its runtime, so the future must be `Send`.
    #[test]
    fn an_attempt_future_can_be_spawned() {
        fn assert_send<T: Send>(_: &T) {}
        let inv = ClaudeInvocation::new("sonnet", "p");
        let limits = Limits::default();
        let cancel = CancelToken::new();
        let future = run_attempt(&inv, &limits, &cancel, |_| {});
        assert_send(&future);
    }

    #[test]
    fn a_cancel_token_is_shared_by_its_clones() {
        let token = CancelToken::new();
        let clone = token.clone();
        assert!(!clone.is_cancelled());
        token.cancel();
        assert!(clone.is_cancelled());
    }

    #[tokio::test]
    async fn the_stderr_tail_keeps_the_last_bytes() {
        let data = (0..50_000)
            .map(|i| (b'a' + (i % 26) as u8) as char)
            .collect::<String>();
        let (tail, truncated) = read_tail(data.as_bytes(), 100).await;
        assert!(truncated);
        assert_eq!(tail, data[data.len() - 100..]);
        let (all, truncated) = read_tail(&b"short"[..], 100).await;
        assert_eq!((all.as_str(), truncated), ("short", false));
    }
}
