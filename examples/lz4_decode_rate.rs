//! LZ4 decode throughput of replica objects on this machine, for the restore benchmark's floor
//! (`bench/restorebench.py`): every `*.lz4` object under the given directories is read into
//! memory, then decoded with the restore's own decoder (`compress::decode_parallel` on every
//! core for objects of 4 MiB and more, `compress::decode` for the rest). Prints one JSON line:
//! compressed and decoded bytes, and seconds spent decoding.
//!
//!     cargo run --release --example lz4_decode_rate -- DIR...

use std::path::{Path, PathBuf};
use std::time::Instant;

fn objects(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            objects(&p, out);
        } else if p.to_string_lossy().ends_with(".lz4") {
            out.push(p);
        }
    }
}

fn main() {
    let mut files = Vec::new();
    for d in std::env::args().skip(1) {
        objects(Path::new(&d), &mut files);
    }
    let data: Vec<Vec<u8>> = files.iter().map(|p| std::fs::read(p).unwrap()).collect();
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
    let scratch = litestreamd::compress::Scratch::default();
    let t0 = Instant::now();
    let mut decoded = 0u64;
    for d in &data {
        decoded += if d.len() >= 4 << 20 {
            litestreamd::compress::decode_parallel(&d[..], workers, |_| Ok(())).unwrap()
        } else {
            litestreamd::compress::decode(&d[..], &scratch, |_| Ok(())).unwrap()
        };
    }
    let secs = t0.elapsed().as_secs_f64();
    let compressed: usize = data.iter().map(Vec::len).sum();
    println!(
        "{{\"objects\": {}, \"compressed\": {compressed}, \"decoded\": {decoded}, \"seconds\": {secs}, \"workers\": {workers}}}",
        data.len()
    );
}
