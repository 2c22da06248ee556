//! A plugin cannot hurt the daemon: it reads only what its workflow may read, a bad file in
//! `plugins/` never stops a (re)start, and a guest looping on host calls is bounded.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::support::Daemon;
use ksi_host::plugins::bundled;

const ECHO_TYPE: &str = "name = \"probe\"\nversion = \"1.0.0\"\n[[steps]]\nname = \"only\"\nhandler = \"echo.echo@^0.1\"\nretry = { max_attempts = 1 }\n";

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

fn define_probe(dir: &Path) {
    std::fs::create_dir_all(dir.join("definitions")).unwrap();
    std::fs::write(dir.join("definitions/probe.toml"), ECHO_TYPE).unwrap();
}

/// Run the probe workflow with `params`; its finished view.
async fn probe(d: &Daemon, params: Value) -> Value {
    let (s, b) = d
        .post("/workflows", &json!({"type": "probe", "params": params}))
        .await
        .unwrap();
    assert_eq!(s, 201, "{b}");
    let id = b["id"].as_str().unwrap().to_string();
    let t0 = Instant::now();
    loop {
        let (_, v) = d.get(&format!("/workflows/{id}")).await.unwrap();
        if matches!(v["status"].as_str(), Some("completed" | "failed")) {
            return v;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "{id} did not finish: {v}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The result of the probe's only step.
fn result(v: &Value) -> Value {
    assert_eq!(v["status"], "completed", "{v}");
    let step = &v["steps"][0];
    step["output"]["result"].clone()
}

#[tokio::test]
async fn a_plugin_reads_only_what_its_workflow_may_and_errors_reveal_no_hash() {
    let dir = tempfile::tempdir().unwrap();
    define_probe(dir.path());
    std::fs::write(dir.path().join("secret.txt"), "the operator's secret").unwrap();
    let outside = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(outside.path(), "outside the data dir").unwrap();
    let d = Daemon::start(dir.path(), &[]).await;

    // A workflow reads back what it wrote itself.
    let own = result(&probe(&d, json!({"write_then_read": true})).await);
    assert_eq!(own["write_then_read"]["ok"], "written by echo", "{own}");

    // Another workflow's file, the database, a secret at the data dir's root, a file outside
    // it: refused, with the wrong hash and with the right one, and no error shows the hash.
    let (_, listing) = d.get("/workflows").await.unwrap();
    let first = listing["workflows"][0]["id"].as_str().unwrap().to_string();
    let theirs = format!("state/workflows/{first}/files/note.txt");
    let db = std::fs::read(dir.path().join("ksi.db")).unwrap();
    let targets: Vec<(String, String)> = vec![
        (theirs.clone(), sha256_hex(b"written by echo")),
        ("ksi.db".into(), sha256_hex(&db)),
        ("secret.txt".into(), sha256_hex(b"the operator's secret")),
        (
            outside.path().display().to_string(),
            sha256_hex(b"outside the data dir"),
        ),
        ("../outside.txt".into(), sha256_hex(b"outside the data dir")),
    ];
    for (path, real) in &targets {
        for sha in [&"0".repeat(64), real] {
            let r = result(&probe(&d, json!({"read": {"file": path, "hash": sha}})).await);
            let error = r["read"]["error"]
                .as_str()
                .unwrap_or_else(|| panic!("{path} was read: {r}"));
            assert!(
                error.contains("is not readable by this step"),
                "{path}: {error}"
            );
            assert!(
                !error.contains(real.as_str()),
                "{path}: the error shows its hash: {error}"
            );
        }
    }

    // A reference the workflow was given in its params may be read (with its hash).
    let given = result(
        &probe(
            &d,
            json!({"read": {"file": theirs, "hash": sha256_hex(b"written by echo"), "size": 15},
                   "note": {"path": theirs, "sha256": sha256_hex(b"written by echo")}}),
        )
        .await,
    );
    assert_eq!(given["read"]["ok"], "written by echo", "{given}");
    // With a wrong hash, even a readable file's error does not show its real hash.
    let wrong = result(
        &probe(
            &d,
            json!({"read": {"file": theirs, "hash": "0".repeat(64)},
                   "note": {"path": theirs, "sha256": "0".repeat(64)}}),
        )
        .await,
    );
    let error = wrong["read"]["error"].as_str().unwrap();
    assert!(error.contains("does not match its reference"), "{error}");
    assert!(!error.contains(&sha256_hex(b"written by echo")), "{error}");
}

#[tokio::test]
async fn a_guest_looping_on_host_calls_fails_its_step_at_the_host_call_limit() {
    let dir = tempfile::tempdir().unwrap();
    define_probe(dir.path());
    let d = Daemon::start(dir.path(), &[]).await;
    let v = probe(&d, json!({"config_loop": u64::MAX})).await;
    assert_eq!(v["status"], "failed", "{v}");
    let error = v["error"].as_str().unwrap();
    assert!(error.contains("more than 10000 host calls"), "{error}");
    // The journal holds at most the calls the limit allowed (a `config.get` journals two
    // lookups: the plugin's own key, then the shared one).
    let db = rusqlite::Connection::open(dir.path().join("ksi.db")).unwrap();
    let rows: i64 = db
        .query_row("SELECT COUNT(*) FROM step_calls", [], |r| r.get(0))
        .unwrap();
    assert!(rows <= 20_000, "{rows} journal rows");
}

/// How many `plugin.load_failed` events name `file`.
async fn load_failures(d: &Daemon, file: &str) -> usize {
    let (_, b) = d
        .get("/events?topic=plugin.load_failed&limit=1000")
        .await
        .unwrap();
    b["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| {
            e["event"]["data"]["file"]
                .as_str()
                .unwrap_or("")
                .ends_with(file)
        })
        .count()
}

#[tokio::test]
async fn bad_plugins_never_stop_a_restart_and_are_reported_once_per_start() {
    let dir = tempfile::tempdir().unwrap();
    let plugins = dir.path().join("plugins");
    std::fs::create_dir_all(&plugins).unwrap();
    for (built, name) in [
        (bundled::FAULT_DESCRIBE_PANICS, "panics.wasm"),
        (bundled::FAULT_DESCRIBE_PRINTS, "prints.wasm"),
        (bundled::FAULT_DESCRIBE_LOOPS, "loops.wasm"),
        (bundled::ECHO_V1, "my-echo.wasm"),
    ] {
        std::fs::copy(built, plugins.join(name)).unwrap();
    }
    std::fs::write(plugins.join("garbage.wasm"), b"\0asm garbage").unwrap();
    define_probe(dir.path());
    for start in 1..=2 {
        let mut d = Daemon::start(dir.path(), &[]).await;
        let (_, b) = d.get("/plugins").await.unwrap();
        let loaded: Vec<String> = b["plugins"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| {
                format!(
                    "{}@{}",
                    p["name"].as_str().unwrap(),
                    p["version"].as_str().unwrap()
                )
            })
            .collect();
        for wanted in ["debate@", "echo@0.1.0", "describe-prints@0.1.0"] {
            assert!(
                loaded.iter().any(|p| p.starts_with(wanted)),
                "start {start}: {loaded:?}"
            );
        }
        // echo serves from its own file; my-echo.wasm claimed the same version and was refused.
        let echo = b["plugins"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == "echo")
            .unwrap();
        assert!(
            echo["file"].as_str().unwrap().ends_with("/echo.wasm"),
            "{echo}"
        );
        let done = probe(&d, json!({"n": start})).await;
        assert_eq!(result(&done)["params"]["n"], start);
        // Each bad file is reported once by this start (the events of earlier starts stay).
        tokio::time::sleep(Duration::from_millis(500)).await;
        for bad in ["panics.wasm", "loops.wasm", "garbage.wasm", "my-echo.wasm"] {
            assert_eq!(
                load_failures(&d, bad).await,
                start,
                "{bad} on start {start}"
            );
        }
        // A kill -9 and a restart: the same, again.
        d.child.kill().unwrap();
        d.child.wait().unwrap();
    }
}

fn rss_kb(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap()
}

/// With the function limit lifted, a compile bomb reaches the compiler, which runs in a child
/// process under a memory limit: the child fails, the daemon's memory stays where it was, and
/// everything else keeps serving.
#[tokio::test]
async fn a_compile_bomb_past_the_function_limit_fails_in_its_own_process() {
    let failure = compile_bomb_with(
        "plugin_max_functions = 10000000\nplugin_compile_memory_mb = 512\nplugin_compile_timeout_secs = 300\n",
    )
    .await;
    assert_eq!(failure["kind"], "compile_memory", "{failure}");
    assert!(
        failure["error"]
            .as_str()
            .unwrap()
            .contains("plugin_compile_memory_mb"),
        "{failure}"
    );
}

/// ... and a compile over the time limit is killed, leaving no process behind.
#[tokio::test]
async fn a_compile_over_its_time_limit_is_killed() {
    let failure = compile_bomb_with(
        "plugin_max_functions = 10000000\nplugin_compile_memory_mb = 16384\nplugin_compile_timeout_secs = 2\n",
    )
    .await;
    assert_eq!(failure["kind"], "compile_timeout", "{failure}");
}

/// Drops the compile bomb into a daemon configured with `toml`; the `plugin.load_failed` data.
async fn compile_bomb_with(toml: &str) -> Value {
    let dir = tempfile::tempdir().unwrap();
    define_probe(dir.path());
    std::fs::write(dir.path().join("ksi.toml"), toml).unwrap();
    let d = Daemon::start(dir.path(), &[]).await;
    let before = rss_kb(d.child.id());
    let plugins = dir.path().join("plugins");
    std::fs::copy(bundled::FAULT_COMPILE_BOMB, plugins.join("bomb.tmp")).unwrap();
    std::fs::rename(plugins.join("bomb.tmp"), plugins.join("bomb.wasm")).unwrap();
    let t0 = Instant::now();
    let failure = loop {
        let (_, b) = d
            .get("/events?topic=plugin.load_failed&limit=100")
            .await
            .unwrap();
        if let Some(e) = b["events"].as_array().unwrap().iter().find(|e| {
            e["event"]["data"]["file"]
                .as_str()
                .unwrap_or("")
                .ends_with("bomb.wasm")
        }) {
            break e["event"]["data"].clone();
        }
        assert!(
            t0.elapsed() < Duration::from_secs(300),
            "the bomb was not refused"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let after = rss_kb(d.child.id());
    assert!(
        after < before + 50 * 1024,
        "RSS went from {before} kB to {after} kB"
    );
    let done = probe(&d, json!({"still": "serving"})).await;
    assert_eq!(result(&done)["params"]["still"], "serving");
    // The compile child is gone (fake-claude runs in its own process group and has exited).
    let children = std::process::Command::new("pgrep")
        .args(["-P", &d.child.id().to_string()])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&children.stdout).trim().is_empty(),
        "the daemon still has children: {}",
        String::from_utf8_lossy(&children.stdout)
    );
    failure
}
