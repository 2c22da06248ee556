//! Agents: a named Claude conversation that survives restarts, with a profile, a sandbox
//! directory, a status and an inbox.
//!
//! The `agents` row keeps `agent → current session id → working directory`; every completed call
//! replaces the session id, and the next call of that agent runs `--resume <session>` in the same
//! directory (`agents/<id>/` under the data dir). Profiles are TOML files,
//! `agents/profiles/<name>.toml`, read when the agent is first used. The inbox is the bus: each
//! agent has subscriptions (in the `subscriptions` table, with its id) for `agent.<id>.message`
//! and its profile's topic patterns; matching events wait there until the agent's next turn, which
//! gets them prepended to its prompt and acks them in the transaction that queues that prompt.

use std::path::{Path, PathBuf};

use rusqlite::{OptionalExtension, params};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::spend::Budget;
use crate::bus::{self, Bus, BusError, Delivery, NewEvent, SubscriptionOptions};
use crate::store::{Store, Tx, now_ms};

/// Where agent sandboxes and profiles live, relative to the data dir.
pub const AGENTS_DIR: &str = "agents";

/// An agent profile (`agents/profiles/<name>.toml`). Every field is optional.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AgentProfile {
    /// Model for this agent's calls (when the request names none).
    pub model: Option<String>,
    /// A short description of the agent's role (shown by `ksi agents`).
    pub role: Option<String>,
    /// Appended to Claude's system prompt (`--append-system-prompt`).
    pub system_prompt: Option<String>,
    /// `--allowedTools=`.
    pub allowed_tools: Vec<String>,
    /// `--disallowedTools=`.
    pub disallowed_tools: Vec<String>,
    /// `--permission-mode`.
    pub permission_mode: Option<String>,
    /// `--max-turns` default.
    pub max_turns: Option<u32>,
    /// This agent's budget, overriding `claude.budget.agent_*`.
    pub budget_usd: Option<f64>,
    /// See `budget_usd`.
    pub budget_tokens: Option<u64>,
    /// See `budget_usd`.
    pub budget_calls: Option<u64>,
    /// What the agent can do (free-form tags).
    pub capabilities: Vec<String>,
    /// Bus topic patterns whose events land in the agent's inbox.
    pub subscriptions: Vec<String>,
}

impl AgentProfile {
    /// The agent budget this profile sets, if any.
    pub fn budget(&self) -> Option<Budget> {
        (self.budget_usd.is_some() || self.budget_tokens.is_some() || self.budget_calls.is_some())
            .then_some(Budget {
                usd: self.budget_usd,
                tokens: self.budget_tokens,
                calls: self.budget_calls,
            })
    }

