//! The Claude executor against `fake-claude` (every fault) and, when installed, the real CLI.
//!
//! `fake-claude` is found through `CARGO_BIN_EXE_fake-claude`, which Cargo sets for integration
//! tests only and which guarantees the binary is built and current. The real CLI is found through
//! `KSI_REAL_CLAUDE_BIN`; without it the contract tests print a notice and pass, except on CI
//! (`CI=true`), where they fail.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};

use crate::support::group_leftovers;
use ksi_host::claude::stream::StreamEvent;
use ksi_host::claude::{
    AttemptOutcome, CancelToken, ClaudeInvocation, FailureClass, Limits, PermanentKind, Progress,
    RetryPolicy, SessionMode, Termination, TransientKind, run_attempt, run_with_retries,
};

const FAKE: &str = env!("CARGO_BIN_EXE_fake-claude");

fn fake(prompt: &str) -> ClaudeInvocation {
    let mut inv = ClaudeInvocation::new("sonnet", prompt);
    inv.binary = PathBuf::from(FAKE);
    inv
}

fn with_fault(prompt: &str, fault: &str) -> ClaudeInvocation {
    let mut inv = fake(prompt);
    inv.extra_env
        .push(("FAKE_CLAUDE_FAULT".into(), fault.into()));
    inv
}

fn quick_limits() -> Limits {
    Limits {
        overall_timeout: Duration::from_secs(20),
        no_output_timeout: Duration::from_secs(10),
        kill_grace: Duration::from_millis(500),
        ..Limits::default()
    }
}

async fn run(inv: &ClaudeInvocation, limits: &Limits) -> Result<AttemptOutcome> {
    Ok(run_attempt(inv, limits, &CancelToken::new(), |_| {}).await?)
}

/// Alive and not a zombie (a zombie is dead; only its parent's `wait` is missing).
fn is_alive(pid: u32) -> bool {
    // SAFETY: signal 0 only checks for existence.
    let exists = unsafe { libc::kill(pid as i32, 0) } == 0;
    exists
        && std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|stat| {
                let state = stat.rsplit_once(") ").map(|(_, rest)| rest.chars().next());
                state != Some(Some('Z'))
            })
            .unwrap_or(false)
}

