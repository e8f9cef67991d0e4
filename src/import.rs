//! Imports a Litestream 0.3 configuration (`litestream.yml`) as litestreamd per-database files.
//!
//! [`convert`] reads the YAML the way Litestream 0.3.13 does (environment expansion of the raw
//! text, `~` in local paths, Go durations, the special S3 hosts of replica URLs, global keys
//! copied into replicas) and returns one TOML document per database in the format of
//! [`crate::config::DbConfig`]. Anything litestreamd cannot do yet (Azure and SFTP replicas) is an
//! error rather than a silently different configuration, and so
//! is any key Litestream 0.3 does not know. [`write_all`] writes the documents into a
//! directory. Nothing here prints; the command line reports the results.

use std::collections::HashSet;
use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Format, YamlExtended};
use figment::value::Value;
use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// One converted database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Imported {
    /// The database's name: the stem of its file name, in `[a-z0-9_-]`, unique in the import.
    pub name: String,
    /// The file to write, relative to the output directory: `NAME.toml`.
    pub file: PathBuf,
    /// The per-database TOML document.
    pub toml: String,
}

#[derive(Debug, Error)]
pub enum ImportError {
    /// The input is not YAML, or not a mapping at the top.
    #[error("{}: {message}", .input.display())]
    Yaml { input: PathBuf, message: String },
    /// A key Litestream 0.3 does not have (`key` is its full path, e.g. `dbs[0].replicas[1].tpye`).
    #[error("{}: {}unknown key `{key}`", .input.display(), at(.db.as_deref(), None))]
    UnknownKey {
        input: PathBuf,
        db: Option<String>,
        key: String,
    },
    /// A key with a value that cannot be imported.
    #[error("{}: {}{key}: {message}", .input.display(), at(.db.as_deref(), .replica.as_deref()))]
    Invalid {
        input: PathBuf,
        db: Option<String>,
        replica: Option<String>,
        key: String,
        message: String,
    },
    /// A Litestream feature litestreamd does not have yet.
    #[error("{}: {}{feature} is not supported by litestreamd yet", .input.display(), at(Some(.db.as_str()), Some(.replica.as_str())))]
    Unsupported {
        input: PathBuf,
        db: String,
        replica: String,
        feature: String,
    },
    #[error("{}: no databases to import (`dbs` is missing or empty)", .input.display())]
    NoDatabases { input: PathBuf },
    /// [`write_all`] without `overwrite` found the file already there; nothing was written.
    #[error("{}: already exists (not overwritten)", .path.display())]
    Exists { path: PathBuf },
    /// [`write_all`] was given an item it cannot write (bad or duplicate name).
    #[error("cannot write database {name:?}: {message}")]
    BadItem { name: String, message: String },
    #[error("{}: {source}", .path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// "database /x.db, replica "s3": " for error messages.
fn at(db: Option<&str>, replica: Option<&str>) -> String {
    match (db, replica) {
        (Some(d), Some(r)) => format!("database {d}, replica {r}: "),
        (Some(d), None) => format!("database {d}: "),
        (None, Some(r)) => format!("replica {r}: "),
        (None, None) => String::new(),
    }
}

/// Parses Litestream YAML (after expanding $VAR/${VAR} like Litestream unless `expand_env` is
/// false) and returns one TOML document per database, named after the database file stem (made
/// unique with -2, -3 … on collisions and sanitised to [a-z0-9_-]).
///
/// `source` only names the input in messages and in the documents' first line.
///
/// With `expand_env`, the values are the expanded ones (secrets included), and a `$` left in a
/// value that litestreamd expands itself is written as `$$`, so it keeps meaning what it meant to
/// Litestream. Without it, values are copied as written: litestreamd then expands `$VAR` and
/// `${VAR}` in `path`, `url`, `bucket`, `endpoint`, `region` and the keys when it loads the
/// file (an unset variable is an error there), which keeps secrets out of the files.
pub fn convert(yaml: &str, source: &Path, expand_env: bool) -> Result<Vec<Imported>, ImportError> {
    let text = if expand_env {
        expand_go_env(yaml)
    } else {
        yaml.to_string()
    };
    let cx = Cx {
        input: source.to_path_buf(),
        expand_env,
    };
    let top: LsConfig = Figment::from(YamlExtended::string(&text))
        .extract()
        .map_err(|e| cx.figment_error(e, None, ""))?;
    let dbs = top.dbs.as_deref().unwrap_or_default();
    if dbs.is_empty() {
        return Err(ImportError::NoDatabases { input: cx.input });
    }

    let notes = global_notes(&top);
    let mut converted = Vec::with_capacity(dbs.len());
    for (i, value) in dbs.iter().enumerate() {
        converted.push(cx.convert_db(i, value, &top)?);
    }

    let bases: Vec<String> = converted.iter().map(|d| sanitise(&d.stem)).collect();
    let names = unique_names(&bases);
    Ok(converted
        .into_iter()
        .zip(names)
        .map(|(db, name)| Imported {
            file: PathBuf::from(format!("{name}.toml")),
            toml: db.render(source, &notes, expand_env),
            name,
        })
        .collect())
}

/// Writes each Imported into out_dir as NAME.toml; refuses to overwrite an existing file unless
/// `overwrite`.
///
/// `out_dir` is created if missing. Without `overwrite`, every target is checked before anything
/// is written, so a refusal leaves the directory as it was. Each file is written to a temporary
/// dotfile in `out_dir` and then linked (or, with `overwrite`, renamed) into place, so a daemon
/// reloading meanwhile never reads half a file. A document that contains a secret key is created
/// with mode 0640 rather than 0644 (both before the umask). Returns the paths written, in order.
pub fn write_all(
    items: &[Imported],
    out_dir: &Path,
    overwrite: bool,
) -> Result<Vec<PathBuf>, ImportError> {
    let mut seen = HashSet::new();
    for item in items {
        if !valid_name(&item.name) {
            return Err(ImportError::BadItem {
                name: item.name.clone(),
                message: "a database name is one or more of a-z, 0-9, '-' and '_'".into(),
            });
        }
        if !seen.insert(item.name.as_str()) {
            return Err(ImportError::BadItem {
                name: item.name.clone(),
                message: "the name appears twice".into(),
            });
        }
    }
    std::fs::create_dir_all(out_dir).map_err(|source| ImportError::Io {
        path: out_dir.to_path_buf(),
        source,
    })?;
    let targets: Vec<PathBuf> = items
        .iter()
        .map(|i| out_dir.join(format!("{}.toml", i.name)))
        .collect();
    if !overwrite && let Some(t) = targets.iter().find(|t| t.symlink_metadata().is_ok()) {
        return Err(ImportError::Exists { path: t.clone() });
    }
    for (item, target) in items.iter().zip(&targets) {
        write_one(item, out_dir, target, overwrite)?;
    }
    Ok(targets)
}

fn write_one(
    item: &Imported,
    out_dir: &Path,
    target: &Path,
    overwrite: bool,
) -> Result<(), ImportError> {
    use std::os::unix::fs::OpenOptionsExt;

    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ImportError::Io { path, source }
    };
    let tmp = out_dir.join(format!(".{}.toml.import-{}", item.name, std::process::id()));
    let mode = if item.toml.contains("secret_access_key") {
        0o640
    } else {
        0o644
    };
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)
            .map_err(io(&tmp))?;
        f.write_all(item.toml.as_bytes()).map_err(io(&tmp))?;
        f.sync_all().map_err(io(&tmp))?;
        if overwrite {
            std::fs::rename(&tmp, target).map_err(io(target))
        } else {
            // A hard link never replaces an existing file, unlike rename.
            match std::fs::hard_link(&tmp, target) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    Err(ImportError::Exists {
                        path: target.to_path_buf(),
                    })
                }
                Err(e) => Err(io(target)(e)),
            }
        }
    })();
    let _ = std::fs::remove_file(&tmp);
    result
}

// ----- Litestream's YAML -------------------------------------------------------------------------

