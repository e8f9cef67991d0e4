//! A standby database's worker (`role = "standby"`): a [`Follower`] polled every
//! `poll_interval`, catching up in one go (it steps until nothing new is there), its state and
//! lag published like a primary's (the followed replica's row carries the applied position,
//! the lag and the requests), and `promote`: catch up, take the replica's lease, mark the
//! database promoted, and hand the database to the primary path in the same worker.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::mpsc;
use tokio::time::{Instant, sleep_until};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::{Command, DbSpec, StandbySpec, WorkerHandle};
use crate::lease::{Lease, LeaseError};
use crate::replica::meter::RequestMeter;
use crate::standby::{FollowError, Follower, Step};
use crate::status::{DbState, ReplicaState, ReplicaStatus, StandbyStatus};
use crate::telemetry;

/// Steps in one poll at most before the loop looks at its commands and shutdown again.
const STEPS_PER_POLL: usize = 64;
/// The longest wait between two polls after errors.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// The retry interval of an empty poll while the primary writes (at most a quarter poll).
const QUICK: Duration = Duration::from_millis(100);

/// How following ended.
pub(super) enum Outcome {
    Stopped,
    /// Promoted: the caller replicates the database as a primary and answers the request when
    /// it is running.
    Promoted(super::Reply<String>),
}

/// Follows the replica until shutdown or a promotion.
pub(super) async fn follow(
    spec: &DbSpec,
    sb: &StandbySpec,
    handle: &WorkerHandle,
    shutdown: &CancellationToken,
    commands: &mut mpsc::Receiver<Command>,
) -> Outcome {
    let (ropts, client) = &spec.replicas[sb.replica];
    let meter = client.meter().clone();
    {
        let mut st = handle.status.lock().expect("status");
        let mut row = ReplicaStatus::new(&ropts.name, client.kind(), &client.url());
        row.caught_up_at = None;
        st.replicas = vec![row];
        st.state = DbState::Bootstrapping;
        st.standby = Some(StandbyStatus {
            replica: ropts.name.clone(),
            poll_interval: sb.poll_interval,
            ..Default::default()
        });
    }
    let mut me = Standby {
        spec,
        sb,
        handle,
        meter,
        follower: None,
        started: Instant::now(),
        caught_up_at: None,
        attempt: 0,
        quick: 0,
    };
    let mut next = Instant::now();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Outcome::Stopped,
            _ = sleep_until(next) => {}
            Some(cmd) = commands.recv() => {
                match cmd {
                    Command::Sync(reply) => {
                        me.poll().await;
                        let pos = handle.status().replicas.first().and_then(|r| r.pos.clone());
                        let _ = reply.send(Ok(pos));
                    }
                    Command::Promote(force, reply) => {
                        match me.promote(force).await {
                            Ok(()) => return Outcome::Promoted(reply),
                            Err(e) => {
                                warn!(db = %spec.name, error = %e, "promotion refused");
                                let _ = reply.send(Err(e));
                            }
                        }
                    }
                    other => super::refuse(other, "a standby only follows its replica; promote it first"),
                }
                continue;
            }
        }
        let polled = me.poll().await;
        let now = Instant::now();
        // Fixed rate, like the primary's uploads, so a poll's own time does not push every
        // later poll back. And while the primary writes (the last poll applied something), an
        // empty poll is retried every QUICK for up to one interval: the upload it expects
        // lands within that interval, the retry that finds it sets the phase of the polls
        // after it, so they come just after the primary's uploads instead of at a random
        // point of its second (a fixed phase alone put p50 anywhere from 0.5 to 1.5 s).
        let quick = QUICK.min(sb.poll_interval / 4);
        let due = |from: Instant| {
            let d = from + sb.poll_interval;
            if d > now { d } else { now + sb.poll_interval }
        };
        next = if polled.more {
            now
        } else if me.attempt > 0 {
            me.quick = 0;
            now + (sb.poll_interval * 2u32.saturating_pow(me.attempt.min(8))).min(MAX_BACKOFF)
        } else if polled.applied {
            me.quick = (sb.poll_interval.as_millis() / quick.as_millis().max(1)) as u32;
            due(next)
        } else if me.quick > 0 {
            me.quick -= 1;
            now + quick
        } else {
            due(next)
        };
    }
}

/// What a poll found.
#[derive(Debug, Clone, Copy, Default)]
struct Polled {
    /// It stopped short of catching up: poll again at once.
    more: bool,
    /// It applied or bootstrapped something.
    applied: bool,
}

