//! Wakes a database's worker the moment its file is renamed over, deleted or created, through
//! one inotify instance for the whole process (one descriptor, one watch per directory, shared
//! by every database in it). The tick still checks the file on every pass: this only shortens
//! the time between `mv other.db app.db` and the worker letting go of the old file, from up to
//! a monitor interval to about a millisecond, before an application opens the new file with
//! the old file's -wal (see `Db::start_over`). A parked database (see `Db::park`) also
//! watches its -wal for writes, so it reopens within a millisecond of the application's first
//! write rather than at the next tick. Without inotify (limits reached, an old kernel, a lost
//! event on queue overflow) the worker falls back to its tick and says so once.

use std::collections::HashMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, Weak};

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, WatchDescriptor};
use tokio::sync::Notify;
use tracing::{debug, warn};

struct Watcher {
    inotify: Inotify,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Watched directory → its watch and the files of interest in it.
    dirs: HashMap<PathBuf, Dir>,
    by_wd: HashMap<WatchDescriptor, PathBuf>,
}

struct Dir {
    wd: WatchDescriptor,
    /// Whether the watch includes IN_MODIFY: only while a subscriber wants writes (a parked
    /// database). Otherwise every application write to an active database's -wal (several
    /// per commit) would wake the inotify thread for nothing: at 600 commits a second that was
    /// ~10% of the daemon's CPU in `perf`.
    writes: bool,
    /// Each subscriber, and whether it wants writes too (not only names changing).
    files: HashMap<OsString, Vec<(Weak<Notify>, bool)>>,
}

static WATCHER: OnceLock<Option<Arc<Watcher>>> = OnceLock::new();

/// The process's watcher. Its events are read by a thread of its own (blocking reads), not a
/// runtime task: it serves every runtime of the process and never depends on one staying up.
fn watcher() -> Option<Arc<Watcher>> {
    WATCHER
        .get_or_init(|| {
            let inotify = match Inotify::init(InitFlags::IN_CLOEXEC) {
                Ok(i) => i,
                Err(e) => {
                    warn!(error = %e, "inotify unavailable; a replaced database file is noticed at the next tick");
                    return None;
                }
            };
            let w = Arc::new(Watcher {
                inotify,
                state: Mutex::new(State::default()),
            });
            let pump = w.clone();
            let spawned = std::thread::Builder::new()
                .name("litestreamd-inotify".into())
                .spawn(move || pump.run());
            if let Err(e) = spawned {
                warn!(error = %e, "cannot start the inotify thread; a replaced database file is noticed at the next tick");
                return None;
            }
            Some(w)
        })
        .clone()
}

impl Watcher {
    fn run(&self) {
        loop {
            let events = match self.inotify.read_events() {
                Ok(e) => e,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => {
                    warn!(error = %e, "reading inotify events failed; a replaced database file is noticed at the next tick");
                    return;
                }
            };
            let st = self.state.lock().expect("watcher");
            for e in events {
                if e.mask.contains(AddWatchFlags::IN_Q_OVERFLOW) {
                    // Events were lost: wake everyone, each worker then looks at its files.
                    warn!("inotify queue overflowed; every database looks at its files now");
                    for d in st.dirs.values() {
                        for (n, _) in d.files.values().flatten() {
                            if let Some(n) = n.upgrade() {
                                n.notify_one();
                            }
                        }
                    }
                    continue;
                }
                let (Some(dir), Some(name)) = (st.by_wd.get(&e.wd), e.name) else {
                    continue;
                };
                if let Some(subs) = st.dirs.get(dir).and_then(|d| d.files.get(&name)) {
                    let write = e.mask == AddWatchFlags::IN_MODIFY;
                    for (n, _) in subs.iter().filter(|(_, writes)| *writes || !write) {
                        if let Some(n) = n.upgrade() {
                            n.notify_one();
                        }
                    }
                }
            }
        }
    }
}

/// A subscription to one file's name in its directory. Dropping it ends the subscription.
pub struct FileWatch {
    notify: Arc<Notify>,
    dir: PathBuf,
    name: OsString,
}

impl FileWatch {
    /// Resolves when the file was created, deleted or renamed (over) since the last call, or
    /// (from [`watch_writes`]) written.
    pub async fn changed(&self) {
        self.notify.notified().await
    }
}

/// Watches `file` (its name in its directory). None when inotify is not available or the
/// directory cannot be watched (the caller's tick covers it).
pub fn watch_file(file: &Path) -> Option<FileWatch> {
    subscribe(file, false)
}

/// Like [`watch_file`], and also wakes on every write to the file.
pub fn watch_writes(file: &Path) -> Option<FileWatch> {
    subscribe(file, true)
}

