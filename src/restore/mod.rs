//! Restore (spec §4): choose a replica, generation and snapshot, download the snapshot and the
//! WAL indexes after it in parallel, and replay the WAL into a temporary file that is checked
//! and then linked into place.
//!
//! Where we differ from Litestream v0.3, on purpose:
//! * WAL replay is our own: every frame's salt and checksum chain is verified as it is
//!   downloaded, so a damaged segment is an error naming the object, never a silent early stop
//!   of SQLite's recovery; pages are written straight into the file and synced once, instead of
//!   a SQLite open + TRUNCATE checkpoint per index (much faster with many indexes).
//! * Segments of indexes below the chosen snapshot are ignored (Litestream fails on a stray
//!   partial index there: "missing initial wal segment", #224/#535/#805).
//! * Every object read is retried with backoff (#585).
//! * A replica whose listing fails is skipped in favour of the others (#687).
//! * A timestamp after the newest object selects the latest state instead of nothing.
//! * The output is never overwritten (hard link, not rename), a second restore to the same
//!   output is refused at once, stale `-wal`/`-shm`/`-journal` files beside the output are moved
//!   aside, and no temporary file is left behind, on success or failure (#528); see [`output`].

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use thiserror::Error;
use tokio_util::io::SyncIoBridge;
use tracing::{debug, info, warn};

use crate::compress;
use crate::replica::{ReplicaClient, SnapshotInfo, StoreError, WalSegmentInfo};
use crate::replicator::RetryPolicy;
use crate::wal::{self, FrameHeader, Scanner, WAL_HEADER_SIZE, WalHeader};

mod output;
use output::Scratch;
pub use output::{Output, Ownership};

#[derive(Debug, Error)]
pub enum RestoreError {
    #[error("cannot restore, output path already exists: {0}")]
    OutputExists(PathBuf),
    #[error(
        "{0}: another restore is writing this output right now; wait for it to finish or choose another output"
    )]
    OutputBusy(PathBuf),
    #[error("restore output {path:?}: {reason}")]
    BadOutput { path: PathBuf, reason: String },
    #[error("no matching backups found")]
    NoMatchingBackups,
    /// No readable replica holds a backup, and some could not be read (they may hold one).
    #[error("no readable replica holds a backup, and these could not be read: {replicas}")]
    Unreadable { replicas: String, retryable: bool },
    #[error("{replica}: generation {generation}: no snapshots available")]
    NoSnapshot { replica: String, generation: String },
    #[error("{key}: missing initial WAL segment (index {index:08x} has no segment at offset 0)")]
    MissingInitialSegment { key: String, index: u32 },
    #[error("{replica}: generation {generation}: missing WAL index {index:08x}")]
    MissingIndex {
        replica: String,
        generation: String,
        index: u32,
    },
    #[error("{key}: segment starts at offset {found} but the previous segments end at {expected}")]
    SegmentGap {
        key: String,
        expected: u64,
        found: u64,
    },
    #[error("{key}: corrupt object: {reason}")]
    Corrupt { key: String, reason: String },
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Reading a replica object failed (a network or store error: retried).
    #[error("{key}: read failed: {source}")]
    Read {
        key: String,
        #[source]
        source: io::Error,
    },
    /// A local file of the restore (a full disk, a permission): never blamed on the replica.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}: integrity check failed: {message}")]
    Integrity { path: PathBuf, message: String },
    #[error(
        "{replica}: the replica path belongs to {owner}, but this database is lineage {expected}: it holds another database's backups"
    )]
    OtherLineage {
        replica: String,
        owner: String,
        expected: String,
    },
    #[error(transparent)]
    Lineage(#[from] crate::lineage::LineageError),
}

/// Restore progress, for the CLI and the dashboard.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RestoreProgress {
    pub stage: &'static str,
    pub done: u64,
    pub total: u64,
}

pub type ProgressFn = Arc<dyn Fn(&RestoreProgress) + Send + Sync>;

#[derive(Clone)]
pub struct RestoreOptions {
    pub output: PathBuf,
    pub generation: Option<String>,
    /// Restore up to and including this WAL index.
    pub index: Option<u32>,
    pub timestamp: Option<SystemTime>,
    pub parallelism: usize,
    pub integrity_check: bool,
    pub if_db_not_exists: bool,
    pub if_replica_exists: bool,
    pub retry: RetryPolicy,
    pub read_attempts: u32,
    pub progress: Option<ProgressFn>,
    /// Mode and owner of the restored file; None: the process's umask and user.
    pub ownership: Option<Ownership>,
    /// The lineage the restored database must belong to (the configured database's, when its
    /// host knows it): a replica path owned by another lineage is refused before downloading.
    pub expect_lineage: Option<String>,
    /// Record the lineage restored in this database's meta directory (a restore of a
    /// configured database to its own path): it continues that lineage (see `lineage`).
    pub record_lineage: Option<crate::shadow::Shadow>,
}

