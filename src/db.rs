//! The replication engine's database side (spec §2.2–2.5): it holds SQLite's WAL still with a
//! long read transaction, copies committed frames into the shadow WAL under `.<db>-litestream/`,
//! detects lost continuity (a new generation), follows WAL restarts (a new index) and runs the
//! checkpoint policy.
//!
//! Everything here is blocking file and SQLite I/O; the async worker calls it through
//! `spawn_blocking` with the [`Db`] behind a mutex, so one database never blocks another's thread.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use rusqlite::{Connection, OpenFlags};
use thiserror::Error;
use tracing::{debug, info, warn};

use crate::layout::{self, MAX_INDEX, Pos};
use crate::shadow::{Shadow, read_header_bytes};
use crate::wal::{self, WAL_HEADER_SIZE, WalHeader};

#[derive(Debug, Error)]
pub enum DbError {
    #[error("{path}: {source}")]
    Sqlite {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("{path}: {op}: {source}")]
    Io {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: io::Error,
    },
    #[error(
        "{path}: another litestreamd replicates this database (it holds the replication lock on the file); this one waits until that one stops"
    )]
    Locked { path: PathBuf },
    #[error("{path}: journal_mode is {mode:?}, expected wal")]
    NotWal { path: PathBuf, mode: String },
    #[error("{path}: invalid WAL header: {source}")]
    BadWalHeader {
        path: PathBuf,
        #[source]
        source: wal::WalError,
    },
}

/// When and how to checkpoint; defaults are Litestream v0.3.13's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DbOptions {
    pub meta_path: Option<PathBuf>,
    pub monitor_interval: Duration,
    /// Time-based PASSIVE checkpoint; zero disables it.
    pub checkpoint_interval: Duration,
    pub min_checkpoint_page_count: u32,
    /// RESTART threshold; zero disables it.
    pub max_checkpoint_page_count: u32,
    /// TRUNCATE threshold; zero disables it. Configurable here (Litestream 0.3 hard-codes it).
    pub truncate_page_count: u32,
    pub busy_timeout: Duration,
    /// After this long without a change the database is parked (see [`Db::park`]); zero
    /// keeps it open.
    pub park_after: Duration,
}

