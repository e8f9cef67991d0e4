//! The control socket inside the daemon. Each connection is checked with SO_PEERCRED (root, the
//! daemon's own user, or a member of the configured group), then served line by line: requests
//! run concurrently in their own tasks and all replies go through one writer task, so a long
//! restore or a subscription never blocks other requests, and a slow or silent client never
//! blocks a worker (workers are only ever read through their status snapshots).

use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures::StreamExt;
use thiserror::Error;
use tokio::io::AsyncWriteExt;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use tokio_util::codec::{AnyDelimiterCodec, AnyDelimiterCodecError, FramedRead};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::peer::{Peer, Want};
use super::protocol::{
    Body, Command, DbDetail, ErrorCode, GenerationDetail, MAX_LINE, ReplicaDetail, Request,
    Response, RestoreRequest, VERSION, VerifyRequest,
};
use crate::restore::{self, Output, Ownership, RestoreOptions, RestoreOutcome};
use crate::status::{DbState, DbStatus, ReplicaStateName};
use crate::supervisor::{DbEntry, Registry, ReloadReport};

/// A reload request to the supervisor loop, answered with its report.
pub type ReloadRequest = oneshot::Sender<ReloadReport>;

#[derive(Debug, Error)]
pub enum ControlError {
    #[error("{path}: exists and is not a socket; refusing to replace it")]
    NotASocket { path: PathBuf },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("control_group {0:?}: no such group")]
    NoSuchGroup(String),
}

/// Who may connect besides root.
#[derive(Debug, Clone)]
struct Access {
    uid: u32,
    gid: Option<u32>,
}

impl Access {
    fn allows(&self, peer: &Peer) -> bool {
        peer.uid == 0 || peer.uid == self.uid || self.gid.is_some_and(|g| peer.in_group(g))
    }
    /// Root and the daemon's own user: they can read and write whatever the daemon can.
    fn privileged(&self, peer: &Peer) -> bool {
        peer.uid == 0 || peer.uid == self.uid
    }
}

/// Where and for whom restores requested over the socket may write (see the threat model in
/// `docs/operations.md`). Kept current by the daemon across reloads.
#[derive(Debug, Clone, Default)]
pub struct RestorePolicy {
    /// Allowed directories; a relative output goes into the first.
    pub dirs: Vec<PathBuf>,
    /// Also each database's own directory (never over the database itself).
    pub in_db_dir: bool,
    /// `control_group` members may restore (databases they can read, into directories they
    /// can write); otherwise only root and the daemon's user.
    pub members: bool,
}

impl RestorePolicy {
    pub fn from_config(main: &crate::config::MainConfig) -> Self {
        RestorePolicy {
            dirs: main.restore_dirs(),
            in_db_dir: main.restore_in_db_dir,
            members: main.control_restore == crate::config::ControlRestore::Readers,
        }
    }
}

pub type SharedPolicy = Arc<RwLock<RestorePolicy>>;

/// How the socket is set up and how many clients it serves.
#[derive(Debug, Clone)]
pub struct Settings {
    pub path: PathBuf,
    /// Octal mode of the socket file.
    pub mode: u32,
    /// Group allowed besides root and the daemon's user.
    pub group: Option<String>,
    /// Connections served at once; more are refused with an error line. Each costs a file
    /// descriptor, so this keeps clients from eating the databases' descriptor budget.
    pub max_connections: usize,
    /// A connection with no request, no subscription and no restore for this long is closed;
    /// zero: never.
    pub idle_timeout: Duration,
}

/// Counts events and says when to log them: at most once per interval, with the count.
struct Throttle {
    every: Duration,
    last: Option<std::time::Instant>,
    count: u64,
}

impl Throttle {
    fn new(every: Duration) -> Self {
        Throttle {
            every,
            last: None,
            count: 0,
        }
    }
    /// Notes one event; Some(events since the last log) when it is time to log.
    fn note(&mut self) -> Option<u64> {
        self.count += 1;
        if self.last.is_some_and(|t| t.elapsed() < self.every) {
            return None;
        }
        self.last = Some(std::time::Instant::now());
        Some(std::mem::take(&mut self.count))
    }
}

