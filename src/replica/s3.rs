//! The `s3` target on aws-sdk-s3: AWS S3 and S3-compatible stores (MinIO, R2, B2, ...).
//!
//! Uploads read the body one part at a time: an object that fits in one part is a single
//! PutObject, a larger one a multipart upload with `part_size` parts (aborted on any error), so
//! memory per upload is one part whatever the database size.

use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use aws_config::BehaviorVersion;
use aws_sdk_s3::Client;
use aws_sdk_s3::config::{Credentials, Region};
use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{
    ChecksumAlgorithm, CompletedMultipartUpload, CompletedPart, Delete, ObjectIdentifier,
};

use super::{Listing, ObjectInfo, ObjectReader, ObjectStore, Precondition, StoreError};

/// User metadata (`x-amz-meta-litestreamd-put-ms`) on single-request uploads: when the upload
/// was sent, in Unix milliseconds, for a standby's lag (see `get_stat`). Other readers,
/// Litestream included, ignore it.
const PUT_MS: &str = "litestreamd-put-ms";

fn unix_ms_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64
}

/// 16 MiB parts: a 100 GiB snapshot needs 6,400 parts, inside S3's 10,000-part limit
/// (Litestream's fixed 5 MiB parts stop at ~48 GiB, #276/#447).
pub const DEFAULT_PART_SIZE: usize = 16 * 1024 * 1024;
/// S3's minimum part size (except the last part).
pub const MIN_PART_SIZE: usize = 5 * 1024 * 1024;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct S3Config {
    pub bucket: String,
    /// Key prefix of the replica (no leading slash from a URL).
    pub path: String,
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub force_path_style: Option<bool>,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
    pub part_size: Option<usize>,
    /// Accept any TLS certificate (self-signed S3-compatible stores on a private network).
    pub skip_verify: bool,
    /// An Object Lock retention set on every upload.
    pub object_lock: Option<ObjectLock>,
}

/// `object_lock = { mode = "governance" | "compliance", days = N }`: every object uploaded is
/// locked until N days after its upload (`x-amz-object-lock-mode` and
/// `x-amz-object-lock-retain-until-date`). The bucket must have Object Lock enabled.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ObjectLock {
    pub mode: LockMode,
    pub days: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LockMode {
    /// Users with `s3:BypassGovernanceRetention` can still delete.
    Governance,
    /// Nobody can delete a locked version before its date, not even the root account.
    Compliance,
}

impl ObjectLock {
    fn mode(&self) -> aws_sdk_s3::types::ObjectLockMode {
        match self.mode {
            LockMode::Governance => aws_sdk_s3::types::ObjectLockMode::Governance,
            LockMode::Compliance => aws_sdk_s3::types::ObjectLockMode::Compliance,
        }
    }
    fn until(&self) -> aws_sdk_s3::primitives::DateTime {
        let t = SystemTime::now() + Duration::from_secs(u64::from(self.days) * 24 * 3600);
        aws_sdk_s3::primitives::DateTime::from(t)
    }
}

impl S3Config {
    /// Parses `s3://bucket/path?endpoint=...&region=...&force-path-style=true`.
    pub fn from_url(u: &url::Url) -> Result<Self, String> {
        let bucket = u
            .host_str()
            .filter(|h| !h.is_empty())
            .ok_or("missing bucket")?
            .to_string();
        let mut c = S3Config {
            bucket,
            path: u.path().trim_start_matches('/').to_string(),
            ..Default::default()
        };
        for (k, v) in u.query_pairs() {
            match k.as_ref() {
                "endpoint" => c.endpoint = Some(v.into_owned()),
                "region" => c.region = Some(v.into_owned()),
                "force-path-style" | "force_path_style" => {
                    c.force_path_style = Some(
                        v.parse()
                            .map_err(|_| format!("force-path-style={v}: expected true or false"))?,
                    )
                }
                "skip-verify" | "skip_verify" => {
                    c.skip_verify = v
                        .parse()
                        .map_err(|_| format!("skip-verify={v}: expected true or false"))?
                }
                other => return Err(format!("unknown URL parameter {other:?}")),
            }
        }
        Ok(c)
    }
}

