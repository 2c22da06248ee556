//! `/spawn`, `/processes`, `/agents`, `/cost`, `/sessions` (the executor) and `/plugins` (the
//! plugin runtime).

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{ApiError, ApiJson, ApiPart, ApiQuery, AppState, check_status, limit};
use crate::claude::Executor;
use crate::plugins::PluginRuntime;
use crate::workflow::ClaudeRequest;

/// The executor's routes.
pub struct ExecutorPart(pub Executor);

/// The plugin runtime's routes.
pub struct PluginsPart(pub Arc<PluginRuntime>);

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SpawnBody {
    prompt: String,
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    agent: Option<String>,
    #[serde(default)]
    system_prompt: Option<String>,
    #[serde(default)]
    session: Option<String>,
    #[serde(default)]
    max_turns: Option<u32>,
    /// Wait for the answer (default) or return the process id at once.
    #[serde(default = "yes")]
    wait: bool,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    status: Option<String>,
    limit: Option<usize>,
}

const STATUSES: &[&str] = &[
    "PENDING",
    "RUNNING",
    "SUCCESS",
    "COMPLETED",
    "FAILED",
    "RETRY",
    "DEAD",
];

impl ApiPart for ExecutorPart {
    fn name(&self) -> &'static str {
        "executor"
    }

    fn routes(&self) -> Router<AppState> {
        let exec = self.0.clone();
        let e1 = exec.clone();
        let spawn = move |ApiJson(b): ApiJson<SpawnBody>| {
            let exec = e1.clone();
            async move {
                if b.prompt.trim().is_empty() {
                    return Err(ApiError::field("prompt", "the prompt is empty"));
                }
                let req = ClaudeRequest {
                    prompt: b.prompt,
                    model: b.model,
                    system_prompt: b.system_prompt,
                    agent: b.agent,
                    session: b.session,
                    max_turns: b.max_turns,
                };
                let id = exec.spawn(req).await.map_err(|f| match f.class.as_str() {
                    "transient.disk_full" => ApiError::disk_full(f.message),
                    "internal" => ApiError::internal(f.message),
                    _ => ApiError::bad_request("refused", f.message),
                })?;
                if !b.wait {
                    return Ok((
                        StatusCode::ACCEPTED,
                        Json(json!({ "process_id": id, "status": "PENDING" })),
                    )
                        .into_response());
                }
                match exec.wait(&id).await {
                    Ok(a) => Ok((
                        StatusCode::CREATED,
                        Json(json!({ "process_id": id, "answer": a })),
                    )
                        .into_response()),
                    // The call ran and failed: the request itself was fine, the result says why.
                    Err(f) => Ok((
                        StatusCode::OK,
                        Json(json!({ "process_id": id, "error": f })),
                    )
                        .into_response()),
                }
            }
        };
        let e2 = exec.clone();
        let result = move |Path(id): Path<String>| {
            let exec = e2.clone();
            async move {
                match exec.wait(&id).await {
                    Ok(a) => Ok(Json(json!({ "process_id": id, "answer": a }))),
                    Err(f) if f.class == "not_found" => Err(ApiError::not_found(format!(
                        "no process {id:?}; GET /processes lists them"
                    ))),
                    Err(f) => Ok(Json(json!({ "process_id": id, "error": f }))),
                }
            }
        };
        Router::new()
            .route("/spawn", post(spawn))
            .route("/processes", get(processes))
            .route("/processes/{id}", get(process))
            .route("/processes/{id}/result", get(result))
            .route("/agents", get(agents))
            .route("/agents/{id}/messages", post(agent_message))
            .route("/cost", get(cost))
            .route("/sessions", get(sessions))
            .route("/sessions/{id}", get(session))
    }

    fn health(&self) -> Result<Value, String> {
        Ok(json!({ "ok": true, "running": self.0.running() }))
    }
}

async fn processes(
    State(s): State<AppState>,
    ApiQuery(q): ApiQuery<ListQuery>,
) -> Result<Json<Value>, ApiError> {
    check_status(q.status.as_deref(), STATUSES)?;
    let rows =
        crate::claude::executor::list_processes(&s.store, q.status.as_deref(), limit(q.limit)?)?;
    Ok(Json(json!({ "processes": rows })))
}

async fn process(
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    match crate::claude::executor::get_process(&s.store, &id)? {
        Some(p) => Ok(Json(
            serde_json::to_value(p).map_err(|e| ApiError::internal(e.to_string()))?,
        )),
        None => Err(ApiError::not_found(format!(
            "no process {id:?}; GET /processes lists them"
        ))),
    }
}

async fn agents(State(s): State<AppState>) -> Result<Json<Value>, ApiError> {
    Ok(Json(
        json!({ "agents": crate::claude::agents::list(&s.store)? }),
    ))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MessageBody {
    text: String,
    #[serde(default)]
    from: Option<String>,
}

/// Puts a message in an agent's inbox (`agent.<id>.message`), creating the agent if needed so
/// its inbox subscription catches it.
async fn agent_message(
    State(s): State<AppState>,
    Path(id): Path<String>,
    ApiJson(b): ApiJson<MessageBody>,
) -> Result<impl IntoResponse, ApiError> {
    if b.text.trim().is_empty() {
        return Err(ApiError::field("text", "the message is empty"));
    }
    crate::claude::agents::ensure(&s.store, &s.bus, &s.data_dir, &id)
        .await
        .map_err(|e| ApiError::bad_request("invalid_agent", e))?;
    let event = crate::claude::agents::send(&s.bus, &id, &b.text, b.from.as_deref())
        .await
        .map_err(|e| ApiError::bad_request("invalid_agent", e))?;
    Ok((
        StatusCode::CREATED,
        Json(json!({ "agent": id, "event_id": event })),
    ))
}

// Spend and conversations are read from the `processes` table by the queries `ksi cost` and
// `ksi sessions` have always used (host/src/cli/claude.rs), so both faces agree.
async fn cost(State(s): State<AppState>) -> Result<Json<Value>, ApiError> {
    Ok(Json(json!(crate::cli::claude::cost(&s.store)?)))
}

async fn sessions(State(s): State<AppState>) -> Result<Json<Value>, ApiError> {
    Ok(Json(
        json!({ "sessions": crate::cli::claude::sessions(&s.store)? }),
    ))
}

async fn session(
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    if !crate::claude::responses::safe_session_id(&id) {
        return Err(ApiError::bad_request(
            "invalid_session",
            format!("{id:?} is not a session id; GET /sessions lists them"),
        ));
    }
    let entries = crate::cli::claude::session_transcript(&s.refs, &id)
        .map_err(|e| ApiError::not_found(format!("{e:#}")))?;
    Ok(Json(json!({ "session_id": id, "entries": entries })))
}

impl ApiPart for PluginsPart {
    fn name(&self) -> &'static str {
        "plugins"
    }

    fn routes(&self) -> Router<AppState> {
        let rt = self.0.clone();
        Router::new().route(
            "/plugins",
            get(move || {
                let rt = rt.clone();
                async move { Json(json!({ "plugins": rt.list() })) }
            }),
        )
    }

    fn health(&self) -> Result<Value, String> {
        let n = self.0.list().len();
        if n == 0 {
            return Err("no plugin is loaded: workflows cannot run. Check the plugins directory and the log".into());
        }
        Ok(json!({ "ok": true, "loaded": n }))
    }
}
