//! Online backups with SQLite's backup API (consistent while the daemon writes), checked with
//! `PRAGMA integrity_check`; restores that verify the copy before replacing anything.

use std::path::Path;
use std::time::Duration;

use rusqlite::{Connection, OpenFlags};

use super::{Result, StoreError};

/// What a backup or restore did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BackupReport {
    pub source: String,
    pub destination: String,
    pub bytes: u64,
    pub pages: i64,
    pub integrity: String,
    pub schema_version: i64,
}

fn integrity(conn: &Connection) -> Result<String> {
    Ok(conn.query_row("PRAGMA integrity_check", [], |r| r.get(0))?)
}

/// Copies the live database at `db` to `dest` (a new file), page by page in small steps so
/// writers are never blocked for long, then checks the copy.
///
/// # Errors
/// `dest` exists, cannot be written, or the copy fails its integrity check.
pub fn backup(db: &Path, dest: &Path) -> Result<BackupReport> {
    if dest.exists() {
        return Err(StoreError::Migration {
            path: dest.to_path_buf(),
            message: "the destination exists; choose a new file name (backups never overwrite)"
                .into(),
        });
    }
    super::check_header(db)?;
    let src = Connection::open_with_flags(db, OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    src.busy_timeout(Duration::from_secs(5))?;
    let tmp = dest.with_extension("partial");
    let _ = std::fs::remove_file(&tmp);
    {
        let mut dst = Connection::open(&tmp)?;
        let b = rusqlite::backup::Backup::new(&src, &mut dst)?;
        // 256 pages a step, short pauses: the daemon keeps committing meanwhile.
        b.run_to_completion(256, Duration::from_millis(5), None)?;
    }
    let dst = Connection::open(&tmp)?;
    let verdict = integrity(&dst)?;
    if verdict != "ok" {
        let _ = std::fs::remove_file(&tmp);
        return Err(StoreError::CommitFailed(format!(
            "the backup copy failed its integrity check: {verdict}"
        )));
    }
    let pages: i64 = dst.query_row("PRAGMA page_count", [], |r| r.get(0))?;
    let version: i64 = dst.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    dst.execute_batch("PRAGMA journal_mode = DELETE")?;
    drop(dst);
    std::fs::File::open(&tmp)
        .and_then(|f| f.sync_all())
        .map_err(|source| StoreError::DataDir {
            path: tmp.clone(),
            source,
        })?;
    std::fs::rename(&tmp, dest).map_err(|source| StoreError::DataDir {
        path: dest.to_path_buf(),
        source,
    })?;
    Ok(BackupReport {
        source: db.display().to_string(),
        destination: dest.display().to_string(),
        bytes: std::fs::metadata(dest).map(|m| m.len()).unwrap_or(0),
        pages,
        integrity: verdict,
        schema_version: version,
    })
}

/// Replaces the database at `db` with the backup `src`, after checking that `src` is a sound
/// KSI database this binary can open. Refuses while a daemon holds the data dir (the caller
/// takes the data-dir lock). The replaced database is kept beside it as `ksi.db.before-restore`.
///
/// # Errors
/// `src` is not SQLite, fails its integrity check, or has a newer schema.
pub fn restore(src: &Path, db: &Path) -> Result<BackupReport> {
    super::check_header(src)?;
    let conn = Connection::open_with_flags(src, OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    let verdict = integrity(&conn).map_err(|_| StoreError::NotADatabase {
        path: src.to_path_buf(),
    })?;
    if verdict != "ok" {
        return Err(StoreError::CommitFailed(format!(
            "{} failed its integrity check ({verdict}); nothing was replaced",
            src.display()
        )));
    }
    let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if version > super::SCHEMA_VERSION {
        return Err(StoreError::SchemaTooNew {
            path: src.to_path_buf(),
            found: version,
            known: super::SCHEMA_VERSION,
        });
    }
    let pages: i64 = conn.query_row("PRAGMA page_count", [], |r| r.get(0))?;
    drop(conn);
    let staged = db.with_extension("db.restoring");
    std::fs::copy(src, &staged).map_err(|source| StoreError::DataDir {
        path: staged.clone(),
        source,
    })?;
    std::fs::File::open(&staged)
        .and_then(|f| f.sync_all())
        .map_err(|source| StoreError::DataDir {
            path: staged.clone(),
            source,
        })?;
    if db.exists() {
        let keep = db.with_extension("db.before-restore");
        // Fold the WAL into the old file first, so the kept copy is complete.
        if let Ok(old) = Connection::open(db) {
            let _ = old.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()));
        }
        std::fs::rename(db, &keep).map_err(|source| StoreError::DataDir {
            path: keep.clone(),
            source,
        })?;
    }
    for ext in ["db-wal", "db-shm"] {
        let _ = std::fs::remove_file(db.with_extension(ext));
    }
    std::fs::rename(&staged, db).map_err(|source| StoreError::DataDir {
        path: db.to_path_buf(),
        source,
    })?;
    Ok(BackupReport {
        source: src.display().to_string(),
        destination: db.display().to_string(),
        bytes: std::fs::metadata(db).map(|m| m.len()).unwrap_or(0),
        pages,
        integrity: verdict,
        schema_version: version,
    })
}