impl S3Config {
    /// What can be checked without a client: bucket, endpoint, part size.
    pub fn check(&self) -> Result<(), String> {
        if self.bucket.is_empty() {
            return Err("bucket is required".into());
        }
        if let Some(ep) = &self.endpoint {
            super::check_endpoint(ep)?;
        }
        if self.part_size.is_some_and(|p| p < MIN_PART_SIZE) {
            return Err(format!("part_size must be at least {MIN_PART_SIZE} bytes"));
        }
        match (&self.access_key_id, &self.secret_access_key) {
            (Some(_), None) | (None, Some(_)) => {
                Err("access_key_id and secret_access_key must be set together".into())
            }
            _ => Ok(()),
        }
    }
}

pub struct S3Store {
    client: Client,
    cfg: S3Config,
    part_size: usize,
}

impl std::fmt::Debug for S3Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Store").field("url", &self.url()).finish()
    }
}

impl S3Store {
    pub async fn new(cfg: S3Config) -> Result<Self, String> {
        cfg.check()?;
        let part_size = cfg.part_size.unwrap_or(DEFAULT_PART_SIZE);
        let mut loader = aws_config::defaults(BehaviorVersion::latest());
        match (&cfg.region, &cfg.endpoint) {
            (Some(r), _) => loader = loader.region(Region::new(r.clone())),
            // A custom endpoint without a region: us-east-1, as Litestream does.
            (None, Some(_)) => loader = loader.region(Region::new("us-east-1")),
            (None, None) => {}
        }
        match (&cfg.access_key_id, &cfg.secret_access_key) {
            (Some(k), Some(s)) => {
                loader = loader.credentials_provider(Credentials::new(
                    k,
                    s,
                    None,
                    None,
                    "litestreamd-config",
                ));
            }
            (None, None) => {} // the SDK's default chain: env, profile, web identity, IMDS
            _ => return Err("access_key_id and secret_access_key must be set together".into()),
        }
        if cfg.skip_verify {
            tracing::warn!(bucket = %cfg.bucket, endpoint = ?cfg.endpoint, "skip_verify: TLS certificates of this S3 endpoint are not verified");
            loader = loader.http_client(super::http::insecure());
        }
        let sdk = loader.load().await;
        let mut b = aws_sdk_s3::config::Builder::from(&sdk)
            // Our own replica-level backoff retries forever; keep the SDK's short.
            .retry_config(aws_sdk_s3::config::retry::RetryConfig::standard().with_max_attempts(2))
            .timeout_config(
                aws_sdk_s3::config::timeout::TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(5))
                    .read_timeout(Duration::from_secs(60))
                    .build(),
            );
        if let Some(ep) = &cfg.endpoint {
            b = b.endpoint_url(ep);
            // Only the S3 requests: credentials may still come from an https service (STS).
            if !cfg.skip_verify
                && ep
                    .get(..7)
                    .is_some_and(|s| s.eq_ignore_ascii_case("http://"))
            {
                b = b.http_client(super::http::quick_ack());
            }
        }
        b = b.force_path_style(cfg.force_path_style.unwrap_or(cfg.endpoint.is_some()));
        Ok(S3Store {
            client: Client::from_conf(b.build()),
            cfg,
            part_size,
        })
    }

    fn key(&self, k: &str) -> String {
        super::bucket_key(&self.cfg.path, k)
    }

    /// GetObject, counted; the body is left to the caller (streamed or collected).
    async fn get_object(
        &self,
        key: &str,
    ) -> Result<aws_sdk_s3::operation::get_object::GetObjectOutput, StoreError> {
        let out = self
            .client
            .get_object()
            .bucket(&self.cfg.bucket)
            .key(self.key(key))
            .send()
            .await
            .map_err(|e| self.err("get", key, e))?;
        metrics::counter!(crate::telemetry::REPLICA_OPERATIONS, "replica_type" => "s3", "operation" => "GET").increment(1);
        Ok(out)
    }

    /// Whether an error is a failed precondition (412, or 409 when a concurrent conditional
    /// write won the race) rather than a real failure.
    fn precondition_failed<E>(e: &SdkError<E, aws_sdk_s3::config::http::HttpResponse>) -> bool
    where
        E: ProvideErrorMetadata,
    {
        match e {
            SdkError::ServiceError(se) => {
                matches!(se.raw().status().as_u16(), 412 | 409)
                    || matches!(
                        e.code(),
                        Some("PreconditionFailed" | "ConditionalRequestConflict")
                    )
            }
            _ => false,
        }
    }

    fn err<E>(
        &self,
        op: &'static str,
        key: &str,
        e: SdkError<E, aws_sdk_s3::config::http::HttpResponse>,
    ) -> StoreError
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        let code = e.code().unwrap_or("").to_string();
        if matches!(code.as_str(), "NoSuchKey" | "NotFound") {
            return StoreError::NotFound {
                store: self.url(),
                key: key.to_string(),
            };
        }
        let retryable = match &e {
            SdkError::ServiceError(se) => {
                let status = se.raw().status().as_u16();
                status >= 500 || status == 429 || code == "SlowDown" || code == "RequestTimeout"
            }
            _ => true, // dispatch failures, timeouts, broken responses
        };
        StoreError::Backend {
            store: self.url(),
            op,
            key: key.to_string(),
            message: describe(&e),
            retryable,
        }
    }

    /// What every upload to an Object Lock bucket carries: the retention, if configured, and
    /// an integrity checksum (a locked bucket refuses a PUT without Content-MD5 or
    /// `x-amz-sdk-checksum-algorithm`). CRC32 is computed by the SDK from the body.
    fn lock(&self) -> (Option<&ObjectLock>, Option<ChecksumAlgorithm>) {
        let lock = self.cfg.object_lock.as_ref();
        (lock, lock.map(|_| ChecksumAlgorithm::Crc32))
    }

    /// `put` and `put_new` (create-only: `If-None-Match: *` on the PutObject or on the
    /// multipart completion, which S3 evaluates there).
    async fn put_with(
        &self,
        key: &str,
        mut body: ObjectReader,
        create_only: bool,
    ) -> Result<ObjectInfo, StoreError> {
        let first = super::read_up_to(&mut body, self.part_size)
            .await
            .map_err(|e| self.io_err(key, e))?;
        let size = if first.len() < self.part_size {
            let n = first.len() as u64;
            let (lock, checksum) = self.lock();
            self.client
                .put_object()
                .bucket(&self.cfg.bucket)
                .key(self.key(key))
                .metadata(PUT_MS, unix_ms_now().to_string())
                .set_object_lock_mode(lock.map(ObjectLock::mode))
                .set_object_lock_retain_until_date(lock.map(ObjectLock::until))
                .set_checksum_algorithm(checksum)
                .set_if_none_match(create_only.then(|| "*".to_string()))
                .body(ByteStream::from(first))
                .send()
                .await
                .map_err(|e| self.put_err(key, e, create_only))?;
            n
        } else {
            self.put_multipart(key, first, &mut body, create_only)
                .await?
        };
        metrics::counter!(crate::telemetry::REPLICA_OPERATIONS, "replica_type" => "s3", "operation" => "PUT").increment(1);
        metrics::counter!(crate::telemetry::REPLICA_OPERATION_BYTES, "replica_type" => "s3", "operation" => "PUT").increment(size);
        let name = key.rsplit('/').next().unwrap_or(key).to_string();
        // S3 sets LastModified at the end of the upload; "now" is within a round trip of it and
        // saves a HEAD per segment. Listings (which restore and retention use) carry the real one.
        Ok(ObjectInfo {
            name,
            size,
            modified: SystemTime::now(),
        })
    }

    /// An upload's error; a failed `If-None-Match` of a create-only upload is [`StoreError::Exists`].
    fn put_err<E>(
        &self,
        key: &str,
        e: SdkError<E, aws_sdk_s3::config::http::HttpResponse>,
        create_only: bool,
    ) -> StoreError
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        if create_only && Self::precondition_failed(&e) {
            return StoreError::Exists {
                store: self.url(),
                key: key.to_string(),
            };
        }
        self.err("put", key, e)
    }

    async fn put_multipart(
        &self,
        key: &str,
        first: Vec<u8>,
        body: &mut ObjectReader,
        create_only: bool,
    ) -> Result<u64, StoreError> {
        let full = self.key(key);
        let (lock, checksum) = self.lock();
        let created = self
            .client
            .create_multipart_upload()
            .bucket(&self.cfg.bucket)
            .key(&full)
            .set_object_lock_mode(lock.map(ObjectLock::mode))
            .set_object_lock_retain_until_date(lock.map(ObjectLock::until))
            .set_checksum_algorithm(checksum.clone())
            .send()
            .await
            .map_err(|e| self.err("put", key, e))?;
        let upload_id = created.upload_id().unwrap_or_default().to_string();
        let result = async {
            let mut parts = Vec::new();
            let mut total = 0u64;
            let mut buf = first;
            loop {
                let n = buf.len();
                total += n as u64;
                let num = parts.len() as i32 + 1;
                let out = self
                    .client
                    .upload_part()
                    .bucket(&self.cfg.bucket)
                    .key(&full)
                    .upload_id(&upload_id)
                    .part_number(num)
                    .set_checksum_algorithm(checksum.clone())
                    .body(ByteStream::from(buf))
                    .send()
                    .await
                    .map_err(|e| self.err("put", key, e))?;
                parts.push(
                    CompletedPart::builder()
                        .part_number(num)
                        .set_e_tag(out.e_tag().map(str::to_string))
                        .set_checksum_crc32(out.checksum_crc32().map(str::to_string))
                        .build(),
                );
                buf = super::read_up_to(body, self.part_size)
                    .await
                    .map_err(|e| self.io_err(key, e))?;
                if buf.is_empty() {
                    break;
                }
            }
            self.client
                .complete_multipart_upload()
                .bucket(&self.cfg.bucket)
                .key(&full)
                .upload_id(&upload_id)
                .multipart_upload(
                    CompletedMultipartUpload::builder()
                        .set_parts(Some(parts))
                        .build(),
                )
                .set_if_none_match(create_only.then(|| "*".to_string()))
                .send()
                .await
                .map_err(|e| self.put_err(key, e, create_only))?;
            Ok(total)
        }
        .await;
        if result.is_err() {
            let _ = self
                .client
                .abort_multipart_upload()
                .bucket(&self.cfg.bucket)
                .key(&full)
                .upload_id(&upload_id)
                .send()
                .await;
        }
        result
    }

    fn io_err(&self, key: &str, source: std::io::Error) -> StoreError {
        StoreError::Io {
            store: self.url(),
            op: "put",
            key: key.to_string(),
            source,
        }
    }

    async fn list_prefix(
        &self,
        prefix: &str,
        delimiter: bool,
        op_key: &str,
    ) -> Result<(Vec<aws_sdk_s3::types::Object>, Vec<String>), StoreError> {
        let mut objects = Vec::new();
        let mut dirs = Vec::new();
        let mut token = None;
        loop {
            let mut req = self
                .client
                .list_objects_v2()
                .bucket(&self.cfg.bucket)
                .prefix(prefix)
                .set_continuation_token(token);
            if delimiter {
                req = req.delimiter("/");
            }
            let out = req.send().await.map_err(|e| self.err("list", op_key, e))?;
            metrics::counter!(crate::telemetry::REPLICA_OPERATIONS, "replica_type" => "s3", "operation" => "LIST").increment(1);
            objects.extend(out.contents().iter().cloned());
            dirs.extend(
                out.common_prefixes()
                    .iter()
                    .filter_map(|p| p.prefix().map(str::to_string)),
            );
            match out.next_continuation_token() {
                Some(t) if out.is_truncated() == Some(true) => token = Some(t.to_string()),
                _ => break,
            }
        }
        Ok((objects, dirs))
    }
}

