//! The command line: happy paths and bad input (one-line errors, exit code != 0, nothing
//! touched).

use crate::support::{file_digest, ksi_host, text};

#[test]
fn publish_then_list_shows_the_event() {
    let dir = tempfile::tempdir().unwrap();
    let o = ksi_host(
        dir.path(),
        &["events", "publish", "demo.hello", r#"{"n": 1}"#],
    );
    assert!(o.status.success(), "{:?}", text(&o));
    let o = ksi_host(dir.path(), &["events", "list", "--json"]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    let rows: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(rows[0]["event"]["topic"], "demo.hello");
    assert_eq!(rows[0]["event"]["data"]["n"], 1);
}

#[test]
fn migrate_applies_then_reports_up_to_date() {
    let dir = tempfile::tempdir().unwrap();
    let o = ksi_host(dir.path(), &["migrate", "--status", "--json"]);
    let st: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(st["current"], 0, "status alone changes nothing");
    assert!(!dir.path().join("ksi.db").exists());
    let o = ksi_host(dir.path(), &["migrate"]);
    assert!(o.status.success(), "{:?}", text(&o));
    let o = ksi_host(dir.path(), &["migrate", "--status", "--json"]);
    let st: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(st["current"], st["latest"]);
    assert_eq!(st["pending"], serde_json::json!([]));
    // A second migrate is a no-op.
    let o = ksi_host(dir.path(), &["migrate"]);
    assert!(o.status.success());
    assert!(text(&o).0.contains("up to date"), "{:?}", text(&o));
}

fn assert_one_line_error(o: &std::process::Output, needle: &str) {
    let (_out, err) = text(o);
    assert!(!o.status.success(), "should fail: {err}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(
        lines.iter().any(|l| l.contains(needle)),
        "expected {needle:?} in {err}"
    );
    let error_lines = lines.iter().filter(|l| l.starts_with("error")).count();
    assert_eq!(error_lines, 1, "one error line: {err}");
}

#[test]
fn malformed_json_payload_is_a_one_line_error_and_publishes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    ksi_host(dir.path(), &["migrate"]);
    let db = dir.path().join("ksi.db");
    let o = ksi_host(dir.path(), &["events", "publish", "demo.x", "{not json"]);
    assert_one_line_error(&o, "not valid JSON");
    let o = ksi_host(dir.path(), &["events", "list", "--json"]);
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "[]");
    assert!(db.exists());
}

#[test]
fn unknown_subcommand_fails_with_usage_error() {
    let dir = tempfile::tempdir().unwrap();
    let o = ksi_host(dir.path(), &["frobnicate"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        text(&o).1.contains("unrecognized subcommand 'frobnicate'"),
        "{:?}",
        text(&o)
    );
    assert!(!dir.path().join("ksi.db").exists(), "nothing created");
}

#[test]
fn unwritable_data_dir_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    // A regular file where the data dir should be: even root cannot create files inside it.
    let file = dir.path().join("not-a-dir");
    std::fs::write(&file, b"x").unwrap();
    let o = ksi_host(&file.join("var"), &["events", "list"]);
    assert_one_line_error(&o, "cannot use data directory");
    assert!(text(&o).1.contains("--data-dir"), "says what to do");
    assert_eq!(std::fs::read(&file).unwrap(), b"x");
}

#[test]
fn a_file_that_is_not_sqlite_is_refused_and_left_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("ksi.db");
    std::fs::write(
        &db,
        b"these are not the bytes of a database, just some text\n".repeat(100),
    )
    .unwrap();
    let before = file_digest(&db);
    for args in [
        &["events", "list"][..],
        &["migrate"],
        &["migrate", "--status"],
    ] {
        let o = ksi_host(dir.path(), args);
        assert_one_line_error(&o, "is not a SQLite database");
    }
    assert_eq!(file_digest(&db), before);
    assert!(!dir.path().join("ksi.db-wal").exists());
}