/// Wait up to 2 s for a killed process to disappear (init may reap a grandchild a bit later).
async fn gone(pid: u32) -> bool {
    for _ in 0..40 {
        if !is_alive(pid) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

fn class(outcome: &AttemptOutcome) -> Option<FailureClass> {
    outcome.failure_class()
}

#[tokio::test]
async fn a_successful_call_reports_text_cost_tokens_and_session() -> Result<()> {
    let inv = fake("What is the capital of France?");
    let reported_pid = Arc::new(AtomicU32::new(0));
    let seen = reported_pid.clone();
    let mut lines = 0;
    let outcome = run_attempt(&inv, &quick_limits(), &CancelToken::new(), |p| match p {
        Progress::Spawned { pid, .. } => seen.store(pid, Ordering::SeqCst),
        Progress::Line(_) => lines += 1,
        Progress::Event(_) => {}
    })
    .await?;
    ensure!(outcome.succeeded(), "failure: {:?}", outcome.failure);
    assert_eq!(
        reported_pid.load(Ordering::SeqCst),
        outcome.pid,
        "pid reported at spawn"
    );
    assert_eq!(lines, outcome.raw_stdout.len());
    assert_eq!(outcome.termination, Termination::Exited(0));
    let result = outcome.result().context("a result")?;
    let text = result.text.as_deref().unwrap_or_default();
    assert!(text.starts_with("[simulated] Reply "), "{text}");
    assert_eq!(outcome.run.messages.len(), 1, "two lines, one message id");
    assert_eq!(outcome.run.messages[0].text, text);
    assert!(result.total_cost_usd.unwrap() > 0.0);
    assert!(result.usage.input > 0 && result.usage.output > 0);
    assert_eq!(result.usage.cache_creation, 4000);
    assert_eq!(result.session_id.as_deref(), outcome.run.session_id());
    assert!(outcome.timings.first_output.is_some());
    assert!(outcome.stderr_tail.is_empty());
    assert!(!is_alive(outcome.pid));
    Ok(())
}

#[tokio::test]
async fn the_same_prompt_model_and_session_give_the_same_answer() -> Result<()> {
    let session = "11111111-2222-4333-8444-555555555555";
    let mut first = fake("Same question");
    first.session = SessionMode::WithId(session.into());
    let mut again = fake("Same question");
    again.session = SessionMode::Resume(session.into());
    let a = run(&first, &quick_limits()).await?;
    let b = run(&again, &quick_limits()).await?;
    assert_eq!(a.run.session_id(), Some(session));
    assert_eq!(
        b.run.session_id(),
        Some(session),
        "--resume continues the session"
    );
    assert_eq!(a.run.final_text(), b.run.final_text());
    let resumed = b.result().unwrap().usage;
    assert_eq!(
        resumed.cache_read, 4000,
        "a resumed session reads the cache"
    );
    Ok(())
}

#[tokio::test]
async fn each_api_fault_is_classified_with_the_clis_message() -> Result<()> {
    use FailureClass::{Permanent, Transient};
    let cases = [
        (
            "auth",
            Permanent(PermanentKind::Authentication),
            "Invalid API key · Please run /login",
        ),
        (
            "billing",
            Permanent(PermanentKind::Billing),
            "Credit balance is too low",
        ),
        (
            "overloaded",
            Transient(TransientKind::Overloaded),
            "API Error: 529 Overloaded.",
        ),
        (
            "rate_limited",
            Transient(TransientKind::RateLimited),
            "API Error: 429",
        ),
        (
            "unknown_model",
            Permanent(PermanentKind::UnknownModel),
            "There's an issue with the selected model (claude-sonnet-4-5-20250929)",
        ),
        (
            "bad_resume",
            Permanent(PermanentKind::UnknownSession),
            "No conversation found with session ID: ",
        ),
    ];
    for (fault, expected, message) in cases {
        let outcome = run(&with_fault("hello", fault), &quick_limits()).await?;
        let failure = outcome
            .failure
            .as_ref()
            .with_context(|| format!("{fault} must fail"))?;
        assert_eq!(failure.class, expected, "{fault}");
        assert!(
            failure.message.starts_with(message),
            "{fault}: {}",
            failure.message
        );
        assert_eq!(outcome.exit_code, Some(1), "{fault}");
    }
    Ok(())
}

#[tokio::test]
async fn the_clis_own_api_retries_are_reported_as_progress() -> Result<()> {
    let mut retries = Vec::new();
    let outcome = run_attempt(
        &with_fault("hi", "overloaded"),
        &quick_limits(),
        &CancelToken::new(),
        |p| {
            if let Progress::Event(StreamEvent::ApiRetry(r)) = p {
                retries.push(r.attempt);
            }
        },
    )
    .await?;
    assert_eq!(retries, [Some(1), Some(2)]);
    assert_eq!(outcome.run.api_retries.len(), 2);
    Ok(())
}

#[tokio::test]
async fn a_crash_mid_stream_is_a_transient_crash_with_the_partial_text_kept() -> Result<()> {
    let outcome = run(&with_fault("hi", "crash"), &quick_limits()).await?;
    assert_eq!(
        class(&outcome),
        Some(FailureClass::Transient(TransientKind::Crash))
    );
    assert_eq!(outcome.termination, Termination::Signaled(libc::SIGABRT));
    assert!(outcome.run.final_text().unwrap().starts_with("[simulated]"));
    assert!(outcome.stderr_tail.contains("simulated crash"));
    Ok(())
}

#[tokio::test]
async fn exiting_without_a_result_line_is_a_transient_no_result() -> Result<()> {
    let outcome = run(&with_fault("hi", "no_result"), &quick_limits()).await?;
    assert_eq!(
        class(&outcome),
        Some(FailureClass::Transient(TransientKind::NoResult))
    );
    assert_eq!(outcome.exit_code, Some(0));
    Ok(())
}

#[tokio::test]
async fn garbage_between_the_lines_is_skipped_and_the_result_still_counts() -> Result<()> {
    let outcome = run(&with_fault("hi", "garbage"), &quick_limits()).await?;
    ensure!(outcome.succeeded(), "{:?}", outcome.failure);
    assert!(outcome.run.skipped.len() >= 3, "{:?}", outcome.run.skipped);
    assert!(
        outcome.raw_stdout.len() > outcome.run.skipped.len(),
        "raw lines are all kept"
    );
    assert!(outcome.result().unwrap().total_cost_usd.is_some());
    Ok(())
}

#[tokio::test]
async fn a_slow_cli_that_keeps_talking_is_not_a_no_output_timeout() -> Result<()> {
    let mut inv = with_fault("hi", "slow");
    inv.extra_env
        .push(("FAKE_CLAUDE_DELAY_MS".into(), "150".into()));
    let limits = Limits {
        no_output_timeout: Duration::from_millis(400),
        ..quick_limits()
    };
    let outcome = run(&inv, &limits).await?;
    ensure!(outcome.succeeded(), "{:?}", outcome.failure);
    assert!(outcome.timings.spawn_to_exit >= Duration::from_millis(450));
    Ok(())
}

#[tokio::test]
async fn a_slow_cli_past_the_overall_timeout_is_killed() -> Result<()> {
    let mut inv = with_fault("hi", "slow");
    inv.extra_env
        .push(("FAKE_CLAUDE_DELAY_MS".into(), "400".into()));
    let limits = Limits {
        overall_timeout: Duration::from_millis(600),
        ..quick_limits()
    };
    let outcome = run(&inv, &limits).await?;
    assert_eq!(
        class(&outcome),
        Some(FailureClass::Transient(TransientKind::OverallTimeout))
    );
    assert_eq!(outcome.termination, Termination::OverallTimeout);
    assert!(gone(outcome.pid).await);
    Ok(())
}

#[tokio::test]
async fn a_child_the_cli_leaves_running_is_dead_when_the_call_returns() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let pidfile = dir.path().join("grandchild.pid");
    let mut inv = fake("hi");
    inv.extra_env.push((
        "FAKE_CLAUDE_GRANDCHILD_PIDFILE".into(),
        pidfile.display().to_string(),
    ));
    let outcome = run(&inv, &quick_limits()).await?;
    assert!(outcome.succeeded(), "{:?}", outcome.failure);
    let grandchild: u32 = std::fs::read_to_string(&pidfile)?.trim().parse()?;
    // Checked at once, not after a wait: the call is not over while its group lives.
    assert!(!is_alive(grandchild), "the CLI's child outlived the call");
    let left = group_leftovers(outcome.pid);
    assert!(left.is_empty(), "left in the group: {left:?}");
    Ok(())
}

#[tokio::test]
async fn a_hang_is_killed_by_the_no_output_timeout_with_its_whole_process_group() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let pidfile = dir.path().join("grandchild.pid");
    let mut inv = with_fault("hi", "hang");
    inv.extra_env.push((
        "FAKE_CLAUDE_GRANDCHILD_PIDFILE".into(),
        pidfile.display().to_string(),
    ));
    let limits = Limits {
        no_output_timeout: Duration::from_millis(700),
        ..quick_limits()
    };
    let started = Instant::now();
    let outcome = run(&inv, &limits).await?;
    assert_eq!(
        class(&outcome),
        Some(FailureClass::Transient(TransientKind::NoOutputTimeout))
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(outcome.signal, Some(libc::SIGTERM), "TERM was enough");
    let grandchild: u32 = std::fs::read_to_string(&pidfile)?.trim().parse()?;
    assert!(gone(outcome.pid).await, "the CLI is gone");
    assert!(
        gone(grandchild).await,
        "its child in the same group is gone too"
    );
    let left = group_leftovers(outcome.pid);
    assert!(left.is_empty(), "left in the group: {left:?}");
    Ok(())
}

#[tokio::test]
async fn a_cli_that_ignores_sigterm_gets_sigkill_after_the_grace_period() -> Result<()> {
    let mut inv = with_fault("hi", "hang");
    inv.extra_env
        .push(("FAKE_CLAUDE_IGNORE_TERM".into(), "1".into()));
    let limits = Limits {
        no_output_timeout: Duration::from_millis(300),
        kill_grace: Duration::from_millis(300),
        ..quick_limits()
    };
    let outcome = run(&inv, &limits).await?;
    assert_eq!(outcome.termination, Termination::NoOutputTimeout);
    assert_eq!(outcome.signal, Some(libc::SIGKILL));
    assert!(gone(outcome.pid).await);
    Ok(())
}

#[tokio::test]
async fn a_cli_that_lingers_after_its_result_is_killed_and_the_result_counts() -> Result<()> {
    let limits = Limits {
        linger_after_result: Duration::from_millis(300),
        ..quick_limits()
    };
    let outcome = run(&with_fault("hi", "linger"), &limits).await?;
    ensure!(outcome.succeeded(), "{:?}", outcome.failure);
    assert_eq!(outcome.termination, Termination::LingeredAfterResult);
    assert!(outcome.result().unwrap().total_cost_usd.unwrap() > 0.0);
    assert!(gone(outcome.pid).await);
    Ok(())
}

#[tokio::test]
async fn cancelling_kills_the_process_group_and_is_not_retried() -> Result<()> {
    let cancel = CancelToken::new();
    let trigger = cancel.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        trigger.cancel();
    });
    let policy = RetryPolicy {
        max_attempts: 3,
        base_delay: Duration::from_millis(10),
        max_delay: Duration::from_millis(10),
    };
    let started = Instant::now();
    let retried = run_with_retries(
        &with_fault("hi", "hang"),
        &quick_limits(),
        &policy,
        &cancel,
        |_, _| {},
    )
    .await;
    assert!(started.elapsed() < Duration::from_secs(3));
    assert_eq!(retried.attempts.len(), 1);
    let outcome = retried.last().unwrap();
    assert_eq!(
        class(outcome),
        Some(FailureClass::Permanent(PermanentKind::Cancelled))
    );
    assert!(gone(outcome.pid).await);
    Ok(())
}

