//! The page merge of a restore: the snapshot and the WAL indexes merged by page, straight into
//! the output file, every page written once.
//!
//! What the result must equal is what SQLite (and Litestream 0.3, which checkpoints each index
//! through SQLite) makes of the same history: for each index in order, the newest committed
//! version of every page up to the size of the index's last commit, then the file cut to that
//! size. Read backwards, a page's final content is its newest version in the newest source that
//! has one, among the sources whose version survived every later truncation. So the indexes are
//! merged **newest first**: a page an index writes is *claimed*, and no older index and not the
//! snapshot write it again; `limit`, the smallest last-commit size of the indexes merged so far,
//! keeps older sources out of pages a later checkpoint cut off. The snapshot comes last and
//! fills only the pages nothing newer wrote.
//!
//! Within one index the frames arrive oldest first. Frames of a transaction wait in memory until
//! its commit frame arrives (trailing frames without a commit are never written); committed
//! frames gather in a batch, one slot per page (a newer version replaces the older one in
//! memory), and a full batch is written sorted by page, in runs (`pwritev`). So every page of
//! the output is written once, except a page that one index rewrites after more than a batch of
//! that index was already written: its second write lands in the page cache before the one
//! write-back (see `ARCHITECTURE.md`).
//!
//! A transaction bigger than its buffer is written before its commit arrives (tentatively): if
//! its index ends without that commit, the pages it wrote are taken back, which for a page with
//! an earlier committed version in the same index means reading that index again up to its last
//! commit ([`Replay`]). Replicas written by litestreamd or Litestream hold committed frames
//! only, so this is the path of a damaged or foreign replica, not of a normal restore.
//!
//! Memory: 2 bits per page of the largest database size in the history (the claimed and the
//! current index's page sets) plus the two buffers (`Limits`).

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, IoSlice};
use std::os::fd::AsFd;
use std::path::PathBuf;

use super::RestoreError;
use crate::wal::{FRAME_HEADER_SIZE, FrameHeader, StreamError, StreamWalk, Unit, WAL_HEADER_SIZE};

/// Buffer sizes of a merge.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    /// Committed pages held before they are written.
    pub batch: usize,
    /// Pages of one uncommitted transaction held before they are written tentatively.
    pub txn: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            batch: 2 << 20,
            txn: 2 << 20,
        }
    }
}

/// A set of page numbers: one bit per page up to the largest page number inserted.
#[derive(Debug, Default, Clone)]
struct PageSet(Vec<u64>);

impl PageSet {
    fn contains(&self, p: u32) -> bool {
        self.0
            .get(p as usize / 64)
            .is_some_and(|w| w & (1 << (p % 64)) != 0)
    }
    /// Inserts `p`; false if it was there already.
    fn insert(&mut self, p: u32) -> bool {
        let i = p as usize / 64;
        if i >= self.0.len() {
            self.0.resize(i + 1, 0);
        }
        let had = self.0[i] & (1 << (p % 64)) != 0;
        self.0[i] |= 1 << (p % 64);
        !had
    }
    fn remove(&mut self, p: u32) {
        if let Some(w) = self.0.get_mut(p as usize / 64) {
            *w &= !(1 << (p % 64));
        }
    }
    fn union_with(&mut self, other: &PageSet) {
        if other.0.len() > self.0.len() {
            self.0.resize(other.0.len(), 0);
        }
        for (a, b) in self.0.iter_mut().zip(&other.0) {
            *a |= b;
        }
    }
    fn clear(&mut self) {
        self.0.iter_mut().for_each(|w| *w = 0);
    }
    /// The members above `floor`, in order.
    fn above(&self, floor: u32) -> impl Iterator<Item = u32> + '_ {
        let start = floor as usize / 64;
        self.0
            .iter()
            .enumerate()
            .skip(start)
            .flat_map(|(i, &w)| {
                (0..64u32)
                    .filter(move |b| w & (1 << b) != 0)
                    .map(move |b| i as u32 * 64 + b)
            })
            .filter(move |&p| p > floor)
    }
}

/// Pages to write again from an index that took back a tentative transaction: each page's
/// newest version among the index's frames that end at or before `upto` (its last commit).
#[derive(Debug)]
pub(crate) struct Replay {
    pub index: u32,
    pages: PageSet,
    upto: u64,
}

