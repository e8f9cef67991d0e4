//! An append-only replica path (`append_only = true`): the credentials may lack delete
//! permission, or the bucket has S3 Object Lock, and the bucket's lifecycle rules do retention.
//! This wrapper makes "never delete, never replace an object" a property of the client rather
//! than a promise of every caller: a deletion or a conditional replacement reaching it is
//! refused at once with [`StoreError::Refused`] (not retried), so a path that would delete
//! fails loudly in tests instead of being sent. Every upload is create-only
//! ([`ObjectStore::put_new`]): the layout writes each segment key once, the replicator checks a
//! snapshot's key is new before it writes, and the store refuses the rest.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;

use super::{Listing, ObjectInfo, ObjectReader, ObjectStore, Precondition, StoreError};

#[derive(Debug)]
pub struct AppendOnly {
    inner: Arc<dyn ObjectStore>,
}

impl AppendOnly {
    pub fn new(inner: Arc<dyn ObjectStore>) -> Self {
        AppendOnly { inner }
    }

    fn refused(&self, op: &'static str, key: &str) -> StoreError {
        StoreError::Refused {
            store: self.inner.url(),
            op,
            key: key.to_string(),
        }
    }
}

#[async_trait]
impl ObjectStore for AppendOnly {
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }
    fn url(&self) -> String {
        self.inner.url()
    }
    async fn list(&self, dir: &str) -> Result<Listing, StoreError> {
        self.inner.list(dir).await
    }
    async fn first(&self, dir: &str) -> Result<Option<ObjectInfo>, StoreError> {
        self.inner.first(dir).await
    }
    /// Every upload is create-only: the store itself refuses to replace an object.
    async fn put(&self, key: &str, body: ObjectReader) -> Result<ObjectInfo, StoreError> {
        self.inner.put_new(key, body).await
    }
    async fn put_new(&self, key: &str, body: ObjectReader) -> Result<ObjectInfo, StoreError> {
        self.inner.put_new(key, body).await
    }
    async fn get(&self, key: &str) -> Result<ObjectReader, StoreError> {
        self.inner.get(key).await
    }
    async fn get_stat(&self, key: &str) -> Result<(ObjectReader, Option<SystemTime>), StoreError> {
        self.inner.get_stat(key).await
    }
    async fn get_range(
        &self,
        key: &str,
        start: u64,
        end: u64,
        buf: &mut Vec<u8>,
    ) -> Result<(), StoreError> {
        self.inner.get_range(key, start, end, buf).await
    }
    async fn head(&self, key: &str) -> Result<Option<ObjectInfo>, StoreError> {
        self.inner.head(key).await
    }
    async fn delete(&self, keys: &[String]) -> Result<(), StoreError> {
        match keys.first() {
            Some(k) => Err(self.refused("delete", k)),
            None => Ok(()),
        }
    }
    async fn delete_dir(&self, dir: &str) -> Result<(), StoreError> {
        Err(self.refused("delete", &format!("{dir}/")))
    }
    async fn get_versioned(&self, key: &str) -> Result<Option<(Vec<u8>, String)>, StoreError> {
        self.inner.get_versioned(key).await
    }
    async fn put_if(
        &self,
        key: &str,
        data: Vec<u8>,
        cond: &Precondition,
    ) -> Result<Option<String>, StoreError> {
        match cond {
            Precondition::Absent => self.inner.put_if(key, data, cond).await,
            Precondition::Version(_) => Err(self.refused("replace", key)),
        }
    }
    async fn delete_if(&self, key: &str, _version: &str) -> Result<bool, StoreError> {
        Err(self.refused("delete", key))
    }
    /// Nothing: incomplete multipart uploads are the lifecycle's to abort (see
    /// `docs/operations.md`), and a directory's `.tmp` leftovers are not objects.
    async fn remove_incomplete(&self, _older_than: Duration) -> Result<usize, StoreError> {
        Ok(0)
    }
    fn local_path(&self, key: &str) -> Option<std::path::PathBuf> {
        self.inner.local_path(key)
    }
}
