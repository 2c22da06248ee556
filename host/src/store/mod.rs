//! The SQLite store: one writer thread with group commit, a pool of reader connections.
//!
//! Every state change in KSI goes through [`Store::write`]: the closure runs on the writer
//! thread inside a savepoint of a shared `BEGIN IMMEDIATE` transaction. Jobs that arrive while
//! a commit is in flight are batched into the next transaction, so many concurrent durable
//! writes share one fsync (group commit). A job that fails rolls back its own savepoint only:
//! the other jobs of the batch still commit, and the failed job publishes nothing (outbox).
//!
//! Durability: `journal_mode=WAL` and `synchronous=FULL` by default, so a write is on disk
//! before its future resolves. "database is locked" (another process holding the write lock)
//! is waited out with the busy timeout and then retried forever: a write is never dropped.

pub mod backup;
mod migrate;

use std::cell::Cell;
use std::fs::OpenOptions;
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, OpenFlags};
use tokio::sync::{oneshot, watch};

use crate::config::{Config, SyncMode};

pub use migrate::{MigrationStatus, SCHEMA_VERSION, migration_status};

/// Errors of the store. Messages say what happened and what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "cannot use data directory {path}: {source}. Choose a writable directory with --data-dir or KSI_DATA_DIR"
    )]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{path} is not a SQLite database (its header is wrong). Point --data-dir at a KSI data directory, or move the file away"
    )]
    NotADatabase { path: PathBuf },
    #[error(
        "{path} has schema version {found}, but this ksi-host knows only up to version {known}. It was written by a newer KSI: upgrade ksi-host (the database was left untouched)"
    )]
    SchemaTooNew {
        path: PathBuf,
        found: i64,
        known: i64,
    },
    #[error("migrating {path} failed: {message}. The database was left at its previous version")]
    Migration { path: PathBuf, message: String },
    #[error("database error: {0}")]
    Sqlite(rusqlite::Error),
    #[error("the store is shut down")]
    Closed,
    #[error("a write job panicked: {0}")]
    Panicked(String),
    #[error("the commit failed, nothing of this write was saved: {0}")]
    CommitFailed(String),
    #[error(
        "the disk of the data directory is full ({0}); nothing of this write was saved. Free space on that disk (old backups, archived prompts, logs) and retry: the daemon goes on by itself"
    )]
    DiskFull(String),
    #[error("backup file {path}: {message}")]
    Backup { path: PathBuf, message: String },
}

impl From<rusqlite::Error> for StoreError {
    /// SQLite's "database or disk is full" becomes [`StoreError::DiskFull`], which says what
    /// to do about it.
    fn from(e: rusqlite::Error) -> Self {
        if e.sqlite_error_code() == Some(rusqlite::ErrorCode::DiskFull) {
            StoreError::DiskFull(e.to_string())
        } else {
            StoreError::Sqlite(e)
        }
    }
}

impl StoreError {
    /// Whether this failure is a full disk (or an exhausted quota): it clears when space is
    /// freed, and is never the caller's fault.
    pub fn is_disk_full(&self) -> bool {
        match self {
            StoreError::DiskFull(_) => true,
            StoreError::Sqlite(e) => e.sqlite_error_code() == Some(rusqlite::ErrorCode::DiskFull),
            StoreError::DataDir { source, .. } => io_is_disk_full(source),
            _ => false,
        }
    }
}

/// Whether an error that was flattened to text (a commit failure handed over as a message, a
/// Claude call's failure) came from a full disk: SQLite's and the OS's own wording.
pub fn message_is_disk_full(message: &str) -> bool {
    [
        "database or disk is full",
        "No space left on device",
        "Disk quota exceeded",
        "the disk of the data directory is full",
    ]
    .iter()
    .any(|m| message.contains(m))
}

/// Free bytes for unprivileged writers on the file system holding `path` (statvfs).
pub fn fs_free_bytes(path: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs writes into the struct it is given; `c` is a valid C string.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return None;
    }
    Some(st.f_bavail as u64 * st.f_frsize as u64)
}

/// Whether an I/O error is a full disk (`ENOSPC`) or an exhausted quota (`EDQUOT`).
pub fn io_is_disk_full(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
        || e.kind() == std::io::ErrorKind::StorageFull
        || e.kind() == std::io::ErrorKind::QuotaExceeded
}

/// Why a batch did not become durable.
#[derive(Debug, Clone)]
struct CommitError {
    message: String,
    disk_full: bool,
}

impl CommitError {
    fn into_store_error(self) -> StoreError {
        if self.disk_full {
            StoreError::DiskFull(self.message)
        } else {
            StoreError::CommitFailed(self.message)
        }
    }
}

/// Result alias for store operations.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Milliseconds since the Unix epoch: the time unit of every time column.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// A write transaction as seen by one job: the shared connection, inside the job's savepoint.
///
/// Modules add their own operations as functions taking `&Tx` (for example
/// [`crate::bus::publish_in`]), so a caller composes a state change and the events it emits
/// into one atomic unit.
pub struct Tx<'a> {
    conn: &'a Connection,
    last_event_id: Cell<i64>,
}

