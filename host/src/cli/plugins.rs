//! Plugin commands: `ksi-host plugin check|run`, `ksi plugin new`, `ksi plugins`.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Subcommand;

use super::parse_json_arg;
use crate::config::Config;
use crate::plugins::cli::{
    SdkSource, check_file_with, list_table, run_step_file_with, scaffold_plugin,
};
use crate::plugins::{PluginRuntime, RecordingEvents, RuntimeConfig, StepInput};

/// `ksi-host plugin ...`: work on a component file without a daemon.
#[derive(Debug, Subcommand)]
pub enum PluginCmd {
    /// Validate a component the way the daemon would; print the precise reason on failure
    Check {
        file: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Run one step of a component with JSON input (Claude answers are simulated)
    Run {
        file: PathBuf,
        /// The plugin's step name
        step: String,
        /// Step params (JSON object)
        #[arg(long, default_value = "{}")]
        params: String,
        /// Workflow state before the step (JSON object)
        #[arg(long, default_value = "{}")]
        state: String,
        #[arg(long)]
        json: bool,
    },
    /// Create a new plugin crate that builds into a loadable component
    New {
        name: String,
        /// Where to create it
        #[arg(long, default_value = ".")]
        dir: PathBuf,
        /// Use this ksi-sdk checkout instead of the one this binary was built from
        #[arg(long)]
        sdk_path: Option<PathBuf>,
    },
}

/// Runs a plugin command, with the limits of `config` (the daemon's).
pub fn run(cmd: PluginCmd, config: &Config) -> anyhow::Result<()> {
    let options = config.plugin_load_options();
    match cmd {
        PluginCmd::Check { file, json } => {
            let report = check_file_with(&file, &options)
                .with_context(|| format!("{} cannot be loaded", file.display()))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                println!(
                    "{}: ok — {}@{} (ksi:plugin@{}), steps: {}, compiled in {} ms",
                    file.display(),
                    report.summary.name,
                    report.summary.version,
                    report.summary.wit_version,
                    report.summary.steps.join(", "),
                    report.compile_ms
                );
            }
        }
        PluginCmd::Run {
            file,
            step,
            params,
            state,
            json,
        } => {
            let params = parse_json_arg("--params", &params)?;
            let state = parse_json_arg("--state", &state)?;
            let mut input = StepInput::new(step, params);
            input.state = state.to_string();
            input.workflow_id = "wf_cli".into();
            input.workflow_type = "cli".into();
            let r = run_step_file_with(&file, &input, None, &options)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                println!("result:      {}", serde_json::to_string_pretty(&r.result)?);
                println!(
                    "state patch: {}",
                    serde_json::to_string_pretty(&r.state_patch)?
                );
                if let Some(n) = &r.next_step {
                    println!("next step:   {n}");
                }
                for (t, d) in &r.events {
                    println!("event:       {t} {d}");
                }
                println!(
                    "({}@{}, guest time {:?})",
                    r.plugin, r.plugin_version, r.guest_time
                );
            }
        }
        PluginCmd::New {
            name,
            dir,
            sdk_path,
        } => {
            let sdk = match sdk_path {
                Some(p) => SdkSource::Path(
                    p.canonicalize()
                        .with_context(|| format!("--sdk-path {}", p.display()))?,
                ),
                None => {
                    let built_from = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../sdk");
                    match built_from.canonicalize() {
                        Ok(p) => SdkSource::Path(p),
                        Err(_) => anyhow::bail!(
                            "this ksi was built from a checkout that is gone ({}), and ksi-sdk is \
                             not published on crates.io: pass --sdk-path with the sdk/ directory \
                             of a KSI checkout",
                            built_from.display()
                        ),
                    }
                }
            };
            let root = scaffold_plugin(&dir, &name, &sdk)?;
            println!("created {}", root.display());
            println!(
                "build it:   cd {} && cargo build --target wasm32-wasip2 --release",
                root.display()
            );
            println!(
                "check it:   ksi-host plugin check target/wasm32-wasip2/release/{}.wasm",
                name.replace('-', "_")
            );
            println!(
                "load it:    cp target/wasm32-wasip2/release/{}.wasm <data dir>/plugins/   (a running daemon picks it up)",
                name.replace('-', "_")
            );
        }
    }
    Ok(())
}

/// `ksi plugins`: the plugins of a data dir, loaded the way the daemon loads them.
pub fn list(config: &Config, json: bool) -> anyhow::Result<()> {
    let dir = &config.data_dir;
    crate::store::prepare_data_dir(dir)?;
    let rt = PluginRuntime::new(
        RuntimeConfig {
            load: config.plugin_load_options(),
            ..RuntimeConfig::for_data_dir(dir)
        },
        Arc::new(crate::daemon::NoStep),
        Arc::new(RecordingEvents::default()),
    )?;
    let mut failures = Vec::new();
    for (path, r) in rt.load_dir() {
        if let Err(e) = r {
            failures.push(format!("{}: {e}", path.display()));
        }
    }
    let list = rt.list();
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(
                &serde_json::json!({ "plugins": list, "failed": failures })
            )?
        );
    } else {
        if list.is_empty() {
            println!("no plugins in {}", dir.join("plugins").display());
        } else {
            println!("{}", list_table(&list));
        }
        for f in failures {
            println!("not loaded: {f}");
        }
    }
    Ok(())
}

/// `ksi plugins list` through a daemon: the plugins it has loaded (`GET /plugins`).
///
/// # Errors
/// The daemon cannot be reached.
pub async fn list_client(client: &super::client::DaemonClient, json: bool) -> anyhow::Result<()> {
    let b = client.get("/plugins").await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&b)?);
        return Ok(());
    }
    let list: Vec<crate::plugins::loader::PluginSummary> =
        serde_json::from_value(b["plugins"].clone())?;
    if list.is_empty() {
        println!(
            "{} has no plugin loaded; check its plugins directory and its log",
            client.describe()
        );
    } else {
        println!("{}", list_table(&list));
    }
    Ok(())
}
