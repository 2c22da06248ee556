//! Configuration: one typed struct, layered defaults < `ksi.toml` in the data dir < `KSI_*`
//! environment variables < command-line flags.
//!
//! Every knob lives here with its default and a line on what it does. Settings that can change
//! while the daemon runs live in the `config` table instead (see [`crate::store::config`]).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

use crate::plugins::StepLimits;
use crate::plugins::limits::{LimitOverrides, LimitPolicy};
use crate::plugins::loader::LoadOptions;

/// The data directory used when neither `--data-dir` nor `KSI_DATA_DIR` says otherwise.
pub const DEFAULT_DATA_DIR: &str = "./var";

/// File name of the configuration file inside the data dir.
pub const CONFIG_FILE: &str = "ksi.toml";

/// All static settings of KSI. Field names are also the `ksi.toml` keys and, upper-cased with
/// a `KSI_` prefix, the environment variable names (`KSI_BUS_MAX_ATTEMPTS=8`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Where everything lives: `ksi.db`, `claude_logs/`, `prompts/`, `state/`, `plugins/`, `cache/`.
    pub data_dir: PathBuf,
    /// SQLite `synchronous` level: `full` (every commit is on disk before a publish returns) or
    /// `normal` (WAL commits survive a crash of KSI but not a power loss).
    pub sync: SyncMode,
    /// How long a writer waits on a lock held by another process before retrying, in ms.
    pub busy_timeout_ms: u64,
    /// Largest number of write jobs committed together in one transaction (group commit).
    pub group_commit_max: usize,
    /// Number of read-only connections kept for queries.
    pub reader_connections: usize,
    /// Default lease of a claimed event before it becomes claimable again, in ms.
    pub bus_lease_ms: u64,
    /// Default number of delivery attempts before an event is dead-lettered.
    pub bus_max_attempts: u32,
    /// First retry delay after a nack or an expired lease, in ms (doubles each attempt, jittered).
    pub bus_backoff_base_ms: u64,
    /// Upper bound of the retry delay, in ms.
    pub bus_backoff_max_ms: u64,
    /// Completed events older than this many seconds are pruned.
    pub bus_retention_secs: u64,
    /// Log format on stderr: `text` or `json`.
    pub log_format: LogFormat,
    /// Log filter, as in `RUST_LOG` (`info`, `ksi_host=debug`).
    pub log_level: String,
    /// Whether `ksi-host serve` also listens for clients of the original KSI (its Unix-socket
    /// protocol; `--no-compat` turns it off for one run).
    pub compat: bool,
    /// Socket of that listener (default `<data dir>/ksi-compat.sock`; a relative path is taken
    /// relative to the data dir; `--compat-socket` overrides it).
    pub compat_socket: Option<PathBuf>,
    /// `ksi-host serve` writes its log lines to this file instead of stderr (relative paths
    /// are relative to the data dir; `--log-file` to the current directory).
    pub log_file: Option<PathBuf>,
    /// When the log file starts a new file: `daily`, `hourly` or `never`. Rotated files are
    /// named `<stem>.<date>.<ext>`.
    pub log_rotation: LogRotation,
    /// Rotated log files kept; older ones are deleted.
    pub log_keep: usize,
    /// Requests per second each API client may make (a client is a token, a peer address, or
    /// the Unix socket as a whole); excess requests get 429. 0 turns the limit off.
    pub api_rate_per_s: u32,
    /// Requests a client may make in a burst above its rate (the size of its token bucket).
    pub api_rate_burst: u32,
    /// Host names, besides loopback ones, that the TCP listener answers for without a token,
    /// and whose web pages may call the API (e.g. `["ksi.example.com"]` behind a reverse
    /// proxy). Empty by default: only `localhost`, `127.0.0.0/8` and `[::1]`, and only the
    /// daemon's own pages.
    pub api_allowed_hosts: Vec<String>,
    /// Entries of the audit log (mutating API calls) older than this many days are pruned.
    pub audit_retention_days: u64,
    /// How often `ksi-host serve` backs up the database, e.g. `30m`, `6h`, `1d`; unset = never.
    pub backup_interval: Option<Interval>,
    /// Where scheduled backups go (relative paths are relative to the data dir).
    pub backup_dir: PathBuf,
    /// Scheduled backups kept (the newest plain, the others gzip-compressed); older ones are
    /// deleted.
    pub backup_keep: usize,
    /// The limits every plugin step runs under (CPU time, memory, table, output, host calls
    /// and their bytes), e.g. `[plugin_limits]` `cpu_time_ms = 30000`; `docs/plugins.md`
    /// lists them with their defaults.
    pub plugin_limits: StepLimits,
    /// Overrides of `plugin_limits` for one plugin, by name:
    /// `[plugin_limits_by_name.debate]` `host_calls = 50000`.
    pub plugin_limits_by_name: HashMap<String, LimitOverrides>,
    /// Longest a plugin file may take to compile, in seconds; a file over it is refused.
    pub plugin_compile_timeout_secs: u64,
    /// CPU time a plugin's `describe()` may use, in milliseconds; a file over it is refused.
    pub plugin_describe_cpu_ms: u64,
    /// Most functions a plugin file may define; a file over it is refused before compiling.
    pub plugin_max_functions: u64,
    /// Memory the child process that compiles a plugin may use, in MiB; a compile over it
    /// fails and the daemon's own memory is untouched.
    pub plugin_compile_memory_mb: u64,
}

