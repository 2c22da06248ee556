//! The API token: the file `<data dir>/api.token` (mode 0600, one line).
//!
//! When the file exists, every request over TCP must carry `Authorization: Bearer <token>`;
//! the Unix socket is trusted (its file permissions guard it). The daemon re-reads the file
//! when it changes (a `stat` per request, compared by inode, size and mtime), so
//! `ksi-host token rotate` takes effect without a restart.

use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::Context;
use sha2::{Digest, Sha256};

/// File name of the token inside the data dir.
pub const TOKEN_FILE: &str = "api.token";

/// Path of the token file of `data_dir`.
pub fn token_path(data_dir: &Path) -> PathBuf {
    data_dir.join(TOKEN_FILE)
}

/// A short, non-secret name of a token for logs and the audit log: `token:` and the first
/// 8 hex digits of its sha256.
pub fn token_id(token: &str) -> String {
    format!(
        "token:{}",
        &hex::encode(Sha256::digest(token.as_bytes()))[..8]
    )
}

/// Reads the token of `data_dir`; `None` when there is no token file.
///
/// # Errors
/// The file exists but cannot be read, or holds no token.
pub fn read(data_dir: &Path) -> anyhow::Result<Option<String>> {
    let path = token_path(data_dir);
    match std::fs::read_to_string(&path) {
        Ok(text) => parse(&text)
            .map(Some)
            .with_context(|| format!("reading the API token {}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| {
            format!(
                "reading the API token {} (run this as the daemon's user)",
                path.display()
            )
        }),
    }
}

fn parse(text: &str) -> anyhow::Result<String> {
    let token = text.trim();
    anyhow::ensure!(
        !token.is_empty(),
        "the file is empty: write a new token with `ksi-host token rotate`"
    );
    anyhow::ensure!(
        !token.contains(char::is_whitespace),
        "the token must be one line without spaces: write a new one with `ksi-host token rotate`"
    );
    Ok(token.to_string())
}

/// Writes a new random token (256 bits, hex) to the token file — a temp file with mode 0600,
/// synced, then renamed over the old one, so a reader sees the old token or the new one,
/// never half of one — and returns it.
///
/// # Errors
/// The data dir cannot be written.
pub fn rotate(data_dir: &Path) -> anyhow::Result<String> {
    let token = hex::encode(rand::random::<[u8; 32]>());
    let path = token_path(data_dir);
    let tmp = data_dir.join(format!(".{TOKEN_FILE}.{}.tmp", std::process::id()));
    let write = || -> std::io::Result<()> {
        let _ = std::fs::remove_file(&tmp);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        writeln!(f, "{token}")?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        std::fs::File::open(data_dir)?.sync_all()
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        anyhow::anyhow!(
            "writing the API token {}: {e}. Run this as the daemon's user, on an existing data dir",
            path.display()
        )
    })?;
    Ok(token)
}

/// Whether a token file is readable by others than its owner (it should be mode 0600).
pub fn too_open(data_dir: &Path) -> Option<u32> {
    let mode = std::fs::metadata(token_path(data_dir))
        .ok()?
        .permissions()
        .mode();
    (mode & 0o077 != 0).then_some(mode & 0o777)
}

/// The token as the daemon currently knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenState {
    /// No token file: TCP requests need no token (the daemon listens on loopback only).
    Absent,
    /// A token: its sha256 (what presented tokens are compared with) and its id.
    Present { digest: [u8; 32], id: String },
    /// The file exists but cannot be used; every TCP request is refused with this message.
    Broken(String),
}

/// What a presented token is worth.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// No token is configured.
    Open,
    /// The token is right; the id names it.
    Valid(String),
    /// A token is configured and none was presented.
    Missing,
    /// A token was presented and it is not the current one.
    Wrong,
    /// The token file is unusable (the message says why).
    Broken(String),
}

/// What identifies a version of the token file: inode, size, mtime (s, ns).
type FileStamp = (u64, u64, i64, i64);

/// The token file, re-read whenever it changes.
#[derive(Debug)]
pub struct TokenFile {
    path: PathBuf,
    cache: Mutex<(Option<FileStamp>, TokenState)>,
}

