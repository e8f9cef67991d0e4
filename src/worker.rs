//! One database's worker: the DB sync loop plus one task per replica, each with its own
//! position, timers and backoff, so a failing replica never holds the others back. Shutdown is
//! passed in (a `CancellationToken`); on it the worker does a final DB sync, lets every replica
//! upload what is left, and releases the read lock.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::sync::{Notify, mpsc, oneshot, watch};
use tokio::task::JoinSet;
use tokio::time::{Instant, sleep_until};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::db::{CheckpointMode, Db, DbOptions, SyncReport};
use crate::drill::DrillSpec;
use crate::layout::Pos;
use crate::replica::ReplicaClient;
use crate::replicator::{DbShared, Replica, ReplicaOptions};
use crate::shadow::Shadow;
use crate::status::{
    DbState, DbStatus, DrillRun, DrillStatus, ReplicaReport, ReplicaStatus, VerifyStatus,
};
use crate::telemetry;

mod standby;

/// Everything needed to replicate one database.
#[derive(Debug, Clone)]
pub struct DbSpec {
    pub name: String,
    pub path: PathBuf,
    pub opts: DbOptions,
    pub replicas: Vec<(ReplicaOptions, ReplicaClient)>,
    /// `restore_on_start = "if-missing"`: restore the database before replicating it when the
    /// file is missing, retrying until the replicas answer (see [`restore_missing`]).
    pub restore_on_start: bool,
    /// Restore drills (scheduled when it has an interval; on request otherwise). None: this
    /// database cannot be drilled (built without its replicas' targets).
    pub drill: Option<DrillSpec>,
    /// `role = "standby"`: follow a replica into the database until promoted (see [`standby`]).
    pub standby: Option<StandbySpec>,
}

/// A standby's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StandbySpec {
    /// Index in `replicas` of the replica followed.
    pub replica: usize,
    pub poll_interval: Duration,
}

/// Requests a running worker accepts (the control socket and tests use them).
pub enum Command {
    /// Run a DB sync pass now; replies with the shadow position.
    Sync(oneshot::Sender<Result<Option<Pos>, String>>),
    /// Run a checkpoint now.
    Checkpoint(CheckpointMode, oneshot::Sender<Result<(), String>>),
    /// Every replica takes a snapshot now.
    Snapshot(oneshot::Sender<Result<(), String>>),
    /// Run a restore drill of every replica now; replies when it is done.
    Drill(oneshot::Sender<Result<Vec<DrillStatus>, String>>),
    /// Record verify results (replica index, result) for the status and the metrics.
    RecordVerify(Vec<(usize, VerifyStatus)>),
    /// A standby becomes the primary (`true`: take the lease from its holder at once);
    /// replies once it replicates, with what happened.
    Promote(bool, Reply<String>),
    /// A primary hands its replicas over to a standby (`litestreamd handoff`): everything
    /// uploaded, the leases released, then nothing more until a restart or a reload.
    Handoff(Reply<String>),
}

/// Where a command's answer goes.
type Reply<T> = oneshot::Sender<Result<T, String>>;

/// How long a handoff waits for every replica to upload what the database has.
const HANDOFF_WAIT: Duration = Duration::from_secs(60);

/// Live view of a running worker, and its command channel.
#[derive(Clone)]
pub struct WorkerHandle {
    /// Written by the worker only (see `status`).
    status: Arc<Mutex<DbStatus>>,
    commands: mpsc::Sender<Command>,
}

impl WorkerHandle {
    async fn request<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, String>>) -> Command,
    ) -> Result<T, String> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(make(tx))
            .await
            .map_err(|_| "worker stopped".to_string())?;
        rx.await.map_err(|_| "worker stopped".to_string())?
    }
    /// Copies committed frames into the shadow WAL now.
    pub async fn sync_now(&self) -> Result<Option<Pos>, String> {
        self.request(Command::Sync).await
    }
    pub async fn checkpoint(&self, mode: CheckpointMode) -> Result<(), String> {
        self.request(|tx| Command::Checkpoint(mode, tx)).await
    }
    /// Runs a restore drill of every replica now (after a drill already running, and one at
    /// a time in the process); the result for each replica, in order.
    pub async fn drill_now(&self) -> Result<Vec<DrillStatus>, String> {
        self.request(Command::Drill).await
    }
    /// Records the results of a verify run through the daemon (by replica index).
    pub async fn record_verify(&self, results: Vec<(usize, VerifyStatus)>) {
        let _ = self.commands.send(Command::RecordVerify(results)).await;
    }
    pub async fn snapshot_now(&self) -> Result<(), String> {
        self.request(Command::Snapshot).await
    }
    /// Promotes a standby (see `worker::standby`); `force` takes the replica's lease from a
    /// holder that may still live.
    pub async fn promote(&self, force: bool) -> Result<String, String> {
        self.request(|tx| Command::Promote(force, tx)).await
    }
    /// Hands a primary's replicas over to a standby (see [`Command::Handoff`]).
    pub async fn handoff(&self) -> Result<String, String> {
        self.request(Command::Handoff).await
    }
    /// Whether every replica has uploaded everything the shadow WAL holds.
    pub fn caught_up(&self) -> bool {
        let st = self.status();
        st.pos.is_some() && st.replicas.iter().all(|r| r.pos == st.pos)
    }

    pub fn status(&self) -> DbStatus {
        self.status.lock().expect("status").clone()
    }
    /// Reads the status in place, without a copy.
    pub fn with_status<R>(&self, f: impl FnOnce(&DbStatus) -> R) -> R {
        f(&self.status.lock().expect("status"))
    }
}