/// What a merge wrote.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct MergeStats {
    pub wal_pages: u64,
    pub snapshot_pages: u64,
    /// Page writes beyond one per page (pages rewritten after their batch was written).
    pub rewrites: u64,
}

/// The state of the index being merged.
struct Index {
    index: u32,
    /// The index's frames, cut from the decoded stream and checked.
    walk: StreamWalk,
    /// The uncommitted transaction's wanted frames: page numbers and pages.
    txn_pgnos: Vec<u32>,
    txn: Vec<u8>,
    /// Committed pages not written yet: page → slot in `batch`.
    slots: HashMap<u32, usize>,
    batch: Vec<u8>,
    /// Pages this index wrote or holds.
    mine: PageSet,
    /// Pages written for a transaction not committed yet, and those of them that this index
    /// had written committed before (they need a [`Replay`] if the commit never comes).
    tentative: Vec<u32>,
    tentative_set: PageSet,
    tentative_over: Vec<u32>,
    /// Database size of the last commit, and the WAL offset after it.
    commit_pages: Option<u32>,
    commit_end: u64,
    /// In a replay: only these pages, only up to this offset, written directly.
    replay: Option<(PageSet, u64)>,
}

/// A restore's output being assembled (see the module documentation).
pub(crate) struct Merge {
    file: File,
    path: PathBuf,
    limits: Limits,
    page_size: Option<(u32, String)>,
    claimed: PageSet,
    final_pages: Option<u32>,
    limit: u32,
    current: Option<Index>,
    /// Pages any index wrote, to count rewrites.
    stats: MergeStats,
    written_since_writeback: u64,
    snap: Option<SnapshotFill>,
    /// The transaction and batch buffers of the last index, reused by the next (allocated
    /// once, at their limits: the merge's memory stays flat however long the history).
    spare: Option<(Vec<u8>, Vec<u8>)>,
}

/// The snapshot's decoded stream, as it arrives.
struct SnapshotFill {
    key: String,
    /// Bytes received so far.
    offset: u64,
    /// The start of a page (or of the header) split across pieces.
    partial: Vec<u8>,
    page_size: Option<u32>,
}

impl Merge {
    /// Write-back of written pages is started every this many bytes, so the final fsync finds
    /// little left to write (see `SnapshotWriter` in the parent module for the measurements).
    const WRITEBACK_STEP: u64 = 32 << 20;

    pub fn new(file: File, path: PathBuf, limits: Limits) -> Self {
        Merge {
            file,
            path,
            limits,
            page_size: None,
            claimed: PageSet::default(),
            final_pages: None,
            limit: u32::MAX,
            current: None,
            stats: MergeStats::default(),
            written_since_writeback: 0,
            snap: None,
            spare: None,
        }
    }

    pub fn stats(&self) -> MergeStats {
        self.stats
    }