impl RestoreOptions {
    pub fn new(output: impl Into<PathBuf>) -> Self {
        RestoreOptions {
            output: output.into(),
            generation: None,
            index: None,
            timestamp: None,
            parallelism: 8,
            integrity_check: true,
            if_db_not_exists: false,
            if_replica_exists: false,
            retry: RetryPolicy {
                initial: std::time::Duration::from_millis(200),
                max: std::time::Duration::from_secs(5),
                failed_after: 5,
            },
            read_attempts: 5,
            progress: None,
            ownership: None,
            expect_lineage: None,
            record_lineage: None,
        }
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub enum RestoreOutcome {
    Restored(RestoreSummary),
    /// `--if-db-not-exists` and the output exists.
    SkippedExists,
    /// `--if-replica-exists` and there is no backup.
    NoBackups,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct RestoreSummary {
    pub replica: String,
    pub generation: String,
    pub snapshot_index: u32,
    /// Highest WAL index replayed (equal to the snapshot index when there is no WAL).
    pub max_index: u32,
    pub segments: usize,
    pub bytes: u64,
    pub integrity_checked: bool,
    /// Where the database was written (the output's resolved path).
    #[serde(default)]
    pub output: PathBuf,
    /// Stale `-wal`/`-shm`/`-journal` files that lay beside the output, moved aside.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub moved_aside: Vec<PathBuf>,
    /// The lineage the replica path belongs to (None: the path has no owner record, e.g.
    /// written by Litestream or an older litestreamd).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lineage: Option<Box<crate::lineage::Owner>>,
}

/// A replica to restore from: its name and client.
pub type NamedReplica = (String, ReplicaClient);

/// What restore would use: replica, generation, snapshot and the segments to replay.
#[derive(Debug, Clone)]
pub struct RestorePlan {
    pub replica: usize,
    pub generation: String,
    pub snapshot: SnapshotInfo,
    pub segments: Vec<WalSegmentInfo>,
}

type Candidate = (
    SystemTime,
    usize,
    String,
    Vec<SnapshotInfo>,
    Vec<WalSegmentInfo>,
);

/// Chooses replica and generation (spec §4 step 1): the generation whose newest object is the
/// newest, among those with a snapshot that the filters allow.
pub async fn plan(
    replicas: &[NamedReplica],
    opts: &RestoreOptions,
) -> Result<Option<RestorePlan>, RestoreError> {
    // (updated-at, replica, generation, snapshots, segments) of the best candidate so far.
    let mut best: Option<Candidate> = None;
    let mut unreadable: Vec<(String, StoreError)> = Vec::new();
    for (ri, (name, client)) in replicas.iter().enumerate() {
        let cands = match candidates(client, opts).await {
            Ok(c) => c,
            Err(e) => {
                warn!(replica = %name, error = %e, "cannot list replica; trying the others");
                unreadable.push((name.clone(), e));
                continue;
            }
        };
        for (updated, g, snaps, segs) in cands {
            if best.as_ref().is_none_or(|b| updated > b.0) {
                best = Some((updated, ri, g, snaps, segs));
            }
        }
    }
    // "No backup" only when every replica answered: a replica that could not be read may hold
    // one, and a caller that starts empty on "no backup" (restore_on_start) must not.
    if best.is_none() && !unreadable.is_empty() {
        return Err(RestoreError::Unreadable {
            retryable: unreadable.iter().any(|(_, e)| e.is_retryable()),
            replicas: unreadable
                .iter()
                .map(|(n, e)| format!("{n}: {e}"))
                .collect::<Vec<_>>()
                .join("; "),
        });
    }
    let Some((_, ri, generation, snaps, segs)) = best else {
        return Ok(None);
    };
    let replica_name = &replicas[ri].0;
    let snapshot = snaps
        .into_iter()
        .filter(|s| opts.index.is_none_or(|i| s.index <= i))
        .filter(|s| opts.timestamp.is_none_or(|ts| s.created_at <= ts))
        .max_by_key(|s| s.index)
        .ok_or_else(|| RestoreError::NoSnapshot {
            replica: replica_name.clone(),
            generation: generation.clone(),
        })?;
    let mut segments = Vec::new();
    for s in segs {
        if s.index < snapshot.index {
            continue;
        }
        if opts.index.is_some_and(|i| s.index > i)
            || opts.timestamp.is_some_and(|ts| s.created_at > ts)
        {
            break;
        }
        segments.push(s);
    }
    Ok(Some(RestorePlan {
        replica: ri,
        generation,
        snapshot,
        segments,
    }))
}

/// The generations of one replica that the filters allow, with their objects.
async fn candidates(
    client: &ReplicaClient,
    opts: &RestoreOptions,
) -> Result<Vec<(SystemTime, String, Vec<SnapshotInfo>, Vec<WalSegmentInfo>)>, StoreError> {
    let mut out = Vec::new();
    for g in client.generations().await? {
        if opts.generation.as_ref().is_some_and(|want| *want != g) {
            continue;
        }
        let snaps = client.snapshots(&g).await?;
        let segs = client.wal_segments(&g).await?;
        if snaps.is_empty() {
            continue;
        }
        let times = snaps
            .iter()
            .map(|s| s.created_at)
            .chain(segs.iter().map(|s| s.created_at));
        let created = times.clone().min().expect("non-empty");
        let updated = times.max().expect("non-empty");
        if opts.timestamp.is_some_and(|ts| ts < created) {
            continue;
        }
        out.push((updated, g, snaps, segs));
    }
    Ok(out)
}

/// Runs a restore into `opts.output` (see [`output`] for how the output is protected).
pub async fn restore(
    replicas: &[NamedReplica],
    opts: &RestoreOptions,
) -> Result<RestoreOutcome, RestoreError> {
    let out = opts.output.clone();
    let output = match tokio::task::spawn_blocking(move || Output::prepare(&out))
        .await
        .expect("output task")
    {
        Err(RestoreError::OutputExists(p)) if opts.if_db_not_exists => {
            info!(path = %p.display(), "database already exists, skipping restore");
            return Ok(RestoreOutcome::SkippedExists);
        }
        other => other?,
    };
    restore_to(replicas, opts, output).await
}

/// Runs a restore into an output already prepared (and checked, for the control socket).
pub async fn restore_to(
    replicas: &[NamedReplica],
    opts: &RestoreOptions,
    mut output: Output,
) -> Result<RestoreOutcome, RestoreError> {
    output.lock()?;
    let Some(plan) = plan(replicas, opts).await? else {
        if opts.if_replica_exists {
            info!("no matching backups found");
            return Ok(RestoreOutcome::NoBackups);
        }
        return Err(RestoreError::NoMatchingBackups);
    };
    let (name, client) = &replicas[plan.replica];
    let owner = crate::lineage::read(client.store()).await?.map(|(o, _)| o);
    if let (Some(want), Some(o)) = (&opts.expect_lineage, &owner)
        && o.lineage != *want
    {
        return Err(RestoreError::OtherLineage {
            replica: client.url(),
            owner: o.describe(),
            expected: want.clone(),
        });
    }
    info!(replica = %name, generation = %plan.generation, snapshot = plan.snapshot.index, segments = plan.segments.len(), output = %output.final_path().display(), lineage = owner.as_ref().map_or("-", |o| o.lineage.as_str()), "restoring");
    let scratch = Arc::new(output.scratch()?);
    let mut summary = match run_plan(name, client, &plan, opts, &scratch).await {
        Ok(s) => s,
        Err(e) => {
            // Gone before the output's lock is released, even if an aborted background task
            // still holds the directory for a moment.
            scratch.cleanup();
            return Err(e);
        }
    };
    let (ownership, sc) = (opts.ownership, scratch.clone());
    let (output, moved) = tokio::task::spawn_blocking(move || {
        let moved = output.publish(&sc, DB_FILE, ownership);
        sc.cleanup();
        (output, moved)
    })
    .await
    .expect("publish task");
    summary.moved_aside = moved?;
    summary.output = output.final_path();
    drop(output);
    if let (Some(shadow), Some(o)) = (&opts.record_lineage, &owner) {
        shadow
            .set_lineage(&o.lineage)
            .map_err(|source| RestoreError::Io {
                path: shadow.root().to_path_buf(),
                source,
            })?;
    }
    summary.lineage = owner.map(Box::new);
    info!(path = %summary.output.display(), bytes = summary.bytes, max_index = format!("{:08x}", summary.max_index), "restore complete");
    Ok(RestoreOutcome::Restored(summary))
}

/// Names inside a restore's private directory.
const DB_FILE: &str = "db";
const PAGES_FILE: &str = "pages-wal";

async fn run_plan(
    name: &str,
    client: &ReplicaClient,
    plan: &RestorePlan,
    opts: &RestoreOptions,
    scratch: &Arc<Scratch>,
) -> Result<RestoreSummary, RestoreError> {
    let tmp = scratch.path(DB_FILE);
    let started = std::time::Instant::now();
    let progress = |stage, done, total| {
        if let Some(p) = &opts.progress {
            p(&RestoreProgress { stage, done, total });
        }
    };

    // Group segments by index and check that every index from the snapshot on starts at 0.
    let mut by_index: Vec<(u32, Vec<WalSegmentInfo>)> = Vec::new();
    for s in &plan.segments {
        match by_index.last_mut() {
            Some((i, v)) if *i == s.index => v.push(s.clone()),
            _ => by_index.push((s.index, vec![s.clone()])),
        }
    }
    let max_index = by_index.last().map_or(plan.snapshot.index, |(i, _)| *i);
    for (n, want) in (plan.snapshot.index..=max_index).enumerate() {
        match by_index.get(n) {
            Some((i, segs)) if *i == want => {
                if segs[0].offset != 0 {
                    return Err(RestoreError::MissingInitialSegment {
                        key: client.wal_segment_key(&segs[0].pos()),
                        index: want,
                    });
                }
            }
            _ => {
                return Err(RestoreError::MissingIndex {
                    replica: name.to_string(),
                    generation: plan.generation.clone(),
                    index: want,
                });
            }
        }
    }

    // WAL indexes download (and verify) in background tasks, up to `parallelism` at once,
    // while the snapshot is decoded: on two cores the WAL work no longer waits for the snapshot.
    // They are applied strictly in order below.
    let total = by_index.len() as u64;
    let permits = Arc::new(tokio::sync::Semaphore::new(opts.parallelism.max(1)));
    let mut fetches = AbortOnDrop(std::collections::VecDeque::new());
    let pool = Arc::new(compress::Scratch::default());
    for (index, segs) in by_index {
        let file_name = format!("{index:08x}-wal");
        let path = scratch.path(&file_name);
        let file = scratch.create(&file_name)?;
        let (client, opts, permits) = (client.clone(), opts.clone(), permits.clone());
        let (pool, scratch) = (pool.clone(), scratch.clone());
        fetches.0.push_back(tokio::spawn(async move {
            let _permit = permits
                .acquire_owned()
                .await
                .expect("semaphore never closed");
            fetch_index(&client, segs, &file, &path, &opts, pool)
                .await
                .map(|f| (f, file, file_name, scratch))
        }));
    }

    // The snapshot decodes while the WAL indexes arrive and their pages are gathered.
    let db = scratch.create(DB_FILE)?;
    let snapshot = async {
        progress("snapshot", 0, 1);
        let snap_key = client.snapshot_key(&plan.generation, plan.snapshot.index);
        let page_size = fetch_snapshot(client, plan, opts, &db, &tmp, &snap_key).await?;
        progress("snapshot", 1, 1);
        debug!(elapsed = ?started.elapsed(), "snapshot written");
        Ok(page_size)
    };
    let wal = async {
        let mut pages = WalPages::create(scratch.create(PAGES_FILE)?, scratch.path(PAGES_FILE));
        let (mut segments, mut done) = (0, 0);
        while let Some(task) = fetches.0.pop_front() {
            let (idx, file, file_name, sc) = task.await.map_err(|e| RestoreError::Io {
                path: tmp.clone(),
                source: io::Error::other(e),
            })??;
            segments += idx.segments;
            pages = tokio::task::spawn_blocking(move || {
                let res = pages.add_index(&file, &sc.path(&file_name), &idx);
                drop(file);
                sc.remove(&file_name);
                res.map(|_| pages)
            })
            .await
            .expect("WAL gather task")?;
            done += 1;
            progress("wal", done, total);
        }
        debug!(elapsed = ?started.elapsed(), "WAL indexes gathered");
        Ok::<_, RestoreError>((pages, segments))
    };
    let (page_size, (pages, segments)) = tokio::try_join!(snapshot, wal)?;
    let db = tokio::task::spawn_blocking(move || pages.apply(&db, page_size).map(|()| db))
        .await
        .expect("WAL apply task")?;
    scratch.remove(PAGES_FILE);
    debug!(elapsed = ?started.elapsed(), "WAL pages applied");
    db.sync_all().map_err(io_at(&tmp))?;
    debug!(elapsed = ?started.elapsed(), "synced");
    let bytes = db.metadata().map(|m| m.len()).unwrap_or(0);
    drop(db);

    if opts.integrity_check {
        progress("integrity_check", 0, 1);
        let sc = scratch.clone();
        tokio::task::spawn_blocking(move || {
            sc.check_same(DB_FILE)?;
            let res = integrity_check(&sc.path(DB_FILE));
            sc.check_same(DB_FILE)?;
            for s in ["-wal", "-shm", "-journal"] {
                sc.remove(&format!("{DB_FILE}{s}"));
            }
            res
        })
        .await
        .expect("integrity task")?;
        progress("integrity_check", 1, 1);
    }
    Ok(RestoreSummary {
        replica: name.to_string(),
        generation: plan.generation.clone(),
        snapshot_index: plan.snapshot.index,
        max_index,
        segments,
        bytes,
        integrity_checked: opts.integrity_check,
        output: PathBuf::new(),
        moved_aside: Vec::new(),
        lineage: None,
    })
}

fn io_at(p: &Path) -> impl FnOnce(io::Error) -> RestoreError + '_ {
    move |source| RestoreError::Io {
        path: p.to_path_buf(),
        source,
    }
}

/// Downloads and decompresses the snapshot into `out` (the file at `tmp`); returns the
/// database page size.
async fn fetch_snapshot(
    client: &ReplicaClient,
    plan: &RestorePlan,
    opts: &RestoreOptions,
    out: &File,
    tmp: &Path,
    key: &str,
) -> Result<u32, RestoreError> {
    with_retries(opts, key, "snapshot", || async {
        let body = match open_local_snapshot(client, plan).await {
            Some(local) => local.map_err(|e| read_error(key, e))?,
            None => Box::new(SyncIoBridge::new(
                client
                    .open_snapshot(&plan.generation, plan.snapshot.index)
                    .await?,
            )),
        };
        let (tmp, key) = (tmp.to_path_buf(), key.to_string());
        let out = out.try_clone().map_err(io_at(&tmp))?;
        tokio::task::spawn_blocking(move || -> Result<u32, RestoreError> {
            // A retry starts from an empty file.
            out.set_len(0).map_err(io_at(&tmp))?;
            // Blocks decode on every core; the content is written here in order.
            let workers = std::thread::available_parallelism().map_or(2, |n| n.get().min(8));
            let mut w = SnapshotWriter::new(&out);
            let mut local = LocalErrors::default();
            compress::decode_parallel(body, workers, |b| local.keep(w.write(b)))
                .map_err(|e| local.or_read_error(&tmp, &key, e))?;
            // No fsync here: the one after the WAL replay covers the snapshot too.
            let mut hdr = [0u8; 100];
            out.read_exact_at(&mut hdr, 0)
                .map_err(|_| RestoreError::Corrupt {
                    key: key.clone(),
                    reason: "snapshot shorter than a database header".into(),
                })?;
            if &hdr[..16] != b"SQLite format 3\0" {
                return Err(RestoreError::Corrupt {
                    key,
                    reason: "not a SQLite database".into(),
                });
            }
            let ps = u16::from_be_bytes([hdr[16], hdr[17]]) as u32;
            Ok(if ps == 1 { 65536 } else { ps })
        })
        .await
        .expect("snapshot task")
    })
    .await
}

/// Runs `attempt` until it succeeds, fails with an error a retry cannot help (a damaged
/// object, a local disk error), or has been tried `read_attempts` times, with the restore's
/// backoff in between. `key` and `what` name the object in the log.
async fn with_retries<T, F, Fut>(
    opts: &RestoreOptions,
    key: &str,
    what: &str,
    mut attempt: F,
) -> Result<T, RestoreError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, RestoreError>>,
{
    let mut n = 0;
    loop {
        n += 1;
        match attempt().await {
            Err(e) if n < opts.read_attempts && retryable(&e) => {
                let d = opts.retry.delay(n);
                warn!(key, attempt = n, error = %e, retry_in = ?d, "{what} download failed; retrying");
                tokio::time::sleep(d).await;
            }
            other => return other,
        }
    }
}

/// Keeps an error of the local file apart from errors of the object being decoded, which both
/// come out of the decoder as `io::Error`: a full disk is then reported against the local file,
/// never as a damaged replica object.
#[derive(Default)]
struct LocalErrors(Option<io::Error>);

impl LocalErrors {
    fn keep(&mut self, r: io::Result<()>) -> io::Result<()> {
        r.map_err(|e| {
            let kind = e.kind();
            self.0 = Some(e);
            io::Error::new(kind, "local write failed")
        })
    }
    fn or_read_error(&mut self, path: &Path, key: &str, e: io::Error) -> RestoreError {
        match self.0.take() {
            Some(source) => RestoreError::Io {
                path: path.to_path_buf(),
                source,
            },
            None => read_error(key, e),
        }
    }
}

/// The snapshot's file, read with plain blocking reads (no async file layer in between), if the
/// replica is a local directory and the snapshot is not encrypted; None to read it through the
/// store. (`O_DIRECT` reads were tried: with one 4 MiB read in flight they ran at half the speed
/// of readahead.)
async fn open_local_snapshot(
    client: &ReplicaClient,
    plan: &RestorePlan,
) -> Option<io::Result<Box<dyn Read + Send>>> {
    let (client, generation, index) =
        (client.clone(), plan.generation.clone(), plan.snapshot.index);
    tokio::task::spawn_blocking(move || {
        let file = client.local_snapshot_file(&generation, index)?;
        Some(file.map(|f| {
            let _ = nix::fcntl::posix_fadvise(
                &f,
                0,
                0,
                nix::fcntl::PosixFadviseAdvice::POSIX_FADV_SEQUENTIAL,
            );
            Box::new(f) as Box<dyn Read + Send>
        }))
    })
    .await
    .expect("snapshot open task")
}

/// Writes a restored snapshot sequentially and starts its write-back every 32 MiB
/// (`sync_file_range(SYNC_FILE_RANGE_WRITE)`, which does not wait). With plenty of RAM the
/// kernel would otherwise keep the whole database dirty until the final fsync, leaving the disk
/// idle while the snapshot decodes and then waiting for all of it at the end (1 GiB: 0.9–1.5 s
/// instead of 2.5–3 s on the benchmark VM). `O_DIRECT` writes were tried too: slower there
/// (1.3–1.5 s), since each write waits for the disk.
struct SnapshotWriter<'a> {
    file: &'a File,
    written: u64,
    writeback_from: u64,
}

impl<'a> SnapshotWriter<'a> {
    const WRITEBACK_STEP: u64 = 32 << 20;

