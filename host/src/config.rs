//! Configuration: one typed struct, layered defaults < `ksi.toml` in the data dir < `KSI_*`
//! environment variables < command-line flags.
//!
//! Every knob lives here with its default and a line on what it does. Settings that can change
//! while the daemon runs live in the `config` table instead (see [`crate::store::config`]).

use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

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
    fn unknown_key_in_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(CONFIG_FILE), "bus_max_atempts = 9\n").unwrap();
        let err = Config::load_from(dir.path(), &ConfigOverrides::default()).unwrap_err();
        assert!(err.to_string().contains("bus_max_atempts"), "{err}");
    }
}
