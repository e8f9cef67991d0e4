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
//! * The output is never overwritten (hard link, not rename) and no `-wal`/`-shm`/temporary
//!   file is left behind, on success or failure (#528).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use thiserror::Error;
use tokio_util::io::SyncIoBridge;
use tracing::{info, warn};

use crate::compress;
use crate::replica::{ReplicaClient, SnapshotInfo, StoreError, WalSegmentInfo};
use crate::replicator::RetryPolicy;
use crate::wal::{self, FrameChain, FrameCheck, FrameHeader, WAL_HEADER_SIZE, WalHeader};

#[derive(Debug, Error)]
pub enum RestoreError {
    #[error("cannot restore, output path already exists: {0}")]
    OutputExists(PathBuf),
    #[error("no matching backups found")]
    NoMatchingBackups,
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
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}: integrity check failed: {message}")]
    Integrity { path: PathBuf, message: String },
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
    let mut last_err = None;
    let mut any_ok = false;
    for (ri, (name, client)) in replicas.iter().enumerate() {
        let gens = match client.generations().await {
            Ok(g) => g,
            Err(e) => {
                warn!(replica = %name, error = %e, "cannot list replica; trying the others");
                last_err = Some(e);
                continue;
            }
        };
        any_ok = true;
        for g in gens {
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
            if best.as_ref().is_none_or(|b| updated > b.0) {
                best = Some((updated, ri, g, snaps, segs));
            }
        }
    }
    if !any_ok && let Some(e) = last_err {
        return Err(e.into());
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

/// Runs a restore.
pub async fn restore(
    replicas: &[NamedReplica],
    opts: &RestoreOptions,
) -> Result<RestoreOutcome, RestoreError> {
    if opts.output.exists() {
        if opts.if_db_not_exists {
            info!(path = %opts.output.display(), "database already exists, skipping restore");
            return Ok(RestoreOutcome::SkippedExists);
        }
        return Err(RestoreError::OutputExists(opts.output.clone()));
    }
    let Some(plan) = plan(replicas, opts).await? else {
        if opts.if_replica_exists {
            info!("no matching backups found");
            return Ok(RestoreOutcome::NoBackups);
        }
        return Err(RestoreError::NoMatchingBackups);
    };
    let (name, client) = &replicas[plan.replica];
    info!(replica = %name, generation = %plan.generation, snapshot = plan.snapshot.index, segments = plan.segments.len(), "restoring");
    let mut cleanup = Cleanup::new(&opts.output);
    let summary = run_plan(name, client, &plan, opts, &mut cleanup).await?;
    cleanup.disarm();
    Ok(RestoreOutcome::Restored(summary))
}

async fn run_plan(
    name: &str,
    client: &ReplicaClient,
    plan: &RestorePlan,
    opts: &RestoreOptions,
    cleanup: &mut Cleanup,
) -> Result<RestoreSummary, RestoreError> {
    let tmp = cleanup.tmp.clone();
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
    for (index, segs) in by_index {
        let path = cleanup.index_path(index);
        let (client, opts, permits) = (client.clone(), opts.clone(), permits.clone());
        fetches.0.push_back(tokio::spawn(async move {
            let _permit = permits
                .acquire_owned()
                .await
                .expect("semaphore never closed");
            fetch_index(&client, index, segs, &path, &opts)
                .await
                .map(|f| (f, path))
        }));
    }

    progress("snapshot", 0, 1);
    let snap_key = client.snapshot_key(&plan.generation, plan.snapshot.index);
    let page_size = fetch_snapshot(client, plan, opts, &tmp, &snap_key).await?;
    progress("snapshot", 1, 1);

    let mut db = OpenOptions::new()
        .write(true)
        .open(&tmp)
        .map_err(io_at(&tmp))?;
    let mut final_pages: Option<u32> = None;
    let mut done = 0;
    let mut segments = 0;
    while let Some(task) = fetches.0.pop_front() {
        let (idx, path) = task.await.map_err(|e| RestoreError::Io {
            path: tmp.clone(),
            source: io::Error::other(e),
        })??;
        if idx.page_size != page_size {
            return Err(RestoreError::Corrupt {
                key: idx.first_key,
                reason: format!(
                    "WAL page size {} differs from the snapshot's {page_size}",
                    idx.page_size
                ),
            });
        }
        segments += idx.segments;
        let p = path.clone();
        let (file, pages) = tokio::task::spawn_blocking(move || apply_index(db, &p, &idx))
            .await
            .expect("apply task")?;
        db = file;
        if pages.is_some() {
            final_pages = pages;
        }
        let _ = fs::remove_file(&path);
        done += 1;
        progress("wal", done, total);
    }
    if let Some(pages) = final_pages {
        db.set_len(pages as u64 * page_size as u64)
            .map_err(io_at(&tmp))?;
    }
    db.sync_all().map_err(io_at(&tmp))?;
    drop(db);

    if opts.integrity_check {
        progress("integrity_check", 0, 1);
        let t = tmp.clone();
        tokio::task::spawn_blocking(move || integrity_check(&t))
            .await
            .expect("integrity task")?;
        cleanup.remove_sidecars();
        progress("integrity_check", 1, 1);
    }
    // A hard link fails if the output appeared meanwhile: never overwrite a database.
    fs::hard_link(&tmp, &opts.output).map_err(|e| {
        if e.kind() == io::ErrorKind::AlreadyExists {
            RestoreError::OutputExists(opts.output.clone())
        } else {
            RestoreError::Io {
                path: opts.output.clone(),
                source: e,
            }
        }
    })?;
    fs::remove_file(&tmp).map_err(io_at(&tmp))?;
    if let Some(dir) = opts.output.parent().filter(|d| !d.as_os_str().is_empty()) {
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io_at(dir))?;
    }
    let bytes = fs::metadata(&opts.output).map(|m| m.len()).unwrap_or(0);
    info!(path = %opts.output.display(), bytes, max_index = format!("{max_index:08x}"), "restore complete");
    Ok(RestoreSummary {
        replica: name.to_string(),
        generation: plan.generation.clone(),
        snapshot_index: plan.snapshot.index,
        max_index,
        segments,
        bytes,
        integrity_checked: opts.integrity_check,
    })
}

