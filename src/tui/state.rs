//! The dashboard's model: everything on screen, updated by reducers fed with protocol messages
//! ([`State::apply`]), key actions ([`State::handle`]) and clock ticks ([`State::tick`]). No I/O
//! happens here: requests to the daemon leave as [`Effect`]s for the event loop to carry out, and
//! the clock is a field, so tests build a state from `DbStatus` values and render it exactly.

use std::collections::VecDeque;
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, SystemTime};

use crate::control::protocol::{DbDetail, RestoreRequest};
use crate::restore::RestoreSummary;
use crate::status::{DbState, DbStatus, ReplicaStateName};

use super::input::{Action, Mode};

/// Log lines kept (the pane shows the newest that fit).
pub const LOG_CAPACITY: usize = 500;
/// How often an open detail pane is refreshed.
pub const DETAIL_REFRESH: Duration = Duration::from_secs(5);

/// Why the dashboard has no live connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnFailure {
    /// Nothing listens at the socket path (missing file, or a stale socket).
    SocketMissing,
    /// The socket's permissions, or the daemon's peer check, refused us.
    AccessDenied,
    /// Anything else: the daemon closed the connection, a protocol error, an I/O error.
    Other(String),
}

/// The subscription connection, as the header shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Conn {
    /// Before the first attempt finished.
    Connecting,
    /// Subscribed; statuses are live.
    Connected,
    /// Not connected; the connection task retries every second.
    Failed {
        failure: ConnFailure,
        /// Failed attempts since the last successful connection.
        attempts: u32,
    },
}

