//! The Claude executor service end to end: rows, retries, sessions, budgets, loop detector,
//! concurrency, recovery after a daemon crash, with `fake-claude` (and the real CLI when
//! `KSI_REAL_CLAUDE_BIN` is set).

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use ksi_host::bus::Bus;
use ksi_host::claude::executor::{ProcessRow, get_process};
use ksi_host::claude::{Executor, ExecutorConfig, Limits, RetryPolicy};
use ksi_host::refs::Refs;
use ksi_host::settings;
use ksi_host::store::{Store, StoreOptions};
use ksi_host::workflow::{ClaudeApi, ClaudeRequest};
use serde_json::{Value, json};

use crate::support::bin;

const FAKE: &str = env!("CARGO_BIN_EXE_fake-claude");

struct Fixture {
    dir: tempfile::TempDir,
    store: Store,
    bus: Bus,
    refs: Refs,
    exec: Executor,
    log: PathBuf,
}

fn base_config(log: &Path, env: &[(&str, &str)]) -> ExecutorConfig {
    let mut c = ExecutorConfig {
        binary: PathBuf::from(FAKE),
        limits: Limits {
            overall_timeout: Duration::from_secs(20),
            no_output_timeout: Duration::from_secs(2),
            kill_grace: Duration::from_millis(300),
            ..Limits::default()
        },
        retry: RetryPolicy {
            max_attempts: 3,
            base_delay: Duration::from_millis(10),
            max_delay: Duration::from_millis(50),
        },
        ..ExecutorConfig::default()
    };
    c.spend.spawn_rate_per_min = 0.0;
    c.spend.max_concurrency = 8;
    c.extra_env = vec![("FAKE_CLAUDE_LOG".to_string(), log.display().to_string())];
    for (k, v) in env {
        c.extra_env.push((k.to_string(), v.to_string()));
    }
    c
}

fn open(dir: &Path) -> Result<(Store, Bus, Refs)> {
    let store = Store::open_path(&dir.join("ksi.db"), &StoreOptions::default())?;
    let refs = Refs::open(dir)?;
    Ok((store.clone(), Bus::new(store), refs))
}

fn fixture(env: &[(&str, &str)]) -> Result<Fixture> {
    fixture_with(env, |_| {})
}

fn fixture_with(env: &[(&str, &str)], tweak: impl FnOnce(&mut ExecutorConfig)) -> Result<Fixture> {
    let dir = tempfile::tempdir()?;
    let log = dir.path().join("fake-claude.log");
    let (store, bus, refs) = open(dir.path())?;
    let mut config = base_config(&log, env);
    tweak(&mut config);
    let exec = Executor::new(store.clone(), bus.clone(), refs.clone(), config);
    Ok(Fixture {
        dir,
        store,
        bus,
        refs,
        exec,
        log,
    })
}

fn req(prompt: &str) -> ClaudeRequest {
    ClaudeRequest {
        prompt: prompt.into(),
        ..ClaudeRequest::default()
    }
}

fn agent_req(agent: &str, prompt: &str) -> ClaudeRequest {
    ClaudeRequest {
        prompt: prompt.into(),
        agent: Some(agent.into()),
        ..ClaudeRequest::default()
    }
}

fn invocations(log: &Path) -> Vec<Value> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn row(f: &Fixture, id: &str) -> ProcessRow {
    get_process(&f.store, id).unwrap().expect("the process row")
}

fn row_opt(f: &Fixture, id: &str) -> Option<ProcessRow> {
    get_process(&f.store, id).unwrap()
}

fn count(store: &Store, sql: &str) -> i64 {
    store
        .read(|c| {
            c.query_row(sql, [], |r| r.get::<_, i64>(0))
                .map_err(ksi_host::store::StoreError::from)
        })
        .unwrap()
}

async fn run_fault(
    fault: &str,
    once: bool,
) -> Result<(Fixture, ProcessRow, Result<String, String>)> {
    let marker_dir = tempfile::tempdir()?;
    let marker = marker_dir.path().join("once");
    let marker = marker.display().to_string();
    let mut env = vec![("FAKE_CLAUDE_FAULT", fault)];
    if once {
        env.push(("FAKE_CLAUDE_FAULT_ONCE", marker.as_str()));
    }
    let f = fixture(&env)?;
    let id = format!("fault-{fault}");
    let out = f
        .exec
        .complete(id.clone(), None, req(&format!("a call with fault {fault}")))
        .await;
    let r = row(&f, &id);
    drop(marker_dir);
    Ok((
        f,
        r,
        out.map(|a| a.text)
            .map_err(|e| format!("{}: {}", e.class, e.message)),
    ))
}

#[tokio::test]
async fn a_successful_call_walks_pending_running_completed_with_files_and_events() -> Result<()> {
    let f = fixture(&[])?;
    let sub = f
        .bus
        .subscribe("watch", "claude.>", Default::default())
        .await?;
    let answer = f
        .exec
        .complete("ok-1".into(), None, req("Hello there"))
        .await;
    let answer = answer.map_err(|e| anyhow::anyhow!("{e:?}"))?;
    assert!(answer.text.starts_with("[simulated]"), "{}", answer.text);
    assert!(answer.cost_usd > 0.0 && answer.tokens_in > 0 && answer.tokens_out > 0);
    let r = row(&f, "ok-1");
    assert_eq!(r.status, "COMPLETED");
    assert_eq!(r.attempts, 1);
    assert!(r.pid.is_some() && r.pid_start_ticks.is_some());
    assert_eq!(r.session_id.as_deref(), Some(answer.session_id.as_str()));
    // The prompt moved to the archive; the row points there and the queue is empty.
    let prompt = r.prompt_file.clone().context("prompt ref")?;
    assert_eq!(prompt.path, "prompts/archive/ok-1.txt");
    assert_eq!(f.refs.read(&prompt)?, b"Hello there");
    assert!(!f.dir.path().join("prompts/queue/ok-1.txt").exists());
    // The response: result line referenced in claude_logs/<session>.jsonl, envelope after it.
    let resp = answer.response_ref.clone().context("response ref")?;
    assert_eq!(
        resp.path,
        format!("claude_logs/{}.jsonl", answer.session_id)
    );
    let line: Value = serde_json::from_slice(&f.refs.read(&resp)?)?;
    assert_eq!(line["type"], "result");
    let log = std::fs::read_to_string(f.dir.path().join(&resp.path))?;
    let last: Value = serde_json::from_str(log.lines().last().unwrap())?;
    assert_eq!(last["type"], "ksi_envelope");
    assert_eq!(last["process_id"], "ok-1");
    // latest.jsonl is re-pointed just after the call, off its path.
    let want = PathBuf::from(format!("{}.jsonl", answer.session_id));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let latest = loop {
        let now = std::fs::read_link(f.dir.path().join("claude_logs/latest.jsonl")).ok();
        if now.as_ref() == Some(&want) || std::time::Instant::now() > deadline {
            break now;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    assert_eq!(latest, Some(want));
    assert!(
        std::fs::read_dir(f.dir.path().join("claude_logs/pending"))?
            .next()
            .is_none(),
        "the pending log is gone"
    );
    // Events: request, started, complete — references only.
    let got = f.bus.claim(&sub, "t", 10).await?;
    let topics: Vec<&str> = got.iter().map(|d| d.event.topic.as_str()).collect();
    assert_eq!(
        topics,
        [
            "claude.spawn.request",
            "claude.spawn.started",
            "claude.spawn.complete"
        ]
    );
    let done = &got[2].event.data;
    assert_eq!(done["response"]["path"], json!(resp.path));
    assert!(
        done.get("text").is_none(),
        "events carry references, not text"
    );
    Ok(())
}

/// (fault, final status, attempts, error class, a piece of the CLI's message)
const FAULTS: &[(&str, &str, u32, &str, &str)] = &[
    ("hang", "DEAD", 3, "transient.no_output_timeout", ""),
    ("crash", "DEAD", 3, "transient.crash", ""),
    ("no_result", "DEAD", 3, "transient.no_result", ""),
    ("overloaded", "DEAD", 3, "transient.overloaded", "529"),
    (
        "rate_limited",
        "DEAD",
        3,
        "transient.rate_limited",
        "rate limit for your organization",
    ),
    (
        "auth",
        "FAILED",
        1,
        "permanent.authentication",
        "Invalid API key",
    ),
    (
        "billing",
        "FAILED",
        1,
        "permanent.billing",
        "Credit balance is too low",
    ),
    (
        "unknown_model",
        "FAILED",
        1,
        "permanent.unknown_model",
        "issue with the selected model",
    ),
    ("bad_resume", "FAILED", 1, "permanent.unknown_session", ""),
];

#[tokio::test]
async fn the_clis_run_below_the_daemons_cpu_priority_as_claude_nice_says() -> Result<()> {
    // SAFETY: getpriority has no preconditions.
    let daemon = unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) };
    let f = fixture(&[])?;
    f.exec
        .complete("nice-default".into(), None, req("at the default priority"))
        .await
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    settings::set(&f.store, "claude.nice", json!(3), None).await?;
    f.exec
        .complete("nice-3".into(), None, req("three steps below"))
        .await
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    settings::set(&f.store, "claude.nice", json!(0), None).await?;
    f.exec
        .complete("nice-0".into(), None, req("level with the daemon"))
        .await
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let seen: Vec<i64> = invocations(&f.log)
        .iter()
        .map(|i| i["nice"].as_i64().unwrap())
        .collect();
    let below = |n: i32| i64::from((daemon + n).min(19));
    assert_eq!(seen, vec![below(10), below(3), below(0)]);
    // SAFETY: as above.
    assert_eq!(
        unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) },
        daemon,
        "the daemon's own priority is unchanged"
    );
    Ok(())
}