/// Steps until the follower finds nothing new (the standby then holds everything the replica
/// had when the poll began) or [`STEPS_PER_POLL`] steps (`more`).
async fn catch_up(
    spec: &DbSpec,
    sb: &StandbySpec,
    handle: &WorkerHandle,
    follower: &mut Option<Follower>,
) -> Result<Polled, FollowError> {
    if follower.is_none() {
        *follower = Some(Follower::new(
            &spec.path,
            spec.replicas[sb.replica].1.clone(),
        )?);
    }
    let f = follower.as_mut().expect("just set");
    let mut polled = Polled::default();
    for _ in 0..STEPS_PER_POLL {
        if f.position().is_none() {
            handle.status.lock().expect("status").state = DbState::Bootstrapping;
        }
        let step = f.step().await?;
        polled.applied |= !matches!(step, Step::CaughtUp);
        match step {
            Step::CaughtUp => return Ok(polled),
            Step::Bootstrapped { pos, why } => {
                let mut st = handle.status.lock().expect("status");
                let s = st.standby.get_or_insert_with(Default::default);
                s.bootstraps += 1;
                s.last_bootstrap = Some(why.as_str().to_string());
                metrics::counter!(telemetry::STANDBY_BOOTSTRAPS, "db" => spec.name.clone(), "reason" => why.label()).increment(1);
                info!(db = %spec.name, %pos, why = why.as_str(), "standby bootstrapped from the newest snapshot");
            }
            Step::Applied {
                commits, pos, lag, ..
            } => {
                let mut st = handle.status.lock().expect("status");
                let s = st.standby.get_or_insert_with(Default::default);
                s.commits_applied += commits as u64;
                s.last_applied = Some(SystemTime::now());
                if let Some(l) = lag {
                    s.apply_lag_seconds = Some(l.as_secs_f64());
                    metrics::histogram!(telemetry::STANDBY_APPLY_LAG, "db" => spec.name.clone())
                        .record(l.as_secs_f64());
                }
                metrics::counter!(telemetry::STANDBY_COMMITS, "db" => spec.name.clone())
                    .increment(commits as u64);
                tracing::debug!(db = %spec.name, %pos, commits, "standby applied");
            }
        }
    }
    // Still catching up: the next poll comes at once after this one publishes.
    polled.more = true;
    Ok(polled)
}

/// A standby's worker state: what it follows, its follower (None until the first poll, and
/// after a promotion) and its schedule.
struct Standby<'a> {
    spec: &'a DbSpec,
    sb: &'a StandbySpec,
    handle: &'a WorkerHandle,
    meter: Arc<RequestMeter>,
    follower: Option<Follower>,
    started: Instant,
    /// When a poll last found nothing newer than what is applied.
    caught_up_at: Option<SystemTime>,
    /// Failed polls in a row.
    attempt: u32,
    /// Quick re-polls left while the primary is writing (see `follow`).
    quick: u32,
}

