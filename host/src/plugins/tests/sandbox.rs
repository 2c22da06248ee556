//! A plugin cannot hurt the host: a bad `describe()` never takes a load (or a runtime) down,
//! host calls are bounded and interruptible, one file cannot claim another's name@version, and
//! the watcher reacts to content changes only. Each test drives a component built by
//! `host/build.rs` (the bundled `echo`, or a fault of `plugins/faults/`).

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use serde_json::json;

use super::{Fixture, replace_atomically, wait_for};
use crate::plugins::host_impl::{HostServices, LogLevel, MemoryHost, StepScope};
use crate::plugins::{
    ClaudeError, ClaudeRequest, ClaudeResponse, FileRef, GuestDeterminism, PluginError,
    StepFailure, StepInput, bundled,
};

fn run_echo(
    fx: &Fixture,
    params: serde_json::Value,
) -> Result<crate::plugins::StepResult, StepFailure> {
    run_echo_with(fx, params, fx.services())
}

fn run_echo_with(
    fx: &Fixture,
    params: serde_json::Value,
    services: Arc<dyn HostServices>,
) -> Result<crate::plugins::StepResult, StepFailure> {
    let echo = match fx.runtime.resolve("echo") {
        Ok(echo) => echo,
        Err(_) => fx
            .runtime
            .load_file(&fx.install(bundled::ECHO_V1, "echo.wasm").unwrap())
            .expect("echo loads"),
    };
    echo.run_step(&StepInput::new("echo", params), services)
}

fn limit_message(failure: StepFailure) -> String {
    match failure {
        StepFailure::LimitExceeded { what } => what,
        other => panic!("expected a limit to be exceeded, got {other:?}"),
    }
}

/// The start-up of a daemon (and every CLI command) loads plugins on a thread inside a tokio
/// runtime; a guest writing to stdout there used to panic the host ("Cannot start a runtime
/// from within a runtime").
#[tokio::test]
async fn a_describe_that_writes_to_stdout_loads_even_inside_a_runtime() -> anyhow::Result<()> {
    let fx = Fixture::new()?;
    let path = fx.install(bundled::FAULT_DESCRIBE_PRINTS, "prints.wasm")?;
    let plugin = fx.runtime.load_file(&path)?;
    assert_eq!(plugin.id(), "describe-prints@0.1.0");
    // And the whole directory, as a daemon's start-up does it.
    fx.install(bundled::ECHO_V1, "echo.wasm")?;
    let loaded = fx.runtime.load_dir();
    assert!(loaded.iter().all(|(_, r)| r.is_ok()), "{loaded:?}");
    Ok(())
}

#[tokio::test]
async fn a_describe_that_panics_is_refused_with_its_message_and_the_rest_loads()
-> anyhow::Result<()> {
    let fx = Fixture::new()?;
    fx.install(bundled::FAULT_DESCRIBE_PANICS, "panics.wasm")?;
    fx.install(bundled::ECHO_V1, "echo.wasm")?;
    let loaded = fx.runtime.load_dir();
    let (_, panics) = loaded
        .iter()
        .find(|(p, _)| p.ends_with("panics.wasm"))
        .unwrap();
    match panics {
        Err(PluginError::Describe { failure, .. }) => {
            let text = failure.to_string();
            assert!(
                text.contains("describe-panics cannot describe itself"),
                "{text}"
            );
        }
        other => panic!("expected a describe failure, got {other:?}"),
    }
    assert!(fx.runtime.resolve("echo").is_ok(), "echo loads beside it");
    assert_eq!(fx.events.on("plugin.load_failed").len(), 1);
    Ok(())
}

#[test]
fn a_looping_describe_is_refused_soon_and_holds_up_no_other_load() -> anyhow::Result<()> {
    let fx = Fixture::new()?;
    let looping = fx.install(bundled::FAULT_DESCRIBE_LOOPS, "loops.wasm")?;
    let echo = fx.install(bundled::ECHO_V1, "echo.wasm")?;
    let slow = {
        let runtime = fx.runtime.clone();
        std::thread::spawn(move || runtime.load_file(&looping))
    };
    // While the looping describe() runs (its limit is 1 s), echo loads: loads of different
    // files do not wait for each other.
    std::thread::sleep(Duration::from_millis(100));
    fx.runtime.load_file(&echo)?;
    assert!(
        !slow.is_finished(),
        "echo loaded only after the looping describe() had been stopped"
    );
    match slow.join().unwrap() {
        Err(PluginError::Describe { failure, .. }) => {
            assert!(
                matches!(*failure, StepFailure::Timeout { limit } if limit == Duration::from_secs(1)),
                "{failure}"
            );
        }
        other => panic!("expected a describe timeout, got {other:?}"),
    }
    Ok(())
}

