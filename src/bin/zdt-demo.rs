//! `zdt-demo`: a small HTTP/1.1 worker for the demo config and the tests.
//!
//! Listens on an inherited socket (fd 3 with LISTEN_FDS/LISTEN_PID, the systemd
//! protocol), else on the unix socket `$SOCKET`, else on `--port`/`$PORT` at
//! `--host` (127.0.0.1). Sends `READY=1`
//! to `$NOTIFY_SOCKET` once listening (unless `--never-ready`).
//!
//! Endpoints: `GET /` (and any other path) answers JSON
//! `{"pid","generation","instance","path","received","at"}` (`at`: Unix ms
//! the request reached the worker); `?sleep=MS` delays the
//! answer; `?bytes=N` answers N bytes, streamed; `?status=N` answers with
//! that status (the same JSON body); `GET /health` answers "ok";
//! `GET /log?n=N&stream=stdout|stderr` writes N lines to that stream.
//! `GET /alloc?mb=N` allocates N MiB, touches them and keeps them for the
//! rest of its life (memory growth, for `max_memory`).
//! `GET /echo` with `Upgrade: echo` switches protocols (101), writes
//! "generation G pid P\n" and echoes bytes until the client closes.
//!
//! On SIGTERM/SIGINT it drains lazily (the keep-alive race, PITFALLS item 5):
//! it stops accepting, answers every further request with `Connection: close`,
//! closes a connection only after it has been idle for `--drain-grace`, and
//! exits 0 when no connection is left.
//!
//! Flags for tests: `--ignore-term`, `--never-ready`, `--crash-after MS`
//! (exit 3), `--exit-after MS` with `--exit-code N` (0 ms = before listening),
//! `--start-delay MS`, `--stderr-line TEXT`, and for bad releases
//! `--crash-if FILE` / `--unready-if FILE` (fail only when FILE exists at start),
//! `--close-on-usr1` (close the listening socket on SIGUSR1, keep running),
//! `--spam BYTES` (write BYTES of lines to stdout and to stderr at start, from a
//! thread of their own).

use std::convert::Infallible;
use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Parser;
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;

#[derive(Parser, Clone)]
#[command(name = "zdt-demo", about = "Demo HTTP worker for zdt")]
struct Opts {
    /// Port to listen on when no socket is inherited (default: $PORT).
    #[arg(long)]
    port: Option<u16>,
    /// Address to listen on with --port.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Ignore SIGTERM entirely.
    #[arg(long)]
    ignore_term: bool,
    /// On SIGUSR1 close the listening socket but keep running and serving
    /// open connections (a worker whose port refuses connections).
    #[arg(long)]
    close_on_usr1: bool,
    /// Never send READY=1.
    #[arg(long)]
    never_ready: bool,
    /// Exit with code 3 after this many milliseconds.
    #[arg(long)]
    crash_after: Option<u64>,
    /// Exit with --exit-code after this many milliseconds (0: before listening).
    #[arg(long)]
    exit_after: Option<u64>,
    /// Exit code for --exit-after.
    #[arg(long, default_value_t = 0)]
    exit_code: i32,
    /// Sleep this long before listening.
    #[arg(long, default_value_t = 0)]
    start_delay: u64,
    /// Print this line to stderr at start.
    #[arg(long)]
    stderr_line: Option<String>,
    /// Never send READY=1 if this file exists at start (tests a bad release).
    #[arg(long)]
    unready_if: Option<std::path::PathBuf>,
    /// Exit 1 at once if this file exists at start (tests a bad release).
    #[arg(long)]
    crash_if: Option<std::path::PathBuf>,
    /// At start, write this many bytes of lines to stdout and to stderr (from
    /// a thread of its own, so serving goes on if the writes block).
    #[arg(long)]
    spam: Option<u64>,
    /// After the stop signal, close a connection once idle this long (ms).
    #[arg(long, default_value_t = 500)]
    drain_grace: u64,
}

/// Shared by all connections.
struct Shared {
    pid: u32,
    generation: String,
    instance: String,
    draining: AtomicBool,
    started: Instant,
}

/// Per connection: requests in flight and when the last one ended (ms since start).
#[derive(Default)]
struct ConnState {
    inflight: AtomicUsize,
    last_active_ms: AtomicU64,
}

type Body = BoxBody<Bytes, Infallible>;

fn query(req: &Request<Incoming>, key: &str) -> Option<u64> {
    req.uri().query()?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == key).then(|| v.parse().ok()).flatten()
    })
}

fn full(s: impl Into<Bytes>) -> Body {
    Full::new(s.into()).boxed()
}

