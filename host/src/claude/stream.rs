//! Parser of the Claude CLI's stdout: stream-json lines in, typed [`StreamEvent`]s out.
//!
//! The CLI's output has drifted a lot between versions (see `tests/fixtures/claude-cli/`), so the
//! parser is deliberately lenient about shape and strict about meaning:
//!
//! - it is fed one stdout line at a time, so it works while the child is still running;
//! - keys may come in any order and unknown message types are ignored;
//! - non-JSON lines (debug logs, warnings) are skipped and logged at `debug`;
//! - a JSON value spread over several lines (pretty-printed, or a log that turned `\n` escapes into
//!   real newlines) is accumulated until it parses;
//! - a JSON array (`--output-format json --verbose`) is unpacked message by message, and the old
//!   single-object `--output-format json` result is understood too;
//! - totals (cost, tokens, turns, durations) come only from the final `result` message, never from
//!   the per-message `usage`, which the CLI fills with placeholders.
//!
//! [`ParsedRun`] folds the events of one run into what the executor records.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A multi-line JSON value larger than this is abandoned (and reported as skipped), so a stray
/// `{` on stdout cannot make the parser buffer the rest of the run.
const MAX_PENDING_BYTES: usize = 32 * 1024 * 1024;

/// The `system`/`init` message: what the CLI says about the session it started.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct InitInfo {
    /// The session id of this run (for `--resume` the resumed id).
    pub session_id: Option<String>,
    /// The model the CLI resolved (`sonnet` → `claude-sonnet-...`).
    pub model: Option<String>,
    /// `claude_code_version`; absent before 2.1.
    pub version: Option<String>,
    /// The working directory the CLI runs in.
    pub cwd: Option<String>,
    /// `permissionMode` (`default`, `acceptEdits`, `bypassPermissions`, `auto`, ...).
    pub permission_mode: Option<String>,
    /// `apiKeySource` (`none`, `ANTHROPIC_API_KEY`, ...).
    pub api_key_source: Option<String>,
    /// Names of the tools the session may use.
    pub tools: Vec<String>,
    /// Whether the executable labelled itself as simulated (`fake-claude`).
    #[serde(default)]
    pub simulated: bool,
}

/// One `system`/`api_retry` line: the CLI is retrying an API call itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct ApiRetry {
    /// 1-based retry number.
    pub attempt: Option<u32>,
    /// The CLI's own retry limit (`max_retries`).
    pub max_retries: Option<u32>,
    /// How long the CLI waits before this retry, in milliseconds (`retry_delay_ms`, a float).
    pub delay_ms: Option<f64>,
    /// HTTP status of the failed call, when there was one (`error_status`).
    pub error_status: Option<u16>,
    /// The CLI's error code for the failed call (`error`, e.g. `unknown`, `rate_limit`).
    pub error: Option<String>,
}

/// A `rate_limit_event` line: the subscription quota state the CLI reports.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct RateLimitInfo {
    /// `allowed`, `allowed_warning`, `rejected`, ...
    pub status: Option<String>,
    /// Unix time (seconds) at which the limit resets.
    pub resets_at: Option<i64>,
    /// `five_hour`, `seven_day`, ...
    pub limit_type: Option<String>,
}

/// The synthetic assistant message the CLI prints instead of a model answer when the API call
/// failed (`"model":"<synthetic>"` with an `error` code).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct ApiErrorMessage {
    /// The CLI's error code: `authentication_failed`, `billing_error`, `model_not_found`,
    /// `rate_limit`, `overloaded`, `server_error`, `invalid_request`, `max_output_tokens`, `unknown`, ...
    pub code: String,
    /// The message text shown to the user (e.g. `Not logged in · Please run /login`).
    pub text: String,
}

/// Token counts as the CLI reports them in the final `result`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct TokenUsage {
    /// `input_tokens` (uncached input).
    pub input: u64,
    /// `output_tokens`.
    pub output: u64,
    /// `cache_read_input_tokens`.
    pub cache_read: u64,
    /// `cache_creation_input_tokens`.
    pub cache_creation: u64,
}

