//! LZ4 *frame* encoding as Litestream v0.3 writes it (4 MiB independent blocks, content
//! checksum; `encode`), decoding for restores (`decode`), and the bridge that streams a
//! blocking producer into an async object upload.

use std::io::{self, Read, Write};
use std::sync::Arc;

use bytes::Bytes;
use lz4_flex::frame::FrameDecoder;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::io::StreamReader;

use crate::crypt::AgeKeys;
/// A streaming object body, as `replica::ObjectReader` (spelled out: `replica` builds on this
/// module, not the other way round).
type ObjectReader = std::pin::Pin<Box<dyn tokio::io::AsyncRead + Send>>;

mod decode;
mod encode;
pub use decode::{Scratch, decode, decode_parallel};
pub use encode::{BLOCK_1M, BLOCK_4M, BLOCK_64K, BLOCK_256K, Lz4Writer};

/// The frame settings pierrec/lz4 uses by default, which Litestream v0.3 emits (what
/// [`Lz4Writer`] writes with 4 MiB blocks); for tests that encode with `lz4_flex`.
#[cfg(test)]
pub(crate) fn frame_info() -> lz4_flex::frame::FrameInfo {
    use lz4_flex::frame::{BlockMode, BlockSize, FrameInfo};
    FrameInfo::new()
        .block_size(BlockSize::Max4MB)
        .block_mode(BlockMode::Independent)
        .content_checksum(true)
}

/// The block size of a frame of `size` bytes: for a WAL segment (size known) the smallest that
/// holds it whole, at most 1 MiB; for a snapshot (None) Litestream's 4 MiB, which restore
/// decodes on every core. Not smaller: blocks are independent, and a WAL segment of small
/// transactions rewrites the same pages over and over, which LZ4 finds only within a block
/// (600 single-row commits, 2.6 MB of WAL: 96 KB in 4 MiB blocks, 98 KB in 1 MiB, 112 KB in
/// 256 KiB, 167 KB in 64 KiB). Not bigger for segments: the encoder holds an input and an output
/// block, 8.4 MiB at 4 MiB against 2.1 MiB, for those 2%. Every LZ4 reader (Litestream's
/// pierrec/lz4 too) takes any block size the frame declares.
pub fn block_for(size: Option<u64>) -> usize {
    match size {
        Some(n) if n <= BLOCK_64K as u64 => BLOCK_64K,
        Some(n) if n <= BLOCK_256K as u64 => BLOCK_256K,
        Some(_) => BLOCK_1M,
        None => BLOCK_4M,
    }
}

/// Compresses a whole buffer into one frame.
pub fn compress(data: &[u8]) -> io::Result<Vec<u8>> {
    let mut enc = Lz4Writer::new(
        block_for(Some(data.len() as u64)),
        Vec::with_capacity(data.len() / 2 + 64),
    );
    enc.write_all(data)?;
    enc.finish()
}

/// Decompresses one whole frame.
pub fn decompress(data: &[u8]) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    // lz4_flex checks the content checksum, so a flipped byte is an error, not bad data.
    FrameDecoder::new(data).read_to_end(&mut out)?;
    Ok(out)
}

const CHUNK: usize = 256 * 1024;

/// A `Write` that hands chunks to an async reader through a bounded channel. If it is dropped
/// before [`ChannelWriter::finish`] (an error or a panic in the producer), the reader gets an
/// error instead of a clean EOF, so a truncated object is never committed by the store.
pub struct ChannelWriter {
    tx: Option<mpsc::Sender<io::Result<Bytes>>>,
}

impl ChannelWriter {
    pub fn finish(mut self) {
        self.tx = None;
    }
}

impl Write for ChannelWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = buf.len().min(CHUNK);
        let tx = self
            .tx
            .as_ref()
            .ok_or_else(|| io::Error::other("writer finished"))?;
        tx.blocking_send(Ok(Bytes::copy_from_slice(&buf[..n])))
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "upload aborted"))?;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for ChannelWriter {
    fn drop(&mut self) {
        if let Some(tx) = self.tx.take() {
            let _ = tx.try_send(Err(io::Error::other(
                "object producer failed before the end",
            )));
        }
    }
}

