//! Spend control: what stands between a runaway agent loop and the bill.
//!
//! KSI's original once spawned 68 Claude sessions in 9 minutes from one loop. Every attempt the
//! [`Executor`](super::executor::Executor) makes therefore passes, in order: the repeated-prompt
//! detector (first attempt only), the budgets (global, per agent, per workflow; USD, tokens and
//! calls), the spawn-rate token bucket and the concurrency gates (global and per model). The
//! limits are read from the `config` table for every attempt, so `ksi-host config set
//! claude.budget.global_usd 5` takes effect on the next call.
//!
//! Budget arithmetic: settled spend is summed from the `processes` table; calls that were
//! admitted but have not settled yet hold an in-memory reservation (one call until their RUNNING
//! row commits, an estimated cost until their attempt is recorded), so concurrent admissions
//! cannot all squeeze under the same remaining budget. Admission is serialised by one mutex.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rusqlite::{Connection, params};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::Notify;

use crate::store::now_ms;

/// A limit in each currency; `None` means unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Budget {
    /// US dollars, from the CLI's `total_cost_usd`.
    pub usd: Option<f64>,
    /// Input + output tokens (cache reads and writes not counted).
    pub tokens: Option<u64>,
    /// CLI invocations (every attempt counts: a retry is paid too).
    pub calls: Option<u64>,
}

impl Budget {
    fn is_unlimited(&self) -> bool {
        self.usd.is_none() && self.tokens.is_none() && self.calls.is_none()
    }
}

/// Budgets by scope.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Budgets {
    /// Everything this data dir spends.
    pub global: Budget,
    /// Each agent (an agent profile's `budget_*` overrides it for that agent).
    pub per_agent: Budget,
    /// Each workflow instance.
    pub per_workflow: Budget,
    /// Only spend newer than this counts (`None`: all time).
    pub window: Option<Duration>,
    /// Cost assumed for a call in flight until it reports its real cost.
    pub reserve_usd: f64,
}

/// All spend limits in force for one attempt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SpendLimits {
    /// Claude processes running at once, all models.
    pub max_concurrency: usize,
    /// Claude processes running at once per model (model name or alias as requested).
    pub model_concurrency: BTreeMap<String, usize>,
    /// Spawns per minute (a token bucket with this capacity; 0 = unlimited).
    pub spawn_rate_per_min: f64,
    /// Budgets.
    pub budgets: Budgets,
    /// The same prompt from the same agent/workflow this many times within `loop_window`
    /// is refused (0 = detector off).
    pub loop_max_repeats: u32,
    /// See `loop_max_repeats`.
    pub loop_window: Duration,
}

impl Default for SpendLimits {
    fn default() -> Self {
        SpendLimits {
            max_concurrency: 4,
            model_concurrency: BTreeMap::new(),
            spawn_rate_per_min: 60.0,
            budgets: Budgets {
                reserve_usd: 0.05,
                ..Budgets::default()
            },
            loop_max_repeats: 5,
            loop_window: Duration::from_secs(600),
        }
    }
}

impl SpendLimits {
    /// Whether admitting a call of `payer` reads the ledger (some budget of it is limited).
    pub fn needs_ledger(&self, payer: &Payer) -> bool {
        let b = &self.budgets;
        !b.global.is_unlimited()
            || (payer.agent.is_some() && !payer.agent_budget.unwrap_or(b.per_agent).is_unlimited())
            || (payer.workflow.is_some() && !b.per_workflow.is_unlimited())
    }

