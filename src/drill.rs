//! Restore drills: prove that a replica restores to the source's exact content.
//!
//! A drill takes a position P the shadow WAL has reached and the checksum of the database's
//! pages at P (`db::DrillSource`: the database file overlaid with the shadow index's frames up
//! to P, read while our checkpoints are paused; no write lock, no forced checkpoint), waits
//! until the replica holds P, restores the replica to exactly P into a scratch directory
//! (`restore` with `RestoreOptions::until`), runs `PRAGMA integrity_check` and compares the
//! restored file's checksum with the source's. A replica that restores to a valid but wrong
//! database (a missing tail segment, an object from another database, a stale snapshot) fails.
//!
//! A drill runs on its own thread with lowered CPU and I/O priority and its own runtime and
//! replica clients, so it never takes a thread, a connection or a disk slot from replication.
//! At most one drill runs at a time in the process ([`SLOT`]).

use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use futures::FutureExt;
use tokio::sync::Semaphore;
use tracing::{info, warn};
use twox_hash::XxHash3_64;

use crate::crypt::AgeKeys;
use crate::db::DrillSource;
use crate::layout::Pos;
use crate::replica::{ReplicaClient, Target};
use crate::restore::{self, RestoreError, RestoreOptions, RestoreOutcome};
use crate::status::{DrillResult, DrillRun, DrillStatus};

/// At most one drill at a time per process: a drill downloads a whole database.
static SLOT: Semaphore = Semaphore::const_new(1);

/// Bytes kept free beside a drill's restored database (the restore's own files, the
/// filesystem's reserve).
const FREE_MARGIN: u64 = 64 << 20;

/// How long a drill waits for a replica to reach its position before the source's checksum
/// takes the wait instead of waiting for the restore (see `drill`): the usual wait is one
/// sync interval.
const CATCH_UP_GRACE: Duration = Duration::from_secs(2);

/// The longest the source's checksum waits for a restore's integrity check (see `drill`):
/// our checkpoints are paused until it is taken, so a big or slow restore must not hold
/// them for its whole length (a 1 GiB restore from a directory takes ~2.5 s).
const HOLD_MAX: Duration = Duration::from_secs(30);

/// A database's drill settings, resolved from its config.
#[derive(Clone)]
pub struct DrillSpec {
    /// Off when None.
    pub interval: Option<Duration>,
    /// Scratch directory (private, 0700) the drill restores into.
    pub dir: PathBuf,
    /// Longest a drill may wait for a replica to reach its position.
    pub timeout: Duration,
    /// The replicas, as the drill builds its own clients for them.
    pub replicas: Vec<DrillReplica>,
}

/// How the drill reaches one replica (its own client, on the drill's runtime).
#[derive(Clone)]
pub struct DrillReplica {
    pub name: String,
    pub target: Target,
    pub age: Option<AgeKeys>,
    /// The replica's request counters: a drill's downloads are billed like any other.
    pub meter: std::sync::Arc<crate::replica::meter::RequestMeter>,
}

impl std::fmt::Debug for DrillSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DrillSpec")
            .field("interval", &self.interval)
            .field("dir", &self.dir)
            .field("timeout", &self.timeout)
            .field(
                "replicas",
                &self.replicas.iter().map(|r| &r.name).collect::<Vec<_>>(),
            )
            .finish()
    }
}

/// The checksum of a database's pages at a position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageSum {
    pub pages: u64,
    pub page_size: u32,
    pub hash: u64,
}

/// Checksums the source's pages at the source's position (blocking). The source's guard
/// pauses our checkpoints only while this runs.
pub fn source_sum(src: &DrillSource) -> io::Result<PageSum> {
    let mut h = XxHash3_64::with_seed(0);
    let mut pages = 0u64;
    let page_size = src.pages(|page| {
        h.write(page);
        pages += 1;
    })?;
    Ok(PageSum {
        pages,
        page_size,
        hash: h.finish(),
    })
}

/// The checksum of a restored file of `len` bytes whose xxh3-64 is `hash`
/// (`RestoreSummary::output_hash`), as `page_size` pages: the source's sum is the same hash
/// over its pages in order.
pub fn file_sum((len, hash): (u64, u64), page_size: u32) -> PageSum {
    PageSum {
        pages: len / page_size as u64,
        page_size,
        hash: if len.is_multiple_of(page_size as u64) {
            hash
        } else {
            // Never equal to a whole-page sum.
            !hash
        },
    }
}

