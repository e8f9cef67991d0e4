//! The control protocol spoken over the daemon's Unix socket (documented in
//! `docs/control-protocol.md`): newline-delimited JSON, one object per line, at most
//! [`MAX_LINE`] bytes, every message carrying the protocol version `v`.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::replica::SnapshotInfo;
use crate::status::DbStatus;

pub const VERSION: u32 = 1;
/// Longest accepted request line, newline included.
pub const MAX_LINE: usize = 64 * 1024;
/// Longest response line a client accepts (a `detail` of a long history is larger than a
/// request ever is).
pub const MAX_RESPONSE: usize = 16 * 1024 * 1024;

/// A client request. `id` is echoed in every response to it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Request {
    pub v: u32,
    #[serde(default)]
    pub id: u64,
    #[serde(flatten)]
    pub cmd: Command,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
pub enum Command {
    /// Every database's status.
    Status,
    /// One database: status plus each replica's generations, snapshots and WAL ranges.
    Detail { db: String },
    /// Push `status` messages whenever something changes, and `event` messages.
    Subscribe,
    /// Restore a database (or a point in time) to a new file; progress is pushed.
    Restore(RestoreRequest),
    /// Every replica of the database takes a snapshot now.
    Snapshot { db: String },
    /// Copy new WAL frames and upload them now.
    Sync { db: String },
    /// Run a restore drill of every replica of the database now; replies when it is done
    /// with each replica's `DrillStatus`.
    Drill { db: String },
    /// Check the database's replicas without restoring (`litestreamd verify`).
    Verify(VerifyRequest),
    /// Re-read the configuration, as SIGHUP does.
    Reload,
    /// Turn a standby into the primary (`litestreamd promote`): apply everything the replica
    /// has, take its lease (`force`: from a holder that may live), replicate in a new
    /// generation. Root and the daemon's user only.
    Promote {
        db: String,
        #[serde(default)]
        force: bool,
    },
    /// Hand a primary's replicas over to a standby (`litestreamd handoff`): a final sync,
    /// every replica caught up, leases released, then no more replication here. Root and the
    /// daemon's user only.
    Handoff { db: String },
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RestoreRequest {
    pub db: String,
    /// Only this replica (by name); default: the best one.
    #[serde(default)]
    pub replica: Option<String>,
    #[serde(default)]
    pub generation: Option<String>,
    /// Up to and including this WAL index.
    #[serde(default)]
    pub index: Option<u32>,
    /// RFC 3339 point in time.
    #[serde(default)]
    pub timestamp: Option<String>,
    /// Where to write; must not exist and must not be the live database.
    pub output: PathBuf,
    #[serde(default = "yes")]
    pub integrity_check: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct VerifyRequest {
    pub db: String,
    /// Only this replica (by name); default: every one.
    #[serde(default)]
    pub replica: Option<String>,
    #[serde(default)]
    pub generation: Option<String>,
    /// `none` (listings, the default), `all`, or a percentage such as `10%`.
    #[serde(default)]
    pub read_data: Option<String>,
}

fn yes() -> bool {
    true
}

/// A server message: a reply to request `id`, or a pushed message for a subscription or a
/// running restore (same `id` as the request that started it).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Response {
    pub v: u32,
    pub id: u64,
    #[serde(flatten)]
    pub body: Body,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Body {
    /// The request succeeded; `result` depends on the command.
    Ok {
        result: serde_json::Value,
    },
    Error {
        code: ErrorCode,
        message: String,
    },
    /// Pushed to subscribers when any status changes (and once at subscription).
    Status {
        databases: Vec<DbStatus>,
    },
    /// Pushed to subscribers: something happened (state changes, errors, new generations).
    Event {
        level: String,
        db: Option<String>,
        message: String,
    },
    /// Pushed during a restore.
    Progress {
        stage: String,
        done: u64,
        total: u64,
    },
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// Not JSON, or not a valid request.
    BadRequest,
    /// A line longer than `MAX_LINE`; the connection is closed after this reply.
    TooLarge,
    /// A `v` this server does not speak.
    UnsupportedVersion,
    /// An unknown `cmd`.
    UnknownCommand,
    /// No such database (or replica).
    NotFound,
    /// The peer is not root, the daemon's user, or in the control group.
    AccessDenied,
    /// The command ran and failed.
    Failed,
}

/// `detail` result.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DbDetail {
    pub status: DbStatus,
    pub replicas: Vec<ReplicaDetail>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ReplicaDetail {
    pub name: String,
    pub url: String,
    /// Listing error, if the replica could not be read.
    pub error: Option<String>,
    pub generations: Vec<GenerationDetail>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct GenerationDetail {
    pub generation: String,
    pub snapshots: Vec<SnapshotInfo>,
    pub segments: usize,
    /// Lowest and highest (index, offset) of its WAL segments.
    pub wal_first: Option<(u32, u64)>,
    pub wal_last: Option<(u32, u64)>,
    #[serde(with = "humantime_serde")]
    pub created: Option<std::time::SystemTime>,
    #[serde(with = "humantime_serde")]
    pub updated: Option<std::time::SystemTime>,
}

impl Response {
    pub fn ok(id: u64, result: impl Serialize) -> Self {
        Response {
            v: VERSION,
            id,
            body: Body::Ok {
                result: serde_json::to_value(result).unwrap_or(serde_json::Value::Null),
            },
        }
    }
    pub fn error(id: u64, code: ErrorCode, message: impl Into<String>) -> Self {
        Response {
            v: VERSION,
            id,
            body: Body::Error {
                code,
                message: message.into(),
            },
        }
    }
    pub fn push(id: u64, body: Body) -> Self {
        Response {
            v: VERSION,
            id,
            body,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_format() {
        let r: Request =
            serde_json::from_str(r#"{"v":1,"id":7,"cmd":"detail","db":"app"}"#).unwrap();
        assert_eq!(
            r,
            Request {
                v: 1,
                id: 7,
                cmd: Command::Detail { db: "app".into() }
            }
        );
        let r: Request = serde_json::from_str(
            r#"{"v":1,"cmd":"restore","db":"app","output":"/tmp/x.db","index":3}"#,
        )
        .unwrap();
        match r.cmd {
            Command::Restore(rr) => assert!(rr.integrity_check && rr.index == Some(3)),
            other => panic!("{other:?}"),
        }
        let s = serde_json::to_string(&Response::error(3, ErrorCode::UnknownCommand, "x")).unwrap();
        assert_eq!(
            s,
            r#"{"v":1,"id":3,"type":"error","code":"unknown_command","message":"x"}"#
        );
        assert!(serde_json::from_str::<Request>(r#"{"v":1,"cmd":"nope"}"#).is_err());
    }

    /// Protocol v1's bytes for a status, captured from the types before they moved into
    /// `status`: renaming or reordering a field of the engine's status changes the wire
    /// format, and this test says so.
    #[test]
    fn status_bytes_of_protocol_v1_are_pinned() {
        use crate::layout::Pos;
        use crate::status::{DbState, ReplicaState, ReplicaStatus};
        use std::time::{Duration, UNIX_EPOCH};
        let t = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let rep = |name: &str, state| ReplicaStatus {
            name: name.into(),
            kind: "s3".into(),
            url: format!("s3://b/{name}"),
            state,
            pos: Some(Pos::new("62fce60304a1d17f", 3, 4152)),
            last_sync: Some(t),
            last_error: Some("boom".into()),
            retries: 3,
            uploaded_bytes: 123,
            retention_error: None,
            lag_seconds: 4.5,
            lag_bytes: 8304,
            caught_up_at: Some(t),
            drill: None,
            verify: None,
            requests: crate::status::RequestCounts {
                put: 5,
                list: 2,
                ..Default::default()
            },
            requests_per_month: crate::status::RequestCounts {
                put: 3600,
                ..Default::default()
            },
        };
        let st = DbStatus {
            name: "app".into(),
            path: "/srv/app.db".into(),
            state: DbState::Replicating,
            pos: Some(Pos::new("62fce60304a1d17f", 3, 4152)),
            last_error: None,
            db_size: 8192,
            wal_size: 4152,
            shadow_bytes: 8304,
            last_sync: Some(t),
            drill: None,
            drill_interval: None,
            parked: false,
            standby: None,
            replicas: vec![
                rep("a", ReplicaState::Healthy),
                rep(
                    "b",
                    ReplicaState::Retrying {
                        attempt: 3,
                        error: "boom".into(),
                    },
                ),
                rep(
                    "c",
                    ReplicaState::Conflict {
                        attempt: 1,
                        error: "held".into(),
                    },
                ),
            ],
        };
        let msg = Response::push(
            9,
            Body::Status {
                databases: vec![st],
            },
        );
        let json = serde_json::to_string(&msg).unwrap();
        assert_eq!(json, PINNED_STATUS);
        let back: Response = serde_json::from_str(PINNED_STATUS).unwrap();
        assert_eq!(back, msg);
    }

    const PINNED_STATUS: &str = r#"{"v":1,"id":9,"type":"status","databases":[{"name":"app","path":"/srv/app.db","state":"replicating","pos":{"generation":"62fce60304a1d17f","index":3,"offset":4152},"last_error":null,"db_size":8192,"wal_size":4152,"shadow_bytes":8304,"last_sync":"2027-01-15T08:00:00Z","replicas":[{"name":"a","kind":"s3","url":"s3://b/a","state":"healthy","pos":{"generation":"62fce60304a1d17f","index":3,"offset":4152},"last_sync":"2027-01-15T08:00:00Z","last_error":"boom","retries":3,"uploaded_bytes":123,"lag_seconds":4.5,"lag_bytes":8304,"caught_up_at":"2027-01-15T08:00:00Z","requests":{"put":5,"get":0,"list":2,"delete":0,"head":0},"requests_per_month":{"put":3600,"get":0,"list":0,"delete":0,"head":0}},{"name":"b","kind":"s3","url":"s3://b/b","state":"retrying","attempt":3,"error":"boom","pos":{"generation":"62fce60304a1d17f","index":3,"offset":4152},"last_sync":"2027-01-15T08:00:00Z","last_error":"boom","retries":3,"uploaded_bytes":123,"lag_seconds":4.5,"lag_bytes":8304,"caught_up_at":"2027-01-15T08:00:00Z","requests":{"put":5,"get":0,"list":2,"delete":0,"head":0},"requests_per_month":{"put":3600,"get":0,"list":0,"delete":0,"head":0}},{"name":"c","kind":"s3","url":"s3://b/c","state":"conflict","attempt":1,"error":"held","pos":{"generation":"62fce60304a1d17f","index":3,"offset":4152},"last_sync":"2027-01-15T08:00:00Z","last_error":"boom","retries":3,"uploaded_bytes":123,"lag_seconds":4.5,"lag_bytes":8304,"caught_up_at":"2027-01-15T08:00:00Z","requests":{"put":5,"get":0,"list":2,"delete":0,"head":0},"requests_per_month":{"put":3600,"get":0,"list":0,"delete":0,"head":0}}]}]}"#;
}
