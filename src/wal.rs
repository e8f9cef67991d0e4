//! The SQLite WAL file format: header, frame headers, the running checksum and frame alignment.
//!
//! Hand-written on purpose: the format is 56 bytes of headers and a 10-line checksum, and no
//! maintained crate exposes the *running* checksum that continuity checks need (seeding the sum
//! from the last stored frame checksum).

use thiserror::Error;

pub const WAL_HEADER_SIZE: usize = 32;
pub const FRAME_HEADER_SIZE: usize = 24;
/// Magic with little-endian checksum words.
pub const MAGIC_LE: u32 = 0x377f_0682;
/// Magic with big-endian checksum words.
pub const MAGIC_BE: u32 = 0x377f_0683;
pub const FORMAT_VERSION: u32 = 3_007_000;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum WalError {
    #[error("WAL header too short: {0} bytes")]
    ShortHeader(usize),
    #[error("invalid WAL magic {0:#010x}")]
    BadMagic(u32),
    #[error("invalid WAL page size {0}")]
    BadPageSize(u32),
    #[error("WAL header checksum mismatch")]
    HeaderChecksum,
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

/// The 32-byte WAL header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WalHeader {
    pub magic: u32,
    pub version: u32,
    pub page_size: u32,
    pub checkpoint_seq: u32,
    pub salt1: u32,
    pub salt2: u32,
    pub checksum: (u32, u32),
}

impl WalHeader {
    /// Parses and validates a header (magic, page size and header checksum).
    pub fn parse(b: &[u8]) -> Result<Self, WalError> {
        if b.len() < WAL_HEADER_SIZE {
            return Err(WalError::ShortHeader(b.len()));
        }
        let magic = be32(b, 0);
        if magic != MAGIC_LE && magic != MAGIC_BE {
            return Err(WalError::BadMagic(magic));
        }
        let page_size = be32(b, 8);
        if !(512..=65536).contains(&page_size) || !page_size.is_power_of_two() {
            return Err(WalError::BadPageSize(page_size));
        }
        let h = WalHeader {
            magic,
            version: be32(b, 4),
            page_size,
            checkpoint_seq: be32(b, 12),
            salt1: be32(b, 16),
            salt2: be32(b, 20),
            checksum: (be32(b, 24), be32(b, 28)),
        };
        if checksum(h.big_endian(), (0, 0), &b[..24]) != h.checksum {
            return Err(WalError::HeaderChecksum);
        }
        Ok(h)
    }

    /// Whether checksum words are read big-endian (magic ...83).
    pub fn big_endian(&self) -> bool {
        self.magic == MAGIC_BE
    }

    pub fn frame_size(&self) -> u64 {
        frame_size(self.page_size)
    }

    /// Serialises the header, computing its checksum.
    pub fn encode(&self) -> [u8; WAL_HEADER_SIZE] {
        let mut b = [0u8; WAL_HEADER_SIZE];
        b[0..4].copy_from_slice(&self.magic.to_be_bytes());
        b[4..8].copy_from_slice(&self.version.to_be_bytes());
        b[8..12].copy_from_slice(&self.page_size.to_be_bytes());
        b[12..16].copy_from_slice(&self.checkpoint_seq.to_be_bytes());
        b[16..20].copy_from_slice(&self.salt1.to_be_bytes());
        b[20..24].copy_from_slice(&self.salt2.to_be_bytes());
        let (c1, c2) = checksum(self.big_endian(), (0, 0), &b[..24]);
        b[24..28].copy_from_slice(&c1.to_be_bytes());
        b[28..32].copy_from_slice(&c2.to_be_bytes());
        b
    }
}

/// The 24-byte header in front of every page image in the WAL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub pgno: u32,
    /// Database size in pages after this commit; non-zero only on a commit frame.
    pub commit_size: u32,
    pub salt1: u32,
    pub salt2: u32,
    pub checksum: (u32, u32),
}

impl FrameHeader {
    pub fn parse(b: &[u8]) -> Self {
        FrameHeader {
            pgno: be32(b, 0),
            commit_size: be32(b, 4),
            salt1: be32(b, 8),
            salt2: be32(b, 12),
            checksum: (be32(b, 16), be32(b, 20)),
        }
    }

    pub fn is_commit(&self) -> bool {
        self.commit_size != 0
    }
}

