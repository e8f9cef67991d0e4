//! LZ4 frame decoding for restores: multi-threaded for big snapshots, and with reused buffers
//! for the many small WAL segments.
//!
//! The frame layer (magic, descriptor, block headers, checksums) is parsed here by hand, while
//! the blocks themselves are decoded by `lz4_flex`. Its `FrameDecoder` decodes one block at a
//! time on the caller's thread, and allocates and zeroes a 4 MiB block buffer for every frame:
//! a 1 GiB snapshot is 256 independent 4 MiB blocks that can decode on every core while earlier
//! ones are being written, and a long WAL history is thousands of frames of a few KiB. Every
//! check `FrameDecoder` makes is made here too (header checksum, block sizes and checksums,
//! content size and checksum). Frames with linked blocks, which Litestream never writes, are
//! handed to `FrameDecoder`.
//!
//! Threads of [`decode_parallel`]: a reader splits the stream into blocks and deals them
//! round-robin to `workers` decoders; a checker collects the results in the same round-robin
//! order (so no reordering is needed) and hashes the content, which the caller's thread hands
//! to its sink. Memory is bounded by [`InFlight`]: at most `workers` blocks between the reader
//! and the sink, each one or two 4 MiB buffers (raw blocks pass through in their input buffer),
//! so a restore's decoder holds at most `2 * workers + 1` buffers whatever the object's size.
//! (`workers + 1` blocks were no faster on a 512 MiB snapshot and held 4-8 MiB more.)

use std::hash::Hasher as _;
use std::io::{self, Read};
use std::sync::Mutex;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::thread;

use lz4_flex::frame::FrameDecoder;
use twox_hash::XxHash32;

const MAGIC: u32 = 0x184D_2204;
const SKIPPABLE: std::ops::RangeInclusive<u32> = 0x184D_2A50..=0x184D_2A5F;

/// What the reader deals out, in stream order.
enum Item {
    /// One block as stored in the frame.
    Block {
        buf: Vec<u8>,
        len: usize,
        stored_raw: bool,
        max: usize,
        checksum: Option<u32>,
    },
    /// Nothing to decode: passed on as it is.
    Ready(Out),
}

/// What the checker receives, in the same order.
enum Out {
    /// Decoded content; `hashed` when it counts towards the frame's checksum (content decoded
    /// by `FrameDecoder` was checked there already).
    Content {
        buf: Vec<u8>,
        len: usize,
        hashed: bool,
    },
    /// The end of a frame, with what its content must match.
    FrameEnd {
        content_size: Option<u64>,
        checksum: Option<u32>,
    },
}

/// How many blocks may be between the reader and the sink at once. The reader takes a slot
/// before it reads a block, the sink gives it back when it has written the block's content.
/// Closed when the sink side stops (an error), so a waiting reader never hangs the scope.
struct InFlight {
    state: Mutex<(usize, bool)>,
    cv: std::sync::Condvar,
    max: usize,
}

impl InFlight {
    fn new(max: usize) -> Self {
        InFlight {
            state: Mutex::new((0, false)),
            cv: std::sync::Condvar::new(),
            max: max.max(1),
        }
    }
    /// Waits for a slot; false once closed.
    fn acquire(&self) -> bool {
        let mut st = self.state.lock().expect("in-flight");
        while st.0 >= self.max && !st.1 {
            st = self.cv.wait(st).expect("in-flight");
        }
        if st.1 {
            return false;
        }
        st.0 += 1;
        true
    }
    fn release(&self) {
        let mut st = self.state.lock().expect("in-flight");
        st.0 = st.0.saturating_sub(1);
        self.cv.notify_one();
    }
    fn close(&self) {
        self.state.lock().expect("in-flight").1 = true;
        self.cv.notify_all();
    }
}

/// Closes an [`InFlight`] when dropped.
struct CloseOnDrop<'a>(&'a InFlight);

impl Drop for CloseOnDrop<'_> {
    fn drop(&mut self) {
        self.0.close();
    }
}

/// Recycled block buffers: allocating and zeroing 4 MiB per block costs more than decoding it.
#[derive(Default)]
struct Pool(Mutex<Vec<Vec<u8>>>);

impl Pool {
    fn get(&self, len: usize) -> Vec<u8> {
        let mut b = self.0.lock().expect("pool").pop().unwrap_or_default();
        if b.len() < len {
            // Exact: `resize` alone grows by doubling, and a 3 MiB buffer asked for 4 MiB
            // became 6 MiB (heaptrack: 16 MiB of a restore's 74 MiB heap peak).
            b.reserve_exact(len - b.len());
            b.resize(len, 0);
        }
        b
    }
    fn put(&self, b: Vec<u8>) {
        self.0.lock().expect("pool").push(b);
    }
}

