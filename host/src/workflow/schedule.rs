//! Schedules: start a workflow on a cron expression. Stored in SQLite, so they survive
//! restarts; a tick fires in the same transaction that records it, so a crash can never make
//! one tick start two instances (and a tick missed while the daemon was down fires once).

use std::str::FromStr;
use std::time::Duration;

use chrono::{TimeZone, Utc};
use croner::Cron;
use rusqlite::{OptionalExtension, params};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::watch;

use super::engine::{Engine, WorkflowError};
use crate::bus::{self, NewEvent};
use crate::store::{Store, now_ms};

/// A stored schedule.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Schedule {
    pub id: String,
    pub cron: String,
    pub workflow_type: String,
    pub params: Value,
    pub enabled: bool,
    pub last_fired_at: Option<i64>,
    pub next_fire_at: Option<i64>,
    pub created_at: i64,
}

/// Parses a cron expression: exactly 5 fields (minute hour day-of-month month day-of-week), so
/// a schedule fires at most once a minute. Seconds and years fields are refused: `* * * * * *`
/// would start a workflow (and pay for its calls) every second.
///
/// # Errors
/// A message naming the expression and what is wrong with it.
pub fn parse_cron(expr: &str) -> Result<Cron, String> {
    let fields = expr.split_whitespace().count();
    if fields != 5 {
        return Err(format!(
            "cron expression {expr:?} is invalid: it has {fields} field{}; a schedule takes exactly 5 (minute hour day-of-month month day-of-week, e.g. \"*/15 * * * *\" for every 15 minutes), so it fires at most once a minute",
            if fields == 1 { "" } else { "s" }
        ));
    }
    Cron::from_str(expr).map_err(|e| {
        format!("cron expression {expr:?} is invalid ({e}); use 5 fields, e.g. \"*/15 * * * *\" for every 15 minutes")
    })
}

/// The first tick of `cron` strictly after `after_ms`.
fn next_tick(cron: &Cron, after_ms: i64) -> Option<i64> {
    let from = Utc.timestamp_millis_opt(after_ms).single()?;
    cron.find_next_occurrence(&from, false)
        .ok()
        .map(|t| t.timestamp_millis())
}

fn read(r: &rusqlite::Row<'_>) -> rusqlite::Result<Schedule> {
    let params: String = r.get(3)?;
    Ok(Schedule {
        id: r.get(0)?,
        cron: r.get(1)?,
        workflow_type: r.get(2)?,
        params: serde_json::from_str(&params).unwrap_or(Value::Null),
        enabled: r.get(4)?,
        last_fired_at: r.get(5)?,
        next_fire_at: r.get(6)?,
        created_at: r.get(7)?,
    })
}

const COLUMNS: &str =
    "id, cron, workflow_type, params, enabled, last_fired_at, next_fire_at, created_at";

/// Adds a schedule; the workflow type must be defined in `engine`.
pub async fn add(
    engine: &Engine,
    cron: &str,
    workflow_type: &str,
    params: Value,
) -> Result<Schedule, WorkflowError> {
    let parsed = parse_cron(cron).map_err(WorkflowError::BadParams)?;
    engine.definition_by_name(workflow_type)?;
    if !params.is_object() {
        return Err(WorkflowError::BadParams(params.to_string()));
    }
    let now = now_ms();
    let s = Schedule {
        id: format!("sch_{:011x}{:04x}", now, rand::random::<u16>()),
        cron: cron.to_string(),
        workflow_type: workflow_type.to_string(),
        params,
        enabled: true,
        last_fired_at: None,
        next_fire_at: next_tick(&parsed, now),
        created_at: now,
    };
    let row = s.clone();
    engine
        .store()
        .write(move |tx| {
            tx.execute(
                "INSERT INTO schedules(id, cron, workflow_type, params, enabled, next_fire_at, created_at)
                 VALUES (?1, ?2, ?3, ?4, 1, ?5, ?6)",
                params![row.id, row.cron, row.workflow_type, row.params.to_string(), row.next_fire_at, row.created_at],
            )?;
            bus::publish_in(tx, &NewEvent::new("workflow.schedule.added", json!({"id": row.id, "cron": row.cron, "type": row.workflow_type})))?;
            Ok::<_, WorkflowError>(())
        })
        .await?;
    Ok(s)
}

