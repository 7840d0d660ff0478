//! Proxy mode: zdt accepts on the sockets it owns and forwards each HTTP
//! request to a ready instance's private address, so it sees every request.
//!
//! The proxy is a component given listening sockets and a routing table: the
//! program actor publishes the table ([`RouteTable::set_routes`], one `watch`
//! send: the switch between generations is atomic), and each [`Upstream`]
//! counts its requests in flight with an RAII guard held until the response
//! body has been sent. The data path never waits on an actor. (Built so that it
//! can later run in a process of its own, behind the same interface.)
//!
//! Two HTTP paths share this: ordinary HTTP/1.1 requests go through
//! `relay.rs` (zdt's own head parsing and body relaying), and what it hands
//! over (HTTP/1.0, Upgrade, Expect, malformed heads) through hyper's server
//! and client here (`serve`, `handle`).
//!
//! Routing: least requests in flight among the ready instances of the current
//! generation, ties broken round-robin. With no ready instance a request waits
//! up to `queue_timeout` for one, then gets `503` with `Retry-After` and
//! `Connection: close`. A connect error is retried on another instance, body
//! and all (nothing reached the app); on the relay path a GET, HEAD or
//! OPTIONS without a body whose reused connection ends before a byte of
//! answer is sent once more; any other upstream failure is a `502`, counted
//! and logged with its path. No answer head within `response_timeout` of
//! the request's last byte is a `504`, counted as failed; a client that
//! sends nothing of its body for `body_timeout` gets `408`, and one that
//! aborts its upload counts as neither served nor failed. Pooled upstream
//! connections idle for `upstream_idle_timeout` are closed.
//!
//! Every request (tcp: connection) is routed through one function, `route`,
//! on all three paths: it first passes the program's gate (`gate.rs`:
//! `zdtctl pause` holds it there until resume or max-pause, `maintenance`
//! answers 503), then picks an instance. A drain (503 at once) is decided
//! before that, as soon as a request's head is read.
//!
//! Accepting (`accept_loop`, one per listening socket per proxy thread)
//! stops, and never spins, in two cases; clients then wait in the listen
//! backlog and the listener stays open (nginx's behaviour):
//! - the listener holds `max_connections` open client connections (a
//!   semaphore shared by its accept loops; a permit lives as long as the
//!   connection): it accepts again when one closes;
//! - zdt is short of fds: accept failed with EMFILE/ENFILE, or the new
//!   client's fd landed in the reserve kept for the control socket and
//!   spawning (see [`crate::fds`]): it checks again after 100 ms, then up to
//!   every second, until the lowest free fd is below the reserve.

mod addr;
mod body;
mod canary;
mod framing;
mod gate;
mod pool;
mod relay;
mod splice;
mod workers;

pub use addr::PrivateAddr;
pub use canary::{Canary, GenStats, COOKIE as CANARY_COOKIE};
pub use gate::Gate;
pub use workers::set_threads;

/// The parsers the fuzz targets call ([`crate::fuzz`]).
pub(crate) use {framing::fuzz as framing_fuzz, relay::fuzz as relay_fuzz};

use std::convert::Infallible;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::sync::{watch, Notify, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use body::GuardedBody;

pub use crate::state::RequestCounts;

/// Response body type of the proxy.
pub type ProxyBody = BoxBody<Bytes, hyper::Error>;

/// Request counters of one program, across all its generations, and the
/// live table of its upstreams' counters for `zdtctl status`.
#[derive(Debug, Default)]
pub struct Traffic {
    served: AtomicU64,
    failed: AtomicU64,
    cut: AtomicU64,
    unavailable: AtomicU64,
    /// Requests (tcp: connections) held at a paused gate right now.
    held: AtomicU64,
    /// (instance, generation, counters) of every process with a private address.
    live: Mutex<Vec<(u32, u64, Arc<UpstreamStats>)>>,
    proxied: AtomicBool,
    /// Counters per generation (newest few), shared by the generation's
    /// processes so a crash does not reset them.
    gens: Mutex<Vec<(u64, Arc<GenStats>)>>,
}

/// Generations whose counters are kept.
const GENS_KEPT: usize = 4;

impl Traffic {
    /// Marks the program as proxied (its snapshots carry counters) or not.
    pub fn set_proxied(&self, on: bool) {
        self.proxied.store(on, Ordering::Relaxed);
    }

    /// Whether the program is proxied.
    pub fn is_proxied(&self) -> bool {
        self.proxied.load(Ordering::Relaxed)
    }

    /// Replaces the table of live upstreams (the program actor calls this
    /// after every change).
    pub fn set_live(&self, live: Vec<(u32, u64, Arc<UpstreamStats>)>) {
        if let Ok(mut l) = self.live.lock() {
            *l = live;
        }
    }

    /// The program's totals; `inflight` summed over its live upstreams.
    pub fn totals(&self) -> RequestCounts {
        let inflight = self
            .live
            .lock()
            .map(|l| l.iter().map(|(_, _, s)| s.inflight()).sum())
            .unwrap_or(0);
        RequestCounts {
            inflight,
            served: self.served.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
            cut: self.cut.load(Ordering::Relaxed),
            unavailable: self.unavailable.load(Ordering::Relaxed),
        }
    }

    /// Requests (tcp: connections) held by a pause right now.
    pub fn held(&self) -> u64 {
        self.held.load(Ordering::Relaxed)
    }

    /// Resolves when no request is in flight on any live upstream (each one
    /// wakes this when its count reaches zero; nothing polls).
    pub async fn wait_idle(&self) {
        loop {
            let busy = self.live.lock().ok().and_then(|l| {
                l.iter()
                    .find(|(_, _, s)| s.inflight() > 0)
                    .map(|(_, _, s)| s.clone())
            });
            match busy {
                Some(s) => s.wait_idle().await,
                None => return,
            }
        }
    }

    /// The counters of generation `gen`, created on first use; only the
    /// newest `GENS_KEPT` generations are kept.
    pub fn gen_stats(&self, gen: u64) -> Arc<GenStats> {
        let mut gens = self.gens.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, s)) = gens.iter().find(|(g, _)| *g == gen) {
            return s.clone();
        }
        let s = Arc::new(GenStats::default());
        gens.push((gen, s.clone()));
        gens.sort_by_key(|(g, _)| std::cmp::Reverse(*g));
        gens.truncate(GENS_KEPT);
        s
    }

    /// Requests, 5xx answers and p99 latency (µs) of generation `gen`.
    pub fn of_gen(&self, gen: u64) -> Option<(u64, u64, Option<u64>)> {
        let gens = self.gens.lock().ok()?;
        gens.iter().find(|(g, _)| *g == gen).map(|(_, s)| s.read())
    }

    /// The counters of one live process, if it has a private address.
    pub fn of(&self, instance: u32, generation: u64) -> Option<RequestCounts> {
        let live = self.live.lock().ok()?;
        let (_, _, s) = live
            .iter()
            .find(|(i, g, _)| *i == instance && *g == generation)?;
        Some(s.counts())
    }
}