/// Binds the socket and serves it until `shutdown`.
pub fn serve(
    settings: Settings,
    registry: Registry,
    policy: SharedPolicy,
    reload: mpsc::Sender<ReloadRequest>,
    shutdown: CancellationToken,
) -> Result<tokio::task::JoinHandle<()>, ControlError> {
    let path = settings.path.clone();
    let io_err = |source| ControlError::Io {
        path: path.clone(),
        source,
    };
    match std::fs::symlink_metadata(&path) {
        // Only a leftover socket is removed, never another kind of file.
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(&path).map_err(io_err)?,
        Ok(_) => {
            return Err(ControlError::NotASocket { path: path.clone() });
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(e)),
    }
    let gid = match &settings.group {
        Some(g) => Some(
            nix::unistd::Group::from_name(g)
                .ok()
                .flatten()
                .ok_or_else(|| ControlError::NoSuchGroup(g.to_string()))?
                .gid
                .as_raw(),
        ),
        None => None,
    };
    let listener = UnixListener::bind(&path).map_err(io_err)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(settings.mode))
        .map_err(io_err)?;
    if let Some(gid) = gid {
        nix::unistd::chown(&path, None, Some(nix::unistd::Gid::from_raw(gid)))
            .map_err(|e| io_err(io::Error::from(e)))?;
    }
    let access = Access {
        uid: nix::unistd::geteuid().as_raw(),
        gid,
    };
    info!(path = %path.display(), mode = format!("{:o}", settings.mode), group = settings.group.as_deref().unwrap_or("-"), max_connections = settings.max_connections, "control socket listening");
    let permits = Arc::new(tokio::sync::Semaphore::new(settings.max_connections.max(1)));
    let idle = (!settings.idle_timeout.is_zero()).then_some(settings.idle_timeout);
    Ok(tokio::spawn(async move {
        let mut refused = Throttle::new(Duration::from_secs(60));
        let mut failed = Throttle::new(Duration::from_secs(60));
        let mut backoff = Duration::from_millis(50);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => {
                        backoff = Duration::from_millis(50);
                        let Ok(permit) = permits.clone().try_acquire_owned() else {
                            if let Some(n) = refused.note() {
                                warn!(refused = n, limit = settings.max_connections, "control socket: connections refused, too many open (control_max_connections); logged at most once a minute");
                            }
                            // The client gets a reason if its socket buffer takes it (never
                            // waited for), and the descriptor goes back at once.
                            let resp = Response::error(0, ErrorCode::Failed, "too many control connections; try again later");
                            if let Ok(mut line) = serde_json::to_string(&resp) {
                                line.push('\n');
                                let _ = stream.try_write(line.as_bytes());
                            }
                            drop(stream);
                            continue;
                        };
                        let ctx = Ctx { access: access.clone(), registry: registry.clone(), policy: policy.clone(), reload: reload.clone() };
                        let shutdown = shutdown.clone();
                        tokio::spawn(async move {
                            connection(stream, ctx, shutdown, idle).await;
                            drop(permit);
                        });
                    }
                    Err(e) => {
                        // Out of descriptors (EMFILE/ENFILE) or another accept failure: the
                        // pending connection stays queued, so back off instead of spinning,
                        // and say so once a minute, not once per attempt.
                        if let Some(n) = failed.note() {
                            warn!(error = %e, failures = n, "control socket accept failed; backing off (logged at most once a minute)");
                        }
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(1));
                    }
                },
            }
        }
        let _ = std::fs::remove_file(&path);
    }))
}

/// What every request of a connection can reach.
#[derive(Clone)]
struct Ctx {
    access: Access,
    registry: Registry,
    policy: SharedPolicy,
    reload: mpsc::Sender<ReloadRequest>,
}

