//! Operations: the API token, rate limiting, the audit log, JSON log files and scheduled
//! backups, on a real daemon.

use std::path::Path;
use std::time::Duration;

use ksi_host::cli::client::DaemonClient;
use serde_json::{Value, json};

use crate::support::{Daemon, ksi_host, text};

/// One request with extra headers; returns (status, headers, JSON body or {"text": ...}).
async fn request(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<Value>,
) -> (u16, hyper::HeaderMap, Value) {
    use http_body_util::{BodyExt, Full};
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let mut req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "localhost")
        .header("content-type", "application/json");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let req = req.body(Full::new(hyper::body::Bytes::from(body))).unwrap();
    let resp = sender.send_request(req).await.unwrap();
    let (status, headers) = (resp.status().as_u16(), resp.headers().clone());
    // A stream never ends: its status and headers are all a test needs.
    if headers
        .get("content-type")
        .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"))
    {
        return (status, headers, Value::Null);
    }
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    let v = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| json!({ "text": String::from_utf8_lossy(&bytes) }));
    (status, headers, v)
}

fn rotate(dir: &Path) -> String {
    let o = ksi_host(dir, &["token", "rotate"]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}{err}");
    out.trim().to_string()
}

#[tokio::test]
async fn tcp_requests_need_the_token_once_it_exists_and_rotation_takes_effect_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path(), &[]).await;
    // No token file: loopback TCP is open.
    let (s, _, _) = request(d.port, "GET", "/workflows", &[], None).await;
    assert_eq!(s, 200);

    let old = rotate(dir.path());
    let shown = ksi_host(dir.path(), &["token", "show"]);
    assert_eq!(text(&shown).0.trim(), old);

    let (s, _, b) = request(d.port, "GET", "/workflows", &[], None).await;
    assert_eq!(
        (s, b["error"]["code"].as_str()),
        (401, Some("token_required"))
    );
    let msg = b["error"]["message"].as_str().unwrap();
    assert!(msg.contains("Authorization: Bearer <token>"), "{msg}");
    assert!(msg.contains("ksi-host token show"), "{msg}");

    let (s, _, b) = request(
        d.port,
        "GET",
        "/workflows",
        &[("authorization", "Bearer not-the-token")],
        None,
    )
    .await;
    assert_eq!((s, b["error"]["code"].as_str()), (401, Some("token_wrong")));

    let bearer_old = format!("Bearer {old}");
    let (s, _, _) = request(
        d.port,
        "GET",
        "/workflows",
        &[("authorization", &bearer_old)],
        None,
    )
    .await;
    assert_eq!(s, 200);

    // Open without a token: the health probe and the dashboard page.
    assert_eq!(request(d.port, "GET", "/health", &[], None).await.0, 200);
    assert_eq!(request(d.port, "GET", "/", &[], None).await.0, 200);
    let (s, _, _) = request(
        d.port,
        "GET",
        "/health",
        &[("authorization", "Token malformed")],
        None,
    )
    .await;
    assert_eq!(s, 200, "a probe with a stray header still gets its answer");
    // The live stream takes the token as a query parameter (an EventSource cannot set headers).
    let (s, _, _) = request(
        d.port,
        "GET",
        &format!("/events/stream?topic=%3E&named=false&access_token={old}"),
        &[("accept", "text/event-stream")],
        None,
    )
    .await;
    assert_eq!(s, 200);
    let (s, _, _) = request(
        d.port,
        "GET",
        "/events/stream?topic=%3E&access_token=wrong",
        &[("accept", "text/event-stream")],
        None,
    )
    .await;
    assert_eq!(s, 401);

    // The Unix socket is trusted.
    let client = DaemonClient::find(dir.path()).await.expect("socket");
    let (s, _) = client.request("GET", "/workflows", None).await.unwrap();
    assert_eq!(s, 200);

    // Rotation: the running daemon takes the new token, and the old one stops working.
    let new = rotate(dir.path());
    assert_ne!(new, old);
    let (s, _, _) = request(
        d.port,
        "GET",
        "/workflows",
        &[("authorization", &bearer_old)],
        None,
    )
    .await;
    assert_eq!(s, 401);
    let bearer_new = format!("Bearer {new}");
    let (s, _, _) = request(
        d.port,
        "GET",
        "/workflows",
        &[("authorization", &bearer_new)],
        None,
    )
    .await;
    assert_eq!(s, 200);
}