/// Per-model totals from the result's `modelUsage` (a run may use a side model, e.g. haiku).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct ModelUsage {
    /// Token counts for this model.
    pub tokens: TokenUsage,
    /// `costUSD` for this model.
    pub cost_usd: Option<f64>,
}

/// The final `result` message: the only source of totals.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct ResultSummary {
    /// `success`, `error_max_turns`, `error_during_execution`, `error_max_budget_usd`, ...
    /// Note that API failures arrive as `success` with `is_error: true`.
    pub subtype: Option<String>,
    /// Whether the run failed. When the field is missing it is derived from `subtype`.
    pub is_error: bool,
    /// The answer (`result`), or the CLI's error message when `is_error`.
    pub text: Option<String>,
    /// Session id of the conversation, to pass to `--resume` next time.
    pub session_id: Option<String>,
    /// Total cost: `total_cost_usd`, or the older `total_cost` / `cost_usd`.
    pub total_cost_usd: Option<f64>,
    /// Token totals of the call: the sum over `modelUsage` when the result has it (it counts
    /// subagents and side models), else the result's `usage`.
    pub usage: TokenUsage,
    /// The result's own `usage`: the main agent only.
    #[serde(default)]
    pub main_usage: TokenUsage,
    /// Per-model totals from `modelUsage`, keyed by model name.
    pub model_usage: BTreeMap<String, ModelUsage>,
    /// Number of agent turns.
    pub num_turns: Option<u32>,
    /// Wall time the CLI measured.
    pub duration_ms: Option<u64>,
    /// Time spent in API calls.
    pub duration_api_ms: Option<u64>,
    /// HTTP status of the failing API call (`api_error_status`), when the failure was an API error.
    pub api_error_status: Option<u16>,
    /// `errors[]` (error subtypes carry their messages here).
    pub errors: Vec<String>,
    /// `terminal_reason` (`completed`, `api_error`, ...), 2.1.x only.
    pub terminal_reason: Option<String>,
    /// `stop_reason` of the last model message.
    pub stop_reason: Option<String>,
    /// `structured_output`, present when `--json-schema` was given.
    pub structured_output: Option<Value>,
    /// How many tool calls the permission system denied.
    pub permission_denials: usize,
    /// The result message's own `uuid`.
    pub uuid: Option<String>,
    /// Whether `text` was taken from the last top-level assistant message because the CLI's
    /// `result` was empty (a known CLI bug: `"result":""` with output tokens).
    #[serde(default)]
    pub text_fallback: bool,
    /// Whether the executable labelled its output as simulated (`fake-claude` does, on every
    /// line): its cost is not money.
    #[serde(default)]
    pub simulated: bool,
}

impl ResultSummary {
    /// The model that answered: the costliest of `modelUsage` (the main model; side models such
    /// as haiku cost less), `None` without one.
    pub fn main_model(&self) -> Option<&str> {
        self.model_usage
            .iter()
            .max_by(|a, b| {
                let cost = |u: &ModelUsage| u.cost_usd.unwrap_or(0.0);
                cost(a.1)
                    .total_cmp(&cost(b.1))
                    .then((a.1.tokens.output).cmp(&b.1.tokens.output))
            })
            .map(|(name, _)| name.as_str())
    }
}

