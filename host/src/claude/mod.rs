//! The Claude CLI executor: runs the real `claude` command headless and makes sense of it.
//!
//! One call flows through the files of this module in order: [`command`] builds the command line
//! and clean environment, [`supervise`] spawns the process in its own group and watches it
//! (timeouts, cancellation, kill, reap) at a lower CPU priority ([`spawner`]), [`stream`] parses its stream-json stdout line by line,
//! [`classify`] turns a failed attempt into a transient or permanent [`FailureClass`] with the
//! CLI's own message, and [`retry`] decides whether and when to try again. [`orphan`] cleans up
//! after a daemon that died.
//!
//! On top of these, [`executor`] is the service the daemon and the workflow engine call: it
//! records every call in the `processes` table, files the responses ([`responses`]), keeps
//! agents' sessions and inboxes ([`agents`]) and enforces spend control ([`spend`]).
//!
//! `fake-claude` (`src/bin/fake-claude.rs`) speaks the same flags and line shapes, with injectable
//! faults, for tests and offline demos.

#![warn(missing_docs)]

pub mod accounting;
pub mod agents;
pub mod classify;
pub mod command;
pub mod executor;
pub mod guardian;
pub mod import;
pub mod orphan;
pub mod responses;
pub mod retry;
pub mod spawner;
pub mod spend;
pub mod stream;
pub mod supervise;

#[cfg(test)]
mod fixture_tests;

pub use classify::{
    Failure, FailureClass, PermanentKind, QuotaKind, Termination, TransientKind, is_retryable,
};
pub use command::{ClaudeInvocation, SessionMode, default_binary};
pub use executor::{Executor, ExecutorConfig, ProcessRow, ReconcileReport};
pub use orphan::{OrphanCheck, kill_orphaned_group};
pub use retry::{RetriedRun, RetryPolicy, run_with_retries};
pub use stream::{Outcome, ParsedRun, ResultSummary, StreamEvent, StreamParser, TokenUsage};
pub use supervise::{AttemptOutcome, CancelToken, Limits, Progress, SpawnError, run_attempt};
