//! The durable event bus: transactional publish (outbox), pattern subscriptions with fan-out,
//! leased claims with tokens, retries with backoff, dead letters, retention.
//!
//! Delivery model: publishing an event inserts it into `messages` and, in the same
//! transaction, one `deliveries` row for every active subscription whose pattern matches.
//! Consumers of a subscription compete for its deliveries: [`Bus::claim`] leases a batch
//! (status `processing`, a lease deadline, a fresh claim token); [`Bus::ack`] and
//! [`Bus::nack`] must present that token, so a consumer whose lease expired and whose event was
//! claimed by someone else cannot ack it. Expired leases and nacks schedule a retry with
//! exponential backoff and jitter; after `max_attempts` the delivery is dead-lettered with its
//! last error. Subscribers sleep on a watch channel that the store's writer bumps right after a
//! commit that published events, so delivery latency is one commit, with no polling.

pub mod pattern;

use std::time::Duration;

use rand::Rng;
use rusqlite::functions::FunctionFlags;
use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::store::{Store, StoreError, Tx, now_ms};
pub use pattern::{TopicError, matches, validate_pattern, validate_topic};

/// Errors of the bus.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error(transparent)]
    Topic(#[from] TopicError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(
        "the claim on event {message_id} for subscription {subscription} is no longer held (its lease expired and it was claimed again, or it was already acked); the event will be or was handled by its current holder"
    )]
    StaleClaim {
        subscription: String,
        message_id: i64,
    },
    #[error("no subscription named {0:?}; create it first with subscribe")]
    UnknownSubscription(String),
    #[error("event payload is not valid JSON: {0}")]
    BadPayload(String),
}

impl BusError {
    /// Whether this failure is a full disk (see [`StoreError::is_disk_full`]).
    pub fn is_disk_full(&self) -> bool {
        matches!(self, BusError::Store(e) if e.is_disk_full())
    }
}

impl From<rusqlite::Error> for BusError {
    fn from(e: rusqlite::Error) -> Self {
        BusError::Store(StoreError::from(e))
    }
}

/// Result alias for bus operations.
pub type Result<T, E = BusError> = std::result::Result<T, E>;

/// Registers the SQL function `ksi_match(pattern, topic)` used for fan-out.
pub fn register_sql_functions(conn: &Connection) -> rusqlite::Result<()> {
    conn.create_scalar_function(
        "ksi_match",
        2,
        FunctionFlags::SQLITE_UTF8 | FunctionFlags::SQLITE_DETERMINISTIC,
        |ctx| {
            let pattern = ctx.get_raw(0).as_str().unwrap_or("");
            let topic = ctx.get_raw(1).as_str().unwrap_or("");
            Ok(matches(pattern, topic))
        },
    )
}

/// An event to publish.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NewEvent {
    pub topic: String,
    /// Defaults to the topic in upper snake case (`claude.spawn.request` → `CLAUDE_SPAWN_REQUEST`).
    #[serde(default)]
    pub event_type: Option<String>,
    pub data: Value,
    #[serde(default)]
    pub correlation_id: Option<String>,
    #[serde(default)]
    pub causation_id: Option<i64>,
    /// Not delivered before this time (epoch ms): delayed retries and timers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_before: Option<i64>,
}

impl NewEvent {
    /// An event with a topic and a JSON payload.
    pub fn new(topic: impl Into<String>, data: Value) -> Self {
        NewEvent {
            topic: topic.into(),
            event_type: None,
            data,
            correlation_id: None,
            causation_id: None,
            not_before: None,
        }
    }

    /// Delays delivery until `at_ms` (epoch ms).
    pub fn not_before(mut self, at_ms: i64) -> Self {
        self.not_before = Some(at_ms);
        self
    }

    /// Sets the correlation id (workflow id, request id, ...).
    pub fn correlated(mut self, id: impl Into<String>) -> Self {
        self.correlation_id = Some(id.into());
        self
    }
}

/// A stored event.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Event {
    pub id: i64,
    pub topic: String,
    pub event_type: String,
    pub data: Value,
    pub correlation_id: Option<String>,
    pub causation_id: Option<i64>,
    pub created_at: i64,
}