/// One readable line for an SDK error: the service's code, message and HTTP status, or the
/// innermost cause of a connection failure (not the SDK's multi-kilobyte debug dump).
fn describe<E>(e: &SdkError<E, aws_sdk_s3::config::http::HttpResponse>) -> String
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let innermost = |e: &dyn std::error::Error| {
        let mut cur = e;
        while let Some(next) = cur.source() {
            cur = next;
        }
        cur.to_string()
    };
    match e {
        SdkError::ServiceError(se) => {
            let status = se.raw().status().as_u16();
            match (e.code(), e.message()) {
                (Some(c), Some(m)) => format!("{c}: {m} (HTTP {status})"),
                (Some(c), None) => format!("{c} (HTTP {status})"),
                _ => format!("HTTP {status}"),
            }
        }
        SdkError::TimeoutError(_) => "request timed out".into(),
        SdkError::DispatchFailure(d) => {
            let why = d
                .as_connector_error()
                .map(|c| innermost(c))
                .unwrap_or_else(|| DisplayErrorContext(e).to_string());
            if d.is_timeout() {
                format!("connection timed out: {why}")
            } else {
                format!("cannot reach the endpoint: {why}")
            }
        }
        SdkError::ResponseError(_) => format!("invalid response: {}", innermost(e)),
        other => innermost(other),
    }
}

