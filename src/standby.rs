//! The standby's apply step (issue 19): a primary's committed transactions written into a
//! local copy of its database so that applications reading that copy at any moment see a
//! whole commit of the primary, never a torn one.
//!
//! Pages are written through SQLite itself, with the `sqlite_dbpage` virtual table (compiled
//! into the bundled SQLite by `.cargo/config.toml`), in one write transaction per commit of the
//! primary, as `sqlite3_rsync` does: readers keep their snapshot until the transaction commits
//! and SQLite's own WAL isolation does the rest, with no locking protocol of ours to get wrong.
//! A database that shrank (VACUUM) is cut to the commit's size in the same transaction.
//!
//! The standby is the primary page for page except three fields of page 1's header that
//! SQLite rewrites itself whenever a commit writes page 1 (the file change counter, the
//! version-valid-for number and the writer's SQLite version, bytes 24-27 and 92-99): they count
//! the standby's own commits. WAL-mode readers do not use them; a byte comparison with the
//! primary or a restore must leave them out.
//!
//! [`Follower`] drives it from a replica: it bootstraps the standby from the newest snapshot
//! (a restore), then probes the keys it expects next (the next segment of its index, the first
//! of the next index) and applies what arrives, one transaction per batch of whole commits. It
//! records its position beside the database after each batch, so a restart (even after
//! `kill -9`) resumes there; a new generation, or a gap left by retention, is noticed by an
//! occasional listing and healed by bootstrapping again, in one transaction over the existing
//! standby. A segment that does not continue the checksum chain is an error, never skipped.
//!
//! The daemon runs a follower per standby database (`worker::standby`); a promotion marks
//! the database promoted ([`mark_promoted`]) before it is replicated as a primary.

use std::collections::BTreeMap;
use std::io::{self, Read};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rusqlite::{Connection, OpenFlags, TransactionBehavior};
use tracing::{info, warn};

use crate::layout::Pos;
use crate::replica::{ReplicaClient, StoreError};
use crate::restore::{self, RestoreError, RestoreOptions, Until};
use crate::wal::{FrameHeader, Scanner, WAL_HEADER_SIZE, WalHeader};

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("standby database {}: {source}", path.display())]
    Sqlite {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error(
        "standby database {}: page {pgno} is {len} bytes, its page size is {page_size}",
        path.display()
    )]
    PageSize {
        path: PathBuf,
        pgno: u32,
        len: usize,
        page_size: u32,
    },
    #[error("standby database {}: a commit of size 0 pages", path.display())]
    EmptyCommit { path: PathBuf },
    #[error("standby database {}: journal_mode is {mode}, not wal", path.display())]
    NotWal { path: PathBuf, mode: String },
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
}

/// One committed transaction of the primary: the newest version of each page it wrote, and
/// the database's size in pages after it (the commit frame's).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Commit {
    pub pages: BTreeMap<u32, Vec<u8>>,
    pub db_pages: u32,
}

impl Commit {
    /// Folds a later commit into this one: the pair applied at once leaves the database as
    /// the later commit did (pages past its size are cut when applied).
    pub fn absorb(&mut self, later: Commit) {
        self.pages.extend(later.pages);
        self.db_pages = later.db_pages;
    }
}

/// Groups WAL frames, in order and already checked (salts, checksum chain), into commits.
/// Frames after the last commit frame stay pending: a transaction the primary had not
/// committed is never applied.
#[derive(Debug, Default)]
pub struct Commits {
    pending: BTreeMap<u32, Vec<u8>>,
}

impl Commits {
    /// Adds one frame; returns the commit it completes, if it is a commit frame.
    pub fn push(&mut self, h: &FrameHeader, page: &[u8]) -> Option<Commit> {
        self.pending.insert(h.pgno, page.to_vec());
        h.is_commit().then(|| Commit {
            pages: std::mem::take(&mut self.pending),
            db_pages: h.commit_size,
        })
    }

    /// Frames seen since the last commit frame (dropped if the WAL restarts before one).
    pub fn uncommitted(&self) -> usize {
        self.pending.len()
    }
}

/// The writer of a standby database: the only connection that writes it.
pub struct Applier {
    path: PathBuf,
    conn: Connection,
    page_size: u32,
}

