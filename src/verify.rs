//! `verify`: whether a replica would restore, checked without writing a database.
//!
//! The rules are restore's own (`restore::plan` and `run_plan`), so a grade means what a
//! restore would do. Per generation:
//!
//! * **FAILURE** — a restore of the newest state would fail or be wrong: no WAL index where
//!   one is needed between the newest snapshot and the newest index, an index whose first
//!   segment is not at offset 0, and with `--read-data` an object that does not download,
//!   decrypt or decode (LZ4 checksums), a WAL index whose frames break the checksum chain or
//!   whose segments leave a gap or overlap, a snapshot that is not a whole SQLite database.
//! * **WARNING** — the newest state restores, but something is off: a generation without a
//!   snapshot (restore skips it, retention removes it), a gap between older snapshots (a
//!   point-in-time restore there fails), segments below the oldest snapshot that no restore
//!   reads, frames after an index's last commit (restore ignores them).
//! * **OK** — nothing of the above.
//!
//! A network error is never a grade: reads are retried, and a replica that stays unreachable
//! is [`VerifyError`], which the CLI reports with its own exit code.

use std::collections::BTreeMap;
use std::io::{self, Read};
use std::time::Duration;

use serde::Serialize;
use tokio_util::io::SyncIoBridge;
use tracing::warn;

use crate::compress;
use crate::replica::{ReplicaClient, SnapshotInfo, StoreError, WalSegmentInfo};
use crate::wal::{StreamError, StreamWalk};

/// How bad a generation (or a replica: its worst generation) is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Grade {
    Ok,
    Warning,
    Failure,
}

impl Grade {
    pub fn as_str(self) -> &'static str {
        match self {
            Grade::Ok => "OK",
            Grade::Warning => "WARNING",
            Grade::Failure => "FAILURE",
        }
    }
    /// The CLI's exit code: 0, 1, 2.
    pub fn exit_code(self) -> i32 {
        self as i32
    }
}

/// Which objects are downloaded and decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ReadData {
    /// Listings only.
    None,
    /// Every snapshot and every WAL index from the oldest snapshot on.
    All,
    /// This percentage of them (each snapshot and each whole WAL index drawn at random).
    Subset(u8),
}

impl std::str::FromStr for ReadData {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "none" => Ok(ReadData::None),
            "all" => Ok(ReadData::All),
            _ => {
                let n = s.strip_suffix('%').unwrap_or(s);
                match n.parse::<u8>() {
                    Ok(p) if (1..=100).contains(&p) => Ok(ReadData::Subset(p)),
                    _ => Err(format!(
                        "{s:?}: expected none, all or a percentage from 1% to 100%"
                    )),
                }
            }
        }
    }
}

#[derive(Debug, Clone)]
pub struct VerifyOptions {
    /// Only this generation.
    pub generation: Option<String>,
    pub read_data: ReadData,
    /// Attempts per listing or object before the replica counts as unreachable.
    pub attempts: u32,
    pub backoff: Duration,
}

impl Default for VerifyOptions {
    fn default() -> Self {
        VerifyOptions {
            generation: None,
            read_data: ReadData::None,
            attempts: 5,
            backoff: Duration::from_millis(500),
        }
    }
}

/// One thing found, with the object at fault (relative to the replica root) when there is one.
#[derive(Debug, Clone, Serialize)]
pub struct Finding {
    pub grade: Grade,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub object: Option<String>,
    pub message: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct GenerationReport {
    pub generation: String,
    pub grade: Grade,
    pub snapshots: usize,
    /// The newest snapshot's index, and the newest WAL index.
    pub newest_snapshot: Option<u32>,
    pub newest_index: Option<u32>,
    pub segments: usize,
    pub objects_read: usize,
    pub bytes_read: u64,
    pub findings: Vec<Finding>,
}

#[derive(Debug, Clone, Serialize)]
pub struct VerifyReport {
    pub replica: String,
    pub url: String,
    pub grade: Grade,
    pub read_data: ReadData,
    pub generations: Vec<GenerationReport>,
}

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("replica {replica}: cannot list {what}: {source}")]
    List {
        replica: String,
        what: String,
        source: StoreError,
    },
    #[error("replica {replica}: cannot read {key} after {attempts} attempts: {reason}")]
    Read {
        replica: String,
        key: String,
        attempts: u32,
        reason: String,
    },
    #[error("replica {replica} has no generation {generation}")]
    NoGeneration { replica: String, generation: String },
}

