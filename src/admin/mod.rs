//! The admin listener (`[supervisor] admin`): read-only HTTP for what sits
//! outside zdt — a load balancer's health check, Prometheus, a dashboard.
//!
//! - `GET /health`: 200 while this host serves; 503 from the moment zdt
//!   begins to shut down (SIGTERM, `zdtctl shutdown`; for `drain_delay` before
//!   anything stops), or when a program with `listen` addresses does not
//!   serve (see [`crate::state::ProgramSnapshot::serving`]: drained,
//!   stopped or stopping, in maintenance, no instance RUNNING).
//! - `GET /health/PROGRAM`: the same for one program (404 if unknown).
//! - `GET /metrics`: Prometheus text format ([`scrape`]).
//! - `GET /status`: what `zdtctl status --json` prints.
//!
//! Nothing here changes anything: there is no control over TCP. Each
//! answer is built from a `status` request sent to the supervisor over the
//! same channel the control socket uses (the supervisor answers it from
//! published snapshots, even while a restart runs), plus the host's
//! [`HostState`], which the supervisor publishes on a `watch`.

pub mod agent;
pub mod procstat;
pub mod scrape;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode};
use tokio::sync::{mpsc, watch, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::config::ListenAddr;
use crate::control::proto::{Command, Outcome, Reply};
use crate::control::ControlRequest;
use crate::program::ProgramHandle;
use crate::state::ProgramSnapshot;

/// The admin listener's accept queue: health checks and scrapes, few at once.
const ADMIN_BACKLOG: u32 = 128;
/// Clients served at once; more are closed at accept.
const MAX_CLIENTS: usize = 256;
/// How long a client may take to send a request head (a health checker
/// sends its at once; a client that sends nothing frees its place soon).
const HEADER_TIMEOUT: Duration = Duration::from_secs(3);
/// How long an answer may wait for the supervisor.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// What the host as a whole is doing, published by the supervisor.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HostState {
    /// The supervisor has published its programs: the admin listener and
    /// the agent accept only from then on (before, a check waits in the
    /// backlog rather than hear of a host without programs).
    pub started: bool,
    /// zdt is shutting down (from the first moment: before `drain_delay`).
    pub shutting_down: bool,
    /// The programs with `listen` addresses: the ones `/health` asks about.
    pub listening: Vec<String>,
}

/// Why the admin listener could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("admin listener {addr}: {source}")]
pub struct AdminError {
    addr: String,
    source: std::io::Error,
}

/// A bound admin listener.
#[derive(Debug)]
pub enum Listener {
    /// A TCP address.
    Tcp(tokio::net::TcpListener),
    /// A unix socket.
    Unix(tokio::net::UnixListener),
}

/// Binds `addr`: a TCP address as every listening socket of zdt's
/// ([`crate::listen::bind`]), a unix socket with the control socket's checks
/// (a trusted folder, a live socket never replaced; mode 0660).
pub fn bind(addr: &ListenAddr) -> Result<Listener, AdminError> {
    match addr {
        ListenAddr::Tcp(_) => {
            let fd = crate::listen::bind(addr, Some(ADMIN_BACKLOG), 0o660, None).map_err(|e| {
                AdminError {
                    addr: addr.to_string(),
                    source: std::io::Error::other(e.to_string()),
                }
            })?;
            Listener::from_fd(fd, addr)
        }
        ListenAddr::Unix(path) => crate::control::server::bind(path, 0o660, None)
            .map(Listener::Unix)
            .map_err(|e| AdminError {
                addr: addr.to_string(),
                source: std::io::Error::other(e.to_string()),
            }),
    }
}

impl Listener {
    /// Takes over a listening socket carried across an upgrade.
    pub fn from_fd(fd: std::os::fd::OwnedFd, addr: &ListenAddr) -> Result<Self, AdminError> {
        let err = |source| AdminError {
            addr: addr.to_string(),
            source,
        };
        match addr {
            ListenAddr::Tcp(_) => {
                let l = std::net::TcpListener::from(fd);
                l.set_nonblocking(true).map_err(err)?;
                tokio::net::TcpListener::from_std(l)
                    .map(Listener::Tcp)
                    .map_err(err)
            }
            ListenAddr::Unix(_) => {
                let l = std::os::unix::net::UnixListener::from(fd);
                l.set_nonblocking(true).map_err(err)?;
                tokio::net::UnixListener::from_std(l)
                    .map(Listener::Unix)
                    .map_err(err)
            }
        }
    }

