//! A lease on a replica path, so two replicators never write the same replica (a container
//! restart overlapping the old one, a blue-green deploy, two databases configured with one
//! path by mistake). Litestream has nothing like it and silently interleaves generations.
//!
//! The lease is one small JSON object, `litestreamd.lease`, beside (not inside) `generations/`,
//! so Litestream 0.3 never sees it. It names its holder and an expiry. Every change to it is a
//! conditional write ([`ObjectStore::put_if`]): create-if-absent to take a free lease, replace-
//! if-unchanged to renew or to take over an expired one. Of two racing replicators exactly one
//! wins; the other reads who holds it and waits.
//!
//! A holder renews before it writes when less than half the TTL is left, and only then: an idle
//! database makes no request, and its lease lapses one TTL after its last write. Its next write
//! renews the lapsed lease with the same conditional write, which succeeds only if nobody wrote
//! the lease object in between, that is, if no other replicator took the path meanwhile (every
//! writer takes the lease before it writes). If one did, the replica is told
//! ([`Lease::take_interrupted`]) and reads the replica again before it writes anything; if that
//! other replicator still holds the lease, this one waits (conflict) as before. So two writers
//! never write at the same time, and a writer never continues from a view of the replica that
//! another writer changed; what is given up is that an idle holder keeps others out (see
//! `docs/ARCHITECTURE.md`).
//!
//! On an append-only replica (`append_only = true`, credentials without delete permission or a
//! bucket with Object Lock) the lease object is never replaced or deleted: the lease is a chain
//! of records under `litestreamd-lease/` ([`Scheme::Chain`]), each written once with
//! create-if-absent. Record `n + 1` can only be created by whoever saw record `n` as the newest,
//! so the same exclusion holds; the newest record is found with one LIST of one key (record
//! names count down, so the newest sorts first), a holder reads back the one name a takeover
//! would create, and releasing writes a record that has already expired. The bucket's
//! lifecycle expires old records.
//!
//! An expired lease is free. So is a lease left by an earlier process of the same database on
//! this host (its pid is gone, or it is our own pid again, as in a container whose process is
//! always pid 1), so a `kill -9` and restart does not wait out the TTL.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio::time::Instant;
use tracing::{info, warn};

use crate::replica::{ObjectStore, Precondition, StoreError};

/// The lease object's key, relative to the replica root.
pub const LEASE_KEY: &str = "litestreamd.lease";

/// Where an append-only replica's lease records live (see [`Scheme::Chain`]).
pub const CHAIN_DIR: &str = "litestreamd-lease";

/// How the lease is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    /// One object, [`LEASE_KEY`], replaced by conditional writes and deleted at release.
    Object,
    /// Append-only replicas: records `CHAIN_DIR/<u64::MAX - n, 16 hex digits>`, each created
    /// once; the one with the highest `n` is the lease, and its version is `n`.
    Chain,
}

fn record_key(n: u64) -> String {
    format!("{CHAIN_DIR}/{:016x}", u64::MAX - n)
}

fn record_number(name: &str) -> Option<u64> {
    u64::from_str_radix(name, 16).ok().map(|inv| u64::MAX - inv)
}

/// The default lease duration: long enough that an idle database renews rarely (one small PUT
/// every 2.5 minutes), short enough that a crashed holder on another host is replaced soon.
pub const DEFAULT_TTL: Duration = Duration::from_secs(300);

/// How long a writing holder trusts its lease without reading it back. A lease can be taken
/// from a live holder (`litestreamd promote --force` on a standby, when the operator believes
/// the old primary dead but it was only partitioned): the old holder notices at its first
/// write after this long, so it uploads at most this long (plus one upload in flight) after
/// the takeover. The cost is one small GET per this interval while writing, none while idle.
pub const CONFIRM_EVERY: Duration = Duration::from_secs(5);

#[derive(Debug, Error)]
pub enum LeaseError {
    #[error(
        "{url}: the replica path is leased by {holder} until {until}; another replicator writes here, so this one does not (it retries until the lease is released or expires)"
    )]
    Held {
        url: String,
        holder: String,
        until: String,
    },
    #[error(
        "{url}/{LEASE_KEY}: unreadable lease object ({message}); if no other litestreamd replicates to this path, delete it"
    )]
    Corrupt { url: String, message: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The stored lease document.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
struct LeaseDoc {
    /// `host/pid/database`, for people.
    holder: String,
    host: String,
    pid: u32,
    /// Random per replicator instance: tells two replicators of one database in one process
    /// apart, and a restarted process from the one before it.
    instance: String,
    database: String,
    /// Unix milliseconds.
    expires_at_ms: u64,
    renewed_at_ms: u64,
    litestreamd: String,
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as u64
}

fn rfc3339_ms(ms: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

fn hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "unknown-host".into())
}

