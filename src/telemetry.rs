//! Prometheus metrics through the `metrics` facade and metrics-exporter-prometheus. Names follow
//! Prometheus conventions (base units, `_total`, `_seconds`, `_bytes`); `docs/metrics.md`
//! describes each. The facade cannot unregister a series, so the exporter drops series idle for
//! `idle_timeout`, and every worker re-publishes all of its series on each sync tick: the series
//! of a removed database disappear, those of a live one never do.

use std::net::SocketAddr;
use std::time::Duration;

use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
use metrics_exporter_prometheus::PrometheusBuilder;
use metrics_util::MetricKindMask;
use thiserror::Error;

pub const DB_SIZE: &str = "litestreamd_db_size_bytes";
pub const WAL_SIZE: &str = "litestreamd_wal_size_bytes";
pub const SHADOW_WAL_BYTES: &str = "litestreamd_shadow_wal_bytes";
pub const SHADOW_WAL_INDEX: &str = "litestreamd_shadow_wal_index";
pub const SHADOW_WAL_WRITTEN: &str = "litestreamd_shadow_wal_written_bytes_total";
pub const DB_SYNCS: &str = "litestreamd_db_syncs_total";
pub const DB_SYNC_ERRORS: &str = "litestreamd_db_sync_errors_total";
pub const CHECKPOINTS: &str = "litestreamd_checkpoints_total";
pub const SNAPSHOTS: &str = "litestreamd_snapshots_total";
pub const SNAPSHOT_DURATION: &str = "litestreamd_snapshot_duration_seconds";
pub const REPLICA_WAL_INDEX: &str = "litestreamd_replica_wal_index";
pub const REPLICA_WAL_OFFSET: &str = "litestreamd_replica_wal_offset_bytes";
pub const REPLICA_GENERATION: &str = "litestreamd_replica_generation_info";
pub const REPLICA_LAG_SECONDS: &str = "litestreamd_replica_lag_seconds";
pub const REPLICA_LAG_BYTES: &str = "litestreamd_replica_lag_bytes";
pub const REPLICA_LAST_SYNC: &str = "litestreamd_replica_last_sync_timestamp_seconds";
pub const REPLICA_STATE: &str = "litestreamd_replica_state";
pub const REPLICA_UPLOADS: &str = "litestreamd_replica_uploads_total";
pub const REPLICA_WAL_BYTES: &str = "litestreamd_replica_wal_bytes_total";
pub const REPLICA_RETRIES: &str = "litestreamd_replica_retries_total";
pub const REPLICA_ERRORS: &str = "litestreamd_replica_errors_total";
pub const REPLICA_LEASE_CONFLICTS: &str = "litestreamd_replica_lease_conflicts_total";
pub const REPLICA_NOT_RESTORABLE: &str = "litestreamd_replica_not_restorable_total";
pub const REPLICA_RETENTION_FAILURES: &str = "litestreamd_replica_retention_failures_total";
pub const REPLICA_OPERATIONS: &str = "litestreamd_replica_operations_total";
pub const REPLICA_OPERATION_BYTES: &str = "litestreamd_replica_operation_bytes_total";
pub const REPLICA_REQUESTS: &str = "litestreamd_replica_requests_total";
pub const DRILL_LAST_SUCCESS: &str = "litestreamd_drill_last_success_timestamp_seconds";
pub const DRILL_LAST_RUN: &str = "litestreamd_drill_last_run_timestamp_seconds";
pub const DRILL_DURATION: &str = "litestreamd_drill_duration_seconds";
pub const DRILL_RESTORED_BYTES: &str = "litestreamd_drill_restored_bytes";
pub const DRILL_RESULT: &str = "litestreamd_drill_result";
pub const DRILL_RUNNING: &str = "litestreamd_drill_running";
pub const DRILL_INTERVAL: &str = "litestreamd_drill_interval_seconds";
pub const VERIFY_RESULT: &str = "litestreamd_verify_result";
pub const VERIFY_LAST_SUCCESS: &str = "litestreamd_verify_last_success_timestamp_seconds";
pub const VERIFY_LAST_RUN: &str = "litestreamd_verify_last_run_timestamp_seconds";
pub const VERIFY_DURATION: &str = "litestreamd_verify_duration_seconds";
pub const DATABASES: &str = "litestreamd_databases";
pub const DATABASES_PARKED: &str = "litestreamd_databases_parked";
pub const RELOADS: &str = "litestreamd_reloads_total";
pub const RELOAD_OK: &str = "litestreamd_config_last_reload_successful";
pub const BUILD_INFO: &str = "litestreamd_build_info";
pub const STANDBY_APPLY_LAG: &str = "litestreamd_standby_apply_lag_seconds";
pub const STANDBY_LAST_APPLY_LAG: &str = "litestreamd_standby_last_apply_lag_seconds";
pub const STANDBY_LAST_APPLIED: &str = "litestreamd_standby_last_applied_timestamp_seconds";
pub const STANDBY_COMMITS: &str = "litestreamd_standby_commits_applied_total";
pub const STANDBY_BOOTSTRAPS: &str = "litestreamd_standby_bootstraps_total";
/// The `reason` labels of [`STANDBY_BOOTSTRAPS`] (`standby::Heal::label`).
pub const STANDBY_BOOTSTRAP_REASONS: [&str; 3] = ["start", "new_generation", "gap"];
pub const STANDBY_PROMOTED: &str = "litestreamd_standby_promoted_timestamp_seconds";

