//! Signals that reach only the processes they are meant for.
//!
//! A process group id is a pid. A signal sent to a group whose leader has been reaped may
//! reach whoever was given that number since; sent to group 1 or 0 it means `kill(-1)`
//! (every process we may signal) or `kill(0)` (our own group). So:
//!
//! * a group we started is signalled only through a [`GroupHandle`] of a [`GroupChild`]: the
//!   child leads its own group, and its waiter waits *without reaping* (`waitid` with
//!   `WNOWAIT`) and then reaps under the lock the handle takes to signal. While the handle
//!   can signal, the leader's pid (so the group id) is still reserved for it;
//! * processes that are not our children (left behind by a server that was SIGKILLed) are
//!   signalled one by one through a pidfd opened *before* checking who they are
//!   ([`signal_group_members`]), so the check and the signal concern the same process even
//!   if it exits and its pid is reused in between;
//! * group ids 0 and 1, and our own group, are refused everywhere.
//!
//! No external `kill` program is ever run (procps' `kill -9 -PGID` misparses the group id).

use std::io;
use std::os::unix::process::CommandExt;
use std::process::{Child, ChildStderr, ChildStdin, ChildStdout, Command, ExitStatus};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use rustix::process::{
    Pid, PidfdFlags, Signal, WaitId, WaitIdOptions, kill_process_group, pidfd_open,
    pidfd_send_signal, waitid,
};

/// A child started as the leader of a new process group.
pub struct GroupChild {
    child: Child,
    handle: GroupHandle,
}

/// Signals a [`GroupChild`]'s group for as long as its leader has not been reaped.
#[derive(Clone)]
pub struct GroupHandle {
    pgid: Pid,
    /// True once the leader is reaped; held while signalling, so reaping waits for it.
    reaped: Arc<Mutex<bool>>,
}

impl GroupChild {
    /// Spawns `command` as the leader of a new process group.
    pub fn spawn(command: &mut Command) -> io::Result<GroupChild> {
        let mut child = command.process_group(0).spawn()?;
        let pgid = match checked_pgid(child.id()) {
            Ok(pgid) => pgid,
            Err(e) => {
                // Cannot happen for a child of ours; never leave it running unowned.
                let _ = child.kill();
                let _ = child.wait();
                return Err(e);
            }
        };
        Ok(GroupChild {
            child,
            handle: GroupHandle {
                pgid,
                reaped: Arc::new(Mutex::new(false)),
            },
        })
    }

    pub fn id(&self) -> u32 {
        self.child.id()
    }

    pub fn handle(&self) -> GroupHandle {
        self.handle.clone()
    }

    /// The child's pipes (each is there once, if it was configured as piped).
    pub fn take_pipes(&mut self) -> (Option<ChildStdin>, Option<ChildStdout>, Option<ChildStderr>) {
        (
            self.child.stdin.take(),
            self.child.stdout.take(),
            self.child.stderr.take(),
        )
    }

