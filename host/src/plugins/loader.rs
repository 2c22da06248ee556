//! From bytes to a [`LoadedPlugin`]: validate, compile (or take from the cache) off the async
//! runtime with a time limit, check the WIT version, type-check against the world, `describe()`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use wasmtime::component::Component;

use super::bindings::{PluginInfo, StepHandlerPre, StepInput};
use super::cache::CompiledCache;
use super::engine::PluginEngine;
use super::host_impl::{HostServices, StepState};
use super::limits::{LimitPolicy, StepLimits};
use super::step::{self, DirGrant, Instantiator, StepFailure, StepResult};
use super::{PluginError, Result, WIT_VERSION};

/// One loaded version of a plugin: compiled, type-checked, described, ready to instantiate.
/// Steps hold an `Arc<LoadedPlugin>`, so a swap or unload never disturbs a running step.
pub struct LoadedPlugin {
    engine: Arc<PluginEngine>,
    pre: StepHandlerPre<StepState>,
    /// What `describe()` returned.
    pub info: PluginInfo,
    /// The plugin's semver version.
    pub version: semver::Version,
    /// The file it was loaded from.
    pub path: PathBuf,
    /// Hex SHA-256 of the file's bytes.
    pub sha256: String,
    /// The `ksi:plugin` version it was built for.
    pub wit_version: String,
    /// When it was loaded.
    pub loaded_at: SystemTime,
    /// Whether the compiled code came from the cache.
    pub from_cache: bool,
    /// Time to compile (or deserialize) the component.
    pub compile_time: Duration,
    /// The limits its steps run under.
    pub limits: StepLimits,
    /// Directories granted to it.
    pub grants: Vec<DirGrant>,
}

impl std::fmt::Debug for LoadedPlugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedPlugin")
            .field("name", &self.info.name)
            .field("version", &self.version)
            .field("path", &self.path)
            .field("sha256", &self.sha256)
            .finish_non_exhaustive()
    }
}

/// A row of `ksi plugins list`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PluginSummary {
    /// Plugin name.
    pub name: String,
    /// Plugin version.
    pub version: String,
    /// One line for humans.
    pub description: String,
    /// The step names it handles.
    pub steps: Vec<String>,
    /// The file it was loaded from.
    pub file: PathBuf,
    /// Hex SHA-256 of the file.
    pub sha256: String,
    /// The `ksi:plugin` version it was built for.
    pub wit_version: String,
    /// Load time, RFC 3339 (UTC).
    pub loaded_at: String,
    /// Whether its compiled code came from the cache.
    pub from_cache: bool,
}

impl LoadedPlugin {
    /// The plugin name.
    pub fn name(&self) -> &str {
        &self.info.name
    }

    /// `name@version`.
    pub fn id(&self) -> String {
        format!("{}@{}", self.info.name, self.version)
    }

    /// Run one step in a fresh instance, blocking the calling thread (call it from a blocking
    /// thread, e.g. `tokio::task::spawn_blocking`).
    ///
    /// # Errors
    ///
    /// Every way a step can fail: [`StepFailure`].
    pub fn run_step(
        &self,
        input: &StepInput,
        services: Arc<dyn HostServices>,
    ) -> std::result::Result<StepResult, StepFailure> {
        step::run(&self.instantiator(), &self.info, input, services)
    }

    /// A row for `ksi plugins list`.
    pub fn summary(&self) -> PluginSummary {
        PluginSummary {
            name: self.info.name.clone(),
            version: self.version.to_string(),
            description: self.info.description.clone(),
            steps: self.info.steps.iter().map(|s| s.name.clone()).collect(),
            file: self.path.clone(),
            sha256: self.sha256.clone(),
            wit_version: self.wit_version.clone(),
            loaded_at: rfc3339(self.loaded_at),
            from_cache: self.from_cache,
        }
    }

    pub(crate) fn pre(&self) -> &StepHandlerPre<StepState> {
        &self.pre
    }

    fn instantiator(&self) -> Instantiator<'_> {
        Instantiator {
            engine: &self.engine,
            pre: &self.pre,
            limits: self.limits,
            grants: &self.grants,
        }
    }
}

