//! Schema migrations: the numbered `.sql` files of `migrations/`, applied in order at start-up
//! by `rusqlite_migration` (the version lives in SQLite's `user_version`).

use std::path::Path;

use rusqlite::Connection;
use rusqlite_migration::{M, Migrations};

use super::{Result, StoreError};

/// The migrations this binary knows, in order. A test checks that every file of `migrations/`
/// is listed here, so a new file cannot be forgotten.
const MIGRATIONS: &[(&str, &str)] = &[
    (
        "0001_init.sql",
        include_str!("../../../migrations/0001_init.sql"),
    ),
    (
        "0002_workflow_journal.sql",
        include_str!("../../../migrations/0002_workflow_journal.sql"),
    ),
    (
        "0003_executor.sql",
        include_str!("../../../migrations/0003_executor.sql"),
    ),
    (
        "0004_audit.sql",
        include_str!("../../../migrations/0004_audit.sql"),
    ),
    (
        "0005_accounting.sql",
        include_str!("../../../migrations/0005_accounting.sql"),
    ),
];

/// The schema version this binary writes.
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

fn migrations() -> Migrations<'static> {
    Migrations::new(MIGRATIONS.iter().map(|(_, sql)| M::up(sql)).collect())
}

/// Applies all pending migrations in one transaction.
pub(super) fn apply(conn: &mut Connection, path: &Path) -> Result<()> {
    migrations()
        .to_latest(conn)
        .map_err(|e| StoreError::Migration {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
}

/// Where a database stands against this binary's migrations.
#[derive(Debug, Clone, serde::Serialize)]
pub struct MigrationStatus {
    /// The version recorded in the database (0 for a new one).
    pub current: i64,
    /// The newest version this binary knows.
    pub latest: i64,
    /// File names of the migrations not yet applied.
    pub pending: Vec<String>,
    /// File names of the applied migrations.
    pub applied: Vec<String>,
}

/// Reads the schema version of the database at `path` without changing anything.
///
/// # Errors
/// The file is not a SQLite database.
pub fn migration_status(path: &Path) -> Result<MigrationStatus> {
    super::check_header(path)?;
    let current = if path.exists() {
        let conn = Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
        conn.pragma_query_value(None, "user_version", |r| r.get::<_, i64>(0))
            .map_err(|e| match e.sqlite_error_code() {
                Some(rusqlite::ErrorCode::NotADatabase) => StoreError::NotADatabase {
                    path: path.to_path_buf(),
                },
                _ => StoreError::Sqlite(e),
            })?
    } else {
        0
    };
    let names = MIGRATIONS.iter().map(|(n, _)| n.to_string());
    Ok(MigrationStatus {
        current,
        latest: SCHEMA_VERSION,
        applied: names.clone().take(current.max(0) as usize).collect(),
        pending: names.skip(current.max(0) as usize).collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_migration_file_is_listed_in_order() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../migrations");
        let mut files: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.ends_with(".sql"))
            .collect();
        files.sort();
        let listed: Vec<String> = MIGRATIONS.iter().map(|(n, _)| n.to_string()).collect();
        assert_eq!(files, listed);
        for (i, name) in listed.iter().enumerate() {
            assert!(
                name.starts_with(&format!("{:04}_", i + 1)),
                "{name} is out of sequence"
            );
        }
    }

    #[test]
    fn migrations_validate() {
        migrations().validate().unwrap();
    }

    #[test]
    fn migrations_are_idempotent_on_an_existing_database() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ksi.db");
        let mut conn = Connection::open(&path).unwrap();
        apply(&mut conn, &path).unwrap();
        conn.execute(
            "INSERT INTO config(key, value, updated_at) VALUES ('k', '1', 0)",
            [],
        )
        .unwrap();
        apply(&mut conn, &path).unwrap();
        drop(conn);
        let st = migration_status(&path).unwrap();
        assert_eq!(st.current, SCHEMA_VERSION);
        assert!(st.pending.is_empty());
        let conn = Connection::open(&path).unwrap();
        let n: i64 = conn
            .query_row("SELECT COUNT(*) FROM config", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 1, "re-applying kept the data");
    }
}