    /// Applies the dynamic settings (`claude.*` keys of the `config` table) over these limits.
    /// Unknown keys and values of the wrong type are ignored (with a warning).
    pub fn apply_settings(&mut self, settings: &BTreeMap<String, Value>) {
        for (key, value) in settings {
            let num = value.as_f64();
            let opt_f = || num.filter(|v| *v >= 0.0);
            let opt_u = || num.filter(|v| *v >= 0.0).map(|v| v as u64);
            let known = match key.as_str() {
                "claude.max_concurrency" => opt_u().map(|v| self.max_concurrency = v as usize),
                "claude.spawn_rate_per_min" => opt_f().map(|v| self.spawn_rate_per_min = v),
                "claude.loop.max_repeats" => opt_u().map(|v| self.loop_max_repeats = v as u32),
                "claude.loop.window_secs" => {
                    opt_u().map(|v| self.loop_window = Duration::from_secs(v))
                }
                "claude.budget.window_secs" => opt_u().map(|v| {
                    self.budgets.window = (v > 0).then(|| Duration::from_secs(v));
                }),
                "claude.budget.reserve_usd" => opt_f().map(|v| self.budgets.reserve_usd = v),
                "claude.model_concurrency" => value.as_object().map(|m| {
                    self.model_concurrency = m
                        .iter()
                        .filter_map(|(k, v)| Some((k.clone(), v.as_u64()? as usize)))
                        .collect();
                }),
                _ => {
                    if let Some(rest) = key.strip_prefix("claude.budget.") {
                        set_budget(&mut self.budgets, rest, value)
                    } else {
                        // Other claude.* keys belong to the executor (timeouts, retries, model).
                        Some(())
                    }
                }
            };
            if known.is_none() {
                tracing::warn!(%key, %value, "ignoring a spend setting with a value of the wrong type or an unknown name");
            }
        }
    }
}

/// `global_usd`, `agent_calls`, `workflow_tokens`, ...; `null` removes the limit.
fn set_budget(b: &mut Budgets, key: &str, value: &Value) -> Option<()> {
    let (scope, unit) = key.split_once('_')?;
    let budget = match scope {
        "global" => &mut b.global,
        "agent" => &mut b.per_agent,
        "workflow" => &mut b.per_workflow,
        _ => return None,
    };
    let num = if value.is_null() {
        None
    } else {
        Some(value.as_f64().filter(|v| *v >= 0.0)?)
    };
    match unit {
        "usd" => budget.usd = num,
        "tokens" => budget.tokens = num.map(|v| v as u64),
        "calls" => budget.calls = num.map(|v| v as u64),
        _ => return None,
    }
    Some(())
}

/// Why an attempt was refused before it was spawned. Both are permanent: retrying the same call
/// would be refused again.
#[derive(Debug, Clone, PartialEq)]
pub enum Refusal {
    /// A budget is used up (`class` = `budget`).
    Budget {
        /// `global`, `agent <id>` or `workflow <id>`.
        scope: String,
        /// `usd`, `tokens` or `calls`.
        unit: &'static str,
        /// Spent (settled + in flight).
        spent: f64,
        /// The limit.
        limit: f64,
    },
    /// The same prompt came too often (`class` = `loop_detected`).
    Loop {
        /// How many identical prompts were already sent in the window.
        repeats: u64,
        /// The window.
        window: Duration,
        /// `agent <id>`, `workflow <id>` or `global`.
        scope: String,
    },
}

impl Refusal {
    /// The `processes.error_class` value.
    pub fn class(&self) -> &'static str {
        match self {
            Refusal::Budget { .. } => "budget",
            Refusal::Loop { .. } => "loop_detected",
        }
    }

    /// A sentence saying what happened and what to do.
    pub fn message(&self) -> String {
        match self {
            Refusal::Budget {
                scope,
                unit,
                spent,
                limit,
            } => {
                let key = match scope.split_whitespace().next() {
                    Some("agent") => "agent",
                    Some("workflow") => "workflow",
                    _ => "global",
                };
                format!(
                    "the {scope} budget is exhausted: {spent} of {limit} {unit} spent; no new Claude call was made. \
                     Raise it with `ksi-host config set claude.budget.{key}_{unit} <limit>` or wait for the budget window to pass"
                )
            }
            Refusal::Loop {
                repeats,
                window,
                scope,
            } => format!(
                "refused a repeated prompt: the same prompt was already sent {repeats} times by {scope} in the last {}s, \
                 which looks like a runaway loop; no Claude call was made. Change the prompt, or raise claude.loop.max_repeats",
                window.as_secs()
            ),
        }
    }
}

