//! Where a restore writes, made safe against whoever else can write the output's directory.
//!
//! * The output's directory is opened once; every file the restore creates is created relative
//!   to that handle (`openat`, `O_EXCL | O_NOFOLLOW`), so a symlink planted at any name, or a
//!   directory swapped after the checks, is never followed.
//! * The restore works in a private directory (`.NAME.restore-<random>`, mode 0700) beside the
//!   output: nobody else can see, open or plant anything among its scratch files, and two
//!   restores never share a name.
//! * A lock (`.NAME.restore-lock`, `flock`) makes the output exclusive: a second restore to the
//!   same output, in this process or another, is refused at once.
//! * The result appears under the output name by a hard link from the private directory, which
//!   fails rather than replace anything that exists there (a file, a link, a directory).
//! * `-wal`, `-shm` and `-journal` files left beside the output by a database that is gone are
//!   moved aside first (SQLite would otherwise replay them over the restored file on its first
//!   open), and each is named in a warning and in the summary.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, openat};
use nix::sys::stat::{Mode, fstatat};
use nix::unistd::{UnlinkatFlags, unlinkat};
use tracing::{info, warn};

use super::RestoreError;

/// Mode and ownership for the restored file (when not given: the process's umask and user).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ownership {
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    /// Permission bits (`& 0o777`).
    pub mode: u32,
}

/// An output being restored: its directory (open), its name, and the lock on it. Dropping it
/// releases the lock.
#[derive(Debug)]
pub struct Output {
    /// The output as the caller named it, for messages.
    given: PathBuf,
    dir: OwnedFd,
    /// The directory's path after resolution (the path of the open handle).
    dir_path: PathBuf,
    name: OsString,
    lock: Option<(File, OsString)>,
}

fn errno_io(e: Errno) -> io::Error {
    io::Error::from_raw_os_error(e as i32)
}

fn at(path: &Path) -> impl FnOnce(Errno) -> RestoreError + '_ {
    move |e| RestoreError::Io {
        path: path.to_path_buf(),
        source: errno_io(e),
    }
}

