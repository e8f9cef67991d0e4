//! Configuration: a main file (daemon settings, defaults for every database, the directory of
//! per-database files) and one TOML file per database whose stem is the database's name.
//! Layering is figment's: built-in defaults, then the files, then `LITESTREAMD_*` variables for
//! the main file. `${VAR}` in string values is expanded so secrets stay out of files.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::crypt::{AgeKeys, KeySource};
use crate::db::DbOptions;
use crate::replica::{self, ReplicaClient};
use crate::replicator::{ReplicaOptions, RetryPolicy};
use crate::worker::DbSpec;

pub const DEFAULT_CONFIG: &str = "/etc/litestreamd/litestreamd.toml";

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("{path}: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: Box<figment::Error>,
    },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn invalid(path: &Path, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

/// Settings that apply to every database unless its own file overrides them.
/// Defaults are Litestream v0.3.13's.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Defaults {
    #[serde(with = "humantime_serde")]
    pub monitor_interval: Duration,
    #[serde(with = "humantime_serde")]
    pub checkpoint_interval: Duration,
    pub min_checkpoint_page_count: u32,
    pub max_checkpoint_page_count: u32,
    pub truncate_page_count: u32,
    #[serde(with = "humantime_serde")]
    pub busy_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub sync_interval: Duration,
    #[serde(with = "humantime_serde")]
    pub snapshot_interval: Duration,
    #[serde(with = "humantime_serde")]
    pub retention: Duration,
    #[serde(with = "humantime_serde")]
    pub retention_check_interval: Duration,
    pub retry: RetryPolicy,
    /// Lease on each replica path (see `lease`); `0s` disables it.
    #[serde(with = "humantime_serde")]
    pub lease_ttl: Duration,
    /// How often a replica that uploads checks that its generation is still restorable (one
    /// or two HEAD requests); `0s` disables it.
    #[serde(with = "humantime_serde")]
    pub restorable_check_interval: Duration,
}

impl Default for Defaults {
    fn default() -> Self {
        let d = DbOptions::default();
        let r = ReplicaOptions::default();
        Defaults {
            monitor_interval: d.monitor_interval,
            checkpoint_interval: d.checkpoint_interval,
            min_checkpoint_page_count: d.min_checkpoint_page_count,
            max_checkpoint_page_count: d.max_checkpoint_page_count,
            truncate_page_count: d.truncate_page_count,
            busy_timeout: d.busy_timeout,
            sync_interval: r.sync_interval,
            snapshot_interval: r.snapshot_interval,
            retention: r.retention,
            retention_check_interval: r.retention_check_interval,
            retry: r.retry,
            lease_ttl: r.lease_ttl,
            restorable_check_interval: r.restorable_check_interval,
        }
    }
}

/// The main configuration file.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MainConfig {
    /// Directory of per-database `*.toml` files; relative to the main file's directory.
    pub dbs_dir: PathBuf,
    /// The control socket for `litestreamd status`, the dashboard and scripts; empty disables.
    pub control_socket: PathBuf,
    /// Group allowed on the control socket besides root and the daemon's user.
    pub control_group: Option<String>,
    /// Octal mode of the control socket.
    pub control_mode: String,
    /// Who may restore over the control socket (the dashboard, scripts).
    pub control_restore: ControlRestore,
    /// Directories that restores requested over the control socket may write into (relative
    /// outputs go into the first). Default: `<state_dir>/restores`.
    pub restore_dirs: Vec<PathBuf>,
    /// Also allow socket restores into each database's own directory (never over the database).
    pub restore_in_db_dir: bool,
    /// The daemon's state directory. Default: `$STATE_DIRECTORY` (systemd's `StateDirectory=`),
    /// else `/var/lib/litestreamd`.
    pub state_dir: PathBuf,
    /// Prometheus `/metrics` listen address (loopback by default); empty disables it.
    pub metrics_addr: String,
    /// Series of a removed database disappear after this long without updates.
    #[serde(with = "humantime_serde")]
    pub metrics_idle_timeout: Duration,
    /// Upper bound for the final sync of every database at shutdown.
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    pub log: LogConfig,
    pub defaults: Defaults,
}

