//! Failure classes of a Claude CLI run: what went wrong, and whether trying again can help.
//!
//! The CLI reports failures in many places: a `result` with `is_error: true` (often with
//! `subtype: "success"`!), a synthetic assistant message with an `error` code, `errors[]`, a line
//! on stderr, an exit status, or nothing at all. [`classify`] looks at all of them, in order of
//! reliability, and keeps the CLI's own message so a user sees what the CLI said.
//!
//! Decisions worth knowing:
//! - The result line is authoritative: `is_error: false` is success even with a non-zero exit
//!   (wrappers exit 1 on empty answers, the CLI does not), and `is_error: true` is a failure even
//!   with `subtype: "success"` and exit 0.
//! - `error_max_turns` and `error_max_budget_usd` are **permanent**: the same request with the
//!   same cap would spend the same money and stop at the same place.
//! - `error_during_execution` is **permanent** unless its messages name a transient cause
//!   (network, overload, rate limit): it reports the CLI's own run breaking (read-only home,
//!   unknown resume id, a broken config), which an identical retry reproduces.
//! - An error we do not recognise is permanent: KSI spends real money, so it retries only what it
//!   knows to be transient.

use serde::{Deserialize, Serialize};

use super::stream::ParsedRun;

/// Why a run failed, and whether a retry may succeed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FailureClass {
    /// Retrying later may succeed.
    Transient(TransientKind),
    /// Retrying the same request will fail the same way; fail at once.
    Permanent(PermanentKind),
    /// A subscription's usage limit: not a failure of the call. It is parked until the limit
    /// resets (see [`quota_resets_at`]) and runs again by itself (`claude.quota.on_limit`).
    Quota(QuotaKind),
}

/// Which subscription limit was hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum QuotaKind {
    /// The five-hour session limit ("You've hit your session limit · resets 2pm").
    SessionLimit,
    /// A usage limit with a reset time ("Claude AI usage limit reached|<unix time>", a 429 with
    /// a rejected `rate_limit_event`, weekly limits).
    UsageLimit,
    /// The monthly credit for `claude -p` is used up.
    MonthlyCredit,
}

/// Failures that go away by themselves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TransientKind {
    /// The API is overloaded (HTTP 529, `overloaded_error`).
    Overloaded,
    /// A rate or usage limit (HTTP 429, "usage limit reached", "session limit").
    RateLimited,
    /// The API could not be reached (ECONNREFUSED, ENOTFOUND, "fetch failed", "Unable to connect").
    Network,
    /// The API failed on its side (HTTP 5xx other than 529, `server_error`).
    ServerError,
    /// The run exceeded its overall time limit and was killed.
    OverallTimeout,
    /// The run printed nothing for too long and was killed.
    NoOutputTimeout,
    /// The process died (signal, or a non-zero exit without a result line).
    Crash,
    /// The process exited 0 without a result line.
    NoResult,
    /// Not started: the data directory's disk has too little space left to keep the answer
    /// (`claude.min_free_mb`); it would be paid for and lost.
    DiskFull,
}

/// Failures that a retry cannot fix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PermanentKind {
    /// No or bad credentials (401, "Invalid API key", "Not logged in", `authentication_failed`).
    Authentication,
    /// No money left ("Credit balance is too low", `billing_error`, 402).
    Billing,
    /// The model does not exist or is not available (404, `model_not_found`).
    UnknownModel,
    /// The command line was rejected ("error: unknown option", "requires --verbose", ...).
    InvalidFlags,
    /// `--resume` named a session the CLI does not know.
    UnknownSession,
    /// The CLI refused to start inside another Claude Code session (`CLAUDECODE` was set).
    NestedSession,
    /// The run hit `--max-turns` (`error_max_turns`).
    MaxTurns,
    /// The run hit `--max-budget-usd` (`error_max_budget_usd`).
    BudgetExceeded,
    /// The API rejected the request itself (400 `invalid_request`, other 4xx).
    InvalidRequest,
    /// The CLI broke during the run (`error_during_execution`: read-only home, config, ...).
    ExecutionError,
    /// The CLI binary could not be started (not found, not executable).
    ExecutableUnavailable,
    /// The caller cancelled the run.
    Cancelled,
    /// An error KSI does not recognise; not retried, to protect the budget.
    Unrecognized,
}

