//! The open-files budget. Every database holds a few descriptors (the SQLite connection's
//! database, WAL and shm files, the shadow WAL, the watch), so a daemon of thousands of
//! databases meets `RLIMIT_NOFILE` (often a hard 20,000 or less in containers). When it does,
//! every database fails at once, each with its own error; the daemon says so once, naming the
//! limit and what it would take, and the databases' own messages go to debug (their state still
//! shows the error) instead of a storm of identical lines.
//!
//! SQLite reports an exhausted table as "unable to open database file", hiding the errno, so
//! exhaustion is recognised by counting `/proc/self/fd` after a failure, not from the message.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use tracing::{error, warn};

/// Descriptors an idle database holds, as measured (`bench/`: 6.00 per database at 1,000).
pub const PER_DATABASE: u64 = 6;
/// What the daemon holds besides its databases (logs, sockets, the runtime).
const BASE: u64 = 64;
/// Closer than this to the limit counts as exhausted: a replica upload or a restore needs a
/// few more than an idle database.
const MARGIN: u64 = 16;
/// How often the daemon repeats that it is out of descriptors while it still is.
const REPEAT: Duration = Duration::from_secs(600);

/// The soft limit on open files (None: unknown).
pub fn limit() -> Option<u64> {
    nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .ok()
        .map(|(soft, _)| soft)
}

/// Descriptors this process has open.
fn open_now() -> Option<u64> {
    std::fs::read_dir("/proc/self/fd")
        .ok()
        .map(|d| d.count() as u64)
}

/// When exhaustion was last seen, and the last count of descriptors (it reads a directory of
/// up to the limit's size: at most once a second).
static SEEN: Mutex<Option<Instant>> = Mutex::new(None);
static COUNTED: Mutex<Option<(Instant, bool)>> = Mutex::new(None);
static REPORTED: Mutex<Option<Instant>> = Mutex::new(None);
/// A failure within this long of the last sign of exhaustion is blamed on it: descriptors come
/// and go as databases fail and retry, so one count can miss it.
const STICKY: Duration = Duration::from_secs(30);

/// Whether the process is within a few descriptors of its limit now (cached for a second).
fn near_limit(now: Instant) -> bool {
    let mut c = COUNTED.lock().expect("fd count");
    if let Some((at, near)) = *c
        && now.duration_since(at) < Duration::from_secs(1)
    {
        return near;
    }
    let near = match (open_now(), limit()) {
        (Some(open), Some(limit)) => open + MARGIN >= limit,
        _ => false,
    };
    *c = Some((now, near));
    near
}

/// After a failure with message `error`: whether the process is out of descriptors (the
/// message says so, or SQLite could not open a file while the process is near its limit; and
/// for 30 s after either). The first time (and every 10 minutes while it lasts) it logs one
/// error saying so; callers then log their own failure at debug level.
pub fn exhausted(error: &str) -> bool {
    let now = Instant::now();
    let sign = error.contains("Too many open files")
        || error.contains("os error 24")
        || error.contains("os error 23")
        || (error.contains("unable to open database file") && near_limit(now));
    let out = {
        let mut seen = SEEN.lock().expect("fd seen");
        if sign {
            *seen = Some(now);
        }
        seen.is_some_and(|t| now.duration_since(t) < STICKY)
    };
    if out {
        let mut r = REPORTED.lock().expect("fd reported");
        if r.is_none_or(|t| now.duration_since(t) >= REPEAT) {
            *r = Some(now);
            let limit = limit().unwrap_or(0);
            error!(
                limit,
                "out of open files: databases fail to open or sync until descriptors are free; each database needs about {PER_DATABASE}, so raise LimitNOFILE (systemd) or `ulimit -n` (at least {PER_DATABASE} per database plus {BASE}), or replicate fewer databases per daemon; their own errors are logged at debug level while this lasts"
            );
        }
    }
    out
}

/// Descriptors `databases` need, with the daemon's own.
pub fn needed(databases: u64) -> u64 {
    BASE + databases * PER_DATABASE
}

/// At start and after a reload: warns once per change when the configured databases need more
/// descriptors than the limit allows, before they fail one by one.
pub fn check_budget(databases: usize) {
    static WARNED_FOR: Mutex<Option<usize>> = Mutex::new(None);
    let Some(limit) = limit() else { return };
    let need = needed(databases as u64);
    let mut w = WARNED_FOR.lock().expect("fd budget");
    if need > limit && *w != Some(databases) {
        *w = Some(databases);
        warn!(
            databases,
            limit,
            needed = need,
            "the open files limit is too low for the configured databases: each needs about {PER_DATABASE} descriptors; raise LimitNOFILE (systemd) or `ulimit -n`, or some databases will fail to open"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_far_from_its_limit_is_not_exhausted() {
        assert!(!exhausted("/srv/a.db: disk I/O error"));
        assert_eq!(needed(10_000), 60_064);
    }
}
