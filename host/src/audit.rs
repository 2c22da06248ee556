//! The audit log: one row per mutating API call (POST, PUT, PATCH, DELETE) — who made it,
//! what it was, what came of it, and when — in the `audit_log` table.
//!
//! Requests do not wait for their audit row: the API hands entries to [`AuditLog`], whose
//! task commits whatever has queued up in one durable write (group commit, like the rest of
//! the store). A draining daemon calls [`AuditLog::flush`] before it closes the store, so no
//! entry of an answered request is lost to a clean shutdown.

use rusqlite::{Connection, params};
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

use crate::store::{Store, StoreError, Tx, now_ms};

/// Largest number of entries committed in one transaction.
const BATCH: usize = 512;

/// One mutating API call.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AuditEntry {
    /// When the request arrived (ms since the epoch).
    pub at: i64,
    /// Who: `unix socket`, `token:<8 hex>` (a token's id, never the token), or `anonymous`
    /// (TCP without a configured token).
    pub client: String,
    /// The peer address for TCP requests.
    pub peer: Option<String>,
    pub method: String,
    /// Path and query.
    pub path: String,
    /// The HTTP status of the answer.
    pub status: u16,
    /// The id of the resource the call made or touched, when the answer named one.
    pub resource: Option<String>,
    /// A short summary of the request body (long values shortened).
    pub summary: Option<String>,
    /// How long the request took, in ms.
    pub duration_ms: i64,
}

/// A stored entry.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AuditRecord {
    pub id: i64,
    #[serde(flatten)]
    pub entry: AuditEntry,
}

/// Inserts entries in a write transaction.
///
/// # Errors
/// The insert fails.
pub fn insert_in(tx: &Tx<'_>, entries: &[AuditEntry]) -> Result<(), StoreError> {
    let mut stmt = tx.prepare_cached(
        "INSERT INTO audit_log(at, client, peer, method, path, status, resource, summary, duration_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
    )?;
    for e in entries {
        stmt.execute(params![
            e.at,
            e.client,
            e.peer,
            e.method,
            e.path,
            e.status,
            e.resource,
            e.summary,
            e.duration_ms
        ])?;
    }
    Ok(())
}

/// Entries in id order: those after `since` when given, else the newest `limit`.
///
/// # Errors
/// The query fails.
pub fn list(
    conn: &Connection,
    since: Option<i64>,
    limit: usize,
) -> Result<Vec<AuditRecord>, StoreError> {
    let sql = match since {
        Some(_) => {
            "SELECT id, at, client, peer, method, path, status, resource, summary, duration_ms
             FROM audit_log WHERE id > ?1 ORDER BY id LIMIT ?2"
        }
        None => {
            "SELECT * FROM (SELECT id, at, client, peer, method, path, status, resource, summary, duration_ms
             FROM audit_log WHERE ?1 IS NULL ORDER BY id DESC LIMIT ?2) ORDER BY id"
        }
    };
    let mut stmt = conn.prepare_cached(sql)?;
    let rows = stmt.query_map(params![since, limit as i64], |r| {
        Ok(AuditRecord {
            id: r.get(0)?,
            entry: AuditEntry {
                at: r.get(1)?,
                client: r.get(2)?,
                peer: r.get(3)?,
                method: r.get(4)?,
                path: r.get(5)?,
                status: r.get(6)?,
                resource: r.get(7)?,
                summary: r.get(8)?,
                duration_ms: r.get(9)?,
            },
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Deletes entries older than `max_age_ms`; returns how many.
///
/// # Errors
/// The delete fails.
pub async fn prune(store: &Store, max_age_ms: i64) -> Result<usize, StoreError> {
    let cutoff = now_ms() - max_age_ms;
    store
        .write(move |tx| Ok(tx.execute("DELETE FROM audit_log WHERE at < ?1", [cutoff])?))
        .await
}

enum Msg {
    Entry(AuditEntry),
    Flush(oneshot::Sender<()>),
}

/// Hands audit entries to a task that writes them durably, off the requests' path.
#[derive(Debug, Clone)]
pub struct AuditLog {
    tx: mpsc::UnboundedSender<Msg>,
}

impl std::fmt::Debug for Msg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Msg::Entry(e) => f.debug_tuple("Entry").field(e).finish(),
            Msg::Flush(_) => f.write_str("Flush"),
        }
    }
}

impl AuditLog {
    /// Starts the writer task on `store` (call from a Tokio runtime).
    pub fn spawn(store: Store) -> AuditLog {
        let (tx, mut rx) = mpsc::unbounded_channel::<Msg>();
        tokio::spawn(async move {
            let mut batch = Vec::new();
            let mut waiters = Vec::new();
            while let Some(first) = rx.recv().await {
                let mut next = Some(first);
                // Everything already queued goes into the same commit.
                while let Some(msg) = next {
                    match msg {
                        Msg::Entry(e) => batch.push(e),
                        Msg::Flush(w) => waiters.push(w),
                    }
                    next = if batch.len() < BATCH {
                        rx.try_recv().ok()
                    } else {
                        None
                    };
                }
                if !batch.is_empty() {
                    write_batch(&store, std::mem::take(&mut batch)).await;
                }
                for w in waiters.drain(..) {
                    let _ = w.send(());
                }
            }
        });
        AuditLog { tx }
    }

    /// Queues an entry (never blocks).
    pub fn record(&self, entry: AuditEntry) {
        if let Err(e) = self.tx.send(Msg::Entry(entry)) {
            tracing::error!(entry = ?e.0, "the audit log writer has stopped; entry not saved");
        }
    }

    /// Resolves once every entry queued before it is committed.
    pub async fn flush(&self) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Msg::Flush(tx)).is_ok() {
            let _ = rx.await;
        }
    }
}

