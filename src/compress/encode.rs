//! LZ4 frame encoding for uploads, with block buffers reused across uploads.
//!
//! Written here rather than with `lz4_flex`'s `FrameEncoder` for one reason: that encoder
//! allocates its input block and a zero-filled output block of the maximum compressed size for
//! every frame. At 600 small transactions a second a segment is ~2.4 MiB, so every upload
//! mapped ~8.4 MiB of fresh memory and the kernel zeroed it page by page: `perf` put a quarter of
//! the daemon's CPU in `clear_page_erms` under `FrameEncoder::write_block` (the `memset` of the
//! output) and under the copy into its input buffer. Here the buffers and the hash table come
//! from a small process-wide [`pool`] and go back to it, so a steady stream of uploads touches
//! the same pages; the pool lets go of buffers unused for [`KEEP`], so an idle daemon holds none.
//!
//! The frame is what Litestream 0.3 writes (pierrec/lz4 defaults: independent blocks, content
//! checksum, no block checksums, no content size), with the block size chosen by the caller
//! (`block_for`); blocks themselves are compressed by `lz4_flex`. `decode.rs` reads it,
//! and so does every LZ4 reader (the tests decode it with `lz4_flex`'s `FrameDecoder`).

use std::hash::Hasher as _;
use std::io::{self, Write};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use lz4_flex::block::{CompressTable, compress_into_with_table, get_maximum_output_size};
use twox_hash::XxHash32;

const MAGIC: u32 = 0x184D_2204;
/// FLG: version 01, independent blocks, content checksum (pierrec/lz4's defaults).
const FLG: u8 = 0b0110_0100;
/// The top bit of a block's size: the block is stored uncompressed.
const RAW: u32 = 0x8000_0000;

/// How long a buffer set stays pooled without being used.
pub const KEEP: Duration = Duration::from_secs(5);
/// Buffer sets pooled at most: more uploads at once than this allocate their own.
const MAX_POOLED: usize = 4;

/// One encoder's buffers: the input block, the compressed block, the hash table.
struct Buffers {
    block: usize,
    input: Vec<u8>,
    output: Vec<u8>,
    table: CompressTable,
    used: Instant,
}

impl Buffers {
    fn new(block: usize) -> Self {
        Buffers {
            block,
            input: Vec::with_capacity(block),
            output: Vec::new(),
            table: CompressTable::large(),
            used: Instant::now(),
        }
    }
}

/// The process-wide pool of buffer sets, and the task that empties it when uploads stop.
mod pool {
    use super::*;

    static POOL: Mutex<Vec<Buffers>> = Mutex::new(Vec::new());
    static TRIMMER: AtomicBool = AtomicBool::new(false);

    pub(super) fn take(block: usize) -> Buffers {
        let mut pool = POOL.lock().expect("lz4 pool");
        match pool.iter().rposition(|b| b.block == block) {
            Some(i) => pool.swap_remove(i),
            None => Buffers::new(block),
        }
    }

    pub(super) fn give(mut b: Buffers) {
        b.input.clear();
        b.used = Instant::now();
        let mut pool = POOL.lock().expect("lz4 pool");
        pool.push(b);
        if pool.len() > MAX_POOLED {
            let oldest = (0..pool.len())
                .min_by_key(|&i| pool[i].used)
                .expect("non-empty");
            pool.swap_remove(oldest);
        }
    }

    /// Drops the sets unused for `KEEP`; returns how many remain.
    pub(super) fn trim() -> usize {
        let mut pool = POOL.lock().expect("lz4 pool");
        pool.retain(|b| b.used.elapsed() < KEEP);
        pool.len()
    }

    /// Makes sure a task will empty the pool once uploads stop. Called from the runtime after
    /// each encoder returned its buffers; the task exits when the pool is empty, so an idle
    /// daemon has no timer for it.
    pub fn schedule_trim() {
        if TRIMMER.swap(true, Ordering::AcqRel) {
            return;
        }
        tokio::spawn(async {
            loop {
                tokio::time::sleep(KEEP).await;
                if trim() > 0 {
                    continue;
                }
                TRIMMER.store(false, Ordering::Release);
                // A set given back after the trim above, whose caller saw this task still
                // running: keep going rather than leave it pooled.
                if trim() == 0 || TRIMMER.swap(true, Ordering::AcqRel) {
                    return;
                }
            }
        });
    }

    #[cfg(test)]
    pub fn pooled() -> usize {
        POOL.lock().expect("lz4 pool").len()
    }
}

pub use pool::schedule_trim;

/// Buffers on loan from the pool, given back when dropped (with the writer, finished or not).
struct Loan(Option<Buffers>);

impl Loan {
    fn get(&mut self) -> &mut Buffers {
        self.0.as_mut().expect("buffers until dropped")
    }
}

impl Drop for Loan {
    fn drop(&mut self) {
        if let Some(b) = self.0.take() {
            pool::give(b);
        }
    }
}

/// The LZ4 block size code (BD byte) of a block size: 64 KiB, 256 KiB, 1 MiB or 4 MiB.
fn bd(block: usize) -> u8 {
    match block {
        BLOCK_64K => 4 << 4,
        BLOCK_256K => 5 << 4,
        BLOCK_1M => 6 << 4,
        BLOCK_4M => 7 << 4,
        other => panic!("not an LZ4 block size: {other}"),
    }
}

pub const BLOCK_64K: usize = 64 << 10;
pub const BLOCK_256K: usize = 256 << 10;
pub const BLOCK_1M: usize = 1 << 20;
pub const BLOCK_4M: usize = 4 << 20;

