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

use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use thiserror::Error;
use tokio_util::io::SyncIoBridge;
use tracing::{debug, info, warn};

use crate::compress;
use crate::layout::Pos;
use crate::replica::ranged::RangeOpts;
use crate::replica::{ReplicaClient, SnapshotInfo, StoreError, WalSegmentInfo};
use crate::replicator::RetryPolicy;

mod merge;
mod output;
pub(crate) use merge::database_page_size;
use merge::{Limits, Merge};
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
    #[error(
        "{replica}: generation {generation} index {index:08x} ends at offset {have}, before the position asked for (offset {want})"
    )]
    ShortOfPosition {
        replica: String,
        generation: String,
        index: u32,
        have: u64,
        want: u64,
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

/// The stage a restore reports while `PRAGMA integrity_check` reads its output (which is in
/// the page cache then: the disk is idle).
pub const INTEGRITY_STAGE: &str = "integrity_check";

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
    /// Restore exactly to this position (a restore drill): its generation, every index up to
    /// its index, and that index only up to its offset, which the replica must reach.
    pub until: Option<Until>,
    /// Hash the restored file (xxh3-64 of its bytes, [`RestoreSummary::output_hash`]) while
    /// the integrity check reads it, from the descriptor the restore wrote it through: a drill
    /// compares it with the source's, and reading the file a third time cost it ~20%.
    pub hash_output: bool,
}