/// Counters every database re-publishes each tick (see the module comment).
pub const DB_COUNTERS: &[&str] = &[DB_SYNCS, DB_SYNC_ERRORS, SHADOW_WAL_WRITTEN];
/// Counters every replica re-publishes each tick.
pub const REPLICA_COUNTERS: &[&str] = &[
    REPLICA_UPLOADS,
    REPLICA_WAL_BYTES,
    REPLICA_RETRIES,
    REPLICA_ERRORS,
    REPLICA_LEASE_CONFLICTS,
    REPLICA_NOT_RESTORABLE,
    REPLICA_RETENTION_FAILURES,
    SNAPSHOTS,
];
/// Writes every series of a database from its status (so `/metrics` shows what the control
/// socket shows), plus the sync passes and shadow bytes counted since the last call. Every
/// series is written, counters included (`increment(0)`), so the exporter's idle timeout only
/// removes the series of databases that are gone.
/// Unix time in seconds, 0 for never.
fn unix_secs(t: Option<std::time::SystemTime>) -> f64 {
    t.and_then(|t| t.duration_since(std::time::SystemTime::UNIX_EPOCH).ok())
        .map_or(0.0, |d| d.as_secs_f64())
}

pub fn publish_db(st: &crate::status::DbStatus, syncs: u64, wal_bytes: u64) {
    use crate::status::ReplicaStateName;
    let labels = [("db", st.name.clone())];
    metrics::counter!(DB_SYNCS, &labels).increment(syncs);
    metrics::counter!(SHADOW_WAL_WRITTEN, &labels).increment(wal_bytes);
    metrics::gauge!(DB_SIZE, &labels).set(st.db_size as f64);
    metrics::gauge!(WAL_SIZE, &labels).set(st.wal_size as f64);
    metrics::gauge!(SHADOW_WAL_BYTES, &labels).set(st.shadow_bytes as f64);
    metrics::gauge!(SHADOW_WAL_INDEX, &labels).set(st.pos.as_ref().map_or(0.0, |p| p.index as f64));
    for c in DB_COUNTERS {
        metrics::counter!(*c, &labels).increment(0);
    }
    for mode in ["PASSIVE", "RESTART", "TRUNCATE"] {
        metrics::counter!(CHECKPOINTS, "db" => st.name.clone(), "mode" => mode).increment(0);
    }
    for rs in &st.replicas {
        let rl = [("db", st.name.clone()), ("replica", rs.name.clone())];
        metrics::gauge!(REPLICA_LAG_SECONDS, &rl).set(rs.lag_seconds);
        metrics::gauge!(REPLICA_LAG_BYTES, &rl).set(rs.lag_bytes as f64);
        metrics::gauge!(REPLICA_WAL_INDEX, &rl)
            .set(rs.pos.as_ref().map_or(0.0, |p| p.index as f64));
        metrics::gauge!(REPLICA_WAL_OFFSET, &rl)
            .set(rs.pos.as_ref().map_or(0.0, |p| p.offset as f64));
        if let Some(p) = &rs.pos {
            metrics::gauge!(REPLICA_GENERATION, "db" => st.name.clone(), "replica" => rs.name.clone(), "generation" => p.generation.clone()).set(1.0);
        }
        metrics::gauge!(REPLICA_LAST_SYNC, &rl).set(unix_secs(rs.last_sync));
        let current = rs.state.name();
        for state in ReplicaStateName::ALL {
            let v = if *state == current { 1.0 } else { 0.0 };
            metrics::gauge!(REPLICA_STATE, "db" => st.name.clone(), "replica" => rs.name.clone(), "state" => state.as_str()).set(v);
        }
        for c in REPLICA_COUNTERS {
            metrics::counter!(*c, &rl).increment(0);
        }
        for kind in crate::status::RequestKind::ALL {
            metrics::counter!(REPLICA_REQUESTS, "db" => st.name.clone(), "replica" => rs.name.clone(), "kind" => kind.as_str()).absolute(rs.requests.get(kind));
        }
        if let Some(v) = &rs.verify {
            metrics::gauge!(VERIFY_LAST_SUCCESS, &rl).set(unix_secs(v.last_success));
            metrics::gauge!(VERIFY_LAST_RUN, &rl).set(unix_secs(v.finished_at));
            metrics::gauge!(VERIFY_DURATION, &rl).set(v.duration_seconds);
            for r in crate::status::VerifyResult::ALL {
                let x = if *r == v.result { 1.0 } else { 0.0 };
                metrics::gauge!(VERIFY_RESULT, "db" => st.name.clone(), "replica" => rs.name.clone(), "result" => r.as_str()).set(x);
            }
        }
        if let Some(d) = &rs.drill {
            metrics::gauge!(DRILL_LAST_SUCCESS, &rl).set(unix_secs(d.last_success));
            metrics::gauge!(DRILL_LAST_RUN, &rl).set(unix_secs(d.finished_at));
            metrics::gauge!(DRILL_DURATION, &rl).set(d.duration_seconds);
            metrics::gauge!(DRILL_RESTORED_BYTES, &rl).set(d.restored_bytes as f64);
            for r in crate::status::DrillResult::ALL {
                let v = if *r == d.result { 1.0 } else { 0.0 };
                metrics::gauge!(DRILL_RESULT, "db" => st.name.clone(), "replica" => rs.name.clone(), "result" => r.as_str()).set(v);
            }
        }
    }
    metrics::gauge!(DRILL_RUNNING, &labels).set(if st.drill.is_some() { 1.0 } else { 0.0 });
    metrics::gauge!(DRILL_INTERVAL, &labels)
        .set(st.drill_interval.map_or(0.0, |d| d.as_secs_f64()));
}

