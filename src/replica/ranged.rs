//! One big object read as several ranged GETs at once, handed on in order as one stream.
//!
//! A single HTTP stream per object is what bounded an S3 restore (one GET for a 1 GiB snapshot
//! ran at ~350 MiB/s on loopback). Here up to `connections` ranges of `chunk` bytes are in
//! flight, each retried on its own; the consumer (decryption, then the LZ4 decoder) sees one
//! ordered byte stream and never a transient error. Each range is copied out of the response
//! into a chunk buffer as it arrives, and the buffers are reused from range to range (`Pool`):
//! memory is at most `connections + 2` chunks (in flight, waiting, and the one being read),
//! allocated once per reader.

use std::collections::VecDeque;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::io::StreamReader;
use tracing::warn;

use super::{ObjectReader, ObjectStore, StoreError};

/// How a big object is read.
#[derive(Debug, Clone, Copy)]
pub struct RangeOpts {
    /// Ranged GETs in flight at once.
    pub connections: usize,
    /// Bytes per ranged GET.
    pub chunk: u64,
    /// Attempts per range before the read fails, with `backoff` doubling between them.
    pub attempts: u32,
    pub backoff: Duration,
}

impl Default for RangeOpts {
    fn default() -> Self {
        RangeOpts {
            connections: 4,
            chunk: 2 << 20,
            attempts: 5,
            backoff: Duration::from_millis(200),
        }
    }
}

/// The object `key` of `size` bytes as one stream read by ranges. The ranges stop being
/// fetched when the reader is dropped.
pub fn reader(
    store: Arc<dyn ObjectStore>,
    key: String,
    size: u64,
    opts: RangeOpts,
) -> ObjectReader {
    readers(store, vec![(key, size)], opts)
        .pop()
        .expect("one reader per object")
}

/// Several objects read back to back by one schedule of ranges: the first ranges of an object
/// are fetched while the last ones of the object before it are in flight, so a run of big WAL
/// segments keeps `connections` GETs busy instead of draining at the end of every object (each
/// GET first waits for the store). One reader per object, in order, each to be read to its end
/// before the next one moves; memory is that of one [`reader`]. Everything stops when a reader
/// still to be served is dropped.
pub fn readers(
    store: Arc<dyn ObjectStore>,
    objects: Vec<(String, u64)>,
    opts: RangeOpts,
) -> Vec<ObjectReader> {
    let mut txs = Vec::with_capacity(objects.len());
    let mut out: Vec<ObjectReader> = Vec::with_capacity(objects.len());
    for _ in &objects {
        // One whole range waits here while the consumer reads the one before it.
        let (tx, rx) = tokio::sync::mpsc::channel::<io::Result<Bytes>>(1);
        txs.push(Some(tx));
        out.push(Box::pin(StreamReader::new(ReceiverStream::new(rx))));
    }
    let chunk = opts.chunk.max(1);
    // (object, start, end) of every range, in order.
    let ranges: Vec<(usize, u64, u64)> = objects
        .iter()
        .enumerate()
        .flat_map(|(i, (_, size))| {
            (0..size.div_ceil(chunk)).map(move |n| (i, n * chunk, ((n + 1) * chunk).min(*size)))
        })
        .collect();
    let pool = Pool::new(chunk as usize);
    tokio::spawn(async move {
        // Empty objects end at once.
        for (i, (_, size)) in objects.iter().enumerate() {
            if *size == 0 {
                txs[i] = None;
            }
        }
        type Pending = (
            usize,
            u64,
            tokio::task::JoinHandle<Result<Bytes, StoreError>>,
        );
        let mut pending: VecDeque<Pending> = VecDeque::new();
        let mut next = ranges.into_iter();
        let abort = |p: &VecDeque<Pending>| p.iter().for_each(|(_, _, h)| h.abort());
        loop {
            while pending.len() < opts.connections.max(1) {
                let Some((i, start, end)) = next.next() else {
                    break;
                };
                let (store, key) = (store.clone(), objects[i].0.clone());
                let buf = pool.take();
                let h = tokio::spawn(range_with_retries(store, key, start, end, opts, buf));
                pending.push_back((i, end, h));
            }
            let Some((i, end, h)) = pending.pop_front() else {
                break;
            };
            let tx = txs[i]
                .as_ref()
                .expect("an object is served until its last range");
            let data = match h.await {
                Ok(res) => res.map_err(io::Error::other),
                Err(e) => Err(io::Error::other(e)),
            };
            // A range is never empty (it holds exactly its `end - start > 0` bytes).
            let (failed, sent) = (data.is_err(), tx.send(data).await.is_ok());
            if failed || !sent {
                abort(&pending);
                return;
            }
            if end == objects[i].1 {
                // Its last range: the reader sees the end of the object.
                txs[i] = None;
            }
        }
    });
    out
}

