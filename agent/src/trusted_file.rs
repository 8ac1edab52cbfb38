//! Opening a file that decides how sessions are recorded, so that what is
//! read is a file nobody but its trusted owners could have written.
//!
//! Checking a path (`stat`) and then opening it is a race: between the two,
//! a user who controls any directory on the way can swap a symbolic link
//! from a root-owned file to their own (a config swap loaded the user's file
//! in 40 of 200 tries). So nothing here looks a path up twice. The walk
//! starts at `/`; every directory is opened relative to the one before it
//! (`openat`) with `O_NOFOLLOW | O_DIRECTORY` and checked on that
//! descriptor (`fstat`: owner, mode), and the file is opened the same way
//! with `O_NOFOLLOW` and checked on its descriptor, which the caller then
//! reads. A symbolic link anywhere is refused, never followed, and every
//! directory on the way must be one only a trusted owner can change, so no
//! entry can be replaced behind the walk.

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, open, openat};
use nix::sys::stat::{Mode, SFlag, fstatat};
use std::ffi::OsStr;
use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};

/// Who may have written the file and the directories above it.
#[derive(Debug, Clone)]
pub struct Rules {
    /// Owners accepted besides root.
    pub owners: Vec<u32>,
    /// Accept a directory others may write when it is root's and sticky, as
    /// `/tmp`: there only an entry's owner can rename or remove it.
    pub sticky_dirs: bool,
}

/// Why the file was not opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("{0} does not exist")]
    NotFound(PathBuf),
    #[error("{0} is a symbolic link: name the file itself")]
    Link(PathBuf),
    #[error("{path} {why}")]
    Untrusted { path: PathBuf, why: String },
    #[error("cannot open {path}: {error}")]
    Io { path: PathBuf, error: std::io::Error },
}

/// Opens the file at `path` (absolute, no `..`) for reading, checking every
/// directory from `/` down and then the file itself against `rules`.
pub fn open_trusted(path: &Path, rules: &Rules) -> Result<File, OpenError> {
    let names = plain_names(path)?;
    let Some((file_name, dirs)) = names.split_last() else {
        return Err(untrusted(path, "is not a file"));
    };
    let mut at = PathBuf::from("/");
    let mut dir = File::from(
        open(
            "/",
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| io(&at, e))?,
    );
    check(&dir, &at, rules, true)?;
    for name in dirs {
        at.push(name);
        dir = step(&dir, name, &at, OFlag::O_DIRECTORY)?;
        check(&dir, &at, rules, true)?;
    }
    at.push(file_name);
    // Non-blocking: a FIFO in the file's place must not hang the login.
    let file = step(&dir, file_name, &at, OFlag::O_NONBLOCK | OFlag::O_NOCTTY)?;
    check(&file, &at, rules, false)?;
    Ok(file)
}

/// The path's names below `/`; refuses relative paths and `..`, which
/// would make what the path says differ from what is opened.
fn plain_names(path: &Path) -> Result<Vec<&OsStr>, OpenError> {
    let mut names = Vec::new();
    for (i, c) in path.components().enumerate() {
        match c {
            Component::RootDir if i == 0 => {}
            Component::Normal(n) => names.push(n),
            Component::CurDir => {}
            _ => return Err(untrusted(path, "is not an absolute path without `..`")),
        }
    }
    if path.components().next() != Some(Component::RootDir) {
        return Err(untrusted(path, "is not an absolute path without `..`"));
    }
    Ok(names)
}

/// Opens `name` in `dir` without following a link.
fn step(dir: &File, name: &OsStr, at: &Path, extra: OFlag) -> Result<File, OpenError> {
    let flags = OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | extra;
    match openat(dir, name, flags, Mode::empty()) {
        Ok(fd) => Ok(File::from(fd)),
        Err(Errno::ENOENT) => Err(OpenError::NotFound(at.to_path_buf())),
        // O_NOFOLLOW on a link gives ELOOP, O_DIRECTORY on one may give
        // ENOTDIR first: tell them apart by what the entry is.
        Err(e @ (Errno::ELOOP | Errno::ENOTDIR)) => match fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(st) if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFLNK => {
                Err(OpenError::Link(at.to_path_buf()))
            }
            Ok(_) if e == Errno::ENOTDIR => Err(untrusted(at, "is not a directory")),
            _ => Err(io(at, e)),
        },
        Err(e) => Err(io(at, e)),
    }
}