/// The top level of `litestream.yml` (v0.3.13's `Config`).
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct LsConfig {
    #[serde(default, deserialize_with = "scalar")]
    addr: Option<String>,
    #[serde(default, deserialize_with = "scalar")]
    exec: Option<String>,
    #[serde(default, deserialize_with = "scalar")]
    access_key_id: Option<String>,
    #[serde(default, deserialize_with = "scalar")]
    secret_access_key: Option<String>,
    #[serde(default)]
    logging: Option<LsLogging>,
    /// Each database is deserialized on its own, so that errors can name it.
    #[serde(default)]
    dbs: Option<Vec<Value>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LsLogging {
    #[serde(default, deserialize_with = "scalar")]
    level: Option<String>,
    #[serde(default, rename = "type", deserialize_with = "scalar")]
    kind: Option<String>,
    #[serde(default, deserialize_with = "yaml11_bool")]
    stderr: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct LsDb {
    #[serde(default, deserialize_with = "scalar")]
    path: Option<String>,
    #[serde(default, deserialize_with = "scalar")]
    meta_path: Option<String>,
    #[serde(default, deserialize_with = "go_duration")]
    monitor_interval: Option<RawDuration>,
    #[serde(default, deserialize_with = "go_duration")]
    checkpoint_interval: Option<RawDuration>,
    #[serde(default)]
    min_checkpoint_page_count: Option<i64>,
    #[serde(default)]
    max_checkpoint_page_count: Option<i64>,
    #[serde(default)]
    replicas: Option<Vec<Value>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct LsReplica {
    #[serde(default, rename = "type", deserialize_with = "scalar")]
    kind: Option<String>,
    #[serde(default, deserialize_with = "scalar")]
    name: Option<String>,
    #[serde(default, deserialize_with = "scalar")]
    path: Option<String>,
    #[serde(default, deserialize_with = "scalar")]
    url: Option<String>,
    #[serde(default, deserialize_with = "go_duration")]
    retention: Option<RawDuration>,
    #[serde(default, deserialize_with = "go_duration")]
    retention_check_interval: Option<RawDuration>,
    #[serde(default, deserialize_with = "go_duration")]
    sync_interval: Option<RawDuration>,
    #[serde(default, deserialize_with = "go_duration")]
    snapshot_interval: Option<RawDuration>,
    #[serde(default, deserialize_with = "go_duration")]
    validation_interval: Option<RawDuration>,
    // S3
    #[serde(default, deserialize_with = "scalar")]
    access_key_id: Option<String>,
    #[serde(default, deserialize_with = "scalar")]
    secret_access_key: Option<String>,
    #[serde(default, deserialize_with = "scalar")]
    region: Option<String>,
    #[serde(default, deserialize_with = "scalar")]
    bucket: Option<String>,
    #[serde(default, deserialize_with = "scalar")]
    endpoint: Option<String>,
    #[serde(default, deserialize_with = "yaml11_bool")]
    force_path_style: Option<bool>,
    #[serde(default, deserialize_with = "yaml11_bool")]
    skip_verify: Option<bool>,
    // Azure Blob Storage
    #[serde(default, deserialize_with = "scalar")]
    account_name: Option<String>,
    #[serde(default, deserialize_with = "scalar")]
    account_key: Option<String>,
    // SFTP
    #[serde(default, deserialize_with = "scalar")]
    host: Option<String>,
    #[serde(default, deserialize_with = "scalar")]
    user: Option<String>,
    #[serde(default, deserialize_with = "scalar")]
    password: Option<String>,
    #[serde(default, deserialize_with = "scalar")]
    key_path: Option<String>,
    // Encryption
    #[serde(default)]
    age: Option<LsAge>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LsAge {
    #[serde(default)]
    identities: Option<Vec<String>>,
    #[serde(default)]
    recipients: Option<Vec<String>>,
}

/// A duration as written: Go syntax (`1h30m`) or a bare integer (nanoseconds, as yaml.v2 reads
/// it into a `time.Duration`).
#[derive(Debug, Clone, PartialEq)]
enum RawDuration {
    Text(String),
    Nanos(i128),
}

/// Any YAML scalar as a string, as yaml.v2 decodes a scalar into a Go `string` (`bucket: 2024`).
fn scalar<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    struct V;
    impl<'de> Visitor<'de> for V {
        type Value = Option<String>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a string")
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
            Ok(Some(v.to_string()))
        }
        fn visit_bool<E: de::Error>(self, v: bool) -> Result<Self::Value, E> {
            Ok(Some(v.to_string()))
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
            Ok(Some(v.to_string()))
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
            Ok(Some(v.to_string()))
        }
        fn visit_f64<E: de::Error>(self, v: f64) -> Result<Self::Value, E> {
            Ok(Some(v.to_string()))
        }
        fn visit_char<E: de::Error>(self, v: char) -> Result<Self::Value, E> {
            Ok(Some(v.to_string()))
        }
        fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
    }
    d.deserialize_any(V)
}

/// A boolean, including YAML 1.1's `yes`/`no`/`on`/`off`, which yaml.v2 accepts.
fn yaml11_bool<'de, D: Deserializer<'de>>(d: D) -> Result<Option<bool>, D::Error> {
    struct V;
    impl<'de> Visitor<'de> for V {
        type Value = Option<bool>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("true or false")
        }
        fn visit_bool<E: de::Error>(self, v: bool) -> Result<Self::Value, E> {
            Ok(Some(v))
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
            match v {
                "y" | "Y" | "yes" | "Yes" | "YES" | "on" | "On" | "ON" | "true" | "True"
                | "TRUE" => Ok(Some(true)),
                "n" | "N" | "no" | "No" | "NO" | "off" | "Off" | "OFF" | "false" | "False"
                | "FALSE" => Ok(Some(false)),
                _ => Err(E::invalid_value(de::Unexpected::Str(v), &self)),
            }
        }
        fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
    }
    d.deserialize_any(V)
}

fn go_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<RawDuration>, D::Error> {
    struct V;
    impl<'de> Visitor<'de> for V {
        type Value = Option<RawDuration>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a Go duration such as \"10s\" or \"1h30m\"")
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
            Ok(Some(RawDuration::Text(v.to_string())))
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
            Ok(Some(RawDuration::Nanos(v.into())))
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
            Ok(Some(RawDuration::Nanos(v.into())))
        }
        fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
    }
    d.deserialize_any(V)
}

// ----- litestreamd's TOML ------------------------------------------------------------------------

/// The database keys of a per-database file (see `config::DbConfig`); replicas are rendered
/// separately so that each can carry comments.
#[derive(Serialize)]
struct DbOut {
    path: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    meta_path: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    monitor_interval: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    checkpoint_interval: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    min_checkpoint_page_count: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_checkpoint_page_count: Option<u32>,
}

/// One `[[replicas]]` table (see `config::ReplicaConfig`).
#[derive(Serialize, Default)]
struct ReplicaOut {
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<String>,
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    url: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    path: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    bucket: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    endpoint: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    region: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    force_path_style: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    access_key_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    secret_access_key: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    sync_interval: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    snapshot_interval: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    retention: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    retention_check_interval: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    skip_verify: Option<bool>,
    /// Last: a TOML sub-table goes after the plain keys.
    #[serde(skip_serializing_if = "Option::is_none")]
    age: Option<AgeOut>,
}

/// `[replicas.age]`, Litestream's inline keys as they were.
#[derive(Serialize, Default)]
struct AgeOut {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    recipients: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    identities: Vec<String>,
}

struct ConvertedDb {
    /// The file stem the name is made from.
    stem: String,
    db: DbOut,
    /// Each replica with the comment lines that go above its keys.
    replicas: Vec<(Vec<String>, ReplicaOut)>,
}

impl ConvertedDb {
    fn render(&self, source: &Path, notes: &[String], expand_env: bool) -> String {
        let mut out = format!(
            "# Imported from {} by litestreamd import-litestream-config\n",
            source.display()
        );
        for n in notes {
            out.push_str(&format!("# {n}\n"));
        }
        let mut body = toml::to_string(&self.db).expect("serialising a flat table");
        for (comments, r) in &self.replicas {
            body.push_str("\n[[replicas]]\n");
            for c in comments {
                body.push_str(&format!("# {c}\n"));
            }
            let table = toml::to_string(r).expect("serialising a replica table");
            // The one sub-table, `age`, belongs to this array element.
            body.push_str(&table.replace("\n[age]\n", "\n[replicas.age]\n"));
        }
        if body.contains("secret_access_key") || body.contains("AGE-SECRET-KEY") {
            out.push_str(
                "# This file contains a secret key: keep it readable only by root and the \
                 litestreamd group.\n",
            );
        }
        if !expand_env && body.contains('$') {
            out.push_str(
                "# Environment variables were not expanded: litestreamd expands $VAR and ${VAR} \
                 when it loads this file.\n",
            );
        }
        out.push('\n');
        out.push_str(&body);
        out
    }
}

/// Comments for Litestream settings that belong to no database.
fn global_notes(top: &LsConfig) -> Vec<String> {
    let mut notes = Vec::new();
    if let Some(addr) = top.addr.as_deref().filter(|a| !a.is_empty()) {
        notes.push(format!(
            "Litestream's addr {addr:?} was not imported: set metrics_addr in litestreamd.toml \
             (litestreamd serves /metrics there)."
        ));
    }
    if let Some(exec) = top.exec.as_deref().filter(|e| !e.is_empty()) {
        notes.push(format!(
            "Litestream's exec {exec:?} was not imported: litestreamd does not run the \
             application; start it with its own service."
        ));
    }
    if let Some(l) = &top.logging
        && (l.level.is_some() || l.kind.is_some() || l.stderr.is_some())
    {
        notes.push(
            "Litestream's logging settings were not imported: set [log] level and format in \
             litestreamd.toml."
                .into(),
        );
    }
    notes
}

// ----- Conversion --------------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    File,
    S3,
    Gcs,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::File => "file",
            Kind::S3 => "s3",
            Kind::Gcs => "gcs",
        }
    }
}

struct Cx {
    input: PathBuf,
    expand_env: bool,
}

/// Where in the input a replica is, for messages.
struct ReplicaAt<'a> {
    db: &'a str,
    label: String,
}

