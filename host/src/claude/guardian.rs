//! The guardian: a tiny process that kills the Claude CLI process groups of a daemon that died.
//!
//! No Claude process may outlive the daemon that started it, even one killed by SIGKILL (its
//! answer would be paid for and never read). The classic tool is `PR_SET_PDEATHSIG`, but it
//! has to run in the child between `fork` and `exec`, which forces the slow spawn path: a
//! `fork` copies the page tables of the whole daemon (wasmtime reserves a lot), and every page
//! the daemon writes afterwards takes a copy-on-write fault. Measured in a daemon running a
//! debate: 2.0 ms per spawn with `fork` + `PR_SET_PDEATHSIG`, 1.0 ms with `posix_spawn` (a
//! `vfork`), and about 1.5 ms less CPU per call in `ksi-host bench executor`.
//!
//! So the executor spawns with `posix_spawn` and registers each CLI's process group here. The
//! guardian is forked once, reads 8-byte records (`+pgid` / `-pgid`) from a pipe whose only
//! writer is the daemon, and when that pipe ends (the daemon exited, however it died) it sends
//! SIGKILL to every group still registered, then exits. It ignores SIGINT/SIGTERM/SIGHUP, so a
//! Ctrl-C or `systemctl stop` reaches it only through the daemon. A child spawned in the few
//! microseconds before its registration is covered by the start-up reconciliation instead
//! (`orphan.rs`), as are the groups of a guardian that could not be started (the executor then
//! falls back to `PR_SET_PDEATHSIG`).
//!
//! After `fork` the child runs only async-signal-safe calls (`read`, `kill`, `close`, `dup2`,
//! `signal`, `_exit`) on memory it owns: the daemon has other threads, so the child must not
//! allocate or take locks.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Mutex;

/// Most groups one guardian tracks at once; more are left to the start-up reconciliation.
const CAPACITY: usize = 4096;

/// What the guardian ignores: a Ctrl-C or `systemctl stop` reaches it only through the daemon.
const IGNORED: [i32; 4] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGPIPE];

const WATCH: i32 = 1;
const RELEASE: i32 = 2;

/// The daemon's side of a running guardian.
#[derive(Debug)]
pub struct Guardian {
    pid: libc::pid_t,
    /// Write end of the pipe; `None` once the guardian is gone (it died or was told to stop).
    pipe: Mutex<Option<OwnedFd>>,
}

impl Guardian {
    /// Forks the guardian.
    ///
    /// # Errors
    /// The pipe or `/dev/null` cannot be opened, or the fork failed.
    pub fn start() -> io::Result<Guardian> {
        let mut fds = [0; 2];
        // SAFETY: pipe2 writes two fds into the array it is given.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: both fds were just created and are owned by nobody else.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let devnull = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/null")?;
        // The signals the guardian ignores are blocked across the fork, so none can reach it
        // before it has set them to be ignored (this thread gets them once unblocked).
        // SAFETY: sigset operations on local values; the child only runs `guardian_main`,
        // which uses async-signal-safe calls on its own stack and never returns.
        let pid = unsafe {
            let mut block: libc::sigset_t = std::mem::zeroed();
            let mut old: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut block);
            for sig in IGNORED {
                libc::sigaddset(&mut block, sig);
            }
            libc::pthread_sigmask(libc::SIG_BLOCK, &block, &mut old);
            let pid = libc::fork();
            if pid == 0 {
                guardian_main(
                    read.as_raw_fd(),
                    write.as_raw_fd(),
                    devnull.as_raw_fd(),
                    &old,
                );
            }
            libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
            pid
        };
        if pid < 0 {
            return Err(io::Error::last_os_error());
        }
        drop(read);
        tracing::debug!(pid, "started the Claude process guardian");
        Ok(Guardian {
            pid,
            pipe: Mutex::new(Some(write)),
        })
    }

    /// The guardian's pid.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Registers process group `pgid`: it is killed if the daemon dies before [`release`].
    /// False when the guardian is gone (the caller should then rely on other means).
    ///
    /// [`release`]: Guardian::release
    pub fn watch(&self, pgid: i32) -> bool {
        self.send(WATCH, pgid)
    }

    /// Forgets process group `pgid` (it ended, or was killed by the daemon).
    pub fn release(&self, pgid: i32) {
        self.send(RELEASE, pgid);
    }

    fn send(&self, op: i32, pgid: i32) -> bool {
        if pgid <= 1 {
            return false;
        }
        let mut record = [0u8; 8];
        record[..4].copy_from_slice(&op.to_ne_bytes());
        record[4..].copy_from_slice(&pgid.to_ne_bytes());
        let mut pipe = self.pipe.lock().unwrap();
        let Some(fd) = pipe.as_ref() else {
            return false;
        };
        // 8 bytes < PIPE_BUF: the write is atomic. SIGPIPE is ignored by Rust programs, so a
        // dead guardian shows as EPIPE.
        // SAFETY: writes 8 bytes from a live buffer to an fd we own.
        let n = unsafe { libc::write(fd.as_raw_fd(), record.as_ptr().cast(), record.len()) };
        if n == record.len() as isize {
            return true;
        }
        tracing::warn!(
            guardian = self.pid,
            error = %io::Error::last_os_error(),
            "the Claude process guardian is gone; Claude processes started from now on die with the daemon by PR_SET_PDEATHSIG"
        );
        *pipe = None;
        false
    }

    /// Whether the guardian still listens.
    pub fn alive(&self) -> bool {
        self.pipe.lock().unwrap().is_some()
    }
}