/// One thing the CLI said, as far as KSI cares.
#[derive(Debug, Clone, PartialEq)]
pub enum StreamEvent {
    /// `system`/`init`: the session started.
    Init(InitInfo),
    /// A text block of an assistant message.
    AssistantText {
        /// `message.id`; several lines can share one id (one line per content block).
        message_id: Option<String>,
        /// The text of this block.
        text: String,
        /// `parent_tool_use_id`: set when a subagent (a `Task` tool call) said it, `None` for
        /// the main agent.
        parent_tool_use_id: Option<String>,
    },
    /// A tool call requested by the model.
    ToolUse {
        /// `message.id` of the assistant message carrying the call.
        message_id: Option<String>,
        /// The tool-use id (`toolu_...`).
        id: String,
        /// Tool name (`Bash`, `Write`, `mcp__server__tool`, ...).
        name: String,
        /// The tool's input, as given.
        input: Value,
    },
    /// The result of a tool call, from a `user` message.
    ToolResult {
        /// The tool-use id it answers.
        tool_use_id: String,
        /// The result content, flattened to text.
        content: String,
        /// Whether the tool reported an error.
        is_error: bool,
    },
    /// The CLI is retrying an API call (progress, not a failure yet).
    ApiRetry(ApiRetry),
    /// The quota state changed or was reported.
    RateLimit(RateLimitInfo),
    /// A synthetic assistant message reporting an API failure.
    ApiError(ApiErrorMessage),
    /// The final result.
    Result(ResultSummary),
    /// A stdout line (or a block of lines) that is not a JSON message.
    Skipped {
        /// The skipped text (possibly several lines joined by `\n`).
        line: String,
    },
}

/// Incremental parser: feed stdout lines, get events.
///
/// ```
/// use ksi_host::claude::stream::{StreamEvent, StreamParser};
/// let mut parser = StreamParser::new();
/// let events = parser.feed_line(r#"{"type":"result","is_error":false,"result":"4","total_cost_usd":0.01}"#);
/// assert!(matches!(&events[0], StreamEvent::Result(r) if r.text.as_deref() == Some("4")));
/// ```
#[derive(Debug, Default)]
pub struct StreamParser {
    /// Lines of a JSON value that has not parsed completely yet.
    pending: String,
    /// Whether `pending` ends inside a JSON string literal.
    pending_in_string: bool,
    /// Whether `pending` ends right after a backslash inside a string.
    pending_escaped: bool,
    /// The value a multi-line block just completed into (see [`Self::take_joined`]).
    joined: Option<Value>,
}

impl StreamParser {
    /// A parser with nothing buffered.
    pub fn new() -> Self {
        Self::default()
    }

    /// Feed one stdout line (with or without its trailing newline).
    ///
    /// Returns the events completed by this line: none while a multi-line value is still being
    /// accumulated, several for a JSON array.
    pub fn feed_line(&mut self, line: &str) -> Vec<StreamEvent> {
        let line = line.strip_suffix('\n').unwrap_or(line);
        let line = line.strip_suffix('\r').unwrap_or(line);
        let mut events = Vec::new();
        if self.pending.is_empty() {
            self.start_value(line, &mut events);
            return events;
        }
        // A compact message line always starts with `{"`; a pretty-printed continuation never
        // does. So such a line that parses on its own means the buffered value was truncated.
        let trimmed = line.trim_start();
        if trimmed.starts_with("{\"")
            && let Ok(value) = serde_json::from_str::<Value>(trimmed)
        {
            self.abandon_pending(&mut events);
            handle_value(value, &mut events);
            return events;
        }
        // Inside a string, a line break must have been an escaped `\n` that something unescaped.
        if self.pending_in_string {
            self.pending.push_str("\\n");
        } else {
            self.pending.push('\n');
        }
        self.push_pending(line);
        match serde_json::from_str::<Value>(&self.pending) {
            Ok(value) => {
                self.clear_pending();
                self.joined = Some(value.clone());
                handle_value(value, &mut events);
            }
            Err(e) if e.is_eof() && self.pending.len() <= MAX_PENDING_BYTES => {}
            Err(e) => {
                tracing::debug!(error = %e, "abandoning a multi-line stdout block that is not JSON");
                self.abandon_pending(&mut events);
                // The line that broke the block may itself start something valid.
                self.start_value(line, &mut events);
            }
        }
        events
    }

    /// Whether the lines fed so far end inside a multi-line JSON value.
    pub fn is_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// The value that the last fed line completed, when it closed a multi-line block.
    pub fn take_joined(&mut self) -> Option<Value> {
        self.joined.take()
    }

    /// Feed a chunk of stdout that may hold several lines; convenient for captured output.
    pub fn feed_text(&mut self, text: &str) -> Vec<StreamEvent> {
        text.lines().flat_map(|l| self.feed_line(l)).collect()
    }

