//! The control socket inside the daemon. Each connection is checked with SO_PEERCRED (root, the
//! daemon's own user, or a member of the configured group), then served line by line: requests
//! run concurrently in their own tasks and all replies go through one writer task, so a long
//! restore or a subscription never blocks other requests, and a slow or silent client never
//! blocks a worker (workers are only ever read through their status snapshots).

use std::collections::BTreeMap;
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
use tokio_util::codec::{FramedRead, LinesCodec, LinesCodecError};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::protocol::{
    Body, Command, DbDetail, ErrorCode, GenerationDetail, MAX_LINE, ReplicaDetail, Request,
    Response, RestoreRequest, VERSION,
};
use crate::restore::{self, RestoreOptions, RestoreOutcome};
use crate::supervisor::ReloadReport;
use crate::worker::{DbSpec, DbStatus, WorkerHandle};

/// What the server can see of a running database.
#[derive(Clone)]
pub struct DbEntry {
    pub handle: WorkerHandle,
    pub spec: DbSpec,
}

/// The running databases, kept current by the supervisor.
pub type Registry = Arc<RwLock<BTreeMap<String, DbEntry>>>;

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
    fn allows(&self, uid: u32, gid: u32) -> bool {
        if uid == 0 || uid == self.uid {
            return true;
        }
        let Some(want) = self.gid else { return false };
        if gid == want {
            return true;
        }
        // Supplementary groups of the peer's user.
        let Ok(Some(user)) = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid)) else {
            return false;
        };
        let Ok(name) = std::ffi::CString::new(user.name) else {
            return false;
        };
        nix::unistd::getgrouplist(&name, user.gid)
            .map(|gs| gs.iter().any(|g| g.as_raw() == want))
            .unwrap_or(false)
    }
}

/// Binds the socket (mode `mode`, group `group`) and serves it until `shutdown`.
pub fn serve(
    path: &Path,
    mode: u32,
    group: Option<&str>,
    registry: Registry,
    reload: mpsc::Sender<ReloadRequest>,
    shutdown: CancellationToken,
) -> Result<tokio::task::JoinHandle<()>, ControlError> {
    let io_err = |source| ControlError::Io {
        path: path.to_path_buf(),
        source,
    };
    match std::fs::symlink_metadata(path) {
        // Only a leftover socket is removed, never another kind of file.
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path).map_err(io_err)?,
        Ok(_) => {
            return Err(ControlError::NotASocket {
                path: path.to_path_buf(),
            });
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(e)),
    }
    let gid = match group {
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
    let listener = UnixListener::bind(path).map_err(io_err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(io_err)?;
    if let Some(gid) = gid {
        nix::unistd::chown(path, None, Some(nix::unistd::Gid::from_raw(gid)))
            .map_err(|e| io_err(io::Error::from(e)))?;
    }
    let access = Access {
        uid: nix::unistd::geteuid().as_raw(),
        gid,
    };
    info!(path = %path.display(), mode = format!("{mode:o}"), group = group.unwrap_or("-"), "control socket listening");
    let path = path.to_path_buf();
    Ok(tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => {
                        let (registry, reload, access, shutdown) = (registry.clone(), reload.clone(), access.clone(), shutdown.clone());
                        tokio::spawn(async move { connection(stream, access, registry, reload, shutdown).await });
                    }
                    Err(e) => {
                        warn!(error = %e, "control socket accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
            }
        }
        let _ = std::fs::remove_file(&path);
    }))
}