#[test]
fn a_newer_schema_is_refused_and_left_untouched() {
    let dir = tempfile::tempdir().unwrap();
    ksi_host(dir.path(), &["migrate"]);
    let db = dir.path().join("ksi.db");
    {
        let c = rusqlite::Connection::open(&db).unwrap();
        c.pragma_update(None, "user_version", 999).unwrap();
        c.pragma_update(None, "journal_mode", "DELETE").unwrap();
    }
    let before = file_digest(&db);
    let o = ksi_host(dir.path(), &["events", "publish", "a.b", "{}"]);
    assert_one_line_error(&o, "schema version 999");
    assert!(text(&o).1.contains("upgrade ksi-host"));
    let o = ksi_host(dir.path(), &["migrate"]);
    assert_one_line_error(&o, "schema version 999");
    assert_eq!(file_digest(&db), before);
}

#[test]
fn tail_follows_events_published_by_another_process() {
    let dir = tempfile::tempdir().unwrap();
    ksi_host(dir.path(), &["migrate"]);
    let tail = std::process::Command::new(crate::support::bin("ksi-host"))
        .arg("--data-dir")
        .arg(dir.path())
        .args(["events", "tail", "demo.>", "--count", "2", "--json"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(300));
    ksi_host(dir.path(), &["events", "publish", "other.topic", "{}"]);
    ksi_host(dir.path(), &["events", "publish", "demo.one", r#"{"i":1}"#]);
    ksi_host(
        dir.path(),
        &["events", "publish", "demo.two.deep", r#"{"i":2}"#],
    );
    let out = tail.wait_with_output().unwrap();
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let topics: Vec<&str> = lines.iter().map(|l| l["topic"].as_str().unwrap()).collect();
    assert_eq!(topics, ["demo.one", "demo.two.deep"]);
}

#[test]
fn backup_under_write_load_is_consistent_and_restores() {
    use std::io::{BufRead, BufReader};
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    ksi_host(&data, &["migrate"]);
    // A writer that never stops: publishes and consumes as fast as it can.
    let mut writer = std::process::Command::new(crate::support::bin("ksi-host"))
        .arg("--data-dir")
        .arg(&data)
        .args(["dev", "soak", "--publish", "100000000"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(writer.stdout.take().unwrap()).lines();
    let mut acked = Vec::new();
    while acked.len() < 200 {
        let l = lines.next().unwrap().unwrap();
        if let Some(id) = l.strip_prefix("PUBLISHED ") {
            acked.push(id.parse::<i64>().unwrap());
        }
    }
    let copy = dir.path().join("ksi-backup.db");
    let o = ksi_host(&data, &["backup", copy.to_str().unwrap(), "--json"]);
    let _ = writer.kill();
    let _ = writer.wait();
    assert!(o.status.success(), "{:?}", text(&o));
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(report["integrity"], "ok");
    let c = rusqlite::Connection::open(&copy).unwrap();
    let ok: String = c
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(ok, "ok");
    // Everything acknowledged before the backup started is in the copy.
    for id in &acked {
        let n: i64 = c
            .query_row("SELECT COUNT(*) FROM messages WHERE id = ?1", [id], |r| {
                r.get(0)
            })
            .unwrap();
        assert_eq!(n, 1, "event {id} acknowledged before the backup is missing");
    }
    drop(c);
    // A backup never overwrites.
    let o = ksi_host(&data, &["backup", copy.to_str().unwrap()]);
    assert!(!o.status.success());
    // Restore into a fresh data dir, then read it back.
    let fresh = dir.path().join("fresh");
    let o = ksi_host(&fresh, &["restore", copy.to_str().unwrap()]);
    assert!(o.status.success(), "{:?}", text(&o));
    let o = ksi_host(
        &fresh,
        &[
            "events", "list", "--topic", "soak.>", "--limit", "1000", "--json",
        ],
    );
    let rows: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(rows.as_array().unwrap().len() >= 200);
    // A file that is not a database is refused and nothing is replaced.
    let junk = dir.path().join("junk.db");
    std::fs::write(&junk, b"not a database at all, really not").unwrap();
    let before = file_digest(&fresh.join("ksi.db"));
    let o = ksi_host(&fresh, &["restore", junk.to_str().unwrap()]);
    assert_one_line_error(&o, "not a SQLite database");
    assert_eq!(file_digest(&fresh.join("ksi.db")), before);
}
