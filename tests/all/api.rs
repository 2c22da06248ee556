//! The HTTP API of a running daemon: every route, bad input, the OpenAPI document, the live
//! stream with resume.

use serde_json::json;

use crate::support::{Daemon, http_raw};

#[tokio::test]
async fn health_reports_database_disk_and_queue() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path(), &[]).await;
    let (status, body) = d.get("/health").await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "healthy");
    assert_eq!(body["database"]["ok"], true);
    assert!(body["disk"]["free_bytes"].as_u64().unwrap() > 0);
    assert!(body["queue"]["open_deliveries"].is_number());
}

#[tokio::test]
async fn events_publish_list_and_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path(), &[]).await;
    let (s, b) = d
        .post("/events", &json!({"topic": "demo.one", "data": {"n": 1}}))
        .await
        .unwrap();
    assert_eq!(s, 201, "{b}");
    let id = b["id"].as_i64().unwrap();
    let (s, b) = d.get("/events?topic=demo.*&limit=10").await.unwrap();
    assert_eq!(s, 200);
    assert!(
        b["events"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["event"]["id"] == id)
    );

    // Wrong types, missing fields, bad topics, bad queries: 4xx naming the problem.
    let (s, b) = d
        .post("/events", &json!({"topic": 5, "data": {}}))
        .await
        .unwrap();
    assert_eq!(s, 422, "{b}");
    assert!(
        b["error"]["message"]
            .as_str()
            .unwrap()
            .contains("invalid type"),
        "{b}"
    );
    let (s, b) = d.post("/events", &json!({"data": {}})).await.unwrap();
    assert_eq!(s, 422);
    assert_eq!(b["error"]["field"], "topic", "{b}");
    let (s, b) = d
        .post("/events", &json!({"topic": "a..b", "data": {}}))
        .await
        .unwrap();
    assert_eq!(s, 400);
    assert_eq!(b["error"]["field"], "topic");
    let (s, b) = http_raw(
        d.port,
        "POST",
        "/events",
        Some(b"{nope".to_vec()),
        "application/json",
    )
    .await
    .unwrap();
    assert_eq!(s, 400, "{b}");
    assert_eq!(b["error"]["code"], "malformed_json");
    let (s, _) = http_raw(
        d.port,
        "POST",
        "/events",
        Some(b"{}".to_vec()),
        "text/plain",
    )
    .await
    .unwrap();
    assert_eq!(s, 415);
    let (s, b) = d.get("/events?limit=0").await.unwrap();
    assert_eq!((s, b["error"]["field"].as_str()), (400, Some("limit")));
    let (s, _) = d.get("/events?limit=abc").await.unwrap();
    assert_eq!(s, 400);
    let (s, b) = d.get("/events?status=bogus").await.unwrap();
    assert_eq!(s, 400, "{b}");
    let (s, b) = d.get("/events?topic=a.%3E.b").await.unwrap();
    assert_eq!((s, b["error"]["field"].as_str()), (400, Some("topic")));
    let big = vec![b'x'; 2 * 1024 * 1024];
    let mut body = b"{\"topic\":\"a.b\",\"data\":\"".to_vec();
    body.extend(big);
    body.extend(b"\"}");
    let (s, b) = http_raw(d.port, "POST", "/events", Some(body), "application/json")
        .await
        .unwrap();
    assert_eq!(s, 413, "{b}");
    let (s, _) = d.get("/no/such/route").await.unwrap();
    assert_eq!(s, 404);
}

