//! Finding and killing Claude processes left behind by a daemon that died.
//!
//! A SIGKILLed daemon cannot kill its children: each CLI runs in its own process group and keeps
//! running. On start-up the daemon walks its RUNNING rows and calls [`kill_orphaned_group`] with
//! the pid and start time it recorded at spawn ([`Progress::Spawned`](super::Progress)). The start
//! time tells our process from an unrelated one that reused the pid.
//!
//! Why a process-group id is safe to signal here: Linux does not hand out a pid while a process
//! group with that id still has members, so if the leader is gone but members remain, they are
//! the survivors of our group.

/// What [`kill_orphaned_group`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OrphanCheck {
    /// Our process (or what was left of its group) was still running and has been sent SIGKILL.
    Killed,
    /// Nothing of the group is running any more.
    AlreadyGone,
    /// The pid now belongs to another process (its start time differs); nothing was signalled.
    PidReused,
}

/// Field `n` (1-based, as `man 5 proc` counts them; 3 or more) of `/proc/<pid>/stat`, parsed.
/// `None` if the process does not exist (or this is not Linux).
pub fn stat_field<T: std::str::FromStr>(pid: u32, n: usize) -> Option<T> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces and parentheses: split after the last `)`.
    let rest = stat.rsplit_once(") ")?.1;
    // `rest` starts at field 3 (state).
    rest.split(' ').nth(n.checked_sub(3)?)?.parse().ok()
}

/// Start time of a process, in clock ticks since boot (`/proc/<pid>/stat` field 22).
/// `None` if the process does not exist (or this is not Linux).
pub fn process_start_ticks(pid: u32) -> Option<u64> {
    stat_field(pid, 22)
}

/// Pids of the live (non-zombie) processes in process group `pgid`.
pub fn group_members(pgid: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                return false;
            };
            let Some((_, rest)) = stat.rsplit_once(") ") else {
                return false;
            };
            let mut fields = rest.split(' ');
            let state = fields.next();
            let pgrp = fields.nth(1).and_then(|f| f.parse::<u32>().ok());
            state != Some("Z") && pgrp == Some(pgid)
        })
        .collect()
}

/// Kill what is left of a CLI process group recorded as `pid` (its leader) with `start_ticks`
/// (from [`process_start_ticks`] at spawn; `None` skips the identity check of the leader).
pub fn kill_orphaned_group(pid: u32, start_ticks: Option<u64>) -> OrphanCheck {
    if pid <= 1 {
        return OrphanCheck::AlreadyGone;
    }
    match process_start_ticks(pid) {
        Some(now) if start_ticks.is_some_and(|recorded| recorded != now) => {
            return OrphanCheck::PidReused;
        }
        // A dead leader may still be a zombie (the daemon that would reap it is gone, and
        // whoever inherited it may not reap at once): only live members count.
        _ if group_members(pid).is_empty() => return OrphanCheck::AlreadyGone,
        _ => {}
    }
    tracing::warn!(
        pid,
        "killing a Claude CLI process group left behind by a previous daemon"
    );
    // SAFETY: kill(2) has no memory-safety preconditions; pid > 1 so this is a group.
    unsafe {
        libc::kill(-(pid as i32), libc::SIGKILL);
    }
    OrphanCheck::Killed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_start_time_of_this_process_is_readable_and_stable() {
        let me = std::process::id();
        let first = process_start_ticks(me).expect("/proc is mounted");
        assert_eq!(process_start_ticks(me), Some(first));
        assert_eq!(process_start_ticks(u32::MAX), None);
    }

    #[test]
    fn a_pid_with_another_start_time_is_left_alone() {
        let me = std::process::id();
        let ticks = process_start_ticks(me).unwrap();
        assert_eq!(
            kill_orphaned_group(me, Some(ticks + 1)),
            OrphanCheck::PidReused
        );
    }

    #[test]
    fn a_group_with_no_members_is_already_gone() {
        assert_eq!(
            kill_orphaned_group(u32::MAX - 1, Some(1)),
            OrphanCheck::AlreadyGone
        );
    }

    #[test]
    fn a_group_whose_members_are_all_zombies_is_already_gone() {
        use std::os::unix::process::CommandExt;
        let mut child = std::process::Command::new("true")
            .process_group(0)
            .spawn()
            .unwrap();
        let pid = child.id();
        // Not reaped yet: the leader is a zombie until `wait`.
        for _ in 0..100 {
            let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
            if state.rsplit_once(") ").unwrap().1.starts_with('Z') {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let ticks = process_start_ticks(pid);
        assert!(ticks.is_some(), "a zombie still has its /proc entry");
        assert_eq!(kill_orphaned_group(pid, ticks), OrphanCheck::AlreadyGone);
        child.wait().unwrap();
    }

    #[test]
    fn an_orphaned_group_is_killed_with_all_its_members() {
        use std::os::unix::process::CommandExt;
        let mut child = std::process::Command::new("sh")
            .args(["-c", "sleep 60 & sleep 60"])
            .process_group(0)
            .spawn()
            .unwrap();
        let pid = child.id();
        let ticks = process_start_ticks(pid);
        std::thread::sleep(std::time::Duration::from_millis(100));
        assert!(group_members(pid).len() >= 2, "leader and background sleep");
        assert_eq!(kill_orphaned_group(pid, ticks), OrphanCheck::Killed);
        child.wait().unwrap();
        for _ in 0..40 {
            if group_members(pid).is_empty() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        assert!(group_members(pid).is_empty());
    }
}
