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
        DbState::Error,
        DbState::Stopped,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DbState::Starting => "starting",
            DbState::Restoring => "restoring",
            DbState::Waiting => "waiting",
            DbState::Replicating => "replicating",
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
    /// Seconds since the replica last had everything the database has (0 when caught up).
    pub lag_seconds: f64,
    /// Shadow WAL bytes not uploaded yet.
    pub lag_bytes: u64,
    /// When the replica last had everything the database has.
    #[serde(with = "humantime_serde")]
    pub caught_up_at: Option<SystemTime>,
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
            lag_seconds: 0.0,
            lag_bytes: 0,
            caught_up_at: Some(SystemTime::now()),
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
}
