//! A full disk under a running daemon: every write is refused with a clear `507 disk_full`,
//! nothing committed is lost, the daemon stays up, and once space is freed the same requests
//! succeed and the workflow that was running finishes.
//!
//! The data dir is a small tmpfs mounted for the test (root only; CI runs as root).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::support::Daemon;

/// A tmpfs mounted on a fresh temporary directory, unmounted on drop.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    /// None (with a note) where mounting is not allowed, except on CI, where that fails.
    fn mount(size_mb: u64) -> Option<Tmpfs> {
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size_mb}m"), "tmpfs"])
            .arg(dir.path())
            .output();
        match out {
            Ok(o) if o.status.success() => Some(Tmpfs { dir }),
            other => {
                let why = match other {
                    Ok(o) => String::from_utf8_lossy(&o.stderr).trim().to_string(),
                    Err(e) => e.to_string(),
                };
                assert!(
                    std::env::var_os("CI").is_none(),
                    "the full-disk test mounts a tmpfs and needs root: {why}"
                );
                eprintln!("skipped: cannot mount a tmpfs for the full-disk test ({why})");
                None
            }
        }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

/// Takes every free byte of the file system holding `dir` (but `leave`), returns the file.
fn fill(dir: &Path, leave: u64) -> PathBuf {
    use std::io::Write;
    let path = dir.join("filler");
    let mut f = std::fs::File::create(&path).unwrap();
    let chunk = vec![0u8; 1 << 20];
    loop {
        let free = free_bytes(dir);
        if free <= leave {
            break;
        }
        let n = ((free - leave) as usize).min(chunk.len());
        if f.write_all(&chunk[..n]).is_err() {
            break;
        }
    }
    f.sync_all().ok();
    path
}

fn free_bytes(dir: &Path) -> u64 {
    ksi_host::store::fs_free_bytes(dir).expect("statvfs of the tmpfs")
}

fn assert_disk_full(what: &str, (status, body): &(u16, Value)) {
    assert_eq!(*status, 507, "{what}: {body}");
    assert_eq!(body["error"]["code"], "disk_full", "{what}: {body}");
    let msg = body["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("Free space") || msg.contains("free space"),
        "{what}: the message says what to do: {msg}"
    );
}

