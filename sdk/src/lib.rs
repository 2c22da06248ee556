//! ksi-sdk: write KSI workflow steps as WebAssembly components.
//!
//! A KSI workflow (a debate, an analysis, a teaching session) is a list of steps; the logic of
//! each step lives in a plugin, a WebAssembly component that the `ksi-host` daemon loads from its
//! `plugins/` directory and replaces while it runs. This crate is everything a plugin author
//! needs: the bindings of the `ksi:plugin` contract (see `wit/plugin.wit`), the [`Plugin`] trait
//! and [`export!`] macro, serde helpers for typed params and state, and small wrappers around the
//! host's services ([`claude`], [`bus`], [`files`], [`log`], [`config`], [`state`], [`templates`]).
//!
//! # A complete plugin
//!
//! `Cargo.toml`:
//!
//! ```toml
//! [package]
//! name = "greet"
//! version = "0.1.0"
//! edition = "2024"
//!
//! [lib]
//! crate-type = ["cdylib"]
//!
//! [dependencies]
//! ksi-sdk = "0.1"
//! serde = { version = "1", features = ["derive"] }
//! ```
//!
//! `src/lib.rs`:
//!
//! ```no_run
//! use ksi_sdk::{claude, log, Plugin, PluginInfo, StepError, StepInput, StepOutput};
//! use serde::Deserialize;
//!
//! #[derive(Deserialize)]
//! struct Params {
//!     name: String,
//! }
//!
//! struct Greet;
//!
//! impl Plugin for Greet {
//!     fn describe() -> PluginInfo {
//!         PluginInfo::new("greet", env!("CARGO_PKG_VERSION"))
//!             .description("Greets someone with Claude's help")
//!             .step("hello", "Ask Claude for a greeting")
//!     }
//!
//!     fn run(input: StepInput) -> Result<StepOutput, StepError> {
//!         let params: Params = input.params()?;
//!         log::info!("greeting {}", params.name);
//!         let answer = claude::complete(
//!             claude::Request::new(format!("Write a one-line greeting for {}", params.name))
//!                 .model("sonnet")
//!                 .agent("greeter"),
//!         )?;
//!         StepOutput::new()
//!             .result(&serde_json::json!({ "greeting": answer.text }))?
//!             .patch(&serde_json::json!({ "greeter_session": answer.session_id }))
//!     }
//! }
//!
//! ksi_sdk::export!(Greet);
//! ```
//!
//! Build it into a component and drop it into a running daemon's plugins directory:
//!
//! ```text
//! cargo build --target wasm32-wasip2 --release
//! cp target/wasm32-wasip2/release/greet.wasm <data-dir>/plugins/
//! ksi-host plugin check target/wasm32-wasip2/release/greet.wasm   # without a daemon
//! ```
//!
//! `ksi plugin new NAME` writes this skeleton for you.
//!
//! # Rules of the sandbox
//!
//! - Every step runs in a fresh instance: globals do not survive between steps. Keep what must
//!   survive in the workflow state ([`StepOutput::patch`], [`state`]) or in files ([`files`]).
//! - A plugin has no network, no environment variables and no file system beyond what the host
//!   grants; talk to the world through the host's services.
//! - Steps have a CPU-time and a memory limit. A step that exceeds one fails with a timeout or an
//!   out-of-memory error; a panic fails the step as a trap.
//! - Host calls are journaled: when a step is re-run after a crash, Claude calls that completed
//!   return their recorded answers. Keep `run` deterministic given its input and host answers.

#![warn(missing_docs)]

/// Bindings generated from `wit/plugin.wit` by `wit-bindgen`. The wrappers in this crate cover
/// them; reach in here only for what they do not.
#[allow(missing_docs)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "../wit",
        world: "step-handler",
        pub_export_macro: true,
        export_macro_name: "__export_step_handler",
        default_bindings_module: "ksi_sdk::bindings",
    });
}

use serde::Serialize;
use serde::de::DeserializeOwned;

pub use bindings::exports::ksi::plugin::handler::{
    ErrorKind, Event, PluginInfo, StepError, StepInfo, StepInput, StepOutput,
};
pub use bindings::ksi::plugin::types::FileRef;
/// Re-exported so that plugins need not depend on `serde_json` themselves.
pub use serde_json;

/// What a plugin implements. Register the implementing type with [`export!`].
pub trait Plugin {
    /// The plugin's name, version and steps. Called once when the host loads the plugin.
    fn describe() -> PluginInfo;

    /// Run one step. `input.step` names the step; each call runs in a fresh instance.
    ///
    /// # Errors
    ///
    /// A [`StepError`] says whether the step may succeed when run again
    /// ([`StepError::retryable`]) or not ([`StepError::fatal`]).
    fn run(input: StepInput) -> Result<StepOutput, StepError>;
}