#[tokio::test]
async fn workflows_routes_and_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path(), &[]).await;
    let (s, b) = d.get("/workflow-types").await.unwrap();
    assert_eq!(s, 200);
    let names: Vec<&str> = b["workflow_types"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    for want in ["analysis", "collaboration", "debate", "teaching"] {
        assert!(names.contains(&want), "{names:?}");
    }
    let (s, b) = d
        .post("/workflows", &json!({"type": "nope"}))
        .await
        .unwrap();
    assert_eq!(
        (s, b["error"]["field"].as_str()),
        (400, Some("type")),
        "{b}"
    );
    let (s, b) = d
        .post("/workflows", &json!({"type": "debate", "params": [1]}))
        .await
        .unwrap();
    assert_eq!(
        (s, b["error"]["field"].as_str()),
        (400, Some("params")),
        "{b}"
    );
    let (s, b) = d.post("/workflows", &json!({"params": {}})).await.unwrap();
    assert_eq!(
        (s, b["error"]["field"].as_str()),
        (422, Some("type")),
        "{b}"
    );
    let (s, _) = d.get("/workflows/wf_missing").await.unwrap();
    assert_eq!(s, 404);
    let (s, _) = d
        .post("/workflows/wf_missing/cancel", &json!({}))
        .await
        .unwrap();
    assert_eq!(s, 404);
    let (s, b) = d.get("/workflows?status=sideways").await.unwrap();
    assert_eq!((s, b["error"]["field"].as_str()), (400, Some("status")));

    let (s, b) = d
        .post(
            "/workflows",
            &json!({"type": "debate", "params": {"topic": "APIs", "rounds": 0}}),
        )
        .await
        .unwrap();
    assert_eq!(s, 201, "{b}");
    let id = b["id"].as_str().unwrap().to_string();
    let (s, b) = d.get(&format!("/workflows/{id}")).await.unwrap();
    assert_eq!(s, 200);
    assert_eq!(b["type"], "debate");
    let (s, b) = d.get("/workflows?limit=5").await.unwrap();
    assert_eq!(s, 200);
    assert!(
        b["workflows"]
            .as_array()
            .unwrap()
            .iter()
            .any(|w| w["id"] == id.as_str())
    );
    let (s, b) = d
        .post(&format!("/workflows/{id}/fly"), &json!({}))
        .await
        .unwrap();
    assert_eq!(s, 404, "{b}");
    let (s, b) = d
        .post(&format!("/workflows/{id}/retry-from"), &json!({}))
        .await
        .unwrap();
    assert!(s == 400 || s == 409, "{s} {b}");
    let (s, _) = d.get(&format!("/workflows/{id}/transcript")).await.unwrap();
    assert_eq!(s, 200);
}

#[tokio::test]
async fn openapi_lists_every_route() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path(), &[]).await;
    let (s, doc) = d.get("/openapi.json").await.unwrap();
    assert_eq!(s, 200);
    assert_eq!(doc["openapi"], "3.0.3");
    // It is a valid OpenAPI 3.0 document (the object model rejects unknown shapes)...
    let parsed: openapiv3::OpenAPI = serde_json::from_value(doc.clone())
        .unwrap_or_else(|e| panic!("the OpenAPI document does not validate: {e}"));
    assert!(!parsed.paths.paths.is_empty());
    // ... and every reference in it resolves.
    fn refs(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, x) in m {
                    match (k.as_str(), x) {
                        ("$ref", serde_json::Value::String(r)) => out.push(r.clone()),
                        _ => refs(x, out),
                    }
                }
            }
            serde_json::Value::Array(a) => a.iter().for_each(|x| refs(x, out)),
            _ => {}
        }
    }
    let mut all = Vec::new();
    refs(&doc, &mut all);
    for r in &all {
        let pointer = r
            .strip_prefix('#')
            .unwrap_or_else(|| panic!("{r} is not a local reference"));
        assert!(doc.pointer(pointer).is_some(), "{r} does not resolve");
    }
    let paths = doc["paths"].as_object().unwrap();
    // Every documented path answers something other than the router's 404 fallback, and
    // every route the daemon serves is documented (the list below is the router's).
    let served = [
        "/health",
        "/metrics",
        "/openapi.json",
        "/events",
        "/events/stream",
        "/workflows",
        "/workflow-types",
        "/workflows/{id}",
        "/workflows/{id}/transcript",
        "/workflows/{id}/{action}",
        "/spawn",
        "/processes",
        "/processes/{id}",
        "/agents",
        "/plugins",
        "/processes/{id}/result",
        "/agents/{id}/messages",
        "/cost",
        "/sessions",
        "/sessions/{id}",
        "/schedules",
        "/schedules/{id}",
        "/audit",
    ];
    for p in served {
        assert!(
            paths.contains_key(p),
            "route {p} is not in the OpenAPI document"
        );
    }
    for p in paths.keys() {
        assert!(
            served.contains(&p.as_str()),
            "documented path {p} is not served"
        );
        for (method, op) in paths[p].as_object().unwrap() {
            assert!(["get", "post", "delete"].contains(&method.as_str()));
            assert!(op["responses"].is_object(), "{p} {method} has responses");
        }
    }
}

#[tokio::test]
async fn metrics_are_prometheus_text() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path(), &[]).await;
    let (s, b) = d.get("/metrics").await.unwrap();
    assert_eq!(s, 200);
    let text = b["text"].as_str().unwrap();
    assert!(text.contains("# TYPE ksi_deliveries gauge"), "{text}");
    assert!(text.contains("ksi_step_latency_ms_count"), "{text}");
}

