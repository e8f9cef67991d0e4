//! The standby's apply step (issue 19): a primary's committed transactions written into a
//! local copy of its database so that applications reading that copy at any moment see a
//! whole commit of the primary, never a torn one.
//!
//! Pages are written through SQLite itself, with the `sqlite_dbpage` virtual table (compiled
//! into the bundled SQLite by `.cargo/config.toml`), in one write transaction per commit of the
//! primary, as `sqlite3_rsync` does: readers keep their snapshot until the transaction commits
//! and SQLite's own WAL isolation does the rest, with no locking protocol of ours to get wrong.
//! A database that shrank (VACUUM) is cut to the commit's size in the same transaction.
//!
//! The standby is the primary page for page except three fields of page 1's header that
//! SQLite rewrites itself whenever a commit writes page 1 (the file change counter, the
//! version-valid-for number and the writer's SQLite version, bytes 24-27 and 92-99): they count
//! the standby's own commits. WAL-mode readers do not use them; a byte comparison with the
//! primary or a restore must leave them out.
//!
//! What follows a replica (bootstrap from the newest snapshot, probing for the next segment,
//! healing after a gap or a new generation, lag, promotion) builds on this; it is not wired
//! into the daemon yet.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, TransactionBehavior};

use crate::wal::FrameHeader;

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("standby database {}: {source}", path.display())]
    Sqlite {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error(
        "standby database {}: page {pgno} is {len} bytes, its page size is {page_size}",
        path.display()
    )]
    PageSize {
        path: PathBuf,
        pgno: u32,
        len: usize,
        page_size: u32,
    },
    #[error("standby database {}: a commit of size 0 pages", path.display())]
    EmptyCommit { path: PathBuf },
    #[error("standby database {}: journal_mode is {mode}, not wal", path.display())]
    NotWal { path: PathBuf, mode: String },
}

/// One committed transaction of the primary: the newest version of each page it wrote, and
/// the database's size in pages after it (the commit frame's).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Commit {
    pub pages: BTreeMap<u32, Vec<u8>>,
    pub db_pages: u32,
}

/// Groups WAL frames, in order and already checked (salts, checksum chain), into commits.
/// Frames after the last commit frame stay pending: a transaction the primary had not
/// committed is never applied.
#[derive(Debug, Default)]
pub struct Commits {
    pending: BTreeMap<u32, Vec<u8>>,
}

impl Commits {
    /// Adds one frame; returns the commit it completes, if it is a commit frame.
    pub fn push(&mut self, h: &FrameHeader, page: &[u8]) -> Option<Commit> {
        self.pending.insert(h.pgno, page.to_vec());
        h.is_commit().then(|| Commit {
            pages: std::mem::take(&mut self.pending),
            db_pages: h.commit_size,
        })
    }

    /// Frames seen since the last commit frame (dropped if the WAL restarts before one).
    pub fn uncommitted(&self) -> usize {
        self.pending.len()
    }
}

/// The writer of a standby database: the only connection that writes it.
pub struct Applier {
    path: PathBuf,
    conn: Connection,
    page_size: u32,
}

