//! `ksi run WORKFLOW`: start a workflow and follow it live — one line per step with elapsed
//! time, cost so far and a progress bar, on stderr when it is a terminal — then print its
//! result on stdout.
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

/// [`choose_claude_bin`], telling the user on stderr when the answers will be simulated.
pub fn claude_bin_with_notice(explicit: Option<PathBuf>) -> PathBuf {
    let (bin, simulated) = choose_claude_bin(explicit);
    if simulated {
        eprintln!(
            "note: the real `claude` CLI is not on PATH, so this uses {} (simulated answers, no cost). Install Claude Code to use the real one.",
            bin.display()
        );
    }
    bin
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

/// Progress of a followed instance: turns its events into lines.
pub struct Progress {
    started: Instant,
    done: usize,
    total: usize,
}

impl Progress {
    /// For an instance of `total` top-level steps.
    pub fn new(total: usize) -> Self {
        Progress {
            started: Instant::now(),
            done: 0,
            total: total.max(1),
        }
    }

    /// The line for one event of the instance (None for events not worth a line); `cost` is
    /// the instance's cost so far.
    pub fn line(&mut self, topic: &str, d: &Value, cost: f64) -> Option<String> {
        let t = self.started.elapsed().as_secs_f64();
        match topic {
            "workflow.step_complete" => {
                let status = d["status"].as_str().unwrap_or("");
                if status == "completed" {
                    self.done += 1;
                }
                let mark = match status {
                    "completed" => "✓",
                    "retrying" => "↻",
                    _ => "✗",
                };
                Some(format!(
                    "[{t:>6.1}s] {mark} {:<12} {:<18} {:>6} ms  ${cost:<8.4} {} {}/{}",
                    d["step"].as_str().unwrap_or("?"),
                    d["plugin"].as_str().unwrap_or(""),
                    d["duration_ms"],
                    bar(self.done, self.total, 12),
                    self.done,
                    self.total,
                ))
            }
            "workflow.failed" => Some(format!(
                "[{t:>6.1}s] ✗ failed: {}",
                d["error"].as_str().unwrap_or("")
            )),
            "workflow.cancelled" => Some(format!("[{t:>6.1}s] ✗ cancelled")),
            _ => None,
        }
    }
}

/// Live progress goes to stderr, and only when a person watches it: stdout keeps the result
/// (text or `--json`) clean for pipes and files.
fn print_line(line: &str) -> anyhow::Result<()> {
    if !super::claude::stderr_is_terminal() {
        return Ok(());
    }
    let mut out = std::io::stderr().lock();
    writeln!(out, "{line}")?;
    out.flush()?;
    Ok(())
}

/// Follows an instance until it ends, printing one line per finished step.
pub async fn follow(host: &Host, id: &str) -> anyhow::Result<InstanceView> {
    let mut progress = Progress::new(host.engine.get(id)?.total_steps.unwrap_or(1) as usize);
    let mut last_event = 0i64;
    let mut published = host.store.published();
    loop {
        published.borrow_and_update();
        for e in host.bus.events_after(last_event, Some("workflow.>"), 500)? {
            last_event = e.id;
            if e.correlation_id.as_deref() != Some(id) {
                continue;
            }
            let cost = host.engine.get(id).map(|v| v.cost_usd).unwrap_or(0.0);
            if let Some(line) = progress.line(&e.topic, &e.data, cost) {
                print_line(&line)?;
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

/// The human summary of a finished instance, from its JSON (`GET /workflows/ID`: the
/// instance with its `steps`): its final result (the last step's result, e.g. the judge's
/// verdict) and its totals.
pub fn render_result(v: &Value, data_dir: Option<&std::path::Path>) -> String {
    let mut out = String::new();
    let steps = v["steps"].as_array().cloned().unwrap_or_default();
    let id = v["id"].as_str().unwrap_or("");
    out.push_str(&format!(
        "\n{} {id} — {}\n",
        v["type"].as_str().unwrap_or(""),
        v["status"].as_str().unwrap_or("")
    ));
    if let Some(e) = v["error"].as_str() {
        out.push_str(&format!("error: {e}\n"));
    }
    if let Some(step) = steps
        .iter()
        .rev()
        .find(|s| s["status"] == "completed" && s["output"].is_object())
    {
        let result = &step["output"]["result"];
        let text = ["verdict", "report", "summary", "final", "text"]
            .iter()
            .find_map(|k| result.get(*k).and_then(Value::as_str))
            .map(str::to_string)
            .unwrap_or_else(|| serde_json::to_string_pretty(result).unwrap_or_default());
        out.push_str(&format!("\n{text}\n"));
    }
    let end = v["completed_at"]
        .as_i64()
        .or(v["updated_at"].as_i64())
        .unwrap_or(0);
    let cost = v["cost_usd"].as_f64().unwrap_or(0.0);
    let simulated = v["simulated_usd"].as_f64().unwrap_or(0.0);
    // Simulated cost (fake-claude's) is not money: said so, and kept apart from real spend.
    let money = if simulated <= 0.0 {
        format!("${cost:.4}")
    } else if (cost - simulated).abs() < 1e-12 {
        format!("${cost:.4} simulated (no money spent)")
    } else {
        format!("${:.4} + ${simulated:.4} simulated", cost - simulated)
    };
    out.push_str(&format!(
        "\n{} steps, {} Claude calls, {} tokens in / {} out, {money}, {:.1} s\n",
        steps.iter().filter(|s| s["status"] == "completed").count(),
        v["claude_calls"],
        v["tokens_in"],
        v["tokens_out"],
        (end - v["created_at"].as_i64().unwrap_or(end)) as f64 / 1000.0
    ));
    let logs = match data_dir {
        Some(d) => format!("{}/claude_logs/", d.display()),
        None => "claude_logs/ in the daemon's data dir".into(),
    };
    out.push_str(&format!(
        "transcript: ksi workflow show {id}   logs: {logs}\n"
    ));
    out
}

/// Starts `args.workflow` on `host` and follows it to the end.
pub async fn run_in_process(host: &Host, args: &RunArgs) -> anyhow::Result<InstanceView> {
    let params = params_of(args)?;
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    let workers = host.spawn_workers(stop_rx);
    let id = host.engine.start(&args.workflow, params).await?;
    print_line(&format!("started {} {id}", args.workflow))?;
    let v = follow(host, &id).await?;
    let _ = stop.send(true);
    let _ = workers.await;
    let mut body = serde_json::to_value(&v)?;
    body["steps"] = serde_json::to_value(host.engine.history(&id)?)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&body)?);
    } else {
        print!("{}", render_result(&body, Some(&host.config.data_dir)));
    }
    Ok(v)
}

/// Runs `args.workflow` on the daemon listening on `client`, following it over the live
/// event stream; `data_dir` is the daemon's when it is local (for the logs hint).
///
/// # Errors
/// The daemon refused the workflow or the stream broke.
pub async fn run_on_daemon(
    client: &super::client::DaemonClient,
    args: &RunArgs,
    data_dir: Option<&std::path::Path>,
) -> anyhow::Result<Value> {
    let params = params_of(args)?;
    // Subscribe first (the stream starts at the newest event), then start: nothing is missed.
    let mut events = client.stream("/events/stream?topic=workflow.%3E").await?;
    let body = client
        .call(
            "POST",
            "/workflows",
            Some(serde_json::json!({"type": args.workflow, "params": params})),
        )
        .await
        .map_err(|e| anyhow::anyhow!("the daemon refused the workflow: {e}"))?;
    let id = body["id"].as_str().unwrap_or_default().to_string();
    print_line(&format!(
        "started {} {id} on {}",
        args.workflow,
        client.describe()
    ))?;
    let v = client.get(&format!("/workflows/{id}")).await?;
    let mut progress = Progress::new(v["total_steps"].as_u64().unwrap_or(1) as usize);
    let mut cost = 0.0;
    while let Some(e) = events.next_event().await? {
        if e["correlation_id"].as_str() != Some(id.as_str()) {
            continue;
        }
        let topic = e["topic"].as_str().unwrap_or("");
        let d = &e["data"];
        cost += d["cost_usd"]
            .as_f64()
            .filter(|_| topic == "workflow.step_complete")
            .unwrap_or(0.0);
        if let Some(line) = progress.line(topic, d, cost) {
            print_line(&line)?;
        }
        if matches!(
            topic,
            "workflow.complete" | "workflow.failed" | "workflow.cancelled"
        ) {
            break;
        }
    }
    let v = client.get(&format!("/workflows/{id}")).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        print!("{}", render_result(&v, data_dir));
    }
    Ok(v)
}
