//! The `gcs` target over Google Cloud Storage's JSON API (the `gcloud-storage` crate; see the
//! note beside the dependency in Cargo.toml for why not Google's own 1.x crate).
//!
//! Application Default Credentials in production; with a custom endpoint (or the
//! `STORAGE_EMULATOR_HOST` variable that Google's tools use) requests are anonymous, which is what
//! local emulators expect. Objects that fit in one chunk go up in a single request; bigger ones
//! through a resumable session in `chunk_size` pieces, so memory stays bounded.

use std::time::SystemTime;

use async_trait::async_trait;
use futures::TryStreamExt;
use gcloud_storage::client::{Client, ClientConfig};
use gcloud_storage::http::Error as GcsError;
use gcloud_storage::http::objects::delete::DeleteObjectRequest;
use gcloud_storage::http::objects::download::Range;
use gcloud_storage::http::objects::get::GetObjectRequest;
use gcloud_storage::http::objects::list::ListObjectsRequest;
use gcloud_storage::http::objects::upload::{Media, UploadObjectRequest, UploadType};
use gcloud_storage::http::resumable_upload_client::{ChunkSize, UploadStatus};
use tokio_util::io::StreamReader;

use super::{Listing, ObjectInfo, ObjectReader, ObjectStore, Precondition, StoreError};

/// Resumable chunks must be multiples of 256 KiB; 16 MiB keeps request counts low.
pub const DEFAULT_CHUNK_SIZE: usize = 16 * 1024 * 1024;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GcsConfig {
    pub bucket: String,
    pub path: String,
    /// A custom endpoint (an emulator): requests are then anonymous.
    pub endpoint: Option<String>,
    pub chunk_size: Option<usize>,
}

impl GcsConfig {
    /// Parses `gs://bucket/path` or `gcs://bucket/path` (optional `?endpoint=`).
    pub fn from_url(u: &url::Url) -> Result<Self, String> {
        let bucket = u
            .host_str()
            .filter(|h| !h.is_empty())
            .ok_or("missing bucket")?
            .to_string();
        let mut c = GcsConfig {
            bucket,
            path: u.path().trim_start_matches('/').to_string(),
            ..Default::default()
        };
        for (k, v) in u.query_pairs() {
            match k.as_ref() {
                "endpoint" => c.endpoint = Some(v.into_owned()),
                other => return Err(format!("unknown URL parameter {other:?}")),
            }
        }
        Ok(c)
    }
}

impl GcsConfig {
    /// What can be checked without a client: bucket, endpoint, chunk size.
    pub fn check(&self) -> Result<(), String> {
        if self.bucket.is_empty() {
            return Err("bucket is required".into());
        }
        if let Some(ep) = &self.endpoint {
            super::check_endpoint(ep)?;
        }
        if self
            .chunk_size
            .is_some_and(|c| c == 0 || !c.is_multiple_of(256 * 1024))
        {
            return Err("chunk_size must be a positive multiple of 256 KiB".into());
        }
        Ok(())
    }
}

pub struct GcsStore {
    client: Client,
    cfg: GcsConfig,
    chunk_size: usize,
}

impl std::fmt::Debug for GcsStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GcsStore")
            .field("url", &self.url())
            .finish()
    }
}

impl GcsStore {
    pub async fn new(cfg: GcsConfig) -> Result<Self, String> {
        cfg.check()?;
        let chunk_size = cfg.chunk_size.unwrap_or(DEFAULT_CHUNK_SIZE);
        let endpoint = cfg
            .endpoint
            .clone()
            .or_else(|| std::env::var("STORAGE_EMULATOR_HOST").ok());
        let config = match endpoint {
            Some(ep) => {
                let ep = if ep.contains("://") {
                    ep
                } else {
                    format!("http://{ep}")
                };
                ClientConfig {
                    storage_endpoint: ep.trim_end_matches('/').to_string(),
                    ..Default::default()
                }
                .anonymous()
            }
            None => ClientConfig::default()
                .with_auth()
                .await
                .map_err(|e| format!("Application Default Credentials: {e}"))?,
        };
        Ok(GcsStore {
            client: Client::new(config),
            cfg,
            chunk_size,
        })
    }

    fn key(&self, k: &str) -> String {
        super::bucket_key(&self.cfg.path, k)
    }

    fn err(&self, op: &'static str, key: &str, e: GcsError) -> StoreError {
        let (status, retryable) = match &e {
            GcsError::Response(r) => (
                Some(r.code),
                r.code >= 500 || r.code == 429 || r.code == 408,
            ),
            GcsError::HttpClient(h) => (
                h.status().map(|s| s.as_u16()),
                h.status().is_none_or(|s| s.is_server_error()),
            ),
            _ => (None, true),
        };
        if status == Some(404) && op == "get" {
            return StoreError::NotFound {
                store: self.url(),
                key: key.to_string(),
            };
        }
        StoreError::Backend {
            store: self.url(),
            op,
            key: key.to_string(),
            message: e.to_string(),
            retryable,
        }
    }