impl Applier {
    /// Opens the standby database (a restore's output, in WAL mode like its primary).
    pub fn open(path: &Path) -> Result<Applier, ApplyError> {
        let err = |source| ApplyError::Sqlite {
            path: path.to_path_buf(),
            source,
        };
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(err)?;
        // Readers hold the WAL's read marks for as long as they read; a busy checkpoint waits
        // for them rather than failing the apply.
        conn.busy_timeout(Duration::from_secs(5)).map_err(err)?;
        let mode: String = conn
            .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))
            .map_err(err)?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(ApplyError::NotWal {
                path: path.to_path_buf(),
                mode,
            });
        }
        let page_size: u32 = conn
            .query_row("PRAGMA page_size", [], |r| r.get(0))
            .map_err(err)?;
        Ok(Applier {
            path: path.to_path_buf(),
            conn,
            page_size,
        })
    }

    pub fn page_size(&self) -> u32 {
        self.page_size
    }

    /// Copies the WAL into the database file and empties it (before a bootstrap's file is
    /// renamed into place or copied from).
    pub fn checkpoint(&mut self) -> Result<(), ApplyError> {
        self.conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
            .map_err(|source| ApplyError::Sqlite {
                path: self.path.clone(),
                source,
            })
    }

    /// Writes one commit of the primary in one transaction of the standby: readers see the
    /// database before it or after it, nothing in between.
    pub fn apply(&mut self, c: &Commit) -> Result<(), ApplyError> {
        if c.db_pages == 0 {
            return Err(ApplyError::EmptyCommit {
                path: self.path.clone(),
            });
        }
        if let Some((&pgno, p)) = c
            .pages
            .iter()
            .find(|(_, p)| p.len() != self.page_size as usize)
        {
            return Err(ApplyError::PageSize {
                path: self.path.clone(),
                pgno,
                len: p.len(),
                page_size: self.page_size,
            });
        }
        let path = &self.path;
        let err = |source| ApplyError::Sqlite {
            path: path.clone(),
            source,
        };
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(err)?;
        {
            let mut put = tx
                .prepare_cached("INSERT INTO sqlite_dbpage(pgno, data) VALUES (?1, ?2)")
                .map_err(err)?;
            // Pages past the commit's size were written earlier in the transaction and then
            // cut off by it (SQLite does the same when it reads the WAL).
            for (pgno, data) in c.pages.range(..=c.db_pages) {
                put.execute((pgno, data)).map_err(err)?;
            }
            let have: u32 = tx
                .query_row("PRAGMA page_count", [], |r| r.get(0))
                .map_err(err)?;
            if have > c.db_pages {
                // A NULL page cuts the database before it (SQLite 3.44+).
                put.execute((c.db_pages + 1, rusqlite::types::Null))
                    .map_err(err)?;
            }
        }
        tx.commit().map_err(err)
    }

    /// Makes the standby the database in `from` (a bootstrap's restore, checkpointed), page
    /// for page, in one transaction: readers see the old database or the new one.
    pub fn replace_with(&mut self, from: &Path) -> Result<(), ApplyError> {
        let ps = self.page_size as usize;
        let mut f = std::fs::File::open(from).map_err(|source| ApplyError::Io {
            path: from.to_path_buf(),
            source,
        })?;
        let mut c = Commit::default();
        let mut buf = vec![0u8; ps];
        loop {
            match f.read_exact(&mut buf) {
                Ok(()) => {
                    c.db_pages += 1;
                    c.pages.insert(c.db_pages, buf.clone());
                }
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break,
                Err(source) => {
                    return Err(ApplyError::Io {
                        path: from.to_path_buf(),
                        source,
                    });
                }
            }
        }
        self.apply(&c)
    }
}

/// What a [`Follower`] step did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// The standby was (re)built from the newest snapshot, for the reason given.
    Bootstrapped { pos: Pos, why: Heal },
    /// Whole commits of the primary were applied, in one transaction. `lag`: from the upload
    /// of the oldest segment applied (its object's time) to its application here; None where
    /// the store does not give object times on download (GCS).
    Applied {
        segments: usize,
        commits: usize,
        pos: Pos,
        lag: Option<Duration>,
    },
    /// Nothing new: the keys expected next are not there.
    CaughtUp,
}

/// Why a standby was bootstrapped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Heal {
    /// No standby yet, or no recorded position.
    Start,
    /// The primary started a new generation.
    NewGeneration,
    /// Segments the standby had not applied are gone (retention), later ones are there.
    Gap,
}