/// Checks the replica `name` behind `client`.
pub async fn verify(
    name: &str,
    client: &ReplicaClient,
    opts: &VerifyOptions,
) -> Result<VerifyReport, VerifyError> {
    let list_err = |what: String| {
        let replica = name.to_string();
        move |source| VerifyError::List {
            replica,
            what,
            source,
        }
    };
    let mut generations = retry(opts, || client.generations())
        .await
        .map_err(list_err("generations".into()))?;
    if let Some(want) = &opts.generation {
        if !generations.contains(want) {
            return Err(VerifyError::NoGeneration {
                replica: name.to_string(),
                generation: want.clone(),
            });
        }
        generations.retain(|g| g == want);
    }
    let mut reports = Vec::new();
    for g in generations {
        let snaps = retry(opts, || client.snapshots(&g))
            .await
            .map_err(list_err(format!("the snapshots of generation {g}")))?;
        let segs = retry(opts, || client.wal_segments(&g))
            .await
            .map_err(list_err(format!("the WAL of generation {g}")))?;
        let mut report = check_listing(client, &g, &snaps, &segs);
        if opts.read_data != ReadData::None {
            read_data(name, client, opts, &snaps, &segs, &mut report).await?;
        }
        report.grade = report
            .findings
            .iter()
            .map(|f| f.grade)
            .max()
            .unwrap_or(Grade::Ok);
        reports.push(report);
    }
    Ok(VerifyReport {
        replica: name.to_string(),
        url: client.url(),
        grade: reports.iter().map(|r| r.grade).max().unwrap_or(Grade::Ok),
        read_data: opts.read_data,
        generations: reports,
    })
}

/// The checks a listing allows.
fn check_listing(
    client: &ReplicaClient,
    generation: &str,
    snaps: &[SnapshotInfo],
    segs: &[WalSegmentInfo],
) -> GenerationReport {
    let mut findings = Vec::new();
    let by_index = group(segs);
    let newest_snapshot = snaps.iter().map(|s| s.index).max();
    let oldest_snapshot = snaps.iter().map(|s| s.index).min();
    let newest_index = by_index.keys().next_back().copied();
    let generation_dir = format!("generations/{generation}");
    match (newest_snapshot, oldest_snapshot) {
        (None, _) | (_, None) => findings.push(Finding {
            grade: Grade::Warning,
            object: Some(generation_dir.clone()),
            message: "no snapshot: a restore cannot start from this generation (retention \
                      removes it)"
                .into(),
        }),
        (Some(newest), Some(oldest)) => {
            // The snapshot restore starts from (see `restore::plan`): the newest whose own index
            // has its offset-0 segment, else the newest.
            let replays = |i: u32| by_index.get(&i).is_some_and(|s| s[0].offset == 0);
            let from = snaps
                .iter()
                .map(|s| s.index)
                .filter(|&i| replays(i))
                .max()
                .unwrap_or(newest);
            if from < newest && newest_index.is_none_or(|n| n < newest) {
                findings.push(Finding {
                    grade: Grade::Warning,
                    object: Some(client.snapshot_key(generation, newest)),
                    message: format!(
                        "WAL index {newest:08x} is not uploaded yet (the daemon stopped right \
                         after this snapshot?): a restore starts from snapshot {from:08x}"
                    ),
                });
            }
            // The newest state: every index from that snapshot on, as restore reads it.
            let last = newest_index.unwrap_or(from).max(from);
            for i in from..=last {
                match by_index.get(&i) {
                    None => findings.push(Finding {
                        grade: Grade::Failure,
                        object: Some(generation_dir.clone()),
                        message: format!(
                            "WAL index {i:08x} is missing: a restore of the newest state \
                             (snapshot {from:08x} to index {last:08x}) fails"
                        ),
                    }),
                    Some(s) if s[0].offset != 0 => findings.push(Finding {
                        grade: Grade::Failure,
                        object: Some(client.wal_segment_key(&s[0].pos())),
                        message: format!(
                            "WAL index {i:08x} has no segment at offset 0: a restore fails"
                        ),
                    }),
                    Some(_) => {}
                }
            }
            // Older states: point-in-time restores from the older snapshots.
            for i in oldest..from {
                match by_index.get(&i) {
                    None => findings.push(Finding {
                        grade: Grade::Warning,
                        object: Some(generation_dir.clone()),
                        message: format!(
                            "WAL index {i:08x} is missing: point-in-time restores from \
                             snapshots before it, to index {i:08x} or later, fail"
                        ),
                    }),
                    Some(s) if s[0].offset != 0 => findings.push(Finding {
                        grade: Grade::Warning,
                        object: Some(client.wal_segment_key(&s[0].pos())),
                        message: format!(
                            "WAL index {i:08x} has no segment at offset 0: point-in-time \
                             restores through it fail"
                        ),
                    }),
                    Some(_) => {}
                }
            }
            let below: Vec<&WalSegmentInfo> = segs.iter().filter(|s| s.index < oldest).collect();
            if let Some(first) = below.first() {
                findings.push(Finding {
                    grade: Grade::Warning,
                    object: Some(client.wal_segment_key(&first.pos())),
                    message: format!(
                        "{} WAL segment(s) below the oldest snapshot ({oldest:08x}) are never \
                         restored (retention should have removed them)",
                        below.len()
                    ),
                });
            }
        }
    }
    GenerationReport {
        generation: generation.to_string(),
        grade: Grade::Ok,
        snapshots: snaps.len(),
        newest_snapshot,
        newest_index,
        segments: segs.len(),
        objects_read: 0,
        bytes_read: 0,
        findings,
    }
}

