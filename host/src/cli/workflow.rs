//! `ksi workflows`, `ksi workflow show|cancel|pause|resume|retry-from` and `ksi schedule`,
//! through the daemon's API ([`DaemonClient`]).
//!
//! Actions and schedule changes go to the running daemon, so a cancel also stops a step it is
//! running (and its Claude calls) at once; listings and `show` read the data dir in process
//! when no daemon runs.

use std::sync::Arc;

use clap::Subcommand;
use serde_json::Value;

use super::client::{DaemonClient, encode};
use super::{Opened, clock, ellipsize, table};
use crate::workflow::schedule::Schedule;
use crate::workflow::{
    BoxFuture, Engine, EngineOptions, HandlerRef, InstanceView, NoClaude, ResolvedStep,
    StepContext, StepError, StepInput, StepOutput, StepRecord, StepRunner,
};

/// `ksi workflow ...`
#[derive(Debug, Subcommand)]
pub enum WorkflowCmd {
    /// Steps, timings, cost and file references of one instance, and its transcript
    Show {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// Stop an instance; a running step's result is discarded
    Cancel {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// Let the running step finish, then hold the instance
    Pause {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// Continue a paused instance
    Resume {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// Run an instance again from STEP (after a failure, or with changed plugin code)
    RetryFrom {
        id: String,
        step: String,
        #[arg(long)]
        json: bool,
    },
}

/// `ksi schedule ...`
#[derive(Debug, Subcommand)]
pub enum ScheduleCmd {
    /// Start WORKFLOW on a cron expression (5 fields, UTC), e.g. "0 9 * * 1-5"
    Add {
        cron: String,
        workflow: String,
        /// Sets params.topic
        #[arg(long)]
        topic: Option<String>,
        /// KEY=VALUE (VALUE is JSON when it parses); repeatable
        #[arg(long = "param", short = 'p', value_name = "KEY=VALUE")]
        params: Vec<String>,
        #[arg(long)]
        json: bool,
    },
    /// The schedules with their last and next tick
    List {
        #[arg(long)]
        json: bool,
    },
    /// Remove a schedule
    Rm {
        id: String,
        #[arg(long)]
        json: bool,
    },
}

/// Admin operations need the definitions (to check step names) but run no step.
struct AdminRunner;

impl StepRunner for AdminRunner {
    fn resolve(&self, h: &HandlerRef) -> Result<ResolvedStep, String> {
        Ok(ResolvedStep {
            plugin: h.plugin.clone(),
            version: String::new(),
            sha256: String::new(),
            step: h.step.clone(),
            handle: Arc::new(()),
        })
    }
    fn run(
        &self,
        _: ResolvedStep,
        _: StepInput,
        _: Arc<StepContext>,
    ) -> BoxFuture<'static, Result<StepOutput, StepError>> {
        Box::pin(async {
            Err(StepError::retryable(
                "steps run in the daemon, not in this command",
            ))
        })
    }
}

/// An engine over an opened data dir that loads the definitions but runs no step (for the
/// API served in process by `ksi` when no daemon runs).
pub(crate) async fn admin_engine(o: &Opened) -> anyhow::Result<Engine> {
    let engine = Engine::new(
        o.store.clone(),
        o.refs.clone(),
        Arc::new(AdminRunner),
        Arc::new(NoClaude(
            "Claude calls run in the daemon, not in this command",
        )),
        EngineOptions::default(),
    )
    .await?;
    engine
        .load_definitions(&o.refs.root().join("definitions"))
        .await;
    Ok(engine)
}

/// `ksi schedule ...`.
///
/// # Errors
/// Bad arguments or the daemon's refusal, in its words.
pub async fn schedule(cmd: ScheduleCmd, client: &DaemonClient) -> anyhow::Result<()> {
    match cmd {
        ScheduleCmd::Add {
            cron,
            workflow,
            topic,
            params,
            json,
        } => {
            let args = super::run::RunArgs {
                workflow: workflow.clone(),
                topic,
                params,
                json: false,
                claude_bin: None,
            };
            let body = serde_json::json!({
                "cron": cron, "type": workflow, "params": super::run::params_of(&args)?,
            });
            let b = client.call("POST", "/schedules", Some(body)).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&b)?);
                return Ok(());
            }
            let s: Schedule = serde_json::from_value(b)?;
            println!(
                "schedule {} starts {} on \"{}\"; next at {} UTC (the daemon fires it)",
                s.id,
                s.workflow_type,
                s.cron,
                s.next_fire_at.map(clock).unwrap_or_default()
            );
        }
        ScheduleCmd::List { json } => {
            let b = client.get("/schedules").await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&b["schedules"])?);
                return Ok(());
            }
            let all: Vec<Schedule> = serde_json::from_value(b["schedules"].clone())?;
            if all.is_empty() {
                println!(
                    "no schedules; add one with `ksi schedule add \"0 9 * * *\" debate --topic ...`"
                );
            } else {
                let mut t = table(&["id", "cron", "workflow", "params", "last", "next"]);
                for s in all {
                    t.add_row(vec![
                        s.id,
                        s.cron,
                        s.workflow_type,
                        ellipsize(&s.params.to_string(), 40),
                        s.last_fired_at.map(clock).unwrap_or_default(),
                        s.next_fire_at.map(clock).unwrap_or_default(),
                    ]);
                }
                println!("{t}");
            }
        }
        ScheduleCmd::Rm { id, json } => {
            let b = client
                .call("DELETE", &format!("/schedules/{}", encode(&id)), None)
                .await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&b)?);
            } else {
                println!("schedule {id} removed");
            }
        }
    }
    Ok(())
}