impl Heal {
    /// The `reason` label of `litestreamd_standby_bootstraps_total`.
    pub fn label(self) -> &'static str {
        let [start, new_generation, gap] = crate::telemetry::STANDBY_BOOTSTRAP_REASONS;
        match self {
            Heal::Start => start,
            Heal::NewGeneration => new_generation,
            Heal::Gap => gap,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Heal::Start => "start",
            Heal::NewGeneration => "new generation",
            Heal::Gap => "gap in the replica",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FollowError {
    #[error(transparent)]
    Replica(#[from] StoreError),
    #[error(transparent)]
    Restore(#[from] RestoreError),
    #[error(transparent)]
    Apply(#[from] ApplyError),
    #[error("{key}: {reason}")]
    Corrupt { key: String, reason: String },
    #[error("standby state {}: {source}", path.display())]
    State { path: PathBuf, source: io::Error },
    #[error("{0}: nothing to follow yet (no snapshot whose WAL index is uploaded)")]
    NothingYet(String),
    #[error(
        "{}: another follower (a second litestreamd?) keeps this standby; this one waits until it stops",
        path.display()
    )]
    Locked { path: PathBuf },
    #[error(
        "{}: a litestreamd primary replicates this database on this host (it holds the database's replication lock); a standby never writes over it. Is the same file configured as a primary too?",
        path.display()
    )]
    PrimaryHere { path: PathBuf },
}

/// Where a standby stands: the primary up to `offset` of WAL index `index` of `generation`
/// is applied. `header` (the index's WAL header) and `checksum` (the last applied frame's)
/// are what the next segment's frames must continue.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Position {
    pub generation: String,
    pub index: u32,
    pub offset: u64,
    header: Vec<u8>,
    checksum: (u32, u32),
}

impl Position {
    pub fn pos(&self) -> Pos {
        Pos::new(self.generation.clone(), self.index, self.offset)
    }
}

/// Caught-up polls between two listings of the replica (a new generation, a gap): the rest
/// are two GETs of keys that do not exist yet. An idle primary therefore costs a standby
/// polling every second 7,200 GETs and 60 listings an hour; a listing is 2 + 2 × generations
/// LIST requests (generations, each one's snapshots and segments, the followed one's segments
/// again), 240 an hour for one generation (tests/object_storage.rs counts them).
pub const LIST_EVERY: u32 = 60;

/// Follows one replica into a standby database (see the module documentation).
pub struct Follower {
    path: PathBuf,
    state_path: PathBuf,
    client: ReplicaClient,
    pos: Option<Position>,
    applier: Option<Applier>,
    idle_polls: u32,
    /// After a restart the standby may be past the recorded position (killed between a commit
    /// and its record): the first batch then takes everything there is, so the one
    /// transaction ends at or past where it was.
    resumed: bool,
    /// `.<db>-standby.lock`, locked for the follower's life: one follower per standby.
    _lock: std::fs::File,
    /// The standby database's own replication lock (`db::replication_lock`), held while its
    /// file exists: a primary replicating the same file on this host is refused (it reports
    /// "another litestreamd replicates this database"), and one already there stops the
    /// standby before it writes. Taken again on the new file after a bootstrap renames it in.
    db_lock: Option<std::fs::File>,
}

/// Decoded segments of one step, and what they hold.
struct Batch {
    commit: Option<Commit>,
    commits: usize,
    segments: usize,
    end: Option<Position>,
    /// The oldest upload time among the segments in `commit`.
    uploaded: Option<SystemTime>,
}

impl Follower {
    /// A follower of `client` into the standby database at `path`, resuming from the position
    /// recorded beside it when the database is there.
    pub fn new(path: &Path, client: ReplicaClient) -> Result<Follower, FollowError> {
        let lock = lock(path)?;
        let state_path = state_path(path);
        let pos = if path.exists() {
            match std::fs::read(&state_path) {
                Ok(b) => match serde_json::from_slice::<Position>(&b) {
                    Ok(p) => Some(p),
                    Err(e) => {
                        warn!(path = %state_path.display(), error = %e, "unreadable standby position; bootstrapping again");
                        None
                    }
                },
                Err(e) if e.kind() == io::ErrorKind::NotFound => None,
                Err(source) => {
                    return Err(FollowError::State {
                        path: state_path,
                        source,
                    });
                }
            }
        } else {
            None
        };
        Ok(Follower {
            path: path.to_path_buf(),
            state_path,
            client,
            resumed: pos.is_some(),
            pos,
            applier: None,
            idle_polls: 0,
            _lock: lock,
            db_lock: None,
        })
    }