/// When a log file is rotated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogRotation {
    Daily,
    Hourly,
    Never,
}

/// A duration written for people: a number and a unit, `ms`, `s`, `m`, `h` or `d`
/// (`500ms`, `30m`, `6h`, `1d`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Interval(pub Duration);

impl std::str::FromStr for Interval {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let n: u64 = num.parse().map_err(|_| {
            format!("{s:?} is not a duration: write a number and a unit, e.g. 30m, 6h or 1d")
        })?;
        let ms = match unit.trim() {
            "ms" => n,
            "s" => n * 1000,
            "m" => n * 60_000,
            "h" => n * 3_600_000,
            "d" => n * 86_400_000,
            other => {
                return Err(format!(
                    "{s:?} has the unknown unit {other:?}: use ms, s, m, h or d (e.g. 6h)"
                ));
            }
        };
        if ms == 0 {
            return Err(format!("{s:?} is zero: an interval must be positive"));
        }
        Ok(Interval(Duration::from_millis(ms)))
    }
}

impl std::fmt::Display for Interval {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ms = self.0.as_millis() as u64;
        for (unit, size) in [
            ("d", 86_400_000),
            ("h", 3_600_000),
            ("m", 60_000),
            ("s", 1000),
        ] {
            if ms.is_multiple_of(size) {
                return write!(f, "{}{unit}", ms / size);
            }
        }
        write!(f, "{ms}ms")
    }
}

impl Serialize for Interval {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Interval {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// SQLite durability level for commits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum SyncMode {
    /// fsync the WAL on every commit (group commit makes this cheap).
    Full,
    /// fsync only at checkpoints.
    Normal,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data_dir: PathBuf::from(DEFAULT_DATA_DIR),
            sync: SyncMode::Full,
            busy_timeout_ms: 5_000,
            group_commit_max: 512,
            reader_connections: 4,
            bus_lease_ms: 30_000,
            bus_max_attempts: 5,
            bus_backoff_base_ms: 200,
            bus_backoff_max_ms: 60_000,
            bus_retention_secs: 7 * 24 * 3600,
            log_format: LogFormat::Text,
            log_level: "info".to_string(),
            compat: true,
            compat_socket: None,
            log_file: None,
            log_rotation: LogRotation::Daily,
            log_keep: 14,
            api_rate_per_s: 1000,
            api_rate_burst: 2000,
            api_allowed_hosts: Vec::new(),
            audit_retention_days: 90,
            backup_interval: None,
            backup_dir: PathBuf::from("backups"),
            backup_keep: 7,
            plugin_limits: StepLimits::default(),
            plugin_limits_by_name: HashMap::new(),
            plugin_compile_timeout_secs: 60,
            plugin_describe_cpu_ms: 1000,
            plugin_max_functions: 200_000,
            plugin_compile_memory_mb: 4096,
        }
    }
}