impl Default for MainConfig {
    fn default() -> Self {
        MainConfig {
            dbs_dir: PathBuf::from("dbs.d"),
            control_socket: PathBuf::from("/run/litestreamd/control.sock"),
            control_group: None,
            control_mode: "0660".into(),
            control_restore: ControlRestore::default(),
            restore_dirs: Vec::new(),
            restore_in_db_dir: false,
            state_dir: PathBuf::new(),
            metrics_addr: "127.0.0.1:9093".into(),
            metrics_idle_timeout: Duration::from_secs(120),
            shutdown_timeout: Duration::from_secs(60),
            log: LogConfig::default(),
            defaults: Defaults::default(),
        }
    }
}

/// `control_restore`: who may ask the daemon for a restore over the control socket.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum ControlRestore {
    /// Root and the daemon's own user only.
    #[default]
    Privileged,
    /// Also `control_group` members, for databases whose file they can read themselves, into a
    /// restore directory they can write.
    Readers,
}

impl MainConfig {
    /// Where socket restores may write: `restore_dirs`, or `<state_dir>/restores`.
    pub fn restore_dirs(&self) -> Vec<PathBuf> {
        if self.restore_dirs.is_empty() {
            vec![self.default_restore_dir()]
        } else {
            self.restore_dirs.clone()
        }
    }
    pub fn default_restore_dir(&self) -> PathBuf {
        self.state_dir.join("restores")
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `error`, `warn`, `info`, `debug`, `trace`, or a tracing filter directive.
    pub level: String,
    /// `text` or `json`.
    pub format: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".into(),
            format: "text".into(),
        }
    }
}

/// What to do at start when the database file is missing.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum RestoreOnStart {
    /// Wait for the application to create it.
    #[default]
    Never,
    /// Restore it from the replicas first (a fresh host or container comes up with its data).
    IfMissing,
}

/// One replica of a database, as written in its file.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct ReplicaConfig {
    /// Defaults to the type; unique within the database.
    pub name: Option<String>,
    /// `file` (default). Inferred from `url` when given.
    #[serde(rename = "type")]
    pub kind: Option<String>,
    /// A replica URL (`file:///dir`), instead of `type` + `path`.
    pub url: Option<String>,
    /// For `file`: the directory; for `s3` and `gcs`: the key prefix in the bucket.
    pub path: Option<PathBuf>,
    /// `s3`, `gcs`: the bucket.
    pub bucket: Option<String>,
    /// `s3`: an S3-compatible endpoint such as `http://127.0.0.1:9000`; `gcs`: an emulator.
    pub endpoint: Option<String>,
    /// `s3`: the region (default us-east-1 with a custom endpoint, else the SDK's chain).
    pub region: Option<String>,
    /// `s3`: path-style addressing (default: on with a custom endpoint).
    pub force_path_style: Option<bool>,
    /// `s3`: do not verify the endpoint's TLS certificate (a self-signed MinIO on a private
    /// network). Also `?skip-verify=true` in an `s3://` URL.
    pub skip_verify: Option<bool>,
    /// `s3`: keys; default the SDK's chain (environment, profile, web identity, instance role).
    /// Use `${VAR}` to keep them out of the file.
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
    /// `s3`: multipart part size in bytes; `gcs`: resumable chunk size (default 16 MiB).
    pub part_size: Option<usize>,
    #[serde(default, with = "humantime_serde::option")]
    pub sync_interval: Option<Duration>,
    #[serde(default, with = "humantime_serde::option")]
    pub snapshot_interval: Option<Duration>,
    #[serde(default, with = "humantime_serde::option")]
    pub retention: Option<Duration>,
    #[serde(default, with = "humantime_serde::option")]
    pub retention_check_interval: Option<Duration>,
    pub retry: Option<RetryPolicy>,
    /// How long the lease on the replica path lasts; `0s` disables the lease.
    #[serde(default, with = "humantime_serde::option")]
    pub lease_ttl: Option<Duration>,
    #[serde(default, with = "humantime_serde::option")]
    pub restorable_check_interval: Option<Duration>,
    /// Client-side age encryption, as Litestream 0.3 stores it.
    pub age: Option<AgeConfig>,
}