/// Starts the worker; it runs until `shutdown` is cancelled and its final sync is done.
pub fn spawn(
    spec: DbSpec,
    shutdown: CancellationToken,
) -> (WorkerHandle, tokio::task::JoinHandle<()>) {
    // Replica tasks report to the worker (a watch each, and a wake-up); the worker alone
    // writes the status.
    let wake = Arc::new(Notify::new());
    let (replicas, reports): (Vec<Replica>, Vec<watch::Receiver<ReplicaReport>>) = spec
        .replicas
        .iter()
        .map(|(o, c)| {
            Replica::new(
                o.clone(),
                c.clone(),
                &spec.path.to_string_lossy(),
                wake.clone(),
            )
        })
        .unzip();
    let (tx, rx) = mpsc::channel(16);
    let handle = WorkerHandle {
        status: Arc::new(Mutex::new(DbStatus {
            name: spec.name.clone(),
            path: spec.path.clone(),
            // Known before the task runs, so the daemon never sends READY=1 in between.
            state: if spec.restore_on_start && !spec.path.exists() {
                DbState::Restoring
            } else {
                DbState::Starting
            },
            replicas: spec
                .replicas
                .iter()
                .map(|(o, c)| ReplicaStatus::new(&o.name, c.kind(), &c.url()))
                .collect(),
            drill_interval: spec.drill.as_ref().and_then(|d| d.interval),
            ..Default::default()
        })),
        commands: tx,
    };
    let h = handle.clone();
    // The last drills are known from the start (a restart does not make a database look
    // undrilled, nor forget a failed drill).
    let mut drills = Drills::default();
    if let Some(d) = &spec.drill {
        let names: Vec<String> = d.replicas.iter().map(|r| r.name.clone()).collect();
        drills.last =
            crate::drill::load_history(&crate::drill::history_path(d, &spec.name), &names);
        let mut st = handle.status.lock().expect("status");
        for (rs, last) in st.replicas.iter_mut().zip(&drills.last) {
            rs.drill = last.clone();
        }
    }
    let reporting = Reporting {
        reports,
        meters: spec
            .replicas
            .iter()
            .map(|(_, c)| c.meter().clone())
            .collect(),
        wake,
        drills: Arc::new(Mutex::new(drills)),
    };
    let join = tokio::spawn(async move { run(spec, replicas, reporting, shutdown, h, rx).await });
    (handle, join)
}

/// What the replica tasks report, and the wake-up they send with every change.
struct Reporting {
    reports: Vec<watch::Receiver<ReplicaReport>>,
    /// Each replica's request counters (shared with its store and its drills).
    meters: Vec<Arc<crate::replica::meter::RequestMeter>>,
    wake: Arc<Notify>,
    drills: Arc<Mutex<Drills>>,
}

/// What the drill task reports: each replica's last drill, and the drill running.
#[derive(Default)]
struct Drills {
    last: Vec<Option<DrillStatus>>,
    running: Option<DrillRun>,
    /// Each replica's last verify run through the daemon.
    verify: Vec<Option<VerifyStatus>>,
}

