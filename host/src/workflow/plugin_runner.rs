//! Runs workflow steps in WebAssembly plugins: the [`StepRunner`] of the daemon.
//!
//! The plugin's host calls are served by the step's [`StepContext`], so every Claude call,
//! config read and template render a plugin makes is journaled, state and events commit with
//! the step, and files stay inside the data dir. The guest runs on a blocking thread; its
//! host calls block that thread on the async context (never a runtime worker).

use std::sync::Arc;

use serde_json::Value;

use super::{
    BoxFuture, ClaudeAnswer, ClaudeFailure, ClaudeRequest as WfRequest, HandlerRef, ResolvedStep,
    StepContext, StepError, StepInput, StepOutput, StepRunner,
};
use crate::plugins::{
    ClaudeError, ClaudeErrorKind, ClaudeRequest, ClaudeResponse, FileRef as WitFileRef,
    GuestDeterminism, HostServices, LoadedPlugin, LogLevel, PluginRuntime, StepFailure, StepScope,
    TokenUsage,
};
use crate::refs::FileRef;

/// A [`StepRunner`] over the plugin runtime.
pub struct PluginRunner {
    runtime: Arc<PluginRuntime>,
}

impl PluginRunner {
    /// Steps resolve against the plugins loaded in `runtime`.
    pub fn new(runtime: Arc<PluginRuntime>) -> Self {
        PluginRunner { runtime }
    }

    /// The runtime.
    pub fn runtime(&self) -> &Arc<PluginRuntime> {
        &self.runtime
    }
}