/// Whether a process with this pid exists on this host (EPERM means it exists).
fn pid_alive(pid: u32) -> bool {
    use nix::sys::signal::kill;
    use nix::unistd::Pid;
    let Ok(pid) = i32::try_from(pid) else {
        return false;
    };
    !matches!(
        kill(Pid::from_raw(pid), None),
        Err(nix::errno::Errno::ESRCH)
    )
}

/// Lease instances alive in this process: a lease of our own pid whose instance is not here
/// was left by an earlier process (pid 1 in a container, restarted).
static LIVE: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

/// One replicator's lease on one replica path.
pub struct Lease {
    store: Arc<dyn ObjectStore>,
    scheme: Scheme,
    ttl: Duration,
    host: String,
    pid: u32,
    instance: String,
    database: String,
    /// The version of our lease object and when, by our own clock, it expires.
    held: Option<(String, Instant)>,
    /// When we last wrote or read back our lease object (see [`CONFIRM_EVERY`]).
    confirmed: Option<Instant>,
    /// Our lease object disappeared while we held it (not taken over: gone), which is what an
    /// emptied bucket looks like; the replica checks its backups at once (`take_vanished`).
    vanished: bool,
    /// Another replicator wrote the lease after ours lapsed (see the module comment).
    interrupted: bool,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("url", &self.store.url())
            .field("ttl", &self.ttl)
            .field("held", &self.held.is_some())
            .finish()
    }
}

impl Lease {
    /// `database` identifies the writer (its path); it is stored in the lease for people and
    /// used to recognise an earlier process of the same database.
    pub fn new(store: Arc<dyn ObjectStore>, ttl: Duration, database: &str) -> Self {
        Self::with_scheme(store, Scheme::Object, ttl, database)
    }

    /// [`Self::new`] with the lease stored as `scheme` says (append-only replicas: `Chain`).
    pub fn with_scheme(
        store: Arc<dyn ObjectStore>,
        scheme: Scheme,
        ttl: Duration,
        database: &str,
    ) -> Self {
        let instance = format!("{:016x}", rand::random::<u64>());
        LIVE.lock().expect("live leases").push(instance.clone());
        Lease {
            store,
            scheme,
            ttl,
            host: hostname(),
            pid: std::process::id(),
            instance,
            database: database.to_string(),
            held: None,
            confirmed: None,
            vanished: false,
            interrupted: false,
        }
    }

    fn doc(&self) -> Vec<u8> {
        self.doc_until(SystemTime::now() + self.ttl)
    }

    fn doc_until(&self, expires: SystemTime) -> Vec<u8> {
        let now = SystemTime::now();
        let doc = LeaseDoc {
            holder: format!("{}/{}/{}", self.host, self.pid, self.database),
            host: self.host.clone(),
            pid: self.pid,
            instance: self.instance.clone(),
            database: self.database.clone(),
            expires_at_ms: unix_ms(expires),
            renewed_at_ms: unix_ms(now),
            litestreamd: env!("CARGO_PKG_VERSION").to_string(),
        };
        serde_json::to_vec_pretty(&doc).expect("lease serialises")
    }

    fn url(&self) -> String {
        self.store.url()
    }

    /// The lease's current content and version (None: no lease). Chain: the newest record,
    /// found with one LIST of one key.
    async fn read(&self) -> Result<Option<(Vec<u8>, String)>, LeaseError> {
        match self.scheme {
            Scheme::Object => Ok(self.store.get_versioned(LEASE_KEY).await?),
            Scheme::Chain => {
                let Some(n) = self.newest_record().await? else {
                    return Ok(None);
                };
                // Expired by the lifecycle between the listing and the read: no lease.
                Ok(self
                    .store
                    .get_versioned(&record_key(n))
                    .await?
                    .map(|(data, _)| (data, n.to_string())))
            }
        }
    }

