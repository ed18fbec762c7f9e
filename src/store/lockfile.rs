//! One server per state dir: an advisory lock on `<state dir>/neops-remote-lab.lock`.
//! The kernel drops the lock when its holder dies, so a lock left by a crash never blocks a
//! restart; the file keeps the holder's pid so a refused second instance can name it.

use std::fmt;
use std::fs::{File, TryLockError};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

pub const LOCK_FILE: &str = "neops-remote-lab.lock";

/// Held for the life of the process.
pub struct StateDirLock {
    _file: File,
}

/// Why the state dir could not be locked.
#[derive(Debug)]
pub enum LockError {
    /// Another process holds the lock: another server, or a `cleanup` in progress. `pid` is
    /// what its lock file says, if it names one.
    Held {
        state_dir: PathBuf,
        pid: Option<u32>,
    },
    /// The lock file could not be opened, locked or written.
    Io {
        doing: &'static str,
        path: PathBuf,
        error: io::Error,
    },
}

impl fmt::Display for LockError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LockError::Held { state_dir, pid } => {
                write!(f, "another neops-remote-lab (")?;
                match pid {
                    Some(pid) => write!(f, "pid {pid}")?,
                    None => f.write_str("another process")?,
                }
                write!(f, ") is already using state dir {}", state_dir.display())
            }
            LockError::Io { doing, path, error } => {
                write!(f, "cannot {doing} {}: {error}", path.display())
            }
        }
    }
}

impl std::error::Error for LockError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            LockError::Held { .. } => None,
            LockError::Io { error, .. } => Some(error),
        }
    }
}

pub fn acquire(state_dir: &Path) -> Result<StateDirLock, LockError> {
    let path = state_dir.join(LOCK_FILE);
    let io_error = |doing, error| LockError::Io {
        doing,
        path: path.clone(),
        error,
    };
    // Never through a symbolic link: a planted one would have us truncate and write our pid
    // into whatever file it names.
    let mut file =
        crate::store::statedir::open_rw(&path).map_err(|e| io_error("open lock file", e))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(TryLockError::WouldBlock) => {
            let mut text = String::new();
            let _ = file.read_to_string(&mut text);
            return Err(LockError::Held {
                state_dir: state_dir.to_path_buf(),
                pid: text.trim().parse().ok(),
            });
        }
        Err(TryLockError::Error(e)) => return Err(io_error("lock", e)),
    }
    file.set_len(0)
        .and_then(|_| file.seek(SeekFrom::Start(0)))
        .and_then(|_| writeln!(file, "{}", std::process::id()))
        .and_then(|_| file.flush())
        .map_err(|e| io_error("write lock file", e))?;
    Ok(StateDirLock { _file: file })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_names_the_holder() {
        let dir = tempfile::tempdir().unwrap();
        let _held = acquire(dir.path()).unwrap();
        let err = acquire(dir.path()).err().unwrap();
        let pid = std::process::id();
        assert!(matches!(err, LockError::Held { pid: Some(p), .. } if p == pid));
        assert_eq!(
            err.to_string(),
            format!(
                "another neops-remote-lab (pid {pid}) is already using state dir {}",
                dir.path().display()
            )
        );
        drop(_held);
        assert!(acquire(dir.path()).is_ok());
    }

    #[test]
    fn a_lock_file_that_cannot_be_opened_is_an_io_error() {
        let dir = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink("/nonexistent", dir.path().join(LOCK_FILE)).unwrap();
        let err = acquire(dir.path()).err().unwrap();
        assert!(matches!(err, LockError::Io { .. }), "{err}");
        assert!(
            err.to_string().starts_with("cannot open lock file "),
            "{err}"
        );
    }
}
