//! The file-reference store: large data lives in files under the data dir; rows hold a
//! [`FileRef`] `{path, line?, offset?, sha256, bytes}` to it.
//!
//! The order of operations is the promise: a file is written to a temp file, fsynced, renamed
//! into place (and its directory fsynced) and hashed BEFORE the row that references it commits.
//! A crash therefore leaves at worst an orphan file, never a row that points at nothing.
//! Reads verify the hash, and references that would escape the data dir are refused.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The directories KSI keeps under its data dir.
pub const LAYOUT: &[&str] = &[
    "claude_logs",
    "prompts/queue",
    "prompts/archive",
    "prompts/templates",
    "state/workflows",
    "state/shared",
    "plugins",
    "cache",
];

/// A pointer from a row to data in a file. `path` is relative to the data dir.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileRef {
    pub path: String,
    /// 1-based line number for a JSONL entry; absent for a whole file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub line: Option<u64>,
    /// Byte offset of the line, so reading it needs no scan.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
    /// Hex sha256 of the file (or of the line, without its newline).
    pub sha256: String,
    pub bytes: u64,
}

/// Errors of the reference store.
#[derive(Debug, thiserror::Error)]
pub enum RefError {
    #[error(
        "file reference {path:?} is refused: {why}. References are paths relative to the data dir, without '..'"
    )]
    Escapes { path: String, why: &'static str },
    #[error(
        "{path} does not match its reference (sha256 {expected}): the reference is wrong, or the file was changed or corrupted after it was written"
    )]
    HashMismatch {
        path: String,
        expected: String,
        found: String,
    },
    #[error("{path} has no line {line} (it has {lines})")]
    NoSuchLine { path: String, line: u64, lines: u64 },
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

/// Result alias for reference operations.
pub type Result<T, E = RefError> = std::result::Result<T, E>;

/// Hex sha256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Files under one data dir.
#[derive(Clone, Debug)]
pub struct Refs {
    root: PathBuf,
    /// Line counts of JSONL files we append to, so an append knows its line number without a scan.
    jsonl: Arc<Mutex<HashMap<PathBuf, Arc<Mutex<JsonlState>>>>>,
    /// Per directory, the renames into it and how many of them an fsync has covered.
    dir_syncs: Arc<Mutex<HashMap<PathBuf, Arc<DirSync>>>>,
    /// Directories already found to be inside the data dir (no symlink out on their way), so
    /// resolving a path in one of them needs one `lstat`, not a `readlink` per component.
    inside_dirs: Arc<Mutex<std::collections::HashSet<PathBuf>>>,
}

/// Bound of the per-path caches (line counts, verified directories): past it, entries not in
/// use are dropped, so a daemon that writes millions of session logs keeps a small map.
const CACHE_BOUND: usize = 1024;

/// Group commit for renames: one fsync of a directory makes durable every rename into it that
/// finished before the fsync started, so writers that rename into one directory at once (50
/// Claude calls queueing their prompts) share one fsync instead of paying one each.
#[derive(Debug, Default)]
struct DirSync {
    /// Renames into the directory, counted once each has finished.
    renamed: std::sync::atomic::AtomicU64,
    /// How many of them are durable; held while an fsync runs, so the others wait for it.
    synced: Mutex<u64>,
}

#[derive(Debug)]
struct JsonlState {
    lines: u64,
    len: u64,
}

impl DirSync {
    /// Called after a rename into the directory has finished: runs `fsync` (of the directory)
    /// unless an fsync that started after that rename has already succeeded.
    fn after_rename(&self, fsync: impl FnOnce() -> std::io::Result<()>) -> std::io::Result<()> {
        use std::sync::atomic::Ordering;
        let mine = self.renamed.fetch_add(1, Ordering::SeqCst) + 1;
        let mut synced = self.synced.lock().unwrap();
        if *synced >= mine {
            return Ok(());
        }
        // Every rename counted so far has finished, so this fsync covers all of them.
        let upto = self.renamed.load(Ordering::SeqCst);
        fsync()?;
        *synced = upto;
        Ok(())
    }
}

impl Refs {
    /// The reference store rooted at `data_dir`; creates the layout directories.
    ///
    /// # Errors
    /// The directories cannot be created.
    pub fn open(data_dir: &Path) -> Result<Refs> {
        for dir in LAYOUT {
            let p = data_dir.join(dir);
            std::fs::create_dir_all(&p).map_err(|source| RefError::Io {
                path: p.display().to_string(),
                source,
            })?;
        }
        let root = data_dir.canonicalize().map_err(|source| RefError::Io {
            path: data_dir.display().to_string(),
            source,
        })?;
        Ok(Refs {
            root,
            jsonl: Arc::default(),
            dir_syncs: Arc::default(),
            inside_dirs: Arc::default(),
        })
    }

