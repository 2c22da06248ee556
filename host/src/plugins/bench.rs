//! `ksi-host bench plugins`: instantiation, call, load and reload timings of the bundled
//! plugins, measured on this machine (run it from a release build).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Value, json};

use super::bindings::StepInput;
use super::host_impl::{HostServices, MemoryHost, RecordingEvents, StepScope};
use super::loader::{self, LoadOptions};
use super::runtime::{PluginRuntime, RuntimeConfig};
use super::step::Instantiator;
use super::{EngineConfig, PluginEngine, bundled};

const ITERATIONS: usize = 2000;
const WARMUP: usize = 200;

/// Run the plugin benchmark and return its numbers as JSON:
///
/// - `instantiate_call_p50_us` / `_p99_us`: a trivial `echo` step from a fresh instance (new
///   store, instantiate from the `InstancePre`, call `run`, check the output);
/// - `hot_call_p50_us`: the same call repeated on one instance;
/// - `cold_load_ms` / `cached_load_ms`: load of each bundled plugin (validate, compile or read
///   the cache, type-check, `describe()`);
/// - `reload_ms`: from the file replaced (atomic rename) to the new version serving, through the
///   watcher and its debounce; `reload_cold_ms` is the same when the new file must be compiled.
/// - `idle_cpu_pct_with_200mb_plugin`: CPU this process uses over a few idle seconds with a
///   200 MB plugin loaded and the directory watched (the watcher must not re-read it);
/// - `rss_before_bomb_mb` / `rss_after_bomb_mb`: this process's RSS around refusing a compile
///   bomb of 600,000 functions. From a `ksi-host` binary the function limit is lifted so that
///   the bomb reaches the compile child (and its 1 GiB memory limit); `bomb_refused_by` says
///   which limit refused it.
///
/// On failure the JSON holds `error`.
pub fn bench_plugins() -> Value {
    match try_bench_plugins() {
        Ok(v) => v,
        Err(e) => json!({ "error": format!("{e:#}") }),
    }
}