impl Cx {
    /// A figment error as an ImportError; `prefix` is the key path of the value deserialized.
    fn figment_error(&self, e: figment::Error, db: Option<&str>, prefix: &str) -> ImportError {
        let key = join_key(prefix, &e.path);
        match e.kind {
            figment::error::Kind::UnknownField(..) => ImportError::UnknownKey {
                input: self.input.clone(),
                db: db.map(str::to_string),
                key,
            },
            ref kind if !key.is_empty() => ImportError::Invalid {
                input: self.input.clone(),
                db: db.map(str::to_string),
                replica: None,
                key,
                message: kind.to_string(),
            },
            kind => ImportError::Yaml {
                input: self.input.clone(),
                message: kind.to_string(),
            },
        }
    }

    fn invalid(&self, db: &str, key: &str, message: impl Into<String>) -> ImportError {
        ImportError::Invalid {
            input: self.input.clone(),
            db: Some(db.to_string()),
            replica: None,
            key: key.to_string(),
            message: message.into(),
        }
    }

    fn invalid_r(&self, at: &ReplicaAt, key: &str, message: impl Into<String>) -> ImportError {
        ImportError::Invalid {
            input: self.input.clone(),
            db: Some(at.db.to_string()),
            replica: Some(at.label.clone()),
            key: key.to_string(),
            message: message.into(),
        }
    }

    fn unsupported(&self, at: &ReplicaAt, feature: impl Into<String>) -> ImportError {
        ImportError::Unsupported {
            input: self.input.clone(),
            db: at.db.to_string(),
            replica: at.label.clone(),
            feature: feature.into(),
        }
    }

    /// A value litestreamd runs through its own `${VAR}` expansion: after Litestream-style
    /// expansion here, a remaining `$` is literal and must be escaped.
    fn lit(&self, s: &str) -> String {
        if self.expand_env {
            s.replace('$', "$$")
        } else {
            s.to_string()
        }
    }

    fn convert_db(
        &self,
        i: usize,
        value: &Value,
        top: &LsConfig,
    ) -> Result<ConvertedDb, ImportError> {
        let prefix = format!("dbs[{i}]");
        // Name the database by its path in messages, once the path is known.
        let label = value
            .find_ref("path")
            .and_then(|p| p.as_str())
            .filter(|p| !p.is_empty())
            .map(str::to_string)
            .unwrap_or_else(|| prefix.clone());
        let db =
            LsDb::deserialize(value).map_err(|e| self.figment_error(e, Some(&label), &prefix))?;
        let key = |k: &str| format!("{prefix}.{k}");

        let raw_path = db
            .path
            .as_deref()
            .filter(|p| !p.is_empty())
            .ok_or_else(|| self.invalid(&label, &key("path"), "the database path is required"))?;
        let path = expand_home(raw_path).map_err(|m| self.invalid(&label, &key("path"), m))?;
        let meta_path = db
            .meta_path
            .as_deref()
            .filter(|p| !p.is_empty())
            .map(|p| expand_home(p).map_err(|m| self.invalid(&label, &key("meta-path"), m)))
            .transpose()?;
        let dur = |d: &Option<RawDuration>, k: &str, nonzero: Option<&str>| {
            duration(d, nonzero).map_err(|m| self.invalid(&label, &key(k), m))
        };
        let count = |c: Option<i64>, k: &str, min: i64| -> Result<Option<u32>, ImportError> {
            c.map(|n| {
                if n < min || n > i64::from(u32::MAX) {
                    Err(self.invalid(
                        &label,
                        &key(k),
                        format!("{n} is out of range ({min} to {})", u32::MAX),
                    ))
                } else {
                    Ok(n as u32)
                }
            })
            .transpose()
        };
        let out = DbOut {
            path: self.lit(&path),
            meta_path,
            monitor_interval: dur(
                &db.monitor_interval,
                "monitor-interval",
                Some("0 turns monitoring off in Litestream; litestreamd always monitors"),
            )?,
            checkpoint_interval: dur(&db.checkpoint_interval, "checkpoint-interval", None)?,
            min_checkpoint_page_count: count(
                db.min_checkpoint_page_count,
                "min-checkpoint-page-count",
                1,
            )?,
            max_checkpoint_page_count: count(
                db.max_checkpoint_page_count,
                "max-checkpoint-page-count",
                0,
            )?,
        };

        let replicas = db.replicas.as_deref().unwrap_or_default();
        if replicas.is_empty() {
            return Err(self.invalid(&label, &key("replicas"), "at least one replica is required"));
        }
        let mut out_replicas = Vec::with_capacity(replicas.len());
        let mut names = HashSet::new();
        for (j, rv) in replicas.iter().enumerate() {
            let rprefix = format!("{prefix}.replicas[{j}]");
            let rlabel = match rv.find_ref("name").and_then(|n| n.as_str()) {
                Some(n) if !n.is_empty() => format!("{n:?}"),
                _ => format!("replicas[{j}]"),
            };
            let at = ReplicaAt {
                db: &label,
                label: rlabel,
            };
            let r = LsReplica::deserialize(rv).map_err(|e| {
                match self.figment_error(e, Some(&label), &rprefix) {
                    ImportError::Invalid {
                        input,
                        db,
                        key,
                        message,
                        ..
                    } => ImportError::Invalid {
                        input,
                        db,
                        replica: Some(at.label.clone()),
                        key,
                        message,
                    },
                    other => other,
                }
            })?;
            let (comments, ro) = self.convert_replica(&r, &at, &rprefix, top)?;
            let effective = ro.name.clone().unwrap_or_else(|| ro.kind.to_string());
            if !names.insert(effective.clone()) {
                return Err(self.invalid_r(
                    &at,
                    &format!("{rprefix}.name"),
                    format!(
                        "duplicate replica name {effective:?} (a replica without a name is \
                         named after its type)"
                    ),
                ));
            }
            out_replicas.push((comments, ro));
        }

        Ok(ConvertedDb {
            stem: Path::new(&path)
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default(),
            db: out,
            replicas: out_replicas,
        })
    }

