//! The shadow WAL: litestreamd's own copy of every committed WAL frame, kept until every
//! replica has it. This module is the only one that knows its layout (Litestream's
//! `ShadowWALReader` is the model: one owner of the files, readers that step from one index to
//! the next):
//!
//! ```text
//! .NAME-litestream/              the meta directory, beside the database (or `meta_path`)
//!   generation                   the current generation id
//!   lineage                      the database's lineage (see `lineage`)
//!   generations/GEN/wal/IDX.wal  WAL life IDX of generation GEN: the WAL's header, then
//!                                every committed frame, appended in order
//! ```
//!
//! Every file is written here: indexes are created whole (a failed header write leaves
//! nothing), appends are cut back to where they started when they fail (a full disk leaves no
//! torn frame), the generation and lineage files are replaced atomically.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use tracing::warn;

use crate::layout::{self, Pos};
use crate::wal::{self, FrameHeader, Scanner, WAL_HEADER_SIZE, WalHeader};

/// One database's meta directory and the shadow WAL in it.
#[derive(Debug, Clone)]
pub struct Shadow {
    root: PathBuf,
}

/// What the shadow holds after a replica's position (see [`Shadow::after`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum After {
    /// Frames from the position's offset up to this end offset of the same index.
    Frames(u64),
    /// The position is at the end of its index, and the next index exists.
    NextIndex,
    /// Nothing more: the replica has everything.
    UpToDate,
    /// The replica holds more of this index than the shadow (a crash cut the shadow back and
    /// the same frames will be copied again): wait.
    Behind(u64),
    /// The index is gone from the shadow although the database is past it: the replica cannot
    /// catch up segment by segment.
    Gone,
}

/// The newest version of each page in part of an index (see [`Shadow::page_versions`]).
#[derive(Debug)]
pub struct PageVersions {
    /// The index file, open.
    pub file: File,
    /// Page number → offset of its newest page data in `file`.
    pub pages: std::collections::HashMap<u32, u64>,
    /// The database size in pages after the last commit frame (None: no frame).
    pub commit_size: Option<u32>,
    pub page_size: u32,
}

fn shrank() -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        "the source shrank while it was copied",
    )
}