/// Messages from the connection and request tasks.
#[derive(Debug, Clone)]
pub enum Msg {
    Connected,
    ConnFailed(ConnFailure),
    Status(Vec<DbStatus>),
    Event {
        level: String,
        db: Option<String>,
        message: String,
    },
    Detail {
        db: String,
        result: Box<Result<DbDetail, String>>,
    },
    /// The reply to a snapshot or sync request.
    ActionDone {
        action: ActionKind,
        db: String,
        result: Result<serde_json::Value, String>,
    },
    RestoreProgress {
        stage: String,
        done: u64,
        total: u64,
    },
    /// The end of a restore: the daemon's summary JSON, or the error.
    RestoreDone(Result<serde_json::Value, String>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ActionKind {
    Snapshot,
    Sync,
    Drill,
    Verify,
    Promote,
}

impl ActionKind {
    pub fn name(self) -> &'static str {
        match self {
            ActionKind::Snapshot => "snapshot",
            ActionKind::Sync => "sync",
            ActionKind::Drill => "drill",
            ActionKind::Verify => "verify",
            ActionKind::Promote => "promote",
        }
    }
}

/// Work for the event loop: requests to the daemon, or quitting.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    Quit,
    FetchDetail(String),
    Snapshot(String),
    Sync(String),
    Drill(String),
    Verify(String),
    /// Promote a standby (without `--force`: the TUI never takes a live lease).
    Promote(String),
    Restore(RestoreRequest),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SortKey {
    Name,
    State,
    Lag,
}

impl SortKey {
    pub fn name(self) -> &'static str {
        match self {
            SortKey::Name => "name",
            SortKey::State => "state",
            SortKey::Lag => "lag",
        }
    }
    fn next(self) -> SortKey {
        match self {
            SortKey::Name => SortKey::State,
            SortKey::State => SortKey::Lag,
            SortKey::Lag => SortKey::Name,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Info,
    Warn,
    Error,
}

impl Level {
    pub fn parse(s: &str) -> Level {
        match s.to_ascii_lowercase().as_str() {
            "error" => Level::Error,
            "warn" | "warning" => Level::Warn,
            _ => Level::Info,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Level::Info => "info",
            Level::Warn => "warn",
            Level::Error => "error",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct LogLine {
    pub time: SystemTime,
    pub level: Level,
    pub db: Option<String>,
    pub message: String,
}

/// The detail pane's data for one database.
#[derive(Debug, Clone)]
pub struct Detail {
    pub db: String,
    pub data: Option<DbDetail>,
    pub error: Option<String>,
    pub loading: bool,
    pub fetched_at: Option<SystemTime>,
}

/// Health, worst last: used for colours and for sorting by state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Health {
    Ok,
    Idle,
    Warn,
    Bad,
}

pub fn db_state_health(state: DbState) -> Health {
    match state {
        DbState::Replicating | DbState::Following => Health::Ok,
        DbState::Error => Health::Bad,
        DbState::Stopped => Health::Idle,
        DbState::Starting | DbState::Restoring | DbState::Waiting | DbState::Bootstrapping => {
            Health::Warn
        }
    }
}

pub fn replica_health(state: ReplicaStateName) -> Health {
    match state {
        ReplicaStateName::Healthy => Health::Ok,
        ReplicaStateName::Retrying => Health::Warn,
        ReplicaStateName::Failed | ReplicaStateName::Conflict => Health::Bad,
        ReplicaStateName::Starting => Health::Idle,
    }
}

/// A database's overall health: its own state and its replicas' states, whichever is worst.
pub fn db_health(db: &DbStatus) -> Health {
    db.replicas
        .iter()
        .map(|r| replica_health(r.state.name()))
        .fold(db_state_health(db.state), Ord::max)
}

pub fn max_lag(db: &DbStatus) -> f64 {
    db.replicas
        .iter()
        .map(|r| r.lag_seconds)
        .fold(0.0, f64::max)
}

// ---------------------------------------------------------------------------------------------
// Restore dialog

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    Replica,
    Generation,
    Target,
    Value,
    Output,
    Integrity,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Latest,
    Time,
    Index,
}

impl Target {
    pub fn name(self) -> &'static str {
        match self {
            Target::Latest => "latest",
            Target::Time => "point in time",
            Target::Index => "WAL index",
        }
    }
}

#[derive(Debug, Clone)]
pub enum Phase {
    Editing {
        error: Option<String>,
    },
    Running {
        stage: String,
        done: u64,
        total: u64,
    },
    Done(Result<RestoreSummary, String>),
}

#[derive(Debug, Clone)]
pub struct RestoreDialog {
    pub db: String,
    /// The live database: never a valid output.
    pub live_path: PathBuf,
    /// Replica names; the choice `None` is "any".
    pub replicas: Vec<String>,
    pub replica: Option<usize>,
    /// Known generations (from `detail`), newest first; the choice `None` is "latest".
    pub generations: Vec<String>,
    pub generation: Option<usize>,
    pub target: Target,
    pub time_text: String,
    pub index_text: String,
    pub output: String,
    pub integrity_check: bool,
    pub focus: Field,
    pub phase: Phase,
    /// The output the running (or finished) restore writes.
    pub started_output: Option<PathBuf>,
}

impl RestoreDialog {
    pub fn fields(&self) -> Vec<Field> {
        let mut f = vec![Field::Replica, Field::Generation, Field::Target];
        if self.target != Target::Latest {
            f.push(Field::Value);
        }
        f.push(Field::Output);
        f.push(Field::Integrity);
        f
    }

    pub fn replica_label(&self) -> &str {
        self.replica
            .and_then(|i| self.replicas.get(i))
            .map(String::as_str)
            .unwrap_or("any")
    }

    pub fn generation_label(&self) -> &str {
        self.generation
            .and_then(|i| self.generations.get(i))
            .map(String::as_str)
            .unwrap_or("latest")
    }

    pub fn is_running(&self) -> bool {
        matches!(self.phase, Phase::Running { .. })
    }

    fn move_focus(&mut self, delta: isize) {
        let fields = self.fields();
        let at = fields.iter().position(|f| *f == self.focus).unwrap_or(0) as isize;
        let n = fields.len() as isize;
        self.focus = fields[((at + delta).rem_euclid(n)) as usize];
    }

    fn cycle(&mut self, delta: isize) {
        fn step(cur: Option<usize>, len: usize, delta: isize) -> Option<usize> {
            // Positions: 0 = None, 1..=len = Some(i - 1).
            let n = len as isize + 1;
            let at = cur.map(|i| i as isize + 1).unwrap_or(0);
            match (at + delta).rem_euclid(n) {
                0 => None,
                p => Some(p as usize - 1),
            }
        }
        match self.focus {
            Field::Replica => {
                self.replica = step(self.replica, self.replicas.len(), delta);
            }
            Field::Generation => {
                self.generation = step(self.generation, self.generations.len(), delta);
            }
            Field::Target => {
                let all = [Target::Latest, Target::Time, Target::Index];
                let at = all.iter().position(|t| *t == self.target).unwrap_or(0) as isize;
                self.target = all[((at + delta).rem_euclid(3)) as usize];
            }
            Field::Integrity => self.integrity_check = !self.integrity_check,
            Field::Value | Field::Output => {}
        }
    }

    fn text_mut(&mut self) -> Option<&mut String> {
        match (self.focus, self.target) {
            (Field::Value, Target::Time) => Some(&mut self.time_text),
            (Field::Value, Target::Index) => Some(&mut self.index_text),
            (Field::Output, _) => Some(&mut self.output),
            _ => None,
        }
    }

    /// Generations offered for the chosen replica (all replicas for "any"), newest first.
    fn set_generations(&mut self, detail: &DbDetail) {
        let keep = self
            .generation
            .and_then(|i| self.generations.get(i))
            .cloned();
        let want = self.replica.and_then(|i| self.replicas.get(i)).cloned();
        let mut gens: Vec<(Option<SystemTime>, String)> = Vec::new();
        for r in &detail.replicas {
            if want.as_ref().is_some_and(|w| *w != r.name) {
                continue;
            }
            for g in &r.generations {
                if !gens.iter().any(|(_, x)| *x == g.generation) {
                    gens.push((g.updated, g.generation.clone()));
                }
            }
        }
        gens.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
        self.generations = gens.into_iter().map(|(_, g)| g).collect();
        self.generation = keep.and_then(|k| self.generations.iter().position(|g| *g == k));
    }

    /// The request the dialog describes, or why it is not valid. A relative output path is
    /// sent as it is: the daemon puts it in its restore directory.
    pub fn request(&self) -> Result<RestoreRequest, String> {
        let (mut index, mut timestamp) = (None, None);
        match self.target {
            Target::Latest => {}
            Target::Time => {
                let t = self.time_text.trim();
                if t.is_empty() {
                    return Err(
                        "enter a point in time (RFC 3339, e.g. 2026-01-02T15:04:05Z)".into(),
                    );
                }
                humantime::parse_rfc3339_weak(t).map_err(|e| {
                    format!("point in time {t:?}: {e} (RFC 3339, e.g. 2026-01-02T15:04:05Z)")
                })?;
                timestamp = Some(t.to_string());
            }
            Target::Index => {
                let t = self.index_text.trim();
                let v = u32::from_str_radix(t.trim_start_matches("0x"), 16)
                    .map_err(|_| format!("WAL index {t:?}: not a hexadecimal number"))?;
                if v > crate::layout::MAX_INDEX {
                    return Err(format!("WAL index {t}: above the 31-bit maximum"));
                }
                index = Some(v);
            }
        }
        let output = resolve_output(&self.output)?;
        check_not_live(&output, &self.live_path)?;
        Ok(RestoreRequest {
            db: self.db.clone(),
            replica: self.replica.and_then(|i| self.replicas.get(i)).cloned(),
            generation: self
                .generation
                .and_then(|i| self.generations.get(i))
                .cloned(),
            index,
            timestamp,
            output,
            integrity_check: self.integrity_check,
        })
    }
}

/// `20261101T120000Z`: a timestamp that sorts and is safe in a file name.
pub fn file_stamp(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t)
        .to_string()
        .chars()
        .filter(|c| *c != '-' && *c != ':')
        .collect()
}

/// The default restore output: a new file `<db name>.restored-<time>.db` in the daemon's restore
/// directory (a relative output goes there; restores over the socket write only into the
/// directories the operator allowed).
pub fn default_output(live: &Path, now: SystemTime) -> PathBuf {
    let mut s = live.file_name().unwrap_or_default().to_os_string();
    s.push(format!(".restored-{}.db", file_stamp(now)));
    PathBuf::from(s)
}

/// `.` and `..` removed without touching the filesystem.
pub fn normalize(p: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                if !out.pop() {
                    out.push("..");
                }
            }
            other => out.push(other),
        }
    }
    out
}

