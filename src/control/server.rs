//! The control socket server: binds the unix socket, checks each peer with
//! SO_PEERCRED, reads bounded NDJSON request lines, forwards them to the
//! supervisor and writes its replies back.
//!
//! Every client has its own task; nothing a client sends (garbage, a huge
//! line, silence) affects the accept loop or other clients.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use nix::unistd::Gid;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;

use super::proto::{ErrorBody, Reply, Request, Response, MAX_REQUEST_BYTES, PROTOCOL_VERSION};
use super::ControlRequest;

/// At most this many clients at once; more get an error line and are closed.
pub const MAX_CLIENTS: usize = 256;

/// A client that has not sent a complete request for this long is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(300);

/// Why the control socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// Another zdt answers on the socket.
    #[error(
        "another zdt is already running and answering on {path}; stop it first \
         (zdtctl -s {path} shutdown), or set another `control` path"
    )]
    AlreadyRunning {
        /// The socket path.
        path: PathBuf,
    },
    /// Something that is not a socket is in the way.
    #[error("{path} exists and is not a socket; move it away or set another `control` path")]
    NotASocket {
        /// The path.
        path: PathBuf,
    },
    /// Binding or preparing the socket failed.
    #[error("cannot create the control socket {path}: {source}")]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
}

/// Who may use the control socket.
#[derive(Clone, Debug)]
pub struct PeerPolicy {
    /// zdt's own effective uid.
    pub own_uid: u32,
    /// Members of this group may too.
    pub group: Option<Gid>,
}

impl PeerPolicy {
    /// Root, zdt's own user, or a member of the control group.
    pub fn allows(&self, uid: u32, gid: u32) -> bool {
        if uid == 0 || uid == self.own_uid {
            return true;
        }
        let Some(group) = self.group else {
            return false;
        };
        if gid == group.as_raw() {
            return true;
        }
        let user = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
            .ok()
            .flatten();
        let Some(user) = user else { return false };
        let Ok(name) = std::ffi::CString::new(user.name) else {
            return false;
        };
        nix::unistd::getgrouplist(&name, user.gid)
            .map(|groups| groups.contains(&group))
            .unwrap_or(false)
    }
}

/// Binds the control socket at `path`, replacing a stale socket left by a
/// crashed zdt and refusing when a live zdt answers there.
pub fn bind(path: &Path, mode: u32, group: Option<Gid>) -> Result<UnixListener, ControlError> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let bind_err = |source| ControlError::Bind {
        path: path.to_path_buf(),
        source,
    };
    // A folder another user can write to would let them swap the socket
    // for a symlink between bind and chmod/chown below.
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        crate::rundir::trusted_dir(parent).map_err(|e| bind_err(e.into()))?;
    }
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(ControlError::NotASocket {
                path: path.to_path_buf(),
            });
        }
        match std::os::unix::net::UnixStream::connect(path) {
            Ok(_) => {
                return Err(ControlError::AlreadyRunning {
                    path: path.to_path_buf(),
                })
            }
            Err(_) => std::fs::remove_file(path).map_err(bind_err)?,
        }
    }
    let listener = UnixListener::bind(path).map_err(bind_err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(bind_err)?;
    if let Some(gid) = group {
        nix::unistd::chown(path, None, Some(gid)).map_err(|e| bind_err(e.into()))?;
    }
    Ok(listener)
}

/// The control socket an earlier binary of this zdt bound at `path` (see
/// [`crate::upgrade`]).
pub fn from_fd(fd: std::os::fd::OwnedFd, path: &Path) -> Result<UnixListener, ControlError> {
    let bind_err = |source| ControlError::Bind {
        path: path.to_path_buf(),
        source,
    };
    let std = std::os::unix::net::UnixListener::from(fd);
    std.set_nonblocking(true).map_err(bind_err)?;
    UnixListener::from_std(std).map_err(bind_err)
}

/// Accepts clients until `shutdown` is cancelled.
pub async fn serve(
    listener: UnixListener,
    requests: mpsc::Sender<ControlRequest>,
    policy: PeerPolicy,
    shutdown: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(MAX_CLIENTS));
    let mut backoff = Duration::from_millis(100);
    loop {
        let stream = tokio::select! {
            () = shutdown.cancelled() => return,
            r = listener.accept() => match r {
                Ok((s, _)) => { backoff = Duration::from_millis(100); s }
                Err(e) => {
                    let exhausted = matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM));
                    tracing::warn!(cause = %e, "control socket accept failed");
                    if exhausted {
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(1));
                    }
                    continue;
                }
            },
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            tokio::spawn(refuse(
                stream,
                ErrorBody::new("busy", "too many control clients; try again"),
            ));
            continue;
        };
        let (requests, policy, shutdown) = (requests.clone(), policy.clone(), shutdown.clone());
        tokio::spawn(async move {
            let _permit = permit;
            tokio::select! {
                () = shutdown.cancelled() => {}
                r = client(stream, requests, policy) => if let Err(e) = r {
                    tracing::debug!(cause = %e, "control client ended");
                },
            }
        });
    }
}

async fn write_reply<W: AsyncWriteExt + Unpin>(w: &mut W, reply: Reply) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(&Response {
        version: PROTOCOL_VERSION,
        reply,
    })
    .map_err(std::io::Error::other)?;
    line.push(b'\n');
    w.write_all(&line).await?;
    w.flush().await
}

async fn refuse(mut stream: UnixStream, error: ErrorBody) {
    let _ = write_reply(&mut stream, Reply::Error { error }).await;
}

