//! `ksi-host bench api`: the daemon's HTTP API under load, and what the daemon costs at rest.
//!
//! The daemon is a separate `ksi-host serve` child on a fresh data dir, so its RSS and CPU
//! (read from `/proc/PID`) are its own and not the load generator's. For each of `GET /health`,
//! `POST /events` and `GET /workflows/ID`, `clients` keep-alive HTTP/1.1 connections first send
//! as fast as they can (the ceiling), then at a fixed total rate (latency at that rate, timed
//! from each request's scheduled start so that a stall counts against every request it delays).
//! The load generator shares the machine's cores with the daemon.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use serde::Serialize;
use serde_json::{Value, json};

/// Settings of one run.
#[derive(Debug, Clone)]
pub struct ApiBenchOptions {
    /// Concurrent keep-alive connections.
    pub clients: usize,
    /// Seconds per phase (each endpoint has a ceiling phase and a paced phase).
    pub seconds: f64,
    /// Total request rate of the paced phase.
    pub rate: u32,
    /// Seconds over which idle CPU is measured.
    pub idle_seconds: f64,
}

impl Default for ApiBenchOptions {
    fn default() -> Self {
        ApiBenchOptions {
            clients: 64,
            seconds: 5.0,
            rate: 5_000,
            idle_seconds: 5.0,
        }
    }
}

/// Latencies of one phase.
#[derive(Debug, Clone, Serialize)]
pub struct PhaseReport {
    pub requests: u64,
    /// Answers with an unexpected status, and transport errors.
    pub errors: u64,
    pub req_per_s: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

/// One endpoint's phases.
#[derive(Debug, Clone, Serialize)]
pub struct EndpointReport {
    /// e.g. `GET /workflows/{id}`
    pub endpoint: String,
    /// As fast as the clients can send.
    pub ceiling: PhaseReport,
    /// At `rate_per_s` in total.
    pub paced: PhaseReport,
}

/// Results (also the `--json` output).
#[derive(Debug, Clone, Serialize)]
pub struct ApiBenchReport {
    pub clients: usize,
    pub seconds_per_phase: f64,
    pub rate_per_s: u32,
    /// VmRSS of the daemon after start-up, before any load.
    pub idle_rss_mb: f64,
    /// The daemon's user+system CPU time over `idle_seconds`, as a percentage of one core.
    pub idle_cpu_percent: f64,
    pub idle_seconds: f64,
    /// Context switches per second of all the idle daemon's threads (timers that wake it).
    pub idle_wakeups_per_s: f64,
    /// Highest VmRSS of the daemon sampled during the load phases.
    pub load_rss_mb: f64,
    /// VmRSS after the load, once the daemon is idle again.
    pub after_rss_mb: f64,
    pub endpoints: Vec<EndpointReport>,
    /// `POST /events` at [`CROWD_RATE`] req/s with no stream client open.
    pub publish_p99_ms: f64,
    /// The same with [`CROWD`] idle stream clients open (following a topic nobody publishes):
    /// what each commit costs them.
    pub publish_p99_ms_with_1000_streams: f64,
    pub targets: Value,
    pub meets_targets: Value,
}

/// Idle stream clients of the crowded publish phase.
const CROWD: usize = 1000;
/// Publish rate of the crowded and quiet publish phases.
const CROWD_RATE: u32 = 200;

/// Opens `n` Server-Sent-Events streams on a topic nobody publishes, each drained by a task.
async fn open_streams(port: u16, n: usize) -> anyhow::Result<Vec<tokio::task::JoinHandle<()>>> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        s.write_all(b"GET /events/stream?topic=idle.%3E HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            .await?;
        out.push(tokio::spawn(async move {
            let mut buf = [0u8; 4096];
            while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {}
        }));
    }
    Ok(out)
}

/// VmRSS of process `pid` in MiB.
fn rss_mb(pid: u32) -> anyhow::Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("read /proc/{pid}/status (is this Linux?)"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|kb| kb.parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .with_context(|| format!("no VmRSS in /proc/{pid}/status"))
}