#[tokio::test]
async fn dropping_a_running_attempt_kills_its_process_group() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let pidfile = dir.path().join("grandchild.pid");
    let mut inv = with_fault("hi", "hang");
    inv.extra_env.push((
        "FAKE_CLAUDE_GRANDCHILD_PIDFILE".into(),
        pidfile.display().to_string(),
    ));
    let pid = Arc::new(AtomicU32::new(0));
    let seen = pid.clone();
    let limits = quick_limits();
    let cancel = CancelToken::new();
    let attempt = run_attempt(&inv, &limits, &cancel, |p| {
        if let Progress::Spawned { pid, .. } = p {
            seen.store(pid, Ordering::SeqCst);
        }
    });
    // The timeout drops the attempt's future while the CLI hangs.
    let dropped = tokio::time::timeout(Duration::from_millis(800), attempt).await;
    assert!(dropped.is_err(), "the hang was still running");
    let pid = pid.load(Ordering::SeqCst);
    assert!(pid > 0);
    assert!(gone(pid).await, "no process outlives its request");
    let grandchild: u32 = std::fs::read_to_string(&pidfile)?.trim().parse()?;
    assert!(gone(grandchild).await);
    Ok(())
}

#[tokio::test]
async fn a_transient_fault_once_is_retried_and_then_succeeds() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let log = dir.path().join("invocations.jsonl");
    let mut inv = with_fault("retry me", "overloaded");
    inv.extra_env.push((
        "FAKE_CLAUDE_FAULT_ONCE".into(),
        dir.path().join("once").display().to_string(),
    ));
    inv.extra_env
        .push(("FAKE_CLAUDE_LOG".into(), log.display().to_string()));
    let policy = RetryPolicy {
        max_attempts: 3,
        base_delay: Duration::from_millis(20),
        max_delay: Duration::from_millis(50),
    };
    let retried = run_with_retries(
        &inv,
        &quick_limits(),
        &policy,
        &CancelToken::new(),
        |_, _| {},
    )
    .await;
    assert!(retried.succeeded());
    assert_eq!(retried.attempts.len(), 2);
    assert_eq!(
        class(&retried.attempts[0]),
        Some(FailureClass::Transient(TransientKind::Overloaded))
    );
    assert_eq!(
        std::fs::read_to_string(&log)?.lines().count(),
        2,
        "exactly two invocations"
    );
    Ok(())
}

