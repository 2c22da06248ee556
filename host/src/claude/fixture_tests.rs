//! The parser and classifier against every real CLI capture in `tests/fixtures/claude-cli/`.
//!
//! Each fixture file has an expectation below; a file without one fails the test, so a new
//! capture cannot be skipped silently. The captures are used unedited: where a file is not raw
//! stdout (a CI log, an issue excerpt with comments), the test extracts what the CLI printed the
//! way a reader of that file would, and says so.

use std::path::PathBuf;

use super::classify::{
    Evidence, FailureClass, PermanentKind, QuotaKind, Termination, TransientKind, classify,
    classify_code, classify_status, classify_text, quota_resets_at,
};
use super::command::ClaudeInvocation;
use super::stream::{Outcome, ParsedRun, StreamEvent, StreamParser, TokenUsage};

fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/claude-cli")
}

fn read(name: &str) -> String {
    let path = fixture_dir().join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

fn class(run: &ParsedRun, stderr: &str, termination: Termination) -> Option<FailureClass> {
    classify(Evidence {
        run,
        stderr,
        termination,
    })
    .map(|f| f.class)
}

fn failure_message(run: &ParsedRun, stderr: &str, termination: Termination) -> String {
    classify(Evidence {
        run,
        stderr,
        termination,
    })
    .expect("a failure")
    .message
}

fn tokens(input: u64, output: u64, cache_read: u64, cache_creation: u64) -> TokenUsage {
    TokenUsage {
        input,
        output,
        cache_read,
        cache_creation,
    }
}

/// The one line of a text fixture that starts with `prefix`.
fn line_starting(text: &str, prefix: &str) -> String {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("no line starting with {prefix:?}"))
        .to_string()
}

const AUTH: FailureClass = FailureClass::Permanent(PermanentKind::Authentication);
const EXIT_0: Termination = Termination::Exited(0);
const EXIT_1: Termination = Termination::Exited(1);

#[test]
fn every_fixture_file_parses_to_its_expected_fields() {
    let mut names: Vec<String> = std::fs::read_dir(fixture_dir())
        .expect("the fixture directory tests/fixtures/claude-cli is in the repository")
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n != "README.md")
        .collect();
    names.sort();
    assert!(
        names.len() >= 28,
        "expected the whole corpus, found {names:?}"
    );
    for name in &names {
        check_fixture(name);
    }
}

