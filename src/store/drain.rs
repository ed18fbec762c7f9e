//! The drain file, `<state dir>/draining`: present while the host is draining, so that a
//! restart (an upgrade, a crash) keeps it draining until an admin resumes it. It holds who
//! asked and when, as JSON; it is written atomically (temporary file, fsync, rename, fsync
//! of the directory) before the admin gets the answer.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::Path;

use serde::{Deserialize, Serialize};

pub const DRAIN_FILE: &str = "draining";

/// Who put the host into draining, and when.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Drain {
    /// Unix seconds.
    #[serde(default)]
    pub since: u64,
    /// The admin's name; `None` on a server without tokens.
    #[serde(default)]
    pub by: Option<String>,
}

/// The drain file's record, if the host is draining. A file that cannot be parsed still
/// means draining (someone meant it): its record is then empty.
pub fn load(state_dir: &Path) -> io::Result<Option<Drain>> {
    let path = state_dir.join(DRAIN_FILE);
    let mut text = String::new();
    match crate::store::statedir::open_read(&path) {
        Ok(mut f) => {
            f.read_to_string(&mut text)?;
            Ok(Some(serde_json::from_str(&text).unwrap_or_default()))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Writes the drain file, durably.
pub fn save(state_dir: &Path, drain: &Drain) -> io::Result<()> {
    let tmp = state_dir.join(format!("{DRAIN_FILE}.tmp"));
    {
        let mut file = crate::store::statedir::create_fresh(&tmp)?;
        file.write_all(&serde_json::to_vec(drain).map_err(io::Error::from)?)?;
        file.sync_all()?;
    }
    fs::rename(&tmp, state_dir.join(DRAIN_FILE))?;
    File::open(state_dir)?.sync_all()
}

/// Removes the drain file, durably (no file is fine).
pub fn remove(state_dir: &Path) -> io::Result<()> {
    match fs::remove_file(state_dir.join(DRAIN_FILE)) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => File::open(state_dir)?.sync_all(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saved_loaded_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(load(dir.path()).unwrap(), None);
        let drain = Drain {
            since: 1_700_000_000,
            by: Some("ops".into()),
        };
        save(dir.path(), &drain).unwrap();
        assert_eq!(load(dir.path()).unwrap(), Some(drain));
        assert!(!dir.path().join("draining.tmp").exists());
        remove(dir.path()).unwrap();
        assert_eq!(load(dir.path()).unwrap(), None);
        remove(dir.path()).unwrap();
        // A file someone wrote by hand still drains.
        std::fs::write(dir.path().join(DRAIN_FILE), "yes\n").unwrap();
        assert_eq!(load(dir.path()).unwrap(), Some(Drain::default()));
    }
}