/// Writes one batch; a failed commit is retried a few times (the store retries "database is
/// locked" itself, so a failure here is rare and serious: it is logged with the entries).
async fn write_batch(store: &Store, batch: Vec<AuditEntry>) {
    let batch = std::sync::Arc::new(batch);
    for attempt in 1..=5u32 {
        let b = batch.clone();
        match store.write(move |tx| insert_in(tx, &b)).await {
            Ok(()) => return,
            Err(StoreError::Closed) => break,
            Err(e) => {
                tracing::warn!(attempt, error = %e, "writing the audit log failed; retrying");
                tokio::time::sleep(std::time::Duration::from_millis(100 * u64::from(attempt)))
                    .await;
            }
        }
    }
    tracing::error!(entries = ?batch, "audit entries could not be saved");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let opts = crate::store::StoreOptions {
            sync: crate::config::SyncMode::Normal,
            ..Default::default()
        };
        let store = Store::open_path(&dir.path().join("ksi.db"), &opts).unwrap();
        (dir, store)
    }

    fn entry(path: &str) -> AuditEntry {
        AuditEntry {
            at: now_ms(),
            client: "unix socket".into(),
            peer: None,
            method: "POST".into(),
            path: path.into(),
            status: 201,
            resource: Some("wf_1".into()),
            summary: Some(r#"{"type":"debate"}"#.into()),
            duration_ms: 3,
        }
    }

    #[tokio::test]
    async fn queued_entries_are_durable_after_flush_and_listed_in_order() {
        let (_dir, store) = temp_store();
        let log = AuditLog::spawn(store.clone());
        for i in 0..5 {
            log.record(entry(&format!("/workflows/{i}")));
        }
        log.flush().await;
        let all = store.read(|c| list(c, Some(0), 100)).unwrap();
        let paths: Vec<&str> = all.iter().map(|r| r.entry.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "/workflows/0",
                "/workflows/1",
                "/workflows/2",
                "/workflows/3",
                "/workflows/4"
            ]
        );
        assert_eq!(all[0].entry, entry("/workflows/0").tap_at(all[0].entry.at));
        // Without `since`: the newest `limit`, still oldest first.
        let newest = store.read(|c| list(c, None, 2)).unwrap();
        assert_eq!(
            newest.iter().map(|r| r.id).collect::<Vec<_>>(),
            [all[3].id, all[4].id]
        );
        let after = store.read(|c| list(c, Some(all[3].id), 100)).unwrap();
        assert_eq!(after.len(), 1);
    }

    #[tokio::test]
    async fn prune_deletes_only_old_entries() {
        let (_dir, store) = temp_store();
        let mut old = entry("/old");
        old.at -= 10 * 86_400_000;
        let new = entry("/new");
        store
            .write(move |tx| insert_in(tx, &[old, new]))
            .await
            .unwrap();
        assert_eq!(prune(&store, 86_400_000).await.unwrap(), 1);
        let left = store.read(|c| list(c, Some(0), 10)).unwrap();
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].entry.path, "/new");
    }

    impl AuditEntry {
        fn tap_at(mut self, at: i64) -> Self {
            self.at = at;
            self
        }
    }
}