fn resolve_output(text: &str) -> Result<PathBuf, String> {
    let t = text.trim();
    if t.is_empty() {
        return Err("enter an output path for the restored database".into());
    }
    if t.ends_with('/') {
        return Err(format!("{t}: is a directory; give a file name"));
    }
    let p = Path::new(t);
    if !p.is_absolute() && p.components().any(|c| c == Component::ParentDir) {
        return Err(format!(
            "{t}: a relative output is a file in the daemon's restore directory; `..` is not allowed"
        ));
    }
    Ok(normalize(p))
}

/// Refuses the live database and its `-wal`/`-shm` files as an output.
pub fn check_not_live(output: &Path, live: &Path) -> Result<(), String> {
    let live = normalize(live);
    let out = normalize(output);
    let live_s = live.as_os_str().to_string_lossy();
    let out_s = out.as_os_str().to_string_lossy();
    for suffix in ["", "-wal", "-shm", "-journal"] {
        if out_s == format!("{live_s}{suffix}") {
            return Err(format!(
                "{}: that is the live database{}; restore to a new file",
                out.display(),
                if suffix.is_empty() { "" } else { "'s WAL/SHM" }
            ));
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The whole state

pub struct State {
    pub socket: PathBuf,
    /// The clock, set by the event loop (tests fix it).
    pub now: SystemTime,
    pub conn: Conn,
    /// True once a subscription delivered data (stale data is kept while disconnected).
    pub ever_connected: bool,
    pub dbs: Vec<DbStatus>,
    pub selected: Option<String>,
    pub filter: String,
    pub filter_editing: bool,
    pub sort: SortKey,
    pub show_detail: bool,
    pub detail: Option<Detail>,
    pub detail_scroll: u16,
    pub log: VecDeque<LogLine>,
    pub dialog: Option<RestoreDialog>,
    pub help: bool,
    pub quit: bool,
    /// A promotion asked for once: the database and when; the same key again within
    /// [`CONFIRM_WINDOW`] sends it.
    pub promote_armed: Option<(String, SystemTime)>,
}

/// How long a dangerous action waits for its confirming second key press.
pub const CONFIRM_WINDOW: std::time::Duration = std::time::Duration::from_secs(5);

impl State {
    pub fn new(socket: PathBuf, now: SystemTime) -> State {
        State {
            socket,
            now,
            conn: Conn::Connecting,
            ever_connected: false,
            dbs: Vec::new(),
            selected: None,
            filter: String::new(),
            filter_editing: false,
            sort: SortKey::Name,
            show_detail: false,
            detail: None,
            detail_scroll: 0,
            log: VecDeque::new(),
            dialog: None,
            help: false,
            quit: false,
            promote_armed: None,
        }
    }

    pub fn mode(&self) -> Mode {
        if self.help {
            Mode::Help
        } else if self.dialog.is_some() {
            Mode::Restore
        } else if self.filter_editing {
            Mode::Filter
        } else {
            Mode::Normal
        }
    }

    pub fn connected(&self) -> bool {
        self.conn == Conn::Connected
    }

    pub fn log(&mut self, level: Level, db: Option<&str>, message: impl Into<String>) {
        if self.log.len() >= LOG_CAPACITY {
            self.log.pop_front();
        }
        self.log.push_back(LogLine {
            time: self.now,
            level,
            db: db.map(str::to_string),
            message: message.into(),
        });
    }

    /// The databases shown: filtered, then sorted.
    pub fn visible(&self) -> Vec<&DbStatus> {
        let f = self.filter.to_lowercase();
        let mut v: Vec<&DbStatus> = self
            .dbs
            .iter()
            .filter(|d| {
                f.is_empty()
                    || d.name.to_lowercase().contains(&f)
                    || d.shown_state().contains(&f)
                    || d.path.to_string_lossy().to_lowercase().contains(&f)
                    || d.replicas.iter().any(|r| {
                        r.name.to_lowercase().contains(&f) || r.state_name().contains(f.as_str())
                    })
            })
            .collect();
        match self.sort {
            SortKey::Name => v.sort_by(|a, b| a.name.cmp(&b.name)),
            SortKey::State => v.sort_by(|a, b| {
                db_health(b)
                    .cmp(&db_health(a))
                    .then_with(|| a.name.cmp(&b.name))
            }),
            SortKey::Lag => v.sort_by(|a, b| {
                max_lag(b)
                    .total_cmp(&max_lag(a))
                    .then_with(|| a.name.cmp(&b.name))
            }),
        }
        v
    }

    /// Index of the selection in [`State::visible`].
    pub fn selected_index(&self) -> Option<usize> {
        let sel = self.selected.as_ref()?;
        self.visible().iter().position(|d| d.name == *sel)
    }

    pub fn selected_db(&self) -> Option<&DbStatus> {
        let sel = self.selected.as_ref()?;
        self.visible().into_iter().find(|d| d.name == *sel)
    }

    /// Keeps the selection on a visible database (the first one when it disappeared).
    fn fix_selection(&mut self) -> Vec<Effect> {
        let before = self.selected.clone();
        if self.selected_index().is_none() {
            self.selected = self.visible().first().map(|d| d.name.clone());
        }
        if self.selected != before {
            self.selection_changed()
        } else {
            Vec::new()
        }
    }

    fn selection_changed(&mut self) -> Vec<Effect> {
        self.detail_scroll = 0;
        if self.show_detail {
            self.request_detail()
        } else {
            Vec::new()
        }
    }

    fn request_detail(&mut self) -> Vec<Effect> {
        let Some(db) = self.selected.clone() else {
            return Vec::new();
        };
        self.fetch_detail(db)
    }

    fn fetch_detail(&mut self, db: String) -> Vec<Effect> {
        if !self.connected() {
            return Vec::new();
        }
        match &mut self.detail {
            Some(d) if d.db == db => {
                if d.loading {
                    return Vec::new();
                }
                d.loading = true;
            }
            _ => {
                self.detail = Some(Detail {
                    db: db.clone(),
                    data: None,
                    error: None,
                    loading: true,
                    fetched_at: None,
                })
            }
        }
        vec![Effect::FetchDetail(db)]
    }

    fn move_selection(&mut self, delta: isize) -> Vec<Effect> {
        let vis: Vec<String> = self.visible().iter().map(|d| d.name.clone()).collect();
        if vis.is_empty() {
            return Vec::new();
        }
        let at = self.selected_index().map(|i| i as isize).unwrap_or(-1);
        let to = (at + delta).clamp(0, vis.len() as isize - 1) as usize;
        if self.selected.as_deref() == Some(vis[to].as_str()) {
            return Vec::new();
        }
        self.selected = Some(vis[to].clone());
        self.selection_changed()
    }

    /// A message from the daemon side.
    pub fn apply(&mut self, msg: Msg) -> Vec<Effect> {
        match msg {
            Msg::Connected => {
                if self.conn != Conn::Connected {
                    self.log(
                        Level::Info,
                        None,
                        format!("connected to {}", self.socket.display()),
                    );
                }
                self.conn = Conn::Connected;
                self.ever_connected = true;
                if self.show_detail {
                    if let Some(d) = &mut self.detail {
                        d.loading = false; // a request lost with the old connection
                    }
                    return self.request_detail();
                }
                Vec::new()
            }
            Msg::ConnFailed(failure) => {
                let (was_connected, attempts, same) = match &self.conn {
                    Conn::Connected => (true, 0, false),
                    Conn::Connecting => (false, 0, false),
                    Conn::Failed {
                        failure: f,
                        attempts,
                    } => (false, *attempts, *f == failure),
                };
                if !same {
                    let what = self.conn_message(&failure);
                    if was_connected {
                        self.log(
                            Level::Warn,
                            None,
                            format!("connection lost: {what}; retrying every second"),
                        );
                    } else {
                        self.log(Level::Error, None, what);
                    }
                }
                self.conn = Conn::Failed {
                    failure,
                    attempts: attempts.saturating_add(1),
                };
                Vec::new()
            }
            Msg::Status(dbs) => {
                if self.conn != Conn::Connected {
                    // The first push of a subscription is the proof of a connection.
                    let mut e = self.apply(Msg::Connected);
                    self.dbs = dbs;
                    e.extend(self.fix_selection());
                    return e;
                }
                self.dbs = dbs;
                self.fix_selection()
            }
            Msg::Event { level, db, message } => {
                self.log(Level::parse(&level), db.as_deref(), message);
                Vec::new()
            }
            Msg::Detail { db, result } => {
                let result = *result;
                if let Some(dialog) = &mut self.dialog
                    && dialog.db == db
                    && let Ok(d) = &result
                {
                    dialog.set_generations(d);
                }
                let now = self.now;
                match &mut self.detail {
                    Some(d) if d.db == db => {
                        d.loading = false;
                        d.fetched_at = Some(now);
                        match result {
                            Ok(v) => {
                                d.data = Some(v);
                                d.error = None;
                            }
                            Err(e) => d.error = Some(e),
                        }
                    }
                    _ => {
                        let (data, error) = match result {
                            Ok(v) => (Some(v), None),
                            Err(e) => (None, Some(e)),
                        };
                        self.detail = Some(Detail {
                            db,
                            data,
                            error,
                            loading: false,
                            fetched_at: Some(now),
                        });
                    }
                }
                Vec::new()
            }
            Msg::ActionDone { action, db, result } => {
                match result {
                    Ok(v) => {
                        let what = match (action, &v) {
                            (ActionKind::Sync, serde_json::Value::Null) => {
                                "done (nothing to sync)".to_string()
                            }
                            (ActionKind::Sync, v) => {
                                match serde_json::from_value::<crate::layout::Pos>(v.clone()) {
                                    Ok(p) => format!("done, position {p}"),
                                    Err(_) => format!("done: {v}"),
                                }
                            }
                            (ActionKind::Drill, v) => drill_summary(v),
                            (ActionKind::Verify, v) => verify_summary(v),
                            (_, serde_json::Value::String(s)) => s.clone(),
                            (_, v) => format!("done: {v}"),
                        };
                        self.log(Level::Info, Some(&db), format!("{}: {what}", action.name()));
                    }
                    Err(e) => self.log(
                        Level::Error,
                        Some(&db),
                        format!("{} failed: {e}", action.name()),
                    ),
                }
                Vec::new()
            }
            Msg::RestoreProgress { stage, done, total } => {
                if let Some(d) = &mut self.dialog
                    && d.is_running()
                {
                    d.phase = Phase::Running { stage, done, total };
                }
                Vec::new()
            }
            Msg::RestoreDone(result) => {
                let result: Result<RestoreSummary, String> = result.and_then(|v| {
                    serde_json::from_value(v.clone())
                        .map_err(|e| format!("unexpected restore result {v}: {e}"))
                });
                let (db, output) = match &self.dialog {
                    Some(d) => (Some(d.db.clone()), d.started_output.clone()),
                    None => (None, None),
                };
                let out = result
                    .as_ref()
                    .ok()
                    .map(|s| s.output.clone())
                    .filter(|p| !p.as_os_str().is_empty())
                    .or(output)
                    .map(|p| p.display().to_string())
                    .unwrap_or_else(|| "?".into());
                match &result {
                    Ok(s) => self.log(
                        Level::Info,
                        db.as_deref(),
                        format!(
                            "restored to {out} from {} generation {} (WAL up to {:08x}); integrity check {}",
                            s.replica,
                            s.generation,
                            s.max_index,
                            if s.integrity_checked { "ok" } else { "not run" }
                        ),
                    ),
                    Err(e) => self.log(Level::Error, db.as_deref(), format!("restore to {out} failed: {e}")),
                }
                if let Some(d) = &mut self.dialog
                    && d.is_running()
                {
                    d.phase = Phase::Done(result);
                }
                Vec::new()
            }
        }
    }

    /// The sentence for a connection failure.
    pub fn conn_message(&self, f: &ConnFailure) -> String {
        match f {
            ConnFailure::SocketMissing => format!(
                "no control socket at {} — is litestreamd running?",
                self.socket.display()
            ),
            ConnFailure::AccessDenied => format!(
                "access denied to {} — run as root, as the daemon's user, or as a member of its control_group",
                self.socket.display()
            ),
            ConnFailure::Other(e) => e.clone(),
        }
    }

    /// The clock moved: refreshes an open detail pane now and then.
    pub fn tick(&mut self, now: SystemTime) -> Vec<Effect> {
        self.now = now;
        if !self.show_detail || !self.connected() {
            return Vec::new();
        }
        let stale = match &self.detail {
            Some(d) if Some(&d.db) == self.selected.as_ref() => {
                !d.loading
                    && d.fetched_at
                        .is_none_or(|t| now.duration_since(t).unwrap_or_default() >= DETAIL_REFRESH)
            }
            _ => true,
        };
        if stale {
            self.request_detail()
        } else {
            Vec::new()
        }
    }

    /// A key action.
    pub fn handle(&mut self, action: Action) -> Vec<Effect> {
        if action == Action::Quit {
            self.quit = true;
            return vec![Effect::Quit];
        }
        match self.mode() {
            Mode::Help => {
                self.help = false;
                Vec::new()
            }
            Mode::Restore => self.handle_dialog(action),
            Mode::Filter => {
                match action {
                    Action::Char(c) => self.filter.push(c),
                    Action::Backspace => {
                        self.filter.pop();
                    }
                    Action::ClearField => self.filter.clear(),
                    Action::Enter => self.filter_editing = false,
                    Action::Escape => {
                        self.filter.clear();
                        self.filter_editing = false;
                    }
                    Action::Up => return self.move_selection(-1),
                    Action::Down => return self.move_selection(1),
                    _ => return Vec::new(),
                }
                self.fix_selection()
            }
            Mode::Normal => self.handle_normal(action),
        }
    }

    fn handle_normal(&mut self, action: Action) -> Vec<Effect> {
        match action {
            Action::Up => self.move_selection(-1),
            Action::Down => self.move_selection(1),
            Action::PageUp => {
                if self.show_detail {
                    self.detail_scroll = self.detail_scroll.saturating_sub(5);
                    Vec::new()
                } else {
                    self.move_selection(-10)
                }
            }
            Action::PageDown => {
                if self.show_detail {
                    self.detail_scroll = self.detail_scroll.saturating_add(5);
                    Vec::new()
                } else {
                    self.move_selection(10)
                }
            }
            Action::Top => self.move_selection(isize::MIN / 2),
            Action::Bottom => self.move_selection(isize::MAX / 2),
            Action::ToggleDetail | Action::Enter => {
                self.show_detail = !self.show_detail;
                self.detail_scroll = 0;
                if self.show_detail {
                    self.request_detail()
                } else {
                    Vec::new()
                }
            }
            Action::StartFilter => {
                self.filter_editing = true;
                Vec::new()
            }
            Action::Escape => {
                self.filter.clear();
                self.fix_selection()
            }
            Action::CycleSort => {
                self.sort = self.sort.next();
                Vec::new()
            }
            Action::Help => {
                self.help = true;
                Vec::new()
            }
            Action::Snapshot | Action::Sync | Action::Drill | Action::Verify => {
                let kind = match action {
                    Action::Snapshot => ActionKind::Snapshot,
                    Action::Drill => ActionKind::Drill,
                    Action::Verify => ActionKind::Verify,
                    _ => ActionKind::Sync,
                };
                let Some(db) = self.selected_db().map(|d| d.name.clone()) else {
                    self.log(
                        Level::Warn,
                        None,
                        format!("{}: no database selected", kind.name()),
                    );
                    return Vec::new();
                };
                if !self.connected() {
                    self.log(
                        Level::Error,
                        Some(&db),
                        format!("{}: not connected to the daemon", kind.name()),
                    );
                    return Vec::new();
                }
                self.log(Level::Info, Some(&db), format!("{} requested", kind.name()));
                vec![match kind {
                    ActionKind::Snapshot => Effect::Snapshot(db),
                    ActionKind::Sync => Effect::Sync(db),
                    ActionKind::Drill => Effect::Drill(db),
                    ActionKind::Verify => Effect::Verify(db),
                    ActionKind::Promote => Effect::Promote(db),
                }]
            }
            Action::OpenRestore => self.open_restore(),
            Action::Promote => self.promote(),
            _ => Vec::new(),
        }
    }

    /// `P` on a standby arms the promotion, `P` again within [`CONFIRM_WINDOW`] sends it.
    fn promote(&mut self) -> Vec<Effect> {
        let Some(db) = self.selected_db().cloned() else {
            self.log(Level::Warn, None, "promote: no database selected");
            return Vec::new();
        };
        if db.standby.as_ref().is_none_or(|s| s.promoted_at.is_some()) {
            self.log(Level::Warn, Some(&db.name), "promote: not a standby");
            return Vec::new();
        }
        if !self.connected() {
            self.log(
                Level::Error,
                Some(&db.name),
                "promote: not connected to the daemon",
            );
            return Vec::new();
        }
        let armed = self.promote_armed.take().is_some_and(|(name, at)| {
            name == db.name
                && self
                    .now
                    .duration_since(at)
                    .is_ok_and(|d| d <= CONFIRM_WINDOW)
        });
        if !armed {
            self.promote_armed = Some((db.name.clone(), self.now));
            self.log(
                Level::Warn,
                Some(&db.name),
                "promote: press P again within 5 s to make this standby the primary (it waits for the old primary's lease; `litestreamd promote --force` takes it at once)",
            );
            return Vec::new();
        }
        self.log(Level::Info, Some(&db.name), "promote requested");
        vec![Effect::Promote(db.name)]
    }

    /// Opens the restore dialog for the selected database with safe defaults.
    pub fn open_restore(&mut self) -> Vec<Effect> {
        let Some(db) = self.selected_db().cloned() else {
            self.log(Level::Warn, None, "restore: no database selected");
            return Vec::new();
        };
        let mut dialog = RestoreDialog {
            db: db.name.clone(),
            live_path: db.path.clone(),
            replicas: db.replicas.iter().map(|r| r.name.clone()).collect(),
            replica: None,
            generations: Vec::new(),
            generation: None,
            target: Target::Latest,
            time_text: humantime::format_rfc3339_seconds(self.now).to_string(),
            index_text: String::new(),
            output: default_output(&db.path, self.now).display().to_string(),
            integrity_check: true,
            focus: Field::Replica,
            phase: Phase::Editing { error: None },
            started_output: None,
        };
        if let Some(Detail {
            db: d,
            data: Some(detail),
            ..
        }) = &self.detail
            && *d == db.name
        {
            dialog.set_generations(detail);
        }
        self.dialog = Some(dialog);
        // The generations come from a fresh listing.
        match &mut self.detail {
            Some(d) if d.db == db.name && d.loading => Vec::new(),
            _ => self.fetch_detail(db.name),
        }
    }

    fn handle_dialog(&mut self, action: Action) -> Vec<Effect> {
        let connected = self.connected();
        let detail = self.detail.clone();
        let Some(d) = &mut self.dialog else {
            return Vec::new();
        };
        match &d.phase {
            Phase::Running { .. } => {
                if action == Action::Escape {
                    let db = d.db.clone();
                    self.dialog = None;
                    self.log(
                        Level::Info,
                        Some(&db),
                        "restore dialog closed; the restore goes on in the daemon",
                    );
                }
                return Vec::new();
            }
            Phase::Done(_) => {
                if matches!(action, Action::Escape | Action::Enter) {
                    self.dialog = None;
                }
                return Vec::new();
            }
            Phase::Editing { .. } => {}
        }
        match action {
            Action::Escape => {
                self.dialog = None;
                return Vec::new();
            }
            Action::Down | Action::NextField => d.move_focus(1),
            Action::Up | Action::PrevField => d.move_focus(-1),
            Action::Left => d.cycle(-1),
            Action::Right => d.cycle(1),
            Action::Char(' ') if d.text_mut().is_none() => d.cycle(1),
            Action::Char(c) => {
                if let Some(t) = d.text_mut() {
                    t.push(c);
                }
            }
            Action::Backspace => {
                if let Some(t) = d.text_mut() {
                    t.pop();
                }
            }
            Action::ClearField => {
                if let Some(t) = d.text_mut() {
                    t.clear();
                }
            }
            Action::Enter => {
                if !connected {
                    d.phase = Phase::Editing {
                        error: Some("not connected to the daemon".into()),
                    };
                    return Vec::new();
                }
                return match d.request() {
                    Ok(req) => {
                        d.phase = Phase::Running {
                            stage: "starting".into(),
                            done: 0,
                            total: 0,
                        };
                        d.started_output = Some(req.output.clone());
                        let db = d.db.clone();
                        self.log(
                            Level::Info,
                            Some(&db),
                            format!("restore to {} started", req.output.display()),
                        );
                        vec![Effect::Restore(req)]
                    }
                    Err(e) => {
                        d.phase = Phase::Editing { error: Some(e) };
                        Vec::new()
                    }
                };
            }
            _ => return Vec::new(),
        }
        // Replica changes narrow the generations to that replica's.
        if d.focus == Field::Replica
            && let Some(Detail {
                db,
                data: Some(detail),
                ..
            }) = &detail
            && *db == d.db
        {
            d.set_generations(detail);
        }
        if !d.fields().contains(&d.focus) {
            d.focus = Field::Target;
        }
        d.phase = Phase::Editing { error: None };
        Vec::new()
    }
}

/// A drill reply (one `DrillStatus` per replica) in one log line.
fn drill_summary(v: &serde_json::Value) -> String {
    let Ok(list) = serde_json::from_value::<Vec<crate::status::DrillStatus>>(v.clone()) else {
        return format!("done: {v}");
    };
    list.iter()
        .enumerate()
        .map(|(i, d)| {
            let mut s = format!(
                "#{} {} in {:.1}s",
                i + 1,
                d.result.as_str(),
                d.duration_seconds
            );
            if let Some(r) = &d.reason {
                s.push_str(&format!(": {r}"));
            }
            s
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// A verify reply (`{"grade", "replicas": [{"replica", "grade", ...}], "errors"}`) in one line.
fn verify_summary(v: &serde_json::Value) -> String {
    let mut parts: Vec<String> = v["replicas"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|r| {
                    format!(
                        "{} {}",
                        r["replica"].as_str().unwrap_or("?"),
                        r["grade"].as_str().unwrap_or("?").to_uppercase()
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    if let Some(errs) = v["errors"].as_array() {
        parts.extend(
            errs.iter()
                .filter_map(|e| e.as_str())
                .map(|e| format!("error: {e}")),
        );
    }
    if parts.is_empty() {
        format!("done: {v}")
    } else {
        parts.join("; ")
    }
}