fn check_fixture(name: &str) {
    let text = read(name);
    match name {
        "cli_help_2.1.4.txt" => {
            // Help text is not stream output: nothing in it is a message.
            let run = ParsedRun::from_stdout(&text);
            assert_eq!(run.outcome(), Outcome::NoResult);
            assert!(run.init.is_none() && run.messages.is_empty());
            // Every flag the executor passes exists in the CLI, except the hidden --max-turns.
            let mut inv = ClaudeInvocation::new("sonnet", "p");
            inv.session = super::command::SessionMode::Resume("s".into());
            inv.append_system_prompt = Some("x".into());
            inv.allowed_tools = vec!["Read".into()];
            inv.disallowed_tools = vec!["Bash".into()];
            inv.permission_mode = Some("plan".into());
            inv.mcp_config = Some("m.json".into());
            inv.max_budget_usd = Some(1.0);
            inv.json_schema = Some("{}".into());
            for arg in inv.args().iter().filter(|a| a.starts_with('-')) {
                let flag = arg.split('=').next().unwrap();
                assert!(text.contains(flag), "{flag} is not in claude --help");
            }
            assert!(
                !text.contains("--max-turns"),
                "--max-turns is a hidden flag"
            );
            assert!(text.contains("--session-id <uuid>"));
            assert!(
                text.contains("--allowedTools, --allowed-tools <tools...>"),
                "variadic"
            );
        }
        "err_2.1.4x_nested_session_CLAUDECODE.txt" => {
            let run = ParsedRun::default();
            assert_eq!(
                class(&run, &text, EXIT_1),
                Some(FailureClass::Permanent(PermanentKind::NestedSession))
            );
            assert!(
                failure_message(&run, &text, EXIT_1)
                    .starts_with("Error: Claude Code cannot be launched inside another")
            );
            // The executor never passes the variable on.
            let inv = ClaudeInvocation::new("sonnet", "p");
            let env = inv.env([("CLAUDECODE".into(), "1".into())]);
            assert!(env.is_empty());
        }
        "err_2.1.59_stream_json_requires_verbose.txt" => {
            let stderr = line_starting(&text, "Error:");
            assert_eq!(
                stderr,
                "Error: When using --print, --output-format=stream-json requires --verbose"
            );
            let run = ParsedRun::default();
            assert_eq!(
                class(&run, &stderr, EXIT_1),
                Some(FailureClass::Permanent(PermanentKind::InvalidFlags))
            );
            let args = ClaudeInvocation::new("sonnet", "p").args();
            assert!(
                args.windows(2)
                    .any(|w| w == ["--output-format", "stream-json"])
            );
            assert!(args.contains(&"--verbose".to_string()));
        }
        "err_input_must_be_provided_variadic_allowedTools.txt" => {
            let stderr = line_starting(&text, "Error:");
            let run = ParsedRun::default();
            assert_eq!(
                class(&run, &stderr, EXIT_1),
                Some(FailureClass::Permanent(PermanentKind::InvalidFlags))
            );
            // The executor uses the `=` form and never a positional prompt.
            let mut inv = ClaudeInvocation::new("sonnet", "my prompt");
            inv.allowed_tools = vec!["Bash".into(), "Read".into()];
            let args = inv.args();
            assert!(args.contains(&"--allowedTools=Bash,Read".to_string()));
            assert!(!args.contains(&"my prompt".to_string()));
        }
        "issue_FeeiCN218_ci_log_json_success_empty_result_masked_model.txt" => {
            // A GitHub Actions log: strip the timestamp Actions puts before each line.
            let stdout: String = text
                .lines()
                .map(|l| match l.split_once('Z') {
                    Some((ts, rest)) if ts.len() == 27 && ts.starts_with("2026-") => {
                        rest.strip_prefix(' ').unwrap_or(rest)
                    }
                    _ => l,
                })
                .collect::<Vec<_>>()
                .join("\n");
            let run = ParsedRun::from_stdout(&stdout);
            let r = run
                .result
                .as_ref()
                .expect("the wrapped result still parses");
            assert!(!r.is_error);
            assert_eq!(r.text.as_deref(), Some(""));
            assert_eq!(
                r.session_id.as_deref(),
                Some("c0b4fa3f-e52e-4b4c-a894-6141488aa2f9")
            );
            assert_eq!(r.total_cost_usd, Some(0.15095600000000003));
            // `usage` is the main agent's; `modelUsage` (here one masked model with more
            // tokens) counts every model the call used, and is the call's total.
            assert_eq!(r.main_usage, tokens(25457, 449, 128, 0));
            assert_eq!(r.usage, tokens(27852, 463, 242, 0));
            // No assistant line in `json` output: nothing to fall back on, and none invented.
            assert!(!r.text_fallback);
            assert_eq!(r.num_turns, Some(1));
            assert_eq!(
                (r.duration_ms, r.duration_api_ms),
                (Some(12135), Some(15642))
            );
            assert!(
                r.model_usage.contains_key("***"),
                "secret masking kept as is"
            );
            assert!(run.skipped.iter().any(|l| l.contains("##[error]")));
            // The wrapper exited 1 on an empty answer; the CLI itself reported success.
            assert_eq!(class(&run, "", EXIT_1), None);
        }
        "json_2.0.62_invalid_api_key_ELIDED.txt" => {
            let run = ParsedRun::from_stdout(&text);
            let r = run.result.as_ref().expect("a type-less result object");
            assert!(r.is_error);
            assert_eq!(
                r.text.as_deref(),
                Some("Invalid API key · Fix external API key")
            );
            assert_eq!(class(&run, "", EXIT_1), Some(AUTH));
            assert_eq!(
                failure_message(&run, "", EXIT_1),
                "Invalid API key · Fix external API key"
            );
        }
        "json_2.1.177_error_max_turns_issue_claude-remember98_TRIMMED.json" => {
            let run = ParsedRun::from_stdout(&text);
            let r = run.result.as_ref().expect("a pretty-printed result");
            assert!(r.is_error);
            assert_eq!(r.subtype.as_deref(), Some("error_max_turns"));
            assert_eq!(r.num_turns, Some(2));
            assert_eq!(r.errors, vec!["Reached maximum number of turns (1)"]);
            assert_eq!(r.total_cost_usd, None);
            assert_eq!(
                class(&run, "", EXIT_1),
                Some(FailureClass::Permanent(PermanentKind::MaxTurns))
            );
            assert_eq!(
                failure_message(&run, "", EXIT_1),
                "Reached maximum number of turns (1)"
            );
        }
        "json_2.1.x_success_sonnet45_scylla.command.txt" => {
            // A shell trace, not output: json mode without --verbose, prompt as a positional file.
            assert!(text.contains("--print --output-format json"));
            let run = ParsedRun::from_stdout(&text);
            assert_eq!(run.outcome(), Outcome::NoResult);
            assert_eq!(run.skipped.len(), 2);
        }
        "json_2.1.x_success_sonnet45_scylla.json" => {
            let run = ParsedRun::from_stdout(&text);
            let r = run.result.as_ref().unwrap();
            assert!(!r.is_error);
            assert!(
                r.text
                    .as_deref()
                    .unwrap()
                    .starts_with("Task completed successfully! \n\nI've created the `hello.py`")
            );
            assert_eq!(
                r.session_id.as_deref(),
                Some("dc93aac8-fe7f-4d4a-83ef-2bd2c070444e")
            );
            assert_eq!(r.total_cost_usd, Some(0.1351093));
            // The main agent's `usage` leaves out the haiku side model; the call's tokens are
            // the sum over `modelUsage` (sonnet 29/656 + haiku 3774/191).
            assert_eq!(r.main_usage, tokens(29, 656, 112686, 23106));
            assert_eq!(r.usage, tokens(3803, 847, 112686, 23106));
            assert_eq!(r.main_model(), Some("claude-sonnet-4-5-20250929"));
            assert_eq!(r.num_turns, Some(6));
            assert_eq!(r.model_usage.len(), 2);
            assert_eq!(
                r.model_usage["claude-haiku-4-5-20251001"].cost_usd,
                Some(0.004729)
            );
            assert_eq!(
                r.model_usage["claude-sonnet-4-5-20250929"].tokens,
                tokens(29, 656, 112686, 23106)
            );
            assert_eq!(class(&run, "", EXIT_0), None);
        }
        "json_2.x_error_during_execution_EROFS_readonly_home.txt" => {
            // Real newlines inside JSON strings: joined back as `\n` escapes.
            let run = ParsedRun::from_stdout(&text);
            assert!(run.skipped.is_empty(), "skipped: {:?}", run.skipped);
            let r = run.result.as_ref().unwrap();
            assert!(r.is_error);
            assert_eq!(r.subtype.as_deref(), Some("error_during_execution"));
            assert_eq!(r.num_turns, Some(0));
            assert_eq!(r.total_cost_usd, Some(0.0));
            assert_eq!(
                r.session_id.as_deref(),
                Some("5c0c093f-4216-4caa-9af6-8d527a9caee4")
            );
            assert_eq!(r.errors.len(), 5);
            assert!(r.errors[1].contains("todos/5c0c093f")); // from the 2nd error's first line
            assert!(r.errors[1].contains("\n    at writeFileSync (node:fs:2380:20)"));
            assert_eq!(
                class(&run, "", EXIT_1),
                Some(FailureClass::Permanent(PermanentKind::ExecutionError))
            );
            assert!(failure_message(&run, "", EXIT_1).starts_with("EROFS: read-only file system"));
        }
        "result_2.1.220_error_api_404_model_not_found.json" => {
            let run = ParsedRun::from_stdout(&text);
            let r = run.result.as_ref().unwrap();
            assert!(r.is_error, "is_error wins over subtype success");
            assert_eq!(r.subtype.as_deref(), Some("success"));
            assert_eq!(r.api_error_status, Some(404));
            assert_eq!(r.terminal_reason.as_deref(), Some("api_error"));
            assert_eq!(r.total_cost_usd, Some(0.0));
            assert_eq!(
                class(&run, "", EXIT_0),
                Some(FailureClass::Permanent(PermanentKind::UnknownModel)),
                "exit 0 does not make it a success either"
            );
            assert!(
                failure_message(&run, "", EXIT_1)
                    .starts_with("There's an issue with the selected model (no-such-model).")
            );
        }
        "resume_unknown_session_id_exit1_CONDENSED.txt" => {
            let (stderr, stdout) = text
                .split_once("--- stderr ---")
                .unwrap()
                .1
                .split_once("--- stdout ---")
                .unwrap();
            let run = ParsedRun::from_stdout(stdout);
            let r = run.result.as_ref().unwrap();
            assert_eq!(r.subtype.as_deref(), Some("error_during_execution"));
            assert_eq!(
                class(&run, stderr, EXIT_1),
                Some(FailureClass::Permanent(PermanentKind::UnknownSession))
            );
            assert_eq!(
                failure_message(&run, stderr, EXIT_1),
                "No conversation found with session ID: 00000000-0000-0000-0000-000000000000"
            );
        }
        "stdout_nonjson_line_ANTHROPIC_LOG_debug.txt" => {
            let debug_line = line_starting(&text, "Error:")
                .split_once("Output: ")
                .unwrap()
                .1
                .to_string();
            assert_eq!(debug_line, "[log_71a72b] sending request {");
            // The debug line is skipped and a message after it still parses.
            let stdout = format!(
                "{debug_line}\n  method: 'post',\n}}\n{}",
                r#"{"type":"result","subtype":"success","is_error":false,"result":"ok","session_id":"s","total_cost_usd":0.01}"#
            );
            let run = ParsedRun::from_stdout(&stdout);
            assert_eq!(run.skipped.len(), 3);
            assert_eq!(run.final_text(), Some("ok"));
            // The whole excerpt is not JSON at all.
            let run = ParsedRun::from_stdout(&text);
            assert_eq!(run.outcome(), Outcome::NoResult);
            assert_eq!(
                class(&run, "", EXIT_0),
                Some(FailureClass::Transient(TransientKind::NoResult))
            );
        }
        "stdout_text_mode_max_turns_exit1.txt" => {
            // Text mode prints the error to stdout and leaves stderr empty.
            let stdout = line_starting(&text, "Error:");
            let run = ParsedRun::from_stdout(&stdout);
            assert_eq!(run.skipped, vec!["Error: Reached max turns (50)"]);
            assert_eq!(
                class(&run, "", EXIT_1),
                Some(FailureClass::Permanent(PermanentKind::MaxTurns))
            );
        }
        "stream_1.0.x_2025_opus4_text_only_London.jsonl" => {
            let run = ParsedRun::from_stdout(&text);
            let init = run.init.as_ref().unwrap();
            assert_eq!(
                init.session_id.as_deref(),
                Some("acc21b20-13b3-423c-9191-01925b546d5b")
            );
            assert_eq!(init.model.as_deref(), Some("claude-opus-4-20250514"));
            assert_eq!(init.version, None);
            assert_eq!(run.messages.len(), 1);
            assert_eq!(run.messages[0].text, "London");
            let r = run.result.as_ref().unwrap();
            assert_eq!(r.total_cost_usd, Some(0.2882215));
            // 5 output tokens from the result, not the placeholder 1 of the assistant line.
            assert_eq!(r.usage, tokens(4, 5, 0, 15342));
            assert_eq!((r.duration_ms, r.duration_api_ms), (Some(4744), Some(7954)));
            assert_eq!(run.final_text(), Some("London"));
            assert_eq!(class(&run, "", EXIT_0), None);
        }
        "stream_1.0.x_2025_sonnet4_tool_roundtrip_LS.jsonl" => {
            let run = ParsedRun::from_stdout(&text);
            assert_eq!(
                run.session_id(),
                Some("61f288d2-1db5-49b5-8c69-389bf31e270d")
            );
            assert_eq!(run.tool_calls.len(), 1);
            assert_eq!(run.tool_calls[0].name, "LS");
            assert_eq!(run.tool_calls[0].is_error, Some(false));
            assert_eq!(run.messages.len(), 1);
            assert_eq!(run.messages[0].text, "The directory appears to be empty.");
            let r = run.result.as_ref().unwrap();
            assert_eq!(r.total_cost_usd, Some(0.0558397));
            assert_eq!(r.usage, tokens(8, 65, 13345, 13528));
            assert_eq!(r.num_turns, Some(3));
            assert_eq!(class(&run, "", EXIT_0), None);
        }
        "stream_2.1.123_error_credit_balance_too_low.jsonl" => {
            let run = ParsedRun::from_stdout(&text);
            assert_eq!(
                run.init.as_ref().unwrap().version.as_deref(),
                Some("2.1.123")
            );
            let err = run.api_error.as_ref().unwrap();
            assert_eq!(err.code, "billing_error");
            assert_eq!(err.text, "Credit balance is too low");
            assert!(
                run.messages.is_empty(),
                "the synthetic message is not an answer"
            );
            let r = run.result.as_ref().unwrap();
            assert_eq!((r.is_error, r.api_error_status), (true, Some(400)));
            assert_eq!(r.total_cost_usd, Some(0.0));
            assert_eq!(
                class(&run, "", EXIT_1),
                Some(FailureClass::Permanent(PermanentKind::Billing))
            );
            assert_eq!(
                failure_message(&run, "", EXIT_1),
                "Credit balance is too low"
            );
        }
        "stream_2.1.220_error_model_not_found.jsonl" => {
            let run = ParsedRun::from_stdout(&text);
            assert!(run.skipped.is_empty());
            let init = run.init.as_ref().unwrap();
            assert_eq!(init.model.as_deref(), Some("no-such-model"));
            assert_eq!(init.version.as_deref(), Some("2.1.220"));
            assert_eq!(run.api_error.as_ref().unwrap().code, "model_not_found");
            let r = run.result.as_ref().unwrap();
            assert_eq!(r.api_error_status, Some(404));
            assert_eq!(
                r.session_id.as_deref(),
                Some("7a995c26-c485-4c08-aa33-071588978c49")
            );
            assert_eq!(
                class(&run, "", EXIT_1),
                Some(FailureClass::Permanent(PermanentKind::UnknownModel))
            );
        }
        "stream_2.1.220_success_with_tools.jsonl" => {
            let mut parser = StreamParser::new();
            let events: Vec<StreamEvent> = text.lines().flat_map(|l| parser.feed_line(l)).collect();
            assert_eq!(
                events
                    .iter()
                    .filter(|e| matches!(e, StreamEvent::RateLimit(_)))
                    .count(),
                2
            );
            let mut run = ParsedRun::default();
            events.into_iter().for_each(|e| run.apply(e));
            assert!(run.skipped.is_empty());
            assert_eq!(
                run.init.as_ref().unwrap().permission_mode.as_deref(),
                Some("auto")
            );
            // One message split over two lines (text, then tool_use), then a second message.
            assert_eq!(run.messages.len(), 2);
            assert_eq!(
                run.messages[0].id.as_deref(),
                Some("msg_011CdeZ44G5n3VmRyeeUj6Hk")
            );
            assert_eq!(
                run.messages[0].text,
                "This is a trivial file operation, not creative or debugging work, so no skill applies here."
            );
            assert_eq!(run.tool_calls.len(), 1);
            assert_eq!(run.tool_calls[0].name, "Write");
            assert_eq!(run.tool_calls[0].is_error, Some(false));
            assert_eq!(
                run.rate_limit.as_ref().unwrap().status.as_deref(),
                Some("allowed")
            );
            let r = run.result.as_ref().unwrap();
            assert_eq!(r.total_cost_usd, Some(0.054201000000000006));
            assert_eq!(r.usage, tokens(4, 171, 63600, 5424));
            assert_eq!(r.num_turns, Some(2));
            assert_eq!((r.duration_ms, r.duration_api_ms), (Some(6488), Some(6424)));
            assert_eq!(r.api_error_status, None);
            assert_eq!(
                r.model_usage["claude-sonnet-5"].cost_usd,
                Some(0.054201000000000006)
            );
            assert!(
                run.final_text()
                    .unwrap()
                    .starts_with("The tool result confirms the file is `hi`")
            );
            assert_eq!(class(&run, "", EXIT_0), None);
        }
        "stream_2.1.3_line_system_init.json" => {
            let run = ParsedRun::from_stdout(&text);
            let init = run.init.as_ref().expect("a pretty-printed init");
            assert_eq!(
                init.session_id.as_deref(),
                Some("40e7b02d-c0f9-4876-9010-f514d4eb0603")
            );
            assert_eq!(init.model.as_deref(), Some("claude-opus-4-5-20251101"));
            assert_eq!(init.version.as_deref(), Some("2.1.3"));
            assert_eq!(init.permission_mode.as_deref(), Some("acceptEdits"));
            assert_eq!(init.tools.len(), 17);
        }
        "stream_2.1.7_basic_query.jsonl" => {
            let run = ParsedRun::from_stdout(&text);
            assert_eq!(run.init.as_ref().unwrap().version.as_deref(), Some("2.1.7"));
            assert_eq!(run.messages[0].text, "4");
            let r = run.result.as_ref().unwrap();
            assert_eq!(r.text.as_deref(), Some("4"));
            assert_eq!(r.total_cost_usd, Some(0.1354875));
            assert_eq!(r.usage, tokens(10, 25, 0, 21570));
            assert_eq!(
                r.session_id.as_deref(),
                Some("1d1e46f9-35c7-4834-b529-846d5bb82288")
            );
            assert_eq!(class(&run, "", EXIT_0), None);
        }
        "stream_2.1.x_line_assistant_tool_use.json" => {
            let events = StreamParser::new().feed_text(&text);
            match events.as_slice() {
                [
                    StreamEvent::ToolUse {
                        name, id, input, ..
                    },
                ] => {
                    assert_eq!(name, "Bash");
                    assert_eq!(id, "toolu_01BeipFBP3sUY3EAwVg3qQnE");
                    assert_eq!(input["command"], "ls -la");
                }
                other => panic!("expected one tool use, got {other:?}"),
            }
        }
        "stream_2.1.x_line_result_success.json" => {
            let run = ParsedRun::from_stdout(&text);
            let r = run.result.as_ref().unwrap();
            assert_eq!(
                r.text.as_deref(),
                Some("Here are the files in the current directory.")
            );
            assert_eq!(r.total_cost_usd, Some(0.24722425));
            // `usage` counts less than `modelUsage`, which is the call's total.
            assert_eq!(r.main_usage, tokens(18, 424, 17254, 25067));
            assert_eq!(r.usage, tokens(38, 765, 28775, 31159));
            assert_eq!(r.num_turns, Some(2));
            assert_eq!(
                r.model_usage["claude-opus-4-5-20251101"].cost_usd,
                Some(0.22844625)
            );
            assert_eq!(class(&run, "", EXIT_0), None);
        }
        "stream_2.1.x_line_user_tool_result.json" => {
            let events = StreamParser::new().feed_text(&text);
            match events.as_slice() {
                [
                    StreamEvent::ToolResult {
                        tool_use_id,
                        content,
                        is_error,
                    },
                ] => {
                    assert_eq!(tool_use_id, "toolu_01BeipFBP3sUY3EAwVg3qQnE");
                    assert!(content.starts_with("total 1976\n"));
                    assert!(!is_error);
                }
                other => panic!("expected one tool result, got {other:?}"),
            }
        }
        "text_api_error_529_overloaded.txt" => {
            let overloaded = Some(FailureClass::Transient(TransientKind::Overloaded));
            let old = text.split("\n\n").next().unwrap();
            assert!(old.contains("API Error: 529 {"));
            assert_eq!(classify_text(old), overloaded);
            let new = line_starting(&text, "API Error: 529 Overloaded.");
            assert_eq!(classify_text(&new), overloaded);
            // The envelope is quoted in a comment; it is valid JSON once the `# ` is removed.
            let envelope = line_starting(&text, "# {")
                .trim_start_matches("# ")
                .to_string();
            let run = ParsedRun::from_stdout(&envelope);
            assert_eq!(run.result.as_ref().unwrap().api_error_status, Some(529));
            assert_eq!(class(&run, "", EXIT_1), overloaded);
            assert_eq!(classify_status(529), overloaded);
        }
        "text_legacy_usage_limit_reached_1.0.x.txt" => {
            // A subscription limit: parked until it resets, not failed.
            let quota = Some(FailureClass::Quota(QuotaKind::UsageLimit));
            let legacy = line_starting(&text, "Claude AI usage limit reached|");
            assert_eq!(classify_text(&legacy), quota);
            assert_eq!(
                quota_resets_at(&ParsedRun::default(), &legacy, 1_749_900_000_000),
                Some(1_749_924_000_000),
                "the unix time after the pipe"
            );
            assert_eq!(
                classify_text(&line_starting(&text, "Claude usage limit reached.")),
                quota
            );
        }
        "transcript_rate_limit_session_limit_synthetic_FRAGMENT.txt" => {
            let limited = Some(FailureClass::Transient(TransientKind::RateLimited));
            let message = line_starting(&text, "\"model\":\"<synthetic>\"");
            assert_eq!(
                classify_text(&message),
                Some(FailureClass::Quota(QuotaKind::SessionLimit))
            );
            // "resets 2pm (Europe/Helsinki)": a zone KSI does not resolve, so no guessed time.
            assert_eq!(
                quota_resets_at(&ParsedRun::default(), &message, 1_790_000_000_000),
                None
            );
            // The code and status alone are an ordinary rate limit.
            assert!(text.contains("\"error\":\"rate_limit\""));
            assert_eq!(classify_code("rate_limit"), limited);
            assert_eq!(classify_status(429), limited);
        }
        "warn_no_stdin_data_received_3s.txt" => {
            // A warning, not a failure: a run that has a result still succeeds.
            assert_eq!(classify_text(&text), None);
            let run = ParsedRun::from_stdout(
                r#"{"type":"result","subtype":"success","is_error":false,"result":"ok"}"#,
            );
            assert_eq!(class(&run, &text, EXIT_0), None);
        }
        other => panic!(
            "fixture {other} has no expectation: add one to check_fixture in {}",
            file!()
        ),
    }
}