/// `[replicas.age]`: X25519 keys. Recipients encrypt what is written; identities decrypt what
/// is read (needed too, to resume from the replica). Keys can be inline (use `${VAR}` to take
/// them from the environment) or in files (`age-keygen` output; one key per line).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct AgeConfig {
    #[serde(default)]
    pub recipients: Vec<String>,
    #[serde(default)]
    pub recipient_files: Vec<PathBuf>,
    #[serde(default)]
    pub identities: Vec<String>,
    #[serde(default)]
    pub identity_files: Vec<PathBuf>,
}

impl AgeConfig {
    /// Reads and parses the keys; `file` is the config file, for messages and `${VAR}`.
    pub fn keys(&self, file: &Path) -> Result<Option<AgeKeys>, String> {
        let inline = |list: &[String], what: &str| -> Result<Vec<KeySource>, String> {
            list.iter()
                .enumerate()
                .map(|(i, v)| {
                    let text = expand_env(v, file).map_err(|e| e.to_string())?;
                    Ok(KeySource::inline(format!("age.{what}[{i}]"), text))
                })
                .collect()
        };
        let files = |list: &[PathBuf]| -> Result<Vec<KeySource>, String> {
            list.iter()
                .map(|p| KeySource::file(p).map_err(|e| e.to_string()))
                .collect()
        };
        let mut recipients = inline(&self.recipients, "recipients")?;
        recipients.extend(files(&self.recipient_files)?);
        let mut identities = inline(&self.identities, "identities")?;
        identities.extend(files(&self.identity_files)?);
        AgeKeys::parse(&recipients, &identities).map_err(|e| e.to_string())
    }
}

/// A per-database file.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct DbConfig {
    pub path: PathBuf,
    pub meta_path: Option<PathBuf>,
    #[serde(default, with = "humantime_serde::option")]
    pub monitor_interval: Option<Duration>,
    #[serde(default, with = "humantime_serde::option")]
    pub checkpoint_interval: Option<Duration>,
    pub min_checkpoint_page_count: Option<u32>,
    pub max_checkpoint_page_count: Option<u32>,
    pub truncate_page_count: Option<u32>,
    #[serde(default, with = "humantime_serde::option")]
    pub busy_timeout: Option<Duration>,
    #[serde(default)]
    pub restore_on_start: RestoreOnStart,
    /// How long the daemon's start waits for restore_on_start before it fails (the replicas
    /// cannot be read); `0s` or unset: wait as long as it takes.
    #[serde(default, with = "humantime_serde::option")]
    pub restore_on_start_timeout: Option<Duration>,
    #[serde(default)]
    pub replicas: Vec<ReplicaConfig>,
}

/// A loaded configuration: the main file and every database, by name.
#[derive(Debug)]
pub struct Config {
    pub path: PathBuf,
    pub main: MainConfig,
    pub dbs: BTreeMap<String, DbConfig>,
    /// Database files that failed to load or validate, by database name.
    pub errors: BTreeMap<String, ConfigError>,
}

impl Config {
    /// Loads the main file and the per-database directory. A bad database file is recorded in
    /// `errors` and skipped; a bad main file is an error.
    pub async fn load(path: &Path) -> Result<Config, ConfigError> {
        let main = load_main(path)?;
        let mut cfg = Config {
            path: path.to_path_buf(),
            main,
            dbs: BTreeMap::new(),
            errors: BTreeMap::new(),
        };
        for file in db_files(&cfg.main.dbs_dir)? {
            let name = file
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            let loaded = match load_db_file(&file) {
                Ok(_) if !valid_name(&name) => Err(invalid(
                    &file,
                    "the file name must be the database name: letters, digits, '-', '_' or '.'",
                )),
                Ok(db) => cfg.resolve(&name, &db).await.map(|_| db),
                Err(e) => Err(e),
            };
            match loaded {
                Ok(db) => {
                    cfg.dbs.insert(name, db);
                }
                Err(e) => {
                    cfg.errors.insert(name, e);
                }
            }
        }
        Ok(cfg)
    }

