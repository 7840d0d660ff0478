//! The counters: a program's [`Traffic`] (its totals, its generations'
//! counters and the live table `zdtctl status` reads), each counted
//! process's [`UpstreamStats`], and the [`InflightGuard`] a request holds
//! while it is in flight, which drain waits on ([`Traffic::wait_idle`]).
//! The program actor reads them through `table.rs`'s `Counters`.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

use super::stats::ProgramStats;
use super::table::{GenerationCounts, ProcessId, ProgramCounts};
use super::{GenStats, RequestCounts};

/// Request counters of one program, across all its generations, and the
/// live table of its upstreams' counters for `zdtctl status`.
#[derive(Debug, Default)]
pub struct Traffic {
    served: AtomicU64,
    failed: AtomicU64,
    cut: AtomicU64,
    pub(super) unavailable: AtomicU64,
    /// Requests (tcp: connections) held at a paused gate right now.
    pub(super) held: AtomicU64,
    /// The counters of every counted process (see `RouteSet::counted`).
    live: Mutex<Vec<(ProcessId, Arc<UpstreamStats>)>>,
    proxied: AtomicBool,
    /// Counters per generation (newest few), shared by the generation's
    /// processes so a crash does not reset them.
    gens: Mutex<Vec<(u64, Arc<GenStats>)>>,
    /// Status classes, durations, queue waits, connect errors, resends.
    pub(super) stats: ProgramStats,
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

    /// Keeps the counters of the processes in `ids` (new ones start at
    /// zero), drops the others; the table as it is then.
    pub(super) fn set_live(
        self: &Arc<Self>,
        ids: impl Iterator<Item = ProcessId>,
    ) -> Vec<(ProcessId, Arc<UpstreamStats>)> {
        let mut l = self.live.lock().unwrap_or_else(|p| p.into_inner());
        let mut live: Vec<(ProcessId, Arc<UpstreamStats>)> = Vec::with_capacity(l.len());
        for id in ids {
            if live.iter().any(|(i, _)| *i == id) {
                continue;
            }
            let stats = match l.iter().find(|(i, _)| *i == id) {
                Some((_, s)) => s.clone(),
                None => Arc::new(UpstreamStats::new(
                    self.clone(),
                    self.gen_stats(id.generation),
                )),
            };
            live.push((id, stats));
        }
        *l = live.clone();
        live
    }

    /// The counters of process `id`, if it is counted.
    pub(super) fn stats_of(&self, id: ProcessId) -> Option<Arc<UpstreamStats>> {
        let l = self.live.lock().ok()?;
        l.iter().find(|(i, _)| *i == id).map(|(_, s)| s.clone())
    }

    /// Everything, as plain data.
    pub(super) fn read(&self) -> ProgramCounts {
        let processes = self
            .live
            .lock()
            .map(|l| l.iter().map(|(id, s)| (*id, s.counts())).collect())
            .unwrap_or_default();
        let generations = self
            .gens
            .lock()
            .map(|g| {
                g.iter()
                    .map(|(generation, s)| {
                        let (requests, errors_5xx, p99_us) = s.read();
                        GenerationCounts {
                            generation: *generation,
                            requests,
                            errors_5xx,
                            p99_us,
                        }
                    })
                    .collect()
            })
            .unwrap_or_default();
        ProgramCounts {
            totals: self.totals(),
            held: self.held(),
            processes,
            generations,
            stats: self.stats.read(),
            stale: false,
        }
    }

    /// The program's totals; `inflight` summed over its live upstreams.
    pub fn totals(&self) -> RequestCounts {
        let inflight = self
            .live
            .lock()
            .map(|l| l.iter().map(|(_, s)| s.inflight()).sum())
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
                    .find(|(_, s)| s.inflight() > 0)
                    .map(|(_, s)| s.clone())
            });
            match busy {
                Some(s) => s.wait_idle().await,
                None => return,
            }
        }
    }

    /// The counters of generation `gen`, created on first use; only the
    /// newest `GENS_KEPT` generations are kept.
    fn gen_stats(&self, gen: u64) -> Arc<GenStats> {
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
}

/// Counters of one counted process.
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
    pub(super) fn new(program: Arc<Traffic>, gen: Arc<GenStats>) -> Self {
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
    pub(super) fn new(stats: Arc<UpstreamStats>) -> Self {
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
            let took = self.started.elapsed();
            self.stats.gen.record(took, error);
            self.stats.program.stats.timed(took);
        }
        if self.stats.inflight.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.stats.idle.notify_waiters();
        }
    }
}