#[tokio::test]
async fn a_permanent_failure_is_not_retried() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let log = dir.path().join("invocations.jsonl");
    let mut inv = with_fault("hi", "auth");
    inv.extra_env
        .push(("FAKE_CLAUDE_LOG".into(), log.display().to_string()));
    let retried = run_with_retries(
        &inv,
        &quick_limits(),
        &RetryPolicy::default(),
        &CancelToken::new(),
        |_, _| {},
    )
    .await;
    assert!(!retried.succeeded());
    assert_eq!(retried.attempts.len(), 1);
    let entry: serde_json::Value = serde_json::from_str(std::fs::read_to_string(&log)?.trim())?;
    assert_eq!(entry["fault"], "auth");
    assert_eq!(entry["args"][0], "-p");
    Ok(())
}

#[tokio::test]
async fn an_unknown_flag_is_an_invalid_flags_failure_with_the_clis_text() -> Result<()> {
    let mut inv = fake("hi");
    inv.extra_args = vec!["--no-such-flag".into()];
    let outcome = run(&inv, &quick_limits()).await?;
    let failure = outcome.failure.context("must fail")?;
    assert_eq!(
        failure.class,
        FailureClass::Permanent(PermanentKind::InvalidFlags)
    );
    assert!(
        failure
            .message
            .starts_with("error: unknown option '--no-such-flag'")
    );
    Ok(())
}