/// `GET /echo` with `Upgrade: echo`: switches protocols, writes one line
/// naming its generation and pid, then echoes bytes until the client closes.
/// The worker stays alive while a tunnel is open.
fn echo_tunnel(req: Request<Incoming>, shared: &Shared, alive: mpsc::Sender<()>) -> Response<Body> {
    let hello = format!("generation {} pid {}\n", shared.generation, shared.pid);
    let on = hyper::upgrade::on(req);
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let _alive = alive;
        let Ok(upgraded) = on.await else { return };
        let mut io = TokioIo::new(upgraded);
        if io.write_all(hello.as_bytes()).await.is_err() {
            return;
        }
        let mut buf = [0u8; 4096];
        while let Ok(n @ 1..) = io.read(&mut buf).await {
            if io.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    });
    let mut resp = Response::new(full(""));
    *resp.status_mut() = hyper::StatusCode::SWITCHING_PROTOCOLS;
    let h = resp.headers_mut();
    h.insert(
        hyper::header::UPGRADE,
        hyper::header::HeaderValue::from_static("echo"),
    );
    h.insert(
        hyper::header::CONNECTION,
        hyper::header::HeaderValue::from_static("upgrade"),
    );
    resp
}

/// Memory `GET /alloc` keeps.
static KEPT: std::sync::Mutex<Vec<Vec<u8>>> = std::sync::Mutex::new(Vec::new());

async fn handle(
    req: Request<Incoming>,
    shared: Arc<Shared>,
    alive: mpsc::Sender<()>,
) -> Response<Body> {
    // When the request reached this worker (Unix ms): tests use it to tell
    // whether a request got through while zdt held requests.
    let at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let path = req.uri().path().to_string();
    if path == "/echo" && req.headers().contains_key(hyper::header::UPGRADE) {
        return echo_tunnel(req, &shared, alive);
    }
    let sleep = query(&req, "sleep");
    let bytes = query(&req, "bytes");
    let status = query(&req, "status")
        .and_then(|n| u16::try_from(n).ok())
        .and_then(|n| hyper::StatusCode::from_u16(n).ok());
    let lines = query(&req, "n");
    let alloc_mb = query(&req, "mb");
    let to_stderr = req
        .uri()
        .query()
        .is_some_and(|q| q.contains("stream=stderr"));
    let mut received = 0u64;
    let mut body = req.into_body();
    while let Some(Ok(frame)) = body.frame().await {
        if let Some(d) = frame.data_ref() {
            received += d.len() as u64;
        }
    }
    if let Some(ms) = sleep {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let body = match path.as_str() {
        "/health" => full("ok\n"),
        "/alloc" => {
            let mb = alloc_mb.unwrap_or(1).min(4096) as usize;
            // Touched, so that it is resident, and kept until the process ends.
            let block = vec![1u8; mb << 20];
            KEPT.lock().unwrap_or_else(|e| e.into_inner()).push(block);
            full(format!("allocated {mb} MiB\n"))
        }
        "/log" => {
            let n = lines.unwrap_or(1);
            let text: String = (0..n)
                .map(|i| format!("log line {i} from pid {} {}\n", shared.pid, "-".repeat(60)))
                .collect();
            if to_stderr {
                let _ = std::io::stderr().write_all(text.as_bytes());
            } else {
                let mut out = std::io::stdout().lock();
                let _ = out.write_all(text.as_bytes());
                let _ = out.flush();
            }
            full(format!("wrote {n} lines\n"))
        }
        _ => match bytes {
            Some(n) => {
                let chunks = futures_util::stream::unfold(n, |left| async move {
                    if left == 0 {
                        return None;
                    }
                    let len = left.min(64 * 1024);
                    let frame: Result<Frame<Bytes>, Infallible> =
                        Ok(Frame::data(Bytes::from(vec![b'x'; len as usize])));
                    Some((frame, left - len))
                });
                StreamBody::new(chunks).boxed()
            }
            None => full(
                serde_json::json!({
                    "pid": shared.pid,
                    "generation": shared.generation.parse::<u64>().unwrap_or(0),
                    "instance": shared.instance.parse::<u64>().unwrap_or(0),
                    "path": path,
                    "received": received,
                    "at": at,
                })
                .to_string(),
            ),
        },
    };
    let mut resp = Response::new(body);
    if let Some(s) = status {
        *resp.status_mut() = s;
    }
    if shared.draining.load(Ordering::SeqCst) {
        resp.headers_mut().insert(
            hyper::header::CONNECTION,
            hyper::header::HeaderValue::from_static("close"),
        );
    }
    resp
}

/// Serves one connection; after the stop signal, closes it once idle for `grace`.
async fn serve<I>(io: I, shared: Arc<Shared>, grace: Duration, alive: mpsc::Sender<()>)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let state = Arc::new(ConnState::default());
    let since = |s: &Shared| s.started.elapsed().as_millis() as u64;
    state.last_active_ms.store(since(&shared), Ordering::SeqCst);
    let svc = {
        let (shared, state, alive) = (shared.clone(), state.clone(), alive.clone());
        hyper::service::service_fn(move |req| {
            let (shared, state, alive) = (shared.clone(), state.clone(), alive.clone());
            state.inflight.fetch_add(1, Ordering::SeqCst);
            async move {
                let resp = handle(req, shared.clone(), alive).await;
                state.last_active_ms.store(since(&shared), Ordering::SeqCst);
                state.inflight.fetch_sub(1, Ordering::SeqCst);
                Ok::<_, Infallible>(resp)
            }
        })
    };
    let conn = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(io), svc)
        .with_upgrades();
    let _alive = alive;
    tokio::pin!(conn);
    let mut closing = false;
    loop {
        tokio::select! {
            _ = conn.as_mut() => return,
            () = tokio::time::sleep(Duration::from_millis(50)), if !closing => {
                let idle_ms = since(&shared).saturating_sub(state.last_active_ms.load(Ordering::SeqCst));
                if shared.draining.load(Ordering::SeqCst)
                    && state.inflight.load(Ordering::SeqCst) == 0
                    && idle_ms >= grace.as_millis() as u64
                {
                    closing = true;
                    conn.as_mut().graceful_shutdown();
                }
            }
        }
    }
}

