//! The command-line faces: `ksi-host` (the daemon and its admin commands) and `ksi` (the
//! client). Each subcommand is a function here; `bin/*.rs` only parse and dispatch.

pub mod claude;
pub mod client;
pub mod events;
pub mod host;
pub mod plugins;
pub mod run;
pub mod serve;
pub mod soak;
pub mod workflow;

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;

use crate::bus::Bus;
use crate::config::{Config, ConfigOverrides, LogFormat, LogRotation};
use crate::refs::Refs;
use crate::store::Store;
use tracing_subscriber::fmt::writer::BoxMakeWriter;

/// Flags every subcommand of both binaries accepts.
#[derive(Debug, Clone, Args)]
pub struct GlobalArgs {
    /// Data directory (database, logs, plugins). Default ./var
    #[arg(long, global = true, env = "KSI_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Log format on stderr
    #[arg(long, global = true, value_enum, value_name = "FORMAT")]
    pub log_format: Option<LogFormat>,
    /// Log filter, e.g. info or ksi_host=debug
    #[arg(long, global = true, value_name = "FILTER")]
    pub log_level: Option<String>,
    /// `ksi-host serve`: write logs to this file (rotated per `log_rotation`) instead of stderr
    #[arg(long, global = true, value_name = "PATH")]
    pub log_file: Option<PathBuf>,
}

impl GlobalArgs {
    /// The configuration for these flags.
    pub fn config(&self) -> anyhow::Result<Config> {
        Ok(Config::load(&ConfigOverrides {
            data_dir: self.data_dir.clone(),
            log_format: self.log_format,
            log_level: self.log_level.clone(),
            sync: None,
            // A path on the command line is relative to where the command runs.
            log_file: self
                .log_file
                .as_ref()
                .map(|p| std::env::current_dir().unwrap_or_default().join(p)),
        })?)
    }
}

/// Whether the user chose a log level (flag, `RUST_LOG` or `KSI_LOG_LEVEL`).
pub fn log_level_chosen(global: &GlobalArgs) -> bool {
    global.log_level.is_some()
        || std::env::var_os("RUST_LOG").is_some()
        || std::env::var_os("KSI_LOG_LEVEL").is_some()
}

/// Prints a table of a JSON object's keys and values (benchmark reports).
pub fn print_json_table(v: &serde_json::Value) {
    let mut t = table(&["measure", "value"]);
    if let Some(o) = v.as_object() {
        for (k, v) in o {
            t.add_row(vec![k.clone(), v.to_string()]);
        }
    }
    println!("{t}");
}

/// Sets up `tracing` on stderr in the configured format (the log file is the daemon's only:
/// see [`init_daemon_logging`]).
pub fn init_logging(config: &Config) {
    install_subscriber(config, BoxMakeWriter::new(std::io::stderr), true);
}

/// Sets up `tracing` for `ksi-host serve`: on stderr, or, when `log_file` is configured, in
/// that file, rotated as `log_rotation` says, keeping `log_keep` files.
///
/// In JSON, every line carries the fields of the spans it was logged in (`span` and `spans`),
/// so a line logged during a Claude call has its `process_id` and one logged during a
/// workflow step its `workflow_id`, `step` and `event_id`.
///
/// # Errors
/// The log file's directory cannot be created or written.
pub fn init_daemon_logging(config: &Config) -> anyhow::Result<()> {
    let Some(path) = &config.log_file else {
        init_logging(config);
        return Ok(());
    };
    let appender = log_file_appender(path, config.log_rotation, config.log_keep)?;
    install_subscriber(config, BoxMakeWriter::new(appender), false);
    Ok(())
}