async fn run(
    spec: DbSpec,
    replicas: Vec<Replica>,
    reporting: Reporting,
    shutdown: CancellationToken,
    handle: WorkerHandle,
    mut commands: mpsc::Receiver<Command>,
) {
    if spec.restore_on_start && !restore_phase(&spec, &handle, &shutdown, &mut commands).await {
        handle.status.lock().expect("status").state = DbState::Stopped;
        return;
    }
    // A standby follows until it is promoted; then, or if it was promoted before a restart,
    // it is replicated as a primary below.
    let mut promoted_reply = None;
    if let Some(sb) = &spec.standby {
        let all_rows = handle.status().replicas;
        match crate::standby::promoted(&spec.path) {
            Some(at) => {
                warn!(db = %spec.name, path = %spec.path.display(), "this standby was promoted before; replicating it as the primary (set role = \"primary\" in its file, or delete the database and its .NAME-promoted file to follow again)");
                let mut st = handle.status.lock().expect("status");
                st.standby.get_or_insert_with(Default::default).promoted_at = Some(at);
            }
            None => match standby::follow(&spec, sb, &handle, &shutdown, &mut commands).await {
                standby::Outcome::Stopped => {
                    handle.status.lock().expect("status").state = DbState::Stopped;
                    info!(db = %spec.name, "stopped");
                    return;
                }
                standby::Outcome::Promoted(reply) => {
                    promoted_reply = Some(reply);
                    // An old primary fenced by the promotion may still upload into its own
                    // generation until it reads its lease back (`lease::CONFIRM_EVERY`). A
                    // snapshot after that makes the promoted generation the newest object at
                    // the path, which is how a restore (ours and Litestream's) picks "latest"
                    // even if this database stays idle.
                    let h = handle.clone();
                    let stop = shutdown.clone();
                    tokio::spawn(async move {
                        tokio::select! {
                            _ = stop.cancelled() => {}
                            _ = tokio::time::sleep(crate::lease::CONFIRM_EVERY + Duration::from_secs(2)) => {
                                if let Err(e) = h.snapshot_now().await {
                                    warn!(error = %e, "the snapshot after the promotion failed; a restore of latest may pick the old primary's generation until this database writes again");
                                }
                            }
                        }
                    });
                }
            },
        }
        // The promotion time stays in `standby` (set above, or by the promotion).
        let mut st = handle.status.lock().expect("status");
        st.replicas = all_rows;
        st.state = DbState::Starting;
        st.last_error = None;
    }
    // A start slot (see `START_SLOTS`), held until every replica knows its position.
    let mut start_slot = tokio::select! {
        _ = shutdown.cancelled() => {
            handle.status.lock().expect("status").state = DbState::Stopped;
            return;
        }
        p = START_SLOTS.acquire() => Some(p.expect("never closed")),
    };
    let slot_taken = Instant::now();
    let db = Db::new(&spec.path, spec.opts.clone()).with_label(&spec.name);
    let shared = Arc::new(DbShared {
        shadow: db.shadow().clone(),
        db: Mutex::new(db),
        name: spec.name.clone(),
    });
    let (pos_tx, pos_rx) = watch::channel::<Option<Pos>>(None);
    let positions: Arc<Mutex<Vec<Option<Pos>>>> = Arc::new(Mutex::new(vec![None; replicas.len()]));
    let replica_stop = CancellationToken::new();
    let mut tasks = JoinSet::new();
    let mut snapshot_txs = Vec::new();
    for (i, r) in replicas.into_iter().enumerate() {
        let (stx, srx) = mpsc::channel(4);
        snapshot_txs.push(stx);
        tasks.spawn(replica_loop(
            r,
            shared.clone(),
            pos_rx.clone(),
            positions.clone(),
            i,
            replica_stop.clone(),
            srx,
        ));
    }

    let (drill_tx, drill_rx) = mpsc::channel(4);
    let drill_stop = CancellationToken::new();
    if let Some(d) = &spec.drill {
        tasks.spawn(drill_loop(
            d.clone(),
            shared.clone(),
            positions.clone(),
            reporting.drills.clone(),
            reporting.wake.clone(),
            drill_rx,
            drill_stop.clone(),
        ));
    }

    let interval = spec.opts.monitor_interval;
    let mut ps = PublishState {
        waiting_logged: false,
        syncs: 0,
        wal_bytes: 0,
        refreshed: None,
        last: None,
        caught_up_at: Vec::new(),
    };
    // Fixed-rate ticks (like Litestream's Go ticker): the period is the interval, not the
    // interval plus the time a pass takes, so a commit waits at most one interval.
    let mut next_tick = aligned_tick(Instant::now() + interval, interval);
    // A file renamed over the database, or deleted, wakes the loop at once (see `watch`).
    let file_watch = crate::watch::watch_file(&spec.path);
    let file_changed = || async {
        match &file_watch {
            Some(w) => w.changed().await,
            None => std::future::pending().await,
        }
    };
    // While the database is parked, its -wal's first write wakes the loop (see `Db::park`).
    let wal_path = shared.db.lock().expect("db lock").wal_path().to_path_buf();
    let mut wal_watch: Option<crate::watch::FileWatch> = None;
    // Whether the next turn of the loop starts with a sync pass: not after a replica's report,
    // which once restarted the loop with one, so every upload copied new frames into the shadow
    // and woke the replica to upload them: at 600 tx/s, 130 uploads a second instead of one.
    let mut pass = true;
    let mut handoff: Option<(Reply<String>, Option<Pos>)> = None;
    loop {
        if std::mem::replace(&mut pass, true) {
            let report = db_sync(&shared, &positions).await;
            if let Err(e) = &report
                && crate::fdlimit::exhausted(e)
            {
                // Out of descriptors: a database that cannot sync must not keep its own while
                // it waits, or the open ones that fail hold every descriptor and none that is
                // idle gets to park. It reopens at the next pass.
                let sh = shared.clone();
                let _ = tokio::task::spawn_blocking(move || sh.db.lock().expect("db lock").close())
                    .await;
            }
            record_sync(&spec, &handle, &pos_tx, &report, &mut ps);
            publish(&handle, &shared.shadow, &reporting, &mut ps);
            if let Some(reply) = promoted_reply.take() {
                let _ = reply.send(match &report {
                    Ok(r) => Ok(format!(
                        "promoted; replicating from {}",
                        r.pos.as_ref().map_or("-".into(), |p| p.to_string())
                    )),
                    Err(e) => Err(format!("promoted, but its first sync failed: {e}")),
                });
            }
            park_if_idle(&shared, &handle, &spec.name, &wal_path, &mut wal_watch).await;
            // Parked and watched (its -wal's writes and its name): the watches wake it, and
            // the tick is only a safety net for a lost event, so ten thousand parked
            // databases do not wake ten thousand times a second.
            if wal_watch.is_some() && file_watch.is_some() {
                next_tick = aligned_tick(Instant::now() + PARKED_TICK.max(interval), interval);
            } else if next_tick > Instant::now() + interval {
                next_tick = aligned_tick(Instant::now() + interval, interval);
            }
        }
        // Checked on every turn, a replica's report included: the next database starts as soon
        // as this one's first snapshot is up, not at its next tick.
        if start_slot.is_some()
            && (slot_taken.elapsed() >= START_SLOT_MAX
                || positions
                    .lock()
                    .expect("positions")
                    .iter()
                    .all(Option::is_some))
        {
            start_slot = None;
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            // A replica reported something (an upload, an error): publish it now, not at the
            // next tick, and without a sync pass.
            _ = reporting.wake.notified() => {
                publish(&handle, &shared.shadow, &reporting, &mut ps);
                pass = false;
                continue;
            }
            _ = sleep_until(next_tick) => {
                next_tick += interval;
                if next_tick <= Instant::now() {
                    // A pass overran a whole interval: skip the missed ticks.
                    next_tick = aligned_tick(Instant::now() + interval, interval);
                }
            }
            _ = file_changed() => {}
            _ = async { wal_watch.as_ref().expect("checked").changed().await }, if wal_watch.is_some() => {}
            Some(cmd) = commands.recv() => match cmd {
                Command::Sync(reply) => {
                    let report = db_sync(&shared, &positions).await;
                    // The status first: whoever asked reads it next (`caught_up`), and must not
                    // see the position from before this pass.
                    record_sync(&spec, &handle, &pos_tx, &report, &mut ps);
                    publish(&handle, &shared.shadow, &reporting, &mut ps);
                    let _ = reply.send(report.as_ref().map(|r| r.pos.clone()).map_err(Clone::clone));
                    pass = false;
                    continue;
                }
                Command::Checkpoint(mode, reply) => {
                    let sh = shared.clone();
                    let res = tokio::task::spawn_blocking(move || sh.db.lock().expect("db lock").checkpoint(mode).map(|_| ()))
                        .await
                        .map_err(|e| e.to_string())
                        .and_then(|r| r.map_err(|e| e.to_string()));
                    let _ = reply.send(res);
                }
                Command::Drill(reply) => {
                    if spec.drill.is_none() {
                        let _ = reply.send(Err("restore drills are not available for this database".into()));
                    } else if let Err(mpsc::error::TrySendError::Full(r) | mpsc::error::TrySendError::Closed(r)) = drill_tx.try_send(reply) {
                        let _ = r.send(Err("too many drills requested; try again later".into()));
                    }
                }
                Command::Promote(_, reply) => {
                    let _ = reply.send(Err("not a standby: this database is the primary".into()));
                }
                Command::Handoff(reply) => {
                    let report = db_sync(&shared, &positions).await;
                    record_sync(&spec, &handle, &pos_tx, &report, &mut ps);
                    publish(&handle, &shared.shadow, &reporting, &mut ps);
                    let target = match report {
                        Ok(r) if r.pos.is_some() => r.pos,
                        Ok(_) => {
                            let _ = reply.send(Err("the database file does not exist".into()));
                            continue;
                        }
                        Err(e) => {
                            let _ = reply.send(Err(format!("the last sync failed: {e}")));
                            continue;
                        }
                    };
                    info!(db = %spec.name, pos = ?target.as_ref().map(|p| p.to_string()), "handoff: waiting for every replica to upload everything");
                    let deadline = Instant::now() + HANDOFF_WAIT;
                    let uploaded = loop {
                        if positions.lock().expect("positions").iter().all(|p| *p == target) {
                            break true;
                        }
                        if Instant::now() >= deadline || shutdown.is_cancelled() {
                            break false;
                        }
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    };
                    publish(&handle, &shared.shadow, &reporting, &mut ps);
                    if !uploaded {
                        let _ = reply.send(Err(format!(
                            "not every replica uploaded everything within {}s (see `litestreamd status`); still the primary",
                            HANDOFF_WAIT.as_secs()
                        )));
                        continue;
                    }
                    handoff = Some((reply, target));
                    break;
                }
                Command::RecordVerify(results) => {
                    let mut d = reporting.drills.lock().expect("drills");
                    d.verify.resize(spec.replicas.len(), None);
                    for (i, mut v) in results {
                        if let Some(slot) = d.verify.get_mut(i) {
                            if v.last_success.is_none() {
                                v.last_success = slot.as_ref().and_then(|s| s.last_success);
                            }
                            *slot = Some(v);
                        }
                    }
                    drop(d);
                    publish(&handle, &shared.shadow, &reporting, &mut ps);
                }
                Command::Snapshot(reply) => {
                    let mut waits = Vec::new();
                    for tx in &snapshot_txs {
                        let (otx, orx) = oneshot::channel();
                        if tx.send(otx).await.is_ok() {
                            waits.push(orx);
                        }
                    }
                    tokio::spawn(async move {
                        let mut res = Ok(());
                        for w in waits {
                            if let Ok(Err(e)) = w.await {
                                res = Err(e);
                            }
                        }
                        let _ = reply.send(res);
                    });
                }
            },
        }
    }

    // Final sync: copy the last committed frames, then let every replica upload them.
    let report = db_sync(&shared, &positions).await;
    record_sync(&spec, &handle, &pos_tx, &report, &mut ps);
    publish(&handle, &shared.shadow, &reporting, &mut ps);
    replica_stop.cancel();
    drill_stop.cancel();
    while let Some(res) = tasks.join_next().await {
        if let Err(e) = res {
            error!(db = %spec.name, error = %e, "replica task panicked");
        }
    }
    let sh = shared.clone();
    let _ = tokio::task::spawn_blocking(move || sh.db.lock().expect("db lock").close()).await;
    publish(&handle, &shared.shadow, &reporting, &mut ps);
    handle.status.lock().expect("status").state = DbState::Stopped;
    if let Some((reply, target)) = handoff {
        // The final sync above found nothing new unless the application still writes.
        let last = handle.status().pos;
        let at = target.as_ref().map_or("-".into(), |p| p.to_string());
        if last != target {
            warn!(db = %spec.name, "the database changed during the handoff: the application still writes here");
            let _ = reply.send(Err(format!(
                "handed off at {at}, but the database changed after it (to {}): stop the application first; the standby does not have those writes",
                last.map_or("-".into(), |p| p.to_string())
            )));
        } else {
            info!(db = %spec.name, pos = %at, "handed off: every replica has everything, leases released; promote the standby now");
            let _ = reply.send(Ok(format!("handed off at {at}; leases released")));
        }
        handle.status.lock().expect("status").last_error = Some(format!(
            "handed off at {at}: not replicating until a restart or a reload"
        ));
        // Parked until shutdown: returning would look like a crash to the supervisor.
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                Some(cmd) = commands.recv() => refuse(cmd, "handed off to a standby; restart or reload to replicate here again"),
            }
        }
        return;
    }
    info!(db = %spec.name, "stopped");
}