impl FailureClass {
    /// Whether this class is worth another attempt. Same as [`is_retryable`].
    pub fn is_retryable(&self) -> bool {
        is_retryable(self)
    }

    /// A short stable name for logs, metrics and the `processes.error_class` column,
    /// e.g. `transient.rate_limited`, `permanent.authentication`.
    pub fn as_str(&self) -> &'static str {
        match self {
            FailureClass::Transient(kind) => match kind {
                TransientKind::Overloaded => "transient.overloaded",
                TransientKind::RateLimited => "transient.rate_limited",
                TransientKind::Network => "transient.network",
                TransientKind::ServerError => "transient.server_error",
                TransientKind::OverallTimeout => "transient.overall_timeout",
                TransientKind::NoOutputTimeout => "transient.no_output_timeout",
                TransientKind::Crash => "transient.crash",
                TransientKind::NoResult => "transient.no_result",
                TransientKind::DiskFull => "transient.disk_full",
            },
            FailureClass::Quota(kind) => match kind {
                QuotaKind::SessionLimit => "quota.session_limit",
                QuotaKind::UsageLimit => "quota.usage_limit",
                QuotaKind::MonthlyCredit => "quota.monthly_credit",
            },
            FailureClass::Permanent(kind) => match kind {
                PermanentKind::Authentication => "permanent.authentication",
                PermanentKind::Billing => "permanent.billing",
                PermanentKind::UnknownModel => "permanent.unknown_model",
                PermanentKind::InvalidFlags => "permanent.invalid_flags",
                PermanentKind::UnknownSession => "permanent.unknown_session",
                PermanentKind::NestedSession => "permanent.nested_session",
                PermanentKind::MaxTurns => "permanent.max_turns",
                PermanentKind::BudgetExceeded => "permanent.budget_exceeded",
                PermanentKind::InvalidRequest => "permanent.invalid_request",
                PermanentKind::ExecutionError => "permanent.execution_error",
                PermanentKind::ExecutableUnavailable => "permanent.executable_unavailable",
                PermanentKind::Cancelled => "permanent.cancelled",
                PermanentKind::Unrecognized => "permanent.unrecognized",
            },
        }
    }
}

impl std::fmt::Display for FailureClass {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Whether a failure of this class is worth another attempt: transient ones are, permanent ones
/// never are.
pub fn is_retryable(class: &FailureClass) -> bool {
    matches!(class, FailureClass::Transient(_) | FailureClass::Quota(_))
}

/// A classified failure with the CLI's own words.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Failure {
    /// What kind of failure it is.
    pub class: FailureClass,
    /// The CLI's message (result text, `errors[]`, stderr), or KSI's description when the CLI said
    /// nothing (timeouts, crashes).
    pub message: String,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.message, self.class)
    }
}

/// How the process ended, as seen by the supervisor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Termination {
    /// The process exited by itself with this code.
    Exited(i32),
    /// The process died of this signal without KSI killing it.
    Signaled(i32),
    /// KSI killed it because nothing was printed for the no-output timeout.
    NoOutputTimeout,
    /// KSI killed it because the overall timeout passed.
    OverallTimeout,
    /// KSI killed it because the caller cancelled.
    Cancelled,
    /// KSI killed it because it printed its result but did not exit.
    LingeredAfterResult,
    /// KSI killed it because, `connect_timeout` after it started, it had only retried its
    /// connection to the API (no network).
    ConnectTimeout,
}