    /// End of stdout: anything still buffered is reported as skipped.
    pub fn finish(&mut self) -> Vec<StreamEvent> {
        let mut events = Vec::new();
        if !self.pending.is_empty() {
            self.abandon_pending(&mut events);
        }
        events
    }

    fn start_value(&mut self, line: &str, events: &mut Vec<StreamEvent>) {
        let trimmed = line.trim();
        if trimmed.is_empty() {
            return;
        }
        if !(trimmed.starts_with('{') || trimmed.starts_with('[')) {
            skip(line, events);
            return;
        }
        match serde_json::from_str::<Value>(trimmed) {
            Ok(value) => handle_value(value, events),
            Err(e) if e.is_eof() => self.push_pending(trimmed),
            Err(_) => skip(line, events),
        }
    }

    fn push_pending(&mut self, text: &str) {
        self.pending.push_str(text);
        for c in text.chars() {
            if self.pending_escaped {
                self.pending_escaped = false;
            } else if self.pending_in_string && c == '\\' {
                self.pending_escaped = true;
            } else if c == '"' {
                self.pending_in_string = !self.pending_in_string;
            }
        }
    }

    fn clear_pending(&mut self) {
        self.pending.clear();
        self.pending_in_string = false;
        self.pending_escaped = false;
    }

    fn abandon_pending(&mut self, events: &mut Vec<StreamEvent>) {
        let block = std::mem::take(&mut self.pending);
        self.clear_pending();
        skip(&block, events);
    }
}

fn skip(line: &str, events: &mut Vec<StreamEvent>) {
    tracing::debug!(line = %truncate_for_log(line), "skipping a stdout line that is not a JSON message");
    events.push(StreamEvent::Skipped {
        line: line.to_string(),
    });
}

