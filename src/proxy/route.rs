//! Routing: the [`RouteTable`] the program actor publishes to, the
//! [`Routes`] in it (one [`Upstream`] per ready process, with its pools), and
//! `route`, the one function every request (tcp: connection) passes on all
//! three paths: the program's gate first, then the least loaded ready
//! instance (`pick`), waiting up to `queue_timeout` for one (`choose`).

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use hyper::header::HeaderValue;
use tokio::sync::{watch, Semaphore};

use super::{
    canary, gate, pool, relay, Canary, Gate, InflightGuard, PrivateAddr, Shared, Traffic,
    UpstreamStats,
};

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
    pub(super) authority: HeaderValue,
    /// Idle connections for the hyper path, per proxy thread.
    pub(super) pool: Arc<pool::Pool>,
    /// Idle connections for the relay path, per proxy thread.
    pub(super) idle: relay::Idle,
}

impl Upstream {
    /// An upstream at `addr`, a process of generation `gen`, with idle
    /// lists for `threads` proxy threads.
    pub(super) fn new(
        addr: PrivateAddr,
        program: &Arc<Traffic>,
        gen: u64,
        threads: usize,
    ) -> Arc<Self> {
        Arc::new(Self {
            gen,
            authority: addr.host(),
            pool: pool::Pool::new(addr.clone(), threads),
            idle: relay::Idle::new(threads),
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
    pub(super) routes: watch::Sender<Arc<Routes>>,
    /// Set by `zdtctl drain`: every new request gets 503 at once.
    pub(super) draining: Arc<AtomicBool>,
    /// Set by `zdtctl pause`, `maintenance` and `resume`: whether new
    /// requests go on, wait, or get 503 (see `gate.rs`).
    pub(super) gate: gate::GateTx,
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
    pub(super) fn limit_for(&self, fd: &OwnedFd, max: usize) -> Arc<Semaphore> {
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

/// Why a request was not routed.
pub(super) enum Refused {
    /// No instance not in `skip` was ready within `queue_timeout`.
    NoInstance,
    /// The gate: paused past max-pause, or maintenance.
    Closed(gate::Closed),
}

/// Passes the program's gate (held there while it is paused), then picks
/// the least loaded ready instance not in `skip` (waiting up to
/// `queue_timeout`), counted in flight from here. The one place every path
/// (relay, hyper, tcp) routes through, so a pause holds them all alike.
pub(super) async fn route(
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
