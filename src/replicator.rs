//! The replica side of the engine (spec §2.6–2.8): uploads shadow-WAL segments and snapshots to
//! one target, recovers its position from the remote listing, enforces retention, and keeps a
//! status (healthy / retrying / failed) that metrics and the dashboard show.

use std::io;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use thiserror::Error;
use tokio::io::AsyncReadExt;
use tokio::sync::{Notify, watch};
use tracing::{debug, info, warn};

use crate::compress;
use crate::db::{Db, DbError};
use crate::layout::Pos;
use crate::lease::{self, Lease, LeaseError};
use crate::lineage::{self, Decision, LineageError};
use crate::replica::{ReplicaClient, StoreError};
use crate::shadow::{After, Shadow};
use crate::status::{ReplicaReport, ReplicaState};
use crate::telemetry;

/// Concurrent snapshot uploads across the whole process. Each holds an LZ4 block buffer and an
/// upload buffer, so this bounds memory when many databases snapshot at once (Litestream #331).
static SNAPSHOT_PERMITS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(2);

/// Leftovers of interrupted uploads older than this are removed by retention (and at start when
/// the replica has no lease to prove that no other writer is uploading): far longer than any
/// upload takes, short enough that a killed snapshot upload does not linger for a day.
const INCOMPLETE_MAX_AGE: Duration = Duration::from_secs(6 * 3600);

/// Append-only replicas: a week, for lifecycle rules of 30 days or more (the rule is
/// keep-alive < expiry - the longest outage tolerated; see `docs/operations.md`).
pub const DEFAULT_SNAPSHOT_KEEPALIVE: Duration = Duration::from_secs(7 * 24 * 3600);

#[derive(Debug, Error)]
pub enum ReplicaError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("{path}: {source}")]
    Shadow {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{0}")]
    Inconsistent(String),
    #[error("{key}: {source}")]
    Object {
        key: String,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Lease(#[from] LeaseError),
    #[error(transparent)]
    Lineage(#[from] LineageError),
    /// Objects the current generation needs are gone from the replica: a restore would fail.
    #[error("{0}")]
    NotRestorable(String),
    /// Another replicator held the replica path while this one was idle (see `lease`).
    #[error(
        "{0}: another replicator held this replica path while this database was idle; reading the replica again before writing"
    )]
    LeaseInterrupted(String),
}

/// Capped exponential backoff with full jitter.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RetryPolicy {
    #[serde(with = "humantime_serde")]
    pub initial: Duration,
    #[serde(with = "humantime_serde")]
    pub max: Duration,
    /// Attempts before a replica is reported `failed` (it keeps retrying at `max`).
    pub failed_after: u32,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(60),
            failed_after: 10,
        }
    }
}