fn bad(path: &Path, reason: impl Into<String>) -> RestoreError {
    RestoreError::BadOutput {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// The real path of an open directory (no check-then-use: this is where the handle points).
fn fd_path(fd: &OwnedFd, fallback: &Path) -> PathBuf {
    use std::os::fd::AsRawFd;
    std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .ok()
        .filter(|p| p.is_absolute())
        .or_else(|| std::fs::canonicalize(fallback).ok())
        .unwrap_or_else(|| fallback.to_path_buf())
}

impl Output {
    /// Checks the output's name, opens its directory and takes its lock. Fails at once, before
    /// anything is downloaded, when the name is not a plain file name, the directory cannot be
    /// opened, another restore holds the output, or something already exists at the output.
    pub fn prepare(path: &Path) -> Result<Output, RestoreError> {
        let mut out = Output::open(path)?;
        out.lock()?;
        Ok(out)
    }

    /// Checks the output's name and opens its directory, creating nothing: callers that must
    /// check where the output is (the control socket) do so before [`Output::lock`].
    pub fn open(path: &Path) -> Result<Output, RestoreError> {
        let bytes = path.as_os_str().as_bytes();
        if bytes.is_empty() {
            return Err(bad(path, "no output path given"));
        }
        let last = bytes.rsplit(|b| *b == b'/').next().unwrap_or_default();
        if last.is_empty() || last == b"." || last == b".." {
            return Err(bad(path, "the output must name a file, not a directory"));
        }
        let name = OsStr::from_bytes(last).to_os_string();
        let parent = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        // Symlinks in the directory part are followed here, once; the check of where the
        // directory is (for the control socket) is made on the open handle's real path.
        let dir = openat(
            nix::fcntl::AT_FDCWD,
            &parent,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| match e {
            Errno::ENOENT => bad(
                path,
                format!("directory {} does not exist", parent.display()),
            ),
            Errno::ENOTDIR => bad(path, format!("{} is not a directory", parent.display())),
            e => RestoreError::Io {
                path: parent.clone(),
                source: errno_io(e),
            },
        })?;
        let dir_path = fd_path(&dir, &parent);
        let out = Output {
            given: path.to_path_buf(),
            dir,
            dir_path,
            name,
            lock: None,
        };
        if out.exists()? {
            return Err(RestoreError::OutputExists(path.to_path_buf()));
        }
        Ok(out)
    }

    /// Takes the output's lock (a no-op when held), then removes what an interrupted restore
    /// of the same output left behind. Fails when another restore holds it or the output
    /// appeared.
    pub fn lock(&mut self) -> Result<(), RestoreError> {
        if self.lock.is_some() {
            return Ok(());
        }
        self.take_lock()?;
        // Under the lock: no other restore of this output runs, so any private directory of
        // an earlier one is a leftover (a crash or kill -9 mid-restore).
        self.remove_stale_scratch();
        if self.exists()? {
            return Err(RestoreError::OutputExists(self.given.clone()));
        }
        Ok(())
    }

    /// The output as given.
    pub fn path(&self) -> &Path {
        &self.given
    }
    /// The resolved directory the output is created in.
    pub fn dir(&self) -> &Path {
        &self.dir_path
    }
    /// The open directory handle (for checks of who owns it and who may write it).
    pub fn dir_handle(&self) -> &OwnedFd {
        &self.dir
    }
    pub fn name(&self) -> &OsStr {
        &self.name
    }
    /// The resolved path of the output.
    pub fn final_path(&self) -> PathBuf {
        self.dir_path.join(&self.name)
    }

    fn sibling(&self, suffix: &str) -> OsString {
        let mut n = self.name.clone();
        n.push(suffix);
        n
    }

    fn hidden(&self, suffix: &str) -> OsString {
        let mut n = OsString::from(".");
        n.push(&self.name);
        n.push(suffix);
        n
    }

    /// Whether anything (a file, a link, a directory) exists at the output's name.
    fn exists(&self) -> Result<bool, RestoreError> {
        match fstatat(
            &self.dir,
            self.name.as_os_str(),
            AtFlags::AT_SYMLINK_NOFOLLOW,
        ) {
            Ok(_) => Ok(true),
            Err(Errno::ENOENT) => Ok(false),
            Err(e) => Err(at(&self.final_path())(e)),
        }
    }

    /// `flock` on `.NAME.restore-lock`, created if missing (never through a symlink). The file
    /// is removed when the lock is released; a lock taken on a file that was removed meanwhile
    /// (its inode no longer at the name) is retried, so two restores never both hold it.
    fn take_lock(&mut self) -> Result<(), RestoreError> {
        let name = self.hidden(".restore-lock");
        let lock_path = self.dir_path.join(&name);
        for _ in 0..20 {
            let fd = openat(
                &self.dir,
                name.as_os_str(),
                OFlag::O_RDWR | OFlag::O_CREAT | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                Mode::from_bits_truncate(0o600),
            )
            .map_err(|e| match e {
                Errno::ELOOP => bad(
                    &self.given,
                    format!(
                        "{} is a symbolic link; refusing to use it",
                        lock_path.display()
                    ),
                ),
                e => at(&lock_path)(e),
            })?;
            let file = File::from(fd);
            match file.try_lock() {
                Ok(()) => {}
                Err(std::fs::TryLockError::WouldBlock) => {
                    return Err(RestoreError::OutputBusy(self.given.clone()));
                }
                Err(std::fs::TryLockError::Error(source)) => {
                    return Err(RestoreError::Io {
                        path: lock_path,
                        source,
                    });
                }
            }
            let held = file.metadata().map_err(|source| RestoreError::Io {
                path: lock_path.clone(),
                source,
            })?;
            let current = fstatat(&self.dir, name.as_os_str(), AtFlags::AT_SYMLINK_NOFOLLOW);
            if matches!(current, Ok(st) if st.st_ino == held.ino() && st.st_dev == held.dev()) {
                // The lock lives as long as this descriptor.
                self.lock = Some((file, name));
                return Ok(());
            }
        }
        Err(RestoreError::OutputBusy(self.given.clone()))
    }

    /// Removes private directories left by earlier restores of this output that did not finish
    /// (only directories this process's user owns, entered without following links).
    fn remove_stale_scratch(&self) {
        let prefix = self.hidden(".restore-");
        let prefix = prefix.as_bytes();
        let Ok(rd) = std::fs::read_dir(&self.dir_path) else {
            return;
        };
        for e in rd.flatten() {
            let n = e.file_name();
            let b = n.as_bytes();
            if b.len() == prefix.len() + 16
                && b.starts_with(prefix)
                && b[prefix.len()..].iter().all(u8::is_ascii_hexdigit)
                && let Ok(d) = openat(
                    &self.dir,
                    n.as_os_str(),
                    OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                    Mode::empty(),
                )
                && nix::sys::stat::fstat(&d)
                    .is_ok_and(|st| st.st_uid == nix::unistd::geteuid().as_raw())
            {
                info!(dir = %self.dir_path.join(&n).display(), "removing what an interrupted restore left behind");
                empty_dir(&d);
                let _ = unlinkat(&self.dir, n.as_os_str(), UnlinkatFlags::RemoveDir);
            }
        }
    }

    /// Creates the private working directory of this restore.
    pub(crate) fn scratch(&self) -> Result<Scratch, RestoreError> {
        for _ in 0..8 {
            let name = self.hidden(&format!(".restore-{:016x}", rand::random::<u64>()));
            let path = self.dir_path.join(&name);
            match nix::sys::stat::mkdirat(
                &self.dir,
                name.as_os_str(),
                Mode::from_bits_truncate(0o700),
            ) {
                Ok(()) => {}
                Err(Errno::EEXIST) => continue,
                Err(e) => return Err(at(&path)(e)),
            }
            let dir = openat(
                &self.dir,
                name.as_os_str(),
                OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                Mode::empty(),
            )
            .map_err(at(&path))?;
            return Ok(Scratch {
                dir,
                parent: self.dir.try_clone().map_err(|source| RestoreError::Io {
                    path: self.dir_path.clone(),
                    source,
                })?,
                name,
                path,
                keep: false,
            });
        }
        Err(RestoreError::Io {
            path: self.dir_path.clone(),
            source: io::Error::new(io::ErrorKind::AlreadyExists, "no free scratch name"),
        })
    }

    /// Puts the finished database (`file` in `scratch`) in place: mode and owner first, then
    /// stale `-wal`/`-shm`/`-journal` beside the output moved aside, then a hard link that
    /// fails if anything appeared at the output meanwhile. Returns the files moved aside.
    pub(crate) fn publish(
        &self,
        scratch: &Scratch,
        file: &str,
        ownership: Option<Ownership>,
    ) -> Result<Vec<PathBuf>, RestoreError> {
        let f = scratch.open(file)?;
        if let Some(o) = ownership {
            apply_ownership(&f, &scratch.path(file), o)?;
        }
        drop(f);
        let moved = self.move_aside_sidecars()?;
        match nix::unistd::linkat(
            &scratch.dir,
            file,
            &self.dir,
            self.name.as_os_str(),
            AtFlags::empty(),
        ) {
            Ok(()) => {}
            Err(Errno::EEXIST) => return Err(RestoreError::OutputExists(self.given.clone())),
            Err(e) => return Err(at(&self.final_path())(e)),
        }
        nix::unistd::fsync(&self.dir).map_err(at(&self.dir_path))?;
        Ok(moved)
    }

    /// Renames `side` to a free `SIDE.orphaned-STAMP[-N]` name: never over an existing file
    /// (two restores in one second), and a symlink is moved, never followed.
    fn rename_aside(&self, side: &OsStr, stamp: u64) -> Result<OsString, Errno> {
        for n in 0..100 {
            let mut aside = side.to_os_string();
            aside.push(format!(".orphaned-{stamp}"));
            if n > 0 {
                aside.push(format!("-{n}"));
            }
            #[cfg(all(target_os = "linux", target_env = "gnu"))]
            let res = nix::fcntl::renameat2(
                &self.dir,
                side,
                &self.dir,
                aside.as_os_str(),
                nix::fcntl::RenameFlags::RENAME_NOREPLACE,
            );
            #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
            let res = match fstatat(&self.dir, aside.as_os_str(), AtFlags::AT_SYMLINK_NOFOLLOW) {
                Ok(_) => Err(Errno::EEXIST),
                Err(_) => nix::fcntl::renameat(&self.dir, side, &self.dir, aside.as_os_str()),
            };
            match res {
                Ok(()) => return Ok(aside),
                Err(Errno::EEXIST) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(Errno::EEXIST)
    }

    fn move_aside_sidecars(&self) -> Result<Vec<PathBuf>, RestoreError> {
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let mut moved = Vec::new();
        for suffix in ["-wal", "-shm", "-journal"] {
            let side = self.sibling(suffix);
            match fstatat(&self.dir, side.as_os_str(), AtFlags::AT_SYMLINK_NOFOLLOW) {
                Ok(_) => {}
                Err(Errno::ENOENT) => continue,
                Err(e) => return Err(at(&self.dir_path.join(&side))(e)),
            }
            let from = self.dir_path.join(&side);
            let aside = self.rename_aside(&side, stamp).map_err(at(&from))?;
            let to = self.dir_path.join(&aside);
            warn!(file = %from.display(), moved_to = %to.display(), "a {suffix} file without its database lies beside the restore output; SQLite would replay it over the restored database, so it is moved aside");
            moved.push(to);
        }
        Ok(moved)
    }
}

impl Drop for Output {
    fn drop(&mut self) {
        if let Some((file, name)) = self.lock.take() {
            // Remove the lock file while holding the lock, only if it is still ours.
            if let (Ok(held), Ok(st)) = (
                file.metadata(),
                fstatat(&self.dir, name.as_os_str(), AtFlags::AT_SYMLINK_NOFOLLOW),
            ) && st.st_ino == held.ino()
                && st.st_dev == held.dev()
            {
                let _ = unlinkat(&self.dir, name.as_os_str(), UnlinkatFlags::NoRemoveDir);
            }
            drop(file);
        }
    }
}

fn apply_ownership(f: &File, path: &Path, o: Ownership) -> Result<(), RestoreError> {
    use nix::unistd::{Gid, Uid, fchown};
    let mut mode = o.mode & 0o777;
    let (uid, gid) = (o.uid.map(Uid::from_raw), o.gid.map(Gid::from_raw));
    if uid.is_some() || gid.is_some() {
        match fchown(f.as_fd(), uid, gid) {
            Ok(()) => {}
            Err(Errno::EPERM) => {
                // Not root: the owner stays this process's user. Keep the group if allowed;
                // otherwise nobody but the owner may read it (never broader than asked).
                if gid.is_none() || fchown(f.as_fd(), None, gid).is_err() {
                    mode &= !0o077;
                }
            }
            Err(e) => return Err(at(path)(e)),
        }
    }
    nix::sys::stat::fchmod(f.as_fd(), Mode::from_bits_truncate(mode)).map_err(at(path))
}

/// Unlinks every entry of a directory (one level: the scratch directories hold only files).
fn empty_dir(d: &OwnedFd) {
    let Ok(dup) = d.try_clone() else { return };
    let Ok(mut dir) = nix::dir::Dir::from_fd(dup) else {
        return;
    };
    let names: Vec<std::ffi::CString> = dir
        .iter()
        .flatten()
        .map(|e| e.file_name().to_owned())
        .filter(|n| n.as_bytes() != b"." && n.as_bytes() != b"..")
        .collect();
    for n in names {
        let _ = unlinkat(d, n.as_c_str(), UnlinkatFlags::NoRemoveDir);
    }
}

/// A restore's private working directory. It and everything in it are removed on drop.
#[derive(Debug)]
pub(crate) struct Scratch {
    dir: OwnedFd,
    parent: OwnedFd,
    name: OsString,
    path: PathBuf,
    keep: bool,
}

impl Scratch {
    /// A path inside the directory, for messages and for SQLite (see [`Scratch::check_same`]).
    pub fn path(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// Creates a new file (`O_EXCL | O_NOFOLLOW`), readable and writable.
    pub fn create(&self, name: &str) -> Result<File, RestoreError> {
        openat(
            &self.dir,
            name,
            OFlag::O_RDWR | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(0o666),
        )
        .map(File::from)
        .map_err(at(&self.path(name)))
    }

    /// Opens an existing file of the directory for reading and writing.
    pub fn open(&self, name: &str) -> Result<File, RestoreError> {
        openat(
            &self.dir,
            name,
            OFlag::O_RDWR | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map(File::from)
        .map_err(at(&self.path(name)))
    }

    pub fn remove(&self, name: &str) {
        let _ = unlinkat(&self.dir, name, UnlinkatFlags::NoRemoveDir);
    }

    /// Whether `path` (the textual path SQLite opens) still leads to this directory's `name`:
    /// checked around the integrity check, so a directory renamed and replaced by someone who
    /// can write the output's directory cannot make us check their file instead of ours.
    pub fn check_same(&self, name: &str) -> Result<(), RestoreError> {
        let ours =
            fstatat(&self.dir, name, AtFlags::AT_SYMLINK_NOFOLLOW).map_err(at(&self.path(name)))?;
        let seen = std::fs::metadata(self.path(name)).map_err(|source| RestoreError::Io {
            path: self.path(name),
            source,
        })?;
        if seen.ino() != ours.st_ino || seen.dev() != ours.st_dev {
            return Err(RestoreError::Io {
                path: self.path(name),
                source: io::Error::other(
                    "the restore's private directory was replaced while it worked; another user can write the output's directory",
                ),
            });
        }
        Ok(())
    }
}

impl Scratch {
    /// Removes the directory and everything in it (idempotent). Called by the restore as soon
    /// as it ends, while background tasks that still hold the directory may be winding down:
    /// they only read or write descriptors they already have, and create nothing.
    pub fn cleanup(&self) {
        if self.keep {
            return;
        }
        empty_dir(&self.dir);
        let _ = unlinkat(
            &self.parent,
            self.name.as_os_str(),
            UnlinkatFlags::RemoveDir,
        );
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        self.cleanup();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn names_are_checked_before_anything_else() {
        for bad in ["", "dir/", "dir/.", "dir/..", ".", "..", "/"] {
            let err = Output::prepare(Path::new(bad)).unwrap_err();
            assert!(
                matches!(err, RestoreError::BadOutput { .. }),
                "{bad:?}: {err}"
            );
        }
        let err = Output::prepare(Path::new("/nonexistent-dir-xyz/out.db")).unwrap_err();
        assert!(err.to_string().contains("does not exist"), "{err}");
    }

    #[test]
    fn second_prepare_of_one_output_is_busy_and_lock_file_goes_away() {
        let d = tempfile::tempdir().unwrap();
        let out = d.path().join("x.db");
        let a = Output::prepare(&out).unwrap();
        let err = Output::prepare(&out).unwrap_err();
        assert!(matches!(err, RestoreError::OutputBusy(_)), "{err}");
        assert!(Output::prepare(&d.path().join("other.db")).is_ok());
        drop(a);
        assert!(!d.path().join(".x.db.restore-lock").exists());
        drop(Output::prepare(&out).unwrap());
    }

    #[test]
    fn a_symlink_at_the_lock_or_the_output_is_never_followed() {
        let d = tempfile::tempdir().unwrap();
        let victim = d.path().join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        std::os::unix::fs::symlink(&victim, d.path().join(".x.db.restore-lock")).unwrap();
        let err = Output::prepare(&d.path().join("x.db")).unwrap_err();
        assert!(err.to_string().contains("symbolic link"), "{err}");
        std::os::unix::fs::symlink(&victim, d.path().join("y.db")).unwrap();
        let err = Output::prepare(&d.path().join("y.db")).unwrap_err();
        assert!(matches!(err, RestoreError::OutputExists(_)), "{err}");
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
    }

    #[test]
    fn publish_links_sets_mode_and_moves_sidecars_aside() {
        let d = tempfile::tempdir().unwrap();
        let out = Output::prepare(&d.path().join("x.db")).unwrap();
        std::fs::write(d.path().join("x.db-wal"), b"stale").unwrap();
        let s = out.scratch().unwrap();
        let meta = std::fs::metadata(&s.path).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o700);
        std::io::Write::write_all(&mut s.create("db").unwrap(), b"data").unwrap();
        assert!(s.create("db").is_err(), "exclusive create");
        let moved = out
            .publish(
                &s,
                "db",
                Some(Ownership {
                    uid: None,
                    gid: None,
                    mode: 0o640,
                }),
            )
            .unwrap();
        assert_eq!(moved.len(), 1);
        assert!(!d.path().join("x.db-wal").exists());
        assert_eq!(std::fs::read(&moved[0]).unwrap(), b"stale");
        assert_eq!(std::fs::read(d.path().join("x.db")).unwrap(), b"data");
        let mode = std::fs::metadata(d.path().join("x.db"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o640);
        let dir = s.path.clone();
        drop(s);
        assert!(!dir.exists(), "scratch directory removed");
    }

    #[test]
    fn leftovers_of_an_interrupted_restore_are_removed_under_the_lock() {
        let d = tempfile::tempdir().unwrap();
        let out = Output::prepare(&d.path().join("x.db")).unwrap();
        let mut s = out.scratch().unwrap();
        s.create("db").unwrap();
        s.keep = true; // as if the process had died
        let left = s.path.clone();
        drop(s);
        drop(out);
        assert!(left.exists());
        let _out = Output::prepare(&d.path().join("x.db")).unwrap();
        assert!(!left.exists());
    }
}