use std::hash::Hasher;

/// Runs one drill of every replica of a database on a dedicated low-priority thread.
/// `positions` are the replicas' positions as their tasks last reported them (in the order
/// of `spec.replicas`). Returns one status per replica.
pub async fn run(
    db_name: String,
    source: DrillSource,
    spec: DrillSpec,
    positions: Arc<Mutex<Vec<Option<Pos>>>>,
    progress: Arc<Mutex<Option<DrillRun>>>,
) -> Vec<DrillStatus> {
    // The permit goes with the thread: a drill abandoned by its worker (a reload, a stop)
    // still holds it until its thread is done.
    let slot = SLOT.acquire().await.expect("drill slot never closed");
    let started = SystemTime::now();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let n = spec.replicas.len();
    let spawned = std::thread::Builder::new()
        .name(format!("drill-{db_name}"))
        .spawn(move || {
            let _slot = slot;
            let prepared = AtomicBool::new(false);
            lower_priority();
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .max_blocking_threads(8)
                .thread_name("drill")
                .on_thread_start(lower_priority)
                .enable_all()
                .build();
            let out = match rt {
                Ok(rt) => rt.block_on(drill(
                    &db_name, source, &spec, &positions, &progress, &prepared,
                )),
                Err(e) => not_run_since(
                    started,
                    spec.replicas.len(),
                    &format!("cannot start the drill's runtime: {e}"),
                ),
            };
            *progress.lock().expect("drill progress") = None;
            let _ = tx.send(out);
            // The restored database goes after the answer (a 1 GiB unlink takes ~0.25 s), still
            // under the slot; a crash before this leaves it to the next drill's `prepare_dir`.
            // Only from a directory `prepare_dir` accepted (never through a link put there).
            if prepared.load(Ordering::SeqCst) {
                let _ = fs::remove_file(output_path(&spec.dir, &db_name));
            }
        });
    if let Err(e) = spawned {
        return not_run_since(started, n, &format!("cannot start the drill thread: {e}"));
    }
    rx.await
        .unwrap_or_else(|_| not_run_since(started, n, "the drill thread panicked"))
}

fn finished(
    started: SystemTime,
    result: DrillResult,
    reason: Option<String>,
    pos: Option<Pos>,
    restored_bytes: u64,
) -> DrillStatus {
    let now = SystemTime::now();
    DrillStatus {
        result,
        finished_at: Some(now),
        last_success: (result == DrillResult::Passed).then_some(now),
        duration_seconds: now
            .duration_since(started)
            .unwrap_or_default()
            .as_secs_f64(),
        restored_bytes,
        pos,
        reason,
    }
}

/// The status of a drill that could not start, for each of `n` replicas.
pub fn not_run(n: usize, reason: &str) -> Vec<DrillStatus> {
    not_run_since(SystemTime::now(), n, reason)
}

fn not_run_since(started: SystemTime, n: usize, reason: &str) -> Vec<DrillStatus> {
    warn!(reason, "restore drill could not run");
    (0..n)
        .map(|_| {
            finished(
                started,
                DrillResult::Error,
                Some(reason.to_string()),
                None,
                0,
            )
        })
        .collect()
}