impl Applier {
    /// Opens the standby database (a restore's output, in WAL mode like its primary).
    pub fn open(path: &Path) -> Result<Applier, ApplyError> {
        let err = |source| ApplyError::Sqlite {
            path: path.to_path_buf(),
            source,
        };
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(err)?;
        // Readers hold the WAL's read marks for as long as they read; a busy checkpoint waits
        // for them rather than failing the apply.
        conn.busy_timeout(Duration::from_secs(5)).map_err(err)?;
        let mode: String = conn
            .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))
            .map_err(err)?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(ApplyError::NotWal {
                path: path.to_path_buf(),
                mode,
            });
        }
        let page_size: u32 = conn
            .query_row("PRAGMA page_size", [], |r| r.get(0))
            .map_err(err)?;
        Ok(Applier {
            path: path.to_path_buf(),
            conn,
            page_size,
        })
    }

    pub fn page_size(&self) -> u32 {
        self.page_size
    }

    /// Writes one commit of the primary in one transaction of the standby: readers see the
    /// database before it or after it, nothing in between.
    pub fn apply(&mut self, c: &Commit) -> Result<(), ApplyError> {
        if c.db_pages == 0 {
            return Err(ApplyError::EmptyCommit {
                path: self.path.clone(),
            });
        }
        if let Some((&pgno, p)) = c
            .pages
            .iter()
            .find(|(_, p)| p.len() != self.page_size as usize)
        {
            return Err(ApplyError::PageSize {
                path: self.path.clone(),
                pgno,
                len: p.len(),
                page_size: self.page_size,
            });
        }
        let path = &self.path;
        let err = |source| ApplyError::Sqlite {
            path: path.clone(),
            source,
        };
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(err)?;
        {
            let mut put = tx
                .prepare_cached("INSERT INTO sqlite_dbpage(pgno, data) VALUES (?1, ?2)")
                .map_err(err)?;
            // Pages past the commit's size were written earlier in the transaction and then
            // cut off by it (SQLite does the same when it reads the WAL).
            for (pgno, data) in c.pages.range(..=c.db_pages) {
                put.execute((pgno, data)).map_err(err)?;
            }
            let have: u32 = tx
                .query_row("PRAGMA page_count", [], |r| r.get(0))
                .map_err(err)?;
            if have > c.db_pages {
                // A NULL page cuts the database before it (SQLite 3.44+).
                put.execute((c.db_pages + 1, rusqlite::types::Null))
                    .map_err(err)?;
            }
        }
        tx.commit().map_err(err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wal::{FRAME_HEADER_SIZE, Scanner, WAL_HEADER_SIZE, WalHeader};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

    /// Page 1's change counter, version-valid-for and SQLite version number.
    const OWN_HEADER: [std::ops::Range<usize>; 2] = [24..28, 92..100];
    const ACCOUNTS: i64 = 100;
    const TOTAL: i64 = ACCOUNTS * 100;

    fn primary(path: &Path) -> Connection {
        let c = Connection::open(path).unwrap();
        c.execute_batch(
            "PRAGMA journal_mode=WAL; PRAGMA wal_autocheckpoint=0;
             CREATE TABLE acct(id INTEGER PRIMARY KEY, bal INTEGER NOT NULL);
             CREATE TABLE meta(k INTEGER PRIMARY KEY, n INTEGER NOT NULL);
             CREATE TABLE blob(id INTEGER PRIMARY KEY, v BLOB);
             INSERT INTO meta VALUES (1, 0);",
        )
        .unwrap();
        c.execute(
            "WITH RECURSIVE s(i) AS (SELECT 1 UNION ALL SELECT i+1 FROM s WHERE i < ?1)
             INSERT INTO acct SELECT i, 100 FROM s",
            [ACCOUNTS],
        )
        .unwrap();
        c
    }

    /// Every commit in the primary's WAL, walked with the crate's frame walk.
    fn commits_of(wal: &Path) -> (Vec<Commit>, usize) {
        let b = std::fs::read(wal).unwrap();
        let hdr = WalHeader::parse(&b[..WAL_HEADER_SIZE]).unwrap();
        let mut walk = Scanner::new(&hdr);
        let mut commits = Commits::default();
        let mut out = Vec::new();
        for f in b[WAL_HEADER_SIZE..].chunks_exact(walk.frame_size() as usize) {
            let Ok(h) = walk.push(f) else { break };
            out.extend(commits.push(&h, &f[FRAME_HEADER_SIZE..]));
        }
        (out, commits.uncommitted())
    }

    fn dump(c: &Connection) -> Vec<(String, i64, Vec<u8>)> {
        let mut st = c
            .prepare(
                "SELECT 'acct', id, CAST(bal AS BLOB) FROM acct UNION ALL
                 SELECT 'meta', k, CAST(n AS BLOB) FROM meta UNION ALL
                 SELECT 'blob', id, v FROM blob ORDER BY 1, 2",
            )
            .unwrap();
        st.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .unwrap()
            .map(Result::unwrap)
            .collect()
    }

    /// A reader of the standby during the apply sees only whole commits: the accounts always
    /// sum to the same total, the commit counter never goes back, the b-trees are sound; and
    /// at the end the standby is the primary, its size included after a VACUUM shrank it.
    #[test]
    fn readers_never_see_a_torn_commit_and_the_standby_ends_as_the_primary() {
        let d = tempfile::tempdir().unwrap();
        let (p, s) = (d.path().join("p.db"), d.path().join("s.db"));
        let pc = primary(&p);
        pc.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
            .unwrap();
        // The bootstrap (in the daemon, a restore of the newest snapshot).
        std::fs::copy(&p, &s).unwrap();
        let mut rng = 7u64;
        let mut next = move |m: u64| {
            rng = rng
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (rng >> 33) % m
        };
        for n in 1..=400i64 {
            let (a, b, amt) = (1 + next(100), 1 + next(100), next(50));
            pc.execute_batch(&format!(
                "BEGIN; UPDATE acct SET bal = bal - {amt} WHERE id = {a};
                 UPDATE acct SET bal = bal + {amt} WHERE id = {b};
                 UPDATE meta SET n = {n} WHERE k = 1;
                 INSERT INTO blob(v) VALUES (randomblob({}));
                 {} COMMIT;",
                100 + next(6000),
                if n % 50 == 0 {
                    "DELETE FROM blob WHERE id % 3 = 0;"
                } else {
                    ""
                }
            ))
            .unwrap();
        }
        pc.execute_batch("DELETE FROM blob WHERE id % 2 = 0; VACUUM;")
            .unwrap();
        // A transaction left open on the primary: its frames reach the WAL uncommitted once
        // the page cache spills; they must never be applied.
        pc.execute_batch("PRAGMA cache_size=2; BEGIN; UPDATE acct SET bal = 0;")
            .unwrap();
        pc.execute_batch("INSERT INTO blob(v) SELECT randomblob(8000) FROM blob LIMIT 50;")
            .unwrap();
        let (commits, uncommitted) = commits_of(&p.with_extension("db-wal"));
        assert!(commits.len() >= 402, "{} commits", commits.len());
        assert!(uncommitted > 0, "the open transaction spilled no frame");
        let sizes: Vec<u32> = commits.iter().map(|c| c.db_pages).collect();
        assert!(
            sizes.last() < sizes.iter().max(),
            "the VACUUM shrank the database: {sizes:?}"
        );

        let stop = Arc::new(AtomicBool::new(false));
        let reads = Arc::new(AtomicU64::new(0));
        let reader = {
            let (s, stop, reads) = (s.clone(), stop.clone(), reads.clone());
            std::thread::spawn(move || {
                let c = Connection::open_with_flags(&s, OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
                c.busy_timeout(Duration::from_secs(5)).unwrap();
                let mut last = 0i64;
                loop {
                    // One more read after the stop: it sees the last commit.
                    let stopping = stop.load(Ordering::Relaxed);
                    c.execute_batch("BEGIN").unwrap();
                    let (sum, count): (i64, i64) = c
                        .query_row("SELECT sum(bal), count(*) FROM acct", [], |r| {
                            Ok((r.get(0)?, r.get(1)?))
                        })
                        .unwrap();
                    let n: i64 = c
                        .query_row("SELECT n FROM meta WHERE k = 1", [], |r| r.get(0))
                        .unwrap();
                    let ok: String = c.query_row("PRAGMA quick_check", [], |r| r.get(0)).unwrap();
                    c.execute_batch("COMMIT").unwrap();
                    assert_eq!((sum, count), (TOTAL, ACCOUNTS), "a torn commit at n={n}");
                    assert!(n >= last, "the counter went back from {last} to {n}");
                    assert_eq!(ok, "ok", "at n={n}");
                    last = n;
                    reads.fetch_add(1, Ordering::Relaxed);
                    if stopping {
                        return last;
                    }
                }
            })
        };
        let mut ap = Applier::open(&s).unwrap();
        for (i, c) in commits.iter().enumerate() {
            ap.apply(c).unwrap();
            if i % 8 == 0 {
                // Give the reader a turn between commits as well as during them.
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        stop.store(true, Ordering::Relaxed);
        let last = reader.join().expect("the reader saw a torn state");
        assert!(reads.load(Ordering::Relaxed) > 20, "the reader hardly ran");
        assert_eq!(last, 400);

        pc.execute_batch("ROLLBACK").unwrap();
        let sc = Connection::open(&s).unwrap();
        assert_eq!(dump(&sc), dump(&pc));
        let count =
            |c: &Connection| -> u32 { c.query_row("PRAGMA page_count", [], |r| r.get(0)).unwrap() };
        assert_eq!(count(&sc), count(&pc));
        assert_eq!(count(&sc), *sizes.last().unwrap());
        let ok: String = sc
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .unwrap();
        assert_eq!(ok, "ok");
        // Byte for byte once both are checkpointed (page_count alone would not see a file
        // left longer than its header says: SQLite trusts the header's size), except the three
        // page-1 fields SQLite itself rewrites on every commit that writes page 1 (see the
        // module's comment).
        for c in [&pc, &sc] {
            c.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
                .unwrap();
        }
        let (pb, sb) = (std::fs::read(&p).unwrap(), std::fs::read(&s).unwrap());
        assert_eq!(sb.len(), pb.len(), "file sizes");
        let differ: Vec<usize> = (0..pb.len()).filter(|&i| pb[i] != sb[i]).collect();
        assert!(
            differ
                .iter()
                .all(|i| OWN_HEADER.iter().any(|r| r.contains(i))),
            "the standby's bytes differ from the primary's at {:?}",
            &differ[..differ.len().min(20)]
        );
    }

    #[test]
    fn a_page_of_the_wrong_size_is_refused_by_name() {
        let d = tempfile::tempdir().unwrap();
        let s = d.path().join("s.db");
        drop(primary(&s));
        let mut ap = Applier::open(&s).unwrap();
        let mut c = Commit {
            db_pages: 4,
            ..Default::default()
        };
        c.pages.insert(2, vec![0; 512]);
        let e = ap.apply(&c).unwrap_err().to_string();
        assert!(
            e.contains("s.db") && e.contains("page 2 is 512 bytes"),
            "{e}"
        );
    }
}
