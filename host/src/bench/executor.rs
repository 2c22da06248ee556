//! `ksi-host bench executor`: N concurrent calls of `fake-claude` (instant answers) through the
//! whole executor (prompt file, rows, events, spend checks, response logs, agent-less).
//!
//! `overhead_p50_ms` is, per call, the wall time of `ClaudeApi::complete` minus the child's own
//! run time measured by the supervisor from spawn to exit: what KSI adds around the CLI.
//!
//! One burst of 50 calls lasts about 60 ms, and its p50 moves by ±30 % from one burst to the
//! next on a small shared machine. So one run makes `rounds` bursts (one after the other, each
//! of `calls` concurrent calls) and reports the percentiles over all their calls, with each
//! round's p50 beside them. It first waits [`SETTLE`] doing nothing: a program started with it
//! (the `jq` or `python3` of a pipeline) would otherwise start up on the same CPUs while it
//! measures.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::bus::Bus;
use crate::claude::executor::{Executor, ExecutorConfig, get_process};
use crate::refs::Refs;
use crate::store::{Store, StoreOptions};
use crate::workflow::{ClaudeApi, ClaudeRequest};

/// The peak RSS of this process so far (`ru_maxrss`), in MiB: exact, and nothing has to
/// sample it while the benchmark measures (a sampling task would compete with the calls).
fn peak_rss_mb() -> f64 {
    // SAFETY: getrusage only writes into the struct it is given.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } != 0 {
        return 0.0;
    }
    ru.ru_maxrss as f64 / 1024.0
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// CPU time (user + system) in ms of this process (`libc::RUSAGE_SELF`) or of its reaped
/// children (`libc::RUSAGE_CHILDREN`).
fn cpu_ms(who: i32) -> f64 {
    // SAFETY: getrusage only writes into the struct it is given.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(who, &mut ru) } != 0 {
        return 0.0;
    }
    let ms = |t: libc::timeval| t.tv_sec as f64 * 1000.0 + t.tv_usec as f64 / 1000.0;
    ms(ru.ru_utime) + ms(ru.ru_stime)
}

/// The durations the executor measured for process `id`, in ms: the child's spawn to exit
/// (`spawn_to_exit_us`), its spawn (`spawn_us`) and the time before it (`before_spawn_us`).
struct CallTimes {
    child: f64,
    spawn: f64,
    before_spawn: f64,
}

fn call_times(store: &Store, id: &str) -> anyhow::Result<CallTimes> {
    let row = get_process(store, id)?.ok_or_else(|| anyhow::anyhow!("no row for {id}"))?;
    let ms = |key: &str| {
        let us = (row.metrics.as_ref())
            .and_then(|m| m.get(key))
            .and_then(Value::as_u64)
            .unwrap_or(0);
        us as f64 / 1000.0
    };
    Ok(CallTimes {
        child: ms("spawn_to_exit_us"),
        spawn: ms("spawn_us"),
        before_spawn: ms("before_spawn_us"),
    })
}

/// How long the benchmark waits before it measures.
pub const SETTLE: Duration = Duration::from_millis(500);