    fn io_err(&self, key: &str, source: std::io::Error) -> StoreError {
        StoreError::Io {
            store: self.url(),
            op: "put",
            key: key.to_string(),
            source,
        }
    }

    /// `put` and `put_new` (create-only: `ifGenerationMatch=0`, checked by GCS when the upload
    /// starts and when it is finalised).
    async fn put_with(
        &self,
        key: &str,
        mut body: ObjectReader,
        create_only: bool,
    ) -> Result<ObjectInfo, StoreError> {
        let name = self.key(key);
        let req = UploadObjectRequest {
            bucket: self.cfg.bucket.clone(),
            if_generation_match: create_only.then_some(0),
            ..Default::default()
        };
        let err = |e: GcsError| match e {
            GcsError::Response(r) if create_only && r.code == 412 => StoreError::Exists {
                store: self.url(),
                key: key.to_string(),
            },
            e => self.err("put", key, e),
        };
        let upload_type = if create_only {
            conditional_upload(name.clone())
        } else {
            UploadType::Simple(Media::new(name.clone()))
        };
        let first = super::read_up_to(&mut body, self.chunk_size)
            .await
            .map_err(|e| self.io_err(key, e))?;
        let size = if first.len() < self.chunk_size {
            let n = first.len() as u64;
            self.client
                .upload_object(&req, first, &upload_type)
                .await
                .map_err(err)?;
            n
        } else {
            let session = self
                .client
                .prepare_resumable_upload(&req, &upload_type)
                .await
                .map_err(err)?;
            let mut offset = 0u64;
            let mut chunk = first;
            loop {
                let next = super::read_up_to(&mut body, self.chunk_size)
                    .await
                    .map_err(|e| self.io_err(key, e))?;
                let n = chunk.len() as u64;
                let total = next.is_empty().then_some(offset + n);
                let range = ChunkSize::new(offset, offset + n - 1, total);
                let status = session
                    .upload_multiple_chunk(chunk, &range)
                    .await
                    .map_err(err)?;
                offset += n;
                if total.is_some() {
                    if !matches!(status, UploadStatus::Ok(_)) {
                        return Err(StoreError::Backend {
                            store: self.url(),
                            op: "put",
                            key: key.to_string(),
                            message: format!("resumable upload not finalised: {status:?}"),
                            retryable: true,
                        });
                    }
                    break;
                }
                chunk = next;
            }
            offset
        };
        metrics::counter!(crate::telemetry::REPLICA_OPERATIONS, "replica_type" => "gcs", "operation" => "PUT").increment(1);
        metrics::counter!(crate::telemetry::REPLICA_OPERATION_BYTES, "replica_type" => "gcs", "operation" => "PUT").increment(size);
        Ok(ObjectInfo {
            name: key.rsplit('/').next().unwrap_or(key).to_string(),
            size,
            modified: SystemTime::now(),
        })
    }

    async fn list_all(
        &self,
        prefix: &str,
        delimiter: bool,
        op_key: &str,
    ) -> Result<(Vec<gcloud_storage::http::objects::Object>, Vec<String>), StoreError> {
        let mut items = Vec::new();
        let mut prefixes = Vec::new();
        let mut page_token = None;
        loop {
            let req = ListObjectsRequest {
                bucket: self.cfg.bucket.clone(),
                prefix: Some(prefix.to_string()),
                delimiter: delimiter.then(|| "/".to_string()),
                page_token,
                ..Default::default()
            };
            let out = self
                .client
                .list_objects(&req)
                .await
                .map_err(|e| self.err("list", op_key, e))?;
            metrics::counter!(crate::telemetry::REPLICA_OPERATIONS, "replica_type" => "gcs", "operation" => "LIST").increment(1);
            items.extend(out.items.unwrap_or_default());
            prefixes.extend(out.prefixes.unwrap_or_default());
            match out.next_page_token {
                Some(t) if !t.is_empty() => page_token = Some(t),
                _ => break,
            }
        }
        Ok((items, prefixes))
    }
}

/// The upload type of a conditional upload: a multipart upload (metadata + media in one
/// request). GCS evaluates `ifGenerationMatch` on every upload type; fake-gcs-server, which the
/// tests run against, only on this one, and a precondition the tests cannot see fail is not
/// tested.
fn conditional_upload(name: String) -> UploadType {
    UploadType::Multipart(Box::new(gcloud_storage::http::objects::Object {
        name,
        ..Default::default()
    }))
}

