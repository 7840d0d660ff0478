//! `/metrics`: the Prometheus text format (0.0.4), made on each scrape from
//! the programs' snapshots (as `zdtctl status` reads them, with the proxy's
//! counters), `/proc` (memory and CPU of each worker's process group and of
//! zdt's own processes), and the accumulating [`crate::metrics`].
//!
//! Labels are bounded: `program` and `instance` come from the
//! configuration, `state`, `code` and `process` from short fixed lists.
//! Generations are a value (`zdt_instance_generation`), never a label, as
//! they grow with every restart.

use std::collections::HashMap;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use super::procstat::{self, Usage};
use super::HostState;
use crate::metrics::Labels;
use crate::proxy::{HistogramCounts, BOUNDS_US};
use crate::state::{InstanceSnapshot, InstanceState, ProgramSnapshot};

const STATES: [InstanceState; 8] = [
    InstanceState::Stopped,
    InstanceState::Starting,
    InstanceState::Running,
    InstanceState::Draining,
    InstanceState::Stopping,
    InstanceState::Backoff,
    InstanceState::Exited,
    InstanceState::Fatal,
];

/// The text of `/metrics`.
pub fn encode(programs: Vec<ProgramSnapshot>, host: &HostState, proxy_pid: Option<u32>) -> String {
    let mut registry = Registry::default();
    crate::metrics::global().register(&mut registry);
    registry.register_collector(Box::new(Scrape {
        programs,
        host: host.clone(),
        proxy_pid,
        groups: procstat::groups(),
        now_ms: crate::state::now_ms(),
    }));
    let mut out = String::new();
    if prometheus_client::encoding::prometheus_text::encode(&mut out, &registry).is_err() {
        out.clear();
    }
    out
}

/// What one scrape reads.
#[derive(Debug)]
struct Scrape {
    programs: Vec<ProgramSnapshot>,
    host: HostState,
    proxy_pid: Option<u32>,
    groups: HashMap<u32, Usage>,
    now_ms: u64,
}

type Rows<T> = Vec<(Labels, T)>;

fn gauges(enc: &mut DescriptorEncoder, name: &str, help: &str, rows: Rows<f64>) -> Fmt {
    if rows.is_empty() {
        return Ok(());
    }
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, v) in &rows {
        ConstGauge::new(*v).encode(m.encode_family(labels)?)?;
    }
    Ok(())
}

fn counters<T>(enc: &mut DescriptorEncoder, name: &str, help: &str, rows: Rows<T>) -> Fmt
where
    T: prometheus_client::encoding::EncodeCounterValue + Copy,
{
    if rows.is_empty() {
        return Ok(());
    }
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, v) in &rows {
        ConstCounter::new(*v).encode(m.encode_family(labels)?)?;
    }
    Ok(())
}

fn histograms(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: Rows<&HistogramCounts>,
) -> Fmt {
    if rows.is_empty() {
        return Ok(());
    }
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Histogram)?;
    for (labels, h) in &rows {
        let buckets: Vec<(f64, u64)> = BOUNDS_US
            .iter()
            .map(|&b| b as f64 / 1e6)
            .chain([f64::INFINITY])
            .zip(h.buckets.iter().copied().chain(std::iter::repeat(0)))
            .collect();
        let count = h.buckets.iter().sum();
        m.encode_family(labels)?.encode_histogram::<Labels>(
            h.sum_us as f64 / 1e6,
            count,
            &buckets,
            None,
        )?;
    }
    Ok(())
}

type Fmt = Result<(), std::fmt::Error>;

fn program(p: &ProgramSnapshot) -> Labels {
    vec![("program", p.name.clone())]
}

fn with(mut labels: Labels, key: &'static str, value: impl Into<String>) -> Labels {
    labels.push((key, value.into()));
    labels
}

/// An exit as one number: the code, or 128 + the signal (as a shell shows it).
fn exit_number(e: &crate::state::ExitInfo) -> Option<f64> {
    if let Some(c) = e.code {
        return Some(f64::from(c));
    }
    let sig: nix::sys::signal::Signal = e.signal.as_deref()?.parse().ok()?;
    Some(f64::from(128 + sig as i32))
}

impl Scrape {
    /// Per program and instance number: the newest process, and every
    /// process of that number (an old generation draining beside a new one).
    fn instances(&self) -> Vec<(&ProgramSnapshot, &InstanceSnapshot, Vec<&InstanceSnapshot>)> {
        let mut out = Vec::new();
        for p in &self.programs {
            let mut numbers: Vec<u32> = p.instances.iter().map(|i| i.instance).collect();
            numbers.sort_unstable();
            numbers.dedup();
            for n in numbers {
                let all: Vec<&InstanceSnapshot> =
                    p.instances.iter().filter(|i| i.instance == n).collect();
                if let Some(newest) = all.iter().max_by_key(|i| i.generation) {
                    out.push((p, *newest, all.clone()));
                }
            }
        }
        out
    }