/// Reads Server-Sent Events from `/events/stream` until `n` events arrived.
async fn sse_events(
    port: u16,
    query: &str,
    last_id: Option<i64>,
    n: usize,
) -> Vec<serde_json::Value> {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let mut req = format!(
        "GET /events/stream?{query} HTTP/1.1\r\nHost: localhost\r\nAccept: text/event-stream\r\n"
    );
    if let Some(id) = last_id {
        req.push_str(&format!("Last-Event-ID: {id}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut lines = BufReader::new(s).lines();
    let mut out = Vec::new();
    while out.len() < n {
        let line = tokio::time::timeout(std::time::Duration::from_secs(10), lines.next_line())
            .await
            .expect("event in time")
            .unwrap()
            .unwrap();
        // Chunked transfer: data lines may carry chunk-size lines between them.
        if let Some(data) = line
            .strip_prefix("data: ")
            .or_else(|| line.strip_prefix("data:"))
        {
            out.push(serde_json::from_str(data).unwrap());
        }
    }
    out
}

#[tokio::test]
async fn a_reconnecting_stream_client_gets_exactly_the_missed_events_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path(), &[]).await;
    // First connection: sees e1, then disconnects.
    let reader = tokio::spawn(sse_events(d.port, "topic=live.*", None, 1));
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    d.post("/events", &json!({"topic": "live.a", "data": {"n": 1}}))
        .await
        .unwrap();
    let first = reader.await.unwrap();
    let last_id = first[0]["id"].as_i64().unwrap();
    // While disconnected: three more (and noise on another topic).
    for n in 2..=4 {
        d.post("/events", &json!({"topic": "live.a", "data": {"n": n}}))
            .await
            .unwrap();
        d.post("/events", &json!({"topic": "other.x", "data": {}}))
            .await
            .unwrap();
    }
    let missed = sse_events(d.port, "topic=live.*", Some(last_id), 3).await;
    let ns: Vec<i64> = missed
        .iter()
        .map(|e| e["data"]["n"].as_i64().unwrap())
        .collect();
    assert_eq!(ns, [2, 3, 4]);
    // The query parameter works as well as the header.
    let again = sse_events(d.port, &format!("topic=live.*&last_id={last_id}"), None, 3).await;
    assert_eq!(again, missed);
}

#[tokio::test]
async fn spawn_processes_agents_and_plugins() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path(), &[]).await;
    let (s, b) = d
        .post("/spawn", &json!({"prompt": "hello", "agent": "alice"}))
        .await
        .unwrap();
    assert_eq!(s, 201, "{b}");
    assert!(
        b["answer"]["text"]
            .as_str()
            .unwrap()
            .starts_with("[simulated]")
    );
    let pid = b["process_id"].as_str().unwrap().to_string();
    let (s, p) = d.get(&format!("/processes/{pid}")).await.unwrap();
    assert_eq!((s, p["status"].as_str()), (200, Some("COMPLETED")), "{p}");
    let (s, b) = d.get("/processes?status=COMPLETED&limit=10").await.unwrap();
    assert_eq!(s, 200);
    assert!(
        b["processes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["id"] == pid.as_str())
    );
    let (s, b) = d.get("/agents").await.unwrap();
    assert_eq!(s, 200);
    assert!(
        b["agents"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["id"] == "alice"),
        "{b}"
    );
    let (s, b) = d.get("/plugins").await.unwrap();
    assert_eq!(s, 200);
    assert!(
        b["plugins"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["name"] == "debate")
    );
    // Bad input: 4xx naming the problem.
    let (s, b) = d.post("/spawn", &json!({"prompt": ""})).await.unwrap();
    assert_eq!((s, b["error"]["field"].as_str()), (400, Some("prompt")));
    let (s, b) = d.post("/spawn", &json!({"prompt": 3})).await.unwrap();
    assert_eq!(s, 422, "{b}");
    let (s, _) = d.get("/processes/proc_nope").await.unwrap();
    assert_eq!(s, 404);
    let (s, b) = d.get("/processes?status=LOST").await.unwrap();
    assert_eq!((s, b["error"]["field"].as_str()), (400, Some("status")));
    let (s, b) = d.get("/health").await.unwrap();
    assert_eq!(s, 200);
    assert!(
        b["parts"]["plugins"]["loaded"].as_u64().unwrap() >= 4,
        "{b}"
    );
}

