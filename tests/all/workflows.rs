//! The standard workflows end to end on the real binaries, and the chaos test: 20 debates
//! while the daemon is SIGKILLed at random moments.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use rand::Rng;
use serde_json::{Value, json};

use crate::support::{Daemon, bin};

fn ksi(dir: &Path, args: &[&str]) -> std::process::Output {
    Command::new(bin("ksi"))
        .arg("--data-dir")
        .arg(dir)
        .args(args)
        .env_remove("KSI_DATA_DIR")
        .env_remove("KSI_CLAUDE_BIN")
        .output()
        .expect("run ksi")
}

/// Checks that every transcript turn points into `claude_logs/` at a line whose hash matches.
fn assert_transcript_in_claude_logs(dir: &Path, show: &Value) -> usize {
    let refs = ksi_host::refs::Refs::open(dir).unwrap();
    let turns = show["transcript"].as_array().expect("transcript");
    for t in turns {
        let r: ksi_host::refs::FileRef = serde_json::from_value(t["response_ref"].clone())
            .unwrap_or_else(|e| panic!("turn without a response reference ({e}): {t}"));
        assert!(r.path.starts_with("claude_logs/"), "{}", r.path);
        let line = refs
            .read(&r)
            .expect("the referenced line exists and its hash matches");
        assert!(!line.is_empty());
        assert!(
            t["text"].as_str().unwrap().starts_with("[simulated]"),
            "{t}"
        );
    }
    turns.len()
}

#[test]
fn each_standard_workflow_runs_to_completion_on_fake_claude() {
    let dir = tempfile::tempdir().unwrap();
    let fake = bin("fake-claude");
    for (wf, calls_at_least) in [
        ("debate", 7),
        ("analysis", 3),
        ("collaboration", 3),
        ("teaching", 5),
    ] {
        let o = ksi(
            dir.path(),
            &[
                "run",
                wf,
                "--topic",
                "Rust ownership",
                "--json",
                "--claude-bin",
                fake.to_str().unwrap(),
            ],
        );
        let out = String::from_utf8_lossy(&o.stdout);
        assert!(
            o.status.success(),
            "{wf}: {}\n{out}",
            String::from_utf8_lossy(&o.stderr)
        );
        let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{wf}: {e}: {out}"));
        assert_eq!(v["status"], "completed", "{wf}: {v}");
        let id = v["id"].as_str().unwrap();
        let calls = v["claude_calls"].as_u64().unwrap();
        assert!(calls >= calls_at_least, "{wf}: {calls} Claude calls");
        let show = ksi(dir.path(), &["workflow", "show", id, "--json"]);
        assert!(show.status.success());
        let show: Value = serde_json::from_slice(&show.stdout).unwrap();
        let turns = assert_transcript_in_claude_logs(dir.path(), &show);
        assert_eq!(
            turns as u64, calls,
            "{wf}: every Claude call is in the transcript"
        );
        // The journal records plugin name@version and content hash for every step.
        for s in show["steps"].as_array().unwrap() {
            if s["status"] == "completed" && s["plugin"].is_string() {
                assert!(s["plugin"].as_str().unwrap().starts_with(wf), "{s}");
                assert_eq!(s["plugin_sha256"].as_str().unwrap().len(), 64);
            }
        }
    }
    // Sessions continue: the debaters' later turns resume their first session.
    let list = ksi(dir.path(), &["workflows", "--json"]);
    let list: Value = serde_json::from_slice(&list.stdout).unwrap();
    let debate = list
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["type"] == "debate")
        .unwrap();
    let show: Value = serde_json::from_slice(
        &ksi(
            dir.path(),
            &["workflow", "show", debate["id"].as_str().unwrap(), "--json"],
        )
        .stdout,
    )
    .unwrap();
    let mut sessions: HashMap<String, Vec<String>> = HashMap::new();
    for t in show["transcript"].as_array().unwrap() {
        sessions
            .entry(t["agent"].as_str().unwrap().to_string())
            .or_default()
            .push(t["session_id"].as_str().unwrap().to_string());
    }
    let pro = sessions
        .iter()
        .find(|(a, _)| a.ends_with("-pro"))
        .unwrap()
        .1;
    assert_eq!(pro.len(), 3, "opening, rebuttal, closing");
    assert!(
        pro.iter().all(|s| s == &pro[0]),
        "one continued session: {pro:?}"
    );
}

