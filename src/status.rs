//! The status of databases and replicas: what a worker reports, the control socket serves
//! (protocol v1: a test pins the bytes), the dashboard shows and the metrics export. Types
//! only, with no dependency on the engine, so none of those depends on another through it.
//!
//! One writer per status: a database's worker. Its replica tasks send it their own part
//! ([`ReplicaReport`]); the worker adds the lag (the only place it is computed) and publishes
//! the whole [`DbStatus`].

use std::fmt;
use std::path::PathBuf;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::layout::Pos;

/// A database's state.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum DbState {
    /// The worker has not finished its first pass.
    #[default]
    Starting,
    /// `restore_on_start`: the database is being restored (or waits for its replicas).
    Restoring,
    /// No database file yet.
    Waiting,
    Replicating,
    /// A standby (`role = "standby"`): being built from the replica's newest snapshot.
    Bootstrapping,
    /// A standby applying the replica's new WAL segments as they land (`standby` has the lag).
    Following,
    /// The last pass failed (`last_error` says why).
    Error,
    Stopped,
}

impl DbState {
    pub const ALL: &'static [DbState] = &[
        DbState::Starting,
        DbState::Restoring,
        DbState::Waiting,
        DbState::Replicating,
        DbState::Bootstrapping,
        DbState::Following,
        DbState::Error,
        DbState::Stopped,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DbState::Starting => "starting",
            DbState::Restoring => "restoring",
            DbState::Waiting => "waiting",
            DbState::Replicating => "replicating",
            DbState::Bootstrapping => "bootstrapping",
            DbState::Following => "following",
            DbState::Error => "error",
            DbState::Stopped => "stopped",
        }
    }
}

impl fmt::Display for DbState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A replica's state, with the details of a problem.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum ReplicaState {
    #[default]
    Starting,
    Healthy,
    Retrying {
        attempt: u32,
        error: String,
    },
    Failed {
        attempt: u32,
        error: String,
    },
    /// Another replicator holds the lease on this replica path, or the path belongs to
    /// another database's lineage; nothing is written until that changes.
    Conflict {
        attempt: u32,
        error: String,
    },
}

/// A replica state without its details, for counting and comparing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ReplicaStateName {
    Starting,
    Healthy,
    Retrying,
    Failed,
    Conflict,
}

impl ReplicaStateName {
    pub const ALL: &'static [ReplicaStateName] = &[
        ReplicaStateName::Starting,
        ReplicaStateName::Healthy,
        ReplicaStateName::Retrying,
        ReplicaStateName::Failed,
        ReplicaStateName::Conflict,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ReplicaStateName::Starting => "starting",
            ReplicaStateName::Healthy => "healthy",
            ReplicaStateName::Retrying => "retrying",
            ReplicaStateName::Failed => "failed",
            ReplicaStateName::Conflict => "conflict",
        }
    }

    /// Whether `litestreamd status` (and a health check) should fail on it.
    pub fn is_problem(self) -> bool {
        matches!(
            self,
            ReplicaStateName::Retrying | ReplicaStateName::Failed | ReplicaStateName::Conflict
        )
    }
}

impl ReplicaState {
    pub fn name(&self) -> ReplicaStateName {
        match self {
            ReplicaState::Starting => ReplicaStateName::Starting,
            ReplicaState::Healthy => ReplicaStateName::Healthy,
            ReplicaState::Retrying { .. } => ReplicaStateName::Retrying,
            ReplicaState::Failed { .. } => ReplicaStateName::Failed,
            ReplicaState::Conflict { .. } => ReplicaStateName::Conflict,
        }
    }
}

/// How a restore drill of a replica ended (see `drill`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DrillResult {
    /// The replica restored to the source's exact content at the drill's position.
    Passed,
    /// It did not: the restore failed, the restored database is damaged or not the source.
    Failed,
    /// The drill could not run (the replica could not be read, no space, a new generation).
    Error,
}

impl DrillResult {
    pub const ALL: &'static [DrillResult] =
        &[DrillResult::Passed, DrillResult::Failed, DrillResult::Error];

    pub fn as_str(self) -> &'static str {
        match self {
            DrillResult::Passed => "passed",
            DrillResult::Failed => "failed",
            DrillResult::Error => "error",
        }
    }
}

/// A replica's last restore drill.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DrillStatus {
    pub result: DrillResult,
    #[serde(with = "humantime_serde")]
    pub finished_at: Option<SystemTime>,
    /// The last drill that passed (this one or an earlier one).
    #[serde(with = "humantime_serde")]
    pub last_success: Option<SystemTime>,
    pub duration_seconds: f64,
    /// Bytes of the restored database (0 unless it passed).
    pub restored_bytes: u64,
    /// The position the drill restored to.
    pub pos: Option<Pos>,
    /// Why it did not pass.
    pub reason: Option<String>,
}