/// The checks on an opened directory or file (`fstat` of the descriptor).
fn check(f: &File, at: &Path, rules: &Rules, is_dir: bool) -> Result<(), OpenError> {
    let md = f.metadata().map_err(|error| OpenError::Io {
        path: at.to_path_buf(),
        error,
    })?;
    if is_dir != md.is_dir() || (!is_dir && !md.is_file()) {
        return Err(untrusted(
            at,
            if is_dir {
                "is not a directory"
            } else {
                "is not a regular file"
            },
        ));
    }
    let owner = md.uid();
    if owner != 0 && !rules.owners.contains(&owner) {
        return Err(untrusted(at, &format!("is owned by uid {owner}")));
    }
    let mode = md.mode();
    let sticky_ok = is_dir && rules.sticky_dirs && owner == 0 && mode & 0o1000 != 0;
    if mode & 0o022 != 0 && !sticky_ok {
        return Err(untrusted(
            at,
            &format!("has mode {:o}: others may write it", mode & 0o7777),
        ));
    }
    Ok(())
}

fn untrusted(path: &Path, why: &str) -> OpenError {
    OpenError::Untrusted {
        path: path.to_path_buf(),
        why: why.to_owned(),
    }
}

fn io(path: &Path, e: Errno) -> OpenError {
    OpenError::Io {
        path: path.to_path_buf(),
        error: e.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{PermissionsExt, symlink};

    fn chmod(p: &Path, mode: u32) {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    /// Rules for a test directory under /tmp, owned by whoever runs the test.
    fn mine() -> Rules {
        Rules {
            owners: vec![nix::unistd::geteuid().as_raw()],
            sticky_dirs: true,
        }
    }

    fn setup() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        chmod(dir.path(), 0o755);
        let sub = dir.path().join("etc");
        std::fs::create_dir(&sub).unwrap();
        chmod(&sub, 0o755);
        let file = sub.join("c.toml");
        std::fs::write(&file, "x = 1\n").unwrap();
        chmod(&file, 0o644);
        (dir, file)
    }

    #[test]
    fn reads_a_file_whose_every_directory_is_trusted() {
        let (_d, file) = setup();
        let mut text = String::new();
        use std::io::Read;
        open_trusted(&file, &mine()).unwrap().read_to_string(&mut text).unwrap();
        assert_eq!(text, "x = 1\n");
    }

    #[test]
    fn a_link_is_refused_as_the_file_and_as_a_directory() {
        let (d, file) = setup();
        let link = d.path().join("link.toml");
        symlink(&file, &link).unwrap();
        assert!(matches!(open_trusted(&link, &mine()), Err(OpenError::Link(p)) if p == link));
        let dir_link = d.path().join("etc-link");
        symlink(file.parent().unwrap(), &dir_link).unwrap();
        let via = dir_link.join("c.toml");
        assert!(matches!(open_trusted(&via, &mine()), Err(OpenError::Link(p)) if p == dir_link));
    }

    #[test]
    fn a_directory_others_may_write_or_own_is_refused() {
        let (_d, file) = setup();
        let dir = file.parent().unwrap();
        chmod(dir, 0o775);
        let e = open_trusted(&file, &mine()).unwrap_err();
        assert!(e.to_string().contains("others may write it"), "{e}");
        assert!(e.to_string().starts_with(&dir.display().to_string()), "{e}");
        chmod(dir, 0o755);
        // Owned by a uid the rules do not name (root's tempdir: the owner is root).
        let strict = Rules {
            owners: vec![],
            sticky_dirs: true,
        };
        if nix::unistd::geteuid().as_raw() != 0 {
            let e = open_trusted(&file, &strict).unwrap_err();
            assert!(e.to_string().contains("is owned by uid"), "{e}");
        }
        // /tmp is sticky and root's: accepted only when the rules say so.
        let no_sticky = Rules {
            owners: mine().owners,
            sticky_dirs: false,
        };
        let e = open_trusted(&file, &no_sticky).unwrap_err();
        assert!(e.to_string().contains("others may write it"), "{e}");
    }

    #[test]
    fn the_file_itself_is_checked_on_its_descriptor() {
        let (d, file) = setup();
        chmod(&file, 0o664);
        let e = open_trusted(&file, &mine()).unwrap_err();
        assert!(e.to_string().contains("others may write it"), "{e}");
        let fifo = d.path().join("etc/fifo");
        nix::unistd::mkfifo(&fifo, Mode::from_bits_truncate(0o644)).unwrap();
        let e = open_trusted(&fifo, &mine()).unwrap_err();
        assert!(e.to_string().contains("not a regular file"), "{e}");
        assert!(matches!(
            open_trusted(&d.path().join("etc/missing"), &mine()),
            Err(OpenError::NotFound(_))
        ));
        for bad in ["etc/c.toml", "/etc/../etc/passwd"] {
            let e = open_trusted(Path::new(bad), &mine()).unwrap_err();
            assert!(e.to_string().contains("absolute path"), "{bad}: {e}");
        }
    }
}