    /// Holds the standby file's replication lock (see `db_lock`); nothing to hold while the
    /// file does not exist.
    fn hold_db(&mut self) -> Result<(), FollowError> {
        if self.db_lock.is_some() {
            return Ok(());
        }
        // Write access: a write lock needs it (nothing is written through it).
        let f = match std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC)
            .open(&self.path)
        {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(source) => {
                return Err(FollowError::State {
                    path: self.path.clone(),
                    source,
                });
            }
        };
        match crate::db::replication_lock(&f) {
            Ok(true) => {
                self.db_lock = Some(f);
                Ok(())
            }
            Ok(false) => Err(FollowError::PrimaryHere {
                path: self.path.clone(),
            }),
            Err(source) => Err(FollowError::State {
                path: self.path.clone(),
                source,
            }),
        }
    }

    pub fn position(&self) -> Option<&Position> {
        self.pos.as_ref()
    }

    /// One poll: bootstrap if there is no position, else apply what arrived, else (every
    /// [`LIST_EVERY`] idle polls) list the replica for a new generation or a gap.
    pub async fn step(&mut self) -> Result<Step, FollowError> {
        self.hold_db()?;
        let Some(pos) = self.pos.clone() else {
            return self.bootstrap(Heal::Start).await;
        };
        let batch = self.fetch(pos.clone(), self.resumed).await?;
        if let Some(end) = batch.end {
            if let Some(c) = &batch.commit {
                let ap = self.applier()?;
                tokio::task::block_in_place(|| ap.apply(c))?;
            }
            self.save(&end)?;
            let lag = batch
                .uploaded
                .map(|t| SystemTime::now().duration_since(t).unwrap_or_default());
            self.pos = Some(end.clone());
            self.resumed = false;
            self.idle_polls = 0;
            return Ok(Step::Applied {
                segments: batch.segments,
                commits: batch.commits,
                pos: end.pos(),
                lag,
            });
        }
        self.resumed = false;
        self.idle_polls += 1;
        if self.idle_polls >= LIST_EVERY {
            // On an error (the bucket emptied, unreadable) the count stays: every poll lists
            // and reports it again until it clears.
            let heal = self.needs_bootstrap(&pos).await?;
            self.idle_polls = 0;
            if let Some(why) = heal {
                return self.bootstrap(why).await;
            }
        }
        Ok(Step::CaughtUp)
    }

    fn applier(&mut self) -> Result<&mut Applier, ApplyError> {
        if self.applier.is_none() {
            self.applier = Some(Applier::open(&self.path)?);
        }
        Ok(self.applier.as_mut().expect("opened"))
    }

    /// Downloads the segments that continue `pos` (the next ones of its index, then the next
    /// index from offset 0) and folds their commits into one. With `all`, everything there
    /// is; otherwise up to 64 MiB of segments. A segment that ends inside a transaction is
    /// held back with the rest of its transaction until a later one commits it.
    async fn fetch(&mut self, mut pos: Position, all: bool) -> Result<Batch, FollowError> {
        let mut batch = Batch {
            commit: None,
            commits: 0,
            segments: 0,
            end: None,
            uploaded: None,
        };
        let mut open_uploaded: Option<SystemTime> = None;
        let mut open: Option<Commit> = None;
        let mut open_commits = 0;
        let mut pending = Commits::default();
        let mut bytes = 0u64;
        loop {
            let mut next = Pos::new(pos.generation.clone(), pos.index, pos.offset);
            let (data, uploaded) = match self.get(&next).await? {
                Some(d) => d,
                None => {
                    next = Pos::new(pos.generation.clone(), pos.index + 1, 0);
                    match self.get(&next).await? {
                        // Index N+1 is uploaded only once N is whole: N's tail is not coming.
                        Some(d) if pending.uncommitted() == 0 => d,
                        _ => break,
                    }
                }
            };
            open_uploaded = earliest(open_uploaded, uploaded);
            let key = self.client.wal_segment_key(&next);
            let corrupt = |reason: String| FollowError::Corrupt {
                key: key.clone(),
                reason,
            };
            let (mut sc, frames, header) = if next.offset == 0 {
                if data.len() < WAL_HEADER_SIZE {
                    return Err(corrupt("shorter than a WAL header".into()));
                }
                let h = WalHeader::parse(&data[..WAL_HEADER_SIZE])
                    .map_err(|e| corrupt(e.to_string()))?;
                (
                    Scanner::new(&h),
                    &data[WAL_HEADER_SIZE..],
                    data[..WAL_HEADER_SIZE].to_vec(),
                )
            } else {
                let h = WalHeader::parse(&pos.header).map_err(|e| corrupt(e.to_string()))?;
                (
                    Scanner::resume(&h, pos.checksum, next.offset),
                    &data[..],
                    pos.header.clone(),
                )
            };
            let fs = sc.frame_size() as usize;
            if frames.len() % fs != 0 {
                return Err(corrupt(format!(
                    "{} bytes of frames is not a whole number of {fs}-byte frames",
                    frames.len()
                )));
            }
            let mut checksum = if next.offset == 0 {
                (0, 0)
            } else {
                pos.checksum
            };
            for frame in frames.chunks(fs) {
                let at = sc.offset();
                let h = sc
                    .push(frame)
                    .map_err(|stop| corrupt(format!("{} at WAL offset {at}", stop.reason())))?;
                checksum = h.checksum;
                if let Some(c) = pending.push(&h, &frame[crate::wal::FRAME_HEADER_SIZE..]) {
                    open_commits += 1;
                    match &mut open {
                        Some(o) => o.absorb(c),
                        None => open = Some(c),
                    }
                }
            }
            pos = Position {
                generation: next.generation.clone(),
                index: next.index,
                offset: sc.offset(),
                header,
                checksum,
            };
            batch.segments += 1;
            bytes += data.len() as u64;
            if pending.uncommitted() == 0 {
                // A clean end: what is gathered so far can be applied and recorded.
                if let Some(o) = open.take() {
                    match &mut batch.commit {
                        Some(b) => b.absorb(o),
                        None => batch.commit = Some(o),
                    }
                }
                batch.commits += std::mem::take(&mut open_commits);
                batch.uploaded = earliest(batch.uploaded, open_uploaded.take());
                batch.end = Some(pos.clone());
                if !all && bytes >= 64 << 20 {
                    break;
                }
            }
        }
        Ok(batch)
    }

    /// One GET of a segment that may not exist yet; its decoded bytes and upload time.
    async fn get(
        &mut self,
        pos: &Pos,
    ) -> Result<Option<(Vec<u8>, Option<SystemTime>)>, FollowError> {
        use tokio::io::AsyncReadExt;
        let key = self.client.wal_segment_key(pos);
        let (mut body, uploaded) = match self.client.open_wal_segment_stat(pos).await {
            Ok(b) => b,
            Err(e) if e.is_not_found() => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let mut raw = Vec::new();
        body.read_to_end(&mut raw)
            .await
            .map_err(|e| FollowError::Corrupt {
                key: key.clone(),
                reason: e.to_string(),
            })?;
        crate::compress::decompress(&raw)
            .map(|d| Some((d, uploaded)))
            .map_err(|e| FollowError::Corrupt {
                key,
                reason: e.to_string(),
            })
    }

    /// From a listing, while caught up: whether the newest generation is another one, or the
    /// replica holds segments after the position but not the one that continues it.
    async fn needs_bootstrap(&mut self, pos: &Position) -> Result<Option<Heal>, FollowError> {
        let replicas = [("standby".to_string(), self.client.clone())];
        let Some(plan) = restore::plan(&replicas, &RestoreOptions::new(&self.path)).await? else {
            return Err(FollowError::NothingYet(self.client.url()));
        };
        if plan.generation != pos.generation {
            return Ok(Some(Heal::NewGeneration));
        }
        let segs = self.client.wal_segments(&pos.generation).await?;
        let later = segs
            .iter()
            .any(|s| (s.index, s.offset) > (pos.index, pos.offset));
        let next = segs.iter().any(|s| {
            (s.index, s.offset) == (pos.index, pos.offset)
                || (s.index, s.offset) == (pos.index + 1, 0)
        });
        Ok((later && !next).then_some(Heal::Gap))
    }

    /// Restores the newest snapshot and its WAL beside the standby, then makes it the standby
    /// (renamed into place if there is none, else copied in one transaction).
    async fn bootstrap(&mut self, why: Heal) -> Result<Step, FollowError> {
        let replicas = [("standby".to_string(), self.client.clone())];
        let tmp = sibling(&self.path, "standby-bootstrap");
        remove_db_files(&tmp);
        let Some(plan) = restore::plan(&replicas, &RestoreOptions::new(&tmp)).await? else {
            return Err(FollowError::NothingYet(self.client.url()));
        };
        // The newest index with its first segment: restored up to its header, then walked
        // here so the position knows its checksum chain.
        let n = plan
            .segments
            .iter()
            .filter(|s| s.offset == 0)
            .map(|s| s.index)
            .max()
            .filter(|&n| n >= plan.snapshot.index)
            .ok_or_else(|| FollowError::NothingYet(self.client.url()))?;
        let mut o = RestoreOptions::new(&tmp);
        o.integrity_check = false;
        o.until = Some(Until {
            pos: Pos::new(plan.generation.clone(), n, WAL_HEADER_SIZE as u64),
            taken_at: SystemTime::now(),
        });
        restore::restore(&replicas, &o).await?;
        let start = Position {
            generation: plan.generation.clone(),
            index: n,
            offset: 0,
            header: Vec::new(),
            checksum: (0, 0),
        };
        let batch = self.fetch(start, true).await?;
        let end = batch
            .end
            .ok_or_else(|| FollowError::NothingYet(self.client.url()))?;
        let path = self.path.clone();
        let fresh = !path.exists();
        tokio::task::block_in_place(|| -> Result<(), FollowError> {
            let mut ap = Applier::open(&tmp)?;
            if let Some(c) = &batch.commit {
                ap.apply(c)?;
            }
            ap.checkpoint()?;
            drop(ap);
            if fresh {
                std::fs::rename(&tmp, &path).map_err(|source| FollowError::State {
                    path: path.clone(),
                    source,
                })?;
                self.db_lock = None;
                self.hold_db()?;
            } else {
                self.applier = None;
                let mut standby = Applier::open(&path)?;
                standby.replace_with(&tmp)?;
                self.applier = Some(standby);
            }
            remove_db_files(&tmp);
            Ok(())
        })?;
        self.save(&end)?;
        info!(standby = %self.path.display(), why = why.as_str(), pos = %end.pos(), "standby bootstrapped");
        self.pos = Some(end.clone());
        self.resumed = false;
        self.idle_polls = 0;
        Ok(Step::Bootstrapped {
            pos: end.pos(),
            why,
        })
    }

    /// Records the position (see [`write_durably`]).
    fn save(&self, pos: &Position) -> Result<(), FollowError> {
        write_durably(
            &self.state_path,
            &serde_json::to_vec(pos).expect("serializable"),
        )
    }
}

