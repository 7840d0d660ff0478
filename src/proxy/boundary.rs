//! The boundary a program actor sees: the same calls whether the proxy
//! runs in zdt's own process (in-process mode) or in a `zdt __proxy` child
//! (`[supervisor] proxy_process = true`, see `remote/`). Each type is an
//! enum of the two: the local one calls the proxy's objects directly, the
//! remote one sends the call as a message and, where the call answers,
//! waits for the answer.
//!
//! Reads and waits are `async` for that reason. What the program actor set
//! itself (the drain flag, the gate) is answered from a copy kept on this
//! side, so those reads stay synchronous and exact.

use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::remote;
use super::table::{LocalCounters, LocalDrain, LocalTable};
use super::{Gate, LocalHandle, LocalProxy, Options, ProcessId, ProgramCounts, RouteSet};

/// The proxy component as the daemon holds it. Clones share it.
#[derive(Clone, Debug)]
pub enum Proxy {
    /// Threads of this process.
    Local(LocalProxy),
    /// A `zdt __proxy` child, restarted if it dies.
    Remote(remote::Client),
}

impl Proxy {
    /// An in-process proxy of `threads` threads (1 to 64); none runs
    /// before it is used.
    pub fn new(threads: usize) -> Self {
        Self::Local(LocalProxy::new(threads))
    }

    /// A proxy in a child process of `threads` threads, started (and
    /// restarted when it dies) through `spawner`. `old` is the proxy
    /// process a previous binary left running (an upgrade): it is retired
    /// once this one takes connections (see [`Proxy::ready`]).
    pub fn in_child(
        threads: usize,
        spawner: crate::spawn::Spawner,
        old: Option<remote::Retiring>,
    ) -> Self {
        Self::Remote(remote::Client::start(threads, spawner, old))
    }

    /// Starts accepting on `sockets` for `program`, routing by `table`.
    /// Dropping the handle stops accepting.
    pub fn start(
        &self,
        program: &str,
        sockets: &[Arc<OwnedFd>],
        options: Options,
        table: &RouteTable,
    ) -> std::io::Result<ProxyHandle> {
        match (self, table) {
            (Self::Local(p), RouteTable::Local(t)) => p
                .start(program, sockets, options, t)
                .map(ProxyHandle::Local),
            (Self::Remote(c), RouteTable::Remote(t)) => {
                Ok(ProxyHandle::Remote(c.start_proxy(t, sockets, options)))
            }
            _ => Err(std::io::Error::other(
                "a route table of another proxy (internal error)",
            )),
        }
    }

    /// A new program's routing table on this proxy: empty, not draining,
    /// gate open.
    pub fn table(&self, program: &str) -> RouteTable {
        match self {
            Self::Local(p) => RouteTable::Local(p.table()),
            Self::Remote(c) => RouteTable::Remote(c.table(program)),
        }
    }

    /// The in-process proxy, which an upgrade retires before the exec.
    pub fn local(&self) -> Option<&LocalProxy> {
        match self {
            Self::Local(p) => Some(p),
            Self::Remote(_) => None,
        }
    }

    /// The proxy process, which an upgrade leaves running for the next
    /// binary to retire.
    pub fn remote(&self) -> Option<&remote::Client> {
        match self {
            Self::Local(_) => None,
            Self::Remote(c) => Some(c),
        }
    }

    /// Resolves once the proxy has applied everything sent to it so far
    /// (remote: every route and start is in force in the child), then
    /// retires the proxy process a previous binary left, if any, within
    /// `deadline`.
    pub async fn ready(&self, deadline: Duration) {
        if let Self::Remote(c) = self {
            c.ready(deadline).await;
        }
    }

    /// Stops the proxy (threads, or child process) and everything on it.
    pub fn shutdown(&self) {
        match self {
            Self::Local(p) => p.shutdown(),
            Self::Remote(c) => c.shutdown(),
        }
    }
}

/// The accept loops of one [`Proxy::start`]. Dropping it stops accepting;
/// connections already open finish, routed by the program's live table.
#[derive(Debug)]
pub enum ProxyHandle {
    /// In this process.
    Local(LocalHandle),
    /// In the proxy process.
    Remote(remote::StartHandle),
}

/// The routing state of one program (see `table.rs`): the program actor
/// owns it for the program's whole life and publishes to it. Dropping it
/// drops the program's routes, gate and counters in the proxy.
#[derive(Debug)]
pub enum RouteTable {
    /// In this process.
    Local(LocalTable),
    /// In the proxy process, with the flag and gate mirrored here.
    Remote(remote::Table),
}