/// User + system CPU seconds process `pid` has used.
fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("read /proc/{pid}/stat"))?;
    // The command name may contain spaces; the fields after it are plain numbers.
    let rest = stat
        .rsplit_once(") ")
        .map(|(_, r)| r)
        .with_context(|| format!("unexpected /proc/{pid}/stat: {stat}"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 of stat(5); `rest` starts at field 3.
    let ticks: u64 = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
    // SAFETY: sysconf only reads a system constant.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Ok(ticks as f64 / hz)
}

/// Context switches of all threads of process `pid` so far: how often it woke up.
fn context_switches(pid: u32) -> anyhow::Result<u64> {
    let mut n = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .with_context(|| format!("list /proc/{pid}/task"))?
        .flatten()
    {
        // A thread may end between the listing and the read.
        let Ok(status) = std::fs::read_to_string(task.path().join("status")) else {
            continue;
        };
        n += status
            .lines()
            .filter_map(|l| {
                l.strip_prefix("voluntary_ctxt_switches:")
                    .or_else(|| l.strip_prefix("nonvoluntary_ctxt_switches:"))
            })
            .filter_map(|v| v.trim().parse::<u64>().ok())
            .sum::<u64>();
    }
    Ok(n)
}

fn percentile_ms(sorted_us: &[u32], p: f64) -> f64 {
    if sorted_us.is_empty() {
        return 0.0;
    }
    let i = ((sorted_us.len() as f64 - 1.0) * p).round() as usize;
    f64::from(sorted_us[i.min(sorted_us.len() - 1)]) / 1000.0
}

/// A keep-alive HTTP/1.1 connection to the daemon.
struct Conn {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
}

impl Conn {
    async fn open(port: u16) -> anyhow::Result<Conn> {
        let stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        stream.set_nodelay(true)?;
        let (sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        Ok(Conn { sender })
    }

    /// Sends one request; returns its status and body.
    async fn send(&mut self, req: &Request) -> anyhow::Result<(u16, Bytes)> {
        self.sender.ready().await?;
        let mut b = hyper::Request::builder()
            .method(req.method)
            .uri(&req.path)
            .header("host", "127.0.0.1");
        if req.body.is_some() {
            b = b.header("content-type", "application/json");
        }
        let r = b.body(Full::new(req.body.clone().unwrap_or_default()))?;
        let resp = self.sender.send_request(r).await?;
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await?.to_bytes();
        Ok((status, body))
    }
}

/// One kind of request and the status that means success.
#[derive(Debug, Clone)]
struct Request {
    method: &'static str,
    path: String,
    body: Option<Bytes>,
    ok: u16,
}

/// Runs one phase: `clients` connections for `seconds`, each request at its scheduled time
/// when `rate` is given, back to back otherwise.
async fn phase(
    port: u16,
    req: &Request,
    clients: usize,
    seconds: f64,
    rate: Option<u32>,
) -> anyhow::Result<PhaseReport> {
    let mut conns = Vec::with_capacity(clients);
    for _ in 0..clients {
        conns.push(Conn::open(port).await?);
    }
    let start = tokio::time::Instant::now();
    let end = start + Duration::from_secs_f64(seconds);
    let mut tasks = Vec::with_capacity(clients);
    for (i, mut conn) in conns.into_iter().enumerate() {
        let req = req.clone();
        // Each client owns an evenly spaced share of the total rate.
        let interval = rate.map(|r| Duration::from_secs_f64(clients as f64 / f64::from(r.max(1))));
        let offset = interval.map(|iv| iv.mul_f64(i as f64 / clients as f64));
        tasks.push(tokio::spawn(async move {
            let mut lat_us: Vec<u32> = Vec::new();
            let mut errors = 0u64;
            let mut next = start + offset.unwrap_or_default();
            loop {
                let scheduled = if let Some(iv) = interval {
                    tokio::time::sleep_until(next).await;
                    let s = next;
                    next += iv;
                    s
                } else {
                    tokio::time::Instant::now()
                };
                if scheduled >= end {
                    break;
                }
                match conn.send(&req).await {
                    Ok((status, _)) if status == req.ok => {}
                    Ok(_) => errors += 1,
                    Err(_) => {
                        errors += 1;
                        // A broken connection: open a new one rather than count errors forever.
                        match Conn::open(port).await {
                            Ok(c) => conn = c,
                            Err(_) => break,
                        }
                    }
                }
                let us = scheduled.elapsed().as_micros().min(u128::from(u32::MAX)) as u32;
                lat_us.push(us);
            }
            (lat_us, errors)
        }));
    }
    let mut all = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (lat, e) = t.await?;
        all.extend(lat);
        errors += e;
    }
    let elapsed = start.elapsed().as_secs_f64();
    all.sort_unstable();
    Ok(PhaseReport {
        requests: all.len() as u64,
        errors,
        req_per_s: all.len() as f64 / elapsed,
        p50_ms: percentile_ms(&all, 0.5),
        p99_ms: percentile_ms(&all, 0.99),
        max_ms: all.last().map_or(0.0, |&us| f64::from(us) / 1000.0),
    })
}

/// The `ksi-host serve` child, terminated on drop.
struct Daemon {
    child: tokio::process::Child,
    pid: u32,
    port: u16,
}

impl Daemon {
    async fn start(ksi_host: &Path, fake_claude: &Path, data_dir: &Path) -> anyhow::Result<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let mut child = tokio::process::Command::new(ksi_host)
            .arg("--data-dir")
            .arg(data_dir)
            .args(["--log-level", "warn", "serve", "--listen"])
            .arg(format!("127.0.0.1:{port}"))
            .arg("--claude-bin")
            .arg(fake_claude)
            .env_remove("KSI_DATA_DIR")
            // All 64 clients come from one address, which the rate limiter counts as one
            // client: the limiter stays on (its cost is measured) with room for the load.
            .env("KSI_API_RATE_PER_S", "10000000")
            .env("KSI_API_RATE_BURST", "10000000")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("start {} serve", ksi_host.display()))?;
        let pid = child.id().context("the daemon exited at once")?;
        let health = Request {
            method: "GET",
            path: "/health".into(),
            body: None,
            ok: 200,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(mut c) = Conn::open(port).await
                && let Ok((200, _)) = c.send(&health).await
            {
                return Ok(Daemon { child, pid, port });
            }
            if let Some(st) = child.try_wait()? {
                bail!(
                    "the daemon exited ({st}) before answering /health; run `ksi-host --data-dir {} serve` to see why",
                    data_dir.display()
                );
            }
            if Instant::now() > deadline {
                bail!("the daemon did not answer /health on port {port} within 30 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGTERM, then wait for the drain.
    async fn stop(mut self) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.pid as i32, libc::SIGTERM) };
        if tokio::time::timeout(Duration::from_secs(10), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
    }
}

/// Starts a debate on the daemon (fake-claude answers) and waits until it finishes, so that
/// `GET /workflows/ID` reads a realistic instance with four steps.
async fn finished_workflow(port: u16) -> anyhow::Result<String> {
    let mut c = Conn::open(port).await?;
    let start = Request {
        method: "POST",
        path: "/workflows".into(),
        body: Some(Bytes::from(
            json!({"type": "debate", "params": {"topic": "Benchmarks beat opinions"}}).to_string(),
        )),
        ok: 201,
    };
    let (status, body) = c.send(&start).await?;
    let v: Value = serde_json::from_slice(&body)?;
    if status != 201 {
        bail!("POST /workflows answered {status}: {v}");
    }
    let id = v["id"]
        .as_str()
        .context("no id in POST /workflows")?
        .to_string();
    let show = Request {
        method: "GET",
        path: format!("/workflows/{id}"),
        body: None,
        ok: 200,
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, body) = c.send(&show).await?;
        let v: Value = serde_json::from_slice(&body)?;
        match v["status"].as_str() {
            Some("completed") => return Ok(id),
            Some("failed" | "cancelled") => bail!("the setup workflow {id} ended {v}"),
            _ if Instant::now() > deadline => bail!("the setup workflow {id} is still {v}"),
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// Runs the benchmark with a daemon on a fresh data dir under `work_dir` (removed afterwards).
///
/// # Errors
/// The daemon cannot start, or a measurement cannot be read from `/proc`.
pub async fn run(
    ksi_host: &Path,
    fake_claude: &Path,
    work_dir: &Path,
    opts: &ApiBenchOptions,
) -> anyhow::Result<ApiBenchReport> {
    std::fs::create_dir_all(work_dir).with_context(|| format!("create {}", work_dir.display()))?;
    let data = tempfile::Builder::new()
        .prefix("bench-api-")
        .tempdir_in(work_dir)?;
    let d = Daemon::start(ksi_host, fake_claude, data.path()).await?;
    let (pid, port) = (d.pid, d.port);
    let result = async {
        let id = finished_workflow(port).await?;
        // Let start-up work (plugin compilation, first checkpoints) settle before "idle".
        tokio::time::sleep(Duration::from_secs(1)).await;
        let idle_rss_mb = rss_mb(pid)?;
        let (cpu0, switches0) = (cpu_seconds(pid)?, context_switches(pid)?);
        let t0 = Instant::now();
        tokio::time::sleep(Duration::from_secs_f64(opts.idle_seconds)).await;
        let idle_s = t0.elapsed().as_secs_f64();
        let idle_cpu_percent = (cpu_seconds(pid)? - cpu0) / idle_s * 100.0;
        let idle_wakeups_per_s = context_switches(pid)?.saturating_sub(switches0) as f64 / idle_s;

        let peak = Arc::new(std::sync::Mutex::new(idle_rss_mb));
        let stop = Arc::new(AtomicBool::new(false));
        let sampler = {
            let (peak, stop) = (peak.clone(), stop.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    if let Ok(now) = rss_mb(pid) {
                        let mut p = peak.lock().unwrap();
                        *p = p.max(now);
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            })
        };
        let requests = [
            (
                "GET /health",
                Request {
                    method: "GET",
                    path: "/health".into(),
                    body: None,
                    ok: 200,
                },
            ),
            (
                "POST /events",
                Request {
                    method: "POST",
                    path: "/events".into(),
                    body: Some(Bytes::from(
                        json!({"topic": "bench.api", "data": {"workflow_id": id, "n": 1}})
                            .to_string(),
                    )),
                    ok: 201,
                },
            ),
            (
                "GET /workflows/{id}",
                Request {
                    method: "GET",
                    path: format!("/workflows/{id}"),
                    body: None,
                    ok: 200,
                },
            ),
        ];
        let mut endpoints = Vec::new();
        for (name, req) in &requests {
            let ceiling = phase(port, req, opts.clients, opts.seconds, None).await?;
            let paced = phase(port, req, opts.clients, opts.seconds, Some(opts.rate)).await?;
            endpoints.push(EndpointReport {
                endpoint: name.to_string(),
                ceiling,
                paced,
            });
        }
        // What idle stream clients cost each commit.
        let publish = &requests[1].1;
        let quiet = phase(port, publish, 4, opts.seconds, Some(CROWD_RATE)).await?;
        let streams = open_streams(port, CROWD).await?;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let crowded = phase(port, publish, 4, opts.seconds, Some(CROWD_RATE)).await?;
        for s in &streams {
            s.abort();
        }
        stop.store(true, Ordering::Relaxed);
        sampler.await?;
        let load_rss_mb = *peak.lock().unwrap();
        tokio::time::sleep(Duration::from_secs(1)).await;
        let after_rss_mb = rss_mb(pid)?;
        let paced_ok = endpoints.iter().all(|e| {
            e.paced.errors == 0
                && e.paced.p99_ms < 10.0
                && e.paced.req_per_s >= f64::from(opts.rate) * 0.95
        });
        Ok::<_, anyhow::Error>(ApiBenchReport {
            clients: opts.clients,
            seconds_per_phase: opts.seconds,
            rate_per_s: opts.rate,
            idle_rss_mb,
            idle_cpu_percent,
            idle_seconds: opts.idle_seconds,
            idle_wakeups_per_s,
            load_rss_mb,
            after_rss_mb,
            targets: json!({
                "idle_rss_mb": "< 40",
                "idle_cpu_percent": "≈ 0 (< 1)",
                "paced_p99_ms": "< 10 at 5,000 req/s",
                "publish_p99_ms_with_1000_streams": "< 2 × publish_p99_ms",
            }),
            meets_targets: json!({
                "idle_rss": idle_rss_mb < 40.0,
                "idle_cpu": idle_cpu_percent < 1.0,
                "paced_p99": paced_ok && opts.rate >= 5_000,
                "publish_with_streams": crowded.errors == 0 && crowded.p99_ms < 2.0 * quiet.p99_ms.max(0.5),
            }),
            publish_p99_ms: quiet.p99_ms,
            publish_p99_ms_with_1000_streams: crowded.p99_ms,
            endpoints,
        })
    }
    .await;
    d.stop().await;
    result
}
