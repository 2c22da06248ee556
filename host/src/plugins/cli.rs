//! The plugin commands as library functions (the clap wiring lives in `crate::cli`):
//! `ksi-host plugin check FILE`, `ksi-host plugin run FILE STEP`, `ksi plugins list`,
//! `ksi plugin new NAME`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, bail};
use serde::Serialize;

use super::bindings::{StepInfo, StepInput};
use super::engine::{EngineConfig, PluginEngine};
use super::host_impl::{HostServices, MemoryHost};
use super::loader::{self, LoadOptions, LoadedPlugin, PluginSummary};
use super::step::StepResult;
use super::{PluginError, WIT_VERSION};

/// What `plugin check` found in a good plugin.
#[derive(Debug, Clone, Serialize)]
pub struct CheckReport {
    /// Name, version, file, hash, ...
    #[serde(flatten)]
    pub summary: PluginSummary,
    /// The steps with their descriptions and params schemas.
    pub step_details: Vec<StepInfo>,
    /// Time to compile.
    pub compile_ms: u64,
}

fn standalone_engine() -> Result<Arc<PluginEngine>, PluginError> {
    // The daemon's engine, with the daemon's per-instance limits (a pool of a few slots is
    // enough for one command): what loads here loads there.
    PluginEngine::new(EngineConfig {
        pool_instances: 4,
        ..EngineConfig::default()
    })
}

/// Load `path` the way the daemon would (validate, compile, type-check, `describe()`), without
/// a daemon and without touching any cache.
///
/// # Errors
///
/// The precise reason the daemon would refuse the file ([`PluginError`]).
pub fn check_file(path: &Path) -> Result<CheckReport, PluginError> {
    check_file_with(path, &LoadOptions::default())
}

/// [`check_file`] with the limits of `options` (the daemon's: `Config::plugin_load_options`).
///
/// # Errors
///
/// The precise reason the daemon would refuse the file ([`PluginError`]).
pub fn check_file_with(path: &Path, options: &LoadOptions) -> Result<CheckReport, PluginError> {
    let plugin = load_standalone(path, options)?;
    Ok(CheckReport {
        summary: plugin.summary(),
        step_details: plugin.info.steps.clone(),
        compile_ms: plugin.compile_time.as_millis() as u64,
    })
}

fn load_standalone(path: &Path, options: &LoadOptions) -> Result<LoadedPlugin, PluginError> {
    let engine = standalone_engine()?;
    // As the daemon does it: a panic while loading a bad file is that file's failure.
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        loader::load_file(&engine, None, path, options)
    }))
    .unwrap_or_else(|panic| {
        Err(PluginError::Engine(format!(
            "loading {} failed: {}",
            path.display(),
            super::step::panic_message(&*panic)
        )))
    })
}

/// Run one step of the plugin file `path` with `input`, against `services` (an in-memory
/// [`MemoryHost`] with a simulated Claude when `None`).
///
/// # Errors
///
/// When the plugin does not load or the step fails; the message says which.
pub fn run_step_file(
    path: &Path,
    input: &StepInput,
    services: Option<Arc<dyn HostServices>>,
) -> anyhow::Result<StepResult> {
    run_step_file_with(path, input, services, &LoadOptions::default())
}

/// [`run_step_file`] with the limits of `options`.
///
/// # Errors
///
/// The file cannot be loaded, or the step fails.
pub fn run_step_file_with(
    path: &Path,
    input: &StepInput,
    services: Option<Arc<dyn HostServices>>,
    options: &LoadOptions,
) -> anyhow::Result<StepResult> {
    let plugin = load_standalone(path, options)?;
    let services = services.unwrap_or_else(|| MemoryHost::new() as Arc<dyn HostServices>);
    plugin.run_step(input, services).with_context(|| {
        format!(
            "step {} of plugin {} ({}) failed",
            input.step,
            plugin.id(),
            path.display()
        )
    })
}

/// `ksi plugins list` as a table: name, version, steps, file, hash, loaded at.
pub fn list_table(plugins: &[PluginSummary]) -> String {
    let mut table = comfy_table::Table::new();
    table.load_preset(comfy_table::presets::UTF8_BORDERS_ONLY);
    table.set_header(["name", "version", "steps", "file", "sha256", "loaded at"]);
    for p in plugins {
        table.add_row([
            p.name.clone(),
            p.version.clone(),
            p.steps.join(", "),
            p.file.display().to_string(),
            p.sha256.chars().take(12).collect(),
            p.loaded_at.clone(),
        ]);
    }
    table.to_string()
}