/// A restore to an exact position (see [`RestoreOptions::until`]).
#[derive(Debug, Clone)]
pub struct Until {
    pub pos: Pos,
    /// When the position was the database's: a snapshot of the position's index taken later
    /// may hold pages written after it, so only earlier ones are used.
    pub taken_at: SystemTime,
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
            until: None,
            hash_output: false,
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
    /// With [`RestoreOptions::hash_output`]: the restored file's length and xxh3-64.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_hash: Option<(u64, u64)>,
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
    let max_index = opts.until.as_ref().map(|u| u.pos.index).or(opts.index);
    let snapshot = snaps
        .into_iter()
        .filter(|s| max_index.is_none_or(|i| s.index <= i))
        .filter(|s| {
            opts.until
                .as_ref()
                .is_none_or(|u| s.index < u.pos.index || s.created_at <= u.taken_at)
        })
        .filter(|s| opts.timestamp.is_none_or(|ts| s.created_at <= ts))
        // A snapshot replays only with its own index's WAL from offset 0 (spec §1.6). The
        // newest may not have it yet (taken a moment before the daemon stopped): an older one
        // whose WAL is there restores the newest point that can be. With none, the newest is
        // chosen and the restore says which index is missing.
        .max_by_key(|s| {
            let replayable = segs.iter().any(|g| {
                g.index == s.index
                    && g.offset == 0
                    && opts.timestamp.is_none_or(|ts| g.created_at <= ts)
            });
            (replayable, s.index)
        })
        .ok_or_else(|| RestoreError::NoSnapshot {
            replica: replica_name.clone(),
            generation: generation.clone(),
        })?;
    let mut segments = Vec::new();
    for s in segs {
        if s.index < snapshot.index {
            continue;
        }
        if max_index.is_some_and(|i| s.index > i)
            || opts.timestamp.is_some_and(|ts| s.created_at > ts)
        {
            break;
        }
        if opts
            .until
            .as_ref()
            .is_some_and(|u| s.index == u.pos.index && s.offset >= u.pos.offset)
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
        let want = opts
            .until
            .as_ref()
            .map(|u| &u.pos.generation)
            .or(opts.generation.as_ref());
        if want.is_some_and(|want| *want != g) {
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

/// The restored database's name inside the restore's private directory.
const DB_FILE: &str = "db";

/// Compressed WAL segments the prefetch may hold ahead of the merge.
const PREFETCH_BYTES: u64 = 4 << 20;
/// Segments bigger than this are not prefetched whole but streamed when the merge reaches
/// them (by parallel ranges from a bucket) and decoded on every core.
const STREAM_ABOVE: u64 = 2 << 20;
/// Bytes per ranged GET of a big object, and how many are in flight at most (`--parallelism`,
/// 8 by default, may lower it): at most 18 MiB held (see `replica::ranged`). Throughput
/// follows the bytes in flight, since every GET first waits for the store (s3s-fs on loopback
/// answers each ranged GET ~40 ms late; S3's first byte takes 10-50 ms): on a 512 MiB snapshot
/// from s3s-fs, 8 x 1 MiB took 4.2-5.2 s, 8 x 2 MiB 2.8-3.3 s, 8 x 4 MiB 2.1-2.6 s but
/// peaked at 107 MiB.
const RANGE_CHUNK: u64 = 2 << 20;
const RANGE_CONNECTIONS: usize = 8;

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
    let ranges = RangeOpts {
        connections: opts.parallelism.clamp(1, RANGE_CONNECTIONS),
        chunk: RANGE_CHUNK,
        attempts: opts.read_attempts.max(1),
        backoff: opts.retry.initial,
    };

    // The WAL indexes merge newest first (see `merge`), straight into the output file, while
    // the segments after the one being merged download in the background.
    let mut merge = Merge::new(scratch.create(DB_FILE)?, tmp.clone(), Limits::default());
    by_index.reverse();
    let total = by_index.len() as u64;
    let mut prefetch = Prefetch::start(client, opts, &by_index, ranges);
    let pool = Arc::new(compress::Scratch::default());
    for (done, (index, segs)) in by_index.iter().enumerate() {
        merge.begin_index(*index);
        let mut written = 0u64;
        for seg in segs {
            if seg.offset != written {
                return Err(RestoreError::SegmentGap {
                    key: client.wal_segment_key(&seg.pos()),
                    expected: written,
                    found: seg.offset,
                });
            }
            let fetched = prefetch.next().await?;
            let n;
            let cut = cut_at(opts, seg);
            (merge, n) =
                merge_segment(client, seg, fetched, merge, &pool, opts, ranges, cut).await?;
            written += n;
        }
        if let Some(p) = opts
            .until
            .as_ref()
            .map(|u| &u.pos)
            .filter(|p| p.index == *index)
            && written < p.offset
        {
            return Err(RestoreError::ShortOfPosition {
                replica: name.to_string(),
                generation: plan.generation.clone(),
                index: *index,
                have: written,
                want: p.offset,
            });
        }
        let replay;
        (merge, replay) = blocking(move || {
            let r = merge.end_index()?;
            Ok((merge, r))
        })
        .await?;
        if let Some(r) = replay {
            warn!(
                index = format!("{index:08x}"),
                "a transaction bigger than the merge buffer was never committed; reading the index again for the pages it overwrote"
            );
            merge.begin_replay(r);
            for seg in segs {
                let cut = cut_at(opts, seg);
                (merge, _) = merge_segment(
                    client,
                    seg,
                    Fetched::Stream,
                    merge,
                    &pool,
                    opts,
                    ranges,
                    cut,
                )
                .await?;
            }
            (merge, _) = blocking(move || {
                let r = merge.end_index()?;
                Ok((merge, r))
            })
            .await?;
        }
        progress("wal", done as u64 + 1, total);
    }
    prefetch.stop().await;
    debug!(elapsed = ?started.elapsed(), "WAL indexes merged");

    // The snapshot fills the pages nothing newer wrote.
    progress("snapshot", 0, 1);
    let snap_key = client.snapshot_key(&plan.generation, plan.snapshot.index);
    let merge = merge_snapshot(client, plan, opts, merge, &snap_key, ranges).await?;
    progress("snapshot", 1, 1);
    let stats = merge.stats();
    let (db, bytes) = blocking(move || {
        let (db, bytes) = merge.finish()?;
        db.sync_all().map_err(io_at(&tmp))?;
        Ok((db, bytes))
    })
    .await?;
    // The hash reads the file through the descriptor that wrote it (no path to race on), on
    // another thread while SQLite's integrity check reads it through its own.
    let hashing = if opts.hash_output {
        let at = scratch.path(DB_FILE);
        Some(tokio::task::spawn_blocking(move || {
            crate::db::hash_file(&db).map_err(io_at(&at))
        }))
    } else {
        drop(db);
        None
    };
    debug!(elapsed = ?started.elapsed(), wal_pages = stats.wal_pages, snapshot_pages = stats.snapshot_pages, rewrites = stats.rewrites, "merged and synced");

    let checked = if opts.integrity_check {
        progress(INTEGRITY_STAGE, 0, 1);
        let sc = scratch.clone();
        blocking(move || {
            sc.check_same(DB_FILE)?;
            let res = integrity_check(&sc.path(DB_FILE));
            sc.check_same(DB_FILE)?;
            for s in ["-wal", "-shm", "-journal"] {
                sc.remove(&format!("{DB_FILE}{s}"));
            }
            res
        })
        .await
    } else {
        Ok(())
    };
    // Awaited even when the check failed: nothing this restore started outlives it.
    let output_hash = match hashing {
        Some(h) => Some(h.await.expect("restore hash task")),
        None => None,
    };
    checked?;
    if opts.integrity_check {
        progress(INTEGRITY_STAGE, 1, 1);
    }
    let output_hash = output_hash.transpose()?;
    Ok(RestoreSummary {
        replica: name.to_string(),
        generation: plan.generation.clone(),
        snapshot_index: plan.snapshot.index,
        max_index,
        segments: plan.segments.len(),
        bytes,
        integrity_checked: opts.integrity_check,
        output: PathBuf::new(),
        moved_aside: Vec::new(),
        lineage: None,
        output_hash,
    })
}

/// Runs blocking work (file I/O, decoding) off the async runtime.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, RestoreError> + Send + 'static,
) -> Result<T, RestoreError> {
    tokio::task::spawn_blocking(f)
        .await
        .expect("restore blocking task")
}

fn io_at(p: &Path) -> impl FnOnce(io::Error) -> RestoreError + '_ {
    move |source| RestoreError::Io {
        path: p.to_path_buf(),
        source,
    }
}