#[test]
fn the_four_2_1_x_lines_of_one_session_fold_into_one_run() {
    let mut parser = StreamParser::new();
    let mut run = ParsedRun::default();
    for name in [
        "stream_2.1.3_line_system_init.json",
        "stream_2.1.x_line_assistant_tool_use.json",
        "stream_2.1.x_line_user_tool_result.json",
        "stream_2.1.x_line_result_success.json",
    ] {
        for line in read(name).lines() {
            parser
                .feed_line(line)
                .into_iter()
                .for_each(|e| run.apply(e));
        }
    }
    assert_eq!(
        run.session_id(),
        Some("40e7b02d-c0f9-4876-9010-f514d4eb0603")
    );
    assert_eq!(run.tool_calls[0].is_error, Some(false));
    assert_eq!(run.outcome(), Outcome::Succeeded);
}

#[test]
fn every_fixture_stream_also_parses_as_one_json_array() {
    // `--output-format json --verbose` prints all messages as one array.
    for name in [
        "stream_2.1.7_basic_query.jsonl",
        "stream_2.1.220_success_with_tools.jsonl",
        "stream_2.1.123_error_credit_balance_too_low.jsonl",
    ] {
        let text = read(name);
        let line_by_line = ParsedRun::from_stdout(&text);
        let array = format!(
            "[{}]",
            text.trim_end().lines().collect::<Vec<_>>().join(",")
        );
        assert_eq!(ParsedRun::from_stdout(&array), line_by_line, "{name}");
    }
}