impl Default for DbOptions {
    fn default() -> Self {
        DbOptions {
            meta_path: None,
            monitor_interval: Duration::from_secs(1),
            checkpoint_interval: Duration::from_secs(60),
            min_checkpoint_page_count: 1000,
            max_checkpoint_page_count: 10_000,
            truncate_page_count: 500_000,
            busy_timeout: Duration::from_secs(1),
            park_after: Duration::from_secs(60),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
pub enum CheckpointMode {
    Passive,
    Restart,
    Truncate,
}

impl CheckpointMode {
    pub fn as_str(self) -> &'static str {
        match self {
            CheckpointMode::Passive => "PASSIVE",
            CheckpointMode::Restart => "RESTART",
            CheckpointMode::Truncate => "TRUNCATE",
        }
    }
}

/// What one sync pass did.
#[derive(Debug, Clone, Default)]
pub struct SyncReport {
    /// The shadow position after the pass (None while the database file does not exist).
    pub pos: Option<Pos>,
    /// Why a new generation was started, if one was.
    pub new_generation: Option<String>,
    pub checkpoint: Option<CheckpointMode>,
    /// Frame bytes appended to the shadow WAL in this pass.
    pub wal_bytes: u64,
    pub db_size: u64,
    pub wal_size: u64,
    /// Bytes of shadow WAL on disk for the current generation.
    pub shadow_bytes: u64,
}

/// An open database with its two connections: `reader` holds the long-running read transaction,
/// `writer` does the `_litestream_seq` writes, the write lock and checkpoints.
struct Open {
    reader: Connection,
    writer: Connection,
    /// The one plain descriptor of the database file we keep, shared with snapshots. POSIX
    /// drops *all* of a process's locks on a file when *any* descriptor of it is closed, so
    /// opening and closing another descriptor would release SQLite's shared lock and let an
    /// application connection believe it is the last one and delete the WAL. Snapshots
    /// therefore read through this descriptor with `pread` and never open the file again.
    fd: Arc<File>,
    /// Device and inode of `fd`: the file at the path must still be this one (see
    /// [`Db::replaced`]).
    ident: (u64, u64),
    page_size: u32,
    in_read_tx: bool,
}

/// A parked database (see [`Db::park`]): its connections are closed, only the locked
/// descriptor stays.
struct Parked {
    fd: Arc<File>,
    ident: (u64, u64),
    page_size: u32,
    /// The database file's stamp, and its length and content hash, once our checkpoint had backfilled the
    /// whole WAL.
    db_stamp: Option<(u64, u64, i64, i64)>,
    db_hash: (u64, u64),
}

pub struct Db {
    path: PathBuf,
    wal_path: PathBuf,
    shadow: Shadow,
    opts: DbOptions,
    open: Option<Open>,
    parked: Option<Parked>,
    /// Since when full passes have found nothing to copy (see `idle`).
    idle_since: Option<std::time::Instant>,
    /// Snapshots in progress; while non-zero our checkpoints are skipped so the read
    /// transaction that makes the copy consistent is never released.
    snapshotting: Arc<AtomicUsize>,
    /// The database's configured name, the `db` label of its metrics.
    label: String,
    /// What the files looked like after the last full pass, to skip passes where nothing
    /// changed (with a thousand idle databases the full pass dominated idle CPU).
    idle: Option<(FilesSig, SyncReport, Option<Pos>)>,
    /// A replica asked for a new generation (its copy of the current one cannot be restored).
    new_generation_requested: Option<&'static str>,
    /// Whether the file had Litestream's `_litestream_seq` table before we opened it, i.e. it
    /// has been replicated before (by Litestream or litestreamd), or is a restore of such a
    /// database; a brand-new application database has not.
    had_history: bool,
    /// Where a pass reads new WAL frames to check them (see `copy_frames`), kept between
    /// passes so a busy database does not fault in fresh memory every tick; freed when it
    /// parks.
    copy_buf: Vec<u8>,
}

/// The most WAL bytes a pass reads at once to check them (see `copy_frames`).
const SCAN_CHUNK: u64 = 1 << 20;

/// Walks the WAL's frames from the scanner's offset to `wal_len` (or the first that does not
/// continue the chain: frames after it belong to an older life of the WAL, or are being
/// written), reading whole frames in chunks into `buf`.
fn scan_new_frames(
    wal: &File,
    wal_len: u64,
    scanner: &mut crate::wal::Scanner,
    buf: &mut Vec<u8>,
) -> io::Result<()> {
    let chunk = SCAN_CHUNK - SCAN_CHUNK % scanner.frame_size();
    while scanner.offset() < wal_len {
        let at = scanner.offset();
        let want = chunk.min(wal_len - at) as usize;
        if buf.len() < want {
            buf.resize(want, 0);
        }
        let mut got = 0;
        while got < want {
            match wal.read_at(&mut buf[got..want], at + got as u64) {
                Ok(0) => break,
                Ok(k) => got += k,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if scanner.scan_bytes(&buf[..got], |_, _| {}).is_some()
            || scanner.offset() == at
            || got < want
        {
            break;
        }
    }
    Ok(())
}

/// Identity and change stamp of the WAL and the database. Any write to them (a commit, a
/// checkpoint, a WAL restart, a truncation, a replaced file) changes it. The shadow WAL is
/// litestreamd's own and only changes in a full pass.
#[derive(Debug, Clone, PartialEq, Eq)]
struct FilesSig {
    wal: Option<(u64, u64, i64, i64)>,
    db: Option<(u64, u64, i64, i64)>,
}

fn stamp(p: &Path) -> Option<(u64, u64, i64, i64)> {
    use std::os::unix::fs::MetadataExt;
    let m = fs::metadata(p).ok()?;
    Some((m.ino(), m.len(), m.mtime(), m.mtime_nsec()))
}

/// How long parking waits after its checkpoint (longer than the kernel's timestamp tick, at
/// most 10 ms at HZ=100), see [`Db::park`].
const PARK_SETTLE: Duration = Duration::from_millis(25);

/// How long a database must be idle to be parked when descriptors are scarce.
const PARK_HURRIED: Duration = Duration::from_millis(500);

/// Databases larger than this are not parked (parking hashes the file).
const PARK_MAX_DB_BYTES: u64 = 128 << 20;

/// The length and xxh3-64 of a file's bytes, read through `f` from its start (never through
/// another descriptor: see `Open::fd`). Parking compares a database with itself by it, and
/// restore hashes its output by it for the drill (`drill::file_sum`).
pub fn hash_file(f: &File) -> io::Result<(u64, u64)> {
    use std::hash::Hasher;
    let mut h = twox_hash::XxHash3_64::with_seed(0);
    // Not larger: buffers above glibc's mmap threshold raise it and then stay resident.
    let mut buf = vec![0u8; 256 << 10];
    let mut at = 0u64;
    loop {
        let n = f.read_at(&mut buf, at)?;
        if n == 0 {
            return Ok((at, h.finish()));
        }
        h.write(&buf[..n]);
        at += n as u64;
    }
}

/// Result of the continuity check.
struct Verify {
    /// Why continuity is lost (a new generation is needed).
    reason: Option<&'static str>,
    /// The real WAL header differs from the shadow's: SQLite restarted the WAL.
    restart: bool,
}

impl Db {
    pub fn new(path: impl Into<PathBuf>, opts: DbOptions) -> Self {
        let path: PathBuf = path.into();
        let shadow = Shadow::for_db(&path, opts.meta_path.as_deref());
        let mut wal_path = path.clone().into_os_string();
        wal_path.push("-wal");
        Db {
            wal_path: wal_path.into(),
            path,
            shadow,
            opts,
            open: None,
            parked: None,
            idle_since: None,
            snapshotting: Arc::new(AtomicUsize::new(0)),
            label: String::new(),
            idle: None,
            new_generation_requested: None,
            had_history: false,
            copy_buf: Vec::new(),
        }
    }

    /// Sets the name used as the `db` label of metrics (defaults to the path).
    pub fn with_label(mut self, label: impl Into<String>) -> Self {
        self.label = label.into();
        self
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
    pub fn shadow(&self) -> &Shadow {
        &self.shadow
    }
    pub fn options(&self) -> &DbOptions {
        &self.opts
    }
    pub fn page_size(&self) -> Option<u32> {
        self.open
            .as_ref()
            .map(|o| o.page_size)
            .or(self.parked.as_ref().map(|p| p.page_size))
    }
    pub fn is_open(&self) -> bool {
        self.open.is_some() || self.parked.is_some()
    }
    pub fn wal_path(&self) -> &Path {
        &self.wal_path
    }
    pub fn is_parked(&self) -> bool {
        self.parked.is_some()
    }

    fn io(&self, path: &Path, op: &'static str) -> impl FnOnce(io::Error) -> DbError + use<> {
        let path = path.to_path_buf();
        move |source| DbError::Io { path, op, source }
    }
    fn sql(&self) -> impl FnOnce(rusqlite::Error) -> DbError + use<> {
        let path = self.path.clone();
        move |source| DbError::Sqlite { path, source }
    }

    /// An I/O error of the shadow (its message names the file).
    fn shadow_err(&self, op: &'static str) -> impl FnOnce(io::Error) -> DbError + use<> {
        let path = self.shadow.root().to_path_buf();
        move |source| DbError::Io { path, op, source }
    }

    /// The current generation id.
    pub fn generation(&self) -> Result<Option<String>, DbError> {
        self.shadow.generation().map_err(self.shadow_err("read"))
    }

    /// The shadow position: generation, highest index, and that index's size.
    pub fn pos(&self) -> Result<Option<Pos>, DbError> {
        self.shadow.pos().map_err(self.shadow_err("stat"))
    }

    fn open_conn(&self) -> Result<Connection, DbError> {
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let conn = Connection::open_with_flags(&self.path, flags).map_err(self.sql())?;
        conn.busy_timeout(self.opts.busy_timeout)
            .map_err(self.sql())?;
        set_persist_wal(&conn).map_err(self.sql())?;
        // Closing our connections never checkpoints, truncates or deletes the -wal/-shm: they
        // are found by name, and after the database file was replaced (mv, delete and
        // recreate) those names belong to another file.
        conn.set_db_config(
            rusqlite::config::DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE,
            true,
        )
        .map_err(self.sql())?;
        Ok(conn)
    }

    /// Starts a new generation at the next pass: a replica found that objects the current one
    /// needs are gone from it and cannot be uploaded again (see `Replica::check_restorable`).
    pub fn request_new_generation(&mut self, reason: &'static str) {
        self.new_generation_requested = Some(reason);
        self.idle = None;
        self.idle_since = None;
    }

    /// Whether this database replicated before (see `had_history`); meaningful once open.
    pub fn had_history(&self) -> bool {
        self.had_history
    }

    /// The lineage this host replicates the database in, from the meta directory.
    pub fn lineage(&self) -> Result<Option<String>, DbError> {
        self.shadow.lineage().map_err(self.shadow_err("read"))
    }

    /// Records the lineage (after checking it against the replicas, a restore, or `adopt`).
    pub fn set_lineage(&self, lineage: &str) -> Result<(), DbError> {
        self.shadow
            .set_lineage(lineage)
            .map_err(self.shadow_err("write"))
    }

    /// Why the file at the database's path is no longer the one we have open, if it is not:
    /// it was deleted, or replaced (`mv other.db app.db`, delete and recreate).
    fn replaced(&self) -> Option<&'static str> {
        use std::os::unix::fs::MetadataExt;
        let ident = match (&self.open, &self.parked) {
            (Some(o), _) => o.ident,
            (None, Some(p)) => p.ident,
            (None, None) => return None,
        };
        match fs::metadata(&self.path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Some("database file deleted"),
            Ok(m) if (m.dev(), m.ino()) != ident => Some("database file replaced"),
            _ => None,
        }
    }

    /// The file at the path is not ours any more: let go of the old one at once and start over
    /// on whatever is there now. Our connections close without touching the -wal/-shm (see
    /// `open_conn`); the old file's -wal/-shm, which only our connections kept alive (an
    /// application's last connection would have removed them on close), are removed if no
    /// connection has the new file open, so no one opens the new file with the old file's WAL.
    fn start_over(&mut self, why: &'static str) {
        warn!(db = %self.path.display(), reason = why, "the database file changed under the replicator; closing the old one and starting over on the new file");
        // The header of the WAL life we were copying: a -wal that still carries it is the old
        // file's, never the new one's.
        let old_header = self
            .pos()
            .ok()
            .flatten()
            .and_then(|p| self.shadow.header(&p.generation, p.index).ok().flatten());
        self.close();
        self.idle = None;
        if why == "database file replaced"
            && let Some(h) = old_header
        {
            remove_stale_sidecars(&self.path, &self.wal_path, &h);
        }
    }

    /// Opens the database and takes the read lock (spec §2.2). Returns false while the file
    /// does not exist yet.
    fn init(&mut self) -> Result<bool, DbError> {
        if self.open.is_some() {
            return Ok(true);
        }
        if self.parked.is_some() {
            if let Some(why) = self.replaced() {
                self.start_over(why);
            } else {
                self.unpark()?;
                return Ok(true);
            }
        }
        if !self.path.exists() {
            return Ok(false);
        }
        // Read-write only because a write lock needs it; nothing is written through it.
        let fd = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&self.path)
            .map_err(self.io(&self.path, "open"))?;
        if !replication_lock(&fd).map_err(self.io(&self.path, "lock"))? {
            return Err(DbError::Locked {
                path: self.path.clone(),
            });
        }
        let ident = {
            use std::os::unix::fs::MetadataExt;
            let m = fd.metadata().map_err(self.io(&self.path, "stat"))?;
            (m.dev(), m.ino())
        };
        let writer = self.open_conn()?;
        self.had_history = writer
            .query_row(
                "SELECT count(*) FROM sqlite_master WHERE name = '_litestream_seq'",
                [],
                |r| r.get::<_, i64>(0),
            )
            .map_err(self.sql())?
            > 0;
        let mode: String = writer
            .query_row("PRAGMA journal_mode = wal", [], |r| r.get(0))
            .map_err(self.sql())?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(DbError::NotWal {
                path: self.path.clone(),
                mode,
            });
        }
        writer
            .execute_batch(
                "PRAGMA wal_autocheckpoint = 0;
                 CREATE TABLE IF NOT EXISTS _litestream_seq (id INTEGER PRIMARY KEY, seq INTEGER);
                 CREATE TABLE IF NOT EXISTS _litestream_lock (id INTEGER);",
            )
            .map_err(self.sql())?;
        let page_size: u32 = writer
            .query_row("PRAGMA page_size", [], |r| r.get(0))
            .map_err(self.sql())?;
        let reader = self.open_conn()?;
        reader
            .execute_batch("PRAGMA wal_autocheckpoint = 0")
            .map_err(self.sql())?;
        self.open = Some(Open {
            reader,
            writer,
            fd: Arc::new(fd),
            ident,
            page_size,
            in_read_tx: false,
        });
        self.acquire_read_lock()?;

        self.shadow.prepare().map_err(self.shadow_err("prepare"))?;

        // Continuity at startup: the newest shadow must describe the same WAL life as the real
        // WAL, otherwise frames may have been lost while we were not running.
        if let Some(generation) = self.generation()? {
            let index = self
                .shadow
                .max_index(&generation)
                .map_err(self.shadow_err("read_dir"))?;
            let keep = match index {
                Some(index) => {
                    // After a crash the newest index may end in frames of a transaction whose
                    // commit frame was never copied, or in a partial frame.
                    if let Some((from, to)) = self
                        .shadow
                        .repair_tail(&generation, index, page_size)
                        .map_err(self.shadow_err("repair"))?
                    {
                        warn!(db = %self.path.display(), index, from, to, "cut the shadow WAL back to its last commit");
                    }
                    let a = self
                        .shadow
                        .header(&generation, index)
                        .map_err(self.shadow_err("read"))?;
                    let b = read_header_bytes(&self.wal_path)
                        .map_err(self.io(&self.wal_path, "read header"))?;
                    matches!((a, b), (Some(a), Some(b)) if a == b)
                }
                None => false,
            };
            if !keep {
                info!(db = %self.path.display(), "WAL header differs from the shadow WAL at start; a new generation will start");
                self.shadow
                    .clear_generation()
                    .map_err(self.shadow_err("remove"))?;
            }
        }
        self.remove_other_generations()?;
        Ok(true)
    }

    /// Closes the connections, releasing the read lock.
    pub fn close(&mut self) {
        self.parked = None;
        self.idle_since = None;
        if let Some(mut open) = self.open.take()
            && open.in_read_tx
        {
            let _ = open.reader.execute_batch("ROLLBACK");
            open.in_read_tx = false;
        }
    }

    /// Whether the database has been idle long enough to be parked: `park_after`, or a few
    /// seconds when `hurry` (file descriptors are scarce).
    pub fn park_due(&self, hurry: bool) -> bool {
        let after = if hurry {
            self.opts.park_after.min(PARK_HURRIED)
        } else {
            self.opts.park_after
        };
        !after.is_zero()
            && self.open.is_some()
            && self
                .idle
                .as_ref()
                .is_some_and(|(_, r, _)| r.db_size <= PARK_MAX_DB_BYTES)
            && self.snapshotting.load(Ordering::SeqCst) == 0
            && self.idle_since.is_some_and(|t| t.elapsed() >= after)
    }

    /// Parks an idle database: closes its SQLite connections, which hold five descriptors and
    /// the read transaction, and keeps only the locked descriptor of the database file, so
    /// thousands of idle databases cost one descriptor each. The next pass that sees a change
    /// (or a snapshot, a checkpoint, a drill) reopens it (`unpark`).
    ///
    /// Without our read transaction an application checkpoint can restart the WAL. Parking
    /// makes that harmless: first a PASSIVE checkpoint backfills the whole WAL (every frame of
    /// which is in the shadow, since the database is idle), then the database file's stamp and
    /// content hash are taken. A later restart needs every frame backfilled, so if the
    /// application wrote frames and the WAL restarted before we reopen, its checkpoint changed
    /// the file: only then is continuity lost (a new generation, nothing missing). A restart
    /// that left the content as it was (an application's TRUNCATE or RESTART checkpoint of the
    /// WAL we had, SQLite deleting the -wal as its last connection closes) is followed as a new
    /// index. The content is compared only when the stamp changed: SQLite rewrites the same
    /// pages when it rebuilds a deleted -shm. The stamp's times are as coarse as the kernel's
    /// clock tick, so parking waits `PARK_SETTLE` and gives up if the WAL changed meanwhile:
    /// an application checkpoint that writes new frames then lands in a later tick. Databases
    /// over `PARK_MAX_DB_BYTES` are not parked (the hash reads the whole file).
    ///
    /// Returns whether the database was parked.
    pub fn park(&mut self, hurry: bool) -> Result<bool, DbError> {
        if !self.park_due(hurry) || self.replaced().is_some() {
            return Ok(false);
        }
        let Some((sig, _, _)) = self.idle.as_ref() else {
            return Ok(false);
        };
        if *sig != self.files_sig() {
            return Ok(false);
        }
        let wal_before = stamp(&self.wal_path);
        self.release_read_lock()?;
        let err = self.sql();
        let res: rusqlite::Result<(i64, i64, i64)> =
            self.conns()
                .writer
                .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                });
        let checkpointed = match res {
            Ok((busy, log, done)) => busy == 0 && log == done,
            Err(e) => {
                self.acquire_read_lock()?;
                return Err(err(e));
            }
        };
        let db_stamp = stamp(&self.path);
        let started = std::time::Instant::now();
        let db_hash = match hash_file(&self.conns().fd) {
            Ok(h) => h,
            Err(e) => {
                self.acquire_read_lock()?;
                return Err(self.io(&self.path, "read")(e));
            }
        };
        std::thread::sleep(PARK_SETTLE.saturating_sub(started.elapsed()));
        if !checkpointed || stamp(&self.wal_path) != wal_before || stamp(&self.path) != db_stamp {
            // A reader holds older frames, or the application wrote: not idle after all.
            self.acquire_read_lock()?;
            self.idle_since = None;
            return Ok(false);
        }
        let open = self.open.take().expect("open");
        self.copy_buf = Vec::new();
        self.parked = Some(Parked {
            fd: open.fd,
            ident: open.ident,
            page_size: open.page_size,
            db_stamp,
            db_hash,
        });
        drop((open.reader, open.writer));
        // Our checkpoint wrote the database file: the idle stamp is the one after it.
        let now = self.files_sig();
        if let Some((sig, _, _)) = self.idle.as_mut() {
            *sig = now;
        }
        debug!(db = %self.path.display(), "parked");
        Ok(true)
    }

