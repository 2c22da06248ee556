//! Spend accounting of one Claude call: every attempt's cost and tokens are added to its row
//! exactly once, whichever path records them (the attempt's own end, start-up recovery after a
//! crash, a failure after paid work).
//!
//! Each row remembers the highest attempt already counted (`counted_attempt`); adding an
//! attempt at or below it changes nothing. So a result recorded twice — SUCCESS committed, the
//! daemon killed, recovery completing the row from the log — is paid, counted and budgeted
//! once, and everything computed from the row (the answer's totals, a step's and a workflow's
//! totals, `ksi cost`, the budget ledger) follows.

use std::collections::BTreeMap;

use rusqlite::{OptionalExtension, params};
use serde_json::{Value, json};

use super::stream::{ModelUsage, ResultSummary};
use crate::bus::BusError;
use crate::store::{ExecCached, Tx};

/// What one attempt reported about its spend, beyond its result line.
#[derive(Debug, Clone, Default)]
pub struct AttemptSpend {
    /// The model that answered, from the attempt's `init` line (the CLI resolves aliases).
    pub init_model: Option<String>,
    /// The CLI's version, from the `init` line (`claude_code_version`).
    pub version: Option<String>,
    /// Whether the attempt's output was labelled simulated (`fake-claude`).
    pub simulated: bool,
}

/// Adds attempt `attempt`'s spend (from its `result`) to process `id`, unless that attempt is
/// already counted. Also records the resolved model, the per-model split and whether the money
/// is simulated. Returns whether anything was added.
///
/// # Errors
/// A database error.
pub fn count_attempt(
    tx: &Tx<'_>,
    id: &str,
    attempt: u32,
    result: &ResultSummary,
    spend: &AttemptSpend,
) -> Result<bool, BusError> {
    let Some((counted, usage_json)) = tx
        .prepare_cached("SELECT counted_attempt, model_usage FROM processes WHERE id = ?1")?
        .query_row([id], |r| {
            Ok((r.get::<_, i64>(0)?, r.get::<_, Option<String>>(1)?))
        })
        .optional()?
    else {
        return Ok(false);
    };
    if counted >= attempt as i64 {
        return Ok(false);
    }
    let mut split: BTreeMap<String, Value> = usage_json
        .and_then(|s| serde_json::from_str(&s).ok())
        .unwrap_or_default();
    for (model, u) in &result.model_usage {
        merge_model(&mut split, model, u);
    }
    let resolved = spend
        .init_model
        .clone()
        .or_else(|| result.main_model().map(str::to_string));
    let simulated = spend.simulated || result.simulated;
    let r = result;
    tx.exec(
        "UPDATE processes SET counted_attempt = ?2,
            cost_usd = COALESCE(cost_usd, 0) + ?3, tokens_in = COALESCE(tokens_in, 0) + ?4,
            tokens_out = COALESCE(tokens_out, 0) + ?5,
            tokens_cache_read = COALESCE(tokens_cache_read, 0) + ?6,
            tokens_cache_write = COALESCE(tokens_cache_write, 0) + ?7,
            num_turns = COALESCE(?8, num_turns), duration_ms = COALESCE(?9, duration_ms),
            duration_api_ms = COALESCE(?10, duration_api_ms),
            resolved_model = COALESCE(?11, resolved_model), model_usage = ?12,
            simulated = CASE WHEN ?13 THEN 1 ELSE simulated END,
            cli_version = COALESCE(?14, cli_version)
         WHERE id = ?1",
        params![
            id,
            attempt,
            r.total_cost_usd.unwrap_or(0.0),
            r.usage.input as i64,
            r.usage.output as i64,
            r.usage.cache_read as i64,
            r.usage.cache_creation as i64,
            r.num_turns,
            r.duration_ms.map(|v| v as i64),
            r.duration_api_ms.map(|v| v as i64),
            resolved,
            (!split.is_empty()).then(|| Value::Object(split.into_iter().collect()).to_string()),
            simulated,
            spend.version.as_deref(),
        ],
    )?;
    Ok(true)
}

fn merge_model(split: &mut BTreeMap<String, Value>, model: &str, u: &ModelUsage) {
    let entry = split.entry(model.to_string()).or_insert_with(|| json!({}));
    let add = |entry: &mut Value, key: &str, v: f64| {
        let old = entry.get(key).and_then(Value::as_f64).unwrap_or(0.0);
        entry[key] = json!(old + v);
    };
    let add_int = |entry: &mut Value, key: &str, v: u64| {
        let old = entry.get(key).and_then(Value::as_u64).unwrap_or(0);
        entry[key] = json!(old + v);
    };
    add_int(entry, "input", u.tokens.input);
    add_int(entry, "output", u.tokens.output);
    add_int(entry, "cache_read", u.tokens.cache_read);
    add_int(entry, "cache_creation", u.tokens.cache_creation);
    add(entry, "cost_usd", u.cost_usd.unwrap_or(0.0));
}

impl AttemptSpend {
    /// What the parsed run of an attempt says (its `init` line; the result's own label).
    pub fn of_run(run: &super::stream::ParsedRun) -> AttemptSpend {
        let init = run.init.as_ref();
        AttemptSpend {
            init_model: init.and_then(|i| i.model.clone()),
            version: init.and_then(|i| i.version.clone()),
            simulated: init.is_some_and(|i| i.simulated)
                || run.result.as_ref().is_some_and(|r| r.simulated),
        }
    }
}
