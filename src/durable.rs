//! Small files replaced durably, the one way every such file is written (the shadow's
//! generation and lineage files, a standby's position and promotion marker, the drill results):
//! a new temporary file beside the target under a random name, created exclusively without
//! following a link (`O_CREAT|O_EXCL|O_NOFOLLOW`: whoever can write the directory cannot make
//! us write through a link planted at a predictable name), synced, renamed over the target (a
//! link at the target is replaced, never followed), and the directory synced, so after a crash
//! the file is either the old one or the new one, whole.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// Replaces `path` with `data` (see the module comment); a new file gets `mode` (less the
/// umask). On failure the temporary file is removed and `path` is as it was.
pub fn replace(path: &Path, data: &[u8], mode: u32) -> io::Result<()> {
    let tmp = tmp_name(path);
    let res = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC)
            .open(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, path)?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            File::open(dir)?.sync_all()?;
        }
        Ok(())
    })();
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res
}

/// `.NAME.XXXXXXXX.tmp` beside `path`: hidden, unpredictable, and ending in `.tmp` so the
/// cleanups of leftovers (the shadow's, a directory replica's) recognise it.
fn tmp_name(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.{:08x}.tmp", rand::random::<u32>()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn replaces_whole_and_never_writes_through_a_link() {
        let d = tempfile::tempdir().unwrap();
        let target = d.path().join("state");
        replace(&target, b"one", 0o600).unwrap();
        replace(&target, b"two", 0o600).unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"two");
        assert_eq!(
            std::fs::metadata(&target).unwrap().permissions().mode() & 0o777,
            0o600
        );
        // A link at the target is replaced by the file, its destination untouched.
        let victim = d.path().join("victim");
        std::fs::write(&victim, b"keep").unwrap();
        let linked = d.path().join("linked");
        std::os::unix::fs::symlink(&victim, &linked).unwrap();
        replace(&linked, b"new", 0o600).unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"keep");
        assert!(!std::fs::symlink_metadata(&linked).unwrap().is_symlink());
        // Nothing is left beside it.
        let names: Vec<_> = std::fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert!(names.iter().all(|n| !n.ends_with(".tmp")), "{names:?}");
        // A directory that cannot be written: an error, the old file kept.
        assert!(replace(&d.path().join("missing/state"), b"x", 0o600).is_err());
    }
}