/// [`bench_plugins`], with errors.
///
/// # Errors
///
/// When a bundled plugin does not load or a step fails.
pub fn try_bench_plugins() -> anyhow::Result<Value> {
    let dir = tempfile::tempdir()?;
    let mut config = RuntimeConfig::for_data_dir(dir.path());
    config.load.limits.defaults.cpu_time = Duration::from_secs(60);
    let host: Arc<dyn HostServices> = MemoryHost::new();
    let events = Arc::new(RecordingEvents::default());
    let runtime = PluginRuntime::new(config.clone(), host.clone(), events)?;

    let echo_path = runtime.config().plugins_dir.join("echo.wasm");
    std::fs::copy(bundled::ECHO_V1, &echo_path)?;
    let echo = runtime.load_file(&echo_path)?;
    let input = StepInput::new("echo", json!({}));

    // Fresh instance per call.
    let mut fresh = Vec::with_capacity(ITERATIONS);
    for i in 0..WARMUP + ITERATIONS {
        let start = Instant::now();
        echo.run_step(&input, host.clone())?;
        if i >= WARMUP {
            fresh.push(start.elapsed());
        }
    }

    // One instance, many calls.
    let hot = {
        let inst = Instantiator {
            engine: runtime.engine(),
            pre: echo.pre(),
            limits: echo.limits,
            grants: &[],
        };
        let (times, ..) = inst
            .call(StepScope::default(), host.clone(), |store, handler| {
                let mut times = Vec::with_capacity(ITERATIONS);
                for i in 0..WARMUP + ITERATIONS {
                    let start = Instant::now();
                    handler
                        .ksi_plugin_handler()
                        .call_run(&mut *store, &input)?
                        .map_err(|e| wasmtime::format_err!("echo failed: {}", e.message))?;
                    if i >= WARMUP {
                        times.push(start.elapsed());
                    }
                }
                Ok(times)
            })
            .map_err(|e| anyhow::anyhow!("hot calls failed: {e}"))?;
        times
    };

    // Loads: cold (compile) and cached, per bundled plugin, on a fresh engine each.
    let mut cold = serde_json::Map::new();
    let mut cached = serde_json::Map::new();
    for (name, path) in [
        ("echo", bundled::ECHO_V1),
        ("debate", bundled::DEBATE),
        ("summarize", bundled::SUMMARIZE),
    ] {
        let (c, w) = time_loads(Path::new(path))?;
        cold.insert(name.into(), json!(ms(c)));
        cached.insert(name.into(), json!(ms(w)));
    }

    // Reload through the watcher.
    let _watcher = runtime.watch()?;
    let v1 = std::fs::read(bundled::ECHO_V1)?;
    let v2 = std::fs::read(bundled::ECHO_V2)?;
    let mut reloads = Vec::new();
    for round in 0..6 {
        let (bytes, version) = if round % 2 == 0 {
            (&v2, "0.2.0")
        } else {
            (&v1, "0.1.0")
        };
        let tmp = echo_path.with_extension("tmp");
        std::fs::write(&tmp, bytes)?;
        let start = Instant::now();
        std::fs::rename(&tmp, &echo_path)?;
        loop {
            if runtime
                .resolve("echo")
                .is_ok_and(|p| p.version.to_string() == version)
            {
                break;
            }
            if start.elapsed() > Duration::from_secs(30) {
                bail!("echo {version} was not serving 30 s after its file was replaced");
            }
            std::thread::sleep(Duration::from_micros(500));
        }
        reloads.push(start.elapsed());
    }
    let reload_cold = reloads[0];

    // A runaway step (an endless loop) under a 200 ms CPU limit: how soon it is stopped.
    let cpu_limit = Duration::from_millis(200);
    let mut stops = Vec::new();
    {
        let dir = tempfile::tempdir()?;
        let mut config = RuntimeConfig::for_data_dir(dir.path());
        config.load.limits.defaults.cpu_time = cpu_limit;
        let runtime =
            PluginRuntime::new(config, host.clone(), Arc::new(RecordingEvents::default()))?;
        let path = runtime.config().plugins_dir.join("echo.wasm");
        std::fs::copy(bundled::ECHO_V1, &path)?;
        let echo = runtime.load_file(&path)?;
        let forever = StepInput::new("echo", json!({"loop_forever": true}));
        for _ in 0..5 {
            let start = Instant::now();
            match echo.run_step(&forever, host.clone()) {
                Err(crate::plugins::StepFailure::Timeout { .. }) => stops.push(start.elapsed()),
                Err(e) => bail!("the endless loop ended with {e}, not the CPU limit"),
                Ok(_) => bail!("the endless loop returned"),
            }
        }
    }
    let mut warm_reloads = reloads[2..].to_vec();
    drop(_watcher);

    let idle_cpu_pct = idle_cpu_with_big_plugin(&host)?;
    let bomb = bomb_rss(&host)?;

    Ok(json!({
        "allocator": runtime.engine().allocator(),
        "profile": if cfg!(debug_assertions) { "debug" } else { "release" },
        "iterations": ITERATIONS,
        "instantiate_call_p50_us": us(percentile(&mut fresh, 50)),
        "instantiate_call_p99_us": us(percentile(&mut fresh, 99)),
        "hot_call_p50_us": us(percentile(&mut hot.clone(), 50)),
        "cold_load_ms": cold,
        "cached_load_ms": cached,
        "reload_ms": ms(percentile(&mut warm_reloads, 50)),
        "reload_cold_ms": ms(reload_cold),
        "reload_debounce_ms": config.debounce.as_millis() as u64,
        "cpu_limit_ms": cpu_limit.as_millis() as u64,
        "cpu_limit_stop_p50_ms": ms(percentile(&mut stops, 50)),
        "idle_cpu_pct_with_200mb_plugin": idle_cpu_pct,
        "rss_before_bomb_mb": bomb.0,
        "rss_after_bomb_mb": bomb.1,
        "bomb_refused_by": bomb.2,
        "bomb_refused_ms": bomb.3,
    }))
}

/// Seconds of idle time over which [`idle_cpu_with_big_plugin`] measures.
const IDLE: Duration = Duration::from_secs(3);

