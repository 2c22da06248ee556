//! The `ksi` client against a daemon: remotely with `--url` (and a token), over the Unix
//! socket, and without a daemon; shell completions.

use std::path::Path;
use std::process::{Command, Output};

use serde_json::{Value, json};

use crate::support::{Daemon, bin, text};

/// `ksi ARGS...` with `--data-dir DIR`, no `KSI_*` from the test environment.
fn ksi(dir: &Path, args: &[&str]) -> Output {
    Command::new(bin("ksi"))
        .arg("--data-dir")
        .arg(dir)
        .args(args)
        .env_remove("KSI_DATA_DIR")
        .env_remove("KSI_URL")
        .env_remove("KSI_TOKEN")
        .env_remove("KSI_CLAUDE_BIN")
        .output()
        .expect("run ksi")
}

async fn ksi_async(dir: &Path, args: &[&str]) -> Output {
    let dir = dir.to_path_buf();
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        ksi(&dir, &args)
    })
    .await
    .unwrap()
}

fn json_of(o: &Output) -> Value {
    let (out, err) = text(o);
    assert!(o.status.success(), "ksi failed: {err}\n{out}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
}

#[tokio::test]
async fn ksi_with_url_and_token_file_spawns_lists_workflows_and_processes_without_local_data()
-> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data)?;
    // The token contract: <data dir>/api.token, one line, mode 0600, written before start.
    let token = data.join("api.token");
    std::fs::write(&token, "test-token-1234\n")?;
    std::fs::set_permissions(&token, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    let d = Daemon::start(&data, &[]).await;
    let url = format!("http://127.0.0.1:{}", d.port);
    // A data dir that does not exist: with --url nothing local may be opened or created.
    let elsewhere = dir.path().join("not-here");
    let remote = |args: &[&str]| {
        let mut all = vec![
            "--url",
            url.as_str(),
            "--token-file",
            token.to_str().unwrap(),
        ];
        all.extend_from_slice(args);
        all.into_iter().map(str::to_string).collect::<Vec<_>>()
    };
    let run = |args: Vec<String>| {
        let elsewhere = elsewhere.clone();
        async move {
            let a: Vec<&str> = args.iter().map(String::as_str).collect();
            ksi_async(&elsewhere, &a).await
        }
    };

    let spawned = json_of(&run(remote(&["spawn", "hello over http", "--json"])).await);
    let pid = spawned["process_id"].as_str().unwrap().to_string();
    assert!(
        spawned["answer"]["text"]
            .as_str()
            .unwrap()
            .starts_with("[simulated]"),
        "{spawned}"
    );

    let (s, b) = d
        .post(
            "/workflows",
            &json!({"type": "teaching", "params": {"topic": "lifetimes"}}),
        )
        .await
        .unwrap();
    assert_eq!(s, 201, "{b}");
    let wf = b["id"].as_str().unwrap().to_string();
    let list = json_of(&run(remote(&["workflows", "--json"])).await);
    assert!(
        list.as_array()
            .unwrap()
            .iter()
            .any(|w| w["id"] == wf.as_str()),
        "{list}"
    );

    let ps = json_of(&run(remote(&["ps", "--json"])).await);
    let row = ps
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["id"] == pid.as_str())
        .unwrap_or_else(|| panic!("process {pid} not listed: {ps}"));
    assert_eq!(row["status"], "COMPLETED");

    // An action goes through the daemon too, and its refusal comes back in its words.
    let o = run(remote(&["workflow", "retry-from", &wf, "no_such_step"])).await;
    assert!(!o.status.success());
    assert!(text(&o).1.contains("no_such_step"), "{:?}", text(&o));

    assert!(
        !elsewhere.exists(),
        "--url must not create or open a local data dir"
    );
    Ok(())
}

#[tokio::test]
async fn over_the_unix_socket_actions_and_listings_reach_the_daemon() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let d = Daemon::start(dir.path(), &[]).await;
    let o = ksi_async(
        dir.path(),
        &[
            "schedule",
            "add",
            "0 9 * * 1-5",
            "debate",
            "--topic",
            "mornings",
        ],
    )
    .await;
    assert!(o.status.success(), "{:?}", text(&o));
    let (_, b) = d.get("/schedules").await.unwrap();
    let id = b["schedules"][0]["id"].as_str().unwrap().to_string();
    assert_eq!(b["schedules"][0]["params"]["topic"], "mornings");
    let listed = json_of(&ksi_async(dir.path(), &["schedule", "list", "--json"]).await);
    assert_eq!(listed[0]["id"], id.as_str());
    let o = ksi_async(dir.path(), &["schedule", "rm", &id]).await;
    assert!(o.status.success(), "{:?}", text(&o));
    let (_, b) = d.get("/schedules").await.unwrap();
    assert_eq!(b["schedules"], json!([]));

    let o = ksi_async(dir.path(), &["agent", "send", "carol", "read this"]).await;
    assert!(o.status.success(), "{:?}", text(&o));
    let (_, b) = d.get("/events?topic=agent.carol.message").await.unwrap();
    assert_eq!(b["events"][0]["event"]["data"]["text"], "read this", "{b}");

    let o = ksi_async(
        dir.path(),
        &["events", "publish", "demo.cli", r#"{"n": 7}"#],
    )
    .await;
    assert!(o.status.success(), "{:?}", text(&o));
    let tail = json_of(
        &ksi_async(
            dir.path(),
            &[
                "events", "tail", "demo.>", "-n", "5", "--count", "1", "--json",
            ],
        )
        .await,
    );
    assert_eq!(
        (tail["topic"].as_str(), &tail["data"]["n"]),
        (Some("demo.cli"), &json!(7))
    );

    let cost = json_of(&ksi_async(dir.path(), &["cost", "--json"]).await);
    assert!(cost["total"]["calls"].is_i64(), "{cost}");
    Ok(())
}

