//! `fake-claude`: a stand-in for the Claude Code CLI, for tests and offline demos.
//!
//! It accepts the real CLI's flags (`-p --output-format stream-json --verbose --model M`,
//! `--resume`, `--session-id`, tool lists, ...), reads the prompt from stdin (or the positional
//! argument), and prints the same line shapes as CLI 2.1.x: `system`/`init`, `assistant`
//! (one line per content block, same `message.id`), `result` with `total_cost_usd`, `usage`,
//! `modelUsage`, `session_id`, `num_turns`, durations and `uuid`. The answer is a deterministic
//! sentence derived from prompt and model, and always starts with `[simulated]`.
//!
//! Environment knobs:
//! - `FAKE_CLAUDE_FAULT`: `hang` (init, then silence), `slow`, `crash` (abort mid-stream),
//!   `garbage`, `no_result`, `auth`, `billing`, `overloaded`, `rate_limited` (the API's
//!   per-minute 429, not a subscription limit), `unknown_model`, `bad_resume`, `linger` (a
//!   full successful run that then does not exit); and shapes real CLIs print:
//!   `empty_result` (the answer in the stream, `"result":""`), `subagents` (a `Task` subagent
//!   and a haiku side model, counted in `modelUsage` only), `array_output` (the whole run
//!   as one JSON array line), `pretty_result` (the result spread over several lines),
//!   `credit_after_work` (54 turns and $2.00 spent, then "Credit balance is too low"),
//!   `usage_limit` ("Claude AI usage limit reached|<unix time>", the time from
//!   `FAKE_CLAUDE_RESET_AT`, default in 60 s), `session_limit` ("You've hit your session limit
//!   · resets <time>"), `no_network` (`api_retry` lines with a connection error, forever).
//! - `FAKE_CLAUDE_FAULT_ONCE=<file>`: apply the fault only if `<file>` does not exist yet (it is
//!   created), so a retry succeeds.
//! - `FAKE_CLAUDE_DELAY_MS`: pause between lines (default 200 for `slow`, 0 otherwise).
//! - `FAKE_CLAUDE_LOG=<file>`: append one JSON line per invocation (pid, args, prompt sha256,
//!   session, fault, time, nice value).
//! - `FAKE_CLAUDE_RESULT_LOG=<file>`: append one JSON line per call whose result was printed.
//! - `FAKE_CLAUDE_GRANDCHILD_PIDFILE=<file>`: start a `sleep` child (same process group) and
//!   write its pid there, as the real CLI leaves `rg` or `ps` children running, to test that
//!   the whole group dies with the request.
//! - `FAKE_CLAUDE_IGNORE_TERM=1`: ignore SIGTERM, to test the escalation to SIGKILL.

use std::io::{Read, Write};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};
use sha2::{Digest, Sha256};

const VERSION: &str = "2.1.197";
const SIMULATED: &str = "(simulated by fake-claude)";