/// `restore_on_start`: restores the missing database before it is replicated, retrying with
/// backoff for as long as it takes (the daemon decides whether to give up at start, see
/// `Supervisor::restoring`). Commands are answered with an error meanwhile. Returns false if
/// shutdown came first.
async fn restore_phase(
    spec: &DbSpec,
    handle: &WorkerHandle,
    shutdown: &CancellationToken,
    commands: &mut mpsc::Receiver<Command>,
) -> bool {
    let retry = spec
        .replicas
        .first()
        .map(|(o, _)| o.retry.clone())
        .unwrap_or_default();
    handle.status.lock().expect("status").state = DbState::Restoring;
    let mut attempt = 0;
    loop {
        let outcome = {
            let restore = restore_missing(spec);
            tokio::pin!(restore);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return false,
                    r = &mut restore => break r,
                    Some(cmd) = commands.recv() => refuse_while_restoring(cmd),
                }
            }
        };
        match outcome {
            Ok(()) => {
                let mut st = handle.status.lock().expect("status");
                st.state = DbState::Starting;
                st.last_error = None;
                return true;
            }
            Err(e) => {
                attempt += 1;
                let delay = retry.delay(attempt);
                warn!(db = %spec.name, attempt, retry_in = ?delay, error = %e, "restore_on_start: the replicas could not be read or the restore failed; the database is not started empty, retrying");
                handle.status.lock().expect("status").last_error =
                    Some(format!("restore_on_start: {e}"));
                let wait = tokio::time::sleep(delay);
                tokio::pin!(wait);
                loop {
                    tokio::select! {
                        _ = shutdown.cancelled() => return false,
                        _ = &mut wait => break,
                        Some(cmd) = commands.recv() => refuse_while_restoring(cmd),
                    }
                }
            }
        }
    }
}

