//! A web page the user opens cannot drive the daemon on loopback: foreign `Origin`s, "simple"
//! cross-site requests (`text/plain`, forms, no body) and rebinding `Host` names are refused
//! on every route, while the daemon's own clients and its dashboard keep working.

use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::Daemon;

/// Sends one request exactly as written (headers and all) and returns (status, JSON body).
async fn raw(port: u16, head: &str, body: &str) -> (u16, Value) {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let req = format!(
        "{head}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut out))
        .await
        .expect("the daemon answers")
        .unwrap();
    let text = String::from_utf8_lossy(&out).to_string();
    let status: u16 = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"));
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

/// Every (method, path) the OpenAPI document lists that changes something, with its path
/// parameters filled in, so a new mutating route cannot be left out of the checks.
async fn mutating_routes(d: &Daemon) -> Vec<(String, String)> {
    let (_, doc) = d.get("/openapi.json").await.unwrap();
    let mut out = Vec::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in ["post", "put", "patch", "delete"] {
            if item.get(method).is_some() {
                let filled: String = path
                    .split('/')
                    .map(|seg| if seg.starts_with('{') { "x1" } else { seg })
                    .collect::<Vec<_>>()
                    .join("/");
                out.push((method.to_uppercase(), filled));
            }
        }
    }
    assert!(
        out.len() >= 5,
        "the document lists the mutating routes: {out:?}"
    );
    out
}

#[tokio::test]
async fn a_browser_shaped_request_is_refused_on_every_mutating_route() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path(), &[]).await;
    let host = format!("127.0.0.1:{}", d.port);
    for (method, path) in mutating_routes(&d).await {
        // A page on another site: its Origin, a "simple" content type.
        // A body the route would act on, were the request let through.
        let valid = match path.as_str() {
            "/events" => r#"{"topic":"x1.evil","data":{}}"#,
            "/workflows" => r#"{"type":"debate","params":{"topic":"x1"}}"#,
            _ => "{}",
        };
        for (ct, body) in [
            ("text/plain", valid),
            ("application/x-www-form-urlencoded", "a=b"),
            ("application/json", valid),
        ] {
            let head = format!(
                "{method} {path} HTTP/1.1\r\nHost: {host}\r\nOrigin: http://evil.example\r\nContent-Type: {ct}"
            );
            let (s, b) = raw(d.port, &head, body).await;
            assert_eq!(s, 403, "{method} {path} ({ct}) from a foreign origin: {b}");
            assert_eq!(b["error"]["code"], "cross_origin", "{method} {path}: {b}");
            assert!(
                b["error"]["message"]
                    .as_str()
                    .unwrap()
                    .contains("http://evil.example"),
                "{b}"
            );
        }
        // Without an Origin (a sandboxed page's or a non-browser's), a POST/PUT/PATCH must
        // still say it is JSON, with a body or without one.
        if method != "DELETE" {
            for (ct, body) in [("text/plain", "{}"), ("", "")] {
                let ct_line = if ct.is_empty() {
                    String::new()
                } else {
                    format!("\r\nContent-Type: {ct}")
                };
                let head = format!("{method} {path} HTTP/1.1\r\nHost: {host}{ct_line}");
                let (s, b) = raw(d.port, &head, body).await;
                assert_eq!(s, 415, "{method} {path} with {ct:?}: {b}");
                assert_eq!(b["error"]["code"], "content_type", "{b}");
            }
        }
    }
    // Nothing of that ran: no workflow, no event from those requests.
    let (_, w) = d.get("/workflows").await.unwrap();
    assert_eq!(w["workflows"].as_array().map(Vec::len), Some(0), "{w}");
    let (_, e) = d.get("/events?topic=x1.*&limit=10").await.unwrap();
    assert_eq!(e["events"].as_array().map(Vec::len), Some(0), "{e}");
    // A `null` origin (sandboxed frame, file://) is foreign too.
    let head = format!(
        "POST /events HTTP/1.1\r\nHost: {host}\r\nOrigin: null\r\nContent-Type: application/json"
    );
    let (s, b) = raw(d.port, &head, r#"{"topic":"t.x","data":{}}"#).await;
    assert_eq!(
        (s, b["error"]["code"].as_str()),
        (403, Some("cross_origin"))
    );
}

