//! The plugins built from `plugins/` by `host/build.rs`: their paths (for tests and benchmarks)
//! and the bundled handlers' bytes, installed into a data directory's `plugins/`.

use std::path::Path;

include!(concat!(env!("OUT_DIR"), "/bundled_plugins.rs"));

/// The handlers that ship with KSI: (file name, component bytes).
pub const BUNDLED: &[(&str, &[u8])] = &[
    (
        "debate.wasm",
        include_bytes!(concat!(env!("OUT_DIR"), "/debate.wasm")),
    ),
    (
        "summarize.wasm",
        include_bytes!(concat!(env!("OUT_DIR"), "/summarize.wasm")),
    ),
    (
        "analysis.wasm",
        include_bytes!(concat!(env!("OUT_DIR"), "/analysis.wasm")),
    ),
    (
        "collaboration.wasm",
        include_bytes!(concat!(env!("OUT_DIR"), "/collaboration.wasm")),
    ),
    (
        "teaching.wasm",
        include_bytes!(concat!(env!("OUT_DIR"), "/teaching.wasm")),
    ),
    (
        "echo.wasm",
        include_bytes!(concat!(env!("OUT_DIR"), "/echo.wasm")),
    ),
];

/// Write the bundled handlers into `plugins_dir` (atomically; files that already hold the same
/// bytes are left alone). Returns the files written.
///
/// # Errors
///
/// When the directory or a file cannot be written.
pub fn install_bundled(plugins_dir: &Path) -> std::io::Result<Vec<std::path::PathBuf>> {
    std::fs::create_dir_all(plugins_dir)?;
    let mut written = Vec::new();
    for (name, bytes) in BUNDLED {
        let path = plugins_dir.join(name);
        if std::fs::read(&path).is_ok_and(|existing| existing == *bytes) {
            continue;
        }
        let mut tmp = tempfile::NamedTempFile::new_in(plugins_dir)?;
        std::io::Write::write_all(&mut tmp, bytes)?;
        tmp.as_file().sync_all()?;
        tmp.persist(&path).map_err(|e| e.error)?;
        written.push(path);
    }
    Ok(written)
}