/// Who pays for a call.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Payer {
    /// The agent, if any.
    pub agent: Option<String>,
    /// The workflow instance, if any.
    pub workflow: Option<String>,
    /// Budget of this agent from its profile, overriding `per_agent`.
    pub agent_budget: Option<Budget>,
}

#[derive(Debug, Clone)]
struct Reservation {
    payer: Payer,
    /// Counts as one call until the RUNNING row (attempts + 1) is committed.
    call: bool,
    usd: f64,
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

#[derive(Debug, Default)]
struct Running {
    total: usize,
    by_model: HashMap<String, usize>,
}

/// The shared admission state of an executor: reservations, the rate bucket, the gates.
#[derive(Debug, Clone)]
pub struct Admission {
    inner: Arc<AdmissionInner>,
}

#[derive(Debug)]
struct AdmissionInner {
    reservations: Mutex<HashMap<u64, Reservation>>,
    next_id: Mutex<u64>,
    bucket: Mutex<Option<Bucket>>,
    /// Spawns of the last minute before this daemon started: the bucket starts that much lower.
    recent_spawns: Mutex<u64>,
    running: Mutex<Running>,
    freed: Notify,
}

impl Default for Admission {
    fn default() -> Self {
        Admission {
            inner: Arc::new(AdmissionInner {
                reservations: Mutex::default(),
                next_id: Mutex::new(1),
                bucket: Mutex::new(None),
                recent_spawns: Mutex::new(0),
                running: Mutex::default(),
                freed: Notify::new(),
            }),
        }
    }
}

/// An admitted attempt's hold on the budget. Dropping it releases what is left.
#[derive(Debug)]
pub struct Ticket {
    admission: Admission,
    id: u64,
}

impl Ticket {
    /// The RUNNING row (which counts the call) is committed: stop counting it here.
    pub fn call_recorded(&self) {
        if let Some(r) = self
            .admission
            .inner
            .reservations
            .lock()
            .unwrap()
            .get_mut(&self.id)
        {
            r.call = false;
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.admission
            .inner
            .reservations
            .lock()
            .unwrap()
            .remove(&self.id);
    }
}

/// A running slot; dropping it frees the slot and wakes a waiter.
#[derive(Debug)]
pub struct Slot {
    admission: Admission,
    model: String,
}

impl Drop for Slot {
    fn drop(&mut self) {
        {
            let mut r = self.admission.inner.running.lock().unwrap();
            r.total = r.total.saturating_sub(1);
            if let Some(n) = r.by_model.get_mut(&self.model) {
                *n = n.saturating_sub(1);
            }
        }
        self.admission.inner.freed.notify_waiters();
    }
}

/// Settled spend of one scope, from the `processes` table. Simulated money (`fake-claude`'s)
/// is not spend: it never counts against a budget in USD or tokens.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Spent {
    /// US dollars.
    pub usd: f64,
    /// Input + output tokens.
    pub tokens: u64,
    /// CLI invocations.
    pub calls: u64,
}

/// Settled spend: `scope` is `None` (global), or a column (`agent_id`/`workflow_id`) and its value.
///
/// # Errors
/// A database error.
pub fn spent(
    conn: &Connection,
    scope: Option<(&str, &str)>,
    since_ms: i64,
) -> rusqlite::Result<Spent> {
    let sql = |filter: &str| {
        format!(
            "SELECT COALESCE(SUM(CASE WHEN simulated = 1 THEN 0 ELSE cost_usd END), 0),
                    COALESCE(SUM(CASE WHEN simulated = 1 THEN 0 ELSE COALESCE(tokens_in,0) + COALESCE(tokens_out,0) END), 0),
                    COALESCE(SUM(attempts), 0)
             FROM processes WHERE created_at >= ?1 {filter}"
        )
    };
    let map = |r: &rusqlite::Row<'_>| {
        Ok(Spent {
            usd: r.get(0)?,
            tokens: r.get::<_, i64>(1)? as u64,
            calls: r.get::<_, i64>(2)? as u64,
        })
    };
    match scope {
        None => conn.query_row(&sql(""), params![since_ms], map),
        Some(("agent_id", v)) => {
            conn.query_row(&sql("AND agent_id = ?2"), params![since_ms, v], map)
        }
        Some((_, v)) => conn.query_row(&sql("AND workflow_id = ?2"), params![since_ms, v], map),
    }
}

