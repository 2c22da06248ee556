//! Named points where a test build stops the daemon as `kill -9` would, so tests can crash it
//! exactly between two commits (`KSI_CRASH_AT=<point>`). Release builds compile them to nothing.

/// Kills this process with SIGKILL when `KSI_CRASH_AT` names `point` (debug builds only).
#[inline]
pub fn crash_point(point: &str) {
    #[cfg(debug_assertions)]
    {
        static AT: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
        let at = AT.get_or_init(|| std::env::var("KSI_CRASH_AT").ok());
        if at.as_deref() == Some(point) {
            eprintln!("KSI_CRASH_AT={point}: killing the daemon here (test build)");
            // SAFETY: raise(2) with a valid signal number; nothing of ours is touched.
            unsafe { libc::raise(libc::SIGKILL) };
        }
    }
    #[cfg(not(debug_assertions))]
    let _ = point;
}