#[tokio::test]
async fn a_client_over_its_rate_gets_429_with_retry_after_and_others_are_not_affected() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(
        dir.path(),
        &[("KSI_API_RATE_PER_S", "1"), ("KSI_API_RATE_BURST", "3")],
    )
    .await;
    let mut limited = None;
    for _ in 0..10 {
        let (s, headers, b) = request(d.port, "GET", "/workflows", &[], None).await;
        if s == 429 {
            limited = Some((headers, b));
            break;
        }
        assert_eq!(s, 200);
    }
    let (headers, b) = limited.expect("a burst of 3 at 1/s is exhausted within 10 requests");
    assert_eq!(b["error"]["code"], "rate_limited");
    let msg = b["error"]["message"].as_str().unwrap();
    assert!(msg.contains("1 per second with bursts of 3"), "{msg}");
    let retry: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=2).contains(&retry), "Retry-After {retry}");
    // The Unix socket is another client with its own bucket.
    let client = DaemonClient::find(dir.path()).await.expect("socket");
    let (s, _) = client.request("GET", "/workflows", None).await.unwrap();
    assert_eq!(s, 200);
    // The bucket refills.
    tokio::time::sleep(Duration::from_secs(retry)).await;
    assert_eq!(request(d.port, "GET", "/workflows", &[], None).await.0, 200);
}