/// A standby's own series (its followed replica's are `publish_db`'s): written whole at every
/// poll, counters included, like a primary's.
pub fn publish_standby(st: &crate::status::DbStatus) {
    let Some(s) = &st.standby else {
        return;
    };
    let labels = [("db", st.name.clone())];
    metrics::gauge!(STANDBY_LAST_APPLY_LAG, &labels).set(s.apply_lag_seconds.unwrap_or(0.0));
    metrics::gauge!(STANDBY_LAST_APPLIED, &labels).set(unix_secs(s.last_applied));
    metrics::gauge!(STANDBY_PROMOTED, &labels).set(unix_secs(s.promoted_at));
    metrics::counter!(STANDBY_COMMITS, &labels).increment(0);
    for why in STANDBY_BOOTSTRAP_REASONS {
        metrics::counter!(STANDBY_BOOTSTRAPS, "db" => st.name.clone(), "reason" => why)
            .increment(0);
    }
}

#[derive(Debug, Error)]
pub enum TelemetryError {
    #[error("metrics address {addr:?}: {reason}")]
    Address { addr: String, reason: String },
    #[error("cannot listen for metrics on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot install the metrics exporter: {0}")]
    Install(String),
}

/// Starts the `/metrics` listener (every path serves the metrics; `/health` answers OK).
pub fn install(addr: &str, idle_timeout: Duration) -> Result<SocketAddr, TelemetryError> {
    let sa: SocketAddr =
        addr.parse()
            .map_err(|e: std::net::AddrParseError| TelemetryError::Address {
                addr: addr.into(),
                reason: e.to_string(),
            })?;
    // Bind once ourselves so a port in use is a clear start-up error, not a log line later.
    let probe = std::net::TcpListener::bind(sa)
        .map_err(|source| TelemetryError::Bind { addr: sa, source })?;
    let bound = probe
        .local_addr()
        .map_err(|source| TelemetryError::Bind { addr: sa, source })?;
    drop(probe);
    PrometheusBuilder::new()
        .with_http_listener(bound)
        .idle_timeout(MetricKindMask::ALL, Some(idle_timeout))
        .install()
        .map_err(|e| TelemetryError::Install(e.to_string()))?;
    describe();
    metrics::gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    Ok(bound)
}

