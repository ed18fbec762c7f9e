//! One server per state dir: an advisory lock on `<state dir>/neops-remote-lab.lock`.
//! The kernel drops the lock when its holder dies, so a lock left by a crash never blocks a
//! restart; the file keeps the holder's pid so a refused second instance can name it.

use std::fs::{File, TryLockError};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;

pub const LOCK_FILE: &str = "neops-remote-lab.lock";

/// Held for the life of the process.
pub struct StateDirLock {
    _file: File,
}

pub fn acquire(state_dir: &Path) -> Result<StateDirLock, String> {
    let path = state_dir.join(LOCK_FILE);
    // Never through a symbolic link: a planted one would have us truncate and write our pid
    // into whatever file it names.
    let mut file = crate::statedir::open_rw(&path)
        .map_err(|e| format!("cannot open lock file {}: {e}", path.display()))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(TryLockError::WouldBlock) => {
            let mut text = String::new();
            let _ = file.read_to_string(&mut text);
            let holder = match text.trim().parse::<u32>() {
                Ok(pid) => format!("pid {pid}"),
                Err(_) => "another process".to_owned(),
            };
            return Err(format!(
                "another neops-remote-lab ({holder}) is already using state dir {}",
                state_dir.display()
            ));
        }
        Err(TryLockError::Error(e)) => {
            return Err(format!("cannot lock {}: {e}", path.display()));
        }
    }
    let written = file
        .set_len(0)
        .and_then(|_| file.seek(SeekFrom::Start(0)))
        .and_then(|_| writeln!(file, "{}", std::process::id()))
        .and_then(|_| file.flush());
    if let Err(e) = written {
        return Err(format!("cannot write lock file {}: {e}", path.display()));
    }
    Ok(StateDirLock { _file: file })
}
