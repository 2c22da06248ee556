//! Every dollar counted once: the daemon's accounting against what the CLI itself reported,
//! through crashes at the worst moment and steps that time out.

use std::collections::HashSet;
use std::path::Path;
use std::time::{Duration, Instant};

use ksi_host::claude::executor::{ProcessRow, list_processes};
use ksi_host::store::{Store, StoreOptions};
use serde_json::{Value, json};

use crate::support::Daemon;

/// Every process row of the data dir (read once the daemon has stopped).
fn rows(dir: &Path) -> Vec<ProcessRow> {
    let store = Store::open_path(&dir.join("ksi.db"), &StoreOptions::default()).unwrap();
    list_processes(&store, None, 10_000).unwrap()
}

/// The CLI's own `total_cost_usd` on the result line a row points at.
fn logged_cost(dir: &Path, r: &ProcessRow) -> f64 {
    let text = std::fs::read_to_string(dir.join(r.response_file.as_ref().unwrap())).unwrap();
    let line = text
        .lines()
        .nth(r.response_line.unwrap() as usize - 1)
        .unwrap();
    let v: Value = serde_json::from_str(line).unwrap();
    v["total_cost_usd"].as_f64().unwrap()
}

async fn wait_workflow(d: &Daemon, id: &str, within: Duration) -> Value {
    let t0 = Instant::now();
    loop {
        if let Ok((200, b)) = d.get(&format!("/workflows/{id}")).await
            && matches!(b["status"].as_str(), Some("completed" | "failed"))
        {
            return b;
        }
        assert!(t0.elapsed() < within, "{id} did not finish in {within:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The daemon's own child exits by itself (killed by its crash point).
fn wait_exit(d: &mut Daemon, within: Duration) -> std::process::ExitStatus {
    let t0 = Instant::now();
    loop {
        if let Some(status) = d.child.try_wait().unwrap() {
            return status;
        }
        assert!(
            t0.elapsed() < within,
            "the daemon did not stop at its crash point"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test]
async fn a_call_recovered_after_a_crash_between_success_and_completed_is_counted_once() {
    use std::os::unix::process::ExitStatusExt;
    let dir = tempfile::tempdir().unwrap();
    // This daemon dies (SIGKILL) right after the first call's SUCCESS commit, which holds its
    // cost and tokens, and before COMPLETED.
    let mut d = Daemon::start(dir.path(), &[("KSI_CRASH_AT", "after_success")]).await;
    let (s, b) = d
        .post(
            "/workflows",
            &json!({"type": "debate", "params": {"topic": "Counted once", "rounds": 1}}),
        )
        .await
        .unwrap();
    assert_eq!(s, 201, "{b}");
    let id = b["id"].as_str().unwrap().to_string();
    let status = wait_exit(&mut d, Duration::from_secs(60));
    assert_eq!(status.signal(), Some(libc::SIGKILL), "{status:?}");
    drop(d);

    let d = Daemon::start(dir.path(), &[]).await;
    let wf = wait_workflow(&d, &id, Duration::from_secs(120)).await;
    assert_eq!(wf["status"], "completed", "{wf}");
    let (_, cost) = d.get("/cost").await.unwrap();
    drop(d);

    let rows = rows(dir.path());
    let recovered: Vec<&ProcessRow> = rows
        .iter()
        .filter(|r| r.metrics.as_ref().is_some_and(|m| m["recovered"] == true))
        .collect();
    // The opening's two calls run at once: one or both reached SUCCESS before the kill.
    assert!(
        !recovered.is_empty(),
        "the crash left a call between SUCCESS and COMPLETED for start-up to recover"
    );
    let mut sum = 0.0;
    for r in rows.iter().filter(|r| r.status == "COMPLETED") {
        let logged = logged_cost(dir.path(), r);
        assert_eq!(
            r.cost_usd,
            Some(logged),
            "{}: the row's cost is the CLI's total_cost_usd",
            r.id
        );
        sum += logged;
    }
    let approx = |a: f64, b: f64| (a - b).abs() < 1e-9;
    assert!(
        approx(wf["cost_usd"].as_f64().unwrap(), sum),
        "the workflow's total {} is the sum of its calls' {sum}",
        wf["cost_usd"]
    );
    assert_eq!(
        wf["claude_calls"].as_u64().unwrap() as usize,
        rows.iter().filter(|r| r.status == "COMPLETED").count()
    );
    // fake-claude's money is simulated: `GET /cost` keeps it apart, counted once.
    assert!(
        approx(cost["total"]["simulated_usd"].as_f64().unwrap(), sum),
        "{cost}"
    );
    assert_eq!(cost["total"]["cost_usd"], 0.0);
}

#[tokio::test]
async fn a_step_that_times_out_stops_its_calls_and_counts_every_paid_one() {
    let dir = tempfile::tempdir().unwrap();
    let defs = dir.path().join("definitions");
    std::fs::create_dir_all(&defs).unwrap();
    std::fs::write(
        defs.join("timed.toml"),
        r#"name = "timed"
version = "0.1.0"
description = "A debate whose opening must be quick"

[params]
topic = "Timeouts"
rounds = 0

[[steps]]
name = "opening"
handler = "debate.opening@^0.1"
branches = ["closing"]
timeout_ms = 400
retry = { max_attempts = 3, backoff_ms = 100 }

[[steps]]
name = "closing"
handler = "debate.closing@^0.1"

[[steps]]
name = "judge"
handler = "debate.judge@^0.1"
"#,
    )
    .unwrap();
    let once = dir.path().join("slow-once");
    let results = dir.path().join("fake-results.jsonl");
    let invocations = dir.path().join("fake-invocations.jsonl");
    // The first CLI is slow (200 ms a line: over a second), the others answer at once: one
    // opening call outlives the step's timeout while its twin has answered (and been paid).
    let env = [
        ("KSI_CLAUDE_ENV_FAKE_CLAUDE_FAULT", "slow"),
        (
            "KSI_CLAUDE_ENV_FAKE_CLAUDE_FAULT_ONCE",
            once.to_str().unwrap(),
        ),
        (
            "KSI_CLAUDE_ENV_FAKE_CLAUDE_RESULT_LOG",
            results.to_str().unwrap(),
        ),
        (
            "KSI_CLAUDE_ENV_FAKE_CLAUDE_LOG",
            invocations.to_str().unwrap(),
        ),
    ];
    let d = Daemon::start(dir.path(), &env).await;
    let (s, b) = d
        .post("/workflows", &json!({"type": "timed", "params": {}}))
        .await
        .unwrap();
    assert_eq!(s, 201, "{b}");
    let id = b["id"].as_str().unwrap().to_string();
    let wf = wait_workflow(&d, &id, Duration::from_secs(120)).await;
    assert_eq!(wf["status"], "completed", "{wf}");
    let (_, transcript) = d.get(&format!("/workflows/{id}/transcript")).await.unwrap();
    // Give a CLI that was not stopped time to finish and print its result.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    drop(d);

    let read = |p: &Path| -> Vec<Value> {
        std::fs::read_to_string(p)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let slow: Vec<Value> = read(&invocations)
        .into_iter()
        .filter(|i| i["fault"] == "slow")
        .collect();
    assert_eq!(slow.len(), 1, "one slow CLI");
    let printed: HashSet<u64> = read(&results)
        .iter()
        .map(|r| r["pid"].as_u64().unwrap())
        .collect();
    assert!(
        !printed.contains(&slow[0]["pid"].as_u64().unwrap()),
        "the slow CLI was stopped with its step, before it answered (and was paid)"
    );

    let rows = rows(dir.path());
    let mine: Vec<&ProcessRow> = rows
        .iter()
        .filter(|r| r.workflow_id.as_deref() == Some(&id))
        .collect();
    let stopped: Vec<&&ProcessRow> = mine
        .iter()
        .filter(|r| r.error_class.as_deref() == Some("permanent.cancelled"))
        .collect();
    assert_eq!(stopped.len(), 1, "{mine:#?}");
    // The retry ran only after the stopped call had ended: never beside it.
    let retry_started = mine
        .iter()
        .filter(|r| r.id.contains(&format!("{id}_1_2_")))
        .filter_map(|r| r.started_at)
        .min()
        .expect("the opening's second attempt");
    assert!(stopped[0].completed_at.unwrap() <= retry_started);
    // Every paid call is in the workflow's totals, including the timed-out attempt's.
    let paid: Vec<&&ProcessRow> = mine.iter().filter(|r| r.status == "COMPLETED").collect();
    let sum: f64 = paid.iter().map(|r| r.cost_usd.unwrap()).sum();
    assert_eq!(
        wf["claude_calls"].as_u64().unwrap() as usize,
        paid.len(),
        "{wf}"
    );
    assert!(
        (wf["cost_usd"].as_f64().unwrap() - sum).abs() < 1e-9,
        "the workflow's total {} is the sum of its paid calls {sum}",
        wf["cost_usd"]
    );
    let answered_before_timeout: Vec<&&&ProcessRow> = paid
        .iter()
        .filter(|r| r.id.contains(&format!("{id}_1_1_")))
        .collect();
    assert_eq!(
        answered_before_timeout.len(),
        1,
        "the timed-out attempt's answered call is among them"
    );
    // ... and in the transcript.
    let turns = transcript["turns"].as_array().unwrap();
    assert!(
        turns
            .iter()
            .any(|t| t["process_id"] == answered_before_timeout[0].id.as_str()),
        "{transcript}"
    );
    assert_eq!(
        turns.len(),
        paid.len(),
        "every paid call is in the transcript"
    );
}

#[test]
fn a_client_never_runs_a_second_executor_on_a_data_dir_a_starting_daemon_holds() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("fake-claude.log");
    // Stands in for a daemon that has taken the data dir and does not listen yet.
    let lock = ksi_host::daemon::DataDirLock::acquire(dir.path()).unwrap();
    let t0 = Instant::now();
    let out = std::process::Command::new(crate::support::bin("ksi"))
        .arg("--data-dir")
        .arg(dir.path())
        .args(["spawn", "hello"])
        .env("KSI_DAEMON_START_WAIT_SECS", "2")
        .env("KSI_CLAUDE_BIN", crate::support::bin("fake-claude"))
        .env("KSI_CLAUDE_ENV_FAKE_CLAUDE_LOG", &log)
        .env("FAKE_CLAUDE_LOG", &log)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        t0.elapsed() >= Duration::from_secs(2),
        "it waited for the daemon"
    );
    let pid = std::process::id();
    assert!(
        stderr.contains(&format!(
            "waiting up to 2 s for the KSI daemon (pid {pid}) that is starting"
        )),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!(
            "another KSI process (pid {pid}) holds the data directory"
        )) && stderr.contains("Nothing was run"),
        "{stderr}"
    );
    assert!(!log.exists(), "no CLI ran");
    assert!(
        !dir.path().join("ksi.db").exists(),
        "the data dir was not opened"
    );
    drop(lock);
}

#[tokio::test]
async fn the_spawn_rate_limit_holds_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("fake-claude.log");
    let set = crate::support::ksi_host(
        dir.path(),
        &["config", "set", "claude.spawn_rate_per_min", "3"],
    );
    assert!(set.status.success(), "{:?}", crate::support::text(&set));
    let env = [("KSI_CLAUDE_ENV_FAKE_CLAUDE_LOG", log.to_str().unwrap())];
    let calls = |log: &Path| {
        std::fs::read_to_string(log)
            .unwrap_or_default()
            .lines()
            .count()
    };
    {
        let d = Daemon::start(dir.path(), &env).await;
        for i in 0..3 {
            let (s, b) = d
                .post(
                    "/spawn",
                    &json!({"prompt": format!("rate {i}"), "wait": true}),
                )
                .await
                .unwrap();
            assert_eq!(s, 201, "{b}");
        }
    } // SIGKILL
    assert_eq!(calls(&log), 3);
    let d = Daemon::start(dir.path(), &env).await;
    let (s, b) = d
        .post("/spawn", &json!({"prompt": "rate 3", "wait": false}))
        .await
        .unwrap();
    assert_eq!(s, 202, "{b}");
    // 3 a minute were used up just before the restart: the next token comes ~20 s after the
    // first of them, so for the next seconds the fourth call waits.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        calls(&log),
        3,
        "the restarted daemon spawned at once, over the rate"
    );
    let (_, p) = d
        .get(&format!("/processes/{}", b["process_id"].as_str().unwrap()))
        .await
        .unwrap();
    assert_eq!(p["status"], "PENDING", "{p}");
}

#[tokio::test]
async fn a_step_parked_by_a_usage_limit_survives_a_restart_and_resumes_after_the_reset() {
    let dir = tempfile::tempdir().unwrap();
    let once = dir.path().join("limit-once");
    let invocations = dir.path().join("fake-invocations.jsonl");
    let reset = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 6;
    let reset_s = reset.to_string();
    let env = [
        ("KSI_CLAUDE_ENV_FAKE_CLAUDE_FAULT", "usage_limit"),
        (
            "KSI_CLAUDE_ENV_FAKE_CLAUDE_FAULT_ONCE",
            once.to_str().unwrap(),
        ),
        ("KSI_CLAUDE_ENV_FAKE_CLAUDE_RESET_AT", reset_s.as_str()),
        (
            "KSI_CLAUDE_ENV_FAKE_CLAUDE_LOG",
            invocations.to_str().unwrap(),
        ),
    ];
    let d = Daemon::start(dir.path(), &env).await;
    let (s, b) = d
        .post(
            "/workflows",
            &json!({"type": "debate", "params": {"topic": "Limits", "rounds": 0}}),
        )
        .await
        .unwrap();
    assert_eq!(s, 201, "{b}");
    let id = b["id"].as_str().unwrap().to_string();
    let t0 = Instant::now();
    let waiting = loop {
        let (_, list) = d.get("/workflows").await.unwrap();
        if let Some(until) = list["workflows"][0]["waiting_for_quota_until"].as_i64() {
            break until;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "never parked: {list}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(waiting >= reset as i64 * 1000);
    let out = std::process::Command::new(crate::support::bin("ksi"))
        .arg("--data-dir")
        .arg(dir.path())
        .arg("workflows")
        .output()
        .unwrap();
    let listing = String::from_utf8_lossy(&out.stdout);
    assert!(listing.contains("waiting for quota until"), "{listing}");
    drop(d); // SIGKILL while the step waits

    let d = Daemon::start(dir.path(), &env).await;
    let wf = wait_workflow(&d, &id, Duration::from_secs(120)).await;
    assert_eq!(wf["status"], "completed", "{wf}");
    drop(d);
    // The parked call ran again only after the reset, once; nothing else ran twice.
    let runs: Vec<Value> = std::fs::read_to_string(&invocations)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let limited = runs
        .iter()
        .find(|r| r["fault"] == "usage_limit")
        .expect("the call that hit the limit");
    let again: Vec<&Value> = runs
        .iter()
        .filter(|r| r["prompt_sha256"] == limited["prompt_sha256"] && r["fault"].is_null())
        .collect();
    assert_eq!(again.len(), 1, "{runs:#?}");
    assert!(again[0]["time_unix_ms"].as_u64().unwrap() >= reset * 1000);
    let mut prompts: Vec<&str> = runs
        .iter()
        .filter(|r| r["fault"].is_null())
        .map(|r| r["prompt_sha256"].as_str().unwrap())
        .collect();
    let n = prompts.len();
    prompts.sort();
    prompts.dedup();
    assert_eq!(prompts.len(), n, "a call ran twice: {runs:#?}");
}

#[test]
fn ksi_run_on_fake_claude_says_its_cost_is_simulated() {
    let dir = tempfile::tempdir().unwrap();
    let fake = crate::support::bin("fake-claude");
    let run = |json: bool| {
        let mut cmd = std::process::Command::new(crate::support::bin("ksi"));
        cmd.arg("--data-dir")
            .arg(dir.path())
            .args([
                "run",
                "debate",
                "--topic",
                "Simulated money",
                "--param",
                "rounds=0",
            ])
            .arg("--claude-bin")
            .arg(&fake);
        if json {
            cmd.arg("--json");
        }
        let o = cmd.output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let v: Value = serde_json::from_str(&run(true)).unwrap();
    assert_eq!(v["simulated"], true, "{v}");
    let cost = v["cost_usd"].as_f64().unwrap();
    assert!(cost > 0.0);
    assert!(
        (v["simulated_usd"].as_f64().unwrap() - cost).abs() < 1e-12,
        "{v}"
    );
    let text = run(false);
    assert!(
        text.contains("simulated (no money spent)"),
        "the summary says the money is simulated: {text}"
    );
}