/// Outcome of checking one frame against the running state of a WAL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameCheck {
    /// Salt and checksum match: the frame belongs to this WAL life.
    Valid(FrameHeader),
    /// The salt differs: the frame is from another life of the WAL (or the WAL restarted).
    SaltMismatch,
    /// The checksum differs: a torn write, stale bytes, or corruption.
    ChecksumMismatch,
}

/// Tracks salts and the running checksum while walking the frames of one WAL life.
#[derive(Debug, Clone, Copy)]
pub struct FrameChain {
    big_endian: bool,
    salt: (u32, u32),
    sum: (u32, u32),
    page_size: u32,
}

impl FrameChain {
    /// Starts a chain right after the header.
    pub fn new(header: &WalHeader) -> Self {
        FrameChain {
            big_endian: header.big_endian(),
            salt: (header.salt1, header.salt2),
            sum: header.checksum,
            page_size: header.page_size,
        }
    }

    /// Continues a chain whose last accepted frame stored `last_checksum`.
    pub fn resume(header: &WalHeader, last_checksum: (u32, u32)) -> Self {
        let mut c = Self::new(header);
        c.sum = last_checksum;
        c
    }

    pub fn page_size(&self) -> u32 {
        self.page_size
    }

    /// Checks one whole frame (`24 + page_size` bytes) and, when valid, advances the chain.
    pub fn check(&mut self, frame: &[u8]) -> FrameCheck {
        debug_assert_eq!(frame.len() as u64, frame_size(self.page_size));
        let h = FrameHeader::parse(frame);
        if (h.salt1, h.salt2) != self.salt {
            return FrameCheck::SaltMismatch;
        }
        let sum = checksum(self.big_endian, self.sum, &frame[..8]);
        let sum = checksum(self.big_endian, sum, &frame[FRAME_HEADER_SIZE..]);
        if sum != h.checksum {
            return FrameCheck::ChecksumMismatch;
        }
        self.sum = sum;
        FrameCheck::Valid(h)
    }
}

/// Why a frame walk stopped before the end of its input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// The frame's salt differs: it belongs to another life of the WAL (or the WAL restarted).
    Salt,
    /// The running checksum differs: a torn write, stale bytes, or corruption.
    Checksum,
}

impl Stop {
    pub fn reason(self) -> &'static str {
        match self {
            Stop::Salt => "frame salt mismatch",
            Stop::Checksum => "frame checksum mismatch",
        }
    }
}

/// The one frame walk of the crate: the copy of the real WAL into the shadow, the shadow's
/// tail repair, the upload of shadow segments and restore all go through it. It checks each
/// whole frame (salt and running checksum, see [`FrameChain`]) and keeps the offset of the
/// next frame and the end of the last commit frame. Frames are pushed whole (restore
/// assembles them from a stream) or read from a file ([`Scanner::scan`]).
#[derive(Debug, Clone, Copy)]
pub struct Scanner {
    chain: FrameChain,
    offset: u64,
    last_commit: u64,
}

impl Scanner {
    /// A walk from the first frame, right after `header`.
    pub fn new(header: &WalHeader) -> Self {
        let start = WAL_HEADER_SIZE as u64;
        Scanner {
            chain: FrameChain::new(header),
            offset: start,
            last_commit: start,
        }
    }

    /// A walk that continues at `offset`, after a frame whose stored checksum was
    /// `last_checksum` (`offset` is taken as the end of a commit).
    pub fn resume(header: &WalHeader, last_checksum: (u32, u32), offset: u64) -> Self {
        Scanner {
            chain: FrameChain::resume(header, last_checksum),
            offset,
            last_commit: offset,
        }
    }

    pub fn page_size(&self) -> u32 {
        self.chain.page_size()
    }
    pub fn frame_size(&self) -> u64 {
        frame_size(self.chain.page_size())
    }
    /// The offset of the next frame.
    pub fn offset(&self) -> u64 {
        self.offset
    }
    /// The end of the last commit frame seen (or the start, if none).
    pub fn last_commit(&self) -> u64 {
        self.last_commit
    }

    /// Checks one whole frame; on success the walk moves past it.
    pub fn push(&mut self, frame: &[u8]) -> Result<FrameHeader, Stop> {
        match self.chain.check(frame) {
            FrameCheck::Valid(h) => {
                self.offset += frame.len() as u64;
                if h.is_commit() {
                    self.last_commit = self.offset;
                }
                Ok(h)
            }
            FrameCheck::SaltMismatch => Err(Stop::Salt),
            FrameCheck::ChecksumMismatch => Err(Stop::Checksum),
        }
    }