/// An error out of the LZ4 decoder: the merge's own error (a damaged frame, a local write
/// error) if it came from the sink, else a problem with the object `key`.
fn decode_error(key: &str, e: io::Error) -> RestoreError {
    match e.downcast::<RestoreError>() {
        Ok(e) => e,
        Err(e) => read_error(key, e),
    }
}

/// A WAL segment as the prefetch hands it over.
enum Fetched {
    /// The whole (decrypted) object, and its share of the prefetch budget.
    Bytes(Vec<u8>, tokio::sync::OwnedSemaphorePermit),
    /// Too big to hold: opened and streamed when the merge reaches it.
    Stream,
    /// Too big to hold, in a bucket: its ranges, fetched by the schedule that serves every
    /// big segment of the restore back to back (see `ranged::readers`).
    Ranged(crate::replica::ObjectReader),
}

/// Downloads WAL segments ahead of the merge, in the merge's order: up to `parallelism` at
/// once and [`PREFETCH_BYTES`] held. The budget is taken in order by one driver task, so the
/// segment the merge waits for always gets it first.
struct Prefetch {
    rx: tokio::sync::mpsc::Receiver<tokio::task::JoinHandle<Result<Fetched, RestoreError>>>,
    driver: tokio::task::JoinHandle<()>,
}