async fn connection(
    stream: UnixStream,
    ctx: Ctx,
    shutdown: CancellationToken,
    idle: Option<Duration>,
) {
    let peer = match Peer::of(&stream) {
        Ok(c) => c,
        Err(e) => {
            warn!(error = %e, "cannot read control peer credentials; closing");
            return;
        }
    };
    let (r, mut w) = stream.into_split();
    if !ctx.access.allows(&peer) {
        warn!(uid = peer.uid, gid = peer.gid, pid = ?peer.pid, "control connection refused: not root, the daemon's user, or in control_group");
        let _ = write_line(
            &mut w,
            &Response::error(0, ErrorCode::AccessDenied, "access denied"),
        )
        .await;
        return;
    }
    debug!(uid = peer.uid, pid = ?peer.pid, "control connection");
    let (tx, mut rx) = mpsc::channel::<Response>(64);
    let writer = tokio::spawn(async move {
        while let Some(resp) = rx.recv().await {
            // A client that stops reading is dropped rather than allowed to back up its tasks.
            match tokio::time::timeout(Duration::from_secs(10), write_line(&mut w, &resp)).await {
                Ok(Ok(())) => {}
                _ => break,
            }
        }
    });
    // Lines are framed as bytes and decoded here, so a line that is not UTF-8 gets an error
    // reply like any other bad request instead of ending the connection.
    let mut lines = FramedRead::new(
        r,
        AnyDelimiterCodec::new_with_max_length(b"\n".to_vec(), b"\n".to_vec(), MAX_LINE),
    );
    let mut tasks = JoinSet::new();
    let subscriptions = shutdown.child_token();
    let peer = Arc::new(peer);
    let idle_deadline = || idle.map(|d| tokio::time::Instant::now() + d);
    let mut deadline = idle_deadline();
    loop {
        let line = tokio::select! {
            _ = shutdown.cancelled() => break,
            // A connection with nothing in flight and no request for `idle` is closed: an
            // idle client cannot hold a descriptor (and a connection slot) forever.
            _ = async { tokio::time::sleep_until(deadline.expect("guarded")).await }, if deadline.is_some() && tasks.is_empty() => {
                debug!(uid = peer.uid, pid = ?peer.pid, "closing an idle control connection");
                break;
            }
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {
                if tasks.is_empty() {
                    deadline = idle_deadline();
                }
                continue;
            }
            l = lines.next() => l,
        };
        deadline = idle_deadline();
        match line {
            None => break, // the client closed (or half-closed) its side
            Some(Err(AnyDelimiterCodecError::MaxChunkLengthExceeded)) => {
                let _ = tx
                    .send(Response::error(
                        0,
                        ErrorCode::TooLarge,
                        format!("request longer than {MAX_LINE} bytes"),
                    ))
                    .await;
                break;
            }
            Some(Err(AnyDelimiterCodecError::Io(e))) => {
                debug!(error = %e, "control connection read error");
                break;
            }
            Some(Ok(bytes)) => {
                let Ok(line) = std::str::from_utf8(&bytes) else {
                    let _ = tx
                        .send(Response::error(
                            0,
                            ErrorCode::BadRequest,
                            "request is not valid UTF-8",
                        ))
                        .await;
                    continue;
                };
                if line.trim().is_empty() {
                    continue;
                }
                match parse(line) {
                    Ok(req) => {
                        let (tx, ctx, subs, peer) =
                            (tx.clone(), ctx.clone(), subscriptions.clone(), peer.clone());
                        tasks.spawn(async move { handle(req, tx, ctx, &peer, subs).await });
                    }
                    Err(resp) => {
                        let _ = tx.send(resp).await;
                    }
                }
            }
        }
    }
    // Input is over: stop pushing status, finish what was asked (a restore), then close.
    subscriptions.cancel();
    while tasks.join_next().await.is_some() {}
    drop(tx);
    let _ = writer.await;
}

async fn write_line(w: &mut tokio::net::unix::OwnedWriteHalf, resp: &Response) -> io::Result<()> {
    let mut line = serde_json::to_string(resp).map_err(io::Error::other)?;
    line.push('\n');
    w.write_all(line.as_bytes()).await
}