/// The evidence of one attempt.
#[derive(Debug, Clone, Copy)]
pub struct Evidence<'a> {
    /// What stdout said.
    pub run: &'a ParsedRun,
    /// The tail of stderr.
    pub stderr: &'a str,
    /// How the process ended.
    pub termination: Termination,
}

/// Classify one attempt. `None` means it succeeded.
///
/// Order: a successful result wins; then KSI's own kills (timeout, cancel) when no result came;
/// then the result's error, then known texts on stderr and stray stdout lines, then the exit.
pub fn classify(ev: Evidence<'_>) -> Option<Failure> {
    let run = ev.run;
    if let Some(result) = &run.result {
        if !result.is_error {
            return None;
        }
        return Some(classify_reported_error(run, ev.stderr));
    }
    let stderr = ev.stderr.trim();
    let stray_stdout = run.skipped.join("\n");
    let cli_text = [stderr, stray_stdout.trim()]
        .into_iter()
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>()
        .join("\n");
    match ev.termination {
        Termination::Cancelled => {
            return Some(Failure {
                class: FailureClass::Permanent(PermanentKind::Cancelled),
                message: "the run was cancelled".into(),
            });
        }
        Termination::ConnectTimeout => {
            let retries = run.api_retries.len();
            return Some(Failure {
                class: FailureClass::Transient(TransientKind::Network),
                message: format!(
                    "the Claude CLI could not reach the API: {retries} connection retries and no answer, so KSI stopped it (claude.timeout.connect_secs). Check the machine's network or proxy"
                ),
            });
        }
        Termination::NoOutputTimeout | Termination::OverallTimeout => {
            let (kind, what) = if ev.termination == Termination::NoOutputTimeout {
                (
                    TransientKind::NoOutputTimeout,
                    "printed nothing for too long",
                )
            } else {
                (
                    TransientKind::OverallTimeout,
                    "ran past its overall timeout",
                )
            };
            let retries = run
                .api_retries
                .last()
                .map(|r| format!(" after {} API retries", r.attempt.unwrap_or(0)))
                .unwrap_or_default();
            return Some(Failure {
                class: FailureClass::Transient(kind),
                message: format!("the Claude CLI {what}{retries} and was killed"),
            });
        }
        _ => {}
    }
    if let Some(err) = &run.api_error
        && let Some(class) = classify_code(&err.code).or_else(|| classify_text(&err.text))
    {
        return Some(Failure {
            class,
            message: err.text.clone(),
        });
    }
    if let Some(class) = classify_text(&cli_text) {
        return Some(Failure {
            class,
            message: cli_text,
        });
    }
    let (kind, message) = match ev.termination {
        Termination::Signaled(sig) => (
            TransientKind::Crash,
            format!("the Claude CLI was killed by signal {sig}"),
        ),
        Termination::Exited(0) => (
            TransientKind::NoResult,
            "the Claude CLI exited without printing a result".to_string(),
        ),
        Termination::Exited(code) => (
            TransientKind::Crash,
            format!("the Claude CLI exited with code {code} without printing a result"),
        ),
        // A result was printed in this case, so it was handled above.
        _ => (
            TransientKind::NoResult,
            "the Claude CLI printed no result".to_string(),
        ),
    };
    let message = if cli_text.is_empty() {
        message
    } else {
        format!("{message}: {cli_text}")
    };
    Some(Failure {
        class: FailureClass::Transient(kind),
        message,
    })
}

