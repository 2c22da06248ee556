//! Starts the Claude CLIs at a lower CPU priority than the daemon (`claude.nice`).
//!
//! A CLI is a node program that burns about half a second of CPU while it starts; fifty of them
//! starting at once on a small machine would starve the daemon's own threads: the API, the bus
//! and the bookkeeping of those very calls. A niced CLI loses nothing on an idle machine and
//! yields to the daemon on a busy one. Linux keeps the nice value per thread and a child
//! inherits its spawning thread's, so the CLIs are spawned from a few threads that run at the
//! wanted value: the child has its priority from its first instruction. (A `setpriority` after
//! the spawn arrives too late for a short run, and in the child between `fork` and `exec` it
//! would force the slow `fork` path instead of `posix_spawn`, see `guardian.rs`.)

use std::collections::HashMap;
use std::io;
use std::sync::mpsc;
use std::sync::{Arc, LazyLock, Mutex};

use tokio::process::{Child, Command};
use tokio::sync::oneshot;

/// Threads per nice value: spawns overlap (each holds its thread until the child has exec'd).
const THREADS_PER_VALUE: usize = 2;

type Job = Box<dyn FnOnce() + Send>;

/// The spawning threads, by nice value (created on first use of a value: `claude.nice` can
/// change at run time, and a thread cannot take back the priority it gave up).
static POOLS: LazyLock<Mutex<HashMap<i32, mpsc::Sender<Job>>>> = LazyLock::new(Mutex::default);

/// Spawns `cmd` `nice` steps below the calling thread's priority, as `nice -n` would (0: on
/// the calling thread, as any spawn). Must be called inside a tokio runtime (the child is
/// registered with it for `wait`).
///
/// # Errors
/// The spawn failed, or no spawning thread could be started.
pub async fn spawn_niced(mut cmd: Command, nice: i32) -> io::Result<Child> {
    if nice <= 0 {
        return cmd.spawn();
    }
    // SAFETY: getpriority has no preconditions; on Linux it reads the calling thread's value.
    let base = unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) };
    let nice = (base + nice).min(19);
    let runtime = tokio::runtime::Handle::current();
    let (reply, answer) = oneshot::channel();
    let job: Job = Box::new(move || {
        let _in_runtime = runtime.enter();
        let _ = reply.send(cmd.spawn());
    });
    pool(nice)?
        .send(job)
        .map_err(|_| io::Error::other("the Claude CLI spawning thread is gone"))?;
    answer
        .await
        .unwrap_or_else(|_| Err(io::Error::other("the Claude CLI spawning thread died")))
}

/// The queue of the threads that run at `nice`, started on first use.
fn pool(nice: i32) -> io::Result<mpsc::Sender<Job>> {
    let mut pools = POOLS.lock().unwrap();
    if let Some(tx) = pools.get(&nice) {
        return Ok(tx.clone());
    }
    let (tx, rx) = mpsc::channel::<Job>();
    let rx = Arc::new(Mutex::new(rx));
    for i in 0..THREADS_PER_VALUE {
        let rx = rx.clone();
        std::thread::Builder::new()
            .name(format!("ksi-spawn-n{nice}-{i}"))
            .spawn(move || {
                // SAFETY: setpriority on this thread's own id; no memory is involved.
                let set = unsafe {
                    libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, nice)
                };
                if set != 0 {
                    tracing::warn!(nice, error = %io::Error::last_os_error(), "cannot lower the priority of the Claude CLI spawning thread");
                }
                loop {
                    let job = rx.lock().unwrap().recv();
                    match job {
                        Ok(job) => job(),
                        Err(_) => return,
                    }
                }
            })?;
    }
    pools.insert(nice, tx.clone());
    Ok(tx)
}

/// The nice value of process (or thread) `pid` (`/proc/<pid>/stat` field 19).
pub fn nice_of(pid: u32) -> Option<i32> {
    super::orphan::stat_field(pid, 19)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sleeper() -> Command {
        let mut cmd = Command::new("sleep");
        cmd.arg("5").kill_on_drop(true);
        cmd
    }

    #[tokio::test]
    async fn a_niced_child_has_its_priority_from_the_start_and_the_daemon_keeps_its_own() {
        let mine = nice_of(std::process::id()).unwrap();
        let child = spawn_niced(sleeper(), 7).await.unwrap();
        assert_eq!(nice_of(child.id().unwrap()), Some((mine + 7).min(19)));
        assert_eq!(
            nice_of(std::process::id()),
            Some(mine),
            "only the spawning threads"
        );
        let plain = spawn_niced(sleeper(), 0).await.unwrap();
        assert_eq!(nice_of(plain.id().unwrap()), Some(mine));
    }

    #[tokio::test]
    async fn a_spawn_that_fails_reports_the_error() {
        let err = spawn_niced(Command::new("/nonexistent/claude"), 5)
            .await
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
    }
}