/// An opaque token proving a claim; ack/nack must present it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClaimToken(pub String);

/// One claimed event, leased to the claimer.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub event: Event,
    pub subscription_id: i64,
    /// 1 for the first delivery, 2 for the first retry, ...
    pub attempt: u32,
    pub token: ClaimToken,
    pub lease_until: i64,
}

/// What a nack led to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NackOutcome {
    /// The event will be claimable again at `at` (ms), after `backoff_ms`.
    Retry { at: i64, backoff_ms: i64 },
    /// Attempts are used up: the event is dead-lettered with the error.
    Dead,
}

/// Delivery settings of a subscription.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SubscriptionOptions {
    pub max_attempts: u32,
    pub lease_ms: u64,
    pub backoff_base_ms: u64,
    pub backoff_max_ms: u64,
    /// The agent whose inbox this is, if any.
    pub agent_id: Option<String>,
}

impl Default for SubscriptionOptions {
    fn default() -> Self {
        SubscriptionOptions {
            max_attempts: 5,
            lease_ms: 30_000,
            backoff_base_ms: 200,
            backoff_max_ms: 60_000,
            agent_id: None,
        }
    }
}

impl SubscriptionOptions {
    /// The defaults of the configuration.
    pub fn from_config(c: &crate::config::Config) -> Self {
        SubscriptionOptions {
            max_attempts: c.bus_max_attempts,
            lease_ms: c.bus_lease_ms,
            backoff_base_ms: c.bus_backoff_base_ms,
            backoff_max_ms: c.bus_backoff_max_ms,
            agent_id: None,
        }
    }
}

/// A subscription as stored.
#[derive(Debug, Clone, Serialize)]
pub struct Subscription {
    pub id: i64,
    pub name: String,
    pub pattern: String,
    pub options: SubscriptionOptions,
}

/// Delivery status of an event for one subscription.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum DeliveryStatus {
    Pending,
    Processing,
    Completed,
    Dead,
}

impl DeliveryStatus {
    /// The name stored in the database and used in the API.
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryStatus::Pending => "pending",
            DeliveryStatus::Processing => "processing",
            DeliveryStatus::Completed => "completed",
            DeliveryStatus::Dead => "dead",
        }
    }
}

/// An event with its delivery state in one subscription (for listings).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeliveryRow {
    pub event: Event,
    pub subscription: String,
    pub status: String,
    pub attempts: u32,
    pub last_error: Option<String>,
    pub backoff_ms: Option<i64>,
    pub next_attempt_at: i64,
}

/// A filter for listing events.
#[derive(Debug, Clone, Default)]
pub struct EventQuery {
    pub pattern: Option<String>,
    pub status: Option<DeliveryStatus>,
    pub after_id: Option<i64>,
    pub limit: usize,
}

fn default_event_type(topic: &str) -> String {
    topic
        .chars()
        .map(|c| match c {
            '.' | '-' | ':' => '_',
            c => c.to_ascii_uppercase(),
        })
        .collect()
}

