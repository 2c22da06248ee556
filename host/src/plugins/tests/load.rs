//! Loading, describing, running; semver lookup; the compiled-code cache; CLI functions.

use serde_json::{Value, json};

use super::Fixture;
use crate::plugins::bundled;
use crate::plugins::cli::{self, SdkSource};
use crate::plugins::step::merge_patch;
use crate::plugins::{PluginError, StepInput};

#[test]
fn echo_loads_describes_itself_and_runs() -> anyhow::Result<()> {
    let fx = Fixture::new()?;
    let path = fx.install(bundled::ECHO_V1, "echo.wasm")?;
    let plugin = fx.runtime.load_file(&path)?;
    assert_eq!(plugin.info.name, "echo");
    assert_eq!(plugin.version.to_string(), "0.1.0");
    assert_eq!(plugin.info.steps[0].name, "echo");
    assert_eq!(plugin.wit_version, "0.1.0");

    let out = plugin.run_step(&StepInput::new("echo", json!({"x": 1})), fx.services())?;
    assert_eq!(out.result["version"], "0.1.0");
    assert_eq!(out.result["params"], json!({"x": 1}));
    assert_eq!(out.state_patch, json!({"echoed_by": "0.1.0"}));

    let loaded = fx.events.on("plugin.loaded");
    assert_eq!(loaded.len(), 1);
    assert_eq!(loaded[0]["name"], "echo");
    assert_eq!(loaded[0]["version"], "0.1.0");
    Ok(())
}

#[test]
fn echo_calls_claude_through_the_host() -> anyhow::Result<()> {
    let fx = Fixture::new()?;
    let plugin = fx
        .runtime
        .load_file(&fx.install(bundled::ECHO_V1, "echo.wasm")?)?;
    let out = plugin.run_step(
        &StepInput::new("echo", json!({"claude_prompt": "Say hi"})),
        fx.services(),
    )?;
    assert!(
        out.result["claude"]
            .as_str()
            .unwrap()
            .contains("[simulated answer #1 from echo] Say hi")
    );
    assert_eq!(fx.host.claude_requests()[0].agent.as_deref(), Some("echo"));
    assert!(
        fx.host
            .logs()
            .iter()
            .any(|(_, m)| m.contains("claude answered"))
    );
    Ok(())
}

#[test]
fn debate_runs_every_step_and_debaters_keep_their_sessions() -> anyhow::Result<()> {
    let fx = Fixture::new()?;
    let plugin = fx
        .runtime
        .load_file(&fx.install(bundled::DEBATE, "debate.wasm")?)?;
    let steps: Vec<_> = plugin.info.steps.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(steps, ["opening", "rebuttal", "closing", "judge"]);

    let mut state = json!({});
    let mut step = "opening".to_string();
    let mut params = json!({"topic": "Tabs beat spaces", "rounds": 2});
    let mut ran = Vec::new();
    for index in 0..10 {
        let input = StepInput {
            workflow_id: "wf-1".into(),
            workflow_type: "debate".into(),
            step: step.clone(),
            step_index: index,
            attempt: 1,
            params: params.to_string(),
            state: state.to_string(),
        };
        let out = plugin.run_step(&input, fx.services())?;
        merge_patch(&mut state, &out.state_patch);
        ran.push(step.clone());
        params = json!({});
        match out.next_step {
            Some(next) => step = next,
            None => {
                assert!(
                    out.result["verdict"]
                        .as_str()
                        .unwrap()
                        .contains("simulated")
                );
                break;
            }
        }
    }
    assert_eq!(ran, ["opening", "rebuttal", "rebuttal", "closing", "judge"]);

    // Both sides were asked together at every exchange, and each resumed its own session.
    let requests = fx.host.claude_requests();
    assert_eq!(requests.len(), 2 * 4 + 1);
    let pro: Vec<_> = requests
        .iter()
        .filter(|r| r.agent.as_deref() == Some("debate-wf-1-pro"))
        .collect();
    assert_eq!(pro.len(), 4);
    assert_eq!(pro[0].session, None);
    let first_session = pro[1]
        .session
        .clone()
        .expect("rebuttal resumes the opening session");
    assert!(
        pro[2..]
            .iter()
            .all(|r| r.session.as_ref() == Some(&first_session))
    );
    assert_eq!(state["debate"]["transcript"].as_array().unwrap().len(), 8);
    Ok(())
}