    /// Reopens a parked database and settles continuity (see [`Db::park`]).
    fn unpark(&mut self) -> Result<(), DbError> {
        // Still parked if this fails (out of descriptors, say): the next pass tries again.
        let writer = self.open_conn()?;
        let reader = self.open_conn()?;
        for c in [&writer, &reader] {
            c.execute_batch("PRAGMA wal_autocheckpoint = 0")
                .map_err(self.sql())?;
        }
        let p = self.parked.take().expect("parked");
        self.open = Some(Open {
            reader,
            writer,
            fd: p.fd,
            ident: p.ident,
            page_size: p.page_size,
            in_read_tx: false,
        });
        self.idle = None;
        self.idle_since = None;
        self.acquire_read_lock()?;
        let Some(generation) = self.generation()? else {
            return Ok(());
        };
        let Some(index) = self
            .shadow
            .max_index(&generation)
            .map_err(self.shadow_err("read_dir"))?
        else {
            return Ok(());
        };
        let header =
            read_header_bytes(&self.wal_path).map_err(self.io(&self.wal_path, "read header"))?;
        let ours = self
            .shadow
            .header(&generation, index)
            .map_err(self.shadow_err("read"))?;
        if header.is_some() && header == ours {
            debug!(db = %self.path.display(), "unparked");
            return Ok(());
        }
        // The WAL restarted (or is gone). Its new life is read under the write lock, so no
        // application transaction is half-written meanwhile (a header whose frames are not
        // there yet), as when a checkpoint of ours restarts it.
        if file_size(&self.wal_path).unwrap_or(0) < WAL_HEADER_SIZE as u64 {
            self.bump_seq()?;
        }
        let err = self.sql();
        self.conns()
            .writer
            .execute_batch("BEGIN; INSERT INTO _litestream_lock (id) VALUES (1);")
            .map_err(err)?;
        let result = (|| -> Result<(), DbError> {
            let header = read_header_bytes(&self.wal_path)
                .map_err(self.io(&self.wal_path, "read header"))?;
            if header == ours {
                return Ok(());
            }
            let same = p.db_stamp.is_some() && stamp(&self.path) == p.db_stamp
                || hash_file(&self.conns().fd).map_err(self.io(&self.path, "read"))? == p.db_hash;
            if same {
                info!(db = %self.path.display(), index = index + 1, "the WAL restarted while the database was parked, with nothing new checkpointed; starting the next shadow index");
                self.init_shadow(&generation, index + 1)?;
            } else {
                // Frames written while parked may have been checkpointed and overwritten.
                info!(db = %self.path.display(), "the WAL restarted while the database was parked, after a checkpoint of new frames; a new generation starts");
                self.shadow
                    .clear_generation()
                    .map_err(self.shadow_err("remove"))?;
            }
            Ok(())
        })();
        let rollback = self.conns().writer.execute_batch("ROLLBACK");
        result?;
        rollback.map_err(self.sql())?;
        Ok(())
    }