fn truncate_for_log(s: &str) -> &str {
    match s.char_indices().nth(200) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

fn handle_value(value: Value, events: &mut Vec<StreamEvent>) {
    match value {
        Value::Array(items) => {
            for item in items {
                if let Value::Object(_) = item {
                    handle_message(&item, events);
                }
            }
        }
        Value::Object(_) => handle_message(&value, events),
        // A bare number or string is what text mode prints (e.g. the answer `4`).
        other => skip(&other.to_string(), events),
    }
}

fn handle_message(msg: &Value, events: &mut Vec<StreamEvent>) {
    let kind = str_field(msg, "type");
    match kind.as_deref() {
        Some("system") => match str_field(msg, "subtype").as_deref() {
            Some("init") => events.push(StreamEvent::Init(parse_init(msg))),
            Some("api_retry") => events.push(StreamEvent::ApiRetry(parse_api_retry(msg))),
            other => tracing::debug!(subtype = ?other, "ignoring a system message"),
        },
        Some("assistant") => parse_assistant(msg, events),
        Some("user") => parse_user(msg, events),
        Some("result") => events.push(StreamEvent::Result(parse_result(msg))),
        Some("rate_limit_event") => {
            let info = msg.get("rate_limit_info").unwrap_or(&Value::Null);
            events.push(StreamEvent::RateLimit(RateLimitInfo {
                status: str_field(info, "status"),
                resets_at: info.get("resetsAt").and_then(Value::as_i64),
                limit_type: str_field(info, "rateLimitType"),
            }));
        }
        // The oldest `--output-format json` printed a bare result object without `type`.
        None if msg.get("is_error").is_some() || msg.get("result").is_some() => {
            events.push(StreamEvent::Result(parse_result(msg)))
        }
        other => tracing::debug!(kind = ?other, "ignoring a message of an unknown type"),
    }
}

fn parse_init(msg: &Value) -> InitInfo {
    InitInfo {
        session_id: str_field(msg, "session_id"),
        model: str_field(msg, "model"),
        version: str_field(msg, "claude_code_version"),
        cwd: str_field(msg, "cwd"),
        permission_mode: str_field(msg, "permissionMode"),
        api_key_source: str_field(msg, "apiKeySource"),
        tools: msg
            .get("tools")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|t| t.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default(),
        simulated: msg.get("simulated").and_then(Value::as_bool) == Some(true),
    }
}

fn parse_api_retry(msg: &Value) -> ApiRetry {
    ApiRetry {
        attempt: u64_field(msg, "attempt").map(|v| v as u32),
        max_retries: u64_field(msg, "max_retries").map(|v| v as u32),
        delay_ms: msg.get("retry_delay_ms").and_then(Value::as_f64),
        error_status: u64_field(msg, "error_status").map(|v| v as u16),
        error: str_field(msg, "error"),
    }
}

fn parse_assistant(msg: &Value, events: &mut Vec<StreamEvent>) {
    let message = msg.get("message").unwrap_or(&Value::Null);
    let message_id = str_field(message, "id");
    let parent_tool_use_id = str_field(msg, "parent_tool_use_id");
    let blocks = content_blocks(message);
    // A synthetic message with an error code is the CLI reporting a failed API call.
    if let Some(code) = str_field(msg, "error") {
        let text = blocks
            .iter()
            .filter(|b| str_field(b, "type").as_deref() == Some("text"))
            .filter_map(|b| str_field(b, "text"))
            .collect::<Vec<_>>()
            .join("");
        events.push(StreamEvent::ApiError(ApiErrorMessage { code, text }));
        return;
    }
    for block in blocks {
        match str_field(block, "type").as_deref() {
            Some("text") => events.push(StreamEvent::AssistantText {
                message_id: message_id.clone(),
                text: str_field(block, "text").unwrap_or_default(),
                parent_tool_use_id: parent_tool_use_id.clone(),
            }),
            Some("tool_use") => events.push(StreamEvent::ToolUse {
                message_id: message_id.clone(),
                id: str_field(block, "id").unwrap_or_default(),
                name: str_field(block, "name").unwrap_or_default(),
                input: block.get("input").cloned().unwrap_or(Value::Null),
            }),
            // thinking, redacted_thinking, server tool blocks: not part of the answer.
            _ => {}
        }
    }
}

fn parse_user(msg: &Value, events: &mut Vec<StreamEvent>) {
    let message = msg.get("message").unwrap_or(&Value::Null);
    for block in content_blocks(message) {
        if str_field(block, "type").as_deref() != Some("tool_result") {
            continue;
        }
        let content = match block.get("content") {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Array(parts)) => parts
                .iter()
                .filter_map(|p| str_field(p, "text"))
                .collect::<Vec<_>>()
                .join("\n"),
            _ => String::new(),
        };
        events.push(StreamEvent::ToolResult {
            tool_use_id: str_field(block, "tool_use_id").unwrap_or_default(),
            content,
            is_error: block
                .get("is_error")
                .and_then(Value::as_bool)
                .unwrap_or(false),
        });
    }
}