/// A rolling file appender for `path`: `dir/stem.ext` becomes `dir/stem.<date>.ext` when rotated.
fn log_file_appender(
    path: &std::path::Path,
    rotation: LogRotation,
    keep: usize,
) -> anyhow::Result<tracing_appender::rolling::RollingFileAppender> {
    use tracing_appender::rolling::{Builder, Rotation};
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."));
    let stem = path
        .file_stem()
        .and_then(|s| s.to_str())
        .filter(|s| !s.is_empty())
        .with_context(|| {
            format!(
                "the log file {} has no usable file name; give a path such as /var/log/ksi/ksi-host.log",
                path.display()
            )
        })?;
    std::fs::create_dir_all(dir)
        .with_context(|| format!("creating the log directory {}", dir.display()))?;
    let mut b = Builder::new()
        .rotation(match rotation {
            LogRotation::Daily => Rotation::DAILY,
            LogRotation::Hourly => Rotation::HOURLY,
            LogRotation::Never => Rotation::NEVER,
        })
        .filename_prefix(stem)
        .max_log_files(keep.max(1));
    if let Some(ext) = path.extension().and_then(|e| e.to_str()) {
        b = b.filename_suffix(ext);
    }
    b.build(dir).with_context(|| {
        format!(
            "opening the log file {} (check that the daemon's user may write there, or change --log-file / log_file)",
            path.display()
        )
    })
}

fn install_subscriber(config: &Config, writer: BoxMakeWriter, ansi: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&config.log_level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(writer);
    let _ = match config.log_format {
        LogFormat::Json => builder
            .json()
            .with_current_span(true)
            .with_span_list(true)
            .try_init(),
        LogFormat::Text => builder.compact().try_init(),
    };
}

/// The open parts of a data dir that most commands need.
pub struct Opened {
    pub config: Config,
    pub store: Store,
    pub bus: Bus,
    pub refs: Refs,
}

/// Opens the store (applying migrations), the bus and the file layout of the data dir.
pub fn open(config: Config) -> anyhow::Result<Opened> {
    let store = Store::open(&config)?;
    let refs = Refs::open(&config.data_dir)
        .with_context(|| format!("preparing the data dir {}", config.data_dir.display()))?;
    Ok(Opened {
        bus: Bus::new(store.clone()),
        store,
        refs,
        config,
    })
}

/// Parses a JSON argument, with an error that says what was wrong and how to fix it.
pub fn parse_json_arg(what: &str, text: &str) -> anyhow::Result<serde_json::Value> {
    serde_json::from_str(text).map_err(|e| {
        anyhow::anyhow!(
            "{what} is not valid JSON ({e}): {text:?}. Quote it for the shell, e.g. '{{\"key\": \"value\"}}'"
        )
    })
}

/// Formats epoch milliseconds as a UTC `HH:MM:SS.mmm` time of day (for live output).
pub fn clock(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let (h, m, s) = ((secs / 3600) % 24, (secs / 60) % 60, secs % 60);
    format!("{h:02}:{m:02}:{s:02}.{:03}", ms.rem_euclid(1000))
}

/// Shortens `s` to at most `max` characters for a table cell.
pub fn ellipsize(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_string()
    } else {
        let mut out: String = s.chars().take(max.saturating_sub(1)).collect();
        out.push('…');
        out
    }
}

/// A table with the house style.
pub fn table(header: &[&str]) -> comfy_table::Table {
    let mut t = comfy_table::Table::new();
    t.load_preset(comfy_table::presets::UTF8_BORDERS_ONLY)
        .set_content_arrangement(comfy_table::ContentArrangement::Dynamic)
        .set_header(header.iter().copied());
    t
}

/// Prints the completion script of the command-line parser `C` for `shell` on stdout.
///
/// # Errors
/// Writing to stdout failed.
pub fn print_completions<C: clap::CommandFactory>(
    shell: clap_complete::Shell,
) -> anyhow::Result<()> {
    let mut cmd = C::command();
    let name = cmd.get_name().to_string();
    // Generated into memory first: clap_complete panics on a write error, and `| head` is one.
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut cmd, name, &mut script);
    let mut out = std::io::stdout().lock();
    match std::io::Write::write_all(&mut out, &script)
        .and_then(|()| std::io::Write::flush(&mut out))
    {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}

/// Prints an error chain as one readable line and returns the process exit code.
pub fn report_error(err: &anyhow::Error) -> i32 {
    eprintln!("error: {err:#}");
    1
}