enum Listener {
    Tcp(tokio::net::TcpListener),
    Unix(tokio::net::UnixListener),
}

fn inherited_listener() -> Result<Option<Listener>, String> {
    use std::os::fd::FromRawFd;
    let pid_ok = std::env::var("LISTEN_PID")
        .ok()
        .and_then(|p| p.parse::<u32>().ok())
        == Some(std::process::id());
    let n: u32 = std::env::var("LISTEN_FDS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    for v in ["LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"] {
        std::env::remove_var(v);
    }
    if !pid_ok || n == 0 {
        return Ok(None);
    }
    let fd = 3;
    let accepting: bool = nix::sys::socket::getsockopt(
        &unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) },
        nix::sys::socket::sockopt::AcceptConn,
    )
    .map_err(|e| format!("fd 3 is not a socket: {e}"))?;
    if !accepting {
        return Err("fd 3 is not a listening socket".into());
    }
    let _ = nix::fcntl::fcntl(
        fd,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    );
    let addr: nix::sys::socket::SockaddrStorage =
        nix::sys::socket::getsockname(fd).map_err(|e| format!("getsockname(3): {e}"))?;
    // SAFETY: fd 3 was handed to us by the LISTEN_FDS protocol, checked to be a
    // listening socket above, and is taken exactly once.
    if addr.as_unix_addr().is_some() {
        let l = unsafe { std::os::unix::net::UnixListener::from_raw_fd(fd) };
        l.set_nonblocking(true).map_err(|e| e.to_string())?;
        Ok(Some(Listener::Unix(
            tokio::net::UnixListener::from_std(l).map_err(|e| e.to_string())?,
        )))
    } else {
        let l = unsafe { std::net::TcpListener::from_raw_fd(fd) };
        l.set_nonblocking(true).map_err(|e| e.to_string())?;
        Ok(Some(Listener::Tcp(
            tokio::net::TcpListener::from_std(l).map_err(|e| e.to_string())?,
        )))
    }
}

fn notify(msg: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let sock = match std::os::unix::net::UnixDatagram::unbound() {
        Ok(s) => s,
        Err(_) => return,
    };
    let bytes = path.as_encoded_bytes();
    let sent = if let Some(name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(name)
            .and_then(|a| sock.send_to_addr(msg.as_bytes(), &a))
    } else {
        sock.send_to(msg.as_bytes(), &path)
    };
    if let Err(e) = sent {
        eprintln!("zdt-demo: cannot notify {path:?}: {e}");
    }
}