impl StepRunner for PluginRunner {
    fn resolve(&self, h: &HandlerRef) -> Result<ResolvedStep, String> {
        let reference = match &h.version {
            Some(req) => format!("{}@{req}", h.plugin),
            None => h.plugin.clone(),
        };
        let plugin = self
            .runtime
            .resolve(&reference)
            .map_err(|e| e.to_string())?;
        if !plugin.info.steps.iter().any(|s| s.name == h.step) {
            return Err(format!(
                "plugin {}@{} has no step {:?} (it handles: {})",
                plugin.info.name,
                plugin.version,
                h.step,
                plugin
                    .info
                    .steps
                    .iter()
                    .map(|s| s.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        Ok(ResolvedStep {
            plugin: plugin.info.name.clone(),
            version: plugin.version.to_string(),
            sha256: plugin.sha256.clone(),
            step: h.step.clone(),
            handle: plugin,
        })
    }

    fn run(
        &self,
        step: ResolvedStep,
        input: StepInput,
        ctx: Arc<StepContext>,
    ) -> BoxFuture<'static, Result<StepOutput, StepError>> {
        let runtime = self.runtime.clone();
        Box::pin(async move {
            let plugin: Arc<LoadedPlugin> = step
                .handle
                .clone()
                .downcast::<LoadedPlugin>()
                .map_err(|_| StepError::fatal("internal: resolved step is not a plugin"))?;
            let wit_input = crate::plugins::StepInput {
                workflow_id: input.workflow_id.clone(),
                workflow_type: input.workflow_type.clone(),
                // The plugin's own step name (the handler), which a workflow step may rename.
                step: step.step.clone(),
                step_index: input.seq as u32,
                attempt: input.attempt,
                params: input.params.to_string(),
                state: input.state.to_string(),
            };
            let host: Arc<dyn HostServices> = Arc::new(ContextHost {
                ctx,
                handle: tokio::runtime::Handle::current(),
            });
            match runtime.run_step(plugin, wit_input, Some(host)).await {
                Ok(r) => Ok(StepOutput {
                    state_patch: r.state_patch,
                    result: r.result,
                    next: r.next_step,
                    events: r.events,
                }),
                Err(f) => Err(step_error(&step, f)),
            }
        })
    }
}

fn step_error(step: &ResolvedStep, f: StepFailure) -> StepError {
    let message = format!(
        "plugin {}@{} step {:?}: {f}",
        step.plugin, step.version, step.step
    );
    StepError {
        retryable: f.is_retryable(),
        message,
    }
}

/// Serves a plugin's host calls from the step's journaled context.
struct ContextHost {
    ctx: Arc<StepContext>,
    handle: tokio::runtime::Handle,
}

fn to_wit_ref(r: &FileRef) -> WitFileRef {
    WitFileRef {
        path: r.path.clone(),
        line: r.line,
        sha256: r.sha256.clone(),
        bytes: r.bytes,
    }
}

fn from_wit_ref(r: &WitFileRef) -> FileRef {
    FileRef {
        path: r.path.clone(),
        line: r.line,
        offset: None,
        sha256: r.sha256.clone(),
        bytes: r.bytes,
    }
}

fn request(r: ClaudeRequest) -> WfRequest {
    WfRequest {
        prompt: r.prompt,
        model: r.model,
        system_prompt: r.system_prompt,
        agent: r.agent,
        session: r.session,
        max_turns: r.max_turns,
    }
}

fn response(a: ClaudeAnswer) -> ClaudeResponse {
    ClaudeResponse {
        text: a.text,
        session_id: a.session_id,
        response_ref: a
            .response_ref
            .as_ref()
            .map(to_wit_ref)
            .unwrap_or(WitFileRef {
                path: String::new(),
                line: None,
                sha256: String::new(),
                bytes: 0,
            }),
        tokens: TokenUsage {
            input: a.tokens_in,
            output: a.tokens_out,
            cache_read: a.tokens_cache_read,
            cache_write: a.tokens_cache_write,
        },
        cost_usd: a.cost_usd,
        duration_ms: a.duration_ms,
        model: a.model,
    }
}

fn failure(f: ClaudeFailure) -> ClaudeError {
    let kind = match f.class.as_str() {
        "budget" | "loop_detected" => ClaudeErrorKind::BudgetExhausted,
        "cancelled" => ClaudeErrorKind::Cancelled,
        _ if f.transient => ClaudeErrorKind::Transient,
        _ => ClaudeErrorKind::Permanent,
    };
    ClaudeError {
        kind,
        message: f.message,
    }
}

impl HostServices for ContextHost {
    fn claude_complete(
        &self,
        _scope: &StepScope,
        req: ClaudeRequest,
    ) -> Result<ClaudeResponse, ClaudeError> {
        self.handle
            .block_on(self.ctx.claude_complete(request(req)))
            .map(response)
            .map_err(failure)
    }

    fn claude_complete_all(
        &self,
        _scope: &StepScope,
        reqs: Vec<ClaudeRequest>,
    ) -> Vec<Result<ClaudeResponse, ClaudeError>> {
        let reqs = reqs.into_iter().map(request).collect();
        self.handle
            .block_on(self.ctx.claude_complete_all(reqs))
            .into_iter()
            .map(|r| r.map(response).map_err(failure))
            .collect()
    }

    fn publish(&self, _scope: &StepScope, topic: &str, data: Value) -> Result<u64, String> {
        self.ctx.publish(topic, data)
    }

    fn read_file(&self, _scope: &StepScope, file: &WitFileRef) -> Result<Vec<u8>, String> {
        self.ctx.files_read(&from_wit_ref(file))
    }

    fn write_file(
        &self,
        _scope: &StepScope,
        name: &str,
        contents: &[u8],
    ) -> Result<WitFileRef, String> {
        self.ctx.files_write(name, contents).map(|r| to_wit_ref(&r))
    }

    fn config_get(&self, scope: &StepScope, key: &str) -> Option<String> {
        // Plugin-specific keys first (`plugins.<name>.<key>`), then the shared key.
        let scoped = format!("plugins.{}.{key}", scope.plugin);
        for k in [scoped.as_str(), key] {
            if let Ok(Some(v)) = self.handle.block_on(self.ctx.config_get(k)) {
                return Some(match v {
                    Value::String(s) => s,
                    other => other.to_string(),
                });
            }
        }
        None
    }

    fn state_get(&self, _scope: &StepScope, key: &str) -> Option<String> {
        self.ctx.state_get(key).map(|v| v.to_string())
    }

    fn state_set(&self, _scope: &StepScope, key: &str, value: Value) -> Result<(), String> {
        self.ctx.state_set(key, value);
        Ok(())
    }

    fn render_template(
        &self,
        _scope: &StepScope,
        name: &str,
        vars: Value,
    ) -> Result<String, String> {
        self.handle
            .block_on(self.ctx.render_template(name, &vars))
            .map_err(|e| e.message)
    }

    fn stop_reason(&self) -> Option<String> {
        self.ctx.stop_reason()
    }

    fn guest_determinism(&self, _scope: &StepScope) -> Option<GuestDeterminism> {
        Some(GuestDeterminism::for_attempt(
            &self.ctx.workflow_id,
            self.ctx.seq,
            self.ctx.attempt,
            self.ctx.asked_at_ms(),
        ))
    }

    fn log(&self, _scope: &StepScope, level: LogLevel, message: &str) {
        let level = match level {
            LogLevel::Trace => "trace",
            LogLevel::Debug => "debug",
            LogLevel::Info => "info",
            LogLevel::Warn => "warn",
            LogLevel::Error => "error",
        };
        self.ctx.log(level, message);
    }
}