impl RouteTable {
    /// Marks the program as proxied (its counters are read) or not.
    pub fn set_proxied(&self, on: bool) {
        match self {
            Self::Local(t) => t.set_proxied(on),
            Self::Remote(t) => t.set_proxied(on),
        }
    }

    /// The program's counters, for whoever reads them.
    pub fn counters(&self) -> Counters {
        match self {
            Self::Local(t) => Counters::Local(t.counters()),
            Self::Remote(t) => Counters::Remote(t.counters()),
        }
    }

    /// Starts or ends a drain: while draining, new requests get 503 at once.
    pub fn set_draining(&self, on: bool) {
        match self {
            Self::Local(t) => t.set_draining(on),
            Self::Remote(t) => t.set_draining(on),
        }
    }

    /// Whether a drain is in force.
    pub fn is_draining(&self) -> bool {
        match self {
            Self::Local(t) => t.is_draining(),
            Self::Remote(t) => t.is_draining(),
        }
    }

    /// Opens, pauses or closes the gate new requests pass (pause and
    /// maintenance); requests already routed are not touched.
    pub fn set_gate(&self, gate: Gate) {
        match self {
            Self::Local(t) => t.set_gate(gate),
            Self::Remote(t) => t.set_gate(gate),
        }
    }

    /// The gate as it is.
    pub fn gate(&self) -> Gate {
        self.watch_gate().borrow().clone()
    }

    /// A receiver that sees every change of the gate.
    pub fn watch_gate(&self) -> watch::Receiver<Gate> {
        match self {
            Self::Local(t) => t.watch_gate(),
            Self::Remote(t) => t.watch_gate(),
        }
    }

    /// Publishes `set`: the proxy routes by it from now on, and counts the
    /// requests of its counted processes.
    pub fn publish(&self, set: &RouteSet) {
        match self {
            Self::Local(t) => t.publish(set),
            Self::Remote(t) => t.publish(set),
        }
    }
}

/// Reads a program's counters (the way out of the boundary). Clones share
/// them.
#[derive(Clone, Debug)]
pub enum Counters {
    /// In this process.
    Local(LocalCounters),
    /// Asked of the proxy process.
    Remote(remote::Counters),
}

impl Counters {
    /// The counters as they are now; None unless the program is proxied.
    pub async fn read(&self) -> Option<ProgramCounts> {
        match self {
            Self::Local(c) => c.read(),
            Self::Remote(c) => c.read().await,
        }
    }

    /// Requests (tcp: connections) held by a pause right now.
    pub async fn held(&self) -> u64 {
        self.read().await.map_or(0, |c| c.held)
    }

    /// Requests in flight on all counted processes.
    pub async fn inflight(&self) -> u64 {
        self.read().await.map_or(0, |c| c.totals.inflight)
    }

    /// Resolves once the proxy has applied every order sent to it before
    /// (at once in-process).
    pub async fn applied(&self) {
        if let Self::Remote(c) = self {
            c.applied().await;
        }
    }

    /// Resolves when no request is in flight on any counted process.
    pub async fn wait_idle(&self) {
        match self {
            Self::Local(c) => c.wait_idle().await,
            Self::Remote(c) => c.wait_idle().await,
        }
    }

    /// The drain of process `id`: its in-flight count as it is from now on,
    /// even once it is no longer counted.
    pub fn drain(&self, id: ProcessId) -> Drain {
        match self {
            Self::Local(c) => Drain::Local(c.drain(id)),
            Self::Remote(c) => Drain::Remote(c.drain(id)),
        }
    }
}

/// One process's requests in flight, for its drain.
#[derive(Debug)]
pub enum Drain {
    /// In this process.
    Local(LocalDrain),
    /// In the proxy process (and in one a previous binary left, until it
    /// has retired).
    Remote(remote::Drain),
}

impl Drain {
    /// Resolves when the process has no request in flight.
    pub async fn idle(&self) {
        match self {
            Self::Local(d) => d.idle().await,
            Self::Remote(d) => d.idle().await,
        }
    }

    /// Marks the requests still in flight as cut (zdt stops the process
    /// before they finished); how many.
    pub async fn cut(&self) -> u64 {
        match self {
            Self::Local(d) => d.cut(),
            Self::Remote(d) => d.cut().await,
        }
    }
}

/// How long the proxy process a previous binary left may take to close its
/// idle keep-alive connections: each gets this long to send one more
/// request (answered with `Connection: close`).
pub const RETIRE_IDLE_GRACE: Duration = Duration::from_secs(1);

/// How long a proxy process a previous binary left may take to retire when
/// no program is proxied (it has no request to finish), or when this binary
/// proxies in-process.
pub const RETIRE_DEADLINE: Duration = Duration::from_secs(30);
