//! The Claude CLI command line: arguments, environment and binary for one call.
//!
//! Two traps shape this file. Tool lists are passed as `--allowedTools=a,b`: the CLI's flags are
//! variadic, and the space-separated form swallows whatever follows (a positional prompt
//! included). And the child starts from an empty environment: an inherited `CLAUDECODE` makes the
//! CLI refuse to run, and a daemon's environment should not leak into a tool-using agent.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use serde::{Deserialize, Serialize};

/// Environment variable naming the CLI binary when the configuration does not.
pub const BINARY_ENV: &str = "KSI_CLAUDE_BIN";

/// Variables the child inherits by exact name.
const INHERITED_NAMES: &[&str] = &["PATH", "HOME", "LANG", "TMPDIR", "USER", "SHELL"];
/// Variables the child inherits by prefix.
const INHERITED_PREFIXES: &[&str] = &["LC_", "ANTHROPIC_", "CLAUDE_"];
/// Variables the child never gets, even when configured: they make the CLI believe it runs
/// inside another Claude Code session.
const NEVER_PASSED: &[&str] = &["CLAUDECODE", "CLAUDE_CODE_ENTRYPOINT"];

/// The CLI binary to run: `KSI_CLAUDE_BIN` if set, else `claude` (looked up on `PATH`).
pub fn default_binary() -> PathBuf {
    std::env::var_os(BINARY_ENV)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("claude"))
}

/// Which conversation the call belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum SessionMode {
    /// A new conversation with an id the CLI picks.
    #[default]
    New,
    /// A new conversation with this id (`--session-id`, must be a UUID).
    WithId(String),
    /// Continue this conversation (`--resume`).
    Resume(String),
}

/// Everything one CLI call needs, except limits. Build with [`ClaudeInvocation::new`] and set
/// the fields you need.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClaudeInvocation {
    /// The binary (see [`default_binary`]).
    pub binary: PathBuf,
    /// `--model`.
    pub model: String,
    /// The prompt, written to stdin (then stdin is closed).
    pub prompt: String,
    /// `--session-id` / `--resume`.
    pub session: SessionMode,
    /// `--append-system-prompt`.
    pub append_system_prompt: Option<String>,
    /// `--max-turns` (a hidden flag of the CLI, still honoured).
    pub max_turns: Option<u32>,
    /// `--allowedTools=a,b`.
    pub allowed_tools: Vec<String>,
    /// `--disallowedTools=a,b`.
    pub disallowed_tools: Vec<String>,
    /// `--permission-mode` (`default`, `acceptEdits`, `bypassPermissions`, `dontAsk`, `plan`, `auto`).
    pub permission_mode: Option<String>,
    /// `--mcp-config=` (a file path or a JSON string).
    pub mcp_config: Option<String>,
    /// `--max-budget-usd`: the CLI's own spend cap for this call.
    pub max_budget_usd: Option<f64>,
    /// `--json-schema`: ask for structured output.
    pub json_schema: Option<String>,
    /// Further arguments, appended as given.
    pub extra_args: Vec<String>,
    /// The child's working directory (the agent's sandbox); the daemon's when `None`.
    pub working_dir: Option<PathBuf>,
    /// Configured variables added to the clean environment (they win over inherited ones).
    pub extra_env: Vec<(String, String)>,
    /// Whether the allow-listed variables (PATH, HOME, LANG, LC_*, TMPDIR, USER, SHELL,
    /// ANTHROPIC_*, CLAUDE_*) are taken from the daemon's environment. When `false` the child
    /// gets [`extra_env`](Self::extra_env) only (tests use this to run without credentials).
    pub inherit_env: bool,
    /// Where the CLI's stdout goes. `None`: a pipe the supervisor reads. `Some(file)`: the CLI
    /// writes straight into the file (appending) and the supervisor tails it, so an answer the
    /// CLI printed is on disk even if KSI dies before reading it.
    pub stdout_file: Option<PathBuf>,
    /// How many steps below the daemon's CPU priority the CLI runs (`nice -n`; 0 for the
    /// same). See [`super::spawner`].
    #[serde(default)]
    pub nice: i32,
}

impl ClaudeInvocation {
    /// A call of `model` with `prompt`, in a new session, with the default binary.
    pub fn new(model: impl Into<String>, prompt: impl Into<String>) -> Self {
        Self {
            binary: default_binary(),
            model: model.into(),
            prompt: prompt.into(),
            session: SessionMode::New,
            append_system_prompt: None,
            max_turns: None,
            allowed_tools: Vec::new(),
            disallowed_tools: Vec::new(),
            permission_mode: None,
            mcp_config: None,
            max_budget_usd: None,
            json_schema: None,
            extra_args: Vec::new(),
            working_dir: None,
            extra_env: Vec::new(),
            inherit_env: true,
            stdout_file: None,
            nice: 0,
        }
    }