/// Writes a small file beside the standby (`durable::replace`, private to the daemon's user).
fn write_durably(path: &Path, bytes: &[u8]) -> Result<(), FollowError> {
    let err = |source| FollowError::State {
        path: path.to_path_buf(),
        source,
    };
    crate::durable::replace(path, bytes, 0o600).map_err(err)
}

/// When the standby at `db` was promoted (`.<name>-promoted` beside it), if it was: the
/// database is a primary from then on, whatever its file says, so a restart never follows
/// the replica over writes the application made after the promotion.
pub fn promoted(db: &Path) -> Option<SystemTime> {
    let b = std::fs::read(sibling(db, "promoted")).ok()?;
    let ms: u64 = serde_json::from_slice::<serde_json::Value>(&b)
        .ok()?
        .get("promoted_at_ms")?
        .as_u64()?;
    Some(SystemTime::UNIX_EPOCH + Duration::from_millis(ms))
}

/// Records that the standby at `db` was promoted (durably, before it is written to as a
/// primary), and forgets its followed position.
pub fn mark_promoted(db: &Path) -> Result<SystemTime, FollowError> {
    let now = SystemTime::now();
    let ms = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64;
    let doc = serde_json::json!({ "promoted_at_ms": ms, "database": db.to_string_lossy() });
    write_durably(&sibling(db, "promoted"), doc.to_string().as_bytes())?;
    let state = state_path(db);
    match std::fs::remove_file(&state) {
        Ok(()) => Ok(now),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(now),
        Err(source) => Err(FollowError::State {
            path: state,
            source,
        }),
    }
}

