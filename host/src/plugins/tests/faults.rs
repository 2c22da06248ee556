//! Every way a plugin can be refused or a step can fail, each with the precise failure, and
//! each followed by proof that the host and the other plugins keep working.

use std::time::{Duration, Instant};

use serde_json::json;
use wasmtime::Trap;

use super::{Fixture, override_for, replace_atomically};
use crate::plugins::limits::LimitOverrides;
use crate::plugins::{PluginError, StepFailure, StepInput, bundled};

/// Load echo and check it still answers: the host survived whatever the test did.
fn echo_still_works(fx: &Fixture) -> anyhow::Result<()> {
    let echo = match fx.runtime.resolve("echo") {
        Ok(echo) => echo,
        Err(_) => fx
            .runtime
            .load_file(&fx.install(bundled::ECHO_V1, "echo.wasm")?)?,
    };
    let out = echo.run_step(
        &StepInput::new("echo", json!({"still": "alive"})),
        fx.services(),
    )?;
    assert_eq!(out.result["params"]["still"], "alive");
    Ok(())
}

fn load_bytes(fx: &Fixture, name: &str, bytes: &[u8]) -> PluginError {
    let path = fx.plugins_dir().join(name);
    std::fs::write(&path, bytes).unwrap();
    fx.runtime
        .load_file(&path)
        .expect_err("the file must be refused")
}

fn run_echo(
    fx: &Fixture,
    params: serde_json::Value,
) -> Result<crate::plugins::StepResult, StepFailure> {
    let echo = fx.runtime.resolve("echo").expect("echo is loaded");
    echo.run_step(&StepInput::new("echo", params), fx.services())
}

#[test]
fn garbage_bytes_are_refused_as_not_wasm() -> anyhow::Result<()> {
    let fx = Fixture::new()?;
    let err = load_bytes(&fx, "garbage.wasm", b"\x7fELF this is not a plugin");
    assert!(matches!(err, PluginError::NotWasm { .. }), "{err}");
    let failed = fx.events.on("plugin.load_failed");
    assert_eq!(failed.len(), 1);
    assert!(
        failed[0]["file"]
            .as_str()
            .unwrap()
            .ends_with("garbage.wasm")
    );
    assert!(
        failed[0]["error"]
            .as_str()
            .unwrap()
            .contains("not a WebAssembly file")
    );
    echo_still_works(&fx)
}

#[test]
fn truncated_component_is_refused_as_invalid() -> anyhow::Result<()> {
    let fx = Fixture::new()?;
    let bytes = std::fs::read(bundled::ECHO_V1)?;
    let err = load_bytes(&fx, "truncated.wasm", &bytes[..bytes.len() / 2]);
    match &err {
        PluginError::Invalid { reason, .. } => {
            assert!(
                reason.contains("the file is truncated or corrupt"),
                "{reason}"
            )
        }
        other => panic!("expected Invalid, got {other}"),
    }
    assert!(err.to_string().contains("truncated.wasm"));
    echo_still_works(&fx)
}

#[test]
fn core_module_is_refused_with_a_build_hint() -> anyhow::Result<()> {
    let fx = Fixture::new()?;
    // The smallest valid core module: magic + version 1.
    let err = load_bytes(&fx, "core.wasm", b"\0asm\x01\0\0\0");
    assert!(matches!(err, PluginError::CoreModule { .. }), "{err}");
    assert!(err.to_string().contains("wasm32-wasip2"));
    echo_still_works(&fx)
}

#[test]
fn component_of_another_world_is_refused_as_wrong_world() -> anyhow::Result<()> {
    let fx = Fixture::new()?;
    let err = load_bytes(&fx, "command.wasm", &std::fs::read(bundled::NOT_A_PLUGIN)?);
    match &err {
        PluginError::WrongWorld { reason, .. } => {
            assert!(
                reason.contains("does not export ksi:plugin/handler"),
                "{reason}"
            );
            assert!(reason.contains("wasi:cli/run"), "{reason}");
        }
        other => panic!("expected WrongWorld, got {other}"),
    }
    echo_still_works(&fx)
}

#[test]
fn plugin_built_for_another_wit_major_is_refused_by_version() -> anyhow::Result<()> {
    let fx = Fixture::new()?;
    // Echo, relabelled as built for ksi:plugin@2.0.0 (same length, so still a valid binary).
    let bytes = relabel_contract(&std::fs::read(bundled::ECHO_V1)?, b"2.0.0");
    let err = load_bytes(&fx, "future.wasm", &bytes);
    assert!(matches!(err, PluginError::IncompatibleWit { .. }), "{err}");
    let message = err.to_string();
    assert!(
        message.contains(
            "was built for ksi:plugin@2.0.0; this host speaks 0.1.x — rebuild it with ksi-sdk 0.1.x"
        ),
        "{message}"
    );
    echo_still_works(&fx)
}

