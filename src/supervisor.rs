//! The supervisor: one worker per configured database, reloads that touch only what changed,
//! restarts of crashed workers, and the bounded final sync at shutdown.
//!
//! Like vector's topology reload, a reload is a pure diff of the new configuration against
//! the running one ([`diff`]): added databases start, removed ones stop after a final sync,
//! changed ones restart, unchanged ones are not touched (their connections and replica
//! positions stay). A database file that fails to parse or validate is reported and that
//! database keeps running on its last good configuration.
//!
//! Nothing here waits on a worker: the loop that pings systemd's watchdog only ever calls
//! quick methods. Workers stop in the background, all at once, each bounded by
//! `shutdown_timeout`; a new or restarted worker is prepared by a background task (it waits
//! for its predecessor to finish its final sync, then builds the replica clients, which may
//! look up credentials) and handed back through [`Supervisor::next_prepared`] to be started.
//! `restore_on_start` runs inside the worker, in its own task.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::config::{Config, ConfigError, DbConfig, Defaults, MainConfig};
use crate::status::{DbState, DbStatus, ReplicaStateName};
use crate::telemetry;
use crate::worker::{self, DbSpec, WorkerHandle};

/// What the control socket can see of a running database.
#[derive(Clone)]
pub struct DbEntry {
    pub handle: WorkerHandle,
    pub spec: DbSpec,
}

/// The running databases, kept current by the supervisor.
pub type Registry = Arc<RwLock<BTreeMap<String, DbEntry>>>;

/// A database's configuration as the supervisor compares it: its file and the defaults that
/// applied (None for a database given as a spec, `litestreamd replicate`).
type Wanted = Option<(DbConfig, Defaults)>;

struct Running {
    cfg: Wanted,
    spec: DbSpec,
    started: Instant,
    handle: WorkerHandle,
    join: JoinHandle<()>,
    cancel: CancellationToken,
}

/// A worker prepared in the background (or why it could not be), see [`Supervisor::next_prepared`].
pub struct Prepared {
    name: String,
    seq: u64,
    cfg: Wanted,
    spec: Result<DbSpec, ConfigError>,
}

/// What a reload did.
#[derive(Debug, Default, Clone, PartialEq, serde::Serialize)]
pub struct ReloadReport {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub restarted: Vec<String>,
    pub unchanged: Vec<String>,
    /// Errors, each naming its file; the databases involved keep their last good config.
    pub errors: Vec<String>,
}

impl ReloadReport {
    pub fn ok(&self) -> bool {
        self.errors.is_empty()
    }
}

/// What a new configuration changes, computed without touching anything (see [`diff`]).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Diff {
    pub add: Vec<String>,
    pub remove: Vec<String>,
    pub restart: Vec<String>,
    pub unchanged: Vec<String>,
}

/// The reload diff: `current` is what runs (or is being prepared), by name. A database whose
/// file is broken is not a removal: it keeps running on its last good configuration (and is
/// "unchanged"); if it did not run, it is not started.
pub fn diff(current: &BTreeMap<String, Wanted>, cfg: &Config) -> Diff {
    let mut d = Diff::default();
    for name in current.keys() {
        if !cfg.dbs.contains_key(name) && !cfg.errors.contains_key(name) {
            d.remove.push(name.clone());
        }
    }
    for (name, db) in &cfg.dbs {
        let wanted = Some((db.clone(), cfg.main.defaults.clone()));
        match current.get(name) {
            Some(w) if *w == wanted => d.unchanged.push(name.clone()),
            Some(_) => d.restart.push(name.clone()),
            None => d.add.push(name.clone()),
        }
    }
    for name in cfg.errors.keys() {
        if current.contains_key(name) {
            d.unchanged.push(name.clone());
        }
    }
    d.unchanged.sort();
    d
}

/// A database whose worker is still restoring it (see [`Supervisor::restoring`]).
#[derive(Debug, Clone)]
pub struct Restoring {
    pub name: String,
    pub elapsed: Duration,
    pub timeout: Option<Duration>,
    pub last_error: Option<String>,
}

