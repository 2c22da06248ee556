//! Online backups with SQLite's backup API (consistent while the daemon writes), checked with
//! `PRAGMA integrity_check`; restores that verify the copy before replacing anything.
//!
//! Scheduled backups ([`scheduled_backup`], run by `ksi-host serve` every `backup_interval`)
//! go to `backup_dir` as `ksi-<UTC timestamp>.db`; all but the newest are gzip-compressed
//! (`.db.gz`) and only the newest `backup_keep` are kept. [`restore`] accepts either form.

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

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
    // A backup holds everything the database does: as private as the database.
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
        .and_then(|()| std::fs::File::open(&tmp))
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
/// A gzip-compressed backup (a scheduled `.db.gz`) is first decompressed to a temporary file
/// beside `db`, which is checked like any backup and removed afterwards.
///
/// # Errors
/// `src` is not SQLite (or gzip of SQLite), fails its integrity check, or has a newer schema.
pub fn restore(src: &Path, db: &Path) -> Result<BackupReport> {
    if !is_gzip(src)? {
        return restore_plain(src, db);
    }
    let plain = db.with_extension("db.restore-src");
    let out = decompress(src, &plain).and_then(|()| restore_plain(&plain, db));
    let _ = std::fs::remove_file(&plain);
    let mut report = out.map_err(|e| match e {
        StoreError::NotADatabase { .. } => StoreError::Backup {
            path: src.to_path_buf(),
            message:
                "it decompresses to something that is not a SQLite database; nothing was replaced"
                    .into(),
        },
        other => other,
    })?;
    report.source = src.display().to_string();
    Ok(report)
}

fn io_err(path: &Path, what: &str, e: std::io::Error) -> StoreError {
    StoreError::Backup {
        path: path.to_path_buf(),
        message: format!("{what}: {e}"),
    }
}

/// Whether the file at `path` is gzip-compressed (by its magic bytes, not its name).
///
/// # Errors
/// The file cannot be read.
pub fn is_gzip(path: &Path) -> Result<bool> {
    let mut magic = [0u8; 2];
    let mut f = std::fs::File::open(path).map_err(|e| {
        io_err(
            path,
            "cannot open it (check the path and that you may read it)",
            e,
        )
    })?;
    let n = f
        .read(&mut magic)
        .map_err(|e| io_err(path, "reading it", e))?;
    Ok(n == 2 && magic == [0x1f, 0x8b])
}

/// Decompresses the gzip file `src` into `dest` (overwritten), synced.
fn decompress(src: &Path, dest: &Path) -> Result<()> {
    let input = std::fs::File::open(src).map_err(|e| io_err(src, "opening it", e))?;
    let mut out = std::fs::File::create(dest).map_err(|e| io_err(dest, "creating it", e))?;
    std::io::copy(&mut flate2::read::GzDecoder::new(input), &mut out).map_err(|e| {
        io_err(
            src,
            "decompressing it failed (a damaged or truncated .gz); nothing was replaced",
            e,
        )
    })?;
    out.sync_all().map_err(|e| io_err(dest, "syncing it", e))
}

/// Compresses the backup `path` to `path.gz` (a temp file, synced, renamed) and removes
/// `path`. Returns the new file.
///
/// # Errors
/// The file cannot be read, or the compressed copy cannot be written.
pub fn compress(path: &Path) -> Result<PathBuf> {
    let mut gz_name = path.as_os_str().to_owned();
    gz_name.push(".gz");
    let gz = PathBuf::from(gz_name);
    let mut partial = gz.as_os_str().to_owned();
    partial.push(".partial");
    let partial = PathBuf::from(partial);
    let write = || -> std::io::Result<()> {
        let mut input = std::fs::File::open(path)?;
        let out = std::fs::File::create(&partial)?;
        out.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        let mut enc = flate2::write::GzEncoder::new(out, flate2::Compression::default());
        std::io::copy(&mut input, &mut enc)?;
        let mut out = enc.finish()?;
        out.flush()?;
        out.sync_all()?;
        std::fs::rename(&partial, &gz)
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&partial);
        io_err(path, "compressing it", e)
    })?;
    std::fs::remove_file(path).map_err(|e| io_err(path, "removing it after compression", e))?;
    Ok(gz)
}

/// What one scheduled backup did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ScheduledBackup {
    /// The new backup (uncompressed).
    #[serde(flatten)]
    pub backup: BackupReport,
    /// Older backups compressed by this run.
    pub compressed: Vec<String>,
    /// Backups deleted because more than `keep` existed.
    pub deleted: Vec<String>,
    pub duration_ms: u64,
}

/// Prefix of scheduled backup file names.
const SCHEDULED_PREFIX: &str = "ksi-";

/// The scheduled backups in `dir`, newest first (their names sort by time).
///
/// # Errors
/// `dir` cannot be read.
pub fn scheduled_backups(dir: &Path) -> Result<Vec<PathBuf>> {
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err(dir, "listing the backup directory", e)),
    };
    let mut files: Vec<PathBuf> = rd
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                n.starts_with(SCHEDULED_PREFIX) && (n.ends_with(".db") || n.ends_with(".db.gz"))
            })
        })
        .collect();
    files.sort_by(|a, b| b.file_name().cmp(&a.file_name()));
    Ok(files)
}