    fn new(file: &'a File) -> Self {
        SnapshotWriter {
            file,
            written: 0,
            writeback_from: 0,
        }
    }

    fn write(&mut self, data: &[u8]) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        self.file.write_all_at(data, self.written)?;
        self.written += data.len() as u64;
        let len = self.written - self.writeback_from;
        if len >= Self::WRITEBACK_STEP {
            // SAFETY: a plain system call on a descriptor that `self.file` keeps open. It is
            // only a hint (the final fsync makes the file durable), so its result is ignored.
            unsafe {
                nix::libc::sync_file_range(
                    self.file.as_raw_fd(),
                    self.writeback_from as i64,
                    len as i64,
                    nix::libc::SYNC_FILE_RANGE_WRITE,
                );
            }
            self.writeback_from = self.written;
        }
        Ok(())
    }
}

/// Background index downloads, aborted if the restore stops early (an error elsewhere).
struct AbortOnDrop<T>(std::collections::VecDeque<tokio::task::JoinHandle<T>>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        for h in &self.0 {
            h.abort();
        }
    }
}

/// A downloaded, verified WAL index.
struct IndexFile {
    page_size: u32,
    /// Bytes from the start of the file up to the end of the last commit frame.
    last_commit: u64,
    segments: usize,
    first_key: String,
}