    /// Reads and checks whole frames from `r` (positioned at [`Scanner::offset`]) until the
    /// walk reaches `end`, the input ends, or a frame does not continue the chain (returned).
    /// `frame` is called with each valid frame.
    pub fn scan(
        &mut self,
        r: &mut impl std::io::Read,
        end: u64,
        mut frame: impl FnMut(&FrameHeader, &[u8]),
    ) -> std::io::Result<Option<Stop>> {
        let mut buf = vec![0u8; self.frame_size() as usize];
        while self.offset + buf.len() as u64 <= end {
            if let Err(e) = r.read_exact(&mut buf) {
                if e.kind() == std::io::ErrorKind::UnexpectedEof {
                    return Ok(None);
                }
                return Err(e);
            }
            match self.push(&buf) {
                Ok(h) => frame(&h, &buf),
                Err(stop) => return Ok(Some(stop)),
            }
        }
        Ok(None)
    }

    /// [`Scanner::scan`] over bytes already in memory (`data` starts at [`Scanner::offset`];
    /// a partial frame at its end is left alone): frames are checked where they lie.
    pub fn scan_bytes(
        &mut self,
        data: &[u8],
        mut frame: impl FnMut(&FrameHeader, &[u8]),
    ) -> Option<Stop> {
        for f in data.chunks_exact(self.frame_size() as usize) {
            match self.push(f) {
                Ok(h) => frame(&h, f),
                Err(stop) => return Some(stop),
            }
        }
        None
    }
}

/// Why a WAL read as a stream ([`StreamWalk`]) is rejected.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum StreamError {
    #[error("WAL header: {0}")]
    Header(WalError),
    #[error("{} at WAL offset {at}", stop.reason())]
    Frame { stop: Stop, at: u64 },
    #[error("frame for page 0 at WAL offset {at}")]
    PageZero { at: u64 },
}

