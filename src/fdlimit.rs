//! The open-files budget. Every open database holds a few descriptors (the SQLite connections'
//! database, WAL and shm files, and the locked database file), so a daemon of thousands of
//! databases meets `RLIMIT_NOFILE` (often a hard 20,000 or less in containers); idle databases
//! are parked down to one descriptor (`Db::park`), early when descriptors are [`scarce`]. When
//! the daemon meets the limit all the same, every database fails at once, each with its own
//! error; the daemon says so once, naming the limit and what it would take, and the databases'
//! own messages go to debug (their state still shows the error) instead of a storm of
//! identical lines.
//!
//! SQLite reports an exhausted table as "unable to open database file", hiding the errno, so
//! exhaustion is recognised by counting `/proc/self/fd` after a failure, not from the message.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use tracing::{error, info, warn};

/// Descriptors an open database holds, as measured (`bench/`: 6.00 per database at 1,000).
pub const PER_DATABASE: u64 = 6;
/// Descriptors a parked database holds (see `Db::park`): its locked database file.
pub const PER_PARKED: u64 = 1;
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

/// Descriptors this process has open. Linux 6.2 and later give the count as the size of
/// `/proc/self/fd` (one stat, from the descriptor bitmap); older kernels say 0 there, and the
/// directory is listed instead, which at 10,000 descriptors was half of an idle daemon's CPU.
fn open_now() -> Option<u64> {
    if let Ok(m) = std::fs::metadata("/proc/self/fd")
        && m.len() > 0
    {
        return Some(m.len());
    }
    match std::fs::read_dir("/proc/self/fd") {
        Ok(d) => Some(d.count() as u64),
        // Listing needs a descriptor of its own: with none left, the count is the limit.
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(nix::libc::EMFILE | nix::libc::ENFILE)
            ) =>
        {
            limit()
        }
        Err(_) => None,
    }
}

/// When exhaustion was last seen, and the last count of descriptors (see `counts` for how
/// often it is taken).
static SEEN: Mutex<Option<Instant>> = Mutex::new(None);
/// Descriptors open and the soft limit, and when they were counted.
type Counts = Option<(u64, u64)>;
static COUNTED: Mutex<Option<(Instant, Counts)>> = Mutex::new(None);
static REPORTED: Mutex<Option<Instant>> = Mutex::new(None);
/// A failure within this long of the last sign of exhaustion is blamed on it: descriptors come
/// and go as databases fail and retry, so one count can miss it.
const STICKY: Duration = Duration::from_secs(30);

/// Descriptors open and the soft limit, counted again if the last count is older than
/// `max_age`.
fn counts(now: Instant, max_age: Duration) -> Counts {
    let mut c = COUNTED.lock().expect("fd count");
    if let Some((at, counts)) = *c
        && now.duration_since(at) < max_age
    {
        return counts;
    }
    let counts = open_now().zip(limit());
    *c = Some((now, counts));
    counts
}

/// Whether the process is within a few descriptors of its limit, by a count at most
/// `max_age` old.
fn near_limit(now: Instant, max_age: Duration) -> bool {
    counts(now, max_age).is_some_and(|(open, limit)| open + MARGIN >= limit)
}

/// Whether descriptors are getting scarce (half the limit is open): idle databases then park
/// after a few seconds instead of `park_after` (see `Db::park`), so a daemon of thousands of
/// databases fits a limit that holds only a fraction of them open.
pub fn scarce() -> bool {
    counts(Instant::now(), Duration::from_secs(1)).is_some_and(|(open, limit)| open * 2 >= limit)
}