#[tokio::test]
async fn a_missing_binary_is_a_permanent_spawn_error() -> Result<()> {
    let mut inv = fake("hi");
    inv.binary = PathBuf::from("/nonexistent/claude");
    let err = run_attempt(&inv, &quick_limits(), &CancelToken::new(), |_| {})
        .await
        .expect_err("cannot spawn");
    assert_eq!(
        err.failure_class(),
        FailureClass::Permanent(PermanentKind::ExecutableUnavailable)
    );
    assert!(err.to_string().contains("/nonexistent/claude"));
    Ok(())
}

/// The real CLI, when `KSI_REAL_CLAUDE_BIN` names it.
mod real_cli {
    use super::*;

    fn real_binary() -> Option<PathBuf> {
        let path = PathBuf::from(std::env::var_os("KSI_REAL_CLAUDE_BIN")?);
        if path.exists() {
            Some(path)
        } else {
            eprintln!("KSI_REAL_CLAUDE_BIN={} does not exist", path.display());
            None
        }
    }

    /// Skips a contract test without the real CLI; on CI (`CI=true`, set by `.ci/run`, which
    /// installs the CLI) its absence is a failure, so the contract cannot go untested unseen.
    fn skip_notice(test: &str) {
        let msg = format!("{test}: set KSI_REAL_CLAUDE_BIN to a real `claude` binary to run it");
        assert!(
            !std::env::var("CI").is_ok_and(|v| v == "true"),
            "{msg} (.ci/run installs it from npm on a CI machine)"
        );
        eprintln!("SKIPPED {msg}");
    }