impl DrillStatus {
    /// What is wrong with a replica's drills, if anything: its last drill failed, or (with
    /// `max_age`) none passed within that long (none since the daemon started included).
    pub fn problem(
        d: Option<&DrillStatus>,
        max_age: Option<std::time::Duration>,
    ) -> Option<String> {
        if let Some(d) = d
            && d.result == DrillResult::Failed
        {
            return Some(format!(
                "last drill failed: {}",
                d.reason.as_deref().unwrap_or("no reason recorded")
            ));
        }
        let max = max_age?;
        let passed = d.and_then(|d| d.last_success);
        match passed.and_then(|t| SystemTime::now().duration_since(t).ok()) {
            Some(age) if age <= max => None,
            Some(age) => Some(format!(
                "no drill passed for {}s (max {}s)",
                age.as_secs(),
                max.as_secs()
            )),
            None if passed.is_some() => None,
            None => Some(format!("no drill passed (max age {}s)", max.as_secs())),
        }
    }
}

/// How a `verify` of a replica requested through the daemon ended (see `verify`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VerifyResult {
    Ok,
    Warning,
    Failure,
    /// The replica could not be read (never a grade).
    Error,
}

impl VerifyResult {
    pub const ALL: &'static [VerifyResult] = &[
        VerifyResult::Ok,
        VerifyResult::Warning,
        VerifyResult::Failure,
        VerifyResult::Error,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            VerifyResult::Ok => "ok",
            VerifyResult::Warning => "warning",
            VerifyResult::Failure => "failure",
            VerifyResult::Error => "error",
        }
    }
}

/// A replica's last verify run through the daemon.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VerifyStatus {
    pub result: VerifyResult,
    #[serde(with = "humantime_serde")]
    pub finished_at: Option<SystemTime>,
    /// The last verify graded OK or WARNING (the newest state restores).
    #[serde(with = "humantime_serde")]
    pub last_success: Option<SystemTime>,
    pub duration_seconds: f64,
    /// What was read: none, all, or a percentage.
    pub read_data: String,
    /// The first FAILURE (or the error), naming the object.
    pub message: Option<String>,
}

/// A drill in progress.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DrillRun {
    pub replica: Option<String>,
    pub stage: String,
    pub done: u64,
    pub total: u64,
}

/// What a replica task reports about itself to its worker.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ReplicaReport {
    pub state: ReplicaState,
    /// The position the replica holds (None: not known yet, or being recomputed).
    pub pos: Option<Pos>,
    pub last_sync: Option<SystemTime>,
    pub last_error: Option<String>,
    pub retries: u64,
    pub uploaded_bytes: u64,
    /// Why the last retention pass failed (None after one succeeds); replication goes on.
    pub retention_error: Option<String>,
}

/// A replica's status as the worker publishes it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReplicaStatus {
    pub name: String,
    pub kind: String,
    pub url: String,
    #[serde(flatten)]
    pub state: ReplicaState,
    pub pos: Option<Pos>,
    #[serde(with = "humantime_serde")]
    pub last_sync: Option<SystemTime>,
    pub last_error: Option<String>,
    pub retries: u64,
    pub uploaded_bytes: u64,
    /// Why the last retention pass failed (a store refusing deletions); replication goes on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention_error: Option<String>,
    /// Seconds since the replica last had everything the database has (0 when caught up).
    pub lag_seconds: f64,
    /// Shadow WAL bytes not uploaded yet.
    pub lag_bytes: u64,
    /// When the replica last had everything the database has.
    #[serde(with = "humantime_serde")]
    pub caught_up_at: Option<SystemTime>,
    /// The last restore drill (none yet, or drills are off).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drill: Option<DrillStatus>,
    /// The last verify requested through the daemon.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verify: Option<VerifyStatus>,
    /// Requests to the replica's store since the database started, by kind.
    #[serde(default)]
    pub requests: RequestCounts,
    /// A 30-day month of requests at the last hour's rate, by kind.
    #[serde(default)]
    pub requests_per_month: RequestCounts,
}

impl ReplicaStatus {
    /// A replica that has not synced yet (caught up as of now: it has no lag to report).
    pub fn new(name: &str, kind: &str, url: &str) -> Self {
        ReplicaStatus {
            name: name.into(),
            kind: kind.into(),
            url: url.into(),
            state: ReplicaState::Starting,
            pos: None,
            last_sync: None,
            last_error: None,
            retries: 0,
            uploaded_bytes: 0,
            retention_error: None,
            lag_seconds: 0.0,
            lag_bytes: 0,
            caught_up_at: Some(SystemTime::now()),
            drill: None,
            verify: None,
            requests: RequestCounts::default(),
            requests_per_month: RequestCounts::default(),
        }
    }