/// Downloads every segment of one index into `path`, verifying offsets, salts and checksums.
/// The file is scratch: it is not synced, and it is removed once applied.
async fn fetch_index(
    client: &ReplicaClient,
    segs: Vec<WalSegmentInfo>,
    out: &File,
    path: &Path,
    opts: &RestoreOptions,
    scratch: Arc<compress::Scratch>,
) -> Result<IndexFile, RestoreError> {
    let first_key = client.wal_segment_key(&segs[0].pos());
    let mut state: Option<ChainState> = None;
    let mut written: u64 = 0;
    for seg in &segs {
        let key = client.wal_segment_key(&seg.pos());
        if seg.offset != written {
            return Err(RestoreError::SegmentGap {
                key,
                expected: written,
                found: seg.offset,
            });
        }
        let (st, end) = with_retries(opts, &key, "segment", || async {
            let body = client.open_wal_segment(&seg.pos()).await?;
            let (key, f) = (key.clone(), out.try_clone().map_err(io_at(path))?);
            let (scratch, path) = (scratch.clone(), path.to_path_buf());
            tokio::task::spawn_blocking(move || {
                // A retry starts again where the previous segment ended.
                f.set_len(written).map_err(io_at(&path))?;
                let mut check = WalCheck::new(state, &f, &path, written, &key);
                compress::decode(SyncIoBridge::new(body), &scratch, |b| {
                    check.feed(b).map_err(io::Error::other)
                })
                .map_err(|e| match e.downcast::<RestoreError>() {
                    Ok(e) => e,
                    Err(e) => read_error(&key, e),
                })?;
                check.finish()
            })
            .await
            .expect("segment task")
        })
        .await?;
        state = Some(st);
        written = end;
    }
    let st = state.ok_or_else(|| RestoreError::Corrupt {
        key: first_key.clone(),
        reason: "empty WAL index".into(),
    })?;
    Ok(IndexFile {
        page_size: st.page_size(),
        last_commit: st.last_commit(),
        segments: segs.len(),
        first_key,
    })
}