/// Rewrite every `ksi:plugin/...@0.1.0` name in a component to another version of the same
/// length, as if the plugin had been built against that version of the contract.
fn relabel_contract(bytes: &[u8], version: &[u8; 5]) -> Vec<u8> {
    let mut bytes = bytes.to_vec();
    let mut i = 0;
    while let Some(pos) = find(&bytes[i..], b"ksi:plugin/") {
        let start = i + pos;
        let window = &bytes[start..(start + 40).min(bytes.len())];
        if let Some(at) = find(window, b"@0.1.0") {
            bytes[start + at + 1..start + at + 6].copy_from_slice(version);
        }
        i = start + 1;
    }
    bytes
}

#[test]
fn plugin_built_for_a_newer_patch_of_the_contract_loads() -> anyhow::Result<()> {
    let fx = Fixture::new()?;
    let path = fx.plugins_dir().join("echo.wasm");
    std::fs::write(
        &path,
        relabel_contract(&std::fs::read(bundled::ECHO_V1)?, b"0.1.9"),
    )?;
    let echo = fx.runtime.load_file(&path)?;
    assert_eq!(echo.wit_version, "0.1.9");
    let out = echo.run_step(
        &StepInput::new("echo", json!({"claude_prompt": "hi"})),
        fx.services(),
    )?;
    assert_eq!(out.result["version"], "0.1.0");
    Ok(())
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[test]
fn failure_in_describe_is_a_load_failure() -> anyhow::Result<()> {
    // describe() runs under the default limits; 64 KiB cannot hold a Rust guest's memory.
    let fx = Fixture::with(|c| c.load.limits.defaults.memory_bytes = 64 << 10)?;
    let path = fx.install(bundled::ECHO_V1, "echo.wasm")?;
    let err = fx.runtime.load_file(&path).unwrap_err();
    match &err {
        PluginError::Describe { failure, .. } => {
            assert!(
                matches!(**failure, StepFailure::OutOfMemory { limit: 65536, .. }),
                "{failure}"
            )
        }
        other => panic!("expected Describe, got {other}"),
    }
    assert!(fx.runtime.registry().list().is_empty());
    Ok(())
}

#[test]
fn compile_timeout_is_a_load_failure() -> anyhow::Result<()> {
    let fx = Fixture::with(|c| {
        c.cache_dir = None;
        c.load.compile_timeout = Duration::from_micros(1);
    })?;
    let path = fx.install(bundled::DEBATE, "debate.wasm")?;
    let err = fx.runtime.load_file(&path).unwrap_err();
    assert!(matches!(err, PluginError::CompileTimeout { .. }), "{err}");
    assert!(fx.runtime.resolve("debate").is_err());
    Ok(())
}

#[test]
fn infinite_loop_is_stopped_by_the_cpu_limit_as_a_timeout() -> anyhow::Result<()> {
    let fx = Fixture::with(|c| {
        override_for(
            c,
            "echo",
            LimitOverrides {
                cpu_time: Some(Duration::from_millis(200)),
                ..Default::default()
            },
        )
    })?;
    fx.runtime
        .load_file(&fx.install(bundled::ECHO_V1, "echo.wasm")?)?;
    let start = Instant::now();
    let err = run_echo(&fx, json!({"loop_forever": true})).unwrap_err();
    assert!(
        matches!(err, StepFailure::Timeout { limit } if limit == Duration::from_millis(200)),
        "{err}"
    );
    // A guard against a limit applied in the wrong unit (which would still end the loop, much
    // later), not a speed check: how fast the limit fires is measured by `bench plugin`.
    assert!(
        start.elapsed() < Duration::from_secs(30),
        "a 200 ms CPU limit stopped the loop only after {:?}",
        start.elapsed()
    );
    assert!(!err.is_retryable());
    echo_still_works(&fx)
}

#[test]
fn time_spent_in_host_calls_does_not_count_against_the_cpu_limit() -> anyhow::Result<()> {
    use crate::plugins::host_impl::{HostServices, StepScope};
    use crate::plugins::{ClaudeError, ClaudeRequest, ClaudeResponse, FileRef, MemoryHost};

    /// A Claude that takes 400 ms to answer.
    struct SlowClaude(std::sync::Arc<MemoryHost>);
    impl HostServices for SlowClaude {
        fn claude_complete(
            &self,
            s: &StepScope,
            r: ClaudeRequest,
        ) -> Result<ClaudeResponse, ClaudeError> {
            std::thread::sleep(Duration::from_millis(400));
            self.0.claude_complete(s, r)
        }
        fn publish(&self, s: &StepScope, t: &str, d: serde_json::Value) -> Result<u64, String> {
            self.0.publish(s, t, d)
        }
        fn read_file(&self, s: &StepScope, f: &FileRef) -> Result<Vec<u8>, String> {
            self.0.read_file(s, f)
        }
        fn write_file(&self, s: &StepScope, n: &str, c: &[u8]) -> Result<FileRef, String> {
            self.0.write_file(s, n, c)
        }
        fn config_get(&self, s: &StepScope, k: &str) -> Option<String> {
            self.0.config_get(s, k)
        }
        fn state_get(&self, s: &StepScope, k: &str) -> Option<String> {
            self.0.state_get(s, k)
        }
        fn state_set(&self, s: &StepScope, k: &str, v: serde_json::Value) -> Result<(), String> {
            self.0.state_set(s, k, v)
        }
        fn render_template(
            &self,
            s: &StepScope,
            n: &str,
            v: serde_json::Value,
        ) -> Result<String, String> {
            self.0.render_template(s, n, v)
        }
    }

    let fx = Fixture::with(|c| {
        override_for(
            c,
            "echo",
            LimitOverrides {
                cpu_time: Some(Duration::from_millis(100)),
                ..Default::default()
            },
        )
    })?;
    let echo = fx
        .runtime
        .load_file(&fx.install(bundled::ECHO_V1, "echo.wasm")?)?;
    let slow = std::sync::Arc::new(SlowClaude(fx.host.clone()));
    let out = echo.run_step(
        &StepInput::new("echo", json!({"claude_prompt": "take your time"})),
        slow,
    )?;
    assert!(
        out.result["claude"]
            .as_str()
            .unwrap()
            .contains("take your time")
    );
    assert!(
        out.guest_time < Duration::from_millis(100),
        "{:?}",
        out.guest_time
    );
    Ok(())
}

#[test]
fn allocating_beyond_the_memory_limit_is_out_of_memory() -> anyhow::Result<()> {
    let fx = Fixture::with(|c| {
        override_for(
            c,
            "echo",
            LimitOverrides {
                memory_bytes: Some(32 << 20),
                ..Default::default()
            },
        )
    })?;
    fx.runtime
        .load_file(&fx.install(bundled::ECHO_V1, "echo.wasm")?)?;
    let err = run_echo(&fx, json!({"alloc_mb": 100})).unwrap_err();
    match err {
        StepFailure::OutOfMemory { limit, requested } => {
            assert_eq!(limit, 32 << 20);
            assert!(requested > limit);
        }
        other => panic!("expected OutOfMemory, got {other}"),
    }
    // Within the limit is fine.
    let out = run_echo(&fx, json!({"alloc_mb": 8}))?;
    assert_eq!(out.result["allocated"], 8 << 20);
    echo_still_works(&fx)
}

#[test]
fn panic_is_reported_as_an_unreachable_trap_with_its_message() -> anyhow::Result<()> {
    let fx = Fixture::new()?;
    fx.runtime
        .load_file(&fx.install(bundled::ECHO_V1, "echo.wasm")?)?;
    let err = run_echo(&fx, json!({"panic": "the plugin gave up"})).unwrap_err();
    match &err {
        StepFailure::Trap { trap, detail } => {
            assert_eq!(*trap, Trap::UnreachableCodeReached);
            assert!(detail.contains("the plugin gave up"), "{detail}");
        }
        other => panic!("expected Trap, got {other}"),
    }
    echo_still_works(&fx)
}

#[test]
fn runaway_recursion_is_a_stack_overflow_trap() -> anyhow::Result<()> {
    let fx = Fixture::new()?;
    fx.runtime
        .load_file(&fx.install(bundled::ECHO_V1, "echo.wasm")?)?;
    let err = run_echo(&fx, json!({"recurse": 100_000_000u64})).unwrap_err();
    assert!(
        matches!(
            err,
            StepFailure::Trap {
                trap: Trap::StackOverflow,
                ..
            }
        ),
        "{err}"
    );
    // Shallow recursion is fine.
    let out = run_echo(&fx, json!({"recurse": 1000}))?;
    assert_eq!(out.result["depth"], 500_500);
    echo_still_works(&fx)
}

#[test]
fn huge_output_is_refused_as_too_large() -> anyhow::Result<()> {
    let fx = Fixture::new()?;
    fx.runtime
        .load_file(&fx.install(bundled::ECHO_V1, "echo.wasm")?)?;
    let err = run_echo(&fx, json!({"huge_output_mb": 4})).unwrap_err();
    match err {
        StepFailure::OutputTooLarge { bytes, limit } => {
            assert!(bytes > 4 << 20);
            assert_eq!(limit, 1 << 20);
        }
        other => panic!("expected OutputTooLarge, got {other}"),
    }
    echo_still_works(&fx)
}

#[test]
fn files_and_environment_variables_that_were_not_granted_are_invisible() -> anyhow::Result<()> {
    let fx = Fixture::new()?;
    fx.runtime
        .load_file(&fx.install(bundled::ECHO_V1, "echo.wasm")?)?;
    // SAFETY: tests in this module do not read this variable concurrently.
    unsafe { std::env::set_var("KSI_TEST_SECRET", "hunter2") };
    let secret_file = fx.dir.path().join("secret.txt");
    std::fs::write(&secret_file, "hunter2")?;
    let out = run_echo(
        &fx,
        json!({"read_file": secret_file.display().to_string(), "env_var": "KSI_TEST_SECRET"}),
    )?;
    let read = &out.result["read_file"];
    assert!(
        read.get("ok").is_none(),
        "the plugin read a file it was not granted: {read}"
    );
    assert!(
        read["error"]
            .as_str()
            .unwrap()
            .contains("No such file or directory"),
        "{read}"
    );
    assert_eq!(
        out.result["env_var"]["error"],
        "environment variable not found"
    );
    assert_eq!(out.result["env_count"], 0);
    Ok(())
}

#[test]
fn a_granted_directory_is_readable() -> anyhow::Result<()> {
    let shared = tempfile::tempdir()?;
    std::fs::write(shared.path().join("note.txt"), "granted")?;
    let host_path = shared.path().to_path_buf();
    let fx = Fixture::with(move |c| {
        c.load.grants.insert(
            "echo".into(),
            vec![crate::plugins::step::DirGrant {
                host_path,
                guest_path: "/shared".into(),
            }],
        );
    })?;
    fx.runtime
        .load_file(&fx.install(bundled::ECHO_V1, "echo.wasm")?)?;
    let out = run_echo(&fx, json!({"read_file": "/shared/note.txt"}))?;
    assert_eq!(out.result["read_file"]["ok"], "granted");
    Ok(())
}

#[test]
fn step_error_from_the_plugin_keeps_its_kind() -> anyhow::Result<()> {
    let fx = Fixture::new()?;
    fx.runtime
        .load_file(&fx.install(bundled::ECHO_V1, "echo.wasm")?)?;
    let err = run_echo(&fx, json!({"fail": "try later"})).unwrap_err();
    assert!(
        matches!(&err, StepFailure::Failed { retryable: true, message } if message == "try later"),
        "{err}"
    );
    assert!(err.is_retryable());
    let err = run_echo(&fx, json!({"sleep_ms": "not a number"})).unwrap_err();
    assert!(
        matches!(&err, StepFailure::Failed { retryable: false, message } if message.contains("invalid params")),
        "{err}"
    );
    Ok(())
}

#[test]
fn unknown_step_is_refused_before_running() -> anyhow::Result<()> {
    let fx = Fixture::new()?;
    let echo = fx
        .runtime
        .load_file(&fx.install(bundled::ECHO_V1, "echo.wasm")?)?;
    let err = echo
        .run_step(&StepInput::new("opening", json!({})), fx.services())
        .unwrap_err();
    assert!(matches!(err, StepFailure::UnknownStep { .. }), "{err}");
    assert!(
        err.to_string()
            .contains("echo@0.1.0 has no step \"opening\" (it handles: echo)")
    );
    Ok(())
}

#[test]
fn bad_file_over_a_good_one_leaves_the_good_version_serving() -> anyhow::Result<()> {
    let fx = Fixture::new()?;
    let path = fx.install(bundled::ECHO_V1, "echo.wasm")?;
    let good = fx.runtime.load_file(&path)?;
    let bytes = std::fs::read(bundled::ECHO_V2)?;
    replace_atomically(&path, &bytes[..bytes.len() - 100])?;
    let err = fx.runtime.load_file(&path).unwrap_err();
    assert!(matches!(err, PluginError::Invalid { .. }), "{err}");
    let serving = fx.runtime.resolve("echo")?;
    assert!(std::sync::Arc::ptr_eq(&serving, &good));
    let failed = fx.events.on("plugin.load_failed");
    assert_eq!(failed[0]["still_serving"], "echo@0.1.0");
    echo_still_works(&fx)
}