    fn convert_replica(
        &self,
        r: &LsReplica,
        at: &ReplicaAt,
        prefix: &str,
        top: &LsConfig,
    ) -> Result<(Vec<String>, ReplicaOut), ImportError> {
        let key = |k: &str| format!("{prefix}.{k}");
        let set = |v: &Option<String>| v.as_deref().is_some_and(|s| !s.is_empty());

        // The type: `type`, else the URL's scheme, else "file" (Litestream's ReplicaType).
        let scheme = match r.url.as_deref().filter(|u| !u.is_empty()) {
            Some(u) => match u.split_once("://") {
                Some((s, _)) if !s.is_empty() => Some(s.to_ascii_lowercase()),
                _ => {
                    return Err(self.invalid_r(
                        at,
                        &key("url"),
                        format!("{u:?} is not a URL (scheme://...)"),
                    ));
                }
            },
            None => None,
        };
        let given = r.kind.as_deref().filter(|t| !t.is_empty());
        for t in given.iter().copied().chain(scheme.as_deref()) {
            if matches!(t, "abs" | "sftp") {
                let what = if t == "abs" {
                    "Azure Blob Storage"
                } else {
                    "SFTP"
                };
                return Err(self.unsupported(at, format!("replica type {t:?} ({what})")));
            }
        }
        let parse_kind = |t: &str| match t {
            "file" => Some(Kind::File),
            "s3" => Some(Kind::S3),
            "gcs" | "gs" => Some(Kind::Gcs),
            _ => None,
        };
        let kind = match (given, scheme.as_deref()) {
            (Some(t), s) => {
                let k = parse_kind(t).ok_or_else(|| {
                    self.invalid_r(
                        at,
                        &key("type"),
                        format!("unknown replica type {t:?} (litestreamd supports file, s3, gcs)"),
                    )
                })?;
                if let Some(s) = s
                    && parse_kind(s) != Some(k)
                {
                    return Err(self.invalid_r(
                        at,
                        &key("url"),
                        format!("the URL scheme {s:?} does not match type {t:?}"),
                    ));
                }
                k
            }
            (None, Some(s)) => parse_kind(s).ok_or_else(|| {
                self.invalid_r(
                    at,
                    &key("url"),
                    format!("unknown URL scheme {s:?} (litestreamd supports file, s3, gcs, gs)"),
                )
            })?,
            (None, None) => Kind::File,
        };

        // Keys of other replica types: Litestream ignores them, which usually hides a mistake.
        let foreign: &[(&str, bool)] = &[
            ("account-name", set(&r.account_name)),
            ("account-key", set(&r.account_key)),
            ("host", set(&r.host)),
            ("user", set(&r.user)),
            ("password", set(&r.password)),
            ("key-path", set(&r.key_path)),
            ("bucket", kind == Kind::File && set(&r.bucket)),
            ("region", kind != Kind::S3 && set(&r.region)),
            ("endpoint", kind != Kind::S3 && set(&r.endpoint)),
            (
                "force-path-style",
                kind != Kind::S3 && r.force_path_style.is_some(),
            ),
            ("access-key-id", kind != Kind::S3 && set(&r.access_key_id)),
            (
                "secret-access-key",
                kind != Kind::S3 && set(&r.secret_access_key),
            ),
        ];
        if let Some((k, _)) = foreign.iter().find(|(_, bad)| *bad) {
            return Err(self.invalid_r(
                at,
                &key(k),
                format!("not used by {} replicas", kind.as_str()),
            ));
        }

        let mut comments = Vec::new();
        let dur = |d: &Option<RawDuration>, k: &str, nonzero: Option<&str>| {
            duration(d, nonzero).map_err(|m| self.invalid_r(at, &key(k), m))
        };
        let mut out = ReplicaOut {
            name: r.name.clone().filter(|n| !n.is_empty()),
            kind: kind.as_str(),
            sync_interval: dur(
                &r.sync_interval,
                "sync-interval",
                Some("litestreamd needs a sync interval greater than 0"),
            )?,
            snapshot_interval: dur(&r.snapshot_interval, "snapshot-interval", None)?,
            retention: dur(&r.retention, "retention", None)?,
            retention_check_interval: dur(
                &r.retention_check_interval,
                "retention-check-interval",
                Some("0 turns retention off in Litestream; write retention: 0 for that"),
            )?,
            age: r
                .age
                .as_ref()
                .map(|a| AgeOut {
                    recipients: a.recipients.clone().unwrap_or_default(),
                    identities: a.identities.clone().unwrap_or_default(),
                })
                .filter(|a| !a.recipients.is_empty() || !a.identities.is_empty()),
            skip_verify: r.skip_verify.filter(|v| *v),
            ..ReplicaOut::default()
        };
        if out.age.as_ref().is_some_and(|a| !a.identities.is_empty()) {
            comments.push(
                "age identities are secrets: consider moving them to a file (identity_files) \
                 or an environment variable (\"${AGE_IDENTITY}\")."
                    .to_string(),
            );
        }
        if let Some(v) = &r.validation_interval {
            let shown = match v {
                RawDuration::Text(t) => t.clone(),
                RawDuration::Nanos(n) => format!("{n}ns"),
            };
            comments.push(format!(
                "validation-interval {shown} not imported: litestreamd does not validate \
                 replicas yet."
            ));
        }

        let url = r.url.as_deref().filter(|u| !u.is_empty());
        if url.is_some() && (set(&r.path) || set(&r.bucket)) {
            let k = if set(&r.path) { "path" } else { "bucket" };
            return Err(self.invalid_r(
                at,
                &key(k),
                "a replica has either url or path/bucket, not both",
            ));
        }
        match kind {
            Kind::File => {
                if let Some(u) = url {
                    let ok = url::Url::parse(u).ok().is_some_and(|p| {
                        p.host_str().is_none_or(str::is_empty) && p.to_file_path().is_ok()
                    });
                    if !ok {
                        return Err(self.invalid_r(
                            at,
                            &key("url"),
                            format!("{u:?} is not a file:///absolute/path URL"),
                        ));
                    }
                    out.url = Some(self.lit(u));
                } else {
                    let p = r.path.as_deref().filter(|p| !p.is_empty()).ok_or_else(|| {
                        self.invalid_r(at, &key("path"), "a file replica needs a path or url")
                    })?;
                    if p.contains("://") {
                        return Err(self.invalid_r(
                            at,
                            &key("path"),
                            format!("{p:?} looks like a URL; use url: instead"),
                        ));
                    }
                    let p = expand_home(p).map_err(|m| self.invalid_r(at, &key("path"), m))?;
                    out.path = Some(self.lit(&p));
                }
            }
            Kind::Gcs => {
                if let Some(u) = url {
                    let p = ObjectUrl::parse(u).map_err(|m| self.invalid_r(at, &key("url"), m))?;
                    if p.verbatim_ok() {
                        out.url = Some(self.lit(u));
                    } else {
                        out.bucket = Some(self.lit(&p.host));
                        out.path = non_empty(self.lit(&p.path));
                    }
                } else {
                    let b = r
                        .bucket
                        .as_deref()
                        .filter(|b| !b.is_empty())
                        .ok_or_else(|| {
                            self.invalid_r(
                                at,
                                &key("bucket"),
                                "a gcs replica needs a bucket or url",
                            )
                        })?;
                    out.bucket = Some(self.lit(b));
                    out.path = r
                        .path
                        .as_deref()
                        .filter(|p| !p.is_empty())
                        .map(|p| self.lit(p));
                }
            }
            Kind::S3 => self.convert_s3(r, at, prefix, top, url, &mut out, &mut comments)?,
        }
        Ok((comments, out))
    }

    #[allow(clippy::too_many_arguments)]
    fn convert_s3(
        &self,
        r: &LsReplica,
        at: &ReplicaAt,
        prefix: &str,
        top: &LsConfig,
        url: Option<&str>,
        out: &mut ReplicaOut,
        comments: &mut Vec<String>,
    ) -> Result<(), ImportError> {
        let key = |k: &str| format!("{prefix}.{k}");
        let nonempty = |v: &Option<String>| v.clone().filter(|s| !s.is_empty());
        // Global keys fill in what the replica leaves empty, one by one, as Litestream does.
        let access_key_id = nonempty(&r.access_key_id).or_else(|| nonempty(&top.access_key_id));
        let secret_access_key =
            nonempty(&r.secret_access_key).or_else(|| nonempty(&top.secret_access_key));
        match (&access_key_id, &secret_access_key) {
            (Some(_), None) | (None, Some(_)) => {
                let missing = if access_key_id.is_none() {
                    "access-key-id"
                } else {
                    "secret-access-key"
                };
                return Err(self.invalid_r(
                    at,
                    &key(missing),
                    "access-key-id and secret-access-key must be set together (here or at the \
                     top level)",
                ));
            }
            (None, None) => comments.push(
                "No keys: the AWS SDK's chain applies (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, \
                 profile, web identity, instance role). LITESTREAM_ACCESS_KEY_ID is not read."
                    .into(),
            ),
            (Some(_), Some(_)) => {}
        }

        let region = nonempty(&r.region);
        let endpoint = nonempty(&r.endpoint);
        // Path style: on with an explicit endpoint, unless force-path-style says otherwise.
        let mut force_path_style = r.force_path_style.unwrap_or(endpoint.is_some());
        let (bucket, path, region, endpoint) = if let Some(u) = url {
            let p = ObjectUrl::parse(u).map_err(|m| self.invalid_r(at, &key("url"), m))?;
            let host = parse_s3_host(&p.host_port());
            let plain = !host.special && p.port.is_none();
            if plain
                && p.verbatim_ok()
                && region.is_none()
                && endpoint.is_none()
                && r.force_path_style.is_none()
                && access_key_id.is_none()
            {
                // litestreamd reads this URL exactly as Litestream does.
                out.url = Some(self.lit(u));
                return Ok(());
            }
            // Settings in the URL's host only fill in what the keys leave empty.
            force_path_style = force_path_style || host.force_path_style;
            (
                host.bucket,
                p.path,
                region.or(host.region),
                endpoint.or(host.endpoint),
            )
        } else {
            (
                nonempty(&r.bucket).unwrap_or_default(),
                nonempty(&r.path).unwrap_or_default(),
                region,
                endpoint,
            )
        };
        if bucket.is_empty() {
            return Err(self.invalid_r(
                at,
                &key(if url.is_some() { "url" } else { "bucket" }),
                "an s3 replica needs a bucket",
            ));
        }
        out.bucket = Some(self.lit(&bucket));
        out.path = non_empty(self.lit(&path));
        // litestreamd's own default is path style with an endpoint and virtual hosts without.
        if r.force_path_style.is_some() || force_path_style != endpoint.is_some() {
            out.force_path_style = Some(force_path_style);
        }
        out.region = region.map(|s| self.lit(&s));
        out.endpoint = endpoint.map(|s| self.lit(&s));
        out.access_key_id = access_key_id.map(|s| self.lit(&s));
        out.secret_access_key = secret_access_key.map(|s| self.lit(&s));
        Ok(())
    }
}

fn non_empty(s: String) -> Option<String> {
    (!s.is_empty()).then_some(s)
}

/// `a.b` + ["0", "c"] → `a.b[0].c`.
fn join_key(prefix: &str, path: &[String]) -> String {
    let mut key = prefix.to_string();
    for p in path {
        if p.parse::<usize>().is_ok() {
            key.push_str(&format!("[{p}]"));
        } else {
            if !key.is_empty() {
                key.push('.');
            }
            key.push_str(p);
        }
    }
    key
}

/// A duration as a humantime string; `nonzero` is the message for a forbidden 0.
fn duration(d: &Option<RawDuration>, nonzero: Option<&str>) -> Result<Option<String>, String> {
    let Some(d) = d else { return Ok(None) };
    let v = match d {
        RawDuration::Text(t) => parse_go_duration(t)?,
        RawDuration::Nanos(0) => Duration::ZERO,
        RawDuration::Nanos(n) => {
            return Err(format!(
                "{n} without a unit is {n} nanoseconds in Litestream; write the unit, e.g. \"{n}s\""
            ));
        }
    };
    if v.is_zero()
        && let Some(m) = nonzero
    {
        return Err(m.to_string());
    }
    Ok(Some(format_duration(v)))
}

/// A humantime string in Go's units (`24h`, `1h 30m`, `1s 500ms`), without the days, months
/// and years `humantime::format_duration` would use.
fn format_duration(d: Duration) -> String {
    if d.is_zero() {
        return "0s".into();
    }
    let mut ns = d.as_nanos();
    let mut parts = Vec::new();
    for (unit, size) in [
        ("h", 3_600_000_000_000u128),
        ("m", 60_000_000_000),
        ("s", 1_000_000_000),
        ("ms", 1_000_000),
        ("us", 1_000),
        ("ns", 1),
    ] {
        if ns >= size {
            parts.push(format!("{}{unit}", ns / size));
            ns %= size;
        }
    }
    parts.join(" ")
}