fn group(segs: &[WalSegmentInfo]) -> BTreeMap<u32, Vec<WalSegmentInfo>> {
    let mut by_index: BTreeMap<u32, Vec<WalSegmentInfo>> = BTreeMap::new();
    for s in segs {
        by_index.entry(s.index).or_default().push(s.clone());
    }
    for v in by_index.values_mut() {
        v.sort_by_key(|s| s.offset);
    }
    by_index
}

/// Downloads and decodes what `opts.read_data` selects: every chosen snapshot, and every
/// chosen WAL index whole (its frames form one checksum chain across its segments).
async fn read_data(
    name: &str,
    client: &ReplicaClient,
    opts: &VerifyOptions,
    snaps: &[SnapshotInfo],
    segs: &[WalSegmentInfo],
    report: &mut GenerationReport,
) -> Result<(), VerifyError> {
    let oldest = snaps.iter().map(|s| s.index).min().unwrap_or(0);
    let chosen = |_: u32| match opts.read_data {
        ReadData::None => false,
        ReadData::All => true,
        ReadData::Subset(p) => rand::random_range(0..100u32) < u32::from(p),
    };
    for s in snaps {
        if !chosen(s.index) {
            continue;
        }
        let key = client.snapshot_key(&s.generation, s.index);
        let check = retry_read(name, opts, &key, || async {
            let body = client.open_snapshot(&s.generation, s.index).await?;
            Ok(blocking(move || check_snapshot(SyncIoBridge::new(body))).await)
        })
        .await?
        .and_then(|verdict| verdict);
        report.objects_read += 1;
        report.bytes_read += s.size;
        if let Err(why) = check {
            report.findings.push(Finding {
                grade: Grade::Failure,
                object: Some(key),
                message: why,
            });
        }
    }
    for (index, segs) in group(segs) {
        if index < oldest || !chosen(index) {
            continue;
        }
        let mut walk = IndexWalk::default();
        let mut failed = false;
        for seg in &segs {
            let key = client.wal_segment_key(&seg.pos());
            if seg.offset != walk.len {
                // What restore reports as a segment gap (or an overlap).
                report.findings.push(Finding {
                    grade: Grade::Failure,
                    object: Some(key.clone()),
                    message: format!(
                        "segment starts at offset {} but index {index:08x}'s segments before it \
                         end at {}: a restore fails",
                        seg.offset, walk.len
                    ),
                });
                failed = true;
                break;
            }
            let w = walk.clone();
            let res = retry_read(name, opts, &key, || {
                let mut w = w.clone();
                async move {
                    let body = client.open_wal_segment(&seg.pos()).await?;
                    Ok(blocking(move || {
                        let scratch = compress::Scratch::default();
                        compress::decode(SyncIoBridge::new(body), &scratch, |b| {
                            w.feed(b)
                                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
                        })?;
                        Ok(w)
                    })
                    .await)
                }
            })
            .await?;
            report.objects_read += 1;
            report.bytes_read += seg.size;
            match res {
                Ok(w) => walk = w,
                Err(why) => {
                    report.findings.push(Finding {
                        grade: Grade::Failure,
                        object: Some(key),
                        message: why.to_string(),
                    });
                    failed = true;
                    break;
                }
            }
        }
        if failed {
            continue;
        }
        let last_key = client.wal_segment_key(&segs[segs.len() - 1].pos());
        if let Some(why) = walk.finish() {
            report.findings.push(Finding {
                grade: why.0,
                object: Some(last_key),
                message: why.1,
            });
        }
    }
    Ok(())
}