/// Counters of one upstream (one process of one generation).
#[derive(Debug)]
pub struct UpstreamStats {
    inflight: AtomicU64,
    served: AtomicU64,
    failed: AtomicU64,
    cut: AtomicU64,
    /// Set when zdt stops the process with requests still in flight: their
    /// failures are counted as cut.
    cutting: AtomicBool,
    /// Woken when `inflight` drops to zero.
    idle: Notify,
    program: Arc<Traffic>,
    /// Its generation's counters.
    gen: Arc<GenStats>,
}

impl UpstreamStats {
    fn new(program: Arc<Traffic>, gen: Arc<GenStats>) -> Self {
        Self {
            gen,
            inflight: AtomicU64::new(0),
            served: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            cut: AtomicU64::new(0),
            cutting: AtomicBool::new(false),
            idle: Notify::new(),
            program,
        }
    }

    /// Requests routed to it and not yet fully answered.
    pub fn inflight(&self) -> u64 {
        self.inflight.load(Ordering::SeqCst)
    }

    /// Its counters.
    pub fn counts(&self) -> RequestCounts {
        RequestCounts {
            inflight: self.inflight(),
            served: self.served.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
            cut: self.cut.load(Ordering::Relaxed),
            unavailable: 0,
        }
    }

    /// Marks the requests still in flight as about to be cut: zdt stops the
    /// process before they finished (max_wait passed).
    pub fn cutting(&self) {
        self.cutting.store(true, Ordering::SeqCst);
    }

    fn record(&self, ok: bool) {
        let (mine, total) = if ok {
            (&self.served, &self.program.served)
        } else {
            (&self.failed, &self.program.failed)
        };
        mine.fetch_add(1, Ordering::Relaxed);
        total.fetch_add(1, Ordering::Relaxed);
        if !ok && self.cutting.load(Ordering::SeqCst) {
            self.cut.fetch_add(1, Ordering::Relaxed);
            self.program.cut.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Resolves when no request is in flight.
    pub async fn wait_idle(&self) {
        loop {
            let notified = self.idle.notified();
            if self.inflight() == 0 {
                return;
            }
            notified.await;
        }
    }
}

/// Held while a request is in flight on an upstream; counts it as served
/// when dropped, unless [`InflightGuard::fail`] counted it as failed.
#[derive(Debug)]
pub(crate) struct InflightGuard {
    stats: Arc<UpstreamStats>,
    /// Already counted (as failed), or not to be counted.
    recorded: bool,
    /// For the generation's counters: Some(5xx or failed) when the request
    /// is to be counted, None when not (abandoned, sent elsewhere, a tunnel).
    gen_error: Option<bool>,
    started: std::time::Instant,
}

impl InflightGuard {
    fn new(stats: Arc<UpstreamStats>) -> Self {
        stats.inflight.fetch_add(1, Ordering::SeqCst);
        Self {
            stats,
            recorded: false,
            gen_error: Some(false),
            started: std::time::Instant::now(),
        }
    }

    /// Counts the request as failed (502, or its response body broke off).
    pub(crate) fn fail(&mut self) {
        if !self.recorded {
            self.recorded = true;
            self.stats.record(false);
            self.gen_error = self.gen_error.map(|_| true);
        }
    }

    /// The status of the answer's head: a 5xx counts as an error of the
    /// generation; a 101 becomes a tunnel, which is not timed.
    pub(crate) fn status(&mut self, code: u16) {
        match code {
            101 => self.gen_error = None,
            500.. => self.gen_error = self.gen_error.map(|_| true),
            _ => {}
        }
    }

    /// Ends the guard without counting the request as served or failed (it
    /// never reached this upstream and goes elsewhere, or its client went
    /// away before the answer).
    pub(crate) fn discard(mut self) {
        self.abandon();
    }

    /// Counts the request as neither served nor failed: its client went
    /// away or stalled (nginx's 499), which says nothing of the upstream.
    pub(crate) fn abandon(&mut self) {
        self.recorded = true;
        self.gen_error = None;
    }

    /// Whether zdt is cutting this upstream's requests.
    pub(crate) fn is_cut(&self) -> bool {
        self.stats.cutting.load(Ordering::SeqCst)
    }
}

impl Drop for InflightGuard {
    fn drop(&mut self) {
        if !self.recorded {
            self.stats.record(true);
        }
        if let Some(error) = self.gen_error {
            self.stats.gen.record(self.started.elapsed(), error);
        }
        if self.stats.inflight.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.stats.idle.notify_waiters();
        }
    }
}

/// One worker process's private address, with its own connection pool.
/// Dropping the last reference closes its idle upstream connections.
#[derive(Debug)]
pub struct Upstream {
    /// The private address.
    pub addr: PrivateAddr,
    /// Its counters.
    pub stats: Arc<UpstreamStats>,
    /// The generation of its process.
    pub gen: u64,
    /// `Host` for a request that came without one.
    authority: HeaderValue,
    /// Idle connections for the hyper path, per proxy thread.
    pool: Arc<pool::Pool>,
    /// Idle connections for the relay path, per proxy thread.
    idle: relay::Idle,
}

impl Upstream {
    /// An upstream at `addr`, a process of generation `gen`.
    pub fn new(addr: PrivateAddr, program: &Arc<Traffic>, gen: u64) -> Arc<Self> {
        Arc::new(Self {
            gen,
            authority: addr.host(),
            pool: pool::Pool::new(addr.clone()),
            idle: relay::Idle::new(),
            addr,
            stats: Arc::new(UpstreamStats::new(program.clone(), program.gen_stats(gen))),
        })
    }
}

/// The ready instances requests may go to.
#[derive(Debug, Default)]
pub struct Routes {
    /// In no particular order.
    pub upstreams: Vec<Arc<Upstream>>,
    /// During a canary: the canary generation and its share; `upstreams`
    /// are then the stable generation's (see `canary.rs`).
    pub canary: Option<Canary>,
}

/// The routing state of one program: the table its proxies route by, its
/// drain flag and its pause / maintenance gate. The program actor owns it for the program's whole life
/// and publishes to it; every accept loop and every client connection of
/// every proxy the program ever started reads it. So a reload that replaces
/// the program's proxy (new sockets, new options) leaves no client connection
/// on a frozen table: connections accepted before it follow the live routes.
#[derive(Debug)]
pub struct RouteTable {
    /// The table; proxies' connection tasks hold receivers.
    routes: watch::Sender<Arc<Routes>>,
    /// Set by `zdtctl drain`: every new request gets 503 at once.
    draining: Arc<AtomicBool>,
    /// Set by `zdtctl pause`, `maintenance` and `resume`: whether new
    /// requests go on, wait, or get 503 (see `gate.rs`).
    gate: gate::GateTx,
    /// `max_connections` per listening socket (by the socket's inode, its
    /// permit count, the semaphore): kept across the proxies a reload
    /// replaces, so connections from before a reload still count.
    limits: Mutex<Vec<(u64, usize, Arc<Semaphore>)>>,
}

impl Default for RouteTable {
    fn default() -> Self {
        Self::new()
    }
}

impl RouteTable {
    /// An empty table, not draining.
    pub fn new() -> Self {
        Self {
            routes: watch::channel(Arc::new(Routes::default())).0,
            draining: Arc::new(AtomicBool::new(false)),
            gate: gate::GateTx::new(),
            limits: Mutex::new(Vec::new()),
        }
    }

