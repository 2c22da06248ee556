use std::collections::HashSet;
use std::time::Duration;

use serde_json::json;

use super::*;
use crate::config::SyncMode;
use crate::store::StoreOptions;

fn temp_bus() -> (tempfile::TempDir, Bus) {
    let dir = tempfile::tempdir().unwrap();
    let opts = StoreOptions {
        sync: SyncMode::Normal,
        ..StoreOptions::default()
    };
    let store = Store::open_path(&dir.path().join("ksi.db"), &opts).unwrap();
    (dir, Bus::new(store))
}

fn opts(max_attempts: u32, lease_ms: u64) -> SubscriptionOptions {
    SubscriptionOptions {
        max_attempts,
        lease_ms,
        backoff_base_ms: 20,
        backoff_max_ms: 1_000,
        agent_id: None,
    }
}

#[tokio::test]
async fn a_failing_transaction_publishes_nothing() -> anyhow::Result<()> {
    let (_d, bus) = temp_bus();
    let sub = bus.subscribe("s", ">", opts(3, 1000)).await?;
    let r: Result<()> = bus
        .store()
        .write(|tx| {
            publish_in(tx, &NewEvent::new("order.created", json!({"n": 1})))?;
            tx.execute("INSERT INTO no_such_table VALUES (1)", [])?;
            Ok(())
        })
        .await;
    assert!(r.is_err());
    assert!(bus.events_after(0, None, 10)?.is_empty(), "no event row");
    assert!(bus.claim(&sub, "c", 10).await?.is_empty(), "no delivery");
    // The state change and the event commit together when the job succeeds.
    bus.store()
        .write(|tx| {
            tx.execute(
                "INSERT INTO config(key, value, updated_at) VALUES ('x', '1', 0)",
                [],
            )?;
            publish_in(tx, &NewEvent::new("order.created", json!({"n": 2})))?;
            Ok::<_, BusError>(())
        })
        .await?;
    let got = bus.claim(&sub, "c", 10).await?;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].event.data, json!({"n": 2}));
    Ok(())
}

#[tokio::test]
async fn every_subscription_gets_its_own_copy() -> anyhow::Result<()> {
    let (_d, bus) = temp_bus();
    let a = bus.subscribe("a", "claude.spawn.*", opts(3, 1000)).await?;
    let b = bus.subscribe("b", "claude.>", opts(3, 1000)).await?;
    let c = bus.subscribe("c", "workflow.>", opts(3, 1000)).await?;
    let id = bus
        .publish(NewEvent::new("claude.spawn.request", json!({})))
        .await?;
    let got_a = bus.claim(&a, "x", 10).await?;
    let got_b = bus.claim(&b, "x", 10).await?;
    assert_eq!(got_a.iter().map(|d| d.event.id).collect::<Vec<_>>(), [id]);
    assert_eq!(got_b.iter().map(|d| d.event.id).collect::<Vec<_>>(), [id]);
    assert!(
        bus.claim(&c, "x", 10).await?.is_empty(),
        "pattern excludes it"
    );
    bus.ack(&got_a[0]).await?;
    assert_eq!(
        bus.delivery(&b, id)?.unwrap().status,
        "processing",
        "acking in one subscription leaves the other alone"
    );
    Ok(())
}

#[tokio::test]
async fn competing_consumers_never_get_the_same_event() -> anyhow::Result<()> {
    let (_d, bus) = temp_bus();
    let sub = bus.subscribe("work", "job.*", opts(3, 60_000)).await?;
    let events: Vec<NewEvent> = (0..500)
        .map(|i| NewEvent::new("job.run", json!({ "i": i })))
        .collect();
    bus.publish_batch(events).await?;
    let mut tasks = Vec::new();
    for c in 0..4 {
        let (bus, sub) = (bus.clone(), sub.clone());
        tasks.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            loop {
                let got = bus.claim(&sub, &format!("c{c}"), 7).await.unwrap();
                if got.is_empty() {
                    return mine;
                }
                bus.ack_many(&got).await.unwrap();
                mine.extend(got.into_iter().map(|d| d.event.id));
            }
        }));
    }
    let mut seen = HashSet::new();
    let mut total = 0;
    for t in tasks {
        for id in t.await? {
            assert!(seen.insert(id), "event {id} delivered twice");
            total += 1;
        }
    }
    assert_eq!(total, 500);
    Ok(())
}

