//! Compatibility with the original KSI: its clients' Unix-socket protocol against a running
//! daemon (on fake-claude), and `ksi-host import-logs` on logs in the shapes it wrote.

use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};

use crate::support::{Daemon, bin, ksi_host, text};

/// A client speaking the original protocol: newline-delimited JSON over the Unix socket.
struct Client {
    lines: tokio::io::Lines<BufReader<OwnedReadHalf>>,
    wr: OwnedWriteHalf,
}

impl Client {
    async fn connect(data_dir: &Path) -> Client {
        let path = data_dir.join("ksi-compat.sock");
        let stream = UnixStream::connect(&path)
            .await
            .unwrap_or_else(|e| panic!("connect {}: {e}", path.display()));
        let (rd, wr) = stream.into_split();
        Client {
            lines: BufReader::new(rd).lines(),
            wr,
        }
    }

    async fn send_raw(&mut self, line: &str) {
        self.wr.write_all(line.as_bytes()).await.unwrap();
        self.wr.write_all(b"\n").await.unwrap();
    }

    async fn send(&mut self, event: &str, data: Value, correlation_id: &str) {
        let msg = json!({ "event": event, "data": data, "correlation_id": correlation_id });
        self.send_raw(&msg.to_string()).await;
    }

    /// The next message, within 20 s.
    async fn next(&mut self) -> Value {
        let line = tokio::time::timeout(Duration::from_secs(20), self.lines.next_line())
            .await
            .expect("a message from the daemon within 20 s")
            .unwrap()
            .expect("the connection is still open");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"))
    }

    /// Sends a request and returns its reply (the message with its correlation id).
    async fn request(&mut self, event: &str, data: Value) -> Value {
        let corr = format!("c-{}", rand_id());
        self.send(event, data, &corr).await;
        loop {
            let m = self.next().await;
            if m["correlation_id"] == corr.as_str() {
                return m;
            }
        }
    }
}

fn rand_id() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(1);
    N.fetch_add(1, Ordering::Relaxed)
}

#[tokio::test]
async fn completion_async_replies_queued_then_pushes_its_result() {
    let dir = tempfile::tempdir().unwrap();
    let _d = Daemon::start(dir.path(), &[]).await;
    let mut c = Client::connect(dir.path()).await;
    c.send(
        "completion:async",
        json!({"prompt": "Say hello", "model": "claude-cli/sonnet", "request_id": "req-42"}),
        "corr-1",
    )
    .await;
    let queued = c.next().await;
    assert_eq!(queued["event"], "completion:async", "{queued}");
    assert_eq!(queued["correlation_id"], "corr-1", "{queued}");
    assert_eq!(queued["count"], 1);
    assert!(queued["timestamp"].as_f64().unwrap() > 0.0);
    assert_eq!(queued["data"]["request_id"], "req-42");
    assert_eq!(queued["data"]["status"], "queued");

    let pushed = c.next().await;
    assert_eq!(pushed["event"], "completion:result", "{pushed}");
    let data = &pushed["data"];
    assert_eq!(data["request_id"], "req-42", "{pushed}");
    assert_eq!(data["status"], "completed", "{pushed}");
    let answer = data["response"].as_str().unwrap();
    assert!(
        answer.starts_with("[simulated]"),
        "fake-claude's answer: {answer}"
    );
    // The original's shape: the CLI's own result JSON under result.response.
    assert_eq!(data["result"]["ksi"]["provider"], "claude-cli");
    assert_eq!(data["result"]["ksi"]["request_id"], "req-42");
    assert_eq!(data["result"]["response"]["type"], "result");
    assert_eq!(data["result"]["response"]["result"], answer);
    let session = data["session_id"].as_str().unwrap();
    assert_eq!(data["result"]["response"]["session_id"], session);
    assert!(data["cost"].as_f64().unwrap() > 0.0, "{pushed}");
    assert!(
        data["model"].as_str().unwrap().contains("sonnet"),
        "{pushed}"
    );

    // The call went through the executor: it is a process row like any other.
    let pid = queued["data"]["process_id"].as_str().unwrap();
    assert_eq!(data["process_id"], pid);
    let out = std::process::Command::new(bin("ksi"))
        .arg("--data-dir")
        .arg(dir.path())
        .args(["ps", "--json"])
        .env_remove("KSI_DATA_DIR")
        .output()
        .unwrap();
    let rows: Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|_| panic!("{:?}", text(&out)));
    assert!(
        rows.as_array()
            .unwrap()
            .iter()
            .any(|r| r["id"] == pid && r["status"] == "COMPLETED"),
        "{rows}"
    );
}

