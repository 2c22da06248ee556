//! `GET /audit`: the audit log of mutating API calls (see [`crate::audit`]).

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{ApiError, ApiQuery, AppState, limit};

pub(super) fn routes() -> Router<AppState> {
    Router::new().route("/audit", get(list))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AuditQuery {
    /// Entries after this id; without it, the newest `limit`.
    since: Option<i64>,
    limit: Option<usize>,
}

async fn list(
    State(s): State<AppState>,
    ApiQuery(q): ApiQuery<AuditQuery>,
) -> Result<Json<Value>, ApiError> {
    if q.since.is_some_and(|v| v < 0) {
        return Err(ApiError::field(
            "since",
            "since is an audit entry id (0 or more)",
        ));
    }
    let limit = limit(q.limit)?;
    let rows = s
        .store
        .read_async(move |c| crate::audit::list(c, q.since, limit))
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?;
    let next = rows.last().map(|r| r.id).or(q.since);
    Ok(Json(json!({ "entries": rows, "next_since": next })))
}