    fn io(&self) -> impl FnOnce(io::Error) -> RestoreError + '_ {
        move |source| RestoreError::Io {
            path: self.path.clone(),
            source,
        }
    }

    /// Starts the next index (each one older than the one before).
    pub fn begin_index(&mut self, index: u32) {
        debug_assert!(self.current.is_none(), "an index is still open");
        let mut ix = Index::new(index, None);
        let (txn, batch) = self.spare.take().unwrap_or_else(|| {
            // A frame past the limit at most (the largest page is 64 KiB).
            let room = |limit: usize| Vec::with_capacity(limit + (64 << 10));
            (room(self.limits.txn), room(self.limits.batch))
        });
        (ix.txn, ix.batch) = (txn, batch);
        self.current = Some(ix);
    }

    /// Starts reading an index again for a [`Replay`].
    pub fn begin_replay(&mut self, r: Replay) {
        self.current = Some(Index::new(r.index, Some((r.pages, r.upto))));
    }

    /// Decoded bytes of the current index's segment `key`, in order.
    pub fn feed(&mut self, key: &str, data: &[u8]) -> Result<(), RestoreError> {
        let mut ix = self.current.take().expect("begin_index before feed");
        let res = self.feed_index(&mut ix, key, data);
        self.current = Some(ix);
        res
    }

    fn feed_index(&mut self, ix: &mut Index, key: &str, data: &[u8]) -> Result<(), RestoreError> {
        // The walk is taken out while it calls back into the index it belongs to.
        let mut walk = std::mem::take(&mut ix.walk);
        let res = walk.feed(data, |unit| self.unit(ix, key, unit));
        ix.walk = walk;
        res.map_err(|e| match e {
            Fed::Wal(e) => RestoreError::Corrupt {
                key: key.to_string(),
                reason: e.to_string(),
            },
            Fed::Restore(e) => e,
        })
    }

    /// The end of segment `key`: it must end on a frame boundary.
    pub fn end_segment(&mut self, key: &str) -> Result<(), RestoreError> {
        let ix = self.current.as_ref().expect("an open index");
        let corrupt = |reason| RestoreError::Corrupt {
            key: key.to_string(),
            reason,
        };
        match ix.walk.scanner() {
            Some(_) if ix.walk.partial() == 0 => Ok(()),
            Some(s) => Err(corrupt(format!(
                "partial frame of {} bytes at WAL offset {}",
                ix.walk.partial(),
                s.offset()
            ))),
            None => Err(corrupt(format!(
                "segment ends inside the WAL header ({} bytes)",
                ix.walk.partial()
            ))),
        }
    }

    /// One WAL header or whole frame, checked by the walk.
    fn unit(&mut self, ix: &mut Index, key: &str, unit: Unit<'_>) -> Result<(), Fed> {
        let corrupt = |reason| RestoreError::Corrupt {
            key: key.to_string(),
            reason,
        };
        let (fh, frame, scanner) = match unit {
            Unit::Header(h) => {
                match &self.page_size {
                    Some((ps, first)) if *ps != h.page_size => {
                        return Err(corrupt(format!(
                            "WAL page size {} differs from {ps} of {first}",
                            h.page_size
                        ))
                        .into());
                    }
                    Some(_) => {}
                    None => self.page_size = Some((h.page_size, key.to_string())),
                }
                return Ok(());
            }
            Unit::Frame(fh, frame, scanner) => (fh, frame, scanner),
        };
        let page = &frame[FRAME_HEADER_SIZE..];
        if let Some((pages, upto)) = &ix.replay {
            if scanner.offset() <= *upto && pages.contains(fh.pgno) {
                self.write_pages(&[(fh.pgno, page)])?;
            }
            return Ok(());
        }
        if fh.pgno <= self.limit && !self.claimed.contains(fh.pgno) {
            ix.txn_pgnos.push(fh.pgno);
            ix.txn.extend_from_slice(page);
        }
        if fh.is_commit() {
            self.commit(ix, fh, scanner.offset())?;
        } else if ix.txn.len() >= self.limits.txn {
            self.spill(ix)?;
        }
        Ok(())
    }

    /// A commit frame: the transaction's pages join the batch.
    fn commit(&mut self, ix: &mut Index, fh: &FrameHeader, end: u64) -> Result<(), RestoreError> {
        ix.commit_pages = Some(fh.commit_size);
        ix.commit_end = end;
        ix.tentative.clear();
        ix.tentative_set.clear();
        ix.tentative_over.clear();
        let ps = ix.txn.len() / ix.txn_pgnos.len().max(1);
        let pgnos = std::mem::take(&mut ix.txn_pgnos);
        for (i, p) in pgnos.iter().enumerate() {
            let page = &ix.txn[i * ps..(i + 1) * ps];
            match ix.slots.get(p) {
                Some(&slot) => ix.batch[slot..slot + ps].copy_from_slice(page),
                None => {
                    ix.slots.insert(*p, ix.batch.len());
                    ix.batch.extend_from_slice(page);
                }
            }
        }
        ix.txn_pgnos = pgnos;
        ix.txn_pgnos.clear();
        ix.txn.clear();
        if ix.batch.len() >= self.limits.batch {
            self.flush_batch(ix)?;
        }
        Ok(())
    }

    /// Writes the batch, sorted by page.
    fn flush_batch(&mut self, ix: &mut Index) -> Result<(), RestoreError> {
        if ix.slots.is_empty() {
            return Ok(());
        }
        let ps = ix.batch.len() / ix.slots.len();
        let mut list: Vec<(u32, usize)> = ix.slots.drain().collect();
        list.sort_unstable();
        for &(p, _) in &list {
            if !ix.mine.insert(p) {
                self.stats.rewrites += 1;
            }
        }
        let pages: Vec<(u32, &[u8])> = list
            .iter()
            .map(|&(p, slot)| (p, &ix.batch[slot..slot + ps]))
            .collect();
        let res = self.write_pages(&pages);
        self.stats.wal_pages += list.len() as u64;
        ix.batch.clear();
        res
    }

    /// Writes an uncommitted transaction that outgrew its buffer, remembering its pages in
    /// case the commit never comes.
    fn spill(&mut self, ix: &mut Index) -> Result<(), RestoreError> {
        // Committed pages go first: the transaction's versions are newer.
        self.flush_batch(ix)?;
        let ps = ix.txn.len() / ix.txn_pgnos.len().max(1);
        let mut latest: HashMap<u32, usize> = HashMap::new();
        for (i, &p) in ix.txn_pgnos.iter().enumerate() {
            latest.insert(p, i);
        }
        let mut list: Vec<(u32, usize)> = latest.into_iter().collect();
        list.sort_unstable();
        for &(p, _) in &list {
            if ix.mine.insert(p) {
                ix.tentative.push(p);
                ix.tentative_set.insert(p);
            } else {
                // Written before: committed (a replay brings that version back if the
                // commit never comes), or by an earlier spill of this same transaction.
                if !ix.tentative_set.contains(p) {
                    ix.tentative_over.push(p);
                }
                self.stats.rewrites += 1;
            }
        }
        let pages: Vec<(u32, &[u8])> = list
            .iter()
            .map(|&(p, i)| (p, &ix.txn[i * ps..(i + 1) * ps]))
            .collect();
        self.write_pages(&pages)?;
        self.stats.wal_pages += list.len() as u64;
        ix.txn.clear();
        ix.txn_pgnos.clear();
        Ok(())
    }

    /// Ends the current index. Returns the pages to read again, if a transaction it wrote
    /// tentatively never committed over pages the index had committed before.
    pub fn end_index(&mut self) -> Result<Option<Replay>, RestoreError> {
        let mut ix = self.current.take().expect("an open index");
        if ix.replay.is_some() {
            return Ok(None);
        }
        let res = self.end_index_with(&mut ix);
        ix.txn.clear();
        ix.batch.clear();
        self.spare = Some((std::mem::take(&mut ix.txn), std::mem::take(&mut ix.batch)));
        res
    }

    fn end_index_with(&mut self, ix: &mut Index) -> Result<Option<Replay>, RestoreError> {
        self.flush_batch(ix)?;
        let ps = self.page_size.as_ref().map_or(0, |(ps, _)| *ps as usize);
        // A transaction written tentatively that never committed: its pages are taken back.
        let zeros = vec![0u8; ps];
        for &p in &ix.tentative {
            ix.mine.remove(p);
            self.write_pages(&[(p, &zeros)])?;
        }
        let Some(size) = ix.commit_pages else {
            // No commit: the index changes nothing (SQLite would not checkpoint it). Nothing
            // was committed before a tentative write either, so nothing needs a replay.
            debug_assert!(ix.tentative_over.is_empty());
            return Ok(None);
        };
        let replay = ix.tentative_over.iter().any(|&p| p <= size).then(|| {
            let mut pages = PageSet::default();
            for &p in ix.tentative_over.iter().filter(|&&p| p <= size) {
                pages.insert(p);
            }
            Replay {
                index: ix.index,
                pages,
                upto: ix.commit_end,
            }
        });
        // Pages this index wrote above its own last commit's size were cut off by it: they
        // stay claimed (nothing older may fill them) and read as zeros, as after a checkpoint.
        let cut: Vec<u32> = ix.mine.above(size).collect();
        for p in cut {
            self.write_pages(&[(p, &zeros)])?;
        }
        self.claimed.union_with(&ix.mine);
        self.final_pages.get_or_insert(size);
        self.limit = self.limit.min(size);
        Ok(replay)
    }

    /// Writes pages at their places, in runs of consecutive pages.
    fn write_pages(&mut self, pages: &[(u32, &[u8])]) -> Result<(), RestoreError> {
        let mut i = 0;
        while i < pages.len() {
            let start = pages[i].0;
            let mut j = i + 1;
            while j < pages.len() && pages[j].0 == start + (j - i) as u32 && j - i < 1024 {
                j += 1;
            }
            let ps = pages[i].1.len() as u64;
            let iov: Vec<IoSlice> = pages[i..j].iter().map(|(_, b)| IoSlice::new(b)).collect();
            self.write_run(&iov, (start as u64 - 1) * ps)?;
            i = j;
        }
        Ok(())
    }

    fn write_run(&mut self, iov: &[IoSlice], mut at: u64) -> Result<(), RestoreError> {
        let total: usize = iov.iter().map(|s| s.len()).sum();
        let mut done = 0;
        while done < total {
            // A short write continues where it stopped.
            let mut skip = done;
            let rest: Vec<IoSlice> = iov
                .iter()
                .filter_map(|s| {
                    if skip >= s.len() {
                        skip -= s.len();
                        None
                    } else {
                        let s = IoSlice::new(&s[skip..]);
                        skip = 0;
                        Some(s)
                    }
                })
                .collect();
            let n = nix::sys::uio::pwritev(self.file.as_fd(), &rest, at as i64)
                .map_err(io::Error::from)
                .map_err(self.io())?;
            if n == 0 {
                return Err(self.io()(io::Error::from(io::ErrorKind::WriteZero)));
            }
            done += n;
            at += n as u64;
        }
        self.written_since_writeback += total as u64;
        if self.written_since_writeback >= Self::WRITEBACK_STEP {
            start_writeback(&self.file);
            self.written_since_writeback = 0;
        }
        Ok(())
    }

    /// Decoded bytes of the snapshot `key`, in order: pages nothing newer wrote are written.
    pub fn snapshot(&mut self, key: &str, data: &[u8]) -> Result<(), RestoreError> {
        let mut s = self.snap.take().unwrap_or_else(|| SnapshotFill {
            key: key.to_string(),
            offset: 0,
            partial: Vec::new(),
            page_size: None,
        });
        let res = self.snapshot_into(&mut s, data);
        self.snap = Some(s);
        res
    }

    /// Starts the snapshot (again, for a retried download) from its first byte. The WAL
    /// buffers are returned first: no index is merged after the snapshot begins, and the
    /// snapshot's decoders need the memory.
    pub fn restart_snapshot(&mut self) {
        self.spare = None;
        self.snap = None;
    }

    fn snapshot_into(&mut self, s: &mut SnapshotFill, mut data: &[u8]) -> Result<(), RestoreError> {
        {
            while !data.is_empty() {
                let ps = match s.page_size {
                    Some(ps) => ps as usize,
                    None => {
                        // The page size is in the database header.
                        let take = (100 - s.partial.len()).min(data.len());
                        s.partial.extend_from_slice(&data[..take]);
                        data = &data[take..];
                        if s.partial.len() < 100 {
                            return Ok(());
                        }
                        let ps = self.snapshot_header(&s.key, &s.partial)?;
                        s.page_size = Some(ps);
                        ps as usize
                    }
                };
                if !s.partial.is_empty() {
                    let take = (ps - s.partial.len()).min(data.len());
                    s.partial.extend_from_slice(&data[..take]);
                    data = &data[take..];
                    if s.partial.len() == ps {
                        let page = std::mem::take(&mut s.partial);
                        self.snapshot_pages(s.offset, &page, ps)?;
                        s.offset += ps as u64;
                        s.partial = page;
                        s.partial.clear();
                    }
                    continue;
                }
                let whole = data.len() / ps * ps;
                if whole > 0 {
                    self.snapshot_pages(s.offset, &data[..whole], ps)?;
                    s.offset += whole as u64;
                }
                s.partial.extend_from_slice(&data[whole..]);
                data = &[];
            }
            Ok(())
        }
    }

    fn snapshot_header(&mut self, key: &str, hdr: &[u8]) -> Result<u32, RestoreError> {
        let corrupt = |reason: String| RestoreError::Corrupt {
            key: key.to_string(),
            reason,
        };
        let ps = database_page_size(hdr).map_err(corrupt)?;
        if let Some((wal_ps, first)) = &self.page_size
            && *wal_ps != ps
        {
            return Err(RestoreError::Corrupt {
                key: first.clone(),
                reason: format!("WAL page size {wal_ps} differs from the snapshot's {ps}"),
            });
        }
        Ok(ps)
    }

    /// Whole pages of the snapshot starting at byte `offset`: runs of wanted pages are written
    /// straight from the decoded buffer.
    fn snapshot_pages(&mut self, offset: u64, data: &[u8], ps: usize) -> Result<(), RestoreError> {
        let first = (offset / ps as u64) as u32 + 1;
        let n = data.len() / ps;
        let mut i = 0;
        while i < n {
            let p = first + i as u32;
            if p > self.limit || self.claimed.contains(p) {
                i += 1;
                continue;
            }
            let mut j = i + 1;
            while j < n {
                let q = first + j as u32;
                if q > self.limit || self.claimed.contains(q) {
                    break;
                }
                j += 1;
            }
            self.write_run(
                &[IoSlice::new(&data[i * ps..j * ps])],
                offset + (i * ps) as u64,
            )?;
            self.stats.snapshot_pages += (j - i) as u64;
            i = j;
        }
        Ok(())
    }

    /// Ends the merge: the file is cut to the database size of the newest commit (or is the
    /// snapshot's size, without one). Returns the file and its size.
    pub fn finish(self) -> Result<(File, u64), RestoreError> {
        let Some(s) = &self.snap else {
            return Err(RestoreError::Corrupt {
                key: String::new(),
                reason: "no snapshot was merged".into(),
            });
        };
        let ps = match s.page_size {
            Some(ps) => ps as u64,
            None => {
                return Err(RestoreError::Corrupt {
                    key: s.key.clone(),
                    reason: "snapshot shorter than a database header".into(),
                });
            }
        };
        if !s.partial.is_empty() {
            return Err(RestoreError::Corrupt {
                key: s.key.clone(),
                reason: format!("snapshot ends inside a page ({} bytes)", s.offset),
            });
        }
        let size = match self.final_pages {
            Some(n) => n as u64 * ps,
            None => s.offset,
        };
        self.file.set_len(size).map_err(self.io())?;
        Ok((self.file, size))
    }
}