#[test]
fn without_a_daemon_reads_work_and_actions_say_how_to_start_one() {
    let dir = tempfile::tempdir().unwrap();
    let list = json_of(&ksi(dir.path(), &["workflows", "--json"]));
    assert_eq!(list, json!([]));
    for args in [
        &["workflow", "cancel", "wf_1"][..],
        &["events", "publish", "demo.x", "{}"],
        &["schedule", "add", "0 9 * * *", "debate"],
        &["agent", "send", "alice", "hi"],
    ] {
        let o = ksi(dir.path(), args);
        let err = text(&o).1;
        assert!(!o.status.success(), "{args:?} should fail: {err}");
        assert!(
            err.contains("no KSI daemon is running")
                && err.contains(&format!(
                    "ksi-host serve --data-dir {}",
                    dir.path().display()
                )),
            "{args:?}: {err}"
        );
    }
    // With --url to a port where nothing listens: says what to check.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let o = ksi(
        dir.path(),
        &["--url", &format!("http://127.0.0.1:{port}"), "ps"],
    );
    let err = text(&o).1;
    assert!(!o.status.success());
    assert!(
        err.contains("cannot reach the KSI daemon") && err.contains("ksi-host serve"),
        "{err}"
    );
    let o = ksi(dir.path(), &["--url", "https://example.org", "ps"]);
    assert!(text(&o).1.contains("plain http"), "{:?}", text(&o));
}

/// A stand-in daemon that records the Authorization header of each request and answers 401
/// unless it is the expected bearer token.
async fn header_recorder(
    expected: &'static str,
) -> (u16, std::sync::Arc<std::sync::Mutex<Vec<Option<String>>>>) {
    use axum::http::{HeaderMap, StatusCode};
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let s2 = seen.clone();
    let app = axum::Router::new().route(
        "/processes",
        axum::routing::get(move |h: HeaderMap| {
            let seen = s2.clone();
            async move {
                let auth = h
                    .get("authorization")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string);
                seen.lock().unwrap().push(auth.clone());
                if auth.as_deref() == Some(expected) {
                    (StatusCode::OK, axum::Json(json!({"processes": []})))
                } else {
                    (
                        StatusCode::UNAUTHORIZED,
                        axum::Json(json!({"error": {"code": "unauthorized", "message": "missing or wrong API token"}})),
                    )
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (port, seen)
}

#[tokio::test]
async fn the_token_is_sent_as_a_bearer_header_and_a_401_says_how_to_pass_it() -> anyhow::Result<()>
{
    let (port, seen) = header_recorder("Bearer s3cret-token").await;
    let dir = tempfile::tempdir()?;
    let url = format!("http://127.0.0.1:{port}");
    let file = dir.path().join("token");
    std::fs::write(&file, "s3cret-token\n")?;
    let o = ksi_async(
        dir.path(),
        &[
            "--url",
            &url,
            "--token-file",
            file.to_str().unwrap(),
            "ps",
            "--json",
        ],
    )
    .await;
    assert_eq!(json_of(&o), json!([]));
    let o = ksi_async(
        dir.path(),
        &["--url", &url, "--token", "s3cret-token", "ps", "--json"],
    )
    .await;
    assert_eq!(json_of(&o), json!([]));
    let o = ksi_async(dir.path(), &["--url", &url, "ps"]).await;
    let err = text(&o).1;
    assert!(!o.status.success());
    assert!(err.contains("401") && err.contains("--token"), "{err}");
    assert_eq!(
        *seen.lock().unwrap(),
        [
            Some("Bearer s3cret-token".to_string()),
            Some("Bearer s3cret-token".to_string()),
            None
        ]
    );
    Ok(())
}

#[test]
fn completions_are_printed_for_bash_zsh_and_fish() {
    for (binary, words) in [
        ("ksi", &["spawn", "workflows", "schedule", "events"][..]),
        ("ksi-host", &["serve", "backup", "migrate", "completions"]),
    ] {
        for shell in ["bash", "zsh", "fish"] {
            let o = Command::new(bin(binary))
                .args(["completions", shell])
                .output()
                .unwrap();
            let (out, err) = text(&o);
            assert!(o.status.success(), "{binary} {shell}: {err}");
            for w in words {
                assert!(out.contains(w), "{binary} {shell} completion lacks {w}");
            }
        }
    }
    let o = Command::new(bin("ksi"))
        .args(["completions", "tcsh"])
        .output()
        .unwrap();
    assert_eq!(
        o.status.code(),
        Some(2),
        "an unknown shell is a usage error"
    );
}
