//! A client of the control socket, used by `litestreamd status`, the dashboard and tests.

use std::io;
use std::path::{Path, PathBuf};

use futures::StreamExt;
use thiserror::Error;
use tokio::io::AsyncWriteExt;
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio_util::codec::{FramedRead, LinesCodec, LinesCodecError};

use super::protocol::{
    Body, Command, DbDetail, ErrorCode, MAX_RESPONSE, Request, Response, RestoreRequest, VERSION,
};
use crate::status::{DbStatus, DrillStatus};

#[derive(Debug, Error)]
pub enum ClientError {
    #[error("{0}: no control socket (is litestreamd running? is control_socket set the same?)")]
    SocketMissing(PathBuf),
    #[error(
        "{0}: access denied (run as root, as the daemon's user, or as a member of its control group)"
    )]
    AccessDenied(PathBuf),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the daemon closed the connection")]
    Closed,
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("{code:?}: {message}")]
    Remote { code: ErrorCode, message: String },
}

pub struct Client {
    path: PathBuf,
    /// Lines of at most `MAX_RESPONSE` bytes: a daemon (or anything listening on the socket)
    /// cannot make the client buffer without bound.
    lines: FramedRead<OwnedReadHalf, LinesCodec>,
    writer: OwnedWriteHalf,
    next_id: u64,
}

impl Client {
    pub async fn connect(path: &Path) -> Result<Client, ClientError> {
        let stream = UnixStream::connect(path)
            .await
            .map_err(|e| match e.kind() {
                io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => {
                    ClientError::SocketMissing(path.to_path_buf())
                }
                io::ErrorKind::PermissionDenied => ClientError::AccessDenied(path.to_path_buf()),
                _ => ClientError::Io {
                    path: path.to_path_buf(),
                    source: e,
                },
            })?;
        let (r, w) = stream.into_split();
        Ok(Client {
            path: path.to_path_buf(),
            lines: FramedRead::new(r, LinesCodec::new_with_max_length(MAX_RESPONSE)),
            writer: w,
            next_id: 1,
        })
    }

    /// Sends a command; returns its id (responses and pushes carry it).
    pub async fn send(&mut self, cmd: Command) -> Result<u64, ClientError> {
        let id = self.next_id;
        self.next_id += 1;
        let mut line = serde_json::to_string(&Request {
            v: VERSION,
            id,
            cmd,
        })
        .map_err(|e| ClientError::Protocol(e.to_string()))?;
        line.push('\n');
        self.writer
            .write_all(line.as_bytes())
            .await
            .map_err(|e| self.io(e))?;
        Ok(id)
    }

    /// The next message from the daemon.
    pub async fn next(&mut self) -> Result<Response, ClientError> {
        let line = match self.lines.next().await {
            None => return Err(ClientError::Closed),
            Some(Ok(l)) => l,
            Some(Err(LinesCodecError::MaxLineLengthExceeded)) => {
                return Err(ClientError::Protocol(format!(
                    "response longer than {MAX_RESPONSE} bytes"
                )));
            }
            Some(Err(LinesCodecError::Io(e))) => return Err(self.io(e)),
        };
        let resp: Response = serde_json::from_str(&line)
            .map_err(|e| ClientError::Protocol(format!("{e}: {line}")))?;
        if let Body::Error {
            code: ErrorCode::AccessDenied,
            ..
        } = &resp.body
        {
            return Err(ClientError::AccessDenied(self.path.clone()));
        }
        Ok(resp)
    }

    /// Sends a command and waits for its final reply, passing pushed messages to `on_push`.
    pub async fn call(
        &mut self,
        cmd: Command,
        mut on_push: impl FnMut(&Body),
    ) -> Result<serde_json::Value, ClientError> {
        let id = self.send(cmd).await?;
        loop {
            let r = self.next().await?;
            if r.id != id {
                continue;
            }
            match r.body {
                Body::Ok { result } => return Ok(result),
                Body::Error { code, message } => return Err(ClientError::Remote { code, message }),
                other => on_push(&other),
            }
        }
    }

    pub async fn status(&mut self) -> Result<Vec<DbStatus>, ClientError> {
        let v = self.call(Command::Status, |_| {}).await?;
        serde_json::from_value(v).map_err(|e| ClientError::Protocol(e.to_string()))
    }

    pub async fn detail(&mut self, db: &str) -> Result<DbDetail, ClientError> {
        let v = self.call(Command::Detail { db: db.into() }, |_| {}).await?;
        serde_json::from_value(v).map_err(|e| ClientError::Protocol(e.to_string()))
    }

    /// Runs a restore drill of every replica of `db` now and waits for it.
    pub async fn drill(&mut self, db: &str) -> Result<Vec<DrillStatus>, ClientError> {
        let v = self.call(Command::Drill { db: db.into() }, |_| {}).await?;
        serde_json::from_value(v).map_err(|e| ClientError::Protocol(e.to_string()))
    }

    /// Promotes the standby `db` and waits until it replicates as the primary.
    pub async fn promote(&mut self, db: &str, force: bool) -> Result<String, ClientError> {
        let v = self
            .call(
                Command::Promote {
                    db: db.into(),
                    force,
                },
                |_| {},
            )
            .await?;
        serde_json::from_value(v).map_err(|e| ClientError::Protocol(e.to_string()))
    }

    /// Hands the primary `db` over to a standby and waits until it is done.
    pub async fn handoff(&mut self, db: &str) -> Result<String, ClientError> {
        let v = self
            .call(Command::Handoff { db: db.into() }, |_| {})
            .await?;
        serde_json::from_value(v).map_err(|e| ClientError::Protocol(e.to_string()))
    }

    pub async fn restore(
        &mut self,
        req: RestoreRequest,
        on_push: impl FnMut(&Body),
    ) -> Result<serde_json::Value, ClientError> {
        self.call(Command::Restore(req), on_push).await
    }

    fn io(&self, e: io::Error) -> ClientError {
        ClientError::Io {
            path: self.path.clone(),
            source: e,
        }
    }
}