fn describe() {
    describe_histogram!(
        STANDBY_APPLY_LAG,
        Unit::Seconds,
        "Standby: from a segment's upload by the primary (the object's time) to its application here, per applied batch (its oldest segment)."
    );
    describe_gauge!(
        STANDBY_LAST_APPLY_LAG,
        Unit::Seconds,
        "Standby: the last applied batch's lag (see litestreamd_standby_apply_lag_seconds); 0 before the first batch or without object times (GCS)."
    );
    describe_gauge!(
        STANDBY_LAST_APPLIED,
        Unit::Seconds,
        "Standby: Unix time of the last applied batch (0: none since start)."
    );
    describe_gauge!(
        STANDBY_PROMOTED,
        Unit::Seconds,
        "Standby: Unix time of its promotion to primary (0: still a standby)."
    );
    describe_counter!(
        STANDBY_COMMITS,
        "Standby: commits of the primary applied here."
    );
    describe_counter!(
        STANDBY_BOOTSTRAPS,
        "Standby: bootstraps from the newest snapshot, by reason (start, new_generation, gap)."
    );
    describe_gauge!(DB_SIZE, Unit::Bytes, "Size of the database file.");
    describe_gauge!(
        DRILL_LAST_SUCCESS,
        Unit::Seconds,
        "Unix time of the replica's last restore drill that passed (0: none since the daemon started)."
    );
    describe_gauge!(
        DRILL_LAST_RUN,
        Unit::Seconds,
        "Unix time the replica's last restore drill finished, whatever its result."
    );
    describe_gauge!(
        DRILL_DURATION,
        Unit::Seconds,
        "Duration of the replica's last restore drill."
    );
    describe_gauge!(
        DRILL_RESTORED_BYTES,
        Unit::Bytes,
        "Size of the database the replica's last passing drill restored."
    );
    describe_gauge!(
        DRILL_RESULT,
        "1 for the result of the replica's last restore drill (label result: passed, failed, error)."
    );
    describe_gauge!(
        DRILL_RUNNING,
        "1 while a restore drill of the database runs."
    );
    describe_gauge!(
        VERIFY_RESULT,
        "1 for the grade of the replica's last verify run through the daemon (label result: ok, warning, failure, error)."
    );
    describe_gauge!(
        VERIFY_LAST_SUCCESS,
        Unit::Seconds,
        "Unix time of the replica's last verify graded ok or warning (0: none since the daemon started)."
    );
    describe_gauge!(
        VERIFY_LAST_RUN,
        Unit::Seconds,
        "Unix time the replica's last verify ended."
    );
    describe_gauge!(
        VERIFY_DURATION,
        Unit::Seconds,
        "Duration of the replica's last verify."
    );
    describe_gauge!(
        DRILL_INTERVAL,
        Unit::Seconds,
        "The database's drill_interval (0: scheduled drills are off)."
    );
    describe_gauge!(WAL_SIZE, Unit::Bytes, "Size of the database's -wal file.");
    describe_gauge!(
        SHADOW_WAL_BYTES,
        Unit::Bytes,
        "Shadow WAL bytes on local disk for the current generation; grows while a replica cannot upload."
    );
    describe_gauge!(
        SHADOW_WAL_INDEX,
        "Current shadow WAL index of the database."
    );
    describe_counter!(
        SHADOW_WAL_WRITTEN,
        Unit::Bytes,
        "WAL bytes copied into the shadow WAL."
    );
    describe_counter!(DB_SYNCS, "Database sync passes.");
    describe_counter!(DB_SYNC_ERRORS, "Failed database sync passes.");
    describe_counter!(CHECKPOINTS, "Checkpoints run by litestreamd, by mode.");
    describe_counter!(SNAPSHOTS, "Snapshots written to a replica.");
    describe_histogram!(
        SNAPSHOT_DURATION,
        Unit::Seconds,
        "Time to write a snapshot to a replica."
    );
    describe_gauge!(
        REPLICA_WAL_INDEX,
        "WAL index the replica has uploaded up to."
    );
    describe_gauge!(
        REPLICA_WAL_OFFSET,
        Unit::Bytes,
        "Byte offset within that index the replica has uploaded up to."
    );
    describe_gauge!(
        REPLICA_GENERATION,
        "1 for the generation the replica is writing (label generation)."
    );
    describe_gauge!(
        REPLICA_LAG_SECONDS,
        Unit::Seconds,
        "Seconds since the replica last had everything the database has; 0 when caught up."
    );
    describe_gauge!(
        REPLICA_LAG_BYTES,
        Unit::Bytes,
        "Shadow WAL bytes the replica has not uploaded yet."
    );
    describe_gauge!(
        REPLICA_LAST_SYNC,
        Unit::Seconds,
        "Unix time of the replica's last successful sync."
    );
    describe_gauge!(
        REPLICA_STATE,
        "1 for the replica's current state (label state: starting, healthy, retrying, failed, conflict)."
    );
    describe_counter!(REPLICA_UPLOADS, "WAL segments uploaded.");
    describe_counter!(
        REPLICA_WAL_BYTES,
        Unit::Bytes,
        "Uncompressed WAL bytes uploaded."
    );
    describe_counter!(
        REPLICA_RETRIES,
        "Retries scheduled after a failed replica sync."
    );
    describe_counter!(REPLICA_ERRORS, "Failed replica syncs.");
    describe_counter!(
        REPLICA_LEASE_CONFLICTS,
        "Sync attempts refused because another replicator holds the replica path's lease."
    );
    describe_counter!(
        REPLICA_NOT_RESTORABLE,
        "Times the replica found objects its generation restores from gone (a new snapshot or generation follows)."
    );
    describe_counter!(
        REPLICA_RETENTION_FAILURES,
        "Failed retention passes (a deletion the store refused, such as credentials without delete permission); replication goes on."
    );
    describe_counter!(
        REPLICA_OPERATIONS,
        "Object store requests by backend type and operation (GET, PUT, LIST, DELETE, HEAD)."
    );
    describe_counter!(
        REPLICA_REQUESTS,
        "Requests to one replica's store by kind (put, get, list, delete, head), drills included."
    );
    describe_counter!(
        REPLICA_OPERATION_BYTES,
        Unit::Bytes,
        "Object store bytes by backend type and operation."
    );
    describe_gauge!(DATABASES, "Configured databases by worker state.");
    describe_gauge!(
        DATABASES_PARKED,
        "Replicating databases that are idle and parked (closed down to one descriptor)."
    );
    describe_counter!(RELOADS, "Configuration reloads by result (ok, failed).");
    describe_gauge!(
        RELOAD_OK,
        "1 if the last configuration reload applied without errors."
    );
    describe_gauge!(BUILD_INFO, "Always 1; the version label carries the build.");
}