fn corrupt(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// Block buffers shared by the decodes of one restore, so thousands of small WAL segments do
/// not each allocate and zero 4 MiB (as a new lz4_flex `FrameDecoder` does for every frame).
#[derive(Default)]
pub struct Scratch(Pool);

/// Decodes a stream of LZ4 frames on this thread and hands the content to `sink` in order,
/// at most one block (4 MiB) per call. Returns the content length. A damaged stream is an
/// `InvalidData` or `UnexpectedEof` error; `sink` may by then have received the content before
/// the damage.
pub fn decode<R, F>(r: R, scratch: &Scratch, sink: F) -> io::Result<u64>
where
    R: Read,
    F: FnMut(&[u8]) -> io::Result<()>,
{
    let pool = &scratch.0;
    let (mut check, mut sink) = (FrameCheck::default(), sink);
    read_frames(r, pool, |item| {
        if let Some((buf, len)) = check.take(decode_item(item, pool)?)? {
            let res = sink(&buf[..len]);
            pool.put(buf);
            res?;
        }
        Ok(true)
    })?;
    Ok(check.total)
}

/// [`decode`] with up to `workers` blocks decompressing at once on other threads, for big
/// snapshots.
pub fn decode_parallel<R, F>(r: R, workers: usize, mut sink: F) -> io::Result<u64>
where
    R: Read + Send,
    F: FnMut(&[u8]) -> io::Result<()>,
{
    let workers = workers.max(1);
    let pool = Pool::default();
    let in_flight = InFlight::new(workers);
    thread::scope(|s| {
        let mut to_workers = Vec::with_capacity(workers);
        let mut from_workers = Vec::with_capacity(workers);
        for _ in 0..workers {
            let (tx_in, rx_in) = sync_channel::<Item>(1);
            let (tx_out, rx_out) = sync_channel::<io::Result<Out>>(1);
            let pool = &pool;
            s.spawn(move || decode_worker(rx_in, tx_out, pool));
            to_workers.push(tx_in);
            from_workers.push(rx_out);
        }
        let pool = &pool;
        let in_flight = &in_flight;
        let reader = s.spawn(move || {
            let mut seq = 0usize;
            read_frames_bounded(r, pool, Some(in_flight), |item| {
                let sent = to_workers[seq % workers].send(item).is_ok();
                seq += 1;
                Ok(sent)
            })
        });
        // The checker collects the blocks in order and hashes them while this thread runs the
        // sink (writing to disk), so neither waits for the other.
        let (to_sink, checked) = sync_channel::<io::Result<(Vec<u8>, usize)>>(2);
        let checker = s.spawn(move || {
            let mut check = FrameCheck::default();
            for i in 0.. {
                let Ok(out) = from_workers[i % workers].recv() else {
                    break;
                };
                let checked = out.and_then(|out| check.take(out));
                let failed = checked.is_err();
                if let Some(res) = checked.transpose()
                    && (to_sink.send(res).is_err() || failed)
                {
                    break;
                }
            }
            check.total
        });

        // Whatever ends this closure drops `checked` first, which stops the checker, then the
        // workers and then the reader (each one's next send fails, and `_close` wakes a reader
        // waiting for a slot): the scope's join never hangs.
        let _close = CloseOnDrop(in_flight);
        for res in &checked {
            let (buf, len) = res?;
            let res = sink(&buf[..len]);
            pool.put(buf);
            in_flight.release();
            res?;
        }
        // The reader stops early only when a decoder failed, and that error came first; so
        // an `Ok` here means the stream ended at a frame boundary.
        drop(checked);
        let total = checker.join().expect("LZ4 checker thread panicked");
        reader.join().expect("LZ4 reader thread panicked")?;
        Ok(total)
    })
}

/// Checks each frame's content length and checksum, in stream order.
#[derive(Default)]
struct FrameCheck {
    total: u64,
    frame_hash: XxHash32,
    frame_len: u64,
}

impl FrameCheck {
    /// Returns the content to pass on, if `out` carries some.
    fn take(&mut self, out: Out) -> io::Result<Option<(Vec<u8>, usize)>> {
        match out {
            Out::Content { buf, len, hashed } => {
                if hashed {
                    self.frame_hash.write(&buf[..len]);
                    self.frame_len += len as u64;
                }
                self.total += len as u64;
                Ok(Some((buf, len)))
            }
            Out::FrameEnd {
                content_size,
                checksum,
            } => {
                let hash = std::mem::take(&mut self.frame_hash);
                let len = std::mem::take(&mut self.frame_len);
                if let Some(want) = content_size.filter(|&want| want != len) {
                    return Err(corrupt(format!(
                        "LZ4 frame content is {len} bytes, its header says {want}"
                    )));
                }
                if checksum.is_some_and(|want| want != hash.finish_32()) {
                    return Err(corrupt("LZ4 content checksum mismatch"));
                }
                Ok(None)
            }
        }
    }
}

fn decode_worker(rx: Receiver<Item>, tx: SyncSender<io::Result<Out>>, pool: &Pool) {
    for item in rx {
        let out = decode_item(item, pool);
        let failed = out.is_err();
        if tx.send(out).is_err() || failed {
            return;
        }
    }
}

fn decode_item(item: Item, pool: &Pool) -> io::Result<Out> {
    match item {
        Item::Block {
            buf,
            len,
            stored_raw,
            max,
            checksum,
        } => decode_block(buf, len, stored_raw, max, checksum, pool),
        Item::Ready(out) => Ok(out),
    }
}

fn decode_block(
    buf: Vec<u8>,
    len: usize,
    stored_raw: bool,
    max: usize,
    checksum: Option<u32>,
    pool: &Pool,
) -> io::Result<Out> {
    if checksum.is_some_and(|want| want != XxHash32::oneshot(0, &buf[..len])) {
        return Err(corrupt("LZ4 block checksum mismatch"));
    }
    if stored_raw {
        return Ok(Out::Content {
            buf,
            len,
            hashed: true,
        });
    }
    let mut out = pool.get(max);
    let n = lz4_flex::block::decompress_into(&buf[..len], &mut out[..max]);
    pool.put(buf);
    match n {
        Ok(n) => Ok(Out::Content {
            buf: out,
            len: n,
            hashed: true,
        }),
        Err(e) => {
            pool.put(out);
            Err(corrupt(format!("LZ4 block: {e}")))
        }
    }
}

/// Parses frames and hands their blocks to `send`, which returns `Ok(false)` when the consumer
/// stopped listening (it has the error to report).
fn read_frames<R: Read>(
    r: R,
    pool: &Pool,
    send: impl FnMut(Item) -> io::Result<bool>,
) -> io::Result<()> {
    read_frames_bounded(r, pool, None, send)
}

/// [`read_frames`], taking a slot of `in_flight` for every item that carries content.
fn read_frames_bounded<R: Read>(
    mut r: R,
    pool: &Pool,
    in_flight: Option<&InFlight>,
    mut send: impl FnMut(Item) -> io::Result<bool>,
) -> io::Result<()> {
    let slot = || in_flight.is_none_or(InFlight::acquire);
    loop {
        let mut magic = [0u8; 4];
        match read_full(&mut r, &mut magic)? {
            0 => return Ok(()),
            4 => {}
            _ => return Err(truncated("frame header")),
        }
        let magic = u32::from_le_bytes(magic);
        if SKIPPABLE.contains(&magic) {
            let size = read_u32(&mut r, "skippable frame size")?;
            let skipped = io::copy(&mut (&mut r).take(size as u64), &mut io::sink())?;
            if skipped != size as u64 {
                return Err(truncated("skippable frame"));
            }
            continue;
        }
        if magic != MAGIC {
            return Err(corrupt(format!("not an LZ4 frame (magic {magic:#010x})")));
        }
        let desc = read_descriptor(&mut r)?;
        if !desc.independent {
            return decode_linked(&desc.bytes, r, &mut send, pool, &slot);
        }
        loop {
            let word = read_u32(&mut r, "block header")?;
            if word == 0 {
                let checksum = match desc.content_checksum {
                    true => Some(read_u32(&mut r, "content checksum")?),
                    false => None,
                };
                if !send(Item::Ready(Out::FrameEnd {
                    content_size: desc.content_size,
                    checksum,
                }))? {
                    return Ok(());
                }
                break;
            }
            let len = (word & 0x7FFF_FFFF) as usize;
            if len > desc.max_block {
                return Err(corrupt(format!(
                    "LZ4 block of {len} bytes exceeds the frame's maximum of {}",
                    desc.max_block
                )));
            }
            if !slot() {
                return Ok(());
            }
            let mut buf = pool.get(len);
            r.read_exact(&mut buf[..len])
                .map_err(|e| eof_as(e, "block"))?;
            let checksum = match desc.block_checksums {
                true => Some(read_u32(&mut r, "block checksum")?),
                false => None,
            };
            let item = Item::Block {
                buf,
                len,
                stored_raw: word & 0x8000_0000 != 0,
                max: desc.max_block,
                checksum,
            };
            if !send(item)? {
                return Ok(());
            }
        }
    }
}

struct Descriptor {
    /// Magic and descriptor as read, for the linked-block fallback.
    bytes: Vec<u8>,
    independent: bool,
    block_checksums: bool,
    content_checksum: bool,
    content_size: Option<u64>,
    max_block: usize,
}

/// Reads a frame descriptor (after the magic) and checks its header checksum.
fn read_descriptor(r: &mut impl Read) -> io::Result<Descriptor> {
    let mut fb = [0u8; 2];
    r.read_exact(&mut fb)
        .map_err(|e| eof_as(e, "frame descriptor"))?;
    let (flg, bd) = (fb[0], fb[1]);
    if flg >> 6 != 1 || flg & 0b10 != 0 || bd & 0b1000_1111 != 0 {
        return Err(corrupt(format!(
            "unsupported LZ4 frame descriptor {flg:#04x} {bd:#04x}"
        )));
    }
    if flg & 1 != 0 {
        return Err(corrupt("LZ4 frames with a dictionary are not supported"));
    }
    let max_block = match (bd >> 4) & 0b111 {
        4 => 64 << 10,
        5 => 256 << 10,
        6 => 1 << 20,
        7 => 4 << 20,
        n => return Err(corrupt(format!("invalid LZ4 block size code {n}"))),
    };
    let mut desc = fb.to_vec();
    let content_size = if flg & 0b1000 != 0 {
        let mut b = [0u8; 8];
        r.read_exact(&mut b)
            .map_err(|e| eof_as(e, "frame descriptor"))?;
        desc.extend_from_slice(&b);
        Some(u64::from_le_bytes(b))
    } else {
        None
    };
    let mut hc = [0u8; 1];
    r.read_exact(&mut hc)
        .map_err(|e| eof_as(e, "frame descriptor"))?;
    if hc[0] != (XxHash32::oneshot(0, &desc) >> 8) as u8 {
        return Err(corrupt("LZ4 frame header checksum mismatch"));
    }
    let mut bytes = MAGIC.to_le_bytes().to_vec();
    bytes.extend_from_slice(&desc);
    bytes.push(hc[0]);
    Ok(Descriptor {
        bytes,
        independent: flg & 0b10_0000 != 0,
        block_checksums: flg & 0b1_0000 != 0,
        content_checksum: flg & 0b100 != 0,
        content_size,
        max_block,
    })
}

/// Linked blocks depend on the previous ones, so the rest of the stream is decoded on this
/// thread by `FrameDecoder` (which also checks it), and passed through in 4 MiB pieces.
fn decode_linked<R: Read>(
    header: &[u8],
    r: R,
    send: &mut impl FnMut(Item) -> io::Result<bool>,
    pool: &Pool,
    slot: &impl Fn() -> bool,
) -> io::Result<()> {
    const PIECE: usize = 4 << 20;
    let mut dec = FrameDecoder::new(io::Cursor::new(header).chain(r));
    loop {
        // (The slot of the last, empty read is never given back: nothing follows it.)
        if !slot() {
            return Ok(());
        }
        let mut buf = pool.get(PIECE);
        let len = read_full(&mut dec, &mut buf[..PIECE])?;
        if len == 0 {
            return Ok(());
        }
        let content = Out::Content {
            buf,
            len,
            hashed: false,
        };
        if !send(Item::Ready(content))? {
            return Ok(());
        }
    }
}

fn read_u32(r: &mut impl Read, what: &str) -> io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b).map_err(|e| eof_as(e, what))?;
    Ok(u32::from_le_bytes(b))
}

fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

fn truncated(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        format!("LZ4 stream ends inside a {what}"),
    )
}

fn eof_as(e: io::Error, what: &str) -> io::Error {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        truncated(what)
    } else {
        e
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use lz4_flex::frame::{BlockMode, BlockSize, FrameEncoder, FrameInfo};
    use proptest::prelude::*;
    use std::io::Write;

    fn encode(info: FrameInfo, data: &[u8]) -> Vec<u8> {
        let mut enc = FrameEncoder::with_frame_info(info, Vec::new());
        enc.write_all(data).unwrap();
        enc.finish().unwrap()
    }

    /// Decodes with `workers` threads, and with 0 on this thread (twice with one scratch, which
    /// must give the same result).
    fn decode(stream: &[u8], workers: usize) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        let collect = |b: &[u8]| {
            assert!(b.len() <= 4 << 20);
            out.extend_from_slice(b);
            Ok(())
        };
        let n = match workers {
            0 => {
                let scratch = Scratch::default();
                let mut first = Vec::new();
                super::decode(stream, &scratch, |b| {
                    first.extend_from_slice(b);
                    Ok(())
                })?;
                let n = super::decode(stream, &scratch, collect)?;
                assert_eq!(first, out);
                n
            }
            _ => decode_parallel(stream, workers, collect)?,
        };
        assert_eq!(n, out.len() as u64);
        Ok(out)
    }

    /// Half compressible text, half incompressible noise, so frames mix stored-raw and
    /// compressed blocks.
    pub(in crate::compress) fn sample(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|i| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                if (i / 100_000) % 2 == 0 {
                    (i % 61) as u8
                } else {
                    x as u8
                }
            })
            .collect()
    }

    #[test]
    fn snapshot_frames_decode_like_frame_decoder() {
        let data = sample(9 << 20 | 12345, 7);
        let stream = encode(super::super::frame_info(), &data);
        for workers in [0, 1, 2, 3, 8] {
            assert_eq!(decode(&stream, workers).unwrap(), data, "{workers} workers");
        }
    }

    #[test]
    fn every_frame_option_and_concatenated_frames() {
        let data = sample(600_000, 3);
        let mut stream = Vec::new();
        for info in [
            FrameInfo::new().block_size(BlockSize::Max64KB),
            FrameInfo::new()
                .block_size(BlockSize::Max256KB)
                .block_checksums(true)
                .content_checksum(true),
            FrameInfo::new()
                .block_size(BlockSize::Max1MB)
                .content_size(Some(data.len() as u64)),
        ] {
            stream.extend(encode(info.clone(), &data));
            // A skippable frame between frames is ignored.
            stream.extend([0x5A, 0x2A, 0x4D, 0x18, 3, 0, 0, 0, 1, 2, 3]);
        }
        let want: Vec<u8> = [&data[..], &data[..], &data[..]].concat();
        for workers in [0, 2] {
            assert_eq!(decode(&stream, workers).unwrap(), want);
            assert_eq!(decode(&[], workers).unwrap(), b"");
        }
    }

    #[test]
    fn linked_blocks_fall_back_to_frame_decoder() {
        let data = sample(5 << 20, 11);
        let linked = FrameInfo::new()
            .block_size(BlockSize::Max64KB)
            .block_mode(BlockMode::Linked)
            .content_checksum(true);
        let mut stream = encode(super::super::frame_info(), &data);
        stream.extend(encode(linked, &data));
        for workers in [0, 2] {
            assert_eq!(
                decode(&stream, workers).unwrap(),
                [&data[..], &data[..]].concat()
            );
        }
    }

    #[test]
    fn damage_is_an_error() {
        let data = sample(300_000, 5);
        let info = FrameInfo::new()
            .block_size(BlockSize::Max64KB)
            .block_checksums(true)
            .content_checksum(true)
            .content_size(Some(data.len() as u64));
        let good = encode(info, &data);
        for at in (0..good.len())
            .step_by(997)
            .chain([4, 5, 6, good.len() - 1])
        {
            let mut bad = good.clone();
            bad[at] ^= 0x04;
            assert!(decode(&bad, 2).is_err(), "flip at {at} not detected");
        }
        for len in [3, 10, good.len() / 2, good.len() - 1] {
            let e = decode(&good[..len], 2).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof, "cut at {len}: {e}");
        }
        let mut trailing = good.clone();
        trailing.extend_from_slice(b"garbage!");
        assert_eq!(
            decode(&trailing, 2).unwrap_err().kind(),
            io::ErrorKind::InvalidData
        );
    }

    #[test]
    fn a_failing_sink_stops_every_thread() {
        let stream = encode(super::super::frame_info(), &sample(20 << 20, 1));
        let mut calls = 0;
        let e = decode_parallel(&stream[..], 2, |_| {
            calls += 1;
            match calls {
                2 => Err(io::Error::other("disk full")),
                _ => Ok(()),
            }
        })
        .unwrap_err();
        assert_eq!(e.to_string(), "disk full");
        assert_eq!(calls, 2);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn any_content_round_trips(len in 0usize..400_000, seed: u64, workers in 0usize..4) {
            let data = sample(len, seed);
            let info = FrameInfo::new().block_size(BlockSize::Max64KB).content_checksum(true);
            prop_assert_eq!(decode(&encode(info, &data), workers).unwrap(), data);
        }
    }
}