fn io_at(p: &Path) -> impl FnOnce(io::Error) -> RestoreError + '_ {
    move |source| RestoreError::Io {
        path: p.to_path_buf(),
        source,
    }
}

/// Downloads and decompresses the snapshot into `tmp`; returns the database page size.
async fn fetch_snapshot(
    client: &ReplicaClient,
    plan: &RestorePlan,
    opts: &RestoreOptions,
    tmp: &Path,
    key: &str,
) -> Result<u32, RestoreError> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        let res = async {
            let body = client
                .open_snapshot(&plan.generation, plan.snapshot.index)
                .await?;
            let (tmp, key) = (tmp.to_path_buf(), key.to_string());
            tokio::task::spawn_blocking(move || -> Result<u32, RestoreError> {
                let out = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .open(&tmp)
                    .map_err(io_at(&tmp))?;
                // Blocks decode on every core; the content is written here in order, and its
                // write-back to disk starts as it goes (see `EarlyWriteback`).
                let workers = std::thread::available_parallelism().map_or(2, |n| n.get().min(8));
                let mut wb = EarlyWriteback::new(&out);
                compress::decode_parallel(SyncIoBridge::new(body), workers, |block| {
                    (&out).write_all(block)?;
                    wb.wrote(block.len());
                    Ok(())
                })
                .map_err(|e| read_error(&key, e))?;
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
        }
        .await;
        match res {
            Err(e) if attempt < opts.read_attempts && retryable(&e) => {
                let d = opts.retry.delay(attempt);
                warn!(key, attempt, error = %e, retry_in = ?d, "snapshot download failed; retrying");
                tokio::time::sleep(d).await;
            }
            other => return other,
        }
    }
}

/// Starts the write-back of a file being written sequentially every 32 MiB
/// (`sync_file_range(SYNC_FILE_RANGE_WRITE)`, which does not wait). With plenty of RAM the
/// kernel would otherwise keep a whole restored database dirty until the final fsync, leaving
/// the disk idle while the snapshot decodes and then waiting for all of it at the end. It is
/// only a hint: the fsync at the end is what makes the file durable, so failures are ignored.
struct EarlyWriteback<'a> {
    file: &'a File,
    written: u64,
    started: u64,
}

impl<'a> EarlyWriteback<'a> {
    const STEP: u64 = 32 << 20;

    fn new(file: &'a File) -> Self {
        EarlyWriteback {
            file,
            written: 0,
            started: 0,
        }
    }