#[test]
fn summarize_reads_a_file_reference_and_writes_its_summary() -> anyhow::Result<()> {
    let fx = Fixture::new()?;
    let plugin = fx
        .runtime
        .load_file(&fx.install(bundled::SUMMARIZE, "summarize.wasm")?)?;
    let file = fx.host.put_file(
        "prompts/archive/essay.txt",
        b"A long essay about WebAssembly.",
    );
    let mut input = StepInput::new(
        "summarize",
        json!({"file": {"path": file.path, "sha256": file.sha256, "bytes": file.bytes}, "max_words": 10}),
    );
    input.workflow_id = "wf-2".into();
    let out = plugin.run_step(&input, fx.services())?;
    assert!(
        out.result["summary"]
            .as_str()
            .unwrap()
            .contains("A long essay")
    );
    assert_eq!(
        out.result["summary_ref"]["path"],
        "state/workflows/wf-2/summary.md"
    );
    Ok(())
}

#[test]
fn lookup_picks_the_highest_version_matching_the_requirement() -> anyhow::Result<()> {
    let fx = Fixture::new()?;
    fx.runtime
        .load_file(&fx.install(bundled::ECHO_V1, "echo-a.wasm")?)?;
    fx.runtime
        .load_file(&fx.install(bundled::ECHO_V2, "echo-b.wasm")?)?;
    let version =
        |r: &str| -> anyhow::Result<String> { Ok(fx.runtime.resolve(r)?.version.to_string()) };
    assert_eq!(version("echo")?, "0.2.0");
    assert_eq!(version("echo@^0.1")?, "0.1.0");
    assert_eq!(version("echo@>=0.1.0")?, "0.2.0");
    assert_eq!(version("echo@=0.1.0")?, "0.1.0");
    match fx.runtime.resolve("echo@^0.3") {
        Err(PluginError::NoMatchingVersion { loaded, .. }) => assert_eq!(loaded, "0.1.0, 0.2.0"),
        other => panic!("expected NoMatchingVersion, got {other:?}"),
    }
    assert!(matches!(
        fx.runtime.resolve("debate"),
        Err(PluginError::NotFound { .. })
    ));
    assert!(matches!(
        fx.runtime.resolve("echo@!!"),
        Err(PluginError::BadReference { .. })
    ));
    assert_eq!(fx.runtime.list().len(), 2);
    Ok(())
}

#[test]
fn restart_loads_compiled_code_from_the_cache() -> anyhow::Result<()> {
    let fx = Fixture::new()?;
    let path = fx.install(bundled::ECHO_V1, "echo.wasm")?;
    let first = fx.runtime.load_file(&path)?;
    assert!(!first.from_cache);
    let cached = std::fs::read_dir(fx.dir.path().join("cache"))?.count();
    assert_eq!(cached, 1, "one cache entry, no temp files left behind");

    // A second runtime on the same data directory: a restart.
    let restarted = crate::plugins::PluginRuntime::new(
        fx.runtime.config().clone(),
        fx.services(),
        fx.events.clone(),
    )?;
    let again = restarted.load_file(&path)?;
    assert!(again.from_cache);
    let out = again.run_step(&StepInput::new("echo", json!({})), fx.services())?;
    assert_eq!(out.result["version"], "0.1.0");
    Ok(())
}

#[test]
fn corrupt_cache_entry_is_recompiled() -> anyhow::Result<()> {
    let fx = Fixture::new()?;
    let path = fx.install(bundled::ECHO_V1, "echo.wasm")?;
    let first = fx.runtime.load_file(&path)?;
    let entry = std::fs::read_dir(fx.dir.path().join("cache"))?
        .next()
        .unwrap()?
        .path();
    let mut bytes = std::fs::read(&entry)?;
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&entry, bytes)?;
    drop(first);
    let restarted = crate::plugins::PluginRuntime::new(
        fx.runtime.config().clone(),
        fx.services(),
        fx.events.clone(),
    )?;
    let again = restarted.load_file(&path)?;
    assert!(!again.from_cache, "a corrupt entry must not be used");
    Ok(())
}