fn main() {
    let started = Instant::now();
    let argv: Vec<String> = std::env::args().skip(1).collect();
    if std::env::var("FAKE_CLAUDE_IGNORE_TERM").is_ok_and(|v| v == "1") {
        // SAFETY: installing SIG_IGN has no preconditions.
        unsafe {
            libc::signal(libc::SIGTERM, libc::SIG_IGN);
        }
    }
    let args = match Args::parse(&argv) {
        Ok(args) => args,
        Err(message) => fail_usage(&message),
    };
    if args.version {
        println!("{VERSION} (Claude Code) {SIMULATED}");
        return;
    }
    if args.help {
        println!(
            "Usage: fake-claude [options] [prompt]\n\nA simulated Claude Code CLI for KSI's tests. Every answer is simulated."
        );
        return;
    }
    if std::env::var_os("CLAUDECODE").is_some() {
        fail_usage(
            "Error: Claude Code cannot be launched inside another Claude Code session.\n\
             Nested sessions share runtime resources and will crash all active sessions.\n\
             To bypass this check, unset the CLAUDECODE environment variable.",
        );
    }
    if !args.print {
        fail_usage("Error: fake-claude only simulates --print mode");
    }
    if args.output_format == "stream-json" && !args.verbose {
        fail_usage("Error: When using --print, --output-format=stream-json requires --verbose");
    }
    if let Some(id) = &args.session_id
        && !is_uuid(id)
    {
        fail_usage("Error: Invalid session ID. Must be a valid UUID.");
    }

    let prompt = match args.positional.first() {
        Some(p) => p.clone(),
        None => {
            let mut input = String::new();
            let _ = std::io::stdin().read_to_string(&mut input);
            input
        }
    };
    if prompt.trim().is_empty() {
        fail_usage(
            "Error: Input must be provided either through stdin or as a prompt argument when using --print",
        );
    }

    let model = resolve_model(args.model.as_deref().unwrap_or("sonnet"));
    let session = args
        .resume
        .clone()
        .or_else(|| args.session_id.clone())
        .unwrap_or_else(|| new_uuid(&[prompt.as_bytes(), model.as_bytes(), b"session"]));
    let fault = active_fault();
    log_invocation(&argv, &prompt, &session, fault.as_deref());

    let delay_ms: u64 = std::env::var("FAKE_CLAUDE_DELAY_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if fault.as_deref() == Some("slow") {
            200
        } else {
            0
        });
    let mut out = Output {
        format: args.output_format.clone(),
        verbose: args.verbose,
        delay: Duration::from_millis(delay_ms),
        garbage: fault.as_deref() == Some("garbage"),
        collected: Vec::new(),
        lines_printed: 0,
        noise_count: 0,
        pretty_result: false,
    };
    let run = Run {
        prompt,
        model,
        session,
        resumed: args.resume.is_some(),
        started,
    };

    if let Some(pidfile) = std::env::var_os("FAKE_CLAUDE_GRANDCHILD_PIDFILE")
        && let Ok(child) = std::process::Command::new("sleep").arg("3600").spawn()
    {
        let _ = std::fs::write(pidfile, child.id().to_string());
    }
    if fault.as_deref() == Some("array_output") {
        // `--output-format json --verbose` prints this shape; some wrappers pass it on.
        out.format = "json".into();
        out.verbose = true;
    }
    out.pretty_result = fault.as_deref() == Some("pretty_result");
    let code = match fault.as_deref() {
        None | Some("slow") | Some("garbage") | Some("array_output") | Some("pretty_result") => {
            let code = run.succeed(&mut out);
            log_result(&run.prompt, &run.session);
            code
        }
        Some("hang") => run.hang(&mut out),
        Some("linger") => {
            run.succeed(&mut out);
            loop {
                std::thread::sleep(Duration::from_secs(3600));
            }
        }
        Some("crash") => run.crash(&mut out),
        Some("no_result") => run.no_result(&mut out),
        Some("auth") => run.api_failure(
            &mut out,
            ApiFailure {
                code: "authentication_failed",
                text: "Invalid API key · Please run /login",
                status: Some(401),
                retries: 0,
                quota: false,
            },
        ),
        Some("billing") => run.api_failure(
            &mut out,
            ApiFailure {
                code: "billing_error",
                text: "Credit balance is too low",
                status: Some(400),
                retries: 0,
                quota: false,
            },
        ),
        Some("overloaded") => run.api_failure(
            &mut out,
            ApiFailure {
                code: "overloaded",
                text: "API Error: 529 Overloaded. This is a server-side issue, usually temporary — try again in a moment. If it persists, check https://status.claude.com.",
                status: Some(529),
                retries: 2,
                quota: false,
            },
        ),
        Some("rate_limited") => run.api_failure(
            &mut out,
            ApiFailure {
                code: "rate_limit",
                text: "API Error: 429 {\"type\":\"error\",\"error\":{\"type\":\"rate_limit_error\",\"message\":\"This request would exceed the rate limit for your organization of 50 requests per minute. Please retry after a moment.\"}}",
                status: Some(429),
                retries: 2,
                quota: false,
            },
        ),
        Some("unknown_model") => {
            let text = format!(
                "There's an issue with the selected model ({}). It may not exist or you may not have access to it. Run --model to pick a different model.",
                run.model
            );
            run.api_failure(
                &mut out,
                ApiFailure {
                    code: "model_not_found",
                    text: &text,
                    status: Some(404),
                    retries: 0,
                    quota: false,
                },
            )
        }
        Some("bad_resume") => run.bad_resume(&mut out),
        Some("empty_result") => {
            let code = run.empty_result(&mut out);
            log_result(&run.prompt, &run.session);
            code
        }
        Some("subagents") => {
            let code = run.with_subagent(&mut out);
            log_result(&run.prompt, &run.session);
            code
        }
        Some("credit_after_work") => run.credit_after_work(&mut out),
        Some("usage_limit") => {
            let reset = reset_at_unix();
            run.api_failure(
                &mut out,
                ApiFailure {
                    code: "rate_limit",
                    text: &format!("Claude AI usage limit reached|{reset}"),
                    status: Some(429),
                    retries: 0,
                    quota: true,
                },
            )
        }
        Some("session_limit") => {
            let reset = chrono_like_hour(reset_at_unix());
            run.api_failure(
                &mut out,
                ApiFailure {
                    code: "rate_limit",
                    text: &format!("You've hit your session limit · resets {reset} (UTC)"),
                    status: Some(429),
                    retries: 0,
                    quota: true,
                },
            )
        }
        Some("no_network") => run.no_network(&mut out),
        Some(other) => {
            eprintln!("fake-claude: unknown FAKE_CLAUDE_FAULT '{other}' {SIMULATED}");
            2
        }
    };
    out.finish();
    std::process::exit(code);
}