/// What CLI 2.1.197 (npm `@anthropic-ai/claude-code`, native linux-x64 build) printed on this
/// machine, captured while writing the executor; shortened to the fields that matter.
mod observed_2_1_197 {
    use super::*;

    /// Empty HOME, no credentials: exit 1, empty stderr.
    const NOT_LOGGED_IN: &str = concat!(
        r#"{"type":"system","subtype":"init","cwd":"/tmp","session_id":"d8bd2ba5-e619-4f1f-b0a3-b574d3a545cf","model":"claude-sonnet-5","permissionMode":"default","apiKeySource":"none","claude_code_version":"2.1.197","uuid":"bd4ee92e-6a5a-425f-8c77-6ea88e885f8a","fast_mode_state":"off"}"#,
        "\n",
        r#"{"type":"assistant","message":{"id":"18760d6a-5a14-4306-9423-1d6b1d80dd2c","container":null,"model":"<synthetic>","role":"assistant","stop_details":null,"stop_reason":"stop_sequence","stop_sequence":"","type":"message","usage":{"input_tokens":0,"output_tokens":0},"content":[{"type":"text","text":"Not logged in · Please run /login"}],"context_management":null},"parent_tool_use_id":null,"session_id":"d8bd2ba5-e619-4f1f-b0a3-b574d3a545cf","uuid":"6e018ea9-81dc-43b4-8cb1-84887453e45f","error":"authentication_failed"}"#,
        "\n",
        r#"{"type":"result","subtype":"success","is_error":true,"api_error_status":null,"duration_ms":133,"duration_api_ms":0,"num_turns":1,"result":"Not logged in · Please run /login","stop_reason":"stop_sequence","session_id":"d8bd2ba5-e619-4f1f-b0a3-b574d3a545cf","total_cost_usd":0,"usage":{"input_tokens":0,"cache_creation_input_tokens":0,"cache_read_input_tokens":0,"output_tokens":0},"modelUsage":{},"permission_denials":[],"terminal_reason":"completed","fast_mode_state":"off","uuid":"f30f665b-dd93-460e-890a-6096bf297818"}"#,
    );