async fn range_with_retries(
    store: Arc<dyn ObjectStore>,
    key: String,
    start: u64,
    end: u64,
    opts: RangeOpts,
    mut buf: Pooled,
) -> Result<Bytes, StoreError> {
    let mut delay = opts.backoff;
    let mut attempt = 0;
    loop {
        attempt += 1;
        buf.data.clear();
        let res = store.get_range(&key, start, end, &mut buf.data).await;
        let res = res.and_then(|()| {
            let len = buf.data.len();
            if len as u64 == end - start {
                Ok(())
            } else {
                // The object is shorter than its listing said: it changed under the restore.
                Err(StoreError::Backend {
                    store: store.url(),
                    op: "get",
                    key: key.clone(),
                    message: format!(
                        "range {start}-{end} returned {len} bytes; the object changed while it was read"
                    ),
                    retryable: false,
                })
            }
        });
        match res {
            Err(e) if attempt < opts.attempts && e.is_retryable() => {
                warn!(%key, start, end, attempt, error = %e, retry_in = ?delay, "ranged read failed; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
            other => return other.map(|()| Bytes::from_owner(buf)),
        }
    }
}

/// The chunk buffers of one schedule of ranges, reused: a buffer goes back when the consumer
/// has read its range (the `Bytes` made of it is dropped). Fresh buffers would be mapped anew
/// by the allocator each time (restore maps anything from 32 KiB, see `main.rs`), and every
/// byte written into one would first fault a zeroed page in.
#[derive(Clone)]
struct Pool {
    free: Arc<std::sync::Mutex<Vec<Vec<u8>>>>,
    chunk: usize,
}

/// A buffer of a [`Pool`], back in it when dropped.
struct Pooled {
    data: Vec<u8>,
    pool: Pool,
}

impl Pool {
    fn new(chunk: usize) -> Pool {
        Pool {
            free: Arc::default(),
            chunk,
        }
    }
    fn take(&self) -> Pooled {
        let data = self
            .free
            .lock()
            .expect("range buffers")
            .pop()
            .unwrap_or_else(|| Vec::with_capacity(self.chunk));
        Pooled {
            data,
            pool: self.clone(),
        }
    }
}

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        &self.data
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        let data = std::mem::take(&mut self.data);
        // Only buffers of the chunk's size are worth keeping (a failed range may have grown
        // one past it; the last range of an object may be short, but its buffer is not).
        if data.capacity() >= self.pool.chunk && data.capacity() <= 2 * self.pool.chunk {
            self.pool.free.lock().expect("range buffers").push(data);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    #[tokio::test]
    async fn ranges_arrive_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn ObjectStore> = Arc::new(super::super::file::FileStore::new(dir.path()));
        let data: Vec<u8> = (0..1_000_003u32).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::write(dir.path().join("obj"), &data).unwrap();
        for (conns, chunk) in [(1, 1 << 20), (4, 4096), (3, 1_000_003), (8, 1000)] {
            let opts = RangeOpts {
                connections: conns,
                chunk,
                ..Default::default()
            };
            let mut r = reader(store.clone(), "obj".into(), data.len() as u64, opts);
            let mut got = Vec::new();
            r.read_to_end(&mut got).await.unwrap();
            assert_eq!(got, data, "{conns} connections, chunks of {chunk}");
        }
        // Several objects on one schedule (ranges crossing from one object into the next, an
        // empty one among them), read one after the other.
        let sizes = [5000usize, 0, 1, 12_345, 4096];
        let mut objects = Vec::new();
        for (n, size) in sizes.iter().enumerate() {
            let body: Vec<u8> = (0..*size).map(|i| (i * 31 + n * 7) as u8).collect();
            std::fs::write(dir.path().join(format!("o{n}")), &body).unwrap();
            objects.push((format!("o{n}"), body));
        }
        for (conns, chunk) in [(1, 4096), (3, 1000), (8, 7)] {
            let opts = RangeOpts {
                connections: conns,
                chunk,
                ..Default::default()
            };
            let list = objects
                .iter()
                .map(|(k, b)| (k.clone(), b.len() as u64))
                .collect();
            let rs = readers(store.clone(), list, opts);
            assert_eq!(rs.len(), objects.len());
            for (mut r, (key, body)) in rs.into_iter().zip(&objects) {
                let mut got = Vec::new();
                r.read_to_end(&mut got).await.unwrap();
                assert!(
                    got == *body,
                    "{key}: {conns} connections, chunks of {chunk}"
                );
            }
        }
        // A size larger than the object: the read fails rather than return a short object.
        let mut r = reader(
            store,
            "obj".into(),
            data.len() as u64 + 10,
            RangeOpts::default(),
        );
        let mut got = Vec::new();
        assert!(r.read_to_end(&mut got).await.is_err());
    }
}