async fn connection(
    stream: UnixStream,
    access: Access,
    registry: Registry,
    reload: mpsc::Sender<ReloadRequest>,
    shutdown: CancellationToken,
) {
    let cred = match stream.peer_cred() {
        Ok(c) => c,
        Err(e) => {
            warn!(error = %e, "cannot read control peer credentials; closing");
            return;
        }
    };
    let (r, mut w) = stream.into_split();
    if !access.allows(cred.uid(), cred.gid()) {
        warn!(uid = cred.uid(), gid = cred.gid(), pid = ?cred.pid(), "control connection refused: not root, the daemon's user, or in control_group");
        let _ = write_line(
            &mut w,
            &Response::error(0, ErrorCode::AccessDenied, "access denied"),
        )
        .await;
        return;
    }
    debug!(uid = cred.uid(), pid = ?cred.pid(), "control connection");
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
    let mut lines = FramedRead::new(r, LinesCodec::new_with_max_length(MAX_LINE));
    let mut tasks = JoinSet::new();
    let subscriptions = shutdown.child_token();
    loop {
        let line = tokio::select! {
            _ = shutdown.cancelled() => break,
            l = lines.next() => l,
        };
        match line {
            None => break, // the client closed (or half-closed) its side
            Some(Err(LinesCodecError::MaxLineLengthExceeded)) => {
                let _ = tx
                    .send(Response::error(
                        0,
                        ErrorCode::TooLarge,
                        format!("request longer than {MAX_LINE} bytes"),
                    ))
                    .await;
                break;
            }
            Some(Err(LinesCodecError::Io(e))) => {
                debug!(error = %e, "control connection read error");
                break;
            }
            Some(Ok(line)) if line.trim().is_empty() => {}
            Some(Ok(line)) => match parse(&line) {
                Ok(req) => {
                    let (tx, registry, reload, subs) = (
                        tx.clone(),
                        registry.clone(),
                        reload.clone(),
                        subscriptions.clone(),
                    );
                    tasks.spawn(async move { handle(req, tx, registry, reload, subs).await });
                }
                Err(resp) => {
                    let _ = tx.send(resp).await;
                }
            },
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
    "reload",
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
    registry: Registry,
    reload: mpsc::Sender<ReloadRequest>,
    subs: CancellationToken,
) {
    let id = req.id;
    let not_found =
        |db: &str| Response::error(id, ErrorCode::NotFound, format!("no database named {db:?}"));
    let resp = match req.cmd {
        Command::Status => Response::ok(id, statuses(&registry)),
        Command::Detail { db } => match entry(&registry, &db) {
            Some(e) => Response::ok(id, detail(&e).await),
            None => not_found(&db),
        },
        Command::Snapshot { db } => match entry(&registry, &db) {
            Some(e) => match e.handle.snapshot_now().await {
                Ok(()) => Response::ok(id, "snapshot written"),
                Err(m) => Response::error(id, ErrorCode::Failed, m),
            },
            None => not_found(&db),
        },
        Command::Sync { db } => match entry(&registry, &db) {
            Some(e) => match e.handle.sync_now().await {
                Ok(pos) => Response::ok(id, pos),
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
        Command::Restore(r) => match entry(&registry, &r.db) {
            Some(e) => run_restore(id, e, r, &tx).await,
            None => not_found(&r.db),
        },
        Command::Subscribe => {
            subscribe(id, &registry, &tx, subs).await;
            return;
        }
    };
    let _ = tx.send(resp).await;
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
) -> Response {
    let live = std::fs::canonicalize(&e.spec.path).unwrap_or_else(|_| e.spec.path.clone());
    let out = std::path::absolute(&r.output).unwrap_or_else(|_| r.output.clone());
    let out_canon = out
        .parent()
        .and_then(|p| std::fs::canonicalize(p).ok())
        .map(|p| p.join(out.file_name().unwrap_or_default()));
    if out == e.spec.path || out_canon.as_ref() == Some(&live) {
        return Response::error(
            id,
            ErrorCode::Failed,
            "refusing to restore over the live database; choose another output path",
        );
    }
    let mut opts = RestoreOptions::new(&out);
    opts.generation = r.generation;
    opts.index = r.index;
    opts.integrity_check = r.integrity_check;
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
    info!(db = %r.db, output = %out.display(), "restore requested over the control socket");
    // Restore runs in its own task (its heavy parts in spawn_blocking): replication goes on.
    match tokio::spawn(async move { restore::restore(&replicas, &opts).await }).await {
        Ok(Ok(RestoreOutcome::Restored(s))) => Response::ok(id, s),
        Ok(Ok(other)) => Response::error(id, ErrorCode::Failed, format!("{other:?}")),
        Ok(Err(err)) => Response::error(id, ErrorCode::Failed, err.to_string()),
        Err(err) => Response::error(id, ErrorCode::Failed, format!("restore task failed: {err}")),
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
            let level = if n.state == "error" { "error" } else { "info" };
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
                .map(|x| x.state_name());
            if before != Some(r.state_name()) {
                let level = match r.state_name() {
                    "failed" | "conflict" => "error",
                    "retrying" => "warn",
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