#[tokio::test]
async fn a_failed_completion_pushes_a_result_carrying_the_error() {
    let dir = tempfile::tempdir().unwrap();
    // A spent budget: the executor refuses the call, and the refusal is the pushed result.
    let set = ksi_host(
        dir.path(),
        &["config", "set", "claude.budget.global_usd", "0"],
    );
    assert!(set.status.success(), "{:?}", text(&set));
    let _d = Daemon::start(dir.path(), &[]).await;
    let mut c = Client::connect(dir.path()).await;
    let q = c.request("completion:async", json!({"prompt": "hi"})).await;
    assert_eq!(q["data"]["status"], "queued", "{q}");
    let r = c.next().await;
    assert_eq!(r["event"], "completion:result", "{r}");
    assert_eq!(r["data"]["request_id"], q["data"]["request_id"]);
    assert_eq!(r["data"]["status"], "failed", "{r}");
    assert_eq!(r["data"]["error_class"], "budget", "{r}");
    assert!(!r["data"]["error"].as_str().unwrap().is_empty(), "{r}");
    assert_eq!(r["data"]["transient"], false, "{r}");
}

#[tokio::test]
async fn monitor_subscribe_pushes_matching_events_as_they_commit() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path(), &[]).await;
    let mut watcher = Client::connect(dir.path()).await;
    let r = watcher
        .request(
            "monitor:subscribe",
            json!({"client_id": "watcher", "event_patterns": ["demo:*", "completion:result"]}),
        )
        .await;
    assert_eq!(r["data"]["status"], "subscribed", "{r}");
    assert_eq!(r["data"]["client_id"], "watcher");

    // A bus event published over HTTP: `demo.thing` is pushed as `demo:thing`; `other.x` is not.
    let (s, _) = d
        .post("/events", &json!({"topic": "other.x", "data": {}}))
        .await
        .unwrap();
    assert_eq!(s, 201);
    let (s, _) = d
        .post("/events", &json!({"topic": "demo.thing", "data": {"n": 7}}))
        .await
        .unwrap();
    assert_eq!(s, 201);
    let m = watcher.next().await;
    assert_eq!(m["event"], "demo:thing", "{m}");
    assert_eq!(m["event_name"], "demo:thing");
    assert_eq!(m["data"]["n"], 7);
    assert_eq!(m["_topic"], "demo.thing");

    // Another client's completion: its claude.spawn.complete reaches the watcher as
    // completion:result.
    let mut caller = Client::connect(dir.path()).await;
    let q = caller
        .request("completion:async", json!({"prompt": "watched call"}))
        .await;
    let pid = q["data"]["process_id"].as_str().unwrap().to_string();
    let m = watcher.next().await;
    assert_eq!(m["event"], "completion:result", "{m}");
    assert_eq!(m["data"]["process_id"], pid.as_str(), "{m}");
    assert!(m["data"]["session_id"].is_string(), "{m}");
}