/// A database being prepared: its configuration, the preparation's sequence number (a later
/// reload supersedes it) and the task.
struct Preparing {
    cfg: Wanted,
    seq: u64,
    task: JoinHandle<()>,
}

pub struct Supervisor {
    /// None when the databases were given as specs (`litestreamd replicate`): no reloads.
    config_path: Option<PathBuf>,
    main: MainConfig,
    running: BTreeMap<String, Running>,
    preparing: BTreeMap<String, Preparing>,
    prepared_tx: mpsc::UnboundedSender<Prepared>,
    prepared_rx: mpsc::UnboundedReceiver<Prepared>,
    seq: u64,
    /// Workers told to stop, finishing their final sync in the background.
    stopping: Vec<JoinHandle<()>>,
    /// Databases whose worker died (a panic), with when: restarted after a pause.
    crashed: BTreeMap<String, (Instant, Wanted, DbSpec)>,
    /// Preparations that failed (building the replica clients): prepared again after a pause.
    failed: BTreeMap<String, (Instant, Wanted)>,
    shutdown: CancellationToken,
    /// What the control socket sees.
    registry: Registry,
    /// Errors of the last reload, for the status line.
    last_reload_errors: usize,
}

impl Supervisor {
    fn empty(config_path: Option<PathBuf>, main: MainConfig, shutdown: CancellationToken) -> Self {
        let (prepared_tx, prepared_rx) = mpsc::unbounded_channel();
        Supervisor {
            config_path,
            main,
            running: BTreeMap::new(),
            preparing: BTreeMap::new(),
            prepared_tx,
            prepared_rx,
            seq: 0,
            stopping: Vec::new(),
            crashed: BTreeMap::new(),
            failed: BTreeMap::new(),
            shutdown,
            registry: Registry::default(),
            last_reload_errors: 0,
        }
    }

    /// Loads the configuration and prepares every database (see [`Supervisor::next_prepared`]
    /// and [`Supervisor::starting`]). A broken main file is an error; broken database files are
    /// reported.
    pub fn start(
        config_path: &Path,
        shutdown: CancellationToken,
    ) -> Result<(Self, ReloadReport), ConfigError> {
        let cfg = Config::load(config_path)?;
        let mut sup =
            Supervisor::empty(Some(config_path.to_path_buf()), cfg.main.clone(), shutdown);
        let report = sup.apply(cfg);
        Ok((sup, report))
    }

    /// Runs the given databases (no configuration file: `litestreamd replicate`), with the
    /// same final sync bound as the daemon.
    pub fn for_specs(
        specs: Vec<DbSpec>,
        shutdown_timeout: Duration,
        shutdown: CancellationToken,
    ) -> Self {
        let main = MainConfig {
            shutdown_timeout,
            ..MainConfig::default()
        };
        let mut sup = Supervisor::empty(None, main, shutdown);
        for spec in specs {
            sup.spawn(spec.name.clone(), None, spec);
        }
        sup
    }

    pub fn main_config(&self) -> &MainConfig {
        &self.main
    }

    /// The running databases, for the control socket.
    pub fn registry(&self) -> Registry {
        self.registry.clone()
    }

    /// Re-reads the configuration and applies the difference, without waiting for anything.
    pub fn reload(&mut self) -> ReloadReport {
        let Some(path) = self.config_path.clone() else {
            return ReloadReport {
                errors: vec!["no configuration file to reload".into()],
                ..Default::default()
            };
        };
        let report = match Config::load(&path) {
            Ok(cfg) => {
                self.main = cfg.main.clone();
                self.apply(cfg)
            }
            Err(e) => {
                error!(error = %e, "configuration rejected; every database keeps running on its last good config");
                ReloadReport {
                    errors: vec![e.to_string()],
                    unchanged: self.current().into_keys().collect(),
                    ..Default::default()
                }
            }
        };
        self.last_reload_errors = report.errors.len();
        record_reload(&report);
        report
    }