    /// Chain: the number of the newest record (one LIST of one key), None if there is none.
    async fn newest_record(&self) -> Result<Option<u64>, LeaseError> {
        let Some(first) = self.store.first(CHAIN_DIR).await? else {
            return Ok(None);
        };
        record_number(&first.name)
            .map(Some)
            .ok_or_else(|| LeaseError::Corrupt {
                url: format!("{}/{CHAIN_DIR}/{}", self.url(), first.name),
                message: "not a lease record name".into(),
            })
    }

    /// Writes `data` as the lease if `cond` still holds; the new version, or None if not.
    /// Chain: creates the record after the one `cond` names (the first when Absent).
    async fn write(
        &self,
        data: Vec<u8>,
        cond: &Precondition,
    ) -> Result<Option<String>, LeaseError> {
        match self.scheme {
            Scheme::Object => Ok(self.store.put_if(LEASE_KEY, data, cond).await?),
            Scheme::Chain => {
                let n = match cond {
                    Precondition::Absent => 1,
                    Precondition::Version(v) => {
                        v.parse::<u64>().map_err(|_| LeaseError::Corrupt {
                            url: self.url(),
                            message: format!("lease record version {v:?}"),
                        })? + 1
                    }
                };
                let created = self
                    .store
                    .put_if(&record_key(n), data, &Precondition::Absent)
                    .await?;
                Ok(created.map(|_| n.to_string()))
            }
        }
    }

    /// Whether the lease at `version` is still ours; if not, what it is now. Chain: one HEAD of
    /// the name a takeover would create.
    async fn still_ours(
        &self,
        version: &str,
    ) -> Result<Result<(), Option<(Vec<u8>, String)>>, LeaseError> {
        match self.scheme {
            Scheme::Object => {
                let current = self.store.get_versioned(LEASE_KEY).await?;
                if current.as_ref().is_some_and(|(_, v)| v == version) {
                    return Ok(Ok(()));
                }
                Ok(Err(current))
            }
            Scheme::Chain => {
                let next = version.parse::<u64>().unwrap_or(0) + 1;
                if self.store.head(&record_key(next)).await?.is_none() {
                    return Ok(Ok(()));
                }
                Ok(Err(self.read().await?))
            }
        }
    }

    /// Renews the lease at `version`; None if someone wrote it since. Chain: the newest record
    /// must still be ours (not only its successor absent): a chain the lifecycle or an operator
    /// emptied may have been started again by someone else at record 1.
    async fn renew(&self, version: &str, data: Vec<u8>) -> Result<Option<String>, LeaseError> {
        let cond = Precondition::Version(version.to_string());
        if self.scheme == Scheme::Chain
            && self
                .newest_record()
                .await?
                .map(|n| n.to_string())
                .as_deref()
                != Some(version)
        {
            return Ok(None);
        }
        self.write(data, &cond).await
    }

    /// A lease of the other scheme at this path (a replicator of this path configured the
    /// other way), if held by someone else: never two writers because their configs differ.
    async fn check_other_scheme(&self) -> Result<(), LeaseError> {
        let other = match self.scheme {
            Scheme::Chain => self.store.get_versioned(LEASE_KEY).await?,
            Scheme::Object => None,
        };
        if let Some((data, _)) = other
            && let Ok(doc) = serde_json::from_slice::<LeaseDoc>(&data)
            && doc.instance != self.instance
        {
            self.check_free(&doc)?;
        }
        Ok(())
    }

    /// Makes sure this replicator holds the lease with at least half its TTL left; call it
    /// before every write to the replica. Costs no request while the lease is fresh.
    pub async fn ensure(&mut self) -> Result<(), LeaseError> {
        let started = Instant::now();
        if let Some((version, exp)) = &self.held {
            let (lapsed, current) = if *exp > started + self.ttl / 2 {
                if self
                    .confirmed
                    .is_some_and(|c| started.duration_since(c) < CONFIRM_EVERY)
                {
                    return Ok(());
                }
                // Fresh, but it may have been taken over (a forced promotion elsewhere).
                match self.still_ours(version).await? {
                    Ok(()) => {
                        self.confirmed = Some(started);
                        return Ok(());
                    }
                    Err(current) => (false, current),
                }
            } else {
                if let Some(v) = self.renew(version, self.doc()).await? {
                    self.held = Some((v, started + self.ttl));
                    self.confirmed = Some(started);
                    return Ok(());
                }
                let lapsed = *exp <= started;
                (lapsed, self.read().await?)
            };
            self.held = None;
            if current.is_none() && !lapsed {
                warn!(url = %self.store.url(), "our lease object vanished from the replica path (was the bucket emptied?); taking it again and checking that the backups are still there");
                self.vanished = true;
            } else if lapsed {
                // Taken (and perhaps released) by another replicator while we were idle, or
                // the bucket was emptied: either way, what we knew of the replica is stale.
                warn!(url = %self.store.url(), "the lease lapsed while this replicator was idle and another one took the path meanwhile; reading the replica again before writing");
                self.interrupted = true;
            } else {
                warn!(url = %self.store.url(), "lease was taken by another replicator (a promoted standby?); this one stops writing here");
            }
            return self.acquire(current, started).await;
        }
        self.check_other_scheme().await?;
        let current = self.read().await?;
        self.acquire(current, started).await
    }