    /// Makes a rename or link into `dir` (finished before this call) durable: fsyncs the
    /// directory unless an fsync that started after it already did (concurrent renames into one
    /// directory share one fsync).
    ///
    /// # Errors
    /// The directory cannot be opened or fsynced.
    pub fn sync_dir_entry(&self, dir: &Path) -> std::io::Result<()> {
        let ds = self
            .dir_syncs
            .lock()
            .unwrap()
            .entry(dir.to_path_buf())
            .or_default()
            .clone();
        ds.after_rename(|| File::open(dir)?.sync_all())
    }

    /// The data dir (canonical).
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Resolves a relative reference path to a file inside the data dir.
    ///
    /// # Errors
    /// [`RefError::Escapes`] for absolute paths, `..`, or a symlink that leads outside.
    pub fn resolve(&self, rel: &str) -> Result<PathBuf> {
        let bad = |why| {
            Err(RefError::Escapes {
                path: rel.to_string(),
                why,
            })
        };
        if rel.is_empty() {
            return bad("it is empty");
        }
        let p = Path::new(rel);
        for c in p.components() {
            match c {
                Component::Normal(_) => {}
                Component::CurDir => {}
                Component::ParentDir => return bad("it contains '..'"),
                Component::RootDir | Component::Prefix(_) => return bad("it is absolute"),
            }
        }
        let full = self.root.join(p);
        let parent = full.parent().expect("a joined relative path has a parent");
        if self.inside_dirs.lock().unwrap().contains(parent) {
            // Only the last component can still lead out: one lstat tells.
            match std::fs::symlink_metadata(&full) {
                Ok(m) if !m.file_type().is_symlink() => return Ok(full),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(full),
                _ => {}
            }
        }
        // Follow symlinks of whatever exists (the file, or its nearest existing ancestor).
        let mut probe = full.as_path();
        loop {
            match probe.canonicalize() {
                Ok(real) => {
                    if !real.starts_with(&self.root) {
                        return bad("it leads outside the data dir through a symlink");
                    }
                    break;
                }
                Err(_) => match probe.parent() {
                    Some(parent) => probe = parent,
                    None => break,
                },
            }
        }
        if parent
            .canonicalize()
            .is_ok_and(|real| real.starts_with(&self.root))
        {
            let mut known = self.inside_dirs.lock().unwrap();
            if known.len() >= CACHE_BOUND {
                known.clear();
            }
            known.insert(parent.to_path_buf());
        }
        Ok(full)
    }

    /// [`Refs::resolve`], with the directory of the file created if it is missing.
    fn resolve_creating_dir(&self, rel: &str) -> Result<PathBuf> {
        let full = self.resolve(rel)?;
        let dir = full.parent().expect("resolved paths have a parent");
        std::fs::create_dir_all(dir).map_err(|source| RefError::Io {
            path: rel.to_string(),
            source,
        })?;
        Ok(full)
    }