    /// The real CLI with nothing from our environment: an empty HOME, no credentials.
    fn isolated(binary: PathBuf, home: &std::path::Path) -> ClaudeInvocation {
        let mut inv = ClaudeInvocation::new("sonnet", "Say hello.");
        inv.binary = binary;
        inv.inherit_env = false;
        inv.working_dir = Some(home.to_path_buf());
        inv.extra_env = vec![
            ("PATH".into(), "/usr/local/bin:/usr/bin:/bin".into()),
            ("HOME".into(), home.display().to_string()),
            ("LANG".into(), "C.UTF-8".into()),
        ];
        inv
    }

    #[tokio::test]
    async fn without_credentials_the_real_cli_fails_permanently_on_authentication_once()
    -> Result<()> {
        let Some(binary) = real_binary() else {
            skip_notice(
                "without_credentials_the_real_cli_fails_permanently_on_authentication_once",
            );
            return Ok(());
        };
        let home = tempfile::tempdir()?;
        let inv = isolated(binary, home.path());
        let limits = Limits {
            overall_timeout: Duration::from_secs(60),
            no_output_timeout: Duration::from_secs(30),
            ..Limits::default()
        };
        let policy = RetryPolicy {
            max_attempts: 3,
            base_delay: Duration::from_millis(10),
            max_delay: Duration::from_millis(10),
        };
        let retried =
            run_with_retries(&inv, &limits, &policy, &CancelToken::new(), |_, _| {}).await;
        let failures: Vec<String> = retried
            .attempts
            .iter()
            .map(|a| format!("{:?} (stderr {:?})", a.failure, a.stderr_tail))
            .collect();
        assert_eq!(retried.attempts.len(), 1, "no retry storm: {failures:?}");
        let outcome = retried.last().unwrap();
        let failure = outcome.failure.as_ref().context("must fail")?;
        eprintln!(
            "real CLI without credentials: {failure}; stderr={:?}",
            outcome.stderr_tail
        );
        assert_eq!(
            failure.class,
            FailureClass::Permanent(PermanentKind::Authentication)
        );
        assert!(
            failure.message.contains("Please run /login") || failure.message.contains("API key"),
            "{}",
            failure.message
        );
        assert!(gone(outcome.pid).await, "the CLI is gone");
        let left = group_leftovers(outcome.pid);
        assert!(left.is_empty(), "left in the CLI's group: {left:?}");
        Ok(())
    }

    #[tokio::test]
    async fn with_a_fake_key_and_no_network_the_real_cli_is_stopped_by_a_timeout() -> Result<()> {
        let Some(binary) = real_binary() else {
            skip_notice("with_a_fake_key_and_no_network_the_real_cli_is_stopped_by_a_timeout");
            return Ok(());
        };
        let home = tempfile::tempdir()?;
        let mut inv = isolated(binary, home.path());
        inv.extra_env
            .push(("ANTHROPIC_API_KEY".into(), "fake".into()));
        // "No network" on any machine: the API address is a closed local port.
        inv.extra_env
            .push(("ANTHROPIC_BASE_URL".into(), "http://127.0.0.1:9".into()));
        let limits = Limits {
            overall_timeout: Duration::from_secs(15),
            no_output_timeout: Duration::from_secs(5),
            kill_grace: Duration::from_secs(3),
            ..Limits::default()
        };
        let started = Instant::now();
        let outcome = run(&inv, &limits).await?;
        let failure = outcome.failure.as_ref().context("must fail")?;
        eprintln!(
            "real CLI with a fake key and no network: {failure} after {:?}; {} API retries; stdout lines {}",
            started.elapsed(),
            outcome.run.api_retries.len(),
            outcome.raw_stdout.len()
        );
        assert!(
            matches!(
                failure.class,
                FailureClass::Transient(
                    TransientKind::NoOutputTimeout | TransientKind::OverallTimeout
                )
            ),
            "{failure}"
        );
        assert!(failure.class.is_retryable());
        assert!(started.elapsed() < Duration::from_secs(20));
        assert!(gone(outcome.pid).await, "the CLI is gone");
        let left = group_leftovers(outcome.pid);
        assert!(left.is_empty(), "left in the CLI's group: {left:?}");
        Ok(())
    }
}