    fn conns(&mut self) -> &mut Open {
        self.open.as_mut().expect("database is open")
    }

    fn acquire_read_lock(&mut self) -> Result<(), DbError> {
        let err = self.sql();
        let o = self.conns();
        if o.in_read_tx {
            return Ok(());
        }
        o.reader.execute_batch("BEGIN").map_err(err)?;
        let r: rusqlite::Result<i64> =
            o.reader
                .query_row("SELECT COUNT(1) FROM _litestream_seq", [], |r| r.get(0));
        if let Err(e) = r {
            let _ = o.reader.execute_batch("ROLLBACK");
            return Err(DbError::Sqlite {
                path: self.path.clone(),
                source: e,
            });
        }
        o.in_read_tx = true;
        Ok(())
    }

    fn release_read_lock(&mut self) -> Result<(), DbError> {
        let err = self.sql();
        let o = self.conns();
        if o.in_read_tx {
            o.in_read_tx = false;
            o.reader.execute_batch("ROLLBACK").map_err(err)?;
        }
        Ok(())
    }

    /// Forces a WAL write (spec §2.2 step 6): gives a missing WAL its header and makes SQLite
    /// restart a checkpointed WAL right away.
    fn bump_seq(&mut self) -> Result<(), DbError> {
        let err = self.sql();
        self.conns()
            .writer
            .execute(
                "INSERT INTO _litestream_seq (id, seq) VALUES (1, 1)
                 ON CONFLICT (id) DO UPDATE SET seq = seq + 1",
                [],
            )
            .map_err(err)?;
        Ok(())
    }