/// A result with `is_error: true`.
fn classify_reported_error(run: &ParsedRun, stderr: &str) -> Failure {
    let result = run.result.as_ref().expect("called with a result");
    let message = run
        .error_message()
        .or_else(|| Some(stderr.trim().to_string()).filter(|s| !s.is_empty()))
        .unwrap_or_else(|| {
            format!(
                "the Claude CLI reported an error ({})",
                result.subtype.as_deref().unwrap_or("no subtype")
            )
        });
    let all_text = [message.as_str(), &result.errors.join("\n"), stderr].join("\n");
    let class = classify_text(&all_text)
        .or_else(|| run.api_error.as_ref().and_then(|e| classify_code(&e.code)))
        .or_else(|| result.api_error_status.and_then(classify_status))
        .or_else(|| result.subtype.as_deref().and_then(classify_subtype))
        .unwrap_or(FailureClass::Permanent(PermanentKind::Unrecognized));
    // A rate limit that the CLI says was rejected until a time is a quota, not a blip.
    let class = match class {
        FailureClass::Transient(TransientKind::RateLimited)
            if run.rate_limit.as_ref().is_some_and(|r| {
                r.status.as_deref() == Some("rejected") && r.resets_at.is_some()
            }) =>
        {
            FailureClass::Quota(QuotaKind::UsageLimit)
        }
        other => other,
    };
    Failure { class, message }
}

/// The result's error `subtype` (see the module docs for why these are permanent).
pub fn classify_subtype(subtype: &str) -> Option<FailureClass> {
    Some(FailureClass::Permanent(match subtype {
        "error_max_turns" => PermanentKind::MaxTurns,
        "error_max_budget_usd" => PermanentKind::BudgetExceeded,
        "error_during_execution" => PermanentKind::ExecutionError,
        _ => return None,
    }))
}

/// The synthetic assistant message's `error` code.
pub fn classify_code(code: &str) -> Option<FailureClass> {
    use FailureClass::{Permanent, Transient};
    Some(match code {
        "authentication_failed" | "oauth_org_not_allowed" => {
            Permanent(PermanentKind::Authentication)
        }
        "billing_error" => Permanent(PermanentKind::Billing),
        "model_not_found" => Permanent(PermanentKind::UnknownModel),
        "invalid_request" => Permanent(PermanentKind::InvalidRequest),
        "rate_limit" => Transient(TransientKind::RateLimited),
        "overloaded" => Transient(TransientKind::Overloaded),
        "server_error" => Transient(TransientKind::ServerError),
        _ => return None,
    })
}

/// The result's `api_error_status`.
pub fn classify_status(status: u16) -> Option<FailureClass> {
    use FailureClass::{Permanent, Transient};
    Some(match status {
        401 | 403 => Permanent(PermanentKind::Authentication),
        402 => Permanent(PermanentKind::Billing),
        404 => Permanent(PermanentKind::UnknownModel),
        429 => Transient(TransientKind::RateLimited),
        529 => Transient(TransientKind::Overloaded),
        408 | 500..=599 => Transient(TransientKind::ServerError),
        400..=499 => Permanent(PermanentKind::InvalidRequest),
        _ => return None,
    })
}

