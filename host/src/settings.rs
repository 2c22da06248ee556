//! Dynamic settings: the `config` table, changeable while the daemon runs. Every change
//! publishes `system.config_change` in the same transaction, so subscribers never miss one.

use rusqlite::{OptionalExtension, params};
use serde::Serialize;
use serde_json::{Value, json};

use crate::bus::{self, BusError, NewEvent};
use crate::store::{Store, now_ms};

/// One stored setting.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Setting {
    pub key: String,
    pub value: Value,
    pub description: Option<String>,
    pub updated_at: i64,
}

/// Reads a setting.
pub fn get(store: &Store, key: &str) -> Result<Option<Value>, BusError> {
    let key = key.to_string();
    store.read(move |c| {
        let v: Option<String> = c
            .query_row("SELECT value FROM config WHERE key = ?1", [&key], |r| {
                r.get(0)
            })
            .optional()?;
        Ok(v.map(|s| serde_json::from_str(&s).unwrap_or(Value::String(s))))
    })
}

/// Lists all settings.
pub fn list(store: &Store) -> Result<Vec<Setting>, BusError> {
    store.read(|c| {
        let mut st =
            c.prepare("SELECT key, value, description, updated_at FROM config ORDER BY key")?;
        let rows = st.query_map([], |r| {
            let v: String = r.get(1)?;
            Ok(Setting {
                key: r.get(0)?,
                value: serde_json::from_str(&v).unwrap_or(Value::String(v)),
                description: r.get(2)?,
                updated_at: r.get(3)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    })
}

/// Sets a setting and publishes `system.config_change` (with old and new value) atomically.
/// Returns the event id.
pub async fn set(
    store: &Store,
    key: &str,
    value: Value,
    description: Option<String>,
) -> Result<i64, BusError> {
    let key = key.to_string();
    store
        .write(move |tx| {
            let old: Option<String> = tx
                .query_row("SELECT value FROM config WHERE key = ?1", [&key], |r| {
                    r.get(0)
                })
                .optional()?;
            tx.execute(
                "INSERT INTO config(key, value, description, updated_at) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT(key) DO UPDATE SET value = excluded.value,
                    description = COALESCE(excluded.description, config.description),
                    updated_at = excluded.updated_at",
                params![key, value.to_string(), description, now_ms()],
            )?;
            let old = old.map(|s| serde_json::from_str(&s).unwrap_or(Value::String(s)));
            bus::publish_in(
                tx,
                &NewEvent::new(
                    "system.config_change",
                    json!({ "key": key, "old": old, "new": value }),
                ),
            )
        })
        .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::{Bus, SubscriptionOptions};
    use crate::store::StoreOptions;

    #[tokio::test]
    async fn a_config_change_publishes_system_config_change() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let store = Store::open_path(&dir.path().join("ksi.db"), &StoreOptions::default())?;
        let bus = Bus::new(store.clone());
        let sub = bus
            .subscribe("watch", "system.*", SubscriptionOptions::default())
            .await?;
        set(&store, "claude.max_concurrency", json!(4), None).await?;
        set(&store, "claude.max_concurrency", json!(8), None).await?;
        assert_eq!(get(&store, "claude.max_concurrency")?, Some(json!(8)));
        let got = bus.claim(&sub, "t", 10).await?;
        assert_eq!(got.len(), 2);
        assert_eq!(got[1].event.topic, "system.config_change");
        assert_eq!(
            got[1].event.data,
            json!({"key": "claude.max_concurrency", "old": 4, "new": 8})
        );
        Ok(())
    }
}