impl Config {
    /// How the daemon, `ksi plugins list` and `ksi-host plugin check|run` load plugins: all
    /// three with these same limits.
    pub fn plugin_load_options(&self) -> LoadOptions {
        LoadOptions {
            compile_timeout: Duration::from_secs(self.plugin_compile_timeout_secs),
            limits: LimitPolicy {
                defaults: self.plugin_limits,
                plugins: self.plugin_limits_by_name.clone(),
            },
            describe_cpu_time: Duration::from_millis(self.plugin_describe_cpu_ms),
            max_functions: self.plugin_max_functions,
            compiler: crate::plugins::loader::compile_worker_binary(),
            compile_memory_bytes: self.plugin_compile_memory_mb << 20,
            grants: Default::default(),
        }
    }
}

/// Flags given on the command line; `None` means "not given, keep the lower layers".
#[derive(Debug, Default, Clone, Serialize)]
pub struct ConfigOverrides {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_dir: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_format: Option<LogFormat>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_level: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sync: Option<SyncMode>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_file: Option<PathBuf>,
}

/// A configuration that could not be assembled.
#[derive(Debug, thiserror::Error)]
#[error(
    "invalid configuration: {0}. Check {CONFIG_FILE} in the data dir and the KSI_* environment variables"
)]
pub struct ConfigError(String);

