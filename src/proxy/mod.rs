//! Proxy mode: zdt accepts on the sockets it owns and forwards each HTTP
//! request to a ready instance's private address, so it sees every request.
//!
//! The proxy is a component given listening sockets and a routing table,
//! reporting request counters. A program actor talks to it only across the
//! boundary below, in plain data. By default the component runs in a
//! process of its own, `zdt __proxy` (`remote/`: the calls become messages
//! on a channel, and the proxy process outlives zdt's exec during an
//! upgrade); with `[supervisor] proxy_process = false` it runs on threads
//! of zdt's own process (`boundary.rs` is the enum of the two). The data
//! path never waits on an actor: it reads the routes the table built (one
//! `watch` borrow per request; switching generations is one `send`) and
//! counts each request in flight with an RAII guard held until the
//! response body has been sent.
//!
//! # The boundary
//!
//! | direction | call                                   | carries                                        |
//! |-----------|----------------------------------------|------------------------------------------------|
//! | in        | [`Proxy::table`]                       | a new program's [`RouteTable`]                 |
//! | in        | [`Proxy::start`] → [`ProxyHandle`]     | listening sockets, [`Options`]; drop: stop accepting |
//! | in        | [`RouteTable::publish`]                | a [`RouteSet`]: [`Route`]s (process, address), the [`CanarySplit`], the counted [`ProcessId`]s |
//! | in        | [`RouteTable::set_draining`], [`RouteTable::set_gate`], [`RouteTable::set_proxied`] | a flag, a [`Gate`] |
//! | in        | [`LocalProxy::retire`], [`Proxy::ready`], [`Proxy::shutdown`] | before an exec (in-process), after one (retires the previous proxy process), at exit |
//! | out       | [`Counters::read`]                     | a [`ProgramCounts`]: totals, held, per process, per generation |
//! | out       | [`Counters::wait_idle`], [`Counters::drain`] → [`Drain::idle`] | "in flight reached zero", for the whole program (pause) or one process (drain); [`Drain::cut`] marks the rest cut at `max_wait` |
//!
//! What goes in holds no data-path object: the proxy owns every upstream
//! and its connection pools. On each publish the table keeps the upstream
//! of a process that stays routed (same [`ProcessId`], same address),
//! builds one for a newly routed process, and lets go of the rest; an
//! upstream no longer routed closes its idle connections once no request
//! holds it. Counters live per counted process, from the first publish that
//! counts it to the first that leaves it out; a [`Drain`] keeps its
//! process's counters past that. Across the channel, reads and waits are
//! questions the proxy process answers, a wait once its count reaches zero.
//!
//! Two HTTP paths share this: ordinary HTTP/1.1 requests go through
//! `relay.rs` (zdt's own head parsing and body relaying, with the codec in
//! `codec/`), and what it hands over (HTTP/1.0, Upgrade, Expect, malformed
//! heads) through hyper's server and client (`hyper_path.rs`), read through
//! `framing.rs`, which judges heads and follows bodies with the same codec.
//!
//! # Component map
//!
//! ```text
//!  program actor ──RouteTable: RouteSet (plain), drain flag, gate──┐
//!                 ◄──Counters: ProgramCounts, idle waits─────────┐  │
//!                                                                │  ▼
//!  boundary.rs  the boundary: Proxy, RouteTable, Counters, Drain, each
//!               local or remote
//!  remote/      the proxy process: the channel and its messages (mod.rs),
//!               zdt's side (client.rs: starts, restarts and feeds the
//!               process, retires a previous binary's), the process's
//!               side (server.rs: orders applied to a LocalProxy)
//!  table.rs     LocalTable (builds Routes and their Upstreams from a
//!               RouteSet), LocalCounters, LocalDrain
//!  mod.rs       LocalProxy::start(): sockets, options, a table → handle
//!  workers.rs   the proxy threads (one current-thread runtime each),
//!               per-thread idle lists, which thread a connection goes to
//!  accept.rs    accept_loop per socket per thread: max_connections, fd
//!               reserve pause; dispatch to the least loaded thread
//!  retire.rs    Proxy::retire before zdt re-executes itself: accepting
//!               paused, connections closed at a request boundary (idle
//!               ones after a grace), waits for them; Retired resumes on drop
//!     │ client connection
//!     ├─ http ─► relay.rs     HTTP/1.1 relay: a connection's loop, hand-over
//!     │   relay/forward.rs    one request: drain, send, resend rule, 502/504
//!     │   relay/bodies.rs     bodies both ways by their framing (duplex)
//!     │   relay/buffer.rs     read buffers kept per thread between uses
//!     │   relay/idle.rs       the relay's pooled upstream connections
//!     │     └ hands over ─► hyper_path.rs  hyper server + client
//!     │                       (pool.rs, body.rs), Upgrade tunnels
//!     │   framing.rs          the hyper path's framing check, Upgrade hold-back
//!     │   codec/mod.rs        HTTP/1 codec of both: body framing, header names
//!     │   codec/request.rs    request heads: framing rules, parse, head end
//!     │   codec/response.rs   response heads from a worker
//!     │   codec/chunked.rs    the chunk follower (strict, or as hyper reads)
//!     └─ tcp ──► tcp.rs       bytes, copied then spliced (splice.rs)
//!  route.rs     Routes, Upstream (a routed process: address, counters,
//!               pools); route(): the gate (gate.rs), then pick/choose the least
//!               loaded upstream (canary.rs splits by generation)
//!  traffic.rs   counters: Traffic, UpstreamStats (per counted process),
//!               InflightGuard (drain waits on their in-flight counts)
//!  answers.rs   what a refused request gets (503: no instance, closed gate)
//!  addr.rs      private addresses (TCP port or Unix socket) and connecting
//! ```
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
//! stops, and never spins, in three cases; clients then wait in the listen
//! backlog and the listener stays open (nginx's behaviour):
//! - the proxy is retired ([`LocalProxy::retire`], before zdt re-executes
//!   itself): it accepts again if the [`Retired`] is dropped;
//! - the listener holds `max_connections` open client connections (a
//!   semaphore shared by its accept loops; a permit lives as long as the
//!   connection): it accepts again when one closes;
//! - zdt is short of fds: accept failed with EMFILE/ENFILE, or the new
//!   client's fd landed in the reserve kept for the control socket and
//!   spawning (see [`crate::fds`]): it checks again after 100 ms, then up to
//!   every second, until the lowest free fd is below the reserve.