/// Print a usage error the way the CLI does (stderr, exit 1).
fn fail_usage(message: &str) -> ! {
    eprintln!("{message}");
    eprintln!("{SIMULATED}");
    std::process::exit(1);
}

/// The fault to apply to this invocation, honouring `FAKE_CLAUDE_FAULT_ONCE`.
fn active_fault() -> Option<String> {
    let fault = std::env::var("FAKE_CLAUDE_FAULT")
        .ok()
        .filter(|f| !f.is_empty())?;
    if let Some(marker) = std::env::var_os("FAKE_CLAUDE_FAULT_ONCE") {
        let first = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(marker)
            .is_ok();
        if !first {
            return None;
        }
    }
    Some(fault)
}

/// `FAKE_CLAUDE_RESULT_LOG=<file>`: one line per call whose result was printed, so a test can
/// count completed (paid) calls apart from ones killed midway.
fn log_result(prompt: &str, session: &str) {
    let Some(path) = std::env::var_os("FAKE_CLAUDE_RESULT_LOG") else {
        return;
    };
    let line = format!(
        "{}\n",
        json!({ "pid": std::process::id(), "prompt_sha256": hex_digest(&[prompt.as_bytes()]), "session_id": session, "time_unix_ms": unix_ms() })
    );
    if let Ok(mut file) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
    {
        let _ = file.write_all(line.as_bytes());
    }
}

fn log_invocation(argv: &[String], prompt: &str, session: &str, fault: Option<&str>) {
    let Some(path) = std::env::var_os("FAKE_CLAUDE_LOG") else {
        return;
    };
    let entry = json!({
        "pid": std::process::id(),
        "args": argv,
        "prompt_sha256": hex_digest(&[prompt.as_bytes()]),
        "session_id": session,
        "fault": fault,
        "time_unix_ms": unix_ms(),
        // SAFETY: getpriority has no preconditions.
        "nice": unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) },
    });
    let line = format!("{entry}\n");
    // O_APPEND and a single write: concurrent invocations never interleave their lines.
    if let Ok(mut file) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
    {
        let _ = file.write_all(line.as_bytes());
    }
}

#[derive(Debug, Default)]
struct Args {
    print: bool,
    verbose: bool,
    version: bool,
    help: bool,
    output_format: String,
    model: Option<String>,
    resume: Option<String>,
    session_id: Option<String>,
    positional: Vec<String>,
}

enum Arity {
    Flag,
    Value,
    OptionalValue,
    Variadic,
}

fn arity(name: &str) -> Option<Arity> {
    use Arity::*;
    Some(match name {
        "-p"
        | "--print"
        | "--verbose"
        | "-h"
        | "--help"
        | "-v"
        | "--version"
        | "--dangerously-skip-permissions"
        | "--allow-dangerously-skip-permissions"
        | "--include-partial-messages"
        | "--strict-mcp-config"
        | "--no-session-persistence"
        | "--fork-session"
        | "-c"
        | "--continue"
        | "--replay-user-messages"
        | "--disable-slash-commands"
        | "--mcp-debug"
        | "--ide"
        | "--chrome"
        | "--no-chrome" => Flag,
        "--model"
        | "--output-format"
        | "--input-format"
        | "--session-id"
        | "--append-system-prompt"
        | "--system-prompt"
        | "--max-turns"
        | "--permission-mode"
        | "--max-budget-usd"
        | "--json-schema"
        | "--fallback-model"
        | "--settings"
        | "--setting-sources"
        | "--agent"
        | "--agents" => Value,
        "-r" | "--resume" | "-d" | "--debug" => OptionalValue,
        "--allowedTools" | "--allowed-tools" | "--disallowedTools" | "--disallowed-tools"
        | "--mcp-config" | "--add-dir" | "--tools" | "--betas" | "--plugin-dir" => Variadic,
        _ => return None,
    })
}

