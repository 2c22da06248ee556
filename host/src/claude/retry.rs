//! Retrying transient failures: exponential backoff with full jitter, and a loop that applies it.
//!
//! Full jitter (a uniform delay between zero and the exponential ceiling) spreads out callers
//! that failed together, e.g. every agent of a workflow hitting the same 529.

use std::time::Duration;

use rand::Rng;

use super::classify::{FailureClass, is_retryable};
use super::command::ClaudeInvocation;
use super::supervise::{AttemptOutcome, CancelToken, Limits, Progress, SpawnError, run_attempt};

/// How often and how patiently to retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Total attempts, the first included (1 = never retry).
    pub max_attempts: u32,
    /// Ceiling of the first delay; it doubles with every further attempt.
    pub base_delay: Duration,
    /// The ceiling never grows past this.
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 3,
            base_delay: Duration::from_secs(2),
            max_delay: Duration::from_secs(120),
        }
    }
}

impl RetryPolicy {
    /// The largest delay after failed attempt number `attempt` (1-based):
    /// `min(max_delay, base_delay * 2^(attempt-1))`.
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let factor = 2u32.saturating_pow(attempt.saturating_sub(1).min(31));
        self.base_delay.saturating_mul(factor).min(self.max_delay)
    }

    /// A delay drawn uniformly from `[0, ceiling(attempt)]` (full jitter).
    pub fn jittered_delay(&self, attempt: u32, rng: &mut impl Rng) -> Duration {
        let ceiling = self.ceiling(attempt).as_millis() as u64;
        Duration::from_millis(rng.random_range(0..=ceiling))
    }

    /// What to do after attempt number `attempt` failed with `class`: `Some(delay)` to try again,
    /// `None` to give up (a permanent failure, or no attempts left).
    pub fn next_delay(&self, attempt: u32, class: &FailureClass) -> Option<Duration> {
        (is_retryable(class) && attempt < self.max_attempts)
            .then(|| self.jittered_delay(attempt, &mut rand::rng()))
    }
}

/// All attempts of one call.
#[derive(Debug)]
pub struct RetriedRun {
    /// Every attempt made, in order; the last one decides.
    pub attempts: Vec<AttemptOutcome>,
    /// Set when the last try could not even start the CLI.
    pub spawn_error: Option<SpawnError>,
}

impl RetriedRun {
    /// The last attempt, if any started.
    pub fn last(&self) -> Option<&AttemptOutcome> {
        self.attempts.last()
    }

    /// Whether the call finally succeeded.
    pub fn succeeded(&self) -> bool {
        self.spawn_error.is_none() && self.last().is_some_and(AttemptOutcome::succeeded)
    }
}

/// Run `inv` until it succeeds, fails permanently, runs out of attempts or is cancelled,
/// sleeping a jittered backoff between attempts. `on_progress` gets the 1-based attempt number.
///
/// The daemon, which records every attempt in the `processes` table, may prefer to drive
/// [`run_attempt`] and [`RetryPolicy::next_delay`] itself; this is the same loop without a store.
pub async fn run_with_retries(
    inv: &ClaudeInvocation,
    limits: &Limits,
    policy: &RetryPolicy,
    cancel: &CancelToken,
    mut on_progress: impl FnMut(u32, Progress<'_>) + Send,
) -> RetriedRun {
    let mut attempts = Vec::new();
    let mut attempt = 0;
    loop {
        attempt += 1;
        let outcome = match run_attempt(inv, limits, cancel, |p| on_progress(attempt, p)).await {
            Ok(outcome) => outcome,
            Err(e) => {
                let retry = policy.next_delay(attempt, &e.failure_class());
                if retry.is_none() || cancel.is_cancelled() {
                    return RetriedRun {
                        attempts,
                        spawn_error: Some(e),
                    };
                }
                tracing::warn!(attempt, error = %e, "retrying after a failed spawn");
                sleep_unless_cancelled(retry.unwrap_or_default(), cancel).await;
                continue;
            }
        };
        let delay = outcome
            .failure_class()
            .and_then(|class| policy.next_delay(attempt, &class));
        attempts.push(outcome);
        match delay {
            Some(delay) if !cancel.is_cancelled() => {
                tracing::info!(
                    attempt,
                    delay_ms = delay.as_millis() as u64,
                    "retrying the Claude CLI after a transient failure"
                );
                if !sleep_unless_cancelled(delay, cancel).await {
                    break;
                }
            }
            _ => break,
        }
    }
    RetriedRun {
        attempts,
        spawn_error: None,
    }
}

/// Sleep `delay`; `false` if cancelled first.
async fn sleep_unless_cancelled(delay: Duration, cancel: &CancelToken) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(delay) => true,
        _ = cancel.cancelled() => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::claude::classify::{PermanentKind, TransientKind};

    fn policy() -> RetryPolicy {
        RetryPolicy {
            max_attempts: 4,
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_millis(500),
        }
    }

    #[test]
    fn the_backoff_ceiling_doubles_up_to_the_maximum() {
        let p = policy();
        let ceilings: Vec<u128> = (1..=6).map(|a| p.ceiling(a).as_millis()).collect();
        assert_eq!(ceilings, [100, 200, 400, 500, 500, 500]);
        assert_eq!(p.ceiling(1000), Duration::from_millis(500), "no overflow");
    }

    #[test]
    fn full_jitter_stays_within_zero_and_the_ceiling_and_varies() {
        let p = policy();
        let mut rng = rand::rng();
        let delays: Vec<Duration> = (0..200).map(|_| p.jittered_delay(3, &mut rng)).collect();
        assert!(delays.iter().all(|d| *d <= Duration::from_millis(400)));
        assert!(delays.iter().any(|d| *d != delays[0]), "jittered");
    }

    #[test]
    fn transient_failures_retry_until_the_attempts_run_out() {
        let p = policy();
        let overloaded = FailureClass::Transient(TransientKind::Overloaded);
        assert!(p.next_delay(1, &overloaded).is_some());
        assert!(p.next_delay(3, &overloaded).is_some());
        assert!(p.next_delay(4, &overloaded).is_none());
    }

    #[test]
    fn permanent_failures_never_retry() {
        let auth = FailureClass::Permanent(PermanentKind::Authentication);
        assert!(!is_retryable(&auth));
        assert!(policy().next_delay(1, &auth).is_none());
    }
}
