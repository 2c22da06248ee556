//! `ksi run WORKFLOW`: start a workflow and follow it live — one line per step with elapsed
//! time, cost so far and a progress bar — then print its result.
//!
//! With no daemon running, the engine is hosted in this process for the run (the data-dir lock
//! keeps a daemon from starting meanwhile).

use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Args;
use serde_json::{Map, Value};

use crate::daemon::Host;
use crate::workflow::InstanceView;

/// Arguments of `ksi run`.
#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// Workflow type: debate, analysis, collaboration, teaching, or one of yours
    pub workflow: String,
    /// The subject (sets params.topic)
    #[arg(long)]
    pub topic: Option<String>,
    /// A parameter, KEY=VALUE (VALUE is JSON when it parses, text otherwise); repeatable
    #[arg(long = "param", short = 'p', value_name = "KEY=VALUE")]
    pub params: Vec<String>,
    /// Print the final instance as JSON instead of the live view
    #[arg(long)]
    pub json: bool,
    /// The Claude CLI to run (default: KSI_CLAUDE_BIN, else `claude` on PATH, else the
    /// bundled fake-claude with simulated answers)
    #[arg(long, value_name = "PATH")]
    pub claude_bin: Option<PathBuf>,
}

/// Parses `--param k=v` pairs (and `--topic`) into a params object.
pub fn params_of(args: &RunArgs) -> anyhow::Result<Value> {
    let mut map = Map::new();
    for p in &args.params {
        let Some((k, v)) = p.split_once('=') else {
            anyhow::bail!("--param {p:?} must be KEY=VALUE, e.g. --param rounds=2");
        };
        let v = serde_json::from_str(v).unwrap_or_else(|_| Value::String(v.to_string()));
        map.insert(k.trim().to_string(), v);
    }
    if let Some(t) = &args.topic {
        map.insert("topic".into(), Value::String(t.clone()));
    }
    Ok(Value::Object(map))
}

/// Which Claude CLI to run, and whether it is the simulated one.
pub fn choose_claude_bin(explicit: Option<PathBuf>) -> (PathBuf, bool) {
    if let Some(p) = explicit.or_else(|| std::env::var_os("KSI_CLAUDE_BIN").map(PathBuf::from)) {
        let fake = p
            .file_name()
            .is_some_and(|n| n.to_string_lossy().contains("fake-claude"));
        return (p, fake);
    }
    if let Some(real) = which("claude") {
        return (real, false);
    }
    let fake = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(|d| d.join("fake-claude")))
        .filter(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from("fake-claude"));
    (fake, true)
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    })
}

fn bar(done: usize, total: usize, width: usize) -> String {
    let total = total.max(1);
    let filled = (done.min(total) * width) / total;
    format!("{}{}", "█".repeat(filled), "░".repeat(width - filled))
}

/// Follows an instance until it ends, printing one line per finished step.
pub async fn follow(host: &Host, id: &str, quiet: bool) -> anyhow::Result<InstanceView> {
    let started = Instant::now();
    let total = host.engine.get(id)?.total_steps.unwrap_or(1) as usize;
    let mut last_event = 0i64;
    let mut done = 0usize;
    let mut published = host.store.published();
    loop {
        published.borrow_and_update();
        for e in host.bus.events_after(last_event, Some("workflow.>"), 500)? {
            last_event = e.id;
            if e.correlation_id.as_deref() != Some(id) || quiet {
                continue;
            }
            let d = &e.data;
            let line = match e.topic.as_str() {
                "workflow.step_complete" => {
                    let status = d["status"].as_str().unwrap_or("");
                    if status == "completed" {
                        done += 1;
                    }
                    let mark = match status {
                        "completed" => "✓",
                        "retrying" => "↻",
                        _ => "✗",
                    };
                    let cost = host.engine.get(id).map(|v| v.cost_usd).unwrap_or(0.0);
                    Some(format!(
                        "[{:>6.1}s] {mark} {:<12} {:<18} {:>6} ms  ${:<8.4} {} {done}/{total}",
                        started.elapsed().as_secs_f64(),
                        d["step"].as_str().unwrap_or("?"),
                        d["plugin"].as_str().unwrap_or(""),
                        d["duration_ms"],
                        cost,
                        bar(done, total, 12),
                    ))
                }
                "workflow.failed" => Some(format!(
                    "[{:>6.1}s] ✗ failed: {}",
                    started.elapsed().as_secs_f64(),
                    d["error"].as_str().unwrap_or("")
                )),
                _ => None,
            };
            if let Some(line) = line {
                let mut out = std::io::stdout().lock();
                writeln!(out, "{line}")?;
                out.flush()?;
            }
        }
        let v = host.engine.get(id)?;
        if matches!(v.status.as_str(), "completed" | "failed" | "cancelled") {
            // Drain the last events of the instance before returning.
            if host
                .bus
                .events_after(last_event, Some("workflow.>"), 1)?
                .is_empty()
            {
                return Ok(v);
            }
            continue;
        }
        tokio::select! {
            _ = published.changed() => {}
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    }
}

/// The human summary of a finished instance: its final result (the last step's result, e.g.
/// the judge's verdict) and its totals.
pub fn render_result(host: &Host, v: &InstanceView) -> anyhow::Result<String> {
    let mut out = String::new();
    let history = host.engine.history(&v.id)?;
    let last = history
        .iter()
        .rev()
        .find(|s| s.status == "completed" && s.output.is_some());
    out.push_str(&format!("\n{} {} — {}\n", v.workflow_type, v.id, v.status));
    if let Some(e) = &v.error {
        out.push_str(&format!("error: {e}\n"));
    }
    if let Some(step) = last {
        let result = &step.output.as_ref().unwrap()["result"];
        let text = ["verdict", "report", "summary", "final", "text"]
            .iter()
            .find_map(|k| result.get(*k).and_then(Value::as_str))
            .map(str::to_string)
            .unwrap_or_else(|| serde_json::to_string_pretty(result).unwrap_or_default());
        out.push_str(&format!("\n{text}\n"));
    }
    out.push_str(&format!(
        "\n{} steps, {} Claude calls, {} tokens in / {} out, ${:.4}, {:.1} s\n",
        history.iter().filter(|s| s.status == "completed").count(),
        v.claude_calls,
        v.tokens_in,
        v.tokens_out,
        v.cost_usd,
        (v.completed_at.unwrap_or(v.updated_at) - v.created_at) as f64 / 1000.0
    ));
    out.push_str(&format!(
        "transcript: ksi workflow show {}   logs: {}/claude_logs/\n",
        v.id,
        host.config.data_dir.display()
    ));
    Ok(out)
}

/// Starts `args.workflow` on `host` and follows it to the end.
pub async fn run_in_process(host: &Host, args: &RunArgs) -> anyhow::Result<InstanceView> {
    let params = params_of(args)?;
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    let workers = host.spawn_workers(stop_rx);
    let id = host.engine.start(&args.workflow, params).await?;
    if !args.json {
        println!("started {} {id}", args.workflow);
    }
    let v = follow(host, &id, args.json).await?;
    let _ = stop.send(true);
    let _ = workers.await;
    if args.json {
        let mut body = serde_json::to_value(&v)?;
        body["steps"] = serde_json::to_value(host.engine.history(&id)?)?;
        println!("{}", serde_json::to_string_pretty(&body)?);
    } else {
        print!("{}", render_result(host, &v)?);
    }
    Ok(v)
}