    /// What runs or is being prepared, by name, as [`diff`] compares it.
    fn current(&self) -> BTreeMap<String, Wanted> {
        let mut m: BTreeMap<String, Wanted> = self
            .running
            .iter()
            .map(|(n, r)| (n.clone(), r.cfg.clone()))
            .collect();
        for (n, p) in &self.preparing {
            m.insert(n.clone(), p.cfg.clone());
        }
        for (n, (_, cfg, _)) in &self.crashed {
            m.entry(n.clone()).or_insert_with(|| cfg.clone());
        }
        for (n, (_, cfg)) in &self.failed {
            m.entry(n.clone()).or_insert_with(|| cfg.clone());
        }
        m
    }

    fn apply(&mut self, cfg: Config) -> ReloadReport {
        let mut report = ReloadReport::default();
        for w in &cfg.warnings {
            warn!("{w}");
        }
        let current = self.current();
        for (name, errs) in &cfg.errors {
            let keeps = if current.contains_key(name) {
                "; it keeps running on its last good config"
            } else {
                "; it is not started"
            };
            for e in errs {
                error!(db = %name, error = %e, "invalid database configuration{keeps}");
                report.errors.push(e.to_string());
            }
        }
        crate::fdlimit::check_budget(cfg.dbs.len());
        let d = diff(&current, &cfg);
        for name in &d.remove {
            info!(db = %name, "removed from the configuration; stopping after a final sync");
            self.crashed.remove(name);
            self.failed.remove(name);
            self.preparing.remove(name);
            if let Some(old) = self.stop(name) {
                self.stopping.push(old);
            }
        }
        for name in d.add.iter().chain(&d.restart) {
            if d.restart.contains(name) {
                info!(db = %name, "configuration changed; restarting its worker");
            }
            let db = cfg.dbs.get(name).expect("in the diff");
            let wanted = Some((db.clone(), cfg.main.defaults.clone()));
            self.crashed.remove(name);
            self.failed.remove(name);
            let predecessor = self
                .stop(name)
                .or_else(|| self.preparing.remove(name).map(|p| p.task));
            self.prepare(name.clone(), wanted, predecessor);
        }
        report.added = d.add;
        report.removed = d.remove;
        report.restarted = d.restart;
        report.unchanged = d.unchanged;
        report
    }

    /// Tells a running worker to stop (a final sync); returns a task that ends when it has,
    /// bounded by `shutdown_timeout` (the worker is aborted then).
    fn stop(&mut self, name: &str) -> Option<JoinHandle<()>> {
        self.registry.write().expect("registry").remove(name);
        let r = self.running.remove(name)?;
        r.cancel.cancel();
        let (limit, name) = (self.main.shutdown_timeout, name.to_string());
        let mut join = r.join;
        Some(tokio::spawn(async move {
            if tokio::time::timeout(limit, &mut join).await.is_err() {
                warn!(db = %name, "final sync did not finish within shutdown_timeout; aborting its worker");
                join.abort();
                let _ = join.await;
            }
        }))
    }

    /// Prepares a worker in the background: waits for `predecessor` (the same database's
    /// stopping worker or earlier preparation), then builds its spec.
    fn prepare(&mut self, name: String, cfg: Wanted, predecessor: Option<JoinHandle<()>>) {
        self.seq += 1;
        let (seq, tx) = (self.seq, self.prepared_tx.clone());
        let file = self.main.dbs_dir.join(format!("{name}.toml"));
        let (n, c) = (name.clone(), cfg.clone());
        let task = tokio::spawn(async move {
            if let Some(p) = predecessor {
                let _ = p.await;
            }
            let spec = match &c {
                Some((db, defaults)) => crate::config::resolve_db(&n, db, defaults, &file).await,
                None => unreachable!("specs are spawned directly"),
            };
            let _ = tx.send(Prepared {
                name: n,
                seq,
                cfg: c,
                spec,
            });
        });
        self.preparing.insert(name, Preparing { cfg, seq, task });
    }

    /// The next prepared worker, for the main loop's `select!` (pending forever when none is
    /// being prepared).
    pub async fn next_prepared(&mut self) -> Prepared {
        self.prepared_rx
            .recv()
            .await
            .expect("the supervisor holds a sender")
    }