/// The transcript of each instance keyed by topic: (step, role, text) in order.
fn transcripts(dir: &Path) -> BTreeMap<String, Vec<(String, String, String)>> {
    let list: Value =
        serde_json::from_slice(&ksi(dir, &["workflows", "--json", "--limit", "100"]).stdout)
            .unwrap();
    let mut out = BTreeMap::new();
    for w in list.as_array().unwrap() {
        let show: Value = serde_json::from_slice(
            &ksi(
                dir,
                &["workflow", "show", w["id"].as_str().unwrap(), "--json"],
            )
            .stdout,
        )
        .unwrap();
        let topic = show["params"]["topic"].as_str().unwrap().to_string();
        let turns = show["transcript"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| {
                let agent = t["agent"].as_str().unwrap_or("");
                let role = agent.rsplit('-').next().unwrap_or("").to_string();
                (
                    t["step"].as_str().unwrap().to_string(),
                    role,
                    t["text"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        out.insert(topic, turns);
    }
    out
}

const DEBATES: usize = 20;
const KILLS: usize = 15;
const ROUNDS: usize = 3;
/// Claude calls of one debate: 2 openings, 2 rebuttals a round, 2 closings, 1 judge.
const CALLS_PER_DEBATE: usize = 2 + 2 * ROUNDS + 2 + 1;

async fn start_debates(d: &Daemon) {
    for i in 0..DEBATES {
        let (s, b) = d.post("/workflows", &json!({"type": "debate", "params": {"topic": format!("Motion number {i}"), "rounds": ROUNDS}})).await.unwrap();
        assert_eq!(s, 201, "{b}");
    }
}

async fn wait_all_completed(d: &Daemon, within: Duration) {
    let t0 = Instant::now();
    loop {
        if let Ok((200, b)) = d.get("/workflows?limit=100").await {
            let ws = b["workflows"].as_array().unwrap();
            let failed: Vec<&Value> = ws
                .iter()
                .filter(|w| w["status"] == "failed" || w["status"] == "cancelled")
                .collect();
            assert!(failed.is_empty(), "instances failed: {failed:?}");
            if ws.len() == DEBATES && ws.iter().all(|w| w["status"] == "completed") {
                return;
            }
        }
        assert!(
            t0.elapsed() < within,
            "not all debates completed in {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn chaos_sigkill_during_twenty_debates_changes_nothing_and_pays_each_call_once() {
    let delay = [("KSI_CLAUDE_ENV_FAKE_CLAUDE_DELAY_MS", "60")];

    // The undisturbed run.
    let calm = tempfile::tempdir().unwrap();
    {
        let d = Daemon::start(calm.path(), &delay).await;
        start_debates(&d).await;
        wait_all_completed(&d, Duration::from_secs(300)).await;
    }

    // The chaos run: SIGKILL at random moments, restart, repeat.
    let chaos = tempfile::tempdir().unwrap();
    let results = chaos.path().join("fake-claude-results.jsonl");
    let invocations = chaos.path().join("fake-claude-invocations.jsonl");
    let env = [
        delay[0],
        (
            "KSI_CLAUDE_ENV_FAKE_CLAUDE_RESULT_LOG",
            results.to_str().unwrap(),
        ),
        (
            "KSI_CLAUDE_ENV_FAKE_CLAUDE_LOG",
            invocations.to_str().unwrap(),
        ),
    ];
    let mut d = Daemon::start(chaos.path(), &env).await;
    start_debates(&d).await;
    let mut rng = rand::rng();
    let mut kills = 0;
    while kills < KILLS {
        tokio::time::sleep(Duration::from_millis(rng.random_range(100..600))).await;
        d.child.kill().unwrap(); // SIGKILL
        d.child.wait().unwrap();
        kills += 1;
        drop(d);
        d = Daemon::start(chaos.path(), &env).await;
    }
    wait_all_completed(&d, Duration::from_secs(300)).await;
    drop(d);

    // The money: the same total as the undisturbed run, to the cent; every row's cost is what
    // the CLI reported on the result line it points at; no call counted twice.
    let (calm_total, calm_calls) = money_check(calm.path());
    let (chaos_total, chaos_calls) = money_check(chaos.path());
    assert_eq!(calm_calls, DEBATES * CALLS_PER_DEBATE);
    assert_eq!(
        chaos_calls,
        DEBATES * CALLS_PER_DEBATE,
        "each call counted once"
    );
    assert!(
        (calm_total - chaos_total).abs() < 0.005,
        "the chaos run cost {chaos_total}, the undisturbed run {calm_total}"
    );

    // Same transcripts as the undisturbed run.
    let (a, b) = (transcripts(calm.path()), transcripts(chaos.path()));
    assert_eq!(a.len(), DEBATES);
    if a != b {
        let differing: Vec<_> = a
            .iter()
            .filter(|(topic, turns)| b.get(*topic) != Some(turns))
            .map(|(topic, turns)| (topic, turns, b.get(topic)))
            .collect();
        panic!(
            "the chaos run's transcripts differ from the undisturbed run's in {} debates; first: {:#?}",
            differing.len(),
            differing.first()
        );
    }

    // fake-claude's own logs, keyed by prompt: each (instance, step, call) has its own (a rerun
    // of a new conversation gets a new random session id, so the session cannot be the key).
    // A result is logged just after it is printed, so a kill can fall between the two: a call
    // with no logged result must then have run once (the transcript holds its printed answer,
    // which the restarted daemon took from disk). No call may have printed two results.
    let per_call = |path: &Path| {
        let mut count: HashMap<String, usize> = HashMap::new();
        for line in std::fs::read_to_string(path).unwrap().lines() {
            let v: Value = serde_json::from_str(line).unwrap();
            *count
                .entry(v["prompt_sha256"].as_str().unwrap().into())
                .or_default() += 1;
        }
        count
    };
    let (ran, paid) = (per_call(&invocations), per_call(&results));
    let twice: Vec<_> = paid.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        twice.is_empty(),
        "calls completed more than once: {twice:?}"
    );
    assert_eq!(
        ran.len(),
        DEBATES * CALLS_PER_DEBATE,
        "calls per debate: 2 opening, 2 per rebuttal round, 2 closing, 1 judge"
    );
    let unlogged: Vec<_> = ran.iter().filter(|(k, _)| !paid.contains_key(*k)).collect();
    assert!(
        unlogged.iter().all(|(_, runs)| **runs == 1),
        "a call without a logged result ran more than once: {unlogged:?}"
    );
    assert!(
        paid.keys().all(|k| ran.contains_key(k)),
        "a result of a call that never started"
    );
    eprintln!(
        "chaos: {KILLS} kills, {} calls, each completed once ({} killed between printing and logging), {} runs in all",
        ran.len(),
        unlogged.len(),
        ran.values().sum::<usize>()
    );
}

/// Checks a finished data dir's accounting and returns (total cost, paid calls): each completed
/// row's cost equals the `total_cost_usd` of the result line it references; the workflows'
/// totals, `ksi cost` and the rows agree, so nothing is counted twice.
fn money_check(dir: &Path) -> (f64, usize) {
    use ksi_host::claude::executor::list_processes;
    use ksi_host::store::{Store, StoreOptions};
    let cost: Value = serde_json::from_slice(&ksi(dir, &["cost", "--json"]).stdout).unwrap();
    let list: Value =
        serde_json::from_slice(&ksi(dir, &["workflows", "--json", "--limit", "100"]).stdout)
            .unwrap();
    let workflows_total: f64 = list
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["cost_usd"].as_f64().unwrap())
        .sum();
    let store = Store::open_path(&dir.join("ksi.db"), &StoreOptions::default()).unwrap();
    let rows = list_processes(&store, None, 100_000).unwrap();
    let mut rows_total = 0.0;
    let mut paid = 0;
    for r in &rows {
        rows_total += r.cost_usd.unwrap_or(0.0);
        if r.status != "COMPLETED" {
            assert_eq!(
                r.counted_attempt, 0,
                "{}: a cut-off call has no spend",
                r.id
            );
            continue;
        }
        paid += 1;
        let log = std::fs::read_to_string(dir.join(r.response_file.as_ref().unwrap())).unwrap();
        let line: Value = serde_json::from_str(
            log.lines()
                .nth(r.response_line.unwrap() as usize - 1)
                .unwrap(),
        )
        .unwrap();
        assert_eq!(
            r.cost_usd,
            line["total_cost_usd"].as_f64(),
            "{}: the row's cost is the CLI's",
            r.id
        );
    }
    let approx = |a: f64, b: f64| (a - b).abs() < 1e-6;
    assert!(
        approx(rows_total, workflows_total),
        "rows {rows_total}, workflows {workflows_total}"
    );
    // fake-claude's money is simulated: `ksi cost` keeps it apart, each call once.
    assert!(
        approx(cost["total"]["simulated_usd"].as_f64().unwrap(), rows_total),
        "{cost}"
    );
    assert_eq!(
        cost["total"]["simulated_calls"].as_u64().unwrap() as usize,
        paid,
        "{cost}"
    );
    // Attempts cut off by a kill are shown apart, never as calls.
    let cut_off = rows
        .iter()
        .filter(|r| {
            r.status == "DEAD"
                && r.counted_attempt == 0
                && r.error_class.as_deref() == Some("transient.crash")
        })
        .count();
    assert_eq!(
        cost["total"]["cut_off"].as_u64().unwrap() as usize,
        cut_off,
        "{cost}"
    );
    assert_eq!(
        cost["total"]["calls"], 0,
        "simulated calls are not paid calls"
    );
    (rows_total, paid)
}

async fn wait_status(d: &Daemon, id: &str, want: &str, within: Duration) -> Value {
    let t0 = Instant::now();
    loop {
        if let Ok((200, b)) = d.get(&format!("/workflows/{id}")).await
            && b["status"] == want
        {
            return b;
        }
        assert!(
            t0.elapsed() < within,
            "{id} did not reach {want} in {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn sigterm_drains_and_the_workflow_continues_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let env = [("KSI_CLAUDE_ENV_FAKE_CLAUDE_DELAY_MS", "150")];
    let mut d = Daemon::start(dir.path(), &env).await;
    let (_, b) = d
        .post(
            "/workflows",
            &json!({"type": "debate", "params": {"topic": "drain", "rounds": 2}}),
        )
        .await
        .unwrap();
    let id = b["id"].as_str().unwrap().to_string();
    // Wait for the first step to commit, then ask the daemon to stop mid-workflow.
    let t0 = Instant::now();
    loop {
        let (_, w) = d.get(&format!("/workflows/{id}")).await.unwrap();
        if w["steps"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["status"] == "completed")
        {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(30));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    unsafe { libc::kill(d.child.id() as i32, libc::SIGTERM) };
    let status = d.child.wait().unwrap();
    assert_eq!(status.code(), Some(0), "a drained daemon exits 0");
    drop(d);
    let d = Daemon::start(dir.path(), &env).await;
    let v = wait_status(&d, &id, "completed", Duration::from_secs(60)).await;
    let steps = v["steps"].as_array().unwrap();
    assert!(
        steps.iter().all(|s| s["status"] == "completed"),
        "no step lost or failed: {steps:?}"
    );
    let names: Vec<&str> = steps.iter().map(|s| s["step"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        ["opening", "rebuttal", "rebuttal", "closing", "judge"]
    );
}

#[tokio::test]
async fn definitions_reload_while_the_daemon_runs() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path(), &[]).await;
    std::fs::write(
        dir.path().join("definitions/quick.toml"),
        "name = \"quick\"\nversion = \"1.0.0\"\n[[steps]]\nname = \"only\"\nhandler = \"echo.echo@^0.1\"\n",
    )
    .unwrap();
    let t0 = Instant::now();
    loop {
        let (_, b) = d.get("/workflow-types").await.unwrap();
        if b["workflow_types"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["name"] == "quick")
        {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the new definition was not loaded"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (s, b) = d
        .post("/workflows", &json!({"type": "quick", "params": {"x": 1}}))
        .await
        .unwrap();
    assert_eq!(s, 201, "{b}");
    wait_status(
        &d,
        b["id"].as_str().unwrap(),
        "completed",
        Duration::from_secs(20),
    )
    .await;
    // A broken file is reported with its line; the good definitions keep serving.
    std::fs::write(dir.path().join("definitions/broken.toml"), "name = \"broken\"\nversion = \"1.0.0\"\n[[steps]]\nname = \"a\"\nhandler = \"nosuch.step\"\n").unwrap();
    let t0 = Instant::now();
    loop {
        let (_, b) = d
            .get("/events?topic=workflow.definition_failed")
            .await
            .unwrap();
        if let Some(e) = b["events"].as_array().unwrap().iter().find(|e| {
            e["event"]["data"]["file"]
                .as_str()
                .unwrap_or("")
                .ends_with("broken.toml")
        }) {
            assert_eq!(e["event"]["data"]["line"], 3);
            assert!(
                e["event"]["data"]["error"]
                    .as_str()
                    .unwrap()
                    .contains("nosuch"),
                "{e}"
            );
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "no definition_failed event"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_, b) = d.get("/workflow-types").await.unwrap();
    assert!(
        b["workflow_types"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["name"] == "quick")
    );
}

#[tokio::test]
async fn ksi_run_uses_the_running_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let _d = Daemon::start(dir.path(), &[]).await;
    let path = dir.path().to_path_buf();
    let o = tokio::task::spawn_blocking(move || {
        ksi(
            &path,
            &["run", "teaching", "--topic", "borrowing", "--json"],
        )
    })
    .await
    .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["status"], "completed");
    assert_eq!(v["type"], "teaching");
    // Without a daemon the same command would have taken the data-dir lock; with one, the
    // instance was run by the daemon and is visible through its API.
    let (s, w) = _d
        .get(&format!("/workflows/{}", v["id"].as_str().unwrap()))
        .await
        .unwrap();
    assert_eq!((s, w["status"].as_str()), (200, Some("completed")));
}

#[tokio::test]
async fn ksi_workflow_cancel_reaches_the_running_daemon_and_stops_the_step() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("fake.jsonl");
    let env = [
        ("KSI_CLAUDE_ENV_FAKE_CLAUDE_DELAY_MS", "2000"),
        ("KSI_CLAUDE_ENV_FAKE_CLAUDE_LOG", log.to_str().unwrap()),
    ];
    let d = Daemon::start(dir.path(), &env).await;
    let (_, b) = d
        .post(
            "/workflows",
            &json!({"type": "debate", "params": {"topic": "cancel me"}}),
        )
        .await
        .unwrap();
    let id = b["id"].as_str().unwrap().to_string();
    // Wait until the opening's Claude calls run.
    let t0 = Instant::now();
    while std::fs::read_to_string(&log)
        .map(|l| l.lines().count())
        .unwrap_or(0)
        < 2
    {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "the Claude calls did not start"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let path = dir.path().to_path_buf();
    let id2 = id.clone();
    let o = tokio::task::spawn_blocking(move || ksi(&path, &["workflow", "cancel", &id2]))
        .await
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let started = Instant::now();
    wait_status(&d, &id, "cancelled", Duration::from_secs(5)).await;
    // The running calls were killed, not waited for: no fake-claude of this run is alive.
    tokio::time::sleep(Duration::from_millis(500)).await;
    for line in std::fs::read_to_string(&log).unwrap().lines() {
        let pid = serde_json::from_str::<Value>(line).unwrap()["pid"]
            .as_i64()
            .unwrap() as i32;
        let alive = unsafe { libc::kill(pid, 0) } == 0
            && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .unwrap_or_default()
                .contains(") Z ");
        assert!(!alive, "fake-claude {pid} still runs after the cancel");
    }
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "the cancel waited for the slow calls instead of stopping them"
    );
    let (_, v) = d.get(&format!("/workflows/{id}")).await.unwrap();
    assert!(
        v["steps"]
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s["status"] != "completed"),
        "{v}"
    );
}

#[tokio::test]
async fn the_daemon_runs_each_standard_workflow_with_transcripts_in_claude_logs() {
    let dir = tempfile::tempdir().unwrap();
    let _d = Daemon::start(dir.path(), &[]).await;
    for wf in ["debate", "analysis", "collaboration", "teaching"] {
        let path = dir.path().to_path_buf();
        let o = tokio::task::spawn_blocking(move || {
            let v: Value = serde_json::from_slice(
                &ksi(
                    &path,
                    &["run", wf, "--topic", "durable workflows", "--json"],
                )
                .stdout,
            )
            .unwrap();
            let show = ksi(
                &path,
                &["workflow", "show", v["id"].as_str().unwrap(), "--json"],
            );
            (v, serde_json::from_slice::<Value>(&show.stdout).unwrap())
        })
        .await
        .unwrap();
        let (v, show) = o;
        assert_eq!(v["status"], "completed", "{wf}: {v}");
        let turns = assert_transcript_in_claude_logs(dir.path(), &show);
        assert_eq!(turns as u64, v["claude_calls"].as_u64().unwrap(), "{wf}");
        // The journal references each answer: every completed Claude call has its process and
        // its response file line recorded.
        assert!(
            show["transcript"]
                .as_array()
                .unwrap()
                .iter()
                .all(|t| t["process_id"].as_str().is_some_and(|p| !p.is_empty()))
        );
    }
}
