//! The control client used by `zdtctl` and the tests.

use std::path::{Path, PathBuf};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;

use super::proto::{Command, ErrorBody, Outcome, Reply, Request, Response, PROTOCOL_VERSION};

/// Why a request got no answer.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing answers on the socket (no such file, connection refused, …).
    #[error("cannot reach zdt at {path}: {source} (is zdt running? start it with `zdt -c supervisor.toml`)")]
    Unreachable {
        /// The socket tried.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The socket (or a folder on its path) may not be used by this user.
    #[error("permission denied on the control socket {path}: {source} (run zdtctl as root with sudo, or as zdt's own user; to let a group use it, set control_group and control_mode = \"0660\" under [supervisor])")]
    PermissionDenied {
        /// The socket tried.
        path: PathBuf,
        /// The OS error (EACCES or EPERM).
        source: std::io::Error,
    },
    /// Reading or writing failed.
    #[error("control connection failed: {0}")]
    Io(#[from] std::io::Error),
    /// The daemon sent something that is not a reply.
    #[error("zdt sent a bad reply: {0}")]
    Protocol(String),
    /// The daemon closed the connection before the final reply.
    #[error("zdt closed the connection before answering (it may be shutting down)")]
    Closed,
}

/// A connection to the daemon.
pub struct Client {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
}

impl Client {
    /// Connects to the control socket at `path`.
    pub async fn connect(path: &Path) -> Result<Client, ClientError> {
        let stream = UnixStream::connect(path).await.map_err(|source| {
            let path = path.to_path_buf();
            match source.kind() {
                std::io::ErrorKind::PermissionDenied => {
                    ClientError::PermissionDenied { path, source }
                }
                _ => ClientError::Unreachable { path, source },
            }
        })?;
        let (r, w) = stream.into_split();
        Ok(Client {
            reader: BufReader::new(r),
            writer: w,
        })
    }

    /// Sends one request; calls `on_reply` for each progress or log reply and
    /// returns the final one.
    pub async fn request(
        &mut self,
        command: Command,
        mut on_reply: impl FnMut(&Reply),
    ) -> Result<Result<Outcome, ErrorBody>, ClientError> {
        let mut line = serde_json::to_vec(&Request {
            version: PROTOCOL_VERSION,
            command,
        })
        .map_err(|e| ClientError::Protocol(e.to_string()))?;
        line.push(b'\n');
        self.writer.write_all(&line).await?;
        let mut buf = String::new();
        loop {
            buf.clear();
            if self.reader.read_line(&mut buf).await? == 0 {
                return Err(ClientError::Closed);
            }
            let resp: Response = serde_json::from_str(&buf)
                .map_err(|e| ClientError::Protocol(format!("{e}: {}", buf.trim_end())))?;
            match resp.reply {
                Reply::Ok { result } => return Ok(Ok(result)),
                Reply::Error { error } => return Ok(Err(error)),
                other => on_reply(&other),
            }
        }
    }
}