/// One scheduled backup: an online backup of `db` to `dir/ksi-<UTC timestamp>.db` (checked
/// with `integrity_check`), then every older plain backup in `dir` is compressed, and all
/// but the newest `keep` (at least 1) are deleted.
///
/// # Errors
/// The backup fails (the directory is not writable, the copy fails its check). Failing to
/// compress or delete an old backup is also an error, after the new backup was made.
pub fn scheduled_backup(db: &Path, dir: &Path, keep: usize) -> Result<ScheduledBackup> {
    let t0 = Instant::now();
    if !dir.exists() {
        std::fs::create_dir_all(dir)
            .and_then(|()| std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)))
            .map_err(|e| {
                io_err(
                    dir,
                    "creating the backup directory (set backup_dir to a writable directory)",
                    e,
                )
            })?;
    }
    // Leftovers of a run that crashed half-way.
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let name = e.file_name();
            let name = name.to_string_lossy();
            if name.starts_with(SCHEDULED_PREFIX) && name.ends_with(".partial") {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    let stamp = chrono::Utc::now().format("%Y%m%dT%H%M%S%.3fZ");
    let dest = dir.join(format!("{SCHEDULED_PREFIX}{stamp}.db"));
    let report = backup(db, &dest)?;
    let mut compressed = Vec::new();
    let mut deleted = Vec::new();
    for (i, file) in scheduled_backups(dir)?.into_iter().enumerate() {
        if i >= keep.max(1) {
            std::fs::remove_file(&file).map_err(|e| io_err(&file, "deleting an old backup", e))?;
            deleted.push(file.display().to_string());
        } else if file != dest && file.extension().is_some_and(|x| x == "db") {
            compressed.push(compress(&file)?.display().to_string());
        }
    }
    Ok(ScheduledBackup {
        backup: report,
        compressed,
        deleted,
        duration_ms: t0.elapsed().as_millis() as u64,
    })
}

fn restore_plain(src: &Path, db: &Path) -> Result<BackupReport> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Store, StoreOptions};

    fn store_with_rows(dir: &Path, rows: i64) -> (PathBuf, Store) {
        let db = dir.join("ksi.db");
        let store = Store::open_path(&db, &StoreOptions::default()).unwrap();
        store
            .write_blocking(move |tx| {
                for i in 0..rows {
                    tx.execute(
                        "INSERT INTO config(key, value, updated_at) VALUES (?1, '1', 0)",
                        [format!("k{i}")],
                    )?;
                }
                Ok::<_, StoreError>(())
            })
            .unwrap();
        (db, store)
    }

    #[test]
    fn scheduled_backups_compress_all_but_the_newest_and_keep_n() {
        let dir = tempfile::tempdir().unwrap();
        let (db, _store) = store_with_rows(dir.path(), 3);
        let backups = dir.path().join("backups");
        for _ in 0..4 {
            scheduled_backup(&db, &backups, 3).unwrap();
            std::thread::sleep(Duration::from_millis(5)); // distinct millisecond stamps
        }
        let files = scheduled_backups(&backups).unwrap();
        let names: Vec<String> = files
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names.len(), 3, "{names:?}");
        assert!(
            names[0].ends_with(".db"),
            "the newest stays plain: {names:?}"
        );
        assert!(
            names[1..].iter().all(|n| n.ends_with(".db.gz")),
            "{names:?}"
        );
        let mode = std::fs::metadata(&files[0]).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(
            std::fs::metadata(&backups).unwrap().permissions().mode() & 0o777,
            0o700
        );
    }

    #[test]
    fn a_compressed_backup_restores_with_its_data() {
        let dir = tempfile::tempdir().unwrap();
        let (db, store) = store_with_rows(dir.path(), 5);
        let backups = dir.path().join("b");
        scheduled_backup(&db, &backups, 5).unwrap();
        std::thread::sleep(Duration::from_millis(5));
        scheduled_backup(&db, &backups, 5).unwrap();
        store.close();
        let gz = scheduled_backups(&backups).unwrap().pop().unwrap();
        assert!(is_gzip(&gz).unwrap(), "{}", gz.display());
        let target = tempfile::tempdir().unwrap();
        let restored = target.path().join("ksi.db");
        let r = restore(&gz, &restored).unwrap();
        assert_eq!(r.integrity, "ok");
        assert_eq!(r.source, gz.display().to_string());
        let conn = Connection::open(&restored).unwrap();
        let n: i64 = conn
            .query_row("SELECT COUNT(*) FROM config", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 5);
        assert!(
            !target.path().join("ksi.db.restore-src").exists(),
            "temp file removed"
        );
    }

    #[test]
    fn a_damaged_compressed_backup_replaces_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (db, store) = store_with_rows(dir.path(), 1);
        let plain = dir.path().join("copy.db");
        backup(&db, &plain).unwrap();
        store.close();
        let gz = compress(&plain).unwrap();
        let bytes = std::fs::read(&gz).unwrap();
        std::fs::write(&gz, &bytes[..bytes.len() / 2]).unwrap();
        let target = tempfile::tempdir().unwrap();
        let live = target.path().join("ksi.db");
        std::fs::write(&live, b"the live database").unwrap();
        let err = restore(&gz, &live).unwrap_err().to_string();
        assert!(err.contains("nothing was replaced"), "{err}");
        assert_eq!(std::fs::read(&live).unwrap(), b"the live database");
    }
}