    /// The socket's fd (an upgrade carries it).
    pub fn raw_fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd;
        match self {
            Self::Tcp(l) => l.as_raw_fd(),
            Self::Unix(l) => l.as_raw_fd(),
        }
    }
}

/// What the handlers need.
#[derive(Clone, Debug)]
pub struct Admin {
    /// Requests to the supervisor (the control socket's channel; the
    /// supervisor holds the receiver), for `/status`.
    pub requests: mpsc::Sender<ControlRequest>,
    /// The host's state; the supervisor holds the sender.
    pub host: watch::Receiver<HostState>,
    /// The program actors' handles, published by the supervisor: `/health`
    /// and `/metrics` read their snapshots without asking the supervisor,
    /// so they answer while it is busy (an upgrade).
    pub programs: watch::Receiver<Arc<Vec<ProgramHandle>>>,
    /// The proxy (its process's pid for `/metrics`).
    pub proxy: crate::proxy::Proxy,
    /// Stops the accepting before an upgrade's exec.
    pub pause: Pause,
}

/// Lets an upgrade stop the admin listener's accepting (connections then
/// wait in the backlog for the next binary) and wait for the connections
/// it has to end. Clones share it.
#[derive(Clone, Debug, Default)]
pub struct Pause {
    inner: Arc<PauseInner>,
}

#[derive(Debug, Default)]
struct PauseInner {
    /// True while an upgrade holds the accepting; the accept loops hold
    /// receivers (`Pause::open`, `Pause::paused`).
    paused: watch::Sender<bool>,
    /// Connections being served, and accept loops about to accept one.
    active: std::sync::atomic::AtomicUsize,
    /// Woken when `active` drops to zero; `Pause::pause` waits on it.
    idle: tokio::sync::Notify,
}

/// Accepting goes on when this is dropped (an upgrade that did not exec).
#[derive(Debug)]
pub struct Paused(Pause);

impl Drop for Paused {
    fn drop(&mut self) {
        self.0.inner.paused.send_replace(false);
    }
}

/// One connection being served (or an accept waiting); counted until
/// dropped.
struct Active(Pause);

impl Drop for Active {
    fn drop(&mut self) {
        use std::sync::atomic::Ordering;
        if self.0.inner.active.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.inner.idle.notify_waiters();
        }
    }
}

impl Pause {
    /// Stops accepting and waits up to `within` for the open connections
    /// to end (each answer closes its connection).
    pub async fn pause(&self, within: Duration) -> Paused {
        use std::sync::atomic::Ordering;
        self.inner.paused.send_replace(true);
        let idle = async {
            loop {
                let notified = self.inner.idle.notified();
                if self.inner.active.load(Ordering::SeqCst) == 0 {
                    return;
                }
                notified.await;
            }
        };
        let _ = tokio::time::timeout(within, idle).await;
        Paused(self.clone())
    }

    /// Waits until accepting is allowed, then for `accept`'s connection,
    /// counted as active from before the accept: a pause waits for the
    /// accept to be given up (when the pause begins first) or for the
    /// connection to end. None once `stop` is cancelled.
    async fn next<T, F>(
        &self,
        host: &watch::Receiver<HostState>,
        stop: &CancellationToken,
        accept: impl Fn() -> F,
    ) -> Option<(std::io::Result<T>, Active)>
    where
        F: std::future::Future<Output = std::io::Result<T>>,
    {
        let mut paused = self.inner.paused.subscribe();
        loop {
            tokio::select! {
                () = stop.cancelled() => return None,
                () = self.open(host) => {}
            }
            let active = self.active();
            tokio::select! {
                () = stop.cancelled() => return None,
                _ = paused.wait_for(|p| *p) => continue,
                r = accept() => return Some((r, active)),
            }
        }
    }

    fn active(&self) -> Active {
        self.inner
            .active
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Active(self.clone())
    }

    /// Resolves while accepting is allowed: not paused, and the supervisor
    /// has published its programs (`host`).
    async fn open(&self, host: &watch::Receiver<HostState>) {
        let mut started = host.clone();
        let _ = started.wait_for(|h| h.started).await;
        let mut rx = self.inner.paused.subscribe();
        let _ = rx.wait_for(|p| !*p).await;
    }
}