#[test]
fn a_loop_on_host_calls_ends_at_the_host_call_limit() -> anyhow::Result<()> {
    let fx = Fixture::new()?;
    let failure = run_echo(&fx, json!({"config_loop": u64::MAX})).unwrap_err();
    let what = limit_message(failure);
    assert!(what.contains("more than 10000 host calls"), "{what}");
    assert!(what.contains("limits.host_calls"), "{what}");
    Ok(())
}

/// A [`MemoryHost`] whose step must stop after a number of `config.get` calls (as a cancel or
/// timeout does), and whose guests may get deterministic clocks and randomness.
struct Tweaked {
    inner: Arc<MemoryHost>,
    calls: AtomicU32,
    stop_after: Option<u32>,
    determinism: Option<GuestDeterminism>,
}

impl Tweaked {
    fn new(inner: Arc<MemoryHost>) -> Self {
        Tweaked {
            inner,
            calls: AtomicU32::new(0),
            stop_after: None,
            determinism: None,
        }
    }
}

impl HostServices for Tweaked {
    fn claude_complete(
        &self,
        s: &StepScope,
        r: ClaudeRequest,
    ) -> Result<ClaudeResponse, ClaudeError> {
        self.inner.claude_complete(s, r)
    }
    fn publish(&self, s: &StepScope, t: &str, d: serde_json::Value) -> Result<u64, String> {
        self.inner.publish(s, t, d)
    }
    fn read_file(&self, s: &StepScope, f: &FileRef) -> Result<Vec<u8>, String> {
        self.inner.read_file(s, f)
    }
    fn write_file(&self, s: &StepScope, n: &str, c: &[u8]) -> Result<FileRef, String> {
        self.inner.write_file(s, n, c)
    }
    fn config_get(&self, _: &StepScope, _: &str) -> Option<String> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        None
    }
    fn state_get(&self, s: &StepScope, k: &str) -> Option<String> {
        self.inner.state_get(s, k)
    }
    fn state_set(&self, s: &StepScope, k: &str, v: serde_json::Value) -> Result<(), String> {
        self.inner.state_set(s, k, v)
    }
    fn render_template(
        &self,
        s: &StepScope,
        n: &str,
        v: serde_json::Value,
    ) -> Result<String, String> {
        self.inner.render_template(s, n, v)
    }
    fn stop_reason(&self) -> Option<String> {
        let after = self.stop_after?;
        (self.calls.load(Ordering::SeqCst) >= after).then(|| "its workflow was cancelled".into())
    }
    fn guest_determinism(&self, _: &StepScope) -> Option<GuestDeterminism> {
        self.determinism
    }
}

#[test]
fn a_step_that_must_stop_stops_at_its_next_host_call() -> anyhow::Result<()> {
    let fx = Fixture::new()?;
    let services = Arc::new(Tweaked {
        stop_after: Some(5),
        ..Tweaked::new(fx.host.clone())
    });
    let failure =
        run_echo_with(&fx, json!({"config_loop": u64::MAX}), services.clone()).unwrap_err();
    match &failure {
        StepFailure::Stopped { reason } => assert_eq!(reason, "its workflow was cancelled"),
        other => panic!("expected the step to be stopped, got {other:?}"),
    }
    assert_eq!(
        services.calls.load(Ordering::SeqCst),
        5,
        "not one call after the stop"
    );
    Ok(())
}

#[test]
fn shutdown_interrupts_guests_in_host_call_loops_and_in_wasm_loops() -> anyhow::Result<()> {
    let fx = Fixture::with(|c| {
        c.load.limits.defaults.cpu_time = Duration::from_secs(60);
        c.load.limits.defaults.host_calls = u32::MAX;
    })?;
    let echo = fx
        .runtime
        .load_file(&fx.install(bundled::ECHO_V1, "echo.wasm")?)?;
    let steps: Vec<_> = [
        json!({"config_loop": u64::MAX}),
        json!({"loop_forever": true}),
    ]
    .into_iter()
    .map(|params| {
        let (echo, services) = (echo.clone(), fx.services());
        std::thread::spawn(move || echo.run_step(&StepInput::new("echo", params), services))
    })
    .collect();
    std::thread::sleep(Duration::from_millis(300));
    fx.runtime.engine().interrupt_all();
    for step in steps {
        match step.join().unwrap() {
            Err(StepFailure::Stopped { reason }) => {
                assert_eq!(reason, "the daemon is shutting down")
            }
            other => panic!("expected the step to be stopped, got {other:?}"),
        }
    }
    // And nothing new starts.
    assert!(matches!(
        run_echo(&fx, json!({})),
        Err(StepFailure::Stopped { .. })
    ));
    Ok(())
}