    /// The connection limit of the listening socket `fd`, `max` permits: the
    /// one earlier proxies of this program used (resized), or a new one.
    fn limit_for(&self, fd: &OwnedFd, max: usize) -> Arc<Semaphore> {
        let inode =
            nix::sys::stat::fstat(std::os::fd::AsRawFd::as_raw_fd(fd)).map_or(0, |st| st.st_ino);
        let mut limits = self.limits.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, was, sem)) = limits.iter_mut().find(|(i, _, _)| *i == inode) {
            if max > *was {
                sem.add_permits(max - *was);
            } else {
                // Only free permits can go; the rest go as connections close
                // (close enough for a limit a reload lowered).
                sem.forget_permits(*was - max);
            }
            *was = max;
            return sem.clone();
        }
        let sem = Arc::new(Semaphore::new(max));
        limits.push((inode, max, sem.clone()));
        sem
    }

    /// Starts or ends a drain: while draining, new requests get 503 at once.
    pub fn set_draining(&self, on: bool) {
        self.draining.store(on, Ordering::SeqCst);
    }

    /// Whether a drain is in force.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Opens, pauses or closes the gate new requests pass (pause and
    /// maintenance); requests already routed are not touched.
    pub fn set_gate(&self, gate: Gate) {
        self.gate.set(gate);
    }

    /// The gate as it is.
    pub fn gate(&self) -> Gate {
        self.gate.get()
    }

    /// A receiver that sees every change of the gate.
    pub fn watch_gate(&self) -> watch::Receiver<Gate> {
        self.gate.watch()
    }

    /// Publishes a new routing table, unless it routes to the same upstreams.
    pub fn set_routes(&self, upstreams: Vec<Arc<Upstream>>) {
        self.set_split(upstreams, None);
    }

    /// Publishes a routing table with a canary beside the stable
    /// `upstreams` (None: no canary), unless nothing changed.
    pub fn set_split(&self, upstreams: Vec<Arc<Upstream>>, canary: Option<Canary>) {
        let same_list = |a: &[Arc<Upstream>], b: &[Arc<Upstream>]| {
            a.len() == b.len() && a.iter().zip(b).all(|(a, b)| Arc::ptr_eq(a, b))
        };
        self.routes.send_if_modified(|r| {
            let same = same_list(&r.upstreams, &upstreams)
                && match (&r.canary, &canary) {
                    (None, None) => true,
                    (Some(a), Some(b)) => {
                        (a.gen, a.stable_gen, a.percent, &a.header)
                            == (b.gen, b.stable_gen, b.percent, &b.header)
                            && same_list(&a.upstreams, &b.upstreams)
                    }
                    _ => false,
                };
            if !same {
                *r = Arc::new(Routes { upstreams, canary });
            }
            !same
        });
    }
}

/// Handle to a running proxy: its accept loops. Dropping it stops accepting;
/// connections that are open finish on their own, routed by the program's
/// live [`RouteTable`].
#[derive(Debug)]
pub struct ProxyHandle {
    /// Cancels the accept loops.
    stop: CancellationToken,
}