impl Args {
    /// Parse like the CLI's commander setup, including its trap: a variadic option swallows the
    /// arguments after it, a positional prompt included.
    fn parse(argv: &[String]) -> Result<Args, String> {
        let mut args = Args {
            output_format: "text".into(),
            ..Args::default()
        };
        let mut i = 0;
        while i < argv.len() {
            let arg = &argv[i];
            i += 1;
            if !arg.starts_with('-') || arg == "-" {
                args.positional.push(arg.clone());
                continue;
            }
            if arg == "--" {
                args.positional.extend(argv[i..].iter().cloned());
                break;
            }
            let (name, inline) = match arg.split_once('=') {
                Some((n, v)) if n.starts_with("--") => (n, Some(v.to_string())),
                _ => (arg.as_str(), None),
            };
            let Some(kind) = arity(name) else {
                return Err(format!("error: unknown option '{name}'"));
            };
            let mut values = Vec::new();
            match kind {
                Arity::Flag => {}
                Arity::Value => match inline {
                    Some(v) => values.push(v),
                    None if i < argv.len() => {
                        values.push(argv[i].clone());
                        i += 1;
                    }
                    None => return Err(format!("error: option '{name}' argument missing")),
                },
                Arity::OptionalValue => match inline {
                    Some(v) => values.push(v),
                    None if i < argv.len() && !argv[i].starts_with('-') => {
                        values.push(argv[i].clone());
                        i += 1;
                    }
                    None => {}
                },
                Arity::Variadic => {
                    if let Some(v) = inline {
                        values.push(v);
                    } else {
                        while i < argv.len() && !argv[i].starts_with('-') {
                            values.push(argv[i].clone());
                            i += 1;
                        }
                    }
                }
            }
            let value = values.first().cloned();
            match name {
                "-p" | "--print" => args.print = true,
                "--verbose" => args.verbose = true,
                "-v" | "--version" => args.version = true,
                "-h" | "--help" => args.help = true,
                "--model" => args.model = value,
                "--resume" | "-r" => args.resume = value,
                "--session-id" => args.session_id = value,
                "--output-format" => {
                    let format = value.unwrap_or_default();
                    if !["text", "json", "stream-json"].contains(&format.as_str()) {
                        return Err(format!(
                            "error: option '--output-format <format>' argument '{format}' is invalid. Allowed choices are text, json, stream-json."
                        ));
                    }
                    args.output_format = format;
                }
                "--permission-mode" => {
                    let mode = value.unwrap_or_default();
                    let choices = [
                        "acceptEdits",
                        "auto",
                        "bypassPermissions",
                        "default",
                        "dontAsk",
                        "plan",
                    ];
                    if !choices.contains(&mode.as_str()) {
                        return Err(format!(
                            "error: option '--permission-mode <mode>' argument '{mode}' is invalid. Allowed choices are {}.",
                            choices.join(", ")
                        ));
                    }
                }
                "--max-turns"
                    if value
                        .as_deref()
                        .and_then(|v| v.parse::<u32>().ok())
                        .is_none() =>
                {
                    return Err("Error: --max-turns must be a positive number".into());
                }
                "--max-budget-usd"
                    if value
                        .as_deref()
                        .and_then(|v| v.parse::<f64>().ok())
                        .is_none() =>
                {
                    return Err("Error: --max-budget-usd must be a positive number".into());
                }
                "--json-schema"
                    if serde_json::from_str::<Value>(value.as_deref().unwrap_or("")).is_err() =>
                {
                    return Err("Error: Invalid JSON provided to --json-schema".into());
                }
                _ => {}
            }
        }
        Ok(args)
    }
}

/// Where lines go: stdout in the requested format, with the `slow` and `garbage` faults applied.
struct Output {
    format: String,
    verbose: bool,
    delay: Duration,
    garbage: bool,
    /// Messages kept for `--output-format json`, printed at the end.
    collected: Vec<Value>,
    lines_printed: usize,
    noise_count: usize,
    /// `pretty_result`: the result line pretty-printed over several lines.
    pretty_result: bool,
}

impl Output {
    fn emit(&mut self, message: Value) {
        match self.format.as_str() {
            "stream-json" => {
                if self.garbage {
                    self.noise();
                }
                if self.pretty_result && message["type"] == "result" {
                    let pretty = serde_json::to_string_pretty(&message).unwrap_or_default();
                    for line in pretty.lines() {
                        self.print_line(line);
                    }
                } else {
                    self.print_line(&message.to_string());
                }
            }
            "json" => self.collected.push(message),
            _ => {
                if message["type"] == "result" {
                    let text = message["result"].as_str().unwrap_or_default().to_string();
                    self.print_line(&text);
                }
            }
        }
    }