/// Publishes `event` inside the caller's transaction: it becomes visible (and its subscribers
/// are woken) only if that transaction commits.
///
/// # Errors
/// An invalid topic or a database error (the caller's transaction then rolls back).
pub fn publish_in(tx: &Tx<'_>, event: &NewEvent) -> Result<i64> {
    validate_topic(&event.topic)?;
    let now = now_ms();
    let event_type = event
        .event_type
        .clone()
        .unwrap_or_else(|| default_event_type(&event.topic));
    let data =
        serde_json::to_string(&event.data).map_err(|e| BusError::BadPayload(e.to_string()))?;
    let mut insert = tx.prepare_cached(
        "INSERT INTO messages(topic, event_type, data, correlation_id, causation_id, created_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?;
    insert.execute(params![
        event.topic,
        event_type,
        data,
        event.correlation_id,
        event.causation_id,
        now
    ])?;
    let id = tx.last_insert_rowid();
    let mut fan_out = tx.prepare_cached(
        "INSERT INTO deliveries(subscription_id, message_id, next_attempt_at, updated_at)
         SELECT id, ?1, ?2, ?4 FROM subscriptions WHERE active = 1 AND ksi_match(topic_pattern, ?3)",
    )?;
    let deliver_at = event.not_before.unwrap_or(now).max(now);
    fan_out.execute(params![id, deliver_at, event.topic, now])?;
    tx.note_published(id);
    Ok(id)
}

/// Acks inside the caller's transaction, so a consumer's side effect and its ack commit
/// together (exactly-once processing for effects kept in the same database).
pub fn ack_in(
    tx: &Tx<'_>,
    subscription_id: i64,
    message_id: i64,
    token: &ClaimToken,
) -> Result<()> {
    let now = now_ms();
    let n = tx
        .prepare_cached(
            "UPDATE deliveries SET status = 'completed', completed_at = ?4, updated_at = ?4,
                lease_until = NULL
             WHERE subscription_id = ?1 AND message_id = ?2 AND status = 'processing' AND claim_token = ?3",
        )?
        .execute(params![subscription_id, message_id, token.0, now])?;
    if n == 0 {
        return Err(stale(tx.conn(), subscription_id, message_id));
    }
    Ok(())
}

fn stale(conn: &Connection, subscription_id: i64, message_id: i64) -> BusError {
    let subscription = conn
        .query_row(
            "SELECT name FROM subscriptions WHERE id = ?1",
            [subscription_id],
            |r| r.get(0),
        )
        .unwrap_or_else(|_| subscription_id.to_string());
    BusError::StaleClaim {
        subscription,
        message_id,
    }
}

/// Exponential backoff with jitter for the `attempt`-th failure (1-based): a delay drawn
/// uniformly from [d/2, d] where d = min(max, base * 2^(attempt-1)).
pub fn backoff_ms(attempt: u32, base_ms: u64, max_ms: u64) -> i64 {
    let exp = base_ms.saturating_mul(1u64 << attempt.saturating_sub(1).min(30));
    let d = exp.min(max_ms).max(1);
    rand::rng().random_range(d / 2..=d) as i64
}

fn read_event(r: &rusqlite::Row<'_>) -> rusqlite::Result<Event> {
    let data: String = r.get(3)?;
    Ok(Event {
        id: r.get(0)?,
        topic: r.get(1)?,
        event_type: r.get(2)?,
        data: serde_json::from_str(&data).unwrap_or(Value::String(data)),
        correlation_id: r.get(4)?,
        causation_id: r.get(5)?,
        created_at: r.get(6)?,
    })
}

const EVENT_COLUMNS: &str =
    "m.id, m.topic, m.event_type, m.data, m.correlation_id, m.causation_id, m.created_at";

fn new_token() -> ClaimToken {
    let bytes: [u8; 16] = rand::rng().random();
    ClaimToken(hex::encode(bytes))
}

/// Returns expired leases of a subscription to `pending` (with backoff) or dead-letters them.
fn reap_expired(conn: &Connection, sub: &Subscription, now: i64) -> Result<usize> {
    let mut find = conn.prepare_cached(
        "SELECT message_id, attempts FROM deliveries
         WHERE subscription_id = ?1 AND status = 'processing' AND lease_until <= ?2
         ORDER BY lease_until LIMIT 256",
    )?;
    let expired: Vec<(i64, u32)> = find
        .query_map(params![sub.id, now], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<rusqlite::Result<_>>()?;
    for (message_id, attempts) in &expired {
        fail_delivery(
            conn,
            sub,
            *message_id,
            *attempts,
            "lease expired before ack",
            now,
        )?;
    }
    Ok(expired.len())
}

/// Moves a failed delivery to its retry or to the dead letters.
fn fail_delivery(
    conn: &Connection,
    sub: &Subscription,
    message_id: i64,
    attempts: u32,
    error: &str,
    now: i64,
) -> Result<NackOutcome> {
    if attempts >= sub.options.max_attempts {
        conn.prepare_cached(
            "UPDATE deliveries SET status = 'dead', last_error = ?3, lease_until = NULL,
                claim_token = NULL, updated_at = ?4
             WHERE subscription_id = ?1 AND message_id = ?2",
        )?
        .execute(params![sub.id, message_id, error, now])?;
        Ok(NackOutcome::Dead)
    } else {
        let backoff = backoff_ms(
            attempts,
            sub.options.backoff_base_ms,
            sub.options.backoff_max_ms,
        );
        let at = now + backoff;
        conn.prepare_cached(
            "UPDATE deliveries SET status = 'pending', last_error = ?3, lease_until = NULL,
                claim_token = NULL, next_attempt_at = ?4, backoff_ms = ?5, updated_at = ?6
             WHERE subscription_id = ?1 AND message_id = ?2",
        )?
        .execute(params![sub.id, message_id, error, at, backoff, now])?;
        Ok(NackOutcome::Retry {
            at,
            backoff_ms: backoff,
        })
    }
}

/// The bus: publish, subscribe, claim, ack, nack, prune, list.
#[derive(Clone, Debug)]
pub struct Bus {
    store: Store,
}

impl Bus {
    /// A bus over `store`.
    pub fn new(store: Store) -> Self {
        Bus { store }
    }

    /// The underlying store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Publishes one event in its own transaction; resolves when it is durable.
    pub async fn publish(&self, event: NewEvent) -> Result<i64> {
        validate_topic(&event.topic)?;
        self.store.write(move |tx| publish_in(tx, &event)).await
    }

    /// Publishes several events atomically; resolves when all are durable.
    pub async fn publish_batch(&self, events: Vec<NewEvent>) -> Result<Vec<i64>> {
        for e in &events {
            validate_topic(&e.topic)?;
        }
        self.store
            .write(move |tx| events.iter().map(|e| publish_in(tx, e)).collect())
            .await
    }

    /// Creates the subscription `name` for `pattern`, or updates its pattern and options.
    /// Only events published after it exists are delivered to it.
    pub async fn subscribe(
        &self,
        name: &str,
        pattern: &str,
        options: SubscriptionOptions,
    ) -> Result<Subscription> {
        validate_pattern(pattern)?;
        let (name, pattern) = (name.to_string(), pattern.to_string());
        self.store
            .write(move |tx| {
                let id: i64 = tx.query_row(
                    "INSERT INTO subscriptions(name, agent_id, topic_pattern, max_attempts, lease_ms,
                        backoff_base_ms, backoff_max_ms, active, created_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, 1, ?8)
                     ON CONFLICT(name) DO UPDATE SET topic_pattern = excluded.topic_pattern,
                        agent_id = excluded.agent_id, max_attempts = excluded.max_attempts,
                        lease_ms = excluded.lease_ms, backoff_base_ms = excluded.backoff_base_ms,
                        backoff_max_ms = excluded.backoff_max_ms, active = 1
                     RETURNING id",
                    params![
                        name,
                        options.agent_id,
                        pattern,
                        options.max_attempts,
                        options.lease_ms as i64,
                        options.backoff_base_ms as i64,
                        options.backoff_max_ms as i64,
                        now_ms()
                    ],
                    |r| r.get(0),
                )?;
                Ok(Subscription {
                    id,
                    name,
                    pattern,
                    options,
                })
            })
            .await
    }

    /// Looks a subscription up by name.
    pub fn subscription(&self, name: &str) -> Result<Subscription> {
        let name = name.to_string();
        self.store.read(move |c| {
            c.query_row(
                "SELECT id, name, topic_pattern, max_attempts, lease_ms, backoff_base_ms,
                    backoff_max_ms, agent_id FROM subscriptions WHERE name = ?1",
                [&name],
                |r| {
                    Ok(Subscription {
                        id: r.get(0)?,
                        name: r.get(1)?,
                        pattern: r.get(2)?,
                        options: SubscriptionOptions {
                            max_attempts: r.get(3)?,
                            lease_ms: r.get::<_, i64>(4)? as u64,
                            backoff_base_ms: r.get::<_, i64>(5)? as u64,
                            backoff_max_ms: r.get::<_, i64>(6)? as u64,
                            agent_id: r.get(7)?,
                        },
                    })
                },
            )
            .optional()?
            .ok_or_else(|| BusError::UnknownSubscription(name.clone()))
        })
    }

    /// Claims up to `max` ready events of `sub` for `consumer`, leasing them for the
    /// subscription's lease time. Expired leases of the subscription are reaped first.
    pub async fn claim(
        &self,
        sub: &Subscription,
        consumer: &str,
        max: usize,
    ) -> Result<Vec<Delivery>> {
        let (sub, consumer) = (sub.clone(), consumer.to_string());
        // A claim need not survive a power loss: a lost lease only makes the event claimable
        // again, which at-least-once delivery allows. So it does not wait for the fsync.
        self.store
            .write_relaxed(move |tx| claim_in(tx, &sub, &consumer, max))
            .await
    }

    /// Acks one claimed event.
    ///
    /// # Errors
    /// [`BusError::StaleClaim`] when the token no longer holds the event.
    pub async fn ack(&self, delivery: &Delivery) -> Result<()> {
        let (sub, id, token) = (
            delivery.subscription_id,
            delivery.event.id,
            delivery.token.clone(),
        );
        self.store
            .write(move |tx| ack_in(tx, sub, id, &token))
            .await
    }

    /// Acks several claimed events in one transaction; returns, per delivery, whether the ack
    /// held (a stale one does not fail the others).
    pub async fn ack_many(&self, deliveries: &[Delivery]) -> Result<Vec<bool>> {
        let items: Vec<(i64, i64, ClaimToken)> = deliveries
            .iter()
            .map(|d| (d.subscription_id, d.event.id, d.token.clone()))
            .collect();
        self.store
            .write(move |tx| {
                items
                    .iter()
                    .map(|(s, m, t)| match ack_in(tx, *s, *m, t) {
                        Ok(()) => Ok(true),
                        Err(BusError::StaleClaim { .. }) => Ok(false),
                        Err(e) => Err(e),
                    })
                    .collect()
            })
            .await
    }

    /// Gives a claimed event back with an error: it is retried after a backoff, or
    /// dead-lettered when its attempts are used up.
    pub async fn nack(
        &self,
        sub: &Subscription,
        delivery: &Delivery,
        error: &str,
    ) -> Result<NackOutcome> {
        let (sub, id, token, error) = (
            sub.clone(),
            delivery.event.id,
            delivery.token.clone(),
            error.to_string(),
        );
        self.store
            .write(move |tx| {
                let attempts: Option<u32> = tx
                    .query_row(
                        "SELECT attempts FROM deliveries WHERE subscription_id = ?1 AND message_id = ?2
                         AND status = 'processing' AND claim_token = ?3",
                        params![sub.id, id, token.0],
                        |r| r.get(0),
                    )
                    .optional()?;
                let Some(attempts) = attempts else {
                    return Err(stale(tx.conn(), sub.id, id));
                };
                fail_delivery(tx.conn(), &sub, id, attempts, &error, now_ms())
            })
            .await
    }

    /// Releases claimed events without counting an attempt (used when draining on shutdown).
    pub async fn release(&self, deliveries: &[Delivery]) -> Result<()> {
        let items: Vec<(i64, i64, ClaimToken)> = deliveries
            .iter()
            .map(|d| (d.subscription_id, d.event.id, d.token.clone()))
            .collect();
        self.store
            .write(move |tx| {
                let now = now_ms();
                for (s, m, t) in &items {
                    tx.prepare_cached(
                        "UPDATE deliveries SET status = 'pending', attempts = MAX(attempts - 1, 0),
                            lease_until = NULL, claim_token = NULL, next_attempt_at = ?4, updated_at = ?4
                         WHERE subscription_id = ?1 AND message_id = ?2 AND status = 'processing'
                            AND claim_token = ?3",
                    )?
                    .execute(params![s, m, t.0, now])?;
                }
                Ok(())
            })
            .await
    }

    /// Extends the lease of a claimed event (a heartbeat for long work). Returns false when
    /// the claim is no longer held.
    pub async fn extend(&self, delivery: &Delivery, lease: Duration) -> Result<bool> {
        let (sub, id, token) = (
            delivery.subscription_id,
            delivery.event.id,
            delivery.token.clone(),
        );
        self.store
            .write_relaxed(move |tx| {
                let n = tx
                    .prepare_cached(
                        "UPDATE deliveries SET lease_until = ?4 WHERE subscription_id = ?1
                         AND message_id = ?2 AND status = 'processing' AND claim_token = ?3",
                    )?
                    .execute(params![
                        sub,
                        id,
                        token.0,
                        now_ms() + lease.as_millis() as i64
                    ])?;
                Ok(n == 1)
            })
            .await
    }

    /// Makes every event of `sub` that is currently claimed claimable again at once, without
    /// counting an attempt. Only for start-up, when the data-dir lock proves that the claims
    /// were made by a previous incarnation of this daemon (so their leases need not run out).
    pub async fn release_all(&self, sub: &Subscription) -> Result<usize> {
        let id = sub.id;
        self.store
            .write(move |tx| {
                let now = now_ms();
                Ok(tx
                    .prepare_cached(
                        "UPDATE deliveries SET status = 'pending', attempts = MAX(attempts - 1, 0),
                            lease_until = NULL, claim_token = NULL, next_attempt_at = ?2, updated_at = ?2
                         WHERE subscription_id = ?1 AND status = 'processing'",
                    )?
                    .execute(params![id, now])?)
            })
            .await
    }

    /// When the next delivery of `sub` becomes claimable (a pending retry or an expiring
    /// lease), if any; `Some(now or earlier)` when something is claimable right away.
    pub fn next_due(&self, sub: &Subscription) -> Result<Option<i64>> {
        let id = sub.id;
        self.store.read(move |c| {
            let pending: Option<i64> = c
                .prepare_cached(
                    "SELECT MIN(next_attempt_at) FROM deliveries WHERE subscription_id = ?1 AND status = 'pending'",
                )?
                .query_row([id], |r| r.get(0))?;
            let lease: Option<i64> = c
                .prepare_cached(
                    "SELECT MIN(lease_until) FROM deliveries WHERE subscription_id = ?1 AND status = 'processing'",
                )?
                .query_row([id], |r| r.get(0))?;
            Ok(match (pending, lease) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            })
        })
    }

    /// Waits until `sub` has claimable events, then claims up to `max`. Wakes right after a
    /// commit that published events; a timer covers delayed retries, expiring leases and
    /// events committed by other processes (`safety` bounds every sleep).
    pub async fn next_batch(
        &self,
        sub: &Subscription,
        consumer: &str,
        max: usize,
        safety: Duration,
    ) -> Result<Vec<Delivery>> {
        let mut published = self.store.published();
        // A claim is a write (and an fsync); after a timer wake-up it is tried only when a
        // read finds something due, so an idle subscriber costs one small read per `safety`.
        let mut claim = true;
        loop {
            published.borrow_and_update();
            if claim {
                let batch = self.claim(sub, consumer, max).await?;
                if !batch.is_empty() {
                    return Ok(batch);
                }
            }
            let bus = self.clone();
            let s = sub.clone();
            let due = tokio::task::spawn_blocking(move || bus.next_due(&s))
                .await
                .map_err(|e| StoreError::Panicked(e.to_string()))??;
            let sleep = match due {
                Some(at) => Duration::from_millis((at - now_ms()).max(0) as u64).min(safety),
                None => safety,
            };
            if sleep.is_zero() {
                claim = true;
                continue;
            }
            tokio::select! {
                changed = published.changed() => {
                    if changed.is_err() {
                        return Err(StoreError::Closed.into());
                    }
                    claim = true;
                }
                _ = tokio::time::sleep(sleep) => claim = false,
            }
        }
    }

    /// Deletes events older than `age` whose deliveries are all completed (and events nobody
    /// subscribed to). Dead letters and unfinished deliveries are kept. Returns the number of
    /// events deleted.
    pub async fn prune(&self, age: Duration) -> Result<usize> {
        let cutoff = now_ms() - age.as_millis() as i64;
        let (mut total, mut after) = (0, 0i64);
        loop {
            // One short transaction per 1000 events, so writers are never held up for long.
            let (deleted, scanned_to, done) = self
                .store
                .write(move |tx| {
                    // Oldest first; ids grow with created_at (both assigned by the single
                    // writer), so the scan stops at the first event younger than the cutoff.
                    let candidates: Vec<(i64, i64)> = tx
                        .prepare_cached(
                            "SELECT id, created_at FROM messages WHERE id > ?1 ORDER BY id LIMIT 1000",
                        )?
                        .query_map([after], |r| Ok((r.get(0)?, r.get(1)?)))?
                        .collect::<rusqlite::Result<_>>()?;
                    let mut done = candidates.len() < 1000;
                    let (mut deleted, mut last) = (0, after);
                    for (id, created_at) in candidates {
                        if created_at >= cutoff {
                            done = true;
                            break;
                        }
                        last = id;
                        let open: bool = tx
                            .prepare_cached(
                                "SELECT EXISTS (SELECT 1 FROM deliveries WHERE message_id = ?1
                                   AND subscription_id IN (SELECT id FROM subscriptions)
                                   AND status != 'completed')",
                            )?
                            .query_row([id], |r| r.get(0))?;
                        if open {
                            continue; // unfinished or dead-lettered: kept
                        }
                        tx.prepare_cached(
                            "DELETE FROM deliveries WHERE message_id = ?1
                             AND subscription_id IN (SELECT id FROM subscriptions)",
                        )?
                        .execute([id])?;
                        tx.prepare_cached("DELETE FROM messages WHERE id = ?1")?
                            .execute([id])?;
                        deleted += 1;
                    }
                    Ok::<_, BusError>((deleted, last, done))
                })
                .await?;
            total += deleted;
            after = scanned_to;
            if done {
                return Ok(total);
            }
        }
    }

    /// Lists events, newest last. With a status, lists deliveries in that status.
    pub fn list(&self, q: &EventQuery) -> Result<Vec<DeliveryRow>> {
        if let Some(p) = &q.pattern {
            validate_pattern(p)?;
        }
        let q = q.clone();
        self.store.read(move |c| {
            let limit = if q.limit == 0 { 100 } else { q.limit } as i64;
            let after = q.after_id.unwrap_or(0);
            let mut out = Vec::new();
            match q.status {
                Some(status) => {
                    let sql = format!(
                        "SELECT {EVENT_COLUMNS}, s.name, d.status, d.attempts, d.last_error, d.backoff_ms,
                            d.next_attempt_at
                         FROM deliveries d JOIN messages m ON m.id = d.message_id
                         JOIN subscriptions s ON s.id = d.subscription_id
                         WHERE d.status = ?1 AND m.id > ?2 AND (?3 IS NULL OR ksi_match(?3, m.topic))
                         ORDER BY m.id LIMIT ?4"
                    );
                    let mut st = c.prepare(&sql)?;
                    let rows = st.query_map(
                        params![status.as_str(), after, q.pattern, limit],
                        |r| {
                            Ok(DeliveryRow {
                                event: read_event(r)?,
                                subscription: r.get(7)?,
                                status: r.get(8)?,
                                attempts: r.get(9)?,
                                last_error: r.get(10)?,
                                backoff_ms: r.get(11)?,
                                next_attempt_at: r.get(12)?,
                            })
                        },
                    )?;
                    for row in rows {
                        out.push(row?);
                    }
                }
                None => {
                    for event in events_after(c, after, q.pattern.as_deref(), limit as usize)? {
                        out.push(DeliveryRow {
                            next_attempt_at: event.created_at,
                            event,
                            subscription: String::new(),
                            status: String::new(),
                            attempts: 0,
                            last_error: None,
                            backoff_ms: None,
                        });
                    }
                }
            }
            Ok(out)
        })
    }

    /// Events with id greater than `after` matching `pattern`, oldest first (for tails and
    /// live streams that resume from a last-seen id).
    pub fn events_after(
        &self,
        after: i64,
        pattern: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Event>> {
        if let Some(p) = pattern {
            validate_pattern(p)?;
        }
        let pattern = pattern.map(str::to_string);
        self.store
            .read(move |c| events_after(c, after, pattern.as_deref(), limit))
    }

    /// The newest `n` events matching `pattern`, oldest first.
    pub fn latest(&self, pattern: Option<&str>, n: usize) -> Result<Vec<Event>> {
        if let Some(p) = pattern {
            validate_pattern(p)?;
        }
        let pattern = pattern.map(str::to_string);
        self.store.read(move |c| {
            let sql = format!(
                "SELECT {EVENT_COLUMNS} FROM messages m WHERE (?1 IS NULL OR ksi_match(?1, m.topic))
                 ORDER BY m.id DESC LIMIT ?2"
            );
            let mut st = c.prepare(&sql)?;
            let mut rows: Vec<Event> = st
                .query_map(params![pattern, n as i64], read_event)?
                .collect::<rusqlite::Result<_>>()?;
            rows.reverse();
            Ok(rows)
        })
    }

    /// The delivery row of one event in one subscription (for inspection and tests).
    pub fn delivery(&self, sub: &Subscription, message_id: i64) -> Result<Option<DeliveryRow>> {
        let (sid, name) = (sub.id, sub.name.clone());
        self.store.read(move |c| {
            let sql = format!(
                "SELECT {EVENT_COLUMNS}, d.status, d.attempts, d.last_error, d.backoff_ms, d.next_attempt_at
                 FROM deliveries d JOIN messages m ON m.id = d.message_id
                 WHERE d.subscription_id = ?1 AND d.message_id = ?2"
            );
            Ok(c.query_row(&sql, params![sid, message_id], |r| {
                Ok(DeliveryRow {
                    event: read_event(r)?,
                    subscription: name.clone(),
                    status: r.get(7)?,
                    attempts: r.get(8)?,
                    last_error: r.get(9)?,
                    backoff_ms: r.get(10)?,
                    next_attempt_at: r.get(11)?,
                })
            })
            .optional()?)
        })
    }

    /// Counts deliveries by status for a subscription (or all subscriptions).
    pub fn counts(&self, sub: Option<&Subscription>) -> Result<Vec<(String, i64)>> {
        let id = sub.map(|s| s.id);
        self.store.read(move |c| {
            let mut st = c.prepare(
                "SELECT status, COUNT(*) FROM deliveries WHERE (?1 IS NULL OR subscription_id = ?1)
                 GROUP BY status ORDER BY status",
            )?;
            let rows = st.query_map([id], |r| Ok((r.get(0)?, r.get(1)?)))?;
            Ok(rows.collect::<rusqlite::Result<_>>()?)
        })
    }
}