/// Known CLI and API texts, matched case-insensitively. Order matters: the first match wins,
/// and the more specific texts come first.
const TEXT_PATTERNS: &[(&str, FailureClass)] = {
    use FailureClass::{Permanent, Transient};
    use PermanentKind as P;
    use TransientKind as T;
    &[
        // Refusals to start.
        (
            "cannot be launched inside another claude code session",
            Permanent(P::NestedSession),
        ),
        (
            "unset the claudecode environment variable",
            Permanent(P::NestedSession),
        ),
        (
            "no conversation found with session id",
            Permanent(P::UnknownSession),
        ),
        ("error: unknown option", Permanent(P::InvalidFlags)),
        ("error: option '", Permanent(P::InvalidFlags)),
        (
            "error: missing required argument",
            Permanent(P::InvalidFlags),
        ),
        ("error: too many arguments", Permanent(P::InvalidFlags)),
        ("requires --verbose", Permanent(P::InvalidFlags)),
        (
            "input must be provided either through stdin",
            Permanent(P::InvalidFlags),
        ),
        ("invalid session id", Permanent(P::InvalidFlags)),
        // Credentials.
        ("invalid api key", Permanent(P::Authentication)),
        ("not logged in", Permanent(P::Authentication)),
        ("please run /login", Permanent(P::Authentication)),
        ("authentication_failed", Permanent(P::Authentication)),
        ("authentication_error", Permanent(P::Authentication)),
        ("oauth token has expired", Permanent(P::Authentication)),
        ("api error: 401", Permanent(P::Authentication)),
        ("api error: 403", Permanent(P::Authentication)),
        // Money.
        ("credit balance is too low", Permanent(P::Billing)),
        ("billing_error", Permanent(P::Billing)),
        ("api error: 402", Permanent(P::Billing)),
        // Model.
        ("issue with the selected model", Permanent(P::UnknownModel)),
        ("model_not_found", Permanent(P::UnknownModel)),
        ("api error: 404", Permanent(P::UnknownModel)),
        // Caps (text mode prints these instead of a subtype).
        ("reached max turns", Permanent(P::MaxTurns)),
        ("reached maximum number of turns", Permanent(P::MaxTurns)),
        // Transient API conditions.
        ("overloaded", Transient(T::Overloaded)),
        ("api error: 529", Transient(T::Overloaded)),
        // Subscription limits: parked until they reset, not failed.
        (
            "hit your session limit",
            FailureClass::Quota(QuotaKind::SessionLimit),
        ),
        (
            "session limit",
            FailureClass::Quota(QuotaKind::SessionLimit),
        ),
        (
            "monthly usage limit",
            FailureClass::Quota(QuotaKind::MonthlyCredit),
        ),
        (
            "monthly limit",
            FailureClass::Quota(QuotaKind::MonthlyCredit),
        ),
        (
            "monthly credit",
            FailureClass::Quota(QuotaKind::MonthlyCredit),
        ),
        (
            "usage limit reached",
            FailureClass::Quota(QuotaKind::UsageLimit),
        ),
        ("weekly limit", FailureClass::Quota(QuotaKind::UsageLimit)),
        ("hit your limit", FailureClass::Quota(QuotaKind::UsageLimit)),
        ("api error: 429", Transient(T::RateLimited)),
        ("rate_limit", Transient(T::RateLimited)),
        ("rate limit", Transient(T::RateLimited)),
        // Network.
        ("unable to connect to api", Transient(T::Network)),
        ("connection error", Transient(T::Network)),
        ("fetch failed", Transient(T::Network)),
        ("econnrefused", Transient(T::Network)),
        ("econnreset", Transient(T::Network)),
        ("enotfound", Transient(T::Network)),
        ("etimedout", Transient(T::Network)),
        ("eai_again", Transient(T::Network)),
        ("socket hang up", Transient(T::Network)),
        ("request timed out", Transient(T::Network)),
        ("api error: 500", Transient(T::ServerError)),
        ("api error: 502", Transient(T::ServerError)),
        ("api error: 503", Transient(T::ServerError)),
        ("internal server error", Transient(T::ServerError)),
    ]
};

/// Classify a piece of CLI text (a result message, stderr, a stray stdout line).
/// `None` when the text is not a known failure (e.g. a warning).
pub fn classify_text(text: &str) -> Option<FailureClass> {
    let lower = text.to_lowercase();
    TEXT_PATTERNS
        .iter()
        .find(|(pattern, _)| lower.contains(pattern))
        .map(|(_, class)| *class)
}