#[tokio::test]
async fn a_stale_claim_token_cannot_ack() -> anyhow::Result<()> {
    let (_d, bus) = temp_bus();
    let sub = bus.subscribe("s", "t", opts(5, 50)).await?;
    bus.publish(NewEvent::new("t", json!(1))).await?;
    let first = bus.claim(&sub, "slow", 1).await?.remove(0);
    tokio::time::sleep(Duration::from_millis(80)).await;
    // The lease expired; after the backoff the event is claimed by another consumer.
    let second = loop {
        let got = bus.claim(&sub, "fast", 1).await?;
        if let Some(d) = got.into_iter().next() {
            break d;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    assert_eq!(second.event.id, first.event.id);
    assert_ne!(second.token, first.token);
    let err = bus.ack(&first).await.unwrap_err();
    assert!(matches!(err, BusError::StaleClaim { .. }), "{err}");
    assert!(
        matches!(
            bus.nack(&sub, &first, "late").await,
            Err(BusError::StaleClaim { .. })
        ),
        "a stale nack is refused too"
    );
    bus.ack(&second).await?;
    assert_eq!(
        bus.delivery(&sub, first.event.id)?.unwrap().status,
        "completed"
    );
    Ok(())
}

#[tokio::test]
async fn an_expired_lease_makes_the_event_claimable_again() -> anyhow::Result<()> {
    let (_d, bus) = temp_bus();
    let sub = bus.subscribe("s", "t", opts(5, 30)).await?;
    let id = bus.publish(NewEvent::new("t", json!(1))).await?;
    let d1 = bus.claim(&sub, "a", 1).await?;
    assert_eq!(d1.len(), 1);
    assert!(bus.claim(&sub, "b", 1).await?.is_empty(), "leased");
    // next_batch sleeps until the lease and backoff have passed, then redelivers.
    let d2 = tokio::time::timeout(
        Duration::from_secs(5),
        bus.next_batch(&sub, "b", 1, Duration::from_secs(1)),
    )
    .await??;
    assert_eq!(d2[0].event.id, id);
    assert_eq!(d2[0].attempt, 2);
    let row = bus.delivery(&sub, id)?.unwrap();
    assert_eq!(row.last_error.as_deref(), Some("lease expired before ack"));
    Ok(())
}

#[tokio::test]
async fn nack_backs_off_exponentially_and_records_the_delay() -> anyhow::Result<()> {
    let (_d, bus) = temp_bus();
    let sub = bus.subscribe("s", "t", opts(10, 10_000)).await?;
    let id = bus.publish(NewEvent::new("t", json!(1))).await?;
    let mut delays = Vec::new();
    let mut early: Option<Delivery> = None;
    for attempt in 1..=4u32 {
        let d = match early.take() {
            Some(d) => d,
            None => loop {
                if let Some(d) = bus.claim(&sub, "c", 1).await?.pop() {
                    break d;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            },
        };
        assert_eq!(d.attempt, attempt);
        let before = now_ms();
        let NackOutcome::Retry { at, backoff_ms } = bus.nack(&sub, &d, "boom").await? else {
            panic!("retry expected")
        };
        // base 20 ms: attempt n waits in [20*2^(n-1)/2, 20*2^(n-1)].
        let full = 20i64 << (attempt - 1);
        assert!(
            (full / 2..=full).contains(&backoff_ms),
            "attempt {attempt}: {backoff_ms} ms"
        );
        assert!(at >= before + backoff_ms);
        let row = bus.delivery(&sub, id)?.unwrap();
        assert_eq!(row.backoff_ms, Some(backoff_ms), "recorded on the row");
        assert_eq!(row.next_attempt_at, at);
        early = bus.claim(&sub, "c", 1).await?.pop();
        assert!(
            early.is_none() || now_ms() >= at,
            "not claimable before its time"
        );
        delays.push(backoff_ms);
    }
    assert!(delays[3] > delays[0], "delays grow: {delays:?}");
    Ok(())
}

#[tokio::test]
async fn after_max_attempts_the_event_is_dead_lettered_with_its_error() -> anyhow::Result<()> {
    let (_d, bus) = temp_bus();
    let sub = bus.subscribe("s", "t", opts(3, 10_000)).await?;
    let id = bus.publish(NewEvent::new("t", json!(1))).await?;
    let mut outcomes = Vec::new();
    for i in 0..3 {
        let d = tokio::time::timeout(
            Duration::from_secs(5),
            bus.next_batch(&sub, "c", 1, Duration::from_millis(50)),
        )
        .await??
        .remove(0);
        outcomes.push(bus.nack(&sub, &d, &format!("failure {i}")).await?);
    }
    assert!(matches!(outcomes[0], NackOutcome::Retry { .. }));
    assert_eq!(outcomes[2], NackOutcome::Dead);
    let dead = bus.list(&EventQuery {
        status: Some(DeliveryStatus::Dead),
        ..Default::default()
    })?;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].event.id, id);
    assert_eq!(dead[0].attempts, 3);
    assert_eq!(dead[0].last_error.as_deref(), Some("failure 2"));
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(bus.claim(&sub, "c", 1).await?.is_empty(), "dead is final");
    Ok(())
}

#[tokio::test]
async fn retention_prunes_old_completed_events_only() -> anyhow::Result<()> {
    let (_d, bus) = temp_bus();
    let sub = bus.subscribe("s", "t.*", opts(1, 10_000)).await?;
    let done = bus.publish(NewEvent::new("t.done", json!(1))).await?;
    let open = bus.publish(NewEvent::new("t.open", json!(2))).await?;
    let dead = bus.publish(NewEvent::new("t.dead", json!(3))).await?;
    let unrouted = bus.publish(NewEvent::new("other", json!(4))).await?;
    for d in bus.claim(&sub, "c", 10).await? {
        match d.event.id {
            id if id == done => bus.ack(&d).await?,
            id if id == dead => assert_eq!(bus.nack(&sub, &d, "x").await?, NackOutcome::Dead),
            _ => {} // left processing
        }
    }
    // Nothing is old enough yet.
    assert_eq!(bus.prune(Duration::from_secs(3600)).await?, 0);
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(bus.prune(Duration::from_millis(10)).await?, 2);
    let left: Vec<i64> = bus
        .events_after(0, None, 10)?
        .iter()
        .map(|e| e.id)
        .collect();
    assert_eq!(left, vec![open, dead]);
    assert!(!left.contains(&unrouted));
    // Ids are never reused after a prune.
    let next = bus.publish(NewEvent::new("t.new", json!(5))).await?;
    assert!(next > unrouted);
    Ok(())
}

#[tokio::test]
async fn subscribers_wake_on_commit_without_polling() -> anyhow::Result<()> {
    let (_d, bus) = temp_bus();
    let sub = bus.subscribe("s", "t", opts(3, 10_000)).await?;
    let waiter = {
        let (bus, sub) = (bus.clone(), sub.clone());
        // A safety timer of an hour: only the commit notification can wake it in time.
        tokio::spawn(async move {
            bus.next_batch(&sub, "c", 10, Duration::from_secs(3600))
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    let id = bus.publish(NewEvent::new("t", json!(1))).await?;
    let got = tokio::time::timeout(Duration::from_secs(5), waiter).await???;
    assert_eq!(got[0].event.id, id);
    Ok(())
}

#[tokio::test]
async fn invalid_topics_are_refused_before_anything_is_written() -> anyhow::Result<()> {
    let (_d, bus) = temp_bus();
    let err = bus
        .publish(NewEvent::new("a..b", json!(1)))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("empty segment"), "{err}");
    assert!(bus.subscribe("s", "a.>.b", opts(1, 1)).await.is_err());
    assert!(bus.events_after(0, None, 10)?.is_empty());
    Ok(())
}