    fn print_line(&mut self, line: &str) {
        if self.lines_printed > 0 && !self.delay.is_zero() {
            std::thread::sleep(self.delay);
        }
        let mut stdout = std::io::stdout().lock();
        let _ = writeln!(stdout, "{line}");
        let _ = stdout.flush();
        self.lines_printed += 1;
    }

    /// Noise of the kinds seen on real stdout: debug logs, warnings, a pretty-printed object of
    /// an unknown type, blank lines, a broken object.
    fn noise(&mut self) {
        self.noise_count += 1;
        let n = self.noise_count;
        let noise: &[&str] = match n % 3 {
            0 => &["[log_71a72b] sending request { (simulated noise)", ""],
            1 => &[
                "{",
                "  \"type\": \"fake_debug_event\",",
                "  \"note\": \"simulated noise of an unknown type\"",
                "}",
            ],
            _ => &[
                "{not json (simulated noise)",
                "Warning: simulated warning on stdout",
            ],
        };
        for line in noise {
            self.print_line(line);
        }
    }

    fn finish(&mut self) {
        if self.format != "json" || self.collected.is_empty() {
            return;
        }
        let doc = if self.verbose {
            Value::Array(std::mem::take(&mut self.collected))
        } else {
            self.collected
                .iter()
                .rev()
                .find(|m| m["type"] == "result")
                .cloned()
                .unwrap_or(Value::Null)
        };
        if !doc.is_null() {
            self.print_line(&doc.to_string());
        }
    }
}

struct ApiFailure<'a> {
    code: &'a str,
    text: &'a str,
    status: Option<u16>,
    /// `api_retry` lines printed before giving up.
    retries: u32,
    /// A subscription limit: a rejected `rate_limit_event` precedes the error, as the CLI
    /// prints it for session and usage limits (not for the API's per-minute rate limits).
    quota: bool,
}

struct Run {
    prompt: String,
    model: String,
    session: String,
    resumed: bool,
    started: Instant,
}

impl Run {
    fn init(&self) -> Value {
        json!({
            "type": "system",
            "subtype": "init",
            "cwd": std::env::current_dir().map(|d| d.display().to_string()).unwrap_or_default(),
            "session_id": self.session,
            "tools": ["Task", "Bash", "Edit", "Read", "Write", "WebFetch", "WebSearch"],
            "mcp_servers": [],
            "model": self.model,
            "permissionMode": "default",
            "slash_commands": [],
            "apiKeySource": "none",
            "claude_code_version": VERSION,
            "output_style": "default",
            "agents": [],
            "skills": [],
            "plugins": [],
            "uuid": self.uuid("init"),
            "fast_mode_state": "off",
            "simulated": true,
        })
    }

