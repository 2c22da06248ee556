//! Per-step limits: CPU time, memory, output size; defaults plus per-plugin overrides.
//!
//! The wasm stack limit is engine-wide (see [`super::EngineConfig::max_wasm_stack`]): wasmtime
//! fixes it when the engine is created.

use std::collections::HashMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The limits one step runs under (and `describe()`, which gets the defaults). Every field has a
/// default and can be set for all plugins (`plugin_limits` in the config file) or one plugin
/// (`plugin_limits_by_name.<plugin>`); `docs/plugins.md` lists them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StepLimits {
    /// Time the guest may spend executing wasm. Time inside host calls (a Claude call that takes
    /// a minute) does not count. Exceeding it interrupts the guest: [`super::StepFailure::Timeout`].
    #[serde(rename = "cpu_time_ms", with = "millis")]
    pub cpu_time: Duration,
    /// Largest linear memory of any one instance, in bytes: [`super::StepFailure::OutOfMemory`].
    pub memory_bytes: usize,
    /// Largest table, in elements.
    pub table_elements: usize,
    /// Largest step output (result + state patch + events), in bytes:
    /// [`super::StepFailure::OutputTooLarge`].
    /// Events it publishes with `bus.publish` and the state it sets with `state.set` count
    /// too: the whole of what the step commits.
    pub output_bytes: usize,
    /// Host calls one step may make (every import of `ksi:plugin` counts; WASI's do not):
    /// [`super::StepFailure::LimitExceeded`]. A loop on `config.get` ends here.
    pub host_calls: u32,
    /// Largest argument of one host call (a prompt, event data, a state value, template
    /// variables, a log line), in bytes; `files.write` is bounded by `file_bytes` instead.
    pub call_bytes: usize,
    /// Bytes one step may write with `files.write`, in all.
    pub file_bytes: usize,
    /// Bytes of log lines one step may write; later lines are dropped (one warning says so).
    pub log_bytes: usize,
    /// Bytes one step may add to the journal (Claude prompts and answers, config values,
    /// rendered templates), in all.
    pub journal_bytes: usize,
}

impl Default for StepLimits {
    fn default() -> Self {
        StepLimits {
            cpu_time: Duration::from_secs(10),
            memory_bytes: 128 << 20,
            table_elements: 100_000,
            output_bytes: 1 << 20,
            host_calls: 10_000,
            call_bytes: 4 << 20,
            file_bytes: 64 << 20,
            log_bytes: 1 << 20,
            journal_bytes: 64 << 20,
        }
    }
}

/// Per-plugin overrides of [`StepLimits`]; unset fields keep the defaults.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitOverrides {
    /// See [`StepLimits::cpu_time`].
    #[serde(default, rename = "cpu_time_ms", with = "opt_millis")]
    pub cpu_time: Option<Duration>,
    /// See [`StepLimits::memory_bytes`].
    #[serde(default)]
    pub memory_bytes: Option<usize>,
    /// See [`StepLimits::table_elements`].
    #[serde(default)]
    pub table_elements: Option<usize>,
    /// See [`StepLimits::output_bytes`].
    #[serde(default)]
    pub output_bytes: Option<usize>,
    /// See [`StepLimits::host_calls`].
    #[serde(default)]
    pub host_calls: Option<u32>,
    /// See [`StepLimits::call_bytes`].
    #[serde(default)]
    pub call_bytes: Option<usize>,
    /// See [`StepLimits::file_bytes`].
    #[serde(default)]
    pub file_bytes: Option<usize>,
    /// See [`StepLimits::log_bytes`].
    #[serde(default)]
    pub log_bytes: Option<usize>,
    /// See [`StepLimits::journal_bytes`].
    #[serde(default)]
    pub journal_bytes: Option<usize>,
}

impl StepLimits {
    /// These limits with `overrides` applied.
    pub fn with(self, overrides: &LimitOverrides) -> StepLimits {
        StepLimits {
            cpu_time: overrides.cpu_time.unwrap_or(self.cpu_time),
            memory_bytes: overrides.memory_bytes.unwrap_or(self.memory_bytes),
            table_elements: overrides.table_elements.unwrap_or(self.table_elements),
            output_bytes: overrides.output_bytes.unwrap_or(self.output_bytes),
            host_calls: overrides.host_calls.unwrap_or(self.host_calls),
            call_bytes: overrides.call_bytes.unwrap_or(self.call_bytes),
            file_bytes: overrides.file_bytes.unwrap_or(self.file_bytes),
            log_bytes: overrides.log_bytes.unwrap_or(self.log_bytes),
            journal_bytes: overrides.journal_bytes.unwrap_or(self.journal_bytes),
        }
    }
}

/// Default limits plus overrides by plugin name.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LimitPolicy {
    /// Limits of plugins without overrides.
    pub defaults: StepLimits,
    /// Overrides by plugin name.
    #[serde(default)]
    pub plugins: HashMap<String, LimitOverrides>,
}

impl LimitPolicy {
    /// The limits for plugin `name`.
    pub fn for_plugin(&self, name: &str) -> StepLimits {
        match self.plugins.get(name) {
            Some(overrides) => self.defaults.with(overrides),
            None => self.defaults,
        }
    }
}

/// The `ResourceLimiter` of one step's store. It refuses growth beyond the limits and remembers
/// the refusal, so that the trap that usually follows (a Rust guest aborts when allocation
/// fails) is reported as running out of memory rather than as a bare `unreachable`.
#[derive(Debug)]
pub(crate) struct StepLimiter {
    pub memory_bytes: usize,
    pub table_elements: usize,
    /// The size of the refused memory growth, if any.
    pub memory_denied: Option<usize>,
}

impl StepLimiter {
    pub fn new(limits: &StepLimits) -> Self {
        StepLimiter {
            memory_bytes: limits.memory_bytes,
            table_elements: limits.table_elements,
            memory_denied: None,
        }
    }
}

impl wasmtime::ResourceLimiter for StepLimiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let allowed = desired <= self.memory_bytes && maximum.is_none_or(|max| desired <= max);
        if !allowed {
            self.memory_denied = Some(desired);
        }
        Ok(allowed)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= self.table_elements && maximum.is_none_or(|max| desired <= max))
    }
}

mod millis {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_millis() as u64)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_millis(u64::deserialize(d)?))
    }
}

mod opt_millis {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_some(&(d.as_millis() as u64)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        Ok(Option::<u64>::deserialize(d)?.map(Duration::from_millis))
    }
}