    /// Whether the lease object vanished since the last call (see `vanished`).
    pub fn take_vanished(&mut self) -> bool {
        std::mem::take(&mut self.vanished)
    }

    /// Whether another replicator held the path since our lease lapsed (since the last call).
    pub fn take_interrupted(&mut self) -> bool {
        std::mem::take(&mut self.interrupted)
    }

    /// Takes the lease given the object's current content (None: absent).
    async fn acquire(
        &mut self,
        current: Option<(Vec<u8>, String)>,
        started: Instant,
    ) -> Result<(), LeaseError> {
        let cond = match current {
            None => Precondition::Absent,
            Some((data, version)) => {
                let doc: LeaseDoc =
                    serde_json::from_slice(&data).map_err(|e| LeaseError::Corrupt {
                        url: self.store.url(),
                        message: e.to_string(),
                    })?;
                if doc.instance != self.instance {
                    self.check_free(&doc)?;
                }
                Precondition::Version(version)
            }
        };
        match self.write(self.doc(), &cond).await? {
            Some(v) => {
                info!(url = %self.store.url(), ttl = ?self.ttl, "lease acquired");
                self.held = Some((v, started + self.ttl));
                self.confirmed = Some(started);
                Ok(())
            }
            // Lost a race with another replicator: report who won.
            None => match self.read().await? {
                Some((data, _)) => match serde_json::from_slice::<LeaseDoc>(&data) {
                    Ok(doc) => Err(self.held_error(&doc)),
                    Err(e) => Err(LeaseError::Corrupt {
                        url: self.store.url(),
                        message: e.to_string(),
                    }),
                },
                None => Err(LeaseError::Held {
                    url: self.store.url(),
                    holder: "another replicator (released it just now)".into(),
                    until: "now".into(),
                }),
            },
        }
    }

    /// Whether another instance's lease may be taken over; the error names its holder if not.
    fn check_free(&self, doc: &LeaseDoc) -> Result<(), LeaseError> {
        let now = unix_ms(SystemTime::now());
        if doc.expires_at_ms <= now {
            info!(url = %self.store.url(), holder = %doc.holder, "taking over an expired lease");
            return Ok(());
        }
        let gone = if doc.pid == self.pid {
            !LIVE.lock().expect("live leases").contains(&doc.instance)
        } else {
            !pid_alive(doc.pid)
        };
        let earlier_self = doc.host == self.host && doc.database == self.database && gone;
        if earlier_self {
            info!(url = %self.store.url(), holder = %doc.holder, "taking over the lease of an earlier process of this database on this host");
            return Ok(());
        }
        Err(self.held_error(doc))
    }

    fn held_error(&self, doc: &LeaseDoc) -> LeaseError {
        LeaseError::Held {
            url: self.store.url(),
            holder: doc.holder.clone(),
            until: rfc3339_ms(doc.expires_at_ms),
        }
    }