    /// Reads `agents/profiles/<name>.toml` under `data_dir`; the default profile when there is
    /// no such file.
    ///
    /// # Errors
    /// The file exists but cannot be read or is not a valid profile (the message names it).
    pub fn load(data_dir: &Path, name: &str) -> Result<AgentProfile, String> {
        let path = profile_path(data_dir, name);
        match std::fs::read_to_string(&path) {
            Ok(text) => toml::from_str(&text).map_err(|e| {
                format!(
                    "agent profile {} is invalid: {e}. Fix the file or remove it",
                    path.display()
                )
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(AgentProfile::default()),
            Err(e) => Err(format!("cannot read agent profile {}: {e}", path.display())),
        }
    }
}

/// The file of profile `name`.
pub fn profile_path(data_dir: &Path, name: &str) -> PathBuf {
    data_dir
        .join(AGENTS_DIR)
        .join("profiles")
        .join(format!("{name}.toml"))
}

/// Whether `id` is usable as an agent id (it becomes a directory name and a topic segment).
pub fn valid_agent_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// One row of the `agents` table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentRow {
    /// Agent id.
    pub id: String,
    /// Profile name.
    pub profile: String,
    /// `inactive`, `active` (has talked) or `busy` (a call is running).
    pub status: String,
    /// The session the next call resumes.
    pub current_session_id: Option<String>,
    /// The process of the latest call.
    pub current_process_id: Option<String>,
    /// Sandbox directory, relative to the data dir.
    pub workdir: Option<String>,
    /// From the profile.
    pub capabilities: Vec<String>,
    /// Totals: calls, cost_usd, tokens.
    pub metrics: Value,
    /// Creation time (epoch ms).
    pub created_at: i64,
    /// Time of the last call (epoch ms).
    pub last_active_at: Option<i64>,
}

fn read_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<AgentRow> {
    let caps: String = r.get(7)?;
    let metrics: String = r.get(8)?;
    Ok(AgentRow {
        id: r.get(0)?,
        profile: r.get(1)?,
        status: r.get(2)?,
        current_session_id: r.get(3)?,
        current_process_id: r.get(4)?,
        workdir: r.get(5)?,
        created_at: r.get(6)?,
        capabilities: serde_json::from_str(&caps).unwrap_or_default(),
        metrics: serde_json::from_str(&metrics).unwrap_or(Value::Null),
        last_active_at: r.get(9)?,
    })
}

const COLUMNS: &str = "id, profile, status, current_session_id, current_process_id, workdir, created_at, capabilities, metrics, last_active_at";

/// Reads one agent.
///
/// # Errors
/// A database error.
pub fn get(conn: &rusqlite::Connection, id: &str) -> rusqlite::Result<Option<AgentRow>> {
    conn.query_row(
        &format!("SELECT {COLUMNS} FROM agents WHERE id = ?1"),
        [id],
        read_row,
    )
    .optional()
}

/// Lists all agents.
///
/// # Errors
/// A database error.
pub fn list(store: &Store) -> Result<Vec<AgentRow>, BusError> {
    store.read(|c| {
        let mut st = c.prepare(&format!("SELECT {COLUMNS} FROM agents ORDER BY id"))?;
        let rows = st.query_map([], read_row)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    })
}

/// The inbox subscription names of an agent.
fn inbox_subscription(id: &str, i: usize) -> String {
    if i == 0 {
        format!("agent:{id}:inbox")
    } else {
        format!("agent:{id}:sub{i}")
    }
}

/// Makes sure agent `id` exists: row, sandbox directory and inbox subscriptions. Returns its row
/// and profile. The profile is `agents/profiles/<id>.toml` (the default profile when absent).
///
/// # Errors
/// An invalid id or profile, or a database/file-system error (the message says which).
pub async fn ensure(
    store: &Store,
    bus: &Bus,
    data_dir: &Path,
    id: &str,
) -> Result<(AgentRow, AgentProfile), String> {
    if !valid_agent_id(id) {
        return Err(format!(
            "{id:?} is not a valid agent id: use 1 to 64 letters, digits, '-' or '_'"
        ));
    }
    let profile = AgentProfile::load(data_dir, id)?;
    let workdir = format!("{AGENTS_DIR}/{id}");
    std::fs::create_dir_all(data_dir.join(&workdir))
        .map_err(|e| format!("cannot create the sandbox of agent {id} ({workdir}): {e}"))?;
    let existing = store
        .read_async({
            let id = id.to_string();
            move |c| get(c, &id).map_err(BusError::from)
        })
        .await
        .map_err(|e| e.to_string())?;
    if let Some(row) = existing {
        return Ok((row, profile));
    }
    let mut patterns = vec![format!("agent.{id}.message")];
    patterns.extend(profile.subscriptions.iter().cloned());
    for (i, pattern) in patterns.iter().enumerate() {
        bus.subscribe(
            &inbox_subscription(id, i),
            pattern,
            SubscriptionOptions {
                agent_id: Some(id.to_string()),
                // An inbox message waits for the agent's next turn, however long that takes.
                lease_ms: 60_000,
                ..SubscriptionOptions::default()
            },
        )
        .await
        .map_err(|e| format!("cannot subscribe agent {id} to {pattern}: {e}"))?;
    }
    let (idc, caps) = (
        id.to_string(),
        serde_json::to_string(&profile.capabilities).unwrap_or_else(|_| "[]".into()),
    );
    store
        .write(move |tx| {
            tx.execute(
                "INSERT INTO agents(id, profile, status, workdir, capabilities, created_at)
                 VALUES (?1, ?1, 'inactive', ?2, ?3, ?4) ON CONFLICT(id) DO NOTHING",
                params![idc, workdir, caps, now_ms()],
            )?;
            bus::publish_in(
                tx,
                &NewEvent::new(
                    "agent.created",
                    json!({ "agent_id": idc, "workdir": workdir }),
                ),
            )?;
            Ok::<_, BusError>(get(tx.conn(), &idc)?.expect("just inserted"))
        })
        .await
        .map(|row| (row, profile))
        .map_err(|e| e.to_string())
}

/// Claims the unread inbox messages of agent `id` (they are acked when the prompt that carries
/// them is queued, see [`ack_inbox_in`]).
///
/// # Errors
/// A database error.
pub async fn claim_inbox(bus: &Bus, id: &str) -> Result<Vec<Delivery>, BusError> {
    let subs: Vec<String> = bus.store().read({
        let id = id.to_string();
        move |c| {
            let mut st =
                c.prepare("SELECT name FROM subscriptions WHERE agent_id = ?1 AND active = 1")?;
            let rows = st.query_map([id], |r| r.get(0))?;
            Ok::<_, BusError>(rows.collect::<rusqlite::Result<_>>()?)
        }
    })?;
    let mut out = Vec::new();
    for name in subs {
        let sub = bus.subscription(&name)?;
        out.extend(bus.claim(&sub, &format!("agent:{id}"), 100).await?);
    }
    out.sort_by_key(|d| d.event.id);
    Ok(out)
}

/// The inbox as text to put before the agent's prompt.
pub fn render_inbox(messages: &[Delivery]) -> Option<String> {
    if messages.is_empty() {
        return None;
    }
    let mut s = String::from("[Inbox: messages received since your last turn]\n");
    for d in messages {
        let e = &d.event;
        let body = e
            .data
            .get("text")
            .and_then(Value::as_str)
            .map(str::to_string)
            .unwrap_or_else(|| e.data.to_string());
        let from = e
            .data
            .get("from")
            .and_then(Value::as_str)
            .map(|f| format!(" from {f}"))
            .unwrap_or_default();
        s.push_str(&format!("- ({}{from}) {body}\n", e.topic));
    }
    s.push_str("[End of inbox]\n\n");
    Some(s)
}

/// Acks claimed inbox messages inside the caller's transaction.
///
/// # Errors
/// A database error, or a claim that is no longer held (the message will be delivered again).
pub fn ack_inbox_in(tx: &Tx<'_>, messages: &[Delivery]) -> Result<(), BusError> {
    for d in messages {
        bus::ack_in(tx, d.subscription_id, d.event.id, &d.token)?;
    }
    Ok(())
}

/// Sends `text` to agent `to` (publishes `agent.<to>.message`). Returns the event id.
///
/// # Errors
/// An invalid agent id or a database error.
pub async fn send(bus: &Bus, to: &str, text: &str, from: Option<&str>) -> Result<i64, String> {
    if !valid_agent_id(to) {
        return Err(format!(
            "{to:?} is not a valid agent id: use 1 to 64 letters, digits, '-' or '_'"
        ));
    }
    bus.publish(NewEvent::new(
        format!("agent.{to}.message"),
        json!({ "to": to, "from": from, "text": text }),
    ))
    .await
    .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_profile_is_the_default_and_a_broken_one_names_its_file() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            AgentProfile::load(dir.path(), "nobody").unwrap(),
            AgentProfile::default()
        );
        let path = profile_path(dir.path(), "writer");
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(
            &path,
            "model = \"opus\"\nallowed_tools = [\"Read\"]\nbudget_usd = 2.0\nsubscriptions = [\"workflow.>\"]\n",
        )
        .unwrap();
        let p = AgentProfile::load(dir.path(), "writer").unwrap();
        assert_eq!(p.model.as_deref(), Some("opus"));
        assert_eq!(p.budget().unwrap().usd, Some(2.0));
        std::fs::write(&path, "modle = \"opus\"\n").unwrap();
        let err = AgentProfile::load(dir.path(), "writer").unwrap_err();
        assert!(
            err.contains("writer.toml") && err.contains("modle"),
            "{err}"
        );
    }

    #[test]
    fn agent_ids_are_safe_as_directory_names_and_topic_segments() {
        assert!(valid_agent_id("alice_2-b"));
        for bad in ["", "a/b", "..", "a.b", "a b", &"x".repeat(65)] {
            assert!(!valid_agent_id(bad), "{bad}");
        }
    }
}
