//! Configuration: a main file (daemon settings, defaults for every database, the directory of
//! per-database files) and one TOML file per database whose stem is the database's name.
//! Layering is figment's: built-in defaults, then the files, then `LITESTREAMD_*` variables for
//! the main file. `${VAR}` in string values is expanded so secrets stay out of files.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::crypt::{AgeKeys, KeySource};
use crate::db::DbOptions;
use crate::replica::{self, ReplicaClient, Target};
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
    /// After this long without a change a database is parked: its SQLite connections close
    /// and it holds one file descriptor until it changes; `0s` keeps it open.
    #[serde(with = "humantime_serde")]
    pub park_after: Duration,
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
    /// Scheduled restore drills (see `drill`): every this long, each replica is restored into
    /// `drill_dir` and compared with the database; `0s` (the default) turns them off. A drill
    /// downloads the whole database from every replica.
    #[serde(with = "humantime_serde")]
    pub drill_interval: Duration,
    /// Longest a drill waits for a replica to reach the drill's position.
    #[serde(with = "humantime_serde")]
    pub drill_timeout: Duration,
    /// Where drills restore (a private directory the daemon owns). Default:
    /// `<state_dir>/drills`.
    pub drill_dir: PathBuf,
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
            park_after: d.park_after,
            sync_interval: r.sync_interval,
            snapshot_interval: r.snapshot_interval,
            retention: r.retention,
            retention_check_interval: r.retention_check_interval,
            retry: r.retry,
            lease_ttl: r.lease_ttl,
            restorable_check_interval: r.restorable_check_interval,
            drill_interval: Duration::ZERO,
            drill_timeout: Duration::from_secs(600),
            drill_dir: PathBuf::new(),
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
    /// Control connections served at once; more are refused with an error line.
    pub control_max_connections: usize,
    /// A control connection idle this long (no request, subscription or restore) is closed.
    #[serde(with = "humantime_serde")]
    pub control_idle_timeout: Duration,
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
            control_max_connections: 64,
            control_idle_timeout: Duration::from_secs(300),
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

/// Whether this host writes the database's replicas or follows one of them.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// Replicate the database to its replicas (the usual case).
    #[default]
    Primary,
    /// Keep the database as a read-only copy of a replica written by another host, seconds
    /// behind it, until `litestreamd promote` makes it the primary (see `worker::standby`).
    Standby,
}

/// The default poll interval of a standby: one sync interval of the primary's default.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(1);

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
    /// Never delete or replace an object at this path, so credentials without delete
    /// permission (or a bucket with S3 Object Lock) suffice: retention is left to the bucket's
    /// lifecycle rules, the lease is a chain of records, and a keep-alive snapshot is written
    /// every `snapshot_keepalive` (see `docs/operations.md`, "Append-only replicas").
    pub append_only: Option<bool>,
    /// Append-only: the newest snapshot's greatest age (default 7 days). Keep it below the
    /// lifecycle's expiry minus the longest outage you tolerate.
    #[serde(default, with = "humantime_serde::option")]
    pub snapshot_keepalive: Option<Duration>,
    /// `s3`: an Object Lock retention set on every upload (`{ mode = "governance" |
    /// "compliance", days = N }`); needs `append_only = true`.
    pub object_lock: Option<replica::s3::ObjectLock>,
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
    #[serde(default, with = "humantime_serde::option")]
    pub park_after: Option<Duration>,
    #[serde(default)]
    pub restore_on_start: RestoreOnStart,
    /// How long the daemon's start waits for restore_on_start before it fails (the replicas
    /// cannot be read); `0s` or unset: wait as long as it takes.
    #[serde(default, with = "humantime_serde::option")]
    pub restore_on_start_timeout: Option<Duration>,
    /// Restore drills of this database (overrides the default); `0s` turns them off.
    #[serde(default, with = "humantime_serde::option")]
    pub drill_interval: Option<Duration>,
    /// `standby`: this host follows a replica instead of writing it.
    #[serde(default)]
    pub role: Role,
    /// A standby's followed replica, by name (default: the first).
    pub follow: Option<String>,
    /// How often a standby looks for new segments (default 1s).
    #[serde(default, with = "humantime_serde::option")]
    pub poll_interval: Option<Duration>,
    #[serde(default)]
    pub replicas: Vec<ReplicaConfig>,
}