const COMMANDS: &[&str] = &[
    "status",
    "detail",
    "subscribe",
    "restore",
    "snapshot",
    "sync",
    "drill",
    "verify",
    "reload",
    "promote",
    "handoff",
];

/// Parses a request line, or produces the error reply for it.
fn parse(line: &str) -> Result<Request, Response> {
    let value: serde_json::Value = serde_json::from_str(line)
        .map_err(|e| Response::error(0, ErrorCode::BadRequest, format!("invalid JSON: {e}")))?;
    let id = value.get("id").and_then(|v| v.as_u64()).unwrap_or(0);
    match value.get("v").and_then(|v| v.as_u64()) {
        Some(v) if v == VERSION as u64 => {}
        Some(v) => {
            return Err(Response::error(
                id,
                ErrorCode::UnsupportedVersion,
                format!("protocol version {v} is not supported; this daemon speaks {VERSION}"),
            ));
        }
        None => {
            return Err(Response::error(
                id,
                ErrorCode::BadRequest,
                "missing protocol version \"v\"",
            ));
        }
    }
    match value.get("cmd").and_then(|c| c.as_str()) {
        Some(c) if !COMMANDS.contains(&c) => {
            return Err(Response::error(
                id,
                ErrorCode::UnknownCommand,
                format!("unknown command {c:?}"),
            ));
        }
        None => {
            return Err(Response::error(
                id,
                ErrorCode::BadRequest,
                "missing \"cmd\"",
            ));
        }
        _ => {}
    }
    serde_json::from_value(value)
        .map_err(|e| Response::error(id, ErrorCode::BadRequest, e.to_string()))
}

fn entry(registry: &Registry, db: &str) -> Option<DbEntry> {
    registry.read().expect("registry").get(db).cloned()
}

fn statuses(registry: &Registry) -> Vec<DbStatus> {
    registry
        .read()
        .expect("registry")
        .values()
        .map(|e| e.handle.status())
        .collect()
}

async fn handle(
    req: Request,
    tx: mpsc::Sender<Response>,
    ctx: Ctx,
    peer: &Peer,
    subs: CancellationToken,
) {
    let (registry, reload) = (&ctx.registry, &ctx.reload);
    let id = req.id;
    if !matches!(
        req.cmd,
        Command::Status | Command::Detail { .. } | Command::Subscribe
    ) {
        // Every request that changes something is logged with who asked.
        info!(uid = peer.uid, pid = ?peer.pid, request = ?req.cmd, "control request");
    }
    let not_found =
        |db: &str| Response::error(id, ErrorCode::NotFound, format!("no database named {db:?}"));
    let resp = match req.cmd {
        Command::Status => Response::ok(id, statuses(registry)),
        Command::Detail { db } => match entry(registry, &db) {
            Some(e) => Response::ok(id, detail(&e).await),
            None => not_found(&db),
        },
        Command::Snapshot { db } => match entry(registry, &db) {
            Some(e) => match e.handle.snapshot_now().await {
                Ok(()) => Response::ok(id, "snapshot written"),
                Err(m) => Response::error(id, ErrorCode::Failed, m),
            },
            None => not_found(&db),
        },
        Command::Drill { db } => match entry(registry, &db) {
            Some(e) => match e.handle.drill_now().await {
                Ok(results) => Response::ok(id, results),
                Err(m) => Response::error(id, ErrorCode::Failed, m),
            },
            None => not_found(&db),
        },
        Command::Verify(r) => match entry(registry, &r.db) {
            Some(e) => match run_verify(&e, &r).await {
                Ok(v) => Response::ok(id, v),
                Err(m) => Response::error(id, ErrorCode::BadRequest, m),
            },
            None => not_found(&r.db),
        },
        Command::Sync { db } => match entry(registry, &db) {
            Some(e) => match e.handle.sync_now().await {
                Ok(pos) => Response::ok(id, pos),
                Err(m) => Response::error(id, ErrorCode::Failed, m),
            },
            None => not_found(&db),
        },
        Command::Promote { db, force } => match entry(registry, &db) {
            // A promotion decides which host writes the backups: not for control_group.
            Some(_) if !ctx.access.privileged(peer) => Response::error(
                id,
                ErrorCode::AccessDenied,
                format!(
                    "uid {}: promote is for root and the daemon's user",
                    peer.uid
                ),
            ),
            Some(e) => match e.handle.promote(force).await {
                Ok(m) => Response::ok(id, m),
                Err(m) => Response::error(id, ErrorCode::Failed, m),
            },
            None => not_found(&db),
        },
        Command::Handoff { db } => match entry(registry, &db) {
            Some(_) if !ctx.access.privileged(peer) => Response::error(
                id,
                ErrorCode::AccessDenied,
                format!(
                    "uid {}: handoff is for root and the daemon's user",
                    peer.uid
                ),
            ),
            Some(e) => match e.handle.handoff().await {
                Ok(m) => Response::ok(id, m),
                Err(m) => Response::error(id, ErrorCode::Failed, m),
            },
            None => not_found(&db),
        },
        Command::Reload => {
            let (otx, orx) = oneshot::channel();
            match reload.send(otx).await {
                Ok(()) => match orx.await {
                    Ok(report) => Response::ok(id, report),
                    Err(_) => Response::error(id, ErrorCode::Failed, "the daemon is shutting down"),
                },
                Err(_) => Response::error(id, ErrorCode::Failed, "the daemon is shutting down"),
            }
        }
        Command::Restore(r) => match entry(registry, &r.db) {
            Some(e) => run_restore(id, e, r, &tx, &ctx, peer).await,
            None => not_found(&r.db),
        },
        Command::Subscribe => {
            subscribe(id, registry, &tx, subs).await;
            return;
        }
    };
    let _ = tx.send(resp).await;
}

