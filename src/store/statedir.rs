//! The state directory belongs to this server alone: created 0700, refused when another
//! user owns it or others can write to it, and nothing read from the state file is acted
//! on (removed, run netlab in) unless it lies inside `<state dir>/labs/`. Otherwise a local
//! user who prepared the directory, or a state file in it, could make the server (root)
//! overwrite, delete or run netlab (which unpickles a snapshot) wherever they chose.

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Component, Path};

/// Creates `dir` (0700) and its `labs/` if missing, and checks both are ours alone.
pub fn prepare(dir: &Path) -> Result<(), String> {
    make_private_dir(dir)?;
    make_private_dir(&dir.join("labs"))
}

fn make_private_dir(dir: &Path) -> Result<(), String> {
    match DirBuilder::new().recursive(true).mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) => return Err(format!("cannot create state dir {}: {e}", dir.display())),
    }
    check_private(dir)
}

/// A directory (not a symbolic link), owned by our effective user, writable by no one else.
pub fn check_private(dir: &Path) -> Result<(), String> {
    let meta = fs::symlink_metadata(dir)
        .map_err(|e| format!("cannot look at state dir {}: {e}", dir.display()))?;
    if meta.file_type().is_symlink() {
        return Err(format!(
            "state dir {} is a symbolic link: refusing it (give the real path)",
            dir.display()
        ));
    }
    if !meta.is_dir() {
        return Err(format!("state dir {} is not a directory", dir.display()));
    }
    let me = rustix::process::geteuid().as_raw();
    if meta.uid() != me {
        return Err(format!(
            "state dir {} belongs to uid {}, not to this server's uid {me}: refusing it \
             (another user could have prepared it)",
            dir.display(),
            meta.uid()
        ));
    }
    if meta.mode() & 0o022 != 0 {
        return Err(format!(
            "state dir {} is writable by group or others (mode {:o}): refusing it \
             (chmod 700 it, or pick another --state-dir)",
            dir.display(),
            meta.mode() & 0o7777
        ));
    }
    Ok(())
}

/// `O_NOFOLLOW`: opening a symbolic link fails instead of opening what it points to.
fn no_follow() -> i32 {
    rustix::fs::OFlags::NOFOLLOW.bits() as i32
}

/// Opens a file of the state dir for reading, never through a symbolic link.
pub fn open_read(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags(no_follow())
        .open(path)
}

/// Opens (creating it 0600) a file of the state dir for reading and writing, never through
/// a symbolic link, and keeps its content.
pub fn open_rw(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(no_follow())
        .open(path)
}

/// Creates `path` afresh (0600): whatever was there (a file, a symbolic link) is unlinked
/// first, and the new file is made with `O_EXCL`, so a link planted there is never written
/// through.
pub fn create_fresh(path: &Path) -> io::Result<File> {
    match fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(no_follow())
        .open(path)
}

/// Whether `path` is a work directory of ours: exactly one plain name below `labs`, and not
/// a symbolic link.
pub fn is_work_dir(labs: &Path, path: &Path) -> bool {
    let Ok(rest) = path.strip_prefix(labs) else {
        return false;
    };
    let mut parts = rest.components();
    let one_name = matches!(parts.next(), Some(Component::Normal(_))) && parts.next().is_none();
    one_name && fs::symlink_metadata(path).map_or(true, |m| !m.file_type().is_symlink())
}

/// Whether `path` (a topology file) lies inside the work directory `work_dir`, by name.
pub fn is_inside(work_dir: &Path, path: &Path) -> bool {
    path.strip_prefix(work_dir).is_ok_and(|rest| {
        rest.components().count() > 0
            && rest.components().all(|c| matches!(c, Component::Normal(_)))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_fresh_dir_is_private_and_a_shared_one_is_refused() {
        let top = tempfile::tempdir().unwrap();
        let dir = top.path().join("a/state");
        prepare(&dir).unwrap();
        assert_eq!(fs::metadata(&dir).unwrap().mode() & 0o777, 0o700);
        assert_eq!(
            fs::metadata(dir.join("labs")).unwrap().mode() & 0o777,
            0o700
        );
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o777)).unwrap();
        let e = prepare(&dir).unwrap_err();
        assert!(e.contains("writable by group or others"), "{e}");
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        prepare(&dir).unwrap();
        let link = top.path().join("link");
        std::os::unix::fs::symlink(&dir, &link).unwrap();
        assert!(prepare(&link).unwrap_err().contains("symbolic link"));
    }

    #[test]
    fn links_are_never_followed() {
        let top = tempfile::tempdir().unwrap();
        let target = top.path().join("precious");
        fs::write(&target, "keep").unwrap();
        let link = top.path().join("state.json.tmp");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        assert!(open_read(&link).is_err());
        assert!(open_rw(&link).is_err());
        use std::io::Write;
        create_fresh(&link).unwrap().write_all(b"new").unwrap();
        assert_eq!(fs::read_to_string(&target).unwrap(), "keep");
        assert_eq!(fs::read_to_string(&link).unwrap(), "new");
    }

    #[test]
    fn only_paths_inside_labs_are_ours() {
        let labs = Path::new("/s/labs");
        assert!(is_work_dir(labs, Path::new("/s/labs/0f3a")));
        assert!(!is_work_dir(labs, Path::new("/s/labs")));
        assert!(!is_work_dir(labs, Path::new("/s/labs/a/b")));
        assert!(!is_work_dir(labs, Path::new("/s/labs/../etc")));
        assert!(!is_work_dir(labs, Path::new("/etc")));
        assert!(!is_work_dir(labs, Path::new("/s/labsx/a")));
        assert!(is_inside(
            Path::new("/s/labs/a"),
            Path::new("/s/labs/a/t.yml")
        ));
        assert!(!is_inside(
            Path::new("/s/labs/a"),
            Path::new("/s/labs/a/../b/t.yml")
        ));
        assert!(!is_inside(Path::new("/s/labs/a"), Path::new("/s/labs/a")));
    }
}