    /// One pass of the sync loop (spec §2.3). `min_replica` is the lowest position any replica
    /// has reached in the current generation, or None if some replica has none: shadow files
    /// are only removed once every replica has them.
    pub fn sync(&mut self, min_replica: Option<&Pos>) -> Result<SyncReport, DbError> {
        let mut report = SyncReport::default();
        if let Some(r) = self.parked_pass(min_replica)? {
            return Ok(r);
        }
        if !self.init()? {
            return Ok(report);
        }
        if let Some(why) = self.replaced() {
            self.start_over(why);
            if !self.init()? {
                return Ok(report);
            }
        }
        if let Some(r) = self.unchanged(min_replica) {
            return Ok(r);
        }
        let sig = self.files_sig();
        self.idle = None;
        let result = self.full_sync(min_replica, &mut report);
        // The stamp taken *before* the pass: a commit that lands during the pass changes the
        // files after it, so the next pass sees a difference and copies it.
        if result.is_ok()
            && report.new_generation.is_none()
            && report.checkpoint.is_none()
            && report.wal_bytes == 0
        {
            self.idle = Some((sig, report.clone(), min_replica.cloned()));
            self.idle_since.get_or_insert_with(std::time::Instant::now);
        } else {
            self.idle_since = None;
        }
        result.map(|()| report)
    }

    /// The last report, if nothing on disk changed since the last full pass, no checkpoint is
    /// due and the replicas have not moved (which could free shadow files). Two `stat` calls:
    /// cheap enough for the worker to call inline, without a blocking-thread hand-off.
    pub fn unchanged(&self, min_replica: Option<&Pos>) -> Option<SyncReport> {
        let (last_sig, last, last_min) = self.idle.as_ref()?;
        let pos = last.pos.as_ref()?;
        let page_size = self.page_size()?;
        // A parked database has no checkpoint due: parking backfilled the whole WAL.
        if *last_sig != self.files_sig()
            || last_min.as_ref() != min_replica
            || (self.parked.is_none()
                && self
                    .checkpoint_mode(wal::align(last.wal_size, page_size), pos.offset, page_size)
                    .is_some())
        {
            return None;
        }
        let mut r = last.clone();
        r.wal_bytes = 0;
        r.new_generation = None;
        r.checkpoint = None;
        Some(r)
    }

    /// A pass over a parked database whose files have not changed: only the replicas moved,
    /// which frees shadow files without reopening it.
    fn parked_pass(&mut self, min_replica: Option<&Pos>) -> Result<Option<SyncReport>, DbError> {
        if self.parked.is_none() {
            return Ok(None);
        }
        let sig = self.files_sig();
        let Some((last_sig, last, last_min)) = self.idle.as_mut() else {
            return Ok(None);
        };
        let Some(pos) = last.pos.clone() else {
            return Ok(None);
        };
        if *last_sig != sig {
            return Ok(None);
        }
        *last_min = min_replica.cloned();
        let mut r = last.clone();
        self.clean_shadow(&pos, min_replica)?;
        r.shadow_bytes = self.shadow.bytes(&pos.generation);
        r.wal_bytes = 0;
        r.new_generation = None;
        r.checkpoint = None;
        if let Some((_, last, _)) = self.idle.as_mut() {
            last.shadow_bytes = r.shadow_bytes;
        }
        Ok(Some(r))
    }

    fn files_sig(&self) -> FilesSig {
        FilesSig {
            wal: stamp(&self.wal_path),
            db: stamp(&self.path),
        }
    }

    fn full_sync(
        &mut self,
        min_replica: Option<&Pos>,
        report: &mut SyncReport,
    ) -> Result<(), DbError> {
        if file_size(&self.wal_path).unwrap_or(0) < WAL_HEADER_SIZE as u64 {
            self.bump_seq()?;
        }
        let v = self.verify()?;
        if let Some(reason) = v.reason.or(self.new_generation_requested.take()) {
            self.create_generation(reason)?;
            report.new_generation = Some(reason.to_string());
        } else {
            report.wal_bytes += self.sync_wal(v.restart)?;
        }

        let page_size = self.conns().page_size;
        let orig_wal_size = wal::align(file_size(&self.wal_path).unwrap_or(0), page_size);
        let pos = self.pos()?.expect("a generation exists after sync");
        let new_wal_size = pos.offset;
        let mode = self.checkpoint_mode(orig_wal_size, new_wal_size, page_size);
        if let Some(mode) = mode {
            match self.checkpoint(mode) {
                Ok(outcome) => {
                    report.wal_bytes += outcome.copied;
                    if let Some(reason) = outcome.new_generation {
                        report.new_generation = Some(reason.to_string());
                    }
                    report.checkpoint = outcome.ran.then_some(mode);
                }
                // A busy checkpoint is not a sync failure: the next tick tries again.
                Err(e) => {
                    // Out of descriptors, `fdlimit` says so once for every database.
                    if crate::fdlimit::exhausted(&e.to_string()) {
                        debug!(db = %self.path.display(), mode = mode.as_str(), error = %e, "checkpoint failed")
                    } else {
                        warn!(db = %self.path.display(), mode = mode.as_str(), error = %e, "checkpoint failed")
                    }
                }
            }
        }
        let pos = self.pos()?.expect("a generation exists after sync");
        self.clean_shadow(&pos, min_replica)?;
        report.shadow_bytes = self.shadow.bytes(&pos.generation);
        report.pos = Some(pos);
        report.db_size = file_size(&self.path).unwrap_or(0);
        report.wal_size = file_size(&self.wal_path).unwrap_or(0);
        Ok(())
    }

    fn checkpoint_mode(
        &self,
        orig_wal: u64,
        new_wal: u64,
        page_size: u32,
    ) -> Option<CheckpointMode> {
        let o = &self.opts;
        let size = |n: u32| wal::size_of_frames(n as u64, page_size);
        if o.truncate_page_count > 0 && orig_wal >= size(o.truncate_page_count) {
            return Some(CheckpointMode::Truncate);
        }
        if o.max_checkpoint_page_count > 0 && new_wal >= size(o.max_checkpoint_page_count) {
            return Some(CheckpointMode::Restart);
        }
        if new_wal >= size(o.min_checkpoint_page_count.max(1)) {
            return Some(CheckpointMode::Passive);
        }
        if !o.checkpoint_interval.is_zero() && new_wal > size(1) {
            let mtime = fs::metadata(&self.path).and_then(|m| m.modified()).ok()?;
            let age = SystemTime::now().duration_since(mtime).unwrap_or_default();
            if age > o.checkpoint_interval {
                return Some(CheckpointMode::Passive);
            }
        }
        None
    }

