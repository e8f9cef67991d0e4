//! Replica targets. An [`ObjectStore`] is the small surface a backend implements (list, put, get,
//! delete of keys under the replica root); [`ReplicaClient`] puts the Litestream v0.3 layout on
//! top of it once, so the file, S3 and GCS targets cannot disagree about names or order.

pub mod append_only;
pub mod file;
pub mod gcs;
mod http;
pub mod meter;
pub mod ranged;
pub mod s3;

use std::fmt;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;
use thiserror::Error;
use tokio::io::AsyncRead;

use crate::crypt::{AGE_MAGIC, AgeKeys, DecryptError};
use crate::layout::{self, Pos};

/// A streaming object body. Big snapshots never sit in memory whole.
pub type ObjectReader = Pin<Box<dyn AsyncRead + Send>>;

/// What went wrong in a store operation, always naming the object (or prefix) involved.
#[derive(Debug, Error)]
pub enum StoreError {
    #[error("{store}: {key}: object not found")]
    NotFound { store: String, key: String },
    #[error("{store}: {op} {key}: {source}")]
    Io {
        store: String,
        op: &'static str,
        key: String,
        #[source]
        source: io::Error,
    },
    /// The object is encrypted and cannot be decrypted with this replica's keys.
    #[error("{store}: {key}: {message}")]
    Crypt {
        store: String,
        key: String,
        message: String,
    },
    /// A create-only upload ([`ObjectStore::put_new`]) found the key taken.
    #[error(
        "{store}: {key}: already exists, and an append-only replica never replaces an object (another writer at this path?)"
    )]
    Exists { store: String, key: String },
    /// An append-only replica refused a deletion or replacement (see `append_only`).
    #[error(
        "{store}: {op} {key}: refused: this replica is append-only (append_only = true), so litestreamd never deletes or replaces an object here; the bucket's lifecycle rules do retention"
    )]
    Refused {
        store: String,
        op: &'static str,
        key: String,
    },
    #[error("{store}: {op} {key}: {message}")]
    Backend {
        store: String,
        op: &'static str,
        key: String,
        message: String,
        /// Whether retrying may help (timeouts, 5xx, connection errors).
        retryable: bool,
    },
}

impl StoreError {
    pub fn is_not_found(&self) -> bool {
        matches!(self, StoreError::NotFound { .. })
    }
    pub fn is_retryable(&self) -> bool {
        match self {
            StoreError::NotFound { .. }
            | StoreError::Crypt { .. }
            | StoreError::Refused { .. }
            | StoreError::Exists { .. } => false,
            StoreError::Io { source, .. } => !matches!(
                source.kind(),
                io::ErrorKind::PermissionDenied | io::ErrorKind::InvalidInput
            ),
            StoreError::Backend { retryable, .. } => *retryable,
        }
    }
}

/// One entry of a listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    /// Name relative to the listed directory.
    pub name: String,
    pub size: u64,
    pub modified: SystemTime,
}

/// Objects and sub-directories directly under a directory (a `/`-delimited listing).
#[derive(Debug, Default, Clone)]
pub struct Listing {
    pub objects: Vec<ObjectInfo>,
    pub dirs: Vec<String>,
}

