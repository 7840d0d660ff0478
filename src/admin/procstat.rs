//! Memory and CPU of process groups, read from `/proc` at scrape time.
//!
//! A worker is the leader of its process group (zdt signals the group), so
//! its group's figures are the sum over every process whose `pgrp` is the
//! worker's pid: the PHP or Node server with the children it forked.

use std::collections::HashMap;

/// Resident memory and CPU time of a process or a group.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Usage {
    /// Resident set size, bytes.
    pub rss_bytes: u64,
    /// User plus system CPU time, seconds.
    pub cpu_seconds: f64,
    /// Processes counted.
    pub processes: u64,
}

/// One `/proc/PID/stat` line's fields that matter here: (pgrp, usage, CPU
/// seconds of its children it has waited for), with the fields counted as
/// `orphans::stat_fields` counts them.
pub fn parse_stat(line: &str, tick: f64, page: u64) -> Option<(u32, Usage, f64)> {
    let f = crate::orphans::stat_fields(line)?;
    // f[0] is field 3 (state): ppid(4) pgrp(5) ... utime(14) stime(15) ... rss(24).
    let field = |n: usize| f.get(n - 3).copied();
    let pgrp = field(5)?.parse().ok()?;
    let utime: u64 = field(14)?.parse().ok()?;
    let stime: u64 = field(15)?.parse().ok()?;
    let cutime: i64 = field(16)?.parse().ok()?;
    let cstime: i64 = field(17)?.parse().ok()?;
    let rss: i64 = field(24)?.parse().ok()?;
    Some((
        pgrp,
        Usage {
            rss_bytes: u64::try_from(rss).unwrap_or(0) * page,
            cpu_seconds: (utime + stime) as f64 / tick,
            processes: 1,
        },
        (cutime + cstime).max(0) as f64 / tick,
    ))
}

fn units() -> (f64, u64) {
    // SAFETY: sysconf takes an integer and returns one.
    let tick = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    // SAFETY: as above.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    (
        if tick > 0 { tick as f64 } else { 100.0 },
        u64::try_from(page).unwrap_or(4096),
    )
}

/// [`groups`], shared: a scan at most `max_age` old is reused, so that
/// every program checking `max_memory` each second costs one scan of
/// `/proc` between them, not one each.
pub fn groups_recent(max_age: std::time::Duration) -> std::sync::Arc<HashMap<u32, Usage>> {
    use std::sync::{Arc, Mutex};
    use std::time::Instant;
    type Scan = (Instant, Arc<HashMap<u32, Usage>>);
    static LAST: Mutex<Option<Scan>> = Mutex::new(None);
    if let Some((at, scan)) = &*LAST.lock().unwrap_or_else(|e| e.into_inner()) {
        if at.elapsed() <= max_age {
            return scan.clone();
        }
    }
    // Scanned without the lock: no caller waits on another's scan.
    let scan = Arc::new(groups());
    *LAST.lock().unwrap_or_else(|e| e.into_inner()) = Some((Instant::now(), scan.clone()));
    scan
}

/// The usage of every process group, by group id. A group's CPU time
/// counts its leader's waited-for children too, so it does not drop when a
/// worker's child (a PHP or Node worker process) exits and is reaped.
pub fn groups() -> HashMap<u32, Usage> {
    let (tick, page) = units();
    let mut out: HashMap<u32, Usage> = HashMap::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for entry in dir.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        // A process may be gone by now: skip it.
        let Ok(line) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        if let Some((pgrp, u, children)) = parse_stat(&line, tick, page) {
            let g = out.entry(pgrp).or_default();
            g.rss_bytes += u.rss_bytes;
            g.cpu_seconds += u.cpu_seconds;
            if pid.parse() == Ok(pgrp) {
                g.cpu_seconds += children;
            }
            g.processes += 1;
        }
    }
    out
}

/// The usage of one process, and how many fds it has open.
pub fn process(pid: u32) -> Option<(Usage, u64)> {
    let (tick, page) = units();
    let line = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, usage, _) = parse_stat(&line, tick, page)?;
    // Reading our own fd folder opens one more: not counted.
    let own = u64::from(pid == std::process::id());
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| (d.count() as u64).saturating_sub(own))
        .unwrap_or(0);
    Some((usage, fds))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stat_line_with_a_name_holding_spaces_and_parentheses_is_read() {
        let line = "4242 (php (worker) 2) S 1 4200 4200 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 1 0 123 1000000 300 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0";
        let (pgrp, u, children) = parse_stat(line, 100.0, 4096).expect("parsed");
        assert_eq!(pgrp, 4200);
        assert!(children.abs() < 1e-9);
        assert_eq!(u.rss_bytes, 300 * 4096);
        assert!((u.cpu_seconds - 3.0).abs() < 1e-9, "{}", u.cpu_seconds);
    }

    #[test]
    fn this_process_is_found_in_its_group() {
        let me = std::process::id();
        let pgrp = nix::unistd::getpgrp().as_raw() as u32;
        let (u, fds) = process(me).expect("own stat");
        assert!(u.rss_bytes > 0 && fds > 0);
        let g = groups();
        assert!(g.get(&pgrp).is_some_and(|g| g.rss_bytes >= u.rss_bytes));
    }

    #[test]
    fn a_truncated_line_is_refused() {
        assert_eq!(parse_stat("12 (x) S 1 2", 100.0, 4096), None);
        assert_eq!(parse_stat("garbage", 100.0, 4096), None);
    }
}