/// Copies `n` bytes of `src` from `offset` into `out` at `at` with `copy_file_range` (no trip
/// through user space), or through a buffer where the kernel or file system cannot.
fn copy_file(src: &File, offset: u64, out: &File, at: u64, n: u64) -> io::Result<()> {
    use nix::errno::Errno;
    let (mut from, mut to, end) = (offset as i64, at as i64, offset + n);
    while (from as u64) < end {
        let left = (end - from as u64).min(1 << 30) as usize;
        match nix::fcntl::copy_file_range(src, Some(&mut from), out, Some(&mut to), left) {
            Ok(0) => return Err(shrank()),
            Ok(_) => {}
            Err(Errno::EINTR) => {}
            Err(Errno::ENOSYS | Errno::EXDEV | Errno::EINVAL | Errno::EOPNOTSUPP) => {
                let mut buf = vec![0u8; 256 << 10];
                while (from as u64) < end {
                    let k = (end - from as u64).min(buf.len() as u64) as usize;
                    match src.read_at(&mut buf[..k], from as u64) {
                        Ok(0) => return Err(shrank()),
                        Ok(k) => {
                            out.write_all_at(&buf[..k], to as u64)?;
                            from += k as i64;
                            to += k as i64;
                        }
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(e),
                    }
                }
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

fn io_at(path: &Path, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

impl Shadow {
    /// The meta directory of the database at `db`: `meta_path` if set, else
    /// `<dir>/.<name>-litestream` beside it.
    pub fn for_db(db: &Path, meta_path: Option<&Path>) -> Shadow {
        let root = match meta_path {
            Some(p) => p.to_path_buf(),
            None => {
                let name = db
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                db.parent()
                    .unwrap_or(Path::new("."))
                    .join(format!(".{name}-litestream"))
            }
        };
        Shadow { root }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn generation_file(&self) -> PathBuf {
        self.root.join("generation")
    }
    fn lineage_file(&self) -> PathBuf {
        self.root.join("lineage")
    }
    fn generations_dir(&self) -> PathBuf {
        self.root.join("generations")
    }
    fn wal_dir(&self, generation: &str) -> PathBuf {
        self.generations_dir().join(generation).join("wal")
    }
    fn index_path(&self, generation: &str, index: u32) -> PathBuf {
        self.wal_dir(generation).join(format!("{index:08x}.wal"))
    }

    /// The path of an index, for messages only.
    pub fn describe(&self, generation: &str, index: u32) -> PathBuf {
        self.index_path(generation, index)
    }

    /// Creates the meta directory and removes the temporary files an interrupted write left.
    pub fn prepare(&self) -> io::Result<()> {
        fs::create_dir_all(&self.root).map_err(|e| io_at(&self.root, e))?;
        remove_tmp_files(&self.root);
        Ok(())
    }

    /// The current generation id (None: none, or not a valid id).
    pub fn generation(&self) -> io::Result<Option<String>> {
        read_small(&self.generation_file()).map(|s| s.filter(|g| layout::is_generation(g)))
    }

    /// Makes `generation` current, atomically.
    pub fn set_generation(&self, generation: &str) -> io::Result<()> {
        fs::create_dir_all(&self.root).map_err(|e| io_at(&self.root, e))?;
        write_atomic(
            &self.generation_file(),
            format!("{generation}\n").as_bytes(),
        )
    }

    /// Forgets the current generation (the next sync starts a new one).
    pub fn clear_generation(&self) -> io::Result<()> {
        let p = self.generation_file();
        fs::remove_file(&p)
            .or_else(ignore_not_found)
            .map_err(|e| io_at(&p, e))
    }

    /// The lineage recorded on this host (see `lineage`).
    pub fn lineage(&self) -> io::Result<Option<String>> {
        read_small(&self.lineage_file())
    }

    /// Records the lineage, atomically.
    pub fn set_lineage(&self, lineage: &str) -> io::Result<()> {
        fs::create_dir_all(&self.root).map_err(|e| io_at(&self.root, e))?;
        write_atomic(&self.lineage_file(), format!("{lineage}\n").as_bytes())
    }

    /// The highest index of a generation, if it has any.
    pub fn max_index(&self, generation: &str) -> io::Result<Option<u32>> {
        Ok(self.indexes(generation)?.into_iter().max())
    }

    fn indexes(&self, generation: &str) -> io::Result<Vec<u32>> {
        let dir = self.wal_dir(generation);
        let rd = match fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_at(&dir, e)),
        };
        let mut out = Vec::new();
        for e in rd {
            let e = e.map_err(|e| io_at(&dir, e))?;
            if let Some(i) = parse_index_name(&e.file_name().to_string_lossy()) {
                out.push(i);
            }
        }
        Ok(out)
    }

    /// The shadow position: the current generation, its highest index, and that index's size.
    pub fn pos(&self) -> io::Result<Option<Pos>> {
        let Some(generation) = self.generation()? else {
            return Ok(None);
        };
        let Some(index) = self.max_index(&generation)? else {
            return Ok(None);
        };
        let size = self.size(&generation, index)?;
        Ok(Some(Pos::new(generation, index, size)))
    }

    /// An index's size in bytes (0 when it does not exist).
    pub fn size(&self, generation: &str, index: u32) -> io::Result<u64> {
        let p = self.index_path(generation, index);
        match fs::metadata(&p) {
            Ok(m) => Ok(m.len()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(0),
            Err(e) => Err(io_at(&p, e)),
        }
    }

    /// An index's WAL header bytes, if it has a whole one.
    pub fn header(
        &self,
        generation: &str,
        index: u32,
    ) -> io::Result<Option<[u8; WAL_HEADER_SIZE]>> {
        let p = self.index_path(generation, index);
        read_header_bytes(&p).map_err(|e| io_at(&p, e))
    }

    /// `len` bytes of an index at `at`.
    pub fn read_at(
        &self,
        generation: &str,
        index: u32,
        at: u64,
        len: usize,
    ) -> io::Result<Vec<u8>> {
        let p = self.index_path(generation, index);
        let f = File::open(&p).map_err(|e| io_at(&p, e))?;
        let mut buf = vec![0u8; len];
        f.read_exact_at(&mut buf, at).map_err(|e| io_at(&p, e))?;
        Ok(buf)
    }

    /// A walk that continues after the last whole frame of an index (`page_size` frames), for
    /// appending frames that continue its checksum chain.
    pub fn scanner_at_end(
        &self,
        generation: &str,
        index: u32,
        page_size: u32,
    ) -> io::Result<Scanner> {
        let hdr = self.parsed_header(generation, index)?;
        let end = wal::align(self.size(generation, index)?, page_size);
        if end > WAL_HEADER_SIZE as u64 {
            let last = self.read_at(generation, index, end - wal::frame_size(page_size), 24)?;
            Ok(Scanner::resume(
                &hdr,
                FrameHeader::parse(&last).checksum,
                end,
            ))
        } else {
            Ok(Scanner::new(&hdr))
        }
    }

    /// Creates an index holding just a WAL header; a failed write leaves no file.
    pub fn create_index(
        &self,
        generation: &str,
        index: u32,
        header: &[u8; WAL_HEADER_SIZE],
    ) -> io::Result<()> {
        let dir = self.wal_dir(generation);
        fs::create_dir_all(&dir).map_err(|e| io_at(&dir, e))?;
        let p = self.index_path(generation, index);
        let mut f = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(&p)
            .map_err(|e| io_at(&p, e))?;
        if let Err(e) = f.write_all(header).and_then(|()| f.sync_all()) {
            drop(f);
            let _ = fs::remove_file(&p);
            return Err(io_at(&p, e));
        }
        Ok(())
    }

    /// Appends `n` bytes of `src` from `offset` on (the database's WAL; copied inside the
    /// kernel) to an index, which must be `at` bytes long, and fsyncs. On any failure (a full
    /// disk, a short source) the index is cut back to `at`, so no torn frame is ever left
    /// (which would look like lost continuity: a new generation).
    pub fn append(
        &self,
        generation: &str,
        index: u32,
        at: u64,
        src: &File,
        offset: u64,
        n: u64,
    ) -> io::Result<()> {
        let p = self.index_path(generation, index);
        // Not O_APPEND: `copy_file_range` refuses such a target; every write says where.
        let out = OpenOptions::new()
            .write(true)
            .open(&p)
            .map_err(|e| io_at(&p, e))?;
        if let Err(e) = copy_file(src, offset, &out, at, n).and_then(|()| out.sync_data()) {
            if let Err(t) = out.set_len(at).and_then(|()| out.sync_data()) {
                warn!(shadow = %p.display(), error = %t, "cannot cut the shadow WAL back after a failed append; it is repaired at the next start");
            }
            return Err(io_at(&p, e));
        }
        Ok(())
    }

    /// Cuts an index back to its last whole commit (after a crash, the newest index may end
    /// in frames of a transaction whose commit frame was never copied, or in a partial
    /// frame). Returns the sizes before and after when it cut.
    pub fn repair_tail(
        &self,
        generation: &str,
        index: u32,
        page_size: u32,
    ) -> io::Result<Option<(u64, u64)>> {
        let p = self.index_path(generation, index);
        let Some(hdr) = read_header_bytes(&p).map_err(|e| io_at(&p, e))? else {
            return Ok(None);
        };
        let Ok(hdr) = WalHeader::parse(&hdr) else {
            return Ok(None);
        };
        if hdr.page_size != page_size {
            return Ok(None);
        }
        let len = self.size(generation, index)?;
        let mut f =
            io::BufReader::with_capacity(1 << 20, File::open(&p).map_err(|e| io_at(&p, e))?);
        f.seek(SeekFrom::Start(WAL_HEADER_SIZE as u64))
            .map_err(|e| io_at(&p, e))?;
        let mut sc = Scanner::new(&hdr);
        sc.scan(&mut f, len, |_, _| {}).map_err(|e| io_at(&p, e))?;
        if sc.last_commit() == len {
            return Ok(None);
        }
        let f = OpenOptions::new()
            .write(true)
            .open(&p)
            .map_err(|e| io_at(&p, e))?;
        f.set_len(sc.last_commit()).map_err(|e| io_at(&p, e))?;
        f.sync_all().map_err(|e| io_at(&p, e))?;
        Ok(Some((len, sc.last_commit())))
    }

    /// What the shadow holds after a replica at `pos`, while the database is at `head` (see
    /// [`After`]).
    pub fn after(&self, pos: &Pos, head: &Pos) -> io::Result<After> {
        let p = self.index_path(&pos.generation, pos.index);
        let size = match fs::metadata(&p) {
            Ok(m) => m.len(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Ok(if pos.index < head.index {
                    After::Gone
                } else {
                    After::UpToDate
                });
            }
            Err(e) => return Err(io_at(&p, e)),
        };
        let end = wal::align(size, self.page_size(&pos.generation, pos.index)?);
        Ok(if pos.offset == end {
            if self.index_path(&pos.generation, pos.index + 1).exists() {
                After::NextIndex
            } else {
                After::UpToDate
            }
        } else if pos.offset > end {
            After::Behind(end)
        } else {
            After::Frames(end)
        })
    }

    /// The page size of an index (from its WAL header).
    pub fn page_size(&self, generation: &str, index: u32) -> io::Result<u32> {
        Ok(self.parsed_header(generation, index)?.page_size)
    }

    /// An index's WAL header, parsed; an error names the file.
    fn parsed_header(&self, generation: &str, index: u32) -> io::Result<WalHeader> {
        let p = self.index_path(generation, index);
        let hdr = read_header_bytes(&p)
            .map_err(|e| io_at(&p, e))?
            .ok_or_else(|| {
                io_at(
                    &p,
                    io::Error::new(io::ErrorKind::UnexpectedEof, "shadow WAL has no header"),
                )
            })?;
        WalHeader::parse(&hdr).map_err(|e| io_at(&p, io::Error::new(io::ErrorKind::InvalidData, e)))
    }

    /// Streams the bytes `[start, end)` of an index into `w` (the WAL header first when
    /// `start` is 0), checking every frame on the way (salt and checksum chain, continuing from
    /// the frame before `start`), so a shadow from another WAL life, or a damaged one, never
    /// goes up under this index. Returns the bytes written.
    pub fn copy_range(
        &self,
        generation: &str,
        index: u32,
        start: u64,
        end: u64,
        w: &mut dyn Write,
    ) -> io::Result<u64> {
        let p = self.index_path(generation, index);
        let mut f = File::open(&p).map_err(|e| io_at(&p, e))?;
        let mut hdr = [0u8; WAL_HEADER_SIZE];
        f.read_exact(&mut hdr).map_err(|e| io_at(&p, e))?;
        let h = WalHeader::parse(&hdr)
            .map_err(|e| io_at(&p, io::Error::new(io::ErrorKind::InvalidData, e)))?;
        let mut sc = if start <= WAL_HEADER_SIZE as u64 {
            w.write_all(&hdr)?;
            Scanner::new(&h)
        } else {
            let mut prev = [0u8; 24];
            f.read_exact_at(&mut prev, start - h.frame_size())
                .map_err(|e| io_at(&p, e))?;
            Scanner::resume(&h, FrameHeader::parse(&prev).checksum, start)
        };
        let from = sc.offset();
        f.seek(SeekFrom::Start(from)).map_err(|e| io_at(&p, e))?;
        let mut rd = io::BufReader::with_capacity(1 << 20, f);
        let mut write_err = None;
        let stop = sc
            .scan(&mut rd, end, |_, frame| {
                if write_err.is_none()
                    && let Err(e) = w.write_all(frame)
                {
                    write_err = Some(e);
                }
            })
            .map_err(|e| io_at(&p, e))?;
        if let Some(e) = write_err {
            return Err(e);
        }
        if let Some(stop) = stop {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{}: {} at offset {} (replica salt mismatch or damage)",
                    p.display(),
                    stop.reason(),
                    sc.offset()
                ),
            ));
        }
        if sc.offset() != end {
            return Err(io_at(
                &p,
                io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "shadow WAL shorter than expected",
                ),
            ));
        }
        Ok(end - start)
    }

    /// The newest version of every page among an index's frames before `end` (checked like
    /// [`Shadow::copy_range`]): what a restore drill lays over the database file to get the
    /// database at that position.
    pub fn page_versions(
        &self,
        generation: &str,
        index: u32,
        end: u64,
    ) -> io::Result<PageVersions> {
        let p = self.index_path(generation, index);
        let h = self.parsed_header(generation, index)?;
        let file = File::open(&p).map_err(|e| io_at(&p, e))?;
        let mut sc = Scanner::new(&h);
        let (fsz, mut at) = (h.frame_size(), WAL_HEADER_SIZE as u64);
        let mut pages = std::collections::HashMap::new();
        let mut commit_size = None;
        let mut rd = io::BufReader::with_capacity(1 << 20, &file);
        rd.seek(SeekFrom::Start(at)).map_err(|e| io_at(&p, e))?;
        let stop = sc
            .scan(&mut rd, end, |fh, _| {
                pages.insert(fh.pgno, at + wal::FRAME_HEADER_SIZE as u64);
                if fh.is_commit() {
                    commit_size = Some(fh.commit_size);
                }
                at += fsz;
            })
            .map_err(|e| io_at(&p, e))?;
        if let Some(stop) = stop {
            return Err(io_at(
                &p,
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{} at offset {}", stop.reason(), sc.offset()),
                ),
            ));
        }
        if sc.offset() != end {
            return Err(io_at(
                &p,
                io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("shadow WAL ends at {} before {end}", sc.offset()),
                ),
            ));
        }
        drop(rd);
        Ok(PageVersions {
            file,
            pages,
            commit_size,
            page_size: h.page_size,
        })
    }

    /// Bytes on disk of a generation's shadow WAL.
    pub fn bytes(&self, generation: &str) -> u64 {
        fs::read_dir(self.wal_dir(generation))
            .map(|rd| {
                rd.flatten()
                    .filter_map(|e| e.metadata().ok())
                    .map(|m| m.len())
                    .sum()
            })
            .unwrap_or(0)
    }

    /// Shadow bytes between a replica's position and the database's (`head`); `total` (all of
    /// the generation's shadow) when the replica has nothing of this generation.
    pub fn bytes_between(&self, replica: Option<&Pos>, head: &Pos, total: u64) -> u64 {
        let Some(r) = replica.filter(|r| r.generation == head.generation) else {
            return total;
        };
        if (r.index, r.offset) >= (head.index, head.offset) {
            return 0;
        }
        if r.index == head.index {
            return head.offset - r.offset;
        }
        let size = |i| self.size(&head.generation, i).unwrap_or(0);
        let mut sum = size(r.index).saturating_sub(r.offset);
        for i in r.index + 1..head.index {
            sum += size(i);
        }
        sum + head.offset
    }

    /// Removes the indexes of a generation below `index`.
    pub fn remove_below(&self, generation: &str, index: u32) -> io::Result<()> {
        for i in self.indexes(generation)? {
            if i < index {
                let p = self.index_path(generation, i);
                fs::remove_file(&p)
                    .or_else(ignore_not_found)
                    .map_err(|e| io_at(&p, e))?;
            }
        }
        Ok(())
    }

    /// Removes every generation but `keep`.
    pub fn remove_other_generations(&self, keep: Option<&str>) -> io::Result<()> {
        let Ok(rd) = fs::read_dir(self.generations_dir()) else {
            return Ok(());
        };
        for e in rd.flatten() {
            if Some(e.file_name().to_string_lossy().as_ref()) != keep {
                fs::remove_dir_all(e.path())
                    .or_else(ignore_not_found)
                    .map_err(|err| io_at(&e.path(), err))?;
            }
        }
        Ok(())
    }
}