/// Validation state carried from one segment of an index to the next: the crate's one frame
/// walk (see `wal::Scanner`).
type ChainState = Scanner;

/// Checks one segment's decompressed content frame by frame as it arrives, and writes it into
/// the index file from offset `start` on (positional writes: a retry of the segment rewrites
/// the same range whatever the descriptor's offset). Frames (and the WAL header) may arrive
/// split across pieces.
struct WalCheck<'a> {
    state: Option<ChainState>,
    /// A header or frame that has not fully arrived yet.
    partial: Vec<u8>,
    out: &'a File,
    path: &'a Path,
    /// Checked bytes not yet written, which belong at `flushed`.
    buf: Vec<u8>,
    flushed: u64,
    key: &'a str,
}

impl<'a> WalCheck<'a> {
    const BUF: usize = 1 << 20;

    fn new(
        state: Option<ChainState>,
        out: &'a File,
        path: &'a Path,
        start: u64,
        key: &'a str,
    ) -> Self {
        WalCheck {
            state,
            partial: Vec::new(),
            out,
            path,
            buf: Vec::new(),
            flushed: start,
            key,
        }
    }

    fn corrupt(&self, reason: String) -> RestoreError {
        RestoreError::Corrupt {
            key: self.key.to_string(),
            reason,
        }
    }