    /// Turns one database's config into a runnable spec (opens replica clients).
    pub async fn resolve(&self, name: &str, db: &DbConfig) -> Result<DbSpec, ConfigError> {
        let file = self.main.dbs_dir.join(format!("{name}.toml"));
        resolve_db(name, db, &self.main.defaults, &file).await
    }

    pub async fn specs(&self) -> Result<Vec<DbSpec>, ConfigError> {
        let mut out = Vec::new();
        for (n, d) in &self.dbs {
            out.push(self.resolve(n, d).await?);
        }
        Ok(out)
    }

    /// Finds a database by name or by path.
    pub fn find(&self, name_or_path: &str) -> Option<(String, &DbConfig)> {
        if let Some(db) = self.dbs.get(name_or_path) {
            return Some((name_or_path.to_string(), db));
        }
        let want = absolute(Path::new(name_or_path));
        self.dbs
            .iter()
            .find(|(_, d)| absolute(&d.path) == want)
            .map(|(n, d)| (n.clone(), d))
    }
}

fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

/// Loads only the main file (daemon settings), e.g. to set up logging before anything else.
pub fn load_main(path: &Path) -> Result<MainConfig, ConfigError> {
    if !path.exists() {
        return Err(invalid(path, "config file not found"));
    }
    let mut main: MainConfig = Figment::from(Serialized::defaults(MainConfig::default()))
        .merge(Toml::file_exact(path))
        .merge(
            Env::prefixed("LITESTREAMD_")
                .filter(is_main_key)
                .split("__"),
        )
        .extract()
        .map_err(|e| parse_error(path, e))?;
    let base = path.parent().unwrap_or(Path::new("."));
    if main.dbs_dir.is_relative() {
        main.dbs_dir = base.join(&main.dbs_dir);
    }
    if main.state_dir.as_os_str().is_empty() {
        main.state_dir = std::env::var("STATE_DIRECTORY")
            .ok()
            // systemd lists several when the unit has several (StateDirectory=a b).
            .and_then(|v| v.split(':').next().map(PathBuf::from))
            .filter(|p| p.is_absolute())
            .unwrap_or_else(|| PathBuf::from("/var/lib/litestreamd"));
    } else if main.state_dir.is_relative() {
        main.state_dir = base.join(&main.state_dir);
    }
    for d in &mut main.restore_dirs {
        if d.is_relative() {
            *d = base.join(&*d);
        }
    }
    Ok(main)
}

/// `*.toml` files of the directory, sorted; editor backups and dpkg leftovers are ignored.
pub fn db_files(dir: &Path) -> Result<Vec<PathBuf>, ConfigError> {
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(ConfigError::Io {
                path: dir.to_path_buf(),
                source,
            });
        }
    };
    let mut files: Vec<PathBuf> = rd
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            let n = p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            n.ends_with(".toml") && !n.starts_with('.') && p.is_file()
        })
        .collect();
    files.sort();
    Ok(files)
}

pub fn load_db_file(path: &Path) -> Result<DbConfig, ConfigError> {
    Figment::from(Toml::file_exact(path))
        .extract()
        .map_err(|e| parse_error(path, e))
}

