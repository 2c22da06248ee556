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
use crate::config::{Config, ConfigOverrides, LogFormat};
use crate::refs::Refs;
use crate::store::Store;

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
}

impl GlobalArgs {
    /// The configuration for these flags.
    pub fn config(&self) -> anyhow::Result<Config> {
        Ok(Config::load(&ConfigOverrides {
            data_dir: self.data_dir.clone(),
            log_format: self.log_format,
            log_level: self.log_level.clone(),
            sync: None,
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

/// Sets up `tracing` on stderr in the configured format.
pub fn init_logging(config: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&config.log_level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match config.log_format {
        LogFormat::Json => builder.json().try_init(),
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