/// The backend surface. Keys are relative to the replica root and use `/`.
#[async_trait]
pub trait ObjectStore: Send + Sync + fmt::Debug {
    /// Backend type: `file`, `s3`, `gcs`.
    fn kind(&self) -> &'static str;
    /// The replica's URL, used in every message about it.
    fn url(&self) -> String;
    /// Lists one directory level. A missing directory is an empty listing.
    async fn list(&self, dir: &str) -> Result<Listing, StoreError>;
    /// Writes an object atomically from a stream: readers never see a partial object, and a
    /// stream that ends in an error leaves nothing behind.
    async fn put(&self, key: &str, body: ObjectReader) -> Result<ObjectInfo, StoreError>;
    /// [`Self::put`], only if no object has this key (S3: `If-None-Match: *` on the PUT or the
    /// multipart completion; GCS: `ifGenerationMatch=0`; file: a rename that does not
    /// replace); [`StoreError::Exists`] if one has. Append-only replicas upload with it, so a
    /// bucket policy can require it of the host's credentials.
    async fn put_new(&self, key: &str, body: ObjectReader) -> Result<ObjectInfo, StoreError>;
    async fn get(&self, key: &str) -> Result<ObjectReader, StoreError>;
    /// [`Self::get`], and when the object was written, from the same response (None where the
    /// store's download does not say: GCS media downloads). A standby's lag is measured from it.
    async fn get_stat(&self, key: &str) -> Result<(ObjectReader, Option<SystemTime>), StoreError> {
        Ok((self.get(key).await?, None))
    }
    /// Appends bytes `start..end` of an object to `buf` (fewer only if the object is
    /// shorter), copied out of the response as it arrives. The caller reuses `buf` from range
    /// to range: holding on to the HTTP client's own buffers instead made it allocate new ones
    /// (mapped fresh, so every byte received also cost a page fault; a restore's S3 snapshot
    /// took 2.5 s of which 1.4 s system time, 1.9 s and 0.6 s without the faults). The default
    /// reads the object from its start; the buckets ask for the range.
    async fn get_range(
        &self,
        key: &str,
        start: u64,
        end: u64,
        buf: &mut Vec<u8>,
    ) -> Result<(), StoreError> {
        use tokio::io::AsyncReadExt;
        let mut body = self.get(key).await?;
        let io_err = |source| StoreError::Io {
            store: self.url(),
            op: "get",
            key: key.to_string(),
            source,
        };
        tokio::io::copy(&mut (&mut body).take(start), &mut tokio::io::sink())
            .await
            .map_err(io_err)?;
        body.take(end.saturating_sub(start))
            .read_to_end(buf)
            .await
            .map_err(io_err)?;
        Ok(())
    }
    /// The first object directly under `dir` in key order, if any: one LIST of one key on a
    /// bucket, however many objects the directory holds. The append-only lease finds its newest
    /// record with it (see `lease`).
    async fn first(&self, dir: &str) -> Result<Option<ObjectInfo>, StoreError> {
        Ok(self
            .list(dir)
            .await?
            .objects
            .into_iter()
            .min_by(|a, b| a.name.cmp(&b.name)))
    }
    /// Whether an object exists, and its size and time (S3 HEAD, GCS metadata, file stat):
    /// one small request, for checks that must stay cheap.
    async fn head(&self, key: &str) -> Result<Option<ObjectInfo>, StoreError>;
    /// Deletes objects; missing ones are not an error.
    async fn delete(&self, keys: &[String]) -> Result<(), StoreError>;
    /// Deletes everything under a directory.
    async fn delete_dir(&self, dir: &str) -> Result<(), StoreError>;

    /// Reads a small object whole, with a version token for the conditional calls below (S3:
    /// the ETag; GCS: the object generation; file: the content itself). None if it is missing.
    async fn get_versioned(&self, key: &str) -> Result<Option<(Vec<u8>, String)>, StoreError>;
    /// Writes a small object only if `cond` holds, atomically with respect to other writers
    /// (S3 `If-None-Match`/`If-Match`, GCS `ifGenerationMatch`, file: link/rename under an
    /// exclusive lock on the directory). Returns the new version, or None when `cond` failed.
    async fn put_if(
        &self,
        key: &str,
        data: Vec<u8>,
        cond: &Precondition,
    ) -> Result<Option<String>, StoreError>;
    /// Deletes an object only if its version still matches; false when it did not (or the
    /// object is gone).
    async fn delete_if(&self, key: &str, version: &str) -> Result<bool, StoreError>;

    /// Removes what interrupted uploads left under the replica root and is older than
    /// `older_than` (file: `.NAME.XXXXXXXX.tmp` files; S3: incomplete multipart uploads, which
    /// are billed until aborted; GCS: nothing to do, its resumable sessions expire after a
    /// week). Returns how many were removed.
    async fn remove_incomplete(
        &self,
        _older_than: std::time::Duration,
    ) -> Result<usize, StoreError> {
        Ok(0)
    }

