//! Hot reload of a running host: swap, unload, bad files; in-flight steps are never disturbed.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde_json::json;

use super::{Fixture, replace_atomically, wait_for};
use crate::plugins::{PluginError, StepInput, bundled};

const WAIT: Duration = Duration::from_secs(20);

fn serving_version(fx: &Fixture) -> Option<String> {
    fx.runtime
        .resolve("echo")
        .ok()
        .map(|p| p.version.to_string())
}

#[test]
fn replacing_echo_while_steps_run_finishes_old_steps_on_old_version() -> anyhow::Result<()> {
    let fx = Fixture::new()?;
    let _watcher = fx.runtime.watch()?;
    let path = fx.plugins_dir().join("echo.wasm");
    replace_atomically(&path, &std::fs::read(bundled::ECHO_V1)?)?;
    wait_for(WAIT, || serving_version(&fx).filter(|v| v == "0.1.0"))?;

    // Three slow steps start on 0.1.0 ...
    let in_flight: Vec<_> = (0..3)
        .map(|i| {
            let plugin = fx.runtime.resolve("echo").unwrap();
            let services = fx.services();
            std::thread::spawn(move || {
                plugin.run_step(
                    &StepInput::new("echo", json!({"sleep_ms": 600, "i": i})),
                    services,
                )
            })
        })
        .collect();
    // ... while a client keeps starting short steps on whatever version serves.
    let stop = Arc::new(AtomicBool::new(false));
    let client = {
        let (runtime, services, stop) = (fx.runtime.clone(), fx.services(), stop.clone());
        std::thread::spawn(move || -> anyhow::Result<Vec<String>> {
            let mut seen = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                let plugin = runtime.resolve("echo")?;
                let out = plugin.run_step(&StepInput::new("echo", json!({})), services.clone())?;
                seen.push(out.result["version"].as_str().unwrap().to_string());
            }
            Ok(seen)
        })
    };

    std::thread::sleep(Duration::from_millis(100));
    replace_atomically(&path, &std::fs::read(bundled::ECHO_V2)?)?;
    wait_for(WAIT, || serving_version(&fx).filter(|v| v == "0.2.0"))?;

    for step in in_flight {
        let out = step.join().unwrap()?;
        assert_eq!(
            out.result["version"], "0.1.0",
            "an in-flight step changed version"
        );
    }
    let out = fx
        .runtime
        .resolve("echo")?
        .run_step(&StepInput::new("echo", json!({})), fx.services())?;
    assert_eq!(out.result["version"], "0.2.0");

    stop.store(true, Ordering::SeqCst);
    let seen = client.join().unwrap()?;
    assert!(!seen.is_empty());
    let switch = seen.iter().position(|v| v == "0.2.0").unwrap_or(seen.len());
    assert!(
        seen[..switch].iter().all(|v| v == "0.1.0"),
        "versions went back and forth: {seen:?}"
    );
    assert!(
        seen[switch..].iter().all(|v| v == "0.2.0"),
        "versions went back and forth: {seen:?}"
    );

    let loaded = fx.events.on("plugin.loaded");
    assert_eq!(loaded.last().unwrap()["replaces"], json!(["echo@0.1.0"]));
    let unloaded = fx.events.on("plugin.unloaded");
    assert_eq!(unloaded.len(), 1);
    assert_eq!(unloaded[0]["version"], "0.1.0");
    assert!(fx.events.on("plugin.load_failed").is_empty());
    Ok(())
}

#[test]
fn deleting_a_plugin_unloads_it_after_its_running_steps_finish() -> anyhow::Result<()> {
    let fx = Fixture::new()?;
    let _watcher = fx.runtime.watch()?;
    let path = fx.plugins_dir().join("echo.wasm");
    replace_atomically(&path, &std::fs::read(bundled::ECHO_V1)?)?;
    wait_for(WAIT, || serving_version(&fx))?;

    let plugin = fx.runtime.resolve("echo")?;
    let services = fx.services();
    let running = std::thread::spawn(move || {
        plugin.run_step(&StepInput::new("echo", json!({"sleep_ms": 500})), services)
    });
    std::thread::sleep(Duration::from_millis(50));
    std::fs::remove_file(&path)?;
    wait_for(WAIT, || {
        matches!(
            fx.runtime.resolve("echo"),
            Err(PluginError::NotFound { .. })
        )
        .then_some(())
    })?;
    let out = running.join().unwrap()?;
    assert_eq!(out.result["version"], "0.1.0");
    let unloaded = fx.events.on("plugin.unloaded");
    assert_eq!(unloaded.len(), 1);
    assert_eq!(unloaded[0]["reason"], "file removed");
    Ok(())
}

#[test]
fn bad_file_dropped_over_a_watched_good_one_keeps_the_good_version() -> anyhow::Result<()> {
    let fx = Fixture::new()?;
    let _watcher = fx.runtime.watch()?;
    let path = fx.plugins_dir().join("echo.wasm");
    replace_atomically(&path, &std::fs::read(bundled::ECHO_V1)?)?;
    wait_for(WAIT, || serving_version(&fx))?;

    replace_atomically(&path, b"garbage")?;
    let failed = wait_for(WAIT, || fx.events.on("plugin.load_failed").pop())?;
    assert!(
        failed["error"]
            .as_str()
            .unwrap()
            .contains("not a WebAssembly file")
    );
    assert_eq!(failed["still_serving"], "echo@0.1.0");
    assert_eq!(serving_version(&fx).as_deref(), Some("0.1.0"));
    let out = fx
        .runtime
        .resolve("echo")?
        .run_step(&StepInput::new("echo", json!({})), fx.services())?;
    assert_eq!(out.result["version"], "0.1.0");

    // A good file afterwards is picked up again.
    replace_atomically(&path, &std::fs::read(bundled::ECHO_V2)?)?;
    wait_for(WAIT, || serving_version(&fx).filter(|v| v == "0.2.0"))?;
    Ok(())
}

#[test]
fn a_new_plugin_dropped_into_the_directory_is_loaded() -> anyhow::Result<()> {
    let fx = Fixture::new()?;
    let _watcher = fx.runtime.watch()?;
    std::fs::copy(bundled::SUMMARIZE, fx.plugins_dir().join("summarize.wasm"))?;
    let plugin = wait_for(WAIT, || fx.runtime.resolve("summarize").ok())?;
    assert_eq!(plugin.info.steps[0].name, "summarize");
    Ok(())
}