/// Writes one LZ4 frame of independent `block`-sized blocks with a content checksum into
/// `inner`. [`Lz4Writer::finish`] ends the frame; dropped without it, the frame is left
/// unfinished (no end mark), so a reader fails rather than accepting a truncated object.
pub struct Lz4Writer<W: Write> {
    inner: W,
    bufs: Loan,
    hash: XxHash32,
    header: bool,
}

impl<W: Write> Lz4Writer<W> {
    /// `block`: one of [`BLOCK_64K`], [`BLOCK_256K`], [`BLOCK_1M`], [`BLOCK_4M`].
    pub fn new(block: usize, inner: W) -> Self {
        bd(block);
        Lz4Writer {
            inner,
            bufs: Loan(Some(pool::take(block))),
            hash: XxHash32::with_seed(0),
            header: false,
        }
    }

    fn write_header(&mut self) -> io::Result<()> {
        let bd = bd(self.bufs.get().block);
        let hc = (XxHash32::oneshot(0, &[FLG, bd]) >> 8) as u8;
        let mut h = [0u8; 7];
        h[..4].copy_from_slice(&MAGIC.to_le_bytes());
        h[4..].copy_from_slice(&[FLG, bd, hc]);
        self.inner.write_all(&h)?;
        self.header = true;
        Ok(())
    }

    /// Compresses and writes the buffered block (if any).
    fn flush_block(&mut self) -> io::Result<()> {
        if !self.header {
            self.write_header()?;
        }
        let b = self.bufs.get();
        if b.input.is_empty() {
            return Ok(());
        }
        let max = get_maximum_output_size(b.input.len());
        if b.output.len() < max {
            b.output.resize(max, 0);
        }
        let n = compress_into_with_table(&b.input, &mut b.output, &mut b.table)
            .map_err(|e| io::Error::other(format!("lz4: {e}")))?;
        if n < b.input.len() {
            self.inner.write_all(&(n as u32).to_le_bytes())?;
            self.inner.write_all(&b.output[..n])?;
        } else {
            // Incompressible: stored as it is, as every LZ4 encoder does.
            self.inner
                .write_all(&(b.input.len() as u32 | RAW).to_le_bytes())?;
            self.inner.write_all(&b.input)?;
        }
        b.input.clear();
        Ok(())
    }

    /// Ends the frame (last block, end mark, content checksum) and returns the inner writer;
    /// the buffers go back to the pool.
    pub fn finish(mut self) -> io::Result<W> {
        self.flush_block()?;
        let mut tail = [0u8; 8];
        tail[4..].copy_from_slice(&self.hash.finish_32().to_le_bytes());
        self.inner.write_all(&tail)?;
        Ok(self.inner)
    }
}

impl<W: Write> Write for Lz4Writer<W> {
    fn write(&mut self, mut data: &[u8]) -> io::Result<usize> {
        let total = data.len();
        self.hash.write(data);
        while !data.is_empty() {
            let b = self.bufs.get();
            let n = (b.block - b.input.len()).min(data.len());
            b.input.extend_from_slice(&data[..n]);
            data = &data[n..];
            if b.input.len() == b.block {
                self.flush_block()?;
            }
        }
        Ok(total)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn encode(block: usize, data: &[u8], writes: usize) -> Vec<u8> {
        let mut w = Lz4Writer::new(block, Vec::new());
        for chunk in data.chunks(data.len().div_ceil(writes.max(1)).max(1)) {
            w.write_all(chunk).unwrap();
        }
        w.finish().unwrap()
    }

    /// Compressible and incompressible stretches: both block kinds.
    fn sample(len: usize) -> Vec<u8> {
        super::super::decode::tests::sample(len, 7)
    }

    #[test]
    fn frames_decode_with_lz4_flex_and_match_litestream_flags() {
        for (block, bd) in [
            (BLOCK_64K, 0x40),
            (BLOCK_256K, 0x50),
            (BLOCK_1M, 0x60),
            (BLOCK_4M, 0x70),
        ] {
            for len in [0, 1, 65_536, 65_537, 300_000, 5 << 20] {
                for writes in [1, 3, 1000] {
                    let data = sample(len);
                    let out = encode(block, &data, writes);
                    assert_eq!(&out[..4], &[0x04, 0x22, 0x4d, 0x18]);
                    assert_eq!((out[4], out[5]), (FLG, bd));
                    let mut back = Vec::new();
                    lz4_flex::frame::FrameDecoder::new(&out[..])
                        .read_to_end(&mut back)
                        .unwrap();
                    assert!(back == data, "{block} {len} {writes}");
                    let scratch = super::super::Scratch::default();
                    let mut ours = Vec::new();
                    super::super::decode(&out[..], &scratch, |b| {
                        ours.extend_from_slice(b);
                        Ok(())
                    })
                    .unwrap();
                    assert!(ours == data);
                }
            }
        }
    }

    #[test]
    fn unfinished_frame_is_refused_and_buffers_go_back() {
        let data = sample(200_000);
        let mut w = Lz4Writer::new(BLOCK_64K, Vec::new());
        w.write_all(&data).unwrap();
        let partial = w.inner.clone();
        drop(w);
        // Restore's decoder refuses it (lz4_flex's `FrameDecoder` takes a stream that stops
        // between blocks as a whole frame).
        let scratch = super::super::Scratch::default();
        assert!(super::super::decode(&partial[..], &scratch, |_| Ok(())).is_err());
        // Given back on drop (other tests share the pool, so only "at least one").
        assert!(pool::pooled() >= 1);
    }
}