    /// Waits for the leader to exit, then reaps it; from then on the handles signal nothing.
    pub fn wait(mut self) -> io::Result<ExitStatus> {
        let pid = self.handle.pgid;
        loop {
            match waitid(
                WaitId::Pid(pid),
                WaitIdOptions::EXITED | WaitIdOptions::NOWAIT,
            ) {
                Ok(_) => break,
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        let mut reaped = self.handle.lock();
        let status = self.child.wait();
        *reaped = true;
        status
    }
}

impl GroupHandle {
    /// The group id (the leader's pid).
    pub fn pgid(&self) -> u32 {
        self.pgid.as_raw_nonzero().get().unsigned_abs()
    }

    /// Sends `signal` to every process of the group. Returns false, sending nothing, when the
    /// leader has been reaped already (the group id may belong to someone else by now).
    pub fn signal(&self, signal: Signal) -> io::Result<bool> {
        let reaped = self.lock();
        if *reaped {
            return Ok(false);
        }
        match kill_process_group(self.pgid, signal) {
            // Only a zombie leader is left: nothing to signal, nothing wrong.
            Ok(()) | Err(rustix::io::Errno::SRCH) => Ok(true),
            Err(e) => Err(e.into()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, bool> {
        self.reaped.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A group id that is safe to signal: not 0, not 1, not our own group.
fn checked_pgid(id: u32) -> io::Result<Pid> {
    let refuse = |why: &str| {
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("refusing to signal process group {id}: {why}"),
        ))
    };
    let Some(pid) = i32::try_from(id).ok().and_then(Pid::from_raw) else {
        return refuse("not a process group id");
    };
    if pid.as_raw_nonzero().get() == 1 {
        return refuse("group 1 would mean every process");
    }
    // Read from /proc, not getpgrp(2): in a PID namespace whose group leader lives outside
    // it, getpgrp() returns 0 (and rustix asserts on that in debug builds).
    if process_group_of(std::process::id()) == Some(id) {
        return refuse("it is our own group");
    }
    Ok(pid)
}

/// Sends `signal` to each process of group `pgid` for which `is_ours(pid)` holds, for
/// processes that are not our children. Each one is pinned by a pidfd before `is_ours` looks
/// at it, so a pid that is reused meanwhile is never signalled. Returns how many were sent.
pub fn signal_group_members(
    pgid: u32,
    is_ours: impl Fn(u32) -> bool,
    signal: Signal,
) -> io::Result<usize> {
    checked_pgid(pgid)?;
    let mut sent = 0;
    for entry in std::fs::read_dir("/proc")?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if process_group_of(pid) != Some(pgid) {
            continue;
        }
        let Some(raw) = i32::try_from(pid).ok().and_then(Pid::from_raw) else {
            continue;
        };
        let Ok(pidfd) = pidfd_open(raw, PidfdFlags::empty()) else {
            continue; // gone already
        };
        // Checked after pinning: if this is still the pid's process, the pidfd is it.
        if process_group_of(pid) == Some(pgid)
            && is_ours(pid)
            && pidfd_send_signal(&pidfd, signal).is_ok()
        {
            sent += 1;
        }
    }
    Ok(sent)
}

/// Sends `signal` to process `pid` (not a group) if `is_ours(pid)` holds, checked after the
/// process was pinned by a pidfd. Refuses pids 0 and 1 and ourselves. Returns whether it
/// was sent.
pub fn signal_process(pid: u32, is_ours: impl Fn(u32) -> bool, signal: Signal) -> io::Result<bool> {
    let raw = checked_pgid(pid)?;
    if pid == std::process::id() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "refusing to signal ourselves",
        ));
    }
    let pidfd = pidfd_open(raw, PidfdFlags::empty())?;
    if !is_ours(pid) {
        return Ok(false);
    }
    pidfd_send_signal(&pidfd, signal)?;
    Ok(true)
}

/// The process group of `pid`, from `/proc/<pid>/stat` (None when it is gone).
pub fn process_group_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) state ppid pgrp …": comm may hold spaces and parentheses.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(2)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;
    use std::process::Stdio;
    use std::time::{Duration, Instant};

    fn sleeper() -> GroupChild {
        GroupChild::spawn(
            Command::new("sleep")
                .arg("300")
                .stdin(Stdio::null())
                .stdout(Stdio::null()),
        )
        .unwrap()
    }

    /// Running (or asleep), not a zombie: `/proc/<pid>/stat`'s state field.
    fn alive(pid: u32) -> bool {
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            return false;
        };
        let state = stat[stat.rfind(')').unwrap() + 1..]
            .split_whitespace()
            .next();
        !matches!(state, Some("Z" | "X" | "x"))
    }

    #[test]
    fn killing_a_group_spares_a_canary_in_another_group() {
        let target = sleeper();
        let canary = sleeper();
        let canary_handle = canary.handle();
        assert_eq!(process_group_of(target.id()), Some(target.id()));
        assert_ne!(process_group_of(canary.id()), process_group_of(target.id()));

        let handle = target.handle();
        assert!(handle.signal(Signal::KILL).unwrap());
        let status = target.wait().unwrap();
        assert_eq!(status.signal(), Some(9));
        assert!(alive(canary.id()), "the canary in another group must live");

        // Once reaped, the handle signals nothing: the id may be someone else's now.
        assert!(!handle.signal(Signal::KILL).unwrap());
        assert!(alive(canary.id()));

        assert!(canary_handle.signal(Signal::KILL).unwrap());
        assert_eq!(canary.wait().unwrap().signal(), Some(9));
    }

    #[test]
    fn a_group_kill_reaches_grandchildren() {
        // A shell leading the group starts a sleeper in the same group and waits for it.
        let mut shell = GroupChild::spawn(
            Command::new("/bin/sh")
                .args(["-c", "sleep 300 & echo $!; wait"])
                .stdout(Stdio::piped()),
        )
        .unwrap();
        let (_, stdout, _) = shell.take_pipes();
        let mut line = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout.unwrap()), &mut line)
            .unwrap();
        let grandchild: u32 = line.trim().parse().unwrap();
        assert_eq!(process_group_of(grandchild), Some(shell.id()));

        assert!(shell.handle().signal(Signal::KILL).unwrap());
        shell.wait().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while alive(grandchild) {
            assert!(Instant::now() < deadline, "the grandchild survived");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn group_ids_0_and_1_and_our_own_are_refused() {
        let own = process_group_of(std::process::id()).unwrap();
        for id in [0, 1, own] {
            let err = signal_group_members(id, |_| true, Signal::KILL).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "group {id}");
        }
        assert!(checked_pgid(u32::MAX).is_err());
    }

    #[test]
    fn a_single_process_is_signalled_only_when_it_is_ours() {
        let target = sleeper();
        assert!(!signal_process(target.id(), |_| false, Signal::KILL).unwrap());
        assert!(alive(target.id()));
        assert!(signal_process(target.id(), |_| true, Signal::KILL).unwrap());
        assert_eq!(target.wait().unwrap().signal(), Some(9));
        for pid in [0, 1, std::process::id()] {
            assert!(
                signal_process(pid, |_| true, Signal::KILL).is_err(),
                "{pid}"
            );
        }
    }

    #[test]
    fn members_of_a_foreign_group_are_signalled_only_when_they_are_ours() {
        let target = sleeper();
        let canary = sleeper();
        let pgid = target.id();
        // The predicate says no: nothing is sent.
        assert_eq!(
            signal_group_members(pgid, |_| false, Signal::KILL).unwrap(),
            0
        );
        assert!(alive(target.id()));
        // It says yes for the target's group only: the target dies, the canary lives.
        assert_eq!(
            signal_group_members(pgid, |_| true, Signal::KILL).unwrap(),
            1
        );
        assert_eq!(target.wait().unwrap().signal(), Some(9));
        assert!(alive(canary.id()));
        canary.handle().signal(Signal::KILL).unwrap();
        canary.wait().unwrap();
    }
}