    /// Starts a prepared worker, unless a later reload superseded it. A spec that could not be
    /// built (its replica clients) is retried like a crashed worker.
    pub fn start_prepared(&mut self, p: Prepared) {
        if self.preparing.get(&p.name).is_none_or(|x| x.seq != p.seq) {
            return;
        }
        self.preparing.remove(&p.name);
        match p.spec {
            Ok(spec) => self.spawn(p.name, p.cfg, spec),
            Err(e) => {
                // Prepared again after a pause (check_workers).
                error!(db = %p.name, error = %e, "cannot start the database's worker; retrying in 5s");
                self.failed.insert(p.name, (Instant::now(), p.cfg));
            }
        }
    }

    /// A prepared worker if one is waiting (see [`Supervisor::next_prepared`]).
    pub fn try_next_prepared(&mut self) -> Option<Prepared> {
        self.prepared_rx.try_recv().ok()
    }

    /// Databases still being prepared (at start: not yet running).
    pub fn starting(&self) -> usize {
        self.preparing.len()
    }

    fn spawn(&mut self, name: String, cfg: Wanted, spec: DbSpec) {
        let cancel = self.shutdown.child_token();
        let (handle, join) = worker::spawn(spec.clone(), cancel.clone());
        self.registry.write().expect("registry").insert(
            name.clone(),
            DbEntry {
                handle: handle.clone(),
                spec: spec.clone(),
            },
        );
        self.crashed.remove(&name);
        self.running.insert(
            name,
            Running {
                cfg,
                spec,
                started: Instant::now(),
                handle,
                join,
                cancel,
            },
        );
    }

    /// Workers that died (a panic): their names, and they are restarted after a pause so one
    /// bad database cannot spin. Quick: nothing is awaited.
    pub fn check_workers(&mut self) -> Vec<String> {
        let dead: Vec<String> = self
            .running
            .iter()
            .filter(|(_, r)| r.join.is_finished())
            .map(|(n, _)| n.clone())
            .collect();
        for name in &dead {
            let r = self.running.remove(name).expect("listed");
            self.registry.write().expect("registry").remove(name);
            error!(db = %name, "worker stopped unexpectedly (a panic?); restarting it in 5s");
            self.crashed
                .insert(name.clone(), (Instant::now(), r.cfg, r.spec));
        }
        let due: Vec<String> = self
            .crashed
            .iter()
            .filter(|(_, (t, _, _))| t.elapsed() >= Duration::from_secs(5))
            .map(|(n, _)| n.clone())
            .collect();
        for name in due {
            let (_, cfg, spec) = self.crashed.remove(&name).expect("listed");
            self.spawn(name, cfg, spec);
        }
        let again: Vec<String> = self
            .failed
            .iter()
            .filter(|(_, (t, _))| t.elapsed() >= Duration::from_secs(5))
            .map(|(n, _)| n.clone())
            .collect();
        for name in again {
            let (_, cfg) = self.failed.remove(&name).expect("listed");
            self.prepare(name, cfg, None);
        }
        dead
    }

    /// Databases whose worker is still restoring them (restore_on_start): name, how long it
    /// has been trying, its configured give-up (None: no limit) and its last error.
    pub fn restoring(&self) -> Vec<Restoring> {
        // Read in place (one lock, nothing cloned unless restoring): this runs for every worker
        // started while the daemon starts, and a clone of every status each time made a start
        // of 10,000 databases quadratic (102 s to READY=1).
        self.running
            .iter()
            .filter_map(|(n, r)| {
                r.handle.with_status(|st| {
                    (st.state == DbState::Restoring).then(|| Restoring {
                        name: n.clone(),
                        elapsed: r.started.elapsed(),
                        timeout: r
                            .cfg
                            .as_ref()
                            .and_then(|(c, _)| c.restore_on_start_timeout)
                            .filter(|t| !t.is_zero()),
                        last_error: st.last_error.clone(),
                    })
                })
            })
            .collect()
    }

    pub fn statuses(&self) -> Vec<DbStatus> {
        // (Not for the per-second summary: see `summary`.)
        self.running.values().map(|r| r.handle.status()).collect()
    }