/// After a failure with message `error`: whether the process is out of descriptors (the
/// message says so, or SQLite could not open a file while the process is near its limit; and
/// for 30 s after either). The first time (and every 10 minutes while it lasts) it logs one
/// error saying so; callers then log their own failure at debug level.
pub fn exhausted(error: &str) -> bool {
    let now = Instant::now();
    let said = error.contains("Too many open files")
        || error.contains("os error 24")
        || error.contains("os error 23");
    let cantopen = error.contains("unable to open database file");
    let out = {
        let mut seen = SEEN.lock().expect("fd seen");
        let sticky = seen.is_some_and(|t| now.duration_since(t) < STICKY);
        // The first "unable to open" counts descriptors afresh (at most every 10 ms): a count
        // from a second ago, when databases were still opening, would miss the exhaustion and
        // let every database that fails meanwhile log its own error. While it lasts, the
        // count of a second ago is enough to keep it going.
        let fresh = if sticky {
            Duration::from_secs(1)
        } else {
            Duration::from_millis(10)
        };
        if said || (cantopen && near_limit(now, fresh)) {
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

/// At start and after a reload, once per change: says when the configured databases cannot
/// all be open at once. If they fit parked with room left for a tenth of them (at least 64)
/// to be open at once, idle ones park early (see [`scarce`]); otherwise it warns, before they
/// fail one by one.
pub fn check_budget(databases: usize) {
    static WARNED_FOR: Mutex<Option<usize>> = Mutex::new(None);
    let Some(limit) = limit() else { return };
    let need = needed(databases as u64);
    let mut w = WARNED_FOR.lock().expect("fd budget");
    if need <= limit || *w == Some(databases) {
        return;
    }
    *w = Some(databases);
    let (parked, open_at_once) = budget(databases as u64, limit);
    let busy = busy_room(databases as u64);
    if open_at_once >= busy {
        info!(
            databases,
            limit,
            needed_open = need,
            needed_parked = parked,
            open_at_once,
            "the configured databases cannot all be open under the open files limit: idle ones are parked (one descriptor each) after a few seconds instead of park_after"
        );
    } else {
        warn!(
            databases,
            limit,
            needed = need,
            needed_parked = parked,
            open_at_once,
            "the open files limit is too low for the configured databases: each needs about {PER_DATABASE} descriptors open and {PER_PARKED} parked, and with all parked there is room for only {open_at_once} to be open at once (fewer than {busy}); raise LimitNOFILE (systemd) or `ulimit -n`, or some databases will fail to open"
        );
    }
}

/// Descriptors `databases` hold all parked, and how many of them can then be open at once
/// under `limit`.
fn budget(databases: u64, limit: u64) -> (u64, u64) {
    let parked = BASE + databases * PER_PARKED;
    let open = limit.saturating_sub(parked) / (PER_DATABASE - PER_PARKED);
    (parked, open.min(databases))
}

/// How many databases must be able to be open at once for a limit to be enough: a tenth of
/// them, at least 64 (or all, if fewer). Databases busy at the same moment are a fraction of
/// a large fleet; the rest wait parked, and one that is woken reopens in a few milliseconds.
fn busy_room(databases: u64) -> u64 {
    (databases / 10).max(64).min(databases)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_far_from_its_limit_is_not_exhausted() {
        assert!(!exhausted("/srv/a.db: disk I/O error"));
        assert_eq!(needed(10_000), 60_064);
    }

    #[test]
    fn a_limit_is_enough_when_a_tenth_of_the_databases_fit_open_beside_the_parked_rest() {
        // bench/scale.sh: 10,100 databases replicate under the sandbox's hard 20,000.
        let (parked, open) = budget(10_100, 20_000);
        assert_eq!(parked, 10_164);
        assert!(open >= busy_room(10_100), "{open}");
        // The supervisor test's 60 databases under 200: only 15 fit open at once.
        assert!(budget(60, 200).1 < busy_room(60));
        assert_eq!(busy_room(10), 10);
        assert!(budget(100_000, 20_000).1 < busy_room(100_000));
    }

    #[test]
    fn open_descriptors_are_counted() {
        let before = open_now().expect("count");
        let files: Vec<_> = (0..50)
            .map(|_| std::fs::File::open("/dev/null").unwrap())
            .collect();
        let during = open_now().expect("count");
        let listed = std::fs::read_dir("/proc/self/fd").unwrap().count() as u64;
        drop(files);
        // Other tests open and close files meanwhile: a margin, not equality.
        assert!(during >= before + 40, "{before} -> {during}");
        assert!(during.abs_diff(listed) < 20, "{during} vs {listed} listed");
    }
}