    fn feed(&mut self, mut data: &[u8]) -> Result<(), RestoreError> {
        while !data.is_empty() {
            let need = match &self.state {
                None => WAL_HEADER_SIZE,
                Some(st) => st.frame_size() as usize,
            };
            if self.partial.is_empty() && data.len() >= need {
                let (unit, rest) = data.split_at(need);
                data = rest;
                self.check(unit)?;
                self.write(unit)?;
                continue;
            }
            let take = (need - self.partial.len()).min(data.len());
            self.partial.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.partial.len() == need {
                let unit = std::mem::take(&mut self.partial);
                self.check(&unit)?;
                self.write(&unit)?;
                self.partial = unit;
                self.partial.clear();
            }
        }
        Ok(())
    }

    fn check(&mut self, unit: &[u8]) -> Result<(), RestoreError> {
        let Some(st) = &mut self.state else {
            let h = WalHeader::parse(unit).map_err(|e| self.corrupt(format!("WAL header: {e}")))?;
            self.state = Some(Scanner::new(&h));
            return Ok(());
        };
        match st.push(unit) {
            Ok(_) => Ok(()),
            Err(stop) => {
                let at = st.offset();
                Err(self.corrupt(format!("{} at WAL offset {at}", stop.reason())))
            }
        }
    }

    fn write(&mut self, unit: &[u8]) -> Result<(), RestoreError> {
        self.buf.extend_from_slice(unit);
        if self.buf.len() >= Self::BUF {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), RestoreError> {
        self.out
            .write_all_at(&self.buf, self.flushed)
            .map_err(io_at(self.path))?;
        self.flushed += self.buf.len() as u64;
        self.buf.clear();
        Ok(())
    }

    /// The segment's end: it must fall on a frame boundary. Returns the state for the next
    /// segment and the file offset after this one.
    fn finish(mut self) -> Result<(ChainState, u64), RestoreError> {
        self.flush()?;
        match self.state {
            Some(st) if self.partial.is_empty() => Ok((st, self.flushed)),
            Some(st) => Err(self.corrupt(format!(
                "partial frame of {} bytes at WAL offset {}",
                self.partial.len(),
                st.offset()
            ))),
            None => Err(self.corrupt(format!(
                "segment ends inside the WAL header ({} bytes)",
                self.partial.len()
            ))),
        }
    }
}

/// The last committed version of every page the WAL indexes change. Pages are gathered in WAL
/// order into one scratch file, one slot per page (a newer version overwrites its slot, so the
/// file never outgrows the pages the WAL touches, however long the history), then written into
/// the database once each, in page order and in runs: the snapshot was written in large blocks,
/// and a 4 KiB write into it costs ext4 a walk over a large folio's buffers, so one write per WAL
/// frame cost more than the whole WAL.
struct WalPages {
    path: PathBuf,
    file: File,
    page_size: Option<u32>,
    /// Page number → slot in the scratch file.
    slots: std::collections::HashMap<u32, u32>,
    /// Pages of the slots from `flushed` on, not yet written to the file.
    pending: Vec<u8>,
    flushed: u32,
    /// Database size in pages after the last commit, if any.
    db_pages: Option<u32>,
    first_key: Option<String>,
}

impl WalPages {
    /// The most bytes written at once, into the scratch file or the database.
    const RUN: usize = 1 << 20;

    fn create(file: File, path: PathBuf) -> Self {
        WalPages {
            file,
            path,
            page_size: None,
            slots: Default::default(),
            pending: Vec::new(),
            flushed: 0,
            db_pages: None,
            first_key: None,
        }
    }

    /// Takes the committed frames of one verified index (the next one in order), read from
    /// `file` (at `path`).
    fn add_index(&mut self, file: &File, path: &Path, idx: &IndexFile) -> Result<(), RestoreError> {
        match self.page_size {
            Some(ps) if ps != idx.page_size => {
                return Err(RestoreError::Corrupt {
                    key: idx.first_key.clone(),
                    reason: format!("WAL page size {} differs from {ps}", idx.page_size),
                });
            }
            _ => self.page_size = Some(idx.page_size),
        }
        self.first_key.get_or_insert_with(|| idx.first_key.clone());
        let mut f = io::BufReader::with_capacity(1 << 20, file);
        f.seek(SeekFrom::Start(WAL_HEADER_SIZE as u64))
            .map_err(io_at(path))?;
        let mut frame = vec![0u8; wal::frame_size(idx.page_size) as usize];
        let mut off = WAL_HEADER_SIZE as u64;
        while off < idx.last_commit {
            f.read_exact(&mut frame).map_err(io_at(path))?;
            let fh = FrameHeader::parse(&frame);
            if fh.pgno == 0 {
                return Err(RestoreError::Corrupt {
                    key: idx.first_key.clone(),
                    reason: format!("frame for page 0 at WAL offset {off}"),
                });
            }
            self.put(fh.pgno, &frame[wal::FRAME_HEADER_SIZE..])
                .map_err(io_at(&self.path))?;
            if fh.is_commit() {
                self.db_pages = Some(fh.commit_size);
            }
            off += frame.len() as u64;
        }
        Ok(())
    }

    fn put(&mut self, pgno: u32, page: &[u8]) -> io::Result<()> {
        let ps = page.len();
        match self.slots.get(&pgno) {
            Some(&slot) if slot >= self.flushed => {
                let at = (slot - self.flushed) as usize * ps;
                self.pending[at..at + ps].copy_from_slice(page);
            }
            Some(&slot) => self.file.write_all_at(page, slot as u64 * ps as u64)?,
            None => {
                let slot = self.flushed + (self.pending.len() / ps) as u32;
                self.slots.insert(pgno, slot);
                self.pending.extend_from_slice(page);
                if self.pending.len() >= Self::RUN {
                    self.flush(ps)?;
                }
            }
        }
        Ok(())
    }