fn refuse_while_restoring(cmd: Command) {
    refuse(cmd, "the database is being restored (restore_on_start)")
}

/// Answers a command the worker cannot run now with `why`.
fn refuse(cmd: Command, why: &str) {
    let msg = || why.to_string();
    match cmd {
        Command::Sync(r) => {
            let _ = r.send(Err(msg()));
        }
        Command::Checkpoint(_, r) | Command::Snapshot(r) => {
            let _ = r.send(Err(msg()));
        }
        Command::Drill(r) => {
            let _ = r.send(Err(msg()));
        }
        Command::Promote(_, r) | Command::Handoff(r) => {
            let _ = r.send(Err(msg()));
        }
        Command::RecordVerify(_) => {}
    }
}

/// Restores a missing database from its replicas. "No backup" (every replica answered and none
/// holds one) is success: the database starts empty. A replica that cannot be read, or a
/// restore that fails, is an error: retried, never taken as "no backup" (an empty database
/// would then become the newest backup over the real one).
pub async fn restore_missing(spec: &DbSpec) -> Result<(), crate::restore::RestoreError> {
    use crate::restore::{self, RestoreOptions, RestoreOutcome};
    if spec.path.exists() {
        return Ok(());
    }
    info!(db = %spec.name, path = %spec.path.display(), "database missing; restoring from its replicas before starting");
    let replicas: Vec<restore::NamedReplica> = spec
        .replicas
        .iter()
        .map(|(o, c)| (o.name.clone(), c.clone()))
        .collect();
    let mut opts = RestoreOptions::new(&spec.path);
    opts.if_replica_exists = true;
    opts.if_db_not_exists = true;
    opts.expect_lineage = Db::new(&spec.path, spec.opts.clone())
        .lineage()
        .ok()
        .flatten();
    opts.record_lineage = Some(Shadow::for_db(&spec.path, spec.opts.meta_path.as_deref()));
    match restore::restore(&replicas, &opts).await? {
        RestoreOutcome::Restored(s) => {
            info!(db = %spec.name, generation = %s.generation, bytes = s.bytes, lineage = s.lineage.as_ref().map_or("-", |o| o.lineage.as_str()), "restored on start")
        }
        RestoreOutcome::NoBackups => {
            warn!(db = %spec.name, "no replica holds a backup (every one answered); the database starts empty")
        }
        RestoreOutcome::SkippedExists => {}
    }
    Ok(())
}

/// Rounds a tick up onto a grid shared by every database of the process (multiples of a
/// quantum, at most 50 ms, since a fixed origin). A thousand idle databases then wake the
/// runtime a few dozen times a second, together, instead of a thousand times at scattered
/// instants; each wake-up costs far more than the idle check it runs. Only the first tick is
/// rounded (later ones add the interval, which keeps them on the grid when the interval is a
/// multiple of the quantum, as 1 s is), so the period stays exactly the interval.
fn aligned_tick(deadline: Instant, interval: Duration) -> Instant {
    static ORIGIN: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    let origin = *ORIGIN.get_or_init(Instant::now);
    let quantum = (interval / 4).clamp(Duration::from_millis(1), Duration::from_millis(50));
    let q = quantum.as_nanos();
    let since = deadline.saturating_duration_since(origin).as_nanos();
    origin + Duration::from_nanos((since.div_ceil(q) * q) as u64)
}

/// Databases in their first pass at once, process-wide: a database holds a slot from its
/// first sync pass until every replica knows its position (its first snapshot is up, or its
/// existing generation was found), or `START_SLOT_MAX`. A daemon that starts 10,000 databases
/// (READY=1 in under 2 s) otherwise opened all of them at once, waiting for the two snapshot
/// permits with their connections open, and the heap their interleaved allocations left behind
/// cost the idle daemon ~170 MiB and twice the CPU afterwards (docs/benchmarks.md).
static START_SLOTS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(64);
const START_SLOT_MAX: Duration = Duration::from_secs(10);

/// The tick of a parked database whose files are watched (see the loop in `run`).
const PARKED_TICK: Duration = Duration::from_secs(30);

/// Parks the database once it has been idle long enough (see `Db::park`), and keeps a watch
/// on its -wal's writes exactly while it is parked, and its status says whether it is.
async fn park_if_idle(
    shared: &Arc<DbShared>,
    handle: &WorkerHandle,
    name: &str,
    wal_path: &std::path::Path,
    wal_watch: &mut Option<crate::watch::FileWatch>,
) {
    let hurry = crate::fdlimit::scarce();
    let (due, mut parked) = match shared.db.try_lock() {
        Ok(db) => (db.park_due(hurry), db.is_parked()),
        Err(_) => return,
    };
    if due {
        // Watch first: a write between the park and the watch would go unnoticed until the
        // next tick.
        if wal_watch.is_none() {
            *wal_watch = crate::watch::watch_writes(wal_path);
        }
        let sh = shared.clone();
        match tokio::task::spawn_blocking(move || sh.db.lock().expect("db lock").park(hurry)).await
        {
            Ok(Ok(p)) => parked = p,
            Ok(Err(e)) => warn!(db = %name, error = %e, "parking the idle database failed"),
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(_) => {}
        }
    }
    handle.status.lock().expect("status").parked = parked;
    if parked != wal_watch.is_some() {
        *wal_watch = if parked {
            crate::watch::watch_writes(wal_path)
        } else {
            None
        };
    }
}

async fn db_sync(
    shared: &Arc<DbShared>,
    positions: &Arc<Mutex<Vec<Option<Pos>>>>,
) -> Result<SyncReport, String> {
    let min = min_position(&positions.lock().expect("positions"));
    // Idle databases are answered inline; only real work goes to a blocking thread.
    if let Ok(db) = shared.db.try_lock()
        && let Some(r) = db.unchanged(min.as_ref())
    {
        return Ok(r);
    }
    let sh = shared.clone();
    match tokio::task::spawn_blocking(move || sh.db.lock().expect("db lock").sync(min.as_ref()))
        .await
    {
        Ok(r) => r.map_err(|e| e.to_string()),
        // The database's state (and its mutex) cannot be trusted after a panic mid-sync: let
        // the worker die, so the supervisor restarts it from a fresh start (which re-verifies
        // the shadow WAL against the real one).
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(e) => Err(format!("sync task failed: {e}")),
    }
}