/// Runs the benchmark in a fresh `data_dir` (created; existing data is not touched but shares
/// the database): `rounds` bursts of `calls` concurrent calls of `fake_claude_bin`, run `nice`
/// below the daemon (`None`: the executor's default).
///
/// # Errors
/// The data dir cannot be opened, or a call failed.
pub async fn bench_executor(
    data_dir: &Path,
    fake_claude_bin: &Path,
    calls: usize,
    rounds: usize,
    nice: Option<i32>,
) -> anyhow::Result<Value> {
    let rounds = rounds.max(1);
    crate::store::prepare_data_dir(data_dir)?;
    let store = Store::open_path(&data_dir.join("ksi.db"), &StoreOptions::default())?;
    let refs = Refs::open(data_dir)?;
    let mut config = ExecutorConfig {
        binary: fake_claude_bin.to_path_buf(),
        ..ExecutorConfig::default()
    };
    config.spend.max_concurrency = calls.max(1);
    config.spend.spawn_rate_per_min = 0.0;
    if let Some(n) = nice {
        config.nice = n.clamp(0, 19);
    }
    let config_nice = config.nice;
    let exec = Executor::new(store.clone(), Bus::new(store.clone()), refs, config);

    // Whatever was started with the benchmark starts up now, not while it measures.
    tokio::time::sleep(SETTLE).await;
    let run = format!("{:x}", rand::random::<u32>());
    // One at a time first: KSI's own cost per call, without 50 children competing for the CPU.
    let mut sequential = Vec::new();
    for i in 0..calls.min(20) {
        let id = format!("bench-{run}-seq-{i}");
        let start = Instant::now();
        exec.complete(
            id.clone(),
            None,
            ClaudeRequest {
                prompt: format!("sequential benchmark call {i}"),
                ..ClaudeRequest::default()
            },
        )
        .await
        .map_err(|f| anyhow::anyhow!("benchmark call {id} failed ({}): {}", f.class, f.message))?;
        let wall = start.elapsed().as_secs_f64() * 1000.0;
        sequential.push(wall - call_times(&store, &id)?.child);
    }
    sequential.sort_by(f64::total_cmp);
    let mut overheads = Vec::new();
    let mut child_ms = Vec::new();
    let mut spawn_ms = Vec::new();
    let mut before_spawn_ms = Vec::new();
    let mut after_exit_ms = Vec::new();
    let mut round_p50 = Vec::new();
    let mut elapsed = Duration::ZERO;
    // CPU during the bursts only (not the reading of their rows in between).
    let (mut ksi_cpu, mut child_cpu) = (0.0, 0.0);
    for round in 0..rounds {
        let (self_cpu0, child_cpu0) = (cpu_ms(libc::RUSAGE_SELF), cpu_ms(libc::RUSAGE_CHILDREN));
        let t0 = Instant::now();
        let mut tasks = Vec::new();
        for i in 0..calls {
            let exec = exec.clone();
            let id = format!("bench-{run}-r{round}-{i}");
            tasks.push(tokio::spawn(async move {
                let start = Instant::now();
                let out = exec
                    .complete(
                        id.clone(),
                        None,
                        ClaudeRequest {
                            prompt: format!("benchmark round {round} call {i}"),
                            ..ClaudeRequest::default()
                        },
                    )
                    .await;
                (id, start.elapsed(), out)
            }));
        }
        let mut walls = Vec::new();
        for t in tasks {
            let (id, wall, out) = t.await?;
            out.map_err(|f| {
                anyhow::anyhow!("benchmark call {id} failed ({}): {}", f.class, f.message)
            })?;
            walls.push((id, wall));
        }
        elapsed += t0.elapsed();
        ksi_cpu += cpu_ms(libc::RUSAGE_SELF) - self_cpu0;
        child_cpu += cpu_ms(libc::RUSAGE_CHILDREN) - child_cpu0;
        let mut this_round = Vec::new();
        for (id, wall) in walls {
            let wall = wall.as_secs_f64() * 1000.0;
            let t = call_times(&store, &id)?;
            child_ms.push(t.child);
            spawn_ms.push(t.spawn);
            before_spawn_ms.push(t.before_spawn);
            after_exit_ms.push(wall - t.child - t.before_spawn);
            overheads.push(wall - t.child);
            this_round.push(wall - t.child);
        }
        this_round.sort_by(f64::total_cmp);
        round_p50.push(percentile(&this_round, 0.5));
    }
    let total_calls = (calls * rounds).max(1);
    let (ksi_cpu, child_cpu) = (ksi_cpu / total_calls as f64, child_cpu / total_calls as f64);
    overheads.sort_by(f64::total_cmp);
    child_ms.sort_by(f64::total_cmp);
    spawn_ms.sort_by(f64::total_cmp);
    before_spawn_ms.sort_by(f64::total_cmp);
    after_exit_ms.sort_by(f64::total_cmp);
    let rss = peak_rss_mb();
    store.close();
    Ok(json!({
        "calls": calls,
        "concurrency": calls,
        "rounds": rounds,
        "round_overhead_p50_ms": round_p50,
        "overhead_p50_ms": percentile(&overheads, 0.5),
        "sequential_overhead_p50_ms": percentile(&sequential, 0.5),
        "overhead_p90_ms": percentile(&overheads, 0.9),
        "overhead_max_ms": overheads.last().copied().unwrap_or(0.0),
        "before_spawn_p50_ms": percentile(&before_spawn_ms, 0.5),
        "after_exit_p50_ms": percentile(&after_exit_ms, 0.5),
        "child_p50_ms": percentile(&child_ms, 0.5),
        "spawn_p50_ms": percentile(&spawn_ms, 0.5),
        "spawn_p90_ms": percentile(&spawn_ms, 0.9),
        "ksi_cpu_ms_per_call": ksi_cpu,
        "child_cpu_ms_per_call": child_cpu,
        "calls_per_s": total_calls as f64 / elapsed.as_secs_f64(),
        "elapsed_ms": elapsed.as_secs_f64() * 1000.0,
        "rss_mb": rss,
        "nice": config_nice,
        "note": "overhead = wall time of ClaudeApi::complete minus the child's spawn-to-exit time (before_spawn: from the call to the spawn; after_exit: from the exit to the answer), percentiles over all calls of all rounds (each round: `calls` at once); with 50 concurrent calls on a small machine it includes waiting for CPU and for the disk",
    }))
}