/// When a subscription limit resets (epoch ms), from what the CLI said: the rejected
/// `rate_limit_event`'s `resetsAt`, the legacy `usage limit reached|<unix time>` text, or
/// "resets 2pm" / "resets 14:30" (UTC, or no zone, taken as UTC). `None` when it did not say
/// (a zone KSI cannot resolve included): the caller waits its fallback time and tries again.
pub fn quota_resets_at(run: &ParsedRun, message: &str, now_ms: i64) -> Option<i64> {
    let to_ms = |t: i64| if t > 100_000_000_000 { t } else { t * 1000 };
    if let Some(t) = run
        .rate_limit
        .as_ref()
        .filter(|r| r.status.as_deref() == Some("rejected"))
        .and_then(|r| r.resets_at)
        .map(to_ms)
        .filter(|t| *t > now_ms)
    {
        return Some(t);
    }
    let lower = message.to_lowercase();
    if let Some(i) = lower.find("limit reached|") {
        let digits: String = lower[i + "limit reached|".len()..]
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        if let Ok(t) = digits.parse::<i64>() {
            return Some(to_ms(t));
        }
    }
    let i = lower.find("resets ")?;
    let rest = &lower[i + "resets ".len()..];
    let zone = rest
        .split_once('(')
        .map(|(_, z)| z.trim_end_matches(')').trim());
    if zone.is_some_and(|z| !matches!(z.split(')').next(), Some("utc" | "gmt" | "etc/utc"))) {
        return None;
    }
    let clock: String = rest
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == ':')
        .collect();
    let (hm, pm) = match clock.strip_suffix("pm") {
        Some(hm) => (hm, Some(true)),
        None => match clock.strip_suffix("am") {
            Some(hm) => (hm, Some(false)),
            None => (clock.as_str(), None),
        },
    };
    let (h, m) = match hm.split_once(':') {
        Some((h, m)) => (h.parse::<i64>().ok()?, m.parse::<i64>().ok()?),
        None => (hm.parse::<i64>().ok()?, 0),
    };
    let h = match pm {
        Some(true) if h < 12 => h + 12,
        Some(false) if h == 12 => 0,
        _ => h,
    };
    if !(0..24).contains(&h) || !(0..60).contains(&m) {
        return None;
    }
    let day = 86_400_000;
    let midnight = now_ms - now_ms.rem_euclid(day);
    let mut at = midnight + (h * 3600 + m * 60) * 1000;
    if at <= now_ms {
        at += day;
    }
    Some(at)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stdout: &str) -> ParsedRun {
        ParsedRun::from_stdout(stdout)
    }

    fn class_of(run: &ParsedRun, stderr: &str, termination: Termination) -> Option<FailureClass> {
        classify(Evidence {
            run,
            stderr,
            termination,
        })
        .map(|f| f.class)
    }

    const OK: &str = r#"{"type":"result","subtype":"success","is_error":false,"result":"hi"}"#;

    #[test]
    fn a_successful_result_wins_over_a_later_kill() {
        let r = run(OK);
        assert_eq!(class_of(&r, "", Termination::LingeredAfterResult), None);
        assert_eq!(class_of(&r, "", Termination::Signaled(9)), None);
    }

    #[test]
    fn timeouts_without_a_result_are_transient() {
        let r = run("");
        assert_eq!(
            class_of(&r, "", Termination::NoOutputTimeout),
            Some(FailureClass::Transient(TransientKind::NoOutputTimeout))
        );
        assert_eq!(
            class_of(&r, "", Termination::OverallTimeout),
            Some(FailureClass::Transient(TransientKind::OverallTimeout))
        );
    }

    #[test]
    fn a_signal_or_non_zero_exit_without_a_result_is_a_crash() {
        let r = run(r#"{"type":"system","subtype":"init","session_id":"s"}"#);
        assert_eq!(
            class_of(&r, "", Termination::Signaled(6)),
            Some(FailureClass::Transient(TransientKind::Crash))
        );
        assert_eq!(
            class_of(&r, "segfault", Termination::Exited(139)),
            Some(FailureClass::Transient(TransientKind::Crash))
        );
        assert_eq!(
            class_of(&r, "", Termination::Exited(0)),
            Some(FailureClass::Transient(TransientKind::NoResult))
        );
    }

    #[test]
    fn cancellation_is_never_retried() {
        let class = class_of(&run(""), "", Termination::Cancelled).unwrap();
        assert_eq!(class, FailureClass::Permanent(PermanentKind::Cancelled));
        assert!(!is_retryable(&class));
    }

    #[test]
    fn an_unrecognised_error_result_is_permanent() {
        let r = run(
            r#"{"type":"result","subtype":"success","is_error":true,"result":"Something odd"}"#,
        );
        let failure = classify(Evidence {
            run: &r,
            stderr: "",
            termination: Termination::Exited(1),
        })
        .unwrap();
        assert_eq!(
            failure.class,
            FailureClass::Permanent(PermanentKind::Unrecognized)
        );
        assert_eq!(failure.message, "Something odd");
    }

    #[test]
    fn network_error_texts_are_transient() {
        for text in [
            "API Error: Connection error.",
            "TypeError: fetch failed",
            "connect ECONNREFUSED 127.0.0.1:443",
            "getaddrinfo ENOTFOUND api.anthropic.com",
            "API Error: Unable to connect to API (ConnectionRefused)",
        ] {
            assert_eq!(
                classify_text(text),
                Some(FailureClass::Transient(TransientKind::Network)),
                "{text}"
            );
        }
    }

    #[test]
    fn class_names_are_stable() {
        assert_eq!(
            FailureClass::Permanent(PermanentKind::Authentication).to_string(),
            "permanent.authentication"
        );
        assert_eq!(
            FailureClass::Transient(TransientKind::RateLimited).as_str(),
            "transient.rate_limited"
        );
    }

    #[test]
    fn subscription_limit_texts_are_quota_with_their_reset_time() {
        let run = ParsedRun::default();
        let now = 1_749_900_000_000;
        let legacy = "Claude AI usage limit reached|1749924000";
        assert_eq!(
            classify_text(legacy),
            Some(FailureClass::Quota(QuotaKind::UsageLimit))
        );
        assert_eq!(quota_resets_at(&run, legacy, now), Some(1_749_924_000_000));
        let session = "You've hit your session limit · resets 2pm (UTC)";
        assert_eq!(
            classify_text(session),
            Some(FailureClass::Quota(QuotaKind::SessionLimit))
        );
        // 1_749_900_000_000 is 11:20 UTC: the next 14:00 UTC is the same day.
        let day = 86_400_000;
        let midnight = now - now % day;
        assert_eq!(
            quota_resets_at(&run, session, now),
            Some(midnight + 14 * 3_600_000)
        );
        assert_eq!(
            quota_resets_at(&run, "You've hit your session limit · resets 9:30am", now),
            Some(midnight + day + 9 * 3_600_000 + 30 * 60_000),
            "a time already past today is tomorrow's"
        );
        // A zone KSI cannot resolve: no guess (the fallback wait applies).
        assert_eq!(
            quota_resets_at(
                &run,
                "You've hit your session limit · resets 2pm (Europe/Helsinki)",
                now
            ),
            None
        );
        assert_eq!(
            classify_text("You've used your monthly usage limit for claude -p"),
            Some(FailureClass::Quota(QuotaKind::MonthlyCredit))
        );
        assert!(is_retryable(&FailureClass::Quota(QuotaKind::SessionLimit)));
        // A plain API rate limit stays a short transient retry.
        assert_eq!(
            classify_text("API Error: 429 rate_limit_error"),
            Some(FailureClass::Transient(TransientKind::RateLimited))
        );
    }

    #[test]
    fn a_rejected_rate_limit_event_with_a_reset_makes_a_429_a_quota() {
        let now = 1_790_000_000_000;
        let stdout = r#"{"type":"rate_limit_event","rate_limit_info":{"status":"rejected","resetsAt":1790161200,"rateLimitType":"five_hour"}}
{"type":"result","subtype":"success","is_error":true,"api_error_status":429,"result":"API Error: 429"}"#;
        let run = ParsedRun::from_stdout(stdout);
        let f = classify(Evidence {
            run: &run,
            stderr: "",
            termination: Termination::Exited(1),
        })
        .unwrap();
        assert_eq!(f.class, FailureClass::Quota(QuotaKind::UsageLimit));
        assert_eq!(
            quota_resets_at(&run, &f.message, now),
            Some(1_790_161_200_000)
        );
    }
}