#[async_trait]
impl ObjectStore for GcsStore {
    fn kind(&self) -> &'static str {
        "gcs"
    }

    fn url(&self) -> String {
        format!(
            "gs://{}/{}",
            self.cfg.bucket,
            self.cfg.path.trim_matches('/')
        )
    }

    async fn list(&self, dir: &str) -> Result<Listing, StoreError> {
        let prefix = format!("{}/", self.key(dir));
        let (items, prefixes) = self.list_all(&prefix, true, dir).await?;
        Ok(Listing {
            objects: items
                .into_iter()
                .filter_map(|o| {
                    let name = o.name.strip_prefix(&prefix)?.to_string();
                    let modified = o
                        .time_created
                        .map(SystemTime::from)
                        .unwrap_or(SystemTime::UNIX_EPOCH);
                    Some(ObjectInfo {
                        name,
                        size: o.size.max(0) as u64,
                        modified,
                    })
                })
                .collect(),
            dirs: prefixes
                .into_iter()
                .filter_map(|d| Some(d.strip_prefix(&prefix)?.trim_end_matches('/').to_string()))
                .collect(),
        })
    }

    async fn first(&self, dir: &str) -> Result<Option<ObjectInfo>, StoreError> {
        let prefix = format!("{}/", self.key(dir));
        let req = ListObjectsRequest {
            bucket: self.cfg.bucket.clone(),
            prefix: Some(prefix.clone()),
            delimiter: Some("/".to_string()),
            max_results: Some(1),
            ..Default::default()
        };
        let out = self
            .client
            .list_objects(&req)
            .await
            .map_err(|e| self.err("list", dir, e))?;
        metrics::counter!(crate::telemetry::REPLICA_OPERATIONS, "replica_type" => "gcs", "operation" => "LIST").increment(1);
        Ok(out
            .items
            .unwrap_or_default()
            .into_iter()
            .next()
            .and_then(|o| {
                Some(ObjectInfo {
                    name: o.name.strip_prefix(&prefix)?.to_string(),
                    size: o.size.max(0) as u64,
                    modified: o
                        .time_created
                        .map(SystemTime::from)
                        .unwrap_or(SystemTime::UNIX_EPOCH),
                })
            }))
    }

    async fn put(&self, key: &str, body: ObjectReader) -> Result<ObjectInfo, StoreError> {
        self.put_with(key, body, false).await
    }

    async fn put_new(&self, key: &str, body: ObjectReader) -> Result<ObjectInfo, StoreError> {
        self.put_with(key, body, true).await
    }

    async fn get(&self, key: &str) -> Result<ObjectReader, StoreError> {
        let req = GetObjectRequest {
            bucket: self.cfg.bucket.clone(),
            object: self.key(key),
            ..Default::default()
        };
        let stream = self
            .client
            .download_streamed_object(&req, &Range::default())
            .await
            .map_err(|e| self.err("get", key, e))?;
        metrics::counter!(crate::telemetry::REPLICA_OPERATIONS, "replica_type" => "gcs", "operation" => "GET").increment(1);
        let stream = stream.map_err(std::io::Error::other);
        Ok(Box::pin(StreamReader::new(stream)))
    }

    async fn get_range(
        &self,
        key: &str,
        start: u64,
        end: u64,
        buf: &mut Vec<u8>,
    ) -> Result<(), StoreError> {
        if end <= start {
            return Ok(());
        }
        let req = GetObjectRequest {
            bucket: self.cfg.bucket.clone(),
            object: self.key(key),
            ..Default::default()
        };
        let mut stream = self
            .client
            .download_streamed_object(&req, &Range(Some(start), Some(end - 1)))
            .await
            .map_err(|e| self.err("get", key, e))?;
        metrics::counter!(crate::telemetry::REPLICA_OPERATIONS, "replica_type" => "gcs", "operation" => "GET").increment(1);
        // A server that sends more than the range is cut off (see `S3Store::get_range`).
        let limit = buf.len() + (end - start) as usize;
        while buf.len() <= limit
            && let Some(piece) = stream
                .try_next()
                .await
                .map_err(|e| self.err("get", key, e))?
        {
            buf.extend_from_slice(&piece);
        }
        Ok(())
    }

    async fn head(&self, key: &str) -> Result<Option<ObjectInfo>, StoreError> {
        let req = GetObjectRequest {
            bucket: self.cfg.bucket.clone(),
            object: self.key(key),
            ..Default::default()
        };
        metrics::counter!(crate::telemetry::REPLICA_OPERATIONS, "replica_type" => "gcs", "operation" => "HEAD").increment(1);
        match self.client.get_object(&req).await {
            Ok(m) => Ok(Some(ObjectInfo {
                name: key.rsplit('/').next().unwrap_or(key).to_string(),
                size: m.size.max(0) as u64,
                modified: m
                    .time_created
                    .map(SystemTime::from)
                    .unwrap_or(SystemTime::UNIX_EPOCH),
            })),
            Err(GcsError::Response(r)) if r.code == 404 => Ok(None),
            Err(e) => Err(self.err("head", key, e)),
        }
    }

    async fn delete(&self, keys: &[String]) -> Result<(), StoreError> {
        // The JSON API deletes one object per request (batch requests are a separate multipart
        // protocol the client does not offer); retention deletes are rare and bounded.
        for key in keys {
            let req = DeleteObjectRequest {
                bucket: self.cfg.bucket.clone(),
                object: self.key(key),
                ..Default::default()
            };
            match self.client.delete_object(&req).await {
                Ok(()) => {}
                Err(GcsError::Response(r)) if r.code == 404 => {}
                Err(e) => return Err(self.err("delete", key, e)),
            }
            metrics::counter!(crate::telemetry::REPLICA_OPERATIONS, "replica_type" => "gcs", "operation" => "DELETE").increment(1);
        }
        Ok(())
    }

    async fn delete_dir(&self, dir: &str) -> Result<(), StoreError> {
        let prefix = format!("{}/", self.key(dir));
        let (items, _) = self.list_all(&prefix, false, dir).await?;
        // Keys relative to the replica root, as delete() expects.
        let keys: Vec<String> = items
            .iter()
            .map(|o| o.name.as_str())
            .map(|k| super::root_relative(&self.cfg.path, k))
            .collect();
        self.delete(&keys).await
    }

    async fn get_versioned(&self, key: &str) -> Result<Option<(Vec<u8>, String)>, StoreError> {
        // Metadata first for the generation, then that exact generation's bytes: if the object
        // is replaced in between, the download 404s and the pair is read again.
        for _ in 0..3 {
            let mut req = GetObjectRequest {
                bucket: self.cfg.bucket.clone(),
                object: self.key(key),
                ..Default::default()
            };
            let meta = match self.client.get_object(&req).await {
                Ok(m) => m,
                Err(GcsError::Response(r)) if r.code == 404 => return Ok(None),
                Err(e) => return Err(self.err("get", key, e)),
            };
            req.generation = Some(meta.generation);
            match self.client.download_object(&req, &Range::default()).await {
                Ok(data) => {
                    metrics::counter!(crate::telemetry::REPLICA_OPERATIONS, "replica_type" => "gcs", "operation" => "GET").increment(1);
                    return Ok(Some((data, meta.generation.to_string())));
                }
                Err(GcsError::Response(r)) if r.code == 404 => continue,
                Err(e) => return Err(self.err("get", key, e)),
            }
        }
        Err(StoreError::Backend {
            store: self.url(),
            op: "get",
            key: key.to_string(),
            message: "the object kept changing while it was read".into(),
            retryable: true,
        })
    }

    async fn put_if(
        &self,
        key: &str,
        data: Vec<u8>,
        cond: &Precondition,
    ) -> Result<Option<String>, StoreError> {
        let generation = match cond {
            // ifGenerationMatch=0: the object must not exist.
            Precondition::Absent => 0,
            Precondition::Version(v) => match v.parse::<i64>() {
                Ok(g) => g,
                Err(_) => return Ok(None),
            },
        };
        let req = UploadObjectRequest {
            bucket: self.cfg.bucket.clone(),
            if_generation_match: Some(generation),
            ..Default::default()
        };
        let upload_type = conditional_upload(self.key(key));
        metrics::counter!(crate::telemetry::REPLICA_OPERATIONS, "replica_type" => "gcs", "operation" => "PUT").increment(1);
        match self.client.upload_object(&req, data, &upload_type).await {
            Ok(obj) => Ok(Some(obj.generation.to_string())),
            Err(GcsError::Response(r)) if r.code == 412 => Ok(None),
            Err(e) => Err(self.err("put", key, e)),
        }
    }

    async fn delete_if(&self, key: &str, version: &str) -> Result<bool, StoreError> {
        let Ok(generation) = version.parse::<i64>() else {
            return Ok(false);
        };
        let req = DeleteObjectRequest {
            bucket: self.cfg.bucket.clone(),
            object: self.key(key),
            if_generation_match: Some(generation),
            ..Default::default()
        };
        metrics::counter!(crate::telemetry::REPLICA_OPERATIONS, "replica_type" => "gcs", "operation" => "DELETE").increment(1);
        match self.client.delete_object(&req).await {
            Ok(()) => Ok(true),
            Err(GcsError::Response(r)) if matches!(r.code, 404 | 412) => Ok(false),
            Err(e) => Err(self.err("delete", key, e)),
        }
    }
}
