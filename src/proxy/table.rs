//! The plain data that crosses the boundary ([`RouteSet`] in,
//! [`ProgramCounts`] out) and the proxy's side of it in the process that
//! runs the proxy: a program's [`LocalTable`], its [`LocalCounters`] and a
//! process's [`LocalDrain`] (`boundary.rs` wraps them for the program
//! actor, directly or across the proxy process's channel).
//!
//! Nothing published refers to a data-path object. The table turns a
//! [`RouteSet`] into the [`Routes`] the proxy's connection tasks read (one
//! [`Upstream`], with its connection pools, per routed process): it keeps
//! the upstream of a process that stays routed, builds one for a process
//! routed for the first time, and lets go of the others (an upstream no
//! longer routed closes its idle connections once no request holds it). So
//! the proxy owns its upstreams and pools.

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use tokio::sync::{watch, Semaphore};

use super::route::{Routes, Upstream};
use super::traffic::{Traffic, UpstreamStats};
use super::{canary, gate, workers, Gate, PrivateAddr, RequestCounts};

/// Which process: unique among a program's processes for zdt's life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ProcessId {
    /// Its instance number.
    pub instance: u32,
    /// Its generation.
    pub generation: u64,
    /// Tells apart the processes an instance runs one after the other in
    /// one generation (a respawn after a crash), which count afresh.
    pub serial: u64,
}

/// A process requests may be routed to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    /// The process.
    pub process: ProcessId,
    /// Where it listens.
    pub addr: PrivateAddr,
}

/// The canary half of a program's routes (see `canary.rs`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CanarySplit {
    /// The canary generation.
    pub generation: u64,
    /// The generation that keeps the rest of the traffic.
    pub stable_generation: u64,
    /// Share of new clients sent to the canary, 1 to 99.
    pub percent: u8,
    /// `canary_header`: assign by a hash of this header's value.
    pub header: Option<String>,
    /// The canary's ready processes.
    pub routes: Vec<Route>,
}

/// Everything a program publishes to the proxy after a change: plain data.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteSet {
    /// The ready processes (during a canary: the stable generation's), in
    /// the order ties between equally loaded ones are taken round-robin.
    pub routes: Vec<Route>,
    /// During a canary, its generation and share.
    pub canary: Option<CanarySplit>,
    /// Every process whose requests are counted: routed ones, and those
    /// starting or draining. A process's counters live from its first
    /// publish to the first publish that leaves it out.
    pub counted: Vec<ProcessId>,
}

/// Requests, 5xx answers and latency of one generation (what judges a
/// canary).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GenerationCounts {
    /// The generation.
    pub generation: u64,
    /// Requests answered.
    pub requests: u64,
    /// 5xx answers (the application's and zdt's 502/504).
    pub errors_5xx: u64,
    /// 99th percentile of latency in microseconds (None before any request).
    pub p99_us: Option<u64>,
}

/// A program's request counters at one moment: plain data.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProgramCounts {
    /// Across all its generations; `inflight` summed over counted processes.
    pub totals: RequestCounts,
    /// Requests (tcp: connections) held by a pause right now.
    pub held: u64,
    /// Each counted process's counters.
    pub processes: Vec<(ProcessId, RequestCounts)>,
    /// The newest few generations' counters.
    pub generations: Vec<GenerationCounts>,
    /// Status classes, durations, queue waits, connect errors, resends.
    #[serde(default)]
    pub stats: super::stats::TrafficStats,
    /// Not read from the proxy (its process is being replaced): zeros that
    /// `/metrics` must not show as counter values.
    #[serde(skip)]
    pub stale: bool,
}

impl ProgramCounts {
    /// The counters of the process of `instance` in `generation`.
    pub fn of(&self, instance: u32, generation: u64) -> Option<RequestCounts> {
        self.processes
            .iter()
            .find(|(p, _)| p.instance == instance && p.generation == generation)
            .map(|(_, c)| *c)
    }