impl Admission {
    /// Checks the repeated-prompt detector for the row `rowid` (already inserted, with its prompt
    /// hash). Rows refused by admission do not count.
    ///
    /// # Errors
    /// A database error.
    pub fn check_loop(
        &self,
        conn: &Connection,
        limits: &SpendLimits,
        payer: &Payer,
        prompt_sha256: &str,
        rowid: i64,
    ) -> rusqlite::Result<Option<Refusal>> {
        if limits.loop_max_repeats == 0 {
            return Ok(None);
        }
        let since = now_ms() - limits.loop_window.as_millis() as i64;
        // A loop is made of calls that answered (or are answering). Calls that failed or were
        // cut off by a crash of the daemon do not count: re-running them after a restart is
        // recovery, not a runaway agent.
        let repeats: i64 = conn
            .prepare_cached(
                "SELECT COUNT(*) FROM processes
             WHERE prompt_sha256 = ?1 AND created_at >= ?2 AND rowid < ?3
               AND agent_id IS ?4 AND workflow_id IS ?5
               AND status IN ('PENDING', 'RUNNING', 'SUCCESS', 'COMPLETED', 'RETRY')",
            )?
            .query_row(
                params![prompt_sha256, since, rowid, payer.agent, payer.workflow],
                |r| r.get(0),
            )?;
        if repeats as u64 >= limits.loop_max_repeats as u64 {
            let scope = match (&payer.agent, &payer.workflow) {
                (Some(a), _) => format!("agent {a}"),
                (None, Some(w)) => format!("workflow {w}"),
                _ => "calls without agent or workflow".to_string(),
            };
            return Ok(Some(Refusal::Loop {
                repeats: repeats as u64,
                window: limits.loop_window,
                scope,
            }));
        }
        Ok(None)
    }

    /// Checks every budget of `payer` and, when all have room, reserves one call and the
    /// estimated cost. Serialised: two admissions never see the same remaining budget.
    ///
    /// # Errors
    /// A database error.
    pub fn reserve(
        &self,
        conn: &Connection,
        limits: &SpendLimits,
        payer: &Payer,
    ) -> rusqlite::Result<Result<Ticket, Refusal>> {
        self.reserve_in(Some(conn), limits, payer)
    }

    /// [`Admission::reserve`] for a payer none of whose budgets is limited
    /// ([`SpendLimits::needs_ledger`] is false): nothing to read, so no connection.
    pub fn reserve_unmetered(&self, limits: &SpendLimits, payer: &Payer) -> Ticket {
        match self.reserve_in(None, limits, payer) {
            Ok(Ok(ticket)) => ticket,
            _ => unreachable!("a payer without a limited budget is never refused"),
        }
    }