/// CPU use (percent of one core) of this process while idle, with a 200 MB plugin (echo plus a
/// 200 MB custom section) loaded and its directory watched.
fn idle_cpu_with_big_plugin(host: &Arc<dyn HostServices>) -> anyhow::Result<f64> {
    let dir = tempfile::tempdir()?;
    let runtime = PluginRuntime::new(
        RuntimeConfig::for_data_dir(dir.path()),
        host.clone(),
        Arc::new(RecordingEvents::default()),
    )?;
    let mut bytes = std::fs::read(bundled::ECHO_V1)?;
    custom_section(&mut bytes, "ksi-bench-padding", 200 << 20);
    let path = runtime.config().plugins_dir.join("big.wasm");
    std::fs::write(&path, &bytes)?;
    drop(bytes);
    runtime.load_file(&path)?;
    let _watcher = runtime.watch()?;
    std::thread::sleep(Duration::from_millis(500));
    let (cpu, wall) = (cpu_ms(), Instant::now());
    std::thread::sleep(IDLE);
    let used = cpu_ms() - cpu;
    Ok((used / wall.elapsed().as_secs_f64() / 10.0 * 100.0).round() / 100.0)
}

/// Append a custom section of `size` zero bytes named `name` to a component.
fn custom_section(bytes: &mut Vec<u8>, name: &str, size: usize) {
    let mut payload = Vec::new();
    leb128(&mut payload, name.len() as u64);
    payload.extend_from_slice(name.as_bytes());
    payload.resize(payload.len() + size, 0);
    bytes.push(0);
    leb128(bytes, payload.len() as u64);
    bytes.extend_from_slice(&payload);
}

fn leb128(out: &mut Vec<u8>, mut v: u64) {
    loop {
        let byte = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

/// (RSS before, RSS after, the limit that refused it, ms) of loading the compile bomb.
fn bomb_rss(host: &Arc<dyn HostServices>) -> anyhow::Result<(f64, f64, &'static str, f64)> {
    let dir = tempfile::tempdir()?;
    let mut config = RuntimeConfig::for_data_dir(dir.path());
    if let Some(worker) = loader::compile_worker_binary() {
        config.load.compiler = Some(worker);
        config.load.max_functions = u64::MAX;
        config.load.compile_memory_bytes = 1 << 30;
    }
    let runtime = PluginRuntime::new(config, host.clone(), Arc::new(RecordingEvents::default()))?;
    let path = runtime.config().plugins_dir.join("bomb.wasm");
    std::fs::copy(bundled::FAULT_COMPILE_BOMB, &path)?;
    let before = rss_mb();
    let start = Instant::now();
    let refused = match runtime.load_file(&path) {
        Ok(_) => bail!("the compile bomb loaded"),
        Err(e) => e.kind(),
    };
    let took = start.elapsed();
    Ok((before, rss_mb(), refused, ms(took)))
}

/// VmRSS of this process, in MiB.
fn rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| (kb / 1024.0 * 10.0).round() / 10.0)
}

/// User + system CPU time of this process, in ms.
fn cpu_ms() -> f64 {
    // SAFETY: getrusage only writes into the struct it is given.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } != 0 {
        return 0.0;
    }
    let ms = |t: libc::timeval| t.tv_sec as f64 * 1000.0 + t.tv_usec as f64 / 1000.0;
    ms(ru.ru_utime) + ms(ru.ru_stime)
}

/// (compile, from cache) load times of one plugin.
fn time_loads(path: &Path) -> anyhow::Result<(Duration, Duration)> {
    let cache_dir = tempfile::tempdir()?;
    let engine = PluginEngine::new(EngineConfig::default())?;
    let cache = super::cache::CompiledCache::new(cache_dir.path(), engine.engine())?;
    let options = LoadOptions::default();
    let start = Instant::now();
    loader::load_file(&engine, Some(&cache), path, &options)
        .with_context(|| format!("loading {}", path.display()))?;
    let cold = start.elapsed();
    let start = Instant::now();
    let again = loader::load_file(&engine, Some(&cache), path, &options)?;
    let warm = start.elapsed();
    anyhow::ensure!(again.from_cache, "the second load did not use the cache");
    Ok((cold, warm))
}

fn percentile(samples: &mut [Duration], p: usize) -> Duration {
    samples.sort_unstable();
    samples[(samples.len() - 1) * p / 100]
}

fn us(d: Duration) -> f64 {
    (d.as_nanos() as f64 / 100.0).round() / 10.0
}

fn ms(d: Duration) -> f64 {
    (d.as_micros() as f64 / 100.0).round() / 10.0
}