    fn wrote(&mut self, n: usize) {
        use std::os::fd::AsRawFd;
        self.written += n as u64;
        if self.written - self.started >= Self::STEP {
            let len = self.written - self.started;
            // SAFETY: a plain system call on a descriptor that `self.file` keeps open.
            unsafe {
                nix::libc::sync_file_range(
                    self.file.as_raw_fd(),
                    self.started as i64,
                    len as i64,
                    nix::libc::SYNC_FILE_RANGE_WRITE,
                );
            }
            self.started = self.written;
        }
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
async fn fetch_index(
    client: &ReplicaClient,
    index: u32,
    segs: Vec<WalSegmentInfo>,
    path: &Path,
    opts: &RestoreOptions,
) -> Result<IndexFile, RestoreError> {
    let first_key = client.wal_segment_key(&segs[0].pos());
    let out = File::create(path).map_err(io_at(path))?;
    let mut state: Option<ChainState> = None;
    let mut written: u64 = 0;
    // One decoder for the whole index, its reader swapped per segment: a new lz4_flex decoder
    // allocates (and page-faults in) a 4 MiB block buffer, which dominated restores of many
    // small segments. After an error the decoder's state is unknown, so a retry starts afresh.
    let mut decoder: Option<lz4_flex::frame::FrameDecoder<Swap>> = None;
    for seg in &segs {
        let key = client.wal_segment_key(&seg.pos());
        if seg.offset != written {
            return Err(RestoreError::SegmentGap {
                key,
                expected: written,
                found: seg.offset,
            });
        }
        let mut attempt = 0;
        loop {
            attempt += 1;
            let before = state;
            let res = async {
                let body = client.open_wal_segment(&seg.pos()).await?;
                let (key, mut f) = (key.clone(), out.try_clone().map_err(io_at(path))?);
                let dec = decoder.take();
                tokio::task::spawn_blocking(move || {
                    f.set_len(written)
                        .and_then(|_| f.seek(SeekFrom::Start(written)))
                        .map_err(|e| read_error(&key, e))?;
                    let mut dec = match dec {
                        Some(mut d) => {
                            d.get_mut().0 = Some(SyncIoBridge::new(body));
                            d
                        }
                        None => compress::decoder(Swap(Some(SyncIoBridge::new(body)))),
                    };
                    let st = verify_segment(&mut dec, &mut f, before, &key)?;
                    let end = f.stream_position().map_err(|e| read_error(&key, e))?;
                    dec.get_mut().0 = None;
                    Ok::<_, RestoreError>((st, end, dec))
                })
                .await
                .expect("segment task")
            }
            .await;
            match res {
                Ok((st, end, dec)) => {
                    state = Some(st);
                    written = end;
                    decoder = Some(dec);
                    break;
                }
                Err(e) if attempt < opts.read_attempts && retryable(&e) => {
                    let d = opts.retry.delay(attempt);
                    warn!(key, attempt, error = %e, retry_in = ?d, "segment download failed; retrying");
                    tokio::time::sleep(d).await;
                }
                Err(e) => return Err(e),
            }
        }
    }
    out.sync_data().map_err(io_at(path))?;
    let st = state.ok_or_else(|| RestoreError::Corrupt {
        key: first_key.clone(),
        reason: "empty WAL index".into(),
    })?;
    let _ = index;
    Ok(IndexFile {
        page_size: st.page_size,
        last_commit: st.last_commit,
        segments: segs.len(),
        first_key,
    })
}

/// The current segment's body behind one long-lived LZ4 decoder (see `fetch_index`).
struct Swap(Option<SyncIoBridge<crate::replica::ObjectReader>>);

impl Read for Swap {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match &mut self.0 {
            Some(r) => r.read(buf),
            None => Ok(0),
        }
    }
}

/// Validation state carried from one segment of an index to the next.
#[derive(Debug, Clone, Copy)]
struct ChainState {
    chain: FrameChain,
    page_size: u32,
    offset: u64,
    last_commit: u64,
}

/// Reads one decompressed segment, checks it frame by frame and appends it to `out`.
fn verify_segment(
    r: &mut dyn Read,
    out: &mut File,
    prev: Option<ChainState>,
    key: &str,
) -> Result<ChainState, RestoreError> {
    let corrupt = |reason: String| RestoreError::Corrupt {
        key: key.to_string(),
        reason,
    };
    let mut st = match prev {
        Some(s) => s,
        None => {
            let mut hdr = [0u8; WAL_HEADER_SIZE];
            r.read_exact(&mut hdr).map_err(|e| read_error(key, e))?;
            let h = WalHeader::parse(&hdr).map_err(|e| corrupt(format!("WAL header: {e}")))?;
            out.write_all(&hdr).map_err(|e| read_error(key, e))?;
            ChainState {
                chain: FrameChain::new(&h),
                page_size: h.page_size,
                offset: WAL_HEADER_SIZE as u64,
                last_commit: WAL_HEADER_SIZE as u64,
            }
        }
    };
    let fsz = wal::frame_size(st.page_size) as usize;
    let mut frame = vec![0u8; fsz];
    let mut w = io::BufWriter::with_capacity(1 << 20, out);
    loop {
        let n = read_full(r, &mut frame).map_err(|e| read_error(key, e))?;
        if n == 0 {
            break;
        }
        if n < fsz {
            return Err(corrupt(format!(
                "partial frame of {n} bytes at WAL offset {}",
                st.offset
            )));
        }
        match st.chain.check(&frame) {
            FrameCheck::Valid(fh) => {
                st.offset += fsz as u64;
                if fh.is_commit() {
                    st.last_commit = st.offset;
                }
            }
            FrameCheck::SaltMismatch => {
                return Err(corrupt(format!(
                    "frame salt mismatch at WAL offset {}",
                    st.offset
                )));
            }
            FrameCheck::ChecksumMismatch => {
                return Err(corrupt(format!(
                    "frame checksum mismatch at WAL offset {}",
                    st.offset
                )));
            }
        }
        w.write_all(&frame).map_err(|e| read_error(key, e))?;
    }
    w.flush().map_err(|e| read_error(key, e))?;
    Ok(st)
}

fn read_full(r: &mut dyn Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Writes the committed frames of one verified index into the database file. Returns the file
/// and the database size in pages after the last commit, if the index has one.
fn apply_index(
    db: File,
    path: &Path,
    idx: &IndexFile,
) -> Result<(File, Option<u32>), RestoreError> {
    let mut f = io::BufReader::with_capacity(1 << 20, File::open(path).map_err(io_at(path))?);
    f.seek(SeekFrom::Start(WAL_HEADER_SIZE as u64))
        .map_err(io_at(path))?;
    let ps = idx.page_size as u64;
    let mut frame = vec![0u8; wal::frame_size(idx.page_size) as usize];
    let mut off = WAL_HEADER_SIZE as u64;
    let mut pages = None;
    while off < idx.last_commit {
        f.read_exact(&mut frame).map_err(io_at(path))?;
        let fh = FrameHeader::parse(&frame);
        db.write_all_at(&frame[wal::FRAME_HEADER_SIZE..], (fh.pgno as u64 - 1) * ps)
            .map_err(io_at(path))?;
        if fh.is_commit() {
            pages = Some(fh.commit_size);
        }
        off += frame.len() as u64;
    }
    Ok((db, pages))
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
        RestoreError::Io {
            path: PathBuf::from(key),
            source: e,
        }
    }
}

fn retryable(e: &RestoreError) -> bool {
    match e {
        RestoreError::Store(s) => s.is_retryable(),
        RestoreError::Io { .. } => true,
        _ => false,
    }
}

/// Removes every temporary of a restore unless disarmed after success.
struct Cleanup {
    tmp: PathBuf,
    output: PathBuf,
    armed: bool,
}

impl Cleanup {
    fn new(output: &Path) -> Self {
        let mut tmp = output.as_os_str().to_owned();
        tmp.push(".tmp");
        Cleanup {
            tmp: tmp.into(),
            output: output.to_path_buf(),
            armed: true,
        }
    }
    fn index_path(&self, index: u32) -> PathBuf {
        let mut p = self.output.as_os_str().to_owned();
        p.push(format!(".tmp-{index:08x}-wal"));
        p.into()
    }
    fn sidecar(&self, suffix: &str) -> PathBuf {
        let mut p = self.tmp.as_os_str().to_owned();
        p.push(suffix);
        p.into()
    }
    fn remove_sidecars(&self) {
        for s in ["-wal", "-shm", "-journal"] {
            let _ = fs::remove_file(self.sidecar(s));
        }
    }
    fn disarm(&mut self) {
        self.armed = false;
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let _ = fs::remove_file(&self.tmp);
        self.remove_sidecars();
        let dir = self
            .output
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let prefix = format!(
            "{}.tmp-",
            self.output
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        );
        if let Ok(rd) = fs::read_dir(dir) {
            for e in rd.flatten() {
                let n = e.file_name().to_string_lossy().into_owned();
                if n.starts_with(&prefix) && n.ends_with("-wal") {
                    let _ = fs::remove_file(e.path());
                }
            }
        }
    }
}
