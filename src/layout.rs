//! Names in the Litestream v0.3 replica layout: generations, positions, snapshot and WAL
//! segment keys. (The local shadow WAL's layout is `shadow`'s alone.)

use std::fmt;

/// Highest WAL index; reaching it starts a new generation.
pub const MAX_INDEX: u32 = 0x7fff_ffff;

/// A generation id: exactly 16 lowercase hex characters.
pub fn is_generation(s: &str) -> bool {
    s.len() == 16 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// A fresh random generation id. Unlike Litestream's time-seeded `math/rand`, this comes from the
/// OS-seeded thread RNG, so two processes starting in the same nanosecond cannot collide.
pub fn new_generation() -> String {
    format!("{:016x}", rand::random::<u64>())
}

/// A replication position: generation, shadow WAL index and byte offset in that index.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize)]
pub struct Pos {
    pub generation: String,
    pub index: u32,
    pub offset: u64,
}

impl Pos {
    pub fn new(generation: impl Into<String>, index: u32, offset: u64) -> Self {
        Pos {
            generation: generation.into(),
            index,
            offset,
        }
    }
    pub fn is_zero(&self) -> bool {
        self.generation.is_empty()
    }
}

impl fmt::Display for Pos {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{:08x}:{}", self.generation, self.index, self.offset)
    }
}

pub fn generations_dir(root: &str) -> String {
    join(root, "generations")
}
pub fn generation_dir(root: &str, generation: &str) -> String {
    join(root, &format!("generations/{generation}"))
}
pub fn snapshots_dir(root: &str, generation: &str) -> String {
    join(root, &format!("generations/{generation}/snapshots"))
}
pub fn wal_dir(root: &str, generation: &str) -> String {
    join(root, &format!("generations/{generation}/wal"))
}
pub fn snapshot_key(root: &str, generation: &str, index: u32) -> String {
    format!(
        "{}/{}",
        snapshots_dir(root, generation),
        snapshot_name(index)
    )
}
pub fn wal_segment_key(root: &str, generation: &str, index: u32, offset: u64) -> String {
    format!(
        "{}/{}",
        wal_dir(root, generation),
        wal_segment_name(index, offset)
    )
}

pub fn snapshot_name(index: u32) -> String {
    format!("{index:08x}.snapshot.lz4")
}
pub fn wal_segment_name(index: u32, offset: u64) -> String {
    format!("{index:08x}_{offset:08x}.wal.lz4")
}

/// Joins key parts with `/`, cleaning doubled and trailing slashes as Go's `path.Join` does.
/// A leading `/` of `root` is kept (Litestream keeps it for a YAML `path:`).
pub fn join(root: &str, rest: &str) -> String {
    let lead = root.starts_with('/');
    let parts: Vec<&str> = root
        .split('/')
        .chain(rest.split('/'))
        .filter(|p| !p.is_empty() && *p != ".")
        .collect();
    let body = parts.join("/");
    if lead { format!("/{body}") } else { body }
}

fn hex8(s: &str) -> Option<u32> {
    if s.len() == 8 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        u32::from_str_radix(s, 16).ok()
    } else {
        None
    }
}

/// Parses `NNNNNNNN.snapshot.lz4`.
pub fn parse_snapshot_name(name: &str) -> Option<u32> {
    hex8(name.strip_suffix(".snapshot.lz4")?)
}

/// Parses `IIIIIIII_OOOOOOOO.wal.lz4`. Like Litestream v0.3, exactly 8 hex digits each.
pub fn parse_wal_segment_name(name: &str) -> Option<(u32, u64)> {
    let stem = name.strip_suffix(".wal.lz4")?;
    let (i, o) = stem.split_once('_')?;
    Some((hex8(i)?, hex8(o)? as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_match_v03_layout() {
        assert_eq!(
            wal_segment_key("fruits.db", "62fce60304a1d17f", 0, 0x4080),
            "fruits.db/generations/62fce60304a1d17f/wal/00000000_00004080.wal.lz4"
        );
        assert_eq!(
            snapshot_key("", "62fce60304a1d17f", 3),
            "generations/62fce60304a1d17f/snapshots/00000003.snapshot.lz4"
        );
        assert_eq!(join("/db/", "generations"), "/db/generations");
        assert_eq!(
            parse_wal_segment_name("00000003_00001038.wal.lz4"),
            Some((3, 0x1038))
        );
        assert_eq!(
            parse_wal_segment_name("0000000000000003_00001038.wal.lz4"),
            None
        );
        assert_eq!(parse_wal_segment_name("00000003_0000103G.wal.lz4"), None);
        assert_eq!(parse_snapshot_name("0000000a.snapshot.lz4"), Some(10));
        assert_eq!(parse_snapshot_name("0000000A.snapshot.lz4"), None);
        assert!(is_generation(&new_generation()));
        assert!(!is_generation("62FCE60304A1D17F"));
        assert_eq!(
            Pos::new("62fce60304a1d17f", 1, 4152).to_string(),
            "62fce60304a1d17f/00000001:4152"
        );
    }
}