#[tokio::test]
async fn every_fault_ends_in_the_right_status_attempts_and_class() -> Result<()> {
    let mut tasks = Vec::new();
    for &(fault, status, attempts, class, msg) in FAULTS {
        tasks.push(tokio::spawn(async move {
            let (f, r, out) = run_fault(fault, false).await?;
            ensure!(
                r.status == status,
                "{fault}: status {} ({:?})",
                r.status,
                r.error
            );
            ensure!(r.attempts == attempts, "{fault}: {} attempts", r.attempts);
            ensure!(
                r.error_class.as_deref() == Some(class),
                "{fault}: class {:?}",
                r.error_class
            );
            let err = out.err().context("the call failed")?;
            ensure!(
                err.contains(msg),
                "{fault}: the CLI's message is kept: {err}"
            );
            ensure!(
                r.error.as_deref().unwrap_or_default().contains(msg),
                "{fault}: row error {:?}",
                r.error
            );
            ensure!(
                invocations(&f.log).len() == attempts as usize,
                "{fault}: one CLI run per attempt"
            );
            Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(())
}

#[tokio::test]
async fn slow_and_garbage_outputs_still_complete_in_one_attempt() -> Result<()> {
    for fault in ["slow", "garbage"] {
        let (_f, r, out) = run_fault(fault, false).await?;
        assert_eq!(r.status, "COMPLETED", "{fault}: {:?}", r.error);
        assert_eq!(r.attempts, 1, "{fault}");
        assert!(out.is_ok(), "{fault}: {out:?}");
    }
    Ok(())
}

#[tokio::test]
async fn a_transient_fault_that_happens_once_is_retried_then_completed() -> Result<()> {
    let mut tasks = Vec::new();
    for fault in ["hang", "crash", "no_result", "overloaded", "rate_limited"] {
        tasks.push(tokio::spawn(async move {
            let (f, r, out) = run_fault(fault, true).await?;
            ensure!(r.status == "COMPLETED", "{fault}: {} {:?}", r.status, r.error);
            ensure!(r.attempts == 2, "{fault}: {} attempts", r.attempts);
            ensure!(out.is_ok(), "{fault}: {out:?}");
            ensure!(invocations(&f.log).len() == 2, "{fault}");
            let retries = count(
                &f.store,
                "SELECT COUNT(*) FROM messages WHERE topic = 'claude.spawn.failed' AND data LIKE '%\"RETRY\"%'",
            );
            ensure!(retries == 1, "{fault}: one RETRY event");
            Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(())
}

#[tokio::test]
async fn an_agents_second_call_resumes_its_session_and_the_session_survives_a_restart() -> Result<()>
{
    let f = fixture(&[])?;
    let a1 = f
        .exec
        .complete("a-1".into(), None, agent_req("alice", "first"))
        .await
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let a2 = f
        .exec
        .complete("a-2".into(), None, agent_req("alice", "second"))
        .await
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let calls = invocations(&f.log);
    let args = |i: usize| -> Vec<String> {
        serde_json::from_value(calls[i]["args"].clone()).unwrap_or_default()
    };
    assert!(!args(0).contains(&"--resume".to_string()), "{:?}", args(0));
    let a = args(1);
    let i = a.iter().position(|x| x == "--resume").context("--resume")?;
    assert_eq!(
        a[i + 1],
        a1.session_id,
        "the second call resumes the first's session"
    );
    let agent = f
        .store
        .read(|c| {
            ksi_host::claude::agents::get(c, "alice").map_err(ksi_host::store::StoreError::from)
        })?
        .context("agent row")?;
    assert_eq!(
        agent.current_session_id.as_deref(),
        Some(a2.session_id.as_str())
    );
    assert_eq!(agent.workdir.as_deref(), Some("agents/alice"));
    assert!(f.dir.path().join("agents/alice").is_dir());

    // Reopen everything (a restart): the third call resumes the second's session.
    let dir = f.dir.path().to_path_buf();
    let log = f.log.clone();
    f.store.close();
    drop(f.exec);
    let (store, bus, refs) = open(&dir)?;
    let exec = Executor::new(store.clone(), bus, refs, base_config(&log, &[]));
    exec.complete("a-3".into(), None, agent_req("alice", "third"))
        .await
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let calls = invocations(&log);
    let a: Vec<String> = serde_json::from_value(calls[2]["args"].clone())?;
    let i = a.iter().position(|x| x == "--resume").context("--resume")?;
    assert_eq!(a[i + 1], a2.session_id);
    Ok(())
}

#[tokio::test]
async fn an_agents_inbox_messages_are_prepended_to_its_next_turn_once() -> Result<()> {
    let f = fixture(&[])?;
    f.exec
        .complete("i-1".into(), None, agent_req("bob", "hello"))
        .await
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    ksi_host::claude::agents::send(&f.bus, "bob", "the meeting moved to 3pm", Some("carol"))
        .await
        .map_err(anyhow::Error::msg)?;
    f.exec
        .complete("i-2".into(), None, agent_req("bob", "what changed?"))
        .await
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let p2 = row(&f, "i-2").prompt_file.context("prompt")?;
    let text = String::from_utf8(f.refs.read(&p2)?)?;
    assert!(
        text.contains("the meeting moved to 3pm") && text.ends_with("what changed?"),
        "{text}"
    );
    f.exec
        .complete("i-3".into(), None, agent_req("bob", "anything else?"))
        .await
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let p3 = row(&f, "i-3").prompt_file.context("prompt")?;
    assert_eq!(f.refs.read(&p3)?, b"anything else?", "read once");
    Ok(())
}

async fn loop_until_refused(f: &Fixture, prefix: &str, max: usize) -> Result<(usize, String)> {
    for i in 0..max {
        match f
            .exec
            .complete(
                format!("{prefix}-{i}"),
                None,
                req(&format!("{prefix} call {i}")),
            )
            .await
        {
            Ok(_) => {}
            Err(e) => return Ok((i, format!("{}|{}", e.class, e.message))),
        }
    }
    anyhow::bail!("never refused")
}

#[tokio::test]
async fn a_call_budget_stops_the_loop_at_exactly_n_calls() -> Result<()> {
    let f = fixture(&[])?;
    settings::set(&f.store, "claude.budget.global_calls", json!(4), None).await?;
    let (made, err) = loop_until_refused(&f, "budget", 20).await?;
    assert_eq!(made, 4);
    assert!(
        err.starts_with("budget|") && err.contains("global budget is exhausted"),
        "{err}"
    );
    assert_eq!(invocations(&f.log).len(), 4, "CLI runs");
    assert_eq!(
        count(
            &f.store,
            "SELECT COUNT(*) FROM processes WHERE status = 'COMPLETED'"
        ),
        4
    );
    assert_eq!(
        count(
            &f.store,
            "SELECT COUNT(*) FROM processes WHERE error_class = 'budget' AND attempts = 0"
        ),
        1
    );
    let ev = f.bus.latest(Some("claude.budget.exhausted"), 5)?;
    assert_eq!(ev.len(), 1);
    assert_eq!(ev[0].data["unit"], "calls");
    assert_eq!(ev[0].data["limit"], 4.0);
    Ok(())
}

#[tokio::test]
async fn a_usd_budget_stops_the_loop_once_the_spend_reaches_it() -> Result<()> {
    // Real money (simulated cost never counts against a budget).
    let f = paid_fixture(&[])?;
    let first = f
        .exec
        .complete("usd-first".into(), None, req("usd probe"))
        .await
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let c = first.cost_usd;
    // Allowed while the settled spend is below the limit: 1 (probe) + 2 more, then refused.
    settings::set(&f.store, "claude.budget.global_usd", json!(c * 2.5), None).await?;
    let (made, err) = loop_until_refused(&f, "usd", 20).await?;
    assert_eq!(made, 2, "{err}");
    assert!(err.starts_with("budget|"), "{err}");
    assert_eq!(invocations(&f.log).len(), 3);
    assert_eq!(
        count(
            &f.store,
            "SELECT COUNT(*) FROM processes WHERE status = 'COMPLETED'"
        ),
        3
    );
    let ev = f.bus.latest(Some("claude.budget.exhausted"), 5)?;
    assert_eq!(ev[0].data["unit"], "usd");
    Ok(())
}

#[tokio::test]
async fn the_same_prompt_repeated_too_often_is_refused_as_a_loop() -> Result<()> {
    let f = fixture(&[])?;
    settings::set(&f.store, "claude.loop.max_repeats", json!(3), None).await?;
    for i in 0..3 {
        f.exec
            .complete(
                format!("loop-{i}"),
                None,
                agent_req("looper", "do it again"),
            )
            .await
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    }
    let err = f
        .exec
        .complete("loop-3".into(), None, agent_req("looper", "do it again"))
        .await
        .err()
        .context("the fourth identical prompt is refused")?;
    assert_eq!(err.class, "loop_detected");
    assert!(!err.transient);
    assert_eq!(invocations(&f.log).len(), 3);
    // A different prompt from the same agent still runs.
    f.exec
        .complete("loop-4".into(), None, agent_req("looper", "something new"))
        .await
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    Ok(())
}

#[tokio::test]
async fn identical_calls_asked_at_once_are_counted_before_any_of_them_is_recorded() -> Result<()> {
    let f = fixture_with(&[("FAKE_CLAUDE_DELAY_MS", "200")], |c| {
        c.spend.max_concurrency = 16
    })?;
    settings::set(&f.store, "claude.loop.max_repeats", json!(3), None).await?;
    let calls: Vec<_> = (0..8)
        .map(|i| {
            f.exec
                .complete(format!("burst-{i}"), None, req("the same prompt at once"))
        })
        .collect();
    let outcomes = futures_util::future::join_all(calls).await;
    let refused = outcomes
        .iter()
        .filter(|o| o.as_ref().is_err_and(|e| e.class == "loop_detected"))
        .count();
    let answered = outcomes.iter().filter(|o| o.is_ok()).count();
    assert_eq!((answered, refused), (3, 5), "{outcomes:?}");
    assert_eq!(invocations(&f.log).len(), 3, "refused calls start no CLI");
    assert_eq!(
        count(
            &f.store,
            "SELECT COUNT(*) FROM processes WHERE error_class = 'loop_detected' AND status = 'FAILED'"
        ),
        5,
        "every refused call is recorded"
    );
    Ok(())
}

#[tokio::test]
async fn a_call_waiting_for_a_slot_has_its_prompt_recorded_while_it_waits() -> Result<()> {
    // The prompt of a call that starts at once is written beside its CLI; one that waits for
    // its turn is recorded whole while it waits, so a daemon that dies meanwhile resumes it.
    let f = fixture_with(&[("FAKE_CLAUDE_DELAY_MS", "500")], |c| {
        c.spend.max_concurrency = 1
    })?;
    // `complete` (a workflow's call) does not wait for its prompt to be recorded, as `spawn` does.
    let call = |id: &'static str, prompt: &'static str| {
        let exec = f.exec.clone();
        tokio::spawn(async move { exec.complete(id.into(), None, req(prompt)).await })
    };
    let (first, waiting) = ("slot-first", "slot-waiting");
    let first_call = call(first, "the one that runs");
    while row_opt(&f, first).and_then(|r| r.pid).is_none() {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let waiting_call = call(waiting, "the one that waits");
    let deadline = Instant::now() + Duration::from_secs(10);
    let r = loop {
        let r = row_opt(&f, waiting);
        if r.as_ref().is_some_and(|r| r.prompt_file.is_some()) || Instant::now() > deadline {
            break r.context("the waiting call has a row")?;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(r.status, "PENDING", "still waiting for the slot: {r:?}");
    assert_eq!(r.pid, None);
    let prompt = r
        .prompt_file
        .context("the waiting call's prompt is recorded")?;
    assert_eq!(f.refs.read(&prompt)?, b"the one that waits");
    assert_eq!(row(&f, first).status, "RUNNING");
    for c in [first_call, waiting_call] {
        c.await?.map_err(|e| anyhow::anyhow!("{e:?}"))?;
    }
    Ok(())
}

#[tokio::test]
async fn never_more_than_the_concurrency_limit_run_at_once() -> Result<()> {
    let f = fixture_with(&[("FAKE_CLAUDE_DELAY_MS", "120")], |c| {
        c.spend.max_concurrency = 2
    })?;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let (store, exec, stop) = (f.store.clone(), f.exec.clone(), stop.clone());
        tokio::spawn(async move {
            let mut max_rows = 0;
            let mut max_slots = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                max_rows = max_rows.max(count(
                    &store,
                    "SELECT COUNT(*) FROM processes WHERE status = 'RUNNING'",
                ));
                max_slots = max_slots.max(exec.running());
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            (max_rows, max_slots)
        })
    };
    let mut tasks = Vec::new();
    for i in 0..6 {
        let exec = f.exec.clone();
        tasks.push(tokio::spawn(async move {
            exec.complete(format!("conc-{i}"), None, req(&format!("parallel {i}")))
                .await
        }));
    }
    for t in tasks {
        t.await?.map_err(|e| anyhow::anyhow!("{e:?}"))?;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (max_rows, max_slots) = sampler.await?;
    assert!(
        max_rows <= 2 && max_slots <= 2,
        "rows {max_rows}, slots {max_slots}"
    );
    assert_eq!(max_slots, 2, "the limit was reached");
    // From the CLI's own log: starts never overlap more than 2 deep (each run > 4 x 120 ms).
    let mut starts: Vec<i64> = invocations(&f.log)
        .iter()
        .map(|v| v["time_unix_ms"].as_i64().unwrap())
        .collect();
    starts.sort();
    assert_eq!(starts.len(), 6);
    for w in starts.windows(3) {
        assert!(
            w[2] - w[0] >= 100,
            "three runs started within {} ms",
            w[2] - w[0]
        );
    }
    Ok(())
}

/// Runs fake-claude directly and returns its stdout lines (to plant them as a dead daemon's log).
fn fake_stdout(prompt: &str) -> Result<Vec<String>> {
    let mut child = Command::new(FAKE)
        .args([
            "-p",
            "--output-format",
            "stream-json",
            "--verbose",
            "--model",
            "sonnet",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    use std::io::Write;
    child.stdin.take().unwrap().write_all(prompt.as_bytes())?;
    let out = child.wait_with_output()?;
    Ok(String::from_utf8(out.stdout)?
        .lines()
        .map(str::to_string)
        .collect())
}

async fn plant_running_row(f: &Fixture, id: &str, lines: &[String]) -> Result<()> {
    let rel = format!("claude_logs/pending/{id}.1.jsonl");
    let path = f.dir.path().join(&rel);
    std::fs::create_dir_all(path.parent().unwrap())?;
    std::fs::write(&path, lines.join("\n") + "\n")?;
    f.refs
        .write(&format!("prompts/queue/{id}.txt"), b"planted")?;
    let id = id.to_string();
    f.store
        .write(move |tx| {
            tx.execute(
                "INSERT INTO processes(id, status, model, attempts, max_attempts, stream_file, pid, created_at, updated_at, started_at)
                 VALUES (?1, 'RUNNING', 'sonnet', 1, 3, ?2, 999999, 1, 1, 1)",
                rusqlite::params![id, rel],
            )?;
            Ok::<_, ksi_host::store::StoreError>(())
        })
        .await?;
    Ok(())
}

#[tokio::test]
async fn recover_returns_the_answer_of_a_process_left_running_whose_result_is_on_disk() -> Result<()>
{
    let f = fixture(&[])?;
    let lines = fake_stdout("answered before the crash")?;
    plant_running_row(&f, "rec-1", &lines).await?;
    let answer = f.exec.recover("rec-1".into()).await.context("recovered")?;
    assert!(answer.text.starts_with("[simulated]"), "{}", answer.text);
    assert!(answer.cost_usd > 0.0);
    let r = row(&f, "rec-1");
    assert_eq!(r.status, "COMPLETED");
    assert_eq!(r.session_id.as_deref(), Some(answer.session_id.as_str()));
    assert_eq!(invocations(&f.log).len(), 0, "not run again");
    // Asking again gives the same answer from the row.
    let again = f.exec.recover("rec-1".into()).await.context("again")?;
    assert_eq!(again.text, answer.text);

    // Without a result line: nothing to recover, and the row is not left RUNNING.
    plant_running_row(&f, "rec-2", &lines[..1]).await?;
    assert!(f.exec.recover("rec-2".into()).await.is_none());
    assert_eq!(row(&f, "rec-2").status, "DEAD");
    Ok(())
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit_once(") ")
                .map(|(_, r)| !r.starts_with('Z'))
                .unwrap_or(false)
        })
        .unwrap_or(false)
}

#[test]
fn a_sigkilled_daemon_leaves_no_claude_process_and_no_running_row_and_its_calls_resume()
-> Result<()> {
    let dir = tempfile::tempdir()?;
    let data = dir.path();
    let log = data.join("fake.log");
    let mut child = Command::new(bin("ksi-host"))
        .arg("--data-dir")
        .arg(data)
        .args(["--log-level", "warn", "dev", "spawn-many", "--n", "5"])
        .env("KSI_CLAUDE_BIN", FAKE)
        .env("FAKE_CLAUDE_DELAY_MS", "3000")
        .env("FAKE_CLAUDE_LOG", &log)
        .env_remove("KSI_DATA_DIR")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    let stdout = child.stdout.take().unwrap();
    let mut running = BTreeSet::new();
    let mut lines = BufReader::new(stdout).lines();
    let deadline = Instant::now() + Duration::from_secs(30);
    while running.len() < 5 && Instant::now() < deadline {
        let Some(line) = lines.next() else { break };
        if let Some(rest) = line?.strip_prefix("RUNNING ") {
            running.insert(rest.to_string());
        }
    }
    assert_eq!(running.len(), 5, "5 calls running");
    // A RUNNING row names a spawned CLI; the CLI logs its invocation a moment later (it runs
    // below the daemon's priority).
    let logged_by = Instant::now() + Duration::from_secs(10);
    while invocations(&log).len() < 5 && Instant::now() < logged_by {
        std::thread::sleep(Duration::from_millis(20));
    }
    let pids: Vec<u32> = invocations(&log)
        .iter()
        .map(|v| v["pid"].as_u64().unwrap() as u32)
        .collect();
    assert_eq!(pids.len(), 5);
    assert!(
        pids.iter().all(|p| alive(*p)),
        "the CLIs run while the daemon dies"
    );
    child.kill()?; // SIGKILL
    child.wait()?;
    // The guardian kills them at once, before any restart.
    let gone_by = Instant::now() + Duration::from_secs(5);
    while pids.iter().any(|p| alive(*p)) && Instant::now() < gone_by {
        std::thread::sleep(Duration::from_millis(20));
    }
    for p in &pids {
        assert!(!alive(*p), "fake-claude {p} outlived the SIGKILLed daemon");
    }

    let out = Command::new(bin("ksi-host"))
        .arg("--data-dir")
        .arg(data)
        .args(["--log-level", "warn", "dev", "reconcile", "--json"])
        .env_remove("KSI_DATA_DIR")
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout)?;
    std::thread::sleep(Duration::from_millis(300));
    for p in &pids {
        assert!(!alive(*p), "fake-claude {p} survived; report {report}");
    }
    let (store, _, _) = open(data)?;
    assert_eq!(
        count(
            &store,
            "SELECT COUNT(*) FROM processes WHERE status IN ('RUNNING', 'PENDING', 'SUCCESS')"
        ),
        0
    );
    assert_eq!(
        count(
            &store,
            "SELECT COUNT(*) FROM processes WHERE status = 'RETRY'"
        ),
        5,
        "{report}"
    );
    // The guardian killed them when the daemon died: nothing was left alive for the start-up
    // reconciliation to kill (unreaped zombies do not count).
    assert_eq!(
        report["killed_pids"].as_array().map(Vec::len),
        Some(0),
        "{report}"
    );

    // A restarted daemon runs the interrupted calls again from their queued prompts.
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let (store, bus, refs) = open(data)?;
        let exec = Executor::new(store.clone(), bus, refs, base_config(&log, &[]));
        let resumed = exec.resume_retries().await?;
        assert_eq!(resumed.len(), 5);
        for id in &resumed {
            let a = exec.wait(id).await.map_err(|e| anyhow::anyhow!("{e:?}"))?;
            assert!(a.text.starts_with("[simulated]"));
            let r = get_process(&store, id)?.context("row")?;
            assert_eq!((r.status.as_str(), r.attempts), ("COMPLETED", 2));
        }
        anyhow::Ok(())
    })?;
    Ok(())
}

/// The real CLI through the executor, when `KSI_REAL_CLAUDE_BIN` names it.
mod real_cli {
    use super::*;

    fn real() -> Option<PathBuf> {
        let p = PathBuf::from(std::env::var_os("KSI_REAL_CLAUDE_BIN")?);
        p.exists().then_some(p)
    }

    fn real_fixture(
        binary: PathBuf,
        env: &[(&str, &str)],
        limits: Limits,
        attempts: u32,
    ) -> Result<Fixture> {
        let home = tempfile::tempdir()?.keep();
        let mut f = fixture_with(&[], |c| {
            c.binary = binary;
            c.limits = limits;
            c.retry.max_attempts = attempts;
            c.inherit_env = false;
        })?;
        // Nothing from our environment: an empty HOME, no credentials.
        let mut extra: Vec<(String, String)> = vec![
            ("PATH".into(), "/usr/local/bin:/usr/bin:/bin".into()),
            ("HOME".into(), home.display().to_string()),
            ("LANG".into(), "C.UTF-8".into()),
        ];
        for (k, v) in env {
            extra.retain(|(n, _)| n != k);
            extra.push((k.to_string(), v.to_string()));
        }
        let mut config = f.exec.config().clone();
        config.extra_env = extra;
        f.exec = Executor::new(f.store.clone(), f.bus.clone(), f.refs.clone(), config);
        Ok(f)
    }

    /// Without the real CLI the test passes with a notice, except on CI (`CI=true`, set by
    /// `.ci/run`, which installs it), where it fails.
    fn skipped() -> Result<()> {
        anyhow::ensure!(
            !std::env::var("CI").is_ok_and(|v| v == "true"),
            "KSI_REAL_CLAUDE_BIN is not set: .ci/run installs the real CLI from npm on a CI machine"
        );
        eprintln!("SKIPPED: set KSI_REAL_CLAUDE_BIN to run the real-CLI executor tests");
        Ok(())
    }

    #[tokio::test]
    async fn without_credentials_the_real_cli_fails_once_permanently_on_authentication()
    -> Result<()> {
        let Some(binary) = real() else {
            return skipped();
        };
        let limits = Limits {
            overall_timeout: Duration::from_secs(60),
            no_output_timeout: Duration::from_secs(30),
            kill_grace: Duration::from_millis(500),
            ..Limits::default()
        };
        let f = real_fixture(binary, &[], limits, 3)?;
        let err = f
            .exec
            .complete("real-auth".into(), None, req("Say hi"))
            .await
            .err()
            .context("fails without credentials")?;
        let r = row(&f, "real-auth");
        assert_eq!(r.status, "FAILED", "{r:?}");
        assert_eq!(r.attempts, 1);
        assert_eq!(
            r.error_class.as_deref(),
            Some("permanent.authentication"),
            "{r:?}"
        );
        assert!(!err.transient);
        assert!(
            !r.error.unwrap_or_default().is_empty(),
            "the CLI's message is kept"
        );
        Ok(())
    }

    #[tokio::test]
    async fn with_a_fake_key_and_no_network_the_real_cli_is_stopped_by_a_timeout_and_killed()
    -> Result<()> {
        let Some(binary) = real() else {
            return skipped();
        };
        let limits = Limits {
            overall_timeout: Duration::from_secs(8),
            no_output_timeout: Duration::from_secs(4),
            kill_grace: Duration::from_millis(500),
            ..Limits::default()
        };
        let f = real_fixture(
            binary,
            &[
                ("ANTHROPIC_API_KEY", "fake"),
                ("ANTHROPIC_BASE_URL", "http://127.0.0.1:9"),
            ],
            limits,
            2,
        )?;
        let err = f
            .exec
            .complete("real-timeout".into(), None, req("Say hi"))
            .await
            .err()
            .context("no network: fails")?;
        let r = row(&f, "real-timeout");
        assert!(err.transient, "{err:?}");
        assert_eq!(r.status, "DEAD", "{r:?}");
        assert_eq!(r.attempts, 2);
        assert!(
            r.error_class
                .as_deref()
                .unwrap_or_default()
                .contains("timeout"),
            "{r:?}"
        );
        let pid = r.pid.unwrap() as u32;
        let left = crate::support::group_leftovers(pid);
        assert!(left.is_empty(), "the group is killed, but left: {left:?}");
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_executor_benchmark_reports_overhead_throughput_and_memory() -> Result<()> {
    // KSI_BENCH_DIR=/dev/shm measures KSI's own cost without the disk's fsync latency.
    let dir = match std::env::var_os("KSI_BENCH_DIR") {
        Some(d) => tempfile::tempdir_in(d)?,
        None => tempfile::tempdir()?,
    };
    let calls = std::env::var("KSI_BENCH_CALLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    let r = ksi_host::bench::bench_executor(dir.path(), Path::new(FAKE), calls, 2, None).await?;
    eprintln!("bench executor: {r}");
    assert_eq!(r["calls"], json!(calls));
    assert_eq!(r["rounds"], json!(2));
    let rounds = r["round_overhead_p50_ms"]
        .as_array()
        .context("per-round p50s")?;
    assert_eq!(rounds.len(), 2, "{r}");
    assert!(
        rounds.iter().all(|v| v.as_f64().is_some_and(|v| v > 0.0)),
        "{r}"
    );
    for key in ["overhead_p50_ms", "calls_per_s", "rss_mb"] {
        assert!(r[key].as_f64().is_some_and(|v| v > 0.0), "{key}: {r}");
    }
    Ok(())
}

#[tokio::test]
async fn cancel_kills_the_process_group_and_ends_the_call_failed() -> Result<()> {
    let f = fixture(&[("FAKE_CLAUDE_FAULT", "hang")])?;
    let id = f
        .exec
        .spawn(req("hang until cancelled"))
        .await
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let pid = loop {
        if let Some(pid) = row(&f, &id).pid {
            break pid as u32;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert!(f.exec.cancel(&id));
    let err = f.exec.wait(&id).await.err().context("cancelled")?;
    assert_eq!(err.class, "permanent.cancelled");
    let r = row(&f, &id);
    assert_eq!((r.status.as_str(), r.attempts), ("FAILED", 1));
    assert!(!alive(pid));
    let left = crate::support::group_leftovers(pid);
    assert!(left.is_empty(), "left in the group: {left:?}");
    Ok(())
}

#[tokio::test]
async fn ps_cost_sessions_and_transcript_read_back_what_the_executor_recorded() -> Result<()> {
    use ksi_host::cli::claude as cli;
    // Real money: simulated cost is reported apart (see the simulated-cost test).
    let f = paid_fixture(&[])?;
    for (i, prompt) in ["What is 2+2?", "And times 3?"].iter().enumerate() {
        f.exec
            .complete(format!("cli-{i}"), None, agent_req("dana", prompt))
            .await
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    }
    let ps = ksi_host::claude::executor::list_processes(&f.store, None, 10)?;
    assert_eq!(ps.len(), 2);
    assert!(cli::render_ps(&ps).contains("cli-1"));
    let cost = cli::cost(&f.store)?;
    assert_eq!(cost.total.calls, 2);
    assert!(cost.total.cost_usd > 0.0);
    assert_eq!(cost.by_agent[0].key, "dana");
    // Grouped by the model that answered (the request asked for the alias `sonnet`).
    assert_eq!(cost.by_model[0].key, "claude-sonnet-4-5-20250929");
    let sessions = cli::sessions(&f.store)?;
    assert_eq!(
        sessions.len(),
        1,
        "the second call resumed the first's session"
    );
    assert_eq!(sessions[0].turns, 2);
    assert_eq!(sessions[0].agent_id.as_deref(), Some("dana"));
    let t = cli::session_transcript(&f.refs, &sessions[0].session_id)?;
    let kinds: Vec<&str> = t.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(
        kinds,
        [
            "prompt",
            "assistant",
            "result",
            "prompt",
            "assistant",
            "result"
        ],
        "{t:?}"
    );
    assert_eq!(t[0].text, "What is 2+2?");
    assert_eq!(t[3].text, "And times 3?");
    assert!(cli::render_transcript(&t).contains("[simulated]"));
    let agents = ksi_host::claude::agents::list(&f.store)?;
    assert_eq!(agents[0].metrics["calls"], 2);
    assert_eq!(agents[0].status, "active");
    Ok(())
}

#[test]
fn a_result_printed_before_the_daemon_died_is_completed_from_the_log_not_paid_twice() -> Result<()>
{
    let dir = tempfile::tempdir()?;
    let data = dir.path();
    let log = data.join("fake.log");
    // `linger`: the CLI prints its whole answer, then does not exit; the daemon dies meanwhile.
    let mut child = Command::new(bin("ksi-host"))
        .arg("--data-dir")
        .arg(data)
        .args(["--log-level", "warn", "dev", "spawn-many", "--n", "2"])
        .env("KSI_CLAUDE_BIN", FAKE)
        .env("FAKE_CLAUDE_FAULT", "linger")
        .env("FAKE_CLAUDE_LOG", &log)
        .env_remove("KSI_DATA_DIR")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()?;
    let pending = data.join("claude_logs/pending");
    let deadline = Instant::now() + Duration::from_secs(20);
    let results_on_disk = || {
        std::fs::read_dir(&pending)
            .map(|d| {
                d.flatten()
                    .filter(|e| {
                        std::fs::read_to_string(e.path())
                            .is_ok_and(|t| t.contains("\"type\":\"result\""))
                    })
                    .count()
            })
            .unwrap_or(0)
    };
    while results_on_disk() < 2 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        results_on_disk(),
        2,
        "both results reached the pending logs"
    );
    let pids: Vec<u32> = invocations(&log)
        .iter()
        .map(|v| v["pid"].as_u64().unwrap() as u32)
        .collect();
    assert_eq!(pids.len(), 2);
    assert!(pids.iter().all(|p| alive(*p)), "the CLIs linger");
    child.kill()?;
    child.wait()?;
    // The guardian kills the lingering CLIs at once, before any restart.
    let gone_by = Instant::now() + Duration::from_secs(5);
    while pids.iter().any(|p| alive(*p)) && Instant::now() < gone_by {
        std::thread::sleep(Duration::from_millis(20));
    }
    for p in &pids {
        assert!(!alive(*p), "fake-claude {p} outlived the SIGKILLed daemon");
    }

    let out = Command::new(bin("ksi-host"))
        .arg("--data-dir")
        .arg(data)
        .args(["--log-level", "warn", "dev", "reconcile", "--json"])
        .env_remove("KSI_DATA_DIR")
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(
        report["completed"].as_array().map(Vec::len),
        Some(2),
        "{report}"
    );
    assert_eq!(
        report["killed_pids"].as_array().map(Vec::len),
        Some(0),
        "nothing left alive to kill: {report}"
    );
    let (store, bus, refs) = open(data)?;
    assert_eq!(
        count(
            &store,
            "SELECT COUNT(*) FROM processes WHERE status = 'COMPLETED'"
        ),
        2
    );
    assert_eq!(invocations(&log).len(), 2, "nothing ran twice");
    let exec = Executor::new(store.clone(), bus, refs, base_config(&log, &[]));
    let rt = tokio::runtime::Runtime::new()?;
    for id in report["completed"].as_array().unwrap() {
        let id = id.as_str().unwrap().to_string();
        let a = rt
            .block_on(exec.recover(id))
            .context("the recorded answer")?;
        assert!(a.text.starts_with("[simulated]"), "{}", a.text);
        assert!(a.cost_usd > 0.0);
    }
    Ok(())
}

#[tokio::test]
async fn workflow_and_agent_profile_budgets_are_separate_from_each_other() -> Result<()> {
    let f = fixture(&[])?;
    settings::set(&f.store, "claude.budget.workflow_calls", json!(2), None).await?;
    let profiles = f.dir.path().join("agents/profiles");
    std::fs::create_dir_all(&profiles)?;
    std::fs::write(
        profiles.join("frugal.toml"),
        "model = \"haiku\"\nrole = \"saves money\"\nbudget_calls = 1\n",
    )?;
    for i in 0..2 {
        f.exec
            .complete(
                format!("w1-{i}"),
                Some("w1".into()),
                req(&format!("step {i}")),
            )
            .await
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    }
    let err = f
        .exec
        .complete("w1-2".into(), Some("w1".into()), req("step 2"))
        .await
        .err()
        .context("w1 is over its budget")?;
    assert!(
        err.message.contains("workflow w1 budget"),
        "{}",
        err.message
    );
    f.exec
        .complete("w2-0".into(), Some("w2".into()), req("other workflow"))
        .await
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    // The profile's budget (1 call) and model apply to its agent.
    let a = f
        .exec
        .complete("frugal-0".into(), None, agent_req("frugal", "one"))
        .await
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    assert!(a.model.contains("haiku"), "{}", a.model);
    let err = f
        .exec
        .complete("frugal-1".into(), None, agent_req("frugal", "two"))
        .await
        .err()
        .context("the agent is over its budget")?;
    assert_eq!(err.class, "budget");
    assert!(
        err.message.contains("agent frugal budget"),
        "{}",
        err.message
    );
    assert_eq!(invocations(&f.log).len(), 4);
    Ok(())
}

#[tokio::test]
async fn timeouts_and_retries_follow_the_config_table_at_run_time() -> Result<()> {
    let f = fixture(&[("FAKE_CLAUDE_FAULT", "hang")])?;
    settings::set(&f.store, "claude.timeout.no_output_secs", json!(0.3), None).await?;
    settings::set(&f.store, "claude.retry.max_attempts", json!(1), None).await?;
    let started = Instant::now();
    let err = f
        .exec
        .complete("cfg-1".into(), None, req("hang"))
        .await
        .err()
        .context("times out")?;
    assert_eq!(err.class, "transient.no_output_timeout");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    let r = row(&f, "cfg-1");
    assert_eq!(
        (r.status.as_str(), r.attempts, r.max_attempts),
        ("DEAD", 1, 1)
    );
    Ok(())
}

#[tokio::test]
async fn archived_prompts_older_than_the_retention_are_pruned() -> Result<()> {
    let f = fixture(&[])?;
    f.exec
        .complete("prune-1".into(), None, req("to be pruned"))
        .await
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let archived = f.dir.path().join("prompts/archive/prune-1.txt");
    assert!(archived.exists());
    assert_eq!(
        f.exec.prune_archive(),
        0,
        "kept within the default retention"
    );
    settings::set(
        &f.store,
        "claude.prompts.archive_retention_secs",
        json!(0),
        None,
    )
    .await?;
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(f.exec.prune_archive(), 1);
    assert!(!archived.exists());
    Ok(())
}

#[tokio::test]
async fn an_agent_whose_session_the_cli_lost_starts_a_new_one_on_its_next_call() -> Result<()> {
    let f = fixture(&[])?;
    f.exec
        .complete("lost-0".into(), None, agent_req("erin", "hello"))
        .await
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let broken = Executor::new(
        f.store.clone(),
        f.bus.clone(),
        f.refs.clone(),
        base_config(&f.log, &[("FAKE_CLAUDE_FAULT", "bad_resume")]),
    );
    let err = broken
        .complete("lost-1".into(), None, agent_req("erin", "again"))
        .await
        .err()
        .context("bad resume")?;
    assert_eq!(err.class, "permanent.unknown_session");
    f.exec
        .complete("lost-2".into(), None, agent_req("erin", "fresh start"))
        .await
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let calls = invocations(&f.log);
    let args: Vec<String> = serde_json::from_value(calls[2]["args"].clone())?;
    assert!(!args.contains(&"--resume".to_string()), "{args:?}");
    Ok(())
}

#[tokio::test]
async fn shutdown_kills_running_clis_and_leaves_their_rows_for_reconcile() -> Result<()> {
    let f = fixture(&[("FAKE_CLAUDE_FAULT", "hang")])?;
    let id = f
        .exec
        .spawn(req("hang until shutdown"))
        .await
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let pid = loop {
        if let Some(pid) = row(&f, &id).pid {
            break pid as u32;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(f.exec.shutdown().await, 1);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!alive(pid), "the CLI died with the call");
    assert_eq!(row(&f, &id).status, "RUNNING");
    let report = f.exec.reconcile().await?;
    assert_eq!(report.retry, vec![id.clone()]);
    assert_eq!(row(&f, &id).status, "RETRY");
    Ok(())
}

#[tokio::test]
async fn a_call_whose_daemon_died_before_its_prompt_was_saved_ends_dead_and_says_to_ask_again()
-> Result<()> {
    let f = fixture(&[])?;
    // What a daemon killed between the PENDING commit and the prompt's leaves behind.
    f.store
        .write(|tx| {
            tx.execute(
                "INSERT INTO processes(id, status, model, attempts, max_attempts, prompt_sha256, created_at, updated_at)
                 VALUES ('unsaved-1', 'PENDING', 'sonnet', 0, 3, 'abc', 1, 1)",
                [],
            )?;
            Ok::<_, ksi_host::store::StoreError>(())
        })
        .await?;
    let report = f.exec.reconcile().await?;
    assert_eq!(report.dead, vec!["unsaved-1".to_string()]);
    let r = row(&f, "unsaved-1");
    assert_eq!(r.status, "DEAD");
    assert!(
        r.error
            .as_deref()
            .unwrap_or_default()
            .contains("ask for it again"),
        "{r:?}"
    );
    assert!(f.exec.resume_retries().await?.is_empty());
    assert_eq!(invocations(&f.log).len(), 0, "nothing was run");
    Ok(())
}

/// The lines of a JSONL file.
fn jsonl_lines(path: &Path) -> Result<Vec<String>> {
    Ok(std::fs::read_to_string(path)?
        .lines()
        .map(str::to_string)
        .collect())
}

/// What a power loss just after the answer can leave of a completed call: its relaxed COMPLETED
/// commit undone (the row RUNNING again, as its durable RUNNING commit left it, naming the
/// session the CLI was asked for unless `forget_session`: a row from before KSI recorded it)
/// while the answer's lines are durable in the session log and its pending log is gone.
async fn undo_completed(f: &Fixture, id: &str, forget_session: bool) -> Result<()> {
    let (id, pending, queued) = (
        id.to_string(),
        format!("claude_logs/pending/{id}.1.jsonl"),
        format!(
            "{{\"path\":\"prompts/queue/{id}.txt\",\"sha256\":\"{}\",\"bytes\":0}}",
            "0".repeat(64)
        ),
    );
    f.store
        .write(move |tx| {
            tx.execute(
                "UPDATE processes SET status = 'RUNNING',
                    session_id = CASE WHEN ?4 THEN NULL ELSE session_id END, response_file = NULL,
                    response_line = NULL, response_sha256 = NULL, cost_usd = NULL, tokens_in = NULL,
                    tokens_out = NULL, tokens_cache_read = NULL, tokens_cache_write = NULL,
                    num_turns = NULL, metrics = NULL, completed_at = NULL, stream_file = ?2,
                    counted_attempt = 0, resolved_model = NULL, model_usage = NULL,
                    prompt_file = ?3 WHERE id = ?1",
                rusqlite::params![id, pending, queued, forget_session],
            )?;
            Ok::<_, ksi_host::store::StoreError>(())
        })
        .await?;
    Ok(())
}

#[tokio::test]
async fn an_answer_whose_completed_commit_a_power_loss_undid_is_found_in_its_session_log()
-> Result<()> {
    for (id, forget_session) in [("pl-1", false), ("pl-2", true)] {
        answer_found_after_power_loss(id, forget_session)
            .await
            .with_context(|| format!("{id}, row without its session: {forget_session}"))?;
    }
    Ok(())
}

async fn answer_found_after_power_loss(id: &str, forget_session: bool) -> Result<()> {
    // A CLI that takes a few hundred ms (as a real one takes seconds): its RUNNING commit is on
    // disk before it answers.
    let f = fixture(&[("FAKE_CLAUDE_DELAY_MS", "100")])?;
    let first = f
        .exec
        .complete(id.into(), None, req("answered just before the power went"))
        .await
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    // The RUNNING commit was durable long before the CLI answered, so COMPLETED did not hold
    // the answer back for the disk.
    let metrics = row(&f, id).metrics.context("metrics")?;
    assert_eq!(metrics["completed_commit"], "durable_after_answer");
    let resp = first.response_ref.clone().context("response ref")?;
    let log = f.dir.path().join(&resp.path);
    let lines_before = jsonl_lines(&log)?;
    assert!(
        !f.dir
            .path()
            .join(format!("claude_logs/pending/{id}.1.jsonl"))
            .exists()
    );

    undo_completed(&f, id, forget_session).await?;
    // The daemon starts again: reconciliation completes the call from the session log.
    let (store, bus, refs) = open(f.dir.path())?;
    let exec = Executor::new(store.clone(), bus, refs, base_config(&f.log, &[]));
    let report = exec.reconcile().await?;
    assert_eq!(report.completed, vec![id.to_string()], "{report:?}");
    assert!(
        report.retry.is_empty() && report.dead.is_empty(),
        "{report:?}"
    );
    let r = get_process(&store, id)?.context("row")?;
    assert_eq!(r.status, "COMPLETED");
    assert_eq!(r.session_id.as_deref(), Some(first.session_id.as_str()));
    assert_eq!(r.response_file.as_deref(), Some(resp.path.as_str()));
    assert_eq!(r.response_line, resp.line.map(|l| l as i64));
    assert_eq!(r.response_sha256.as_deref(), Some(resp.sha256.as_str()));
    assert!((r.cost_usd.unwrap_or(0.0) - first.cost_usd).abs() < 1e-12);
    // Not run again, and the log holds the answer once.
    assert_eq!(invocations(&f.log).len(), 1);
    assert_eq!(jsonl_lines(&log)?, lines_before);
    let answer = exec.recover(id.to_string()).await.context("answer")?;
    assert_eq!(answer.text, first.text);
    // The prompt is where the row now says.
    let prompt = r.prompt_file.context("prompt ref")?;
    assert_eq!(prompt.path, format!("prompts/archive/{id}.txt"));
    assert_eq!(
        f.refs.read(&prompt)?,
        b"answered just before the power went"
    );
    Ok(())
}

#[tokio::test]
async fn a_daemon_that_died_after_logging_an_answer_does_not_log_it_twice() -> Result<()> {
    let f = fixture(&[])?;
    let first = f
        .exec
        .complete("twice-1".into(), None, req("logged once"))
        .await
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let resp = first.response_ref.clone().context("response ref")?;
    let log = f.dir.path().join(&resp.path);
    let lines_before = jsonl_lines(&log)?;
    // The daemon died after the session log's append, before its commit and before the pending
    // log went: the pending log still holds the CLI's lines.
    let raw: Vec<String> = lines_before
        .iter()
        .filter(|l| !l.contains("\"ksi_envelope\""))
        .cloned()
        .collect();
    undo_completed(&f, "twice-1", false).await?;
    let pending = f.dir.path().join("claude_logs/pending/twice-1.1.jsonl");
    std::fs::write(&pending, raw.join("\n") + "\n")?;

    let (store, bus, refs) = open(f.dir.path())?;
    let exec = Executor::new(store.clone(), bus, refs, base_config(&f.log, &[]));
    let report = exec.reconcile().await?;
    assert_eq!(report.completed, vec!["twice-1".to_string()], "{report:?}");
    let r = get_process(&store, "twice-1")?.context("row")?;
    assert_eq!(r.status, "COMPLETED");
    assert_eq!(r.response_line, resp.line.map(|l| l as i64));
    assert_eq!(
        jsonl_lines(&log)?,
        lines_before,
        "the answer is in the log once"
    );
    assert!(
        !pending.exists(),
        "the pending log goes once the row references the session log"
    );
    assert_eq!(invocations(&f.log).len(), 1);
    Ok(())
}

#[tokio::test]
async fn a_new_conversation_gets_its_session_id_from_ksi_and_its_log_while_the_cli_runs()
-> Result<()> {
    let f = fixture(&[("FAKE_CLAUDE_DELAY_MS", "200")])?;
    let exec = f.exec.clone();
    let call = tokio::spawn(async move {
        exec.complete("fresh-1".into(), None, req("a brand new conversation"))
            .await
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while row_opt(&f, "fresh-1").and_then(|r| r.pid).is_none() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let args: Vec<String> = invocations(&f.log)
        .first()
        .and_then(|i| serde_json::from_value(i["args"].clone()).ok())
        .context("the CLI's arguments")?;
    let at = args
        .iter()
        .position(|a| a == "--session-id")
        .with_context(|| format!("--session-id in {args:?}"))?;
    let session = args[at + 1].clone();
    assert!(uuid::Uuid::parse_str(&session).is_ok(), "{session}");
    // While the CLI runs, its session log is already there (and empty).
    let log = f.dir.path().join(format!("claude_logs/{session}.jsonl"));
    let seen_early = loop {
        if log.exists() || Instant::now() > deadline {
            break log.exists();
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    assert!(seen_early, "{} exists before the answer", log.display());
    let running = row(&f, "fresh-1");
    assert_eq!(running.status, "RUNNING");
    assert_eq!(running.session_id.as_deref(), Some(session.as_str()));
    let answer = call.await?.map_err(|e| anyhow::anyhow!("{e:?}"))?;
    assert_eq!(answer.session_id, session);
    let resp = answer.response_ref.context("response ref")?;
    assert_eq!(resp.path, format!("claude_logs/{session}.jsonl"));
    assert_eq!(resp.line, Some(jsonl_lines(&log)?.len() as u64 - 1));
    Ok(())
}

#[tokio::test]
async fn attempts_that_printed_no_session_leave_no_empty_session_logs() -> Result<()> {
    // An unknown fault makes fake-claude exit before it prints anything: every attempt fails
    // without a session id, so the session logs made for them go again.
    let (f, r, out) = run_fault("no-such-fault", false).await?;
    assert!(out.is_err(), "{out:?}");
    assert_eq!(r.status, "DEAD", "{r:?}");
    assert_eq!(r.attempts, 3);
    let sessions: Vec<String> = invocations(&f.log)
        .iter()
        .filter_map(|i| {
            let args: Vec<String> = serde_json::from_value(i["args"].clone()).ok()?;
            let at = args.iter().position(|a| a == "--session-id")?;
            args.get(at + 1).cloned()
        })
        .collect();
    assert_eq!(sessions.len(), 3, "one fresh session per attempt");
    assert_eq!(sessions.iter().collect::<BTreeSet<_>>().len(), 3);
    for s in &sessions {
        let log = f.dir.path().join(format!("claude_logs/{s}.jsonl"));
        assert!(!log.exists(), "{} was left behind", log.display());
    }
    Ok(())
}

#[tokio::test]
async fn a_call_to_run_again_finds_its_prompt_in_the_archive_when_the_queued_name_is_gone()
-> Result<()> {
    let f = fixture(&[])?;
    // A RUNNING row without a result (the CLI died with the machine), whose queued prompt had
    // already been linked into the archive and unlinked from the queue.
    let lines = fake_stdout("asked before the power went")?;
    plant_running_row(&f, "arch-1", &lines[..1]).await?;
    let queued = f
        .refs
        .write("prompts/queue/arch-1.txt", b"asked before the power went")?;
    let (qref, sha) = (serde_json::to_string(&queued)?, queued.sha256.clone());
    f.store
        .write(move |tx| {
            tx.execute(
                "UPDATE processes SET prompt_file = ?1, request = ?2, prompt_sha256 = ?3
                 WHERE id = 'arch-1'",
                rusqlite::params![qref, r#"{"model":"sonnet"}"#, sha],
            )?;
            Ok::<_, ksi_host::store::StoreError>(())
        })
        .await?;
    std::fs::hard_link(
        f.dir.path().join("prompts/queue/arch-1.txt"),
        f.dir.path().join("prompts/archive/arch-1.txt"),
    )?;
    std::fs::remove_file(f.dir.path().join("prompts/queue/arch-1.txt"))?;

    let report = f.exec.reconcile().await?;
    assert_eq!(report.retry, vec!["arch-1".to_string()], "{report:?}");
    f.exec
        .resume("arch-1")
        .await
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let answer = f
        .exec
        .wait("arch-1")
        .await
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    assert!(answer.text.starts_with("[simulated]"), "{}", answer.text);
    let ran = invocations(&f.log);
    assert_eq!(ran.len(), 1);
    // fake-claude hashes the prompt followed by a NUL.
    assert_eq!(
        ran[0]["prompt_sha256"],
        ksi_host::refs::sha256_hex(b"asked before the power went\0")
    );
    Ok(())
}

// --- Exact money and answers ---------------------------------------------------------------

/// A stand-in for a CLI that spends real money: `fake-claude` with its `simulated` label taken
/// off every line. Tests of budgets and spend use it, since simulated money is not spend.
fn paid_claude(dir: &Path) -> Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join("paid-claude");
    std::fs::write(
        &path,
        format!(
            "#!/usr/bin/env bash\nset -o pipefail\n'{FAKE}' \"$@\" | sed -e 's/\"simulated\":true,//g' -e 's/,\"simulated\":true//g'\n"
        ),
    )?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
    Ok(path)
}

fn paid_fixture(env: &[(&str, &str)]) -> Result<Fixture> {
    let bin_dir = tempfile::tempdir()?.keep();
    let paid = paid_claude(&bin_dir)?;
    fixture_with(env, |c| c.binary = paid)
}

/// The result line a row's response reference points at.
fn logged_result(f: &Fixture, r: &ProcessRow) -> Result<Value> {
    let path = f
        .dir
        .path()
        .join(r.response_file.as_ref().context("a response file")?);
    let text = std::fs::read_to_string(path)?;
    let line = text
        .lines()
        .nth(r.response_line.context("a response line")? as usize - 1)
        .context("the referenced line")?;
    Ok(serde_json::from_str(line)?)
}

#[tokio::test]
async fn an_empty_result_is_answered_from_the_streams_last_assistant_text_and_says_so() -> Result<()>
{
    let (f, r, out) = run_fault("empty_result", false).await?;
    let text = out.map_err(|e| anyhow::anyhow!(e))?;
    assert!(
        text.starts_with("[simulated] Reply ") && text.ends_with('.'),
        "the whole answer from the stream: {text:?}"
    );
    assert_eq!(r.status, "COMPLETED");
    assert_eq!(
        r.metrics.as_ref().context("metrics")?["answer_from"],
        "assistant_text"
    );
    assert_eq!(
        logged_result(&f, &r)?["result"],
        "",
        "the CLI's own line is kept"
    );
    // Read back later (after a restart, from the row), the answer is the same text.
    let again = Executor::new(
        f.store.clone(),
        f.bus.clone(),
        f.refs.clone(),
        ExecutorConfig::default(),
    )
    .recover_answer(&r.id)
    .await
    .context("the completed answer")?;
    assert_eq!(again.text, text);
    Ok(())
}

#[tokio::test]
async fn tokens_of_a_call_with_a_subagent_come_from_model_usage() -> Result<()> {
    let (f, r, out) = run_fault("subagents", false).await?;
    let text = out.map_err(|e| anyhow::anyhow!(e))?;
    assert!(
        !text.contains("subagent's notes"),
        "the main agent's answer: {text}"
    );
    let line = logged_result(&f, &r)?;
    let usage_in = line["usage"]["input_tokens"].as_i64().unwrap();
    let model_in: i64 = line["modelUsage"]
        .as_object()
        .unwrap()
        .values()
        .map(|m| m["inputTokens"].as_i64().unwrap())
        .sum();
    let model_out: i64 = line["modelUsage"]
        .as_object()
        .unwrap()
        .values()
        .map(|m| m["outputTokens"].as_i64().unwrap())
        .sum();
    assert!(
        model_in > usage_in,
        "the subagent's tokens are not in usage"
    );
    assert_eq!(r.tokens_in, Some(model_in));
    assert_eq!(r.tokens_out, Some(model_out));
    let split = r.model_usage.as_ref().context("per-model split")?;
    assert_eq!(split["claude-haiku-4-5-20251001"]["input"], 1200);
    assert_eq!(r.cost_usd, line["total_cost_usd"].as_f64());
    Ok(())
}

#[tokio::test]
async fn the_row_keeps_the_alias_asked_for_and_the_model_that_answered() -> Result<()> {
    use ksi_host::cli::claude as cli;
    let f = paid_fixture(&[])?;
    let answer = f
        .exec
        .complete(
            "alias-1".into(),
            None,
            ClaudeRequest {
                model: Some("sonnet".into()),
                ..req("which model?")
            },
        )
        .await
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let r = row(&f, "alias-1");
    assert_eq!(r.model.as_deref(), Some("sonnet"));
    assert_eq!(
        r.resolved_model.as_deref(),
        Some("claude-sonnet-4-5-20250929")
    );
    assert_eq!(answer.model, "claude-sonnet-4-5-20250929");
    assert_eq!(answer.requested_model, "sonnet");
    let cost = cli::cost(&f.store)?;
    let keys: Vec<&str> = cost.by_model.iter().map(|l| l.key.as_str()).collect();
    assert_eq!(
        keys,
        ["claude-sonnet-4-5-20250929"],
        "grouped by the model that answered"
    );
    assert!(cli::render_ps(&[r]).contains("claude-sonnet-4-5-20250929 (sonnet)"));
    Ok(())
}

#[tokio::test]
async fn a_call_that_fails_after_paid_work_records_its_turns_cost_tokens_and_session() -> Result<()>
{
    use ksi_host::cli::claude as cli;
    let f = paid_fixture(&[("FAKE_CLAUDE_FAULT", "credit_after_work")])?;
    let err = f
        .exec
        .complete("credit-1".into(), None, req("a long task"))
        .await
        .err()
        .context("the call fails")?;
    assert_eq!(err.class, "permanent.billing", "{err:?}");
    let r = row(&f, "credit-1");
    assert_eq!(r.status, "FAILED");
    assert_eq!(r.num_turns, Some(54));
    assert_eq!(r.duration_ms, Some(812_000));
    assert_eq!(r.duration_api_ms, Some(640_000));
    assert_eq!(r.cost_usd, Some(2.0));
    assert_eq!(r.tokens_in, Some(120_000));
    assert_eq!(r.tokens_out, Some(40_000));
    let session = r.session_id.clone().context("its session")?;
    let sessions = cli::sessions(&f.store)?;
    assert!(
        sessions
            .iter()
            .any(|s| s.session_id == session && s.cost_usd == 2.0),
        "{sessions:?}"
    );
    let cost = cli::cost(&f.store)?;
    assert_eq!(cost.total.cost_usd, 2.0);
    assert_eq!(
        cost.total.calls, 1,
        "a failed call that cost money is a paid call"
    );
    Ok(())
}

async fn one_odd_shape(fault: &str) -> Result<()> {
    let (f, r, out) = run_fault(fault, false).await?;
    out.map_err(|e| anyhow::anyhow!("{fault}: {e}"))?;
    assert_eq!(r.status, "COMPLETED", "{fault}");
    let line = logged_result(&f, &r)?;
    let result = match &line {
        Value::Array(items) => items
            .iter()
            .find(|m| m["type"] == "result")
            .cloned()
            .context("the array holds the result")?,
        other => other.clone(),
    };
    assert_eq!(result["type"], "result", "{fault}: {line}");
    assert_eq!(r.cost_usd, result["total_cost_usd"].as_f64(), "{fault}");
    let pending = f.dir.path().join("claude_logs/pending");
    let left: Vec<_> = std::fs::read_dir(&pending)
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(
        left.is_empty(),
        "{fault}: pending logs left behind: {left:?}"
    );
    Ok(())
}

#[tokio::test]
async fn a_result_printed_as_one_json_array_gets_a_response_reference_and_no_pending_log()
-> Result<()> {
    one_odd_shape("array_output").await
}

#[tokio::test]
async fn a_result_spread_over_several_lines_gets_a_response_reference_and_no_pending_log()
-> Result<()> {
    one_odd_shape("pretty_result").await
}

#[tokio::test]
async fn simulated_cost_is_recorded_as_simulated_and_never_counts_against_a_budget() -> Result<()> {
    use ksi_host::cli::claude as cli;
    let f = fixture(&[])?;
    // A budget that the first real call would exhaust.
    settings::set(&f.store, "claude.budget.global_usd", json!(0.000001), None).await?;
    settings::set(&f.store, "claude.budget.global_tokens", json!(1), None).await?;
    for i in 0..3 {
        let a = f
            .exec
            .complete(format!("sim-{i}"), None, req(&format!("simulated {i}")))
            .await
            .map_err(|e| anyhow::anyhow!("call {i} was refused: {e:?}"))?;
        assert!(a.simulated && a.cost_usd > 0.0);
    }
    let r = row(&f, "sim-0");
    assert!(r.simulated);
    assert!(
        r.executable
            .as_deref()
            .is_some_and(|e| e.ends_with("fake-claude")),
        "{r:?}"
    );
    assert_eq!(r.cli_version.as_deref(), Some("2.1.197"));
    let cost = cli::cost(&f.store)?;
    assert_eq!(cost.total.cost_usd, 0.0, "no real money");
    assert_eq!(cost.total.calls, 0);
    assert_eq!(cost.total.simulated_calls, 3);
    assert!(cost.total.simulated_usd > 0.0);
    assert!(cli::render_cost(&cost).contains("(no money)"));
    assert!(cli::render_ps(&[r]).contains("simulated"));
    Ok(())
}

#[tokio::test]
async fn a_cli_that_only_retries_its_connection_is_stopped_and_classed_as_network() -> Result<()> {
    let f = fixture_with(&[("FAKE_CLAUDE_FAULT", "no_network")], |c| {
        c.limits.connect_timeout = Duration::from_millis(1500);
        c.limits.no_output_timeout = Duration::from_secs(60);
        c.retry.max_attempts = 2;
    })?;
    let err = f
        .exec
        .complete("offline-1".into(), None, req("no network here"))
        .await
        .err()
        .context("the call fails")?;
    assert_eq!(err.class, "transient.network", "{err:?}");
    assert!(err.transient);
    assert!(
        err.message.contains("could not reach the API")
            && err.message.contains("connection retries"),
        "{}",
        err.message
    );
    let r = row(&f, "offline-1");
    assert_eq!((r.status.as_str(), r.attempts), ("DEAD", 2));
    Ok(())
}

#[test]
fn with_the_default_settings_a_cli_without_network_is_dead_in_under_five_minutes() {
    // Each attempt is stopped at the connect timeout; between attempts the backoff is at most
    // its ceiling. (The no-output timeout does not fire: the CLI prints an `api_retry` line for
    // each of its own retries.)
    let limits = Limits::default();
    let retry = RetryPolicy::default();
    let backoffs: Duration = (1..retry.max_attempts).map(|a| retry.ceiling(a)).sum();
    // A CLI that ignores SIGTERM gets SIGKILL after the kill grace.
    let per_attempt = limits.connect_timeout + limits.kill_grace;
    let worst = per_attempt * retry.max_attempts + backoffs;
    assert!(
        worst < Duration::from_secs(300),
        "{} attempts × {:?} + {:?} of backoff = {:?}",
        retry.max_attempts,
        per_attempt,
        backoffs,
        worst
    );
    // docs/money.md states this bound.
    assert_eq!(worst, Duration::from_secs(201));
}

fn unix_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

#[tokio::test]
async fn a_call_that_hits_a_usage_limit_is_parked_until_the_reset_then_runs_by_itself() -> Result<()>
{
    use ksi_host::cli::claude as cli;
    let marker_dir = tempfile::tempdir()?;
    let marker = marker_dir.path().join("once").display().to_string();
    let reset = unix_secs() + 2;
    let reset_s = reset.to_string();
    let f = fixture(&[
        ("FAKE_CLAUDE_FAULT", "usage_limit"),
        ("FAKE_CLAUDE_FAULT_ONCE", marker.as_str()),
        ("FAKE_CLAUDE_RESET_AT", reset_s.as_str()),
    ])?;
    let exec = f.exec.clone();
    let call = tokio::spawn(async move {
        exec.complete("quota-1".into(), None, req("a call over the limit"))
            .await
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    let parked = loop {
        let r = row_opt(&f, "quota-1");
        if let Some(r) = r.filter(|r| r.status == "RETRY") {
            break r;
        }
        ensure!(Instant::now() < deadline, "the call was not parked");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(parked.error_class.as_deref(), Some("quota.usage_limit"));
    let until = parked.quota_until.context("parked until")?;
    assert!(until >= reset * 1000, "until {until}, reset {reset}");
    assert!(
        parked
            .error
            .as_deref()
            .is_some_and(|e| e.contains("usage limit reached") && e.contains("parked until")),
        "{:?}",
        parked.error
    );
    assert!(cli::render_ps(&[parked]).contains("waiting for quota until"));
    assert!(f.exec.parked_until("quota-1").is_some());
    let answer = call.await?.map_err(|e| anyhow::anyhow!("{e:?}"))?;
    assert!(answer.text.starts_with("[simulated]"));
    let r = row(&f, "quota-1");
    assert_eq!((r.status.as_str(), r.attempts), ("COMPLETED", 2));
    assert_eq!(r.quota_until, None, "no longer waiting");
    let runs = invocations(&f.log);
    assert_eq!(runs.len(), 2);
    assert!(
        runs[1]["time_unix_ms"].as_i64().unwrap() >= reset * 1000,
        "the second run waited for the reset"
    );
    Ok(())
}

#[tokio::test]
async fn with_quota_on_limit_fail_a_usage_limit_ends_the_call_with_the_clis_message() -> Result<()>
{
    let f = fixture(&[("FAKE_CLAUDE_FAULT", "usage_limit")])?;
    settings::set(&f.store, "claude.quota.on_limit", json!("fail"), None).await?;
    let err = f
        .exec
        .complete("quota-fail".into(), None, req("over the limit, no parking"))
        .await
        .err()
        .context("the call fails")?;
    assert_eq!(err.class, "quota.usage_limit");
    assert!(
        err.message.contains("usage limit reached"),
        "{}",
        err.message
    );
    assert_eq!(row(&f, "quota-fail").status, "DEAD");
    assert_eq!(invocations(&f.log).len(), 1, "not retried");
    Ok(())
}

#[tokio::test]
async fn a_session_id_that_is_not_one_is_refused_before_anything_runs() -> Result<()> {
    let f = fixture(&[])?;
    for (i, bad) in ["../../etc/passwd", "a b", "", "x/../../y"]
        .iter()
        .enumerate()
    {
        let r = f
            .exec
            .complete(
                format!("bad-session-{i}"),
                None,
                ClaudeRequest {
                    prompt: "hello".into(),
                    session: Some((*bad).into()),
                    ..ClaudeRequest::default()
                },
            )
            .await;
        let e = format!("{:?}", r.err().context("a bad session id is refused")?);
        ensure!(e.contains("is not a session id"), "{bad:?}: {e}");
    }
    ensure!(
        invocations(&f.log).is_empty(),
        "no CLI ran for a bad session id"
    );
    Ok(())
}
