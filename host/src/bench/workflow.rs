//! `ksi-host bench workflow`: durable steps per second, per-step overhead, and the time to
//! resume 1,000 running instances after a restart.
//!
//! The workload is a 10-step workflow of trivial echo steps, 100 instances at once. The step
//! handler is given by the caller (the WebAssembly `echo` plugin in `ksi-host bench`), so the
//! numbers include instantiating and calling a component for every step.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::json;
use tokio::sync::watch;

use crate::refs::Refs;
use crate::store::{Store, StoreOptions};
use crate::workflow::{BoxFuture, Definition, Engine, EngineOptions, NoClaude, StepRunner};

/// Results (also the `--json` output).
#[derive(Debug, Clone, Serialize)]
pub struct WorkflowBenchReport {
    pub handler: String,
    pub instances: usize,
    pub steps_per_instance: usize,
    pub workers: usize,
    pub steps_per_s: f64,
    pub step_p50_ms: f64,
    pub step_p99_ms: f64,
    pub resume_instances: usize,
    pub resume_ms: f64,
}

fn definition(handler: &str, steps: usize) -> String {
    let mut s = String::from("name = \"bench\"\nversion = \"1.0.0\"\n");
    for i in 0..steps {
        s.push_str(&format!(
            "[[steps]]\nname = \"s{i}\"\nhandler = \"{handler}\"\n"
        ));
    }
    s
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[(((sorted.len() - 1) as f64) * p).round() as usize]
}

async fn open_engine(
    dir: &Path,
    runner: Arc<dyn StepRunner>,
    handler: &str,
    steps: usize,
    workers: usize,
) -> anyhow::Result<(Store, Engine)> {
    let store = Store::open_path(&dir.join("ksi.db"), &StoreOptions::default())?;
    let refs = Refs::open(dir)?;
    let engine = Engine::new(
        store.clone(),
        refs,
        runner.clone(),
        Arc::new(NoClaude("the benchmark makes no Claude calls")),
        EngineOptions {
            workers,
            lease: Duration::from_secs(30),
        },
    )
    .await?;
    let def = Definition::parse(Path::new("bench.toml"), &definition(handler, steps), &|h| {
        runner.resolve(h).map(|_| ())
    })?;
    engine.add_definition(def);
    Ok((store, engine))
}

/// Runs the benchmark in `dir` (created and removed) with `runner` resolving `handler`.
pub async fn run(
    dir: &Path,
    runner: Arc<dyn StepRunner>,
    handler: &str,
    instances: usize,
    resume_instances: usize,
    workers: usize,
) -> anyhow::Result<WorkflowBenchReport> {
    const STEPS: usize = 10;
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir)?;

    // 1. Throughput and per-step latency: 100 instances of 10 steps, all at once.
    let (store, engine) = open_engine(dir, runner.clone(), handler, STEPS, workers).await?;
    let (stop, stop_rx) = watch::channel(false);
    let e = engine.clone();
    let workers_task = tokio::spawn(async move { e.run_workers(stop_rx).await });
    let t0 = Instant::now();
    let mut ids = Vec::new();
    for i in 0..instances {
        ids.push(engine.start("bench", json!({ "i": i })).await?);
    }
    for id in &ids {
        let v = tokio::time::timeout(Duration::from_secs(300), engine.wait(id)).await??;
        anyhow::ensure!(
            v.status == "completed",
            "instance {id} ended {}: {:?}",
            v.status,
            v.error
        );
    }
    let elapsed = t0.elapsed();
    let mut step_ms: Vec<f64> = engine
        .step_latencies_us()
        .into_iter()
        .map(|us| us as f64 / 1000.0)
        .collect();
    step_ms.sort_by(|a, b| a.total_cmp(b));
    let total_steps = instances * STEPS;
    let _ = stop.send(true);
    let _ = workers_task.await;
    store.close();
    drop(engine);

    // 2. Resume: 1,000 instances whose first step was claimed by a daemon that then died.
    let rdir = dir.join("resume");
    std::fs::create_dir_all(&rdir)?;
    {
        let (store, engine) = open_engine(&rdir, runner.clone(), handler, STEPS, workers).await?;
        for i in 0..resume_instances {
            engine.start("bench", json!({ "i": i })).await?;
        }
        // Claim every first step, as running workers would, and "die" holding the leases.
        let bus = engine.bus().clone();
        let sub = bus.subscription(crate::workflow::engine::SUBSCRIPTION)?;
        let mut claimed = 0;
        while claimed < resume_instances {
            let got = bus.claim(&sub, "dead-daemon", 256).await?;
            anyhow::ensure!(!got.is_empty(), "only {claimed} steps to claim");
            claimed += got.len();
        }
        store.close();
    }
    let t0 = Instant::now();
    let (store, engine) = open_engine(&rdir, runner, handler, STEPS, workers).await?;
    engine.recover().await?;
    let (stop, stop_rx) = watch::channel(false);
    let e = engine.clone();
    let workers_task = tokio::spawn(async move { e.run_workers(stop_rx).await });
    // Resumed = every instance has completed the step it was in when the daemon died.
    loop {
        let done: i64 = store.read(|c| {
            c.query_row(
                "SELECT COUNT(DISTINCT workflow_id) FROM workflow_steps WHERE status = 'completed'",
                [],
                |r| r.get(0),
            )
            .map_err(crate::store::StoreError::from)
        })?;
        if done as usize >= resume_instances {
            break;
        }
        anyhow::ensure!(
            t0.elapsed() < Duration::from_secs(120),
            "resume stalled at {done}"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let resume_ms = t0.elapsed().as_secs_f64() * 1e3;
    let _ = stop.send(true);
    let _ = workers_task.await;
    store.close();
    let _ = std::fs::remove_dir_all(dir);

    Ok(WorkflowBenchReport {
        handler: handler.to_string(),
        instances,
        steps_per_instance: STEPS,
        workers,
        steps_per_s: (total_steps as f64 / elapsed.as_secs_f64()).round(),
        step_p50_ms: (percentile(&step_ms, 0.5) * 1000.0).round() / 1000.0,
        step_p99_ms: (percentile(&step_ms, 0.99) * 1000.0).round() / 1000.0,
        resume_instances,
        resume_ms: resume_ms.round(),
    })
}

/// A native (in-process, non-WebAssembly) echo handler, `native.echo`: the baseline that shows
/// what the engine itself costs per step, without any plugin.
pub struct NativeEcho;

impl StepRunner for NativeEcho {
    fn resolve(
        &self,
        h: &crate::workflow::HandlerRef,
    ) -> Result<crate::workflow::ResolvedStep, String> {
        if h.plugin != "native" || h.step != "echo" {
            return Err(format!("only native.echo exists here, not {h}"));
        }
        Ok(crate::workflow::ResolvedStep {
            plugin: "native".into(),
            version: "0.0.0".into(),
            sha256: String::new(),
            step: "echo".into(),
            handle: Arc::new(()),
        })
    }

    fn run(
        &self,
        _step: crate::workflow::ResolvedStep,
        input: crate::workflow::StepInput,
        _ctx: Arc<crate::workflow::StepContext>,
    ) -> BoxFuture<'static, Result<crate::workflow::StepOutput, crate::workflow::StepError>> {
        Box::pin(async move {
            Ok(crate::workflow::StepOutput {
                state_patch: json!({ "last": input.step }),
                result: input.params,
                ..Default::default()
            })
        })
    }
}