/// What [`StreamWalk::feed`] hands on: the header, or a whole frame that continues the chain
/// (with the walk after it, for its offset and last commit).
pub enum Unit<'a> {
    Header(&'a WalHeader),
    Frame(&'a FrameHeader, &'a [u8], &'a Scanner),
}

/// A WAL arriving as a byte stream, in pieces of any size (the decoded segments of an index,
/// in restore and in verify): cut into its header and whole frames, each checked (header,
/// salts, checksum chain, no page 0) before it is handed on.
#[derive(Debug, Clone, Default)]
pub struct StreamWalk {
    scanner: Option<Scanner>,
    /// A header or frame split across pieces.
    partial: Vec<u8>,
}

impl StreamWalk {
    /// The walk so far; None before the whole header arrived.
    pub fn scanner(&self) -> Option<&Scanner> {
        self.scanner.as_ref()
    }
    /// Bytes of an unfinished header or frame held back.
    pub fn partial(&self) -> usize {
        self.partial.len()
    }

    pub fn feed<E: From<StreamError>>(
        &mut self,
        mut data: &[u8],
        mut on: impl FnMut(Unit<'_>) -> Result<(), E>,
    ) -> Result<(), E> {
        while !data.is_empty() {
            let need = match &self.scanner {
                None => WAL_HEADER_SIZE,
                Some(s) => s.frame_size() as usize,
            };
            if self.partial.is_empty() && data.len() >= need {
                // Whole in this piece: no copy.
                let (unit, rest) = data.split_at(need);
                data = rest;
                self.unit(unit, &mut on)?;
                continue;
            }
            let take = (need - self.partial.len()).min(data.len());
            self.partial.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.partial.len() == need {
                let unit = std::mem::take(&mut self.partial);
                let res = self.unit(&unit, &mut on);
                self.partial = unit;
                self.partial.clear();
                res?;
            }
        }
        Ok(())
    }

    fn unit<E: From<StreamError>>(
        &mut self,
        unit: &[u8],
        on: &mut impl FnMut(Unit<'_>) -> Result<(), E>,
    ) -> Result<(), E> {
        let Some(scanner) = &mut self.scanner else {
            let h = WalHeader::parse(unit).map_err(StreamError::Header)?;
            self.scanner = Some(Scanner::new(&h));
            return on(Unit::Header(&h));
        };
        let at = scanner.offset();
        let fh = scanner
            .push(unit)
            .map_err(|stop| StreamError::Frame { stop, at })?;
        if fh.pgno == 0 {
            return Err(StreamError::PageZero { at }.into());
        }
        on(Unit::Frame(&fh, unit, scanner))
    }
}

/// SQLite's WAL checksum over `data` (a multiple of 8 bytes), continuing from `seed`.
pub fn checksum(big_endian: bool, seed: (u32, u32), data: &[u8]) -> (u32, u32) {
    debug_assert!(data.len().is_multiple_of(8));
    let (mut s0, mut s1) = seed;
    for pair in data.chunks_exact(8) {
        let (a, b) = if big_endian {
            (be32(pair, 0), be32(pair, 4))
        } else {
            (
                u32::from_le_bytes(pair[0..4].try_into().expect("4 bytes")),
                u32::from_le_bytes(pair[4..8].try_into().expect("4 bytes")),
            )
        };
        s0 = s0.wrapping_add(a).wrapping_add(s1);
        s1 = s1.wrapping_add(b).wrapping_add(s0);
    }
    (s0, s1)
}

pub fn frame_size(page_size: u32) -> u64 {
    FRAME_HEADER_SIZE as u64 + page_size as u64
}

/// Rounds a WAL size down to a frame boundary (0 below a whole header).
pub fn align(size: u64, page_size: u32) -> u64 {
    if size < WAL_HEADER_SIZE as u64 {
        return 0;
    }
    let fs = frame_size(page_size);
    WAL_HEADER_SIZE as u64 + (size - WAL_HEADER_SIZE as u64) / fs * fs
}

/// Byte size of a WAL holding `frames` frames.
pub fn size_of_frames(frames: u64, page_size: u32) -> u64 {
    WAL_HEADER_SIZE as u64 + frames * frame_size(page_size)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Builds a WAL image: header plus frames of (pgno, commit, page fill byte).
    pub fn build_wal(big_endian: bool, page_size: u32, frames: &[(u32, u32, u8)]) -> Vec<u8> {
        let h = WalHeader {
            magic: if big_endian { MAGIC_BE } else { MAGIC_LE },
            version: FORMAT_VERSION,
            page_size,
            checkpoint_seq: 0,
            salt1: 0x1234_5678,
            salt2: 0x9abc_def0,
            checksum: (0, 0),
        };
        let hb = h.encode();
        let h = WalHeader::parse(&hb).unwrap();
        let mut out = hb.to_vec();
        let mut sum = h.checksum;
        for &(pgno, commit, fill) in frames {
            let mut f = vec![fill; frame_size(page_size) as usize];
            f[0..4].copy_from_slice(&pgno.to_be_bytes());
            f[4..8].copy_from_slice(&commit.to_be_bytes());
            f[8..12].copy_from_slice(&h.salt1.to_be_bytes());
            f[12..16].copy_from_slice(&h.salt2.to_be_bytes());
            sum = checksum(big_endian, sum, &f[..8]);
            sum = checksum(big_endian, sum, &f[24..]);
            f[16..20].copy_from_slice(&sum.0.to_be_bytes());
            f[20..24].copy_from_slice(&sum.1.to_be_bytes());
            out.extend_from_slice(&f);
        }
        out
    }

    #[test]
    fn header_roundtrip_and_rejects() {
        let wal = build_wal(false, 4096, &[]);
        let h = WalHeader::parse(&wal).unwrap();
        assert_eq!(h.page_size, 4096);
        assert_eq!(h.encode().to_vec(), wal);
        let mut bad = wal.clone();
        bad[17] ^= 1;
        assert_eq!(WalHeader::parse(&bad), Err(WalError::HeaderChecksum));
        assert_eq!(WalHeader::parse(&wal[..31]), Err(WalError::ShortHeader(31)));
        let mut bad = wal.clone();
        bad[0] = 0;
        assert!(matches!(WalHeader::parse(&bad), Err(WalError::BadMagic(_))));
    }

    #[test]
    fn align_examples() {
        assert_eq!(align(0, 4096), 0);
        assert_eq!(align(31, 4096), 0);
        assert_eq!(align(32, 4096), 32);
        assert_eq!(align(32 + 4120 - 1, 4096), 32);
        assert_eq!(align(32 + 4120, 4096), 4152);
        assert_eq!(size_of_frames(2, 4096), 0x2050);
    }

    /// Checks SQLite's own WAL against our parser: a real database written by rusqlite.
    #[test]
    fn parses_real_sqlite_wal() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.pragma_update(None, "journal_mode", "wal").unwrap();
        conn.pragma_update(None, "wal_autocheckpoint", 0).unwrap();
        conn.execute_batch("CREATE TABLE t(x); INSERT INTO t VALUES (randomblob(5000));")
            .unwrap();
        let wal = std::fs::read(dir.path().join("t.db-wal")).unwrap();
        let h = WalHeader::parse(&wal).unwrap();
        let mut chain = FrameChain::new(&h);
        let fs = h.frame_size() as usize;
        let mut commits = 0;
        for f in wal[32..].chunks_exact(fs) {
            match chain.check(f) {
                FrameCheck::Valid(fh) => commits += fh.is_commit() as u32,
                other => panic!("frame rejected: {other:?}"),
            }
        }
        assert_eq!(commits, 2);
    }

    proptest! {
        /// Any frame sequence we build validates, and flipping any byte of a frame breaks it.
        #[test]
        fn chain_detects_any_flip(
            be in any::<bool>(),
            frames in proptest::collection::vec((1u32..100, 0u32..3, any::<u8>()), 1..6),
            flip in any::<prop::sample::Index>(),
        ) {
            let page = 512;
            let wal = build_wal(be, page, &frames);
            let h = WalHeader::parse(&wal).unwrap();
            let fs = frame_size(page) as usize;
            let mut chain = FrameChain::new(&h);
            for f in wal[32..].chunks_exact(fs) {
                prop_assert!(matches!(chain.check(f), FrameCheck::Valid(_)));
            }
            let mut bad = wal.clone();
            let at = 32 + flip.index(bad.len() - 32);
            bad[at] ^= 0x40;
            let mut chain = FrameChain::new(&h);
            let ok = bad[32..].chunks_exact(fs).all(|f| matches!(chain.check(f), FrameCheck::Valid(_)));
            prop_assert!(!ok, "flip at {} went unnoticed", at);
        }

        /// The scanner walks any valid frame sequence to its end, finds its last commit, and
        /// stops on a flipped byte at exactly the frame that holds it (no earlier, no later),
        /// whether the frames are pushed or read.
        #[test]
        fn scanner_stops_at_the_damaged_frame(
            be in any::<bool>(),
            frames in proptest::collection::vec((1u32..100, 0u32..3, any::<u8>()), 1..8),
            flip in any::<prop::sample::Index>(),
        ) {
            let page = 512;
            let wal = build_wal(be, page, &frames);
            let h = WalHeader::parse(&wal).unwrap();
            let fs = frame_size(page) as usize;
            let mut sc = Scanner::new(&h);
            let stop = sc.scan(&mut &wal[32..], wal.len() as u64, |_, _| {}).unwrap();
            prop_assert_eq!(stop, None);
            prop_assert_eq!(sc.offset(), wal.len() as u64);
            let last = frames.iter().rposition(|f| f.1 != 0).map_or(32, |i| 32 + (i + 1) * fs);
            prop_assert_eq!(sc.last_commit(), last as u64);

            let mut bad = wal.clone();
            let at = 32 + flip.index(bad.len() - 32);
            bad[at] ^= 0x40;
            let damaged = (at - 32) / fs;
            let mut sc = Scanner::new(&h);
            let mut seen = 0;
            let stop = sc.scan(&mut &bad[32..], bad.len() as u64, |_, _| seen += 1).unwrap();
            prop_assert!(stop.is_some(), "flip at {} went unnoticed", at);
            prop_assert_eq!(seen, damaged, "stopped at the damaged frame");
            prop_assert_eq!(sc.offset(), (32 + damaged * fs) as u64);
            // Pushed one by one, the same.
            let mut sc = Scanner::new(&h);
            let pushed = bad[32..].chunks_exact(fs).take_while(|f| sc.push(f).is_ok()).count();
            prop_assert_eq!(pushed, damaged);
        }

        /// The parser never panics on arbitrary bytes.
        #[test]
        fn header_parse_total(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = WalHeader::parse(&bytes);
            if bytes.len() >= 24 { let _ = FrameHeader::parse(&bytes); }
        }

        /// Checksum is a fold: summing in two pieces equals summing at once.
        #[test]
        fn checksum_is_resumable(be in any::<bool>(), a in proptest::collection::vec(any::<u8>(), 0..16), b in proptest::collection::vec(any::<u8>(), 0..16)) {
            let a = &a[..a.len() / 8 * 8];
            let b = &b[..b.len() / 8 * 8];
            let whole: Vec<u8> = a.iter().chain(b.iter()).copied().collect();
            prop_assert_eq!(checksum(be, checksum(be, (0, 0), a), b), checksum(be, (0, 0), &whole));
        }
    }
}