fn parse_result(msg: &Value) -> ResultSummary {
    let subtype = str_field(msg, "subtype");
    let is_error = match msg.get("is_error").and_then(Value::as_bool) {
        Some(flag) => flag,
        None => subtype.as_deref().is_some_and(|s| s.starts_with("error")),
    };
    let total_cost_usd = ["total_cost_usd", "total_cost", "cost_usd"]
        .iter()
        .find_map(|k| msg.get(*k).and_then(Value::as_f64));
    let model_usage: BTreeMap<String, ModelUsage> = msg
        .get("modelUsage")
        .and_then(Value::as_object)
        .map(|models| {
            models
                .iter()
                .map(|(name, u)| {
                    let usage = ModelUsage {
                        tokens: TokenUsage {
                            input: u64_field(u, "inputTokens").unwrap_or(0),
                            output: u64_field(u, "outputTokens").unwrap_or(0),
                            cache_read: u64_field(u, "cacheReadInputTokens").unwrap_or(0),
                            cache_creation: u64_field(u, "cacheCreationInputTokens").unwrap_or(0),
                        },
                        cost_usd: u.get("costUSD").and_then(Value::as_f64),
                    };
                    (name.clone(), usage)
                })
                .collect()
        })
        .unwrap_or_default();
    let usage = msg.get("usage").unwrap_or(&Value::Null);
    let main_usage = TokenUsage {
        input: u64_field(usage, "input_tokens").unwrap_or(0),
        output: u64_field(usage, "output_tokens").unwrap_or(0),
        cache_read: u64_field(usage, "cache_read_input_tokens").unwrap_or(0),
        cache_creation: u64_field(usage, "cache_creation_input_tokens").unwrap_or(0),
    };
    // `modelUsage` covers every model the call used (subagents, side models); `usage` only the
    // main agent's turns.
    let usage_total = if model_usage.is_empty() {
        main_usage
    } else {
        model_usage
            .values()
            .fold(TokenUsage::default(), |t, m: &ModelUsage| TokenUsage {
                input: t.input + m.tokens.input,
                output: t.output + m.tokens.output,
                cache_read: t.cache_read + m.tokens.cache_read,
                cache_creation: t.cache_creation + m.tokens.cache_creation,
            })
    };
    ResultSummary {
        subtype,
        is_error,
        text: str_field(msg, "result"),
        session_id: str_field(msg, "session_id"),
        total_cost_usd,
        usage: usage_total,
        main_usage,
        model_usage,
        num_turns: u64_field(msg, "num_turns").map(|v| v as u32),
        duration_ms: u64_field(msg, "duration_ms"),
        duration_api_ms: u64_field(msg, "duration_api_ms"),
        api_error_status: u64_field(msg, "api_error_status").map(|v| v as u16),
        errors: msg
            .get("errors")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .map(|e| match e {
                        Value::String(s) => s.clone(),
                        other => other.to_string(),
                    })
                    .collect()
            })
            .unwrap_or_default(),
        terminal_reason: str_field(msg, "terminal_reason"),
        stop_reason: str_field(msg, "stop_reason"),
        structured_output: msg
            .get("structured_output")
            .filter(|v| !v.is_null())
            .cloned(),
        permission_denials: msg
            .get("permission_denials")
            .and_then(Value::as_array)
            .map_or(0, Vec::len),
        uuid: str_field(msg, "uuid"),
        text_fallback: false,
        simulated: msg.get("simulated").and_then(Value::as_bool) == Some(true),
    }
}

fn content_blocks(message: &Value) -> &[Value] {
    message
        .get("content")
        .and_then(Value::as_array)
        .map_or(&[], Vec::as_slice)
}

fn str_field(v: &Value, key: &str) -> Option<String> {
    v.get(key).and_then(Value::as_str).map(String::from)
}

/// Integer fields sometimes arrive as floats (`12.0`); accept both.
fn u64_field(v: &Value, key: &str) -> Option<u64> {
    let field = v.get(key)?;
    field
        .as_u64()
        .or_else(|| field.as_f64().filter(|f| *f >= 0.0).map(|f| f as u64))
}

/// One assistant message, its text blocks concatenated in order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct AssistantMessage {
    /// `message.id` (lines with the same id belong to one message).
    pub id: Option<String>,
    /// The text blocks, concatenated.
    pub text: String,
    /// Whether a subagent said it (its line had a `parent_tool_use_id`).
    #[serde(default)]
    pub subagent: bool,
}

/// A tool call seen during the run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolCall {
    /// Tool-use id.
    pub id: String,
    /// Tool name.
    pub name: String,
    /// Whether its result reported an error (`None` until the result arrives).
    pub is_error: Option<bool>,
}

/// How a run ended, as far as its stdout tells.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// A result with `is_error: false`.
    Succeeded,
    /// A result with `is_error: true`, whatever its `subtype` says.
    ReportedError,
    /// No result message at all (crash, kill, timeout, or a CLI that failed before starting).
    NoResult,
}