/// All schedules.
pub fn list(store: &Store) -> Result<Vec<Schedule>, WorkflowError> {
    store.read(|c| {
        let mut st = c.prepare(&format!(
            "SELECT {COLUMNS} FROM schedules ORDER BY created_at"
        ))?;
        let rows = st.query_map([], read)?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    })
}

/// Removes a schedule.
pub async fn remove(store: &Store, id: &str) -> Result<(), WorkflowError> {
    let id = id.to_string();
    store
        .write(move |tx| {
            if tx.execute("DELETE FROM schedules WHERE id = ?1", [&id])? == 0 {
                return Err(WorkflowError::BadParams(format!(
                    "no schedule {id:?}; `ksi schedule list` shows them"
                )));
            }
            bus::publish_in(
                tx,
                &NewEvent::new("workflow.schedule.removed", json!({"id": id})),
            )?;
            Ok(())
        })
        .await
}

/// Fires every schedule whose tick is due at `now`; returns the started instance ids.
/// Each firing is one transaction: the schedule's tick moves forward only if the instance
/// is created, and a tick already recorded is never fired again.
pub async fn fire_due(engine: &Engine, now: i64) -> Result<Vec<String>, WorkflowError> {
    let due: Vec<Schedule> = list(engine.store())?
        .into_iter()
        .filter(|s| s.enabled && s.next_fire_at.is_some_and(|t| t <= now))
        .collect();
    let mut started = Vec::new();
    for s in due {
        let tick = s.next_fire_at.unwrap();
        let Ok(cron) = parse_cron(&s.cron) else {
            continue;
        };
        // Missed ticks (daemon down) collapse into this one firing; the next is after now.
        let next = next_tick(&cron, now.max(tick));
        let def = match engine.definition_by_name(&s.workflow_type) {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(schedule = %s.id, error = %e, "scheduled workflow type is not defined; skipping this tick");
                continue;
            }
        };
        let e2 = engine.clone();
        let id = engine.new_instance_id();
        let (sid, params, wid) = (s.id.clone(), s.params.clone(), id.clone());
        let fired = engine
            .store()
            .write(move |tx| {
                // Compare-and-set on the tick: a second firing of the same tick changes nothing.
                let claimed = tx.execute(
                    "UPDATE schedules SET last_fired_at = ?2, next_fire_at = ?3 WHERE id = ?1 AND next_fire_at = ?2",
                    params![sid, tick, next],
                )?;
                if claimed == 0 {
                    return Ok(false);
                }
                e2.start_in(tx, &def, params, &wid)?;
                bus::publish_in(tx, &NewEvent::new("workflow.schedule.fired", json!({"id": sid, "tick": tick, "workflow_id": wid})))?;
                Ok::<_, WorkflowError>(true)
            })
            .await?;
        if fired {
            tracing::info!(schedule = %s.id, workflow = %id, "schedule fired");
            started.push(id);
        }
    }
    Ok(started)
}

/// Runs the scheduler until `shutdown`: sleeps until the next tick (at most 30 s, so schedules
/// added by other processes are seen), fires what is due.
pub async fn run(engine: Engine, mut shutdown: watch::Receiver<bool>) {
    loop {
        if let Err(e) = fire_due(&engine, now_ms()).await {
            tracing::error!(error = %e, "firing schedules failed; will retry");
        }
        let next = list(engine.store()).ok().and_then(|l| {
            l.iter()
                .filter(|s| s.enabled)
                .filter_map(|s| s.next_fire_at)
                .min()
        });
        let wait = next
            .map(|t| Duration::from_millis((t - now_ms()).clamp(0, 30_000) as u64))
            .unwrap_or(Duration::from_secs(30));
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
    }
}

/// The schedule with `id`, if any.
pub fn get(store: &Store, id: &str) -> Result<Option<Schedule>, WorkflowError> {
    let id = id.to_string();
    store.read(move |c| {
        Ok(c.query_row(
            &format!("SELECT {COLUMNS} FROM schedules WHERE id = ?1"),
            [&id],
            read,
        )
        .optional()?)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_five_field_expressions_are_schedules() {
        assert!(parse_cron("*/15 * * * *").is_ok());
        assert!(parse_cron("0 9 * * MON-FRI").is_ok());
        for expr in ["* * * * * *", "* * * * * * *", "* * * *", ""] {
            let e = parse_cron(expr).unwrap_err();
            assert!(e.contains("exactly 5"), "{expr}: {e}");
        }
        let e = parse_cron("* * * * * *").unwrap_err();
        assert!(e.contains("has 6 fields"), "{e}");
    }
}