impl Drop for ProxyHandle {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

struct Shared {
    program: String,
    routes: watch::Receiver<Arc<Routes>>,
    options: Options,
    next: AtomicUsize,
    traffic: Arc<Traffic>,
    draining: Arc<AtomicBool>,
    /// The program's pause / maintenance gate.
    gate: gate::GateRx,
    /// Client fds numbered this or higher are in zdt's reserve: stop
    /// accepting (see [`crate::fds`]).
    fd_ceiling: u64,
}

/// How the proxy treats clients (from the program's config).
#[derive(Clone, Debug)]
pub struct Options {
    /// How long a request waits for a ready instance before 503.
    pub queue_timeout: Duration,
    /// Time for a request's whole header, from connect or the previous response.
    pub header_timeout: Duration,
    /// Time from a request fully sent to its answer's head; then 504.
    pub response_timeout: Duration,
    /// Longest pause in a client's request body; then 408.
    pub body_timeout: Duration,
    /// Pooled upstream connections idle this long are closed.
    pub upstream_idle_timeout: Duration,
    /// Larger request headers get 431.
    pub max_header_bytes: usize,
    /// Add X-Forwarded-For, X-Real-IP and X-Forwarded-Proto.
    pub forward_headers: bool,
    /// Forward HTTP requests, or TCP connections as bytes.
    pub protocol: crate::config::Protocol,
    /// Open client connections per listening socket (None: derived from the
    /// open-files limit).
    pub max_connections: Option<usize>,
}

impl Options {
    /// The proxy options of a program.
    pub fn of(cfg: &crate::config::ProgramConfig) -> Self {
        Self {
            queue_timeout: cfg.queue_timeout,
            header_timeout: cfg.header_timeout,
            response_timeout: cfg.response_timeout,
            body_timeout: cfg.body_timeout,
            upstream_idle_timeout: cfg.upstream_idle_timeout,
            max_header_bytes: cfg.max_header_bytes,
            forward_headers: cfg.forward_headers,
            protocol: cfg.protocol,
            max_connections: cfg.max_connections,
        }
    }
}

/// Starts accepting on `sockets` for `program`, routing by `table`.
pub fn start(
    program: &str,
    sockets: &[Arc<OwnedFd>],
    options: Options,
    traffic: Arc<Traffic>,
    table: &RouteTable,
) -> std::io::Result<ProxyHandle> {
    let stop = CancellationToken::new();
    let max_connections = options
        .max_connections
        .unwrap_or_else(crate::fds::default_max_connections)
        .min(Semaphore::MAX_PERMITS);
    let fd_ceiling = crate::fds::proxy_ceiling();
    tracing::info!(
        program,
        max_connections,
        fd_ceiling,
        "proxy: at most {max_connections} open client connections per listening socket"
    );
    let shared = Arc::new(Shared {
        fd_ceiling,
        draining: table.draining.clone(),
        gate: table.gate.subscribe(),
        program: program.to_string(),
        routes: table.routes.subscribe(),
        options,
        next: AtomicUsize::new(0),
        traffic,
    });
    let threads = workers::handles();
    if threads.is_empty() {
        return Err(std::io::Error::other("no proxy thread could be started"));
    }
    for fd in sockets {
        // Shared by the socket's accept loops on every thread, and with the
        // proxies of this program before this one.
        let slots = table.limit_for(fd, max_connections);
        for rt in threads {
            // Registered with that thread's reactor.
            let _in = rt.enter();
            let listener = Listener::from_fd(fd)?;
            rt.spawn(accept_loop(
                listener,
                shared.clone(),
                slots.clone(),
                stop.clone(),
            ));
        }
    }
    Ok(ProxyHandle { stop })
}

enum Listener {
    Tcp(tokio::net::TcpListener),
    Unix(tokio::net::UnixListener),
}

/// A client connection just accepted.
enum Accepted {
    Tcp(tokio::net::TcpStream, std::net::SocketAddr),
    Unix(tokio::net::UnixStream),
}

impl Listener {
    async fn accept(&self) -> std::io::Result<Accepted> {
        match self {
            Self::Tcp(l) => l.accept().await.map(|(s, a)| Accepted::Tcp(s, a)),
            Self::Unix(l) => l.accept().await.map(|(s, _)| Accepted::Unix(s)),
        }
    }

    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd;
        match self {
            Self::Tcp(l) => l.as_raw_fd(),
            Self::Unix(l) => l.as_raw_fd(),
        }
    }

    fn from_fd(fd: &OwnedFd) -> std::io::Result<Self> {
        let dup = fd.try_clone()?;
        let sock = socket2::Socket::from(dup);
        sock.set_nonblocking(true)?;
        if sock.local_addr()?.as_unix().is_some() {
            let std: std::os::unix::net::UnixListener = sock.into();
            Ok(Self::Unix(tokio::net::UnixListener::from_std(std)?))
        } else {
            let std: std::net::TcpListener = sock.into();
            Ok(Self::Tcp(tokio::net::TcpListener::from_std(std)?))
        }
    }
}

/// A client connection that can move from the proxy thread that accepted it
/// to another one (deregistered from one reactor, registered with the other).
trait ClientIo:
    splice::SpliceIo
    + tokio::io::AsyncRead
    + tokio::io::AsyncWrite
    + Unpin
    + Send
    + Sync
    + Sized
    + 'static
{
    type Std: Send + 'static;
    fn into_std(self) -> std::io::Result<Self::Std>;
    fn from_std(s: Self::Std) -> std::io::Result<Self>;
}

impl ClientIo for tokio::net::TcpStream {
    type Std = std::net::TcpStream;
    fn into_std(self) -> std::io::Result<Self::Std> {
        tokio::net::TcpStream::into_std(self)
    }
    fn from_std(s: Self::Std) -> std::io::Result<Self> {
        tokio::net::TcpStream::from_std(s)
    }
}

impl ClientIo for tokio::net::UnixStream {
    type Std = std::os::unix::net::UnixStream;
    fn into_std(self) -> std::io::Result<Self::Std> {
        tokio::net::UnixStream::into_std(self)
    }
    fn from_std(s: Self::Std) -> std::io::Result<Self> {
        tokio::net::UnixStream::from_std(s)
    }
}

/// Serves an accepted client connection on this proxy thread, or on a less
/// loaded one. `slot` is its place under `max_connections`, held until it
/// closes.
fn dispatch<S: ClientIo>(
    s: S,
    peer: Option<std::net::IpAddr>,
    tcp: bool,
    shared: &Arc<Shared>,
    slot: OwnedSemaphorePermit,
) {
    let here = workers::current();
    let there = workers::for_new_connection();
    let shared = shared.clone();
    if there == here {
        let open = (workers::Open::on(here), slot);
        tokio::spawn(serve_client(s, peer, tcp, shared, open));
        return;
    }
    let Some(rt) = workers::handles().get(there) else {
        return;
    };
    let std = match s.into_std() {
        Ok(std) => std,
        Err(e) => {
            tracing::warn!(cause = %e, "cannot move a client connection; closed");
            return;
        }
    };
    let open = (workers::Open::on(there), slot);
    rt.spawn(async move {
        match S::from_std(std) {
            Ok(s) => serve_client(s, peer, tcp, shared, open).await,
            Err(e) => tracing::warn!(cause = %e, "cannot move a client connection"),
        }
    });
}