/// Go's `time.ParseDuration`: `[-+]?([0-9]*(\.[0-9]*)?[a-z]+)+`, or `0`. Negative durations are
/// rejected (no setting takes one).
fn parse_go_duration(s: &str) -> Result<Duration, String> {
    let bad = || format!("invalid duration {s:?} (Go syntax: 500ms, 10s, 1h30m)");
    let (neg, mut rest) = match s.as_bytes().first() {
        Some(b'-') => (true, &s[1..]),
        Some(b'+') => (false, &s[1..]),
        _ => (false, s),
    };
    if rest == "0" {
        return Ok(Duration::ZERO);
    }
    if rest.is_empty() {
        return Err(bad());
    }
    const NS_MAX: u128 = i64::MAX as u128; // Go's limit, about 290 years
    let mut total: u128 = 0;
    while !rest.is_empty() {
        let int_len = rest.bytes().take_while(u8::is_ascii_digit).count();
        let int: u128 = if int_len > 0 {
            rest[..int_len].parse().map_err(|_| bad())?
        } else {
            0
        };
        rest = &rest[int_len..];
        let (mut frac, mut scale, mut frac_len) = (0u128, 1u128, 0);
        if let Some(r) = rest.strip_prefix('.') {
            frac_len = r.bytes().take_while(u8::is_ascii_digit).count();
            for b in r[..frac_len].bytes() {
                // Digits beyond nanosecond precision cannot matter.
                if scale < 10u128.pow(20) {
                    frac = frac * 10 + u128::from(b - b'0');
                    scale *= 10;
                }
            }
            rest = &r[frac_len..];
        }
        if int_len == 0 && frac_len == 0 {
            return Err(bad());
        }
        let unit_len = rest
            .find(|c: char| c == '.' || c.is_ascii_digit())
            .unwrap_or(rest.len());
        let unit: u128 = match &rest[..unit_len] {
            "ns" => 1,
            "us" | "µs" | "μs" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            "" => return Err(format!("missing unit in duration {s:?}")),
            u => return Err(format!("unknown unit {u:?} in duration {s:?}")),
        };
        rest = &rest[unit_len..];
        total = int
            .checked_mul(unit)
            .and_then(|v| v.checked_add(frac * unit / scale))
            .and_then(|v| v.checked_add(total))
            .filter(|v| *v <= NS_MAX)
            .ok_or_else(|| format!("duration {s:?} is too long"))?;
    }
    if neg && total > 0 {
        return Err(format!("negative duration {s:?}"));
    }
    Ok(Duration::from_nanos(total as u64))
}

/// Go's `os.ExpandEnv` over the raw text, as Litestream does before parsing: `$VAR` and `${VAR}`
/// are replaced, unset variables become empty, and there is no escape for `$`.
fn expand_go_env(s: &str) -> String {
    fn special(c: u8) -> bool {
        matches!(
            c,
            b'*' | b'#' | b'$' | b'@' | b'!' | b'?' | b'-' | b'0'..=b'9'
        )
    }
    fn alnum(c: u8) -> bool {
        c == b'_' || c.is_ascii_alphanumeric()
    }
    /// Go's getShellName: the name after `$` and how many bytes it takes.
    fn shell_name(s: &[u8]) -> (&[u8], usize) {
        if s[0] == b'{' {
            if s.len() > 2 && special(s[1]) && s[2] == b'}' {
                return (&s[1..2], 3);
            }
            return match s.iter().skip(1).position(|&c| c == b'}') {
                Some(0) => (&[], 2), // bad syntax: "${}" is dropped
                Some(n) => (&s[1..=n], n + 2),
                None => (&[], 1), // bad syntax: "${" is dropped
            };
        }
        if special(s[0]) {
            return (&s[..1], 1);
        }
        let n = s.iter().take_while(|c| alnum(**c)).count();
        (&s[..n], n)
    }
    let b = s.as_bytes();
    let mut out: Vec<u8> = Vec::with_capacity(s.len());
    let (mut i, mut j) = (0, 0);
    while j < b.len() {
        if b[j] == b'$' && j + 1 < b.len() {
            out.extend_from_slice(&b[i..j]);
            let (name, w) = shell_name(&b[j + 1..]);
            if name.is_empty() && w > 0 {
                // invalid syntax: eaten
            } else if name.is_empty() {
                out.push(b'$');
            } else {
                let name = String::from_utf8_lossy(name);
                if let Some(v) = std::env::var_os(name.as_ref()) {
                    out.extend_from_slice(v.to_string_lossy().as_bytes());
                }
            }
            j += w;
            i = j + 1;
        }
        j += 1;
    }
    out.extend_from_slice(&b[i.min(b.len())..]);
    // Only whole UTF-8 sequences were copied or inserted.
    String::from_utf8(out).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

/// `~` and `~/x` → `$HOME`, `$HOME/x` (Litestream's `expand`). Other paths are unchanged.
fn expand_home(p: &str) -> Result<String, String> {
    if p != "~" && !p.starts_with("~/") {
        return Ok(p.to_string());
    }
    let home = std::env::var("HOME")
        .ok()
        .filter(|h| !h.is_empty())
        .ok_or_else(|| format!("{p:?} starts with ~ but HOME is not set"))?;
    Ok(match p.strip_prefix("~/") {
        Some(rest) => Path::new(&home).join(rest).to_string_lossy().into_owned(),
        None => home,
    })
}

/// An `s3://`, `gcs://` or `gs://` replica URL, split as Litestream's `ParseReplicaURL` does.
struct ObjectUrl {
    host: String,
    port: Option<String>,
    /// Cleaned, without a leading `/` (Go: `strings.TrimPrefix(path.Clean(u.Path), "/")`).
    path: String,
    /// The path exactly as written after the host.
    raw_path: String,
}

impl ObjectUrl {
    fn parse(u: &str) -> Result<ObjectUrl, String> {
        if !u.contains("://") {
            return Err("not a URL".into());
        }
        let url = url::Url::parse(u).map_err(|e| format!("{u:?}: {e}"))?;
        if url.query().is_some() || url.fragment().is_some() {
            return Err(format!(
                "{u:?}: Litestream 0.3 ignores URL query parameters and fragments; set \
                 endpoint, region or force-path-style as keys instead"
            ));
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(format!("{u:?}: user information is not allowed here"));
        }
        let host = url
            .host_str()
            .filter(|h| !h.is_empty())
            .ok_or_else(|| format!("{u:?}: the bucket (URL host) is missing"))?
            .to_string();
        let raw_path = url.path().to_string();
        // Go's url.Parse rejects a malformed %-escape; percent_decode_str passes it through.
        let bad_escape = raw_path
            .split('%')
            .skip(1)
            .any(|rest| rest.len() < 2 || !rest.as_bytes()[..2].iter().all(u8::is_ascii_hexdigit));
        let decoded = percent_encoding::percent_decode_str(&raw_path)
            .decode_utf8()
            .ok()
            .filter(|_| !bad_escape)
            .ok_or_else(|| format!("{u:?}: bad %-escape"))?;
        Ok(ObjectUrl {
            host,
            port: url.port().map(|p| p.to_string()),
            path: clean_path(&decoded),
            raw_path,
        })
    }

    fn host_port(&self) -> String {
        match &self.port {
            Some(p) => format!("{}:{p}", self.host),
            None => self.host.clone(),
        }
    }

    /// Whether litestreamd's URL parser (host = bucket, path without its leading `/`) gives
    /// the same bucket and path as Litestream for this URL.
    fn verbatim_ok(&self) -> bool {
        let plain = self
            .raw_path
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'/' | b'-' | b'_' | b'.' | b'~'));
        self.port.is_none()
            && plain
            && (self.raw_path.is_empty() || self.raw_path == format!("/{}", self.path))
    }
}

/// Go's `path.Clean` without the leading `/`; the root (or nothing) is "".
fn clean_path(p: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for seg in p.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            s => parts.push(s),
        }
    }
    parts.join("/")
}

/// What Litestream's `s3.ParseHost` makes of a URL host.
#[derive(Debug, PartialEq)]
struct S3Host {
    bucket: String,
    region: Option<String>,
    endpoint: Option<String>,
    force_path_style: bool,
    /// One of the provider host forms (not a plain bucket name).
    special: bool,
}