    /// One line for systemd's STATUS=, e.g. "replicating 12 databases; 1 retrying", derived
    /// from the state each time (the last reload's errors included).
    pub fn summary(&self) -> String {
        // Counted in place, one pass and no allocation per database: this runs every second,
        // and cloning every status (then collecting each one's replica states) for it was most
        // of an idle daemon's CPU at 10,000 databases.
        let mut t = Tally::default();
        for r in self.running.values() {
            r.handle.with_status(|s| t.add(s));
        }
        let by_state = &t.by_state;
        for state in DbState::ALL {
            metrics::gauge!(telemetry::DATABASES, "state" => state.as_str())
                .set(*by_state.get(state).unwrap_or(&0) as f64);
        }
        metrics::gauge!(telemetry::DATABASES_PARKED).set(t.parked as f64);
        let (retrying, failed, conflict) = (t.retrying, t.failed, t.conflict);
        // Databases being prepared (added or restarted by a reload) count as configured.
        let n = self.running.len() + self.preparing.len();
        let mut parts = vec![format!(
            "replicating {n} database{}",
            if n == 1 { "" } else { "s" }
        )];
        if !self.preparing.is_empty() {
            parts.push(format!("{} starting", self.preparing.len()));
        }
        if let Some(n) = by_state.get(&DbState::Restoring) {
            parts.push(format!("{n} restoring"));
        }
        if let Some(n) = by_state.get(&DbState::Following) {
            parts.push(format!(
                "{n} standby following (lag {:.1}s at most)",
                t.standby_lag
            ));
        }
        if let Some(n) = by_state.get(&DbState::Bootstrapping) {
            parts.push(format!("{n} standby bootstrapping"));
        }
        if t.promoted > 0 {
            parts.push(format!(
                "{} promoted from standby (set role = \"primary\" in its file)",
                t.promoted
            ));
        }
        if let Some(n) = by_state.get(&DbState::Waiting) {
            parts.push(format!("{n} waiting for their file"));
        }
        if let Some(n) = by_state.get(&DbState::Error) {
            parts.push(format!("{n} in error"));
        }
        if retrying > 0 {
            parts.push(format!("{retrying} retrying"));
        }
        if failed > 0 {
            parts.push(format!("{failed} failing"));
        }
        let drills_failed = t.drill_failed;
        if drills_failed > 0 {
            parts.push(format!("{drills_failed} with a failed restore drill"));
        }
        if conflict > 0 {
            parts.push(format!(
                "{conflict} blocked (another replicator's lease or another database's path)"
            ));
        }
        if self.last_reload_errors > 0 {
            parts.push(format!(
                "last reload had {} error(s)",
                self.last_reload_errors
            ));
        }
        parts.join("; ")
    }

    /// Stops every worker with a final sync, all at once. `progress` is called about every
    /// second while workers are still flushing (to extend systemd's stop timeout). Returns
    /// false if the deadline passed and some workers were aborted.
    pub async fn shutdown(mut self, progress: impl Fn()) -> bool {
        self.shutdown.cancel();
        let deadline = Instant::now() + self.main.shutdown_timeout;
        for p in std::mem::take(&mut self.preparing).into_values() {
            p.task.abort();
        }
        let mut joins: Vec<(String, JoinHandle<()>)> = std::mem::take(&mut self.running)
            .into_iter()
            .map(|(n, r)| (n, r.join))
            .collect();
        joins.extend(
            std::mem::take(&mut self.stopping)
                .into_iter()
                .map(|j| ("(stopping)".to_string(), j)),
        );
        let mut last_progress = Instant::now() - Duration::from_secs(1);
        loop {
            joins.retain(|(_, j)| !j.is_finished());
            if joins.is_empty() {
                return true;
            }
            if Instant::now() >= deadline {
                for (name, j) in &joins {
                    error!(db = %name, "final sync did not finish before shutdown_timeout; aborting");
                    j.abort();
                }
                return false;
            }
            if last_progress.elapsed() >= Duration::from_secs(1) {
                progress();
                last_progress = Instant::now();
            }
            tokio::time::sleep(Duration::from_millis(100).min(deadline - Instant::now())).await;
        }
    }
}

fn record_reload(report: &ReloadReport) {
    let result = if report.ok() { "ok" } else { "failed" };
    metrics::counter!(telemetry::RELOADS, "result" => result).increment(1);
    metrics::gauge!(telemetry::RELOAD_OK).set(if report.ok() { 1.0 } else { 0.0 });
}