    /// Takes the lease whoever holds it (`promote --force`: the operator says the holder is
    /// dead). The old holder, if it lives, notices within [`CONFIRM_EVERY`] of its next write
    /// and stops. Returns the holder it replaced, if any.
    pub async fn take_over(&mut self) -> Result<Option<String>, LeaseError> {
        let started = Instant::now();
        let current = self.read().await?;
        let (cond, previous) = match &current {
            None => (Precondition::Absent, None),
            Some((data, version)) => (
                Precondition::Version(version.clone()),
                serde_json::from_slice::<LeaseDoc>(data)
                    .map(|d| d.holder)
                    .ok()
                    .or(Some("an unreadable lease".into())),
            ),
        };
        match self.write(self.doc(), &cond).await? {
            Some(v) => {
                warn!(url = %self.store.url(), previous = previous.as_deref().unwrap_or("nobody"), "lease taken over");
                self.held = Some((v, started + self.ttl));
                self.confirmed = Some(started);
                Ok(previous)
            }
            // Someone wrote it between our read and our write: report them, as `ensure` does.
            None => self
                .acquire(self.read().await?, started)
                .await
                .map(|()| previous),
        }
    }

    /// Gives the lease up (clean shutdown), so another replicator can take over at once.
    pub async fn release(&mut self) {
        let Some((version, _)) = self.held.take() else {
            return;
        };
        let released = match self.scheme {
            Scheme::Object => self
                .store
                .delete_if(LEASE_KEY, &version)
                .await
                .map_err(LeaseError::from),
            // Nothing is deleted: the next record, already expired, frees the path.
            Scheme::Chain => self
                .renew(&version, self.doc_until(SystemTime::now()))
                .await
                .map(|v| v.is_some()),
        };
        match released {
            Ok(true) => info!(url = %self.store.url(), "lease released"),
            Ok(false) => warn!(url = %self.store.url(), "lease was no longer ours at release"),
            Err(e) => {
                warn!(url = %self.store.url(), error = %e, "could not release the lease; it expires on its own")
            }
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        LIVE.lock()
            .expect("live leases")
            .retain(|i| *i != self.instance);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replica::file::FileStore;

    fn store(dir: &std::path::Path) -> Arc<dyn ObjectStore> {
        Arc::new(FileStore::new(dir))
    }

    #[tokio::test]
    async fn one_holder_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let ttl = Duration::from_secs(60);
        let mut a = Lease::new(store(dir.path()), ttl, "/data/a.db");
        let mut b = Lease::new(store(dir.path()), ttl, "/data/b.db");
        a.ensure().await.unwrap();
        let err = b.ensure().await.unwrap_err().to_string();
        assert!(err.contains("/data/a.db"), "{err}");
        // Fresh: no request, still ours.
        a.ensure().await.unwrap();
        a.release().await;
        assert!(!dir.path().join(LEASE_KEY).exists());
        b.ensure().await.unwrap();
        assert!(a.ensure().await.is_err());
    }

    #[tokio::test]
    async fn expired_and_dead_holders_are_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let mut a = Lease::new(store(dir.path()), Duration::from_millis(50), "/data/a.db");
        a.ensure().await.unwrap();
        tokio::time::sleep(Duration::from_millis(80)).await;
        let mut b = Lease::new(store(dir.path()), Duration::from_secs(60), "/data/b.db");
        b.ensure().await.unwrap();
        // `a` notices at its next renewal that it lost the lease.
        assert!(matches!(a.ensure().await, Err(LeaseError::Held { .. })));

        // While `b` lives, another replicator of the same database is refused...
        let mut c = Lease::new(store(dir.path()), Duration::from_secs(60), "/data/b.db");
        assert!(c.ensure().await.is_err());
        // ...but once it is gone without releasing (a crash), a lease of the same database with
        // our pid (pid 1 in a restarted container) is taken over at once, not after the TTL.
        drop(b);
        c.ensure().await.unwrap();
        let mut d = Lease::new(store(dir.path()), Duration::from_secs(60), "/data/b.db");
        assert!(d.ensure().await.is_err(), "c holds it and is alive");
    }

    #[tokio::test]
    async fn a_lapsed_lease_is_renewed_unless_another_replicator_took_it_meanwhile() {
        let dir = tempfile::tempdir().unwrap();
        let ttl = Duration::from_millis(100);
        let mut a = Lease::new(store(dir.path()), ttl, "/data/a.db");
        a.ensure().await.unwrap();
        // Idle past the TTL, nobody else: the next write renews it, nothing to re-read.
        tokio::time::sleep(Duration::from_millis(150)).await;
        a.ensure().await.unwrap();
        assert!(!a.take_interrupted());

        // Idle again; meanwhile another replicator takes the path, writes, stops cleanly.
        tokio::time::sleep(Duration::from_millis(150)).await;
        let mut b = Lease::new(store(dir.path()), ttl, "/data/a-on-another-host.db");
        b.ensure().await.unwrap();
        b.release().await;
        a.ensure().await.unwrap();
        assert!(a.take_interrupted(), "a must read the replica again");
        assert!(!a.take_vanished());

        // And while the other one still holds it, a waits.
        tokio::time::sleep(Duration::from_millis(150)).await;
        let mut c = Lease::new(store(dir.path()), Duration::from_secs(60), "/data/c.db");
        c.ensure().await.unwrap();
        assert!(matches!(a.ensure().await, Err(LeaseError::Held { .. })));
    }