#[tokio::test]
async fn agents_health_discovery_and_bad_requests() {
    let dir = tempfile::tempdir().unwrap();
    let _d = Daemon::start(dir.path(), &[]).await;
    let mut c = Client::connect(dir.path()).await;

    let r = c.request("agent:spawn", json!({"agent_id": "alice"})).await;
    assert_eq!(r["event"], "agent:spawn", "{r}");
    assert_eq!(r["data"]["agent_id"], "alice", "{r}");
    assert_eq!(r["data"]["status"], "created", "{r}");
    let r = c.request("agent:spawn", json!({"agent_id": "alice"})).await;
    assert_eq!(r["data"]["status"], "exists", "{r}");
    let r = c.request("agent:list", json!({})).await;
    let agents = r["data"]["agents"].as_array().unwrap();
    assert_eq!(r["data"]["count"], agents.len());
    assert!(agents.iter().any(|a| a["agent_id"] == "alice"), "{r}");
    let r = c
        .request("agent:spawn", json!({"agent_id": "not valid!"}))
        .await;
    assert!(
        r["error"]
            .as_str()
            .unwrap()
            .contains("not a valid agent id"),
        "{r}"
    );

    let r = c.request("system:health", json!({})).await;
    assert_eq!(r["data"]["status"], "healthy", "{r}");
    assert_eq!(r["data"]["database"]["ok"], true);
    assert!(r["data"]["uptime"].as_f64().unwrap() >= 0.0);

    let r = c.request("system:discover", json!({})).await;
    let events = r["data"]["events"].as_object().unwrap();
    for name in [
        "completion:async",
        "monitor:subscribe",
        "agent:spawn",
        "agent:list",
        "system:health",
        "system:discover",
    ] {
        assert!(events.contains_key(name), "{name} missing from {r}");
    }
    assert_eq!(
        events["completion:async"]["parameters"]["prompt"]["type"],
        "str"
    );
    assert_eq!(r["data"]["total"], events.len());
    let r = c
        .request("system:discover", json!({"namespace": "agent"}))
        .await;
    assert_eq!(r["data"]["total"], 2, "{r}");

    // An unknown event: an error reply with its correlation id, and the connection stays.
    let r = c.request("state:entity:get", json!({"id": "x"})).await;
    assert_eq!(r["event"], "state:entity:get");
    let err = r["error"].as_str().unwrap();
    assert!(
        err.contains("unknown event") && err.contains("system:discover"),
        "{err}"
    );
    let r = c.request("system:health", json!({})).await;
    assert_eq!(r["data"]["status"], "healthy", "still answering: {r}");

    // Malformed input: an error reply each, never a dropped connection.
    c.send_raw("{this is not json").await;
    let r = c.next().await;
    assert!(r["error"].as_str().unwrap().contains("invalid JSON"), "{r}");
    c.send_raw(r#"{"data": {}, "correlation_id": "no-name"}"#)
        .await;
    let r = c.next().await;
    assert_eq!(r["correlation_id"], "no-name");
    assert!(r["error"].as_str().unwrap().contains("no \"event\""), "{r}");
    c.send_raw(r#"{"event": "completion:async", "data": [1], "correlation_id": "bad-data"}"#)
        .await;
    let r = c.next().await;
    assert_eq!(r["correlation_id"], "bad-data");
    assert!(
        r["error"]
            .as_str()
            .unwrap()
            .contains("must be a JSON object"),
        "{r}"
    );
    let r = c
        .request("completion:async", json!({"model": "sonnet"}))
        .await;
    assert!(r["error"].as_str().unwrap().contains("\"prompt\""), "{r}");
    let r = c.request("system:health", json!({})).await;
    assert_eq!(r["data"]["status"], "healthy", "still answering: {r}");
}

#[tokio::test]
async fn a_client_that_stops_reading_blocks_nobody() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path(), &[]).await;
    // Subscribes to everything, then never reads: its socket buffer and outbox fill up.
    let mut silent = Client::connect(dir.path()).await;
    silent.send("monitor:subscribe", json!({}), "s").await;
    let mut reader = Client::connect(dir.path()).await;
    let r = reader
        .request("monitor:subscribe", json!({"event_patterns": ["load:*"]}))
        .await;
    assert_eq!(r["data"]["status"], "subscribed");

    // 600 events of 2 KB: far more than the silent client's buffers hold.
    const EVENTS: usize = 600;
    let pad = "x".repeat(2048);
    let mut publishers = Vec::new();
    for p in 0..4 {
        let (port, pad) = (d.port, pad.clone());
        publishers.push(tokio::spawn(async move {
            for i in 0..EVENTS / 4 {
                let body = json!({"topic": "load.tick", "data": {"p": p, "i": i, "pad": pad}});
                let (s, b) = crate::support::http(
                    port,
                    "POST",
                    "/events",
                    Some(body.to_string().into_bytes()),
                )
                .await
                .unwrap();
                assert_eq!(s, 201, "{b}");
            }
        }));
    }
    // Meanwhile other clients get answers.
    let mut askers = Vec::new();
    for i in 0..10 {
        let path = dir.path().to_path_buf();
        askers.push(tokio::spawn(async move {
            let mut c = Client::connect(&path).await;
            for _ in 0..5 {
                let r = c.request("system:health", json!({"i": i})).await;
                assert_eq!(r["data"]["status"], "healthy", "{r}");
            }
        }));
    }
    for t in publishers.into_iter().chain(askers) {
        tokio::time::timeout(Duration::from_secs(60), t)
            .await
            .expect("publishers and clients finished")
            .unwrap();
    }
    // The reading subscriber got every event, in order per publisher.
    let mut last = [-1i64; 4];
    for _ in 0..EVENTS {
        let m = reader.next().await;
        assert_eq!(m["event"], "load:tick", "{m}");
        let (p, i) = (
            m["data"]["p"].as_u64().unwrap() as usize,
            m["data"]["i"].as_i64().unwrap(),
        );
        assert!(i > last[p], "out of order: {i} after {}", last[p]);
        last[p] = i;
    }
    assert!(
        last.iter().all(|&l| l == (EVENTS / 4) as i64 - 1),
        "{last:?}"
    );
    drop(silent);
}

