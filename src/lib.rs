//! litestreamd: continuous replication of SQLite databases in the Litestream v0.3 layout.
//!
//! Modules, one concept each (see `docs/ARCHITECTURE.md`):
//! * [`wal`] — the SQLite WAL format and checksum;
//! * [`layout`] — generation, position and object names of the v0.3 layout;
//! * [`compress`] — LZ4 frames and streaming uploads;
//! * [`replica`] — replica targets (object stores) and the layout on top of them;
//! * [`db`] — the database side of the engine: read lock, continuity, checkpoints;
//! * [`shadow`] — the shadow WAL and the meta directory: the one owner of their layout;
//! * [`lineage`] — which database a replica path belongs to;
//! * [`replicator`] — the replica side: segment and snapshot uploads, retention, status;
//! * [`worker`] — one database's tasks and their shutdown;
//! * [`restore`] — restore and point-in-time restore;
//! * [`standby`] — applying a primary's commits to a standby database, one transaction each;
//! * [`status`] — the status types of databases and replicas (protocol v1);
//! * [`config`] — configuration files;
//! * [`import`] — converting a Litestream 0.3 `litestream.yml` into per-database files;
//! * [`supervisor`] — the daemon's workers, reloads and shutdown;
//! * [`telemetry`] — Prometheus metrics;
//! * [`notify`] — systemd notifications;
//! * [`watch`] — inotify wake-ups when a database file is renamed over or deleted.

pub mod compress;
pub mod config;
pub mod control;
pub mod crypt;
pub mod db;
pub mod drill;
pub mod durable;
pub mod fdlimit;
pub mod import;
pub mod layout;
pub mod lease;
pub mod lineage;
pub mod notify;
pub mod replica;
pub mod replicator;
pub mod restore;
pub mod shadow;
pub mod standby;
pub mod status;
pub mod supervisor;
pub mod telemetry;
pub mod tui;
pub mod verify;
pub mod wal;
pub mod watch;
pub mod worker;