/// Everything the events of one run add up to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct ParsedRun {
    /// The `init` message, if one came.
    pub init: Option<InitInfo>,
    /// Assistant messages in order, one per `message.id`.
    pub messages: Vec<AssistantMessage>,
    /// Tool calls in order.
    pub tool_calls: Vec<ToolCall>,
    /// The CLI's own API retries (progress).
    pub api_retries: Vec<ApiRetry>,
    /// The last quota report.
    pub rate_limit: Option<RateLimitInfo>,
    /// The synthetic error message, if the CLI printed one.
    pub api_error: Option<ApiErrorMessage>,
    /// The final result; the only source of totals.
    pub result: Option<ResultSummary>,
    /// Non-JSON stdout lines (kept: they often hold the only error text).
    pub skipped: Vec<String>,
}

impl ParsedRun {
    /// Parse a whole captured stdout.
    pub fn from_stdout(text: &str) -> Self {
        let mut parser = StreamParser::new();
        let mut run = ParsedRun::default();
        for event in parser.feed_text(text).into_iter().chain(parser.finish()) {
            run.apply(event);
        }
        run
    }

    /// Fold one event into the run.
    pub fn apply(&mut self, event: StreamEvent) {
        match event {
            StreamEvent::Init(info) => self.init = Some(info),
            StreamEvent::AssistantText {
                message_id,
                text,
                parent_tool_use_id,
            } => match self.messages.last_mut() {
                Some(last) if message_id.is_some() && last.id == message_id => {
                    last.text.push_str(&text)
                }
                _ => self.messages.push(AssistantMessage {
                    id: message_id,
                    text,
                    subagent: parent_tool_use_id.is_some(),
                }),
            },
            StreamEvent::ToolUse { id, name, .. } => self.tool_calls.push(ToolCall {
                id,
                name,
                is_error: None,
            }),
            StreamEvent::ToolResult {
                tool_use_id,
                is_error,
                ..
            } => {
                if let Some(call) = self.tool_calls.iter_mut().find(|c| c.id == tool_use_id) {
                    call.is_error = Some(is_error);
                }
            }
            StreamEvent::ApiRetry(retry) => self.api_retries.push(retry),
            StreamEvent::RateLimit(info) => self.rate_limit = Some(info),
            StreamEvent::ApiError(err) => self.api_error = Some(err),
            StreamEvent::Result(mut summary) => {
                // Some CLI builds print `"result":""` although the stream holds the answer:
                // the answer is then the main agent's last text, and the row says so.
                let empty = summary.text.as_deref().is_none_or(|t| t.trim().is_empty());
                if empty
                    && !summary.is_error
                    && let Some(last) = self
                        .messages
                        .iter()
                        .rev()
                        .find(|m| !m.subagent && !m.text.trim().is_empty())
                {
                    summary.text = Some(last.text.clone());
                    summary.text_fallback = true;
                }
                if self.init.as_ref().is_some_and(|i| i.simulated) {
                    summary.simulated = true;
                }
                self.result = Some(summary);
            }
            StreamEvent::Skipped { line } => self.skipped.push(line),
        }
    }

    /// How the run ended according to its stdout.
    pub fn outcome(&self) -> Outcome {
        match &self.result {
            Some(r) if r.is_error => Outcome::ReportedError,
            Some(_) => Outcome::Succeeded,
            None => Outcome::NoResult,
        }
    }

    /// The session id: the result's, else the init message's.
    pub fn session_id(&self) -> Option<&str> {
        self.result
            .as_ref()
            .and_then(|r| r.session_id.as_deref())
            .or_else(|| self.init.as_ref().and_then(|i| i.session_id.as_deref()))
    }

    /// The answer: the result's text, else the last assistant message (for runs cut short).
    pub fn final_text(&self) -> Option<&str> {
        self.result
            .as_ref()
            .and_then(|r| r.text.as_deref())
            .or_else(|| self.messages.last().map(|m| m.text.as_str()))
    }