/// Reads one line of at most `max` bytes. Ok(None) at EOF; Err(too_large) if
/// the line is longer (nothing beyond `max` is buffered).
pub(crate) async fn read_line<R: AsyncBufReadExt + Unpin>(
    r: &mut R,
    buf: &mut Vec<u8>,
    max: usize,
) -> std::io::Result<Option<bool>> {
    buf.clear();
    loop {
        let chunk = r.fill_buf().await?;
        if chunk.is_empty() {
            return Ok(if buf.is_empty() { None } else { Some(true) });
        }
        let (take, done) = match chunk.iter().position(|&b| b == b'\n') {
            Some(i) => (i + 1, true),
            None => (chunk.len(), false),
        };
        if buf.len() + take > max {
            return Ok(Some(false));
        }
        buf.extend_from_slice(&chunk[..take]);
        r.consume(take);
        if done {
            return Ok(Some(true));
        }
    }
}

async fn client(
    stream: UnixStream,
    requests: mpsc::Sender<ControlRequest>,
    policy: PeerPolicy,
) -> std::io::Result<()> {
    let cred = stream.peer_cred()?;
    let (rd, mut wr) = stream.into_split();
    if !policy.allows(cred.uid(), cred.gid()) {
        let msg = format!("uid {} may not use this control socket", cred.uid());
        let hint = match policy.group {
            Some(g) => format!("ask for membership of the control group (gid {g}), or use sudo"),
            None => "use sudo, or set control_group in [supervisor]".to_string(),
        };
        let body = ErrorBody::new("permission", msg).with_hint(hint);
        return write_reply(&mut wr, Reply::Error { error: body }).await;
    }
    let mut rd = BufReader::new(rd);
    let mut buf = Vec::new();
    loop {
        let line = match tokio::time::timeout(
            IDLE_TIMEOUT,
            read_line(&mut rd, &mut buf, MAX_REQUEST_BYTES),
        )
        .await
        {
            Err(_) | Ok(Ok(None)) => return Ok(()),
            Ok(Err(e)) => return Err(e),
            Ok(Ok(Some(false))) => {
                let body = ErrorBody::new(
                    "too_large",
                    format!(
                        "request longer than {MAX_REQUEST_BYTES} bytes; closing the connection"
                    ),
                );
                return write_reply(&mut wr, Reply::Error { error: body }).await;
            }
            Ok(Ok(Some(true))) => &buf,
        };
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let request = match parse(line) {
            Ok(r) => r,
            Err(body) => {
                write_reply(&mut wr, Reply::Error { error: body }).await?;
                continue;
            }
        };
        crate::metrics::global().control_request(request.command.name());
        let (tx, mut rx) = mpsc::channel(64);
        let sent = requests
            .send(ControlRequest {
                command: request.command,
                replies: tx,
                peer_uid: cred.uid(),
            })
            .await;
        if sent.is_err() {
            let body = ErrorBody::new("failed", "zdt is shutting down");
            return write_reply(&mut wr, Reply::Error { error: body }).await;
        }
        let mut finished = false;
        while let Some(reply) = rx.recv().await {
            finished = reply.is_final();
            // A write error means the client went away: dropping `rx` tells
            // the supervisor (tail -f stops).
            write_reply(&mut wr, reply).await?;
            if finished {
                break;
            }
        }
        if !finished {
            let body = ErrorBody::new("failed", "request ended without a reply");
            write_reply(&mut wr, Reply::Error { error: body }).await?;
        }
    }
}

pub(crate) fn parse(line: &[u8]) -> Result<Request, ErrorBody> {
    let value: serde_json::Value = serde_json::from_slice(line)
        .map_err(|e| ErrorBody::new("bad_request", format!("invalid JSON: {e}")))?;
    let version = value.get("version").and_then(serde_json::Value::as_u64);
    if version != Some(u64::from(PROTOCOL_VERSION)) {
        return Err(ErrorBody::new(
            "version",
            format!("protocol version {version:?} is not supported; this zdt speaks version {PROTOCOL_VERSION}"),
        )
        .with_hint("use the zdtctl that came with this zdt"));
    }
    serde_json::from_value(value)
        .map_err(|e| ErrorBody::new("bad_request", format!("bad request: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_rejects_bad_input_by_kind() {
        assert_eq!(parse(b"nope").expect_err("garbage").kind, "bad_request");
        assert_eq!(
            parse(b"{\"version\":2,\"cmd\":\"version\"}")
                .expect_err("v2")
                .kind,
            "version"
        );
        assert_eq!(
            parse(b"{\"cmd\":\"version\"}")
                .expect_err("no version")
                .kind,
            "version"
        );
        assert_eq!(
            parse(b"{\"version\":1,\"cmd\":\"dance\"}")
                .expect_err("cmd")
                .kind,
            "bad_request"
        );
        assert!(parse(b"{\"version\":1,\"cmd\":\"status\"}\n").is_ok());
    }

    #[tokio::test]
    async fn read_line_caps_length_without_buffering_more() {
        let data = vec![b'x'; 100_000];
        let mut r = BufReader::new(&data[..]);
        let mut buf = Vec::new();
        let got = read_line(&mut r, &mut buf, MAX_REQUEST_BYTES)
            .await
            .expect("read");
        assert_eq!(got, Some(false));
        assert!(buf.len() <= MAX_REQUEST_BYTES);
        let mut r = BufReader::new(&b"a\nb\n"[..]);
        assert_eq!(
            read_line(&mut r, &mut buf, 10).await.expect("read"),
            Some(true)
        );
        assert_eq!(buf, b"a\n");
    }

    #[test]
    fn peer_policy() {
        let p = PeerPolicy {
            own_uid: 1000,
            group: None,
        };
        assert!(p.allows(0, 0));
        assert!(p.allows(1000, 5));
        assert!(!p.allows(1001, 1001));
        let p = PeerPolicy {
            own_uid: 1000,
            group: Some(Gid::from_raw(50)),
        };
        assert!(p.allows(1001, 50));
    }
}