/// Litestream 0.3.13's `s3.ParseHost`: provider-specific host forms set the bucket, region,
/// endpoint and path style; any other host is the bucket name (virtual-host style).
fn parse_s3_host(s: &str) -> S3Host {
    let (host, port) = match s.rsplit_once(':') {
        Some((h, p)) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => (h, Some(p)),
        _ => (s, None),
    };
    // `^(?:(.+)\.)?SUFFIX$`: the optional bucket before a fixed suffix.
    let bucket_before = |suffix: &str| -> Option<String> {
        if host == suffix {
            Some(String::new())
        } else {
            host.strip_suffix(suffix)
                .and_then(|b| b.strip_suffix('.'))
                .filter(|b| !b.is_empty())
                .map(str::to_string)
        }
    };
    // `^(?:(.+)\.)?s3.([^.]+)POST$` (with `s3_label`) or `^(?:(.+)\.)?([^.]+)POST$`: the
    // region is the last label before the suffix, the bucket whatever precedes it.
    let bucket_region = |s3_label: bool, post: &str| -> Option<(String, String)> {
        let stem = host.strip_suffix(post)?;
        let (left, region) = match stem.rsplit_once('.') {
            Some((l, r)) => (Some(l), r),
            None => (None, stem),
        };
        if region.is_empty() {
            return None;
        }
        let bucket = if s3_label {
            match left? {
                "s3" => "",
                l => l.strip_suffix(".s3").filter(|b| !b.is_empty())?,
            }
        } else {
            match left {
                Some("") => return None,
                Some(l) => l,
                None => "",
            }
        };
        Some((bucket.to_string(), region.to_string()))
    };
    let mut scheme = "https";
    let (bucket, region, endpoint) = if let Some(b) = bucket_before("localhost") {
        scheme = "http";
        (b, Some("us-east-1".to_string()), "localhost".to_string())
    } else if let Some((b, r)) = bucket_region(true, ".backblazeb2.com") {
        let e = format!("s3.{r}.backblazeb2.com");
        (b, Some(r), e)
    } else if let Some(b) = bucket_before("s3.filebase.com") {
        (b, None, "s3.filebase.com".to_string())
    } else if let Some((b, r)) = bucket_region(false, ".digitaloceanspaces.com") {
        let e = format!("{r}.digitaloceanspaces.com");
        (b, Some(r), e)
    } else if let Some((b, r)) = bucket_region(true, ".scw.cloud") {
        let e = format!("s3.{r}.scw.cloud");
        (b, Some(r), e)
    } else if let Some((b, r)) = bucket_region(false, ".linodeobjects.com") {
        let e = format!("{r}.linodeobjects.com");
        (b, Some(r), e)
    } else {
        return S3Host {
            bucket: host.to_string(),
            region: None,
            endpoint: None,
            force_path_style: false,
            special: false,
        };
    };
    let endpoint = match port {
        Some(p) => format!("{scheme}://{endpoint}:{p}"),
        None => format!("{scheme}://{endpoint}"),
    };
    S3Host {
        bucket,
        region,
        endpoint: Some(endpoint),
        force_path_style: true,
        special: true,
    }
}

// ----- Names -------------------------------------------------------------------------------------

fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

/// Lower case; every run of other characters becomes one `-`; `db` if nothing is left.
fn sanitise(stem: &str) -> String {
    let mut out = String::with_capacity(stem.len());
    for c in stem.chars().flat_map(char::to_lowercase) {
        if c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-' {
            out.push(c);
        } else if !out.ends_with('-') {
            out.push('-');
        }
    }
    let out = out.trim_matches('-');
    if out.is_empty() {
        "db".to_string()
    } else {
        out.to_string()
    }
}