#[tokio::test]
async fn the_dashboard_page_is_served_and_reads_the_live_stream() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path(), &[]).await;
    let (s, b) = d.get("/").await.unwrap();
    assert_eq!(s, 200);
    let html = b["text"].as_str().unwrap();
    for needle in [
        "EventSource(\"/events/stream?topic=%3E&named=false\"",
        "&access_token=",
        "Authorization: \"Bearer \" + TOKEN",
        "/workflows?limit=50",
        "/transcript",
        "/processes?limit=20",
        "/plugins",
    ] {
        assert!(html.contains(needle), "the page uses {needle}");
    }
    // The unnamed stream it reads delivers events as plain `message` events.
    let (s, _) = d
        .post("/events", &json!({"topic": "dash.ping", "data": {}}))
        .await
        .unwrap();
    assert_eq!(s, 201);
}

#[tokio::test]
async fn cost_sessions_schedules_messages_and_results_answer_and_refuse_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path(), &[]).await;
    let (s, b) = d
        .post(
            "/spawn",
            &json!({"prompt": "count me", "agent": "dora", "wait": false}),
        )
        .await
        .unwrap();
    assert_eq!(s, 202, "{b}");
    let pid = b["process_id"].as_str().unwrap().to_string();
    let (s, r) = d.get(&format!("/processes/{pid}/result")).await.unwrap();
    assert_eq!(s, 200, "{r}");
    let session = r["answer"]["session_id"].as_str().unwrap().to_string();
    assert!(
        r["answer"]["text"]
            .as_str()
            .unwrap()
            .starts_with("[simulated]")
    );
    let (s, c) = d.get("/cost").await.unwrap();
    assert_eq!(s, 200);
    // fake-claude's call is simulated: kept apart from paid calls and real money.
    assert_eq!(c["total"]["simulated_calls"], 1, "{c}");
    assert_eq!(c["total"]["calls"], 0, "{c}");
    assert!(
        c["by_agent"]
            .as_array()
            .unwrap()
            .iter()
            .any(|l| l["key"] == "dora")
    );
    let (_, b) = d.get("/sessions").await.unwrap();
    assert_eq!(b["sessions"][0]["session_id"], session.as_str(), "{b}");
    let (s, t) = d.get(&format!("/sessions/{session}")).await.unwrap();
    assert_eq!(s, 200, "{t}");
    let kinds: Vec<&str> = t["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert!(
        kinds.contains(&"prompt") && kinds.contains(&"assistant"),
        "{t}"
    );

    let (s, m) = d
        .post(
            "/agents/dora/messages",
            &json!({"text": "next time, shorter"}),
        )
        .await
        .unwrap();
    assert_eq!(s, 201, "{m}");
    let (s, sch) = d
        .post(
            "/schedules",
            &json!({"cron": "*/5 * * * *", "type": "debate", "params": {"topic": "t"}}),
        )
        .await
        .unwrap();
    assert_eq!(s, 201, "{sch}");
    let id = sch["id"].as_str().unwrap();
    let (s, _) = crate::support::http(d.port, "DELETE", &format!("/schedules/{id}"), None)
        .await
        .unwrap();
    assert_eq!(s, 200);

    // Bad input: 4xx naming the problem.
    let (s, b) = crate::support::http(d.port, "DELETE", &format!("/schedules/{id}"), None)
        .await
        .unwrap();
    assert_eq!(s, 404, "removed twice: {b}");
    // A seconds field would start a paid debate every second: five fields only.
    let (s, b) = d
        .post(
            "/schedules",
            &json!({"cron": "* * * * * *", "type": "debate", "params": {"topic": "t"}}),
        )
        .await
        .unwrap();
    assert_eq!(s, 400, "{b}");
    assert!(
        b["error"]["message"]
            .as_str()
            .unwrap()
            .contains("exactly 5"),
        "{b}"
    );
    let (s, b) = d
        .post(
            "/schedules",
            &json!({"cron": "every day", "type": "debate"}),
        )
        .await
        .unwrap();
    assert_eq!(
        (s, b["error"]["field"].as_str()),
        (400, Some("cron")),
        "{b}"
    );
    let (s, b) = d
        .post(
            "/schedules",
            &json!({"cron": "0 9 * * *", "type": "nosuch"}),
        )
        .await
        .unwrap();
    assert_eq!(
        (s, b["error"]["field"].as_str()),
        (400, Some("type")),
        "{b}"
    );
    let (s, b) = d
        .post("/agents/bad%20id!/messages", &json!({"text": "x"}))
        .await
        .unwrap();
    assert_eq!(s, 400, "{b}");
    let (s, b) = d
        .post("/agents/dora/messages", &json!({"text": " "}))
        .await
        .unwrap();
    assert_eq!((s, b["error"]["field"].as_str()), (400, Some("text")));
    let (s, _) = d.get("/sessions/..%2Fksi.db").await.unwrap();
    assert_eq!(s, 400);
    let (s, _) = d.get("/sessions/abcdef-not-a-known-session").await.unwrap();
    assert_eq!(s, 404);
    let (s, _) = d.get("/processes/p-nope/result").await.unwrap();
    assert_eq!(s, 404);
    let (s, b) = d.get("/events?latest=2&since=1").await.unwrap();
    assert_eq!((s, b["error"]["field"].as_str()), (400, Some("latest")));
    let (s, b) = d.get("/events?latest=2").await.unwrap();
    assert_eq!(s, 200);
    let evs = b["events"].as_array().unwrap();
    assert_eq!(evs.len(), 2, "{b}");
    assert!(evs[0]["event"]["id"].as_i64() < evs[1]["event"]["id"].as_i64());
}

