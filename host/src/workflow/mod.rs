//! The durable workflow engine: declarative definitions, instances that survive crashes, steps
//! run by plugins, and a journal of every host call so a re-run never pays twice.
//!
//! How a step runs (see [`engine`]): each step is a bus event on `workflow.<type>.step.<name>`;
//! a worker claims it, resolves the handler through a [`StepRunner`] (the WebAssembly plugin
//! runtime in the daemon), runs it with a [`StepContext`] whose host calls are journaled, and
//! commits in ONE transaction the step's journal row, the new state, the next step's event and
//! the ack of the claimed one. A crash anywhere before that commit re-delivers the step event;
//! the re-run finds its completed host calls in the journal and gets their recorded results.

pub mod condition;
pub mod context;
pub mod definition;
pub mod engine;
pub mod plugin_runner;
pub mod schedule;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::Value;

pub use context::StepContext;
pub use definition::{Definition, DefinitionError, HandlerRef};
pub use engine::{Engine, EngineOptions, InstanceView, StepRecord, WorkflowError};
pub use plugin_runner::PluginRunner;

/// A boxed, sendable future (the traits below are used as trait objects).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What a step handler receives.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StepInput {
    pub workflow_id: String,
    pub workflow_type: String,
    pub step: String,
    /// Execution number of this step within the instance (loops run a step several times).
    pub seq: u64,
    pub attempt: u32,
    /// Workflow params merged with the step's own params.
    pub params: Value,
    pub state: Value,
}

/// What a step handler returns.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct StepOutput {
    /// Merged into the state (JSON merge patch: null removes a key).
    #[serde(default)]
    pub state_patch: Value,
    /// The step's result, kept in the journal (and joined for parallel groups).
    #[serde(default)]
    pub result: Value,
    /// The step to go to (one of the step's `branches`, its `next`, or "end").
    #[serde(default)]
    pub next: Option<String>,
    /// Events to publish when the step commits.
    #[serde(default)]
    pub events: Vec<(String, Value)>,
}

/// A step failure.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, thiserror::Error)]
#[error("{message}")]
pub struct StepError {
    /// Retried per the step's retry policy when true; fails the instance when false.
    pub retryable: bool,
    pub message: String,
}

impl StepError {
    /// A failure worth retrying.
    pub fn retryable(message: impl Into<String>) -> Self {
        StepError {
            retryable: true,
            message: message.into(),
        }
    }

    /// A failure that ends the instance.
    pub fn fatal(message: impl Into<String>) -> Self {
        StepError {
            retryable: false,
            message: message.into(),
        }
    }
}

/// A handler resolved to an exact plugin version.
#[derive(Clone)]
pub struct ResolvedStep {
    pub plugin: String,
    pub version: String,
    pub sha256: String,
    pub step: String,
    /// Runner-specific handle (e.g. the loaded component), held for the whole run so a hot
    /// swap does not affect a step already running.
    pub handle: Arc<dyn std::any::Any + Send + Sync>,
}

impl std::fmt::Debug for ResolvedStep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{}.{}", self.plugin, self.version, self.step)
    }
}

/// Runs step handlers (the plugin runtime in the daemon; closures in tests).
pub trait StepRunner: Send + Sync {
    /// Finds the handler, or says why it cannot be found.
    fn resolve(&self, handler: &HandlerRef) -> Result<ResolvedStep, String>;

    /// Runs one step.
    fn run(
        &self,
        step: ResolvedStep,
        input: StepInput,
        ctx: Arc<StepContext>,
    ) -> BoxFuture<'static, Result<StepOutput, StepError>>;
}

/// A Claude request as a step makes it (the final signature of the plugin contract).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ClaudeRequest {
    pub prompt: String,
    #[serde(default)]
    pub model: Option<String>,
    #[serde(default)]
    pub system_prompt: Option<String>,
    /// The agent whose session continues (`--resume`).
    #[serde(default)]
    pub agent: Option<String>,
    /// An explicit session to resume.
    #[serde(default)]
    pub session: Option<String>,
    #[serde(default)]
    pub max_turns: Option<u32>,
}

/// A completed Claude call.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ClaudeAnswer {
    pub text: String,
    pub session_id: String,
    pub response_ref: Option<crate::refs::FileRef>,
    pub model: String,
    pub tokens_in: u64,
    pub tokens_out: u64,
    pub tokens_cache_read: u64,
    pub tokens_cache_write: u64,
    pub cost_usd: f64,
    pub duration_ms: u64,
    pub process_id: String,
    /// The model asked for (an alias such as `sonnet`); `model` is the one that answered.
    #[serde(default)]
    pub requested_model: String,
    /// Whether the answer and its cost are simulated (`fake-claude`): no money was spent.
    #[serde(default)]
    pub simulated: bool,
}

/// A failed Claude call.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, thiserror::Error)]
#[error("{message}")]
pub struct ClaudeFailure {
    /// Worth retrying the step later (overload, rate limit, timeout).
    pub transient: bool,
    /// The failure class (authentication, billing, budget, ...).
    pub class: String,
    pub message: String,
}

/// Where a workflow's Claude calls go (the executor in the daemon; a double in tests).
pub trait ClaudeApi: Send + Sync {
    /// Runs one call under the given process id (chosen by the journal before the call).
    fn complete(
        &self,
        process_id: String,
        workflow_id: Option<String>,
        request: ClaudeRequest,
    ) -> BoxFuture<'static, Result<ClaudeAnswer, ClaudeFailure>>;

    /// After a crash: the outcome of a process that was started, if it completed.
    fn recover(&self, process_id: String) -> BoxFuture<'static, Option<ClaudeAnswer>>;

    /// Stops a running call (its process group is killed); false when it is not running.
    fn cancel(&self, _process_id: &str) -> bool {
        false
    }

    /// Until when (epoch ms) a running call waits for a subscription limit to reset; its step's
    /// timeout does not run meanwhile. `None`: it is not parked.
    fn parked_until(&self, _process_id: &str) -> Option<i64> {
        None
    }
}

/// A [`ClaudeApi`] for engines that run no Claude call (benchmarks, admin commands): every
/// call is refused with `reason`.
pub struct NoClaude(pub &'static str);

impl ClaudeApi for NoClaude {
    fn complete(
        &self,
        _: String,
        _: Option<String>,
        _: ClaudeRequest,
    ) -> BoxFuture<'static, Result<ClaudeAnswer, ClaudeFailure>> {
        let message = self.0.to_string();
        Box::pin(async move {
            Err(ClaudeFailure {
                transient: false,
                class: "unavailable".into(),
                message,
            })
        })
    }

    fn recover(&self, _: String) -> BoxFuture<'static, Option<ClaudeAnswer>> {
        Box::pin(async { None })
    }
}