    /// Writes a whole file atomically (temp, fsync, rename, fsync dir) and returns its reference.
    pub fn write(&self, rel: &str, bytes: &[u8]) -> Result<FileRef> {
        let full = self.resolve_creating_dir(rel)?;
        let io = |source| RefError::Io {
            path: rel.to_string(),
            source,
        };
        let dir = full.parent().expect("resolved paths have a parent");
        let tmp = dir.join(format!(
            ".{}.tmp-{}",
            full.file_name().unwrap().to_string_lossy(),
            rand::random::<u64>()
        ));
        let result = (|| {
            let mut f = File::create(&tmp)?;
            f.write_all(bytes)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &full)?;
            self.sync_dir_entry(dir)
        })();
        if let Err(e) = result {
            let _ = std::fs::remove_file(&tmp);
            return Err(io(e));
        }
        Ok(FileRef {
            path: rel.to_string(),
            line: None,
            offset: None,
            sha256: sha256_hex(bytes),
            bytes: bytes.len() as u64,
        })
    }

    /// Creates an empty file at `rel` unless one is there, with its directory entry durable
    /// (concurrent creations in one directory share the fsync): later appends to it need only
    /// fsync their data.
    ///
    /// # Errors
    /// The path escapes the data dir, or the file or its directory cannot be created.
    pub fn create_durable(&self, rel: &str) -> Result<()> {
        let full = self.resolve_creating_dir(rel)?;
        let io = |source| RefError::Io {
            path: rel.to_string(),
            source,
        };
        let dir = full.parent().expect("resolved paths have a parent");
        match OpenOptions::new().write(true).create_new(true).open(&full) {
            Ok(_) => self.sync_dir_entry(dir).map_err(io),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
            Err(e) => Err(io(e)),
        }
    }

    /// Appends one line (no newline inside) to a JSONL file, fsyncs it, and returns the
    /// reference of that line (1-based `line`, byte `offset`, hash of the line).
    pub fn append_line(&self, rel: &str, line: &[u8]) -> Result<FileRef> {
        let mut refs = self.append_lines(rel, &[line])?;
        Ok(refs.pop().expect("one line in, one reference out"))
    }

    /// Appends several lines with one write and one fsync (a Claude response and its envelope),
    /// returning the reference of each, in order.
    pub fn append_lines(&self, rel: &str, lines: &[&[u8]]) -> Result<Vec<FileRef>> {
        let full = self.resolve_creating_dir(rel)?;
        let io = |source| RefError::Io {
            path: rel.to_string(),
            source,
        };
        if lines.iter().any(|l| l.contains(&b'\n')) {
            return Err(io(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "a JSONL entry must not contain a newline",
            )));
        }
        let state = self.jsonl_state(&full);
        let mut st = state.lock().unwrap();
        let dir = full.parent().expect("resolved paths have a parent");
        // A file this call creates needs its directory entry made durable as well, or the
        // references to its lines could outlive the file itself after a power loss.
        let (mut f, created) = match OpenOptions::new().append(true).read(true).open(&full) {
            Ok(f) => (f, false),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let f = OpenOptions::new()
                    .create(true)
                    .append(true)
                    .read(true)
                    .open(&full)
                    .map_err(io)?;
                (f, true)
            }
            Err(e) => return Err(io(e)),
        };
        let len = f.metadata().map_err(io)?.len();
        if st.lines == u64::MAX || st.len != len {
            // First use, or someone else wrote the file: count its lines once.
            let (lines, ends_with_newline) = count_lines(&full).map_err(io)?;
            if !ends_with_newline && len > 0 {
                // A torn last line from a crash: terminate it so ours starts clean.
                f.write_all(b"\n").map_err(io)?;
            }
            st.lines = lines;
            st.len = f.metadata().map_err(io)?.len();
        }
        let mut buf = Vec::with_capacity(lines.iter().map(|l| l.len() + 1).sum());
        let mut out = Vec::with_capacity(lines.len());
        for line in lines {
            out.push(FileRef {
                path: rel.to_string(),
                line: Some(st.lines + out.len() as u64 + 1),
                offset: Some(st.len + buf.len() as u64),
                sha256: sha256_hex(line),
                bytes: line.len() as u64,
            });
            buf.extend_from_slice(line);
            buf.push(b'\n');
        }
        f.write_all(&buf).map_err(io)?;
        f.sync_data().map_err(io)?;
        if created {
            self.sync_dir_entry(dir).map_err(io)?;
        }
        st.lines += lines.len() as u64;
        st.len += buf.len() as u64;
        Ok(out)
    }

    /// The line count kept for the JSONL file at `full` (unknown until first counted).
    fn jsonl_state(&self, full: &Path) -> Arc<Mutex<JsonlState>> {
        let mut map = self.jsonl.lock().unwrap();
        if map.len() >= CACHE_BOUND && !map.contains_key(full) {
            // Forget the files nobody is appending to right now; they are counted again if
            // appended to later.
            map.retain(|_, st| Arc::strong_count(st) > 1);
        }
        map.entry(full.to_path_buf())
            .or_insert_with(|| {
                Arc::new(Mutex::new(JsonlState {
                    lines: u64::MAX,
                    len: 0,
                }))
            })
            .clone()
    }

    /// Reads what a reference points at and verifies its hash.
    ///
    /// # Errors
    /// [`RefError::HashMismatch`] when the content changed, [`RefError::Escapes`] for paths
    /// outside the data dir, I/O errors naming the file.
    pub fn read(&self, r: &FileRef) -> Result<Vec<u8>> {
        let full = self.resolve(&r.path)?;
        let io = |source| RefError::Io {
            path: r.path.clone(),
            source,
        };
        let data = match (r.line, r.offset) {
            (None, _) => std::fs::read(&full).map_err(io)?,
            (Some(_), Some(offset)) => {
                let mut f = File::open(&full).map_err(io)?;
                f.seek(SeekFrom::Start(offset)).map_err(io)?;
                let mut buf = vec![0u8; r.bytes as usize];
                f.read_exact(&mut buf).map_err(io)?;
                buf
            }
            (Some(line), None) => {
                let f = BufReader::new(File::open(&full).map_err(io)?);
                let mut n = 0;
                let mut found = None;
                for l in f.split(b'\n') {
                    n += 1;
                    let l = l.map_err(io)?;
                    if n == line {
                        found = Some(l);
                        break;
                    }
                }
                found.ok_or(RefError::NoSuchLine {
                    path: r.path.clone(),
                    line,
                    lines: n,
                })?
            }
        };
        let found = sha256_hex(&data);
        if found != r.sha256 {
            return Err(RefError::HashMismatch {
                path: r.path.clone(),
                expected: r.sha256.clone(),
                found,
            });
        }
        Ok(data)
    }
}