/// A verify requested over the socket: every replica (or the one named) with the worker's own
/// clients; each replica's result goes to the worker for the status and the metrics. The reply
/// is what `litestreamd verify --json` prints.
async fn run_verify(e: &DbEntry, r: &VerifyRequest) -> Result<serde_json::Value, String> {
    use crate::status::{VerifyResult, VerifyStatus};
    use crate::verify::{self, Grade, ReadData, VerifyOptions};
    let read_data: ReadData = r.read_data.as_deref().unwrap_or("none").parse()?;
    let opts = VerifyOptions {
        generation: r.generation.clone(),
        read_data,
        ..Default::default()
    };
    if let Some(want) = &r.replica
        && !e.spec.replicas.iter().any(|(o, _)| o.name == *want)
    {
        return Err(format!("{}: no replica named {want:?}", e.spec.name));
    }
    let (mut reports, mut errors, mut results) = (Vec::new(), Vec::new(), Vec::new());
    for (i, (o, client)) in e.spec.replicas.iter().enumerate() {
        if r.replica.as_ref().is_some_and(|w| *w != o.name) {
            continue;
        }
        let started = std::time::Instant::now();
        let res = verify::verify(&o.name, client, &opts).await;
        let (result, message) = match &res {
            Ok(rep) => (
                match rep.grade {
                    Grade::Ok => VerifyResult::Ok,
                    Grade::Warning => VerifyResult::Warning,
                    Grade::Failure => VerifyResult::Failure,
                },
                rep.generations
                    .iter()
                    .flat_map(|g| &g.findings)
                    .find(|f| f.grade == rep.grade && rep.grade != Grade::Ok)
                    .map(|f| match &f.object {
                        Some(obj) => format!("{obj}: {}", f.message),
                        None => f.message.clone(),
                    }),
            ),
            Err(err) => (VerifyResult::Error, Some(err.to_string())),
        };
        let now = std::time::SystemTime::now();
        results.push((
            i,
            VerifyStatus {
                result,
                finished_at: Some(now),
                last_success: matches!(result, VerifyResult::Ok | VerifyResult::Warning)
                    .then_some(now),
                duration_seconds: started.elapsed().as_secs_f64(),
                read_data: r.read_data.clone().unwrap_or_else(|| "none".into()),
                message,
            },
        ));
        match res {
            Ok(rep) => reports.push(rep),
            Err(err) => errors.push(err.to_string()),
        }
    }
    e.handle.record_verify(results).await;
    let worst = reports.iter().map(|r| r.grade).max().unwrap_or(Grade::Ok);
    Ok(serde_json::json!({"grade": worst, "replicas": reports, "errors": errors}))
}