mod accept;
mod addr;
mod answers;
mod body;
mod boundary;
mod canary;
mod codec;
mod framing;
mod gate;
mod hyper_path;
mod pool;
mod relay;
mod remote;
mod retire;
mod route;
mod splice;
mod stats;
mod table;
mod tcp;
mod traffic;
mod workers;

pub use addr::PrivateAddr;
pub use boundary::{Counters, Drain, Proxy, ProxyHandle, RouteTable, RETIRE_DEADLINE};
pub use canary::{GenStats, COOKIE as CANARY_COOKIE};
pub use gate::Gate;
pub use remote::{serve as serve_process, take_channel, Retiring};
pub use retire::Retired;
pub use stats::{HistogramCounts, TrafficStats, BOUNDS_US};
use table::LocalTable;
pub use table::{CanarySplit, GenerationCounts, ProcessId, ProgramCounts, Route, RouteSet};

use canary::Canary;
use route::{Routes, Upstream};
use traffic::Traffic;

/// The parsers the fuzz targets call ([`crate::fuzz`]).
pub(crate) use {framing::fuzz as framing_fuzz, relay::fuzz as relay_fuzz};

use answers::{closed_text, unavailable_text};
use hyper_path::serve;
use route::{route, Refused};
pub(crate) use traffic::InflightGuard;

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use tokio::sync::{watch, Semaphore};
use tokio_util::sync::CancellationToken;

use accept::{accept_loop, Listener};

pub use crate::state::RequestCounts;

/// Response body type of the proxy.
pub type ProxyBody = BoxBody<Bytes, hyper::Error>;

/// The accept loops of one [`LocalProxy::start`]. Dropping it stops
/// accepting; connections that are open finish on their own, routed by the
/// program's live table.
#[derive(Debug)]
pub struct LocalHandle {
    /// Cancels the accept loops.
    stop: CancellationToken,
}

