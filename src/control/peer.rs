//! Who is at the other end of a control connection, and what that user could do to a file on
//! their own. The daemon often runs with more rights than its clients (root, or a user in every
//! application's group), so a request that touches files is checked against the *peer's*
//! rights, never only the daemon's.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};

/// The credentials of a connected peer, captured by the kernel at `connect()`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub uid: u32,
    /// Primary group.
    pub gid: u32,
    pub pid: Option<i32>,
    /// Supplementary groups (the primary one included).
    pub groups: Vec<u32>,
}

/// What a file check asks for, as in `access(2)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Want {
    Read,
    /// Create and remove entries: write and search on a directory.
    WriteDir,
}

impl Peer {
    pub fn of(stream: &tokio::net::UnixStream) -> io::Result<Peer> {
        let cred = stream.peer_cred()?;
        let mut groups = peer_groups(stream.as_raw_fd()).unwrap_or_else(|_| {
            // Kernels before 4.13: the user's groups as the group database lists them now.
            grouplist(cred.uid(), cred.gid())
        });
        if !groups.contains(&cred.gid()) {
            groups.push(cred.gid());
        }
        Ok(Peer {
            uid: cred.uid(),
            gid: cred.gid(),
            pid: cred.pid(),
            groups,
        })
    }

    pub fn in_group(&self, gid: u32) -> bool {
        self.gid == gid || self.groups.contains(&gid)
    }

    /// The permission bits of `meta` that apply to this peer (owner, group or other class), as
    /// the kernel picks them. Root is not special-cased here: callers decide what root may do.
    fn bits(&self, meta: &std::fs::Metadata) -> u32 {
        let mode = meta.mode();
        if meta.uid() == self.uid {
            (mode >> 6) & 7
        } else if self.in_group(meta.gid()) {
            (mode >> 3) & 7
        } else {
            mode & 7
        }
    }

    /// Whether the peer, on their own, could reach `path` (search permission on every
    /// directory above it) and do `want` to it. Mode bits only: a POSIX ACL that grants more is
    /// not consulted (the check errs on the side of refusing). `path` should be absolute and
    /// resolved; symlinks on the way are followed as the kernel would.
    pub fn check(&self, path: &Path, want: Want) -> Result<(), String> {
        if self.uid == 0 {
            return Ok(());
        }
        let mut dir = PathBuf::new();
        let parents: Vec<Component> = path
            .parent()
            .map_or(Vec::new(), |p| p.components().collect());
        for c in parents {
            dir.push(c);
            let m = std::fs::metadata(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
            if self.bits(&m) & 1 == 0 {
                return Err(format!(
                    "uid {} cannot enter directory {}",
                    self.uid,
                    dir.display()
                ));
            }
        }
        let m = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let (need, what) = match want {
            Want::Read => (4, "read"),
            Want::WriteDir => (3, "create files in"),
        };
        if self.bits(&m) & need != need {
            return Err(format!(
                "uid {} may not {what} {}",
                self.uid,
                path.display()
            ));
        }
        Ok(())
    }
}

/// `SO_PEERGROUPS`: the peer's groups as the kernel recorded them at connect time. Written by
/// hand because nix has no wrapper for this option; the alternative, `getgrouplist(3)`, reads
/// the group database *now* and misses groups gained with `newgrp`/`sg` or lost since login.
fn peer_groups(fd: RawFd) -> io::Result<Vec<u32>> {
    use nix::libc;
    let mut buf: Vec<libc::gid_t> = vec![0; 64];
    for _ in 0..4 {
        let mut len = (buf.len() * std::mem::size_of::<libc::gid_t>()) as libc::socklen_t;
        // SAFETY: `buf` has room for `len` bytes; the kernel writes at most that many and
        // updates `len` with the size used (or needed, with ERANGE).
        let rc = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_PEERGROUPS,
                buf.as_mut_ptr().cast(),
                &mut len,
            )
        };
        let n = len as usize / std::mem::size_of::<libc::gid_t>();
        if rc == 0 {
            buf.truncate(n);
            return Ok(buf);
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::ERANGE) || n <= buf.len() {
            return Err(e);
        }
        buf.resize(n, 0);
    }
    Err(io::Error::other("SO_PEERGROUPS: group list keeps growing"))
}

fn grouplist(uid: u32, gid: u32) -> Vec<u32> {
    let Ok(Some(user)) = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid)) else {
        return vec![gid];
    };
    let Ok(name) = std::ffi::CString::new(user.name) else {
        return vec![gid];
    };
    nix::unistd::getgrouplist(&name, nix::unistd::Gid::from_raw(gid))
        .map(|gs| gs.iter().map(|g| g.as_raw()).collect())
        .unwrap_or_else(|_| vec![gid])
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn peer(uid: u32, groups: &[u32]) -> Peer {
        Peer {
            uid,
            gid: groups.first().copied().unwrap_or(uid),
            pid: None,
            groups: groups.to_vec(),
        }
    }

    #[test]
    fn mode_bits_decide_by_class() {
        let d = tempfile::tempdir().unwrap();
        std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let f = d.path().join("db");
        std::fs::write(&f, b"x").unwrap();
        // The test runs as root: owner 0, group 0.
        let other = peer(4242, &[4242]);
        let group0 = peer(4242, &[4242, 0]);
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(other.check(&f, Want::Read).is_err());
        assert!(group0.check(&f, Want::Read).is_err());
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o640)).unwrap();
        assert!(other.check(&f, Want::Read).is_err());
        assert!(group0.check(&f, Want::Read).is_ok());
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(other.check(&f, Want::Read).is_ok());
        // A directory above that they cannot enter hides it.
        std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        let err = other.check(&f, Want::Read).unwrap_err();
        assert!(err.contains("cannot enter"), "{err}");
        std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o775)).unwrap();
        assert!(other.check(d.path(), Want::WriteDir).is_err());
        assert!(group0.check(d.path(), Want::WriteDir).is_ok());
        assert!(peer(0, &[0]).check(&f, Want::Read).is_ok());
    }
}
