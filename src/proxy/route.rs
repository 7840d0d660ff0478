//! Routing: the [`Routes`] the proxy's connection tasks read (one
//! [`Upstream`] per routed process, with its pools, built by the program's
//! `RouteTable` from the plain data the program publishes, `table.rs`), and
//! `route`, the one function every request (tcp: connection) passes on all
//! three paths: the program's gate first, then the least loaded ready
//! instance (`pick`), waiting up to `queue_timeout` for one (`choose`).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use hyper::header::HeaderValue;

use super::table::{ProcessId, Route};
use super::traffic::UpstreamStats;
use super::{canary, gate, pool, relay, Canary, InflightGuard, PrivateAddr, Shared};

/// One worker process's private address, with its own connection pool.
/// The program's `RouteTable` and the requests routed to it hold it;
/// dropping the last reference closes its idle upstream connections.
#[derive(Debug)]
pub(crate) struct Upstream {
    /// The process.
    pub id: ProcessId,
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
    /// An upstream for process `id` at `addr`, counted in `stats`, with
    /// idle lists for `threads` proxy threads.
    pub(super) fn new(
        id: ProcessId,
        addr: PrivateAddr,
        stats: Arc<UpstreamStats>,
        threads: usize,
    ) -> Arc<Self> {
        Arc::new(Self {
            id,
            gen: id.generation,
            authority: addr.host(),
            pool: pool::Pool::new(addr.clone(), threads),
            idle: relay::Idle::new(threads),
            addr,
            stats,
        })
    }
}

/// The ready instances requests may go to.
#[derive(Debug, Default)]
pub(crate) struct Routes {
    /// In no particular order.
    pub upstreams: Vec<Arc<Upstream>>,
    /// During a canary: the canary generation and its share; `upstreams`
    /// are then the stable generation's (see `canary.rs`).
    pub canary: Option<Canary>,
}

impl Routes {
    /// The upstream of `route` in these routes (same process, same address).
    pub(super) fn find(&self, route: &Route) -> Option<&Arc<Upstream>> {
        self.upstreams
            .iter()
            .chain(self.canary.iter().flat_map(|c| &c.upstreams))
            .find(|u| u.id == route.process && u.addr == route.addr)
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
    let began = tokio::time::Instant::now();
    let deadline = began + shared.options.queue_timeout;
    let found = loop {
        let routes = rx.borrow_and_update().clone();
        if let Some(u) = pick(shared, &routes, skip, pin, keys) {
            break Some(u);
        }
        match tokio::time::timeout_at(deadline, rx.changed()).await {
            Ok(Ok(())) => continue,
            _ => break None,
        }
    };
    shared.traffic.stats.queued(began.elapsed());
    found
}
