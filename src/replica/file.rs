//! The `file` target: the replica is a directory, objects are files, created-at is the mtime.
//! Writes go to a temporary file that is fsynced, renamed into place, and the directory fsynced,
//! so a crash leaves either the old object or the new one, never half of one.

use std::io;
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use tokio::io::AsyncWriteExt;

use super::{Listing, ObjectInfo, ObjectReader, ObjectStore, Precondition, StoreError};

#[derive(Debug, Clone)]
pub struct FileStore {
    root: PathBuf,
}

impl FileStore {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        FileStore { root: root.into() }
    }

    /// `put` and `put_new`: a temporary file, synced, renamed over the name (or, create-only,
    /// renamed only where no file is: `renameat2(RENAME_NOREPLACE)`).
    async fn put_with(
        &self,
        key: &str,
        mut body: ObjectReader,
        create_only: bool,
    ) -> Result<ObjectInfo, StoreError> {
        let path = self.path(key);
        let dir = path.parent().expect("key has a parent").to_path_buf();
        let name = path
            .file_name()
            .expect("key has a name")
            .to_string_lossy()
            .into_owned();
        let tmp = dir.join(format!(".{name}.{:08x}.tmp", rand::random::<u32>()));
        let result: io::Result<ObjectInfo> = async {
            tokio::fs::create_dir_all(&dir).await?;
            let mut f = tokio::fs::File::create(&tmp).await?;
            tokio::io::copy(&mut body, &mut f).await?;
            f.flush().await?;
            f.sync_all().await?;
            drop(f);
            if create_only {
                let (from, to) = (tmp.clone(), path.clone());
                tokio::task::spawn_blocking(move || rename_noreplace(&from, &to))
                    .await
                    .map_err(io::Error::other)??;
            } else {
                tokio::fs::rename(&tmp, &path).await?;
            }
            fsync_dir(&dir).await?;
            let meta = tokio::fs::metadata(&path).await?;
            Ok(ObjectInfo {
                name,
                size: meta.len(),
                modified: meta.modified()?,
            })
        }
        .await;
        if result.is_err() {
            let _ = tokio::fs::remove_file(&tmp).await;
        }
        result.map_err(|e| {
            if e.kind() == io::ErrorKind::AlreadyExists {
                StoreError::Exists {
                    store: self.url(),
                    key: key.to_string(),
                }
            } else {
                self.io_err("put", key, e)
            }
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn path(&self, key: &str) -> PathBuf {
        self.root.join(key.trim_start_matches('/'))
    }

    fn io_err(&self, op: &'static str, key: &str, source: io::Error) -> StoreError {
        if source.kind() == io::ErrorKind::NotFound && op == "get" {
            return StoreError::NotFound {
                store: self.url(),
                key: key.to_string(),
            };
        }
        StoreError::Io {
            store: self.url(),
            op,
            key: key.to_string(),
            source,
        }
    }
}

async fn fsync_dir(dir: &Path) -> io::Result<()> {
    tokio::fs::File::open(dir).await?.sync_all().await
}

/// The version token of a small file object: its content, hex-encoded (lease objects are a few
/// hundred bytes, and content equality is exactly the condition wanted).
fn version_of(data: &[u8]) -> String {
    data.iter().map(|b| format!("{b:02x}")).collect()
}

/// Runs `f` holding an exclusive `flock` on `dir`. Every conditional write and delete takes it,
/// so compare-and-swap on objects in that directory is atomic between processes on this host.
fn with_dir_lock<T>(dir: &Path, f: impl FnOnce() -> io::Result<T>) -> io::Result<T> {
    use nix::fcntl::{Flock, FlockArg};
    std::fs::create_dir_all(dir)?;
    let d = std::fs::File::open(dir)?;
    let _lock = Flock::lock(d, FlockArg::LockExclusive).map_err(|(_, e)| io::Error::from(e))?;
    f()
}

fn read_optional(path: &Path) -> io::Result<Option<Vec<u8>>> {
    match std::fs::read(path) {
        Ok(d) => Ok(Some(d)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Renames `from` to `to` unless `to` exists (AlreadyExists then), atomically: the kernel's
/// `RENAME_NOREPLACE`, or a hard link (which never replaces) where the filesystem lacks it.
fn rename_noreplace(from: &Path, to: &Path) -> io::Result<()> {
    use nix::fcntl::{AT_FDCWD, RenameFlags, renameat2};
    match renameat2(AT_FDCWD, from, AT_FDCWD, to, RenameFlags::RENAME_NOREPLACE) {
        Ok(()) => Ok(()),
        Err(nix::errno::Errno::EINVAL) => {
            std::fs::hard_link(from, to)?;
            std::fs::remove_file(from)
        }
        Err(e) => Err(io::Error::from(e)),
    }
}

fn put_if_blocking(path: &Path, data: &[u8], cond: &Precondition) -> io::Result<Option<String>> {
    use std::io::Write;
    let dir = path.parent().expect("key has a parent");
    with_dir_lock(dir, || {
        let current = read_optional(path)?;
        let holds = match (cond, &current) {
            (Precondition::Absent, None) => true,
            (Precondition::Version(v), Some(c)) => version_of(c) == *v,
            _ => false,
        };
        if !holds {
            return Ok(None);
        }
        let name = path.file_name().expect("key has a name").to_string_lossy();
        let tmp = dir.join(format!(".{name}.{:08x}.tmp", rand::random::<u32>()));
        let res = (|| {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(data)?;
            f.sync_all()?;
            std::fs::rename(&tmp, path)?;
            std::fs::File::open(dir)?.sync_all()
        })();
        if res.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        res.map(|()| Some(version_of(data)))
    })
}

/// Removes `.NAME.XXXXXXXX.tmp` files (what `put` writes before its rename) older than
/// `older_than` under `dir`, recursively, without following symlinks.
fn remove_tmp_files(dir: &Path, older_than: std::time::Duration) -> io::Result<usize> {
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    let mut n = 0;
    for e in rd.flatten() {
        let Ok(ft) = e.file_type() else { continue };
        let name = e.file_name().to_string_lossy().into_owned();
        if ft.is_dir() {
            n += remove_tmp_files(&e.path(), older_than)?;
        } else if ft.is_file()
            && name.starts_with('.')
            && name.ends_with(".tmp")
            && e.metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age >= older_than)
        {
            match std::fs::remove_file(e.path()) {
                Ok(()) => n += 1,
                Err(err) if err.kind() == io::ErrorKind::NotFound => {}
                Err(err) => return Err(err),
            }
        }
    }
    Ok(n)
}

#[async_trait]
impl ObjectStore for FileStore {
    fn kind(&self) -> &'static str {
        "file"
    }

    fn local_path(&self, key: &str) -> Option<PathBuf> {
        Some(self.path(key))
    }

    fn url(&self) -> String {
        format!("file://{}", self.root.display())
    }

    async fn list(&self, dir: &str) -> Result<Listing, StoreError> {
        let path = self.path(dir);
        let mut listing = Listing::default();
        let mut rd = match tokio::fs::read_dir(&path).await {
            Ok(rd) => rd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(listing),
            Err(e) => return Err(self.io_err("list", dir, e)),
        };
        while let Some(entry) = rd
            .next_entry()
            .await
            .map_err(|e| self.io_err("list", dir, e))?
        {
            let name = entry.file_name().to_string_lossy().into_owned();
            let meta = match entry.metadata().await {
                Ok(m) => m,
                // Removed between readdir and stat (retention racing a listing).
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(self.io_err("list", dir, e)),
            };
            if meta.is_dir() {
                listing.dirs.push(name);
            } else if !name.ends_with(".tmp") {
                listing.objects.push(ObjectInfo {
                    name,
                    size: meta.len(),
                    modified: meta.modified().map_err(|e| self.io_err("list", dir, e))?,
                });
            }
        }
        Ok(listing)
    }

    async fn put(&self, key: &str, body: ObjectReader) -> Result<ObjectInfo, StoreError> {
        self.put_with(key, body, false).await
    }

    async fn put_new(&self, key: &str, body: ObjectReader) -> Result<ObjectInfo, StoreError> {
        self.put_with(key, body, true).await
    }

    async fn get_stat(
        &self,
        key: &str,
    ) -> Result<(ObjectReader, Option<std::time::SystemTime>), StoreError> {
        let f = tokio::fs::File::open(self.path(key))
            .await
            .map_err(|e| self.io_err("get", key, e))?;
        // The open file's own time: a rename over the name after the open does not change it.
        let modified = f.metadata().await.and_then(|m| m.modified()).ok();
        Ok((
            Box::pin(tokio::io::BufReader::with_capacity(256 * 1024, f)),
            modified,
        ))
    }

    async fn get(&self, key: &str) -> Result<ObjectReader, StoreError> {
        let f = tokio::fs::File::open(self.path(key))
            .await
            .map_err(|e| self.io_err("get", key, e))?;
        Ok(Box::pin(tokio::io::BufReader::with_capacity(256 * 1024, f)))
    }

    async fn get_range(
        &self,
        key: &str,
        start: u64,
        end: u64,
        buf: &mut Vec<u8>,
    ) -> Result<(), StoreError> {
        use std::io::{Read, Seek, SeekFrom};
        let path = self.path(key);
        // The caller's buffer goes to the blocking thread and comes back with the range.
        let mut owned = std::mem::take(buf);
        let (owned, res) = tokio::task::spawn_blocking(move || {
            let res = std::fs::File::open(path).and_then(|mut f| {
                f.seek(SeekFrom::Start(start))?;
                f.take(end.saturating_sub(start)).read_to_end(&mut owned)
            });
            (owned, res)
        })
        .await
        .map_err(|e| self.io_err("get", key, io::Error::other(e)))?;
        *buf = owned;
        res.map(drop).map_err(|e| self.io_err("get", key, e))
    }

    async fn remove_incomplete(
        &self,
        older_than: std::time::Duration,
    ) -> Result<usize, StoreError> {
        let root = self.root.clone();
        tokio::task::spawn_blocking(move || remove_tmp_files(&root, older_than))
            .await
            .map_err(io::Error::other)
            .and_then(|r| r)
            .map_err(|e| self.io_err("clean", "", e))
    }

    async fn head(&self, key: &str) -> Result<Option<ObjectInfo>, StoreError> {
        match tokio::fs::metadata(self.path(key)).await {
            Ok(m) if m.is_file() => Ok(Some(ObjectInfo {
                name: key.rsplit('/').next().unwrap_or(key).to_string(),
                size: m.len(),
                modified: m.modified().map_err(|e| self.io_err("head", key, e))?,
            })),
            Ok(_) => Ok(None),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(self.io_err("head", key, e)),
        }
    }

    async fn delete(&self, keys: &[String]) -> Result<(), StoreError> {
        for key in keys {
            match tokio::fs::remove_file(self.path(key)).await {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(self.io_err("delete", key, e)),
            }
        }
        Ok(())
    }

    async fn delete_dir(&self, dir: &str) -> Result<(), StoreError> {
        match tokio::fs::remove_dir_all(self.path(dir)).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(self.io_err("delete", dir, e)),
        }
    }

    async fn get_versioned(&self, key: &str) -> Result<Option<(Vec<u8>, String)>, StoreError> {
        match tokio::fs::read(self.path(key)).await {
            Ok(d) => {
                let v = version_of(&d);
                Ok(Some((d, v)))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(self.io_err("get", key, e)),
        }
    }

    async fn put_if(
        &self,
        key: &str,
        data: Vec<u8>,
        cond: &Precondition,
    ) -> Result<Option<String>, StoreError> {
        let (path, cond) = (self.path(key), cond.clone());
        tokio::task::spawn_blocking(move || put_if_blocking(&path, &data, &cond))
            .await
            .map_err(io::Error::other)
            .and_then(|r| r)
            .map_err(|e| self.io_err("put", key, e))
    }

    async fn delete_if(&self, key: &str, version: &str) -> Result<bool, StoreError> {
        let (path, version) = (self.path(key), version.to_string());
        tokio::task::spawn_blocking(move || {
            let dir = path.parent().expect("key has a parent").to_path_buf();
            with_dir_lock(&dir, || match read_optional(&path)? {
                Some(c) if version_of(&c) == version => std::fs::remove_file(&path).map(|()| true),
                _ => Ok(false),
            })
        })
        .await
        .map_err(io::Error::other)
        .and_then(|r| r)
        .map_err(|e| self.io_err("delete", key, e))
    }
}