#[tokio::test]
async fn a_websocket_upgrade_from_a_foreign_origin_does_not_replay_the_bus() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path(), &[]).await;
    let (s, _) = d
        .post(
            "/events",
            &serde_json::json!({"topic": "agent.secret", "data": {"a": 1}}),
        )
        .await
        .unwrap();
    assert_eq!(s, 201);
    let upgrade = |origin: &str| {
        format!(
            "GET /events/stream?last_id=0 HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nOrigin: {origin}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
            d.port
        )
    };
    let (s, b) = raw(d.port, &upgrade("http://evil.example"), "").await;
    assert_eq!(s, 403, "{b}");
    assert_eq!(b["error"]["code"], "cross_origin");
    // The daemon's own page may upgrade (101 Switching Protocols; the connection then stays
    // open, so only the status line is read).
    let mut sock = tokio::net::TcpStream::connect(("127.0.0.1", d.port))
        .await
        .unwrap();
    let own = upgrade(&format!("http://127.0.0.1:{}", d.port));
    sock.write_all(format!("{own}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(30), sock.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let line = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(line.starts_with("HTTP/1.1 101"), "{line}");
}

#[tokio::test]
async fn a_rebinding_host_is_refused_and_loopback_names_and_allowed_hosts_are_served() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("ksi.toml"),
        "api_allowed_hosts = [\"ksi.example.com\"]\n",
    )
    .unwrap();
    let d = Daemon::start(dir.path(), &[]).await;
    let port = d.port;
    for path in ["/workflows", "/events?limit=5", "/health", "/"] {
        let (s, b) = raw(
            port,
            &format!("GET {path} HTTP/1.1\r\nHost: attacker.com:{port}"),
            "",
        )
        .await;
        assert_eq!(s, 403, "{path} for attacker.com: {b}");
        assert_eq!(b["error"]["code"], "host_not_allowed");
        assert!(
            b["error"]["message"]
                .as_str()
                .unwrap()
                .contains("api_allowed_hosts"),
            "{b}"
        );
    }
    for host in [
        format!("127.0.0.1:{port}"),
        format!("localhost:{port}"),
        format!("[::1]:{port}"),
        "ksi.example.com".to_string(),
    ] {
        let (s, b) = raw(
            port,
            &format!("GET /workflows HTTP/1.1\r\nHost: {host}"),
            "",
        )
        .await;
        assert_eq!(s, 200, "{host}: {b}");
    }
    // A page of the allowed host may call it; the daemon's own page too.
    let head = "POST /events HTTP/1.1\r\nHost: ksi.example.com\r\nOrigin: https://ksi.example.com\r\nContent-Type: application/json";
    let (s, b) = raw(port, head, r#"{"topic":"t.allowed","data":{}}"#).await;
    assert_eq!(s, 201, "{b}");
    let head = format!(
        "POST /events HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nOrigin: http://127.0.0.1:{port}\r\nContent-Type: application/json"
    );
    let (s, b) = raw(port, &head, r#"{"topic":"t.own","data":{}}"#).await;
    assert_eq!(s, 201, "{b}");
}

#[tokio::test]
async fn with_a_token_any_host_name_may_be_used_but_a_foreign_origin_still_may_not() {
    let dir = tempfile::tempdir().unwrap();
    let out = crate::support::ksi_host(dir.path(), &["token", "rotate"]);
    assert!(out.status.success(), "{out:?}");
    let d = Daemon::start(dir.path(), &[]).await;
    let token = d.token.clone().expect("a token");
    let port = d.port;
    let (s, b) = raw(
        port,
        &format!(
            "GET /workflows HTTP/1.1\r\nHost: ksi.internal:{port}\r\nAuthorization: Bearer {token}"
        ),
        "",
    )
    .await;
    assert_eq!(s, 200, "{b}");
    let (s, b) = raw(
        port,
        &format!("POST /events HTTP/1.1\r\nHost: ksi.internal:{port}\r\nAuthorization: Bearer {token}\r\nOrigin: http://evil.example\r\nContent-Type: application/json"),
        r#"{"topic":"t.x","data":{}}"#,
    )
    .await;
    assert_eq!(
        (s, b["error"]["code"].as_str()),
        (403, Some("cross_origin")),
        "{b}"
    );
}