async fn drill(
    db_name: &str,
    source: DrillSource,
    spec: &DrillSpec,
    positions: &Mutex<Vec<Option<Pos>>>,
    progress: &Arc<Mutex<Option<DrillRun>>>,
    prepared: &AtomicBool,
) -> Vec<DrillStatus> {
    let set_progress = |replica: Option<&str>, stage: &'static str, done: u64, total: u64| {
        *progress.lock().expect("drill progress") = Some(DrillRun {
            replica: replica.map(str::to_string),
            stage: stage.into(),
            done,
            total,
        });
    };
    set_progress(None, "waiting", 0, 1);
    let (pos, taken_at) = (source.pos().clone(), source.taken_at());
    let size = source.file_len();
    // The source's checksum is awaited only for the comparison, so it can run beside other
    // work; our checkpoints stay paused until it is taken. From a bucket the restore waits on
    // the network and the checksum starts at once (overlapping saved 16 %: 13.8 -> 11.6 s).
    // From a local directory the restore's merge reads and writes the disk the checksum
    // reads, so the checksum waits for the restore's integrity check, which reads the
    // restored file from the page cache, or for a wait on the replica (`drill_replica`):
    // cold 1 GiB drills went from 1.15-1.32x of a restore plus one read (checksum first) to
    // 0.95-1.01x (docs/benchmarks.md). Checkpoints then stay paused for the restore's length
    // (at most `HOLD_MAX`), as they do for a snapshot's upload.
    let (start, go) = Start::new();
    let start = Arc::new(start);
    let timer = {
        let start = start.clone();
        tokio::spawn(async move {
            tokio::time::sleep(HOLD_MAX).await;
            start.fire();
        })
    };
    if spec
        .replicas
        .first()
        .is_some_and(|r| !matches!(r.target, Target::File(_)))
    {
        start.fire();
    }
    let (name, p) = (db_name.to_string(), pos.clone());
    let sum = tokio::task::spawn_blocking(move || {
        if go.recv().is_err() {
            return Err("the source's checksum was not needed".to_string());
        }
        let t = Instant::now();
        let s = source_sum(&source);
        drop(source);
        if let Ok(s) = &s {
            info!(db = name, pos = %p, pages = s.pages, elapsed = ?t.elapsed(), "drill: source checksum taken");
        }
        s.map_err(|e| format!("cannot read the source at {p}: {e}"))
    })
    .map(|r| r.unwrap_or_else(|e| Err(format!("the checksum task failed: {e}"))))
    .boxed()
    .shared();

    let mut out = Vec::new();
    for (i, r) in spec.replicas.iter().enumerate() {
        let started = SystemTime::now();
        set_progress(Some(&r.name), "waiting", 0, 1);
        let res = drill_replica(
            db_name,
            spec,
            i,
            r,
            (&pos, taken_at),
            (size, sum.clone(), &start),
            positions,
            progress,
            prepared,
        )
        .await;
        let st = match res {
            Ok(bytes) => {
                info!(db = db_name, replica = %r.name, pos = %pos, bytes, "drill passed: the replica restores to the source's content");
                finished(started, DrillResult::Passed, None, Some(pos.clone()), bytes)
            }
            Err((result, reason)) => {
                warn!(db = db_name, replica = %r.name, pos = %pos, result = result.as_str(), reason = %reason, "drill did not pass");
                finished(started, result, Some(reason), Some(pos.clone()), 0)
            }
        };
        out.push(st);
    }
    // Unfired by now, the checksum was not needed: dropping the timer's `Start` ends its task.
    timer.abort();
    out
}

type Outcome = Result<u64, (DrillResult, String)>;

/// The source's checksum, being taken (see [`drill`]).
type SourceSum =
    futures::future::Shared<futures::future::BoxFuture<'static, Result<PageSum, String>>>;