/// A snapshot decodes (decryption, LZ4 checksums) into a whole SQLite database file.
fn check_snapshot(r: impl Read + Send) -> io::Result<Result<(), String>> {
    let mut head = Vec::with_capacity(100);
    let len = compress::decode_parallel(r, 2, |b| {
        let take = (100 - head.len()).min(b.len());
        head.extend_from_slice(&b[..take]);
        Ok(())
    })?;
    let page_size = match crate::restore::database_page_size(&head) {
        Ok(ps) => u64::from(ps),
        Err(why) => return Ok(Err(format!("decodes, but {why}"))),
    };
    if !len.is_multiple_of(page_size) {
        return Ok(Err(format!(
            "decodes to {len} bytes, not a whole number of {page_size}-byte pages"
        )));
    }
    Ok(Ok(()))
}

/// One WAL index walked across its segments ([`StreamWalk`]: header, salts, checksum chain,
/// page 0).
#[derive(Debug, Clone, Default)]
struct IndexWalk {
    /// Decoded bytes so far (where the next segment must start).
    len: u64,
    walk: StreamWalk,
}

impl IndexWalk {
    fn feed(&mut self, data: &[u8]) -> Result<(), StreamError> {
        self.len += data.len() as u64;
        self.walk.feed(data, |_| Ok::<(), StreamError>(()))
    }

    /// What the end of the index says, if anything is wrong.
    fn finish(&self) -> Option<(Grade, String)> {
        let Some(s) = self.walk.scanner() else {
            return Some((
                Grade::Failure,
                format!(
                    "the index ends after {} bytes, inside its WAL header",
                    self.len
                ),
            ));
        };
        if self.walk.partial() > 0 {
            return Some((
                Grade::Failure,
                format!("the index ends inside a frame (at WAL offset {})", self.len),
            ));
        }
        if s.offset() > s.last_commit() {
            return Some((
                Grade::Warning,
                format!(
                    "{} bytes of frames after the index's last commit (restore ignores them)",
                    s.offset() - s.last_commit()
                ),
            ));
        }
        None
    }
}

/// A damaged object (as opposed to a failed read).
fn is_damage(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::InvalidData | io::ErrorKind::UnexpectedEof
    )
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    tokio::task::spawn_blocking(f).await.expect("verify task")
}

/// Reads an object; the inner result is the object's own verdict (damage is not retried),
/// the outer one a read that failed every attempt.
async fn retry_read<T, F, Fut>(
    replica: &str,
    opts: &VerifyOptions,
    key: &str,
    mut attempt: F,
) -> Result<Result<T, String>, VerifyError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<io::Result<T>, StoreError>>,
{
    let mut n = 0;
    let mut delay = opts.backoff;
    loop {
        n += 1;
        let (err, retryable) = match attempt().await {
            Ok(Ok(v)) => return Ok(Ok(v)),
            Ok(Err(e)) if is_damage(&e) => return Ok(Err(format!("damaged: {e}"))),
            Ok(Err(e)) => (e.to_string(), true),
            // Not found (removed since the listing) or not decryptable with these keys: not
            // something a retry fixes, and not proof of damage either.
            Err(e) => (e.to_string(), e.is_retryable()),
        };
        if !retryable || n >= opts.attempts.max(1) {
            return Err(VerifyError::Read {
                replica: replica.to_string(),
                key: key.to_string(),
                attempts: n,
                reason: err,
            });
        }
        warn!(key, attempt = n, error = %err, retry_in = ?delay, "verify read failed; retrying");
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(10));
    }
}

async fn retry<T, F, Fut>(opts: &VerifyOptions, mut attempt: F) -> Result<T, StoreError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, StoreError>>,
{
    let mut n = 0;
    let mut delay = opts.backoff;
    loop {
        n += 1;
        match attempt().await {
            Err(e) if n < opts.attempts.max(1) && e.is_retryable() => {
                warn!(attempt = n, error = %e, retry_in = ?delay, "verify listing failed; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(10));
            }
            other => return other,
        }
    }
}