/// A loaded configuration: the main file and every database, by name.
#[derive(Debug)]
pub struct Config {
    pub path: PathBuf,
    pub main: MainConfig,
    pub dbs: BTreeMap<String, DbConfig>,
    /// Database files that failed to load or validate, by database name: every error of each.
    pub errors: BTreeMap<String, Vec<ConfigError>>,
    /// What is worth knowing but stops nothing (a missing or empty `dbs_dir`).
    pub warnings: Vec<String>,
}

impl Config {
    /// Loads the main file and the per-database directory, and validates everything that can
    /// be checked without connecting anywhere (no client is built). A bad database file is
    /// recorded in `errors` with every problem found in it, and skipped; a bad main file is an
    /// error. Two files for one database, or two databases on one replica path, keep the first
    /// file (by name) and reject the later ones, naming both.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let main = load_main(path)?;
        let mut cfg = Config {
            path: path.to_path_buf(),
            main,
            dbs: BTreeMap::new(),
            errors: BTreeMap::new(),
            warnings: Vec::new(),
        };
        let files = db_files(&cfg.main.dbs_dir)?;
        if !cfg.main.dbs_dir.exists() {
            cfg.warnings.push(format!(
                "dbs_dir {} does not exist: no database is replicated",
                cfg.main.dbs_dir.display()
            ));
        } else if files.is_empty() {
            cfg.warnings.push(format!(
                "dbs_dir {} has no *.toml file: no database is replicated",
                cfg.main.dbs_dir.display()
            ));
        }
        // (database path, name) and (replica target, name, replica) of the files accepted so
        // far, to find a database configured twice or a replica path shared.
        // Indexed, not scanned: a scan per file made loading 10,000 files take 33 s.
        let mut db_paths: HashMap<PathBuf, String> = HashMap::new();
        let mut targets = TargetIndex::default();
        for f in files {
            let name = f
                .path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            let mut errors: Vec<ConfigError> = Vec::new();
            if let Some(problem) = f.problem {
                errors.push(invalid(&f.path, problem));
            } else if !valid_name(&name) {
                errors.push(invalid(
                    &f.path,
                    "the file name must be the database name: letters, digits, '-', '_' or '.'",
                ));
            }
            let (db, partial) = if errors.is_empty() {
                match load_db_file(&f.path) {
                    Ok(db) => (Some(db), None),
                    Err(LoadError { errors: e, rest }) => {
                        errors.extend(e);
                        (None, rest)
                    }
                }
            } else {
                (None, None)
            };
            // What remains of a file with bad keys is checked too: every error at once.
            if let Some(rest) = &partial {
                let checked = check_db(rest, &cfg.main.defaults, &f.path);
                errors.extend(
                    checked
                        .errors
                        .into_iter()
                        .filter(|m| !m.starts_with("path:"))
                        .map(|m| invalid(&f.path, m)),
                );
            }
            if let Some(db) = &db {
                let checked = check_db(db, &cfg.main.defaults, &f.path);
                errors.extend(checked.errors.into_iter().map(|m| invalid(&f.path, m)));
                if errors.is_empty() {
                    if let Some(other) = db_paths.get(&checked.path) {
                        errors.push(invalid(
                            &f.path,
                            format!(
                                "path {}: the same database is configured in {}.toml too; one database has one file (this one is not started)",
                                checked.path.display(),
                                other
                            ),
                        ));
                    }
                    for (i, (t, rname)) in checked.targets.iter().enumerate() {
                        if let Some((other, oname)) = targets.overlapping(t) {
                            errors.push(invalid(
                                &f.path,
                                format!(
                                    "replicas[{i}] ({rname}): its path is also (or overlaps) the path of replica {oname} of database {other} ({other}.toml); one replica path holds one database's backups (this database is not started)"
                                ),
                            ));
                        }
                    }
                }
                if errors.is_empty() {
                    db_paths.insert(checked.path, name.clone());
                    for (t, r) in checked.targets {
                        targets.insert(&t, &name, &r);
                    }
                }
            }
            match (db, errors.is_empty()) {
                (Some(db), true) => {
                    cfg.dbs.insert(name, db);
                }
                _ => {
                    cfg.errors.insert(name, errors);
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
    if main.defaults.drill_dir.as_os_str().is_empty() {
        main.defaults.drill_dir = main.state_dir.join("drills");
    } else if main.defaults.drill_dir.is_relative() {
        main.defaults.drill_dir = base.join(&main.defaults.drill_dir);
    }
    for d in &mut main.restore_dirs {
        if d.is_relative() {
            *d = base.join(&*d);
        }
    }
    Ok(main)
}

/// One `*.toml` entry of `dbs_dir`, and why it cannot be read as a database file, if so.
#[derive(Debug)]
pub struct DbFile {
    pub path: PathBuf,
    pub problem: Option<String>,
}

/// `*.toml` entries of the directory, sorted; dotfiles, editor backups and dpkg leftovers
/// (`*~`, `*.dpkg-dist`) are ignored. A symlink is followed; a dangling or looping one, a
/// directory or a special file is reported, never skipped in silence.
pub fn db_files(dir: &Path) -> Result<Vec<DbFile>, ConfigError> {
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
    let mut files: Vec<DbFile> = rd
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            let n = p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            n.ends_with(".toml") && !n.starts_with('.')
        })
        .map(|path| {
            let link = std::fs::read_link(&path).ok();
            let via = |what: &str| match &link {
                Some(t) => format!("symbolic link to {}: {what}", t.display()),
                None => what.to_string(),
            };
            let problem = match std::fs::metadata(&path) {
                Ok(m) if m.is_file() => None,
                Ok(m) if m.is_dir() => Some(via("a directory, not a database file")),
                Ok(_) => Some(via("not a regular file")),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    Some(via("the target does not exist"))
                }
                Err(e) if e.raw_os_error() == Some(nix::libc::ELOOP) => {
                    Some(via("a loop of symbolic links"))
                }
                Err(e) => Some(via(&e.to_string())),
            };
            DbFile { path, problem }
        })
        .collect();
    files.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(files)
}

