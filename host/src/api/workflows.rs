//! `/workflows`: start, list, inspect, and steer instances; `/schedules`: start them on a cron
//! schedule.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{ApiError, ApiJson, ApiQuery, AppState, check_status, limit};

pub(super) fn routes() -> Router<AppState> {
    Router::new()
        .route("/workflows", get(list).post(start))
        .route("/workflows/{id}", get(show))
        .route("/workflows/{id}/transcript", get(transcript))
        .route("/workflows/{id}/{action}", post(act))
        .route("/workflow-types", get(types))
        .route("/schedules", get(schedules).post(add_schedule))
        .route("/schedules/{id}", delete(remove_schedule))
}

async fn schedules(State(s): State<AppState>) -> Result<Json<Value>, ApiError> {
    Ok(Json(
        json!({ "schedules": crate::workflow::schedule::list(&s.store)? }),
    ))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ScheduleBody {
    /// 5 fields (UTC), e.g. "0 9 * * 1-5".
    cron: String,
    #[serde(rename = "type")]
    workflow_type: String,
    #[serde(default = "empty_object")]
    params: Value,
}

async fn add_schedule(
    State(s): State<AppState>,
    ApiJson(b): ApiJson<ScheduleBody>,
) -> Result<Response, ApiError> {
    use crate::workflow::schedule;
    schedule::parse_cron(&b.cron).map_err(|e| ApiError::field("cron", e))?;
    if !b.params.is_object() {
        return Err(ApiError::field(
            "params",
            format!("params must be a JSON object, got {}", b.params),
        ));
    }
    let row = schedule::add(&s.engine, &b.cron, &b.workflow_type, b.params).await?;
    Ok((StatusCode::CREATED, Json(json!(row))).into_response())
}

async fn remove_schedule(
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    use crate::workflow::schedule;
    if !schedule::list(&s.store)?.iter().any(|r| r.id == id) {
        return Err(ApiError::not_found(format!(
            "no schedule {id:?}; GET /schedules lists them"
        )));
    }
    schedule::remove(&s.store, &id).await?;
    Ok(Json(json!({ "id": id, "removed": true })))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StartBody {
    #[serde(rename = "type")]
    workflow_type: String,
    #[serde(default = "empty_object")]
    params: Value,
}

fn empty_object() -> Value {
    json!({})
}

async fn start(
    State(s): State<AppState>,
    ApiJson(b): ApiJson<StartBody>,
) -> Result<Response, ApiError> {
    if !b.params.is_object() {
        return Err(ApiError::field(
            "params",
            format!("params must be a JSON object, got {}", b.params),
        ));
    }
    let id = s.engine.start(&b.workflow_type, b.params).await?;
    Ok((StatusCode::CREATED, Json(json!({ "id": id }))).into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    status: Option<String>,
    limit: Option<usize>,
}

const STATUSES: &[&str] = &[
    "pending",
    "running",
    "paused",
    "completed",
    "failed",
    "cancelled",
];

async fn list(
    State(s): State<AppState>,
    ApiQuery(q): ApiQuery<ListQuery>,
) -> Result<Json<Value>, ApiError> {
    check_status(q.status.as_deref(), STATUSES)?;
    let rows = s.engine.list(q.status.as_deref(), limit(q.limit)?)?;
    let rows: Vec<Value> = rows
        .into_iter()
        .map(|v| {
            json!({"id": v.id, "type": v.workflow_type, "status": v.status, "current_step": v.current_step,
                   "cost_usd": v.cost_usd, "tokens_in": v.tokens_in, "tokens_out": v.tokens_out,
                   "claude_calls": v.claude_calls, "created_at": v.created_at,
                   "updated_at": v.updated_at, "error": v.error,
                   "simulated": v.simulated, "simulated_usd": v.simulated_usd,
                   "waiting_for_quota_until": quota_wait(&s, &v)})
        })
        .collect();
    Ok(Json(json!({ "workflows": rows })))
}

async fn show(State(s): State<AppState>, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    let v = s.engine.get(&id)?;
    let steps = s.engine.history(&id)?;
    let mut body = serde_json::to_value(&v).map_err(|e| ApiError::internal(e.to_string()))?;
    body["steps"] = serde_json::to_value(&steps).map_err(|e| ApiError::internal(e.to_string()))?;
    body["waiting_for_quota_until"] = json!(quota_wait(&s, &v));
    Ok(Json(body))
}

/// Until when (epoch ms) a running instance waits for a subscription limit to reset, if one of
/// its Claude calls is parked.
fn quota_wait(s: &AppState, v: &crate::workflow::InstanceView) -> Option<i64> {
    if v.status != "running" {
        return None;
    }
    crate::claude::Executor::workflow_quota_wait(&s.store, &v.id)
        .ok()
        .flatten()
}

/// The agents' turns of an instance: every Claude call of its steps, in order, with the text
/// read through the answer's file reference when there is one.
async fn transcript(
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    s.engine.get(&id)?;
    let turns = s.engine.transcript(&id)?;
    Ok(Json(json!({ "workflow_id": id, "turns": turns })))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ActBody {
    step: Option<String>,
}

async fn act(
    State(s): State<AppState>,
    Path((id, action)): Path<(String, String)>,
    body: axum::body::Bytes,
) -> Result<Json<Value>, ApiError> {
    let body: ActBody = if body.iter().all(u8::is_ascii_whitespace) {
        ActBody::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| ApiError {
            status: StatusCode::UNPROCESSABLE_ENTITY,
            code: "invalid_body",
            message: format!("the body must be {{\"step\": NAME}} or empty: {e}"),
            field: Some("step".into()),
        })?
    };
    match action.as_str() {
        "cancel" => s.engine.cancel(&id).await?,
        "pause" => s.engine.pause(&id).await?,
        "resume" => s.engine.resume(&id).await?,
        "retry-from" => {
            let step = body
                .step
                .ok_or_else(|| ApiError::field("step", "retry-from needs {\"step\": NAME}"))?;
            s.engine.retry_from(&id, &step).await?
        }
        other => {
            return Err(ApiError::not_found(format!(
                "no action {other:?}; use cancel, pause, resume or retry-from"
            )));
        }
    }
    Ok(Json(
        json!({ "id": id, "action": action, "status": s.engine.get(&id)?.status }),
    ))
}

async fn types(State(s): State<AppState>) -> Json<Value> {
    let defs: Vec<Value> = s
        .engine
        .definitions()
        .iter()
        .map(|d| json!({"name": d.name, "version": d.version.to_string(), "description": d.description, "params": d.params,
                        "steps": d.steps.iter().map(|st| json!({"name": st.name, "handler": st.handler.as_ref().map(|h| h.to_string()), "parallel": st.parallel})).collect::<Vec<_>>()}))
        .collect();
    Json(json!({ "workflow_types": defs }))
}

pub(super) fn metrics(s: &AppState) -> String {
    let mut out = String::from(
        "# HELP ksi_workflows Workflow instances by status.\n# TYPE ksi_workflows gauge\n",
    );
    if let Ok(counts) = s.engine.counts() {
        for (status, n) in counts {
            out.push_str(&format!("ksi_workflows{{status=\"{status}\"}} {n}\n"));
        }
    }
    if let Ok(h) = s.engine.step_latency_histogram() {
        out.push_str("# HELP ksi_step_latency_ms Step latency, claim to durable commit (last 10,000 steps).\n# TYPE ksi_step_latency_ms histogram\n");
        out.push_str(&h);
    }
    out
}
