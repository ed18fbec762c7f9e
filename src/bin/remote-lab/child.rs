//! COMMAND: started through a trampoline so that it cannot outlive remote-lab, signalled
//! by pid while it is ours, and waited for by a thread that tells the main thread when it
//! exited (without reaping it: the pid stays ours until the main thread reaps it, so a
//! signal sent before that cannot reach a stranger that got the pid).
//!
//! The trampoline is remote-lab itself (`remote-lab __exec-child PPID -- COMMAND…`): it
//! asks the kernel for SIGKILL when its parent dies (`PR_SET_PDEATHSIG`, kept across
//! `exec`), checks that the parent is still the one that started it (it may have died
//! before the request took effect), and replaces itself with COMMAND. A `pre_exec` hook
//! would do the same in the child, but needs `unsafe`.

use std::ffi::OsString;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::Command;

use crossbeam_channel::Receiver;
use rustix::process::{Pid, Signal};

use crate::{EX_SOFTWARE, say};

/// `COMMAND could not be run` / `not found`.
pub const EX_NOEXEC: i32 = 126;
pub const EX_NOTFOUND: i32 = 127;

pub struct Child {
    child: std::process::Child,
    pid: Pid,
    /// Receives once COMMAND has exited (it is not reaped yet).
    pub exited: Receiver<()>,
}

/// Starts COMMAND through the trampoline, with `env` set in its environment and `unset`
/// taken out of it. `Err`: the exit status to give (126).
pub fn spawn(command: &[OsString], env: &[(&str, OsString)], unset: &[&str]) -> Result<Child, i32> {
    let me = std::env::current_exe();
    let mut cmd = match &me {
        Ok(me) => {
            let mut cmd = Command::new(me);
            cmd.arg(crate::flags::EXEC_CHILD)
                .arg(std::process::id().to_string())
                .arg("--")
                .args(command);
            cmd
        }
        // Without /proc: COMMAND itself, without the death signal.
        Err(_) => {
            let mut cmd = Command::new(&command[0]);
            cmd.args(&command[1..]);
            cmd
        }
    };
    for name in unset {
        cmd.env_remove(name);
    }
    for (name, value) in env {
        cmd.env(name, value);
    }
    let child = cmd.spawn().map_err(|e| {
        say(format!("cannot run {}: {e}", command[0].to_string_lossy()));
        if e.kind() == std::io::ErrorKind::NotFound {
            EX_NOTFOUND
        } else {
            EX_NOEXEC
        }
    })?;
    let pid = Pid::from_child(&child);
    let (tx, exited) = crossbeam_channel::bounded(1);
    std::thread::Builder::new()
        .name("waiter".into())
        .spawn(move || {
            use rustix::process::{WaitId, WaitIdOptions, waitid};
            while let Err(rustix::io::Errno::INTR) = waitid(
                WaitId::Pid(pid),
                WaitIdOptions::EXITED | WaitIdOptions::NOWAIT,
            ) {}
            let _ = tx.send(());
        })
        .map_err(|e| {
            say(format!("cannot start a thread: {e}"));
            EX_SOFTWARE
        })?;
    Ok(Child { child, pid, exited })
}

impl Child {
    /// Sends `signal`; only before [`Child::reap`], while the pid is surely ours.
    pub fn signal(&self, signal: Signal) {
        let _ = rustix::process::kill_process(self.pid, signal);
    }

    /// Reaps COMMAND (after `exited` said so): its exit status, 128+N for signal N.
    pub fn reap(mut self) -> i32 {
        match self.child.wait() {
            Ok(status) => match (status.code(), status.signal()) {
                (Some(code), _) => code,
                (None, Some(signal)) => 128 + signal,
                (None, None) => EX_SOFTWARE,
            },
            Err(e) => {
                say(format!("cannot wait for the command: {e}"));
                EX_SOFTWARE
            }
        }
    }
}

/// The trampoline: never returns.
pub fn exec_child(parent: u32, command: &[OsString]) -> ! {
    let _ = rustix::process::set_parent_process_death_signal(Some(Signal::KILL));
    // The parent may have died between our fork and the line above: then we were
    // re-parented and nobody will kill us.
    if rustix::process::getppid().map(|p| p.as_raw_nonzero().get() as u32) != Some(parent) {
        std::process::exit(EX_SOFTWARE);
    }
    let error = Command::new(&command[0]).args(&command[1..]).exec();
    say(format!(
        "cannot run {}: {error}",
        command[0].to_string_lossy()
    ));
    std::process::exit(if error.kind() == std::io::ErrorKind::NotFound {
        EX_NOTFOUND
    } else {
        EX_NOEXEC
    });
}