/// `LITESTREAMD_*` variables that override main-file keys (`LITESTREAMD_DEFAULTS__RETENTION`);
/// others (`LITESTREAMD_CONFIG`, `LITESTREAMD_LOG` for the CLI) are not config keys.
fn is_main_key(key: &figment::value::UncasedStr) -> bool {
    let first = key
        .as_str()
        .split("__")
        .next()
        .unwrap_or("")
        .to_ascii_lowercase();
    matches!(
        first.as_str(),
        "dbs_dir"
            | "control_socket"
            | "control_group"
            | "control_mode"
            | "control_restore"
            | "restore_dirs"
            | "restore_in_db_dir"
            | "state_dir"
            | "metrics_addr"
            | "metrics_idle_timeout"
            | "shutdown_timeout"
            | "defaults"
    ) || (first == "log" && key.as_str().contains("__"))
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// A figment error with the line of the offending key, when it can be found in the file.
fn parse_error(path: &Path, e: figment::Error) -> ConfigError {
    let line = e.path.last().and_then(|key| {
        let text = std::fs::read_to_string(path).ok()?;
        text.lines().position(|l| {
            let l = l.trim_start();
            l.strip_prefix(key.as_str())
                .is_some_and(|rest| rest.trim_start().starts_with('='))
        })
    });
    match line {
        Some(n) => invalid(path, format!("line {}: {e}", n + 1)),
        None => ConfigError::Parse {
            path: path.to_path_buf(),
            source: Box::new(e),
        },
    }
}

/// Expands `${VAR}` (and `$VAR`) from the environment; `$$` is a literal `$`. An unset variable
/// is an error rather than Litestream's silent empty string, so a missing secret is noticed.
pub fn expand_env(s: &str, file: &Path) -> Result<String, ConfigError> {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '$' {
            out.push(c);
            continue;
        }
        let name: String = match chars.peek() {
            Some('$') => {
                chars.next();
                out.push('$');
                continue;
            }
            Some('{') => {
                chars.next();
                let mut n = String::new();
                loop {
                    match chars.next() {
                        Some('}') => break,
                        Some(ch) => n.push(ch),
                        None => return Err(invalid(file, format!("unterminated ${{ in {s:?}"))),
                    }
                }
                n
            }
            _ => {
                let mut n = String::new();
                while let Some(&ch) = chars.peek() {
                    if ch.is_ascii_alphanumeric() || ch == '_' {
                        n.push(ch);
                        chars.next();
                    } else {
                        break;
                    }
                }
                if n.is_empty() {
                    out.push('$');
                    continue;
                }
                n
            }
        };
        match std::env::var(&name) {
            Ok(v) => out.push_str(&v),
            Err(_) => {
                return Err(invalid(
                    file,
                    format!("environment variable {name} is not set"),
                ));
            }
        }
    }
    Ok(out)
}

pub async fn resolve_db(
    name: &str,
    db: &DbConfig,
    d: &Defaults,
    file: &Path,
) -> Result<DbSpec, ConfigError> {
    let path = PathBuf::from(expand_env(&db.path.to_string_lossy(), file)?);
    if path.as_os_str().is_empty() {
        return Err(invalid(file, "path: the database path is required"));
    }
    // Relative paths are taken from the working directory, as Litestream does.
    let path = absolute(&path);
    let opts = DbOptions {
        meta_path: db.meta_path.clone(),
        monitor_interval: db.monitor_interval.unwrap_or(d.monitor_interval),
        checkpoint_interval: db.checkpoint_interval.unwrap_or(d.checkpoint_interval),
        min_checkpoint_page_count: db
            .min_checkpoint_page_count
            .unwrap_or(d.min_checkpoint_page_count),
        max_checkpoint_page_count: db
            .max_checkpoint_page_count
            .unwrap_or(d.max_checkpoint_page_count),
        truncate_page_count: db.truncate_page_count.unwrap_or(d.truncate_page_count),
        busy_timeout: db.busy_timeout.unwrap_or(d.busy_timeout),
    };
    if opts.min_checkpoint_page_count == 0 {
        return Err(invalid(
            file,
            "min_checkpoint_page_count must be greater than 0",
        ));
    }
    if opts.monitor_interval.is_zero() {
        return Err(invalid(file, "monitor_interval must be greater than 0"));
    }
    if db.replicas.is_empty() {
        return Err(invalid(file, "replicas: at least one replica is required"));
    }
    let mut replicas = Vec::new();
    for (i, r) in db.replicas.iter().enumerate() {
        let client = replica_client(r, file)
            .await
            .map_err(|e| invalid(file, format!("replicas[{i}]: {e}")))?;
        let name = r.name.clone().unwrap_or_else(|| client.kind().to_string());
        if replicas
            .iter()
            .any(|(o, _): &(ReplicaOptions, ReplicaClient)| o.name == name)
        {
            return Err(invalid(
                file,
                format!("replicas[{i}]: duplicate replica name {name:?}"),
            ));
        }
        let ro = ReplicaOptions {
            name,
            sync_interval: r.sync_interval.unwrap_or(d.sync_interval),
            snapshot_interval: r.snapshot_interval.unwrap_or(d.snapshot_interval),
            retention: r.retention.unwrap_or(d.retention),
            retention_check_interval: r
                .retention_check_interval
                .unwrap_or(d.retention_check_interval),
            retry: r.retry.clone().unwrap_or_else(|| d.retry.clone()),
            lease_ttl: r.lease_ttl.unwrap_or(d.lease_ttl),
            restorable_check_interval: r
                .restorable_check_interval
                .unwrap_or(d.restorable_check_interval),
        };
        if ro.sync_interval.is_zero() {
            return Err(invalid(
                file,
                format!("replicas[{i}]: sync_interval must be greater than 0"),
            ));
        }
        replicas.push((ro, client));
    }
    Ok(DbSpec {
        name: name.to_string(),
        path,
        opts,
        replicas,
        restore_on_start: db.restore_on_start == RestoreOnStart::IfMissing,
    })
}