#[test]
fn published_events_count_against_the_output_limit() -> anyhow::Result<()> {
    let fx = Fixture::new()?;
    let failure =
        run_echo(&fx, json!({"publish_count": 3000, "flood_bytes": 100_000})).unwrap_err();
    let what = limit_message(failure);
    assert!(
        what.contains("over its limit of 1048576 bytes (limits.output_bytes)"),
        "{what}"
    );
    let published = fx.host.published().len();
    assert!(
        published <= 10,
        "{published} events of 100 kB went past a 1 MiB limit"
    );
    Ok(())
}

#[test]
fn one_host_call_cannot_take_more_than_call_bytes() -> anyhow::Result<()> {
    let fx = Fixture::new()?;
    let failure = run_echo(&fx, json!({"log_count": 1, "flood_bytes": 5 << 20})).unwrap_err();
    let what = limit_message(failure);
    assert!(
        what.contains("logging.log was given 5242880 bytes"),
        "{what}"
    );
    assert!(what.contains("limits.call_bytes"), "{what}");
    Ok(())
}

#[test]
fn files_written_by_a_step_are_bounded_in_all() -> anyhow::Result<()> {
    let fx = Fixture::with(|c| c.load.limits.defaults.file_bytes = 8 << 20)?;
    let failure = run_echo(&fx, json!({"write_count": 3000, "flood_bytes": 1 << 20})).unwrap_err();
    let what = limit_message(failure);
    assert!(
        what.contains("what this step wrote with files.write reached"),
        "{what}"
    );
    assert!(what.contains("(limits.file_bytes)"), "{what}");
    Ok(())
}

#[test]
fn log_lines_past_the_log_limit_are_dropped_with_one_warning() -> anyhow::Result<()> {
    let fx = Fixture::new()?;
    run_echo(&fx, json!({"log_count": 100, "flood_bytes": 100_000}))?;
    let logs = fx.host.logs();
    let bytes: usize = logs.iter().map(|(_, l)| l.len()).sum();
    assert!(bytes <= (1 << 20) + 200, "{bytes} bytes of log lines kept");
    let warnings: Vec<_> = logs.iter().filter(|(l, _)| *l == LogLevel::Warn).collect();
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(warnings[0].1.contains("limits.log_bytes"));
    Ok(())
}

#[test]
fn a_second_file_claiming_a_loaded_name_and_version_is_refused_naming_both() -> anyhow::Result<()> {
    let fx = Fixture::new()?;
    let first = fx.install(bundled::ECHO_V1, "echo.wasm")?;
    let second = fx.install(bundled::ECHO_V1, "my-echo.wasm")?;
    let loaded = fx.runtime.load_dir();
    assert!(loaded[0].1.is_ok(), "{loaded:?}");
    match &loaded[1] {
        (p, Err(e @ PluginError::Duplicate { .. })) => {
            assert_eq!(p, &second);
            let text = e.to_string();
            assert!(text.contains("echo@0.1.0"), "{text}");
            assert!(text.contains(&first.display().to_string()), "{text}");
            assert!(text.contains(&second.display().to_string()), "{text}");
        }
        other => panic!("expected a duplicate, got {other:?}"),
    }
    // Removing the refused file leaves echo serving from its own file ...
    std::fs::remove_file(&second)?;
    assert!(fx.runtime.unload_file(&second).is_none());
    assert_eq!(fx.runtime.resolve("echo")?.path, first);
    // ... and had the first gone instead, the second would have taken over.
    let second = fx.install(bundled::ECHO_V1, "my-echo.wasm")?;
    assert!(fx.runtime.load_file(&second).is_err());
    std::fs::remove_file(&first)?;
    fx.runtime.unload_file(&first);
    assert_eq!(fx.runtime.resolve("echo")?.path, second);
    Ok(())
}

#[test]
fn a_failing_file_is_reported_once_per_content() -> anyhow::Result<()> {
    let fx = Fixture::new()?;
    let path = fx.plugins_dir().join("bad.wasm");
    std::fs::write(&path, b"not a plugin")?;
    for _ in 0..3 {
        assert!(fx.runtime.load_file(&path).is_err());
    }
    assert_eq!(fx.events.on("plugin.load_failed").len(), 1);
    std::fs::write(&path, b"still not a plugin")?;
    assert!(fx.runtime.load_file(&path).is_err());
    assert_eq!(fx.events.on("plugin.load_failed").len(), 2);
    Ok(())
}