#[test]
fn plugin_check_describes_a_good_file_and_names_the_problem_in_a_bad_one() -> anyhow::Result<()> {
    let report = cli::check_file(std::path::Path::new(bundled::DEBATE))?;
    assert_eq!(report.summary.name, "debate");
    assert!(report.step_details[0].params_schema.is_some());

    let dir = tempfile::tempdir()?;
    let bad = dir.path().join("bad.wasm");
    std::fs::write(&bad, b"not wasm at all")?;
    let err = cli::check_file(&bad).unwrap_err();
    assert!(matches!(err, PluginError::NotWasm { .. }));
    assert!(err.to_string().contains("bad.wasm"));
    Ok(())
}

#[test]
fn run_step_file_runs_one_step_with_json_input() -> anyhow::Result<()> {
    let out = cli::run_step_file(
        std::path::Path::new(bundled::ECHO_V2),
        &StepInput::new("echo", json!({"hello": "world"})),
        None,
    )?;
    assert_eq!(out.result["version"], "0.2.0");
    assert_eq!(out.result["params"]["hello"], "world");
    Ok(())
}

#[test]
fn plugins_list_shows_name_version_steps_file_and_hash() -> anyhow::Result<()> {
    let fx = Fixture::new()?;
    fx.runtime
        .load_file(&fx.install(bundled::DEBATE, "debate.wasm")?)?;
    let list = fx.runtime.list();
    let table = cli::list_table(&list);
    for needle in [
        "debate",
        "0.1.0",
        "opening, rebuttal, closing, judge",
        "debate.wasm",
    ] {
        assert!(table.contains(needle), "{needle} missing from\n{table}");
    }
    assert!(table.contains(&list[0].sha256[..12]));
    Ok(())
}

/// `ksi plugin new` → cargo build → a component that loads and runs. Builds into
/// `target/plugins`, sharing the bundled plugins' dependencies, so it takes seconds.
#[test]
fn scaffolded_plugin_builds_into_a_component_that_loads() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let sdk = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../sdk");
    let root = cli::scaffold_plugin(dir.path(), "hello-world", &SdkSource::Path(sdk))?;
    let target = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/plugins");
    let status = std::process::Command::new(env!("CARGO"))
        .args([
            "build",
            "--release",
            "--target",
            "wasm32-wasip2",
            "--target-dir",
        ])
        .arg(&target)
        .current_dir(&root)
        .status()?;
    assert!(status.success());
    let wasm = target.join("wasm32-wasip2/release/hello_world.wasm");
    let report = cli::check_file(&wasm)?;
    assert_eq!(report.summary.name, "hello-world");
    let out = cli::run_step_file(
        &wasm,
        &crate::plugins::StepInput::new("greet", json!({"name": "Ada"})),
        None,
    )?;
    assert!(out.result["greeting"].as_str().unwrap().contains("Ada"));
    let _: Value = out.state_patch;
    Ok(())
}