    fn reserve_in(
        &self,
        conn: Option<&Connection>,
        limits: &SpendLimits,
        payer: &Payer,
    ) -> rusqlite::Result<Result<Ticket, Refusal>> {
        let since = limits
            .budgets
            .window
            .map_or(0, |w| now_ms() - w.as_millis() as i64);
        let mut reservations = self.inner.reservations.lock().unwrap();
        type Scope<'a> = (String, Budget, Option<(&'a str, &'a str)>);
        let mut scopes: Vec<Scope<'_>> = vec![("global".into(), limits.budgets.global, None)];
        if let Some(a) = &payer.agent {
            let b = payer.agent_budget.unwrap_or(limits.budgets.per_agent);
            scopes.push((format!("agent {a}"), b, Some(("agent_id", a.as_str()))));
        }
        if let Some(w) = &payer.workflow {
            scopes.push((
                format!("workflow {w}"),
                limits.budgets.per_workflow,
                Some(("workflow_id", w.as_str())),
            ));
        }
        for (name, budget, scope) in scopes {
            if budget.is_unlimited() {
                continue;
            }
            let Some(conn) = conn else {
                panic!("reserve_unmetered with a limited budget: check SpendLimits::needs_ledger");
            };
            let settled = spent(conn, scope, since)?;
            let (mut usd, mut calls) = (settled.usd, settled.calls);
            for r in reservations.values() {
                let mine = match scope {
                    None => true,
                    Some(("agent_id", v)) => r.payer.agent.as_deref() == Some(v),
                    Some((_, v)) => r.payer.workflow.as_deref() == Some(v),
                };
                if mine {
                    usd += r.usd;
                    calls += r.call as u64;
                }
            }
            let over = [
                ("usd", usd, budget.usd),
                (
                    "tokens",
                    settled.tokens as f64,
                    budget.tokens.map(|t| t as f64),
                ),
                ("calls", calls as f64, budget.calls.map(|c| c as f64)),
            ]
            .into_iter()
            .find(|(_, spent, limit)| limit.is_some_and(|l| *spent >= l));
            if let Some((unit, spent, limit)) = over {
                return Ok(Err(Refusal::Budget {
                    scope: name,
                    unit,
                    spent: (spent * 1e6).round() / 1e6,
                    limit: limit.unwrap_or_default(),
                }));
            }
        }
        let id = {
            let mut n = self.inner.next_id.lock().unwrap();
            *n += 1;
            *n
        };
        reservations.insert(
            id,
            Reservation {
                payer: payer.clone(),
                call: true,
                usd: limits.budgets.reserve_usd,
            },
        );
        Ok(Ok(Ticket {
            admission: self.clone(),
            id,
        }))
    }

    /// Spawns made in the last minute before this executor started (by a daemon that then
    /// stopped): the spawn-rate bucket starts with that many tokens fewer.
    pub fn seed_recent_spawns(&self, n: u64) {
        *self.inner.recent_spawns.lock().unwrap() = n;
        *self.inner.bucket.lock().unwrap() = None;
    }

    /// Waits for a token of the spawn-rate bucket (capacity and refill: `per_min` a minute).
    pub async fn rate_limit(&self, per_min: f64) {
        if per_min <= 0.0 {
            return;
        }
        loop {
            let wait = {
                let mut b = self.inner.bucket.lock().unwrap();
                let now = Instant::now();
                let recent = *self.inner.recent_spawns.lock().unwrap() as f64;
                let bucket = b.get_or_insert(Bucket {
                    tokens: (per_min - recent).max(0.0),
                    at: now,
                });
                let refill = now.duration_since(bucket.at).as_secs_f64() * per_min / 60.0;
                bucket.tokens = (bucket.tokens + refill).min(per_min.max(1.0));
                bucket.at = now;
                if bucket.tokens >= 1.0 {
                    bucket.tokens -= 1.0;
                    return;
                }
                Duration::from_secs_f64((1.0 - bucket.tokens) * 60.0 / per_min)
            };
            tracing::info!(
                wait_ms = wait.as_millis() as u64,
                "spawn rate limit reached; delaying the next Claude call"
            );
            tokio::time::sleep(wait).await;
        }
    }