#[test]
fn the_watcher_ignores_reads_and_reloads_only_changed_content() -> anyhow::Result<()> {
    let fx = Fixture::new()?;
    let _watcher = fx.runtime.watch()?;
    let echo = fx.plugins_dir().join("echo.wasm");
    replace_atomically(&echo, &std::fs::read(bundled::ECHO_V1)?)?;
    let bad = fx.plugins_dir().join("bad.wasm");
    std::fs::write(&bad, b"not a plugin")?;
    wait_for(Duration::from_secs(20), || {
        (fx.runtime.resolve("echo").is_ok() && !fx.events.on("plugin.load_failed").is_empty())
            .then_some(())
    })?;
    std::thread::sleep(Duration::from_millis(300));
    let reads = fx.runtime.files_read();
    // Reading the files (as a backup or a loader does) and touching their metadata is no
    // reason to load them again.
    for _ in 0..20 {
        std::fs::read(&echo)?;
        std::fs::read(&bad)?;
        std::fs::set_permissions(&bad, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    }
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        fx.runtime.files_read(),
        reads,
        "opening a file made the watcher load it"
    );
    assert_eq!(fx.events.on("plugin.load_failed").len(), 1);
    // A real change is loaded.
    std::fs::write(&bad, b"still not a plugin")?;
    wait_for(Duration::from_secs(20), || {
        (fx.events.on("plugin.load_failed").len() == 2).then_some(())
    })?;
    Ok(())
}

/// `plugin check` runs the daemon's checks and limits: a table within the documented limit
/// (100,000 elements) loads in both, and one over a configured limit is refused.
#[test]
fn plugin_check_and_the_daemon_agree_on_a_30000_element_table() -> anyhow::Result<()> {
    let report = crate::plugins::cli::check_file(std::path::Path::new(bundled::FAULT_BIG_TABLE))?;
    assert_eq!(report.summary.name, "big-table");
    let fx = Fixture::new()?;
    let plugin = fx
        .runtime
        .load_file(&fx.install(bundled::FAULT_BIG_TABLE, "big.wasm")?)?;
    let out = plugin.run_step(&StepInput::new("call", json!({})), fx.services())?;
    assert_eq!(out.result, json!(42));

    let strict = Fixture::with(|c| c.load.limits.defaults.table_elements = 10_000)?;
    let refused = strict
        .runtime
        .load_file(&strict.install(bundled::FAULT_BIG_TABLE, "big.wasm")?)
        .unwrap_err();
    assert!(matches!(refused, PluginError::Describe { .. }), "{refused}");
    Ok(())
}

/// A re-run of a step attempt sees the clocks and random numbers the first run saw.
#[test]
fn guests_see_clocks_and_randomness_derived_from_their_step_attempt() -> anyhow::Result<()> {
    let fx = Fixture::new()?;
    let run = |d: Option<GuestDeterminism>| -> anyhow::Result<serde_json::Value> {
        let services = Arc::new(Tweaked {
            determinism: d,
            ..Tweaked::new(fx.host.clone())
        });
        Ok(run_echo_with(&fx, json!({"clock_and_random": true}), services)?.result
            ["clock_and_random"]
            .clone())
    };
    let attempt = GuestDeterminism::for_attempt("wf_1", 3, 1, 1_765_000_000_000);
    let first = run(Some(attempt))?;
    let again = run(Some(attempt))?;
    assert_eq!(first, again, "a re-run saw other values");
    let wall_us = first["wall_us"].as_u64().unwrap();
    assert!(
        (1_765_000_000_000_000..1_765_000_001_000_000).contains(&wall_us),
        "the clock starts when the step was asked for: {first}"
    );
    // Another attempt (or step, or workflow) draws other numbers.
    let retry = run(Some(GuestDeterminism::for_attempt(
        "wf_1",
        3,
        2,
        1_765_000_000_000,
    )))?;
    assert_ne!(first["hashed"], retry["hashed"]);
    // Without a journal (a one-off `plugin run`), clocks and randomness are the real ones.
    assert_ne!(run(None)?["hashed"], run(None)?["hashed"]);
    Ok(())
}

#[test]
fn a_compile_bomb_is_refused_before_it_is_compiled() -> anyhow::Result<()> {
    let fx = Fixture::new()?;
    let path = fx.install(bundled::FAULT_COMPILE_BOMB, "bomb.wasm")?;
    let started = std::time::Instant::now();
    let error = fx.runtime.load_file(&path).unwrap_err();
    assert!(
        matches!(error, PluginError::TooLarge { limit: 200_000, .. }),
        "{error}"
    );
    assert!(
        error.to_string().contains("plugin_max_functions"),
        "{error}"
    );
    // Counting is all it costs: the same file again is not even counted.
    assert!(fx.runtime.load_file(&path).is_err());
    assert_eq!(fx.events.on("plugin.load_failed").len(), 1);
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "it was compiled"
    );
    Ok(())
}