impl Standby<'_> {
    /// One poll: steps until caught up (or an error, or [`STEPS_PER_POLL`]), then publishes.
    async fn poll(&mut self) -> Polled {
        let (spec, sb, handle) = (self.spec, self.sb, self.handle);
        let res = catch_up(spec, sb, handle, &mut self.follower).await;
        let (meter, follower) = (&self.meter, &self.follower);
        let now = SystemTime::now();
        let mut st = handle.status.lock().expect("status");
        let ready = follower.as_ref().and_then(|f| f.position()).is_some();
        match &res {
            Ok(polled) => {
                if self.attempt > 0 {
                    info!(db = %spec.name, "standby following again");
                }
                self.attempt = 0;
                st.state = DbState::Following;
                st.last_error = None;
                if !polled.more {
                    self.caught_up_at = Some(now);
                }
            }
            Err(e) => {
                self.attempt += 1;
                let msg = e.to_string();
                if st.last_error.as_deref() != Some(msg.as_str()) {
                    error!(db = %spec.name, error = %msg, "standby cannot follow its replica");
                }
                // A replica that cannot be read right now is retried; anything the standby cannot
                // get past on its own (a corrupt object, an emptied replica, its own files) is an
                // error until it clears.
                st.state = if matches!(e, FollowError::Replica(_)) && ready {
                    DbState::Following
                } else {
                    DbState::Error
                };
                st.last_error = Some(msg);
            }
        }
        if let Ok(m) = std::fs::metadata(&spec.path) {
            st.db_size = m.len();
        }
        let pos = follower
            .as_ref()
            .and_then(|f| f.position())
            .map(|p| p.pos());
        st.pos = pos.clone();
        st.last_sync = Some(now);
        let attempt = self.attempt;
        let error = st.last_error.clone();
        let state = st.state;
        let row = &mut st.replicas[0];
        row.state = match (&error, state) {
            (None, _) => ReplicaState::Healthy,
            (Some(e), DbState::Following) => ReplicaState::Retrying {
                attempt,
                error: e.clone(),
            },
            (Some(e), _) => ReplicaState::Failed {
                attempt,
                error: e.clone(),
            },
        };
        row.last_error = error;
        if res.is_ok() {
            row.last_sync = Some(now);
        }
        row.pos = pos;
        row.caught_up_at = self.caught_up_at;
        row.lag_seconds = match self.caught_up_at {
            Some(t) => now.duration_since(t).unwrap_or_default().as_secs_f64(),
            None => self.started.elapsed().as_secs_f64(),
        };
        row.requests = meter.totals();
        row.requests_per_month = meter.per_month();
        telemetry::publish_db(&st, 0, 0);
        telemetry::publish_standby(&st);
        res.unwrap_or_default()
    }

    /// Promotes the standby: applies everything the replica has, takes the followed replica's
    /// lease (at once with `force`; else waiting up to one lease TTL for the holder to release it
    /// or let it expire), marks the database promoted. Errors leave it a standby.
    async fn promote(&mut self, force: bool) -> Result<(), String> {
        let (spec, sb, handle) = (self.spec, self.sb, self.handle);
        info!(db = %spec.name, force, "promoting the standby");
        self.poll().await;
        let (state, err) = handle.with_status(|s| (s.state, s.last_error.clone()));
        if let Some(e) = err {
            if !force {
                return Err(format!(
                    "the standby could not apply everything the replica has ({e}); fix that, or promote with --force to accept what is applied ({state})"
                ));
            }
            warn!(db = %spec.name, error = %e, "promoting with --force without everything the replica has");
        }
        if self.follower.as_ref().and_then(|f| f.position()).is_none() {
            return Err(
                "the standby has no database yet (never bootstrapped); nothing to promote".into(),
            );
        }
        let (ropts, client) = &spec.replicas[sb.replica];
        if !ropts.lease_ttl.is_zero() {
            let mut lease = Lease::with_scheme(
                client.store().clone(),
                ropts.lease_scheme(),
                ropts.lease_ttl,
                &spec.path.to_string_lossy(),
            );
            let deadline = Instant::now() + ropts.lease_ttl + Duration::from_secs(5);
            loop {
                let res = if force {
                    lease.take_over().await.map(|prev| {
                    if let Some(p) = prev {
                        warn!(db = %spec.name, previous = %p, "took the replica's lease from its holder (--force)");
                    }
                })
                } else {
                    lease.ensure().await
                };
                match res {
                    Ok(()) => break,
                    Err(LeaseError::Held { holder, until, .. })
                        if !force && Instant::now() < deadline =>
                    {
                        info!(db = %spec.name, %holder, %until, "waiting for the primary's lease to be released or to expire");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        // Whatever the primary uploads meanwhile (its final sync) is applied too.
                        self.poll().await;
                    }
                    Err(e) => return Err(format!("cannot take the replica's lease: {e}")),
                }
            }
            // Everything the old primary uploaded before it let go of the lease.
            if !force {
                self.poll().await;
            }
            // Dropped, not released: the primary's replica task takes it over at once as an earlier
            // holder of this database on this host (see `lease`), and nobody else can meanwhile.
            drop(lease);
        }
        let pos = self
            .follower
            .as_ref()
            .and_then(|f| f.position())
            .map(|p| p.pos());
        // Marked while the follower still holds its locks (no other follower can start on the
        // file in between); then its connections and locks go before the primary opens it.
        let at = crate::standby::mark_promoted(&spec.path).map_err(|e| e.to_string())?;
        self.follower = None;
        let mut st = handle.status.lock().expect("status");
        st.standby.get_or_insert_with(Default::default).promoted_at = Some(at);
        info!(db = %spec.name, pos = ?pos.map(|p| p.to_string()), "standby promoted; replicating it as the primary in a new generation");
        Ok(())
    }
}