    pub fn state_name(&self) -> &'static str {
        self.state.name().as_str()
    }

    /// Takes the replica task's own part of the status.
    pub fn apply(&mut self, r: &ReplicaReport) {
        self.state = r.state.clone();
        self.pos = r.pos.clone();
        self.last_sync = r.last_sync;
        self.last_error = r.last_error.clone();
        self.retries = r.retries;
        self.uploaded_bytes = r.uploaded_bytes;
        self.retention_error = r.retention_error.clone();
    }
}

/// A database's status, replicas included.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct DbStatus {
    pub name: String,
    pub path: PathBuf,
    pub state: DbState,
    pub pos: Option<Pos>,
    pub last_error: Option<String>,
    pub db_size: u64,
    pub wal_size: u64,
    pub shadow_bytes: u64,
    #[serde(with = "humantime_serde")]
    pub last_sync: Option<SystemTime>,
    pub replicas: Vec<ReplicaStatus>,
    /// A restore drill in progress.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drill: Option<DrillRun>,
    /// How often drills run (None: off).
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub drill_interval: Option<std::time::Duration>,
    /// Idle and closed down to its locked database file (see `Db::park`): a write wakes it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub parked: bool,
    /// A standby database: what it follows and how far behind it is (None: a primary). Its
    /// followed replica is also in `replicas`, with the standby's applied position, state and
    /// lag, so every view of replicas shows a standby too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub standby: Option<StandbyStatus>,
}

/// What a standby database reports beyond its followed replica's row (see `worker::standby`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct StandbyStatus {
    /// The followed replica's name.
    pub replica: String,
    /// How often it polls the replica.
    #[serde(with = "humantime_serde")]
    pub poll_interval: std::time::Duration,
    /// The last batch's lag: from the upload of its oldest segment (the object's time) to its
    /// application here. None before the first batch, or on a store without object times.
    pub apply_lag_seconds: Option<f64>,
    /// When a batch was last applied.
    #[serde(with = "humantime_serde")]
    pub last_applied: Option<SystemTime>,
    /// Commits applied since the daemon started.
    pub commits_applied: u64,
    /// Bootstraps since the daemon started, and the last one's reason.
    pub bootstraps: u64,
    pub last_bootstrap: Option<String>,
    /// When a `promote` turned it into a primary (it then replicates; `role` in its file still
    /// says standby until the operator changes it).
    #[serde(with = "humantime_serde")]
    pub promoted_at: Option<SystemTime>,
}

impl DbStatus {
    /// The state as shown to an operator: a replicating database that is parked says so.
    pub fn shown_state(&self) -> &'static str {
        if self.parked && self.state == DbState::Replicating {
            "parked"
        } else if self
            .standby
            .as_ref()
            .is_some_and(|s| s.promoted_at.is_some())
            && self.state == DbState::Replicating
        {
            "promoted"
        } else {
            self.state.as_str()
        }
    }
}

/// What a request is billed as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestKind {
    Put,
    Get,
    List,
    Delete,
    Head,
}

impl RequestKind {
    pub const ALL: [RequestKind; 5] = [
        RequestKind::Put,
        RequestKind::Get,
        RequestKind::List,
        RequestKind::Delete,
        RequestKind::Head,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            RequestKind::Put => "put",
            RequestKind::Get => "get",
            RequestKind::List => "list",
            RequestKind::Delete => "delete",
            RequestKind::Head => "head",
        }
    }
}

/// Requests by kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestCounts {
    pub put: u64,
    pub get: u64,
    pub list: u64,
    pub delete: u64,
    pub head: u64,
}

impl RequestCounts {
    pub fn get(&self, kind: RequestKind) -> u64 {
        match kind {
            RequestKind::Put => self.put,
            RequestKind::Get => self.get,
            RequestKind::List => self.list,
            RequestKind::Delete => self.delete,
            RequestKind::Head => self.head,
        }
    }
    pub(crate) fn slot_mut(&mut self, kind: RequestKind) -> &mut u64 {
        match kind {
            RequestKind::Put => &mut self.put,
            RequestKind::Get => &mut self.get,
            RequestKind::List => &mut self.list,
            RequestKind::Delete => &mut self.delete,
            RequestKind::Head => &mut self.head,
        }
    }
    pub fn total(&self) -> u64 {
        RequestKind::ALL.iter().map(|k| self.get(*k)).sum()
    }
}
