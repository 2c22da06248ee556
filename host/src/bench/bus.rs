//! `ksi-host bench bus`: throughput and latency of the durable event bus.
//!
//! Every number is measured on a fresh database in `<data dir>/bench/` with the configured
//! `synchronous` mode (FULL by default: a publish is on disk before it returns).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::json;

use crate::bus::{Bus, NewEvent, SubscriptionOptions};
use crate::config::SyncMode;
use crate::store::{Store, StoreOptions};

/// Settings of one bus benchmark run.
#[derive(Debug, Clone)]
pub struct BusBenchOptions {
    /// Events per phase.
    pub events: usize,
    /// Concurrent single-event publishers.
    pub publishers: usize,
    /// Events per batch in the batch phase.
    pub batch: usize,
    /// Rate of the end-to-end latency phase (events/s) and its duration.
    pub e2e_rate: u32,
    pub e2e_events: usize,
    pub sync: SyncMode,
}

impl Default for BusBenchOptions {
    fn default() -> Self {
        BusBenchOptions {
            events: 20_000,
            publishers: 64,
            batch: 100,
            e2e_rate: 1_000,
            e2e_events: 3_000,
            sync: SyncMode::Full,
        }
    }
}

/// Results (also the `--json` output).
#[derive(Debug, Clone, Serialize)]
pub struct BusBenchReport {
    pub events: usize,
    pub payload_bytes: usize,
    pub synchronous: String,
    pub publishers: usize,
    pub publish_per_s: f64,
    pub batch_size: usize,
    pub publish_batch_per_s: f64,
    pub claim_ack_per_s: f64,
    pub e2e_rate_per_s: u32,
    pub e2e_p50_ms: f64,
    pub e2e_p99_ms: f64,
    pub e2e_max_ms: f64,
}

fn payload(i: usize) -> serde_json::Value {
    // ~300 bytes of JSON, like a real event carrying a file reference.
    json!({
        "seq": i,
        "process_id": format!("proc_{i:012}"),
        "prompt_file": {"path": format!("prompts/queue/proc_{i:012}.txt"), "sha256": "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08", "bytes": 1234},
        "model": "sonnet",
        "agent_id": "agent_debater_a",
        "workflow_id": "wf_0123456789abcdef",
        "pad": "xxxxxxxxxxxxxxxxxxxxxx"
    })
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

/// Runs the benchmark in `dir` (created, and removed afterwards).
pub async fn run(dir: &Path, opts: &BusBenchOptions) -> anyhow::Result<BusBenchReport> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir)?;
    let store = Store::open_path(
        &dir.join("bench.db"),
        &StoreOptions {
            sync: opts.sync,
            ..StoreOptions::default()
        },
    )?;
    let bus = Bus::new(store.clone());
    let sub = bus
        .subscribe("bench", "bench.>", SubscriptionOptions::default())
        .await?;
    let payload_bytes = payload(0).to_string().len();

    // 1. Single-event publishes from many concurrent publishers, each durable on return.
    //    The events are built beforehand: this measures the bus, not JSON construction.
    let n = opts.events;
    let events: Arc<Vec<NewEvent>> = Arc::new(
        (0..n)
            .map(|i| NewEvent::new("bench.publish.one", payload(i)))
            .collect(),
    );
    let counter = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..opts.publishers {
        let (bus, counter, events) = (bus.clone(), counter.clone(), events.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let i = counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= n {
                    return anyhow::Ok(());
                }
                bus.publish(events[i].clone()).await?;
            }
        }));
    }
    for t in tasks {
        t.await??;
    }
    let publish_per_s = n as f64 / start.elapsed().as_secs_f64();

    // 2. Batches.
    let batches = n.div_ceil(opts.batch);
    let start = Instant::now();
    let mut tasks = Vec::new();
    let per_task = batches.div_ceil(4);
    for t in 0..4 {
        let bus = bus.clone();
        let batch = opts.batch;
        tasks.push(tokio::spawn(async move {
            for b in (t * per_task)..((t + 1) * per_task).min(batches) {
                let events = (0..batch)
                    .map(|i| NewEvent::new("bench.publish.batch", payload(b * batch + i)))
                    .collect();
                bus.publish_batch(events).await?;
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let publish_batch_per_s = (batches * opts.batch) as f64 / start.elapsed().as_secs_f64();

    // 3. Claim + ack by two competing consumers, 100 at a time.
    let total = n + batches * opts.batch;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..2 {
        let (bus, sub) = (bus.clone(), sub.clone());
        tasks.push(tokio::spawn(async move {
            let mut done = 0usize;
            loop {
                let got = bus.claim(&sub, &format!("bench-{c}"), 100).await?;
                if got.is_empty() {
                    return anyhow::Ok(done);
                }
                let acked = bus.ack_many(&got).await?;
                done += acked.iter().filter(|a| **a).count();
            }
        }));
    }
    let mut acked = 0;
    for t in tasks {
        acked += t.await??;
    }
    anyhow::ensure!(
        acked == total,
        "claimed and acked {acked} of {total} events"
    );
    let claim_ack_per_s = acked as f64 / start.elapsed().as_secs_f64();

    // 4. End-to-end latency: publish at a steady rate; a subscriber sleeping on the commit
    //    notification claims each event; latency = publish call start -> event in hand.
    let e2e_sub = bus
        .subscribe("bench-e2e", "bench.e2e", SubscriptionOptions::default())
        .await?;
    let origin = Instant::now();
    let consumer = {
        let (bus, sub) = (bus.clone(), e2e_sub.clone());
        let expect = opts.e2e_events;
        tokio::spawn(async move {
            let mut lat = Vec::with_capacity(expect);
            while lat.len() < expect {
                let got = bus
                    .next_batch(&sub, "e2e", 64, Duration::from_secs(1))
                    .await?;
                let now = origin.elapsed().as_secs_f64() * 1e3;
                for d in &got {
                    let sent = d.event.data["t_ms"].as_f64().unwrap_or(now);
                    lat.push(now - sent);
                }
                bus.ack_many(&got).await?;
            }
            anyhow::Ok(lat)
        })
    };
    let interval = Duration::from_secs_f64(1.0 / opts.e2e_rate as f64);
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    for i in 0..opts.e2e_events {
        ticker.tick().await;
        let t_ms = origin.elapsed().as_secs_f64() * 1e3;
        let bus = bus.clone();
        // Publishers do not wait for each other: a slow commit must not shift the schedule.
        tokio::spawn(async move {
            bus.publish(NewEvent::new(
                "bench.e2e",
                json!({ "seq": i, "t_ms": t_ms }),
            ))
            .await
        });
    }
    let mut lat = tokio::time::timeout(Duration::from_secs(60), consumer).await???;
    lat.sort_by(|a, b| a.total_cmp(b));

    store.close();
    let _ = std::fs::remove_dir_all(dir);
    Ok(BusBenchReport {
        events: n,
        payload_bytes,
        synchronous: format!("{:?}", opts.sync).to_uppercase(),
        publishers: opts.publishers,
        publish_per_s: publish_per_s.round(),
        batch_size: opts.batch,
        publish_batch_per_s: publish_batch_per_s.round(),
        claim_ack_per_s: claim_ack_per_s.round(),
        e2e_rate_per_s: opts.e2e_rate,
        e2e_p50_ms: (percentile(&lat, 0.50) * 1000.0).round() / 1000.0,
        e2e_p99_ms: (percentile(&lat, 0.99) * 1000.0).round() / 1000.0,
        e2e_max_ms: (lat.last().copied().unwrap_or(0.0) * 1000.0).round() / 1000.0,
    })
}