    /// The counters of `generation`.
    pub fn of_gen(&self, generation: u64) -> Option<GenerationCounts> {
        self.generations
            .iter()
            .find(|g| g.generation == generation)
            .copied()
    }
}

/// Reads a program's counters (the way out of the boundary). Clones share
/// them; holding one keeps nothing of the data path alive but counters.
#[derive(Clone, Debug)]
pub struct LocalCounters {
    traffic: Arc<Traffic>,
}

impl LocalCounters {
    /// The counters as they are now; None unless the program is proxied.
    pub fn read(&self) -> Option<ProgramCounts> {
        self.traffic.is_proxied().then(|| self.traffic.read())
    }

    /// The counters of process `id`, while it is counted.
    pub fn of(&self, id: ProcessId) -> Option<RequestCounts> {
        self.traffic.stats_of(id).map(|s| s.counts())
    }

    /// Requests (tcp: connections) held by a pause right now.
    pub fn held(&self) -> u64 {
        self.traffic.held()
    }

    /// Requests in flight on all counted processes.
    pub fn inflight(&self) -> u64 {
        self.traffic.totals().inflight
    }

    /// Resolves when no request is in flight on any counted process (each
    /// wakes this when its count reaches zero; nothing polls).
    pub async fn wait_idle(&self) {
        self.traffic.wait_idle().await;
    }

    /// The drain of process `id`: its in-flight count as it is from now on,
    /// even once it is no longer counted.
    pub fn drain(&self, id: ProcessId) -> LocalDrain {
        LocalDrain {
            stats: self.traffic.stats_of(id),
        }
    }
}

/// One process's requests in flight, for its drain: taken when the drain
/// begins (see [`LocalCounters::drain`]).
#[derive(Debug)]
pub struct LocalDrain {
    /// None: the process was never counted, so nothing can be in flight.
    stats: Option<Arc<UpstreamStats>>,
}

impl LocalDrain {
    /// Resolves when the process has no request in flight.
    pub async fn idle(&self) {
        if let Some(s) = &self.stats {
            s.wait_idle().await;
        }
    }

    /// Marks the requests still in flight as cut (zdt stops the process
    /// before they finished: their failures count as cut); how many.
    pub fn cut(&self) -> u64 {
        self.stats.as_ref().map_or(0, |s| {
            s.cutting();
            s.inflight()
        })
    }
}

/// The routing state of one program: the table its proxies route by, its
/// drain flag and its pause / maintenance gate. The program actor owns it
/// for the program's whole life and publishes to it; every accept loop and
/// every client connection of every proxy the program ever started reads
/// it. So a reload that replaces the program's proxy (new sockets, new
/// options) leaves no client connection on a frozen table: connections
/// accepted before it follow the live routes. Dropping it drops the gate
/// (held requests go on) and every upstream not held by a request.
#[derive(Debug)]
pub struct LocalTable {
    /// The table; proxies' connection tasks hold receivers.
    pub(super) routes: watch::Sender<Arc<Routes>>,
    /// Set by `zdtctl drain`: every new request gets 503 at once.
    pub(super) draining: Arc<AtomicBool>,
    /// Set by `zdtctl pause`, `maintenance` and `resume`: whether new
    /// requests go on, wait, or get 503 (see `gate.rs`).
    pub(super) gate: gate::GateTx,
    /// The program's counters, written by the data path.
    pub(super) traffic: Arc<Traffic>,
    /// The proxy threads upstreams keep their idle connections for.
    workers: Arc<workers::Workers>,
    /// `max_connections` per listening socket (by the socket's inode, its
    /// permit count, the semaphore): kept across the proxies a reload
    /// replaces, so connections from before a reload still count.
    limits: Mutex<Vec<(u64, usize, Arc<Semaphore>)>>,
    /// The program's name (set by the proxy process, for its logs).
    pub(super) program: String,
}