/// Export a [`Plugin`] implementation as the component's `ksi:plugin/handler`.
///
/// ```ignore
/// struct MyPlugin;
/// impl ksi_sdk::Plugin for MyPlugin { /* describe, run */ }
/// ksi_sdk::export!(MyPlugin);
/// ```
#[macro_export]
macro_rules! export {
    ($plugin:ty) => {
        #[doc(hidden)]
        pub struct __KsiPluginExport;

        impl $crate::bindings::exports::ksi::plugin::handler::Guest for __KsiPluginExport {
            fn describe() -> $crate::PluginInfo {
                <$plugin as $crate::Plugin>::describe()
            }

            fn run(
                input: $crate::StepInput,
            ) -> ::core::result::Result<$crate::StepOutput, $crate::StepError> {
                <$plugin as $crate::Plugin>::run(input)
            }
        }

        $crate::bindings::__export_step_handler!(__KsiPluginExport with_types_in $crate::bindings);
    };
}

impl PluginInfo {
    /// A plugin called `name` at semver `version` (usually `env!("CARGO_PKG_VERSION")`).
    pub fn new(name: impl Into<String>, version: impl Into<String>) -> Self {
        PluginInfo {
            name: name.into(),
            version: version.into(),
            description: String::new(),
            steps: Vec::new(),
        }
    }

    /// Set the one-line description.
    pub fn description(mut self, description: impl Into<String>) -> Self {
        self.description = description.into();
        self
    }

    /// Add a step this plugin handles.
    pub fn step(mut self, name: impl Into<String>, description: impl Into<String>) -> Self {
        self.steps.push(StepInfo {
            name: name.into(),
            description: description.into(),
            params_schema: None,
        });
        self
    }

    /// Add a step with the JSON Schema of its params.
    pub fn step_with_schema(
        mut self,
        name: impl Into<String>,
        description: impl Into<String>,
        params_schema: serde_json::Value,
    ) -> Self {
        self.steps.push(StepInfo {
            name: name.into(),
            description: description.into(),
            params_schema: Some(params_schema.to_string()),
        });
        self
    }
}

impl StepInput {
    /// The step's params, deserialized.
    ///
    /// # Errors
    ///
    /// A fatal [`StepError`] naming the step when the params do not match `T`.
    pub fn params<T: DeserializeOwned>(&self) -> Result<T, StepError> {
        serde_json::from_str(&self.params)
            .map_err(|e| StepError::fatal(format!("invalid params for step {}: {e}", self.step)))
    }

    /// The workflow state before this step, deserialized.
    ///
    /// # Errors
    ///
    /// A fatal [`StepError`] when the state does not match `T`.
    pub fn state<T: DeserializeOwned>(&self) -> Result<T, StepError> {
        serde_json::from_str(&self.state).map_err(|e| {
            StepError::fatal(format!(
                "unexpected workflow state in step {}: {e}",
                self.step
            ))
        })
    }
}

impl Default for StepOutput {
    fn default() -> Self {
        StepOutput {
            state_patch: "{}".to_string(),
            result: "null".to_string(),
            next_step: None,
            events: Vec::new(),
        }
    }
}

impl StepOutput {
    /// An output that changes nothing and returns `null`.
    pub fn new() -> Self {
        Self::default()
    }

    /// Set the step's result.
    ///
    /// # Errors
    ///
    /// A fatal [`StepError`] when `result` cannot be serialized.
    pub fn result<T: Serialize>(mut self, result: &T) -> Result<Self, StepError> {
        self.result = to_json(result)?;
        Ok(self)
    }

    /// Set the JSON merge patch applied to the workflow state.
    ///
    /// # Errors
    ///
    /// A fatal [`StepError`] when `patch` cannot be serialized.
    pub fn patch<T: Serialize>(mut self, patch: &T) -> Result<Self, StepError> {
        self.state_patch = to_json(patch)?;
        Ok(self)
    }

    /// Choose the next step, overriding the workflow definition's order.
    pub fn next(mut self, step: impl Into<String>) -> Self {
        self.next_step = Some(step.into());
        self
    }

    /// Publish an event when the step commits.
    ///
    /// # Errors
    ///
    /// A fatal [`StepError`] when `data` cannot be serialized.
    pub fn event<T: Serialize>(
        mut self,
        topic: impl Into<String>,
        data: &T,
    ) -> Result<Self, StepError> {
        self.events.push(Event {
            topic: topic.into(),
            data: to_json(data)?,
        });
        Ok(self)
    }
}

