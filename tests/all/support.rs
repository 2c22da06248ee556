//! Helpers shared by the end-to-end tests.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Path of a binary of this package, built by cargo for the integration tests.
pub fn bin(name: &str) -> PathBuf {
    match name {
        "ksi-host" => PathBuf::from(env!("CARGO_BIN_EXE_ksi-host")),
        "ksi" => PathBuf::from(env!("CARGO_BIN_EXE_ksi")),
        "fake-claude" => PathBuf::from(env!("CARGO_BIN_EXE_fake-claude")),
        other => panic!("unknown binary {other}"),
    }
}

/// `ksi-host --data-dir DIR ARGS...`, run to completion.
pub fn ksi_host(data_dir: &Path, args: &[&str]) -> Output {
    Command::new(bin("ksi-host"))
        .arg("--data-dir")
        .arg(data_dir)
        .args(args)
        .env_remove("KSI_DATA_DIR")
        .output()
        .expect("run ksi-host")
}

/// Stdout and stderr as text, for assertion messages.
pub fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// sha256 of a file's bytes (to prove it was left untouched).
pub fn file_digest(path: &Path) -> Vec<u8> {
    use std::hash::{Hash, Hasher};
    let bytes = std::fs::read(path).unwrap_or_default();
    let mut h = std::collections::hash_map::DefaultHasher::new();
    bytes.hash(&mut h);
    let mut out = h.finish().to_le_bytes().to_vec();
    out.extend((bytes.len() as u64).to_le_bytes());
    out
}