    /// The continuity check (spec §2.3 step 3).
    fn verify(&mut self) -> Result<Verify, DbError> {
        let lost = |reason| {
            Ok(Verify {
                reason: Some(reason),
                restart: false,
            })
        };
        let Some(generation) = self.generation()? else {
            return lost("no generation exists");
        };
        let index = self
            .shadow
            .max_index(&generation)
            .map_err(self.shadow_err("read_dir"))?;
        let Some(index) = index else {
            return lost("no shadow wal");
        };
        if index >= MAX_INDEX {
            return lost("max index exceeded");
        }
        let page_size = self.conns().page_size;
        let shadow_size = wal::align(
            self.shadow
                .size(&generation, index)
                .map_err(self.shadow_err("stat"))?,
            page_size,
        );
        if shadow_size < WAL_HEADER_SIZE as u64 {
            return lost("short shadow wal");
        }
        let wal_size = wal::align(file_size(&self.wal_path).unwrap_or(0), page_size);
        if shadow_size > wal_size {
            return lost("wal truncated by another process");
        }
        let restart = read_header_bytes(&self.wal_path)
            .map_err(self.io(&self.wal_path, "read header"))?
            != self
                .shadow
                .header(&generation, index)
                .map_err(self.shadow_err("read"))?;
        if restart && shadow_size == WAL_HEADER_SIZE as u64 {
            return lost("wal header only, mismatched");
        }
        if shadow_size > WAL_HEADER_SIZE as u64 {
            let fs = wal::frame_size(page_size);
            let at = shadow_size - fs;
            let a = self
                .shadow
                .read_at(&generation, index, at, fs as usize)
                .map_err(self.shadow_err("read"))?;
            let mut b = vec![0u8; fs as usize];
            File::open(&self.wal_path)
                .and_then(|f| f.read_exact_at(&mut b, at))
                .map_err(self.io(&self.wal_path, "read"))?;
            if a != b {
                return lost("wal overwritten by another process");
            }
        }
        Ok(Verify {
            reason: None,
            restart,
        })
    }

    /// Starts a new generation: shadow index 0 gets the real WAL's header and its valid
    /// committed frames; then the `generation` file is switched atomically.
    fn create_generation(&mut self, reason: &str) -> Result<(), DbError> {
        let generation = layout::new_generation();
        info!(db = %self.path.display(), generation, reason, "starting new generation");
        self.init_shadow(&generation, 0)?;
        self.shadow
            .set_generation(&generation)
            .map_err(self.shadow_err("write"))?;
        self.remove_other_generations()
    }

    /// Creates shadow index `index` from the real WAL's current header and copies its frames.
    fn init_shadow(&mut self, generation: &str, index: u32) -> Result<u64, DbError> {
        let hdr = read_header_bytes(&self.wal_path)
            .map_err(self.io(&self.wal_path, "read header"))?
            .ok_or_else(|| DbError::Io {
                path: self.wal_path.clone(),
                op: "read header",
                source: io::Error::new(io::ErrorKind::UnexpectedEof, "WAL has no header"),
            })?;
        WalHeader::parse(&hdr).map_err(|source| DbError::BadWalHeader {
            path: self.wal_path.clone(),
            source,
        })?;
        self.shadow
            .create_index(generation, index, &hdr)
            .map_err(self.shadow_err("create"))?;
        let copied = self.copy_frames(generation, index)?;
        debug!(db = %self.path.display(), generation, index, copied, "shadow WAL started");
        Ok(copied)
    }

    /// Appends new committed frames to the current shadow; on a WAL restart, also starts the
    /// next index (spec §2.3 step 5).
    fn sync_wal(&mut self, restart: bool) -> Result<u64, DbError> {
        let pos = self.pos()?.expect("verified generation");
        let mut copied = self.copy_frames(&pos.generation, pos.index)?;
        if restart {
            info!(db = %self.path.display(), index = pos.index + 1, "WAL restarted; starting next shadow index");
            copied += self.init_shadow(&pos.generation, pos.index + 1)?;
        }
        Ok(copied)
    }

    /// Copies the real WAL's frames after the shadow index's end, up to the last commit frame
    /// whose salt and checksum chain is intact (spec §2.4). Two passes: the first walks and
    /// finds the last commit, the second appends exactly those bytes, so a concurrent replica
    /// reader never sees frames that are later taken back. Returns the bytes appended.
    fn copy_frames(&mut self, generation: &str, index: u32) -> Result<u64, DbError> {
        let page_size = self.conns().page_size;
        let mut scanner = self
            .shadow
            .scanner_at_end(generation, index, page_size)
            .map_err(self.shadow_err("read"))?;
        let start = scanner.offset();
        let wal = match File::open(&self.wal_path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(self.io(&self.wal_path, "open")(e)),
        };
        let wal_len = wal
            .metadata()
            .map_err(self.io(&self.wal_path, "stat"))?
            .len();
        // The new frames are read once, a chunk at a time into a buffer kept between passes
        // (sized to what a pass reads, at most `SCAN_CHUNK`), and checked; their whole commits
        // then go from the WAL to the shadow inside the kernel (`Shadow::append`). Reading
        // the WAL a second time through `io::copy`, 8 KiB at a time, was 30% of the daemon's
        // CPU at 600 small commits a second; holding a pass's bytes in memory instead cost as
        // many MiB as the pass.
        let mut buf = std::mem::take(&mut self.copy_buf);
        let scanned = scan_new_frames(&wal, wal_len, &mut scanner, &mut buf);
        self.copy_buf = buf;
        scanned.map_err(self.io(&self.wal_path, "read"))?;
        let n = scanner.last_commit() - start;
        if n == 0 {
            return Ok(0);
        }
        self.shadow
            .append(generation, index, start, &wal, start, n)
            .map_err(self.shadow_err("append"))?;
        Ok(n)
    }

    /// Runs a checkpoint (spec §2.5) and follows the WAL restart it causes.
    pub fn checkpoint(&mut self, mode: CheckpointMode) -> Result<CheckpointOutcome, DbError> {
        let mut outcome = CheckpointOutcome::default();
        if !self.init()? || self.snapshotting.load(Ordering::SeqCst) > 0 {
            return Ok(outcome);
        }
        // Never checkpoint (or write) through connections to a file that is no longer the
        // database: the -wal/-shm they use by name may be the new file's. The next sync
        // starts over on the new file.
        if self.replaced().is_some() {
            return Ok(outcome);
        }
        if self.verify()?.reason.is_some() || self.generation()?.is_none() {
            // Continuity is already lost; the next sync starts a generation first.
            return Ok(outcome);
        }
        let before =
            read_header_bytes(&self.wal_path).map_err(self.io(&self.wal_path, "read header"))?;
        outcome.copied += self.sync_wal(false)?;
        let pos = self.pos()?.expect("generation exists");

        self.release_read_lock()?;
        let err = self.sql();
        let res: rusqlite::Result<(i64, i64, i64)> = self.conns().writer.query_row(
            &format!("PRAGMA wal_checkpoint({})", mode.as_str()),
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        );
        let relock = self.acquire_read_lock();
        let (busy, log_frames, _done) = res.map_err(err)?;
        relock?;
        outcome.ran = true;
        metrics::counter!(crate::telemetry::CHECKPOINTS, "db" => self.label.clone(), "mode" => mode.as_str()).increment(1);
        debug!(db = %self.path.display(), mode = mode.as_str(), busy, log_frames, "checkpoint");

        self.bump_seq()?;
        if read_header_bytes(&self.wal_path).map_err(self.io(&self.wal_path, "read header"))?
            == before
        {
            return Ok(outcome);
        }

        // The WAL restarted. Hold the write lock so no application write can land while the
        // rest of the old life is copied and the next shadow index begins.
        let err = self.sql();
        let w = &self.conns().writer;
        w.execute_batch("BEGIN; INSERT INTO _litestream_lock (id) VALUES (1);")
            .map_err(err)?;
        let result = (|| -> Result<(), DbError> {
            outcome.copied += self.copy_frames(&pos.generation, pos.index)?;
            // Improvement over Litestream: the checkpoint reported how many frames the old
            // life held. If the shadow has fewer, an application write restarted the WAL and
            // overwrote frames between our copy and the checkpoint; those frames are in the
            // database but not in the replica, so only a new generation is safe.
            let page_size = self.conns().page_size;
            let shadow_size = self
                .shadow
                .size(&pos.generation, pos.index)
                .map_err(self.shadow_err("stat"))?;
            let shadow_frames =
                (shadow_size.saturating_sub(WAL_HEADER_SIZE as u64)) / wal::frame_size(page_size);
            if log_frames >= 0 && shadow_frames < log_frames as u64 {
                warn!(db = %self.path.display(), shadow_frames, log_frames, "frames lost around a WAL restart");
                self.create_generation("frames lost during checkpoint")?;
                outcome.new_generation = Some("frames lost during checkpoint");
                return Ok(());
            }
            outcome.copied += self.init_shadow(&pos.generation, pos.index + 1)?;
            Ok(())
        })();
        let rollback = self.conns().writer.execute_batch("ROLLBACK");
        result?;
        rollback.map_err(self.sql())?;
        Ok(outcome)
    }