impl StepError {
    /// A failure that running the step again may fix.
    pub fn retryable(message: impl Into<String>) -> Self {
        StepError {
            kind: ErrorKind::Retryable,
            message: message.into(),
        }
    }

    /// A failure that running the step again will not fix.
    pub fn fatal(message: impl Into<String>) -> Self {
        StepError {
            kind: ErrorKind::Fatal,
            message: message.into(),
        }
    }
}

fn to_json<T: Serialize>(value: &T) -> Result<String, StepError> {
    serde_json::to_string(value).map_err(|e| StepError::fatal(format!("cannot serialize: {e}")))
}

/// Serde helpers for step params that come from the command line or HTTP as text.
pub mod params {
    use serde::{Deserialize, Deserializer};

    /// Accepts `3` as well as `"3"` (what `ksi run --param parts=3` passes):
    /// `#[serde(deserialize_with = "ksi_sdk::params::lenient_u32")]`.
    ///
    /// # Errors
    /// A value that is neither a whole number nor text holding one.
    pub fn lenient_u32<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Number {
            Int(u32),
            Text(String),
        }
        match Number::deserialize(d)? {
            Number::Int(n) => Ok(n),
            Number::Text(s) => s
                .trim()
                .parse()
                .map_err(|_| serde::de::Error::custom(format!("{s:?} is not a whole number"))),
        }
    }
}

/// A named agent and the Claude session it continues; keep it in the workflow state so the
/// agent's next call resumes its conversation (`Request::agent(..).resume_opt(..)`).
#[derive(serde::Serialize, serde::Deserialize, Clone, Debug, Default, PartialEq)]
pub struct Agent {
    /// The agent's name (the host keeps one sandbox and session per name).
    pub agent: String,
    /// The Claude session to resume, once the agent has spoken.
    pub session: Option<String>,
}

/// Claude calls through the host's executor.
pub mod claude {
    use crate::StepError;
    use crate::bindings::ksi::plugin::claude as wit;

    pub use wit::{ClaudeError, ClaudeErrorKind, Request, Response, TokenUsage};

    impl Request {
        /// A request with `prompt` and the host's defaults for everything else.
        pub fn new(prompt: impl Into<String>) -> Self {
            Request {
                prompt: prompt.into(),
                model: None,
                system_prompt: None,
                agent: None,
                session: None,
                max_turns: None,
            }
        }

        /// Use this model (`sonnet`, `opus`, a full model name).
        pub fn model(mut self, model: impl Into<String>) -> Self {
            self.model = Some(model.into());
            self
        }

        /// Append this system prompt.
        pub fn system_prompt(mut self, system_prompt: impl Into<String>) -> Self {
            self.system_prompt = Some(system_prompt.into());
            self
        }

        /// Speak as this agent; the host resumes the agent's session unless [`Request::resume`] is set.
        pub fn agent(mut self, agent: impl Into<String>) -> Self {
            self.agent = Some(agent.into());
            self
        }

        /// Continue this session.
        pub fn resume(mut self, session: impl Into<String>) -> Self {
            self.session = Some(session.into());
            self
        }

        /// Continue this session when there is one.
        pub fn resume_opt(mut self, session: Option<String>) -> Self {
            self.session = session;
            self
        }

        /// Limit the agentic turns.
        pub fn max_turns(mut self, max_turns: u32) -> Self {
            self.max_turns = Some(max_turns);
            self
        }
    }

    impl From<ClaudeError> for StepError {
        /// Transient Claude failures make the step retryable; the others fail it.
        fn from(e: ClaudeError) -> Self {
            let message = format!("claude call failed ({:?}): {}", e.kind, e.message);
            match e.kind {
                ClaudeErrorKind::Transient => StepError::retryable(message),
                _ => StepError::fatal(message),
            }
        }
    }

    /// Run one Claude call and wait for its answer.
    ///
    /// # Errors
    ///
    /// The executor's [`ClaudeError`]; `?` turns it into a [`StepError`].
    pub fn complete(request: Request) -> Result<Response, ClaudeError> {
        wit::complete(&request)
    }

    /// Run several Claude calls concurrently; the answers come back in request order.
    pub fn complete_all(requests: &[Request]) -> Vec<Result<Response, ClaudeError>> {
        wit::complete_all(requests)
    }
}

/// The durable event bus.
pub mod bus {
    use serde::Serialize;

    /// Publish `data` as JSON on `topic`; returns the event id.
    ///
    /// # Errors
    ///
    /// The host's reason (bad topic, serialization failure, bus unavailable).
    pub fn publish<T: Serialize>(topic: &str, data: &T) -> Result<u64, String> {
        let data = serde_json::to_string(data).map_err(|e| e.to_string())?;
        crate::bindings::ksi::plugin::bus::publish(topic, &data)
    }
}