async fn detail(e: &DbEntry) -> DbDetail {
    let mut replicas = Vec::new();
    for (opts, client) in &e.spec.replicas {
        let mut d = ReplicaDetail {
            name: opts.name.clone(),
            url: client.url(),
            error: None,
            generations: Vec::new(),
        };
        let listed = async {
            for g in client.generations().await? {
                let snapshots = client.snapshots(&g).await?;
                let segs = client.wal_segments(&g).await?;
                let times = snapshots
                    .iter()
                    .map(|s| s.created_at)
                    .chain(segs.iter().map(|s| s.created_at));
                d.generations.push(GenerationDetail {
                    generation: g,
                    segments: segs.len(),
                    wal_first: segs.first().map(|s| (s.index, s.offset)),
                    wal_last: segs.last().map(|s| (s.index, s.offset)),
                    created: times.clone().min(),
                    updated: times.max(),
                    snapshots,
                });
            }
            Ok::<_, crate::replica::StoreError>(())
        }
        .await;
        if let Err(err) = listed {
            d.error = Some(err.to_string());
        }
        d.generations.sort_by_key(|g| std::cmp::Reverse(g.updated));
        replicas.push(d);
    }
    DbDetail {
        status: e.handle.status(),
        replicas,
    }
}

async fn run_restore(
    id: u64,
    e: DbEntry,
    r: RestoreRequest,
    tx: &mpsc::Sender<Response>,
    ctx: &Ctx,
    peer: &Peer,
) -> Response {
    let policy = ctx.policy.read().expect("policy").clone();
    let privileged = ctx.access.privileged(peer);
    let denied = |m: String| {
        warn!(uid = peer.uid, pid = ?peer.pid, db = %r.db, output = %r.output.display(), reason = %m, "restore over the control socket refused");
        Response::error(id, ErrorCode::AccessDenied, m)
    };
    if !privileged && !policy.members {
        return denied(format!(
            "uid {}: restores over the control socket are for root and the daemon's user (control_restore = \"privileged\"); run `litestreamd restore` yourself, or ask the operator",
            peer.uid
        ));
    }
    if r.output.as_os_str().is_empty() {
        return Response::error(id, ErrorCode::BadRequest, "output: no path given");
    }
    let Some(first_dir) = policy.dirs.first().cloned() else {
        return denied("no restore directory is configured (restore_dirs)".into());
    };
    // A relative output goes into the first restore directory.
    let wanted = if r.output.is_absolute() {
        r.output.clone()
    } else {
        first_dir.join(&r.output)
    };
    // Opened only (nothing is created) until the checks below pass.
    let w = wanted.clone();
    let mut output = match tokio::task::spawn_blocking(move || Output::open(&w))
        .await
        .expect("output task")
    {
        Ok(o) => o,
        Err(err) => return Response::error(id, ErrorCode::Failed, err.to_string()),
    };
    // Where the output really is: its directory's handle, after every symlink and `..` on the
    // way (the last component is never followed: it must not exist at all).
    let live = std::fs::canonicalize(&e.spec.path).unwrap_or_else(|_| e.spec.path.clone());
    let mut allowed: Vec<PathBuf> = policy
        .dirs
        .iter()
        .filter_map(|d| std::fs::canonicalize(d).ok())
        .collect();
    if policy.in_db_dir
        && let Some(parent) = live.parent()
    {
        allowed.push(parent.to_path_buf());
    }
    if !allowed.iter().any(|a| output.dir().starts_with(a)) {
        return denied(format!(
            "{}: the output resolves into {}, which is not a restore directory (allowed: {})",
            wanted.display(),
            output.dir().display(),
            if allowed.is_empty() {
                "none exists".to_string()
            } else {
                allowed
                    .iter()
                    .map(|a| a.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        ));
    }
    let out = output.final_path();
    let live_name = live.as_os_str().to_string_lossy().into_owned();
    if ["", "-wal", "-shm", "-journal"]
        .iter()
        .any(|s| out.as_os_str().to_string_lossy() == format!("{live_name}{s}"))
    {
        return Response::error(
            id,
            ErrorCode::Failed,
            "refusing to restore over the live database; choose another output path",
        );
    }
    let source = std::fs::metadata(&live).ok();
    if !privileged {
        // The peer gets nothing they could not have on their own: they must be able to create
        // files in the output's directory and to read the database being restored.
        if let Err(m) = peer.check(output.dir(), Want::WriteDir) {
            return denied(m);
        }
        if source.is_none() {
            return denied(format!(
                "{}: the database file does not exist, so there is no way to check that uid {} may read it; ask root or the daemon's user to restore it",
                live.display(),
                peer.uid
            ));
        }
        if let Err(m) = peer.check(&live, Want::Read) {
            return denied(m);
        }
    }
    if let Err(err) = output.lock() {
        return Response::error(id, ErrorCode::Failed, err.to_string());
    }
    // Never broader than the source: its permission bits and group; the requester as owner
    // (when the daemon may give files away, i.e. runs as root).
    let uid = (nix::unistd::geteuid().is_root()).then_some(peer.uid);
    let ownership = match &source {
        Some(m) => {
            use std::os::unix::fs::MetadataExt;
            Ownership {
                uid,
                gid: Some(m.gid()),
                mode: m.mode() & 0o666,
            }
        }
        None => Ownership {
            uid,
            gid: None,
            mode: 0o600,
        },
    };
    let mut opts = RestoreOptions::new(&out);
    opts.generation = r.generation;
    opts.index = r.index;
    opts.integrity_check = r.integrity_check;
    opts.ownership = Some(ownership);
    if let Some(ts) = &r.timestamp {
        match humantime::parse_rfc3339_weak(ts) {
            Ok(t) => opts.timestamp = Some(t),
            Err(err) => {
                return Response::error(
                    id,
                    ErrorCode::BadRequest,
                    format!("timestamp {ts:?}: {err}"),
                );
            }
        }
    }
    let progress_tx = tx.clone();
    opts.progress = Some(Arc::new(move |p: &restore::RestoreProgress| {
        let _ = progress_tx.try_send(Response::push(
            id,
            Body::Progress {
                stage: p.stage.to_string(),
                done: p.done,
                total: p.total,
            },
        ));
    }));
    let replicas: Vec<restore::NamedReplica> = e
        .spec
        .replicas
        .iter()
        .filter(|(o, _)| r.replica.as_ref().is_none_or(|want| *want == o.name))
        .map(|(o, c)| (o.name.clone(), c.clone()))
        .collect();
    if replicas.is_empty() {
        return Response::error(
            id,
            ErrorCode::NotFound,
            format!(
                "database {} has no replica {:?}",
                r.db,
                r.replica.unwrap_or_default()
            ),
        );
    }
    info!(db = %r.db, output = %out.display(), uid = peer.uid, pid = ?peer.pid, "restore requested over the control socket");
    // Restore runs in its own task (its heavy parts in spawn_blocking): replication goes on.
    match tokio::spawn(async move { restore::restore_to(&replicas, &opts, output).await }).await {
        Ok(Ok(RestoreOutcome::Restored(s))) => Response::ok(id, s),
        Ok(Ok(other)) => Response::error(id, ErrorCode::Failed, format!("{other:?}")),
        Ok(Err(err)) => Response::error(id, ErrorCode::Failed, err.to_string()),
        Err(err) => Response::error(id, ErrorCode::Failed, format!("restore task failed: {err}")),
    }
}

/// Creates the default restore directory if it is missing: sticky and writable by the control
/// group (like /tmp, for that group only), so members can remove the restores they own and
/// nobody can rename or remove anyone else's. Failures are logged; restores then fail with a
/// clear error when they need it.
pub fn ensure_restore_dir(dir: &Path, group: Option<&str>) {
    use std::os::unix::fs::DirBuilderExt;
    if dir.exists() {
        return;
    }
    let made = std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o750)
        .create(dir)
        .and_then(|()| {
            if let Some(g) = group.and_then(|g| nix::unistd::Group::from_name(g).ok().flatten()) {
                nix::unistd::chown(dir, None, Some(g.gid)).map_err(io::Error::from)?;
                std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o1770))?;
            }
            Ok(())
        });
    match made {
        Ok(()) => info!(dir = %dir.display(), "created the restore directory"),
        Err(e) => {
            debug!(dir = %dir.display(), error = %e, "cannot create the restore directory")
        }
    }
}