async fn serve_client<S: ClientIo>(
    s: S,
    peer: Option<std::net::IpAddr>,
    tcp: bool,
    shared: Arc<Shared>,
    _open: (workers::Open, OwnedSemaphorePermit),
) {
    if tcp {
        serve_tcp(s, shared).await;
    } else {
        relay::serve(s, peer, shared).await;
    }
}

/// First pause of an accept loop short of fds; it doubles up to [`PAUSE_MAX`].
const PAUSE_MIN: Duration = Duration::from_millis(100);
/// Longest pause of an accept loop short of fds.
const PAUSE_MAX: Duration = Duration::from_secs(1);

/// Accepts client connections on one socket for one proxy thread until
/// `stop`, at most as many at once as `slots` has permits (shared by the
/// socket's loops on every thread). See the module docs for when it pauses.
async fn accept_loop(
    listener: Listener,
    shared: Arc<Shared>,
    slots: Arc<Semaphore>,
    stop: CancellationToken,
) {
    use std::os::fd::AsRawFd;
    let tcp = shared.options.protocol == crate::config::Protocol::Tcp;
    let probe = listener.as_raw_fd();
    // Short of fds: wait this long before checking again.
    let mut pause: Option<Duration> = None;
    // When "max_connections reached" and "near the open-files limit" were
    // last logged: at most once a minute each per loop, as both can come at
    // every connection that closes.
    let mut warned: Option<std::time::Instant> = None;
    let mut warned_fds: Option<std::time::Instant> = None;
    let due = |at: &mut Option<std::time::Instant>| {
        let due = at.is_none_or(|t| t.elapsed() >= Duration::from_secs(60));
        if due {
            *at = Some(std::time::Instant::now());
        }
        due
    };
    loop {
        // A place under max_connections first: while there is none, nothing
        // is accepted and new clients wait in the backlog.
        let slot = match slots.clone().try_acquire_owned() {
            Ok(slot) => slot,
            Err(_) => {
                if due(&mut warned) {
                    tracing::warn!(program = %shared.program, "max_connections reached; new connections wait in the listen backlog until one closes");
                }
                tokio::select! {
                    () = stop.cancelled() => return,
                    slot = slots.clone().acquire_owned() => match slot {
                        Ok(slot) => slot,
                        // Never closed; should it be, accepting ends.
                        Err(_) => return,
                    },
                }
            }
        };
        if let Some(p) = pause {
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(p) => {}
            }
            if !crate::fds::has_room(probe, shared.fd_ceiling) {
                pause = Some((p * 2).min(PAUSE_MAX));
                continue;
            }
            tracing::debug!(program = %shared.program, "file descriptors free again; accepting");
            pause = None;
        }
        let accepted = tokio::select! {
            () = stop.cancelled() => return,
            r = listener.accept() => r,
        };
        // The client is served even when its fd is in the reserve; only
        // the next accept waits.
        let mut in_reserve = |fd: std::os::fd::RawFd| {
            let crowded = fd as u64 >= shared.fd_ceiling;
            if crowded && due(&mut warned_fds) {
                tracing::warn!(program = %shared.program, fd_ceiling = shared.fd_ceiling, "near the open-files limit: pausing accept to keep file descriptors for the control socket and spawning (new connections wait in the listen backlog)");
            }
            crowded
        };
        let crowded = match accepted {
            Ok(Accepted::Tcp(s, addr)) => {
                let _ = s.set_nodelay(true);
                let crowded = in_reserve(s.as_raw_fd());
                dispatch(s, Some(addr.ip()), tcp, &shared, slot);
                crowded
            }
            Ok(Accepted::Unix(s)) => {
                let crowded = in_reserve(s.as_raw_fd());
                dispatch(s, None, tcp, &shared, slot);
                crowded
            }
            // Running out of fds (or kernel memory) pauses; other errors
            // are the connection's own and are ignored.
            Err(e) => {
                let short = matches!(
                    e.raw_os_error(),
                    Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
                );
                if short && due(&mut warned_fds) {
                    tracing::warn!(program = %shared.program, cause = %e, "accept failed; pausing (new connections wait in the listen backlog)");
                }
                short
            }
        };
        if crowded {
            pause = Some(PAUSE_MIN);
        }
    }
}

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");