fn subscribe(file: &Path, writes: bool) -> Option<FileWatch> {
    let w = watcher()?;
    let dir = file.parent()?.to_path_buf();
    let name = file.file_name()?.to_os_string();
    let notify = Arc::new(Notify::new());
    let mut s = w.state.lock().expect("watcher");
    if !s.dirs.contains_key(&dir) {
        let wd = match w.inotify.add_watch(&dir, names_mask()) {
            Ok(wd) => wd,
            Err(e) => {
                debug!(dir = %dir.display(), error = %e, "cannot watch the database's directory");
                return None;
            }
        };
        s.by_wd.insert(wd, dir.clone());
        s.dirs.insert(
            dir.clone(),
            Dir {
                wd,
                writes: false,
                files: HashMap::new(),
            },
        );
    }
    let d = s.dirs.get_mut(&dir).expect("inserted above");
    d.files
        .entry(name.clone())
        .or_default()
        .push((Arc::downgrade(&notify), writes));
    if writes && !d.writes {
        // Same directory, same watch descriptor: the mask is replaced.
        match w
            .inotify
            .add_watch(&dir, names_mask() | AddWatchFlags::IN_MODIFY)
        {
            Ok(_) => d.writes = true,
            Err(e) => {
                debug!(dir = %dir.display(), error = %e, "cannot watch writes in the database's directory")
            }
        }
    }
    Some(FileWatch { notify, dir, name })
}

/// What every directory watch reports: names created, deleted, renamed (no writes).
fn names_mask() -> AddWatchFlags {
    AddWatchFlags::IN_CREATE
        | AddWatchFlags::IN_DELETE
        | AddWatchFlags::IN_MOVED_TO
        | AddWatchFlags::IN_MOVED_FROM
        | AddWatchFlags::IN_ONLYDIR
}

impl Drop for FileWatch {
    fn drop(&mut self) {
        let Some(Some(w)) = WATCHER.get() else {
            return;
        };
        let mut s = w.state.lock().expect("watcher");
        let Some(d) = s.dirs.get_mut(&self.dir) else {
            return;
        };
        if let Some(subs) = d.files.get_mut(&self.name) {
            subs.retain(|(w, _)| w.strong_count() > 0 && !std::ptr::eq(w.as_ptr(), &*self.notify));
            if subs.is_empty() {
                d.files.remove(&self.name);
            }
        }
        if d.files.is_empty() {
            let wd = d.wd;
            s.dirs.remove(&self.dir);
            s.by_wd.remove(&wd);
            let _ = w.inotify.rm_watch(wd);
        } else if d.writes && !d.files.values().flatten().any(|(_, writes)| *writes) {
            // The last subscriber to writes is gone (the database was reopened).
            if w.inotify.add_watch(&self.dir, names_mask()).is_ok() {
                d.writes = false;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn a_rename_over_the_file_wakes_its_watcher_only() {
        let d = tempfile::tempdir().unwrap();
        let db = d.path().join("app.db");
        std::fs::write(&db, b"a").unwrap();
        let w = watch_file(&db).expect("inotify works here");
        let other = watch_file(&d.path().join("other.db")).unwrap();
        std::fs::write(d.path().join("new.db"), b"b").unwrap();
        std::fs::rename(d.path().join("new.db"), &db).unwrap();
        tokio::time::timeout(Duration::from_secs(5), w.changed())
            .await
            .expect("woken by the rename");
        assert!(
            tokio::time::timeout(Duration::from_millis(200), other.changed())
                .await
                .is_err(),
            "another file's watcher is not woken"
        );
        drop(w);
        drop(other);
        let w = watch_file(&db).unwrap();
        std::fs::remove_file(&db).unwrap();
        tokio::time::timeout(Duration::from_secs(5), w.changed())
            .await
            .expect("woken by the delete");
    }

    #[tokio::test]
    async fn writes_wake_only_who_asked_for_them() {
        let d = tempfile::tempdir().unwrap();
        let wal = d.path().join("app.db-wal");
        std::fs::write(&wal, b"a").unwrap();
        let names = watch_file(&wal).unwrap();
        let writes = watch_writes(&wal).unwrap();
        std::fs::OpenOptions::new()
            .append(true)
            .open(&wal)
            .and_then(|mut f| std::io::Write::write_all(&mut f, b"b"))
            .unwrap();
        tokio::time::timeout(Duration::from_secs(5), writes.changed())
            .await
            .expect("woken by the write");
        assert!(
            tokio::time::timeout(Duration::from_millis(200), names.changed())
                .await
                .is_err(),
            "a write does not wake a watch of the name"
        );
        let append = || {
            std::fs::OpenOptions::new()
                .append(true)
                .open(&wal)
                .and_then(|mut f| std::io::Write::write_all(&mut f, b"c"))
                .unwrap()
        };
        // The last write subscriber gone, the directory's watch stops reporting writes (an
        // active database's -wal is written several times per commit)...
        drop(writes);
        {
            let w = WATCHER.get().unwrap().as_ref().unwrap();
            assert!(!w.state.lock().unwrap().dirs[d.path()].writes);
        }
        append();
        // ...and a new one (the database parked again) gets them again.
        let writes = watch_writes(&wal).unwrap();
        append();
        tokio::time::timeout(Duration::from_secs(5), writes.changed())
            .await
            .expect("woken by the write after re-subscribing");
        assert!(
            tokio::time::timeout(Duration::from_millis(200), names.changed())
                .await
                .is_err()
        );
    }
}