/// How to load.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Longest a compile may take.
    pub compile_timeout: Duration,
    /// Limits by plugin name (`describe()` runs under the defaults, with `describe_cpu_time`).
    pub limits: LimitPolicy,
    /// CPU time `describe()` may use: it only lists steps, so a looping one is refused soon.
    pub describe_cpu_time: Duration,
    /// Most functions a plugin may define (all its core modules together): a file over it is
    /// refused before anything is compiled. A Rust plugin has a few thousand; an interpreter
    /// compiled in (Python, JavaScript) tens of thousands.
    pub max_functions: u64,
    /// The `ksi-host` binary that compiles plugins in a child process of its own (see
    /// [`compile_worker_binary`]): a compile over the time limit is killed and one over the
    /// memory limit fails, and either way the daemon's memory is untouched. `None` compiles
    /// in this process (tests, the library used alone).
    pub compiler: Option<PathBuf>,
    /// Address space the compile child may use, in bytes.
    pub compile_memory_bytes: u64,
    /// Directories granted by plugin name.
    pub grants: std::collections::HashMap<String, Vec<DirGrant>>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            compile_timeout: Duration::from_secs(60),
            limits: LimitPolicy::default(),
            describe_cpu_time: Duration::from_secs(1),
            max_functions: 200_000,
            compiler: None,
            compile_memory_bytes: 4 << 30,
            grants: Default::default(),
        }
    }
}

/// Read and load the plugin file `path`.
///
/// # Errors
///
/// A [`PluginError`] naming the file and the reason.
pub fn load_file(
    engine: &Arc<PluginEngine>,
    cache: Option<&CompiledCache>,
    path: &Path,
    options: &LoadOptions,
) -> Result<LoadedPlugin> {
    let bytes = std::fs::read(path).map_err(|source| PluginError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    load_bytes(engine, cache, path, bytes, options)
}

/// Load a plugin from `bytes` (`path` names it in errors and listings).
///
/// # Errors
///
/// A [`PluginError`] naming the file and the reason.
pub fn load_bytes(
    engine: &Arc<PluginEngine>,
    cache: Option<&CompiledCache>,
    path: &Path,
    bytes: Vec<u8>,
    options: &LoadOptions,
) -> Result<LoadedPlugin> {
    let path = path.to_path_buf();
    check_header(&path, &bytes)?;
    let sha256 = hex::encode(Sha256::digest(&bytes));
    let start = Instant::now();
    let cached = cache.and_then(|c| c.load(engine.engine(), &sha256));
    let from_cache = cached.is_some();
    let component = match cached {
        Some(component) => component,
        None => {
            check_functions(&path, &bytes, options.max_functions)?;
            let component = match &options.compiler {
                Some(worker) => compile_in_child(engine, worker, &path, &bytes, options)?,
                None => compile(engine, &path, bytes, options.compile_timeout)?,
            };
            if let Some(cache) = cache
                && let Err(e) = cache.store(&sha256, &component)
            {
                tracing::warn!(path = %path.display(), error = %e, "cannot cache compiled plugin");
            }
            component
        }
    };
    let compile_time = start.elapsed();
    let wit_version = check_wit_version(engine, &path, &component)?;
    let pre = engine
        .linker()
        .instantiate_pre(&component)
        .and_then(StepHandlerPre::new)
        .map_err(|e| PluginError::WrongWorld {
            path: path.clone(),
            reason: format!("{e:#}"),
        })?;
    let mut limits = options.limits.defaults;
    limits.cpu_time = limits.cpu_time.min(options.describe_cpu_time);
    let info = step::describe(&Instantiator {
        engine,
        pre: &pre,
        limits,
        grants: &[],
    })
    .map_err(|failure| PluginError::Describe {
        path: path.clone(),
        failure: Box::new(failure),
    })?;
    let version = check_info(&path, &info)?;
    Ok(LoadedPlugin {
        engine: engine.clone(),
        pre,
        limits: options.limits.for_plugin(&info.name),
        grants: options.grants.get(&info.name).cloned().unwrap_or_default(),
        info,
        version,
        path,
        sha256,
        wit_version,
        loaded_at: SystemTime::now(),
        from_cache,
        compile_time,
    })
}

/// The binary header: `\0asm`, then the version/layer (1.0 for core modules, 0xd.1 for
/// components).
fn check_header(path: &Path, bytes: &[u8]) -> Result<()> {
    if bytes.len() < 8 || &bytes[..4] != b"\0asm" {
        return Err(PluginError::NotWasm {
            path: path.to_path_buf(),
        });
    }
    match bytes[4..8] {
        [1, 0, 0, 0] => Err(PluginError::CoreModule {
            path: path.to_path_buf(),
        }),
        [_, _, 1, 0] => Ok(()),
        _ => Err(PluginError::Invalid {
            path: path.to_path_buf(),
            reason: format!("unknown WebAssembly encoding version {:?}", &bytes[4..8]),
        }),
    }
}

/// Refuse a file that defines more functions than `limit` before compiling any of it: a few
/// megabytes of tiny functions take Cranelift minutes and gigabytes.
fn check_functions(path: &Path, bytes: &[u8], limit: u64) -> Result<()> {
    let mut functions: u64 = 0;
    for payload in wasmparser::Parser::new(0).parse_all(bytes) {
        let payload = payload.map_err(|e| PluginError::Invalid {
            path: path.to_path_buf(),
            reason: format!("the file is truncated or corrupt ({e})"),
        })?;
        if let wasmparser::Payload::CodeSectionStart { count, .. } = payload {
            functions += u64::from(count);
            if functions > limit {
                return Err(PluginError::TooLarge {
                    path: path.to_path_buf(),
                    functions,
                    limit,
                });
            }
        }
    }
    Ok(())
}

/// The `ksi-host` binary that compiles plugins for this process: this one, or the `ksi-host`
/// beside it (for `ksi`); `None` when there is none (a test binary).
pub fn compile_worker_binary() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let host = match exe.file_stem().is_some_and(|n| n == "ksi-host") {
        true => exe,
        false => exe.with_file_name("ksi-host"),
    };
    host.is_file().then_some(host)
}