/// The earlier of two times where known (None only when neither is).
fn earliest(a: Option<SystemTime>, b: Option<SystemTime>) -> Option<SystemTime> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Takes `.<name>-standby.lock` beside the standby: an open-file-description lock on its
/// first byte, held as long as the file stays open and released with the process (`kill -9`
/// included). The database file itself cannot carry it: a bootstrap renames a new file into
/// place. The lock file is created without following a link at its name.
fn lock(db: &Path) -> Result<std::fs::File, FollowError> {
    let path = sibling(db, "standby.lock");
    let err = |source| FollowError::State {
        path: path.clone(),
        source,
    };
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC)
        .open(&path)
        .map_err(err)?;
    match crate::db::lock_byte(&f, 0) {
        Ok(true) => Ok(f),
        Ok(false) => Err(FollowError::Locked {
            path: db.to_path_buf(),
        }),
        Err(e) => Err(err(e)),
    }
}

/// `.<name>-standby` beside the standby database: its recorded position.
fn state_path(db: &Path) -> PathBuf {
    sibling(db, "standby")
}

fn sibling(db: &Path, what: &str) -> PathBuf {
    let name = db
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    db.with_file_name(format!(".{name}-{what}"))
}

fn remove_db_files(p: &Path) {
    for suffix in ["", "-wal", "-shm"] {
        let mut s = p.as_os_str().to_owned();
        s.push(suffix);
        let _ = std::fs::remove_file(PathBuf::from(s));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wal::{FRAME_HEADER_SIZE, Scanner, WAL_HEADER_SIZE, WalHeader};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

    /// Page 1's change counter, version-valid-for and SQLite version number.
    const OWN_HEADER: [std::ops::Range<usize>; 2] = [24..28, 92..100];
    const ACCOUNTS: i64 = 100;
    const TOTAL: i64 = ACCOUNTS * 100;

    fn primary(path: &Path) -> Connection {
        let c = Connection::open(path).unwrap();
        c.execute_batch(
            "PRAGMA journal_mode=WAL; PRAGMA wal_autocheckpoint=0;
             CREATE TABLE acct(id INTEGER PRIMARY KEY, bal INTEGER NOT NULL);
             CREATE TABLE meta(k INTEGER PRIMARY KEY, n INTEGER NOT NULL);
             CREATE TABLE blob(id INTEGER PRIMARY KEY, v BLOB);
             INSERT INTO meta VALUES (1, 0);",
        )
        .unwrap();
        c.execute(
            "WITH RECURSIVE s(i) AS (SELECT 1 UNION ALL SELECT i+1 FROM s WHERE i < ?1)
             INSERT INTO acct SELECT i, 100 FROM s",
            [ACCOUNTS],
        )
        .unwrap();
        c
    }

    /// Every commit in the primary's WAL, walked with the crate's frame walk.
    fn commits_of(wal: &Path) -> (Vec<Commit>, usize) {
        let b = std::fs::read(wal).unwrap();
        let hdr = WalHeader::parse(&b[..WAL_HEADER_SIZE]).unwrap();
        let mut walk = Scanner::new(&hdr);
        let mut commits = Commits::default();
        let mut out = Vec::new();
        for f in b[WAL_HEADER_SIZE..].chunks_exact(walk.frame_size() as usize) {
            let Ok(h) = walk.push(f) else { break };
            out.extend(commits.push(&h, &f[FRAME_HEADER_SIZE..]));
        }
        (out, commits.uncommitted())
    }

    fn dump(c: &Connection) -> Vec<(String, i64, Vec<u8>)> {
        let mut st = c
            .prepare(
                "SELECT 'acct', id, CAST(bal AS BLOB) FROM acct UNION ALL
                 SELECT 'meta', k, CAST(n AS BLOB) FROM meta UNION ALL
                 SELECT 'blob', id, v FROM blob ORDER BY 1, 2",
            )
            .unwrap();
        st.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .unwrap()
            .map(Result::unwrap)
            .collect()
    }

    /// A reader of the standby during the apply sees only whole commits: the accounts always
    /// sum to the same total, the commit counter never goes back, the b-trees are sound; and
    /// at the end the standby is the primary, its size included after a VACUUM shrank it.
    #[test]
    fn readers_never_see_a_torn_commit_and_the_standby_ends_as_the_primary() {
        let d = tempfile::tempdir().unwrap();
        let (p, s) = (d.path().join("p.db"), d.path().join("s.db"));
        let pc = primary(&p);
        pc.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
            .unwrap();
        // The bootstrap (in the daemon, a restore of the newest snapshot).
        std::fs::copy(&p, &s).unwrap();
        let mut rng = 7u64;
        let mut next = move |m: u64| {
            rng = rng
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (rng >> 33) % m
        };
        for n in 1..=400i64 {
            let (a, b, amt) = (1 + next(100), 1 + next(100), next(50));
            pc.execute_batch(&format!(
                "BEGIN; UPDATE acct SET bal = bal - {amt} WHERE id = {a};
                 UPDATE acct SET bal = bal + {amt} WHERE id = {b};
                 UPDATE meta SET n = {n} WHERE k = 1;
                 INSERT INTO blob(v) VALUES (randomblob({}));
                 {} COMMIT;",
                100 + next(6000),
                if n % 50 == 0 {
                    "DELETE FROM blob WHERE id % 3 = 0;"
                } else {
                    ""
                }
            ))
            .unwrap();
        }
        pc.execute_batch("DELETE FROM blob WHERE id % 2 = 0; VACUUM;")
            .unwrap();
        // A transaction left open on the primary: its frames reach the WAL uncommitted once
        // the page cache spills; they must never be applied.
        pc.execute_batch("PRAGMA cache_size=2; BEGIN; UPDATE acct SET bal = 0;")
            .unwrap();
        pc.execute_batch("INSERT INTO blob(v) SELECT randomblob(8000) FROM blob LIMIT 50;")
            .unwrap();
        let (commits, uncommitted) = commits_of(&p.with_extension("db-wal"));
        assert!(commits.len() >= 402, "{} commits", commits.len());
        assert!(uncommitted > 0, "the open transaction spilled no frame");
        let sizes: Vec<u32> = commits.iter().map(|c| c.db_pages).collect();
        assert!(
            sizes.last() < sizes.iter().max(),
            "the VACUUM shrank the database: {sizes:?}"
        );

        let stop = Arc::new(AtomicBool::new(false));
        let reads = Arc::new(AtomicU64::new(0));
        let reader = {
            let (s, stop, reads) = (s.clone(), stop.clone(), reads.clone());
            std::thread::spawn(move || {
                let c = Connection::open_with_flags(&s, OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
                c.busy_timeout(Duration::from_secs(5)).unwrap();
                let mut last = 0i64;
                loop {
                    // One more read after the stop: it sees the last commit.
                    let stopping = stop.load(Ordering::Relaxed);
                    c.execute_batch("BEGIN").unwrap();
                    let (sum, count): (i64, i64) = c
                        .query_row("SELECT sum(bal), count(*) FROM acct", [], |r| {
                            Ok((r.get(0)?, r.get(1)?))
                        })
                        .unwrap();
                    let n: i64 = c
                        .query_row("SELECT n FROM meta WHERE k = 1", [], |r| r.get(0))
                        .unwrap();
                    let ok: String = c.query_row("PRAGMA quick_check", [], |r| r.get(0)).unwrap();
                    c.execute_batch("COMMIT").unwrap();
                    assert_eq!((sum, count), (TOTAL, ACCOUNTS), "a torn commit at n={n}");
                    assert!(n >= last, "the counter went back from {last} to {n}");
                    assert_eq!(ok, "ok", "at n={n}");
                    last = n;
                    reads.fetch_add(1, Ordering::Relaxed);
                    if stopping {
                        return last;
                    }
                }
            })
        };
        let mut ap = Applier::open(&s).unwrap();
        for (i, c) in commits.iter().enumerate() {
            ap.apply(c).unwrap();
            if i % 8 == 0 {
                // Give the reader a turn between commits as well as during them.
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        stop.store(true, Ordering::Relaxed);
        let last = reader.join().expect("the reader saw a torn state");
        assert!(reads.load(Ordering::Relaxed) > 20, "the reader hardly ran");
        assert_eq!(last, 400);

        pc.execute_batch("ROLLBACK").unwrap();
        let sc = Connection::open(&s).unwrap();
        assert_eq!(dump(&sc), dump(&pc));
        let count =
            |c: &Connection| -> u32 { c.query_row("PRAGMA page_count", [], |r| r.get(0)).unwrap() };
        assert_eq!(count(&sc), count(&pc));
        assert_eq!(count(&sc), *sizes.last().unwrap());
        let ok: String = sc
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .unwrap();
        assert_eq!(ok, "ok");
        // Byte for byte once both are checkpointed (page_count alone would not see a file
        // left longer than its header says: SQLite trusts the header's size), except the three
        // page-1 fields SQLite itself rewrites on every commit that writes page 1 (see the
        // module's comment).
        for c in [&pc, &sc] {
            c.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
                .unwrap();
        }
        let (pb, sb) = (std::fs::read(&p).unwrap(), std::fs::read(&s).unwrap());
        assert_eq!(sb.len(), pb.len(), "file sizes");
        let differ: Vec<usize> = (0..pb.len()).filter(|&i| pb[i] != sb[i]).collect();
        assert!(
            differ
                .iter()
                .all(|i| OWN_HEADER.iter().any(|r| r.contains(i))),
            "the standby's bytes differ from the primary's at {:?}",
            &differ[..differ.len().min(20)]
        );
    }

    #[test]
    fn a_page_of_the_wrong_size_is_refused_by_name() {
        let d = tempfile::tempdir().unwrap();
        let s = d.path().join("s.db");
        drop(primary(&s));
        let mut ap = Applier::open(&s).unwrap();
        let mut c = Commit {
            db_pages: 4,
            ..Default::default()
        };
        c.pages.insert(2, vec![0; 512]);
        let e = ap.apply(&c).unwrap_err().to_string();
        assert!(
            e.contains("s.db") && e.contains("page 2 is 512 bytes"),
            "{e}"
        );
    }
}