    /// Removes shadow files every replica has uploaded: index below (min replica index − 1).
    fn clean_shadow(&self, pos: &Pos, min_replica: Option<&Pos>) -> Result<(), DbError> {
        let Some(min) = min_replica else {
            return Ok(());
        };
        if min.generation != pos.generation || min.index < 2 {
            return Ok(());
        }
        self.shadow
            .remove_below(&pos.generation, min.index - 1)
            .map_err(self.shadow_err("remove"))
    }

    fn remove_other_generations(&self) -> Result<(), DbError> {
        let current = self.generation()?;
        self.shadow
            .remove_other_generations(current.as_deref())
            .map_err(self.shadow_err("remove"))
    }

    /// Prepares a snapshot (spec §2.7): a PASSIVE checkpoint to keep the replay short, then a
    /// position and an open descriptor of the database file. Until the guard is dropped our
    /// checkpoints are skipped, so the read transaction stays and the copy is consistent with
    /// "snapshot N + every segment of indexes N.. reproduces the database".
    pub fn begin_snapshot(&mut self) -> Result<Option<SnapshotSource>, DbError> {
        if !self.init()? {
            return Ok(None);
        }
        let report = self.sync(None)?;
        if report.checkpoint.is_none()
            && let Err(e) = self.checkpoint(CheckpointMode::Passive)
        {
            if crate::fdlimit::exhausted(&e.to_string()) {
                debug!(db = %self.path.display(), error = %e, "checkpoint before snapshot failed");
            } else {
                warn!(db = %self.path.display(), error = %e, "checkpoint before snapshot failed");
            }
        }
        // Continuity may have been lost during the checkpoint: settle it before taking the pos.
        let report = self.sync(None)?;
        let Some(pos) = report.pos else {
            return Ok(None);
        };
        self.acquire_read_lock()?;
        let file = self.conns().fd.clone();
        self.snapshotting.fetch_add(1, Ordering::SeqCst);
        Ok(Some(SnapshotSource {
            pos,
            file,
            _guard: SnapshotGuard(self.snapshotting.clone()),
        }))
    }
}

impl Db {
    /// Copies what is committed into the shadow, then holds the database at that position for
    /// a restore drill (see [`DrillSource`]). None while the database does not exist.
    pub fn drill_source(&mut self) -> Result<Option<DrillSource>, DbError> {
        if !self.init()? {
            return Ok(None);
        }
        self.sync(None)?;
        // The read transaction begins before the position is taken (its mark is at or before
        // the position), and with our checkpoints paused the second pass cannot move it.
        self.acquire_read_lock()?;
        let guard = SnapshotGuard(self.snapshotting.clone());
        self.snapshotting.fetch_add(1, Ordering::SeqCst);
        let Some(pos) = self.sync(None)?.pos else {
            return Ok(None);
        };
        if !self.open.as_ref().is_some_and(|o| o.in_read_tx) {
            return Ok(None);
        }
        Ok(Some(DrillSource {
            pos,
            taken_at: SystemTime::now(),
            file: self.conns().fd.clone(),
            shadow: self.shadow.clone(),
            _guard: guard,
        }))
    }
}

impl Drop for Db {
    fn drop(&mut self) {
        self.close();
    }
}

#[derive(Debug, Default)]
pub struct CheckpointOutcome {
    pub ran: bool,
    pub copied: u64,
    pub new_generation: Option<&'static str>,
}

/// A database file opened for a snapshot at `pos`.
pub struct SnapshotSource {
    pub pos: Pos,
    file: Arc<File>,
    _guard: SnapshotGuard,
}

impl SnapshotSource {
    /// Streams the database file from offset 0 to its end into `w` with positional reads.
    pub fn copy_to(&self, w: &mut dyn Write) -> io::Result<u64> {
        let mut buf = vec![0u8; 1 << 20];
        let mut off = 0u64;
        loop {
            let n = self.file.read_at(&mut buf, off)?;
            if n == 0 {
                return Ok(off);
            }
            w.write_all(&buf[..n])?;
            off += n as u64;
        }
    }
}

/// The database at a position, for a restore drill (see `drill`): the database file overlaid
/// with the current shadow index's frames up to the position. While it lives our checkpoints
/// are paused and the long read transaction is held, so SQLite can neither restart the WAL
/// nor copy into the file a frame written after the position (a checkpoint only copies frames
/// below every reader's mark; a reader of the file alone blocks copying altogether): the file
/// holds the database at the start of the index with some of the index's frames, all of which
/// the overlay replaces. No write lock, no forced checkpoint.
pub struct DrillSource {
    pos: Pos,
    taken_at: SystemTime,
    file: Arc<File>,
    shadow: Shadow,
    _guard: SnapshotGuard,
}

impl DrillSource {
    pub fn pos(&self) -> &Pos {
        &self.pos
    }
    /// When the position was the database's.
    pub fn taken_at(&self) -> SystemTime {
        self.taken_at
    }
    /// The database file's length now (an estimate of the restored size, for free space).
    pub fn file_len(&self) -> u64 {
        self.file.metadata().map_or(0, |m| m.len())
    }