/// The first argument that makes `ksi-host` a compile child (see [`compile_worker_main`]).
pub const COMPILE_WORKER_ARG: &str = "__compile-plugin";

/// The compile child: the engine settings (JSON) as its argument, the component's bytes on
/// stdin; the compiled code on stdout, or the compiler's error on stderr.
/// Returns the process exit code: 0, or 1 with the reason on stderr.
pub fn compile_worker_main(engine_config: &str) -> i32 {
    use std::io::{Read, Write};
    let run = || -> anyhow::Result<Vec<u8>> {
        let config: super::EngineConfig = serde_json::from_str(engine_config)?;
        // A pool of one slot: the same code as the daemon's engine, within the child's
        // address-space limit.
        let engine = PluginEngine::new(super::EngineConfig {
            pool_instances: 1,
            ..config
        })?;
        let mut bytes = Vec::new();
        std::io::stdin().read_to_end(&mut bytes)?;
        let component =
            Component::new(engine.engine(), &bytes).map_err(|e| anyhow::anyhow!("{e:#}"))?;
        Ok(component.serialize()?)
    };
    match run().and_then(|code| Ok(std::io::stdout().write_all(&code)?)) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("{e:#}");
            1
        }
    }
}

/// Compile in a child process under the compile time and memory limits.
fn compile_in_child(
    engine: &Arc<PluginEngine>,
    worker: &Path,
    path: &Path,
    bytes: &[u8],
    options: &LoadOptions,
) -> Result<Component> {
    use std::io::{Read, Write};
    use std::os::unix::process::{CommandExt, ExitStatusExt};
    use std::process::{Command, Stdio};
    let engine_failure =
        |what: String| PluginError::Engine(format!("compiling {}: {what}", path.display()));
    let config = serde_json::to_string(engine.config()).expect("engine settings are JSON");
    let memory = options.compile_memory_bytes;
    let mut command = Command::new(worker);
    command
        .arg(COMPILE_WORKER_ARG)
        .arg(config)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: between fork and exec the closure only calls setrlimit, which is
    // async-signal-safe, on values computed before the fork.
    unsafe {
        command.pre_exec(move || {
            let limit = libc::rlimit {
                rlim_cur: memory as libc::rlim_t,
                rlim_max: memory as libc::rlim_t,
            };
            if libc::setrlimit(libc::RLIMIT_AS, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = command
        .spawn()
        .map_err(|e| engine_failure(format!("cannot start {}: {e}", worker.display())))?;
    let mut stdin = child.stdin.take().expect("piped");
    let input = bytes.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(&input);
    });
    let mut stdout = child.stdout.take().expect("piped");
    let reader = std::thread::spawn(move || {
        let mut code = Vec::new();
        let _ = stdout.read_to_end(&mut code);
        code
    });
    let mut stderr = child.stderr.take().expect("piped");
    let errors = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = (&mut stderr).take(16 << 10).read_to_string(&mut text);
        text
    });
    let deadline = Instant::now() + options.compile_timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                let _ = (writer.join(), reader.join(), errors.join());
                return Err(PluginError::CompileTimeout {
                    path: path.to_path_buf(),
                    limit: options.compile_timeout,
                });
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => return Err(engine_failure(format!("waiting for the compiler: {e}"))),
        }
    };
    let _ = writer.join();
    let code = reader.join().unwrap_or_default();
    let errors = errors.join().unwrap_or_default();
    if !status.success() {
        let errors = errors.trim();
        let out_of_memory = status.signal().is_some()
            || errors.contains("memory allocation")
            || errors.contains("out of memory");
        if out_of_memory {
            return Err(PluginError::CompileMemory {
                path: path.to_path_buf(),
                limit: memory,
            });
        }
        return Err(invalid(path, errors.to_string()));
    }
    // SAFETY: `Component::deserialize` trusts its input to be code that wasmtime compiled.
    // These bytes are what our own `ksi-host` child just produced with `Component::serialize`
    // for this engine's settings, read from its stdout pipe (the same trust as the compiled
    // cache); wasmtime still checks the version and settings recorded in them.
    unsafe { Component::deserialize(engine.engine(), &code) }
        .map_err(|e| engine_failure(format!("the compiler's output is unusable: {e:#}")))
}

