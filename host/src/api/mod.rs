//! The daemon's HTTP face (axum): JSON API, live event stream (WebSocket and Server-Sent
//! Events), Prometheus metrics, the OpenAPI document and the dashboard.
//!
//! Every request passes [`access`] first: the API token over TCP ([`token`]), a per-client
//! rate limit, and the audit log of mutating calls.
//!
//! Bad input never yields a 5xx: every extractor rejection is turned into a 4xx JSON body
//! `{"error": {"code", "message", "field"?}}` that names the problem.

pub mod access;
mod audit;
pub mod claude;
pub mod compat;
pub mod events;
pub mod origin;
pub mod reference;
pub mod token;
mod workflows;

use std::sync::Arc;
use std::time::Instant;

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, FromRequest, FromRequestParts, Request, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use crate::bus::Bus;
use crate::refs::Refs;
use crate::store::Store;
use crate::workflow::Engine;

/// Largest accepted request body.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;
/// Largest page of a list.
pub const MAX_LIMIT: usize = 1000;

/// What the handlers share.
#[derive(Clone)]
pub struct AppState {
    pub store: Store,
    pub bus: Bus,
    pub refs: Refs,
    pub engine: Engine,
    pub started: Instant,
    pub data_dir: std::path::PathBuf,
    /// Extra parts (executor, plugins) that register their own routes and health checks.
    pub parts: Arc<Vec<Arc<dyn ApiPart>>>,
    /// Committed events for the live streams, read once per commit.
    pub fanout: events::Fanout,
}

/// A part of the daemon with its own routes, health and metrics.
pub trait ApiPart: Send + Sync {
    /// Its name in health output.
    fn name(&self) -> &'static str;
    /// Its routes (merged into the main router).
    fn routes(&self) -> Router<AppState>;
    /// Its health, as JSON; `Err` makes `/health` answer 503.
    fn health(&self) -> Result<Value, String>;
    /// Prometheus text lines.
    fn metrics(&self) -> String {
        String::new()
    }
}

/// An API error: status + code + sentence (+ the offending field).
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub field: Option<String>,
}

impl ApiError {
    /// 400 with a message.
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            code,
            message: message.into(),
            field: None,
        }
    }
    /// 400 naming a field.
    pub fn field(field: &str, message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            code: "invalid_field",
            message: message.into(),
            field: Some(field.to_string()),
        }
    }
    /// 404.
    pub fn not_found(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::NOT_FOUND,
            code: "not_found",
            message: message.into(),
            field: None,
        }
    }
    /// 409.
    pub fn conflict(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::CONFLICT,
            code: "conflict",
            message: message.into(),
            field: None,
        }
    }
    /// 500 (a fault of ours, never of the input); a full disk behind it gives
    /// [`ApiError::disk_full`] instead.
    pub fn internal(message: impl Into<String>) -> Self {
        let message = message.into();
        if crate::store::message_is_disk_full(&message) {
            return ApiError::disk_full(message);
        }
        ApiError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            code: "internal",
            message,
            field: None,
        }
    }
    /// 507: the data directory's disk is full; nothing was saved, the same request succeeds
    /// once space is freed.
    pub fn disk_full(message: impl Into<String>) -> Self {
        let mut message = message.into();
        if !message.contains("Free space") {
            message.push_str(". Nothing of this request was saved: free space on the disk of the data directory (`GET /health` shows how much is left) and send it again");
        }
        ApiError {
            status: StatusCode::INSUFFICIENT_STORAGE,
            code: "disk_full",
            message,
            field: None,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut err = json!({ "code": self.code, "message": self.message });
        if let Some(f) = self.field {
            err["field"] = json!(f);
        }
        (self.status, Json(json!({ "error": err }))).into_response()
    }
}

impl From<crate::workflow::WorkflowError> for ApiError {
    fn from(e: crate::workflow::WorkflowError) -> Self {
        use crate::workflow::WorkflowError as W;
        match &e {
            W::UnknownType { .. } => ApiError::field("type", e.to_string()),
            W::UnknownInstance(_) => ApiError::not_found(e.to_string()),
            W::WrongStatus { .. } => ApiError::conflict(e.to_string()),
            W::UnknownStep { .. } => ApiError::field("step", e.to_string()),
            W::BadParams(_) => ApiError::field("params", e.to_string()),
            W::Bus(crate::bus::BusError::Topic(t)) => ApiError::field("topic", t.to_string()),
            W::Bus(b) if b.is_disk_full() => ApiError::disk_full(e.to_string()),
            _ => ApiError::internal(e.to_string()),
        }
    }
}

impl From<crate::bus::BusError> for ApiError {
    fn from(e: crate::bus::BusError) -> Self {
        match e {
            crate::bus::BusError::Topic(t) => ApiError::field("topic", t.to_string()),
            other if other.is_disk_full() => ApiError::disk_full(other.to_string()),
            other => ApiError::internal(other.to_string()),
        }
    }
}