    /// The deterministic answer.
    fn answer(&self) -> String {
        const ADJECTIVES: &[&str] = &[
            "quiet", "bright", "patient", "curious", "steady", "brisk", "careful", "gentle",
        ];
        const NOUNS: &[&str] = &[
            "river", "lantern", "compass", "garden", "harbor", "signal", "ledger", "bridge",
        ];
        const VERBS: &[&str] = &[
            "follows", "answers", "measures", "records", "crosses", "weighs", "echoes", "guides",
        ];
        // From prompt and model only: new session ids are random (as the real CLI's are), and
        // a rerun of the same conversation must read the same.
        let h = Sha256::new()
            .chain_update(self.prompt.as_bytes())
            .chain_update([0])
            .chain_update(self.model.as_bytes())
            .finalize();
        let pick = |list: &[&'static str], byte: u8| list[byte as usize % list.len()];
        format!(
            "[simulated] Reply {} from {}: the {} {} {} the {} {}.",
            hex::encode(&h[..4]),
            self.model,
            pick(ADJECTIVES, h[4]),
            pick(NOUNS, h[5]),
            pick(VERBS, h[6]),
            pick(ADJECTIVES, h[7]),
            pick(NOUNS, h[8]),
        )
    }

    fn uuid(&self, what: &str) -> String {
        new_uuid(&[self.session.as_bytes(), what.as_bytes()])
    }

    fn message_id(&self) -> String {
        format!(
            "msg_fake_{}",
            &hex_digest(&[self.session.as_bytes(), self.prompt.as_bytes()])[..24]
        )
    }

    fn assistant_line(
        &self,
        message_id: &str,
        model: &str,
        block: Value,
        extra: Option<(&str, &str)>,
    ) -> Value {
        let mut line = json!({
            "type": "assistant",
            "message": {
                "model": model,
                "id": message_id,
                "type": "message",
                "role": "assistant",
                "content": [block],
                "stop_reason": null,
                "stop_sequence": null,
                "usage": {
                    "input_tokens": 0,
                    "cache_creation_input_tokens": 0,
                    "cache_read_input_tokens": 0,
                    "output_tokens": 1,
                    "service_tier": "standard"
                },
                "context_management": null
            },
            "parent_tool_use_id": null,
            "session_id": self.session,
            "uuid": self.uuid(&format!("assistant-{block}")),
        });
        if let Some((key, value)) = extra {
            line[key] = json!(value);
        }
        line
    }

    /// The answer as two content blocks of one message, one line each, like the real CLI.
    fn emit_answer(&self, out: &mut Output, text: &str) {
        let id = self.message_id();
        let split = text.find(": ").map_or(text.len(), |i| i + 2);
        let (first, rest) = text.split_at(split);
        out.emit(self.assistant_line(
            &id,
            &self.model,
            json!({"type": "text", "text": first}),
            None,
        ));
        if !rest.is_empty() {
            out.emit(self.assistant_line(
                &id,
                &self.model,
                json!({"type": "text", "text": rest}),
                None,
            ));
        }
    }

    fn result(&self, is_error: bool, text: &str, usage: Usage, extra: Value) -> Value {
        let elapsed = self.started.elapsed().as_millis() as u64;
        let mut result = json!({
            "is_error": is_error,
            "duration_api_ms": elapsed / 2,
            "num_turns": 1,
            "stop_reason": if is_error { "stop_sequence" } else { "end_turn" },
            "session_id": self.session,
            "total_cost_usd": usage.cost_usd(&self.model),
            "usage": {
                "input_tokens": usage.input,
                "cache_creation_input_tokens": usage.cache_creation,
                "cache_read_input_tokens": usage.cache_read,
                "output_tokens": usage.output,
                "server_tool_use": {"web_search_requests": 0, "web_fetch_requests": 0},
                "service_tier": "standard",
                "cache_creation": {"ephemeral_1h_input_tokens": 0, "ephemeral_5m_input_tokens": usage.cache_creation}
            },
            "modelUsage": if usage.is_zero() { json!({}) } else { json!({
                self.model.clone(): {
                    "inputTokens": usage.input,
                    "outputTokens": usage.output,
                    "cacheReadInputTokens": usage.cache_read,
                    "cacheCreationInputTokens": usage.cache_creation,
                    "webSearchRequests": 0,
                    "costUSD": usage.cost_usd(&self.model),
                    "contextWindow": 200000,
                    "maxOutputTokens": 64000
                }
            }) },
            "permission_denials": [],
            "terminal_reason": if is_error { "api_error" } else { "completed" },
            "subtype": "success",
            "api_error_status": null,
            "result": text,
            // serde_json sorts keys, so `type` comes late, as it does in 2.1.x.
            "type": "result",
            "duration_ms": elapsed,
            "uuid": self.uuid("result"),
            "simulated": true,
        });
        if let (Value::Object(map), Value::Object(extra)) = (&mut result, extra) {
            map.extend(extra);
        }
        result
    }

    fn usage(&self, text: &str) -> Usage {
        // A fixed system prompt is cached on the first turn and read back when resumed.
        const SYSTEM_TOKENS: u64 = 4_000;
        Usage {
            input: (self.prompt.len() as u64).div_ceil(4) + 3,
            output: (text.len() as u64).div_ceil(4) + 1,
            cache_creation: if self.resumed { 200 } else { SYSTEM_TOKENS },
            cache_read: if self.resumed { SYSTEM_TOKENS } else { 0 },
        }
    }

    fn succeed(&self, out: &mut Output) -> i32 {
        out.emit(self.init());
        let text = self.answer();
        self.emit_answer(out, &text);
        out.emit(self.result(false, &text, self.usage(&text), json!({})));
        0
    }

    /// A successful run whose `result` is empty although the answer is in the stream.
    fn empty_result(&self, out: &mut Output) -> i32 {
        out.emit(self.init());
        let text = self.answer();
        self.emit_answer(out, &text);
        out.emit(self.result(false, "", self.usage(&text), json!({})));
        0
    }

    /// The main agent hands part of the work to a `Task` subagent, which answers on a side
    /// model: its text has a `parent_tool_use_id`, and its tokens are in `modelUsage` only.
    fn with_subagent(&self, out: &mut Output) -> i32 {
        out.emit(self.init());
        let tool_id = "toolu_fake_subagent_01";
        let mut call = self.assistant_line(
            &format!("{}_task", self.message_id()),
            &self.model,
            json!({"type": "tool_use", "id": tool_id, "name": "Task", "input": {"description": "look it up", "prompt": "find it"}}),
            None,
        );
        call["message"]["stop_reason"] = json!("tool_use");
        out.emit(call);
        let mut sub = self.assistant_line(
            "msg_fake_subagent",
            "claude-haiku-4-5-20251001",
            json!({"type": "text", "text": "[simulated] the subagent's notes"}),
            None,
        );
        sub["parent_tool_use_id"] = json!(tool_id);
        out.emit(sub);
        let text = self.answer();
        self.emit_answer(out, &text);
        let main = self.usage(&text);
        let side = Usage {
            input: 1_200,
            output: 300,
            cache_creation: 0,
            cache_read: 0,
        };
        let cost = main.cost_usd(&self.model) + side.cost_usd("haiku");
        let mut result = self.result(false, &text, main, json!({"num_turns": 3}));
        result["total_cost_usd"] = json!((cost * 1e9).round() / 1e9);
        result["modelUsage"]["claude-haiku-4-5-20251001"] = json!({
            "inputTokens": side.input, "outputTokens": side.output,
            "cacheReadInputTokens": 0, "cacheCreationInputTokens": 0, "webSearchRequests": 0,
            "costUSD": side.cost_usd("haiku"), "contextWindow": 200000, "maxOutputTokens": 64000
        });
        out.emit(result);
        0
    }

    /// Long work, then the credit runs out: an error result that still reports what was spent
    /// (the shape of `stream_2.1.123_error_credit_balance_too_low.jsonl`, after 54 turns).
    fn credit_after_work(&self, out: &mut Output) -> i32 {
        out.emit(self.init());
        let text = format!("Credit balance is too low {SIMULATED}");
        let mut line = self.assistant_line(
            &self.uuid("synthetic"),
            "<synthetic>",
            json!({"type": "text", "text": text}),
            Some(("error", "billing_error")),
        );
        line["is_api_error_message"] = json!(true);
        out.emit(line);
        let usage = Usage {
            input: 120_000,
            output: 40_000,
            cache_creation: 10_000,
            cache_read: 900_000,
        };
        let mut result = self.result(
            true,
            &text,
            usage,
            json!({"api_error_status": 400, "num_turns": 54, "duration_ms": 812_000, "duration_api_ms": 640_000}),
        );
        result["total_cost_usd"] = json!(2.0);
        out.emit(result);
        1
    }

    /// No network: the CLI retries its connection (10 times by default, with growing delays)
    /// and prints an `api_retry` line each time, without a status.
    fn no_network(&self, out: &mut Output) -> i32 {
        out.emit(self.init());
        for attempt in 1.. {
            out.emit(json!({
                "type": "system", "subtype": "api_retry", "attempt": attempt, "max_retries": 10,
                "retry_delay_ms": 1000.0, "error_status": null, "error": "unknown",
                "error_message": "Connection error.", "session_id": self.session,
                "uuid": self.uuid(&format!("retry-{attempt}")),
            }));
            std::thread::sleep(Duration::from_millis(200));
        }
        0
    }

    fn hang(&self, out: &mut Output) -> i32 {
        out.emit(self.init());
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    }

    fn crash(&self, out: &mut Output) -> i32 {
        out.emit(self.init());
        let text = self.answer();
        let id = self.message_id();
        out.emit(self.assistant_line(
            &id,
            &self.model,
            json!({"type": "text", "text": text}),
            None,
        ));
        eprintln!("fake-claude: simulated crash (abort) {SIMULATED}");
        std::process::abort();
    }

    fn no_result(&self, out: &mut Output) -> i32 {
        out.emit(self.init());
        let text = self.answer();
        self.emit_answer(out, &text);
        0
    }

    fn api_failure(&self, out: &mut Output, failure: ApiFailure<'_>) -> i32 {
        out.emit(self.init());
        for attempt in 1..=failure.retries {
            out.emit(json!({
                "type": "system",
                "subtype": "api_retry",
                "attempt": attempt,
                "max_retries": failure.retries,
                "retry_delay_ms": 500.0 * f64::from(attempt),
                "error_status": failure.status,
                "error": failure.code,
                "session_id": self.session,
                "uuid": self.uuid(&format!("retry-{attempt}")),
            }));
        }
        if failure.quota {
            out.emit(json!({
                "type": "rate_limit_event",
                "rate_limit_info": {"status": "rejected", "resetsAt": reset_at_unix(), "rateLimitType": "five_hour"},
                "uuid": self.uuid("rate-limit"),
                "session_id": self.session,
            }));
        }
        let text = format!("{} {SIMULATED}", failure.text);
        let id = self.uuid("synthetic");
        let mut line = self.assistant_line(
            &id,
            "<synthetic>",
            json!({"type": "text", "text": text}),
            Some(("error", failure.code)),
        );
        line["message"]["stop_reason"] = json!("stop_sequence");
        line["is_api_error_message"] = json!(true);
        out.emit(line);
        out.emit(self.result(
            true,
            &text,
            Usage::default(),
            json!({"api_error_status": failure.status}),
        ));
        1
    }

    fn bad_resume(&self, out: &mut Output) -> i32 {
        let message = format!("No conversation found with session ID: {}", self.session);
        eprintln!("{message}");
        eprintln!("{SIMULATED}");
        out.emit(json!({
            "type": "result",
            "subtype": "error_during_execution",
            "duration_ms": 0,
            "duration_api_ms": 0,
            "is_error": true,
            "num_turns": 0,
            "stop_reason": null,
            "session_id": self.session,
            "total_cost_usd": 0,
            "usage": {"input_tokens": 0, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0, "output_tokens": 0},
            "modelUsage": {},
            "permission_denials": [],
            "uuid": self.uuid("result"),
            "errors": [message],
            "simulated": true,
        }));
        1
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct Usage {
    input: u64,
    output: u64,
    cache_creation: u64,
    cache_read: u64,
}

impl Usage {
    fn is_zero(&self) -> bool {
        self.input + self.output + self.cache_creation + self.cache_read == 0
    }

    /// List prices per million tokens; cache writes cost 1.25× input, cache reads 0.1×.
    fn cost_usd(&self, model: &str) -> f64 {
        let (input, output) = if model.contains("opus") {
            (5.0, 25.0)
        } else if model.contains("haiku") {
            (1.0, 5.0)
        } else {
            (3.0, 15.0)
        };
        let cost = self.input as f64 * input
            + self.output as f64 * output
            + self.cache_creation as f64 * input * 1.25
            + self.cache_read as f64 * input * 0.1;
        (cost / 1e6 * 1e9).round() / 1e9
    }
}

fn resolve_model(alias: &str) -> String {
    match alias {
        "sonnet" => "claude-sonnet-4-5-20250929".into(),
        "opus" => "claude-opus-4-5-20251101".into(),
        "haiku" => "claude-haiku-4-5-20251001".into(),
        other => other.into(),
    }
}

fn hex_digest(parts: &[&[u8]]) -> String {
    let mut hasher = Sha256::new();
    for part in parts {
        hasher.update(part);
        hasher.update([0]);
    }
    hex::encode(hasher.finalize())
}

/// A UUID-shaped id from the parts, the pid and the clock (unique per invocation).
fn new_uuid(parts: &[&[u8]]) -> String {
    let pid = std::process::id().to_le_bytes();
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos()
        .to_le_bytes();
    let mut all: Vec<&[u8]> = parts.to_vec();
    all.push(&pid);
    all.push(&nanos);
    let h = hex_digest(&all);
    format!(
        "{}-{}-4{}-a{}-{}",
        &h[0..8],
        &h[8..12],
        &h[13..16],
        &h[17..20],
        &h[20..32]
    )
}

fn is_uuid(s: &str) -> bool {
    let groups: Vec<&str> = s.split('-').collect();
    groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(g, len)| g.len() == len && g.chars().all(|c| c.is_ascii_hexdigit()))
}

/// `FAKE_CLAUDE_RESET_AT` (unix seconds), else a minute from now: when a simulated
/// subscription limit resets.
fn reset_at_unix() -> u64 {
    std::env::var("FAKE_CLAUDE_RESET_AT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(unix_ms() / 1000 + 60)
}

/// `14:05` (UTC) for a unix time, as the CLI's "resets ..." text shows it.
fn chrono_like_hour(unix: u64) -> String {
    let day = unix % 86_400;
    format!("{:02}:{:02}", day / 3600, (day % 3600) / 60)
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64
}