fn events_after(
    c: &Connection,
    after: i64,
    pattern: Option<&str>,
    limit: usize,
) -> Result<Vec<Event>> {
    let sql = format!(
        "SELECT {EVENT_COLUMNS} FROM messages m WHERE m.id > ?1 AND (?2 IS NULL OR ksi_match(?2, m.topic))
         ORDER BY m.id LIMIT ?3"
    );
    let mut st = c.prepare_cached(&sql)?;
    let rows = st.query_map(params![after, pattern, limit as i64], read_event)?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// [`Bus::claim`] inside the caller's transaction.
pub fn claim_in(
    tx: &Tx<'_>,
    sub: &Subscription,
    consumer: &str,
    max: usize,
) -> Result<Vec<Delivery>> {
    let now = now_ms();
    reap_expired(tx.conn(), sub, now)?;
    let token = new_token();
    let lease_until = now + sub.options.lease_ms as i64;
    let claimed: Vec<(i64, u32)> = tx
        .prepare_cached(
            "UPDATE deliveries SET status = 'processing', attempts = attempts + 1, lease_until = ?3,
                claim_token = ?4, claimed_by = ?5, updated_at = ?2
             WHERE subscription_id = ?1 AND message_id IN (
                SELECT message_id FROM deliveries
                WHERE subscription_id = ?1 AND status = 'pending' AND next_attempt_at <= ?2
                ORDER BY next_attempt_at, message_id LIMIT ?6)
             RETURNING message_id, attempts",
        )?
        .query_map(
            params![sub.id, now, lease_until, token.0, consumer, max as i64],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?
        .collect::<rusqlite::Result<_>>()?;
    let mut load = tx.prepare_cached(&format!(
        "SELECT {EVENT_COLUMNS} FROM messages m WHERE m.id = ?1"
    ))?;
    let mut out = Vec::with_capacity(claimed.len());
    for (message_id, attempt) in claimed {
        let event = load.query_row([message_id], read_event)?;
        out.push(Delivery {
            event,
            subscription_id: sub.id,
            attempt,
            token: token.clone(),
            lease_until,
        });
    }
    out.sort_by_key(|d| d.event.id);
    Ok(out)
}

#[cfg(test)]
mod tests;
