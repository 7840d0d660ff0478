//! zdt's own counters and histograms, the ones that accumulate between
//! scrapes: restart phases, restarts by outcome, drains cut short, control
//! requests. The admin listener's `/metrics` (see [`crate::admin`]) encodes
//! these beside the values it reads at scrape time (states, process memory
//! and CPU, the proxy's request counters).
//!
//! They live in one process-wide [`Metrics`] ([`global`]), the way a
//! Prometheus client's default registry does: the program actors and the
//! control server record into it, and a program keeps its series across
//! reloads because they are found by its name. Every label value is a
//! program name, an outcome or a command name: bounded by the configuration
//! and the code, never by a client.

use std::sync::OnceLock;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// A metric's labels: `(name, value)` pairs.
pub type Labels = Vec<(&'static str, String)>;

type Histograms = Family<Labels, Histogram, fn() -> Histogram>;

/// Upper bounds, in seconds, of the restart phase histograms: from a few
/// milliseconds (a worker that is ready at once) to minutes (a long drain).
const PHASE_BUCKETS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];

fn phase_histogram() -> Histogram {
    Histogram::new(PHASE_BUCKETS)
}

/// The accumulating metrics. Clones of the families share their values.
#[derive(Debug)]
pub struct Metrics {
    restart_ready: Histograms,
    restart_switch: Histograms,
    restart_drain: Histograms,
    restarts: Family<Labels, Counter>,
    drain_killed: Family<Labels, Counter>,
    drain_cut: Family<Labels, Counter>,
    control_requests: Family<Labels, Counter>,
}

/// The process's metrics.
pub fn global() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(|| Metrics {
        restart_ready: Family::new_with_constructor(phase_histogram),
        restart_switch: Family::new_with_constructor(phase_histogram),
        restart_drain: Family::new_with_constructor(phase_histogram),
        restarts: Family::default(),
        drain_killed: Family::default(),
        drain_cut: Family::default(),
        control_requests: Family::default(),
    })
}

fn program(name: &str) -> Labels {
    vec![("program", name.to_string())]
}

impl Metrics {
    /// A zero-downtime restart's new generation (or, rolling, one instance
    /// of it) was ready `secs` after the restart began.
    pub fn restart_ready(&self, name: &str, secs: f64) {
        self.restart_ready
            .get_or_create(&program(name))
            .observe(secs);
    }

    /// Traffic went to the new generation, all of it, `secs` after the
    /// restart began.
    pub fn restart_switched(&self, name: &str, secs: f64) {
        self.restart_switch
            .get_or_create(&program(name))
            .observe(secs);
    }

    /// The old generation was gone `secs` after the switch.
    pub fn restart_drained(&self, name: &str, secs: f64) {
        self.restart_drain
            .get_or_create(&program(name))
            .observe(secs);
    }

    /// A zero-downtime restart ended: `ok`, or failed (the old generation
    /// kept serving).
    pub fn restart_done(&self, name: &str, ok: bool) {
        let outcome = if ok { "ok" } else { "failed" };
        let labels = vec![
            ("program", name.to_string()),
            ("outcome", outcome.to_string()),
        ];
        self.restarts.get_or_create(&labels).inc();
    }

    /// An old generation did not finish within `max_wait`: `killed` when it
    /// was SIGKILLed, `cut` requests in flight were cut (proxy mode).
    pub fn drain_cut_short(&self, name: &str, killed: bool, cut: u64) {
        if killed {
            self.drain_killed.get_or_create(&program(name)).inc();
        }
        self.drain_cut.get_or_create(&program(name)).inc_by(cut);
    }

    /// A control request arrived (`command`: its `cmd`, e.g. "restart").
    pub fn control_request(&self, command: &'static str) {
        let labels = vec![("command", command.to_string())];
        self.control_requests.get_or_create(&labels).inc();
    }

    /// Adds the families to `registry` (they stay shared with `self`).
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "zdt_restart_ready_seconds",
            "Time from the start of a zero-downtime restart to its new generation (rolling: each instance) being ready",
            self.restart_ready.clone(),
        );
        registry.register(
            "zdt_restart_switch_seconds",
            "Time from the start of a zero-downtime restart to all traffic going to the new generation",
            self.restart_switch.clone(),
        );
        registry.register(
            "zdt_restart_drain_seconds",
            "Time from the switch to the old generation's exit",
            self.restart_drain.clone(),
        );
        registry.register(
            "zdt_restarts",
            "Zero-downtime restarts by outcome (failed: the new generation never got ready; the old one kept serving)",
            self.restarts.clone(),
        );
        registry.register(
            "zdt_drain_killed",
            "Old processes SIGKILLed because they had not exited within max_wait (and kill_timeout)",
            self.drain_killed.clone(),
        );
        registry.register(
            "zdt_drain_cut_requests",
            "Requests still in flight on an old process when its drain ran out of max_wait, and were cut",
            self.drain_cut.clone(),
        );
        registry.register(
            "zdt_control_requests",
            "Requests on the control socket, by command",
            self.control_requests.clone(),
        );
    }
}