/// The replica targets accepted so far, to find one that overlaps a new one (see
/// [`Target::overlaps`]) by looking up its path's prefixes rather than comparing with each.
#[derive(Default)]
struct TargetIndex {
    /// Each accepted target's location → (database, replica).
    exact: HashMap<(String, Vec<String>), (String, String)>,
    /// Every proper prefix of an accepted target's path → the first such (database, replica).
    inner: HashMap<(String, Vec<String>), (String, String)>,
}

impl TargetIndex {
    fn insert(&mut self, t: &Target, db: &str, replica: &str) {
        let (store, path) = t.location();
        let owner = (db.to_string(), replica.to_string());
        for n in 0..path.len() {
            self.inner
                .entry((store.clone(), path[..n].to_vec()))
                .or_insert_with(|| owner.clone());
        }
        self.exact.entry((store, path)).or_insert(owner);
    }

    /// An accepted target that is `t`, holds it, or lies inside it.
    fn overlapping(&self, t: &Target) -> Option<&(String, String)> {
        let (store, path) = t.location();
        let key = (store, path);
        if let Some(o) = self.inner.get(&key) {
            return Some(o);
        }
        let (store, path) = key;
        (0..=path.len()).find_map(|n| self.exact.get(&(store.clone(), path[..n].to_vec())))
    }
}

/// Why a database file could not be read, and what of it could (without the bad keys), so
/// that its other problems can be reported too.
#[derive(Debug)]
pub struct LoadError {
    pub errors: Vec<ConfigError>,
    pub rest: Option<Box<DbConfig>>,
}