    /// The CLI's own words for a failure: the result text, its `errors[]`, or the synthetic
    /// message; `None` when stdout carries no error text.
    pub fn error_message(&self) -> Option<String> {
        if let Some(r) = &self.result {
            if let Some(t) = r.text.as_deref().filter(|t| !t.trim().is_empty()) {
                return Some(t.to_string());
            }
            if !r.errors.is_empty() {
                return Some(r.errors.join("\n"));
            }
        }
        self.api_error
            .as_ref()
            .map(|e| e.text.clone())
            .filter(|t| !t.is_empty())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn events(lines: &[&str]) -> Vec<StreamEvent> {
        let mut parser = StreamParser::new();
        let mut all: Vec<StreamEvent> = lines.iter().flat_map(|l| parser.feed_line(l)).collect();
        all.extend(parser.finish());
        all
    }

    #[test]
    fn unknown_message_types_and_system_subtypes_are_ignored() {
        let evs = events(&[
            r#"{"type":"stream_event","event":{}}"#,
            r#"{"type":"system","subtype":"compact_boundary"}"#,
            r#"{"type":"something_new","x":1}"#,
        ]);
        assert!(evs.is_empty(), "{evs:?}");
    }

    #[test]
    fn non_json_lines_are_skipped_and_blank_lines_vanish() {
        let evs = events(&["hello", "", "  ", "4", "{oops"]);
        assert_eq!(
            evs,
            vec![
                StreamEvent::Skipped {
                    line: "hello".into()
                },
                StreamEvent::Skipped { line: "4".into() },
                StreamEvent::Skipped {
                    line: "{oops".into()
                },
            ]
        );
    }

    #[test]
    fn a_truncated_line_followed_by_a_complete_one_loses_only_the_truncated_one() {
        let evs = events(&[
            r#"{"type":"assistant","message":{"content":[{"type":"text","text":"cut he"#,
            r#"{"type":"result","is_error":false,"result":"ok"}"#,
        ]);
        assert!(matches!(&evs[0], StreamEvent::Skipped { .. }));
        assert!(matches!(&evs[1], StreamEvent::Result(r) if r.text.as_deref() == Some("ok")));
    }

    #[test]
    fn an_unfinished_block_at_end_of_stdout_is_reported_as_skipped() {
        let evs = events(&["{", "  \"type\": \"result\","]);
        assert!(matches!(&evs[..], [StreamEvent::Skipped { line }] if line.contains("\"result\"")));
    }

    #[test]
    fn older_cost_fields_are_understood() {
        for key in ["total_cost", "cost_usd"] {
            let line =
                format!(r#"{{"type":"result","subtype":"success","{key}":0.5,"is_error":false}}"#);
            let run = ParsedRun::from_stdout(&line);
            assert_eq!(run.result.unwrap().total_cost_usd, Some(0.5), "{key}");
        }
    }

    #[test]
    fn a_result_without_is_error_is_judged_by_its_subtype() {
        let run = ParsedRun::from_stdout(r#"{"type":"result","subtype":"error_max_turns"}"#);
        assert_eq!(run.outcome(), Outcome::ReportedError);
    }

    #[test]
    fn text_blocks_of_one_message_id_are_concatenated_in_order() {
        let mut run = ParsedRun::default();
        for e in events(&[
            r#"{"type":"assistant","message":{"id":"m1","content":[{"type":"text","text":"Hello, "}]}}"#,
            r#"{"type":"assistant","message":{"id":"m1","content":[{"type":"text","text":"world."}]}}"#,
            r#"{"type":"assistant","message":{"id":"m2","content":[{"type":"text","text":"Bye."}]}}"#,
        ]) {
            run.apply(e);
        }
        let texts: Vec<&str> = run.messages.iter().map(|m| m.text.as_str()).collect();
        assert_eq!(texts, ["Hello, world.", "Bye."]);
        assert_eq!(
            run.final_text(),
            Some("Bye."),
            "without a result, the last message"
        );
    }

    #[test]
    fn api_retry_lines_become_progress_events() {
        let evs = events(&[
            r#"{"type":"system","subtype":"api_retry","attempt":2,"max_retries":10,"retry_delay_ms":1090.5,"error_status":529,"error":"overloaded"}"#,
        ]);
        assert_eq!(
            evs,
            vec![StreamEvent::ApiRetry(ApiRetry {
                attempt: Some(2),
                max_retries: Some(10),
                delay_ms: Some(1090.5),
                error_status: Some(529),
                error: Some("overloaded".into()),
            })]
        );
    }
}
