//! `/events`: query, publish, and follow the bus live (WebSocket or Server-Sent Events), with
//! resume from a last-seen id so a reconnecting client misses nothing.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::State;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::http::HeaderMap;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{ApiError, ApiJson, ApiQuery, AppState, limit};
use crate::bus::{Bus, DeliveryStatus, Event, EventQuery, NewEvent, matches, validate_pattern};
use crate::store::Store;

/// Events a stream client gets per query when it catches up from the database.
const PAGE: usize = 500;
/// Batches of committed events kept for slow stream clients; one that falls further behind
/// catches up from the database.
const FANOUT_BUFFER: usize = 1024;

/// Committed events, read from the database once per commit by one task and handed to every
/// live stream client (each filters them by its topic pattern). A client that resumes from an
/// old id, or lags more than [`FANOUT_BUFFER`] batches behind, reads the database until it has
/// caught up, then follows the broadcast again. So a commit costs one query, not one per client.
#[derive(Clone)]
pub struct Fanout {
    store: Store,
    bus: Bus,
    tx: std::sync::Arc<
        std::sync::OnceLock<tokio::sync::broadcast::Sender<std::sync::Arc<[Event]>>>,
    >,
}

impl Fanout {
    /// A fan-out over `bus`; its reader task starts with the first stream client.
    pub fn new(store: Store, bus: Bus) -> Fanout {
        Fanout {
            store,
            bus,
            tx: std::sync::Arc::default(),
        }
    }

    fn subscribe(&self) -> tokio::sync::broadcast::Receiver<std::sync::Arc<[Event]>> {
        self.tx
            .get_or_init(|| {
                let (tx, _) = tokio::sync::broadcast::channel(FANOUT_BUFFER);
                tokio::spawn(Self::read(self.store.clone(), self.bus.clone(), tx.clone()));
                tx
            })
            .subscribe()
    }