impl TokenFile {
    /// The token file of `data_dir` (read lazily, at the first request).
    pub fn new(data_dir: &Path) -> TokenFile {
        TokenFile {
            path: token_path(data_dir),
            cache: Mutex::new((None, TokenState::Absent)),
        }
    }

    /// The path of the file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The current state: one `stat`, and a read only when the file changed.
    pub fn state(&self) -> TokenState {
        let stamp = match std::fs::metadata(&self.path) {
            Ok(m) => Some((m.ino(), m.size(), m.mtime(), m.mtime_nsec())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => {
                return TokenState::Broken(format!(
                    "the daemon cannot read its token file {}: {e}",
                    self.path.display()
                ));
            }
        };
        let mut cache = self.cache.lock().unwrap();
        if cache.0 == stamp && stamp.is_some() {
            return cache.1.clone();
        }
        let state = match stamp {
            None => TokenState::Absent,
            Some(_) => match std::fs::read_to_string(&self.path)
                .map_err(anyhow::Error::from)
                .and_then(|t| parse(&t))
            {
                Ok(token) => TokenState::Present {
                    digest: Sha256::digest(token.as_bytes()).into(),
                    id: token_id(&token),
                },
                Err(e) => TokenState::Broken(format!(
                    "the daemon's token file {} is unusable: {e}",
                    self.path.display()
                )),
            },
        };
        if cache.1 != state {
            match &state {
                TokenState::Present { id, .. } => tracing::info!(token = %id, "API token loaded"),
                TokenState::Absent => tracing::info!("no API token file: TCP requests are open"),
                TokenState::Broken(m) => tracing::error!("{m}"),
            }
        }
        *cache = (stamp, state.clone());
        state
    }

    /// Checks a presented token (`None` when the request carried none).
    pub fn verify(&self, presented: Option<&str>) -> Verdict {
        match (self.state(), presented) {
            (TokenState::Absent, _) => Verdict::Open,
            (TokenState::Broken(m), _) => Verdict::Broken(m),
            (TokenState::Present { .. }, None) => Verdict::Missing,
            (TokenState::Present { digest, id }, Some(p)) => {
                // Comparing digests keeps the comparison's time independent of the token.
                let d: [u8; 32] = Sha256::digest(p.as_bytes()).into();
                if d.iter()
                    .zip(digest.iter())
                    .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                    == 0
                {
                    Verdict::Valid(id)
                } else {
                    Verdict::Wrong
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotate_writes_a_private_one_line_token_and_replaces_the_old_one() {
        let dir = tempfile::tempdir().unwrap();
        let first = rotate(dir.path()).unwrap();
        assert_eq!(first.len(), 64);
        let mode = std::fs::metadata(token_path(dir.path()))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(read(dir.path()).unwrap().as_deref(), Some(first.as_str()));
        let second = rotate(dir.path()).unwrap();
        assert_ne!(first, second);
        assert_eq!(read(dir.path()).unwrap(), Some(second));
        assert_eq!(too_open(dir.path()), None);
    }

    #[test]
    fn the_token_file_is_reread_when_it_changes() {
        let dir = tempfile::tempdir().unwrap();
        let file = TokenFile::new(dir.path());
        assert_eq!(file.verify(None), Verdict::Open);
        let old = rotate(dir.path()).unwrap();
        assert_eq!(file.verify(None), Verdict::Missing);
        assert_eq!(file.verify(Some(&old)), Verdict::Valid(token_id(&old)));
        let new = rotate(dir.path()).unwrap();
        assert_eq!(file.verify(Some(&old)), Verdict::Wrong);
        assert_eq!(file.verify(Some(&new)), Verdict::Valid(token_id(&new)));
    }

    #[test]
    fn an_empty_token_file_refuses_everything_with_a_reason() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(token_path(dir.path()), "\n").unwrap();
        let file = TokenFile::new(dir.path());
        match file.verify(Some("x")) {
            Verdict::Broken(m) => assert!(m.contains("ksi-host token rotate"), "{m}"),
            other => panic!("{other:?}"),
        }
        assert!(format!("{:#}", read(dir.path()).unwrap_err()).contains("empty"));
    }
}