impl<'a> Tx<'a> {
    /// The connection, for module-owned SQL.
    pub fn conn(&self) -> &'a Connection {
        self.conn
    }

    /// Records that this job published an event with `id`, so subscribers are woken after
    /// the commit.
    pub fn note_published(&self, id: i64) {
        if id > self.last_event_id.get() {
            self.last_event_id.set(id);
        }
    }
}

impl std::ops::Deref for Tx<'_> {
    type Target = Connection;
    fn deref(&self) -> &Connection {
        self.conn
    }
}

trait Job: Send {
    /// Whether the caller must be answered only once the commit is on disk.
    fn durable(&self) -> bool;
    /// Runs inside the job's savepoint. Returns true when the job succeeded (keep its changes).
    fn run(&mut self, tx: &Tx<'_>) -> bool;
    /// Delivers the outcome once the batch's commit is known.
    fn finish(self: Box<Self>, commit: std::result::Result<(), CommitError>);
}

struct WriteJob<T, E, F> {
    durable: bool,
    f: Option<F>,
    out: Option<std::result::Result<T, E>>,
    reply: oneshot::Sender<std::result::Result<T, E>>,
}

impl<T, E, F> Job for WriteJob<T, E, F>
where
    T: Send,
    E: From<StoreError> + Send,
    F: FnOnce(&Tx<'_>) -> std::result::Result<T, E> + Send,
{
    fn durable(&self) -> bool {
        self.durable
    }

    fn run(&mut self, tx: &Tx<'_>) -> bool {
        let f = self.f.take().expect("a job runs once");
        let out = match catch_unwind(AssertUnwindSafe(|| f(tx))) {
            Ok(out) => out,
            Err(panic) => {
                let msg = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown panic".into());
                Err(StoreError::Panicked(msg).into())
            }
        };
        let ok = out.is_ok();
        self.out = Some(out);
        ok
    }

    fn finish(self: Box<Self>, commit: std::result::Result<(), CommitError>) {
        let out = match (self.out, commit) {
            (Some(Ok(v)), Ok(())) => Ok(v),
            (Some(Ok(_)), Err(e)) => Err(e.into_store_error().into()),
            (Some(Err(e)), _) => Err(e),
            (None, Err(e)) => Err(e.into_store_error().into()),
            (None, Ok(())) => Err(StoreError::Closed.into()),
        };
        let _ = self.reply.send(out);
    }
}

struct Inner {
    path: PathBuf,
    jobs: Mutex<Option<mpsc::Sender<Box<dyn Job>>>>,
    writer: Mutex<Option<JoinHandle<()>>>,
    readers: Mutex<ReaderPool>,
    /// Signalled when a reader connection goes back to the pool.
    reader_returned: std::sync::Condvar,
    max_readers: usize,
    sync: SyncMode,
    busy_timeout: Duration,
    /// The id of the newest committed event; subscribers wait on changes.
    published: watch::Sender<i64>,
}

/// Idle reader connections and how many exist in all (idle + lent out).
#[derive(Default)]
struct ReaderPool {
    idle: Vec<Connection>,
    open: usize,
}

/// How long a read waits for a pooled connection before opening an extra one (a read nested
/// in another read must never wait for itself).
const READER_WAIT: Duration = Duration::from_millis(2);

/// How the store opens its connections (taken from [`Config`]).
#[derive(Debug, Clone)]
pub struct StoreOptions {
    pub sync: SyncMode,
    pub busy_timeout: Duration,
    pub readers: usize,
    pub group_commit_max: usize,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions::from(&Config::default())
    }
}

impl From<&Config> for StoreOptions {
    fn from(c: &Config) -> Self {
        StoreOptions {
            sync: c.sync,
            busy_timeout: Duration::from_millis(c.busy_timeout_ms),
            readers: c.reader_connections,
            group_commit_max: c.group_commit_max,
        }
    }
}

/// Handle to the database. Cheap to clone; all clones share the writer and the readers.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("path", &self.inner.path)
            .finish()
    }
}