async fn serve<I>(
    io: I,
    peer: Option<std::net::IpAddr>,
    shared: Arc<Shared>,
    gate: Arc<framing::Gate>,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (header_timeout, max_header) = (
        shared.options.header_timeout,
        shared.options.max_header_bytes,
    );
    // The client's address as a header value, once per connection.
    let peer = peer.and_then(|ip| HeaderValue::from_str(&ip.to_string()).ok());
    let svc = hyper::service::service_fn(move |req| {
        let shared = shared.clone();
        let peer = peer.clone();
        let gate = gate.clone();
        async move { Ok::<_, Infallible>(handle(req, &peer, &shared, &gate).await) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(header_timeout)
        .max_header_size(max_header)
        .max_headers(MAX_HEADERS)
        // Room for the header plus some body; never below hyper's minimum.
        .max_buf_size((max_header + 16 * 1024).max(8192))
        .serve_connection(io, svc)
        .with_upgrades();
    if let Err(e) = conn.await {
        tracing::debug!(cause = %e, "client connection ended with an error");
    }
}

/// `protocol = "tcp"`: forwards one client connection, as bytes, to the
/// least loaded ready instance. The connection counts as in flight until
/// it closes. With no instance ready within `queue_timeout` (or while
/// draining) the client connection is closed: TCP has no 503.
async fn serve_tcp<S: splice::SpliceIo>(client: S, shared: Arc<Shared>) {
    if shared.draining.load(Ordering::SeqCst) {
        shared.traffic.unavailable.fetch_add(1, Ordering::Relaxed);
        return;
    }
    let mut tried: Vec<PrivateAddr> = Vec::new();
    let mut pin = canary::Pin::default();
    let (upstream, mut guard) = loop {
        // Counted from before the connect, so a drain cannot miss it.
        let (up, guard) = match route(&shared, &tried, &mut pin, &canary::NoKeys).await {
            Ok(routed) => routed,
            Err(Refused::Closed(why)) => {
                let (why, _) = closed_message(&shared, &why);
                tracing::info!(program = %shared.program, why = why.trim_end(), "gate closed; connection closed");
                return;
            }
            Err(Refused::NoInstance) if tried.is_empty() => {
                shared.traffic.unavailable.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(program = %shared.program, "no ready instance within queue_timeout; connection closed");
                return;
            }
            Err(Refused::NoInstance) => {
                tracing::warn!(program = %shared.program, "no instance could be reached; connection closed");
                return;
            }
        };
        // Nothing was sent yet: a connect failure is always safe to retry.
        match up.addr.connect_within(CONNECT_TIMEOUT).await {
            Ok(s) => break (s, guard),
            Err(e) => {
                tracing::warn!(program = %shared.program, upstream = %up.addr, cause = %e, "connect failed; trying another instance")
            }
        }
        guard.discard();
        tried.push(up.addr.clone());
    };
    // Until the upstream side ends; the client ending its side is passed on
    // as a half-close.
    let up = async {
        let _ = splice::pump(&client, &upstream).await;
        std::future::pending::<()>().await;
    };
    let copied = tokio::select! {
        r = splice::pump(&upstream, &client) => r,
        () = up => Ok(0),
    };
    if guard.is_cut() {
        tracing::warn!(program = %shared.program, "connection cut: the instance was stopped at max_wait");
        guard.fail();
    } else if let Err(e) = copied {
        tracing::debug!(program = %shared.program, cause = %e, "connection ended with an error");
    }
}

/// Most headers in a request or an answer (hyper's default, 100, is fewer
/// than nginx takes; the bytes are bounded by max_header_bytes).
const MAX_HEADERS: usize = 1024;

/// Bound on connecting to a private address.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Hop-by-hop headers, never forwarded (RFC 9110 7.6.1).
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::UPGRADE,
];

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Usually none is there: one pass over the names instead of a lookup each.
    if !headers.keys().any(|k| HOP_BY_HOP.contains(k)) {
        return;
    }
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in named {
        headers.remove(n);
    }
    for h in &HOP_BY_HOP {
        headers.remove(h);
    }
}

fn text(status: StatusCode, body: String) -> Response<ProxyBody> {
    let mut resp = Response::new(
        Full::new(Bytes::from(body))
            .map_err(|never| match never {})
            .boxed(),
    );
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

/// The text of a 503, counted as one.
fn unavailable_message(shared: &Shared) -> String {
    shared.traffic.unavailable.fetch_add(1, Ordering::Relaxed);
    format!(
        "503 Service Unavailable: {} has no ready instance\n",
        shared.program
    )
}

fn unavailable(shared: &Shared) -> Response<ProxyBody> {
    let mut resp = text(StatusCode::SERVICE_UNAVAILABLE, unavailable_message(shared));
    let h = resp.headers_mut();
    h.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    h.insert(header::CONNECTION, HeaderValue::from_static("close"));
    resp
}

/// The 503 of a program without a ready instance, as bytes (relay path).
fn unavailable_text(shared: &Shared) -> Vec<u8> {
    relay::text(
        "503 Service Unavailable",
        &unavailable_message(shared),
        "Retry-After: 1\r\nConnection: close\r\n",
    )
}

/// `Retry-After` of the 503 a request held past a pause's max gets.
const PAUSE_RETRY_AFTER: &str = "5";
/// `Retry-After` of a maintenance 503.
const MAINTENANCE_RETRY_AFTER: &str = "30";

/// The body and `Retry-After` of the 503 a closed gate answers, counted.
fn closed_message(shared: &Shared, why: &gate::Closed) -> (String, &'static str) {
    shared.traffic.unavailable.fetch_add(1, Ordering::Relaxed);
    match why {
        gate::Closed::Maintenance(message) => (message.to_string(), MAINTENANCE_RETRY_AFTER),
        gate::Closed::PauseExpired(max) => (
            format!(
                "503 Service Unavailable: {} is paused; this request waited {max:?} (max-pause)\n",
                shared.program
            ),
            PAUSE_RETRY_AFTER,
        ),
    }
}

/// The 503 of a closed gate (hyper path).
fn closed(shared: &Shared, why: &gate::Closed) -> Response<ProxyBody> {
    let (body, retry) = closed_message(shared, why);
    let mut resp = text(StatusCode::SERVICE_UNAVAILABLE, body);
    let h = resp.headers_mut();
    h.insert(header::RETRY_AFTER, HeaderValue::from_static(retry));
    h.insert(header::CONNECTION, HeaderValue::from_static("close"));
    resp
}

/// The 503 of a closed gate, as bytes (relay path).
fn closed_text(shared: &Shared, why: &gate::Closed) -> Vec<u8> {
    let (body, retry) = closed_message(shared, why);
    relay::text(
        "503 Service Unavailable",
        &body,
        &format!("Retry-After: {retry}\r\nConnection: close\r\n"),
    )
}

/// Why a request was not routed.
enum Refused {
    /// No instance not in `skip` was ready within `queue_timeout`.
    NoInstance,
    /// The gate: paused past max-pause, or maintenance.
    Closed(gate::Closed),
}

/// Passes the program's gate (held there while it is paused), then picks
/// the least loaded ready instance not in `skip` (waiting up to
/// `queue_timeout`), counted in flight from here. The one place every path
/// (relay, hyper, tcp) routes through, so a pause holds them all alike.
async fn route(
    shared: &Shared,
    skip: &[PrivateAddr],
    pin: &mut canary::Pin,
    keys: &(dyn canary::Keys + Sync),
) -> Result<(Arc<Upstream>, InflightGuard), Refused> {
    loop {
        shared
            .gate
            .admit(&shared.traffic.held)
            .await
            .map_err(Refused::Closed)?;
        let up = choose(shared, skip, pin, keys)
            .await
            .ok_or(Refused::NoInstance)?;
        let guard = InflightGuard::new(up.stats.clone());
        // Counted in flight before this second look, so a pause that began
        // meanwhile either sees this request or is seen here (gate.rs).
        if !shared.gate.shut() {
            return Ok((up, guard));
        }
        guard.discard();
    }
}

/// The least loaded upstream of `list` not in `skip`, ties round-robin.
fn pick_in(shared: &Shared, list: &[Arc<Upstream>], skip: &[PrivateAddr]) -> Option<Arc<Upstream>> {
    let n = list.len();
    let start = shared.next.fetch_add(1, Ordering::Relaxed);
    (0..n)
        .map(|i| &list[(start + i) % n])
        .filter(|u| !skip.contains(&u.addr))
        .min_by_key(|u| u.stats.inflight())
        .cloned()
}

/// The least loaded upstream not in `skip`, ties round-robin; during a
/// canary, of the side the request is pinned to (assigned now if it is
/// not yet), else of the other side.
fn pick(
    shared: &Shared,
    routes: &Routes,
    skip: &[PrivateAddr],
    pin: &mut canary::Pin,
    keys: &(dyn canary::Keys + Sync),
) -> Option<Arc<Upstream>> {
    let Some(c) = &routes.canary else {
        return pick_in(shared, &routes.upstreams, skip);
    };
    let (first, then) = match pin.side(Some(c), keys) {
        Some(canary::Side::Canary) => (&c.upstreams, &routes.upstreams),
        _ => (&routes.upstreams, &c.upstreams),
    };
    pick_in(shared, first, skip).or_else(|| pick_in(shared, then, skip))
}

/// Waits up to `queue_timeout` for an upstream (see [`pick`]).
async fn choose(
    shared: &Shared,
    skip: &[PrivateAddr],
    pin: &mut canary::Pin,
    keys: &(dyn canary::Keys + Sync),
) -> Option<Arc<Upstream>> {
    let picked = pick(shared, &shared.routes.borrow(), skip, pin, keys);
    match picked {
        Some(u) => Some(u),
        // Boxed: waiting is the rare path; its timer stays out of every request.
        None => Box::pin(wait_for_upstream(shared, skip, pin, keys)).await,
    }
}

/// Waits up to `queue_timeout` for an upstream to become ready.
async fn wait_for_upstream(
    shared: &Shared,
    skip: &[PrivateAddr],
    pin: &mut canary::Pin,
    keys: &(dyn canary::Keys + Sync),
) -> Option<Arc<Upstream>> {
    let mut rx = shared.routes.clone();
    let deadline = tokio::time::Instant::now() + shared.options.queue_timeout;
    loop {
        let routes = rx.borrow_and_update().clone();
        if let Some(u) = pick(shared, &routes, skip, pin, keys) {
            return Some(u);
        }
        match tokio::time::timeout_at(deadline, rx.changed()).await {
            Ok(Ok(())) => continue,
            _ => return None,
        }
    }
}

/// Copies bytes both ways between an upgraded client connection and its
/// upstream until the upstream side ends (closed, or killed at `max_wait`);
/// the client closing its side is passed on as a half-close.
async fn tunnel(
    client: hyper::upgrade::OnUpgrade,
    upstream: hyper::upgrade::OnUpgrade,
    mut guard: InflightGuard,
    program: String,
    path: String,
) {
    use tokio::io::AsyncWriteExt;
    let (client, upstream) = match tokio::join!(client, upstream) {
        (Ok(c), Ok(u)) => (TokioIo::new(c), TokioIo::new(u)),
        (c, u) => {
            let cause = c.err().or(u.err()).map(|e| e.to_string());
            tracing::warn!(%program, %path, ?cause, "upgrade failed");
            guard.fail();
            return;
        }
    };
    let (mut cr, mut cw) = tokio::io::split(client);
    let (mut ur, mut uw) = tokio::io::split(upstream);
    let up = async {
        let _ = tokio::io::copy(&mut cr, &mut uw).await;
        let _ = uw.shutdown().await;
        std::future::pending::<()>().await;
    };
    tokio::select! {
        _ = tokio::io::copy(&mut ur, &mut cw) => {}
        () = up => {}
    }
    let _ = cw.shutdown().await;
    if guard.is_cut() {
        tracing::warn!(%program, %path, "tunnel cut: the instance was stopped at max_wait");
        guard.fail();
    }
}

/// Tells the connection's [`framing::Gate`] how an Upgrade or CONNECT
/// request was answered, when its handling ends (however it ends).
struct Decision<'a> {
    gate: Option<&'a framing::Gate>,
    tunnel: bool,
}

impl Drop for Decision<'_> {
    fn drop(&mut self) {
        if let Some(g) = self.gate {
            g.decide(self.tunnel);
        }
    }
}