    /// Where the object lives on this machine, for stores that keep objects as plain files:
    /// restore reads big snapshots straight from there, without the async file layer's extra copy
    /// and thread hand-offs.
    fn local_path(&self, _key: &str) -> Option<std::path::PathBuf> {
        None
    }
}

/// The condition of [`ObjectStore::put_if`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Precondition {
    /// The object must not exist.
    Absent,
    /// The object must exist with this version token.
    Version(String),
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SnapshotInfo {
    pub generation: String,
    pub index: u32,
    pub size: u64,
    #[serde(with = "humantime_serde")]
    pub created_at: SystemTime,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct WalSegmentInfo {
    pub generation: String,
    pub index: u32,
    pub offset: u64,
    pub size: u64,
    #[serde(with = "humantime_serde")]
    pub created_at: SystemTime,
}

impl WalSegmentInfo {
    pub fn pos(&self) -> Pos {
        Pos::new(self.generation.clone(), self.index, self.offset)
    }
}

/// The bucket key of `key` (relative to the replica root) under the prefix `root`, as the S3
/// and GCS targets store it: `path.Join`-cleaned, without a leading `/`.
pub(crate) fn bucket_key(root: &str, key: &str) -> String {
    layout::join(root, key).trim_start_matches('/').to_string()
}

/// The inverse of [`bucket_key`]: a bucket key back to a key relative to the replica root.
pub(crate) fn root_relative(root: &str, bucket_key: &str) -> String {
    let root = self::bucket_key(root, "");
    bucket_key
        .strip_prefix(root.as_str())
        .unwrap_or(bucket_key)
        .trim_start_matches('/')
        .to_string()
}

/// Reads up to `size` bytes of a body (fewer only at its end): one upload part or chunk, the
/// unit in which the S3 and GCS targets bound their memory.
pub(crate) async fn read_up_to(body: &mut ObjectReader, size: usize) -> io::Result<Vec<u8>> {
    use tokio::io::AsyncReadExt;
    let mut buf = Vec::with_capacity(size.min(1 << 20));
    (&mut *body).take(size as u64).read_to_end(&mut buf).await?;
    Ok(buf)
}

/// The v0.3 layout over any [`ObjectStore`], with the replica's optional age encryption: every
/// object written through [`ReplicaClient::encode`] is encrypted when recipients are set, and
/// every object opened is decrypted when it carries an age header.
#[derive(Debug, Clone)]
pub struct ReplicaClient {
    /// The store, wrapped in [`meter::Metered`]: every request is counted in `meter`.
    store: Arc<dyn ObjectStore>,
    meter: Arc<meter::RequestMeter>,
    age: Option<Arc<AgeKeys>>,
}

impl ReplicaClient {
    pub fn new(store: Arc<dyn ObjectStore>) -> Self {
        Self::metered(store, Arc::default())
    }
    /// A client whose requests count in `meter` (shared with other clients of one replica,
    /// such as a restore drill's).
    pub fn metered(store: Arc<dyn ObjectStore>, meter: Arc<meter::RequestMeter>) -> Self {
        let store = Arc::new(meter::Metered::new(store, meter.clone()));
        ReplicaClient {
            store,
            meter,
            age: None,
        }
    }
    /// Makes this client append-only (see [`append_only`]): deletions and replacements are
    /// refused before they reach the store (and its request meter).
    pub fn append_only(mut self) -> Self {
        self.store = Arc::new(append_only::AppendOnly::new(self.store));
        self
    }
    pub fn meter(&self) -> &Arc<meter::RequestMeter> {
        &self.meter
    }
    pub fn with_age(mut self, keys: Option<AgeKeys>) -> Self {
        self.age = keys.map(Arc::new);
        self
    }
    pub fn store(&self) -> &Arc<dyn ObjectStore> {
        &self.store
    }
    /// The body of a new snapshot or segment: what `produce` writes (on a blocking thread),
    /// LZ4-framed and, with recipients, age-encrypted. `size` (when known) sizes the frame's
    /// blocks. The handle yields the uncompressed size.
    pub fn encode<F>(
        &self,
        size: Option<u64>,
        produce: F,
    ) -> (ObjectReader, tokio::task::JoinHandle<io::Result<u64>>)
    where
        F: FnOnce(&mut dyn std::io::Write) -> io::Result<u64> + Send + 'static,
    {
        crate::compress::lz4_stream(self.age.clone(), size, produce)
    }

    /// Opens an object and returns its LZ4 frame, decrypting it if it is age-encrypted.
    /// Plain objects are accepted even when identities are configured, so encryption can be
    /// switched on for an existing replica without a new generation.
    async fn open(&self, key: &str) -> Result<ObjectReader, StoreError> {
        self.open_with(key, None).await
    }

    /// [`Self::open`]; with `ranged` (the object's size from its listing, and how to read it),
    /// an object in a bucket bigger than one range is read by parallel ranged GETs.
    async fn open_with(
        &self,
        key: &str,
        ranged: Option<(u64, ranged::RangeOpts)>,
    ) -> Result<ObjectReader, StoreError> {
        let body = match ranged {
            // One connection: a plain GET (for a store that serves a range by reading the whole
            // object, as moto does: 0.28 s per 2 MiB range of a 512 MiB object).
            Some((size, opts))
                if opts.connections > 1
                    && size > opts.chunk
                    && self.store.local_path(key).is_none() =>
            {
                ranged::reader(self.store.clone(), key.to_string(), size, opts)
            }
            _ => self.store.get(key).await?,
        };
        self.open_body(key, body).await
    }

    /// The WAL segments `segs` (positions and sizes from their listing) of a bucket, read back
    /// to back by one schedule of parallel ranged GETs ([`ranged::readers`]); open each with
    /// [`Self::open_body`], in order.
    pub fn wal_segments_ranged(
        &self,
        segs: &[(Pos, u64)],
        opts: ranged::RangeOpts,
    ) -> Vec<ObjectReader> {
        let objects = segs
            .iter()
            .map(|(pos, size)| {
                let key = layout::wal_segment_key("", &pos.generation, pos.index, pos.offset);
                (key, *size)
            })
            .collect();
        ranged::readers(self.store.clone(), objects, opts)
    }

    /// The body of the object `key`, read elsewhere, decrypted as [`Self::open`] does.
    pub async fn open_body(
        &self,
        key: &str,
        mut body: ObjectReader,
    ) -> Result<ObjectReader, StoreError> {
        use tokio::io::AsyncReadExt;
        let mut head = Vec::with_capacity(AGE_MAGIC.len());
        (&mut body)
            .take(AGE_MAGIC.len() as u64)
            .read_to_end(&mut head)
            .await
            .map_err(|source| StoreError::Io {
                store: self.url(),
                op: "get",
                key: key.to_string(),
                source,
            })?;
        let encrypted = head == AGE_MAGIC;
        let body: ObjectReader = Box::pin(std::io::Cursor::new(head).chain(body));
        if !encrypted {
            return Ok(body);
        }
        let crypt_err = |message: String| StoreError::Crypt {
            store: self.url(),
            key: key.to_string(),
            message,
        };
        match &self.age {
            None => Err(crypt_err(DecryptError::NoIdentity.to_string())),
            Some(keys) => keys
                .decrypt_reader(body)
                .await
                .map_err(|e| crypt_err(e.explain())),
        }
    }
    pub fn kind(&self) -> &'static str {
        self.store.kind()
    }
    pub fn url(&self) -> String {
        self.store.url()
    }

    /// Generation ids present on the replica; names that are not 16 lowercase hex are ignored.
    pub async fn generations(&self) -> Result<Vec<String>, StoreError> {
        let mut gens: Vec<String> = self
            .store
            .list(&layout::generations_dir(""))
            .await?
            .dirs
            .into_iter()
            .filter(|d| layout::is_generation(d))
            .collect();
        gens.sort();
        Ok(gens)
    }

    /// Snapshots of a generation, sorted by index.
    pub async fn snapshots(&self, generation: &str) -> Result<Vec<SnapshotInfo>, StoreError> {
        let listing = self
            .store
            .list(&layout::snapshots_dir("", generation))
            .await?;
        let mut out: Vec<SnapshotInfo> = listing
            .objects
            .into_iter()
            .filter_map(|o| {
                Some(SnapshotInfo {
                    generation: generation.to_string(),
                    index: layout::parse_snapshot_name(&o.name)?,
                    size: o.size,
                    created_at: o.modified,
                })
            })
            .collect();
        out.sort_by_key(|s| s.index);
        Ok(out)
    }

    /// WAL segments of a generation, sorted by (index, offset): restore depends on that order,
    /// so it is imposed here rather than trusted from the backend.
    pub async fn wal_segments(&self, generation: &str) -> Result<Vec<WalSegmentInfo>, StoreError> {
        let listing = self.store.list(&layout::wal_dir("", generation)).await?;
        let mut out: Vec<WalSegmentInfo> = listing
            .objects
            .into_iter()
            .filter_map(|o| {
                let (index, offset) = layout::parse_wal_segment_name(&o.name)?;
                Some(WalSegmentInfo {
                    generation: generation.to_string(),
                    index,
                    offset,
                    size: o.size,
                    created_at: o.modified,
                })
            })
            .collect();
        out.sort_by_key(|s| (s.index, s.offset));
        Ok(out)
    }

    pub async fn write_snapshot(
        &self,
        generation: &str,
        index: u32,
        body: ObjectReader,
    ) -> Result<SnapshotInfo, StoreError> {
        let info = self
            .store
            .put(&layout::snapshot_key("", generation, index), body)
            .await?;
        Ok(SnapshotInfo {
            generation: generation.to_string(),
            index,
            size: info.size,
            created_at: info.modified,
        })
    }

    pub async fn write_wal_segment(
        &self,
        pos: &Pos,
        body: ObjectReader,
    ) -> Result<WalSegmentInfo, StoreError> {
        let key = layout::wal_segment_key("", &pos.generation, pos.index, pos.offset);
        let info = self.store.put(&key, body).await?;
        Ok(WalSegmentInfo {
            generation: pos.generation.clone(),
            index: pos.index,
            offset: pos.offset,
            size: info.size,
            created_at: info.modified,
        })
    }

    pub async fn open_snapshot(
        &self,
        generation: &str,
        index: u32,
    ) -> Result<ObjectReader, StoreError> {
        self.open(&layout::snapshot_key("", generation, index))
            .await
    }

    /// A snapshot of `size` bytes (from its listing), big ones read by parallel ranges.
    pub async fn open_snapshot_ranged(
        &self,
        generation: &str,
        index: u32,
        size: u64,
        opts: ranged::RangeOpts,
    ) -> Result<ObjectReader, StoreError> {
        self.open_with(
            &layout::snapshot_key("", generation, index),
            Some((size, opts)),
        )
        .await
    }

    /// A WAL segment of `size` bytes (from its listing), big ones read by parallel ranges.
    pub async fn open_wal_segment_ranged(
        &self,
        pos: &Pos,
        size: u64,
        opts: ranged::RangeOpts,
    ) -> Result<ObjectReader, StoreError> {
        self.open_with(
            &layout::wal_segment_key("", &pos.generation, pos.index, pos.offset),
            Some((size, opts)),
        )
        .await
    }

    /// [`Self::open_wal_segment`], and when the segment was uploaded (see
    /// [`ObjectStore::get_stat`]).
    pub async fn open_wal_segment_stat(
        &self,
        pos: &Pos,
    ) -> Result<(ObjectReader, Option<SystemTime>), StoreError> {
        let key = layout::wal_segment_key("", &pos.generation, pos.index, pos.offset);
        let (body, modified) = self.store.get_stat(&key).await?;
        Ok((self.open_body(&key, body).await?, modified))
    }

    pub async fn open_wal_segment(&self, pos: &Pos) -> Result<ObjectReader, StoreError> {
        self.open(&layout::wal_segment_key(
            "",
            &pos.generation,
            pos.index,
            pos.offset,
        ))
        .await
    }

    pub async fn delete_snapshots(
        &self,
        generation: &str,
        indexes: &[u32],
    ) -> Result<(), StoreError> {
        let keys: Vec<String> = indexes
            .iter()
            .map(|i| layout::snapshot_key("", generation, *i))
            .collect();
        self.store.delete(&keys).await
    }

    pub async fn delete_wal_segments(&self, segments: &[WalSegmentInfo]) -> Result<(), StoreError> {
        let keys: Vec<String> = segments
            .iter()
            .map(|s| layout::wal_segment_key("", &s.generation, s.index, s.offset))
            .collect();
        self.store.delete(&keys).await
    }

    pub async fn delete_generation(&self, generation: &str) -> Result<(), StoreError> {
        self.store
            .delete_dir(&layout::generation_dir("", generation))
            .await
    }

    /// Whether a snapshot exists (one HEAD).
    pub async fn snapshot_exists(&self, generation: &str, index: u32) -> Result<bool, StoreError> {
        Ok(self
            .store
            .head(&layout::snapshot_key("", generation, index))
            .await?
            .is_some())
    }

    /// Whether a WAL segment exists (one HEAD).
    pub async fn wal_segment_exists(&self, pos: &Pos) -> Result<bool, StoreError> {
        Ok(self
            .store
            .head(&layout::wal_segment_key(
                "",
                &pos.generation,
                pos.index,
                pos.offset,
            ))
            .await?
            .is_some())
    }

    /// The key of a segment, as named in errors.
    pub fn wal_segment_key(&self, pos: &Pos) -> String {
        format!(
            "{}/{}",
            self.url().trim_end_matches('/'),
            layout::wal_segment_key("", &pos.generation, pos.index, pos.offset)
        )
    }

    /// A snapshot as a plain local file, for blocking reads, when the replica is a directory on
    /// this machine and the snapshot is not encrypted; None when it must be read through
    /// [`Self::open_snapshot`], which decrypts. Blocking: call it off the async runtime.
    pub fn local_snapshot_file(
        &self,
        generation: &str,
        index: u32,
    ) -> Option<io::Result<std::fs::File>> {
        use std::os::unix::fs::FileExt;
        let path = self
            .store
            .local_path(&layout::snapshot_key("", generation, index))?;
        let file = match std::fs::File::open(path) {
            Ok(f) => f,
            Err(e) => return Some(Err(e)),
        };
        let mut head = [0u8; AGE_MAGIC.len()];
        match file.read_exact_at(&mut head, 0) {
            Ok(()) if head == AGE_MAGIC => None,
            Err(e) if e.kind() != io::ErrorKind::UnexpectedEof => Some(Err(e)),
            _ => Some(Ok(file)),
        }
    }

    pub fn snapshot_key(&self, generation: &str, index: u32) -> String {
        format!(
            "{}/{}",
            self.url().trim_end_matches('/'),
            layout::snapshot_key("", generation, index)
        )
    }
}