    /// Waits until fewer than `max_concurrency` processes run in total and fewer than the
    /// model's limit run for `model`, then takes a slot.
    pub async fn slot(&self, limits: &SpendLimits, model: &str) -> Slot {
        loop {
            let freed = self.inner.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            {
                let mut r = self.inner.running.lock().unwrap();
                let per_model = limits.model_concurrency.get(model).copied();
                let model_running = r.by_model.get(model).copied().unwrap_or(0);
                if r.total < limits.max_concurrency.max(1)
                    && per_model.is_none_or(|m| model_running < m.max(1))
                {
                    r.total += 1;
                    *r.by_model.entry(model.to_string()).or_default() += 1;
                    return Slot {
                        admission: self.clone(),
                        model: model.to_string(),
                    };
                }
            }
            freed.await;
        }
    }

    /// Processes running now (all models).
    pub fn running(&self) -> usize {
        self.inner.running.lock().unwrap().total
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn settings_override_limits_and_null_removes_a_budget() {
        let mut l = SpendLimits::default();
        let mut s = BTreeMap::new();
        s.insert("claude.budget.global_usd".to_string(), json!(2.5));
        s.insert("claude.budget.agent_calls".to_string(), json!(3));
        s.insert("claude.max_concurrency".to_string(), json!(2));
        s.insert("claude.model_concurrency".to_string(), json!({"opus": 1}));
        l.apply_settings(&s);
        assert_eq!(l.budgets.global.usd, Some(2.5));
        assert_eq!(l.budgets.per_agent.calls, Some(3));
        assert_eq!(l.max_concurrency, 2);
        assert_eq!(l.model_concurrency.get("opus"), Some(&1));
        s.insert("claude.budget.global_usd".to_string(), Value::Null);
        l.apply_settings(&s);
        assert_eq!(l.budgets.global.usd, None);
    }

    #[tokio::test]
    async fn the_concurrency_gate_never_admits_more_than_the_limit() {
        let adm = Admission::default();
        let limits = SpendLimits {
            max_concurrency: 2,
            ..SpendLimits::default()
        };
        let a = adm.slot(&limits, "m").await;
        let _b = adm.slot(&limits, "m").await;
        let third = tokio::time::timeout(Duration::from_millis(50), adm.slot(&limits, "m")).await;
        assert!(third.is_err(), "a third slot waits");
        drop(a);
        let third = tokio::time::timeout(Duration::from_secs(1), adm.slot(&limits, "m")).await;
        assert!(third.is_ok(), "freeing a slot admits the waiter");
        assert_eq!(adm.running(), 2);
    }

    #[tokio::test]
    async fn a_model_limit_holds_back_only_that_model() {
        let adm = Admission::default();
        let mut limits = SpendLimits::default();
        limits.model_concurrency.insert("opus".into(), 1);
        let _o = adm.slot(&limits, "opus").await;
        let blocked = tokio::time::timeout(Duration::from_millis(50), adm.slot(&limits, "opus"));
        assert!(blocked.await.is_err(), "a second opus waits");
        let other = tokio::time::timeout(Duration::from_millis(50), adm.slot(&limits, "haiku"));
        assert!(other.await.is_ok(), "another model runs");
    }

    #[tokio::test]
    async fn the_spawn_rate_bucket_allows_a_burst_then_makes_the_next_wait() {
        let adm = Admission::default();
        for _ in 0..3 {
            tokio::time::timeout(Duration::from_millis(50), adm.rate_limit(3.0))
                .await
                .expect("within the burst");
        }
        let fourth = tokio::time::timeout(Duration::from_millis(100), adm.rate_limit(3.0));
        assert!(
            fourth.await.is_err(),
            "the fourth spawn in a minute waits ~20 s"
        );
        tokio::time::timeout(Duration::from_millis(50), adm.rate_limit(0.0))
            .await
            .expect("0 = unlimited");
    }
}