/// Serves `listener` until `stop` is cancelled. Errors of one client are
/// its own; accept errors back off and never end the loop.
pub async fn serve(listener: Listener, admin: Admin, stop: CancellationToken) {
    let slots = Arc::new(Semaphore::new(MAX_CLIENTS));
    let mut backoff = Duration::from_millis(100);
    loop {
        let next = admin.pause.next(&admin.host, &stop, || accept(&listener));
        let Some((accepted, active)) = next.await else {
            return;
        };
        let io = match accepted {
            Ok(io) => {
                backoff = Duration::from_millis(100);
                io
            }
            Err(e) => {
                tracing::warn!(cause = %e, "admin listener: accept failed");
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
                ) {
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            continue;
        };
        let (admin, stop) = (admin.clone(), stop.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let _active = active;
            let svc = hyper::service::service_fn(move |req| {
                let admin = admin.clone();
                async move { Ok::<_, Infallible>(closing(answer(&admin, &req).await)) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .max_buf_size(16 * 1024)
                .serve_connection(io, svc);
            tokio::select! {
                () = stop.cancelled() => {}
                r = conn => if let Err(e) = r {
                    tracing::debug!(cause = %e, "admin client ended");
                },
            }
        });
    }
}

type Io = hyper_util::rt::TokioIo<Box<dyn AsyncStream>>;

trait AsyncStream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin> AsyncStream for T {}

async fn accept(listener: &Listener) -> std::io::Result<Io> {
    let stream: Box<dyn AsyncStream> = match listener {
        Listener::Tcp(l) => Box::new(l.accept().await?.0),
        Listener::Unix(l) => Box::new(l.accept().await?.0),
    };
    Ok(hyper_util::rt::TokioIo::new(stream))
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// Every answer closes its connection: health checkers open one per check
/// anyway, and an upgrade then has no idle connection to wait for.
fn closing(mut r: Response<Full<Bytes>>) -> Response<Full<Bytes>> {
    r.headers_mut().insert(
        hyper::header::CONNECTION,
        hyper::header::HeaderValue::from_static("close"),
    );
    r
}

/// The programs' snapshots with their counters, as `zdtctl status` gets
/// them; None when the supervisor does not answer in time.
async fn status(admin: &Admin, target: Option<String>) -> Result<Vec<ProgramSnapshot>, String> {
    let (tx, mut rx) = mpsc::channel(4);
    let request = ControlRequest {
        command: Command::Status { target },
        replies: tx,
        peer_uid: nix::unistd::geteuid().as_raw(),
    };
    match tokio::time::timeout(ANSWER_TIMEOUT, admin.requests.send(request)).await {
        Ok(Ok(())) => {}
        Ok(Err(_)) => return Err("zdt is stopping".into()),
        Err(_) => return Err("zdt did not answer in time".into()),
    }
    let reply = async {
        while let Some(r) = rx.recv().await {
            match r {
                Reply::Ok {
                    result: Outcome::Status { programs },
                } => return Ok(programs),
                Reply::Error { error } => return Err(error.message),
                _ => {}
            }
        }
        Err("zdt is stopping".to_string())
    };
    tokio::time::timeout(ANSWER_TIMEOUT, reply)
        .await
        .unwrap_or_else(|_| Err("zdt did not answer in time".into()))
}

async fn answer<B>(admin: &Admin, req: &Request<B>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = text(
            StatusCode::METHOD_NOT_ALLOWED,
            "the admin listener is read-only: GET /health, /health/PROGRAM, /metrics, /status\n",
        );
        r.headers_mut().insert(
            hyper::header::ALLOW,
            hyper::header::HeaderValue::from_static("GET, HEAD"),
        );
        return r;
    }
    let path = req.uri().path();
    match path {
        "/health" => health(admin, None),
        "/metrics" => metrics(admin).await,
        "/status" => match status(admin, None).await {
            Ok(programs) => {
                let body = match serde_json::to_vec(&Outcome::Status { programs }) {
                    Ok(b) => b,
                    Err(e) => {
                        return text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n"));
                    }
                };
                let mut r = Response::new(Full::new(Bytes::from(body)));
                r.headers_mut().insert(
                    hyper::header::CONTENT_TYPE,
                    hyper::header::HeaderValue::from_static("application/json"),
                );
                r
            }
            Err(e) => text(StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")),
        },
        _ => match path.strip_prefix("/health/") {
            Some(name) if !name.is_empty() && !name.contains(['*', '?', '[', ':']) => {
                health(admin, Some(name))
            }
            _ => text(
                StatusCode::NOT_FOUND,
                "not found: GET /health, /health/PROGRAM, /metrics, /status\n",
            ),
        },
    }
}

/// What `/health` says, and the HAProxy agent's word for it.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// 200.
    Serving,
    /// 503: `drain` when zdt or a program is being taken out on purpose
    /// (shutdown, drain, stop, maintenance), not when nothing runs.
    Unavailable {
        /// Taken out on purpose.
        drain: bool,
        /// Why, for the body.
        why: String,
    },
    /// No such program.
    Unknown(String),
}

/// The host's health (`program` None: every program with `listen`) or one
/// program's, from the published snapshots alone.
pub fn verdict(admin: &Admin, program: Option<&str>) -> Verdict {
    let host = admin.host.borrow().clone();
    if host.shutting_down {
        return Verdict::Unavailable {
            drain: true,
            why: "zdt is shutting down".into(),
        };
    }
    let handles = admin.programs.borrow().clone();
    let programs: Vec<ProgramSnapshot> = match program {
        None => handles
            .iter()
            .filter(|h| host.listening.contains(&h.name))
            .map(ProgramHandle::snapshot)
            .collect(),
        Some(name) => match handles.iter().find(|h| h.name == name) {
            Some(h) => vec![h.snapshot()],
            None => {
                let known: Vec<&str> = handles.iter().map(|h| h.name.as_str()).collect();
                return Verdict::Unknown(format!(
                    "unknown program {name:?} (known: {})",
                    known.join(", ")
                ));
            }
        },
    };
    let mut drain = false;
    let down: Vec<String> = programs
        .iter()
        .filter_map(|p| {
            let why = p.serving().err()?;
            let stopping = p.instances.iter().any(|i| {
                matches!(
                    i.state,
                    crate::state::InstanceState::Draining | crate::state::InstanceState::Stopping
                )
            });
            drain |= why != "no instance is RUNNING" || stopping;
            Some(format!("{}: {why}", p.name))
        })
        .collect();
    if down.is_empty() {
        Verdict::Serving
    } else {
        Verdict::Unavailable {
            drain,
            why: down.join("; "),
        }
    }
}

/// `/health` (program None) and `/health/PROGRAM`.
fn health(admin: &Admin, program: Option<&str>) -> Response<Full<Bytes>> {
    match verdict(admin, program) {
        Verdict::Serving => text(StatusCode::OK, "ok\n"),
        Verdict::Unavailable { why, .. } => text(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("unavailable: {why}\n"),
        ),
        Verdict::Unknown(why) => text(StatusCode::NOT_FOUND, format!("{why}\n")),
    }
}

/// One scrape at a time: each reads every `/proc/PID/stat` of the host.
static SCRAPES: Semaphore = Semaphore::const_new(1);

async fn metrics(admin: &Admin) -> Response<Full<Bytes>> {
    let Ok(_one) = SCRAPES.acquire().await else {
        return text(StatusCode::SERVICE_UNAVAILABLE, "zdt is stopping\n");
    };
    let handles = admin.programs.borrow().clone();
    let read = futures_util::future::join_all(handles.iter().map(ProgramHandle::status));
    let Ok(programs) = tokio::time::timeout(ANSWER_TIMEOUT, read).await else {
        return text(
            StatusCode::SERVICE_UNAVAILABLE,
            "the proxy did not answer in time\n",
        );
    };
    drop(handles);
    let host = admin.host.borrow().clone();
    let proxy_pid = admin.proxy.remote().and_then(|c| c.pid());
    // Reading /proc is blocking work: off the runtime's threads.
    let encoded =
        tokio::task::spawn_blocking(move || scrape::encode(programs, &host, proxy_pid)).await;
    let Ok(body) = encoded else {
        return text(StatusCode::INTERNAL_SERVER_ERROR, "the scrape failed\n");
    };
    let mut r = Response::new(Full::new(Bytes::from(body)));
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    r
}
