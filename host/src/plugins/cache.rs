//! Compiled plugins on disk (`<data>/cache/`), so that a restart loads without recompiling.
//!
//! A cache entry is named `<sha256 of the .wasm>-<engine compatibility hash>.cwasm`: a new
//! plugin, a new wasmtime or different engine settings miss the cache instead of loading code
//! compiled for something else. Entries are written atomically (temp file, fsync, rename) and end
//! with a SHA-256 of their contents, checked before use.

use std::hash::{Hash, Hasher};
use std::io::Write;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use wasmtime::Engine;
use wasmtime::component::Component;

/// The on-disk cache of compiled components.
#[derive(Debug, Clone)]
pub struct CompiledCache {
    dir: PathBuf,
    engine_hash: String,
}

impl CompiledCache {
    /// A cache in `dir` (created if missing) for code compiled by `engine`.
    ///
    /// # Errors
    ///
    /// When `dir` cannot be created.
    pub fn new(dir: impl Into<PathBuf>, engine: &Engine) -> std::io::Result<CompiledCache> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir)?;
        let mut hasher = Sha256Hasher(Sha256::new());
        engine.precompile_compatibility_hash().hash(&mut hasher);
        let engine_hash = hex::encode(&hasher.0.finalize()[..8]);
        Ok(CompiledCache { dir, engine_hash })
    }

    /// The cache directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where the entry for a `.wasm` with this SHA-256 lives.
    pub fn entry_path(&self, wasm_sha256: &str) -> PathBuf {
        self.dir
            .join(format!("{wasm_sha256}-{}.cwasm", self.engine_hash))
    }

    /// The compiled component for a `.wasm` with this SHA-256, if cached and intact.
    /// A corrupt or incompatible entry is removed and reported as a miss.
    pub fn load(&self, engine: &Engine, wasm_sha256: &str) -> Option<Component> {
        let path = self.entry_path(wasm_sha256);
        let bytes = std::fs::read(&path).ok()?;
        let intact = bytes.len() > 32 && {
            let (code, sum) = bytes.split_at(bytes.len() - 32);
            Sha256::digest(code).as_slice() == sum
        };
        if !intact {
            tracing::warn!(path = %path.display(), "corrupt plugin cache entry; recompiling");
            let _ = std::fs::remove_file(&path);
            return None;
        }
        // SAFETY: `Component::deserialize` trusts its input to be code that wasmtime compiled;
        // loading arbitrary bytes could run arbitrary native code. These bytes come only from
        // our own cache directory, written by `store` below from `Component::serialize` output
        // (atomically, so never half-written), and their trailing SHA-256 has just been checked,
        // so they are exactly what we wrote. Anyone able to replace them can already write the
        // data directory and the daemon's binary's inputs. Wasmtime additionally checks the
        // version and engine settings recorded in the artifact and refuses a mismatch.
        match unsafe { Component::deserialize(engine, &bytes[..bytes.len() - 32]) } {
            Ok(component) => Some(component),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "unusable plugin cache entry; recompiling");
                let _ = std::fs::remove_file(&path);
                None
            }
        }
    }

    /// Store a compiled component for a `.wasm` with this SHA-256.
    ///
    /// # Errors
    ///
    /// When serializing or writing fails; the cache is then simply missing this entry.
    pub fn store(&self, wasm_sha256: &str, component: &Component) -> std::io::Result<()> {
        let code = component
            .serialize()
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        let mut tmp = tempfile::NamedTempFile::new_in(&self.dir)?;
        tmp.write_all(&code)?;
        tmp.write_all(&Sha256::digest(&code))?;
        tmp.as_file().sync_all()?;
        tmp.persist(self.entry_path(wasm_sha256))
            .map_err(|e| e.error)?;
        // Make the rename itself durable.
        std::fs::File::open(&self.dir)?.sync_all()
    }
}

/// Feeds `Hash` output into SHA-256, so the key is stable across runs and Rust versions.
struct Sha256Hasher(Sha256);

impl Hasher for Sha256Hasher {
    fn finish(&self) -> u64 {
        let digest = self.0.clone().finalize();
        u64::from_le_bytes(digest[..8].try_into().unwrap())
    }

    fn write(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }
}