/// Where a scaffolded plugin gets `ksi-sdk` from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SdkSource {
    /// A local checkout (`path = "..."`): `ksi-sdk` is not published on crates.io.
    Path(PathBuf),
}

/// `ksi plugin new NAME`: write a plugin crate `dir/NAME` whose `cargo build --target
/// wasm32-wasip2 --release` produces a component the daemon loads. Returns the crate directory.
///
/// # Errors
///
/// When `name` is not a valid plugin name or the directory already exists.
pub fn scaffold_plugin(dir: &Path, name: &str, sdk: &SdkSource) -> anyhow::Result<PathBuf> {
    let valid = !name.is_empty()
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
    if !valid {
        bail!(
            "plugin name {name:?} must start with a lowercase letter and use only a-z, 0-9, - and _"
        );
    }
    let root = dir.join(name);
    if root.exists() {
        bail!(
            "{} already exists; choose another name or directory",
            root.display()
        );
    }
    std::fs::create_dir_all(root.join("src"))
        .with_context(|| format!("cannot create {}", root.display()))?;
    let sdk_dep = match sdk {
        SdkSource::Path(p) => {
            let p = p.canonicalize().unwrap_or_else(|_| p.clone());
            format!("ksi-sdk = {{ path = {:?} }}", p.display().to_string())
        }
    };
    let cargo_toml = format!(
        r#"[package]
name = "{name}"
version = "0.1.0"
edition = "2024"
publish = false

# A KSI plugin is a WebAssembly component: build it with
#   cargo build --target wasm32-wasip2 --release
# and copy target/wasm32-wasip2/release/{file}.wasm into the daemon's plugins directory.
[lib]
crate-type = ["cdylib"]

[dependencies]
{sdk_dep}
serde = {{ version = "1", features = ["derive"] }}
serde_json = "1"

[profile.release]
opt-level = "s"
lto = true
panic = "abort"
strip = true

# Keep this crate out of any enclosing workspace.
[workspace]
"#,
        file = name.replace('-', "_"),
    );
    let type_name: String = name
        .split(['-', '_'])
        .map(|part| {
            let mut c = part.chars();
            c.next()
                .map(|f| f.to_ascii_uppercase().to_string() + c.as_str())
                .unwrap_or_default()
        })
        .collect();
    let lib_rs = format!(
        r#"//! {name}: a KSI workflow step handler.
//!
//! Build: `cargo build --target wasm32-wasip2 --release`
//! Check: `ksi-host plugin check target/wasm32-wasip2/release/{file}.wasm`
//! Try:   `ksi-host plugin run target/wasm32-wasip2/release/{file}.wasm greet --params '{{"name": "Ada"}}'`

use ksi_sdk::{{Plugin, PluginInfo, StepError, StepInput, StepOutput, claude, log}};
use serde::Deserialize;
use serde_json::json;

/// The params of the `greet` step.
#[derive(Deserialize)]
struct GreetParams {{
    name: String,
}}

struct {type_name};

impl Plugin for {type_name} {{
    fn describe() -> PluginInfo {{
        PluginInfo::new("{name}", env!("CARGO_PKG_VERSION"))
            .description("Greets someone, with Claude's help")
            .step("greet", "Ask Claude for a one-line greeting")
    }}

    fn run(input: StepInput) -> Result<StepOutput, StepError> {{
        match input.step.as_str() {{
            "greet" => {{
                let params: GreetParams = input.params()?;
                log::info!("greeting {{}}", params.name);
                let answer = claude::complete(
                    claude::Request::new(format!("Write a one-line greeting for {{}}.", params.name))
                        .max_turns(1),
                )?;
                StepOutput::new()
                    .result(&json!({{ "greeting": answer.text }}))?
                    .patch(&json!({{ "greeted": params.name }}))
            }}
            other => Err(StepError::fatal(format!("{name} has no step {{other}}"))),
        }}
    }}
}}

ksi_sdk::export!({type_name});
"#,
        file = name.replace('-', "_"),
    );
    std::fs::write(root.join("Cargo.toml"), cargo_toml)?;
    std::fs::write(root.join("src").join("lib.rs"), lib_rs)?;
    std::fs::write(root.join(".gitignore"), "/target\n")?;
    Ok(root)
}

/// The `ksi:plugin` version this host speaks, for `--version` output.
pub fn wit_version() -> &'static str {
    WIT_VERSION
}
