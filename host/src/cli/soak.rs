//! `ksi-host dev soak`: publishes and consumes in a loop so a test can kill the process at any
//! moment and then check the bus's promises.
//!
//! Protocol with the test: after each publish is durable the worker prints `PUBLISHED <id>`
//! on stdout. Each consumer records its side effect (a row in `soak_effects`) and its ack in
//! ONE transaction, so "acked exactly once" is checkable from the database: every delivered
//! event has exactly one effect row per subscription, or is dead-lettered with none.

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use clap::Args;
use rand::Rng;
use serde_json::json;

use super::Opened;
use crate::bus::{self, BusError, NewEvent, SubscriptionOptions};

/// Arguments of the soak worker.
#[derive(Debug, Clone, Args)]
pub struct SoakArgs {
    /// Events to publish in this run (0: only consume until everything is settled, then exit)
    #[arg(long, default_value_t = 0)]
    pub publish: usize,
    /// Concurrent publishers
    #[arg(long, default_value_t = 4)]
    pub publishers: usize,
    /// Subscriptions (each sees every event)
    #[arg(long, value_delimiter = ',', default_value = "soak-a,soak-b")]
    pub subs: Vec<String>,
    /// Competing consumers per subscription
    #[arg(long, default_value_t = 2)]
    pub consumers: usize,
    /// Lease of a claim, ms
    #[arg(long, default_value_t = 300)]
    pub lease_ms: u64,
    /// Attempts before dead-lettering
    #[arg(long, default_value_t = 20)]
    pub max_attempts: u32,
    /// Probability that a consumer nacks an event instead of processing it
    #[arg(long, default_value_t = 0.05)]
    pub nack_rate: f64,
}

/// Runs the soak worker until it is killed (or, with `--publish 0`, until all is settled).
pub async fn run(args: SoakArgs, o: Opened) -> anyhow::Result<()> {
    o.store
        .write(|tx| {
            tx.execute_batch(
                "CREATE TABLE IF NOT EXISTS soak_effects (
                    subscription TEXT NOT NULL, message_id INTEGER NOT NULL, at INTEGER NOT NULL)",
            )?;
            Ok::<_, BusError>(())
        })
        .await?;
    let mut subs = Vec::new();
    for name in &args.subs {
        let opts = SubscriptionOptions {
            max_attempts: args.max_attempts,
            lease_ms: args.lease_ms,
            backoff_base_ms: 20,
            backoff_max_ms: 500,
            agent_id: None,
        };
        subs.push(o.bus.subscribe(name, "soak.>", opts).await?);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let mut consumers = Vec::new();
    for sub in &subs {
        for c in 0..args.consumers {
            let (bus, sub, stop, rate) = (o.bus.clone(), sub.clone(), stop.clone(), args.nack_rate);
            consumers.push(tokio::spawn(async move {
                let name = format!("{}-{c}-{}", sub.name, std::process::id());
                while !stop.load(Ordering::Relaxed) {
                    let batch = tokio::select! {
                        b = bus.next_batch(&sub, &name, 8, Duration::from_millis(100)) => b?,
                        _ = tokio::time::sleep(Duration::from_millis(200)) => continue,
                    };
                    for d in batch {
                        if rand::rng().random_bool(rate) {
                            let _ = bus.nack(&sub, &d, "simulated processing failure").await;
                            continue;
                        }
                        let (sname, sid) = (sub.name.clone(), sub.id);
                        let r = bus
                            .store()
                            .write(move |tx| {
                                tx.execute(
                                    "INSERT INTO soak_effects(subscription, message_id, at) VALUES (?1, ?2, ?3)",
                                    rusqlite::params![sname, d.event.id, crate::store::now_ms()],
                                )?;
                                bus::ack_in(tx, sid, d.event.id, &d.token)
                            })
                            .await;
                        match r {
                            Ok(()) | Err(BusError::StaleClaim { .. }) => {}
                            Err(e) => return Err(anyhow::Error::from(e)),
                        }
                    }
                }
                anyhow::Ok(())
            }));
        }
    }

    if args.publish > 0 {
        let next = Arc::new(AtomicUsize::new(0));
        let mut publishers = Vec::new();
        for _ in 0..args.publishers {
            let (bus, next, total) = (o.bus.clone(), next.clone(), args.publish);
            publishers.push(tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= total {
                        return anyhow::Ok(());
                    }
                    let id = bus
                        .publish(NewEvent::new(
                            "soak.item",
                            json!({ "i": i, "pid": std::process::id() }),
                        ))
                        .await?;
                    let mut out = std::io::stdout().lock();
                    writeln!(out, "PUBLISHED {id}")?;
                    out.flush()?;
                }
            }));
        }
        for p in publishers {
            p.await??;
        }
        println!("PUBLISH-DONE");
    }
    // Consume until every delivery is settled (completed or dead).
    loop {
        let open: i64 = o.store.read(|c| {
            c.query_row(
                "SELECT COUNT(*) FROM deliveries WHERE status IN ('pending', 'processing')",
                [],
                |r| r.get(0),
            )
            .map_err(BusError::from)
        })?;
        if open == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for c in consumers {
        c.await??;
    }
    println!("DRAINED");
    Ok(())
}
