//! The supervisor: one worker per configured database, reloads that touch only what changed,
//! restarts of crashed workers, `restore_on_start`, and the bounded final sync at shutdown.
//!
//! Like vector's topology reload, a reload diffs the new configuration against the running one:
//! added databases start, removed ones stop after a final sync, changed ones restart, unchanged
//! ones are not touched (their connections and replica positions stay). A database file that
//! fails to parse or validate is reported and that database keeps running on its last good
//! configuration.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::config::{Config, ConfigError, DbConfig, Defaults};
use crate::control::server::{DbEntry, Registry};
use crate::telemetry;
use crate::worker::{self, DbSpec, DbStatus, WorkerHandle};

struct Running {
    /// The configuration it runs with (file + the defaults that applied).
    cfg: (DbConfig, Defaults),
    started: Instant,
    handle: WorkerHandle,
    join: tokio::task::JoinHandle<()>,
    cancel: CancellationToken,
}

/// A database its worker is restoring (see [`Supervisor::restoring`]).
#[derive(Debug, Clone)]
pub struct Restoring {
    pub name: String,
    pub elapsed: Duration,
    pub timeout: Option<Duration>,
    pub last_error: Option<String>,
}

/// What a reload did.
#[derive(Debug, Default, Clone, serde::Serialize)]
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

pub struct Supervisor {
    config_path: PathBuf,
    main: crate::config::MainConfig,
    running: BTreeMap<String, Running>,
    /// Databases whose worker died (a panic), with when and their config: restarted after a
    /// pause.
    crashed: BTreeMap<String, (Instant, (DbConfig, Defaults))>,
    shutdown: CancellationToken,
    /// What the control socket sees.
    registry: Registry,
}

impl Supervisor {
    /// Loads the configuration and starts every database (restoring missing ones first when
    /// configured to). A broken main file is an error; broken database files are reported.
    pub async fn start(
        config_path: &Path,
        shutdown: CancellationToken,
    ) -> Result<(Self, ReloadReport), ConfigError> {
        let cfg = Config::load(config_path)?;
        let mut sup = Supervisor {
            config_path: config_path.to_path_buf(),
            main: cfg.main.clone(),
            running: BTreeMap::new(),
            crashed: BTreeMap::new(),
            shutdown,
            registry: Registry::default(),
        };
        let report = sup.apply(cfg).await;
        Ok((sup, report))
    }

    pub fn main_config(&self) -> &crate::config::MainConfig {
        &self.main
    }

    /// The running databases, for the control socket.
    pub fn registry(&self) -> Registry {
        self.registry.clone()
    }

    /// Re-reads the configuration directory and applies the difference.
    pub async fn reload(&mut self) -> ReloadReport {
        match Config::load(&self.config_path) {
            Ok(cfg) => {
                self.main = cfg.main.clone();
                self.apply(cfg).await
            }
            Err(e) => {
                error!(error = %e, "configuration rejected; every database keeps running on its last good config");
                let report = ReloadReport {
                    errors: vec![e.to_string()],
                    unchanged: self.running.keys().cloned().collect(),
                    ..Default::default()
                };
                record_reload(&report);
                report
            }
        }
    }

    async fn apply(&mut self, cfg: Config) -> ReloadReport {
        let mut report = ReloadReport::default();
        for w in &cfg.warnings {
            warn!("{w}");
        }
        for (name, errs) in &cfg.errors {
            let keeps = if self.running.contains_key(name) {
                "; it keeps running on its last good config"
            } else {
                "; it is not started"
            };
            for e in errs {
                error!(db = %name, error = %e, "invalid database configuration{keeps}");
                report.errors.push(e.to_string());
            }
        }
        // Removed: no file any more (a broken file is not a removal).
        let gone: Vec<String> = self
            .running
            .keys()
            .filter(|n| !cfg.dbs.contains_key(*n) && !cfg.errors.contains_key(*n))
            .cloned()
            .collect();
        for name in gone {
            info!(db = %name, "removed from the configuration; stopping after a final sync");
            self.stop(&name).await;
            report.removed.push(name);
        }
        for (name, db) in &cfg.dbs {
            let wanted = (db.clone(), cfg.main.defaults.clone());
            match self.running.get(name) {
                Some(r) if r.cfg == wanted => {
                    report.unchanged.push(name.clone());
                    continue;
                }
                Some(_) => {
                    info!(db = %name, "configuration changed; restarting its worker");
                    self.stop(name).await;
                    report.restarted.push(name.clone());
                }
                None => report.added.push(name.clone()),
            }
            let spec = match cfg.resolve(name, db).await {
                Ok(s) => s,
                Err(e) => {
                    report.errors.push(e.to_string());
                    continue;
                }
            };
            // A missing database with restore_on_start is restored by its worker, in its own
            // task, before it replicates (see `worker::restore_missing`).
            self.spawn(name.clone(), wanted, spec);
        }
        record_reload(&report);
        report
    }

    fn spawn(&mut self, name: String, cfg: (DbConfig, Defaults), spec: DbSpec) {
        let cancel = self.shutdown.child_token();
        let (handle, join) = worker::spawn(spec.clone(), cancel.clone());
        self.registry.write().expect("registry").insert(
            name.clone(),
            DbEntry {
                handle: handle.clone(),
                spec,
            },
        );
        self.crashed.remove(&name);
        self.running.insert(
            name,
            Running {
                cfg,
                started: Instant::now(),
                handle,
                join,
                cancel,
            },
        );
    }