/// Polls `GET /audit` over the Unix socket until `n` entries exist.
async fn audit_entries(dir: &Path, n: usize) -> Vec<Value> {
    let client = DaemonClient::find(dir).await.expect("socket");
    for _ in 0..100 {
        let b = client.get("/audit?since=0").await.unwrap();
        let entries = b["entries"].as_array().unwrap().clone();
        if entries.len() >= n {
            return entries;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("fewer than {n} audit entries after 5 s");
}

#[tokio::test]
async fn every_mutating_call_is_audited_with_who_what_and_outcome() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path(), &[]).await;
    // Anonymous TCP (no token file yet), a refused one, the Unix socket, then a token.
    let (s, _, ev) = request(
        d.port,
        "POST",
        "/events",
        &[],
        Some(json!({"topic": "audit.test", "data": {"note": "x".repeat(200)}})),
    )
    .await;
    assert_eq!(s, 201);
    let (s, _, _) = request(
        d.port,
        "POST",
        "/workflows",
        &[],
        Some(json!({"type": "no-such-type"})),
    )
    .await;
    assert_eq!(s, 400);
    let client = DaemonClient::find(dir.path()).await.unwrap();
    let (s, wf) = client
        .request(
            "POST",
            "/workflows",
            Some(json!({"type": "debate", "params": {"topic": "audits"}})),
        )
        .await
        .unwrap();
    assert_eq!(s, 201, "{wf}");
    let token = rotate(dir.path());
    let (s, _, _) = request(
        d.port,
        "POST",
        "/events",
        &[],
        Some(json!({"topic": "audit.refused", "data": {}})),
    )
    .await;
    assert_eq!(s, 401);
    let bearer = format!("Bearer {token}");
    let (s, _, _) = request(
        d.port,
        "POST",
        "/events",
        &[("authorization", &bearer)],
        Some(json!({"topic": "audit.token", "data": {}})),
    )
    .await;
    assert_eq!(s, 201);
    // Reads are not audited.
    request(
        d.port,
        "GET",
        "/workflows",
        &[("authorization", &bearer)],
        None,
    )
    .await;

    let entries = audit_entries(dir.path(), 5).await;
    assert_eq!(entries.len(), 5, "{entries:#?}");
    let who: Vec<(&str, &str, u64)> = entries
        .iter()
        .map(|e| {
            (
                e["client"].as_str().unwrap(),
                e["path"].as_str().unwrap(),
                e["status"].as_u64().unwrap(),
            )
        })
        .collect();
    let token_id = ksi_host::api::token::token_id(&token);
    assert_eq!(
        who,
        [
            ("anonymous", "/events", 201),
            ("anonymous", "/workflows", 400),
            ("unix socket", "/workflows", 201),
            ("127.0.0.1", "/events", 401),
            (token_id.as_str(), "/events", 201),
        ]
    );
    assert_eq!(entries[0]["resource"], format!("events:{}", ev["id"]));
    assert!(
        entries[0]["peer"]
            .as_str()
            .unwrap()
            .starts_with("127.0.0.1:")
    );
    let summary = entries[0]["summary"].as_str().unwrap();
    assert!(
        summary.contains("audit.test") && summary.len() < 200,
        "{summary}"
    );
    assert_eq!(entries[2]["resource"], wf["id"]);
    assert_eq!(entries[2]["peer"], Value::Null);
    assert!(entries.iter().all(|e| e["at"].as_i64().unwrap() > 0));

    // Paging, and the same log from the command line.
    let b = client
        .get(&format!("/audit?since={}&limit=2", entries[1]["id"]))
        .await
        .unwrap();
    let ids: Vec<&Value> = b["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| &e["id"])
        .collect();
    assert_eq!(ids, [&entries[2]["id"], &entries[3]["id"]]);
    let (s, b) = client
        .request("GET", "/audit?since=-1", None)
        .await
        .unwrap();
    assert_eq!((s, b["error"]["field"].as_str()), (400, Some("since")));
    let o = ksi_host(dir.path(), &["audit", "--json"]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    let cli: Vec<Value> = serde_json::from_str(&out).unwrap();
    assert_eq!(cli, entries);
    let o = ksi_host(dir.path(), &["audit"]);
    let (out, _) = text(&o);
    assert!(
        out.contains("unix socket") && out.contains("POST /workflows"),
        "{out}"
    );
}

#[tokio::test]
async fn json_log_lines_parse_and_carry_process_and_workflow_ids() {
    let dir = tempfile::tempdir().unwrap();
    let logs = dir.path().join("logs");
    let log_file = logs.join("ksi.log");
    let d = Daemon::start(
        dir.path(),
        &[
            ("RUST_LOG", "ksi_host=info"),
            ("KSI_LOG_FORMAT", "json"),
            ("KSI_LOG_FILE", log_file.to_str().unwrap()),
        ],
    )
    .await;
    let (s, b) = d.post("/spawn", &json!({"prompt": "hello"})).await.unwrap();
    assert_eq!(s, 201, "{b}");
    let pid = b["process_id"].as_str().unwrap().to_string();
    let (s, b) = d
        .post(
            "/workflows",
            &json!({"type": "debate", "params": {"topic": "logs"}}),
        )
        .await
        .unwrap();
    assert_eq!(s, 201, "{b}");
    let wid = b["id"].as_str().unwrap().to_string();
    for _ in 0..200 {
        let (_, w) = d.get(&format!("/workflows/{wid}")).await.unwrap();
        if w["status"] == "completed" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Daily rotation names the file ksi.<date>.log.
    let files: Vec<_> = std::fs::read_dir(&logs)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    assert!(
        files[0].starts_with("ksi.") && files[0].ends_with(".log"),
        "{files:?}"
    );
    let content = std::fs::read_to_string(logs.join(&files[0])).unwrap();
    let lines: Vec<Value> = content
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(
        lines
            .iter()
            .all(|l| l["level"].is_string() && l["timestamp"].is_string())
    );
    let in_span = |name: &str, field: &str, id: &str| {
        lines.iter().any(|l| {
            l["spans"]
                .as_array()
                .is_some_and(|spans| spans.iter().any(|s| s["name"] == name && s[field] == id))
        })
    };
    assert!(in_span("claude_call", "process_id", &pid), "{content}");
    assert!(in_span("workflow_step", "workflow_id", &wid), "{content}");
}

/// Polls the bus until `n` events of `topic` exist.
async fn events_of(d: &Daemon, topic: &str, n: usize) -> Vec<Value> {
    for _ in 0..200 {
        let (_, b) = d.get(&format!("/events?topic={topic}")).await.unwrap();
        let evs = b["events"].as_array().unwrap().clone();
        if evs.len() >= n {
            return evs;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("fewer than {n} {topic} events after 10 s");
}

#[tokio::test]
async fn scheduled_backups_compress_old_ones_keep_n_and_restore_compressed() {
    let dir = tempfile::tempdir().unwrap();
    let backups = dir.path().join("bk");
    let d = Daemon::start(
        dir.path(),
        &[
            ("KSI_BACKUP_INTERVAL", "300ms"),
            ("KSI_BACKUP_KEEP", "2"),
            ("KSI_BACKUP_DIR", backups.to_str().unwrap()),
        ],
    )
    .await;
    let (s, marker) = d
        .post(
            "/events",
            &json!({"topic": "before.backup", "data": {"n": 1}}),
        )
        .await
        .unwrap();
    assert_eq!(s, 201);
    let done = events_of(&d, "system.backup.completed", 4).await;
    let last = &done.last().unwrap()["event"]["data"];
    assert_eq!(last["integrity"], "ok");
    assert!(
        last["destination"].as_str().unwrap().ends_with(".db"),
        "{last}"
    );
    // Stop the daemon (a restore needs it stopped): SIGTERM lets a backup in progress finish.
    let mut d = d;
    // SAFETY: signalling our own child process.
    unsafe { libc::kill(d.child.id() as i32, libc::SIGTERM) };
    let status = d.child.wait().unwrap();
    assert!(
        status.success(),
        "the daemon drained and exited 0: {status}"
    );

    let mut names: Vec<String> = std::fs::read_dir(&backups)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names.len(), 2, "keep 2: {names:?}");
    assert!(
        names[0].starts_with("ksi-") && names[0].ends_with(".db.gz"),
        "{names:?}"
    );
    assert!(
        names[1].ends_with(".db"),
        "the newest stays plain: {names:?}"
    );

    // A compressed backup restores, with the data it held.
    let o = ksi_host(
        dir.path(),
        &[
            "restore",
            backups.join(&names[0]).to_str().unwrap(),
            "--json",
        ],
    );
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}{err}");
    let r: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(r["integrity"], "ok");
    let o = ksi_host(
        dir.path(),
        &["events", "list", "--topic", "before.backup", "--json"],
    );
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    let rows: Vec<Value> = serde_json::from_str(&out).unwrap();
    assert!(
        rows.iter()
            .any(|r| r["id"] == marker["id"] || r["event"]["id"] == marker["id"]),
        "{out}"
    );
}

#[tokio::test]
async fn a_failing_scheduled_backup_publishes_system_backup_failed() {
    let dir = tempfile::tempdir().unwrap();
    // A backup dir below a regular file cannot be created.
    let blocker = dir.path().join("not-a-dir");
    std::fs::write(&blocker, b"").unwrap();
    let d = Daemon::start(
        dir.path(),
        &[
            ("KSI_BACKUP_INTERVAL", "200ms"),
            ("KSI_BACKUP_DIR", blocker.join("bk").to_str().unwrap()),
        ],
    )
    .await;
    let failed = events_of(&d, "system.backup.failed", 1).await;
    let err = failed[0]["event"]["data"]["error"].as_str().unwrap();
    assert!(err.contains("creating the backup directory"), "{err}");
}

#[test]
fn whatever_the_umask_the_data_dir_its_files_and_its_socket_are_private() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    // A debate run under umask 022 writes the database, session logs, archived prompts and
    // checkpoints: none of them may be readable by another user.
    let o = std::process::Command::new("sh")
        .arg("-c")
        .arg("umask 022; exec \"$0\" --data-dir \"$1\" run debate --topic Privacy --param rounds=0 --claude-bin \"$2\"")
        .arg(crate::support::bin("ksi"))
        .arg(&data)
        .arg(crate::support::bin("fake-claude"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&data), 0o700, "the data dir");
    let logs: Vec<_> = std::fs::read_dir(data.join("claude_logs"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(!logs.is_empty(), "the debate wrote session logs");
    let (wide, seen) = ksi_host::store::wider_than_private(&data, 50);
    assert!(seen > logs.len() + 5, "looked at {seen} entries");
    assert!(wide.is_empty(), "readable by others: {wide:?}");

    // A file someone made wider is named at the next start; under umask 002 the socket is
    // still the owner's only.
    std::fs::set_permissions(&logs[0], std::fs::Permissions::from_mode(0o644)).unwrap();
    let mut child = std::process::Command::new("sh")
        .arg("-c")
        .arg("umask 002; exec \"$0\" --data-dir \"$1\" --log-level warn serve --listen 127.0.0.1:0 --claude-bin \"$2\"")
        .arg(crate::support::bin("ksi-host"))
        .arg(&data)
        .arg(crate::support::bin("fake-claude"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let sock = data.join("ksi.sock");
    let t0 = std::time::Instant::now();
    while !sock.exists() {
        assert!(t0.elapsed() < Duration::from_secs(60), "no socket");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(mode(&sock), 0o600, "ksi.sock");
    child.kill().unwrap();
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("{} (644)", logs[0].display())) && err.contains("chmod -R go-rwx"),
        "the start-up check names the wide file: {err}"
    );
}