    /// The reader: after each commit (or each second, for commits by other processes), the
    /// events after the last one it read.
    async fn read(
        store: Store,
        bus: Bus,
        tx: tokio::sync::broadcast::Sender<std::sync::Arc<[Event]>>,
    ) {
        let mut published = store.published();
        let mut last = store.published_id();
        loop {
            published.borrow_and_update();
            loop {
                match bus.events_after(last, None, PAGE) {
                    Ok(evs) if !evs.is_empty() => {
                        last = evs[evs.len() - 1].id;
                        let full = evs.len() == PAGE;
                        // No receiver: nobody is following right now; nothing is lost (a
                        // client that subscribes later reads the database first).
                        let _ = tx.send(evs.into());
                        if !full {
                            break;
                        }
                    }
                    _ => break,
                }
            }
            tokio::select! {
                _ = published.changed() => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }
}

/// One stream client's position: it reads the database until it has caught up, then the
/// fan-out's batches.
struct Follower {
    rx: tokio::sync::broadcast::Receiver<std::sync::Arc<[Event]>>,
    catching_up: bool,
}

impl Follower {
    fn new(s: &AppState) -> Follower {
        // Subscribe before the first query, so nothing committed in between is missed (what
        // both deliver is dropped by id).
        Follower {
            rx: s.fanout.subscribe(),
            catching_up: true,
        }
    }

    /// The next events after `last` matching `pattern`, in order (waits for some).
    async fn next(&mut self, s: &AppState, pattern: Option<&str>, last: i64) -> Vec<Event> {
        use tokio::sync::broadcast::error::RecvError;
        loop {
            if self.catching_up {
                match s.bus.events_after(last, pattern, PAGE) {
                    Ok(evs) if evs.len() == PAGE => return evs,
                    Ok(evs) => {
                        self.catching_up = false;
                        if !evs.is_empty() {
                            return evs;
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "reading events for a stream client failed; retrying");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        continue;
                    }
                }
            }
            match self.rx.recv().await {
                Ok(batch) => {
                    let evs: Vec<Event> = batch
                        .iter()
                        .filter(|e| e.id > last && pattern.is_none_or(|p| matches(p, &e.topic)))
                        .cloned()
                        .collect();
                    if !evs.is_empty() {
                        return evs;
                    }
                }
                Err(RecvError::Lagged(_)) => self.catching_up = true,
                Err(RecvError::Closed) => {
                    self.rx = s.fanout.subscribe();
                    self.catching_up = true;
                }
            }
        }
    }
}

pub(super) fn routes() -> Router<AppState> {
    Router::new()
        .route("/events", get(list).post(publish))
        .route("/events/stream", get(stream))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    topic: Option<String>,
    status: Option<DeliveryStatus>,
    since: Option<i64>,
    limit: Option<usize>,
    /// The newest N matching events (oldest first), e.g. for the backlog of a tail.
    latest: Option<usize>,
}

async fn list(
    State(s): State<AppState>,
    ApiQuery(q): ApiQuery<ListQuery>,
) -> Result<Json<Value>, ApiError> {
    if let Some(p) = &q.topic {
        validate_pattern(p).map_err(|e| ApiError::field("topic", e.to_string()))?;
    }
    let (after_id, limit) = match q.latest {
        Some(_) if q.status.is_some() || q.since.is_some() || q.limit.is_some() => {
            return Err(ApiError::field(
                "latest",
                "latest cannot be combined with status, since or limit",
            ));
        }
        Some(n) => {
            let n = limit(Some(n))
                .map_err(|_| ApiError::field("latest", "latest must be between 1 and 1000"))?;
            let newest = s.bus.latest(q.topic.as_deref(), n)?;
            (newest.first().map(|e| e.id - 1), n)
        }
        None => (q.since, limit(q.limit)?),
    };
    let rows = s.bus.list(&EventQuery {
        pattern: q.topic,
        status: q.status,
        after_id,
        limit,
    })?;
    let next = if rows.len() == limit {
        rows.last().map(|r| r.event.id)
    } else {
        None
    };
    Ok(Json(json!({ "events": rows, "next_since": next })))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PublishBody {
    topic: String,
    data: Value,
    #[serde(default)]
    correlation_id: Option<String>,
}

async fn publish(
    State(s): State<AppState>,
    ApiJson(b): ApiJson<PublishBody>,
) -> Result<Response, ApiError> {
    let mut ev = NewEvent::new(b.topic.clone(), b.data);
    ev.correlation_id = b.correlation_id;
    let id = s.bus.publish(ev).await?;
    Ok((
        axum::http::StatusCode::CREATED,
        Json(json!({ "id": id, "topic": b.topic })),
    )
        .into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StreamQuery {
    topic: Option<String>,
    /// Resume after this event id (also taken from the SSE `Last-Event-ID` header).
    last_id: Option<i64>,
    /// SSE only: send each event under its topic as the event name (default), or unnamed so
    /// one `onmessage` handler sees every event (`named=false`, used by the dashboard).
    #[serde(default = "named_default")]
    named: bool,
}

fn named_default() -> bool {
    true
}

/// Largest message (and frame) a WebSocket stream client may send.
pub const WS_MAX_MESSAGE: usize = 4 << 10;

/// WebSocket when the request asks for an upgrade, Server-Sent Events otherwise.
async fn stream(
    State(s): State<AppState>,
    headers: HeaderMap,
    ApiQuery(q): ApiQuery<StreamQuery>,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let pattern = q.topic.filter(|t| t != ">");
    if let Some(p) = &pattern {
        validate_pattern(p).map_err(|e| ApiError::field("topic", e.to_string()))?;
    }
    let header_id = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    // Without a resume point, start at the newest event: only new events are pushed.
    let start = q
        .last_id
        .or(header_id)
        .unwrap_or_else(|| s.store.published_id());
    if let Ok(ws) = ws {
        // The server reads nothing from a stream client but pings' answers and close frames:
        // a client message over a few KiB closes the connection instead of being buffered.
        return Ok(ws
            .max_message_size(WS_MAX_MESSAGE)
            .max_frame_size(WS_MAX_MESSAGE)
            .on_upgrade(move |socket| ws_loop(s, socket, pattern, start))
            .into_response());
    }
    let named = q.named;
    let follower = Follower::new(&s);
    let stream = futures_util::stream::unfold(
        (s, pattern, start, Vec::<Event>::new().into_iter(), follower),
        move |(s, pattern, mut last, mut buf, mut follower)| async move {
            loop {
                if let Some(e) = buf.next() {
                    last = e.id;
                    let mut ev = SseEvent::default().id(e.id.to_string());
                    if named {
                        ev = ev.event(e.topic.clone());
                    }
                    let ev = ev.json_data(&e).unwrap_or_default();
                    return Some((Ok::<_, Infallible>(ev), (s, pattern, last, buf, follower)));
                }
                let batch = follower.next(&s, pattern.as_deref(), last).await;
                buf = batch.into_iter();
            }
        },
    );
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response())
}

async fn ws_loop(s: AppState, mut socket: WebSocket, pattern: Option<String>, mut last: i64) {
    let mut follower = Follower::new(&s);
    loop {
        tokio::select! {
            evs = follower.next(&s, pattern.as_deref(), last) => {
                for e in evs {
                    last = e.id;
                    let text = serde_json::to_string(&e).unwrap_or_default();
                    if socket.send(Message::Text(text.into())).await.is_err() {
                        return;
                    }
                }
            }
            msg = socket.recv() => match msg {
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                _ => {}
            },
        }
    }
}