    /// Stops one worker: final sync, bounded by the shutdown timeout.
    async fn stop(&mut self, name: &str) {
        self.registry.write().expect("registry").remove(name);
        if let Some(r) = self.running.remove(name) {
            r.cancel.cancel();
            let mut join = r.join;
            if tokio::time::timeout(self.main.shutdown_timeout, &mut join)
                .await
                .is_err()
            {
                warn!(db = %name, "final sync did not finish in time; aborting its worker");
                join.abort();
            }
        }
    }

    /// Restarts workers that died (a panic) after a pause, so one bad database cannot spin.
    pub async fn check_workers(&mut self) {
        let dead: Vec<String> = self
            .running
            .iter()
            .filter(|(_, r)| r.join.is_finished())
            .map(|(n, _)| n.clone())
            .collect();
        for name in dead {
            let r = self.running.remove(&name).expect("listed");
            self.registry.write().expect("registry").remove(&name);
            match r.join.await {
                Err(e) if e.is_panic() => {
                    error!(db = %name, "worker panicked; restarting it in 5s")
                }
                _ => warn!(db = %name, "worker stopped unexpectedly; restarting it in 5s"),
            }
            self.crashed.insert(name, (Instant::now(), r.cfg));
        }
        let due: Vec<String> = self
            .crashed
            .iter()
            .filter(|(_, (t, _))| t.elapsed() >= Duration::from_secs(5))
            .map(|(n, _)| n.clone())
            .collect();
        for name in due {
            let (_, cfg) = self.crashed.remove(&name).expect("listed");
            let file = self.main.dbs_dir.join(format!("{name}.toml"));
            match crate::config::resolve_db(&name, &cfg.0, &cfg.1, &file).await {
                Ok(spec) => self.spawn(name, cfg, spec),
                Err(e) => error!(db = %name, error = %e, "cannot restart worker"),
            }
        }
    }

    /// Databases whose worker is still restoring them (restore_on_start): name, how long it
    /// has been trying, its configured give-up (None: no limit) and its last error.
    pub fn restoring(&self) -> Vec<Restoring> {
        self.running
            .iter()
            .filter_map(|(n, r)| {
                let st = r.handle.status();
                (st.state == "restoring").then(|| Restoring {
                    name: n.clone(),
                    elapsed: r.started.elapsed(),
                    timeout: r.cfg.0.restore_on_start_timeout.filter(|t| !t.is_zero()),
                    last_error: st.last_error,
                })
            })
            .collect()
    }

    pub fn statuses(&self) -> Vec<DbStatus> {
        self.running.values().map(|r| r.handle.status()).collect()
    }

    pub fn handles(&self) -> BTreeMap<String, WorkerHandle> {
        self.running
            .iter()
            .map(|(n, r)| (n.clone(), r.handle.clone()))
            .collect()
    }

    /// One line for systemd's STATUS=, e.g. "replicating 12 databases; 1 retrying".
    pub fn summary(&self) -> String {
        let st = self.statuses();
        let mut by_state: BTreeMap<&str, usize> = BTreeMap::new();
        for s in &st {
            *by_state.entry(s.state.as_str()).or_default() += 1;
        }
        for state in telemetry::DB_STATES {
            metrics::gauge!(telemetry::DATABASES, "state" => *state)
                .set(*by_state.get(state).unwrap_or(&0) as f64);
        }
        // Databases with at least one replica in the given state.
        let with_replica = |state: &str| {
            st.iter()
                .filter(|s| s.replicas.iter().any(|r| r.state_name() == state))
                .count()
        };
        let (retrying, failed, conflict) = (
            with_replica("retrying"),
            with_replica("failed"),
            with_replica("conflict"),
        );
        let mut parts = vec![format!(
            "replicating {} database{}",
            st.len(),
            if st.len() == 1 { "" } else { "s" }
        )];
        if let Some(n) = by_state.get("restoring") {
            parts.push(format!("{n} restoring"));
        }
        if let Some(n) = by_state.get("waiting") {
            parts.push(format!("{n} waiting for their file"));
        }
        if let Some(n) = by_state.get("error") {
            parts.push(format!("{n} in error"));
        }
        if retrying > 0 {
            parts.push(format!("{retrying} retrying"));
        }
        if failed > 0 {
            parts.push(format!("{failed} failing"));
        }
        if conflict > 0 {
            parts.push(format!("{conflict} blocked by another replicator's lease"));
        }
        parts.join("; ")
    }

    /// Stops every worker with a final sync. `progress` is called about every second while
    /// workers are still flushing (to extend systemd's stop timeout). Returns false if the
    /// deadline passed and some workers were aborted.
    pub async fn shutdown(mut self, progress: impl Fn()) -> bool {
        self.shutdown.cancel();
        let deadline = Instant::now() + self.main.shutdown_timeout;
        let mut joins: Vec<(String, tokio::task::JoinHandle<()>)> =
            std::mem::take(&mut self.running)
                .into_iter()
                .map(|(n, r)| (n, r.join))
                .collect();
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