#[derive(Debug, Error)]
pub enum UrlError {
    #[error("invalid replica URL {url:?}: {reason}")]
    Invalid { url: String, reason: String },
    #[error("replica URL scheme {scheme:?} is not supported (supported: file, s3, gs, gcs)")]
    UnsupportedScheme { scheme: String },
}

/// A replica target as configured, checked but not connected: what `config check` validates
/// (no client is built, no credential looked up, no request made) and what [`Target::open`]
/// turns into a store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    File(std::path::PathBuf),
    S3(s3::S3Config),
    Gcs(gcs::GcsConfig),
}

/// An S3 or GCS endpoint must be an `http://` or `https://` URL with a host.
pub fn check_endpoint(endpoint: &str) -> Result<(), String> {
    let u = url::Url::parse(endpoint).map_err(|e| format!("endpoint {endpoint:?}: {e}"))?;
    if !matches!(u.scheme(), "http" | "https") || u.host_str().is_none_or(str::is_empty) {
        return Err(format!(
            "endpoint {endpoint:?}: must be an http:// or https:// URL with a host"
        ));
    }
    Ok(())
}

impl Target {
    /// Parses `file:///dir`, `s3://bucket/path?endpoint=..&region=..&force-path-style=true`, or
    /// `gs://bucket/path` (also `gcs://`).
    pub fn from_url(url: &str) -> Result<Target, UrlError> {
        let invalid = |reason: String| UrlError::Invalid {
            url: url.to_string(),
            reason,
        };
        let parsed = url::Url::parse(url).map_err(|e| invalid(e.to_string()))?;
        let t = match parsed.scheme() {
            "file" => Target::File(
                parsed
                    .to_file_path()
                    .map_err(|_| invalid("not an absolute local path".into()))?,
            ),
            "s3" => Target::S3(s3::S3Config::from_url(&parsed).map_err(invalid)?),
            "gs" | "gcs" => Target::Gcs(gcs::GcsConfig::from_url(&parsed).map_err(invalid)?),
            other => {
                return Err(UrlError::UnsupportedScheme {
                    scheme: other.to_string(),
                });
            }
        };
        t.check().map_err(invalid)?;
        Ok(t)
    }