/// What `publish` remembers between ticks.
struct PublishState {
    waiting_logged: bool,
    /// Sync passes not yet added to the counter (added at each refresh).
    syncs: u64,
    /// Shadow bytes written since the last refresh of the metrics.
    wal_bytes: u64,
    /// When every series was last written (see `REFRESH`).
    refreshed: Option<std::time::Instant>,
    /// What the series showed when last written: the database's state and position and each
    /// replica's state, position, lag bytes and whether it lagged. Any change is written on the
    /// same tick, so `/metrics` and the control socket never disagree for longer than a tick.
    last: Option<PublishedKey>,
    /// When each replica last had everything the database has.
    caught_up_at: Vec<Option<SystemTime>>,
}

type PublishedKey = (
    DbState,
    Option<Pos>,
    Vec<(
        crate::status::ReplicaStateName,
        Option<Pos>,
        u64,
        bool,
        Option<SystemTime>,
        Option<SystemTime>,
        u64,
    )>,
    bool,
);

/// How often the series of an unchanged, caught-up database are rewritten: well inside the
/// exporter's idle timeout, and rare enough that a thousand idle databases cost nothing.
const REFRESH: Duration = Duration::from_secs(15);

/// The database's part of the status after a sync pass, and its counters.
fn record_sync(
    spec: &DbSpec,
    handle: &WorkerHandle,
    pos_tx: &watch::Sender<Option<Pos>>,
    report: &Result<SyncReport, String>,
    ps: &mut PublishState,
) {
    let mut st = handle.status.lock().expect("status");
    ps.syncs += 1;
    match report {
        Ok(r) if r.pos.is_none() => {
            if !ps.waiting_logged {
                info!(db = %spec.name, path = %spec.path.display(), "database file does not exist yet; waiting");
                ps.waiting_logged = true;
            }
            st.state = DbState::Waiting;
        }
        Ok(r) => {
            ps.waiting_logged = false;
            st.state = DbState::Replicating;
            st.pos = r.pos.clone();
            st.last_error = None;
            st.db_size = r.db_size;
            st.wal_size = r.wal_size;
            st.shadow_bytes = r.shadow_bytes;
            st.last_sync = Some(SystemTime::now());
            ps.wal_bytes += r.wal_bytes;
            pos_tx.send_if_modified(|cur| {
                let changed = *cur != r.pos;
                *cur = r.pos.clone();
                changed
            });
        }
        Err(e) => {
            if st.last_error.as_deref() != Some(e) {
                if crate::fdlimit::exhausted(e) {
                    tracing::debug!(db = %spec.name, error = %e, "database sync failed");
                } else {
                    error!(db = %spec.name, error = %e, "database sync failed");
                }
            }
            metrics::counter!(telemetry::DB_SYNC_ERRORS, "db" => spec.name.clone()).increment(1);
            st.state = DbState::Error;
            st.last_error = Some(e.clone());
        }
    }
}

/// Takes in what every replica reported, computes the lag (the only place it is computed),
/// and rewrites the metrics when anything they show changed (and at least every REFRESH).
fn publish(handle: &WorkerHandle, shadow: &Shadow, reporting: &Reporting, ps: &mut PublishState) {
    let mut st = handle.status.lock().expect("status");
    let now = SystemTime::now();
    let mut lagging = false;
    ps.caught_up_at.resize(st.replicas.len(), Some(now));
    let (dpos, shadow_bytes) = (st.pos.clone(), st.shadow_bytes);
    for (((rs, rx), caught), meter) in st
        .replicas
        .iter_mut()
        .zip(&reporting.reports)
        .zip(ps.caught_up_at.iter_mut())
        .zip(&reporting.meters)
    {
        rs.apply(&rx.borrow());
        rs.requests = meter.totals();
        rs.requests_per_month = meter.per_month();
        let caught_up = dpos.is_some() && rs.pos == dpos;
        lagging |= !caught_up && dpos.is_some();
        if caught_up || dpos.is_none() {
            *caught = Some(now);
        }
        rs.caught_up_at = *caught;
        rs.lag_seconds = caught
            .and_then(|t| now.duration_since(t).ok())
            .map_or(0.0, |d| d.as_secs_f64());
        rs.lag_bytes = match &dpos {
            Some(d) if !caught_up => shadow.bytes_between(rs.pos.as_ref(), d, shadow_bytes),
            _ => 0,
        };
    }
    {
        let d = reporting.drills.lock().expect("drills");
        for (rs, last) in st.replicas.iter_mut().zip(&d.last) {
            rs.drill = last.clone();
        }
        for (rs, v) in st.replicas.iter_mut().zip(&d.verify) {
            rs.verify = v.clone();
        }
        st.drill = d.running.clone();
    }
    let now_key: PublishedKey = (
        st.state,
        st.pos.clone(),
        st.replicas
            .iter()
            .map(|rs| {
                (
                    rs.state.name(),
                    rs.pos.clone(),
                    rs.lag_bytes,
                    rs.lag_seconds > 0.0,
                    rs.drill.as_ref().and_then(|d| d.finished_at),
                    rs.verify.as_ref().and_then(|v| v.finished_at),
                    rs.requests.total(),
                )
            })
            .collect(),
        st.drill.is_some(),
    );
    let due = ps.refreshed.is_none_or(|t| t.elapsed() >= REFRESH);
    if !(due || lagging || ps.last.as_ref() != Some(&now_key) || ps.wal_bytes > 0) {
        return;
    }
    ps.refreshed = Some(std::time::Instant::now());
    ps.last = Some(now_key);
    telemetry::publish_db(
        &st,
        std::mem::take(&mut ps.syncs),
        std::mem::take(&mut ps.wal_bytes),
    );
    // A promoted standby keeps its standby series (its promotion time among them).
    telemetry::publish_standby(&st);
}

