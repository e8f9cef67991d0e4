//! Which database a replica path belongs to.
//!
//! A database's *lineage* is a random id that stays with it across generations, restarts and
//! restores. The host that replicates a database keeps it in the meta directory
//! (`.NAME-litestream/lineage`); every replica path records the lineage it belongs to in a small
//! object, `litestreamd.owner`, beside `generations/` (Litestream 0.3 ignores it), claimed with
//! a conditional create. So:
//!
//! * two databases configured with one replica path (a copy-pasted file) cannot both write
//!   there, in one daemon or two, across restarts: the second finds another lineage and writes
//!   nothing (the replica is in `conflict`);
//! * a new, empty database on a fresh host (the application created it because a restore did
//!   not happen) never silently becomes the latest backup over a replica that holds data: it
//!   has no lineage and no replication history, so it is refused until an operator restores the
//!   real data or runs `litestreamd adopt NAME`;
//! * a restore records the lineage it restored (restore_on_start, `restore` of a configured
//!   database to its own path), and a file that carries Litestream's replication history
//!   (`_litestream_seq`: a restored or migrated database) takes over the replica's lineage.
//!
//! A database file replaced or recreated under a running daemon keeps the host's lineage: that
//! is the application or the operator replacing the database in place.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::replica::{ObjectStore, Precondition, StoreError};

/// The owner record's key, relative to the replica root.
pub const OWNER_KEY: &str = "litestreamd.owner";

/// The stored owner record.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Owner {
    pub lineage: String,
    /// The database's path on the host that claimed the replica path, for people.
    pub database: String,
    pub host: String,
    pub claimed_at_ms: u64,
    pub litestreamd: String,
}

impl Owner {
    pub fn new(lineage: &str, database: &str) -> Owner {
        Owner {
            lineage: lineage.to_string(),
            database: database.to_string(),
            host: nix::unistd::gethostname()
                .ok()
                .and_then(|h| h.into_string().ok())
                .unwrap_or_else(|| "unknown-host".into()),
            claimed_at_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_millis() as u64,
            litestreamd: env!("CARGO_PKG_VERSION").to_string(),
        }
    }

    /// `lineage 1f2e… (database /srv/app.db on host-a)`.
    pub fn describe(&self) -> String {
        format!(
            "lineage {} (database {} on {})",
            self.lineage, self.database, self.host
        )
    }
}

#[derive(Debug, Error)]
pub enum LineageError {
    #[error("{url}: {reason}")]
    Conflict { url: String, reason: String },
    #[error(
        "{url}/{OWNER_KEY}: unreadable owner record ({message}); if you know which database this path belongs to, run `litestreamd adopt` for it"
    )]
    Corrupt { url: String, message: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

pub fn new_lineage() -> String {
    format!("{:016x}", rand::random::<u64>())
}

/// Reads a replica path's owner record and its version.
pub async fn read(store: &Arc<dyn ObjectStore>) -> Result<Option<(Owner, String)>, LineageError> {
    let Some((data, version)) = store.get_versioned(OWNER_KEY).await? else {
        return Ok(None);
    };
    let owner = serde_json::from_slice(&data).map_err(|e| LineageError::Corrupt {
        url: store.url(),
        message: e.to_string(),
    })?;
    Ok(Some((owner, version)))
}

/// Writes the owner record if `cond` holds; false when it did not (someone else claimed it).
pub async fn claim(
    store: &Arc<dyn ObjectStore>,
    owner: &Owner,
    cond: &Precondition,
) -> Result<bool, StoreError> {
    let data = serde_json::to_vec_pretty(owner).expect("owner serialises");
    Ok(store.put_if(OWNER_KEY, data, cond).await?.is_some())
}

/// What a database whose host has no lineage record for it does with a replica path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Take the replica path's lineage: the file carries replication history (a restore, a
    /// database Litestream replicated), so it continues that database.
    Adopt(String),
    /// Start a new lineage: nothing at the path says otherwise.
    New,
    /// Refuse to write: the path holds another database's backups, or backups that a new,
    /// empty file must not replace as the latest.
    Refuse(String),
}

/// The decision for a database with no local lineage record (see the module comment).
pub fn decide(owner: Option<&Owner>, has_generations: bool, had_history: bool) -> Decision {
    match owner {
        Some(o) if had_history => Decision::Adopt(o.lineage.clone()),
        Some(o) => Decision::Refuse(format!(
            "this path holds the backups of {}, but this database file has no replication history (a new, empty file?), so it is not made the latest backup; restore the database (restore_on_start, `litestreamd restore`), or run `litestreamd adopt` for it to make this file the database from now on",
            o.describe()
        )),
        None if has_generations && !had_history => Decision::Refuse(
            "this path holds backups, but this database file has no replication history (a new, empty file?), so it is not made the latest backup; restore the database (restore_on_start, `litestreamd restore`), or run `litestreamd adopt` for it to make this file the database from now on".into(),
        ),
        None => Decision::New,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decisions() {
        let o = Owner::new("aaaa", "/srv/app.db");
        assert_eq!(decide(Some(&o), true, true), Decision::Adopt("aaaa".into()));
        assert!(
            matches!(decide(Some(&o), true, false), Decision::Refuse(m) if m.contains("lineage aaaa"))
        );
        assert!(matches!(decide(None, true, false), Decision::Refuse(_)));
        assert_eq!(decide(None, true, true), Decision::New);
        assert_eq!(decide(None, false, false), Decision::New);
    }
}