/// The page size in the 100-byte header of an SQLite database file; what is wrong otherwise.
pub(crate) fn database_page_size(hdr: &[u8]) -> Result<u32, String> {
    if hdr.len() < 100 || &hdr[..16] != b"SQLite format 3\0" {
        return Err("not a SQLite database".into());
    }
    let ps = match u16::from_be_bytes([hdr[16], hdr[17]]) as u32 {
        1 => 65536,
        ps => ps,
    };
    if !ps.is_power_of_two() || !(512..=65536).contains(&ps) {
        return Err(format!("invalid page size {ps}"));
    }
    Ok(ps)
}

/// An error while a segment is fed: the walk's (a damaged frame) or the merge's own.
enum Fed {
    Wal(StreamError),
    Restore(RestoreError),
}

impl From<StreamError> for Fed {
    fn from(e: StreamError) -> Self {
        Fed::Wal(e)
    }
}

impl From<RestoreError> for Fed {
    fn from(e: RestoreError) -> Self {
        Fed::Restore(e)
    }
}

impl Index {
    fn new(index: u32, replay: Option<(PageSet, u64)>) -> Self {
        Index {
            index,
            walk: StreamWalk::default(),
            txn_pgnos: Vec::new(),
            txn: Vec::new(),
            slots: HashMap::new(),
            batch: Vec::new(),
            mine: PageSet::default(),
            tentative: Vec::new(),
            tentative_set: PageSet::default(),
            tentative_over: Vec::new(),
            commit_pages: None,
            commit_end: WAL_HEADER_SIZE as u64,
            replay,
        }
    }
}