    /// Checks what can be checked without connecting: endpoints, part sizes.
    pub fn check(&self) -> Result<(), String> {
        match self {
            Target::File(p) if !p.is_absolute() => {
                Err(format!("{}: not an absolute path", p.display()))
            }
            Target::File(_) => Ok(()),
            Target::S3(c) => c.check(),
            Target::Gcs(c) => c.check(),
        }
    }

    /// Where the objects live: the store (kind, endpoint, bucket) and the path in it, by
    /// component. Two replicas overlap when their stores are equal and one path is a prefix of
    /// the other (one would write into the other's tree).
    pub fn location(&self) -> (String, Vec<String>) {
        let parts = |p: &str| -> Vec<String> {
            p.split('/')
                .filter(|c| !c.is_empty() && *c != ".")
                .map(str::to_string)
                .collect()
        };
        match self {
            Target::File(p) => ("file".into(), parts(&p.to_string_lossy())),
            Target::S3(c) => (
                format!("s3 {} {}", c.endpoint.as_deref().unwrap_or("aws"), c.bucket),
                parts(&c.path),
            ),
            Target::Gcs(c) => (
                format!(
                    "gcs {} {}",
                    c.endpoint.as_deref().unwrap_or("google"),
                    c.bucket
                ),
                parts(&c.path),
            ),
        }
    }