/// Makes sure `dir` exists and that we can create files in it.
///
/// The data dir holds every prompt and answer, so from here on this process creates private
/// files whatever the umask it was started with: it sets the umask to 077 (files 0600,
/// directories 0700, the CLIs it runs inherit it) and creates the data dir 0700. A data dir or
/// file that is already wider is reported by [`wider_than_private`] at start-up.
pub fn prepare_data_dir(dir: &Path) -> Result<()> {
    private_umask();
    let err = |source| StoreError::DataDir {
        path: dir.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(err)?;
    let probe = dir.join(format!(".ksi-write-probe-{}", std::process::id()));
    std::fs::write(&probe, b"").map_err(err)?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

/// Sets this process's umask to 077: what it creates is readable by its user only.
pub fn private_umask() {
    // SAFETY: umask only swaps the process's file-creation mask; it cannot fail.
    unsafe {
        libc::umask(0o077);
    }
}

/// Entries under `dir` (itself included) that other users may read or write (any group or
/// other permission bit), at most `max` of them, and how many entries were looked at. Symbolic
/// links are not followed (their own mode means nothing).
pub fn wider_than_private(dir: &Path, max: usize) -> (Vec<(PathBuf, u32)>, usize) {
    use std::os::unix::fs::PermissionsExt;
    let mut wide = Vec::new();
    let mut seen = 0usize;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(p) = stack.pop() {
        let Ok(meta) = std::fs::symlink_metadata(&p) else {
            continue;
        };
        seen += 1;
        let mode = meta.permissions().mode() & 0o7777;
        if meta.file_type().is_symlink() {
            continue;
        }
        if mode & 0o077 != 0 && wide.len() < max {
            wide.push((p.clone(), mode));
        }
        if meta.is_dir()
            && let Ok(entries) = std::fs::read_dir(&p)
        {
            stack.extend(entries.flatten().map(|e| e.path()));
        }
    }
    (wide, seen)
}

/// Checks that an existing, non-empty file starts with the SQLite header.
fn check_header(path: &Path) -> Result<()> {
    let mut header = [0u8; 16];
    let mut file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(StoreError::DataDir {
                path: path.to_path_buf(),
                source,
            });
        }
    };
    let n = file
        .read(&mut header)
        .map_err(|source| StoreError::DataDir {
            path: path.to_path_buf(),
            source,
        })?;
    if n == 0 {
        return Ok(());
    }
    if n < 16 || &header != b"SQLite format 3\0" {
        return Err(StoreError::NotADatabase {
            path: path.to_path_buf(),
        });
    }
    Ok(())
}

fn configure(conn: &Connection, sync: SyncMode, busy: Duration) -> Result<()> {
    conn.busy_timeout(busy)?;
    // Room for every statement of the hot paths (see [`ExecCached`]).
    conn.set_prepared_statement_cache_capacity(128);
    conn.pragma_update(None, "foreign_keys", "ON")?;
    conn.pragma_update(
        None,
        "synchronous",
        match sync {
            SyncMode::Full => "FULL",
            SyncMode::Normal => "NORMAL",
        },
    )?;
    conn.pragma_update(None, "temp_store", "MEMORY")?;
    conn.pragma_update(None, "cache_size", -16_000)?;
    crate::bus::register_sql_functions(conn)?;
    Ok(())
}

impl Store {
    /// Opens (creating if needed, with mode 0600) the database of `config`, applies pending
    /// migrations and starts the writer thread.
    ///
    /// # Errors
    /// The data dir is not writable, the file is not SQLite, the schema is newer than this
    /// binary, or a migration failed. In the last three cases the file is left untouched.
    pub fn open(config: &Config) -> Result<Store> {
        prepare_data_dir(&config.data_dir)?;
        Self::open_path(&config.db_path(), &StoreOptions::from(config))
    }

    /// Opens the database at `path` (see [`Store::open`]).
    pub fn open_path(path: &Path, opts: &StoreOptions) -> Result<Store> {
        let (sync, busy_timeout, max_readers) = (opts.sync, opts.busy_timeout, opts.readers);
        check_header(path)?;
        if !path.exists() {
            OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .or_else(|e| {
                    if e.kind() == std::io::ErrorKind::AlreadyExists {
                        std::fs::File::open(path)
                    } else {
                        Err(e)
                    }
                })
                .map_err(|source| StoreError::DataDir {
                    path: path.to_path_buf(),
                    source,
                })?;
        }
        let mut conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        conn.busy_timeout(busy_timeout)?;
        // Look before touching anything: switching to WAL rewrites the header.
        let found: i64 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .map_err(|e| match e.sqlite_error_code() {
                Some(rusqlite::ErrorCode::NotADatabase) => StoreError::NotADatabase {
                    path: path.to_path_buf(),
                },
                _ => StoreError::Sqlite(e),
            })?;
        if found > SCHEMA_VERSION {
            return Err(StoreError::SchemaTooNew {
                path: path.to_path_buf(),
                found,
                known: SCHEMA_VERSION,
            });
        }
        let mode: String =
            conn.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            tracing::warn!(%mode, "could not switch the database to WAL mode");
        }
        configure(&conn, sync, busy_timeout)?;
        migrate::apply(&mut conn, path)?;