/// `Json<T>` whose rejections are precise 4xx errors.
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;
    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(ApiJson(v)),
            Err(rej) => Err(match &rej {
                JsonRejection::JsonDataError(e) => {
                    // serde's message names the field: "missing field `type`", "invalid type ... at line".
                    let msg = e.body_text();
                    let field = msg.split('`').nth(1).map(str::to_string);
                    ApiError {
                        status: StatusCode::UNPROCESSABLE_ENTITY,
                        code: "invalid_body",
                        message: msg,
                        field,
                    }
                }
                JsonRejection::JsonSyntaxError(_) => ApiError::bad_request(
                    "malformed_json",
                    format!("the body is not valid JSON: {}", rej.body_text()),
                ),
                JsonRejection::MissingJsonContentType(_) => ApiError {
                    status: StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    code: "content_type",
                    message: "send the body as JSON with the header Content-Type: application/json"
                        .into(),
                    field: None,
                },
                _ if rej.status() == StatusCode::PAYLOAD_TOO_LARGE => ApiError {
                    status: StatusCode::PAYLOAD_TOO_LARGE,
                    code: "body_too_large",
                    message: format!("the body is larger than {MAX_BODY_BYTES} bytes"),
                    field: None,
                },
                _ => ApiError {
                    status: rej.status(),
                    code: "bad_body",
                    message: rej.body_text(),
                    field: None,
                },
            }),
        }
    }
}

/// `Query<T>` whose rejections are precise 400s.
pub struct ApiQuery<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;
    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, ApiError> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(q) => Ok(ApiQuery(q.0)),
            Err(QueryRejection::FailedToDeserializeQueryString(e)) => {
                let msg = e.body_text();
                let field = msg.split('`').nth(1).map(str::to_string);
                Err(ApiError {
                    status: StatusCode::BAD_REQUEST,
                    code: "invalid_query",
                    message: msg,
                    field,
                })
            }
            Err(e) => Err(ApiError::bad_request("invalid_query", e.body_text())),
        }
    }
}

/// Checks a `status` filter against the statuses a list knows.
pub fn check_status(status: Option<&str>, known: &[&str]) -> Result<(), ApiError> {
    match status {
        Some(st) if !known.contains(&st) => Err(ApiError::field(
            "status",
            format!("status must be one of {}", known.join(", ")),
        )),
        _ => Ok(()),
    }
}

/// Checks a `limit` parameter.
pub fn limit(v: Option<usize>) -> Result<usize, ApiError> {
    match v {
        None => Ok(100),
        Some(0) => Err(ApiError::field("limit", "limit must be at least 1")),
        Some(n) if n > MAX_LIMIT => Err(ApiError::field(
            "limit",
            format!("limit must be at most {MAX_LIMIT}"),
        )),
        Some(n) => Ok(n),
    }
}

/// The whole router.
pub fn router(state: AppState) -> Router {
    let mut r = Router::new()
        .route("/", get(dashboard))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(openapi))
        .merge(audit::routes())
        .merge(events::routes())
        .merge(workflows::routes());
    for part in state.parts.iter() {
        r = r.merge(part.routes());
    }
    r.fallback(|| async { ApiError::not_found("no such route; GET /openapi.json lists them") })
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

async fn health(State(s): State<AppState>) -> Response {
    let mut healthy = true;
    let db = match s.store.ping() {
        Ok(()) => json!({"ok": true}),
        Err(e) => {
            healthy = false;
            json!({"ok": false, "error": e.to_string()})
        }
    };
    let free = crate::store::fs_free_bytes(&s.data_dir);
    let disk_ok = free.is_none_or(|f| f > 100 * 1024 * 1024);
    healthy &= disk_ok;
    let depth = s.bus.counts(None).unwrap_or_default();
    let pending: i64 = depth
        .iter()
        .filter(|(st, _)| st == "pending" || st == "processing")
        .map(|(_, n)| n)
        .sum();
    let mut parts = serde_json::Map::new();
    for p in s.parts.iter() {
        match p.health() {
            Ok(v) => {
                parts.insert(p.name().into(), v);
            }
            Err(e) => {
                healthy = false;
                parts.insert(p.name().into(), json!({"ok": false, "error": e}));
            }
        }
    }
    let body = json!({
        "status": if healthy { "healthy" } else { "unhealthy" },
        "uptime_s": s.started.elapsed().as_secs(),
        "database": db,
        "disk": {"ok": disk_ok, "free_bytes": free},
        "queue": {"open_deliveries": pending, "by_status": depth.into_iter().collect::<std::collections::BTreeMap<_, _>>()},
        "parts": parts,
    });
    let code = if healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(body)).into_response()
}

async fn metrics(State(s): State<AppState>) -> Response {
    let mut out = String::new();
    out.push_str(
        "# HELP ksi_events_total Events stored on the bus.\n# TYPE ksi_events_total gauge\n",
    );
    out.push_str(&format!("ksi_events_total {}\n", s.store.published_id()));
    out.push_str("# HELP ksi_deliveries Deliveries by status.\n# TYPE ksi_deliveries gauge\n");
    for (status, n) in s.bus.counts(None).unwrap_or_default() {
        out.push_str(&format!("ksi_deliveries{{status=\"{status}\"}} {n}\n"));
    }
    out.push_str(&workflows::metrics(&s));
    for p in s.parts.iter() {
        out.push_str(&p.metrics());
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
}

/// The dashboard: one page that reads the API and follows the live event stream.
pub const DASHBOARD: &str = include_str!("dashboard.html");

async fn dashboard() -> Response {
    (
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        DASHBOARD,
    )
        .into_response()
}

/// The OpenAPI document (kept beside the code; a test checks it lists every route).
pub const OPENAPI: &str = include_str!("openapi.json");

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}