/// The STATUS= line's counts (see `Supervisor::summary`): databases by state, and databases
/// with at least one replica retrying, failing or blocked, or with a failed drill.
#[derive(Default)]
struct Tally {
    by_state: BTreeMap<DbState, usize>,
    retrying: usize,
    failed: usize,
    conflict: usize,
    drill_failed: usize,
    parked: usize,
    /// The largest lag among standbys (their followed replica's row).
    standby_lag: f64,
    /// Standbys promoted to primary whose file still says standby.
    promoted: usize,
}

impl Tally {
    fn add(&mut self, s: &DbStatus) {
        *self.by_state.entry(s.state).or_default() += 1;
        self.parked += usize::from(s.parked);
        self.promoted += usize::from(
            s.standby
                .as_ref()
                .is_some_and(|sb| sb.promoted_at.is_some()),
        );
        if s.state == DbState::Following {
            for r in &s.replicas {
                self.standby_lag = self.standby_lag.max(r.lag_seconds);
            }
        }
        let any = |name: ReplicaStateName| s.replicas.iter().any(|r| r.state.name() == name);
        self.retrying += usize::from(any(ReplicaStateName::Retrying));
        self.failed += usize::from(any(ReplicaStateName::Failed));
        self.conflict += usize::from(any(ReplicaStateName::Conflict));
        self.drill_failed += usize::from(s.replicas.iter().any(|r| {
            r.drill
                .as_ref()
                .is_some_and(|d| d.result == crate::status::DrillResult::Failed)
        }));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(dbs: &[(&str, &str)], broken: &[&str]) -> Config {
        let mut c = Config {
            path: PathBuf::new(),
            main: MainConfig::default(),
            dbs: BTreeMap::new(),
            errors: BTreeMap::new(),
            warnings: Vec::new(),
        };
        for (n, p) in dbs {
            c.dbs.insert(
                n.to_string(),
                DbConfig {
                    path: PathBuf::from(p),
                    ..Default::default()
                },
            );
        }
        for n in broken {
            c.errors.insert(n.to_string(), Vec::new());
        }
        c
    }

    fn running(c: &Config) -> BTreeMap<String, Wanted> {
        c.dbs
            .iter()
            .map(|(n, d)| (n.clone(), Some((d.clone(), c.main.defaults.clone()))))
            .collect()
    }

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn reload_diff_adds_removes_restarts_and_keeps_broken_files_running() {
        let now = running(&config(
            &[("a", "/a"), ("b", "/b"), ("c", "/c"), ("d", "/d")],
            &[],
        ));
        // a unchanged, b changed, c removed, d's file broken (keeps running), e added, f's
        // file broken and new (not started).
        let next = config(&[("a", "/a"), ("b", "/b2"), ("e", "/e")], &["d", "f"]);
        assert_eq!(
            diff(&now, &next),
            Diff {
                add: names(&["e"]),
                remove: names(&["c"]),
                restart: names(&["b"]),
                unchanged: names(&["a", "d"]),
            }
        );
        // Nothing changed: nothing happens.
        let same = config(&[("a", "/a"), ("b", "/b"), ("c", "/c"), ("d", "/d")], &[]);
        let d = diff(&now, &same);
        assert!(d.add.is_empty() && d.remove.is_empty() && d.restart.is_empty());
        assert_eq!(d.unchanged.len(), 4);
        // Changed defaults restart every database they apply to.
        let mut defaults = config(&[("a", "/a"), ("b", "/b")], &[]);
        defaults.main.defaults.sync_interval = Duration::from_secs(7);
        let d = diff(
            &running(&config(&[("a", "/a"), ("b", "/b")], &[])),
            &defaults,
        );
        assert_eq!(d.restart, names(&["a", "b"]));
        // A database given as a spec (no file) is never "unchanged" against a file.
        let mut spec = BTreeMap::new();
        spec.insert("a".to_string(), None);
        assert_eq!(
            diff(&spec, &config(&[("a", "/a")], &[])).restart,
            names(&["a"])
        );
    }
}