    fn usage(&self, pid: Option<u32>) -> Option<Usage> {
        pid.and_then(|pid| self.groups.get(&pid)).copied()
    }

    fn encode_programs(&self, enc: &mut DescriptorEncoder) -> Fmt {
        let ps = &self.programs;
        gauges(
            enc,
            "zdt_program_healthy",
            "1 when the program serves (what /health/PROGRAM answers 200 for), else 0",
            ps.iter()
                .map(|p| (program(p), f64::from(u8::from(p.serving().is_ok()))))
                .collect(),
        )?;
        gauges(
            enc,
            "zdt_program_generation",
            "The newest generation started",
            ps.iter()
                .map(|p| (program(p), p.generation as f64))
                .collect(),
        )?;
        let inst = self.instances();
        let label = |p: &ProgramSnapshot, i: &InstanceSnapshot| {
            with(program(p), "instance", i.instance.to_string())
        };
        let mut states = Vec::new();
        for (p, i, _) in &inst {
            for s in STATES {
                let v = f64::from(u8::from(i.state == s));
                states.push((with(label(p, i), "state", s.as_str()), v));
            }
        }
        gauges(
            enc,
            "zdt_instance_state",
            "1 for the state the instance's newest process is in",
            states,
        )?;
        gauges(
            enc,
            "zdt_instance_generation",
            "The generation of the instance's newest process",
            inst.iter()
                .map(|(p, i, _)| (label(p, i), i.generation as f64))
                .collect(),
        )?;
        gauges(
            enc,
            "zdt_instance_restarts",
            "Starts of the instance after its first (a gauge: a canary's end gives its starts back)",
            inst.iter()
                .map(|(p, i, _)| (label(p, i), f64::from(i.restarts)))
                .collect(),
        )?;
        gauges(
            enc,
            "zdt_instance_uptime_seconds",
            "Seconds since the instance's newest process was spawned",
            inst.iter()
                .filter(|(_, i, _)| i.state.has_process())
                .filter_map(|(p, i, _)| {
                    let up = self.now_ms.saturating_sub(i.started_ms?);
                    Some((label(p, i), up as f64 / 1000.0))
                })
                .collect(),
        )?;
        gauges(
            enc,
            "zdt_instance_last_exit_code",
            "How the instance's previous process ended: its exit code, or 128 + the signal that killed it",
            inst.iter()
                .filter_map(|(p, i, _)| Some((label(p, i), exit_number(i.last_exit.as_ref()?)?)))
                .collect(),
        )?;
        gauges(
            enc,
            "zdt_instance_resident_memory_bytes",
            "Resident memory of the instance's process groups (a draining old generation included)",
            inst.iter()
                .map(|(p, i, all)| {
                    let rss: u64 = all
                        .iter()
                        .filter_map(|a| self.usage(a.pid))
                        .map(|u| u.rss_bytes)
                        .sum();
                    (label(p, i), rss as f64)
                })
                .collect(),
        )?;
        counters(
            enc,
            "zdt_instance_cpu_seconds",
            "CPU time (user and system) of the process group of the instance's newest process, with the children its leader reaped",
            inst.iter()
                .filter_map(|(p, i, _)| Some((label(p, i), self.usage(i.pid)?.cpu_seconds)))
                .collect(),
        )?;
        gauges(
            enc,
            "zdt_instance_processes",
            "Processes in the instance's process groups",
            inst.iter()
                .map(|(p, i, all)| {
                    let n: u64 = all
                        .iter()
                        .filter_map(|a| self.usage(a.pid))
                        .map(|u| u.processes)
                        .sum();
                    (label(p, i), n as f64)
                })
                .collect(),
        )?;
        Ok(())
    }