fn invalid(path: &Path, reason: String) -> PluginError {
    // wasmparser reports a cut-off file as a section running past the end.
    let truncated = reason.contains("out of bounds") || reason.contains("unexpected end");
    PluginError::Invalid {
        path: path.to_path_buf(),
        reason: match truncated {
            true => format!("the file is truncated or corrupt ({reason})"),
            false => reason,
        },
    }
}

/// Compile on a separate thread and give up waiting after `timeout` (cranelift cannot be
/// cancelled; the thread finishes and its result is dropped).
fn compile(
    engine: &Arc<PluginEngine>,
    path: &Path,
    bytes: Vec<u8>,
    timeout: Duration,
) -> Result<Component> {
    let (tx, rx) = std::sync::mpsc::channel();
    let wasm_engine = engine.engine().clone();
    std::thread::Builder::new()
        .name("ksi-plugin-compile".into())
        .spawn(move || {
            let _ = tx.send(Component::new(&wasm_engine, &bytes));
        })
        .map_err(|e| PluginError::Engine(format!("cannot spawn a compile thread: {e}")))?;
    match rx.recv_timeout(timeout) {
        Ok(Ok(component)) => Ok(component),
        Ok(Err(e)) => Err(invalid(path, format!("{e:#}"))),
        Err(_) => Err(PluginError::CompileTimeout {
            path: path.to_path_buf(),
            limit: timeout,
        }),
    }
}

/// Find the `ksi:plugin` version the component was built for and refuse incompatible ones
/// with a message that says what to do.
fn check_wit_version(engine: &PluginEngine, path: &Path, component: &Component) -> Result<String> {
    let ty = component.component_type();
    let exports: Vec<String> = ty
        .exports(engine.engine())
        .map(|(n, _)| n.to_string())
        .collect();
    let imports: Vec<String> = ty
        .imports(engine.engine())
        .map(|(n, _)| n.to_string())
        .collect();
    let host = semver::Version::parse(WIT_VERSION).expect("WIT_VERSION is semver");
    let mut found = None;
    for name in exports.iter().chain(&imports) {
        let Some(rest) = name.strip_prefix("ksi:plugin/") else {
            continue;
        };
        let version = rest.split_once('@').map(|(_, v)| v).unwrap_or("");
        let compatible = semver::Version::parse(version)
            .is_ok_and(|v| v.major == host.major && (host.major != 0 || v.minor == host.minor));
        if !compatible {
            let range = match host.major {
                0 => format!("{}.{}.x", host.major, host.minor),
                major => format!("{major}.x"),
            };
            return Err(PluginError::IncompatibleWit {
                path: path.to_path_buf(),
                found: if version.is_empty() {
                    "(no version)".into()
                } else {
                    version.into()
                },
                host: range.clone(),
                sdk: range,
            });
        }
        found.get_or_insert_with(|| version.to_string());
    }
    if !exports.iter().any(|n| n.starts_with("ksi:plugin/handler@")) {
        let list = |v: &[String]| {
            if v.is_empty() {
                "nothing".to_string()
            } else {
                v.join(", ")
            }
        };
        return Err(PluginError::WrongWorld {
            path: path.to_path_buf(),
            reason: format!(
                "it does not export ksi:plugin/handler (it exports {}; it imports {}) — \
                 a step handler is built with ksi-sdk and ksi_sdk::export!",
                list(&exports),
                list(&imports)
            ),
        });
    }
    Ok(found.unwrap_or_default())
}

fn check_info(path: &Path, info: &PluginInfo) -> Result<semver::Version> {
    let bad = |reason: String| PluginError::BadInfo {
        path: path.to_path_buf(),
        reason,
    };
    let valid_name = !info.name.is_empty()
        && info
            .name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
    if !valid_name {
        return Err(bad(format!(
            "name {:?} must be non-empty lowercase letters, digits, - or _",
            info.name
        )));
    }
    let version = semver::Version::parse(&info.version)
        .map_err(|e| bad(format!("version {:?} is not semver: {e}", info.version)))?;
    if info.steps.is_empty() {
        return Err(bad("it handles no steps".into()));
    }
    let mut names: Vec<&str> = info.steps.iter().map(|s| s.name.as_str()).collect();
    names.sort_unstable();
    if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
        return Err(bad(format!("step {:?} is listed twice", w[0])));
    }
    Ok(version)
}

/// RFC 3339 UTC timestamp without a date library.
pub(crate) fn rfc3339(t: SystemTime) -> String {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}