    /// `ANTHROPIC_API_KEY=fake`, no DNS, `CLAUDE_CODE_MAX_RETRIES=1`: exit 1, empty stderr.
    const NO_NETWORK: &str = concat!(
        r#"{"type":"system","subtype":"api_retry","attempt":1,"max_retries":1,"retry_delay_ms":600.3101425341304,"error_status":null,"error":"unknown","session_id":"192e1fc1-5ac8-45d5-bf77-795f68bd08f0","uuid":"e6de81d8-4b48-4d37-88da-fd069582fc8f"}"#,
        "\n",
        r#"{"type":"assistant","message":{"id":"809aca17-5a10-4ef8-b68e-366411638f97","model":"<synthetic>","role":"assistant","type":"message","content":[{"type":"text","text":"API Error: Unable to connect to API (FailedToOpenSocket)"}]},"parent_tool_use_id":null,"session_id":"192e1fc1-5ac8-45d5-bf77-795f68bd08f0","error":"server_error"}"#,
        "\n",
        r#"{"type":"result","subtype":"success","is_error":true,"api_error_status":null,"duration_ms":741,"duration_api_ms":0,"num_turns":1,"result":"API Error: Unable to connect to API (FailedToOpenSocket)","session_id":"192e1fc1-5ac8-45d5-bf77-795f68bd08f0","total_cost_usd":0}"#,
    );