impl Prefetch {
    fn start(
        client: &ReplicaClient,
        opts: &RestoreOptions,
        indexes: &[(u32, Vec<WalSegmentInfo>)],
        ranges: RangeOpts,
    ) -> Self {
        let segs: Vec<WalSegmentInfo> = indexes.iter().flat_map(|(_, s)| s.clone()).collect();
        // The big segments of a bucket are read by one schedule of ranges, so the next one's
        // first ranges are in flight while the merge finishes the one before (each GET first
        // waits for the store). A local directory streams them from the file instead.
        let mut big = match client.kind() {
            _ if ranges.connections < 2 => Vec::new(),
            "file" => Vec::new(),
            _ => {
                let big: Vec<_> = segs
                    .iter()
                    .filter(|s| s.size > STREAM_ABOVE)
                    .map(|s| (s.pos(), s.size))
                    .collect();
                client.wal_segments_ranged(&big, ranges)
            }
        }
        .into_iter();
        let (tx, rx) = tokio::sync::mpsc::channel(opts.parallelism.max(1));
        let (client, opts) = (client.clone(), opts.clone());
        let driver = tokio::spawn(async move {
            let budget = Arc::new(tokio::sync::Semaphore::new(PREFETCH_BYTES as usize));
            for seg in segs {
                let h = if seg.size > STREAM_ABOVE {
                    let f = match big.next() {
                        Some(body) => Fetched::Ranged(body),
                        None => Fetched::Stream,
                    };
                    tokio::spawn(async { Ok(f) })
                } else {
                    let cost = seg.size.max(1) as u32;
                    let Ok(permit) = budget.clone().acquire_many_owned(cost).await else {
                        return;
                    };
                    let (client, opts) = (client.clone(), opts.clone());
                    tokio::spawn(async move {
                        let key = client.wal_segment_key(&seg.pos());
                        let data = with_retries(&opts, &key, "segment", || async {
                            use tokio::io::AsyncReadExt;
                            let mut body = client.open_wal_segment(&seg.pos()).await?;
                            let mut data = Vec::with_capacity(seg.size as usize);
                            body.read_to_end(&mut data)
                                .await
                                .map_err(|e| read_error(&key, e))?;
                            Ok(data)
                        })
                        .await?;
                        Ok(Fetched::Bytes(data, permit))
                    })
                };
                if let Err(e) = tx.send(h).await {
                    e.0.abort();
                    return;
                }
            }
        });
        Prefetch { rx, driver }
    }

    async fn next(&mut self) -> Result<Fetched, RestoreError> {
        let h = self.rx.recv().await.expect("one download per segment");
        h.await.map_err(|e| {
            RestoreError::Store(StoreError::Io {
                store: String::new(),
                op: "get",
                key: String::new(),
                source: io::Error::other(e),
            })
        })?
    }

    /// Stops every download and waits until they have stopped.
    async fn stop(mut self) {
        self.driver.abort();
        let _ = (&mut self.driver).await;
        self.rx.close();
        while let Some(h) = self.rx.recv().await {
            h.abort();
            let _ = h.await;
        }
    }
}

impl Drop for Prefetch {
    fn drop(&mut self) {
        // A restore that failed: the downloads hold nothing but memory; stop them.
        self.driver.abort();
        self.rx.close();
        while let Ok(h) = self.rx.try_recv() {
            h.abort();
        }
    }
}

/// How many decoded bytes of `seg` the merge takes: all, except in the index of
/// `RestoreOptions::until`, which ends at its offset.
fn cut_at(opts: &RestoreOptions, seg: &WalSegmentInfo) -> Option<u64> {
    opts.until
        .as_ref()
        .map(|u| &u.pos)
        .filter(|p| p.index == seg.index)
        .map(|p| p.offset.saturating_sub(seg.offset))
}

/// Feeds decoded bytes to `feed`, no more than `cut` in all (None: everything).
fn take(
    cut: Option<u64>,
    mut feed: impl FnMut(&[u8]) -> io::Result<()>,
) -> impl FnMut(&[u8]) -> io::Result<()> {
    let mut left = cut.unwrap_or(u64::MAX);
    move |b| {
        let n = (b.len() as u64).min(left) as usize;
        left -= n as u64;
        if n == 0 { Ok(()) } else { feed(&b[..n]) }
    }
}