#[allow(clippy::too_many_arguments)]
async fn drill_replica(
    db_name: &str,
    spec: &DrillSpec,
    i: usize,
    r: &DrillReplica,
    (pos, taken_at): (&Pos, SystemTime),
    (size, sum, start): (u64, SourceSum, &Arc<Start>),
    positions: &Mutex<Vec<Option<Pos>>>,
    progress: &Arc<Mutex<Option<DrillRun>>>,
    prepared: &AtomicBool,
) -> Outcome {
    let err = |s: String| (DrillResult::Error, s);
    let fail = |s: String| (DrillResult::Failed, s);

    // The replica must hold P before it can be restored to P.
    let waited = Instant::now();
    let deadline = waited + spec.timeout;
    loop {
        let have = positions
            .lock()
            .expect("positions")
            .get(i)
            .cloned()
            .flatten();
        match &have {
            Some(h)
                if h.generation == pos.generation
                    && (h.index, h.offset) >= (pos.index, pos.offset) =>
            {
                break;
            }
            Some(h) if h.generation != pos.generation => {
                return Err(err(format!(
                    "the database started generation {} after the drill took its position {pos}; the next drill uses the new one",
                    h.generation
                )));
            }
            // Well behind: the checksum takes the wait (the disk is not the restore's yet).
            _ if waited.elapsed() >= CATCH_UP_GRACE => start.fire(),
            _ => {}
        }
        if Instant::now() >= deadline {
            return Err(fail(format!(
                "the replica did not reach the drill's position {pos} within {} (it holds {})",
                humantime::format_duration(spec.timeout),
                have.map_or("nothing yet".to_string(), |h| h.to_string())
            )));
        }
        // The positions are in memory: a short poll keeps the drill from adding up to a
        // poll's length to its time once the replica is there.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let dir = spec.dir.clone();
    let need = size + FREE_MARGIN;
    let out_path = output_path(&spec.dir, db_name);
    let stale = out_path.clone();
    tokio::task::spawn_blocking(move || prepare_dir(&dir, need, &stale))
        .await
        .expect("drill dir task")
        .map_err(err)?;
    prepared.store(true, Ordering::SeqCst);

    let store = r
        .target
        .clone()
        .open()
        .await
        .map_err(|e| err(format!("cannot open the replica: {e}")))?;
    let client = ReplicaClient::metered(store, r.meter.clone()).with_age(r.age.clone());
    let mut opts = RestoreOptions::new(&out_path);
    opts.until = Some(restore::Until {
        pos: pos.clone(),
        taken_at,
    });
    opts.integrity_check = true;
    opts.hash_output = true;
    let (p, name, st) = (progress.clone(), r.name.clone(), start.clone());
    opts.progress = Some(Arc::new(move |rp: &restore::RestoreProgress| {
        if rp.stage == restore::INTEGRITY_STAGE {
            st.fire();
        }
        *p.lock().expect("drill progress") = Some(DrillRun {
            replica: Some(name.clone()),
            stage: rp.stage.into(),
            done: rp.done,
            total: rp.total,
        });
    }));
    let replicas = [(r.name.clone(), client)];
    let restored = restore::restore(&replicas, &opts).await;
    let result = match restored {
        Ok(RestoreOutcome::Restored(s)) => {
            start.fire();
            let sum = match sum.await {
                Ok(sum) => sum,
                Err(e) => {
                    let _ = fs::remove_file(&out_path);
                    return Err(err(e));
                }
            };
            match s.output_hash.map(|h| file_sum(h, sum.page_size)) {
                None => Err(err("the restore did not hash its output".into())),
                Some(got) if got.pages != sum.pages => Err(fail(format!(
                    "restored {} pages at {pos}, the source had {} pages there",
                    got.pages, sum.pages
                ))),
                Some(got) if got != sum => Err(fail(format!(
                    "the restored database is not the source at {pos} (checksum {:016x}, the source's {:016x}): the replica restores to other content",
                    got.hash, sum.hash
                ))),
                Some(_) => Ok(s.bytes),
            }
        }
        Ok(other) => Err(fail(format!(
            "restore found nothing to restore ({other:?})"
        ))),
        Err(e) if e.is_transient() => Err(err(format!("cannot read the replica: {e}"))),
        // A generation whose only snapshot was uploaded after the position: the next drill.
        Err(e @ RestoreError::NoSnapshot { .. }) => Err(err(format!(
            "no snapshot taken before the drill's position yet: {e}"
        ))),
        Err(e) => Err(fail(format!("restore failed: {e}"))),
    };
    // The output stays for `run` to remove after the answer; the next replica's
    // `prepare_dir` removes it before restoring again.
    result
}

/// Starts the source's checksum once (see [`drill`]). Dropped unfired, the checksum is
/// never taken.
struct Start {
    tx: Mutex<Option<std::sync::mpsc::SyncSender<()>>>,
}

impl Start {
    /// The starter and the receiving end the checksum task waits on.
    fn new() -> (Start, std::sync::mpsc::Receiver<()>) {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        (
            Start {
                tx: Mutex::new(Some(tx)),
            },
            rx,
        )
    }
    fn fire(&self) {
        if let Some(tx) = self.tx.lock().expect("drill start").take() {
            let _ = tx.send(());
        }
    }
}

/// Where a drill of database `db` restores to: a name no application database is likely to
/// have, should drill_dir be misconfigured.
fn output_path(dir: &Path, db: &str) -> PathBuf {
    dir.join(format!("{}.litestreamd-drill", sanitize(db)))
}

/// Where the last drill of each replica of database `db` is kept.
pub fn history_path(spec: &DrillSpec, db: &str) -> PathBuf {
    spec.dir.join(format!(".{}.drills.json", sanitize(db)))
}

/// The last drill of each replica as saved by [`save_history`], so a restart neither forgets
/// a failed drill nor makes every database look undrilled. Replicas not in `names` are
/// dropped; a missing or unreadable file is no history.
pub fn load_history(path: &Path, names: &[String]) -> Vec<Option<DrillStatus>> {
    let saved: std::collections::BTreeMap<String, DrillStatus> = fs::read(path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    names.iter().map(|n| saved.get(n).cloned()).collect()
}

/// Saves the last drill of each replica (best effort: a failure is logged). The file lives in
/// the drill directory, which only this process's user can write (see [`prepare_dir`]); it is
/// replaced by a rename, never written through a link.
pub fn save_history(path: &Path, names: &[String], last: &[Option<DrillStatus>]) {
    let map: std::collections::BTreeMap<&String, &DrillStatus> = names
        .iter()
        .zip(last)
        .filter_map(|(n, d)| d.as_ref().map(|d| (n, d)))
        .collect();
    let res = (|| -> io::Result<()> {
        if let Some(dir) = path.parent() {
            private_dir(dir).map_err(io::Error::other)?;
        }
        crate::durable::replace(path, &serde_json::to_vec_pretty(&map)?, 0o600)
    })();
    if let Err(e) = res {
        warn!(file = %path.display(), error = %e, "cannot save the drill results");
    }
}

/// A database name as a file name (names come from config file names, but never trust a
/// path separator).
fn sanitize(name: &str) -> String {
    name.chars()
        .map(|c| if c == '/' || c == '\0' { '_' } else { c })
        .collect()
}

/// Creates (or checks) the drill's scratch directory: a real directory, ours, mode 0700, with
/// `need` bytes free. A stale database from an interrupted drill is removed first.
fn prepare_dir(dir: &Path, need: u64, stale: &Path) -> Result<PathBuf, String> {
    let show = dir.display();
    private_dir(dir)?;
    // A database an interrupted drill left (only that name, only a regular file).
    if fs::symlink_metadata(stale).is_ok_and(|m| m.is_file()) {
        let _ = fs::remove_file(stale);
    }
    let st = nix::sys::statvfs::statvfs(dir).map_err(|e| format!("{show}: statvfs: {e}"))?;
    let free = st.blocks_available() as u64 * st.fragment_size() as u64;
    if free < need {
        return Err(format!(
            "{show}: not enough free space for a drill: {} needed, {} free",
            human_bytes(need),
            human_bytes(free)
        ));
    }
    Ok(dir.to_path_buf())
}

/// Creates (or checks) a directory only this process's user can use: a real directory (not a
/// link), owned by us, mode 0700.
fn private_dir(dir: &Path) -> Result<(), String> {
    let show = dir.display();
    if let Some(parent) = dir.parent() {
        fs::create_dir_all(parent)
            .map_err(|e| format!("{show}: cannot create the drill directory: {e}"))?;
    }
    match fs::DirBuilder::new().mode(0o700).create(dir) {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => {
            return Err(format!("{show}: cannot create the drill directory: {e}"));
        }
        _ => {}
    }
    let m = fs::symlink_metadata(dir).map_err(|e| format!("{show}: {e}"))?;
    if !m.is_dir() {
        return Err(format!(
            "{show}: the drill directory is not a directory (a symlink?)"
        ));
    }
    if m.uid() != nix::unistd::geteuid().as_raw() {
        return Err(format!(
            "{show}: the drill directory belongs to uid {}, not to this process",
            m.uid()
        ));
    }
    if m.mode() & 0o077 != 0 {
        return Err(format!(
            "{show}: the drill directory is open to other users (mode {:o}); drills need a private directory (0700)",
            m.mode() & 0o777
        ));
    }
    Ok(())
}

fn human_bytes(n: u64) -> String {
    format!("{:.1} MiB", n as f64 / (1 << 20) as f64)
}

/// Lowers the calling thread's CPU (nice 10) and I/O (idle class: served when the disk has
/// nothing else queued, with the scheduler's aging against starvation) priority. Threads
/// it creates inherit both. Written by hand: two syscalls, no crate covers ioprio.
fn lower_priority() {
    // SAFETY: plain syscalls on the calling thread (who = 0), no memory passed.
    unsafe {
        nix::libc::setpriority(nix::libc::PRIO_PROCESS, 0, 10);
        const IOPRIO_WHO_PROCESS: nix::libc::c_long = 1;
        const IOPRIO_CLASS_IDLE: nix::libc::c_long = 3;
        nix::libc::syscall(
            nix::libc::SYS_ioprio_set,
            IOPRIO_WHO_PROCESS,
            0 as nix::libc::c_long,
            IOPRIO_CLASS_IDLE << 13,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_sum_of_a_partial_page_never_matches() {
        let whole = file_sum((4096 * 3, 0x1234), 4096);
        assert_eq!(whole.pages, 3);
        let torn = file_sum((4096 * 3 + 10, 0x1234), 4096);
        assert_eq!(torn.pages, 3);
        assert_ne!(torn.hash, whole.hash);
    }
}