async fn handle(
    req: Request<Incoming>,
    peer: &Option<HeaderValue>,
    shared: &Shared,
    gate: &framing::Gate,
) -> Response<ProxyBody> {
    // The framing reader holds back what follows an Upgrade or CONNECT
    // request until this says whether it is a tunnel's.
    let switching = req.headers().contains_key(header::UPGRADE) || req.method() == Method::CONNECT;
    let mut decision = Decision {
        gate: switching.then_some(gate),
        tunnel: false,
    };
    if shared.draining.load(Ordering::SeqCst) {
        return unavailable(shared);
    }
    let path_and_query = req
        .uri()
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| hyper::http::uri::PathAndQuery::from_static("/"));
    let path = path_and_query.as_str();
    let connect = req.method() == Method::CONNECT;
    let mut req = req;
    // An Upgrade (WebSocket) request keeps its Upgrade header and, on 101,
    // becomes a tunnel that counts as in flight until it closes.
    let upgrade = req.headers().get(header::UPGRADE).cloned();
    let client_upgrade = upgrade.as_ref().map(|_| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    if let Some(u) = &upgrade {
        parts.headers.insert(header::UPGRADE, u.clone());
        parts
            .headers
            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
    if shared.options.forward_headers {
        if let Some(ip) = peer {
            let xff = match parts
                .headers
                .get(&X_FORWARDED_FOR)
                .map(HeaderValue::as_bytes)
            {
                Some(prev) => {
                    let mut v = Vec::with_capacity(prev.len() + 2 + ip.len());
                    v.extend_from_slice(prev);
                    v.extend_from_slice(b", ");
                    v.extend_from_slice(ip.as_bytes());
                    HeaderValue::from_bytes(&v).ok()
                }
                None => Some(ip.clone()),
            };
            if let Some(v) = xff {
                parts.headers.insert(X_FORWARDED_FOR, v);
            }
            parts.headers.insert(X_REAL_IP, ip.clone());
        }
        parts
            .headers
            .insert(X_FORWARDED_PROTO, HeaderValue::from_static("http"));
    }
    // The client's request goes upstream as it is, head and body: only the
    // headers above change, an absolute-form target becomes origin-form, and
    // a request without Host gets the instance's address.
    if parts.uri.scheme().is_some() || parts.uri.authority().is_some() {
        parts.uri = hyper::Uri::from(path_and_query.clone());
    }
    parts.version = hyper::Version::HTTP_11;
    parts.extensions.clear();
    let host_given = parts.headers.contains_key(header::HOST);
    let (body, body_state) = body::RequestBody::new(body, shared.options.body_timeout);
    let mut req = Request::from_parts(parts, body);
    let mut tried: Vec<PrivateAddr> = Vec::new();
    let mut pin = canary::Pin::default();
    loop {
        let (up, mut guard) = match route(shared, &tried, &mut pin, req.headers()).await {
            Ok(routed) => routed,
            Err(Refused::Closed(why)) => return closed(shared, &why),
            Err(Refused::NoInstance) if tried.is_empty() => return unavailable(shared),
            Err(Refused::NoInstance) => {
                return text(
                    StatusCode::BAD_GATEWAY,
                    "502 Bad Gateway: no instance could be reached\n".into(),
                )
            }
        };
        if !host_given {
            req.headers_mut().insert(header::HOST, up.authority.clone());
        }
        let sending = up.pool.send(req, shared.options.upstream_idle_timeout);
        // response_timeout runs from the moment the whole body went upstream.
        let no_answer = async {
            body_state.ended().await;
            tokio::time::sleep(shared.options.response_timeout).await;
        };
        let sent = tokio::select! {
            r = sending => r,
            () = no_answer => {
                guard.fail();
                tracing::warn!(program = %shared.program, upstream = %up.addr, %path, "no answer within response_timeout; answered 504");
                let mut resp = text(
                    StatusCode::GATEWAY_TIMEOUT,
                    "504 Gateway Timeout: the application did not answer within response_timeout\n".into(),
                );
                resp.headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
                return resp;
            }
        };
        match sent {
            Ok((mut resp, lease)) => {
                guard.status(resp.status().as_u16());
                if let Some(v) = pin
                    .set_cookie(&up)
                    .and_then(|c| HeaderValue::from_str(&c).ok())
                {
                    resp.headers_mut().append(header::SET_COOKIE, v);
                }
                // hyper hands a CONNECT answered 2xx over as upgraded.
                decision.tunnel = resp.status() == StatusCode::SWITCHING_PROTOCOLS
                    || (connect && resp.status().is_success());
                if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
                    if let Some(client) = client_upgrade {
                        let upstream = hyper::upgrade::on(&mut resp);
                        tokio::spawn(tunnel(
                            client,
                            upstream,
                            guard,
                            shared.program.clone(),
                            path.to_string(),
                        ));
                        // The connection is the tunnel now, never pooled again.
                        drop(lease);
                        let (rparts, _) = resp.into_parts();
                        return Response::from_parts(
                            rparts,
                            Empty::new().map_err(|never| match never {}).boxed(),
                        );
                    }
                }
                let (mut rparts, rbody) = resp.into_parts();
                strip_hop_by_hop(&mut rparts.headers);
                return Response::from_parts(
                    rparts,
                    GuardedBody::new(rbody, guard, lease, body_state).boxed(),
                );
            }
            // Not one byte reached the app, and the request came back whole
            // (its body too): try another instance.
            Err(pool::SendError::Connect(cause, unsent)) => {
                tracing::warn!(program = %shared.program, upstream = %up.addr, %cause, "connect failed; trying another instance");
                guard.discard();
                tried.push(up.addr.clone());
                req = *unsent;
            }
            Err(pool::SendError::Upstream(e)) => {
                // The client's doing, not the upstream's: its body stopped.
                match body_state.failed() {
                    body::CLIENT_SILENT => {
                        guard.abandon();
                        tracing::info!(program = %shared.program, %path, "client sent no request body for body_timeout; answered 408");
                        let mut resp = text(
                            StatusCode::REQUEST_TIMEOUT,
                            "408 Request Timeout: no request body within body_timeout\n".into(),
                        );
                        resp.headers_mut()
                            .insert(header::CONNECTION, HeaderValue::from_static("close"));
                        return resp;
                    }
                    body::CLIENT_GONE => {
                        guard.abandon();
                        tracing::debug!(program = %shared.program, %path, "client closed during the request body");
                        return text(
                            StatusCode::BAD_REQUEST,
                            "400 Bad Request: the request body broke off\n".into(),
                        );
                    }
                    _ => {}
                }
                guard.fail();
                if guard.is_cut() {
                    tracing::warn!(program = %shared.program, upstream = %up.addr, %path, "request cut: the instance was stopped at max_wait; answered 502");
                } else {
                    tracing::warn!(program = %shared.program, upstream = %up.addr, %path, cause = %e, "upstream failed; answered 502");
                }
                drop(guard);
                return text(
                    StatusCode::BAD_GATEWAY,
                    "502 Bad Gateway: the application failed to answer\n".into(),
                );
            }
        }
    }
}
/// A proxy's shared state with no routes, for unit tests.
#[cfg(test)]
fn test_shared() -> Arc<Shared> {
    let (_tx, rx) = watch::channel(Arc::new(Routes::default()));
    Arc::new(Shared {
        program: "t".into(),
        routes: rx,
        options: Options {
            queue_timeout: Duration::from_secs(1),
            header_timeout: Duration::from_secs(1),
            response_timeout: Duration::from_secs(1),
            body_timeout: Duration::from_secs(1),
            upstream_idle_timeout: Duration::from_secs(1),
            max_header_bytes: 8192,
            forward_headers: true,
            protocol: crate::config::Protocol::Http,
            max_connections: None,
        },
        fd_ceiling: u64::MAX,
        next: AtomicUsize::new(0),
        traffic: Arc::new(Traffic::default()),
        draining: Arc::new(AtomicBool::new(false)),
        gate: gate::GateTx::new().subscribe(),
    })
}
