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
use crate::bus::{DeliveryStatus, EventQuery, NewEvent, validate_pattern};

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
        return Ok(ws
            .on_upgrade(move |socket| ws_loop(s, socket, pattern, start))
            .into_response());
    }
    let named = q.named;
    let stream = futures_util::stream::unfold(
        (
            s,
            pattern,
            start,
            Vec::<crate::bus::Event>::new().into_iter(),
        ),
        move |(s, pattern, mut last, mut buf)| async move {
            loop {
                if let Some(e) = buf.next() {
                    last = e.id;
                    let mut ev = SseEvent::default().id(e.id.to_string());
                    if named {
                        ev = ev.event(e.topic.clone());
                    }
                    let ev = ev.json_data(&e).unwrap_or_default();
                    return Some((Ok::<_, Infallible>(ev), (s, pattern, last, buf)));
                }
                let batch = next_events(&s, pattern.as_deref(), last).await;
                buf = batch.into_iter();
            }
        },
    );
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response())
}

/// Waits until events after `last` matching `pattern` exist, and returns them in order.
async fn next_events(s: &AppState, pattern: Option<&str>, last: i64) -> Vec<crate::bus::Event> {
    let mut published = s.store.published();
    loop {
        published.borrow_and_update();
        if let Ok(evs) = s.bus.events_after(last, pattern, 500)
            && !evs.is_empty()
        {
            return evs;
        }
        // In-process commits wake us at once; the timer covers writes by other processes.
        tokio::select! {
            _ = published.changed() => {}
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

async fn ws_loop(s: AppState, mut socket: WebSocket, pattern: Option<String>, mut last: i64) {
    loop {
        tokio::select! {
            evs = next_events(&s, pattern.as_deref(), last) => {
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