fn count_lines(path: &Path) -> std::io::Result<(u64, bool)> {
    let mut f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((0, true)),
        Err(e) => return Err(e),
    };
    let mut buf = vec![0u8; 64 * 1024];
    let (mut lines, mut last) = (0u64, b'\n');
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        lines += buf[..n].iter().filter(|&&b| b == b'\n').count() as u64;
        last = buf[n - 1];
    }
    let ends = last == b'\n';
    Ok((if ends { lines } else { lines + 1 }, ends))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refs() -> (tempfile::TempDir, Refs) {
        let dir = tempfile::tempdir().unwrap();
        let refs = Refs::open(dir.path()).unwrap();
        (dir, refs)
    }

    #[test]
    fn layout_directories_exist() {
        let (dir, _r) = refs();
        for d in LAYOUT {
            assert!(dir.path().join(d).is_dir(), "{d}");
        }
    }

    #[test]
    fn write_then_read_round_trips_with_hash() {
        let (_d, r) = refs();
        let f = r
            .write("state/workflows/w1/step_1.json", b"{\"a\":1}")
            .unwrap();
        assert_eq!(f.bytes, 7);
        assert_eq!(f.sha256, sha256_hex(b"{\"a\":1}"));
        assert_eq!(r.read(&f).unwrap(), b"{\"a\":1}");
    }

    #[test]
    fn jsonl_append_returns_line_numbers_and_reads_by_line() {
        let (_d, r) = refs();
        let a = r
            .append_line("claude_logs/s1.jsonl", br#"{"n":1}"#)
            .unwrap();
        let b = r
            .append_line("claude_logs/s1.jsonl", br#"{"n":2}"#)
            .unwrap();
        assert_eq!((a.line, b.line), (Some(1), Some(2)));
        assert_eq!(r.read(&b).unwrap(), br#"{"n":2}"#);
        // Without the offset, the line is found by scanning.
        let scan = FileRef {
            offset: None,
            ..b.clone()
        };
        assert_eq!(r.read(&scan).unwrap(), br#"{"n":2}"#);
        // A fresh store (a restart) continues the numbering.
        let r2 = Refs::open(r.root()).unwrap();
        let c = r2
            .append_line("claude_logs/s1.jsonl", br#"{"n":3}"#)
            .unwrap();
        assert_eq!(c.line, Some(3));
    }

    #[test]
    fn a_torn_last_line_does_not_merge_with_the_next_append() {
        let (d, r) = refs();
        std::fs::write(
            d.path().join("claude_logs/t.jsonl"),
            b"{\"a\":1}\n{\"torn\":",
        )
        .unwrap();
        let f = r.append_line("claude_logs/t.jsonl", b"{\"b\":2}").unwrap();
        assert_eq!(f.line, Some(3));
        assert_eq!(r.read(&f).unwrap(), b"{\"b\":2}");
    }

    #[test]
    fn hash_mismatch_is_detected() {
        let (d, r) = refs();
        let f = r.write("state/shared/k.json", b"original").unwrap();
        std::fs::write(d.path().join("state/shared/k.json"), b"tampered").unwrap();
        let err = r.read(&f).unwrap_err();
        assert!(matches!(err, RefError::HashMismatch { .. }), "{err}");
        assert!(err.to_string().contains("state/shared/k.json"));
    }

    #[test]
    fn references_that_escape_the_data_dir_are_refused() {
        let (d, r) = refs();
        for bad in ["../etc/passwd", "/etc/passwd", "state/../../x", ""] {
            let err = r.resolve(bad).unwrap_err();
            assert!(matches!(err, RefError::Escapes { .. }), "{bad}: {err}");
        }
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret"), b"s").unwrap();
        std::os::unix::fs::symlink(outside.path(), d.path().join("state/shared/link")).unwrap();
        let err = r.resolve("state/shared/link/secret").unwrap_err();
        assert!(err.to_string().contains("symlink"), "{err}");
        let f = FileRef {
            path: "state/shared/link/secret".into(),
            line: None,
            offset: None,
            sha256: sha256_hex(b"s"),
            bytes: 1,
        };
        assert!(r.read(&f).is_err());
        assert!(r.write("state/shared/link/new", b"x").is_err());
        assert!(!outside.path().join("new").exists());
    }

    #[test]
    fn a_symlink_out_is_refused_in_a_directory_already_resolved() {
        let (d, r) = refs();
        // The first resolve walks the path and remembers state/shared as inside.
        r.write("state/shared/plain", b"p").unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret"), b"s").unwrap();
        std::os::unix::fs::symlink(
            outside.path().join("secret"),
            d.path().join("state/shared/leak"),
        )
        .unwrap();
        let err = r.resolve("state/shared/leak").unwrap_err();
        assert!(err.to_string().contains("symlink"), "{err}");
        // A symlink that stays inside is followed as before.
        std::os::unix::fs::symlink("plain", d.path().join("state/shared/alias")).unwrap();
        assert!(r.resolve("state/shared/alias").is_ok());
        assert!(r.resolve("state/shared/not-yet").is_ok());
    }

    #[test]
    fn line_counts_of_many_logs_stay_bounded_and_right() {
        let (_d, r) = refs();
        let n = CACHE_BOUND + 100;
        for i in 0..n {
            r.append_line(&format!("claude_logs/s{i}.jsonl"), b"{}")
                .unwrap();
        }
        assert!(r.jsonl.lock().unwrap().len() <= CACHE_BOUND);
        // A log whose count was dropped is counted again: the next line is still line 2.
        let again = r.append_line("claude_logs/s0.jsonl", b"{\"x\":1}").unwrap();
        assert_eq!(again.line, Some(2));
        assert_eq!(r.read(&again).unwrap(), b"{\"x\":1}");
    }

    #[test]
    fn renames_that_finish_while_a_directory_fsync_runs_share_the_next_one() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::sync::{Barrier, mpsc};
        let ds = Arc::new(DirSync::default());
        let fsyncs = Arc::new(AtomicUsize::new(0));
        let (inside_tx, inside_rx) = mpsc::channel();
        let release = Arc::new(Barrier::new(2));
        // A slow fsync in progress: the renames below finish after it started.
        let first = {
            let (ds, fsyncs, release) = (ds.clone(), fsyncs.clone(), release.clone());
            std::thread::spawn(move || {
                ds.after_rename(|| {
                    fsyncs.fetch_add(1, Ordering::SeqCst);
                    inside_tx.send(()).unwrap();
                    release.wait();
                    Ok(())
                })
            })
        };
        inside_rx.recv().unwrap();
        let waiting: Vec<_> = (0..5)
            .map(|_| {
                let (ds, fsyncs) = (ds.clone(), fsyncs.clone());
                std::thread::spawn(move || {
                    ds.after_rename(|| {
                        fsyncs.fetch_add(1, Ordering::SeqCst);
                        Ok(())
                    })
                })
            })
            .collect();
        // All five have counted their rename before the first fsync ends.
        while ds.renamed.load(Ordering::SeqCst) < 6 {
            std::thread::yield_now();
        }
        release.wait();
        first.join().unwrap().unwrap();
        for w in waiting {
            w.join().unwrap().unwrap();
        }
        assert_eq!(
            fsyncs.load(Ordering::SeqCst),
            2,
            "one fsync, then one for the five"
        );
        assert_eq!(*ds.synced.lock().unwrap(), 6);
    }

    #[test]
    fn a_failed_directory_fsync_covers_nothing() {
        let ds = DirSync::default();
        let err = ds
            .after_rename(|| Err(std::io::Error::other("EIO")))
            .unwrap_err();
        assert_eq!(err.to_string(), "EIO");
        let mut again = 0;
        ds.after_rename(|| {
            again += 1;
            Ok(())
        })
        .unwrap();
        assert_eq!(again, 1, "the next rename syncs again");
        assert_eq!(*ds.synced.lock().unwrap(), 2);
    }
}