async fn run(opts: Opts) -> Result<(), String> {
    let shared = Arc::new(Shared {
        pid: std::process::id(),
        generation: std::env::var("ZDT_GENERATION").unwrap_or_else(|_| "0".into()),
        instance: std::env::var("ZDT_INSTANCE").unwrap_or_else(|_| "0".into()),
        draining: AtomicBool::new(false),
        started: Instant::now(),
    });
    if opts.start_delay > 0 {
        tokio::time::sleep(Duration::from_millis(opts.start_delay)).await;
    }
    let socket = std::env::var_os("SOCKET").filter(|_| opts.port.is_none());
    let listener = match inherited_listener()? {
        Some(l) => l,
        None if socket.is_some() => {
            let path = std::path::PathBuf::from(socket.unwrap_or_default());
            let l = tokio::net::UnixListener::bind(&path)
                .map_err(|e| format!("cannot listen on {}: {e}", path.display()))?;
            Listener::Unix(l)
        }
        None => {
            let port = opts
                .port
                .or_else(|| std::env::var("PORT").ok().and_then(|p| p.parse().ok()))
                .ok_or("no socket: pass --port, set PORT, or run under zdt with listen")?;
            let l = tokio::net::TcpListener::bind((opts.host.as_str(), port))
                .await
                .map_err(|e| format!("cannot listen on {}:{port}: {e}", opts.host))?;
            Listener::Tcp(l)
        }
    };
    let addr = match &listener {
        Listener::Tcp(l) => l.local_addr().map(|a| a.to_string()).unwrap_or_default(),
        Listener::Unix(l) => l
            .local_addr()
            .ok()
            .and_then(|a| a.as_pathname().map(|p| p.display().to_string()))
            .unwrap_or_default(),
    };
    println!(
        "zdt-demo pid={} gen={} listening on {addr}",
        shared.pid, shared.generation
    );
    if let Some(line) = &opts.stderr_line {
        eprintln!("{line}");
    }
    let unready = opts.unready_if.as_ref().is_some_and(|p| p.exists());
    if !opts.never_ready && !unready {
        notify(&format!(
            "READY=1\nSTATUS=serving on {addr}\nMAINPID={}",
            shared.pid
        ));
    }
    if let Some(ms) = opts.crash_after {
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            eprintln!("zdt-demo: crashing on purpose");
            std::process::exit(3);
        });
    }
    if let Some(ms) = opts.exit_after {
        let code = opts.exit_code;
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            std::process::exit(code);
        });
    }
    let mut term = if opts.ignore_term {
        None
    } else {
        Some(
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .map_err(|e| e.to_string())?,
        )
    };
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .map_err(|e| e.to_string())?;
    let mut usr1 = if opts.close_on_usr1 {
        Some(
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined1())
                .map_err(|e| e.to_string())?,
        )
    } else {
        None
    };
    let grace = Duration::from_millis(opts.drain_grace);
    // Each connection task holds a sender; recv() returns None when all are gone.
    let (alive_tx, mut alive_rx) = mpsc::channel::<()>(1);
    let mut listener = Some(listener);
    loop {
        let stop = async {
            match term.as_mut() {
                None => int.recv().await,
                Some(term) => tokio::select! { s = term.recv() => s, s = int.recv() => s },
            }
        };
        tokio::select! {
            _ = stop => break,
            Some(()) = async { usr1.as_mut()?.recv().await } => {
                listener = None;
                println!("zdt-demo pid={} closed its listening socket", shared.pid);
            }
            r = async {
                match &listener {
                    Some(Listener::Tcp(l)) => l.accept().await.map(|(s, _)| tokio::spawn(serve(s, shared.clone(), grace, alive_tx.clone()))),
                    Some(Listener::Unix(l)) => l.accept().await.map(|(s, _)| tokio::spawn(serve(s, shared.clone(), grace, alive_tx.clone()))),
                    None => std::future::pending().await,
                }
            } => if let Err(e) = r {
                eprintln!("zdt-demo: accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            },
        }
    }
    drop(listener);
    shared.draining.store(true, Ordering::SeqCst);
    println!("zdt-demo pid={} draining", shared.pid);
    drop(alive_tx);
    let _ = alive_rx.recv().await;
    println!("zdt-demo pid={} drained, exiting", shared.pid);
    Ok(())
}

/// Writes `total` bytes of 100-byte lines to stdout and to stderr, in turns.
fn spam(total: u64) {
    let line = format!(
        "{:-<99}\n",
        format!("zdt-demo pid={} spam ", std::process::id())
    );
    let mut written = 0;
    while written < total {
        // A closed stream is not this worker's problem.
        let _ = std::io::stdout().write_all(line.as_bytes());
        let _ = std::io::stderr().write_all(line.as_bytes());
        written += line.len() as u64;
    }
}

fn main() {
    let opts = Opts::parse();
    if opts.crash_if.as_ref().is_some_and(|p| p.exists()) {
        eprintln!(
            "zdt-demo: {} exists; failing at start on purpose",
            opts.crash_if
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default()
        );
        std::process::exit(1);
    }
    if opts.exit_after == Some(0) {
        eprintln!("zdt-demo: exiting at once with {}", opts.exit_code);
        std::process::exit(opts.exit_code);
    }
    if let Some(total) = opts.spam {
        std::thread::spawn(move || spam(total));
    }
    if opts.ignore_term {
        // SAFETY: setting a signal disposition to SIG_IGN before any thread starts.
        unsafe {
            libc::signal(libc::SIGTERM, libc::SIG_IGN);
        }
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("zdt-demo: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = rt.block_on(run(opts)) {
        eprintln!("zdt-demo: {e}");
        std::process::exit(2);
    }
}