/// Pushes the statuses when they change (checked twice a second) and events for state changes.
async fn subscribe(
    id: u64,
    registry: &Registry,
    tx: &mpsc::Sender<Response>,
    stop: CancellationToken,
) {
    let mut last: Option<Vec<DbStatus>> = None;
    loop {
        let now = statuses(registry);
        if last.as_ref() != Some(&now) {
            for ev in events(last.as_deref().unwrap_or(&[]), &now, last.is_none()) {
                if tx.send(Response::push(id, ev)).await.is_err() {
                    return;
                }
            }
            if tx
                .send(Response::push(
                    id,
                    Body::Status {
                        databases: now.clone(),
                    },
                ))
                .await
                .is_err()
            {
                return;
            }
            last = Some(now);
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    }
}

/// Events between two status snapshots: database and replica state changes, new generations.
fn events(old: &[DbStatus], new: &[DbStatus], first: bool) -> Vec<Body> {
    let mut out = Vec::new();
    if first {
        return out;
    }
    let ev = |level: &str, db: &str, message: String| Body::Event {
        level: level.into(),
        db: Some(db.into()),
        message,
    };
    for n in new {
        let Some(o) = old.iter().find(|o| o.name == n.name) else {
            out.push(ev("info", &n.name, "database added".into()));
            continue;
        };
        if o.state != n.state {
            let level = if n.state == DbState::Error {
                "error"
            } else {
                "info"
            };
            let why = n
                .last_error
                .as_deref()
                .map(|e| format!(": {e}"))
                .unwrap_or_default();
            out.push(ev(
                level,
                &n.name,
                format!("{} -> {}{why}", o.state, n.state),
            ));
        }
        if let (Some(os), Some(ns)) = (&o.standby, &n.standby) {
            if ns.bootstraps > os.bootstraps {
                out.push(ev(
                    "warn",
                    &n.name,
                    format!(
                        "standby bootstrapped from the newest snapshot ({})",
                        ns.last_bootstrap.as_deref().unwrap_or("-")
                    ),
                ));
            }
            if os.promoted_at.is_none() && ns.promoted_at.is_some() {
                out.push(ev("warn", &n.name, "standby promoted to primary".into()));
            }
        }
        let (og, ng) = (
            o.pos.as_ref().map(|p| &p.generation),
            n.pos.as_ref().map(|p| &p.generation),
        );
        if og.is_some() && og != ng {
            out.push(ev(
                "warn",
                &n.name,
                format!("new generation {}", ng.map(String::as_str).unwrap_or("-")),
            ));
        }
        for r in &n.replicas {
            let before = o
                .replicas
                .iter()
                .find(|x| x.name == r.name)
                .map(|x| x.state.name());
            if before != Some(r.state.name()) {
                let level = match r.state.name() {
                    ReplicaStateName::Failed | ReplicaStateName::Conflict => "error",
                    ReplicaStateName::Retrying => "warn",
                    _ => "info",
                };
                let why = r
                    .last_error
                    .as_deref()
                    .filter(|_| level != "info")
                    .map(|e| format!(": {e}"))
                    .unwrap_or_default();
                out.push(ev(
                    level,
                    &n.name,
                    format!("replica {} {}{why}", r.name, r.state_name()),
                ));
            }
        }
    }
    for o in old {
        if !new.iter().any(|n| n.name == o.name) {
            out.push(ev("info", &o.name, "database removed".into()));
        }
    }
    out
}