/// Builds a replica client from its config entry.
pub async fn replica_client(r: &ReplicaConfig, file: &Path) -> Result<ReplicaClient, String> {
    let env = |v: &Option<String>| -> Result<Option<String>, String> {
        v.as_deref()
            .map(|s| expand_env(s, file).map_err(|e| e.to_string()))
            .transpose()
    };
    let path = env(&r.path.as_ref().map(|p| p.to_string_lossy().into_owned()))?;
    if let Some(url) = &r.url {
        if path.is_some() || r.bucket.is_some() {
            return Err("url cannot be combined with path or bucket".into());
        }
        let url = expand_env(url, file).map_err(|e| e.to_string())?;
        let store = replica::store_from_url(&url)
            .await
            .map_err(|e| e.to_string())?;
        return with_age(ReplicaClient::new(store), r, file);
    }
    if path.as_deref().is_some_and(replica::is_url) {
        return Err("path looks like a URL; use url = \"...\"".into());
    }
    let store: std::sync::Arc<dyn replica::ObjectStore> = match r.kind.as_deref().unwrap_or("file")
    {
        "file" => {
            let p = path.ok_or("path: required for a file replica")?;
            std::sync::Arc::new(replica::file::FileStore::new(absolute(Path::new(&p))))
        }
        "s3" => {
            let cfg = replica::s3::S3Config {
                bucket: env(&r.bucket)?.ok_or("bucket: required for an s3 replica")?,
                path: path.unwrap_or_default(),
                endpoint: env(&r.endpoint)?,
                region: env(&r.region)?,
                force_path_style: r.force_path_style,
                access_key_id: env(&r.access_key_id)?,
                secret_access_key: env(&r.secret_access_key)?,
                part_size: r.part_size,
                skip_verify: r.skip_verify.unwrap_or(false),
            };
            std::sync::Arc::new(replica::s3::S3Store::new(cfg).await?)
        }
        "gcs" | "gs" => {
            let cfg = replica::gcs::GcsConfig {
                bucket: env(&r.bucket)?.ok_or("bucket: required for a gcs replica")?,
                path: path.unwrap_or_default(),
                endpoint: env(&r.endpoint)?,
                chunk_size: r.part_size,
            };
            std::sync::Arc::new(replica::gcs::GcsStore::new(cfg).await?)
        }
        other => {
            return Err(format!(
                "unsupported replica type {other:?} (supported: file, s3, gcs)"
            ));
        }
    };
    with_age(ReplicaClient::new(store), r, file)
}

fn with_age(
    client: ReplicaClient,
    r: &ReplicaConfig,
    file: &Path,
) -> Result<ReplicaClient, String> {
    let keys = match &r.age {
        Some(a) => a.keys(file)?,
        None => None,
    };
    Ok(client.with_age(keys))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expands_env() {
        unsafe { std::env::set_var("LSD_TEST_SECRET", "s3cr3t") };
        let f = Path::new("x.toml");
        assert_eq!(
            expand_env("a-${LSD_TEST_SECRET}-$LSD_TEST_SECRET-$$", f).unwrap(),
            "a-s3cr3t-s3cr3t-$"
        );
        assert!(
            expand_env("${LSD_TEST_UNSET_VAR}", f)
                .unwrap_err()
                .to_string()
                .contains("LSD_TEST_UNSET_VAR")
        );
    }
}