/// Starts write-back of the file's dirty pages without waiting (`sync_file_range`).
fn start_writeback(file: &File) {
    use std::os::fd::AsRawFd;
    // SAFETY: a plain system call on a descriptor `file` keeps open. Only a hint (the final
    // fsync makes the file durable), so its result is ignored.
    unsafe {
        nix::libc::sync_file_range(file.as_raw_fd(), 0, 0, nix::libc::SYNC_FILE_RANGE_WRITE);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wal::tests::build_wal;
    use proptest::prelude::*;

    const PS: u32 = 512;

    /// What SQLite makes of a history: each index checkpointed in order (committed frames up
    /// to the last commit's size, then the file cut to it).
    fn reference(snapshot: &[u8], indexes: &[Vec<(u32, u32, u8)>]) -> Vec<u8> {
        let mut db = snapshot.to_vec();
        for frames in indexes {
            let Some(last) = frames.iter().rposition(|f| f.1 != 0) else {
                continue;
            };
            let size = frames[last].1;
            for &(p, _, fill) in &frames[..=last] {
                if p <= size {
                    let at = (p as usize - 1) * PS as usize;
                    if db.len() < at + PS as usize {
                        db.resize(at + PS as usize, 0);
                    }
                    db[at..at + PS as usize].fill(fill);
                }
            }
            db.resize(size as usize * PS as usize, 0);
        }
        db
    }

    fn snapshot_image(pages: u32, fill: u8) -> Vec<u8> {
        let mut db = vec![fill; (pages * PS) as usize];
        db[..16].copy_from_slice(b"SQLite format 3\0");
        db[16..18].copy_from_slice(&(PS as u16).to_be_bytes());
        db
    }

    /// Merges newest first, feeding each index in pieces of `piece` bytes.
    fn merge(
        snapshot: &[u8],
        indexes: &[Vec<(u32, u32, u8)>],
        limits: Limits,
        piece: usize,
    ) -> (Vec<u8>, MergeStats) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let file = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .unwrap();
        let mut m = Merge::new(file, path.clone(), limits);
        for (i, frames) in indexes.iter().enumerate().rev() {
            let wal = build_wal(false, PS, frames);
            m.begin_index(i as u32);
            for c in wal.chunks(piece) {
                m.feed("seg", c).unwrap();
            }
            m.end_segment("seg").unwrap();
            if let Some(r) = m.end_index().unwrap() {
                m.begin_replay(r);
                for c in wal.chunks(piece) {
                    m.feed("seg", c).unwrap();
                }
                m.end_index().unwrap();
            }
        }
        for c in snapshot.chunks(piece) {
            m.snapshot("snap", c).unwrap();
        }
        let stats = m.stats();
        let (_, size) = m.finish().unwrap();
        let got = std::fs::read(&path).unwrap();
        assert_eq!(got.len() as u64, size);
        (got, stats)
    }

    fn frames() -> impl Strategy<Value = Vec<(u32, u32, u8)>> {
        // (page, commit size or 0, fill): pages 1..12, commits that grow and shrink.
        prop::collection::vec(
            (
                1u32..12,
                prop_oneof![3 => Just(0u32), 1 => 1u32..14],
                any::<u8>(),
            ),
            0..30,
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(400))]
        /// Any history, any buffer sizes (down to a page, so batches flush and transactions
        /// spill and are taken back), any piece size: the merge equals SQLite's checkpoints.
        #[test]
        fn merge_equals_checkpointing_each_index(
            snap_pages in 1u32..12,
            indexes in prop::collection::vec(frames(), 0..6),
            batch in prop_oneof![Just(PS as usize), Just(8 << 20)],
            txn in prop_oneof![Just(PS as usize), Just(2 * PS as usize), Just(8 << 20)],
            piece in prop_oneof![Just(7usize), Just(536), Just(1 << 20)],
        ) {
            let snap = snapshot_image(snap_pages, 0xee);
            let (got, _) = merge(&snap, &indexes, Limits { batch, txn }, piece);
            prop_assert_eq!(got, reference(&snap, &indexes));
        }
    }

    #[test]
    fn a_page_rewritten_in_many_indexes_is_written_once() {
        let snap = snapshot_image(4, 1);
        // Page 2 rewritten in every index, page 3 only in the first.
        let indexes: Vec<Vec<(u32, u32, u8)>> = (0..50u8)
            .map(|i| {
                if i == 0 {
                    vec![(3, 0, 3), (2, 4, i + 10)]
                } else {
                    vec![(2, 0, i), (2, 4, i + 10)]
                }
            })
            .collect();
        let (got, stats) = merge(&snap, &indexes, Limits::default(), 1 << 20);
        assert_eq!(got, reference(&snap, &indexes));
        assert_eq!(
            got[PS as usize], 59,
            "page 2 is the newest committed version"
        );
        assert_eq!(stats.wal_pages, 2, "pages 2 and 3, once each");
        assert_eq!(stats.snapshot_pages, 2, "pages 1 and 4 from the snapshot");
        assert_eq!(stats.rewrites, 0);
    }

    #[test]
    fn uncommitted_trailing_frames_are_ignored_and_a_shrunk_database_is_cut() {
        let snap = snapshot_image(8, 1);
        let indexes = vec![
            vec![(7, 0, 7), (2, 8, 2)],
            // Shrinks to 3 pages, then an uncommitted transaction touches pages 2 and 9.
            vec![(3, 3, 3), (2, 0, 0x55), (9, 0, 0x55)],
        ];
        let (got, _) = merge(&snap, &indexes, Limits::default(), 100);
        assert_eq!(got.len(), 3 * PS as usize);
        assert_eq!(got, reference(&snap, &indexes));
        assert_eq!(
            got[PS as usize], 2,
            "the uncommitted version of page 2 is not used"
        );
        // The same with a transaction buffer of one page: written tentatively, taken back.
        let (got, _) = merge(
            &snap,
            &indexes,
            Limits {
                batch: PS as usize,
                txn: PS as usize,
            },
            100,
        );
        assert_eq!(got, reference(&snap, &indexes));
    }

    #[test]
    fn a_corrupt_frame_names_its_segment() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let file = File::create(&path).unwrap();
        let mut m = Merge::new(file, path, Limits::default());
        let mut wal = build_wal(false, PS, &[(1, 0, 1), (2, 2, 2)]);
        let n = wal.len();
        wal[n - 1] ^= 1;
        m.begin_index(0);
        let err = m
            .feed("generations/g/wal/00000000_00000000.wal.lz4", &wal)
            .unwrap_err();
        assert!(
            err.to_string().contains("00000000_00000000.wal.lz4")
                && err.to_string().contains("checksum"),
            "{err}"
        );
    }

    #[test]
    fn damaged_or_mismatched_input_is_refused_naming_the_object() {
        let dir = tempfile::tempdir().unwrap();
        let new = |name: &str| {
            let path = dir.path().join(name);
            Merge::new(File::create(&path).unwrap(), path, Limits::default())
        };
        let wal = build_wal(false, PS, &[(1, 0, 1), (2, 2, 2)]);
        // A segment that ends inside a frame, or inside the WAL header.
        let mut m = new("a");
        m.begin_index(0);
        m.feed("k1", &wal[..wal.len() - 10]).unwrap();
        let err = m.end_segment("k1").unwrap_err().to_string();
        assert!(err.contains("k1") && err.contains("partial frame"), "{err}");
        let mut m = new("b");
        m.begin_index(0);
        m.feed("k2", &wal[..20]).unwrap();
        let err = m.end_segment("k2").unwrap_err().to_string();
        assert!(err.contains("k2") && err.contains("WAL header"), "{err}");
        // A frame for page 0.
        let mut m = new("c");
        m.begin_index(0);
        let err = m
            .feed("k3", &build_wal(false, PS, &[(0, 1, 1)]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("k3") && err.contains("page 0"), "{err}");
        // A snapshot whose page size differs from the WAL's.
        let mut m = new("d");
        m.begin_index(0);
        m.feed("k4", &wal).unwrap();
        m.end_segment("k4").unwrap();
        m.end_index().unwrap();
        let mut snap = snapshot_image(2, 0);
        snap[16..18].copy_from_slice(&1024u16.to_be_bytes());
        let err = m.snapshot("snap", &snap).unwrap_err().to_string();
        assert!(
            err.contains("k4") && err.contains("differs from the snapshot's 1024"),
            "{err}"
        );
        // Not a database at all.
        let mut m = new("e");
        let err = m.snapshot("snap", &[7u8; 4096]).unwrap_err().to_string();
        assert!(
            err.contains("snap") && err.contains("not a SQLite database"),
            "{err}"
        );
    }
}