    /// Calls `f` with every page of the database at the position, in order; returns the page
    /// size. The size is the last commit's in the index, else the file's (a WAL life starts
    /// after a complete checkpoint, which cuts the file to the database's size).
    pub fn pages(&self, mut f: impl FnMut(&[u8])) -> io::Result<u32> {
        let v = self
            .shadow
            .page_versions(&self.pos.generation, self.pos.index, self.pos.offset)?;
        let ps = v.page_size as u64;
        let n = match v.commit_size {
            Some(n) => n as u64,
            None => self.file.metadata()?.len().div_ceil(ps),
        };
        // The file is read 1 MiB at a time; pages the index wrote come from the shadow. The
        // kernel is asked for the next 8 MiB ahead of each read, so the disk never waits for
        // the hash (plain 1 MiB reads with the default readahead: 1.35 s cold for 1 GiB, where
        // `dd` takes 0.7-0.8 s).
        const AHEAD: u64 = 8 << 20;
        let per = ((1u64 << 20) / ps).max(1);
        let mut chunk = vec![0u8; (per * ps) as usize];
        let mut pgno = 1u64;
        let mut advised = 0u64;
        while pgno <= n {
            let at = (pgno - 1) * ps;
            if advised < at + AHEAD {
                let from = advised.max(at);
                let _ = nix::fcntl::posix_fadvise(
                    &*self.file,
                    from as i64,
                    (at + 2 * AHEAD - from) as i64,
                    nix::fcntl::PosixFadviseAdvice::POSIX_FADV_WILLNEED,
                );
                advised = at + 2 * AHEAD;
            }
            let count = per.min(n - pgno + 1);
            let buf = &mut chunk[..(count * ps) as usize];
            let mut got = 0;
            while got < buf.len() {
                match self
                    .file
                    .read_at(&mut buf[got..], (pgno - 1) * ps + got as u64)?
                {
                    0 => break,
                    k => got += k,
                }
            }
            // Past the file's end SQLite reads zeros too.
            buf[got..].fill(0);
            for (k, page) in buf.chunks_mut(ps as usize).enumerate() {
                if let Some(&off) = v.pages.get(&((pgno + k as u64) as u32)) {
                    v.file.read_exact_at(page, off)?;
                }
                f(page);
            }
            pgno += count;
        }
        Ok(v.page_size)
    }
}

struct SnapshotGuard(Arc<AtomicUsize>);
impl Drop for SnapshotGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

fn set_persist_wal(conn: &Connection) -> rusqlite::Result<()> {
    let mut on: std::os::raw::c_int = 1;
    // SAFETY: the handle is valid for the life of `conn`, "main" is NUL-terminated, and
    // SQLITE_FCNTL_PERSIST_WAL takes a pointer to an int.
    let rc = unsafe {
        rusqlite::ffi::sqlite3_file_control(
            conn.handle(),
            c"main".as_ptr(),
            rusqlite::ffi::SQLITE_FCNTL_PERSIST_WAL,
            (&mut on as *mut std::os::raw::c_int).cast(),
        )
    };
    if rc != rusqlite::ffi::SQLITE_OK {
        return Err(rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rc),
            Some("set PERSIST_WAL".into()),
        ));
    }
    Ok(())
}

pub(crate) fn file_size(p: &Path) -> io::Result<u64> {
    match fs::metadata(p) {
        Ok(m) => Ok(m.len()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(e),
    }
}

/// Takes the replication lock: an open-file-description lock on one byte of the database file
/// far from the bytes SQLite locks (PENDING_BYTE 0x40000000 and the 512 after it). It belongs
/// to our own descriptor, so SQLite closing its descriptors never drops it, it needs no extra
/// file descriptor, and it goes away with the process. Two replicators of one database (a
/// second process, or the same path configured twice) would otherwise share and corrupt the
/// shadow WAL. Returns false if someone else holds it.
pub(crate) fn replication_lock(fd: &File) -> io::Result<bool> {
    lock_byte(fd, 0x4000_1000)
}

/// An open-file-description write lock on byte `at` of `fd`'s file, not waiting: false if
/// another description holds it. Also the standby's one-follower lock (`standby`).
pub(crate) fn lock_byte(fd: &File, at: i64) -> io::Result<bool> {
    use nix::fcntl::{FcntlArg, fcntl};
    use nix::libc;
    // SAFETY: an all-zero `flock` is a valid value; the fields that matter are set below.
    let mut lk: libc::flock = unsafe { std::mem::zeroed() };
    lk.l_type = libc::F_WRLCK as _;
    lk.l_whence = libc::SEEK_SET as _;
    lk.l_start = at;
    lk.l_len = 1;
    match fcntl(fd, FcntlArg::F_OFD_SETLK(&lk)) {
        Ok(_) => Ok(true),
        Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EACCES) => Ok(false),
        Err(e) => Err(io::Error::from(e)),
    }
}

/// SQLite's lock bytes (os_unix.c): PENDING_BYTE, RESERVED_BYTE and the 510-byte SHARED range.
const SQLITE_LOCK_START: i64 = 0x4000_0000;
const SQLITE_LOCK_LEN: i64 = 512;

/// Removes `-wal` and `-shm` beside a database file that replaced the one they belonged to (the
/// -wal still has the old file's WAL header, `old_header`), if no SQLite connection has the new
/// file open (none holds any of SQLite's lock bytes) — checked
/// by taking a write lock on those bytes ourselves, which also makes any connection that tries
/// to open the new file meanwhile wait (busy) until the stale files are gone. If someone already
/// has it open, nothing is touched: it is theirs now.
fn remove_stale_sidecars(db: &Path, wal: &Path, old_header: &[u8; WAL_HEADER_SIZE]) {
    use nix::fcntl::{FcntlArg, fcntl};
    use nix::libc;
    let Ok(f) = OpenOptions::new().read(true).write(true).open(db) else {
        return;
    };
    // SAFETY: an all-zero `flock` is a valid value; the fields that matter are set below.
    let mut lk: libc::flock = unsafe { std::mem::zeroed() };
    lk.l_type = libc::F_WRLCK as _;
    lk.l_whence = libc::SEEK_SET as _;
    lk.l_start = SQLITE_LOCK_START;
    lk.l_len = SQLITE_LOCK_LEN;
    if fcntl(&f, FcntlArg::F_OFD_SETLK(&lk)).is_err() {
        info!(db = %db.display(), "the new database file is already open; its -wal/-shm are left alone");
        return;
    }
    match read_header_bytes(wal) {
        Ok(None) => {}
        Ok(Some(h)) if h == *old_header => {}
        Ok(Some(_)) => {
            info!(db = %db.display(), "the -wal beside the new database file is not the old file's; it is left alone");
            return;
        }
        // Unreadable (out of descriptors, EIO): it may not be stale, so it stays.
        Err(e) => {
            warn!(db = %db.display(), error = %e, "cannot read the -wal beside the new database file; it is left alone");
            return;
        }
    }
    let mut shm = db.as_os_str().to_owned();
    shm.push("-shm");
    for p in [wal.to_path_buf(), PathBuf::from(shm)] {
        match fs::symlink_metadata(&p) {
            Ok(m) if m.file_type().is_file() => match fs::remove_file(&p) {
                Ok(()) => {
                    info!(file = %p.display(), "removed what the replaced database file left behind")
                }
                Err(e) => {
                    warn!(file = %p.display(), error = %e, "cannot remove a stale file of the replaced database")
                }
            },
            _ => {}
        }
    }
    // The OFD lock goes with the descriptor; we hold no POSIX locks on this new file yet, so
    // closing it releases nothing else.
    drop(f);
}