/// Runs the database's restore drills: every `interval` (the first one interval after the
/// start, at most an hour), and on request. One drill at a time here, and in the process (see
/// `drill`); the results go to the worker, which publishes them.
async fn drill_loop(
    spec: DrillSpec,
    shared: Arc<DbShared>,
    positions: Arc<Mutex<Vec<Option<Pos>>>>,
    drills: Arc<Mutex<Drills>>,
    wake: Arc<Notify>,
    mut requests: mpsc::Receiver<oneshot::Sender<Result<Vec<DrillStatus>, String>>>,
    stop: CancellationToken,
) {
    let history = crate::drill::history_path(&spec, &shared.name);
    let names: Vec<String> = spec.replicas.iter().map(|r| r.name.clone()).collect();
    // The next drill is due one interval after the last one, whenever that was.
    let last_run = drills
        .lock()
        .expect("drills")
        .last
        .iter()
        .flatten()
        .filter_map(|d| d.finished_at)
        .max();
    // The first drill: when the last one saved is an interval old, but not before replication
    // has settled (a minute, or the interval if shorter) nor more than an hour after the start.
    let first = |i: Duration| {
        let since = last_run.and_then(|t| SystemTime::now().duration_since(t).ok());
        let wait = since.map_or(i, |s| i.saturating_sub(s));
        Instant::now()
            + wait
                .min(Duration::from_secs(3600))
                .max(i.min(Duration::from_secs(60)))
    };
    let mut next = spec.interval.map(first);
    let progress: Arc<Mutex<Option<DrillRun>>> = Arc::default();
    loop {
        let due = async {
            match next {
                Some(t) => sleep_until(t).await,
                None => std::future::pending().await,
            }
        };
        let reply = tokio::select! {
            _ = stop.cancelled() => return,
            _ = due => None,
            Some(r) = requests.recv() => Some(r),
        };
        let sh = shared.clone();
        let source =
            tokio::task::spawn_blocking(move || sh.db.lock().expect("db lock").drill_source())
                .await
                .map_err(|e| e.to_string())
                .and_then(|r| r.map_err(|e| e.to_string()));
        let results: Result<Vec<DrillStatus>, String> = match source {
            Ok(Some(src)) => {
                drills.lock().expect("drills").running = Some(DrillRun {
                    replica: None,
                    stage: "queued".into(),
                    done: 0,
                    total: 1,
                });
                wake.notify_one();
                let run = crate::drill::run(
                    shared.name.clone(),
                    src,
                    spec.clone(),
                    positions.clone(),
                    progress.clone(),
                );
                tokio::pin!(run);
                // Progress reaches the status every second while the drill runs.
                let mut tick = tokio::time::interval(Duration::from_secs(1));
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        r = &mut run => break Ok(r),
                        _ = tick.tick() => {
                            if let Some(p) = progress.lock().expect("drill progress").clone() {
                                drills.lock().expect("drills").running = Some(p);
                            }
                        }
                    }
                }
            }
            Ok(None) => Ok(crate::drill::not_run(
                spec.replicas.len(),
                "the database does not exist yet",
            )),
            Err(e) => Ok(crate::drill::not_run(
                spec.replicas.len(),
                &format!("cannot take the drill's position: {e}"),
            )),
        };
        {
            let mut d = drills.lock().expect("drills");
            d.running = None;
            if let Ok(results) = &results {
                d.last.resize(results.len(), None);
                for (slot, mut r) in d.last.iter_mut().zip(results.iter().cloned()) {
                    if r.last_success.is_none() {
                        r.last_success = slot.as_ref().and_then(|s| s.last_success);
                    }
                    *slot = Some(r);
                }
                crate::drill::save_history(&history, &names, &d.last);
            }
        }
        wake.notify_one();
        if let Some(reply) = reply {
            let results = results.map(|_| {
                drills
                    .lock()
                    .expect("drills")
                    .last
                    .iter()
                    .flatten()
                    .cloned()
                    .collect()
            });
            let _ = reply.send(results);
        }
        next = spec.interval.map(|i| Instant::now() + i);
    }
}

/// The lowest replica position, or None if any replica has none yet (then nothing is removed).
fn min_position(positions: &[Option<Pos>]) -> Option<Pos> {
    let all: Vec<&Pos> = positions
        .iter()
        .map(|p| p.as_ref())
        .collect::<Option<_>>()?;
    let first = all.first()?;
    if all.iter().any(|p| p.generation != first.generation) {
        return None;
    }
    all.into_iter().min_by_key(|p| (p.index, p.offset)).cloned()
}