    /// Whether two targets write into the same tree.
    pub fn overlaps(&self, other: &Target) -> bool {
        let ((a, pa), (b, pb)) = (self.location(), other.location());
        a == b && (pa.starts_with(&pb) || pb.starts_with(&pa))
    }

    /// Builds the store (the S3 and GCS clients, their credentials).
    pub async fn open(self) -> Result<Arc<dyn ObjectStore>, String> {
        Ok(match self {
            Target::File(p) => Arc::new(file::FileStore::new(p)),
            Target::S3(c) => Arc::new(s3::S3Store::new(c).await?),
            Target::Gcs(c) => Arc::new(gcs::GcsStore::new(c).await?),
        })
    }
}

/// Opens a store from a replica URL (see [`Target::from_url`]); keys come from the SDK's
/// default chain (e.g. `AWS_ACCESS_KEY_ID`), GCS from Application Default Credentials.
pub async fn store_from_url(url: &str) -> Result<Arc<dyn ObjectStore>, UrlError> {
    Target::from_url(url)?
        .open()
        .await
        .map_err(|reason| UrlError::Invalid {
            url: url.to_string(),
            reason,
        })
}

/// Whether a string looks like a replica URL rather than a local path.
pub fn is_url(s: &str) -> bool {
    s.contains("://")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_keys_round_trip() {
        for root in ["", "fruits.db", "/db/", "a/b"] {
            let key = "generations/62fce60304a1d17f/wal/00000000_00000000.wal.lz4";
            let full = bucket_key(root, key);
            assert!(!full.starts_with('/'), "{full}");
            assert_eq!(root_relative(root, &full), key, "root {root:?}");
        }
        assert_eq!(bucket_key("/db/", "generations"), "db/generations");
    }
}