impl Drop for Guardian {
    /// Closing the pipe makes the guardian kill what is still registered and exit; it is then
    /// reaped here so no zombie is left.
    fn drop(&mut self) {
        self.pipe.lock().unwrap().take();
        // SAFETY: waits for our own child.
        unsafe {
            libc::waitpid(self.pid, std::ptr::null_mut(), 0);
        }
    }
}

/// The guardian process. Never returns.
fn guardian_main(read: i32, write: i32, devnull: i32, mask: &libc::sigset_t) -> ! {
    // SAFETY: every call below is async-signal-safe and touches only this stack frame (and
    // `mask`, which the parent keeps alive and the child only reads).
    unsafe {
        for sig in IGNORED {
            libc::signal(sig, libc::SIG_IGN);
        }
        libc::pthread_sigmask(libc::SIG_SETMASK, mask, std::ptr::null_mut());
        // Keep nothing of the daemon open (its sockets, database, lock file): only the pipe,
        // as stdin, and /dev/null as stdout/stderr.
        libc::close(write);
        libc::dup2(read, 0);
        libc::dup2(devnull, 1);
        libc::dup2(devnull, 2);
        if libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) != 0 {
            for fd in 3..4096 {
                libc::close(fd);
            }
        }
        let mut groups = [0i32; CAPACITY];
        let mut buf = [0u8; 512];
        let mut have = 0usize;
        loop {
            let n = libc::read(0, buf.as_mut_ptr().add(have).cast(), buf.len() - have);
            if n < 0 && *libc::__errno_location() == libc::EINTR {
                continue;
            }
            if n <= 0 {
                break;
            }
            have += n as usize;
            let whole = have - have % 8;
            let mut i = 0;
            while i < whole {
                let op = i32::from_ne_bytes([buf[i], buf[i + 1], buf[i + 2], buf[i + 3]]);
                let pgid = i32::from_ne_bytes([buf[i + 4], buf[i + 5], buf[i + 6], buf[i + 7]]);
                if op == WATCH {
                    if let Some(slot) = groups.iter_mut().find(|g| **g == 0) {
                        *slot = pgid;
                    }
                } else if op == RELEASE
                    && let Some(slot) = groups.iter_mut().find(|g| **g == pgid)
                {
                    *slot = 0;
                }
                i += 8;
            }
            // A partial record (never expected: writes are 8 bytes) moves to the front.
            for j in whole..have {
                buf[j - whole] = buf[j];
            }
            have -= whole;
        }
        for &pgid in &groups {
            if pgid > 1 {
                libc::kill(-pgid, libc::SIGKILL);
            }
        }
        libc::_exit(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::CommandExt;
    use std::time::{Duration, Instant};

    fn alive(pid: i32) -> bool {
        // A zombie still answers kill(0): look at its state instead.
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| {
                s.rsplit_once(") ")
                    .is_some_and(|(_, rest)| !rest.starts_with('Z'))
            })
            .unwrap_or(false)
    }

    #[test]
    fn registered_groups_die_when_the_daemon_side_goes_away_and_released_ones_live() {
        let guardian = Guardian::start().unwrap();
        let spawn = || {
            std::process::Command::new("sleep")
                .arg("30")
                .process_group(0)
                .spawn()
                .unwrap()
        };
        let (mut watched, mut released) = (spawn(), spawn());
        let (w, r) = (watched.id() as i32, released.id() as i32);
        let _ = w;
        assert!(guardian.watch(w));
        assert!(guardian.watch(r));
        guardian.release(r);
        let gpid = guardian.pid();
        // What the death of the daemon looks like to the guardian: its pipe ends.
        drop(guardian);
        assert!(!alive(gpid), "the guardian exited and was reaped");
        let end = Instant::now() + Duration::from_secs(5);
        let mut status = None;
        while status.is_none() && Instant::now() < end {
            status = watched.try_wait().unwrap();
            std::thread::sleep(Duration::from_millis(10));
        }
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(
            status.and_then(|s| s.signal()),
            Some(libc::SIGKILL),
            "the registered group was killed"
        );
        assert!(alive(r), "a released group is left alone");
        released.kill().unwrap();
        let _ = released.wait();
    }

    #[test]
    fn a_guardian_ignores_sigterm_and_a_dead_one_is_reported() {
        let guardian = Guardian::start().unwrap();
        unsafe { libc::kill(guardian.pid(), libc::SIGTERM) };
        std::thread::sleep(Duration::from_millis(100));
        assert!(
            guardian.watch(999_999),
            "SIGTERM does not stop the guardian"
        );
        unsafe { libc::kill(guardian.pid(), libc::SIGKILL) };
        std::thread::sleep(Duration::from_millis(100));
        assert!(!guardian.watch(999_998), "a killed guardian shows as gone");
        assert!(!guardian.alive());
    }
}