        let (published, _) = watch::channel(Self::max_event_id(&conn)?);
        let (tx, rx) = mpsc::channel::<Box<dyn Job>>();
        let inner = Arc::new(Inner {
            path: path.to_path_buf(),
            jobs: Mutex::new(Some(tx)),
            writer: Mutex::new(None),
            readers: Mutex::new(ReaderPool::default()),
            reader_returned: std::sync::Condvar::new(),
            max_readers: max_readers.max(1),
            sync,
            busy_timeout,
            published,
        });
        let published = inner.published.clone();
        let group_max = opts.group_commit_max.max(1);
        // Checkpoints run beside the writer, not inside its commits.
        conn.pragma_update(None, "wal_autocheckpoint", 0)?;
        let checkpointer = Checkpointer::start(path.to_path_buf(), busy_timeout);
        // With synchronous=FULL the fsync moves to the syncer thread (same durability, the
        // writer never waits for the disk). Needs WAL mode: the WAL file is what gets synced.
        let syncer = if sync == SyncMode::Full && mode.eq_ignore_ascii_case("wal") {
            let mut wal = path.as_os_str().to_owned();
            wal.push("-wal");
            let syncer =
                Syncer::start(PathBuf::from(wal), inner.published.clone()).map_err(|e| {
                    StoreError::CommitFailed(format!("cannot start the sync thread: {e}"))
                })?;
            conn.pragma_update(None, "synchronous", "NORMAL")?;
            Some(syncer)
        } else {
            None
        };
        let handle = std::thread::Builder::new()
            .name("ksi-store-writer".into())
            .spawn(move || writer_loop(conn, rx, published, group_max, checkpointer, syncer))
            .map_err(|e| {
                StoreError::CommitFailed(format!("cannot start the writer thread: {e}"))
            })?;
        *inner.writer.lock().unwrap() = Some(handle);
        Ok(Store { inner })
    }

    fn max_event_id(conn: &Connection) -> Result<i64> {
        Ok(
            conn.query_row("SELECT COALESCE(MAX(id), 0) FROM messages", [], |r| {
                r.get(0)
            })?,
        )
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    fn submit<T, E, F>(
        &self,
        durable: bool,
        f: F,
    ) -> std::result::Result<oneshot::Receiver<Result<T, E>>, E>
    where
        T: Send + 'static,
        E: From<StoreError> + Send + 'static,
        F: FnOnce(&Tx<'_>) -> std::result::Result<T, E> + Send + 'static,
    {
        let (reply, rx) = oneshot::channel();
        let job = Box::new(WriteJob {
            durable,
            f: Some(f),
            out: None,
            reply,
        });
        let jobs = self.inner.jobs.lock().unwrap();
        match jobs.as_ref() {
            Some(sender) if sender.send(job).is_ok() => Ok(rx),
            _ => Err(StoreError::Closed.into()),
        }
    }

    /// Runs `f` in a write transaction and resolves once it is durably committed.
    ///
    /// # Errors
    /// Whatever `f` returns (its changes are rolled back), or a commit failure (nothing of the
    /// batch was saved).
    pub async fn write<T, E, F>(&self, f: F) -> std::result::Result<T, E>
    where
        T: Send + 'static,
        E: From<StoreError> + Send + 'static,
        F: FnOnce(&Tx<'_>) -> std::result::Result<T, E> + Send + 'static,
    {
        let rx = self.submit(true, f)?;
        rx.await.unwrap_or_else(|_| Err(StoreError::Closed.into()))
    }

    /// Like [`Store::write`], but answers once committed, without waiting for the disk: a power
    /// loss (not a crash of KSI) may undo it. For state that is safe to lose, such as claim
    /// leases (a lost claim just makes the event claimable again).
    pub async fn write_relaxed<T, E, F>(&self, f: F) -> std::result::Result<T, E>
    where
        T: Send + 'static,
        E: From<StoreError> + Send + 'static,
        F: FnOnce(&Tx<'_>) -> std::result::Result<T, E> + Send + 'static,
    {
        let rx = self.submit(false, f)?;
        rx.await.unwrap_or_else(|_| Err(StoreError::Closed.into()))
    }

    /// [`Store::write`] for synchronous callers. Must not be called from an async task.
    pub fn write_blocking<T, E, F>(&self, f: F) -> std::result::Result<T, E>
    where
        T: Send + 'static,
        E: From<StoreError> + Send + 'static,
        F: FnOnce(&Tx<'_>) -> std::result::Result<T, E> + Send + 'static,
    {
        let rx = self.submit(true, f)?;
        rx.blocking_recv()
            .unwrap_or_else(|_| Err(StoreError::Closed.into()))
    }

    /// Runs a query on a reader connection (blocking; use [`Store::read_async`] from tasks).
    pub fn read<T, E, F>(&self, f: F) -> std::result::Result<T, E>
    where
        E: From<StoreError>,
        F: FnOnce(&Connection) -> std::result::Result<T, E>,
    {
        let (conn, pooled) = self.take_reader().map_err(E::from)?;
        let out = f(&conn);
        if pooled {
            self.inner.readers.lock().unwrap().idle.push(conn);
            self.inner.reader_returned.notify_one();
        }
        out
    }

    /// [`Store::read`] on the blocking thread pool.
    pub async fn read_async<T, E, F>(&self, f: F) -> std::result::Result<T, E>
    where
        T: Send + 'static,
        E: From<StoreError> + Send + 'static,
        F: FnOnce(&Connection) -> std::result::Result<T, E> + Send + 'static,
    {
        let store = self.clone();
        tokio::task::spawn_blocking(move || store.read(f))
            .await
            .unwrap_or_else(|e| Err(StoreError::Panicked(e.to_string()).into()))
    }

    /// A reader connection and whether it belongs to the pool. Connections are opened lazily
    /// up to `max_readers` and kept (a fresh one parses the schema and has no statement cache);
    /// when all are lent out a read waits for one, and after [`READER_WAIT`] opens an extra
    /// connection that is closed after use.
    fn take_reader(&self) -> Result<(Connection, bool)> {
        let deadline = std::time::Instant::now() + READER_WAIT;
        let mut pool = self.inner.readers.lock().unwrap();
        let pooled = loop {
            if let Some(conn) = pool.idle.pop() {
                return Ok((conn, true));
            }
            if pool.open < self.inner.max_readers {
                pool.open += 1;
                break true;
            }
            let now = std::time::Instant::now();
            if now >= deadline {
                break false;
            }
            pool = self
                .inner
                .reader_returned
                .wait_timeout(pool, deadline - now)
                .unwrap()
                .0;
        };
        drop(pool);
        let opened = Connection::open_with_flags(
            &self.inner.path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(StoreError::from)
        .and_then(|conn| {
            configure(&conn, self.inner.sync, self.inner.busy_timeout)?;
            Ok(conn)
        });
        match opened {
            Ok(conn) => Ok((conn, pooled)),
            Err(e) => {
                if pooled {
                    self.inner.readers.lock().unwrap().open -= 1;
                    self.inner.reader_returned.notify_one();
                }
                Err(e)
            }
        }
    }

    /// A receiver that changes whenever a commit published events; its value is the newest
    /// event id.
    pub fn published(&self) -> watch::Receiver<i64> {
        self.inner.published.subscribe()
    }

    /// Tells in-process subscribers about events committed by another process.
    pub fn notify_external(&self, newest_id: i64) {
        self.inner.published.send_if_modified(|cur| {
            if newest_id > *cur {
                *cur = newest_id;
                true
            } else {
                false
            }
        });
    }

    /// Stops accepting writes, lets queued writes commit, and joins the writer thread.
    pub fn close(&self) {
        self.inner.jobs.lock().unwrap().take();
        if let Some(handle) = self.inner.writer.lock().unwrap().take() {
            let _ = handle.join();
        }
        let mut pool = self.inner.readers.lock().unwrap();
        pool.open -= pool.idle.len();
        pool.idle.clear();
    }

    /// A cheap liveness check of the database (a query on a reader connection).
    pub fn ping(&self) -> Result<()> {
        self.read(|c| {
            c.query_row("SELECT COUNT(*) FROM sqlite_master", [], |r| {
                r.get::<_, i64>(0)
            })?;
            Ok::<_, StoreError>(())
        })
    }

    /// The id of the newest committed event known to this process.
    pub fn published_id(&self) -> i64 {
        *self.inner.published.borrow()
    }

    /// Runs `PRAGMA integrity_check` on a reader and returns its verdict (`"ok"` when sound).
    pub fn integrity_check(&self) -> Result<String> {
        self.read(|c| Ok::<_, StoreError>(c.query_row("PRAGMA integrity_check", [], |r| r.get(0))?))
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.jobs.lock().unwrap().take();
        if let Some(handle) = self.writer.lock().unwrap().take() {
            let _ = handle.join();
        }
    }
}

fn bump(published: &watch::Sender<i64>, newest: i64) {
    if newest > 0 {
        published.send_if_modified(|cur| {
            if newest > *cur {
                *cur = newest;
                true
            } else {
                false
            }
        });
    }
}

fn writer_loop(
    conn: Connection,
    rx: mpsc::Receiver<Box<dyn Job>>,
    published: watch::Sender<i64>,
    group_max: usize,
    checkpointer: Checkpointer,
    syncer: Option<Syncer>,
) {
    let mut batch: Vec<Box<dyn Job>> = Vec::with_capacity(group_max);
    while let Ok(first) = rx.recv() {
        batch.push(first);
        while batch.len() < group_max {
            match rx.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        begin_immediate(&conn);
        let mut newest = 0;
        let mut rolled_back: Option<(usize, CommitError)> = None;
        for (i, job) in batch.iter_mut().enumerate() {
            let tx = Tx {
                conn: &conn,
                last_event_id: Cell::new(0),
            };
            if let Err(e) = exec_cached(&conn, "SAVEPOINT job") {
                tracing::error!(error = %e, "cannot open a savepoint");
            }
            if job.run(&tx) {
                let _ = exec_cached(&conn, "RELEASE job");
                newest = newest.max(tx.last_event_id.get());
            } else {
                // The failing statement's code, before the rollback below replaces it.
                // SAFETY: reads the error code of a connection this thread owns.
                let failed_full = unsafe { rusqlite::ffi::sqlite3_errcode(conn.handle()) }
                    == rusqlite::ffi::SQLITE_FULL;
                let _ = exec_cached(&conn, "ROLLBACK TO job");
                let _ = exec_cached(&conn, "RELEASE job");
                if conn.is_autocommit() {
                    // SQLite rolled the whole transaction back (it may, after a full disk or
                    // an I/O error): the jobs before this one went with it. They fail; the
                    // rest of the batch goes on in a new transaction.
                    let disk_full = failed_full
                        || conn
                            .path()
                            .and_then(|p| Path::new(p).parent().map(Path::to_path_buf))
                            .and_then(|dir| fs_free_bytes(&dir))
                            .is_some_and(|free| free < 1 << 20);
                    tracing::error!(
                        jobs = i,
                        disk_full,
                        "SQLite rolled back the transaction after a statement failed"
                    );
                    rolled_back = Some((
                        i,
                        CommitError {
                            message:
                                "SQLite rolled the transaction back after a statement in it failed"
                                    .into(),
                            disk_full,
                        },
                    ));
                    newest = 0;
                    begin_immediate(&conn);
                }
            }
        }
        if let Some((lost, e)) = rolled_back.take() {
            for job in batch.drain(..lost) {
                job.finish(Err(e.clone()));
            }
        }
        let commit = exec_cached(&conn, "COMMIT").map_err(|e| {
            let disk_full = e.sqlite_error_code() == Some(rusqlite::ErrorCode::DiskFull);
            tracing::error!(error = %e, jobs = batch.len(), disk_full, "commit failed; the batch was rolled back");
            let _ = conn.execute_batch("ROLLBACK");
            CommitError {
                message: e.to_string(),
                disk_full,
            }
        });
        let Some(syncer) = syncer.as_ref().filter(|_| commit.is_ok()) else {
            // synchronous=FULL on the connection (or a failed commit): done now.
            if commit.is_ok() {
                bump(&published, newest);
                checkpointer.poke();
            }
            for job in batch.drain(..) {
                job.finish(commit.clone());
            }
            continue;
        };
        checkpointer.poke();
        // Relaxed jobs are answered now; durable ones once the syncer's fsync covers this
        // commit. Meanwhile the writer goes on with the next batch (pipelined group commit).
        let (durable, relaxed): (Vec<_>, Vec<_>) = batch.drain(..).partition(|j| j.durable());
        for job in relaxed {
            job.finish(Ok(()));
        }
        if durable.is_empty() && newest == 0 {
            continue;
        }
        syncer.submit(durable, newest);
    }
}

/// Makes commits durable off the writer thread: the writer commits with
/// `synchronous=NORMAL` (WAL frames written, not fsynced) and hands the batch here; one
/// `fdatasync` of the WAL then covers every commit made before it started, and only then are
/// the batch's callers answered and subscribers woken. The writer never waits for the disk, so
/// the next batch builds while the previous one syncs.
struct Syncer {
    state: Arc<(Mutex<SyncQueue>, std::sync::Condvar)>,
    thread: Option<JoinHandle<()>>,
}

#[derive(Default)]
struct SyncQueue {
    jobs: Vec<Box<dyn Job>>,
    newest: i64,
    stop: bool,
}

impl Syncer {
    fn start(wal: PathBuf, published: watch::Sender<i64>) -> std::io::Result<Syncer> {
        let state = Arc::new((Mutex::new(SyncQueue::default()), std::sync::Condvar::new()));
        let shared = state.clone();
        let thread = std::thread::Builder::new()
            .name("ksi-store-sync".into())
            .spawn(move || {
                let (lock, cvar) = &*shared;
                let mut file: Option<std::fs::File> = None;
                loop {
                    let (jobs, newest) = {
                        let mut q = lock.lock().unwrap();
                        while q.jobs.is_empty() && q.newest == 0 && !q.stop {
                            q = cvar.wait(q).unwrap();
                        }
                        if q.jobs.is_empty() && q.newest == 0 && q.stop {
                            return;
                        }
                        (std::mem::take(&mut q.jobs), std::mem::take(&mut q.newest))
                    };
                    let synced = (|| {
                        if file.is_none() {
                            file = Some(OpenOptions::new().read(true).open(&wal)?);
                        }
                        file.as_ref().unwrap().sync_data()
                    })();
                    let outcome = synced.map_err(|e| {
                        tracing::error!(error = %e, wal = %wal.display(), "fsync of the WAL failed");
                        file = None;
                        CommitError {
                            message: format!("the commit could not be made durable (fsync of {}: {e})", wal.display()),
                            disk_full: io_is_disk_full(&e),
                        }
                    });
                    if outcome.is_ok() {
                        bump(&published, newest);
                    }
                    for job in jobs {
                        job.finish(outcome.clone());
                    }
                }
            })?;
        Ok(Syncer {
            state,
            thread: Some(thread),
        })
    }

    fn submit(&self, jobs: Vec<Box<dyn Job>>, newest: i64) {
        let (lock, cvar) = &*self.state;
        let mut q = lock.lock().unwrap();
        q.jobs.extend(jobs);
        q.newest = q.newest.max(newest);
        cvar.notify_one();
    }
}

impl Drop for Syncer {
    fn drop(&mut self) {
        let (lock, cvar) = &*self.state;
        lock.lock().unwrap().stop = true;
        cvar.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// `execute` through the connection's prepared-statement cache: the statements of the hot
/// paths (a Claude call, a workflow step) run thousands of times, and preparing one costs more
/// than running it.
pub trait ExecCached {
    /// Like [`Connection::execute`], with the statement prepared once per connection.
    fn exec<P: rusqlite::Params>(&self, sql: &str, params: P) -> rusqlite::Result<usize>;
}

impl ExecCached for Connection {
    fn exec<P: rusqlite::Params>(&self, sql: &str, params: P) -> rusqlite::Result<usize> {
        self.prepare_cached(sql)?.execute(params)
    }
}

fn exec_cached(conn: &Connection, sql: &str) -> rusqlite::Result<()> {
    conn.prepare_cached(sql)?.execute([]).map(|_| ())
}

/// Runs WAL checkpoints on its own connection and thread, so the writer never stalls copying
/// pages back into the database file (SQLite's automatic checkpoint would run inside a commit).
struct Checkpointer {
    state: Arc<(Mutex<CheckpointState>, std::sync::Condvar)>,
}

#[derive(Default)]
struct CheckpointState {
    commits: u64,
    stop: bool,
}

/// Commits between checkpoint attempts.
const CHECKPOINT_EVERY_COMMITS: u64 = 200;

impl Checkpointer {
    fn start(path: PathBuf, busy: Duration) -> Checkpointer {
        let state = Arc::new((
            Mutex::new(CheckpointState::default()),
            std::sync::Condvar::new(),
        ));
        let shared = state.clone();
        let spawned = std::thread::Builder::new()
            .name("ksi-store-checkpoint".into())
            .spawn(move || {
                let conn = match Connection::open(&path) {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::error!(error = %e, "checkpointer cannot open the database; SQLite will checkpoint in commits");
                        return;
                    }
                };
                let _ = conn.busy_timeout(busy);
                let (lock, cvar) = &*shared;
                loop {
                    {
                        let mut st = lock.lock().unwrap();
                        while st.commits < CHECKPOINT_EVERY_COMMITS && !st.stop {
                            // Idle: sleep until enough commits happened (no timer, no CPU).
                            st = cvar.wait(st).unwrap();
                        }
                        if st.stop {
                            return;
                        }
                        st.commits = 0;
                    }
                    if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
                        tracing::warn!(error = %e, "WAL checkpoint failed; will retry");
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the checkpoint thread");
        }
        Checkpointer { state }
    }

    fn poke(&self) {
        let (lock, cvar) = &*self.state;
        let mut st = lock.lock().unwrap();
        st.commits += 1;
        if st.commits >= CHECKPOINT_EVERY_COMMITS {
            cvar.notify_one();
        }
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        let (lock, cvar) = &*self.state;
        lock.lock().unwrap().stop = true;
        cvar.notify_one();
    }
}

/// `BEGIN IMMEDIATE`, waiting out other processes' write locks for as long as it takes.
fn begin_immediate(conn: &Connection) {
    let mut delay = Duration::from_millis(5);
    loop {
        match conn.execute_batch("BEGIN IMMEDIATE") {
            Ok(()) => return,
            Err(e) => {
                tracing::warn!(error = %e, "database busy; retrying the write transaction");
                std::thread::sleep(delay);
                delay = (delay * 2).min(Duration::from_millis(500));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn temp_store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let opts = StoreOptions {
            sync: SyncMode::Normal,
            ..StoreOptions::default()
        };
        let store = Store::open_path(&dir.path().join("ksi.db"), &opts).unwrap();
        (dir, store)
    }

    #[test]
    fn database_file_is_created_with_mode_0600() {
        use std::os::unix::fs::PermissionsExt;
        let (dir, _store) = temp_store();
        let mode = std::fs::metadata(dir.path().join("ksi.db"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn a_failing_job_rolls_back_only_itself() {
        let (_dir, store) = temp_store();
        let s1 = store.clone();
        let ok = std::thread::spawn(move || {
            s1.write_blocking(|tx| {
                tx.execute(
                    "INSERT INTO config(key, value, updated_at) VALUES ('a', '1', 0)",
                    [],
                )?;
                Ok::<_, StoreError>(())
            })
        });
        let failed: Result<()> = store.write_blocking(|tx| {
            tx.execute(
                "INSERT INTO config(key, value, updated_at) VALUES ('b', '1', 0)",
                [],
            )?;
            Err(StoreError::Closed)
        });
        assert!(failed.is_err());
        ok.join().unwrap().unwrap();
        let keys: Vec<String> = store
            .read(|c| {
                let mut st = c.prepare("SELECT key FROM config ORDER BY key")?;
                let rows = st.query_map([], |r| r.get(0))?;
                Ok::<_, StoreError>(rows.collect::<Result<_, _>>()?)
            })
            .unwrap();
        assert_eq!(keys, vec!["a".to_string()]);
    }

    /// A database that cannot grow (`max_page_count`: what a full disk looks like to SQLite):
    /// the failures say "disk full", every write answered Ok is stored, every one answered Err
    /// left nothing, and writes succeed again once there is room.
    #[tokio::test]
    async fn a_full_database_refuses_writes_as_disk_full_and_answers_each_truthfully()
    -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let store = Store::open_path(&dir.path().join("ksi.db"), &StoreOptions::default())?;
        let pages: i64 = store
            .read(|c| Ok::<_, StoreError>(c.query_row("PRAGMA page_count", [], |r| r.get(0))?))?;
        store
            .write(move |tx| {
                tx.query_row(
                    &format!("PRAGMA max_page_count = {}", pages + 8),
                    [],
                    |_| Ok(()),
                )?;
                Ok::<_, StoreError>(())
            })
            .await?;
        let big = "x".repeat(3000);
        let mut waits = Vec::new();
        for i in 0..200 {
            let (s, v) = (store.clone(), big.clone());
            waits.push(tokio::spawn(async move {
                let r = s
                    .write(move |tx| {
                        tx.execute(
                            "INSERT INTO config(key, value, updated_at) VALUES (?1, ?2, 0)",
                            rusqlite::params![format!("k{i}"), v],
                        )?;
                        Ok::<_, StoreError>(())
                    })
                    .await;
                (format!("k{i}"), r)
            }));
        }
        let (mut ok, mut full) = (Vec::new(), 0);
        for w in waits {
            match w.await? {
                (k, Ok(())) => ok.push(k),
                (_, Err(e)) => {
                    assert!(e.is_disk_full(), "a full database is a full disk: {e}");
                    assert!(e.to_string().contains("Free space"), "{e}");
                    full += 1;
                }
            }
        }
        assert!(
            full > 0 && !ok.is_empty(),
            "{} stored, {full} refused",
            ok.len()
        );
        let mut stored: Vec<String> = store.read(|c| {
            let mut st = c.prepare("SELECT key FROM config WHERE key LIKE 'k%'")?;
            let rows = st.query_map([], |r| r.get(0))?;
            Ok::<_, StoreError>(rows.collect::<Result<_, _>>()?)
        })?;
        stored.sort();
        ok.sort();
        assert_eq!(stored, ok, "exactly the writes answered Ok are stored");
        // Room again (the setting lives on the writer's connection).
        store
            .write(|tx| {
                tx.query_row("PRAGMA max_page_count = 1073741823", [], |_| Ok(()))?;
                tx.execute(
                    "INSERT INTO config(key, value, updated_at) VALUES ('after', '1', 0)",
                    [],
                )?;
                Ok::<_, StoreError>(())
            })
            .await?;
        Ok(())
    }

    #[tokio::test]
    async fn durable_writes_with_the_sync_thread_are_answered_and_visible() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let store = Store::open_path(&dir.path().join("ksi.db"), &StoreOptions::default())?;
        let mut waits = Vec::new();
        for i in 0..200 {
            let s = store.clone();
            waits.push(tokio::spawn(async move {
                s.write(move |tx| {
                    tx.execute(
                        "INSERT INTO config(key, value, updated_at) VALUES (?1, '1', 0)",
                        [format!("k{i}")],
                    )?;
                    Ok::<_, StoreError>(())
                })
                .await
            }));
        }
        for w in waits {
            w.await??;
        }
        let relaxed: i64 = store
            .write_relaxed(|tx| {
                Ok::<_, StoreError>(tx.query_row("SELECT COUNT(*) FROM config", [], |r| r.get(0))?)
            })
            .await?;
        assert_eq!(relaxed, 200);
        store.close();
        // Reopen: everything answered is there.
        let store = Store::open_path(&dir.path().join("ksi.db"), &StoreOptions::default())?;
        let n: i64 = store.read(|c| {
            Ok::<_, StoreError>(c.query_row("SELECT COUNT(*) FROM config", [], |r| r.get(0))?)
        })?;
        assert_eq!(n, 200);
        Ok(())
    }

    #[test]
    fn a_panicking_job_is_reported_and_the_writer_survives() {
        let (_dir, store) = temp_store();
        let r: Result<()> = store.write_blocking(|_tx| panic!("boom"));
        assert!(
            matches!(r, Err(StoreError::Panicked(ref m)) if m == "boom"),
            "{r:?}"
        );
        let r: Result<i64> =
            store.write_blocking(|tx| Ok(tx.query_row("SELECT 1", [], |r| r.get(0))?));
        assert_eq!(r.unwrap(), 1);
    }
}