    fn chain(store: &Arc<dyn ObjectStore>, ttl: Duration, db: &str) -> Lease {
        Lease::with_scheme(
            Arc::new(crate::replica::append_only::AppendOnly::new(store.clone())),
            Scheme::Chain,
            ttl,
            db,
        )
    }

    fn records(dir: &std::path::Path) -> Vec<u64> {
        let mut n: Vec<u64> = std::fs::read_dir(dir.join(CHAIN_DIR))
            .map(|rd| {
                rd.flatten()
                    .filter_map(|e| record_number(&e.file_name().to_string_lossy()))
                    .collect()
            })
            .unwrap_or_default();
        n.sort();
        n
    }

    /// The append-only lease: the same exclusion as the object lease, through records that are
    /// only ever created (the wrapper refuses any replacement or deletion), including when the
    /// lifecycle expired the whole chain.
    #[tokio::test]
    async fn the_append_only_lease_excludes_without_replacing_or_deleting() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        let ttl = Duration::from_millis(300);
        let mut a = chain(&s, ttl, "/data/a.db");
        let mut b = chain(&s, Duration::from_secs(60), "/data/b.db");
        a.ensure().await.unwrap();
        assert_eq!(records(dir.path()), [1]);
        match b.ensure().await {
            Err(LeaseError::Held { holder, .. }) => assert!(holder.contains("/data/a.db")),
            other => panic!("{other:?}"),
        }
        // Renewal below half the TTL: a new record, never a replaced one.
        tokio::time::sleep(Duration::from_millis(200)).await;
        a.ensure().await.unwrap();
        assert_eq!(records(dir.path()), [1, 2]);
        // Release: one more record, already expired; b takes the path.
        a.release().await;
        assert_eq!(records(dir.path()), [1, 2, 3]);
        b.ensure().await.unwrap();
        assert_eq!(records(dir.path()), [1, 2, 3, 4]);
        // a, idle, notices b at its next write.
        assert!(matches!(a.ensure().await, Err(LeaseError::Held { .. })));

        // A takeover (promote --force) is seen by the holder's read-back within CONFIRM_EVERY.
        let mut c = chain(&s, Duration::from_secs(60), "/data/c.db");
        c.take_over().await.unwrap();
        b.confirmed = None;
        assert!(matches!(b.ensure().await, Err(LeaseError::Held { .. })));

        // The lifecycle expires every record while c is idle past its TTL... and d starts a new
        // chain: c must not renew over it. (The takeover's holder is gone first.)
        drop(c);
        let mut c = chain(&s, Duration::from_millis(100), "/data/c.db");
        c.ensure().await.unwrap();
        tokio::time::sleep(Duration::from_millis(150)).await;
        std::fs::remove_dir_all(dir.path().join(CHAIN_DIR)).unwrap();
        let mut d = chain(&s, Duration::from_secs(60), "/data/d.db");
        d.ensure().await.unwrap();
        assert_eq!(records(dir.path()), [1]);
        assert!(matches!(c.ensure().await, Err(LeaseError::Held { .. })));

        // A replicator configured the other way (the object lease) at the same path is seen.
        let mut e = Lease::new(s.clone(), Duration::from_secs(60), "/data/e.db");
        e.ensure().await.unwrap();
        let mut f = chain(&s, Duration::from_secs(60), "/data/f.db");
        d.release().await;
        assert!(matches!(f.ensure().await, Err(LeaseError::Held { .. })));
    }

    #[tokio::test]
    async fn corrupt_lease_is_an_error_naming_the_object() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(LEASE_KEY), b"{not json").unwrap();
        let mut a = Lease::new(store(dir.path()), Duration::from_secs(60), "/data/a.db");
        let err = a.ensure().await.unwrap_err().to_string();
        assert!(err.contains("litestreamd.lease"), "{err}");
    }
}