    fn encode_proxy(&self, enc: &mut DescriptorEncoder) -> Fmt {
        let proxied: Vec<(&ProgramSnapshot, crate::state::RequestCounts)> = self
            .programs
            .iter()
            // Only counters read from the proxy: none while its process is
            // replaced (zeros would read as a counter reset).
            .filter(|p| p.traffic.is_some())
            .filter_map(|p| Some((p, p.requests?)))
            .collect();
        let mut classes = Vec::new();
        for (p, _) in &proxied {
            let t = p.traffic.clone().unwrap_or_default();
            for (i, n) in t.classes.iter().enumerate() {
                classes.push((with(program(p), "code", format!("{}xx", i + 1)), *n));
            }
        }
        counters(
            enc,
            "zdt_proxy_requests",
            "Answers to clients by status class (zdt's own 502 and 503 in 5xx)",
            classes,
        )?;
        let each = |f: fn(&crate::state::RequestCounts) -> u64| -> Rows<u64> {
            proxied.iter().map(|(p, c)| (program(p), f(c))).collect()
        };
        gauges(
            enc,
            "zdt_proxy_requests_in_flight",
            "Requests (tcp: connections) routed to an instance and not yet answered",
            each(|c| c.inflight)
                .into_iter()
                .map(|(l, v)| (l, v as f64))
                .collect(),
        )?;
        counters(
            enc,
            "zdt_proxy_failed",
            "Requests zdt answered 502 (or whose answer broke off) because the instance failed",
            each(|c| c.failed),
        )?;
        counters(
            enc,
            "zdt_proxy_unavailable",
            "Requests zdt answered 503 (no ready instance within queue_timeout, drain, maintenance)",
            each(|c| c.unavailable),
        )?;
        counters(
            enc,
            "zdt_proxy_cut",
            "Requests in flight on an instance that zdt stopped at max_wait",
            each(|c| c.cut),
        )?;
        let stats: Vec<(Labels, crate::proxy::TrafficStats)> = proxied
            .iter()
            .map(|(p, _)| (program(p), p.traffic.clone().unwrap_or_default()))
            .collect();
        counters(
            enc,
            "zdt_proxy_upstream_connect_errors",
            "Connections to an instance that could not be made",
            stats
                .iter()
                .map(|(l, t)| (l.clone(), t.connect_errors))
                .collect(),
        )?;
        counters(
            enc,
            "zdt_proxy_resends",
            "Requests sent again, to another instance after a failed connect or on a new connection after the keep-alive close race (never one that may have reached the app)",
            stats.iter().map(|(l, t)| (l.clone(), t.resends)).collect(),
        )?;
        histograms(
            enc,
            "zdt_proxy_request_duration_seconds",
            "Time from routing a request to the end of its answer (tcp: of a connection)",
            stats
                .iter()
                .map(|(l, t)| (l.clone(), &t.duration))
                .collect(),
        )?;
        histograms(
            enc,
            "zdt_proxy_queue_wait_seconds",
            "Time waited for a ready instance, by the requests that found none at once",
            stats.iter().map(|(l, t)| (l.clone(), &t.queue)).collect(),
        )?;
        Ok(())
    }

    fn encode_self(&self, enc: &mut DescriptorEncoder) -> Fmt {
        gauges(
            enc,
            "zdt_info",
            "zdt's version",
            vec![(
                vec![("version", env!("CARGO_PKG_VERSION").to_string())],
                1.0,
            )],
        )?;
        gauges(
            enc,
            "zdt_shutting_down",
            "1 from the moment zdt begins to shut down (before drain_delay)",
            vec![(Vec::new(), f64::from(u8::from(self.host.shutting_down)))],
        )?;
        let mut procs = vec![("daemon", std::process::id())];
        if let Some(pid) = self.proxy_pid {
            procs.push(("proxy", pid));
        }
        let read: Vec<(Labels, Usage, u64)> = procs
            .into_iter()
            .filter_map(|(name, pid)| {
                let (u, fds) = procstat::process(pid)?;
                Some((vec![("process", name.to_string())], u, fds))
            })
            .collect();
        gauges(
            enc,
            "zdt_resident_memory_bytes",
            "Resident memory of zdt's own processes (the daemon, the proxy process)",
            read.iter()
                .map(|(l, u, _)| (l.clone(), u.rss_bytes as f64))
                .collect(),
        )?;
        counters(
            enc,
            "zdt_cpu_seconds",
            "CPU time (user and system) of zdt's own processes",
            read.iter()
                .map(|(l, u, _)| (l.clone(), u.cpu_seconds))
                .collect(),
        )?;
        gauges(
            enc,
            "zdt_open_fds",
            "Open file descriptors of zdt's own processes",
            read.iter()
                .map(|(l, _, fds)| (l.clone(), *fds as f64))
                .collect(),
        )?;
        Ok(())
    }
}

impl Collector for Scrape {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        self.encode_self(&mut encoder)?;
        self.encode_programs(&mut encoder)?;
        self.encode_proxy(&mut encoder)
    }
}