/// Files in the data directory, by reference.
pub mod files {
    use crate::FileRef;

    /// Read the referenced bytes (the host verifies the hash).
    ///
    /// # Errors
    ///
    /// Missing file, hash mismatch, or a reference outside the data directory.
    pub fn read(file: &FileRef) -> Result<Vec<u8>, String> {
        crate::bindings::ksi::plugin::files::read(file)
    }

    /// Store `contents` as the workflow-scoped file `name`.
    ///
    /// # Errors
    ///
    /// The host's reason (bad name, disk full, ...).
    pub fn write(name: &str, contents: &[u8]) -> Result<FileRef, String> {
        crate::bindings::ksi::plugin::files::write(name, contents)
    }
}

/// Logging into the host's log, tagged with the workflow and step.
///
/// Use the macros: `ksi_sdk::log::info!("round {} done", n)`.
pub mod log {
    pub use crate::bindings::ksi::plugin::logging::Level;
    pub use crate::{
        __ksi_log_debug as debug, __ksi_log_error as error, __ksi_log_info as info,
        __ksi_log_trace as trace, __ksi_log_warn as warn,
    };

    /// Write `message` at `level`.
    pub fn write(level: Level, message: &str) {
        crate::bindings::ksi::plugin::logging::log(level, message)
    }
}

#[doc(hidden)]
#[macro_export]
macro_rules! __ksi_log_trace {
    ($($arg:tt)*) => { $crate::log::write($crate::log::Level::Trace, &::std::format!($($arg)*)) };
}
#[doc(hidden)]
#[macro_export]
macro_rules! __ksi_log_debug {
    ($($arg:tt)*) => { $crate::log::write($crate::log::Level::Debug, &::std::format!($($arg)*)) };
}
#[doc(hidden)]
#[macro_export]
macro_rules! __ksi_log_info {
    ($($arg:tt)*) => { $crate::log::write($crate::log::Level::Info, &::std::format!($($arg)*)) };
}
#[doc(hidden)]
#[macro_export]
macro_rules! __ksi_log_warn {
    ($($arg:tt)*) => { $crate::log::write($crate::log::Level::Warn, &::std::format!($($arg)*)) };
}
#[doc(hidden)]
#[macro_export]
macro_rules! __ksi_log_error {
    ($($arg:tt)*) => { $crate::log::write($crate::log::Level::Error, &::std::format!($($arg)*)) };
}

/// Host configuration visible to plugins.
pub mod config {
    /// The value of `key`, if set.
    pub fn get(key: &str) -> Option<String> {
        crate::bindings::ksi::plugin::config::get(key)
    }
}

/// Workflow-scoped key/value state, committed with the step.
pub mod state {
    use crate::StepError;
    use serde::Serialize;
    use serde::de::DeserializeOwned;

    /// The value stored under `key`, deserialized.
    ///
    /// # Errors
    ///
    /// A fatal [`StepError`] when the stored value does not match `T`.
    pub fn get<T: DeserializeOwned>(key: &str) -> Result<Option<T>, StepError> {
        crate::bindings::ksi::plugin::state::get(key)
            .map(|json| {
                serde_json::from_str(&json).map_err(|e| {
                    StepError::fatal(format!(
                        "state key {key} does not hold the expected type: {e}"
                    ))
                })
            })
            .transpose()
    }

    /// Store `value` under `key`.
    ///
    /// # Errors
    ///
    /// A fatal [`StepError`] when the value cannot be serialized or stored.
    pub fn set<T: Serialize>(key: &str, value: &T) -> Result<(), StepError> {
        let json = serde_json::to_string(value)
            .map_err(|e| StepError::fatal(format!("cannot serialize state key {key}: {e}")))?;
        crate::bindings::ksi::plugin::state::set(key, &json)
            .map_err(|e| StepError::fatal(format!("cannot store state key {key}: {e}")))
    }
}

/// Prompt templates kept by the host.
pub mod templates {
    use crate::StepError;
    use serde::Serialize;

    /// Render template `name` with `vars` (serialized to a JSON object).
    ///
    /// # Errors
    ///
    /// A fatal [`StepError`] when the template is unknown or fails to render.
    pub fn render<T: Serialize>(name: &str, vars: &T) -> Result<String, StepError> {
        let vars = serde_json::to_string(vars)
            .map_err(|e| StepError::fatal(format!("cannot serialize template vars: {e}")))?;
        crate::bindings::ksi::plugin::templates::render(name, &vars)
            .map_err(|e| StepError::fatal(format!("template {name}: {e}")))
    }
}