    #[test]
    fn no_credentials_is_a_permanent_authentication_failure() {
        let run = ParsedRun::from_stdout(NOT_LOGGED_IN);
        assert_eq!(class(&run, "", EXIT_1), Some(AUTH));
        assert_eq!(
            failure_message(&run, "", EXIT_1),
            "Not logged in · Please run /login"
        );
    }

    #[test]
    fn an_unreachable_api_after_the_clis_own_retries_is_a_transient_network_failure() {
        let run = ParsedRun::from_stdout(NO_NETWORK);
        assert_eq!(run.api_retries.len(), 1);
        assert_eq!(run.api_retries[0].delay_ms, Some(600.3101425341304));
        assert_eq!(
            class(&run, "", EXIT_1),
            Some(FailureClass::Transient(TransientKind::Network))
        );
    }

    #[test]
    fn usage_errors_on_stderr_are_invalid_flags() {
        for stderr in [
            "error: unknown option '--bogus-flag'",
            "Error: When using --print, --output-format=stream-json requires --verbose",
            "Error: Invalid session ID. Must be a valid UUID.",
            "error: option '--permission-mode <mode>' argument 'bogus' is invalid. Allowed choices are acceptEdits, auto, bypassPermissions, default, dontAsk, plan.",
        ] {
            assert_eq!(
                class(&ParsedRun::default(), stderr, EXIT_1),
                Some(FailureClass::Permanent(PermanentKind::InvalidFlags)),
                "{stderr}"
            );
        }
    }
}