impl Drop for LocalHandle {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

struct Shared {
    program: String,
    /// The proxy threads connections are spread over.
    workers: Arc<workers::Workers>,
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
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
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

/// The proxy component in this process: its threads (`[supervisor]
/// proxy_threads`, started when the first program needs them), on which
/// every proxied program's accept loops, client connections and upstream
/// connections run. The daemon (in-process mode) or `zdt __proxy` creates
/// one and shuts it down when it ends; clones share it.
#[derive(Clone, Debug)]
pub struct LocalProxy {
    workers: Arc<workers::Workers>,
}

impl LocalProxy {
    /// A proxy of `threads` threads (1 to 64); none runs before it is used.
    pub fn new(threads: usize) -> Self {
        Self {
            workers: Arc::new(workers::Workers::new(threads)),
        }
    }

    /// Starts accepting on `sockets` for `program`, routing by `table`.
    pub fn start(
        &self,
        program: &str,
        sockets: &[Arc<OwnedFd>],
        options: Options,
        table: &LocalTable,
    ) -> std::io::Result<LocalHandle> {
        start(&self.workers, program, sockets, options, table)
    }

    /// A new program's routing table on this proxy: empty, not draining,
    /// gate open. Its upstreams keep their connection pools on this
    /// proxy's threads.
    pub fn table(&self) -> LocalTable {
        LocalTable::new(self.workers.clone())
    }

    /// Hands over before zdt re-executes itself: every accept loop stops
    /// accepting (the listening sockets stay open, so new clients wait in
    /// the listen backlog for the new process; proxies started meanwhile
    /// do not accept either), and every client connection closes at its
    /// next request boundary. An HTTP answer not yet begun says
    /// `Connection: close` and its connection closes after it; an idle
    /// keep-alive connection waits up to `grace` for one more request
    /// (answered the same way), then closes; `protocol = "tcp"`
    /// connections and Upgrade tunnels are waited for.
    ///
    /// Resolves when no client connection is open, or once `deadline` has
    /// passed; the [`Retired`] says how many were still open then (the
    /// exec cuts them) and how long it took. Dropping it, or this future
    /// before it resolves, resumes: accepting again, keeping alive again.
    /// [`Retired::commit`] keeps the proxy retired for the exec.
    pub async fn retire(&self, grace: Duration, deadline: Duration) -> Retired {
        retire::retire(self.workers.conns(), grace, deadline).await
    }

    /// Stops the proxy threads and everything on them (accept loops, client
    /// and upstream connections), and waits for them to end. Proxies started
    /// later accept nothing.
    pub fn shutdown(&self) {
        self.workers.shutdown();
    }
}

/// Starts accepting on `sockets` for `program` on the threads of `workers`,
/// routing by `table`.
fn start(
    workers: &Arc<workers::Workers>,
    program: &str,
    sockets: &[Arc<OwnedFd>],
    options: Options,
    table: &LocalTable,
) -> std::io::Result<LocalHandle> {
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
        traffic: table.traffic.clone(),
        workers: workers.clone(),
    });
    let threads = workers.handles();
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
    Ok(LocalHandle { stop })
}

/// Most headers in a request or an answer (hyper's default, 100, is fewer
/// than nginx takes; the bytes are bounded by max_header_bytes).
const MAX_HEADERS: usize = 1024;

/// Bound on connecting to a private address.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The size of the future a client connection's function returns, without
/// making one (a connection's task holds it for as long as it is open).
#[cfg(test)]
fn returned_size<A, B, C, D, E, R>(_: fn(A, B, C, D, E) -> R) -> usize {
    std::mem::size_of::<R>()
}

/// A proxy's shared state with no routes, for unit tests.
#[cfg(test)]
fn test_shared() -> Arc<Shared> {
    test_shared_on(1)
}

/// [`test_shared`] with `threads` proxy threads.
#[cfg(test)]
fn test_shared_on(threads: usize) -> Arc<Shared> {
    let (_tx, rx) = watch::channel(Arc::new(Routes::default()));
    Arc::new(Shared {
        program: "t".into(),
        workers: Arc::new(workers::Workers::new(threads)),
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