fn to_system_time(t: Option<&aws_sdk_s3::primitives::DateTime>) -> SystemTime {
    t.and_then(|t| SystemTime::try_from(*t).ok())
        .unwrap_or(SystemTime::UNIX_EPOCH)
}

#[async_trait]
impl ObjectStore for S3Store {
    fn kind(&self) -> &'static str {
        "s3"
    }

    fn url(&self) -> String {
        format!(
            "s3://{}/{}",
            self.cfg.bucket,
            self.cfg.path.trim_matches('/')
        )
    }

    async fn list(&self, dir: &str) -> Result<Listing, StoreError> {
        let prefix = format!("{}/", self.key(dir));
        let (objects, dirs) = self.list_prefix(&prefix, true, dir).await?;
        Ok(Listing {
            objects: objects
                .into_iter()
                .filter_map(|o| {
                    let name = o.key()?.strip_prefix(&prefix)?.to_string();
                    Some(ObjectInfo {
                        name,
                        size: o.size().unwrap_or(0) as u64,
                        modified: to_system_time(o.last_modified()),
                    })
                })
                .collect(),
            dirs: dirs
                .into_iter()
                .filter_map(|d| Some(d.strip_prefix(&prefix)?.trim_end_matches('/').to_string()))
                .collect(),
        })
    }

    async fn first(&self, dir: &str) -> Result<Option<ObjectInfo>, StoreError> {
        let prefix = format!("{}/", self.key(dir));
        let out = self
            .client
            .list_objects_v2()
            .bucket(&self.cfg.bucket)
            .prefix(&prefix)
            .delimiter("/")
            .max_keys(1)
            .send()
            .await
            .map_err(|e| self.err("list", dir, e))?;
        metrics::counter!(crate::telemetry::REPLICA_OPERATIONS, "replica_type" => "s3", "operation" => "LIST").increment(1);
        Ok(out.contents().first().and_then(|o| {
            Some(ObjectInfo {
                name: o.key()?.strip_prefix(&prefix)?.to_string(),
                size: o.size().unwrap_or(0) as u64,
                modified: to_system_time(o.last_modified()),
            })
        }))
    }

    async fn put(&self, key: &str, body: ObjectReader) -> Result<ObjectInfo, StoreError> {
        self.put_with(key, body, false).await
    }

    async fn put_new(&self, key: &str, body: ObjectReader) -> Result<ObjectInfo, StoreError> {
        self.put_with(key, body, true).await
    }

    async fn get_stat(&self, key: &str) -> Result<(ObjectReader, Option<SystemTime>), StoreError> {
        let out = self.get_object(key).await?;
        // Our own upload time when we wrote it: Last-Modified has whole seconds only, which
        // made a standby's lag read up to a second high.
        let ours = out
            .metadata()
            .and_then(|m| m.get(PUT_MS))
            .and_then(|v| v.parse::<u64>().ok())
            .map(|ms| SystemTime::UNIX_EPOCH + Duration::from_millis(ms));
        let modified = ours.or_else(|| {
            out.last_modified()
                .and_then(|t| SystemTime::try_from(*t).ok())
        });
        Ok((Box::pin(out.body.into_async_read()), modified))
    }

    async fn get(&self, key: &str) -> Result<ObjectReader, StoreError> {
        let out = self.get_object(key).await?;
        Ok(Box::pin(out.body.into_async_read()))
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
        let out = self
            .client
            .get_object()
            .bucket(&self.cfg.bucket)
            .key(self.key(key))
            .range(format!("bytes={start}-{}", end - 1))
            .send()
            .await
            .map_err(|e| self.err("get", key, e))?;
        metrics::counter!(crate::telemetry::REPLICA_OPERATIONS, "replica_type" => "s3", "operation" => "GET").increment(1);
        let mut body = out.body;
        // A server that sends more than the range (one ignoring `Range`) is cut off here, and
        // the caller's length check names the object.
        let limit = buf.len() + (end - start) as usize;
        while buf.len() <= limit
            && let Some(piece) = body.try_next().await.map_err(|e| StoreError::Io {
                store: self.url(),
                op: "get",
                key: key.to_string(),
                source: std::io::Error::other(e),
            })?
        {
            buf.extend_from_slice(&piece);
        }
        Ok(())
    }

    async fn remove_incomplete(&self, older_than: Duration) -> Result<usize, StoreError> {
        let prefix = format!("{}/", self.key(""));
        let prefix = prefix.trim_start_matches('/').to_string();
        let cutoff = SystemTime::now()
            .checked_sub(older_than)
            .unwrap_or(SystemTime::UNIX_EPOCH);
        let (mut key_marker, mut id_marker) = (None, None);
        let mut n = 0;
        loop {
            let out = self
                .client
                .list_multipart_uploads()
                .bucket(&self.cfg.bucket)
                .prefix(&prefix)
                .set_key_marker(key_marker.take())
                .set_upload_id_marker(id_marker.take())
                .send()
                .await
                .map_err(|e| self.err("list uploads", "", e))?;
            metrics::counter!(crate::telemetry::REPLICA_OPERATIONS, "replica_type" => "s3", "operation" => "LIST").increment(1);
            for u in out.uploads() {
                let (Some(key), Some(id)) = (u.key(), u.upload_id()) else {
                    continue;
                };
                if to_system_time(u.initiated()) > cutoff {
                    continue;
                }
                metrics::counter!(crate::telemetry::REPLICA_OPERATIONS, "replica_type" => "s3", "operation" => "DELETE").increment(1);
                self.client
                    .abort_multipart_upload()
                    .bucket(&self.cfg.bucket)
                    .key(key)
                    .upload_id(id)
                    .send()
                    .await
                    .map_err(|e| self.err("abort upload", key, e))?;
                n += 1;
            }
            if out.is_truncated() != Some(true) {
                return Ok(n);
            }
            key_marker = out.next_key_marker().map(str::to_string);
            id_marker = out.next_upload_id_marker().map(str::to_string);
            if key_marker.is_none() {
                return Ok(n);
            }
        }
    }

    async fn head(&self, key: &str) -> Result<Option<ObjectInfo>, StoreError> {
        metrics::counter!(crate::telemetry::REPLICA_OPERATIONS, "replica_type" => "s3", "operation" => "HEAD").increment(1);
        match self
            .client
            .head_object()
            .bucket(&self.cfg.bucket)
            .key(self.key(key))
            .send()
            .await
        {
            Ok(out) => Ok(Some(ObjectInfo {
                name: key.rsplit('/').next().unwrap_or(key).to_string(),
                size: out.content_length().unwrap_or(0) as u64,
                modified: to_system_time(out.last_modified()),
            })),
            Err(e) => match self.err("head", key, e) {
                StoreError::NotFound { .. } => Ok(None),
                other => Err(other),
            },
        }
    }

    async fn delete(&self, keys: &[String]) -> Result<(), StoreError> {
        for chunk in keys.chunks(1000) {
            let ids: Vec<ObjectIdentifier> = chunk
                .iter()
                .map(|k| {
                    ObjectIdentifier::builder()
                        .key(self.key(k))
                        .build()
                        .expect("key is set")
                })
                .collect();
            let first = chunk.first().map(String::as_str).unwrap_or("");
            let del = Delete::builder()
                .set_objects(Some(ids))
                .quiet(true)
                .build()
                .expect("objects set");
            let out = self
                .client
                .delete_objects()
                .bucket(&self.cfg.bucket)
                .delete(del)
                .send()
                .await
                .map_err(|e| self.err("delete", first, e))?;
            metrics::counter!(crate::telemetry::REPLICA_OPERATIONS, "replica_type" => "s3", "operation" => "DELETE").increment(1);
            if let Some(e) = out.errors().first() {
                return Err(StoreError::Backend {
                    store: self.url(),
                    op: "delete",
                    key: e.key().unwrap_or(first).to_string(),
                    message: format!("{}: {}", e.code().unwrap_or(""), e.message().unwrap_or("")),
                    retryable: true,
                });
            }
        }
        Ok(())
    }

    async fn delete_dir(&self, dir: &str) -> Result<(), StoreError> {
        let prefix = format!("{}/", self.key(dir));
        let (objects, _) = self.list_prefix(&prefix, false, dir).await?;
        // Keys relative to the replica root, as delete() expects.
        let keys: Vec<String> = objects
            .iter()
            .filter_map(|o| o.key())
            .map(|k| super::root_relative(&self.cfg.path, k))
            .collect();
        self.delete(&keys).await
    }

    async fn get_versioned(&self, key: &str) -> Result<Option<(Vec<u8>, String)>, StoreError> {
        let out = match self.get_object(key).await {
            Ok(out) => out,
            Err(StoreError::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(e),
        };
        let etag = out.e_tag().unwrap_or_default().to_string();
        let data = out
            .body
            .collect()
            .await
            .map_err(|e| self.io_err(key, std::io::Error::other(e)))?
            .to_vec();
        Ok(Some((data, etag)))
    }

    async fn put_if(
        &self,
        key: &str,
        data: Vec<u8>,
        cond: &Precondition,
    ) -> Result<Option<String>, StoreError> {
        let (lock, checksum) = self.lock();
        let req = self
            .client
            .put_object()
            .bucket(&self.cfg.bucket)
            .key(self.key(key))
            .set_object_lock_mode(lock.map(ObjectLock::mode))
            .set_object_lock_retain_until_date(lock.map(ObjectLock::until))
            .set_checksum_algorithm(checksum)
            .body(ByteStream::from(data));
        let req = match cond {
            Precondition::Absent => req.if_none_match("*"),
            Precondition::Version(etag) => req.if_match(etag),
        };
        metrics::counter!(crate::telemetry::REPLICA_OPERATIONS, "replica_type" => "s3", "operation" => "PUT").increment(1);
        match req.send().await {
            Ok(out) => Ok(Some(out.e_tag().unwrap_or_default().to_string())),
            Err(e) if Self::precondition_failed(&e) => Ok(None),
            Err(e) => Err(self.err("put", key, e)),
        }
    }

    async fn delete_if(&self, key: &str, version: &str) -> Result<bool, StoreError> {
        // S3 evaluates If-Match on DeleteObject since 2025; a store that ignores the header
        // deletes unconditionally, which only matters if someone took the lease in between.
        metrics::counter!(crate::telemetry::REPLICA_OPERATIONS, "replica_type" => "s3", "operation" => "DELETE").increment(1);
        match self
            .client
            .delete_object()
            .bucket(&self.cfg.bucket)
            .key(self.key(key))
            .if_match(version)
            .send()
            .await
        {
            Ok(_) => Ok(true),
            Err(e) if Self::precondition_failed(&e) => Ok(false),
            Err(e) => match self.err("delete", key, e) {
                StoreError::NotFound { .. } => Ok(false),
                other => Err(other),
            },
        }
    }
}