/// Parses a shadow WAL file name `NNNNNNNN.wal`.
fn parse_index_name(name: &str) -> Option<u32> {
    let hex = name.strip_suffix(".wal")?;
    (hex.len() == 8 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
        .then(|| u32::from_str_radix(hex, 16).ok())
        .flatten()
}

fn read_small(p: &Path) -> io::Result<Option<String>> {
    match fs::read_to_string(p) {
        Ok(s) => Ok(Some(s.trim().to_string()).filter(|s| !s.is_empty())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_at(p, e)),
    }
}

/// The first 32 bytes of a file (a WAL's header): None if the file is missing or shorter.
/// Any other failure (out of descriptors, EIO) is an error, never "no header": that would read
/// as a restarted WAL and start a shadow index or a generation that nothing justified.
pub fn read_header_bytes(p: &Path) -> io::Result<Option<[u8; WAL_HEADER_SIZE]>> {
    let f = match File::open(p) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut b = [0u8; WAL_HEADER_SIZE];
    match f.read_exact_at(&mut b, 0) {
        Ok(()) => Ok(Some(b)),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(None),
        Err(e) => Err(e),
    }
}

fn ignore_not_found(e: io::Error) -> io::Result<()> {
    if e.kind() == io::ErrorKind::NotFound {
        Ok(())
    } else {
        Err(e)
    }
}

/// Writes a small file atomically: temporary, fsync, rename, fsync of the directory.
fn write_atomic(path: &Path, data: &[u8]) -> io::Result<()> {
    crate::durable::replace(path, data, 0o644).map_err(|e| io_at(path, e))
}

fn remove_tmp_files(dir: &Path) {
    let Ok(rd) = fs::read_dir(dir) else { return };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            remove_tmp_files(&p);
        } else if p.extension().is_some_and(|x| x == "tmp") {
            let _ = fs::remove_file(&p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wal::tests::build_wal;

    const PS: u32 = 512;

    /// A file holding `bytes`, as the source of an append.
    fn source(bytes: &[u8]) -> File {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(bytes).unwrap();
        f
    }

    fn index_with(shadow: &Shadow, frames: &[(u32, u32, u8)]) -> Vec<u8> {
        let w = build_wal(false, PS, frames);
        shadow
            .create_index("0123456789abcdef", 0, w[..32].try_into().unwrap())
            .unwrap();
        let n = (w.len() - 32) as u64;
        shadow
            .append("0123456789abcdef", 0, 32, &source(&w), 32, n)
            .unwrap();
        w
    }

    #[test]
    fn layout_positions_and_steps_between_indexes() {
        let d = tempfile::tempdir().unwrap();
        let s = Shadow::for_db(&d.path().join("app.db"), None);
        assert_eq!(s.root(), d.path().join(".app.db-litestream"));
        s.prepare().unwrap();
        assert_eq!(s.pos().unwrap(), None);
        let g = "0123456789abcdef";
        s.set_generation(g).unwrap();
        let w = index_with(&s, &[(1, 0, 1), (2, 2, 2)]);
        let head = s.pos().unwrap().unwrap();
        assert_eq!(head, Pos::new(g, 0, w.len() as u64));
        let start = Pos::new(g, 0, 0);
        assert_eq!(
            s.after(&start, &head).unwrap(),
            After::Frames(w.len() as u64)
        );
        assert_eq!(s.after(&head, &head).unwrap(), After::UpToDate);
        s.create_index(g, 1, w[..32].try_into().unwrap()).unwrap();
        assert_eq!(s.after(&head, &head).unwrap(), After::NextIndex);
        let later = Pos::new(g, 1, 32);
        assert_eq!(
            s.bytes_between(Some(&start), &later, 0),
            w.len() as u64 + 32
        );
        s.remove_below(g, 1).unwrap();
        assert_eq!(s.after(&start, &later).unwrap(), After::Gone);
        // What goes up is what went in, checked.
        let mut out = Vec::new();
        s.create_index(g, 2, w[..32].try_into().unwrap()).unwrap();
        s.append(g, 2, 32, &source(&w), 32, (w.len() - 32) as u64)
            .unwrap();
        assert_eq!(
            s.copy_range(g, 2, 0, w.len() as u64, &mut out).unwrap(),
            w.len() as u64
        );
        assert_eq!(out, w);
        let mut tail = Vec::new();
        let mid = 32 + wal::frame_size(PS);
        s.copy_range(g, 2, mid, w.len() as u64, &mut tail).unwrap();
        assert_eq!(tail, w[mid as usize..]);
    }

    #[test]
    fn a_failed_append_leaves_no_torn_frame_and_the_tail_is_repaired() {
        let d = tempfile::tempdir().unwrap();
        let s = Shadow::for_db(&d.path().join("app.db"), None);
        let g = "0123456789abcdef";
        s.set_generation(g).unwrap();
        let w = index_with(&s, &[(1, 1, 1)]);
        let at = w.len() as u64;
        // The source ends early: the index is cut back to where the append started.
        let err = s
            .append(g, 0, at, &source(&[7u8; 100]), 0, 4096)
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        assert_eq!(s.size(g, 0).unwrap(), at);
        // The same when the part of the file after `offset` is shorter than said.
        let err = s
            .append(g, 0, at, &source(&[7u8; 5000]), 1000, 4096)
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        assert_eq!(s.size(g, 0).unwrap(), at);
        // A crash left an uncommitted frame at the end: repaired back to the commit.
        let more = build_wal(false, PS, &[(1, 1, 1), (2, 0, 2)]);
        s.append(
            g,
            0,
            at,
            &source(&more),
            at,
            (more.len() - at as usize) as u64,
        )
        .unwrap();
        assert_eq!(std::fs::read(s.describe(g, 0)).unwrap(), more);
        assert_eq!(
            s.repair_tail(g, 0, PS).unwrap(),
            Some((more.len() as u64, at))
        );
        assert_eq!(s.size(g, 0).unwrap(), at);
        // A damaged frame is never uploaded.
        let mut bad = std::fs::read(s.describe(g, 0)).unwrap();
        *bad.last_mut().unwrap() ^= 1;
        std::fs::write(s.describe(g, 0), &bad).unwrap();
        let err = s.copy_range(g, 0, 0, at, &mut Vec::new()).unwrap_err();
        assert!(err.to_string().contains("checksum mismatch"), "{err}");
    }
}