    /// The arguments after the binary name. The prompt is not among them: it goes on stdin.
    pub fn args(&self) -> Vec<String> {
        let mut args: Vec<String> = [
            "-p",
            "--output-format",
            "stream-json",
            "--verbose",
            "--model",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.push(self.model.clone());
        match &self.session {
            SessionMode::New => {}
            SessionMode::WithId(id) => args.extend(["--session-id".into(), id.clone()]),
            SessionMode::Resume(id) => args.extend(["--resume".into(), id.clone()]),
        }
        if let Some(prompt) = &self.append_system_prompt {
            args.extend(["--append-system-prompt".into(), prompt.clone()]);
        }
        if let Some(turns) = self.max_turns {
            args.extend(["--max-turns".into(), turns.to_string()]);
        }
        // Always the `=` form: the variadic form would swallow the next argument.
        if !self.allowed_tools.is_empty() {
            args.push(format!("--allowedTools={}", self.allowed_tools.join(",")));
        }
        if !self.disallowed_tools.is_empty() {
            args.push(format!(
                "--disallowedTools={}",
                self.disallowed_tools.join(",")
            ));
        }
        if let Some(mode) = &self.permission_mode {
            args.extend(["--permission-mode".into(), mode.clone()]);
        }
        if let Some(config) = &self.mcp_config {
            args.push(format!("--mcp-config={config}"));
        }
        if let Some(budget) = self.max_budget_usd {
            args.extend(["--max-budget-usd".into(), budget.to_string()]);
        }
        if let Some(schema) = &self.json_schema {
            args.extend(["--json-schema".into(), schema.clone()]);
        }
        args.extend(self.extra_args.iter().cloned());
        args
    }

    /// The child's environment, built from `parent` (normally `std::env::vars_os()`): only the
    /// variables the CLI needs, then [`extra_env`](Self::extra_env); never `CLAUDECODE` or
    /// `CLAUDE_CODE_ENTRYPOINT`.
    pub fn env(
        &self,
        parent: impl IntoIterator<Item = (OsString, OsString)>,
    ) -> Vec<(OsString, OsString)> {
        let mut env: Vec<(OsString, OsString)> = parent
            .into_iter()
            .filter(|_| self.inherit_env)
            .filter(|(name, _)| {
                let Some(name) = name.to_str() else {
                    return false;
                };
                !NEVER_PASSED.contains(&name)
                    && (INHERITED_NAMES.contains(&name)
                        || INHERITED_PREFIXES.iter().any(|p| name.starts_with(p)))
            })
            .collect();
        for (name, value) in &self.extra_env {
            if NEVER_PASSED.contains(&name.as_str()) {
                tracing::warn!(variable = %name, "not passing a configured variable that makes the Claude CLI refuse to run");
                continue;
            }
            env.retain(|(n, _)| n.to_str() != Some(name.as_str()));
            env.push((name.into(), value.into()));
        }
        env
    }

    /// A ready-to-spawn command: clean environment, piped stdio, its own process group, killed
    /// when dropped, and `PR_SET_PDEATHSIG` (see [`ClaudeInvocation::command_with`]). The caller
    /// writes [`prompt`](Self::prompt) to stdin and closes it.
    pub fn command(&self) -> tokio::process::Command {
        self.command_with(true)
    }

    /// [`ClaudeInvocation::command`]; with `pdeathsig` false the child gets no
    /// `PR_SET_PDEATHSIG`, so the spawn takes the fast `posix_spawn` path: for callers whose
    /// children are watched by a [`super::guardian::Guardian`].
    pub fn command_with(&self, pdeathsig: bool) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(&self.binary);
        cmd.args(self.args())
            .env_clear()
            .envs(self.env(std::env::vars_os()))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // The whole group is signalled on timeout/cancel, so grandchildren die too.
            .process_group(0)
            .kill_on_drop(true);
        if let Some(dir) = &self.working_dir {
            cmd.current_dir(dir);
        }
        // No Claude process outlives the daemon: if KSI dies (even by SIGKILL) the CLI gets
        // SIGKILL too, before it can finish a call whose answer nobody would read (and that
        // would then be paid for again). Its own children are killed with its group at the
        // next start-up's reconciliation. The signal follows the spawning thread; KSI spawns
        // from runtime worker threads or from a step's thread that waits for the call.
        // SAFETY: prctl and getppid are async-signal-safe; nothing else runs between fork and exec.
        if !pdeathsig {
            return cmd;
        }
        let parent = std::process::id() as libc::pid_t;
        let nice = self.nice;
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // This path forks anyway, so the child lowers its own priority (see spawner.rs).
                if nice > 0 {
                    libc::nice(nice);
                }
                if libc::getppid() != parent {
                    // The parent died before the prctl took effect.
                    libc::_exit(1);
                }
                Ok(())
            });
        }
        cmd
    }

    /// The command line as a shell would show it, for logs (the prompt is on stdin, not here).
    pub fn display(&self) -> String {
        std::iter::once(display_path(&self.binary))
            .chain(self.args().iter().map(|a| shell_quote(a)))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

fn display_path(p: &Path) -> String {
    shell_quote(&p.to_string_lossy())
}

fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_=./,:@+".contains(c))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_base_command_line_is_print_stream_json_verbose_model() {
        let args = ClaudeInvocation::new("opus", "the prompt").args();
        assert_eq!(
            args,
            [
                "-p",
                "--output-format",
                "stream-json",
                "--verbose",
                "--model",
                "opus"
            ]
        );
    }

    #[test]
    fn every_option_is_passed_and_tool_lists_use_the_equals_form() {
        let mut inv = ClaudeInvocation::new("sonnet", "p");
        inv.session = SessionMode::Resume("abc".into());
        inv.append_system_prompt = Some("be brief".into());
        inv.max_turns = Some(3);
        inv.allowed_tools = vec!["Read".into(), "Bash(git:*)".into()];
        inv.disallowed_tools = vec!["WebFetch".into()];
        inv.permission_mode = Some("acceptEdits".into());
        inv.mcp_config = Some("/etc/mcp.json".into());
        inv.max_budget_usd = Some(0.25);
        inv.json_schema = Some(r#"{"type":"object"}"#.into());
        inv.extra_args = vec!["--fallback-model".into(), "haiku".into()];
        let args = inv.args().join(" ");
        assert_eq!(
            args,
            "-p --output-format stream-json --verbose --model sonnet --resume abc \
             --append-system-prompt be brief --max-turns 3 --allowedTools=Read,Bash(git:*) \
             --disallowedTools=WebFetch --permission-mode acceptEdits --mcp-config=/etc/mcp.json \
             --max-budget-usd 0.25 --json-schema {\"type\":\"object\"} --fallback-model haiku"
        );
        inv.session = SessionMode::WithId("0000".into());
        assert!(inv.args().windows(2).any(|w| w == ["--session-id", "0000"]));
    }

    #[test]
    fn the_child_environment_keeps_only_what_the_cli_needs() {
        let parent = [
            ("PATH", "/usr/bin"),
            ("HOME", "/home/k"),
            ("LANG", "C.UTF-8"),
            ("LC_ALL", "C"),
            ("TMPDIR", "/tmp"),
            ("USER", "k"),
            ("SHELL", "/bin/sh"),
            ("ANTHROPIC_API_KEY", "sk"),
            ("CLAUDE_CONFIG_DIR", "/c"),
            ("CLAUDECODE", "1"),
            ("CLAUDE_CODE_ENTRYPOINT", "cli"),
            ("AWS_SECRET_ACCESS_KEY", "no"),
            ("KSI_TOKEN", "no"),
        ]
        .map(|(k, v)| (OsString::from(k), OsString::from(v)));
        let mut inv = ClaudeInvocation::new("sonnet", "p");
        inv.extra_env = vec![
            ("HOME".into(), "/sandbox".into()),
            ("HTTPS_PROXY".into(), "http://proxy".into()),
            ("CLAUDECODE".into(), "1".into()),
        ];
        let env = inv.env(parent);
        let mut names: Vec<String> = env
            .iter()
            .map(|(k, _)| k.to_string_lossy().into())
            .collect();
        names.sort();
        assert_eq!(
            names,
            [
                "ANTHROPIC_API_KEY",
                "CLAUDE_CONFIG_DIR",
                "HOME",
                "HTTPS_PROXY",
                "LANG",
                "LC_ALL",
                "PATH",
                "SHELL",
                "TMPDIR",
                "USER"
            ]
        );
        let home = env.iter().find(|(k, _)| k == "HOME").unwrap();
        assert_eq!(home.1, "/sandbox", "configured variables win");
    }

    #[test]
    fn the_display_form_quotes_what_a_shell_would_split() {
        let mut inv = ClaudeInvocation::new("sonnet", "p");
        inv.binary = PathBuf::from("/opt/claude");
        inv.append_system_prompt = Some("be brief".into());
        assert_eq!(
            inv.display(),
            "/opt/claude -p --output-format stream-json --verbose --model sonnet --append-system-prompt 'be brief'"
        );
    }
}
