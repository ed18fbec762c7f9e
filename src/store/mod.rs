//! What lasts on disk: the state file, the state directory and its lock file.

pub mod drain;
pub mod lockfile;
pub mod persist;
pub mod session;
pub mod statedir;