/// The first database with a name keeps it; later ones get `-2`, `-3` … skipping every name
/// taken or wanted by another database.
fn unique_names(bases: &[String]) -> Vec<String> {
    let wanted: HashSet<&str> = bases.iter().map(String::as_str).collect();
    let mut taken: HashSet<String> = HashSet::new();
    bases
        .iter()
        .map(|b| {
            let name = if taken.contains(b) {
                (2..)
                    .map(|n| format!("{b}-{n}"))
                    .find(|c| !taken.contains(c) && !wanted.contains(c.as_str()))
                    .expect("an unused suffix")
            } else {
                b.clone()
            };
            taken.insert(name.clone());
            name
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn src() -> &'static Path {
        Path::new("/etc/litestream.yml")
    }

    fn one(yaml: &str) -> Imported {
        let mut v = convert(yaml, src(), true).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(v.len(), 1);
        v.remove(0)
    }

    fn parse(doc: &Imported) -> toml::Value {
        let v: toml::Value = toml::from_str(&doc.toml)
            .unwrap_or_else(|e| panic!("emitted TOML does not parse: {e}\n{}", doc.toml));
        // And it is a valid litestreamd per-database file.
        let _: crate::config::DbConfig = toml::from_str(&doc.toml)
            .unwrap_or_else(|e| panic!("not a litestreamd db file: {e}\n{}", doc.toml));
        v
    }

    fn replica(v: &toml::Value, i: usize) -> &toml::Table {
        v["replicas"].as_array().unwrap()[i].as_table().unwrap()
    }

    fn keys(t: &toml::Table) -> Vec<&str> {
        let mut k: Vec<&str> = t.keys().map(String::as_str).collect();
        k.sort();
        k
    }

    fn err(yaml: &str) -> ImportError {
        match convert(yaml, src(), true) {
            Ok(v) => panic!("expected an error, got {v:?}"),
            Err(e) => e,
        }
    }

    #[test]
    fn minio_example_from_the_litestream_docs() {
        let doc = one("dbs:
  - path: /home/user/db
    replicas:
      - type: s3
        bucket: mybkt
        path: db
        endpoint: http://localhost:9000
        region: us-east-1
        access-key-id: minioadmin
        secret-access-key: minioadmin
        force-path-style: true
");
        assert_eq!(doc.name, "db");
        assert_eq!(doc.file, PathBuf::from("db.toml"));
        assert!(
            doc.toml.starts_with(
                "# Imported from /etc/litestream.yml by litestreamd import-litestream-config\n"
            ),
            "{}",
            doc.toml
        );
        let v = parse(&doc);
        assert_eq!(v["path"].as_str(), Some("/home/user/db"));
        let r = replica(&v, 0);
        assert_eq!(
            keys(r),
            [
                "access_key_id",
                "bucket",
                "endpoint",
                "force_path_style",
                "path",
                "region",
                "secret_access_key",
                "type"
            ]
        );
        assert_eq!(r["type"].as_str(), Some("s3"));
        assert_eq!(r["bucket"].as_str(), Some("mybkt"));
        assert_eq!(r["path"].as_str(), Some("db"));
        assert_eq!(r["endpoint"].as_str(), Some("http://localhost:9000"));
        assert_eq!(r["region"].as_str(), Some("us-east-1"));
        assert_eq!(r["force_path_style"].as_bool(), Some(true));
        assert_eq!(r["access_key_id"].as_str(), Some("minioadmin"));
        assert_eq!(r["secret_access_key"].as_str(), Some("minioadmin"));
        assert!(doc.toml.contains("# This file contains a secret key"));
    }

    #[test]
    fn file_replica_with_all_db_settings_and_durations() {
        let doc = one("dbs:
  - path: /var/lib/app/app.db
    meta-path: /var/lib/app/meta
    monitor-interval: 500ms
    checkpoint-interval: 1h30m
    min-checkpoint-page-count: 2000
    max-checkpoint-page-count: 20000
    replicas:
      - name: backup
        path: /mnt/backup/app
        sync-interval: 10s
        snapshot-interval: 24h
        retention: 72h
        retention-check-interval: 1.5h
        validation-interval: 6h
");
        assert_eq!(doc.name, "app");
        let v = parse(&doc);
        assert_eq!(
            keys(v.as_table().unwrap()),
            [
                "checkpoint_interval",
                "max_checkpoint_page_count",
                "meta_path",
                "min_checkpoint_page_count",
                "monitor_interval",
                "path",
                "replicas"
            ]
        );
        assert_eq!(v["meta_path"].as_str(), Some("/var/lib/app/meta"));
        assert_eq!(v["monitor_interval"].as_str(), Some("500ms"));
        assert_eq!(v["checkpoint_interval"].as_str(), Some("1h 30m"));
        assert_eq!(v["min_checkpoint_page_count"].as_integer(), Some(2000));
        assert_eq!(v["max_checkpoint_page_count"].as_integer(), Some(20000));
        let r = replica(&v, 0);
        assert_eq!(
            keys(r),
            [
                "name",
                "path",
                "retention",
                "retention_check_interval",
                "snapshot_interval",
                "sync_interval",
                "type"
            ]
        );
        assert_eq!(r["name"].as_str(), Some("backup"));
        assert_eq!(r["type"].as_str(), Some("file"));
        assert_eq!(r["path"].as_str(), Some("/mnt/backup/app"));
        assert_eq!(r["sync_interval"].as_str(), Some("10s"));
        assert_eq!(r["snapshot_interval"].as_str(), Some("24h"));
        assert_eq!(r["retention"].as_str(), Some("72h"));
        assert_eq!(r["retention_check_interval"].as_str(), Some("1h 30m"));
        assert!(
            doc.toml
                .contains("# validation-interval 6h not imported: litestreamd does not validate"),
            "{}",
            doc.toml
        );
    }

    #[test]
    fn url_replicas() {
        let doc = one("dbs:
  - path: /data/a.db
    replicas:
      - url: s3://mybucket/backups/a
      - url: gs://gbucket/a
        name: gcs2
      - url: file:///mnt/a
");
        let v = parse(&doc);
        let r0 = replica(&v, 0);
        assert_eq!(keys(r0), ["type", "url"]);
        assert_eq!(r0["type"].as_str(), Some("s3"));
        assert_eq!(r0["url"].as_str(), Some("s3://mybucket/backups/a"));
        let r1 = replica(&v, 1);
        assert_eq!(keys(r1), ["name", "type", "url"]);
        assert_eq!(r1["type"].as_str(), Some("gcs"));
        assert_eq!(r1["url"].as_str(), Some("gs://gbucket/a"));
        let r2 = replica(&v, 2);
        assert_eq!(r2["type"].as_str(), Some("file"));
        assert_eq!(r2["url"].as_str(), Some("file:///mnt/a"));
    }

    #[test]
    fn s3_urls_that_litestreamd_reads_differently_are_split() {
        // Litestream's special hosts set the endpoint, region and path style.
        let doc = one("dbs:
  - path: /data/a.db
    replicas:
      - url: s3://mybkt.localhost:9000/a//b/
        name: local
      - url: s3://mybkt.s3.us-west-002.backblazeb2.com/db
        name: b2
      - url: s3://mybucket/db
        name: keyed
        access-key-id: AK
        secret-access-key: SK
");
        let v = parse(&doc);
        let r = replica(&v, 0);
        assert_eq!(r["bucket"].as_str(), Some("mybkt"));
        assert_eq!(r["path"].as_str(), Some("a/b"));
        assert_eq!(r["endpoint"].as_str(), Some("http://localhost:9000"));
        assert_eq!(r["region"].as_str(), Some("us-east-1"));
        assert!(r.get("url").is_none() && r.get("force_path_style").is_none());
        let r = replica(&v, 1);
        assert_eq!(r["bucket"].as_str(), Some("mybkt"));
        assert_eq!(
            r["endpoint"].as_str(),
            Some("https://s3.us-west-002.backblazeb2.com")
        );
        assert_eq!(r["region"].as_str(), Some("us-west-002"));
        // litestreamd's URL form ignores keys, so a keyed URL replica becomes bucket + path.
        let r = replica(&v, 2);
        assert_eq!(
            keys(r),
            [
                "access_key_id",
                "bucket",
                "name",
                "path",
                "secret_access_key",
                "type"
            ]
        );
    }

    #[test]
    fn s3_host_forms() {
        let h = parse_s3_host("bkt.nyc3.digitaloceanspaces.com");
        assert_eq!(
            (
                h.bucket.as_str(),
                h.region.as_deref(),
                h.endpoint.as_deref()
            ),
            (
                "bkt",
                Some("nyc3"),
                Some("https://nyc3.digitaloceanspaces.com")
            )
        );
        let h = parse_s3_host("bkt.s3.fr-par.scw.cloud");
        assert_eq!(
            (
                h.bucket.as_str(),
                h.region.as_deref(),
                h.endpoint.as_deref()
            ),
            ("bkt", Some("fr-par"), Some("https://s3.fr-par.scw.cloud"))
        );
        let h = parse_s3_host("my.bkt.us-east-1.linodeobjects.com");
        assert_eq!(
            (h.bucket.as_str(), h.region.as_deref()),
            ("my.bkt", Some("us-east-1"))
        );
        let h = parse_s3_host("bkt.s3.filebase.com");
        assert_eq!(
            (h.bucket.as_str(), h.endpoint.as_deref()),
            ("bkt", Some("https://s3.filebase.com"))
        );
        let h = parse_s3_host("my.bucket.example");
        assert_eq!(h.bucket, "my.bucket.example");
        assert!(!h.special && !h.force_path_style && h.endpoint.is_none());
    }

    #[test]
    fn same_file_name_gets_unique_names() {
        let docs = convert(
            "dbs:
  - path: /srv/a/App.db
    replicas: [{path: /b/1}]
  - path: /srv/b/app.db
    replicas: [{path: /b/2}]
  - path: /srv/c/app-2.sqlite
    replicas: [{path: /b/3}]
  - path: /srv/d/app.db
    replicas: [{path: /b/4}]
  - path: /srv/e/my data.v2.db
    replicas: [{path: /b/5}]
",
            src(),
            true,
        )
        .unwrap();
        let names: Vec<&str> = docs.iter().map(|d| d.name.as_str()).collect();
        // app-2 is taken by the database whose file is called that, so the duplicates skip it.
        assert_eq!(names, ["app", "app-3", "app-2", "app-4", "my-data-v2"]);
        for d in &docs {
            assert_eq!(d.file, PathBuf::from(format!("{}.toml", d.name)));
            parse(d);
        }
    }

    #[test]
    fn env_expansion_like_litestream() {
        // SAFETY: tests in this module use their own variable names.
        unsafe {
            std::env::set_var("LSD_IMPORT_BUCKET", "envbkt");
            std::env::set_var("LSD_IMPORT_SECRET", "se$cret");
            std::env::remove_var("LSD_IMPORT_UNSET");
        }
        let yaml = "dbs:
  - path: /data/${LSD_IMPORT_UNSET}x.db
    replicas:
      - type: s3
        bucket: $LSD_IMPORT_BUCKET
        access-key-id: AK
        secret-access-key: ${LSD_IMPORT_SECRET}
";
        let doc = one(yaml);
        let v = parse(&doc);
        // Unset variables are empty, as in Go's os.ExpandEnv.
        assert_eq!(v["path"].as_str(), Some("/data/x.db"));
        let r = replica(&v, 0);
        assert_eq!(r["bucket"].as_str(), Some("envbkt"));
        // A `$` in a value is literal for Litestream, so it is escaped for litestreamd.
        assert_eq!(r["secret_access_key"].as_str(), Some("se$$cret"));

        // Without expansion the references are kept for litestreamd to expand at load time.
        let doc = &convert(yaml, src(), false).unwrap()[0];
        let v = parse(doc);
        let r = replica(&v, 0);
        assert_eq!(r["bucket"].as_str(), Some("$LSD_IMPORT_BUCKET"));
        assert_eq!(
            r["secret_access_key"].as_str(),
            Some("${LSD_IMPORT_SECRET}")
        );
        assert!(
            doc.toml
                .contains("# Environment variables were not expanded")
        );
    }

    #[test]
    fn go_env_expansion_edge_cases() {
        unsafe { std::env::set_var("LSD_IMPORT_X", "x") };
        assert_eq!(expand_go_env("a$LSD_IMPORT_X.b"), "ax.b");
        assert_eq!(expand_go_env("${LSD_IMPORT_X}y"), "xy");
        assert_eq!(expand_go_env("cost: 5$"), "cost: 5$");
        assert_eq!(expand_go_env("a$.b"), "a$.b");
        assert_eq!(expand_go_env("a${}b"), "ab");
        assert_eq!(expand_go_env("a${b"), "ab");
        assert_eq!(expand_go_env("é$LSD_IMPORT_Xé"), "éxé");
    }

    #[test]
    fn home_expansion() {
        let home = std::env::var("HOME").unwrap();
        let doc = one("dbs:\n  - path: ~/app.db\n    replicas:\n      - path: ~/backup\n");
        let v = parse(&doc);
        assert_eq!(
            v["path"].as_str().unwrap(),
            format!("{home}/app.db").replace('$', "$$")
        );
        assert_eq!(
            replica(&v, 0)["path"].as_str().unwrap(),
            format!("{home}/backup").replace('$', "$$")
        );
    }

    #[test]
    fn global_keys_fill_s3_replicas() {
        let doc = one("access-key-id: GLOBALAK
secret-access-key: GLOBALSK
addr: \":9090\"
logging:
  level: debug
dbs:
  - path: /data/a.db
    replicas:
      - type: s3
        bucket: one
      - name: own
        type: s3
        bucket: two
        access-key-id: OWNAK
      - type: file
        path: /b
");
        let v = parse(&doc);
        let r = replica(&v, 0);
        assert_eq!(r["access_key_id"].as_str(), Some("GLOBALAK"));
        assert_eq!(r["secret_access_key"].as_str(), Some("GLOBALSK"));
        let r = replica(&v, 1);
        assert_eq!(r["access_key_id"].as_str(), Some("OWNAK"));
        assert_eq!(r["secret_access_key"].as_str(), Some("GLOBALSK"));
        let r = replica(&v, 2);
        assert!(r.get("access_key_id").is_none());
        assert!(
            doc.toml
                .contains("# Litestream's addr \":9090\" was not imported")
        );
        assert!(
            doc.toml
                .contains("# Litestream's logging settings were not imported")
        );
    }

    #[test]
    fn go_durations() {
        let p = |s| parse_go_duration(s).map(format_duration);
        assert_eq!(p("1h30m").unwrap(), "1h 30m");
        assert_eq!(p("500ms").unwrap(), "500ms");
        assert_eq!(p("10s").unwrap(), "10s");
        assert_eq!(p("0").unwrap(), "0s");
        assert_eq!(p("1.5s").unwrap(), "1s 500ms");
        assert_eq!(p("2us").unwrap(), "2us");
        assert_eq!(p("1µs").unwrap(), "1us");
        assert_eq!(p(".5m").unwrap(), "30s");
        for bad in ["", "10", "1d", "-1s", "s", "1..2s", "abc", "9999999999h"] {
            assert!(p(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn unknown_keys_are_named() {
        let e = err("dbs:\n  - path: /a.db\n    replicas:\n      - path: /b\n        tpye: s3\n");
        assert!(
            matches!(&e, ImportError::UnknownKey { key, db: Some(db), .. }
                if key == "dbs[0].replicas[0].tpye" && db == "/a.db"),
            "{e:?}"
        );
        assert!(
            e.to_string()
                .contains("unknown key `dbs[0].replicas[0].tpye`"),
            "{e}"
        );
        let e = err("dbz: []\n");
        assert!(
            matches!(&e, ImportError::UnknownKey { key, .. } if key == "dbz"),
            "{e:?}"
        );
        let e = err("dbs:\n  - path: /a.db\n    monitor-intervl: 1s\n");
        assert!(
            matches!(&e, ImportError::UnknownKey { key, .. } if key == "dbs[0].monitor-intervl"),
            "{e:?}"
        );
    }

    #[test]
    fn unsupported_replica_types() {
        for (ty, extra) in [
            ("abs", "account-name: acct\n        bucket: c"),
            ("sftp", "host: example.com:22\n        user: u"),
        ] {
            let e = err(&format!(
                "dbs:\n  - path: /a.db\n    replicas:\n      - name: r1\n        type: {ty}\n        {extra}\n"
            ));
            assert!(
                matches!(&e, ImportError::Unsupported { db, replica, feature, .. }
                    if db == "/a.db" && replica == "\"r1\"" && feature.contains(ty)),
                "{e:?}"
            );
            let msg = e.to_string();
            assert!(msg.contains("not supported"), "{msg}");
            assert!(msg.contains("/a.db") && msg.contains("r1"), "{msg}");
        }
        let e = err("dbs:\n  - path: /a.db\n    replicas:\n      - url: sftp://u@h/p\n");
        assert!(matches!(e, ImportError::Unsupported { .. }), "{e:?}");
    }

    #[test]
    fn skip_verify_and_age_are_imported() {
        let doc = one(
            "dbs:\n  - path: /a.db\n    replicas:\n      - type: s3\n        bucket: b\n        skip-verify: true\n",
        );
        assert_eq!(
            replica(&parse(&doc), 0)["skip_verify"].as_bool(),
            Some(true)
        );
        // skip-verify: false changes nothing.
        let doc = one(
            "dbs:\n  - path: /a.db\n    replicas:\n      - type: s3\n        bucket: b\n        skip-verify: false\n",
        );
        assert!(!doc.toml.contains("skip_verify"), "{}", doc.toml);

        let doc = one(
            "dbs:\n  - path: /a.db\n    replicas:\n      - path: /b\n        age:\n          recipients: [age1xyz]\n          identities: [AGE-SECRET-KEY-1XYZ]\n",
        );
        let v = parse(&doc);
        let age = replica(&v, 0)["age"].as_table().unwrap();
        assert_eq!(
            age["recipients"].as_array().unwrap()[0].as_str(),
            Some("age1xyz")
        );
        assert_eq!(
            age["identities"].as_array().unwrap()[0].as_str(),
            Some("AGE-SECRET-KEY-1XYZ")
        );
        assert!(doc.toml.contains("secrets"), "{}", doc.toml);
    }

    #[test]
    fn invalid_values() {
        let cases = [
            // (yaml, key, part of the message)
            (
                "dbs:\n  - replicas: [{path: /b}]\n",
                "dbs[0].path",
                "required",
            ),
            ("dbs:\n  - path: /a.db\n", "dbs[0].replicas", "at least one"),
            (
                "dbs:\n  - path: /a.db\n    monitor-interval: 1d\n    replicas: [{path: /b}]\n",
                "dbs[0].monitor-interval",
                "unknown unit",
            ),
            (
                "dbs:\n  - path: /a.db\n    monitor-interval: 0s\n    replicas: [{path: /b}]\n",
                "dbs[0].monitor-interval",
                "0",
            ),
            (
                "dbs:\n  - path: /a.db\n    replicas: [{path: /b, retention: 3600}]\n",
                "dbs[0].replicas[0].retention",
                "nanoseconds",
            ),
            (
                "dbs:\n  - path: /a.db\n    min-checkpoint-page-count: 0\n    replicas: [{path: /b}]\n",
                "dbs[0].min-checkpoint-page-count",
                "out of range",
            ),
            (
                "dbs:\n  - path: /a.db\n    replicas: [{url: s3://b/p, path: x}]\n",
                "dbs[0].replicas[0].path",
                "not both",
            ),
            (
                "dbs:\n  - path: /a.db\n    replicas: [{type: s3, path: x}]\n",
                "dbs[0].replicas[0].bucket",
                "needs a bucket",
            ),
            (
                "dbs:\n  - path: /a.db\n    replicas: [{type: s3, bucket: b, access-key-id: k}]\n",
                "dbs[0].replicas[0].secret-access-key",
                "together",
            ),
            (
                "dbs:\n  - path: /a.db\n    replicas: [{type: gcs, bucket: b, region: r}]\n",
                "dbs[0].replicas[0].region",
                "not used by gcs",
            ),
            (
                "dbs:\n  - path: /a.db\n    replicas: [{type: ftp, path: /b}]\n",
                "dbs[0].replicas[0].type",
                "unknown replica type",
            ),
            (
                "dbs:\n  - path: /a.db\n    replicas: [{type: s3, url: gcs://b/p}]\n",
                "dbs[0].replicas[0].url",
                "does not match",
            ),
            (
                "dbs:\n  - path: /a.db\n    replicas: [{path: s3://b/p}]\n",
                "dbs[0].replicas[0].path",
                "looks like a URL",
            ),
            (
                "dbs:\n  - path: /a.db\n    replicas: [{url: \"s3://b/p?endpoint=x\"}]\n",
                "dbs[0].replicas[0].url",
                "query",
            ),
            (
                "dbs:\n  - path: /a.db\n    replicas: [{path: /b}, {path: /c}]\n",
                "dbs[0].replicas[1].name",
                "duplicate replica name \"file\"",
            ),
            (
                "dbs:\n  - path: /a.db\n    replicas: [{type: s3, bucket: b, force-path-style: maybe}]\n",
                "dbs[0].replicas[0].force-path-style",
                "true or false",
            ),
        ];
        for (yaml, want_key, want_msg) in cases {
            let e = err(yaml);
            match &e {
                ImportError::Invalid { key, message, .. } => {
                    assert_eq!(key, want_key, "{yaml}: {e}");
                    assert!(message.contains(want_msg), "{yaml}: {e}");
                }
                other => panic!("{yaml}: expected Invalid, got {other:?}"),
            }
            assert!(e.to_string().starts_with("/etc/litestream.yml: "), "{e}");
        }
        assert!(matches!(err("dbs: []\n"), ImportError::NoDatabases { .. }));
        assert!(matches!(err("{}"), ImportError::NoDatabases { .. }));
        assert!(matches!(err("dbs: [unclosed\n"), ImportError::Yaml { .. }));
        assert!(matches!(err("- a\n- b\n"), ImportError::Yaml { .. }));
    }

    #[test]
    fn yaml_1_1_scalars_and_merge_keys() {
        // yaml.v2 reads `bucket: 2024` as the string "2024", `no` as false, and `<<` merges.
        let docs = convert(
            "dbs:
  - &base
    path: /a.db
    replicas:
      - type: s3
        bucket: 2024
        endpoint: http://h:9000
        force-path-style: no
  - <<: *base
    path: /b.db
",
            src(),
            true,
        )
        .unwrap();
        assert_eq!(docs.len(), 2);
        for (doc, path) in docs.iter().zip(["/a.db", "/b.db"]) {
            let v = parse(doc);
            assert_eq!(v["path"].as_str(), Some(path));
            let r = replica(&v, 0);
            assert_eq!(r["bucket"].as_str(), Some("2024"));
            assert_eq!(r["force_path_style"].as_bool(), Some(false));
        }
    }

    #[test]
    fn write_all_refuses_to_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("dbs.d");
        let docs = convert(
            "access-key-id: AK\nsecret-access-key: SK\ndbs:
  - path: /a/one.db
    replicas: [{type: s3, bucket: b}]
  - path: /a/two.db
    replicas: [{path: /b}]
",
            src(),
            true,
        )
        .unwrap();
        let written = write_all(&docs, &out, false).unwrap();
        assert_eq!(written, [out.join("one.toml"), out.join("two.toml")]);
        assert_eq!(std::fs::read_to_string(&written[0]).unwrap(), docs[0].toml);
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o077;
            assert_eq!(
                mode(&written[0]) & 0o007,
                0,
                "secret file is world-readable"
            );
        }
        // Only two.toml exists now: a second run refuses and writes nothing.
        std::fs::remove_file(&written[0]).unwrap();
        let e = write_all(&docs, &out, false).unwrap_err();
        assert!(
            matches!(&e, ImportError::Exists { path } if path == &written[1]),
            "{e:?}"
        );
        assert!(!written[0].exists(), "a refused import must write nothing");
        write_all(&docs, &out, true).unwrap();
        assert!(written[0].exists());
        // No temporary files are left behind.
        let mut names: Vec<String> = std::fs::read_dir(&out)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["one.toml", "two.toml"]);

        let mut dup = docs.clone();
        dup[1].name = "one".into();
        assert!(matches!(
            write_all(&dup, &out, true),
            Err(ImportError::BadItem { .. })
        ));
        dup[1].name = "../evil".into();
        assert!(matches!(
            write_all(&dup, &out, true),
            Err(ImportError::BadItem { .. })
        ));
    }
}