/// `ksi workflows`: instances, newest first.
///
/// # Errors
/// A bad status filter or an unreachable daemon.
pub async fn list(
    client: &DaemonClient,
    status: Option<String>,
    limit: usize,
    json: bool,
) -> anyhow::Result<()> {
    let mut path = format!("/workflows?limit={limit}");
    if let Some(st) = &status {
        path.push_str(&format!("&status={}", encode(st)));
    }
    let b = client.get(&path).await?;
    let rows = b["workflows"].as_array().cloned().unwrap_or_default();
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    if rows.is_empty() {
        println!("no workflow instances; start one with `ksi run debate --topic \"...\"`");
        return Ok(());
    }
    let mut t = table(&[
        "id", "type", "status", "step", "calls", "cost", "started", "error",
    ]);
    let text = |v: &Value| v.as_str().unwrap_or("").to_string();
    for v in rows {
        t.add_row(vec![
            text(&v["id"]),
            text(&v["type"]),
            match v["waiting_for_quota_until"].as_i64() {
                Some(until) => format!(
                    "{}, waiting for quota until {}",
                    text(&v["status"]),
                    super::claude::hour_minute_utc(until)
                ),
                None => text(&v["status"]),
            },
            text(&v["current_step"]),
            v["claude_calls"].to_string(),
            format!("${:.4}", v["cost_usd"].as_f64().unwrap_or(0.0)),
            clock(v["created_at"].as_i64().unwrap_or(0)),
            ellipsize(v["error"].as_str().unwrap_or(""), 40),
        ]);
    }
    println!("{t}");
    Ok(())
}

/// The instance with its `steps` and `transcript` (what `ksi workflow show --json` prints).
///
/// # Errors
/// An unknown id or an unreachable daemon.
pub async fn show_json(client: &DaemonClient, id: &str) -> anyhow::Result<Value> {
    let id = encode(id);
    let mut body = client.get(&format!("/workflows/{id}")).await?;
    let t = client.get(&format!("/workflows/{id}/transcript")).await?;
    body["transcript"] = t["turns"].clone();
    Ok(body)
}

/// `ksi workflow ...`.
///
/// # Errors
/// An unknown id, an action the instance's status does not allow, or an unreachable daemon.
pub async fn run(cmd: WorkflowCmd, client: &DaemonClient) -> anyhow::Result<()> {
    let (id, action, body, json) = match cmd {
        WorkflowCmd::Show { id, json } => {
            let body = show_json(client, &id).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&body)?);
            } else {
                print_show(&body)?;
            }
            return Ok(());
        }
        WorkflowCmd::Cancel { id, json } => (id, "cancel", serde_json::json!({}), json),
        WorkflowCmd::Pause { id, json } => (id, "pause", serde_json::json!({}), json),
        WorkflowCmd::Resume { id, json } => (id, "resume", serde_json::json!({}), json),
        WorkflowCmd::RetryFrom { id, step, json } => {
            (id, "retry-from", serde_json::json!({ "step": step }), json)
        }
    };
    let b = client
        .call(
            "POST",
            &format!("/workflows/{}/{action}", encode(&id)),
            Some(body),
        )
        .await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&b)?);
        return Ok(());
    }
    let status = b["status"].as_str().unwrap_or("?");
    match action {
        "pause" => println!("{id} pause: now {status} (a running step finishes first)"),
        _ => println!("{id} {action}: now {status}"),
    }
    Ok(())
}

fn print_show(body: &Value) -> anyhow::Result<()> {
    let v: InstanceView = serde_json::from_value(body.clone())?;
    let steps: Vec<StepRecord> = serde_json::from_value(body["steps"].clone())?;
    let turns = body["transcript"].as_array().cloned().unwrap_or_default();
    println!(
        "{} {} — {}  (${:.4}{}, {} Claude calls, {} tokens in / {} out)",
        v.workflow_type,
        v.id,
        v.status,
        v.cost_usd,
        if v.simulated { " simulated" } else { "" },
        v.claude_calls,
        v.tokens_in,
        v.tokens_out
    );
    if let Some(e) = &v.error {
        println!("error: {e}");
    }
    let mut t = table(&[
        "seq",
        "step",
        "try",
        "status",
        "plugin",
        "ms",
        "cost",
        "output / error",
    ]);
    for s in &steps {
        let dur = s
            .finished_at
            .map(|f| (f - s.started_at).to_string())
            .unwrap_or_else(|| "…".into());
        let detail = match (&s.error, &s.output_ref, &s.output) {
            (Some(e), _, _) => e.clone(),
            (_, Some(r), _) => format!(
                "{} (sha256 {})",
                r.path,
                &r.sha256[..12.min(r.sha256.len())]
            ),
            (_, _, Some(o)) => o["result"].to_string(),
            _ => String::new(),
        };
        t.add_row(vec![
            s.seq.to_string(),
            s.step.clone(),
            s.attempt.to_string(),
            s.status.clone(),
            s.plugin.clone().unwrap_or_default(),
            dur,
            format!("${:.4}", s.cost_usd),
            ellipsize(&detail, 60),
        ]);
    }
    println!("{t}");
    if !turns.is_empty() {
        println!("\ntranscript:");
        for turn in turns {
            let who = turn["agent"].as_str().unwrap_or("claude");
            let file = turn["response_ref"]["path"]
                .as_str()
                .map(|p| format!("  [{p}:{}]", turn["response_ref"]["line"]))
                .unwrap_or_default();
            println!(
                "\n— {} ({}){file}\n{}",
                who,
                turn["step"].as_str().unwrap_or(""),
                turn["text"].as_str().unwrap_or("")
            );
        }
    }
    Ok(())
}