/// Decodes one segment into the merge (up to `cut` bytes of it, see [`cut_at`]). Returns the
/// merge and the segment's decoded length.
#[allow(clippy::too_many_arguments)]
async fn merge_segment(
    client: &ReplicaClient,
    seg: &WalSegmentInfo,
    fetched: Fetched,
    mut merge: Merge,
    pool: &Arc<compress::Scratch>,
    opts: &RestoreOptions,
    ranges: RangeOpts,
    cut: Option<u64>,
) -> Result<(Merge, u64), RestoreError> {
    let key = client.wal_segment_key(&seg.pos());
    let pool = pool.clone();
    match fetched {
        Fetched::Bytes(data, permit) => {
            blocking(move || {
                let n = compress::decode(
                    io::Cursor::new(&data),
                    &pool,
                    take(cut, |b| merge.feed(&key, b).map_err(io::Error::other)),
                )
                .map_err(|e| decode_error(&key, e))?;
                merge.end_segment(&key)?;
                drop(permit);
                Ok((merge, n))
            })
            .await
        }
        Fetched::Stream | Fetched::Ranged(_) => {
            // The stream retries each range itself; only opening it is retried here.
            let body = match fetched {
                Fetched::Ranged(body) => client.open_body(&key, body).await?,
                _ => {
                    with_retries(opts, &key, "segment", || async {
                        Ok(client
                            .open_wal_segment_ranged(&seg.pos(), seg.size, ranges)
                            .await?)
                    })
                    .await?
                }
            };
            let workers = decode_workers(client);
            blocking(move || {
                let n = compress::decode_parallel(
                    SyncIoBridge::new(body),
                    workers,
                    take(cut, |b| merge.feed(&key, b).map_err(io::Error::other)),
                )
                .map_err(|e| decode_error(&key, e))?;
                merge.end_segment(&key)?;
                Ok((merge, n))
            })
            .await
        }
    }
}

/// LZ4 decoders for a big object. Each holds 8 MiB (a compressed and a decoded block). From a
/// local directory the disk is the bound, and four cores decode faster than any disk writes.
/// From a bucket the network is: one decoder (~3 GB/s of mostly stored blocks) leaves the
/// memory to the ranges in flight (512 MiB shapes from s3s-fs: 55-64 MiB peak with two
/// decoders, 51-57 with one; times within the run-to-run noise).
fn decode_workers(client: &ReplicaClient) -> usize {
    match client.kind() {
        "file" => std::thread::available_parallelism().map_or(2, |n| n.get().min(4)),
        _ => 1,
    }
}

/// Decodes the snapshot into the merge, which writes the pages nothing newer wrote. A
/// retryable failure starts the snapshot again (the pages written are simply written again).
async fn merge_snapshot(
    client: &ReplicaClient,
    plan: &RestorePlan,
    opts: &RestoreOptions,
    merge: Merge,
    key: &str,
    ranges: RangeOpts,
) -> Result<Merge, RestoreError> {
    let workers = decode_workers(client);
    let slot = Arc::new(std::sync::Mutex::new(Some(merge)));
    with_retries(opts, key, "snapshot", || async {
        let body = match open_local_snapshot(client, plan).await {
            Some(local) => local.map_err(|e| read_error(key, e))?,
            None => Box::new(SyncIoBridge::new(
                client
                    .open_snapshot_ranged(
                        &plan.generation,
                        plan.snapshot.index,
                        plan.snapshot.size,
                        ranges,
                    )
                    .await?,
            )),
        };
        let (slot, key) = (slot.clone(), key.to_string());
        blocking(move || {
            let mut merge = slot.lock().expect("merge slot").take().expect("merge");
            merge.restart_snapshot();
            let res = compress::decode_parallel(body, workers, |b| {
                merge.snapshot(&key, b).map_err(io::Error::other)
            })
            .map_err(|e| decode_error(&key, e));
            *slot.lock().expect("merge slot") = Some(merge);
            res.map(|_| ())
        })
        .await
    })
    .await?;
    let merge = slot.lock().expect("merge slot").take().expect("merge");
    Ok(merge)
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

impl RestoreError {
    /// Whether the restore failed because a replica could not be read (the network, the
    /// store), not because of what it holds.
    pub fn is_transient(&self) -> bool {
        retryable(self)
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