async fn wait_workflow(d: &Daemon, id: &str, within: Duration) -> Value {
    let t0 = Instant::now();
    loop {
        let (_, w) = d.get(&format!("/workflows/{id}")).await.unwrap();
        if w["status"] == "completed" || w["status"] == "failed" {
            return w;
        }
        assert!(
            t0.elapsed() < within,
            "{id} still {} after {within:?}",
            w["status"]
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_full_disk_refuses_writes_clearly_loses_nothing_and_the_daemon_goes_on() {
    let Some(fs) = Tmpfs::mount(128) else { return };
    let data = fs.path().join("var");
    let d = Daemon::start(&data, &[("KSI_CLAUDE_ENV_FAKE_CLAUDE_DELAY_MS", "150")]).await;

    // Before: an event and a debate that is under way when the disk fills up.
    let (s, before) = d
        .post(
            "/events",
            &json!({"topic": "disk.before", "data": {"n": 1}}),
        )
        .await
        .unwrap();
    assert!(s == 200 || s == 201, "{before}");
    let (s, w) = d
        .post(
            "/workflows",
            &json!({"type": "debate", "params": {"topic": "Disks fill up", "rounds": 1}}),
        )
        .await
        .unwrap();
    assert_eq!(s, 201, "{w}");
    let running = w["id"].as_str().unwrap().to_string();
    let t0 = Instant::now();
    loop {
        let (_, w) = d.get(&format!("/workflows/{running}")).await.unwrap();
        if w["steps"].as_array().is_some_and(|s| !s.is_empty()) {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the debate did not start: {w}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The disk fills up.
    let filler = fill(fs.path(), 0);
    assert_eq!(free_bytes(fs.path()), 0);

    // Writes are refused with a 507 that says what to do; reads and health still answer.
    let mut refused = 0;
    for i in 0..5 {
        let r = d
            .post("/events", &json!({"topic": "disk.full", "data": {"n": i}}))
            .await
            .unwrap();
        assert_disk_full("POST /events", &r);
        refused += 1;
    }
    assert_disk_full(
        "POST /workflows",
        &d.post(
            "/workflows",
            &json!({"type": "debate", "params": {"topic": "No room", "rounds": 1}}),
        )
        .await
        .unwrap(),
    );
    assert_disk_full(
        "POST /spawn",
        &d.post("/spawn", &json!({"prompt": "no room for the answer"}))
            .await
            .unwrap(),
    );
    let (s, health) = d.get("/health").await.unwrap();
    assert_eq!(s, 503, "{health}");
    assert_eq!(health["disk"]["ok"], false, "{health}");
    assert_eq!(health["disk"]["free_bytes"], 0, "{health}");
    let (s, _) = d.get(&format!("/workflows/{running}")).await.unwrap();
    assert_eq!(s, 200, "reads go on");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut d = d;
    assert!(
        d.child.try_wait().unwrap().is_none(),
        "the daemon is still running"
    );

    // Space comes back: the same requests succeed without a restart.
    std::fs::remove_file(&filler).unwrap();
    let (s, after) = d
        .post("/events", &json!({"topic": "disk.after", "data": {"n": 2}}))
        .await
        .unwrap();
    assert!(s == 200 || s == 201, "{after}");
    let (s, w2) = d
        .post(
            "/workflows",
            &json!({"type": "debate", "params": {"topic": "Room again", "rounds": 1}}),
        )
        .await
        .unwrap();
    assert_eq!(s, 201, "{w2}");

    // The debate that ran into the full disk lost nothing: it finishes (by its own retries,
    // or, when they ran out while the disk was full, by `retry-from` its failed step).
    let mut w = wait_workflow(&d, &running, Duration::from_secs(60)).await;
    let retried = w["status"] == "failed";
    if retried {
        let failed = w["steps"]
            .as_array()
            .unwrap()
            .iter()
            .rfind(|s| s["status"] == "failed")
            .unwrap_or_else(|| panic!("a failed workflow has a failed step: {w}"))["step"]
            .as_str()
            .unwrap()
            .to_string();
        let (s, b) = d
            .post(
                &format!("/workflows/{running}/retry-from"),
                &json!({"step": failed}),
            )
            .await
            .unwrap();
        assert!(s < 300, "{b}");
        w = wait_workflow(&d, &running, Duration::from_secs(60)).await;
    }
    assert_eq!(w["status"], "completed", "{w}");
    let names: Vec<&str> = w["steps"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["status"] == "completed")
        .map(|s| s["step"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["opening", "rebuttal", "closing", "judge"], "{w}");
    let (_, t) = d
        .get(&format!("/workflows/{running}/transcript"))
        .await
        .unwrap();
    let turns = t["turns"].as_array().unwrap_or_else(|| panic!("{t}"));
    assert_eq!(
        turns.len(),
        7,
        "2 opening, 2 rebuttal, 2 closing, 1 judge: {t}"
    );
    assert!(
        turns.iter().all(|t| t["text"]
            .as_str()
            .is_some_and(|s| s.contains("[simulated]"))),
        "every turn has its answer: {t}"
    );
    let w2 = wait_workflow(&d, w2["id"].as_str().unwrap(), Duration::from_secs(60)).await;
    assert_eq!(w2["status"], "completed", "{w2}");

    // The bus has exactly what was acknowledged: the refused events are not there.
    let (_, ev) = d.get("/events?topic=disk.%3E").await.unwrap();
    let topics: Vec<&str> = ev["events"]
        .as_array()
        .unwrap_or_else(|| panic!("{ev}"))
        .iter()
        .map(|e| e["event"]["topic"].as_str().unwrap())
        .collect();
    assert_eq!(topics, ["disk.before", "disk.after"], "{refused} refused");
    drop(d);
    let check = crate::support::ksi_host(&data, &["migrate", "--status"]);
    assert!(check.status.success(), "{:?}", crate::support::text(&check));
    eprintln!(
        "full disk: {refused} events refused with 507, the running debate completed{}",
        if retried {
            " after retry-from"
        } else {
            " by itself"
        }
    );
}