#[test]
fn docs_api_md_is_the_rendering_of_the_openapi_document() {
    let out = std::process::Command::new(crate::support::bin("ksi-host"))
        .args(["openapi", "--markdown"])
        .output()
        .unwrap();
    let (stdout, stderr) = crate::support::text(&out);
    assert!(out.status.success(), "{stderr}");
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/api.md");
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == stdout,
        "docs/api.md is out of date with host/src/api/openapi.json; regenerate it with `{}` \
         (from the repository root) and commit it",
        ksi_host::api::reference::REGENERATE
    );
    // The plain form prints the document the daemon serves.
    let plain = std::process::Command::new(crate::support::bin("ksi-host"))
        .arg("openapi")
        .output()
        .unwrap();
    let doc: serde_json::Value = serde_json::from_slice(&plain.stdout).unwrap();
    assert_eq!(doc["openapi"], "3.0.3");
}

#[test]
fn bench_api_reports_every_endpoint_and_the_daemons_footprint() {
    let dir = tempfile::tempdir().unwrap();
    let out = crate::support::ksi_host(
        dir.path(),
        &[
            "bench",
            "api",
            "--json",
            "--clients",
            "4",
            "--seconds",
            "0.5",
            "--rate",
            "200",
            "--idle-seconds",
            "0.5",
        ],
    );
    let (stdout, stderr) = crate::support::text(&out);
    assert!(out.status.success(), "{stderr}");
    let r: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(r["clients"], 4);
    let names: Vec<&str> = r["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["endpoint"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        ["GET /health", "POST /events", "GET /workflows/{id}"]
    );
    for e in r["endpoints"].as_array().unwrap() {
        for phase in ["ceiling", "paced"] {
            let p = &e[phase];
            assert!(p["requests"].as_u64().unwrap() > 0, "{e}");
            assert_eq!(p["errors"], 0, "{e}");
            let (p50, p99, max) = (
                p["p50_ms"].as_f64().unwrap(),
                p["p99_ms"].as_f64().unwrap(),
                p["max_ms"].as_f64().unwrap(),
            );
            assert!(0.0 < p50 && p50 <= p99 && p99 <= max, "{e}");
            assert!(p["req_per_s"].as_f64().unwrap() > 0.0, "{e}");
        }
    }
    // The daemon's own footprint, read from /proc: a live process's numbers.
    let idle = r["idle_rss_mb"].as_f64().unwrap();
    assert!(idle > 1.0 && idle < 4096.0, "{r}");
    assert!(r["after_rss_mb"].as_f64().unwrap() > 1.0, "{r}");
    assert!(r["idle_cpu_percent"].as_f64().unwrap() >= 0.0, "{r}");
    assert!(r["idle_wakeups_per_s"].as_f64().unwrap() >= 0.0, "{r}");
    for k in ["idle_rss", "idle_cpu", "paced_p99", "publish_with_streams"] {
        assert!(r["meets_targets"][k].is_boolean(), "{r}");
    }
    // Publishing with and without a crowd of idle stream clients was measured.
    for k in ["publish_p99_ms", "publish_p99_ms_with_1000_streams"] {
        assert!(r[k].as_f64().unwrap() > 0.0, "{k}: {r}");
    }
    // Its temporary data dir is gone; the daemon was stopped.
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("bench-api-"))
        .collect();
    assert!(left.is_empty(), "{left:?}");

    let bad = crate::support::ksi_host(dir.path(), &["bench", "api", "--clients", "0"]);
    let (_, stderr) = crate::support::text(&bad);
    assert!(!bad.status.success());
    assert!(stderr.contains("--clients"), "{stderr}");
}