/// `fake-claude` behaves like the real CLI where KSI depends on it.
mod fake_cli_fidelity {
    use super::*;
    use ksi_host::claude::ParsedRun;
    use std::io::Write;
    use std::process::{Command, Stdio};

    fn fake_cli(args: &[&str], stdin: &str) -> Result<std::process::Output> {
        let mut child = Command::new(FAKE)
            .args(args)
            .env_remove("CLAUDECODE")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        // A CLI that refuses its flags exits without reading stdin: a broken pipe is expected.
        match child.stdin.take().unwrap().write_all(stdin.as_bytes()) {
            Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => return Err(e.into()),
            _ => {}
        }
        Ok(child.wait_with_output()?)
    }

    #[test]
    fn a_variadic_tool_list_swallows_the_positional_prompt() -> Result<()> {
        let out = fake_cli(&["--print", "--allowedTools", "Bash", "my prompt"], "")?;
        assert_eq!(out.status.code(), Some(1));
        let stderr = String::from_utf8(out.stderr)?;
        assert!(stderr.starts_with(
            "Error: Input must be provided either through stdin or as a prompt argument when using --print"
        ));
        Ok(())
    }

    #[test]
    fn stream_json_without_verbose_is_refused_with_the_real_text() -> Result<()> {
        let out = fake_cli(&["-p", "--output-format", "stream-json"], "hi")?;
        assert_eq!(out.status.code(), Some(1));
        assert!(String::from_utf8(out.stderr)?.starts_with(
            "Error: When using --print, --output-format=stream-json requires --verbose"
        ));
        Ok(())
    }

    #[test]
    fn json_verbose_prints_one_array_that_parses_like_the_stream() -> Result<()> {
        let session = "11111111-2222-4333-8444-000000000001";
        let common = [
            "-p",
            "--verbose",
            "--session-id",
            session,
            "--model",
            "haiku",
        ];
        let array = fake_cli(&[&common[..], &["--output-format", "json"]].concat(), "hi")?;
        let stream = fake_cli(
            &[&common[..], &["--output-format", "stream-json"]].concat(),
            "hi",
        )?;
        let array = String::from_utf8(array.stdout)?;
        assert!(array.starts_with('[') && array.lines().count() == 1);
        let from_array = ParsedRun::from_stdout(&array);
        let from_stream = ParsedRun::from_stdout(&String::from_utf8(stream.stdout)?);
        assert_eq!(from_array.final_text(), from_stream.final_text());
        assert_eq!(from_array.session_id(), Some(session));
        assert_eq!(from_array.messages, from_stream.messages);
        Ok(())
    }

    #[test]
    fn every_answer_says_it_is_simulated() -> Result<()> {
        for fault in [
            "",
            "auth",
            "billing",
            "overloaded",
            "rate_limited",
            "unknown_model",
        ] {
            let out = Command::new(FAKE)
                .args(["-p", "--output-format", "stream-json", "--verbose"])
                .env("FAKE_CLAUDE_FAULT", fault)
                .env_remove("CLAUDECODE")
                .stdin(Stdio::null())
                .arg("a prompt")
                .output()?;
            let run = ParsedRun::from_stdout(&String::from_utf8(out.stdout)?);
            let text = run.final_text().unwrap_or_default();
            assert!(text.contains("simulated"), "{fault}: {text}");
        }
        Ok(())
    }
}