/// Reads a database file: a syntax error (with its line and column), or every key that does
/// not fit (each with its line), not only the first.
pub fn load_db_file(path: &Path) -> Result<DbConfig, LoadError> {
    let fail = |errors| LoadError { errors, rest: None };
    let text = std::fs::read_to_string(path).map_err(|source| {
        fail(vec![ConfigError::Io {
            path: path.to_path_buf(),
            source,
        }])
    })?;
    let table: toml::Table = toml::from_str(&text).map_err(|e| {
        fail(vec![invalid(
            path,
            e.message().to_string()
                + &e.span()
                    .map(|s| format!(" (line {})", line_of(&text, s.start)))
                    .unwrap_or_default(),
        )])
    })?;
    match toml::Value::Table(table.clone()).try_into::<DbConfig>() {
        Ok(db) => Ok(db),
        Err(_) => {
            let (errors, bad) = key_errors(&table, &text, path);
            let mut rest = table;
            for (key, replica) in bad {
                match replica {
                    None => {
                        rest.remove(&key);
                    }
                    Some(i) => {
                        if let Some(t) = rest
                            .get_mut("replicas")
                            .and_then(|r| r.as_array_mut())
                            .and_then(|a| a.get_mut(i))
                            .and_then(|r| r.as_table_mut())
                        {
                            t.remove(&key);
                        }
                    }
                }
            }
            if !rest.contains_key("path") {
                rest.insert("path".into(), toml::Value::String(String::new()));
            }
            Err(LoadError {
                errors,
                rest: toml::Value::Table(rest)
                    .try_into::<DbConfig>()
                    .ok()
                    .map(Box::new),
            })
        }
    }
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

/// Every key of a database file that does not deserialize, each checked on its own (serde
/// stops at the first), named as the user wrote it (`replicas[1].sync_interval`); and the bad
/// keys (with their replica index).
fn key_errors(
    table: &toml::Table,
    text: &str,
    path: &Path,
) -> (Vec<ConfigError>, Vec<(String, Option<usize>)>) {
    let mut bad = Vec::new();
    // A file holding just `key` (and the required `path`) shows that key's own error.
    let probe = |t: toml::Table| toml::Value::Table(t).try_into::<DbConfig>().err();
    let base = || {
        let mut t = toml::Table::new();
        t.insert("path".into(), toml::Value::String("/x".into()));
        t
    };
    let mut out = Vec::new();
    if !table.contains_key("path") {
        out.push(invalid(path, "path: the database path is required"));
    }
    let mut report = |key: String, line: Option<usize>, e: toml::de::Error| {
        let msg = e.message().to_string();
        out.push(invalid(
            path,
            match line {
                Some(l) => format!("line {l}: {key}: {msg}"),
                None => format!("{key}: {msg}"),
            },
        ));
    };
    for (k, v) in table {
        if k == "replicas" {
            let Some(list) = v.as_array() else {
                let mut t = base();
                t.insert(k.clone(), v.clone());
                if let Some(e) = probe(t) {
                    report(k.clone(), key_line(text, None, k), e);
                    bad.push((k.clone(), None));
                }
                continue;
            };
            for (i, r) in list.iter().enumerate() {
                let Some(rt) = r.as_table() else {
                    continue;
                };
                for (rk, rv) in rt {
                    let mut one = toml::Table::new();
                    one.insert(rk.clone(), rv.clone());
                    let mut t = base();
                    t.insert("replicas".into(), toml::Value::Array(vec![one.into()]));
                    if let Some(e) = probe(t) {
                        report(
                            format!("replicas[{i}].{rk}"),
                            key_line(text, Some(i), rk),
                            e,
                        );
                        bad.push((rk.clone(), Some(i)));
                    }
                }
            }
            continue;
        }
        let mut t = base();
        t.insert(k.clone(), v.clone());
        if let Some(e) = probe(t) {
            report(k.clone(), key_line(text, None, k), e);
            bad.push((k.clone(), None));
        }
    }
    if out.is_empty() {
        out.push(invalid(path, "invalid database file"));
    }
    (out, bad)
}

/// The line of `key = ...` at the top level (`replica` None) or in the `replica`-th
/// `[[replicas]]` table (its sub-tables included).
fn key_line(text: &str, replica: Option<usize>, key: &str) -> Option<usize> {
    let mut section: Option<usize> = None; // None: top level
    let mut seen = 0;
    for (n, l) in text.lines().enumerate() {
        let t = l.trim();
        if t.starts_with("[[replicas]]") {
            section = Some(seen);
            seen += 1;
            continue;
        }
        if t.starts_with('[') && !t.starts_with("[replicas.") {
            section = Some(usize::MAX);
            continue;
        }
        if section == replica
            && t.strip_prefix(key)
                .is_some_and(|rest| rest.trim_start().starts_with('='))
        {
            return Some(n + 1);
        }
    }
    None
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
            | "control_max_connections"
            | "control_idle_timeout"
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

/// A figment error of the main file, with the key as written (no `default.` profile prefix)
/// and its line, when it can be found.
fn parse_error(path: &Path, e: figment::Error) -> ConfigError {
    let key = e.path.join(".");
    let line = e.path.last().and_then(|key| {
        let text = std::fs::read_to_string(path).ok()?;
        text.lines().position(|l| {
            let l = l.trim_start();
            l.strip_prefix(key.as_str())
                .is_some_and(|rest| rest.trim_start().starts_with('='))
        })
    });
    let what = if key.is_empty() {
        e.kind.to_string()
    } else {
        format!("{key}: {}", e.kind)
    };
    invalid(
        path,
        match line {
            Some(n) => format!("line {}: {what}", n + 1),
            None => what,
        },
    )
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

/// What `check_db` found: the database's absolute path, its replica targets (with their
/// names), and every problem.
#[derive(Debug, Default)]
pub struct CheckedDb {
    pub path: PathBuf,
    pub targets: Vec<(Target, String)>,
    pub errors: Vec<String>,
}

/// The database's options with the defaults applied.
fn db_options(db: &DbConfig, d: &Defaults) -> DbOptions {
    DbOptions {
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
        park_after: db.park_after.unwrap_or(d.park_after),
    }
}

/// One replica's options with the defaults applied.
fn replica_options(r: &ReplicaConfig, name: String, d: &Defaults) -> ReplicaOptions {
    ReplicaOptions {
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
        append_only: r.append_only.unwrap_or(false),
        snapshot_keepalive: r
            .snapshot_keepalive
            .unwrap_or(crate::replicator::DEFAULT_SNAPSHOT_KEEPALIVE),
    }
}

/// `append_only`, `snapshot_keepalive` and `object_lock`, which only make sense together.
fn check_append_only(r: &ReplicaConfig, kind: &str, i: usize, errors: &mut Vec<String>) {
    let append_only = r.append_only.unwrap_or(false);
    if append_only {
        if r.retention.is_some() {
            errors.push(format!("replicas[{i}].retention: an append-only replica deletes nothing; the bucket's lifecycle rules do retention (remove retention; see docs/operations.md)"));
        }
        if r.snapshot_keepalive.is_some_and(|k| k.is_zero()) {
            errors.push(format!("replicas[{i}].snapshot_keepalive must be greater than 0: without keep-alive snapshots the lifecycle expires an idle database's only snapshot"));
        }
    } else if r.snapshot_keepalive.is_some() {
        errors.push(format!(
            "replicas[{i}].snapshot_keepalive: only for append_only = true"
        ));
    }
    if let Some(lock) = &r.object_lock {
        if kind != "s3" {
            errors.push(format!("replicas[{i}].object_lock: S3 Object Lock is for s3 replicas (on GCS, set a retention policy on the bucket)"));
        } else if !append_only {
            errors.push(format!("replicas[{i}].object_lock: needs append_only = true (locked objects cannot be deleted by retention)"));
        }
        if lock.days == 0 {
            errors.push(format!("replicas[{i}].object_lock.days must be at least 1"));
        }
    }
}

/// Validates one database file without connecting anywhere: every problem, not only the
/// first. `file` names the file in messages and for `${VAR}`.
pub fn check_db(db: &DbConfig, d: &Defaults, file: &Path) -> CheckedDb {
    let mut c = CheckedDb::default();
    match expand_env(&db.path.to_string_lossy(), file) {
        Ok(p) if p.is_empty() => c.errors.push("path: the database path is required".into()),
        // Relative paths are taken from the working directory, as Litestream does.
        Ok(p) => c.path = absolute(Path::new(&p)),
        Err(e) => c.errors.push(format!("path: {}", strip_file(&e, file))),
    }
    let opts = db_options(db, d);
    if opts.min_checkpoint_page_count == 0 {
        c.errors
            .push("min_checkpoint_page_count must be greater than 0".into());
    }
    if opts.monitor_interval.is_zero() {
        c.errors
            .push("monitor_interval must be greater than 0".into());
    }
    if db.replicas.is_empty() {
        c.errors
            .push("replicas: at least one replica is required".into());
    }
    check_role(db, &mut c.errors);
    let mut names: Vec<String> = Vec::new();
    for (i, r) in db.replicas.iter().enumerate() {
        let target = replica_target(r, file);
        let kind = match &target {
            Ok(Target::File(_)) => "file",
            Ok(Target::S3(_)) => "s3",
            Ok(Target::Gcs(_)) => "gcs",
            Err(_) => r.kind.as_deref().unwrap_or("file"),
        };
        let name = r.name.clone().unwrap_or_else(|| kind.to_string());
        if names.contains(&name) {
            c.errors
                .push(format!("replicas[{i}]: duplicate replica name {name:?}"));
        }
        names.push(name.clone());
        check_append_only(r, kind, i, &mut c.errors);
        let ro = replica_options(r, name.clone(), d);
        if ro.sync_interval.is_zero() {
            c.errors.push(format!(
                "replicas[{i}].sync_interval must be greater than 0"
            ));
        }
        if let Some(a) = &r.age
            && let Err(e) = a.keys(file)
        {
            c.errors.push(format!("replicas[{i}].age: {e}"));
        }
        match target {
            Ok(t) => {
                if let Some((_, other)) = c.targets.iter().find(|(o, _)| o.overlaps(&t)) {
                    c.errors.push(format!(
                        "replicas[{i}] ({name}): the same replica path as replica {other}"
                    ));
                }
                c.targets.push((t, name));
            }
            Err(e) => c.errors.push(format!("replicas[{i}]: {e}")),
        }
    }
    if let Some(f) = &db.follow
        && !names.contains(f)
    {
        c.errors.push(format!(
            "follow: no replica named {f:?} in this file (replicas: {})",
            names.join(", ")
        ));
    }
    c
}

/// `role` and the keys that go with it.
fn check_role(db: &DbConfig, errors: &mut Vec<String>) {
    if db.role == Role::Primary {
        if db.follow.is_some() {
            errors.push("follow: only a standby follows a replica (role = \"standby\")".into());
        }
        if db.poll_interval.is_some() {
            errors.push("poll_interval: only a standby polls (role = \"standby\")".into());
        }
        return;
    }
    if db.restore_on_start == RestoreOnStart::IfMissing {
        errors.push("restore_on_start: a standby builds its database from the replica itself; remove restore_on_start".into());
    }
    if db.drill_interval.is_some_and(|d| !d.is_zero()) {
        errors.push("drill_interval: restore drills run on the primary, which knows the source's content; remove it from the standby".into());
    }
    if db.poll_interval.is_some_and(|d| d.is_zero()) {
        errors.push("poll_interval must be greater than 0".into());
    }
}

/// A `${VAR}` error's text without the file name (the caller names the file).
fn strip_file(e: &ConfigError, file: &Path) -> String {
    let s = e.to_string();
    s.strip_prefix(&format!("{}: ", file.display()))
        .map(str::to_string)
        .unwrap_or(s)
}

/// Turns one database's config into a runnable spec: checks it (see [`check_db`]) and builds
/// its replica clients.
pub async fn resolve_db(
    name: &str,
    db: &DbConfig,
    d: &Defaults,
    file: &Path,
) -> Result<DbSpec, ConfigError> {
    let checked = check_db(db, d, file);
    if let Some(first) = checked.errors.first() {
        return Err(invalid(file, first.clone()));
    }
    let mut replicas = Vec::new();
    let mut drill_replicas = Vec::new();
    for (i, (r, (target, rname))) in db.replicas.iter().zip(checked.targets).enumerate() {
        let store = target
            .clone()
            .open()
            .await
            .map_err(|e| invalid(file, format!("replicas[{i}]: {e}")))?;
        let mut client = with_age(ReplicaClient::new(store), r, file)
            .map_err(|e| invalid(file, format!("replicas[{i}]: {e}")))?;
        if r.append_only == Some(true) {
            client = client.append_only();
        }
        let age = match &r.age {
            Some(a) => a
                .keys(file)
                .map_err(|e| invalid(file, format!("replicas[{i}]: {e}")))?,
            None => None,
        };
        drill_replicas.push(crate::drill::DrillReplica {
            name: rname.clone(),
            target,
            age,
            meter: client.meter().clone(),
        });
        replicas.push((replica_options(r, rname, d), client));
    }
    // A standby has no source to prove a drill against; after a promotion drills run on
    // request only (its file still says standby).
    let interval = match db.role {
        Role::Primary => db.drill_interval.unwrap_or(d.drill_interval),
        Role::Standby => Duration::ZERO,
    };
    let standby = (db.role == Role::Standby).then(|| crate::worker::StandbySpec {
        replica: db
            .follow
            .as_ref()
            .and_then(|f| replicas.iter().position(|(o, _)| o.name == *f))
            .unwrap_or(0),
        poll_interval: db.poll_interval.unwrap_or(DEFAULT_POLL_INTERVAL),
    });
    Ok(DbSpec {
        standby,
        name: name.to_string(),
        path: checked.path,
        opts: db_options(db, d),
        replicas,
        restore_on_start: db.restore_on_start == RestoreOnStart::IfMissing,
        drill: Some(crate::drill::DrillSpec {
            interval: (!interval.is_zero()).then_some(interval),
            dir: d.drill_dir.clone(),
            timeout: d.drill_timeout,
            replicas: drill_replicas,
        }),
    })
}

/// The target a replica entry describes, checked (required fields, URL, endpoint scheme)
/// without connecting.
pub fn replica_target(r: &ReplicaConfig, file: &Path) -> Result<Target, String> {
    let env = |v: &Option<String>| -> Result<Option<String>, String> {
        v.as_deref()
            .map(|s| expand_env(s, file).map_err(|e| strip_file(&e, file)))
            .transpose()
    };
    let path = env(&r.path.as_ref().map(|p| p.to_string_lossy().into_owned()))?;
    if let Some(url) = &r.url {
        if path.is_some() || r.bucket.is_some() {
            return Err("url cannot be combined with path or bucket".into());
        }
        let url = expand_env(url, file).map_err(|e| strip_file(&e, file))?;
        let mut t = Target::from_url(&url).map_err(|e| e.to_string())?;
        // Keys beside a URL apply to it (as in Litestream 0.3); they were once ignored
        // silently, which left the SDK's credential chain to fail far from the cause.
        if let Target::S3(c) = &mut t {
            if let Some(k) = env(&r.access_key_id)? {
                c.access_key_id = Some(k);
            }
            if let Some(k) = env(&r.secret_access_key)? {
                c.secret_access_key = Some(k);
            }
            if r.part_size.is_some() {
                c.part_size = r.part_size;
            }
            if let Some(v) = r.skip_verify {
                c.skip_verify = v;
            }
            c.object_lock = r.object_lock.clone();
        }
        return Ok(t);
    }
    if path.as_deref().is_some_and(replica::is_url) {
        return Err("path looks like a URL; use url = \"...\"".into());
    }
    let t = match r.kind.as_deref().unwrap_or("file") {
        "file" => {
            let p = path.ok_or("path: required for a file replica")?;
            Target::File(absolute(Path::new(&p)))
        }
        "s3" => Target::S3(replica::s3::S3Config {
            bucket: env(&r.bucket)?.ok_or("bucket: required for an s3 replica")?,
            path: path.unwrap_or_default(),
            endpoint: env(&r.endpoint)?,
            region: env(&r.region)?,
            force_path_style: r.force_path_style,
            access_key_id: env(&r.access_key_id)?,
            secret_access_key: env(&r.secret_access_key)?,
            part_size: r.part_size,
            skip_verify: r.skip_verify.unwrap_or(false),
            object_lock: r.object_lock.clone(),
        }),
        "gcs" | "gs" => Target::Gcs(replica::gcs::GcsConfig {
            bucket: env(&r.bucket)?.ok_or("bucket: required for a gcs replica")?,
            path: path.unwrap_or_default(),
            endpoint: env(&r.endpoint)?,
            chunk_size: r.part_size,
        }),
        other => {
            return Err(format!(
                "unsupported replica type {other:?} (supported: file, s3, gcs)"
            ));
        }
    };
    t.check()?;
    Ok(t)
}

/// Builds a replica client from its config entry.
pub async fn replica_client(r: &ReplicaConfig, file: &Path) -> Result<ReplicaClient, String> {
    let store = replica_target(r, file)?.open().await?;
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
    fn the_target_index_finds_what_overlaps_as_a_scan_would() {
        let f = |p: &str| Target::File(PathBuf::from(p));
        let mut ix = TargetIndex::default();
        ix.insert(&f("/r/a/b"), "one", "local");
        ix.insert(&f("/r/c"), "two", "local");
        let all = [f("/r/a/b"), f("/r/c")];
        for (t, want) in [
            (f("/r/a/b"), Some("one")),
            (f("/r/a/b/c"), Some("one")),
            (f("/r/a"), Some("one")),
            (f("/r"), Some("one")),
            (f("/r/c/d"), Some("two")),
            (f("/r/ab"), None),
            (f("/r/a/bc"), None),
            (f("/s/a/b"), None),
        ] {
            let got = ix.overlapping(&t).map(|(db, _)| db.as_str());
            assert_eq!(got, want, "{t:?}");
            assert_eq!(got.is_some(), all.iter().any(|o| o.overlaps(&t)), "{t:?}");
        }
    }

    /// `role = "standby"` and its keys: what a standby cannot have, what only a standby has,
    /// and the shipped example.
    #[test]
    fn standby_files_are_checked() {
        let d = Defaults::default();
        let f = Path::new("/etc/litestreamd/dbs.d/app.toml");
        let parse = |text: &str| -> DbConfig { toml::from_str(text).unwrap() };
        let replica = "[[replicas]]\nname = \"s3\"\nurl = \"s3://b/app\"\n";
        let ok = parse(&format!(
            "path = \"/a.db\"\nrole = \"standby\"\nfollow = \"s3\"\npoll_interval = \"500ms\"\n{replica}"
        ));
        assert!(check_db(&ok, &d, f).errors.is_empty());
        let bad = parse(&format!(
            "path = \"/a.db\"\nrole = \"standby\"\nfollow = \"gcs\"\npoll_interval = \"0s\"\nrestore_on_start = \"if-missing\"\ndrill_interval = \"24h\"\n{replica}"
        ));
        let errors = check_db(&bad, &d, f).errors.join("\n");
        for want in [
            "follow: no replica named \"gcs\" in this file (replicas: s3)",
            "poll_interval must be greater than 0",
            "restore_on_start: a standby builds its database",
            "drill_interval: restore drills run on the primary",
        ] {
            assert!(errors.contains(want), "{want}\n{errors}");
        }
        let primary = parse(&format!(
            "path = \"/a.db\"\nfollow = \"s3\"\npoll_interval = \"1s\"\n{replica}"
        ));
        let errors = check_db(&primary, &d, f).errors.join("\n");
        assert!(errors.contains("follow: only a standby"), "{errors}");
        assert!(errors.contains("poll_interval: only a standby"), "{errors}");
        assert!(
            toml::from_str::<DbConfig>("path = \"/a.db\"\nrole = \"follower\"\n").is_err(),
            "an unknown role is an error"
        );
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/examples/standby-s3.toml");
        let db = load_db_file(&p).unwrap_or_else(|e| panic!("{}: {:?}", p.display(), e.errors));
        assert_eq!(db.role, Role::Standby);
        let c = check_db(&db, &d, &p);
        assert!(c.errors.is_empty(), "{}: {:?}", p.display(), c.errors);
    }

    /// `append_only`, `snapshot_keepalive`, `object_lock`: what goes together, and the example.
    #[test]
    fn append_only_files_are_checked() {
        let d = Defaults::default();
        let f = Path::new("/etc/litestreamd/dbs.d/app.toml");
        let parse = |text: &str| -> DbConfig { toml::from_str(text).unwrap() };
        let ok = parse(
            "path = \"/a.db\"\n[[replicas]]\nurl = \"s3://b/app\"\nappend_only = true\nsnapshot_keepalive = \"3d\"\nobject_lock = { mode = \"governance\", days = 7 }\n",
        );
        assert!(check_db(&ok, &d, f).errors.is_empty());
        let ro = replica_options(&ok.replicas[0], "s3".into(), &d);
        assert!(ro.append_only);
        assert_eq!(ro.snapshot_keepalive, Duration::from_secs(3 * 24 * 3600));
        let bad = parse(
            "path = \"/a.db\"\n[[replicas]]\nname = \"a\"\nurl = \"s3://b/app\"\nretention = \"24h\"\nappend_only = true\nsnapshot_keepalive = \"0s\"\nobject_lock = { mode = \"compliance\", days = 0 }\n[[replicas]]\nname = \"b\"\nurl = \"gs://b/app\"\nsnapshot_keepalive = \"1d\"\nobject_lock = { mode = \"governance\", days = 1 }\n[[replicas]]\nname = \"c\"\nurl = \"s3://c/app\"\nobject_lock = { mode = \"governance\", days = 1 }\n",
        );
        let errors = check_db(&bad, &d, f).errors.join("\n");
        for want in [
            "replicas[0].retention: an append-only replica deletes nothing",
            "replicas[0].snapshot_keepalive must be greater than 0",
            "replicas[0].object_lock.days must be at least 1",
            "replicas[1].snapshot_keepalive: only for append_only = true",
            "replicas[1].object_lock: S3 Object Lock is for s3 replicas",
            "replicas[2].object_lock: needs append_only = true",
        ] {
            assert!(errors.contains(want), "{want}\n{errors}");
        }
        assert!(
            toml::from_str::<DbConfig>(
                "path = \"/a.db\"\n[[replicas]]\nurl = \"s3://b/a\"\nobject_lock = { mode = \"legal\", days = 1 }\n"
            )
            .is_err(),
            "an unknown lock mode is an error"
        );
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/examples/append-only-s3.toml");
        let db = load_db_file(&p).unwrap_or_else(|e| panic!("{}: {:?}", p.display(), e.errors));
        let c = check_db(&db, &d, &p);
        assert!(c.errors.is_empty(), "{}: {:?}", p.display(), c.errors);
        match &c.targets[0].0 {
            Target::S3(s3) => assert_eq!(
                s3.object_lock,
                Some(replica::s3::ObjectLock {
                    mode: replica::s3::LockMode::Compliance,
                    days: 30
                })
            ),
            other => panic!("{other:?}"),
        }
    }

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