/// Runs `produce` on a blocking thread; what it writes is LZ4-framed, encrypted when `age` has
/// recipients (age outside, LZ4 inside, as Litestream 0.3 does), and streamed to the returned
/// reader. Memory stays bounded by the channel (4 chunks) plus one LZ4 block, whatever the size;
/// the block buffers are pooled across uploads (`encode`).
/// The join handle returns the number of *uncompressed* bytes produced.
pub fn lz4_stream<F>(
    age: Option<Arc<AgeKeys>>,
    size: Option<u64>,
    produce: F,
) -> (ObjectReader, tokio::task::JoinHandle<io::Result<u64>>)
where
    F: FnOnce(&mut dyn Write) -> io::Result<u64> + Send + 'static,
{
    let (tx, rx) = mpsc::channel(4);
    let blocking = move || {
        let sink = ChannelWriter { tx: Some(tx) };
        let n = match age.filter(|k| k.encrypts()) {
            None => {
                let mut enc = Lz4Writer::new(block_for(size), sink);
                let n = produce(&mut enc)?;
                enc.finish()?.finish();
                n
            }
            Some(keys) => {
                let mut enc = Lz4Writer::new(block_for(size), keys.encrypt_writer(sink)?);
                let n = produce(&mut enc)?;
                enc.finish()?.finish()?.finish();
                n
            }
        };
        Ok(n)
    };
    // A producer blocks on its channel until the upload reads, and an upload to a directory
    // needs the blocking pool too (tokio::fs): with a bounded pool (see `BLOCKING_THREADS`),
    // producers must never take every thread, so they wait for a permit first.
    let handle = tokio::spawn(async move {
        let _permit = ENCODERS.acquire().await.expect("never closed");
        let n = tokio::task::spawn_blocking(blocking)
            .await
            .unwrap_or_else(|e| Err(io::Error::other(e)));
        encode::schedule_trim();
        n
    });
    let reader = StreamReader::new(ReceiverStream::new(rx));
    (Box::pin(reader), handle)
}

/// Threads of a daemon's blocking pool: every database's sync passes, file replica I/O and
/// encoders share it, so 10,000 databases queue for 64 threads instead of starting 512
/// (tokio's default). Leaves room beyond `ENCODERS` for the work encoders wait on.
pub const BLOCKING_THREADS: usize = 64;

/// Encoders (uploads being produced) at once, process-wide: a quarter of the blocking pool.
static ENCODERS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(BLOCKING_THREADS / 4);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_flags_match_litestream() {
        let mut w = Lz4Writer::new(BLOCK_4M, Vec::new());
        w.write_all(b"hello hello hello").unwrap();
        let out = w.finish().unwrap();
        assert_eq!(&out[0..4], &[0x04, 0x22, 0x4d, 0x18]);
        // FLG: version 01, block independence, content checksum.
        assert_eq!(out[4], 0b0110_0100);
        // BD: 4 MiB max block size.
        assert_eq!(out[5], 0x70);
        assert_eq!(decompress(&out).unwrap(), b"hello hello hello");
        // A known size: the same frame with 64 KiB blocks (BD 0x40), 256 KiB, then 1 MiB for
        // anything bigger; unknown (a snapshot): 4 MiB.
        let small = compress(b"hello hello hello").unwrap();
        assert_eq!((small[4], small[5]), (0b0110_0100, 0x40));
        assert_eq!(decompress(&small).unwrap(), b"hello hello hello");
        let bd = |n| {
            let mut w = Lz4Writer::new(block_for(Some(n)), Vec::new());
            w.write_all(b"x").unwrap();
            w.finish().unwrap()[5]
        };
        assert_eq!(
            [
                bd(65536),
                bd(65537),
                bd(1 << 20),
                bd((1 << 20) + 1),
                bd(1 << 40)
            ],
            [0x40, 0x50, 0x60, 0x60, 0x60]
        );
        let mut w = Lz4Writer::new(block_for(None), Vec::new());
        w.write_all(b"x").unwrap();
        assert_eq!(w.finish().unwrap()[5], 0x70);
    }

    #[test]
    fn flipped_byte_is_an_error() {
        let data: Vec<u8> = (0..100_000u32)
            .flat_map(|i| (i % 251).to_le_bytes())
            .collect();
        let good = compress(&data).unwrap();
        for at in [7, good.len() / 2, good.len() - 2] {
            let mut bad = good.clone();
            bad[at] ^= 0x10;
            assert!(decompress(&bad).is_err(), "flip at {at} not detected");
        }
    }
}