#[tokio::test]
async fn no_compat_turns_the_listener_off() {
    let dir = tempfile::tempdir().unwrap();
    let _d = Daemon::start(dir.path(), &[("KSI_COMPAT", "false")]).await;
    assert!(!dir.path().join("ksi-compat.sock").exists());
}

/// A real CLI result line from `tests/fixtures/claude-cli/`.
fn cli_result(name: &str) -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/claude-cli")
        .join(name);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("the fixture {} ({e})", path.display()));
    serde_json::from_str(&text).unwrap()
}

fn write_lines(path: &Path, lines: &[String]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, lines.join("\n") + "\n").unwrap();
}

/// An original KSI checkout with logs in the shapes it wrote.
fn original_checkout(root: &Path) -> (String, String, f64) {
    let mut one = cli_result("json_2.1.x_success_sonnet45_scylla.json");
    let two = cli_result("stream_2.1.x_line_result_success.json");
    let (s1, s2) = (
        one["session_id"].as_str().unwrap().to_string(),
        two["session_id"].as_str().unwrap().to_string(),
    );
    let cost =
        one["total_cost_usd"].as_f64().unwrap() + two["total_cost_usd"].as_f64().unwrap() + 0.01;
    let raw_one = one.clone();
    // claude_logs/: the daemon's "human" line, then the CLI result typed "claude".
    one["type"] = json!("claude");
    one["timestamp"] = json!("2025-06-21T10:00:00.123456Z");
    one["process_id"] = json!("a1b2c3d4");
    one["agent_id"] = json!("researcher");
    write_lines(
        &root.join(format!("claude_logs/{s1}.jsonl")),
        &[
            json!({"timestamp": "2025-06-21T09:59:58Z", "type": "human", "content": "Write hello.py"}).to_string(),
            one.to_string(),
            "{\"type\": \"claude\", \"result\": truncated".into(),
        ],
    );
    // An early CLI's result: sessionId and cost_usd, no uuid.
    write_lines(
        &root.join("claude_logs/legacy-session-1.jsonl"),
        &[
            json!({"timestamp": "2025-06-01T08:00:00Z", "type": "human", "content": "Old question"}).to_string(),
            json!({"type": "claude", "timestamp": "2025-06-01T08:00:05Z", "sessionId": "legacy-session-1",
                   "result": "Old answer", "cost_usd": 0.01, "duration_ms": 5000, "num_turns": 1,
                   "is_error": false}).to_string(),
        ],
    );
    std::os::unix::fs::symlink(format!("{s1}.jsonl"), root.join("claude_logs/latest.jsonl"))
        .unwrap();
    // var/logs/responses/: the completion service's envelopes, one of them a copy of the above.
    let envelope = |resp: &Value, req: &str| {
        json!({"ksi": {"provider": "claude-cli", "request_id": req,
                       "timestamp": "2025-07-02T12:00:00Z", "duration_ms": 8722},
               "response": resp})
        .to_string()
    };
    write_lines(
        &root.join(format!("var/logs/responses/{s2}.jsonl")),
        &[
            json!({"type": "user", "timestamp": "2025-07-02T11:59:50Z", "content": "List the files",
                   "request_id": "req-2", "model": "claude-cli/opus", "agent_id": null}).to_string(),
            envelope(&two, "req-2"),
        ],
    );
    write_lines(
        &root.join(format!("var/logs/responses/{s1}.jsonl")),
        &[envelope(&raw_one, "req-1")],
    );
    (s1, s2, cost)
}