impl LocalTable {
    /// An empty table, not draining, for a program on `workers`.
    pub(super) fn new(workers: Arc<workers::Workers>) -> Self {
        Self {
            routes: watch::channel(Arc::new(Routes::default())).0,
            draining: Arc::new(AtomicBool::new(false)),
            gate: gate::GateTx::new(),
            traffic: Arc::new(Traffic::default()),
            workers,
            limits: Mutex::new(Vec::new()),
            program: String::new(),
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

    /// Marks the program as proxied (its counters are read) or not.
    pub fn set_proxied(&self, on: bool) {
        self.traffic.set_proxied(on);
    }

    /// The program's counters, for whoever reads them.
    pub fn counters(&self) -> LocalCounters {
        LocalCounters {
            traffic: self.traffic.clone(),
        }
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

    /// Publishes `set`: its counted processes get counters (kept while they
    /// stay counted), and the proxy routes by its routes from now on (one
    /// `watch` send, unless it routes to the same upstreams as before).
    pub fn publish(&self, set: &RouteSet) {
        let counted = set
            .counted
            .iter()
            .chain(set.routes.iter().map(|r| &r.process))
            .chain(
                set.canary
                    .iter()
                    .flat_map(|c| c.routes.iter().map(|r| &r.process)),
            );
        let live = self.traffic.set_live(counted.copied());
        let current = self.routes.borrow().clone();
        let mut threads = None;
        let mut upstream = |r: &Route| -> Option<Arc<Upstream>> {
            if let Some(up) = current.find(r) {
                return Some(up.clone());
            }
            let stats = live.iter().find(|(id, _)| *id == r.process)?.1.clone();
            let threads = *threads.get_or_insert_with(|| self.workers.count());
            Some(Upstream::new(r.process, r.addr.clone(), stats, threads))
        };
        let upstreams = set.routes.iter().filter_map(&mut upstream).collect();
        let canary = set.canary.as_ref().map(|c| canary::Canary {
            gen: c.generation,
            stable_gen: c.stable_generation,
            percent: c.percent,
            header: c
                .header
                .as_ref()
                .and_then(|h| hyper::header::HeaderName::from_bytes(h.as_bytes()).ok()),
            upstreams: c.routes.iter().filter_map(&mut upstream).collect(),
        });
        drop(current);
        self.set_split(upstreams, canary);
    }

    /// Publishes a routing table with a canary beside the stable
    /// `upstreams` (None: no canary), unless nothing changed.
    fn set_split(&self, upstreams: Vec<Arc<Upstream>>, canary: Option<canary::Canary>) {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn route(instance: u32, generation: u64, serial: u64, port: u16) -> Route {
        Route {
            process: ProcessId {
                instance,
                generation,
                serial,
            },
            addr: PrivateAddr::Tcp(std::net::SocketAddr::from(([127, 0, 0, 1], port))),
        }
    }

    fn table() -> LocalTable {
        LocalTable::new(Arc::new(workers::Workers::new(1)))
    }

    #[test]
    fn a_process_that_stays_routed_keeps_its_upstream_and_a_dropped_one_is_let_go() {
        let t = table();
        let (a, b) = (route(0, 1, 1, 4001), route(1, 1, 2, 4002));
        t.publish(&RouteSet {
            routes: vec![a.clone(), b.clone()],
            ..RouteSet::default()
        });
        let first = t.routes.borrow().clone();
        let (up_a, up_b) = (first.upstreams[0].clone(), first.upstreams[1].clone());
        let weak_b = Arc::downgrade(&up_b);
        drop((first, up_b));
        // b drains: still counted, no longer routed.
        t.publish(&RouteSet {
            routes: vec![a.clone()],
            counted: vec![a.process, b.process],
            ..RouteSet::default()
        });
        let second = t.routes.borrow().clone();
        assert!(Arc::ptr_eq(&second.upstreams[0], &up_a));
        assert!(
            weak_b.upgrade().is_none(),
            "the table let go of b's upstream"
        );
        // Its counters stay while it is counted, and go after.
        let counts = t.counters();
        t.traffic.set_proxied(true);
        let read = counts.read().expect("proxied");
        assert!(read.of(1, 1).is_some());
        t.publish(&RouteSet {
            routes: vec![a],
            ..RouteSet::default()
        });
        assert!(counts.read().expect("proxied").of(1, 1).is_none());
        // Publishing the same set again sends nothing.
        let mut rx = t.routes.subscribe();
        rx.mark_unchanged();
        t.publish(&RouteSet {
            routes: vec![route(0, 1, 1, 4001)],
            ..RouteSet::default()
        });
        assert!(!rx.has_changed().expect("open"));
    }

    #[test]
    fn a_respawned_process_counts_afresh_and_a_canary_routes_by_data() {
        let t = table();
        let a = route(0, 1, 1, 4001);
        t.publish(&RouteSet {
            routes: vec![a.clone()],
            ..RouteSet::default()
        });
        let up = t.routes.borrow().upstreams[0].clone();
        drop(super::super::InflightGuard::new(up.stats.clone()));
        assert_eq!(up.stats.counts().served, 1);
        // Same instance, generation and address; another process.
        let again = route(0, 1, 3, 4001);
        let canary = route(0, 2, 4, 4003);
        t.publish(&RouteSet {
            routes: vec![again],
            canary: Some(CanarySplit {
                generation: 2,
                stable_generation: 1,
                percent: 10,
                header: Some("X-User".into()),
                routes: vec![canary],
            }),
            counted: Vec::new(),
        });
        let routes = t.routes.borrow().clone();
        assert!(!Arc::ptr_eq(&routes.upstreams[0], &up));
        assert_eq!(routes.upstreams[0].stats.counts().served, 0);
        let c = routes.canary.as_ref().expect("canary");
        assert_eq!((c.gen, c.stable_gen, c.percent), (2, 1, 10));
        assert_eq!(c.header.as_ref().map(|h| h.as_str()), Some("x-user"));
        assert_eq!(c.upstreams[0].gen, 2);
    }

    #[test]
    fn what_crosses_the_boundary_round_trips_as_json() {
        let set = RouteSet {
            routes: vec![route(0, 1, 1, 4001)],
            canary: Some(CanarySplit {
                generation: 2,
                stable_generation: 1,
                percent: 10,
                header: None,
                routes: vec![Route {
                    process: route(0, 2, 2, 1).process,
                    addr: PrivateAddr::Unix("/run/zdt/web.0.2.sock".into()),
                }],
            }),
            counted: vec![route(1, 1, 3, 1).process],
        };
        let text = serde_json::to_string(&set).expect("serialize");
        assert_eq!(serde_json::from_str::<RouteSet>(&text).expect("parse"), set);
        let t = table();
        t.set_proxied(true);
        t.publish(&set);
        let counts = t.counters().read().expect("proxied");
        assert_eq!(counts.processes.len(), 3);
        let text = serde_json::to_string(&counts).expect("serialize");
        assert_eq!(
            serde_json::from_str::<ProgramCounts>(&text).expect("parse"),
            counts
        );
    }

    #[tokio::test]
    async fn a_drain_waits_on_the_process_even_after_it_is_no_longer_counted() {
        let t = table();
        let a = route(0, 1, 1, 4001);
        t.publish(&RouteSet {
            routes: vec![a.clone()],
            ..RouteSet::default()
        });
        let up = t.routes.borrow().upstreams[0].clone();
        let guard = super::super::InflightGuard::new(up.stats.clone());
        let drain = t.counters().drain(a.process);
        t.publish(&RouteSet::default());
        let busy = tokio::time::timeout(std::time::Duration::ZERO, drain.idle()).await;
        assert!(busy.is_err(), "one request is in flight");
        assert_eq!(drain.cut(), 1);
        drop(guard);
        drain.idle().await;
        assert_eq!(up.stats.counts().served, 1);
        let never = t.counters().drain(route(5, 5, 5, 1).process);
        never.idle().await;
        assert_eq!(never.cut(), 0);
    }
}
