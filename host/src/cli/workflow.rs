//! `ksi workflows` and `ksi workflow show|cancel|pause|resume|retry-from`, on the data dir.
//!
//! These change instance rows and publish events through the engine's API; a running daemon
//! picks the changes up from the bus (a cancel reaches a step it is running when that step
//! commits, and its result is discarded).

use std::sync::Arc;

use clap::Subcommand;
use serde_json::Value;

use super::{Opened, clock, ellipsize, table};
use crate::workflow::{
    BoxFuture, Engine, EngineOptions, HandlerRef, NoClaude, ResolvedStep, StepContext, StepError,
    StepInput, StepOutput, StepRunner,
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
    Cancel { id: String },
    /// Let the running step finish, then hold the instance
    Pause { id: String },
    /// Continue a paused instance
    Resume { id: String },
    /// Run an instance again from STEP (after a failure, or with changed plugin code)
    RetryFrom { id: String, step: String },
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
    },
    /// The schedules with their last and next tick
    List {
        #[arg(long)]
        json: bool,
    },
    /// Remove a schedule
    Rm { id: String },
}

/// `ksi schedule ...`.
pub async fn schedule(cmd: ScheduleCmd, o: Opened) -> anyhow::Result<()> {
    use crate::workflow::schedule;
    let engine = admin_engine(&o).await?;
    match cmd {
        ScheduleCmd::Add {
            cron,
            workflow,
            topic,
            params,
        } => {
            let args = super::run::RunArgs {
                workflow: workflow.clone(),
                topic,
                params,
                json: false,
                claude_bin: None,
            };
            let s = schedule::add(&engine, &cron, &workflow, super::run::params_of(&args)?).await?;
            println!(
                "schedule {} starts {} on \"{}\"; next at {} UTC (the daemon fires it)",
                s.id,
                s.workflow_type,
                s.cron,
                s.next_fire_at.map(super::clock).unwrap_or_default()
            );
        }
        ScheduleCmd::List { json } => {
            let all = schedule::list(&o.store)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&all)?);
            } else if all.is_empty() {
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
        ScheduleCmd::Rm { id } => {
            schedule::remove(&o.store, &id).await?;
            println!("schedule {id} removed");
        }
    }
    Ok(())
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

async fn admin_engine(o: &Opened) -> anyhow::Result<Engine> {
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

/// `ksi workflows`.
pub async fn list(
    o: Opened,
    status: Option<String>,
    limit: usize,
    json: bool,
) -> anyhow::Result<()> {
    let engine = admin_engine(&o).await?;
    let rows = engine.list(status.as_deref(), limit)?;
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
    for v in rows {
        t.add_row(vec![
            v.id,
            v.workflow_type,
            v.status,
            v.current_step.unwrap_or_default(),
            v.claude_calls.to_string(),
            format!("${:.4}", v.cost_usd),
            clock(v.created_at),
            ellipsize(v.error.as_deref().unwrap_or(""), 40),
        ]);
    }
    println!("{t}");
    Ok(())
}

/// Sends an action to the running daemon, so it also stops a step it is running (and its
/// Claude calls) at once.
async fn act_on_daemon(
    client: &super::client::DaemonClient,
    id: &str,
    action: &str,
    body: serde_json::Value,
) -> anyhow::Result<()> {
    let (status, b) = client
        .request("POST", &format!("/workflows/{id}/{action}"), Some(body))
        .await?;
    if !(200..300).contains(&status) {
        anyhow::bail!(
            "{}",
            b["error"]["message"].as_str().unwrap_or(&b.to_string())
        );
    }
    println!("{id} {action}: now {}", b["status"].as_str().unwrap_or("?"));
    Ok(())
}

/// `ksi workflow ...`.
pub async fn run(cmd: WorkflowCmd, o: Opened) -> anyhow::Result<()> {
    if let Some(client) = super::client::DaemonClient::find(&o.config.data_dir).await {
        let action = match &cmd {
            WorkflowCmd::Cancel { id } => Some((id.clone(), "cancel", serde_json::json!({}))),
            WorkflowCmd::Pause { id } => Some((id.clone(), "pause", serde_json::json!({}))),
            WorkflowCmd::Resume { id } => Some((id.clone(), "resume", serde_json::json!({}))),
            WorkflowCmd::RetryFrom { id, step } => Some((
                id.clone(),
                "retry-from",
                serde_json::json!({ "step": step }),
            )),
            WorkflowCmd::Show { .. } => None,
        };
        if let Some((id, action, body)) = action {
            return act_on_daemon(&client, &id, action, body).await;
        }
    }
    let engine = admin_engine(&o).await?;
    match cmd {
        WorkflowCmd::Show { id, json } => {
            let v = engine.get(&id)?;
            let steps = engine.history(&id)?;
            let turns = engine.transcript(&id)?;
            if json {
                let mut body = serde_json::to_value(&v)?;
                body["steps"] = serde_json::to_value(&steps)?;
                body["transcript"] = Value::Array(turns);
                println!("{}", serde_json::to_string_pretty(&body)?);
                return Ok(());
            }
            println!(
                "{} {} — {}  (${:.4}, {} Claude calls, {} tokens in / {} out)",
                v.workflow_type,
                v.id,
                v.status,
                v.cost_usd,
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
                    (_, Some(r), _) => format!("{} (sha256 {})", r.path, &r.sha256[..12]),
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
        }
        WorkflowCmd::Cancel { id } => {
            engine.cancel(&id).await?;
            println!("{id} cancelled");
        }
        WorkflowCmd::Pause { id } => {
            engine.pause(&id).await?;
            println!("{id} paused (a running step finishes first)");
        }
        WorkflowCmd::Resume { id } => {
            engine.resume(&id).await?;
            println!("{id} resumed");
        }
        WorkflowCmd::RetryFrom { id, step } => {
            engine.retry_from(&id, &step).await?;
            println!("{id} runs again from {step}");
        }
    }
    Ok(())
}