impl Config {
    /// Assembles the configuration from all layers. The data dir is decided first (flag, then
    /// `KSI_DATA_DIR`, then the default) because `ksi.toml` is read from it.
    ///
    /// # Errors
    /// A malformed `ksi.toml`, an unknown key, or a value of the wrong type.
    pub fn load(flags: &ConfigOverrides) -> Result<Config, ConfigError> {
        let data_dir = flags
            .data_dir
            .clone()
            .or_else(|| std::env::var_os("KSI_DATA_DIR").map(PathBuf::from))
            .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR));
        Self::load_from(&data_dir, flags)
    }

    fn load_from(data_dir: &Path, flags: &ConfigOverrides) -> Result<Config, ConfigError> {
        let file = data_dir.join(CONFIG_FILE);
        let keys = Self::keys();
        let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
        let mut config: Config = Figment::from(Serialized::defaults(Config::default()))
            .merge(Toml::file(&file))
            // Only known keys: other KSI_* variables (KSI_CLAUDE_BIN for the executor, test knobs)
            // are not configuration-file settings and must not make start-up fail.
            .merge(Env::prefixed("KSI_").only(&keys).ignore(&["data_dir"]))
            .merge(Serialized::defaults(flags))
            .extract()
            .map_err(|e| ConfigError(e.to_string()))?;
        config.data_dir = data_dir.to_path_buf();
        // Paths from the file or the environment are relative to the data dir (a flag was
        // made absolute against the current directory before it got here).
        if let Some(f) = &config.log_file {
            config.log_file = Some(data_dir.join(f));
        }
        config.backup_dir = data_dir.join(&config.backup_dir);
        Ok(config)
    }

    /// The names of all settings (the `ksi.toml` keys).
    pub fn keys() -> Vec<String> {
        let value = serde_json::to_value(Config::default()).expect("config serializes");
        value
            .as_object()
            .expect("config is a struct")
            .keys()
            .cloned()
            .collect()
    }

    /// The SQLite database file.
    pub fn db_path(&self) -> PathBuf {
        self.data_dir.join("ksi.db")
    }

    /// The default lease as a duration.
    pub fn bus_lease(&self) -> Duration {
        Duration::from_millis(self.bus_lease_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layers_apply_in_order_file_then_flags() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join(CONFIG_FILE),
            "bus_max_attempts = 9\nlog_level = \"debug\"\n",
        )
        .unwrap();
        let flags = ConfigOverrides {
            log_level: Some("warn".into()),
            ..Default::default()
        };
        let c = Config::load_from(dir.path(), &flags).unwrap();
        assert_eq!(c.bus_max_attempts, 9, "file overrides default");
        assert_eq!(c.log_level, "warn", "flag overrides file");
        assert_eq!(c.bus_lease_ms, 30_000, "default kept");
    }

    #[test]
    fn plugin_limits_come_from_the_file_for_all_plugins_and_by_name() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join(CONFIG_FILE),
            "plugin_describe_cpu_ms = 250\n[plugin_limits]\ncpu_time_ms = 30000\nhost_calls = 500\n\
             [plugin_limits_by_name.debate]\nhost_calls = 50000\n",
        )
        .unwrap();
        let c = Config::load_from(dir.path(), &ConfigOverrides::default()).unwrap();
        let options = c.plugin_load_options();
        let echo = options.limits.for_plugin("echo");
        assert_eq!(echo.cpu_time, Duration::from_secs(30));
        assert_eq!(echo.host_calls, 500);
        assert_eq!(echo.output_bytes, StepLimits::default().output_bytes);
        assert_eq!(options.limits.for_plugin("debate").host_calls, 50_000);
        assert_eq!(options.describe_cpu_time, Duration::from_millis(250));
        // A misspelt limit is an error that names it, not a silent default.
        std::fs::write(
            dir.path().join(CONFIG_FILE),
            "[plugin_limits]\nhost_call = 5\n",
        )
        .unwrap();
        let e = Config::load_from(dir.path(), &ConfigOverrides::default()).unwrap_err();
        assert!(e.to_string().contains("host_call"), "{e}");
    }

    #[test]
    fn intervals_parse_with_units_and_reject_nonsense() {
        assert_eq!(
            "6h".parse::<Interval>().unwrap().0,
            Duration::from_secs(6 * 3600)
        );
        assert_eq!(
            "250ms".parse::<Interval>().unwrap().0,
            Duration::from_millis(250)
        );
        assert_eq!("1d".parse::<Interval>().unwrap().to_string(), "1d");
        assert_eq!("90s".parse::<Interval>().unwrap().to_string(), "90s");
        let e = "6 hours".parse::<Interval>().unwrap_err();
        assert!(e.contains("unknown unit"), "{e}");
        assert!(
            "h".parse::<Interval>()
                .unwrap_err()
                .contains("not a duration")
        );
        assert!("0s".parse::<Interval>().unwrap_err().contains("zero"));
    }

    #[test]
    fn backup_and_log_settings_come_from_the_file_relative_to_the_data_dir() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join(CONFIG_FILE),
            "backup_interval = \"6h\"\nbackup_keep = 3\nlog_file = \"logs/ksi.log\"\nlog_rotation = \"hourly\"\n",
        )
        .unwrap();
        let c = Config::load_from(dir.path(), &ConfigOverrides::default()).unwrap();
        assert_eq!(
            c.backup_interval,
            Some(Interval(Duration::from_secs(6 * 3600)))
        );
        assert_eq!(c.backup_keep, 3);
        assert_eq!(c.backup_dir, dir.path().join("backups"));
        assert_eq!(c.log_file, Some(dir.path().join("logs/ksi.log")));
        assert_eq!(c.log_rotation, LogRotation::Hourly);
        let d = Config::load_from(
            tempfile::tempdir().unwrap().path(),
            &ConfigOverrides::default(),
        )
        .unwrap();
        assert_eq!(
            (d.backup_interval, d.log_file),
            (None, None),
            "off by default"
        );
    }

    #[test]
    fn a_bad_backup_interval_is_an_error_naming_the_value() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(CONFIG_FILE), "backup_interval = \"soon\"\n").unwrap();
        let err = Config::load_from(dir.path(), &ConfigOverrides::default()).unwrap_err();
        assert!(
            err.to_string().contains("\"soon\" is not a duration"),
            "{err}"
        );
    }

    #[test]
    fn unknown_key_in_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(CONFIG_FILE), "bus_max_atempts = 9\n").unwrap();
        let err = Config::load_from(dir.path(), &ConfigOverrides::default()).unwrap_err();
        assert!(err.to_string().contains("bus_max_atempts"), "{err}");
    }
}