#[test]
fn bench_reports_every_number() -> anyhow::Result<()> {
    let report = crate::plugins::bench::try_bench_plugins()?;
    println!("{report:#}");
    for key in [
        "instantiate_call_p50_us",
        "hot_call_p50_us",
        "reload_ms",
        "reload_cold_ms",
        "idle_cpu_pct_with_200mb_plugin",
        "rss_before_bomb_mb",
        "rss_after_bomb_mb",
    ] {
        assert!(report[key].as_f64().is_some(), "{key} missing: {report}");
    }
    assert!(report["bomb_refused_by"].is_string(), "{report}");
    for plugin in ["echo", "debate", "summarize"] {
        assert!(report["cold_load_ms"][plugin].as_f64().is_some());
        assert!(report["cached_load_ms"][plugin].as_f64().is_some());
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steps_run_from_async_code_on_blocking_threads() -> anyhow::Result<()> {
    let fx = Fixture::new()?;
    let path = fx.install(bundled::ECHO_V1, "echo.wasm")?;
    let runtime = fx.runtime.clone();
    let echo = tokio::task::spawn_blocking(move || runtime.load_file(&path)).await??;
    // WASI calls (clocks, files) from inside a tokio runtime must not deadlock or panic.
    let input = StepInput::new("echo", json!({"sleep_ms": 5, "read_file": "/etc/hostname"}));
    let (a, b) = tokio::join!(
        fx.runtime.run_step(echo.clone(), input.clone(), None),
        fx.runtime.run_step(echo, input, None),
    );
    assert_eq!(a?.result["version"], "0.1.0");
    assert!(b?.result["read_file"]["error"].is_string());
    Ok(())
}

#[test]
fn on_demand_allocator_runs_steps_too() -> anyhow::Result<()> {
    let fx = Fixture::with(|c| c.engine.pooling = false)?;
    assert_eq!(
        fx.runtime.engine().allocator(),
        crate::plugins::AllocatorKind::OnDemand
    );
    let echo = fx
        .runtime
        .load_file(&fx.install(bundled::ECHO_V1, "echo.wasm")?)?;
    let out = echo.run_step(&StepInput::new("echo", json!({})), fx.services())?;
    assert_eq!(out.result["version"], "0.1.0");
    Ok(())
}

/// The fenced code blocks of `markdown` whose info string is `lang`.
fn fenced<'a>(markdown: &'a str, lang: &str) -> Vec<&'a str> {
    let open = format!("```{lang}\n");
    let mut blocks = Vec::new();
    let mut rest = markdown;
    while let Some(start) = rest.find(&open) {
        let body = &rest[start + open.len()..];
        let end = body.find("\n```").expect("a fenced block is closed");
        blocks.push(&body[..end + 1]);
        rest = &body[end + 4..];
    }
    blocks
}

/// `docs/plugins.md`'s Rust example builds into a component that loads and runs, and its TOML
/// examples (a workflow definition, plugin limits in `ksi.toml`) are what KSI accepts.
#[test]
fn the_plugin_guide_examples_build_load_and_run() -> anyhow::Result<()> {
    let guide = include_str!("../../../../docs/plugins.md");
    let rust = fenced(guide, "rust");
    assert_eq!(
        rust.len(),
        1,
        "the guide's Rust blocks changed: test each one"
    );
    let dir = tempfile::tempdir()?;
    let sdk = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../sdk");
    let root = cli::scaffold_plugin(dir.path(), "shout", &SdkSource::Path(sdk))?;
    std::fs::write(root.join("src/lib.rs"), rust[0])?;
    let target = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/plugins");
    let status = std::process::Command::new(env!("CARGO"))
        .args([
            "build",
            "--release",
            "--target",
            "wasm32-wasip2",
            "--target-dir",
        ])
        .arg(&target)
        .current_dir(&root)
        .status()?;
    assert!(status.success(), "the guide's example does not build");
    let wasm = target.join("wasm32-wasip2/release/shout.wasm");
    let report = cli::check_file(&wasm)?;
    assert_eq!(report.summary.name, "shout");
    let out = cli::run_step_file(
        &wasm,
        &crate::plugins::StepInput::new("shout", json!({"text": "hi"})),
        None,
    )?;
    assert_eq!(out.result["loud"], "HI");
    assert_eq!(out.state_patch["shouted"], true);

    let tomls = fenced(guide, "toml");
    assert_eq!(
        tomls.len(),
        2,
        "the guide's TOML blocks changed: test each one"
    );
    let definition = tomls.iter().find(|t| t.contains("[[steps]]")).unwrap();
    let def =
        crate::workflow::Definition::parse(std::path::Path::new("loud.toml"), definition, &|h| {
            match h.plugin.as_str() {
                "shout" => Ok(()),
                other => Err(format!("no plugin {other}")),
            }
        })
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    assert_eq!(def.name, "loud");
    let settings = tomls
        .iter()
        .find(|t| t.contains("[plugin_limits]"))
        .unwrap();
    let data = tempfile::tempdir()?;
    std::fs::write(data.path().join("ksi.toml"), settings)?;
    let config = crate::config::Config::load(&crate::config::ConfigOverrides {
        data_dir: Some(data.path().to_path_buf()),
        ..Default::default()
    })?;
    let limits = config.plugin_load_options().limits;
    assert_eq!(limits.for_plugin("debate").host_calls, 50_000);
    assert_eq!(
        limits.for_plugin("shout").cpu_time,
        std::time::Duration::from_secs(30)
    );
    Ok(())
}
