//! The crash test: the real binary publishes and consumes in a loop and is killed with SIGKILL
//! at random moments; after every restart and a final drain, the bus's promises must hold.

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rand::Rng;

use crate::support::bin;

const KILLS: usize = 12;

#[test]
fn sigkill_at_random_moments_loses_nothing_and_acks_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    let mut acknowledged: HashSet<i64> = HashSet::new();
    let mut rng = rand::rng();

    for round in 0..KILLS {
        let mut child = Command::new(bin("ksi-host"))
            .arg("--data-dir")
            .arg(data)
            .args(["--log-level", "warn", "dev", "soak", "--publish", "1000000"])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the soak worker");
        let stdout = child.stdout.take().unwrap();
        let reader = std::thread::spawn(move || {
            let mut ids = Vec::new();
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(id) = line.strip_prefix("PUBLISHED ") {
                    ids.push(id.parse::<i64>().unwrap());
                }
            }
            ids
        });
        let wait = rng.random_range(150..900);
        std::thread::sleep(Duration::from_millis(wait));
        // SIGKILL: no chance to flush, close or release anything.
        child.kill().unwrap();
        let status = child.wait().unwrap();
        assert!(!status.success(), "round {round}: the worker was killed");
        let ids = reader.join().unwrap();
        acknowledged.extend(ids);
    }
    assert!(
        acknowledged.len() > 100,
        "the worker made progress between kills ({} publishes acknowledged)",
        acknowledged.len()
    );

    // Restart without publishing and let the consumers settle everything.
    let started = Instant::now();
    let out = Command::new(bin("ksi-host"))
        .arg("--data-dir")
        .arg(data)
        .args(["--log-level", "warn", "dev", "soak", "--publish", "0"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "drain failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("DRAINED"));
    assert!(
        started.elapsed() < Duration::from_secs(120),
        "drain finished"
    );

    let db = rusqlite::Connection::open(data.join("ksi.db")).unwrap();
    let integrity: String = db
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(integrity, "ok");

    // 1. No acknowledged publish is lost.
    let stored: HashSet<i64> = db
        .prepare("SELECT id FROM messages WHERE topic = 'soak.item'")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let lost: Vec<_> = acknowledged.difference(&stored).collect();
    assert!(lost.is_empty(), "acknowledged publishes lost: {lost:?}");

    // 2. No event is lost to a subscription, and each settled exactly once.
    let subs: Vec<(i64, String)> = db
        .prepare("SELECT id, name FROM subscriptions WHERE name LIKE 'soak-%'")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(subs.len(), 2);
    let mut effects: HashMap<(String, i64), i64> = HashMap::new();
    let mut st = db
        .prepare("SELECT subscription, message_id, COUNT(*) FROM soak_effects GROUP BY 1, 2")
        .unwrap();
    for row in st
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
    {
        let (s, m, n): (String, i64, i64) = row.unwrap();
        effects.insert((s, m), n);
    }
    let (mut completed, mut dead) = (0, 0);
    for (sid, name) in &subs {
        for id in &stored {
            let status: String = db
                .query_row(
                    "SELECT status FROM deliveries WHERE subscription_id = ?1 AND message_id = ?2",
                    [*sid, *id],
                    |r| r.get(0),
                )
                .unwrap_or_else(|_| panic!("event {id} has no delivery for {name}"));
            let n = effects.get(&(name.clone(), *id)).copied().unwrap_or(0);
            match status.as_str() {
                "completed" => {
                    assert_eq!(n, 1, "event {id} in {name} was processed {n} times");
                    completed += 1;
                }
                "dead" => {
                    assert_eq!(n, 0, "dead event {id} in {name} has effects");
                    dead += 1;
                }
                other => panic!("event {id} in {name} left {other}"),
            }
        }
    }
    assert_eq!(completed + dead, 2 * stored.len());
    eprintln!(
        "crash test: {KILLS} kills, {} events ({} acknowledged), {completed} deliveries completed, {dead} dead-lettered",
        stored.len(),
        acknowledged.len()
    );
}