impl RetryPolicy {
    pub fn delay(&self, attempt: u32) -> Duration {
        let exp = self
            .initial
            .saturating_mul(1u32 << attempt.saturating_sub(1).min(20))
            .min(self.max);
        // Jitter between half and the full delay so many replicas do not retry in lockstep.
        let half = exp / 2;
        half + exp.saturating_sub(half).mul_f64(rand::random::<f64>())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaOptions {
    pub name: String,
    pub sync_interval: Duration,
    /// Zero: no interval snapshots (retention still takes one when none is kept).
    pub snapshot_interval: Duration,
    /// Zero disables retention.
    pub retention: Duration,
    pub retention_check_interval: Duration,
    pub retry: RetryPolicy,
    /// How long a lease on the replica path lasts (see `lease`); zero disables the lease.
    pub lease_ttl: Duration,
    /// How often, while it uploads, a replica checks that the objects its generation restores
    /// from are still there (see `Replica::check_restorable`); zero disables the check.
    pub restorable_check_interval: Duration,
    /// Never delete or replace an object at this path (`append_only`): no retention (the
    /// bucket's lifecycle does it), the lease as a chain of records (`lease::Scheme::Chain`),
    /// and a keep-alive snapshot every `snapshot_keepalive`. The client is wrapped in
    /// `replica::append_only` so nothing that deletes can be sent.
    pub append_only: bool,
    /// Append-only: the longest the newest snapshot of the current generation may get before a
    /// new one is written, also when the database is idle, so a lifecycle rule that expires
    /// objects older than E never leaves the database without a restorable snapshot while
    /// this is shorter than E minus the longest outage tolerated.
    pub snapshot_keepalive: Duration,
}

impl ReplicaOptions {
    /// How this replica's lease is stored.
    pub fn lease_scheme(&self) -> lease::Scheme {
        if self.append_only {
            lease::Scheme::Chain
        } else {
            lease::Scheme::Object
        }
    }
}

impl Default for ReplicaOptions {
    fn default() -> Self {
        ReplicaOptions {
            name: "file".into(),
            sync_interval: Duration::from_secs(1),
            snapshot_interval: Duration::ZERO,
            retention: Duration::from_secs(24 * 3600),
            retention_check_interval: Duration::from_secs(3600),
            retry: RetryPolicy::default(),
            lease_ttl: lease::DEFAULT_TTL,
            restorable_check_interval: Duration::from_secs(60),
            append_only: false,
            snapshot_keepalive: DEFAULT_SNAPSHOT_KEEPALIVE,
        }
    }
}

/// A database's shared engine state, handed to its replicas.
pub struct DbShared {
    pub db: Mutex<Db>,
    pub shadow: Shadow,
    pub name: String,
}

pub struct Replica {
    pub opts: ReplicaOptions,
    client: ReplicaClient,
    /// None when the lease is disabled.
    lease: Option<Lease>,
    /// In-memory remote position; None means "recompute from the remote listing".
    pos: Option<Pos>,
    /// The snapshot the current generation restores from on this replica (the newest).
    restore_snapshot: Option<u32>,
    /// When restorability was last checked, and whether segments went up since.
    checked_at: Option<tokio::time::Instant>,
    uploaded_since_check: bool,
    /// The replica path was found to belong to this database's lineage (see `lineage`).
    lineage_ok: bool,
    /// What interrupted uploads of an earlier run left was removed (once, at the start).
    cleaned: bool,
    /// Objects written (segments and snapshots), for the retention schedule.
    writes: u64,
    /// The database position of the last snapshot this replica wrote: while the database is
    /// still there, a new snapshot would be the same database.
    snapshot_pos: Option<Pos>,
    /// What this replica reports to its worker, which writes the status (see `status`).
    report: watch::Sender<ReplicaReport>,
    /// Wakes the worker after each report.
    wake: Arc<Notify>,
    attempt: u32,
}

impl Replica {
    /// `database` (the database path) identifies this writer in the replica's lease; `wake` is
    /// notified after every report (the receiver returned here).
    pub fn new(
        opts: ReplicaOptions,
        client: ReplicaClient,
        database: &str,
        wake: Arc<Notify>,
    ) -> (Self, watch::Receiver<ReplicaReport>) {
        let lease = (!opts.lease_ttl.is_zero()).then(|| {
            Lease::with_scheme(
                client.store().clone(),
                opts.lease_scheme(),
                opts.lease_ttl,
                database,
            )
        });
        let (report, rx) = watch::channel(ReplicaReport::default());
        let r = Replica {
            opts,
            client,
            lease,
            pos: None,
            restore_snapshot: None,
            checked_at: None,
            uploaded_since_check: false,
            lineage_ok: false,
            cleaned: false,
            writes: 0,
            snapshot_pos: None,
            report,
            wake,
            attempt: 0,
        };
        (r, rx)
    }

    /// Changes what this replica reports, and wakes its worker.
    fn report(&self, f: impl FnOnce(&mut ReplicaReport)) {
        self.report.send_modify(f);
        self.wake.notify_one();
    }

    pub fn client(&self) -> &ReplicaClient {
        &self.client
    }

    /// Objects this replica has written since it started.
    pub fn writes(&self) -> u64 {
        self.writes
    }

    /// Whether the newest snapshot of this replica holds the database at `dpos` (it wrote one
    /// there and the database has not changed since): another would be the same bytes.
    pub fn snapshot_is_current(&self, dpos: Option<&Pos>) -> bool {
        dpos.is_some() && self.snapshot_pos.as_ref() == dpos
    }
    pub fn pos(&self) -> Option<&Pos> {
        self.pos.as_ref()
    }

    /// Takes or renews the lease before a write (no request while it is fresh). An idle
    /// replica lets it lapse; when another replicator held the path meanwhile, what this one
    /// knew of the replica is stale, so the sync fails once and the retry reads it again.
    pub async fn ensure_lease(&mut self) -> Result<(), ReplicaError> {
        let Some(l) = &mut self.lease else {
            return Ok(());
        };
        let res = l.ensure().await;
        if l.take_interrupted() {
            self.pos = None;
            self.lineage_ok = false;
            res?;
            return Err(ReplicaError::LeaseInterrupted(self.client.url()));
        }
        Ok(res?)
    }

    /// Gives the lease up at a clean stop, so another replicator can take over at once.
    pub async fn release_lease(&mut self) {
        if let Some(l) = &mut self.lease {
            l.release().await;
        }
    }

    /// Records the outcome of a sync attempt and returns the delay before the next retry.
    pub fn record(&mut self, db: &str, result: &Result<(), ReplicaError>) -> Option<Duration> {
        match result {
            Ok(()) => {
                if self.attempt > 0 {
                    info!(db, replica = %self.opts.name, "replica recovered");
                }
                self.attempt = 0;
                let pos = self.pos.clone();
                self.report(|r| {
                    r.pos = pos;
                    r.state = ReplicaState::Healthy;
                    r.last_sync = Some(SystemTime::now());
                });
                None
            }
            Err(e) => {
                self.attempt += 1;
                self.pos = None;
                let error = e.to_string();
                let out_of_files = crate::fdlimit::exhausted(&error);
                let conflict = matches!(
                    e,
                    ReplicaError::Lease(LeaseError::Held { .. })
                        | ReplicaError::Lineage(LineageError::Conflict { .. })
                );
                let attempt = self.attempt;
                let state = if conflict {
                    ReplicaState::Conflict {
                        attempt,
                        error: error.clone(),
                    }
                } else if attempt >= self.opts.retry.failed_after {
                    ReplicaState::Failed {
                        attempt,
                        error: error.clone(),
                    }
                } else {
                    ReplicaState::Retrying {
                        attempt,
                        error: error.clone(),
                    }
                };
                self.report(|r| {
                    r.pos = None;
                    r.retries += 1;
                    r.last_error = Some(error);
                    r.state = state;
                });
                let labels = [("db", db.to_string()), ("replica", self.opts.name.clone())];
                metrics::counter!(telemetry::REPLICA_ERRORS, &labels).increment(1);
                metrics::counter!(telemetry::REPLICA_RETRIES, &labels).increment(1);
                let mut delay = self.opts.retry.delay(self.attempt);
                if conflict {
                    // Look again often enough to take over soon after a release or expiry.
                    delay = delay.min((self.opts.lease_ttl / 10).max(Duration::from_secs(1)));
                    metrics::counter!(telemetry::REPLICA_LEASE_CONFLICTS, &labels).increment(1);
                }
                if out_of_files {
                    debug!(db, replica = %self.opts.name, attempt = self.attempt, retry_in = ?delay, error = %e, "replica sync failed");
                } else {
                    warn!(db, replica = %self.opts.name, attempt = self.attempt, retry_in = ?delay, error = %e, "replica sync failed");
                }
                Some(delay)
            }
        }
    }

    /// Records a retention pass: a failure (a store refusing deletions: credentials without
    /// delete permission, Object Lock) is logged, counted and shown in the replica's status
    /// until a pass succeeds; uploads are not affected.
    pub fn record_retention<T>(&self, db: &str, res: &Result<T, ReplicaError>) {
        let error = res.as_ref().err().map(|e| format!("retention failed: {e}"));
        if let Some(e) = &error {
            warn!(db, replica = %self.opts.name, error = %e, "retention pass failed; replication goes on (next pass at the retention check interval)");
            metrics::counter!(telemetry::REPLICA_RETENTION_FAILURES, "db" => db.to_string(), "replica" => self.opts.name.clone()).increment(1);
        }
        if self.report.borrow().retention_error != error {
            self.report(|r| r.retention_error = error);
        }
    }

    /// Whether the replica has everything the database has.
    pub fn caught_up(&self, dpos: &Pos) -> bool {
        self.pos.as_ref() == Some(dpos)
    }

    /// Uploads everything between the remote position and the local shadow WAL (spec §2.6).
    pub async fn sync(&mut self, shared: &Arc<DbShared>) -> Result<(), ReplicaError> {
        let Some(dpos) = db_pos(shared).await? else {
            return Ok(());
        };
        if self.pos.as_ref().map(|p| &p.generation) != Some(&dpos.generation) {
            // Before anything is written: is this path this database's?
            self.check_lineage(shared).await?;
            if self.client.snapshots(&dpos.generation).await?.is_empty() {
                let taken = self.snapshot(shared).await?;
                if taken.as_ref().map(|p| &p.generation) != Some(&dpos.generation) {
                    // Continuity was lost while snapshotting; the next pass follows the new
                    // generation.
                    return Ok(());
                }
            }
            self.pos = Some(self.calc_pos(&dpos.generation).await?);
            debug!(db = %shared.name, replica = %self.opts.name, pos = %self.pos.as_ref().expect("set"), "replica position from remote");
            // At the start and after a failure, also when there is nothing to upload: a replica
            // whose path another replicator holds says so at once (and a conflict does not
            // look healthy while the database is idle). After the first listing, so a missing
            // bucket is reported as such, not as a lease write that some S3-compatible stores
            // accept into a bucket that does not exist. Otherwise only writes take it.
            self.ensure_lease().await?;
        }
        if !self.cleaned {
            // Holding the lease, no other writer uploads here: whatever an upload left is an
            // earlier run's (killed mid-upload). Without a lease, only old leftovers.
            let age = if self.lease.is_some() {
                Duration::ZERO
            } else {
                INCOMPLETE_MAX_AGE
            };
            self.remove_incomplete(&shared.name, age).await;
            self.cleaned = true;
        }
        let mut pos = self.pos.clone().expect("position set above");
        if pos.generation != dpos.generation {
            return Ok(());
        }
        loop {
            let after =
                shared
                    .shadow
                    .after(&pos, &dpos)
                    .map_err(|source| ReplicaError::Shadow {
                        path: shared.shadow.describe(&pos.generation, pos.index),
                        source,
                    })?;
            let end = match after {
                // Up to the position this sync was asked for: the shadow keeps growing while
                // segments go up, and chasing it turns one upload per interval into many.
                After::Frames(end) if pos.index == dpos.index && end > dpos.offset => {
                    if pos.offset >= dpos.offset {
                        break;
                    }
                    dpos.offset
                }
                After::Frames(end) => end,
                After::NextIndex if pos.index >= dpos.index => break,
                After::NextIndex => {
                    pos = Pos::new(pos.generation.clone(), pos.index + 1, 0);
                    self.pos = Some(pos.clone());
                    continue;
                }
                After::UpToDate => break,
                After::Behind(end) => {
                    // The remote holds more of this index than the local shadow (a crash cut
                    // the shadow back); the same frames will be copied again, so wait.
                    debug!(replica = %self.opts.name, %pos, end, "remote ahead of local shadow; waiting");
                    break;
                }
                After::Gone => {
                    // The replica holds less than the local shadow still has (its position was
                    // recomputed from an older remote state): it cannot catch up segment by
                    // segment, so it starts again from a new snapshot.
                    warn!(db = %shared.name, replica = %self.opts.name, %pos, "the shadow WAL this replica would continue from is gone; taking a new snapshot");
                    self.pos = None;
                    self.snapshot(shared).await?;
                    return Ok(());
                }
            };
            self.ensure_lease().await?;
            let n = self.upload_segment(shared, &pos, end).await?;
            pos.offset = end;
            self.pos = Some(pos.clone());
            self.uploaded_since_check = true;
            self.writes += 1;
            let p = self.pos.clone();
            self.report(|r| {
                r.uploaded_bytes += n;
                r.pos = p;
            });
        }
        let vanished = self.lease.as_mut().is_some_and(|l| l.take_vanished());
        if vanished || self.restorable_check_due() {
            self.check_restorable(shared, &pos).await?;
        }
        Ok(())
    }

    /// Makes sure the replica path belongs to this database's lineage, claiming it if free,
    /// and settles the database's lineage on this host if it has none yet (see `lineage`).
    async fn check_lineage(&mut self, shared: &Arc<DbShared>) -> Result<(), ReplicaError> {
        if self.lineage_ok {
            return Ok(());
        }
        let store = self.client.store().clone();
        let owner = lineage::read(&store).await?;
        // Backups: a generation with a snapshot (leftovers of an interrupted first upload are
        // not backups).
        let has_generations = match &owner {
            Some(_) => true,
            None => {
                let mut any = false;
                for g in self.client.generations().await? {
                    if !self.client.snapshots(&g).await?.is_empty() {
                        any = true;
                        break;
                    }
                }
                any
            }
        };
        let (sh, o) = (shared.clone(), owner.as_ref().map(|(o, _)| o.clone()));
        let settled = tokio::task::spawn_blocking(move || -> Result<_, ReplicaError> {
            // Under the database's lock, so two replicas settle one lineage, not two.
            let db = sh.db.lock().expect("db lock");
            if let Some(l) = db.lineage()? {
                return Ok(Ok(l));
            }
            match lineage::decide(o.as_ref(), has_generations, db.had_history()) {
                Decision::Adopt(l) => {
                    info!(db = %sh.name, lineage = %l, "this database continues the lineage its replica holds");
                    db.set_lineage(&l)?;
                    Ok(Ok(l))
                }
                Decision::New => {
                    let l = lineage::new_lineage();
                    info!(db = %sh.name, lineage = %l, "new database lineage");
                    db.set_lineage(&l)?;
                    Ok(Ok(l))
                }
                Decision::Refuse(reason) => Ok(Err(reason)),
            }
        })
        .await
        .expect("lineage task")?;
        let conflict = |reason: String| {
            ReplicaError::Lineage(LineageError::Conflict {
                url: self.client.url(),
                reason,
            })
        };
        let local = settled.map_err(conflict)?;
        let database = shared.db_path().display().to_string();
        let other = match owner {
            Some((o, _)) if o.lineage == local => None,
            Some((o, _)) => Some(o),
            None => {
                let mine = lineage::Owner::new(&local, &database);
                if lineage::claim(&store, &mine, &crate::replica::Precondition::Absent).await? {
                    info!(db = %shared.name, replica = %self.opts.name, lineage = %local, "claimed the replica path for this database");
                    None
                } else {
                    // Someone claimed it first: whose is it?
                    lineage::read(&store)
                        .await?
                        .map(|(o, _)| o)
                        .filter(|o| o.lineage != local)
                }
            }
        };
        if let Some(o) = other {
            return Err(conflict(format!(
                "this replica path belongs to {}, not to this database (lineage {local}): are two databases configured with one replica path? Nothing is written here; give this database its own path, or run `litestreamd adopt {}` if this file really is that database now",
                o.describe(),
                shared.name
            )));
        }
        self.lineage_ok = true;
        Ok(())
    }

    /// Removes leftovers of interrupted uploads (see `ObjectStore::remove_incomplete`); a
    /// failure is logged, never fatal.
    async fn remove_incomplete(&self, db: &str, older_than: Duration) {
        match self.client.store().remove_incomplete(older_than).await {
            Ok(0) => {}
            Ok(n) => {
                info!(db, replica = %self.opts.name, removed = n, "removed what interrupted uploads left on the replica")
            }
            Err(e) => {
                debug!(db, replica = %self.opts.name, error = %e, "cannot clean up interrupted uploads")
            }
        }
    }

    fn restorable_check_due(&self) -> bool {
        let iv = self.opts.restorable_check_interval;
        !iv.is_zero()
            && self.uploaded_since_check
            && self.checked_at.is_none_or(|t| t.elapsed() >= iv)
    }

    /// Checks that this replica can still restore the generation it extends, with one or two
    /// HEAD requests: the snapshot its restores start from, and the first segment of the
    /// current WAL index — the objects no later upload would put back. It runs at most every
    /// `restorable_check_interval` while segments go up (an idle replica makes no requests),
    /// and at once when the lease object vanished. The segments in between are `verify`'s to
    /// check: a listing each time would cost far more.
    ///
    /// A missing snapshot (an emptied bucket, a lifecycle rule, a deletion) makes the replica
    /// recompute its position from the listing, which takes a new snapshot when the generation
    /// has none; a missing segment, which cannot be uploaded again under the same name, starts
    /// a new generation. Either way the replica reports the loss (it is not healthy) until it
    /// is restorable again.
    async fn check_restorable(
        &mut self,
        shared: &Arc<DbShared>,
        pos: &Pos,
    ) -> Result<(), ReplicaError> {
        self.checked_at = Some(tokio::time::Instant::now());
        self.uploaded_since_check = false;
        let Some(snap) = self.restore_snapshot else {
            return Ok(());
        };
        let generation = &pos.generation;
        let labels = [
            ("db", shared.name.clone()),
            ("replica", self.opts.name.clone()),
        ];
        if !self.client.snapshot_exists(generation, snap).await? {
            self.pos = None;
            self.restore_snapshot = None;
            metrics::counter!(telemetry::REPLICA_NOT_RESTORABLE, &labels).increment(1);
            return Err(ReplicaError::NotRestorable(format!(
                "{}: is gone (the bucket was emptied, a lifecycle rule, a deletion?); nothing can be restored from this replica until a new snapshot is written, which starts now",
                self.client.snapshot_key(generation, snap)
            )));
        }
        if pos.offset > 0 && pos.index >= snap {
            let first = Pos::new(generation.clone(), pos.index, 0);
            if !self.client.wal_segment_exists(&first).await? {
                self.pos = None;
                request_new_generation(
                    shared,
                    "a replica lost WAL segments of the current generation",
                )
                .await;
                metrics::counter!(telemetry::REPLICA_NOT_RESTORABLE, &labels).increment(1);
                return Err(ReplicaError::NotRestorable(format!(
                    "{}: is gone, so the latest position cannot be restored from this replica; a new generation starts",
                    self.client.wal_segment_key(&first)
                )));
            }
        }
        Ok(())
    }

    async fn upload_segment(
        &self,
        shared: &Arc<DbShared>,
        pos: &Pos,
        end: u64,
    ) -> Result<u64, ReplicaError> {
        let db = shared.name.as_str();
        let (shadow, p, start) = (shared.shadow.clone(), pos.clone(), pos.offset);
        let (body, producer) = self.client.encode(Some(end - start), move |w| {
            shadow.copy_range(&p.generation, p.index, start, end, w)
        });
        let put = self.client.write_wal_segment(pos, body).await;
        let path = shared.shadow.describe(&pos.generation, pos.index);
        let (_, n) = upload_outcome(put, producer.await, &path)?;
        let labels = [("db", db.to_string()), ("replica", self.opts.name.clone())];
        metrics::counter!(telemetry::REPLICA_WAL_BYTES, &labels).increment(n);
        metrics::counter!(telemetry::REPLICA_UPLOADS, &labels).increment(1);
        debug!(db, replica = %self.opts.name, %pos, bytes = n, "uploaded WAL segment");
        Ok(n)
    }

    /// The remote position: the highest snapshot index, or the end of the last segment, whose
    /// uncompressed length is learnt by reading it.
    async fn calc_pos(&mut self, generation: &str) -> Result<Pos, ReplicaError> {
        let snap = self
            .client
            .snapshots(generation)
            .await?
            .into_iter()
            .map(|s| s.index)
            .max()
            .ok_or_else(|| {
                ReplicaError::Inconsistent(format!(
                    "{}: generation {generation} has no snapshot",
                    self.client.url()
                ))
            })?;
        let segs = self.client.wal_segments(generation).await?;
        self.restore_snapshot = Some(snap);
        let Some(last) = segs.last().filter(|s| s.index >= snap) else {
            return Ok(Pos::new(generation, snap, 0));
        };
        let key = self.client.wal_segment_key(&last.pos());
        let mut body = self.client.open_wal_segment(&last.pos()).await?;
        let mut raw = Vec::new();
        body.read_to_end(&mut raw)
            .await
            .map_err(|source| ReplicaError::Object {
                key: key.clone(),
                source,
            })?;
        let len = compress::decompress(&raw)
            .map_err(|source| ReplicaError::Object { key, source })?
            .len();
        Ok(Pos::new(generation, last.index, last.offset + len as u64))
    }

    /// Takes and uploads a snapshot of the database; returns its position.
    pub async fn snapshot(&mut self, shared: &Arc<DbShared>) -> Result<Option<Pos>, ReplicaError> {
        self.ensure_lease().await?;
        let _permit = SNAPSHOT_PERMITS
            .acquire()
            .await
            .expect("semaphore never closed");
        let sh = shared.clone();
        let src =
            tokio::task::spawn_blocking(move || sh.db.lock().expect("db lock").begin_snapshot())
                .await
                .expect("snapshot task")?;
        let Some(src) = src else { return Ok(None) };
        let pos = src.pos.clone();
        if self.opts.append_only
            && self
                .client
                .snapshots(&pos.generation)
                .await?
                .iter()
                .any(|s| s.index == pos.index)
        {
            // The snapshot's key is taken (the checkpoint before it could not start a new WAL
            // index) and this path never replaces an object: a new generation has new keys.
            drop(src);
            info!(db = %shared.name, replica = %self.opts.name, %pos, "append-only: a snapshot of this WAL index exists; starting a new generation for the new snapshot");
            request_new_generation(
                shared,
                "an append-only replica needs a snapshot under a new key",
            )
            .await;
            return Ok(None);
        }
        let started = std::time::Instant::now();
        let (body, producer) = self.client.encode(None, move |w| src.copy_to(w));
        let put = self
            .client
            .write_snapshot(&pos.generation, pos.index, body)
            .await;
        let (info, n) = upload_outcome(put, producer.await, &shared.db_path())?;
        metrics::counter!(telemetry::SNAPSHOTS, "db" => shared.name.clone(), "replica" => self.opts.name.clone()).increment(1);
        metrics::histogram!(telemetry::SNAPSHOT_DURATION, "db" => shared.name.clone(), "replica" => self.opts.name.clone()).record(started.elapsed().as_secs_f64());
        info!(db = %shared.name, replica = %self.opts.name, %pos, bytes = n, stored = info.size, "snapshot written");
        self.writes += 1;
        self.snapshot_pos = Some(pos.clone());
        if self
            .pos
            .as_ref()
            .is_some_and(|p| p.generation == pos.generation)
        {
            // Keep the position; the snapshot adds a restore point but changes no WAL offsets.
            self.restore_snapshot = self.restore_snapshot.max(Some(pos.index));
        } else {
            self.pos = None;
        }
        Ok(Some(pos))
    }

    /// Newest snapshot time in a generation, for the snapshot interval.
    pub async fn newest_snapshot(
        &self,
        generation: &str,
    ) -> Result<Option<SystemTime>, ReplicaError> {
        Ok(self
            .client
            .snapshots(generation)
            .await?
            .into_iter()
            .map(|s| s.created_at)
            .max())
    }

    /// Retention (spec §2.8): drops generations, snapshots and segments older than the oldest
    /// snapshot that must be kept. The current generation always keeps a recent snapshot (taken
    /// here if needed) and is never deleted whole. A database unchanged since this replica's
    /// last snapshot is not snapshotted again (the same bytes): that snapshot counts as recent.
    ///
    /// Returns when the next kept snapshot leaves the window: until then, and while nothing is
    /// uploaded, another pass would find nothing to do (see the worker's schedule).
    pub async fn enforce_retention(
        &mut self,
        shared: &Arc<DbShared>,
    ) -> Result<Option<SystemTime>, ReplicaError> {
        if self.opts.append_only {
            return self.keep_alive(shared).await;
        }
        if self.opts.retention.is_zero() {
            return Ok(None);
        }
        let Some(dpos) = db_pos(shared).await? else {
            return Ok(None);
        };
        let cutoff = SystemTime::now()
            .checked_sub(self.opts.retention)
            .unwrap_or(SystemTime::UNIX_EPOCH);
        // Deleting is writing: never delete under another replicator's lease. The lease is
        // taken before each deletion, not here: a pass that deletes nothing writes nothing.
        // (Leftovers of uploads older than INCOMPLETE_MAX_AGE are nobody's, lease or not.)
        self.remove_incomplete(&shared.name, INCOMPLETE_MAX_AGE)
            .await;
        let generations = self.client.generations().await?;
        let current = self.client.snapshots(&dpos.generation).await?;
        let current_kept = current.iter().any(|s| s.created_at >= cutoff);
        // The snapshot that stands for the database as it is now, if old (and still there).
        let unchanged = (!current_kept
            && self.snapshot_is_current(Some(&dpos))
            && current.iter().any(|s| s.index == dpos.index))
        .then_some(dpos.index);
        let mut next_change = None;
        if !current_kept && unchanged.is_none() {
            self.snapshot(shared).await?;
            next_change = Some(SystemTime::now() + self.opts.retention);
        }
        for generation in generations {
            let snaps = self.client.snapshots(&generation).await?;
            let kept = snaps.iter().filter(|s| s.created_at >= cutoff);
            next_change = kept
                .clone()
                .map(|s| s.created_at + self.opts.retention)
                .chain(next_change)
                .min();
            let mut kept_min = kept.map(|s| s.index).min();
            if generation == dpos.generation && kept_min.is_none() {
                kept_min = unchanged;
            }
            match kept_min {
                None if generation != dpos.generation => {
                    info!(db = %shared.name, replica = %self.opts.name, generation, "retention: deleting generation");
                    self.ensure_lease().await?;
                    self.client.delete_generation(&generation).await?;
                }
                None => {}
                Some(k) => {
                    let segs = self.client.wal_segments(&generation).await?;
                    // Snapshot k restores only with index k's WAL from offset 0 (spec §1.6),
                    // which follows a snapshot taken here by up to a sync interval, or never if
                    // the daemon stops first: until it is there, what is older is the newest
                    // restorable point, so it stays (the upload makes the next pass due).
                    if !segs.iter().any(|s| s.index == k && s.offset == 0) {
                        debug!(db = %shared.name, replica = %self.opts.name, generation, below = k, "retention: nothing deleted until the snapshot's WAL index is uploaded");
                        continue;
                    }
                    let old_snaps: Vec<u32> = snaps
                        .iter()
                        .filter(|s| s.index < k)
                        .map(|s| s.index)
                        .collect();
                    let old_segs: Vec<_> = segs.into_iter().filter(|s| s.index < k).collect();
                    if !old_snaps.is_empty() || !old_segs.is_empty() {
                        info!(db = %shared.name, replica = %self.opts.name, generation, snapshots = old_snaps.len(), segments = old_segs.len(), below = k, "retention: deleting old objects");
                    }
                    // Segments first: a snapshot without its older segments still restores.
                    for chunk in old_segs.chunks(1000) {
                        self.ensure_lease().await?;
                        self.client.delete_wal_segments(chunk).await?;
                    }
                    if !old_snaps.is_empty() {
                        self.ensure_lease().await?;
                        self.client
                            .delete_snapshots(&generation, &old_snaps)
                            .await?;
                    }
                }
            }
        }
        Ok(next_change)
    }
}

impl Replica {
    /// Append-only retention: nothing is deleted (the bucket's lifecycle expires objects by
    /// age); a snapshot is written when the current generation's newest one is older than
    /// `snapshot_keepalive`, also for an idle database, so what the lifecycle leaves always
    /// restores. Returns when the newest snapshot next reaches that age.
    async fn keep_alive(
        &mut self,
        shared: &Arc<DbShared>,
    ) -> Result<Option<SystemTime>, ReplicaError> {
        let dpos = db_pos(shared).await?;
        // Until this replica has synced the database's generation (it takes the generation's
        // first snapshot itself), look again soon: no request.
        let Some(dpos) =
            dpos.filter(|d| self.pos.as_ref().map(|p| &p.generation) == Some(&d.generation))
        else {
            return Ok(Some(SystemTime::now()));
        };
        let keepalive = self.opts.snapshot_keepalive;
        let newest = self.newest_snapshot(&dpos.generation).await?;
        if let Some(t) = newest
            && t + keepalive > SystemTime::now()
        {
            return Ok(Some(t + keepalive));
        }
        info!(db = %shared.name, replica = %self.opts.name, age = ?newest.map(|t| SystemTime::now().duration_since(t).unwrap_or_default()), "append-only: keep-alive snapshot (the bucket's lifecycle would otherwise expire the newest one)");
        match self.snapshot(shared).await? {
            Some(_) => Ok(Some(SystemTime::now() + keepalive)),
            // A new generation was requested (or the database is gone): look again soon.
            None => Ok(Some(SystemTime::now())),
        }
    }
}

impl DbShared {
    pub fn db_path(&self) -> PathBuf {
        self.db.lock().expect("db lock").path().to_path_buf()
    }
}

/// The result of an upload whose body a producer wrote: the upload's own error when it failed
/// (the producer then only saw its channel close: "upload aborted"), else the producer's (a
/// local read error, which made the upload fail too), so the message names the real cause.
fn upload_outcome<T>(
    put: Result<T, StoreError>,
    produced: Result<io::Result<u64>, tokio::task::JoinError>,
    source_path: &std::path::Path,
) -> Result<(T, u64), ReplicaError> {
    let local = |source| ReplicaError::Shadow {
        path: source_path.to_path_buf(),
        source,
    };
    match (put, produced) {
        (Ok(v), Ok(Ok(n))) => Ok((v, n)),
        (Err(e), Ok(Err(p))) if p.kind() == io::ErrorKind::BrokenPipe => Err(e.into()),
        (Err(e), Ok(Ok(_))) => Err(e.into()),
        (_, Ok(Err(p))) => Err(local(p)),
        (_, Err(join)) => Err(local(io::Error::other(join))),
    }
}

/// Asks the database to start a new generation at its next sync (see `Db::request_new_generation`).
async fn request_new_generation(shared: &Arc<DbShared>, reason: &'static str) {
    let sh = shared.clone();
    tokio::task::spawn_blocking(move || {
        sh.db
            .lock()
            .expect("db lock")
            .request_new_generation(reason)
    })
    .await
    .expect("db task");
}

async fn db_pos(shared: &Arc<DbShared>) -> Result<Option<Pos>, ReplicaError> {
    let sh = shared.clone();
    Ok(
        tokio::task::spawn_blocking(move || sh.db.lock().expect("db lock").pos())
            .await
            .expect("pos task")?,
    )
}