fn ksi_json(data_dir: &Path, args: &[&str]) -> Value {
    let out = std::process::Command::new(bin("ksi"))
        .arg("--data-dir")
        .arg(data_dir)
        .args(args)
        .env_remove("KSI_DATA_DIR")
        .output()
        .unwrap();
    assert!(out.status.success(), "ksi {args:?}: {:?}", text(&out));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {:?}", text(&out)))
}

#[test]
fn import_logs_indexes_original_conversations_once() {
    let original = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    let (s1, s2, cost) = original_checkout(original.path());
    let dir = original.path().to_str().unwrap();

    let out = ksi_host(data.path(), &["import-logs", dir, "--json"]);
    assert!(out.status.success(), "{:?}", text(&out));
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["files"], 4, "latest.jsonl is a link, not a log: {r}");
    assert_eq!(r["turns"], 3, "{r}");
    assert_eq!(r["conversations"], 3, "{r}");
    assert_eq!(
        r["already_imported"], 1,
        "the response-log copy of a claude_logs result: {r}"
    );
    assert_eq!(r["skipped"], 1, "{r}");
    assert!(
        r["problems"][0].as_str().unwrap().contains(":3: not JSON"),
        "{r}"
    );
    assert!((r["cost_usd"].as_f64().unwrap() - cost).abs() < 1e-9, "{r}");

    // Twice: nothing new.
    let out = ksi_host(data.path(), &["import-logs", dir, "--json"]);
    let again: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(again["turns"], 0, "{again}");
    assert_eq!(again["already_imported"], 4, "{again}");
    let out = ksi_host(data.path(), &["import-logs", dir]);
    let (stdout, _) = text(&out);
    assert!(
        stdout.contains("imported 0 turns") && stdout.contains("1 lines skipped"),
        "{stdout}"
    );

    // The client sees them: sessions, a transcript with prompt and answer, the cost.
    let sessions = ksi_json(data.path(), &["sessions", "--json"]);
    let ids: Vec<&str> = sessions
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["session_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 3, "{sessions}");
    for id in [s1.as_str(), s2.as_str(), "legacy-session-1"] {
        assert!(ids.contains(&id), "{id} missing from {sessions}");
    }
    let first = sessions
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["session_id"] == s1.as_str())
        .unwrap();
    assert_eq!(first["agent_id"], "researcher", "{first}");
    assert_eq!(first["turns"], 1);
    let t = ksi_json(data.path(), &["sessions", "show", &s1, "--json"]);
    let kinds: Vec<&str> = t
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["prompt", "assistant", "result"], "{t}");
    assert_eq!(t[0]["text"], "Write hello.py");
    assert!(
        t[1]["text"]
            .as_str()
            .unwrap()
            .starts_with("Task completed successfully!"),
        "{t}"
    );
    let t = ksi_json(
        data.path(),
        &["sessions", "show", "legacy-session-1", "--json"],
    );
    assert_eq!(t[0]["text"], "Old question", "{t}");
    let c = ksi_json(data.path(), &["cost", "--json"]);
    assert!(
        (c["total"]["cost_usd"].as_f64().unwrap() - cost).abs() < 1e-9,
        "{c}"
    );
    assert_eq!(c["total"]["calls"], 3, "{c}");
    assert!(
        c["by_model"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["key"] == "claude-sonnet-4-5-20250929"),
        "the costliest model of modelUsage: {c}"
    );
}

#[test]
fn import_logs_refuses_a_directory_without_logs() {
    let empty = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    let out = ksi_host(
        data.path(),
        &["import-logs", empty.path().to_str().unwrap()],
    );
    assert!(!out.status.success());
    let (_, stderr) = text(&out);
    assert!(
        stderr.contains("neither claude_logs/ nor var/logs/responses/"),
        "{stderr}"
    );
}
