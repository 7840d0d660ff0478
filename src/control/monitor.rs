//! `zdtctl status --watch`: a live view of each instance (CPU %, memory,
//! requests per second, requests in flight), like `pm2 monit` in a plain
//! terminal. zdt's status gives the instances and request counters; CPU and
//! memory are read from `/proc` by zdtctl itself (it runs on the same host).

use std::collections::HashMap;
use std::time::Instant;

use crate::admin::procstat::Usage;
use crate::state::{InstanceState, ProgramSnapshot};

/// One instance's row.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    /// Program name.
    pub program: String,
    /// Instance number.
    pub instance: u32,
    /// Generation of the process shown.
    pub generation: u64,
    /// State.
    pub state: InstanceState,
    /// Its pid, if it has a process.
    pub pid: Option<u32>,
    /// CPU use of its process group since the last sample, in % of one CPU;
    /// None on the first sample of a process or when /proc cannot be read.
    pub cpu_percent: Option<f64>,
    /// Resident memory of its process group, bytes.
    pub rss_bytes: Option<u64>,
    /// Processes in its group.
    pub processes: Option<u64>,
    /// Proxy mode: requests answered per second since the last sample.
    pub requests_per_s: Option<f64>,
    /// Proxy mode: requests in flight now.
    pub inflight: Option<u64>,
    /// Restarts so far.
    pub restarts: u32,
}

/// The samples of the previous refresh, to turn counters into rates.
#[derive(Debug, Default)]
pub struct Monitor {
    last: HashMap<u32, (Instant, f64, Option<u64>)>,
}

impl Monitor {
    /// The rows for `programs` with `usage` (process groups by id), at `now`.
    pub fn rows(
        &mut self,
        programs: &[ProgramSnapshot],
        usage: &HashMap<u32, Usage>,
        now: Instant,
    ) -> Vec<Row> {
        let mut rows = Vec::new();
        let mut seen = HashMap::new();
        for p in programs {
            for i in &p.instances {
                let group = i.pid.and_then(|pid| usage.get(&pid));
                let served = i.requests.map(|r| r.served);
                let prev = i.pid.and_then(|pid| self.last.get(&pid));
                let rate = |now_v: f64, then_v: f64, then: Instant| {
                    let dt = now.duration_since(then).as_secs_f64();
                    (dt > 0.0).then(|| ((now_v - then_v) / dt).max(0.0))
                };
                let cpu_percent = match (group, prev) {
                    (Some(g), Some(&(then, cpu, _))) => {
                        rate(g.cpu_seconds, cpu, then).map(|r| r * 100.0)
                    }
                    _ => None,
                };
                let requests_per_s = match (served, prev) {
                    (Some(s), Some(&(then, _, Some(before)))) => {
                        rate(s as f64, before as f64, then)
                    }
                    _ => None,
                };
                if let Some(pid) = i.pid {
                    seen.insert(pid, (now, group.map_or(0.0, |g| g.cpu_seconds), served));
                }
                rows.push(Row {
                    program: p.name.clone(),
                    instance: i.instance,
                    generation: i.generation,
                    state: i.state,
                    pid: i.pid,
                    cpu_percent,
                    rss_bytes: group.map(|g| g.rss_bytes),
                    processes: group.map(|g| g.processes),
                    requests_per_s,
                    inflight: i.requests.map(|r| r.inflight),
                    restarts: i.restarts,
                });
            }
        }
        self.last = seen;
        rows
    }
}

/// Bytes as "12.3M" (binary units).
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "K", "M", "G", "T"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n}B")
    } else {
        format!("{v:.1}{}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{InstanceSnapshot, RequestCounts};
    use std::time::Duration;

    fn snap(pid: u32, served: u64) -> Vec<ProgramSnapshot> {
        let i: InstanceSnapshot = serde_json::from_value(serde_json::json!({
            "program": "web", "instance": 0, "generation": 3, "state": "RUNNING",
            "pid": pid, "since_ms": 0, "restarts": 1, "log_dropped_bytes": 0,
            "requests": RequestCounts { inflight: 2, served, ..Default::default() },
        }))
        .expect("an instance");
        let p: ProgramSnapshot = serde_json::from_value(serde_json::json!({
            "name": "web", "generation": 3, "instances": [i],
        }))
        .expect("a program");
        vec![p]
    }

    #[test]
    fn rates_come_from_two_samples_of_the_same_process() {
        let mut m = Monitor::default();
        let t0 = Instant::now();
        let usage = |cpu: f64| {
            HashMap::from([(
                7,
                Usage {
                    rss_bytes: 3 << 20,
                    cpu_seconds: cpu,
                    processes: 2,
                },
            )])
        };
        let first = m.rows(&snap(7, 100), &usage(1.0), t0);
        assert_eq!(first[0].cpu_percent, None);
        assert_eq!(first[0].requests_per_s, None);
        assert_eq!(first[0].rss_bytes, Some(3 << 20));
        let second = m.rows(&snap(7, 400), &usage(1.5), t0 + Duration::from_secs(2));
        assert_eq!(second[0].cpu_percent, Some(25.0));
        assert_eq!(second[0].requests_per_s, Some(150.0));
        assert_eq!(second[0].inflight, Some(2));
        // A new process (a restart) starts its rates afresh.
        let third = m.rows(&snap(8, 500), &HashMap::new(), t0 + Duration::from_secs(3));
        assert_eq!(
            (third[0].cpu_percent, third[0].requests_per_s),
            (None, None)
        );
        assert_eq!(human_bytes(3 << 20), "3.0M");
        assert_eq!(human_bytes(512), "512B");
    }
}