async fn replica_loop(
    mut r: Replica,
    shared: Arc<DbShared>,
    mut pos_rx: watch::Receiver<Option<Pos>>,
    positions: Arc<Mutex<Vec<Option<Pos>>>>,
    slot: usize,
    stop: CancellationToken,
    mut snapshot_requests: mpsc::Receiver<oneshot::Sender<Result<(), String>>>,
) {
    let name = shared.name.clone();
    let sync_interval = r.opts.sync_interval;
    let mut last_attempt: Option<Instant> = None;
    let mut retry_at: Option<Instant> = None;
    let far = || Instant::now() + Duration::from_secs(365 * 24 * 3600);
    let mut retention = RetentionSchedule::new();
    let mut next_snapshot: Option<Instant> = None;

    loop {
        let dpos = pos_rx.borrow().clone();
        let behind = dpos.as_ref().is_some_and(|d| !r.caught_up(d));
        let wake = match (retry_at, behind) {
            (Some(t), _) => t,
            (None, true) => last_attempt.map_or_else(Instant::now, |t| t + sync_interval),
            (None, false) => far(),
        };
        let snapshot_due = next_snapshot.unwrap_or_else(far);
        let next_retention = retention.due(&r).unwrap_or_else(far);
        tokio::select! {
            _ = stop.cancelled() => {
                // Re-read the position: the worker's final DB sync ran after `dpos` was taken.
                let latest = pos_rx.borrow().clone();
                if latest.is_some_and(|d| !r.caught_up(&d)) || retry_at.is_some() {
                    let res = r.sync(&shared).await;
                    r.record(&name, &res);
                    if let Err(e) = res {
                        warn!(db = %name, replica = %r.opts.name, error = %e, "final replica sync failed; data stays in the shadow WAL for the next start");
                    }
                }
                break;
            }
            Some(reply) = snapshot_requests.recv() => {
                let res = r.snapshot(&shared).await.map(|_| ()).map_err(|e| e.to_string());
                let _ = reply.send(res);
            }
            changed = pos_rx.changed() => {
                if changed.is_err() { break; }
                continue;
            }
            _ = sleep_until(wake) => {
                // The scheduled instant, not the (slightly late) wake-up: otherwise each
                // attempt drifts ~1 ms behind the database's fixed-rate ticks and the lag
                // grows with it. After a pause longer than an interval, start afresh.
                let now = Instant::now();
                last_attempt = Some(if now.saturating_duration_since(wake) < sync_interval {
                    wake
                } else {
                    now
                });
                let res = r.sync(&shared).await;
                retry_at = r.record(&name, &res).map(|d| Instant::now() + d);
                if res.is_ok() && next_snapshot.is_none() && !r.opts.snapshot_interval.is_zero() {
                    next_snapshot = Some(first_snapshot_due(&r, dpos.as_ref()).await);
                }
            }
            _ = sleep_until(next_retention) => {
                let res = r.enforce_retention(&shared).await;
                r.record_retention(&name, &res);
                retention.ran(&r, res.ok());
            }
            _ = sleep_until(snapshot_due) => {
                next_snapshot = Some(Instant::now() + r.opts.snapshot_interval);
                if r.snapshot_is_current(pos_rx.borrow().as_ref()) {
                    tracing::debug!(db = %name, replica = %r.opts.name, "interval snapshot skipped: the database has not changed since the last one");
                    continue;
                }
                let res = r.snapshot(&shared).await.map(|_| ());
                if let Err(e) = &res {
                    warn!(db = %name, replica = %r.opts.name, error = %e, "interval snapshot failed");
                    next_snapshot = Some(Instant::now() + r.opts.retry.delay(1));
                }
            }
        }
        positions.lock().expect("positions")[slot] = r.pos().cloned();
    }
    positions.lock().expect("positions")[slot] = r.pos().cloned();
    r.release_lease().await;
}

/// When retention runs: every check interval while the replica writes (or after a failed
/// pass), and while it is idle only when a kept snapshot leaves the window, since until then a
/// pass would find nothing new to delete. An idle database makes no retention requests.
struct RetentionSchedule {
    last: Instant,
    /// When the next kept snapshot leaves the window (None: none does).
    change: Option<Instant>,
    /// The replica's writes at the last pass; None until a pass succeeded.
    writes: Option<u64>,
    /// Whether a pass ran.
    ran: bool,
}

impl RetentionSchedule {
    fn new() -> Self {
        RetentionSchedule {
            last: Instant::now(),
            change: None,
            writes: None,
            ran: false,
        }
    }

    fn due(&self, r: &Replica) -> Option<Instant> {
        if r.opts.append_only {
            // Keep-alive only: at the start, then when the newest snapshot reaches its age,
            // or a floor after a failed pass.
            return match (self.ran, self.writes) {
                (false, _) => Some(self.last),
                (true, Some(_)) => self.change,
                (true, None) => Some(self.last + Self::floor(r)),
            };
        }
        if r.opts.retention.is_zero() {
            return None;
        }
        let every = self.last + r.opts.retention_check_interval.min(r.opts.retention);
        if self.writes != Some(r.writes()) {
            return Some(self.change.map_or(every, |c| c.min(every)));
        }
        self.change
    }

    /// Object times come from the store's clock: a time already past (skew) waits a check
    /// interval (at most a minute; a quarter of an append-only replica's keep-alive) rather
    /// than running pass after pass.
    fn floor(r: &Replica) -> Duration {
        let floor = r.opts.retention_check_interval.min(Duration::from_secs(60));
        if r.opts.append_only {
            floor.min(r.opts.snapshot_keepalive / 4)
        } else {
            floor
        }
    }

    /// After a pass: `next_change` is what it returned (None when it failed).
    fn ran(&mut self, r: &Replica, next_change: Option<Option<SystemTime>>) {
        self.last = Instant::now();
        self.ran = true;
        self.writes = next_change.is_some().then(|| r.writes());
        let floor = Self::floor(r);
        self.change = next_change.flatten().map(|t| {
            let wait = t.duration_since(SystemTime::now()).unwrap_or_default();
            self.last + wait.max(floor)
        });
    }
}

/// When the first interval snapshot is due: the newest snapshot's age counts toward it.
async fn first_snapshot_due(r: &Replica, dpos: Option<&Pos>) -> Instant {
    let iv = r.opts.snapshot_interval;
    let Some(d) = dpos else {
        return Instant::now() + iv;
    };
    match r.newest_snapshot(&d.generation).await {
        Ok(Some(t)) => {
            let age = SystemTime::now().duration_since(t).unwrap_or_default();
            Instant::now() + iv.saturating_sub(age)
        }
        _ => Instant::now() + iv,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_share_a_grid_and_are_never_early() {
        let iv = Duration::from_secs(1);
        let base = Instant::now();
        let mut seen = std::collections::HashSet::new();
        for ms in (0..1000).step_by(7) {
            let deadline = base + Duration::from_millis(ms);
            let t = aligned_tick(deadline, iv);
            assert!(t >= deadline && t < deadline + Duration::from_millis(50));
            seen.insert(t);
        }
        // 143 scattered deadlines over a second land on at most 21 distinct instants.
        assert!(seen.len() <= 21, "{} distinct ticks", seen.len());
        // A fixed-rate successor of a grid tick is on the grid too.
        let t = aligned_tick(base, iv);
        assert_eq!(aligned_tick(t + iv, iv), t + iv);
    }
}