    fn flush(&mut self, ps: usize) -> io::Result<()> {
        self.file
            .write_all_at(&self.pending, self.flushed as u64 * ps as u64)?;
        self.flushed += (self.pending.len() / ps) as u32;
        self.pending.clear();
        Ok(())
    }

    /// Writes the pages into the database (whose page size is `page_size`) and truncates it to
    /// the size of the last commit. The scratch file is removed.
    fn apply(mut self, db: &File, page_size: u32) -> Result<(), RestoreError> {
        let path = self.path.clone();
        if let Some(ps) = self.page_size.filter(|&ps| ps != page_size) {
            return Err(RestoreError::Corrupt {
                key: self.first_key.unwrap_or_default(),
                reason: format!("WAL page size {ps} differs from the snapshot's {page_size}"),
            });
        }
        let ps = page_size as usize;
        self.flush(ps).map_err(io_at(&path))?;
        let mut list: Vec<(u32, u32)> = self.slots.drain().collect();
        list.sort_unstable();
        let mut run = Vec::with_capacity(Self::RUN);
        let mut run_start = 0u32;
        let write_run = |run: &mut Vec<u8>, start: u32| -> Result<(), RestoreError> {
            db.write_all_at(run, (start as u64 - 1) * ps as u64)
                .map_err(io_at(&path))?;
            run.clear();
            Ok(())
        };
        for (pgno, slot) in list {
            let contiguous = pgno == run_start + (run.len() / ps) as u32;
            if !run.is_empty() && (!contiguous || run.len() >= Self::RUN) {
                write_run(&mut run, run_start)?;
            }
            if run.is_empty() {
                run_start = pgno;
            }
            let at = run.len();
            run.resize(at + ps, 0);
            self.file
                .read_exact_at(&mut run[at..], slot as u64 * ps as u64)
                .map_err(io_at(&path))?;
        }
        if !run.is_empty() {
            write_run(&mut run, run_start)?;
        }
        if let Some(n) = self.db_pages {
            db.set_len(n as u64 * ps as u64).map_err(io_at(&path))?;
        }
        Ok(())
    }
}

fn integrity_check(path: &Path) -> Result<(), RestoreError> {
    let sql = |e: rusqlite::Error| RestoreError::Integrity {
        path: path.to_path_buf(),
        message: e.to_string(),
    };
    let conn = rusqlite::Connection::open(path).map_err(sql)?;
    let mut stmt = conn.prepare("PRAGMA integrity_check").map_err(sql)?;
    let rows: Vec<String> = stmt
        .query_map([], |r| r.get(0))
        .map_err(sql)?
        .collect::<Result<_, _>>()
        .map_err(sql)?;
    drop(stmt);
    conn.close().map_err(|(_, e)| sql(e))?;
    if rows != ["ok"] {
        return Err(RestoreError::Integrity {
            path: path.to_path_buf(),
            message: rows.join("; "),
        });
    }
    Ok(())
}

fn read_error(key: &str, e: io::Error) -> RestoreError {
    if e.kind() == io::ErrorKind::InvalidData || e.kind() == io::ErrorKind::UnexpectedEof {
        RestoreError::Corrupt {
            key: key.to_string(),
            reason: e.to_string(),
        }
    } else {
        RestoreError::Read {
            key: key.to_string(),
            source: e,
        }
    }
}

/// Whether a failed read of a replica object may succeed when tried again. Errors of local
/// files (a full disk) and damaged objects are not retried.
fn retryable(e: &RestoreError) -> bool {
    match e {
        RestoreError::Store(s) => s.is_retryable(),
        RestoreError::Read { .. } => true,
        RestoreError::Unreadable { retryable, .. } => *retryable,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wal::tests::build_wal;
    use std::fs::{self, OpenOptions};
    use std::io::Write;

    const PS: u32 = 512;

    fn scratch_pages(dir: &Path, name: &str) -> WalPages {
        let path = dir.join(name);
        let file = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .unwrap();
        WalPages::create(file, path)
    }

    /// Feeds `wal` to a `WalCheck` in pieces of `piece` bytes; returns the result and the file.
    fn check_in_pieces(
        wal: &[u8],
        piece: usize,
    ) -> (Result<(ChainState, u64), RestoreError>, Vec<u8>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("idx");
        let f = File::create(&path).unwrap();
        let mut check = WalCheck::new(None, &f, &path, 0, "seg.wal.lz4");
        let res = wal
            .chunks(piece)
            .try_for_each(|c| check.feed(c))
            .and_then(|()| check.finish());
        (res, fs::read(&path).unwrap())
    }

    #[test]
    fn wal_check_accepts_any_split_and_finds_the_last_commit() {
        let wal = build_wal(false, PS, &[(1, 0, 1), (2, 3, 2), (3, 0, 3)]);
        let fsz = wal::frame_size(PS) as usize;
        for piece in [1, 7, 32, fsz - 1, fsz, fsz + 5, wal.len()] {
            let (res, written) = check_in_pieces(&wal, piece);
            let (st, end) = res.unwrap();
            assert_eq!(written, wal, "piece {piece}");
            assert_eq!(end, wal.len() as u64);
            assert_eq!(st.last_commit(), (WAL_HEADER_SIZE + 2 * fsz) as u64);
        }
    }

    #[test]
    fn a_retried_segment_is_written_at_its_offset_not_the_descriptors() {
        // A failed first attempt moved the shared descriptor offset past the segment's start;
        // the retry must still write from `start`, leaving no hole.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("idx");
        let mut f = File::create(&path).unwrap();
        f.write_all(&[0xFF; 5000]).unwrap();
        f.set_len(0).unwrap();
        let wal = build_wal(false, PS, &[(1, 1, 1)]);
        let mut check = WalCheck::new(None, &f, &path, 0, "k");
        check.feed(&wal).unwrap();
        let (_, end) = check.finish().unwrap();
        assert_eq!(end, wal.len() as u64);
        assert_eq!(fs::read(&path).unwrap(), wal);
    }

    #[test]
    fn wal_check_rejects_damage_and_partial_frames() {
        let wal = build_wal(false, PS, &[(1, 0, 1), (2, 3, 2)]);
        let mut bad = wal.clone();
        *bad.last_mut().unwrap() ^= 1;
        let err = check_in_pieces(&bad, 100).0.unwrap_err().to_string();
        assert!(
            err.contains("seg.wal.lz4") && err.contains("checksum mismatch"),
            "{err}"
        );
        let err = check_in_pieces(&wal[..wal.len() - 10], 100).0.unwrap_err();
        assert!(err.to_string().contains("partial frame"), "{err}");
        let err = check_in_pieces(&wal[..20], 7).0.unwrap_err();
        assert!(err.to_string().contains("WAL header"), "{err}");
    }

    #[test]
    fn wal_pages_write_the_last_committed_version_once_and_truncate() {
        let dir = tempfile::tempdir().unwrap();
        let db_path = dir.path().join("db");
        // A 6-page "snapshot" of 0xEE bytes.
        fs::write(&db_path, vec![0xEE; 6 * PS as usize]).unwrap();
        let indexes = [
            // Index 1: pages 2 and 3 (commit, db = 6 pages), then page 4 uncommitted.
            build_wal(false, PS, &[(2, 0, 0x21), (3, 6, 0x31), (4, 0, 0x41)]),
            // Index 2: page 2 again, and page 1 (commit, db shrinks to 4 pages).
            build_wal(false, PS, &[(2, 0, 0x22), (1, 4, 0x12)]),
        ];
        let gather = |name: &str| {
            let mut pages = scratch_pages(dir.path(), name);
            for (i, wal) in indexes.iter().enumerate() {
                let p = dir.path().join(format!("idx{i}"));
                let f = File::options()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .open(&p)
                    .unwrap();
                let mut check = WalCheck::new(None, &f, &p, 0, "k");
                check.feed(wal).unwrap();
                let (st, _) = check.finish().unwrap();
                let idx = IndexFile {
                    page_size: PS,
                    last_commit: st.last_commit(),
                    segments: 1,
                    first_key: "k".into(),
                };
                pages.add_index(&f, &p, &idx).unwrap();
            }
            pages
        };
        let db = OpenOptions::new().write(true).open(&db_path).unwrap();
        gather("pages").apply(&db, PS).unwrap();
        let got = fs::read(&db_path).unwrap();
        let fill: Vec<u8> = got.chunks(PS as usize).map(|p| p[0]).collect();
        assert_eq!(
            fill,
            [0x12, 0x22, 0x31, 0xEE],
            "page 4's uncommitted frame is not applied"
        );

        let err = gather("pages2").apply(&db, 1024).unwrap_err();
        assert!(
            err.to_string().contains("differs from the snapshot's 1024"),
            "{err}"
        );
    }

    #[test]
    fn wal_pages_rewrite_slots_already_flushed_to_the_scratch_file() {
        let dir = tempfile::tempdir().unwrap();
        let db_path = dir.path().join("db");
        let n = 3000u32; // more than one 1 MiB run of 512-byte pages
        fs::write(&db_path, vec![0u8; n as usize * PS as usize]).unwrap();
        let first: Vec<(u32, u32, u8)> = (1..=n).map(|p| (p, 0, (p % 200) as u8)).collect();
        let mut second = vec![(1, 0, 0xA1), (2500, 0, 0xA2)];
        second.push((3, n, 0xA3));
        let mut pages = scratch_pages(dir.path(), "pages");
        for (i, wal) in [build_wal(false, PS, &first), build_wal(false, PS, &second)]
            .iter()
            .enumerate()
        {
            let p = dir.path().join(format!("idx{i}"));
            fs::write(&p, wal).unwrap();
            let idx = IndexFile {
                page_size: PS,
                last_commit: wal.len() as u64,
                segments: 1,
                first_key: "k".into(),
            };
            pages.add_index(&File::open(&p).unwrap(), &p, &idx).unwrap();
        }
        assert_eq!(pages.slots.len(), n as usize, "one slot per page");
        let db = OpenOptions::new().write(true).open(&db_path).unwrap();
        pages.apply(&db, PS).unwrap();
        let got = fs::read(&db_path).unwrap();
        let fill: Vec<u8> = got.chunks(PS as usize).map(|p| p[0]).collect();
        let mut want: Vec<u8> = (1..=n).map(|p| (p % 200) as u8).collect();
        want[0] = 0xA1;
        want[2] = 0xA3;
        want[2499] = 0xA2;
        assert_eq!(fill, want);
    }

    #[test]
    fn wal_pages_reject_page_zero() {
        let dir = tempfile::tempdir().unwrap();
        let wal = build_wal(false, PS, &[(0, 1, 1)]);
        let p = dir.path().join("idx");
        fs::write(&p, &wal).unwrap();
        let idx = IndexFile {
            page_size: PS,
            last_commit: wal.len() as u64,
            segments: 1,
            first_key: "k".into(),
        };
        let mut pages = scratch_pages(dir.path(), "pages");
        let err = pages
            .add_index(&File::open(&p).unwrap(), &p, &idx)
            .unwrap_err();
        assert!(err.to_string().contains("page 0"), "{err}");
    }

    #[test]
    fn no_wal_pages_leave_the_snapshot_alone() {
        let dir = tempfile::tempdir().unwrap();
        let db_path = dir.path().join("db");
        fs::write(&db_path, vec![7u8; 2 * PS as usize]).unwrap();
        let db = OpenOptions::new().write(true).open(&db_path).unwrap();
        let pages = scratch_pages(dir.path(), "p");
        pages.apply(&db, PS).unwrap();
        assert_eq!(fs::read(&db_path).unwrap(), vec![7u8; 2 * PS as usize]);
    }
}
